/* SPDX-License-Identifier: MIT */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <sodium.h>
#include <unistd.h>
#include "policy.h"
#include "../common/util.h"

typedef struct ctx {
        ab_diag *diag;
        const char *source;
        unsigned errors;
        json_t *groups; /* scope_groups object or NULL */
} ctx;

static void report(ctx *c, int sev, const char *path, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));

static void report(ctx *c, int sev, const char *path, const char *fmt, ...)
{
        char msg[512], where[512];
        va_list ap;

        if (sev == AB_DIAG_WARNING && !c->diag->lint)
                return;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        /* both quote the file's text (a key, a name, jansson's "near '...'"), which goes to
         * terminals (policy check, reload) and logs: no escape sequence of it passes (helper-54) */
        snprintf(where, sizeof where, "%s", path);
        path = where;
        ab_defang(msg);
        ab_defang(where);
        if (sev == AB_DIAG_ERROR) {
                c->errors++;
                c->diag->errors++;
        } else {
                c->diag->warnings++;
        }
        if (c->diag->emit)
                c->diag->emit(c->diag->userdata, sev, c->source, path, msg);
}

int ab_parse_duration(const char *s, uint64_t *ret)
{
        uint64_t v = 0, mul = 1;
        const char *p = s;

        if (!*p)
                return AB_ERR_INVALID;
        for (; *p >= '0' && *p <= '9'; p++) {
                if (v > (UINT64_MAX - 9) / 10)
                        return AB_ERR_INVALID;
                v = v * 10 + (uint64_t)(*p - '0');
        }
        if (p == s)
                return AB_ERR_INVALID;
        switch (*p) {
        case '\0': break;
        case 's': mul = 1; p++; break;
        case 'm': mul = 60; p++; break;
        case 'h': mul = 3600; p++; break;
        case 'd': mul = 86400; p++; break;
        default: return AB_ERR_INVALID;
        }
        if (*p || v > UINT32_MAX / mul)
                return AB_ERR_INVALID;
        *ret = v * mul;
        return 0;
}

/* A duration member: integer seconds or a string with a unit, in [min, max]. */
static int get_duration(ctx *c, json_t *obj, const char *key, const char *path, uint32_t min, uint32_t max,
                        uint32_t dflt, uint32_t *ret)
{
        json_t *v = json_object_get(obj, key);
        uint64_t secs;

        *ret = dflt;
        if (!v)
                return 0;
        if (json_is_integer(v) && json_integer_value(v) >= 0) {
                secs = (uint64_t)json_integer_value(v);
        } else if (!json_is_string(v) || ab_parse_duration(json_string_value(v), &secs) < 0) {
                report(c, AB_DIAG_ERROR, path, "\"%s\" must be seconds or a duration like \"5m\", \"8h\"", key);
                return -1;
        }
        if (secs < min || secs > max) {
                report(c, AB_DIAG_ERROR, path, "\"%s\" must be between %u and %u seconds", key, min, max);
                return -1;
        }
        *ret = (uint32_t)secs;
        return 0;
}

static bool check_keys(ctx *c, json_t *obj, const char *path, const char *const *allowed)
{
        const char *key;
        json_t *v;
        bool ok = true;

        json_object_foreach(obj, key, v) {
                const char *const *a;
                for (a = allowed; *a; a++)
                        if (strcmp(*a, key) == 0)
                                break;
                if (!*a) {
                        report(c, AB_DIAG_ERROR, path, "unknown key \"%s\"", key);
                        ok = false;
                }
        }
        return ok;
}

/* A string member: required or not, printable, 1..max bytes. */
static int get_string(ctx *c, json_t *obj, const char *key, const char *path, bool required, size_t max,
                      const char **ret)
{
        json_t *v = json_object_get(obj, key);

        *ret = NULL;
        if (!v) {
                if (required) {
                        report(c, AB_DIAG_ERROR, path, "\"%s\" is required", key);
                        return -1;
                }
                return 0;
        }
        if (!json_is_string(v) || !ab_is_printable(json_string_value(v), max) ||
            strlen(json_string_value(v)) != json_string_length(v)) {
                report(c, AB_DIAG_ERROR, path, "\"%s\" must be a non-empty printable string of at most %zu bytes",
                       key, max);
                return -1;
        }
        *ret = json_string_value(v);
        return 0;
}

static bool valid_id(const char *s)
{
        size_t n = strlen(s);
        if (n == 0 || n > AB_ID_MAX)
                return false;
        for (; *s; s++)
                if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
                      *s == '-' || *s == '_' || *s == '.' || *s == '@'))
                        return false;
        return true;
}

static bool valid_sha256(const char *s)
{
        if (strlen(s) != 64)
                return false;
        for (; *s; s++)
                if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f')))
                        return false;
        return true;
}

static bool is_wildcard(const char *scope)
{
        size_t n = strlen(scope);
        return n > 0 && scope[n - 1] == '*';
}

