/* SPDX-License-Identifier: MIT */
/*
 * Fuzz target: JWT parsing and verification. Any input that parses is
 * verified against a fixed key: nothing may verify unless it was signed by
 * that key (the fuzzer cannot forge Ed25519), and nothing may crash.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sodium.h>
#include "../../common/jwt.h"

#ifndef FUZZ_ENTRY
#define FUZZ_ENTRY LLVMFuzzerTestOneInput
#endif

int FUZZ_ENTRY(const uint8_t *data, size_t size);

int FUZZ_ENTRY(const uint8_t *data, size_t size)
{
        static uint8_t pk[crypto_sign_PUBLICKEYBYTES], sk[crypto_sign_SECRETKEYBYTES];
        static int ready;
        char *tok;
        ab_jwt j;

        if (!ready) {
                uint8_t seed[crypto_sign_SEEDBYTES] = { 1, 2, 3 };
                if (sodium_init() < 0)
                        abort();
                crypto_sign_seed_keypair(pk, sk, seed);
                ready = 1;
        }
        tok = malloc(size + 1);
        if (!tok)
                return 0;
        memcpy(tok, data, size);
        tok[size] = '\0';
        if (ab_jwt_parse(tok, size, &j) == 0) {
                if (ab_jwt_verify(&j, tok, pk) == 0 && !json_is_object(j.claims))
                        abort(); /* a verified token always has object claims */
                ab_jwt_done(&j);
        }
        free(tok);
        return 0;
}
