/* SPDX-License-Identifier: MIT */
/*
 * Integration tests for issue 4: sessions, re-authentication,
 * introspection, revocation, delegation and PAM session records, against
 * the real agent-brokerd.
 *
 * Who is who: this test process (root, uid 0) is one long-lived agent
 * process of "test-agent", so every raw connection it opens shares one
 * session. Other processes of the same agent are forked children (uid 0),
 * CLI invocations, or helper-agent (a long-lived process driven through a
 * pipe). uid 65534 is "nobody-agent", another agent under another uid.
 *
 * Time: one test runs with real short intervals (reauth 2 s, token ttl
 * 3 s). The policy refuses a session max_lifetime under 60 s, so the
 * lifetime tests move the broker's clock with AGENT_BROKER_TEST_CLOCK.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <grp.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include <sodium.h>
#include "harness.h"
#include "../../common/b64.h"
#include "../../common/jwt.h"

#define AUD_GIT "mcp://git.internal"
#define AUD_TICKETS "https://tickets.internal/api"
#define AUD_PAM "pam:sshd"
#define AGENT_ID "test-agent"
#define NOBODY_AGENT "nobody-agent"
#define OWNER "alice@example.com"
#define TEST_CLOCK_ENV "AGENT_BROKER_TEST_CLOCK"

#define M_ISSUE "io.agentbroker.IssueToken"
#define M_AUTH "io.agentbroker.Authenticate"
#define M_INTRO "io.agentbroker.Introspect"
#define M_ATT "io.agentbroker.Attenuate"
#define M_REVOKE "io.agentbroker.Revoke"
#define M_LIST "io.agentbroker.ListSessions"
#define M_WHOAMI "io.agentbroker.WhoAmI"
#define M_PAM_OPEN "io.agentbroker.OpenPamSession"
#define M_PAM_CLOSE "io.agentbroker.ClosePamSession"
#define M_AREVOKE "io.agentbroker.admin.Revoke"
#define M_ALIST "io.agentbroker.admin.ListSessions"
#define M_AINTRO "io.agentbroker.admin.Introspect"

#define E_PERM "io.agentbroker.PermissionDenied"
#define E_PARAM "io.agentbroker.InvalidParameter"
#define E_INVALID_TOKEN "io.agentbroker.InvalidToken"

/* ---- fixtures ------------------------------------------------------------- */

typedef struct agent_proc {
        pid_t pid;
        int in, out;      /* its stdin (we write), its stdout (we read) */
        char buf[256 * 1024];
        size_t len;
} agent_proc;

#define MAX_PROCS 8
static agent_proc *procs[MAX_PROCS];

static void procs_kill_all(void)
{
        for (size_t i = 0; i < MAX_PROCS; i++) {
                agent_proc *p = procs[i];
                int st;
                if (!p)
                        continue;
                if (p->pid > 0) {
                        kill(p->pid, SIGKILL);
                        waitpid(p->pid, &st, 0);
                }
                if (p->in >= 0)
                        close(p->in);
                if (p->out >= 0)
                        close(p->out);
                free(p);
                procs[i] = NULL;
        }
}

static int teardown(void **state)
{
        procs_kill_all();
        unsetenv(TEST_CLOCK_ENV);
        return hx_teardown(state);
}

/* ---- policy and daemon ------------------------------------------------------ */

/*
 * test-agent (uid 0): git (repo:read, repo:write; max_ttl 600), tickets
 * (max_ttl 60, max_auth_age 30 s), pam:sshd (login, users alice and carol).
 * nobody-agent (uid 65534): git repo:read, pam:su login. session_json is the inside of
 * test-agent's "session" object (NULL: defaults); depth < 0: default.
 */
static void write_policy(hx_broker *b, const char *session_json, int depth)
{
        char policy[4096], sess[256] = "", dep[64] = "";
        int n;

        if (session_json)
                snprintf(sess, sizeof sess, "   \"session\": {%s},\n", session_json);
        if (depth >= 0)
                snprintf(dep, sizeof dep, "   \"max_delegation_depth\": %d,\n", depth);
        n = snprintf(policy, sizeof policy,
                     "{\"version\": 1,\n"
                     " \"agents\": [\n"
                     "  {\"id\": \"" AGENT_ID "\", \"owner\": \"" OWNER "\",\n"
                     "   \"match\": {\"uid\": 0},\n"
                     "%s%s"
                     "   \"grants\": [\n"
                     "     {\"audience\": \"" AUD_GIT "\", \"scopes\": [\"repo:read\", \"repo:write\"], \"max_ttl\": 600},\n"
                     "     {\"audience\": \"" AUD_TICKETS "\", \"scopes\": [\"tickets:read\"], \"max_ttl\": 60,\n"
                     "      \"max_auth_age\": 30},\n"
                     "     {\"audience\": \"" AUD_PAM "\", \"scopes\": [\"login\"], \"max_ttl\": 300,\n"
                     "      \"users\": [\"alice\", \"carol\"]}]},\n"
                     "  {\"id\": \"" NOBODY_AGENT "\", \"owner\": \"bob@example.com\",\n"
                     "   \"match\": {\"uid\": 65534},\n"
                     "   \"grants\": [\n"
                     "     {\"audience\": \"" AUD_GIT "\", \"scopes\": [\"repo:read\"], \"max_ttl\": 600},\n"
                     "     {\"audience\": \"pam:su\", \"scopes\": [\"login\"], \"max_ttl\": 300}]}]}\n",
                     sess, dep);
        assert_true(n > 0 && (size_t)n < sizeof policy);
        assert_int_equal(hx_broker_write_policy(b, policy), 0);
}

static void start_with(hx_broker *b, const char *session_json, int depth)
{
        write_policy(b, session_json, depth);
        hx_start(b);
}

/* One agent, root's, with GRANTS (a JSON array's contents) and SESSION (an object's contents, or NULL). */
static void write_root_grants(hx_broker *b, const char *session_json, const char *grants_json)
{
        char policy[4096];
        int n = snprintf(policy, sizeof policy,
                         "{\"version\": 1, \"agents\": [{\"id\": \"" AGENT_ID "\", \"owner\": \"" OWNER "\",\n"
                         " \"match\": {\"uid\": 0}, \"session\": {%s},\n"
                         " \"grants\": [%s]}]}\n",
                         session_json ? session_json : "", grants_json);
        assert_true(n > 0 && (size_t)n < sizeof policy);
        assert_int_equal(hx_broker_write_policy(b, policy), 0);
}

/* SIGKILL the daemon: no shutdown code runs. */
static void kill9(hx_broker *b)
{
        int st = 0;
        assert_true(b->pid > 0);
        assert_int_equal(kill(b->pid, SIGKILL), 0);
        assert_int_equal(waitpid(b->pid, &st, 0), b->pid);
        assert_true(WIFSIGNALED(st));
        b->pid = 0;
}

/* Every connection the harness holds is dead after a restart: forget them. */
static void drop_conns(hx_broker *b)
{
        for (size_t i = 0; i < HX_MAX_CONNS; i++)
                if (b->conns[i])
                        hx_conn_close(b, b->conns[i]);
}

static void restart(hx_broker *b, bool hard)
{
        if (hard)
                kill9(b);
        else
                hx_stop_clean(b);
        drop_conns(b);
        hx_start(b);
}

/* A test clock file (offset 0) that the next broker start reads. */
static void use_test_clock(hx_broker *b, char *path, size_t max)
{
        snprintf(path, max, "%s/clock", b->dir);
        assert_int_equal(hx_write_file(path, "0\n", 0644), 0);
        assert_int_equal(setenv(TEST_CLOCK_ENV, path, 1), 0);
}

static void wait_wall(long long t)
{
        while ((long long)time(NULL) < t) {
                struct timespec ts = { 0, 20000000L };
                nanosleep(&ts, NULL);
        }
}

/* ---- varlink calls ---------------------------------------------------------- */

/* hx_rpc, require the error name, drop the reply. */
static void expect_error(hx_conn *c, const char *method, json_t *params, const char *name)
{
        json_t *root = hx_rpc(c, method, params);
        hx_assert_error(root, name);
        json_decref(root);
}

static json_t *expect_ok(hx_conn *c, const char *method, json_t *params)
{
        json_t *root = hx_rpc(c, method, params);
        hx_assert_ok(root);
        return root;
}

static long long pint(const json_t *root, const char *key)
{
        json_t *v = json_object_get(hx_reply_params(root), key);
        assert_true(json_is_integer(v));
        return (long long)json_integer_value(v);
}

/* A token as malloc'd string; *ret_root (optional) keeps the reply. */
static char *issue(hx_conn *c, const char *aud, const char *scope1, const char *scope2, int ttl, json_t **ret_root)
{
        json_t *p = json_pack("{s:s, s:[s]}", "audience", aud, "scopes", scope1), *root;
        char *t;

        if (scope2)
                json_array_append_new(json_object_get(p, "scopes"), json_string(scope2));
        if (ttl > 0)
                json_object_set_new(p, "ttl", json_integer(ttl));
        root = hx_rpc(c, M_ISSUE, p);
        hx_assert_ok(root);
        t = strdup(hx_reply_str(root, "token"));
        assert_non_null(t);
        if (ret_root)
                *ret_root = root;
        else
                json_decref(root);
        return t;
}

static json_t *issue_params(const char *aud, const char *scope, int ttl)
{
        json_t *p = json_pack("{s:s, s:[s]}", "audience", aud, "scopes", scope);
        if (ttl > 0)
                json_object_set_new(p, "ttl", json_integer(ttl));
        return p;
}

/* Claim (from our own decoding of the payload) as a malloc'd string. */
static char *claim(const char *token, const char *key)
{
        json_t *c = hx_jwt_segment_json(token, 1);
        char *s;
        assert_non_null(c);
        assert_true(json_is_string(json_object_get(c, key)));
        s = strdup(json_string_value(json_object_get(c, key)));
        json_decref(c);
        return s;
}

static long long claim_int(const char *token, const char *key)
{
        json_t *c = hx_jwt_segment_json(token, 1);
        long long v;
        assert_non_null(c);
        assert_true(json_is_integer(json_object_get(c, key)));
        v = json_integer_value(json_object_get(c, key));
        json_decref(c);
        return v;
}

/*
 * Introspect token on c with extra parameters (stolen, may be NULL) and
 * return "active" or the reason. The string lives until 16 more calls.
 */
static const char *verdict_on(hx_conn *c, const char *method, const char *token, json_t *extra)
{
        static char ring[16][64];
        static unsigned next;
        json_t *p = extra ? extra : json_object(), *root, *params;
        const char *v;
        char *out = ring[next++ % 16];

        json_object_set_new(p, "token", json_string(token));
        root = hx_rpc(c, method, p);
        hx_assert_ok(root);
        params = hx_reply_params(root);
        if (json_is_true(json_object_get(params, "active"))) {
                v = "active";
                assert_null(json_object_get(params, "reason"));
        } else {
                assert_true(json_is_false(json_object_get(params, "active")));
                v = json_string_value(json_object_get(params, "reason"));
                assert_non_null(v);
                /* an inactive verdict says nothing else about the token */
                assert_int_equal(json_object_size(params), 2);
        }
        snprintf(out, 64, "%s", v);
        json_decref(root);
        return out;
}

static const char *verdict(hx_conn *c, const char *token, json_t *extra)
{
        return verdict_on(c, M_INTRO, token, extra);
}

static json_t *jti_param(const char *key, const char *value)
{
        return json_pack("{s:s}", key, value);
}

/* ---- forging tokens ----------------------------------------------------------- */

typedef struct keypair {
        uint8_t pk[crypto_sign_PUBLICKEYBYTES];
        uint8_t sk[crypto_sign_SECRETKEYBYTES];
        char kid[44];
} keypair;

/* The broker's own key, read from its state dir (root may). */
static void broker_key(hx_broker *b, keypair *k)
{
        char path[PATH_MAX], *seed = NULL;
        size_t n = 0;

        assert_int_equal(sodium_init() < 0, 0);
        snprintf(path, sizeof path, "%s/signing.key", b->state);
        assert_int_equal(hx_read_file(path, 4096, &seed, &n), 0);
        assert_int_equal(n, crypto_sign_SEEDBYTES);
        crypto_sign_seed_keypair(k->pk, k->sk, (const unsigned char *)seed);
        sodium_memzero(seed, n);
        free(seed);
        assert_int_equal(ab_jwk_thumbprint(k->pk, k->kid), 0);
}

static void random_key(keypair *k)
{
        assert_int_equal(sodium_init() < 0, 0);
        crypto_sign_keypair(k->pk, k->sk);
        assert_int_equal(ab_jwk_thumbprint(k->pk, k->kid), 0);
}

typedef enum sig_kind {
        SIG_ED25519,     /* properly signed with k->sk */
        SIG_NONE,        /* empty signature */
        SIG_HMAC_PK,     /* HS256 with the 32 public key bytes as the HMAC key */
        SIG_HMAC_X,      /* HS256 with the JWK's "x" text as the HMAC key */
} sig_kind;

/* A compact JWS of claims with header {alg, typ, kid}; kid NULL: none. */
static char *forge(const keypair *k, sig_kind how, const char *alg, const char *kid, json_t *claims)
{
        json_t *h = json_pack("{s:s, s:s}", "alg", alg, "typ", "at+jwt");
        char *buf = NULL, *out;
        size_t len = 0;
        uint8_t sig[64];
        size_t siglen = 0;
        char x[64];

        assert_non_null(h);
        if (kid)
                json_object_set_new(h, "kid", json_string(kid));
        assert_int_equal(ab_jwt_signing_input(h, claims, 200, &buf, &len), 0);
        json_decref(h);
        switch (how) {
        case SIG_ED25519:
                crypto_sign_detached(sig, NULL, (const unsigned char *)buf, len, k->sk);
                siglen = 64;
                break;
        case SIG_NONE:
                siglen = 0;
                break;
        case SIG_HMAC_PK:
                crypto_auth_hmacsha256(sig, (const unsigned char *)buf, len, k->pk);
                siglen = 32;
                break;
        case SIG_HMAC_X: {
                crypto_auth_hmacsha256_state st;
                int xl = ab_b64url_encode(k->pk, 32, x, sizeof x);
                assert_true(xl == 43);
                crypto_auth_hmacsha256_init(&st, (const unsigned char *)x, (size_t)xl);
                crypto_auth_hmacsha256_update(&st, (const unsigned char *)buf, len);
                crypto_auth_hmacsha256_final(&st, sig);
                siglen = 32;
                break;
        }
        }
        out = malloc(len + 200);
        assert_non_null(out);
        memcpy(out, buf, len);
        out[len] = '.';
        out[len + 1] = '\0';
        if (siglen)
                assert_true(ab_b64url_encode(sig, siglen, out + len + 1, 199) > 0);
        free(buf);
        return out;
}

/* The claims of a genuine token, to be changed and re-signed. */
static json_t *claims_of(const char *token)
{
        json_t *c = hx_jwt_segment_json(token, 1);
        assert_non_null(c);
        return c;
}

static void random_sid(char out[23])
{
        uint8_t raw[16];
        randombytes_buf(raw, sizeof raw);
        assert_int_equal(ab_b64url_encode(raw, 16, out, 23), 22);
}

/* A well-formed jti of session sid (16 bytes of it, 16 random). */
static void jti_for_sid(const char *sid, char out[44])
{
        uint8_t raw[32];
        size_t n = 0;
        assert_int_equal(ab_b64url_decode(sid, 22, raw, 16, &n), 0);
        assert_int_equal(n, 16);
        randombytes_buf(raw + 16, 16);
        assert_int_equal(ab_b64url_encode(raw, 32, out, 44), 43);
}

/* ---- other processes ---------------------------------------------------------- */

/* helper-agent as uid (< 0: ours); waits for its READY line. */
static agent_proc *agent_spawn(hx_broker *b, int uid)
{
        char helper[PATH_MAX];
        int in[2], out[2];
        agent_proc *p = calloc(1, sizeof *p);
        pid_t parent = getpid();
        size_t slot;

        assert_non_null(p);
        for (slot = 0; slot < MAX_PROCS && procs[slot]; slot++)
                ;
        assert_true(slot < MAX_PROCS);
        procs[slot] = p;
        p->in = p->out = -1;
        assert_int_equal(hx_build_path("tests/helper-agent", helper, sizeof helper), 0);
        assert_int_equal(access(helper, X_OK), 0);
        assert_int_equal(pipe2(in, O_CLOEXEC), 0);
        assert_int_equal(pipe2(out, O_CLOEXEC), 0);
        fflush(NULL);
        p->pid = fork();
        assert_true(p->pid >= 0);
        if (p->pid == 0) {
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                if (getppid() != parent)
                        _exit(126);
                if (dup2(in[0], 0) < 0 || dup2(out[1], 1) < 0)
                        _exit(126);
                if (uid >= 0 && (setgroups(0, NULL) < 0 || setgid((gid_t)uid) < 0 || setuid((uid_t)uid) < 0 ||
                                 getuid() != (uid_t)uid))
                        _exit(125);
                char *argv[] = { helper, b->sock, NULL };
                execv(helper, argv);
                _exit(127);
        }
        close(in[0]);
        close(out[1]);
        p->in = in[1];
        p->out = out[0];
        return p;
}

