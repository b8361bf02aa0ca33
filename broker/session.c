/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sodium.h>
#include "log.h"
#include "session.h"
#include "../common/varlink.h"
#include "../common/b64.h"
#include "../common/jwt.h"
#include "../common/util.h"

#define SESSION_VERSION 1
#define PKEY_LEN (1 + 4 + 8)
#define MAX_ANCESTORS 16

/* ---- keys and records ----------------------------------------------------- */

static void proc_key(uint8_t k[PKEY_LEN], pid_t pid, uint64_t start)
{
        uint32_t u = (uint32_t)pid;
        k[0] = 'p';
        k[1] = (uint8_t)(u >> 24);
        k[2] = (uint8_t)(u >> 16);
        k[3] = (uint8_t)(u >> 8);
        k[4] = (uint8_t)u;
        put_be64(k + 5, start);
}

static size_t sess_key(char k[1 + AB_SID_LEN], const char *sid)
{
        k[0] = 's';
        memcpy(k + 1, sid, AB_SID_LEN);
        return 1 + AB_SID_LEN;
}

static bool valid_id(const char *s, size_t len)
{
        if (strlen(s) != len)
                return false;
        for (size_t i = 0; i < len; i++) {
                char c = s[i];
                if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
                      c == '_'))
                        return false;
        }
        return true;
}

/* "a" AGENT in the revocations: when the agent's sessions were last revoked (ab_revoke_agent). */
static size_t agent_key(char k[2 + AB_ID_MAX], const char *agent)
{
        size_t n = strnlen(agent, AB_ID_MAX);
        k[0] = 'a';
        memcpy(k + 1, agent, n);
        return 1 + n;
}

static bool agent_revoked_at(ab_txn *t, const char *agent, int64_t *ret)
{
        char k[2 + AB_ID_MAX];
        const void *v;
        size_t vl;

        if (ab_txn_get(t, AB_DB_REVOCATIONS, k, agent_key(k, agent), &v, &vl) != 0 || vl != 8)
                return false;
        *ret = (int64_t)get_be64(v);
        return true;
}

/* The session as stored (load_session adds what one-key revocations say). */
/*
 * A session record (a key of klen bytes, "s" + sid; the value an
 * ab_session) into *ret, its strings terminated; false if it is not one.
 * Every reader of session records goes through it (a lookup, and each
 * pass over them).
 */
static bool session_rec(size_t klen, const void *val, size_t vlen, ab_session *ret)
{
        if (klen != 1 + AB_SID_LEN || vlen != sizeof *ret)
                return false;
        memcpy(ret, val, sizeof *ret); /* LMDB values are not aligned */
        ret->sid[AB_SID_LEN] = ret->agent[AB_ID_MAX] = ret->sha256[64] = ret->exe[AB_SESSION_EXE_MAX - 1] = '\0';
        return true;
}

static int load_session_raw(ab_txn *t, const char *sid, ab_session *ret)
{
        char k[1 + AB_SID_LEN];
        const void *v;
        size_t vl;
        int r;

        if (!valid_id(sid, AB_SID_LEN))
                return -ENOENT;
        r = ab_txn_get(t, AB_DB_SESSIONS, k, sess_key(k, sid), &v, &vl);
        if (r < 0)
                return r;
        if (!session_rec(sizeof k, v, vl, ret) || ret->version != SESSION_VERSION)
                return AB_ERR_STORE;
        return 0;
}

/* The host-wide cut-off ("b": ab_revoke_before), 0 if none. */
static int64_t cutoff_of(ab_txn *t)
{
        const void *v;
        size_t vl;

        return ab_txn_get(t, AB_DB_REVOCATIONS, "b", 1, &v, &vl) == 0 && vl == 8 ? (int64_t)get_be64(v) : 0;
}

/*
 * Revocations written as one key each (ab_revoke_before, ab_revoke_agent)
 * hold whether or not the sweep that marks every session they cover was
 * written: a session opened before the host-wide cut-off (cutoff_of, read
 * once per transaction by the caller), or at or before its agent's
 * revocation, is revoked.
 */
static void apply_marks(ab_txn *t, ab_session *s, int64_t cutoff)
{
        int64_t agent_at = 0, when = 0;

        if (s->state == AB_SESSION_REVOKED)
                return;
        if (s->created < cutoff)
                when = cutoff;
        else if (agent_revoked_at(t, s->agent, &agent_at) && s->created <= agent_at)
                when = agent_at;
        if (when) {
                s->state = AB_SESSION_REVOKED;
                if (!s->revoked_at)
                        s->revoked_at = when;
        }
}

static int load_session(ab_txn *t, const char *sid, ab_session *ret)
{
        int r = load_session_raw(t, sid, ret);

        if (r == 0)
                apply_marks(t, ret, cutoff_of(t));
        return r;
}

static int store_session(ab_txn *t, const ab_session *s)
{
        char k[1 + AB_SID_LEN];
        return ab_txn_put(t, AB_DB_SESSIONS, k, sess_key(k, s->sid), s, sizeof *s);
}

int ab_session_get(ab_store *st, const char *sid, ab_session *ret)
{
        ab_txn *t = NULL;
        int r = ab_store_begin(st, false, &t);
        if (r < 0)
                return r;
        r = load_session(t, sid, ret);
        ab_txn_abort(t);
        return r;
}

int ab_jti_sid(const char *jti, char sid[AB_SID_LEN + 1])
{
        uint8_t raw[32];
        size_t n = 0;

        sid[0] = '\0';
        if (!valid_id(jti, AB_TOKEN_JTI_LEN) || ab_b64url_decode(jti, AB_TOKEN_JTI_LEN, raw, sizeof raw, &n) < 0 ||
            n != 32)
                return -EINVAL;
        (void)ab_b64url_encode(raw, 16, sid, AB_SID_LEN + 1);
        return 0;
}

