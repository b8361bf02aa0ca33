/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for common/jwt.c: compact JWS with Ed25519.
 * Known-answer vector: RFC 8037 appendix A (tests/vectors/rfc8037-a4.json).
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include <sodium.h>
#include <jansson.h>

#include "../../common/b64.h"
#include "../../common/jwt.h"
#include "../../common/util.h"

#define SIG_B64_LEN 86 /* AB_B64_ENCODED_LEN(64) */

static json_t *vector;
static uint8_t pk[crypto_sign_PUBLICKEYBYTES], sk[crypto_sign_SECRETKEYBYTES];
static uint8_t pk2[crypto_sign_PUBLICKEYBYTES], sk2[crypto_sign_SECRETKEYBYTES];

/* ---- helpers ------------------------------------------------------------ */

/* tests/vectors/NAME, from the source tree (cwd) or next to build/tests/. */
static json_t *load_vector(const char *name)
{
        char path[PATH_MAX], exe[PATH_MAX];
        const char *dir = getenv("AB_TEST_VECTORS");
        json_error_t err;
        json_t *j;
        ssize_t n;

        if (dir) {
                snprintf(path, sizeof path, "%s/%s", dir, name);
                if ((j = json_load_file(path, JSON_REJECT_DUPLICATES, &err)))
                        return j;
        }
        snprintf(path, sizeof path, "tests/vectors/%s", name);
        if ((j = json_load_file(path, JSON_REJECT_DUPLICATES, &err)))
                return j;
        n = readlink("/proc/self/exe", exe, sizeof exe - 1);
        if (n > 0) {
                char *slash;
                exe[n] = '\0';
                slash = strrchr(exe, '/');
                if (slash)
                        *slash = '\0';
                snprintf(path, sizeof path, "%s/../../tests/vectors/%s", exe, name);
                if ((j = json_load_file(path, JSON_REJECT_DUPLICATES, &err)))
                        return j;
        }
        return NULL;
}

static const char *vstr(const char *key)
{
        const char *s = json_string_value(json_object_get(vector, key));
        assert_non_null(s);
        return s;
}

static void b64dec(const char *s, uint8_t *out, size_t want)
{
        size_t len = 0;
        assert_int_equal(ab_b64url_decode(s, strlen(s), out, want, &len), 0);
        assert_int_equal(len, want);
}

static char *b64enc(const void *data, size_t n)
{
        size_t cap = AB_B64_ENCODED_LEN(n) + 1;
        char *s = malloc(cap);
        assert_non_null(s);
        assert_int_equal(ab_b64url_encode(data, n, s, cap), (int)cap - 1);
        return s;
}

/* Sign "header.payload" (signing input of length n in buf with room for 1 + 86 + 1 more). */
static void append_sig(char *buf, size_t n, const uint8_t *key, size_t siglen)
{
        uint8_t sig[80];

        assert_true(siglen <= sizeof sig);
        assert_int_equal(crypto_sign_detached(sig, NULL, (const unsigned char *)buf, n, key), 0);
        for (size_t i = 64; i < siglen; i++)
                sig[i] = (uint8_t)i;
        buf[n] = '.';
        assert_true(ab_b64url_encode(sig, siglen, buf + n + 1, AB_B64_ENCODED_LEN(siglen) + 1) >= 0);
}

/* A token from raw header and payload texts (any bytes: duplicates, non-objects...). */
static char *raw_token_sig(const char *header, const char *payload, const uint8_t *key, size_t siglen)
{
        char *h = b64enc(header, strlen(header)), *p = b64enc(payload, strlen(payload));
        size_t n = strlen(h) + 1 + strlen(p);
        char *tok = malloc(n + 1 + AB_B64_ENCODED_LEN(80) + 1);

        assert_non_null(tok);
        sprintf(tok, "%s.%s", h, p);
        append_sig(tok, n, key, siglen);
        free(h);
        free(p);
        return tok;
}

static char *raw_token(const char *header, const char *payload)
{
        return raw_token_sig(header, payload, sk, 64);
}

/* A token through ab_jwt_signing_input from JSON objects. */
static char *make_token_json(json_t *header, json_t *claims, const uint8_t *key)
{
        char *buf = NULL;
        size_t len = 0;

        assert_int_equal(ab_jwt_signing_input(header, claims, 1 + SIG_B64_LEN, &buf, &len), 0);
        /* the buffer has room for the signature part and its NUL */
        append_sig(buf, len, key, 64);
        assert_int_equal(strlen(buf), len + 1 + SIG_B64_LEN);
        return buf;
}

static json_t *std_header(void)
{
        json_t *h = json_pack("{s:s, s:s, s:s}", "alg", "EdDSA", "typ", "at+jwt", "kid", "k1");
        assert_non_null(h);
        return h;
}

