/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <lmdb.h>
#include "store.h"
#include "../common/util.h"

static const char *const db_names[AB_DB__MAX] = {
        [AB_DB_POLICY] = "policy",     [AB_DB_SESSIONS] = "sessions", [AB_DB_REVOCATIONS] = "revocations",
        [AB_DB_USAGE] = "usage",       [AB_DB_META] = "meta",
};

struct ab_store {
        MDB_env *env;
        MDB_dbi dbi[AB_DB__MAX];
        MDB_txn *idle_read; /* a reset read transaction kept for renewal */
        char path[4096];
};

struct ab_txn {
        ab_store *s;
        MDB_txn *txn;
        bool write;
};

static void (*fatal_cb)(void *);
static void *fatal_userdata;

void ab_store_on_fatal(void (*cb)(void *userdata), void *userdata)
{
        fatal_cb = cb;
        fatal_userdata = userdata;
}

/* The one boundary where LMDB codes become ours. */
static int map_err(int rc)
{
        if (rc == MDB_PANIC && fatal_cb) {
                /* LMDB has marked the environment unusable (a failed meta-page
                 * write): every later transaction fails the same way */
                void (*cb)(void *) = fatal_cb;
                fatal_cb = NULL;
                cb(fatal_userdata);
        }
        switch (rc) {
        case MDB_SUCCESS: return 0;
        case MDB_NOTFOUND: return -ENOENT;
        case MDB_MAP_FULL:
        case ENOSPC: return -ENOSPC;
        case EROFS: return -EROFS;
        case EACCES: return -EACCES;
        case ENOMEM: return -ENOMEM;
        case EIO: return -EIO;
        default: return AB_ERR_STORE;
        }
}

static int migrate(ab_store *s, MDB_txn *txn, unsigned from)
{
        /* Schema history:
         *   0: a fresh environment (or one written before "schema" existed)
         *   1: named databases policy, sessions, revocations, usage, meta
         * Each step moves one version up; all run in the opening transaction. */
        (void)s;
        (void)txn;
        for (unsigned v = from; v < AB_SCHEMA_VERSION; v++) {
                switch (v) {
                case 0: /* the databases were created by mdb_dbi_open(MDB_CREATE) already */
                        break;
                default:
                        return AB_ERR_STORE;
                }
        }
        return 0;
}

int ab_store_open(const char *dir, uint64_t mapsize, ab_store **ret, unsigned *ret_found_schema)
{
        ab_store *s;
        MDB_txn *txn = NULL;
        MDB_val k = { 6, (void *)"schema" }, v;
        unsigned found = 0;
        int rc, r;

        s = calloc(1, sizeof *s);
        if (!s)
                return -ENOMEM;
        snprintf(s->path, sizeof s->path, "%s/data.mdb", dir);
        rc = mdb_env_create(&s->env);
        if (rc == 0)
                rc = mdb_env_set_maxdbs(s->env, AB_DB__MAX + 2);
        if (rc == 0)
                rc = mdb_env_set_mapsize(s->env, mapsize ? mapsize : AB_STORE_DEFAULT_MAPSIZE);
        if (rc == 0)
                rc = mdb_env_set_maxreaders(s->env, 16);
        /* MDB_NOTLS: read transactions are not tied to threads (we renew them). */
        if (rc == 0)
                rc = mdb_env_open(s->env, dir, MDB_NOTLS, 0600);
        if (rc != 0) {
                r = map_err(rc);
                goto fail;
        }
        rc = mdb_txn_begin(s->env, NULL, 0, &txn);
        for (int i = 0; rc == 0 && i < AB_DB__MAX; i++)
                rc = mdb_dbi_open(txn, db_names[i], MDB_CREATE, &s->dbi[i]);
        if (rc != 0) {
                r = map_err(rc);
                goto fail;
        }
        rc = mdb_get(txn, s->dbi[AB_DB_META], &k, &v);
        if (rc == 0) {
                char buf[16];
                if (v.mv_size == 0 || v.mv_size >= sizeof buf) {
                        r = AB_ERR_STORE;
                        goto fail;
                }
                memcpy(buf, v.mv_data, v.mv_size);
                buf[v.mv_size] = '\0';
                found = (unsigned)strtoul(buf, NULL, 10);
        } else if (rc != MDB_NOTFOUND) {
                r = map_err(rc);
                goto fail;
        }
        if (ret_found_schema)
                *ret_found_schema = found;
        if (found > AB_SCHEMA_VERSION) {
                r = AB_ERR_STORE;
                goto fail;
        }
        if (found < AB_SCHEMA_VERSION) {
                char buf[16];
                r = migrate(s, txn, found);
                if (r < 0)
                        goto fail;
                v.mv_size = (size_t)snprintf(buf, sizeof buf, "%u", AB_SCHEMA_VERSION);
                v.mv_data = buf;
                rc = mdb_put(txn, s->dbi[AB_DB_META], &k, &v, 0);
                if (rc != 0) {
                        r = map_err(rc);
                        goto fail;
                }
        }
        rc = mdb_txn_commit(txn);
        txn = NULL;
        if (rc != 0) {
                r = map_err(rc);
                goto fail;
        }
        *ret = s;
        return 0;
fail:
        if (txn)
                mdb_txn_abort(txn);
        ab_store_close(s);
        return r;
}

