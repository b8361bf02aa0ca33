/* SPDX-License-Identifier: MIT */
/*
 * Varlink methods: one table row and one function each. A row says which
 * socket may call the method; an unlisted method is an error, never a
 * fall-through.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sodium.h>
#include "log.h"
#include "manager.h"
#include "methods.h"
#include "../common/util.h"

#define SOCK_AGENT 1u
#define SOCK_ADMIN 2u

static const char interface_description[] =
        "# The agent-broker interface: short-lived tokens for local agent processes.\n"
        "# The caller is identified from the kernel (peer credentials, pidfd,\n"
        "# executable, systemd unit); nothing it says about itself is trusted.\n"
        "interface io.agentbroker\n"
        "\n"
        "type Key (kty: string, crv: string, x: string, kid: string, alg: string, use: string)\n"
        "\n"
        "# Issue a signed JWT (RFC 9068 profile, EdDSA) for one audience and some scopes.\n"
        "# ttl defaults to 300 s and is capped by the grant's max_ttl.\n"
        "# Opens a session for the process on its first call.\n"
        "method IssueToken(audience: string, scopes: []string, ttl: ?int, task: ?string) -> (\n"
        "  token: string, token_type: string, expires_in: int, expires_at: int,\n"
        "  jti: string, scope: string, agent: string, sid: string, auth_time: int)\n"
        "\n"
        "# The broker's public keys as a JSON Web Key Set, and the iss of its tokens.\n"
        "method GetKeys() -> (keys: []Key, issuer: string)\n"
        "\n"
        "type Grant (audience: string, scopes: []string, max_ttl: int, max_auth_age: ?int, users: ?[]string)\n"
        "\n"
        "type PamSession (id: string, jti: string, service: string, user: string, tty: ?string,\n"
        "  rhost: ?string, opened: int)\n"
        "\n"
        "type Session (sid: string, agent: string, uid: int, pid: int, exe: string, sha256: string,\n"
        "  created: int, auth_time: int, expires: int, reauth_before: int, state: string,\n"
        "  revoked_at: ?int, pam: ?[]PamSession, pam_omitted: ?int)\n"
        "\n"
        "# The caller's own agent entry, as attested now, and its session (null before the first request).\n"
        "method WhoAmI() -> (agent: string, owner: string, description: ?string, uid: int, pid: int,\n"
        "  exe: string, sha256: string, unit: ?string, grants: []Grant, session: ?Session)\n"
        "\n"
        "# Open a session for the calling process, or re-attest it and set auth_time to now.\n"
        "method Authenticate() -> (sid: string, agent: string, uid: int, pid: int, exe: string,\n"
        "  sha256: string, created: int, auth_time: int, expires: int, reauth_before: int, state: string)\n"
        "\n"
        "# RFC 7662-style check of a token. Active: the claims at top level. Inactive: reason is one of\n"
        "# bad_signature, unknown_key, expired, not_yet_valid, revoked, session_ended, wrong_audience,\n"
        "# scope_missing, auth_too_old, user_not_allowed. Active: the token's claims as well.\n"
        "method Introspect(token: string, audience: ?string, scope: ?string, max_auth_age: ?int,\n"
        "  user: ?string, service: ?string) -> (active: bool, reason: ?string, token_type: ?string,\n"
        "  iss: ?string, sub: ?string, aud: ?string, scope: ?string, client_id: ?string, iat: ?int,\n"
        "  nbf: ?int, exp: ?int, jti: ?string, sid: ?string, auth_time: ?int, owner: ?string,\n"
        "  grant: ?string, task: ?string, act: ?object, parent: ?string, ancestors: ?[]string)\n"
        "\n"
        "# A narrower token derived from one the caller's uid holds; never wider than the parent.\n"
        "method Attenuate(token: string, audience: ?string, scopes: ?[]string, ttl: ?int, task: ?string) -> (\n"
        "  token: string, token_type: string, expires_in: int, expires_at: int, jti: string,\n"
        "  scope: string, agent: string, sid: string, parent: string, depth: int)\n"
        "\n"
        "# Revoke one of the caller's own tokens or sessions (exactly one parameter).\n"
        "method Revoke(jti: ?string, sid: ?string, token: ?string) -> (revoked: int, message: string)\n"
        "\n"
        "# The caller's agent's sessions for the caller's uid, a page at a time (under 64 KiB):\n"
        "# pass the reply's next as after until next is null.\n"
        "method ListSessions(after: ?string) -> (sessions: []Session, next: ?string)\n"
        "\n"
        "# Record a PAM session opened with an active token (pam_agent_broker.so).\n"
        "method OpenPamSession(token: string, service: string, user: string, tty: ?string,\n"
        "  rhost: ?string, audience: ?string, scope: ?string) -> (id: string)\n"
        "method ClosePamSession(id: string) -> ()\n"
        "\n"
        "error NotAnAgent (reason: string)\n"
        "error AudienceNotGranted (reason: string)\n"
        "error ScopeNotGranted (reason: string)\n"
        "error TtlTooLong (reason: string)\n"
        "error ReauthRequired (reason: string, sid: string)\n"
        "error SessionExpired (reason: string, sid: string)\n"
        "error SessionRevoked (reason: string, sid: string)\n"
        "error InvalidToken (reason: string, verdict: string)\n"
        "error DelegationTooDeep (reason: string)\n"
        "error InvalidParameter (parameter: string, reason: string)\n"
        "error InvalidMessage (reason: string)\n"
        "error MessageTooLarge (reason: string)\n"
        "error PeerGone (reason: string)\n"
        "error RateLimited (reason: string)\n"
        "error TooManyConnections (reason: string)\n"
        "error PermissionDenied (reason: string)\n"
        "error InternalError (reason: string)\n"
        "error AuditUnavailable (reason: string)\n"
        "error LimitReached (reason: string)\n";

static const char admin_description[] =
        "# Administration of agent-broker: root (or admin_group) on the admin socket only.\n"
        "interface io.agentbroker.admin\n"
        "\n"
        "type Source (name: string, path: string, version: int, sha256: string, signed_by: ?string)\n"
        "type Finding (file: string, path: string, severity: string, message: string)\n"
        "\n"
        "# Compile the policy sources into the store; on failure the old policy stays.\n"
        "method ReloadPolicy() -> (agents: int, message: string)\n"
        "\n"
        "# The compiled policy: sources and agents (one agent if named).\n"
        "method ShowPolicy(agent: ?string) -> (sources: []Source, agents: []object)\n"
        "\n"
        "# Revoke by token, session, agent (all its sessions), or everything before an instant.\n"
        "# Exactly one parameter; durable before the reply.\n"
        "method Revoke(jti: ?string, sid: ?string, agent: ?string, before: ?int) -> (revoked: int, message: string)\n"
        "\n"
        "# Every session, or one agent's, a page at a time (as the agent interface's ListSessions).\n"
        "method ListSessions(agent: ?string, after: ?string) -> (sessions: []object, next: ?string)\n"
        "\n"
        "# As io.agentbroker.Introspect.\n"
        "method Introspect(token: string, audience: ?string, scope: ?string, max_auth_age: ?int,\n"
        "  user: ?string, service: ?string) -> (active: bool, reason: ?string, token_type: ?string,\n"
        "  iss: ?string, sub: ?string, aud: ?string, scope: ?string, client_id: ?string, iat: ?int,\n"
        "  nbf: ?int, exp: ?int, jti: ?string, sid: ?string, auth_time: ?int, owner: ?string,\n"
        "  grant: ?string, task: ?string, act: ?object, parent: ?string, ancestors: ?[]string)\n"
        "\n"
        "type Usage (agent: string, audience: string, scope: string, count: int, last_issued: int)\n"
        "\n"
        "# Usage counters: tokens issued per agent, audience and scope.\n"
        "method GetUsage(agent: ?string) -> (usage: []Usage)\n"
        "\n"
        "# Audit records of the current file, oldest first, with seq > after_seq; page with next_seq.\n"
        "method ReadAudit(after_seq: ?int, since: ?int, agent: ?string, event: ?string, limit: ?int) -> (\n"
        "  records: []object, next_seq: int, more: bool, file: string)\n"
        "\n"
        "# A new signing key; the previous public key stays in the JWKS for overlap seconds\n"
        "# (default: the longest token lifetime, 24 h, plus 5 s). An overlap shorter than the\n"
        "# longest max_ttl of the policy plus 5 s is InvalidParameter unless force is true\n"
        "# (a leaked key: its tokens stop verifying sooner).\n"
        "method RotateKey(overlap: ?int, force: ?bool) -> (kid: string, previous_kid: string,\n"
        "  previous_valid_until: int)\n"
        "\n"
        "# Every key with its status (current, retiring, retired), for audit checkpoint verification.\n"
        "method ListKeys() -> (keys: []object)\n"
        "\n"
        "error PolicyRejected (reason: string, findings: []Finding)\n"
        "error NoSuchSession (reason: string)\n"
        "error NoSuchAgent (reason: string)\n";

static const char service_description[] =
        "# The Varlink Service Interface is provided by every varlink service.\n"
        "interface org.varlink.service\n"
        "\n"
        "method GetInfo() -> (\n"
        "  vendor: string, product: string, version: string, url: string, interfaces: []string)\n"
        "\n"
        "method GetInterfaceDescription(interface: string) -> (description: string)\n"
        "\n"
        "error InterfaceNotFound (interface: string)\n"
        "error MethodNotFound (method: string)\n"
        "error MethodNotImplemented (method: string)\n"
        "error InvalidParameter (parameter: string)\n"
        "error PermissionDenied ()\n"
        "error ExpectedMore ()\n";

/* ---- parameter checking ------------------------------------------------ */

