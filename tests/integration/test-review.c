/* SPDX-License-Identifier: MIT */
/*
 * Integration tests for `agent-brokerctl review` and `agent-brokerctl
 * coverage` (issue 6, docs/review.md): known answers from the policy and
 * pam.d fixtures under tests/fixtures/review/, PAM parser edge cases in a
 * scratch directory, the real broker (ShowPolicy, ListSessions, GetUsage
 * after real issuance), and a fake admin socket for what the real broker
 * cannot be made to say (no GetUsage, an owner-less agent, usage 40 days
 * old, a usage answer over the 64 KiB message limit).
 *
 * Scratch files live in DIR/work: the broker watches the directory of its
 * policy file (DIR) and would reload on any write there.
 */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include "harness.h"

#define NO_SOCKET "/nonexistent/agent-broker-test/none.sock"
#define AUD_GIT "mcp://git.internal"
#define AUD_TICKETS "https://tickets.internal/api"

/* ---- fixtures ------------------------------------------------------------- */

typedef hx_fixture fx; /* the broker, DIR/work, a tmpfs or a helper process to remove in teardown */

/* tests/fixtures/review/NAME: beside this source file (cwd is the top), or from the binary's place. */
static void fixture(char *out, size_t outmax, const char *name)
{
        const char *file = __FILE__, *slash = strrchr(file, '/');
        char exe[PATH_MAX];
        ssize_t n;

        snprintf(out, outmax, "%.*s/../fixtures/review/%s", (int)(slash ? slash - file : 1), slash ? file : ".",
                 name);
        if (access(out, R_OK) == 0)
                return;
        n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        if (n > 0) {
                exe[n] = '\0';
                if (strrchr(exe, '/'))
                        *strrchr(exe, '/') = '\0';
                snprintf(out, outmax, "%s/../../tests/fixtures/review/%s", exe, name);
        }
        assert_int_equal(access(out, R_OK), 0);
}

/* Run agent-brokerctl --socket NO_SOCKET --admin-socket admin ARGS... (NULL-ended); admin NULL: NO_SOCKET. */
static void ctl(hx_run_result *r, const char *admin, ...) __attribute__((sentinel));
static void ctl(hx_run_result *r, const char *admin, ...)
{
        char path[PATH_MAX];
        char *argv[48];
        size_t n = 0;
        const char *a;
        va_list ap;

        assert_int_equal(hx_build_path("agent-brokerctl", path, sizeof path), 0);
        argv[n++] = path;
        argv[n++] = (char *)"--socket";
        argv[n++] = (char *)NO_SOCKET;
        argv[n++] = (char *)"--admin-socket";
        argv[n++] = (char *)(admin ? admin : NO_SOCKET);
        va_start(ap, admin);
        while ((a = va_arg(ap, const char *)) && n < 47)
                argv[n++] = (char *)a;
        va_end(ap);
        argv[n] = NULL;
        memset(r, 0, sizeof *r);
        assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, r), 0);
        assert_false(r->timed_out);
}

static void expect_exit(const hx_run_result *r, int code)
{
        if (r->exit_code != code)
                fprintf(stderr, "exit %d, expected %d\n--- stdout\n%s\n--- stderr\n%s\n", r->exit_code, code,
                        r->out ? r->out : "", r->err ? r->err : "");
        assert_int_equal(r->exit_code, code);
}

static json_t *parse(const hx_run_result *r)
{
        json_error_t e;
        json_t *j = json_loads(r->out ? r->out : "", 0, &e);
        if (!j)
                fprintf(stderr, "not JSON (%s): %s\n", e.text, r->out ? r->out : "");
        assert_non_null(j);
        return j;
}

static const char *str(const json_t *o, const char *key)
{
        const char *s = json_string_value(json_object_get(o, key));
        if (!s)
                fprintf(stderr, "no string \"%s\"\n", key);
        assert_non_null(s);
        return s;
}

static long long num(const json_t *o, const char *key)
{
        json_t *v = json_object_get(o, key);
        if (!json_is_integer(v))
                fprintf(stderr, "no integer \"%s\"\n", key);
        assert_true(json_is_integer(v));
        return (long long)json_integer_value(v);
}

static void is_null(const json_t *o, const char *key)
{
        json_t *v = json_object_get(o, key);
        if (!json_is_null(v))
                fprintf(stderr, "\"%s\" is not null\n", key);
        assert_true(json_is_null(v));
}

/* The element of arr whose key is val, or NULL. */
static json_t *find(const json_t *arr, const char *key, const char *val)
{
        size_t i;
        json_t *e;

        json_array_foreach(arr, i, e)
                if (json_is_string(json_object_get(e, key)) &&
                    strcmp(json_string_value(json_object_get(e, key)), val) == 0)
                        return e;
        return NULL;
}

static json_t *must_find(const json_t *arr, const char *key, const char *val)
{
        json_t *e = find(arr, key, val);
        if (!e)
                fprintf(stderr, "no element with %s \"%s\"\n", key, val);
        assert_non_null(e);
        return e;
}

/* arr's key values are exactly names (in order), NULL-ended. */
static void expect_names(const json_t *arr, const char *key, ...)
{
        const char *want;
        size_t i = 0;
        va_list ap;

        va_start(ap, key);
        while ((want = va_arg(ap, const char *))) {
                json_t *e = json_array_get(arr, i++);
                const char *got = e ? json_string_value(json_is_string(e) ? e : json_object_get(e, key)) : NULL;
                if (!got || strcmp(got, want) != 0) {
                        char *s = json_dumps(arr, JSON_COMPACT);
                        fprintf(stderr, "element %zu: expected \"%s\" in %s\n", i - 1, want, s ? s : "?");
                        free(s);
                }
                assert_non_null(got);
                assert_string_equal(got, want);
        }
        va_end(ap);
        assert_int_equal(json_array_size(arr), i);
}

/* The finding kinds of an agent review, in order, as one string "a b c". */
static void kinds(const json_t *agent, char *out, size_t outmax)
{
        size_t i, used = 0;
        json_t *f;

        out[0] = '\0';
        json_array_foreach(json_object_get(agent, "findings"), i, f) {
                int n = snprintf(out + used, outmax - used, "%s%s", used ? " " : "", str(f, "kind"));
                assert_true(n > 0 && (size_t)n < outmax - used);
                used += (size_t)n;
        }
}

static void write_in(const char *dir, const char *name, const char *text)
{
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/%s", dir, name);
        assert_int_equal(hx_write_file(p, text, 0644), 0);
}

/* ---- coverage: the pam.d fixture ----------------------------------------- */

