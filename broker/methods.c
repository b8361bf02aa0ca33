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
#include "../common/util.h"

#define SOCK_AGENT 1u
#define SOCK_ADMIN 2u
#define AB_AUDIENCE_MAX 256
#define AB_TASK_MAX 128
#define AB_REQ_MAX_SCOPES 64

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
        "method IssueToken(audience: string, scopes: []string, ttl: ?int, task: ?string) -> (\n"
        "  token: string, token_type: string, expires_in: int, expires_at: int,\n"
        "  jti: string, scope: string, agent: string)\n"
        "\n"
        "# The broker's public keys as a JSON Web Key Set.\n"
        "method GetKeys() -> (keys: []Key)\n"
        "\n"
        "error NotAnAgent (reason: string)\n"
        "error AudienceNotGranted (reason: string)\n"
        "error ScopeNotGranted (reason: string)\n"
        "error TtlTooLong (reason: string)\n"
        "error InvalidParameter (parameter: string, reason: string)\n"
        "error InvalidMessage (reason: string)\n"
        "error MessageTooLarge (reason: string)\n"
        "error PeerGone (reason: string)\n"
        "error RateLimited (reason: string)\n"
        "error TooManyConnections (reason: string)\n"
        "error PermissionDenied (reason: string)\n"
        "error InternalError (reason: string)\n";

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

typedef enum { P_STRING, P_INT, P_STRINGS } ptype;

typedef struct param_spec {
        const char *name;
        ptype type;
        bool required;
        size_t max;         /* string bytes, or array items */
        long long min, imax; /* for P_INT */
} param_spec;

static int invalid_param(ab_conn *c, const char *name, const char *reason)
{
        return ab_conn_error(c, "io.agentbroker.InvalidParameter", reason, json_pack("{s:s}", "parameter", name));
}

/* Check params against spec; on failure reply and return -1. */
static int check_params(ab_conn *c, json_t *params, const param_spec *spec)
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
                        snprintf(name, sizeof name, "%.60s", key);
                        invalid_param(c, name, "unknown parameter");
                        return -1;
                }
        }
        for (const param_spec *s = spec; s->name; s++) {
                v = json_object_get(params, s->name);
                if (!v || json_is_null(v)) {
                        if (s->required) {
                                invalid_param(c, s->name, "required parameter missing");
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
                                invalid_param(c, s->name, reason);
                                return -1;
                        }
                        break;
                case P_INT:
                        if (!json_is_integer(v) || json_integer_value(v) < s->min || json_integer_value(v) > s->imax) {
                                snprintf(reason, sizeof reason, "must be an integer from %lld to %lld", s->min,
                                         s->imax);
                                invalid_param(c, s->name, reason);
                                return -1;
                        }
                        break;
                case P_STRINGS: {
                        size_t i;
                        json_t *e;
                        if (!json_is_array(v) || json_array_size(v) == 0 || json_array_size(v) > s->max) {
                                snprintf(reason, sizeof reason, "must be an array of 1 to %zu strings", s->max);
                                invalid_param(c, s->name, reason);
                                return -1;
                        }
                        json_array_foreach(v, i, e) {
                                if (!json_is_string(e) || json_string_length(e) > AB_SCOPE_MAX ||
                                    !ab_is_scope_token(json_string_value(e), json_string_length(e)) ||
                                    strchr(json_string_value(e), '*')) {
                                        snprintf(reason, sizeof reason,
                                                 "item %zu must be a scope: printable ASCII without spaces, "
                                                 "quotes or '*', at most %d bytes", i, AB_SCOPE_MAX);
                                        invalid_param(c, s->name, reason);
                                        return -1;
                                }
                        }
                        break;
                }
                }
        }
        return 0;
}

/* ---- org.varlink.service ----------------------------------------------- */

static void m_get_info(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { 0 } };
        if (check_params(c, call->parameters, spec) < 0)
                return;
        ab_conn_reply(c,
                      json_pack("{s:s, s:s, s:s, s:s, s:[s,s]}", "vendor", "agent-broker", "product", "agent-brokerd",
                                "version", AGENTBROKER_VERSION, "url", "https://github.com/agent-broker/agent-broker",
                                "interfaces", "org.varlink.service", "io.agentbroker"),
                      NULL);
}

