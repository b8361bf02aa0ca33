/* SPDX-License-Identifier: MIT */
/* libagentbroker: a blocking varlink client for agent-brokerd. Never logs. */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <sodium.h>
#include "agentbroker.h"
#include "client-internal.h"
#include "../common/frame.h"
#include "../common/jwt.h"
#include "../common/util.h"
#include "../common/varlink.h"

#define DEFAULT_TIMEOUT_MS 5000

struct ab_client {
        int fd;
        int timeout_ms;
        bool broken;
        bool used;            /* a call has been answered on it */
        ab_frame in;
        char error_name[256];
        char error_message[512];
        json_t *error_params; /* the last error reply's parameters, or NULL */
};

#define AB_EXPORT __attribute__((visibility("default")))

static int64_t mono_ms(void)
{
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait for events on fd until deadline (ms, monotonic). 0, AB_ERR_TIMEOUT, -errno. */
static int wait_fd(int fd, short events, int64_t deadline)
{
        for (;;) {
                struct pollfd p = { .fd = fd, .events = events };
                int64_t left = deadline - mono_ms();
                int r;
                if (left <= 0)
                        return AB_ERR_TIMEOUT;
                r = poll(&p, 1, left > 60000 ? 60000 : (int)left);
                if (r < 0 && errno == EINTR)
                        continue;
                if (r < 0)
                        return -errno;
                if (r > 0)
                        return 0;
        }
}

static void set_error(ab_client *c, const char *name, const char *msg)
{
        json_decref(c->error_params);
        c->error_params = NULL;
        snprintf(c->error_name, sizeof c->error_name, "%s", name ? name : "");
        snprintf(c->error_message, sizeof c->error_message, "%s", msg ? msg : "");
}

AB_EXPORT int ab_client_connect(const char *path, int timeout_ms, ab_client **ret)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        ab_client *c;
        int64_t deadline;
        int r;

        if (!ret)
                return AB_ERR_INVALID;
        if (!path || !*path)
                path = secure_getenv("AGENT_BROKER_SOCKET");
        if (!path || !*path)
                path = AB_DEFAULT_SOCKET;
        if (strlen(path) >= sizeof sa.sun_path)
                return AB_ERR_INVALID;
        memcpy(sa.sun_path, path, strlen(path) + 1);
        if (timeout_ms <= 0)
                timeout_ms = DEFAULT_TIMEOUT_MS;

        c = calloc(1, sizeof *c);
        if (!c)
                return -ENOMEM;
        c->timeout_ms = timeout_ms;
        ab_frame_init(&c->in, AB_MAX_MESSAGE);
        c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (c->fd < 0) {
                r = -errno;
                goto fail;
        }
        deadline = mono_ms() + timeout_ms;
        while (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
                int err = 0;
                socklen_t len = sizeof err;
                if (errno == EAGAIN) {
                        /* the broker's listen queue is full and nothing is
                         * connected: try again every 10 ms until the timeout */
                        int64_t left = deadline - mono_ms();
                        if (left <= 0) {
                                r = AB_ERR_UNREACHABLE;
                                goto fail;
                        }
                        poll(NULL, 0, left < 10 ? (int)left : 10);
                        continue;
                }
                if (errno != EINPROGRESS) {
                        r = AB_ERR_UNREACHABLE;
                        goto fail;
                }
                r = wait_fd(c->fd, POLLOUT, deadline);
                if (r < 0)
                        goto fail;
                if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
                        r = AB_ERR_UNREACHABLE;
                        goto fail;
                }
                break;
        }
        *ret = c;
        return 0;
fail:
        ab_client_free(c);
        return r;
}

AB_EXPORT int ab_client_set_timeout(ab_client *c, int timeout_ms)
{
        if (!c || timeout_ms <= 0)
                return AB_ERR_INVALID;
        c->timeout_ms = timeout_ms;
        return 0;
}

AB_EXPORT void ab_client_free(ab_client *c)
{
        if (!c)
                return;
        ab_close(c->fd);
        if (c->in.buf)
                sodium_memzero(c->in.buf, c->in.cap); /* replies may hold tokens */
        ab_frame_free(&c->in);
        json_decref(c->error_params);
        free(c);
}

