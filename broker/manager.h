/* SPDX-License-Identifier: MIT */
/*
 * The Manager: the daemon's one object. It owns the event loop, the
 * listening sockets, the connections, the policy, the signing key.
 */
#ifndef AB_MANAGER_H
#define AB_MANAGER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <systemd/sd-event.h>
#include <jansson.h>
#include "attest.h"
#include "audit.h"
#include "compile.h"
#include "policy.h"
#include "session.h"
#include "store.h"
#include "token.h"
#include "usage.h"
#include "worker.h"
#include "../common/frame.h"
#include "../common/varlink.h"

#define AB_DEFAULT_STATE_DIR "/var/lib/agent-broker"
#define AB_DEFAULT_POLICY "/etc/agent-broker/policy.d"
#define AB_DEFAULT_CONFIG "/etc/agent-broker/broker.conf"

typedef struct ab_config {
        const char *socket_path;
        const char *admin_socket_path;
        const char *state_dir;
        const char *policy_path;
        const char *issuer;            /* NULL: from the machine id */
        const char *config_path;       /* broker.conf */
        /* From broker.conf, read at start and again on every reload (ab_config_apply_file);
         * the command line's --trusted-keys and --require-signed win over it. */
        char trusted_keys_dir[4096];
        const char *trusted_keys_arg;  /* --trusted-keys, or NULL */
        bool require_signed_arg;       /* --require-signed */
        const char *audit_path;        /* NULL: AB_AUDIT_DEFAULT_PATH */
        uint64_t audit_max_size;
        unsigned audit_keep;           /* rotated audit files kept, 0: all */
        uint64_t store_max_size;       /* LMDB map size, 0: AB_STORE_DEFAULT_MAPSIZE */
        bool require_signed;
        char admin_group[64];          /* "" : root only on the admin socket */
        unsigned max_connections;      /* in all */
        unsigned max_connections_per_uid;
        uint64_t idle_timeout_usec;    /* no request on an open connection */
        uint64_t io_timeout_usec;      /* a started message or a pending reply */
        uint64_t exit_idle_usec;       /* 0: never; else exit after this long without connections */
        uint64_t max_exe_size;         /* larger executables are not hashed */
        unsigned rate_per_sec;         /* per uid; 0: unlimited */
        unsigned rate_burst;
        int log_level;
} ab_config;

void ab_config_defaults(ab_config *c);

typedef struct ab_manager ab_manager;
typedef struct ab_conn ab_conn;

/* Per-uid accounting: connections held and a token bucket. */
typedef struct ab_hash_job ab_hash_job;

typedef struct ab_uid_slot {
        uid_t uid;
        unsigned conns;
        ab_hash_job *hash_job;  /* hashing an executable for this uid: one at a time (see ab_conn_wait_hash) */
        size_t in_bytes;        /* input buffers of its connections (see IN_BYTES_PER_UID) */
        double tokens;
        uint64_t refill_usec;
        struct ab_uid_slot *next;
} ab_uid_slot;

struct ab_conn {
        ab_manager *m;
        int fd;
        bool admin;
        bool closing;        /* close once the output is flushed */
        bool eof;            /* the peer closed its side: answer what is complete, then close */
        bool hup;            /* the peer is gone altogether: carry out what it sent, answer nobody */
        bool oneway;         /* the call being handled wants no reply */
        sd_event_source *io, *timer, *defer;
        ab_peer peer;
        ab_uid_slot *uslot;
        ab_frame in;
        size_t in_counted;      /* in.cap as counted in uslot->in_bytes and m->in_bytes */
        char *out;
        size_t out_len, out_off, out_cap;
        uint64_t last_active;   /* monotonic usec */
        uint64_t msg_started;   /* when the pending partial message began, 0: none */
        /* Replies held until the audit records queued before them are durable. */
        bool held;
        uint64_t call_records;  /* ab_audit_queued_total when the call at hand began: a reply
                                   waits only if its call queued a record (or one waits already) */
        bool inflight;          /* held by the batch being written: read nothing until it is durable */
        ab_conn **busy_ref;     /* a job works for the call at hand (ab_conn_submit): the job's pointer to c */
        bool busy_oneway;       /* that call wants no reply (see ab_conn_job_answer) */
        /* While inflight: output up to inflight_end (inflight_calls replies) waits for the batch
         * out; a job's reply after it (its record in the next batch) waits for the next one. */
        size_t inflight_end;
        unsigned inflight_calls;
        size_t held_from;       /* offset in out where held replies begin */
        unsigned held_calls;    /* replies held */
        ab_conn *held_next;
        /* The call at hand needs the caller's executable hashed first (ab_conn_wait_hash): it is
         * put back unhandled (retry_call), and the connection waits on hash_job. */
        bool retry_call;
        bool call_paid;         /* the call at hand took a rate-limit token */
        bool retry_paid;        /* the call put back took one already: its next run takes none */
        ab_hash_job *hash_job;
        ab_conn *hash_next;
        ab_conn *prev, *next;
};

