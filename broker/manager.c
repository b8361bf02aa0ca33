/* SPDX-License-Identifier: MIT */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <sodium.h>
#include <systemd/sd-daemon.h>
#include <systemd/sd-id128.h>
#include "log.h"
#include "manager.h"
#include "methods.h"
#include "../common/util.h"

#define OUT_HIGH_WATER (256 * 1024) /* stop reading requests while this much output is queued */
#define MSGS_PER_TURN 16            /* fairness: messages handled per connection per loop turn */
#define READ_PER_TURN (128 * 1024)
/*
 * Input buffers start at 4 KiB and grow to hold one message of up to 64 KiB.
 * A peer that sends most of a large message and stops holds that much until
 * the I/O timeout; with 1,024 connections a uid could pin 64 MiB, and four
 * uids the broker's limit of connections. The buffers of one uid, and of
 * everyone, are capped: a connection whose buffer would grow past the cap is
 * told so and closed. A buffer grows past 4 KiB only for a large message, or
 * for many calls pipelined behind one that waits (for its signature or its
 * audit batch): a connection that sends one small call at a time is never
 * refused.
 */
#define IN_BYTES_PER_UID (16u << 20)
#define IN_BYTES_ALL (48u << 20)
#define SMALL_IN 4096 /* what a buffer of small calls stays at (frame.c's first allocation) */

void ab_config_defaults(ab_config *c)
{
        *c = (ab_config){
                .socket_path = NULL,
                .admin_socket_path = NULL,
                .state_dir = AB_DEFAULT_STATE_DIR,
                .policy_path = AB_DEFAULT_POLICY,
                .max_connections = 4096,
                .max_connections_per_uid = 1024,
                .idle_timeout_usec = 300 * 1000000ull,
                .io_timeout_usec = 10 * 1000000ull,
                .exit_idle_usec = 0,
                .max_exe_size = 512ull * 1024 * 1024,
                .rate_per_sec = 5000,
                .rate_burst = 10000,
                .log_level = LOG_INFO,
                .config_path = AB_DEFAULT_CONFIG,
                .trusted_keys_dir = AB_DEFAULT_TRUSTED_KEYS,
                .audit_max_size = AB_AUDIT_DEFAULT_MAX_SIZE,
        };
}

int ab_manager_new(const ab_config *cfg, ab_manager **ret)
{
        ab_manager *m = calloc(1, sizeof *m);
        int r;

        if (!m)
                return -ENOMEM;
        m->cfg = *cfg;
        m->listen_fd[0] = m->listen_fd[1] = -1;
        m->state_fd = -1;
        r = sd_event_default(&m->event);
        if (r < 0) {
                free(m);
                return r;
        }
        *ret = m;
        return 0;
}

/* ---- per-uid accounting ------------------------------------------------ */

/* A slot with no connections is kept while its rate bucket is not full, so
 * that closing and reopening connections does not reset the rate limit. */
static bool uid_slot_idle(const ab_manager *m, const ab_uid_slot *u, uint64_t now)
{
        return u->conns == 0 && !u->hash_job &&
               (m->cfg.rate_per_sec == 0 ||
                u->tokens + (double)(now - u->refill_usec) * m->cfg.rate_per_sec / 1e6 >= m->cfg.rate_burst);
}

static void uid_sweep(ab_manager *m, bool all)
{
        uint64_t now = ab_mono_usec();
        ab_uid_slot **pp = &m->uids;

        while (*pp) {
                ab_uid_slot *u = *pp;
                if (all || uid_slot_idle(m, u, now)) {
                        *pp = u->next;
                        free(u);
                } else {
                        pp = &u->next;
                }
        }
}

static ab_uid_slot *uid_get(ab_manager *m, uid_t uid)
{
        ab_uid_slot *u;

        for (u = m->uids; u; u = u->next)
                if (u->uid == uid)
                        return u;
        uid_sweep(m, false);
        u = calloc(1, sizeof *u);
        if (!u)
                return NULL;
        u->uid = uid;
        u->tokens = m->cfg.rate_burst;
        u->refill_usec = ab_mono_usec();
        u->next = m->uids;
        m->uids = u;
        return u;
}

static void uid_put(ab_manager *m, ab_uid_slot *u)
{
        (void)m;
        u->conns--;
}

bool ab_conn_rate_take(ab_conn *c)
{
        if (c->retry_paid) {
                c->retry_paid = false;
                c->call_paid = true;
                return true;
        }
        c->call_paid = ab_rate_take(c->m, c->uslot);
        if (!c->call_paid)
                ab_conn_error(c, "io.agentbroker.RateLimited", "too many requests from this uid; retry shortly", NULL);
        return c->call_paid;
}

bool ab_rate_take(ab_manager *m, ab_uid_slot *u)
{
        uint64_t now;

        if (m->cfg.rate_per_sec == 0)
                return true;
        now = ab_mono_usec();
        u->tokens += (double)(now - u->refill_usec) * m->cfg.rate_per_sec / 1e6;
        if (u->tokens > m->cfg.rate_burst)
                u->tokens = m->cfg.rate_burst;
        u->refill_usec = now;
        if (u->tokens < 1.0)
                return false;
        u->tokens -= 1.0;
        return true;
}

/* ---- connections ------------------------------------------------------- */

static int conn_io(sd_event_source *s, int fd, uint32_t revents, void *userdata);
static int conn_timer(sd_event_source *s, uint64_t usec, void *userdata);
static int conn_defer(sd_event_source *s, void *userdata);
static void conn_update_events(ab_conn *c);
static void exit_timer_arm(ab_manager *m);

static void list_remove(ab_conn **head, ab_conn *c)
{
        for (ab_conn **pp = head; *pp; pp = &(*pp)->held_next)
                if (*pp == c) {
                        *pp = c->held_next;
                        return;
                }
}

/*
 * Records queued behind the batch out, at most: past this, calls wait for
 * the batch (a stuck disk must not turn into unbounded memory: oneway calls
 * make records without replies to hold).
 */
#define AUDIT_QUEUE_MAX (2u * 1024 * 1024)

static bool audit_full(const ab_manager *m)
{
        return m->audit && ab_audit_queued_bytes(m->audit) > AUDIT_QUEUE_MAX;
}

/* A call of c waits for a job (busy_ref), for the audit batch out (inflight), for its executable's hash
 * (hash_job), or for room in the audit queue. */
static bool conn_blocked(const ab_conn *c)
{
        return c->busy_ref || c->inflight || c->hash_job || audit_full(c->m);
}

/* Calls (or an EOF) that arrived while c could not handle them: go on with them on the next turn. */
static void conn_continue(ab_conn *c)
{
        if (ab_frame_pending(&c->in) > 0 || c->eof)
                sd_event_source_set_enabled(c->defer, SD_EVENT_ONESHOT);
}

/* ---- hashing executables off the loop ---------------------------------- */

/* Executables up to this size are hashed on their own thread: at most tens of ms each. */
#define AB_HASH_SMALL (32ull * 1024 * 1024)

struct ab_hash_job {
        ab_job job;
        ab_manager *m;
        ab_uid_slot *u;
        int fd;
        struct stat st;
        int result;
        char hex[65];
        ab_conn *waiters; /* linked by hash_next */
};

static void hash_leave(ab_conn *c)
{
        for (ab_conn **pp = &c->hash_job->waiters; *pp; pp = &(*pp)->hash_next)
                if (*pp == c) {
                        *pp = c->hash_next;
                        break;
                }
        c->hash_job = NULL;
        c->hash_next = NULL;
}

static void hash_run(ab_job *job)
{
        ab_hash_job *j = (ab_hash_job *)job;
        j->result = ab_exe_hash_fd(j->fd, (uint64_t)j->st.st_size, &j->m->hash_cancel, j->hex);
}

/* Keep the hash (unless the file changed meanwhile) and let the connections that waited go on. */
static void hash_done(ab_job *job)
{
        ab_hash_job *j = (ab_hash_job *)job;
        ab_conn *c, *next;

        if (j->result == 0) {
                if (ab_exe_cache_put(j->m->exe_cache, j->fd, &j->st, j->hex) == 0)
                        for (c = j->waiters; c; c = c->hash_next)
                                ab_attest_hash_known(&c->peer, &j->st, j->hex); /* not only through the cache */
        } else if (j->result != -ECANCELED) {
                ab_log(LOG_WARNING, "cannot hash the executable of a process of uid %u: %s", (unsigned)j->u->uid,
                       ab_strerror(j->result));
        }
        ab_close(j->fd);
        j->u->hash_job = NULL;
        for (c = j->waiters; c; c = next) {
                next = c->hash_next;
                c->hash_job = NULL;
                c->hash_next = NULL;
                conn_continue(c); /* its call was put back: handle it again */
                conn_update_events(c);
        }
        free(j);
}

int ab_conn_wait_hash(ab_conn *c)
{
        ab_manager *m = c->m;
        ab_hash_job *j = c->uslot->hash_job;
        int fd;
        struct stat st;

        if (!m->hasher[0])
                return -ENOSYS;
        if (j) {
                /* another connection of this uid waits for a hash: this one waits for that first,
                 * then asks again (its own file may be the same one; it is opened again then) */
                ab_attest_drop_hash(&c->peer);
        } else {
                j = calloc(1, sizeof *j);
                if (!j)
                        return -ENOMEM;
                if (ab_attest_take_hash(&c->peer, &fd, &st) < 0) {
                        free(j);
                        return -ENOENT;
                }
                *j = (ab_hash_job){ .job = { .run = hash_run, .done = hash_done }, .m = m, .u = c->uslot, .fd = fd,
                                    .st = st };
                c->uslot->hash_job = j;
                ab_worker_submit(m->hasher[(uint64_t)st.st_size > AB_HASH_SMALL], &j->job);
        }
        c->retry_call = true;
        c->retry_paid = c->call_paid; /* taken again, whole: the rate-limit token once */
        c->hash_job = j;
        c->hash_next = j->waiters;
        j->waiters = c;
        return 0;
}

static void conn_free(ab_conn *c)
{
        ab_manager *m = c->m;

        if (c->prev)
                c->prev->next = c->next;
        else
                m->conns = c->next;
        if (c->next)
                c->next->prev = c->prev;
        m->n_conns--;
        if (c->held)
                list_remove(c->inflight ? &m->inflight : &m->held, c);
        if (c->busy_ref)
                *c->busy_ref = NULL; /* its job finds the connection gone */
        if (c->hash_job)
                hash_leave(c);
        m->in_bytes -= c->in_counted;
        if (c->uslot) {
                c->uslot->in_bytes -= c->in_counted;
                uid_put(m, c->uslot);
        }
        sd_event_source_disable_unref(c->io);
        sd_event_source_disable_unref(c->timer);
        sd_event_source_disable_unref(c->defer);
        ab_peer_done(&c->peer);
        ab_frame_free(&c->in);
        free(c->out);
        ab_close(c->fd);
        free(c);
        if (m->n_conns == 0)
                exit_timer_arm(m);
}

static uint64_t conn_deadline(const ab_conn *c)
{
        if (c->out_len > c->out_off || c->msg_started)
                return (c->msg_started ? c->msg_started : c->last_active) + c->m->cfg.io_timeout_usec;
        return c->last_active + c->m->cfg.idle_timeout_usec;
}

static int conn_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        ab_conn *c = userdata;
        uint64_t deadline = conn_deadline(c);

        (void)usec;
        if (ab_mono_usec() >= deadline) {
                ab_log(LOG_DEBUG, "closing connection of uid %u: timeout", (unsigned)c->peer.uid);
                conn_free(c);
                return 0;
        }
        /* Deadlines move lazily: re-arm at the current one. */
        sd_event_source_set_time(s, deadline);
        sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        return 0;
}