void ab_jti_new(const char *sid, char out[AB_TOKEN_JTI_LEN + 1])
{
        uint8_t raw[32];
        size_t n = 0;

        if (ab_b64url_decode(sid, AB_SID_LEN, raw, 16, &n) < 0 || n != 16)
                randombytes_buf(raw, 16); /* not one of ours: still unique */
        randombytes_buf(raw + 16, 16);
        (void)ab_b64url_encode(raw, sizeof raw, out, AB_TOKEN_JTI_LEN + 1);
}

int64_t ab_session_expires(const ab_session *s, const ab_agent *a)
{
        int64_t e = s->expires;
        if (a && s->created + (int64_t)a->max_lifetime < e)
                e = s->created + (int64_t)a->max_lifetime; /* a tightened policy applies at once */
        return e;
}

int64_t ab_session_reauth_before(const ab_session *s, const ab_agent *a)
{
        int64_t iv = s->reauth_interval, e;
        if (a && a->reauth_interval < iv)
                iv = a->reauth_interval;
        e = s->auth_time + iv;
        return AB_MIN(e, ab_session_expires(s, a));
}

ab_session_verdict ab_session_check(ab_store *st, const ab_identity *id, const ab_agent *a, int64_t now,
                                    ab_session *ret)
{
        uint8_t k[PKEY_LEN];
        char sid[AB_SID_LEN + 1];
        const void *v;
        size_t vl;
        ab_txn *t = NULL;
        int r;

        memset(ret, 0, sizeof *ret);
        if (ab_store_begin(st, false, &t) < 0)
                return AB_SESSION_NONE;
        proc_key(k, id->pid, id->start_time);
        r = ab_txn_get(t, AB_DB_SESSIONS, k, sizeof k, &v, &vl);
        if (r == 0 && vl == AB_SID_LEN) {
                memcpy(sid, v, AB_SID_LEN);
                sid[AB_SID_LEN] = '\0';
                r = load_session(t, sid, ret);
        } else if (r == 0) {
                r = -ENOENT;
        }
        ab_txn_abort(t);
        if (r < 0 || ret->uid != id->uid)
                return AB_SESSION_NONE;
        if (ret->state == AB_SESSION_REVOKED)
                return AB_SESSION_IS_REVOKED;
        if (now >= ab_session_expires(ret, a))
                return AB_SESSION_EXPIRED;
        /* opened or authenticated "in the future": the clock stepped back since, and
         * neither its age nor its lifetime can be trusted until it authenticates again */
        if (ret->created > now + AB_NBF_LEEWAY || ret->auth_time > now + AB_NBF_LEEWAY)
                return AB_SESSION_NEED_REAUTH;
        /* the same pid and start time but another agent entry or another
         * executable (the process exec'd): it must prove itself again */
        if (strcmp(ret->agent, a->id) != 0 || strcmp(ret->sha256, id->sha256) != 0)
                return AB_SESSION_NEED_REAUTH;
        if (now >= ab_session_reauth_before(ret, a))
                return AB_SESSION_NEED_REAUTH;
        return AB_SESSION_OK;
}

int ab_session_authenticate(ab_store *st, const ab_identity *id, const ab_agent *a, int64_t now,
                            ab_session *ret, bool *ret_new, bool uid_holds_most)
{
        ab_session cur, old;
        ab_session_verdict v = ab_session_check(st, id, a, now, &cur);
        uint8_t k[PKEY_LEN];
        ab_txn *t = NULL;
        bool end_old = false;
        int r;

        *ret_new = false;
        if (v == AB_SESSION_IS_REVOKED) {
                *ret = cur;
                return -EPERM;
        }
        if (v == AB_SESSION_OK ||
            (v == AB_SESSION_NEED_REAUTH && strcmp(cur.agent, a->id) == 0 && strcmp(cur.sha256, id->sha256) == 0)) {
                cur.auth_time = now;
                cur.pid = id->pid;
                if (cur.created > now) { /* the clock stepped back: max_lifetime counts from now */
                        cur.created = now;
                        cur.expires = AB_MIN(cur.expires, now + (int64_t)a->max_lifetime);
                }
                *ret_new = false;
        } else {
                uint8_t raw[16];
                if (v == AB_SESSION_NEED_REAUTH) {
                        /* another agent entry or executable: the live session
                         * of this process ends here, and its tokens with it */
                        old = cur;
                        old.expires = now;
                        end_old = true;
                }
                memset(&cur, 0, sizeof cur);
                cur.version = SESSION_VERSION;
                cur.state = AB_SESSION_ACTIVE;
                cur.uid = id->uid;
                cur.pid = id->pid;
                cur.start_time = id->start_time;
                cur.created = cur.auth_time = now;
                cur.expires = now + (int64_t)a->max_lifetime;
                cur.reauth_interval = a->reauth_interval;
                randombytes_buf(raw, sizeof raw);
                (void)ab_b64url_encode(raw, sizeof raw, cur.sid, sizeof cur.sid);
                snprintf(cur.agent, sizeof cur.agent, "%s", a->id);
                snprintf(cur.sha256, sizeof cur.sha256, "%s", id->sha256);
                snprintf(cur.exe, sizeof cur.exe, "%s", id->exe);
                *ret_new = true;
        }
        r = ab_store_begin(st, true, &t);
        if (r < 0)
                return r;
        if (*ret_new) {
                /* Before the host-wide cut-off (in its own second, after the sweep,
                 * or while a cut-off up to 60 s ahead is pending), or in the second
                 * its agent was revoked: no session is opened, so the revocation
                 * fails closed without binding a revoked session to a process that
                 * only came a little early. */
                int64_t agent_at;
                if (cur.created < cutoff_of(t) || (agent_revoked_at(t, a->id, &agent_at) && cur.created <= agent_at)) {
                        ab_txn_abort(t);
                        *ret_new = false;
                        return -EAGAIN;
                }
                /* the store's last tenth is for revocations: an agent forking processes must not
                 * fill it so that it cannot be revoked */
                if (!ab_txn_room_to_grow(t)) {
                        ab_txn_abort(t);
                        *ret_new = false;
                        return -EDQUOT;
                }
                /* one uid holding most sessions stops at 75%: its processes (each a session until
                 * max_lifetime, also after it exits) denied every other user a session (helper-50) */
                if (uid_holds_most && ab_txn_used_percent(t) >= AB_STORE_UID_SHARE_PERCENT) {
                        ab_txn_abort(t);
                        *ret_new = false;
                        return -EUSERS;
                }
        }
        r = store_session(t, &cur);
        if (r == 0 && end_old)
                r = store_session(t, &old);
        if (r == 0 && *ret_new) {
                proc_key(k, id->pid, id->start_time);
                r = ab_txn_put(t, AB_DB_SESSIONS, k, sizeof k, cur.sid, AB_SID_LEN);
        }
        r = ab_txn_end(t, r);
        if (r < 0)
                return r;
        *ret = cur;
        return cur.state == AB_SESSION_REVOKED ? -EPERM : 0;
}