static void test_coverage_fixture_json(void **state)
{
        char dir[PATH_MAX], pol[PATH_MAX];
        hx_run_result r;
        json_t *j, *e, *v, *g, *p;
        (void)state;

        fixture(dir, sizeof dir, "pam.d");
        fixture(pol, sizeof pol, "coverage-policy.json");
        ctl(&r, NULL, "coverage", "--pam-dir", dir, "--policy", pol, "--json", NULL);
        expect_exit(&r, 1);
        j = parse(&r);
        assert_string_equal(str(j, "policy"), pol);
        /* 15 service files; sshd.dpkg-old is a packaging leftover */
        assert_int_equal(num(j, "services"), 15);
        assert_int_equal(num(j, "pam_grants"), 4);

        /* (a) the module in the auth stack, through every kind of include */
        expect_names(json_object_get(j, "using_module"), "service", "broker-stack", "common-broker", "cups",
                     "dbadmin", "login", "sshd", "system-login", NULL);
        e = must_find(json_object_get(j, "using_module"), "service", "sshd"); /* @include */
        assert_string_equal(str(e, "file"), "sshd");
        expect_names(json_object_get(e, "audiences"), NULL, "pam:sshd", NULL);
        assert_true(json_is_false(json_object_get(e, "audience_override")));
        assert_int_equal(json_array_size(json_object_get(e, "via")), 1);
        v = json_array_get(json_object_get(e, "via"), 0);
        assert_string_equal(str(v, "file"), "common-broker");
        assert_int_equal(num(v, "line"), 3);
        assert_string_equal(str(v, "control"), "sufficient");
        is_null(v, "audience");
        assert_int_equal(json_array_size(json_object_get(e, "granted_to")), 1);
        g = json_array_get(json_object_get(e, "granted_to"), 0);
        assert_string_equal(str(g, "agent"), "ops-bot");
        assert_string_equal(str(g, "audience"), "pam:sshd");
        expect_names(json_object_get(g, "users"), NULL, "deploy", NULL);
        assert_int_equal(json_array_size(json_object_get(e, "included_by")), 0);

        e = must_find(json_object_get(j, "using_module"), "service", "login"); /* include -> substack -> continued line */
        v = json_array_get(json_object_get(e, "via"), 0);
        assert_string_equal(str(v, "file"), "broker-stack");
        assert_int_equal(num(v, "line"), 2); /* where the continued line starts */
        assert_string_equal(str(v, "control"), "[success=done default=die]");
        expect_names(json_object_get(e, "audiences"), NULL, "pam:login", NULL);
        assert_int_equal(json_array_size(json_object_get(e, "granted_to")), 0);

        e = must_find(json_object_get(j, "using_module"), "service", "dbadmin"); /* audience= override, "Auth" */
        expect_names(json_object_get(e, "audiences"), NULL, "pam:database", NULL);
        assert_true(json_is_true(json_object_get(e, "audience_override")));
        v = json_array_get(json_object_get(e, "via"), 0);
        assert_string_equal(str(v, "file"), "dbadmin");
        assert_int_equal(num(v, "line"), 3);
        assert_string_equal(str(v, "audience"), "pam:database");
        g = json_array_get(json_object_get(e, "granted_to"), 0);
        assert_non_null(g);
        assert_string_equal(str(g, "agent"), "db-bot");
        expect_names(json_object_get(g, "users"), NULL, "postgres", NULL);

        e = must_find(json_object_get(j, "using_module"), "service", "cups"); /* "-auth" */
        assert_string_equal(str(json_array_get(json_object_get(e, "via"), 0), "control"), "optional");

        e = must_find(json_object_get(j, "using_module"), "service", "common-broker");
        expect_names(json_object_get(e, "included_by"), NULL, "sshd", "su", NULL);
        e = must_find(json_object_get(j, "using_module"), "service", "broker-stack");
        expect_names(json_object_get(e, "included_by"), NULL, "system-login", NULL);

        /* (b) granted, no module: su (comments, account include, password/session lines do not count),
         * and ghost, which has no file: PAM uses "other" */
        expect_names(json_object_get(j, "uncovered"), "service", "su", "ghost", NULL);
        e = must_find(json_object_get(j, "uncovered"), "service", "su");
        assert_string_equal(str(e, "file"), "su");
        g = json_array_get(json_object_get(e, "granted_to"), 0);
        assert_string_equal(str(g, "agent"), "ops-bot");
        assert_string_equal(str(g, "audience"), "pam:su");
        expect_names(json_object_get(g, "users"), NULL, "root", NULL);
        e = must_find(json_object_get(j, "uncovered"), "service", "ghost");
        assert_string_equal(str(e, "file"), "other");

        /* (c) the module without a grant; fragments that others include are not services of their own */
        expect_names(json_object_get(j, "module_without_grant"), "service", "cups", "login", NULL);
        assert_int_equal(json_array_size(json_object_get(j, "not_configured")), 0);

        /* problems: the cycle (from both ends) and the missing substack */
        p = json_object_get(j, "problems");
        assert_int_equal(json_array_size(p), 3);
        e = must_find(p, "message", "include cycle: loop-a -> loop-b -> loop-a");
        assert_string_equal(str(e, "file"), "loop-b");
        assert_int_equal(num(e, "line"), 2);
        must_find(p, "message", "include cycle: loop-b -> loop-a -> loop-b");
        e = must_find(p, "message", "includes vpn-extra, which does not exist");
        assert_string_equal(str(e, "file"), "vpn");
        assert_int_equal(num(e, "line"), 2);

        /* nothing about cron, su in (a), or the leftover */
        assert_null(find(json_object_get(j, "using_module"), "service", "su"));
        assert_null(find(json_object_get(j, "using_module"), "service", "cron"));
        assert_null(find(json_object_get(j, "using_module"), "service", "sshd.dpkg-old"));
        json_decref(j);
        hx_run_result_done(&r);
}

static void test_coverage_fixture_text(void **state)
{
        char dir[PATH_MAX], pol[PATH_MAX];
        hx_run_result r;
        (void)state;

        fixture(dir, sizeof dir, "pam.d");
        fixture(pol, sizeof pol, "coverage-policy.json");
        ctl(&r, NULL, "coverage", "--pam-dir", dir, "--policy", pol, NULL);
        expect_exit(&r, 1);
        assert_non_null(strstr(r.out, "Services that use pam_agent_broker.so in their auth stack: 7\n"));
        assert_non_null(strstr(r.out, "Granted to agents but NOT using pam_agent_broker.so (paths that bypass the broker): 2\n"));
        assert_non_null(strstr(r.out, "  su                   granted to ops-bot (pam:su, users: root)\n"));
        assert_non_null(strstr(r.out, "  ghost                (no file of its own: PAM uses other) granted to ops-bot"));
        assert_non_null(strstr(r.out, "Services that use pam_agent_broker.so without any grant: 2\n"));
        assert_non_null(strstr(r.out, "audience pam:database (audience= override)"));
        assert_non_null(strstr(r.out, "via broker-stack:2 [success=done default=die]"));
        assert_non_null(strstr(r.out, "  loop-b:2: include cycle: loop-a -> loop-b -> loop-a\n"));
        assert_non_null(strstr(r.out, "\n2 uncovered granted paths\n"));
        hx_run_result_done(&r);
}