static json_t *std_claims(void)
{
        json_t *c = json_pack("{s:s, s:s, s:s, s:I, s:I, s:s, s:s}", "iss", "urn:agent-broker:host", "sub",
                              "code-review-bot", "aud", "mcp://git.internal", "iat", (json_int_t)1700000000,
                              "exp", (json_int_t)1700000300, "jti", "abcdefghijklmnopqrstuv", "scope",
                              "repo:read repo:write");
        assert_non_null(c);
        return c;
}

static char *std_token(void)
{
        json_t *h = std_header(), *c = std_claims();
        char *tok = make_token_json(h, c, sk);
        json_decref(h);
        json_decref(c);
        return tok;
}

/* parse must fail with code, leaving ret untouched. */
static void expect_parse_error_n(const char *tok, size_t len, int code)
{
        ab_jwt j;

        memset(&j, 0xa5, sizeof j);
        assert_int_equal(ab_jwt_parse(tok, len, &j), code);
        {
                ab_jwt k;
                memset(&k, 0xa5, sizeof k);
                assert_memory_equal(&j, &k, sizeof j);
        }
}

static void expect_parse_error(const char *tok, int code)
{
        expect_parse_error_n(tok, strlen(tok), code);
}

/* A token whose header is the given text, signed properly; parse gives code. */
static void expect_header_error(const char *header, int code)
{
        char *tok = raw_token(header, "{\"sub\":\"x\"}");
        expect_parse_error(tok, code);
        free(tok);
}

static void expect_header_ok(const char *header)
{
        char *tok = raw_token(header, "{\"sub\":\"x\"}");
        ab_jwt j;

        assert_int_equal(ab_jwt_parse(tok, strlen(tok), &j), 0);
        assert_int_equal(ab_jwt_verify(&j, tok, pk), 0);
        ab_jwt_done(&j);
        free(tok);
}

static int group_setup(void **state)
{
        if (sodium_init() < 0)
                return -1;
        vector = load_vector("rfc8037-a4.json");
        if (!vector) {
                fprintf(stderr, "cannot load tests/vectors/rfc8037-a4.json (set AB_TEST_VECTORS)\n");
                return -1;
        }
        /* fixed seeds: every run signs the same bytes, so a failure reproduces */
        {
                uint8_t seed[crypto_sign_SEEDBYTES];
                memset(seed, 0x11, sizeof seed);
                crypto_sign_seed_keypair(pk, sk, seed);
                memset(seed, 0x22, sizeof seed);
                crypto_sign_seed_keypair(pk2, sk2, seed);
        }
        return 0;
}

static int group_teardown(void **state)
{
        json_decref(vector);
        sodium_memzero(sk, sizeof sk);
        sodium_memzero(sk2, sizeof sk2);
        return 0;
}

/* ---- RFC 8037 known answers --------------------------------------------- */

static void test_rfc8037_vector_consistent(void **state)
{
        char buf[512];
        uint8_t payload[64];
        size_t len = 0;

        snprintf(buf, sizeof buf, "%s.%s.%s", vstr("protected"), vstr("payload"), vstr("signature"));
        assert_string_equal(buf, vstr("jws"));
        assert_int_equal(ab_b64url_decode(vstr("payload"), strlen(vstr("payload")), payload, sizeof payload, &len),
                         0);
        assert_int_equal(len, strlen(vstr("payload_text")));
        assert_memory_equal(payload, vstr("payload_text"), len);
        assert_int_equal(ab_b64url_decode(vstr("protected"), strlen(vstr("protected")), payload, sizeof payload,
                                          &len), 0);
        assert_int_equal(len, strlen("{\"alg\":\"EdDSA\"}"));
        assert_memory_equal(payload, "{\"alg\":\"EdDSA\"}", len);
}

static void test_rfc8037_signature_verifies(void **state)
{
        uint8_t x[32], sig[64];
        char input[256];
        int n;

        b64dec(vstr("x"), x, sizeof x);
        b64dec(vstr("signature"), sig, sizeof sig);
        n = snprintf(input, sizeof input, "%s.%s", vstr("protected"), vstr("payload"));
        assert_int_equal(crypto_sign_verify_detached(sig, (const unsigned char *)input, (size_t)n, x), 0);

        /* one flipped bit in the input or the signature fails */
        input[0] ^= 1;
        assert_int_not_equal(crypto_sign_verify_detached(sig, (const unsigned char *)input, (size_t)n, x), 0);
        input[0] ^= 1;
        sig[10] ^= 0x20;
        assert_int_not_equal(crypto_sign_verify_detached(sig, (const unsigned char *)input, (size_t)n, x), 0);
}

