/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sodium.h>
#include "b64.h"
#include "jwt.h"
#include "varlink.h"

static int decode_json_part(const char *s, size_t n, size_t max, json_t **ret)
{
        uint8_t *buf;
        size_t len = 0;
        json_t *j;
        int r;

        buf = malloc(max);
        if (!buf)
                return -ENOMEM;
        r = ab_b64url_decode(s, n, buf, max, &len);
        if (r < 0) {
                free(buf);
                return r == AB_ERR_TOO_LARGE ? r : AB_ERR_INVALID;
        }
        j = json_loadb((const char *)buf, len, JSON_REJECT_DUPLICATES, NULL);
        free(buf);
        if (!json_is_object(j)) {
                json_decref(j);
                return AB_ERR_INVALID;
        }
        *ret = j;
        return 0;
}

int ab_jwt_parse(const char *tok, size_t len, ab_jwt *ret)
{
        const char *d1, *d2;
        ab_jwt j = { 0 };
        json_t *alg, *typ, *kid;
        size_t siglen = 0;
        int r;

        if (len > AB_JWT_MAX)
                return AB_ERR_TOO_LARGE;
        d1 = memchr(tok, '.', len);
        if (!d1)
                return AB_ERR_INVALID;
        d2 = memchr(d1 + 1, '.', len - (size_t)(d1 + 1 - tok));
        if (!d2 || memchr(d2 + 1, '.', len - (size_t)(d2 + 1 - tok)))
                return AB_ERR_INVALID;
        if (memchr(tok, '\0', len))
                return AB_ERR_INVALID;

        r = decode_json_part(tok, (size_t)(d1 - tok), AB_JWT_MAX_HEADER, &j.header);
        if (r < 0)
                return r;
        alg = json_object_get(j.header, "alg");
        if (!json_is_string(alg) || (strcmp(json_string_value(alg), "EdDSA") != 0 &&
                                     strcmp(json_string_value(alg), "Ed25519") != 0)) {
                r = AB_ERR_CRYPTO;
                goto fail;
        }
        r = AB_ERR_INVALID;
        typ = json_object_get(j.header, "typ");
        if (typ && (!json_is_string(typ) || (strcasecmp(json_string_value(typ), "at+jwt") != 0 &&
                                             strcasecmp(json_string_value(typ), "application/at+jwt") != 0)))
                goto fail;
        kid = json_object_get(j.header, "kid");
        if (!json_is_string(kid) || json_string_length(kid) == 0 || json_string_length(kid) > 128)
                goto fail;
        if (json_object_get(j.header, "crit"))
                goto fail;
        r = decode_json_part(d1 + 1, (size_t)(d2 - d1 - 1), AB_JWT_MAX, &j.claims);
        if (r < 0)
                goto fail;
        r = ab_b64url_decode(d2 + 1, len - (size_t)(d2 + 1 - tok), j.sig, sizeof j.sig, &siglen);
        if (r < 0 || siglen != AB_JWT_SIG_LEN) {
                r = AB_ERR_INVALID;
                goto fail;
        }
        j.kid = json_string_value(kid);
        j.signing_len = (size_t)(d2 - tok);
        *ret = j;
        return 0;
fail:
        ab_jwt_done(&j);
        return r;
}

int ab_jwt_verify(const ab_jwt *j, const char *tok, const uint8_t pk[AB_JWT_PK_LEN])
{
        if (crypto_sign_verify_detached(j->sig, (const unsigned char *)tok, j->signing_len, pk) != 0)
                return AB_ERR_CRYPTO;
        return 0;
}

void ab_jwt_done(ab_jwt *j)
{
        json_decref(j->header);
        json_decref(j->claims);
        *j = (ab_jwt){ 0 };
}

static int b64_json(const json_t *v, char *out, size_t outmax)
{
        char buf[AB_JWT_MAX];
        size_t n = ab_json_dumpb(v, buf, sizeof buf);

        if (n == 0)
                return -ENOMEM;
        if (n > sizeof buf)
                return AB_ERR_TOO_LARGE;
        return ab_b64url_encode((const uint8_t *)buf, n, out, outmax);
}

int ab_jwt_signing_input(const json_t *header, const json_t *claims, size_t extra,
                         char **ret_buf, size_t *ret_len)
{
        size_t cap = AB_JWT_MAX + 1;
        char *buf;
        int h, p;

        if (extra > AB_JWT_MAX)
                return AB_ERR_TOO_LARGE;
        buf = malloc(cap + extra);
        if (!buf)
                return -ENOMEM;
        h = b64_json(header, buf, cap);
        if (h < 0 || (size_t)h + 2 >= cap)
                goto too_large;
        buf[h] = '.';
        p = b64_json(claims, buf + h + 1, cap - (size_t)h - 1);
        if (p < 0)
                goto too_large;
        if ((size_t)h + 1 + (size_t)p + extra > AB_JWT_MAX)
                goto too_large;
        *ret_buf = buf;
        *ret_len = (size_t)h + 1 + (size_t)p;
        return 0;
too_large:
        free(buf);
        return (h == -ENOMEM) ? -ENOMEM : AB_ERR_TOO_LARGE;
}

int ab_jwk_thumbprint(const uint8_t pk[AB_JWT_PK_LEN], char out[44])
{
        char x[44], canon[128];
        uint8_t hash[crypto_hash_sha256_BYTES];
        int n;

        if (ab_b64url_encode(pk, AB_JWT_PK_LEN, x, sizeof x) < 0)
                return AB_ERR_INVALID;
        /* RFC 7638 section 3.2: required members, lexicographic order, no spaces. */
        n = snprintf(canon, sizeof canon, "{\"crv\":\"Ed25519\",\"kty\":\"OKP\",\"x\":\"%s\"}", x);
        crypto_hash_sha256(hash, (const unsigned char *)canon, (unsigned long long)n);
        return ab_b64url_encode(hash, sizeof hash, out, 44) < 0 ? AB_ERR_INVALID : 0;
}
