/* SPDX-License-Identifier: MIT */
/*
 * Policy: which processes are agents, and what each may ask for.
 * A document is JSON (docs/policy.md); it is parsed and validated into an
 * ab_policy, which answers "which agent is this process" and "may it have
 * this audience, these scopes, this ttl". No wildcard in a request ever
 * widens it; a grant must cover a request whole.
 */
#ifndef AB_POLICY_H
#define AB_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <dirent.h>
#include <jansson.h>
#include "attest.h"

#define AB_POLICY_MAX_FILE (1024 * 1024)
#define AB_POLICY_MAX_AGENTS 4096
#define AB_POLICY_MAX_GRANTS 64
#define AB_POLICY_MAX_SCOPES 64
#define AB_POLICY_MAX_USERS 64
#define AB_POLICY_MAX_STR 256
#define AB_ID_MAX 64
#define AB_SCOPE_MAX 128
#define AB_TTL_MAX (24 * 3600)
#define AB_DEFAULT_TTL 300
#define AB_DEFAULT_MAX_LIFETIME (8 * 3600)
#define AB_DEFAULT_REAUTH (15 * 60)
#define AB_GRANT_ID_LEN 16

typedef struct ab_grant {
        const char *audience;
        const char **scopes;   /* expanded: scope groups resolved */
        size_t n_scopes;
        uint32_t max_ttl;
        uint32_t max_auth_age; /* 0: not limited */
        const char **users;    /* PAM users this grant allows; NULL: none given */
        size_t n_users;
        char id[AB_GRANT_ID_LEN + 1]; /* digest of all of the above: the token's "grant" claim */
} ab_grant;

typedef struct ab_agent {
        const char *id, *owner, *description;
        const char *source;           /* file it came from */
        bool has_uid, has_gid, resolved; /* resolved: false if a user/group name is unknown here */
        uid_t uid;
        gid_t gid;
        const char *user, *group;     /* names as written, or NULL */
        const char *exe, *sha256, *unit;
        uint32_t max_lifetime, reauth_interval, max_delegation_depth;
        ab_grant *grants;
        size_t n_grants;
} ab_agent;

typedef struct ab_policy {
        ab_agent *agents;
        size_t n_agents;
        json_t *docs;      /* array of the parsed documents: owns every string above */
        uint64_t serial;   /* bumped by each load, for callers' caches */
} ab_policy;

enum { AB_DIAG_ERROR = 2, AB_DIAG_WARNING = 1 };

/* Where findings go: file, JSON path (e.g. "$.agents[0].grants[1]"), message. */
typedef struct ab_diag {
        void (*emit)(void *userdata, int severity, const char *file, const char *path, const char *msg);
        void *userdata;
        unsigned errors, warnings;
        bool lint;  /* also run lint-only checks (warnings) */
} ab_diag;

/* A new empty policy (denies everyone). */
int ab_policy_new(ab_policy **ret);
void ab_policy_free(ab_policy *p);

/*
 * Parse one document text[0..len) named source and add its agents to p.
 * Every problem is reported through diag. Returns 0, AB_ERR_POLICY (one
 * or more errors: p is then unchanged), AB_ERR_TOO_LARGE, -ENOMEM.
 */
int ab_policy_add_document(ab_policy *p, const char *source, const char *text, size_t len, ab_diag *diag);

/*
 * Load a file, or every *.json in a directory (sorted by name), into a new
 * policy. Fails as a whole if any source fails. Returns 0,
 * AB_ERR_POLICY, AB_ERR_TOO_LARGE, -errno.
 */
int ab_policy_load_path(const char *path, ab_diag *diag, ab_policy **ret);

/* Read a whole file of at most max bytes (O_NOFOLLOW not applied). */
int ab_read_file(const char *path, size_t max, char **ret_buf, size_t *ret_len);
/*
 * ab_read_file for a file that decides what the broker grants (a policy
 * source, a trusted key): the file read (symlinks followed) must be owned
 * by root or this process's user, and writable by no other user (group
 * write only for group root or this process's group). -EPERM if not.
 */
int ab_read_trusted_file(const char *path, size_t max, char **ret_buf, size_t *ret_len);
/*
 * Why a broker running as root would refuse path as a policy source or its
 * directory: 2 if users other than root may write to it (mode or ACL), 1
 * if it is owned by a user other than root (*ret_owner), 0 if neither or
 * it cannot be opened (reading it then says why). For `policy check`.
 */
int ab_trust_problem(const char *path, uid_t *ret_owner);
/*
 * opendir(path) for a directory of such files, under the same rule (its
 * POSIX ACL included), checked on the directory opened: NULL and errno
 * EPERM if it fails the rule.
 */
DIR *ab_opendir_trusted(const char *path);

/* The first agent (in source order) whose selectors all match, or NULL. */
const ab_agent *ab_policy_match(const ab_policy *p, const ab_identity *id);

/* The agent with this id, or NULL. */
const ab_agent *ab_policy_find(const ab_policy *p, const char *id);

/* true if grant g covers scope want (exactly, or by a trailing-'*' prefix). */
bool ab_grant_covers(const ab_grant *g, const char *want);
/* The wildcard scope of g ("repo:*") that covers want, or NULL when g names want exactly (or not at all). */
const char *ab_grant_wildcard_for(const ab_grant *g, const char *want);

/* Denials, each mapping to one varlink error. */
typedef enum ab_deny {
        AB_GRANTED = 0,
        AB_DENY_AUDIENCE,  /* io.agentbroker.AudienceNotGranted */
        AB_DENY_SCOPE,     /* io.agentbroker.ScopeNotGranted */
        AB_DENY_TTL,       /* io.agentbroker.TtlTooLong */
} ab_deny;

/*
 * Decide a request for audience and scopes[0..n) with ttl seconds (0: the
 * default, capped by the grant). Returns AB_GRANTED with *ret_grant and
 * *ret_ttl set, or a denial with a human reason in reason.
 */
ab_deny ab_policy_decide(const ab_agent *a, const char *audience, const char *const *scopes, size_t n,
                         uint32_t ttl, const ab_grant **ret_grant, uint32_t *ret_ttl, char *reason,
                         size_t reasonmax);

/* Parse "300", "45s", "5m", "8h", "2d" (or a JSON integer) into seconds. 0 or AB_ERR_INVALID. */
int ab_parse_duration(const char *s, uint64_t *ret);

#endif
