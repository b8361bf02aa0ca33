/* SPDX-License-Identifier: MIT */
/*
 * pam_agent_broker.so: PAM services accept agent-broker tokens.
 *
 * Thin by design: the module reads its arguments, asks the broker
 * (Introspect, OpenPamSession, ClosePamSession over the agent socket) and
 * maps the answer to a PAM code. Every decision, and the audit record of
 * it, is the broker's. The module keeps no global state, installs no signal
 * handler, never exits, opens its socket O_CLOEXEC and closes it before
 * returning, and wipes every copy of the token it makes. The token never
 * passes through jansson, whose copies are freed unwiped: the client
 * library writes it into the request text in a buffer of its own, wiped
 * after sending (ab_client_call_token), and the replies carry claims, not
 * the token.
 *
 * Between the stages of one PAM handle the accepted token and the PAM
 * session id travel as pam_set_data() items, wiped when libpam drops them.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <jansson.h>
#include <sodium.h>
#include <security/pam_ext.h>
#include <security/pam_modules.h>
#include "../client/agentbroker.h"
#include "../client/client-internal.h"
#include "../common/jwt.h"
#include "args.h"

#define DATA_TOKEN "pam_agent_broker:token"
#define DATA_PAM_ID "pam_agent_broker:pam_session"
#define DATA_PAM_STALE "pam_agent_broker:pam_session_stale" /* an earlier token's record not yet closed */
#define DATA_CHECK "pam_agent_broker:check" /* the audience, scope and max_auth_age auth accepted the token for */
#define ENV_PAM_ID "AGENT_BROKER_PAM_SESSION"
#define ENV_JTI "AGENT_BROKER_JTI"
#define PROMPT "Agent token: "
#define REAUTH_MESSAGE "re-authentication required: authenticate at agent-broker, then retry"
#define ITEM_MAX 256   /* the broker's limit for a PAM user, tty, rhost */
#define SERVICE_MAX 123 /* "pam:" + service within the broker's 128 */

#define M_INTROSPECT "io.agentbroker.Introspect"
#define M_OPEN "io.agentbroker.OpenPamSession"
#define M_CLOSE "io.agentbroker.ClosePamSession"

typedef struct ctx {
        pam_handle_t *pamh;
        ab_pam_args args;
        const char *service;
        char audience[AB_PAM_AUDIENCE_MAX + 1];
        char asking[SERVICE_MAX + 5]; /* "pam:" SERVICE, for the broker's audit record */
        char reason[64];     /* Introspect's reason when inactive */
        char error[128];     /* varlink error name of a failed call */
        char agent[128];     /* client_id of an active token, for the log */
        char jti[64];
} ctx;

static void warn_arg(void *userdata, const char *arg, const char *why)
{
        pam_syslog(userdata, LOG_WARNING, "ignoring argument \"%.80s\": %s", arg, why);
}

/* A string fit to send: non-empty, at most max bytes, printable ASCII. */
static bool sane(const char *s, size_t max)
{
        size_t n;
        if (!s)
                return false;
        n = strnlen(s, max + 1);
        if (n == 0 || n > max)
                return false;
        for (size_t i = 0; i < n; i++)
                if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] >= 0x7f)
                        return false; /* printable ASCII only: what the broker accepts */
        return true;
}

/*
 * A user name for the log: sshd passes any name a client sends, so only
 * [A-Za-z0-9._@+-] is shown as is, every other byte as \xNN (no space or
 * bracket can make a name look like more of the line), at most 64 bytes.
 */
typedef struct shown_name {
        char s[64 * 4 + 4];
} shown_name;

static const char *shown(shown_name *b, const char *name)
{
        size_t o = 0, i;

        for (i = 0; name && name[i] && i < 64; i++) {
                unsigned char ch = (unsigned char)name[i];
                if ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '.' ||
                    ch == '_' || ch == '@' || ch == '+' || ch == '-')
                        b->s[o++] = (char)ch;
                else
                        o += (size_t)snprintf(b->s + o, sizeof b->s - o, "\\x%02x", ch);
        }
        if (name && name[i])
                o += (size_t)snprintf(b->s + o, sizeof b->s - o, "...");
        b->s[o] = '\0';
        return b->s;
}