/* One line of output (malloc'd, without the newline), or NULL on EOF/timeout. */
static char *agent_line(agent_proc *p, int timeout_ms)
{
        long long deadline = hx_now_ms() + timeout_ms;

        for (;;) {
                char *nl = memchr(p->buf, '\n', p->len);
                struct pollfd pf = { .fd = p->out, .events = POLLIN };
                long long left;
                ssize_t n;

                if (nl) {
                        size_t l = (size_t)(nl - p->buf);
                        char *s = malloc(l + 1);
                        assert_non_null(s);
                        memcpy(s, p->buf, l);
                        s[l] = '\0';
                        memmove(p->buf, nl + 1, p->len - l - 1);
                        p->len -= l + 1;
                        return s;
                }
                left = deadline - hx_now_ms();
                if (left <= 0 || p->len == sizeof p->buf)
                        return NULL;
                if (poll(&pf, 1, (int)left) <= 0)
                        continue;
                n = read(p->out, p->buf + p->len, sizeof p->buf - p->len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return NULL;
                p->len += (size_t)n;
        }
}

static void agent_send(agent_proc *p, const char *text)
{
        size_t len = strlen(text);
        const char *q = text;
        while (len > 0) {
                ssize_t n = write(p->in, q, len);
                if (n < 0 && errno == EINTR)
                        continue;
                assert_true(n > 0);
                q += n;
                len -= (size_t)n;
        }
}

static void agent_ready(agent_proc *p)
{
        char *line = agent_line(p, HX_RUN_TIMEOUT_MS);
        if (!line)
                fprintf(stderr, "helper-agent did not start\n");
        assert_non_null(line);
        assert_memory_equal(line, "READY ", 6);
        assert_int_equal(atoi(line + 6), p->pid);
        free(line);
}

/* Have the helper call method with params (stolen); the whole reply. */
static json_t *agent_rpc(agent_proc *p, const char *method, json_t *params)
{
        char *ptext = params ? json_dumps(params, JSON_COMPACT) : strdup("{}"), *cmd, *line;
        json_t *root;
        size_t n;

        assert_non_null(ptext);
        json_decref(params);
        n = strlen(method) + strlen(ptext) + 16;
        cmd = malloc(n);
        assert_non_null(cmd);
        snprintf(cmd, n, "call %s %s\n", method, ptext);
        free(ptext);
        agent_send(p, cmd);
        free(cmd);
        line = agent_line(p, HX_RUN_TIMEOUT_MS);
        assert_non_null(line);
        root = json_loads(line, 0, NULL);
        if (!json_is_object(root))
                fprintf(stderr, "helper-agent: %s\n", line);
        free(line);
        assert_true(json_is_object(root));
        return root;
}

/* A forked child (any uid) that makes a list of calls on fresh connections. */
typedef struct step {
        const char *socket;  /* path */
        const char *method;
        char *params;        /* JSON text */
} step;

typedef struct script {
        step steps[16];
        size_t n;
} script;

static void script_add(script *s, const char *socket, const char *method, json_t *params)
{
        assert_true(s->n < 16);
        s->steps[s->n].socket = socket;
        s->steps[s->n].method = method;
        s->steps[s->n].params = params ? json_dumps(params, JSON_COMPACT) : strdup("{}");
        json_decref(params);
        assert_non_null(s->steps[s->n].params);
        s->n++;
}

static void script_free(script *s)
{
        for (size_t i = 0; i < s->n; i++)
                free(s->steps[i].params);
        s->n = 0;
}

/* In the child: each reply, compact, one a line. */
static int child_script(void *arg, char *out, size_t outmax)
{
        script *s = arg;
        size_t off = 0;

        for (size_t i = 0; i < s->n; i++) {
                hx_conn *c = NULL;
                json_t *root = NULL;
                char msg[16384], *text = NULL;
                int r;

                snprintf(msg, sizeof msg, "{\"method\":\"%s\",\"parameters\":%s}", s->steps[i].method,
                         s->steps[i].params);
                r = hx_conn_open(NULL, s->steps[i].socket, &c);
                if (r == 0)
                        r = hx_conn_call(c, msg, &root);
                hx_conn_close(NULL, c);
                if (r == 1)
                        text = json_dumps(root, JSON_COMPACT);
                json_decref(root);
                off += (size_t)snprintf(out + off, off < outmax ? outmax - off : 0, "%s\n",
                                        text ? text : "{\"error\":\"transport\"}");
                free(text);
                if (off >= outmax)
                        return 2;
        }
        return 0;
}

/* Run the script as uid in a forked child; an array of the replies. */
static json_t *run_script(script *s, uid_t uid)
{
        static char out[256 * 1024];
        int ex = -1;
        json_t *arr = json_array();
        char *save = NULL;

        assert_int_equal(hx_run_as(uid, uid, child_script, s, HX_RUN_TIMEOUT_MS, out, sizeof out, &ex), 0);
        assert_int_equal(ex, 0);
        for (char *line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                json_t *j = json_loads(line, 0, NULL);
                assert_non_null(j);
                json_array_append_new(arr, j);
        }
        assert_int_equal(json_array_size(arr), s->n);
        script_free(s);
        return arr;
}

static const char *err_or_ok(const json_t *root)
{
        return hx_reply_error(root) ? hx_reply_error(root) : "ok";
}

/* A token issued to a new process of uid (a forked child); *ret_root keeps the reply. */
static char *issue_as(hx_broker *b, uid_t uid, const char *aud, const char *scope, json_t **ret_root)
{
        script s = { 0 };
        json_t *arr, *root;
        char *t;

        script_add(&s, b->sock, M_ISSUE, issue_params(aud, scope, 0));
        arr = run_script(&s, uid);
        root = json_array_get(arr, 0);
        hx_assert_ok(root);
        t = strdup(hx_reply_str(root, "token"));
        if (ret_root)
                *ret_root = json_incref(root);
        json_decref(arr);
        return t;
}

/* ---- the CLI ------------------------------------------------------------------ */

static void ctl_expect(hx_run_result *res, int code)
{
        if (res->timed_out || res->exit_code != code)
                fprintf(stderr, "agent-brokerctl exit %d (want %d)\nstdout: %s\nstderr: %s\n", res->exit_code, code,
                        res->out, res->err);
        assert_false(res->timed_out);
        assert_int_equal(res->exit_code, code);
}

/* =============================================================================
 * Sessions and re-authentication
 * ============================================================================= */

/*
 * Real wall time: reauth_interval 2 s, token ttl 3 s. IssueToken works,
 * then after 2 s wants ReauthRequired; Authenticate moves auth_time (and
 * keeps the session); IssueToken works again; the 3 s token expires.
 */
static void test_wall_time_reauth_and_expiry(void **state)
{
        hx_broker *b = *state;
        json_t *r1, *r2, *root, *sess;
        char *t1, *t2;
        long long a0, a1, e1, created;
        const char *sid;
        hx_run_result res;

        start_with(b, "\"max_lifetime\": 60, \"reauth_interval\": 2", -1);
        hx_conn *c = hx_connect(b, b->sock);

        t1 = issue(c, AUD_GIT, "repo:read", NULL, 3, &r1);
        sid = hx_reply_str(r1, "sid");
        assert_non_null(sid);
        assert_int_equal(strlen(sid), 22);
        a0 = pint(r1, "auth_time");
        e1 = pint(r1, "expires_at");
        assert_int_equal(pint(r1, "expires_in"), 3);
        assert_int_equal(claim_int(t1, "exp"), e1);
        assert_int_equal(claim_int(t1, "auth_time"), a0);
        assert_string_equal(verdict(c, t1, NULL), "active");

        /* WhoAmI shows the session the first request opened */
        root = expect_ok(c, M_WHOAMI, NULL);
        sess = json_object_get(hx_reply_params(root), "session");
        assert_true(json_is_object(sess));
        assert_string_equal(json_string_value(json_object_get(sess, "sid")), sid);
        assert_int_equal(json_integer_value(json_object_get(sess, "reauth_before")), a0 + 2);
        created = json_integer_value(json_object_get(sess, "created"));
        assert_int_equal(created, a0);
        json_decref(root);

        /* 2 s after auth_time: ReauthRequired naming the session */
        wait_wall(a0 + 2);
        root = hx_rpc(c, M_ISSUE, issue_params(AUD_GIT, "repo:read", 3));
        hx_assert_error(root, "io.agentbroker.ReauthRequired");
        assert_string_equal(hx_reply_str(root, "sid"), sid);
        json_decref(root);
        root = expect_ok(c, M_WHOAMI, NULL);
        sess = json_object_get(hx_reply_params(root), "session");
        assert_string_equal(json_string_value(json_object_get(sess, "state")), "reauth_required");
        json_decref(root);
        /* the existing token is still good, except for a verifier that wants a fresh auth
         * (checked only while it has not expired: a stalled machine could pass e1 here) */
        if ((long long)time(NULL) < e1) {
                const char *v1 = verdict(c, t1, NULL);
                const char *v2 = verdict(c, t1, json_pack("{s:i}", "max_auth_age", 1));
                if ((long long)time(NULL) < e1) {
                        assert_string_equal(v1, "active");
                        assert_string_equal(v2, "auth_too_old");
                }
        }

        /* Authenticate: same session, auth_time moves, reauth_before with it */
        root = expect_ok(c, M_AUTH, NULL);
        assert_string_equal(hx_reply_str(root, "sid"), sid);
        assert_string_equal(hx_reply_str(root, "state"), "active");
        assert_string_equal(hx_reply_str(root, "agent"), AGENT_ID);
        a1 = pint(root, "auth_time");
        assert_true(a1 >= a0 + 2);
        assert_int_equal(pint(root, "created"), created);
        assert_int_equal(pint(root, "reauth_before"), a1 + 2);
        assert_int_equal(pint(root, "expires"), created + 60);
        json_decref(root);

        /* IssueToken works again and carries the new auth_time */
        t2 = issue(c, AUD_GIT, "repo:read", NULL, 3, &r2);
        assert_string_equal(hx_reply_str(r2, "sid"), sid);
        assert_int_equal(pint(r2, "auth_time"), a1);
        assert_int_equal(claim_int(t2, "auth_time"), a1);
        assert_string_equal(verdict(c, t2, json_pack("{s:i}", "max_auth_age", 1)), "active");

        /* the 3 s token expires in wall time; the newer one lives on */
        wait_wall(e1);
        assert_string_equal(verdict(c, t1, NULL), "expired");
        assert_string_equal(verdict_on(hx_connect(b, b->admin_sock), M_AINTRO, t1, NULL), "expired");
        assert_int_equal(hx_ctl(b, -1, &res, "introspect", t1, NULL), 0);
        ctl_expect(&res, 1);
        assert_non_null(strstr(res.out, "expired"));
        hx_run_result_done(&res);
        if ((long long)time(NULL) < pint(r2, "expires_at"))
                assert_string_equal(verdict(c, t2, NULL), "active");

        free(t1);
        free(t2);
        json_decref(r1);
        json_decref(r2);
}

static void reload(hx_broker *b)
{
        hx_conn *a = hx_connect(b, b->admin_sock);
        json_decref(expect_ok(a, "io.agentbroker.admin.ReloadPolicy", NULL));
}

static json_t *user_param(const char *user)
{
        return json_pack("{s:s}", "user", user);
}

#define G_PAM_DEPLOY "{\"audience\": \"" AUD_PAM "\", \"scopes\": [\"login\"], \"max_ttl\": 60, \"users\": [\"deploy\"]}"
#define G_PAM_NOBODY \
        "{\"audience\": \"" AUD_PAM "\", \"scopes\": [\"login\"], \"max_ttl\": 3600, \"users\": [\"nobody\"], " \
        "\"max_auth_age\": 30}"
#define G_GIT "{\"audience\": \"" AUD_GIT "\", \"scopes\": [\"repo:read\", \"repo:write\"], \"max_ttl\": 600}"

/*
 * A token is judged by the grant that issued it (its "grant" claim): with
 * two grants for the same service, a token that only the second could issue
 * (its ttl) gets the second's users and max_auth_age, and one from the first
 * the first's. A reload keeps tokens valid but never lets them in further:
 * with the grant removed, no user is allowed, not even the agent's own
 * (root); with it changed, the grants in force that could have issued the
 * token decide, the strictest of them.
 */
static void test_tokens_keep_their_grant(void **state)
{
        hx_broker *b = *state;
        char clock_path[PATH_MAX], *t_long, *t_short, *g_long, *g_short;
        hx_conn *c;

        use_test_clock(b, clock_path, sizeof clock_path);
        write_root_grants(b, "\"reauth_interval\": 3600", G_PAM_DEPLOY ", " G_PAM_NOBODY ", " G_GIT);
        hx_start(b);
        c = hx_connect(b, b->sock);
        t_long = issue(c, AUD_PAM, "login", NULL, 3600, NULL);
        t_short = issue(c, AUD_PAM, "login", NULL, 60, NULL);
        g_long = claim(t_long, "grant");
        g_short = claim(t_short, "grant");
        assert_int_equal(strlen(g_long), 16);
        assert_string_not_equal(g_long, g_short);
        free(g_long);
        free(g_short);

        assert_string_equal(verdict(c, t_long, user_param("deploy")), "user_not_allowed");
        assert_string_equal(verdict(c, t_long, user_param("nobody")), "active");
        assert_string_equal(verdict(c, t_short, user_param("deploy")), "active");
        assert_string_equal(verdict(c, t_short, user_param("nobody")), "user_not_allowed");
        hx_set_test_clock(clock_path, 31); /* past the second grant's max_auth_age only */
        assert_string_equal(verdict(c, t_long, NULL), "auth_too_old");
        assert_string_equal(verdict(c, t_short, NULL), "active");
        hx_set_test_clock(clock_path, 0);

        /* the first grant changed (users widened): t_short falls back to both grants, the strictest */
        write_root_grants(b, "\"reauth_interval\": 3600",
                          "{\"audience\": \"" AUD_PAM "\", \"scopes\": [\"login\"], \"max_ttl\": 60, "
                          "\"users\": [\"deploy\", \"nobody\"]}, " G_PAM_NOBODY ", " G_GIT);
        reload(b);
        assert_string_equal(verdict(c, t_short, NULL), "active");
        assert_string_equal(verdict(c, t_short, user_param("deploy")), "user_not_allowed");
        assert_string_equal(verdict(c, t_short, user_param("nobody")), "active");
        assert_string_equal(verdict(c, t_long, user_param("nobody")), "active"); /* its grant is unchanged */

        /* the second grant narrowed (max_ttl below t_long's lifetime, a 1 s max_auth_age): it still
         * judges t_long, which its max_ttl would no longer let it issue */
        write_root_grants(b, "\"reauth_interval\": 3600",
                          G_PAM_DEPLOY ", {\"audience\": \"" AUD_PAM "\", \"scopes\": [\"login\"], \"max_ttl\": 300, "
                          "\"users\": [\"nobody\"], \"max_auth_age\": 1}, " G_GIT);
        reload(b);
        hx_set_test_clock(clock_path, 3);
        assert_string_equal(verdict(c, t_long, NULL), "auth_too_old");
        hx_set_test_clock(clock_path, 0);

        /* both pam grants removed: the tokens stay valid, but let no user in */
        write_root_grants(b, "\"reauth_interval\": 3600", G_GIT);
        reload(b);
        assert_string_equal(verdict(c, t_long, NULL), "active");
        assert_string_equal(verdict(c, t_long, user_param("nobody")), "user_not_allowed");
        assert_string_equal(verdict(c, t_short, user_param("deploy")), "user_not_allowed");
        assert_string_equal(verdict(c, t_short, user_param("root")), "user_not_allowed");
        free(t_long);
        free(t_short);
}

/*
 * An unsigned source edited under the same version and then reverted to
 * its very bytes: the revert is taken (only a newer version makes a
 * content stale for good), and takes the access away again.
 */
static void test_unsigned_edit_reverted(void **state)
{
        hx_broker *b = *state;
        hx_conn *c;

        write_root_grants(b, NULL, "{\"audience\": \"" AUD_GIT "\", \"scopes\": [\"repo:read\"], \"max_ttl\": 600}");
        hx_start(b);
        c = hx_connect(b, b->sock);
        expect_error(c, M_ISSUE, issue_params(AUD_GIT, "repo:write", 0), "io.agentbroker.ScopeNotGranted");
        write_root_grants(b, NULL, G_GIT);
        reload(b);
        free(issue(c, AUD_GIT, "repo:write", NULL, 0, NULL));
        write_root_grants(b, NULL, "{\"audience\": \"" AUD_GIT "\", \"scopes\": [\"repo:read\"], \"max_ttl\": 600}");
        reload(b);
        expect_error(c, M_ISSUE, issue_params(AUD_GIT, "repo:write", 0), "io.agentbroker.ScopeNotGranted");
}

/*
 * Attenuate is a new request: after a reload that takes a scope away, a
 * child for it is refused (the parent stays valid); once reauth_interval has
 * passed, it asks for re-authentication as IssueToken does. The child
 * carries the parent's grant claim.
 */
static void test_attenuate_sees_policy_and_reauth(void **state)
{
        hx_broker *b = *state;
        char clock_path[PATH_MAX], *t, *g, *pg, *sid;
        hx_conn *c;
        json_t *root;

        use_test_clock(b, clock_path, sizeof clock_path);
        write_root_grants(b, "\"reauth_interval\": 120", G_GIT);
        hx_start(b);
        c = hx_connect(b, b->sock);
        t = issue(c, AUD_GIT, "repo:read", "repo:write", 0, NULL);
        root = expect_ok(c, M_ATT, json_pack("{s:s, s:[s]}", "token", t, "scopes", "repo:write"));
        g = claim(hx_reply_str(root, "token"), "grant");
        pg = claim(t, "grant");
        assert_string_equal(g, pg);
        json_decref(root);

        write_root_grants(b, "\"reauth_interval\": 120",
                          "{\"audience\": \"" AUD_GIT "\", \"scopes\": [\"repo:read\"], \"max_ttl\": 600}");
        reload(b);
        assert_string_equal(verdict(c, t, NULL), "active");
        expect_error(c, M_ATT, json_pack("{s:s, s:[s]}", "token", t, "scopes", "repo:write"),
                     "io.agentbroker.ScopeNotGranted");
        expect_error(c, M_ATT, jti_param("token", t), "io.agentbroker.ScopeNotGranted"); /* all its scopes */
        json_decref(expect_ok(c, M_ATT, json_pack("{s:s, s:[s]}", "token", t, "scopes", "repo:read")));

        hx_set_test_clock(clock_path, 121);
        root = hx_rpc(c, M_ATT, json_pack("{s:s, s:[s]}", "token", t, "scopes", "repo:read"));
        hx_assert_error(root, "io.agentbroker.ReauthRequired");
        sid = claim(t, "sid");
        assert_string_equal(hx_reply_str(root, "sid"), sid);
        free(sid);
        json_decref(root);
        json_decref(expect_ok(c, M_AUTH, NULL));
        json_decref(expect_ok(c, M_ATT, json_pack("{s:s, s:[s]}", "token", t, "scopes", "repo:read")));
        free(t);
        free(g);
        free(pg);
}

/*
 * The clock steps back a day: a session opened or authenticated while it
 * was ahead must authenticate again before it gets a token (its auth_time
 * proves nothing), and then counts its max_lifetime from now; a token whose
 * auth_time is ahead fails any max_auth_age; a cut-off revokes a session
 * opened "in the future".
 */
static void test_clock_step_back(void **state)
{
        hx_broker *b = *state;
        char clock_path[PATH_MAX], *t, *sid;
        long long now;
        hx_conn *c, *a;
        json_t *root, *list, *s;
        size_t i;
        int seen = 0;

        use_test_clock(b, clock_path, sizeof clock_path);
        start_with(b, "\"max_lifetime\": 7200, \"reauth_interval\": 3600", -1);
        c = hx_connect(b, b->sock);
        a = hx_connect(b, b->admin_sock);
        hx_set_test_clock(clock_path, 86400);
        t = issue(c, AUD_GIT, "repo:read", NULL, 0, NULL);
        sid = claim(t, "sid");
        free(t);
        hx_set_test_clock(clock_path, 0);
        now = (long long)time(NULL);

        root = hx_rpc(c, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_error(root, "io.agentbroker.ReauthRequired");
        assert_string_equal(hx_reply_str(root, "sid"), sid);
        json_decref(root);
        root = expect_ok(c, M_AUTH, NULL);
        assert_string_equal(hx_reply_str(root, "sid"), sid); /* the same session, authenticated again */
        assert_true(pint(root, "created") <= now + 2);
        assert_true(pint(root, "expires") <= now + 2 + 7200);
        assert_true(pint(root, "auth_time") <= now + 2);
        json_decref(root);
        t = issue(c, AUD_GIT, "repo:read", NULL, 0, NULL);
        assert_true(claim_int(t, "auth_time") <= now + 2);
        assert_string_equal(verdict(c, t, json_pack("{s:i}", "max_auth_age", 60)), "active");
        {
                /* the same token with an auth_time an hour ahead (signed with the broker's key) */
                keypair bk;
                json_t *cl = claims_of(t);
                char *ahead;
                broker_key(b, &bk);
                json_object_set_new(cl, "auth_time", json_integer(now + 3600));
                ahead = forge(&bk, SIG_ED25519, "EdDSA", bk.kid, cl);
                assert_string_equal(verdict(c, ahead, NULL), "active");
                assert_string_equal(verdict(c, ahead, json_pack("{s:i}", "max_auth_age", 60)), "auth_too_old");
                free(ahead);
                json_decref(cl);
        }
        free(t);

        /* a process that opens its session while the clock is ahead, then the clock steps back */
        hx_set_test_clock(clock_path, 86400);
        t = issue_as(b, HX_NOBODY_UID, AUD_GIT, "repo:read", NULL);
        free(t);
        hx_set_test_clock(clock_path, 0);
        now = (long long)time(NULL);
        json_decref(expect_ok(a, M_AREVOKE, json_pack("{s:I}", "before", (json_int_t)now)));
        root = expect_ok(a, M_ALIST, NULL);
        list = json_object_get(hx_reply_params(root), "sessions");
        json_array_foreach(list, i, s) {
                if (strcmp(json_string_value(json_object_get(s, "agent")), NOBODY_AGENT) != 0)
                        continue;
                assert_string_equal(json_string_value(json_object_get(s, "state")), "revoked");
                seen++;
        }
        assert_int_equal(seen, 1);
        json_decref(root);
        free(sid);
}

/* A broker on the test clock (offset 0), with a connection to each socket. */
static void start_clocked(hx_broker *b, char *clock_path, size_t max, hx_conn **c, hx_conn **a)
{
        use_test_clock(b, clock_path, max);
        start_with(b, NULL, -1);
        *c = hx_connect(b, b->sock);
        *a = hx_connect(b, b->admin_sock);
}

/* Stop cleanly and start again (same state), with new connections. */
static void restart_clocked(hx_broker *b, hx_conn **c, hx_conn **a)
{
        hx_conn_close(b, *c);
        hx_conn_close(b, *a);
        hx_stop_clean(b);
        hx_start(b);
        *c = hx_connect(b, b->sock);
        *a = hx_connect(b, b->admin_sock);
}

/*
 * A step back within the clock leeway (5 s): a session opened while the
 * clock was 3 s ahead is still "in the future" for `revoke --before now`,
 * which now revokes it. Before, the sweep left sessions up to now + 5 s
 * alone, and both the session and its token stayed valid after the
 * revocation was acknowledged (helper-43).
 */
static void test_small_step_back_revoked(void **state)
{
        hx_broker *b = *state;
        char clock_path[PATH_MAX], *t;
        long long now;
        hx_conn *c, *a;

        start_clocked(b, clock_path, sizeof clock_path, &c, &a);
        hx_set_test_clock(clock_path, 3);
        t = issue(c, AUD_GIT, "repo:read", NULL, 0, NULL);
        hx_set_test_clock(clock_path, 0);
        now = (long long)time(NULL);
        assert_string_equal(verdict(c, t, NULL), "active");
        /* what `revoke --before now` sends: the next second */
        json_decref(expect_ok(a, M_AREVOKE, json_pack("{s:I}", "before", (json_int_t)now + 1)));
        if (strcmp(verdict(c, t, NULL), "revoked") != 0)
                fprintf(stderr, "GAP: a token of a session opened 3 s \"in the future\" is %s after revoke --before now\n",
                        verdict(c, t, NULL));
        assert_string_equal(verdict(c, t, NULL), "revoked");
        free(t);
}

/*
 * A key ended at once by a forced rotation (a leaked key) stays ended when
 * the clock steps back: before, it verified again, and was published in
 * GetKeys, for as long as the clock stood behind the rotation (helper-43).
 */
static void test_ended_key_stays_ended(void **state)
{
        hx_broker *b = *state;
        char clock_path[PATH_MAX], *t, *kid;
        hx_conn *c, *a;
        json_t *root;

        start_clocked(b, clock_path, sizeof clock_path, &c, &a);
        t = issue(c, AUD_GIT, "repo:read", NULL, 0, NULL);
        {
                json_t *h = hx_jwt_segment_json(t, 0);
                kid = strdup(json_string_value(json_object_get(h, "kid")));
                json_decref(h);
        }
        json_decref(expect_ok(a, "io.agentbroker.admin.RotateKey", json_pack("{s:i, s:b}", "overlap", 0, "force", 1)));
        assert_string_equal(verdict(c, t, NULL), "unknown_key");
        for (int restart = 0; restart < 2; restart++) {
                hx_set_test_clock(clock_path, -3);
                if (strcmp(verdict(c, t, NULL), "unknown_key") != 0)
                        fprintf(stderr, "GAP: a key ended by a forced rotation verifies again 3 s back%s: %s\n",
                                restart ? " after a restart" : "", verdict(c, t, NULL));
                assert_string_equal(verdict(c, t, NULL), "unknown_key");
                root = hx_call(c, "{\"method\":\"io.agentbroker.GetKeys\"}");
                hx_assert_ok(root);
                char *jwks = json_dumps(hx_reply_params(root), JSON_COMPACT);
                assert_non_null(jwks);
                assert_null(strstr(jwks, kid)); /* not published */
                free(jwks);
                json_decref(root);
                if (restart)
                        break;
                /* after a restart too: its stored end is not after its retirement */
                hx_set_test_clock(clock_path, 0);
                restart_clocked(b, &c, &a);
        }
        free(kid);
        free(t);
}

/*
 * A key whose overlap ran out stays ended after a restart with the clock
 * behind its end (the policy's tokens live 600 s at most: an overlap of
 * 700 s), whether the broker saw it end while running or was stopped
 * then: before, only a forced end was stored, and the retired key
 * verified (and was published) again (helper-48).
 */
static void test_ran_out_key_stays_ended(void **state)
{
        hx_broker *b = *state;
        char clock_path[PATH_MAX], *t[2];
        hx_conn *c, *a;

        start_clocked(b, clock_path, sizeof clock_path, &c, &a);
        for (int stopped = 0; stopped < 2; stopped++) {
                hx_set_test_clock(clock_path, 0);
                t[stopped] = issue(c, AUD_GIT, "repo:read", NULL, 0, NULL);
                json_decref(expect_ok(a, "io.agentbroker.admin.RotateKey", json_pack("{s:i}", "overlap", 700)));
                assert_string_equal(verdict(c, t[stopped], NULL), "active");
                if (stopped) { /* the overlap runs out while the broker is stopped */
                        hx_conn_close(b, c);
                        hx_conn_close(b, a);
                        hx_stop_clean(b);
                        hx_set_test_clock(clock_path, 800);
                        hx_start(b);
                        c = hx_connect(b, b->sock);
                        a = hx_connect(b, b->admin_sock);
                        /* start-up found it ended and stored that: the running broker holds to it
                         * too, though nothing looked the key up while the clock was ahead */
                        hx_set_test_clock(clock_path, 0);
                        if (strcmp(verdict(c, t[stopped], NULL), "unknown_key") != 0)
                                fprintf(stderr, "GAP: stored as ended at start, the key verifies 800 s back: %s\n",
                                        verdict(c, t[stopped], NULL));
                } else {
                        hx_set_test_clock(clock_path, 800);
                }
                assert_string_equal(verdict(c, t[stopped], NULL), "unknown_key");
                hx_set_test_clock(clock_path, 0);
                restart_clocked(b, &c, &a);
                if (strcmp(verdict(c, t[stopped], NULL), "unknown_key") != 0)
                        fprintf(stderr, "GAP: a key that ran out%s verifies again after a restart 800 s back: %s\n",
                                stopped ? " while the broker was stopped" : "", verdict(c, t[stopped], NULL));
                assert_string_equal(verdict(c, t[stopped], NULL), "unknown_key");
        }
        free(t[0]);
        free(t[1]);
}

/*
 * ... and a clock that ran ahead for a moment does not end the overlap of a
 * later rotation: with one "latest time seen" for all keys, a GetKeys while
 * the clock was a day ahead made every later rotation end its old key at
 * once, also after a restart (helper-46).
 */
static void test_clock_ahead_keeps_later_overlaps(void **state)
{
        hx_broker *b = *state;
        char clock_path[PATH_MAX], *t;
        hx_conn *c, *a;
        json_t *root;

        start_clocked(b, clock_path, sizeof clock_path, &c, &a);
        hx_set_test_clock(clock_path, 86400);
        root = hx_call(c, "{\"method\":\"io.agentbroker.GetKeys\"}");
        hx_assert_ok(root);
        json_decref(root);
        hx_set_test_clock(clock_path, 0);
        t = issue(c, AUD_GIT, "repo:read", NULL, 0, NULL);
        json_decref(expect_ok(a, "io.agentbroker.admin.RotateKey", json_pack("{s:i}", "overlap", 7200)));
        if (strcmp(verdict(c, t, NULL), "active") != 0)
                fprintf(stderr, "GAP: a rotation with an overlap ended the old key at once: %s\n", verdict(c, t, NULL));
        assert_string_equal(verdict(c, t, NULL), "active");
        restart_clocked(b, &c, &a);
        assert_string_equal(verdict(c, t, NULL), "active"); /* and after a restart */
        free(t);
}

/*
 * max_lifetime (the broker's clock moved by the test clock: policy allows
 * no lifetime under 60 s). Token exp is capped by the session's expiry; a
 * tightened policy applies at once; after expiry IssueToken says
 * SessionExpired, older tokens are inactive, and Authenticate opens a new
 * session.
 */
static void test_session_lifetime_caps_tokens(void **state)
{
        hx_broker *b = *state;
        char clock_path[PATH_MAX], *t_cap, *t_100, *t_cap2, *t_new;
        json_t *auth, *r, *root, *list;
        long long created, expires;
        hx_conn *c, *a;
        const char *sid;
        size_t i;
        json_t *s;

        use_test_clock(b, clock_path, sizeof clock_path);
        start_with(b, "\"max_lifetime\": 120, \"reauth_interval\": 3600", -1);
        c = hx_connect(b, b->sock);
        a = hx_connect(b, b->admin_sock);

        auth = expect_ok(c, M_AUTH, NULL);
        sid = hx_reply_str(auth, "sid");
        created = pint(auth, "created");
        expires = pint(auth, "expires");
        assert_int_equal(expires, created + 120);
        assert_int_equal(pint(auth, "reauth_before"), expires); /* capped by expires */

        /* ttl 600 is granted, but the token ends with the session */
        t_cap = issue(c, AUD_GIT, "repo:read", NULL, 600, &r);
        assert_int_equal(pint(r, "expires_at"), expires);
        assert_true(pint(r, "expires_in") <= 120);
        assert_int_equal(claim_int(t_cap, "exp"), expires);
        json_decref(r);
        t_100 = issue(c, AUD_GIT, "repo:read", NULL, 100, &r);
        assert_true(pint(r, "expires_at") < expires);
        json_decref(r);

        /* tighten max_lifetime to 60 s: effective at once */
        write_policy(b, "\"max_lifetime\": 60, \"reauth_interval\": 3600", -1);
        root = expect_ok(a, "io.agentbroker.admin.ReloadPolicy", NULL);
        json_decref(root);
        t_cap2 = issue(c, AUD_GIT, "repo:read", NULL, 600, &r);
        assert_int_equal(pint(r, "expires_at"), created + 60);
        json_decref(r);

        /* 61 s later by the broker's clock */
        hx_set_test_clock(clock_path, 61);
        root = hx_rpc(c, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_error(root, "io.agentbroker.SessionExpired");
        assert_string_equal(hx_reply_str(root, "sid"), sid);
        json_decref(root);
        assert_string_equal(verdict(c, t_cap2, NULL), "expired");
        /* exp (created + 100) is still ahead, but the session ended at created + 60 */
        assert_string_equal(verdict(c, t_100, NULL), "session_ended");
        assert_string_equal(verdict(c, t_cap, NULL), "session_ended");

        /* Authenticate opens a new session */
        root = expect_ok(c, M_AUTH, NULL);
        assert_string_not_equal(hx_reply_str(root, "sid"), sid);
        assert_true(pint(root, "created") >= created + 61);
        assert_int_equal(pint(root, "expires"), pint(root, "created") + 60);
        t_new = issue(c, AUD_GIT, "repo:read", NULL, 0, &r);
        assert_string_equal(hx_reply_str(r, "sid"), hx_reply_str(root, "sid"));
        assert_string_equal(verdict(c, t_new, NULL), "active");
        json_decref(r);

        /* the list shows the old one expired and the new one active */
        r = expect_ok(a, M_ALIST, NULL);
        list = json_object_get(hx_reply_params(r), "sessions");
        int seen = 0;
        json_array_foreach(list, i, s) {
                const char *ss = json_string_value(json_object_get(s, "sid"));
                if (strcmp(ss, sid) == 0) {
                        assert_string_equal(json_string_value(json_object_get(s, "state")), "expired");
                        seen++;
                } else if (strcmp(ss, hx_reply_str(root, "sid")) == 0) {
                        assert_string_equal(json_string_value(json_object_get(s, "state")), "active");
                        seen++;
                }
        }
        assert_int_equal(seen, 2);
        json_decref(r);
        json_decref(root);
        json_decref(auth);
        free(t_cap);
        free(t_100);
        free(t_cap2);
        free(t_new);
}

/* Expired sessions are purged (at start-up): an expired one goes, a live one stays. */
static void test_expired_sessions_purged(void **state)
{
        hx_broker *b = *state;
        char clock_path[PATH_MAX], *t_old, *t_live;
        json_t *auth, *child, *r, *list, *s;
        hx_conn *c, *a;
        size_t i;
        bool old_seen = false, live_seen = false;

        use_test_clock(b, clock_path, sizeof clock_path);
        start_with(b, "\"max_lifetime\": 60, \"reauth_interval\": 3600", -1);
        c = hx_connect(b, b->sock);
        auth = expect_ok(c, M_AUTH, NULL);
        t_old = issue(c, AUD_GIT, "repo:read", NULL, 0, NULL);

        /* 30 s on, another process opens a session that lives until +90 */
        hx_set_test_clock(clock_path, 30);
        t_live = issue_as(b, 0, AUD_GIT, "repo:read", &child);
        assert_string_not_equal(hx_reply_str(child, "sid"), hx_reply_str(auth, "sid"));

        /* at +61 the first is expired; a restart purges it */
        hx_set_test_clock(clock_path, 61);
        restart(b, false);
        a = hx_connect(b, b->admin_sock);
        r = expect_ok(a, M_ALIST, NULL);
        list = json_object_get(hx_reply_params(r), "sessions");
        json_array_foreach(list, i, s) {
                const char *sid = json_string_value(json_object_get(s, "sid"));
                old_seen |= strcmp(sid, hx_reply_str(auth, "sid")) == 0;
                live_seen |= strcmp(sid, hx_reply_str(child, "sid")) == 0;
        }
        assert_false(old_seen);
        assert_true(live_seen);
        json_decref(r);
        c = hx_connect(b, b->sock);
        assert_string_not_equal(verdict(c, t_old, NULL), "active");
        assert_string_equal(verdict(c, t_live, NULL), "active");

        json_decref(auth);
        json_decref(child);
        free(t_old);
        free(t_live);
}

/* Each process has its own session: this one, forked children, CLI invocations, the helper. */
static void test_other_process_own_session(void **state)
{
        hx_broker *b = *state;
        json_t *mine, *again, *arr, *r, *list, *s;
        script sc = { 0 };
        hx_run_result res;
        const char *sid;
        char *cli1 = NULL, *cli2 = NULL;
        size_t i;
        int mine_listed = 0;

        start_with(b, NULL, -1);
        hx_conn *c = hx_connect(b, b->sock);
        mine = expect_ok(c, M_AUTH, NULL);
        sid = hx_reply_str(mine, "sid");
        assert_int_equal(pint(mine, "pid"), getpid());

        /* a second connection of the same process: the same session */
        hx_conn *c2 = hx_connect(b, b->sock);
        again = expect_ok(c2, M_AUTH, NULL);
        assert_string_equal(hx_reply_str(again, "sid"), sid);
        json_decref(again);

        /* a forked child (same uid, same executable): no session before its first request,
         * then its own, twice the same */
        script_add(&sc, b->sock, M_WHOAMI, NULL);
        script_add(&sc, b->sock, M_AUTH, NULL);
        script_add(&sc, b->sock, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        script_add(&sc, b->sock, M_AUTH, NULL);
        arr = run_script(&sc, 0);
        for (i = 0; i < 4; i++)
                hx_assert_ok(json_array_get(arr, i));
        assert_true(json_is_null(json_object_get(hx_reply_params(json_array_get(arr, 0)), "session")));
        json_array_remove(arr, 0);
        const char *csid = hx_reply_str(json_array_get(arr, 0), "sid");
        assert_string_not_equal(csid, sid);
        assert_string_equal(hx_reply_str(json_array_get(arr, 1), "sid"), csid);
        assert_string_equal(hx_reply_str(json_array_get(arr, 2), "sid"), csid);
        assert_int_not_equal(pint(json_array_get(arr, 0), "pid"), getpid());

        /* two CLI invocations: two more sessions */
        for (int k = 0; k < 2; k++) {
                json_t *j;
                assert_int_equal(hx_ctl(b, -1, &res, "authenticate", NULL), 0);
                ctl_expect(&res, 0);
                j = json_loads(res.out, 0, NULL);
                assert_non_null(j);
                assert_string_equal(json_string_value(json_object_get(j, "agent")), AGENT_ID);
                if (k == 0)
                        cli1 = strdup(json_string_value(json_object_get(j, "sid")));
                else
                        cli2 = strdup(json_string_value(json_object_get(j, "sid")));
                json_decref(j);
                hx_run_result_done(&res);
        }
        assert_string_not_equal(cli1, cli2);
        assert_string_not_equal(cli1, sid);
        assert_string_not_equal(cli1, csid);

        /* this process still has its first session */
        again = expect_ok(c, M_AUTH, NULL);
        assert_string_equal(hx_reply_str(again, "sid"), sid);
        json_decref(again);

        /* ListSessions (agent socket): this agent's sessions of this uid, at least these four */
        r = expect_ok(c, M_LIST, NULL);
        list = json_object_get(hx_reply_params(r), "sessions");
        assert_true(json_array_size(list) >= 4);
        json_array_foreach(list, i, s) {
                assert_string_equal(json_string_value(json_object_get(s, "agent")), AGENT_ID);
                assert_int_equal(json_integer_value(json_object_get(s, "uid")), 0);
                assert_true(json_is_array(json_object_get(s, "pam")));
                if (strcmp(json_string_value(json_object_get(s, "sid")), sid) == 0) {
                        mine_listed++;
                        assert_int_equal(json_integer_value(json_object_get(s, "pid")), getpid());
                        assert_string_equal(json_string_value(json_object_get(s, "state")), "active");
                }
        }
        assert_int_equal(mine_listed, 1);
        json_decref(r);

        json_decref(arr);
        json_decref(mine);
        free(cli1);
        free(cli2);
}

/*
 * A process that exec's another program keeps its pid and start time but
 * not its executable: the new image must not inherit the session without
 * proving itself (ReauthRequired).
 */
static void test_exec_needs_reauth(void **state)
{
        hx_broker *b = *state;
        agent_proc *p;
        json_t *r;
        char cmd[2 * PATH_MAX], helper[PATH_MAX], *line;
        char sid[32];

        start_with(b, NULL, -1);
        p = agent_spawn(b, -1);
        agent_ready(p);
        r = agent_rpc(p, M_AUTH, NULL);
        hx_assert_ok(r);
        snprintf(sid, sizeof sid, "%s", hx_reply_str(r, "sid"));
        assert_int_equal(pint(r, "pid"), p->pid);
        json_decref(r);
        r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_ok(r);
        assert_string_equal(hx_reply_str(r, "sid"), sid);
        json_decref(r);

        assert_int_equal(hx_build_path("tests/helper-issue", helper, sizeof helper), 0);
        snprintf(cmd, sizeof cmd, "exec %s %s %s repo:read\n", helper, b->sock, AUD_GIT);
        agent_send(p, cmd);
        line = agent_line(p, HX_RUN_TIMEOUT_MS);
        assert_non_null(line);
        if (strncmp(line, "ERR io.agentbroker.ReauthRequired", 33) != 0)
                fprintf(stderr, "after exec: %s\n", line);
        assert_memory_equal(line, "ERR io.agentbroker.ReauthRequired", 33);
        free(line);
}

static void agent_grow(agent_proc *p, int mb)
{
        char cmd[64], *line;
        snprintf(cmd, sizeof cmd, "grow %d\n", mb);
        agent_send(p, cmd);
        line = agent_line(p, HX_RUN_TIMEOUT_MS);
        assert_non_null(line);
        assert_string_equal(line, "OK");
        free(line);
}

/*
 * "Authenticate ... the same agent entry must still match and the
 * executable hash must be unchanged, otherwise the old session ends and a
 * new one opens" (docs/protocol.md). A process exec's a copy of the helper
 * with another SHA-256; it must re-authenticate, gets a new session, and
 * the tokens of the old session are no longer active.
 */
static void test_exec_then_authenticate_ends_old_session(void **state)
{
        hx_broker *b = *state;
        char helper[PATH_MAX], copy[PATH_MAX], cmd[3 * PATH_MAX], *bin = NULL, *line, sid[32], *t_old;
        size_t n = 0;
        agent_proc *p;
        json_t *r;
        hx_conn *c;
        int fd;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        assert_int_equal(hx_build_path("tests/helper-agent", helper, sizeof helper), 0);
        snprintf(copy, sizeof copy, "%s/helper-agent-copy", b->dir);
        assert_int_equal(hx_read_file(helper, 64 << 20, &bin, &n), 0);
        fd = open(copy, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, bin, n), (ssize_t)n);
        assert_int_equal(write(fd, "\n", 1), 1); /* another SHA-256, the same program */
        assert_int_equal(close(fd), 0);
        free(bin);

        p = agent_spawn(b, -1);
        agent_ready(p);
        r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 600));
        hx_assert_ok(r);
        snprintf(sid, sizeof sid, "%s", hx_reply_str(r, "sid"));
        t_old = strdup(hx_reply_str(r, "token"));
        json_decref(r);

        snprintf(cmd, sizeof cmd, "exec %s %s\n", copy, b->sock);
        agent_send(p, cmd);
        line = agent_line(p, HX_RUN_TIMEOUT_MS);
        assert_non_null(line);
        assert_memory_equal(line, "READY ", 6);
        assert_int_equal(atoi(line + 6), p->pid); /* the same process */
        free(line);
        r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_error(r, "io.agentbroker.ReauthRequired");
        json_decref(r);
        r = agent_rpc(p, M_AUTH, NULL);
        hx_assert_ok(r);
        assert_string_not_equal(hx_reply_str(r, "sid"), sid);
        assert_non_null(strstr(hx_reply_str(r, "exe"), "helper-agent-copy"));
        json_decref(r);
        r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_ok(r);
        json_decref(r);

        const char *v = verdict(c, t_old, NULL);
        if (strcmp(v, "active") == 0)
                fprintf(stderr, "session %s was replaced after exec + Authenticate, yet its token is active\n", sid);
        assert_string_not_equal(v, "active");
        free(t_old);
}

/*
 * A revoked session stays bound to its process: "that process gets
 * SessionRevoked". Also once the session's lifetime is over and the
 * purge (at start-up) removed the record.
 */
static void test_revoked_process_stays_revoked_after_purge(void **state)
{
        hx_broker *b = *state;
        char clock_path[PATH_MAX], sid[32];
        agent_proc *p;
        json_t *r;

        use_test_clock(b, clock_path, sizeof clock_path);
        start_with(b, "\"max_lifetime\": 60", -1);
        p = agent_spawn(b, -1);
        agent_ready(p);
        r = agent_rpc(p, M_AUTH, NULL);
        hx_assert_ok(r);
        snprintf(sid, sizeof sid, "%s", hx_reply_str(r, "sid"));
        json_decref(r);
        r = agent_rpc(p, M_REVOKE, jti_param("sid", sid));
        hx_assert_ok(r);
        json_decref(r);
        r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_error(r, "io.agentbroker.SessionRevoked");
        json_decref(r);

        hx_set_test_clock(clock_path, 61);
        r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_error(r, "io.agentbroker.SessionRevoked");
        json_decref(r);
        restart(b, false); /* purges the expired session record */
        r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        if (!hx_reply_error(r))
                fprintf(stderr, "after the purge the revoked process got session %s\n", hx_reply_str(r, "sid"));
        hx_assert_error(r, "io.agentbroker.SessionRevoked");
        json_decref(r);

        /* once the process is gone, the next purge drops the record: nothing grows for ever */
        {
                int st;
                hx_conn *a;
                json_t *root, *sess;
                size_t i;
                bool found = false;
                assert_int_equal(kill(p->pid, SIGKILL), 0);
                assert_int_equal(waitpid(p->pid, &st, 0), p->pid);
                p->pid = 0;
                restart(b, false);
                a = hx_connect(b, b->admin_sock);
                root = hx_rpc(a, M_ALIST, NULL);
                hx_assert_ok(root);
                json_array_foreach(json_object_get(hx_reply_params(root), "sessions"), i, sess)
                        found |= strcmp(json_string_value(json_object_get(sess, "sid")), sid) == 0;
                json_decref(root);
                assert_false(found);
        }
}

/*
 * A session is bound to the process (pid and start time), so a process
 * whose session was revoked stays refused, however its memory use
 * changes: mapping more memory must not buy it a new session.
 */
static void test_revoked_process_stays_revoked(void **state)
{
        hx_broker *b = *state;
        agent_proc *p;
        json_t *r;
        char sid[32];
        hx_conn *a;

        start_with(b, NULL, -1);
        a = hx_connect(b, b->admin_sock);
        p = agent_spawn(b, -1);
        agent_ready(p);
        r = agent_rpc(p, M_AUTH, NULL);
        hx_assert_ok(r);
        snprintf(sid, sizeof sid, "%s", hx_reply_str(r, "sid"));
        json_decref(r);
        r = expect_ok(a, M_AREVOKE, jti_param("sid", sid));
        json_decref(r);
        r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_error(r, "io.agentbroker.SessionRevoked");
        json_decref(r);

        agent_grow(p, 64);
        r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        if (!hx_reply_error(r))
                fprintf(stderr, "a revoked process got a token in session %s (its session was %s) after mapping "
                                "64 MiB\n", hx_reply_str(r, "sid"), sid);
        hx_assert_error(r, "io.agentbroker.SessionRevoked");
        json_decref(r);
        r = agent_rpc(p, M_AUTH, NULL);
        hx_assert_error(r, "io.agentbroker.SessionRevoked");
        json_decref(r);
}

/* Likewise ReauthRequired cannot be skipped by changing the process's memory use. */
static void test_reauth_cannot_be_skipped(void **state)
{
        hx_broker *b = *state;
        char clock_path[PATH_MAX], sid[32];
        agent_proc *p;
        json_t *r;

        use_test_clock(b, clock_path, sizeof clock_path);
        start_with(b, "\"max_lifetime\": 3600, \"reauth_interval\": 60", -1);
        p = agent_spawn(b, -1);
        agent_ready(p);
        r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_ok(r);
        snprintf(sid, sizeof sid, "%s", hx_reply_str(r, "sid"));
        json_decref(r);
        hx_set_test_clock(clock_path, 61);
        r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_error(r, "io.agentbroker.ReauthRequired");
        json_decref(r);

        agent_grow(p, 64);
        r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        if (!hx_reply_error(r))
                fprintf(stderr, "re-authentication skipped: a token in session %s (the process's session was %s) "
                                "after mapping 64 MiB\n", hx_reply_str(r, "sid"), sid);
        hx_assert_error(r, "io.agentbroker.ReauthRequired");
        json_decref(r);
        r = agent_rpc(p, M_AUTH, NULL);
        hx_assert_ok(r);
        assert_string_equal(hx_reply_str(r, "sid"), sid);
        json_decref(r);
}

/*
 * Sessions live in LMDB: across a SIGTERM restart and a kill -9, this
 * process and a long-lived helper keep their sessions, and tokens issued
 * before still introspect active (also a revocation and a nobody session).
 */
static void test_sessions_survive_restart(void **state)
{
        hx_broker *b = *state;
        agent_proc *h, *hn;
        json_t *mine, *r;
        char *t, *t_rev, *ht, sid[32], hsid[32], nsid[32];
        long long created;
        hx_conn *c;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        mine = expect_ok(c, M_AUTH, NULL);
        snprintf(sid, sizeof sid, "%s", hx_reply_str(mine, "sid"));
        created = pint(mine, "created");
        json_decref(mine);
        t = issue(c, AUD_GIT, "repo:read", "repo:write", 600, NULL);
        t_rev = issue(c, AUD_GIT, "repo:read", NULL, 600, NULL);
        r = expect_ok(c, M_REVOKE, jti_param("token", t_rev));
        json_decref(r);

        h = agent_spawn(b, -1);
        agent_ready(h);
        r = agent_rpc(h, M_ISSUE, issue_params(AUD_GIT, "repo:read", 600));
        hx_assert_ok(r);
        snprintf(hsid, sizeof hsid, "%s", hx_reply_str(r, "sid"));
        ht = strdup(hx_reply_str(r, "token"));
        json_decref(r);
        assert_string_not_equal(hsid, sid);

        hn = agent_spawn(b, HX_NOBODY_UID);
        agent_ready(hn);
        r = agent_rpc(hn, M_AUTH, NULL);
        hx_assert_ok(r);
        assert_string_equal(hx_reply_str(r, "agent"), NOBODY_AGENT);
        snprintf(nsid, sizeof nsid, "%s", hx_reply_str(r, "sid"));
        json_decref(r);

        for (int round = 0; round < 2; round++) {
                restart(b, round == 1); /* SIGTERM, then kill -9 */
                c = hx_connect(b, b->sock);
                assert_string_equal(verdict(c, t, NULL), "active");
                assert_string_equal(verdict(c, ht, NULL), "active");
                assert_string_equal(verdict(c, t_rev, NULL), "revoked");

                mine = expect_ok(c, M_AUTH, NULL);
                assert_string_equal(hx_reply_str(mine, "sid"), sid);
                assert_int_equal(pint(mine, "created"), created);
                json_decref(mine);
                char *t3 = issue(c, AUD_GIT, "repo:read", NULL, 0, &r);
                assert_string_equal(hx_reply_str(r, "sid"), sid);
                json_decref(r);
                free(t3);

                r = agent_rpc(h, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
                hx_assert_ok(r);
                assert_string_equal(hx_reply_str(r, "sid"), hsid);
                json_decref(r);
                r = agent_rpc(hn, M_AUTH, NULL);
                hx_assert_ok(r);
                assert_string_equal(hx_reply_str(r, "sid"), nsid);
                json_decref(r);
        }
        free(t);
        free(t_rev);
        free(ht);
}

/* =============================================================================
 * Introspection
 * ============================================================================= */

/* Active: the claims at top level, on the agent socket, the admin socket, and by another uid. */
static void test_introspect_active_claims(void **state)
{
        hx_broker *b = *state;
        json_t *ir, *root, *p, *arr;
        script sc = { 0 };
        char *t, *jti;
        hx_conn *c, *a;
        hx_run_result res;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        a = hx_connect(b, b->admin_sock);
        json_t *pp = json_pack("{s:s, s:[s,s], s:i, s:s}", "audience", AUD_GIT, "scopes", "repo:read", "repo:write",
                               "ttl", 120, "task", "TASK-7");
        ir = expect_ok(c, M_ISSUE, pp);
        t = strdup(hx_reply_str(ir, "token"));
        jti = strdup(hx_reply_str(ir, "jti"));
        assert_int_equal(strlen(jti), 43);

        root = expect_ok(c, M_INTRO, json_pack("{s:s, s:s, s:s, s:i}", "token", t, "audience", AUD_GIT, "scope",
                                               "repo:write", "max_auth_age", 3600));
        p = hx_reply_params(root);
        assert_true(json_is_true(json_object_get(p, "active")));
        assert_string_equal(json_string_value(json_object_get(p, "token_type")), "Bearer");
        assert_string_equal(json_string_value(json_object_get(p, "sub")), AGENT_ID);
        assert_string_equal(json_string_value(json_object_get(p, "client_id")), AGENT_ID);
        assert_string_equal(json_string_value(json_object_get(p, "aud")), AUD_GIT);
        assert_string_equal(json_string_value(json_object_get(p, "scope")), "repo:read repo:write");
        assert_string_equal(json_string_value(json_object_get(p, "owner")), OWNER);
        assert_string_equal(json_string_value(json_object_get(p, "task")), "TASK-7");
        assert_string_equal(json_string_value(json_object_get(p, "jti")), jti);
        assert_string_equal(json_string_value(json_object_get(p, "sid")), hx_reply_str(ir, "sid"));
        assert_int_equal(json_integer_value(json_object_get(p, "auth_time")), pint(ir, "auth_time"));
        assert_int_equal(json_integer_value(json_object_get(p, "exp")), pint(ir, "expires_at"));
        assert_true(json_is_integer(json_object_get(p, "iat")));
        assert_true(json_is_integer(json_object_get(p, "nbf")));
        assert_true(json_is_string(json_object_get(p, "iss")));
        assert_null(json_object_get(p, "act"));
        assert_null(json_object_get(p, "parent"));
        json_decref(root);

        /* the jti names its session: its first 16 bytes are the sid's */
        uint8_t raw_j[32], raw_s[16];
        size_t nj = 0, ns = 0;
        assert_int_equal(ab_b64url_decode(jti, 43, raw_j, sizeof raw_j, &nj), 0);
        assert_int_equal(ab_b64url_decode(hx_reply_str(ir, "sid"), 22, raw_s, sizeof raw_s, &ns), 0);
        assert_int_equal(nj, 32);
        assert_memory_equal(raw_j, raw_s, 16);

        /* the same on the admin socket, both method names */
        assert_string_equal(verdict_on(a, M_AINTRO, t, NULL), "active");
        assert_string_equal(verdict_on(a, M_INTRO, t, NULL), "active");

        /* any local process may ask, even one that is no agent */
        script_add(&sc, b->sock, M_INTRO, json_pack("{s:s, s:s}", "token", t, "service", "pam:sshd"));
        arr = run_script(&sc, 1);
        hx_assert_ok(json_array_get(arr, 0));
        assert_true(json_is_true(json_object_get(hx_reply_params(json_array_get(arr, 0)), "active")));
        json_decref(arr);

        /* the CLI: exit 0 for active, the verdict as JSON */
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "introspect", t, "--audience", AUD_GIT, "--scope",
                                "repo:read", "--max-auth-age", "600", NULL), 0);
        ctl_expect(&res, 0);
        root = json_loads(res.out, 0, NULL);
        assert_non_null(root);
        assert_true(json_is_true(json_object_get(root, "active")));
        assert_string_equal(json_string_value(json_object_get(root, "jti")), jti);
        json_decref(root);
        hx_run_result_done(&res);
        assert_int_equal(hx_ctl(b, -1, &res, "introspect", t, "--audience", AUD_TICKETS, NULL), 0);
        ctl_expect(&res, 1);
        assert_non_null(strstr(res.out, "wrong_audience"));
        hx_run_result_done(&res);

        json_decref(ir);
        free(t);
        free(jti);
}

