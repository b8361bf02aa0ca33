/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "usage.h"

#define USAGE_MAX_KEY 512
#define USAGE_FLUSH_AT 4096   /* entries: flush early past this */
#define USAGE_MAX_ENTRIES (4 * USAGE_FLUSH_AT) /* while flushes fail: new keys beyond this are not counted */

typedef struct entry {
        char *key;      /* agent \0 audience \0 scope, klen bytes */
        size_t klen;
        char *wild;     /* the grant's wildcard that covered scope (NULL: named in the grant) */
        uint64_t count;
        int64_t last;
} entry;

struct ab_usage {
        entry *tab;     /* open addressing, cap a power of two */
        size_t cap, n;
};

typedef struct rec {
        uint64_t count;
        int64_t last;
} rec;

int ab_usage_new(ab_usage **ret)
{
        ab_usage *u = calloc(1, sizeof *u);
        if (!u)
                return -ENOMEM;
        u->cap = 256;
        u->tab = calloc(u->cap, sizeof *u->tab);
        if (!u->tab) {
                free(u);
                return -ENOMEM;
        }
        *ret = u;
        return 0;
}

static void clear(ab_usage *u)
{
        for (size_t i = 0; i < u->cap; i++) {
                free(u->tab[i].key);
                free(u->tab[i].wild);
                u->tab[i].key = NULL;
                u->tab[i].wild = NULL;
        }
        u->n = 0;
}

void ab_usage_free(ab_usage *u)
{
        if (!u)
                return;
        clear(u);
        free(u->tab);
        free(u);
}

static uint64_t hash(const char *k, size_t n)
{
        uint64_t h = 1469598103934665603ull; /* FNV-1a */
        for (size_t i = 0; i < n; i++)
                h = (h ^ (unsigned char)k[i]) * 1099511628211ull;
        return h;
}

static entry *slot(entry *tab, size_t cap, const char *k, size_t n)
{
        size_t i = (size_t)hash(k, n) & (cap - 1);
        while (tab[i].key && (tab[i].klen != n || memcmp(tab[i].key, k, n) != 0))
                i = (i + 1) & (cap - 1);
        return &tab[i];
}

static int grow(ab_usage *u)
{
        size_t nc = u->cap * 2;
        entry *nt = calloc(nc, sizeof *nt);
        if (!nt)
                return -ENOMEM;
        for (size_t i = 0; i < u->cap; i++)
                if (u->tab[i].key)
                        *slot(nt, nc, u->tab[i].key, u->tab[i].klen) = u->tab[i];
        free(u->tab);
        u->tab = nt;
        u->cap = nc;
        return 0;
}

bool ab_usage_add(ab_usage *u, const char *agent, const char *audience, const char *scope, const char *wild,
                  int64_t now)
{
        char k[USAGE_MAX_KEY];
        size_t a = strlen(agent), b = strlen(audience), c = strlen(scope), n = a + b + c + 2;
        entry *e;

        if (n > sizeof k)
                return false;
        memcpy(k, agent, a);
        k[a] = '\0';
        memcpy(k + a + 1, audience, b);
        k[a + 1 + b] = '\0';
        memcpy(k + a + b + 2, scope, c);
        if ((u->n + 1) * 4 > u->cap * 3 && grow(u) < 0)
                return true;
        e = slot(u->tab, u->cap, k, n);
        if (!e->key) {
                if (u->n >= USAGE_MAX_ENTRIES)
                        return true; /* flushes keep failing: a count lost, memory bounded */
                e->key = malloc(n);
                e->wild = wild ? strdup(wild) : NULL;
                if (!e->key || (wild && !e->wild)) {
                        free(e->key);
                        free(e->wild);
                        e->key = e->wild = NULL;
                        return true;
                }
                memcpy(e->key, k, n);
                e->klen = n;
                e->count = 0;
                u->n++;
        }
        e->count++;
        e->last = now;
        return u->n >= USAGE_FLUSH_AT;
}

static int count_one(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        (void)key;
        (void)klen;
        (void)val;
        (void)vlen;
        return ++*(size_t *)ud >= AB_USAGE_SCOPES_PER_AUDIENCE ? 1 : 0; /* enough: stop */
}

