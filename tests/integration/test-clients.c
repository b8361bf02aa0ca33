/* SPDX-License-Identifier: MIT */
/*
 * The Python and Node clients and the MCP example against the real
 * agent-brokerd (issue 10). Each test starts a broker with a policy made
 * for the interpreters on this host and runs one suite as a child program:
 *
 *   python_client  /usr/bin/python3 -m unittest discover clients/python/tests
 *   node_client    node --test clients/node/test/{protocol,broker}.test.js
 *                  (and broker.test.js without a broker: every test skipped, saying why)
 *   mcp_e2e        npm ci in a copy of examples/mcp-server (with clients/node
 *                  beside it, for the file: dependency), then
 *                  node --test test/e2e.test.js
 *
 * The suites read the broker's sockets and what the policy grants from the
 * environment (AGENT_BROKER_SOCKET, AGENT_BROKER_ADMIN_SOCKET, AB_TEST_AGENT,
 * AB_TEST_REAUTH, MCP_RESOURCE). The Node tests are skipped, saying so,
 * only when no node is installed; npm missing or failing is a failure.
 * AB_NODE=/path/to/node tests another node (an empty AB_NODE: none).
 *
 * Who is who: the broker runs as this test's uid ("@broker"); python-client
 * is that uid running Debian's python3, node-client that uid running node
 * (matched by executable, so each interpreter is its own agent and every
 * process gets its own session); nobody-client is uid 65534 (any program);
 * uid 1 matches nothing (NotAnAgent).
 */
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
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include "harness.h"

#define PYTHON "/usr/bin/python3"
#define RESOURCE "mcp://notes.test"
#define REAUTH_S "3"
#define PY_AGENT "python-client"
#define NODE_AGENT "node-client"

#define SUITE_TIMEOUT_MS 180000 /* one client suite (they take seconds) */
#define NPM_TIMEOUT_MS 600000   /* npm ci, a cold cache on a slow network */

/* ---- where things are --------------------------------------------------------- */