/* bad_signature and unknown_key: tampering, alg confusion, foreign keys, junk. */
static void test_introspect_forgeries(void **state)
{
        hx_broker *b = *state;
        keypair bk, other;
        json_t *cl;
        char *t, *x;
        hx_conn *c;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        t = issue(c, AUD_GIT, "repo:read", NULL, 600, NULL);
        broker_key(b, &bk);
        random_key(&other);
        cl = claims_of(t);
        {
                /* our forge() with the broker's key reproduces a valid token */
                char *same = forge(&bk, SIG_ED25519, "EdDSA", bk.kid, cl);
                assert_string_equal(verdict(c, same, NULL), "active");
                free(same);
        }

        /* one altered byte in the payload, in the signature */
        x = hx_jwt_tamper(t, 1);
        assert_string_equal(verdict(c, x, NULL), "bad_signature");
        free(x);
        x = hx_jwt_tamper(t, 2);
        assert_string_equal(verdict(c, x, NULL), "bad_signature");
        free(x);
        /* a payload claiming a wider scope, signature kept */
        {
                json_t *w = json_deep_copy(cl);
                json_object_set_new(w, "scope", json_string("repo:read repo:write"));
                char *f = forge(&other, SIG_ED25519, "EdDSA", bk.kid, w), *mix;
                const char *d1 = strchr(t, '.'), *d2 = strrchr(t, '.');
                const char *f1 = strchr(f, '.'), *f2 = strrchr(f, '.');
                size_t n = (size_t)(d1 - t) + (size_t)(f2 - f1) + strlen(d2) + 1;
                mix = malloc(n);
                snprintf(mix, n, "%.*s%.*s%s", (int)(d1 - t), t, (int)(f2 - f1), f1, d2);
                assert_string_equal(verdict(c, mix, NULL), "bad_signature");
                /* signed by another key under the broker's kid */
                assert_string_equal(verdict(c, f, NULL), "bad_signature");
                free(mix);
                free(f);
                json_decref(w);
        }
        /* alg none, with and without the trailing signature part */
        x = forge(&bk, SIG_NONE, "none", bk.kid, cl);
        assert_string_equal(verdict(c, x, NULL), "bad_signature");
        x[strlen(x) - 1] = '\0';
        assert_string_equal(verdict(c, x, NULL), "bad_signature");
        free(x);
        x = forge(&bk, SIG_ED25519, "None", bk.kid, cl);
        assert_string_equal(verdict(c, x, NULL), "bad_signature");
        free(x);
        /* HS256 keyed with the public key: the bytes, and the JWK's x text */
        x = forge(&bk, SIG_HMAC_PK, "HS256", bk.kid, cl);
        assert_string_equal(verdict(c, x, NULL), "bad_signature");
        free(x);
        x = forge(&bk, SIG_HMAC_X, "HS256", bk.kid, cl);
        assert_string_equal(verdict(c, x, NULL), "bad_signature");
        free(x);
        /* a genuine signature of another key, with that key's own kid */
        x = forge(&other, SIG_ED25519, "EdDSA", other.kid, cl);
        assert_string_equal(verdict(c, x, NULL), "unknown_key");
        free(x);
        x = forge(&bk, SIG_ED25519, "EdDSA", "some-other-key", cl);
        assert_string_equal(verdict(c, x, NULL), "unknown_key");
        free(x);
        /* no kid at all */
        x = forge(&bk, SIG_ED25519, "EdDSA", NULL, cl);
        assert_string_equal(verdict(c, x, NULL), "bad_signature");
        free(x);
        /* junk of every shape */
        static const char *const junk[] = { "x", "a.b", "a.b.c", "a.b.c.d", "...", "eyJhbGciOiJFZERTQSJ9..",
                                            "not a token at all" };
        for (size_t i = 0; i < sizeof junk / sizeof junk[0]; i++)
                assert_string_equal(verdict(c, junk[i], NULL), "bad_signature");
        /* exactly the size limit is a verdict, not an error */
        char *big = malloc(8193);
        memset(big, 'A', 8192);
        big[8192] = '\0';
        big[100] = '.';
        big[200] = '.';
        assert_string_equal(verdict(c, big, NULL), "bad_signature");
        /* RFC 7662: a string that is no token is inactive, not an invalid parameter: past the size
         * limit, empty, not ASCII, a stray newline after a genuine token or inside one */
        big = realloc(big, 20001);
        memset(big, 'A', 20000);
        big[20000] = '\0';
        assert_string_equal(verdict(c, big, NULL), "bad_signature");
        big[8193] = '\0';
        assert_string_equal(verdict(c, big, NULL), "bad_signature");
        free(big);
        assert_string_equal(verdict(c, "", NULL), "bad_signature");
        assert_string_equal(verdict(c, "a.\xc3\xa9.c", NULL), "bad_signature");
        assert_string_equal(verdict(c, "a.b\nc.d", NULL), "bad_signature");
        {
                char *nl = NULL;
                json_t *root;
                assert_true(asprintf(&nl, "%s\n", t) > 0);
                assert_string_equal(verdict(c, nl, NULL), "bad_signature");
                root = hx_rpc(c, M_INTRO, json_pack("{s:s%}", "token", nl, strlen(nl) - 1));
                assert_true(json_is_true(json_object_get(hx_reply_params(root), "active"))); /* the same, cut */
                json_decref(root);
                free(nl);
                /* not a string at all is still a bad parameter */
                root = hx_rpc(c, M_INTRO, json_pack("{s:i}", "token", 42));
                hx_assert_error(root, "io.agentbroker.InvalidParameter");
                json_decref(root);
        }
        /* a properly signed token whose nbf cannot be read (a number with a fraction, a string) is
         * not active, though far in the future: the claim is not ignored */
        {
                json_t *nbfs[] = { json_real(4102444800.5), json_string("4102444800"), json_real(1.5) };
                for (size_t i = 0; i < sizeof nbfs / sizeof nbfs[0]; i++) {
                        json_t *w = json_deep_copy(cl);
                        json_object_set_new(w, "nbf", nbfs[i]);
                        x = forge(&bk, SIG_ED25519, "EdDSA", bk.kid, w);
                        assert_string_equal(verdict(c, x, NULL), "bad_signature");
                        free(x);
                        json_decref(w);
                }
        }
        /* a properly signed token without the claims this broker puts in */
        static const char *const needed[] = { "aud", "scope", "sid", "jti", "sub", "exp", "iat", "auth_time" };
        for (size_t i = 0; i < sizeof needed / sizeof needed[0]; i++) {
                json_t *w = json_deep_copy(cl);
                json_object_del(w, needed[i]);
                x = forge(&bk, SIG_ED25519, "EdDSA", bk.kid, w);
                if (strcmp(verdict(c, x, NULL), "active") == 0)
                        fprintf(stderr, "a token without \"%s\" is active\n", needed[i]);
                assert_string_not_equal(verdict(c, x, NULL), "active");
                free(x);
                json_decref(w);
        }
        /* the genuine token is untouched by all this */
        assert_string_equal(verdict(c, t, NULL), "active");
        json_decref(cl);
        free(t);
}

