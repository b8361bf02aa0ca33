/* SPDX-License-Identifier: MIT */
/* Unit tests for common/varlink.c: parsing and encoding varlink messages. */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "../../common/util.h"
#include "../../common/varlink.h"

static int parse(const char *msg, ab_vl_call *c, char *reason, size_t reasonmax)
{
        return ab_vl_parse_call(msg, strlen(msg), c, reason, reasonmax);
}

/* Parse msg, expect a protocol error with a non-empty reason and *ret untouched. */
static void expect_bad_call_n(const char *msg, size_t len)
{
        ab_vl_call c = { .method = "sentinel" };
        char reason[256] = "";

        assert_int_equal(ab_vl_parse_call(msg, len, &c, reason, sizeof reason), AB_ERR_PROTOCOL);
        assert_true(strlen(reason) > 0);
        assert_null(c.root);
        assert_string_equal(c.method, "sentinel");
        /* and also without a reason buffer */
        assert_int_equal(ab_vl_parse_call(msg, len, &c, NULL, 0), AB_ERR_PROTOCOL);
        assert_null(c.root);
}

static void expect_bad_call(const char *msg)
{
        expect_bad_call_n(msg, strlen(msg));
}

static void test_call_without_parameters(void **state)
{
        ab_vl_call c;
        char reason[64] = "";

        assert_int_equal(parse("{\"method\":\"org.varlink.service.GetInfo\"}", &c, reason, sizeof reason), 0);
        assert_string_equal(c.method, "org.varlink.service.GetInfo");
        assert_non_null(c.parameters);
        assert_true(json_is_object(c.parameters));
        assert_int_equal(json_object_size(c.parameters), 0);
        assert_false(c.oneway);
        assert_false(c.more);
        assert_false(c.upgrade);
        ab_vl_call_done(&c);
        assert_null(c.root);
        ab_vl_call_done(&c); /* twice is fine */
}

static void test_call_with_parameters(void **state)
{
        static const char msg[] =
                "{\"method\":\"io.agentbroker.IssueToken\",\"parameters\":{\"audience\":\"mcp://git\","
                "\"scopes\":[\"repo:read\",\"repo:write\"],\"ttl\":300,\"nested\":{\"a\":[1,2,{\"b\":null}]}}}";
        ab_vl_call c;

        assert_int_equal(parse(msg, &c, NULL, 0), 0);
        assert_string_equal(c.method, "io.agentbroker.IssueToken");
        assert_string_equal(json_string_value(json_object_get(c.parameters, "audience")), "mcp://git");
        assert_int_equal(json_array_size(json_object_get(c.parameters, "scopes")), 2);
        assert_int_equal(json_integer_value(json_object_get(c.parameters, "ttl")), 300);
        ab_vl_call_done(&c);

        /* empty parameters object, whitespace around tokens */
        assert_int_equal(parse(" \n{ \"parameters\" : { } , \"method\" : \"a.b.C\" }\n ", &c, NULL, 0), 0);
        assert_string_equal(c.method, "a.b.C");
        assert_int_equal(json_object_size(c.parameters), 0);
        ab_vl_call_done(&c);
}

static void test_call_flags(void **state)
{
        ab_vl_call c;

        assert_int_equal(parse("{\"method\":\"a.b.C\",\"oneway\":true}", &c, NULL, 0), 0);
        assert_true(c.oneway);
        assert_false(c.more);
        assert_false(c.upgrade);
        ab_vl_call_done(&c);

        assert_int_equal(parse("{\"method\":\"a.b.C\",\"more\":true,\"oneway\":false}", &c, NULL, 0), 0);
        assert_false(c.oneway);
        assert_true(c.more);
        ab_vl_call_done(&c);

        assert_int_equal(parse("{\"method\":\"a.b.C\",\"upgrade\":true,\"more\":false}", &c, NULL, 0), 0);
        assert_true(c.upgrade);
        assert_false(c.more);
        ab_vl_call_done(&c);

        assert_int_equal(parse("{\"method\":\"a.b.C\",\"oneway\":true,\"more\":true,\"upgrade\":true}", &c, NULL, 0),
                         0);
        assert_true(c.oneway && c.more && c.upgrade);
        ab_vl_call_done(&c);
}

