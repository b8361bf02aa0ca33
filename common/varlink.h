/* SPDX-License-Identifier: MIT */
/* Varlink messages: decoding calls and replies, encoding them. */
#ifndef AB_VARLINK_H
#define AB_VARLINK_H

#include <stdbool.h>
#include <stddef.h>
#include <jansson.h>

#define AB_VL_MAX_METHOD 256

typedef struct ab_vl_call {
        json_t *root;          /* owns everything below */
        const char *method;    /* "interface.Method" */
        json_t *parameters;    /* object, never NULL (empty if absent) */
        bool oneway, more, upgrade;
} ab_vl_call;

/*
 * Parse one call message msg[0..len). Rejects: invalid JSON, trailing
 * garbage, duplicate keys, NUL in strings, a non-object, a missing or
 * malformed "method", "parameters" that is not an object, flags that are
 * not booleans. On failure returns AB_ERR_PROTOCOL and, if reason is not
 * NULL, writes a short human reason (at most reasonmax bytes).
 */
int ab_vl_parse_call(const char *msg, size_t len, ab_vl_call *ret, char *reason, size_t reasonmax);
void ab_vl_call_done(ab_vl_call *c);

/*
 * Parse a reply: on success *ret_params (new reference, object) and
 * *ret_error (NULL, or a new malloc'd error name). Returns 0 or AB_ERR_PROTOCOL.
 */
int ab_vl_parse_reply(const char *msg, size_t len, json_t **ret_params, char **ret_error);

/*
 * Serialise a message {"parameters": params} or {"error": name,
 * "parameters": params} (params may be NULL: {}), with the NUL appended.
 * Steals the reference to params. *ret_len includes the NUL.
 * Returns 0, -ENOMEM.
 */
int ab_vl_encode_reply(json_t *params, const char *error, char **ret_msg, size_t *ret_len);

/* Serialise a call {"method": m, "parameters": params}; steals params. */
int ab_vl_encode_call(const char *method, json_t *params, char **ret_msg, size_t *ret_len);

/*
 * A JSON string for text from outside (an executable path, a reason that
 * quotes one), which need not be UTF-8: as it is when valid, else with every
 * byte >= 0x80 and every backslash written as \xHH. NULL only for NULL text
 * or no memory.
 */
json_t *ab_json_string_escaped(const char *text);

/*
 * Compact JSON text of v: the very bytes json_dumps(v, JSON_COMPACT) makes
 * (keys in insertion order, UTF-8 as is, the same escapes), several times
 * faster: jansson decodes every string a code point at a time, which was a
 * tenth of the broker's CPU per token. Returns a new NUL-terminated buffer
 * (its length in *ret_len if not NULL), or NULL (no memory, not a value).
 */
char *ab_json_dumps(const json_t *v, size_t *ret_len);
/*
 * The same into buf[0..max): returns the length of the text (without a NUL;
 * more than max means buf holds only a prefix), 0 on failure.
 */
size_t ab_json_dumpb(const json_t *v, char *buf, size_t max);

/* true if name is a valid "reverse.domain.Member" varlink name. */
bool ab_vl_valid_qualified_name(const char *name);

#endif