static int out_append(ab_conn *c, const char *buf, size_t n)
{
        if (c->out_off == c->out_len) {
                c->held_from -= c->held ? c->out_off : 0;
                c->inflight_end -= c->inflight ? c->out_off : 0;
                c->out_off = c->out_len = 0;
        }
        if (n > c->out_cap - c->out_len) {
                size_t need = c->out_len + n, ncap = c->out_cap ? c->out_cap : 4096;
                char *nb;
                if (c->out_off > 0) {
                        c->held_from -= c->held ? c->out_off : 0;
                        c->inflight_end -= c->inflight ? c->out_off : 0;
                        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
                        c->out_len -= c->out_off;
                        c->out_off = 0;
                        need = c->out_len + n;
                }
                while (ncap < need)
                        ncap *= 2;
                if (ncap != c->out_cap) {
                        nb = realloc(c->out, ncap);
                        if (!nb)
                                return -ENOMEM;
                        c->out = nb;
                        c->out_cap = ncap;
                }
        }
        memcpy(c->out + c->out_len, buf, n);
        c->out_len += n;
        return 0;
}

/* Write what we can. Returns 0, or -errno when the connection is dead. */
static int conn_flush(ab_conn *c)
{
        size_t lim = c->held ? c->held_from : c->out_len; /* held replies wait for the audit sync */

        if (c->hup) /* nobody to send to: what could go is dropped */
                c->out_off = lim > c->out_off ? lim : c->out_off;

        while (c->out_off < lim) {
                ssize_t n = send(c->fd, c->out + c->out_off, lim - c->out_off, MSG_DONTWAIT | MSG_NOSIGNAL);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                return 0;
                        return -errno;
                }
                c->out_off += (size_t)n;
                c->last_active = ab_mono_usec();
        }
        if (c->out_off < c->out_len)
                return 0; /* held */
        c->out_off = c->out_len = 0;
        if (c->out_cap > 64 * 1024) { /* give back a buffer grown by a burst */
                free(c->out);
                c->out = NULL;
                c->out_cap = 0;
        }
        return 0;
}

/*
 * Whether the reply of the call at hand waits for the audit sync: if the
 * call queued a record. GetInfo, GetKeys, a refusal are not made to wait
 * for (or fail with) other calls' records, which a failing disk may keep
 * queued for seconds. After ab_conn_after_pending, for every record queued
 * and the batch being written.
 */
static bool reply_waits(const ab_conn *c)
{
        const ab_audit *a = c->m->audit;

        if (c->call_records == UINT64_MAX)
                return ab_audit_pending(a) || ab_audit_batch_out(a);
        return ab_audit_pending(a) && ab_audit_queued_total(a) != c->call_records;
}

int ab_conn_reply(ab_conn *c, json_t *params, const char *error)
{
        char *msg = NULL;
        size_t len = 0;
        int r;

        if (c->oneway) { /* the call being answered wants no reply */
                json_decref(params);
                return 0;
        }
        r = ab_vl_encode_reply(params, error, &msg, &len);
        if (r < 0)
                return r;
        if (!c->held && reply_waits(c)) {
                c->held = true;
                c->held_calls = 0;
                c->held_from = c->out_len;
                c->held_next = c->m->held;
                c->m->held = c;
                /* records queued earlier (and not by this call) must not hold it forever */
                if (c->m->audit_defer)
                        sd_event_source_set_enabled(c->m->audit_defer, SD_EVENT_ONESHOT);
        }
        r = out_append(c, msg, len);
        free(msg);
        if (r == 0 && c->held)
                c->held_calls++;
        return r;
}

int ab_conn_error(ab_conn *c, const char *error, const char *reason, json_t *extra)
{
        json_t *p = extra ? extra : json_object();

        if (!p)
                return -ENOMEM;
        if (reason)
                json_object_set_new(p, "reason", json_string(reason));
        return ab_conn_reply(c, p, error);
}

static void usage_pending_settle(ab_manager *m, size_t n, bool ok);

/*
 * The records that list's held replies waited for are durable (r >= 0) or
 * lost: let the replies go, or turn each into an AuditUnavailable error
 * (fail closed). The connections then read and handle requests again.
 */
static void release_held(ab_conn *list, int r)
{
        ab_conn *c, *next;

        for (c = list; c; c = next) {
                unsigned n = c->held_calls;
                bool was_inflight = c->inflight;
                next = c->held_next;
                c->inflight = false;
                c->held_next = NULL;
                if (r >= 0 && was_inflight && c->held_calls > c->inflight_calls) {
                        /* a job answered while the batch was out: its record is in the next
                         * batch, so its reply waits for that one; what the batch covered goes */
                        c->held_from = c->inflight_end;
                        c->held_calls -= c->inflight_calls;
                        c->held_next = c->m->held;
                        c->m->held = c;
                } else {
                        c->held = false;
                        if (r < 0) {
                                char reason[256];
                                c->out_len = c->held_from;
                                snprintf(reason, sizeof reason,
                                         "the audit trail cannot be written (%s); nothing was issued, and a "
                                         "change already made is recorded once it can be",
                                         ab_strerror(r));
                                for (unsigned i = 0; i < n; i++)
                                        ab_conn_error(c, "io.agentbroker.AuditUnavailable", reason, NULL);
                        }
                }
                if (conn_flush(c) < 0) {
                        conn_free(c);
                        continue;
                }
                if (c->closing && c->out_len == c->out_off) {
                        conn_free(c);
                        continue;
                }
                conn_continue(c); /* it may have stopped at the output high-water mark */
                conn_update_events(c);
        }
}

/*
 * LMDB reported MDB_PANIC: the environment fails every transaction until
 * it is opened again, while GetInfo would still answer the watchdog. Exit
 * with a failure, so that systemd (Restart=on-failure) starts a broker
 * that opens it afresh; what was acknowledged is durable already.
 */
static void store_fatal(void *userdata)
{
        ab_manager *m = userdata;

        ab_log(LOG_CRIT, "the store in %s failed for good (LMDB: MDB_PANIC, a failed write of its meta page): "
               "exiting to be restarted", m->cfg.state_dir);
        (void)sd_event_exit(m->event, -EIO);
}

static int on_audit_retry(sd_event_source *s, uint64_t usec, void *userdata)
{
        ab_manager *m = userdata;

        (void)s;
        (void)usec;
        if ((ab_audit_pending(m->audit) || m->held) && m->audit_defer) /* the next turn tries the disk again */
                sd_event_source_set_enabled(m->audit_defer, SD_EVENT_ONESHOT);
        return 0;
}

/*
 * A sync failed (r < 0) or worked. A failed sync leaves records queued
 * again (the session.opened records of sessions that exist in LMDB), and
 * trying those at once, every turn, kept a full disk spinning a core with
 * a log line per try (helper-37). Without a call waiting for the trail,
 * they are tried again after 100 ms, then twice as long each time up to
 * 5 s; a call that needs the trail still tries the disk at once, so that
 * the broker serves again as soon as there is room. Logged when the
 * failures start, every 10 s while they last, and when they end.
 */
static void audit_backoff(ab_manager *m, int r)
{
        uint64_t now = ab_mono_usec(), next;

        if (r >= 0) {
                if (m->audit_backoff)
                        ab_log(LOG_NOTICE, "audit trail %s is written again", ab_audit_path(m->audit));
                m->audit_backoff = 0;
                if (m->audit_retry)
                        (void)sd_event_source_set_enabled(m->audit_retry, SD_EVENT_OFF);
                return;
        }
        next = m->audit_backoff ? m->audit_backoff * 2 : 100 * 1000;
        if (next > 5ull * 1000000)
                next = 5ull * 1000000;
        if (!m->audit_backoff || now - m->audit_logged >= 10ull * 1000000) {
                ab_log(LOG_ERR, "audit trail %s cannot be written (%s): refusing the requests that need it, "
                       "trying again in %llu ms", ab_audit_path(m->audit), ab_strerror(r),
                       (unsigned long long)(next / 1000));
                m->audit_logged = now;
        }
        m->audit_backoff = next;
        if (!m->audit_retry) /* failing, no timer: no waiting either (audit_waiting) */
                (void)sd_event_add_time(m->event, &m->audit_retry, CLOCK_MONOTONIC, now + next, 0, on_audit_retry, m);
        else {
                (void)sd_event_source_set_time(m->audit_retry, now + next);
                (void)sd_event_source_set_enabled(m->audit_retry, SD_EVENT_ONESHOT);
        }
}

/* Whether what a failed sync left waits for the retry timer. */
static bool audit_waiting(ab_manager *m)
{
        int e = SD_EVENT_OFF;

        return m->audit_retry && sd_event_source_get_enabled(m->audit_retry, &e) >= 0 && e != SD_EVENT_OFF;
}

/*
 * A sync has ended with r: settle the first n_usage pending usage counts
 * and n_changes records of changes it covered, and the replies on list.
 */
static void audit_settle(ab_manager *m, int r, ab_conn *list, size_t n_usage, size_t n_changes)
{
        usage_pending_settle(m, n_usage, r >= 0);
        release_held(list, r);
        if (r >= 0) {
                if (m->turn_changes)
                        for (size_t i = 0; i < n_changes; i++)
                                json_array_remove(m->turn_changes, 0);
        } else {
                /* Their changes are made in LMDB: their records go with the next
                 * sync (a session's before any token of it). Queued after the
                 * refusals above were sent, so that those are not held. */
                size_t i;
                json_t *ch;
                json_array_foreach(m->turn_changes, i, ch)
                        (void)ab_audit_requeue(m->audit, json_string_value(json_array_get(ch, 0)),
                                               json_deep_copy(json_array_get(ch, 1)));
        }
}

/* The queue has room again: connections that stopped for it go on. */
static void wake_stalled(ab_manager *m)
{
        if (!m->audit_stalled || audit_full(m))
                return;
        m->audit_stalled = false;
        for (ab_conn *c = m->conns; c; c = c->next)
                conn_continue(c);
}

static void sync_run(ab_job *j)
{
        ab_audit_batch_write(&((ab_sync_job *)j)->batch);
}

static void sync_done(ab_job *j)
{
        ab_manager *m = ((ab_sync_job *)j)->m;
        int r = ab_audit_sync_finish(m->audit, &m->sync.batch);
        ab_conn *list = m->inflight;

        m->sync_out = false;
        m->inflight = NULL;
        if (r < 0) {
                /* the records queued meanwhile went with the batch: their replies fail too */
                ab_conn **tail = &list;
                while (*tail)
                        tail = &(*tail)->held_next;
                *tail = m->held;
                m->held = NULL;
                audit_settle(m, r, list, m->n_usage_pending, json_array_size(m->turn_changes));
        } else {
                audit_settle(m, r, list, m->usage_inflight, m->changes_inflight);
        }
        audit_backoff(m, r);
        if ((ab_audit_pending(m->audit) || m->held) && m->audit_defer)
                sd_event_source_set_enabled(m->audit_defer, SD_EVENT_ONESHOT);
}

/*
 * Once per event loop turn (idle priority: after every ready connection was
 * served): send the queued audit records to the worker to be written and
 * synced as one batch, while the loop goes on serving; the replies held for
 * them go once they are durable (sync_done). One batch at a time: records
 * queued meanwhile form the next one.
 */
static int on_audit_defer(sd_event_source *s, void *userdata)
{
        ab_manager *m = userdata;
        ab_conn *list;
        int r;

        (void)s;
        if (m->sync_out)
                return 0; /* sync_done starts the next */
        if (!m->held && audit_waiting(m))
                return 0; /* only what a failed sync left (sessions opened) waits: on_audit_retry tries again */
        r = ab_audit_sync_start(m->audit, &m->sync.batch);
        if (r != 0) {
                list = m->held;
                m->held = NULL;
                audit_settle(m, r < 0 ? r : 0, list, m->n_usage_pending, json_array_size(m->turn_changes));
                if (r != 1) /* failed, or written with a rotation */
                        audit_backoff(m, r);
                wake_stalled(m);
                return 0;
        }
        m->sync_out = true;
        m->inflight = m->held;
        m->held = NULL;
        for (ab_conn *c = m->inflight; c; c = c->held_next) {
                c->inflight = true;
                c->inflight_end = c->out_len;
                c->inflight_calls = c->held_calls;
                conn_update_events(c);
        }
        m->usage_inflight = m->n_usage_pending;
        m->changes_inflight = json_array_size(m->turn_changes);
        ab_worker_submit(m->worker, &m->sync.job);
        wake_stalled(m);
        return 0;
}

