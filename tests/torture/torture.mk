# SPDX-License-Identifier: MIT
# `make torture` (TORTURE_SCALE=1 in CI, 10 for the full run).
TORTURE_SCALE ?= 1

$(B)/tests/torture: tests/torture/torture.c tests/integration/harness.c tests/integration/harness.h $(B)/libagentbroker.a
	@mkdir -p $(dir $@)
	$(CC) $(TEST_CFLAGS) $(LDFLAGS) -o $@ $(filter %.c %.a,$^) $(TEST_LIBS)

.PHONY: torture
torture: all $(B)/tests/torture
	@TORTURE_SCALE=$(TORTURE_SCALE) B=$(B) tests/run-tests.sh $(B)/tests/torture
