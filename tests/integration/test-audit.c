/* SPDX-License-Identifier: MIT */
/*
 * Integration tests for the audit trail of issue 6 (docs/audit.md): a
 * scripted day read back with `agent-brokerctl audit`, tampering caught by
 * `audit verify`, kill -9 in the middle of a burst of issuance, a tiny
 * filesystem that fills up (tmpfs, size=), size-based rotation, signed
 * checkpoints checked against the JWKS, usage counters, journald.
 *
 * Every test starts the real agent-brokerd on a temporary directory. Scratch
 * files the test writes live in DIR/work: the broker watches the directory
 * of its policy file (DIR) and would reload on any write there.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include <sodium.h>
#include "harness.h"
#include "../../client/agentbroker.h"
#include "../../common/b64.h"

#define AUD_GIT "mcp://git.internal"
#define AUD_TICKETS "https://tickets.internal/api"
#define AGENT_ID "day-agent"
#define OWNER "alice@example.com"
#define AUD_PAM "pam:sshd"
#define ZERO64 "0000000000000000000000000000000000000000000000000000000000000000"
#define READ_MAX (64u << 20) /* the most hx_read_text reads of a file here */
#define ISSUE_GIT_READ                                                                                               \
        "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_GIT                          \
        "\",\"scopes\":[\"repo:read\"]}}"

/* ---- fixtures ------------------------------------------------------------- */

typedef hx_fixture fx; /* the broker, DIR/work, a tmpfs or a helper process to remove in teardown */

/* One agent (root, any executable) with two audiences; extra_grant is appended to its grants. */
static void write_policy(hx_broker *b, const char *extra_grant)
{
        char policy[2048];
        int n = snprintf(policy, sizeof policy,
                         "{\"version\": 1,\n"
                         " \"agents\": [\n"
                         "  {\"id\": \"" AGENT_ID "\", \"owner\": \"" OWNER "\",\n"
                         "   \"match\": {\"uid\": 0}, \"max_delegation_depth\": 2,\n"
                         "   \"grants\": [\n"
                         "     {\"audience\": \"" AUD_GIT "\", \"scopes\": [\"repo:read\", \"repo:write\"], \"max_ttl\": 600},\n"
                         "     {\"audience\": \"" AUD_TICKETS "\", \"scopes\": [\"tickets:read\"], \"max_ttl\": 60}%s%s]}]}\n",
                         extra_grant ? ",\n     " : "", extra_grant ? extra_grant : "");
        assert_true(n > 0 && (size_t)n < sizeof policy);
        assert_int_equal(hx_broker_write_policy(b, policy), 0);
}

static void kill9(hx_broker *b)
{
        int st = 0;
        assert_true(b->pid > 0);
        assert_int_equal(kill(b->pid, SIGKILL), 0);
        assert_int_equal(waitpid(b->pid, &st, 0), b->pid);
        assert_true(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL);
        b->last_status = st;
        b->pid = 0;
}

static json_t *callf(hx_conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static json_t *callf(hx_conn *c, const char *fmt, ...)
{
        char buf[8192];
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        assert_true(n > 0 && (size_t)n < sizeof buf);
        return hx_call(c, buf);
}

/* agent-brokerctl --socket --admin-socket ARGS (NULL-ended array), as root. */
static void ctlv(hx_broker *b, const char *const *args, hx_run_result *res)
{
        assert_int_equal(hx_ctlv(b, -1, args, HX_RUN_TIMEOUT_MS, res), 0);
        assert_false(res->timed_out);
}

/* ---- reading the trail ---------------------------------------------------- */

/* Every line of a JSON-lines text as a parsed object (a line that is not JSON fails the test). */
static json_t *parse_lines(const char *text, const char *what)
{
        json_t *arr = json_array();
        const char *p = text;
        size_t lineno = 0;

        assert_non_null(arr);
        while (*p) {
                const char *e = strchr(p, '\n');
                size_t len = e ? (size_t)(e - p) : strlen(p);
                json_error_t err;
                json_t *rec;
                lineno++;
                if (len == 0) {
                        p = e ? e + 1 : p + len;
                        continue;
                }
                rec = json_loadb(p, len, 0, &err);
                if (!json_is_object(rec))
                        fprintf(stderr, "%s line %zu is not a JSON object: %s: %.200s\n", what, lineno, err.text, p);
                assert_true(json_is_object(rec));
                json_array_append_new(arr, rec);
                p = e ? e + 1 : p + len;
        }
        return arr;
}

/* The records of an audit file. Also requires that it holds no NUL byte and ends with a newline. */
static json_t *file_records(const char *path)
{
        size_t len = 0;
        char *text = hx_read_text(path, READ_MAX, &len);
        if (memchr(text, '\0', len)) {
                size_t at = (size_t)((char *)memchr(text, '\0', len) - text);
                fprintf(stderr, "%s: NUL byte at offset %zu of %zu (a hole in the file)\n", path, at, len);
        }
        assert_null(memchr(text, '\0', len));
        assert_true(len == 0 || text[len - 1] == '\n');
        json_t *arr = parse_lines(text, path);
        free(text);
        return arr;
}

static const char *rs(const json_t *rec, const char *key)
{
        return json_string_value(json_object_get(rec, key));
}

static long long ri(const json_t *rec, const char *key)
{
        return (long long)json_integer_value(json_object_get(rec, key));
}

static size_t count_event(const json_t *recs, const char *event)
{
        size_t i, n = 0;
        json_t *r;
        json_array_foreach(recs, i, r)
                if (rs(r, "event") && strcmp(rs(r, "event"), event) == 0)
                        n++;
        return n;
}

/* The only record of event whose key equals value (value NULL: any); fails unless exactly one. */
static json_t *one_record(const json_t *recs, const char *event, const char *key, const char *value)
{
        size_t i, n = 0;
        json_t *r, *found = NULL;
        json_array_foreach(recs, i, r) {
                if (!rs(r, "event") || strcmp(rs(r, "event"), event) != 0)
                        continue;
                if (key && (!rs(r, key) || strcmp(rs(r, key), value) != 0))
                        continue;
                n++;
                found = r;
        }
        if (n != 1)
                fprintf(stderr, "expected exactly one %s record%s%s%s%s, found %zu\n", event, key ? " with " : "",
                        key ? key : "", key ? "=" : "", value ? value : "", n);
        assert_int_equal(n, 1);
        return found;
}

/* The seq numbers run 1, 2, 3, ... and each prev is the SHA-256 of the line before. */
static void assert_chain(const char *path)
{
        size_t len = 0;
        char *text = hx_read_text(path, READ_MAX, &len), *p = text, prev[65] = ZERO64;
        long long seq = 0;

        while (*p) {
                char *e = strchr(p, '\n');
                uint8_t h[crypto_hash_sha256_BYTES];
                assert_non_null(e);
                json_t *rec = json_loadb(p, (size_t)(e - p), 0, NULL);
                assert_non_null(rec);
                if (seq > 0 || ri(rec, "seq") == 1) {
                        assert_int_equal(ri(rec, "seq"), seq + 1);
                        assert_string_equal(rs(rec, "prev"), prev);
                }
                seq = ri(rec, "seq");
                crypto_hash_sha256(h, (const uint8_t *)p, (size_t)(e - p));
                sodium_bin2hex(prev, sizeof prev, h, sizeof h);
                json_decref(rec);
                p = e + 1;
        }
        free(text);
}

/* `agent-brokerctl audit --json ARGS...` over the admin socket. */
static json_t *ctl_audit_json(hx_broker *b, const char *a1, const char *a2)
{
        const char *args[] = { "audit", "--json", a1, a2, NULL };
        hx_run_result res;
        ctlv(b, args, &res);
        if (res.exit_code != 0)
                fprintf(stderr, "audit --json: exit %d: %s\n", res.exit_code, res.err);
        assert_int_equal(res.exit_code, 0);
        json_t *arr = parse_lines(res.out, "agent-brokerctl audit --json");
        hx_run_result_done(&res);
        return arr;
}

/* `agent-brokerctl audit verify ARGS...`: the exit code; stdout+stderr in out. */
static int ctl_verify(hx_broker *b, const char *const *args, char *out, size_t outmax)
{
        const char *argv[32] = { "audit", "verify" };
        size_t n = 2;
        hx_run_result res;
        for (size_t i = 0; args[i]; i++) {
                assert_true(n < 31);
                argv[n++] = args[i];
        }
        argv[n] = NULL;
        ctlv(b, argv, &res);
        snprintf(out, outmax, "%s%s", res.out, res.err);
        int ex = res.exit_code;
        hx_run_result_done(&res);
        return ex;
}

static void verify_ok(hx_broker *b, const char *const *args)
{
        char out[4096];
        int ex = ctl_verify(b, args, out, sizeof out);
        if (ex != 0)
                fprintf(stderr, "audit verify failed (exit %d):\n%s\n", ex, out);
        assert_int_equal(ex, 0);
        assert_non_null(strstr(out, "audit chain intact"));
}

/* audit verify --file path passes. */
static void verify_file_ok(hx_broker *b, const char *path)
{
        const char *args[] = { "--file", path, NULL };
        verify_ok(b, args);
}

/* `agent-brokerctl keys` into work/jwks.json. */
static void save_jwks(fx *f, char *path, size_t pathmax)
{
        const char *args[] = { "keys", NULL };
        hx_run_result res;
        hx_path_in(path, pathmax, f->work, "jwks.json");
        ctlv(&f->b, args, &res);
        assert_int_equal(res.exit_code, 0);
        assert_int_equal(hx_write_file(path, res.out, 0644), 0);
        hx_run_result_done(&res);
}

static void audit_file(const hx_broker *b, char *out, size_t outmax)
{
        hx_path_in(out, outmax, b->state, "audit.jsonl");
}

/* ---- issuing ---------------------------------------------------------------- */

/* k copies of the message msg (size bytes with its NUL) in one send on c. */
static void send_copies(hx_conn *c, const char *msg, size_t size, unsigned k)
{
        char *buf = malloc(k * size);

        assert_non_null(buf);
        for (unsigned i = 0; i < k; i++)
                memcpy(buf + i * size, msg, size);
        assert_int_equal(hx_conn_send(c, buf, k * size), 0);
        free(buf);
}

/*
 * n IssueToken calls (repo:read) pipelined on c in batches; each jti
 * received is appended to jtis (if not NULL). Returns how many succeeded;
 * the first error name goes to err.
 */
static unsigned issue_many(hx_conn *c, unsigned n, json_t *jtis, char *err, size_t errmax)
{
        static const char msg[] = ISSUE_GIT_READ;
        unsigned ok = 0;

        if (err)
                err[0] = '\0';
        while (n > 0) {
                unsigned k = n < 64 ? n : 64;
                send_copies(c, msg, sizeof msg, k);
                for (unsigned i = 0; i < k; i++) {
                        json_t *root = NULL;
                        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS * 2, &root), 1);
                        if (hx_reply_error(root)) {
                                if (err && !err[0])
                                        snprintf(err, errmax, "%s", hx_reply_error(root));
                        } else {
                                assert_non_null(hx_reply_str(root, "token"));
                                if (jtis)
                                        json_array_append_new(jtis, json_string(hx_reply_str(root, "jti")));
                                ok++;
                        }
                        json_decref(root);
                }
                n -= k;
        }
        return ok;
}

/* Every jti in jtis has exactly one token.issued record in recs. */
static void assert_all_issued_recorded(const json_t *recs, const json_t *jtis)
{
        json_t *seen = json_object(), *r, *j;
        size_t i, missing = 0;

        json_array_foreach(recs, i, r)
                if (rs(r, "event") && strcmp(rs(r, "event"), "token.issued") == 0 && rs(r, "jti")) {
                        json_t *c = json_object_get(seen, rs(r, "jti"));
                        json_object_set_new(seen, rs(r, "jti"), json_integer(c ? json_integer_value(c) + 1 : 1));
                }
        json_array_foreach(jtis, i, j) {
                json_t *c = json_object_get(seen, json_string_value(j));
                if (!c || json_integer_value(c) != 1) {
                        if (missing++ < 5)
                                fprintf(stderr, "jti %s received by a client: %lld token.issued records\n",
                                        json_string_value(j), c ? (long long)json_integer_value(c) : 0LL);
                }
        }
        json_decref(seen);
        assert_int_equal(missing, 0);
}

/* ---- the scripted day ------------------------------------------------------ */

typedef struct child_report {
        char out[512];
} child_report;

/* As nobody: ask for a token; prints "PID ERRNAME". */
static int child_issue_nobody(void *arg, char *out, size_t outmax)
{
        const char *sock = arg;
        ab_client *c = NULL;
        char *token = NULL;
        const char *scopes[] = { "repo:read" };
        int r = ab_client_connect(sock, HX_IO_TIMEOUT_MS, &c);
        if (r < 0) {
                snprintf(out, outmax, "%d connect", (int)getpid());
                return 3;
        }
        r = ab_issue_token(c, AUD_GIT, scopes, 1, 0, NULL, &token);
        snprintf(out, outmax, "%d %s", (int)getpid(), r == 0 ? "OK" : ab_client_error_name(c));
        ab_token_free(token);
        ab_client_free(c);
        return r == 0 ? 0 : 1;
}

static void assert_identity(const json_t *rec, const char *exe, const char *sha)
{
        assert_int_equal(ri(rec, "uid"), 0);
        assert_int_equal(ri(rec, "gid"), 0);
        assert_int_equal(ri(rec, "pid"), getpid());
        if (hx_under_wrapper())
                return; /* the broker sees the tool's executable, not this test's */
        assert_string_equal(rs(rec, "exe"), exe);
        assert_string_equal(rs(rec, "sha256"), sha);
}

static void assert_agent(const json_t *rec)
{
        assert_string_equal(rs(rec, "agent"), AGENT_ID);
        assert_string_equal(rs(rec, "owner"), OWNER);
}

/*
 * Issue, deny (scope; not an agent), attenuate, introspect for a service,
 * PAM open/close, revoke, reload: then `audit --json` shows each once with
 * its fields, no token anywhere in the file, and `audit verify` passes.
 */
