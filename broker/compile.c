/* SPDX-License-Identifier: MIT */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sodium.h>
#include "compile.h"
#include "log.h"
#include "../common/util.h"

#define MAX_SOURCES 1024

typedef struct source {
        char *path;
        const char *name; /* basename, the key in the store */
        char *text;
        size_t len;
        char sha256[65];
        char signer[17];
        bool signed_ok;
        json_int_t version;
        char replaces[65]; /* the content compiled before under this name, if other: superseded now */
        json_int_t replaces_version;
} source;

#define SUPERSEDED_PREFIX "superseded:"

/*
 * Whether content (its SHA-256) was once replaced by a newer version under
 * its own name. The version floor is kept per name, and a signature covers
 * the content only: without this, an old signed bundle copied in under
 * another name (the newer one removed) would be taken. 1 (and its version)
 * if so, 0 if not.
 */
static int was_superseded(ab_txn *t, const char sha[65], json_int_t *ret_version)
{
        char key[sizeof SUPERSEDED_PREFIX + 64];
        const void *v;
        size_t vl;
        int r;

        snprintf(key, sizeof key, SUPERSEDED_PREFIX "%s", sha);
        r = ab_txn_get(t, AB_DB_META, key, strlen(key), &v, &vl);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return r;
        *ret_version = vl == 8 ? (json_int_t)get_be64(v) : 0;
        return 1;
}

static void src_free(source *s, size_t n)
{
        for (size_t i = 0; i < n; i++) {
                free(s[i].path);
                free(s[i].text);
        }
        free(s);
}

static int cmp_src(const void *a, const void *b)
{
        return strcmp(((const source *)a)->name, ((const source *)b)->name);
}

/* List the sources: the file itself, or *.json in the directory. */
static int list_sources(const char *path, source **ret, size_t *ret_n)
{
        struct stat st;
        source *s = NULL;
        size_t n = 0;
        DIR *d;
        struct dirent *de;

        if (stat(path, &st) < 0)
                return -errno;
        if (!S_ISDIR(st.st_mode)) {
                s = calloc(1, sizeof *s);
                if (!s || !(s->path = strdup(path))) {
                        free(s);
                        return -ENOMEM;
                }
                s->name = strrchr(s->path, '/') ? strrchr(s->path, '/') + 1 : s->path;
                *ret = s;
                *ret_n = 1;
                return 0;
        }
        d = ab_opendir_trusted(path); /* EPERM: another user could add, replace or remove sources */
        if (!d)
                return -errno;
        s = calloc(MAX_SOURCES, sizeof *s);
        if (!s) {
                closedir(d);
                return -ENOMEM;
        }
        while ((de = readdir(d))) {
                size_t l = strlen(de->d_name);
                if (de->d_name[0] == '.' || l < 6 || strcmp(de->d_name + l - 5, ".json") != 0)
                        continue;
                if (n == MAX_SOURCES || asprintf(&s[n].path, "%s/%s", path, de->d_name) < 0) {
                        closedir(d);
                        src_free(s, n);
                        return n == MAX_SOURCES ? AB_ERR_TOO_LARGE : -ENOMEM;
                }
                s[n].name = s[n].path + strlen(path) + 1;
                n++;
        }
        closedir(d);
        qsort(s, n, sizeof *s, cmp_src);
        *ret = s;
        *ret_n = n;
        return 0;
}

/* Printable UTF-8 (no control characters): what JSON, logs and the store can carry. */
static bool printable_utf8(const char *s)
{
        json_t *j;

        for (const char *q = s; *q; q++)
                if (ab_control_len(q))
                        return false;
        j = json_string(s); /* NULL: not valid UTF-8 */
        if (!j)
                return false;
        json_decref(j);
        return true;
}

/* s with every byte outside printable ASCII replaced by '?'. */
static void ascii_copy(const char *s, char *out, size_t outmax)
{
        size_t i = 0;

        for (; *s && i + 1 < outmax; s++)
                out[i++] = *s >= 0x20 && *s < 0x7f ? *s : '?';
        out[i] = '\0';
}

static int decode_b64_file(const char *path, uint8_t *out, size_t want)
{
        char *text = NULL;
        size_t len = 0, got = 0;
        const char *end = NULL;
        int r = ab_read_trusted_file(path, 4096, &text, &len);

        if (r < 0)
                return r;
        r = sodium_base642bin(out, want, text, len, " \t\r\n", &got, &end, sodium_base64_VARIANT_ORIGINAL);
        if (r != 0 || got != want || (end && *end))
                r = AB_ERR_CRYPTO;
        free(text);
        return r;
}