/* Drop a PAM environment variable if it is set (libpam logs an error for one that is not). */
static void unset_env(pam_handle_t *pamh, const char *name)
{
        if (pam_getenv(pamh, name))
                (void)pam_putenv(pamh, name);
}

/* Arguments and service: PAM_SUCCESS or PAM_SERVICE_ERR. */
static int ctx_init(ctx *x, pam_handle_t *pamh, int argc, const char **argv)
{
        const void *item = NULL;
        int n;

        memset(x, 0, sizeof *x);
        x->pamh = pamh;
        ab_pam_args_parse(argc, argv, &x->args, warn_arg, pamh);
        if (pam_get_item(pamh, PAM_SERVICE, &item) != PAM_SUCCESS || !sane(item, SERVICE_MAX)) {
                pam_syslog(pamh, LOG_ERR, "no usable PAM service name");
                return PAM_SERVICE_ERR;
        }
        x->service = item;
        snprintf(x->asking, sizeof x->asking, "pam:%s", x->service);
        if (x->args.audience[0])
                memcpy(x->audience, x->args.audience, sizeof x->audience);
        else {
                n = snprintf(x->audience, sizeof x->audience, "pam:%s", x->service);
                if (n < 0 || (size_t)n >= sizeof x->audience)
                        return PAM_SERVICE_ERR;
        }
        return PAM_SUCCESS;
}

/*
 * Plainly a broker token: a compact JWS no longer than the broker issues,
 * three non-empty base64url segments, the header a JSON object ("eyJ").
 * Anything else (a password, garbage, a megabyte) is not sent anywhere.
 */
static bool looks_like_token(const char *t)
{
        size_t n = 0, dots = 0, seg = 0;

        if (!t || strncmp(t, "eyJ", 3) != 0)
                return false;
        for (; t[n]; n++) {
                unsigned char ch = (unsigned char)t[n];
                if (n >= AB_JWT_MAX)
                        return false;
                if (ch == '.') {
                        if (seg == 0 || ++dots > 2)
                                return false;
                        seg = 0;
                        continue;
                }
                if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
                      ch == '-' || ch == '_'))
                        return false;
                seg++;
        }
        return dots == 2 && seg > 0;
}

static void wipe_cleanup(pam_handle_t *pamh, void *data, int status)
{
        (void)pamh;
        (void)status;
        if (data) {
                sodium_memzero(data, strlen(data));
                free(data);
        }
}

/*
 * One call to the broker, bounded as a whole (connect and reply) by
 * timeout_ms: the parameters are token (NULL: none) and params (stolen,
 * never holding the token). 0 with *ret_reply (a new reference), or a
 * negative AB_ERR_* code with x->error naming the varlink error if there
 * was one. The library wipes the buffer that held the request.
 */
static int broker_call(ctx *x, const char *method, const char *token, json_t *params, json_t **ret_reply)
{
        const char *path = x->args.socket[0] ? x->args.socket : AB_DEFAULT_SOCKET;
        ab_client *c = NULL;
        json_t *reply = NULL;
        struct timespec t0, t1;
        long long left;
        int r;

        x->error[0] = 0;
        if (!params)
                return -ENOMEM;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        r = ab_client_connect(path, x->args.timeout_ms, &c);
        if (r == 0) {
                clock_gettime(CLOCK_MONOTONIC, &t1);
                left = x->args.timeout_ms - ((long long)(t1.tv_sec - t0.tv_sec) * 1000 +
                                             (t1.tv_nsec - t0.tv_nsec) / 1000000);
                r = left > 0 ? ab_client_set_timeout(c, (int)left) : AB_ERR_TIMEOUT;
        }
        if (r == 0)
                r = ab_client_call_token(c, method, token, params, &reply);
        json_decref(params);
        if (r < 0)
                snprintf(x->error, sizeof x->error, "%s", ab_client_error_name(c));
        ab_client_free(c);
        if (r < 0)
                return r;
        *ret_reply = reply;
        return 0;
}

