/* SPDX-License-Identifier: MIT */
/*
 * Integration tests for issue 2 (the core slice): each test starts the
 * real agent-brokerd on a temporary directory with its own policy and
 * drives it through the client library, the CLI, a helper program, raw
 * varlink bytes, a process dropped to nobody, and an independent JWT
 * verifier (Debian's python3-jwt run by /usr/bin/python3).
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <cmocka.h>
#include <grp.h>
#include "harness.h"
#include "../../client/agentbroker.h"

#define AUD_GIT "mcp://git.internal"
#define AUD_TICKETS "https://tickets.internal/api"
#define AGENT_ID "test-agent"
#define OWNER "alice@example.com"

/* ---- fixtures ------------------------------------------------------------- */

/*
 * A policy with one agent whose selectors are match_json (the inside of
 * the "match" object), granted two audiences.
 */
static void write_policy(hx_broker *b, const char *match_json)
{
        char policy[2048];
        int n = snprintf(policy, sizeof policy,
                         "{\"version\": 1,\n"
                         " \"agents\": [\n"
                         "  {\"id\": \"" AGENT_ID "\", \"owner\": \"" OWNER "\",\n"
                         "   \"match\": {%s},\n"
                         "   \"grants\": [\n"
                         "     {\"audience\": \"" AUD_GIT "\", \"scopes\": [\"repo:read\", \"repo:write\"], \"max_ttl\": 600},\n"
                         "     {\"audience\": \"" AUD_TICKETS "\", \"scopes\": [\"tickets:read\"], \"max_ttl\": 60}]}]}\n",
                         match_json);
        assert_true(n > 0 && (size_t)n < sizeof policy);
        assert_int_equal(hx_broker_write_policy(b, policy), 0);
}

static void start_with(hx_broker *b, const char *match_json)
{
        write_policy(b, match_json);
        hx_start(b);
}

/* hx_assert_ok, and the reply has a "parameters" object. */
static void assert_ok(const json_t *root)
{
        hx_assert_ok(root);
        assert_true(json_is_object(json_object_get(root, "parameters")));
}

static bool looks_like_jws(const char *t)
{
        size_t dots = 0, n = strlen(t);
        if (n < 100)
                return false;
        for (size_t i = 0; i < n; i++) {
                char ch = t[i];
                if (ch == '.')
                        dots++;
                else if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
                           ch == '-' || ch == '_'))
                        return false;
        }
        return dots == 2;
}

/* Issue a token through the library in this process. Returns the ab_* code; *err gets the error name. */
static int lib_issue(const char *sock, const char *aud, const char *scope, unsigned ttl, const char *task,
                     char **ret_token, char *err, size_t errmax)
{
        ab_client *c = NULL;
        const char *scopes[] = { scope };
        int r = ab_client_connect(sock, HX_IO_TIMEOUT_MS, &c);

        if (err)
                err[0] = '\0';
        if (r < 0)
                return r;
        r = ab_issue_token(c, aud, scopes, 1, ttl, task, ret_token);
        if (r < 0 && err)
                snprintf(err, errmax, "%s", ab_client_error_name(c));
        ab_client_free(c);
        return r;
}

typedef struct issue_args {
        const char *sock;
        const char *audience;
        const char *scope;
} issue_args;

/* Runs in a child (possibly as nobody): "OK TOKEN" (exit 0) or "ERR NAME" (exit 1). */
static int child_issue(void *arg, char *out, size_t outmax)
{
        const issue_args *a = arg;
        char *token = NULL, err[256];
        int r = lib_issue(a->sock, a->audience, a->scope, 0, NULL, &token, err, sizeof err);

        if (r == 0) {
                snprintf(out, outmax, "OK %s", token);
                ab_token_free(token);
                return 0;
        }
        snprintf(out, outmax, "ERR %s", err[0] ? err : ab_strerror(r));
        return r == AB_ERR_DENIED || r == AB_ERR_REMOTE ? 1 : 3;
}

static void issue_as_nobody(hx_broker *b, char *out, size_t outmax, int *ret_exit)
{
        issue_args a = { b->sock, AUD_GIT, "repo:read" };
        int r = hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_issue, &a, HX_RUN_TIMEOUT_MS, out, outmax, ret_exit);
        assert_int_equal(r, 0);
}

/* ---- who may have a token ------------------------------------------------- */

/* A process of the granted uid (root here) gets a token; through the library, the CLI and raw varlink. */
static void test_granted_uid_gets_token(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        char *token = NULL, err[256];
        json_t *root;
        hx_conn *c;

        assert_int_equal(getuid(), 0);
        start_with(b, "\"uid\": 0");

        assert_int_equal(lib_issue(b->sock, AUD_GIT, "repo:read", 0, NULL, &token, err, sizeof err), 0);
        assert_non_null(token);
        assert_true(looks_like_jws(token));
        ab_token_free(token);

        assert_int_equal(hx_ctl(b, -1, &res, "token", "--audience", AUD_GIT, "--scope", "repo:read", NULL), 0);
        assert_false(res.timed_out);
        assert_int_equal(res.exit_code, 0);
        res.out[strcspn(res.out, "\n")] = '\0';
        assert_true(looks_like_jws(res.out));
        hx_run_result_done(&res);

        c = hx_connect(b, b->sock);
        root = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_GIT
                          "\",\"scopes\":[\"repo:read\",\"repo:write\",\"repo:read\"]}}");
        assert_ok(root);
        assert_true(looks_like_jws(hx_reply_str(root, "token")));
        assert_string_equal(hx_reply_str(root, "token_type"), "Bearer");
        assert_string_equal(hx_reply_str(root, "agent"), AGENT_ID);
        assert_string_equal(hx_reply_str(root, "scope"), "repo:read repo:write"); /* duplicates collapse */
        assert_int_equal(json_integer_value(json_object_get(hx_reply_params(root), "expires_in")), 300);
        assert_true(strlen(hx_reply_str(root, "jti")) >= 22);
        json_decref(root);

        /* The ticket grant's max_ttl (60) caps the default ttl of 300. */
        root = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_TICKETS
                          "\",\"scopes\":[\"tickets:read\"]}}");
        assert_ok(root);
        assert_int_equal(json_integer_value(json_object_get(hx_reply_params(root), "expires_in")), 60);
        json_decref(root);
}

/* A forked child that drops to nobody is not an agent: library and CLI (exit 1). */
static void test_other_uid_denied(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        char out[4096];
        int ex = -1;

        start_with(b, "\"uid\": 0");

        issue_as_nobody(b, out, sizeof out, &ex);
        assert_string_equal(out, "ERR io.agentbroker.NotAnAgent");
        assert_int_equal(ex, 1);

        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "token", "--audience", AUD_GIT, "--scope", "repo:read",
                                NULL), 0);
        assert_false(res.timed_out);
        assert_int_equal(res.exit_code, 1);
        assert_string_equal(res.out, "");
        assert_non_null(strstr(res.err, "io.agentbroker.NotAnAgent"));
        assert_non_null(strstr(res.err, "uid 65534"));
        hx_run_result_done(&res);

        /* The same request from root is still granted. */
        assert_int_equal(hx_ctl(b, -1, &res, "token", "--audience", AUD_GIT, "--scope", "repo:read", NULL), 0);
        assert_int_equal(res.exit_code, 0);
        hx_run_result_done(&res);
}

/* The other way round: a policy for nobody grants nobody and denies root. */
static void test_uid_selector_is_exact(void **state)
{
        hx_broker *b = *state;
        char out[4096], *token = NULL, err[256];
        int ex = -1;

        start_with(b, "\"uid\": 65534");

        issue_as_nobody(b, out, sizeof out, &ex);
        assert_int_equal(ex, 0);
        assert_memory_equal(out, "OK ", 3);
        assert_true(looks_like_jws(out + 3));

        assert_int_equal(lib_issue(b->sock, AUD_GIT, "repo:read", 0, NULL, &token, err, sizeof err), AB_ERR_DENIED);
        assert_null(token);
        assert_string_equal(err, "io.agentbroker.NotAnAgent");
}

/* Run helper-issue (a program with its own sha256) and return its output line. */
static void run_helper(hx_broker *b, hx_run_result *res)
{
        char helper[PATH_MAX];
        assert_int_equal(hx_build_path("tests/helper-issue", helper, sizeof helper), 0);
        char *argv[] = { helper, b->sock, (char *)AUD_GIT, (char *)"repo:read", NULL };
        assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, res), 0);
        assert_false(res->timed_out);
}

static void run_ctl_token(hx_broker *b, hx_run_result *res)
{
        assert_int_equal(hx_ctl(b, -1, res, "token", "--audience", AUD_GIT, "--scope", "repo:read", NULL), 0);
        assert_false(res->timed_out);
}

static void restart_with(hx_broker *b, const char *match_json)
{
        if (b->pid > 0)
                hx_stop_clean(b);
        start_with(b, match_json);
}

/* A sha256 selector admits exactly the executable with that hash. */
static void test_sha256_selector(void **state)
{
        hx_broker *b = *state;
        char match[256], h_other[65], h_ctl[65], h_helper[65], h_self[65], path[PATH_MAX], *token = NULL,
                err[256];
        hx_run_result res;

        if (hx_under_wrapper()) {
                /* the broker sees the tool's executable, not this test's */
                printf("SKIPPED: sha256 of this process under AB_TEST_WRAPPER\n");
                skip();
        }

        assert_int_equal(hx_build_path("agent-brokerd", path, sizeof path), 0);
        assert_int_equal(hx_sha256_file(path, h_other), 0); /* some other file */
        assert_int_equal(hx_build_path("agent-brokerctl", path, sizeof path), 0);
        assert_int_equal(hx_sha256_file(path, h_ctl), 0);
        assert_int_equal(hx_build_path("tests/helper-issue", path, sizeof path), 0);
        assert_int_equal(hx_sha256_file(path, h_helper), 0);
        assert_int_equal(hx_sha256_file("/proc/self/exe", h_self), 0);
        assert_string_not_equal(h_ctl, h_helper);
        assert_string_not_equal(h_ctl, h_self);
        assert_string_not_equal(h_helper, h_self);

        /* 1. The hash of another file: every caller of the right uid is denied. */
        snprintf(match, sizeof match, "\"uid\": 0, \"sha256\": \"%s\"", h_other);
        restart_with(b, match);
        run_ctl_token(b, &res);
        assert_int_equal(res.exit_code, 1);
        assert_non_null(strstr(res.err, "io.agentbroker.NotAnAgent"));
        hx_run_result_done(&res);
        run_helper(b, &res);
        assert_int_equal(res.exit_code, 1);
        assert_non_null(strstr(res.out, "ERR io.agentbroker.NotAnAgent"));
        hx_run_result_done(&res);
        assert_int_equal(lib_issue(b->sock, AUD_GIT, "repo:read", 0, NULL, &token, err, sizeof err), AB_ERR_DENIED);
        assert_string_equal(err, "io.agentbroker.NotAnAgent");

        /* 2. The CLI's hash: the CLI is granted, the helper and this process are not. */
        snprintf(match, sizeof match, "\"uid\": 0, \"sha256\": \"%s\"", h_ctl);
        restart_with(b, match);
        run_ctl_token(b, &res);
        assert_int_equal(res.exit_code, 0);
        res.out[strcspn(res.out, "\n")] = '\0';
        assert_true(looks_like_jws(res.out));
        hx_run_result_done(&res);
        run_helper(b, &res);
        assert_int_equal(res.exit_code, 1);
        assert_non_null(strstr(res.out, "ERR io.agentbroker.NotAnAgent"));
        hx_run_result_done(&res);
        assert_int_equal(lib_issue(b->sock, AUD_GIT, "repo:read", 0, NULL, &token, err, sizeof err), AB_ERR_DENIED);

        /* 3. The helper's hash: only the helper. */
        snprintf(match, sizeof match, "\"uid\": 0, \"sha256\": \"%s\"", h_helper);
        restart_with(b, match);
        run_helper(b, &res);
        assert_int_equal(res.exit_code, 0);
        assert_memory_equal(res.out, "OK ", 3);
        res.out[strcspn(res.out, "\n")] = '\0';
        assert_true(looks_like_jws(res.out + 3));
        hx_run_result_done(&res);
        run_ctl_token(b, &res);
        assert_int_equal(res.exit_code, 1);
        hx_run_result_done(&res);

        /* 4. This test binary's own hash (sha256 of /proc/self/exe): this process is granted. */
        snprintf(match, sizeof match, "\"uid\": 0, \"sha256\": \"%s\"", h_self);
        restart_with(b, match);
        assert_int_equal(lib_issue(b->sock, AUD_GIT, "repo:read", 0, NULL, &token, err, sizeof err), 0);
        assert_true(looks_like_jws(token));
        ab_token_free(token);
        token = NULL;
        run_ctl_token(b, &res);
        assert_int_equal(res.exit_code, 1);
        hx_run_result_done(&res);

        /* 5. Right hash, wrong uid: all selectors must match. */
        snprintf(match, sizeof match, "\"uid\": 65534, \"sha256\": \"%s\"", h_self);
        restart_with(b, match);
        assert_int_equal(lib_issue(b->sock, AUD_GIT, "repo:read", 0, NULL, &token, err, sizeof err), AB_ERR_DENIED);
        assert_string_equal(err, "io.agentbroker.NotAnAgent");
}

