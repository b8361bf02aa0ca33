/* SPDX-License-Identifier: MIT */
/*
 * Integration tests for issue 3: policy compiled into LMDB, signed
 * control-plane bundles, live reload, against the real agent-brokerd.
 *
 * Each test runs the broker as a host would: --policy on a directory
 * (DIR/policy.d), broker.conf with require_signed = true and trusted_keys
 * = DIR/keys, and a control-plane key made by `agent-brokerctl keygen`.
 * Bundles are written and signed (`agent-brokerctl policy sign`) in
 * DIR/stage and moved into policy.d, signature first, as config
 * management would; the broker sees them through its inotify watch.
 *
 * Who is who: this test process (uid 0) is "pol-agent", whose grant on
 * mcp://git.internal changes between bundles; uid 65534 is "nobody-agent".
 * Every wait is bounded (WAIT_MS).
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
#include <sys/stat.h>
#include <sys/xattr.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include <lmdb.h>
#include <sodium.h>
#include "harness.h"
#include "../../broker/store.h"

#define AUD "mcp://git.internal"
#define AGENT "pol-agent"
#define OWNER "policy-owner@example.com"
#define NOBODY_AGENT "nobody-agent"
#define NOBODY_OWNER "nobody-owner@example.com"
#define WAIT_MS 15000

#define M_ISSUE "io.agentbroker.IssueToken"
#define M_INTRO "io.agentbroker.Introspect"
#define M_WHOAMI "io.agentbroker.WhoAmI"
#define M_RELOAD "io.agentbroker.admin.ReloadPolicy"
#define M_SHOW "io.agentbroker.admin.ShowPolicy"
#define E_REJECTED "io.agentbroker.admin.PolicyRejected"
#define E_SCOPE "io.agentbroker.ScopeNotGranted"
#define E_PERM "io.agentbroker.PermissionDenied"

/* ---- fixture ---------------------------------------------------------------- */

typedef struct fx {
        hx_broker b;
        char pol[PATH_MAX], keys[PATH_MAX], stage[PATH_MAX], key[PATH_MAX], conf[PATH_MAX], audit[PATH_MAX];
} fx;

static void run_ok(hx_run_result *res, const char *what)
{
        if (res->exit_code != 0)
                fprintf(stderr, "%s: exit %d\nstdout: %s\nstderr: %s\n", what, res->exit_code, res->out ? res->out : "",
                        res->err ? res->err : "");
        assert_int_equal(res->exit_code, 0);
}

/* agent-brokerctl keygen --out path (path, path.pub). */
static void keygen(fx *f, const char *path)
{
        hx_run_result res;
        assert_int_equal(hx_ctl(&f->b, -1, &res, "keygen", "--out", path, NULL), 0);
        run_ok(&res, "keygen");
        hx_run_result_done(&res);
}

/* Trust the public key of a key made by keygen: copy path.pub into DIR/keys/name.pub. */
static void trust(fx *f, const char *key, const char *name)
{
        char pub[PATH_MAX + 8], dst[PATH_MAX * 2], *text = NULL;
        snprintf(pub, sizeof pub, "%s.pub", key);
        snprintf(dst, sizeof dst, "%s/%s.pub", f->keys, name);
        assert_int_equal(hx_read_file(pub, 4096, &text, NULL), 0);
        assert_int_equal(hx_write_file(dst, text, 0644), 0);
        free(text);
}

static int setup(void **state)
{
        fx *f = calloc(1, sizeof *f);
        char text[PATH_MAX + 64];
        const char *d;

        if (!f)
                return -1;
        *state = f;
        if (hx_broker_init(&f->b) < 0)
                return -1;
        d = f->b.dir;
        snprintf(f->pol, sizeof f->pol, "%s/policy.d", d);
        snprintf(f->keys, sizeof f->keys, "%s/keys", d);
        snprintf(f->stage, sizeof f->stage, "%s/stage", d);
        snprintf(f->key, sizeof f->key, "%s/stage/cp.key", d);
        snprintf(f->conf, sizeof f->conf, "%s/broker.conf", d);
        snprintf(f->audit, sizeof f->audit, "%s/audit.jsonl", f->b.state);
        if (mkdir(f->pol, 0755) < 0 || mkdir(f->keys, 0755) < 0 || mkdir(f->stage, 0700) < 0)
                return -1;
        snprintf(f->b.policy, sizeof f->b.policy, "%s", f->pol);
        snprintf(text, sizeof text, "# test broker.conf\nrequire_signed = true\ntrusted_keys = %s\n", f->keys);
        if (hx_write_file(f->conf, text, 0644) < 0)
                return -1;
        hx_add_arg(&f->b, "--config");
        hx_add_arg(&f->b, f->conf);
        keygen(f, f->key);
        trust(f, f->key, "control-plane");
        return 0;
}

static int teardown(void **state)
{
        fx *f = *state;
        int r = 0;

        if (f) {
                r = hx_broker_finish(&f->b);
                free(f);
        }
        return r;
}

/* ---- bundles ---------------------------------------------------------------- */

/*
 * A bundle: pol-agent (uid 0) gets scopes (a JSON list body) on AUD;
 * nobody-agent (uid 65534) gets repo:read. extra: more text inside the
 * document (e.g. a description), or "".
 */
static char *bundle(int version, const char *scopes, const char *extra)
{
        char *s = NULL;
        assert_true(asprintf(&s,
                             "{\"version\": %d,%s\n"
                             " \"agents\": [\n"
                             "  {\"id\": \"" AGENT "\", \"owner\": \"" OWNER "\",\n"
                             "   \"match\": {\"uid\": 0},\n"
                             "   \"grants\": [{\"audience\": \"" AUD "\", \"scopes\": [%s], \"max_ttl\": 600}]},\n"
                             "  {\"id\": \"" NOBODY_AGENT "\", \"owner\": \"" NOBODY_OWNER "\",\n"
                             "   \"match\": {\"uid\": 65534},\n"
                             "   \"grants\": [{\"audience\": \"" AUD "\", \"scopes\": [\"repo:read\"]}]}]}\n",
                             version, extra, scopes) > 0);
        return s;
}

static void path_in(char *out, size_t max, const char *dir, const char *name, const char *suffix)
{
        int n = snprintf(out, max, "%s/%s%s", dir, name, suffix);
        assert_true(n > 0 && (size_t)n < max);
}

/* agent-brokerctl policy sign --key key path */
static void sign(fx *f, const char *key, const char *path)
{
        hx_run_result res;
        assert_int_equal(hx_ctl(&f->b, -1, &res, "policy", "sign", "--key", key, path, NULL), 0);
        run_ok(&res, "policy sign");
        hx_run_result_done(&res);
}

