/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for broker/policy.c: parsing and validating policy documents,
 * matching processes to agents, and deciding requests.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cmocka.h>
#include <jansson.h>

#include <sodium.h>

#include "../../broker/compile.h"
#include "../../broker/policy.h"
#include "../../broker/store.h"
#include "../../common/util.h"

/* ---- recording findings -------------------------------------------------- */

typedef struct finding {
        int sev;
        char *file, *path, *msg;
} finding;

static struct {
        finding *f;
        size_t n, cap;
} rec;

static void rec_emit(void *userdata, int severity, const char *file, const char *path, const char *msg)
{
        assert_ptr_equal(userdata, &rec);
        assert_true(severity == AB_DIAG_ERROR || severity == AB_DIAG_WARNING);
        assert_non_null(path);
        assert_non_null(msg);
        assert_true(strlen(msg) > 0);
        if (rec.n == rec.cap) {
                rec.cap = rec.cap ? rec.cap * 2 : 16;
                rec.f = realloc(rec.f, rec.cap * sizeof *rec.f);
                assert_non_null(rec.f);
        }
        rec.f[rec.n++] = (finding){
                .sev = severity,
                .file = strdup(file ? file : "(null)"),
                .path = strdup(path),
                .msg = strdup(msg),
        };
}

static void rec_reset(void)
{
        for (size_t i = 0; i < rec.n; i++) {
                free(rec.f[i].file);
                free(rec.f[i].path);
                free(rec.f[i].msg);
        }
        rec.n = 0;
}

static ab_diag mkdiag(bool lint)
{
        return (ab_diag){ .emit = rec_emit, .userdata = &rec, .lint = lint };
}

static size_t rec_count(int sev)
{
        size_t n = 0;
        for (size_t i = 0; i < rec.n; i++)
                n += rec.f[i].sev == sev;
        return n;
}

/* A finding of sev at exactly path whose message contains substr (NULL: any). */
static bool rec_has(int sev, const char *path, const char *substr)
{
        for (size_t i = 0; i < rec.n; i++)
                if (rec.f[i].sev == sev && strcmp(rec.f[i].path, path) == 0 &&
                    (!substr || strstr(rec.f[i].msg, substr)))
                        return true;
        return false;
}

static bool rec_has_msg(int sev, const char *substr)
{
        for (size_t i = 0; i < rec.n; i++)
                if (rec.f[i].sev == sev && strstr(rec.f[i].msg, substr))
                        return true;
        return false;
}

static void rec_dump(void)
{
        for (size_t i = 0; i < rec.n; i++)
                print_message("  %s %s %s: %s\n", rec.f[i].sev == AB_DIAG_ERROR ? "error" : "warning",
                              rec.f[i].file, rec.f[i].path, rec.f[i].msg);
}

#define assert_finding(sev, path, substr)                                                         \
        do {                                                                                      \
                if (!rec_has((sev), (path), (substr))) {                                          \
                        rec_dump();                                                               \
                        fail_msg("no %s at %s%s%s", (sev) == AB_DIAG_ERROR ? "error" : "warning", \
                                 (path), (substr) ? " containing " : "", (substr) ? (substr) : ""); \
                }                                                                                 \
        } while (0)

/* ---- building documents -------------------------------------------------- */

static char **garbage;
static size_t n_garbage;

static char *keep(char *s)
{
        assert_non_null(s);
        garbage = realloc(garbage, (n_garbage + 1) * sizeof *garbage);
        assert_non_null(garbage);
        garbage[n_garbage++] = s;
        return s;
}

/* JSON written with single quotes for readability: ' becomes ". */
static const char *J(const char *s)
{
        char *d = keep(strdup(s));
        for (char *p = d; *p; p++)
                if (*p == '\'')
                        *p = '"';
        return d;
}

static const char *fmt(const char *f, ...) __attribute__((format(printf, 1, 2)));
static const char *fmt(const char *f, ...)
{
        va_list ap;
        char *s = NULL;

        va_start(ap, f);
        assert_true(vasprintf(&s, f, ap) >= 0);
        va_end(ap);
        return keep(s);
}

/* n copies of c */
static const char *rep(char c, size_t n)
{
        char *s = keep(malloc(n + 1));
        memset(s, c, n);
        s[n] = '\0';
        return s;
}

/* The example from the issue, more or less: two agents with owners, selectors and grants. */
#define SHA_A "3b8e2c5f0a1d4e6b7c9d8e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b"
static const char example_doc[] =
        "{\n"
        "  \"version\": 1,\n"
        "  \"scope_groups\": { \"repo-rw\": [\"repo:read\", \"repo:write\"] },\n"
        "  \"agents\": [\n"
        "    {\n"
        "      \"id\": \"code-review-bot\",\n"
        "      \"owner\": \"alice@example.com\",\n"
        "      \"description\": \"Reviews merge requests\",\n"
        "      \"match\": { \"uid\": 1000, \"unit\": \"code-review-bot.service\" },\n"
        "      \"session\": { \"max_lifetime\": \"8h\", \"reauth_interval\": \"15m\" },\n"
        "      \"grants\": [\n"
        "        { \"audience\": \"mcp://git.internal\", \"scopes\": [\"@repo-rw\", \"issues:read\"], \"max_ttl\": \"5m\" },\n"
        "        { \"audience\": \"https://tickets.internal/api\", \"scopes\": [\"tickets:read\"], \"max_ttl\": 600 }\n"
        "      ]\n"
        "    },\n"
        "    {\n"
        "      \"id\": \"deploy-agent\",\n"
        "      \"owner\": \"bob@example.com\",\n"
        "      \"match\": { \"user\": \"root\", \"exe\": \"/usr/bin/deploy-agent\", \"sha256\": \"" SHA_A "\",\n"
        "                 \"unit\": \"deploy-agent.service\" },\n"
        "      \"max_delegation_depth\": 0,\n"
        "      \"grants\": [\n"
        "        { \"audience\": \"https://deploy.internal\", \"scopes\": [\"deploy:staging\"], \"max_ttl\": \"10m\",\n"
        "          \"max_auth_age\": \"1h\", \"users\": [\"deploy\"] }\n"
        "      ]\n"
        "    }\n"
        "  ]\n"
        "}\n";

/* Policies a test holds: freed by the teardown when an assertion cuts the test short. */
static ab_policy *live[16];

static ab_policy *track(ab_policy *p)
{
        for (size_t i = 0; i < AB_ARRAY_SIZE(live); i++)
                if (!live[i]) {
                        live[i] = p;
                        return p;
                }
        fail_msg("too many live policies");
        return p;
}

static void drop(ab_policy *p)
{
        for (size_t i = 0; i < AB_ARRAY_SIZE(live); i++)
                if (live[i] == p && p) {
                        live[i] = NULL;
                        break;
                }
        ab_policy_free(p);
}

static ab_policy *new_policy(void)
{
        ab_policy *p = NULL;
        assert_int_equal(ab_policy_new(&p), 0);
        assert_non_null(p);
        assert_int_equal(p->n_agents, 0);
        return track(p);
}

/* Add text as "test.json"; findings are recorded afresh. */
static int add_doc(ab_policy *p, const char *source, const char *text, bool lint, ab_diag *ret_diag)
{
        ab_diag d = mkdiag(lint);
        int r;

        rec_reset();
        r = ab_policy_add_document(p, source, text, strlen(text), &d);
        assert_int_equal(d.errors, rec_count(AB_DIAG_ERROR));
        assert_int_equal(d.warnings, rec_count(AB_DIAG_WARNING));
        if (ret_diag)
                *ret_diag = d;
        return r;
}

/* A fresh policy loads text without errors. */
static ab_policy *load_ok(const char *text, bool lint)
{
        ab_policy *p = new_policy();
        int r = add_doc(p, "test.json", text, lint, NULL);

        if (r != 0) {
                rec_dump();
                fail_msg("document rejected (%d):\n%s", r, text);
        }
        assert_int_equal(rec_count(AB_DIAG_ERROR), 0);
        return p;
}

/* A fresh policy rejects text with AB_ERR_POLICY and an error at path. */
static void expect_error_at(const char *text, const char *path)
{
        ab_policy *p = new_policy();
        int r = add_doc(p, "test.json", text, false, NULL);

        if (r != AB_ERR_POLICY) {
                rec_dump();
                fail_msg("expected AB_ERR_POLICY, got %d for:\n%s", r, text);
        }
        assert_true(rec_count(AB_DIAG_ERROR) >= 1);
        assert_finding(AB_DIAG_ERROR, path, NULL);
        assert_int_equal(p->n_agents, 0);
        assert_int_equal(p->serial, 0);
        drop(p);
}

/* A fresh policy rejects text with AB_ERR_POLICY and at least one error (wherever). */
static void expect_rejected(const char *text)
{
        ab_policy *p = new_policy();

        if (add_doc(p, "test.json", text, false, NULL) != AB_ERR_POLICY)
                fail_msg("accepted:\n%s", text);
        assert_true(rec_count(AB_DIAG_ERROR) >= 1);
        assert_int_equal(p->n_agents, 0);
        drop(p);
}

/* One agent with the given match and grants. */
static const char *one_agent(const char *match, const char *grants)
{
        return fmt("{\"version\":1,\"agents\":[{\"id\":\"a\",\"owner\":\"o@example.com\",\"match\":%s,"
                   "\"grants\":%s}]}",
                   match, grants);
}

static const char *one_grant(const char *scopes_json)
{
        return one_agent(J("{'uid':1000,'unit':'a.service'}"),
                         fmt("[{\"audience\":\"aud\",\"scopes\":%s}]", scopes_json));
}

/*
 * Change one member of the example document: where is "doc", "agent"
 * ($.agents[0]), "match", "session" or "grant" ($.agents[0].grants[0]);
 * value is JSON text, or NULL to remove the member.
 */
static const char *mutate(const char *where, const char *key, const char *value)
{
        json_t *doc = json_loads(example_doc, 0, NULL), *obj = NULL, *agent;
        char *out;

        assert_non_null(doc);
        agent = json_array_get(json_object_get(doc, "agents"), 0);
        if (strcmp(where, "doc") == 0)
                obj = doc;
        else if (strcmp(where, "agent") == 0)
                obj = agent;
        else if (strcmp(where, "match") == 0)
                obj = json_object_get(agent, "match");
        else if (strcmp(where, "session") == 0)
                obj = json_object_get(agent, "session");
        else if (strcmp(where, "grant") == 0)
                obj = json_array_get(json_object_get(agent, "grants"), 0);
        else
                fail_msg("bad location %s", where);
        assert_non_null(obj);
        if (value) {
                json_error_t err;
                json_t *v = json_loads(value, JSON_DECODE_ANY, &err);
                if (!v)
                        fail_msg("test value %s: %s", value, err.text);
                assert_int_equal(json_object_set_new(obj, key, v), 0);
        } else {
                json_object_del(obj, key);
        }
        out = json_dumps(doc, JSON_COMPACT);
        json_decref(doc);
        return keep(out);
}

static const char *where_path(const char *where)
{
        if (strcmp(where, "doc") == 0)
                return "$";
        if (strcmp(where, "agent") == 0)
                return "$.agents[0]";
        if (strcmp(where, "match") == 0)
                return "$.agents[0].match";
        if (strcmp(where, "session") == 0)
                return "$.agents[0].session";
        return "$.agents[0].grants[0]";
}

/* The mutated example is rejected with an error at path (NULL: the member's object). */
static void bad(const char *where, const char *key, const char *value, const char *path)
{
        expect_error_at(mutate(where, key, value), path ? path : where_path(where));
}

/* The mutated example still loads. */
static void good(const char *where, const char *key, const char *value)
{
        drop(load_ok(mutate(where, key, value), false));
}

static const char *quoted(const char *s)
{
        return fmt("\"%s\"", s);
}

static int test_setup(void **state)
{
        rec_reset();
        return 0;
}

static void rm_tmpdir(void);

static int test_teardown(void **state)
{
        rm_tmpdir();
        for (size_t i = 0; i < AB_ARRAY_SIZE(live); i++) {
                ab_policy_free(live[i]);
                live[i] = NULL;
        }
        rec_reset();
        for (size_t i = 0; i < n_garbage; i++)
                free(garbage[i]);
        free(garbage);
        garbage = NULL;
        n_garbage = 0;
        return 0;
}

static int group_teardown(void **state)
{
        rec_reset();
        free(rec.f);
        rec.f = NULL;
        rec.cap = 0;
        return 0;
}

static const ab_agent *find_agent(const ab_policy *p, const char *id)
{
        for (size_t i = 0; i < p->n_agents; i++)
                if (strcmp(p->agents[i].id, id) == 0)
                        return &p->agents[i];
        fail_msg("no agent %s", id);
        return NULL;
}

/* ---- durations ----------------------------------------------------------- */

static void test_parse_duration(void **state)
{
        static const struct {
                const char *s;
                uint64_t v;
        } ok[] = {
                { "300", 300 },     { "45s", 45 },     { "5m", 300 },           { "8h", 28800 },
                { "2d", 172800 },   { "0", 0 },        { "0s", 0 },             { "1", 1 },
                { "007", 7 },       { "90m", 5400 },   { "4294967295", 4294967295u },
                { "4294967295s", 4294967295u },        { "71582788m", 71582788u * 60u },
                { "1193046h", 1193046u * 3600u },      { "49710d", 49710u * 86400u },
        };
        static const char *const bad_s[] = {
                "",        "5x",        "-1",         "m",           "s",          "5mm",        "5 m",
                " 5",      "5 ",        "+5",         "5M",          "5H",         "1.5h",       "5ms",
                "1e3",     "0x10",      "5m5s",       "\t5",         "5\n",        "4294967296", "4294967296s",
                "71582789m", "1193047h", "49711d",    "99999999999999999999",    "18446744073709551616",
                "184467440737095516150", "99999999999999999999999999999999999999d",
        };
        uint64_t v;

        for (size_t i = 0; i < AB_ARRAY_SIZE(ok); i++) {
                v = 12345;
                if (ab_parse_duration(ok[i].s, &v) != 0)
                        fail_msg("\"%s\" rejected", ok[i].s);
                if (v != ok[i].v)
                        fail_msg("\"%s\" gave %llu, want %llu", ok[i].s, (unsigned long long)v,
                                 (unsigned long long)ok[i].v);
        }
        for (size_t i = 0; i < AB_ARRAY_SIZE(bad_s); i++) {
                v = 12345;
                if (ab_parse_duration(bad_s[i], &v) != AB_ERR_INVALID)
                        fail_msg("\"%s\" accepted", bad_s[i]);
                assert_int_equal(v, 12345); /* untouched */
        }
}