/* ---- what may be granted -------------------------------------------------- */

static void expect_issue_error(hx_conn *c, const char *params, const char *error)
{
        char msg[4096];
        json_t *root;

        snprintf(msg, sizeof msg, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":%s}", params);
        root = hx_call(c, msg);
        if (!hx_reply_error(root) || strcmp(hx_reply_error(root), error) != 0)
                fprintf(stderr, "request %s\n", params);
        hx_assert_error(root, error);
        assert_null(hx_reply_str(root, "token"));
        json_decref(root);
}

static void expect_issue_ok(hx_conn *c, const char *params, long long expires_in)
{
        char msg[4096];
        json_t *root;

        snprintf(msg, sizeof msg, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":%s}", params);
        root = hx_call(c, msg);
        if (hx_reply_error(root))
                fprintf(stderr, "request %s\n", params);
        assert_ok(root);
        assert_true(looks_like_jws(hx_reply_str(root, "token")));
        assert_int_equal(json_integer_value(json_object_get(hx_reply_params(root), "expires_in")), expires_in);
        json_decref(root);
}

static void test_scope_audience_ttl_denials(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        hx_conn *c;

        start_with(b, "\"uid\": 0");
        c = hx_connect(b, b->sock);

        /* Scopes: every one must be granted for the audience; no partial grant. */
        expect_issue_error(c, "{\"audience\":\"" AUD_GIT "\",\"scopes\":[\"repo:admin\"]}",
                           "io.agentbroker.ScopeNotGranted");
        expect_issue_error(c, "{\"audience\":\"" AUD_GIT "\",\"scopes\":[\"repo:read\",\"repo:admin\"]}",
                           "io.agentbroker.ScopeNotGranted");
        expect_issue_error(c, "{\"audience\":\"" AUD_GIT "\",\"scopes\":[\"tickets:read\"]}",
                           "io.agentbroker.ScopeNotGranted");
        expect_issue_error(c, "{\"audience\":\"" AUD_GIT "\",\"scopes\":[\"repo:rea\"]}",
                           "io.agentbroker.ScopeNotGranted");
        expect_issue_error(c, "{\"audience\":\"" AUD_GIT "\",\"scopes\":[\"repo:read2\"]}",
                           "io.agentbroker.ScopeNotGranted");
        /* Audiences: exact match only. */
        expect_issue_error(c, "{\"audience\":\"mcp://other\",\"scopes\":[\"repo:read\"]}",
                           "io.agentbroker.AudienceNotGranted");
        expect_issue_error(c, "{\"audience\":\"" AUD_GIT "/\",\"scopes\":[\"repo:read\"]}",
                           "io.agentbroker.AudienceNotGranted");
        expect_issue_error(c, "{\"audience\":\"MCP://GIT.INTERNAL\",\"scopes\":[\"repo:read\"]}",
                           "io.agentbroker.AudienceNotGranted");
        /* ttl: limit and limit + 1 for both grants. */
        expect_issue_ok(c, "{\"audience\":\"" AUD_GIT "\",\"scopes\":[\"repo:read\"],\"ttl\":600}", 600);
        expect_issue_error(c, "{\"audience\":\"" AUD_GIT "\",\"scopes\":[\"repo:read\"],\"ttl\":601}",
                           "io.agentbroker.TtlTooLong");
        expect_issue_ok(c, "{\"audience\":\"" AUD_TICKETS "\",\"scopes\":[\"tickets:read\"],\"ttl\":60}", 60);
        expect_issue_error(c, "{\"audience\":\"" AUD_TICKETS "\",\"scopes\":[\"tickets:read\"],\"ttl\":61}",
                           "io.agentbroker.TtlTooLong");
        expect_issue_ok(c, "{\"audience\":\"" AUD_GIT "\",\"scopes\":[\"repo:read\"],\"ttl\":1}", 1);
        /* The largest ttl the protocol allows is a policy denial, not a parameter error. */
        expect_issue_error(c, "{\"audience\":\"" AUD_GIT "\",\"scopes\":[\"repo:read\"],\"ttl\":86400}",
                           "io.agentbroker.TtlTooLong");
        /* Still granted afterwards, on the same connection. */
        expect_issue_ok(c, "{\"audience\":\"" AUD_GIT "\",\"scopes\":[\"repo:write\",\"repo:read\"]}", 300);

        /* The CLI reports a denial with exit code 1 and the error name on stderr. */
        assert_int_equal(hx_ctl(b, -1, &res, "token", "--audience", AUD_GIT, "--scope", "repo:admin", NULL), 0);
        assert_int_equal(res.exit_code, 1);
        assert_string_equal(res.out, "");
        assert_non_null(strstr(res.err, "io.agentbroker.ScopeNotGranted"));
        hx_run_result_done(&res);
        assert_int_equal(hx_ctl(b, -1, &res, "token", "--audience", "mcp://nope", "--scope", "repo:read", NULL), 0);
        assert_int_equal(res.exit_code, 1);
        assert_non_null(strstr(res.err, "io.agentbroker.AudienceNotGranted"));
        hx_run_result_done(&res);
        assert_int_equal(hx_ctl(b, -1, &res, "token", "--audience", AUD_GIT, "--scope", "repo:read", "--ttl", "601",
                                NULL), 0);
        assert_int_equal(res.exit_code, 1);
        assert_non_null(strstr(res.err, "io.agentbroker.TtlTooLong"));
        hx_run_result_done(&res);
}

/* ---- the token, checked by an independent verifier ------------------------ */

static const char *py_error(const json_t *results, size_t i)
{
        const json_t *r = json_array_get(results, i);
        if (json_is_true(json_object_get(r, "valid")))
                return "(valid)";
        return json_string_value(json_object_get(r, "error"));
}

/* hx_jwt_tamper, and the copy differs from the token. */
static char *tamper(const char *token, int seg)
{
        char *t = hx_jwt_tamper(token, seg);
        assert_string_not_equal(t, token);
        return t;
}

static char *read_machine_id(char *buf, size_t max)
{
        char *text = NULL;
        if (hx_read_file("/etc/machine-id", 4096, &text, NULL) < 0)
                return NULL;
        text[strcspn(text, "\n")] = '\0';
        if (strlen(text) != 32) {
                free(text);
                return NULL;
        }
        snprintf(buf, max, "%s", text);
        free(text);
        return buf;
}

static void test_token_verifies_independently(void **state)
{
        hx_broker *b = *state;
        hx_conn *c;
        json_t *root, *keys, *jwk, *results, *claims, *header, *reply2;
        char *jwks_json, *token, *token2, *bad_payload, *bad_sig, *bad_header, mid[64];
        const char *kid, *jti;
        long long now = (long long)time(NULL), iat;

        start_with(b, "\"uid\": 0");
        c = hx_connect(b, b->sock);

        root = hx_call(c, "{\"method\":\"io.agentbroker.GetKeys\"}");
        assert_ok(root);
        keys = json_object_get(hx_reply_params(root), "keys");
        assert_true(json_is_array(keys));
        assert_int_equal(json_array_size(keys), 1);
        jwk = json_array_get(keys, 0);
        assert_string_equal(json_string_value(json_object_get(jwk, "kty")), "OKP");
        assert_string_equal(json_string_value(json_object_get(jwk, "crv")), "Ed25519");
        assert_int_equal(strlen(json_string_value(json_object_get(jwk, "x"))), 43);
        assert_null(json_object_get(jwk, "d")); /* never the secret part */
        kid = json_string_value(json_object_get(jwk, "kid"));
        assert_non_null(kid);
        assert_true(strlen(kid) > 0);
        jwks_json = json_dumps(hx_reply_params(root), JSON_COMPACT);
        assert_non_null(jwks_json);

        reply2 = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_GIT
                            "\",\"scopes\":[\"repo:read\",\"repo:write\"],\"ttl\":120,\"task\":\"TASK-42 fix build\"}}");
        assert_ok(reply2);
        token = strdup(hx_reply_str(reply2, "token"));
        assert_non_null(token);
        json_t *r3 = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_GIT
                                "\",\"scopes\":[\"repo:read\"]}}");
        assert_ok(r3);
        token2 = strdup(hx_reply_str(r3, "token"));
        json_decref(r3);

        bad_payload = tamper(token, 1);
        bad_sig = tamper(token, 2);
        bad_header = tamper(token, 0);
        char *toks[] = { token, bad_payload, bad_sig, bad_header, token2 };
        results = hx_py_jwt_verify(b, jwks_json, AUD_GIT, toks, 5);

        /* The genuine token verifies. */
        if (!json_is_true(json_object_get(json_array_get(results, 0), "valid")))
                fprintf(stderr, "verifier: %s\n", json_string_value(json_object_get(json_array_get(results, 0), "message")));
        assert_true(json_is_true(json_object_get(json_array_get(results, 0), "valid")));
        /* One changed character in the payload or the signature breaks it. */
        assert_string_equal(py_error(results, 1), "InvalidSignatureError");
        assert_string_equal(py_error(results, 2), "InvalidSignatureError");
        assert_string_not_equal(py_error(results, 3), "(valid)");
        assert_true(json_is_true(json_object_get(json_array_get(results, 4), "valid")));

        header = json_object_get(json_array_get(results, 0), "header");
        assert_string_equal(json_string_value(json_object_get(header, "alg")), "EdDSA");
        assert_string_equal(json_string_value(json_object_get(header, "typ")), "at+jwt");
        assert_string_equal(json_string_value(json_object_get(header, "kid")), kid);

        claims = json_object_get(json_array_get(results, 0), "claims");
        if (read_machine_id(mid, sizeof mid)) {
                char iss[128];
                snprintf(iss, sizeof iss, "urn:agent-broker:%s", mid);
                assert_string_equal(json_string_value(json_object_get(claims, "iss")), iss);
        } else {
                assert_non_null(json_string_value(json_object_get(claims, "iss")));
        }
        assert_string_equal(json_string_value(json_object_get(claims, "sub")), AGENT_ID);
        assert_string_equal(json_string_value(json_object_get(claims, "client_id")), AGENT_ID);
        assert_string_equal(json_string_value(json_object_get(claims, "aud")), AUD_GIT);
        assert_string_equal(json_string_value(json_object_get(claims, "scope")), "repo:read repo:write");
        assert_string_equal(json_string_value(json_object_get(claims, "owner")), OWNER);
        assert_string_equal(json_string_value(json_object_get(claims, "task")), "TASK-42 fix build");
        iat = json_integer_value(json_object_get(claims, "iat"));
        assert_true(iat >= now - 5 && iat <= now + 60);
        assert_int_equal(json_integer_value(json_object_get(claims, "nbf")), iat);
        assert_int_equal(json_integer_value(json_object_get(claims, "exp")), iat + 120);
        jti = json_string_value(json_object_get(claims, "jti"));
        assert_non_null(jti);
        assert_true(strlen(jti) >= 22);
        assert_string_equal(jti, hx_reply_str(reply2, "jti"));
        assert_int_equal(json_integer_value(json_object_get(hx_reply_params(reply2), "expires_at")), iat + 120);
        assert_int_equal(json_integer_value(json_object_get(hx_reply_params(reply2), "expires_in")), 120);
        /* Each token has its own jti; the second has no task and the default ttl. */
        json_t *claims2 = json_object_get(json_array_get(results, 4), "claims");
        assert_string_not_equal(json_string_value(json_object_get(claims2, "jti")), jti);
        assert_null(json_object_get(claims2, "task"));
        assert_int_equal(json_integer_value(json_object_get(claims2, "exp")) -
                                 json_integer_value(json_object_get(claims2, "iat")),
                         300);
        json_decref(results);

        /* The same genuine token is refused for another audience. */
        char *one[] = { token };
        results = hx_py_jwt_verify(b, jwks_json, AUD_TICKETS, one, 1);
        assert_string_equal(py_error(results, 0), "InvalidAudienceError");
        json_decref(results);

        /* Our own base64url decoding of the header agrees. */
        json_t *h2 = hx_jwt_segment_json(token, 0);
        assert_non_null(h2);
        assert_string_equal(json_string_value(json_object_get(h2, "kid")), kid);
        json_decref(h2);

        free(bad_payload);
        free(bad_sig);
        free(bad_header);
        free(token);
        free(token2);
        free(jwks_json);
        json_decref(reply2);
        json_decref(root);
}