int ab_invalid_param(ab_conn *c, const char *name, const char *reason)
{
        return ab_conn_error(c, "io.agentbroker.InvalidParameter", reason, json_pack("{s:s}", "parameter", name));
}

int ab_check_params(ab_conn *c, json_t *params, const param_spec *spec)
{
        const char *key;
        json_t *v;
        char reason[160];

        json_object_foreach(params, key, v) {
                const param_spec *s;
                for (s = spec; s->name; s++)
                        if (strcmp(s->name, key) == 0)
                                break;
                if (!s->name) {
                        char name[64];
                        /* cut at a character boundary: the name goes out in JSON (UTF-8) */
                        snprintf(name, sizeof name, "%.*s", (int)ab_utf8_cut(key, strlen(key), 60), key);
                        ab_invalid_param(c, name, "unknown parameter");
                        return -1;
                }
        }
        for (const param_spec *s = spec; s->name; s++) {
                v = json_object_get(params, s->name);
                if (!v || json_is_null(v)) {
                        if (s->required) {
                                ab_invalid_param(c, s->name, "required parameter missing");
                                return -1;
                        }
                        continue;
                }
                switch (s->type) {
                case P_STRING:
                        if (!json_is_string(v) || !ab_is_printable(json_string_value(v), s->max) ||
                            json_string_length(v) != strlen(json_string_value(v))) {
                                snprintf(reason, sizeof reason, "must be a printable ASCII string of 1 to %zu bytes",
                                         s->max);
                                ab_invalid_param(c, s->name, reason);
                                return -1;
                        }
                        break;
                case P_TOKEN:
                        if (!json_is_string(v)) {
                                ab_invalid_param(c, s->name, "must be a string");
                                return -1;
                        }
                        break;
                case P_INT:
                        if (!json_is_integer(v) || json_integer_value(v) < s->min || json_integer_value(v) > s->imax) {
                                snprintf(reason, sizeof reason, "must be an integer from %lld to %lld", s->min,
                                         s->imax);
                                ab_invalid_param(c, s->name, reason);
                                return -1;
                        }
                        break;
                case P_STRINGS: {
                        size_t i;
                        json_t *e;
                        if (!json_is_array(v) || json_array_size(v) == 0 || json_array_size(v) > s->max) {
                                snprintf(reason, sizeof reason, "must be an array of 1 to %zu strings", s->max);
                                ab_invalid_param(c, s->name, reason);
                                return -1;
                        }
                        json_array_foreach(v, i, e) {
                                if (!json_is_string(e) || json_string_length(e) > AB_SCOPE_MAX ||
                                    !ab_is_scope_token(json_string_value(e), json_string_length(e)) ||
                                    strchr(json_string_value(e), '*')) {
                                        snprintf(reason, sizeof reason,
                                                 "item %zu must be a scope: printable ASCII without spaces, "
                                                 "quotes or '*', at most %d bytes", i, AB_SCOPE_MAX);
                                        ab_invalid_param(c, s->name, reason);
                                        return -1;
                                }
                        }
                        break;
                }
                case P_BOOL:
                        if (!json_is_boolean(v)) {
                                ab_invalid_param(c, s->name, "must be true or false");
                                return -1;
                        }
                        break;
                }
        }
        return 0;
}