/*
 * Put text into policy.d/name as a control plane would: write and sign it
 * in the stage directory (key NULL: unsigned), then rename the signature
 * and the document into place. An unsigned deploy removes an old .sig.
 */
static void deploy(fx *f, const char *name, const char *text, const char *key)
{
        char src[PATH_MAX * 2], dst[PATH_MAX * 2], ssig[PATH_MAX * 2], dsig[PATH_MAX * 2];

        path_in(src, sizeof src, f->stage, name, "");
        path_in(dst, sizeof dst, f->pol, name, "");
        path_in(ssig, sizeof ssig, f->stage, name, ".sig");
        path_in(dsig, sizeof dsig, f->pol, name, ".sig");
        assert_int_equal(hx_write_file(src, text, 0644), 0);
        if (key) {
                sign(f, key, src);
                assert_int_equal(rename(ssig, dsig), 0);
        } else if (unlink(dsig) < 0) {
                assert_int_equal(errno, ENOENT);
        }
        assert_int_equal(rename(src, dst), 0);
}

static void deploy_bundle(fx *f, const char *name, int version, const char *scopes, const char *key)
{
        char *text = bundle(version, scopes, "");
        deploy(f, name, text, key);
        free(text);
}

/* Remove policy.d/name and its signature. */
static void undeploy(fx *f, const char *name)
{
        char path[PATH_MAX * 2];
        path_in(path, sizeof path, f->pol, name, "");
        assert_int_equal(unlink(path), 0);
        path_in(path, sizeof path, f->pol, name, ".sig");
        assert_int_equal(unlink(path), 0);
}

static void kill9(fx *f)
{
        int st = 0;
        assert_true(f->b.pid > 0);
        assert_int_equal(kill(f->b.pid, SIGKILL), 0);
        assert_int_equal(waitpid(f->b.pid, &st, 0), f->b.pid);
        assert_true(WIFSIGNALED(st));
        f->b.pid = 0;
        for (size_t i = 0; i < HX_MAX_CONNS; i++)
                if (f->b.conns[i])
                        hx_conn_close(&f->b, f->b.conns[i]);
}

/* ---- calls ------------------------------------------------------------------ */

static json_t *call_on(fx *f, const char *sock, const char *method, json_t *params)
{
        hx_conn *c = hx_connect(&f->b, sock);
        json_t *root = hx_rpc(c, method, params);

        hx_conn_close(&f->b, c);
        return root;
}

static void dump(const char *what, const json_t *root)
{
        char *s = json_dumps(root, JSON_COMPACT);
        fprintf(stderr, "%s: %s\n", what, s ? s : "?");
        free(s);
}

/*
 * Ask for a token with one scope. 1 and the token in *ret_token (if
 * given) when granted, 0 when the scope is refused (ScopeNotGranted);
 * anything else fails the test.
 */
static int try_scope(fx *f, const char *scope, char **ret_token)
{
        json_t *root = call_on(f, f->b.sock, M_ISSUE, json_pack("{s:s, s:[s]}", "audience", AUD, "scopes", scope));
        const char *e = hx_reply_error(root);
        int r;

        if (!e) {
                const char *t = hx_reply_str(root, "token");
                assert_non_null(t);
                if (ret_token)
                        *ret_token = strdup(t);
                r = 1;
        } else if (strcmp(e, E_SCOPE) == 0) {
                r = 0;
        } else {
                dump("IssueToken", root);
                fail_msg("unexpected error %s", e);
                r = -1;
        }
        json_decref(root);
        return r;
}

/* The policy in force gives pol-agent exactly: read? write? */
static void assert_grants(fx *f, bool read, bool write)
{
        int r = try_scope(f, "repo:read", NULL), w = try_scope(f, "repo:write", NULL);
        if (r != read || w != write) {
                hx_broker_dump_log(&f->b);
                fail_msg("repo:read %s, repo:write %s; expected %s, %s", r ? "granted" : "denied",
                         w ? "granted" : "denied", read ? "granted" : "denied", write ? "granted" : "denied");
        }
}

/* Poll (bounded) until the policy in force gives pol-agent read/write as asked. */
static bool wait_grants(fx *f, bool read, bool write)
{
        long long deadline = hx_now_ms() + WAIT_MS;
        do {
                if (try_scope(f, "repo:read", NULL) == read && try_scope(f, "repo:write", NULL) == write)
                        return true;
                hx_sleep_ms(50);
        } while (hx_now_ms() < deadline);
        return false;
}

static bool introspect_active(fx *f, const char *token)
{
        json_t *root = call_on(f, f->b.sock, M_INTRO, json_pack("{s:s, s:s}", "token", token, "audience", AUD));
        json_t *a = json_object_get(hx_reply_params(root), "active");
        bool active;
        if (hx_reply_error(root) || !json_is_boolean(a))
                dump("Introspect", root);
        assert_null(hx_reply_error(root));
        active = json_is_true(a);
        if (!active)
                dump("Introspect", root);
        json_decref(root);
        return active;
}

/* ReloadPolicy on the admin socket must be refused with a reason containing want. */
static void reload_refused(fx *f, const char *want)
{
        json_t *root = call_on(f, f->b.admin_sock, M_RELOAD, NULL);
        const char *e = hx_reply_error(root), *reason = hx_reply_str(root, "reason");
        if (!e || strcmp(e, E_REJECTED) != 0 || !reason || !strstr(reason, want)) {
                dump("ReloadPolicy", root);
                fail_msg("expected %s with \"%s\"", E_REJECTED, want);
        }
        json_decref(root);
}

static void reload_ok(fx *f)
{
        json_t *root = call_on(f, f->b.admin_sock, M_RELOAD, NULL);
        if (hx_reply_error(root))
                dump("ReloadPolicy", root);
        assert_null(hx_reply_error(root));
        json_decref(root);
}

/* ---- the audit trail and the log ------------------------------------------- */

/* Audit records of event whose text also has needle (NULL: any). */
static int count_audit(fx *f, const char *event, const char *needle)
{
        char *text = NULL, *line, *save = NULL, ev[96];
        int n = 0;

        if (hx_read_file(f->audit, 64 << 20, &text, NULL) < 0)
                return 0;
        snprintf(ev, sizeof ev, "\"event\":\"%s\"", event);
        for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
                if (strstr(line, ev) && (!needle || strstr(line, needle)))
                        n++;
        free(text);
        return n;
}

/* Wait (bounded) until more than n such records exist. */
static bool wait_audit_above(fx *f, const char *event, const char *needle, int n)
{
        long long deadline = hx_now_ms() + WAIT_MS;
        do {
                if (count_audit(f, event, needle) > n)
                        return true;
                hx_sleep_ms(50);
        } while (hx_now_ms() < deadline);
        return false;
}

