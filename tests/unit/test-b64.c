/* SPDX-License-Identifier: MIT */
/* Unit tests for common/b64.c: strict base64url without padding. */
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "../../common/b64.h"
#include "../../common/util.h"

/* RFC 4648 section 10 vectors, in the url-safe alphabet without padding. */
static const struct {
        const char *plain, *enc;
} rfc4648[] = {
        { "", "" },         { "f", "Zg" },         { "fo", "Zm8" },       { "foo", "Zm9v" },
        { "foob", "Zm9vYg" }, { "fooba", "Zm9vYmE" }, { "foobar", "Zm9vYmFy" },
};

static int decode_str(const char *s, uint8_t *out, size_t outmax, size_t *ret_len)
{
        return ab_b64url_decode(s, strlen(s), out, outmax, ret_len);
}

static void test_rfc4648_encode(void **state)
{
        for (size_t i = 0; i < AB_ARRAY_SIZE(rfc4648); i++) {
                char out[32];
                size_t n = strlen(rfc4648[i].plain);
                int r;

                memset(out, 'X', sizeof out);
                r = ab_b64url_encode((const uint8_t *)rfc4648[i].plain, n, out, sizeof out);
                assert_int_equal(r, (int)strlen(rfc4648[i].enc));
                assert_int_equal(r, (int)AB_B64_ENCODED_LEN(n));
                assert_string_equal(out, rfc4648[i].enc);
        }
}

static void test_rfc4648_decode(void **state)
{
        for (size_t i = 0; i < AB_ARRAY_SIZE(rfc4648); i++) {
                uint8_t out[32];
                size_t len = 999;

                assert_int_equal(decode_str(rfc4648[i].enc, out, sizeof out, &len), 0);
                assert_int_equal(len, strlen(rfc4648[i].plain));
                assert_memory_equal(out, rfc4648[i].plain, len);
        }
}

/* The url-safe alphabet: '-' and '_' where standard base64 has '+' and '/'. */
static void test_urlsafe_alphabet(void **state)
{
        static const uint8_t bin[] = { 0xfb, 0xff, 0xbf, 0x3e, 0xff };
        uint8_t back[8];
        char out[16];
        size_t len = 0;

        assert_int_equal(ab_b64url_encode(bin, sizeof bin, out, sizeof out), 7);
        assert_string_equal(out, "-_-_Pv8");
        assert_int_equal(decode_str("-_-_Pv8", back, sizeof back, &len), 0);
        assert_int_equal(len, sizeof bin);
        assert_memory_equal(back, bin, sizeof bin);
}

/* A small deterministic generator so a failure reproduces. */
static uint32_t rng_state = 0x12345678u;
static uint8_t rnd8(void)
{
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 17;
        rng_state ^= rng_state << 5;
        return (uint8_t)rng_state;
}

static void test_round_trip(void **state)
{
        for (size_t n = 0; n <= 300; n++) {
                uint8_t in[300] = { 0 }, back[300] = { 0 };
                char enc[401];
                size_t len = 12345;
                int r;

                for (size_t i = 0; i < n; i++)
                        in[i] = rnd8();
                r = ab_b64url_encode(in, n, enc, sizeof enc);
                assert_int_equal(r, (int)AB_B64_ENCODED_LEN(n));
                assert_int_equal(strlen(enc), (size_t)r);
                for (int i = 0; i < r; i++)
                        assert_non_null(strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
                                               enc[i]));
                assert_int_not_equal((size_t)r % 4, 1);
                /* exact-fit output for decode */
                assert_int_equal(ab_b64url_decode(enc, (size_t)r, back, n, &len), 0);
                assert_int_equal(len, n);
                assert_memory_equal(back, in, n);
        }
}

