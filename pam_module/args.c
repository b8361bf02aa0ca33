/* SPDX-License-Identifier: MIT */
/* Arguments of pam_agent_broker.so (see args.h). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "args.h"

/* A value of "name=value" if arg has that name, else NULL. */
static const char *value_of(const char *arg, const char *name)
{
        size_t n = strlen(name);
        return strncmp(arg, name, n) == 0 && arg[n] == '=' ? arg + n + 1 : NULL;
}

/*
 * Copy a non-empty value of at most max-1 bytes without control
 * characters; if ascii, printable ASCII only (a value sent to the broker,
 * which takes nothing else; a socket path is not sent).
 */
static bool copy_value(char *dst, size_t max, const char *v, bool ascii)
{
        size_t n = strlen(v);
        if (n == 0 || n >= max)
                return false;
        for (size_t i = 0; i < n; i++)
                if ((unsigned char)v[i] < 0x20 || v[i] == 0x7f || (ascii && (unsigned char)v[i] > 0x7f))
                        return false;
        memcpy(dst, v, n + 1);
        return true;
}

/* A decimal integer in [lo, hi], nothing else. */
static bool parse_long(const char *v, long lo, long hi, long *ret)
{
        char *end = NULL;
        long x;
        if (*v < '0' || *v > '9')
                return false;
        errno = 0;
        x = strtol(v, &end, 10);
        if (errno || *end || x < lo || x > hi)
                return false;
        *ret = x;
        return true;
}

void ab_pam_args_parse(int argc, const char **argv, ab_pam_args *ret, ab_pam_args_warn warn, void *userdata)
{
        memset(ret, 0, sizeof *ret);
        memcpy(ret->scope, AB_PAM_DEFAULT_SCOPE, sizeof AB_PAM_DEFAULT_SCOPE);
        ret->max_auth_age = AB_PAM_DEFAULT_MAX_AUTH_AGE;
        ret->timeout_ms = AB_PAM_DEFAULT_TIMEOUT_MS;

        for (int i = 0; i < argc && argv; i++) {
                const char *a = argv[i], *v;
                const char *bad = NULL;
                long x;

                if (!a)
                        continue;
                if ((v = value_of(a, "socket"))) {
                        if (v[0] != '/' || !copy_value(ret->socket, sizeof ret->socket, v, false))
                                bad = "not an absolute socket path that fits sun_path";
                } else if ((v = value_of(a, "audience"))) {
                        /* the broker records PAM sessions only for pam: audiences: a token for an
                         * API must not log anyone in */
                        if (strncmp(v, "pam:", 4) != 0 || !copy_value(ret->audience, sizeof ret->audience, v, true))
                                bad = "not a pam: audience (empty, too long, or not printable ASCII)";
                } else if ((v = value_of(a, "scope"))) {
                        if (strchr(v, ' ') || !copy_value(ret->scope, sizeof ret->scope, v, true))
                                bad = "not one scope (empty, too long, spaces, or not printable ASCII)";
                        else
                                ret->scope_set = true;
                } else if ((v = value_of(a, "max_auth_age"))) {
                        if (parse_long(v, 0, AB_PAM_MAX_AUTH_AGE_MAX, &x)) {
                                ret->max_auth_age = x;
                                ret->max_auth_age_set = true;
                        }
                        else
                                bad = "not a number of seconds from 0 to 31622400";
                } else if ((v = value_of(a, "timeout_ms"))) {
                        if (parse_long(v, 1, AB_PAM_TIMEOUT_MS_MAX, &x))
                                ret->timeout_ms = (int)x;
                        else
                                bad = "not a number of milliseconds from 1 to 60000";
                } else if (strcmp(a, "ignore_non_token") == 0) {
                        ret->ignore_non_token = true;
                } else if (strcmp(a, "debug") == 0) {
                        ret->debug = true;
                } else if (strcmp(a, "use_first_pass") == 0 || strcmp(a, "try_first_pass") == 0 ||
                           strcmp(a, "use_authtok") == 0) {
                        /* read by pam_get_authtok() */
                } else {
                        bad = "unknown argument";
                }
                if (bad && warn)
                        warn(userdata, a, bad);
        }
}
