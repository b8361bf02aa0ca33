/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "util.h"
#include "varlink.h"

#define LOAD_FLAGS (JSON_REJECT_DUPLICATES)

static void set_reason(char *reason, size_t max, const char *s)
{
        if (reason && max > 0)
                snprintf(reason, max, "%s", s);
}

bool ab_vl_valid_qualified_name(const char *name)
{
        /* interface: dot-separated labels, each starting with a letter,
         * [A-Za-z0-9-] inside, no leading/trailing/double '-' or '.';
         * member: [A-Z][A-Za-z0-9]* */
        const char *dot = strrchr(name, '.');
        size_t n = strlen(name);
        bool label_start = true;

        if (n == 0 || n > AB_VL_MAX_METHOD || !dot || dot == name)
                return false;
        for (const char *p = name; p < dot; p++) {
                char c = *p;
                bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
                if (label_start) {
                        if (!alpha)
                                return false;
                        label_start = false;
                        continue;
                }
                if (c == '.') {
                        if (p[-1] == '-')
                                return false;
                        label_start = true;
                } else if (c == '-') {
                        if (p[-1] == '-' || p + 1 == dot)
                                return false;
                } else if (!alpha && !(c >= '0' && c <= '9')) {
                        return false;
                }
        }
        if (label_start || !(dot[1] >= 'A' && dot[1] <= 'Z'))
                return false;
        for (const char *p = dot + 1; *p; p++) {
                char c = *p;
                if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')))
                        return false;
        }
        return true;
}

static int get_flag(json_t *root, const char *key, bool *ret)
{
        json_t *v = json_object_get(root, key);
        if (!v) {
                *ret = false;
                return 0;
        }
        if (!json_is_boolean(v))
                return -1;
        *ret = json_is_true(v);
        return 0;
}

int ab_vl_parse_call(const char *msg, size_t len, ab_vl_call *ret, char *reason, size_t reasonmax)
{
        json_error_t jerr;
        json_t *root, *m, *p;
        ab_vl_call c = { 0 };

        root = json_loadb(msg, len, LOAD_FLAGS, &jerr);
        if (!root) {
                char buf[200];
                snprintf(buf, sizeof buf, "invalid JSON at byte %d: %s", jerr.position, jerr.text);
                set_reason(reason, reasonmax, buf);
                return AB_ERR_PROTOCOL;
        }
        if (!json_is_object(root)) {
                set_reason(reason, reasonmax, "message is not a JSON object");
                goto fail;
        }
        m = json_object_get(root, "method");
        if (!json_is_string(m) || !ab_vl_valid_qualified_name(json_string_value(m))) {
                set_reason(reason, reasonmax, "\"method\" missing or not a qualified varlink name");
                goto fail;
        }
        p = json_object_get(root, "parameters");
        if (p && !json_is_object(p)) {
                set_reason(reason, reasonmax, "\"parameters\" is not an object");
                goto fail;
        }
        if (!p) {
                p = json_object();
                if (!p || json_object_set_new(root, "parameters", p) < 0)
                        goto fail;
        }
        if (get_flag(root, "oneway", &c.oneway) < 0 || get_flag(root, "more", &c.more) < 0 ||
            get_flag(root, "upgrade", &c.upgrade) < 0) {
                set_reason(reason, reasonmax, "\"oneway\", \"more\" and \"upgrade\" must be booleans");
                goto fail;
        }
        c.root = root;
        c.method = json_string_value(m);
        c.parameters = p;
        *ret = c;
        return 0;
fail:
        json_decref(root);
        return AB_ERR_PROTOCOL;
}

void ab_vl_call_done(ab_vl_call *c)
{
        json_decref(c->root);
        *c = (ab_vl_call){ 0 };
}