static void test_rfc8037_signature_reproduced(void **state)
{
        uint8_t d[32], x[32], kpk[32], ksk[64], sig[64], want[64];
        char input[256], *enc;
        int n;

        b64dec(vstr("d"), d, sizeof d);
        b64dec(vstr("x"), x, sizeof x);
        b64dec(vstr("signature"), want, sizeof want);
        assert_int_equal(crypto_sign_seed_keypair(kpk, ksk, d), 0);
        assert_memory_equal(kpk, x, 32); /* A.1: d derives x */
        n = snprintf(input, sizeof input, "%s.%s", vstr("protected"), vstr("payload"));
        assert_int_equal(crypto_sign_detached(sig, NULL, (const unsigned char *)input, (size_t)n, ksk), 0);
        assert_memory_equal(sig, want, 64); /* Ed25519 is deterministic */
        enc = b64enc(sig, sizeof sig);
        assert_string_equal(enc, vstr("signature"));
        free(enc);
        sodium_memzero(ksk, sizeof ksk);
}

/* ab_jwt_verify on the RFC's JWS, through a hand-built ab_jwt (parse needs kid and an object payload). */
static void test_rfc8037_ab_jwt_verify(void **state)
{
        const char *jws = vstr("jws");
        uint8_t x[32];
        ab_jwt j = { 0 };

        b64dec(vstr("x"), x, sizeof x);
        b64dec(vstr("signature"), j.sig, sizeof j.sig);
        j.signing_len = strlen(vstr("protected")) + 1 + strlen(vstr("payload"));
        assert_int_equal(ab_jwt_verify(&j, jws, x), 0);
        x[0] ^= 1;
        assert_int_equal(ab_jwt_verify(&j, jws, x), AB_ERR_CRYPTO);
        x[0] ^= 1;
        j.signing_len--;
        assert_int_equal(ab_jwt_verify(&j, jws, x), AB_ERR_CRYPTO);

        /* ab_jwt_parse rejects the RFC example itself: no kid, payload not JSON */
        expect_parse_error(jws, AB_ERR_INVALID);
}

static void test_rfc8037_thumbprint(void **state)
{
        uint8_t x[32];
        char out[44];

        b64dec(vstr("x"), x, sizeof x);
        memset(out, 'X', sizeof out);
        assert_int_equal(ab_jwk_thumbprint(x, out), 0);
        assert_string_equal(out, vstr("thumbprint"));
        assert_string_equal(out, "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");

        /* another key, another thumbprint of the same shape */
        assert_int_equal(ab_jwk_thumbprint(pk, out), 0);
        assert_int_equal(strlen(out), 43);
        assert_string_not_equal(out, vstr("thumbprint"));
}

/* ---- our own tokens ----------------------------------------------------- */

static void test_valid_token(void **state)
{
        char *tok = std_token();
        json_t *claims = std_claims();
        ab_jwt j;

        assert_int_equal(ab_jwt_parse(tok, strlen(tok), &j), 0);
        assert_non_null(j.header);
        assert_non_null(j.claims);
        assert_string_equal(j.kid, "k1");
        assert_true(json_equal(j.claims, claims));
        assert_string_equal(json_string_value(json_object_get(j.header, "alg")), "EdDSA");
        assert_int_equal(j.signing_len, (size_t)(strrchr(tok, '.') - tok));
        assert_int_equal(ab_jwt_verify(&j, tok, pk), 0);
        assert_int_equal(ab_jwt_verify(&j, tok, pk2), AB_ERR_CRYPTO); /* wrong key */
        ab_jwt_done(&j);
        assert_null(j.header);
        assert_null(j.claims);
        assert_null(j.kid);
        ab_jwt_done(&j); /* twice is fine */
        json_decref(claims);
        free(tok);
}

static void test_wrong_key(void **state)
{
        json_t *h = std_header(), *c = std_claims();
        char *tok = make_token_json(h, c, sk2);
        uint8_t zero[32] = { 0 };
        ab_jwt j;

        assert_int_equal(ab_jwt_parse(tok, strlen(tok), &j), 0);
        assert_int_equal(ab_jwt_verify(&j, tok, pk), AB_ERR_CRYPTO);
        assert_int_equal(ab_jwt_verify(&j, tok, zero), AB_ERR_CRYPTO);
        assert_int_equal(ab_jwt_verify(&j, tok, pk2), 0);
        ab_jwt_done(&j);
        json_decref(h);
        json_decref(c);
        free(tok);
}