/* A failed call: the broker could not be asked (fail closed), or it refused the request itself. */
static bool call_unavailable(const ctx *x, int r)
{
        if (r == AB_ERR_DENIED) /* a decision on the token or its session */
                return false;
        if (r == AB_ERR_REMOTE) /* its limits (RateLimited, TooManyConnections), its audit trail, a failure */
                return strcmp(x->error, "io.agentbroker.InvalidParameter") != 0;
        return true;
}

static void log_call_failure(const ctx *x, const char *what, int r)
{
        pam_syslog(x->pamh, LOG_ERR, "%s: broker at %s: %s%s%s", what,
                   x->args.socket[0] ? x->args.socket : AB_DEFAULT_SOCKET, ab_strerror(r), x->error[0] ? ": " : "",
                   x->error);
}

/*
 * Introspect token for this service and user. 1 active, 0 inactive
 * (x->reason says why), or a negative AB_ERR_* code.
 */
static int introspect(ctx *x, const char *token, const char *user)
{
        json_t *params, *reply = NULL, *v;
        int r;

        params = json_pack("{s:s, s:s, s:s, s:s}", "audience", x->audience, "scope", x->args.scope, "user", user,
                           "service", x->asking);
        if (params && x->args.max_auth_age > 0 &&
            json_object_set_new(params, "max_auth_age", json_integer(x->args.max_auth_age)) < 0) {
                json_decref(params);
                params = NULL;
        }
        r = broker_call(x, M_INTROSPECT, token, params, &reply);
        if (r < 0)
                return r;
        v = json_object_get(reply, "active");
        if (!json_is_boolean(v)) {
                json_decref(reply);
                return AB_ERR_PROTOCOL;
        }
        r = json_is_true(v) ? 1 : 0;
        if (r) {
                snprintf(x->agent, sizeof x->agent, "%s", json_string_value(json_object_get(reply, "client_id")) ?: "?");
                snprintf(x->jti, sizeof x->jti, "%s", json_string_value(json_object_get(reply, "jti")) ?: "?");
        } else
                snprintf(x->reason, sizeof x->reason, "%s",
                         json_string_value(json_object_get(reply, "reason")) ?: "unknown");
        json_decref(reply);
        return r;
}

typedef struct check_args {
        char audience[AB_PAM_AUDIENCE_MAX + 1];
        char scope[AB_PAM_SCOPE_MAX + 1];
        long max_auth_age;
} check_args;

static void free_cleanup(pam_handle_t *pamh, void *data, int status)
{
        (void)pamh;
        (void)status;
        free(data);
}

/*
 * account and session check the token as auth accepted it: the audience,
 * scope and max_auth_age of the auth line, unless their own line names
 * them (so "account required pam_agent_broker.so" after "auth ...
 * scope=ticketdb:login" asks for ticketdb:login, not the default login).
 */
static void inherit_check(ctx *x)
{
        const void *d = NULL;
        const check_args *c;

        if (pam_get_data(x->pamh, DATA_CHECK, &d) != PAM_SUCCESS || !d)
                return;
        c = d;
        if (!x->args.audience[0])
                memcpy(x->audience, c->audience, sizeof x->audience);
        if (!x->args.scope_set)
                memcpy(x->args.scope, c->scope, sizeof x->args.scope);
        if (!x->args.max_auth_age_set)
                x->args.max_auth_age = c->max_auth_age;
}

/*
 * A PAM item as set (PAM_USER: never prompting; PAM_TTY, PAM_RHOST), if it
 * is fit to send (the broker takes at most 256 printable ASCII bytes for
 * each); else NULL.
 */
static const char *item_to_send(pam_handle_t *pamh, int type)
{
        const void *item = NULL;
        if (pam_get_item(pamh, type, &item) != PAM_SUCCESS || !sane(item, ITEM_MAX))
                return NULL;
        return item;
}