/* expired, not_yet_valid and session_ended, with tokens signed by the broker's own key. */
static void test_introspect_time_and_session(void **state)
{
        hx_broker *b = *state;
        keypair bk;
        json_t *cl, *w;
        char *t, *x, sid[23], jti[44];
        long long now;
        hx_conn *c;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        t = issue(c, AUD_GIT, "repo:read", NULL, 600, NULL);
        broker_key(b, &bk);
        cl = claims_of(t);
        now = (long long)time(NULL);

#define FORGED(mod, want)                                                                \
        do {                                                                             \
                w = json_deep_copy(cl);                                                  \
                mod;                                                                     \
                x = forge(&bk, SIG_ED25519, "EdDSA", bk.kid, w);                         \
                assert_string_equal(verdict(c, x, NULL), want);                          \
                free(x);                                                                 \
                json_decref(w);                                                          \
        } while (0)

        FORGED(json_object_set_new(w, "exp", json_integer(now - 1)), "expired");
        FORGED(json_object_set_new(w, "exp", json_integer(now)), "expired"); /* no leeway */
        FORGED(json_object_set_new(w, "exp", json_integer(0)), "expired");
        FORGED(json_object_set_new(w, "exp", json_integer(-5)), "bad_signature"); /* no time it signs */
        FORGED(json_object_set_new(w, "nbf", json_integer(now + 60)), "not_yet_valid");
        FORGED(json_object_set_new(w, "iat", json_integer(now + 60)), "not_yet_valid");
        FORGED((json_object_del(w, "nbf"), json_object_set_new(w, "iat", json_integer(now + 60))), "not_yet_valid");
        FORGED(json_object_set_new(w, "nbf", json_integer(now + 2)), "active"); /* within the 5 s leeway */
        FORGED(json_object_set_new(w, "exp", json_string("never")), "bad_signature");
        /* a session that does not exist, or is no session id at all */
        random_sid(sid);
        jti_for_sid(sid, jti);
        FORGED((json_object_set_new(w, "sid", json_string(sid)), json_object_set_new(w, "jti", json_string(jti))),
               "session_ended");
        /* the jti names the session too: a sid that is not the jti's is not the broker's signing */
        FORGED(json_object_set_new(w, "sid", json_string("../../etc/passwd")), "bad_signature");
        FORGED(json_object_set_new(w, "sid", json_string("")), "bad_signature");
        FORGED(json_object_set_new(w, "jti", json_string(jti)), "bad_signature");
        /* signed by the broker's key, not as the broker signs (a leaked key): before, each was
         * active, auth_time -2^63 by an overflow of now - auth_time (helper-51) */
        FORGED(json_object_set_new(w, "iss", json_string("urn:agent-broker:elsewhere")), "bad_signature");
        FORGED(json_object_del(w, "iss"), "bad_signature");
        FORGED(json_object_set_new(w, "auth_time", json_integer(INT64_MIN)), "bad_signature");
        FORGED(json_object_set_new(w, "iat", json_integer(-1)), "bad_signature");
        FORGED(json_object_set_new(w, "exp", json_integer(INT64_MAX)), "bad_signature");
        FORGED(json_object_set_new(w, "exp", json_integer(now + 2 * 86400)), "bad_signature");
        FORGED(json_object_set_new(w, "sub", json_string("another-agent")), "bad_signature");
#undef FORGED
        assert_string_equal(verdict(c, t, NULL), "active");
        json_decref(cl);
        free(t);
}

/* wrong_audience, scope_missing, auth_too_old (parameter and grant), user_not_allowed. */
static void test_introspect_request_checks(void **state)
{
        hx_broker *b = *state;
        keypair bk;
        json_t *cl, *w;
        char *t, *tt, *tp, *tn, *x;
        long long now;
        hx_conn *c;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        t = issue(c, AUD_GIT, "repo:read", NULL, 600, NULL);

        assert_string_equal(verdict(c, t, json_pack("{s:s}", "audience", AUD_GIT)), "active");
        assert_string_equal(verdict(c, t, json_pack("{s:s}", "audience", AUD_TICKETS)), "wrong_audience");
        assert_string_equal(verdict(c, t, json_pack("{s:s}", "audience", "mcp://git.internal/")), "wrong_audience");
        assert_string_equal(verdict(c, t, json_pack("{s:s}", "audience", "MCP://git.internal")), "wrong_audience");
        assert_string_equal(verdict(c, t, json_pack("{s:s}", "scope", "repo:read")), "active");
        assert_string_equal(verdict(c, t, json_pack("{s:s}", "scope", "repo:write")), "scope_missing");
        assert_string_equal(verdict(c, t, json_pack("{s:s}", "scope", "repo")), "scope_missing");
        assert_string_equal(verdict(c, t, json_pack("{s:s}", "scope", "repo:rea")), "scope_missing");
        assert_string_equal(verdict(c, t, json_pack("{s:s}", "scope", "repo:read ")), "scope_missing");

        /* auth_too_old by the max_auth_age parameter (auth_time signed into the token) */
        broker_key(b, &bk);
        cl = claims_of(t);
        now = (long long)time(NULL);
        w = json_deep_copy(cl);
        json_object_set_new(w, "auth_time", json_integer(now - 100));
        x = forge(&bk, SIG_ED25519, "EdDSA", bk.kid, w);
        assert_string_equal(verdict(c, x, NULL), "active"); /* the git grant has no max_auth_age */
        assert_string_equal(verdict(c, x, json_pack("{s:i}", "max_auth_age", 50)), "auth_too_old");
        assert_string_equal(verdict(c, x, json_pack("{s:i}", "max_auth_age", 200)), "active");
        /* 0 asks for an authentication within this second (it once meant "no limit": fail open) */
        assert_string_equal(verdict(c, x, json_pack("{s:i}", "max_auth_age", 0)), "auth_too_old");
        free(x);
        json_decref(w);

        /* the grant's max_auth_age (30 s for tickets) applies even when the caller asks for none */
        tt = issue(c, AUD_TICKETS, "tickets:read", NULL, 0, NULL);
        assert_string_equal(verdict(c, tt, NULL), "active");
        json_decref(cl);
        cl = claims_of(tt);
        w = json_deep_copy(cl);
        json_object_set_new(w, "auth_time", json_integer(now - 40));
        x = forge(&bk, SIG_ED25519, "EdDSA", bk.kid, w);
        assert_string_equal(verdict(c, x, NULL), "auth_too_old");
        assert_string_equal(verdict(c, x, json_pack("{s:i}", "max_auth_age", 100)), "auth_too_old"); /* smaller wins */
        free(x);
        json_object_set_new(w, "auth_time", json_integer(now - 15));
        x = forge(&bk, SIG_ED25519, "EdDSA", bk.kid, w);
        assert_string_equal(verdict(c, x, NULL), "active");
        assert_string_equal(verdict(c, x, json_pack("{s:i}", "max_auth_age", 5)), "auth_too_old");
        free(x);
        json_decref(w);

        /* user: the grant's users list */
        tp = issue(c, AUD_PAM, "login", NULL, 0, NULL);
        assert_string_equal(verdict(c, tp, json_pack("{s:s}", "user", "alice")), "active");
        assert_string_equal(verdict(c, tp, json_pack("{s:s}", "user", "carol")), "active");
        assert_string_equal(verdict(c, tp, json_pack("{s:s}", "user", "bob")), "user_not_allowed");
        assert_string_equal(verdict(c, tp, json_pack("{s:s}", "user", "root")), "user_not_allowed");
        assert_string_equal(verdict(c, tp, json_pack("{s:s}", "user", "alice2")), "user_not_allowed");
        assert_string_equal(verdict(c, tp, json_pack("{s:s}", "user", "Alice")), "user_not_allowed");
        /* without a users list only the user the agent runs as (root here; nobody for nobody-agent) */
        assert_string_equal(verdict(c, t, json_pack("{s:s}", "user", "root")), "active");
        assert_string_equal(verdict(c, t, json_pack("{s:s}", "user", "nobody")), "user_not_allowed");
        assert_string_equal(verdict(c, t, json_pack("{s:s}", "user", "alice")), "user_not_allowed");
        assert_string_equal(verdict(c, t, json_pack("{s:s}", "user", "no-such-user-4711")), "user_not_allowed");
        tn = issue_as(b, HX_NOBODY_UID, AUD_GIT, "repo:read", NULL);
        assert_string_equal(verdict(c, tn, json_pack("{s:s}", "user", "nobody")), "active");
        assert_string_equal(verdict(c, tn, json_pack("{s:s}", "user", "root")), "user_not_allowed");

        /* all at once, and through the CLI */
        assert_string_equal(verdict(c, tp, json_pack("{s:s, s:s, s:i, s:s, s:s}", "audience", AUD_PAM, "scope",
                                                      "login", "max_auth_age", 60, "user", "alice", "service",
                                                      "pam:sshd")),
                            "active");
        hx_run_result res;
        assert_int_equal(hx_ctl(b, -1, &res, "introspect", tp, "--user", "bob", NULL), 0);
        ctl_expect(&res, 1);
        assert_non_null(strstr(res.out, "user_not_allowed"));
        hx_run_result_done(&res);

        json_decref(cl);
        free(t);
        free(tt);
        free(tp);
        free(tn);
}

