/* SPDX-License-Identifier: MIT */
/*
 * The host boundaries from docs/security.md, tried from outside: a client
 * that is "root" only inside its own user namespace, and a non-root user
 * reaching for the state directory, the signing key and the admin socket.
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include "harness.h"

static const char POLICY[] =
        "{\"version\": 1, \"agents\": [\n"
        " {\"id\": \"root-agent\", \"owner\": \"ops@example.com\", \"match\": {\"uid\": 0},\n"
        "  \"grants\": [{\"audience\": \"mcp://git.internal\", \"scopes\": [\"repo:write\"]}]},\n"
        " {\"id\": \"nobody-agent\", \"owner\": \"bob@example.com\", \"match\": {\"uid\": 65534},\n"
        "  \"grants\": [{\"audience\": \"mcp://git.internal\", \"scopes\": [\"repo:read\"]}]}]}\n";

static int setup(void **state)
{
        return hx_setup_policy(state, POLICY, true);
}

/* One call on a fresh connection; writes "ERROR name" or the reply's parameters into out. */
static int call_into(const char *sock, const char *msg, char *out, size_t outmax)
{
        hx_conn *c = NULL;
        json_t *root = NULL;
        char *s;
        int r = hx_conn_open(NULL, sock, &c);
        if (r < 0) {
                snprintf(out, outmax, "CONNECT %s", strerror(-r));
                return 0;
        }
        if (hx_conn_call(c, msg, &root) != 1) {
                snprintf(out, outmax, "CLOSED");
                hx_conn_close(NULL, c);
                return 0;
        }
        if (hx_reply_error(root))
                snprintf(out, outmax, "ERROR %s", hx_reply_error(root));
        else {
                s = json_dumps(hx_reply_params(root), JSON_COMPACT);
                snprintf(out, outmax, "%s", s ? s : "?");
                free(s);
        }
        json_decref(root);
        hx_conn_close(NULL, c);
        return 0;
}

typedef struct ns_arg {
        hx_broker *b;
        const char *sock;
        const char *msg;
} ns_arg;

/* As nobody: a new user namespace in which this process is uid 0, then the call. */
static int child_userns(void *p, char *out, size_t outmax)
{
        ns_arg *a = p;
        int fd;
        /* after setuid from root the process is not dumpable: /proc/self would stay root's */
        (void)prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
        if (unshare(CLONE_NEWUSER) < 0) {
                snprintf(out, outmax, "NOUSERNS %s", strerror(errno));
                return 0;
        }
        fd = open("/proc/self/uid_map", O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "0 65534 1\n", 10) != 10) {
                snprintf(out, outmax, "NOUSERNS uid_map: %s", strerror(errno));
                return 0;
        }
        close(fd);
        if (getuid() != 0) {
                snprintf(out, outmax, "NOUSERNS uid %u inside", (unsigned)getuid());
                return 0;
        }
        return call_into(a->sock, a->msg, out, outmax);
}

static void test_root_in_own_user_namespace_is_not_root(void **state)
{
        hx_broker *b = *state;
        char out[4096];
        int ex = -1;
        ns_arg a = { b, b->sock, "{\"method\":\"io.agentbroker.WhoAmI\"}" };

        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_userns, &a, HX_RUN_TIMEOUT_MS, out, sizeof out,
                                   &ex),
                         0);
        assert_int_equal(ex, 0);
        if (strncmp(out, "NOUSERNS", 8) == 0) {
                fprintf(stderr, "SKIP: unprivileged user namespaces are not available here: %s\n", out);
                skip();
        }
        /* the broker sees the overflow-mapped uid, never 0 */
        assert_non_null(strstr(out, "\"agent\":\"nobody-agent\""));
        assert_non_null(strstr(out, "\"uid\":65534"));

        /* its token is nobody-agent's, never root-agent's */
        a.msg = "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"mcp://git.internal\","
                "\"scopes\":[\"repo:write\"]}}";
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_userns, &a, HX_RUN_TIMEOUT_MS, out, sizeof out,
                                   &ex),
                         0);
        assert_string_equal(out, "ERROR io.agentbroker.ScopeNotGranted");

        /* and the admin socket refuses it, even where the socket file lets it connect */
        assert_int_equal(chmod(b->admin_sock, 0666), 0);
        a.sock = b->admin_sock;
        a.msg = "{\"method\":\"io.agentbroker.admin.ListSessions\"}";
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_userns, &a, HX_RUN_TIMEOUT_MS, out, sizeof out,
                                   &ex),
                         0);
        assert_true(strncmp(out, "ERROR", 5) == 0 || strcmp(out, "CLOSED") == 0);
        assert_null(strstr(out, "sessions"));
}

static int child_plain(void *p, char *out, size_t outmax)
{
        ns_arg *a = p;
        return call_into(a->sock, a->msg, out, outmax);
}

typedef struct path_arg {
        const char *paths[4];
} path_arg;

/* As nobody: try to open each path; report the first that opens. */
static int child_open(void *p, char *out, size_t outmax)
{
        path_arg *a = p;
        for (size_t i = 0; i < 4 && a->paths[i]; i++) {
                int fd = open(a->paths[i], O_RDONLY | O_CLOEXEC);
                if (fd >= 0) {
                        snprintf(out, outmax, "OPENED %s", a->paths[i]);
                        close(fd);
                        return 0;
                }
        }
        snprintf(out, outmax, "NONE");
        return 0;
}

static void test_non_root_cannot_read_state_or_use_admin(void **state)
{
        hx_broker *b = *state;
        char key[PATH_MAX + 16], mdb[PATH_MAX + 16], out[1024];
        path_arg a = { { 0 } };
        ns_arg n = { b, b->admin_sock, "{\"method\":\"io.agentbroker.admin.ListSessions\"}" };
        struct stat st;
        int ex = -1;

        snprintf(key, sizeof key, "%s/signing.key", b->state);
        snprintf(mdb, sizeof mdb, "%s/data.mdb", b->state);
        assert_int_equal(stat(b->state, &st), 0);
        assert_int_equal(st.st_mode & 077, 0); /* the state dir: 0700 */
        a.paths[0] = key;
        a.paths[1] = mdb;
        a.paths[2] = b->state;
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_open, &a, HX_RUN_TIMEOUT_MS, out, sizeof out,
                                   &ex),
                         0);
        assert_string_equal(out, "NONE");

        /* the admin socket as installed (0600 root): nobody cannot even connect */
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_plain, &n, HX_RUN_TIMEOUT_MS, out, sizeof out,
                                   &ex),
                         0);
        assert_true(strncmp(out, "CONNECT", 7) == 0);
        /* opened up to everyone by mistake, it still answers nobody with a refusal */
        assert_int_equal(chmod(b->admin_sock, 0666), 0);
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_plain, &n, HX_RUN_TIMEOUT_MS, out, sizeof out,
                                   &ex),
                         0);
        assert_true(strncmp(out, "ERROR", 5) == 0 || strcmp(out, "CLOSED") == 0);
        assert_null(strstr(out, "sessions"));
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_root_in_own_user_namespace_is_not_root, setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_non_root_cannot_read_state_or_use_admin, setup, hx_teardown),
        };
        return cmocka_run_group_tests_name("boundaries", tests, NULL, NULL);
}