/* Append the scopes of array arr (scope names or "@group") to g. */
static int add_scopes(ctx *c, ab_grant *g, json_t *arr, const char *path, int depth)
{
        size_t i;
        json_t *v;

        json_array_foreach(arr, i, v) {
                const char *s;
                char p[320];

                snprintf(p, sizeof p, "%s[%zu]", path, i);
                if (!json_is_string(v)) {
                        report(c, AB_DIAG_ERROR, p, "a scope must be a string");
                        return -1;
                }
                s = json_string_value(v);
                if (s[0] == '@' && depth == 0) {
                        json_t *grp = c->groups ? json_object_get(c->groups, s + 1) : NULL;
                        if (!json_is_array(grp)) {
                                report(c, AB_DIAG_ERROR, p, "unknown scope group \"%s\"", s + 1);
                                return -1;
                        }
                        if (add_scopes(c, g, grp, p, 1) < 0)
                                return -1;
                        continue;
                }
                if (!ab_is_scope_token(s, json_string_length(v)) || json_string_length(v) > AB_SCOPE_MAX ||
                    s[0] == '@' || strchr(s, '*') != strrchr(s, '*') || (strchr(s, '*') && !is_wildcard(s))) {
                        report(c, AB_DIAG_ERROR, p,
                               "invalid scope \"%.64s\" (printable ASCII without spaces or quotes, at most %d bytes; "
                               "'*' only at the end)", s, AB_SCOPE_MAX);
                        return -1;
                }
                if (g->n_scopes >= AB_POLICY_MAX_SCOPES) {
                        report(c, AB_DIAG_ERROR, path, "more than %d scopes in one grant", AB_POLICY_MAX_SCOPES);
                        return -1;
                }
                if (is_wildcard(s))
                        report(c, AB_DIAG_WARNING, p, "wildcard scope \"%s\" grants more than is named", s);
                g->scopes[g->n_scopes++] = s;
        }
        return 0;
}

static void hash_str(crypto_hash_sha256_state *h, const char *s)
{
        crypto_hash_sha256_update(h, (const unsigned char *)s, strlen(s) + 1); /* with its NUL: no two lists alike */
}

/*
 * A grant's id: the first 8 bytes of the SHA-256 of everything it says, in
 * hex. A token carries the id of the grant that issued it, so that
 * Introspect judges it by that grant while the policy still has it; a
 * grant changed in any way is another grant.
 */
static void grant_id(ab_grant *g)
{
        crypto_hash_sha256_state h;
        unsigned char d[crypto_hash_sha256_BYTES];
        char n[64];

        crypto_hash_sha256_init(&h);
        hash_str(&h, g->audience);
        snprintf(n, sizeof n, "%zu %u %u %zu", g->n_scopes, g->max_ttl, g->max_auth_age,
                 g->users ? g->n_users : SIZE_MAX);
        hash_str(&h, n);
        for (size_t i = 0; i < g->n_scopes; i++)
                hash_str(&h, g->scopes[i]);
        for (size_t i = 0; g->users && i < g->n_users; i++)
                hash_str(&h, g->users[i]);
        crypto_hash_sha256_final(&h, d);
        sodium_bin2hex(g->id, sizeof g->id, d, AB_GRANT_ID_LEN / 2);
}

static int parse_grant(ctx *c, json_t *jg, const char *path, ab_grant *g)
{
        static const char *const keys[] = { "audience", "scopes", "max_ttl", "max_auth_age", "users", NULL };
        json_t *scopes, *users;
        char p[320];

        if (!json_is_object(jg)) {
                report(c, AB_DIAG_ERROR, path, "a grant must be an object");
                return -1;
        }
        if (!check_keys(c, jg, path, keys))
                return -1;
        if (get_string(c, jg, "audience", path, true, AB_POLICY_MAX_STR, &g->audience) < 0)
                return -1;
        if (strchr(g->audience, '*'))
                report(c, AB_DIAG_WARNING, path, "'*' in an audience is not a wildcard; it only matches itself");
        scopes = json_object_get(jg, "scopes");
        snprintf(p, sizeof p, "%s.scopes", path);
        if (!json_is_array(scopes) || json_array_size(scopes) == 0) {
                report(c, AB_DIAG_ERROR, p, "\"scopes\" must be a non-empty array");
                return -1;
        }
        if (json_array_size(scopes) > AB_POLICY_MAX_SCOPES) {
                report(c, AB_DIAG_ERROR, p, "more than %d scopes", AB_POLICY_MAX_SCOPES);
                return -1;
        }
        g->scopes = calloc(AB_POLICY_MAX_SCOPES, sizeof *g->scopes);
        if (!g->scopes)
                return -ENOMEM;
        if (add_scopes(c, g, scopes, p, 0) < 0)
                return -1;
        if (get_duration(c, jg, "max_ttl", path, 1, AB_TTL_MAX, AB_DEFAULT_TTL, &g->max_ttl) < 0 ||
            get_duration(c, jg, "max_auth_age", path, 1, 30 * 86400, 0, &g->max_auth_age) < 0)
                return -1;
        if (g->max_ttl > 3600)
                report(c, AB_DIAG_WARNING, path, "max_ttl above 1h (%u s): tokens should be short-lived",
                       g->max_ttl);
        users = json_object_get(jg, "users");
        if (users) {
                size_t i;
                json_t *u;
                snprintf(p, sizeof p, "%s.users", path);
                if (strncmp(g->audience, "pam:", 4) != 0)
                        report(c, AB_DIAG_WARNING, p,
                               "\"users\" applies to logins (a pam: audience); on %s it only limits Introspect's user",
                               g->audience);
                if (!json_is_array(users) || json_array_size(users) > AB_POLICY_MAX_USERS) {
                        report(c, AB_DIAG_ERROR, p, "\"users\" must be an array of at most %d user names",
                               AB_POLICY_MAX_USERS);
                        return -1;
                }
                g->users = calloc(json_array_size(users) + 1, sizeof *g->users);
                if (!g->users)
                        return -ENOMEM;
                json_array_foreach(users, i, u) {
                        if (!json_is_string(u) || !ab_is_scope_token(json_string_value(u), json_string_length(u)) ||
                            json_string_length(u) > AB_ID_MAX) {
                                report(c, AB_DIAG_ERROR, p, "user names must be non-empty strings without spaces");
                                return -1;
                        }
                        g->users[g->n_users++] = json_string_value(u);
                }
        }
        grant_id(g);
        return 0;
}