/* Durations inside documents: strings with units and plain integers, with bounds. */
static void test_document_durations(void **state)
{
        ab_policy *p = load_ok(example_doc, false);
        const ab_agent *a = find_agent(p, "code-review-bot");

        assert_int_equal(a->max_lifetime, 8 * 3600);
        assert_int_equal(a->reauth_interval, 15 * 60);
        assert_int_equal(a->grants[0].max_ttl, 300);
        assert_int_equal(a->grants[1].max_ttl, 600);
        assert_int_equal(find_agent(p, "deploy-agent")->grants[0].max_auth_age, 3600);
        drop(p);

        /* max_ttl: 1..AB_TTL_MAX */
        good("grant", "max_ttl", "1");
        good("grant", "max_ttl", "\"1s\"");
        good("grant", "max_ttl", fmt("%d", AB_TTL_MAX));
        good("grant", "max_ttl", "\"24h\"");
        good("grant", "max_ttl", "\"1d\"");
        good("grant", "max_ttl", "\"1440m\"");
        bad("grant", "max_ttl", fmt("%d", AB_TTL_MAX + 1), NULL);
        bad("grant", "max_ttl", "\"1441m\"", NULL);
        bad("grant", "max_ttl", "\"2d\"", NULL);
        bad("grant", "max_ttl", "0", NULL);
        bad("grant", "max_ttl", "\"0s\"", NULL);
        bad("grant", "max_ttl", "-1", NULL);
        bad("grant", "max_ttl", "\"-1\"", NULL);
        bad("grant", "max_ttl", "\"5x\"", NULL);
        bad("grant", "max_ttl", "\"\"", NULL);
        bad("grant", "max_ttl", "1.5", NULL);
        bad("grant", "max_ttl", "300.0", NULL);
        bad("grant", "max_ttl", "true", NULL);
        bad("grant", "max_ttl", "null", NULL);
        bad("grant", "max_ttl", "[300]", NULL);
        bad("grant", "max_ttl", "{\"s\":300}", NULL);
        bad("grant", "max_ttl", "9223372036854775807", NULL);
        bad("grant", "max_ttl", "4294967596", NULL); /* 300 modulo 2^32 */
        bad("grant", "max_ttl", "\"99999999999999999999\"", NULL);
        /* max_auth_age: 1..30d */
        good("grant", "max_auth_age", "\"30d\"");
        good("grant", "max_auth_age", "1");
        bad("grant", "max_auth_age", fmt("%d", 30 * 86400 + 1), NULL);
        bad("grant", "max_auth_age", "0", NULL);
        bad("grant", "max_auth_age", "\"x\"", NULL);
        /* session: max_lifetime 60..30d, reauth_interval 1..30d */
        good("session", "max_lifetime", "60");
        good("session", "max_lifetime", "\"1m\"");
        good("session", "max_lifetime", "\"30d\"");
        bad("session", "max_lifetime", "59", NULL);
        bad("session", "max_lifetime", "\"59s\"", NULL);
        bad("session", "max_lifetime", fmt("%d", 30 * 86400 + 1), NULL);
        bad("session", "max_lifetime", "\"31d\"", NULL);
        bad("session", "max_lifetime", "true", NULL);
        good("session", "reauth_interval", "1");
        good("session", "reauth_interval", "\"30d\"");
        bad("session", "reauth_interval", "0", NULL);
        bad("session", "reauth_interval", "\"31d\"", NULL);
        bad("session", "reauth_interval", "\"15 m\"", NULL);
}

/* ---- loading documents --------------------------------------------------- */

static void test_example_document(void **state)
{
        ab_policy *p = load_ok(example_doc, false);
        const ab_agent *a, *b;

        assert_int_equal(p->n_agents, 2);
        assert_int_equal(p->serial, 1);
        assert_int_equal(rec.n, 0); /* lint off: nothing at all */

        a = &p->agents[0];
        assert_string_equal(a->id, "code-review-bot");
        assert_string_equal(a->owner, "alice@example.com");
        assert_string_equal(a->description, "Reviews merge requests");
        assert_string_equal(a->source, "test.json");
        assert_true(a->has_uid);
        assert_int_equal(a->uid, 1000);
        assert_false(a->has_gid);
        assert_true(a->resolved);
        assert_null(a->exe);
        assert_null(a->sha256);
        assert_string_equal(a->unit, "code-review-bot.service");
        assert_int_equal(a->max_delegation_depth, 1); /* default */
        assert_int_equal(a->n_grants, 2);
        assert_string_equal(a->grants[0].audience, "mcp://git.internal");
        /* "@repo-rw" expanded in place */
        assert_int_equal(a->grants[0].n_scopes, 3);
        assert_string_equal(a->grants[0].scopes[0], "repo:read");
        assert_string_equal(a->grants[0].scopes[1], "repo:write");
        assert_string_equal(a->grants[0].scopes[2], "issues:read");
        assert_int_equal(a->grants[0].max_auth_age, 0);
        assert_null(a->grants[0].users);
        assert_int_equal(a->grants[1].n_scopes, 1);

        b = &p->agents[1];
        assert_string_equal(b->id, "deploy-agent");
        assert_string_equal(b->user, "root");
        assert_true(b->has_uid);
        assert_int_equal(b->uid, 0);
        assert_true(b->resolved);
        assert_string_equal(b->exe, "/usr/bin/deploy-agent");
        assert_string_equal(b->sha256, SHA_A);
        assert_int_equal(b->max_delegation_depth, 0);
        assert_int_equal(b->max_lifetime, AB_DEFAULT_MAX_LIFETIME);
        assert_int_equal(b->reauth_interval, AB_DEFAULT_REAUTH);
        assert_int_equal(b->grants[0].n_users, 1);
        assert_string_equal(b->grants[0].users[0], "deploy");
        drop(p);

        /* a grant without max_ttl gets the default */
        p = load_ok(mutate("grant", "max_ttl", NULL), false);
        assert_int_equal(p->agents[0].grants[0].max_ttl, AB_DEFAULT_TTL);
        drop(p);

        ab_policy_free(NULL); /* accepted */
}

static void test_empty_policy(void **state)
{
        ab_policy *p = new_policy();
        ab_identity id = { .uid = 0 };

        assert_null(ab_policy_match(p, &id));
        drop(p);

        p = load_ok(J("{'version':1,'agents':[]}"), true);
        assert_int_equal(p->n_agents, 0);
        assert_int_equal(p->serial, 1);
        drop(p);
}

static void test_scope_groups(void **state)
{
        ab_policy *p;
        const char *doc;

        doc = J("{'version':1,'scope_groups':{'r':['a:read','b:read'],'w':['a:write']},"
                "'agents':[{'id':'x','owner':'o','match':{'uid':1},"
                "'grants':[{'audience':'aud','scopes':['@w','c:read','@r','@w']}]}]}");
        p = load_ok(doc, false);
        assert_int_equal(p->agents[0].grants[0].n_scopes, 5);
        assert_string_equal(p->agents[0].grants[0].scopes[0], "a:write");
        assert_string_equal(p->agents[0].grants[0].scopes[1], "c:read");
        assert_string_equal(p->agents[0].grants[0].scopes[2], "a:read");
        assert_string_equal(p->agents[0].grants[0].scopes[3], "b:read");
        assert_string_equal(p->agents[0].grants[0].scopes[4], "a:write");
        drop(p);

        /* unknown group */
        expect_error_at(J("{'version':1,'agents':[{'id':'x','owner':'o','match':{'uid':1},"
                          "'grants':[{'audience':'aud','scopes':['a','@nope']}]}]}"),
                        "$.agents[0].grants[0].scopes[1]");
        expect_error_at(J("{'version':1,'scope_groups':{'r':['a']},'agents':[{'id':'x','owner':'o','match':{'uid':1},"
                          "'grants':[{'audience':'aud','scopes':['@']}]}]}"),
                        "$.agents[0].grants[0].scopes[0]");
        /* groups do not nest */
        expect_error_at(J("{'version':1,'scope_groups':{'r':['a'],'s':['@r']},'agents':[{'id':'x','owner':'o',"
                          "'match':{'uid':1},'grants':[{'audience':'aud','scopes':['@s']}]}]}"),
                        "$.agents[0].grants[0].scopes[0][0]");
        /* an invalid scope inside a group is reported where the group is used */
        expect_error_at(J("{'version':1,'scope_groups':{'r':['a b']},'agents':[{'id':'x','owner':'o',"
                          "'match':{'uid':1},'grants':[{'audience':'aud','scopes':['@r']}]}]}"),
                        "$.agents[0].grants[0].scopes[0][0]");
        /* malformed scope_groups */
        expect_error_at(J("{'version':1,'scope_groups':[],'agents':[]}"), "$.scope_groups");
        expect_error_at(J("{'version':1,'scope_groups':'r','agents':[]}"), "$.scope_groups");
        expect_error_at(J("{'version':1,'scope_groups':{'r':'a'},'agents':[]}"), "$.scope_groups.r");
        expect_error_at(J("{'version':1,'scope_groups':{'r':[]},'agents':[]}"), "$.scope_groups.r");
        expect_error_at(J("{'version':1,'scope_groups':{'bad name':['a']},'agents':[]}"),
                        "$.scope_groups.bad name");
        expect_error_at(J("{'version':1,'scope_groups':{'':['a']},'agents':[]}"), "$.scope_groups.");
        /* group size: AB_POLICY_MAX_SCOPES accepted, one more rejected */
        {
                char *list = NULL;
                size_t len = 0;
                FILE *f = open_memstream(&list, &len);
                for (int i = 0; i < AB_POLICY_MAX_SCOPES; i++)
                        fprintf(f, "%s\"s%d\"", i ? "," : "", i);
                fclose(f);
                keep(list);
                p = load_ok(fmt("{\"version\":1,\"scope_groups\":{\"g\":[%s]},\"agents\":[{\"id\":\"x\",\"owner\":"
                                "\"o\",\"match\":{\"uid\":1},\"grants\":[{\"audience\":\"aud\",\"scopes\":[\"@g\"]}]}]}",
                                list),
                            false);
                assert_int_equal(p->agents[0].grants[0].n_scopes, AB_POLICY_MAX_SCOPES);
                drop(p);
                /* the group plus one more scope in the grant: over the per-grant limit after expansion */
                expect_error_at(fmt("{\"version\":1,\"scope_groups\":{\"g\":[%s]},\"agents\":[{\"id\":\"x\",\"owner\":"
                                    "\"o\",\"match\":{\"uid\":1},\"grants\":[{\"audience\":\"aud\",\"scopes\":"
                                    "[\"@g\",\"extra\"]}]}]}",
                                    list),
                                "$.agents[0].grants[0].scopes");
                expect_error_at(fmt("{\"version\":1,\"scope_groups\":{\"g\":[%s,\"one-more\"]},\"agents\":[]}", list),
                                "$.scope_groups.g");
        }
}

static void test_required_members(void **state)
{
        /* missing owner: the error names the agent */
        bad("agent", "owner", NULL, "$.agents[0]");
        assert_finding(AB_DIAG_ERROR, "$.agents[0]", "owner");
        bad("agent", "id", NULL, "$.agents[0]");
        bad("agent", "match", NULL, "$.agents[0].match");
        bad("agent", "grants", NULL, "$.agents[0].grants");
        bad("grant", "audience", NULL, "$.agents[0].grants[0]");
        bad("grant", "scopes", NULL, "$.agents[0].grants[0].scopes");
        bad("doc", "version", NULL, "$.version");
        bad("doc", "agents", NULL, "$.agents");
        /* optional members may be left out */
        good("agent", "description", NULL);
        good("agent", "session", NULL);
        good("grant", "max_ttl", NULL);
        good("doc", "scope_groups", "{\"repo-rw\":[\"repo:read\"],\"unused\":[\"x\"]}");
        /* the error count is exact: one problem, one error */
        bad("agent", "owner", NULL, "$.agents[0]");
        assert_int_equal(rec_count(AB_DIAG_ERROR), 1);
}

static void test_unknown_keys(void **state)
{
        bad("doc", "agent", "[]", "$");
        assert_finding(AB_DIAG_ERROR, "$", "\"agent\"");
        bad("agent", "owners", "\"x\"", "$.agents[0]");
        bad("agent", "scopes", "[]", "$.agents[0]");
        bad("match", "pid", "1", "$.agents[0].match");
        bad("match", "UID", "1", "$.agents[0].match");
        bad("session", "lifetime", "\"1h\"", "$.agents[0].session");
        bad("grant", "scope", "[\"a\"]", "$.agents[0].grants[0]");
        bad("grant", "ttl", "60", "$.agents[0].grants[0]");
        good("doc", "$schema", "\"https://example.com/schema.json\"");
}