static void test_rejects_non_boolean_flags(void **state)
{
        expect_bad_call("{\"method\":\"a.b.C\",\"oneway\":1}");
        expect_bad_call("{\"method\":\"a.b.C\",\"oneway\":\"true\"}");
        expect_bad_call("{\"method\":\"a.b.C\",\"more\":null}");
        expect_bad_call("{\"method\":\"a.b.C\",\"more\":0}");
        expect_bad_call("{\"method\":\"a.b.C\",\"upgrade\":[]}");
        expect_bad_call("{\"method\":\"a.b.C\",\"upgrade\":{}}");
}

static void test_rejects_invalid_json(void **state)
{
        expect_bad_call("");
        expect_bad_call(" ");
        expect_bad_call("{");
        expect_bad_call("{\"method\":\"a.b.C\"");
        expect_bad_call("{\"method\":\"a.b.C\",}");
        expect_bad_call("{method:\"a.b.C\"}");
        expect_bad_call("{'method':'a.b.C'}");
        expect_bad_call("{\"method\":\"a.b.C\" \"parameters\":{}}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"x\":01}}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"x\":NaN}}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"x\":\"\\x41\"}}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"x\":\"\xff\xfe\"}}"); /* invalid UTF-8 */
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"x\":\"\xc0\xaf\"}}"); /* overlong */
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"x\":\"\\ud800\"}}"); /* lone surrogate */
}

static void test_rejects_trailing_garbage(void **state)
{
        expect_bad_call("{\"method\":\"a.b.C\"}x");
        expect_bad_call("{\"method\":\"a.b.C\"}{}");
        expect_bad_call("{\"method\":\"a.b.C\"}{\"method\":\"a.b.D\"}");
        expect_bad_call("{\"method\":\"a.b.C\"} 1");
        /* the NUL terminator is not part of the message */
        expect_bad_call_n("{\"method\":\"a.b.C\"}\0", 19);
        expect_bad_call_n("{\"method\":\"a.b.C\"}\0{}", 21);
}

static void test_rejects_duplicate_keys(void **state)
{
        expect_bad_call("{\"method\":\"a.b.C\",\"method\":\"a.b.D\"}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{},\"parameters\":{}}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"x\":1,\"x\":2}}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"o\":{\"y\":1,\"y\":1}}}");
        expect_bad_call("{\"method\":\"a.b.C\",\"oneway\":true,\"oneway\":false}");
}

static void test_rejects_nul_in_strings(void **state)
{
        expect_bad_call("{\"method\":\"a.b.C\\u0000\"}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"x\":\"a\\u0000b\"}}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"a\\u0000b\":1}}");
        /* a raw NUL byte inside the buffer */
        expect_bad_call_n("{\"method\":\"a.b.C\",\"parameters\":{\"x\":\"a\0b\"}}", 41);
}

static void test_rejects_non_object(void **state)
{
        expect_bad_call("[]");
        expect_bad_call("[{\"method\":\"a.b.C\"}]");
        expect_bad_call("\"a.b.C\"");
        expect_bad_call("42");
        expect_bad_call("null");
        expect_bad_call("true");
}

