/* SPDX-License-Identifier: MIT */
/* base64url without padding (RFC 4648 section 5), as JWS uses it. */
#ifndef AB_B64_H
#define AB_B64_H

#include <stddef.h>
#include <stdint.h>

/* Characters needed to encode n bytes, without the NUL. */
#define AB_B64_ENCODED_LEN(n) (((n) / 3) * 4 + (((n) % 3) ? ((n) % 3) + 1 : 0))

/*
 * Encode in[0..n) into out, which has room for outmax bytes including the
 * NUL. Returns the encoded length, or AB_ERR_TOO_LARGE if out is too small.
 */
int ab_b64url_encode(const uint8_t *in, size_t n, char *out, size_t outmax);

/*
 * Decode in[0..n) into out (room for outmax bytes). Strict: no padding,
 * no whitespace, no other alphabet, unused trailing bits must be zero.
 * On success stores the decoded length in *ret_len and returns 0; returns
 * AB_ERR_INVALID for malformed input, AB_ERR_TOO_LARGE if out is too small.
 */
int ab_b64url_decode(const char *in, size_t n, uint8_t *out, size_t outmax, size_t *ret_len);

#endif