/* ---- org.varlink.service ----------------------------------------------- */

static void m_get_info(ab_conn *c, ab_vl_call *call)
{
        if (json_object_size(call->parameters) > 0) {
                const char *key = json_object_iter_key(json_object_iter(call->parameters));
                ab_conn_reply(c, json_pack("{s:s}", "parameter", key), "org.varlink.service.InvalidParameter");
                return;
        }
        json_t *r = json_pack("{s:s, s:s, s:s, s:s, s:[s,s]}", "vendor", "agent-broker", "product", "agent-brokerd",
                              "version", AGENTBROKER_VERSION, "url", "https://github.com/agent-broker/agent-broker",
                              "interfaces", "org.varlink.service", "io.agentbroker");
        if (r && c->admin)
                json_array_append_new(json_object_get(r, "interfaces"), json_string("io.agentbroker.admin"));
        ab_conn_reply(c, r, NULL);
}

static void m_get_interface_description(ab_conn *c, ab_vl_call *call)
{
        json_t *p = call->parameters, *v = json_object_get(p, "interface");
        const char *iface;

        /* this interface's own error (as its description declares), not io.agentbroker's */
        if (!json_is_string(v) || json_string_length(v) > 256 || json_object_size(p) != 1) {
                const char *bad = "interface";
                const char *key;
                json_t *x;
                json_object_foreach(p, key, x)
                        if (strcmp(key, "interface") != 0)
                                bad = key;
                ab_conn_reply(c, json_pack("{s:s}", "parameter", bad), "org.varlink.service.InvalidParameter");
                return;
        }
        iface = json_string_value(v);
        if (strcmp(iface, "io.agentbroker.admin") == 0 && c->admin)
                ab_conn_reply(c, json_pack("{s:s}", "description", admin_description), NULL);
        else if (strcmp(iface, "io.agentbroker") == 0)
                ab_conn_reply(c, json_pack("{s:s}", "description", interface_description), NULL);
        else if (strcmp(iface, "org.varlink.service") == 0)
                ab_conn_reply(c, json_pack("{s:s}", "description", service_description), NULL);
        else
                ab_conn_reply(c, json_pack("{s:s}", "interface", iface), "org.varlink.service.InterfaceNotFound");
}

/* ---- io.agentbroker ---------------------------------------------------- */

static void m_get_keys(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { 0 } };
        if (ab_check_params(c, call->parameters, spec) < 0)
                return;
        ab_conn_reply(c, ab_signer_jwks(c->m->signer, ab_manager_now(c->m)), NULL);
}

int ab_attest_peer(ab_conn *c, ab_identity *id)
{
        int r = ab_attest(&c->peer, c->m->exe_cache, id);

        /* a new executable: hashed off the loop, then the call is handled again (no reply now) */
        if (r == -EINPROGRESS && ab_conn_wait_hash(c) == 0)
                return -1;
        if (r < 0) {
                ab_conn_error(c, "io.agentbroker.PeerGone",
                              "the calling process has exited or cannot be identified", NULL);
                return -1;
        }
        return 0;
}