static void test_rejects_bad_method(void **state)
{
        char msg[600];

        expect_bad_call("{}");
        expect_bad_call("{\"parameters\":{}}");
        expect_bad_call("{\"method\":null}");
        expect_bad_call("{\"method\":42}");
        expect_bad_call("{\"method\":[\"a.b.C\"]}");
        expect_bad_call("{\"method\":{\"name\":\"a.b.C\"}}");
        expect_bad_call("{\"method\":true}");
        expect_bad_call("{\"method\":\"\"}");
        expect_bad_call("{\"method\":\"GetInfo\"}");
        expect_bad_call("{\"method\":\"org.varlink.service.getInfo\"}");
        expect_bad_call("{\"method\":\"org.varlink.service.\"}");
        expect_bad_call("{\"method\":\".GetInfo\"}");
        expect_bad_call("{\"method\":\"org.varlink.service.Get_Info\"}");
        expect_bad_call("{\"method\":\"org varlink.service.GetInfo\"}");
        expect_bad_call("{\"method\":\"org.varlink.service.GetInfo \"}");

        /* AB_VL_MAX_METHOD bytes accepted, one more rejected */
        {
                char name[AB_VL_MAX_METHOD + 2];
                ab_vl_call c;

                memset(name, 'b', sizeof name);
                name[0] = 'a';
                name[1] = '.';
                name[AB_VL_MAX_METHOD - 2] = '.';
                name[AB_VL_MAX_METHOD - 1] = 'M';
                name[AB_VL_MAX_METHOD] = '\0'; /* exactly 256 */
                assert_int_equal(strlen(name), AB_VL_MAX_METHOD);
                snprintf(msg, sizeof msg, "{\"method\":\"%s\"}", name);
                assert_int_equal(parse(msg, &c, NULL, 0), 0);
                assert_string_equal(c.method, name);
                ab_vl_call_done(&c);

                name[AB_VL_MAX_METHOD - 2] = 'b';
                name[AB_VL_MAX_METHOD - 1] = '.';
                name[AB_VL_MAX_METHOD] = 'M';
                name[AB_VL_MAX_METHOD + 1] = '\0'; /* 257 */
                assert_int_equal(strlen(name), AB_VL_MAX_METHOD + 1);
                snprintf(msg, sizeof msg, "{\"method\":\"%s\"}", name);
                expect_bad_call(msg);
        }
}

static void test_rejects_parameters_not_object(void **state)
{
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":[]}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":null}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":\"{}\"}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":1}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":false}");
}

static char *nested(size_t depth)
{
        static const char head[] = "{\"method\":\"a.b.C\",\"parameters\":{\"x\":";
        size_t n = strlen(head) + 2 * depth + 3;
        char *m = malloc(n);
        char *p = m;

        assert_non_null(m);
        memcpy(p, head, strlen(head));
        p += strlen(head);
        memset(p, '[', depth);
        p += depth;
        memset(p, ']', depth);
        p += depth;
        memcpy(p, "}}", 3);
        return m;
}

static void test_rejects_deep_nesting(void **state)
{
        char *m = nested(10000);
        char *o;

        expect_bad_call(m);
        free(m);

        m = nested(100000);
        expect_bad_call(m);
        free(m);

        /* deep objects too, and unbalanced */
        o = malloc(10000 * 6 + 1);
        assert_non_null(o);
        for (size_t i = 0; i < 10000; i++)
                memcpy(o + i * 6, "{\"a\": ", 6);
        o[10000 * 6] = '\0';
        expect_bad_call(o);
        free(o);

        /* a modest depth is fine */
        {
                ab_vl_call c;
                m = nested(100);
                assert_int_equal(parse(m, &c, NULL, 0), 0);
                ab_vl_call_done(&c);
                free(m);
        }
}

static void test_rejects_numbers_out_of_range(void **state)
{
        ab_vl_call c;

        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"n\":99999999999999999999}}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"n\":-99999999999999999999}}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"n\":9223372036854775808}}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"n\":1e400}}");
        expect_bad_call("{\"method\":\"a.b.C\",\"parameters\":{\"n\":-1e400}}");
        /* the limits themselves */
        assert_int_equal(parse("{\"method\":\"a.b.C\",\"parameters\":{\"n\":9223372036854775807}}", &c, NULL, 0), 0);
        assert_true(json_integer_value(json_object_get(c.parameters, "n")) == INT64_MAX);
        ab_vl_call_done(&c);
        assert_int_equal(parse("{\"method\":\"a.b.C\",\"parameters\":{\"n\":-9223372036854775808}}", &c, NULL, 0), 0);
        assert_true(json_integer_value(json_object_get(c.parameters, "n")) == INT64_MIN);
        ab_vl_call_done(&c);
        assert_int_equal(parse("{\"method\":\"a.b.C\",\"parameters\":{\"n\":1e300}}", &c, NULL, 0), 0);
        ab_vl_call_done(&c);
}