#define AB_USAGE_FLUSH_USEC (5ull * 1000000)

/* The next merge of the usage counts, AB_USAGE_FLUSH_USEC from now. */
static void usage_timer_arm(ab_manager *m)
{
        if (!m->usage_timer)
                return;
        sd_event_source_set_time(m->usage_timer, ab_mono_usec() + AB_USAGE_FLUSH_USEC);
        sd_event_source_set_enabled(m->usage_timer, SD_EVENT_ONESHOT);
}

static int on_usage_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        ab_manager *m = userdata;
        int r = ab_usage_flush(m->usage, m->store);
        (void)s;
        (void)usec;
        if (r < 0) {
                /* kept in memory (bounded) and tried again by the timer, not by every
                 * issuance while the table is full (a full store made each one retry) */
                if (!m->usage_failing)
                        ab_log(LOG_WARNING, "usage counters not saved: %s (trying again every %llu s)",
                               ab_strerror(r), (unsigned long long)(AB_USAGE_FLUSH_USEC / 1000000));
                m->usage_failing = true;
                usage_timer_arm(m);
        } else {
                m->usage_failing = false;
        }
        return 0;
}

struct ab_usage_pending {
        char *agent, *audience, *scope, *wild;
        int64_t now;
};

static void usage_pending_clear(struct ab_usage_pending *u)
{
        free(u->agent);
        free(u->audience);
        free(u->scope);
        free(u->wild);
}

static void usage_pending_free(ab_manager *m)
{
        for (size_t i = 0; i < m->n_usage_pending; i++)
                usage_pending_clear(&m->usage_pending[i]);
        m->n_usage_pending = 0;
}

static void usage_count(ab_manager *m, bool full)
{
        if (full && !m->usage_failing)
                (void)on_usage_timer(NULL, 0, m);
        else if (m->usage_timer && sd_event_source_get_enabled(m->usage_timer, NULL) == 0)
                usage_timer_arm(m);
}

/* The audit records of the first n pending counts are durable (ok) or lost: count their tokens' usage, or drop it. */
static void usage_pending_settle(ab_manager *m, size_t n, bool ok)
{
        bool full = false;
        if (n == 0)
                return;
        for (size_t i = 0; i < n; i++) {
                struct ab_usage_pending *u = &m->usage_pending[i];
                if (ok)
                        full |= ab_usage_add(m->usage, u->agent, u->audience, u->scope, u->wild, u->now);
                usage_pending_clear(u);
        }
        memmove(m->usage_pending, m->usage_pending + n, (m->n_usage_pending - n) * sizeof *m->usage_pending);
        m->n_usage_pending -= n;
        if (ok)
                usage_count(m, full);
}

void ab_usage_note(ab_manager *m, const char *agent, const char *audience, const char *const *scopes,
                   const char *const *wild, size_t n, int64_t now)
{
        bool full = false;

        if (!m->audit) { /* no audit trail: nothing to wait for */
                for (size_t i = 0; i < n; i++)
                        full |= ab_usage_add(m->usage, agent, audience, scopes[i], wild[i], now);
                usage_count(m, full);
                return;
        }
        for (size_t i = 0; i < n; i++) {
                struct ab_usage_pending *u;
                if (m->n_usage_pending == m->cap_usage_pending) {
                        size_t cap = m->cap_usage_pending ? 2 * m->cap_usage_pending : 64;
                        void *p = reallocarray(m->usage_pending, cap, sizeof *m->usage_pending);
                        if (!p)
                                return; /* a count lost, never a token refused for it */
                        m->usage_pending = p;
                        m->cap_usage_pending = cap;
                }
                u = &m->usage_pending[m->n_usage_pending];
                u->agent = strdup(agent);
                u->audience = strdup(audience);
                u->scope = strdup(scopes[i]);
                u->wild = wild[i] ? strdup(wild[i]) : NULL;
                u->now = now;
                if (!u->agent || !u->audience || !u->scope || (wild[i] && !u->wild)) {
                        usage_pending_clear(u);
                        return;
                }
                m->n_usage_pending++;
        }
}

/* A record names the policy in force when it was made. */
static void stamp_policy(ab_manager *m, json_t *rec)
{
        if (rec && m->policy_version[0] && !json_object_get(rec, "policy"))
                json_object_set_new(rec, "policy", json_string(m->policy_version));
}

int ab_manager_audit(ab_manager *m, const char *event, json_t *rec)
{
        int r;

        if (!m->audit) {
                json_decref(rec);
                return 0;
        }
        stamp_policy(m, rec);
        r = ab_audit_add(m->audit, event, rec);
        if (r < 0)
                ab_log(LOG_ERR, "audit record %s could not be queued: %s", event, ab_strerror(r));
        if (m->audit_defer)
                sd_event_source_set_enabled(m->audit_defer, SD_EVENT_ONESHOT);
        return r;
}

/*
 * One session re-authenticating in a loop while the disk is full kept a
 * record per call, each written again at every failed sync (helper-46):
 * only its latest re-authentication is kept for a retry (the one whose
 * auth_time is in force). Drops an earlier one of entry's session, except
 * those of the batch out.
 */
static void forget_earlier_reauth(ab_manager *m, const json_t *entry)
{
        const char *event = json_string_value(json_array_get(entry, 0));
        const char *sid = json_string_value(json_object_get(json_array_get(entry, 1), "sid"));

        if (!sid || strcmp(event, "session.reauthenticated") != 0)
                return;
        for (size_t i = m->sync_out ? m->changes_inflight : 0; i < json_array_size(m->turn_changes); i++) {
                json_t *ch = json_array_get(m->turn_changes, i);
                const char *s2 = json_string_value(json_object_get(json_array_get(ch, 1), "sid"));
                if (strcmp(json_string_value(json_array_get(ch, 0)), event) == 0 && s2 && strcmp(s2, sid) == 0) {
                        json_array_remove(m->turn_changes, i);
                        return;
                }
        }
}

int ab_manager_audit_change(ab_manager *m, const char *event, json_t *rec)
{
        json_t *copy;
        int r;

        stamp_policy(m, rec);
        /* the time of the change, not of a retry */
        if (rec && !json_object_get(rec, "time"))
                json_object_set_new(rec, "time", json_integer((json_int_t)ab_now_usec()));
        copy = m->audit && rec ? json_deep_copy(rec) : NULL;
        r = ab_manager_audit(m, event, rec);

        if (r >= 0 && copy) {
                json_t *entry = json_pack("[s,o]", event, copy);
                copy = NULL;
                if (!m->turn_changes)
                        m->turn_changes = json_array();
                if (entry && m->turn_changes)
                        forget_earlier_reauth(m, entry);
                /* without memory for the copy, the record is still queued: only a retry after
                 * a failed sync is lost */
                if (!m->turn_changes || !entry || json_array_append_new(m->turn_changes, entry) < 0)
                        ab_log(LOG_ERR, "audit record %s: no memory to keep it for a retry", event);
        }
        json_decref(copy);
        return r;
}

/* Handle buffered messages, at most MSGS_PER_TURN. true if more may remain. */
static bool conn_process(ab_conn *c, bool *ret_drained)
{
        *ret_drained = false; /* set when no complete call is left */
        for (int i = 0; i < MSGS_PER_TURN; i++) {
                const char *msg;
                size_t len;
                ab_vl_call call;
                char reason[256];
                int r;

                if (audit_full(c->m))
                        c->m->audit_stalled = true; /* on_audit_defer wakes it */
                if (c->closing || conn_blocked(c) || c->out_len - c->out_off > OUT_HIGH_WATER)
                        return false;
                r = ab_frame_next(&c->in, &msg, &len);
                if (r == 0) {
                        c->msg_started = ab_frame_pending(&c->in) ? (c->msg_started ? c->msg_started : ab_mono_usec()) : 0;
                        *ret_drained = true;
                        return false;
                }
                if (r < 0) {
                        ab_conn_error(c, "io.agentbroker.MessageTooLarge",
                                      "message exceeds 65536 bytes; closing the connection", NULL);
                        c->closing = true;
                        return false;
                }
                c->msg_started = 0;
                c->last_active = ab_mono_usec();
                if (ab_vl_parse_call(msg, len, &call, reason, sizeof reason) < 0) {
                        ab_conn_error(c, "io.agentbroker.InvalidMessage", reason, NULL);
                        c->closing = true;
                        return false;
                }
                c->call_records = ab_audit_queued_total(c->m->audit);
                ab_dispatch(c, &call);
                ab_vl_call_done(&call);
                if (c->retry_call) {
                        /* its caller's executable is being hashed (ab_conn_wait_hash): the call is
                         * handled again, whole, once that is done */
                        c->retry_call = false;
                        c->oneway = false;
                        ab_frame_unread(&c->in);
                        return false;
                }
        }
        return true;
}

static void conn_update_events(ab_conn *c)
{
        uint32_t ev = 0;

        if (c->hup)
                return; /* its source is off for good */

        if (!c->closing && !c->eof && c->out_len - c->out_off <= OUT_HIGH_WATER &&
            !(conn_blocked(c) && ab_frame_pending(&c->in) > c->in.max))
                ev |= EPOLLIN;
        if ((c->held ? c->held_from : c->out_len) > c->out_off)
                ev |= EPOLLOUT;
        sd_event_source_set_io_events(c->io, ev);
}

/* Count a change of c's input buffer; false if it grew past the caps. */
static bool in_account(ab_conn *c)
{
        ab_manager *m = c->m;
        size_t was = c->in_counted, now = c->in.cap;

        if (now == was)
                return true;
        m->in_bytes = m->in_bytes - was + now;
        c->uslot->in_bytes = c->uslot->in_bytes - was + now;
        c->in_counted = now;
        /* the first 4 KiB always: one small call at a time is never refused */
        return now <= SMALL_IN || now < was || (c->uslot->in_bytes <= IN_BYTES_PER_UID && m->in_bytes <= IN_BYTES_ALL);
}

/* After reading or writing: process, flush, decide what to wait for. */
static void conn_step(ab_conn *c)
{
        bool drained, more = conn_process(c, &drained);

        /* a large message handled: give its buffer back (calls hold copies, never pointers into it) */
        if (ab_frame_pending(&c->in) == 0 && c->in.cap > SMALL_IN) {
                ab_frame_free(&c->in);
                (void)in_account(c);
        }

        if (conn_flush(c) < 0) {
                conn_free(c);
                return;
        }
        if (c->eof && drained && !conn_blocked(c))
                c->closing = true; /* the peer closed and every complete call is answered */
        if (c->closing && c->out_len == c->out_off) {
                conn_free(c);
                return;
        }
        /* more calls (fairness: on the next turn), or stopped at the output high-water mark
         * and below it again after the flush */
        if (more || (!drained && !c->closing && !conn_blocked(c) && c->out_len - c->out_off <= OUT_HIGH_WATER))
                sd_event_source_set_enabled(c->defer, SD_EVENT_ONESHOT);
        conn_update_events(c);
}

static int conn_defer(sd_event_source *s, void *userdata)
{
        (void)s;
        conn_step(userdata);
        return 0;
}

void ab_conn_submit(ab_conn *c, ab_job *j, ab_conn **ref)
{
        *ref = c;
        c->busy_ref = ref;
        c->busy_oneway = c->oneway;
        conn_update_events(c);
        ab_worker_submit(c->m->crypto, j);
}

void ab_manager_drain_jobs(ab_manager *m)
{
        if (m->crypto)
                ab_worker_drain(m->crypto);
}