static int parse_match(ctx *c, json_t *m, const char *path, ab_agent *a)
{
        static const char *const keys[] = { "uid", "user", "gid", "group", "exe", "sha256", "unit", NULL };
        json_t *v;

        if (!json_is_object(m) || json_object_size(m) == 0) {
                report(c, AB_DIAG_ERROR, path,
                       "\"match\" must be a non-empty object: an agent without selectors would match every process");
                return -1;
        }
        if (!check_keys(c, m, path, keys))
                return -1;
        a->resolved = true;
        if ((v = json_object_get(m, "uid"))) {
                if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= UINT32_MAX) {
                        report(c, AB_DIAG_ERROR, path, "\"uid\" must be a non-negative integer");
                        return -1;
                }
                a->has_uid = true;
                a->uid = (uid_t)json_integer_value(v);
        }
        if ((v = json_object_get(m, "gid"))) {
                if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= UINT32_MAX) {
                        report(c, AB_DIAG_ERROR, path, "\"gid\" must be a non-negative integer");
                        return -1;
                }
                a->has_gid = true;
                a->gid = (gid_t)json_integer_value(v);
        }
        if (get_string(c, m, "user", path, false, AB_ID_MAX, &a->user) < 0 ||
            get_string(c, m, "group", path, false, AB_ID_MAX, &a->group) < 0 ||
            get_string(c, m, "exe", path, false, AB_EXE_MAX - 1, &a->exe) < 0 ||
            get_string(c, m, "sha256", path, false, 64, &a->sha256) < 0 ||
            get_string(c, m, "unit", path, false, AB_UNIT_MAX - 1, &a->unit) < 0)
                return -1;
        if (a->user && a->has_uid) {
                report(c, AB_DIAG_ERROR, path, "give \"uid\" or \"user\", not both");
                return -1;
        }
        if (a->group && a->has_gid) {
                report(c, AB_DIAG_ERROR, path, "give \"gid\" or \"group\", not both");
                return -1;
        }
        if (a->exe && a->exe[0] != '/') {
                report(c, AB_DIAG_ERROR, path, "\"exe\" must be an absolute path");
                return -1;
        }
        if (a->sha256 && !valid_sha256(a->sha256)) {
                report(c, AB_DIAG_ERROR, path, "\"sha256\" must be 64 lowercase hex digits");
                return -1;
        }
        if (a->user && strcmp(a->user, "@broker") == 0) {
                /* The user the broker itself runs as: for per-user brokers and demos. */
                a->has_uid = true;
                a->uid = geteuid();
                report(c, AB_DIAG_WARNING, path, "\"@broker\" matches whoever runs the broker; name the user on a shared host");
        } else if (a->user) {
                struct passwd pw, *res = NULL;
                char buf[4096];
                if (getpwnam_r(a->user, &pw, buf, sizeof buf, &res) == 0 && res) {
                        a->has_uid = true;
                        a->uid = res->pw_uid;
                } else {
                        a->resolved = false;
                        report(c, AB_DIAG_WARNING, path, "user \"%s\" is unknown on this host; the agent cannot match",
                               a->user);
                }
        }
        if (a->group) {
                struct group gr, *res = NULL;
                char buf[16384];
                if (getgrnam_r(a->group, &gr, buf, sizeof buf, &res) == 0 && res) {
                        a->has_gid = true;
                        a->gid = res->gr_gid;
                } else {
                        a->resolved = false;
                        report(c, AB_DIAG_WARNING, path,
                               "group \"%s\" is unknown on this host; the agent cannot match", a->group);
                }
        }
        if (!a->has_uid && !a->user && !a->has_gid && !a->group)
                report(c, AB_DIAG_WARNING, path, "no uid/user or gid/group selector: processes of any user may match");
        if (!a->sha256 && !a->unit)
                report(c, AB_DIAG_WARNING, path,
                       "no \"sha256\" or \"unit\" selector: any program of the matched user is this agent");
        return 0;
}

