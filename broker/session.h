/* SPDX-License-Identifier: MIT */
/*
 * Sessions, revocations and token introspection, kept in the LMDB store.
 *
 * Keys in AB_DB_SESSIONS:
 *   "s" SID                   -> ab_session (fixed-size record)
 *   "p" PID(be32) START(be64) -> SID (the process a session is bound to)
 *   "m" SID PAMID             -> PAM session record (JSON)
 * Keys in AB_DB_REVOCATIONS:
 *   "j" JTI                   -> be64 time after which the entry may go
 *   "b"                       -> be64 host-wide cut-off: tokens issued and
 *                                sessions opened before it are revoked
 * A jti is base64url(16 bytes of the session id || 16 random bytes), so it
 * names its session without a lookup.
 */
#ifndef AB_SESSION_H
#define AB_SESSION_H

#include <stdbool.h>
#include <stdint.h>
#include <jansson.h>
#include "attest.h"
#include "policy.h"
#include "store.h"
#include "token.h"

#define AB_SID_LEN 22     /* base64url of 16 bytes */
#define AB_TOKEN_JTI_LEN 43 /* base64url of 32 bytes */
#define AB_PAM_ID_LEN 43 /* like a jti: names its session */
#define AB_STORE_UID_SHARE_PERCENT 75 /* see ab_session_authenticate */
#define AB_NBF_LEEWAY 5   /* seconds an nbf/iat may lie in the future */
#define AB_SESSION_EXE_MAX 256

typedef enum ab_session_state {
        AB_SESSION_ACTIVE = 1,
        AB_SESSION_REVOKED = 2,
} ab_session_state;

typedef struct ab_session {
        uint32_t version;     /* record layout, 1 */
        uint32_t state;       /* ab_session_state */
        uint32_t uid;
        int32_t pid;
        uint64_t start_time;  /* process start (clock ticks after boot) */
        int64_t created, auth_time, expires, revoked_at;
        uint32_t reauth_interval;
        uint32_t reserved;
        char sid[AB_SID_LEN + 1];
        char agent[AB_ID_MAX + 1];
        char sha256[65];
        char exe[AB_SESSION_EXE_MAX]; /* for display, may be truncated */
} ab_session;

/* Why a process may not use its session now (0: it may). */
typedef enum ab_session_verdict {
        AB_SESSION_OK = 0,
        AB_SESSION_NONE,          /* no session for this process yet */
        AB_SESSION_NEED_REAUTH,   /* reauth interval passed, or the executable changed */
        AB_SESSION_EXPIRED,       /* max_lifetime reached */
        AB_SESSION_IS_REVOKED,
} ab_session_verdict;

/*
 * The session bound to the process id (pid and start time), if any, and
 * whether it may be used now for agent a (current policy). ret may be
 * filled even when the verdict is not OK.
 */
ab_session_verdict ab_session_check(ab_store *st, const ab_identity *id, const ab_agent *a, int64_t now,
                                    ab_session *ret);

/*
 * Open a new session for the process (replacing whatever was bound to it),
 * or re-authenticate the existing one (same agent, same executable hash):
 * auth_time = now. Durable on return. *ret_new says which. -EPERM with
 * *ret set when the process's session is revoked, also a new one opened
 * before the host-wide revocation cut-off (stored revoked: *ret_new true).
 * A new session is refused with -EDQUOT once the store is 90% full, and
 * with -EUSERS from 75% when uid_holds_most (the caller's uid holds more
 * than half of the sessions): one user's processes leave the rest to
 * everyone else.
 */
int ab_session_authenticate(ab_store *st, const ab_identity *id, const ab_agent *a, int64_t now,
                            ab_session *ret, bool *ret_new, bool uid_holds_most);

/* Effective expiry and re-authentication deadline under the current policy (a may be NULL). */
int64_t ab_session_expires(const ab_session *s, const ab_agent *a);
int64_t ab_session_reauth_before(const ab_session *s, const ab_agent *a);

/* Session by id. 0, -ENOENT, AB_ERR_STORE. */
int ab_session_get(ab_store *st, const char *sid, ab_session *ret);

/* The session id inside a jti ("" result and -EINVAL if it is not one of ours). */
int ab_jti_sid(const char *jti, char sid[AB_SID_LEN + 1]);
/* A new jti for session sid. */
void ab_jti_new(const char *sid, char out[AB_TOKEN_JTI_LEN + 1]);

/* ---- revocation: each durable before it returns --------------------------- */

/*
 * Revoke one token (keep the entry until keep_until). reserve: the entry may
 * take room in the store's last tenth (the administrator's revocations);
 * else -EDQUOT when it would (see ab_txn_room_to_grow).
 */
int ab_revoke_jti(ab_store *st, const char *jti, int64_t keep_until, bool reserve);
/* Revoke a session; -ENOENT if unknown. */
int ab_revoke_session(ab_store *st, const char *sid, int64_t now);
/* Revoke every session of agent; *ret_n sessions were marked. 0, 1 (in force, but marking the
 * sessions failed: they are refused by the agent's mark), -errno. */
