/* SPDX-License-Identifier: MIT */
/*
 * The audit trail: one record per decision, to journald (structured
 * fields, a MESSAGE_ID per event) and to an append-only JSON-lines file in
 * which each record carries the SHA-256 of the previous line ("prev") and a
 * sequence number ("seq"); every AB_AUDIT_CHECKPOINT_EVERY records (and at
 * rotation and shutdown) a checkpoint record signs the chain head with the
 * broker key.
 *
 * Records are appended to memory by ab_audit_add and made durable together
 * by ab_audit_sync (write + fdatasync): the daemon calls it once per event
 * loop turn and holds every reply until it returns (group commit). A sync
 * that fails drops the unsynced records and cuts the file back to its last
 * durable end, so the chain stays whole; the held replies become errors.
 */
#ifndef AB_AUDIT_H
#define AB_AUDIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <jansson.h>
#include "token.h"

#define AB_AUDIT_DEFAULT_PATH "/var/log/agent-broker/audit.jsonl"
#define AB_AUDIT_FILE "audit.jsonl"
#define AB_AUDIT_CHECKPOINT_EVERY 1000
#define AB_AUDIT_DEFAULT_MAX_SIZE (64ull * 1024 * 1024)
/*
 * Keeping every rotated file (--audit-keep 0, the default), rotation
 * renames each PATH.k to PATH.k+1: past this many rotated files it stops
 * rotating (the current file grows on) until the admin archives some.
 * Also the largest --audit-keep.
 */
#define AB_AUDIT_MAX_ROTATED 10000
#define AB_AUDIT_MAX_RECORD 16384
#define AB_AUDIT_MAX_SEQ (1LL << 53) /* what any JSON reader holds exactly */

typedef struct ab_audit ab_audit;

/*
 * Open (creating, mode 0640) the log at path; recover the chain head from
 * its last complete line, cutting off a torn last line. max_size: rotate
 * when the file grows past it (0: never). The signer is borrowed.
 */
int ab_audit_open(const char *path, const ab_signer *signer, uint64_t max_size, ab_audit **ret);
/* Write a checkpoint, sync, close. Accepts NULL. */
void ab_audit_close(ab_audit *a);
/*
 * How many rotated files (PATH.1 newest, PATH.2, ...) rotation keeps. 0,
 * the default: every one, the broker never deletes audit data (so no
 * caller can push history out by making records). n (at most
 * AB_AUDIT_MAX_ROTATED): PATH.1 ... PATH.n; older ones are deleted at the
 * next rotation, with a warning naming them.
 */
void ab_audit_set_keep(ab_audit *a, unsigned keep);

/*
 * Queue a record for event (rec stolen; "time" in µs is set when absent,
 * "seq" and "prev" are set here). It is sent to journald now and written
 * to the file by the next ab_audit_sync.
 */
int ab_audit_add(ab_audit *a, const char *event, json_t *rec);
/*
 * Queue again a record (rec stolen) that a failed sync dropped: as
 * ab_audit_add, with a new "seq" and "prev", and not sent to journald a
 * second time.
 */
int ab_audit_requeue(ab_audit *a, const char *event, json_t *rec);
/* How many records were ever queued (never decreases: a call compares it before and after). */
uint64_t ab_audit_queued_total(const ab_audit *a);
/* Records queued and not yet durable. */
bool ab_audit_pending(const ab_audit *a);
/* Bytes of records queued (not counting a batch out). */
size_t ab_audit_queued_bytes(const ab_audit *a);
/*
 * Write and fdatasync the queued records (and rotate or checkpoint when
 * due). 0, or -errno: then none of the queued records was kept.
 */
int ab_audit_sync(ab_audit *a);
const char *ab_audit_path(const ab_audit *a);

/*
 * The same in two halves, so that the write and fdatasync can run off the
 * event loop while it queues the next records (one batch out at a time):
 *
 * ab_audit_sync_start() detaches the queued records (adding a checkpoint
 * when due) into *b: 0, then ab_audit_batch_write(b) runs in any thread and
 * ab_audit_sync_finish() back in this one. 1: nothing was queued; 2: a
 * rotation was due and the whole sync was done here (as ab_audit_sync);
 * -errno: none of the queued records was kept.
 *
 * ab_audit_sync_finish() returns the batch's result: 0, its records are
 * durable; -errno, the file is cut back and the batch is lost, and so is
 * every record queued since the start (their chain names the batch).
 * While a batch is out, neither ab_audit_sync nor a second start.
 */
typedef struct ab_audit_batch {
        int fd;
        char *buf;
        size_t len, cap;
        int64_t start; /* the file's end when the write began, -1 if unknown */
        int result;
} ab_audit_batch;
int ab_audit_sync_start(ab_audit *a, ab_audit_batch *b);
void ab_audit_batch_write(ab_audit_batch *b);
int ab_audit_sync_finish(ab_audit *a, ab_audit_batch *b);
bool ab_audit_batch_out(const ab_audit *a);

/* The MESSAGE_ID (32 hex digits) of an event name, or NULL if unknown. */
const char *ab_audit_message_id(const char *event);

/*
 * Records from the current file, oldest first: those with seq > after_seq,
 * time >= since_usec, and matching agent / event (NULL: any), at most
 * limit and about max_bytes of JSON. *ret_more says whether more remain.
 */
int ab_audit_read(const ab_audit *a, uint64_t after_seq, uint64_t since_usec, const char *agent,
                  const char *event, size_t limit, size_t max_bytes, json_t **ret_records, uint64_t *ret_next_seq,
                  bool *ret_more);

/* The checkpoint signature input for (seq, prev hash hex): what the broker signs and verifiers check. */
static inline int ab_audit_checkpoint_input(uint64_t seq, const char *prev, char *out, size_t outmax)
{
        int n = snprintf(out, outmax, "agent-broker audit checkpoint\n%llu\n%s\n", (unsigned long long)seq, prev);
        return n < 0 || (size_t)n >= outmax ? -1 : n;
}

#endif
