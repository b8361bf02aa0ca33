/* SPDX-License-Identifier: MIT */
/*
 * agent-brokerctl review: the access-certification sheet of every agent
 * (selectors, every grant with its use, unused grants, active sessions,
 * PAM services it can reach, findings), from the running broker or from
 * policy files.
 *
 * agent-brokerctl coverage: which PAM services put pam_agent_broker.so in
 * their auth stack, which are granted to agents in policy but do not use
 * it (a path that bypasses the broker), and which use it without a grant.
 *
 * docs/review.md describes both commands, their output and exit codes.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "ctl.h"
#include "../broker/policy.h"
#include "../common/util.h"

#define REVIEW_DEFAULT_UNUSED_DAYS 30
#define REVIEW_MAX_UNUSED_DAYS 36500
#define REVIEW_LONG_TTL 3600 /* a max_ttl above this is a finding */

#define PAM_MODULE "pam_agent_broker.so"
#define PAM_DEFAULT_DIR "/etc/pam.d"
#define PAM_MAX_DEPTH 16        /* nested includes, as Linux-PAM's PAM_SUBSTACK_MAX_LEVEL */
#define PAM_MAX_SERVICES 4096   /* files in the PAM directory */
#define PAM_MAX_FILE (1024 * 1024)

/* ---- small helpers ------------------------------------------------------------ */

static const char *jstr(const json_t *o, const char *key)
{
        return json_string_value(json_object_get(o, key));
}

static long long jint(const json_t *o, const char *key)
{
        return (long long)json_integer_value(json_object_get(o, key));
}

