/* SPDX-License-Identifier: MIT */
/*
 * Shared pieces of agent-brokerctl: its options, exit codes and the
 * helpers every command file (client/ctl-*.c) uses.
 */
#ifndef AB_CTL_H
#define AB_CTL_H

#include <stdbool.h>
#include <sys/types.h>
#include <jansson.h>
#include "agentbroker.h"

enum {
        EXIT_OK = 0,
        EXIT_DENIED = 1,      /* the broker said no (or: findings, a broken chain) */
        EXIT_USAGE = 2,
        EXIT_UNREACHABLE = 3, /* no broker answering */
        EXIT_ERROR = 4,       /* any other failure */
};

typedef struct opts {
        const char *socket;
        const char *admin_socket;
        int timeout_ms;
} opts;

/* The exit code for a library error code. */
int ctl_exit_for(int r);
/* Print "agent-brokerctl: what: error: reason" and return the exit code. */
int ctl_fail(ab_client *c, int r, const char *what);
/* Connect to the agent (or admin) socket; prints why not; returns an exit code. */
/* The socket path for the agent or admin socket as options and environment say (NULL: library default). */
const char *ctl_socket_path(const opts *o, bool admin);
int ctl_connect(const opts *o, bool admin, ab_client **ret);
/* Call method (params stolen, may be NULL); *ret is the reply's parameters. Returns an exit code. */
int simple_call(const opts *o, bool admin, const char *method, json_t *params, json_t **ret);
/*
 * json_string(v) for the value of option opt (what the broker is sent);
 * a value that is not valid UTF-8 ends the program: one line naming opt,
 * exit 2.
 */
json_t *ctl_arg(const char *opt, const char *v);
/* json_string(s) for text to show (a file name may be any bytes): bytes past ASCII as \xNN if s is not UTF-8. */
json_t *ctl_json_text(const char *s);
/* Print v as indented JSON on stdout. */
int print_json(json_t *v);
/*
 * Print s (from a record a local user may have shaped, e.g. through an
 * executable's path) on stdout for a terminal: printable ASCII as it is,
 * '"' and '\\' escaped, every other byte (newline, ESC, the bytes of a
 * bidirectional override) as \xNN, so that no text can pose as a line of
 * output or move the cursor. Returns the number of characters printed.
 */
int print_safe(const char *s);
/*
 * Write text and a newline to path atomically: a temporary file in the same
 * directory with mode, fsync, rename, fsync of the directory. 0 or -errno.
 */
int ctl_write_atomic(const char *path, const char *text, mode_t mode);
/* May this user open the admin socket (root, or a group it is open to)? */
bool admin_usable(const opts *o);

#define AB_TIME_ARG_MAX 253402300799LL /* 9999-12-31T23:59:59Z */
/* Unix seconds from "now", "@S", "S" or "YYYY-MM-DDTHH:MM:SSZ", up to AB_TIME_ARG_MAX; prints why not. */
int parse_time_arg(const char *v, long long *ret);

/* Commands in other files: argv[0] is the command name. */
int cmd_audit(const opts *o, int argc, char **argv);     /* ctl-audit.c */
int cmd_review(const opts *o, int argc, char **argv);    /* ctl-review.c */
int cmd_coverage(const opts *o, int argc, char **argv);  /* ctl-review.c */
int cmd_exec(const opts *o, int argc, char **argv);      /* ctl-token.c */
/* Issue with params (borrowed) and keep path holding the token; with refresh, until SIGTERM. */
int ctl_token_to_file(const opts *o, json_t *params, const char *path, bool refresh);

#endif
