/* SPDX-License-Identifier: MIT */
/*
 * pam_agent_broker.so through the real libpam (pam_start_confdir, with a
 * PAM config dir made by the test) against the real agent-brokerd; one test
 * runs pamtester with a service file that exists under /etc/pam.d only for
 * that test.
 *
 * Who is who: this process (uid 0) is agent "pam-agent"; its grant for
 * pam:agent-broker-test (scope login) lets it log in as root or nobody.
 * uid 65534 is "nobody-agent", whose grant names only the user nobody.
 * The broker's clock is moved with AGENT_BROKER_TEST_CLOCK.
 */
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <poll.h>
#include <pthread.h>
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
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include <syslog.h>
#include <security/pam_appl.h>
#include "harness.h"

#define SERVICE "agent-broker-test"
#define SERVICE_TESTER "agent-broker-pamtester"
#define AUD "pam:" SERVICE
#define AUD_OTHER "pam:other-service"
#define TEST_CLOCK_ENV "AGENT_BROKER_TEST_CLOCK"
#define PAMTESTER "/usr/bin/pamtester"
#define ETC_PAM_FILE "/etc/pam.d/" SERVICE_TESTER
#define SERVICE_SSHD "agent-broker-sshd" /* sshd's PAM service is its program name */
#define ETC_PAM_SSHD "/etc/pam.d/" SERVICE_SSHD
#define SSHD "/usr/sbin/sshd"
#define SSH "/usr/bin/ssh"
#define SSHPASS "/usr/bin/sshpass"
#define SSH_KEYGEN "/usr/bin/ssh-keygen"

#define M_ISSUE "io.agentbroker.IssueToken"
#define M_AUTH "io.agentbroker.Authenticate"
#define M_REVOKE "io.agentbroker.Revoke"
#define M_ALIST "io.agentbroker.admin.ListSessions"

typedef struct fixture {
        hx_broker b;
        char confdir[PATH_MAX];
        char clock[PATH_MAX];
        char module[PATH_MAX];
        hx_conn *c;
        bool wrote_etc; /* ETC_PAM_FILE is ours to remove */
        bool wrote_sshd; /* ETC_PAM_SSHD too */
        pid_t sshd;
} fixture;

static const char POLICY[] =
        "{\"version\": 1, \"agents\": [\n"
        " {\"id\": \"pam-agent\", \"owner\": \"ops@example.com\", \"match\": {\"uid\": 0},\n"
        "  \"grants\": [\n"
        "   {\"audience\": \"" AUD "\", \"scopes\": [\"login\", \"deploy\"], \"max_ttl\": 300,\n"
        "    \"users\": [\"root\", \"nobody\"]},\n"
        "   {\"audience\": \"pam:" SERVICE_TESTER "\", \"scopes\": [\"login\"], \"max_ttl\": 300,\n"
        "    \"users\": [\"root\"]},\n"
        "   {\"audience\": \"pam:" SERVICE_SSHD "\", \"scopes\": [\"login\"], \"max_ttl\": 300,\n"
        "    \"users\": [\"root\"]},\n"
        "   {\"audience\": \"" AUD_OTHER "\", \"scopes\": [\"login\"], \"max_ttl\": 300,\n"
        "    \"users\": [\"root\"]}]},\n"
        " {\"id\": \"nobody-agent\", \"owner\": \"bob@example.com\", \"match\": {\"uid\": 65534},\n"
        "  \"grants\": [\n"
        "   {\"audience\": \"" AUD "\", \"scopes\": [\"login\"], \"max_ttl\": 300, \"users\": [\"nobody\"]}]}]}\n";

static int setup(void **state)
{
        fixture *f = calloc(1, sizeof *f);
        if (!f || hx_broker_init(&f->b) < 0)
                goto fail;
        snprintf(f->confdir, sizeof f->confdir, "%s/pam.d", f->b.dir);
        snprintf(f->clock, sizeof f->clock, "%s/clock", f->b.dir);
        if (mkdir(f->confdir, 0755) < 0 || hx_write_file(f->clock, "0\n", 0644) < 0 ||
            setenv(TEST_CLOCK_ENV, f->clock, 1) < 0 || hx_build_path("pam_agent_broker.so", f->module, sizeof f->module) < 0 ||
            access(f->module, R_OK) < 0 || hx_broker_write_policy(&f->b, POLICY) < 0)
                goto fail;
        if (hx_broker_start(&f->b) < 0) {
                hx_broker_dump_log(&f->b);
                goto fail;
        }
        if (hx_conn_open(&f->b, f->b.sock, &f->c) < 0)
                goto fail;
        *state = f;
        return 0;
fail:
        if (f) {
                hx_broker_cleanup(&f->b);
                free(f);
        }
        return -1;
}

static int teardown(void **state)
{
        fixture *f = *state;
        int r = hx_broker_finish(&f->b);
        if (f->wrote_etc)
                unlink(ETC_PAM_FILE);
        if (f->wrote_sshd)
                unlink(ETC_PAM_SSHD);
        if (f->sshd > 0) {
                kill(f->sshd, SIGTERM);
                waitpid(f->sshd, NULL, 0);
        }
        unsetenv(TEST_CLOCK_ENV);
        free(f);
        return r;
}

/* ---- broker calls ------------------------------------------------------------ */

/* A token for this process (malloc'd). */
static char *issue(fixture *f, const char *aud, const char *scope, int ttl)
{
        json_t *p = json_pack("{s:s, s:[s]}", "audience", aud, "scopes", scope), *root;
        char *t;
        if (ttl > 0)
                json_object_set_new(p, "ttl", json_integer(ttl));
        root = hx_rpc(f->c, M_ISSUE, p);
        hx_assert_ok(root);
        t = strdup(hx_reply_str(root, "token"));
        json_decref(root);
        assert_non_null(t);
        return t;
}