json_t *ab_audit_rec(ab_conn *c, const char *decision, const char *reason, const ab_identity *id,
                     const ab_agent *a)
{
        json_t *r = json_pack("{s:s, s:I, s:I, s:I}", "decision", decision, "uid",
                              (json_int_t)(id ? id->uid : c->peer.uid), "gid", (json_int_t)(id ? id->gid : c->peer.gid),
                              "pid", (json_int_t)(id ? id->pid : c->peer.pid));
        if (!r)
                return NULL;
        if (reason)
                json_object_set_new(r, "reason", ab_json_string_escaped(reason));
        if (id) {
                json_object_set_new(r, "exe", ab_json_string_escaped(id->exe));
                if (id->sha256[0])
                        json_object_set_new(r, "sha256", json_string(id->sha256));
                if (id->unit[0])
                        json_object_set_new(r, "unit", json_string(id->unit));
        }
        if (a) {
                json_object_set_new(r, "agent", json_string(a->id));
                json_object_set_new(r, "owner", json_string(a->owner));
        }
        if (c->admin)
                json_object_set_new(r, "via", json_string("admin"));
        return r;
}

const ab_agent *ab_attest_agent_audited(ab_conn *c, ab_identity *id, const char *deny_event, json_t *deny_fields)
{
        const ab_agent *a;
        char reason[256];

        if (ab_attest_peer(c, id) < 0) {
                if (deny_event && !c->retry_call) {
                        json_t *r = ab_audit_rec(c, "deny", "the caller exited or cannot be identified", NULL, NULL);
                        if (r && deny_fields)
                                json_object_update(r, deny_fields);
                        ab_manager_audit(c->m, deny_event, r);
                }
                return NULL;
        }
        a = ab_policy_match(c->m->policy, id);
        if (!a) {
                snprintf(reason, sizeof reason, "no agent in policy matches uid %u, executable %.180s",
                         (unsigned)id->uid, id->exe[0] ? id->exe : "(unknown)");
                if (deny_event) {
                        json_t *r = ab_audit_rec(c, "deny", reason, id, NULL);
                        if (r && deny_fields)
                                json_object_update(r, deny_fields);
                        ab_manager_audit(c->m, deny_event, r);
                }
                ab_conn_error(c, "io.agentbroker.NotAnAgent", reason, NULL);
                ab_log(LOG_NOTICE, "deny pid %d uid %u exe %s: not an agent", (int)id->pid, (unsigned)id->uid, id->exe);
                return NULL;
        }
        return a;
}

const ab_agent *ab_attest_agent(ab_conn *c, ab_identity *id)
{
        return ab_attest_agent_audited(c, id, NULL, NULL);
}

/* An IssueToken call waiting for its signature. */
typedef struct issue_job {
        ab_job job;
        ab_conn *c;                  /* NULL once the connection is gone */
        const ab_signer *signer;
        char *buf;                   /* signing input, then the token */
        size_t len;
        json_t *rec;                 /* the token.issued record, queued with the reply */
        char *agent, *audience, *scope;
        /* per scope, the grant's wildcard that covered it (NULL: named): pointers into the
         * policy, which outlives the job (a reload drains the jobs first, as for signer) */
        const char *wild[AB_REQ_MAX_SCOPES];
        int64_t now, exp, auth_time;
        char jti[AB_TOKEN_JTI_LEN + 1], sid[AB_SID_LEN + 1];
} issue_job;

static void issue_job_free(issue_job *j)
{
        if (!j)
                return;
        if (j->buf) {
                sodium_memzero(j->buf, j->len);
                free(j->buf);
        }
        json_decref(j->rec);
        free(j->agent);
        free(j->audience);
        free(j->scope);
        free(j);
}

static void issue_job_run(ab_job *job)
{
        issue_job *j = (issue_job *)job;
        j->len = ab_token_finish(j->signer, j->buf, j->len);
}

/*
 * The token is signed: queue its record (the reply waits for the record's
 * batch to be durable), count its use, answer. A connection closed
 * meanwhile gets nothing, and nothing is recorded: the token was never
 * handed out.
 */
static void issue_job_done(ab_job *job)
{
        issue_job *j = (issue_job *)job;
        ab_conn *c = j->c;
        const char *scopes[AB_REQ_MAX_SCOPES];
        size_t n = 0;
        json_t *reply;

        if (!c) {
                issue_job_free(j);
                return;
        }
        ab_conn_job_answer(c);
        if (ab_manager_audit(c->m, "token.issued", j->rec) < 0) {
                j->rec = NULL;
                ab_conn_error(c, "io.agentbroker.AuditUnavailable",
                              "the audit record could not be written; nothing was issued", NULL);
                issue_job_free(j);
                ab_conn_resume(c);
                return;
        }
        j->rec = NULL;
        reply = ab_token_reply(j->buf, j->len, j->now, j->exp, j->jti, j->scope, j->agent);
        if (reply) {
                json_object_set_new(reply, "sid", json_string(j->sid));
                json_object_set_new(reply, "auth_time", json_integer(j->auth_time));
        }
        ab_conn_reply(c, reply, NULL);
        /* the scope string is the request's scopes joined by spaces (in j->wild's order) */
        for (char *p = j->scope; *p && n < AB_REQ_MAX_SCOPES;) {
                char *e = strchr(p, ' ');
                scopes[n++] = p;
                if (!e)
                        break;
                *e = '\0';
                p = e + 1;
        }
        ab_usage_note(c->m, j->agent, j->audience, scopes, j->wild, n, j->now);
        issue_job_free(j);
        ab_conn_resume(c);
}