static void test_wrong_types(void **state)
{
        /* document */
        bad("doc", "version", "\"1\"", "$.version");
        bad("doc", "version", "0", "$.version");
        bad("doc", "version", "-1", "$.version");
        bad("doc", "version", "1.0", "$.version");
        bad("doc", "version", "true", "$.version");
        bad("doc", "version", "null", "$.version");
        bad("doc", "agents", "{}", "$.agents");
        bad("doc", "agents", "\"a\"", "$.agents");
        bad("doc", "agents", "null", "$.agents");
        expect_error_at("[]", "$");
        expect_rejected("\"policy\"");
        expect_rejected("42");
        expect_rejected("null");
        /* agent */
        expect_error_at(J("{'version':1,'agents':['a']}"), "$.agents[0]");
        expect_error_at(J("{'version':1,'agents':[null]}"), "$.agents[0]");
        expect_error_at(J("{'version':1,'agents':[[]]}"), "$.agents[0]");
        bad("agent", "id", "5", NULL);
        bad("agent", "id", "\"\"", NULL);
        bad("agent", "id", "\"has space\"", NULL);
        bad("agent", "id", "\"slash/id\"", NULL);
        bad("agent", "id", "\"quote'\"", NULL);
        bad("agent", "id", "[\"a\"]", NULL);
        bad("agent", "id", "null", NULL);
        bad("agent", "owner", "5", NULL);
        bad("agent", "owner", "\"\"", NULL);
        bad("agent", "owner", "\"tab\\there\"", NULL);
        bad("agent", "owner", "\"caf\\u00e9\"", NULL); /* printable ASCII only */
        bad("agent", "owner", "{}", NULL);
        bad("agent", "description", "5", NULL);
        bad("agent", "description", "\"\"", NULL);
        bad("agent", "description", "\"line\\nbreak\"", NULL);
        bad("agent", "match", "\"uid=1000\"", "$.agents[0].match");
        bad("agent", "match", "[]", "$.agents[0].match");
        bad("agent", "match", "null", "$.agents[0].match");
        bad("agent", "session", "\"8h\"", "$.agents[0].session");
        bad("agent", "session", "[]", "$.agents[0].session");
        bad("agent", "grants", "{}", "$.agents[0].grants");
        bad("agent", "grants", "\"x\"", "$.agents[0].grants");
        bad("agent", "max_delegation_depth", "\"1\"", NULL);
        bad("agent", "max_delegation_depth", "-1", NULL);
        bad("agent", "max_delegation_depth", "9", NULL);
        bad("agent", "max_delegation_depth", "1.5", NULL);
        bad("agent", "max_delegation_depth", "true", NULL);
        good("agent", "max_delegation_depth", "0");
        good("agent", "max_delegation_depth", "8");
        /* match */
        bad("match", "uid", "\"1000\"", NULL);
        bad("match", "uid", "-1", NULL);
        bad("match", "uid", "4294967295", NULL); /* (uid_t)-1 */
        bad("match", "uid", "4294967296", NULL);
        bad("match", "uid", "1000.0", NULL);
        bad("match", "uid", "true", NULL);
        bad("match", "uid", "null", NULL);
        good("match", "uid", "0");
        good("match", "uid", "4294967294");
        bad("match", "gid", "\"100\"", NULL);
        bad("match", "gid", "-1", NULL);
        bad("match", "gid", "4294967295", NULL);
        bad("match", "gid", "[100]", NULL);
        good("match", "gid", "4294967294");
        bad("match", "user", "5", NULL);  /* and uid present too */
        bad("match", "user", "\"root\"", NULL); /* uid and user both */
        bad("match", "group", "5", NULL);
        bad("match", "group", "\"\"", NULL);
        bad("match", "exe", "5", NULL);
        bad("match", "exe", "\"\"", NULL);
        bad("match", "exe", "\"usr/bin/agent\"", NULL);
        bad("match", "exe", "\"./agent\"", NULL);
        bad("match", "sha256", "5", NULL);
        bad("match", "sha256", quoted(rep('A', 64)), NULL); /* uppercase */
        bad("match", "sha256", quoted(rep('a', 63)), NULL);
        bad("match", "sha256", quoted(rep('a', 65)), NULL);
        bad("match", "sha256", quoted(rep('g', 64)), NULL);
        bad("match", "sha256", "\"\"", NULL);
        good("match", "sha256", quoted(rep('f', 64)));
        bad("match", "unit", "5", NULL);
        bad("match", "unit", "\"\"", NULL);
        bad("match", "unit", "[\"a.service\"]", NULL);
        /* session */
        bad("session", "max_lifetime", "[]", NULL);
        bad("session", "reauth_interval", "{}", NULL);
        /* grant */
        expect_error_at(J("{'version':1,'agents':[{'id':'a','owner':'o','match':{'uid':1},'grants':['aud']}]}"),
                        "$.agents[0].grants[0]");
        expect_error_at(J("{'version':1,'agents':[{'id':'a','owner':'o','match':{'uid':1},'grants':[{'audience':'x',"
                          "'scopes':['s']},null]}]}"),
                        "$.agents[0].grants[1]");
        bad("grant", "audience", "5", NULL);
        bad("grant", "audience", "\"\"", NULL);
        bad("grant", "audience", "[\"aud\"]", NULL);
        bad("grant", "audience", "\"with\\nnewline\"", NULL);
        bad("grant", "scopes", "\"repo:read\"", "$.agents[0].grants[0].scopes");
        bad("grant", "scopes", "[]", "$.agents[0].grants[0].scopes");
        bad("grant", "scopes", "{}", "$.agents[0].grants[0].scopes");
        bad("grant", "scopes", "null", "$.agents[0].grants[0].scopes");
        bad("grant", "scopes", "[5]", "$.agents[0].grants[0].scopes[0]");
        bad("grant", "scopes", "[\"a\",null]", "$.agents[0].grants[0].scopes[1]");
        bad("grant", "scopes", "[[\"a\"]]", "$.agents[0].grants[0].scopes[0]");
        bad("grant", "users", "\"deploy\"", "$.agents[0].grants[0].users");
        bad("grant", "users", "{}", "$.agents[0].grants[0].users");
        bad("grant", "users", "[5]", "$.agents[0].grants[0].users");
        bad("grant", "users", "[\"\"]", "$.agents[0].grants[0].users");
        bad("grant", "users", "[\"a b\"]", "$.agents[0].grants[0].users");
        bad("grant", "users", quoted(rep('u', 10)), "$.agents[0].grants[0].users");
        bad("grant", "users", fmt("[\"%s\"]", rep('u', AB_ID_MAX + 1)), "$.agents[0].grants[0].users");
        good("grant", "users", fmt("[\"%s\"]", rep('u', AB_ID_MAX)));
        good("grant", "users", "[]");
}

/* Strings at their maximum length are accepted, one byte more is not. */
static void test_string_limits(void **state)
{
        good("agent", "id", quoted(rep('i', AB_ID_MAX)));
        bad("agent", "id", quoted(rep('i', AB_ID_MAX + 1)), NULL);
        good("agent", "owner", quoted(rep('o', AB_POLICY_MAX_STR)));
        bad("agent", "owner", quoted(rep('o', AB_POLICY_MAX_STR + 1)), NULL);
        good("agent", "description", quoted(rep('d', 1024)));
        bad("agent", "description", quoted(rep('d', 1025)), NULL);
        good("grant", "audience", quoted(rep('a', AB_POLICY_MAX_STR)));
        bad("grant", "audience", quoted(rep('a', AB_POLICY_MAX_STR + 1)), NULL);
        good("match", "unit", quoted(rep('u', AB_UNIT_MAX - 1)));
        bad("match", "unit", quoted(rep('u', AB_UNIT_MAX)), NULL);
        good("match", "exe", fmt("\"/%s\"", rep('e', AB_EXE_MAX - 2)));
        bad("match", "exe", fmt("\"/%s\"", rep('e', AB_EXE_MAX - 1)), NULL);
        /* user names: AB_ID_MAX (the name need not exist) */
        good("match", "uid", NULL);
        {
                const char *doc = one_agent(fmt("{\"user\":\"%s\"}", rep('n', AB_ID_MAX)),
                                            J("[{'audience':'a','scopes':['s']}]"));
                drop(load_ok(doc, false));
                doc = one_agent(fmt("{\"user\":\"%s\"}", rep('n', AB_ID_MAX + 1)), J("[{'audience':'a','scopes':['s']}]"));
                expect_error_at(doc, "$.agents[0].match");
                doc = one_agent(fmt("{\"group\":\"%s\"}", rep('n', AB_ID_MAX + 1)), J("[{'audience':'a','scopes':['s']}]"));
                expect_error_at(doc, "$.agents[0].match");
        }
        /* an embedded NUL cannot shorten a string past the checks */
        expect_rejected("{\"version\":1,\"agents\":[{\"id\":\"a\",\"owner\":\"a\\u0000b\",\"match\":{\"uid\":1},"
                        "\"grants\":[]}]}");
        expect_rejected("{\"version\":1,\"agents\":[{\"id\":\"a\\u0000b\",\"owner\":\"o\",\"match\":{\"uid\":1},"
                        "\"grants\":[]}]}");
}

static void test_empty_match(void **state)
{
        expect_error_at(one_agent("{}", J("[{'audience':'a','scopes':['s']}]")), "$.agents[0].match");
        assert_finding(AB_DIAG_ERROR, "$.agents[0].match", "match");
        /* a single selector of any kind is enough to load */
        drop(load_ok(one_agent(J("{'uid':5}"), "[]"), false));
        drop(load_ok(one_agent(J("{'gid':5}"), "[]"), false));
        drop(load_ok(one_agent(J("{'exe':'/bin/true'}"), "[]"), false));
        drop(load_ok(one_agent(J("{'unit':'x.service'}"), "[]"), false));
        drop(load_ok(one_agent(fmt("{\"sha256\":\"%s\"}", SHA_A), "[]"), false));
        drop(load_ok(one_agent(J("{'user':'root'}"), "[]"), false));
        drop(load_ok(one_agent(J("{'group':'root'}"), "[]"), false));
}

static void test_invalid_scopes(void **state)
{
        static const char *const bad_scopes[] = {
                "\"repo read\"", "\"repo\\\"x\"", "\"re*po\"", "\"*repo\"", "\"repo**\"", "\"a*b*\"",
                "\"repo\\\\x\"", "\"\"", "\"r\\u00e9po\"", "\"tab\\tx\"", "\"nl\\n\"", "\" lead\"",
                "\"trail \"", "\"@\"", "\"ctl\\u007f\"",
        };
        ab_policy *p;

        for (size_t i = 0; i < AB_ARRAY_SIZE(bad_scopes); i++)
                expect_error_at(one_grant(fmt("[%s]", bad_scopes[i])), "$.agents[0].grants[0].scopes[0]");
        /* the bad scope is found in any position */
        expect_error_at(one_grant("[\"a\",\"b\",\"c d\"]"), "$.agents[0].grants[0].scopes[2]");
        /* length: AB_SCOPE_MAX accepted, one more rejected */
        p = load_ok(one_grant(fmt("[\"%s\"]", rep('s', AB_SCOPE_MAX))), false);
        assert_int_equal(strlen(p->agents[0].grants[0].scopes[0]), AB_SCOPE_MAX);
        drop(p);
        expect_error_at(one_grant(fmt("[\"%s\"]", rep('s', AB_SCOPE_MAX + 1))), "$.agents[0].grants[0].scopes[0]");
        /* valid shapes */
        p = load_ok(one_grant("[\"repo:*\",\"*\",\"a.b/c-d_e:f\",\"https://x/y?z=1\",\"!#$%&'()+,;<=>[]^`{|}~\"]"), false);
        assert_int_equal(p->agents[0].grants[0].n_scopes, 5);
        drop(p);
}

static void test_count_limits(void **state)
{
        char *buf = NULL;
        size_t len = 0;
        FILE *f;
        ab_policy *p;

        /* grants per agent */
        for (int n = AB_POLICY_MAX_GRANTS; n <= AB_POLICY_MAX_GRANTS + 1; n++) {
                f = open_memstream(&buf, &len);
                fprintf(f, "[");
                for (int i = 0; i < n; i++)
                        fprintf(f, "%s{\"audience\":\"aud%d\",\"scopes\":[\"s\"]}", i ? "," : "", i);
                fprintf(f, "]");
                fclose(f);
                keep(buf);
                if (n == AB_POLICY_MAX_GRANTS) {
                        p = load_ok(one_agent(J("{'uid':1}"), buf), false);
                        assert_int_equal(p->agents[0].n_grants, AB_POLICY_MAX_GRANTS);
                        drop(p);
                } else {
                        expect_error_at(one_agent(J("{'uid':1}"), buf), "$.agents[0].grants");
                }
        }
        /* scopes per grant */
        for (int n = AB_POLICY_MAX_SCOPES; n <= AB_POLICY_MAX_SCOPES + 1; n++) {
                f = open_memstream(&buf, &len);
                fprintf(f, "[");
                for (int i = 0; i < n; i++)
                        fprintf(f, "%s\"scope%d\"", i ? "," : "", i);
                fprintf(f, "]");
                fclose(f);
                keep(buf);
                if (n == AB_POLICY_MAX_SCOPES) {
                        p = load_ok(one_grant(buf), false);
                        assert_int_equal(p->agents[0].grants[0].n_scopes, AB_POLICY_MAX_SCOPES);
                        drop(p);
                } else {
                        expect_error_at(one_grant(buf), "$.agents[0].grants[0].scopes");
                }
        }
        /* users per grant */
        for (int n = AB_POLICY_MAX_USERS; n <= AB_POLICY_MAX_USERS + 1; n++) {
                f = open_memstream(&buf, &len);
                fprintf(f, "[");
                for (int i = 0; i < n; i++)
                        fprintf(f, "%s\"user%d\"", i ? "," : "", i);
                fprintf(f, "]");
                fclose(f);
                keep(buf);
                if (n == AB_POLICY_MAX_USERS)
                        good("grant", "users", buf);
                else
                        bad("grant", "users", buf, "$.agents[0].grants[0].users");
        }
}

static const char *agents_doc(int first, int n)
{
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);

        fprintf(f, "{\"version\":1,\"agents\":[");
        for (int i = 0; i < n; i++)
                fprintf(f, "%s{\"id\":\"agent-%d\",\"owner\":\"o\",\"match\":{\"uid\":%d},\"grants\":[]}", i ? "," : "",
                        first + i, first + i);
        fprintf(f, "]}");
        fclose(f);
        return keep(buf);
}