/* ---- protocol robustness -------------------------------------------------- */

static void assert_getinfo_works(hx_conn *c)
{
        json_t *root = hx_call(c, "{\"method\":\"org.varlink.service.GetInfo\"}");
        assert_ok(root);
        assert_string_equal(hx_reply_str(root, "product"), "agent-brokerd");
        json_decref(root);
}

static void assert_token_works(hx_conn *c)
{
        expect_issue_ok(c, "{\"audience\":\"" AUD_GIT "\",\"scopes\":[\"repo:read\"]}", 300);
}

/* A message of exactly `size` bytes (without the NUL): a GetInfo call padded with spaces. */
static char *padded_getinfo(size_t size)
{
        static const char head[] = "{\"method\":\"org.varlink.service.GetInfo\"}";
        char *m = malloc(size + 1);
        assert_non_null(m);
        memset(m, ' ', size);
        memcpy(m, head, sizeof head - 1);
        m[size] = '\0';
        return m;
}

static void test_message_size_limit(void **state)
{
        hx_broker *b = *state;
        hx_conn *other, *c;
        json_t *root;
        char *m;
        int r;

        start_with(b, "\"uid\": 0");
        other = hx_connect(b, b->sock); /* connected before the abuse */
        assert_getinfo_works(other);

        /* The limit itself: 65536 bytes is served. */
        c = hx_connect(b, b->sock);
        m = padded_getinfo(AB_MAX_MESSAGE);
        assert_int_equal(strlen(m), 65536);
        root = hx_call(c, m);
        free(m);
        assert_ok(root);
        json_decref(root);
        assert_getinfo_works(c);
        hx_conn_close(b, c);

        /* 65536 + 1 bytes: MessageTooLarge, then the connection is closed. */
        c = hx_connect(b, b->sock);
        m = padded_getinfo(AB_MAX_MESSAGE + 1);
        r = hx_conn_send_msg(c, m);
        free(m);
        assert_true(r == 0 || r == -EPIPE || r == -ECONNRESET);
        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
        hx_assert_error(root, "io.agentbroker.MessageTooLarge");
        json_decref(root);
        assert_int_equal(hx_conn_wait_closed(c, HX_IO_TIMEOUT_MS), 0);
        hx_conn_close(b, c);

        /* A message with no NUL at all that keeps growing: the same, without waiting for the end. */
        c = hx_connect(b, b->sock);
        m = malloc(200000);
        assert_non_null(m);
        memset(m, 'x', 200000);
        r = hx_conn_send(c, m, 200000);
        free(m);
        assert_true(r == 0 || r == -EPIPE || r == -ECONNRESET);
        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
        hx_assert_error(root, "io.agentbroker.MessageTooLarge");
        json_decref(root);
        assert_int_equal(hx_conn_wait_closed(c, HX_IO_TIMEOUT_MS), 0);
        hx_conn_close(b, c);

        /* The other client is still served, and so is a new one. */
        assert_getinfo_works(other);
        assert_token_works(other);
        c = hx_connect(b, b->sock);
        assert_token_works(c);
}

/* Runs as nobody: one call of about 50 KB; prints the reply or the error's name. 0 unless the broker refused
 * it for the buffers or closed the connection. */
static int child_large_call(void *arg, char *out, size_t outmax)
{
        const char *sock = arg;
        ab_client *c = NULL;
        char *params = malloc(50100), *reply = NULL;
        int r;

        if (!params || ab_client_connect(sock, HX_IO_TIMEOUT_MS, &c) < 0)
                return 3;
        memcpy(params, "{\"token\":\"", 10);
        memset(params + 10, 'a', 50000);
        memcpy(params + 50010, "\"}", 3);
        r = ab_client_call(c, "io.agentbroker.Introspect", params, &reply);
        snprintf(out, outmax, "%d %s", r, r == 0 ? (reply ? reply : "") : ab_client_error_name(c));
        r = r == 0 || ((r == AB_ERR_DENIED || r == AB_ERR_REMOTE) &&
                       strcmp(ab_client_error_name(c), "io.agentbroker.LimitReached") != 0)
                ? 0 : 1;
        free(reply);
        free(params);
        ab_client_free(c);
        return r;
}

/*
 * Unfinished large messages: 1,000 connections of one uid each send 65,000
 * bytes of a message and stop. Input buffers are capped per uid (16 MiB):
 * past that, a connection is told LimitReached and closed; the broker's RSS
 * stays bounded (it grew by 64 MiB before the cap). Meanwhile a small call
 * of that uid and a 50 KB call of another uid are served.
 */
static void test_unfinished_input_capped(void **state)
{
        hx_broker *b = *state;
        enum { N = 1000 };
        static int fds[N];
        struct rlimit rl;
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        char *blob = malloc(65000), out[512];
        long rss0, rss1;
        unsigned refused = 0, open_left = 0;
        int ex = -1;
        hx_conn *c;

        assert_non_null(blob);
        memset(blob, ' ', 65000);
        blob[0] = '{';
        assert_int_equal(getrlimit(RLIMIT_NOFILE, &rl), 0);
        assert_true(rl.rlim_max >= N + 200);
        if (rl.rlim_cur < N + 200)
                rl.rlim_cur = N + 200; /* the soft limit only: the broker inherits the hard one and needs 2 fds a connection */
        assert_int_equal(setrlimit(RLIMIT_NOFILE, &rl), 0);
        start_with(b, "\"uid\": 0");
        rss0 = hx_proc_status_kb(b->pid, "VmRSS:");
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s", b->sock);
        for (int i = 0; i < N; i++) {
                fds[i] = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
                assert_true(fds[i] >= 0);
                assert_int_equal(connect(fds[i], (struct sockaddr *)&sa, sizeof sa), 0);
                (void)!send(fds[i], blob, 65000, MSG_NOSIGNAL);
        }
        hx_sleep_ms(1000);
        rss1 = hx_proc_status_kb(b->pid, "VmRSS:");
        /* a small call of this uid, and a large one of another, are served meanwhile */
        c = hx_connect(b, b->sock);
        assert_getinfo_works(c);
        hx_conn_close(b, c);
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_large_call, b->sock, HX_RUN_TIMEOUT_MS, out,
                                   sizeof out, &ex), 0);
        if (ex != 0)
                fprintf(stderr, "nobody's 50 KB call: %s (exit %d)\n", out, ex);
        assert_int_equal(ex, 0);
        for (int i = 0; i < N; i++) {
                char buf[512];
                ssize_t n = recv(fds[i], buf, sizeof buf - 1, MSG_DONTWAIT);
                if (n > 0) {
                        buf[n] = '\0';
                        if (strstr(buf, "\"io.agentbroker.LimitReached\""))
                                refused++;
                } else if (n < 0 && errno == EAGAIN) {
                        open_left++;
                }
                close(fds[i]);
        }
        fprintf(stderr, "unfinished input: %u of %d connections refused (LimitReached), %u left waiting; "
                        "broker VmRSS %ld -> %ld kB\n", refused, N, open_left, rss0, rss1);
        free(blob);
        assert_true(refused > 0);
        assert_true(open_left > 0);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
        (void)rss0; /* the broker's RSS counts the sanitizer's shadow and quarantine: refused > 0 is the check here */
#else
        assert_true(rss1 - rss0 < 32 * 1024);
#endif
        c = hx_connect(b, b->sock);
        assert_token_works(c);
}

static void expect_invalid_message(hx_broker *b, const char *bytes, size_t len)
{
        hx_conn *c = hx_connect(b, b->sock);
        json_t *root = NULL;
        int r = hx_conn_send(c, bytes, len);

        assert_int_equal(r, 0);
        r = hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root);
        if (r != 1)
                fprintf(stderr, "no reply to %.*s: %d\n", (int)len, bytes, r);
        assert_int_equal(r, 1);
        hx_assert_error(root, "io.agentbroker.InvalidMessage");
        json_decref(root);
        /* The daemon closes a connection that sent garbage. */
        assert_int_equal(hx_conn_wait_closed(c, HX_IO_TIMEOUT_MS), 0);
        hx_conn_close(b, c);
}

#define GARBAGE(s) expect_invalid_message(b, s, sizeof(s)) /* sizeof includes the NUL */

static void test_invalid_json(void **state)
{
        hx_broker *b = *state;
        hx_conn *other;

        start_with(b, "\"uid\": 0");
        other = hx_connect(b, b->sock);
        assert_getinfo_works(other);

        GARBAGE("{not json");
        GARBAGE("{\"method\":\"org.varlink.service.GetInfo\"");
        GARBAGE("{\"method\":\"org.varlink.service.GetInfo\"} trailing");
        GARBAGE("[\"org.varlink.service.GetInfo\"]");
        GARBAGE("\"just a string\"");
        GARBAGE("{\"method\":42}");
        GARBAGE("{\"parameters\":{}}");
        GARBAGE("{\"method\":\"org.varlink.service.GetInfo\",\"parameters\":[]}");
        GARBAGE("{\"method\":\"org.varlink.service.GetInfo\",\"oneway\":\"yes\"}");
        GARBAGE("{\"method\":\"org.varlink.service.GetInfo\",\"method\":\"io.agentbroker.GetKeys\"}");
        GARBAGE("\xff\xfe{}");
        /* A NUL inside a JSON string is refused at the message level (common/varlink.h). */
        GARBAGE("{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"a\\u0000b\","
                "\"scopes\":[\"repo:read\"]}}");
        /* A good call followed by garbage in the same write: the good one is answered first. */
        {
                static const char two[] = "{\"method\":\"org.varlink.service.GetInfo\"}\0{oops";
                hx_conn *c = hx_connect(b, b->sock);
                json_t *root;
                assert_int_equal(hx_conn_send(c, two, sizeof two), 0);
                assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
                assert_ok(root);
                json_decref(root);
                assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
                hx_assert_error(root, "io.agentbroker.InvalidMessage");
                json_decref(root);
                assert_int_equal(hx_conn_wait_closed(c, HX_IO_TIMEOUT_MS), 0);
                hx_conn_close(b, c);
        }

        assert_getinfo_works(other);
        assert_token_works(other);
}