/* =============================================================================
 * Revocation
 * ============================================================================= */

/* An agent revokes its own tokens and sessions over the agent socket. */
static void test_revoke_own_on_agent_socket(void **state)
{
        hx_broker *b = *state;
        char *t1, *t2, *t3, *tc, *j1, sid[32], fake[44];
        json_t *r, *arr, *child;
        script sc = { 0 };
        hx_conn *c;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        t1 = issue(c, AUD_GIT, "repo:read", NULL, 0, &r);
        snprintf(sid, sizeof sid, "%s", hx_reply_str(r, "sid"));
        json_decref(r);
        t2 = issue(c, AUD_GIT, "repo:read", NULL, 0, NULL);
        t3 = issue(c, AUD_GIT, "repo:read", NULL, 0, NULL);
        tc = issue_as(b, 0, AUD_GIT, "repo:read", &child); /* another process of this agent and uid */

        /* by jti */
        j1 = claim(t1, "jti");
        r = expect_ok(c, M_REVOKE, jti_param("jti", j1));
        assert_int_equal(pint(r, "revoked"), 1);
        assert_non_null(hx_reply_str(r, "message"));
        json_decref(r);
        assert_string_equal(verdict(c, t1, NULL), "revoked");
        assert_string_equal(verdict(c, t2, NULL), "active");
        /* again: idempotent */
        r = expect_ok(c, M_REVOKE, jti_param("jti", j1));
        json_decref(r);

        /* by token */
        r = expect_ok(c, M_REVOKE, jti_param("token", t2));
        assert_int_equal(pint(r, "revoked"), 1);
        json_decref(r);
        assert_string_equal(verdict(c, t2, NULL), "revoked");
        assert_string_equal(verdict(c, t3, NULL), "active");

        /* a well-formed jti of a session that does not exist */
        char rs[23];
        random_sid(rs);
        jti_for_sid(rs, fake);
        expect_error(c, M_REVOKE, jti_param("jti", fake), E_PERM);
        expect_error(c, M_REVOKE, jti_param("sid", rs), E_PERM);

        /* another process of the same agent and uid: allowed by the contract */
        r = expect_ok(c, M_REVOKE, jti_param("sid", hx_reply_str(child, "sid")));
        json_decref(r);
        assert_string_equal(verdict(c, tc, NULL), "revoked");
        assert_string_equal(verdict(c, t3, NULL), "active");

        /* its own session: every token, and the process gets no new session */
        r = expect_ok(c, M_REVOKE, jti_param("sid", sid));
        json_decref(r);
        assert_string_equal(verdict(c, t3, NULL), "revoked");
        r = hx_rpc(c, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_error(r, "io.agentbroker.SessionRevoked");
        assert_string_equal(hx_reply_str(r, "sid"), sid);
        json_decref(r);
        r = hx_rpc(c, M_AUTH, NULL);
        hx_assert_error(r, "io.agentbroker.SessionRevoked");
        json_decref(r);
        r = expect_ok(c, M_WHOAMI, NULL);
        assert_string_equal(json_string_value(json_object_get(json_object_get(hx_reply_params(r), "session"), "state")),
                            "revoked");
        json_decref(r);
        r = expect_ok(c, M_LIST, NULL);
        json_t *s;
        size_t i;
        int seen = 0;
        json_array_foreach(json_object_get(hx_reply_params(r), "sessions"), i, s)
                if (strcmp(json_string_value(json_object_get(s, "sid")), sid) == 0) {
                        assert_string_equal(json_string_value(json_object_get(s, "state")), "revoked");
                        assert_true(json_is_integer(json_object_get(s, "revoked_at")));
                        seen++;
                }
        assert_int_equal(seen, 1);
        json_decref(r);

        /* a new process of the agent still opens a session */
        script_add(&sc, b->sock, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        arr = run_script(&sc, 0);
        hx_assert_ok(json_array_get(arr, 0));
        assert_string_not_equal(hx_reply_str(json_array_get(arr, 0), "sid"), sid);
        json_decref(arr);

        json_decref(child);
        free(j1);
        free(t1);
        free(t2);
        free(t3);
        free(tc);
}

/* The admin socket revokes by jti, sid, agent; unknown session is NoSuchSession. */
static void test_revoke_admin(void **state)
{
        hx_broker *b = *state;
        char *t1, *t2, *tc, *tn, *j1, rs[23], sid[32];
        json_t *r, *child, *arr, *s;
        script sc = { 0 };
        hx_conn *c, *a;
        size_t i;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        a = hx_connect(b, b->admin_sock);
        t1 = issue(c, AUD_GIT, "repo:read", NULL, 0, &r);
        snprintf(sid, sizeof sid, "%s", hx_reply_str(r, "sid"));
        json_decref(r);
        t2 = issue(c, AUD_GIT, "repo:write", NULL, 0, NULL);
        tc = issue_as(b, 0, AUD_GIT, "repo:read", &child);
        tn = issue_as(b, HX_NOBODY_UID, AUD_GIT, "repo:read", NULL);

        j1 = claim(t1, "jti");
        r = expect_ok(a, M_AREVOKE, jti_param("jti", j1));
        assert_int_equal(pint(r, "revoked"), 1);
        json_decref(r);
        assert_string_equal(verdict(c, t1, NULL), "revoked");
        assert_string_equal(verdict(c, t2, NULL), "active");

        r = expect_ok(a, M_AREVOKE, jti_param("sid", hx_reply_str(child, "sid")));
        json_decref(r);
        assert_string_equal(verdict(c, tc, NULL), "revoked");
        assert_string_equal(verdict(c, t2, NULL), "active");

        random_sid(rs);
        expect_error(a, M_AREVOKE, jti_param("sid", rs), "io.agentbroker.admin.NoSuchSession");
        expect_error(a, M_AREVOKE, jti_param("jti", "not-a-jti"), E_PARAM);

        /* by agent: test-agent's sessions go, nobody-agent's stay */
        r = expect_ok(a, M_AREVOKE, jti_param("agent", AGENT_ID));
        assert_true(pint(r, "revoked") >= 1);
        json_decref(r);
        assert_string_equal(verdict(c, t2, NULL), "revoked");
        assert_string_equal(verdict(c, tn, NULL), "active");
        r = hx_rpc(c, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_error(r, "io.agentbroker.SessionRevoked");
        json_decref(r);

        r = expect_ok(a, M_ALIST, json_pack("{s:s}", "agent", AGENT_ID));
        assert_true(json_array_size(json_object_get(hx_reply_params(r), "sessions")) >= 2);
        json_array_foreach(json_object_get(hx_reply_params(r), "sessions"), i, s) {
                assert_string_equal(json_string_value(json_object_get(s, "agent")), AGENT_ID);
                assert_string_equal(json_string_value(json_object_get(s, "state")), "revoked");
        }
        json_decref(r);
        r = expect_ok(a, M_ALIST, json_pack("{s:s}", "agent", NOBODY_AGENT));
        assert_int_equal(json_array_size(json_object_get(hx_reply_params(r), "sessions")), 1);
        json_array_foreach(json_object_get(hx_reply_params(r), "sessions"), i, s) {
                assert_string_equal(json_string_value(json_object_get(s, "state")), "active");
                assert_int_equal(json_integer_value(json_object_get(s, "uid")), HX_NOBODY_UID);
        }
        json_decref(r);

        /* a new process of test-agent opens a new session: policy still matches (from the second after
         * the revocation: within it, no session of the agent is opened, RateLimited) */
        wait_wall((long long)time(NULL) + 1);
        script_add(&sc, b->sock, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        arr = run_script(&sc, 0);
        hx_assert_ok(json_array_get(arr, 0));
        char *tnew = strdup(hx_reply_str(json_array_get(arr, 0), "token"));
        json_decref(arr);
        assert_string_equal(verdict(c, tnew, NULL), "active");

        /* revoke --agent through the CLI (root: the admin socket) */
        hx_run_result res;
        assert_int_equal(hx_ctl(b, -1, &res, "revoke", "--agent", NOBODY_AGENT, NULL), 0);
        ctl_expect(&res, 0);
        hx_run_result_done(&res);
        assert_string_equal(verdict(c, tn, NULL), "revoked");
        assert_string_equal(verdict(c, tnew, NULL), "active");
        /* an agent that is neither in the policy nor has a session (a typo): NoSuchAgent, exit 1 */
        assert_int_equal(hx_ctl(b, -1, &res, "revoke", "--agent", "nobody-agnet", NULL), 0);
        if (res.exit_code != 1 || !strstr(res.err, "NoSuchAgent"))
                fprintf(stderr, "revoke --agent nobody-agnet: exit %d: %s%s", res.exit_code, res.out, res.err);
        assert_int_equal(res.exit_code, 1);
        assert_non_null(strstr(res.err, "io.agentbroker.admin.NoSuchAgent"));
        hx_run_result_done(&res);
        /* an agent of the policy without a session now: 0 revoked, fine */
        assert_int_equal(hx_ctl(b, -1, &res, "revoke", "--agent", NOBODY_AGENT, NULL), 0);
        ctl_expect(&res, 0);
        hx_run_result_done(&res);

        /* all of it durable: kill -9 and look again */
        restart(b, true);
        c = hx_connect(b, b->sock);
        assert_string_equal(verdict(c, t1, NULL), "revoked");
        assert_string_equal(verdict(c, tc, NULL), "revoked");
        assert_string_equal(verdict(c, t2, NULL), "revoked");
        assert_string_equal(verdict(c, tn, NULL), "revoked");
        assert_string_equal(verdict(c, tnew, NULL), "active");

        json_decref(child);
        free(tnew);
        free(j1);
        free(t1);
        free(t2);
        free(tc);
        free(tn);
}

/* revoke --before now: everything issued up to the command is revoked; later tokens are not. */
static void test_revoke_before(void **state)
{
        hx_broker *b = *state;
        char *t1, *tc, *late = NULL;
        json_t *r, *arr;
        script sc = { 0 };
        hx_run_result res;
        hx_conn *c, *a;
        long long after, before_cli;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        a = hx_connect(b, b->admin_sock);
        t1 = issue(c, AUD_GIT, "repo:read", NULL, 0, NULL);
        tc = issue_as(b, 0, AUD_GIT, "repo:read", NULL);

        before_cli = (long long)time(NULL);
        assert_int_equal(hx_ctl(b, -1, &res, "revoke", "--before", "now", NULL), 0);
        ctl_expect(&res, 0);
        hx_run_result_done(&res);
        after = (long long)time(NULL);
        assert_string_equal(verdict(c, t1, NULL), "revoked");
        assert_string_equal(verdict(c, tc, NULL), "revoked");
        r = hx_rpc(c, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_error(r, "io.agentbroker.SessionRevoked");
        json_decref(r);

        /* a new process in the same second: fail closed (refused, or a token that is already revoked) */
        script_add(&sc, b->sock, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        arr = run_script(&sc, 0);
        if (!hx_reply_error(json_array_get(arr, 0))) {
                const char *tok = hx_reply_str(json_array_get(arr, 0), "token");
                if ((long long)claim_int(tok, "iat") <= before_cli) /* surely before the cut-off */
                        assert_string_equal(verdict(c, tok, NULL), "revoked");
        }
        json_decref(arr);

        /* an older cut-off does not move it back */
        r = expect_ok(a, M_AREVOKE, json_pack("{s:I}", "before", (json_int_t)(after - 3600)));
        json_decref(r);
        assert_string_equal(verdict(c, t1, NULL), "revoked");
        /* a cut-off in the future (a typo of the year) would lock every agent out until then: refused */
        expect_error(a, M_AREVOKE, json_pack("{s:I}", "before", (json_int_t)time(NULL) + 3600), E_PARAM);

        /* after the cut-off a new process gets a working token */
        wait_wall(after + 1);
        script_add(&sc, b->sock, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        arr = run_script(&sc, 0);
        hx_assert_ok(json_array_get(arr, 0));
        late = strdup(hx_reply_str(json_array_get(arr, 0), "token"));
        json_decref(arr);
        assert_string_equal(verdict(c, late, NULL), "active");
        assert_string_equal(verdict(c, t1, NULL), "revoked");

        /* the cut-off is durable */
        restart(b, true);
        c = hx_connect(b, b->sock);
        assert_string_equal(verdict(c, t1, NULL), "revoked");
        assert_string_equal(verdict(c, tc, NULL), "revoked");
        assert_string_equal(verdict(c, late, NULL), "active");

        free(late);
        free(t1);
        free(tc);
}

/*
 * docs/protocol.md on admin Revoke(before): "revoke --before now sends the
 * next second, so everything issued up to the command is covered; for that
 * one second new tokens are refused too: fail closed", and "every session
 * opened before it" is revoked. A process that first asks in that second is
 * refused with a retryable error (RateLimited) and no session is opened for
 * it; after the second it opens a session like any new process (before, it
 * was bound for life to a session revoked at birth).
 */
static void test_revoke_before_same_second_fails_closed(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        agent_proc *p;
        json_t *r;
        long long t0, t1;

        start_with(b, NULL, -1);
        for (int attempt = 0; attempt < 3; attempt++) {
                /* start right after a second begins, so the window is nearly a whole second */
                wait_wall((long long)time(NULL) + 1);
                p = agent_spawn(b, -1);
                agent_ready(p);
                t0 = (long long)time(NULL);
                assert_int_equal(hx_ctl(b, -1, &res, "revoke", "--before", "now", NULL), 0);
                ctl_expect(&res, 0);
                hx_run_result_done(&res);
                r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
                t1 = (long long)time(NULL);
                if (t1 != t0) { /* the second ended before we asked: try again */
                        json_decref(r);
                        continue;
                }
                if (!hx_reply_error(r))
                        fprintf(stderr, "IssueToken in the cut-off second (before=%lld) granted a token, iat %lld\n",
                                t0 + 1, claim_int(hx_reply_str(r, "token"), "iat"));
                assert_non_null(hx_reply_error(r));
                assert_string_equal(hx_reply_error(r), "io.agentbroker.RateLimited");
                json_decref(r);
                /* Authenticate in that second: the same, no session */
                r = agent_rpc(p, "io.agentbroker.Authenticate", json_object());
                if ((long long)time(NULL) == t0) {
                        assert_non_null(hx_reply_error(r));
                        assert_string_equal(hx_reply_error(r), "io.agentbroker.RateLimited");
                }
                json_decref(r);
                /* after the cut-off: a new session and a token issued at or after it */
                wait_wall(t0 + 2);
                r = agent_rpc(p, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
                if (hx_reply_error(r))
                        fprintf(stderr, "after the cut-off: %s\n", hx_reply_error(r));
                assert_null(hx_reply_error(r));
                assert_true(claim_int(hx_reply_str(r, "token"), "iat") >= t0 + 1);
                json_decref(r);
                return;
        }
        fail_msg("could not ask within the cut-off second in three tries");
}

/*
 * New processes ask for a token until the store refuses (LimitReached):
 * root's only, or (two_users) nobody's and root's in turn, so that neither
 * holds most of the sessions and the store fills to its 90% mark (one user
 * alone stops at 75%). Returns how many got one; *ret_reason (malloc'd):
 * the refusal's reason; *ret_first (if given): the first of root's replies.
 */
static unsigned fill_store(hx_broker *b, bool two_users, char **ret_reason, json_t **ret_first)
{
        unsigned opened = 0;

        *ret_reason = NULL;
        for (int i = 0; i < 3000 && !*ret_reason; i++) {
                bool as_root = !two_users || i % 2;
                script sc = { 0 };
                json_t *arr, *root;
                script_add(&sc, b->sock, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
                arr = run_script(&sc, as_root ? 0 : HX_NOBODY_UID);
                root = json_array_get(arr, 0);
                if (hx_reply_error(root)) {
                        if (strcmp(hx_reply_error(root), "io.agentbroker.LimitReached") != 0)
                                fprintf(stderr, "process %d: %s\n", i, err_or_ok(root));
                        assert_string_equal(hx_reply_error(root), "io.agentbroker.LimitReached");
                        *ret_reason = strdup(hx_reply_str(root, "reason"));
                } else {
                        if (ret_first && !*ret_first && as_root)
                                *ret_first = json_incref(root);
                        opened++;
                }
                json_decref(arr);
        }
        assert_non_null(*ret_reason);
        return opened;
}

/*
 * A store filled by one agent's processes (each a session) must still take
 * a revocation: with --store-max-size 1 (a 1 MiB map), processes of the
 * agent open sessions until the store is 90% full; the next one gets
 * LimitReached (no session), while revoke --agent and revoke --before now
 * still work and end them all, and introspection of their tokens says
 * revoked. An agent
 * forking processes could otherwise fill the store so that it cannot be
 * revoked.
 */
static void test_full_store_keeps_room_for_revocation(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        json_t *first = NULL, *root;
        char *tok0, *why;
        unsigned opened;
        hx_conn *c;

        hx_add_arg(b, "--store-max-size");
        hx_add_arg(b, "1");
        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        tok0 = issue(c, AUD_GIT, "repo:read", NULL, 0, NULL);
        /* two users: the 90% mark (one uid alone stops at 75%: test_one_uid_leaves_room_for_others);
         * first is one of root's, whose agent is revoked below */
        opened = fill_store(b, true, &why, &first);
        fprintf(stderr, "full store: %u sessions opened in a 1 MiB map before LimitReached\n", opened);
        assert_non_null(strstr(why, "90%"));
        free(why);
        assert_true(opened >= 50);
        assert_non_null(first);
        /* the process that has a session goes on (no new record needed) */
        free(issue(c, AUD_GIT, "repo:read", NULL, 0, NULL));

        /* revoking the agent fits (one key, then the sweep of its 930 sessions, which may not), and ends
         * every session of it, this one's and the forked ones' */
        assert_int_equal(hx_ctl(b, -1, &res, "revoke", "--agent", AGENT_ID, NULL), 0);
        ctl_expect(&res, 0);
        hx_run_result_done(&res);
        {
                /* the sweep rewrites every session's page: more than the last tenth of a 1 MiB map */
                char *log = NULL;
                assert_int_equal(hx_read_file(b->log, 1 << 20, &log, NULL), 0);
                if (!strstr(log, "marking its sessions failed"))
                        fprintf(stderr, "full store: the sweep of the agent's sessions fitted after all\n");
                assert_non_null(strstr(log, "marking its sessions failed"));
                free(log);
        }
        assert_string_equal(verdict(c, tok0, NULL), "revoked");
        assert_string_equal(verdict(c, hx_reply_str(first, "token"), NULL), "revoked");
        root = hx_rpc(c, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        hx_assert_error(root, "io.agentbroker.SessionRevoked");
        json_decref(root);
        {
                /* the listing says so too, though no session record was rewritten */
                hx_conn *adm = hx_connect(b, b->admin_sock);
                json_t *s;
                size_t i, n = 0;
                root = expect_ok(adm, M_ALIST, json_pack("{s:s}", "agent", AGENT_ID));
                json_array_foreach(json_object_get(hx_reply_params(root), "sessions"), i, s) {
                        assert_string_equal(json_string_value(json_object_get(s, "state")), "revoked");
                        n++;
                }
                assert_true(n > 0);
                json_decref(root);
        }
        /* and so does the host-wide cut-off */
        assert_int_equal(hx_ctl(b, -1, &res, "revoke", "--before", "now", NULL), 0);
        ctl_expect(&res, 0);
        hx_run_result_done(&res);
        json_decref(first);
        free(tok0);
}

/*
 * One user's processes (each a session until max_lifetime, also after it
 * exits) stop at 75% of the store once that user holds most sessions, so
 * that another user still gets one: before, root's processes took the
 * store to its 90% mark and every other user got LimitReached (helper-50).
 */
static void test_one_uid_leaves_room_for_others(void **state)
{
        hx_broker *b = *state;
        unsigned opened;
        char *t, *why;

        hx_add_arg(b, "--store-max-size");
        hx_add_arg(b, "1");
        start_with(b, NULL, -1);
        opened = fill_store(b, false, &why, NULL);
        fprintf(stderr, "one uid: %u sessions, then: %s\n", opened, why);
        assert_non_null(strstr(why, "holds most"));
        free(why);
        /* another user's process still gets a session and a token */
        t = issue_as(b, HX_NOBODY_UID, AUD_GIT, "repo:read", NULL);
        assert_non_null(t);
        free(t);
}

/*
 * A store filled to its 90% mark by sessions that then all expire is purged
 * (at start, and by the timer): before, the purge deleted in the order it
 * found keys, one transaction that did not fit in the last tenth, failed
 * every time, and no agent got a session again, restarts or not
 * (helper-50).
 */
static void test_full_store_recovers_by_purge(void **state)
{
        hx_broker *b = *state;
        char clock_path[PATH_MAX], *log = NULL, *why;
        unsigned opened;
        hx_conn *c, *a;
        json_t *arr;
        script sc = { 0 };

        hx_add_arg(b, "--store-max-size");
        hx_add_arg(b, "1");
        start_clocked(b, clock_path, sizeof clock_path, &c, &a);
        /* two users: the 90% mark (one user alone stops at 75%, where even the old purge fitted:
         * helper-57) */
        opened = fill_store(b, true, &why, NULL);
        assert_non_null(strstr(why, "90%"));
        free(why);
        /* all of them expire (policy allows no max_lifetime over 30 days); the purge runs at start */
        hx_set_test_clock(clock_path, 31 * 86400);
        restart_clocked(b, &c, &a);
        script_add(&sc, b->sock, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));
        arr = run_script(&sc, 0);
        if (hx_reply_error(json_array_get(arr, 0))) {
                hx_broker_dump_log(b);
                fail_msg("after %u sessions expired: %s", opened, err_or_ok(json_array_get(arr, 0)));
        }
        json_decref(arr);
        assert_int_equal(hx_read_file(b->log, 1 << 20, &log, NULL), 0);
        assert_null(strstr(log, "purging expired sessions failed"));
        assert_non_null(strstr(log, "purged "));
        free(log);
}

/*
 * An agent may make up jtis of its own sessions and revoke them: each one a
 * new key in the store. Those stop at 90% like new sessions (LimitReached),
 * so the last tenth stays for the administrator, whose revocation of the
 * agent's real token then still goes through.
 */
static void test_agent_revocations_keep_the_reserve(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        json_t *r;
        char *tok, *jti, sid[32], fake[44], *msg;
        unsigned accepted = 0;
        bool refused = false;
        hx_conn *c;

        hx_add_arg(b, "--store-max-size");
        hx_add_arg(b, "1");
        hx_add_arg(b, "--rate-limit");
        hx_add_arg(b, "0");
        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        tok = issue(c, AUD_GIT, "repo:read", NULL, 0, &r);
        snprintf(sid, sizeof sid, "%s", hx_reply_str(r, "sid"));
        json_decref(r);
        jti = claim(tok, "jti");
        /* 200 calls at a time on the one connection, then their 200 replies */
        for (int round = 0; round < 200 && !refused; round++) {
                for (int i = 0; i < 200; i++) {
                        jti_for_sid(sid, fake);
                        msg = NULL;
                        assert_true(asprintf(&msg, "{\"method\":\"%s\",\"parameters\":{\"jti\":\"%s\"}}",
                                             M_REVOKE, fake) > 0);
                        assert_int_equal(hx_conn_send_msg(c, msg), 0);
                        free(msg);
                }
                for (int i = 0; i < 200; i++) {
                        assert_int_equal(hx_conn_recv_json(c, 10000, &r), 1);
                        if (hx_reply_error(r)) {
                                assert_string_equal(hx_reply_error(r), "io.agentbroker.LimitReached");
                                assert_non_null(strstr(hx_reply_str(r, "reason"), "90%"));
                                refused = true;
                        } else {
                                accepted++;
                        }
                        json_decref(r);
                }
        }
        fprintf(stderr, "agent revocations: %u made-up jtis revoked in a 1 MiB store before LimitReached\n",
                accepted);
        assert_true(refused);
        assert_true(accepted >= 1000);
        /* the token itself is still active, and the administrator revokes it in the reserve */
        assert_string_equal(verdict(c, tok, NULL), "active");
        assert_int_equal(hx_ctl(b, -1, &res, "revoke", "--jti", jti, NULL), 0);
        ctl_expect(&res, 0);
        hx_run_result_done(&res);
        assert_string_equal(verdict(c, tok, NULL), "revoked");
        /* a jti revoked already is no new key: revoking it again is answered, not refused */
        r = expect_ok(c, M_REVOKE, jti_param("jti", jti));
        json_decref(r);
        free(jti);
        free(tok);
}

/*
 * Another uid (nobody, itself an agent) cannot revoke, attenuate or use
 * the first agent's tokens, sessions or PAM records; a uid that is no
 * agent cannot either. Introspection is open to anyone.
 */
static void test_other_uid_cannot_touch(void **state)
{
        hx_broker *b = *state;
        char *t, *jti, sid[32], pam_id[64];
        json_t *r, *arr;
        script sc = { 0 };
        hx_conn *c;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        t = issue(c, AUD_GIT, "repo:read", "repo:write", 600, &r);
        snprintf(sid, sizeof sid, "%s", hx_reply_str(r, "sid"));
        json_decref(r);
        jti = claim(t, "jti");
        {
                /* a PAM record in the same session, with a token for the PAM audience */
                char *tp = issue(c, AUD_PAM, "login", NULL, 0, NULL);
                r = expect_ok(c, M_PAM_OPEN, json_pack("{s:s, s:s, s:s}", "token", tp, "service", "sshd", "user",
                                                       "alice"));
                free(tp);
        }
        snprintf(pam_id, sizeof pam_id, "%s", hx_reply_str(r, "id"));
        json_decref(r);

        script_add(&sc, b->sock, M_AUTH, NULL);                                              /* 0 */
        script_add(&sc, b->sock, M_ISSUE, issue_params(AUD_GIT, "repo:read", 0));            /* 1 */
        script_add(&sc, b->sock, M_REVOKE, jti_param("jti", jti));                           /* 2 */
        script_add(&sc, b->sock, M_REVOKE, jti_param("sid", sid));                           /* 3 */
        script_add(&sc, b->sock, M_REVOKE, jti_param("token", t));                           /* 4 */
        script_add(&sc, b->sock, M_ATT, jti_param("token", t));                              /* 5 */
        script_add(&sc, b->sock, M_ATT, json_pack("{s:s, s:[s], s:i}", "token", t, "scopes", "repo:read", "ttl",
                                                  10));                                      /* 6 */
        script_add(&sc, b->sock, M_LIST, NULL);                                              /* 7 */
        script_add(&sc, b->sock, M_PAM_CLOSE, jti_param("id", pam_id));                      /* 8 */
        script_add(&sc, b->sock, M_INTRO, jti_param("token", t));                            /* 9 */
        script_add(&sc, b->admin_sock, M_AREVOKE, jti_param("jti", jti));                    /* 10 */
        arr = run_script(&sc, HX_NOBODY_UID);

        const char *nsid = hx_reply_str(json_array_get(arr, 0), "sid");
        hx_assert_ok(json_array_get(arr, 0));
        assert_string_equal(hx_reply_str(json_array_get(arr, 0), "agent"), NOBODY_AGENT);
        assert_string_not_equal(nsid, sid);
        hx_assert_ok(json_array_get(arr, 1));
        assert_string_equal(hx_reply_str(json_array_get(arr, 1), "sid"), nsid); /* its own, never ours */
        for (size_t i = 2; i <= 6; i++) {
                if (strcmp(err_or_ok(json_array_get(arr, i)), E_PERM) != 0)
                        fprintf(stderr, "step %zu as nobody: %s\n", i, err_or_ok(json_array_get(arr, i)));
                hx_assert_error(json_array_get(arr, i), E_PERM);
        }
        hx_assert_ok(json_array_get(arr, 7));
        json_t *list = json_object_get(hx_reply_params(json_array_get(arr, 7)), "sessions"), *s;
        size_t i;
        json_array_foreach(list, i, s) {
                assert_string_equal(json_string_value(json_object_get(s, "agent")), NOBODY_AGENT);
                assert_string_not_equal(json_string_value(json_object_get(s, "sid")), sid);
        }
        hx_assert_error(json_array_get(arr, 8), E_PERM);
        hx_assert_ok(json_array_get(arr, 9));
        assert_true(json_is_true(json_object_get(hx_reply_params(json_array_get(arr, 9)), "active")));
        /* the admin socket does not even let nobody in */
        assert_string_not_equal(err_or_ok(json_array_get(arr, 10)), "ok");
        json_decref(arr);

        /* a uid that is no agent at all (daemon, 1) */
        script_add(&sc, b->sock, M_REVOKE, jti_param("jti", jti));
        script_add(&sc, b->sock, M_REVOKE, jti_param("sid", sid));
        script_add(&sc, b->sock, M_ATT, jti_param("token", t));
        script_add(&sc, b->sock, M_PAM_CLOSE, jti_param("id", pam_id));
        script_add(&sc, b->sock, M_LIST, NULL);
        arr = run_script(&sc, 1);
        hx_assert_error(json_array_get(arr, 0), "io.agentbroker.NotAnAgent");
        hx_assert_error(json_array_get(arr, 1), "io.agentbroker.NotAnAgent");
        hx_assert_error(json_array_get(arr, 2), E_PERM);
        hx_assert_error(json_array_get(arr, 3), E_PERM);
        hx_assert_error(json_array_get(arr, 4), "io.agentbroker.NotAnAgent");
        json_decref(arr);

        /* the CLI as nobody: revoke over the agent socket, refused */
        hx_run_result res;
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "revoke", "--jti", jti, NULL), 0);
        ctl_expect(&res, 1);
        assert_non_null(strstr(res.err, E_PERM));
        hx_run_result_done(&res);
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "revoke", "--session", sid, NULL), 0);
        ctl_expect(&res, 1);
        hx_run_result_done(&res);
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "revoke", "--token", t, NULL), 0);
        ctl_expect(&res, 1);
        hx_run_result_done(&res);
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "attenuate", t, "--scope", "repo:read", NULL), 0);
        ctl_expect(&res, 1);
        assert_non_null(strstr(res.err, E_PERM));
        hx_run_result_done(&res);
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "revoke", "--agent", AGENT_ID, NULL), 0);
        assert_int_not_equal(res.exit_code, 0);
        hx_run_result_done(&res);
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "revoke", "--before", "now", NULL), 0);
        assert_int_not_equal(res.exit_code, 0);
        hx_run_result_done(&res);

        /* nothing of ours changed */
        assert_string_equal(verdict(c, t, NULL), "active");
        r = expect_ok(c, M_LIST, NULL);
        json_array_foreach(json_object_get(hx_reply_params(r), "sessions"), i, s)
                if (strcmp(json_string_value(json_object_get(s, "sid")), sid) == 0) {
                        assert_string_equal(json_string_value(json_object_get(s, "state")), "active");
                        assert_int_equal(json_array_size(json_object_get(s, "pam")), 1);
                }
        json_decref(r);
        char *t2 = issue(c, AUD_GIT, "repo:read", NULL, 0, &r);
        assert_string_equal(hx_reply_str(r, "sid"), sid);
        json_decref(r);
        free(t2);
        free(jti);
        free(t);
}