static void test_reason_truncated(void **state)
{
        ab_vl_call c;
        char reason[8];

        memset(reason, 'Z', sizeof reason);
        assert_int_equal(ab_vl_parse_call("[]", 2, &c, reason, 4), AB_ERR_PROTOCOL);
        assert_int_equal(strlen(reason), 3);
        assert_int_equal(reason[4], 'Z'); /* nothing written past reasonmax */
        memset(reason, 'Z', sizeof reason);
        assert_int_equal(ab_vl_parse_call("{", 1, &c, reason, 1), AB_ERR_PROTOCOL);
        assert_int_equal(reason[0], '\0');
        assert_int_equal(reason[1], 'Z');
        assert_int_equal(ab_vl_parse_call("{", 1, &c, reason, 0), AB_ERR_PROTOCOL);
}

static void test_qualified_names(void **state)
{
        static const char *const good[] = {
                "org.varlink.service.GetInfo",
                "io.agentbroker.IssueToken",
                "io.agentbroker.admin.Revoke",
                "io.systemd.UserDatabase.GetUserRecord",
                "com.example-corp.v2.Method1",
                "a.b.C",
                "org.varlink.service.InterfaceNotFound",
        };
        static const char *const bad[] = {
                "",
                "GetInfo",
                ".GetInfo",
                "org.varlink.service.",
                "org.varlink.service.getInfo",
                "org.varlink.service.1GetInfo",
                "org.varlink.service.Get-Info",
                "org.varlink.service.Get.",
                "org/varlink.service.GetInfo",
                "org.varlink.service.GetInfo\n",
                "org.varlink.service.GetÏnfo",
                "org.varlink.sérvice.GetInfo",
                "org.varlink service.GetInfo",
                "org.varlink.service.Get Info",
        };

        for (size_t i = 0; i < AB_ARRAY_SIZE(good); i++) {
                if (!ab_vl_valid_qualified_name(good[i]))
                        fail_msg("\"%s\" should be valid", good[i]);
        }
        for (size_t i = 0; i < AB_ARRAY_SIZE(bad); i++) {
                if (ab_vl_valid_qualified_name(bad[i]))
                        fail_msg("\"%s\" should be invalid", bad[i]);
        }
}

/*
 * Interface names are dot-separated non-empty labels that start with a
 * letter and have dashes only inside (varlink IDL; systemd's
 * varlink_idl_interface_name_is_valid).
 */
static void test_qualified_names_interface_labels(void **state)
{
        static const char *const bad[] = {
                "..GetInfo",          /* empty interface */
                ".org.varlink.GetInfo", /* leading dot */
                "org..varlink.GetInfo", /* empty label */
                "org.varlink..GetInfo", /* interface ends in a dot */
                "-org.varlink.GetInfo", /* leading dash */
                "org-.varlink.GetInfo", /* label ends in a dash */
                "org.-varlink.GetInfo", /* label starts with a dash */
                "1org.varlink.GetInfo", /* starts with a digit */
        };

        unsigned wrong = 0;

        for (size_t i = 0; i < AB_ARRAY_SIZE(bad); i++) {
                if (ab_vl_valid_qualified_name(bad[i])) {
                        print_error("\"%s\" is accepted but is not a valid varlink name\n", bad[i]);
                        wrong++;
                }
        }
        assert_int_equal(wrong, 0);
}

static void test_qualified_name_length_limit(void **state)
{
        char name[AB_VL_MAX_METHOD + 2];

        /* "a" + "b"*(max-5) + ".Mcc" = max bytes */
        memset(name, 'b', sizeof name);
        name[0] = 'a';
        memcpy(name + AB_VL_MAX_METHOD - 4, ".Mcc", 4);
        name[AB_VL_MAX_METHOD] = '\0';
        name[1] = '.';
        assert_int_equal(strlen(name), AB_VL_MAX_METHOD);
        assert_true(ab_vl_valid_qualified_name(name));
        name[AB_VL_MAX_METHOD] = 'c';
        name[AB_VL_MAX_METHOD + 1] = '\0';
        assert_int_equal(strlen(name), AB_VL_MAX_METHOD + 1);
        assert_false(ab_vl_valid_qualified_name(name));
}