static void test_unknown_methods(void **state)
{
        hx_broker *b = *state;
        hx_conn *c;
        json_t *root;

        start_with(b, "\"uid\": 0");
        c = hx_connect(b, b->sock);

        root = hx_call(c, "{\"method\":\"io.agentbroker.Nope\"}");
        hx_assert_error(root, "org.varlink.service.MethodNotFound");
        assert_string_equal(hx_reply_str(root, "method"), "io.agentbroker.Nope");
        json_decref(root);
        assert_getinfo_works(c); /* the connection stays usable */

        root = hx_call(c, "{\"method\":\"com.example.X\",\"parameters\":{}}");
        hx_assert_error(root, "org.varlink.service.InterfaceNotFound");
        assert_string_equal(hx_reply_str(root, "interface"), "com.example");
        json_decref(root);
        assert_getinfo_works(c);

        root = hx_call(c, "{\"method\":\"org.varlink.service.Nope\"}");
        hx_assert_error(root, "org.varlink.service.MethodNotFound");
        json_decref(root);

        /* Names that differ only in case are different names. */
        root = hx_call(c, "{\"method\":\"io.agentbroker.Issuetoken\",\"parameters\":{}}");
        hx_assert_error(root, "org.varlink.service.MethodNotFound");
        json_decref(root);

        assert_token_works(c);
}

static void expect_invalid_param(hx_conn *c, const char *params, const char *which)
{
        char msg[4096];
        json_t *root;

        snprintf(msg, sizeof msg, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":%s}", params);
        root = hx_call(c, msg);
        if (!hx_reply_error(root) || strcmp(hx_reply_error(root), "io.agentbroker.InvalidParameter") != 0 ||
            !hx_reply_str(root, "parameter") || strcmp(hx_reply_str(root, "parameter"), which) != 0)
                fprintf(stderr, "request %s (expected parameter %s)\n", params, which);
        hx_assert_error(root, "io.agentbroker.InvalidParameter");
        assert_non_null(hx_reply_str(root, "parameter"));
        assert_string_equal(hx_reply_str(root, "parameter"), which);
        json_decref(root);
}

static void test_invalid_parameters(void **state)
{
        hx_broker *b = *state;
        hx_conn *c;

        start_with(b, "\"uid\": 0");
        c = hx_connect(b, b->sock);

#define A "\"audience\":\"" AUD_GIT "\""
#define S "\"scopes\":[\"repo:read\"]"
        expect_invalid_param(c, "{" A ",\"scopes\":\"repo:read\"}", "scopes");
        expect_invalid_param(c, "{" A "," S ",\"ttl\":\"60\"}", "ttl");
        expect_invalid_param(c, "{" A "," S ",\"ttl\":0}", "ttl");
        expect_invalid_param(c, "{" A "," S ",\"ttl\":86401}", "ttl");
        expect_invalid_param(c, "{" A "," S ",\"ttl\":-1}", "ttl");
        expect_invalid_param(c, "{" A "," S ",\"ttl\":1.5}", "ttl");
        expect_invalid_param(c, "{" A "," S ",\"ttl\":true}", "ttl");
        expect_invalid_param(c, "{" A "," S ",\"ttl\":4294967297}", "ttl"); /* 2^32 + 1: must not wrap to 1 */
        expect_invalid_param(c, "{" A "," S ",\"ttl\":9223372036854775807}", "ttl");
        expect_invalid_param(c, "{" A "," S ",\"bogus\":1}", "bogus");
        {
                /* a long unknown name is cut for the reply at a character boundary, never inside one
                 * (cut inside, the reply lost its "parameter": not UTF-8) */
                char params[512], name[128] = "a", want[128] = "a";
                for (int i = 0; i < 40; i++)
                        strcat(name, "\xc3\xa9");
                for (int i = 0; i < 29; i++)
                        strcat(want, "\xc3\xa9");
                snprintf(params, sizeof params, "{" A "," S ",\"%s\":1}", name);
                expect_invalid_param(c, params, want);
        }
        expect_invalid_param(c, "{\"audience\":\"mcp://git\\u0001internal\"," S "}", "audience");
        expect_invalid_param(c, "{\"audience\":\"mcp://git\\ninternal\"," S "}", "audience");
        expect_invalid_param(c, "{\"audience\":\"\"," S "}", "audience");
        expect_invalid_param(c, "{\"audience\":42," S "}", "audience");
        expect_invalid_param(c, "{" S "}", "audience");
        expect_invalid_param(c, "{" A "}", "scopes");
        expect_invalid_param(c, "{" A ",\"scopes\":[]}", "scopes");
        expect_invalid_param(c, "{" A ",\"scopes\":[1]}", "scopes");
        expect_invalid_param(c, "{" A ",\"scopes\":[\"repo read\"]}", "scopes");
        expect_invalid_param(c, "{" A ",\"scopes\":[\"repo:*\"]}", "scopes");
        expect_invalid_param(c, "{" A "," S ",\"task\":\"a\\u0007b\"}", "task");
        expect_invalid_param(c, "{" A "," S ",\"task\":[\"x\"]}", "task");
        /* Limits: a 256-byte audience is a valid (ungranted) audience, 257 is not valid. */
        {
                char params[1024], aud[300];
                memset(aud, 'a', sizeof aud);
                aud[256] = '\0';
                snprintf(params, sizeof params, "{\"audience\":\"%s\"," S "}", aud);
                expect_issue_error(c, params, "io.agentbroker.AudienceNotGranted");
                aud[256] = 'a';
                aud[257] = '\0';
                snprintf(params, sizeof params, "{\"audience\":\"%s\"," S "}", aud);
                expect_invalid_param(c, params, "audience");
        }
#undef A
#undef S
        /* Parameter errors do not close the connection. */
        assert_token_works(c);
        assert_getinfo_works(c);
}

static void test_split_writes(void **state)
{
        hx_broker *b = *state;
        static const char msg[] = "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_GIT
                                  "\",\"scopes\":[\"repo:read\"],\"ttl\":42}}";
        hx_conn *c;
        json_t *root;

        start_with(b, "\"uid\": 0");
        c = hx_connect(b, b->sock);

        for (size_t i = 0; i < sizeof msg; i++) { /* including the NUL */
                struct timespec ts = { 0, 1000000 };
                assert_int_equal(hx_conn_send(c, msg + i, 1), 0);
                if (i < sizeof msg - 1) {
                        nanosleep(&ts, NULL);
                        if (i % 16 == 0) /* nothing is answered before the NUL */
                                assert_true(hx_conn_quiet(c, 0));
                }
        }
        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
        assert_ok(root);
        assert_true(looks_like_jws(hx_reply_str(root, "token")));
        assert_int_equal(json_integer_value(json_object_get(hx_reply_params(root), "expires_in")), 42);
        json_decref(root);
        assert_getinfo_works(c);
}

static void test_merged_messages(void **state)
{
        hx_broker *b = *state;
        static const char msgs[] = "{\"method\":\"org.varlink.service.GetInfo\"}\0"
                                   "{\"method\":\"io.agentbroker.Nope\"}\0"
                                   "{\"method\":\"io.agentbroker.GetKeys\"}\0"
                                   "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_GIT
                                   "\",\"scopes\":[\"repo:read\"],\"ttl\":7}}";
        hx_conn *c;
        json_t *root;

        start_with(b, "\"uid\": 0");
        c = hx_connect(b, b->sock);
        assert_int_equal(hx_conn_send(c, msgs, sizeof msgs), 0);

        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
        assert_ok(root);
        assert_true(json_is_array(json_object_get(hx_reply_params(root), "interfaces")));
        json_decref(root);
        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
        hx_assert_error(root, "org.varlink.service.MethodNotFound");
        json_decref(root);
        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
        assert_ok(root);
        assert_true(json_is_array(json_object_get(hx_reply_params(root), "keys")));
        json_decref(root);
        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
        assert_ok(root);
        assert_int_equal(json_integer_value(json_object_get(hx_reply_params(root), "expires_in")), 7);
        json_decref(root);
        assert_true(hx_conn_quiet(c, 200)); /* exactly four replies */

        /* Many messages at once (more than one loop turn handles) are all answered, in order. */
        {
                char *buf = malloc(100 * 128), *p;
                assert_non_null(buf);
                p = buf;
                for (int i = 0; i < 100; i++)
                        p += sprintf(p, "{\"method\":\"org.varlink.service.GetInterfaceDescription\","
                                        "\"parameters\":{\"interface\":\"%s\"}}",
                                     i % 2 ? "io.agentbroker" : "org.varlink.service") + 1;
                assert_int_equal(hx_conn_send(c, buf, (size_t)(p - buf)), 0);
                free(buf);
                for (int i = 0; i < 100; i++) {
                        const char *d;
                        assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
                        assert_ok(root);
                        d = hx_reply_str(root, "description");
                        assert_non_null(d);
                        assert_non_null(strstr(d, i % 2 ? "interface io.agentbroker" : "interface org.varlink.service"));
                        json_decref(root);
                }
                assert_true(hx_conn_quiet(c, 100));
        }
}

static void test_oneway(void **state)
{
        hx_broker *b = *state;
        static const char oneway[] = "{\"method\":\"org.varlink.service.GetInfo\",\"oneway\":true}";
        hx_conn *c;
        json_t *root;

        start_with(b, "\"uid\": 0");
        c = hx_connect(b, b->sock);

        assert_int_equal(hx_conn_send_msg(c, oneway), 0);
        assert_true(hx_conn_quiet(c, 300)); /* no reply */
        /* Even an error is not sent for a oneway call. */
        assert_int_equal(hx_conn_send_msg(c, "{\"method\":\"io.agentbroker.Nope\",\"oneway\":true}"), 0);
        assert_int_equal(hx_conn_send_msg(c, "{\"method\":\"io.agentbroker.IssueToken\",\"oneway\":true,"
                                             "\"parameters\":{\"audience\":\"x\",\"scopes\":[\"y\"]}}"),
                         0);
        /* The next normal call gets the first reply on the connection. */
        root = hx_call(c, "{\"method\":\"io.agentbroker.GetKeys\"}");
        assert_ok(root);
        assert_true(json_is_array(json_object_get(hx_reply_params(root), "keys")));
        json_decref(root);
        assert_true(hx_conn_quiet(c, 200));
        /* oneway: false is an ordinary call. */
        root = hx_call(c, "{\"method\":\"org.varlink.service.GetInfo\",\"oneway\":false}");
        assert_ok(root);
        json_decref(root);
}