static void m_issue_token(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = {
                { "audience", P_STRING, true, AB_AUDIENCE_MAX, 0, 0 },
                { "scopes", P_STRINGS, true, AB_REQ_MAX_SCOPES, 0, 0 },
                { "ttl", P_INT, false, 0, 1, AB_TTL_MAX },
                { "task", P_STRING, false, AB_TASK_MAX, 0, 0 },
                { 0 },
        };
        static const char *const deny_names[] = {
                [AB_DENY_AUDIENCE] = "io.agentbroker.AudienceNotGranted",
                [AB_DENY_SCOPE] = "io.agentbroker.ScopeNotGranted",
                [AB_DENY_TTL] = "io.agentbroker.TtlTooLong",
        };
        json_t *p = call->parameters, *jscopes, *claims = NULL, *e;
        const char *scopes[AB_REQ_MAX_SCOPES];
        const char *audience, *task;
        const ab_agent *a;
        const ab_grant *g = NULL;
        ab_identity id;
        char reason[512], jti[AB_TOKEN_JTI_LEN + 1], scope_str[AB_REQ_MAX_SCOPES * (AB_SCOPE_MAX + 1)];
        size_t n = 0, off = 0, i;
        uint32_t ttl = 0;
        int64_t now, exp;
        json_t *req;
        issue_job *j;
        ab_session sess;
        ab_deny d;

        if (ab_check_params(c, p, spec) < 0)
                return;
        if (!ab_conn_rate_take(c))
                return;
        audience = json_string_value(json_object_get(p, "audience"));
        task = json_string_value(json_object_get(p, "task"));
        if (json_is_integer(json_object_get(p, "ttl")))
                ttl = (uint32_t)json_integer_value(json_object_get(p, "ttl"));
        jscopes = json_object_get(p, "scopes");
        json_array_foreach(jscopes, i, e) {
                const char *s = json_string_value(e);
                size_t k;
                for (k = 0; k < n; k++)
                        if (strcmp(scopes[k], s) == 0)
                                break;
                if (k < n)
                        continue; /* duplicates collapse */
                scopes[n++] = s;
                if (off)
                        scope_str[off++] = ' ';
                memcpy(scope_str + off, s, json_string_length(e));
                off += json_string_length(e);
        }
        scope_str[off] = '\0';

        req = json_pack("{s:s, s:s}", "audience", audience, "scopes", scope_str);
        a = ab_attest_agent_audited(c, &id, "token.denied", req);
        if (!a) {
                json_decref(req);
                return;
        }
        d = ab_policy_decide(a, audience, scopes, n, ttl, &g, &ttl, reason, sizeof reason);
        if (d != AB_GRANTED) {
                json_t *rec = ab_audit_rec(c, "deny", reason, &id, a);
                if (rec)
                        json_object_update(rec, req);
                ab_manager_audit(c->m, "token.denied", rec);
                json_decref(req);
                ab_conn_error(c, deny_names[d], reason, NULL);
                ab_log(LOG_NOTICE, "deny agent %s pid %d: %s", a->id, (int)id.pid, reason);
                return;
        }
        if (ab_session_for_request(c, &id, a, &sess, req) < 0) {
                json_decref(req);
                return;
        }
        now = ab_manager_now(c->m);
        exp = now + (int64_t)ttl;
        if (exp > ab_session_expires(&sess, a))
                exp = ab_session_expires(&sess, a); /* a token never outlives its session */
        ab_jti_new(sess.sid, jti);
        claims = json_pack("{s:s, s:s, s:s, s:s, s:I, s:I, s:I, s:s, s:s, s:s, s:I}", "sub", a->id, "aud", audience,
                           "scope", scope_str, "client_id", a->id, "iat", (json_int_t)now, "nbf", (json_int_t)now,
                           "exp", (json_int_t)exp, "jti", jti, "owner", a->owner, "sid", sess.sid, "auth_time",
                           (json_int_t)sess.auth_time);
        if (claims && task)
                json_object_set_new(claims, "task", json_string(task));
        if (claims)
                json_object_set_new(claims, "grant", json_string(g->id));
        j = calloc(1, sizeof *j);
        for (i = 0; j && i < n; i++) /* for the usage counters */
                j->wild[i] = ab_grant_wildcard_for(g, scopes[i]);
        if (!j || !claims || ab_token_prepare(c->m->signer, claims, &j->buf, &j->len) < 0 ||
            !(j->agent = strdup(a->id)) || !(j->audience = strdup(audience)) || !(j->scope = strdup(scope_str))) {
                json_decref(claims);
                json_decref(req);
                issue_job_free(j);
                ab_conn_error(c, "io.agentbroker.InternalError", "could not sign the token", NULL);
                return;
        }
        json_decref(claims);
        j->rec = ab_audit_rec(c, "grant", NULL, &id, a);
        if (j->rec) {
                json_object_update(j->rec, req);
                json_object_set_new(j->rec, "jti", json_string(jti));
                json_object_set_new(j->rec, "sid", json_string(sess.sid));
                json_object_set_new(j->rec, "exp", json_integer(exp));
                if (task)
                        json_object_set_new(j->rec, "task", json_string(task));
        }
        json_decref(req);
        j->job = (ab_job){ .run = issue_job_run, .done = issue_job_done };
        j->signer = c->m->signer;
        j->now = now;
        j->exp = exp;
        j->auth_time = sess.auth_time;
        memcpy(j->jti, jti, sizeof j->jti);
        memcpy(j->sid, sess.sid, sizeof j->sid);
        /* the signature on the crypto thread; the record and the reply in issue_job_done */
        ab_conn_submit(c, &j->job, &j->c);
}