/* ---- revocation --------------------------------------------------------- */

static int revoke_session_txn(ab_txn *t, const char *sid, int64_t now)
{
        ab_session s;
        int r = load_session_raw(t, sid, &s); /* as stored: the sweep marks what a one-key revocation covers */
        if (r < 0)
                return r;
        if (s.state == AB_SESSION_REVOKED)
                return 0;
        s.state = AB_SESSION_REVOKED;
        s.revoked_at = now;
        return store_session(t, &s);
}

int ab_revoke_jti(ab_store *st, const char *jti, int64_t keep_until, bool reserve)
{
        char k[1 + AB_TOKEN_JTI_LEN];
        uint8_t v[8];
        ab_txn *t = NULL;
        const void *old;
        size_t old_len;
        int r;

        if (!valid_id(jti, AB_TOKEN_JTI_LEN))
                return -EINVAL;
        k[0] = 'j';
        memcpy(k + 1, jti, AB_TOKEN_JTI_LEN);
        put_be64(v, (uint64_t)keep_until);
        r = ab_store_begin(st, true, &t);
        if (r < 0)
                return r;
        /* a new key in the last tenth only for the administrator: an agent makes up jtis of its own
         * sessions at will, and must not fill the room kept for revoking it */
        if (!reserve && ab_txn_get(t, AB_DB_REVOCATIONS, k, sizeof k, &old, &old_len) == -ENOENT &&
            !ab_txn_room_to_grow(t))
                r = -EDQUOT;
        else
                r = ab_txn_put(t, AB_DB_REVOCATIONS, k, sizeof k, v, sizeof v);
        return ab_txn_end(t, r);
}

int ab_revoke_session(ab_store *st, const char *sid, int64_t now)
{
        ab_txn *t = NULL;
        int r = ab_store_begin(st, true, &t);
        if (r < 0)
                return r;
        r = revoke_session_txn(t, sid, now);
        return ab_txn_end(t, r);
}

typedef struct sweep {
        ab_txn *t;
        const char *agent;   /* revoke sessions of this agent */
        int64_t before;      /* or opened before this */
        int64_t now;
        unsigned n;
        char (*sids)[AB_SID_LEN + 1];
        size_t n_sids, cap;
} sweep;

static int collect(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        sweep *w = ud;
        ab_session s;

        if (!session_rec(klen, val, vlen, &s))
                return 0;
        if (s.state == AB_SESSION_REVOKED)
                return 0;
        /* Every session that exists was opened before this revocation: one opened "in the
         * future" (after now; the clock stepped back since) cannot show that it was opened
         * after the cut-off, and goes too. There is no leeway here: a step back of a few
         * seconds left such sessions and their tokens valid after `revoke --before now`
         * was acknowledged (helper-43). */
        if (w->agent ? strcmp(s.agent, w->agent) != 0 : s.created >= w->before && s.created <= w->now)
                return 0;
        if (w->n_sids == w->cap) {
                size_t nc = w->cap ? w->cap * 2 : 64;
                void *p = realloc(w->sids, nc * sizeof *w->sids);
                if (!p)
                        return -ENOMEM;
                w->sids = p;
                w->cap = nc;
        }
        memcpy(w->sids[w->n_sids], (const char *)key + 1, AB_SID_LEN);
        w->sids[w->n_sids][AB_SID_LEN] = '\0';
        w->n_sids++;
        return 0;
}

/* Revoke the sessions that match w, and (before-cutoff) record the cut-off, in one durable txn. */
static int revoke_sweep(ab_store *st, sweep *w, unsigned *ret_n)
{
        int r = ab_store_begin(st, true, &w->t);
        if (r < 0)
                return r;
        r = ab_txn_foreach(w->t, AB_DB_SESSIONS, "s", 1, collect, w);
        for (size_t i = 0; r >= 0 && i < w->n_sids; i++)
                r = revoke_session_txn(w->t, w->sids[i], w->now);
        free(w->sids);
        r = ab_txn_end(w->t, r);
        if (r == 0 && ret_n)
                *ret_n = (unsigned)w->n_sids;
        return r;
}

/*
 * A one-key revocation (the host-wide cut-off "b", or "a"+AGENT): the key
 * first, in a transaction of its own (it fits when the store is full of an
 * agent's sessions, which it must be able to end), moving only forward;
 * then the sweep that marks each session it covers, for listings.
 * load_session judges every session by the key itself, so a sweep that
 * fails leaves the revocation in force: 1, and the log says so.
 */