static void test_agent_limit(void **state)
{
        ab_policy *p;

        p = load_ok(agents_doc(0, AB_POLICY_MAX_AGENTS), false);
        assert_int_equal(p->n_agents, AB_POLICY_MAX_AGENTS);
        drop(p);
        expect_error_at(agents_doc(0, AB_POLICY_MAX_AGENTS + 1), "$.agents");

        /* across documents: the total counts */
        p = load_ok(agents_doc(0, AB_POLICY_MAX_AGENTS - 10), false);
        assert_int_equal(add_doc(p, "more.json", agents_doc(AB_POLICY_MAX_AGENTS - 10, 11), false, NULL),
                         AB_ERR_POLICY);
        assert_finding(AB_DIAG_ERROR, "$.agents", NULL);
        assert_int_equal(p->n_agents, AB_POLICY_MAX_AGENTS - 10);
        assert_int_equal(add_doc(p, "more.json", agents_doc(AB_POLICY_MAX_AGENTS - 10, 10), false, NULL), 0);
        assert_int_equal(p->n_agents, AB_POLICY_MAX_AGENTS);
        assert_int_equal(add_doc(p, "one-more.json", agents_doc(AB_POLICY_MAX_AGENTS, 1), false, NULL),
                         AB_ERR_POLICY);
        assert_int_equal(p->n_agents, AB_POLICY_MAX_AGENTS);
        drop(p);
}

static void test_duplicate_agent_ids(void **state)
{
        const char *dup = J("{'version':1,'agents':[{'id':'a','owner':'o','match':{'uid':1},'grants':[]},"
                            "{'id':'b','owner':'o','match':{'uid':2},'grants':[]},"
                            "{'id':'a','owner':'o','match':{'uid':3},'grants':[]}]}");
        ab_policy *p;

        expect_error_at(dup, "$.agents[2]");
        assert_finding(AB_DIAG_ERROR, "$.agents[2]", "\"a\"");

        /* across two documents: the second fails and names the first's source */
        p = new_policy();
        assert_int_equal(add_doc(p, "first.json", agents_doc(0, 3), false, NULL), 0);
        assert_int_equal(add_doc(p, "second.json",
                                 J("{'version':1,'agents':[{'id':'x','owner':'o','match':{'uid':9},'grants':[]},"
                                   "{'id':'agent-1','owner':'o','match':{'uid':9},'grants':[]}]}"),
                                 false, NULL),
                         AB_ERR_POLICY);
        assert_finding(AB_DIAG_ERROR, "$.agents[1]", "first.json");
        assert_string_equal(rec.f[0].file, "second.json");
        assert_int_equal(p->n_agents, 3);
        drop(p);
}

static void test_document_size(void **state)
{
        ab_policy *p = new_policy();
        const char *base = J("{'version':1,'agents':[]}");
        size_t blen = strlen(base);
        char *big = malloc(10 * 1024 * 1024 + 1);
        ab_diag d;

        assert_non_null(big);
        /* exactly AB_POLICY_MAX_FILE bytes (valid JSON padded with spaces): accepted */
        memset(big, ' ', AB_POLICY_MAX_FILE);
        memcpy(big, base, blen);
        big[AB_POLICY_MAX_FILE] = '\0';
        assert_int_equal(add_doc(p, "big.json", big, false, &d), 0);
        /* one byte more */
        big[AB_POLICY_MAX_FILE] = ' ';
        big[AB_POLICY_MAX_FILE + 1] = '\0';
        assert_int_equal(add_doc(p, "big.json", big, false, &d), AB_ERR_TOO_LARGE);
        assert_true(d.errors >= 1);
        assert_int_equal(rec.n, 1);
        assert_string_equal(rec.f[0].file, "big.json");
        /* 10 MB */
        memset(big, ' ', 10 * 1024 * 1024);
        memcpy(big, base, blen);
        big[10 * 1024 * 1024] = '\0';
        assert_int_equal(add_doc(p, "huge.json", big, false, &d), AB_ERR_TOO_LARGE);
        assert_int_equal(p->n_agents, 0);
        assert_int_equal(p->serial, 1);
        free(big);
        drop(p);
}

static void test_deep_nesting(void **state)
{
        const size_t depth = 100000;
        char *s = malloc(2 * depth + 64);
        ab_policy *p;

        assert_non_null(s);
        memset(s, '[', depth);
        s[depth] = '\0';
        p = new_policy();
        assert_int_equal(add_doc(p, "deep.json", s, false, NULL), AB_ERR_POLICY);
        assert_true(rec_count(AB_DIAG_ERROR) >= 1);
        /* balanced, inside an otherwise valid document */
        {
                static const char head[] = "{\"version\":1,\"agents\":[],\"$schema\":";
                size_t h = strlen(head);
                memcpy(s, head, h);
                memset(s + h, '[', depth);
                memset(s + h + depth, ']', depth);
                strcpy(s + h + 2 * depth, "}");
        }
        assert_int_equal(add_doc(p, "deep.json", s, false, NULL), AB_ERR_POLICY);
        /* objects */
        for (size_t i = 0; i < depth / 5; i++)
                memcpy(s + 5 * i, "{\"a\":", 5);
        s[depth] = '\0';
        assert_int_equal(add_doc(p, "deep.json", s, false, NULL), AB_ERR_POLICY);
        assert_int_equal(p->n_agents, 0);
        free(s);
        drop(p);
}

static void test_invalid_json(void **state)
{
        static const char *const docs[] = {
                "",
                " ",
                "{",
                "{\"version\":1,\"agents\":[]",
                "{\"version\":1,\"agents\":[]}x",
                "{\"version\":1,\"agents\":[]}{}",
                "{\"version\":1,\"agents\":[],}",
                "{'version':1,'agents':[]}",
                "{\"version\":1,\"agents\":[]} // comment",
                /* invalid UTF-8: a lone continuation byte, an overlong '/', a surrogate, 0xff */
                "{\"version\":1,\"agents\":[{\"id\":\"a\",\"owner\":\"\x80\",\"match\":{\"uid\":1},\"grants\":[]}]}",
                "{\"version\":1,\"agents\":[{\"id\":\"a\",\"owner\":\"\xc0\xaf\",\"match\":{\"uid\":1},\"grants\":[]}]}",
                "{\"version\":1,\"agents\":[{\"id\":\"a\",\"owner\":\"\xed\xa0\x80\",\"match\":{\"uid\":1},\"grants\":[]}]}",
                "{\"version\":1,\"agents\":[{\"id\":\"a\",\"owner\":\"o\xff\",\"match\":{\"uid\":1},\"grants\":[]}]}",
                "{\"version\":1,\"agents\":[],\"$schema\":\"\xfe\"}",
                "{\"version\":1,\"agents\":[{\"id\":\"a\",\"owner\":\"o\",\"match\":{\"uid\":1e400},\"grants\":[]}]}",
                "{\"version\":1,\"agents\":[{\"id\":\"a\",\"owner\":\"o\",\"match\":{\"uid\":99999999999999999999},"
                "\"grants\":[]}]}",
        };
        ab_policy *p = new_policy();

        for (size_t i = 0; i < AB_ARRAY_SIZE(docs); i++) {
                if (add_doc(p, "bad.json", docs[i], false, NULL) != AB_ERR_POLICY)
                        fail_msg("accepted: %s", docs[i]);
                assert_true(rec_count(AB_DIAG_ERROR) >= 1);
                assert_string_equal(rec.f[0].file, "bad.json");
        }
        /* embedded NUL byte within the length */
        {
                static const char nul_doc[] = "{\"version\":1,\"agents\":[]}\0";
                ab_diag d = mkdiag(false);
                rec_reset();
                assert_int_equal(ab_policy_add_document(p, "nul.json", nul_doc, sizeof nul_doc - 1, &d),
                                 AB_ERR_POLICY);
        }
        assert_int_equal(p->n_agents, 0);
        assert_int_equal(p->serial, 0);
        drop(p);
}

static void test_duplicate_json_keys_everywhere(void **state)
{
        static const char *const docs[] = {
                "{'version':1,'version':1,'agents':[]}",
                "{'version':1,'agents':[],'agents':[]}",
                "{'version':1,'agents':[{'id':'a','id':'b','owner':'o','match':{'uid':1},'grants':[]}]}",
                "{'version':1,'agents':[{'id':'a','owner':'o','match':{'uid':1,'uid':2},'grants':[]}]}",
                "{'version':1,'agents':[{'id':'a','owner':'o','match':{'uid':1},'grants':[{'audience':'x',"
                "'audience':'y','scopes':['s']}]}]}",
                "{'version':1,'scope_groups':{'g':['a'],'g':['b']},'agents':[]}",
        };
        ab_policy *p = new_policy();

        for (size_t i = 0; i < AB_ARRAY_SIZE(docs); i++) {
                if (add_doc(p, "dup.json", J(docs[i]), false, NULL) != AB_ERR_POLICY)
                        fail_msg("accepted: %s", docs[i]);
                assert_true(rec_count(AB_DIAG_ERROR) >= 1);
        }
        assert_int_equal(p->n_agents, 0);
        drop(p);
}

/* A document that fails leaves what was loaded before exactly as it was. */
static void test_failed_document_changes_nothing(void **state)
{
        ab_policy *p = new_policy();
        ab_agent *before;
        ab_identity id = { .uid = 1000 };
        const ab_agent *m;

        assert_int_equal(add_doc(p, "one.json", example_doc, false, NULL), 0);
        before = p->agents;
        assert_int_equal(p->n_agents, 2);
        assert_int_equal(p->serial, 1);
        strcpy(id.unit, "code-review-bot.service");
        m = ab_policy_match(p, &id);
        assert_non_null(m);
        assert_string_equal(m->id, "code-review-bot");

        /* good agents first, a bad one last */
        assert_int_equal(add_doc(p, "two.json",
                                 J("{'version':1,'agents':[{'id':'new1','owner':'o','match':{'uid':1000},'grants':[]},"
                                   "{'id':'new2','owner':'o','match':{'uid':1001},'grants':[]},"
                                   "{'id':'new3','match':{'uid':1002},'grants':[]}]}"),
                                 false, NULL),
                         AB_ERR_POLICY);
        assert_finding(AB_DIAG_ERROR, "$.agents[2]", "owner");
        /* other failure kinds */
        assert_int_equal(add_doc(p, "three.json", "{", false, NULL), AB_ERR_POLICY);
        assert_int_equal(add_doc(p, "four.json", example_doc, false, NULL), AB_ERR_POLICY); /* duplicate ids */
        assert_int_equal(add_doc(p, "five.json", agents_doc(0, AB_POLICY_MAX_AGENTS), false, NULL), AB_ERR_POLICY);

        assert_ptr_equal(p->agents, before);
        assert_int_equal(p->n_agents, 2);
        assert_int_equal(p->serial, 1);
        assert_string_equal(p->agents[0].id, "code-review-bot");
        assert_string_equal(p->agents[1].id, "deploy-agent");
        assert_string_equal(p->agents[0].source, "one.json");
        assert_int_equal(p->agents[0].grants[0].n_scopes, 3);
        assert_string_equal(p->agents[0].grants[0].scopes[0], "repo:read");
        m = ab_policy_match(p, &id);
        assert_non_null(m);
        assert_string_equal(m->id, "code-review-bot");
        id.uid = 1001;
        assert_null(ab_policy_match(p, &id));

        /* and a good document is still added after all that */
        assert_int_equal(add_doc(p, "six.json", agents_doc(5000, 2), false, NULL), 0);
        assert_int_equal(p->n_agents, 4);
        assert_int_equal(p->serial, 2);
        assert_string_equal(p->agents[0].id, "code-review-bot");
        assert_string_equal(p->agents[3].id, "agent-5001");
        assert_string_equal(p->agents[3].source, "six.json");
        drop(p);
}

/* ---- loading files ------------------------------------------------------- */

static char tmpdir[PATH_MAX];

static void write_file(const char *name, const char *text, size_t len)
{
        char path[PATH_MAX * 2];
        FILE *f;

        snprintf(path, sizeof path, "%s/%s", tmpdir, name);
        f = fopen(path, "w");
        assert_non_null(f);
        assert_int_equal(fwrite(text, 1, len, f), len);
        assert_int_equal(fclose(f), 0);
}

static void rm_tmpdir(void)
{
        char cmd[PATH_MAX + 16];
        if (!tmpdir[0])
                return;
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
        assert_int_equal(system(cmd), 0);
        tmpdir[0] = '\0';
}

static void mk_tmpdir(void)
{
        strcpy(tmpdir, "/tmp/ab-test-policy-XXXXXX");
        assert_non_null(mkdtemp(tmpdir));
}

static void test_load_path(void **state)
{
        ab_policy *p = (ab_policy *)0x1;
        ab_diag d = mkdiag(false);
        char path[PATH_MAX * 2];
        const char *b = J("{'version':1,'agents':[{'id':'b','owner':'o','match':{'uid':2},'grants':[]}]}");
        const char *a = J("{'version':1,'agents':[{'id':'a','owner':'o','match':{'uid':1},'grants':[]}]}");

        mk_tmpdir();
        write_file("20-b.json", b, strlen(b));
        write_file("10-a.json", a, strlen(a));
        write_file("notes.txt", "not json", 8);
        write_file(".hidden.json", "not json", 8);
        write_file("x.json.bak", "not json", 8);
        write_file(".json", "not json", 8);

        rec_reset();
        assert_int_equal(ab_policy_load_path(tmpdir, &d, &p), 0);
        track(p);
        assert_int_equal(d.errors, 0);
        assert_int_equal(p->n_agents, 2);
        assert_string_equal(p->agents[0].id, "a"); /* sorted by name */
        assert_string_equal(p->agents[1].id, "b");
        snprintf(path, sizeof path, "%s/10-a.json", tmpdir);
        assert_string_equal(p->agents[0].source, path);
        drop(p);

        /* a single file */
        p = NULL;
        assert_int_equal(ab_policy_load_path(path, &d, &p), 0);
        track(p);
        assert_int_equal(p->n_agents, 1);
        drop(p);

        /* one bad file fails the whole directory; every file is still checked */
        write_file("15-bad.json", "{\"version\":1,\"agents\":[{}]}", 27);
        write_file("30-dup.json", a, strlen(a));
        rec_reset();
        d = mkdiag(false);
        p = (ab_policy *)0x1;
        assert_int_equal(ab_policy_load_path(tmpdir, &d, &p), AB_ERR_POLICY);
        assert_ptr_equal(p, (ab_policy *)0x1);
        snprintf(path, sizeof path, "%s/15-bad.json", tmpdir);
        {
                bool bad_seen = false, dup_seen = false;
                char dup[PATH_MAX * 2];
                snprintf(dup, sizeof dup, "%s/30-dup.json", tmpdir);
                for (size_t i = 0; i < rec.n; i++) {
                        bad_seen |= strcmp(rec.f[i].file, path) == 0;
                        dup_seen |= strcmp(rec.f[i].file, dup) == 0 && strcmp(rec.f[i].path, "$.agents[0]") == 0;
                }
                assert_true(bad_seen);
                assert_true(dup_seen);
        }

        /* missing path */
        rec_reset();
        snprintf(path, sizeof path, "%s/does-not-exist", tmpdir);
        assert_int_equal(ab_policy_load_path(path, &d, &p), -ENOENT);
        assert_ptr_equal(p, (ab_policy *)0x1);
        assert_true(rec_count(AB_DIAG_ERROR) >= 1);
        rm_tmpdir();
}