static json_t *strings_json(const char *const *v, size_t n)
{
        json_t *a = json_array();
        for (size_t i = 0; a && i < n; i++)
                json_array_append_new(a, json_string(v[i]));
        return a;
}

static json_t *grants_json(const ab_agent *a)
{
        json_t *arr = json_array();
        for (size_t i = 0; arr && i < a->n_grants; i++) {
                const ab_grant *g = &a->grants[i];
                json_t *j = json_pack("{s:s, s:o, s:i}", "audience", g->audience, "scopes",
                                      strings_json(g->scopes, g->n_scopes), "max_ttl", (int)g->max_ttl);
                if (j && g->max_auth_age)
                        json_object_set_new(j, "max_auth_age", json_integer(g->max_auth_age));
                if (j && g->users)
                        json_object_set_new(j, "users", strings_json(g->users, g->n_users));
                json_array_append_new(arr, j);
        }
        return arr;
}

static json_t *agent_json(const ab_agent *a)
{
        json_t *match = json_object(), *j;

        if (a->user)
                json_object_set_new(match, "user", json_string(a->user));
        else if (a->has_uid)
                json_object_set_new(match, "uid", json_integer(a->uid));
        if (a->group)
                json_object_set_new(match, "group", json_string(a->group));
        else if (a->has_gid)
                json_object_set_new(match, "gid", json_integer(a->gid));
        if (a->exe)
                json_object_set_new(match, "exe", json_string(a->exe));
        if (a->sha256)
                json_object_set_new(match, "sha256", json_string(a->sha256));
        if (a->unit)
                json_object_set_new(match, "unit", json_string(a->unit));
        j = json_pack("{s:s, s:s, s:s?, s:s, s:o, s:{s:i, s:i}, s:i, s:o}", "id", a->id, "owner", a->owner,
                      "description", a->description, "source", a->source, "match", match, "session",
                      "max_lifetime", (int)a->max_lifetime, "reauth_interval", (int)a->reauth_interval,
                      "max_delegation_depth", (int)a->max_delegation_depth, "grants", grants_json(a));
        return j;
}

static void m_whoami(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { 0 } };
        const ab_agent *a;
        ab_identity id;
        ab_session s;
        ab_session_verdict v;
        int64_t now;
        json_t *r;

        if (ab_check_params(c, call->parameters, spec) < 0)
                return;
        a = ab_attest_agent(c, &id);
        if (!a)
                return;
        r = json_pack("{s:s, s:s, s:s?, s:I, s:I, s:s, s:s, s:s?, s:o}", "agent", a->id, "owner", a->owner,
                      "description", a->description, "uid", (json_int_t)id.uid, "pid", (json_int_t)id.pid, "exe",
                      id.exe, "sha256", id.sha256, "unit", id.unit[0] ? id.unit : NULL, "grants", grants_json(a));
        now = ab_manager_now(c->m);
        v = ab_session_check(c->m->store, &id, a, now, &s);
        if (r && v != AB_SESSION_NONE) {
                json_t *sj = ab_session_json(&s, a, now);
                if (sj && v == AB_SESSION_NEED_REAUTH)
                        json_object_set_new(sj, "state", json_string("reauth_required"));
                json_object_del(sj, "pam");
                json_object_set_new(r, "session", sj);
        } else if (r) {
                json_object_set_new(r, "session", json_null());
        }
        ab_conn_reply(c, r, NULL);
}

static void m_reload_policy(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { 0 } };
        json_t *findings;
        char reason[512];

        if (ab_check_params(c, call->parameters, spec) < 0)
                return;
        findings = json_array();
        if (ab_manager_reload_policy(c->m, findings,
                                     json_pack("{s:s, s:I, s:I}", "via", "admin", "uid", (json_int_t)c->peer.uid, "pid",
                                               (json_int_t)c->peer.pid),
                                     reason, sizeof reason) < 0) {
                ab_conn_error(c, "io.agentbroker.admin.PolicyRejected", reason,
                              json_pack("{s:o}", "findings", findings));
                return;
        }
        json_decref(findings);
        ab_conn_reply(c, json_pack("{s:i, s:s}", "agents", (int)c->m->policy->n_agents, "message", reason), NULL);
}

static int source_json(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        json_t *arr = ud, *rec = json_loadb(val, vlen, 0, NULL);
        if (!rec)
                return 0;
        json_object_del(rec, "document");
        json_object_set_new(rec, "name", json_stringn_nocheck(key, klen));
        json_array_append_new(arr, rec);
        return 0;
}