static void m_get_interface_description(ab_conn *c, ab_vl_call *call)
{
        static const param_spec spec[] = { { "interface", P_STRING, true, 256, 0, 0 }, { 0 } };
        const char *iface;

        if (check_params(c, call->parameters, spec) < 0)
                return;
        iface = json_string_value(json_object_get(call->parameters, "interface"));
        if (strcmp(iface, "io.agentbroker") == 0)
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
        if (check_params(c, call->parameters, spec) < 0)
                return;
        ab_conn_reply(c, ab_signer_jwks(c->m->signer), NULL);
}

/*
 * Attest the caller and find its agent entry. On failure replies and
 * returns NULL.
 */
static const ab_agent *attest_agent(ab_conn *c, ab_identity *id)
{
        const ab_agent *a;
        char reason[256];
        int r;

        r = ab_attest(&c->peer, c->m->exe_cache, id);
        if (r < 0) {
                ab_conn_error(c, "io.agentbroker.PeerGone",
                              "the calling process has exited or cannot be identified", NULL);
                return NULL;
        }
        a = ab_policy_match(c->m->policy, id);
        if (!a) {
                snprintf(reason, sizeof reason, "no agent in policy matches uid %u, executable %.180s",
                         (unsigned)id->uid, id->exe[0] ? id->exe : "(unknown)");
                ab_conn_error(c, "io.agentbroker.NotAnAgent", reason, NULL);
                ab_log(LOG_NOTICE, "deny pid %d uid %u exe %s: not an agent", (int)id->pid, (unsigned)id->uid, id->exe);
                return NULL;
        }
        return a;
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
        char reason[512], jti[AB_JTI_LEN + 1], scope_str[AB_REQ_MAX_SCOPES * (AB_SCOPE_MAX + 1)];
        char *token = NULL;
        size_t n = 0, len = 0, off = 0, i;
        uint32_t ttl = 0;
        uint64_t now;
        ab_deny d;

        if (check_params(c, p, spec) < 0)
                return;
        if (!ab_rate_take(c->m, c->uslot)) {
                ab_conn_error(c, "io.agentbroker.RateLimited", "too many requests from this uid; retry shortly", NULL);
                return;
        }
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

        a = attest_agent(c, &id);
        if (!a)
                return;
        d = ab_policy_decide(a, audience, scopes, n, ttl, &g, &ttl, reason, sizeof reason);
        if (d != AB_GRANTED) {
                ab_conn_error(c, deny_names[d], reason, NULL);
                ab_log(LOG_NOTICE, "deny agent %s pid %d: %s", a->id, (int)id.pid, reason);
                return;
        }
        now = ab_now_usec() / 1000000;
        ab_random_id(jti);
        claims = json_pack("{s:s, s:s, s:s, s:s, s:I, s:I, s:I, s:s, s:s}", "sub", a->id, "aud", audience, "scope",
                           scope_str, "client_id", a->id, "iat", (json_int_t)now, "nbf", (json_int_t)now, "exp",
                           (json_int_t)(now + ttl), "jti", jti, "owner", a->owner);
        if (claims && task)
                json_object_set_new(claims, "task", json_string(task));
        if (!claims || ab_token_sign(c->m->signer, claims, &token, &len) < 0) {
                json_decref(claims);
                ab_conn_error(c, "io.agentbroker.InternalError", "could not sign the token", NULL);
                return;
        }
        json_decref(claims);
        ab_conn_reply(c,
                      json_pack("{s:s%, s:s, s:I, s:I, s:s, s:s, s:s}", "token", token, len, "token_type", "Bearer",
                                "expires_in", (json_int_t)ttl, "expires_at", (json_int_t)(now + ttl), "jti", jti,
                                "scope", scope_str, "agent", a->id),
                      NULL);
        sodium_memzero(token, len);
        free(token);
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
};

void ab_dispatch(ab_conn *c, ab_vl_call *call)
{
        const method *m = NULL;

        c->oneway = call->oneway; /* no reply to a oneway call */

        for (size_t i = 0; i < AB_ARRAY_SIZE(methods); i++)
                if (strcmp(methods[i].name, call->method) == 0) {
                        m = &methods[i];
                        break;
                }
        if (!m || !(m->sockets & (c->admin ? SOCK_ADMIN : SOCK_AGENT))) {
                const char *dot = strrchr(call->method, '.');
                size_t ilen = (size_t)(dot - call->method);
                bool known_iface = (ilen == strlen("io.agentbroker") && !strncmp(call->method, "io.agentbroker", ilen)) ||
                                   (ilen == strlen("org.varlink.service") &&
                                    !strncmp(call->method, "org.varlink.service", ilen));
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