static bool is_file(const char *p)
{
        struct stat st;
        return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/*
 * The source tree: $AB_SOURCE_DIR, else the parent of the build directory
 * (build/ or build-asan/ sit in the tree), else the current directory.
 */
static const char *srcdir(void)
{
        static char dir[PATH_MAX];
        char probe[PATH_MAX + 64];
        const char *env = getenv("AB_SOURCE_DIR");

        if (dir[0])
                return dir;
        if (env && *env) {
                snprintf(dir, sizeof dir, "%s", env);
                return dir;
        }
        if (realpath(hx_build_dir(), dir)) {
                char *slash = strrchr(dir, '/');
                if (slash && slash != dir) {
                        *slash = '\0';
                        snprintf(probe, sizeof probe, "%s/clients/python/agentbroker.py", dir);
                        if (is_file(probe))
                                return dir;
                }
        }
        if (!getcwd(dir, sizeof dir))
                snprintf(dir, sizeof dir, ".");
        return dir;
}

static void src_path(const char *rel, char *out, size_t max)
{
        assert_true((size_t)snprintf(out, max, "%s/%s", srcdir(), rel) < max);
}

/*
 * The first executable called name in $PATH (then /usr/bin, /usr/local/bin)
 * into out (PATH_MAX bytes), symlinks resolved if resolve; false if none.
 */
static bool find_program(const char *name, bool resolve, char *out, size_t max)
{
        const char *path = getenv("PATH");
        char buf[4096], cand[PATH_MAX];
        char *save = NULL;

        assert_true(max >= PATH_MAX);
        snprintf(buf, sizeof buf, "%s:/usr/bin:/usr/local/bin", path && *path ? path : "");
        for (char *d = strtok_r(buf, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
                if (d[0] != '/')
                        continue;
                if ((size_t)snprintf(cand, sizeof cand, "%s/%s", d, name) >= sizeof cand)
                        continue;
                if (access(cand, X_OK) != 0 || !is_file(cand))
                        continue;
                if (!resolve) {
                        snprintf(out, max, "%s", cand);
                        return true;
                }
                if (realpath(cand, out))
                        return true;
        }
        return false;
}

/* ---- fixtures ------------------------------------------------------------------- */

/*
 * The policy: python_exe and node_exe (resolved paths, NULL: no such agent)
 * are agents of the broker's own user with the same grants and a short
 * reauth_interval, so the suites meet ReauthRequired for real.
 */
static void start_broker(hx_broker *b, const char *python_exe, const char *node_exe)
{
        static const char grants[] =
                "   \"session\": {\"max_lifetime\": \"1h\", \"reauth_interval\": \"" REAUTH_S "s\"},\n"
                "   \"grants\": [\n"
                "     {\"audience\": \"" RESOURCE "\", \"scopes\": [\"notes:read\", \"notes:write\"], \"max_ttl\": 600},\n"
                "     {\"audience\": \"https://other.test\", \"scopes\": [\"other:read\"], \"max_ttl\": 60}]}";
        char policy[8192], py[1024] = "", node[1024] = "";
        int n;

        if (python_exe)
                snprintf(py, sizeof py,
                         "  {\"id\": \"" PY_AGENT "\", \"owner\": \"alice@example.com\",\n"
                         "   \"match\": {\"user\": \"@broker\", \"exe\": \"%s\"},\n%s,\n",
                         python_exe, grants);
        if (node_exe)
                snprintf(node, sizeof node,
                         "  {\"id\": \"" NODE_AGENT "\", \"owner\": \"alice@example.com\",\n"
                         "   \"match\": {\"user\": \"@broker\", \"exe\": \"%s\"},\n%s,\n",
                         node_exe, grants);
        n = snprintf(policy, sizeof policy,
                     "{\"version\": 1,\n"
                     " \"agents\": [\n%s%s"
                     "  {\"id\": \"nobody-client\", \"owner\": \"bob@example.com\",\n"
                     "   \"match\": {\"uid\": %d},\n"
                     "   \"grants\": [{\"audience\": \"" RESOURCE "\", \"scopes\": [\"notes:read\"], \"max_ttl\": 600}]}]}\n",
                     py, node, HX_NOBODY_UID);
        assert_true(n > 0 && (size_t)n < sizeof policy);
        assert_int_equal(hx_broker_write_policy(b, policy), 0);
        hx_start(b);

        assert_int_equal(setenv("AGENT_BROKER_SOCKET", b->sock, 1), 0);
        assert_int_equal(setenv("AGENT_BROKER_ADMIN_SOCKET", b->admin_sock, 1), 0);
        assert_int_equal(setenv("AB_TEST_REAUTH", REAUTH_S, 1), 0);
        assert_int_equal(setenv("MCP_RESOURCE", RESOURCE, 1), 0);
        assert_int_equal(setenv("PYTHONDONTWRITEBYTECODE", "1", 1), 0);
        unsetenv("NODE_OPTIONS");
        unsetenv("NODE_TEST_CONTEXT");
}

/* Run argv; on failure (or always with HX_VERBOSE) print its output. Returns the exit code. */
static int run_suite(const char *what, char *const argv[], int timeout_ms, hx_run_result *res)
{
        long long t0 = hx_now_ms();
        int r = hx_run(argv, NULL, -1, timeout_ms, res);

        assert_int_equal(r, 0);
        if (res->exit_code != 0 || res->timed_out || getenv("HX_VERBOSE")) {
                fprintf(stderr, "---- %s: exit %d%s after %lld ms\n---- stdout:\n%s\n---- stderr:\n%s\n---- end of %s\n",
                        what, res->exit_code, res->timed_out ? " (timed out, killed)" : "", hx_now_ms() - t0,
                        res->out, res->err, what);
        }
        return res->exit_code;
}

/* The last line of text that starts with prefix, copied into out (empty if none). */
static void last_line(const char *text, const char *prefix, char *out, size_t max)
{
        const char *p = text, *hit = NULL;
        size_t plen = strlen(prefix);

        out[0] = '\0';
        while (p && *p) {
                if (strncmp(p, prefix, plen) == 0)
                        hit = p;
                p = strchr(p, '\n');
                if (p)
                        p++;
        }
        if (hit) {
                size_t n = strcspn(hit, "\n");
                if (n >= max)
                        n = max - 1;
                memcpy(out, hit, n);
                out[n] = '\0';
        }
}

/* "# NAME N" of node's TAP summary, or -1. */
static long tap_count(const char *text, const char *name)
{
        char prefix[64], line[256];
        snprintf(prefix, sizeof prefix, "# %s ", name);
        last_line(text, prefix, line, sizeof line);
        return line[0] ? strtol(line + strlen(prefix), NULL, 10) : -1;
}

/* Check node --test's TAP summary: some passed, none failed; as root nothing skipped. */
static void check_tap(const char *what, const hx_run_result *res)
{
        long pass = tap_count(res->out, "pass"), fail = tap_count(res->out, "fail");
        long skipped = tap_count(res->out, "skipped"), cancelled = tap_count(res->out, "cancelled");

        printf("%s: %ld passed, %ld failed, %ld skipped, %ld cancelled\n", what, pass, fail, skipped, cancelled);
        assert_int_equal(res->exit_code, 0);
        assert_true(pass > 0);
        assert_int_equal(fail, 0);
        assert_int_equal(cancelled, 0);
        if (geteuid() == 0)
                assert_int_equal(skipped, 0);
}

/* node: $AB_NODE if set (empty: none), else node or nodejs in $PATH. false (and a message) if none. */
static bool node_or_skip(char *node, size_t max)
{
        const char *env = getenv("AB_NODE");

        assert_true(max >= PATH_MAX);
        if (getenv("HX_DAEMON_WRAPPER") && *getenv("HX_DAEMON_WRAPPER")) {
                /* a broker under valgrind hashes node's 100 MB executable for ~11 s,
                 * past the Node client's 5 s reply timeout */
                printf("SKIPPED: the Node client under HX_DAEMON_WRAPPER (too slow for its timeouts)\n");
                return false;
        }
        if (env) {
                if (*env && realpath(env, node) && access(node, X_OK) == 0)
                        return true;
                printf("SKIPPED: AB_NODE=\"%s\" names no executable node\n", env);
                return false;
        }
        /* resolved: the policy matches the executable the kernel reports */
        if (find_program("node", true, node, max) || find_program("nodejs", true, node, max))
                return true;
        printf("SKIPPED: no node in PATH: the Node client and MCP tests need Node.js 18 or later "
               "(apt-get install nodejs npm)\n");
        return false;
}

/* ---- the suites --------------------------------------------------------------------- */

static void test_python_client(void **state)
{
        hx_broker *b = *state;
        char py[PATH_MAX], tests[PATH_MAX], line[256];
        hx_run_result res;

        if (!realpath(PYTHON, py)) {
                printf("SKIPPED: no " PYTHON " (apt-get install python3)\n");
                skip();
        }
        start_broker(b, py, NULL);
        assert_int_equal(setenv("AB_TEST_AGENT", PY_AGENT, 1), 0);
        src_path("clients/python/tests", tests, sizeof tests);
        char *argv[] = { (char *)PYTHON, (char *)"-B", (char *)"-m", (char *)"unittest", (char *)"discover",
                         (char *)"-s", tests, (char *)"-t", tests, NULL };
        int code = run_suite("python client tests", argv, SUITE_TIMEOUT_MS, &res);

        /* unittest's summary is on stderr: "Ran N tests in Xs" and "OK" or "FAILED (...)" */
        last_line(res.err, "Ran ", line, sizeof line);
        printf("python client (%s): %s", py, line);
        last_line(res.err, "OK", line, sizeof line);
        if (!line[0])
                last_line(res.err, "FAILED", line, sizeof line);
        printf(", %s\n", line);
        assert_int_equal(code, 0);
        assert_non_null(strstr(res.err, "\nOK"));
        /* Only the real-broker suite may skip, and as root nothing should. */
        if (geteuid() == 0)
                assert_null(strstr(res.err, "skipped="));
        hx_run_result_done(&res);
}

static void test_node_client(void **state)
{
        hx_broker *b = *state;
        char node[PATH_MAX], t1[PATH_MAX], t2[PATH_MAX];
        hx_run_result res;

        if (!node_or_skip(node, sizeof node))
                skip();
        start_broker(b, NULL, node);
        assert_int_equal(setenv("AB_TEST_AGENT", NODE_AGENT, 1), 0);
        src_path("clients/node/test/protocol.test.js", t1, sizeof t1);
        src_path("clients/node/test/broker.test.js", t2, sizeof t2);
        char *argv[] = { node, (char *)"--test", (char *)"--test-reporter=tap", t1, t2, NULL };
        run_suite("node client tests", argv, SUITE_TIMEOUT_MS, &res);
        check_tap("node client", &res);
        hx_run_result_done(&res);
}

/*
 * Run by hand without a broker (node --test in clients/node), the
 * real-broker tests are each reported as skipped, with the reason, rather
 * than vanishing with their describe().
 */
static void test_node_without_broker_reports_skips(void **state)
{
        char node[PATH_MAX], t2[PATH_MAX];
        hx_run_result res;
        long pass, skipped;
        (void)state;

        if (!node_or_skip(node, sizeof node))
                skip();
        unsetenv("AGENT_BROKER_SOCKET");
        unsetenv("AGENT_BROKER_ADMIN_SOCKET");
        unsetenv("NODE_OPTIONS");
        unsetenv("NODE_TEST_CONTEXT");
        src_path("clients/node/test/broker.test.js", t2, sizeof t2);
        char *argv[] = { node, (char *)"--test", (char *)"--test-reporter=tap", t2, NULL };
        run_suite("node broker tests without a broker", argv, SUITE_TIMEOUT_MS, &res);
        pass = tap_count(res.out, "pass");
        skipped = tap_count(res.out, "skipped");
        printf("node broker tests without a broker: %ld passed, %ld skipped\n", pass, skipped);
        assert_int_equal(res.exit_code, 0);
        assert_int_equal(pass, 0);
        assert_true(skipped >= 10);
        assert_int_equal(tap_count(res.out, "tests"), skipped);
        assert_non_null(strstr(res.out, "# SKIP no broker: AGENT_BROKER_SOCKET names no broker socket"));
        hx_run_result_done(&res);
}

static void test_mcp_e2e(void **state)
{
        hx_broker *b = *state;
        char node[PATH_MAX], npm[PATH_MAX], work[PATH_MAX], script[3 * PATH_MAX + 256];
        hx_run_result res;

        if (!node_or_skip(node, sizeof node))
                skip();
        if (!find_program("npm", false, npm, sizeof npm))
                fail_msg("node is installed but npm is not: the MCP end-to-end test needs it (apt-get install npm)");
        start_broker(b, NULL, node);
        assert_int_equal(setenv("AB_TEST_AGENT", NODE_AGENT, 1), 0);

        /* A copy of the example and of the client it links (file:../../clients/node), without node_modules. */
        assert_true((size_t)snprintf(work, sizeof work, "%s/src", b->dir) < sizeof work);
        assert_true((size_t)snprintf(script, sizeof script,
                                     "set -e; mkdir -p \"$2\"; cd \"$1\"; "
                                     "tar --exclude=node_modules -cf - examples/mcp-server clients/node | tar -C \"$2\" -xf -")
                    < sizeof script);
        char *cp[] = { (char *)"/bin/sh", (char *)"-c", script, (char *)"sh", (char *)srcdir(), work, NULL };
        assert_int_equal(run_suite("copy", cp, SUITE_TIMEOUT_MS, &res), 0);
        hx_run_result_done(&res);

        /* npm ci: exactly the committed lockfile. npm runs on node, so name it through the shell. */
        snprintf(script, sizeof script,
                 "cd \"$1/examples/mcp-server\" && exec \"$2\" ci --prefer-offline --no-audit --no-fund --loglevel=warn");
        char *ci[] = { (char *)"/bin/sh", (char *)"-c", script, (char *)"sh", work, npm, NULL };
        if (run_suite("npm ci", ci, NPM_TIMEOUT_MS, &res) != 0)
                fail_msg("npm ci failed in %s/examples/mcp-server: the npm registry must be reachable", work);
        hx_run_result_done(&res);

        snprintf(script, sizeof script, "cd \"$1/examples/mcp-server\" && exec \"$2\" --test --test-reporter=tap test/e2e.test.js");
        char *e2e[] = { (char *)"/bin/sh", (char *)"-c", script, (char *)"sh", work, node, NULL };
        run_suite("MCP end-to-end test", e2e, SUITE_TIMEOUT_MS, &res);
        check_tap("MCP end-to-end", &res);
        hx_run_result_done(&res);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_python_client, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_node_client, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_node_without_broker_reports_skips, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_mcp_e2e, hx_setup, hx_teardown),
        };
        return cmocka_run_group_tests_name("integration: Python and Node clients, MCP example", tests, NULL, NULL);
}