static int mark_then_sweep(ab_store *st, const char *k, size_t kl, int64_t when, sweep *w, unsigned *ret_n,
                           const char *what)
{
        uint8_t v[8];
        const void *old;
        size_t ol;
        ab_txn *t;
        int r = ab_store_begin(st, true, &t);

        if (r < 0)
                return r;
        if (ab_txn_get(t, AB_DB_REVOCATIONS, k, kl, &old, &ol) == 0 && ol == 8 && (int64_t)get_be64(old) > when)
                when = (int64_t)get_be64(old);
        put_be64(v, (uint64_t)when);
        r = ab_txn_put(t, AB_DB_REVOCATIONS, k, kl, v, sizeof v);
        r = ab_txn_end(t, r);
        if (r < 0)
                return r;
        r = revoke_sweep(st, w, ret_n);
        if (r < 0) {
                ab_log(LOG_WARNING, "%s is in force, but marking its sessions failed (%s): they are refused all the "
                       "same", what, ab_strerror(r));
                if (ret_n)
                        *ret_n = 0;
                return 1;
        }
        return 0;
}

int ab_revoke_agent(ab_store *st, const char *agent, int64_t now, unsigned *ret_n)
{
        sweep w = { .agent = agent, .now = now };
        char k[2 + AB_ID_MAX], what[AB_ID_MAX + 32];

        snprintf(what, sizeof what, "the revocation of agent %s", agent);
        return mark_then_sweep(st, k, agent_key(k, agent), now, &w, ret_n, what);
}

int ab_revoke_before(ab_store *st, int64_t t, int64_t now, unsigned *ret_n)
{
        sweep w = { .before = t, .now = now };
        char what[64];

        snprintf(what, sizeof what, "the revocation cut-off %lld", (long long)t);
        return mark_then_sweep(st, "b", 1, t, &w, ret_n, what);
}

/* ---- introspection ---------------------------------------------------------- */

static bool claim_int(json_t *c, const char *k, int64_t *ret)
{
        json_t *v = json_object_get(c, k);
        if (!json_is_integer(v))
                return false;
        *ret = json_integer_value(v);
        return true;
}

/* A time this broker could have signed: not before 1970, not past the year 36812 (2^40 s). */
static bool sane_time(int64_t t)
{
        return t >= 0 && t < ((int64_t)1 << 40);
}

static const char *claim_str(json_t *c, const char *k)
{
        return json_string_value(json_object_get(c, k));
}

static bool jti_revoked(ab_txn *t, const char *jti)
{
        char k[1 + AB_TOKEN_JTI_LEN];
        const void *v;
        size_t vl;

        if (!jti || strlen(jti) != AB_TOKEN_JTI_LEN)
                return false;
        k[0] = 'j';
        memcpy(k + 1, jti, AB_TOKEN_JTI_LEN);
        return ab_txn_get(t, AB_DB_REVOCATIONS, k, sizeof k, &v, &vl) == 0;
}

bool ab_scope_list_has(const char *scope, const char *want)
{
        size_t n = strlen(want);
        for (const char *p = scope; *p;) {
                const char *e = strchr(p, ' ');
                size_t l = e ? (size_t)(e - p) : strlen(p);
                if (l == n && memcmp(p, want, n) == 0)
                        return true;
                if (!e)
                        break;
                p = e + 1;
        }
        return false;
}

/*
 * Whether g covers aud with every scope of the space-separated scope. (Not
 * the token's lifetime: a grant whose max_ttl was lowered still judges the
 * tokens it covers, so that its max_auth_age and users go on applying.)
 */
static bool grant_fits(const ab_grant *g, const char *aud, const char *scope)
{
        char buf[AB_SCOPE_MAX + 1];

        if (strcmp(g->audience, aud) != 0)
                return false;
        for (const char *p = scope; *p;) {
                const char *e = strchr(p, ' ');
                size_t l = e ? (size_t)(e - p) : strlen(p);
                if (l > AB_SCOPE_MAX)
                        return false;
                memcpy(buf, p, l);
                buf[l] = '\0';
                if (!ab_grant_covers(g, buf))
                        return false;
                p = e ? e + 1 : p + l;
        }
        return true;
}

/*
 * The grants a token is judged by: the one its "grant" claim names, while
 * the policy has it; else (the grant changed or went, or a token from
 * before the claim) every grant of the agent that could have issued it.
 * The checks then take the strictest of them, and with none left no user
 * is allowed: a reload never lets a token in further than before.
 */
typedef struct grant_set {
        const ab_agent *a;
        const ab_grant *named;
        const char *aud, *scope;
} grant_set;

static grant_set grants_of(const ab_agent *a, json_t *claims, const char *aud, const char *scope)
{
        grant_set gs = { a, NULL, aud, scope };
        const char *id = claim_str(claims, "grant");

        for (size_t i = 0; a && id && i < a->n_grants && !gs.named; i++)
                if (strcmp(a->grants[i].id, id) == 0 && grant_fits(&a->grants[i], aud, scope))
                        gs.named = &a->grants[i];
        return gs;
}

static bool grant_in(const grant_set *gs, const ab_grant *g)
{
        return gs->named ? g == gs->named : grant_fits(g, gs->aud, gs->scope);
}

bool ab_token_granted(const ab_agent *a, json_t *claims, const char *aud, const char *scope)
{
        grant_set gs = grants_of(a, claims, aud, scope);

        for (size_t i = 0; a && i < a->n_grants; i++)
                if (grant_in(&gs, &a->grants[i]))
                        return true;
        return false;
}

/* The smallest max_auth_age of the set and the caller's (-1: no limit). */
static int64_t max_auth_age_of(const grant_set *gs, int64_t max_age)
{
        for (size_t i = 0; gs->a && i < gs->a->n_grants; i++) {
                const ab_grant *g = &gs->a->grants[i];
                if (grant_in(gs, g) && g->max_auth_age && (max_age < 0 || (int64_t)g->max_auth_age < max_age))
                        max_age = g->max_auth_age;
        }
        return max_age;
}