/*
 * An empty directory is an empty policy. Run in a child: undefined
 * behaviour found by the sanitizers aborts the process, and the other
 * tests should still run.
 */
static void test_load_path_empty_dir(void **state)
{
        pid_t pid;
        int status;

        mk_tmpdir();
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                ab_diag cd = { 0 };
                ab_policy *cp = NULL;
                int r;
                alarm(10);
                r = ab_policy_load_path(tmpdir, &cd, &cp);
                _exit(r == 0 && cp && cp->n_agents == 0 && cd.errors == 0 ? 0 : 1);
        }
        assert_int_equal(waitpid(pid, &status, 0), pid);
        rm_tmpdir();
        if (WIFSIGNALED(status))
                fail_msg("loading an empty directory crashed (signal %d)", WTERMSIG(status));
        assert_true(WIFEXITED(status));
        if (WEXITSTATUS(status) != 0)
                fail_msg("loading an empty directory failed (exit status %d; a sanitizer report above "
                         "means undefined behaviour)", WEXITSTATUS(status));
}

static void test_load_path_file_size(void **state)
{
        const char *base = J("{'version':1,'agents':[]}");
        char *big = malloc(AB_POLICY_MAX_FILE + 1);
        ab_diag d = mkdiag(false);
        ab_policy *p = NULL;
        char path[PATH_MAX * 2];

        assert_non_null(big);
        memset(big, '\n', AB_POLICY_MAX_FILE + 1);
        memcpy(big, base, strlen(base));
        mk_tmpdir();
        snprintf(path, sizeof path, "%s/max.json", tmpdir);
        write_file("max.json", big, AB_POLICY_MAX_FILE);
        assert_int_equal(ab_policy_load_path(path, &d, &p), 0);
        track(p);
        drop(p);
        p = NULL;
        write_file("max.json", big, AB_POLICY_MAX_FILE + 1);
        assert_int_equal(ab_policy_load_path(path, &d, &p), AB_ERR_TOO_LARGE);
        assert_null(p);
        /* and inside a directory */
        assert_int_equal(ab_policy_load_path(tmpdir, &d, &p), AB_ERR_TOO_LARGE);
        assert_null(p);
        free(big);
        rm_tmpdir();
}

/* A directory of 1024 policy files loads; 1025 is refused, with a finding that says so. */
static void test_load_path_file_count(void **state)
{
        const char *empty = J("{'version':1,'agents':[]}");
        ab_diag d = mkdiag(false);
        ab_policy *p = NULL;
        char name[32];

        mk_tmpdir();
        for (int i = 0; i < 1024; i++) {
                snprintf(name, sizeof name, "%04d.json", i);
                write_file(name, empty, strlen(empty));
        }
        rec_reset();
        assert_int_equal(ab_policy_load_path(tmpdir, &d, &p), 0);
        track(p);
        assert_int_equal(p->serial, 1024);
        drop(p);
        p = NULL;
        write_file("1024.json", empty, strlen(empty));
        rec_reset();
        d = mkdiag(false);
        assert_int_equal(ab_policy_load_path(tmpdir, &d, &p), AB_ERR_TOO_LARGE);
        assert_null(p);
        rm_tmpdir();
        if (d.errors == 0)
                fail_msg("more than 1024 files refused without any finding");
}

/* Something other than a regular file named *.json: an error, never a hang. */
static void test_load_path_not_regular(void **state)
{
        ab_diag d = mkdiag(false);
        ab_policy *p = NULL;
        char path[PATH_MAX * 2];
        pid_t pid;
        int status;

        mk_tmpdir();
        snprintf(path, sizeof path, "%s/sub.json", tmpdir);
        assert_int_equal(mkdir(path, 0700), 0);
        rec_reset();
        assert_int_equal(ab_policy_load_path(tmpdir, &d, &p), AB_ERR_POLICY);
        assert_null(p);
        assert_true(rec_count(AB_DIAG_ERROR) >= 1);
        assert_string_equal(rec.f[0].file, path);
        rmdir(path);

        /* a FIFO without a writer: opening it must not block */
        snprintf(path, sizeof path, "%s/fifo.json", tmpdir);
        assert_int_equal(mkfifo(path, 0600), 0);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                ab_diag cd = { 0 };
                ab_policy *cp = NULL;
                alarm(2);
                _exit(ab_policy_load_path(tmpdir, &cd, &cp) == AB_ERR_POLICY ? 0 : 1);
        }
        assert_int_equal(waitpid(pid, &status, 0), pid);
        rm_tmpdir();
        if (WIFSIGNALED(status))
                fail_msg("loading a directory with a FIFO named *.json hung (killed by signal %d)", WTERMSIG(status));
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), 0);
}

/* ---- hostile documents ------------------------------------------------------ */

/* A document of head, then n copies of item (joined by commas; %zu is the index), then tail. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
static const char *repeated(const char *head, const char *item, size_t n, const char *tail)
{
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);

        assert_non_null(f);
        fputs(head, f);
        for (size_t i = 0; i < n; i++) {
                if (i)
                        fputc(',', f);
                fprintf(f, item, i);
        }
        fputs(tail, f);
        assert_int_equal(fclose(f), 0);
        assert_true(len < AB_POLICY_MAX_FILE); /* huge in count, still under the size limit */
        return keep(buf);
}
#pragma GCC diagnostic pop

/*
 * Arrays far past their limits (hundreds of thousands of elements, each
 * cheap): refused with one error that names the limit, fast, nothing kept.
 */
static void test_huge_arrays(void **state)
{
        const char *doc;
        ab_policy *p;

        doc = repeated("{\"version\":1,\"agents\":[", "{}", 200000, "]}");
        expect_error_at(doc, "$.agents");
        assert_finding(AB_DIAG_ERROR, "$.agents", "more than 4096 agents");
        assert_int_equal(rec_count(AB_DIAG_ERROR), 1);

        doc = repeated("{\"version\":1,\"agents\":[{\"id\":\"a\",\"owner\":\"o\",\"match\":{\"uid\":1},\"grants\":[",
                       "{}", 200000, "]}]}");
        expect_error_at(doc, "$.agents[0].grants");
        assert_finding(AB_DIAG_ERROR, "$.agents[0].grants", "more than 64 grants");
        assert_int_equal(rec_count(AB_DIAG_ERROR), 1);

        doc = repeated("{\"version\":1,\"agents\":[{\"id\":\"a\",\"owner\":\"o\",\"match\":{\"uid\":1},\"grants\":"
                       "[{\"audience\":\"x\",\"scopes\":[",
                       "\"s\"", 150000, "]}]}]}");
        expect_error_at(doc, "$.agents[0].grants[0].scopes");
        assert_finding(AB_DIAG_ERROR, "$.agents[0].grants[0].scopes", "more than 64 scopes");
        assert_int_equal(rec_count(AB_DIAG_ERROR), 1);

        doc = repeated("{\"version\":1,\"agents\":[{\"id\":\"a\",\"owner\":\"o\",\"match\":{\"uid\":1},\"grants\":"
                       "[{\"audience\":\"x\",\"scopes\":[\"s\"],\"users\":[",
                       "\"u\"", 150000, "]}]}]}");
        expect_error_at(doc, "$.agents[0].grants[0].users");
        assert_finding(AB_DIAG_ERROR, "$.agents[0].grants[0].users", "at most 64");

        doc = repeated("{\"version\":1,\"scope_groups\":{\"g\":[", "\"s%zu\"", 100000, "]},\"agents\":[]}");
        expect_error_at(doc, "$.scope_groups.g");
        assert_finding(AB_DIAG_ERROR, "$.scope_groups.g", "at most 64 scopes");

        /* a group used in a grant expands within the grant's limit too */
        doc = repeated("{\"version\":1,\"scope_groups\":{\"g\":[", "\"s%zu\"", 64,
                       "]},\"agents\":[{\"id\":\"a\",\"owner\":\"o\",\"match\":{\"uid\":1},\"grants\":"
                       "[{\"audience\":\"x\",\"scopes\":[\"@g\",\"one-more\"]}]}]}");
        expect_error_at(doc, "$.agents[0].grants[0].scopes");
        assert_finding(AB_DIAG_ERROR, "$.agents[0].grants[0].scopes", "more than 64 scopes");

        /* many small groups are only data: accepted, and the policy stays usable */
        doc = repeated("{\"version\":1,\"scope_groups\":{", "\"g%zu\":[\"s\"]", 40000,
                       "},\"agents\":[{\"id\":\"a\",\"owner\":\"o\",\"match\":{\"uid\":1},\"grants\":"
                       "[{\"audience\":\"x\",\"scopes\":[\"@g39999\"]}]}]}");
        p = load_ok(doc, false);
        assert_int_equal(p->n_agents, 1);
        assert_string_equal(p->agents[0].grants[0].scopes[0], "s");
        drop(p);

        /* an object with eighty thousand unknown keys: refused, every key named, no crash */
        doc = repeated("{\"version\":1,\"agents\":[{\"id\":\"a\",\"owner\":\"o\",\"match\":{\"uid\":1},\"grants\":[],",
                       "\"k%zu\":0", 80000, "}]}");
        expect_error_at(doc, "$.agents[0]");
        assert_finding(AB_DIAG_ERROR, "$.agents[0]", "unknown key \"k79999\"");
}

/* The error for each kind of hostile document says what is wrong, and where. */
static void test_hostile_messages(void **state)
{
        const size_t depth = 5000;
        char *s = keep(malloc(depth + 1));
        ab_policy *p = new_policy();

        memset(s, '[', depth);
        s[depth] = '\0';
        assert_int_equal(add_doc(p, "deep.json", s, false, NULL), AB_ERR_POLICY);
        assert_int_equal(rec.n, 1);
        assert_true(strncmp(rec.f[0].path, "line 1 column ", 14) == 0);
        assert_non_null(strstr(rec.f[0].msg, "invalid JSON"));
        assert_non_null(strstr(rec.f[0].msg, "depth"));

        assert_int_equal(add_doc(p, "utf8.json",
                                 "{\"version\":1,\n\"agents\":[{\"id\":\"a\",\"owner\":\"\xc3\x28\",\"match\":{\"uid\":1},"
                                 "\"grants\":[]}]}",
                                 false, NULL),
                         AB_ERR_POLICY);
        assert_int_equal(rec.n, 1);
        assert_true(strncmp(rec.f[0].path, "line 2 column ", 14) == 0);
        assert_non_null(strstr(rec.f[0].msg, "invalid JSON"));
        assert_non_null(strstr(rec.f[0].msg, "0xc3"));

        /* invalid UTF-8 in a key */
        assert_int_equal(add_doc(p, "utf8.json", "{\"version\":1,\"agents\":[],\"\xff\":1}", false, NULL),
                         AB_ERR_POLICY);
        assert_int_equal(rec.n, 1);
        assert_non_null(strstr(rec.f[0].msg, "invalid JSON"));

        assert_int_equal(add_doc(p, "dup.json", "{\"version\":1,\"agents\":[],\"version\":2}", false, NULL),
                         AB_ERR_POLICY);
        assert_int_equal(rec.n, 1);
        assert_non_null(strstr(rec.f[0].msg, "duplicate"));
        assert_non_null(strstr(rec.f[0].msg, "version"));

        assert_int_equal(add_doc(p, "type.json", "{\"version\":\"2\",\"agents\":[]}", false, NULL), AB_ERR_POLICY);
        assert_int_equal(rec.n, 1);
        assert_string_equal(rec.f[0].path, "$.version");
        assert_non_null(strstr(rec.f[0].msg, "integer"));
        assert_int_equal(p->n_agents, 0);
        assert_int_equal(p->serial, 0);
        drop(p);
}

/* A 10 MB file among the sources: refused before it is read, with a finding that names it. */
static void test_load_path_ten_megabytes(void **state)
{
        const size_t size = 10 * 1024 * 1024;
        char *big = malloc(size);
        ab_diag d = mkdiag(false);
        ab_policy *p = NULL;
        char path[PATH_MAX * 2];
        const char *ok = J("{'version':1,'agents':[{'id':'a','owner':'o','match':{'uid':1},'grants':[]}]}");

        assert_non_null(big);
        memset(big, ' ', size);
        memcpy(big, "{\"version\":1,\"agents\":[]}", 25);
        mk_tmpdir();
        write_file("10-ok.json", ok, strlen(ok));
        write_file("20-huge.json", big, size);
        free(big);
        snprintf(path, sizeof path, "%s/20-huge.json", tmpdir);
        rec_reset();
        assert_int_equal(ab_policy_load_path(tmpdir, &d, &p), AB_ERR_TOO_LARGE);
        assert_null(p);
        assert_int_equal(rec_count(AB_DIAG_ERROR), 1);
        assert_finding(AB_DIAG_ERROR, "$", "too large");
        assert_string_equal(rec.f[0].file, path);
        rec_reset();
        assert_int_equal(ab_policy_load_path(path, &d, &p), AB_ERR_TOO_LARGE);
        assert_null(p);
        assert_finding(AB_DIAG_ERROR, "$", "too large");
        rm_tmpdir();
}