static void test_coverage_all_covered(void **state)
{
        char dir[PATH_MAX], pol[PATH_MAX];
        hx_run_result r;
        json_t *j, *e;
        (void)state;

        fixture(dir, sizeof dir, "pam.d-covered");
        fixture(pol, sizeof pol, "coverage-covered-policy.json");
        ctl(&r, NULL, "coverage", "--pam-dir", dir, "--policy", pol, "--json", NULL);
        expect_exit(&r, 0);
        j = parse(&r);
        expect_names(json_object_get(j, "using_module"), "service", "broker", "sshd", NULL);
        e = must_find(json_object_get(j, "using_module"), "service", "sshd");
        assert_string_equal(str(json_array_get(json_object_get(e, "via"), 0), "file"), "broker");
        assert_int_equal(json_array_size(json_object_get(j, "uncovered")), 0);
        assert_int_equal(json_array_size(json_object_get(j, "module_without_grant")), 0);
        /* granted, but no file and no "other": nothing to bypass (PAM refuses such a service) */
        expect_names(json_object_get(j, "not_configured"), "service", "nowhere", NULL);
        e = must_find(json_object_get(j, "not_configured"), "service", "nowhere");
        assert_string_equal(str(json_array_get(json_object_get(e, "granted_to"), 0), "agent"), "ops-bot");
        assert_int_equal(json_array_size(json_object_get(j, "problems")), 0);
        json_decref(j);
        hx_run_result_done(&r);

        ctl(&r, NULL, "coverage", "--pam-dir", dir, "--policy", pol, NULL);
        expect_exit(&r, 0);
        assert_non_null(strstr(r.out, "\n0 uncovered granted paths\n"));
        assert_non_null(strstr(r.out, "no PAM configuration here"));
        hx_run_result_done(&r);
}

/* Linux-PAM's line rules and the walker's bounds, in a directory written here. */
static void test_coverage_parser_edges(void **state)
{
        fx *f = *state;
        char dir[PATH_MAX], pol[PATH_MAX], name[32], text[512];
        hx_run_result r;
        json_t *j, *e, *v, *mod;
        (void)state;

        snprintf(dir, sizeof dir, "%s/pam", f->work);
        assert_int_equal(mkdir(dir, 0755), 0);
        /* a chain of 20 includes: deep0 -> deep1 -> ... -> deep19 (the module) */
        for (int i = 0; i < 20; i++) {
                snprintf(name, sizeof name, "deep%d", i);
                if (i < 19)
                        snprintf(text, sizeof text, "auth include deep%d\n", i + 1);
                else
                        snprintf(text, sizeof text, "auth required pam_agent_broker.so\n");
                write_in(dir, name, text);
        }
        write_in(dir, "brk", "auth required pam_agent_broker.so audience=pam:brk-aud\n");
        snprintf(text, sizeof text, "auth include %s/brk\n", dir);
        write_in(dir, "abs", text);
        write_in(dir, "outside", "auth include /etc/passwd\n");
        write_in(dir, "updir", "auth include ../brk\n");
        write_in(dir, "esc", "auth [default=die foo=\\]bar] pam_agent_broker.so audience=pam:esc-aud\n");
        write_in(dir, "torn", "auth required pam_unix.so\nauth required pam_agent_broker.so \\");
        write_in(dir, "hashcont", "auth required pam_unix.so # a comment ends the line \\\n"
                                  "auth required /usr/lib/security/pam_agent_broker.so\n");
        write_in(dir, "blankcont", "auth \\\n\n   required pam_agent_broker.so\n");
        write_in(dir, "caps", "AUTH REQUIRED pam_agent_broker.so audience=\n");
        write_in(dir, "twice", "auth sufficient pam_agent_broker.so audience=pam:one\n"
                               "auth required pam_agent_broker.so audience=pam:two audience=pam:three\n");
        write_in(dir, "notmod", "auth required pam_agent_broker.so.bak\nauth required my_pam_agent_broker.so\n");
        write_in(dir, "badline", "auth\nfrob required pam_unix.so\n@include\nauth include\n");
        write_in(dir, ".hidden", "auth required pam_agent_broker.so\n");
        write_in(dir, "edit~", "auth required pam_agent_broker.so\n");
        assert_int_equal(mkdir(strcat(strcpy(text, dir), "/subdir"), 0755), 0);

        fixture(pol, sizeof pol, "clean-policy.json");
        ctl(&r, NULL, "coverage", "--pam-dir", dir, "--policy", pol, "--json", NULL);
        expect_exit(&r, 0);
        j = parse(&r);
        mod = json_object_get(j, "using_module");
        /* 16 levels at most: deep0..deep3 do not reach deep19, deep4 does */
        for (int i = 0; i < 20; i++) {
                snprintf(name, sizeof name, "deep%d", i);
                if (i < 4)
                        assert_null(find(mod, "service", name));
                else
                        assert_non_null(find(mod, "service", name));
        }
        e = must_find(json_object_get(j, "problems"), "message",
                      "includes nested deeper than 16 levels: Linux-PAM stops here");
        assert_string_equal(str(e, "file"), "deep15");

        e = must_find(mod, "service", "abs"); /* an absolute path inside the directory is followed */
        expect_names(json_object_get(e, "audiences"), NULL, "pam:brk-aud", NULL);
        assert_null(find(mod, "service", "outside"));
        e = must_find(json_object_get(j, "problems"), "file", "outside");
        assert_string_equal(str(e, "message"), "includes /etc/passwd, outside the PAM directory: not followed");
        assert_null(find(mod, "service", "updir"));
        must_find(json_object_get(j, "problems"), "message", "includes ../brk, not a file of the PAM directory: not followed");

        e = must_find(mod, "service", "esc");
        v = json_array_get(json_object_get(e, "via"), 0);
        assert_string_equal(str(v, "control"), "[default=die foo=]bar]");
        assert_string_equal(str(v, "audience"), "pam:esc-aud");

        assert_null(find(mod, "service", "torn"));
        e = must_find(json_object_get(j, "problems"), "file", "torn");
        assert_int_equal(num(e, "line"), 2);

        e = must_find(mod, "service", "hashcont"); /* a comment line never continues */
        assert_int_equal(num(json_array_get(json_object_get(e, "via"), 0), "line"), 2);
        /* an empty line after '\' ends the line: "auth" alone, then a line of unknown type */
        assert_null(find(mod, "service", "blankcont"));
        must_find(json_object_get(j, "problems"), "message", "unknown module type \"required\"");
        e = must_find(mod, "service", "caps");
        v = json_array_get(json_object_get(e, "via"), 0);
        assert_string_equal(str(v, "control"), "REQUIRED");
        is_null(v, "audience"); /* "audience=" empty: the default */
        expect_names(json_object_get(e, "audiences"), NULL, "pam:caps", NULL);

        e = must_find(mod, "service", "twice");
        assert_int_equal(json_array_size(json_object_get(e, "via")), 2);
        expect_names(json_object_get(e, "audiences"), NULL, "pam:one", "pam:three", NULL);

        assert_null(find(mod, "service", "notmod"));
        assert_null(find(mod, "service", ".hidden"));
        assert_null(find(mod, "service", "edit~"));
        assert_null(find(mod, "service", "subdir"));
        e = json_object_get(j, "problems");
        must_find(e, "message", "no control flag");
        must_find(e, "message", "unknown module type \"frob\"");
        must_find(e, "message", "@include without a file name");
        must_find(e, "message", "include without a file name");
        json_decref(j);
        hx_run_result_done(&r);
}