static void test_scripted_day(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char exe[PATH_MAX], sha[65], apath[PATH_MAX], jwks[PATH_MAX], out[512], verify_out[4096];
        char *token, *child, *ptok, jti[64], sid[64], cjti[64], pjti[64], pam_id[64], policy_version[32];
        json_t *root, *recs, *r;
        hx_conn *c, *adm;
        int ex = -1;
        ssize_t n;

        n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        assert_true(n > 0);
        exe[n] = '\0';
        assert_int_equal(hx_sha256_file(exe, sha), 0);
        write_policy(b, "{\"audience\": \"" AUD_PAM "\", \"scopes\": [\"login\"]}");
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        c = hx_connect(b, b->sock);
        adm = hx_connect(b, b->admin_sock);

        /* issue */
        root = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_GIT
                          "\",\"scopes\":[\"repo:read\",\"repo:write\"],\"task\":\"review PR 7\"}}");
        hx_assert_ok(root);
        token = strdup(hx_reply_str(root, "token"));
        snprintf(jti, sizeof jti, "%s", hx_reply_str(root, "jti"));
        snprintf(sid, sizeof sid, "%s", hx_reply_str(root, "sid"));
        json_decref(root);

        /* deny: a scope that is not granted */
        root = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_GIT
                          "\",\"scopes\":[\"repo:admin\"]}}");
        hx_assert_error_name(root, "io.agentbroker.ScopeNotGranted");
        json_decref(root);

        /* deny: nobody is not an agent */
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_issue_nobody, b->sock, HX_RUN_TIMEOUT_MS, out,
                                   sizeof out, &ex),
                         0);
        assert_int_equal(ex, 1);
        assert_non_null(strstr(out, " io.agentbroker.NotAnAgent"));
        int nobody_pid = atoi(out);
        assert_true(nobody_pid > 0);

        /* attenuate */
        root = callf(c,
                     "{\"method\":\"io.agentbroker.Attenuate\",\"parameters\":{\"token\":\"%s\",\"scopes\":[\"repo:"
                     "read\"],\"ttl\":60}}",
                     token);
        hx_assert_ok(root);
        child = strdup(hx_reply_str(root, "token"));
        snprintf(cjti, sizeof cjti, "%s", hx_reply_str(root, "jti"));
        assert_string_equal(hx_reply_str(root, "parent"), jti);
        json_decref(root);

        /* introspect, as a service would */
        root = callf(c,
                     "{\"method\":\"io.agentbroker.Introspect\",\"parameters\":{\"token\":\"%s\",\"audience\":\"" AUD_GIT
                     "\",\"service\":\"pam:sshd\"}}",
                     child);
        hx_assert_ok(root);
        assert_true(json_is_true(json_object_get(hx_reply_params(root), "active")));
        json_decref(root);

        /* a PAM session, as pam_agent_broker.so would open and close it (with a token for its service) */
        root = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_PAM
                          "\",\"scopes\":[\"login\"]}}");
        hx_assert_ok(root);
        ptok = strdup(hx_reply_str(root, "token"));
        snprintf(pjti, sizeof pjti, "%s", hx_reply_str(root, "jti"));
        json_decref(root);
        root = callf(c,
                     "{\"method\":\"io.agentbroker.OpenPamSession\",\"parameters\":{\"token\":\"%s\",\"service\":"
                     "\"sshd\",\"user\":\"root\",\"tty\":\"pts/3\",\"rhost\":\"10.0.0.7\"}}",
                     ptok);
        free(ptok);
        hx_assert_ok(root);
        snprintf(pam_id, sizeof pam_id, "%s", hx_reply_str(root, "id"));
        json_decref(root);
        root = callf(c, "{\"method\":\"io.agentbroker.ClosePamSession\",\"parameters\":{\"id\":\"%s\"}}", pam_id);
        hx_assert_ok(root);
        json_decref(root);

        /* revoke the child */
        root = callf(c, "{\"method\":\"io.agentbroker.Revoke\",\"parameters\":{\"jti\":\"%s\"}}", cjti);
        hx_assert_ok(root);
        json_decref(root);

        /* reload (unchanged sources: no inotify event competes with it) */
        root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.ReloadPolicy\"}");
        hx_assert_ok(root);
        json_decref(root);
        usleep(600 * 1000); /* past the broker's 250 ms inotify debounce: nothing else may arrive */

        /* ---- read back over the admin socket ---- */
        recs = ctl_audit_json(b, NULL, NULL);
        {
                json_t *disk = file_records(apath);
                assert_int_equal(json_array_size(recs), json_array_size(disk));
                assert_true(json_equal(recs, disk));
                json_decref(disk);
        }
        assert_int_equal(count_event(recs, "key.created"), 1);
        assert_int_equal(count_event(recs, "policy.loaded"), 2);
        assert_int_equal(count_event(recs, "session.opened"), 1);
        assert_int_equal(count_event(recs, "token.issued"), 2);
        assert_int_equal(count_event(recs, "token.denied"), 2);
        assert_int_equal(count_event(recs, "token.attenuated"), 1);
        assert_int_equal(count_event(recs, "token.introspected"), 1);
        assert_int_equal(count_event(recs, "pam.opened"), 1);
        assert_int_equal(count_event(recs, "pam.closed"), 1);
        assert_int_equal(count_event(recs, "token.revoked"), 1);
        assert_int_equal(count_event(recs, "audit.checkpoint"), 0);
        assert_int_equal(json_array_size(recs), 13);

        /* common to all: time (µs, recent), seq, prev, decision */
        {
                size_t i;
                long long now_us = (long long)time(NULL) * 1000000LL;
                json_array_foreach(recs, i, r) {
                        assert_int_equal(ri(r, "seq"), (long long)i + 1);
                        assert_true(rs(r, "prev") && strlen(rs(r, "prev")) == 64);
                        assert_true(ri(r, "time") > now_us - 120 * 1000000LL && ri(r, "time") <= now_us + 2000000LL);
                        assert_non_null(rs(r, "decision"));
                        if (i > 0)
                                assert_true(ri(r, "time") >= ri(json_array_get(recs, i - 1), "time"));
                }
        }
        r = one_record(recs, "key.created", NULL, NULL);
        assert_string_equal(rs(r, "decision"), "accept");
        assert_true(rs(r, "kid") && strlen(rs(r, "kid")) == 43);
        assert_string_equal(rs(r, "prev"), ZERO64);

        r = json_array_get(recs, 1);
        assert_string_equal(rs(r, "event"), "policy.loaded");
        assert_string_equal(rs(r, "source"), b->policy);
        assert_int_equal(ri(r, "agents"), 1);
        assert_true(rs(r, "policy") && strlen(rs(r, "policy")) == 16);
        snprintf(policy_version, sizeof policy_version, "%s", rs(r, "policy"));

        r = one_record(recs, "session.opened", NULL, NULL);
        assert_identity(r, exe, sha);
        assert_agent(r);
        assert_string_equal(rs(r, "sid"), sid);
        assert_string_equal(rs(r, "decision"), "grant");

        r = one_record(recs, "token.issued", "jti", jti);
        assert_identity(r, exe, sha);
        assert_agent(r);
        assert_string_equal(rs(r, "decision"), "grant");
        assert_string_equal(rs(r, "audience"), AUD_GIT);
        assert_string_equal(rs(r, "scopes"), "repo:read repo:write");
        assert_string_equal(rs(r, "sid"), sid);
        assert_string_equal(rs(r, "task"), "review PR 7");
        assert_string_equal(rs(r, "policy"), policy_version);
        assert_true(ri(r, "exp") > time(NULL));
        assert_null(json_object_get(r, "reason"));

        r = one_record(recs, "token.denied", "scopes", "repo:admin");
        assert_identity(r, exe, sha);
        assert_agent(r);
        assert_string_equal(rs(r, "decision"), "deny");
        assert_string_equal(rs(r, "audience"), AUD_GIT);
        assert_non_null(strstr(rs(r, "reason"), "repo:admin"));
        assert_string_equal(rs(r, "policy"), policy_version);
        assert_null(json_object_get(r, "jti"));

        r = one_record(recs, "token.denied", "scopes", "repo:read");
        assert_int_equal(ri(r, "uid"), HX_NOBODY_UID);
        assert_int_equal(ri(r, "gid"), HX_NOBODY_GID);
        assert_int_equal(ri(r, "pid"), nobody_pid);
        if (!hx_under_wrapper()) { /* the forked test binary, unless a tool runs it */
                assert_string_equal(rs(r, "exe"), exe);
                assert_string_equal(rs(r, "sha256"), sha);
        }
        assert_null(json_object_get(r, "agent"));
        assert_non_null(strstr(rs(r, "reason"), "uid 65534"));
        assert_string_equal(rs(r, "audience"), AUD_GIT);

        r = one_record(recs, "token.attenuated", NULL, NULL);
        assert_identity(r, exe, sha);
        assert_agent(r);
        assert_string_equal(rs(r, "jti"), cjti);
        assert_string_equal(rs(r, "parent"), jti);
        assert_string_equal(rs(r, "sid"), sid);
        assert_string_equal(rs(r, "scopes"), "repo:read");
        assert_string_equal(rs(r, "audience"), AUD_GIT);
        assert_int_equal(ri(r, "depth"), 1);

        r = one_record(recs, "token.introspected", NULL, NULL);
        assert_string_equal(rs(r, "decision"), "active");
        assert_string_equal(rs(r, "service"), "pam:sshd");
        assert_string_equal(rs(r, "jti"), cjti);
        assert_string_equal(rs(r, "parent"), jti);
        assert_string_equal(rs(r, "sid"), sid);
        assert_agent(r);
        assert_string_equal(rs(r, "audience"), AUD_GIT);
        assert_int_equal(ri(r, "uid"), 0);
        assert_int_equal(ri(r, "pid"), getpid());

        r = one_record(recs, "pam.opened", NULL, NULL);
        assert_string_equal(rs(r, "pam_id"), pam_id);
        assert_string_equal(rs(r, "service"), "sshd");
        assert_string_equal(rs(r, "user"), "root");
        assert_string_equal(rs(r, "tty"), "pts/3");
        assert_string_equal(rs(r, "rhost"), "10.0.0.7");
        assert_string_equal(rs(r, "jti"), pjti);
        assert_string_equal(rs(r, "sid"), sid);
        assert_string_equal(rs(r, "agent"), AGENT_ID);
        assert_int_equal(ri(r, "pid"), getpid());

        r = one_record(recs, "pam.closed", NULL, NULL);
        assert_string_equal(rs(r, "pam_id"), pam_id);
        assert_string_equal(rs(r, "sid"), sid);
        assert_int_equal(ri(r, "pid"), getpid());

        r = one_record(recs, "token.revoked", NULL, NULL);
        assert_string_equal(rs(r, "decision"), "revoke");
        assert_string_equal(rs(r, "jti"), cjti);
        assert_string_equal(rs(r, "sid"), sid);
        assert_agent(r);
        assert_identity(r, exe, sha);

        r = json_array_get(recs, json_array_size(recs) - 1);
        assert_string_equal(rs(r, "event"), "policy.loaded");
        assert_string_equal(rs(r, "policy"), policy_version);
        json_decref(recs);

        /* filters, over the admin socket */
        recs = ctl_audit_json(b, "--event", "token.denied");
        assert_int_equal(json_array_size(recs), 2);
        json_decref(recs);
        recs = ctl_audit_json(b, "--agent", AGENT_ID);
        assert_int_equal(json_array_size(recs), 9); /* session, 2 issued, denied, attenuated, introspected, pam.opened, pam.closed, revoked */
        json_decref(recs);
        recs = ctl_audit_json(b, "--since", "2099-01-01T00:00:00Z");
        assert_int_equal(json_array_size(recs), 0);
        json_decref(recs);
        {
                const char *args[] = { "audit", "--agent", AGENT_ID, NULL };
                hx_run_result res;
                ctlv(b, args, &res);
                assert_int_equal(res.exit_code, 0);
                assert_non_null(strstr(res.out, "token.issued"));
                assert_non_null(strstr(res.out, jti));
                assert_null(strstr(res.out, "eyJ"));
                hx_run_result_done(&res);
        }

        /* never a token (a JWS starts with eyJ), never the key */
        {
                char *text = hx_read_text(apath, READ_MAX, NULL), keyp[PATH_MAX], *key = NULL, kb64[64];
                size_t klen = 0;
                assert_null(strstr(text, "eyJ"));
                assert_null(strstr(text, strrchr(token, '.') + 1)); /* nor a signature alone */
                hx_path_in(keyp, sizeof keyp, b->state, "signing.key");
                assert_int_equal(hx_read_file(keyp, 4096, &key, &klen), 0);
                assert_int_equal(klen, 32);
                assert_int_equal(ab_b64url_encode((const uint8_t *)key, klen, kb64, sizeof kb64), 43);
                assert_null(strstr(text, kb64));
                sodium_bin2hex(kb64, sizeof kb64, (const uint8_t *)key, 16);
                assert_null(strstr(text, kb64));
                free(key);
                free(text);
        }

        /* verify through the running broker (its file, its keys) */
        {
                const char *none[] = { NULL };
                verify_ok(b, none);
        }
        save_jwks(f, jwks, sizeof jwks);
        hx_stop_clean(b);

        /* shut down: a signed checkpoint closes the file; offline verify with the JWKS */
        recs = file_records(apath);
        assert_int_equal(json_array_size(recs), 14);
        r = json_array_get(recs, 13);
        assert_string_equal(rs(r, "event"), "audit.checkpoint");
        assert_string_equal(rs(r, "alg"), "EdDSA");
        json_decref(recs);
        assert_chain(apath);
        {
                /* offline: audit --file reads the same records */
                json_t *listed = ctl_audit_json(b, "--file", apath), *disk = file_records(apath);
                assert_true(json_equal(listed, disk));
                json_decref(listed);
                json_decref(disk);
        }
        {
                const char *args[] = { "--file", apath, "--keys", jwks, NULL };
                assert_int_equal(ctl_verify(b, args, verify_out, sizeof verify_out), 0);
                assert_non_null(strstr(verify_out, "14 records"));
                assert_non_null(strstr(verify_out, "1 signed checkpoints verified"));
        }
        free(token);
        free(child);
}

/* ---- tampering ---------------------------------------------------------------- */

/* A small trail of n issuances (plus key, policy, session, shutdown checkpoint): its path and JWKS. */
static void make_trail(fx *f, unsigned n, char *apath, size_t amax, char *jwks, size_t jmax)
{
        hx_broker *b = &f->b;
        write_policy(b, NULL);
        hx_start(b);
        hx_conn *c = hx_connect(b, b->sock);
        assert_int_equal(issue_many(c, n, NULL, NULL, 0), n);
        hx_conn_close(b, c);
        save_jwks(f, jwks, jmax);
        hx_stop_clean(b);
        audit_file(b, apath, amax);
}

/* Lines of a file (each with its newline), to rebuild variants from. */
typedef struct lines {
        char *text;
        char *line[256];
        size_t len[256];
        size_t n;
} lines;

static void lines_load(lines *l, const char *path)
{
        size_t len = 0;
        char *p;
        memset(l, 0, sizeof *l);
        l->text = hx_read_text(path, READ_MAX, &len);
        for (p = l->text; *p;) {
                char *e = strchr(p, '\n');
                assert_non_null(e);
                assert_true(l->n < 256);
                l->line[l->n] = p;
                l->len[l->n] = (size_t)(e - p) + 1;
                l->n++;
                p = e + 1;
        }
}

/* Write lines[order[0]], lines[order[1]], ... (order ends with -1) to path. */
static void lines_write(const lines *l, const int *order, const char *path)
{
        FILE *out = fopen(path, "we");
        assert_non_null(out);
        for (size_t i = 0; order[i] >= 0; i++)
                assert_int_equal(fwrite(l->line[order[i]], 1, l->len[order[i]], out), l->len[order[i]]);
        assert_int_equal(fclose(out), 0);
}

static void expect_broken(hx_broker *b, const char *file, const char *jwks, const char *where, const char *what)
{
        char out[4096];
        const char *args[] = { "--file", file, jwks ? "--keys" : NULL, jwks, NULL };
        int ex = ctl_verify(b, args, out, sizeof out);
        if (ex != 1 || !strstr(out, where) || (what && !strstr(out, what)))
                fprintf(stderr, "audit verify %s: exit %d, expected 1 naming \"%s\"%s%s:\n%s\n", file, ex, where,
                        what ? " and " : "", what ? what : "", out);
        assert_int_equal(ex, 1);
        assert_non_null(strstr(out, where));
        if (what)
                assert_non_null(strstr(out, what));
}

/* Editing one byte, deleting a line, swapping two lines: verify fails (exit 1) and names the line. */
static void test_tamper_detected(void **state)
{
        fx *f = *state;
        char apath[PATH_MAX], jwks[PATH_MAX], copy[PATH_MAX], where[PATH_MAX + 32];
        int order[300];
        lines l;

        make_trail(f, 8, apath, sizeof apath, jwks, sizeof jwks);
        lines_load(&l, apath);
        assert_int_equal(l.n, 12); /* key, policy, session, 8 issued, checkpoint */
        {
                const char *args[] = { "--file", apath, "--keys", jwks, NULL };
                verify_ok(&f->b, args);
        }
        hx_path_in(copy, sizeof copy, f->work, "tampered.jsonl");

        /* one byte of line 5 (a digit of its pid): line 6 no longer chains to it */
        {
                char *pid = strstr(l.line[4], "\"pid\":");
                assert_non_null(pid);
                pid += 6;
                char saved = *pid;
                *pid = saved == '9' ? '1' : (char)(saved + 1);
                for (int i = 0; i < (int)l.n; i++)
                        order[i] = i;
                order[l.n] = -1;
                lines_write(&l, order, copy);
                *pid = saved;
                snprintf(where, sizeof where, "%s:6: seq 6:", copy);
                expect_broken(&f->b, copy, NULL, where, "(line 5)");
                expect_broken(&f->b, copy, jwks, where, "(line 5)");
        }
        /* line 5 deleted: line 5 of the copy carries seq 6 */
        {
                int k = 0;
                for (int i = 0; i < (int)l.n; i++)
                        if (i != 4)
                                order[k++] = i;
                order[k] = -1;
                lines_write(&l, order, copy);
                snprintf(where, sizeof where, "%s:5: seq 6:", copy);
                expect_broken(&f->b, copy, NULL, where, "expected seq 5");
        }
        /* lines 4 and 5 swapped */
        {
                for (int i = 0; i < (int)l.n; i++)
                        order[i] = i;
                order[3] = 4;
                order[4] = 3;
                order[l.n] = -1;
                lines_write(&l, order, copy);
                snprintf(where, sizeof where, "%s:4: seq 5:", copy);
                expect_broken(&f->b, copy, NULL, where, "expected seq 4");
        }
        /* a line repeated */
        {
                int k = 0;
                for (int i = 0; i < (int)l.n; i++) {
                        order[k++] = i;
                        if (i == 6)
                                order[k++] = i;
                }
                order[k] = -1;
                lines_write(&l, order, copy);
                snprintf(where, sizeof where, "%s:8: seq 7:", copy);
                expect_broken(&f->b, copy, NULL, where, "expected seq 8");
        }
        /* a torn last line (no newline) */
        {
                FILE *out = fopen(copy, "we");
                assert_non_null(out);
                for (size_t i = 0; i < l.n; i++)
                        fwrite(l.line[i], 1, l.len[i], out);
                fputs("{\"decision\":\"grant\",\"uid\":0", out);
                fclose(out);
                snprintf(where, sizeof where, "%s:13:", copy);
                expect_broken(&f->b, copy, NULL, where, "torn");
        }
        /* a line that is not JSON */
        {
                FILE *out = fopen(copy, "we");
                assert_non_null(out);
                for (size_t i = 0; i < 3; i++)
                        fwrite(l.line[i], 1, l.len[i], out);
                fputs("this is not a record\n", out);
                fclose(out);
                snprintf(where, sizeof where, "%s:4:", copy);
                expect_broken(&f->b, copy, NULL, where, "not an audit record");
        }
        free(l.text);
}

/*
 * The first record deleted: the file then starts at seq 2, which only a
 * file begun by rotation may do (its first record is audit.rotated).
 */
static void test_verify_detects_missing_head(void **state)
{
        fx *f = *state;
        char apath[PATH_MAX], jwks[PATH_MAX], copy[PATH_MAX], where[PATH_MAX + 32];
        int order[300], k = 0;
        lines l;

        make_trail(f, 3, apath, sizeof apath, jwks, sizeof jwks);
        lines_load(&l, apath);
        hx_path_in(copy, sizeof copy, f->work, "headless.jsonl");
        for (int i = 1; i < (int)l.n; i++)
                order[k++] = i;
        order[k] = -1;
        lines_write(&l, order, copy);
        snprintf(where, sizeof where, "%s:1: seq 2:", copy);
        expect_broken(&f->b, copy, jwks, where, NULL);
        /* the first two: the same */
        k = 0;
        for (int i = 2; i < (int)l.n; i++)
                order[k++] = i;
        order[k] = -1;
        lines_write(&l, order, copy);
        snprintf(where, sizeof where, "%s:1: seq 3:", copy);
        expect_broken(&f->b, copy, jwks, where, NULL);
        /* forged records before seq 1: audit.rotated with seq -2 and -1 (-1 once meant "no record
         * yet", so the real seq 1 after them was taken as a new start), or a seq that overflows */
        {
                static const char *const heads[] = {
                        "{\"seq\":-2,\"prev\":\"" ZERO64 "\",\"time\":1,\"event\":\"audit.rotated\"}\n"
                        "{\"seq\":-1,\"prev\":\"" ZERO64 "\",\"time\":1,\"event\":\"audit.rotated\","
                        "\"agent\":\"demo-agent\",\"audience\":\"mcp://prod-db\",\"scopes\":\"db:admin\"}\n",
                        "{\"seq\":9223372036854775807,\"prev\":\"" ZERO64 "\",\"time\":1,\"event\":\"audit.rotated\"}\n",
                };
                for (size_t h = 0; h < sizeof heads / sizeof heads[0]; h++) {
                        FILE *w = fopen(copy, "we");
                        assert_non_null(w);
                        fputs(heads[h], w);
                        for (size_t i = 0; i < l.n; i++)
                                fwrite(l.line[i], 1, l.len[i], w);
                        assert_int_equal(fclose(w), 0);
                        snprintf(where, sizeof where, "%s:1: seq %s:", copy, h ? "9223372036854775807" : "-2");
                        expect_broken(&f->b, copy, jwks, where, "seq out of range");
                }
        }
        free(l.text);
}

/*
 * Rewriting history properly (edit a record, recompute every prev after
 * it) defeats the hash chain alone; only the signed checkpoint catches it,
 * so verify with the JWKS fails at the checkpoint line. A checkpoint whose
 * signature or kid is changed fails too.
 */
