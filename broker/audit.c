/* SPDX-License-Identifier: MIT */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/fs.h>
#include <sys/uio.h>
#include <unistd.h>
#include <sodium.h>
#define SD_JOURNAL_SUPPRESS_LOCATION
#include <systemd/sd-journal.h>
#include "audit.h"
#include "../common/varlink.h"
#include "log.h"
#include "../common/b64.h"
#include "../common/util.h"

static const struct { const char *event, *id; } message_ids[] = {
        { "token.issued", "d7c7f49142834d7a85019bb9b86a7ab2" },
        { "token.denied", "ce4d9aa3c6fa4f208b1cae18008266be" },
        { "token.attenuated", "a0c0cedf1329455fa12483f838e21879" },
        { "token.introspected", "0b1b70251a00456989c4b1a26316efbc" },
        { "token.revoked", "7c47004258e64895bb0d50b3291adb26" },
        { "session.opened", "604e1524ba564dbda15e3fe26a2aad91" },
        { "session.reauthenticated", "a5d7bbfa7ca14af09c80a142b833b648" },
        { "session.expired", "24f88908151742f3a77392a9d8d997b2" },
        { "session.revoked", "db6acd6c281143dcbad942edfe99dfbc" },
        { "agent.revoked", "6b65074916784c3196e38b17a1b547cd" },
        { "revocation.before", "47222bc8f0404f4abb3e4e45955adde2" },
        { "pam.opened", "916097e998b846f9b7e0c38238951a2d" },
        { "pam.closed", "33be8a880ace4ae5ad61bec67d074182" },
        { "policy.loaded", "bf3cd64a764d4f71b1d525ef84848925" },
        { "policy.rejected", "10061e414a744c3a8c6acaa9cac73f96" },
        { "key.created", "6794e94e2bbf459c8955bb1fcdbde3a7" },
        { "key.rotated", "088b33190b1e438bb4ec72a461801fa6" },
        { "audit.checkpoint", "9b4a93722e0b411f8b7cf7fffab7c1b9" },
        { "audit.rotated", "0d40d1c9911f4881a2700aa63d25b283" },
        { "audit.reopened", "2c7c7812a7c144a7219995c528b116bb" },
        { "broker.started", "386c72618540400b8baae6fe08e58afa" },
        { "broker.stopped", "21ac19dde7154811b32ae404566b1deb" },
};

struct ab_audit {
        char *path;
        int fd;
        bool broken;          /* a failed write could not be cut back: nothing more is written */
        uint64_t queued_total; /* records ever queued: only grows (ab_audit_queued_total) */
        const ab_signer *signer;
        uint64_t max_size;
        unsigned keep;        /* rotated files kept, 0: all (ab_audit_set_keep) */
        /* durable state */
        uint64_t size;        /* bytes of the file known durable */
        uint64_t seq;         /* seq of the last durable record */
        char prev[65];        /* hash of the last durable record, hex */
        uint64_t since_checkpoint;
        uint64_t rotate_at;   /* after a failed rotation: not before this size */
        /* queued, not yet durable */
        char *buf;
        size_t len, cap;
        uint64_t q_seq;
        char q_prev[65];
        size_t q_records;
        bool q_checkpoint;    /* the last queued record is a checkpoint */
        /* a batch out for writing (ab_audit_sync_start): what it makes durable */
        bool out;
        uint64_t f_seq;
        char f_prev[65];
        size_t f_records;
        bool f_checkpoint;
        char *spare;          /* the buffer of the last batch, for the next queue */
        size_t spare_cap;
        bool journal;
        uint64_t checked_usec;  /* when file_moved last looked (monotonic) */
        const char *moved;      /* file_moved's reason, for ab_audit_sync */
        bool reopen_failed;     /* logged once until a reopen works */
        bool reopen_foreign;    /* it failed on a file that is not ours at PATH: look once a minute */
        /* where the last ReadAudit page ended, so the next one need not rescan the file */
        struct read_hint {
                uint64_t seq; /* every line before off has a seq <= this */
                off_t off;
        } *hint;
};

const char *ab_audit_message_id(const char *event)
{
        for (size_t i = 0; i < AB_ARRAY_SIZE(message_ids); i++)
                if (strcmp(message_ids[i].event, event) == 0)
                        return message_ids[i].id;
        return NULL;
}

const char *ab_audit_path(const ab_audit *a)
{
        return a->path;
}

static void hash_hex(const char *data, size_t len, char out[65])
{
        uint8_t h[crypto_hash_sha256_BYTES];
        crypto_hash_sha256(h, (const uint8_t *)data, len);
        sodium_bin2hex(out, 65, h, sizeof h);
}