static int parse_agent(ctx *c, json_t *ja, const char *path, ab_agent *a)
{
        static const char *const keys[] = { "id", "owner", "description", "match", "session", "grants",
                                            "max_delegation_depth", NULL };
        json_t *grants, *sess, *v;
        size_t i;
        char p[320];
        int r;

        if (!json_is_object(ja)) {
                report(c, AB_DIAG_ERROR, path, "an agent must be an object");
                return -1;
        }
        a->source = c->source;
        if (!check_keys(c, ja, path, keys))
                return -1;
        if (get_string(c, ja, "id", path, true, AB_ID_MAX, &a->id) < 0)
                return -1;
        if (!valid_id(a->id)) {
                report(c, AB_DIAG_ERROR, path, "\"id\" may hold only letters, digits and - _ . @ (at most %d)",
                       AB_ID_MAX);
                return -1;
        }
        if (get_string(c, ja, "owner", path, true, AB_POLICY_MAX_STR, &a->owner) < 0 ||
            get_string(c, ja, "description", path, false, 1024, &a->description) < 0)
                return -1;
        snprintf(p, sizeof p, "%s.match", path);
        if (parse_match(c, json_object_get(ja, "match"), p, a) < 0)
                return -1;
        a->max_lifetime = AB_DEFAULT_MAX_LIFETIME;
        a->reauth_interval = AB_DEFAULT_REAUTH;
        if ((sess = json_object_get(ja, "session"))) {
                static const char *const skeys[] = { "max_lifetime", "reauth_interval", NULL };
                snprintf(p, sizeof p, "%s.session", path);
                if (!json_is_object(sess)) {
                        report(c, AB_DIAG_ERROR, p, "\"session\" must be an object");
                        return -1;
                }
                if (!check_keys(c, sess, p, skeys) ||
                    get_duration(c, sess, "max_lifetime", p, 60, 30 * 86400, AB_DEFAULT_MAX_LIFETIME,
                                 &a->max_lifetime) < 0 ||
                    get_duration(c, sess, "reauth_interval", p, 1, 30 * 86400, AB_DEFAULT_REAUTH,
                                 &a->reauth_interval) < 0)
                        return -1;
        }
        a->max_delegation_depth = 1;
        if ((v = json_object_get(ja, "max_delegation_depth"))) {
                if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 8) {
                        report(c, AB_DIAG_ERROR, path, "\"max_delegation_depth\" must be an integer from 0 to 8");
                        return -1;
                }
                a->max_delegation_depth = (uint32_t)json_integer_value(v);
        }
        grants = json_object_get(ja, "grants");
        snprintf(p, sizeof p, "%s.grants", path);
        if (!json_is_array(grants)) {
                report(c, AB_DIAG_ERROR, p, "\"grants\" must be an array");
                return -1;
        }
        if (json_array_size(grants) > AB_POLICY_MAX_GRANTS) {
                report(c, AB_DIAG_ERROR, p, "more than %d grants", AB_POLICY_MAX_GRANTS);
                return -1;
        }
        a->grants = calloc(json_array_size(grants) + 1, sizeof *a->grants);
        if (!a->grants)
                return -ENOMEM;
        json_array_foreach(grants, i, v) {
                snprintf(p, sizeof p, "%s.grants[%zu]", path, i);
                r = parse_grant(c, v, p, &a->grants[a->n_grants++]);
                if (r < 0)
                        return r;
        }
        return 0;
}

static void free_agent(ab_agent *a)
{
        for (size_t i = 0; i < a->n_grants; i++) {
                free(a->grants[i].scopes);
                free(a->grants[i].users);
        }
        free(a->grants);
}

int ab_policy_new(ab_policy **ret)
{
        ab_policy *p = calloc(1, sizeof *p);
        if (!p)
                return -ENOMEM;
        p->docs = json_array();
        if (!p->docs) {
                free(p);
                return -ENOMEM;
        }
        *ret = p;
        return 0;
}

void ab_policy_free(ab_policy *p)
{
        if (!p)
                return;
        for (size_t i = 0; i < p->n_agents; i++)
                free_agent(&p->agents[i]);
        free(p->agents);
        json_decref(p->docs);
        free(p);
}

static int check_groups(ctx *c, json_t *groups)
{
        const char *name;
        json_t *arr;

        if (!json_is_object(groups)) {
                report(c, AB_DIAG_ERROR, "$.scope_groups", "\"scope_groups\" must be an object of arrays");
                return -1;
        }
        json_object_foreach(groups, name, arr) {
                char p[320];
                snprintf(p, sizeof p, "$.scope_groups.%.64s", name);
                if (!valid_id(name) || !json_is_array(arr) || json_array_size(arr) == 0 ||
                    json_array_size(arr) > AB_POLICY_MAX_SCOPES) {
                        report(c, AB_DIAG_ERROR, p,
                               "a scope group needs a simple name and a non-empty array of at most %d scopes",
                               AB_POLICY_MAX_SCOPES);
                        return -1;
                }
        }
        return 0;
}

/* Lint: the same audience granted to two agents whose selectors may overlap. */
static bool may_overlap(const ab_agent *a, const ab_agent *b)
{
        if (a->has_uid && b->has_uid && a->uid != b->uid)
                return false;
        if (a->has_gid && b->has_gid && a->gid != b->gid)
                return false;
        if (a->exe && b->exe && strcmp(a->exe, b->exe) != 0)
                return false;
        if (a->sha256 && b->sha256 && strcmp(a->sha256, b->sha256) != 0)
                return false;
        if (a->unit && b->unit && strcmp(a->unit, b->unit) != 0)
                return false;
        return true;
}