static bool log_has(fx *f, const char *needle)
{
        char *text = NULL;
        bool found;
        if (hx_read_file(f->b.log, 16 << 20, &text, NULL) < 0)
                return false;
        found = strstr(text, needle) != NULL;
        free(text);
        return found;
}

static int count_log(fx *f, const char *needle)
{
        char *text = NULL;
        int n = 0;
        if (hx_read_file(f->b.log, 16 << 20, &text, NULL) < 0)
                return 0;
        for (const char *p = text; (p = strstr(p, needle)); p++)
                n++;
        free(text);
        return n;
}

/* The key id ShowPolicy gives a signer: the first 16 hex digits of SHA-256 of its public key. */
static void key_id(const char *key, char out[17])
{
        char pub[PATH_MAX + 8], *text = NULL;
        unsigned char pk[crypto_sign_PUBLICKEYBYTES], h[crypto_hash_sha256_BYTES];
        size_t n = 0;

        snprintf(pub, sizeof pub, "%s.pub", key);
        assert_int_equal(hx_read_file(pub, 4096, &text, NULL), 0);
        assert_int_equal(sodium_base642bin(pk, sizeof pk, text, strlen(text), "\n", &n, NULL,
                                           sodium_base64_VARIANT_ORIGINAL),
                         0);
        free(text);
        assert_int_equal(n, sizeof pk);
        crypto_hash_sha256(h, pk, sizeof pk);
        sodium_bin2hex(out, 17, h, 8);
}

/* Wait (bounded) until the log holds needle more than n times. */
static bool wait_log_above(fx *f, const char *needle, int n)
{
        long long deadline = hx_now_ms() + WAIT_MS;
        do {
                if (count_log(f, needle) > n)
                        return true;
                hx_sleep_ms(50);
        } while (hx_now_ms() < deadline);
        return false;
}

/* ---- tests ------------------------------------------------------------------ */

/*
 * Bundle A in force, a token issued; bundle B written into the directory
 * (no SIGHUP, no restart): repo:write becomes granted, repo:read denied,
 * in the same broker process; the token from A stays active.
 */
static void test_inotify_swaps_grants(void **state)
{
        fx *f = *state;
        char *token = NULL, kid[17];
        pid_t pid;
        json_t *root, *src;

        deploy_bundle(f, "20-agents.json", 1, "\"repo:read\"", f->key);
        hx_start(&f->b);
        pid = f->b.pid;
        assert_grants(f, true, false);
        assert_int_equal(try_scope(f, "repo:read", &token), 1);
        assert_true(introspect_active(f, token));

        deploy_bundle(f, "20-agents.json", 2, "\"repo:write\"", f->key);
        if (!wait_grants(f, false, true)) {
                hx_broker_dump_log(&f->b);
                fail_msg("bundle B not in force within %d ms of being written", WAIT_MS);
        }
        assert_int_equal(f->b.pid, pid);
        assert_int_equal(kill(pid, 0), 0);
        /* a token issued under A stays valid although B no longer grants its scope */
        assert_true(introspect_active(f, token));
        /* the reload is recorded as seen by inotify, and ShowPolicy names version and signer */
        assert_true(wait_audit_above(f, "policy.loaded", "\"via\":\"inotify\"", 0));
        root = call_on(f, f->b.admin_sock, M_SHOW, NULL);
        assert_null(hx_reply_error(root));
        src = json_array_get(json_object_get(hx_reply_params(root), "sources"), 0);
        assert_int_equal(json_array_size(json_object_get(hx_reply_params(root), "sources")), 1);
        assert_string_equal(json_string_value(json_object_get(src, "name")), "20-agents.json");
        assert_int_equal(json_integer_value(json_object_get(src, "version")), 2);
        key_id(f->key, kid);
        assert_non_null(json_string_value(json_object_get(src, "signed_by")));
        assert_string_equal(json_string_value(json_object_get(src, "signed_by")), kid);
        json_decref(root);
        free(token);
}

/*
 * What decides grants must be root's (or the broker user's) alone: a
 * source that is a symlink to a file nobody owns and anyone may write, a
 * policy directory anyone may write, and a trusted key (a symlink to a
 * world-writable key nobody made) are refused, and the policy in force
 * stays. Before, each was honoured.
 */
static void test_foreign_files_refused(void **state)
{
        fx *f = *state;
        char foreign[PATH_MAX * 2], link[PATH_MAX * 2], nkey[PATH_MAX * 2], npub[PATH_MAX * 2], *text, *pub = NULL;

        deploy_bundle(f, "20-agents.json", 1, "\"repo:read\"", f->key);
        hx_start(&f->b);
        assert_grants(f, true, false);

        /* a source owned by nobody, mode 0666, linked into policy.d (signed all the same) */
        path_in(foreign, sizeof foreign, f->b.dir, "foreign.json", "");
        text = bundle(2, "\"repo:write\"", "");
        assert_int_equal(hx_write_file(foreign, text, 0644), 0);
        free(text);
        sign(f, f->key, foreign);
        assert_int_equal(chmod(foreign, 0666), 0);
        assert_int_equal(chown(foreign, HX_NOBODY_UID, HX_NOBODY_UID), 0);
        path_in(link, sizeof link, f->pol, "20-agents.json", "");
        assert_int_equal(unlink(link), 0);
        assert_int_equal(symlink(foreign, link), 0);
        path_in(link, sizeof link, f->pol, "20-agents.json", ".sig");
        path_in(npub, sizeof npub, f->b.dir, "foreign.json", ".sig");
        assert_int_equal(rename(npub, link), 0);
        reload_refused(f, "owned by another user or writable by others");
        assert_grants(f, true, false);
        /* owned by root, 0644, but an ACL lets nobody write (the mode's group bits show the mask) */
        assert_int_equal(chown(foreign, 0, 0), 0);
        assert_int_equal(chmod(foreign, 0644), 0);
        {
                /* version 2; user_obj rw, user nobody rw, group_obj r, mask rw, other r */
                static const uint8_t acl[] = { 2, 0, 0, 0,                                  /* */
                                               1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff,          /* */
                                               2, 0, 6, 0, 0xfe, 0xff, 0, 0,                /* 65534 */
                                               4, 0, 4, 0, 0xff, 0xff, 0xff, 0xff,          /* */
                                               0x10, 0, 6, 0, 0xff, 0xff, 0xff, 0xff,       /* */
                                               0x20, 0, 4, 0, 0xff, 0xff, 0xff, 0xff };
                assert_int_equal(setxattr(foreign, "system.posix_acl_access", acl, sizeof acl, 0), 0);
                reload_refused(f, "owned by another user or writable by others");
                assert_grants(f, true, false);
                assert_int_equal(removexattr(foreign, "system.posix_acl_access"), 0);
                assert_int_equal(chmod(foreign, 0644), 0);
        }
        /* the same file owned by root, 0644, no ACL: accepted */
        reload_ok(f);
        assert_grants(f, false, true);

        /* the policy directory writable by anyone */
        assert_int_equal(chmod(f->pol, 0777), 0);
        reload_refused(f, "the directory is owned by another user or writable by others");
        assert_int_equal(chmod(f->pol, 0755), 0);

        /* a trusted key that nobody owns and anyone may write, and a bundle signed with it */
        path_in(nkey, sizeof nkey, f->stage, "nobody.key", "");
        keygen(f, nkey);
        path_in(npub, sizeof npub, f->b.dir, "nobody.pub", "");
        snprintf(link, sizeof link, "%s.pub", nkey);
        assert_int_equal(hx_read_file(link, 4096, &pub, NULL), 0);
        assert_int_equal(hx_write_file(npub, pub, 0644), 0);
        free(pub);
        assert_int_equal(chmod(npub, 0666), 0);
        assert_int_equal(chown(npub, HX_NOBODY_UID, HX_NOBODY_UID), 0);
        path_in(link, sizeof link, f->keys, "nobody.pub", "");
        assert_int_equal(symlink(npub, link), 0);
        deploy_bundle(f, "30-more.json", 3, "\"repo:read\"", nkey);
        reload_refused(f, "signature does not verify with any trusted key");
        /* (the trusted set changed and no longer verifies what is there: no agent is served, as
         * test_removed_key_evicts_policy shows); without that source, the rest loads again */
        undeploy(f, "30-more.json");
        reload_ok(f);
        assert_grants(f, false, true);
}