/* Read the last complete line of fd (size bytes): its hash and seq. Cut a torn tail. */
static int recover(ab_audit *a)
{
        struct stat st;
        char *tail = NULL;
        size_t want, n = 0;
        off_t from;

        if (fstat(a->fd, &st) < 0)
                return -errno;
        a->size = (uint64_t)st.st_size;
        memset(a->prev, '0', 64);
        a->prev[64] = '\0';
        a->seq = 0;
        if (st.st_size == 0)
                return 0;
        want = (size_t)AB_MIN((uint64_t)st.st_size, (uint64_t)AB_AUDIT_MAX_RECORD * 2 + 2);
        from = st.st_size - (off_t)want;
        tail = malloc(want + 1);
        if (!tail)
                return -ENOMEM;
        while (n < want) {
                ssize_t k = pread(a->fd, tail + n, want - n, from + (off_t)n);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0) {
                        free(tail);
                        return k < 0 ? -errno : -EIO;
                }
                n += (size_t)k;
        }
        tail[n] = '\0';
        /* a torn last line (crash mid-write before the sync) is cut off */
        size_t end = n;
        while (end > 0 && tail[end - 1] != '\n')
                end--;
        if (end < n) {
                ab_log(LOG_WARNING, "audit log %s ends with a torn record (%zu bytes); cutting it off", a->path,
                       n - end);
                if (ftruncate(a->fd, from + (off_t)end) < 0 || fdatasync(a->fd) < 0) {
                        free(tail);
                        return -errno;
                }
                a->size = (uint64_t)(from + (off_t)end);
        }
        if (end == 0) {
                free(tail);
                return a->size == 0 ? 0 : -EBADMSG;
        }
        size_t start = end - 1;
        while (start > 0 && tail[start - 1] != '\n')
                start--;
        if (start == 0 && from > 0) {
                free(tail);
                return -EBADMSG; /* a line longer than any record we write */
        }
        json_t *rec = json_loadb(tail + start, end - 1 - start, 0, NULL);
        json_t *seq = json_object_get(rec, "seq");
        const char *event = json_string_value(json_object_get(rec, "event"));
        if (!json_is_integer(seq) || json_integer_value(seq) < 1 || json_integer_value(seq) >= AB_AUDIT_MAX_SEQ) {
                json_decref(rec);
                free(tail);
                return -EBADMSG;
        }
        a->seq = (uint64_t)json_integer_value(seq);
        hash_hex(tail + start, end - 1 - start, a->prev);
        /* records after the last checkpoint (a crash, or lines someone appended while the broker
         * was stopped): a clean shutdown still ends the file with a checkpoint, and the log says
         * that the next checkpoint signs records this broker did not write in this run */
        if (!event || strcmp(event, "audit.checkpoint") != 0) {
                a->since_checkpoint = 1;
                ab_log(LOG_WARNING,
                       "audit log %s does not end with a checkpoint (seq %" PRIu64 " is %s): the records after "
                       "the last one are taken over unsigned, and the next checkpoint signs them; run "
                       "'agent-brokerctl audit verify' on a copy taken before this start to check them",
                       a->path, a->seq, event ? event : "not an event");
        }
        json_decref(rec);
        free(tail);
        return 0;
}

static int move_noreplace(const char *from, const char *to);
static void sync_dir(const char *path);
static bool path_is_ours(const ab_audit *a);
static int begin_file(ab_audit *a, int fd, const char *event, json_t *rec);

static int open_file(ab_audit *a)
{
        char fresh[4200];

        /* a rotation that a crash cut between its two renames (PATH -> PATH.1 done, PATH.new ->
         * PATH not): finish it, or the chain would start again at seq 1 in a new PATH */
        snprintf(fresh, sizeof fresh, "%s.new", a->path);
        if (access(a->path, F_OK) < 0 && errno == ENOENT && move_noreplace(fresh, a->path) == 0) {
                sync_dir(a->path);
                ab_log(LOG_WARNING, "audit log %s was missing and %s was there: finished a rotation cut short",
                       a->path, fresh);
        }
        a->fd = open(a->path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0640);
        if (a->fd < 0)
                return -errno;
        /*
         * recover needs to read: reopen read-write, and still O_APPEND: after
         * ftruncate (a torn tail cut here, a failed sync cut back) the file
         * offset would otherwise stay past the end and the next write leave
         * a hole of NUL bytes in the chain.
         */
        int rw = open(a->path, O_RDWR | O_APPEND | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY);
        if (rw < 0)
                return -errno;
        ab_close(a->fd);
        a->fd = rw;
        {
                int flags = 0;
                if (ioctl(a->fd, FS_IOC_GETFLAGS, &flags) == 0 && (flags & FS_APPEND_FL))
                        ab_log(LOG_WARNING,
                               "audit log %s is append-only (chattr +a): the broker cannot cut back a torn or "
                               "failed write, nor rotate the file; a full disk would stop the trail for good "
                               "(remove the flag: chattr -a)",
                               a->path);
        }
        return recover(a);
}

int ab_audit_open(const char *path, const ab_signer *signer, uint64_t max_size, ab_audit **ret)
{
        ab_audit *a = calloc(1, sizeof *a);
        int r;

        if (!a)
                return -ENOMEM;
        a->fd = -1;
        a->signer = signer;
        a->max_size = max_size;
        /* sd_journal_sendv() reports success when journald is absent (it
         * drops the message on ENOENT), so ask once: without journald the
         * copy would cost every record an asprintf per field and a sendmsg. */
        a->journal = access("/run/systemd/journal/socket", F_OK) == 0;
        a->path = strdup(path);
        a->hint = calloc(1, sizeof *a->hint);
        if (!a->path || !a->hint) {
                free(a->path);
                free(a->hint);
                free(a);
                return -ENOMEM;
        }
        r = open_file(a);
        if (r < 0) {
                ab_close(a->fd);
                free(a->path);
                free(a->hint);
                free(a);
                return r;
        }
        a->q_seq = a->seq;
        memcpy(a->q_prev, a->prev, sizeof a->prev);
        *ret = a;
        return 0;
}