static int child_issue(void *arg, char *out, size_t outmax)
{
        hx_broker *b = arg;
        hx_conn *c = NULL;
        json_t *root = NULL;
        const char *t;
        if (hx_conn_open(NULL, b->sock, &c) < 0)
                return 2;
        if (hx_conn_call(c, "{\"method\":\"" M_ISSUE "\",\"parameters\":{\"audience\":\"" AUD
                            "\",\"scopes\":[\"login\"]}}",
                         &root) != 1)
                return 3; /* the child exits: its memory goes with it */
        t = hx_reply_str(root, "token");
        if (t)
                snprintf(out, outmax, "%s", t);
        json_decref(root);
        hx_conn_close(NULL, c);
        return t ? 0 : 4;
}

static char *issue_as_nobody(fixture *f)
{
        char out[16384];
        int ex = -1;
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_issue, &f->b, HX_RUN_TIMEOUT_MS, out, sizeof out, &ex),
                         0);
        assert_int_equal(ex, 0);
        return strdup(out);
}

static char *claim(const char *token, const char *key)
{
        json_t *c = hx_jwt_segment_json(token, 1);
        char *s;
        assert_non_null(c);
        s = strdup(json_string_value(json_object_get(c, key)));
        json_decref(c);
        return s;
}

static void revoke_jti(fixture *f, const char *token)
{
        char *jti = claim(token, "jti");
        json_t *root = hx_rpc(f->c, M_REVOKE, json_pack("{s:s}", "jti", jti));
        hx_assert_ok(root);
        json_decref(root);
        free(jti);
}

/* ---- PAM ----------------------------------------------------------------------- */

typedef struct conv_data {
        const char *answer; /* what every prompt gets (NULL: fail the conversation) */
        int prompts;
        char info[2048];    /* PAM_TEXT_INFO and PAM_ERROR_MSG lines */
} conv_data;

static int conv_fn(int n, const struct pam_message **msg, struct pam_response **resp, void *appdata)
{
        conv_data *cd = appdata;
        struct pam_response *r = calloc((size_t)n, sizeof *r);
        if (!r)
                return PAM_BUF_ERR;
        for (int i = 0; i < n; i++) {
                switch (msg[i]->msg_style) {
                case PAM_PROMPT_ECHO_OFF:
                case PAM_PROMPT_ECHO_ON:
                        cd->prompts++;
                        if (!cd->answer || !(r[i].resp = strdup(cd->answer))) {
                                for (int j = 0; j < i; j++)
                                        free(r[j].resp);
                                free(r);
                                return PAM_CONV_ERR;
                        }
                        break;
                default: {
                        size_t len = strlen(cd->info);
                        snprintf(cd->info + len, sizeof cd->info - len, "%s\n", msg[i]->msg);
                }
                }
        }
        *resp = r;
        return PAM_SUCCESS;
}

/* Write the test service's config: each line of the stack, MODULE replaced by the module's path. */
static void write_conf(fixture *f, const char *service, const char *stack)
{
        char path[PATH_MAX], text[8192];
        size_t o = 0;
        for (const char *p = stack; *p && o < sizeof text - PATH_MAX;) {
                if (strncmp(p, "MODULE", 6) == 0) {
                        o += (size_t)snprintf(text + o, sizeof text - o, "%s", f->module);
                        p += 6;
                } else if (strncmp(p, "SOCKET", 6) == 0) {
                        o += (size_t)snprintf(text + o, sizeof text - o, "%s", f->b.sock);
                        p += 6;
                } else
                        text[o++] = *p++;
        }
        text[o] = 0;
        snprintf(path, sizeof path, "%s/%s", f->confdir, service);
        assert_int_equal(hx_write_file(path, text, 0644), 0);
}

static const char STACK_ALL[] = "auth required MODULE socket=SOCKET ARGS\n"
                                "account required MODULE socket=SOCKET ARGS\n"
                                "session required MODULE socket=SOCKET ARGS\n";

/* The default stack with extra module arguments. */
static void write_default(fixture *f, const char *args)
{
        char stack[2048], *p;
        snprintf(stack, sizeof stack, "%s", STACK_ALL);
        while ((p = strstr(stack, "ARGS"))) {
                char rest[2048];
                snprintf(rest, sizeof rest, "%s", p + 4);
                snprintf(p, sizeof stack - (size_t)(p - stack), "%s%s", args, rest);
        }
        write_conf(f, SERVICE, stack);
}

static pam_handle_t *start(fixture *f, const char *user, conv_data *cd, struct pam_conv *conv)
{
        pam_handle_t *h = NULL;
        conv->conv = conv_fn;
        conv->appdata_ptr = cd;
        assert_int_equal(pam_start_confdir(SERVICE, user, conv, f->confdir, &h), PAM_SUCCESS);
        return h;
}

/* pam_authenticate with answer to the prompt, as user; the handle is ended. */
static int auth_once(fixture *f, const char *user, const char *answer, conv_data *out_cd)
{
        conv_data cd = { .answer = answer };
        struct pam_conv conv;
        pam_handle_t *h = start(f, user, &cd, &conv);
        int r = pam_authenticate(h, 0);
        pam_end(h, r);
        if (out_cd)
                *out_cd = cd;
        return r;
}

static void expect_auth(fixture *f, const char *user, const char *answer, int want)
{
        int r = auth_once(f, user, answer, NULL);
        if (r != want)
                fprintf(stderr, "pam_authenticate as %s: %s (%d), want %d\n", user, pam_strerror(NULL, r), r, want);
        assert_int_equal(r, want);
}

