/* SPDX-License-Identifier: MIT */
#include <sodium.h>
#include "b64.h"
#include "util.h"

int ab_b64url_encode(const uint8_t *in, size_t n, char *out, size_t outmax)
{
        size_t need;

        if (n > (SIZE_MAX - 3) / 4 * 3)
                return AB_ERR_TOO_LARGE;
        need = sodium_base64_ENCODED_LEN(n, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
        if (outmax < need)
                return AB_ERR_TOO_LARGE;
        sodium_bin2base64(out, outmax, in, n, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
        return (int)AB_B64_ENCODED_LEN(n);
}

int ab_b64url_decode(const char *in, size_t n, uint8_t *out, size_t outmax, size_t *ret_len)
{
        size_t len = 0;
        const char *end = NULL;

        if (n % 4 == 1)
                return AB_ERR_INVALID;
        /* libsodium skips some bytes outside the alphabet; be strict. */
        for (size_t i = 0; i < n; i++) {
                unsigned char c = (unsigned char)in[i];
                if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                      (c >= '0' && c <= '9') || c == '-' || c == '_'))
                        return AB_ERR_INVALID;
        }
        if (n / 4 * 3 + (n % 4 ? n % 4 - 1 : 0) > outmax)
                return AB_ERR_TOO_LARGE;
        if (sodium_base642bin(out, outmax, in, n, NULL, &len, &end,
                              sodium_base64_VARIANT_URLSAFE_NO_PADDING) != 0)
                return AB_ERR_INVALID;
        if (end != in + n)
                return AB_ERR_INVALID;
        *ret_len = len;
        return 0;
}