/* "2026-11-28T10:00:00Z" for Unix seconds t. */
static void fmt_time(long long t, char *out, size_t outmax)
{
        time_t tt = (time_t)t;
        struct tm tm;

        if (!gmtime_r(&tt, &tm) || strftime(out, outmax, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
                snprintf(out, outmax, "?");
}

/* "2d", "8h", "5m" or "45s": the largest unit that divides s. */
static void fmt_dur(long long s, char *out, size_t outmax)
{
        if (s > 0 && s % 86400 == 0)
                snprintf(out, outmax, "%lldd", s / 86400);
        else if (s > 0 && s % 3600 == 0)
                snprintf(out, outmax, "%lldh", s / 3600);
        else if (s > 0 && s % 60 == 0)
                snprintf(out, outmax, "%lldm", s / 60);
        else
                snprintf(out, outmax, "%llds", s);
}

/* Append s to the JSON array of strings arr unless it is already there. */
static void add_unique(json_t *arr, const char *s)
{
        size_t i;
        json_t *v;

        json_array_foreach(arr, i, v)
                if (json_is_string(v) && strcmp(json_string_value(v), s) == 0)
                        return;
        json_array_append_new(arr, json_string(s));
}

/* Join the strings of arr with sep into out (truncated to outmax). */
static void join_strings(const json_t *arr, const char *sep, char *out, size_t outmax)
{
        size_t i, used = 0;
        json_t *v;

        out[0] = '\0';
        json_array_foreach(arr, i, v) {
                int n;
                if (!json_is_string(v))
                        continue;
                n = snprintf(out + used, outmax - used, "%s%s", used ? sep : "", json_string_value(v));
                if (n < 0 || (size_t)n >= outmax - used)
                        break;
                used += (size_t)n;
        }
}

/* ---- the admin socket --------------------------------------------------------- */

typedef struct admin {
        const opts *o;
        ab_client *c;      /* connected lazily; dropped after a transport failure */
        char name[256];    /* the varlink error of the last failed call, or "" */
        char msg[512];     /* its reason */
} admin;

static const char *admin_path(const opts *o)
{
        if (o->admin_socket)
                return o->admin_socket;
        if (getenv("AGENT_BROKER_ADMIN_SOCKET") && *getenv("AGENT_BROKER_ADMIN_SOCKET"))
                return getenv("AGENT_BROKER_ADMIN_SOCKET");
        return AB_DEFAULT_ADMIN_SOCKET;
}

static void admin_done(admin *a)
{
        ab_client_free(a->c);
        a->c = NULL;
}

/*
 * Call method with params (borrowed, may be NULL) on the admin socket.
 * 0 with *ret (the reply's parameters), or a library error code with
 * a->name/a->msg saying why.
 */
static int admin_call(admin *a, const char *method, json_t *params, json_t **ret)
{
        char *in = NULL, *out = NULL;
        json_t *v;
        int r;

        a->name[0] = a->msg[0] = '\0';
        if (!a->c) {
                r = ab_client_connect(admin_path(a->o), a->o->timeout_ms, &a->c);
                if (r < 0) {
                        a->c = NULL;
                        snprintf(a->msg, sizeof a->msg, "%s", ab_strerror(r));
                        return r;
                }
        }
        if (params && !(in = json_dumps(params, JSON_COMPACT)))
                return -ENOMEM;
        r = ab_client_call(a->c, method, in, &out);
        free(in);
        if (r < 0) {
                const char *m = ab_client_error_message(a->c);
                snprintf(a->name, sizeof a->name, "%s", ab_client_error_name(a->c));
                snprintf(a->msg, sizeof a->msg, "%s", *m ? m : ab_strerror(r));
                ab_defang(a->name); /* printed to a terminal (admin_fail) */
                ab_defang(a->msg);
                if (r != AB_ERR_DENIED && r != AB_ERR_REMOTE)
                        admin_done(a); /* the handle is unusable after a transport failure */
                return r;
        }
        v = json_loads(out, 0, NULL);
        ab_token_free(out);
        if (!json_is_object(v)) {
                json_decref(v);
                snprintf(a->msg, sizeof a->msg, "the reply is not a JSON object");
                return AB_ERR_PROTOCOL;
        }
        *ret = v;
        return 0;
}

static bool method_not_found(const admin *a)
{
        return strcmp(a->name, "org.varlink.service.MethodNotFound") == 0;
}

/* Say why a call failed; return the exit code for it. */
static int admin_fail(const admin *a, int r, const char *method)
{
        if (r == AB_ERR_UNREACHABLE)
                fprintf(stderr,
                        "agent-brokerctl: cannot reach the broker's admin socket at %s: %s "
                        "(it needs root; or give --policy PATH)\n",
                        admin_path(a->o), a->msg);
        else if (*a->name)
                fprintf(stderr, "agent-brokerctl: %s: %s: %s\n", method, a->name, a->msg);
        else
                fprintf(stderr, "agent-brokerctl: %s: %s\n", method, a->msg);
        return ctl_exit_for(r);
}

/*
 * The array under key in the reply to method(): one call for every agent,
 * or, when that answer is over the varlink message limit, one call per
 * agent of agents (method(agent)). 0 with *ret_rows, or an error code.
 */
static int fetch_rows(admin *a, const char *method, const char *key, const json_t *agents, json_t **ret_rows)
{
        json_t *reply = NULL, *rows, *ag;
        size_t i;
        int r;

        r = admin_call(a, method, NULL, &reply);
        if (r == 0) {
                rows = json_object_get(reply, key);
                if (!json_is_array(rows)) {
                        json_decref(reply);
                        snprintf(a->msg, sizeof a->msg, "the reply has no \"%s\" array", key);
                        return AB_ERR_PROTOCOL;
                }
                rows = json_incref(rows);
                /* paged replies (ListSessions): follow "next" */
                for (unsigned page = 0; page < 1000000 && json_is_string(json_object_get(reply, "next")); page++) {
                        json_t *p = json_pack("{s:O}", "after", json_object_get(reply, "next")), *more;
                        json_decref(reply);
                        reply = NULL;
                        r = p ? admin_call(a, method, p, &reply) : -ENOMEM;
                        json_decref(p);
                        more = r == 0 ? json_object_get(reply, key) : NULL;
                        if (r < 0 || !json_is_array(more) || json_array_extend(rows, more) < 0) {
                                json_decref(reply);
                                json_decref(rows);
                                if (r == 0)
                                        snprintf(a->msg, sizeof a->msg, "the reply has no \"%s\" array", key);
                                return r < 0 ? r : AB_ERR_PROTOCOL;
                        }
                }
                json_decref(reply);
                *ret_rows = rows;
                return 0;
        }
        if (r != AB_ERR_PROTOCOL && r != AB_ERR_TOO_LARGE)
                return r;
        /* too large for one message: ask agent by agent */
        rows = json_array();
        if (!rows)
                return -ENOMEM;
        json_array_foreach(agents, i, ag) {
                json_t *p = json_pack("{s:O}", "agent", json_object_get(ag, "id")), *part;
                if (!p) {
                        json_decref(rows);
                        return -ENOMEM;
                }
                r = admin_call(a, method, p, &reply);
                json_decref(p);
                if (r < 0) {
                        json_decref(rows);
                        return r;
                }
                part = json_object_get(reply, key);
                if (!json_is_array(part) || json_array_extend(rows, part) < 0) {
                        json_decref(reply);
                        json_decref(rows);
                        snprintf(a->msg, sizeof a->msg, "the reply has no \"%s\" array", key);
                        return AB_ERR_PROTOCOL;
                }
                json_decref(reply);
        }
        *ret_rows = rows;
        return 0;
}

/* ---- the policy ---------------------------------------------------------------- */

static void diag_emit(void *ud, int sev, const char *file, const char *path, const char *msg)
{
        (void)ud;
        fprintf(stderr, "agent-brokerctl: %s: %s: %s: %s\n", file, path, sev == AB_DIAG_ERROR ? "error" : "warning",
                msg);
}

static json_t *strv_json(const char *const *v, size_t n)
{
        json_t *a = json_array();
        for (size_t i = 0; a && i < n; i++)
                json_array_append_new(a, json_string(v[i]));
        return a;
}

/* One agent as io.agentbroker.admin.ShowPolicy shows it. */
static json_t *agent_to_json(const ab_agent *a)
{
        json_t *match = json_object(), *grants = json_array();

        if (!match || !grants) {
                json_decref(match);
                json_decref(grants);
                return NULL;
        }
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
        for (size_t i = 0; i < a->n_grants; i++) {
                const ab_grant *g = &a->grants[i];
                json_t *j = json_pack("{s:s, s:o, s:I}", "audience", g->audience, "scopes",
                                      strv_json(g->scopes, g->n_scopes), "max_ttl", (json_int_t)g->max_ttl);
                if (j && g->max_auth_age)
                        json_object_set_new(j, "max_auth_age", json_integer(g->max_auth_age));
                if (j && g->users)
                        json_object_set_new(j, "users", strv_json(g->users, g->n_users));
                json_array_append_new(grants, j);
        }
        return json_pack("{s:s, s:s, s:s?, s:s, s:o, s:{s:I, s:I}, s:I, s:o}", "id", a->id, "owner", a->owner,
                         "description", a->description, "source", a->source, "match", match, "session",
                         "max_lifetime", (json_int_t)a->max_lifetime, "reauth_interval",
                         (json_int_t)a->reauth_interval, "max_delegation_depth", (json_int_t)a->max_delegation_depth,
                         "grants", grants);
}

/* The agents of the policy at path (a file or a directory of *.json). Returns an exit code. */
static int policy_from_path(const char *path, json_t **ret_agents)
{
        ab_diag diag = { .emit = diag_emit };
        ab_policy *p = NULL;
        json_t *agents;
        int r;

        r = ab_policy_load_path(path, &diag, &p);
        if (r < 0) {
                fprintf(stderr, "agent-brokerctl: %s: the policy does not load: %s\n", path, ab_strerror(r));
                return EXIT_ERROR;
        }
        agents = json_array();
        for (size_t i = 0; agents && i < p->n_agents; i++)
                if (json_array_append_new(agents, agent_to_json(&p->agents[i])) < 0) {
                        json_decref(agents);
                        agents = NULL;
                }
        ab_policy_free(p);
        if (!agents)
                return EXIT_ERROR;
        *ret_agents = agents;
        return EXIT_OK;
}

/* The compiled policy's agents from the broker (ShowPolicy). Returns an exit code. */
static int policy_from_broker(admin *a, json_t **ret_agents)
{
        json_t *reply = NULL, *agents;
        int r;

        r = admin_call(a, "io.agentbroker.admin.ShowPolicy", NULL, &reply);
        if (r == AB_ERR_PROTOCOL || r == AB_ERR_TOO_LARGE)
                fprintf(stderr, "agent-brokerctl: the compiled policy is larger than one varlink message; "
                                "review the policy files with --policy /etc/agent-broker/policy.d\n");
        if (r < 0)
                return admin_fail(a, r, "io.agentbroker.admin.ShowPolicy");
        agents = json_object_get(reply, "agents");
        if (!json_is_array(agents)) {
                json_decref(reply);
                fprintf(stderr, "agent-brokerctl: ShowPolicy: the reply has no agents\n");
                return EXIT_ERROR;
        }
        *ret_agents = json_incref(agents);
        json_decref(reply);
        return EXIT_OK;
}

/* ---- review ---------------------------------------------------------------------- */

typedef struct review_ctx {
        json_t *usage;      /* GetUsage rows, NULL: unknown */
        json_t *sessions;   /* ListSessions rows, NULL: unknown */
        long long now, cutoff;
        long days;
} review_ctx;

/* An owner that names nobody: missing, blank, or a placeholder. */
static bool owner_missing(const char *o)
{
        static const char *const none[] = { "none", "nobody", "unknown", "todo", "tbd", "n/a", "na", "-", "?",
                                            "owner", "changeme", "fixme" };
        char buf[32];
        size_t n;

        if (!o)
                return true;
        o += strspn(o, " \t");
        n = strlen(o);
        while (n > 0 && (o[n - 1] == ' ' || o[n - 1] == '\t'))
                n--;
        if (n == 0)
                return true;
        if (n >= sizeof buf)
                return false;
        memcpy(buf, o, n);
        buf[n] = '\0';
        for (size_t i = 0; i < AB_ARRAY_SIZE(none); i++)
                if (strcasecmp(buf, none[i]) == 0)
                        return true;
        return false;
}

static bool wildcard_scope(const char *s)
{
        size_t n = strlen(s);
        return n > 0 && s[n - 1] == '*';
}

/* As ab_grant_covers for one granted scope g: exactly, or by its prefix before a trailing '*'. */
static bool scope_covers(const char *g, const char *want)
{
        size_t n = strlen(g);
        if (n > 0 && g[n - 1] == '*')
                return strncmp(g, want, n - 1) == 0;
        return strcmp(g, want) == 0;
}

static void add_finding(json_t *findings, const char *kind, long grant, const char *audience, const char *scope,
                        const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* One finding: kind, message, and the grant (index, audience) and scope it is about, if any. */
static void add_finding(json_t *findings, const char *kind, long grant, const char *audience, const char *scope,
                        const char *fmt, ...)
{
        char msg[512];
        va_list ap;
        json_t *f;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        f = json_pack("{s:s, s:s}", "kind", kind, "message", msg);
        if (f && grant >= 0) {
                json_object_set_new(f, "grant", json_integer(grant));
                json_object_set_new(f, "audience", json_string(audience));
        }
        if (f && scope)
                json_object_set_new(f, "scope", json_string(scope));
        json_array_append_new(findings, f);
}

/* "uid=0 exe=/usr/bin/x" from a match object. */
static void selectors_text(const json_t *match, char *out, size_t outmax)
{
        const char *k;
        json_t *v;
        size_t used = 0;

        out[0] = '\0';
        json_object_foreach((json_t *)match, k, v) {
                int n;
                if (json_is_string(v))
                        n = snprintf(out + used, outmax - used, "%s%s=%s", used ? " " : "", k, json_string_value(v));
                else if (json_is_integer(v))
                        n = snprintf(out + used, outmax - used, "%s%s=%lld", used ? " " : "", k,
                                     (long long)json_integer_value(v));
                else
                        continue;
                if (n < 0 || (size_t)n >= outmax - used)
                        break;
                used += (size_t)n;
        }
}

/*
 * The scope entry (of grants, the review's grant objects) that a usage row
 * for audience and scope counts toward: in the first grant for the audience
 * that covers it, the scope named exactly, else the wildcard covering it
 * (the broker decides with the first grant that covers a request).
 */
static json_t *attribute(json_t *grants, const char *audience, const char *scope)
{
        size_t gi, si;
        json_t *g, *s;

        json_array_foreach(grants, gi, g) {
                json_t *wild = NULL;
                if (strcmp(jstr(g, "audience"), audience) != 0)
                        continue;
                json_array_foreach(json_object_get(g, "scopes"), si, s) {
                        const char *gs = jstr(s, "scope");
                        if (strcmp(gs, scope) == 0)
                                return s;
                        if (!wild && wildcard_scope(gs) && scope_covers(gs, scope))
                                wild = s;
                }
                if (wild)
                        return wild;
        }
        return NULL;
}

static json_t *time_or_null(long long t)
{
        return t > 0 ? json_integer(t) : json_null();
}

/* The review of one agent (a ShowPolicy agent object). */
static json_t *review_agent(const review_ctx *rc, json_t *ag)
{
        json_t *grants = json_array(), *findings = json_array(), *pam = json_object(), *unused = json_array(),
               *outside = json_array(), *pam_list = json_array(), *match = json_object_get(ag, "match"),
               *g, *s, *row, *out = NULL, *sessions = NULL;
        const char *id = jstr(ag, "id"), *owner = jstr(ag, "owner");
        bool known = rc->usage != NULL;
        size_t gi, si, i;
        char sel[1024], when[32];

        if (!grants || !findings || !pam || !unused || !outside || !pam_list || !id)
                goto out;

        /* agent-wide findings */
        if (owner_missing(owner) && owner && owner[strspn(owner, " \t")])
                add_finding(findings, "no-owner", -1, NULL, NULL,
                            "owner \"%s\" names nobody: nobody certifies this agent's access", owner);
        else if (owner_missing(owner))
                add_finding(findings, "no-owner", -1, NULL, NULL, "no owner: nobody certifies this agent's access");
        if (!json_object_get(match, "sha256") && !json_object_get(match, "unit")) {
                selectors_text(match, sel, sizeof sel);
                add_finding(findings, "weak-selectors", -1, NULL, NULL,
                            "no sha256 or unit selector: any program that matches \"%s\" is this agent", sel);
        }

        /* the grants, with a counter per scope */
        json_array_foreach(json_object_get(ag, "grants"), gi, g) {
                json_t *scopes = json_array(), *og;
                json_array_foreach(json_object_get(g, "scopes"), si, s) {
                        if (!json_is_string(s))
                                continue;
                        json_array_append_new(scopes, json_pack("{s:O, s:b, s:o, s:o}", "scope", s, "wildcard",
                                                                wildcard_scope(json_string_value(s)), "count",
                                                                known ? json_integer(0) : json_null(), "last_issued",
                                                                json_null()));
                }
                og = json_pack("{s:I, s:O, s:o, s:O, s:O?, s:O?}", "index", (json_int_t)gi, "audience",
                               json_object_get(g, "audience"), "scopes", scopes, "max_ttl",
                               json_object_get(g, "max_ttl"), "max_auth_age", json_object_get(g, "max_auth_age"),
                               "users", json_object_get(g, "users"));
                if (!og || !jstr(og, "audience")) {
                        json_decref(og);
                        goto out;
                }
                json_array_append_new(grants, og);
        }

        /* usage rows count toward the scope that granted them */
        if (known)
                json_array_foreach(rc->usage, i, row) {
                        const char *ra = jstr(row, "agent"), *aud = jstr(row, "audience"), *sc = jstr(row, "scope");
                        long long cnt = jint(row, "count"), last = jint(row, "last_issued");
                        json_t *slot;
                        if (!ra || !aud || !sc || strcmp(ra, id) != 0)
                                continue;
                        slot = attribute(grants, aud, sc);
                        if (!slot) {
                                json_array_append_new(outside, json_pack("{s:s, s:s, s:I, s:o}", "audience", aud,
                                                                         "scope", sc, "count", (json_int_t)cnt,
                                                                         "last_issued", time_or_null(last)));
                                continue;
                        }
                        json_object_set_new(slot, "count", json_integer(jint(slot, "count") + cnt));
                        if (last > jint(slot, "last_issued"))
                                json_object_set_new(slot, "last_issued", json_integer(last));
                        if (strcmp(jstr(slot, "scope"), sc) != 0) {
                                json_t *ua = json_object_get(slot, "used_as");
                                if (!ua) {
                                        ua = json_array();
                                        json_object_set_new(slot, "used_as", ua);
                                }
                                json_array_append_new(ua, json_pack("{s:s, s:I, s:o}", "scope", sc, "count",
                                                                    (json_int_t)cnt, "last_issued",
                                                                    time_or_null(last)));
                        }
                }

        /* per grant: totals, unused, findings, PAM services */
        json_array_foreach(grants, gi, g) {
                const char *aud = jstr(g, "audience");
                json_t *scopes = json_object_get(g, "scopes");
                long long count = 0, last = 0;
                char d[32];

                json_array_foreach(scopes, si, s) {
                        count += jint(s, "count");
                        if (jint(s, "last_issued") > last)
                                last = jint(s, "last_issued");
                        if (known)
                                json_object_set_new(s, "unused", json_boolean(jint(s, "last_issued") < rc->cutoff));
                        else
                                json_object_set_new(s, "unused", json_null());
                }
                json_object_set_new(g, "count", known ? json_integer(count) : json_null());
                json_object_set_new(g, "last_issued", time_or_null(last));
                json_object_set_new(g, "unused", known ? json_boolean(last < rc->cutoff) : json_null());
                if (known && last < rc->cutoff)
                        json_array_append_new(unused, json_integer((json_int_t)gi));

                if (jint(g, "max_ttl") > REVIEW_LONG_TTL) {
                        fmt_dur(jint(g, "max_ttl"), d, sizeof d);
                        add_finding(findings, "long-ttl", (long)gi, aud, NULL,
                                    "grant %zu (%s): max_ttl %s is above 1h: tokens should be short-lived", gi, aud, d);
                }
                json_array_foreach(scopes, si, s)
                        if (json_is_true(json_object_get(s, "wildcard")))
                                add_finding(findings, "wildcard", (long)gi, aud, jstr(s, "scope"),
                                            "grant %zu (%s): scope \"%s\" grants %s", gi, aud, jstr(s, "scope"),
                                            strcmp(jstr(s, "scope"), "*") == 0 ? "every scope"
                                                                               : "every scope it prefixes");
                if (known && count == 0) {
                        add_finding(findings, "never-used", (long)gi, aud, NULL, "grant %zu (%s): never used", gi, aud);
                } else if (known && last < rc->cutoff) {
                        fmt_time(last, when, sizeof when);
                        add_finding(findings, "unused", (long)gi, aud, NULL,
                                    "grant %zu (%s): not used for %lld days (last %s)", gi, aud,
                                    (rc->now - last) / 86400, when);
                } else if (known) {
                        /* a grant in use: its scopes one by one */
                        json_array_foreach(scopes, si, s) {
                                long long sl = jint(s, "last_issued");
                                if (jint(s, "count") == 0) {
                                        add_finding(findings, "never-used", (long)gi, aud, jstr(s, "scope"),
                                                    "grant %zu (%s): scope \"%s\" never used", gi, aud,
                                                    jstr(s, "scope"));
                                } else if (sl < rc->cutoff) {
                                        fmt_time(sl, when, sizeof when);
                                        add_finding(findings, "unused", (long)gi, aud, jstr(s, "scope"),
                                                    "grant %zu (%s): scope \"%s\" not used for %lld days (last %s)",
                                                    gi, aud, jstr(s, "scope"), (rc->now - sl) / 86400, when);
                                }
                        }
                }

                if (strncmp(aud, "pam:", 4) == 0) {
                        json_t *svc = json_object_get(pam, aud + 4), *v;
                        size_t ui;
                        if (!svc) {
                                svc = json_pack("{s:s, s:[], s:[], s:[]}", "service", aud + 4, "users", "scopes",
                                                "grants");
                                if (!svc || json_object_set_new(pam, aud + 4, svc) < 0)
                                        goto out;
                                json_array_append(pam_list, svc);
                        }
                        json_array_foreach(json_object_get(g, "users"), ui, v)
                                if (json_is_string(v))
                                        add_unique(json_object_get(svc, "users"), json_string_value(v));
                        json_array_foreach(scopes, si, s)
                                add_unique(json_object_get(svc, "scopes"), jstr(s, "scope"));
                        json_array_append_new(json_object_get(svc, "grants"), json_integer((json_int_t)gi));
                }
        }

        if (rc->sessions) {
                long long n = 0;
                json_array_foreach(rc->sessions, i, row) {
                        const char *sa = jstr(row, "agent"), *st = jstr(row, "state");
                        if (sa && st && strcmp(sa, id) == 0 && strcmp(st, "active") == 0)
                                n++;
                }
                sessions = json_integer(n);
        } else {
                sessions = json_null();
        }
        out = json_pack("{s:s, s:O?, s:O?, s:O?, s:O?, s:O?, s:O?, s:b, s:o, s:O, s:O, s:O, s:O, s:O}", "id", id,
                        "owner", json_object_get(ag, "owner"), "description", json_object_get(ag, "description"),
                        "source", json_object_get(ag, "source"), "selectors", match, "session",
                        json_object_get(ag, "session"), "max_delegation_depth",
                        json_object_get(ag, "max_delegation_depth"), "usage_known", known, "active_sessions",
                        sessions, "grants", grants, "unused_grants", unused, "pam_services", pam_list,
                        "usage_outside_grants", outside, "findings", findings);
        sessions = NULL;
out:
        json_decref(sessions);
        json_decref(grants);
        json_decref(findings);
        json_decref(pam);
        json_decref(pam_list);
        json_decref(unused);
        json_decref(outside);
        return out;
}

static void print_usage_line(const json_t *s, bool known, long long now)
{
        char when[32];
        long long cnt = jint(s, "count"), last = jint(s, "last_issued");

        if (!known)
                printf("usage unknown");
        else if (cnt == 0)
                printf("never used");
        else {
                fmt_time(last, when, sizeof when);
                printf("%lld issued, last %s (%lld days ago)", cnt, when, (now - last) / 86400);
        }
}

static void print_agent_text(const json_t *a, long long now)
{
        json_t *g, *s, *v, *f;
        size_t gi, si, i;
        bool known = json_is_true(json_object_get(a, "usage_known"));
        char sel[1024], d1[32], d2[32], users[1024];

        printf("== agent %s\n", jstr(a, "id"));
        printf("   owner        %s\n", jstr(a, "owner") ? jstr(a, "owner") : "(none)");
        if (jstr(a, "description"))
                printf("   description  %s\n", jstr(a, "description"));
        if (jstr(a, "source"))
                printf("   source       %s\n", jstr(a, "source"));
        selectors_text(json_object_get(a, "selectors"), sel, sizeof sel);
        printf("   selectors    %s\n", sel);
        v = json_object_get(a, "session");
        if (json_is_object(v)) {
                fmt_dur(jint(v, "max_lifetime"), d1, sizeof d1);
                fmt_dur(jint(v, "reauth_interval"), d2, sizeof d2);
                printf("   session      max lifetime %s, re-authentication every %s, delegation depth %lld\n", d1, d2,
                       jint(a, "max_delegation_depth"));
        }
        v = json_object_get(a, "active_sessions");
        if (json_is_integer(v))
                printf("   sessions     %lld active\n", (long long)json_integer_value(v));
        else
                printf("   sessions     unknown\n");
        printf("   grants       %zu%s\n", json_array_size(json_object_get(a, "grants")),
               json_array_size(json_object_get(a, "grants")) ? "" : " (this agent can get no token)");
        json_array_foreach(json_object_get(a, "grants"), gi, g) {
                fmt_dur(jint(g, "max_ttl"), d1, sizeof d1);
                printf("     [%zu] %s  max_ttl %s", gi, jstr(g, "audience"), d1);
                if (json_is_integer(json_object_get(g, "max_auth_age"))) {
                        fmt_dur(jint(g, "max_auth_age"), d2, sizeof d2);
                        printf("  max_auth_age %s", d2);
                }
                if (json_is_array(json_object_get(g, "users"))) {
                        join_strings(json_object_get(g, "users"), ", ", users, sizeof users);
                        printf("  users %s", *users ? users : "(none)");
                }
                if (json_is_true(json_object_get(g, "unused")))
                        printf("  UNUSED");
                printf("\n");
                json_array_foreach(json_object_get(g, "scopes"), si, s) {
                        printf("           %-24s ", jstr(s, "scope"));
                        print_usage_line(s, known, now);
                        printf("\n");
                        json_array_foreach(json_object_get(s, "used_as"), i, v) {
                                printf("             as %-21s ", jstr(v, "scope"));
                                print_usage_line(v, known, now);
                                printf("\n");
                        }
                }
        }
        if (json_array_size(json_object_get(a, "usage_outside_grants")) > 0) {
                printf("   used outside the current grants\n");
                json_array_foreach(json_object_get(a, "usage_outside_grants"), i, v) {
                        printf("           %s %s  ", jstr(v, "audience"), jstr(v, "scope"));
                        print_usage_line(v, true, now);
                        printf("\n");
                }
        }
        if (json_array_size(json_object_get(a, "pam_services")) > 0) {
                printf("   PAM services");
                json_array_foreach(json_object_get(a, "pam_services"), i, v) {
                        join_strings(json_object_get(v, "users"), ", ", users, sizeof users);
                        printf("%s %s (users: %s)", i ? "," : "", jstr(v, "service"), *users ? users : "none");
                }
                printf("\n");
        }
        printf("   findings     %zu\n", json_array_size(json_object_get(a, "findings")));
        json_array_foreach(json_object_get(a, "findings"), i, f)
                printf("     - %s: %s\n", jstr(f, "kind"), jstr(f, "message"));
        printf("   owner sign-off: ______________________________   date: ____________\n\n");
}

/* One CSV field (RFC 4180). Text that a spreadsheet would run as a formula gets a leading '. */
static void csv_field(const char *s, bool text, bool last)
{
        bool quote = strpbrk(s, ",\"\r\n") != NULL || (*s && (s[0] == ' ' || s[strlen(s) - 1] == ' '));

        if (quote)
                putchar('"');
        if (text && *s && strchr("=+-@\t\r", s[0]))
                putchar('\'');
        for (; *s; s++) {
                if (*s == '"')
                        putchar('"');
                putchar(*s);
        }
        if (quote)
                putchar('"');
        putchar(last ? '\n' : ',');
}

/* The finding kinds about this row: the agent's, the grant's (gi) and the scope's. */
static void row_findings(const json_t *findings, long gi, const char *scope, char *out, size_t outmax)
{
        json_t *kinds = json_array(), *f;
        size_t i;

        json_array_foreach(findings, i, f) {
                json_t *fg = json_object_get(f, "grant");
                const char *fs = jstr(f, "scope");
                if (fg && (gi < 0 || json_integer_value(fg) != gi))
                        continue;
                if (fs && (!scope || strcmp(fs, scope) != 0))
                        continue;
                add_unique(kinds, jstr(f, "kind"));
        }
        join_strings(kinds, " ", out, outmax);
        json_decref(kinds);
}

static void print_csv(const json_t *agents)
{
        json_t *a, *g, *s;
        size_t ai, gi, si;
        char buf[1024], when[32];

        printf("agent,owner,grant,audience,scope,max_ttl,max_auth_age,users,count,last_issued,unused,findings\n");
        json_array_foreach(agents, ai, a) {
                bool known = json_is_true(json_object_get(a, "usage_known"));
                json_t *findings = json_object_get(a, "findings");
                if (json_array_size(json_object_get(a, "grants")) == 0) {
                        csv_field(jstr(a, "id"), true, false);
                        csv_field(jstr(a, "owner") ? jstr(a, "owner") : "", true, false);
                        for (int k = 0; k < 9; k++)
                                csv_field("", false, false);
                        row_findings(findings, -1, NULL, buf, sizeof buf);
                        csv_field(buf, false, true);
                        continue;
                }
                json_array_foreach(json_object_get(a, "grants"), gi, g)
                        json_array_foreach(json_object_get(g, "scopes"), si, s) {
                                csv_field(jstr(a, "id"), true, false);
                                csv_field(jstr(a, "owner") ? jstr(a, "owner") : "", true, false);
                                snprintf(buf, sizeof buf, "%zu", gi);
                                csv_field(buf, false, false);
                                csv_field(jstr(g, "audience"), true, false);
                                csv_field(jstr(s, "scope"), true, false);
                                snprintf(buf, sizeof buf, "%lld", jint(g, "max_ttl"));
                                csv_field(buf, false, false);
                                if (json_is_integer(json_object_get(g, "max_auth_age")))
                                        snprintf(buf, sizeof buf, "%lld", jint(g, "max_auth_age"));
                                else
                                        buf[0] = '\0';
                                csv_field(buf, false, false);
                                join_strings(json_object_get(g, "users"), " ", buf, sizeof buf);
                                csv_field(buf, true, false);
                                if (known)
                                        snprintf(buf, sizeof buf, "%lld", jint(s, "count"));
                                else
                                        buf[0] = '\0';
                                csv_field(buf, false, false);
                                if (!known)
                                        when[0] = '\0';
                                else if (jint(s, "last_issued") > 0)
                                        fmt_time(jint(s, "last_issued"), when, sizeof when);
                                else
                                        snprintf(when, sizeof when, "never");
                                csv_field(when, false, false);
                                csv_field(!known ? "" : json_is_true(json_object_get(s, "unused")) ? "yes" : "no",
                                          false, false);
                                row_findings(findings, (long)gi, jstr(s, "scope"), buf, sizeof buf);
                                csv_field(buf, false, true);
                        }
        }
}

/*
 * Usage and sessions from the broker into *ret_usage and *ret_sessions;
 * each stays NULL (unknown) when the broker lacks the method, or, with
 * optional, when it does not answer. Returns an exit code.
 */
static int fetch_live(admin *a, const json_t *agents, bool optional, json_t **ret_usage, json_t **ret_sessions)
{
        int r;

        r = fetch_rows(a, "io.agentbroker.admin.GetUsage", "usage", agents, ret_usage);
        if (r < 0 && method_not_found(a)) {
                fprintf(stderr, "agent-brokerctl: warning: this broker has no GetUsage (%s): usage unknown, "
                                "so no never-used or unused findings\n", a->name);
        } else if (r < 0 && optional) {
                fprintf(stderr, "agent-brokerctl: warning: no usage or sessions from the broker at %s (%s): "
                                "reviewing the policy alone\n", admin_path(a->o), a->msg);
                return EXIT_OK;
        } else if (r < 0) {
                return admin_fail(a, r, "io.agentbroker.admin.GetUsage");
        }
        r = fetch_rows(a, "io.agentbroker.admin.ListSessions", "sessions", agents, ret_sessions);
        if (r < 0 && (optional || method_not_found(a))) {
                fprintf(stderr, "agent-brokerctl: warning: no sessions from the broker (%s%s%s): active sessions unknown\n",
                        a->name, *a->name ? ": " : "", a->msg);
        } else if (r < 0) {
                json_decref(*ret_usage);
                *ret_usage = NULL;
                return admin_fail(a, r, "io.agentbroker.admin.ListSessions");
        }
        return EXIT_OK;
}

static void review_help(FILE *f)
{
        fprintf(f, "Usage: agent-brokerctl review [--json|--csv] [--unused-days N] [--policy PATH]\n"
                   "  every agent with its owner, selectors, grants and their use, unused grants,\n"
                   "  active sessions, PAM services and findings; from the broker (admin socket),\n"
                   "  or from the policy at PATH (usage and sessions from the broker if it answers).\n"
                   "  --unused-days N  a grant not used for N days is a finding (default 30)\n"
                   "Exit status: 0 no finding, 1 findings, 2 bad usage, 3 broker unreachable, 4 other error.\n");
}

int cmd_review(const opts *o, int argc, char **argv)
{
        static const struct option lo[] = {
                { "json", no_argument, NULL, 'j' },           { "csv", no_argument, NULL, 'c' },
                { "unused-days", required_argument, NULL, 'u' }, { "policy", required_argument, NULL, 'p' },
                { "help", no_argument, NULL, 'h' },           { 0 },
        };
        review_ctx rc = { .days = REVIEW_DEFAULT_UNUSED_DAYS };
        admin a = { .o = o };
        json_t *agents = NULL, *out = NULL, *ag;
        const char *policy = NULL;
        bool as_json = false, as_csv = false;
        size_t i, n_findings = 0;
        int c, ex;

        optind = 0;
        while ((c = getopt_long(argc, argv, "h", lo, NULL)) >= 0) {
                switch (c) {
                case 'j': as_json = true; break;
                case 'c': as_csv = true; break;
                case 'p': policy = optarg; break;
                case 'u': {
                        char *end;
                        errno = 0;
                        long v = strtol(optarg, &end, 10);
                        if (errno || end == optarg || *end || v < 0 || v > REVIEW_MAX_UNUSED_DAYS) {
                                fprintf(stderr, "agent-brokerctl: --unused-days takes a number of days from 0 to %d\n",
                                        REVIEW_MAX_UNUSED_DAYS);
                                return EXIT_USAGE;
                        }
                        rc.days = v;
                        break;
                }
                case 'h': review_help(stdout); return EXIT_OK;
                default: return EXIT_USAGE; /* getopt_long said why, in one line */
                }
        }
        if (optind != argc || (as_json && as_csv)) {
                fprintf(stderr, "agent-brokerctl: review [--json|--csv] [--unused-days N] [--policy PATH]\n");
                return EXIT_USAGE;
        }
        rc.now = (long long)time(NULL);
        rc.cutoff = rc.now - (long long)rc.days * 86400;

        if (policy)
                ex = policy_from_path(policy, &agents);
        else
                ex = policy_from_broker(&a, &agents);
        if (ex == EXIT_OK)
                ex = fetch_live(&a, agents, policy != NULL, &rc.usage, &rc.sessions);
        admin_done(&a);
        if (ex != EXIT_OK)
                goto done;

        out = json_array();
        if (!out) {
                ex = EXIT_ERROR;
                goto done;
        }
        json_array_foreach(agents, i, ag) {
                json_t *r = review_agent(&rc, ag);
                if (!r) {
                        fprintf(stderr, "agent-brokerctl: review: cannot build the review of agent %zu\n", i);
                        ex = EXIT_ERROR;
                        goto done;
                }
                n_findings += json_array_size(json_object_get(r, "findings"));
                json_array_append_new(out, r);
        }

        if (as_json) {
                ex = print_json(out);
        } else if (as_csv) {
                print_csv(out);
        } else {
                char since[32];
                fmt_time(rc.cutoff, since, sizeof since);
                printf("Access review of %zu agent%s: %zu finding%s\n", json_array_size(out),
                       json_array_size(out) == 1 ? "" : "s", n_findings, n_findings == 1 ? "" : "s");
                printf("policy: %s\n", policy ? policy : "the broker's compiled policy");
                if (rc.usage)
                        printf("usage: from the broker; unused = not used in %ld days (since %s)\n\n", rc.days, since);
                else
                        printf("usage: unknown (no never-used or unused findings)\n\n");
                json_array_foreach(out, i, ag)
                        print_agent_text(ag, rc.now);
        }
        if (fflush(stdout) != 0)
                ex = EXIT_ERROR;
        if (ex == EXIT_OK && n_findings > 0)
                ex = EXIT_DENIED;
done:
        json_decref(out);
        json_decref(agents);
        json_decref(rc.usage);
        json_decref(rc.sessions);
        return ex;
}

/* ---- coverage: reading a PAM directory ------------------------------------------ */

/*
 * The next token of *p as Linux-PAM splits a configuration line: blanks
 * separate tokens; "[...]" is one token (returned without the brackets,
 * "\]" inside it is "]"). NULL at the end of the line.
 */
static char *pam_token(char **p, bool *ret_bracket)
{
        char *s = *p + strspn(*p, " \t\n"), *e, *out;
        char prev = '\0';

        if (ret_bracket)
                *ret_bracket = false;
        if (!*s) {
                *p = s;
                return NULL;
        }
        if (*s == '[') {
                s++;
                for (e = out = s; *e; e++) {
                        if (*e == ']') {
                                if (prev != '\\')
                                        break;
                                out[-1] = ']'; /* "\]" is "]" */
                                prev = ']';
                                continue;
                        }
                        prev = *e;
                        *out++ = *e;
                }
                *p = *e ? e + 1 : e;
                *out = '\0';
                if (ret_bracket)
                        *ret_bracket = true;
                return s;
        }
        e = s + strcspn(s, " \t\n");
        if (*e)
                *e++ = '\0';
        *p = e;
        return s;
}

typedef struct pam_walk {
        const char *dir;
        const char *real;  /* dir with symlinks resolved, or NULL */
        const char *stack[PAM_MAX_DEPTH + 1]; /* files being read, outermost first */
        unsigned depth;
        json_t *hits;      /* [{file, line, control, audience}]: pam_agent_broker.so in the auth stack */
        json_t *problems;  /* this service's [{file, line, message}] */
        json_t *includes;  /* files the service's own file includes (any type) */
} pam_walk;

static void pam_problem(pam_walk *w, const char *file, unsigned line, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));

static void pam_problem(pam_walk *w, const char *file, unsigned line, const char *fmt, ...)
{
        char msg[1024];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        json_array_append_new(w->problems, json_pack("{s:s, s:I, s:s}", "file", file, "line", (json_int_t)line,
                                                     "message", msg));
}

static void pam_walk_file(pam_walk *w, const char *name, const char *from, unsigned from_line);

/* Follow include/substack/@include target from file:line (only auth lines count in it). */
static void pam_follow(pam_walk *w, const char *target, const char *file, unsigned line)
{
        const char *name = target;

        if (target[0] == '/') {
                /* an absolute path is followed when it names a file of this directory */
                const char *dirs[2] = { w->dir, w->real };
                name = NULL;
                for (size_t i = 0; i < 2 && !name; i++) {
                        size_t dl = dirs[i] ? strlen(dirs[i]) : 0;
                        if (dl && strncmp(target, dirs[i], dl) == 0 && target[dl] == '/' && target[dl + 1] &&
                            !strchr(target + dl + 1, '/'))
                                name = target + dl + 1;
                }
                if (!name) {
                        pam_problem(w, file, line, "includes %s, outside the PAM directory: not followed", target);
                        return;
                }
        } else if (strchr(target, '/') || strcmp(target, ".") == 0 || strcmp(target, "..") == 0) {
                pam_problem(w, file, line, "includes %s, not a file of the PAM directory: not followed", target);
                return;
        }
        if (w->depth == 1)
                add_unique(w->includes, name);
        pam_walk_file(w, name, file, line);
}

/* One logical line of file (first physical line number line). */
static void pam_line(pam_walk *w, const char *file, unsigned line, char *text)
{
        char *p = text, *type, *ctl, *mod, *arg;
        const char *base, *audience = NULL;
        bool bracket, auth;

        type = pam_token(&p, NULL);
        if (!type)
                return;
        if (strcasecmp(type, "@include") == 0) {
                char *target = pam_token(&p, NULL);
                if (!target)
                        pam_problem(w, file, line, "@include without a file name");
                else
                        pam_follow(w, target, file, line);
                return;
        }
        if (type[0] == '-')
                type++;
        auth = strcasecmp(type, "auth") == 0;
        if (!auth && strcasecmp(type, "account") != 0 && strcasecmp(type, "password") != 0 &&
            strcasecmp(type, "session") != 0) {
                pam_problem(w, file, line, "unknown module type \"%.64s\"", type);
                return;
        }
        ctl = pam_token(&p, &bracket);
        if (!ctl) {
                pam_problem(w, file, line, "no control flag");
                return;
        }
        if (!bracket && (strcasecmp(ctl, "include") == 0 || strcasecmp(ctl, "substack") == 0)) {
                char *target = pam_token(&p, NULL);
                if (!target) {
                        pam_problem(w, file, line, "%s without a file name", ctl);
                        return;
                }
                if (auth)
                        pam_follow(w, target, file, line);
                else if (w->depth == 1 && !strchr(target, '/'))
                        add_unique(w->includes, target);
                return;
        }
        mod = pam_token(&p, NULL);
        if (!mod) {
                pam_problem(w, file, line, "no module");
                return;
        }
        if (!auth)
                return;
        base = strrchr(mod, '/') ? strrchr(mod, '/') + 1 : mod;
        if (strcmp(base, PAM_MODULE) != 0)
                return;
        while ((arg = pam_token(&p, NULL)))
                if (strncmp(arg, "audience=", 9) == 0)
                        audience = arg + 9; /* the last one counts */
        {
                /* as written, blanks squeezed: "[success=done default=die]" */
                char control[512];
                size_t n = 0;
                if (bracket)
                        control[n++] = '[';
                for (const char *q = ctl; *q && n < sizeof control - 2; q++)
                        if (!strchr(" \t\n", *q) || (n > 0 && control[n - 1] != ' ' && control[n - 1] != '['))
                                control[n++] = strchr(" \t\n", *q) ? ' ' : *q;
                while (n > 1 && control[n - 1] == ' ')
                        n--;
                if (bracket)
                        control[n++] = ']';
                control[n] = '\0';
                json_array_append_new(w->hits, json_pack("{s:s, s:I, s:s, s:s?}", "file", file, "line",
                                                         (json_int_t)line, "control", control, "audience",
                                                         audience && *audience ? audience : NULL));
        }
}

/*
 * Split text into Linux-PAM's logical lines: '#' starts a comment that
 * ends the line; a line whose last non-blank is '\' goes on in the next
 * (the '\' becomes a blank); leading blanks go. Calls pam_line on each.
 */
static void pam_parse(pam_walk *w, const char *file, char *text, size_t len)
{
        char *acc = NULL;
        size_t acc_len = 0, pos = 0;
        unsigned lineno = 0, first = 0;
        bool cont = false;

        while (pos < len) {
                char *s = text + pos, *nl = memchr(s, '\n', len - pos), *e = nl ? nl : text + len, *t, *q;
                size_t n;

                pos = nl ? (size_t)(nl - text) + 1 : len;
                lineno++;
                *e = '\0';
                cont = false;
                if (!memchr(s, '#', (size_t)(e - s))) {
                        for (q = e; q > s && (q[-1] == ' ' || q[-1] == '\t');)
                                q--;
                        if (q > s && q[-1] == '\\') {
                                q[-1] = ' ';
                                *q = '\0';
                                cont = true;
                        }
                }
                t = s + strspn(s, " \t");
                t[strcspn(t, "#")] = '\0';
                n = strlen(t);
                if (acc_len == 0 && n == 0 && !cont)
                        continue;
                if (acc_len == 0)
                        first = lineno;
                {
                        char *na = realloc(acc, acc_len + n + 2);
                        if (!na)
                                break;
                        acc = na;
                        memcpy(acc + acc_len, t, n);
                        acc_len += n;
                        acc[acc_len] = '\0';
                }
                if (cont)
                        continue;
                pam_line(w, file, first, acc);
                acc_len = 0;
        }
        if (cont && acc_len > 0)
                pam_problem(w, file, first, "the file ends inside a continued line: Linux-PAM rejects it");
        free(acc);
}

static void pam_walk_file(pam_walk *w, const char *name, const char *from, unsigned from_line)
{
        char path[PATH_MAX], *text = NULL;
        size_t len = 0;
        int r;

        for (unsigned i = 0; i < w->depth; i++)
                if (strcmp(w->stack[i], name) == 0) {
                        char chain[2048];
                        size_t used = 0;
                        for (unsigned k = i; k < w->depth; k++) {
                                int n = snprintf(chain + used, sizeof chain - used, "%s -> ", w->stack[k]);
                                if (n < 0 || (size_t)n >= sizeof chain - used)
                                        break;
                                used += (size_t)n;
                        }
                        pam_problem(w, from, from_line, "include cycle: %s%s", chain, name);
                        return;
                }
        if (w->depth >= PAM_MAX_DEPTH) {
                pam_problem(w, from, from_line, "includes nested deeper than %d levels: Linux-PAM stops here",
                            PAM_MAX_DEPTH);
                return;
        }
        if (snprintf(path, sizeof path, "%s/%s", w->dir, name) >= (int)sizeof path) {
                pam_problem(w, from ? from : name, from_line, "path too long");
                return;
        }
        r = ab_read_file(path, PAM_MAX_FILE, &text, &len);
        if (r < 0) {
                if (from)
                        pam_problem(w, from, from_line, "includes %s, which %s", name,
                                    r == -ENOENT ? "does not exist" : ab_strerror(r));
                else
                        pam_problem(w, name, 0, "cannot read: %s", ab_strerror(r));
                return;
        }
        w->stack[w->depth++] = name;
        pam_parse(w, name, text, len);
        w->depth--;
        free(text);
}

/* Names a packager or an editor leaves beside service files; PAM services they are not. */
static bool pam_skip_name(const char *n)
{
        static const char *const suffixes[] = { "~", ".dpkg-old", ".dpkg-dist", ".dpkg-new", ".dpkg-tmp",
                                                ".rpmsave", ".rpmnew", ".rpmorig", ".swp", ".ucf-old",
                                                ".ucf-dist", ".ucf-new" };
        size_t l = strlen(n);

        if (n[0] == '.')
                return true;
        for (size_t i = 0; i < AB_ARRAY_SIZE(suffixes); i++) {
                size_t sl = strlen(suffixes[i]);
                if (l > sl && strcmp(n + l - sl, suffixes[i]) == 0)
                        return true;
        }
        return false;
}

static int cmp_str(const void *a, const void *b)
{
        return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The service files of dir, sorted: a JSON array of names. Returns an exit code. */
static int pam_list(const char *dir, json_t **ret)
{
        DIR *d = opendir(dir);
        struct dirent *de;
        char **names = NULL;
        size_t n = 0;
        json_t *arr;
        int ex = EXIT_OK;

        if (!d) {
                fprintf(stderr, "agent-brokerctl: coverage: %s: %s\n", dir, strerror(errno));
                return EXIT_ERROR;
        }
        names = calloc(PAM_MAX_SERVICES, sizeof *names);
        if (!names) {
                closedir(d);
                return EXIT_ERROR;
        }
        while ((de = readdir(d))) {
                struct stat st;
                if (pam_skip_name(de->d_name))
                        continue;
                if (fstatat(dirfd(d), de->d_name, &st, 0) < 0 || !S_ISREG(st.st_mode))
                        continue;
                if (n >= PAM_MAX_SERVICES) {
                        fprintf(stderr, "agent-brokerctl: coverage: more than %d files in %s\n", PAM_MAX_SERVICES,
                                dir);
                        ex = EXIT_ERROR;
                        break;
                }
                if (!(names[n] = strdup(de->d_name))) {
                        ex = EXIT_ERROR;
                        break;
                }
                n++;
        }
        closedir(d);
        arr = ex == EXIT_OK ? json_array() : NULL;
        if (n > 0)
                qsort(names, n, sizeof *names, cmp_str);
        for (size_t i = 0; i < n; i++) {
                if (arr)
                        json_array_append_new(arr, json_string(names[i]));
                free(names[i]);
        }
        free(names);
        if (!arr)
                return EXIT_ERROR;
        *ret = arr;
        return EXIT_OK;
}

/* Walk one service file: {hits, problems, includes}. */
static json_t *pam_walk_service(const char *dir, const char *real, const char *name)
{
        pam_walk w = { .dir = dir, .real = real, .hits = json_array(), .problems = json_array(), .includes = json_array() };
        json_t *r;

        pam_walk_file(&w, name, NULL, 0);
        r = json_pack("{s:o, s:o, s:o, s:[]}", "hits", w.hits, "problems", w.problems, "includes", w.includes,
                      "included_by");
        return r;
}

/* ---- coverage: against the policy ------------------------------------------------- */

/* The audiences a service's module lines ask for: audience= or pam:SERVICE. */
static json_t *effective_audiences(const json_t *hits, const char *service)
{
        json_t *auds = json_array(), *h;
        size_t i;
        char def[PATH_MAX + 8];

        snprintf(def, sizeof def, "pam:%s", service);
        json_array_foreach(hits, i, h)
                add_unique(auds, jstr(h, "audience") ? jstr(h, "audience") : def);
        return auds;
}

static bool in_strings(const json_t *arr, const char *s)
{
        size_t i;
        json_t *v;

        json_array_foreach(arr, i, v)
                if (json_is_string(v) && strcmp(json_string_value(v), s) == 0)
                        return true;
        return false;
}

/* The grants ({agent, audience, users}) whose audience is aud. */
static json_t *grants_for(const json_t *grants, const char *aud)
{
        json_t *out = json_array(), *g;
        size_t i;

        json_array_foreach(grants, i, g)
                if (strcmp(jstr(g, "audience"), aud) == 0)
                        json_array_append(out, g);
        return out;
}

typedef struct coverage {
        json_t *grants;        /* every grant: [{agent, audience, users}] */
        json_t *using_module;  /* (a) */
        json_t *uncovered;     /* (b) */
        json_t *no_grant;      /* (c) */
        json_t *not_configured;
        json_t *problems;
} coverage;

/*
 * Classify service (whose PAM stack is file's walk result wr): using the
 * module (granted through its audiences, or not), or granted by name
 * (pam:SERVICE) without the module: uncovered.
 */
static void classify(coverage *cv, const char *service, const char *file, json_t *wr)
{
        json_t *hits = json_object_get(wr, "hits"), *by_name, *g;
        char name_aud[PATH_MAX + 8];
        size_t i;

        snprintf(name_aud, sizeof name_aud, "pam:%s", service);
        by_name = grants_for(cv->grants, name_aud);
        if (json_array_size(hits) > 0) {
                json_t *auds = effective_audiences(hits, service), *granted = json_array(), *notes = json_array(),
                       *h, *entry;
                bool override = false;
                json_array_foreach(hits, i, h)
                        override = override || jstr(h, "audience") != NULL;
                json_array_foreach(cv->grants, i, g)
                        if (in_strings(auds, jstr(g, "audience")))
                                json_array_append(granted, g);
                json_array_foreach(by_name, i, g)
                        if (!in_strings(auds, name_aud)) {
                                char note[1024];
                                snprintf(note, sizeof note,
                                         "agent %s is granted %s, but the module here asks for another audience: "
                                         "those tokens are refused", jstr(g, "agent"), name_aud);
                                json_array_append_new(notes, json_string(note));
                        }
                entry = json_pack("{s:s, s:s, s:O, s:b, s:O, s:O, s:O, s:O}", "service", service, "file", file,
                                  "audiences", auds, "audience_override", override, "via", hits, "granted_to",
                                  granted, "included_by", json_object_get(wr, "included_by"), "notes", notes);
                json_array_append_new(cv->using_module, entry);
                /* a file that others include is a fragment of their stacks, not a service of its own */
                if (json_array_size(granted) == 0 && json_array_size(json_object_get(wr, "included_by")) == 0)
                        json_array_append_new(cv->no_grant, json_pack("{s:s, s:s, s:O}", "service", service, "file",
                                                                      file, "audiences", auds));
                json_decref(auds);
                json_decref(granted);
                json_decref(notes);
        } else if (json_array_size(by_name) > 0) {
                json_array_append_new(cv->uncovered, json_pack("{s:s, s:s, s:O, s:O}", "service", service, "file",
                                                               file, "granted_to", by_name, "included_by",
                                                               json_object_get(wr, "included_by")));
        }
        json_decref(by_name);
}

static void print_grantees(const json_t *granted)
{
        json_t *g;
        size_t i;
        char users[1024];

        json_array_foreach(granted, i, g) {
                join_strings(json_object_get(g, "users"), ", ", users, sizeof users);
                printf("%s%s (%s, users: %s)", i ? ", " : "", jstr(g, "agent"), jstr(g, "audience"),
                       *users ? users : "none");
        }
}

static void print_coverage_text(const json_t *r)
{
        json_t *e, *v;
        size_t i, k;
        char auds[1024], inc[1024];

        printf("PAM directory %s: %lld services; policy: %s, %lld PAM grants\n\n", jstr(r, "pam_dir"),
               jint(r, "services"), jstr(r, "policy"), jint(r, "pam_grants"));

        printf("Services that use %s in their auth stack: %zu\n", PAM_MODULE,
               json_array_size(json_object_get(r, "using_module")));
        json_array_foreach(json_object_get(r, "using_module"), i, e) {
                join_strings(json_object_get(e, "audiences"), ", ", auds, sizeof auds);
                printf("  %-20s audience %s%s", jstr(e, "service"), auds,
                       json_is_true(json_object_get(e, "audience_override")) ? " (audience= override)" : "");
                if (strcmp(jstr(e, "service"), jstr(e, "file")) != 0)
                        printf(" (no file of its own: %s)", jstr(e, "file"));
                printf("\n      via");
                json_array_foreach(json_object_get(e, "via"), k, v)
                        printf("%s %s:%lld %s", k ? "," : "", jstr(v, "file"), jint(v, "line"), jstr(v, "control"));
                printf("\n");
                if (json_array_size(json_object_get(e, "included_by")) > 0) {
                        join_strings(json_object_get(e, "included_by"), ", ", inc, sizeof inc);
                        printf("      included by %s\n", inc);
                }
                if (json_array_size(json_object_get(e, "granted_to")) > 0) {
                        printf("      granted to ");
                        print_grantees(json_object_get(e, "granted_to"));
                        printf("\n");
                } else {
                        printf("      no grant\n");
                }
                json_array_foreach(json_object_get(e, "notes"), k, v)
                        printf("      note: %s\n", json_string_value(v));
        }

        printf("\nGranted to agents but NOT using %s (paths that bypass the broker): %zu\n", PAM_MODULE,
               json_array_size(json_object_get(r, "uncovered")));
        json_array_foreach(json_object_get(r, "uncovered"), i, e) {
                printf("  %-20s ", jstr(e, "service"));
                if (strcmp(jstr(e, "service"), jstr(e, "file")) != 0)
                        printf("(no file of its own: PAM uses %s) ", jstr(e, "file"));
                printf("granted to ");
                print_grantees(json_object_get(e, "granted_to"));
                printf("\n");
        }

        printf("\nServices that use %s without any grant: %zu\n", PAM_MODULE,
               json_array_size(json_object_get(r, "module_without_grant")));
        json_array_foreach(json_object_get(r, "module_without_grant"), i, e) {
                join_strings(json_object_get(e, "audiences"), ", ", auds, sizeof auds);
                printf("  %-20s audience %s\n", jstr(e, "service"), auds);
        }

        if (json_array_size(json_object_get(r, "not_configured")) > 0) {
                printf("\nGranted services with no PAM configuration here (no file, no \"other\"): %zu\n",
                       json_array_size(json_object_get(r, "not_configured")));
                json_array_foreach(json_object_get(r, "not_configured"), i, e) {
                        printf("  %-20s granted to ", jstr(e, "service"));
                        print_grantees(json_object_get(e, "granted_to"));
                        printf("\n");
                }
        }
        if (json_array_size(json_object_get(r, "problems")) > 0) {
                printf("\nProblems in the PAM configuration: %zu\n", json_array_size(json_object_get(r, "problems")));
                json_array_foreach(json_object_get(r, "problems"), i, e)
                        printf("  %s:%lld: %s\n", jstr(e, "file"), jint(e, "line"), jstr(e, "message"));
        }
        printf("\n%zu uncovered granted path%s\n", json_array_size(json_object_get(r, "uncovered")),
               json_array_size(json_object_get(r, "uncovered")) == 1 ? "" : "s");
}

/* Add each problem of src to dst unless an equal one is there. */
static void merge_problems(json_t *dst, const json_t *src)
{
        json_t *p, *q;
        size_t i, k;

        json_array_foreach(src, i, p) {
                bool seen = false;
                json_array_foreach(dst, k, q)
                        if (json_equal(p, q)) {
                                seen = true;
                                break;
                        }
                if (!seen)
                        json_array_append(dst, p);
        }
}

static void coverage_help(FILE *f)
{
        fprintf(f, "Usage: agent-brokerctl coverage [--pam-dir DIR] [--policy PATH] [--json]\n"
                   "  which PAM services (DIR, default " PAM_DEFAULT_DIR ") put " PAM_MODULE " in their\n"
                   "  auth stack, which are granted to agents in policy (the broker's, or PATH) but\n"
                   "  do not use it, and which use it without any grant.\n"
                   "Exit status: 0 every granted service uses the module, 1 an uncovered granted path,\n"
                   "2 bad usage, 3 broker unreachable, 4 other error.\n");
}

int cmd_coverage(const opts *o, int argc, char **argv)
{
        static const struct option lo[] = {
                { "pam-dir", required_argument, NULL, 'd' }, { "policy", required_argument, NULL, 'p' },
                { "json", no_argument, NULL, 'j' },          { "help", no_argument, NULL, 'h' },
                { 0 },
        };
        coverage cv = { 0 };
        admin a = { .o = o };
        json_t *agents = NULL, *names = NULL, *walks = NULL, *by_svc = NULL, *result = NULL, *ag, *g, *v, *wr;
        const char *policy = NULL, *key;
        char dir[PATH_MAX], *real = NULL;
        bool as_json = false;
        size_t i, k;
        int c, ex;

        snprintf(dir, sizeof dir, "%s", PAM_DEFAULT_DIR);
        optind = 0;
        while ((c = getopt_long(argc, argv, "h", lo, NULL)) >= 0) {
                switch (c) {
                case 'd':
                        if (!*optarg || strlen(optarg) >= sizeof dir - 256) {
                                fprintf(stderr, "agent-brokerctl: --pam-dir: not a usable directory name\n");
                                return EXIT_USAGE;
                        }
                        snprintf(dir, sizeof dir, "%s", optarg);
                        /* "/etc/pam.d/" names the same directory as "/etc/pam.d" */
                        for (size_t n = strlen(dir); n > 1 && dir[n - 1] == '/'; n--)
                                dir[n - 1] = '\0';
                        break;
                case 'p': policy = optarg; break;
                case 'j': as_json = true; break;
                case 'h': coverage_help(stdout); return EXIT_OK;
                default: return EXIT_USAGE; /* getopt_long said why, in one line */
                }
        }
        if (optind != argc) {
                fprintf(stderr, "agent-brokerctl: coverage [--pam-dir DIR] [--policy PATH] [--json]\n");
                return EXIT_USAGE;
        }

        ex = policy ? policy_from_path(policy, &agents) : policy_from_broker(&a, &agents);
        admin_done(&a);
        if (ex != EXIT_OK)
                return ex;
        ex = pam_list(dir, &names);
        if (ex != EXIT_OK)
                goto done;
        real = realpath(dir, NULL);

        ex = EXIT_ERROR;
        cv.grants = json_array();
        cv.using_module = json_array();
        cv.uncovered = json_array();
        cv.no_grant = json_array();
        cv.not_configured = json_array();
        cv.problems = json_array();
        walks = json_object();
        by_svc = json_object(); /* "pam:X" granted without a file X: X -> grants */
        if (!cv.grants || !cv.using_module || !cv.uncovered || !cv.no_grant || !cv.not_configured || !cv.problems ||
            !walks || !by_svc)
                goto done;

        json_array_foreach(agents, i, ag)
                json_array_foreach(json_object_get(ag, "grants"), k, g)
                        if (jstr(g, "audience"))
                                json_array_append_new(cv.grants, json_pack("{s:O, s:O, s:o}", "agent",
                                                                           json_object_get(ag, "id"), "audience",
                                                                           json_object_get(g, "audience"), "users",
                                                                           json_is_array(json_object_get(g, "users"))
                                                                                   ? json_incref(json_object_get(g, "users"))
                                                                                   : json_array()));

        /* every service file's auth stack, and who includes whom */
        json_array_foreach(names, i, v) {
                wr = pam_walk_service(dir, real, json_string_value(v));
                if (!wr)
                        goto done;
                json_object_set_new(walks, json_string_value(v), wr);
                merge_problems(cv.problems, json_object_get(wr, "problems"));
        }
        json_object_foreach(walks, key, wr)
                json_array_foreach(json_object_get(wr, "includes"), k, v) {
                        json_t *target = json_object_get(walks, json_string_value(v));
                        if (target && strcmp(json_string_value(v), key) != 0)
                                add_unique(json_object_get(target, "included_by"), key);
                }

        json_array_foreach(names, i, v)
                classify(&cv, json_string_value(v), json_string_value(v), json_object_get(walks, json_string_value(v)));

        /* granted pam:X with no file X: served by an audience= override, or by "other", or by nothing */
        json_array_foreach(cv.grants, i, g) {
                const char *aud = jstr(g, "audience"), *svc = aud + 4;
                bool served = false;
                size_t e;
                json_t *ent;
                if (strncmp(aud, "pam:", 4) != 0 || (!strchr(svc, '/') && *svc && json_object_get(walks, svc)))
                        continue;
                json_array_foreach(cv.using_module, e, ent)
                        served = served || in_strings(json_object_get(ent, "audiences"), aud);
                if (served)
                        continue;
                if (!json_object_get(by_svc, svc))
                        json_object_set_new(by_svc, svc, json_array());
                json_array_append(json_object_get(by_svc, svc), g);
        }
        json_object_foreach(by_svc, key, v) {
                json_t *other = json_object_get(walks, "other");
                if (other)
                        classify(&cv, key, "other", other);
                else
                        json_array_append_new(cv.not_configured, json_pack("{s:s, s:O}", "service", key,
                                                                           "granted_to", v));
        }

        {
                json_int_t pam_grants = 0;
                json_array_foreach(cv.grants, i, g)
                        pam_grants += strncmp(jstr(g, "audience"), "pam:", 4) == 0;
                result = json_pack("{s:s, s:s, s:I, s:I, s:O, s:O, s:O, s:O, s:O}", "pam_dir", dir, "policy",
                                   policy ? policy : "broker", "services", (json_int_t)json_array_size(names),
                                   "pam_grants", pam_grants, "using_module", cv.using_module, "uncovered",
                                   cv.uncovered, "module_without_grant", cv.no_grant, "not_configured",
                                   cv.not_configured, "problems", cv.problems);
        }
        if (!result)
                goto done;
        if (as_json)
                ex = print_json(result);
        else {
                print_coverage_text(result);
                ex = EXIT_OK;
        }
        if (fflush(stdout) != 0)
                ex = EXIT_ERROR;
        if (ex == EXIT_OK && json_array_size(cv.uncovered) > 0)
                ex = EXIT_DENIED;
done:
        free(real);
        json_decref(result);
        json_decref(agents);
        json_decref(names);
        json_decref(walks);
        json_decref(by_svc);
        json_decref(cv.grants);
        json_decref(cv.using_module);
        json_decref(cv.uncovered);
        json_decref(cv.no_grant);
        json_decref(cv.not_configured);
        json_decref(cv.problems);
        return ex;
}
