/* SPDX-License-Identifier: MIT */
/*
 * Socket activation: systemd-socket-activate listens on DIR/agent.sock and
 * DIR/admin.sock, names them "agent" and "admin" (FileDescriptorName=),
 * and starts agent-brokerd on the first connection. The daemon must serve
 * on those sockets, by name rather than order, and bind nothing itself.
 */
#include <dirent.h>
#include <errno.h>
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
#include "../../client/agentbroker.h"

#define AUD "mcp://git.internal"

static const char policy[] =
        "{\"version\": 1, \"agents\": [\n"
        "  {\"id\": \"act-agent\", \"owner\": \"bob@example.com\", \"match\": {\"uid\": 0},\n"
        "   \"grants\": [{\"audience\": \"" AUD "\", \"scopes\": [\"repo:read\"], \"max_ttl\": 300}]}]}\n";

static const char *find_activator(void)
{
        static const char *const candidates[] = {
                "/usr/bin/systemd-socket-activate",
                "/bin/systemd-socket-activate",
                "/lib/systemd/systemd-socket-activate",
                "/usr/lib/systemd/systemd-socket-activate",
        };
        for (size_t i = 0; i < sizeof candidates / sizeof candidates[0]; i++)
                if (access(candidates[i], X_OK) == 0)
                        return candidates[i];
        return NULL;
}

/* The policy written, the daemon not started: each test starts it its own way. */
static int setup(void **state)
{
        return hx_setup_policy(state, policy, false);
}

typedef struct paths {
        char bound_agent[PATH_MAX];
        char bound_admin[PATH_MAX];
} paths;

/*
 * Start the daemon under systemd-socket-activate with the given --fdname
 * value, listening on DIR/agent.sock then DIR/admin.sock; --socket and
 * --admin-socket point at paths the daemon would create if it bound
 * sockets itself. Skips the test if there is no activator.
 */
static void start_activated(hx_broker *b, const char *fdnames, const char *ready_sock, paths *p)
{
        const char *act = find_activator();
        char daemon[PATH_MAX], fdname_opt[64], notify_opt[PATH_MAX + 32];
        int r;

        if (!act) {
                print_message("systemd-socket-activate not found (install systemd); skipping\n");
                skip();
        }
        assert_int_equal(hx_build_path("agent-brokerd", daemon, sizeof daemon), 0);
        snprintf(p->bound_agent, sizeof p->bound_agent, "%s/bound-agent.sock", b->dir);
        snprintf(p->bound_admin, sizeof p->bound_admin, "%s/bound-admin.sock", b->dir);
        snprintf(fdname_opt, sizeof fdname_opt, "--fdname=%s", fdnames);
        /* The activator passes only a few variables on; hand NOTIFY_SOCKET over explicitly. */
        snprintf(notify_opt, sizeof notify_opt, "--setenv=NOTIFY_SOCKET=%s", b->notify);
        char *argv[] = {
                (char *)act, (char *)"-l", b->sock, (char *)"-l", b->admin_sock, fdname_opt, notify_opt,
                daemon, (char *)"--state-dir", b->state, (char *)"--policy", b->policy,
                (char *)"--socket", p->bound_agent, (char *)"--admin-socket", p->bound_admin, NULL,
        };
        b->use_notify = true;
        r = hx_broker_start_argv(b, argv, ready_sock);
        if (r < 0) {
                fprintf(stderr, "activated broker did not answer: %s\n", strerror(-r));
                hx_broker_dump_log(b);
        }
        assert_int_equal(r, 0);
}

static bool looks_like_jws(const char *t)
{
        size_t dots = 0;
        if (!t || strlen(t) < 100)
                return false;
        for (; *t; t++)
                if (*t == '.')
                        dots++;
        return dots == 2;
}

