/* SPDX-License-Identifier: MIT */
/*
 * Varlink methods about sessions: Authenticate, Introspect, Attenuate,
 * Revoke, ListSessions and the PAM session records. The rules they apply
 * live in session.c; this file checks parameters, asks who is calling,
 * and turns results into replies.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <sodium.h>
#include "log.h"
#include "methods.h"
#include "../common/util.h"

/*
 * Wall-clock seconds. For tests only, AGENT_BROKER_TEST_CLOCK names a file
 * holding an offset in seconds (e.g. "-3600" or "86400") added to the real
 * clock: the torture suite jumps the clock by rewriting it.
 */
int64_t ab_manager_now(const ab_manager *m)
{
        static const char *file;
        static bool checked;
        static int64_t offset;
        static struct timespec seen;
        int64_t now = (int64_t)(ab_now_usec() / 1000000);
        struct stat st;

        (void)m;
        if (!checked) {
                file = getenv("AGENT_BROKER_TEST_CLOCK");
                checked = true;
                if (file && *file)
                        ab_log(LOG_WARNING, "test clock: wall time is offset by the number in %s", file);
        }
        if (!file || !*file)
                return now;
        if (stat(file, &st) == 0 && (st.st_mtim.tv_sec != seen.tv_sec || st.st_mtim.tv_nsec != seen.tv_nsec)) {
                char buf[32] = "";
                FILE *f = fopen(file, "re");
                if (f) {
                        if (fgets(buf, sizeof buf, f))
                                offset = strtoll(buf, NULL, 10);
                        fclose(f);
                }
                seen = st.st_mtim;
        }
        return now + offset;
}

static void store_error(ab_conn *c, int r, const char *what)
{
        static uint64_t logged; /* a full store refuses every new session: one log line per 10 s */
        char reason[256];

        if (r == -EDQUOT || r == -EUSERS || r == -ENOSPC || r == -EIO)
                ab_manager_purge_soon(c->m); /* what expired makes room (the timer waits 10 min) */
        if (r == -EDQUOT || r == -EUSERS) { /* limits, not failures (ab_session_authenticate) */
                if (r == -EUSERS) /* one uid's share */
                        snprintf(reason, sizeof reason,
                                 "%s: uid %u holds most of the broker's sessions and its state store is %d%% full; "
                                 "the rest is kept for other users (sessions end with max_lifetime, also those of "
                                 "exited processes)",
                                 what, (unsigned)c->peer.uid, AB_STORE_UID_SHARE_PERCENT);
                else /* ab_txn_room_to_grow */
                        snprintf(reason, sizeof reason,
                                 "%s: the broker's state store is 90%% full; its last tenth is kept for revocations "
                                 "(--store-max-size)",
                                 what);
                if (logged == 0 || ab_mono_usec() - logged >= 10000000) {
                        logged = ab_mono_usec();
                        ab_log(LOG_WARNING, "%s", reason);
                }
                ab_conn_error(c, "io.agentbroker.LimitReached", reason, NULL);
                return;
        }
        snprintf(reason, sizeof reason, "%s: %s", what,
                 r == -ENOSPC ? "the broker's state store is full (disk or map)"
                 : r == -EIO  ? "the broker's state store cannot be written (a full file system reads so too)"
                              : ab_strerror(r));
        ab_log(LOG_ERR, "%s", reason);
        ab_conn_error(c, "io.agentbroker.InternalError", reason, NULL);
}

static json_t *session_reply(const ab_session *s, const ab_agent *a, int64_t now)
{
        json_t *j = ab_session_json(s, a, now);
        if (j)
                json_object_del(j, "pam");
        return j;
}

/*
 * A new session would begin before the host-wide revocation cut-off (in the
 * second of `revoke --before now`, or up to 60 s of one set ahead): none is
 * opened, and the caller may retry; a process is not bound for life to a
 * session revoked at birth.
 */
#define CUTOFF_REASON "no session is opened within a revocation that covers it (the host-wide cut-off, or the second its agent was revoked)"

static void cutoff_pending(ab_conn *c)
{
        ab_conn_error(c, "io.agentbroker.RateLimited", CUTOFF_REASON "; retry shortly", NULL);
}

static void audit_session(ab_conn *c, const char *event, const char *decision, const char *reason,
                          const ab_identity *id, const ab_agent *a, const ab_session *s, json_t *fields)
{
        json_t *rec = ab_audit_rec(c, decision, reason, id, a);
        if (rec && s && s->sid[0])
                json_object_set_new(rec, "sid", json_string(s->sid));
        if (rec && fields)
                json_object_update(rec, fields);
        if (strcmp(decision, "grant") == 0) /* a session opened or re-authenticated in LMDB */
                ab_manager_audit_change(c->m, event, rec);
        else
                ab_manager_audit(c->m, event, rec);
}