/* kill -9 right after 1,000 acknowledged revocations: every one is in force after restart. */
#define N_REVOKE 1000
#define BATCH 50
static void test_revocations_survive_kill9(void **state)
{
        hx_broker *b = *state;
        char **tokens = calloc(N_REVOKE + 1, sizeof *tokens), **jtis = calloc(N_REVOKE + 1, sizeof *jtis);
        char *req = hx_call_msg(M_ISSUE, issue_params(AUD_GIT, "repo:read", 600));
        hx_conn *c, *a;
        long long t0 = hx_now_ms(), t_issue, t_revoke;

        assert_non_null(tokens);
        assert_non_null(jtis);
        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        a = hx_connect(b, b->admin_sock);

        /* N + 1 tokens, pipelined in batches (the last one is never revoked) */
        for (size_t i = 0; i <= N_REVOKE; i += BATCH) {
                size_t n = i + BATCH <= N_REVOKE + 1 ? BATCH : N_REVOKE + 1 - i;
                for (size_t k = 0; k < n; k++)
                        assert_int_equal(hx_conn_send_msg(c, req), 0);
                for (size_t k = 0; k < n; k++) {
                        json_t *root = NULL;
                        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
                        hx_assert_ok(root);
                        tokens[i + k] = strdup(hx_reply_str(root, "token"));
                        jtis[i + k] = strdup(hx_reply_str(root, "jti"));
                        json_decref(root);
                }
        }
        free(req);
        t_issue = hx_now_ms();

        /* N revocations on the admin socket, each acknowledged before the next is sent */
        for (size_t i = 0; i < N_REVOKE; i++) {
                char msg[256];
                json_t *root;
                snprintf(msg, sizeof msg, "{\"method\":\"" M_AREVOKE "\",\"parameters\":{\"jti\":\"%s\"}}", jtis[i]);
                root = hx_call(a, msg);
                hx_assert_ok(root);
                assert_int_equal(pint(root, "revoked"), 1);
                json_decref(root);
        }
        t_revoke = hx_now_ms();
        kill9(b);
        drop_conns(b);
        hx_start(b);

        /* every one revoked, the control token active; pipelined again */
        c = hx_connect(b, b->sock);
        for (size_t i = 0; i <= N_REVOKE; i += BATCH) {
                size_t n = i + BATCH <= N_REVOKE + 1 ? BATCH : N_REVOKE + 1 - i;
                for (size_t k = 0; k < n; k++) {
                        char *m = hx_call_msg(M_INTRO, jti_param("token", tokens[i + k]));
                        assert_int_equal(hx_conn_send_msg(c, m), 0);
                        free(m);
                }
                for (size_t k = 0; k < n; k++) {
                        json_t *root = NULL;
                        const char *want = i + k < N_REVOKE ? "revoked" : NULL;
                        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
                        hx_assert_ok(root);
                        if (want) {
                                const char *got = hx_reply_str(root, "reason");
                                if (!got || strcmp(got, want) != 0)
                                        fprintf(stderr, "revocation %zu lost: %s\n", i + k, got ? got : "active");
                                assert_string_equal(got ? got : "active", want);
                        } else {
                                assert_true(json_is_true(json_object_get(hx_reply_params(root), "active")));
                        }
                        json_decref(root);
                }
        }
        if (getenv("HX_VERBOSE"))
                fprintf(stderr, "issue %lld ms, revoke %lld ms, check %lld ms\n", t_issue - t0, t_revoke - t_issue,
                        hx_now_ms() - t_revoke);
        for (size_t i = 0; i <= N_REVOKE; i++) {
                free(tokens[i]);
                free(jtis[i]);
        }
        free(tokens);
        free(jtis);
}

/* =============================================================================
 * Delegation
 * ============================================================================= */

/* Children are subsets: scopes, audience, lifetime; asking wider is an error. */
static void test_delegation_subset(void **state)
{
        hx_broker *b = *state;
        json_t *pr, *r, *cr, *p;
        char *t, *pj, *c1, *c1j, *x;
        hx_conn *c;
        long long pexp;

        start_with(b, NULL, 2);
        c = hx_connect(b, b->sock);
        json_t *ip = json_pack("{s:s, s:[s,s], s:i, s:s}", "audience", AUD_GIT, "scopes", "repo:read", "repo:write",
                               "ttl", 600, "task", "T-1");
        pr = expect_ok(c, M_ISSUE, ip);
        t = strdup(hx_reply_str(pr, "token"));
        pj = strdup(hx_reply_str(pr, "jti"));
        pexp = pint(pr, "expires_at");

        /* one scope, 60 s */
        cr = expect_ok(c, M_ATT, json_pack("{s:s, s:[s], s:i}", "token", t, "scopes", "repo:read", "ttl", 60));
        c1 = strdup(hx_reply_str(cr, "token"));
        c1j = strdup(hx_reply_str(cr, "jti"));
        assert_string_equal(hx_reply_str(cr, "scope"), "repo:read");
        assert_string_equal(hx_reply_str(cr, "parent"), pj);
        assert_string_equal(hx_reply_str(cr, "sid"), hx_reply_str(pr, "sid"));
        assert_string_equal(hx_reply_str(cr, "token_type"), "Bearer");
        assert_int_equal(pint(cr, "depth"), 1);
        assert_int_equal(pint(cr, "expires_in"), 60);
        assert_string_not_equal(c1j, pj);
        assert_int_equal(strlen(c1j), 43);
        assert_memory_equal(c1j, pj, 21); /* both name the same session (first 16 bytes) */

        r = expect_ok(c, M_INTRO, jti_param("token", c1));
        p = hx_reply_params(r);
        assert_true(json_is_true(json_object_get(p, "active")));
        assert_string_equal(json_string_value(json_object_get(p, "sub")), AGENT_ID);
        assert_string_equal(json_string_value(json_object_get(p, "aud")), AUD_GIT);
        assert_string_equal(json_string_value(json_object_get(p, "scope")), "repo:read");
        assert_string_equal(json_string_value(json_object_get(p, "owner")), OWNER);
        assert_string_equal(json_string_value(json_object_get(p, "task")), "T-1"); /* inherited */
        assert_string_equal(json_string_value(json_object_get(p, "parent")), pj);
        assert_string_equal(json_string_value(json_object_get(p, "sid")), hx_reply_str(pr, "sid"));
        assert_int_equal(json_integer_value(json_object_get(p, "auth_time")), pint(pr, "auth_time"));
        assert_true(json_is_object(json_object_get(p, "act")));
        assert_string_equal(json_string_value(json_object_get(json_object_get(p, "act"), "sub")), AGENT_ID);
        assert_null(json_object_get(json_object_get(p, "act"), "act"));
        json_decref(r);
        {
                json_t *cc = claims_of(c1);
                json_t *an = json_object_get(cc, "ancestors");
                assert_true(json_is_array(an));
                assert_int_equal(json_array_size(an), 1);
                assert_string_equal(json_string_value(json_array_get(an, 0)), pj);
                json_decref(cc);
        }

        /* defaults: all the parent's scopes, the parent's expiry */
        r = expect_ok(c, M_ATT, jti_param("token", t));
        assert_string_equal(hx_reply_str(r, "scope"), "repo:read repo:write");
        assert_int_equal(pint(r, "expires_at"), pexp);
        json_decref(r);
        /* the same audience, named, and a new task */
        r = expect_ok(c, M_ATT, json_pack("{s:s, s:s, s:s}", "token", t, "audience", AUD_GIT, "task", "T-2"));
        x = claim(hx_reply_str(r, "token"), "task");
        assert_string_equal(x, "T-2");
        free(x);
        json_decref(r);
        /* duplicates collapse, order is the caller's */
        r = expect_ok(c, M_ATT, json_pack("{s:s, s:[s,s,s]}", "token", t, "scopes", "repo:write", "repo:read",
                                          "repo:write"));
        assert_string_equal(hx_reply_str(r, "scope"), "repo:write repo:read");
        json_decref(r);

        /* wider is an error, never a silent narrowing */
        expect_error(c, M_ATT, json_pack("{s:s, s:s}", "token", t, "audience", AUD_TICKETS),
                     "io.agentbroker.AudienceNotGranted");
        expect_error(c, M_ATT, json_pack("{s:s, s:s}", "token", t, "audience", "mcp://git.internal/x"),
                     "io.agentbroker.AudienceNotGranted");
        expect_error(c, M_ATT, json_pack("{s:s, s:[s]}", "token", t, "scopes", "repo:admin"),
                     "io.agentbroker.ScopeNotGranted");
        expect_error(c, M_ATT, json_pack("{s:s, s:[s,s]}", "token", t, "scopes", "repo:read", "repo:admin"),
                     "io.agentbroker.ScopeNotGranted");
        expect_error(c, M_ATT, json_pack("{s:s, s:[s]}", "token", t, "scopes", "repo"),
                     "io.agentbroker.ScopeNotGranted");
        expect_error(c, M_ATT, json_pack("{s:s, s:[s]}", "token", c1, "scopes", "repo:write"),
                     "io.agentbroker.ScopeNotGranted");
        expect_error(c, M_ATT, json_pack("{s:s, s:i}", "token", t, "ttl", 700), "io.agentbroker.TtlTooLong");
        expect_error(c, M_ATT, json_pack("{s:s, s:i}", "token", c1, "ttl", 120), "io.agentbroker.TtlTooLong");
        expect_error(c, M_ATT, json_pack("{s:s, s:i}", "token", t, "ttl", 86400), "io.agentbroker.TtlTooLong");

        /* the parent must be active */
        x = hx_jwt_tamper(t, 1);
        r = hx_rpc(c, M_ATT, jti_param("token", x));
        hx_assert_error(r, E_INVALID_TOKEN);
        assert_string_equal(hx_reply_str(r, "verdict"), "bad_signature");
        json_decref(r);
        free(x);

        /* the CLI */
        hx_run_result res;
        assert_int_equal(hx_ctl(b, -1, &res, "attenuate", t, "--scope", "repo:read", "--ttl", "30", NULL), 0);
        ctl_expect(&res, 0);
        res.out[strcspn(res.out, "\n")] = '\0';
        assert_string_equal(verdict(c, res.out, json_pack("{s:s}", "scope", "repo:read")), "active");
        assert_string_equal(verdict(c, res.out, json_pack("{s:s}", "scope", "repo:write")), "scope_missing");
        x = claim(res.out, "parent");
        assert_string_equal(x, pj);
        free(x);
        hx_run_result_done(&res);
        assert_int_equal(hx_ctl(b, -1, &res, "attenuate", t, "--scope", "repo:admin", NULL), 0);
        ctl_expect(&res, 1);
        assert_non_null(strstr(res.err, "ScopeNotGranted"));
        hx_run_result_done(&res);

        json_decref(pr);
        json_decref(cr);
        free(t);
        free(pj);
        free(c1);
        free(c1j);
}