/*
 * Descriptors of this process. The module logs through syslog(3), whose
 * connection to /dev/log stays open in the application, as with every PAM
 * module: main() opens it first (where /dev/log exists), so that it is not
 * counted as one left behind.
 */
static size_t count_fds(void)
{
        DIR *d = opendir("/proc/self/fd");
        size_t n = 0;
        assert_non_null(d);
        while (readdir(d))
                n++;
        closedir(d);
        return n;
}

/* Open PAM sessions recorded for the pam-agent session, as the admin sees them. */
static json_t *pam_records(fixture *f)
{
        hx_conn *a = NULL;
        json_t *root, *sessions, *s, *out = json_array();
        size_t i;
        assert_int_equal(hx_conn_open(&f->b, f->b.admin_sock, &a), 0);
        root = hx_rpc(a, M_ALIST, json_pack("{s:s}", "agent", "pam-agent"));
        hx_assert_ok(root);
        sessions = json_object_get(hx_reply_params(root), "sessions");
        json_array_foreach(sessions, i, s)
        {
                size_t k;
                json_t *p;
                json_array_foreach(json_object_get(s, "pam"), k, p) json_array_append(out, p);
        }
        json_decref(root);
        hx_conn_close(&f->b, a);
        return out;
}

/* The pam-agent session holds n open PAM session records. */
static void expect_records(fixture *f, size_t n)
{
        json_t *recs = pam_records(f);
        assert_int_equal(json_array_size(recs), n);
        json_decref(recs);
}

/* ---- tests ------------------------------------------------------------------------ */

static void test_success_all_stages(void **state)
{
        fixture *f = *state;
        conv_data cd = { 0 };
        struct pam_conv conv;
        pam_handle_t *h;
        char *tok = issue(f, AUD, "login", 0), *jti = claim(tok, "jti");
        const char *env;
        json_t *recs;
        size_t fds = count_fds();

        write_default(f, "");
        cd.answer = tok;
        h = start(f, "root", &cd, &conv);
        assert_int_equal(pam_set_item(h, PAM_TTY, "pts/7"), PAM_SUCCESS);
        assert_int_equal(pam_set_item(h, PAM_RHOST, "192.0.2.10"), PAM_SUCCESS);
        assert_int_equal(pam_authenticate(h, 0), PAM_SUCCESS);
        assert_int_equal(cd.prompts, 1);
        assert_int_equal(pam_setcred(h, PAM_ESTABLISH_CRED), PAM_SUCCESS);
        assert_int_equal(pam_acct_mgmt(h, 0), PAM_SUCCESS);
        assert_int_equal(pam_open_session(h, 0), PAM_SUCCESS);
        env = pam_getenv(h, "AGENT_BROKER_PAM_SESSION");
        assert_non_null(env);
        assert_int_equal(strlen(env), 43);

        /* the admin sees the PAM session under the agent's session */
        recs = pam_records(f);
        assert_int_equal(json_array_size(recs), 1);
        assert_string_equal(json_string_value(json_object_get(json_array_get(recs, 0), "id")), env);
        assert_string_equal(json_string_value(json_object_get(json_array_get(recs, 0), "service")), SERVICE);
        assert_string_equal(json_string_value(json_object_get(json_array_get(recs, 0), "user")), "root");
        assert_string_equal(json_string_value(json_object_get(json_array_get(recs, 0), "tty")), "pts/7");
        assert_string_equal(json_string_value(json_object_get(json_array_get(recs, 0), "rhost")), "192.0.2.10");
        assert_string_equal(json_string_value(json_object_get(json_array_get(recs, 0), "jti")), jti);
        json_decref(recs);

        assert_int_equal(pam_close_session(h, 0), PAM_SUCCESS);
        expect_records(f, 0);
        assert_int_equal(pam_setcred(h, PAM_DELETE_CRED), PAM_SUCCESS);
        assert_int_equal(pam_end(h, PAM_SUCCESS), PAM_SUCCESS);
        assert_int_equal(count_fds(), fds); /* no descriptor left behind */
        free(jti);
        free(tok);
}

static void test_wrong_audience(void **state)
{
        fixture *f = *state;
        char *tok = issue(f, AUD_OTHER, "login", 0);
        write_default(f, "");
        expect_auth(f, "root", tok, PAM_AUTH_ERR);
        /* audience= names the expected audience instead of pam:SERVICE */
        write_default(f, "audience=" AUD_OTHER);
        expect_auth(f, "root", tok, PAM_SUCCESS);
        free(tok);
        tok = issue(f, AUD, "login", 0);
        expect_auth(f, "root", tok, PAM_AUTH_ERR);
        free(tok);
}

static void test_scope(void **state)
{
        fixture *f = *state;
        char *login = issue(f, AUD, "login", 0), *deploy = issue(f, AUD, "deploy", 0);
        write_default(f, "");
        expect_auth(f, "root", deploy, PAM_AUTH_ERR); /* default scope=login */
        write_default(f, "scope=deploy");
        expect_auth(f, "root", login, PAM_AUTH_ERR);
        expect_auth(f, "root", deploy, PAM_SUCCESS);
        free(login);
        free(deploy);
}

static void test_user_not_allowed(void **state)
{
        fixture *f = *state;
        char *tok = issue(f, AUD, "login", 0), *nob = issue_as_nobody(f);
        write_default(f, "");
        expect_auth(f, "daemon", tok, PAM_AUTH_ERR);
        expect_auth(f, "no-such-user-here", tok, PAM_AUTH_ERR);
        expect_auth(f, "nobody", tok, PAM_SUCCESS);
        /* another uid's agent: its grant names only nobody */
        expect_auth(f, "root", nob, PAM_AUTH_ERR);
        expect_auth(f, "nobody", nob, PAM_SUCCESS);
        free(tok);
        free(nob);
}