/* The length of "agent \0 audience \0" at the start of key. */
static size_t prefix_len(const char *key, size_t klen)
{
        const char *a = memchr(key, '\0', klen), *b = a ? memchr(a + 1, '\0', klen - (size_t)(a + 1 - key)) : NULL;
        return b ? (size_t)(b + 1 - key) : klen;
}

/* Add e's count to the row key[0..klen). */
static int merge(ab_txn *t, const char *key, size_t klen, const entry *e)
{
        const void *v;
        size_t vl;
        rec old = { 0 }, nw;

        if (ab_txn_get(t, AB_DB_USAGE, key, klen, &v, &vl) == 0 && vl == sizeof old)
                memcpy(&old, v, sizeof old);
        nw.count = old.count + e->count;
        nw.last = e->last > old.last ? e->last : old.last;
        return ab_txn_put(t, AB_DB_USAGE, key, klen, &nw, sizeof nw);
}

/*
 * A scope granted through a wildcard (repo:*) is counted under its own
 * name while its agent and audience have fewer than
 * AB_USAGE_SCOPES_PER_AUDIENCE rows; past that, under the wildcard: an
 * agent that asks for repo:<random> each time cannot fill the store
 * (helper-37's finding), and the review still sees the grant used.
 */
static int flush_one(ab_txn *t, const entry *e)
{
        const void *v;
        size_t vl, plen, rows = 0, wl;
        char k[USAGE_MAX_KEY];
        int r;

        if (!e->wild || ab_txn_get(t, AB_DB_USAGE, e->key, e->klen, &v, &vl) == 0)
                return merge(t, e->key, e->klen, e);
        plen = prefix_len(e->key, e->klen);
        r = ab_txn_foreach(t, AB_DB_USAGE, e->key, plen, count_one, &rows);
        if (r < 0)
                return r;
        wl = strlen(e->wild);
        if (rows < AB_USAGE_SCOPES_PER_AUDIENCE || plen + wl > sizeof k)
                return merge(t, e->key, e->klen, e);
        memcpy(k, e->key, plen);
        memcpy(k + plen, e->wild, wl);
        return merge(t, k, plen + wl, e);
}

int ab_usage_flush(ab_usage *u, ab_store *st)
{
        ab_txn *t = NULL;
        int r;

        if (u->n == 0)
                return 0;
        r = ab_store_begin(st, true, &t);
        if (r < 0)
                return r;
        for (size_t i = 0; i < u->cap && r >= 0; i++)
                if (u->tab[i].key)
                        r = flush_one(t, &u->tab[i]);
        r = ab_txn_end(t, r);
        if (r == 0)
                clear(u);
        return r;
}

typedef struct lister {
        const char *agent;
        json_t *out;
} lister;

static int list_one(void *ud, const void *key, size_t klen, const void *val, size_t vlen)
{
        lister *l = ud;
        const char *k = key, *p2, *p3;
        rec r;
        char buf[USAGE_MAX_KEY + 1];

        if (vlen != sizeof r || klen > USAGE_MAX_KEY)
                return 0;
        memcpy(buf, k, klen);
        buf[klen] = '\0';
        p2 = memchr(buf, '\0', klen);
        if (!p2 || (size_t)(p2 - buf) + 1 >= klen)
                return 0;
        p2++;
        p3 = memchr(p2, '\0', klen - (size_t)(p2 - buf));
        if (!p3)
                return 0;
        p3++;
        if (l->agent && strcmp(buf, l->agent) != 0)
                return 0;
        memcpy(&r, val, sizeof r);
        json_array_append_new(l->out, json_pack("{s:s, s:s, s:s, s:I, s:I}", "agent", buf, "audience", p2, "scope",
                                                p3, "count", (json_int_t)r.count, "last_issued", (json_int_t)r.last));
        return 0;
}

int ab_usage_list(ab_store *st, const char *agent, json_t **ret)
{
        lister l = { .agent = agent, .out = json_array() };
        ab_txn *t = NULL;
        int r;

        if (!l.out)
                return -ENOMEM;
        r = ab_store_begin(st, false, &t);
        if (r == 0) {
                r = ab_txn_foreach(t, AB_DB_USAGE, agent, agent ? strlen(agent) + 1 : 0, list_one, &l);
                ab_txn_abort(t);
        }
        if (r < 0) {
                json_decref(l.out);
                return r;
        }
        *ret = l.out;
        return 0;
}