int ab_verify_detached(const char *trusted_keys_dir, const char *sig_path, const void *data, size_t len,
                       char ret_signer[17])
{
        uint8_t sig[crypto_sign_BYTES];
        DIR *d;
        struct dirent *de;
        int r, tried = 0;

        r = decode_b64_file(sig_path, sig, sizeof sig);
        if (r < 0)
                return r == -ENOENT ? -ENOENT : AB_ERR_CRYPTO;
        d = trusted_keys_dir ? ab_opendir_trusted(trusted_keys_dir) : NULL;
        if (!d) {
                if (trusted_keys_dir && errno == EPERM)
                        ab_log(LOG_WARNING, "trusted keys directory %s is owned by another user or writable by "
                               "others: no key in it is trusted", trusted_keys_dir);
                return AB_ERR_CRYPTO;
        }
        r = AB_ERR_CRYPTO;
        while ((de = readdir(d)) && tried < AB_MAX_TRUSTED_KEYS) {
                uint8_t pk[crypto_sign_PUBLICKEYBYTES], h[crypto_hash_sha256_BYTES];
                size_t l = strlen(de->d_name);
                char *p;
                if (de->d_name[0] == '.' || l < 5 || strcmp(de->d_name + l - 4, ".pub") != 0)
                        continue;
                if (asprintf(&p, "%s/%s", trusted_keys_dir, de->d_name) < 0)
                        break;
                tried++;
                int kr = decode_b64_file(p, pk, sizeof pk);
                if (kr == -EPERM)
                        ab_log(LOG_WARNING, "trusted key %s is owned by another user or writable by others: ignored",
                               p);
                if (kr == 0 && crypto_sign_verify_detached(sig, data, len, pk) == 0) {
                        crypto_hash_sha256(h, pk, sizeof pk);
                        sodium_bin2hex(ret_signer, 17, h, 8);
                        r = 0;
                }
                free(p);
                if (r == 0)
                        break;
        }
        closedir(d);
        return r;
}

/* The highest version ever compiled for a source, and its content hash. */
static int high_water(ab_txn *t, const char *name, json_int_t *ret_version, char ret_sha[65])
{
        char key[320];
        const void *v;
        size_t vl;
        json_t *j;
        int r;

        *ret_version = 0;
        ret_sha[0] = '\0';
        snprintf(key, sizeof key, "version:%s", name);
        r = ab_txn_get(t, AB_DB_META, key, strlen(key), &v, &vl);
        if (r == -ENOENT)
                return 0;
        if (r < 0)
                return r;
        j = json_loadb(v, vl, 0, NULL);
        if (!json_is_object(j)) {
                json_decref(j);
                return AB_ERR_STORE;
        }
        *ret_version = json_integer_value(json_object_get(j, "version"));
        snprintf(ret_sha, 65, "%s", json_string_value(json_object_get(j, "sha256")) ?: "");
        json_decref(j);
        return 0;
}

static void sha256_hex(const void *data, size_t len, char out[65])
{
        uint8_t h[crypto_hash_sha256_BYTES];
        crypto_hash_sha256(h, data, len);
        sodium_bin2hex(out, 65, h, sizeof h);
}