static void test_revoked(void **state)
{
        fixture *f = *state;
        conv_data cd = { 0 };
        struct pam_conv conv;
        pam_handle_t *h;
        char *tok = issue(f, AUD, "login", 0), *tok2 = issue(f, AUD, "login", 0);

        write_default(f, "");
        expect_auth(f, "root", tok, PAM_SUCCESS);
        revoke_jti(f, tok);
        expect_auth(f, "root", tok, PAM_AUTH_ERR);

        /* revoked between authentication and account management */
        cd.answer = tok2;
        h = start(f, "root", &cd, &conv);
        assert_int_equal(pam_authenticate(h, 0), PAM_SUCCESS);
        revoke_jti(f, tok2);
        assert_int_equal(pam_acct_mgmt(h, 0), PAM_PERM_DENIED);
        assert_int_equal(pam_open_session(h, 0), PAM_SESSION_ERR);
        pam_end(h, PAM_PERM_DENIED);
        free(tok);
        free(tok2);
}

static void test_expired(void **state)
{
        fixture *f = *state;
        char *tok = issue(f, AUD, "login", 60);
        write_default(f, "");
        expect_auth(f, "root", tok, PAM_SUCCESS);
        hx_set_test_clock(f->clock, 61);
        expect_auth(f, "root", tok, PAM_AUTH_ERR);
        free(tok);
}

static void test_auth_too_old_then_reauthenticate(void **state)
{
        fixture *f = *state;
        conv_data cd;
        char *tok = issue(f, AUD, "login", 0), *fresh;
        json_t *root;

        write_default(f, "max_auth_age=5");
        expect_auth(f, "root", tok, PAM_SUCCESS);
        hx_set_test_clock(f->clock, 10);
        assert_int_equal(auth_once(f, "root", tok, &cd), PAM_AUTH_ERR);
        assert_non_null(strstr(cd.info, "re-authentication required"));
        /* the token is never in a message */
        assert_null(strstr(cd.info, tok));

        /* PAM_SILENT: no message */
        {
                conv_data cd2 = { .answer = tok };
                struct pam_conv conv;
                pam_handle_t *h = start(f, "root", &cd2, &conv);
                assert_int_equal(pam_authenticate(h, PAM_SILENT), PAM_AUTH_ERR);
                assert_int_equal(cd2.info[0], 0);
                pam_end(h, PAM_AUTH_ERR);
        }

        /* the agent re-authenticates at the broker and retries with a new token */
        root = hx_rpc(f->c, M_AUTH, NULL);
        hx_assert_ok(root);
        json_decref(root);
        fresh = issue(f, AUD, "login", 0);
        expect_auth(f, "root", fresh, PAM_SUCCESS);
        expect_auth(f, "root", tok, PAM_AUTH_ERR);
        /* without max_auth_age= the default is 300 s */
        write_default(f, "");
        expect_auth(f, "root", tok, PAM_SUCCESS);
        free(tok);
        free(fresh);
}

static void test_broker_down(void **state)
{
        fixture *f = *state;
        char *tok = issue(f, AUD, "login", 0), stack[PATH_MAX * 2], sock[PATH_MAX];
        long long t0, ms;
        int fd;

        /* no socket at all */
        snprintf(stack, sizeof stack, "auth required MODULE socket=%s/absent.sock\n", f->b.dir);
        write_conf(f, SERVICE, stack);
        t0 = hx_now_ms();
        expect_auth(f, "root", tok, PAM_AUTHINFO_UNAVAIL);
        fprintf(stderr, "broker absent: PAM_AUTHINFO_UNAVAIL after %lld ms\n", hx_now_ms() - t0);

        /* a socket that accepts connections and never answers */
        snprintf(sock, sizeof sock, "%s/mute.sock", f->b.dir);
        fd = hx_listen_unix(sock, 16);
        snprintf(stack, sizeof stack, "auth required MODULE socket=%s timeout_ms=300\n", sock);
        write_conf(f, SERVICE, stack);
        t0 = hx_now_ms();
        expect_auth(f, "root", tok, PAM_AUTHINFO_UNAVAIL);
        ms = hx_now_ms() - t0;
        fprintf(stderr, "mute broker, timeout_ms=300: PAM_AUTHINFO_UNAVAIL after %lld ms\n", ms);
        assert_true(ms >= 250);
        assert_true(ms < 300 + 3000); /* the bound, with room for a loaded or instrumented run */
        close(fd);

        /* the broker stopped: fail closed */
        write_default(f, "");
        {
                int st;
                assert_int_equal(hx_broker_stop(&f->b, &st), 0);
                expect_auth(f, "root", tok, PAM_AUTHINFO_UNAVAIL);
                assert_int_equal(hx_broker_start(&f->b), 0);
        }
        free(tok);
}