/*
 * One warning per grant whose audience an earlier agent with overlapping
 * selectors also has (naming the first such agent), at most
 * LINT_OVERLAP_MAX of them, and at most LINT_OVERLAP_WORK comparisons: a
 * small hostile file of many agents with many grants must not make
 * millions of findings or minutes of work.
 */
#define LINT_OVERLAP_MAX 100
#define LINT_OVERLAP_WORK (20u * 1000 * 1000)

static void lint_overlaps(ctx *c, const ab_agent *agents, size_t n, size_t first_new)
{
        size_t found = 0, more = 0;
        unsigned long work = 0;

        for (size_t i = first_new; i < n; i++)
                for (size_t gi = 0; gi < agents[i].n_grants; gi++) {
                        const ab_agent *other = NULL;
                        for (size_t j = 0; j < i && !other; j++) {
                                if (++work > LINT_OVERLAP_WORK) {
                                        report(c, AB_DIAG_WARNING, "$",
                                               "too many agents and grants to check every overlap of selectors; "
                                               "the check stopped at agent %zu",
                                               i - first_new);
                                        goto out;
                                }
                                if (!may_overlap(&agents[i], &agents[j]))
                                        continue;
                                for (size_t gj = 0; gj < agents[j].n_grants && !other; gj++, work++)
                                        if (strcmp(agents[i].grants[gi].audience, agents[j].grants[gj].audience) == 0)
                                                other = &agents[j];
                        }
                        if (!other)
                                continue;
                        if (found++ < LINT_OVERLAP_MAX) {
                                char p[64];
                                snprintf(p, sizeof p, "$.agents[%zu].grants[%zu]", i - first_new, gi);
                                report(c, AB_DIAG_WARNING, p,
                                       "audience \"%.100s\" is also granted to agent \"%s\" whose selectors overlap; "
                                       "only the first matching agent is used",
                                       agents[i].grants[gi].audience, other->id);
                        } else {
                                more++;
                        }
                }
out:
        if (more)
                report(c, AB_DIAG_WARNING, "$", "%zu more grants whose audience an agent with overlapping selectors "
                                                 "also has (not listed)",
                       more);
}

/*
 * A source name (a path) must be printable UTF-8: it goes into findings,
 * log lines, audit records and the compiled store, all of them JSON or
 * text. *safe gets a printable-ASCII copy ('?' for anything else) to name
 * it in an error.
 */
static bool source_name_ok(const char *name, char *safe, size_t safemax)
{
        bool ok = true;
        size_t i = 0;
        json_t *j;

        for (const unsigned char *q = (const unsigned char *)name; *q; q++) {
                if (ab_control_len((const char *)q))
                        ok = false; /* C1 and bidi controls too: a terminal acts on them */
                if (i + 1 < safemax)
                        safe[i++] = *q >= 0x20 && *q < 0x7f ? (char)*q : '?';
        }
        if (safemax)
                safe[i] = '\0';
        j = ok ? json_string(name) : NULL; /* NULL: not valid UTF-8 */
        ok = j != NULL;
        json_decref(j);
        return ok;
}