int ab_session_for_request(ab_conn *c, const ab_identity *id, const ab_agent *a, ab_session *ret,
                           json_t *deny_fields)
{
        int64_t now = ab_manager_now(c->m);
        char reason[256];
        bool created;
        int r;

        switch (ab_session_check(c->m->store, id, a, now, ret)) {
        case AB_SESSION_OK:
                return 0;
        case AB_SESSION_NONE:
                r = ab_session_authenticate(c->m->store, id, a, now, ret, &created,
                                            ab_manager_uid_holds_most(c->m, id->uid));
                if (r == -EAGAIN) {
                        /* the record first: a refusal waits for its own record like any reply */
                        audit_session(c, "token.denied", "deny", CUTOFF_REASON, id, a, NULL, deny_fields);
                        cutoff_pending(c);
                        return -1;
                }
                if (r < 0) {
                        audit_session(c, "token.denied", "deny", "cannot open a session", id, a, NULL, deny_fields);
                        store_error(c, r, "cannot open a session");
                        return -1;
                }
                ab_log(LOG_INFO, "session %s opened for agent %s pid %d uid %u", ret->sid, a->id, (int)id->pid,
                       (unsigned)id->uid);
                if (created)
                        ab_manager_session_opened(c->m, id->uid);
                audit_session(c, "session.opened", "grant", NULL, id, a, ret, NULL);
                return 0;
        case AB_SESSION_NEED_REAUTH:
                if (strcmp(ret->sha256, id->sha256) != 0 || strcmp(ret->agent, a->id) != 0)
                        snprintf(reason, sizeof reason,
                                 "the process changed its executable or agent entry since session %s was "
                                 "authenticated; call Authenticate",
                                 ret->sid);
                else
                        snprintf(reason, sizeof reason,
                                 "session %s was last authenticated %lld s ago (reauth_interval %u s); call "
                                 "Authenticate",
                                 ret->sid, (long long)(now - ret->auth_time),
                                 AB_MIN(ret->reauth_interval, a->reauth_interval));
                audit_session(c, "token.denied", "deny", reason, id, a, ret, deny_fields);
                ab_conn_error(c, "io.agentbroker.ReauthRequired", reason, json_pack("{s:s}", "sid", ret->sid));
                return -1;
        case AB_SESSION_EXPIRED:
                snprintf(reason, sizeof reason, "session %s reached its max_lifetime; call Authenticate for a new one",
                         ret->sid);
                audit_session(c, "session.expired", "deny", reason, id, a, ret, NULL);
                audit_session(c, "token.denied", "deny", reason, id, a, ret, deny_fields);
                ab_conn_error(c, "io.agentbroker.SessionExpired", reason, json_pack("{s:s}", "sid", ret->sid));
                return -1;
        case AB_SESSION_IS_REVOKED:
                snprintf(reason, sizeof reason, "session %s of this process was revoked", ret->sid);
                audit_session(c, "token.denied", "deny", reason, id, a, ret, deny_fields);
                ab_conn_error(c, "io.agentbroker.SessionRevoked", reason, json_pack("{s:s}", "sid", ret->sid));
                return -1;
        }
        return -1;
}

json_t *ab_token_reply(const char *token, size_t len, int64_t now, int64_t exp, const char *jti, const char *scope,
                       const char *agent)
{
        return json_pack("{s:s%, s:s, s:I, s:I, s:s, s:s, s:s}", "token", token, len, "token_type", "Bearer",
                         "expires_in", (json_int_t)(exp - now), "expires_at", (json_int_t)exp, "jti", jti, "scope",
                         scope, "agent", agent);
}

void ab_m_authenticate(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { 0 } };
        const ab_agent *a;
        ab_identity id;
        ab_session s;
        bool created = false;
        int64_t now;
        int r;

        if (ab_check_params(c, call->parameters, spec) < 0)
                return;
        if (!ab_conn_rate_take(c))
                return;
        a = ab_attest_agent_audited(c, &id, "session.opened", NULL);
        if (!a)
                return;
        now = ab_manager_now(c->m);
        r = ab_session_authenticate(c->m->store, &id, a, now, &s, &created, ab_manager_uid_holds_most(c->m, id.uid));
        if (r == -EAGAIN) {
                audit_session(c, "session.reauthenticated", "deny", CUTOFF_REASON, &id, a, NULL, NULL);
                cutoff_pending(c);
                return;
        }
        if (r < 0 && r != -EPERM) {
                store_error(c, r, "cannot record the session");
                return;
        }
        if (created) {
                ab_manager_session_opened(c->m, id.uid);
                audit_session(c, "session.opened", "grant", NULL, &id, a, &s, NULL);
                ab_log(LOG_INFO, "session %s opened for agent %s pid %d uid %u", s.sid, a->id, (int)id.pid,
                       (unsigned)id.uid);
        }
        if (r == -EPERM) {
                char reason[160];
                snprintf(reason, sizeof reason, "session %s of this process was revoked", s.sid);
                audit_session(c, "session.reauthenticated", "deny", reason, &id, a, &s, NULL);
                ab_conn_error(c, "io.agentbroker.SessionRevoked", reason, json_pack("{s:s}", "sid", s.sid));
                return;
        }
        if (!created) {
                audit_session(c, "session.reauthenticated", "grant", NULL, &id, a, &s, NULL);
                ab_log(LOG_INFO, "session %s re-authenticated for agent %s pid %d uid %u", s.sid, a->id, (int)id.pid,
                       (unsigned)id.uid);
        }
        ab_conn_reply(c, session_reply(&s, a, now), NULL);
}

/* An audit field that comes from a token claim, and its name in the record. */
typedef struct claim_field {
        const char *claim, *field;
} claim_field;

/* Copy each string claim of the map from claims (NULL: none) into rec (NULL: nothing). */
static void rec_copy_claims(json_t *rec, const json_t *claims, const claim_field *map, size_t n)
{
        for (size_t i = 0; rec && claims && i < n; i++) {
                json_t *v = json_object_get(claims, map[i].claim);
                if (json_is_string(v))
                        json_object_set(rec, map[i].field, v);
        }
}

/* ---- Introspect --------------------------------------------------------- */

static const param_spec introspect_spec[] = {
        /* RFC 7662: a string that is no token of ours (empty, too long, a stray newline) is
         * answered inactive, not refused as a parameter (ab_jwt_parse bounds and checks it) */
        { "token", P_TOKEN, true, AB_JWT_MAX, 0, 0 },
        { "audience", P_STRING, false, AB_AUDIENCE_MAX, 0, 0 },
        { "scope", P_STRING, false, AB_SCOPE_MAX, 0, 0 },
        { "max_auth_age", P_INT, false, 0, 0, 366LL * 24 * 3600 },
        { "user", P_STRING, false, AB_USER_MAX, 0, 0 },
        { "service", P_STRING, false, AB_SERVICE_MAX, 0, 0 },
        { 0 },
};