/* *ret_len counts the one NUL at the end; the text before it has none. */
static void check_encoded(const char *msg, size_t len)
{
        assert_non_null(msg);
        assert_true(len >= 3);
        assert_int_equal(msg[len - 1], '\0');
        assert_int_equal(strlen(msg), len - 1);
        assert_ptr_equal(memchr(msg, '\0', len), msg + len - 1);
        assert_int_not_equal(msg[len - 2], '\0');
}

static void test_encode_call_round_trip(void **state)
{
        json_t *params = json_pack("{s:s, s:[s,s], s:i, s:b, s:n, s:s}", "audience", "mcp://git", "scopes",
                                   "repo:read", "repo:write", "ttl", 300, "flag", 1, "nothing", "text",
                                   "quote \" backslash \\ tab \t unicode \xc3\xa9 \xf0\x9f\x94\x91");
        char *msg = NULL;
        size_t len = 0;
        ab_vl_call c;

        assert_non_null(params);
        assert_int_equal(ab_vl_encode_call("io.agentbroker.IssueToken", json_incref(params), &msg, &len), 0);
        check_encoded(msg, len);
        assert_int_equal(ab_vl_parse_call(msg, len - 1, &c, NULL, 0), 0);
        assert_string_equal(c.method, "io.agentbroker.IssueToken");
        assert_true(json_equal(c.parameters, params));
        assert_false(c.oneway || c.more || c.upgrade);
        ab_vl_call_done(&c);
        free(msg);
        json_decref(params);

        /* NULL parameters: {} */
        assert_int_equal(ab_vl_encode_call("org.varlink.service.GetInfo", NULL, &msg, &len), 0);
        check_encoded(msg, len);
        assert_int_equal(ab_vl_parse_call(msg, len - 1, &c, NULL, 0), 0);
        assert_int_equal(json_object_size(c.parameters), 0);
        ab_vl_call_done(&c);
        free(msg);
}

static void test_encode_reply_round_trip(void **state)
{
        json_t *params = json_pack("{s:s, s:i}", "token", "a.b.c", "expires_in", 300);
        json_t *got = NULL;
        char *err = (char *)"sentinel";
        char *msg = NULL;
        size_t len = 0;

        assert_non_null(params);
        assert_int_equal(ab_vl_encode_reply(json_incref(params), NULL, &msg, &len), 0);
        check_encoded(msg, len);
        assert_null(strstr(msg, "\"error\""));
        assert_int_equal(ab_vl_parse_reply(msg, len - 1, &got, &err), 0);
        assert_null(err);
        assert_true(json_equal(got, params));
        json_decref(got);
        free(msg);
        json_decref(params);

        /* an error reply */
        params = json_pack("{s:s}", "reason", "scope \"x\" not granted");
        assert_int_equal(ab_vl_encode_reply(json_incref(params), "io.agentbroker.ScopeNotGranted", &msg, &len), 0);
        check_encoded(msg, len);
        assert_int_equal(ab_vl_parse_reply(msg, len - 1, &got, &err), 0);
        assert_string_equal(err, "io.agentbroker.ScopeNotGranted");
        assert_true(json_equal(got, params));
        free(err);
        json_decref(got);
        free(msg);
        json_decref(params);

        /* NULL parameters: an empty object */
        assert_int_equal(ab_vl_encode_reply(NULL, "org.varlink.service.MethodNotFound", &msg, &len), 0);
        check_encoded(msg, len);
        assert_int_equal(ab_vl_parse_reply(msg, len - 1, &got, &err), 0);
        assert_string_equal(err, "org.varlink.service.MethodNotFound");
        assert_true(json_is_object(got));
        assert_int_equal(json_object_size(got), 0);
        free(err);
        json_decref(got);
        free(msg);
}

/* encode steals the reference: a fresh object handed over is freed with the message (LeakSanitizer). */
static void test_encode_steals_reference(void **state)
{
        char *msg = NULL;
        size_t len = 0;

        assert_int_equal(ab_vl_encode_reply(json_pack("{s:[i,i,i]}", "a", 1, 2, 3), NULL, &msg, &len), 0);
        free(msg);
        assert_int_equal(ab_vl_encode_call("a.b.C", json_pack("{s:{s:s}}", "o", "k", "v"), &msg, &len), 0);
        free(msg);
}

