/* SPDX-License-Identifier: MIT */
/*
 * Policy compilation: policy sources (files) -> checked -> LMDB -> the
 * policy the broker answers from. All or nothing: if any source fails to
 * read, verify, parse or validate, or would roll a source back to an
 * older version, nothing is written and the compiled policy stays.
 */
#ifndef AB_COMPILE_H
#define AB_COMPILE_H

#include <stdbool.h>
#include "policy.h"
#include "store.h"

#define AB_DEFAULT_TRUSTED_KEYS "/etc/agent-broker/trusted-keys"
#define AB_MAX_TRUSTED_KEYS 64

typedef struct ab_compile_opts {
        const char *policy_path;      /* a file, or a directory of *.json */
        const char *trusted_keys_dir; /* *.pub files: base64 Ed25519 public keys */
        bool require_signed;
} ab_compile_opts;

/*
 * Compile the sources into st and return the new policy. Findings go to
 * diag; a one-line reason goes to reason. Returns 0, AB_ERR_POLICY,
 * AB_ERR_CRYPTO (a bad or missing signature), -ESTALE (rollback
 * refused), -ENOSPC, AB_ERR_STORE.
 */
int ab_policy_compile(ab_store *st, const ab_compile_opts *o, ab_diag *diag, ab_policy **ret, char *reason,
                      size_t reasonmax);

/* The policy compiled earlier, from st alone (no source is read). -ENOENT if none. */
int ab_policy_from_store(ab_store *st, ab_diag *diag, ab_policy **ret);

/* A digest of the sources' names, sizes and times (stat only), hex.
 * Returns the number of sources, or a negative error. */
int ab_policy_fingerprint(const char *policy_path, char out[65]);

/* The fingerprint recorded by the last compile, or "" . */
void ab_policy_stored_fingerprint(ab_store *st, char out[65]);

/*
 * Verify a detached signature file (base64 of 64 bytes) over data with
 * any key in trusted_keys_dir. On success writes the signer's key id (first
 * 16 hex digits of SHA-256 of the key) to ret_signer. Returns 0,
 * AB_ERR_CRYPTO (no trusted key verifies it), -ENOENT (no such .sig).
 */
int ab_verify_detached(const char *trusted_keys_dir, const char *sig_path, const void *data, size_t len,
                       char ret_signer[17]);

#endif