/*
 * Introspect p's "token". With request_checks, p's audience, scope,
 * max_auth_age and user constrain the verdict as Introspect's parameters
 * do (Introspect; OpenPamSession, whose "user" is the PAM user). Attenuate
 * passes false: its "audience" names the child's, and asking for another
 * one is AudienceNotGranted, not an inactive parent.
 */
static int introspect_token(ab_conn *c, json_t *p, bool request_checks, ab_introspect_res *res)
{
        json_t *tok = json_object_get(p, "token");
        ab_introspect_req req = {
                .token = json_string_value(tok),
                .token_len = json_string_length(tok),
                .max_auth_age = -1,
        };
        if (request_checks) {
                json_t *age = json_object_get(p, "max_auth_age");
                req.audience = json_string_value(json_object_get(p, "audience"));
                req.scope = json_string_value(json_object_get(p, "scope"));
                req.user = json_string_value(json_object_get(p, "user"));
                req.max_auth_age = json_is_integer(age) ? json_integer_value(age) : -1;
        }
        int r = ab_introspect(c->m->store, c->m->signer, c->m->policy, &req, ab_manager_now(c->m), res);
        if (r < 0) {
                json_decref(res->claims);
                res->claims = NULL;
                store_error(c, r, "cannot read the session store");
        }
        return r;
}

/* Answer an Introspect call with its verdict and record it. */
static void introspect_answer(ab_conn *c, json_t *p, ab_introspect_res *res)
{
        const char *service = json_string_value(json_object_get(p, "service"));
        json_t *reply;

        if (res->active) {
                /* the claims are this call's own (parsed for it): the reply is them, not a copy */
                reply = json_incref(res->claims);
                json_object_set_new(reply, "active", json_true());
                json_object_set_new(reply, "token_type", json_string("Bearer")); /* RFC 7662 2.2, RFC 6749 7.1 */
        } else {
                reply = json_pack("{s:b, s:s}", "active", 0, "reason", res->reason);
        }
        ab_log(LOG_DEBUG, "introspect by uid %u%s%s: %s", (unsigned)c->peer.uid, service ? " for " : "",
               service ? service : "", res->active ? "active" : res->reason);
        {
                json_t *rec = ab_audit_rec(c, res->active ? "active" : "inactive", res->active ? NULL : res->reason,
                                           NULL, NULL);
                static const claim_field map[] = { { "sub", "agent" }, { "aud", "audience" }, { "jti", "jti" },
                                                   { "sid", "sid" },    { "parent", "parent" }, { "owner", "owner" },
                                                   { "scope", "scopes" } };
                rec_copy_claims(rec, res->claims, map, AB_ARRAY_SIZE(map));
                if (rec && service)
                        json_object_set_new(rec, "service", json_string(service));
                if (ab_manager_audit(c->m, "token.introspected", rec) < 0) {
                        json_decref(reply);
                        json_decref(res->claims);
                        ab_conn_error(c, "io.agentbroker.AuditUnavailable",
                                      "the audit record could not be written", NULL);
                        return;
                }
        }
        json_decref(res->claims);
        ab_conn_reply(c, reply, NULL);
}

/* An Introspect call waiting for its signature check. */
typedef struct introspect_job {
        ab_job job;
        ab_conn *c;           /* NULL once the connection is gone */
        json_t *params;       /* the call's parameters (a reference): the token stays */
        ab_introspect_req req;
        ab_introspect_sig sig;
} introspect_job;

static void introspect_job_run(ab_job *job)
{
        ab_introspect_verify(&((introspect_job *)job)->sig);
}

static void introspect_job_done(ab_job *job)
{
        introspect_job *j = (introspect_job *)job;
        ab_conn *c = j->c;
        ab_introspect_res res;
        int r;

        if (!c) { /* nobody to tell: nothing was looked up */
                ab_jwt_done(&j->sig.jwt);
                json_decref(j->params);
                free(j);
                return;
        }
        ab_conn_job_answer(c);
        memset(&res, 0, sizeof res);
        r = ab_introspect_finish(c->m->store, c->m->policy, &j->req, ab_manager_now(c->m), &j->sig, &res);
        if (r < 0) {
                json_decref(res.claims);
                store_error(c, r, "cannot read the session store");
        } else {
                introspect_answer(c, j->params, &res);
        }
        json_decref(j->params);
        free(j);
        ab_conn_resume(c);
}

void ab_m_introspect(ab_conn *c, ab_vl_call *call)
{
        introspect_job *j;
        ab_introspect_res res;
        json_t *p = call->parameters, *tok, *age;

        if (ab_check_params(c, p, introspect_spec) < 0)
                return;
        if (!ab_conn_rate_take(c))
                return;
        j = calloc(1, sizeof *j);
        if (!j) {
                ab_conn_error(c, "io.agentbroker.InternalError", "out of memory", NULL);
                return;
        }
        tok = json_object_get(p, "token");
        age = json_object_get(p, "max_auth_age");
        j->req = (ab_introspect_req){
                .token = json_string_value(tok),
                .token_len = json_string_length(tok),
                .audience = json_string_value(json_object_get(p, "audience")),
                .scope = json_string_value(json_object_get(p, "scope")),
                .user = json_string_value(json_object_get(p, "user")),
                .max_auth_age = json_is_integer(age) ? json_integer_value(age) : -1,
        };
        if (!ab_introspect_prepare(c->m->signer, &j->req, ab_manager_now(c->m), &j->sig, &res)) {
                free(j);
                introspect_answer(c, p, &res); /* malformed or unknown key: no signature to check */
                return;
        }
        /* the signature check on the crypto thread; the rest in introspect_job_done */
        j->params = json_incref(p);
        j->job = (ab_job){ .run = introspect_job_run, .done = introspect_job_done };
        ab_conn_submit(c, &j->job, &j->c);
}

/* ---- Attenuate ------------------------------------------------------------ */

