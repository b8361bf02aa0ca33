/* SPDX-License-Identifier: MIT */
/*
 * agentbroker.h: the client library for agent-brokerd.
 *
 * An agent asks the local broker for a short-lived token naming one
 * audience and some scopes:
 *
 *     ab_client *c = NULL;
 *     char *token = NULL;
 *     const char *scopes[] = { "repo:read" };
 *     int r = ab_client_connect(NULL, 0, &c);     // $AGENT_BROKER_SOCKET or default
 *     if (r == 0)
 *             r = ab_issue_token(c, "mcp://git.internal", scopes, 1, 0, NULL, &token);
 *     if (r < 0)
 *             fprintf(stderr, "%s%s%s\n", ab_strerror(r), *ab_client_error_message(c) ? ": " : "",
 *                     ab_client_error_message(c));
 *     ...
 *     ab_token_free(token);
 *     ab_client_free(c);
 *
 * Conventions: every fallible function returns 0 or a negative AB_ERR_*
 * code (or -errno) and leaves its ret_* arguments untouched on failure.
 * The library never logs, never exits and has no global state; one handle
 * must not be used by two threads at once, separate handles are
 * independent. All sockets are O_CLOEXEC.
 */
#ifndef AGENTBROKER_H
#define AGENTBROKER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AGENTBROKER_VERSION "0.1.0"
#define AB_DEFAULT_SOCKET "/run/agent-broker/io.agentbroker"
#define AB_DEFAULT_ADMIN_SOCKET "/run/agent-broker/io.agentbroker.admin"
#define AB_MAX_MESSAGE (64 * 1024) /* largest varlink message, without the NUL */

/* Error codes. Negative errno values (-ENOMEM, -EINVAL, ...) may appear too. */
enum {
        AB_OK = 0,
        AB_ERR_DENIED = -1000,   /* the broker decided no (see error name) */
        AB_ERR_UNREACHABLE = -1001, /* no broker on the socket */
        AB_ERR_TIMEOUT = -1002,  /* no complete reply within the timeout */
        AB_ERR_PROTOCOL = -1003, /* malformed or oversized message */
        AB_ERR_REMOTE = -1004,   /* the broker answered with an error that is not a denial */
        AB_ERR_INVALID = -1005,  /* bad argument or input */
        AB_ERR_TOO_LARGE = -1006, /* input over its size limit */
        AB_ERR_CRYPTO = -1007,   /* signature or key failure */
        AB_ERR_STORE = -1008,    /* persistent storage failure */
        AB_ERR_POLICY = -1009,   /* policy does not parse or validate */
        AB_ERR_CLOSED = -1010,   /* peer closed the connection */
};

/* A static English description of an AB_ERR_* code or negative errno. */
const char *ab_strerror(int code);

typedef struct ab_client ab_client;

/*
 * Connect to the broker. path NULL means $AGENT_BROKER_SOCKET, else
 * AB_DEFAULT_SOCKET. timeout_ms bounds connect and each call (0: 5000).
 * Returns 0, AB_ERR_UNREACHABLE (also when the broker's listen queue stays
 * full for the timeout), AB_ERR_INVALID (path too long), -ENOMEM.
 */
int ab_client_connect(const char *path, int timeout_ms, ab_client **ret);

/*
 * Bound each later call on c by timeout_ms (> 0) instead of the value
 * given to ab_client_connect. Returns 0 or AB_ERR_INVALID.
 */
int ab_client_set_timeout(ab_client *c, int timeout_ms);

/* Close the connection and free the handle. Accepts NULL. */
void ab_client_free(ab_client *c);

/*
 * Call a varlink method. params_json is a JSON object ("{}" if NULL).
 * On success *ret_reply is the reply's "parameters" object as JSON text
 * (free with ab_token_free or free()). When the broker answers with an
 * error, returns AB_ERR_DENIED for a decision (NotAnAgent, ...NotGranted,
 * TtlTooLong, ReauthRequired, SessionExpired, SessionRevoked, InvalidToken,
 * DelegationTooDeep, PermissionDenied, NoSuchSession, NoSuchAgent,
 * PolicyRejected) or AB_ERR_REMOTE for any other error (RateLimited,
 * TooManyConnections, AuditUnavailable, PeerGone, InternalError: worth a
 * retry; LimitReached: see docs/clients.md; InvalidParameter and the like:
 * a bug), and
 * ab_client_error_name()/ab_client_error_message() say which. Other
 * returns: AB_ERR_TIMEOUT, AB_ERR_CLOSED, AB_ERR_PROTOCOL, AB_ERR_INVALID
 * (params not an object), AB_ERR_TOO_LARGE (a call over 64 KiB), -ENOMEM,
 * -errno.
 * After a transport failure the handle is unusable; reconnect.
 */
int ab_client_call(ab_client *c, const char *method, const char *params_json,
                   char **ret_reply);

/*
 * Ask for a token: audience, n_scopes scopes, ttl seconds (0: the broker's
 * default), task (NULL: none). *ret_token is the compact JWS; free it
 * with ab_token_free(), which wipes it. Returns as ab_client_call().
 */
int ab_issue_token(ab_client *c, const char *audience, const char *const *scopes,
                   size_t n_scopes, unsigned ttl, const char *task, char **ret_token);

/* The broker's JSON Web Key Set as JSON text ({"keys":[...]}). */
int ab_get_keys(ab_client *c, char **ret_jwks);

/* Wipe and free a string returned by this library. Accepts NULL. */
void ab_token_free(char *s);

/*
 * The varlink error name and the broker's reason for the last failed call
 * on this handle ("" when there is none, or when the call failed without
 * an answer from the broker: then ab_strerror() of its code says it).
 * Valid until the next call on the handle.
 * A failed ab_client_connect leaves no handle: c is NULL, both say "", and
 * ab_strerror() of its code is the whole story.
 */
const char *ab_client_error_name(const ab_client *c);
const char *ab_client_error_message(const ab_client *c);

#ifdef __cplusplus
}
#endif
#endif