static int buf_append(ab_audit *a, const char *s, size_t n)
{
        if (a->len + n > a->cap) {
                size_t nc = a->cap ? a->cap : 16384;
                while (nc < a->len + n)
                        nc *= 2;
                char *b = realloc(a->buf, nc);
                if (!b)
                        return -ENOMEM;
                a->buf = b;
                a->cap = nc;
        }
        memcpy(a->buf + a->len, s, n);
        a->len += n;
        return 0;
}

/* Send the record to journald with one AGENT_BROKER_* field per member. */
static void to_journal(ab_audit *a, const char *event, json_t *rec)
{
        struct iovec iov[40];
        char *fields[40];
        size_t n = 0;
        const char *key, *id = ab_audit_message_id(event);
        json_t *v;
        char msg[512];

        if (!a->journal)
                return;
        const char *agent = json_string_value(json_object_get(rec, "agent"));
        const char *reason = json_string_value(json_object_get(rec, "reason"));
        snprintf(msg, sizeof msg, "MESSAGE=%s%s%s%s%s", event, agent ? " agent " : "", agent ? agent : "",
                 reason ? ": " : "", reason ? reason : "");
        fields[n] = strdup(msg);
        if (id && asprintf(&fields[n + 1], "MESSAGE_ID=%s", id) >= 0)
                n++;
        else
                fields[n + 1] = NULL;
        n++;
        json_object_foreach(rec, key, v) {
                char *f = NULL, up[64];
                size_t i;
                if (n >= AB_ARRAY_SIZE(iov))
                        break;
                for (i = 0; key[i] && i < sizeof up - 1; i++)
                        up[i] = (key[i] >= 'a' && key[i] <= 'z') ? (char)(key[i] - 32) : (key[i] == '.' ? '_' : key[i]);
                up[i] = '\0';
                if (json_is_string(v)) {
                        if (asprintf(&f, "AGENT_BROKER_%s=%s", up, json_string_value(v)) < 0)
                                f = NULL;
                } else if (json_is_integer(v)) {
                        if (asprintf(&f, "AGENT_BROKER_%s=%lld", up, (long long)json_integer_value(v)) < 0)
                                f = NULL;
                } else {
                        char *d = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
                        if (d && asprintf(&f, "AGENT_BROKER_%s=%s", up, d) < 0)
                                f = NULL;
                        free(d);
                }
                if (f)
                        fields[n++] = f;
        }
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
                if (fields[i]) {
                        iov[k].iov_base = fields[i];
                        iov[k].iov_len = strlen(fields[i]);
                        k++;
                }
        if (k > 0 && sd_journal_sendv(iov, (int)k) < 0)
                a->journal = false; /* no journald here: the file is the record */
        for (size_t i = 0; i < n; i++)
                free(fields[i]);
}

/*
 * Cut every string member longer than max bytes (at a UTF-8 boundary) and
 * mark the record "truncated". The caller controls some sizes (its
 * executable's path, escaped six-fold if made of control characters): its
 * record must be shortened, never dropped. false if nothing was longer.
 */
static bool shorten_strings(json_t *rec, size_t max)
{
        const char *key;
        json_t *v;
        bool cut = false;

        json_object_foreach(rec, key, v) {
                size_t n = json_string_length(v);
                char *copy;
                if (!json_is_string(v) || n <= max)
                        continue;
                n = ab_utf8_cut(json_string_value(v), n, max);
                copy = strndup(json_string_value(v), n);
                if (copy && json_string_setn(v, copy, n) == 0)
                        cut = true;
                free(copy);
        }
        if (cut)
                json_object_set_new(rec, "truncated", json_true());
        return cut;
}

static int queue_record(ab_audit *a, const char *event, json_t *rec, bool journal)
{
        char *line;
        size_t len, max = 1024;
        int r;

        if (!json_object_get(rec, "time"))
                json_object_set_new(rec, "time", json_integer((json_int_t)ab_now_usec()));
        json_object_set_new(rec, "event", json_string(event));
        json_object_set_new(rec, "seq", json_integer((json_int_t)(a->q_seq + 1)));
        json_object_set_new(rec, "prev", json_string(a->q_prev));
        for (;;) {
                line = ab_json_dumps(rec, &len);
                if (!line)
                        return -ENOMEM;
                if (len <= AB_AUDIT_MAX_RECORD)
                        break;
                free(line);
                if (max < 64 || !shorten_strings(rec, max))
                        return -E2BIG;
                max /= 4;
        }
        {
                size_t was = a->len;
                r = buf_append(a, line, len);
                if (r == 0)
                        r = buf_append(a, "\n", 1);
                if (r < 0) {
                        a->len = was; /* no half record for the next one to be glued to */
                        free(line);
                        return r;
                }
        }
        hash_hex(line, len, a->q_prev);
        free(line);
        a->q_seq++;
        a->q_records++;
        a->queued_total++;
        if (journal)
                to_journal(a, event, rec);
        return 0;
}

/* ab_audit_add, and ab_audit_requeue for a record journald had (journal false). */
static int add_record(ab_audit *a, const char *event, json_t *rec, bool journal)
{
        int r;

        if (!rec)
                return -ENOMEM;
        /* never a token or a key: callers pass identifiers only */
        json_object_del(rec, "token");
        r = queue_record(a, event, rec, journal); /* "seq" and "prev" afresh, "time" kept if set */
        json_decref(rec);
        return r;
}

int ab_audit_add(ab_audit *a, const char *event, json_t *rec)
{
        return add_record(a, event, rec, true);
}

int ab_audit_requeue(ab_audit *a, const char *event, json_t *rec)
{
        return add_record(a, event, rec, false);
}