int ab_vl_parse_reply(const char *msg, size_t len, json_t **ret_params, char **ret_error)
{
        json_t *root, *p, *e;
        char *err = NULL;

        root = json_loadb(msg, len, LOAD_FLAGS, NULL);
        if (!json_is_object(root))
                goto fail;
        p = json_object_get(root, "parameters");
        if (p && !json_is_object(p))
                goto fail;
        e = json_object_get(root, "error");
        if (e) {
                if (!json_is_string(e) || !ab_vl_valid_qualified_name(json_string_value(e)))
                        goto fail;
                err = strdup(json_string_value(e));
                if (!err)
                        goto fail;
        }
        *ret_params = p ? json_incref(p) : json_object();
        if (!*ret_params) {
                free(err);
                goto fail;
        }
        *ret_error = err;
        json_decref(root);
        return 0;
fail:
        json_decref(root);
        return AB_ERR_PROTOCOL;
}

/* ---- compact JSON writer -------------------------------------------------- */

typedef struct jw {
        char *buf;
        size_t len, cap;
        bool grow; /* malloc'd and growing; else fixed, counting past cap */
        bool fail;
} jw;

static void jw_put(jw *w, const char *p, size_t n)
{
        if (w->fail || n == 0)
                return;
        if (!w->grow) { /* fixed: keep what fits, count it all */
                if (w->len < w->cap)
                        memcpy(w->buf + w->len, p, n < w->cap - w->len ? n : w->cap - w->len);
                w->len += n;
                return;
        }
        if (n >= w->cap - w->len) {
                size_t ncap = w->cap ? w->cap : 256;
                char *nb;
                while (ncap - w->len <= n) {
                        if (ncap > SIZE_MAX / 2) {
                                w->fail = true;
                                return;
                        }
                        ncap *= 2;
                }
                nb = realloc(w->buf, ncap);
                if (!nb) {
                        w->fail = true;
                        return;
                }
                w->buf = nb;
                w->cap = ncap;
        }
        memcpy(w->buf + w->len, p, n);
        w->len += n;
}

static void jw_string(jw *w, const char *s, size_t n)
{
        static const char hex[] = "0123456789ABCDEF"; /* as jansson: \u001F */
        size_t run = 0;

        jw_put(w, "\"", 1);
        for (size_t i = 0; i < n; i++) {
                unsigned char ch = (unsigned char)s[i];
                char esc[6] = { '\\', 0 };
                size_t k = 2;

                if (ch >= 0x20 && ch != '"' && ch != '\\')
                        continue;
                jw_put(w, s + run, i - run);
                run = i + 1;
                switch (ch) { /* as jansson writes them */
                case '"': esc[1] = '"'; break;
                case '\\': esc[1] = '\\'; break;
                case '\b': esc[1] = 'b'; break;
                case '\f': esc[1] = 'f'; break;
                case '\n': esc[1] = 'n'; break;
                case '\r': esc[1] = 'r'; break;
                case '\t': esc[1] = 't'; break;
                default:
                        esc[1] = 'u';
                        jw_put(w, esc, 2);
                        esc[0] = '0';
                        esc[1] = '0';
                        esc[2] = hex[ch >> 4];
                        esc[3] = hex[ch & 15];
                        k = 4;
                }
                jw_put(w, esc, k);
        }
        jw_put(w, s + run, n - run);
        jw_put(w, "\"", 1);
}