void ab_conn_after_pending(ab_conn *c)
{
        c->call_records = UINT64_MAX; /* never a count: held if anything is queued */
}

void ab_conn_job_answer(ab_conn *c)
{
        c->oneway = c->busy_oneway;
        c->call_records = ab_audit_queued_total(c->m->audit); /* the job's records are queued from here */
}

void ab_conn_resume(ab_conn *c)
{
        c->busy_ref = NULL;
        c->oneway = false;
        /* the reply is queued (held for its record's batch, or flushed now) */
        if (conn_flush(c) < 0) {
                conn_free(c);
                return;
        }
        conn_continue(c);
        conn_update_events(c);
}

static int conn_io(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        ab_conn *c = userdata;
        size_t total = 0;

        (void)s;
        /* Read even while a call waits for its job or batch (conn_blocked):
         * the bytes wait in c->in, and EPOLLIN stays on unless that is full. */
        if ((revents & EPOLLIN) && !c->eof) {
                while (total < READ_PER_TURN) {
                        char *p;
                        size_t avail;
                        ssize_t n;

                        if (ab_frame_space(&c->in, &p, &avail) < 0)
                                break; /* full: process what is there first */
                        if (!in_account(c)) {
                                ab_conn_error(c, "io.agentbroker.LimitReached",
                                              "too much unfinished input is buffered for this uid or for the broker; "
                                              "closing the connection", NULL);
                                c->closing = true;
                                break;
                        }
                        n = recv(fd, p, avail, MSG_DONTWAIT);
                        if (n < 0) {
                                if (errno == EINTR)
                                        continue;
                                if (errno == EAGAIN)
                                        break;
                                conn_free(c);
                                return 0;
                        }
                        if (n == 0) {
                                /* Peer closed its side: answer what is complete, then close. */
                                c->eof = true;
                                break;
                        }
                        ab_frame_commit(&c->in, (size_t)n);
                        total += (size_t)n;
                        if (ab_frame_pending(&c->in) > c->in.max || (size_t)n < avail)
                                break;
                }
        }
        if ((revents & (EPOLLHUP | EPOLLERR)) && !c->hup) {
                /* Gone altogether: nobody to answer, but the calls it sent before closing
                 * (a oneway Revoke, say) are carried out all the same. The source goes off:
                 * EPOLLHUP cannot be masked and would come back on every turn. */
                c->eof = c->hup = true;
                sd_event_source_set_enabled(c->io, SD_EVENT_OFF);
        }
        conn_step(c); /* after EOF too: it answers every complete call, then closes */
        return 0;
}

#define ACCEPT_PAUSE_USEC (50 * 1000)

static void listen_enable(ab_manager *m, int how)
{
        for (size_t i = 0; i < AB_ARRAY_SIZE(m->listen_src); i++)
                if (m->listen_src[i])
                        sd_event_source_set_enabled(m->listen_src[i], how);
}

static int on_accept_resume(sd_event_source *s, uint64_t usec, void *userdata)
{
        (void)s;
        (void)usec;
        listen_enable(userdata, SD_EVENT_ON);
        return 0;
}

/*
 * accept() failed for want of a file descriptor or memory: the pending
 * connection stays queued and the socket readable, so waiting in the loop
 * would spin. Stop listening for a moment (the connections being served go
 * on, and closing ones give descriptors back), say so at most every 10 s.
 * Also when accept() got the last descriptor and the pidfd found none: that
 * connection is closed, the rest of the backlog waits.
 */
static void accept_pause(ab_manager *m, int err)
{
        uint64_t now = ab_mono_usec();

        m->accept_failures++;
        if (now >= m->accept_logged + 10ull * 1000000) {
                ab_log(LOG_WARNING,
                       "accept: %s (%u connections open, %llu failures since the last message): not accepting "
                       "for 50 ms to 1.6 s at a time until it succeeds; raise LimitNOFILE or lower --max-connections",
                       strerror(err), m->n_conns, (unsigned long long)m->accept_failures);
                m->accept_logged = now;
                m->accept_failures = 0;
        }
        if (!m->accept_timer &&
            sd_event_add_time(m->event, &m->accept_timer, CLOCK_MONOTONIC, 0, 1000, on_accept_resume, m) < 0)
                return; /* no timer: keep trying on each turn, as before */
        listen_enable(m, SD_EVENT_OFF);
        /* 50 ms, doubling while it keeps failing, to 1.6 s: each try may cost a waiting connection */
        if (m->accept_backoff < 6)
                m->accept_backoff++;
        sd_event_source_set_time(m->accept_timer, now + ((uint64_t)ACCEPT_PAUSE_USEC << (m->accept_backoff - 1)));
        sd_event_source_set_enabled(m->accept_timer, SD_EVENT_ONESHOT);
}

/* Whether the peer may use the admin socket: root, or a member of admin_group. */
static bool admin_allowed(const ab_manager *m, const ab_peer *p)
{
        return p->uid == 0 || (m->has_admin_gid && (p->gid == m->admin_gid || ab_peer_in_group(p, m->admin_gid)));
}

/*
 * Connections past --max-connections for root and the admin socket: a few
 * uids holding every connection (1,024 each by default) locked out root's
 * agents, PAM logins (the module runs in sshd, as root) and the admin CLI
 * (helper-50).
 */
#define AB_CONN_RESERVE 64

static void accept_one(ab_manager *m, int lfd, bool admin)
{
        ab_conn *c;
        int fd, r;

        fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
                if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                        accept_pause(m, errno);
                else if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                        ab_log(LOG_WARNING, "accept: %s", strerror(errno));
                return;
        }
        c = calloc(1, sizeof *c);
        if (!c) {
                ab_close(fd);
                return;
        }
        c->m = m;
        c->fd = fd;
        c->admin = admin;
        c->peer.pidfd = -1;
        ab_frame_init(&c->in, AB_MAX_MESSAGE);
        c->last_active = ab_mono_usec();
        c->call_records = ab_audit_queued_total(m->audit);
        c->next = m->conns;
        if (m->conns)
                m->conns->prev = c;
        m->conns = c;
        m->n_conns++;
        sd_event_source_set_enabled(m->exit_timer, SD_EVENT_OFF);

        r = ab_peer_from_socket(fd, &c->peer);
        if (r < 0) {
                ab_log(LOG_DEBUG, "peer credentials unavailable: %s", strerror(-r));
                conn_free(c);
                if (r == -EMFILE || r == -ENFILE)
                        accept_pause(m, -r); /* no pidfd: the rest of the backlog waits instead */
                return;
        }
        c->uslot = uid_get(m, c->peer.charge_uid); /* its connection, rate and input limits */
        if (!c->uslot) {
                conn_free(c);
                return;
        }
        c->uslot->conns++;
        m->accept_backoff = 0;
        if (sd_event_add_io(m->event, &c->io, fd, EPOLLIN, conn_io, c) < 0 ||
            sd_event_add_time(m->event, &c->timer, CLOCK_MONOTONIC, conn_deadline(c), 0, conn_timer, c) < 0 ||
            sd_event_add_defer(m->event, &c->defer, conn_defer, c) < 0) {
                conn_free(c);
                return;
        }
        sd_event_source_set_enabled(c->defer, SD_EVENT_OFF);
        sd_event_source_set_enabled(c->timer, SD_EVENT_ONESHOT);

        /* Limits: answer with an error the client can read, then close. */
        if (admin && !admin_allowed(m, &c->peer)) {
                ab_conn_error(c, "io.agentbroker.PermissionDenied", "the admin socket is for root only", NULL);
                c->closing = true;
        } else if (m->n_conns > m->cfg.max_connections + (admin || c->peer.charge_uid == 0 ? AB_CONN_RESERVE : 0)) {
                ab_conn_error(c, "io.agentbroker.TooManyConnections", "the broker holds its maximum of connections",
                              NULL);
                c->closing = true;
        } else if (c->uslot->conns > m->cfg.max_connections_per_uid) {
                ab_conn_error(c, "io.agentbroker.TooManyConnections", "too many connections from this uid", NULL);
                c->closing = true;
        }
        if (c->closing) {
                if (conn_flush(c) < 0 || c->out_len == c->out_off) {
                        conn_free(c);
                        return;
                }
                conn_update_events(c);
        }
}

static int on_listen(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        ab_manager *m = userdata;
        bool admin = s == m->listen_src[1];

        (void)revents;
        /* A few per wakeup, so that a connect storm cannot starve requests. */
        for (int i = 0; i < 32; i++) {
                unsigned before = m->n_conns;
                accept_one(m, fd, admin);
                if (m->n_conns == before)
                        break;
        }
        return 0;
}

/* ---- startup ----------------------------------------------------------- */

/*
 * Each connection holds two descriptors (the socket and the caller's
 * pidfd). Raise the soft limit to the hard one if that is short of
 * --max-connections, and say so when even the hard limit is: accept() then
 * fails before the limit is reached (see accept_pause).
 */
static void fit_fd_limit(ab_manager *m)
{
        struct rlimit rl;
        rlim_t need = ((rlim_t)m->cfg.max_connections + AB_CONN_RESERVE) * 2 + 256;

        if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= need)
                return;
        if (rl.rlim_max == RLIM_INFINITY || rl.rlim_max > rl.rlim_cur) {
                rlim_t want = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > need ? need : rl.rlim_max;
                struct rlimit nl = { .rlim_cur = want, .rlim_max = rl.rlim_max };
                if (setrlimit(RLIMIT_NOFILE, &nl) == 0)
                        rl.rlim_cur = want;
        }
        if (rl.rlim_cur < need)
                ab_log(LOG_WARNING,
                       "the file descriptor limit (%llu) is below what --max-connections %u needs (%llu, two per "
                       "connection and some to spare): new connections wait once it is reached",
                       (unsigned long long)rl.rlim_cur, m->cfg.max_connections, (unsigned long long)need);
}

static int bind_socket(const char *path, mode_t mode, int *ret)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        struct stat st;
        char dir[sizeof sa.sun_path];
        char *slash;
        int fd;

        if (strlen(path) >= sizeof sa.sun_path)
                return -ENAMETOOLONG;
        memcpy(sa.sun_path, path, strlen(path) + 1);
        memcpy(dir, path, strlen(path) + 1);
        slash = strrchr(dir, '/');
        if (slash && slash != dir) {
                *slash = '\0';
                if (mkdir(dir, 0755) < 0 && errno != EEXIST)
                        return -errno;
        }
        if (lstat(path, &st) == 0) {
                if (!S_ISSOCK(st.st_mode))
                        return -EEXIST;
                /* a socket someone answers on belongs to a running broker: never take it over */
                fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
                        ab_close(fd);
                        return -EADDRINUSE;
                }
                ab_close(fd);
                unlink(path); /* stale socket from an earlier run */
        }
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || chmod(path, mode) < 0 || listen(fd, 4096) < 0) {
                int r = -errno;
                ab_close(fd);
                return r;
        }
        *ret = fd;
        return 0;
}

static int take_sockets(ab_manager *m)
{
        char **names = NULL;
        int n, r = 0;

        n = sd_listen_fds_with_names(1, &names);
        if (n < 0)
                return n;
        for (int i = 0; i < n; i++) {
                int fd = SD_LISTEN_FDS_START + i;
                int which = -1;
                if (names && names[i] && strcmp(names[i], "agent") == 0)
                        which = 0;
                else if (names && names[i] && strcmp(names[i], "admin") == 0)
                        which = 1;
                else if (n == 1 && names && names[i] && strcmp(names[i], "unknown") == 0)
                        which = 0; /* a single unnamed socket is the agent socket */
                if (which < 0 || m->listen_fd[which] >= 0 || sd_is_socket_unix(fd, SOCK_STREAM, 1, NULL, 0) <= 0) {
                        ab_log(LOG_WARNING, "ignoring passed fd %d (name \"%s\")", fd,
                               names && names[i] ? names[i] : "?");
                        close(fd);
                        continue;
                }
                fcntl(fd, F_SETFD, FD_CLOEXEC);
                fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
                m->listen_fd[which] = fd;
        }
        for (int i = 0; names && i < n; i++)
                free(names[i]);
        free(names);
        return r;
}