static void test_checkpoint_signatures(void **state)
{
        fx *f = *state;
        char apath[PATH_MAX], jwks[PATH_MAX], copy[PATH_MAX], where[PATH_MAX + 32], out[4096];
        lines l;
        FILE *w;

        make_trail(f, 4, apath, sizeof apath, jwks, sizeof jwks);
        lines_load(&l, apath);
        assert_int_equal(l.n, 8);
        hx_path_in(copy, sizeof copy, f->work, "forged.jsonl");

        /* a changed signature on the (last) checkpoint */
        {
                char *sig = strstr(l.line[7], "\"sig\":\"");
                assert_non_null(sig);
                sig += 7 + 10;
                char saved = *sig;
                *sig = saved == 'A' ? 'B' : 'A';
                int order[] = { 0, 1, 2, 3, 4, 5, 6, 7, -1 };
                lines_write(&l, order, copy);
                *sig = saved;
                snprintf(where, sizeof where, "%s:8: seq 8:", copy);
                expect_broken(&f->b, copy, jwks, where, "signature does not verify");
        }
        /* a kid the broker never had */
        {
                char *kid = strstr(l.line[7], "\"kid\":\"");
                assert_non_null(kid);
                kid += 7 + 5;
                char saved = *kid;
                *kid = saved == 'A' ? 'B' : 'A';
                int order[] = { 0, 1, 2, 3, 4, 5, 6, 7, -1 };
                lines_write(&l, order, copy);
                *kid = saved;
                snprintf(where, sizeof where, "%s:8: seq 8:", copy);
                expect_broken(&f->b, copy, jwks, where, "does not list");
        }
        /* the (last) checkpoint's alg changed: refused, whatever the signature */
        {
                char *alg = strstr(l.line[7], "\"alg\":\"EdDSA\"");
                assert_non_null(alg);
                alg[11] = 'a'; /* EdDSa */
                int order[] = { 0, 1, 2, 3, 4, 5, 6, 7, -1 };
                lines_write(&l, order, copy);
                alg[11] = 'A';
                snprintf(where, sizeof where, "%s:8: seq 8:", copy);
                expect_broken(&f->b, copy, jwks, where, "alg is not EdDSA");
        }
        /* the last checkpoint (which no later hash covers) given members its signature does not cover */
        {
                char *saved = l.line[7], forged[1024];
                size_t len = l.len[7];
                int order[] = { 0, 1, 2, 3, 4, 5, 6, 7, -1 };
                int n = snprintf(forged, sizeof forged, "%.*s,\"decision\":\"revoke\",\"agent\":\"demo-agent\"}\n",
                                 (int)len - 2, saved); /* without its closing brace and newline */
                assert_true(n > 0 && (size_t)n < sizeof forged);
                l.line[7] = forged;
                l.len[7] = (size_t)n;
                lines_write(&l, order, copy);
                l.line[7] = saved;
                l.len[7] = len;
                snprintf(where, sizeof where, "%s:8: seq 8:", copy);
                expect_broken(&f->b, copy, jwks, where, "a checkpoint holds time, event, seq, prev, kid, sig and alg only");
        }
        /* a record appended after the last checkpoint, chained right: the chain alone cannot tell, and
         * verify says how many records only the chain protects */
        {
                uint8_t h[crypto_hash_sha256_BYTES];
                char prev[65], extra[512];
                int order[] = { 0, 1, 2, 3, 4, 5, 6, 7, -1 };
                crypto_hash_sha256(h, (const uint8_t *)l.line[7], l.len[7] - 1);
                sodium_bin2hex(prev, sizeof prev, h, sizeof h);
                lines_write(&l, order, copy);
                snprintf(extra, sizeof extra,
                         "{\"seq\":9,\"prev\":\"%s\",\"time\":1,\"event\":\"token.issued\",\"decision\":\"grant\"}\n",
                         prev);
                w = fopen(copy, "ae");
                assert_non_null(w);
                fputs(extra, w);
                assert_int_equal(fclose(w), 0);
                const char *args[] = { "--file", copy, "--keys", jwks, NULL };
                assert_int_equal(ctl_verify(&f->b, args, out, sizeof out), 0);
                assert_non_null(strstr(out, "the last 1 records follow the last verified checkpoint"));
                /* the file as written ends with a checkpoint: nothing after it */
                const char *args2[] = { "--file", apath, "--keys", jwks, NULL };
                assert_int_equal(ctl_verify(&f->b, args2, out, sizeof out), 0);
                assert_null(strstr(out, "follow the last verified checkpoint"));
        }
        /* a rewritten chain: record 4 (a token.issued) names another audience; prevs recomputed */
        {
                char prev[65] = ZERO64;
                w = fopen(copy, "we");
                assert_non_null(w);
                for (size_t i = 0; i < l.n; i++) {
                        json_t *rec = json_loadb(l.line[i], l.len[i] - 1, 0, NULL);
                        uint8_t h[crypto_hash_sha256_BYTES];
                        assert_non_null(rec);
                        if (i == 3)
                                json_object_set_new(rec, "audience", json_string("https://evil.example"));
                        json_object_set_new(rec, "prev", json_string(prev));
                        char *s = json_dumps(rec, JSON_COMPACT);
                        assert_non_null(s);
                        fprintf(w, "%s\n", s);
                        crypto_hash_sha256(h, (const uint8_t *)s, strlen(s));
                        sodium_bin2hex(prev, sizeof prev, h, sizeof h);
                        free(s);
                        json_decref(rec);
                }
                assert_int_equal(fclose(w), 0);
                /* without keys the chain alone looks intact: verify says the checkpoint went unchecked */
                const char *args[] = { "--file", copy, NULL };
                assert_int_equal(ctl_verify(&f->b, args, out, sizeof out), 0);
                assert_non_null(strstr(out, "1 not checked"));
                snprintf(where, sizeof where, "%s:8: seq 8:", copy);
                expect_broken(&f->b, copy, jwks, where, "signature does not verify");
        }
        free(l.text);
}

/*
 * Key rotation: checkpoints signed by the old key still verify, through the
 * running broker (which lists retired keys) and with `keys` as JWKS.
 */
static void test_checkpoints_across_key_rotation(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jwks[PATH_MAX], out[4096];
        hx_run_result res;
        json_t *recs;

        make_trail(f, 2, apath, sizeof apath, jwks, sizeof jwks); /* checkpoint 1: old key */
        hx_start(b);
        {
                const char *args[] = { "keys", "rotate", NULL };
                ctlv(b, args, &res);
                assert_int_equal(res.exit_code, 0);
                hx_run_result_done(&res);
        }
        hx_conn *c = hx_connect(b, b->sock);
        assert_int_equal(issue_many(c, 2, NULL, NULL, 0), 2);
        hx_conn_close(b, c);
        {
                const char *none[] = { NULL };
                assert_int_equal(ctl_verify(b, none, out, sizeof out), 0);
                assert_non_null(strstr(out, "1 signed checkpoints verified"));
        }
        save_jwks(f, jwks, sizeof jwks);
        hx_stop_clean(b); /* checkpoint 2: new key */
        recs = file_records(apath);
        assert_int_equal(count_event(recs, "key.rotated"), 1);
        assert_int_equal(count_event(recs, "audit.checkpoint"), 2);
        {
                const char *kids[2];
                size_t i, k = 0;
                json_t *r;
                json_array_foreach(recs, i, r)
                        if (strcmp(rs(r, "event"), "audit.checkpoint") == 0)
                                kids[k++] = rs(r, "kid");
                assert_string_not_equal(kids[0], kids[1]);
        }
        json_decref(recs);
        const char *args[] = { "--file", apath, "--keys", jwks, NULL };
        assert_int_equal(ctl_verify(b, args, out, sizeof out), 0);
        assert_non_null(strstr(out, "2 signed checkpoints verified"));
}

/*
 * Many rotations: a key in its overlap is never dropped to make room. 280
 * rotations with overlap 0 (--force: each ends every earlier key), then a
 * token, then 19 with the default overlap: the list (256 keys) drops ended
 * keys, never one in its overlap (before, 16 retired keys were kept and a
 * key in overlap was dropped: a live token became unknown_key); ListKeys
 * still fits one message; the checkpoint of the first key, which the list
 * no longer holds, verifies with the key set saved before.
 */
static void test_many_rotations_keep_keys_in_overlap(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jwks[PATH_MAX], out[4096], *tok;
        json_t *root;
        hx_conn *c, *adm;
        hx_run_result res;

        make_trail(f, 2, apath, sizeof apath, jwks, sizeof jwks); /* a checkpoint signed by the first key */
        hx_start(b);
        c = hx_connect(b, b->sock);
        adm = hx_connect(b, b->admin_sock);
        for (int i = 0; i < 280; i++) {
                root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.RotateKey\",\"parameters\":"
                                    "{\"overlap\":0,\"force\":true}}");
                hx_assert_ok(root);
                json_decref(root);
        }
        root = hx_call(c, ISSUE_GIT_READ);
        hx_assert_ok(root);
        tok = strdup(hx_reply_str(root, "token"));
        json_decref(root);
        for (int i = 0; i < 19; i++) {
                root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.RotateKey\"}");
                hx_assert_ok(root);
                json_decref(root);
        }
        root = callf(c, "{\"method\":\"io.agentbroker.Introspect\",\"parameters\":{\"token\":\"%s\"}}", tok);
        hx_assert_ok(root);
        if (!json_is_true(json_object_get(hx_reply_params(root), "active")))
                fprintf(stderr, "after 299 rotations the token is %s\n", hx_reply_str(root, "reason"));
        assert_true(json_is_true(json_object_get(hx_reply_params(root), "active")));
        json_decref(root);
        {
                const char *args[] = { "keys", "list", "--json", NULL };
                ctlv(b, args, &res);
                assert_int_equal(res.exit_code, 0);
                hx_run_result_done(&res);
        }
        {
                const char *args[] = { "--keys", jwks, NULL };
                assert_int_equal(ctl_verify(b, args, out, sizeof out), 0);
                assert_non_null(strstr(out, "1 signed checkpoints verified"));
        }
        /* more keys in their overlap than the list holds (19 + 250), then a forced rotation: every
         * one ends, in the store too, so a restart brings none back into the key set */
        for (int i = 0; i < 250; i++) {
                root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.RotateKey\"}");
                hx_assert_ok(root);
                json_decref(root);
        }
        root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.RotateKey\",\"parameters\":"
                            "{\"overlap\":0,\"force\":true}}");
        hx_assert_ok(root);
        json_decref(root);
        hx_stop_clean(b);
        hx_start(b);
        c = hx_connect(b, b->sock);
        root = hx_call(c, "{\"method\":\"io.agentbroker.GetKeys\"}");
        hx_assert_ok(root);
        assert_int_equal(json_array_size(json_object_get(hx_reply_params(root), "keys")), 1);
        json_decref(root);
        root = callf(c, "{\"method\":\"io.agentbroker.Introspect\",\"parameters\":{\"token\":\"%s\"}}", tok);
        hx_assert_ok(root);
        assert_string_equal(hx_reply_str(root, "reason"), "unknown_key");
        json_decref(root);
        free(tok);
        hx_stop_clean(b);
}

/* A checkpoint every 1000 records: signed, and the chain verifies with them. */
static void test_periodic_checkpoints(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jwks[PATH_MAX], out[4096];
        json_t *recs, *r;
        long long last = 0;
        size_t i, n = 0;

        hx_add_arg(b, "--rate-limit");
        hx_add_arg(b, "0");
        make_trail(f, 2100, apath, sizeof apath, jwks, sizeof jwks);
        recs = file_records(apath);
        json_array_foreach(recs, i, r) {
                if (strcmp(rs(r, "event"), "audit.checkpoint") != 0)
                        continue;
                n++;
                /* at most 1000 records since the last one (plus one group commit's worth) */
                assert_true(ri(r, "seq") - last <= 1000 + 64 + 1);
                last = ri(r, "seq");
        }
        assert_int_equal(n, 3); /* two periodic, one at shutdown */
        json_decref(recs);
        const char *args[] = { "--file", apath, "--keys", jwks, NULL };
        assert_int_equal(ctl_verify(b, args, out, sizeof out), 0);
        assert_non_null(strstr(out, "3 signed checkpoints verified"));
}

/* ---- crashes ---------------------------------------------------------------- */

/* A torn last line (a crash mid-write) is cut at start; the records after it chain on. */
static void test_torn_tail_cut_on_restart(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jwks[PATH_MAX];
        json_t *recs;
        size_t before;
        int fd;

        make_trail(f, 3, apath, sizeof apath, jwks, sizeof jwks);
        recs = file_records(apath);
        before = json_array_size(recs);
        json_decref(recs);
        fd = open(apath, O_WRONLY | O_APPEND | O_CLOEXEC);
        assert_true(fd >= 0);
        static const char torn[] = "{\"decision\":\"grant\",\"uid\":0,\"gid\":0,\"pid\":4";
        assert_int_equal(write(fd, torn, sizeof torn - 1), (ssize_t)(sizeof torn - 1));
        close(fd);

        hx_start(b);
        hx_conn *c = hx_connect(b, b->sock);
        assert_int_equal(issue_many(c, 3, NULL, NULL, 0), 3);
        hx_conn_close(b, c);
        hx_stop_clean(b);
        recs = file_records(apath); /* no NUL bytes where the torn line was */
        /* 3 issued and a checkpoint (this process's session from the first run goes on) */
        assert_int_equal(json_array_size(recs), before + 3 + 1);
        assert_int_equal(count_event(recs, "token.issued"), 6);
        json_decref(recs);
        assert_chain(apath);
        const char *args[] = { "--file", apath, "--keys", jwks, NULL };
        verify_ok(b, args);
}

/*
 * A restart after kill -9 takes over records that follow the last
 * checkpoint: the log says so, and a clean stop still ends the file with a
 * checkpoint that signs them (before, with no new record, it wrote none).
 */
static void test_checkpoint_owed_after_crash(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jwks[PATH_MAX], out[4096];
        json_t *recs;

        write_policy(b, NULL);
        hx_start(b);
        save_jwks(f, jwks, sizeof jwks);
        hx_conn *c = hx_connect(b, b->sock);
        assert_int_equal(issue_many(c, 3, NULL, NULL, 0), 3);
        hx_conn_close(b, c);
        kill9(b);
        audit_file(b, apath, sizeof apath);
        hx_start(b);
        hx_stop_clean(b);
        {
                char *log = hx_read_text(b->log, READ_MAX, NULL);
                assert_non_null(log);
                assert_non_null(strstr(log, "does not end with a checkpoint"));
                free(log);
        }
        recs = file_records(apath);
        assert_string_equal(rs(json_array_get(recs, json_array_size(recs) - 1), "event"), "audit.checkpoint");
        json_decref(recs);
        const char *args[] = { "--file", apath, "--keys", jwks, NULL };
        assert_int_equal(ctl_verify(b, args, out, sizeof out), 0);
        assert_null(strstr(out, "follow the last verified checkpoint"));
}

/*
 * `audit` prints a record's strings so that none can pose as another line
 * or move the cursor: a newline, ESC and a right-to-left override in a
 * reason (an executable's path reaches it) come out as \xNN, a quote as \".
 */
static void test_listing_escapes_control_characters(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char path[PATH_MAX];
        hx_run_result res;
        FILE *w;

        hx_path_in(path, sizeof path, f->work, "shaped.jsonl");
        w = fopen(path, "we");
        assert_non_null(w);
        fputs("{\"seq\":1,\"prev\":\"" ZERO64 "\",\"time\":1000000,\"event\":\"token.denied\",\"decision\":\"deny\","
              "\"agent\":\"a\\nb\",\"reason\":\"exe /tmp/x\\n2026-11-29T09:00:00.000000Z 3 token.revoked revoke "
              "\\u001b[1A\\u202e\\\"q\\\"\"}\n",
              w);
        assert_int_equal(fclose(w), 0);
        const char *args[] = { "audit", "--file", path, NULL };
        ctlv(b, args, &res);
        assert_int_equal(res.exit_code, 0);
        if (strchr(res.out, '\n') != res.out + strlen(res.out) - 1 || strchr(res.out, 0x1b))
                fprintf(stderr, "audit printed:\n%s\n", res.out);
        assert_true(strchr(res.out, '\n') == res.out + strlen(res.out) - 1); /* one line */
        assert_null(strchr(res.out, 0x1b));
        assert_null(strstr(res.out, "\xe2\x80\xae"));
        assert_non_null(strstr(res.out, "agent=a\\x0ab"));
        assert_non_null(strstr(res.out, "exe /tmp/x\\x0a2026"));
        assert_non_null(strstr(res.out, "\\x1b[1A\\xe2\\x80\\xae\\\"q\\\"\""));
        hx_run_result_done(&res);
}

/* A complete last line that is not a record: the broker refuses to start and says why. */
static void test_garbage_tail_refused(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jwks[PATH_MAX], *log;
        int fd;

        make_trail(f, 1, apath, sizeof apath, jwks, sizeof jwks);
        fd = open(apath, O_WRONLY | O_APPEND | O_CLOEXEC);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, "garbage\n", 8), 8);
        close(fd);
        assert_int_equal(hx_broker_start(b), -ECHILD);
        b->pid = 0;
        log = hx_read_text(b->log, READ_MAX, NULL);
        assert_non_null(strstr(log, "not a valid audit record"));
        free(log);
}

#define BURST_CLIENTS 4
#define BURST_MS 1500