static void token_invalid(ab_conn *c, const char *verdict)
{
        char reason[128];
        snprintf(reason, sizeof reason, "the token is not active: %s", verdict);
        ab_conn_error(c, "io.agentbroker.InvalidToken", reason, json_pack("{s:s}", "verdict", verdict));
}

/*
 * A refused Attenuate: a deny record (event token.attenuated) naming the
 * parent token when it parsed, what was asked and why, then the error.
 */
static void attenuate_refuse(ab_conn *c, const ab_identity *id, const ab_agent *a, const json_t *pc, const json_t *p,
                             const char *error, const char *reason, json_t *data)
{
        static const claim_field map[] = { { "jti", "parent" }, { "sid", "sid" }, { "aud", "audience" } };
        json_t *rec = ab_audit_rec(c, "deny", reason, id, a);
        rec_copy_claims(rec, pc, map, AB_ARRAY_SIZE(map));
        if (rec && json_is_array(json_object_get(p, "scopes"))) {
                /* space-separated, as in every other record */
                char buf[AB_REQ_MAX_SCOPES * (AB_SCOPE_MAX + 1)];
                size_t off = 0, i;
                json_t *e;
                json_array_foreach(json_object_get(p, "scopes"), i, e) {
                        int k = snprintf(buf + off, sizeof buf - off, "%s%s", off ? " " : "", json_string_value(e));
                        if (k < 0 || (size_t)k >= sizeof buf - off)
                                break;
                        off += (size_t)k;
                }
                buf[off] = '\0';
                json_object_set_new(rec, "scopes", json_string(buf));
        }
        if (rec && json_is_string(json_object_get(p, "audience")))
                json_object_set(rec, "audience", json_object_get(p, "audience"));
        ab_manager_audit(c->m, "token.attenuated", rec);
        ab_conn_error(c, error, reason, data);
}