static int open_state(ab_manager *m)
{
        struct stat st;

        if (mkdir(m->cfg.state_dir, 0700) < 0 && errno != EEXIST)
                return -errno;
        m->state_fd = open(m->cfg.state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
        if (m->state_fd < 0)
                return -errno;
        if (fstat(m->state_fd, &st) < 0)
                return -errno;
        if (st.st_uid != geteuid()) {
                ab_log(LOG_ERR, "state directory %s is not owned by uid %u: refusing", m->cfg.state_dir,
                       (unsigned)geteuid());
                return -EPERM;
        }
        if (st.st_mode & 077) {
                ab_log(LOG_WARNING, "state directory %s was accessible to others (mode %04o); tightening to 0700",
                       m->cfg.state_dir, (unsigned)(st.st_mode & 07777));
                if (fchmod(m->state_fd, 0700) < 0)
                        return -errno;
        }
        /* One broker per state dir: two would each chain their own audit records
         * into one file and sign with one key unaware of each other. Held while
         * state_fd is open, released by the kernel however the broker ends. */
        if (flock(m->state_fd, LOCK_EX | LOCK_NB) < 0) {
                if (errno == EWOULDBLOCK) {
                        ab_log(LOG_ERR, "state directory %s is in use by another agent-brokerd", m->cfg.state_dir);
                        return -EBUSY;
                }
                return -errno;
        }
        return 0;
}

typedef struct diag_sink {
        json_t *findings;
} diag_sink;

static void policy_diag(void *ud, int sev, const char *file, const char *path, const char *msg)
{
        diag_sink *d = ud;

        ab_log(sev == AB_DIAG_ERROR ? LOG_ERR : LOG_WARNING, "policy %s: %s: %s", file, path, msg);
        if (d && d->findings && json_array_size(d->findings) < 64)
                json_array_append_new(d->findings,
                                      json_pack("{s:s, s:s, s:s, s:s}", "file", file, "path", path, "severity",
                                                sev == AB_DIAG_ERROR ? "error" : "warning", "message", msg));
}

#define RETIRED_PREFIX "retired_key:"
/* "retired_end:KID" (the time, 8 bytes): the key's overlap ran out, for good; a record of
 * its own, which a broker before it ignores (it kept the retired_key: record as it was) */
#define RETIRED_END_PREFIX "retired_end:"

typedef struct retired_rec {
        uint8_t pk[32];
        int64_t retired_at, until;
} retired_rec;

static int load_retired(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        ab_manager *m = ud;
        retired_rec r;
        (void)key;
        (void)klen;
        if (vlen != sizeof r)
                return 0;
        memcpy(&r, val, sizeof r);
        (void)ab_signer_add_retired(m->signer, r.pk, r.retired_at, r.until);
        return 0;
}

/* The kid in key (klen bytes: prefix and kid) into kid (64 bytes); false if it is none. */
static bool kid_of(const void *key, size_t klen, const char *prefix, char kid[64])
{
        size_t plen = strlen(prefix);

        if (klen <= plen || klen - plen >= 64)
                return false;
        memcpy(kid, (const char *)key + plen, klen - plen);
        kid[klen - plen] = '\0';
        return true;
}

static int load_retired_end(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        ab_manager *m = ud;
        char kid[64];
        (void)val;
        (void)vlen;
        if (kid_of(key, klen, RETIRED_END_PREFIX, kid))
                ab_signer_end_key(m->signer, kid);
        return 0;
}

static void load_retired_keys(ab_manager *m)
{
        ab_txn *t = NULL;
        if (ab_store_begin(m->store, false, &t) < 0)
                return;
        (void)ab_txn_foreach(t, AB_DB_META, RETIRED_PREFIX, strlen(RETIRED_PREFIX), load_retired, m);
        (void)ab_txn_foreach(t, AB_DB_META, RETIRED_END_PREFIX, strlen(RETIRED_END_PREFIX), load_retired_end, m);
        ab_txn_abort(t);
}

/* The retired keys that verify past a rotation's overlap, to be cut to it: every one in the
 * store, not only the ones the signer lists, which a restart would bring back. */
typedef struct retired_key {
        char key[64];
        retired_rec rec;
} retired_key;

typedef struct retired_cap {
        size_t n, max;
        int64_t until, now;
        retired_key *v;
        ab_manager *m;
        ab_txn *t;
} retired_cap;

static int keep_retired(retired_cap *cap, const void *key, size_t klen, const retired_rec *r)
{
        if (cap->n == cap->max) {
                size_t nm = cap->max ? cap->max * 2 : 16;
                retired_key *v = realloc(cap->v, nm * sizeof *v);
                if (!v)
                        return -ENOMEM;
                cap->v = v;
                cap->max = nm;
        }
        memcpy(cap->v[cap->n].key, key, klen);
        cap->v[cap->n].key[klen] = '\0';
        cap->v[cap->n++].rec = *r;
        return 0;
}

static int find_longer(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        retired_cap *cap = ud;
        retired_rec r;

        if (vlen != sizeof r || klen >= sizeof cap->v[0].key)
                return 0;
        memcpy(&r, val, sizeof r);
        /* a forced rotation (the overlap ends now) ends every earlier key for good, also those
         * whose overlap ended already: stored as an end not after its own retirement, which
         * stays ended whatever the clock says after a restart (see token.c key_valid) */
        bool forced = cap->until <= cap->now;
        if (forced ? r.until <= r.retired_at : r.until <= cap->until)
                return 0;
        r.until = forced && r.retired_at < cap->until ? r.retired_at : cap->until;
        return keep_retired(cap, key, klen, &r);
}

/* The earlier keys whose overlap ran out, naturally (a forced end is stored in the record), and
 * that the store does not say ended: their retired_end: keys, in cap->v. */
static int find_ended(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        retired_cap *cap = ud;
        retired_rec r;
        char kid[64], end_key[sizeof cap->v[0].key];
        const void *v;
        size_t vl;
        int rc;

        if (vlen != sizeof r || !kid_of(key, klen, RETIRED_PREFIX, kid))
                return 0;
        memcpy(&r, val, sizeof r);
        if (r.until <= r.retired_at || (cap->now < r.until && !ab_signer_key_ended(cap->m->signer, kid)))
                return 0;
        snprintf(end_key, sizeof end_key, RETIRED_END_PREFIX "%s", kid);
        rc = ab_txn_get(cap->t, AB_DB_META, end_key, strlen(end_key), &v, &vl);
        if (rc != -ENOENT)
                return rc < 0 ? rc : 0;
        return keep_retired(cap, end_key, strlen(end_key), &r);
}

/*
 * Store that the keys found ended are ended, so that a restart with the
 * clock behind their end does not bring them back. Called when one ends
 * (a retired key is looked up after its overlap) and by the purge timer,
 * which also tries again after a failure.
 */
static void store_key_ends(ab_manager *m)
{
        retired_cap cap = { .now = ab_manager_now(m), .m = m };
        uint8_t when[8];
        ab_txn *t = NULL;
        int r;

        /* read first: a write transaction (and its sync) only when there is something to store */
        r = ab_store_begin(m->store, false, &t);
        if (r < 0)
                goto out;
        cap.t = t;
        r = ab_txn_foreach(t, AB_DB_META, RETIRED_PREFIX, strlen(RETIRED_PREFIX), find_ended, &cap);
        ab_txn_abort(t);
        if (r < 0 || cap.n == 0)
                goto out;
        r = ab_store_begin(m->store, true, &t);
        if (r < 0)
                goto out;
        put_be64(when, (uint64_t)cap.now);
        for (size_t i = 0; r >= 0 && i < cap.n; i++)
                r = ab_txn_put(t, AB_DB_META, cap.v[i].key, strlen(cap.v[i].key), when, sizeof when);
        r = ab_txn_end(t, r);
        for (size_t i = 0; r >= 0 && i < cap.n; i++)
                ab_signer_end_key(m->signer, cap.v[i].key + strlen(RETIRED_END_PREFIX));
out:
        free(cap.v);
        if (r < 0)
                ab_log(LOG_WARNING, "cannot store that a retired signing key ended (tried again in 10 min): %s",
                       ab_strerror(r));
}

static int on_key_end_defer(sd_event_source *s, void *userdata)
{
        (void)s;
        store_key_ends(userdata);
        return 0;
}

static void key_ended(void *userdata)
{
        ab_manager *m = userdata;
        if (m->key_end_defer)
                (void)sd_event_source_set_enabled(m->key_end_defer, SD_EVENT_ONESHOT);
}

/*
 * A new signing key. The current one is kept for verification for overlap
 * seconds, and so, at most, is every key retired before it: a rotation
 * with a short overlap (a key leaked, and which one may not be known) ends
 * them all. Tokens of an earlier key were issued before the previous
 * rotation, so a default overlap ends none of them early.
 */
int ab_manager_rotate_key(ab_manager *m, int64_t overlap, char *old_kid, size_t old_kid_max, int64_t *ret_until)
{
        retired_rec rec;
        retired_cap cap = { 0 };
        char key[64];
        ab_txn *t = NULL;
        int64_t now = ab_manager_now(m);
        int r;

        memcpy(rec.pk, ab_signer_public_key(m->signer), 32);
        rec.retired_at = now;
        rec.until = now + overlap;
        snprintf(old_kid, old_kid_max, "%s", ab_signer_kid(m->signer));
        snprintf(key, sizeof key, RETIRED_PREFIX "%s", old_kid);
        /* the old public key is durable before the new key replaces it */
        cap.until = rec.until;
        cap.now = now;
        r = ab_store_begin(m->store, true, &t);
        if (r < 0)
                return r;
        r = ab_txn_foreach(t, AB_DB_META, RETIRED_PREFIX, strlen(RETIRED_PREFIX), find_longer, &cap);
        for (size_t i = 0; r >= 0 && i < cap.n; i++)
                r = ab_txn_put(t, AB_DB_META, cap.v[i].key, strlen(cap.v[i].key), &cap.v[i].rec,
                               sizeof cap.v[i].rec);
        if (r >= 0)
                r = ab_txn_put(t, AB_DB_META, key, strlen(key), &rec, sizeof rec);
        free(cap.v);
        r = ab_txn_end(t, r);
        if (r < 0)
                return r;
        /* a token prepared under the old kid is signed with the old key, and issued before the rotation */
        ab_manager_drain_jobs(m);
        r = ab_signer_rotate(m->signer, m->state_fd);
        if (r < 0)
                return r;
        ab_signer_cap_retired(m->signer, rec.until, now);
        (void)ab_signer_add_retired(m->signer, rec.pk, rec.retired_at, rec.until);
        *ret_until = rec.until;
        ab_log(LOG_NOTICE, "signing key rotated: %s replaces %s (verifiable until %lld)", ab_signer_kid(m->signer),
               old_kid, (long long)rec.until);
        return 0;
}

#define POLICY_TRUST_KEY "policy_trust"

/*
 * Under which trust the policy in force was compiled: "unsigned", or
 * "signed:" and a SHA-256 over the trusted keys (name and content of each
 * file in the trusted-keys directory, in name order). A broker started with
 * require_signed recompiles a stored policy that was compiled under any
 * other trust, so that turning require_signed on, or removing a key, takes
 * effect at the next start even when the sources did not change.
 */
static void policy_trust(const ab_manager *m, char out[8 + 65])
{
        crypto_hash_sha256_state h;
        uint8_t d[crypto_hash_sha256_BYTES];
        char hex[65];
        struct dirent **names = NULL;
        int n;

        if (!m->cfg.require_signed) {
                snprintf(out, 8 + 65, "unsigned");
                return;
        }
        crypto_hash_sha256_init(&h);
        n = scandir(m->cfg.trusted_keys_dir, &names, NULL, alphasort);
        for (int i = 0; i < n; i++) {
                char path[PATH_MAX], buf[4096];
                int fd = -1;
                ssize_t k;
                size_t l = strlen(names[i]->d_name);
                /* the files the verifier reads (compile.c: *.pub, symlinks followed) */
                if (names[i]->d_name[0] != '.' && l >= 5 && strcmp(names[i]->d_name + l - 4, ".pub") == 0 &&
                    snprintf(path, sizeof path, "%s/%s", m->cfg.trusted_keys_dir, names[i]->d_name) < (int)sizeof path)
                        fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
                if (fd >= 0) {
                        crypto_hash_sha256_update(&h, (const uint8_t *)names[i]->d_name, strlen(names[i]->d_name) + 1);
                        k = read(fd, buf, sizeof buf);
                        if (k > 0)
                                crypto_hash_sha256_update(&h, (const uint8_t *)buf, (size_t)k);
                        close(fd);
                }
                free(names[i]);
        }
        free(names);
        crypto_hash_sha256_final(&h, d);
        sodium_bin2hex(hex, sizeof hex, d, sizeof d);
        snprintf(out, 8 + 65, "signed:%s", hex);
}

static void store_policy_trust(ab_manager *m)
{
        char trust[8 + 65];
        ab_txn *t = NULL;
        policy_trust(m, trust);
        if (ab_store_begin(m->store, true, &t) < 0)
                return;
        if (ab_txn_put(t, AB_DB_META, POLICY_TRUST_KEY, strlen(POLICY_TRUST_KEY), trust, strlen(trust)) < 0)
                ab_txn_abort(t);
        else
                (void)ab_txn_commit(t);
}

/* Was the stored policy compiled under the trust this broker requires? */
static bool stored_trust_ok(ab_manager *m)
{
        char want[8 + 65];
        const void *v;
        size_t vl;
        ab_txn *t = NULL;
        bool ok;

        if (!m->cfg.require_signed)
                return true;
        policy_trust(m, want);
        if (ab_store_begin(m->store, false, &t) < 0)
                return false;
        ok = ab_txn_get(t, AB_DB_META, POLICY_TRUST_KEY, strlen(POLICY_TRUST_KEY), &v, &vl) == 0 &&
             vl == strlen(want) && memcmp(v, want, vl) == 0;
        ab_txn_abort(t);
        return ok;
}

static void set_policy_version(ab_manager *m)
{
        char fp[65];
        ab_policy_stored_fingerprint(m->store, fp);
        snprintf(m->policy_version, sizeof m->policy_version, "%.16s", fp);
}

static int reload_config(ab_manager *m, json_t *who);

/* A reload's reason: ...; and broker.conf was not applied. */
static void conf_not_applied(ab_manager *m, char *reason, size_t reasonmax)
{
        size_t l = strlen(reason);
        if (l < reasonmax)
                snprintf(reason + l, reasonmax - l,
                         "; %s was not applied (it does not parse, or its admin_group cannot be found: see the "
                         "broker's log), its previous settings stay",
                         m->cfg.config_path);
}

int ab_manager_reload_policy(ab_manager *m, json_t *findings, json_t *who, char *reason, size_t reasonmax)
{
        char old_version[sizeof m->policy_version];
        const char *via = json_string_value(json_object_get(who, "via"));
        json_t *rec;
        diag_sink sink = { .findings = findings };
        ab_diag diag = { .emit = policy_diag, .userdata = &sink };

        ab_manager_drain_jobs(m); /* tokens decided under the old policy are issued before it goes */
        ab_policy *p = NULL;
        int r;
        /* A broker.conf that cannot be applied does not hold up the policy: a grant removed
         * must go even while an unrelated setting is broken or a group lookup fails
         * (helper-46). Its previous settings stay, and the reply and the log say so. */
        bool conf_failed = (!via || strcmp(via, "startup") != 0) && reload_config(m, who) < 0;
        ab_compile_opts o = { .policy_path = m->cfg.policy_path, .trusted_keys_dir = m->cfg.trusted_keys_dir,
                              .require_signed = m->cfg.require_signed };

        r = ab_policy_compile(m->store, &o, &diag, &p, reason, reasonmax);
        if (conf_failed)
                conf_not_applied(m, reason, reasonmax);
        if (r < 0) {
                ab_log(LOG_ERR, "policy not loaded: %s; %s", reason,
                       m->policy->n_agents ? "the previous policy stays in force" : "no agent is served");
                /* Under require_signed, a policy compiled under another trust (a key
                 * removed since, or require_signed turned on) must not outlive a
                 * failed recompile: serve nobody rather than what no trusted key signs. */
                bool emptied = false;
                if (m->cfg.require_signed && !stored_trust_ok(m)) {
                        ab_policy *empty = NULL;
                        if (ab_policy_new(&empty) == 0) {
                                ab_policy_free(m->policy);
                                m->policy = empty;
                                emptied = true;
                                ab_log(LOG_ERR, "the policy in force is no longer signed by a trusted key: no agent "
                                                "is served until signed policy sources are deployed");
                        }
                }
                rec = json_pack("{s:s, s:s, s:s}", "decision", "reject", "reason", reason, "source",
                                m->cfg.policy_path);
                if (rec && who)
                        json_object_update(rec, who);
                json_decref(who);
                /* the policy in force changed (emptied): recorded even if this sync fails */
                if (emptied)
                        ab_manager_audit_change(m, "policy.rejected", rec);
                else
                        ab_manager_audit(m, "policy.rejected", rec);
                return r;
        }
        snprintf(old_version, sizeof old_version, "%s", m->policy_version);
        ab_policy_free(m->policy);
        m->policy = p;
        set_policy_version(m);
        store_policy_trust(m);
        snprintf(reason, reasonmax, "policy compiled from %s: %zu agents", m->cfg.policy_path, p->n_agents);
        if (conf_failed)
                conf_not_applied(m, reason, reasonmax);
        /* nothing to record, unless broker.conf changed, or could not be applied (recorded once
         * until it can be: each unrelated file event would record it again) */
        bool conf_news = conf_failed && !m->conf_fail_recorded;
        m->conf_fail_recorded = conf_failed;
        if (via && strcmp(via, "inotify") == 0 && strcmp(old_version, m->policy_version) == 0 && !conf_news &&
            !json_object_get(who, "config")) {
                ab_log(LOG_DEBUG, "policy directory changed, policy unchanged (%s)", m->policy_version);
                json_decref(who);
                return 0;
        }
        ab_log(LOG_INFO, "%s", reason);
        rec = json_pack("{s:s, s:s, s:s, s:i}", "decision", "accept", "reason", reason, "source", m->cfg.policy_path,
                        "agents", (int)p->n_agents);
        if (rec && who)
                json_object_update(rec, who);
        json_decref(who);
        ab_manager_audit_change(m, "policy.loaded", rec); /* in force: recorded even if this sync fails */
        sd_notifyf(0, "STATUS=Serving %zu agents", p->n_agents);
        return 0;
}

/* At start: answer from the store; compile only if the sources changed since. */
static int startup_policy(ab_manager *m)
{
        ab_diag diag = { .emit = policy_diag };
        char stored[65], now[65], reason[512];
        ab_policy *p = NULL;
        int r, k;

        r = ab_policy_from_store(m->store, &diag, &p);
        if (r == 0) {
                ab_policy_free(m->policy);
                m->policy = p;
                set_policy_version(m);
                ab_log(LOG_INFO, "policy from the store: %zu agents", p->n_agents);
        } else if (r != -ENOENT) {
                ab_log(LOG_ERR, "compiled policy in the store does not load (%s); recompiling", ab_strerror(r));
        }
        if (r == 0 && !stored_trust_ok(m)) {
                /* compiled before require_signed was on, or with a key that is no
                 * longer trusted: it must pass the signature checks again or go */
                ab_log(LOG_WARNING, "the stored policy was not compiled under the trust now required "
                                    "(require_signed, trusted keys); recompiling");
                /* a failed recompile leaves no agent served (see ab_manager_reload_policy) */
                (void)ab_manager_reload_policy(m, NULL, json_pack("{s:s}", "via", "startup"), reason, sizeof reason);
                return 0;
        }
        ab_policy_stored_fingerprint(m->store, stored);
        k = ab_policy_fingerprint(m->cfg.policy_path, now);
        if (k < 0) {
                ab_log(LOG_WARNING, "policy sources %s unreadable; %s", m->cfg.policy_path,
                       r == 0 ? "keeping the compiled policy" : "no agent is served");
                return 0;
        }
        if (r == 0 && strcmp(stored, now) == 0)
                return 0;
        if (r == 0 && k == 0) {
                /* No sources at all at start (not yet deployed, or wiped):
                 * keep answering from the compiled policy. An explicit
                 * reload, SIGHUP or a change seen by inotify applies an
                 * empty set. */
                ab_log(LOG_WARNING, "no policy sources in %s; keeping the compiled policy (%zu agents)",
                       m->cfg.policy_path, m->policy->n_agents);
                return 0;
        }
        (void)ab_manager_reload_policy(m, NULL, json_pack("{s:s}", "via", "startup"), reason, sizeof reason);
        return 0;
}

#define AB_PURGE_INTERVAL_USEC (10ull * 60 * 1000000)
#define AB_PURGE_SOON_USEC (30ull * 1000000) /* a full store asks for a purge at most this often */

static void recount_sessions(ab_manager *m);

/* Drop expired sessions and stale revocation entries, and store which earlier keys ended,
 * now and every 10 min; a pass that left some for later runs again after a second. */
static int on_purge_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        ab_manager *m = userdata;
        unsigned n = 0;
        bool more = false;
        int r = ab_session_purge(m->store, ab_manager_now(m), ab_process_running, &n, &more);

        (void)usec;
        m->purge_more = more; /* at start (s NULL): the timer is armed by it */
        m->purged_at = ab_mono_usec();
        recount_sessions(m);
        store_key_ends(m);
        if (r < 0)
                ab_log(LOG_WARNING, "purging expired sessions failed: %s", ab_strerror(r));
        else if (n > 0)
                ab_log(LOG_INFO, "purged %u expired session and revocation records%s", n, more ? "; more next" : "");
        if (s)
                sd_event_source_set_time(s, m->purged_at + (more ? 1000000 : AB_PURGE_INTERVAL_USEC));
        return 0;
}