static void test_coverage_usage(void **state)
{
        fx *f = *state;
        char pol[PATH_MAX], dir[PATH_MAX];
        hx_run_result r;

        fixture(pol, sizeof pol, "clean-policy.json");
        fixture(dir, sizeof dir, "pam.d");
        ctl(&r, NULL, "coverage", "--pam-dir", "/nonexistent/pam.d", "--policy", pol, NULL);
        expect_exit(&r, 4);
        assert_non_null(strstr(r.err, "/nonexistent/pam.d"));
        hx_run_result_done(&r);
        ctl(&r, NULL, "coverage", "--bogus", NULL);
        expect_exit(&r, 2);
        hx_run_result_done(&r);
        ctl(&r, NULL, "coverage", "extra", NULL);
        expect_exit(&r, 2);
        hx_run_result_done(&r);
        ctl(&r, NULL, "coverage", "--help", NULL);
        expect_exit(&r, 0);
        assert_non_null(strstr(r.out, "Usage: agent-brokerctl coverage"));
        hx_run_result_done(&r);
        /* no broker and no --policy: unreachable */
        ctl(&r, NULL, "coverage", "--pam-dir", dir, NULL);
        expect_exit(&r, 3);
        assert_non_null(strstr(r.err, "cannot reach the broker's admin socket"));
        hx_run_result_done(&r);
        /* a policy that does not load */
        fixture(pol, sizeof pol, "bad-policy.json");
        ctl(&r, NULL, "coverage", "--pam-dir", dir, "--policy", pol, NULL);
        expect_exit(&r, 4);
        hx_run_result_done(&r);
        (void)f;
}

/* ---- review: policy files alone ------------------------------------------- */