static void test_service_interface(void **state)
{
        hx_broker *b = *state;
        hx_conn *c;
        json_t *root, *ifaces, *v;
        const char *d;
        size_t i;
        bool seen_ab = false, seen_vl = false;

        start_with(b, "\"uid\": 0");
        c = hx_connect(b, b->sock);

        root = hx_call(c, "{\"method\":\"org.varlink.service.GetInfo\",\"parameters\":{}}");
        assert_ok(root);
        assert_non_null(hx_reply_str(root, "vendor"));
        assert_string_equal(hx_reply_str(root, "product"), "agent-brokerd");
        assert_string_equal(hx_reply_str(root, "version"), AGENTBROKER_VERSION);
        assert_non_null(hx_reply_str(root, "url"));
        ifaces = json_object_get(hx_reply_params(root), "interfaces");
        assert_true(json_is_array(ifaces));
        json_array_foreach(ifaces, i, v) {
                if (json_is_string(v) && strcmp(json_string_value(v), "io.agentbroker") == 0)
                        seen_ab = true;
                if (json_is_string(v) && strcmp(json_string_value(v), "org.varlink.service") == 0)
                        seen_vl = true;
        }
        assert_true(seen_ab);
        assert_true(seen_vl);
        json_decref(root);

        root = hx_call(c, "{\"method\":\"org.varlink.service.GetInterfaceDescription\","
                          "\"parameters\":{\"interface\":\"io.agentbroker\"}}");
        assert_ok(root);
        d = hx_reply_str(root, "description");
        assert_non_null(d);
        assert_non_null(strstr(d, "interface io.agentbroker\n"));
        assert_non_null(strstr(d, "method IssueToken("));
        assert_non_null(strstr(d, "method GetKeys("));
        assert_non_null(strstr(d, "error NotAnAgent"));
        assert_non_null(strstr(d, "error InvalidParameter"));
        json_decref(root);

        root = hx_call(c, "{\"method\":\"org.varlink.service.GetInterfaceDescription\","
                          "\"parameters\":{\"interface\":\"org.varlink.service\"}}");
        assert_ok(root);
        assert_non_null(strstr(hx_reply_str(root, "description"), "interface org.varlink.service"));
        json_decref(root);

        root = hx_call(c, "{\"method\":\"org.varlink.service.GetInterfaceDescription\","
                          "\"parameters\":{\"interface\":\"com.example.nothing\"}}");
        hx_assert_error(root, "org.varlink.service.InterfaceNotFound");
        assert_string_equal(hx_reply_str(root, "interface"), "com.example.nothing");
        json_decref(root);

        /* GetInfo takes no parameters; bad parameters of this interface get its own error. */
        root = hx_call(c, "{\"method\":\"org.varlink.service.GetInfo\",\"parameters\":{\"x\":1}}");
        hx_assert_error(root, "org.varlink.service.InvalidParameter");
        assert_string_equal(hx_reply_str(root, "parameter"), "x");
        json_decref(root);
        {
                static const struct {
                        const char *params, *bad;
                } cases[] = {
                        { "{}", "interface" },
                        { "{\"interface\":1}", "interface" },
                        { "{\"interface\":null}", "interface" },
                        { "{\"interface\":\"io.agentbroker\",\"x\":true}", "x" },
                };
                for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
                        char text[256];
                        snprintf(text, sizeof text,
                                 "{\"method\":\"org.varlink.service.GetInterfaceDescription\",\"parameters\":%s}",
                                 cases[k].params);
                        root = hx_call(c, text);
                        hx_assert_error(root, "org.varlink.service.InvalidParameter");
                        assert_string_equal(hx_reply_str(root, "parameter"), cases[k].bad);
                        json_decref(root);
                }
        }
        /* every error the agent interface sends is declared in its description */
        root = hx_call(c, "{\"method\":\"org.varlink.service.GetInterfaceDescription\","
                          "\"parameters\":{\"interface\":\"io.agentbroker\"}}");
        d = hx_reply_str(root, "description");
        assert_non_null(d);
        {
                static const char *const errors[] = {
                        "NotAnAgent", "AudienceNotGranted", "ScopeNotGranted", "TtlTooLong", "ReauthRequired",
                        "SessionExpired", "SessionRevoked", "InvalidToken", "DelegationTooDeep", "InvalidParameter",
                        "InvalidMessage", "MessageTooLarge", "PeerGone", "RateLimited", "TooManyConnections",
                        "PermissionDenied", "InternalError", "AuditUnavailable", "LimitReached",
                };
                for (size_t k = 0; k < sizeof errors / sizeof errors[0]; k++) {
                        char decl[64];
                        snprintf(decl, sizeof decl, "\nerror %s (", errors[k]);
                        if (!strstr(d, decl))
                                fprintf(stderr, "not declared: %s\n", errors[k]);
                        assert_non_null(strstr(d, decl));
                }
        }
        json_decref(root);
        assert_getinfo_works(c);
}

/*
 * One broker per state dir and per socket: a second daemon on the same
 * state dir (other sockets) or on a live socket (other state dir) refuses
 * to start and says why; the first keeps serving with its socket in place.
 */
static void test_one_broker_per_state_dir(void **state)
{
        hx_broker *b = *state;
        char daemon[PATH_MAX], s2[PATH_MAX + 16], a2[PATH_MAX + 16], st2[PATH_MAX + 16];
        hx_run_result res;
        hx_conn *c;

        start_with(b, "\"uid\": 0");
        assert_int_equal(hx_build_path("agent-brokerd", daemon, sizeof daemon), 0);
        snprintf(s2, sizeof s2, "%s/agent2.sock", b->dir);
        snprintf(a2, sizeof a2, "%s/admin2.sock", b->dir);
        snprintf(st2, sizeof st2, "%s/state2", b->dir);
        {
                char *argv[] = { daemon, "--socket", s2, "--admin-socket", a2, "--state-dir", b->state,
                                 "--policy", b->policy, NULL };
                assert_int_equal(hx_run(argv, NULL, -1, 10000, &res), 0);
                assert_false(res.timed_out);
                assert_int_equal(res.exit_code, 1);
                assert_non_null(strstr(res.err, "is in use by another agent-brokerd"));
                hx_run_result_done(&res);
                assert_int_equal(access(s2, F_OK), -1); /* it bound nothing */
        }
        {
                char *argv[] = { daemon, "--socket", b->sock, "--admin-socket", a2, "--state-dir", st2,
                                 "--policy", b->policy, NULL };
                assert_int_equal(hx_run(argv, NULL, -1, 10000, &res), 0);
                assert_false(res.timed_out);
                assert_int_equal(res.exit_code, 1);
                assert_non_null(strstr(res.err, "Address already in use"));
                hx_run_result_done(&res);
        }
        c = hx_connect(b, b->sock); /* the first one's socket is still its own */
        assert_token_works(c);
        hx_stop_clean(b);
        /* once it is gone, its state dir and its (now stale) socket can be taken */
        hx_start(b);
        c = hx_connect(b, b->sock);
        assert_token_works(c);
}

/*
 * RotateKey: an overlap shorter than the longest token lifetime the policy
 * grants (600 s here, + 5 s leeway) is refused unless forced; with enough
 * overlap a token signed before the rotation stays active and its key stays
 * in GetKeys. A forced rotation with no overlap ends every earlier key, also
 * one still in the overlap of the rotation before, for good.
 */
static void test_rotate_key_overlap(void **state)
{
        hx_broker *b = *state;
        hx_conn *c, *adm;
        json_t *root, *tok_reply, *keys;
        char text[4096];
        const char *token;

        start_with(b, "\"uid\": 0");
        c = hx_connect(b, b->sock);
        adm = hx_connect(b, b->admin_sock);
        tok_reply = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":"
                               "{\"audience\":\"" AUD_GIT "\",\"scopes\":[\"repo:read\"],\"ttl\":600}}");
        assert_ok(tok_reply);
        token = hx_reply_str(tok_reply, "token");
        assert_non_null(token);

        root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.RotateKey\",\"parameters\":{\"overlap\":2}}");
        hx_assert_error(root, "io.agentbroker.InvalidParameter");
        assert_string_equal(hx_reply_str(root, "parameter"), "overlap");
        assert_non_null(strstr(hx_reply_str(root, "reason"), "605 s"));
        json_decref(root);

        root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.RotateKey\",\"parameters\":{\"overlap\":605}}");
        assert_ok(root);
        json_decref(root);
        root = hx_call(c, "{\"method\":\"io.agentbroker.GetKeys\"}");
        assert_ok(root);
        keys = json_object_get(hx_reply_params(root), "keys");
        assert_int_equal(json_array_size(keys), 2);
        json_decref(root);
        snprintf(text, sizeof text,
                 "{\"method\":\"io.agentbroker.Introspect\",\"parameters\":{\"token\":\"%s\"}}", token);
        root = hx_call(c, text);
        assert_ok(root);
        assert_true(json_is_true(json_object_get(hx_reply_params(root), "active")));
        json_decref(root);

        /* forced: the admin retires a (leaked) key sooner on purpose, and with it the key
         * still in its overlap from the rotation before, which signed the token */
        root = hx_call(adm, "{\"method\":\"io.agentbroker.admin.RotateKey\",\"parameters\":"
                            "{\"overlap\":0,\"force\":true}}");
        assert_ok(root);
        json_decref(root);
        for (int restarted = 0; restarted < 2; restarted++) {
                root = hx_call(c, "{\"method\":\"io.agentbroker.GetKeys\"}");
                assert_ok(root);
                assert_int_equal(json_array_size(json_object_get(hx_reply_params(root), "keys")), 1);
                json_decref(root);
                root = hx_call(c, text);
                assert_ok(root);
                assert_true(json_is_false(json_object_get(hx_reply_params(root), "active")));
                assert_string_equal(hx_reply_str(root, "reason"), "unknown_key");
                json_decref(root);
                assert_token_works(c);
                if (!restarted) {
                        hx_stop_clean(b);
                        hx_start(b);
                        c = hx_connect(b, b->sock);
                }
        }
        json_decref(tok_reply);
}

/* --audit-log in a directory that does not exist: created (0750), not "No such file". */
static void test_audit_dir_created(void **state)
{
        hx_broker *b = *state;
        char logdir[PATH_MAX + 16], logfile[PATH_MAX + 32];
        struct stat st;
        hx_conn *c;

        snprintf(logdir, sizeof logdir, "%s/logs", b->dir);
        snprintf(logfile, sizeof logfile, "%s/audit.jsonl", logdir);
        b->extra_args[b->n_extra_args++] = "--audit-log";
        b->extra_args[b->n_extra_args++] = logfile;
        start_with(b, "\"uid\": 0");
        assert_int_equal(stat(logdir, &st), 0);
        assert_true(S_ISDIR(st.st_mode));
        assert_int_equal(st.st_mode & 07777, 0750);
        c = hx_connect(b, b->sock);
        assert_token_works(c);
        hx_stop_clean(b);
        assert_int_equal(stat(logfile, &st), 0);
        assert_true(st.st_size > 0);
}

/* A client holding a half-sent message does not keep others waiting. */
static void test_stuck_client_does_not_block(void **state)
{
        hx_broker *b = *state;
        hx_conn *stuck, *c;
        long long t0;

        start_with(b, "\"uid\": 0");
        stuck = hx_connect(b, b->sock);
        assert_int_equal(hx_conn_send(stuck, "{\"method\":\"org.varlink.service.Get", 34), 0);
        /* And one that never reads its replies. */
        c = hx_connect(b, b->sock);
        for (int i = 0; i < 50; i++)
                assert_int_equal(hx_conn_send_msg(c, "{\"method\":\"io.agentbroker.GetKeys\"}"), 0);

        t0 = hx_now_ms();
        hx_conn *other = hx_connect(b, b->sock);
        assert_getinfo_works(other);
        assert_token_works(other);
        assert_true(hx_now_ms() - t0 < 3000);
        /* The stuck client's message completes later and is answered. */
        json_t *root = NULL;
        assert_int_equal(hx_conn_send(stuck, "Info\"}", 7), 0);
        assert_int_equal(hx_conn_recv_json(stuck, HX_IO_TIMEOUT_MS, &root), 1);
        assert_ok(root);
        json_decref(root);
}