int ab_policy_add_document(ab_policy *p, const char *source, const char *text, size_t len, ab_diag *diag)
{
        static const char *const keys[] = { "version", "scope_groups", "agents", "$schema", NULL };
        ctx c = { .diag = diag, .source = source };
        json_error_t jerr;
        json_t *doc, *agents, *v, *src;
        ab_agent *all = NULL;
        size_t i, n_old = p->n_agents;
        int r = AB_ERR_POLICY;
        char safe[512];

        if (!source_name_ok(source, safe, sizeof safe)) {
                c.source = safe;
                report(&c, AB_DIAG_ERROR, "$", "the file name is not printable UTF-8 (shown with '?'); rename it");
                return AB_ERR_POLICY;
        }
        if (len > AB_POLICY_MAX_FILE) {
                report(&c, AB_DIAG_ERROR, "$", "document larger than %d bytes", AB_POLICY_MAX_FILE);
                return AB_ERR_TOO_LARGE;
        }
        doc = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
        if (!doc) {
                char where[64];
                snprintf(where, sizeof where, "line %d column %d", jerr.line, jerr.column);
                report(&c, AB_DIAG_ERROR, where, "invalid JSON: %s", jerr.text);
                return AB_ERR_POLICY;
        }
        if (!json_is_object(doc)) {
                report(&c, AB_DIAG_ERROR, "$", "a policy document must be a JSON object");
                json_decref(doc);
                return AB_ERR_POLICY;
        }
        /* The source name must outlive this call: it is kept beside the document. */
        src = json_stringn_nocheck(source, strlen(source));
        if (!src) {
                json_decref(doc);
                return -ENOMEM;
        }
        c.source = json_string_value(src);
        if (!check_keys(&c, doc, "$", keys))
                goto out;
        v = json_object_get(doc, "version");
        if (!json_is_integer(v) || json_integer_value(v) < 1) {
                report(&c, AB_DIAG_ERROR, "$.version", "\"version\" must be an integer >= 1");
                goto out;
        }
        c.groups = json_object_get(doc, "scope_groups");
        if (c.groups && check_groups(&c, c.groups) < 0)
                goto out;
        agents = json_object_get(doc, "agents");
        if (!json_is_array(agents)) {
                report(&c, AB_DIAG_ERROR, "$.agents", "\"agents\" must be an array");
                goto out;
        }
        if (json_array_size(agents) > AB_POLICY_MAX_AGENTS - n_old) {
                report(&c, AB_DIAG_ERROR, "$.agents", "more than %d agents in all", AB_POLICY_MAX_AGENTS);
                goto out;
        }
        all = calloc(n_old + json_array_size(agents) + 1, sizeof *all);
        if (!all) {
                r = -ENOMEM;
                goto out;
        }
        if (n_old)
                memcpy(all, p->agents, n_old * sizeof *all);
        json_array_foreach(agents, i, v) {
                char path[64];
                ab_agent *a = &all[n_old + i];
                int k;

                snprintf(path, sizeof path, "$.agents[%zu]", i);
                k = parse_agent(&c, v, path, a);
                if (k == -ENOMEM) {
                        r = k;
                        goto out_agents;
                }
                for (size_t j = 0; a->id && j < n_old + i; j++)
                        if (all[j].id && strcmp(all[j].id, a->id) == 0)
                                report(&c, AB_DIAG_ERROR, path, "duplicate agent id \"%s\" (also in %s)", a->id,
                                       all[j].source);
        }
        if (c.errors > 0)
                goto out_agents;
        if (diag->lint)
                lint_overlaps(&c, all, n_old + json_array_size(agents), n_old);
        if (json_array_append(p->docs, doc) < 0 || json_array_append(p->docs, src) < 0) {
                r = -ENOMEM;
                goto out_agents;
        }
        free(p->agents);
        p->agents = all;
        p->n_agents = n_old + json_array_size(agents);
        p->serial++;
        all = NULL;
        r = 0;
out_agents:
        if (all)
                for (i = n_old; i < n_old + json_array_size(agents); i++)
                        free_agent(&all[i]);
out:
        free(all);
        json_decref(src);
        json_decref(doc);
        return r;
}

/*
 * Whether the POSIX access ACL of fd (if any) lets a user or group other
 * than root and uid / gid write: the mode's group bits then show the ACL
 * mask, not who may write. Entries (after a 4-byte header): tag u16, perm
 * u16, id u32, little-endian; ACL_USER 2, ACL_GROUP 8, write 2.
 */
static bool acl_lets_others_write(int fd, uid_t uid, gid_t gid)
{
        uint8_t buf[4 + 8 * 64];
        ssize_t n = fgetxattr(fd, "system.posix_acl_access", buf, sizeof buf);

        if (n < 0)
                return errno == ERANGE; /* more entries than any sane file has: refuse */
        for (ssize_t off = 4; off + 8 <= n; off += 8) {
                unsigned tag = buf[off] | buf[off + 1] << 8, perm = buf[off + 2] | buf[off + 3] << 8;
                uint32_t id = (uint32_t)buf[off + 4] | (uint32_t)buf[off + 5] << 8 | (uint32_t)buf[off + 6] << 16 |
                              (uint32_t)buf[off + 7] << 24;
                if (!(perm & 2))
                        continue;
                if (tag == 2 && id != 0 && id != (uint32_t)uid)
                        return true;
                if (tag == 8 && id != 0 && id != (uint32_t)gid)
                        return true;
        }
        return false;
}

/* Whether users other than root and uid / gid may write fd, whose stat is st: by its mode or its ACL. */
static bool others_may_write(int fd, const struct stat *st, uid_t uid, gid_t gid)
{
        return (st->st_mode & S_IWOTH) || ((st->st_mode & S_IWGRP) && st->st_gid != 0 && st->st_gid != gid) ||
               acl_lets_others_write(fd, uid, gid);
}

/* The rule for fd, whose stat is st: owned by root or this process's user, and nobody else may write it. */
static bool fd_owned_safely(int fd, const struct stat *st)
{
        return (st->st_uid == 0 || st->st_uid == geteuid()) && !others_may_write(fd, st, geteuid(), getegid());
}

int ab_trust_problem(const char *path, uid_t *ret_owner)
{
        struct stat st;
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK), r = 0;

        if (fd < 0)
                return 0; /* reading it says why */
        if (fstat(fd, &st) == 0) {
                *ret_owner = st.st_uid;
                /* judged as for a broker running as root, whoever runs the check */
                if (others_may_write(fd, &st, 0, 0))
                        r = 2;
                else if (st.st_uid != 0)
                        r = 1;
        }
        close(fd);
        return r;
}

DIR *ab_opendir_trusted(const char *path)
{
        struct stat st;
        DIR *d;
        int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

        if (fd < 0)
                return NULL;
        if (fstat(fd, &st) < 0 || !fd_owned_safely(fd, &st)) {
                close(fd);
                errno = EPERM;
                return NULL;
        }
        d = fdopendir(fd);
        if (!d) {
                int e = errno;
                close(fd);
                errno = e;
        }
        return d;
}

static int read_file(const char *path, size_t max, bool trusted, char **ret_buf, size_t *ret_len);