static void test_review_offline_json(void **state)
{
        char pol[PATH_MAX], k[256];
        hx_run_result r;
        json_t *j, *a, *g, *s, *f, *p;
        (void)state;

        fixture(pol, sizeof pol, "review-policy.json");
        ctl(&r, NULL, "review", "--json", "--policy", pol, NULL);
        expect_exit(&r, 1);
        assert_non_null(strstr(r.err, "reviewing the policy alone"));
        j = parse(&r);
        assert_true(json_is_array(j));
        expect_names(j, "id", "weak-bot", "long-bot", "good-bot", NULL);

        a = json_array_get(j, 0);
        assert_string_equal(str(a, "owner"), "alice@example.com");
        assert_string_equal(str(a, "description"), "Runs whatever python the user starts");
        assert_string_equal(str(a, "source"), pol);
        assert_int_equal(num(json_object_get(a, "selectors"), "uid"), 1000);
        assert_string_equal(str(json_object_get(a, "selectors"), "exe"), "/usr/bin/python3");
        assert_int_equal(json_object_size(json_object_get(a, "selectors")), 2);
        assert_int_equal(num(json_object_get(a, "session"), "max_lifetime"), 8 * 3600);
        assert_int_equal(num(json_object_get(a, "session"), "reauth_interval"), 15 * 60);
        assert_int_equal(num(a, "max_delegation_depth"), 1);
        assert_true(json_is_false(json_object_get(a, "usage_known")));
        is_null(a, "active_sessions");
        assert_int_equal(json_array_size(json_object_get(a, "grants")), 1);
        g = json_array_get(json_object_get(a, "grants"), 0);
        assert_int_equal(num(g, "index"), 0);
        assert_string_equal(str(g, "audience"), AUD_GIT);
        assert_int_equal(num(g, "max_ttl"), 300);
        is_null(g, "max_auth_age");
        is_null(g, "users");
        is_null(g, "count");
        is_null(g, "last_issued");
        is_null(g, "unused");
        assert_int_equal(json_array_size(json_object_get(g, "scopes")), 1);
        s = json_array_get(json_object_get(g, "scopes"), 0);
        assert_string_equal(str(s, "scope"), "repo:*");
        assert_true(json_is_true(json_object_get(s, "wildcard")));
        is_null(s, "count");
        is_null(s, "last_issued");
        is_null(s, "unused");
        assert_int_equal(json_array_size(json_object_get(a, "unused_grants")), 0);
        assert_int_equal(json_array_size(json_object_get(a, "pam_services")), 0);
        kinds(a, k, sizeof k);
        assert_string_equal(k, "weak-selectors wildcard");
        f = json_array_get(json_object_get(a, "findings"), 0);
        assert_null(json_object_get(f, "grant"));
        assert_non_null(strstr(str(f, "message"), "uid=1000 exe=/usr/bin/python3"));
        f = json_array_get(json_object_get(a, "findings"), 1);
        assert_int_equal(num(f, "grant"), 0);
        assert_string_equal(str(f, "audience"), AUD_GIT);
        assert_string_equal(str(f, "scope"), "repo:*");

        a = json_array_get(j, 1);
        assert_string_equal(str(a, "owner"), "TBD");
        is_null(a, "description");
        assert_string_equal(str(json_object_get(a, "selectors"), "unit"), "long-bot.service");
        assert_int_equal(num(json_object_get(a, "session"), "max_lifetime"), 4 * 3600);
        assert_int_equal(num(json_object_get(a, "session"), "reauth_interval"), 600);
        assert_int_equal(num(a, "max_delegation_depth"), 0);
        g = json_array_get(json_object_get(a, "grants"), 0); /* the scope group, expanded */
        expect_names(json_object_get(g, "scopes"), "scope", "api:read", "api:write", NULL);
        assert_int_equal(num(g, "max_ttl"), 7200);
        g = json_array_get(json_object_get(a, "grants"), 1);
        assert_string_equal(str(g, "audience"), "pam:sshd");
        assert_int_equal(num(g, "max_auth_age"), 600);
        expect_names(json_object_get(g, "users"), NULL, "deploy", "root", NULL);
        p = json_object_get(a, "pam_services");
        assert_int_equal(json_array_size(p), 1);
        p = json_array_get(p, 0);
        assert_string_equal(str(p, "service"), "sshd");
        expect_names(json_object_get(p, "users"), NULL, "deploy", "root", NULL);
        expect_names(json_object_get(p, "scopes"), NULL, "login", NULL);
        assert_int_equal(json_integer_value(json_array_get(json_object_get(p, "grants"), 0)), 1);
        kinds(a, k, sizeof k);
        assert_string_equal(k, "no-owner long-ttl");
        f = json_array_get(json_object_get(a, "findings"), 1);
        assert_int_equal(num(f, "grant"), 0);
        assert_string_equal(str(f, "audience"), "https://api.internal");
        assert_null(json_object_get(f, "scope"));

        a = json_array_get(j, 2);
        assert_string_equal(str(json_object_get(a, "selectors"), "sha256"),
                            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
        assert_int_equal(json_array_size(json_object_get(a, "findings")), 0);
        json_decref(j);
        hx_run_result_done(&r);
}

static void test_review_offline_csv(void **state)
{
        char pol[PATH_MAX];
        hx_run_result r;
        (void)state;

        fixture(pol, sizeof pol, "review-policy.json");
        ctl(&r, NULL, "review", "--csv", "--policy", pol, NULL);
        expect_exit(&r, 1);
        assert_string_equal(r.out,
                            "agent,owner,grant,audience,scope,max_ttl,max_auth_age,users,count,last_issued,unused,findings\n"
                            "weak-bot,alice@example.com,0,mcp://git.internal,repo:*,300,,,,,,weak-selectors wildcard\n"
                            "long-bot,TBD,0,https://api.internal,api:read,7200,,,,,,no-owner long-ttl\n"
                            "long-bot,TBD,0,https://api.internal,api:write,7200,,,,,,no-owner long-ttl\n"
                            "long-bot,TBD,1,pam:sshd,login,300,600,deploy root,,,,no-owner\n"
                            "good-bot,bob@example.com,0,https://tickets.internal/api,tickets:read,600,,,,,,\n");
        hx_run_result_done(&r);
}

static void test_review_offline_text(void **state)
{
        char pol[PATH_MAX];
        hx_run_result r;
        (void)state;

        fixture(pol, sizeof pol, "review-policy.json");
        ctl(&r, NULL, "review", "--policy", pol, NULL);
        expect_exit(&r, 1);
        assert_non_null(strstr(r.out, "Access review of 3 agents: 4 findings\n"));
        assert_non_null(strstr(r.out, "usage: unknown"));
        assert_non_null(strstr(r.out, "== agent weak-bot\n"));
        assert_non_null(strstr(r.out, "   selectors    uid=1000 exe=/usr/bin/python3\n"));
        assert_non_null(strstr(r.out, "     [1] pam:sshd  max_ttl 5m  max_auth_age 10m  users deploy, root\n"));
        assert_non_null(strstr(r.out, "   PAM services sshd (users: deploy, root)\n"));
        assert_non_null(strstr(r.out, "     - no-owner: owner \"TBD\" names nobody"));
        assert_non_null(strstr(r.out, "     - long-ttl: grant 0 (https://api.internal): max_ttl 2h is above 1h"));
        assert_non_null(strstr(r.out, "owner sign-off:"));
        hx_run_result_done(&r);
}

static void test_review_exit_codes(void **state)
{
        char pol[PATH_MAX], dir[PATH_MAX];
        hx_run_result r;
        json_t *j, *a;
        (void)state;

        fixture(pol, sizeof pol, "clean-policy.json");
        ctl(&r, NULL, "review", "--policy", pol, NULL);
        expect_exit(&r, 0);
        assert_non_null(strstr(r.out, "Access review of 1 agent: 0 findings\n"));
        hx_run_result_done(&r);

        /* a directory of policy files: star-bot's "*" */
        fixture(dir, sizeof dir, "policy.d");
        ctl(&r, NULL, "review", "--json", "--policy", dir, NULL);
        expect_exit(&r, 1);
        j = parse(&r);
        expect_names(j, "id", "good-bot", "star-bot", NULL);
        assert_int_equal(json_array_size(json_object_get(json_array_get(j, 0), "findings")), 0);
        a = json_array_get(j, 1);
        assert_int_equal(json_array_size(json_object_get(a, "findings")), 1);
        assert_string_equal(str(json_array_get(json_object_get(a, "findings"), 0), "message"),
                            "grant 0 (https://api.internal): scope \"*\" grants every scope");
        json_decref(j);
        hx_run_result_done(&r);

        ctl(&r, NULL, "review", "--json", "--csv", "--policy", pol, NULL);
        expect_exit(&r, 2);
        hx_run_result_done(&r);
        ctl(&r, NULL, "review", "--unused-days", "-1", "--policy", pol, NULL);
        expect_exit(&r, 2);
        hx_run_result_done(&r);
        ctl(&r, NULL, "review", "--unused-days", "30x", "--policy", pol, NULL);
        expect_exit(&r, 2);
        hx_run_result_done(&r);
        ctl(&r, NULL, "review", "--unused-days", "36501", "--policy", pol, NULL);
        expect_exit(&r, 2);
        hx_run_result_done(&r);
        ctl(&r, NULL, "review", "--unused-days", "36500", "--policy", pol, NULL);
        expect_exit(&r, 0);
        hx_run_result_done(&r);
        ctl(&r, NULL, "review", "--policy", pol, "extra", NULL);
        expect_exit(&r, 2);
        hx_run_result_done(&r);
        ctl(&r, NULL, "review", "--frob", NULL);
        expect_exit(&r, 2);
        hx_run_result_done(&r);
        ctl(&r, NULL, "review", "--help", NULL);
        expect_exit(&r, 0);
        assert_non_null(strstr(r.out, "Usage: agent-brokerctl review"));
        hx_run_result_done(&r);
        /* no broker, no --policy */
        ctl(&r, NULL, "review", NULL);
        expect_exit(&r, 3);
        assert_non_null(strstr(r.err, "cannot reach the broker's admin socket"));
        hx_run_result_done(&r);
        /* policies that do not load */
        fixture(pol, sizeof pol, "bad-policy.json");
        ctl(&r, NULL, "review", "--policy", pol, NULL);
        expect_exit(&r, 4);
        assert_non_null(strstr(r.err, "\"owner\" is required"));
        hx_run_result_done(&r);
        ctl(&r, NULL, "review", "--policy", "/nonexistent/policy.json", NULL);
        expect_exit(&r, 4);
        hx_run_result_done(&r);
}

/* ---- the real broker ----------------------------------------------------- */

static const char live_policy[] =
        "{\"version\": 1, \"agents\": [\n"
        " {\"id\": \"live-bot\", \"owner\": \"alice@example.com\", \"match\": {\"uid\": 0},\n"
        "  \"grants\": [\n"
        "   {\"audience\": \"" AUD_GIT "\", \"scopes\": [\"repo:read\", \"repo:write\"], \"max_ttl\": 600},\n"
        "   {\"audience\": \"" AUD_TICKETS "\", \"scopes\": [\"tickets:*\"], \"max_ttl\": 60},\n"
        "   {\"audience\": \"pam:sshd\", \"scopes\": [\"login\"], \"users\": [\"deploy\"]},\n"
        "   {\"audience\": \"pam:su\", \"scopes\": [\"login\"], \"users\": [\"root\"]}]},\n"
        " {\"id\": \"idle-bot\", \"owner\": \"bob@example.com\",\n"
        "  \"match\": {\"uid\": 4242, \"unit\": \"idle.service\"},\n"
        "  \"grants\": [{\"audience\": \"" AUD_GIT "\", \"scopes\": [\"repo:read\"]}]}]}\n";

static void start_live(fx *f)
{
        assert_int_equal(hx_broker_write_policy(&f->b, live_policy), 0);
        hx_start(&f->b);
}

static void issue(hx_conn *c, const char *audience, const char *scope)
{
        char msg[512];
        json_t *root = NULL;

        snprintf(msg, sizeof msg,
                 "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"%s\",\"scopes\":[\"%s\"]}}",
                 audience, scope);
        assert_int_equal(hx_conn_call(c, msg, &root), 1);
        if (hx_reply_error(root))
                fprintf(stderr, "IssueToken %s %s: %s\n", audience, scope, hx_reply_error(root));
        assert_null(hx_reply_error(root));
        json_decref(root);
}

/* true if the broker answers GetUsage (not MethodNotFound). */
static bool has_get_usage(fx *f)
{
        hx_conn *c = NULL;
        json_t *root = NULL;
        bool yes;

        assert_int_equal(hx_conn_open(&f->b, f->b.admin_sock, &c), 0);
        assert_int_equal(hx_conn_call(c, "{\"method\":\"io.agentbroker.admin.GetUsage\"}", &root), 1);
        yes = !hx_reply_error(root) || strcmp(hx_reply_error(root), "org.varlink.service.MethodNotFound") != 0;
        json_decref(root);
        hx_conn_close(&f->b, c);
        return yes;
}

static void test_review_live(void **state)
{
        fx *f = *state;
        hx_conn *c = NULL;
        hx_run_result r;
        json_t *j, *a, *g, *s, *u;
        char k[256], *line;
        long long before = (long long)time(NULL);

        start_live(f);
        if (!has_get_usage(f)) {
                fprintf(stderr, "SKIP: this broker has no io.agentbroker.admin.GetUsage (MethodNotFound): "
                                "review with real usage is not tested\n");
                skip();
        }
        assert_int_equal(hx_conn_open(&f->b, f->b.sock, &c), 0);
        issue(c, AUD_GIT, "repo:read");
        issue(c, AUD_GIT, "repo:read");
        issue(c, AUD_TICKETS, "tickets:read");
        issue(c, AUD_TICKETS, "tickets:write");

        hx_ctl(&f->b, -1, &r, "review", "--json", NULL);
        expect_exit(&r, 1);
        j = parse(&r);
        expect_names(j, "id", "live-bot", "idle-bot", NULL);
        a = json_array_get(j, 0);
        assert_true(json_is_true(json_object_get(a, "usage_known")));
        assert_int_equal(num(a, "active_sessions"), 1);
        assert_string_equal(str(a, "source"), f->b.policy);

        g = json_array_get(json_object_get(a, "grants"), 0);
        assert_int_equal(num(g, "count"), 2);
        assert_true(num(g, "last_issued") >= before && num(g, "last_issued") <= (long long)time(NULL) + 1); /* time(): the coarse clock */
        assert_true(json_is_false(json_object_get(g, "unused")));
        s = json_array_get(json_object_get(g, "scopes"), 0);
        assert_string_equal(str(s, "scope"), "repo:read");
        assert_int_equal(num(s, "count"), 2);
        assert_true(num(s, "last_issued") >= before);
        assert_true(json_is_false(json_object_get(s, "unused")));
        assert_null(json_object_get(s, "used_as"));
        s = json_array_get(json_object_get(g, "scopes"), 1);
        assert_string_equal(str(s, "scope"), "repo:write");
        assert_int_equal(num(s, "count"), 0);
        is_null(s, "last_issued");
        assert_true(json_is_true(json_object_get(s, "unused")));

        g = json_array_get(json_object_get(a, "grants"), 1); /* tickets:* used as tickets:read and tickets:write */
        assert_int_equal(num(g, "count"), 2);
        s = json_array_get(json_object_get(g, "scopes"), 0);
        assert_int_equal(num(s, "count"), 2);
        u = json_object_get(s, "used_as");
        assert_int_equal(json_array_size(u), 2);
        assert_int_equal(num(must_find(u, "scope", "tickets:read"), "count"), 1);
        assert_int_equal(num(must_find(u, "scope", "tickets:write"), "count"), 1);

        g = json_array_get(json_object_get(a, "grants"), 2);
        assert_int_equal(num(g, "count"), 0);
        is_null(g, "last_issued");
        assert_true(json_is_true(json_object_get(g, "unused")));
        u = json_object_get(a, "unused_grants");
        assert_int_equal(json_array_size(u), 2);
        assert_int_equal(json_integer_value(json_array_get(u, 0)), 2);
        assert_int_equal(json_integer_value(json_array_get(u, 1)), 3);
        expect_names(json_object_get(a, "pam_services"), "service", "sshd", "su", NULL);
        assert_int_equal(json_array_size(json_object_get(a, "usage_outside_grants")), 0);

        kinds(a, k, sizeof k);
        assert_string_equal(k, "weak-selectors never-used wildcard never-used never-used");
        assert_string_equal(str(json_array_get(json_object_get(a, "findings"), 1), "scope"), "repo:write");
        assert_null(json_object_get(json_array_get(json_object_get(a, "findings"), 3), "scope"));
        assert_int_equal(num(json_array_get(json_object_get(a, "findings"), 3), "grant"), 2);

        a = json_array_get(j, 1); /* idle-bot: never issued anything, no session */
        assert_int_equal(num(a, "active_sessions"), 0);
        kinds(a, k, sizeof k);
        assert_string_equal(k, "never-used");
        json_decref(j);
        hx_run_result_done(&r);

        /* CSV with real numbers */
        hx_ctl(&f->b, -1, &r, "review", "--csv", NULL);
        expect_exit(&r, 1);
        line = strstr(r.out, "\nlive-bot,alice@example.com,0,mcp://git.internal,repo:read,600,,,2,");
        assert_non_null(line);
        line = strchr(line + 1, '\n');
        assert_non_null(line);
        assert_true(strncmp(line - strlen(",no,weak-selectors"), ",no,weak-selectors", 18) == 0);
        assert_non_null(strstr(r.out, "\nlive-bot,alice@example.com,0,mcp://git.internal,repo:write,600,,,0,never,yes,"
                                      "weak-selectors never-used\n"));
        assert_non_null(strstr(r.out, "\nidle-bot,bob@example.com,0,mcp://git.internal,repo:read,300,,,0,never,yes,"
                                      "never-used\n"));
        hx_run_result_done(&r);

        /* text */
        hx_ctl(&f->b, -1, &r, "review", NULL);
        expect_exit(&r, 1);
        assert_non_null(strstr(r.out, "usage: from the broker; unused = not used in 30 days"));
        assert_non_null(strstr(r.out, "           repo:read                2 issued, last "));
        assert_non_null(strstr(r.out, "             as tickets:read          1 issued, last "));
        assert_non_null(strstr(r.out, "   sessions     1 active\n"));
        hx_run_result_done(&r);

        /* --unused-days 0: everything issued before this second is unused */
        sleep(1);
        hx_ctl(&f->b, -1, &r, "review", "--json", "--unused-days", "0", NULL);
        expect_exit(&r, 1);
        j = parse(&r);
        a = json_array_get(j, 0);
        kinds(a, k, sizeof k);
        assert_string_equal(k, "weak-selectors unused wildcard unused never-used never-used");
        assert_int_equal(json_array_size(json_object_get(a, "unused_grants")), 4);
        json_decref(j);
        hx_run_result_done(&r);

        /* --policy with a broker answering: the file's policy, the broker's usage */
        hx_ctl(&f->b, -1, &r, "review", "--json", "--policy", f->b.policy, NULL);
        expect_exit(&r, 1);
        j = parse(&r);
        a = json_array_get(j, 0);
        assert_true(json_is_true(json_object_get(a, "usage_known")));
        assert_int_equal(num(json_array_get(json_object_get(a, "grants"), 0), "count"), 2);
        json_decref(j);
        hx_run_result_done(&r);
        hx_conn_close(&f->b, c);
}

/* coverage with the policy from the broker's ShowPolicy. */
static void test_coverage_live(void **state)
{
        fx *f = *state;
        char dir[PATH_MAX];
        hx_run_result r;
        json_t *j, *e;

        start_live(f);
        fixture(dir, sizeof dir, "pam.d");
        hx_ctl(&f->b, -1, &r, "coverage", "--pam-dir", dir, "--json", NULL);
        expect_exit(&r, 1);
        j = parse(&r);
        assert_string_equal(str(j, "policy"), "broker");
        assert_int_equal(num(j, "pam_grants"), 2);
        expect_names(json_object_get(j, "uncovered"), "service", "su", NULL);
        e = must_find(json_object_get(j, "using_module"), "service", "sshd");
        assert_string_equal(str(json_array_get(json_object_get(e, "granted_to"), 0), "agent"), "live-bot");
        expect_names(json_object_get(j, "module_without_grant"), "service", "cups", "dbadmin", "login", NULL);
        json_decref(j);
        hx_run_result_done(&r);
}

/* ---- a fake admin socket ---------------------------------------------------- */

enum { FAKE_NO_USAGE, FAKE_BIG_USAGE };

static const char fake_agents[] =
        "[{\"id\": \"nobody-bot\", \"owner\": \"\", \"source\": \"fake\", \"match\": {\"uid\": 0},"
        "  \"session\": {\"max_lifetime\": 28800, \"reauth_interval\": 900}, \"max_delegation_depth\": 1,"
        "  \"grants\": [{\"audience\": \"mcp://a\", \"scopes\": [\"read\"], \"max_ttl\": 300}]},"
        " {\"id\": \"fine-bot\", \"owner\": \"x@example.com\", \"source\": \"fake\","
        "  \"match\": {\"uid\": 5, \"unit\": \"fine.service\"},"
        "  \"session\": {\"max_lifetime\": 28800, \"reauth_interval\": 900}, \"max_delegation_depth\": 1,"
        "  \"grants\": [{\"audience\": \"mcp://b\", \"scopes\": [\"read\", \"write\"], \"max_ttl\": 300},"
        "              {\"audience\": \"mcp://c\", \"scopes\": [\"read\", \"write\"], \"max_ttl\": 300}]}]";

/* GetUsage rows of agent (NULL: every agent, plus enough rows of others to pass 64 KiB when big). */
static json_t *fake_usage(const char *agent, bool big, long long now)
{
        json_t *rows = json_array();
        if (!agent || strcmp(agent, "nobody-bot") == 0)
                json_array_append_new(rows, json_pack("{s:s, s:s, s:s, s:i, s:I}", "agent", "nobody-bot", "audience",
                                                      "mcp://a", "scope", "read", "count", 7, "last_issued",
                                                      (json_int_t)(now - 100)));
        if (!agent || strcmp(agent, "fine-bot") == 0) {
                /* mcp://b: read 40 days (and an hour) ago only; mcp://c: read lately, write 40 days ago; a scope since
                 * removed. The hour: review takes its "now" before this answer, maybe a second earlier */
                json_array_append_new(rows, json_pack("{s:s, s:s, s:s, s:i, s:I}", "agent", "fine-bot", "audience",
                                                      "mcp://b", "scope", "read", "count", 3, "last_issued",
                                                      (json_int_t)(now - 40 * 86400 - 3600)));
                json_array_append_new(rows, json_pack("{s:s, s:s, s:s, s:i, s:I}", "agent", "fine-bot", "audience",
                                                      "mcp://c", "scope", "read", "count", 5, "last_issued",
                                                      (json_int_t)(now - 60)));
                json_array_append_new(rows, json_pack("{s:s, s:s, s:s, s:i, s:I}", "agent", "fine-bot", "audience",
                                                      "mcp://c", "scope", "write", "count", 1, "last_issued",
                                                      (json_int_t)(now - 40 * 86400 - 3600)));
                json_array_append_new(rows, json_pack("{s:s, s:s, s:s, s:i, s:I}", "agent", "fine-bot", "audience",
                                                      "mcp://gone", "scope", "admin", "count", 2, "last_issued",
                                                      (json_int_t)(now - 86400)));
        }
        for (int i = 0; big && !agent && i < 1200; i++) {
                char sc[32];
                snprintf(sc, sizeof sc, "filler:%04d", i);
                json_array_append_new(rows, json_pack("{s:s, s:s, s:s, s:i, s:I}", "agent", "gone-bot", "audience",
                                                      "mcp://filler.example.internal", "scope", sc, "count", 1,
                                                      "last_issued", (json_int_t)now));
        }
        return rows;
}

static void fake_reply(int fd, json_t *reply)
{
        char *s = json_dumps(reply, JSON_COMPACT);
        json_decref(reply);
        if (!s)
                _exit(3);
        size_t len = strlen(s) + 1, off = 0; /* with the NUL */
        while (off < len) {
                ssize_t n = send(fd, s + off, len - off, MSG_NOSIGNAL);
                if (n <= 0)
                        break;
                off += (size_t)n;
        }
        free(s);
}

/* Serve one connection until the peer closes. */
static void fake_conn(int fd, int mode)
{
        char buf[65536];
        size_t len = 0;

        for (;;) {
                char *nul = memchr(buf, '\0', len);
                if (!nul) {
                        ssize_t n = len < sizeof buf ? recv(fd, buf + len, sizeof buf - len, 0) : -1;
                        if (n <= 0)
                                return;
                        len += (size_t)n;
                        continue;
                }
                json_t *call = json_loads(buf, 0, NULL), *params;
                const char *m = json_string_value(json_object_get(call, "method"));
                long long now = (long long)time(NULL);
                params = json_object_get(call, "parameters");
                if (m && strcmp(m, "io.agentbroker.admin.ShowPolicy") == 0)
                        fake_reply(fd, json_pack("{s:{s:[], s:o}}", "parameters", "sources", "agents",
                                                 json_loads(fake_agents, 0, NULL)));
                else if (m && strcmp(m, "io.agentbroker.admin.ListSessions") == 0)
                        fake_reply(fd, json_pack("{s:{s:[{s:s, s:s, s:s}, {s:s, s:s, s:s}, {s:s, s:s, s:s}]}}",
                                                 "parameters", "sessions", "sid", "a", "agent", "nobody-bot", "state",
                                                 "active", "sid", "b", "agent", "nobody-bot", "state", "revoked",
                                                 "sid", "c", "agent", "fine-bot", "state", "expired"));
                else if (m && strcmp(m, "io.agentbroker.admin.GetUsage") == 0 && mode == FAKE_NO_USAGE)
                        fake_reply(fd, json_pack("{s:s, s:{s:s}}", "error", "org.varlink.service.MethodNotFound",
                                                 "parameters", "method", m));
                else if (m && strcmp(m, "io.agentbroker.admin.GetUsage") == 0)
                        fake_reply(fd, json_pack("{s:{s:o}}", "parameters", "usage",
                                                 fake_usage(json_string_value(json_object_get(params, "agent")),
                                                            true, now)));
                else
                        fake_reply(fd, json_pack("{s:s, s:{}}", "error", "org.varlink.service.MethodNotFound",
                                                 "parameters"));
                json_decref(call);
                len -= (size_t)(nul + 1 - buf);
                memmove(buf, nul + 1, len);
        }
}

/* Start a fake admin server on path in a child. */
static void fake_serve(int fd, const void *mode)
{
        fake_conn(fd, *(const int *)mode);
}

static void fake_start(fx *f, const char *path, int mode)
{
        f->helper = hx_fake_server(path, fake_serve, &mode); /* the fake admin server, killed in teardown */
}

static void test_review_without_get_usage(void **state)
{
        fx *f = *state;
        char sock[PATH_MAX], k[256];
        hx_run_result r;
        json_t *j, *a, *fd;

        snprintf(sock, sizeof sock, "%s/fake.sock", f->work);
        fake_start(f, sock, FAKE_NO_USAGE);
        ctl(&r, sock, "review", "--json", NULL);
        expect_exit(&r, 1);
        assert_non_null(strstr(r.err, "warning: this broker has no GetUsage (org.varlink.service.MethodNotFound)"));
        j = parse(&r);
        expect_names(j, "id", "nobody-bot", "fine-bot", NULL);
        a = json_array_get(j, 0);
        assert_true(json_is_false(json_object_get(a, "usage_known")));
        assert_int_equal(num(a, "active_sessions"), 1); /* the revoked one does not count */
        kinds(a, k, sizeof k);
        assert_string_equal(k, "no-owner weak-selectors");
        fd = json_array_get(json_object_get(a, "findings"), 0);
        assert_string_equal(str(fd, "message"), "no owner: nobody certifies this agent's access");
        a = json_array_get(j, 1);
        assert_int_equal(num(a, "active_sessions"), 0);
        assert_int_equal(json_array_size(json_object_get(a, "findings")), 0);
        json_decref(j);
        hx_run_result_done(&r);

        ctl(&r, sock, "review", NULL);
        expect_exit(&r, 1);
        assert_non_null(strstr(r.out, "usage: unknown"));
        assert_non_null(strstr(r.out, "           read                     usage unknown\n"));
        hx_run_result_done(&r);
}

/* Usage 40 days old, and a GetUsage answer too large for one message (asked agent by agent). */
static void test_review_unused_days_and_large_usage(void **state)
{
        fx *f = *state;
        char sock[PATH_MAX], k[256];
        hx_run_result r;
        json_t *j, *a, *g, *fd;

        snprintf(sock, sizeof sock, "%s/fake.sock", f->work);
        fake_start(f, sock, FAKE_BIG_USAGE);
        ctl(&r, sock, "review", "--json", NULL);
        expect_exit(&r, 1);
        j = parse(&r);
        a = json_array_get(j, 0);
        assert_true(json_is_true(json_object_get(a, "usage_known")));
        assert_int_equal(num(json_array_get(json_object_get(a, "grants"), 0), "count"), 7);
        kinds(a, k, sizeof k);
        assert_string_equal(k, "no-owner weak-selectors");

        a = json_array_get(j, 1);
        g = json_array_get(json_object_get(a, "grants"), 0);
        assert_int_equal(num(g, "count"), 3);
        assert_true(json_is_true(json_object_get(g, "unused")));
        g = json_array_get(json_object_get(a, "grants"), 1);
        assert_int_equal(num(g, "count"), 6);
        assert_true(json_is_false(json_object_get(g, "unused")));
        assert_true(json_is_true(json_object_get(json_array_get(json_object_get(g, "scopes"), 1), "unused")));
        /* mcp://b unused as a whole (read 40 days ago, write never); on mcp://c, write is idle */
        kinds(a, k, sizeof k);
        assert_string_equal(k, "unused unused");
        fd = json_array_get(json_object_get(a, "findings"), 0);
        assert_int_equal(num(fd, "grant"), 0);
        assert_null(json_object_get(fd, "scope"));
        assert_non_null(strstr(str(fd, "message"), "grant 0 (mcp://b): not used for 40 days (last "));
        fd = json_array_get(json_object_get(a, "findings"), 1);
        assert_int_equal(num(fd, "grant"), 1);
        assert_string_equal(str(fd, "scope"), "write");
        assert_int_equal(json_array_size(json_object_get(a, "unused_grants")), 1);
        /* usage for a grant no longer in the policy */
        g = json_array_get(json_object_get(a, "usage_outside_grants"), 0);
        assert_non_null(g);
        assert_string_equal(str(g, "audience"), "mcp://gone");
        assert_int_equal(num(g, "count"), 2);
        json_decref(j);
        hx_run_result_done(&r);

        /* 60 days: nothing is idle; mcp://b's write was never used */
        ctl(&r, sock, "review", "--json", "--unused-days", "60", NULL);
        expect_exit(&r, 1);
        j = parse(&r);
        a = json_array_get(j, 1);
        kinds(a, k, sizeof k);
        assert_string_equal(k, "never-used");
        fd = json_array_get(json_object_get(a, "findings"), 0);
        assert_string_equal(str(fd, "message"), "grant 0 (mcp://b): scope \"write\" never used");
        json_decref(j);
        hx_run_result_done(&r);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_coverage_fixture_json, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_coverage_fixture_text, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_coverage_all_covered, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_coverage_parser_edges, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_coverage_usage, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_review_offline_json, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_review_offline_csv, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_review_offline_text, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_review_exit_codes, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_review_live, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_coverage_live, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_review_without_get_usage, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_review_unused_days_and_large_usage, hx_fixture_setup, hx_fixture_teardown),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
