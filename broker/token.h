/* SPDX-License-Identifier: MIT */
/*
 * The broker's signing key and the tokens it signs. This is the only file
 * that touches the secret key.
 */
#ifndef AB_TOKEN_H
#define AB_TOKEN_H

#include <stdbool.h>
#include <stdint.h>
#include <jansson.h>
#include "../common/jwt.h"

#define AB_KEY_FILE "signing.key"
#define AB_JTI_LEN 22 /* base64url of 16 random bytes */
/* Retired public keys the broker keeps in memory (all stay in the store): for the JWKS while in
 * their overlap, for ListKeys (audit checkpoints) after it. 256 fit ListKeys' 64 KiB reply. */
#define AB_MAX_RETIRED_KEYS 256

typedef struct ab_signer ab_signer;

/*
 * Load the Ed25519 key from AB_KEY_FILE in the directory dirfd, creating it
 * (mode 0600, written to a temporary file, fsynced, renamed) when absent.
 * A key file that is not a regular file owned by us with mode 0600 or
 * stricter, or of the wrong size, is refused. Returns 0, AB_ERR_CRYPTO
 * (bad key file), -errno. *ret_created says whether a key was made.
 */
int ab_signer_open(int dirfd, const char *issuer, ab_signer **ret, bool *ret_created);
void ab_signer_free(ab_signer *s);

const char *ab_signer_kid(const ab_signer *s);
const char *ab_signer_issuer(const ab_signer *s);
const uint8_t *ab_signer_public_key(const ab_signer *s);

/*
 * Retired keys are judged at now (wall-clock seconds); a key found ended
 * stays ended while the broker runs, so a clock stepped back does not
 * bring it back, and one ended at once by a forced rotation (an end not
 * after its retirement) stays ended after a restart too.
 */

/* The JWKS: {"keys":[{"kty":"OKP","crv":"Ed25519","x":..,"kid":..,"alg":"EdDSA","use":"sig"}]}. */
json_t *ab_signer_jwks(const ab_signer *s, int64_t now);

/*
 * Sign claims (an object; "iss" is set here) as a compact JWS with header
 * {"alg":"EdDSA","typ":"at+jwt","kid":...}. Returns 0, AB_ERR_TOO_LARGE,
 * -ENOMEM; *ret_token is malloc'd.
 */
int ab_token_sign(const ab_signer *s, json_t *claims, char **ret_token, size_t *ret_len);

/*
 * ab_token_sign in two halves, so that the signature can be made on
 * another thread: ab_token_prepare builds the signing input (header with
 * the current kid, claims with "iss") into a new buffer with room for the
 * signature: 0, AB_ERR_TOO_LARGE, -ENOMEM. ab_token_finish, in any thread,
 * signs it in place and returns the length of the compact token; the key
 * must not be rotated in between (the kid is already in the header).
 */
int ab_token_prepare(const ab_signer *s, json_t *claims, char **ret_buf, size_t *ret_len);
size_t ab_token_finish(const ab_signer *s, char *buf, size_t len);
/* A detached Ed25519 signature of data with the broker key (audit checkpoints). */
void ab_signer_sign(const ab_signer *s, const void *data, size_t len, uint8_t sig[64]);

/* A fresh random 128-bit identifier, base64url (jti, sid). */
void ab_random_id(char out[AB_JTI_LEN + 1]);

/* Every key: current, retiring (still in the JWKS) and retired, with times (admin view). */
json_t *ab_signer_all_keys(const ab_signer *s, int64_t now);
/* Remember an earlier public key, valid for verification until `until`. */
int ab_signer_add_retired(ab_signer *s, const uint8_t pk[32], int64_t retired_at, int64_t until);
/* fn is called when an earlier key is first found ended that the store does not say ended. */
void ab_signer_on_end(ab_signer *s, void (*fn)(void *userdata), void *userdata);
/* Whether earlier key kid is known and ended. */
bool ab_signer_key_ended(const ab_signer *s, const char *kid);
/* Earlier key kid ended for good, and the store says so. */
void ab_signer_end_key(ab_signer *s, const char *kid);
/* No earlier key verifies past until (a rotation's overlap ends them all; until <= now: at once, for good). */
void ab_signer_cap_retired(ab_signer *s, int64_t until, int64_t now);
/* Replace the signing key with a new one (written to AB_KEY_FILE atomically). */
int ab_signer_rotate(ab_signer *s, int dirfd);

/* Public key of kid (current, or retired and still valid), or NULL if this broker does not know it. */
const uint8_t *ab_signer_find_key(const ab_signer *s, const char *kid, int64_t now);

#endif