void ab_m_attenuate(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = {
                { "token", P_STRING, true, AB_JWT_MAX, 0, 0 },
                { "audience", P_STRING, false, AB_AUDIENCE_MAX, 0, 0 },
                { "scopes", P_STRINGS, false, AB_REQ_MAX_SCOPES, 0, 0 },
                { "ttl", P_INT, false, 0, 1, AB_TTL_MAX },
                { "task", P_STRING, false, AB_TASK_MAX, 0, 0 },
                { 0 },
        };
        json_t *p = call->parameters, *pc, *claims = NULL, *anc = NULL, *act, *e;
        const char *aud, *pscope, *audience, *task;
        char scope[AB_REQ_MAX_SCOPES * (AB_SCOPE_MAX + 1)], reason[512], jti[AB_TOKEN_JTI_LEN + 1];
        const ab_agent *a, *delegator;
        ab_introspect_res res;
        ab_identity id;
        int64_t now = ab_manager_now(c->m), pexp, exp;
        size_t off = 0, i, depth;
        char *token = NULL;
        size_t len = 0;

        if (ab_check_params(c, p, spec) < 0)
                return;
        if (!ab_conn_rate_take(c))
                return;
        if (ab_attest_peer(c, &id) < 0)
                return;
        if (introspect_token(c, p, false, &res) < 0)
                return;
        if (!res.active) {
                snprintf(reason, sizeof reason, "the token is not active: %s", res.reason);
                attenuate_refuse(c, &id, NULL, res.claims, p, "io.agentbroker.InvalidToken", reason,
                                 json_pack("{s:s}", "verdict", res.reason));
                goto out;
        }
        if (res.session.uid != id.uid) {
                attenuate_refuse(c, &id, NULL, res.claims, p, "io.agentbroker.PermissionDenied",
                                 "the token's session belongs to another user; only its holder may attenuate it",
                                 NULL);
                ab_log(LOG_NOTICE, "attenuate refused: pid %d uid %u holds a token of uid %u", (int)id.pid,
                       (unsigned)id.uid, (unsigned)res.session.uid);
                goto out;
        }
        pc = res.claims;
        aud = json_string_value(json_object_get(pc, "aud"));
        pscope = json_string_value(json_object_get(pc, "scope"));
        pexp = json_integer_value(json_object_get(pc, "exp"));
        a = ab_policy_find(c->m->policy, json_string_value(json_object_get(pc, "sub")));
        if (!a) {
                attenuate_refuse(c, &id, NULL, pc, p, "io.agentbroker.NotAnAgent",
                                 "the token's agent is no longer in policy", NULL);
                goto out;
        }
        anc = json_object_get(pc, "ancestors");
        depth = json_is_array(anc) ? json_array_size(anc) + 1 : 1;
        if (depth > a->max_delegation_depth) {
                snprintf(reason, sizeof reason, "delegation depth %zu exceeds max_delegation_depth %u of agent \"%s\"",
                         depth, a->max_delegation_depth, a->id);
                attenuate_refuse(c, &id, a, pc, p, "io.agentbroker.DelegationTooDeep", reason, NULL);
                goto out;
        }
        audience = json_string_value(json_object_get(p, "audience"));
        if (audience && strcmp(audience, aud) != 0) {
                snprintf(reason, sizeof reason, "audience \"%.200s\" is not the parent token's audience", audience);
                attenuate_refuse(c, &id, a, pc, p, "io.agentbroker.AudienceNotGranted", reason, NULL);
                goto out;
        }
        if (json_is_array(json_object_get(p, "scopes"))) {
                json_array_foreach(json_object_get(p, "scopes"), i, e) {
                        const char *s = json_string_value(e);
                        if (!ab_scope_list_has(pscope, s)) {
                                snprintf(reason, sizeof reason, "scope \"%.128s\" is not in the parent token", s);
                                attenuate_refuse(c, &id, a, pc, p, "io.agentbroker.ScopeNotGranted", reason, NULL);
                                goto out;
                        }
                        if (ab_scope_list_has(off ? scope : "", s))
                                continue;
                        if (off)
                                scope[off++] = ' ';
                        memcpy(scope + off, s, json_string_length(e));
                        off += json_string_length(e);
                        scope[off] = '\0';
                }
        } else {
                snprintf(scope, sizeof scope, "%s", pscope);
        }
        /* no token lives longer than AB_TTL_MAX: a parent issued up to 5 s "in the future" (the
         * clock stepped back) would otherwise pass its exp - iat on, a few seconds longer with
         * each level, past what Introspect and verifiers take (helper-53) */
        exp = pexp < now + AB_TTL_MAX ? pexp : now + AB_TTL_MAX;
        if (json_is_integer(json_object_get(p, "ttl"))) {
                exp = now + json_integer_value(json_object_get(p, "ttl"));
                if (exp > pexp) {
                        snprintf(reason, sizeof reason, "ttl reaches past the parent token's expiry (%lld s left)",
                                 (long long)(pexp - now));
                        attenuate_refuse(c, &id, a, pc, p, "io.agentbroker.TtlTooLong", reason, NULL);
                        goto out;
                }
        }
        /* a new token: the policy and the session's re-authentication apply as to IssueToken */
        if (!ab_token_granted(a, pc, aud, scope)) {
                snprintf(reason, sizeof reason,
                         "the policy no longer grants agent \"%s\" audience \"%.200s\" with scopes \"%.200s\"", a->id,
                         aud, scope);
                attenuate_refuse(c, &id, a, pc, p, "io.agentbroker.ScopeNotGranted", reason, NULL);
                goto out;
        }
        if (now >= ab_session_reauth_before(&res.session, a)) {
                snprintf(reason, sizeof reason, "session %s must re-authenticate (Authenticate) before it delegates",
                         res.session.sid);
                attenuate_refuse(c, &id, a, pc, p, "io.agentbroker.ReauthRequired", reason,
                                 json_pack("{s:s}", "sid", res.session.sid));
                goto out;
        }
        delegator = ab_policy_match(c->m->policy, &id);
        act = json_pack("{s:s}", "sub", delegator ? delegator->id : a->id);
        if (act && json_is_object(json_object_get(pc, "act")))
                json_object_set(act, "act", json_object_get(pc, "act"));
        anc = json_is_array(anc) ? json_copy(anc) : json_array();
        json_array_append(anc, json_object_get(pc, "jti"));
        task = json_string_value(json_object_get(p, "task"));
        if (!task)
                task = json_string_value(json_object_get(pc, "task"));
        ab_jti_new(res.session.sid, jti);
        claims = json_pack("{s:O, s:O, s:s, s:O, s:I, s:I, s:I, s:s, s:O, s:O, s:O, s:o, s:O, s:o}", "sub",
                           json_object_get(pc, "sub"), "aud", json_object_get(pc, "aud"), "scope", scope,
                           "client_id", json_object_get(pc, "client_id"), "iat", (json_int_t)now, "nbf",
                           (json_int_t)now, "exp", (json_int_t)exp, "jti", jti, "sid", json_object_get(pc, "sid"),
                           "auth_time", json_object_get(pc, "auth_time"), "owner", json_object_get(pc, "owner"),
                           "act", act, "parent", json_object_get(pc, "jti"), "ancestors", anc);
        if (claims && task)
                json_object_set_new(claims, "task", json_string(task));
        if (claims && json_is_string(json_object_get(pc, "grant")))
                json_object_set(claims, "grant", json_object_get(pc, "grant")); /* judged by the parent's grant */
        if (!claims || ab_token_sign(c->m->signer, claims, &token, &len) < 0) {
                ab_conn_error(c, "io.agentbroker.InternalError", "could not sign the token", NULL);
                goto out;
        }
        json_t *reply = ab_token_reply(token, len, now, exp, jti, scope, a->id);
        if (reply) {
                json_object_set(reply, "parent", json_object_get(pc, "jti"));
                json_object_set_new(reply, "depth", json_integer((json_int_t)depth));
                json_object_set(reply, "sid", json_object_get(pc, "sid"));
        }
        ab_log(LOG_INFO, "attenuated %s -> %s (depth %zu) by pid %d", json_string_value(json_object_get(pc, "jti")),
               jti, depth, (int)id.pid);
        {
                json_t *rec = ab_audit_rec(c, "grant", NULL, &id, a);
                if (rec) {
                        json_object_set(rec, "audience", json_object_get(pc, "aud"));
                        json_object_set_new(rec, "scopes", json_string(scope));
                        json_object_set_new(rec, "jti", json_string(jti));
                        json_object_set(rec, "sid", json_object_get(pc, "sid"));
                        json_object_set(rec, "parent", json_object_get(pc, "jti"));
                        json_object_set_new(rec, "depth", json_integer((json_int_t)depth));
                        json_object_set_new(rec, "exp", json_integer(exp));
                        if (delegator)
                                json_object_set_new(rec, "delegator", json_string(delegator->id));
                }
                if (ab_manager_audit(c->m, "token.attenuated", rec) < 0) {
                        json_decref(reply);
                        ab_conn_error(c, "io.agentbroker.AuditUnavailable",
                                      "the audit record could not be written; nothing was issued", NULL);
                        goto out;
                }
        }
        ab_conn_reply(c, reply, NULL);
out:
        if (token) {
                sodium_memzero(token, len);
                free(token);
        }
        json_decref(claims);
        json_decref(res.claims);
}

/* ---- Revoke --------------------------------------------------------------- */

static int one_of(ab_conn *c, json_t *p, const char *const *names, size_t n, const char **ret)
{
        size_t found = 0;
        for (size_t i = 0; i < n; i++)
                if (json_object_get(p, names[i]) && !json_is_null(json_object_get(p, names[i]))) {
                        *ret = names[i];
                        found++;
                }
        if (found != 1) {
                ab_invalid_param(c, names[0], "give exactly one of the revocation parameters");
                return -1;
        }
        return 0;
}