/*
 * Sessions per uid: counted at start and after each purge (every session
 * record the store holds, expired or not, until it is purged), and one more
 * for each session opened, so that a uid holding most of them is stopped
 * before the store is full for everyone (ab_session_authenticate).
 */
typedef struct ab_uid_count {
        uint32_t uid;
        uint64_t n;
} ab_uid_count;

static ab_uid_count *uid_count_at(const ab_manager *m, uint32_t uid, size_t *ret_pos)
{
        size_t lo = 0, hi = m->n_uid_sessions;
        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                if (m->uid_sessions[mid].uid < uid)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        *ret_pos = lo;
        return lo < m->n_uid_sessions && m->uid_sessions[lo].uid == uid ? &m->uid_sessions[lo] : NULL;
}

static void uid_count_add(void *ud, uint32_t uid)
{
        ab_manager *m = ud;
        size_t pos;
        ab_uid_count *u = uid_count_at(m, uid, &pos);

        m->sessions_total++;
        if (u) {
                u->n++;
                return;
        }
        if (m->n_uid_sessions == m->max_uid_sessions) {
                size_t nm = m->max_uid_sessions ? m->max_uid_sessions * 2 : 16;
                ab_uid_count *v = realloc(m->uid_sessions, nm * sizeof *v);
                if (!v)
                        return; /* not counted: the 90% limit still holds */
                m->uid_sessions = v;
                m->max_uid_sessions = nm;
        }
        memmove(&m->uid_sessions[pos + 1], &m->uid_sessions[pos], (m->n_uid_sessions - pos) * sizeof *m->uid_sessions);
        m->uid_sessions[pos] = (ab_uid_count){ .uid = uid, .n = 1 };
        m->n_uid_sessions++;
}