/*
 * An old signed bundle copied in under another name, the newer one
 * removed: its content was replaced by a newer version under its own name
 * before, so it is refused (the version floor is per name and a signature
 * covers the content only: before, it was taken and its grants came back).
 * The content in force, renamed, is still fine.
 */
static void test_renamed_old_bundle_refused(void **state)
{
        fx *f = *state;

        deploy_bundle(f, "20-agents.json", 1, "\"repo:write\"", f->key);
        hx_start(&f->b);
        assert_grants(f, false, true);
        deploy_bundle(f, "20-agents.json", 2, "\"repo:read\"", f->key);
        json_decref(call_on(f, f->b.admin_sock, M_RELOAD, NULL));
        assert_grants(f, true, false);

        /* swapped while the broker is down (else the watch might compile the empty directory between) */
        hx_stop_clean(&f->b);
        undeploy(f, "20-agents.json");
        deploy_bundle(f, "30-old.json", 1, "\"repo:write\"", f->key); /* version 1's very bytes */
        hx_start(&f->b);
        assert_grants(f, true, false); /* refused at start: the compiled policy stays */
        reload_refused(f, "was once replaced by a newer version under its own name");
        assert_grants(f, true, false);

        /* version 2 under a new name is what was in force: accepted */
        undeploy(f, "30-old.json");
        deploy_bundle(f, "40-agents.json", 2, "\"repo:read\"", f->key);
        reload_ok(f);
        assert_grants(f, true, false);
}

/*
 * Under require_signed, with B (version 2) in force: an unsigned bundle, one
 * signed by an untrusted key, one whose signature is over other bytes, a
 * rollback (version 1, validly signed) and version 2 with other content are
 * each refused, by the inotify reload (audited, logged) and by
 * ReloadPolicy (PolicyRejected with the reason); B stays in force, and a
 * token from before stays active. A good version 3 then loads.
 */
static void test_refused_bundles_keep_policy(void **state)
{
        fx *f = *state;
        char other[PATH_MAX], *token = NULL, *c_text = bundle(3, "\"repo:read\", \"repo:write\"", ""),
                             *a_text = bundle(1, "\"repo:read\", \"repo:write\"", ""),
                             *b2_text = bundle(2, "\"repo:read\", \"repo:write\"", ""),
                             sig[PATH_MAX * 2], bsig[PATH_MAX * 2], dst[PATH_MAX * 2], *b_sig_text = NULL;
        struct {
                const char *what, *reason;
        } cases[] = {
                { "unsigned", "unsigned, and require_signed is set" },
                { "untrusted key", "signature does not verify with any trusted key" },
                { "signature over other bytes", "signature does not verify with any trusted key" },
                { "garbage signature", "signature does not verify with any trusted key" },
                { "rollback", "version 1 would replace version 2" },
                { "same version, other content", "rollback refused" },
        };

        snprintf(other, sizeof other, "%s/other.key", f->stage);
        keygen(f, other);
        deploy_bundle(f, "20-agents.json", 2, "\"repo:write\"", f->key);
        hx_start(&f->b);
        assert_grants(f, false, true);
        assert_int_equal(try_scope(f, "repo:write", &token), 1);
        path_in(bsig, sizeof bsig, f->pol, "20-agents.json", ".sig");
        assert_int_equal(hx_read_file(bsig, 4096, &b_sig_text, NULL), 0);

        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
                int rejected = count_audit(f, "policy.rejected", "\"via\":\"inotify\"");
                int logged = count_log(f, cases[i].reason);

                switch (i) {
                case 0: deploy(f, "20-agents.json", c_text, NULL); break;
                case 1: deploy(f, "20-agents.json", c_text, other); break;
                case 2: /* B's valid signature beside C's bytes (C is in place since case 1) */
                        path_in(sig, sizeof sig, f->stage, "20-agents.json", ".sig");
                        path_in(dst, sizeof dst, f->pol, "20-agents.json", ".sig");
                        assert_int_equal(hx_write_file(sig, b_sig_text, 0644), 0);
                        assert_int_equal(rename(sig, dst), 0);
                        break;
                case 3:
                        path_in(dst, sizeof dst, f->pol, "20-agents.json", ".sig");
                        assert_int_equal(hx_write_file(dst, "bm90IGEgc2lnbmF0dXJl\n", 0644), 0);
                        break;
                case 4: deploy(f, "20-agents.json", a_text, f->key); break;
                case 5: deploy(f, "20-agents.json", b2_text, f->key); break;
                }
                /* the watch saw it and refused it: logged with the reason, and audited */
                if (!wait_log_above(f, cases[i].reason, logged)) {
                        hx_broker_dump_log(&f->b);
                        fail_msg("%s: the log does not give the reason \"%s\"", cases[i].what, cases[i].reason);
                }
                if (!wait_audit_above(f, "policy.rejected", "\"via\":\"inotify\"", rejected)) {
                        hx_broker_dump_log(&f->b);
                        fail_msg("%s: no policy.rejected record from the inotify reload", cases[i].what);
                }
                /* an explicit reload says why */
                reload_refused(f, cases[i].reason);
                /* B is still in force, the old token still active */
                assert_grants(f, false, true);
                assert_true(introspect_active(f, token));
        }
        assert_true(log_has(f, "the previous policy stays in force"));

        /* a good bundle after all that */
        deploy_bundle(f, "20-agents.json", 3, "\"repo:read\"", f->key);
        if (!wait_grants(f, true, false))
                fail_msg("version 3 not in force after the refused bundles");
        free(token);
        free(b_sig_text);
        free(a_text);
        free(b2_text);
        free(c_text);
}