/* The audit batch out on the worker thread (one at a time). */
typedef struct ab_sync_job {
        ab_job job;
        ab_manager *m;
        ab_audit_batch batch;
} ab_sync_job;

struct ab_manager {
        ab_config cfg;
        sd_event *event;
        sd_event_source *listen_src[2];
        int listen_fd[2];         /* [0] agent, [1] admin */
        bool listen_bound[2];     /* we bound it (unlink on exit) */
        sd_event_source *sigterm, *sigint, *exit_timer;
        ab_conn *conns;
        unsigned n_conns;
        size_t in_bytes;          /* input buffers of all connections */
        ab_uid_slot *uids;
        int state_fd;
        ab_store *store;
        ab_policy *policy;
        sd_event_source *sighup, *inotify, *reload_timer, *purge_timer;
        sd_event_source *key_end_defer; /* an earlier key's overlap ran out: store that (on while due) */
        uint64_t purged_at;             /* CLOCK_MONOTONIC µs of the last purge pass */
        bool purge_more;                /* it left some for the next */
        struct ab_uid_count *uid_sessions; /* sessions in the store per uid, sorted by uid */
        size_t n_uid_sessions, max_uid_sessions;
        uint64_t sessions_total;
        gid_t admin_gid;
        bool has_admin_gid;
        ab_signer *signer;
        ab_exe_cache *exe_cache;
        char issuer[128];
        ab_audit *audit;
        sd_event_source *audit_defer;
        sd_event_source *audit_retry; /* after a failed sync: when what it left is tried again (on while it waits) */
        uint64_t audit_backoff;       /* µs, doubling from 100 ms to 5 s while syncs fail */
        uint64_t audit_logged;        /* when the failure was last logged */
        ab_conn *held;            /* connections with replies held for the next batch */
        ab_worker *worker;        /* writes and syncs audit batches off the loop */
        ab_worker *crypto;        /* signs and verifies for calls off the loop */
        ab_worker *hasher[2];     /* hash executables off the loop (ab_conn_wait_hash): [1] those over
                                   * AB_HASH_SMALL, so that a large file does not hold up the others */
        atomic_bool hash_cancel;  /* stopping: a hash under way gives up */
        ab_sync_job sync;
        bool sync_out;            /* a batch is out */
        bool audit_stalled;       /* calls wait because the queue behind it is full */
        sd_event_source *accept_timer; /* listening again after accept() ran out of descriptors */
        uint64_t accept_logged, accept_failures;
        unsigned accept_backoff;  /* pauses in a row: each twice as long */
        ab_conn *inflight;        /* connections whose replies wait for that batch */
        size_t usage_inflight, changes_inflight; /* usage_pending / turn_changes entries of that batch */
        char policy_version[17];  /* short fingerprint of the compiled policy, for audit */
        bool conf_fail_recorded;  /* a reload has said that broker.conf cannot be applied */
        ab_usage *usage;
        sd_event_source *usage_timer;
        bool usage_failing;       /* the last flush failed: only the timer tries again */
        /* Usage of tokens whose audit records wait for this turn's sync:
         * counted only once the sync succeeds (a refused token is not used). */
        struct ab_usage_pending *usage_pending;
        size_t n_usage_pending, cap_usage_pending;
        /* [event, record] of changes made in LMDB whose records wait for a sync
         * (ab_manager_audit_change): a change stays made when the sync fails,
         * so its record is queued again until one succeeds. */
        json_t *turn_changes;
};