int ab_policy_fingerprint(const char *policy_path, char out[65])
{
        crypto_hash_sha256_state h;
        uint8_t d[crypto_hash_sha256_BYTES];
        source *s = NULL;
        size_t n = 0;
        int r = list_sources(policy_path, &s, &n);

        if (r < 0)
                return r;
        crypto_hash_sha256_init(&h);
        for (size_t i = 0; i < n; i++) {
                for (int pass = 0; pass < 2; pass++) {
                        char line[8192], sig[4200];
                        struct stat st;
                        const char *p = s[i].path;
                        if (pass == 1) {
                                snprintf(sig, sizeof sig, "%s.sig", s[i].path);
                                p = sig;
                        }
                        if (stat(p, &st) < 0)
                                memset(&st, 0, sizeof st);
                        snprintf(line, sizeof line, "%s|%lld|%lld.%09ld|%llu\n", p, (long long)st.st_size,
                                 (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec, (unsigned long long)st.st_ino);
                        crypto_hash_sha256_update(&h, (const uint8_t *)line, strlen(line));
                }
        }
        crypto_hash_sha256_final(&h, d);
        sodium_bin2hex(out, 65, d, sizeof d);
        src_free(s, n);
        return (int)n;
}

void ab_policy_stored_fingerprint(ab_store *st, char out[65])
{
        ab_txn *t = NULL;
        const void *v;
        size_t vl;

        out[0] = '\0';
        if (ab_store_begin(st, false, &t) < 0)
                return;
        if (ab_txn_get(t, AB_DB_META, "policy_fingerprint", 18, &v, &vl) == 0 && vl == 64) {
                memcpy(out, v, 64);
                out[64] = '\0';
        }
        ab_txn_abort(t);
}

/* Delete every key of the policy db (sources no longer present go away). */
static int collect_key(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        json_t *arr = ud;
        (void)val;
        (void)vlen;
        return json_array_append_new(arr, json_stringn_nocheck(key, klen)) < 0 ? -ENOMEM : 0;
}

int ab_policy_compile(ab_store *st, const ab_compile_opts *o, ab_diag *diag, ab_policy **ret, char *reason,
                      size_t reasonmax)
{
        source *s = NULL;
        size_t n = 0, i;
        ab_policy *p = NULL;
        ab_txn *t = NULL;
        json_t *old_keys = NULL;
        char fp[65];
        int r;

        reason[0] = '\0';
        r = list_sources(o->policy_path, &s, &n);
        if (r < 0) {
                snprintf(reason, reasonmax, "cannot list policy sources in %s: %s", o->policy_path,
                         r == -EPERM ? "the directory is owned by another user or writable by others" : ab_strerror(r));
                return r == AB_ERR_TOO_LARGE ? r : AB_ERR_POLICY;
        }
        r = ab_policy_fingerprint(o->policy_path, fp);
        if (r < 0)
                goto out;
        r = ab_policy_new(&p);
        if (r < 0)
                goto out;
        r = ab_store_begin(st, true, &t);
        if (r < 0) {
                snprintf(reason, reasonmax, "cannot write the policy store: %s", ab_strerror(r));
                goto out;
        }
        for (i = 0; i < n; i++) {
                char sigpath[4200], hw_sha[65];
                json_int_t hw = 0;
                json_t *doc;

                if (!printable_utf8(s[i].path)) {
                        /* it could not be named in a reply, a log line or the store */
                        char msg[160];
                        snprintf(msg, sizeof msg, "the file name is not printable UTF-8 (shown with '?'); rename it");
                        ascii_copy(s[i].path, sigpath, sizeof sigpath);
                        if (diag->emit)
                                diag->emit(diag->userdata, AB_DIAG_ERROR, sigpath, "$", msg);
                        diag->errors++;
                        snprintf(reason, reasonmax, "%s: %s", sigpath, msg);
                        r = AB_ERR_POLICY;
                        goto out;
                }
                r = ab_read_trusted_file(s[i].path, AB_POLICY_MAX_FILE, &s[i].text, &s[i].len);
                if (r < 0) {
                        snprintf(reason, reasonmax, "%s: %s", s[i].path,
                                 r == -EPERM ? "owned by another user or writable by others (it decides what agents "
                                               "get): refused"
                                             : ab_strerror(r));
                        r = r == AB_ERR_TOO_LARGE ? r : AB_ERR_POLICY;
                        goto out;
                }
                sha256_hex(s[i].text, s[i].len, s[i].sha256);
                snprintf(sigpath, sizeof sigpath, "%s.sig", s[i].path);
                r = ab_verify_detached(o->trusted_keys_dir, sigpath, s[i].text, s[i].len, s[i].signer);
                if (r == 0) {
                        s[i].signed_ok = true;
                } else if (r != -ENOENT || o->require_signed) {
                        snprintf(reason, reasonmax, "%s: %s", s[i].path,
                                 r == -ENOENT ? "unsigned, and require_signed is set"
                                              : "signature does not verify with any trusted key");
                        r = AB_ERR_CRYPTO;
                        goto out;
                }
                r = ab_policy_add_document(p, s[i].path, s[i].text, s[i].len, diag);
                if (r < 0) {
                        snprintf(reason, reasonmax, "%s: invalid policy (%u errors)", s[i].path, diag->errors);
                        goto out;
                }
                /* version was validated by ab_policy_add_document */
                doc = json_loadb(s[i].text, s[i].len, 0, NULL);
                s[i].version = json_integer_value(json_object_get(doc, "version"));
                json_decref(doc);
                r = high_water(t, s[i].name, &hw, hw_sha);
                if (r < 0)
                        goto out;
                if (s[i].version < hw || (s[i].version == hw && s[i].signed_ok && strcmp(hw_sha, s[i].sha256) != 0)) {
                        snprintf(reason, reasonmax,
                                 "%s: version %lld would replace version %lld%s: rollback refused", s[i].path,
                                 (long long)s[i].version, (long long)hw,
                                 s[i].version == hw ? " with different content" : "");
                        r = -ESTALE;
                        goto out;
                }
                /* only a newer version supersedes: an unsigned source edited (or an edit reverted)
                 * under the same version replaces nothing for good */
                if (hw_sha[0] && s[i].version > hw) {
                        memcpy(s[i].replaces, hw_sha, sizeof s[i].replaces);
                        s[i].replaces_version = hw;
                }
                json_int_t sv = 0;
                r = was_superseded(t, s[i].sha256, &sv);
                if (r < 0)
                        goto out;
                if (r > 0) {
                        snprintf(reason, reasonmax,
                                 "%s: this content (version %lld) was once replaced by a newer version under its "
                                 "own name: rollback refused (deploy it with a higher version)",
                                 s[i].path, (long long)sv);
                        r = -ESTALE;
                        goto out;
                }
        }

        /* All good: replace the compiled sources in one transaction. */
        old_keys = json_array();
        if (!old_keys) {
                r = -ENOMEM;
                goto out;
        }
        r = ab_txn_foreach(t, AB_DB_POLICY, NULL, 0, collect_key, old_keys);
        for (size_t k = 0; r == 0 && k < json_array_size(old_keys); k++) {
                json_t *key = json_array_get(old_keys, k);
                r = ab_txn_del(t, AB_DB_POLICY, json_string_value(key), json_string_length(key));
        }
        for (i = 0; r == 0 && i < n; i++) {
                char key[320], *rec;
                json_t *j = json_pack("{s:I, s:s, s:s?, s:s, s:I, s:s%}", "version", s[i].version, "sha256",
                                      s[i].sha256, "signed_by", s[i].signed_ok ? s[i].signer : NULL, "path",
                                      s[i].path, "compiled_at", (json_int_t)(ab_now_usec() / 1000000), "document",
                                      s[i].text, s[i].len);
                rec = j ? json_dumps(j, JSON_COMPACT) : NULL;
                json_decref(j);
                if (!rec) {
                        r = -ENOMEM;
                        break;
                }
                r = ab_txn_put(t, AB_DB_POLICY, s[i].name, strlen(s[i].name), rec, strlen(rec));
                free(rec);
                if (r < 0)
                        break;
                j = json_pack("{s:I, s:s}", "version", s[i].version, "sha256", s[i].sha256);
                rec = j ? json_dumps(j, JSON_COMPACT) : NULL;
                json_decref(j);
                if (!rec) {
                        r = -ENOMEM;
                        break;
                }
                snprintf(key, sizeof key, "version:%s", s[i].name);
                r = ab_txn_put(t, AB_DB_META, key, strlen(key), rec, strlen(rec));
                free(rec);
                if (r == 0 && s[i].replaces[0]) {
                        uint8_t v[8];
                        put_be64(v, (uint64_t)s[i].replaces_version);
                        snprintf(key, sizeof key, SUPERSEDED_PREFIX "%s", s[i].replaces);
                        r = ab_txn_put(t, AB_DB_META, key, strlen(key), v, sizeof v);
                }
        }
        if (r == 0)
                r = ab_txn_put(t, AB_DB_META, "policy_fingerprint", 18, fp, 64);
        if (r < 0) {
                snprintf(reason, reasonmax, "cannot write the policy store: %s", ab_strerror(r));
                goto out;
        }
        r = ab_txn_commit(t);
        t = NULL;
        if (r < 0) {
                snprintf(reason, reasonmax, "cannot commit the policy store: %s", ab_strerror(r));
                goto out;
        }
        *ret = p;
        p = NULL;
out:
        ab_txn_abort(t);
        json_decref(old_keys);
        ab_policy_free(p);
        src_free(s, n);
        return r;
}

typedef struct load_ctx {
        ab_policy *p;
        ab_diag *diag;
        int r;
} load_ctx;

static int load_one(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        load_ctx *c = ud;
        json_t *rec = json_loadb(val, vlen, 0, NULL), *doc, *path;
        int r;

        (void)key;
        (void)klen;
        doc = json_object_get(rec, "document");
        path = json_object_get(rec, "path");
        if (!json_is_string(doc) || !json_is_string(path)) {
                json_decref(rec);
                return AB_ERR_STORE;
        }
        r = ab_policy_add_document(c->p, json_string_value(path), json_string_value(doc), json_string_length(doc),
                                   c->diag);
        json_decref(rec);
        return r;
}

int ab_policy_from_store(ab_store *st, ab_diag *diag, ab_policy **ret)
{
        load_ctx c = { .diag = diag };
        ab_txn *t = NULL;
        const void *v;
        size_t vl;
        int r;

        r = ab_policy_new(&c.p);
        if (r < 0)
                return r;
        r = ab_store_begin(st, false, &t);
        if (r < 0)
                goto out;
        if (ab_txn_get(t, AB_DB_META, "policy_fingerprint", 18, &v, &vl) == -ENOENT) {
                r = -ENOENT; /* never compiled */
                goto out;
        }
        r = ab_txn_foreach(t, AB_DB_POLICY, NULL, 0, load_one, &c);
out:
        ab_txn_abort(t);
        if (r < 0) {
                ab_policy_free(c.p);
                return r;
        }
        *ret = c.p;
        return 0;
}
