/* SPDX-License-Identifier: MIT */
/*
 * Arguments of pam_agent_broker.so, parsed into one struct. Parsing never
 * allocates and never fails as a whole: a bad or unknown argument is
 * reported through the callback and ignored, so that one typo in a PAM
 * stack does not lock every user out (the defaults are the strict ones).
 */
#ifndef AB_PAM_ARGS_H
#define AB_PAM_ARGS_H

#include <stdbool.h>
#include <sys/un.h>

#define AB_PAM_AUDIENCE_MAX 256  /* as the broker's audience limit */
#define AB_PAM_SCOPE_MAX 128
#define AB_PAM_DEFAULT_SCOPE "login"
#define AB_PAM_DEFAULT_MAX_AUTH_AGE 300
#define AB_PAM_MAX_AUTH_AGE_MAX (366L * 24 * 3600)
#define AB_PAM_DEFAULT_TIMEOUT_MS 2000
#define AB_PAM_TIMEOUT_MS_MAX 60000

typedef struct ab_pam_args {
        char socket[sizeof(((struct sockaddr_un *)0)->sun_path)]; /* "" : the default socket */
        char audience[AB_PAM_AUDIENCE_MAX + 1];                   /* "" : pam:SERVICE */
        char scope[AB_PAM_SCOPE_MAX + 1];
        long max_auth_age; /* seconds */
        int timeout_ms;    /* connect + reply */
        bool ignore_non_token;
        bool debug;
        bool scope_set, max_auth_age_set; /* given on this line, not the defaults */
} ab_pam_args;

/* Called for each argument that is ignored; why is a short English phrase. */
typedef void (*ab_pam_args_warn)(void *userdata, const char *arg, const char *why);

/*
 * Fill *ret with the defaults, then apply argv[0..argc). Arguments that
 * libpam itself reads (use_first_pass, try_first_pass, use_authtok) are
 * accepted silently. warn may be NULL.
 */
void ab_pam_args_parse(int argc, const char **argv, ab_pam_args *ret, ab_pam_args_warn warn, void *userdata);

#endif