/* Whether user is the user the agent runs as (looked up once: *known -1 until then). */
static bool is_agent_user(const ab_session *s, const char *user, int *known)
{
        struct passwd pw, *res = NULL;
        char buf[4096];

        if (*known < 0)
                *known = getpwnam_r(user, &pw, buf, sizeof buf, &res) == 0 && res && res->pw_uid == s->uid;
        return *known == 1;
}

/*
 * Whether every grant of the set allows user, and there is one: a grant's
 * users list, or without one only the user the agent runs as.
 */
static bool users_allowed(const grant_set *gs, const ab_session *s, const char *user)
{
        size_t n = 0;
        int own = -1;

        for (size_t i = 0; gs->a && i < gs->a->n_grants; i++) {
                const ab_grant *g = &gs->a->grants[i];
                bool ok;
                if (!grant_in(gs, g))
                        continue;
                ok = !g->users && is_agent_user(s, user, &own);
                for (size_t k = 0; g->users && k < g->n_users && !ok; k++)
                        ok = strcmp(g->users[k], user) == 0;
                if (!ok)
                        return false;
                n++;
        }
        return n > 0;
}

static int inactive(ab_introspect_res *res, const char *reason)
{
        res->active = false;
        res->reason = reason;
        return 0;
}

bool ab_introspect_prepare(const ab_signer *signer, const ab_introspect_req *req, int64_t now,
                           ab_introspect_sig *sig, ab_introspect_res *res)
{
        const uint8_t *pk;

        memset(res, 0, sizeof *res);
        sig->token = req->token;
        sig->verified = false;
        if (ab_jwt_parse(req->token, req->token_len, &sig->jwt) < 0) {
                inactive(res, "bad_signature");
                return false;
        }
        pk = ab_signer_find_key(signer, sig->jwt.kid, now);
        if (!pk) {
                ab_jwt_done(&sig->jwt);
                inactive(res, "unknown_key");
                return false;
        }
        memcpy(sig->pk, pk, sizeof sig->pk); /* a key may retire before the check runs */
        const char *iss = json_string_value(json_object_get(sig->jwt.claims, "iss"));
        sig->foreign_iss = !iss || strcmp(iss, ab_signer_issuer(signer)) != 0;
        return true;
}

void ab_introspect_verify(ab_introspect_sig *sig)
{
        sig->verified = ab_jwt_verify(&sig->jwt, sig->token, sig->pk) == 0;
}

int ab_introspect_finish(ab_store *st, const ab_policy *policy, const ab_introspect_req *req, int64_t now,
                         ab_introspect_sig *sig, ab_introspect_res *res)
{
        const char *aud, *scope, *sid, *jti, *sub;
        int64_t exp, nbf, iat, auth_time, cutoff = 0, max_age = req->max_auth_age;
        const ab_agent *a;
        grant_set gs;
        json_t *anc;
        ab_txn *t = NULL;
        size_t i;
        int r;

        if (!sig->verified) {
                ab_jwt_done(&sig->jwt);
                return inactive(res, "bad_signature");
        }
        res->claims = json_incref(sig->jwt.claims);
        ab_jwt_done(&sig->jwt);

        aud = claim_str(res->claims, "aud");
        scope = claim_str(res->claims, "scope");
        sid = claim_str(res->claims, "sid");
        jti = claim_str(res->claims, "jti");
        sub = claim_str(res->claims, "sub");
        if (!aud || !scope || !sid || !jti || !sub || !claim_int(res->claims, "exp", &exp) ||
            !claim_int(res->claims, "iat", &iat) || !claim_int(res->claims, "auth_time", &auth_time))
                return inactive(res, "bad_signature"); /* not a token this broker issues */
        if (!json_object_get(res->claims, "nbf"))
                nbf = iat;
        else if (!claim_int(res->claims, "nbf", &nbf))
                return inactive(res, "bad_signature"); /* an nbf that cannot be read is not ignored */
        /* Signed by a key of this broker but not as it signs: another issuer, times out of any
         * range (now - auth_time overflowed for auth_time = -2^63), a lifetime longer than any
         * it grants, a jti not of the session named. A leaked key's forgery, then: refused
         * as one (helper-51). The session's agent is compared below. */
        char jti_sid[AB_SID_LEN + 1];
        if (sig->foreign_iss || !sane_time(exp) || !sane_time(iat) || !sane_time(nbf) || !sane_time(auth_time) ||
            exp - iat > AB_TTL_MAX + AB_NBF_LEEWAY || ab_jti_sid(jti, jti_sid) < 0 || strcmp(jti_sid, sid) != 0)
                return inactive(res, "bad_signature");
        if (now >= exp)
                return inactive(res, "expired");
        if (nbf > now + AB_NBF_LEEWAY || iat > now + AB_NBF_LEEWAY)
                return inactive(res, "not_yet_valid");

        r = ab_store_begin(st, false, &t);
        if (r < 0)
                return r;
        cutoff = cutoff_of(t);
        bool revoked = iat < cutoff || jti_revoked(t, jti);
        anc = json_object_get(res->claims, "ancestors");
        for (i = 0; !revoked && json_is_array(anc) && i < json_array_size(anc) && i < MAX_ANCESTORS; i++)
                revoked = jti_revoked(t, json_string_value(json_array_get(anc, i)));
        r = revoked ? 0 : load_session_raw(t, sid, &res->session);
        if (r == 0 && !revoked)
                apply_marks(t, &res->session, cutoff); /* the cut-off read above, once */
        ab_txn_abort(t);
        if (revoked)
                return inactive(res, "revoked");
        if (r == -ENOENT)
                return inactive(res, "session_ended");
        if (r < 0)
                return r;
        res->has_session = true;
        if (res->session.state == AB_SESSION_REVOKED)
                return inactive(res, "revoked");
        if (strcmp(res->session.agent, sub) != 0)
                return inactive(res, "bad_signature"); /* its sub chose another agent's grants */
        a = ab_policy_find(policy, sub);
        if (now >= ab_session_expires(&res->session, a))
                return inactive(res, "session_ended");
        if (req->audience && strcmp(req->audience, aud) != 0)
                return inactive(res, "wrong_audience");
        if (req->scope && !ab_scope_list_has(scope, req->scope))
                return inactive(res, "scope_missing");
        gs = grants_of(a, res->claims, aud, scope);
        max_age = max_auth_age_of(&gs, max_age);
        /* an auth_time ahead of the clock (it stepped back) proves no recent authentication */
        if (max_age >= 0 && (now - auth_time > max_age || auth_time > now + AB_NBF_LEEWAY))
                return inactive(res, "auth_too_old");
        if (req->user && !users_allowed(&gs, &res->session, req->user))
                return inactive(res, "user_not_allowed");
        res->active = true;
        return 0;
}

