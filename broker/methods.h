/* SPDX-License-Identifier: MIT */
/* Helpers shared by the varlink method files (methods.c, methods-session.c). */
#ifndef AB_METHODS_H
#define AB_METHODS_H

#include <stdbool.h>
#include <stddef.h>
#include <jansson.h>
#include "manager.h"
#include "session.h"

#define AB_AUDIENCE_MAX 256
#define AB_TASK_MAX 128
#define AB_REQ_MAX_SCOPES 64
#define AB_SERVICE_MAX 128
#define AB_USER_MAX 256

/* P_TOKEN: any string (its bytes are judged by the method, bounded by the message size) */
typedef enum { P_STRING, P_INT, P_STRINGS, P_BOOL, P_TOKEN } ptype;

typedef struct param_spec {
        const char *name;
        ptype type;
        bool required;
        size_t max;          /* string bytes, or array items */
        long long min, imax; /* for P_INT */
} param_spec;

/* Check params against spec; on failure reply InvalidParameter and return -1. */
int ab_check_params(ab_conn *c, json_t *params, const param_spec *spec);
int ab_invalid_param(ab_conn *c, const char *name, const char *reason);

/* Attest the caller and find its agent entry. On failure replies and returns NULL. */
const ab_agent *ab_attest_agent(ab_conn *c, ab_identity *id);
/* The same; a refusal is also recorded as deny_event (with deny_fields, borrowed) when not NULL. */
const ab_agent *ab_attest_agent_audited(ab_conn *c, ab_identity *id, const char *deny_event, json_t *deny_fields);
/* An audit record with the caller's identity (id may be NULL: peer credentials only) and agent. */
json_t *ab_audit_rec(ab_conn *c, const char *decision, const char *reason, const ab_identity *id,
                     const ab_agent *a);
/*
 * Count an issued token in the usage counters (flushed to LMDB in batches):
 * scopes[i] was granted through the wildcard wild[i] (NULL: by name).
 */
void ab_usage_note(ab_manager *m, const char *agent, const char *audience, const char *const *scopes,
                   const char *const *wild, size_t n, int64_t now);

/* Attest the caller only. On failure replies PeerGone and returns -1. */
int ab_attest_peer(ab_conn *c, ab_identity *id);

/* Wall-clock seconds as the broker sees them. */
int64_t ab_manager_now(const ab_manager *m);
/* The store is full: purge expired sessions now, unless a purge ran in the last 30 s. */
void ab_manager_purge_soon(ab_manager *m);
/* Whether uid holds more than half of the sessions in the store; one more session of uid. */
bool ab_manager_uid_holds_most(const ab_manager *m, uid_t uid);
void ab_manager_session_opened(ab_manager *m, uid_t uid);

/* Session methods (methods-session.c). */
void ab_m_authenticate(ab_conn *c, ab_vl_call *call);
void ab_m_introspect(ab_conn *c, ab_vl_call *call);
void ab_m_attenuate(ab_conn *c, ab_vl_call *call);
void ab_m_revoke(ab_conn *c, ab_vl_call *call);
void ab_m_admin_revoke(ab_conn *c, ab_vl_call *call);
void ab_m_list_sessions(ab_conn *c, ab_vl_call *call);
void ab_m_admin_list_sessions(ab_conn *c, ab_vl_call *call);
void ab_m_open_pam_session(ab_conn *c, ab_vl_call *call);
void ab_m_close_pam_session(ab_conn *c, ab_vl_call *call);

/*
 * The caller's session, opened on first use. On any refusal (reauth,
 * expired, revoked, store failure) replies and returns -1.
 */
int ab_session_for_request(ab_conn *c, const ab_identity *id, const ab_agent *a, ab_session *ret,
                           json_t *deny_fields);

/* Reply fields shared by IssueToken and Attenuate. */
json_t *ab_token_reply(const char *token, size_t len, int64_t now, int64_t exp, const char *jti,
                       const char *scope, const char *agent);

#endif
