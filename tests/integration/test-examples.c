/* SPDX-License-Identifier: MIT */
/*
 * The example policies in examples/policy/ stay valid: `agent-brokerctl
 * policy check` passes on each of them (exit 0; exit 1 with warnings only
 * for the examples listed in with_warnings, which show a lint warning on
 * purpose), on all of them together (as README shows), and the real
 * broker compiles the directory and serves its agents.
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include "harness.h"

/*
 * Examples that deliberately draw warnings: demo.json matches "@broker"
 * (whoever runs the broker) with no sha256/unit selector, so that the
 * quick start works for any user; `policy check` says why that is weak.
 */
static const char *const with_warnings[] = { "demo.json" };

#define MAX_EXAMPLES 64

static char examples_dir[PATH_MAX];
static char *names[MAX_EXAMPLES];
static size_t n_names;

static bool has_demo(const char *dir)
{
        char p[PATH_MAX + 16];
        struct stat st;
        snprintf(p, sizeof p, "%s/demo.json", dir);
        return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* examples/policy of this source tree: beside this file, or above the build directory. */
static int find_examples(void)
{
        const char *f = __FILE__; /* tests/integration/test-examples.c, relative to the top when built */
        const char *slash = strrchr(f, '/');
        char cand[PATH_MAX];

        snprintf(cand, sizeof cand, "%.*s/../../examples/policy", (int)(slash ? slash - f : 1), slash ? f : ".");
        if (!has_demo(cand))
                snprintf(cand, sizeof cand, "%s/../examples/policy", hx_build_dir());
        if (!has_demo(cand) || !realpath(cand, examples_dir)) {
                fprintf(stderr, "cannot find examples/policy (tried beside %s and above %s)\n", f, hx_build_dir());
                return -1;
        }
        return 0;
}

static int cmp_str(const void *a, const void *b)
{
        return strcmp(*(char *const *)a, *(char *const *)b);
}

static int group_setup(void **state)
{
        DIR *d;
        struct dirent *de;

        if (find_examples() < 0)
                return -1;
        d = opendir(examples_dir);
        if (!d)
                return -1;
        while ((de = readdir(d))) {
                size_t l = strlen(de->d_name);
                if (de->d_name[0] == '.' || l < 6 || strcmp(de->d_name + l - 5, ".json") != 0)
                        continue;
                if (n_names == MAX_EXAMPLES || !(names[n_names] = strdup(de->d_name))) {
                        closedir(d);
                        return -1;
                }
                n_names++;
        }
        closedir(d);
        qsort(names, n_names, sizeof *names, cmp_str);
        return 0;
}

static int group_teardown(void **state)
{
        for (size_t i = 0; i < n_names; i++)
                free(names[i]);
        n_names = 0;
        return 0;
}

static bool expects_warnings(const char *name)
{
        for (size_t i = 0; i < sizeof with_warnings / sizeof with_warnings[0]; i++)
                if (strcmp(with_warnings[i], name) == 0)
                        return true;
        return false;
}

/* Run `agent-brokerctl policy check --json ARGS...` (argv from paths); parse its report. */
static json_t *check(char **paths, size_t n, int *ret_exit)
{
        char ctl[PATH_MAX], *argv[MAX_EXAMPLES + 8];
        size_t k = 0;
        hx_run_result res;
        json_t *out;
        json_error_t err;

        assert_int_equal(hx_build_path("agent-brokerctl", ctl, sizeof ctl), 0);
        argv[k++] = ctl;
        argv[k++] = (char *)"policy";
        argv[k++] = (char *)"check";
        argv[k++] = (char *)"--json";
        for (size_t i = 0; i < n; i++)
                argv[k++] = paths[i];
        argv[k] = NULL;
        assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, &res), 0);
        assert_false(res.timed_out);
        out = json_loads(res.out, 0, &err);
        if (!json_is_object(out))
                fprintf(stderr, "policy check: exit %d, not JSON (%s):\n%s\n%s\n", res.exit_code, err.text, res.out,
                        res.err);
        assert_true(json_is_object(out));
        *ret_exit = res.exit_code;
        hx_run_result_done(&res);
        return out;
}