static void test_parse_reply(void **state)
{
        json_t *p = NULL;
        char *e = NULL;

        assert_int_equal(ab_vl_parse_reply("{}", 2, &p, &e), 0);
        assert_true(json_is_object(p));
        assert_null(e);
        json_decref(p);

        assert_int_equal(ab_vl_parse_reply("{\"parameters\":{\"x\":1},\"continues\":true}", 39, &p, &e), 0);
        assert_int_equal(json_integer_value(json_object_get(p, "x")), 1);
        json_decref(p);
}

static void expect_bad_reply(const char *msg)
{
        json_t *p = (json_t *)0x1;
        char *e = (char *)0x1;

        assert_int_equal(ab_vl_parse_reply(msg, strlen(msg), &p, &e), AB_ERR_PROTOCOL);
        assert_ptr_equal(p, (json_t *)0x1);
        assert_ptr_equal(e, (char *)0x1);
}

static void test_parse_reply_rejects(void **state)
{
        expect_bad_reply("");
        expect_bad_reply("[]");
        expect_bad_reply("null");
        expect_bad_reply("{\"parameters\":[]}");
        expect_bad_reply("{\"parameters\":null}");
        expect_bad_reply("{\"parameters\":{}}x");
        expect_bad_reply("{\"parameters\":{},\"parameters\":{}}");
        expect_bad_reply("{\"parameters\":{\"a\":\"\\u0000\"}}");
        expect_bad_reply("{\"error\":42}");
        expect_bad_reply("{\"error\":null}");
        expect_bad_reply("{\"error\":\"\"}");
        expect_bad_reply("{\"error\":\"NotQualified\"}");
        expect_bad_reply("{\"error\":\"io.agentbroker.bad name\"}");
        expect_bad_reply("{\"error\":\"io.agentbroker.X\",\"error\":\"io.agentbroker.Y\"}");
        expect_bad_reply("{\"parameters\":{\"n\":1e999}}");
        {
                size_t depth = 10000;
                char *m = malloc(depth * 2 + 32);
                assert_non_null(m);
                strcpy(m, "{\"parameters\":{\"x\":");
                memset(m + strlen(m), '[', depth);
                m[19 + depth] = '\0';
                memset(m + strlen(m), ']', depth);
                m[19 + 2 * depth] = '\0';
                strcat(m, "}}");
                expect_bad_reply(m);
                free(m);
        }
}

/* ab_json_dumps/ab_json_dumpb write the very bytes json_dumps(JSON_COMPACT) does. */
static void expect_same_dump(const json_t *v)
{
        char *want = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY), *got;
        size_t n = 0, wl;
        char small[64];

        assert_non_null(want);
        wl = strlen(want);
        got = ab_json_dumps(v, &n);
        assert_non_null(got);
        if (strcmp(want, got) != 0)
                fprintf(stderr, "jansson: %s\nours:    %s\n", want, got);
        assert_string_equal(got, want);
        assert_int_equal(n, wl);
        free(got);
        /* fixed buffers: the full length is reported, a prefix is kept */
        for (size_t max = 0; max <= sizeof small; max += (max < 8 ? 1 : 13)) {
                memset(small, 'X', sizeof small);
                assert_int_equal(ab_json_dumpb(v, small, max), wl);
                size_t keep = wl < max ? wl : max;
                assert_memory_equal(small, want, keep);
                if (max < sizeof small && keep < max)
                        assert_int_equal(small[keep], 'X'); /* nothing written past the text */
        }
        free(want);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void)
{
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        return rng_state;
}