static int send_all(ab_client *c, const char *buf, size_t len, int64_t deadline)
{
        while (len > 0) {
                ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN) {
                                int r = wait_fd(c->fd, POLLOUT, deadline);
                                if (r < 0)
                                        return r;
                                continue;
                        }
                        return errno == EPIPE || errno == ECONNRESET ? AB_ERR_CLOSED : -errno;
                }
                buf += n;
                len -= (size_t)n;
        }
        return 0;
}

static int recv_message(ab_client *c, const char **ret_msg, size_t *ret_len, int64_t deadline)
{
        for (;;) {
                char *p;
                size_t avail;
                ssize_t n;
                int r = ab_frame_next(&c->in, ret_msg, ret_len);
                if (r == 1)
                        return 0;
                if (r < 0)
                        return AB_ERR_PROTOCOL;
                r = ab_frame_space(&c->in, &p, &avail);
                if (r < 0)
                        return AB_ERR_PROTOCOL;
                n = recv(c->fd, p, avail, MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN) {
                                r = wait_fd(c->fd, POLLIN, deadline);
                                if (r < 0)
                                        return r;
                                continue;
                        }
                        return errno == ECONNRESET ? AB_ERR_CLOSED : -errno;
                }
                if (n == 0)
                        return AB_ERR_CLOSED;
                ab_frame_commit(&c->in, (size_t)n);
        }
}

/*
 * Is the error name a decision of the broker (policy, session, token,
 * unknown name)? The others (its limits, its audit trail failing, a bad
 * request, an internal error) are AB_ERR_REMOTE: a client may retry those
 * that say so in docs/clients.md, never a denial.
 */
static bool is_denial(const char *err)
{
        static const char *const denials[] = {
                "NotAnAgent",        "AudienceNotGranted", "ScopeNotGranted", "TtlTooLong",    "ReauthRequired",
                "SessionExpired",    "SessionRevoked",     "InvalidToken",    "DelegationTooDeep",
                "PermissionDenied",  "NoSuchSession",      "NoSuchAgent",     "PolicyRejected",
        };
        const char *name = strrchr(err, '.');

        if (strncmp(err, "io.agentbroker.", 15) != 0 || !name)
                return false;
        for (size_t i = 0; i < sizeof denials / sizeof denials[0]; i++)
                if (strcmp(name + 1, denials[i]) == 0)
                        return true;
        return false;
}

/*
 * Send the call msg[0..len) (len counts its NUL; the caller owns, wipes
 * and frees msg) and read the reply; on success *ret_params is a new
 * reference.
 */
static int call_message(ab_client *c, const char *msg, size_t len, json_t **ret_params)
{
        json_t *reply = NULL, *reason;
        char *err = NULL;
        const char *in;
        size_t inlen = 0;
        int64_t deadline;
        int r;

        set_error(c, NULL, NULL);
        if (c->broken) {
                set_error(c, NULL, "the connection failed earlier; reconnect");
                return AB_ERR_CLOSED;
        }
        if (len - 1 > AB_MAX_MESSAGE)
                return AB_ERR_TOO_LARGE;
        if (c->used) {
                /* Between calls the broker sends nothing: bytes waiting now answer no call of
                 * ours, and would be taken for this one's reply. (On a new connection they may
                 * be the broker's refusal, which is read as the reply below.) */
                char b;
                ssize_t n = recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
                if (n > 0) {
                        c->broken = true;
                        return AB_ERR_PROTOCOL;
                }
        }
        deadline = mono_ms() + c->timeout_ms;
        r = send_all(c, msg, len, deadline);
        /* a broker that refuses us (rate limit, too many connections)
         * writes its reason and closes: read it even if our send failed */
        if (r == 0 || r == AB_ERR_CLOSED) {
                int k = recv_message(c, &in, &inlen, deadline);
                if (r == 0 || k == 0)
                        r = k;
        }
        /* one call, one reply: bytes after it are none of this call's */
        if (r == 0 && (ab_frame_pending(&c->in) > 0 || ab_vl_parse_reply(in, inlen, &reply, &err) < 0))
                r = AB_ERR_PROTOCOL;
        if (r < 0) {
                c->broken = true; /* ab_strerror(r) says it all: no name, no message */
                return r;
        }
        c->used = true;
        if (err) {
                reason = json_object_get(reply, "reason");
                set_error(c, err, json_is_string(reason) ? json_string_value(reason) : "");
                r = is_denial(err) ? AB_ERR_DENIED : AB_ERR_REMOTE;
                free(err);
                c->error_params = reply; /* reasons, names and findings, never a token: see ab_client_error_parameters() */
                return r;
        }
        *ret_params = reply;
        return 0;
}