static void print_findings(const char *what, const json_t *report)
{
        size_t i;
        json_t *fnd;
        fprintf(stderr, "%s:\n", what);
        json_array_foreach(json_object_get(report, "findings"), i, fnd)
                fprintf(stderr, "  %s %s: %s\n", json_string_value(json_object_get(fnd, "severity")),
                        json_string_value(json_object_get(fnd, "path")),
                        json_string_value(json_object_get(fnd, "message")));
}

/* Each example on its own: no errors; warnings only where listed (and then exit 1). */
static void test_each_example(void **state)
{
        assert_true(n_names >= 4); /* demo.json and the realistic ones documented in docs/policy.md */
        for (size_t i = 0; i < n_names; i++) {
                char path[PATH_MAX * 2], *p = path;
                int ex = -1;
                json_t *report;
                json_int_t errors, warnings;
                bool warn = expects_warnings(names[i]);

                snprintf(path, sizeof path, "%s/%s", examples_dir, names[i]);
                report = check(&p, 1, &ex);
                errors = json_integer_value(json_object_get(report, "errors"));
                warnings = json_integer_value(json_object_get(report, "warnings"));
                if (errors != 0 || ex != (warn ? 1 : 0) || (warn ? warnings == 0 : warnings != 0)) {
                        print_findings(names[i], report);
                        fail_msg("%s: exit %d, %lld errors, %lld warnings; expected exit %d%s", names[i], ex,
                                 (long long)errors, (long long)warnings, warn ? 1 : 0,
                                 warn ? " with warnings only" : " with no finding");
                }
                assert_int_equal(json_integer_value(json_object_get(report, "files")), 1);
                json_decref(report);
        }
}

/* All of them at once, as README shows (`policy check examples/policy/NAME.json ...`): ids unique across files. */
static void test_examples_together(void **state)
{
        char *paths[MAX_EXAMPLES];
        int ex = -1;
        json_t *report;
        bool any_warn = false;

        for (size_t i = 0; i < n_names; i++) {
                assert_true(asprintf(&paths[i], "%s/%s", examples_dir, names[i]) > 0);
                any_warn |= expects_warnings(names[i]);
        }
        report = check(paths, n_names, &ex);
        if (json_integer_value(json_object_get(report, "errors")) != 0 || ex != (any_warn ? 1 : 0))
                print_findings("all examples", report);
        assert_int_equal(json_integer_value(json_object_get(report, "errors")), 0);
        assert_int_equal(ex, any_warn ? 1 : 0);
        assert_int_equal(json_integer_value(json_object_get(report, "files")), (json_int_t)n_names);
        json_decref(report);
        for (size_t i = 0; i < n_names; i++)
                free(paths[i]);
}

/* The broker compiles the examples directory and serves demo.json's grant to this process (root). */
static void test_examples_serve(void **state)
{
        hx_broker *b;
        hx_run_result res;
        json_t *show;

        assert_int_equal(hx_setup(state), 0);
        b = *state;
        snprintf(b->policy, sizeof b->policy, "%s", examples_dir);
        hx_start(b);

        assert_int_equal(hx_ctl(b, -1, &res, "token", "--audience", "mcp://git.internal", "--scope", "repo:read",
                                "--scope", "repo:write", NULL),
                         0);
        if (res.exit_code != 0)
                fprintf(stderr, "token: %s\n", res.err);
        assert_int_equal(res.exit_code, 0);
        assert_true(strncmp(res.out, "eyJ", 3) == 0);
        hx_run_result_done(&res);

        assert_int_equal(hx_ctl(b, -1, &res, "policy", "show", NULL), 0);
        assert_int_equal(res.exit_code, 0);
        show = json_loads(res.out, 0, NULL);
        assert_non_null(show);
        assert_int_equal(json_array_size(json_object_get(show, "sources")), n_names);
        /* demo-agent, ci-runner, deploy-agent, code-review-bot, triage-bot at least */
        assert_true(json_array_size(json_object_get(show, "agents")) >= 5);
        json_decref(show);
        hx_run_result_done(&res);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_each_example),
                cmocka_unit_test(test_examples_together),
                cmocka_unit_test_teardown(test_examples_serve, hx_teardown),
        };
        return cmocka_run_group_tests_name("examples", tests, group_setup, group_teardown);
}