/* A valid signature moved onto another header.payload does not verify. */
static void test_signature_transplant(void **state)
{
        json_t *h = std_header(), *c1 = std_claims(), *c2 = std_claims();
        char *t1, *t2, *mix;
        ab_jwt j;

        json_object_set_new(c2, "scope", json_string("repo:admin"));
        t1 = make_token_json(h, c1, sk);
        t2 = make_token_json(h, c2, sk);
        mix = malloc(strlen(t1) + strlen(t2) + 1);
        assert_non_null(mix);
        memcpy(mix, t2, (size_t)(strrchr(t2, '.') - t2));
        strcpy(mix + (strrchr(t2, '.') - t2), strrchr(t1, '.'));
        assert_int_equal(ab_jwt_parse(mix, strlen(mix), &j), 0);
        assert_int_equal(ab_jwt_verify(&j, mix, pk), AB_ERR_CRYPTO);
        ab_jwt_done(&j);
        free(mix);
        free(t1);
        free(t2);
        json_decref(h);
        json_decref(c1);
        json_decref(c2);
}

static void test_alg_ed25519_accepted(void **state)
{
        json_t *h = json_pack("{s:s, s:s, s:s}", "alg", "Ed25519", "typ", "at+jwt", "kid", "k1");
        json_t *c = std_claims();
        char *tok = make_token_json(h, c, sk);
        ab_jwt j;

        assert_int_equal(ab_jwt_parse(tok, strlen(tok), &j), 0);
        assert_int_equal(ab_jwt_verify(&j, tok, pk), 0);
        ab_jwt_done(&j);
        free(tok);
        json_decref(h);
        json_decref(c);
}