/* IssueToken on a raw connection to path; returns the reply (caller frees). */
static json_t *issue_raw(hx_broker *b, const char *path)
{
        hx_conn *c = NULL;
        json_t *root = NULL;

        assert_int_equal(hx_conn_open(b, path, &c), 0);
        assert_int_equal(hx_conn_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD
                                         "\",\"scopes\":[\"repo:read\"]}}",
                                      &root),
                         1);
        hx_conn_close(b, c);
        return root;
}

/*
 * The paths of the listening Unix sockets the process holds, from
 * /proc/PID/fd and /proc/net/unix, as one string "path\npath\n" sorted by
 * the order found in /proc/net/unix. Returns the count.
 */
static int listening_paths(pid_t pid, char *out, size_t outmax)
{
        unsigned long inodes[256];
        size_t n_inodes = 0;
        char dir[64], *text = NULL, *line, *save = NULL;
        DIR *d;
        struct dirent *de;
        int count = 0;

        out[0] = '\0';
        snprintf(dir, sizeof dir, "/proc/%d/fd", (int)pid);
        d = opendir(dir);
        assert_non_null(d);
        while ((de = readdir(d)) && n_inodes < 256) {
                char p[128], link[128];
                ssize_t n;
                unsigned long ino;
                snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
                n = readlink(p, link, sizeof link - 1);
                if (n <= 0)
                        continue;
                link[n] = '\0';
                if (sscanf(link, "socket:[%lu]", &ino) == 1)
                        inodes[n_inodes++] = ino;
        }
        closedir(d);

        assert_int_equal(hx_read_file("/proc/net/unix", 16 << 20, &text, NULL), 0);
        for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                unsigned flags, type, st;
                unsigned long ino;
                char path[PATH_MAX];
                path[0] = '\0';
                if (sscanf(line, "%*s %*s %*s %x %x %x %lu %4095s", &flags, &type, &st, &ino, path) < 4)
                        continue;
                if (!(flags & 0x10000)) /* __SO_ACCEPTCON: listening */
                        continue;
                for (size_t i = 0; i < n_inodes; i++)
                        if (inodes[i] == ino) {
                                size_t len = strlen(out);
                                snprintf(out + len, outmax - len, "%s\n", path[0] ? path : "(unnamed)");
                                count++;
                                break;
                        }
        }
        free(text);
        return count;
}

static void test_activation_serves_passed_sockets(void **state)
{
        hx_broker *b = *state;
        char exe[PATH_MAX], lp[4096], want1[PATH_MAX * 2 + 4], want2[PATH_MAX * 2 + 4], notify[512];
        hx_run_result res;
        struct stat st;
        json_t *root;
        ssize_t n;
        paths p;

        start_activated(b, "agent:admin", b->sock, &p);

        /* The activator exec'd the daemon in place: the pid is now agent-brokerd. */
        snprintf(lp, sizeof lp, "/proc/%d/exe", (int)b->pid);
        n = readlink(lp, exe, sizeof exe - 1);
        assert_true(n > 0);
        exe[n] = '\0';
        assert_non_null(strstr(exe, "/agent-brokerd"));
        assert_int_equal(hx_wait_notify(b, "READY=1", HX_IO_TIMEOUT_MS, notify, sizeof notify), 0);

        /* A token is issued through DIR/agent.sock, by the CLI and on a raw connection. */
        assert_int_equal(hx_ctl(b, -1, &res, "token", "--audience", AUD, "--scope", "repo:read", NULL), 0);
        assert_false(res.timed_out);
        if (res.exit_code != 0)
                fprintf(stderr, "agent-brokerctl: %s", res.err);
        assert_int_equal(res.exit_code, 0);
        res.out[strcspn(res.out, "\n")] = '\0';
        assert_true(looks_like_jws(res.out));
        hx_run_result_done(&res);
        root = issue_raw(b, b->sock);
        assert_null(hx_reply_error(root));
        assert_string_equal(hx_reply_str(root, "agent"), "act-agent");
        assert_true(looks_like_jws(hx_reply_str(root, "token")));
        json_decref(root);

        /* The passed admin socket is the admin socket: no tokens there, GetInfo for root. */
        root = issue_raw(b, b->admin_sock);
        assert_non_null(hx_reply_error(root));
        assert_null(hx_reply_str(root, "token"));
        json_decref(root);
        assert_int_equal(hx_wait_answering(NULL, b->admin_sock, HX_IO_TIMEOUT_MS), 0);

        /* The daemon bound no path itself... */
        assert_int_equal(lstat(p.bound_agent, &st), -1);
        assert_int_equal(errno, ENOENT);
        assert_int_equal(lstat(p.bound_admin, &st), -1);
        assert_int_equal(errno, ENOENT);
        /* ...and listens on exactly the two sockets it was given. */
        snprintf(want1, sizeof want1, "%s\n%s\n", b->sock, b->admin_sock);
        snprintf(want2, sizeof want2, "%s\n%s\n", b->admin_sock, b->sock);
        assert_int_equal(listening_paths(b->pid, lp, sizeof lp), 2);
        if (strcmp(lp, want1) != 0 && strcmp(lp, want2) != 0)
                fprintf(stderr, "daemon listens on:\n%s", lp);
        assert_true(strcmp(lp, want1) == 0 || strcmp(lp, want2) == 0);

        /* SIGTERM: exit 0, and the sockets systemd owns are left in place. */
        hx_stop_clean(b);
        assert_int_equal(lstat(b->sock, &st), 0);
        assert_true(S_ISSOCK(st.st_mode));
        assert_int_equal(lstat(b->admin_sock, &st), 0);
        assert_true(S_ISSOCK(st.st_mode));
}