int ab_revoke_agent(ab_store *st, const char *agent, int64_t now, unsigned *ret_n);
/* Revoke every token issued and session opened before t. 0, 1 (as ab_revoke_agent), -errno. */
int ab_revoke_before(ab_store *st, int64_t t, int64_t now, unsigned *ret_n);

/* ---- introspection -------------------------------------------------------- */

typedef struct ab_introspect_req {
        const char *token;
        size_t token_len;
        const char *audience;  /* NULL: any */
        const char *scope;     /* NULL: none required */
        int64_t max_auth_age;  /* < 0: none; 0: authenticated within this second */
        const char *user;      /* NULL: no user check */
} ab_introspect_req;

typedef struct ab_introspect_res {
        bool active;
        const char *reason;    /* static string when !active */
        json_t *claims;        /* verified claims (new reference) when the signature verified */
        ab_session session;    /* valid when has_session */
        bool has_session;
} ab_introspect_res;

/*
 * Check a token as RFC 7662 introspection would: signature by one of our
 * keys, time, revocation (its jti, its ancestors, its session, the host
 * cut-off), session alive, audience, scope, auth age (the request's and
 * the grant's), user (the grant's users list, else the session's own
 * user). Caller frees res->claims with json_decref.
 */
int ab_introspect(ab_store *st, const ab_signer *signer, const ab_policy *policy, const ab_introspect_req *req,
                  int64_t now, ab_introspect_res *res);

/*
 * ab_introspect in three steps, so that the signature check can run on
 * another thread. ab_introspect_prepare parses the token and finds its key
 * (copied into sig): false when the verdict is already known (res is set,
 * nothing to free). Else ab_introspect_verify(sig) in any thread (it reads
 * req->token, which must stay), then ab_introspect_finish here, which
 * frees sig's parse and fills res as ab_introspect does.
 */
typedef struct ab_introspect_sig {
        ab_jwt jwt;
        const char *token;
        uint8_t pk[AB_JWT_PK_LEN];
        bool verified;
        bool foreign_iss; /* its iss is not this broker's */
} ab_introspect_sig;
bool ab_introspect_prepare(const ab_signer *signer, const ab_introspect_req *req, int64_t now,
                           ab_introspect_sig *sig, ab_introspect_res *res);
void ab_introspect_verify(ab_introspect_sig *sig);
int ab_introspect_finish(ab_store *st, const ab_policy *policy, const ab_introspect_req *req, int64_t now,
                         ab_introspect_sig *sig, ab_introspect_res *res);

/* Whether the space-separated scope list holds want (whole words only). */
bool ab_scope_list_has(const char *scope, const char *want);

/*
 * Whether the policy in force still grants agent a a token with claims
 * (its "grant" claim naming the grant that issued it), narrowed to aud and
 * scope (space-separated): the grant it names, or (that one gone) any
 * grant of a that covers it.
 */
bool ab_token_granted(const ab_agent *a, json_t *claims, const char *aud, const char *scope);

/* ---- PAM sessions ---------------------------------------------------------- */

int ab_pam_open(ab_store *st, const char *sid, const char *jti, const char *service, const char *user,
                const char *tty, const char *rhost, uid_t opener, int64_t now, char id[AB_PAM_ID_LEN + 1]);
/* Close by id: 1 if it was open, 0 if unknown or closed. -EPERM if opened by another uid (root may). */
int ab_pam_close(ab_store *st, const char *id, uid_t caller);

/* ---- listing and housekeeping ---------------------------------------------- */

#define AB_LIST_BUDGET (56 * 1024)      /* bytes of sessions per ListSessions reply */
#define AB_LIST_PAM_BUDGET (24 * 1024)  /* bytes of PAM records per session in it */
#define AB_PAM_PER_SESSION_MAX 256      /* open PAM sessions per agent session */

/*
 * One page of sessions as JSON objects (filtered by agent and/or uid when
 * given), with their open PAM sessions, in sid order starting after the
 * sid `after` (NULL: from the start), at most AB_LIST_BUDGET bytes of
 * JSON. A session's PAM records beyond AB_LIST_PAM_BUDGET bytes are left
 * out and counted in its "pam_omitted". *ret_next is the sid to pass as
 * `after` for the next page, or "" when this page is the last.
 */
int ab_session_list(ab_store *st, const ab_policy *policy, const char *agent, const uid_t *uid, int64_t now,
                    const char *after, json_t **ret, char ret_next[AB_SID_LEN + 1]);
json_t *ab_session_json(const ab_session *s, const ab_agent *a, int64_t now);

/*
 * Drop expired sessions and stale revocation entries. *ret_n: records
 * dropped. A revoked session whose process is still running (running(pid,
 * start_time) says so; NULL: none is) is kept past its expiry, so that the
 * process stays refused instead of getting a new session. At most
 * PURGE_PASS_MAX keys a call: *ret_more says there are more to drop.
 */
/* fn(ud, uid) for each session record in the store (expired ones too, until purged). */
int ab_session_count_uids(ab_store *st, void (*fn)(void *ud, uint32_t uid), void *ud);

int ab_session_purge(ab_store *st, int64_t now, bool (*running)(pid_t pid, uint64_t start_time), unsigned *ret_n,
                     bool *ret_more);

#endif