static void m_show_policy(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { "agent", P_STRING, false, AB_ID_MAX, 0, 0 }, { 0 } };
        const char *want;
        json_t *agents, *sources;
        ab_txn *t = NULL;

        if (ab_check_params(c, call->parameters, spec) < 0)
                return;
        want = json_string_value(json_object_get(call->parameters, "agent"));
        agents = json_array();
        sources = json_array();
        for (size_t i = 0; i < c->m->policy->n_agents; i++)
                if (!want || strcmp(want, c->m->policy->agents[i].id) == 0)
                        json_array_append_new(agents, agent_json(&c->m->policy->agents[i]));
        if (ab_store_begin(c->m->store, false, &t) == 0) {
                (void)ab_txn_foreach(t, AB_DB_POLICY, NULL, 0, source_json, sources);
                ab_txn_abort(t);
        }
        if (want && json_array_size(agents) == 0) {
                json_decref(agents);
                json_decref(sources);
                ab_conn_error(c, "io.agentbroker.admin.NoSuchAgent", "no agent with this id in the compiled policy",
                              NULL);
                return;
        }
        ab_conn_reply(c, json_pack("{s:o, s:o}", "sources", sources, "agents", agents), NULL);
}

static void m_get_usage(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { "agent", P_STRING, false, AB_ID_MAX, 0, 0 }, { 0 } };
        json_t *rows = NULL;
        int r;

        if (ab_check_params(c, call->parameters, spec) < 0)
                return;
        (void)ab_usage_flush(c->m->usage, c->m->store); /* show what was counted up to now */
        r = ab_usage_list(c->m->store, json_string_value(json_object_get(call->parameters, "agent")), &rows);
        if (r < 0) {
                ab_conn_error(c, "io.agentbroker.InternalError", "cannot read the usage counters", NULL);
                return;
        }
        ab_conn_reply(c, json_pack("{s:o}", "usage", rows), NULL);
}

static void m_read_audit(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = {
                { "after_seq", P_INT, false, 0, 0, 1LL << 62 },
                { "since", P_INT, false, 0, 0, INT64_MAX / 1000000 }, /* seconds; in µs it must fit */
                { "agent", P_STRING, false, AB_ID_MAX, 0, 0 },
                { "event", P_STRING, false, 64, 0, 0 },
                { "limit", P_INT, false, 0, 1, 200 },
                { 0 },
        };
        json_t *p = call->parameters, *recs = NULL;
        uint64_t next = 0;
        bool more = false;
        int r;

        if (ab_check_params(c, p, spec) < 0)
                return;
        r = ab_audit_read(c->m->audit, (uint64_t)json_integer_value(json_object_get(p, "after_seq")),
                          (uint64_t)json_integer_value(json_object_get(p, "since")) * 1000000u,
                          json_string_value(json_object_get(p, "agent")), json_string_value(json_object_get(p, "event")),
                          json_is_integer(json_object_get(p, "limit")) ? (size_t)json_integer_value(json_object_get(p, "limit")) : 200,
                          48 * 1024, &recs, &next, &more);
        if (r < 0) {
                char reason[256];
                snprintf(reason, sizeof reason, "cannot read the audit trail: %s", ab_strerror(r));
                ab_conn_error(c, "io.agentbroker.InternalError", reason, NULL);
                return;
        }
        ab_conn_reply(c, json_pack("{s:o, s:I, s:b, s:s}", "records", recs, "next_seq", (json_int_t)next, "more", more,
                                   "file", ab_audit_path(c->m->audit)),
                      NULL);
}

/* The longest lifetime the compiled policy lets a token have (attenuated ones live no longer). */
static int64_t longest_token_life(const ab_policy *p)
{
        int64_t max = 0;
        for (size_t i = 0; p && i < p->n_agents; i++)
                for (size_t k = 0; k < p->agents[i].n_grants; k++)
                        if ((int64_t)p->agents[i].grants[k].max_ttl > max)
                                max = p->agents[i].grants[k].max_ttl;
        return max;
}

static void m_rotate_key(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { "overlap", P_INT, false, 0, 0, 366LL * 86400 },
                                           { "force", P_BOOL, false, 0, 0, 0 },
                                           { 0 } };
        json_t *ov = json_object_get(call->parameters, "overlap");
        int64_t need = longest_token_life(c->m->policy) + AB_NBF_LEEWAY;
        char old[64], reason[256];
        int64_t until = 0;
        int r;

        if (ab_check_params(c, call->parameters, spec) < 0)
                return;
        /* A shorter overlap makes tokens that are still valid stop verifying: only on purpose
         * (a key that leaked must stop verifying at once). */
        if (json_is_integer(ov) && json_integer_value(ov) < need &&
            !json_is_true(json_object_get(call->parameters, "force"))) {
                snprintf(reason, sizeof reason,
                         "an overlap of %lld s is shorter than the longest token lifetime the policy grants "
                         "plus leeway (%lld s): tokens signed by the old key would stop verifying before they "
                         "expire; pass force (keys rotate --force) to retire it sooner on purpose",
                         (long long)json_integer_value(ov), (long long)need);
                ab_invalid_param(c, "overlap", reason);
                return;
        }
        /* default overlap: the longest a token can live, plus the clock leeway */
        r = ab_manager_rotate_key(c->m, json_is_integer(ov) ? json_integer_value(ov) : AB_TTL_MAX + AB_NBF_LEEWAY,
                                  old, sizeof old, &until);
        if (r < 0) {
                snprintf(reason, sizeof reason, "key rotation failed: %s", ab_strerror(r));
                ab_conn_error(c, "io.agentbroker.InternalError", reason, NULL);
                return;
        }
        json_t *rec = ab_audit_rec(c, "accept", NULL, NULL, NULL);
        if (rec) {
                json_object_set_new(rec, "kid", json_string(ab_signer_kid(c->m->signer)));
                json_object_set_new(rec, "previous_kid", json_string(old));
                json_object_set_new(rec, "previous_valid_until", json_integer(until));
        }
        if (ab_manager_audit_change(c->m, "key.rotated", rec) < 0) {
                ab_conn_error(c, "io.agentbroker.AuditUnavailable",
                              "the key is rotated, but its audit record could not be written", NULL);
                return;
        }
        ab_conn_reply(c, json_pack("{s:s, s:s, s:I}", "kid", ab_signer_kid(c->m->signer), "previous_kid", old,
                                   "previous_valid_until", (json_int_t)until),
                      NULL);
}