/* ---- state, keys, admin socket, lifecycle --------------------------------- */

typedef struct path_arg {
        const char *path;
        int flags;
} path_arg;

/* In a child: try to open path; report errno. */
static int child_open(void *arg, char *out, size_t outmax)
{
        const path_arg *a = arg;
        int fd = open(a->path, a->flags | O_CLOEXEC);
        if (fd >= 0) {
                snprintf(out, outmax, "opened");
                close(fd);
                return 0;
        }
        snprintf(out, outmax, "%s", strerrorname_np(errno));
        return 1;
}

static void test_state_and_key_permissions(void **state)
{
        hx_broker *b = *state;
        char key[PATH_MAX], out[256];
        struct stat st;
        int ex = -1;

        /* A state dir that exists and is open to others is tightened. */
        assert_int_equal(mkdir(b->state, 0755), 0);
        assert_int_equal(chmod(b->state, 0755), 0);
        start_with(b, "\"uid\": 0");

        assert_int_equal(stat(b->state, &st), 0);
        assert_true(S_ISDIR(st.st_mode));
        assert_int_equal(st.st_uid, 0);
        assert_int_equal(st.st_mode & 0077, 0);

        snprintf(key, sizeof key, "%s/signing.key", b->state);
        assert_int_equal(lstat(key, &st), 0);
        assert_true(S_ISREG(st.st_mode));
        assert_int_equal(st.st_uid, 0);
        assert_int_equal(st.st_mode & 07777, 0600);
        assert_true(st.st_size > 0);

        /* nobody can neither list the state dir nor read the key. */
        path_arg dir_arg = { b->state, O_RDONLY | O_DIRECTORY };
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_open, &dir_arg, HX_RUN_TIMEOUT_MS, out,
                                   sizeof out, &ex), 0);
        assert_string_equal(out, "EACCES");
        path_arg key_arg = { key, O_RDONLY };
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_open, &key_arg, HX_RUN_TIMEOUT_MS, out,
                                   sizeof out, &ex), 0);
        assert_string_equal(out, "EACCES");

        /* No other file in the state dir is readable by others either. */
        DIR *d = opendir(b->state);
        struct dirent *de;
        assert_non_null(d);
        while ((de = readdir(d))) {
                char p[PATH_MAX];
                if (de->d_name[0] == '.')
                        continue;
                snprintf(p, sizeof p, "%s/%s", b->state, de->d_name);
                assert_int_equal(lstat(p, &st), 0);
                if (st.st_mode & 0007)
                        fprintf(stderr, "%s is mode %04o\n", p, (unsigned)(st.st_mode & 07777));
                assert_int_equal(st.st_mode & 0007, 0);
        }
        closedir(d);
}

static char *get_jwks(hx_broker *b)
{
        hx_conn *c = hx_connect(b, b->sock);
        json_t *root = hx_call(c, "{\"method\":\"io.agentbroker.GetKeys\"}");
        char *s;
        assert_ok(root);
        s = json_dumps(hx_reply_params(root), JSON_COMPACT | JSON_SORT_KEYS);
        json_decref(root);
        hx_conn_close(b, c);
        return s;
}

static char *kid_of(const char *jwks)
{
        json_t *j = json_loads(jwks, 0, NULL);
        char *kid = strdup(json_string_value(json_object_get(json_array_get(json_object_get(j, "keys"), 0), "kid")));
        json_decref(j);
        return kid;
}

static void test_key_reused_after_restart(void **state)
{
        hx_broker *b = *state;
        char keyp[PATH_MAX], *key1 = NULL, *key2 = NULL, *jwks1, *jwks2, *kid1, *kid2, *token = NULL;
        size_t n1 = 0, n2 = 0;
        json_t *results;

        start_with(b, "\"uid\": 0");
        jwks1 = get_jwks(b);
        kid1 = kid_of(jwks1);
        assert_int_equal(lib_issue(b->sock, AUD_GIT, "repo:read", 0, NULL, &token, NULL, 0), 0);
        snprintf(keyp, sizeof keyp, "%s/signing.key", b->state);
        assert_int_equal(hx_read_file(keyp, 4096, &key1, &n1), 0);
        hx_stop_clean(b);

        hx_start(b);
        jwks2 = get_jwks(b);
        kid2 = kid_of(jwks2);
        assert_string_equal(kid1, kid2);
        assert_string_equal(jwks1, jwks2);
        assert_int_equal(hx_read_file(keyp, 4096, &key2, &n2), 0);
        assert_int_equal(n1, n2);
        assert_memory_equal(key1, key2, n1);
        /* A token from the first run verifies with the second run's keys. */
        char *one[] = { token };
        results = hx_py_jwt_verify(b, jwks2, AUD_GIT, one, 1);
        assert_true(json_is_true(json_object_get(json_array_get(results, 0), "valid")));
        json_decref(results);

        /* A fresh state dir makes a different key. */
        hx_stop_clean(b);
        assert_int_equal(hx_rm_rf(b->state), 0);
        hx_start(b);
        char *jwks3 = get_jwks(b), *kid3 = kid_of(jwks3);
        assert_string_not_equal(kid3, kid1);

        free(jwks3);
        free(kid3);
        ab_token_free(token);
        free(key1);
        free(key2);
        free(jwks1);
        free(jwks2);
        free(kid1);
        free(kid2);
}

static int child_admin_call(void *arg, char *out, size_t outmax)
{
        hx_conn *c = NULL;
        json_t *root = NULL;
        int r = hx_conn_open(NULL, arg, &c);

        if (r < 0) {
                snprintf(out, outmax, "connect %s", strerrorname_np(-r));
                return 2;
        }
        /* The daemon may answer a refused peer and close before we write: read anyway. */
        r = hx_conn_send_msg(c, "{\"method\":\"org.varlink.service.GetInfo\"}");
        if (r < 0 && r != -EPIPE && r != -ECONNRESET) {
                snprintf(out, outmax, "send %d", r);
                hx_conn_close(NULL, c);
                return 3;
        }
        r = hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root);
        if (r != 1) {
                snprintf(out, outmax, "no reply %d", r);
                hx_conn_close(NULL, c);
                return 3;
        }
        snprintf(out, outmax, "%s", hx_reply_error(root) ? hx_reply_error(root) : "ok");
        json_decref(root);
        r = hx_conn_wait_closed(c, 500); /* a refused peer is closed at once */
        hx_conn_close(NULL, c);
        if (r != 0)
                snprintf(out + strlen(out), outmax - strlen(out), " (still open)");
        return 0;
}

static void test_admin_socket(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        struct stat st;
        char out[256];
        int ex = -1;
        hx_conn *c;
        json_t *root;

        start_with(b, "\"uid\": 0");

        assert_int_equal(stat(b->admin_sock, &st), 0);
        assert_true(S_ISSOCK(st.st_mode));
        assert_int_equal(st.st_uid, 0);
        assert_int_equal(st.st_mode & 0777, 0600);
        assert_int_equal(stat(b->sock, &st), 0);
        assert_true(S_ISSOCK(st.st_mode));
        assert_int_equal(st.st_mode & 0777, 0666);

        /* root is served on the admin socket; tokens are not issued there. */
        c = hx_connect(b, b->admin_sock);
        assert_getinfo_works(c);
        root = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_GIT
                          "\",\"scopes\":[\"repo:read\"]}}");
        /* Either answer is fine; a token is not. */
        assert_non_null(hx_reply_error(root));
        if (strcmp(hx_reply_error(root), "org.varlink.service.MethodNotFound") != 0)
                hx_assert_error(root, "io.agentbroker.PermissionDenied");
        assert_null(hx_reply_str(root, "token"));
        json_decref(root);
        hx_conn_close(b, c);

        /* nobody: the kernel refuses the 0600 socket... */
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_admin_call, b->admin_sock, HX_RUN_TIMEOUT_MS,
                                   out, sizeof out, &ex), 0);
        assert_string_equal(out, "connect EACCES");
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "call", "--admin", "org.varlink.service.GetInfo", NULL), 0);
        assert_int_not_equal(res.exit_code, 0);
        assert_string_equal(res.out, "");
        hx_run_result_done(&res);

        /* ...and the daemon refuses a non-root peer itself even when the mode would let it in. */
        assert_int_equal(chmod(b->admin_sock, 0666), 0);
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_admin_call, b->admin_sock, HX_RUN_TIMEOUT_MS,
                                   out, sizeof out, &ex), 0);
        assert_string_equal(out, "io.agentbroker.PermissionDenied");
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "call", "--admin", "org.varlink.service.GetInfo", NULL), 0);
        assert_int_not_equal(res.exit_code, 0);
        assert_string_equal(res.out, "");
        hx_run_result_done(&res);

        /* While nobody may still use the agent socket (and is told it is not an agent). */
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_admin_call, b->sock, HX_RUN_TIMEOUT_MS, out,
                                   sizeof out, &ex), 0);
        assert_string_equal(out, "ok (still open)");
}

/* In a child: connect with the library, let the daemon answer first, then call. */
static int child_lib_call(void *arg, char *out, size_t outmax)
{
        ab_client *c = NULL;
        char *reply = NULL;
        struct timespec ts = { 0, 300 * 1000000L };
        int r = ab_client_connect(arg, HX_IO_TIMEOUT_MS, &c);

        if (r < 0) {
                snprintf(out, outmax, "connect: %s", ab_strerror(r));
                return 2;
        }
        nanosleep(&ts, NULL); /* the refusal is written and the socket closed by now */
        r = ab_client_call(c, "org.varlink.service.GetInfo", NULL, &reply);
        if (r == 0)
                snprintf(out, outmax, "ok");
        else
                snprintf(out, outmax, "%s|%s", ab_client_error_name(c), ab_strerror(r));
        ab_token_free(reply);
        ab_client_free(c);
        return 0;
}

/*
 * A client the daemon refuses at accept time (non-root on the admin
 * socket) is sent the reason before the close; the client library must
 * deliver it rather than "connection closed".
 */
static void test_refused_client_learns_why(void **state)
{
        hx_broker *b = *state;
        char out[512];
        int ex = -1;

        start_with(b, "\"uid\": 0");
        assert_int_equal(chmod(b->admin_sock, 0666), 0);

        /* The bytes are there: a raw reader sees them. */
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_admin_call, b->admin_sock, HX_RUN_TIMEOUT_MS,
                                   out, sizeof out, &ex), 0);
        assert_string_equal(out, "io.agentbroker.PermissionDenied");
        /* The library. */
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_lib_call, b->admin_sock, HX_RUN_TIMEOUT_MS,
                                   out, sizeof out, &ex), 0);
        if (strncmp(out, "io.agentbroker.PermissionDenied|", 32) != 0)
                fprintf(stderr, "library reported \"%s\" (client/client.c call_json: a failed send must still "
                                "read the reply the daemon queued before closing)\n", out);
        assert_string_equal(out, "io.agentbroker.PermissionDenied|denied by the broker");
}

/*
 * A setuid-root program that nobody starts (as su) connects with euid 0: it
 * is attested as root, but its connection counts against nobody's cap, so a
 * user cannot fill root's connections (or spend root's rate budget) by
 * starting su and stopping it once connected (helper-35's finding).
 */