/* A client issuing as fast as it can, appending each jti it receives to its file. */
static int burst_client(const char *sock, const char *jtifile)
{
        hx_conn *c = NULL;
        int fd = open(jtifile, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        unsigned got = 0;

        if (fd < 0 || hx_conn_open(NULL, sock, &c) < 0)
                return 2;
        for (;;) {
                json_t *root = NULL;
                char line[128];
                int r = hx_conn_call(c, ISSUE_GIT_READ, &root);
                if (r != 1)
                        break; /* the broker is gone */
                if (!hx_reply_error(root) && hx_reply_str(root, "token") && hx_reply_str(root, "jti")) {
                        int n = snprintf(line, sizeof line, "%s\n", hx_reply_str(root, "jti"));
                        if (write(fd, line, (size_t)n) != n)
                                return 4;
                        got++;
                }
                json_decref(root);
        }
        hx_conn_close(NULL, c);
        close(fd);
        return got > 0 ? 0 : 3;
}

/*
 * kill -9 in the middle of a burst: every token a client received has its
 * token.issued record in the file after the restart, and the chain verifies.
 */
static void test_kill9_during_burst(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jwks[PATH_MAX], jf[BURST_CLIENTS][PATH_MAX];
        pid_t kids[BURST_CLIENTS];
        json_t *jtis = NULL, *recs; /* made after the forks: a child exits without freeing */
        long long t0, t1;

        hx_add_arg(b, "--rate-limit");
        hx_add_arg(b, "0");
        write_policy(b, NULL);
        hx_start(b);
        save_jwks(f, jwks, sizeof jwks);
        audit_file(b, apath, sizeof apath);
        t0 = hx_now_ms();
        for (int i = 0; i < BURST_CLIENTS; i++) {
                char name[32];
                snprintf(name, sizeof name, "jtis.%d", i);
                hx_path_in(jf[i], sizeof jf[i], f->work, name);
                fflush(NULL);
                kids[i] = fork();
                assert_true(kids[i] >= 0);
                if (kids[i] == 0) {
                        alarm(30);
                        _exit(burst_client(b->sock, jf[i]));
                }
        }
        usleep(BURST_MS * 1000);
        kill9(b);
        t1 = hx_now_ms();
        jtis = json_array();
        for (int i = 0; i < BURST_CLIENTS; i++) {
                int st = 0;
                assert_int_equal(waitpid(kids[i], &st, 0), kids[i]);
                assert_true(WIFEXITED(st));
                assert_int_equal(WEXITSTATUS(st), 0);
                char *text = hx_read_text(jf[i], READ_MAX, NULL);
                json_t *got = json_array();
                for (char *p = text, *e; (e = strchr(p, '\n')); p = e + 1) {
                        *e = '\0';
                        assert_int_equal(strlen(p), 43);
                        json_array_append_new(got, json_string(p));
                }
                json_array_extend(jtis, got);
                json_decref(got);
                free(text);
        }
        fprintf(stderr, "burst: %zu tokens received by %d clients in %lld ms before kill -9 (%.0f tokens/s)\n",
                json_array_size(jtis), BURST_CLIENTS, t1 - t0, json_array_size(jtis) * 1000.0 / (double)(t1 - t0));
        assert_true(json_array_size(jtis) >= BURST_CLIENTS);

        /* restart: it recovers the chain head (cutting any torn tail), and we stop it cleanly */
        hx_start(b);
        {
                const char *none[] = { NULL };
                verify_ok(b, none);
        }
        hx_stop_clean(b);
        recs = file_records(apath);
        assert_all_issued_recorded(recs, jtis);
        fprintf(stderr, "burst: %zu token.issued records in the file (%zu received: replies lost in flight are "
                        "recorded but were never seen)\n",
                count_event(recs, "token.issued"), json_array_size(jtis));
        assert_true(count_event(recs, "token.issued") >= json_array_size(jtis));
        json_decref(recs);
        assert_chain(apath);
        const char *args[] = { "--file", apath, "--keys", jwks, NULL };
        verify_ok(b, args);
        json_decref(jtis);
}

/* ---- a tiny filesystem -------------------------------------------------------- */

/* Fill the filesystem of dir with dir/filler, leaving about leave bytes. */
static void fill(const char *dir, char *filler, size_t fmax, size_t leave)
{
        struct statvfs sv;
        char buf[4096];
        memset(buf, 'x', sizeof buf);
        hx_path_in(filler, fmax, dir, "filler");
        assert_int_equal(statvfs(dir, &sv), 0);
        size_t avail = (size_t)sv.f_bavail * sv.f_frsize;
        int fd = open(filler, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        for (size_t done = 0; done + leave < avail; done += sizeof buf)
                if (write(fd, buf, sizeof buf) != (ssize_t)sizeof buf)
                        break;
        close(fd);
}

/*
 * Issue one at a time on c until refused. Returns the number issued;
 * the refusal's error name and reason go to err / reason.
 */
static unsigned issue_until_refused(hx_conn *c, json_t *jtis, unsigned max, char *err, size_t errmax, char *reason,
                                    size_t rmax)
{
        unsigned ok = 0;
        err[0] = reason[0] = '\0';
        for (unsigned i = 0; i < max; i++) {
                json_t *root = hx_call(c, ISSUE_GIT_READ);
                if (hx_reply_error(root)) {
                        snprintf(err, errmax, "%s", hx_reply_error(root));
                        snprintf(reason, rmax, "%s", hx_reply_str(root, "reason") ? hx_reply_str(root, "reason") : "");
                        assert_null(json_object_get(hx_reply_params(root), "token"));
                        json_decref(root);
                        return ok;
                }
                json_array_append_new(jtis, json_string(hx_reply_str(root, "jti")));
                ok++;
                json_decref(root);
        }
        return ok;
}

static void assert_serving(hx_broker *b, hx_conn *c)
{
        json_t *root = hx_call(c, "{\"method\":\"org.varlink.service.GetInfo\"}");
        hx_assert_ok(root);
        json_decref(root);
        hx_conn *c2 = hx_connect(b, b->sock);
        root = hx_call(c2, "{\"method\":\"org.varlink.service.GetInfo\"}");
        hx_assert_ok(root);
        json_decref(root);
        hx_conn_close(b, c2);
}

/*
 * The audit file on a tiny tmpfs (state elsewhere): issuance is refused with
 * AuditUnavailable and a clear reason, nothing else breaks, and when space
 * returns issuance works again and the chain still verifies.
 */
static void test_tiny_fs_audit_log(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char tiny[PATH_MAX], apath[PATH_MAX], filler[PATH_MAX], jwks[PATH_MAX], err[128], reason[512];
        json_t *jtis = json_array(), *recs, *root;
        unsigned ok, later = 0;
        hx_conn *c, *adm;

        hx_path_in(tiny, sizeof tiny, f->work, "tiny");
        hx_fixture_mount(f, tiny, "128k");
        hx_path_in(apath, sizeof apath, tiny, "audit.jsonl");
        hx_add_arg(b, "--audit-log");
        hx_add_arg(b, apath);
        hx_add_arg(b, "--rate-limit");
        hx_add_arg(b, "0");
        write_policy(b, NULL);
        hx_start(b);
        save_jwks(f, jwks, sizeof jwks);
        fill(tiny, filler, sizeof filler, 16 * 1024);
        c = hx_connect(b, b->sock);
        ok = issue_until_refused(c, jtis, 400, err, sizeof err, reason, sizeof reason);
        fprintf(stderr, "tiny fs (audit log): %u tokens, then %s: %s\n", ok, err, reason);
        assert_true(ok > 0);
        assert_string_equal(err, "io.agentbroker.AuditUnavailable");
        assert_non_null(strstr(reason, "No space left on device"));
        assert_non_null(strstr(reason, "nothing was issued"));
        /* still full: still refused, never a token */
        for (int i = 0; i < 5; i++) {
                root = hx_call(c, ISSUE_GIT_READ);
                if (!hx_reply_error(root)) {
                        json_array_append_new(jtis, json_string(hx_reply_str(root, "jti")));
                        later++;
                } else {
                        hx_assert_error_name(root, "io.agentbroker.AuditUnavailable");
                        assert_null(json_object_get(hx_reply_params(root), "token"));
                }
                json_decref(root);
        }
        assert_true(later < 5);
        /* everything else still answers */
        assert_serving(b, c);
        adm = hx_connect(b, b->admin_sock);
        root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.ReadAudit\",\"parameters\":{\"limit\":1}}");
        hx_assert_ok(root);
        json_decref(root);

        /* space returns */
        assert_int_equal(unlink(filler), 0);
        assert_int_equal(issue_many(c, 5, jtis, NULL, 0), 5);
        {
                const char *none[] = { NULL };
                verify_ok(b, none);
        }
        hx_stop_clean(b);
        recs = file_records(apath);
        assert_all_issued_recorded(recs, jtis);
        /* no record of a refused token survives */
        assert_int_equal(count_event(recs, "token.issued"), json_array_size(jtis));
        json_decref(recs);
        assert_chain(apath);
        const char *args[] = { "--file", apath, "--keys", jwks, NULL };
        verify_ok(b, args);
        json_decref(jtis);
}

/*
 * The whole state dir (LMDB, key, audit file) on a tiny tmpfs. Each request
 * comes from a new process (a new session: an LMDB write). Whichever fills
 * first, issuance is refused with a clear error, the broker keeps serving,
 * and it recovers.
 */
static void test_tiny_fs_state_dir(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char helper[PATH_MAX], filler[PATH_MAX], apath[PATH_MAX], jwks[PATH_MAX], refusal[512] = "";
        char *argv[] = { helper, b->sock, (char *)AUD_GIT, (char *)"repo:read", NULL };
        json_t *jtis = json_array(), *recs, *root;
        unsigned ok = 0, i;
        hx_run_result res;

        assert_int_equal(hx_build_path("tests/helper-issue", helper, sizeof helper), 0);
        hx_fixture_mount(f, b->state, "256k");
        hx_add_arg(b, "--rate-limit");
        hx_add_arg(b, "0");
        write_policy(b, NULL);
        hx_start(b);
        save_jwks(f, jwks, sizeof jwks);
        audit_file(b, apath, sizeof apath);
        fill(b->state, filler, sizeof filler, 12 * 1024);
        for (i = 0; i < 200; i++) {
                assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, &res), 0);
                if (res.exit_code != 0) {
                        snprintf(refusal, sizeof refusal, "%s", res.out);
                        assert_int_equal(res.exit_code, 1);
                        assert_null(strstr(res.out, "eyJ"));
                        hx_run_result_done(&res);
                        break;
                }
                assert_true(strncmp(res.out, "OK eyJ", 6) == 0);
                json_t *claims = hx_jwt_segment_json(res.out + 3, 1);
                assert_non_null(claims);
                json_array_append_new(jtis, json_string(rs(claims, "jti")));
                json_decref(claims);
                ok++;
                hx_run_result_done(&res);
        }
        refusal[strcspn(refusal, "\n")] = '\0';
        fprintf(stderr, "tiny fs (state dir): %u tokens, then: %s\n", ok, refusal);
        assert_true(ok > 0);
        assert_true(i < 200);
        assert_true(strstr(refusal, "ERR io.agentbroker.AuditUnavailable: ") ||
                    strstr(refusal, "ERR io.agentbroker.InternalError: "));
        assert_true(strstr(refusal, "No space left on device") || strstr(refusal, "full"));
        hx_conn *c = hx_connect(b, b->sock);
        assert_serving(b, c);

        assert_int_equal(unlink(filler), 0);
        for (i = 0; i < 3; i++) {
                assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, &res), 0);
                if (res.exit_code != 0)
                        fprintf(stderr, "after freeing space: %s", res.out);
                assert_int_equal(res.exit_code, 0);
                json_t *claims = hx_jwt_segment_json(res.out + 3, 1);
                json_array_append_new(jtis, json_string(rs(claims, "jti")));
                json_decref(claims);
                hx_run_result_done(&res);
        }
        /* the usage counters made it to LMDB once there was room */
        hx_conn *adm = hx_connect(b, b->admin_sock);
        root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.GetUsage\",\"parameters\":{}}");
        hx_assert_ok(root);
        json_t *row = json_array_get(json_object_get(hx_reply_params(root), "usage"), 0);
        fprintf(stderr, "tiny fs (state dir): usage count %lld for %zu tokens received\n", ri(row, "count"),
                json_array_size(jtis));
        assert_true(ri(row, "count") >= (long long)json_array_size(jtis));
        json_decref(root);
        hx_stop_clean(b);
        recs = file_records(apath);
        assert_all_issued_recorded(recs, jtis);
        json_decref(recs);
        assert_chain(apath);
        const char *args[] = { "--file", apath, "--keys", jwks, NULL };
        verify_ok(b, args);
        json_decref(jtis);
}

/* ---- rotation ----------------------------------------------------------------- */

/* The broker rotating its audit file at 1 MiB, --audit-keep keep unless NULL, no rate limit (floods). */
static void start_rotating(hx_broker *b, const char *keep)
{
        hx_add_arg(b, "--audit-max-size");
        hx_add_arg(b, "1");
        if (keep) {
                hx_add_arg(b, "--audit-keep");
                hx_add_arg(b, keep);
        }
        hx_add_arg(b, "--rate-limit");
        hx_add_arg(b, "0");
        write_policy(b, NULL);
        hx_start(b);
}

/* --audit-max-size 1: past 1 MiB the file rotates; the chain goes on across both files. */
static void test_rotation(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], old[PATH_MAX], old2[PATH_MAX], jwks[PATH_MAX], out[4096];
        json_t *recs, *first, *listed;
        struct stat st;
        unsigned total = 0;
        hx_conn *c;

        start_rotating(b, NULL);
        save_jwks(f, jwks, sizeof jwks);
        audit_file(b, apath, sizeof apath);
        snprintf(old, sizeof old, "%s.1", apath);
        snprintf(old2, sizeof old2, "%s.2", apath);
        c = hx_connect(b, b->sock);
        while (stat(old, &st) < 0 && total < 6000) {
                assert_int_equal(issue_many(c, 256, NULL, NULL, 0), 256);
                total += 256;
        }
        assert_int_equal(stat(old, &st), 0);
        assert_true(st.st_size >= 1024 * 1024);
        assert_true(st.st_size < 1024 * 1024 + 128 * 1024);
        assert_true(stat(old2, &st) < 0);
        assert_int_equal(issue_many(c, 10, NULL, NULL, 0), 10);

        /* ReadAudit pages: limit, next_seq, more; skipped (filtered) records count as read */
        {
                hx_conn *adm = hx_connect(b, b->admin_sock);
                json_t *root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.ReadAudit\",\"parameters\":{\"limit\":5}}");
                json_t *p = hx_reply_params(root), *recs5 = json_object_get(p, "records");
                hx_assert_ok(root);
                assert_int_equal(json_array_size(recs5), 5);
                assert_true(json_is_true(json_object_get(p, "more")));
                assert_int_equal(ri(p, "next_seq"), ri(json_array_get(recs5, 4), "seq"));
                assert_string_equal(rs(p, "file"), apath);
                long long next = ri(p, "next_seq");
                json_decref(root);
                root = callf(adm,
                             "{\"method\":\"io.agentbroker.admin.ReadAudit\",\"parameters\":{\"after_seq\":%lld,"
                             "\"event\":\"audit.checkpoint\",\"limit\":200}}",
                             next);
                hx_assert_ok(root);
                p = hx_reply_params(root);
                json_t *r;
                size_t i;
                json_array_foreach(json_object_get(p, "records"), i, r) {
                        assert_string_equal(rs(r, "event"), "audit.checkpoint");
                        assert_true(ri(r, "seq") > next);
                }
                assert_false(json_is_true(json_object_get(p, "more")));
                json_decref(root);
                root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.ReadAudit\",\"parameters\":{\"limit\":201}}");
                hx_assert_error_name(root, "io.agentbroker.InvalidParameter");
                json_decref(root);
                hx_conn_close(b, adm);
        }
        /* the broker reads (and pages through) its current file only */
        listed = ctl_audit_json(b, NULL, NULL);
        recs = file_records(apath);
        assert_true(json_equal(listed, recs));
        json_decref(listed);
        json_decref(recs);
        hx_stop_clean(b);

        recs = file_records(old);
        assert_string_equal(rs(json_array_get(recs, json_array_size(recs) - 1), "event"), "audit.checkpoint");
        long long last_seq = ri(json_array_get(recs, json_array_size(recs) - 1), "seq");
        json_decref(recs);
        recs = file_records(apath);
        first = json_array_get(recs, 0);
        assert_string_equal(rs(first, "event"), "audit.rotated");
        assert_string_equal(rs(first, "previous_file"), old);
        assert_int_equal(ri(first, "seq"), last_seq + 1);
        json_decref(recs);
        assert_chain(old);

        {
                const char *args[] = { "--file", old, "--file", apath, "--keys", jwks, NULL };
                assert_int_equal(ctl_verify(b, args, out, sizeof out), 0);
                assert_non_null(strstr(out, "audit chain intact"));
                fprintf(stderr, "rotation after %u tokens: %s", total, out);
        }
        {
                /* the current file alone starts mid-chain, at its audit.rotated record */
                const char *args[] = { "--file", apath, "--keys", jwks, NULL };
                verify_ok(b, args);
        }
        {
                /* the wrong order */
                const char *args[] = { "--file", apath, "--file", old, "--keys", jwks, NULL };
                char where[PATH_MAX + 8];
                snprintf(where, sizeof where, "%s:1:", old);
                assert_int_equal(ctl_verify(b, args, out, sizeof out), 1);
                assert_non_null(strstr(out, where));
        }
        {
                /* a crash between rotation's two renames: PATH gone, PATH.new there; the next start
                 * finishes the rotation instead of beginning a new chain at seq 1 */
                char fresh[PATH_MAX + 8];
                const char *args[] = { "--file", old, "--file", apath, "--keys", jwks, NULL };
                snprintf(fresh, sizeof fresh, "%s.new", apath);
                assert_int_equal(rename(apath, fresh), 0);
                hx_start(b);
                hx_stop_clean(b);
                assert_true(stat(fresh, &st) < 0);
                assert_int_equal(ctl_verify(b, args, out, sizeof out), 0);
                assert_non_null(strstr(out, "audit chain intact"));
        }
}

/*
 * Rotation when the new file cannot be created (no inode left on the
 * audit filesystem): issuance must not stay broken; once an inode is free
 * again it works and the chain verifies across the files.
 */
static void test_rotation_without_inode(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char tiny[PATH_MAX], apath[PATH_MAX], old[PATH_MAX], filler[PATH_MAX], jwks[PATH_MAX], err[128] = "";
        unsigned total = 0, ok = 0;
        struct stat st;
        hx_conn *c;

        hx_path_in(tiny, sizeof tiny, f->work, "tiny");
        (void)mkdir(tiny, 0700);
        if (mount("tmpfs", tiny, "tmpfs", MS_NOSUID | MS_NODEV, "size=8m,nr_inodes=3,mode=0700") < 0) {
                fprintf(stderr, "mount tmpfs: %s\n", strerror(errno));
                fail();
        }
        snprintf(f->mnt, sizeof f->mnt, "%s", tiny);
        hx_path_in(apath, sizeof apath, tiny, "audit.jsonl");
        snprintf(old, sizeof old, "%s.1", apath);
        hx_add_arg(b, "--audit-log");
        hx_add_arg(b, apath);
        start_rotating(b, NULL);
        save_jwks(f, jwks, sizeof jwks);
        hx_path_in(filler, sizeof filler, tiny, "filler"); /* the last inode: root, audit.jsonl, this */
        assert_int_equal(hx_write_file(filler, "x", 0600), 0);
        c = hx_connect(b, b->sock);
        /* well past 1 MiB: the broker tries to rotate, cannot create the new file, and goes on */
        while (total < 2560) {
                ok += issue_many(c, 256, NULL, err, sizeof err);
                total += 256;
        }
        fprintf(stderr, "rotation without an inode: %u of %u issued%s%s\n", ok, total, err[0] ? "; then " : "", err);
        if (ok != total)
                fprintf(stderr, "GAP: a failed rotation broke issuance (%s)\n", err);
        assert_int_equal(ok, total);
        assert_true(stat(old, &st) < 0);
        /* the inode returns: the next attempt rotates */
        assert_int_equal(unlink(filler), 0);
        ok = issue_many(c, 256, NULL, err, sizeof err);
        if (ok != 256)
                fprintf(stderr, "GAP: with the inode back, %u of 256 issued (%s)\n", ok, err);
        assert_int_equal(ok, 256);
        assert_int_equal(stat(old, &st), 0);
        {
                /* retried now and then, not on every loop turn: a few checkpoints, not hundreds */
                json_t *recs = file_records(old);
                size_t n = count_event(recs, "audit.checkpoint");
                fprintf(stderr, "rotation without an inode: %zu checkpoints in %zu records before it succeeded\n", n,
                        json_array_size(recs));
                assert_true(n <= 24);
                json_decref(recs);
        }
        hx_stop_clean(b);
        if (stat(old, &st) == 0) {
                const char *args[] = { "--file", old, "--file", apath, "--keys", jwks, NULL };
                verify_ok(b, args);
        } else {
                const char *args[] = { "--file", apath, "--keys", jwks, NULL };
                verify_ok(b, args);
        }
}