/*
 * SIGHUP and `agent-brokerctl policy reload` recompile. A bundle signed by
 * a key not yet trusted is refused by the watch; trusting the key (the
 * keys directory is not watched) changes nothing until SIGHUP, or until
 * `policy reload`, which then puts it in force.
 */
static void test_sighup_and_cli_reload(void **state)
{
        fx *f = *state;
        char k2[PATH_MAX], k3[PATH_MAX];
        hx_run_result res;
        int n;

        snprintf(k2, sizeof k2, "%s/k2.key", f->stage);
        snprintf(k3, sizeof k3, "%s/k3.key", f->stage);
        keygen(f, k2);
        keygen(f, k3);
        deploy_bundle(f, "20-agents.json", 2, "\"repo:write\"", f->key);
        hx_start(&f->b);
        assert_grants(f, false, true);

        /* signed by k2, not trusted yet: the watch refuses it */
        n = count_audit(f, "policy.rejected", "\"via\":\"inotify\"");
        deploy_bundle(f, "20-agents.json", 3, "\"repo:read\", \"repo:write\"", k2);
        assert_true(wait_audit_above(f, "policy.rejected", "\"via\":\"inotify\"", n));
        trust(f, k2, "k2");
        hx_sleep_ms(500); /* longer than the debounce: nothing watches the keys */
        assert_grants(f, false, true);
        n = count_audit(f, "policy.loaded", "\"via\":\"sighup\"");
        assert_int_equal(kill(f->b.pid, SIGHUP), 0);
        if (!wait_grants(f, true, true)) {
                hx_broker_dump_log(&f->b);
                fail_msg("SIGHUP did not put the bundle signed by the newly trusted key in force");
        }
        assert_true(wait_audit_above(f, "policy.loaded", "\"via\":\"sighup\"", n));

        /* the same with the CLI: refused first (exit 1, the reason on stderr), then loaded */
        n = count_audit(f, "policy.rejected", "\"via\":\"inotify\"");
        deploy_bundle(f, "20-agents.json", 4, "\"repo:read\"", k3);
        assert_true(wait_audit_above(f, "policy.rejected", "\"via\":\"inotify\"", n));
        assert_int_equal(hx_ctl(&f->b, -1, &res, "policy", "reload", NULL), 0);
        if (res.exit_code != 1 || !strstr(res.err, "signature does not verify"))
                fprintf(stderr, "policy reload: exit %d, stderr %s\n", res.exit_code, res.err);
        assert_int_equal(res.exit_code, 1);
        assert_non_null(strstr(res.err, "signature does not verify"));
        hx_run_result_done(&res);
        assert_grants(f, true, true);
        trust(f, k3, "k3");
        assert_int_equal(hx_ctl(&f->b, -1, &res, "policy", "reload", NULL), 0);
        run_ok(&res, "policy reload");
        assert_non_null(strstr(res.out, "policy compiled"));
        hx_run_result_done(&res);
        assert_grants(f, true, false); /* at once: the reply comes after the switch */
        assert_true(count_audit(f, "policy.loaded", "\"via\":\"admin\"") >= 1);
}

/*
 * kill -9, then the sources vanish: the broker answers from the policy
 * compiled into LMDB without reading them (emptied directory, removed
 * directory, a broken source); with unchanged sources it does not
 * recompile at all. An explicit reload of an empty directory applies the
 * empty set (docs/policy.md).
 */
static void test_restart_answers_from_store(void **state)
{
        fx *f = *state;
        int startups;

        deploy_bundle(f, "20-agents.json", 2, "\"repo:write\"", f->key);
        hx_start(&f->b);
        assert_grants(f, false, true);
        assert_true(wait_audit_above(f, "policy.loaded", "\"via\":\"startup\"", 0));
        startups = count_audit(f, "policy.loaded", "\"via\":\"startup\"");

        /* unchanged sources: loaded from the store, not recompiled */
        kill9(f);
        hx_start(&f->b);
        assert_grants(f, false, true);
        assert_true(log_has(f, "policy from the store"));
        assert_int_equal(count_audit(f, "policy.loaded", "\"via\":\"startup\""), startups);

        /* emptied directory */
        kill9(f);
        undeploy(f, "20-agents.json");
        hx_start(&f->b);
        assert_grants(f, false, true);
        assert_true(log_has(f, "no policy sources in"));

        /* no directory at all */
        kill9(f);
        assert_int_equal(rmdir(f->pol), 0);
        hx_start(&f->b);
        assert_grants(f, false, true);
        assert_true(log_has(f, "unreadable; keeping the compiled policy"));

        /* a broken source at start: refused, the compiled policy stays */
        kill9(f);
        assert_int_equal(mkdir(f->pol, 0755), 0);
        deploy(f, "20-agents.json", "{\"version\": 9, \"agents\": [", f->key);
        hx_start(&f->b);
        assert_grants(f, false, true);
        assert_true(count_audit(f, "policy.rejected", "\"via\":\"startup\"") >= 1);

        /* an explicit reload of an empty directory applies the empty set */
        undeploy(f, "20-agents.json");
        reload_ok(f);
        {
                json_t *root = call_on(f, f->b.sock, M_ISSUE,
                                       json_pack("{s:s, s:[s]}", "audience", AUD, "scopes", "repo:write"));
                assert_non_null(hx_reply_error(root));
                assert_string_equal(hx_reply_error(root), "io.agentbroker.NotAnAgent");
                json_decref(root);
        }
}