/* Depth limit, nested act, and revoking an ancestor kills every descendant. */
static void test_delegation_depth_and_revocation(void **state)
{
        hx_broker *b = *state;
        json_t *r, *p, *act;
        char *t, *pj, *c1, *c1j, *c2, *c1b, *u, *p2, *d1, *d2, *d1j;
        hx_conn *c, *a;

        start_with(b, NULL, 2);
        c = hx_connect(b, b->sock);
        a = hx_connect(b, b->admin_sock);
        t = issue(c, AUD_GIT, "repo:read", "repo:write", 600, NULL);
        pj = claim(t, "jti");
        u = issue(c, AUD_GIT, "repo:read", NULL, 600, NULL); /* unrelated */

        r = expect_ok(c, M_ATT, json_pack("{s:s, s:[s]}", "token", t, "scopes", "repo:read"));
        c1 = strdup(hx_reply_str(r, "token"));
        c1j = strdup(hx_reply_str(r, "jti"));
        json_decref(r);
        r = expect_ok(c, M_ATT, jti_param("token", t));
        c1b = strdup(hx_reply_str(r, "token"));
        json_decref(r);
        r = expect_ok(c, M_ATT, json_pack("{s:s, s:i}", "token", c1, "ttl", 100));
        assert_int_equal(pint(r, "depth"), 2);
        assert_string_equal(hx_reply_str(r, "parent"), c1j);
        c2 = strdup(hx_reply_str(r, "token"));
        json_decref(r);

        r = expect_ok(c, M_INTRO, jti_param("token", c2));
        p = hx_reply_params(r);
        act = json_object_get(p, "act");
        assert_string_equal(json_string_value(json_object_get(act, "sub")), AGENT_ID);
        assert_true(json_is_object(json_object_get(act, "act")));
        assert_string_equal(json_string_value(json_object_get(json_object_get(act, "act"), "sub")), AGENT_ID);
        assert_string_equal(json_string_value(json_object_get(p, "parent")), c1j);
        json_decref(r);
        {
                json_t *cc = claims_of(c2), *an = json_object_get(cc, "ancestors");
                assert_int_equal(json_array_size(an), 2);
                assert_string_equal(json_string_value(json_array_get(an, 0)), pj);
                assert_string_equal(json_string_value(json_array_get(an, 1)), c1j);
                json_decref(cc);
        }
        /* depth 3 > max_delegation_depth 2 */
        expect_error(c, M_ATT, jti_param("token", c2), "io.agentbroker.DelegationTooDeep");

        /* revoke the root of the 2-deep chain: every descendant goes */
        r = expect_ok(c, M_REVOKE, jti_param("jti", pj));
        json_decref(r);
        assert_string_equal(verdict(c, t, NULL), "revoked");
        assert_string_equal(verdict(c, c1, NULL), "revoked");
        assert_string_equal(verdict(c, c1b, NULL), "revoked");
        assert_string_equal(verdict(c, c2, NULL), "revoked");
        assert_string_equal(verdict(c, u, NULL), "active");
        r = hx_rpc(c, M_ATT, jti_param("token", c1));
        hx_assert_error(r, E_INVALID_TOKEN);
        assert_string_equal(hx_reply_str(r, "verdict"), "revoked");
        json_decref(r);

        /* a second chain: revoking the middle (admin) takes its child, not its parent */
        p2 = issue(c, AUD_GIT, "repo:read", NULL, 600, NULL);
        r = expect_ok(c, M_ATT, jti_param("token", p2));
        d1 = strdup(hx_reply_str(r, "token"));
        d1j = strdup(hx_reply_str(r, "jti"));
        json_decref(r);
        r = expect_ok(c, M_ATT, jti_param("token", d1));
        d2 = strdup(hx_reply_str(r, "token"));
        json_decref(r);
        r = expect_ok(a, M_AREVOKE, jti_param("jti", d1j));
        json_decref(r);
        assert_string_equal(verdict(c, p2, NULL), "active");
        assert_string_equal(verdict(c, d1, NULL), "revoked");
        assert_string_equal(verdict(c, d2, NULL), "revoked");
        /* and it stays so across a restart */
        restart(b, true);
        c = hx_connect(b, b->sock);
        assert_string_equal(verdict(c, d2, NULL), "revoked");
        assert_string_equal(verdict(c, c2, NULL), "revoked");
        assert_string_equal(verdict(c, p2, NULL), "active");

        free(t);
        free(pj);
        free(u);
        free(c1);
        free(c1j);
        free(c1b);
        free(c2);
        free(p2);
        free(d1);
        free(d1j);
        free(d2);
}

/* max_delegation_depth 0 forbids delegation; the default (1) allows one level. */
static void test_delegation_depth_policy(void **state)
{
        hx_broker *b = *state;
        json_t *r;
        char *t;
        hx_conn *c;

        start_with(b, NULL, 0);
        c = hx_connect(b, b->sock);
        t = issue(c, AUD_GIT, "repo:read", NULL, 600, NULL);
        expect_error(c, M_ATT, jti_param("token", t), "io.agentbroker.DelegationTooDeep");
        free(t);

        hx_stop_clean(b);
        drop_conns(b);
        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        t = issue(c, AUD_GIT, "repo:read", NULL, 600, NULL);
        r = expect_ok(c, M_ATT, jti_param("token", t));
        expect_error(c, M_ATT, jti_param("token", hx_reply_str(r, "token")), "io.agentbroker.DelegationTooDeep");
        json_decref(r);
        free(t);
}

/* A child token verifies with python3-jwt against the JWKS from GetKeys. */
static void test_delegation_python_verifies(void **state)
{
        hx_broker *b = *state;
        json_t *r, *res, *cl;
        char *t, *c1, *c2, *jwks;
        hx_conn *c;

        start_with(b, NULL, 2);
        c = hx_connect(b, b->sock);
        r = expect_ok(c, "io.agentbroker.GetKeys", NULL);
        jwks = json_dumps(hx_reply_params(r), JSON_COMPACT);
        json_decref(r);
        t = issue(c, AUD_GIT, "repo:read", "repo:write", 600, NULL);
        r = expect_ok(c, M_ATT, json_pack("{s:s, s:[s], s:i}", "token", t, "scopes", "repo:read", "ttl", 60));
        c1 = strdup(hx_reply_str(r, "token"));
        json_decref(r);
        r = expect_ok(c, M_ATT, jti_param("token", c1));
        c2 = strdup(hx_reply_str(r, "token"));
        json_decref(r);

        char *toks[] = { c1, c2 };
        res = hx_py_jwt_verify(b, jwks, AUD_GIT, toks, 2);
        for (size_t i = 0; i < 2; i++) {
                json_t *one = json_array_get(res, i);
                if (!json_is_true(json_object_get(one, "valid")))
                        fprintf(stderr, "python3-jwt: %s\n", json_string_value(json_object_get(one, "message")));
                assert_true(json_is_true(json_object_get(one, "valid")));
        }
        cl = json_object_get(json_array_get(res, 0), "claims");
        assert_string_equal(json_string_value(json_object_get(cl, "scope")), "repo:read");
        assert_string_equal(json_string_value(json_object_get(json_object_get(cl, "act"), "sub")), AGENT_ID);
        assert_true(json_is_string(json_object_get(cl, "parent")));
        cl = json_object_get(json_array_get(res, 1), "claims");
        assert_true(json_is_object(json_object_get(json_object_get(cl, "act"), "act")));
        json_decref(res);
        /* and not for another audience */
        res = hx_py_jwt_verify(b, jwks, AUD_TICKETS, toks, 1);
        assert_string_equal(json_string_value(json_object_get(json_array_get(res, 0), "error")),
                            "InvalidAudienceError");
        json_decref(res);
        free(jwks);
        free(t);
        free(c1);
        free(c2);
}

/* =============================================================================
 * PAM session records
 * ============================================================================= */

static json_t *find_session(json_t *reply, const char *sid)
{
        json_t *s;
        size_t i;
        json_array_foreach(json_object_get(hx_reply_params(reply), "sessions"), i, s)
                if (strcmp(json_string_value(json_object_get(s, "sid")), sid) == 0)
                        return s;
        return NULL;
}

static void test_pam_sessions(void **state)
{
        hx_broker *b = *state;
        char *t, *tn, *jti, sid[32], id[64], nid[64];
        json_t *r, *s, *pam, *arr;
        script sc = { 0 };
        hx_run_result res;
        hx_conn *c;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        t = issue(c, AUD_PAM, "login", NULL, 0, &r);
        snprintf(sid, sizeof sid, "%s", hx_reply_str(r, "sid"));
        json_decref(r);
        jti = claim(t, "jti");

        r = expect_ok(c, M_PAM_OPEN, json_pack("{s:s, s:s, s:s, s:s, s:s}", "token", t, "service", "sshd", "user",
                                               "alice", "tty", "pts/3", "rhost", "192.0.2.7"));
        snprintf(id, sizeof id, "%s", hx_reply_str(r, "id"));
        assert_true(strlen(id) >= 22);
        json_decref(r);

        /* visible under its session, on both sockets */
        r = expect_ok(c, M_LIST, NULL);
        s = find_session(r, sid);
        assert_non_null(s);
        pam = json_object_get(s, "pam");
        assert_int_equal(json_array_size(pam), 1);
        json_t *p0 = json_array_get(pam, 0);
        assert_string_equal(json_string_value(json_object_get(p0, "id")), id);
        assert_string_equal(json_string_value(json_object_get(p0, "service")), "sshd");
        assert_string_equal(json_string_value(json_object_get(p0, "user")), "alice");
        assert_string_equal(json_string_value(json_object_get(p0, "tty")), "pts/3");
        assert_string_equal(json_string_value(json_object_get(p0, "rhost")), "192.0.2.7");
        assert_string_equal(json_string_value(json_object_get(p0, "jti")), jti);
        assert_true(json_is_integer(json_object_get(p0, "opened")));
        json_decref(r);
        r = expect_ok(hx_connect(b, b->admin_sock), M_ALIST, NULL);
        assert_int_equal(json_array_size(json_object_get(find_session(r, sid), "pam")), 1);
        json_decref(r);
        assert_int_equal(hx_ctl(b, -1, &res, "sessions", NULL), 0);
        ctl_expect(&res, 0);
        assert_non_null(strstr(res.out, sid));
        assert_non_null(strstr(res.out, id));
        assert_non_null(strstr(res.out, "service sshd"));
        assert_non_null(strstr(res.out, "user alice"));
        hx_run_result_done(&res);

        /* nobody cannot close it; nobody's own record, root may close */
        tn = issue_as(b, HX_NOBODY_UID, "pam:su", "login", NULL);
        script_add(&sc, b->sock, M_PAM_CLOSE, jti_param("id", id));
        script_add(&sc, b->sock, M_PAM_OPEN,
                   json_pack("{s:s, s:s, s:s}", "token", tn, "service", "su", "user", "nobody"));
        arr = run_script(&sc, HX_NOBODY_UID);
        hx_assert_error(json_array_get(arr, 0), E_PERM);
        hx_assert_ok(json_array_get(arr, 1));
        snprintf(nid, sizeof nid, "%s", hx_reply_str(json_array_get(arr, 1), "id"));
        json_decref(arr);
        r = expect_ok(c, M_LIST, NULL);
        assert_int_equal(json_array_size(json_object_get(find_session(r, sid), "pam")), 1);
        json_decref(r);
        r = expect_ok(c, M_PAM_CLOSE, jti_param("id", nid));
        json_decref(r);

        /* the opener closes it: gone; closing again or an unknown id succeeds */
        r = expect_ok(c, M_PAM_CLOSE, jti_param("id", id));
        json_decref(r);
        r = expect_ok(c, M_LIST, NULL);
        assert_int_equal(json_array_size(json_object_get(find_session(r, sid), "pam")), 0);
        json_decref(r);
        r = expect_ok(c, M_PAM_CLOSE, jti_param("id", id));
        json_decref(r);
        char rs[23], unknown[44];
        random_sid(rs);
        jti_for_sid(rs, unknown);
        r = expect_ok(c, M_PAM_CLOSE, jti_param("id", unknown));
        json_decref(r);
        assert_int_equal(hx_ctl(b, -1, &res, "sessions", "--json", NULL), 0);
        ctl_expect(&res, 0);
        assert_null(strstr(res.out, id));
        hx_run_result_done(&res);

        /* only a token for this service's login records one: not a token for an API (helper-23's finding:
         * any active token wrote pam.opened records for any service), not by naming its audience */
        {
                char *tg = issue(c, AUD_GIT, "repo:read", NULL, 0, NULL);
                r = hx_rpc(c, M_PAM_OPEN, json_pack("{s:s, s:s, s:s}", "token", tg, "service", "sshd", "user", "root"));
                hx_assert_error(r, E_INVALID_TOKEN);
                assert_string_equal(hx_reply_str(r, "verdict"), "wrong_audience");
                json_decref(r);
                r = hx_rpc(c, M_PAM_OPEN, json_pack("{s:s, s:s, s:s, s:s, s:s}", "token", tg, "service", "sshd", "user",
                                                    "root", "audience", AUD_GIT, "scope", "repo:read"));
                hx_assert_error(r, E_PARAM);
                json_decref(r);
                free(tg);
                /* the PAM token for another service */
                r = hx_rpc(c, M_PAM_OPEN, json_pack("{s:s, s:s, s:s}", "token", t, "service", "login", "user", "alice"));
                hx_assert_error(r, E_INVALID_TOKEN);
                assert_string_equal(hx_reply_str(r, "verdict"), "wrong_audience");
                json_decref(r);
                /* a scope the token lacks */
                r = hx_rpc(c, M_PAM_OPEN, json_pack("{s:s, s:s, s:s, s:s}", "token", t, "service", "sshd", "user",
                                                    "alice", "scope", "sudo"));
                hx_assert_error(r, E_INVALID_TOKEN);
                assert_string_equal(hx_reply_str(r, "verdict"), "scope_missing");
                json_decref(r);
        }

        /* the PAM user must be one the token's grant allows (as Introspect's user) */
        r = hx_rpc(c, M_PAM_OPEN, json_pack("{s:s, s:s, s:s}", "token", t, "service", "sshd", "user", "bob"));
        hx_assert_error(r, E_INVALID_TOKEN);
        assert_string_equal(hx_reply_str(r, "verdict"), "user_not_allowed");
        json_decref(r);

        /* an inactive token opens nothing */
        char *bad = hx_jwt_tamper(t, 2);
        r = hx_rpc(c, M_PAM_OPEN, json_pack("{s:s, s:s, s:s}", "token", bad, "service", "sshd", "user", "alice"));
        hx_assert_error(r, E_INVALID_TOKEN);
        assert_string_equal(hx_reply_str(r, "verdict"), "bad_signature");
        json_decref(r);
        free(bad);
        r = expect_ok(c, M_REVOKE, jti_param("jti", jti));
        json_decref(r);
        r = hx_rpc(c, M_PAM_OPEN, json_pack("{s:s, s:s, s:s}", "token", t, "service", "sshd", "user", "alice"));
        hx_assert_error(r, E_INVALID_TOKEN);
        assert_string_equal(hx_reply_str(r, "verdict"), "revoked");
        json_decref(r);

        free(t);
        free(tn);
        free(jti);
}

/*
 * Many PAM records (a busy sshd host): ListSessions must still answer
 * within the protocol's 64 KiB message limit, and `agent-brokerctl
 * sessions` must still list them.
 */
#define N_PAM 120
static void test_list_sessions_within_message_limit(void **state)
{
        hx_broker *b = *state;
        char *t, *msg, *reply = NULL, pad[201];
        size_t len = 0;
        hx_run_result res;
        hx_conn *c, *a;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        a = hx_connect(b, b->admin_sock);
        t = issue(c, AUD_PAM, "login", NULL, 0, NULL);
        memset(pad, 'x', 200);
        pad[200] = '\0';
        msg = hx_call_msg(M_PAM_OPEN, json_pack("{s:s, s:s, s:s, s:s, s:s}", "token", t, "service", "sshd", "user",
                                                "alice", "tty", pad, "rhost", pad));
        for (int i = 0; i < N_PAM; i += 20) {
                for (int k = 0; k < 20; k++)
                        assert_int_equal(hx_conn_send_msg(c, msg), 0);
                for (int k = 0; k < 20; k++) {
                        json_t *root = NULL;
                        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
                        hx_assert_ok(root);
                        json_decref(root);
                }
        }
        free(msg);
        free(t);

        assert_int_equal(hx_conn_send_msg(a, "{\"method\":\"" M_ALIST "\"}"), 0);
        assert_int_equal(hx_conn_recv(a, HX_IO_TIMEOUT_MS, &reply, &len), 1);
        free(reply);
        if (len > 64 * 1024)
                fprintf(stderr, "admin.ListSessions replied with %zu bytes; the protocol's limit is 65536\n", len);

        assert_int_equal(hx_ctl(b, -1, &res, "sessions", NULL), 0);
        if (res.exit_code != 0)
                fprintf(stderr, "agent-brokerctl sessions with %d PAM records: exit %d: %s", N_PAM, res.exit_code,
                        res.err);
        ctl_expect(&res, 0);
        hx_run_result_done(&res);
        assert_true(len <= 64 * 1024);

        /* every PAM record is accounted for: listed, or counted as omitted */
        assert_int_equal(hx_ctl(b, -1, &res, "sessions", "--json", NULL), 0);
        ctl_expect(&res, 0);
        {
                json_t *j = json_loads(res.out, 0, NULL), *s;
                size_t i;
                long long pam = 0;
                assert_non_null(j);
                json_array_foreach(json_object_get(j, "sessions"), i, s)
                        pam += (long long)json_array_size(json_object_get(s, "pam")) +
                               json_integer_value(json_object_get(s, "pam_omitted"));
                assert_int_equal(pam, N_PAM);
                json_decref(j);
        }
        hx_run_result_done(&res);
}

/* A session holds at most 256 open PAM sessions: the next is refused with a clear error. */
static void test_pam_records_bounded(void **state)
{
        hx_broker *b = *state;
        char *t, *msg;
        hx_conn *c;
        json_t *r;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        t = issue(c, AUD_PAM, "login", NULL, 0, NULL);
        msg = hx_call_msg(M_PAM_OPEN, json_pack("{s:s, s:s, s:s}", "token", t, "service", "sshd", "user", "alice"));
        for (int i = 0; i < 256; i += 32) {
                for (int k = 0; k < 32; k++)
                        assert_int_equal(hx_conn_send_msg(c, msg), 0);
                for (int k = 0; k < 32; k++) {
                        json_t *root = NULL;
                        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
                        hx_assert_ok(root);
                        json_decref(root);
                }
        }
        r = hx_call(c, msg);
        hx_assert_error(r, "io.agentbroker.LimitReached");
        json_decref(r);
        free(msg);
        free(t);
}

/* Many sessions: ListSessions pages under 64 KiB, and the CLI follows the pages to the end. */
#define N_SESS 300
static int child_authenticate(void *arg, char *out, size_t outmax)
{
        hx_broker *b = arg;
        hx_conn *c = NULL;
        json_t *root = NULL;
        int ok;
        (void)out;
        (void)outmax;
        if (hx_conn_open(NULL, b->sock, &c) < 0 || hx_conn_call(c, "{\"method\":\"" M_AUTH "\"}", &root) != 1)
                return 2;
        ok = hx_reply_error(root) == NULL;
        json_decref(root);
        hx_conn_close(NULL, c);
        return ok ? 0 : 3;
}

static void test_list_sessions_pages(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        hx_conn *a;
        json_t *root, *seen = json_object();
        char *reply = NULL, out[8];
        size_t len = 0, pages = 0, i;
        const char *next = NULL;
        char after[64] = "";
        int ex;

        start_with(b, NULL, -1);
        for (int k = 0; k < N_SESS; k++) {
                assert_int_equal(hx_run_as(0, 0, child_authenticate, b, HX_RUN_TIMEOUT_MS, out, sizeof out, &ex), 0);
                assert_int_equal(ex, 0);
        }
        a = hx_connect(b, b->admin_sock);
        do {
                char msg[256];
                json_t *s;
                snprintf(msg, sizeof msg, "{\"method\":\"" M_ALIST "\"%s%s%s}",
                         after[0] ? ",\"parameters\":{\"after\":\"" : "", after, after[0] ? "\"}" : "");
                assert_int_equal(hx_conn_send_msg(a, msg), 0);
                assert_int_equal(hx_conn_recv(a, HX_IO_TIMEOUT_MS, &reply, &len), 1);
                assert_true(len <= 64 * 1024);
                root = json_loads(reply, 0, NULL);
                free(reply);
                assert_non_null(root);
                hx_assert_ok(root);
                json_array_foreach(json_object_get(hx_reply_params(root), "sessions"), i, s) {
                        const char *sid = json_string_value(json_object_get(s, "sid"));
                        assert_null(json_object_get(seen, sid)); /* no session twice */
                        json_object_set_new(seen, sid, json_true());
                }
                next = hx_reply_str(root, "next");
                snprintf(after, sizeof after, "%s", next ? next : "");
                json_decref(root);
                pages++;
                assert_true(pages < 100);
        } while (after[0]);
        assert_true(pages >= 2);
        assert_true(json_object_size(seen) >= N_SESS);

        /* a bad cursor is a clear error */
        root = hx_call(a, "{\"method\":\"" M_ALIST "\",\"parameters\":{\"after\":\"short\"}}");
        hx_assert_error(root, E_PARAM);
        json_decref(root);

        assert_int_equal(hx_ctl(b, -1, &res, "sessions", "--json", NULL), 0);
        ctl_expect(&res, 0);
        root = json_loads(res.out, 0, NULL);
        assert_non_null(root);
        assert_int_equal(json_array_size(json_object_get(root, "sessions")), json_object_size(seen));
        json_decref(root);
        hx_run_result_done(&res);
        json_decref(seen);
}