static void tell_reauth(ctx *x, int flags)
{
        if (!(flags & PAM_SILENT))
                pam_info(x->pamh, "%s", REAUTH_MESSAGE);
}

/* Close the broker's record of PAM session id: 0, or a negative AB_ERR_* code (logged). */
static int close_record(ctx *x, const char *id)
{
        json_t *reply = NULL;
        int r = broker_call(x, M_CLOSE, NULL, json_pack("{s:s}", "id", id), &reply);

        if (r < 0) {
                log_call_failure(x, "cannot close the PAM session record", r);
                return r;
        }
        json_decref(reply);
        if (x->args.debug)
                pam_syslog(x->pamh, LOG_DEBUG, "PAM session %s closed", id);
        return 0;
}

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
        const char *user = NULL, *tok = NULL;
        const void *open_id = NULL;
        check_args *check;
        shown_name sn;
        char *copy;
        ctx x;
        int r;

        /* a new attempt on this handle: what an earlier one accepted no longer counts */
        (void)pam_set_data(pamh, DATA_TOKEN, NULL, NULL);
        (void)pam_set_data(pamh, DATA_CHECK, NULL, NULL);
        unset_env(pamh, ENV_JTI);
        r = ctx_init(&x, pamh, argc, argv);
        if (r != PAM_SUCCESS)
                return r;
        r = pam_get_user(pamh, &user, NULL);
        if (r == PAM_CONV_AGAIN)
                return PAM_INCOMPLETE;
        if (r != PAM_SUCCESS) {
                pam_syslog(pamh, LOG_NOTICE, "cannot determine the user: %s", pam_strerror(pamh, r));
                return r == PAM_USER_UNKNOWN ? r : PAM_USER_UNKNOWN;
        }
        /* (a user name the broker cannot take is refused below, once the
         * authtok is known to be a token: a password goes on to pam_unix) */
        r = pam_get_authtok(pamh, PAM_AUTHTOK, &tok, PROMPT);
        if (r == PAM_CONV_AGAIN)
                return PAM_INCOMPLETE;
        if (r != PAM_SUCCESS || !tok) {
                if (x.args.debug)
                        pam_syslog(pamh, LOG_DEBUG, "no token: %s", pam_strerror(pamh, r));
                return x.args.ignore_non_token ? PAM_IGNORE : PAM_AUTH_ERR;
        }
        if (!looks_like_token(tok)) {
                if (x.args.ignore_non_token) {
                        if (x.args.debug)
                                pam_syslog(pamh, LOG_DEBUG, "user %s: not an agent token, ignored", shown(&sn, user));
                        return PAM_IGNORE;
                }
                pam_syslog(pamh, LOG_NOTICE, "user %s: refused: not an agent token", shown(&sn, user));
                return PAM_AUTH_ERR;
        }
        if (!sane(user, ITEM_MAX)) {
                pam_syslog(pamh, LOG_NOTICE, "user %s: refused: an empty, overlong or unprintable user name",
                           shown(&sn, user));
                return PAM_USER_UNKNOWN;
        }
        r = introspect(&x, tok, user);
        if (r < 0) {
                log_call_failure(&x, "cannot check a token", r);
                return call_unavailable(&x, r) ? PAM_AUTHINFO_UNAVAIL : PAM_AUTH_ERR;
        }
        if (r == 0) {
                pam_syslog(pamh, LOG_NOTICE, "user %s: token refused by the broker: %s (audience %s, scope %s)",
                           shown(&sn, user), x.reason, x.audience, x.args.scope);
                if (strcmp(x.reason, "auth_too_old") == 0)
                        tell_reauth(&x, flags);
                return PAM_AUTH_ERR;
        }
        /* a PAM session recorded for an earlier token on this handle is that
         * token's: close its record, so that open_session records this one */
        if (pam_get_data(pamh, DATA_PAM_ID, &open_id) == PAM_SUCCESS && open_id) {
                if (close_record(&x, open_id) != 0) {
                        /* keep it for close_session to try again; an older one waiting
                         * there gets one more try first (only one is kept) */
                        const void *older = NULL;
                        if (pam_get_data(pamh, DATA_PAM_STALE, &older) == PAM_SUCCESS && older &&
                            close_record(&x, older) != 0)
                                pam_syslog(pamh, LOG_ERR, "PAM session record %s stays open at the broker",
                                           (const char *)older);
                        (void)pam_set_data(pamh, DATA_PAM_STALE, strdup(open_id), wipe_cleanup);
                }
                (void)pam_set_data(pamh, DATA_PAM_ID, NULL, NULL);
                unset_env(pamh, ENV_PAM_ID);
        }
        check = calloc(1, sizeof *check);
        if (!check)
                return PAM_BUF_ERR;
        memcpy(check->audience, x.audience, sizeof check->audience);
        memcpy(check->scope, x.args.scope, sizeof check->scope);
        check->max_auth_age = x.args.max_auth_age;
        if (pam_set_data(pamh, DATA_CHECK, check, free_cleanup) != PAM_SUCCESS) {
                free(check);
                return PAM_BUF_ERR;
        }
        copy = strdup(tok);
        if (!copy)
                return PAM_BUF_ERR;
        r = pam_set_data(pamh, DATA_TOKEN, copy, wipe_cleanup);
        if (r != PAM_SUCCESS) {
                wipe_cleanup(pamh, copy, 0);
                return PAM_BUF_ERR;
        }
        /*
         * The jti (not a secret) in the PAM environment: it names the token
         * to the login's processes, and it survives the fork that sshd
         * authenticates in, which PAM data does not (see setcred).
         */
        if (sane(x.jti, sizeof x.jti - 1)) {
                char env[sizeof ENV_JTI + sizeof x.jti + 1];
                snprintf(env, sizeof env, "%s=%s", ENV_JTI, x.jti);
                (void)pam_putenv(pamh, env);
        }
        pam_syslog(pamh, LOG_INFO, "user %s: accepted the token of agent %s (jti %s)", shown(&sn, user), x.agent,
                   x.jti);
        return PAM_SUCCESS;
}