/* Names, not order, decide which socket is which. */
static void test_activation_uses_names_not_order(void **state)
{
        hx_broker *b = *state;
        json_t *root;
        paths p;

        /* DIR/agent.sock is passed first but named "admin"; DIR/admin.sock is named "agent". */
        start_activated(b, "admin:agent", b->admin_sock, &p);

        root = issue_raw(b, b->admin_sock);
        if (hx_reply_error(root))
                fprintf(stderr, "IssueToken on the socket named agent: %s\n", hx_reply_error(root));
        assert_null(hx_reply_error(root));
        assert_true(looks_like_jws(hx_reply_str(root, "token")));
        json_decref(root);

        root = issue_raw(b, b->sock);
        assert_non_null(hx_reply_error(root));
        assert_null(hx_reply_str(root, "token"));
        json_decref(root);

        hx_stop_clean(b);
}

/* A socket with a name the daemon does not know is not served as either socket. */
static void test_activation_unknown_name_not_served(void **state)
{
        hx_broker *b = *state;
        hx_conn *c = NULL;
        json_t *root;
        struct stat st;
        paths p;
        int r;

        start_activated(b, "agent:bogus", b->sock, &p);
        root = issue_raw(b, b->sock);
        assert_null(hx_reply_error(root));
        assert_true(looks_like_jws(hx_reply_str(root, "token")));
        json_decref(root);
        assert_int_equal(lstat(p.bound_agent, &st), -1);

        /* DIR/admin.sock (named "bogus") answers nothing: refused, or closed without a reply. */
        r = hx_conn_open(b, b->admin_sock, &c);
        if (r == 0) {
                r = hx_conn_call(c, "{\"method\":\"org.varlink.service.GetInfo\"}", &root);
                if (r == 1)
                        json_decref(root);
                assert_int_not_equal(r, 1);
        } else {
                assert_int_equal(r, -ECONNREFUSED);
        }
        hx_stop_clean(b);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_activation_serves_passed_sockets, setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_activation_uses_names_not_order, setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_activation_unknown_name_not_served, setup, hx_teardown),
        };
        if (getenv("HX_FILTER"))
                cmocka_set_test_filter(getenv("HX_FILTER"));
        return cmocka_run_group_tests_name("integration: socket activation", tests, NULL, NULL);
}
