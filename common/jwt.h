/* SPDX-License-Identifier: MIT */
/*
 * Compact JWS (RFC 7515) with Ed25519 (RFC 8037): parsing, verifying, and
 * building the signing input. Only "EdDSA" and "Ed25519" (RFC 9864) are
 * accepted as alg; anything else (none, HS256, RS256, ...) is rejected
 * before any key is looked at.
 */
#ifndef AB_JWT_H
#define AB_JWT_H

#include <stddef.h>
#include <stdint.h>
#include <jansson.h>
#include "util.h"

#define AB_JWT_MAX 8192        /* largest compact token accepted */
#define AB_JWT_MAX_HEADER 1024 /* decoded header bytes */
#define AB_JWT_SIG_LEN 64
#define AB_JWT_PK_LEN 32

typedef struct ab_jwt {
        json_t *header;       /* decoded JOSE header, an object */
        json_t *claims;       /* decoded payload, an object */
        const char *kid;      /* header "kid", owned by header */
        size_t signing_len;   /* length of "header.payload" */
        uint8_t sig[AB_JWT_SIG_LEN];
} ab_jwt;

/*
 * Parse tok[0..len). Checks structure (three base64url parts), size limits,
 * JSON objects without duplicate keys, alg EdDSA/Ed25519, a string kid, no
 * "crit", typ absent or "at+jwt"/"application/at+jwt", a 64-byte
 * signature. Does not verify. Returns 0, AB_ERR_TOO_LARGE, AB_ERR_INVALID
 * (malformed), AB_ERR_CRYPTO (unsupported alg), -ENOMEM.
 * On success the caller calls ab_jwt_done(ret).
 */
int ab_jwt_parse(const char *tok, size_t len, ab_jwt *ret) AB_WUR;

/* Verify the signature of a parsed token against tok. 0 or AB_ERR_CRYPTO. */
int ab_jwt_verify(const ab_jwt *j, const char *tok, const uint8_t pk[AB_JWT_PK_LEN]) AB_WUR;

void ab_jwt_done(ab_jwt *j);

/*
 * Build "b64(header).b64(claims)" into a new buffer with room for
 * extra more bytes; *ret_len is the length written (NUL-terminated).
 * Returns 0, AB_ERR_TOO_LARGE (over AB_JWT_MAX), -ENOMEM.
 */
int ab_jwt_signing_input(const json_t *header, const json_t *claims, size_t extra,
                         char **ret_buf, size_t *ret_len);

/*
 * The RFC 7638 JWK thumbprint of an Ed25519 public key, base64url
 * (43 characters + NUL), used as kid.
 */
int ab_jwk_thumbprint(const uint8_t pk[AB_JWT_PK_LEN], char out[44]);

#endif