uint64_t ab_audit_queued_total(const ab_audit *a)
{
        return a ? a->queued_total : 0;
}

bool ab_audit_pending(const ab_audit *a)
{
        return a && a->q_records > 0;
}

size_t ab_audit_queued_bytes(const ab_audit *a)
{
        return a ? a->len : 0;
}

static int add_checkpoint(ab_audit *a)
{
        char input[160], sig_b64[AB_B64_ENCODED_LEN(64) + 1];
        uint8_t sig[64];
        int n = ab_audit_checkpoint_input(a->q_seq + 1, a->q_prev, input, sizeof input);

        if (n < 0)
                return n;
        ab_signer_sign(a->signer, input, (size_t)n, sig);
        (void)ab_b64url_encode(sig, sizeof sig, sig_b64, sizeof sig_b64);
        a->q_checkpoint = true;
        return ab_audit_add(a, "audit.checkpoint",
                            json_pack("{s:s, s:s, s:s}", "kid", ab_signer_kid(a->signer), "sig", sig_b64, "alg",
                                      "EdDSA"));
}

static void drop_queue(ab_audit *a);

static int write_all(int fd, const char *p, size_t n)
{
        while (n > 0) {
                ssize_t k = write(fd, p, n);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0)
                        return -errno;
                if (k == 0)
                        return -EIO;
                p += k;
                n -= (size_t)k;
        }
        return 0;
}

static void drop_queue(ab_audit *a)
{
        a->len = 0;
        a->q_records = 0;
        a->q_checkpoint = false;
        a->q_seq = a->seq;
        memcpy(a->q_prev, a->prev, sizeof a->prev);
        if (a->cap > 1024 * 1024) {
                free(a->buf);
                a->buf = NULL;
                a->cap = 0;
        }
}

/* The directory of path, into dir. */
static void dir_of(const char *path, char *dir, size_t dirmax)
{
        const char *slash = strrchr(path, '/');

        if (!slash)
                snprintf(dir, dirmax, ".");
        else
                snprintf(dir, dirmax, "%.*s", (int)(slash == path ? 1 : slash - path), path);
}

/* Make a rename in the log's directory durable. */
static void sync_dir(const char *path)
{
        char dir[4200];
        int fd;

        dir_of(path, dir, sizeof dir);
        fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0) {
                (void)fsync(fd);
                ab_close(fd);
        }
}

static int sync_once(ab_audit *a);

static int cmp_desc(const void *x, const void *y)
{
        unsigned a = *(const unsigned *)x, b = *(const unsigned *)y;
        return a < b ? 1 : a > b ? -1 : 0;
}

/*
 * The k of every rotated file PATH.k in the log's directory, largest
 * first. Only names the broker makes count: k decimal without a leading
 * zero, at most 9 digits; anything else there (PATH.7.gz, PATH.new) is
 * neither renamed nor deleted. -EDQUOT once more than max are found.
 */
static int list_rotated(const char *path, size_t max, unsigned **ret, size_t *ret_n)
{
        const char *slash = strrchr(path, '/'), *base = slash ? slash + 1 : path;
        size_t blen = strlen(base), n = 0, cap = 0, kl;
        unsigned *ks = NULL;
        const char *k;
        char dir[4200];
        struct dirent *de;
        DIR *d;
        int r = 0;

        dir_of(path, dir, sizeof dir);
        d = opendir(dir);
        if (!d)
                return -errno;
        for (;;) {
                errno = 0;
                de = readdir(d);
                if (!de) {
                        r = -errno;
                        break;
                }
                if (strncmp(de->d_name, base, blen) != 0 || de->d_name[blen] != '.')
                        continue;
                k = de->d_name + blen + 1;
                kl = strlen(k);
                if (kl == 0 || kl > 9 || k[0] == '0' || strspn(k, "0123456789") != kl)
                        continue;
                if (n == max) {
                        r = -EDQUOT;
                        break;
                }
                if (n == cap) {
                        size_t nc = cap ? cap * 2 : 64;
                        unsigned *g = realloc(ks, nc * sizeof *ks);
                        if (!g) {
                                r = -ENOMEM;
                                break;
                        }
                        ks = g;
                        cap = nc;
                }
                ks[n++] = (unsigned)strtoul(k, NULL, 10);
        }
        closedir(d);
        if (r < 0) {
                free(ks);
                return r;
        }
        if (n > 1) /* none: ks is NULL, which qsort must not get */
                qsort(ks, n, sizeof *ks, cmp_desc);
        *ret = ks;
        *ret_n = n;
        return 0;
}

/*
 * rename() that never replaces: an audit file already at to stays, and
 * the rename fails with -EEXIST.
 */
static int move_noreplace(const char *from, const char *to)
{
        struct stat st;

        if (renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) == 0)
                return 0;
        if (errno != EINVAL && errno != ENOSYS)
                return -errno;
        /* a filesystem without RENAME_NOREPLACE: look first (the broker is the one writer here) */
        if (lstat(to, &st) == 0)
                return -EEXIST;
        return rename(from, to) < 0 ? -errno : 0;
}

void ab_audit_set_keep(ab_audit *a, unsigned keep)
{
        if (a)
                a->keep = keep;
}

/*
 * A write or sync failed: keep the chain whole by forgetting what was not
 * made durable. start is where the write began (the file's end before it),
 * -1 if unknown.
 */
