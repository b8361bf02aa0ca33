/* SPDX-License-Identifier: MIT */
/*
 * Persistent state: one LMDB environment in the state directory with named
 * databases. The only file that includes lmdb.h; MDB_* codes are
 * translated here (AB_ERR_STORE, -ENOSPC for a full map or disk, -ENOENT).
 */
#ifndef AB_STORE_H
#define AB_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define AB_SCHEMA_VERSION 1
#define AB_STORE_DEFAULT_MAPSIZE (1024ull * 1024 * 1024)

typedef enum ab_db {
        AB_DB_POLICY,      /* source name -> compiled source record (JSON) */
        AB_DB_SESSIONS,    /* sid -> session record */
        AB_DB_REVOCATIONS, /* "jti:..", "sid:..", "agent:..", "before" -> record */
        AB_DB_USAGE,       /* agent\0audience\0scope -> counters */
        AB_DB_META,        /* "schema", "version:<source>", "policy_fingerprint", ... */
        AB_DB__MAX,
} ab_db;

typedef struct ab_store ab_store;
typedef struct ab_txn ab_txn;

/*
 * Open (creating) the environment in dir. Checks the schema version:
 * a newer one is refused (AB_ERR_STORE, with *ret_found_schema set), an
 * older one is migrated. Returns 0, AB_ERR_STORE, -ENOSPC, -errno.
 */
int ab_store_open(const char *dir, uint64_t mapsize, ab_store **ret, unsigned *ret_found_schema);
void ab_store_close(ab_store *s);
/*
 * cb(userdata) is called once when LMDB reports MDB_PANIC (the environment
 * is unusable until it is opened again): the broker exits and is restarted.
 */
void ab_store_on_fatal(void (*cb)(void *userdata), void *userdata);

/* Begin a transaction. Read transactions are cheap (reset/renewed internally). */
int ab_store_begin(ab_store *s, bool write, ab_txn **ret);
/* Commit (durable on return for write transactions) and free. 0, -ENOSPC, AB_ERR_STORE. */
int ab_txn_commit(ab_txn *t);
/* Abort and free. Accepts NULL. */
void ab_txn_abort(ab_txn *t);
/* The end of a write: r < 0 (a step failed), abort and return r; else commit. */
int ab_txn_end(ab_txn *t, int r);

/*
 * Room to grow: false once the pages in use (every database, not the free
 * ones) pass 90% of the map. What makes the store grow at a caller's will
 * (new sessions, PAM records) checks it, so that revocations, which must
 * always be recordable, keep the last tenth.
 */
bool ab_txn_room_to_grow(ab_txn *t);
/* The pages in use, in percent of the map (100 if it cannot be read). */
unsigned ab_txn_used_percent(ab_txn *t);

/*
 * Look up key. *ret_val points into the map, valid until the transaction
 * ends. Returns 0, -ENOENT, AB_ERR_STORE.
 */
int ab_txn_get(ab_txn *t, ab_db db, const void *key, size_t klen, const void **ret_val, size_t *ret_len);
int ab_txn_put(ab_txn *t, ab_db db, const void *key, size_t klen, const void *val, size_t vlen);
/* Delete key; 0 also when it did not exist. */
int ab_txn_del(ab_txn *t, ab_db db, const void *key, size_t klen);

/*
 * Call fn for each key starting with prefix (all keys if plen is 0), in
 * key order. fn returns 0 to go on, 1 to stop, < 0 to stop with that error.
 */
int ab_txn_foreach(ab_txn *t, ab_db db, const void *prefix, size_t plen,
                   int (*fn)(void *ud, const void *key, size_t klen, const void *val, size_t vlen), void *ud);

/* Entries in db, and the size of the data file in bytes. */
int ab_store_stat(ab_store *s, ab_db db, size_t *ret_entries);
uint64_t ab_store_file_size(ab_store *s);

#endif