static void test_alg_rejected(void **state)
{
        static const char *const headers[] = {
                "{\"alg\":\"none\",\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":\"None\",\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":\"HS256\",\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":\"RS256\",\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":\"ES256\",\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":\"eddsa\",\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":\"EdDSA \",\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":\"Ed448\",\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":\"\",\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":1,\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":null,\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":[\"EdDSA\"],\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":{\"name\":\"EdDSA\"},\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
                "{\"alg\":true,\"typ\":\"at+jwt\",\"kid\":\"k1\"}",
        };

        for (size_t i = 0; i < AB_ARRAY_SIZE(headers); i++)
                expect_header_error(headers[i], AB_ERR_CRYPTO);

        /* "alg":"none" with an empty signature, the classic: rejected before the signature is looked at */
        {
                char *h = b64enc(headers[0], strlen(headers[0]));
                char *p = b64enc("{\"sub\":\"x\"}", 11);
                char tok[512];
                snprintf(tok, sizeof tok, "%s.%s.", h, p);
                expect_parse_error(tok, AB_ERR_CRYPTO);
                free(h);
                free(p);
        }
}

/* Every single-character change anywhere in the token fails parse or verify. */
static void test_every_byte_changed(void **state)
{
        static const char repl[] = "AQgw_-9Z.=+/ \x01\x80\xff";
        char *tok = std_token();
        size_t len = strlen(tok);
        size_t d1 = (size_t)(strchr(tok, '.') - tok), d2 = (size_t)(strrchr(tok, '.') - tok);
        unsigned parse_fail[3] = { 0 }, verify_fail[3] = { 0 }, verified = 0;

        for (size_t i = 0; i < len; i++) {
                for (size_t r = 0; r < sizeof repl - 1; r++) {
                        char saved = tok[i];
                        ab_jwt j;
                        int part = i < d1 ? 0 : i < d2 ? 1 : 2;

                        if (repl[r] == saved)
                                continue;
                        tok[i] = repl[r];
                        if (ab_jwt_parse(tok, len, &j) < 0) {
                                parse_fail[part]++;
                        } else {
                                if (ab_jwt_verify(&j, tok, pk) == 0) {
                                        if (verified++ < 5)
                                                print_error("token with byte %zu ('%c') changed to 0x%02x "
                                                            "still verifies\n",
                                                            i, saved, (unsigned char)repl[r]);
                                } else {
                                        verify_fail[part]++;
                                }
                                ab_jwt_done(&j);
                        }
                        tok[i] = saved;
                }
        }
        assert_int_equal(verified, 0);
        /* each part was exercised, and some changes reach the signature check */
        for (int p = 0; p < 3; p++)
                assert_true(parse_fail[p] + verify_fail[p] > 0);
        assert_true(verify_fail[2] > 0);
        assert_true(verify_fail[1] > 0);
        free(tok);
}

/*
 * A byte outside the base64url alphabet in place of a '_' of the signature:
 * the token is a different string and must not be accepted as the same one.
 */
static void test_non_alphabet_byte_in_signature(void **state)
{
        json_t *h = std_header(), *c = std_claims();
        unsigned accepted = 0;

        for (int k = 0; k < 64; k++) {
                char *tok, *us;
                ab_jwt j;

                json_object_set_new(c, "jti", json_integer(k));
                tok = make_token_json(h, c, sk);
                us = strchr(strrchr(tok, '.'), '_');
                if (!us) {
                        free(tok);
                        continue;
                }
                for (int b = 0x80; b <= 0xff; b += 0x7f) {
                        *us = (char)b;
                        if (ab_jwt_parse(tok, strlen(tok), &j) == 0) {
                                if (ab_jwt_verify(&j, tok, pk) == 0 && accepted++ == 0)
                                        print_error("signature '_' replaced by 0x%02x: token still verifies\n", b);
                                ab_jwt_done(&j);
                        }
                }
                free(tok);
        }
        json_decref(h);
        json_decref(c);
        assert_int_equal(accepted, 0);
}

/* Bit flips in the decoded signature, re-encoded: parse succeeds, verify fails. */
static void test_signature_bit_flips(void **state)
{
        char *tok = std_token();
        char *dot = strrchr(tok, '.');
        uint8_t sig[64];

        b64dec(dot + 1, sig, sizeof sig);
        for (size_t i = 0; i < 64; i++) {
                ab_jwt j;
                sig[i] ^= (uint8_t)(1u << (i % 8));
                assert_int_equal(ab_b64url_encode(sig, 64, dot + 1, SIG_B64_LEN + 1), SIG_B64_LEN);
                assert_int_equal(ab_jwt_parse(tok, strlen(tok), &j), 0);
                assert_int_equal(ab_jwt_verify(&j, tok, pk), AB_ERR_CRYPTO);
                ab_jwt_done(&j);
                sig[i] ^= (uint8_t)(1u << (i % 8));
        }
        free(tok);
}

static void test_structure(void **state)
{
        char *tok = std_token();
        size_t len = strlen(tok);
        char *d1 = strchr(tok, '.'), *d2 = strrchr(tok, '.');
        char buf[2048];

        assert_true(len < sizeof buf - 16);

        /* no dots, one dot */
        expect_parse_error("", AB_ERR_INVALID);
        expect_parse_error("abc", AB_ERR_INVALID);
        snprintf(buf, sizeof buf, "%.*s", (int)(d2 - tok), tok);
        expect_parse_error(buf, AB_ERR_INVALID); /* header.payload */
        snprintf(buf, sizeof buf, "%.*s%s", (int)(d1 - tok), tok, d1 + 1);
        expect_parse_error(buf, AB_ERR_INVALID); /* dot removed */
        /* four parts */
        snprintf(buf, sizeof buf, "%s.%s", tok, d2 + 1);
        expect_parse_error(buf, AB_ERR_INVALID);
        snprintf(buf, sizeof buf, "%s.", tok);
        expect_parse_error(buf, AB_ERR_INVALID);
        snprintf(buf, sizeof buf, ".%s", tok);
        expect_parse_error(buf, AB_ERR_INVALID);
        expect_parse_error("...", AB_ERR_INVALID);
        /* empty parts */
        expect_parse_error("..", AB_ERR_INVALID);
        snprintf(buf, sizeof buf, "%.*s..%s", (int)(d1 - tok), tok, d2 + 1);
        expect_parse_error(buf, AB_ERR_INVALID); /* empty payload */
        snprintf(buf, sizeof buf, "%s", d1);
        expect_parse_error(buf, AB_ERR_INVALID); /* empty header */
        snprintf(buf, sizeof buf, "%.*s.", (int)(d2 - tok), tok);
        expect_parse_error(buf, AB_ERR_INVALID); /* empty signature */

        /* a NUL byte inside, length unchanged */
        for (size_t i = 0; i < len; i += 17) {
                char saved = tok[i];
                tok[i] = '\0';
                expect_parse_error_n(tok, len, AB_ERR_INVALID);
                tok[i] = saved;
        }
        /* a NUL after the token, counted in len */
        memcpy(buf, tok, len + 1);
        expect_parse_error_n(buf, len + 1, AB_ERR_INVALID);
        /* whitespace around the token */
        snprintf(buf, sizeof buf, " %s", tok);
        expect_parse_error(buf, AB_ERR_INVALID);
        snprintf(buf, sizeof buf, "%s\n", tok);
        expect_parse_error(buf, AB_ERR_INVALID);
        /* padding on a part */
        snprintf(buf, sizeof buf, "%.*s=.%s", (int)(d1 - tok), tok, d1 + 1);
        expect_parse_error(buf, AB_ERR_INVALID);
        free(tok);
}

static void test_payload_must_be_object(void **state)
{
        static const char *const payloads[] = {
                "[]", "[{\"sub\":\"x\"}]", "\"sub\"", "42", "null", "true", "", " ", "{", "{\"sub\":\"x\"}x",
                "{\"sub\":\"x\"}{}", "Example of Ed25519 signing",
        };
        char *tok;
        ab_jwt j;

        for (size_t i = 0; i < AB_ARRAY_SIZE(payloads); i++) {
                tok = raw_token("{\"alg\":\"EdDSA\",\"kid\":\"k1\"}", payloads[i]);
                expect_parse_error(tok, AB_ERR_INVALID);
                free(tok);
        }
        /* an empty object is fine as far as the JWS layer goes */
        tok = raw_token("{\"alg\":\"EdDSA\",\"kid\":\"k1\"}", "{}");
        assert_int_equal(ab_jwt_parse(tok, strlen(tok), &j), 0);
        assert_int_equal(ab_jwt_verify(&j, tok, pk), 0);
        ab_jwt_done(&j);
        free(tok);
}

static void test_duplicate_keys(void **state)
{
        char *tok;

        expect_header_error("{\"alg\":\"EdDSA\",\"kid\":\"k1\",\"kid\":\"k2\"}", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"alg\":\"EdDSA\",\"kid\":\"k1\"}", AB_ERR_INVALID);
        /* the classic confusion: a second alg that some parsers would take */
        expect_header_error("{\"alg\":\"EdDSA\",\"kid\":\"k1\",\"alg\":\"none\"}", AB_ERR_INVALID);
        tok = raw_token("{\"alg\":\"EdDSA\",\"kid\":\"k1\"}", "{\"sub\":\"a\",\"sub\":\"b\"}");
        expect_parse_error(tok, AB_ERR_INVALID);
        free(tok);
        tok = raw_token("{\"alg\":\"EdDSA\",\"kid\":\"k1\"}", "{\"act\":{\"sub\":\"a\",\"sub\":\"b\"}}");
        expect_parse_error(tok, AB_ERR_INVALID);
        free(tok);
}

static void test_header_fields(void **state)
{
        char hdr[512], kid[200];

        /* crit, in any form */
        expect_header_error("{\"alg\":\"EdDSA\",\"kid\":\"k1\",\"crit\":[\"exp\"]}", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"kid\":\"k1\",\"crit\":[]}", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"kid\":\"k1\",\"crit\":null}", AB_ERR_INVALID);
        /* typ */
        expect_header_error("{\"alg\":\"EdDSA\",\"typ\":\"JWT\",\"kid\":\"k1\"}", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"typ\":\"jwt\",\"kid\":\"k1\"}", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"typ\":\"\",\"kid\":\"k1\"}", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"typ\":\"at+jwt \",\"kid\":\"k1\"}", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"typ\":1,\"kid\":\"k1\"}", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"typ\":null,\"kid\":\"k1\"}", AB_ERR_INVALID);
        expect_header_ok("{\"alg\":\"EdDSA\",\"kid\":\"k1\"}");
        expect_header_ok("{\"alg\":\"EdDSA\",\"typ\":\"at+jwt\",\"kid\":\"k1\"}");
        expect_header_ok("{\"alg\":\"EdDSA\",\"typ\":\"application/at+jwt\",\"kid\":\"k1\"}");
        expect_header_ok("{\"alg\":\"EdDSA\",\"typ\":\"AT+JWT\",\"kid\":\"k1\"}"); /* media types: case-insensitive */
        /* kid */
        expect_header_error("{\"alg\":\"EdDSA\",\"typ\":\"at+jwt\"}", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"kid\":\"\"}", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"kid\":1}", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"kid\":null}", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"kid\":[\"k1\"]}", AB_ERR_INVALID);
        /* kid of 128 bytes accepted, 129 rejected */
        memset(kid, 'k', 128);
        kid[128] = '\0';
        snprintf(hdr, sizeof hdr, "{\"alg\":\"EdDSA\",\"kid\":\"%s\"}", kid);
        expect_header_ok(hdr);
        kid[128] = 'k';
        kid[129] = '\0';
        snprintf(hdr, sizeof hdr, "{\"alg\":\"EdDSA\",\"kid\":\"%s\"}", kid);
        expect_header_error(hdr, AB_ERR_INVALID);
        /* NUL inside a header string */
        expect_header_error("{\"alg\":\"EdDSA\",\"kid\":\"k1\\u0000x\"}", AB_ERR_INVALID);
        /* not JSON, not an object */
        expect_header_error("{\"alg\":\"EdDSA\",\"kid\":\"k1\"", AB_ERR_INVALID);
        expect_header_error("[\"EdDSA\"]", AB_ERR_INVALID);
        expect_header_error("\"EdDSA\"", AB_ERR_INVALID);
        expect_header_error("{\"alg\":\"EdDSA\",\"kid\":\"k1\"} x", AB_ERR_INVALID);
}

static void test_signature_length(void **state)
{
        static const char hdr[] = "{\"alg\":\"EdDSA\",\"kid\":\"k1\"}", pl[] = "{\"sub\":\"x\"}";
        char *tok;
        ab_jwt j;

        tok = raw_token_sig(hdr, pl, sk, 63);
        expect_parse_error(tok, AB_ERR_INVALID);
        free(tok);
        tok = raw_token_sig(hdr, pl, sk, 65);
        expect_parse_error(tok, AB_ERR_INVALID);
        free(tok);
        tok = raw_token_sig(hdr, pl, sk, 66);
        expect_parse_error(tok, AB_ERR_INVALID);
        free(tok);
        tok = raw_token_sig(hdr, pl, sk, 64);
        assert_int_equal(ab_jwt_parse(tok, strlen(tok), &j), 0);
        assert_int_equal(ab_jwt_verify(&j, tok, pk), 0);
        ab_jwt_done(&j);
        /* 64 bytes, but the last character carries non-zero trailing bits */
        {
                size_t n = strlen(tok);
                char c = tok[n - 1];
                tok[n - 1] = c == 'A' ? 'B' : (c == 'Q' ? 'R' : (c == 'g' ? 'h' : (c == 'w' ? 'x' : 'B')));
                expect_parse_error(tok, AB_ERR_INVALID);
        }
        free(tok);
}

/* A token of exactly n bytes: claims padded to length. */
static char *token_of_length(size_t n, const uint8_t *key)
{
        for (size_t kidlen = 2; kidlen < 6; kidlen++) {
                char kid[8];
                json_t *h;
                size_t lo = 0, hi = n;

                memset(kid, 'k', kidlen);
                kid[kidlen] = '\0';
                h = json_pack("{s:s, s:s, s:s}", "alg", "EdDSA", "typ", "at+jwt", "kid", kid);
                assert_non_null(h);
                /* the length only grows with the pad: bisect */
                while (lo <= hi) {
                        size_t mid = (lo + hi) / 2, total;
                        char *pad = malloc(mid + 1), *buf = NULL, *tok;
                        json_t *c;
                        int r;

                        assert_non_null(pad);
                        memset(pad, 'p', mid);
                        pad[mid] = '\0';
                        c = json_pack("{s:s, s:s}", "sub", "x", "pad", pad);
                        free(pad);
                        r = ab_jwt_signing_input(h, c, 0, &buf, &total);
                        if (r == AB_ERR_TOO_LARGE) {
                                json_decref(c);
                                hi = mid - 1;
                                continue;
                        }
                        assert_int_equal(r, 0);
                        free(buf);
                        total += 1 + SIG_B64_LEN;
                        if (total == n) {
                                buf = NULL;
                                assert_int_equal(ab_jwt_signing_input(h, c, n > AB_JWT_MAX ? 0 : 1 + SIG_B64_LEN,
                                                                      &buf, &total),
                                                 0);
                                tok = malloc(n + 1);
                                assert_non_null(tok);
                                memcpy(tok, buf, total);
                                free(buf);
                                append_sig(tok, total, key, 64);
                                assert_int_equal(strlen(tok), n);
                                json_decref(c);
                                json_decref(h);
                                return tok;
                        }
                        json_decref(c);
                        if (total < n)
                                lo = mid + 1;
                        else
                                hi = mid - 1;
                }
                json_decref(h);
        }
        fail_msg("cannot build a token of %zu bytes", n);
        return NULL;
}

static void test_size_limit(void **state)
{
        char *tok = token_of_length(AB_JWT_MAX, sk);
        char *big;
        ab_jwt j;

        assert_int_equal(strlen(tok), AB_JWT_MAX);
        assert_int_equal(ab_jwt_parse(tok, AB_JWT_MAX, &j), 0);
        assert_int_equal(ab_jwt_verify(&j, tok, pk), 0);
        ab_jwt_done(&j);

        /* one more byte, on the signature: the size is checked before anything else */
        big = malloc(AB_JWT_MAX + 2);
        assert_non_null(big);
        memcpy(big, tok, AB_JWT_MAX);
        big[AB_JWT_MAX] = 'A';
        big[AB_JWT_MAX + 1] = '\0';
        expect_parse_error_n(big, AB_JWT_MAX + 1, AB_ERR_TOO_LARGE);
        free(big);
        free(tok);

        /* a structurally valid, correctly signed token of AB_JWT_MAX + 1 bytes */
        tok = token_of_length(AB_JWT_MAX + 1, sk);
        expect_parse_error_n(tok, AB_JWT_MAX + 1, AB_ERR_TOO_LARGE);
        free(tok);

        /* far too large, and garbage: the size is checked first */
        big = malloc(10 * AB_JWT_MAX);
        assert_non_null(big);
        memset(big, '.', 10 * AB_JWT_MAX);
        expect_parse_error_n(big, 10 * AB_JWT_MAX, AB_ERR_TOO_LARGE);
        free(big);
}

/* The decoded header may hold AB_JWT_MAX_HEADER bytes, not one more. */
static void test_header_size_limit(void **state)
{
        char hdr[AB_JWT_MAX_HEADER + 2];
        char *tok;
        ab_jwt j;
        int n;

        n = snprintf(hdr, sizeof hdr, "{\"alg\":\"EdDSA\",\"kid\":\"k1\",\"x\":\"");
        memset(hdr + n, 'x', sizeof hdr - (size_t)n);
        memcpy(hdr + AB_JWT_MAX_HEADER - 2, "\"}", 3);
        assert_int_equal(strlen(hdr), AB_JWT_MAX_HEADER);
        tok = raw_token(hdr, "{\"sub\":\"x\"}");
        assert_int_equal(ab_jwt_parse(tok, strlen(tok), &j), 0);
        assert_int_equal(ab_jwt_verify(&j, tok, pk), 0);
        ab_jwt_done(&j);
        free(tok);

        memset(hdr + n, 'x', sizeof hdr - (size_t)n);
        memcpy(hdr + AB_JWT_MAX_HEADER - 1, "\"}", 3);
        assert_int_equal(strlen(hdr), AB_JWT_MAX_HEADER + 1);
        tok = raw_token(hdr, "{\"sub\":\"x\"}");
        expect_parse_error(tok, AB_ERR_TOO_LARGE);
        free(tok);
}

static void test_signing_input(void **state)
{
        json_t *h = std_header(), *c = std_claims();
        char *buf = NULL, *hs, *cs, *want;
        size_t len = 0;

        assert_int_equal(ab_jwt_signing_input(h, c, 0, &buf, &len), 0);
        assert_int_equal(strlen(buf), len); /* NUL-terminated */
        hs = json_dumps(h, JSON_COMPACT);
        cs = json_dumps(c, JSON_COMPACT);
        {
                char *eh = b64enc(hs, strlen(hs)), *ec = b64enc(cs, strlen(cs));
                want = malloc(strlen(eh) + strlen(ec) + 2);
                assert_non_null(want);
                sprintf(want, "%s.%s", eh, ec);
                free(eh);
                free(ec);
        }
        assert_string_equal(buf, want);
        free(buf);
        free(want);
        free(hs);
        free(cs);

        /* extra beyond AB_JWT_MAX */
        buf = (char *)0x1;
        assert_int_equal(ab_jwt_signing_input(h, c, AB_JWT_MAX + 1, &buf, &len), AB_ERR_TOO_LARGE);
        assert_ptr_equal(buf, (char *)0x1);
        json_decref(h);
        json_decref(c);
}

/* Exactly AB_JWT_MAX with extra is fine, one byte more is not. */
static void test_signing_input_limit(void **state)
{
        json_t *h = std_header(), *c = std_claims();
        char *buf = NULL;
        size_t len = 0, base;

        assert_int_equal(ab_jwt_signing_input(h, c, 0, &buf, &len), 0);
        free(buf);
        base = len;
        buf = NULL;
        assert_int_equal(ab_jwt_signing_input(h, c, AB_JWT_MAX - base, &buf, &len), 0);
        assert_int_equal(len, base);
        /* the promised extra room is writable */
        memset(buf + len, 'x', AB_JWT_MAX - base);
        free(buf);
        buf = (char *)0x1;
        assert_int_equal(ab_jwt_signing_input(h, c, AB_JWT_MAX - base + 1, &buf, &len), AB_ERR_TOO_LARGE);
        assert_ptr_equal(buf, (char *)0x1);
        json_decref(h);
        json_decref(c);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_rfc8037_vector_consistent),
                cmocka_unit_test(test_rfc8037_signature_verifies),
                cmocka_unit_test(test_rfc8037_signature_reproduced),
                cmocka_unit_test(test_rfc8037_ab_jwt_verify),
                cmocka_unit_test(test_rfc8037_thumbprint),
                cmocka_unit_test(test_valid_token),
                cmocka_unit_test(test_wrong_key),
                cmocka_unit_test(test_signature_transplant),
                cmocka_unit_test(test_alg_ed25519_accepted),
                cmocka_unit_test(test_alg_rejected),
                cmocka_unit_test(test_every_byte_changed),
                cmocka_unit_test(test_non_alphabet_byte_in_signature),
                cmocka_unit_test(test_signature_bit_flips),
                cmocka_unit_test(test_structure),
                cmocka_unit_test(test_payload_must_be_object),
                cmocka_unit_test(test_duplicate_keys),
                cmocka_unit_test(test_header_fields),
                cmocka_unit_test(test_signature_length),
                cmocka_unit_test(test_size_limit),
                cmocka_unit_test(test_header_size_limit),
                cmocka_unit_test(test_signing_input),
                cmocka_unit_test(test_signing_input_limit),
        };
        return cmocka_run_group_tests_name("jwt", tests, group_setup, group_teardown);
}