static void cut_back(ab_audit *a, int64_t start)
{
        struct stat st = { 0 };
        bool known = a->fd >= 0 && fstat(a->fd, &st) == 0;
        bool written;

        if (known && (uint64_t)st.st_size < a->size) {
                /* emptied under the broker since its last look (copytruncate): a cut "back" to the
                 * old size would fill the gap with NUL bytes; cut to where this write began */
                ab_log(LOG_ERR, "audit log %s is shorter than what the broker wrote (truncated in place?)", a->path);
                a->size = start >= 0 && start <= st.st_size ? (uint64_t)start : (uint64_t)st.st_size;
                memset(a->hint, 0, sizeof *a->hint);
        }
        /* nothing written past the durable end (a write that failed at once): nothing to cut,
         * and an append-only file would refuse even a truncate to its own size */
        written = a->fd >= 0 && !(known && (uint64_t)st.st_size == a->size);

        if (written && ftruncate(a->fd, (off_t)a->size) < 0) {
                /* what follows byte a->size is not the chain (a torn line, records
                 * whose requests were refused): writing after it would break the
                 * trail for good, so nothing more is written (fail closed) */
                ab_log(LOG_CRIT,
                       "audit log %s: cannot cut a failed write back to %llu bytes (%s): refusing every request "
                       "that needs the audit trail until the broker is restarted%s",
                       a->path, (unsigned long long)a->size, strerror(errno),
                       errno == EPERM ? " (is the file append-only, chattr +a? remove the flag)" : "");
                a->broken = true;
        }
        drop_queue(a);
}

/*
 * The next file is made whole under a temporary name first (created, its
 * first record audit.rotated durable), and only then renamed into place:
 * if any step fails (no inode, no space) this file stays current and
 * nothing is lost; rotation is tried again later.
 *
 * The rotated files shift up, PATH.k to PATH.k+1, largest k first so that
 * no rename meets a name still taken (and none replaces a file). With
 * --audit-keep N those that would pass PATH.N are deleted instead;
 * keeping all (the default) nothing is ever deleted, and past
 * AB_AUDIT_MAX_ROTATED files rotation stops: each one renames every file,
 * on the event loop.
 */
static int rotate(ab_audit *a)
{
        char from[4200], to[4200], next[4200], fresh[4200], prev[65], largest[4200] = "", smallest[4200] = "";
        int old_fd = a->fd, fd, r;
        uint64_t old_size = a->size, old_seq = a->seq, old_since = a->since_checkpoint;
        bool old_broken = a->broken;
        unsigned *ks = NULL;
        size_t n = 0, shifted = 0, dropped = 0;

        /* a file at PATH that is not the broker's (left there when a reopen failed) is
         * neither renamed into the rotated files nor named as the previous one */
        if (!path_is_ours(a))
                return -ESTALE;
        /* this rotation makes one more: with AB_AUDIT_MAX_ROTATED there already, no */
        r = list_rotated(a->path, a->keep ? SIZE_MAX : AB_AUDIT_MAX_ROTATED - 1, &ks, &n);
        if (r == -EDQUOT)
                ab_log(LOG_ERR,
                       "audit log %s: %d rotated files %s.N or more, the most kept without --audit-keep: not "
                       "rotating until some are archived or deleted",
                       a->path, AB_AUDIT_MAX_ROTATED, a->path);
        if (r < 0)
                return r;
        memcpy(prev, a->prev, sizeof prev);
        snprintf(to, sizeof to, "%s.1", a->path);
        snprintf(fresh, sizeof fresh, "%s.new", a->path);
        (void)unlink(fresh); /* left by a crash mid-rotation */
        fd = open(fresh, O_RDWR | O_APPEND | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0640);
        if (fd < 0) {
                free(ks);
                return -errno;
        }
        r = begin_file(a, fd, "audit.rotated", json_pack("{s:s}", "previous_file", to));
        if (r < 0)
                goto undo;
        /* PATH.k -> PATH.k+1, largest first; none is deleted before the rotation is done,
         * and a failure renames back what was moved, so a failed rotation loses nothing */
        for (shifted = 0; shifted < n; shifted++) {
                snprintf(from, sizeof from, "%s.%u", a->path, ks[shifted]);
                snprintf(next, sizeof next, "%s.%u", a->path, ks[shifted] + 1);
                r = move_noreplace(from, next);
                if (r == -ENOENT) { /* archived away meanwhile */
                        ks[shifted] = 0; /* nothing to move back or delete */
                        continue;
                }
                if (r < 0) {
                        ab_log(LOG_ERR, "audit log rotation: cannot rename %s to %s: %s", from, next, ab_strerror(r));
                        goto unshift;
                }
        }
        r = move_noreplace(a->path, to);
        if (r < 0)
                goto unshift;
        if (rename(fresh, a->path) < 0) {
                r = -errno;
                (void)rename(to, a->path);
                goto unshift;
        }
        /* done: now the files past --audit-keep go, and the log names them (largest first) */
        for (size_t i = 0; a->keep && i < n; i++) {
                if (!ks[i] || ks[i] + 1 <= a->keep)
                        continue;
                snprintf(next, sizeof next, "%s.%u", a->path, ks[i] + 1);
                if (unlink(next) < 0 && errno != ENOENT) {
                        ab_log(LOG_WARNING, "audit log rotation: cannot delete %s (--audit-keep %u): %s", next, a->keep,
                               strerror(errno));
                        continue;
                }
                if (dropped++ == 0)
                        snprintf(largest, sizeof largest, "%s", next);
                snprintf(smallest, sizeof smallest, "%s", next);
        }
        if (dropped == 1)
                ab_log(LOG_WARNING, "audit log rotation deleted %s (--audit-keep %u)", largest, a->keep);
        else if (dropped > 1)
                ab_log(LOG_WARNING, "audit log rotation deleted %zu files, %s to %s (--audit-keep %u)", dropped,
                       smallest, largest, a->keep);
        free(ks);
        ab_close(old_fd);
        sync_dir(a->path);
        memset(a->hint, 0, sizeof *a->hint); /* offsets of the old file */
        return 0;
unshift:
        while (shifted-- > 0) {
                if (!ks[shifted])
                        continue;
                snprintf(from, sizeof from, "%s.%u", a->path, ks[shifted]);
                snprintf(next, sizeof next, "%s.%u", a->path, ks[shifted] + 1);
                if (move_noreplace(next, from) < 0)
                        ab_log(LOG_ERR, "audit log rotation: cannot rename %s back to %s", next, from);
        }
undo:
        free(ks);
        ab_close(fd);
        (void)unlink(fresh);
        a->fd = old_fd;
        a->size = old_size;
        a->seq = old_seq;
        a->since_checkpoint = old_since;
        a->broken = old_broken; /* a cut back that failed on the new file, now gone, says nothing of this one */
        memcpy(a->prev, prev, sizeof prev);
        drop_queue(a);
        return r;
}