static void test_garbage_authtoks(void **state)
{
        fixture *f = *state;
        char *tok = issue(f, AUD, "login", 0), *forged, *big, *p;
        const char *junk[] = { "", "hunter2", "eyJ", "eyJ..", "eyJhbGciOiJub25lIn0.e30.", "eyJ.a.b.c", "a.b.c",
                               "eyJ\xff\xfe.\x01.x", "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.AAAA" };
        size_t n = 1024 * 1024;
        size_t fds = count_fds();

        write_default(f, "");
        for (size_t i = 0; i < sizeof junk / sizeof *junk; i++)
                expect_auth(f, "root", junk[i], PAM_AUTH_ERR);

        /* 1 MB, token-shaped and not */
        big = malloc(n + 1);
        assert_non_null(big);
        memset(big, 'A', n);
        memcpy(big, "eyJ", 3);
        big[n / 2] = '.';
        big[n / 2 + 10] = '.';
        big[n] = 0;
        expect_auth(f, "root", big, PAM_AUTH_ERR);
        memset(big, 'x', n);
        expect_auth(f, "root", big, PAM_AUTH_ERR);
        free(big);

        /* a real token altered: one payload byte, and the alg swapped to none */
        forged = strdup(tok);
        p = strchr(forged, '.') + 5;
        *p = *p == 'A' ? 'B' : 'A';
        expect_auth(f, "root", forged, PAM_AUTH_ERR);
        free(forged);
        {
                char buf[16384];
                const char *dot = strchr(tok, '.');
                snprintf(buf, sizeof buf, "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0%.*s.", (int)(strrchr(tok, '.') - dot),
                         dot);
                expect_auth(f, "root", buf, PAM_AUTH_ERR);
        }
        /* the conversation fails */
        expect_auth(f, "root", NULL, PAM_AUTH_ERR);
        /* the real one still works, and nothing leaked */
        expect_auth(f, "root", tok, PAM_SUCCESS);
        assert_int_equal(count_fds(), fds);
        free(tok);
}

static void test_ignore_non_token_stacking(void **state)
{
        fixture *f = *state;
        char *tok = issue(f, AUD, "login", 0), *bad = issue(f, AUD, "login", 0);
        conv_data cd;

        revoke_jti(f, bad);
        /* beside a second module, as beside pam_unix for humans */
        write_conf(f, SERVICE,
                   "auth [success=done ignore=ignore default=die] MODULE socket=SOCKET ignore_non_token\n"
                   "auth required pam_permit.so\n");
        expect_auth(f, "root", "correct horse battery staple", PAM_SUCCESS); /* not a token: the next module decides */
        expect_auth(f, "root", tok, PAM_SUCCESS);
        expect_auth(f, "root", bad, PAM_AUTH_ERR); /* a token, refused: never falls through */

        write_conf(f, SERVICE,
                   "auth sufficient MODULE socket=SOCKET ignore_non_token\n"
                   "auth required pam_deny.so\n");
        expect_auth(f, "root", "hunter2", PAM_AUTH_ERR);
        expect_auth(f, "root", tok, PAM_SUCCESS);

        /* without ignore_non_token a password is a failure */
        write_conf(f, SERVICE,
                   "auth [success=done ignore=ignore default=die] MODULE socket=SOCKET\n"
                   "auth required pam_permit.so\n");
        expect_auth(f, "root", "hunter2", PAM_AUTH_ERR);

        /* use_first_pass: the module twice in one stack, one prompt */
        write_conf(f, SERVICE,
                   "auth required MODULE socket=SOCKET\n"
                   "auth required MODULE socket=SOCKET use_first_pass debug\n");
        assert_int_equal(auth_once(f, "root", tok, &cd), PAM_SUCCESS);
        assert_int_equal(cd.prompts, 1);
        free(tok);
        free(bad);
}

static void test_unknown_arguments_ignored(void **state)
{
        fixture *f = *state;
        char *tok = issue(f, AUD, "login", 0);
        write_default(f, "frobnicate max_auth_age=abc timeout_ms=-1 scope= bogus=1 debug");
        expect_auth(f, "root", tok, PAM_SUCCESS);
        free(tok);
}

/*
 * One handle, used again: a second pam_authenticate that the module does
 * not accept (a password, beside pam_permit) must not leave the first
 * one's token for account and session; the module twice in the session
 * stack records one PAM session; a user name that is not printable ASCII
 * is PAM_USER_UNKNOWN.
 */
static void test_handle_reuse_and_odd_items(void **state)
{
        fixture *f = *state;
        char *tok = issue(f, AUD, "login", 0);
        conv_data cd = { 0 };
        struct pam_conv conv;
        pam_handle_t *h;
        json_t *recs;

        write_conf(f, SERVICE,
                   "auth sufficient MODULE socket=SOCKET ignore_non_token\n"
                   "auth required pam_permit.so\n"
                   "account required MODULE socket=SOCKET\n"
                   "account required pam_permit.so\n"
                   "session required MODULE socket=SOCKET\n"
                   "session required MODULE socket=SOCKET\n"
                   "session required pam_permit.so\n");
        cd.answer = tok;
        h = start(f, "root", &cd, &conv);
        assert_int_equal(pam_authenticate(h, 0), PAM_SUCCESS);
        assert_non_null(pam_getenv(h, "AGENT_BROKER_JTI"));
        /* the same handle, now a human's password */
        cd.answer = "a human password";
        assert_int_equal(pam_authenticate(h, 0), PAM_SUCCESS); /* pam_permit */
        assert_null(pam_getenv(h, "AGENT_BROKER_JTI"));
        revoke_jti(f, tok);
        assert_int_equal(pam_acct_mgmt(h, 0), PAM_SUCCESS); /* PAM_IGNORE: the revoked token is not consulted */
        assert_int_equal(pam_open_session(h, 0), PAM_SUCCESS);
        recs = pam_records(f);
        assert_int_equal(json_array_size(recs), 0); /* no PAM session recorded for the agent */
        json_decref(recs);
        pam_end(h, PAM_SUCCESS);
        free(tok);

        /* twice in the session stack: one record */
        tok = issue(f, AUD, "login", 0);
        cd = (conv_data){ .answer = tok };
        h = start(f, "root", &cd, &conv);
        assert_int_equal(pam_authenticate(h, 0), PAM_SUCCESS);
        assert_int_equal(pam_open_session(h, 0), PAM_SUCCESS);
        expect_records(f, 1);
        assert_int_equal(pam_close_session(h, 0), PAM_SUCCESS);
        expect_records(f, 0);
        pam_end(h, PAM_SUCCESS);

        /* odd user names and items */
        write_default(f, "");
        expect_auth(f, "jos\xc3\xa9", tok, PAM_USER_UNKNOWN);
        expect_auth(f, "jos\xe9", tok, PAM_USER_UNKNOWN);
        cd = (conv_data){ .answer = tok };
        h = start(f, "root", &cd, &conv);
        assert_int_equal(pam_set_item(h, PAM_RHOST, "h\xc3\xb4te"), PAM_SUCCESS);
        assert_int_equal(pam_authenticate(h, 0), PAM_SUCCESS);
        assert_int_equal(pam_open_session(h, 0), PAM_SUCCESS); /* rhost left out, not a failure */
        recs = pam_records(f);
        assert_int_equal(json_array_size(recs), 1);
        assert_false(json_is_string(json_object_get(json_array_get(recs, 0), "rhost")));
        json_decref(recs);
        assert_int_equal(pam_close_session(h, 0), PAM_SUCCESS);
        pam_end(h, PAM_SUCCESS);
        free(tok);
}