/*
 * Whether this module accepted a token for this handle: its PAM data, or
 * (sshd runs pam_authenticate in a forked child and copies only the PAM
 * environment back) the jti it put in the environment.
 */
static bool authenticated_here(pam_handle_t *pamh, bool *ret_elsewhere)
{
        const void *data = NULL;
        if (pam_get_data(pamh, DATA_TOKEN, &data) == PAM_SUCCESS && data)
                return true;
        *ret_elsewhere = pam_getenv(pamh, ENV_JTI) != NULL;
        return false;
}

PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
        bool elsewhere = false;
        (void)flags;
        (void)argc;
        (void)argv;
        return authenticated_here(pamh, &elsewhere) || elsewhere ? PAM_SUCCESS : PAM_IGNORE;
}

PAM_EXTERN int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
        const void *token = NULL;
        const char *user;
        shown_name sn;
        ctx x;
        int r;

        if (pam_get_data(pamh, DATA_TOKEN, &token) != PAM_SUCCESS || !token)
                return PAM_IGNORE; /* not authenticated by this module */
        r = ctx_init(&x, pamh, argc, argv);
        if (r != PAM_SUCCESS)
                return r;
        inherit_check(&x);
        user = item_to_send(pamh, PAM_USER);
        if (!user)
                return PAM_USER_UNKNOWN;
        r = introspect(&x, token, user);
        if (r < 0) {
                log_call_failure(&x, "cannot re-check the token", r);
                return call_unavailable(&x, r) ? PAM_AUTHINFO_UNAVAIL : PAM_PERM_DENIED;
        }
        if (r == 0) {
                pam_syslog(pamh, LOG_NOTICE, "user %s: account refused: the token is no longer valid: %s",
                           shown(&sn, user), x.reason);
                if (strcmp(x.reason, "auth_too_old") == 0)
                        tell_reauth(&x, flags);
                return PAM_PERM_DENIED;
        }
        if (x.args.debug)
                pam_syslog(pamh, LOG_DEBUG, "user %s: token still active (jti %s)", shown(&sn, user), x.jti);
        return PAM_SUCCESS;
}