/* Write and sync the queue once. On failure cut the file back and drop the queue. */
static int sync_once(ab_audit *a)
{
        int64_t start = a->fd < 0 ? -1 : (int64_t)lseek(a->fd, 0, SEEK_END); /* where an O_APPEND write goes */
        int r = a->fd < 0 ? -EBADF : write_all(a->fd, a->buf, a->len);

        if (r == 0 && fdatasync(a->fd) < 0)
                r = -errno;
        if (r < 0) {
                cut_back(a, start);
                return r;
        }
        a->size += a->len;
        a->seq = a->q_seq;
        memcpy(a->prev, a->q_prev, sizeof a->prev);
        a->since_checkpoint = a->q_checkpoint ? 0 : a->since_checkpoint + a->q_records;
        a->q_checkpoint = false;
        a->len = 0;
        a->q_records = 0;
        return 0;
}

/* What PATH names: 0 the file the broker writes (*fst its stat), 1 another file, < 0 none (-ENOENT) or unknown. */
static int path_state(const ab_audit *a, struct stat *fst)
{
        struct stat pst;

        if (a->fd < 0 || fstat(a->fd, fst) < 0)
                return -EBADF;
        if (stat(a->path, &pst) < 0)
                return -errno;
        return pst.st_dev == fst->st_dev && pst.st_ino == fst->st_ino ? 0 : 1;
}

/*
 * Whether PATH still names the file the broker writes, looked at once a
 * second at most, before a batch: logrotate's rename (without
 * copytruncate), a mv or an rm left the broker writing, until a restart,
 * into a file nobody looked at or that was gone (compressed away, say).
 * Returns why it does not (then ab_audit_sync goes on in a new file at
 * PATH: reopen), or NULL. A file truncated in place (copytruncate) is
 * logged and its durable size corrected, so that a failed write is never
 * "cut back" past the end, which would fill the gap with NUL bytes.
 */
static const char *file_moved(ab_audit *a)
{
        struct stat fst;
        uint64_t now = ab_mono_usec();
        int r;

        /* after a reopen that failed on a file that is not ours at PATH, once a minute: each try
         * writes on the event loop. Any other failure (the file removed, the new one refused for
         * a moment) is tried again every second: the broker may be writing into a removed file. */
        if (a->fd < 0 || a->out || now - a->checked_usec < (a->reopen_foreign ? 60000000ull : 1000000ull))
                return NULL;
        a->checked_usec = now;
        r = path_state(a, &fst);
        if (r == 1)
                return "moved away (another file is at its path)";
        if (r < 0)
                return r == -ENOENT ? "removed or moved away" : NULL;
        a->reopen_failed = a->reopen_foreign = false; /* at its path again, however */
        if ((uint64_t)fst.st_size < a->size) {
                ab_log(LOG_ERR,
                       "audit log %s was truncated in place (%llu bytes where %llu were written): the trail goes "
                       "on where it now ends, and the file no longer verifies on its own; let the broker rotate it "
                       "(--audit-max-size), not logrotate",
                       a->path, (unsigned long long)fst.st_size, (unsigned long long)a->size);
                a->size = (uint64_t)fst.st_size;
                memset(a->hint, 0, sizeof *a->hint); /* offsets of what was there */
        }
        return NULL;
}

/* Whether PATH names the file the broker writes (a rotation renames PATH: only its own). */
static bool path_is_ours(const ab_audit *a)
{
        struct stat st;

        return path_state(a, &st) == 0;
}

/*
 * The trail goes on in fd, a new empty file: its first record (event,
 * rec: audit.rotated, audit.reopened) names the last one written before,
 * so the chain continues across the files. Durable when this returns 0;
 * on failure the caller puts a->fd and a->size back.
 */
static int begin_file(ab_audit *a, int fd, const char *event, json_t *rec)
{
        int r;

        a->fd = fd;
        a->size = 0;
        r = ab_audit_add(a, event, rec);
        return r < 0 ? r : sync_once(a); /* a failed sync cut fd back to empty and dropped the queue */
}