/* ---- keeping the trail: --audit-keep, and nobody floods it away ------------------ */

#define INTROSPECT_GARBAGE "{\"method\":\"io.agentbroker.Introspect\",\"parameters\":{\"token\":\"garbage\"}}"

/*
 * n Introspect calls of a garbage token pipelined on c (what any local
 * process may send): how many were answered (inactive); *ret_limited
 * (if not NULL) counts the RateLimited errors. Any other error fails.
 */
static unsigned introspect_many(hx_conn *c, unsigned n, unsigned *ret_limited)
{
        static const char msg[] = INTROSPECT_GARBAGE;
        unsigned answered = 0, limited = 0;

        while (n > 0) {
                unsigned k = n < 64 ? n : 64;
                send_copies(c, msg, sizeof msg, k);
                for (unsigned i = 0; i < k; i++) {
                        json_t *root = NULL;
                        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS * 2, &root), 1);
                        if (hx_reply_error(root)) {
                                hx_assert_error(root, "io.agentbroker.RateLimited");
                                limited++;
                        } else {
                                assert_true(json_is_false(json_object_get(hx_reply_params(root), "active")));
                                answered++;
                        }
                        json_decref(root);
                }
                n -= k;
        }
        if (ret_limited)
                *ret_limited = limited;
        return answered;
}

/* path.k exists. */
static bool rotated_exists(const char *apath, unsigned k)
{
        char p[PATH_MAX];
        struct stat st;
        snprintf(p, sizeof p, "%s.%u", apath, k);
        return stat(p, &st) == 0;
}

/* How many times the daemon's log (its stderr) holds needle. */
static unsigned log_count(const hx_broker *b, const char *needle)
{
        char *log = hx_read_text(b->log, READ_MAX, NULL), *p = log;
        unsigned n = 0;
        while ((p = strstr(p, needle))) {
                n++;
                p += strlen(needle);
        }
        free(log);
        return n;
}

/*
 * `audit verify` of path.k_oldest, ..., path.1, path (oldest first) must
 * pass; the oldest file's first record is seq first_seq (1: the trail from
 * its beginning) or, when first_seq is 0, audit.rotated.
 */
static void verify_rotated(hx_broker *b, const char *apath, unsigned k_oldest, const char *jwks, long long first_seq)
{
        char names[16][PATH_MAX], out[4096];
        const char *args[40];
        size_t n = 0;
        json_t *recs;

        assert_true(k_oldest < 16);
        for (unsigned k = k_oldest; k >= 1; k--) {
                snprintf(names[k], sizeof names[k], "%s.%u", apath, k);
                args[n++] = "--file";
                args[n++] = names[k];
        }
        args[n++] = "--file";
        args[n++] = apath;
        args[n++] = "--keys";
        args[n++] = jwks;
        args[n] = NULL;
        recs = file_records(names[k_oldest]);
        if (first_seq)
                assert_int_equal(ri(json_array_get(recs, 0), "seq"), first_seq);
        else
                assert_string_equal(rs(json_array_get(recs, 0), "event"), "audit.rotated");
        json_decref(recs);
        assert_int_equal(ctl_verify(b, args, out, sizeof out), 0);
        assert_non_null(strstr(out, "audit chain intact"));
        fprintf(stderr, "%u rotated files and the current one: %s", k_oldest, out);
}

/*
 * By default no rotated file is ever deleted: a flood of Introspect calls
 * (what any local process may send; --rate-limit 0 stands for many uids)
 * rotates a 1 MiB file ten times, and PATH.10 ... PATH.1 are all there,
 * the oldest beginning at seq 1, the chain intact across all eleven
 * files. Before --audit-keep the broker kept eight and overwrote the rest.
 */
static void test_rotation_keeps_every_file(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jwks[PATH_MAX], gz[PATH_MAX + 8];
        unsigned total = 0;
        hx_conn *c;

        start_rotating(b, NULL);
        save_jwks(f, jwks, sizeof jwks);
        audit_file(b, apath, sizeof apath);
        /* an archive the admin made next to the trail: not a rotated file, never touched */
        snprintf(gz, sizeof gz, "%s.3.gz", apath);
        assert_int_equal(hx_write_file(gz, "archived\n", 0600), 0);
        c = hx_connect(b, b->sock);
        /* 1 MiB is a few thousand records; 512 calls never rotate twice */
        while (!rotated_exists(apath, 10) && total < 200000) {
                assert_int_equal(introspect_many(c, 512, NULL), 512);
                total += 512;
        }
        if (!rotated_exists(apath, 10))
                fprintf(stderr, "%u Introspect calls and no %s.10 (%s.9: %s)\n", total, apath, apath,
                        rotated_exists(apath, 9) ? "there" : "missing");
        assert_true(rotated_exists(apath, 10));
        hx_stop_clean(b);
        for (unsigned k = 1; k <= 10; k++)
                assert_true(rotated_exists(apath, k));
        assert_false(rotated_exists(apath, 11));
        assert_int_equal(log_count(b, "deleted"), 0);
        verify_rotated(b, apath, 10, jwks, 1);
        char *text = hx_read_text(gz, 64, NULL);
        assert_string_equal(text, "archived\n");
        free(text);
}

/*
 * Keeping every file, rotation renames each one: with 10,000 rotated files
 * there the broker stops rotating, says why, and writes on in the current
 * file (nothing renamed, nothing lost); once some are archived it rotates
 * again.
 */
static void test_rotation_stops_at_bound(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], p[PATH_MAX + 16];
        unsigned total = 0;
        struct stat st;
        hx_conn *c;

        start_rotating(b, NULL);
        audit_file(b, apath, sizeof apath);
        /* PATH.2 ... PATH.10001: PATH.1 is free, but 10,000 files are too many to shift */
        for (unsigned k = 2; k <= 10001; k++) {
                snprintf(p, sizeof p, "%s.%u", apath, k);
                int fd = open(p, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
                assert_true(fd >= 0);
                close(fd);
        }
        c = hx_connect(b, b->sock);
        while (log_count(b, "not rotating") == 0 && total < 50000) {
                assert_int_equal(introspect_many(c, 512, NULL), 512);
                total += 512;
        }
        if (log_count(b, "not rotating") == 0)
                hx_broker_dump_log(b);
        assert_true(log_count(b, "10000 rotated files") >= 1); /* once per attempt */
        assert_false(rotated_exists(apath, 1));
        assert_true(rotated_exists(apath, 2));
        assert_true(rotated_exists(apath, 10001));
        assert_false(rotated_exists(apath, 10002));
        assert_int_equal(stat(apath, &st), 0);
        assert_true(st.st_size >= 1024 * 1024);
        /* archived: one file fewer, and the next attempt rotates (a sixteenth of 1 MiB later) */
        snprintf(p, sizeof p, "%s.10001", apath);
        assert_int_equal(unlink(p), 0);
        while (!rotated_exists(apath, 1) && total < 100000) {
                assert_int_equal(introspect_many(c, 512, NULL), 512);
                total += 512;
        }
        assert_true(rotated_exists(apath, 1));
        assert_true(rotated_exists(apath, 10001)); /* PATH.10000 moved up */
        assert_false(rotated_exists(apath, 10002));
        assert_int_equal(stat(apath, &st), 0);
        assert_true(st.st_size < 1024 * 1024);
        hx_stop_clean(b);
        assert_chain(apath);
}

/*
 * --audit-keep 2: PATH.1 and PATH.2 stay, older ones are deleted at
 * rotation and the log names each one at LOG_WARNING. The two kept files
 * and the current one still verify (the oldest begins at its
 * audit.rotated record).
 */
static void test_rotation_keep_two(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jwks[PATH_MAX], line[PATH_MAX + 64];
        unsigned total = 0;
        hx_conn *c;

        start_rotating(b, "2");
        save_jwks(f, jwks, sizeof jwks);
        audit_file(b, apath, sizeof apath);
        c = hx_connect(b, b->sock);
        /* rotations 3 and 4 each delete the file that was PATH.2, once shifted to PATH.3 and the
         * rotation done (a failed rotation deletes nothing) */
        while (log_count(b, "audit log rotation deleted") < 2 && total < 100000) {
                assert_int_equal(introspect_many(c, 512, NULL), 512);
                total += 512;
        }
        hx_stop_clean(b);
        snprintf(line, sizeof line, "audit log rotation deleted %s.3 (--audit-keep 2)", apath);
        if (log_count(b, line) != 2)
                hx_broker_dump_log(b);
        assert_int_equal(log_count(b, line), 2);
        assert_int_equal(log_count(b, "audit log rotation deleted"), 2);
        assert_true(rotated_exists(apath, 1));
        assert_true(rotated_exists(apath, 2));
        assert_false(rotated_exists(apath, 3));
        verify_rotated(b, apath, 2, jwks, 0);
}

/*
 * A rotation that fails (here PATH.1 made immutable, as an admin sealing a
 * file might; a full directory behaves the same) deletes nothing with
 * --audit-keep: files are shifted first and shifted back on failure, and
 * deleted only once the rotation is done (helper-24's reproducer lost two
 * of three kept files, unlogged, in two failed rotations).
 */
static void test_failed_rotation_deletes_nothing(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], cmd[PATH_MAX + 32];
        unsigned total = 0;
        hx_conn *c;

        start_rotating(b, "3");
        audit_file(b, apath, sizeof apath);
        c = hx_connect(b, b->sock);
        while (!rotated_exists(apath, 3) && total < 100000) {
                assert_int_equal(introspect_many(c, 512, NULL), 512);
                total += 512;
        }
        assert_true(rotated_exists(apath, 1) && rotated_exists(apath, 2) && rotated_exists(apath, 3));
        snprintf(cmd, sizeof cmd, "chattr +i %s.1 2>/dev/null", apath);
        if (system(cmd) != 0) {
                hx_stop_clean(b);
                skip(); /* the file system has no immutable flag */
        }
        while (log_count(b, "audit log rotation failed") < 2 && total < 200000) {
                assert_int_equal(introspect_many(c, 512, NULL), 512);
                total += 512;
        }
        snprintf(cmd, sizeof cmd, "chattr -i %s.1", apath);
        assert_int_equal(system(cmd), 0);
        assert_true(log_count(b, "audit log rotation failed") >= 2);
        fprintf(stderr, "after failed rotations: .1 %d .2 %d .3 %d .4 %d; 'deleted' lines %u\n",
                rotated_exists(apath, 1), rotated_exists(apath, 2), rotated_exists(apath, 3), rotated_exists(apath, 4),
                log_count(b, "audit log rotation deleted"));
        assert_true(rotated_exists(apath, 1));
        assert_true(rotated_exists(apath, 2));
        assert_true(rotated_exists(apath, 3));
        assert_false(rotated_exists(apath, 4));
        assert_int_equal(log_count(b, "audit log rotation deleted"), 0);
        /* and once PATH.1 may move again, rotation goes on, deleting the oldest, named in the log */
        while (log_count(b, "audit log rotation deleted") < 1 && total < 300000) {
                assert_int_equal(introspect_many(c, 512, NULL), 512);
                total += 512;
        }
        assert_int_equal(log_count(b, "audit log rotation deleted"), 1);
        hx_stop_clean(b);
        assert_false(rotated_exists(apath, 4));
}

/* --audit-keep takes 0 ... 10000: anything else is a usage error (exit 2), one line naming the option. */
static void test_audit_keep_usage(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        static const char *const bad[] = { "-1", "x", "", "2x", "10001", "99999999999999999999" };
        char daemon[PATH_MAX];

        assert_int_equal(hx_build_path("agent-brokerd", daemon, sizeof daemon), 0);
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
                char *argv[] = { daemon, "--state-dir", b->state, "--audit-keep", (char *)bad[i], NULL };
                hx_run_result res;
                assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, &res), 0);
                if (res.exit_code != 2 || !strstr(res.err, "--audit-keep"))
                        fprintf(stderr, "--audit-keep \"%s\": exit %d: %s", bad[i], res.exit_code, res.err);
                assert_int_equal(res.exit_code, 2);
                assert_non_null(strstr(res.err, "--audit-keep"));
                assert_non_null(strchr(res.err, '\n'));
                assert_true(strchr(res.err, '\n')[1] == '\0'); /* one line */
                hx_run_result_done(&res);
        }
        {
                /* a good value parses (then --version exits before starting) */
                char *argv[] = { daemon, "--audit-keep", "10000", "--version", NULL };
                hx_run_result res;
                assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, &res), 0);
                assert_int_equal(res.exit_code, 0);
                hx_run_result_done(&res);
        }
}

/* As nobody: one Introspect of a garbage token; prints "OK" (answered) or the error name. */
static int child_introspect_nobody(void *arg, char *out, size_t outmax)
{
        ab_client *c = NULL;
        char *reply = NULL;
        int r = ab_client_connect(arg, HX_IO_TIMEOUT_MS, &c);
        if (r < 0) {
                snprintf(out, outmax, "connect");
                return 3;
        }
        r = ab_client_call(c, "io.agentbroker.Introspect", "{\"token\":\"garbage\"}", &reply);
        snprintf(out, outmax, "%s", r == 0 ? "OK" : ab_client_error_name(c));
        free(reply);
        ab_client_free(c);
        return r == 0 ? 0 : 1;
}

/*
 * Introspect is rate limited per uid like the other agent calls: a flood
 * from one uid (--rate-limit 50/50) is answered RateLimited past the
 * bucket, and those calls make no record; another uid is still served.
 */
static void test_introspect_flood_rate_limited(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], out[512];
        unsigned answered, limited = 0;
        int ex = -1;
        json_t *recs;
        hx_conn *c;

        hx_add_arg(b, "--rate-limit");
        hx_add_arg(b, "50/50");
        write_policy(b, NULL);
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        c = hx_connect(b, b->sock);
        answered = introspect_many(c, 400, &limited);
        fprintf(stderr, "400 Introspect calls with --rate-limit 50/50: %u answered, %u RateLimited\n", answered,
                limited);
        assert_true(answered >= 50);
        assert_true(answered < 200); /* 50 and what 50/s refills while they run */
        assert_int_equal(answered + limited, 400);
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_introspect_nobody, b->sock, HX_RUN_TIMEOUT_MS,
                                   out, sizeof out, &ex),
                         0);
        assert_string_equal(out, "OK");
        assert_int_equal(ex, 0);
        hx_stop_clean(b);
        recs = file_records(apath);
        assert_int_equal(count_event(recs, "token.introspected"), answered + 1);
        json_decref(recs);
}

/* Write a valid chain of n token.issued-like records (about 500 bytes each) to path. */
static void write_synthetic_trail(const char *path, unsigned n)
{
        char prev[65] = ZERO64, line[1024];
        FILE *w = fopen(path, "we");
        long long t0 = ((long long)time(NULL) - 3600) * 1000000LL;

        assert_non_null(w);
        for (unsigned i = 1; i <= n; i++) {
                uint8_t h[crypto_hash_sha256_BYTES];
                int len = snprintf(line, sizeof line,
                                   "{\"decision\":\"grant\",\"uid\":0,\"gid\":0,\"pid\":%u,\"exe\":\"/usr/bin/synthetic-agent\","
                                   "\"sha256\":\"%064u\",\"agent\":\"" AGENT_ID "\",\"owner\":\"" OWNER "\","
                                   "\"audience\":\"" AUD_GIT "\",\"scopes\":\"repo:read\",\"jti\":\"synthetic-%037u\","
                                   "\"sid\":\"synthetic-%012u\",\"exp\":%lld,\"policy\":\"0000000000000000\",\"time\":%lld,"
                                   "\"event\":\"token.issued\",\"seq\":%u,\"prev\":\"%s\"}",
                                   1000 + i % 30000, i, i, i / 100, t0 / 1000000 + 600, t0 + i, i, prev);
                assert_true(len > 0 && (size_t)len < sizeof line);
                fprintf(w, "%s\n", line);
                crypto_hash_sha256(h, (const uint8_t *)line, (size_t)len);
                sodium_bin2hex(prev, sizeof prev, h, sizeof h);
        }
        assert_int_equal(fclose(w), 0);
}

/*
 * Paging through a large trail over the admin socket: each ReadAudit call
 * runs in the broker's event loop; paging must not rescan the file from
 * its start for every page (quadratic), or `audit` takes minutes and
 * every agent waits behind it.
 */
static void test_read_audit_large_file(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX];
        const unsigned n = 16000; /* ~8 MiB */
        long long t0, t1;

        hx_path_in(apath, sizeof apath, f->work, "big.jsonl");
        write_synthetic_trail(apath, n);
        hx_add_arg(b, "--audit-log");
        hx_add_arg(b, apath);
        hx_add_arg(b, "--audit-max-size");
        hx_add_arg(b, "0");
        write_policy(b, NULL);
        hx_start(b);
        t0 = hx_now_ms();
        json_t *recs = ctl_audit_json(b, NULL, NULL);
        t1 = hx_now_ms();
        fprintf(stderr, "audit --json over the admin socket: %zu records (%u synthetic, ~8 MiB) in %lld ms\n",
                json_array_size(recs), n, t1 - t0);
        assert_true(json_array_size(recs) > n);
        json_decref(recs);
        /* timings are printed, never asserted (house rule): make bench measures speed */
        if (t1 - t0 > 3000)
                fprintf(stderr, "slow: ReadAudit paging took %lld ms\n", t1 - t0);
        hx_stop_clean(b);
        verify_file_ok(b, apath);
}

/* ---- usage counters -------------------------------------------------------------- */

static long long usage_count(hx_broker *b, const char *scope)
{
        hx_conn *adm = hx_connect(b, b->admin_sock);
        json_t *root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.GetUsage\",\"parameters\":{\"agent\":\"" AGENT_ID
                                    "\"}}"),
               *row;
        size_t i;
        long long n = -1;
        hx_assert_ok(root);
        json_array_foreach(json_object_get(hx_reply_params(root), "usage"), i, row)
                if (strcmp(rs(row, "audience"), AUD_GIT) == 0 && strcmp(rs(row, "scope"), scope) == 0) {
                        n = ri(row, "count");
                        assert_string_equal(rs(row, "agent"), AGENT_ID);
                        /* time() reads the coarse clock, a tick behind the broker's clock_gettime() */
                        assert_true(ri(row, "last_issued") >= time(NULL) - 60 && ri(row, "last_issued") <= time(NULL) + 1);
                }
        json_decref(root);
        hx_conn_close(b, adm);
        return n;
}