void ab_store_close(ab_store *s)
{
        if (!s)
                return;
        if (s->idle_read)
                mdb_txn_abort(s->idle_read);
        if (s->env)
                mdb_env_close(s->env);
        free(s);
}

/* Pages of one database: branch, leaf and overflow (0 if it cannot be read: count what can). */
static size_t db_pages(MDB_txn *txn, MDB_dbi dbi)
{
        MDB_stat st;
        return mdb_stat(txn, dbi, &st) == 0 ? st.ms_branch_pages + st.ms_leaf_pages + st.ms_overflow_pages : 0;
}

/* Pages in use and pages the map holds (false if they cannot be read). */
static bool pages_used(ab_txn *t, size_t *ret_used, size_t *ret_total)
{
        MDB_envinfo info;
        MDB_stat env;
        MDB_dbi main_dbi;
        size_t used = db_pages(t->txn, 0); /* FREE_DBI: the free list's own pages */

        if (mdb_env_info(t->s->env, &info) != 0 || mdb_env_stat(t->s->env, &env) != 0 || env.ms_psize == 0)
                return false;
        for (int i = 0; i < AB_DB__MAX; i++)
                used += db_pages(t->txn, t->s->dbi[i]);
        if (mdb_dbi_open(t->txn, NULL, 0, &main_dbi) == 0)
                used += db_pages(t->txn, main_dbi);
        *ret_used = used;
        *ret_total = info.me_mapsize / env.ms_psize;
        return *ret_total > 0;
}

bool ab_txn_room_to_grow(ab_txn *t)
{
        size_t used, total;
        return pages_used(t, &used, &total) && used * 10 < total * 9;
}

unsigned ab_txn_used_percent(ab_txn *t)
{
        size_t used, total;
        if (!pages_used(t, &used, &total))
                return 100;
        return used >= total ? 100 : (unsigned)(used * 100 / total);
}

int ab_store_begin(ab_store *s, bool write, ab_txn **ret)
{
        ab_txn *t = calloc(1, sizeof *t);
        int rc;

        if (!t)
                return -ENOMEM;
        t->s = s;
        t->write = write;
        if (!write && s->idle_read) {
                t->txn = s->idle_read;
                s->idle_read = NULL;
                rc = mdb_txn_renew(t->txn);
                if (rc != 0) {
                        mdb_txn_abort(t->txn);
                        t->txn = NULL;
                        rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &t->txn);
                }
        } else {
                rc = mdb_txn_begin(s->env, NULL, write ? 0 : MDB_RDONLY, &t->txn);
        }
        if (rc != 0) {
                free(t);
                return map_err(rc);
        }
        *ret = t;
        return 0;
}