static void test_setuid_peer_charged_to_real_uid(void **state)
{
        hx_broker *b = *state;
        char helper[PATH_MAX], copy[PATH_MAX + 16], *data = NULL;
        char *argv[] = { copy, b->sock, (char *)AUD_GIT, (char *)"repo:read", NULL };
        hx_conn *cs[2];
        hx_run_result res;
        size_t len = 0;

        b->extra_args[b->n_extra_args++] = "--max-connections-per-uid";
        b->extra_args[b->n_extra_args++] = "2";
        start_with(b, "\"uid\": 0");
        for (int i = 0; i < 2; i++) {
                cs[i] = hx_connect(b, b->sock);
                assert_getinfo_works(cs[i]);
        }
        assert_int_equal(hx_build_path("tests/helper-issue", helper, sizeof helper), 0);
        assert_int_equal(hx_read_file(helper, 64 << 20, &data, &len), 0);
        snprintf(copy, sizeof copy, "%s/helper-suid", b->dir);
        {
                int fd = open(copy, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0700);
                assert_true(fd >= 0);
                assert_int_equal(write(fd, data, len), (ssize_t)len);
                assert_int_equal(fchmod(fd, 04755), 0);
                close(fd);
        }
        free(data);
        /* root itself is at its cap */
        assert_int_equal(hx_run(argv, NULL, 0, 10000, &res), 0);
        assert_non_null(strstr(res.out, "ERR io.agentbroker.TooManyConnections"));
        hx_run_result_done(&res);
        /* nobody running the setuid-root copy: root's agent, on nobody's count */
        assert_int_equal(hx_run(argv, NULL, HX_NOBODY_UID, 10000, &res), 0);
        if (strstr(res.out, "ERR io.agentbroker.NotAnAgent") || strstr(res.out, "ERR connect")) {
                hx_run_result_done(&res);
                skip(); /* the setuid bit did not take (a nosuid mount): nothing to show */
        }
        if (strncmp(res.out, "OK ", 3) != 0)
                fprintf(stderr, "setuid helper as nobody: %s%s\n", res.out, res.err);
        assert_int_equal(strncmp(res.out, "OK ", 3), 0);
        hx_run_result_done(&res);
        for (int i = 0; i < 2; i++)
                hx_conn_close(b, cs[i]);
}

/*
 * Other uids holding every connection leave root (its agents, the PAM module
 * in sshd) and the admin socket a reserve: before, uids 2001-2004 with 1,030
 * idle connections each locked out both (helper-50).
 */
static void test_connection_reserve_for_root(void **state)
{
        hx_broker *b = *state;
        int ready[2], hold[2], st = 0;
        hx_conn *c, *a;
        char byte;
        pid_t pid;

        b->extra_args[b->n_extra_args++] = "--max-connections";
        b->extra_args[b->n_extra_args++] = "2";
        start_with(b, "\"uid\": 0");
        assert_int_equal(pipe2(ready, O_CLOEXEC), 0);
        assert_int_equal(pipe2(hold, O_CLOEXEC), 0);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) { /* nobody takes every connection and holds them */
                hx_conn *mine[3] = { 0 };
                alarm(30);
                if (setgroups(0, NULL) < 0 || setgid(HX_NOBODY_GID) < 0 || setuid(HX_NOBODY_UID) < 0)
                        _exit(2);
                for (int i = 0; i < 3; i++)
                        (void)hx_conn_open(NULL, b->sock, &mine[i]); /* the third is refused */
                (void)!write(ready[1], "r", 1);
                (void)!read(hold[0], &byte, 1); /* until the parent closes its end */
                _exit(0);
        }
        close(ready[1]);
        close(hold[0]);
        assert_int_equal(read(ready[0], &byte, 1), 1);
        hx_sleep_ms(100); /* the broker accepted them */
        c = hx_connect(b, b->sock);
        assert_getinfo_works(c);
        a = hx_connect(b, b->admin_sock);
        assert_getinfo_works(a);
        hx_conn_close(b, c);
        hx_conn_close(b, a);
        close(hold[1]);
        close(ready[0]);
        assert_int_equal(waitpid(pid, &st, 0), pid);
}

/* Connection caps: per uid and in total; a refused connection is told why and closed. */
static void test_connection_caps(void **state)
{
        hx_broker *b = *state;
        hx_conn *cs[3], *extra;
        json_t *root;
        char out[256];
        int ex = -1;

        b->extra_args[b->n_extra_args++] = "--max-connections-per-uid";
        b->extra_args[b->n_extra_args++] = "3";
        b->extra_args[b->n_extra_args++] = "--max-connections";
        b->extra_args[b->n_extra_args++] = "4";
        start_with(b, "\"uid\": 0");

        for (int i = 0; i < 3; i++) {
                cs[i] = hx_connect(b, b->sock);
                assert_getinfo_works(cs[i]);
        }
        /* The fourth connection of root is refused, with a reason. */
        extra = hx_connect(b, b->sock);
        (void)hx_conn_send_msg(extra, "{\"method\":\"org.varlink.service.GetInfo\"}");
        assert_int_equal(hx_conn_recv_json(extra, HX_IO_TIMEOUT_MS, &root), 1);
        hx_assert_error(root, "io.agentbroker.TooManyConnections");
        json_decref(root);
        assert_int_equal(hx_conn_wait_closed(extra, HX_IO_TIMEOUT_MS), 0);
        hx_conn_close(b, extra);
        /* Another uid is not held to root's cap (4th connection in all). */
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_admin_call, b->sock, HX_RUN_TIMEOUT_MS, out,
                                   sizeof out, &ex), 0);
        assert_string_equal(out, "ok (still open)");
        /* The existing connections are still served. */
        for (int i = 0; i < 3; i++)
                assert_getinfo_works(cs[i]);
        /* Once one closes, root may connect again. */
        hx_conn_close(b, cs[0]);
        cs[0] = NULL;
        long long deadline = hx_now_ms() + HX_IO_TIMEOUT_MS;
        for (;;) {
                hx_conn *c = hx_connect(b, b->sock);
                (void)hx_conn_send_msg(c, "{\"method\":\"org.varlink.service.GetInfo\"}");
                assert_int_equal(hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root), 1);
                bool ok = hx_reply_error(root) == NULL;
                json_decref(root);
                hx_conn_close(b, c);
                if (ok)
                        break;
                assert_true(hx_now_ms() < deadline); /* the daemon notices the close promptly */
                nanosleep(&(struct timespec){ 0, 20000000L }, NULL);
        }
}

/* The broker's CPU time so far (user + system), in clock ticks. */
static long long cpu_ticks(pid_t pid)
{
        char path[64], buf[1024], *p;
        unsigned long long ut = 0, st = 0;
        int fd, n;

        snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        assert_true(fd >= 0);
        n = (int)read(fd, buf, sizeof buf - 1);
        close(fd);
        assert_true(n > 0);
        buf[n] = '\0';
        p = strrchr(buf, ')');
        assert_non_null(p);
        assert_int_equal(sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st), 2);
        return (long long)(ut + st);
}

/*
 * Out of file descriptors (a limit set on the running broker; each connection takes two: the
 * socket and the pidfd): accept() fails with EMFILE and the listening
 * socket stays readable. The broker must neither spin on it nor flood its
 * log, and must take connections again once descriptors are free.
 */
static void test_fd_exhaustion_pauses_accept(void **state)
{
        hx_broker *b = *state;
        struct rlimit low;
        hx_conn *cs[28];
        long long t0, used;
        char *log = NULL;
        size_t lines = 0;
        json_t *root;

        start_with(b, "\"uid\": 0");
        /* room for 5 more connections than it holds now (2 descriptors each), on the running broker */
        low.rlim_cur = low.rlim_max = (rlim_t)hx_proc_fd_count(b->pid) + 10;
        assert_int_equal(prlimit(b->pid, RLIMIT_NOFILE, &low, NULL), 0);
        for (size_t i = 0; i < (sizeof cs / sizeof cs[0]); i++)
                cs[i] = hx_connect(b, b->sock); /* connect() succeeds in the backlog, served or not */
        nanosleep(&(struct timespec){ 0, 300000000L }, NULL);
        t0 = cpu_ticks(b->pid);
        nanosleep(&(struct timespec){ 1, 0 }, NULL);
        used = cpu_ticks(b->pid) - t0;
        fprintf(stderr, "out of descriptors: the broker used %lld of %ld ticks in 1 s\n", used, sysconf(_SC_CLK_TCK));
        assert_true(used * 4 < sysconf(_SC_CLK_TCK)); /* under a quarter of a core: not spinning */
        assert_int_equal(hx_read_file(b->log, 1 << 22, &log, NULL), 0);
        for (char *p = log; (p = strstr(p, "accept: ")); p++)
                lines++;
        assert_true(lines >= 1 && lines <= 2);
        {
                /* the connections past the limit wait in the backlog; each try to take one when
                 * the last descriptor goes to the socket and none is left for its pidfd costs that
                 * one, and the tries back off: 50, 100, 200, 400, 800 ms */
                int closed = 0;
                char byte;
                for (size_t i = 0; i < (sizeof cs / sizeof cs[0]); i++)
                        closed += recv(cs[i]->fd, &byte, 1, MSG_DONTWAIT | MSG_PEEK) == 0;
                fprintf(stderr, "%d of %zu connections closed by the broker\n", closed, sizeof cs / sizeof cs[0]);
                assert_true(closed <= 6);
        }
        free(log);
        /* descriptors come back: connections are taken again */
        for (size_t i = 0; i < (sizeof cs / sizeof cs[0]); i++)
                hx_conn_close(b, cs[i]);
        long long deadline = hx_now_ms() + HX_IO_TIMEOUT_MS;
        for (;;) {
                hx_conn *c = hx_connect(b, b->sock);
                (void)hx_conn_send_msg(c, "{\"method\":\"org.varlink.service.GetInfo\"}");
                int r = hx_conn_recv_json(c, 1000, &root);
                bool ok = r == 1 && hx_reply_error(root) == NULL;
                if (r == 1)
                        json_decref(root);
                hx_conn_close(b, c);
                if (ok)
                        break;
                assert_true(hx_now_ms() < deadline);
                nanosleep(&(struct timespec){ 0, 50000000L }, NULL);
        }
}

static const char *issue_on(hx_conn *c, json_t **keep)
{
        json_t *root = hx_call(c, "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"" AUD_GIT
                                  "\",\"scopes\":[\"repo:read\"]}}");
        *keep = root;
        return hx_reply_error(root) ? hx_reply_error(root) : "ok";
}

/*
 * The library against servers that are not the broker: one whose listen
 * queue is full (connect's EAGAIN means nothing is connected: it waits
 * for room until its timeout, and gets in once there is room), and one
 * that answers a call twice (the second reply is no later call's answer).
 */
