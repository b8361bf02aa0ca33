#!/bin/sh
# SPDX-License-Identifier: MIT
# Run every test binary given; print each one's cmocka output (stdout and
# stderr) and a closing summary. Exit 1 if any failed.
passed=0
failed=0
failed_names=""
for t in "$@"; do
        echo "=== $t"
        # AB_TEST_WRAPPER (make check-valgrind) runs each test program under a tool
        if ${AB_TEST_WRAPPER:-} "$t" 2>&1; then
                passed=$((passed + 1))
        else
                failed=$((failed + 1))
                failed_names="$failed_names $t"
        fi
done
echo
echo "test programs: $passed passed, $failed failed"
[ $failed -eq 0 ] || { echo "failed:$failed_names"; exit 1; }
