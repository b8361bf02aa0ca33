/* SPDX-License-Identifier: MIT */
/*
 * Fuzz target: the arguments of pam_agent_broker.so (pam_module/args.c).
 * The input is split on NUL and newline bytes into at most MAX_ARGS
 * arguments, each in its own exact-size allocation (so that AddressSanitizer
 * sees any read past an argument's end); a segment that is exactly one 0xff
 * byte stands for a NULL argv entry; a final separator adds no empty
 * argument. After parsing, whatever the input:
 *   - every string field is NUL-terminated within its array, has no control
 *     characters, and the socket is "" or absolute, the scope non-empty and
 *     without spaces;
 *   - timeout_ms is in 1..60000 and max_auth_age in 0..31622400;
 *   - a field that no argument names keeps its default;
 *   - every warning names one of the arguments and gives a reason, and there
 *     is at most one warning per argument;
 *   - parsing the same argv again gives the same result (nothing is left
 *     over from the bytes the struct held before).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../../pam_module/args.h"

#ifndef FUZZ_ENTRY
#define FUZZ_ENTRY LLVMFuzzerTestOneInput
#endif

#define PAM_ARGS_MAX_ARGS 64

int FUZZ_ENTRY(const uint8_t *data, size_t size);

typedef struct pam_args_warnings {
        const char **argv;
        int argc;
        int n;
} pam_args_warnings;

static void pam_args_warn(void *userdata, const char *arg, const char *why)
{
        pam_args_warnings *w = userdata;
        int i;

        for (i = 0; i < w->argc; i++)
                if (w->argv[i] && w->argv[i] == arg)
                        break;
        if (i == w->argc || !why || !why[0])
                abort(); /* a warning about something that is not an argument, or without reason */
        w->n++;
}

/* NUL-terminated within max bytes, and no control characters before it. */
static void pam_args_check_string(const char *s, size_t max)
{
        const char *end = memchr(s, '\0', max);
        if (!end)
                abort();
        for (const char *c = s; c < end; c++)
                if ((unsigned char)*c < 0x20 || *c == 0x7f)
                        abort();
}

/* true if some argument starts with "name=" */
static int pam_args_named(int argc, const char **argv, const char *name)
{
        size_t n = strlen(name);
        for (int i = 0; i < argc; i++)
                if (argv[i] && strncmp(argv[i], name, n) == 0 && argv[i][n] == '=')
                        return 1;
        return 0;
}

int FUZZ_ENTRY(const uint8_t *data, size_t size)
{
        const char *argv[PAM_ARGS_MAX_ARGS];
        char *owned[PAM_ARGS_MAX_ARGS];
        ab_pam_args a, again;
        pam_args_warnings w = { .argv = argv };
        int argc = 0;
        size_t start = 0;

        for (size_t i = 0; i <= size && argc < PAM_ARGS_MAX_ARGS; i++) {
                size_t n;
                if (i < size && data[i] != '\0' && data[i] != '\n')
                        continue;
                n = i - start;
                if (i == size && n == 0)
                        break; /* a final separator ends the last argument */
                owned[argc] = NULL;
                if (n == 1 && data[start] == 0xff) {
                        argv[argc++] = NULL;
                } else {
                        owned[argc] = malloc(n + 1);
                        if (!owned[argc])
                                break;
                        memcpy(owned[argc], data + start, n);
                        owned[argc][n] = '\0';
                        argv[argc] = owned[argc];
                        argc++;
                }
                start = i + 1;
        }
        w.argc = argc;

        memset(&a, 0xa5, sizeof a); /* parsing must not depend on what was there */
        ab_pam_args_parse(argc, argv, &a, pam_args_warn, &w);

        pam_args_check_string(a.socket, sizeof a.socket);
        pam_args_check_string(a.audience, sizeof a.audience);
        pam_args_check_string(a.scope, sizeof a.scope);
        if (a.socket[0] != '\0' && a.socket[0] != '/')
                abort();
        if (a.scope[0] == '\0' || strchr(a.scope, ' '))
                abort();
        if (a.timeout_ms < 1 || a.timeout_ms > 60000 || a.timeout_ms > AB_PAM_TIMEOUT_MS_MAX)
                abort();
        if (a.max_auth_age < 0 || a.max_auth_age > 31622400 || a.max_auth_age > AB_PAM_MAX_AUTH_AGE_MAX)
                abort();
        if (w.n > argc)
                abort();
        if ((!pam_args_named(argc, argv, "socket") && a.socket[0]) ||
            (!pam_args_named(argc, argv, "audience") && a.audience[0]) ||
            (!pam_args_named(argc, argv, "scope") && strcmp(a.scope, AB_PAM_DEFAULT_SCOPE) != 0) ||
            (!pam_args_named(argc, argv, "timeout_ms") && a.timeout_ms != AB_PAM_DEFAULT_TIMEOUT_MS) ||
            (!pam_args_named(argc, argv, "max_auth_age") && a.max_auth_age != AB_PAM_DEFAULT_MAX_AUTH_AGE))
                abort();

        /* the same argv, a struct that held other bytes, no callback */
        memset(&again, 0x5a, sizeof again);
        ab_pam_args_parse(argc, argv, &again, NULL, NULL);
        if (strcmp(a.socket, again.socket) != 0 || strcmp(a.audience, again.audience) != 0 ||
            strcmp(a.scope, again.scope) != 0 || a.timeout_ms != again.timeout_ms ||
            a.max_auth_age != again.max_auth_age || a.debug != again.debug ||
            a.ignore_non_token != again.ignore_non_token)
                abort();

        for (int i = 0; i < argc; i++)
                free(owned[i]);
        return 0;
}