static json_t *random_value(int depth)
{
        static const char *const pieces[] = { "a", "\"", "\\", "/", "\n", "\t", "\r", "\b", "\f", "\x01",
                                              "\x1f", "\x7f", "\xc3\xa9", "\xe2\x80\xa8", "\xf0\x9f\x98\x80",
                                              " ", "eyJhbGciOi", "<>&'" };
        switch (rng() % (depth > 4 ? 5 : 7)) {
        case 0: {
                char buf[256] = "";
                size_t n = rng() % 12;
                for (size_t i = 0; i < n; i++)
                        strcat(buf, pieces[rng() % (sizeof pieces / sizeof pieces[0])]);
                return json_string(buf);
        }
        case 1:
                return json_integer((json_int_t)rng());
        case 2:
                return rng() % 2 ? json_true() : json_false();
        case 3:
                return json_null();
        case 4:
                return json_integer((json_int_t)(rng() % 1000) - 500);
        case 5: {
                json_t *a = json_array();
                size_t n = rng() % 5;
                for (size_t i = 0; i < n; i++)
                        json_array_append_new(a, random_value(depth + 1));
                return a;
        }
        default: {
                json_t *o = json_object();
                size_t n = rng() % 5;
                for (size_t i = 0; i < n; i++) {
                        char key[32];
                        snprintf(key, sizeof key, "%s%u", pieces[rng() % (sizeof pieces / sizeof pieces[0])],
                                 (unsigned)(rng() % 100));
                        json_object_set_new(o, key, random_value(depth + 1));
                }
                return o;
        }
        }
}

static void test_json_dump_matches_jansson(void **state)
{
        char all[128];
        json_t *v;

        (void)state;
        for (int i = 1; i < 128; i++)
                all[i - 1] = (char)i;
        all[127] = '\0';
        v = json_pack("{s:s, s:s, s:I, s:I, s:b, s:n, s:{}, s:[], s:[i,s,{s:o}], s:f}", "all", all, "", "",
                      "min", (json_int_t)INT64_MIN, "max", (json_int_t)INT64_MAX, "t", 1, "null", "obj", "arr",
                      "nest", 1, "two", "k", json_string("\xe2\x80\xa8 \xf0\x9f\x98\x80"), "real", 0.1);
        assert_non_null(v);
        expect_same_dump(v);
        json_decref(v);
        v = json_string("");
        expect_same_dump(v);
        json_decref(v);
        for (int i = 0; i < 3000; i++) {
                v = random_value(0);
                expect_same_dump(v);
                json_decref(v);
        }
        /* what the broker dumps most: a token reply */
        v = json_pack("{s:{s:s, s:s, s:i}}", "parameters", "token",
                      "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", "token_type", "Bearer", "expires_in", 300);
        expect_same_dump(v);
        json_decref(v);
        assert_null(ab_json_dumps(NULL, NULL));
        assert_int_equal(ab_json_dumpb(NULL, all, sizeof all), 0);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_call_without_parameters),
                cmocka_unit_test(test_json_dump_matches_jansson),
                cmocka_unit_test(test_call_with_parameters),
                cmocka_unit_test(test_call_flags),
                cmocka_unit_test(test_rejects_non_boolean_flags),
                cmocka_unit_test(test_rejects_invalid_json),
                cmocka_unit_test(test_rejects_trailing_garbage),
                cmocka_unit_test(test_rejects_duplicate_keys),
                cmocka_unit_test(test_rejects_nul_in_strings),
                cmocka_unit_test(test_rejects_non_object),
                cmocka_unit_test(test_rejects_bad_method),
                cmocka_unit_test(test_rejects_parameters_not_object),
                cmocka_unit_test(test_rejects_deep_nesting),
                cmocka_unit_test(test_rejects_numbers_out_of_range),
                cmocka_unit_test(test_reason_truncated),
                cmocka_unit_test(test_qualified_names),
                cmocka_unit_test(test_qualified_names_interface_labels),
                cmocka_unit_test(test_qualified_name_length_limit),
                cmocka_unit_test(test_encode_call_round_trip),
                cmocka_unit_test(test_encode_reply_round_trip),
                cmocka_unit_test(test_encode_steals_reference),
                cmocka_unit_test(test_parse_reply),
                cmocka_unit_test(test_parse_reply_rejects),
        };
        return cmocka_run_group_tests_name("varlink", tests, NULL, NULL);
}