/*
 * account and session check the token as auth accepted it (its scope and
 * max_auth_age), unless their own line says otherwise; a second
 * pam_authenticate on the handle closes the PAM session recorded for the
 * first token; a user name the broker cannot take still lets a password
 * go on to the next module; a module argument that is not printable ASCII
 * is ignored, its default kept.
 */
static void test_stages_follow_auth(void **state)
{
        fixture *f = *state;
        char *dep = issue(f, AUD, "deploy", 0), *dep2 = issue(f, AUD, "deploy", 0), *tok = issue(f, AUD, "login", 0);
        char id1[128];
        conv_data cd = { .answer = dep };
        struct pam_conv conv;
        pam_handle_t *h;
        json_t *recs;

        /* as docs/pam.md's ticketdb example: the arguments on the auth line only */
        write_conf(f, SERVICE,
                   "auth required MODULE socket=SOCKET scope=deploy max_auth_age=120\n"
                   "account required MODULE socket=SOCKET\n"
                   "session required MODULE socket=SOCKET\n");
        h = start(f, "root", &cd, &conv);
        assert_int_equal(pam_authenticate(h, 0), PAM_SUCCESS);
        assert_int_equal(pam_acct_mgmt(h, 0), PAM_SUCCESS);      /* scope deploy, not the default login */
        assert_int_equal(pam_open_session(h, 0), PAM_SUCCESS);
        assert_non_null(pam_getenv(h, "AGENT_BROKER_PAM_SESSION"));
        snprintf(id1, sizeof id1, "%s", pam_getenv(h, "AGENT_BROKER_PAM_SESSION"));
        /* another token on the same handle: the first one's record is closed, the new one recorded */
        cd.answer = dep2;
        assert_int_equal(pam_authenticate(h, 0), PAM_SUCCESS);
        assert_null(pam_getenv(h, "AGENT_BROKER_PAM_SESSION"));
        assert_int_equal(pam_open_session(h, 0), PAM_SUCCESS);
        assert_non_null(pam_getenv(h, "AGENT_BROKER_PAM_SESSION"));
        assert_string_not_equal(pam_getenv(h, "AGENT_BROKER_PAM_SESSION"), id1);
        recs = pam_records(f);
        assert_int_equal(json_array_size(recs), 1);
        assert_string_equal(json_string_value(json_object_get(json_array_get(recs, 0), "id")),
                            pam_getenv(h, "AGENT_BROKER_PAM_SESSION"));
        json_decref(recs);
        /* a refused token on the same handle leaves the open record alone: close_session closes it */
        cd.answer = tok; /* scope login, where the auth line wants deploy */
        assert_int_equal(pam_authenticate(h, 0), PAM_AUTH_ERR);
        expect_records(f, 1);
        assert_int_equal(pam_close_session(h, 0), PAM_SUCCESS);
        expect_records(f, 0);
        pam_end(h, PAM_SUCCESS);
        /* account keeps auth's max_auth_age (120 s), not the default 300 s */
        cd.answer = dep2;
        h = start(f, "root", &cd, &conv);
        assert_int_equal(pam_authenticate(h, 0), PAM_SUCCESS);
        hx_set_test_clock(f->clock, 200);
        assert_int_equal(pam_acct_mgmt(h, 0), PAM_PERM_DENIED);
        pam_end(h, PAM_SUCCESS);
        hx_set_test_clock(f->clock, 0);

        /* a human whose name the broker cannot take: the password goes on */
        write_conf(f, SERVICE,
                   "auth [success=done ignore=ignore default=die] MODULE socket=SOCKET ignore_non_token\n"
                   "auth required pam_permit.so\n");
        expect_auth(f, "jos\xc3\xa9", "a password", PAM_SUCCESS);
        expect_auth(f, "jos\xc3\xa9", tok, PAM_USER_UNKNOWN); /* a token for such a name: refused */

        /* a scope that is not printable ASCII is ignored: the default login applies */
        write_default(f, "scope=l\xc3\xb6gin");
        expect_auth(f, "root", tok, PAM_SUCCESS);
        {
                /* a socket path is not sent to the broker: any bytes but controls will do */
                char link[PATH_MAX], stack[PATH_MAX * 2];
                snprintf(link, sizeof link, "%s/d\xc3\xbcr", f->b.dir);
                assert_int_equal(symlink(".", link), 0);
                snprintf(stack, sizeof stack, "auth required MODULE socket=%s/%s\n", link, strrchr(f->b.sock, '/') + 1);
                write_conf(f, SERVICE, stack);
                expect_auth(f, "root", tok, PAM_SUCCESS);
                unlink(link);
        }
        free(dep);
        free(dep2);
        free(tok);
}

typedef struct thread_arg {
        fixture *f;
        const char *tok;
        int fails;
} thread_arg;