int ab_read_file(const char *path, size_t max, char **ret_buf, size_t *ret_len)
{
        return read_file(path, max, false, ret_buf, ret_len);
}

int ab_read_trusted_file(const char *path, size_t max, char **ret_buf, size_t *ret_len)
{
        return read_file(path, max, true, ret_buf, ret_len);
}

static int read_file(const char *path, size_t max, bool trusted, char **ret_buf, size_t *ret_len)
{
        struct stat st;
        char *buf = NULL;
        size_t len = 0;
        int fd, r;

        /* O_NONBLOCK: a FIFO planted in the policy dir must not hang us */
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0) {
                r = -errno;
                goto out;
        }
        if (!S_ISREG(st.st_mode)) {
                r = -EINVAL;
                goto out;
        }
        if (trusted && !fd_owned_safely(fd, &st)) {
                r = -EPERM;
                goto out;
        }
        if ((uint64_t)st.st_size > max) {
                r = AB_ERR_TOO_LARGE;
                goto out;
        }
        buf = malloc((size_t)st.st_size + 1);
        if (!buf) {
                r = -ENOMEM;
                goto out;
        }
        for (;;) {
                ssize_t n = read(fd, buf + len, (size_t)st.st_size + 1 - len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        r = -errno;
                        goto out;
                }
                if (n == 0)
                        break;
                len += (size_t)n;
                if (len > (size_t)st.st_size) { /* grew while reading */
                        r = AB_ERR_TOO_LARGE;
                        goto out;
                }
        }
        buf[len] = '\0';
        *ret_buf = buf;
        *ret_len = len;
        buf = NULL;
        r = 0;
out:
        free(buf);
        ab_close(fd);
        return r;
}

static int add_file(ab_policy *p, const char *path, ab_diag *diag)
{
        char *text = NULL;
        size_t len = 0;
        int r = ab_read_file(path, AB_POLICY_MAX_FILE, &text, &len);

        if (r < 0) {
                ctx c = { .diag = diag, .source = path };
                report(&c, AB_DIAG_ERROR, "$", "cannot read: %s", ab_strerror(r));
                return r == AB_ERR_TOO_LARGE ? r : AB_ERR_POLICY;
        }
        r = ab_policy_add_document(p, path, text, len, diag);
        free(text);
        return r;
}

static int cmp_names(const void *a, const void *b)
{
        return strcmp(*(char *const *)a, *(char *const *)b);
}

int ab_policy_load_path(const char *path, ab_diag *diag, ab_policy **ret)
{
        ab_policy *p = NULL;
        struct stat st;
        int r;

        r = ab_policy_new(&p);
        if (r < 0)
                return r;
        if (stat(path, &st) < 0) {
                ctx c = { .diag = diag, .source = path };
                r = -errno;
                report(&c, AB_DIAG_ERROR, "$", "cannot open: %s", ab_strerror(r));
                goto out;
        }
        if (S_ISDIR(st.st_mode)) {
                DIR *d = opendir(path);
                struct dirent *de;
                char **names = NULL;
                size_t n = 0, cap = 0;

                if (!d) {
                        r = -errno;
                        goto out;
                }
                while ((de = readdir(d))) {
                        size_t l = strlen(de->d_name);
                        if (de->d_name[0] == '.' || l < 6 || strcmp(de->d_name + l - 5, ".json") != 0)
                                continue;
                        if (n == cap) {
                                char **nn;
                                if (cap >= 1024) {
                                        ctx c = { .diag = diag, .source = path };
                                        report(&c, AB_DIAG_ERROR, "$",
                                               "more than 1024 policy files in the directory");
                                        r = AB_ERR_TOO_LARGE;
                                        break;
                                }
                                cap = cap ? cap * 2 : 16;
                                nn = realloc(names, cap * sizeof *names);
                                if (!nn) {
                                        r = -ENOMEM;
                                        break;
                                }
                                names = nn;
                        }
                        if (asprintf(&names[n], "%s/%s", path, de->d_name) < 0) {
                                r = -ENOMEM;
                                break;
                        }
                        n++;
                }
                closedir(d);
                if (r == 0) {
                        if (n > 0)
                                qsort(names, n, sizeof *names, cmp_names);
                        for (size_t i = 0; i < n; i++) {
                                int k = add_file(p, names[i], diag);
                                if (k < 0 && r == 0)
                                        r = k; /* keep going: report every file's findings */
                        }
                }
                for (size_t i = 0; i < n; i++)
                        free(names[i]);
                free(names);
        } else {
                r = add_file(p, path, diag);
        }
out:
        if (r < 0) {
                ab_policy_free(p);
                return r;
        }
        *ret = p;
        return 0;
}

/*
 * The exe selector: the path /proc/PID/exe shows, and, when the broker knows
 * the file the process runs, that very file at that path in the broker's
 * view. A path alone can be made up: in a mount namespace of its own any
 * user can put its own program at the path the policy names.
 */