/* Lines of path that contain what. */
static unsigned count_lines(const char *path, const char *what)
{
        FILE *fp = fopen(path, "r");
        char line[4096];
        unsigned n = 0;
        assert_non_null(fp);
        while (fgets(line, sizeof line, fp))
                n += strstr(line, what) != NULL;
        fclose(fp);
        return n;
}

/*
 * A full disk under sessions being opened: a failed sync queues their
 * session.opened records again, and the broker once retried them every
 * loop turn, a full core and tens of thousands of log lines a second
 * (helper-37). Now they wait for a retry timer and the failure is logged
 * once; once there is room the next call is served.
 */
static void test_full_disk_quiet(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char tiny[PATH_MAX], filler[PATH_MAX], apath[PATH_MAX];
        hx_run_result res;
        unsigned n0, n1;

        hx_path_in(tiny, sizeof tiny, f->work, "tiny");
        hx_fixture_mount(f, tiny, "64k");
        hx_path_in(apath, sizeof apath, tiny, "audit.jsonl");
        hx_add_arg(b, "--audit-log");
        hx_add_arg(b, apath);
        write_policy(b, NULL);
        hx_start(b);
        fill(tiny, filler, sizeof filler, 0);
        for (int i = 0, refused = 0; refused < 3; i++) { /* each CLI process opens a session */
                assert_true(i < 200);
                assert_int_equal(hx_ctl(b, -1, &res, "token", "--audience", AUD_GIT, "--scope", "repo:read", NULL), 0);
                if (res.exit_code != 0) {
                        assert_non_null(strstr(res.err, "AuditUnavailable"));
                        refused++;
                }
                hx_run_result_done(&res);
        }
        {
                /* calls that write no record are answered meanwhile, on both sockets, not
                 * made to wait for (and fail with) the records the failed syncs left */
                hx_conn *c = hx_connect(b, b->sock), *adm = hx_connect(b, b->admin_sock);
                for (int i = 0; i < 10; i++) {
                        json_t *r1 = hx_call(c, "{\"method\":\"io.agentbroker.GetKeys\"}");
                        json_t *r2 = hx_call(adm, "{\"method\":\"org.varlink.service.GetInfo\"}");
                        hx_assert_ok(r1);
                        hx_assert_ok(r2);
                        json_decref(r1);
                        json_decref(r2);
                }
                hx_conn_close(b, c);
                hx_conn_close(b, adm);
        }
        n0 = count_lines(b->log, "cannot be written");
        usleep(1500 * 1000);
        n1 = count_lines(b->log, "cannot be written");
        fprintf(stderr, "full disk: %u failure lines, %u more in 1.5 s idle\n", n0, n1 - n0);
        assert_true(n0 >= 1);
        assert_true(n1 - n0 <= 1);
        assert_int_equal(unlink(filler), 0);
        assert_int_equal(hx_ctl(b, -1, &res, "token", "--audience", AUD_GIT, "--scope", "repo:read", NULL), 0);
        assert_int_equal(res.exit_code, 0);
        hx_run_result_done(&res);
        hx_stop_clean(b);
        verify_file_ok(b, apath);
}

/*
 * A change made in LMDB whose record's sync failed keeps its record: it is
 * queued again and written once the disk has room. A ClosePamSession, a
 * PAM open and a revocation refused with AuditUnavailable on a full disk
 * all end up on the record, and the PAM module's retry of the close is not
 * answered until the first close's record is durable. Before, the
 * retry was answered {} ("already closed") while the disk was still full
 * and no pam.closed record was ever written (helper-41).
 */
static void test_changes_recorded_after_failed_sync(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char tiny[PATH_MAX], filler[PATH_MAX], apath[PATH_MAX], ids[8][64], id[64] = "", jti[64], err[128],
                reason[256];
        json_t *root, *recs, *jtis = json_array();
        hx_conn *c;
        char *token;
        size_t i, closed = 0, revoked = 0, opened = 0, loaded = 0;
        json_t *r;

        hx_path_in(tiny, sizeof tiny, f->work, "tiny");
        hx_fixture_mount(f, tiny, "64k");
        hx_path_in(apath, sizeof apath, tiny, "audit.jsonl");
        hx_add_arg(b, "--audit-log");
        hx_add_arg(b, apath);
        write_policy(b, "{\"audience\": \"" AUD_PAM "\", \"scopes\": [\"login\"]}");
        hx_start(b);
        c = hx_connect(b, b->sock);
        root = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_PAM
                          "\",\"scopes\":[\"login\"]}}");
        hx_assert_ok(root);
        token = strdup(hx_reply_str(root, "token"));
        json_decref(root);
        root = hx_call(c, ISSUE_GIT_READ);
        hx_assert_ok(root);
        snprintf(jti, sizeof jti, "%s", hx_reply_str(root, "jti"));
        json_decref(root);
        for (int k = 0; k < 8; k++) {
                root = callf(c,
                             "{\"method\":\"io.agentbroker.OpenPamSession\",\"parameters\":{\"token\":\"%s\","
                             "\"service\":\"sshd\",\"user\":\"root\"}}",
                             token);
                hx_assert_ok(root);
                snprintf(ids[k], sizeof ids[k], "%s", hx_reply_str(root, "id"));
                json_decref(root);
        }

        /* full: the audit file's last page may still hold a record or two */
        fill(tiny, filler, sizeof filler, 0);
        issue_until_refused(c, jtis, 200, err, sizeof err, reason, sizeof reason);
        assert_string_equal(err, "io.agentbroker.AuditUnavailable");
        for (int k = 0; k < 8 && !id[0]; k++) { /* the first close whose record does not fit */
                root = callf(c, "{\"method\":\"io.agentbroker.ClosePamSession\",\"parameters\":{\"id\":\"%s\"}}",
                             ids[k]);
                if (hx_reply_error(root)) {
                        hx_assert_error_name(root, "io.agentbroker.AuditUnavailable");
                        snprintf(id, sizeof id, "%s", ids[k]);
                }
                json_decref(root);
        }
        assert_true(id[0] != '\0');
        /* the PAM module's retry of that close: refused too, while its record cannot be written */
        root = callf(c, "{\"method\":\"io.agentbroker.ClosePamSession\",\"parameters\":{\"id\":\"%s\"}}", id);
        if (!hx_reply_error(root))
                fprintf(stderr, "GAP: a retried ClosePamSession was answered while the close's record cannot be "
                                "written\n");
        hx_assert_error_name(root, "io.agentbroker.AuditUnavailable");
        json_decref(root);
        root = callf(c,
                     "{\"method\":\"io.agentbroker.OpenPamSession\",\"parameters\":{\"token\":\"%s\",\"service\":"
                     "\"sshd\",\"user\":\"root\"}}",
                     token);
        hx_assert_error_name(root, "io.agentbroker.AuditUnavailable");
        json_decref(root);
        root = callf(c, "{\"method\":\"io.agentbroker.Revoke\",\"parameters\":{\"jti\":\"%s\"}}", jti);
        hx_assert_error_name(root, "io.agentbroker.AuditUnavailable");
        json_decref(root);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long long revoked_by = (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
        {
                /* a policy reload puts the policy in force whether or not its record is written */
                hx_run_result res;
                assert_int_equal(hx_ctl(b, -1, &res, "policy", "reload", NULL), 0);
                assert_true(res.exit_code != 0);
                hx_run_result_done(&res);
        }
        hx_sleep_ms(1100); /* the retry timer tries the disk again meanwhile */

        assert_int_equal(unlink(filler), 0);
        root = callf(c, "{\"method\":\"io.agentbroker.ClosePamSession\",\"parameters\":{\"id\":\"%s\"}}", id);
        hx_assert_ok(root);
        json_decref(root);
        hx_conn_close(b, c);
        hx_stop_clean(b);

        recs = file_records(apath);
        json_array_foreach(recs, i, r) {
                const char *ev = rs(r, "event");
                if (strcmp(ev, "pam.closed") == 0 && rs(r, "pam_id") && strcmp(rs(r, "pam_id"), id) == 0)
                        closed++;
                if (strcmp(ev, "pam.opened") == 0 && rs(r, "pam_id")) {
                        bool earlier = false;
                        for (int k = 0; k < 8; k++)
                                earlier |= strcmp(rs(r, "pam_id"), ids[k]) == 0;
                        opened += !earlier;
                }
                if (strcmp(ev, "token.revoked") == 0 && strcmp(rs(r, "decision"), "revoke") == 0 && rs(r, "jti") &&
                    strcmp(rs(r, "jti"), jti) == 0) {
                        revoked++;
                        /* the time of the revocation, not of the retry that wrote it */
                        if (ri(r, "time") > revoked_by)
                                fprintf(stderr, "GAP: the revocation's record has the time of a retry, %lld us "
                                                "after the refusal\n", ri(r, "time") - revoked_by);
                        assert_true(ri(r, "time") <= revoked_by);
                }
                if (strcmp(ev, "policy.loaded") == 0 && rs(r, "via") && strcmp(rs(r, "via"), "admin") == 0)
                        loaded++;
        }
        if (loaded != 1)
                fprintf(stderr, "GAP: %zu policy.loaded records of the reload made while the disk was full\n", loaded);
        assert_int_equal(loaded, 1);
        if (closed != 1 || opened != 1 || revoked != 1)
                fprintf(stderr, "GAP: after the disk had room again: %zu pam.closed, %zu pam.opened (the refused "
                                "open's), %zu token.revoked records (1 each wanted)\n",
                        closed, opened, revoked);
        assert_int_equal(closed, 1);
        assert_int_equal(opened, 1);
        assert_int_equal(revoked, 1);
        json_decref(recs);
        json_decref(jtis);
        free(token);
        verify_file_ok(b, apath);
}

/* Issue one token on c; its jti into jti. */
static void issue_one(hx_conn *c, char *jti, size_t jmax)
{
        json_t *root = hx_call(c, ISSUE_GIT_READ);
        hx_assert_ok(root);
        snprintf(jti, jmax, "%s", hx_reply_str(root, "jti"));
        json_decref(root);
}

/*
 * The audit file moved away (logrotate's rename, mv) or removed under the
 * broker: within a second the trail goes on in a new file at its path,
 * whose first record, audit.reopened, continues the chain. Before, the
 * broker wrote on, until a restart, into the moved file (or into a removed
 * one: every record lost) and the path stayed empty (helper-37's leftover).
 */
static void test_moved_audit_file_reopened(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], moved[PATH_MAX + 16], jti[3][64];
        json_t *recs, *first;
        hx_conn *c;

        write_policy(b, NULL);
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        snprintf(moved, sizeof moved, "%s.moved", apath);
        c = hx_connect(b, b->sock);
        issue_one(c, jti[0], sizeof jti[0]);
        assert_int_equal(rename(apath, moved), 0);
        hx_sleep_ms(1100);
        issue_one(c, jti[1], sizeof jti[1]); /* its record still goes to the old file, then a new one begins */
        issue_one(c, jti[2], sizeof jti[2]);
        if (access(apath, F_OK) < 0)
                fprintf(stderr, "GAP: the broker still writes into %s, moved away; %s stays missing\n", moved, apath);
        assert_int_equal(access(apath, F_OK), 0);
        recs = file_records(apath);
        first = json_array_get(recs, 0);
        assert_string_equal(rs(first, "event"), "audit.reopened");
        assert_non_null(strstr(rs(first, "reason"), "moved away"));
        one_record(recs, "token.issued", "jti", jti[2]);
        json_decref(recs);
        recs = file_records(moved);
        one_record(recs, "token.issued", "jti", jti[0]);
        json_decref(recs);
        {
                const char *both[] = { "--file", moved, "--file", apath, NULL };
                verify_ok(b, both); /* one chain across the two */
                verify_file_ok(b, apath);
                /* the moved file ends with a signed checkpoint, as a rotated one does */
                const char *old_alone[] = { "--file", moved, NULL };
                char out[4096];
                assert_int_equal(ctl_verify(b, old_alone, out, sizeof out), 0);
                if (strstr(out, "follow the last verified checkpoint"))
                        fprintf(stderr, "GAP: the moved file's last records are not signed:\n%s\n", out);
                assert_null(strstr(out, "follow the last verified checkpoint"));
        }
        /* removed: the same */
        assert_int_equal(unlink(apath), 0);
        hx_sleep_ms(1100);
        issue_one(c, jti[0], sizeof jti[0]);
        issue_one(c, jti[1], sizeof jti[1]);
        assert_int_equal(access(apath, F_OK), 0);
        recs = file_records(apath);
        assert_string_equal(rs(json_array_get(recs, 0), "event"), "audit.reopened");
        assert_non_null(strstr(rs(json_array_get(recs, 0), "reason"), "removed"));
        one_record(recs, "token.issued", "jti", jti[1]);
        json_decref(recs);
        /* moved, and a file with content put at the path: not the broker's; it writes on in the
         * moved file and leaves the other alone */
        char moved2[PATH_MAX + 16];
        snprintf(moved2, sizeof moved2, "%s.moved2", apath);
        assert_int_equal(rename(apath, moved2), 0);
        assert_int_equal(hx_write_file(apath, "not the broker's\n", 0640), 0);
        hx_sleep_ms(1100);
        issue_one(c, jti[2], sizeof jti[2]);
        recs = file_records(moved2);
        one_record(recs, "token.issued", "jti", jti[2]);
        json_decref(recs);
        {
                char *text = hx_read_text(apath, 1024, NULL);
                assert_string_equal(text, "not the broker's\n");
                free(text);
        }
        recs = ctl_audit_json(b, "--event", "token.issued"); /* read from the file it writes */
        one_record(recs, "token.issued", "jti", jti[2]);
        json_decref(recs);
        hx_conn_close(b, c);
        hx_stop_clean(b);
        verify_file_ok(b, moved2);
}

/*
 * Scopes granted through a wildcard are counted by name only up to
 * AB_USAGE_SCOPES_PER_AUDIENCE rows per agent and audience, then under the
 * wildcard: an agent asking for w:<random> each time once filled the store
 * and made every issuance retry a flush (helper-37). No count is lost.
 */
static void test_usage_rows_bounded(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        hx_conn *c, *adm;
        json_t *root, *row;
        long long rows = 0, total = 0, folded = -1, named = -1;
        size_t i;

        write_policy(b, "{\"audience\": \"mcp://wild\", \"scopes\": [\"w:*\", \"w:named\"], \"max_ttl\": 60}");
        hx_start(b);
        c = hx_connect(b, b->sock);
        root = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"mcp://wild\","
                          "\"scopes\":[\"w:named\"]}}");
        hx_assert_ok(root);
        json_decref(root);
        for (int k = 0; k < 5; k++) {
                json_t *scopes = json_array();
                for (int j = 0; j < 64; j++) {
                        char sc[32];
                        snprintf(sc, sizeof sc, "w:r%d-%d", k, j);
                        json_array_append_new(scopes, json_string(sc));
                }
                root = hx_rpc(c, "io.agentbroker.IssueToken", json_pack("{s:s, s:o}", "audience", "mcp://wild",
                                                                        "scopes", scopes));
                hx_assert_ok(root);
                json_decref(root);
        }
        hx_stop_clean(b); /* the counts go to LMDB */
        hx_start(b);
        adm = hx_connect(b, b->admin_sock);
        root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.GetUsage\",\"parameters\":{\"agent\":\"" AGENT_ID
                            "\"}}");
        hx_assert_ok(root);
        json_array_foreach(json_object_get(hx_reply_params(root), "usage"), i, row) {
                if (strcmp(rs(row, "audience"), "mcp://wild") != 0)
                        continue;
                rows++;
                total += ri(row, "count");
                if (strcmp(rs(row, "scope"), "w:*") == 0)
                        folded = ri(row, "count");
                if (strcmp(rs(row, "scope"), "w:named") == 0)
                        named = ri(row, "count");
        }
        json_decref(root);
        fprintf(stderr, "usage rows for mcp://wild: %lld, %lld issuances, %lld under w:*\n", rows, total, folded);
        assert_int_equal(total, 321);
        assert_int_equal(named, 1);
        assert_int_equal(rows, 257);   /* 256 by name (w:named among them), and w:* */
        assert_int_equal(folded, 65); /* 320 - 255 */
        hx_conn_close(b, adm);
}

/*
 * Usage counters: exact across a clean restart; a kill -9 may lose the
 * last few seconds of counts (they are flushed every 5 s), never an audit
 * record.
 */
static void test_usage_counters(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX];
        json_t *recs;
        hx_conn *c;

        write_policy(b, NULL);
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        c = hx_connect(b, b->sock);
        assert_int_equal(issue_many(c, 4, NULL, NULL, 0), 4);
        json_decref(hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_GIT
                               "\",\"scopes\":[\"repo:read\",\"repo:write\"]}}"));
        assert_int_equal(usage_count(b, "repo:read"), 5);
        assert_int_equal(usage_count(b, "repo:write"), 1);
        assert_int_equal(usage_count(b, "tickets:read"), -1);
        hx_stop_clean(b);
        hx_start(b);
        assert_int_equal(usage_count(b, "repo:read"), 5);
        c = hx_connect(b, b->sock);
        assert_int_equal(issue_many(c, 3, NULL, NULL, 0), 3);
        kill9(b); /* within the 5 s flush interval */
        hx_start(b);
        long long n = usage_count(b, "repo:read");
        fprintf(stderr, "usage after kill -9: %lld of 8 counted (the last %lld lost)\n", n, 8 - n);
        assert_true(n >= 5 && n <= 8);
        hx_stop_clean(b);
        recs = file_records(apath);
        assert_int_equal(count_event(recs, "token.issued"), 8);
        json_decref(recs);
}


/* ---- gaps: decisions that should be on the record ------------------------------ */

/* Issue a token on c (repo:read repo:write): its token and jti. */
static char *issue_rw(hx_conn *c, char *jti, size_t jmax)
{
        json_t *root = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_GIT
                                  "\",\"scopes\":[\"repo:read\",\"repo:write\"]}}");
        hx_assert_ok(root);
        char *t = strdup(hx_reply_str(root, "token"));
        snprintf(jti, jmax, "%s", hx_reply_str(root, "jti"));
        json_decref(root);
        return t;
}