static void *thread_main(void *p)
{
        thread_arg *a = p;
        for (int i = 0; i < 20; i++) {
                conv_data cd = { .answer = a->tok };
                struct pam_conv conv = { conv_fn, &cd };
                pam_handle_t *h = NULL;
                int r = pam_start_confdir(SERVICE, "root", &conv, a->f->confdir, &h);
                if (r == PAM_SUCCESS)
                        r = pam_authenticate(h, 0);
                if (r == PAM_SUCCESS)
                        r = pam_acct_mgmt(h, 0);
                if (r != PAM_SUCCESS)
                        a->fails++;
                if (h)
                        pam_end(h, r);
        }
        return NULL;
}

static void test_threads(void **state)
{
        fixture *f = *state;
        char *tok = issue(f, AUD, "login", 0);
        pthread_t th[4];
        thread_arg args[4];
        size_t fds = count_fds();

        write_default(f, "");
        for (int i = 0; i < 4; i++) {
                args[i] = (thread_arg){ f, tok, 0 };
                assert_int_equal(pthread_create(&th[i], NULL, thread_main, &args[i]), 0);
        }
        for (int i = 0; i < 4; i++) {
                assert_int_equal(pthread_join(th[i], NULL), 0);
                assert_int_equal(args[i].fails, 0);
        }
        assert_int_equal(count_fds(), fds);
        free(tok);
}

static void test_pamtester(void **state)
{
        fixture *f = *state;
        char stack[PATH_MAX * 4], *tok, *input;
        hx_run_result res = { 0 };
        char *argv[] = { PAMTESTER, "-v", SERVICE_TESTER, "root", "authenticate", "acct_mgmt", "open_session",
                         "close_session", NULL };
        struct stat st;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
        skip(); /* pamtester cannot load a module built with AddressSanitizer or ThreadSanitizer */
#endif
        if (geteuid() != 0 || access(PAMTESTER, X_OK) < 0) {
                fprintf(stderr, "SKIP: needs root and %s\n", PAMTESTER);
                skip();
        }
        assert_true(lstat(ETC_PAM_FILE, &st) < 0); /* never overwrite a real service */
        snprintf(stack, sizeof stack,
                 "auth required %s socket=%s\naccount required %s socket=%s\nsession required %s socket=%s\n",
                 f->module, f->b.sock, f->module, f->b.sock, f->module, f->b.sock);
        f->wrote_etc = true;
        assert_int_equal(hx_write_file(ETC_PAM_FILE, stack, 0644), 0);

        tok = issue(f, "pam:" SERVICE_TESTER, "login", 0);
        assert_int_equal(asprintf(&input, "%s\n", tok), (int)strlen(tok) + 1);
        assert_int_equal(hx_run(argv, input, -1, HX_RUN_TIMEOUT_MS, &res), 0);
        if (res.exit_code != 0)
                fprintf(stderr, "pamtester: %d\n%s\n%s\n", res.exit_code, res.out, res.err);
        assert_int_equal(res.exit_code, 0);
        assert_non_null(strstr(res.out, "successfully authenticated"));
        assert_non_null(strstr(res.out, "session has successfully been closed"));
        hx_run_result_done(&res);

        /* revoked: pamtester reports the failure */
        revoke_jti(f, tok);
        assert_int_equal(hx_run(argv, input, -1, HX_RUN_TIMEOUT_MS, &res), 0);
        assert_int_not_equal(res.exit_code, 0);
        assert_non_null(strstr(res.err, "Authentication failure"));
        hx_run_result_done(&res);

        assert_int_equal(unlink(ETC_PAM_FILE), 0);
        f->wrote_etc = false;
        free(input);
        free(tok);
}


/* A free TCP port on 127.0.0.1 (bound, then released). */
static int free_port(void)
{
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        socklen_t len = sizeof sa;
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), port;
        assert_true(fd >= 0);
        assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
        assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
        port = ntohs(sa.sin_port);
        close(fd);
        return port;
}

static bool port_answers(int port)
{
        struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        bool ok = fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
        if (fd >= 0)
                close(fd);
        return ok;
}

/* ssh -p port root@127.0.0.1 CMD, answering the keyboard-interactive prompt with answer. */
static void ssh_login(fixture *f, int port, const char *answer, hx_run_result *res)
{
        char ports[16], known[PATH_MAX];
        snprintf(ports, sizeof ports, "%d", port);
        snprintf(known, sizeof known, "UserKnownHostsFile=%s/known_hosts", f->b.dir);
        char *argv[] = { SSHPASS, "-e", "-P", "Agent token", SSH, "-p", ports, "-o", "StrictHostKeyChecking=no",
                         "-o", known, "-o", "PreferredAuthentications=keyboard-interactive", "-o",
                         "NumberOfPasswordPrompts=1", "-o", "BatchMode=no", "-F", "/dev/null", "root@127.0.0.1",
                         "echo LOGGED-IN; echo jti=$AGENT_BROKER_JTI", NULL };
        setenv("SSHPASS", answer, 1);
        assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, res), 0);
        unsetenv("SSHPASS");
}

/*
 * The real sshd: keyboard-interactive through the module stacked before
 * Debian's common-auth, as docs/pam.md shows. sshd authenticates in a
 * forked child, so this also covers a handle whose stages run in two
 * processes.
 */