static void recount_sessions(ab_manager *m)
{
        m->n_uid_sessions = 0;
        m->sessions_total = 0;
        if (ab_session_count_uids(m->store, uid_count_add, m) < 0)
                m->n_uid_sessions = m->sessions_total = 0; /* unknown: nobody is held to a share */
}

bool ab_manager_uid_holds_most(const ab_manager *m, uid_t uid)
{
        size_t pos;
        const ab_uid_count *u = uid_count_at(m, uid, &pos);
        return u && u->n * 2 > m->sessions_total;
}

void ab_manager_session_opened(ab_manager *m, uid_t uid)
{
        uid_count_add(m, uid);
}

void ab_manager_purge_soon(ab_manager *m)
{
        if (m->purge_timer && ab_mono_usec() - m->purged_at >= AB_PURGE_SOON_USEC)
                (void)sd_event_source_set_time(m->purge_timer, ab_mono_usec());
}

static int on_sighup(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata)
{
        char reason[512];
        (void)s;
        (void)si;
        sd_notify(0, "RELOADING=1");
        (void)ab_manager_reload_policy(userdata, NULL, json_pack("{s:s, s:I}", "via", "sighup", "pid", (json_int_t)si->ssi_pid),
                                       reason, sizeof reason);
        sd_notify(0, "READY=1");
        return 0;
}

static int on_reload_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        char reason[512];
        (void)s;
        (void)usec;
        (void)ab_manager_reload_policy(userdata, NULL, json_pack("{s:s}", "via", "inotify"), reason, sizeof reason);
        return 0;
}

/* Changes in the policy directory: reload once things settle (debounce). */
static int on_inotify(sd_event_source *s, const struct inotify_event *ev, void *userdata)
{
        ab_manager *m = userdata;
        (void)s;
        if (ev->len > 0 && ev->name[0] == '.')
                return 0; /* temporary files of editors and atomic writers */
        sd_event_source_set_time(m->reload_timer, ab_mono_usec() + 250 * 1000);
        sd_event_source_set_enabled(m->reload_timer, SD_EVENT_ONESHOT);
        return 0;
}

static int watch_policy(ab_manager *m)
{
        struct stat st;
        char dir[4096];
        int r;

        r = sd_event_add_time(m->event, &m->reload_timer, CLOCK_MONOTONIC, UINT64_MAX, 0, on_reload_timer, m);
        if (r < 0)
                return r;
        sd_event_source_set_enabled(m->reload_timer, SD_EVENT_OFF);
        snprintf(dir, sizeof dir, "%s", m->cfg.policy_path);
        if (stat(dir, &st) == 0 && !S_ISDIR(st.st_mode)) {
                char *slash = strrchr(dir, '/');
                if (slash && slash != dir)
                        *slash = '\0';
                else
                        snprintf(dir, sizeof dir, ".");
        }
        r = sd_event_add_inotify(m->event, &m->inotify, dir,
                                 IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CREATE | IN_ATTRIB,
                                 on_inotify, m);
        if (r < 0)
                ab_log(LOG_WARNING, "cannot watch %s for policy changes (%s); use SIGHUP or 'policy reload'", dir,
                       strerror(-r));
        return 0;
}

int ab_config_load_file(ab_config *c, const char *path)
{
        char *text = NULL, *line, *save = NULL;
        size_t len = 0;
        int r, lineno = 0;

        /* it decides require_signed, trusted_keys and admin_group: held to what a policy source
         * is (owned by root or the broker, writable by no one else); before, anyone who could
         * write it turned signature checks off (helper-54) */
        r = ab_read_trusted_file(path, 64 * 1024, &text, &len);
        if (r == -ENOENT)
                return 0;
        if (r < 0) {
                ab_log(LOG_ERR, "%s: %s", path,
                       r == -EPERM ? "owned by another user or writable by others: not read" : ab_strerror(r));
                return r;
        }
        if (strlen(text) != len) {
                free(text);
                ab_log(LOG_ERR, "%s: contains a NUL byte", path);
                return -EINVAL;
        }
        for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                char *eq, *k, *v, *e;
                lineno++;
                while (*line == ' ' || *line == '\t')
                        line++;
                if (*line == '#' || *line == '\0' || *line == '\r')
                        continue;
                eq = strchr(line, '=');
                if (!eq)
                        goto bad;
                *eq = '\0';
                k = line;
                v = eq + 1;
                for (e = k + strlen(k); e > k && (e[-1] == ' ' || e[-1] == '\t'); e--)
                        e[-1] = '\0';
                while (*v == ' ' || *v == '\t')
                        v++;
                for (e = v + strlen(v); e > v && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r'); e--)
                        e[-1] = '\0';
                if (strcmp(k, "require_signed") == 0) {
                        if (!strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "1"))
                                c->require_signed = true;
                        else if (!strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "0"))
                                c->require_signed = false;
                        else
                                goto bad;
                } else if (strcmp(k, "admin_group") == 0) {
                        if (strlen(v) >= sizeof c->admin_group || !ab_is_scope_token(v, strlen(v)))
                                goto bad;
                        snprintf(c->admin_group, sizeof c->admin_group, "%s", v);
                } else if (strcmp(k, "trusted_keys") == 0) {
                        if (v[0] != '/' || strlen(v) >= sizeof c->trusted_keys_dir)
                                goto bad;
                        snprintf(c->trusted_keys_dir, sizeof c->trusted_keys_dir, "%s", v);
                } else {
                        ab_log(LOG_ERR, "%s:%d: unknown setting \"%.64s\"", path, lineno, k);
                        free(text);
                        return -EINVAL;
                }
        }
        free(text);
        return 0;
bad:
        ab_log(LOG_ERR, "%s:%d: expected \"require_signed = true|false\", \"admin_group = NAME\" or "
               "\"trusted_keys = /DIR\"", path, lineno);
        free(text);
        return -EINVAL;
}

int ab_config_apply_file(ab_config *c)
{
        int r;

        c->require_signed = false;
        snprintf(c->trusted_keys_dir, sizeof c->trusted_keys_dir, "%s", AB_DEFAULT_TRUSTED_KEYS);
        c->admin_group[0] = '\0';
        r = ab_config_load_file(c, c->config_path);
        if (r < 0)
                return r;
        if (c->trusted_keys_arg) {
                if (strlen(c->trusted_keys_arg) >= sizeof c->trusted_keys_dir) {
                        ab_log(LOG_ERR, "--trusted-keys: path too long");
                        return -ENAMETOOLONG;
                }
                snprintf(c->trusted_keys_dir, sizeof c->trusted_keys_dir, "%s", c->trusted_keys_arg);
        }
        if (c->require_signed_arg)
                c->require_signed = true;
        return 0;
}

/*
 * The gid of admin_group (none: *ret_has false). Logged and < 0 if there
 * is no such group (-EINVAL) or the lookup failed (-errno).
 */
static int admin_group_gid(const char *name, gid_t *ret_gid, bool *ret_has)
{
        struct group gr, *res = NULL;
        char *buf = NULL;
        int e = ERANGE;

        *ret_has = false;
        if (!name[0])
                return 0;
        /* a group with many members needs more than a fixed buffer (ERANGE) */
        for (size_t size = 16384; e == ERANGE && size <= 4u << 20; size *= 2) {
                char *nb = realloc(buf, size);
                if (!nb) {
                        e = ENOMEM;
                        break;
                }
                buf = nb;
                e = getgrnam_r(name, &gr, buf, size, &res);
        }
        if (e == 0 && res) {
                *ret_gid = res->gr_gid;
                *ret_has = true;
        }
        free(buf);
        if (e != 0) {
                ab_log(LOG_ERR, "admin_group \"%s\": the group lookup failed: %s", name, strerror(e));
                return -e;
        }
        if (!*ret_has) {
                ab_log(LOG_ERR, "admin_group \"%s\" does not exist", name);
                return -EINVAL;
        }
        return 0;
}

/*
 * On a reload, broker.conf is read again: turning require_signed on, a
 * trusted key directory or an admin group took effect only at a restart
 * before, while a reload reported success (helper-44). A file that does
 * not parse, or whose group cannot be found, changes nothing: < 0.
 */
static int reload_config(ab_manager *m, json_t *who)
{
        ab_config c = m->cfg;
        gid_t gid = 0;
        bool has = false, group_changed;
        json_t *changed = json_object();

        if (ab_config_apply_file(&c) < 0 || admin_group_gid(c.admin_group, &gid, &has) < 0) {
                json_decref(changed);
                return -EINVAL;
        }
        if (c.require_signed != m->cfg.require_signed) {
                ab_log(LOG_NOTICE, "%s: require_signed is now %s", c.config_path, c.require_signed ? "on" : "off");
                json_object_set_new(changed, "require_signed", json_boolean(c.require_signed));
        }
        if (strcmp(c.trusted_keys_dir, m->cfg.trusted_keys_dir) != 0) {
                ab_log(LOG_NOTICE, "%s: trusted keys are now in %s", c.config_path, c.trusted_keys_dir);
                json_object_set_new(changed, "trusted_keys", json_string(c.trusted_keys_dir));
        }
        group_changed = strcmp(c.admin_group, m->cfg.admin_group) != 0 || gid != m->admin_gid || has != m->has_admin_gid;
        if (group_changed) {
                ab_log(LOG_NOTICE, "%s: admin_group is now %s", c.config_path,
                       c.admin_group[0] ? c.admin_group : "none (root only)");
                json_object_set_new(changed, "admin_group", json_string(c.admin_group));
        }
        m->cfg.require_signed = c.require_signed;
        memcpy(m->cfg.trusted_keys_dir, c.trusted_keys_dir, sizeof c.trusted_keys_dir);
        memcpy(m->cfg.admin_group, c.admin_group, sizeof c.admin_group);
        m->admin_gid = gid;
        m->has_admin_gid = has;
        /* on the record: the policy.loaded or policy.rejected of this reload names what changed */
        if (who && json_object_size(changed))
                json_object_set(who, "config", changed);
        json_decref(changed);
        /* an admin connection of a user the new setting no longer lets in goes (it was
         * checked only at accept: helper-46) */
        for (ab_conn *cn = m->conns; group_changed && cn; cn = cn->next) {
                if (!cn->admin || cn->closing || admin_allowed(m, &cn->peer))
                        continue;
                ab_log(LOG_NOTICE, "closing the admin connection of uid %u: admin_group changed",
                       (unsigned)cn->peer.uid);
                /* closed from its own step (conn_step), never here: this reload may be this
                 * connection's own call, still being answered */
                cn->closing = true;
                sd_event_source_set_enabled(cn->defer, SD_EVENT_ONESHOT);
                conn_update_events(cn);
        }
        return 0;
}

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata)
{
        ab_manager *m = userdata;
        (void)s;
        (void)si;
        sd_notify(0, "STOPPING=1\nSTATUS=Shutting down");
        return sd_event_exit(m->event, 0);
}

static int on_exit_timer(sd_event_source *s, uint64_t usec, void *userdata)
{
        ab_manager *m = userdata;
        (void)s;
        (void)usec;
        if (m->n_conns > 0)
                return 0;
        ab_log(LOG_INFO, "idle for %llu s: exiting until the next connection",
               (unsigned long long)(m->cfg.exit_idle_usec / 1000000));
        sd_notify(0, "STOPPING=1\nSTATUS=Idle exit");
        return sd_event_exit(m->event, 0);
}

static void exit_timer_arm(ab_manager *m)
{
        if (!m->exit_timer)
                return;
        sd_event_source_set_time(m->exit_timer, ab_mono_usec() + m->cfg.exit_idle_usec);
        sd_event_source_set_enabled(m->exit_timer, SD_EVENT_ONESHOT);
}