int ab_manager_new(const ab_config *cfg, ab_manager **ret);
/* Take or bind the sockets, open state, load policy, add signal sources. */
int ab_manager_startup(ab_manager *m);
int ab_manager_run(ab_manager *m);
/*
 * Compile the policy sources into the store and answer from the result.
 * On failure the policy in force stays; findings (if not NULL) receives
 * up to 64 {file, path, severity, message} objects and reason a line.
 * who (stolen, may be NULL) is merged into the audit record: what asked
 * ("via": admin, sighup, inotify, startup) and, for admin, its uid and
 * pid. A reload by inotify that leaves the policy as it was writes no
 * policy.loaded record (a write next to the sources is not a policy change).
 */
int ab_manager_reload_policy(ab_manager *m, json_t *findings, json_t *who, char *reason, size_t reasonmax);

/*
 * Replace the signing key; the old public key stays in the JWKS for
 * overlap seconds (kept in LMDB meta, durable first).
 */
int ab_manager_rotate_key(ab_manager *m, int64_t overlap, char *old_kid, size_t old_kid_max, int64_t *ret_until);

/* Read broker.conf (key = value lines). Missing file: defaults. */
int ab_config_load_file(ab_config *c, const char *path);
/*
 * The settings broker.conf holds (require_signed, trusted_keys, admin_group)
 * from c->config_path over their defaults, then the command line's: 0, or
 * < 0 with the reason logged (c may then be half changed: use a copy).
 */
int ab_config_apply_file(ab_config *c);
void ab_manager_free(ab_manager *m);

/* Queue a reply on c (steals params). error NULL: success. */
int ab_conn_reply(ab_conn *c, json_t *params, const char *error);
/*
 * Hand a job to the crypto worker for the call c is handling; its done()
 * answers the call and then calls ab_conn_resume(). Meanwhile c handles
 * no other call (replies stay in order). *ref is the job's pointer to c:
 * set to c here, and to NULL if c is closed before done() (which then
 * only frees the job).
 */
void ab_conn_submit(ab_conn *c, ab_job *j, ab_conn **ref);
/*
 * In the job's done(), before it answers: the replies from here to
 * ab_conn_resume() answer the job's call (none if that call was oneway).
 */
void ab_conn_job_answer(ab_conn *c);
/* The reply of the call at hand depends on records other calls queued: it waits for them as well. */
void ab_conn_after_pending(ab_conn *c);
/*
 * Finish every job out now (their replies and records queued), before a
 * change that must not overtake them: a revocation, a policy reload, a
 * key rotation. A token decided before the change is issued (and recorded)
 * before it, never after its acknowledgement.
 */
void ab_manager_drain_jobs(ab_manager *m);
void ab_conn_resume(ab_conn *c);
/*
 * The call c is handling found the caller's executable not hashed yet
 * (ab_attest returned -EINPROGRESS): the method returns without a reply,
 * the call is put back, the file is hashed on the hasher thread (one file
 * at a time per uid; the uid's other connections that need one wait for
 * it), and the call is handled again once that is done. 0, or -errno (then
 * the caller answers with an error).
 */
int ab_conn_wait_hash(ab_conn *c);
/* Queue an error reply {"reason": reason} (plus extra, stolen, if not NULL). */
int ab_conn_error(ab_conn *c, const char *error, const char *reason, json_t *extra);

/*
 * Queue an audit record (rec stolen; see audit.h). Replies queued after
 * this are held until the record is durable.
 */
int ab_manager_audit(ab_manager *m, const char *event, json_t *rec);
/*
 * ab_manager_audit for the record of a change already made in LMDB (a
 * session opened or re-authenticated, a revocation in force, a PAM session
 * recorded or closed, a key rotated): when the sync of its batch fails, the
 * caller is refused, but the change stays made, so the record is queued
 * again and written by the next sync that succeeds. A change is never left
 * without its record.
 */
int ab_manager_audit_change(ab_manager *m, const char *event, json_t *rec);

/* Method dispatch (methods.c). Handles one parsed call on c. */
void ab_dispatch(ab_conn *c, ab_vl_call *call);

/* Per-uid rate limit: true if the request may proceed. */
bool ab_rate_take(ab_manager *m, ab_uid_slot *u);
/*
 * ab_rate_take for the call c is handling; a call put back while its
 * executable was hashed (ab_conn_wait_hash) and handled again is not
 * charged a second time. false: the call is answered RateLimited.
 */
bool ab_conn_rate_take(ab_conn *c);

#endif