int ab_introspect(ab_store *st, const ab_signer *signer, const ab_policy *policy, const ab_introspect_req *req,
                  int64_t now, ab_introspect_res *res)
{
        ab_introspect_sig sig;

        if (!ab_introspect_prepare(signer, req, now, &sig, res))
                return 0;
        ab_introspect_verify(&sig);
        return ab_introspect_finish(st, policy, req, now, &sig, res);
}

/* ---- PAM sessions ------------------------------------------------------------- */

static size_t pam_key(char k[1 + AB_SID_LEN + AB_PAM_ID_LEN], const char *sid, const char *id)
{
        k[0] = 'm';
        memcpy(k + 1, sid, AB_SID_LEN);
        memcpy(k + 1 + AB_SID_LEN, id, AB_PAM_ID_LEN);
        return 1 + AB_SID_LEN + AB_PAM_ID_LEN;
}

static int count_one(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        (void)key;
        (void)klen;
        (void)val;
        (void)vlen;
        ++*(unsigned *)ud;
        return 0;
}

int ab_pam_open(ab_store *st, const char *sid, const char *jti, const char *service, const char *user,
                const char *tty, const char *rhost, uid_t opener, int64_t now, char id[AB_PAM_ID_LEN + 1])
{
        char k[1 + AB_SID_LEN + AB_PAM_ID_LEN];
        json_t *rec;
        char *text;
        ab_txn *t = NULL;
        int r;

        ab_jti_new(sid, id);
        rec = json_pack("{s:s, s:s, s:s, s:s, s:s?, s:s?, s:I, s:I}", "id", id, "jti", jti, "service", service,
                        "user", user, "tty", tty, "rhost", rhost, "opened", (json_int_t)now, "opener_uid",
                        (json_int_t)opener);
        text = rec ? json_dumps(rec, JSON_COMPACT) : NULL;
        json_decref(rec);
        if (!text)
                return -ENOMEM;
        r = ab_store_begin(st, true, &t);
        if (r == 0) {
                /* bounded: an agent cannot fill the store with PAM records */
                char pk[1 + AB_SID_LEN];
                unsigned n = 0;
                pk[0] = 'm';
                memcpy(pk + 1, sid, AB_SID_LEN);
                r = ab_txn_foreach(t, AB_DB_SESSIONS, pk, sizeof pk, count_one, &n);
                if (r >= 0 && n >= AB_PAM_PER_SESSION_MAX)
                        r = -EUSERS;
                else if (r >= 0 && !ab_txn_room_to_grow(t))
                        r = -EDQUOT; /* the last tenth is for revocations */
                if (r < 0) {
                        ab_txn_abort(t);
                        free(text);
                        return r;
                }
                r = ab_txn_put(t, AB_DB_SESSIONS, k, pam_key(k, sid, id), text, strlen(text));
                r = ab_txn_end(t, r);
        }
        free(text);
        return r;
}

int ab_pam_close(ab_store *st, const char *id, uid_t caller)
{
        char k[1 + AB_SID_LEN + AB_PAM_ID_LEN], sid[AB_SID_LEN + 1];
        const void *v;
        size_t vl;
        ab_txn *t = NULL;
        json_t *rec;
        int r;

        if (ab_jti_sid(id, sid) < 0)
                return 0; /* not one of ours: nothing to close */
        r = ab_store_begin(st, true, &t);
        if (r < 0)
                return r;
        r = ab_txn_get(t, AB_DB_SESSIONS, k, pam_key(k, sid, id), &v, &vl);
        if (r == -ENOENT) {
                ab_txn_abort(t);
                return 0;
        }
        if (r < 0) {
                ab_txn_abort(t);
                return r;
        }
        rec = json_loadb(v, vl, 0, NULL);
        if (caller != 0 && (!rec || json_integer_value(json_object_get(rec, "opener_uid")) != (json_int_t)caller)) {
                json_decref(rec);
                ab_txn_abort(t);
                return -EPERM;
        }
        json_decref(rec);
        r = ab_txn_del(t, AB_DB_SESSIONS, k, sizeof k);
        r = ab_txn_end(t, r);
        return r < 0 ? r : 1;
}

/* ---- listing and purging --------------------------------------------------------- */