/*
 * A source whose name is not printable UTF-8 is refused with an error that
 * names it in ASCII: such a name cannot go into a finding, a reply or the
 * store (compiling one used to fail with "Cannot allocate memory").
 */
static void test_source_name_not_utf8(void **state)
{
        static const char *const names[] = { "\xff.json", "caf\xc3.json", "a\nb.json", "tab\t.json" };
        const char *doc = J("{'version':1,'agents':[]}");
        ab_diag d;
        ab_policy *p = new_policy();

        for (size_t i = 0; i < AB_ARRAY_SIZE(names); i++) {
                assert_int_equal(add_doc(p, names[i], doc, false, NULL), AB_ERR_POLICY);
                assert_int_equal(rec.n, 1);
                assert_non_null(strstr(rec.f[0].msg, "not printable UTF-8"));
                assert_non_null(strchr(rec.f[0].file, '?'));
                for (const char *c = rec.f[0].file; *c; c++)
                        assert_true(*c >= 0x20 && *c < 0x7f);
        }
        /* printable UTF-8 is a fine name */
        assert_int_equal(add_doc(p, "caf\xc3\xa9.json", doc, false, NULL), 0);
        assert_int_equal(p->serial, 1);
        drop(p);

        mk_tmpdir();
        write_file("10-ok.json", doc, strlen(doc));
        write_file("\xfe\xff.json", doc, strlen(doc));
        p = NULL;
        d = mkdiag(false);
        rec_reset();
        assert_int_equal(ab_policy_load_path(tmpdir, &d, &p), AB_ERR_POLICY);
        assert_null(p);
        assert_int_equal(rec_count(AB_DIAG_ERROR), 1);
        assert_non_null(strstr(rec.f[0].file, "/??.json"));
        rm_tmpdir();
}

/* ---- compiling into the store (broker/compile.c) ---------------------------- */

typedef struct compile_env {
        char pol[PATH_MAX * 2], keys[PATH_MAX * 2], state[PATH_MAX * 2];
        unsigned char pk[crypto_sign_PUBLICKEYBYTES], sk[crypto_sign_SECRETKEYBYTES];
        ab_store *st;
} compile_env;

static void cenv_init(compile_env *e)
{
        char b64[128];
        FILE *f;
        char path[PATH_MAX * 3];

        memset(e, 0, sizeof *e);
        assert_true(sodium_init() >= 0);
        mk_tmpdir();
        snprintf(e->pol, sizeof e->pol, "%s/policy.d", tmpdir);
        snprintf(e->keys, sizeof e->keys, "%s/keys", tmpdir);
        snprintf(e->state, sizeof e->state, "%s/state", tmpdir);
        assert_int_equal(mkdir(e->pol, 0755), 0);
        assert_int_equal(mkdir(e->keys, 0755), 0);
        assert_int_equal(mkdir(e->state, 0700), 0);
        crypto_sign_keypair(e->pk, e->sk);
        sodium_bin2base64(b64, sizeof b64, e->pk, sizeof e->pk, sodium_base64_VARIANT_ORIGINAL);
        snprintf(path, sizeof path, "%s/cp.pub", e->keys);
        f = fopen(path, "w");
        assert_non_null(f);
        fprintf(f, "%s\n", b64);
        assert_int_equal(fclose(f), 0);
        assert_int_equal(ab_store_open(e->state, 0, &e->st, NULL), 0);
}

static void cenv_done(compile_env *e)
{
        ab_store_close(e->st);
        e->st = NULL;
        rm_tmpdir();
}

/* Write policy.d/name with text and (if sign) name.sig made with the trusted key. */
static void cenv_put(compile_env *e, const char *name, const char *text, size_t len, bool sign)
{
        char path[PATH_MAX * 3];
        FILE *f;

        snprintf(path, sizeof path, "%s/%s", e->pol, name);
        f = fopen(path, "w");
        assert_non_null(f);
        assert_int_equal(fwrite(text, 1, len, f), len);
        assert_int_equal(fclose(f), 0);
        if (sign) {
                unsigned char sig[crypto_sign_BYTES];
                char b64[128];
                crypto_sign_detached(sig, NULL, (const unsigned char *)text, len, e->sk);
                sodium_bin2base64(b64, sizeof b64, sig, sizeof sig, sodium_base64_VARIANT_ORIGINAL);
                strcat(path, ".sig");
                f = fopen(path, "w");
                assert_non_null(f);
                fprintf(f, "%s\n", b64);
                assert_int_equal(fclose(f), 0);
        }
}

static void cenv_rm(compile_env *e, const char *name)
{
        char path[PATH_MAX * 3];
        snprintf(path, sizeof path, "%s/%s", e->pol, name);
        assert_int_equal(unlink(path), 0);
}

static int cenv_compile(compile_env *e, bool require_signed, char *reason, size_t reasonmax)
{
        ab_compile_opts o = { .policy_path = e->pol, .trusted_keys_dir = e->keys, .require_signed = require_signed };
        ab_diag d = mkdiag(false);
        ab_policy *p = NULL;
        int r;

        rec_reset();
        r = ab_policy_compile(e->st, &o, &d, &p, reason, reasonmax);
        if (r == 0) {
                assert_non_null(p);
                ab_policy_free(p);
        } else {
                assert_null(p);
                assert_true(strlen(reason) > 0);
        }
        return r;
}

/* The agents compiled into the store, as the broker loads them at start ("" if none). */
static const char *stored_agent(compile_env *e)
{
        ab_diag d = mkdiag(false);
        ab_policy *p = NULL;
        const char *id;

        assert_int_equal(ab_policy_from_store(e->st, &d, &p), 0);
        id = p->n_agents ? fmt("%s", p->agents[0].id) : "";
        ab_policy_free(p);
        return id;
}

static const char *agent_doc(int version, const char *id)
{
        return fmt("{\"version\":%d,\"agents\":[{\"id\":\"%s\",\"owner\":\"o\",\"match\":{\"uid\":1},\"grants\":[]}]}",
                   version, id);
}

/* Hostile sources in the compiled directory: each refused with a reason, the store unchanged. */
static void test_compile_hostile_sources(void **state)
{
        compile_env e;
        char reason[512];
        const char *doc;
        char *big;
        const size_t size = 10 * 1024 * 1024;

        cenv_init(&e);
        doc = agent_doc(2, "first");
        cenv_put(&e, "10-a.json", doc, strlen(doc), true);
        assert_int_equal(cenv_compile(&e, true, reason, sizeof reason), 0);
        assert_string_equal(stored_agent(&e), "first");

        /* 10 MB */
        big = malloc(size);
        assert_non_null(big);
        memset(big, ' ', size);
        memcpy(big, "{\"version\":1,\"agents\":[]}", 25);
        cenv_put(&e, "20-huge.json", big, size, false);
        free(big);
        assert_int_equal(cenv_compile(&e, false, reason, sizeof reason), AB_ERR_TOO_LARGE);
        assert_non_null(strstr(reason, "20-huge.json"));
        assert_non_null(strstr(reason, "too large"));
        assert_string_equal(stored_agent(&e), "first");
        cenv_rm(&e, "20-huge.json");

        /* a name that is not UTF-8 */
        doc = agent_doc(1, "named-badly");
        cenv_put(&e, "\xff.json", doc, strlen(doc), true);
        assert_int_equal(cenv_compile(&e, true, reason, sizeof reason), AB_ERR_POLICY);
        assert_non_null(strstr(reason, "/?.json"));
        assert_non_null(strstr(reason, "not printable UTF-8"));
        assert_int_equal(rec_count(AB_DIAG_ERROR), 1);
        assert_string_equal(stored_agent(&e), "first");
        cenv_rm(&e, "\xff.json");
        cenv_rm(&e, "\xff.json.sig");

        /* deep nesting, invalid UTF-8, duplicate keys, wrong types: invalid policy */
        {
                static const char *const bad[] = {
                        "{\"version\":3,\"agents\":[],\"$schema\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
                        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
                        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
                        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
                        "{\"version\":3,\"agents\":[{\"id\":\"x\",\"owner\":\"\xc3\x28\",\"match\":{\"uid\":1},\"grants\":[]}]}",
                        "{\"version\":3,\"version\":4,\"agents\":[]}",
                        "{\"version\":3,\"agents\":{}}",
                };
                for (size_t i = 0; i < AB_ARRAY_SIZE(bad); i++) {
                        cenv_put(&e, "30-bad.json", bad[i], strlen(bad[i]), true);
                        assert_int_equal(cenv_compile(&e, true, reason, sizeof reason), AB_ERR_POLICY);
                        assert_non_null(strstr(reason, "30-bad.json"));
                        assert_true(rec_count(AB_DIAG_ERROR) >= 1);
                        assert_string_equal(stored_agent(&e), "first");
                }
                cenv_rm(&e, "30-bad.json");
                cenv_rm(&e, "30-bad.json.sig");
        }
        cenv_done(&e);
}

/* Signatures and versions: what require_signed and rollback protection refuse. */
static void test_compile_signatures_and_rollback(void **state)
{
        compile_env e;
        char reason[512], path[PATH_MAX * 3];
        const char *v2 = agent_doc(2, "v2"), *v1 = agent_doc(1, "v1"), *v2b = agent_doc(2, "v2b");
        const char *v3 = agent_doc(3, "v3");

        cenv_init(&e);
        cenv_put(&e, "10-a.json", v2, strlen(v2), true);
        assert_int_equal(cenv_compile(&e, true, reason, sizeof reason), 0);
        assert_string_equal(stored_agent(&e), "v2");

        /* unsigned */
        cenv_rm(&e, "10-a.json.sig");
        cenv_put(&e, "10-a.json", v3, strlen(v3), false);
        assert_int_equal(cenv_compile(&e, true, reason, sizeof reason), AB_ERR_CRYPTO);
        assert_non_null(strstr(reason, "unsigned"));
        assert_string_equal(stored_agent(&e), "v2");
        /* signed, then the content changed: the signature does not verify */
        cenv_put(&e, "10-a.json", v3, strlen(v3), true);
        cenv_put(&e, "10-a.json", v2b, strlen(v2b), false);
        assert_int_equal(cenv_compile(&e, true, reason, sizeof reason), AB_ERR_CRYPTO);
        assert_non_null(strstr(reason, "signature does not verify"));
        /* and without require_signed a bad signature is refused all the same */
        assert_int_equal(cenv_compile(&e, false, reason, sizeof reason), AB_ERR_CRYPTO);
        /* a signature that is not even base64 */
        snprintf(path, sizeof path, "%s/10-a.json.sig", e.pol);
        assert_int_equal(truncate(path, 0), 0);
        assert_int_equal(cenv_compile(&e, true, reason, sizeof reason), AB_ERR_CRYPTO);
        assert_string_equal(stored_agent(&e), "v2");

        /* rollback: a lower version, validly signed */
        cenv_put(&e, "10-a.json", v1, strlen(v1), true);
        assert_int_equal(cenv_compile(&e, true, reason, sizeof reason), -ESTALE);
        assert_non_null(strstr(reason, "rollback"));
        assert_string_equal(stored_agent(&e), "v2");
        /* the same version with other content, signed */
        cenv_put(&e, "10-a.json", v2b, strlen(v2b), true);
        assert_int_equal(cenv_compile(&e, true, reason, sizeof reason), -ESTALE);
        assert_string_equal(stored_agent(&e), "v2");
        /* a source removed and put back lower is still a rollback */
        cenv_put(&e, "10-a.json", v3, strlen(v3), true);
        assert_int_equal(cenv_compile(&e, true, reason, sizeof reason), 0);
        assert_string_equal(stored_agent(&e), "v3");
        cenv_rm(&e, "10-a.json");
        cenv_rm(&e, "10-a.json.sig");
        assert_int_equal(cenv_compile(&e, true, reason, sizeof reason), 0);
        assert_string_equal(stored_agent(&e), "");
        cenv_put(&e, "10-a.json", v2, strlen(v2), true);
        assert_int_equal(cenv_compile(&e, true, reason, sizeof reason), -ESTALE);
        assert_string_equal(stored_agent(&e), "");
        cenv_done(&e);
}

/* ---- matching ------------------------------------------------------------ */

static ab_identity *ident(uid_t uid, gid_t gid, const char *exe, const char *sha256, const char *unit)
{
        static ab_identity id;

        memset(&id, 0, sizeof id);
        id.uid = uid;
        id.gid = gid;
        id.pid = 4242;
        snprintf(id.exe, sizeof id.exe, "%s", exe);
        snprintf(id.sha256, sizeof id.sha256, "%s", sha256);
        snprintf(id.unit, sizeof id.unit, "%s", unit);
        id.peer = NULL;
        return &id;
}

static const char *matched(const ab_policy *p, const ab_identity *id)
{
        const ab_agent *a = ab_policy_match(p, id);
        return a ? a->id : "(none)";
}

#define SHA_B "0000000000000000000000000000000000000000000000000000000000000001"