int ab_txn_commit(ab_txn *t)
{
        int rc;

        if (!t->write) {
                ab_txn_abort(t);
                return 0;
        }
        rc = mdb_txn_commit(t->txn);
        free(t);
        return map_err(rc);
}

int ab_txn_end(ab_txn *t, int r)
{
        if (r < 0) {
                ab_txn_abort(t);
                return r;
        }
        return ab_txn_commit(t);
}

void ab_txn_abort(ab_txn *t)
{
        if (!t)
                return;
        if (!t->write && !t->s->idle_read) {
                mdb_txn_reset(t->txn);
                t->s->idle_read = t->txn;
        } else {
                mdb_txn_abort(t->txn);
        }
        free(t);
}

int ab_txn_get(ab_txn *t, ab_db db, const void *key, size_t klen, const void **ret_val, size_t *ret_len)
{
        MDB_val k = { klen, (void *)key }, v;
        int rc;

        if (klen == 0 || klen > 511)
                return AB_ERR_INVALID;
        rc = mdb_get(t->txn, t->s->dbi[db], &k, &v);
        if (rc != 0)
                return map_err(rc);
        *ret_val = v.mv_data;
        *ret_len = v.mv_size;
        return 0;
}

int ab_txn_put(ab_txn *t, ab_db db, const void *key, size_t klen, const void *val, size_t vlen)
{
        MDB_val k = { klen, (void *)key }, v = { vlen, (void *)val };

        if (klen == 0 || klen > 511)
                return AB_ERR_INVALID;
        return map_err(mdb_put(t->txn, t->s->dbi[db], &k, &v, 0));
}

int ab_txn_del(ab_txn *t, ab_db db, const void *key, size_t klen)
{
        MDB_val k = { klen, (void *)key };
        int rc;

        if (klen == 0 || klen > 511)
                return AB_ERR_INVALID;
        rc = mdb_del(t->txn, t->s->dbi[db], &k, NULL);
        return rc == MDB_NOTFOUND ? 0 : map_err(rc);
}

int ab_txn_foreach(ab_txn *t, ab_db db, const void *prefix, size_t plen,
                   int (*fn)(void *ud, const void *key, size_t klen, const void *val, size_t vlen), void *ud)
{
        MDB_cursor *cur;
        MDB_val k = { plen, (void *)prefix }, v;
        int rc, r = 0;

        rc = mdb_cursor_open(t->txn, t->s->dbi[db], &cur);
        if (rc != 0)
                return map_err(rc);
        rc = plen ? mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE) : mdb_cursor_get(cur, &k, &v, MDB_FIRST);
        while (rc == 0) {
                if (plen && (k.mv_size < plen || memcmp(k.mv_data, prefix, plen) != 0))
                        break;
                r = fn(ud, k.mv_data, k.mv_size, v.mv_data, v.mv_size);
                if (r != 0)
                        break;
                rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
        }
        mdb_cursor_close(cur);
        if (r < 0)
                return r;
        if (rc != 0 && rc != MDB_NOTFOUND)
                return map_err(rc);
        return 0;
}

int ab_store_stat(ab_store *s, ab_db db, size_t *ret_entries)
{
        MDB_txn *txn;
        MDB_stat st;
        int rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn);

        if (rc != 0)
                return map_err(rc);
        rc = mdb_stat(txn, s->dbi[db], &st);
        mdb_txn_abort(txn);
        if (rc != 0)
                return map_err(rc);
        *ret_entries = st.ms_entries;
        return 0;
}

uint64_t ab_store_file_size(ab_store *s)
{
        struct stat st;
        return stat(s->path, &st) == 0 ? (uint64_t)st.st_size : 0;
}