static void m_list_keys(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { 0 } };
        if (ab_check_params(c, call->parameters, spec) < 0)
                return;
        ab_conn_reply(c, ab_signer_all_keys(c->m->signer, ab_manager_now(c->m)), NULL);
}

/* ---- dispatch ---------------------------------------------------------- */

typedef struct method {
        const char *name;
        void (*handler)(ab_conn *c, ab_vl_call *call);
        unsigned sockets;
} method;

static const method methods[] = {
        { "org.varlink.service.GetInfo", m_get_info, SOCK_AGENT | SOCK_ADMIN },
        { "org.varlink.service.GetInterfaceDescription", m_get_interface_description, SOCK_AGENT | SOCK_ADMIN },
        { "io.agentbroker.IssueToken", m_issue_token, SOCK_AGENT },
        { "io.agentbroker.GetKeys", m_get_keys, SOCK_AGENT | SOCK_ADMIN },
        { "io.agentbroker.WhoAmI", m_whoami, SOCK_AGENT },
        { "io.agentbroker.Authenticate", ab_m_authenticate, SOCK_AGENT },
        { "io.agentbroker.Introspect", ab_m_introspect, SOCK_AGENT | SOCK_ADMIN },
        { "io.agentbroker.Attenuate", ab_m_attenuate, SOCK_AGENT },
        { "io.agentbroker.Revoke", ab_m_revoke, SOCK_AGENT },
        { "io.agentbroker.ListSessions", ab_m_list_sessions, SOCK_AGENT },
        { "io.agentbroker.OpenPamSession", ab_m_open_pam_session, SOCK_AGENT },
        { "io.agentbroker.ClosePamSession", ab_m_close_pam_session, SOCK_AGENT },
        { "io.agentbroker.admin.Revoke", ab_m_admin_revoke, SOCK_ADMIN },
        { "io.agentbroker.admin.ListSessions", ab_m_admin_list_sessions, SOCK_ADMIN },
        { "io.agentbroker.admin.Introspect", ab_m_introspect, SOCK_ADMIN },
        { "io.agentbroker.admin.GetUsage", m_get_usage, SOCK_ADMIN },
        { "io.agentbroker.admin.ReadAudit", m_read_audit, SOCK_ADMIN },
        { "io.agentbroker.admin.RotateKey", m_rotate_key, SOCK_ADMIN },
        { "io.agentbroker.admin.ListKeys", m_list_keys, SOCK_ADMIN },
        { "io.agentbroker.admin.ReloadPolicy", m_reload_policy, SOCK_ADMIN },
        { "io.agentbroker.admin.ShowPolicy", m_show_policy, SOCK_ADMIN },
};

void ab_dispatch(ab_conn *c, ab_vl_call *call)
{
        const method *m = NULL;

        c->oneway = call->oneway; /* no reply to a oneway call */
        c->call_paid = false;

        for (size_t i = 0; i < AB_ARRAY_SIZE(methods); i++)
                if (strcmp(methods[i].name, call->method) == 0) {
                        m = &methods[i];
                        break;
                }
        if (!m || !(m->sockets & (c->admin ? SOCK_ADMIN : SOCK_AGENT))) {
                const char *dot = strrchr(call->method, '.');
                size_t ilen = (size_t)(dot - call->method);
                static const char *const ifaces[] = { "io.agentbroker", "io.agentbroker.admin", "org.varlink.service" };
                bool known_iface = false;
                for (size_t i = 0; i < AB_ARRAY_SIZE(ifaces); i++)
                        if (ilen == strlen(ifaces[i]) && strncmp(call->method, ifaces[i], ilen) == 0)
                                known_iface = true;
                if (m && !known_iface)
                        known_iface = true;
                if (m) {
                        /* exists, but not on this socket */
                        ab_conn_error(c, "io.agentbroker.PermissionDenied",
                                      c->admin ? "this method is for the agent socket"
                                               : "this method is only available on the admin socket",
                                      NULL);
                        goto out;
                }
                if (!known_iface) {
                        char iface[AB_VL_MAX_METHOD + 1];
                        snprintf(iface, sizeof iface, "%.*s", (int)ilen, call->method);
                        ab_conn_reply(c, json_pack("{s:s}", "interface", iface), "org.varlink.service.InterfaceNotFound");
                } else {
                        ab_conn_reply(c, json_pack("{s:s}", "method", call->method), "org.varlink.service.MethodNotFound");
                }
                goto out;
        }
        if (call->upgrade) {
                ab_conn_reply(c, json_pack("{s:s}", "method", call->method),
                              "org.varlink.service.MethodNotImplemented");
                goto out;
        }
        m->handler(c, call);
out:
        c->oneway = false;
}