/* Write meta "schema" = value into the store in dir with liblmdb, as a newer broker would have. */
static void set_schema(const char *dir, const char *value)
{
        MDB_env *env = NULL;
        MDB_txn *txn = NULL;
        MDB_dbi dbi;
        MDB_val k = { 6, (void *)"schema" }, v = { strlen(value), (void *)value };

        assert_int_equal(mdb_env_create(&env), 0);
        assert_int_equal(mdb_env_set_maxdbs(env, 16), 0);
        assert_int_equal(mdb_env_set_mapsize(env, AB_STORE_DEFAULT_MAPSIZE), 0);
        assert_int_equal(mdb_env_open(env, dir, 0, 0600), 0);
        assert_int_equal(mdb_txn_begin(env, NULL, 0, &txn), 0);
        assert_int_equal(mdb_dbi_open(txn, "meta", 0, &dbi), 0);
        assert_int_equal(mdb_put(txn, dbi, &k, &v, 0), 0);
        assert_int_equal(mdb_txn_commit(txn), 0);
        mdb_env_close(env);
}

/* A store written by a newer broker (schema above ours): refuse to start, say why; ours again: start. */
static void test_newer_schema_refused(void **state)
{
        fx *f = *state;
        char newer[16], ours[16];
        int st = -1, r;

        snprintf(newer, sizeof newer, "%d", AB_SCHEMA_VERSION + 1);
        snprintf(ours, sizeof ours, "%d", AB_SCHEMA_VERSION);
        deploy_bundle(f, "20-agents.json", 2, "\"repo:write\"", f->key);
        hx_start(&f->b);
        assert_int_equal(hx_broker_stop(&f->b, &st), 0);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);

        set_schema(f->b.state, newer);
        r = hx_broker_start(&f->b);
        assert_int_equal(r, -ECHILD);
        assert_true(WIFEXITED(f->b.last_status));
        assert_int_not_equal(WEXITSTATUS(f->b.last_status), 0);
        if (!log_has(f, "newer than this broker")) {
                hx_broker_dump_log(&f->b);
                fail_msg("no clear message about the newer schema");
        }
        assert_true(log_has(f, "refusing to start"));

        set_schema(f->b.state, ours);
        hx_start(&f->b);
        assert_grants(f, false, true);
}

typedef struct child_call {
        const char *sock, *method, *params;
} child_call;

/* In a child (another uid): one call, out gets the error name or "ok:" and the reply. */
static int child_call_fn(void *arg, char *out, size_t outmax)
{
        child_call *a = arg;
        hx_conn *c = NULL;
        json_t *root = NULL;
        char msg[512];
        char *dumped;
        int r;

        snprintf(msg, sizeof msg, "{\"method\":\"%s\",\"parameters\":%s}", a->method, a->params ? a->params : "{}");
        r = hx_conn_open(NULL, a->sock, &c);
        if (r < 0) {
                snprintf(out, outmax, "connect %s", strerror(-r));
                return 0;
        }
        /* A refused peer may be told so and closed before it speaks: send, then read whatever came. */
        (void)hx_conn_send_msg(c, msg);
        r = hx_conn_recv_json(c, HX_IO_TIMEOUT_MS, &root);
        hx_conn_close(NULL, c);
        if (r != 1) {
                snprintf(out, outmax, "no reply (%d)", r);
                return 0;
        }
        dumped = json_dumps(root, JSON_COMPACT);
        snprintf(out, outmax, "%s %s", hx_reply_error(root) ? hx_reply_error(root) : "ok", dumped ? dumped : "");
        free(dumped);
        json_decref(root);
        return 0;
}

static void call_as_nobody(fx *f, const char *sock, const char *method, const char *params, char *out, size_t outmax)
{
        child_call a = { sock, method, params };
        int ex = -1;
        assert_int_equal(hx_run_as(HX_NOBODY_UID, HX_NOBODY_GID, child_call_fn, &a, HX_RUN_TIMEOUT_MS, out, outmax,
                                   &ex),
                         0);
        assert_int_equal(ex, 0);
}

/*
 * ReloadPolicy and ShowPolicy are refused to a non-root uid by the broker
 * itself (even with the admin socket opened to everyone), the CLI's policy
 * show/reload fail for it, and nothing is reloaded or shown.
 */
static void test_admin_policy_refused_to_nobody(void **state)
{
        fx *f = *state;
        char out[8192];
        hx_run_result res;
        int loaded;

        deploy_bundle(f, "20-agents.json", 2, "\"repo:write\"", f->key);
        hx_start(&f->b);
        /* new bytes in the directory that only a reload would pick up: the keys dir is not watched */
        loaded = count_audit(f, "policy.loaded", NULL);

        assert_int_equal(chmod(f->b.admin_sock, 0666), 0);
        call_as_nobody(f, f->b.admin_sock, M_RELOAD, NULL, out, sizeof out);
        if (strncmp(out, E_PERM " ", strlen(E_PERM) + 1) != 0)
                fail_msg("ReloadPolicy as nobody: %s", out);
        call_as_nobody(f, f->b.admin_sock, M_SHOW, NULL, out, sizeof out);
        if (strncmp(out, E_PERM " ", strlen(E_PERM) + 1) != 0)
                fail_msg("ShowPolicy as nobody: %s", out);
        assert_null(strstr(out, AGENT));
        assert_null(strstr(out, OWNER));
        call_as_nobody(f, f->b.admin_sock, M_SHOW, "{\"agent\":\"" AGENT "\"}", out, sizeof out);
        assert_null(strstr(out, OWNER));
        assert_int_equal(strncmp(out, E_PERM " ", strlen(E_PERM) + 1), 0);
        /* the agent socket does not serve admin methods to anyone */
        call_as_nobody(f, f->b.sock, M_SHOW, NULL, out, sizeof out);
        assert_null(strstr(out, OWNER));
        assert_true(strncmp(out, "ok", 2) != 0);
        call_as_nobody(f, f->b.sock, M_RELOAD, NULL, out, sizeof out);
        assert_true(strncmp(out, "ok", 2) != 0);

        /* the CLI as nobody, with the socket open to it and as installed (0600) */
        for (int mode = 0; mode < 2; mode++) {
                assert_int_equal(chmod(f->b.admin_sock, mode ? 0600 : 0666), 0);
                assert_int_equal(hx_ctl(&f->b, HX_NOBODY_UID, &res, "policy", "reload", NULL), 0);
                assert_int_not_equal(res.exit_code, 0);
                assert_string_equal(res.out, "");
                hx_run_result_done(&res);
                assert_int_equal(hx_ctl(&f->b, HX_NOBODY_UID, &res, "policy", "show", NULL), 0);
                assert_int_not_equal(res.exit_code, 0);
                assert_null(strstr(res.out, OWNER));
                assert_null(strstr(res.err, OWNER));
                hx_run_result_done(&res);
        }
        hx_sleep_ms(300);
        assert_int_equal(count_audit(f, "policy.loaded", NULL), loaded);
        /* root still may */
        reload_ok(f);
}

