/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <sodium.h>
#include "token.h"
#include "../common/b64.h"

typedef struct retired {
        uint8_t pk[crypto_sign_PUBLICKEYBYTES];
        char kid[44];
        int64_t retired_at, until;
        bool ended;     /* for good: see key_valid */
        bool end_known; /* ... and the store says so, which a restart keeps */
} retired;

struct ab_signer {
        uint8_t *sk; /* sodium_malloc'd: guarded, locked, wiped on free */
        uint8_t pk[crypto_sign_PUBLICKEYBYTES];
        char kid[44];
        char *issuer;
        json_t *header;
        retired old[AB_MAX_RETIRED_KEYS]; /* earlier keys, newest first */
        size_t n_old;
        void (*on_end)(void *userdata); /* a key ended that the store does not know ended */
        void *on_end_userdata;
};

static int write_all(int fd, const uint8_t *p, size_t n)
{
        while (n > 0) {
                ssize_t w = write(fd, p, n);
                if (w < 0 && errno == EINTR)
                        continue;
                if (w < 0)
                        return -errno;
                p += w;
                n -= (size_t)w;
        }
        return 0;
}

static int create_key(int dirfd, uint8_t seed[crypto_sign_SEEDBYTES])
{
        char tmp[64];
        int fd, r;

        randombytes_buf(seed, crypto_sign_SEEDBYTES);
        snprintf(tmp, sizeof tmp, ".%s.%ld.tmp", AB_KEY_FILE, (long)getpid());
        fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0)
                return -errno;
        r = write_all(fd, seed, crypto_sign_SEEDBYTES);
        if (r == 0 && fsync(fd) < 0)
                r = -errno;
        close(fd);
        if (r == 0 && renameat(dirfd, tmp, dirfd, AB_KEY_FILE) < 0)
                r = -errno;
        if (r < 0) {
                unlinkat(dirfd, tmp, 0);
                return r;
        }
        if (fsync(dirfd) < 0)
                return -errno;
        return 0;
}