static void test_match_every_selector(void **state)
{
        ab_policy *p = load_ok(
                fmt("{\"version\":1,\"agents\":["
                    "{\"id\":\"full\",\"owner\":\"o\",\"match\":{\"uid\":1000,\"gid\":100,\"exe\":\"/usr/bin/agent\","
                    "\"sha256\":\"%s\",\"unit\":\"agent.service\"},\"grants\":[]},"
                    "{\"id\":\"other\",\"owner\":\"o\",\"match\":{\"uid\":1001,\"unit\":\"x.service\"},\"grants\":[]}"
                    "]}",
                    SHA_A),
                false);

        assert_string_equal(matched(p, ident(1000, 100, "/usr/bin/agent", SHA_A, "agent.service")), "full");
        /* each selector on its own must match */
        assert_string_equal(matched(p, ident(1001, 100, "/usr/bin/agent", SHA_A, "agent.service")), "(none)");
        assert_string_equal(matched(p, ident(1000, 101, "/usr/bin/agent", SHA_A, "agent.service")), "(none)");
        assert_string_equal(matched(p, ident(1000, 100, "/usr/bin/agent2", SHA_A, "agent.service")), "(none)");
        assert_string_equal(matched(p, ident(1000, 100, "/usr/bin/agen", SHA_A, "agent.service")), "(none)");
        assert_string_equal(matched(p, ident(1000, 100, "/usr/bin/agent (deleted)", SHA_A, "agent.service")),
                            "(none)");
        assert_string_equal(matched(p, ident(1000, 100, "/usr/bin/agent", SHA_B, "agent.service")), "(none)");
        assert_string_equal(matched(p, ident(1000, 100, "/usr/bin/agent", "", "agent.service")), "(none)");
        assert_string_equal(matched(p, ident(1000, 100, "/usr/bin/agent", SHA_A, "other.service")), "(none)");
        assert_string_equal(matched(p, ident(1000, 100, "/usr/bin/agent", SHA_A, "")), "(none)");
        assert_string_equal(matched(p, ident(1000, 100, "", "", "")), "(none)");
        /* the second agent: uid and unit only, anything else goes */
        assert_string_equal(matched(p, ident(1001, 5, "/bin/sh", "", "x.service")), "other");
        assert_string_equal(matched(p, ident(1001, 5, "/bin/sh", "", "x.service.d")), "(none)");

        /* gid through the supplementary groups of the peer */
        {
                ab_peer peer = { .uid = 1000, .gid = 5, .pidfd = -1, .n_groups = 3, .groups = { 7, 100, 9 } };
                ab_identity *id = ident(1000, 5, "/usr/bin/agent", SHA_A, "agent.service");
                assert_string_equal(matched(p, id), "(none)");
                id->peer = &peer;
                assert_string_equal(matched(p, id), "full");
                peer.groups[1] = 101;
                assert_string_equal(matched(p, id), "(none)");
        }
        drop(p);
}

static void test_match_first_wins(void **state)
{
        ab_policy *p = load_ok(J("{'version':1,'agents':["
                                 "{'id':'narrow','owner':'o','match':{'uid':1000,'unit':'a.service'},'grants':[]},"
                                 "{'id':'broad','owner':'o','match':{'uid':1000},'grants':[]},"
                                 "{'id':'narrow-later','owner':'o','match':{'uid':1000,'unit':'b.service'},'grants':[]}"
                                 "]}"),
                               false);

        assert_string_equal(matched(p, ident(1000, 0, "/x", "", "a.service")), "narrow");
        assert_string_equal(matched(p, ident(1000, 0, "/x", "", "")), "broad");
        /* broad comes first, so the later narrow agent is never chosen */
        assert_string_equal(matched(p, ident(1000, 0, "/x", "", "b.service")), "broad");
        assert_string_equal(matched(p, ident(1001, 0, "/x", "", "a.service")), "(none)");
        drop(p);

        /* across documents, in the order they were added */
        p = new_policy();
        assert_int_equal(add_doc(p, "1.json", J("{'version':1,'agents':[{'id':'one','owner':'o','match':"
                                                "{'uid':7},'grants':[]}]}"), false, NULL), 0);
        assert_int_equal(add_doc(p, "2.json", J("{'version':1,'agents':[{'id':'two','owner':'o','match':"
                                                "{'uid':7},'grants':[]}]}"), false, NULL), 0);
        assert_string_equal(matched(p, ident(7, 0, "/x", "", "")), "one");
        drop(p);
}

static void test_match_unresolved_user(void **state)
{
        ab_policy *p = load_ok(J("{'version':1,'agents':["
                                 "{'id':'ghost','owner':'o','match':{'user':'no-such-user-ab-test','unit':'a.service'},"
                                 "'grants':[]},"
                                 "{'id':'ghost-group','owner':'o','match':{'group':'no-such-group-ab-test'},"
                                 "'grants':[]},"
                                 "{'id':'fallback','owner':'o','match':{'unit':'a.service'},'grants':[]}"
                                 "]}"),
                               false);

        assert_false(p->agents[0].resolved);
        assert_false(p->agents[0].has_uid);
        assert_false(p->agents[1].resolved);
        assert_true(p->agents[2].resolved);
        /* no uid matches a user that does not exist, not even with every other selector matching */
        for (uid_t uid = 0; uid < 3; uid++)
                assert_string_equal(matched(p, ident(uid, 0, "/x", "", "a.service")), "fallback");
        assert_string_equal(matched(p, ident(65534, 65534, "/x", "", "a.service")), "fallback");
        assert_string_equal(matched(p, ident((uid_t)-1, (gid_t)-1, "/x", "", "a.service")), "fallback");
        assert_string_equal(matched(p, ident(0, 0, "/x", "", "")), "(none)");
        drop(p);
}

static void test_match_named_user_and_broker(void **state)
{
        ab_policy *p = load_ok(J("{'version':1,'agents':["
                                 "{'id':'self','owner':'o','match':{'user':'@broker','unit':'s.service'},'grants':[]},"
                                 "{'id':'root','owner':'o','match':{'user':'root','group':'root'},'grants':[]}"
                                 "]}"),
                               false);
        uid_t me = geteuid();

        assert_true(p->agents[0].has_uid);
        assert_int_equal(p->agents[0].uid, me);
        assert_true(p->agents[0].resolved);
        assert_string_equal(matched(p, ident(me, 12345, "/x", "", "s.service")), "self");
        assert_string_not_equal(matched(p, ident(me + 1, 12345, "/x", "", "s.service")), "self");
        assert_int_equal(p->agents[1].uid, 0);
        assert_int_equal(p->agents[1].gid, 0);
        assert_string_equal(matched(p, ident(0, 0, "/x", "", "")), "root");
        assert_string_equal(matched(p, ident(0, 1, "/x", "", "")), "(none)");
        drop(p);
}

/* ---- decisions ----------------------------------------------------------- */

static const char decide_doc[] =
        "{\"version\":1,\"agents\":[{\"id\":\"bot\",\"owner\":\"o\",\"match\":{\"uid\":1000},\"grants\":["
        "{\"audience\":\"mcp://git\",\"scopes\":[\"repo:read\",\"repo:write\"],\"max_ttl\":\"10m\"},"
        "{\"audience\":\"mcp://git\",\"scopes\":[\"issues:read\"],\"max_ttl\":600},"
        "{\"audience\":\"tickets\",\"scopes\":[\"repo:*\"],\"max_ttl\":120},"
        "{\"audience\":\"wide\",\"scopes\":[\"t:read\"],\"max_ttl\":\"24h\"},"
        "{\"audience\":\"short\",\"scopes\":[\"t:read\"],\"max_ttl\":1}"
        "]}]}";

typedef struct decision {
        ab_deny d;
        const ab_grant *g;
        uint32_t ttl;
        char reason[256];
} decision;

static decision decide(const ab_agent *a, const char *aud, uint32_t ttl, size_t n, ...)
{
        const char *scopes[16];
        decision r = { .g = (const ab_grant *)0x1, .ttl = 777777 };
        va_list ap;

        assert_true(n <= 16);
        va_start(ap, n);
        for (size_t i = 0; i < n; i++)
                scopes[i] = va_arg(ap, const char *);
        va_end(ap);
        r.d = ab_policy_decide(a, aud, scopes, n, ttl, &r.g, &r.ttl, r.reason, sizeof r.reason);
        if (r.d == AB_GRANTED) {
                assert_ptr_not_equal(r.g, (const ab_grant *)0x1);
        } else {
                /* a denial leaves the outputs alone and says why */
                assert_ptr_equal(r.g, (const ab_grant *)0x1);
                assert_int_equal(r.ttl, 777777);
                assert_true(strlen(r.reason) > 0);
        }
        return r;
}

static void test_decide_granted(void **state)
{
        ab_policy *p = load_ok(decide_doc, false);
        const ab_agent *a = &p->agents[0];
        decision r;

        r = decide(a, "mcp://git", 0, 1, "repo:read");
        assert_int_equal(r.d, AB_GRANTED);
        assert_ptr_equal(r.g, &a->grants[0]);
        assert_int_equal(r.ttl, 300); /* min(300, 600) */
        r = decide(a, "mcp://git", 0, 2, "repo:write", "repo:read");
        assert_int_equal(r.d, AB_GRANTED);
        assert_ptr_equal(r.g, &a->grants[0]);
        /* a later grant of the same audience */
        r = decide(a, "mcp://git", 0, 1, "issues:read");
        assert_int_equal(r.d, AB_GRANTED);
        assert_ptr_equal(r.g, &a->grants[1]);
        /* default ttl capped by a short max_ttl */
        r = decide(a, "tickets", 0, 1, "repo:read");
        assert_int_equal(r.d, AB_GRANTED);
        assert_int_equal(r.ttl, 120);
        r = decide(a, "short", 0, 1, "t:read");
        assert_int_equal(r.d, AB_GRANTED);
        assert_int_equal(r.ttl, 1);
        /* default ttl is AB_DEFAULT_TTL under a long max_ttl */
        r = decide(a, "wide", 0, 1, "t:read");
        assert_int_equal(r.d, AB_GRANTED);
        assert_int_equal(r.ttl, AB_DEFAULT_TTL);
        /* an explicit ttl up to max_ttl is kept */
        r = decide(a, "mcp://git", 1, 1, "repo:read");
        assert_int_equal(r.d, AB_GRANTED);
        assert_int_equal(r.ttl, 1);
        r = decide(a, "mcp://git", 600, 1, "repo:read");
        assert_int_equal(r.d, AB_GRANTED);
        assert_int_equal(r.ttl, 600);
        r = decide(a, "wide", AB_TTL_MAX, 1, "t:read");
        assert_int_equal(r.d, AB_GRANTED);
        assert_int_equal(r.ttl, AB_TTL_MAX);
        drop(p);
}

static void test_decide_ttl(void **state)
{
        ab_policy *p = load_ok(decide_doc, false);
        const ab_agent *a = &p->agents[0];
        decision r;

        r = decide(a, "mcp://git", 601, 1, "repo:read");
        assert_int_equal(r.d, AB_DENY_TTL);
        r = decide(a, "tickets", 121, 1, "repo:read");
        assert_int_equal(r.d, AB_DENY_TTL);
        r = decide(a, "short", 2, 1, "t:read");
        assert_int_equal(r.d, AB_DENY_TTL);
        r = decide(a, "wide", AB_TTL_MAX + 1, 1, "t:read");
        assert_int_equal(r.d, AB_DENY_TTL);
        r = decide(a, "wide", UINT32_MAX, 1, "t:read");
        assert_int_equal(r.d, AB_DENY_TTL);
        drop(p);
}

static void test_decide_audience(void **state)
{
        ab_policy *p = load_ok(decide_doc, false);
        const ab_agent *a = &p->agents[0];
        decision r;

        r = decide(a, "mcp://gitlab", 0, 1, "repo:read");
        assert_int_equal(r.d, AB_DENY_AUDIENCE);
        assert_non_null(strstr(r.reason, "mcp://gitlab"));
        assert_int_equal(decide(a, "mcp://gi", 0, 1, "repo:read").d, AB_DENY_AUDIENCE);
        assert_int_equal(decide(a, "MCP://git", 0, 1, "repo:read").d, AB_DENY_AUDIENCE);
        assert_int_equal(decide(a, "mcp://git/", 0, 1, "repo:read").d, AB_DENY_AUDIENCE);
        assert_int_equal(decide(a, "", 0, 1, "repo:read").d, AB_DENY_AUDIENCE);
        assert_int_equal(decide(a, "*", 0, 1, "repo:read").d, AB_DENY_AUDIENCE);
        /* audience is checked before ttl */
        assert_int_equal(decide(a, "nope", 100000, 1, "repo:read").d, AB_DENY_AUDIENCE);
        drop(p);
}

static void test_decide_scope(void **state)
{
        ab_policy *p = load_ok(decide_doc, false);
        const ab_agent *a = &p->agents[0];
        decision r;

        /* one scope not granted: the whole request is denied, no partial grant */
        r = decide(a, "mcp://git", 0, 2, "repo:read", "repo:admin");
        assert_int_equal(r.d, AB_DENY_SCOPE);
        assert_int_equal(decide(a, "mcp://git", 0, 1, "repo:admin").d, AB_DENY_SCOPE);
        assert_int_equal(decide(a, "mcp://git", 0, 1, "repo:rea").d, AB_DENY_SCOPE);
        assert_int_equal(decide(a, "mcp://git", 0, 1, "repo:read ").d, AB_DENY_SCOPE);
        assert_int_equal(decide(a, "mcp://git", 0, 1, "").d, AB_DENY_SCOPE);
        /* scopes split over two grants of the same audience: one grant must cover the request whole */
        r = decide(a, "mcp://git", 0, 2, "repo:read", "issues:read");
        assert_int_equal(r.d, AB_DENY_SCOPE);
        assert_int_equal(decide(a, "mcp://git", 0, 2, "issues:read", "repo:read").d, AB_DENY_SCOPE);
        /* a scope of another audience's grant does not count */
        assert_int_equal(decide(a, "tickets", 0, 1, "t:read").d, AB_DENY_SCOPE);
        /* scope denial wins over a ttl that is also too long */
        assert_int_equal(decide(a, "mcp://git", 100000, 1, "repo:admin").d, AB_DENY_SCOPE);
        drop(p);
}

/*
 * The reason names a scope that is really missing: with two grants of the
 * audience, a scope covered by one of them is not the one to blame.
 */
static void test_decide_scope_reason(void **state)
{
        ab_policy *p = load_ok(decide_doc, false);
        const ab_agent *a = &p->agents[0];
        decision r;

        r = decide(a, "mcp://git", 0, 1, "repo:admin");
        assert_non_null(strstr(r.reason, "repo:admin"));
        r = decide(a, "mcp://git", 0, 2, "repo:read", "repo:admin");
        assert_int_equal(r.d, AB_DENY_SCOPE);
        if (!strstr(r.reason, "repo:admin"))
                fail_msg("reason does not name the scope no grant covers (\"repo:admin\"): %s", r.reason);
        drop(p);
}