/* WhoAmI on the agent socket shows the caller's own agent entry and nothing of another's. */
static void test_whoami_only_own_agent(void **state)
{
        fx *f = *state;
        char out[8192];
        json_t *root;

        deploy_bundle(f, "20-agents.json", 2, "\"repo:write\", \"secret:scope\"", f->key);
        hx_start(&f->b);

        root = call_on(f, f->b.sock, M_WHOAMI, NULL);
        assert_null(hx_reply_error(root));
        assert_string_equal(hx_reply_str(root, "agent"), AGENT);
        assert_string_equal(hx_reply_str(root, "owner"), OWNER);
        json_decref(root);

        call_as_nobody(f, f->b.sock, M_WHOAMI, NULL, out, sizeof out);
        if (strncmp(out, "ok ", 3) != 0)
                fail_msg("WhoAmI as nobody: %s", out);
        assert_non_null(strstr(out, "\"agent\":\"" NOBODY_AGENT "\""));
        assert_non_null(strstr(out, NOBODY_OWNER));
        assert_null(strstr(out, "\"" AGENT "\""));
        assert_null(strstr(out, OWNER));
        assert_null(strstr(out, "secret:scope"));
        assert_null(strstr(out, "repo:write"));
        /* asking about another agent is not a parameter WhoAmI takes */
        call_as_nobody(f, f->b.sock, M_WHOAMI, "{\"agent\":\"" AGENT "\"}", out, sizeof out);
        assert_true(strncmp(out, "ok", 2) != 0);
        assert_null(strstr(out, OWNER));
        assert_null(strstr(out, "secret:scope"));
        /* and the CLI's whoami as nobody */
        {
                hx_run_result res;
                assert_int_equal(hx_ctl(&f->b, HX_NOBODY_UID, &res, "whoami", NULL), 0);
                run_ok(&res, "whoami as nobody");
                assert_non_null(strstr(res.out, NOBODY_AGENT));
                assert_null(strstr(res.out, OWNER));
                assert_null(strstr(res.out, "secret:scope"));
                hx_run_result_done(&res);
        }
}

/*
 * Hostile sources dropped into the directory: a 10 MB file, a name that is
 * not UTF-8, deep nesting, invalid UTF-8, duplicate keys. Each is refused
 * with a reason (no crash: the same broker answers), the policy stays.
 */
static void test_hostile_sources_refused(void **state)
{
        fx *f = *state;
        char path[PATH_MAX * 2], *big;
        const size_t size = 10 * 1024 * 1024;
        pid_t pid;
        static const char *const docs[] = {
                "{\"version\": 5, \"agents\": [], \"$schema\": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
                "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
                "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
                "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
                "{\"version\": 5, \"agents\": [{\"id\": \"x\", \"owner\": \"\xc3\x28\", \"match\": {\"uid\": 7}, "
                "\"grants\": []}]}",
                "{\"version\": 5, \"version\": 6, \"agents\": []}",
                "{\"version\": 5, \"agents\": [{\"id\": \"x\", \"owner\": 5, \"match\": {\"uid\": 7}, \"grants\": []}]}",
        };

        deploy_bundle(f, "20-agents.json", 2, "\"repo:write\"", f->key);
        hx_start(&f->b);
        pid = f->b.pid;

        big = malloc(size + 1);
        assert_non_null(big);
        memset(big, ' ', size);
        memcpy(big, "{\"version\": 5, \"agents\": []}", 28);
        big[size] = '\0';
        deploy(f, "30-huge.json", big, NULL); /* `policy sign` refuses it too; the size is checked first */
        free(big);
        reload_refused(f, "too large");
        assert_grants(f, false, true);
        path_in(path, sizeof path, f->pol, "30-huge.json", "");
        assert_int_equal(unlink(path), 0);

        /* before the fix this failed as "Cannot allocate memory" */
        deploy(f, "\xff\xfe.json", "{\"version\": 1, \"agents\": []}", f->key);
        reload_refused(f, "/??.json: the file name is not printable UTF-8");
        assert_grants(f, false, true);
        undeploy(f, "\xff\xfe.json");

        for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++) {
                deploy(f, "30-bad.json", docs[i], f->key);
                reload_refused(f, "30-bad.json: invalid policy");
                assert_grants(f, false, true);
        }
        assert_int_equal(f->b.pid, pid);
        assert_int_equal(kill(pid, 0), 0);
}

/*
 * Known gap: turning require_signed on (or removing a trusted key) and
 * restarting leaves a policy compiled from unsigned sources in force. The
 * broker compares only the sources' names, sizes and times with what it
 * compiled, so it answers from the store without checking them against
 * the new settings; and a refused recompile keeps the previous policy
 * anyway. docs/policy.md: require_signed "rejects unsigned or badly signed
 * sources". Expected: after such a restart, no agent of an unsigned
 * source is served. Skipped unless AB_RUN_KNOWN_BUGS=1.
 */
static void test_require_signed_turned_on_evicts_unsigned(void **state)
{
        fx *f = *state;
        char conf[PATH_MAX + 64];
        int st = -1;

        snprintf(conf, sizeof conf, "require_signed = false\ntrusted_keys = %s\n", f->keys);
        assert_int_equal(hx_write_file(f->conf, conf, 0644), 0);
        deploy_bundle(f, "20-agents.json", 2, "\"repo:write\"", NULL);
        hx_start(&f->b);
        assert_grants(f, false, true);
        assert_int_equal(hx_broker_stop(&f->b, &st), 0);

        snprintf(conf, sizeof conf, "require_signed = true\ntrusted_keys = %s\n", f->keys);
        assert_int_equal(hx_write_file(f->conf, conf, 0644), 0);
        hx_start(&f->b);
        {
                json_t *root = call_on(f, f->b.sock, M_ISSUE,
                                       json_pack("{s:s, s:[s]}", "audience", AUD, "scopes", "repo:write"));
                const char *e = hx_reply_error(root);
                if (!e)
                        fprintf(stderr, "a token from an unsigned source after require_signed was turned on\n");
                assert_non_null(e);
                json_decref(root);
        }
        /* the same grants, now signed by a trusted key: served again without a restart */
        deploy_bundle(f, "20-agents.json", 3, "\"repo:write\"", f->key);
        {
                long long deadline = hx_now_ms() + WAIT_MS;
                bool granted = false;
                do {
                        json_t *root = call_on(f, f->b.sock, M_ISSUE,
                                               json_pack("{s:s, s:[s]}", "audience", AUD, "scopes", "repo:write"));
                        granted = hx_reply_error(root) == NULL;
                        json_decref(root);
                        if (!granted)
                                hx_sleep_ms(50);
                } while (!granted && hx_now_ms() < deadline);
                assert_true(granted);
        }
}

