/* SPDX-License-Identifier: MIT */
/*
 * Fuzz target: policy parsing, validation and lint, then a decision with
 * every agent that was accepted.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../../broker/policy.h"

#ifndef FUZZ_ENTRY
#define FUZZ_ENTRY LLVMFuzzerTestOneInput
#endif

int FUZZ_ENTRY(const uint8_t *data, size_t size);

static void ignore(void *ud, int sev, const char *file, const char *path, const char *msg)
{
        (void)ud;
        (void)sev;
        (void)file;
        (void)path;
        (void)msg;
}

int FUZZ_ENTRY(const uint8_t *data, size_t size)
{
        ab_policy *p = NULL;
        ab_diag diag = { .emit = ignore, .lint = true };

        if (ab_policy_new(&p) < 0)
                return 0;
        if (ab_policy_add_document(p, "fuzz.json", (const char *)data, size, &diag) == 0) {
                for (size_t i = 0; i < p->n_agents; i++) {
                        const ab_agent *a = &p->agents[i];
                        const char *scopes[] = { "repo:read", "x" };
                        const ab_grant *g = NULL;
                        uint32_t ttl = 0;
                        char reason[256];
                        for (size_t k = 0; k < a->n_grants; k++)
                                (void)ab_policy_decide(a, a->grants[k].audience, scopes, 2, 0, &g, &ttl, reason,
                                                       sizeof reason);
                        (void)ab_policy_find(p, a->id);
                }
        }
        ab_policy_free(p);
        return 0;
}