static void revoked_reply(ab_conn *c, unsigned n, const char *what)
{
        char msg[256];
        snprintf(msg, sizeof msg, "revoked %s", what);
        ab_log(LOG_NOTICE, "uid %u %s", (unsigned)c->peer.uid, msg);
        ab_conn_reply(c, json_pack("{s:i, s:s}", "revoked", (int)n, "message", msg), NULL);
}

/* The record of an agent's Revoke (decision "revoke", or "deny" when refused). */
static int audit_revoke(ab_conn *c, const ab_identity *id, const ab_agent *a, const char *decision,
                        const char *reason, const char *sid, const char *jti)
{
        json_t *rec = ab_audit_rec(c, decision, reason, id, a);
        if (rec) {
                json_object_set_new(rec, "sid", json_string(sid));
                if (jti)
                        json_object_set_new(rec, "jti", json_string(jti));
        }
        if (strcmp(decision, "revoke") == 0) /* in force in LMDB */
                return ab_manager_audit_change(c->m, jti ? "token.revoked" : "session.revoked", rec);
        return ab_manager_audit(c->m, jti ? "token.revoked" : "session.revoked", rec);
}

/*
 * A change is made (a revocation in force, a PAM session recorded or
 * closed) but its audit record could not be queued (r < 0): say so
 * instead of acknowledging it, which would leave no record at all.
 */
static bool unrecorded(ab_conn *c, int r, const char *what)
{
        char reason[256];

        if (r >= 0)
                return false;
        snprintf(reason, sizeof reason, "%s, but its audit record could not be written (%s)", what, ab_strerror(r));
        ab_conn_error(c, "io.agentbroker.AuditUnavailable", reason, NULL);
        return true;
}

void ab_m_revoke(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = {
                { "jti", P_STRING, false, AB_TOKEN_JTI_LEN, 0, 0 },
                { "sid", P_STRING, false, AB_SID_LEN, 0, 0 },
                { "token", P_STRING, false, AB_JWT_MAX, 0, 0 },
                { 0 },
        };
        static const char *const names[] = { "jti", "sid", "token" };
        json_t *p = call->parameters;
        const char *which = NULL, *jti = NULL;
        char sid[AB_SID_LEN + 1], what[128];
        ab_introspect_res res = { 0 };
        const ab_agent *a;
        ab_identity id;
        ab_session s;
        int r;

        if (ab_check_params(c, p, spec) < 0 || one_of(c, p, names, 3, &which) < 0)
                return;
        if (!ab_conn_rate_take(c))
                return;
        a = ab_attest_agent_audited(c, &id, strcmp(which, "sid") == 0 ? "session.revoked" : "token.revoked", NULL);
        if (!a)
                return;
        if (strcmp(which, "sid") == 0) {
                snprintf(sid, sizeof sid, "%s", json_string_value(json_object_get(p, "sid")));
        } else {
                if (strcmp(which, "token") == 0) {
                        if (introspect_token(c, p, false, &res) < 0)
                                return;
                        if (!res.claims) {
                                token_invalid(c, res.reason);
                                return;
                        }
                        jti = json_string_value(json_object_get(res.claims, "jti"));
                } else {
                        jti = json_string_value(json_object_get(p, "jti"));
                }
                if (!jti || ab_jti_sid(jti, sid) < 0) {
                        json_decref(res.claims);
                        ab_invalid_param(c, which, "not a token identifier issued by this broker");
                        return;
                }
        }
        r = ab_session_get(c->m->store, sid, &s);
        if (r < 0 || strcmp(s.agent, a->id) != 0 || s.uid != id.uid) {
                static const char why[] =
                        "no session of this agent and user by that identifier; an agent revokes only its own";
                audit_revoke(c, &id, a, "deny", why, sid, jti);
                json_decref(res.claims);
                ab_conn_error(c, "io.agentbroker.PermissionDenied", why, NULL);
                return;
        }
        ab_manager_drain_jobs(c->m); /* a token being signed now is issued before, not after, the ack */
        if (jti) {
                r = ab_revoke_jti(c->m->store, jti, s.expires, false);
                snprintf(what, sizeof what, "token %s", jti);
        } else {
                r = ab_revoke_session(c->m->store, sid, ab_manager_now(c->m));
                snprintf(what, sizeof what, "session %s", sid);
        }
        if (r < 0) {
                json_decref(res.claims);
                store_error(c, r, "cannot record the revocation");
                return;
        }
        r = audit_revoke(c, &id, a, "revoke", what, sid, jti);
        json_decref(res.claims); /* jti points into it when revoking by token */
        if (!unrecorded(c, r, "the revocation is in force"))
                revoked_reply(c, 1, what);
}