static int read_key(int dirfd, uint8_t seed[crypto_sign_SEEDBYTES])
{
        struct stat st;
        ssize_t n;
        int fd, r = 0;

        fd = openat(dirfd, AB_KEY_FILE, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                r = -errno;
        else if (!S_ISREG(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077) != 0 ||
                 st.st_size != crypto_sign_SEEDBYTES)
                r = AB_ERR_CRYPTO;
        if (r == 0) {
                n = read(fd, seed, crypto_sign_SEEDBYTES);
                if (n != crypto_sign_SEEDBYTES)
                        r = AB_ERR_CRYPTO;
        }
        close(fd);
        return r;
}

int ab_signer_open(int dirfd, const char *issuer, ab_signer **ret, bool *ret_created)
{
        uint8_t seed[crypto_sign_SEEDBYTES];
        ab_signer *s;
        bool created = false;
        int r;

        s = calloc(1, sizeof *s);
        if (!s)
                return -ENOMEM;
        s->sk = sodium_malloc(crypto_sign_SECRETKEYBYTES);
        s->issuer = strdup(issuer);
        if (!s->sk || !s->issuer) {
                r = -ENOMEM;
                goto fail;
        }
        r = read_key(dirfd, seed);
        if (r == -ENOENT) {
                r = create_key(dirfd, seed);
                created = r == 0;
        }
        if (r < 0)
                goto fail;
        crypto_sign_seed_keypair(s->pk, s->sk, seed);
        sodium_memzero(seed, sizeof seed);
        sodium_mprotect_readonly(s->sk);
        r = ab_jwk_thumbprint(s->pk, s->kid);
        if (r < 0)
                goto fail;
        s->header = json_pack("{s:s, s:s, s:s}", "alg", "EdDSA", "typ", "at+jwt", "kid", s->kid);
        if (!s->header) {
                r = -ENOMEM;
                goto fail;
        }
        *ret = s;
        if (ret_created)
                *ret_created = created;
        return 0;
fail:
        sodium_memzero(seed, sizeof seed);
        ab_signer_free(s);
        return r;
}

void ab_signer_free(ab_signer *s)
{
        if (!s)
                return;
        sodium_free(s->sk); /* wipes */
        free(s->issuer);
        json_decref(s->header);
        free(s);
}

const char *ab_signer_kid(const ab_signer *s) { return s->kid; }
const char *ab_signer_issuer(const ab_signer *s) { return s->issuer; }
const uint8_t *ab_signer_public_key(const ab_signer *s) { return s->pk; }

/*
 * Whether retired key i still verifies at now. Once it has ended it stays
 * ended: a clock stepped back brought a key ended by `keys rotate
 * --overlap 0 --force` back for as long as it stood behind the end
 * (helper-43). A key whose end is not after its retirement was ended at
 * once (forced, or capped by a forced rotation: ab_manager_rotate_key
 * stores it so), which a restart keeps. A key whose overlap ran out tells
 * on_end, and the broker stores that it ended, which a restart keeps too:
 * before, a restart with the clock behind the end brought it back
 * (helper-48). Each key latches on its own: one moment of a clock running
 * ahead ends the overlaps running then, not those of later rotations
 * (helper-46). Called on the event loop only.
 */
static bool key_valid(const ab_signer *cs, size_t i, int64_t now)
{
        ab_signer *s = (ab_signer *)cs; /* only the latch changes; never a const object */
        retired *r = &s->old[i];

        if (!r->ended && (r->until <= r->retired_at || now >= r->until)) {
                r->ended = true;
                if (!r->end_known && s->on_end)
                        s->on_end(s->on_end_userdata);
        }
        return !r->ended;
}

void ab_signer_on_end(ab_signer *s, void (*fn)(void *userdata), void *userdata)
{
        s->on_end = fn;
        s->on_end_userdata = userdata;
}

bool ab_signer_key_ended(const ab_signer *s, const char *kid)
{
        for (size_t i = 0; i < s->n_old; i++)
                if (strcmp(kid, s->old[i].kid) == 0)
                        return s->old[i].ended;
        return false;
}

void ab_signer_end_key(ab_signer *s, const char *kid)
{
        for (size_t i = 0; i < s->n_old; i++)
                if (strcmp(kid, s->old[i].kid) == 0)
                        s->old[i].ended = s->old[i].end_known = true;
}

const uint8_t *ab_signer_find_key(const ab_signer *s, const char *kid, int64_t now)
{
        if (!kid)
                return NULL;
        if (strcmp(kid, s->kid) == 0)
                return s->pk;
        for (size_t i = 0; i < s->n_old; i++)
                if (strcmp(kid, s->old[i].kid) == 0 && key_valid(s, i, now))
                        return s->old[i].pk;
        return NULL;
}

static json_t *jwk(const uint8_t pk[32], const char *kid)
{
        char x[44];
        if (ab_b64url_encode(pk, 32, x, sizeof x) < 0)
                return NULL;
        return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "kty", "OKP", "crv", "Ed25519", "x", x, "kid", kid, "alg",
                         "EdDSA", "use", "sig");
}

json_t *ab_signer_jwks(const ab_signer *s, int64_t now)
{
        json_t *keys = json_array();
        if (!keys)
                return NULL;
        json_array_append_new(keys, jwk(s->pk, s->kid));
        for (size_t i = 0; i < s->n_old; i++)
                if (key_valid(s, i, now))
                        json_array_append_new(keys, jwk(s->old[i].pk, s->old[i].kid));
        /* whose keys these are: a verifier that merges the sets of several hosts keeps each key
         * to its own issuer's tokens (RFC 7517 5: members a reader does not know are ignored) */
        return json_pack("{s:o, s:s}", "keys", keys, "issuer", s->issuer);
}

json_t *ab_signer_all_keys(const ab_signer *s, int64_t now)
{
        json_t *keys = json_array(), *k;
        if (!keys)
                return NULL;
        k = jwk(s->pk, s->kid);
        if (k)
                json_object_set_new(k, "status", json_string("current"));
        json_array_append_new(keys, k);
        for (size_t i = 0; i < s->n_old; i++) {
                k = jwk(s->old[i].pk, s->old[i].kid);
                if (!k)
                        continue;
                json_object_set_new(k, "status", json_string(key_valid(s, i, now) ? "retiring" : "retired"));
                json_object_set_new(k, "retired_at", json_integer(s->old[i].retired_at));
                json_object_set_new(k, "valid_until", json_integer(s->old[i].until));
                json_array_append_new(keys, k);
        }
        return json_pack("{s:o}", "keys", keys);
}