/* docs/protocol.md: OpenPamSession replies "id (22 characters)". */
static void test_pam_id_matches_protocol(void **state)
{
        hx_broker *b = *state;
        json_t *r;
        char *t;
        hx_conn *c;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        t = issue(c, AUD_PAM, "login", NULL, 0, NULL);
        r = expect_ok(c, M_PAM_OPEN, json_pack("{s:s, s:s, s:s}", "token", t, "service", "sshd", "user", "alice"));
        free(t);
        size_t n = strlen(hx_reply_str(r, "id"));
        json_decref(r);
        if (n != 43)
                fprintf(stderr, "OpenPamSession id is %zu characters, docs/protocol.md says 43\n", n);
        assert_int_equal(n, 43);
}

/* =============================================================================
 * Hostile parameters
 * ============================================================================= */

/* Send method(params) on a fresh connection: InvalidMessage, then the broker closes it. */
static void expect_nul_refused(hx_broker *b, const char *method, json_t *params)
{
        hx_conn *k = hx_connect(b, b->sock);
        char *text = hx_call_msg(method, params);
        json_t *root = hx_call(k, text);

        assert_non_null(strstr(text, "\\u0000"));
        hx_assert_error(root, "io.agentbroker.InvalidMessage");
        assert_int_equal(hx_conn_wait_closed(k, HX_IO_TIMEOUT_MS), 0);
        json_decref(root);
        free(text);
        hx_conn_close(b, k);
}

static void test_hostile_params(void **state)
{
        hx_broker *b = *state;
        char *t, *jti, sid[32], *big;
        json_t *r;
        hx_conn *c, *a;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);
        a = hx_connect(b, b->admin_sock);
        t = issue(c, AUD_GIT, "repo:read", NULL, 600, &r);
        snprintf(sid, sizeof sid, "%s", hx_reply_str(r, "sid"));
        json_decref(r);
        jti = claim(t, "jti");
        big = malloc(8194);
        memset(big, 'A', 8193);
        big[8193] = '\0';

        static const char *const agent_msgs[] = {
                "{\"method\":\"" M_AUTH "\",\"parameters\":{\"x\":1}}",
                "{\"method\":\"" M_AUTH "\",\"parameters\":{\"sid\":\"AAAAAAAAAAAAAAAAAAAAAA\"}}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":{}}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":{\"token\":5}}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":{\"token\":null}}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":{\"token\":[\"a.b.c\"]}}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":{\"token\":\"a.b.c\",\"bogus\":1}}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":{\"token\":\"a.b.c\",\"max_auth_age\":-1}}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":{\"token\":\"a.b.c\",\"max_auth_age\":\"10\"}}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":{\"token\":\"a.b.c\",\"max_auth_age\":1.5}}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":{\"token\":\"a.b.c\",\"max_auth_age\":99999999999999}}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":{\"token\":\"a.b.c\",\"audience\":7}}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":{\"token\":\"a.b.c\",\"scope\":true}}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":{\"token\":\"a.b.c\",\"user\":\"\"}}",
                "{\"method\":\"" M_ATT "\",\"parameters\":{}}",
                "{\"method\":\"" M_ATT "\",\"parameters\":{\"token\":\"a.b.c\",\"scopes\":\"repo:read\"}}",
                "{\"method\":\"" M_ATT "\",\"parameters\":{\"token\":\"a.b.c\",\"scopes\":[]}}",
                "{\"method\":\"" M_ATT "\",\"parameters\":{\"token\":\"a.b.c\",\"scopes\":[\"repo:*\"]}}",
                "{\"method\":\"" M_ATT "\",\"parameters\":{\"token\":\"a.b.c\",\"scopes\":[\"a b\"]}}",
                "{\"method\":\"" M_ATT "\",\"parameters\":{\"token\":\"a.b.c\",\"scopes\":[5]}}",
                "{\"method\":\"" M_ATT "\",\"parameters\":{\"token\":\"a.b.c\",\"ttl\":0}}",
                "{\"method\":\"" M_ATT "\",\"parameters\":{\"token\":\"a.b.c\",\"ttl\":-60}}",
                "{\"method\":\"" M_ATT "\",\"parameters\":{\"token\":\"a.b.c\",\"ttl\":\"60\"}}",
                "{\"method\":\"" M_ATT "\",\"parameters\":{\"token\":\"a.b.c\",\"ttl\":86401}}",
                "{\"method\":\"" M_ATT "\",\"parameters\":{\"token\":\"a.b.c\",\"parent\":\"x\"}}",
                "{\"method\":\"" M_ATT "\",\"parameters\":{\"token\":\"a.b.c\",\"act\":{\"sub\":\"root\"}}}",
                "{\"method\":\"" M_REVOKE "\",\"parameters\":{}}",
                "{\"method\":\"" M_REVOKE "\",\"parameters\":{\"jti\":null,\"sid\":null}}",
                "{\"method\":\"" M_REVOKE "\",\"parameters\":{\"agent\":\"" AGENT_ID "\"}}",
                "{\"method\":\"" M_REVOKE "\",\"parameters\":{\"before\":0}}",
                "{\"method\":\"" M_REVOKE "\",\"parameters\":{\"jti\":5}}",
                "{\"method\":\"" M_REVOKE "\",\"parameters\":{\"jti\":\"\"}}",
                "{\"method\":\"" M_REVOKE "\",\"parameters\":{\"jti\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"}}",
                "{\"method\":\"" M_REVOKE "\",\"parameters\":{\"sid\":\"AAAAAAAAAAAAAAAAAAAAAAA\"}}",
                "{\"method\":\"" M_REVOKE "\",\"parameters\":{\"sid\":[\"x\"]}}",
                "{\"method\":\"" M_REVOKE "\",\"parameters\":{\"jti\":\"not!a!jti!not!a!jti!not!a!jti!not!a!jti!123\"}}",
                "{\"method\":\"" M_LIST "\",\"parameters\":{\"agent\":\"" AGENT_ID "\"}}",
                "{\"method\":\"" M_PAM_OPEN "\",\"parameters\":{\"token\":\"a.b.c\"}}",
                "{\"method\":\"" M_PAM_OPEN "\",\"parameters\":{\"token\":\"a.b.c\",\"service\":\"sshd\",\"user\":5}}",
                "{\"method\":\"" M_PAM_CLOSE "\",\"parameters\":{}}",
                "{\"method\":\"" M_PAM_CLOSE "\",\"parameters\":{\"id\":7}}",
                "{\"method\":\"" M_PAM_CLOSE "\",\"parameters\":{\"id\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"}}",
                "{\"method\":\"" M_PAM_CLOSE "\",\"parameters\":{\"id\":\"x\",\"force\":true}}",
        };
        for (size_t i = 0; i < sizeof agent_msgs / sizeof agent_msgs[0]; i++) {
                r = hx_call(c, agent_msgs[i]);
                if (!hx_reply_error(r) || strcmp(hx_reply_error(r), E_PARAM) != 0)
                        fprintf(stderr, "message %zu: %s\n", i, agent_msgs[i]);
                hx_assert_error(r, E_PARAM);
                json_decref(r);
        }
        /* two at once, with values that would each be valid */
        expect_error(c, M_REVOKE, json_pack("{s:s, s:s}", "jti", jti, "sid", sid), E_PARAM);
        expect_error(c, M_REVOKE, json_pack("{s:s, s:s}", "jti", jti, "token", t), E_PARAM);
        expect_error(c, M_REVOKE, json_pack("{s:s, s:s, s:s}", "jti", jti, "sid", sid, "token", t), E_PARAM);
        /* an overlong token, to every method that takes one: Introspect answers it inactive (RFC 7662),
         * the others refuse the parameter */
        assert_string_equal(verdict(c, big, NULL), "bad_signature");
        assert_string_equal(verdict_on(a, M_AINTRO, big, NULL), "bad_signature");
        expect_error(c, M_ATT, json_pack("{s:s}", "token", big), E_PARAM);
        expect_error(c, M_REVOKE, json_pack("{s:s}", "token", big), E_PARAM);
        expect_error(c, M_PAM_OPEN, json_pack("{s:s, s:s, s:s}", "token", big, "service", "s", "user", "u"), E_PARAM);
        /*
         * A NUL inside a JSON string never reaches a method: the whole
         * message is refused (InvalidMessage) and the connection closed, as
         * for any malformed message (see test-core's test_invalid_json).
         */
        {
                size_t n = strlen(t);
                char *tn = malloc(n + 8);
                json_t *v;
                memcpy(tn, t, n);
                tn[n] = '\0';
                v = json_stringn(tn, n + 1); /* the real token + NUL */
                expect_nul_refused(b, M_INTRO, json_pack("{s:o}", "token", v));
                tn[n / 2] = '\0';
                v = json_stringn(tn, n); /* NUL in the middle */
                expect_nul_refused(b, M_INTRO, json_pack("{s:o}", "token", json_incref(v)));
                expect_nul_refused(b, M_ATT, json_pack("{s:o}", "token", json_incref(v)));
                expect_nul_refused(b, M_REVOKE, json_pack("{s:o}", "token", json_incref(v)));
                expect_nul_refused(b, M_PAM_OPEN, json_pack("{s:O, s:s, s:s}", "token", v, "service", "s", "user", "u"));
                json_decref(v);
                free(tn);
                expect_nul_refused(b, M_INTRO, json_pack("{s:s, s:o}", "token", "a.b.c", "user",
                                                         json_stringn("ali\0ce", 6)));
                expect_nul_refused(b, M_PAM_CLOSE, json_pack("{s:o}", "id", json_stringn("A\0", 2)));
        }

        static const char *const admin_msgs[] = {
                "{\"method\":\"" M_AREVOKE "\",\"parameters\":{}}",
                "{\"method\":\"" M_AREVOKE "\",\"parameters\":{\"agent\":\"" AGENT_ID "\",\"before\":1}}",
                "{\"method\":\"" M_AREVOKE "\",\"parameters\":{\"before\":-1}}",
                "{\"method\":\"" M_AREVOKE "\",\"parameters\":{\"before\":\"now\"}}",
                "{\"method\":\"" M_AREVOKE "\",\"parameters\":{\"before\":1.5}}",
                "{\"method\":\"" M_AREVOKE "\",\"parameters\":{\"before\":2199023255553}}",
                "{\"method\":\"" M_AREVOKE "\",\"parameters\":{\"agent\":\"\"}}",
                "{\"method\":\"" M_AREVOKE "\",\"parameters\":{\"agent\":5}}",
                "{\"method\":\"" M_AREVOKE "\",\"parameters\":{\"sid\":5}}",
                "{\"method\":\"" M_AREVOKE "\",\"parameters\":{\"jti\":\"short\"}}",
                "{\"method\":\"" M_AREVOKE "\",\"parameters\":{\"token\":\"a.b.c\"}}",
                "{\"method\":\"" M_AREVOKE "\",\"parameters\":{\"jti\":null}}",
                "{\"method\":\"" M_ALIST "\",\"parameters\":{\"agent\":5}}",
                "{\"method\":\"" M_ALIST "\",\"parameters\":{\"uid\":0}}",
                "{\"method\":\"" M_AINTRO "\",\"parameters\":{\"token\":5}}",
        };
        for (size_t i = 0; i < sizeof admin_msgs / sizeof admin_msgs[0]; i++) {
                r = hx_call(a, admin_msgs[i]);
                if (!hx_reply_error(r) || strcmp(hx_reply_error(r), E_PARAM) != 0)
                        fprintf(stderr, "admin message %zu: %s\n", i, admin_msgs[i]);
                hx_assert_error(r, E_PARAM);
                json_decref(r);
        }
        expect_error(a, M_AREVOKE, json_pack("{s:s, s:s}", "jti", jti, "sid", sid), E_PARAM);

        /* methods on the wrong socket */
        expect_error(c, M_AREVOKE, jti_param("sid", sid), E_PERM);
        expect_error(c, M_ALIST, NULL, E_PERM);
        expect_error(a, M_AUTH, NULL, E_PERM);
        expect_error(a, M_REVOKE, jti_param("sid", sid), E_PERM);
        expect_error(a, M_ATT, jti_param("token", t), E_PERM);

        /* parameters that are no object */
        static const char *const shapes[] = {
                "{\"method\":\"" M_REVOKE "\",\"parameters\":[]}",
                "{\"method\":\"" M_REVOKE "\",\"parameters\":\"jti\"}",
                "{\"method\":\"" M_INTRO "\",\"parameters\":null}",
                "{\"method\":\"" M_ATT "\",\"parameters\":5}",
        };
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
                hx_conn *k = hx_connect(b, b->sock);
                json_t *root = NULL;
                int rr = hx_conn_call(k, shapes[i], &root);
                /* an error reply, or the connection closed: anything but success */
                if (rr == 1)
                        assert_non_null(hx_reply_error(root));
                json_decref(root);
                hx_conn_close(b, k);
        }

        /* the broker keeps serving, and nothing was revoked */
        assert_true(b->pid > 0);
        r = expect_ok(c, "org.varlink.service.GetInfo", NULL);
        json_decref(r);
        assert_string_equal(verdict(c, t, NULL), "active");
        char *t2 = issue(c, AUD_GIT, "repo:read", NULL, 0, &r);
        assert_string_equal(hx_reply_str(r, "sid"), sid);
        json_decref(r);
        r = expect_ok(c, M_ATT, jti_param("token", t2));
        json_decref(r);
        free(t2);
        free(big);
        free(jti);
        free(t);
}

/* =============================================================================
 * The CLI: revoke and sessions, as root (admin socket) and as nobody (agent socket)
 * ============================================================================= */

static void test_cli_revoke_and_sessions(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        char *t, *tn, *tn2, *jti, sid[32], *child;
        json_t *r, *list, *s;
        hx_conn *c;
        size_t i;

        start_with(b, NULL, -1);
        c = hx_connect(b, b->sock);

        /* a token through the CLI (its own process, its own session) */
        assert_int_equal(hx_ctl(b, -1, &res, "token", "--audience", AUD_GIT, "--scope", "repo:read", "--scope",
                                "repo:write", NULL), 0);
        ctl_expect(&res, 0);
        res.out[strcspn(res.out, "\n")] = '\0';
        t = strdup(res.out);
        hx_run_result_done(&res);
        jti = claim(t, "jti");
        {
                char *s2 = claim(t, "sid");
                snprintf(sid, sizeof sid, "%s", s2);
                free(s2);
        }
        assert_int_equal(hx_ctl(b, -1, &res, "attenuate", t, "--scope", "repo:read", NULL), 0);
        ctl_expect(&res, 0);
        res.out[strcspn(res.out, "\n")] = '\0';
        child = strdup(res.out);
        hx_run_result_done(&res);

        /* root: revoke --jti (the admin socket) */
        char *cj = claim(child, "jti");
        assert_int_equal(hx_ctl(b, -1, &res, "revoke", "--jti", cj, NULL), 0);
        ctl_expect(&res, 0);
        assert_non_null(strstr(res.out, cj));
        hx_run_result_done(&res);
        free(cj);
        assert_string_equal(verdict(c, child, NULL), "revoked");
        assert_string_equal(verdict(c, t, NULL), "active");

        /* sessions: the table and --json, --agent filters */
        assert_int_equal(hx_ctl(b, -1, &res, "sessions", NULL), 0);
        ctl_expect(&res, 0);
        assert_non_null(strstr(res.out, "SID"));
        assert_non_null(strstr(res.out, sid));
        hx_run_result_done(&res);
        tn = issue_as(b, HX_NOBODY_UID, AUD_GIT, "repo:read", NULL);
        assert_int_equal(hx_ctl(b, -1, &res, "sessions", "--agent", NOBODY_AGENT, "--json", NULL), 0);
        ctl_expect(&res, 0);
        r = json_loads(res.out, 0, NULL);
        assert_non_null(r);
        list = json_object_get(r, "sessions");
        assert_int_equal(json_array_size(list), 1);
        assert_string_equal(json_string_value(json_object_get(json_array_get(list, 0), "agent")), NOBODY_AGENT);
        json_decref(r);
        hx_run_result_done(&res);

        /* root: revoke --session */
        assert_int_equal(hx_ctl(b, -1, &res, "revoke", "--session", sid, NULL), 0);
        ctl_expect(&res, 0);
        hx_run_result_done(&res);
        assert_string_equal(verdict(c, t, NULL), "revoked");
        assert_int_equal(hx_ctl(b, -1, &res, "sessions", "--json", NULL), 0);
        ctl_expect(&res, 0);
        r = json_loads(res.out, 0, NULL);
        assert_non_null(r);
        int seen = 0;
        json_array_foreach(json_object_get(r, "sessions"), i, s)
                if (strcmp(json_string_value(json_object_get(s, "sid")), sid) == 0) {
                        assert_string_equal(json_string_value(json_object_get(s, "state")), "revoked");
                        seen++;
                }
        assert_int_equal(seen, 1);
        json_decref(r);
        hx_run_result_done(&res);

        /* nobody: its own token over the agent socket, by token and by jti */
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "revoke", "--token", tn, NULL), 0);
        ctl_expect(&res, 0);
        hx_run_result_done(&res);
        assert_string_equal(verdict(c, tn, NULL), "revoked");
        tn2 = issue_as(b, HX_NOBODY_UID, AUD_GIT, "repo:read", NULL);
        char *j2 = claim(tn2, "jti");
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "revoke", "--jti", j2, "--json", NULL), 0);
        ctl_expect(&res, 0);
        r = json_loads(res.out, 0, NULL);
        assert_non_null(r);
        assert_int_equal(json_integer_value(json_object_get(r, "revoked")), 1);
        json_decref(r);
        hx_run_result_done(&res);
        free(j2);
        assert_string_equal(verdict(c, tn2, NULL), "revoked");

        /* nobody revokes a session of its own with the CLI; --agent filters on the agent socket too */
        {
                json_t *nr = NULL;
                char *tn3 = issue_as(b, HX_NOBODY_UID, AUD_GIT, "repo:read", &nr);
                assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "revoke", "--session", hx_reply_str(nr, "sid"),
                                        NULL), 0);
                ctl_expect(&res, 0);
                hx_run_result_done(&res);
                assert_string_equal(verdict(c, tn3, NULL), "revoked");
                json_decref(nr);
                free(tn3);
                assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "sessions", "--agent", AGENT_ID, "--json", NULL), 0);
                ctl_expect(&res, 0);
                r = json_loads(res.out, 0, NULL);
                assert_non_null(r);
                assert_int_equal(json_array_size(json_object_get(r, "sessions")), 0);
                json_decref(r);
                hx_run_result_done(&res);
        }

        /* nobody's sessions: only its own */
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "sessions", "--json", NULL), 0);
        ctl_expect(&res, 0);
        r = json_loads(res.out, 0, NULL);
        assert_non_null(r);
        assert_true(json_array_size(json_object_get(r, "sessions")) >= 3);
        json_array_foreach(json_object_get(r, "sessions"), i, s) {
                assert_string_equal(json_string_value(json_object_get(s, "agent")), NOBODY_AGENT);
                assert_int_equal(json_integer_value(json_object_get(s, "uid")), HX_NOBODY_UID);
        }
        json_decref(r);
        hx_run_result_done(&res);

        /* usage errors */
        assert_int_equal(hx_ctl(b, -1, &res, "revoke", NULL), 0);
        ctl_expect(&res, 2);
        hx_run_result_done(&res);
        assert_int_equal(hx_ctl(b, -1, &res, "revoke", "--jti", jti, "--session", sid, NULL), 0);
        ctl_expect(&res, 2);
        hx_run_result_done(&res);
        assert_int_equal(hx_ctl(b, -1, &res, "revoke", "--before", "yesterday", NULL), 0);
        ctl_expect(&res, 2);
        hx_run_result_done(&res);

        free(t);
        free(tn);
        free(tn2);
        free(jti);
        free(child);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_wall_time_reauth_and_expiry, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_session_lifetime_caps_tokens, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_clock_step_back, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_tokens_keep_their_grant, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_attenuate_sees_policy_and_reauth, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_unsigned_edit_reverted, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_expired_sessions_purged, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_other_process_own_session, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_exec_needs_reauth, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_exec_then_authenticate_ends_old_session, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_revoked_process_stays_revoked, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_revoked_process_stays_revoked_after_purge, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_reauth_cannot_be_skipped, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_sessions_survive_restart, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_introspect_active_claims, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_introspect_forgeries, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_introspect_time_and_session, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_introspect_request_checks, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_revoke_own_on_agent_socket, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_revoke_admin, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_revoke_before, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_full_store_keeps_room_for_revocation, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_full_store_recovers_by_purge, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_one_uid_leaves_room_for_others, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_agent_revocations_keep_the_reserve, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_revoke_before_same_second_fails_closed, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_other_uid_cannot_touch, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_revocations_survive_kill9, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_delegation_subset, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_delegation_depth_and_revocation, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_delegation_depth_policy, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_delegation_python_verifies, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_pam_sessions, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_pam_id_matches_protocol, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_list_sessions_within_message_limit, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_pam_records_bounded, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_list_sessions_pages, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_hostile_params, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_cli_revoke_and_sessions, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_small_step_back_revoked, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_ended_key_stays_ended, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_ran_out_key_stays_ended, hx_setup, teardown),
                cmocka_unit_test_setup_teardown(test_clock_ahead_keeps_later_overlaps, hx_setup, teardown),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