/*
 * broker.conf is read again on a reload: turning require_signed on and
 * running `policy reload` takes the unsigned policy out of force at once.
 * Before, broker.conf was read only at start, and the reload compiled the
 * unsigned source and said so, while the admin believed signing was
 * enforced (helper-44). A broker.conf that does not parse changes nothing.
 */
/* No token for repo:write: the policy that granted it is out of force. */
static void assert_write_refused(fx *f)
{
        json_t *root = call_on(f, f->b.sock, M_ISSUE, json_pack("{s:s, s:[s]}", "audience", AUD, "scopes", "repo:write"));
        if (!hx_reply_error(root))
                fprintf(stderr, "GAP: a token from an unsigned source after require_signed was turned on and reloaded\n");
        assert_non_null(hx_reply_error(root));
        json_decref(root);
}

static void test_config_read_on_reload(void **state)
{
        fx *f = *state;
        char conf[PATH_MAX + 64];
        hx_run_result res;

        snprintf(conf, sizeof conf, "require_signed = false\ntrusted_keys = %s\n", f->keys);
        assert_int_equal(hx_write_file(f->conf, conf, 0644), 0);
        deploy_bundle(f, "20-agents.json", 2, "\"repo:write\"", NULL);
        hx_start(&f->b);
        assert_grants(f, false, true);

        snprintf(conf, sizeof conf, "require_signed = true\ntrusted_keys = %s\n", f->keys);
        assert_int_equal(hx_write_file(f->conf, conf, 0644), 0);
        assert_int_equal(hx_ctl(&f->b, -1, &res, "policy", "reload", NULL), 0);
        if (res.exit_code != 1)
                fprintf(stderr, "GAP: policy reload after require_signed was turned on: exit %d, %s%s\n", res.exit_code,
                        res.out, res.err);
        assert_int_equal(res.exit_code, 1);
        assert_non_null(strstr(res.err, "unsigned, and require_signed is set"));
        hx_run_result_done(&res);
        assert_write_refused(f);
        assert_true(count_audit(f, "policy.rejected", "\"config\":{\"require_signed\":true}") >= 1);

        /* a broken broker.conf: not applied, its previous settings stay (the policy is compiled all the same) */
        assert_int_equal(hx_write_file(f->conf, "require_signed = perhaps\n", 0644), 0);
        assert_int_equal(hx_ctl(&f->b, -1, &res, "policy", "reload", NULL), 0);
        assert_int_equal(res.exit_code, 1); /* require_signed stays on: the unsigned source is refused */
        assert_non_null(strstr(res.err, "was not applied"));
        hx_run_result_done(&res);
        assert_write_refused(f);

        /* turned off by a file that anyone could have written (another owner, or writable by
         * others): not applied, as a policy source would not be (before, it was: helper-54) */
        snprintf(conf, sizeof conf, "require_signed = false\ntrusted_keys = %s\n", f->keys);
        assert_int_equal(hx_write_file(f->conf, conf, 0644), 0);
        for (int how = 0; how < 2; how++) {
                if (how == 0)
                        assert_int_equal(chown(f->conf, HX_NOBODY_UID, HX_NOBODY_UID), 0);
                else
                        assert_int_equal(chown(f->conf, 0, 0) || chmod(f->conf, 0666), 0);
                assert_int_equal(hx_ctl(&f->b, -1, &res, "policy", "reload", NULL), 0);
                if (res.exit_code != 1)
                        fprintf(stderr, "GAP: a broker.conf %s turned require_signed off: exit %d\n",
                                how ? "writable by others" : "owned by nobody", res.exit_code);
                assert_int_equal(res.exit_code, 1);
                assert_non_null(strstr(res.err, "was not applied"));
                hx_run_result_done(&res);
                assert_write_refused(f);
        }

        /* off again: the unsigned source is served after the next reload */
        assert_int_equal(chmod(f->conf, 0644), 0);
        assert_int_equal(hx_ctl(&f->b, -1, &res, "policy", "reload", NULL), 0);
        run_ok(&res, "policy reload");
        hx_run_result_done(&res);
        assert_grants(f, false, true);
}

/*
 * Under require_signed, removing the key that signed the policy in force
 * and reloading: the recompile fails, and the old policy must not stay in
 * force (no trusted key signs it any more). The same across a restart.
 */
static void test_removed_key_evicts_policy(void **state)
{
        fx *f = *state;
        char conf[PATH_MAX + 64], pub[PATH_MAX * 2];
        json_t *root;
        int st = -1;

        snprintf(conf, sizeof conf, "require_signed = true\ntrusted_keys = %s\n", f->keys);
        assert_int_equal(hx_write_file(f->conf, conf, 0644), 0);
        deploy_bundle(f, "20-agents.json", 2, "\"repo:write\"", f->key);
        hx_start(&f->b);
        assert_grants(f, false, true);

        snprintf(pub, sizeof pub, "%s/control-plane.pub", f->keys);
        assert_int_equal(unlink(pub), 0);
        reload_refused(f, "");
        root = call_on(f, f->b.sock, M_ISSUE, json_pack("{s:s, s:[s]}", "audience", AUD, "scopes", "repo:write"));
        if (!hx_reply_error(root))
                fprintf(stderr, "a token from a policy whose signing key was removed\n");
        assert_non_null(hx_reply_error(root));
        json_decref(root);

        /* and after a restart, from the store */
        assert_int_equal(hx_broker_stop(&f->b, &st), 0);
        hx_start(&f->b);
        root = call_on(f, f->b.sock, M_ISSUE, json_pack("{s:s, s:[s]}", "audience", AUD, "scopes", "repo:write"));
        assert_non_null(hx_reply_error(root));
        json_decref(root);
}

int main(void)
{
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
        const struct CMUnitTest tests[] = {
                T(test_inotify_swaps_grants),
                T(test_refused_bundles_keep_policy),
                T(test_foreign_files_refused),
                T(test_renamed_old_bundle_refused),
                T(test_sighup_and_cli_reload),
                T(test_restart_answers_from_store),
                T(test_newer_schema_refused),
                T(test_admin_policy_refused_to_nobody),
                T(test_whoami_only_own_agent),
                T(test_hostile_sources_refused),
                T(test_require_signed_turned_on_evicts_unsigned),
                T(test_config_read_on_reload),
                T(test_removed_key_evicts_policy),
        };
#undef T
        return cmocka_run_group_tests_name("integration-policy", tests, NULL, NULL);
}