PAM_EXTERN int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
        const void *token = NULL;
        const char *user, *tty, *rhost, *id;
        json_t *params, *reply = NULL;
        char env[sizeof ENV_PAM_ID + 64], *copy;
        shown_name sn;
        ctx x;
        int r;

        (void)flags;
        if (pam_get_data(pamh, DATA_TOKEN, &token) != PAM_SUCCESS || !token) {
                bool elsewhere = false;
                if (!authenticated_here(pamh, &elsewhere) && elsewhere)
                        pam_syslog(pamh, LOG_NOTICE,
                                   "the token (jti %.64s) was accepted in another process (as sshd authenticates): "
                                   "this PAM session is not recorded with the broker",
                                   pam_getenv(pamh, ENV_JTI));
                return PAM_IGNORE;
        }
        {
                const void *open_id = NULL;
                /* already recorded (the module twice in the stack, or a second call) */
                if (pam_get_data(pamh, DATA_PAM_ID, &open_id) == PAM_SUCCESS && open_id)
                        return PAM_SUCCESS;
        }
        r = ctx_init(&x, pamh, argc, argv);
        if (r != PAM_SUCCESS)
                return r;
        inherit_check(&x);
        user = item_to_send(pamh, PAM_USER);
        if (!user)
                return PAM_SESSION_ERR;
        tty = item_to_send(pamh, PAM_TTY);
        rhost = item_to_send(pamh, PAM_RHOST);
        /* the broker checks the token again for this service's audience and scope, as pam_sm_authenticate asked */
        params = json_pack("{s:s, s:s, s:s, s:s}", "service", x.service, "user", user, "audience", x.audience, "scope",
                           x.args.scope);
        if (params && ((tty && json_object_set_new(params, "tty", json_string(tty)) < 0) ||
                       (rhost && json_object_set_new(params, "rhost", json_string(rhost)) < 0))) {
                json_decref(params);
                params = NULL;
        }
        r = broker_call(&x, M_OPEN, token, params, &reply);
        if (r < 0) {
                log_call_failure(&x, "cannot record the PAM session", r);
                return PAM_SESSION_ERR;
        }
        id = json_string_value(json_object_get(reply, "id"));
        if (!sane(id, 63) || !(copy = strdup(id))) {
                json_decref(reply);
                pam_syslog(pamh, LOG_ERR, "the broker answered OpenPamSession without a usable id");
                return PAM_SESSION_ERR;
        }
        json_decref(reply);
        if (pam_set_data(pamh, DATA_PAM_ID, copy, wipe_cleanup) != PAM_SUCCESS) {
                free(copy);
                return PAM_BUF_ERR;
        }
        snprintf(env, sizeof env, "%s=%s", ENV_PAM_ID, copy);
        (void)pam_putenv(pamh, env); /* informational: the session's processes can name their record */
        pam_syslog(pamh, LOG_INFO, "user %s: PAM session %s recorded with the broker", shown(&sn, user), copy);
        return PAM_SUCCESS;
}

PAM_EXTERN int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
        const void *id = NULL, *stale = NULL;
        ctx x;
        int r;

        (void)flags;
        (void)pam_get_data(pamh, DATA_PAM_STALE, &stale);
        if ((pam_get_data(pamh, DATA_PAM_ID, &id) != PAM_SUCCESS || !id) && !stale)
                return PAM_IGNORE;
        r = ctx_init(&x, pamh, argc, argv);
        if (r != PAM_SUCCESS)
                return r;
        if (stale && close_record(&x, stale) == 0)
                (void)pam_set_data(pamh, DATA_PAM_STALE, NULL, NULL);
        if (!id)
                return PAM_SUCCESS;
        if (close_record(&x, id) < 0)
                return PAM_SESSION_ERR;
        (void)pam_set_data(pamh, DATA_PAM_ID, NULL, NULL);
        return PAM_SUCCESS;
}