/* Call with already-built params (stolen); on success *ret_params is a new reference. */
static int call_json(ab_client *c, const char *method, json_t *params, json_t **ret_params)
{
        char *msg = NULL;
        size_t len = 0;
        int r;

        set_error(c, NULL, NULL);
        if (c->broken) {
                json_decref(params);
                set_error(c, NULL, "the connection failed earlier; reconnect");
                return AB_ERR_CLOSED;
        }
        r = ab_vl_encode_call(method, params, &msg, &len);
        if (r < 0)
                return r;
        r = call_message(c, msg, len, ret_params);
        sodium_memzero(msg, len); /* requests may hold tokens */
        free(msg);
        return r;
}

/* Appends n bytes of s to buf[0..max) at *len, or false when they do not fit. */
static bool put(char *buf, size_t max, size_t *len, const char *s, size_t n)
{
        if (n > max - *len)
                return false;
        memcpy(buf + *len, s, n);
        *len += n;
        return true;
}

#define PUT(s) put(buf, max, &len, s, sizeof(s) - 1)

int ab_encode_token_call(const char *method, const char *token, const json_t *params, char *buf, size_t max,
                         size_t *ret_len)
{
        size_t len = 0, tlen = 0, n;

        if (!method || !ab_vl_valid_qualified_name(method) || !buf || !ret_len ||
            (params && (!json_is_object(params) || json_object_get(params, "token"))))
                return AB_ERR_INVALID;
        if (token) {
                tlen = strnlen(token, AB_JWT_MAX + 1);
                if (tlen == 0)
                        return AB_ERR_INVALID;
                if (tlen > AB_JWT_MAX)
                        return AB_ERR_TOO_LARGE;
                for (size_t i = 0; i < tlen; i++) {
                        unsigned char ch = (unsigned char)token[i];
                        if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
                              ch == '-' || ch == '_' || ch == '.'))
                                return AB_ERR_INVALID; /* nothing that JSON would need escaped */
                }
        }
        /* a qualified name is [A-Za-z0-9.-]: no escaping either */
        if (!PUT("{\"method\":\"") || !put(buf, max, &len, method, strlen(method)) || !PUT("\",\"parameters\":"))
                return AB_ERR_TOO_LARGE;
        if (token && (!PUT("{\"token\":\"") || !put(buf, max, &len, token, tlen) || !PUT("\"")))
                return AB_ERR_TOO_LARGE;
        if (params) {
                /* "{...}" written in place, then joined to the token's object */
                n = ab_json_dumpb(params, buf + len, max - len);
                if (n < 2)
                        return AB_ERR_INVALID;
                if (n > max - len)
                        return AB_ERR_TOO_LARGE;
                if (token && n == 2) {
                        buf[len] = '}'; /* "{}": the token's object just ends */
                        n = 1;
                } else if (token)
                        buf[len] = ','; /* "{...}": its members follow the token */
                len += n;
        } else if (!(token ? PUT("}") : PUT("{}")))
                return AB_ERR_TOO_LARGE;
        if (!PUT("}") || !put(buf, max, &len, "", 1) || len - 1 > AB_MAX_MESSAGE)
                return AB_ERR_TOO_LARGE;
        *ret_len = len;
        return 0;
}

#undef PUT

