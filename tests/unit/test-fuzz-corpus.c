/* SPDX-License-Identifier: MIT */
/*
 * Every fuzz seed and every saved crash input (tests/fuzz/corpus/TARGET/)
 * runs through the fuzz targets in the normal build, so that a crash once
 * found stays fixed. The targets are compiled in here under other names.
 */
#include <dirent.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#define FUZZ_ENTRY fuzz_varlink
#include "../fuzz/fuzz-varlink.c"
#undef FUZZ_ENTRY
#define FUZZ_ENTRY fuzz_jwt
#include "../fuzz/fuzz-jwt.c"
#undef FUZZ_ENTRY
#define FUZZ_ENTRY fuzz_policy
#include "../fuzz/fuzz-policy.c"
#undef FUZZ_ENTRY
#define FUZZ_ENTRY fuzz_pam_args
#include "../fuzz/fuzz-pam_args.c"
#undef FUZZ_ENTRY

static const char *corpus_root(void)
{
        static char root[PATH_MAX];
        const char *f = __FILE__; /* tests/unit/test-fuzz-corpus.c, relative to the top */
        const char *slash = strrchr(f, '/');
        snprintf(root, sizeof root, "%.*s/../fuzz/corpus", (int)(slash ? slash - f : 1), slash ? f : ".");
        return root;
}

static void run_dir(const char *target, int (*fn)(const uint8_t *, size_t))
{
        char dir[PATH_MAX + 64];
        DIR *d;
        struct dirent *de;
        unsigned n = 0;

        snprintf(dir, sizeof dir, "%s/%s", corpus_root(), target);
        d = opendir(dir);
        assert_non_null(d);
        while ((de = readdir(d))) {
                char path[PATH_MAX * 2];
                FILE *f;
                uint8_t *buf;
                long len;
                if (de->d_name[0] == '.')
                        continue;
                snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
                f = fopen(path, "rb");
                assert_non_null(f);
                fseek(f, 0, SEEK_END);
                len = ftell(f);
                fseek(f, 0, SEEK_SET);
                buf = malloc((size_t)len + 1);
                assert_non_null(buf);
                assert_int_equal(fread(buf, 1, (size_t)len, f), (size_t)len);
                fclose(f);
                fn(buf, (size_t)len);
                free(buf);
                n++;
        }
        closedir(d);
        assert_true(n > 0);
}

static void test_varlink_corpus(void **state)
{
        (void)state;
        run_dir("varlink", fuzz_varlink);
}

static void test_jwt_corpus(void **state)
{
        (void)state;
        run_dir("jwt", fuzz_jwt);
}

static void test_policy_corpus(void **state)
{
        (void)state;
        run_dir("policy", fuzz_policy);
}

static void test_pam_args_corpus(void **state)
{
        (void)state;
        run_dir("pam_args", fuzz_pam_args);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_varlink_corpus),
                cmocka_unit_test(test_jwt_corpus),
                cmocka_unit_test(test_policy_corpus),
                cmocka_unit_test(test_pam_args_corpus),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