/* Records of event (or any event if NULL) with decision "deny" whose key equals value. */
static size_t count_denials(const json_t *recs, const char *event, const char *key, const char *value)
{
        size_t i, n = 0;
        json_t *r;
        json_array_foreach(recs, i, r) {
                if (event && strcmp(rs(r, "event"), event) != 0)
                        continue;
                if (!rs(r, "decision") || strcmp(rs(r, "decision"), "deny") != 0)
                        continue;
                if (key && (!rs(r, key) || strcmp(rs(r, key), value) != 0))
                        continue;
                n++;
        }
        return n;
}

/*
 * Attenuate refused (a wider scope; a revoked parent; too deep) is a
 * decision like any denial: one record each, naming the parent and the reason
 * (and the scopes asked for, as a string). So is a refused Revoke.
 */
static void test_attenuate_denial_audited(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jti[64];
        json_t *root, *recs;

        write_policy(b, NULL);
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        hx_conn *c = hx_connect(b, b->sock);
        json_t *req = hx_call(c, ISSUE_GIT_READ);
        hx_assert_ok(req);
        snprintf(jti, sizeof jti, "%s", hx_reply_str(req, "jti"));
        root = callf(c,
                     "{\"method\":\"io.agentbroker.Attenuate\",\"parameters\":{\"token\":\"%s\",\"scopes\":[\"repo:"
                     "write\"]}}",
                     hx_reply_str(req, "token"));
        hx_assert_error_name(root, "io.agentbroker.ScopeNotGranted");
        json_decref(root);
        root = callf(c, "{\"method\":\"io.agentbroker.Revoke\",\"parameters\":{\"jti\":\"%s\"}}", jti);
        hx_assert_ok(root);
        json_decref(root);
        root = callf(c, "{\"method\":\"io.agentbroker.Attenuate\",\"parameters\":{\"token\":\"%s\"}}",
                     hx_reply_str(req, "token"));
        hx_assert_error_name(root, "io.agentbroker.InvalidToken");
        json_decref(root);
        /* a Revoke refused (not this agent's session) is a decision too */
        root = hx_call(c, "{\"method\":\"io.agentbroker.Revoke\",\"parameters\":{\"sid\":\"AAAAAAAAAAAAAAAAAAAAAA\"}}");
        hx_assert_error_name(root, "io.agentbroker.PermissionDenied");
        json_decref(root);
        json_decref(req);
        hx_stop_clean(b);
        recs = file_records(apath);
        size_t n = count_denials(recs, NULL, "parent", jti);
        if (n != 2)
                fprintf(stderr, "GAP: %zu of 2 refused attenuations are on the record (want a deny record with "
                                "parent=%s and a reason for each)\n",
                        n, jti);
        assert_int_equal(n, 2);
        /* the scopes asked for, space-separated as in every record */
        assert_int_equal(count_denials(recs, "token.attenuated", "scopes", "repo:write"), 1);
        assert_int_equal(count_denials(recs, "session.revoked", "sid", "AAAAAAAAAAAAAAAAAAAAAA"), 1);
        json_decref(recs);
}

/* pam.opened names the token that opened it (jti) and its owner; pam.closed names the agent. */
static void test_pam_records_name_token_and_agent(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jti[64], id[64];
        json_t *root, *recs, *r;

        write_policy(b, "{\"audience\": \"" AUD_PAM "\", \"scopes\": [\"login\"]}");
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        hx_conn *c = hx_connect(b, b->sock);
        root = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_PAM
                          "\",\"scopes\":[\"login\"]}}");
        hx_assert_ok(root);
        char *token = strdup(hx_reply_str(root, "token"));
        snprintf(jti, sizeof jti, "%s", hx_reply_str(root, "jti"));
        json_decref(root);
        root = callf(c,
                     "{\"method\":\"io.agentbroker.OpenPamSession\",\"parameters\":{\"token\":\"%s\",\"service\":"
                     "\"sshd\",\"user\":\"root\"}}",
                     token);
        hx_assert_ok(root);
        snprintf(id, sizeof id, "%s", hx_reply_str(root, "id"));
        json_decref(root);
        root = callf(c, "{\"method\":\"io.agentbroker.ClosePamSession\",\"parameters\":{\"id\":\"%s\"}}", id);
        hx_assert_ok(root);
        json_decref(root);
        hx_stop_clean(b);
        recs = file_records(apath);
        r = one_record(recs, "pam.opened", "pam_id", id);
        if (!rs(r, "jti") || !rs(r, "owner"))
                fprintf(stderr, "GAP: pam.opened lacks%s%s\n", rs(r, "jti") ? "" : " jti (which token opened it)",
                        rs(r, "owner") ? "" : " owner");
        r = one_record(recs, "pam.closed", "pam_id", id);
        if (!rs(r, "agent"))
                fprintf(stderr, "GAP: pam.closed lacks agent (audit --agent does not find it)\n");
        r = one_record(recs, "pam.opened", "pam_id", id);
        assert_non_null(rs(r, "jti"));
        assert_string_equal(rs(r, "jti"), jti);
        assert_string_equal(rs(r, "owner"), OWNER);
        r = one_record(recs, "pam.closed", "pam_id", id);
        assert_string_equal(rs(r, "agent"), AGENT_ID);
        json_decref(recs);
        free(token);
}

/* A PAM session refused (the token was revoked) is on the record, as a denial. */
static void test_pam_refusal_audited(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jti[64];
        json_t *root, *recs;

        write_policy(b, NULL);
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        hx_conn *c = hx_connect(b, b->sock);
        char *token = issue_rw(c, jti, sizeof jti);
        root = callf(c, "{\"method\":\"io.agentbroker.Revoke\",\"parameters\":{\"jti\":\"%s\"}}", jti);
        hx_assert_ok(root);
        json_decref(root);
        root = callf(c,
                     "{\"method\":\"io.agentbroker.OpenPamSession\",\"parameters\":{\"token\":\"%s\",\"service\":"
                     "\"sshd\",\"user\":\"root\"}}",
                     token);
        hx_assert_error_name(root, "io.agentbroker.InvalidToken");
        json_decref(root);
        hx_stop_clean(b);
        recs = file_records(apath);
        size_t i, n = 0;
        json_t *r;
        json_array_foreach(recs, i, r)
                if (strncmp(rs(r, "event"), "pam.", 4) == 0 && rs(r, "decision") &&
                    strcmp(rs(r, "decision"), "deny") == 0 && rs(r, "service") && strcmp(rs(r, "service"), "sshd") == 0)
                        n++;
        if (n != 1)
                fprintf(stderr, "GAP: a refused OpenPamSession (revoked token, service sshd) left %zu deny records\n",
                        n);
        assert_int_equal(n, 1);
        json_decref(recs);
        free(token);
}

/* An unrelated file written next to the policy file: no reload, no policy.loaded record. */
static void test_unrelated_write_no_policy_record(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], other[PATH_MAX];
        json_t *recs;

        write_policy(b, NULL);
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        usleep(400 * 1000);
        recs = file_records(apath);
        size_t before = count_event(recs, "policy.loaded");
        json_decref(recs);
        hx_path_in(other, sizeof other, b->dir, "notes.txt");
        assert_int_equal(hx_write_file(other, "not a policy\n", 0644), 0);
        usleep(700 * 1000); /* the broker's inotify debounce is 250 ms */
        hx_stop_clean(b);
        recs = file_records(apath);
        size_t after = count_event(recs, "policy.loaded");
        if (after != before)
                fprintf(stderr, "GAP: writing %s (not a policy source) added %zu policy.loaded record(s) for an "
                                "unchanged policy\n",
                        other, after - before);
        assert_int_equal(after, before);
        json_decref(recs);
}

/* Editing the policy and asking for a reload: one policy.loaded record for the new version. */
static void test_policy_change_recorded_once(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX];
        json_t *recs, *root, *r;
        size_t i, n = 0;

        write_policy(b, NULL);
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        recs = file_records(apath);
        const char *v1 = rs(one_record(recs, "policy.loaded", NULL, NULL), "policy");
        char old_version[32];
        snprintf(old_version, sizeof old_version, "%s", v1);
        json_decref(recs);

        write_policy(b, "{\"audience\": \"https://wiki.internal\", \"scopes\": [\"read\"]}");
        hx_conn *adm = hx_connect(b, b->admin_sock);
        root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.ReloadPolicy\"}");
        hx_assert_ok(root);
        json_decref(root);
        usleep(700 * 1000);
        hx_stop_clean(b);
        recs = file_records(apath);
        json_array_foreach(recs, i, r)
                if (strcmp(rs(r, "event"), "policy.loaded") == 0 && strcmp(rs(r, "policy"), old_version) != 0)
                        n++;
        if (n != 1)
                fprintf(stderr, "GAP: one edit + one ReloadPolicy gave %zu policy.loaded records for the new version\n",
                        n);
        assert_int_equal(n, 1);
        json_decref(recs);
}

/* A rejected policy is on the record with its reason; the old version stays in force. */
static void test_policy_rejected_recorded(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX];
        json_t *recs, *root, *r;

        write_policy(b, NULL);
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        assert_int_equal(hx_broker_write_policy(b, "{\"version\": 1, \"agents\": [{\"id\": \"x\"}]}"), 0);
        hx_conn *adm = hx_connect(b, b->admin_sock);
        root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.ReloadPolicy\"}");
        hx_assert_error_name(root, "io.agentbroker.admin.PolicyRejected");
        json_decref(root);
        hx_conn *c = hx_connect(b, b->sock);
        assert_int_equal(issue_many(c, 1, NULL, NULL, 0), 1);
        hx_stop_clean(b);
        recs = file_records(apath);
        assert_true(count_event(recs, "policy.rejected") >= 1);
        size_t i;
        json_array_foreach(recs, i, r)
                if (strcmp(rs(r, "event"), "policy.rejected") == 0) {
                        assert_string_equal(rs(r, "decision"), "reject");
                        assert_non_null(rs(r, "reason"));
                        assert_string_equal(rs(r, "source"), b->policy);
                }
        const char *v1 = rs(json_array_get(recs, 1), "policy");
        assert_string_equal(rs(one_record(recs, "token.issued", NULL, NULL), "policy"), v1);
        json_decref(recs);
}

/* ReloadPolicy over the admin socket: the record says who asked (uid, pid, via admin). */
static void test_reload_names_admin(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX];
        json_t *recs, *root, *r;

        write_policy(b, NULL);
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        hx_conn *adm = hx_connect(b, b->admin_sock);
        root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.ReloadPolicy\"}");
        hx_assert_ok(root);
        json_decref(root);
        hx_stop_clean(b);
        recs = file_records(apath);
        assert_int_equal(count_event(recs, "policy.loaded"), 2);
        r = json_array_get(recs, json_array_size(recs) - 2);
        assert_string_equal(rs(r, "event"), "policy.loaded");
        if (!json_is_integer(json_object_get(r, "pid")))
                fprintf(stderr, "GAP: policy.loaded after an admin ReloadPolicy does not say who asked\n");
        assert_int_equal(ri(r, "uid"), 0);
        assert_true(json_is_integer(json_object_get(r, "pid")));
        assert_int_equal(ri(r, "pid"), getpid());
        assert_string_equal(rs(r, "via"), "admin");
        json_decref(recs);
}

/*
 * Copy helper-issue to dir/NAME... where the path is made of components
 * of byte ch (levels of 250 bytes each, then "prog"); run it as nobody.
 * Returns its output line.
 */
static void run_from_odd_path(fx *f, char ch, int levels, hx_run_result *res, char *exe, size_t exemax)
{
        char helper[PATH_MAX], comp[251], *text = NULL;
        size_t len = 0;
        int n = snprintf(exe, exemax, "%s", f->work);

        assert_int_equal(hx_build_path("tests/helper-issue", helper, sizeof helper), 0);
        memset(comp, ch, 250);
        comp[250] = '\0';
        for (int i = 0; i < levels; i++) {
                n += snprintf(exe + n, exemax - (size_t)n, "/%s", comp);
                assert_true((size_t)n < exemax);
                assert_true(mkdir(exe, 0755) == 0 || errno == EEXIST);
        }
        n += snprintf(exe + n, exemax - (size_t)n, "/prog");
        assert_true((size_t)n < exemax);
        assert_int_equal(hx_read_file(helper, 64u << 20, &text, &len), 0);
        int fd = open(exe, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0755);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, text, len), (ssize_t)len);
        close(fd);
        free(text);
        char *argv[] = { exe, f->b.sock, (char *)AUD_GIT, (char *)"repo:read", NULL };
        assert_int_equal(hx_run(argv, NULL, HX_NOBODY_UID, HX_RUN_TIMEOUT_MS, res), 0);
        assert_false(res->timed_out);
}

/* The token.denied records of uid 65534. */
static size_t nobody_denials(const json_t *recs, json_t **ret_last)
{
        size_t i, n = 0;
        json_t *r;
        json_array_foreach(recs, i, r)
                if (strcmp(rs(r, "event"), "token.denied") == 0 && ri(r, "uid") == HX_NOBODY_UID) {
                        n++;
                        *ret_last = r;
                }
        return n;
}

/*
 * A caller controls the size of its denial record: running from a path of
 * ~3750 control characters (each escaped to six bytes) makes the record
 * pass AB_AUDIT_MAX_RECORD (16 KiB). The denial must still be on the
 * record (shortened), not dropped with a log line.
 */
static void test_oversized_denial_still_recorded(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], exe[PATH_MAX];
        hx_run_result res;
        json_t *recs, *r = NULL;

        write_policy(b, NULL);
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        run_from_odd_path(f, '\001', 15, &res, exe, sizeof exe);
        assert_int_equal(res.exit_code, 1);
        assert_non_null(strstr(res.out, "ERR io.agentbroker.NotAnAgent"));
        hx_run_result_done(&res);
        hx_stop_clean(b);
        recs = file_records(apath);
        size_t n = nobody_denials(recs, &r);
        if (n != 1)
                fprintf(stderr, "GAP: a denial for an executable at a %zu-byte path of control characters left %zu "
                                "records (the broker logs 'could not be queued' and drops it)\n",
                        strlen(exe), n);
        assert_int_equal(n, 1);
        assert_non_null(rs(r, "reason"));
        assert_true(rs(r, "sha256") && strlen(rs(r, "sha256")) == 64);
        assert_true(json_is_true(json_object_get(r, "truncated")));
        assert_non_null(rs(r, "exe"));
        assert_true(strncmp(rs(r, "exe"), exe, strlen(rs(r, "exe"))) == 0); /* a prefix of the real path */
        json_decref(recs);
        assert_chain(apath);
}

/* An executable path that is not UTF-8: the record still names it (escaped somehow), and the reason too. */
static void test_non_utf8_exe_recorded(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], exe[PATH_MAX];
        hx_run_result res;
        json_t *recs, *r = NULL;

        write_policy(b, NULL);
        hx_start(b);
        audit_file(b, apath, sizeof apath);
        run_from_odd_path(f, '\xff', 1, &res, exe, sizeof exe);
        assert_int_equal(res.exit_code, 1);
        hx_run_result_done(&res);
        hx_stop_clean(b);
        recs = file_records(apath);
        assert_int_equal(nobody_denials(recs, &r), 1);
        if (!rs(r, "exe") || !rs(r, "reason"))
                fprintf(stderr, "GAP: the denial of an executable whose path is not UTF-8 has%s%s: %s\n",
                        rs(r, "exe") ? "" : " no exe", rs(r, "reason") ? "" : " no reason",
                        json_dumps(r, JSON_COMPACT));
        assert_non_null(rs(r, "exe"));
        assert_non_null(rs(r, "reason"));
        json_decref(recs);
}

/*
 * One process whose first request is refused because the audit file's
 * filesystem is full (its session is opened in LMDB all the same), then
 * succeeds once space returns. Children (each a new process) use up the
 * space until one of them is refused on its first request.
 */
typedef struct refusal_run {
        char apath[PATH_MAX];
        char sid[64];
        unsigned issued; /* tokens received in all */
        long long usage; /* GetUsage count for repo:read after it */
} refusal_run;

static int first_refused_child(const char *sock, int rd, int wr)
{
        hx_conn *c = NULL;
        json_t *root = NULL;
        char go;

        if (hx_conn_open(NULL, sock, &c) < 0 || hx_conn_call(c, ISSUE_GIT_READ, &root) != 1)
                return 2;
        if (!hx_reply_error(root)) {
                dprintf(wr, "ISSUED\n");
                return 0;
        }
        dprintf(wr, "REFUSED %s\n", hx_reply_error(root));
        json_decref(root);
        if (read(rd, &go, 1) != 1)
                return 3;
        if (hx_conn_call(c, ISSUE_GIT_READ, &root) != 1)
                return 4;
        if (hx_reply_error(root)) {
                dprintf(wr, "ERR %s\n", hx_reply_error(root));
                return 1;
        }
        dprintf(wr, "OK %s\n", hx_reply_str(root, "sid"));
        return 0;
}

static void refused_then_recovered(fx *f, refusal_run *run)
{
        hx_broker *b = &f->b;
        char tiny[PATH_MAX], filler[PATH_MAX];
        bool done = false;

        memset(run, 0, sizeof *run);
        hx_path_in(tiny, sizeof tiny, f->work, "tiny");
        hx_fixture_mount(f, tiny, "64k");
        hx_path_in(run->apath, sizeof run->apath, tiny, "audit.jsonl");
        hx_add_arg(b, "--audit-log");
        hx_add_arg(b, run->apath);
        hx_add_arg(b, "--rate-limit");
        hx_add_arg(b, "0");
        write_policy(b, NULL);
        hx_start(b);
        fill(tiny, filler, sizeof filler, 0);
        for (int k = 0; k < 100 && !done; k++) {
                int to_child[2], from_child[2];
                char line[256] = "";
                assert_int_equal(pipe2(to_child, O_CLOEXEC), 0);
                assert_int_equal(pipe2(from_child, O_CLOEXEC), 0);
                fflush(NULL);
                pid_t pid = fork();
                assert_true(pid >= 0);
                if (pid == 0) {
                        alarm(20);
                        _exit(first_refused_child(b->sock, to_child[0], from_child[1]));
                }
                close(to_child[0]);
                close(from_child[1]);
                FILE *in = fdopen(from_child[0], "r");
                assert_non_null(in);
                if (!fgets(line, sizeof line, in))
                        hx_broker_dump_log(b);
                assert_true(line[0] != 0);
                if (strncmp(line, "ISSUED", 6) == 0) {
                        run->issued++;
                } else {
                        assert_string_equal(line, "REFUSED io.agentbroker.AuditUnavailable\n");
                        assert_int_equal(unlink(filler), 0);
                        assert_int_equal(write(to_child[1], "g", 1), 1);
                        assert_non_null(fgets(line, sizeof line, in));
                        assert_true(strncmp(line, "OK ", 3) == 0);
                        line[strcspn(line, "\n")] = '\0';
                        snprintf(run->sid, sizeof run->sid, "%s", line + 3);
                        run->issued++;
                        done = true;
                }
                fclose(in);
                close(to_child[1]);
                int st = 0;
                assert_int_equal(waitpid(pid, &st, 0), pid);
                assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        }
        assert_true(done);
        run->usage = usage_count(b, "repo:read");
        hx_stop_clean(b);
}