void ab_m_admin_revoke(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = {
                { "jti", P_STRING, false, AB_TOKEN_JTI_LEN, 0, 0 },
                { "sid", P_STRING, false, AB_SID_LEN, 0, 0 },
                { "agent", P_STRING, false, AB_ID_MAX, 0, 0 },
                { "before", P_INT, false, 0, 0, 1LL << 40 },
                { 0 },
        };
        static const char *const names[] = { "jti", "sid", "agent", "before" };
        json_t *p = call->parameters;
        const char *which = NULL;
        int64_t now = ab_manager_now(c->m);
        char what[160];
        unsigned n = 1;
        int r;

        if (ab_check_params(c, p, spec) < 0 || one_of(c, p, names, 4, &which) < 0)
                return;
        ab_manager_drain_jobs(c->m); /* a token being signed now is issued before, not after, the ack */
        if (strcmp(which, "jti") == 0) {
                const char *jti = json_string_value(json_object_get(p, "jti"));
                char sid[AB_SID_LEN + 1];
                ab_session s;
                int64_t keep = now + AB_TTL_MAX;
                if (ab_jti_sid(jti, sid) < 0) {
                        ab_invalid_param(c, "jti", "not a token identifier issued by this broker");
                        return;
                }
                if (ab_session_get(c->m->store, sid, &s) == 0 && s.expires > now)
                        keep = s.expires;
                r = ab_revoke_jti(c->m->store, jti, keep, true);
                snprintf(what, sizeof what, "token %s", jti);
        } else if (strcmp(which, "sid") == 0) {
                const char *sid = json_string_value(json_object_get(p, "sid"));
                r = ab_revoke_session(c->m->store, sid, now);
                if (r == -ENOENT) {
                        ab_conn_error(c, "io.agentbroker.admin.NoSuchSession", "no session with this id", NULL);
                        return;
                }
                snprintf(what, sizeof what, "session %s", sid);
        } else if (strcmp(which, "agent") == 0) {
                const char *agent = json_string_value(json_object_get(p, "agent"));
                r = ab_revoke_agent(c->m->store, agent, now, &n);
                if (r == 0 && n == 0 && !ab_policy_find(c->m->policy, agent)) {
                        /* neither in the policy nor with a session: a typo, most likely (an agent since
                         * removed from the policy is found by its sessions) */
                        ab_conn_error(c, "io.agentbroker.admin.NoSuchAgent",
                                      "no agent with this id in the compiled policy, and no session of one", NULL);
                        return;
                }
                if (r == 1)
                        snprintf(what, sizeof what, "agent %s (its sessions are refused; marking each failed)", agent);
                else
                        snprintf(what, sizeof what, "%u sessions of agent %s", n, agent);
        } else {
                int64_t t = json_integer_value(json_object_get(p, "before"));
                /* The cut-off never moves back, so a time in the future (a typo
                 * of the year) would refuse every agent until then: at most a
                 * minute ahead (`revoke --before now` sends the next second). */
                if (t > now + 60) {
                        ab_invalid_param(c, "before",
                                         "a cut-off more than 60 s in the future would refuse every agent until then");
                        return;
                }
                r = ab_revoke_before(c->m->store, t, now, &n);
                if (r == 1)
                        snprintf(what, sizeof what,
                                 "every token and session before %lld (refused; marking each session failed)",
                                 (long long)t);
                else
                        snprintf(what, sizeof what, "every token and session (%u) before %lld", n, (long long)t);
                n++;
        }
        if (r < 0) {
                store_error(c, r, "cannot record the revocation");
                return;
        }
        {
                static const char *const events[] = { "token.revoked", "session.revoked", "agent.revoked",
                                                       "revocation.before" };
                json_t *rec = ab_audit_rec(c, "revoke", what, NULL, NULL);
                size_t k;
                for (k = 0; k < AB_ARRAY_SIZE(names); k++)
                        if (strcmp(names[k], which) == 0)
                                break;
                if (rec) {
                        json_t *v = json_object_get(p, which);
                        json_object_set(rec, strcmp(which, "agent") == 0 ? "agent" : which, v);
                        if (strcmp(which, "jti") == 0) {
                                char sid[AB_SID_LEN + 1];
                                if (ab_jti_sid(json_string_value(v), sid) == 0)
                                        json_object_set_new(rec, "sid", json_string(sid));
                        }
                        json_object_set_new(rec, "count", json_integer(n));
                }
                r = ab_manager_audit_change(c->m, events[k], rec);
        }
        if (!unrecorded(c, r, "the revocation is in force"))
                revoked_reply(c, n, what);
}

/* ---- ListSessions ------------------------------------------------------- */

/* One page of ListSessions: {sessions, next}, next being the `after` of the following page or null. */
static void reply_sessions(ab_conn *c, const char *agent, const uid_t *uid, const char *after)
{
        json_t *list = NULL;
        char next[AB_SID_LEN + 1];
        int r = ab_session_list(c->m->store, c->m->policy, agent, uid, ab_manager_now(c->m), after, &list, next);
        if (r == -EINVAL) {
                ab_conn_error(c, "io.agentbroker.InvalidParameter", "after must be a session id (22 characters)",
                              json_pack("{s:s}", "parameter", "after"));
                return;
        }
        if (r < 0) {
                store_error(c, r, "cannot list sessions");
                return;
        }
        ab_conn_reply(c, json_pack("{s:o, s:o}", "sessions", list, "next", next[0] ? json_string(next) : json_null()),
                      NULL);
}

void ab_m_list_sessions(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { "after", P_STRING, false, AB_SID_LEN, 0, 0 }, { 0 } };
        const ab_agent *a;
        ab_identity id;

        if (ab_check_params(c, call->parameters, spec) < 0)
                return;
        a = ab_attest_agent(c, &id);
        if (!a)
                return;
        reply_sessions(c, a->id, &id.uid, json_string_value(json_object_get(call->parameters, "after")));
}

void ab_m_admin_list_sessions(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { "agent", P_STRING, false, AB_ID_MAX, 0, 0 },
                                           { "after", P_STRING, false, AB_SID_LEN, 0, 0 },
                                           { 0 } };

        if (ab_check_params(c, call->parameters, spec) < 0)
                return;
        reply_sessions(c, json_string_value(json_object_get(call->parameters, "agent")), NULL,
                       json_string_value(json_object_get(call->parameters, "after")));
}

/* ---- PAM sessions ---------------------------------------------------------- */

/*
 * The pam.opened record of an OpenPamSession (p), granted ("open", with
 * the new pam_id) or refused ("deny" and why): what was asked (service,
 * user, tty, rhost) and, from the token when it parsed, its jti, sid,
 * agent and owner; for an active token, sid and agent of its session.
 */
