/* SPDX-License-Identifier: MIT */
/*
 * Usage counters: per agent, audience and scope, how many tokens were
 * issued and when last. Counted in memory on the hot path and merged into
 * AB_DB_USAGE (key "AGENT\0AUDIENCE\0SCOPE") by ab_usage_flush in one
 * write transaction, every few seconds and at shutdown: a crash loses at
 * most the last few seconds of counts, never an audit record.
 */
#ifndef AB_USAGE_H
#define AB_USAGE_H

#include <stdint.h>
#include <jansson.h>
#include "store.h"

typedef struct ab_usage ab_usage;

int ab_usage_new(ab_usage **ret);
void ab_usage_free(ab_usage *u);
#define AB_USAGE_SCOPES_PER_AUDIENCE 256 /* rows per agent and audience before wildcard scopes fold */

/*
 * Count one issuance of scope, granted by name (wild NULL) or through the
 * grant's wildcard wild. Returns true if the table is full enough to flush
 * now.
 */
bool ab_usage_add(ab_usage *u, const char *agent, const char *audience, const char *scope, const char *wild,
                  int64_t now);
/* Merge the counts into the store and clear them. 0 or a store error (counts kept). */
int ab_usage_flush(ab_usage *u, ab_store *st);
/* Rows {agent, audience, scope, count, last_issued}, for one agent or all. */
int ab_usage_list(ab_store *st, const char *agent, json_t **ret);

#endif