static bool exe_matches(const char *want, const ab_identity *id)
{
        char host[AB_EXE_MAX + 16];
        struct stat st;

        if (strcmp(want, id->exe) != 0)
                return false;
        if (!id->exe_known)
                return true; /* unit tests: the broker knows the file whenever it has the path */
        /* the path as the host sees it (PID 1's mount namespace), past the broker's own sandbox
         * (ProtectHome=, PrivateTmp=); where the broker may not look there, in its own view */
        snprintf(host, sizeof host, "/proc/1/root%s", want);
        if (stat(host, &st) == 0 || ((errno == EACCES || errno == EPERM) && stat(want, &st) == 0))
                return st.st_dev == id->exe_dev && st.st_ino == id->exe_ino;
        /* the broker cannot see the path (its sandbox hides it, or the process runs in a mount
         * namespace of its own, e.g. PrivateTmp=): the kernel's path can be trusted only from a
         * process that cannot have mounted anything over it, i.e. one in the broker's user
         * namespace (mounting needs CAP_SYS_ADMIN there) */
        return !id->foreign_userns;
}

const ab_agent *ab_policy_match(const ab_policy *p, const ab_identity *id)
{
        for (size_t i = 0; i < p->n_agents; i++) {
                const ab_agent *a = &p->agents[i];
                if (!a->resolved)
                        continue;
                if (a->has_uid && a->uid != id->uid)
                        continue;
                if (a->has_gid && a->gid != id->gid && !(id->peer && ab_peer_in_group(id->peer, a->gid)))
                        continue;
                if (a->exe && !exe_matches(a->exe, id))
                        continue;
                if (a->sha256 && strcmp(a->sha256, id->sha256) != 0)
                        continue;
                if (a->unit && strcmp(a->unit, id->unit) != 0)
                        continue;
                return a;
        }
        return NULL;
}

/*
 * Whether g covers want (exactly, or by a trailing-'*' prefix); with
 * ret_wild, also which wildcard of g covers it when g does not name it
 * exactly (NULL when it does).
 */
static bool grant_match(const ab_grant *g, const char *want, const char **ret_wild)
{
        const char *wild = NULL;

        for (size_t i = 0; i < g->n_scopes; i++) {
                const char *s = g->scopes[i];
                size_t n = strlen(s);
                if (n > 0 && s[n - 1] == '*') {
                        if (strncmp(s, want, n - 1) != 0 || wild)
                                continue;
                        if (!ret_wild)
                                return true;
                        wild = s; /* a later exact name still wins */
                } else if (strcmp(s, want) == 0) {
                        if (ret_wild)
                                *ret_wild = NULL;
                        return true;
                }
        }
        if (ret_wild)
                *ret_wild = wild;
        return wild != NULL;
}

bool ab_grant_covers(const ab_grant *g, const char *want)
{
        return grant_match(g, want, NULL);
}

const char *ab_grant_wildcard_for(const ab_grant *g, const char *want)
{
        const char *wild;

        (void)grant_match(g, want, &wild);
        return wild;
}

ab_deny ab_policy_decide(const ab_agent *a, const char *audience, const char *const *scopes, size_t n,
                         uint32_t ttl, const ab_grant **ret_grant, uint32_t *ret_ttl, char *reason,
                         size_t reasonmax)
{
        const ab_grant *best = NULL;
        const char *missing = NULL;
        bool audience_seen = false;

        for (size_t gi = 0; gi < a->n_grants; gi++) {
                const ab_grant *g = &a->grants[gi];
                size_t i;
                if (strcmp(g->audience, audience) != 0)
                        continue;
                audience_seen = true;
                for (i = 0; i < n; i++)
                        if (!ab_grant_covers(g, scopes[i]))
                                break;
                if (i < n) {
                        if (!missing)
                                missing = scopes[i];
                        continue;
                }
                if (ttl == 0 || ttl <= g->max_ttl) {
                        *ret_grant = g;
                        *ret_ttl = ttl ? ttl : AB_MIN(AB_DEFAULT_TTL, g->max_ttl);
                        return AB_GRANTED;
                }
                if (!best || g->max_ttl > best->max_ttl)
                        best = g;
        }
        if (!audience_seen) {
                snprintf(reason, reasonmax, "agent \"%s\" has no grant for audience \"%.200s\"", a->id, audience);
                return AB_DENY_AUDIENCE;
        }
        if (best) {
                snprintf(reason, reasonmax, "ttl %u s is above the grant's max_ttl of %u s", ttl, best->max_ttl);
                return AB_DENY_TTL;
        }
        /* name a scope that no grant for this audience covers, if any */
        for (size_t i = 0; i < n; i++) {
                bool covered = false;
                for (size_t gi = 0; gi < a->n_grants && !covered; gi++)
                        covered = strcmp(a->grants[gi].audience, audience) == 0 &&
                                  ab_grant_covers(&a->grants[gi], scopes[i]);
                if (!covered) {
                        missing = scopes[i];
                        break;
                }
        }
        snprintf(reason, reasonmax, "scope \"%.128s\" is not granted to agent \"%s\" for audience \"%.200s\"",
                 missing, a->id, audience);
        return AB_DENY_SCOPE;
}

const ab_agent *ab_policy_find(const ab_policy *p, const char *id)
{
        for (size_t i = 0; p && i < p->n_agents; i++)
                if (strcmp(p->agents[i].id, id) == 0)
                        return &p->agents[i];
        return NULL;
}