static void test_decide_wildcard(void **state)
{
        ab_policy *p = load_ok(decide_doc, false);
        const ab_agent *a = &p->agents[0];

        assert_int_equal(decide(a, "tickets", 0, 1, "repo:read").d, AB_GRANTED);
        assert_int_equal(decide(a, "tickets", 0, 2, "repo:read", "repo:write").d, AB_GRANTED);
        assert_int_equal(decide(a, "tickets", 0, 1, "repo:x:y").d, AB_GRANTED);
        assert_int_equal(decide(a, "tickets", 0, 1, "repox").d, AB_DENY_SCOPE);
        assert_int_equal(decide(a, "tickets", 0, 1, "repo").d, AB_DENY_SCOPE);
        assert_int_equal(decide(a, "tickets", 0, 1, "rep").d, AB_DENY_SCOPE);
        assert_int_equal(decide(a, "tickets", 0, 1, "Repo:read").d, AB_DENY_SCOPE);
        assert_int_equal(decide(a, "tickets", 0, 1, "xrepo:read").d, AB_DENY_SCOPE);
        /* a '*' in a request never widens it */
        assert_int_equal(decide(a, "mcp://git", 0, 1, "repo:*").d, AB_DENY_SCOPE);
        assert_int_equal(decide(a, "mcp://git", 0, 1, "*").d, AB_DENY_SCOPE);
        assert_int_equal(decide(a, "tickets", 0, 1, "*").d, AB_DENY_SCOPE);
        drop(p);
}

static void test_decide_reason_truncated(void **state)
{
        ab_policy *p = load_ok(decide_doc, false);
        const ab_agent *a = &p->agents[0];
        const char *scopes[] = { "repo:admin" };
        const ab_grant *g = NULL;
        uint32_t ttl = 0;
        char reason[16];

        memset(reason, 'Z', sizeof reason);
        assert_int_equal(ab_policy_decide(a, "mcp://git", scopes, 1, 0, &g, &ttl, reason, 8), AB_DENY_SCOPE);
        assert_int_equal(strlen(reason), 7);
        assert_int_equal(reason[8], 'Z');
        memset(reason, 'Z', sizeof reason);
        assert_int_equal(ab_policy_decide(a, "other", scopes, 1, 0, &g, &ttl, reason, 8), AB_DENY_AUDIENCE);
        assert_int_equal(strlen(reason), 7);
        memset(reason, 'Z', sizeof reason);
        assert_int_equal(ab_policy_decide(a, "mcp://git", (const char *[]){ "repo:read" }, 1, 9999, &g, &ttl, reason,
                                          8),
                         AB_DENY_TTL);
        assert_int_equal(strlen(reason), 7);
        drop(p);
}

/* ---- lint ---------------------------------------------------------------- */

static const char lint_doc[] =
        "{\"version\":1,\"agents\":["
        "{\"id\":\"a\",\"owner\":\"o\",\"match\":{\"uid\":1000},\"grants\":["
        "{\"audience\":\"aud\",\"scopes\":[\"ok\",\"repo:*\"],\"max_ttl\":3601}]},"
        "{\"id\":\"b\",\"owner\":\"o\",\"match\":{\"uid\":1000,\"unit\":\"b.service\"},\"grants\":["
        "{\"audience\":\"other\",\"scopes\":[\"x\"],\"max_ttl\":3600},"
        "{\"audience\":\"aud\",\"scopes\":[\"x\"],\"max_ttl\":60}]}"
        "]}";

static void test_lint_warnings(void **state)
{
        ab_policy *p = load_ok(lint_doc, true);
        ab_diag d;

        assert_int_equal(rec_count(AB_DIAG_ERROR), 0);
        /* wildcard scope */
        assert_finding(AB_DIAG_WARNING, "$.agents[0].grants[0].scopes[1]", "wildcard");
        assert_false(rec_has(AB_DIAG_WARNING, "$.agents[0].grants[0].scopes[0]", NULL));
        /* max_ttl over 1h: 3601 warns, 3600 does not */
        assert_finding(AB_DIAG_WARNING, "$.agents[0].grants[0]", "max_ttl");
        assert_false(rec_has(AB_DIAG_WARNING, "$.agents[1].grants[0]", "max_ttl"));
        /* no sha256/unit selector on a, b has a unit */
        assert_finding(AB_DIAG_WARNING, "$.agents[0].match", "sha256");
        assert_false(rec_has(AB_DIAG_WARNING, "$.agents[1].match", "sha256"));
        /* a and b overlap (same uid, b's unit does not exclude a) and share "aud" */
        assert_finding(AB_DIAG_WARNING, "$.agents[1].grants[1]", "\"a\"");
        assert_false(rec_has(AB_DIAG_WARNING, "$.agents[1].grants[0]", "overlap"));
        drop(p);

        /* lint off: the same document emits no warning at all */
        p = new_policy();
        assert_int_equal(add_doc(p, "test.json", lint_doc, false, &d), 0);
        assert_int_equal(d.warnings, 0);
        assert_int_equal(rec.n, 0);
        drop(p);

        /* and lint never makes a document fail */
        p = new_policy();
        assert_int_equal(add_doc(p, "test.json", lint_doc, true, &d), 0);
        assert_true(d.warnings >= 4);
        assert_int_equal(d.errors, 0);
        assert_int_equal(p->n_agents, 2);
        drop(p);
}

/* "users" outside a pam: audience: a warning (it limits only Introspect's user there). */
static void test_lint_users_outside_pam(void **state)
{
        static const char doc[] =
                "{\"version\": 1, \"agents\": [{\"id\": \"a\", \"owner\": \"o@example.com\", \"match\": {\"uid\": 0,"
                " \"unit\": \"a.service\"}, \"grants\": ["
                "{\"audience\": \"mcp://x\", \"scopes\": [\"r\"], \"users\": [\"bob\"]},"
                "{\"audience\": \"pam:sshd\", \"scopes\": [\"login\"], \"users\": [\"bob\"]}]}]}";
        ab_policy *p = load_ok(doc, true);

        (void)state;
        assert_finding(AB_DIAG_WARNING, "$.agents[0].grants[0].users", "pam:");
        assert_false(rec_has(AB_DIAG_WARNING, "$.agents[0].grants[1].users", NULL));
        drop(p);
}

static void test_lint_selectors(void **state)
{
        ab_policy *p;

        /* sha256 or unit silences the selector warning */
        p = load_ok(one_agent(fmt("{\"uid\":1,\"sha256\":\"%s\"}", SHA_A), "[]"), true);
        assert_false(rec_has_msg(AB_DIAG_WARNING, "sha256"));
        drop(p);
        p = load_ok(one_agent(J("{'uid':1,'unit':'u.service'}"), "[]"), true);
        assert_false(rec_has_msg(AB_DIAG_WARNING, "sha256"));
        drop(p);
        p = load_ok(one_agent(J("{'uid':1,'exe':'/bin/x'}"), "[]"), true);
        assert_finding(AB_DIAG_WARNING, "$.agents[0].match", "sha256");
        drop(p);
        /* no user selector at all */
        p = load_ok(one_agent(J("{'unit':'u.service'}"), "[]"), true);
        assert_finding(AB_DIAG_WARNING, "$.agents[0].match", "uid");
        drop(p);
        /* an unknown user is worth a warning */
        p = load_ok(one_agent(J("{'user':'no-such-user-ab-test','unit':'u.service'}"), "[]"), true);
        assert_finding(AB_DIAG_WARNING, "$.agents[0].match", "no-such-user-ab-test");
        drop(p);
        /* max_ttl exactly 1h: no warning */
        p = load_ok(one_agent(J("{'uid':1,'unit':'u'}"), J("[{'audience':'a','scopes':['s'],'max_ttl':'1h'}]")), true);
        assert_int_equal(rec_count(AB_DIAG_WARNING), 0);
        drop(p);
        p = load_ok(one_agent(J("{'uid':1,'unit':'u'}"), J("[{'audience':'a','scopes':['s'],'max_ttl':3601}]")), true);
        assert_int_equal(rec_count(AB_DIAG_WARNING), 1);
        assert_finding(AB_DIAG_WARNING, "$.agents[0].grants[0]", "max_ttl");
        drop(p);
}

/*
 * 100 agents with the same selectors and 64 grants each, all to one
 * audience (a 200 KB file): one warning per grant at most, the first 100
 * listed and the rest counted in one line. Before, one warning per pair of
 * grants: 20 million lines.
 */
static void test_lint_overlap_bounded(void **state)
{
        size_t cap = 1 << 20, off = 0;
        char *doc = malloc(cap);
        ab_policy *p;
        (void)state;

        assert_non_null(doc);
        off += (size_t)snprintf(doc + off, cap - off, "{\"version\":1,\"agents\":[");
        for (int a = 0; a < 100; a++) {
                off += (size_t)snprintf(doc + off, cap - off,
                                        "%s{\"id\":\"a%d\",\"owner\":\"o\",\"match\":{\"uid\":1,\"unit\":\"u\"},"
                                        "\"grants\":[",
                                        a ? "," : "", a);
                for (int g = 0; g < 64; g++)
                        off += (size_t)snprintf(doc + off, cap - off, "%s{\"audience\":\"x\",\"scopes\":[\"s%d\"]}",
                                                g ? "," : "", g);
                off += (size_t)snprintf(doc + off, cap - off, "]}");
        }
        off += (size_t)snprintf(doc + off, cap - off, "]}");
        assert_true(off < cap);
        p = load_ok(doc, true);
        assert_true(rec_count(AB_DIAG_WARNING) <= 110);
        assert_true(rec_has_msg(AB_DIAG_WARNING, "6236 more grants whose audience an agent with overlapping"));
        drop(p);
        free(doc);
}

static void test_lint_overlap(void **state)
{
        ab_policy *p;

        /* different uids never overlap */
        p = load_ok(J("{'version':1,'agents':["
                      "{'id':'a','owner':'o','match':{'uid':1,'unit':'u'},'grants':[{'audience':'x','scopes':['s']}]},"
                      "{'id':'b','owner':'o','match':{'uid':2,'unit':'u'},'grants':[{'audience':'x','scopes':['s']}]}"
                      "]}"),
                    true);
        assert_int_equal(rec_count(AB_DIAG_WARNING), 0);
        drop(p);
        /* same selectors, different audiences: no warning */
        p = load_ok(J("{'version':1,'agents':["
                      "{'id':'a','owner':'o','match':{'uid':1,'unit':'u'},'grants':[{'audience':'x','scopes':['s']}]},"
                      "{'id':'b','owner':'o','match':{'uid':1,'unit':'u'},'grants':[{'audience':'y','scopes':['s']}]}"
                      "]}"),
                    true);
        assert_int_equal(rec_count(AB_DIAG_WARNING), 0);
        drop(p);
        /* same selectors and audience */
        p = load_ok(J("{'version':1,'agents':["
                      "{'id':'a','owner':'o','match':{'uid':1,'unit':'u'},'grants':[{'audience':'x','scopes':['s']}]},"
                      "{'id':'b','owner':'o','match':{'uid':1,'unit':'u'},'grants':[{'audience':'x','scopes':['t']}]}"
                      "]}"),
                    true);
        assert_int_equal(rec_count(AB_DIAG_WARNING), 1);
        assert_finding(AB_DIAG_WARNING, "$.agents[1].grants[0]", "\"a\"");
        drop(p);
        /* across documents: the path is in the new document */
        p = new_policy();
        assert_int_equal(add_doc(p, "1.json", J("{'version':1,'agents':[{'id':'a','owner':'o','match':{'uid':1,"
                                                "'unit':'u'},'grants':[{'audience':'x','scopes':['s']}]}]}"),
                                 true, NULL),
                         0);
        assert_int_equal(add_doc(p, "2.json", J("{'version':1,'agents':[{'id':'b','owner':'o','match':{'unit':'u'},"
                                                "'grants':[{'audience':'y','scopes':['s']},{'audience':'x',"
                                                "'scopes':['s']}]}]}"),
                                 true, NULL),
                         0);
        assert_finding(AB_DIAG_WARNING, "$.agents[0].grants[1]", "\"a\"");
        assert_string_equal(rec.f[0].file, "2.json");
        drop(p);
}

int main(void)
{
#define T(f) cmocka_unit_test_setup_teardown(f, test_setup, test_teardown)
        const struct CMUnitTest tests[] = {
                T(test_parse_duration),
                T(test_document_durations),
                T(test_example_document),
                T(test_empty_policy),
                T(test_scope_groups),
                T(test_required_members),
                T(test_unknown_keys),
                T(test_wrong_types),
                T(test_string_limits),
                T(test_empty_match),
                T(test_invalid_scopes),
                T(test_count_limits),
                T(test_agent_limit),
                T(test_duplicate_agent_ids),
                T(test_document_size),
                T(test_deep_nesting),
                T(test_invalid_json),
                T(test_duplicate_json_keys_everywhere),
                T(test_failed_document_changes_nothing),
                T(test_load_path),
                T(test_load_path_empty_dir),
                T(test_load_path_file_size),
                T(test_load_path_file_count),
                T(test_load_path_not_regular),
                T(test_huge_arrays),
                T(test_hostile_messages),
                T(test_load_path_ten_megabytes),
                T(test_source_name_not_utf8),
                T(test_compile_hostile_sources),
                T(test_compile_signatures_and_rollback),
                T(test_match_every_selector),
                T(test_match_first_wins),
                T(test_match_unresolved_user),
                T(test_match_named_user_and_broker),
                T(test_decide_granted),
                T(test_decide_ttl),
                T(test_decide_audience),
                T(test_decide_scope),
                T(test_decide_scope_reason),
                T(test_decide_wildcard),
                T(test_decide_reason_truncated),
                T(test_lint_warnings),
                T(test_lint_users_outside_pam),
                T(test_lint_selectors),
                T(test_lint_overlap),
                T(test_lint_overlap_bounded),
        };
#undef T
        return cmocka_run_group_tests_name("policy", tests, NULL, group_teardown);
}