/*
 * Go on in a new file at PATH after the old one was moved or removed
 * (file_moved): an empty file there (logrotate's "create" makes one) or a
 * new one, whose first record, audit.reopened, continues the chain from
 * the last record written to the old file, as audit.rotated does after a
 * rotation. A file with content there is not ours: -EEXIST, and the trail
 * stays in the old file. On any failure nothing changes.
 */
static int reopen(ab_audit *a, const char *why)
{
        int old_fd = a->fd, fd, r;
        uint64_t old_size = a->size;
        bool old_broken = a->broken;
        struct stat st;

        fd = open(a->path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0640);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0 || st.st_size != 0) {
                ab_close(fd);
                return -EEXIST;
        }
        r = begin_file(a, fd, "audit.reopened", json_pack("{s:s}", "reason", why));
        if (r < 0) {
                drop_queue(a);
                ab_close(fd);
                a->fd = old_fd;
                a->size = old_size;
                a->broken = old_broken;
                return r;
        }
        ab_close(old_fd);
        sync_dir(a->path);
        memset(a->hint, 0, sizeof *a->hint); /* offsets of the old file */
        a->rotate_at = 0;
        return 0;
}

static int checkpoint_if_due(ab_audit *a)
{
        int r = 0;

        if (a->since_checkpoint + a->q_records >= AB_AUDIT_CHECKPOINT_EVERY) {
                r = add_checkpoint(a);
                if (r < 0)
                        drop_queue(a);
        }
        return r;
}

static bool rotation_due(const ab_audit *a)
{
        return a->max_size && a->size >= a->max_size && a->size >= a->rotate_at;
}

int ab_audit_sync_start(ab_audit *a, ab_audit_batch *b)
{
        int r;

        if (!a || a->q_records == 0)
                return 1;
        if (rotation_due(a) || (a->moved = file_moved(a))) { /* rare: rotate or reopen here, in the caller's
                                                              * thread, as ab_audit_sync does */
                r = ab_audit_sync(a);
                return r < 0 ? r : 2;
        }
        if (a->broken) {
                drop_queue(a);
                return -EIO;
        }
        r = checkpoint_if_due(a);
        if (r < 0)
                return r;
        if (a->fd < 0) {
                drop_queue(a);
                return -EBADF;
        }
        *b = (ab_audit_batch){ .fd = a->fd, .buf = a->buf, .len = a->len, .cap = a->cap };
        a->out = true;
        a->f_seq = a->q_seq;
        memcpy(a->f_prev, a->q_prev, sizeof a->f_prev);
        a->f_records = a->q_records;
        a->f_checkpoint = a->q_checkpoint;
        /* records queued from now on continue the chain after this batch */
        a->buf = a->spare;
        a->cap = a->spare_cap;
        a->spare = NULL;
        a->spare_cap = 0;
        a->len = 0;
        a->q_records = 0;
        a->q_checkpoint = false;
        return 0;
}

void ab_audit_batch_write(ab_audit_batch *b)
{
        b->start = (int64_t)lseek(b->fd, 0, SEEK_END); /* where an O_APPEND write goes: for cut_back */
        b->result = write_all(b->fd, b->buf, b->len);
        if (b->result == 0 && fdatasync(b->fd) < 0)
                b->result = -errno;
}

int ab_audit_sync_finish(ab_audit *a, ab_audit_batch *b)
{
        int r = b->result;

        a->out = false;
        if (r < 0) {
                cut_back(a, b->start); /* records queued after the batch name its records, which are gone: they go too */
        } else {
                a->size += b->len;
                a->seq = a->f_seq;
                memcpy(a->prev, a->f_prev, sizeof a->prev);
                a->since_checkpoint = a->f_checkpoint ? 0 : a->since_checkpoint + a->f_records;
        }
        if (b->cap <= 1024 * 1024 && !a->spare) {
                a->spare = b->buf;
                a->spare_cap = b->cap;
        } else {
                free(b->buf);
        }
        *b = (ab_audit_batch){ .fd = -1 };
        return r;
}

bool ab_audit_batch_out(const ab_audit *a)
{
        return a && a->out;
}

int ab_audit_sync(ab_audit *a)
{
        const char *moved;
        int r;

        if (!a || a->q_records == 0)
                return 0;
        if (a->broken) {
                drop_queue(a);
                return -EIO;
        }
        moved = a->moved ? a->moved : file_moved(a);
        a->moved = NULL;
        /* the old file ends with a checkpoint, as before a rotation: it verifies on its own */
        r = moved ? add_checkpoint(a) : checkpoint_if_due(a);
        if (r < 0) {
                drop_queue(a);
                return r;
        }
        r = sync_once(a); /* what was queued goes where the chain was: to the old file */
        if (r < 0)
                return r;
        if (moved) {
                r = reopen(a, moved);
                if (r < 0 && !a->reopen_failed)
                        ab_log(LOG_ERR,
                               "audit log %s was %s, and the broker cannot go on in a new file there (%s): the trail "
                               "goes on in the old file; trying again every %s",
                               a->path, moved, r == -EEXIST ? "a file with content is at the path" : ab_strerror(r),
                               r == -EEXIST ? "minute" : "second");
                else if (r == 0)
                        ab_log(LOG_WARNING,
                               "audit log %s was %s: the trail goes on in a new file at that path, whose first "
                               "record (audit.reopened) continues the chain from the last one written to the old "
                               "file; use the broker's rotation (--audit-max-size), not logrotate or mv",
                               a->path, moved);
                a->reopen_failed = r < 0;
                a->reopen_foreign = r == -EEXIST;
                return 0; /* the caller's records are durable either way */
        }
        if (rotation_due(a)) {
                r = add_checkpoint(a);
                if (r == 0)
                        r = sync_once(a);
                if (r == 0)
                        r = rotate(a);
                if (r < 0) {
                        /* keep writing here; try again after another sixteenth of max_size */
                        a->rotate_at = a->size + a->max_size / 16;
                        if (r == -ESTALE)
                                ab_log(LOG_ERR, "audit log %s is not the file the broker writes (a new one could not "
                                       "be made there): not rotating", a->path);
                        else
                                ab_log(LOG_ERR, "audit log rotation failed (%s); %s stays current", ab_strerror(r),
                                       a->path);
                } else {
                        a->rotate_at = 0;
                }
        }
        return 0; /* the caller's records are durable either way */
}