static void test_sshd(void **state)
{
        fixture *f = *state;
        char link[PATH_MAX], conf[PATH_MAX], key[PATH_MAX], text[PATH_MAX * 4], *tok, *jti, want[128];
        hx_run_result res = { 0 };
        struct stat st;
        int port;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
        skip(); /* sshd cannot load a module built with AddressSanitizer or ThreadSanitizer */
#endif
        if (geteuid() != 0 || access(SSHD, X_OK) < 0 || access(SSH, X_OK) < 0 || access(SSHPASS, X_OK) < 0 ||
            access("/etc/pam.d/common-auth", R_OK) < 0) {
                fprintf(stderr, "SKIP: needs root, openssh-server, openssh-client, sshpass and Debian's PAM config\n");
                skip();
        }
        assert_true(lstat(ETC_PAM_SSHD, &st) < 0);
        snprintf(text, sizeof text,
                 "auth [success=done ignore=ignore default=die] %s socket=%s ignore_non_token\n"
                 "@include common-auth\n@include common-account\n"
                 "session required %s socket=%s\n@include common-session-noninteractive\n",
                 f->module, f->b.sock, f->module, f->b.sock);
        f->wrote_sshd = true;
        assert_int_equal(hx_write_file(ETC_PAM_SSHD, text, 0644), 0);

        snprintf(key, sizeof key, "%s/hostkey", f->b.dir);
        {
                char *argv[] = { SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", key, NULL };
                assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, &res), 0);
                assert_int_equal(res.exit_code, 0);
                hx_run_result_done(&res);
        }
        port = free_port();
        snprintf(conf, sizeof conf, "%s/sshd_config", f->b.dir);
        snprintf(text, sizeof text,
                 "Port %d\nListenAddress 127.0.0.1\nHostKey %s\nUsePAM yes\nKbdInteractiveAuthentication yes\n"
                 "PasswordAuthentication no\nPubkeyAuthentication no\nPermitRootLogin yes\n"
                 "AuthenticationMethods keyboard-interactive\nPidFile none\n",
                 port, key);
        assert_int_equal(hx_write_file(conf, text, 0600), 0);
        snprintf(link, sizeof link, "%s/" SERVICE_SSHD, f->b.dir);
        assert_int_equal(symlink(SSHD, link), 0);
        mkdir("/run/sshd", 0755); /* privilege separation directory */

        f->sshd = fork();
        assert_true(f->sshd >= 0);
        if (f->sshd == 0) {
                char log[PATH_MAX];
                snprintf(log, sizeof log, "%s/sshd.log", f->b.dir);
                execl(link, link, "-D", "-f", conf, "-E", log, (char *)NULL);
                _exit(127);
        }
        for (long long t0 = hx_now_ms(); !port_answers(port); ) {
                struct timespec ts = { 0, 20000000 };
                assert_true(hx_now_ms() - t0 < HX_START_TIMEOUT_MS);
                nanosleep(&ts, NULL);
        }

        tok = issue(f, "pam:" SERVICE_SSHD, "login", 0);
        jti = claim(tok, "jti");
        ssh_login(f, port, tok, &res);
        if (res.exit_code != 0)
                fprintf(stderr, "ssh: %d\n%s\n%s\n", res.exit_code, res.out, res.err);
        assert_int_equal(res.exit_code, 0);
        assert_non_null(strstr(res.out, "LOGGED-IN"));
        snprintf(want, sizeof want, "jti=%s", jti);
        assert_non_null(strstr(res.out, want)); /* the login knows which token let it in */
        hx_run_result_done(&res);

        /* a password goes past the module to pam_unix, which refuses it */
        ssh_login(f, port, "not-a-token-and-not-the-password", &res);
        assert_int_not_equal(res.exit_code, 0);
        assert_null(strstr(res.out, "LOGGED-IN"));
        hx_run_result_done(&res);

        /* a token for another service, then the revoked token */
        {
                char *other = issue(f, AUD, "login", 0);
                ssh_login(f, port, other, &res);
                assert_int_not_equal(res.exit_code, 0);
                hx_run_result_done(&res);
                free(other);
        }
        revoke_jti(f, tok);
        ssh_login(f, port, tok, &res);
        assert_int_not_equal(res.exit_code, 0);
        assert_null(strstr(res.out, "LOGGED-IN"));
        hx_run_result_done(&res);

        assert_int_equal(unlink(ETC_PAM_SSHD), 0);
        f->wrote_sshd = false;
        free(jti);
        free(tok);
}

int main(void)
{
        openlog("test-pam", LOG_NDELAY | LOG_PID, LOG_AUTHPRIV); /* see count_fds */
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_success_all_stages, setup, teardown),
                cmocka_unit_test_setup_teardown(test_wrong_audience, setup, teardown),
                cmocka_unit_test_setup_teardown(test_scope, setup, teardown),
                cmocka_unit_test_setup_teardown(test_user_not_allowed, setup, teardown),
                cmocka_unit_test_setup_teardown(test_revoked, setup, teardown),
                cmocka_unit_test_setup_teardown(test_expired, setup, teardown),
                cmocka_unit_test_setup_teardown(test_auth_too_old_then_reauthenticate, setup, teardown),
                cmocka_unit_test_setup_teardown(test_broker_down, setup, teardown),
                cmocka_unit_test_setup_teardown(test_garbage_authtoks, setup, teardown),
                cmocka_unit_test_setup_teardown(test_ignore_non_token_stacking, setup, teardown),
                cmocka_unit_test_setup_teardown(test_unknown_arguments_ignored, setup, teardown),
                cmocka_unit_test_setup_teardown(test_handle_reuse_and_odd_items, setup, teardown),
                cmocka_unit_test_setup_teardown(test_stages_follow_auth, setup, teardown),
                cmocka_unit_test_setup_teardown(test_threads, setup, teardown),
                cmocka_unit_test_setup_teardown(test_pamtester, setup, teardown),
                cmocka_unit_test_setup_teardown(test_sshd, setup, teardown),
        };
        signal(SIGPIPE, SIG_IGN);
        return cmocka_run_group_tests_name("pam", tests, NULL, NULL);
}