static void test_rejects_padding(void **state)
{
        uint8_t out[16];
        size_t len = 777;

        assert_int_equal(decode_str("Zg==", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("Zm8=", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("Zg=", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("Zm9v====", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("====", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(len, 777); /* untouched on failure */
}

static void test_rejects_standard_alphabet(void **state)
{
        uint8_t out[16];
        size_t len = 777;

        assert_int_equal(decode_str("+/+/", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("-_+_", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("-_-/", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("Zm9v.mFy", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("Zm9v\xc3\xa9", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(len, 777);
}

/* Every byte outside A-Z a-z 0-9 - _ is rejected, in every position of a quantum. */
static void test_rejects_every_byte_outside_alphabet(void **state)
{
        static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        unsigned accepted = 0;

        for (int c = 0; c < 256; c++) {
                bool valid = c != 0 && memchr(alphabet, c, sizeof alphabet - 1) != NULL;
                for (size_t pos = 0; pos < 4; pos++) {
                        char in[4] = { 'A', 'A', 'A', 'A' };
                        uint8_t out[3];
                        size_t len = 777;
                        int r;

                        in[pos] = (char)c;
                        r = ab_b64url_decode(in, sizeof in, out, sizeof out, &len);
                        if (valid) {
                                assert_int_equal(r, 0);
                                assert_int_equal(len, 3);
                        } else if (r != AB_ERR_INVALID) {
                                if (accepted++ < 4)
                                        print_error("byte 0x%02x at position %zu: %d (decoded as 0x%02x%02x%02x)\n",
                                                    c, pos, r, out[0], out[1], out[2]);
                        }
                }
        }
        assert_int_equal(accepted, 0);
}

static void test_rejects_whitespace(void **state)
{
        static const char *const bad[] = { " Zm9v", "Zm9v ", "Zm 9v", "Zm9v\n", "Zm\t9v", "Zm9v\r\nYmFy",
                                           "\nZm9vYmFy" };
        uint8_t out[16];
        size_t len = 777;

        for (size_t i = 0; i < AB_ARRAY_SIZE(bad); i++)
                assert_int_equal(decode_str(bad[i], out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(len, 777);
}

static void test_rejects_nul_inside(void **state)
{
        uint8_t out[16];
        size_t len = 777;

        assert_int_equal(ab_b64url_decode("Zm\0v", 4, out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(ab_b64url_decode("Zm9v\0\0\0\0", 8, out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(len, 777);
}

static void test_rejects_length_mod4_1(void **state)
{
        uint8_t out[16];
        size_t len = 777;

        assert_int_equal(decode_str("Z", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("Zm9vY", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("Zm9vYmFyZ", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(len, 777);
}

static void test_rejects_trailing_bits(void **state)
{
        uint8_t out[16];
        size_t len = 777;

        /* "f" is 0x66: Zg. Zh, Zi, ... Zv carry non-zero unused bits. */
        assert_int_equal(decode_str("Zg", out, sizeof out, &len), 0);
        assert_int_equal(len, 1);
        assert_int_equal(out[0], 'f');
        len = 777;
        assert_int_equal(decode_str("Zh", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("Zv", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("Z_", out, sizeof out, &len), AB_ERR_INVALID);
        /* "fo": Zm8 canonical; Zm9 sets a trailing bit. */
        assert_int_equal(decode_str("Zm9", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("Zm_", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(decode_str("Zm9vZh", out, sizeof out, &len), AB_ERR_INVALID);
        assert_int_equal(len, 777);
}

static void test_decode_output_too_small(void **state)
{
        uint8_t out[8];
        size_t len = 777;

        /* 6 bytes need 6: 5 is too small, 6 fits exactly */
        assert_int_equal(decode_str("Zm9vYmFy", out, 5, &len), AB_ERR_TOO_LARGE);
        assert_int_equal(len, 777);
        assert_int_equal(decode_str("Zm9vYmFy", out, 6, &len), 0);
        assert_int_equal(len, 6);
        assert_memory_equal(out, "foobar", 6);

        len = 777;
        assert_int_equal(decode_str("Zm9vYmE", out, 4, &len), AB_ERR_TOO_LARGE);
        assert_int_equal(decode_str("Zm9vYmE", out, 5, &len), 0);
        assert_int_equal(len, 5);

        len = 777;
        assert_int_equal(decode_str("Zg", out, 0, &len), AB_ERR_TOO_LARGE);
        assert_int_equal(decode_str("Zg", out, 1, &len), 0);
        assert_int_equal(len, 1);

        len = 777;
        assert_int_equal(decode_str("", out, 0, &len), 0);
        assert_int_equal(len, 0);
}

static void test_encode_output_too_small(void **state)
{
        char out[16];

        /* "foobar" -> 8 characters + NUL: 9 fits exactly, 8 does not */
        memset(out, 'X', sizeof out);
        assert_int_equal(ab_b64url_encode((const uint8_t *)"foobar", 6, out, 8), AB_ERR_TOO_LARGE);
        assert_int_equal(ab_b64url_encode((const uint8_t *)"foobar", 6, out, 9), 8);
        assert_string_equal(out, "Zm9vYmFy");

        memset(out, 'X', sizeof out);
        assert_int_equal(ab_b64url_encode((const uint8_t *)"fooba", 5, out, 7), AB_ERR_TOO_LARGE);
        assert_int_equal(ab_b64url_encode((const uint8_t *)"fooba", 5, out, 8), 7);
        assert_string_equal(out, "Zm9vYmE");

        assert_int_equal(ab_b64url_encode((const uint8_t *)"f", 1, out, 2), AB_ERR_TOO_LARGE);
        assert_int_equal(ab_b64url_encode((const uint8_t *)"f", 1, out, 3), 2);
        assert_string_equal(out, "Zg");

        /* empty input still needs room for the NUL */
        assert_int_equal(ab_b64url_encode((const uint8_t *)"", 0, out, 0), AB_ERR_TOO_LARGE);
        out[0] = 'X';
        assert_int_equal(ab_b64url_encode((const uint8_t *)"", 0, out, 1), 0);
        assert_int_equal(out[0], '\0');
}

/* Every length 0..300 with an output buffer of exactly ENCODED_LEN + 1 and one less. */
static void test_encode_exact_fit_all_lengths(void **state)
{
        uint8_t in[300];
        char out[402];

        memset(in, 0xa5, sizeof in);
        for (size_t n = 0; n <= 300; n++) {
                size_t need = AB_B64_ENCODED_LEN(n) + 1;
                out[need] = '#';
                assert_int_equal(ab_b64url_encode(in, n, out, need), (int)need - 1);
                assert_int_equal(out[need - 1], '\0');
                assert_int_equal(out[need], '#'); /* nothing written past outmax */
                assert_int_equal(ab_b64url_encode(in, n, out, need - 1), AB_ERR_TOO_LARGE);
        }
}

/* The 32-byte Ed25519 public key and 64-byte signature sizes JWS uses. */
static void test_key_and_signature_sizes(void **state)
{
        uint8_t pk[32], sig[64], back[64];
        char enc[100];
        size_t len = 0;

        memset(pk, 0xff, sizeof pk);
        memset(sig, 0xff, sizeof sig);
        assert_int_equal(ab_b64url_encode(pk, sizeof pk, enc, 44), 43);
        assert_int_equal(ab_b64url_encode(pk, sizeof pk, enc, 43), AB_ERR_TOO_LARGE);
        assert_int_equal(ab_b64url_encode(sig, sizeof sig, enc, 87), 86);
        assert_int_equal(ab_b64url_decode(enc, 86, back, 64, &len), 0);
        assert_int_equal(len, 64);
        assert_int_equal(ab_b64url_decode(enc, 86, back, 63, &len), AB_ERR_TOO_LARGE);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_rfc4648_encode),
                cmocka_unit_test(test_rfc4648_decode),
                cmocka_unit_test(test_urlsafe_alphabet),
                cmocka_unit_test(test_round_trip),
                cmocka_unit_test(test_rejects_padding),
                cmocka_unit_test(test_rejects_standard_alphabet),
                cmocka_unit_test(test_rejects_every_byte_outside_alphabet),
                cmocka_unit_test(test_rejects_whitespace),
                cmocka_unit_test(test_rejects_nul_inside),
                cmocka_unit_test(test_rejects_length_mod4_1),
                cmocka_unit_test(test_rejects_trailing_bits),
                cmocka_unit_test(test_decode_output_too_small),
                cmocka_unit_test(test_encode_output_too_small),
                cmocka_unit_test(test_encode_exact_fit_all_lengths),
                cmocka_unit_test(test_key_and_signature_sizes),
        };
        return cmocka_run_group_tests_name("b64", tests, NULL, NULL);
}