json_t *ab_session_json(const ab_session *s, const ab_agent *a, int64_t now)
{
        int64_t exp = ab_session_expires(s, a);
        const char *state = s->state == AB_SESSION_REVOKED ? "revoked" : now >= exp ? "expired" : "active";
        /* the exe path is the process's bytes: not always UTF-8, so escaped (never a failed listing) */
        json_t *j = json_pack("{s:s, s:s, s:I, s:I, s:o, s:s, s:I, s:I, s:I, s:I, s:s, s:[]}", "sid", s->sid,
                              "agent", s->agent, "uid", (json_int_t)s->uid, "pid", (json_int_t)s->pid, "exe",
                              ab_json_string_escaped(s->exe), "sha256", s->sha256, "created", (json_int_t)s->created, "auth_time",
                              (json_int_t)s->auth_time, "expires", (json_int_t)exp, "reauth_before",
                              (json_int_t)ab_session_reauth_before(s, a), "state", state, "pam");
        if (j && s->state == AB_SESSION_REVOKED)
                json_object_set_new(j, "revoked_at", json_integer(s->revoked_at));
        return j;
}

typedef struct lister {
        ab_txn *t;
        const ab_policy *policy;
        const char *agent;
        const uid_t *uid;
        const char *after;
        int64_t now;
        int64_t cutoff;             /* cutoff_of, read once for the listing */
        json_t *out;
        size_t used;                /* bytes of JSON in out */
        char last[AB_SID_LEN + 1];  /* the last sid in out */
        bool more;                  /* a matching session did not fit */
} lister;

typedef struct pam_adder {
        json_t *arr;
        size_t used;
        unsigned omitted;
} pam_adder;

static int add_pam(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        pam_adder *pa = ud;
        json_t *rec;
        size_t n;
        (void)key;
        (void)klen;
        if (pa->omitted) {
                pa->omitted++;
                return 0;
        }
        rec = json_loadb(val, vlen, 0, NULL);
        if (!rec)
                return 0;
        json_object_del(rec, "opener_uid");
        n = json_dumpb(rec, NULL, 0, JSON_COMPACT) + 1;
        if (pa->used + n > AB_LIST_PAM_BUDGET) {
                json_decref(rec);
                pa->omitted = 1;
                return 0;
        }
        pa->used += n;
        json_array_append_new(pa->arr, rec);
        return 0;
}

static int list_one(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        lister *l = ud;
        ab_session s;
        json_t *j;
        char pk[1 + AB_SID_LEN];
        pam_adder pa = { 0 };
        size_t n;

        if (!session_rec(klen, val, vlen, &s))
                return 0;
        if (l->after && memcmp((const char *)key + 1, l->after, AB_SID_LEN) <= 0)
                return 0;
        if ((l->agent && strcmp(s.agent, l->agent) != 0) || (l->uid && s.uid != *l->uid))
                return 0;
        apply_marks(l->t, &s, l->cutoff); /* as every other reader sees it */
        j = ab_session_json(&s, ab_policy_find(l->policy, s.agent), l->now);
        if (!j)
                return -ENOMEM;
        pk[0] = 'm';
        memcpy(pk + 1, s.sid, AB_SID_LEN);
        pa.arr = json_object_get(j, "pam");
        (void)ab_txn_foreach(l->t, AB_DB_SESSIONS, pk, sizeof pk, add_pam, &pa);
        if (pa.omitted)
                json_object_set_new(j, "pam_omitted", json_integer(pa.omitted));
        n = json_dumpb(j, NULL, 0, JSON_COMPACT) + 1;
        if (l->used + n > AB_LIST_BUDGET && json_array_size(l->out) > 0) {
                json_decref(j);
                l->more = true;
                return 1;
        }
        l->used += n;
        memcpy(l->last, s.sid, sizeof l->last);
        json_array_append_new(l->out, j);
        return 0;
}

int ab_session_list(ab_store *st, const ab_policy *policy, const char *agent, const uid_t *uid, int64_t now,
                    const char *after, json_t **ret, char ret_next[AB_SID_LEN + 1])
{
        lister l = { .policy = policy, .agent = agent, .uid = uid, .now = now, .out = json_array() };
        int r;

        if (!l.out)
                return -ENOMEM;
        if (after && strlen(after) == AB_SID_LEN)
                l.after = after;
        else if (after && *after) {
                json_decref(l.out);
                return -EINVAL;
        }
        r = ab_store_begin(st, false, &l.t);
        if (r < 0) {
                json_decref(l.out);
                return r;
        }
        l.cutoff = cutoff_of(l.t);
        r = ab_txn_foreach(l.t, AB_DB_SESSIONS, "s", 1, list_one, &l);
        ab_txn_abort(l.t);
        if (r < 0) {
                json_decref(l.out);
                return r;
        }
        *ret = l.out;
        snprintf(ret_next, AB_SID_LEN + 1, "%s", l.more ? l.last : "");
        return 0;
}

typedef struct uid_counter {
        void (*fn)(void *ud, uint32_t uid);
        void *ud;
} uid_counter;

static int count_uid(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        uid_counter *u = ud;
        ab_session s;
        if (session_rec(klen, val, vlen, &s))
                u->fn(u->ud, s.uid);
        return 0;
}

int ab_session_count_uids(ab_store *st, void (*fn)(void *ud, uint32_t uid), void *ud)
{
        uid_counter u = { fn, ud };
        ab_txn *t = NULL;
        int r = ab_store_begin(st, false, &t);
        if (r < 0)
                return r;
        r = ab_txn_foreach(t, AB_DB_SESSIONS, "s", 1, count_uid, &u);
        ab_txn_abort(t);
        return r;
}

/*
 * The purge: a read pass collects what expired, and write transactions
 * delete it in key order. Keys in key order touch few pages; a store at its
 * 90% mark (sessions are refused from there) or on a full disk had no room
 * for one transaction deleting them in the order found, and the purge that
 * would have made room failed every time, after restarts too: no agent got
 * a session again (helper-50). A batch that does not fit is split in halves.
 */
#define PURGE_PASS_MAX 20000 /* keys per pass; what is left goes in the next, soon after */
#define PURGE_BATCH_MIN 16

typedef struct purge_key {
        uint8_t key[1 + AB_SID_LEN + AB_PAM_ID_LEN];
        uint8_t len;
        uint8_t db; /* ab_db */
} purge_key;