void ab_audit_close(ab_audit *a)
{
        if (!a)
                return;
        if (a->fd >= 0 && (a->q_records > 0 || a->since_checkpoint > 0)) {
                size_t n = a->q_records;
                int r = add_checkpoint(a);
                if (r == 0)
                        r = ab_audit_sync(a);
                if (r < 0 && n > 0) /* among them, perhaps, the records of changes made (revocations, ...) */
                        ab_log(LOG_ERR, "audit log %s: %zu records could not be written before exit: %s", a->path, n,
                               ab_strerror(r));
        }
        ab_close(a->fd);
        free(a->buf);
        free(a->spare);
        free(a->path);
        free(a->hint);
        free(a);
}

int ab_audit_read(const ab_audit *a, uint64_t after_seq, uint64_t since_usec, const char *agent, const char *event,
                  size_t limit, size_t max_bytes, json_t **ret_records, uint64_t *ret_next_seq, bool *ret_more)
{
        FILE *f;
        char *line = malloc(AB_AUDIT_MAX_RECORD + 1);
        size_t bytes = 0, kept = 0;
        ssize_t n;
        json_t *out = json_array();
        uint64_t next = after_seq;
        bool more = false;

        if (!out || !line) {
                json_decref(out);
                free(line);
                return -ENOMEM;
        }
        /* the file the broker writes, through its descriptor: what is at PATH may be another
         * (a reopen that failed leaves the broker writing into the file moved away) */
        char self[64];
        snprintf(self, sizeof self, "/proc/self/fd/%d", a->fd);
        f = a->fd >= 0 ? fopen(self, "re") : NULL;
        if (!f)
                f = fopen(a->path, "re");
        if (!f) {
                int r = -errno;
                json_decref(out);
                free(line);
                return r;
        }
        /* the next page of a listing starts where the last one ended (a durable line: never cut) */
        off_t pos = 0;
        if (a->hint->off > 0 && after_seq >= a->hint->seq && (uint64_t)a->hint->off <= a->size &&
            fseeko(f, a->hint->off, SEEK_SET) == 0)
                pos = a->hint->off;
        while ((n = ab_read_line(f, line, AB_AUDIT_MAX_RECORD + 1, &kept)) > 0) {
                json_t *rec, *seq;
                off_t start = pos;
                pos += n;
                if ((size_t)n > kept) {
                        /* longer than any record the broker writes: someone else's, and no page could
                         * hold it; passed over (audit verify names it), the listing goes on after it */
                        ab_log(LOG_WARNING,
                               "audit log %s: the line at byte %lld is longer than any audit record (%zd bytes); "
                               "ReadAudit passes over it: run 'agent-brokerctl audit verify'",
                               a->path, (long long)start, n);
                        continue;
                }
                if (line[n - 1] != '\n')
                        break; /* being written */
                rec = json_loadb(line, (size_t)n - 1, 0, NULL);
                seq = json_object_get(rec, "seq");
                if (!json_is_integer(seq) || (uint64_t)json_integer_value(seq) <= after_seq ||
                    (uint64_t)json_integer_value(seq) > a->seq ||
                    (uint64_t)json_integer_value(json_object_get(rec, "time")) < since_usec ||
                    (agent && (!json_is_string(json_object_get(rec, "agent")) ||
                               strcmp(json_string_value(json_object_get(rec, "agent")), agent) != 0)) ||
                    (event && (!json_is_string(json_object_get(rec, "event")) ||
                               strcmp(json_string_value(json_object_get(rec, "event")), event) != 0))) {
                        if (json_is_integer(seq) && (uint64_t)json_integer_value(seq) > next &&
                            (uint64_t)json_integer_value(seq) <= a->seq)
                                next = (uint64_t)json_integer_value(seq); /* skipped records count as read */
                        json_decref(rec);
                        continue;
                }
                /* a page holds at least one record, whatever max_bytes says: else the next
                 * call would start at the same line and a listing would never end */
                if (json_array_size(out) >= limit ||
                    (json_array_size(out) > 0 && bytes + (size_t)n > max_bytes)) {
                        json_decref(rec);
                        more = true;
                        a->hint->seq = next;
                        a->hint->off = start;
                        break;
                }
                next = (uint64_t)json_integer_value(seq);
                bytes += (size_t)n;
                json_array_append_new(out, rec);
        }
        free(line);
        fclose(f);
        if (n < 0) {
                json_decref(out);
                return (int)n;
        }
        *ret_records = out;
        *ret_next_seq = next;
        *ret_more = more;
        return 0;
}