static void test_library_odd_servers(void **state)
{
        hx_broker *b = *state;
        char path[PATH_MAX];
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int lfd, filler[4], n_fill = 0;
        ab_client *c = NULL;
        char *reply = NULL;
        long long t0;
        pid_t pid;

        snprintf(path, sizeof path, "%s/odd.sock", b->dir);
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
        lfd = hx_listen_unix(path, 0);
        /* fill the queue */
        for (int i = 0; i < 4; i++) {
                int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
                assert_true(fd >= 0);
                if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
                        assert_int_equal(errno, EAGAIN);
                        close(fd);
                        break;
                }
                filler[n_fill++] = fd;
        }
        assert_true(n_fill >= 1);
        t0 = hx_now_ms();
        assert_int_equal(ab_client_connect(path, 300, &c), AB_ERR_UNREACHABLE);
        assert_true(hx_now_ms() - t0 >= 250);
        {
                /* the CLI too: unreachable (exit 3) within its --timeout, not hung */
                char ctl[PATH_MAX];
                char *argv[] = { ctl, (char *)"--socket", path, (char *)"--timeout", (char *)"300", (char *)"whoami",
                                 NULL };
                hx_run_result res;
                assert_int_equal(hx_build_path("agent-brokerctl", ctl, sizeof ctl), 0);
                assert_int_equal(hx_run(argv, NULL, -1, 10000, &res), 0);
                assert_int_equal(res.exit_code, 3);
                hx_run_result_done(&res);
        }
        /* room comes while it waits: it connects */
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                usleep(100 * 1000);
                for (int i = 0; i < 20; i++) {
                        int fd = accept(lfd, NULL, NULL);
                        (void)fd;
                }
                _exit(0);
        }
        assert_int_equal(ab_client_connect(path, 3000, &c), 0);
        ab_client_free(c);
        c = NULL;
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        for (int i = 0; i < n_fill; i++)
                close(filler[i]);
        close(lfd);

        /* two replies to one call */
        lfd = hx_listen_unix(path, 8);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                static const char two[] = "{\"parameters\":{}}\0{\"parameters\":{\"stale\":true}}";
                char buf[4096];
                int fd = accept(lfd, NULL, NULL);
                ssize_t k;
                do
                        k = read(fd, buf, sizeof buf);
                while (k > 0 && !memchr(buf, '\0', (size_t)k));
                if (write(fd, two, sizeof two) != (ssize_t)sizeof two)
                        _exit(1);
                pause();
                _exit(0);
        }
        assert_int_equal(ab_client_connect(path, 3000, &c), 0);
        assert_int_equal(ab_client_call(c, "io.agentbroker.WhoAmI", NULL, &reply), AB_ERR_PROTOCOL);
        assert_int_equal(ab_client_call(c, "io.agentbroker.WhoAmI", NULL, &reply), AB_ERR_CLOSED); /* unusable now */
        ab_client_free(c);
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        close(lfd);

        /* a second reply that comes after the first, between calls: not the next call's answer
         * (before, the next call returned it as its own reply) */
        lfd = hx_listen_unix(path, 8);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                static const char one[] = "{\"parameters\":{}}", late[] = "{\"parameters\":{\"stale\":true}}";
                char buf[4096];
                int fd = accept(lfd, NULL, NULL);
                ssize_t k;
                alarm(30);
                do
                        k = read(fd, buf, sizeof buf);
                while (k > 0 && !memchr(buf, '\0', (size_t)k));
                if (write(fd, one, sizeof one) != (ssize_t)sizeof one)
                        _exit(1);
                usleep(100 * 1000);
                if (write(fd, late, sizeof late) != (ssize_t)sizeof late)
                        _exit(1);
                for (;;) { /* answer every later call, so that only the check can refuse */
                        k = read(fd, buf, sizeof buf);
                        if (k <= 0)
                                _exit(0);
                        if (memchr(buf, '\0', (size_t)k) && write(fd, one, sizeof one) != (ssize_t)sizeof one)
                                _exit(1);
                }
        }
        assert_int_equal(ab_client_connect(path, 3000, &c), 0);
        assert_int_equal(ab_client_call(c, "io.agentbroker.WhoAmI", NULL, &reply), 0);
        free(reply);
        reply = NULL;
        usleep(300 * 1000);
        assert_int_equal(ab_client_call(c, "io.agentbroker.WhoAmI", NULL, &reply), AB_ERR_PROTOCOL);
        assert_null(reply);
        ab_client_free(c);
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        close(lfd);
}

/* --rate-limit 1/2: a burst of two, then RateLimited for that uid only. */
static void test_rate_limit_per_uid(void **state)
{
        hx_broker *b = *state;
        hx_conn *c, *c2;
        json_t *r1, *r2, *r3, *r4;
        char out[4096];
        int ex = -1;

        b->extra_args[b->n_extra_args++] = "--rate-limit";
        b->extra_args[b->n_extra_args++] = "1/2";
        start_with(b, "\"uid\": 0");
        c = hx_connect(b, b->sock);
        c2 = hx_connect(b, b->sock); /* the same uid on another connection shares the bucket */

        assert_string_equal(issue_on(c, &r1), "ok");
        assert_string_equal(issue_on(c2, &r2), "ok");
        assert_string_equal(issue_on(c, &r3), "io.agentbroker.RateLimited");
        assert_string_equal(issue_on(c2, &r4), "io.agentbroker.RateLimited");
        hx_assert_error(r3, "io.agentbroker.RateLimited");
        json_decref(r1);
        json_decref(r2);
        json_decref(r3);
        json_decref(r4);
        {
                /* to the library, a limit is not a denial: worth a retry (AB_ERR_REMOTE), and a
                 * later call's own failure does not keep reporting it */
                ab_client *lc = NULL;
                const char *scope = "repo:read";
                char *tok = NULL, *reply = NULL;
                assert_int_equal(ab_client_connect(b->sock, 5000, &lc), 0);
                assert_int_equal(ab_issue_token(lc, AUD_GIT, &scope, 1, 0, NULL, &tok), AB_ERR_REMOTE);
                assert_string_equal(ab_client_error_name(lc), "io.agentbroker.RateLimited");
                assert_int_equal(ab_client_call(lc, "io.agentbroker.WhoAmI", "not json", &reply), AB_ERR_INVALID);
                assert_string_equal(ab_client_error_name(lc), "");
                assert_string_equal(ab_client_error_message(lc), "");
                ab_client_free(lc);
        }
        /* Another uid has its own bucket: nobody is told it is not an agent, not to slow down. */
        issue_as_nobody(b, out, sizeof out, &ex);
        assert_string_equal(out, "ERR io.agentbroker.NotAnAgent");
        /* Reads that issue nothing are not limited. */
        assert_getinfo_works(c);
}

/*
 * The rate limit keys on the uid, so a client cannot reset it by using a
 * fresh connection for each request (as the CLI and the PAM module do).
 */
static void test_rate_limit_survives_reconnect(void **state)
{
        hx_broker *b = *state;
        int ok = 0, limited = 0;

        b->extra_args[b->n_extra_args++] = "--rate-limit";
        b->extra_args[b->n_extra_args++] = "1/2";
        start_with(b, "\"uid\": 0");

        for (int i = 0; i < 5; i++) {
                hx_conn *c = hx_connect(b, b->sock);
                json_t *root;
                const char *e = issue_on(c, &root);
                if (strcmp(e, "ok") == 0)
                        ok++;
                else if (strcmp(e, "io.agentbroker.RateLimited") == 0)
                        limited++;
                json_decref(root);
                hx_conn_close(b, c);
                /* Let the daemon see the close before the next connection. */
                nanosleep(&(struct timespec){ 0, 30000000L }, NULL);
        }
        if (limited == 0)
                fprintf(stderr, "5 requests in ~0.2 s on fresh connections were all granted with --rate-limit 1/2 "
                                "(broker/manager.c uid_put frees the uid's bucket with its last connection)\n");
        assert_true(ok <= 3);
        assert_true(limited >= 2);
}

static void test_sigterm_clean_exit(void **state)
{
        hx_broker *b = *state;
        char msg[4096];
        struct stat st;
        hx_conn *c;

        b->use_notify = true;
        start_with(b, "\"uid\": 0");
        assert_int_equal(hx_wait_notify(b, "READY=1", HX_IO_TIMEOUT_MS, msg, sizeof msg), 0);
        assert_non_null(strstr(msg, "STATUS="));

        /* An open idle connection and a half-sent message do not hold up shutdown. */
        c = hx_connect(b, b->sock);
        assert_getinfo_works(c);
        assert_int_equal(hx_conn_send(hx_connect(b, b->sock), "{\"meth", 6), 0);

        hx_stop_clean(b);
        assert_int_equal(hx_wait_notify(b, "STOPPING=1", HX_IO_TIMEOUT_MS, NULL, 0), 0);
        /* Closed connections; the sockets it bound are gone. */
        assert_int_equal(hx_conn_wait_closed(c, HX_IO_TIMEOUT_MS), 0);
        assert_int_equal(lstat(b->sock, &st), -1);
        assert_int_equal(errno, ENOENT);
        assert_int_equal(lstat(b->admin_sock, &st), -1);
        assert_int_equal(errno, ENOENT);

        /* A second start and SIGTERM also exit 0 (state already exists). */
        hx_start(b);
        hx_stop_clean(b);
}

static void test_cli_status_keys_and_errors(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        json_t *j;
        char *jwks;

        start_with(b, "\"uid\": 0");

        assert_int_equal(hx_ctl(b, -1, &res, "status", NULL), 0);
        assert_int_equal(res.exit_code, 0);
        assert_non_null(strstr(res.out, "agent-brokerd"));
        hx_run_result_done(&res);

        /* nobody may ask for status and keys: they are public. */
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "keys", NULL), 0);
        assert_int_equal(res.exit_code, 0);
        j = json_loads(res.out, 0, NULL);
        assert_non_null(j);
        jwks = get_jwks(b);
        char *k1 = kid_of(jwks);
        assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(j, "keys"), 0), "kid")),
                            k1);
        free(k1);
        free(jwks);
        json_decref(j);
        hx_run_result_done(&res);

        /* --json prints the whole reply. */
        assert_int_equal(hx_ctl(b, -1, &res, "token", "--audience", AUD_GIT, "--scope", "repo:read", "--task", "t-1",
                                "--json", NULL), 0);
        assert_int_equal(res.exit_code, 0);
        j = json_loads(res.out, 0, NULL);
        assert_non_null(j);
        assert_string_equal(json_string_value(json_object_get(j, "agent")), AGENT_ID);
        assert_true(looks_like_jws(json_string_value(json_object_get(j, "token"))));
        json_t *claims = hx_jwt_segment_json(json_string_value(json_object_get(j, "token")), 1);
        assert_non_null(claims);
        assert_string_equal(json_string_value(json_object_get(claims, "task")), "t-1");
        json_decref(claims);
        json_decref(j);
        hx_run_result_done(&res);

        /* Usage errors exit 2, an unreachable broker 3. */
        assert_int_equal(hx_ctl(b, -1, &res, "token", "--audience", AUD_GIT, NULL), 0);
        assert_int_equal(res.exit_code, 2);
        hx_run_result_done(&res);
        char nowhere[PATH_MAX + 32], ctl[PATH_MAX];
        snprintf(nowhere, sizeof nowhere, "%s/nothing.sock", b->dir);
        assert_int_equal(hx_build_path("agent-brokerctl", ctl, sizeof ctl), 0);
        char *argv[] = { ctl, (char *)"--socket", nowhere, (char *)"status", NULL };
        assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, &res), 0);
        assert_int_equal(res.exit_code, 3);
        assert_true(strlen(res.err) > 0);
        hx_run_result_done(&res);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_granted_uid_gets_token, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_other_uid_denied, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_uid_selector_is_exact, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_sha256_selector, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_scope_audience_ttl_denials, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_token_verifies_independently, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_message_size_limit, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_unfinished_input_capped, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_invalid_json, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_unknown_methods, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_invalid_parameters, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_split_writes, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_merged_messages, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_oneway, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_service_interface, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_one_broker_per_state_dir, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_audit_dir_created, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_rotate_key_overlap, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_stuck_client_does_not_block, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_state_and_key_permissions, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_key_reused_after_restart, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_admin_socket, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_refused_client_learns_why, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_connection_caps, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_connection_reserve_for_root, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_fd_exhaustion_pauses_accept, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_rate_limit_per_uid, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_rate_limit_survives_reconnect, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_sigterm_clean_exit, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_cli_status_keys_and_errors, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_library_odd_servers, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_setuid_peer_charged_to_real_uid, hx_setup, hx_teardown),
        };
        if (getenv("HX_FILTER")) /* e.g. HX_FILTER='test_sha256*' */
                cmocka_set_test_filter(getenv("HX_FILTER"));
        return cmocka_run_group_tests_name("integration: core", tests, NULL, NULL);
}