int ab_client_call_token(ab_client *c, const char *method, const char *token, const json_t *params,
                         json_t **ret_params)
{
        const size_t max = AB_MAX_MESSAGE + 1;
        char *buf;
        size_t len = 0;
        int r;

        if (!c || !ret_params)
                return AB_ERR_INVALID;
        buf = malloc(max); /* never grown: realloc would leave a copy behind */
        if (!buf)
                return -ENOMEM;
        r = ab_encode_token_call(method, token, params, buf, max, &len);
        if (r == 0)
                r = call_message(c, buf, len, ret_params);
        else
                set_error(c, NULL, NULL);
        sodium_memzero(buf, max); /* all of it: a failed encoding may have written past len */
        free(buf);
        return r;
}

static int dump(json_t *v, char **ret)
{
        char *s = json_dumps(v, JSON_COMPACT);
        json_decref(v);
        if (!s)
                return -ENOMEM;
        *ret = s;
        return 0;
}

AB_EXPORT int ab_client_call(ab_client *c, const char *method, const char *params_json, char **ret_reply)
{
        json_t *params = NULL, *reply = NULL;
        int r;

        if (c)
                set_error(c, NULL, NULL); /* no error of an earlier call stays */
        if (!c || !method || !ret_reply || !ab_vl_valid_qualified_name(method))
                return AB_ERR_INVALID;
        if (params_json) {
                params = json_loads(params_json, JSON_REJECT_DUPLICATES, NULL);
                if (!json_is_object(params)) {
                        json_decref(params);
                        return AB_ERR_INVALID;
                }
        }
        r = call_json(c, method, params, &reply);
        if (r < 0)
                return r;
        return dump(reply, ret_reply);
}

AB_EXPORT int ab_issue_token(ab_client *c, const char *audience, const char *const *scopes, size_t n_scopes,
                             unsigned ttl, const char *task, char **ret_token)
{
        json_t *params, *arr, *reply = NULL, *tok;
        char *s;
        int r;

        if (c)
                set_error(c, NULL, NULL);
        if (!c || !audience || (!scopes && n_scopes) || !ret_token)
                return AB_ERR_INVALID;
        arr = json_array();
        params = json_object();
        if (!arr || !params) {
                json_decref(arr);
                json_decref(params);
                return -ENOMEM;
        }
        for (size_t i = 0; i < n_scopes; i++)
                if (!scopes[i] || json_array_append_new(arr, json_string(scopes[i])) < 0) {
                        json_decref(arr);
                        json_decref(params);
                        return AB_ERR_INVALID;
                }
        if (json_object_set_new(params, "audience", json_string(audience)) < 0 ||
            json_object_set_new(params, "scopes", arr) < 0 ||
            (ttl && json_object_set_new(params, "ttl", json_integer(ttl)) < 0) ||
            (task && json_object_set_new(params, "task", json_string(task)) < 0)) {
                json_decref(params);
                return AB_ERR_INVALID;
        }
        r = call_json(c, "io.agentbroker.IssueToken", params, &reply);
        if (r < 0)
                return r;
        tok = json_object_get(reply, "token");
        if (!json_is_string(tok)) {
                json_decref(reply);
                return AB_ERR_PROTOCOL;
        }
        s = strdup(json_string_value(tok));
        json_decref(reply);
        if (!s)
                return -ENOMEM;
        *ret_token = s;
        return 0;
}

AB_EXPORT int ab_get_keys(ab_client *c, char **ret_jwks)
{
        json_t *reply = NULL;
        int r;

        if (c)
                set_error(c, NULL, NULL); /* no error of an earlier call stays */
        if (!c || !ret_jwks)
                return AB_ERR_INVALID;
        r = call_json(c, "io.agentbroker.GetKeys", NULL, &reply);
        if (r < 0)
                return r;
        return dump(reply, ret_jwks);
}

AB_EXPORT void ab_token_free(char *s)
{
        if (!s)
                return;
        sodium_memzero(s, strlen(s));
        free(s);
}

AB_EXPORT const char *ab_client_error_name(const ab_client *c)
{
        return c ? c->error_name : "";
}

AB_EXPORT const char *ab_client_error_message(const ab_client *c)
{
        return c ? c->error_message : "";
}

const json_t *ab_client_error_parameters(const ab_client *c)
{
        return c ? c->error_params : NULL;
}