int ab_signer_add_retired(ab_signer *s, const uint8_t pk[32], int64_t retired_at, int64_t until)
{
        retired r = { .retired_at = retired_at, .until = until };
        size_t i;

        r.ended = r.end_known = until <= retired_at;
        memcpy(r.pk, pk, 32);
        if (ab_jwk_thumbprint(pk, r.kid) < 0)
                return -EINVAL;
        if (strcmp(r.kid, s->kid) == 0)
                return 0;
        for (i = 0; i < s->n_old; i++)
                if (strcmp(s->old[i].kid, r.kid) == 0)
                        return 0;
        /* Full: the key that stopped verifying longest ago goes (never one still in its overlap
         * while an expired one is there; with every one in its overlap, the soonest to end). */
        if (s->n_old == AB_MAX_RETIRED_KEYS) {
                size_t drop = 0;
                for (i = 1; i < s->n_old; i++)
                        if (s->old[i].until < s->old[drop].until)
                                drop = i;
                if (s->old[drop].until > until)
                        return 0; /* the new one would go first: keep the list as it is */
                memmove(&s->old[drop], &s->old[drop + 1], (s->n_old - drop - 1) * sizeof s->old[0]);
                s->n_old--;
        }
        /* newest first (a key retired in the same second as others goes before them) */
        for (i = 0; i < s->n_old && s->old[i].retired_at > retired_at; i++)
                ;
        memmove(&s->old[i + 1], &s->old[i], (s->n_old - i) * sizeof s->old[0]);
        s->old[i] = r;
        s->n_old++;
        return 0;
}

void ab_signer_cap_retired(ab_signer *s, int64_t until, int64_t now)
{
        for (size_t i = 0; i < s->n_old; i++) {
                if (s->old[i].until > until)
                        s->old[i].until = until;
                if (until <= now) /* stored as ended: see ab_manager_rotate_key */
                        s->old[i].ended = s->old[i].end_known = true;
        }
}

int ab_signer_rotate(ab_signer *s, int dirfd)
{
        uint8_t seed[crypto_sign_SEEDBYTES], pk[crypto_sign_PUBLICKEYBYTES];
        char kid[44];
        json_t *header;
        int r = create_key(dirfd, seed);

        if (r < 0) {
                sodium_memzero(seed, sizeof seed);
                return r;
        }
        sodium_mprotect_readwrite(s->sk);
        crypto_sign_seed_keypair(pk, s->sk, seed);
        sodium_mprotect_readonly(s->sk);
        sodium_memzero(seed, sizeof seed);
        memcpy(s->pk, pk, sizeof pk);
        if (ab_jwk_thumbprint(pk, kid) < 0)
                return -EINVAL;
        memcpy(s->kid, kid, sizeof kid);
        header = json_pack("{s:s, s:s, s:s}", "alg", "EdDSA", "typ", "at+jwt", "kid", s->kid);
        if (!header)
                return -ENOMEM;
        json_decref(s->header);
        s->header = header;
        return 0;
}

void ab_random_id(char out[AB_JTI_LEN + 1])
{
        uint8_t raw[16];
        randombytes_buf(raw, sizeof raw);
        (void)ab_b64url_encode(raw, sizeof raw, out, AB_JTI_LEN + 1);
}

int ab_token_prepare(const ab_signer *s, json_t *claims, char **ret_buf, size_t *ret_len)
{
        if (json_object_set_new(claims, "iss", json_string(s->issuer)) < 0)
                return -ENOMEM;
        /* room for '.', 86 signature characters and the NUL */
        return ab_jwt_signing_input(s->header, claims, 1 + AB_B64_ENCODED_LEN(crypto_sign_BYTES) + 1, ret_buf,
                                    ret_len);
}

size_t ab_token_finish(const ab_signer *s, char *buf, size_t len)
{
        uint8_t sig[crypto_sign_BYTES];
        int r;

        crypto_sign_detached(sig, NULL, (const unsigned char *)buf, len, s->sk);
        buf[len++] = '.';
        /* the room was made by ab_token_prepare: this cannot fail */
        r = ab_b64url_encode(sig, sizeof sig, buf + len, AB_B64_ENCODED_LEN(crypto_sign_BYTES) + 1);
        return len + (size_t)(r > 0 ? r : 0);
}

int ab_token_sign(const ab_signer *s, json_t *claims, char **ret_token, size_t *ret_len)
{
        char *buf = NULL;
        size_t len = 0;
        int r = ab_token_prepare(s, claims, &buf, &len);

        if (r < 0)
                return r;
        *ret_len = ab_token_finish(s, buf, len);
        *ret_token = buf;
        return 0;
}

void ab_signer_sign(const ab_signer *s, const void *data, size_t len, uint8_t sig[64])
{
        crypto_sign_detached(sig, NULL, data, len, s->sk);
}