static void jw_value(jw *w, const json_t *v, unsigned depth)
{
        char num[64];
        int n;

        if (depth > 2048) { /* jansson's own parser stops at 2048 */
                w->fail = true;
                return;
        }
        switch (json_typeof(v)) {
        case JSON_OBJECT: {
                const char *key;
                json_t *m;
                bool first = true;
                jw_put(w, "{", 1);
                json_object_foreach((json_t *)v, key, m) {
                        if (!first)
                                jw_put(w, ",", 1);
                        first = false;
                        jw_string(w, key, strlen(key));
                        jw_put(w, ":", 1);
                        jw_value(w, m, depth + 1);
                }
                jw_put(w, "}", 1);
                break;
        }
        case JSON_ARRAY:
                jw_put(w, "[", 1);
                for (size_t i = 0; i < json_array_size(v); i++) {
                        if (i)
                                jw_put(w, ",", 1);
                        jw_value(w, json_array_get(v, i), depth + 1);
                }
                jw_put(w, "]", 1);
                break;
        case JSON_STRING:
                jw_string(w, json_string_value(v), json_string_length(v));
                break;
        case JSON_INTEGER:
                n = snprintf(num, sizeof num, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
                jw_put(w, num, (size_t)n);
                break;
        case JSON_REAL: /* not on any hot path: jansson's own formatting */
                n = (int)json_dumpb(v, num, sizeof num, JSON_COMPACT | JSON_ENCODE_ANY);
                if (n <= 0 || (size_t)n > sizeof num)
                        w->fail = true;
                else
                        jw_put(w, num, (size_t)n);
                break;
        case JSON_TRUE:
                jw_put(w, "true", 4);
                break;
        case JSON_FALSE:
                jw_put(w, "false", 5);
                break;
        case JSON_NULL:
                jw_put(w, "null", 4);
                break;
        default:
                w->fail = true;
        }
}

char *ab_json_dumps(const json_t *v, size_t *ret_len)
{
        jw w = { .grow = true };

        if (!v)
                return NULL;
        jw_value(&w, v, 0);
        jw_put(&w, "", 1); /* the NUL */
        if (w.fail) {
                free(w.buf);
                return NULL;
        }
        if (ret_len)
                *ret_len = w.len - 1;
        return w.buf;
}

size_t ab_json_dumpb(const json_t *v, char *buf, size_t max)
{
        jw w = { .buf = buf, .cap = max };

        if (!v)
                return 0;
        jw_value(&w, v, 0);
        return w.fail ? 0 : w.len;
}

static int encode(json_t *root, char **ret_msg, size_t *ret_len)
{
        size_t n;
        char *buf = ab_json_dumps(root, &n);

        if (!buf)
                return -ENOMEM;
        *ret_msg = buf;
        *ret_len = n + 1; /* with its NUL: the varlink message end */
        return 0;
}

int ab_vl_encode_reply(json_t *params, const char *error, char **ret_msg, size_t *ret_len)
{
        json_t *root = json_object();
        int r = -ENOMEM;

        if (!params)
                params = json_object();
        if (!root || !params)
                goto out;
        if (error && json_object_set_new(root, "error", json_string(error)) < 0)
                goto out;
        if (json_object_set(root, "parameters", params) < 0)
                goto out;
        r = encode(root, ret_msg, ret_len);
out:
        json_decref(params);
        json_decref(root);
        return r;
}

int ab_vl_encode_call(const char *method, json_t *params, char **ret_msg, size_t *ret_len)
{
        json_t *root = json_object();
        int r = -ENOMEM;

        if (!params)
                params = json_object();
        if (!root || !params)
                goto out;
        if (json_object_set_new(root, "method", json_string(method)) < 0 ||
            json_object_set(root, "parameters", params) < 0)
                goto out;
        r = encode(root, ret_msg, ret_len);
out:
        json_decref(params);
        json_decref(root);
        return r;
}

/*
 * A JSON string for text from outside (an executable path, a reason that
 * quotes one), which need not be UTF-8: as it is when it is valid, else
 * with every byte >= 0x80 and every backslash written as \xHH, so that
 * the audit record keeps the field instead of dropping it.
 */
json_t *ab_json_string_escaped(const char *text)
{
        json_t *v = json_string(text);
        size_t n, o = 0;
        char *buf;

        if (v || !text)
                return v;
        n = strlen(text);
        if (n > (SIZE_MAX - 1) / 4)
                return NULL;
        buf = malloc(4 * n + 1);
        if (!buf)
                return NULL;
        for (size_t i = 0; i < n; i++) {
                unsigned char ch = (unsigned char)text[i];
                if (ch >= 0x80 || ch == '\\')
                        o += (size_t)snprintf(buf + o, 5, "\\x%02X", ch);
                else
                        buf[o++] = (char)ch;
        }
        buf[o] = '\0';
        v = json_string(buf);
        free(buf);
        return v;
}