static int audit_pam_open(ab_conn *c, const char *decision, const char *reason, json_t *p,
                          const ab_introspect_res *res, const char *pam_id)
{
        static const char *const asked[] = { "service", "user", "tty", "rhost" };
        static const claim_field map[] = { { "jti", "jti" }, { "sid", "sid" }, { "sub", "agent" }, { "owner", "owner" } };
        json_t *rec = ab_audit_rec(c, decision, reason, NULL, NULL);

        rec_copy_claims(rec, res->claims, map, AB_ARRAY_SIZE(map));
        if (rec) {
                if (pam_id)
                        json_object_set_new(rec, "pam_id", json_string(pam_id));
                for (size_t i = 0; i < AB_ARRAY_SIZE(asked); i++)
                        if (json_object_get(p, asked[i]))
                                json_object_set(rec, asked[i], json_object_get(p, asked[i]));
                if (res->active) {
                        json_object_set_new(rec, "sid", json_string(res->session.sid));
                        json_object_set_new(rec, "agent", json_string(res->session.agent));
                }
        }
        if (pam_id) /* recorded in LMDB */
                return ab_manager_audit_change(c->m, "pam.opened", rec);
        return ab_manager_audit(c->m, "pam.opened", rec);
}

void ab_m_open_pam_session(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = {
                { "token", P_STRING, true, AB_JWT_MAX, 0, 0 },
                { "service", P_STRING, true, AB_SERVICE_MAX, 0, 0 },
                { "user", P_STRING, true, AB_USER_MAX, 0, 0 },
                { "tty", P_STRING, false, 256, 0, 0 },
                { "rhost", P_STRING, false, 256, 0, 0 },
                { "audience", P_STRING, false, AB_AUDIENCE_MAX, 0, 0 },
                { "scope", P_STRING, false, AB_SCOPE_MAX, 0, 0 },
                { 0 },
        };
        json_t *p = call->parameters;
        ab_introspect_res res;
        char id[AB_PAM_ID_LEN + 1];
        int r;

        if (ab_check_params(c, p, spec) < 0)
                return;
        if (!ab_conn_rate_take(c))
                return;
        /* A login is recorded only for a token that would log in to this service: its audience
         * (pam:SERVICE unless the module names another pam: one) and scope (login unless named),
         * as pam_sm_authenticate's Introspect asked. Any other active token would let its holder
         * write made-up logins into the trail. */
        if (json_object_get(p, "audience") && strncmp(json_string_value(json_object_get(p, "audience")), "pam:", 4) != 0) {
                ab_invalid_param(c, "audience", "a PAM session is recorded only for a token of a pam: audience");
                return;
        }
        if (!json_object_get(p, "audience")) {
                char aud[AB_SERVICE_MAX + 8];
                snprintf(aud, sizeof aud, "pam:%s", json_string_value(json_object_get(p, "service")));
                json_object_set_new(p, "audience", json_string(aud));
        }
        if (!json_object_get(p, "scope"))
                json_object_set_new(p, "scope", json_string("login"));
        if (introspect_token(c, p, true, &res) < 0)
                return;
        if (!res.active) {
                /* a refused login is a decision: on the record, as a denial */
                char reason[128];
                snprintf(reason, sizeof reason, "the token is not active: %s", res.reason);
                audit_pam_open(c, "deny", reason, p, &res, NULL);
                token_invalid(c, res.reason);
                json_decref(res.claims);
                return;
        }
        r = ab_pam_open(c->m->store, res.session.sid, json_string_value(json_object_get(res.claims, "jti")),
                        json_string_value(json_object_get(p, "service")), json_string_value(json_object_get(p, "user")),
                        json_string_value(json_object_get(p, "tty")), json_string_value(json_object_get(p, "rhost")),
                        c->peer.uid, ab_manager_now(c->m), id);
        if (r < 0) {
                const char *why = r == -EUSERS ? "this session has too many open PAM sessions; close some first"
                                               : "cannot record the PAM session";
                audit_pam_open(c, "deny", why, p, &res, NULL);
                json_decref(res.claims);
                if (r == -EUSERS)
                        ab_conn_error(c, "io.agentbroker.LimitReached", why, NULL);
                else
                        store_error(c, r, why);
                return;
        }
        ab_log(LOG_INFO, "PAM session %s opened (service %s, user %s)", id,
               json_string_value(json_object_get(p, "service")), json_string_value(json_object_get(p, "user")));
        r = audit_pam_open(c, "open", NULL, p, &res, id);
        json_decref(res.claims);
        if (!unrecorded(c, r, "the PAM session is recorded"))
                ab_conn_reply(c, json_pack("{s:s}", "id", id), NULL);
}

void ab_m_close_pam_session(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { "id", P_STRING, true, AB_PAM_ID_LEN, 0, 0 }, { 0 } };
        const char *id;
        int r;

        if (ab_check_params(c, call->parameters, spec) < 0)
                return;
        if (!ab_conn_rate_take(c))
                return;
        id = json_string_value(json_object_get(call->parameters, "id"));
        r = ab_pam_close(c->m->store, id, c->peer.uid);
        if (r == -EPERM) {
                ab_conn_error(c, "io.agentbroker.PermissionDenied", "this PAM session was opened by another user",
                              NULL);
                return;
        }
        if (r < 0) {
                store_error(c, r, "cannot close the PAM session");
                return;
        }
        if (r == 0) { /* unknown or already closed: idempotent, and nothing to record */
                /* a close may be waiting for its record: this answer waits with it */
                ab_conn_after_pending(c);
                ab_conn_reply(c, json_object(), NULL);
                return;
        }
        {
                json_t *rec = ab_audit_rec(c, "close", NULL, NULL, NULL);
                char sid[AB_SID_LEN + 1];
                if (rec) {
                        json_object_set_new(rec, "pam_id", json_string(id));
                        if (ab_jti_sid(id, sid) == 0) {
                                ab_session sess;
                                json_object_set_new(rec, "sid", json_string(sid));
                                /* the agent, so that audit --agent finds the close too */
                                if (ab_session_get(c->m->store, sid, &sess) == 0)
                                        json_object_set_new(rec, "agent", json_string(sess.agent));
                        }
                }
                r = ab_manager_audit_change(c->m, "pam.closed", rec);
        }
        if (!unrecorded(c, r, "the PAM session is closed"))
                ab_conn_reply(c, json_object(), NULL);
}