typedef struct purger {
        ab_txn *t;
        int64_t now;
        int64_t cutoff; /* cutoff_of, read once for the pass */
        bool (*running)(pid_t pid, uint64_t start_time);
        purge_key *keys;
        size_t n, cap;
        bool more; /* the pass stopped at PURGE_PASS_MAX */
} purger;

static int purge_add(purger *p, ab_db db, const void *key, size_t klen)
{
        if (klen > sizeof p->keys[0].key)
                return 0;
        if (p->n == p->cap) {
                size_t nc = p->cap ? p->cap * 2 : 64;
                purge_key *k = realloc(p->keys, nc * sizeof *p->keys);
                if (!k)
                        return -ENOMEM;
                p->keys = k;
                p->cap = nc;
        }
        memcpy(p->keys[p->n].key, key, klen);
        p->keys[p->n].len = (uint8_t)klen;
        p->keys[p->n++].db = (uint8_t)db;
        return 0;
}

/* Whether the pass is full: checked before a session (or revocation) is taken, so that a
 * session always goes with all its keys (before, the bound could cut it from its PAM
 * records and its process binding, which nothing else finds: kept for ever). */
static bool purge_full(purger *p)
{
        if (p->n >= PURGE_PASS_MAX)
                p->more = true;
        return p->more;
}

static int purge_pam(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        (void)val;
        (void)vlen;
        return purge_add(ud, AB_DB_SESSIONS, key, klen);
}

static int purge_session(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        purger *p = ud;
        ab_session s;
        uint8_t pk[PKEY_LEN];
        char mk[1 + AB_SID_LEN];
        const void *bound;
        size_t bl;
        int r;

        if (!session_rec(klen, val, vlen, &s) || s.expires > p->now)
                return 0;
        /* revoked by a one-key revocation whose sweep could not mark it, too (helper-43) */
        apply_marks(p->t, &s, p->cutoff);
        /* "a revoked session stays bound to its process": while it runs */
        if (s.state == AB_SESSION_REVOKED && p->running && p->running(s.pid, s.start_time))
                return 0;
        if (purge_full(p))
                return 1;
        r = purge_add(p, AB_DB_SESSIONS, key, klen);
        if (r != 0)
                return r;
        /* its PAM records go with it */
        mk[0] = 'm';
        memcpy(mk + 1, (const char *)key + 1, AB_SID_LEN);
        r = ab_txn_foreach(p->t, AB_DB_SESSIONS, mk, sizeof mk, purge_pam, p);
        if (r != 0)
                return r;
        /* and the process binding, unless it names a newer session by now */
        proc_key(pk, s.pid, s.start_time);
        if (ab_txn_get(p->t, AB_DB_SESSIONS, pk, sizeof pk, &bound, &bl) == 0 && bl == AB_SID_LEN &&
            memcmp(bound, (const char *)key + 1, AB_SID_LEN) == 0)
                return purge_add(p, AB_DB_SESSIONS, pk, sizeof pk);
        return 0;
}

static int purge_jti(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        purger *p = ud;
        if (vlen != 8 || (int64_t)get_be64(val) > p->now)
                return 0;
        if (purge_full(p))
                return 1;
        return purge_add(p, AB_DB_REVOCATIONS, key, klen);
}

/* LMDB's order (memcmp, then the shorter first), within each db. A session's PAM records
 * ('m') and process binding ('p') sort before the sessions ('s'): a pass that stops half
 * way leaves the sessions, which the next pass finds again with what is left of them. */
static int cmp_purge_key(const void *a, const void *b)
{
        const purge_key *x = a, *y = b;
        int c;

        if (x->db != y->db)
                return x->db < y->db ? -1 : 1;
        c = memcmp(x->key, y->key, x->len < y->len ? x->len : y->len);
        if (c != 0)
                return c;
        return x->len < y->len ? -1 : x->len > y->len;
}

int ab_session_purge(ab_store *st, int64_t now, bool (*running)(pid_t pid, uint64_t start_time), unsigned *ret_n,
                     bool *ret_more)
{
        purger p = { .now = now, .running = running };
        ab_txn *t = NULL;
        size_t done = 0, batch;
        int r = ab_store_begin(st, false, &t);

        if (ret_n)
                *ret_n = 0;
        if (ret_more)
                *ret_more = false;
        if (r < 0)
                return r;
        p.t = t;
        p.cutoff = cutoff_of(t);
        r = ab_txn_foreach(t, AB_DB_SESSIONS, "s", 1, purge_session, &p);
        if (r >= 0 && !p.more)
                r = ab_txn_foreach(t, AB_DB_REVOCATIONS, "j", 1, purge_jti, &p);
        ab_txn_abort(t);
        if (r >= 0 && p.n > 0)
                qsort(p.keys, p.n, sizeof *p.keys, cmp_purge_key);
        /* one transaction when it fits (one sync); halves while the store has no room for it */
        batch = p.n;
        while (r >= 0 && done < p.n) {
                size_t end = done + batch < p.n ? done + batch : p.n;
                r = ab_store_begin(st, true, &t);
                for (size_t i = done; r >= 0 && i < end; i++)
                        r = ab_txn_del(t, (ab_db)p.keys[i].db, p.keys[i].key, p.keys[i].len);
                r = ab_txn_end(t, r);
                if (r == -ENOSPC && batch > PURGE_BATCH_MIN) {
                        batch /= 2;
                        r = 0;
                        continue;
                }
                if (r >= 0) {
                        done = end;
                        batch = batch * 2 < p.n ? batch * 2 : p.n; /* room again, fewer syncs */
                }
        }
        free(p.keys);
        if (ret_n)
                *ret_n = (unsigned)done;
        if (ret_more)
                *ret_more = p.more && r >= 0;
        return r < 0 ? r : 0;
}