static void default_issuer(ab_manager *m)
{
        sd_id128_t id;
        char buf[SD_ID128_STRING_MAX];

        if (m->cfg.issuer) {
                snprintf(m->issuer, sizeof m->issuer, "%s", m->cfg.issuer);
                return;
        }
        if (sd_id128_get_machine(&id) >= 0)
                snprintf(m->issuer, sizeof m->issuer, "urn:agent-broker:%s", sd_id128_to_string(id, buf));
        else {
                char host[64] = "localhost";
                gethostname(host, sizeof host - 1);
                snprintf(m->issuer, sizeof m->issuer, "urn:agent-broker:%s", host);
        }
}

static void raise_nofile(void)
{
        struct rlimit rl;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
                rl.rlim_cur = rl.rlim_max;
                setrlimit(RLIMIT_NOFILE, &rl);
        }
}

/* Create the directory path is in, if missing (one level, like the state dir). */
static int make_parent_dir(const char *path, mode_t mode)
{
        char dir[4200];
        const char *slash = strrchr(path, '/');

        if (!slash || slash == path)
                return 0;
        if ((size_t)(slash - path) >= sizeof dir)
                return -ENAMETOOLONG;
        memcpy(dir, path, (size_t)(slash - path));
        dir[slash - path] = '\0';
        if (mkdir(dir, mode) < 0 && errno != EEXIST)
                return -errno;
        return 0;
}

int ab_manager_startup(ab_manager *m)
{
        bool created = false;
        int r;

        raise_nofile();
        r = take_sockets(m);
        if (r < 0) {
                ab_log(LOG_ERR, "sd_listen_fds: %s", strerror(-r));
                return r;
        }
        /* the state dir first: its lock says whether another broker runs here */
        r = open_state(m);
        if (r < 0) {
                ab_log(LOG_ERR, "state directory %s: %s", m->cfg.state_dir, strerror(-r));
                return r;
        }
        for (int i = 0; i < 2; i++) {
                const char *path = i == 0 ? m->cfg.socket_path : m->cfg.admin_socket_path;
                if (m->listen_fd[i] >= 0)
                        continue;
                if (!path)
                        path = i == 0 ? AB_DEFAULT_SOCKET : AB_DEFAULT_ADMIN_SOCKET;
                r = bind_socket(path, i == 0 ? 0666 : 0600, &m->listen_fd[i]);
                if (r < 0) {
                        ab_log(LOG_ERR, "cannot listen on %s: %s", path, strerror(-r));
                        return r;
                }
                m->listen_bound[i] = true;
                if (i == 0)
                        m->cfg.socket_path = path;
                else
                        m->cfg.admin_socket_path = path;
        }
        default_issuer(m);
        r = ab_signer_open(m->state_fd, m->issuer, &m->signer, &created);
        if (r < 0) {
                ab_log(LOG_ERR, "signing key %s/%s: %s", m->cfg.state_dir, AB_KEY_FILE,
                       r == AB_ERR_CRYPTO ? "must be a 32-byte regular file owned by the broker, mode 0600"
                                          : strerror(-r));
                return r;
        }
        ab_log(LOG_INFO, "%s signing key %s", created ? "created" : "loaded", ab_signer_kid(m->signer));
        {
                const char *apath = m->cfg.audit_path ? m->cfg.audit_path : AB_AUDIT_DEFAULT_PATH;
                r = make_parent_dir(apath, 0750); /* LogsDirectory= under systemd; by hand, here */
                if (r >= 0)
                        r = ab_audit_open(apath, m->signer, m->cfg.audit_max_size, &m->audit);
                if (r < 0) {
                        ab_log(LOG_ERR, "audit trail %s: %s", apath,
                               r == -EBADMSG ? "the last record is not a valid audit record" : ab_strerror(r));
                        return r;
                }
                ab_audit_set_keep(m->audit, m->cfg.audit_keep); /* before any rotation, at start-up too */
                r = sd_event_add_defer(m->event, &m->audit_defer, on_audit_defer, m);
                if (r < 0)
                        return r;
                (void)sd_event_source_set_priority(m->audit_defer, SD_EVENT_PRIORITY_IDLE);
                (void)sd_event_source_set_enabled(m->audit_defer, SD_EVENT_OFF);
                if (created)
                        ab_manager_audit(m, "key.created", json_pack("{s:s, s:s}", "decision", "accept", "kid",
                                                                     ab_signer_kid(m->signer)));
                r = ab_audit_sync(m->audit);
                if (r < 0) {
                        ab_log(LOG_ERR, "audit trail %s cannot be written: %s", apath, ab_strerror(r));
                        return r;
                }
                m->sync = (ab_sync_job){ .job = { .run = sync_run, .done = sync_done }, .m = m };
                r = ab_worker_new(m->event, "ab-audit", &m->worker);
                if (r >= 0)
                        r = ab_worker_new(m->event, "ab-crypto", &m->crypto);
                if (r >= 0)
                        r = ab_worker_new(m->event, "ab-hash", &m->hasher[0]);
                if (r >= 0)
                        r = ab_worker_new(m->event, "ab-hash-large", &m->hasher[1]);
                if (r < 0) {
                        ab_log(LOG_ERR, "cannot start worker threads: %s", ab_strerror(r));
                        return r;
                }
        }
        r = ab_exe_cache_new(m->cfg.max_exe_size, &m->exe_cache);
        if (r < 0)
                return r;
        r = ab_policy_new(&m->policy);
        if (r < 0)
                return r;
        {
                unsigned schema = 0;
                r = ab_store_open(m->cfg.state_dir, m->cfg.store_max_size, &m->store, &schema);
                if (r < 0) {
                        if (schema > AB_SCHEMA_VERSION)
                                ab_log(LOG_ERR, "the store in %s has schema %u, newer than this broker's %u: "
                                       "refusing to start (upgrade agent-broker)", m->cfg.state_dir, schema,
                                       AB_SCHEMA_VERSION);
                        else
                                ab_log(LOG_ERR, "cannot open the store in %s: %s", m->cfg.state_dir, ab_strerror(r));
                        return r;
                }
        }
        ab_store_on_fatal(store_fatal, m);
        r = sd_event_add_defer(m->event, &m->key_end_defer, on_key_end_defer, m);
        if (r < 0)
                return r;
        (void)sd_event_source_set_enabled(m->key_end_defer, SD_EVENT_OFF);
        ab_signer_on_end(m->signer, key_ended, m);
        load_retired_keys(m);
        r = admin_group_gid(m->cfg.admin_group, &m->admin_gid, &m->has_admin_gid);
        if (r < 0)
                return r;
        r = startup_policy(m);
        if (r < 0)
                return r;
        /* what start-up recorded (policy.loaded) is durable before the first call is
         * served; if the disk refuses, its records of changes wait for the retry timer
         * and the first calls that need the trail */
        if (m->audit) {
                r = ab_audit_sync(m->audit);
                if (r < 0)
                        ab_log(LOG_WARNING, "audit trail %s cannot be written at start: %s", ab_audit_path(m->audit),
                               ab_strerror(r));
                audit_settle(m, r, NULL, 0, json_array_size(m->turn_changes));
                if (r < 0)
                        audit_backoff(m, r);
        }
        r = watch_policy(m);
        if (r < 0)
                return r;
        (void)on_purge_timer(NULL, 0, m);
        r = ab_usage_new(&m->usage);
        if (r < 0)
                return r;
        r = sd_event_add_time(m->event, &m->usage_timer, CLOCK_MONOTONIC, 0, 0, on_usage_timer, m);
        if (r < 0)
                return r;
        (void)sd_event_source_set_enabled(m->usage_timer, SD_EVENT_OFF);
        r = sd_event_add_time_relative(m->event, &m->purge_timer, CLOCK_MONOTONIC,
                                       m->purge_more ? 1000000 : AB_PURGE_INTERVAL_USEC, 0, on_purge_timer, m);
        if (r < 0)
                return r;
        (void)sd_event_source_set_enabled(m->purge_timer, SD_EVENT_ON);

        fit_fd_limit(m);
        for (int i = 0; i < 2; i++) {
                r = sd_event_add_io(m->event, &m->listen_src[i], m->listen_fd[i], EPOLLIN, on_listen, m);
                if (r < 0)
                        return r;
        }
        /* SIGTERM, SIGINT and SIGHUP are blocked since main() began (see there) */
        signal(SIGPIPE, SIG_IGN);
        r = sd_event_add_signal(m->event, &m->sigterm, SIGTERM, on_signal, m);
        if (r >= 0)
                r = sd_event_add_signal(m->event, &m->sigint, SIGINT, on_signal, m);
        if (r >= 0)
                r = sd_event_add_signal(m->event, &m->sighup, SIGHUP, on_sighup, m);
        if (r < 0)
                return r;
        if (m->cfg.exit_idle_usec > 0) {
                r = sd_event_add_time(m->event, &m->exit_timer, CLOCK_MONOTONIC, 0, 0, on_exit_timer, m);
                if (r < 0)
                        return r;
                exit_timer_arm(m);
        }
        (void)sd_event_set_watchdog(m->event, true);
        return 0;
}

int ab_manager_run(ab_manager *m)
{
        sd_notifyf(0, "READY=1\nSTATUS=Serving %zu agents", m->policy ? m->policy->n_agents : (size_t)0);
        return sd_event_loop(m->event);
}

void ab_manager_free(ab_manager *m)
{
        if (!m)
                return;
        atomic_store(&m->hash_cancel, true);
        for (size_t i = 0; i < AB_ARRAY_SIZE(m->hasher); i++) {
                ab_worker_free(m->hasher[i]); /* a hash under way gives up; the connections that waited are freed next */
                m->hasher[i] = NULL;
        }
        while (m->conns)
                conn_free(m->conns);
        uid_sweep(m, true);
        m->accept_timer = sd_event_source_disable_unref(m->accept_timer);
        for (int i = 0; i < 2; i++) {
                sd_event_source_disable_unref(m->listen_src[i]);
                if (m->listen_bound[i]) {
                        const char *path = i == 0 ? m->cfg.socket_path : m->cfg.admin_socket_path;
                        if (path)
                                unlink(path);
                }
                ab_close(m->listen_fd[i]);
        }
        sd_event_source_disable_unref(m->sigterm);
        sd_event_source_disable_unref(m->sigint);
        sd_event_source_disable_unref(m->sighup);
        sd_event_source_disable_unref(m->inotify);
        sd_event_source_disable_unref(m->reload_timer);
        sd_event_source_disable_unref(m->purge_timer);
        m->key_end_defer = sd_event_source_disable_unref(m->key_end_defer);
        if (m->signer)
                ab_signer_on_end(m->signer, NULL, NULL);
        ab_worker_free(m->crypto); /* jobs of closed connections: freed, unanswered */
        m->crypto = NULL;
        ab_worker_free(m->worker); /* the batch out is finished first */
        m->worker = NULL;
        sd_event_source_disable_unref(m->audit_defer);
        m->audit_defer = NULL;
        sd_event_source_disable_unref(m->audit_retry);
        m->audit_retry = NULL;
        sd_event_source_disable_unref(m->usage_timer);
        usage_pending_free(m); /* records of a turn that never synced */
        json_decref(m->turn_changes);
        free(m->usage_pending);
        if (m->usage && m->store)
                (void)ab_usage_flush(m->usage, m->store);
        ab_usage_free(m->usage);
        ab_audit_close(m->audit);
        m->audit = NULL;
        sd_event_source_disable_unref(m->exit_timer);
        m->exit_timer = NULL;
        ab_policy_free(m->policy);
        ab_signer_free(m->signer);
        free(m->uid_sessions);
        ab_exe_cache_free(m->exe_cache);
        ab_store_close(m->store);
        ab_close(m->state_fd);
        sd_event_unref(m->event);
        free(m);
}