/* ... the refused request's session is on the record before that session's first token. */
static void test_session_opened_recorded_after_refusal(void **state)
{
        fx *f = *state;
        refusal_run run;
        json_t *recs;

        refused_then_recovered(f, &run);
        recs = file_records(run.apath);
        one_record(recs, "token.issued", "sid", run.sid);
        size_t i, n = 0;
        json_t *r;
        json_array_foreach(recs, i, r)
                if (strcmp(rs(r, "event"), "session.opened") == 0 && rs(r, "sid") && strcmp(rs(r, "sid"), run.sid) == 0)
                        n++;
        if (n != 1)
                fprintf(stderr, "GAP: session %s issued a token but its session.opened record was lost with the "
                                "refused request (the session stayed in LMDB)\n",
                        run.sid);
        assert_int_equal(n, 1);
        json_decref(recs);
}

/* ... and the usage counters count only tokens that were issued. */
static void test_usage_not_counted_when_refused(void **state)
{
        fx *f = *state;
        refusal_run run;

        refused_then_recovered(f, &run);
        if (run.usage != (long long)run.issued)
                fprintf(stderr, "GAP: usage count %lld, tokens issued %u (a refused issuance was counted)\n", run.usage,
                        run.issued);
        assert_int_equal(run.usage, run.issued);
}

/* ---- journald --------------------------------------------------------------------- */

static void test_journald(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        hx_run_result res;
        char jti[64];

        if (access("/run/systemd/journal/socket", F_OK) < 0 || access("/usr/bin/journalctl", X_OK) < 0) {
                fprintf(stderr, "SKIP journald: /run/systemd/journal/socket (or journalctl) does not exist here; the "
                                "journald records cannot be checked on this machine\n");
                skip();
        }
        write_policy(b, NULL);
        hx_start(b);
        hx_conn *c = hx_connect(b, b->sock);
        json_t *root = hx_call(c, ISSUE_GIT_READ);
        hx_assert_ok(root);
        snprintf(jti, sizeof jti, "%s", hx_reply_str(root, "jti"));
        json_decref(root);
        char match[128];
        snprintf(match, sizeof match, "AGENT_BROKER_JTI=%s", jti);
        char *argv[] = { (char *)"/usr/bin/journalctl", (char *)"-o", (char *)"json", (char *)"--no-pager",
                         (char *)"MESSAGE_ID=d7c7f49142834d7a85019bb9b86a7ab2", match, NULL };
        json_t *entries = NULL;
        for (int i = 0; i < 50; i++) { /* journald writes asynchronously */
                assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, &res), 0);
                entries = parse_lines(res.out, "journalctl");
                hx_run_result_done(&res);
                if (json_array_size(entries) > 0)
                        break;
                json_decref(entries);
                entries = NULL;
                usleep(100 * 1000);
        }
        assert_non_null(entries);
        assert_int_equal(json_array_size(entries), 1);
        json_t *e = json_array_get(entries, 0);
        assert_string_equal(rs(e, "AGENT_BROKER_AGENT"), AGENT_ID);
        assert_string_equal(rs(e, "AGENT_BROKER_AUDIENCE"), AUD_GIT);
        assert_string_equal(rs(e, "AGENT_BROKER_OWNER"), OWNER);
        assert_non_null(rs(e, "AGENT_BROKER_SEQ"));
        assert_null(strstr(json_dumps(e, 0), "eyJ"));
        json_decref(entries);
}

/* ---- reading what the broker did not write (helper-54) ------------------------------ */

/* `agent-brokerctl ARGS...` (no sockets named) under `ulimit -v kib` when kib > 0. */
static void ctl_limited(unsigned kib, const char *const *args, hx_run_result *res)
{
        char ctl[PATH_MAX], limit[96];
        char *argv[40];
        size_t n = 0;

        assert_int_equal(hx_build_path("agent-brokerctl", ctl, sizeof ctl), 0);
        if (kib) {
                snprintf(limit, sizeof limit, "ulimit -v %u && exec \"$@\"", kib);
                argv[n++] = (char *)"/bin/sh";
                argv[n++] = (char *)"-c";
                argv[n++] = limit;
                argv[n++] = (char *)"sh";
        }
        argv[n++] = ctl;
        for (size_t i = 0; args[i]; i++) {
                assert_true(n < 39);
                argv[n++] = (char *)args[i];
        }
        argv[n] = NULL;
        assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, res), 0);
        assert_false(res->timed_out);
}

/*
 * A file that cannot be read (a directory: EISDIR) is exit 4 for `audit
 * verify` and `audit --file`, never "intact: 0 records". A line longer than
 * any record (160 MiB, a hole in the file) is a broken record at its line,
 * read in pieces: under a 96 MiB address-space limit, where getline failed
 * with ENOMEM and the forged record after it was never read, verify names
 * it and the listing goes on past it.
 */
static void test_verify_read_errors_and_long_lines(void **state)
{
        fx *f = *state;
        char apath[PATH_MAX], jwks[PATH_MAX], copy[PATH_MAX], where[PATH_MAX + 32];
        hx_run_result res;
        lines l;
        FILE *out;

        {
                const char *args[] = { "audit", "verify", "--file", f->work, NULL };
                ctl_limited(0, args, &res);
                if (res.exit_code != 4)
                        fprintf(stderr, "verify of a directory: exit %d:\n%s%s\n", res.exit_code, res.out, res.err);
                assert_int_equal(res.exit_code, 4);
                assert_null(strstr(res.out, "intact"));
                assert_non_null(strstr(res.err, strerror(EISDIR)));
                hx_run_result_done(&res);
        }
        {
                const char *args[] = { "audit", "--file", f->work, NULL };
                ctl_limited(0, args, &res);
                assert_int_equal(res.exit_code, 4);
                assert_non_null(strstr(res.err, strerror(EISDIR)));
                hx_run_result_done(&res);
        }

        make_trail(f, 8, apath, sizeof apath, jwks, sizeof jwks);
        lines_load(&l, apath);
        assert_int_equal(l.n, 12);
        hx_path_in(copy, sizeof copy, f->work, "long-line.jsonl");
        out = fopen(copy, "we");
        assert_non_null(out);
        for (size_t i = 0; i < 5; i++)
                assert_int_equal(fwrite(l.line[i], 1, l.len[i], out), l.len[i]);
        assert_int_equal(fflush(out), 0);
        /* line 6: 160 MiB of NUL bytes (a hole: no disk) and a newline, then a forged record */
        assert_int_equal(fseeko(out, 160LL << 20, SEEK_CUR), 0);
        fputs("\n{\"seq\":999,\"prev\":\"bogus\",\"event\":\"token.issued\",\"agent\":\"forged\"}\n", out);
        for (size_t i = 5; i < l.n; i++)
                assert_int_equal(fwrite(l.line[i], 1, l.len[i], out), l.len[i]);
        assert_int_equal(fclose(out), 0);

        snprintf(where, sizeof where, "%s:6: seq 6: a line longer than any audit record", copy);
        expect_broken(&f->b, copy, jwks, where, NULL);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
        const bool sanitized = true; /* the CLI is built as the tests are: its sanitizer maps shadow memory at start */
#else
        const bool sanitized = false;
#endif
        if (hx_under_wrapper() || sanitized) {
                fprintf(stderr, "SKIP the address-space limit under AB_TEST_WRAPPER or a sanitizer\n");
        } else {
                const char *args[] = { "audit", "verify", "--file", copy, "--keys", jwks, NULL };
                ctl_limited(96 * 1024, args, &res);
                if (res.exit_code != 1 || !strstr(res.out, where))
                        fprintf(stderr, "verify under ulimit -v: exit %d:\n%s%s\n", res.exit_code, res.out, res.err);
                assert_int_equal(res.exit_code, 1);
                assert_non_null(strstr(res.out, where));
                hx_run_result_done(&res);

                const char *largs[] = { "audit", "--json", "--file", copy, NULL };
                ctl_limited(96 * 1024, largs, &res);
                assert_int_equal(res.exit_code, 0);
                snprintf(where, sizeof where, "%s:6: a line longer than any audit record", copy);
                assert_non_null(strstr(res.err, where));
                json_t *recs = parse_lines(res.out, "audit --json --file");
                assert_int_equal(json_array_size(recs), l.n + 1); /* every record and the forged one, after it */
                json_decref(recs);
                hx_run_result_done(&res);
        }
        free(l.text);
}

/* Write text to work/name and expect `audit verify --keys` it to be a usage error naming it. */
static void expect_keys_refused(fx *f, const char *apath, const char *name, const char *text)
{
        char kpath[PATH_MAX], out[4096];
        hx_path_in(kpath, sizeof kpath, f->work, name);
        assert_int_equal(hx_write_file(kpath, text, 0644), 0);
        const char *args[] = { "--file", apath, "--keys", kpath, NULL };
        int ex = ctl_verify(&f->b, args, out, sizeof out);
        if (ex != 2 || !strstr(out, "no Ed25519 key"))
                fprintf(stderr, "--keys %s (%s): exit %d, expected 2:\n%s\n", name, text, ex, out);
        assert_int_equal(ex, 2);
        assert_non_null(strstr(out, "no Ed25519 key"));
        assert_null(strstr(out, "intact"));
}

/*
 * A --keys file that parses but holds no usable Ed25519 key (a bare JWK,
 * {}, [], an empty set, a set of other keys) checked no checkpoint, and the
 * trail passed as "intact, N not checked", exit 0: now exit 2, as a --keys
 * file that does not parse.
 */
static void test_verify_keys_must_hold_keys(void **state)
{
        fx *f = *state;
        char apath[PATH_MAX], jwks[PATH_MAX], bare[1024];
        json_t *set, *k;

        make_trail(f, 2, apath, sizeof apath, jwks, sizeof jwks);
        set = json_load_file(jwks, 0, NULL);
        assert_non_null(set);
        k = json_array_get(json_object_get(set, "keys"), 0);
        assert_non_null(k);
        char *kt = json_dumps(k, JSON_COMPACT);
        assert_non_null(kt);
        snprintf(bare, sizeof bare, "%s", kt);
        free(kt);
        expect_keys_refused(f, apath, "bare-jwk.json", bare);
        expect_keys_refused(f, apath, "empty-object.json", "{}");
        expect_keys_refused(f, apath, "empty-array.json", "[]");
        expect_keys_refused(f, apath, "empty-set.json", "{\"keys\": []}");
        expect_keys_refused(f, apath, "rsa-set.json",
                            "{\"keys\": [{\"kty\": \"RSA\", \"kid\": \"r\", \"n\": \"AQAB\", \"e\": \"AQAB\"}]}");
        /* the right key with its curve left out is not an Ed25519 key either */
        json_object_del(k, "crv");
        kt = json_dumps(set, JSON_COMPACT);
        assert_non_null(kt);
        expect_keys_refused(f, apath, "no-crv.json", kt);
        free(kt);
        json_decref(set);
        {
                const char *args[] = { "--file", apath, "--keys", jwks, NULL };
                verify_ok(&f->b, args);
        }
}

/*
 * seq 2^53 is past what the broker takes over at start (recover: seq <
 * AB_AUDIT_MAX_SEQ): verify refused seq > 2^53 only, and passed a file
 * whose audit.rotated record carried 2^53.
 */
static void test_verify_seq_limit_as_broker(void **state)
{
        fx *f = *state;
        char path[PATH_MAX], text[512], where[PATH_MAX + 32];
        const long long max = 1LL << 53;

        hx_path_in(path, sizeof path, f->work, "big-seq.jsonl");
        /* the last seq the broker goes on from: intact */
        snprintf(text, sizeof text,
                 "{\"time\":1000000,\"event\":\"audit.rotated\",\"seq\":%lld,\"prev\":\"" ZERO64 "\","
                 "\"previous_file\":\"/x\"}\n",
                 max - 1);
        assert_int_equal(hx_write_file(path, text, 0644), 0);
        verify_file_ok(&f->b, path);
        snprintf(text, sizeof text,
                 "{\"time\":1000000,\"event\":\"audit.rotated\",\"seq\":%lld,\"prev\":\"" ZERO64 "\","
                 "\"previous_file\":\"/x\"}\n",
                 max);
        assert_int_equal(hx_write_file(path, text, 0644), 0);
        snprintf(where, sizeof where, "%s:1: seq %lld:", path, max);
        expect_broken(&f->b, path, NULL, where, "seq out of range");
}

/*
 * A line over a page (48 KiB: someone padded a record in the current file)
 * made ReadAudit answer more=true, no records and the same next_seq, and
 * `agent-brokerctl audit` ask again for ever. The broker passes over a line
 * longer than any record (and logs it); the rest is listed.
 */
static void test_read_audit_passes_over_long_line(void **state)
{
        fx *f = *state;
        hx_broker *b = &f->b;
        char apath[PATH_MAX], jwks[PATH_MAX], *log;
        hx_run_result res;
        lines l;
        FILE *out;

        make_trail(f, 3, apath, sizeof apath, jwks, sizeof jwks);
        lines_load(&l, apath);
        out = fopen(apath, "we");
        assert_non_null(out);
        for (size_t i = 0; i < l.n; i++) {
                if (i == 1) {
                        /* line 2 with a 60,000-byte reason, its seq kept */
                        assert_int_equal(fwrite(l.line[i], 1, l.len[i] - 2, out), l.len[i] - 2);
                        fputs(",\"reason\":\"", out);
                        for (int k = 0; k < 60000; k++)
                                fputc('A', out);
                        fputs("\"}\n", out);
                } else {
                        assert_int_equal(fwrite(l.line[i], 1, l.len[i], out), l.len[i]);
                }
        }
        assert_int_equal(fclose(out), 0);
        hx_start(b);
        {
                const char *args[] = { "audit", "--json", NULL };
                assert_int_equal(hx_ctlv(b, -1, args, 10000, &res), 0);
                if (res.timed_out || res.exit_code != 0)
                        fprintf(stderr, "audit over the admin socket: %s, exit %d:\n%s\n",
                                res.timed_out ? "timed out" : "done", res.exit_code, res.err);
                assert_false(res.timed_out);
                assert_int_equal(res.exit_code, 0);
                json_t *recs = parse_lines(res.out, "agent-brokerctl audit --json");
                assert_true(json_array_size(recs) >= l.n - 1); /* all but line 2, and this start's */
                assert_int_equal(ri(json_array_get(recs, 0), "seq"), 1);
                assert_int_equal(ri(json_array_get(recs, 1), "seq"), 3);
                json_decref(recs);
                hx_run_result_done(&res);
        }
        log = hx_read_text(b->log, READ_MAX, NULL);
        assert_non_null(strstr(log, "longer than any audit record"));
        free(log);
        free(l.text);
}

/* A fake admin socket whose ReadAudit always says: more, and nothing read. */
static void fake_stuck_pages(fx *f, const char *path)
{
        static const char reply[] = "{\"parameters\":{\"records\":[],\"next_seq\":0,\"more\":true,\"file\":\"/x\"}}";

        f->helper = hx_fake_server(path, hx_serve_reply, reply); /* killed in teardown */
}

/* The client stops, exit 4, on a page that advances nothing (else it asked again for ever). */
static void test_audit_listing_stops_on_stuck_page(void **state)
{
        fx *f = *state;
        char sock[PATH_MAX];
        hx_run_result res;

        hx_path_in(sock, sizeof sock, f->work, "stuck.sock");
        fake_stuck_pages(f, sock);
        const char *args[] = { "--admin-socket", sock, "audit", NULL };
        char ctl[PATH_MAX];
        char *argv[8];
        size_t n = 0;
        assert_int_equal(hx_build_path("agent-brokerctl", ctl, sizeof ctl), 0);
        argv[n++] = ctl;
        for (size_t i = 0; args[i]; i++)
                argv[n++] = (char *)args[i];
        argv[n] = NULL;
        assert_int_equal(hx_run(argv, NULL, -1, 5000, &res), 0);
        if (res.timed_out || res.exit_code != 4)
                fprintf(stderr, "audit against a stuck broker: %s, exit %d:\n%s\n",
                        res.timed_out ? "timed out" : "done", res.exit_code, res.err);
        assert_false(res.timed_out);
        assert_int_equal(res.exit_code, 4);
        assert_non_null(strstr(res.err, "does not advance"));
        hx_run_result_done(&res);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_scripted_day, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_tamper_detected, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_verify_detects_missing_head, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_checkpoint_signatures, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_checkpoints_across_key_rotation, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_many_rotations_keep_keys_in_overlap, hx_fixture_setup,
                                                hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_periodic_checkpoints, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_torn_tail_cut_on_restart, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_checkpoint_owed_after_crash, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_listing_escapes_control_characters, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_garbage_tail_refused, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_kill9_during_burst, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_tiny_fs_audit_log, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_tiny_fs_state_dir, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_rotation, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_rotation_without_inode, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_rotation_keeps_every_file, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_rotation_keep_two, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_rotation_stops_at_bound, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_audit_keep_usage, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_introspect_flood_rate_limited, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_read_audit_large_file, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_usage_counters, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_usage_rows_bounded, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_full_disk_quiet, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_changes_recorded_after_failed_sync, hx_fixture_setup,
                                                hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_moved_audit_file_reopened, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_journald, hx_fixture_setup, hx_fixture_teardown),
                /* gaps found while writing these: decisions missing from the record */
                cmocka_unit_test_setup_teardown(test_attenuate_denial_audited, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_pam_records_name_token_and_agent, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_pam_refusal_audited, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_unrelated_write_no_policy_record, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_policy_change_recorded_once, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_policy_rejected_recorded, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_reload_names_admin, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_oversized_denial_still_recorded, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_non_utf8_exe_recorded, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_session_opened_recorded_after_refusal, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_usage_not_counted_when_refused, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_failed_rotation_deletes_nothing, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_verify_read_errors_and_long_lines, hx_fixture_setup,
                                                hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_verify_keys_must_hold_keys, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_verify_seq_limit_as_broker, hx_fixture_setup, hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_read_audit_passes_over_long_line, hx_fixture_setup,
                                                hx_fixture_teardown),
                cmocka_unit_test_setup_teardown(test_audit_listing_stops_on_stuck_page, hx_fixture_setup,
                                                hx_fixture_teardown),
        };
        if (getenv("HX_FILTER"))
                cmocka_set_test_filter(getenv("HX_FILTER"));
        return cmocka_run_group_tests(tests, NULL, NULL);
}
