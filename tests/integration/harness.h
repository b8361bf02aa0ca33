/* SPDX-License-Identifier: MIT */
/*
 * Integration test harness: runs the real agent-brokerd on a temporary
 * directory, talks to it over raw varlink connections or through the CLI,
 * and runs code as another uid. Every wait is bounded; everything a test
 * starts is stopped and removed by hx_broker_cleanup() even when an
 * assertion failed half-way (call it from the cmocka teardown).
 *
 * Conventions: functions return 0 or a negative errno unless they say
 * otherwise. Nothing above the "cmocka fixtures and assertions" section
 * calls cmocka assertions, so a forked child may use any of that; the
 * functions of that last section fail the running test instead of
 * returning an error, and belong to the test process only.
 */
#ifndef AB_TEST_HARNESS_H
#define AB_TEST_HARNESS_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>
#include <jansson.h>

#define HX_NOBODY_UID 65534
#define HX_NOBODY_GID 65534
#define HX_MAX_CONNS 32
#define HX_MAX_EXTRA_ARGS 16

/* Bounds. Generous enough for ASan builds on a loaded machine. */
#define HX_START_TIMEOUT_MS 15000 /* until the socket answers */
#define HX_STOP_TIMEOUT_MS 10000  /* from SIGTERM until exit */
#define HX_IO_TIMEOUT_MS 5000     /* one reply */
#define HX_RUN_TIMEOUT_MS 20000   /* one child program */

typedef struct hx_conn {
        int fd;
        char *buf;   /* bytes received and not yet returned */
        size_t len, cap;
} hx_conn;

typedef struct hx_broker {
        char dir[PATH_MAX];        /* mkdtemp'd, mode 0755 */
        char sock[PATH_MAX];       /* DIR/agent.sock */
        char admin_sock[PATH_MAX]; /* DIR/admin.sock */
        char state[PATH_MAX];      /* DIR/state */
        char policy[PATH_MAX];     /* DIR/policy.json */
        char log[PATH_MAX];        /* DIR/broker.log: the daemon's stderr */
        char notify[PATH_MAX];     /* DIR/notify.sock: NOTIFY_SOCKET for the daemon */
        int notify_fd;             /* bound datagram socket, -1 if none */
        bool use_notify;           /* pass NOTIFY_SOCKET to the next start (then read it: the
                                      kernel queues only a few datagrams before sd_notify blocks) */
        pid_t pid;                 /* running daemon (or activator), 0 if none */
        int last_status;           /* wait status of the last daemon that exited, -1 if none */
        /* Extra daemon arguments for the next start (pointers must outlive it). */
        const char *extra_args[HX_MAX_EXTRA_ARGS];
        size_t n_extra_args;
        hx_conn *conns[HX_MAX_CONNS];
} hx_broker;

/* The build directory of this test binary: /proc/self/exe/../.. (or $B). */
const char *hx_build_dir(void);
/* Write hx_build_dir()/name into out (room for outmax bytes). */
int hx_build_path(const char *name, char *out, size_t outmax);

/*
 * true when the test programs run under a tool (make check-valgrind sets
 * AB_TEST_WRAPPER): the kernel then names the tool as this process's
 * executable while readlink("/proc/self/exe") names the test, and daemons
 * run several times slower.
 */
bool hx_under_wrapper(void);

/* Milliseconds on the monotonic clock. */
long long hx_now_ms(void);
/* Sleep ms milliseconds (restarted after a signal). */
void hx_sleep_ms(int ms);

/* ---- files ---------------------------------------------------------------- */

/* Write text to path (created or truncated) with mode. */
int hx_write_file(const char *path, const char *text, mode_t mode);
/* Read a whole file (at most max bytes) into a NUL-terminated malloc'd buffer. */
int hx_read_file(const char *path, size_t max, char **ret, size_t *ret_len);
/* Remove a tree (like rm -rf), not following symlinks. */
int hx_rm_rf(const char *path);
/* SHA-256 of a file as 64 lowercase hex digits (libsodium). */
int hx_sha256_file(const char *path, char hex[65]);

/* ---- the daemon ----------------------------------------------------------- */

/* Create the temp dir and fill in the paths. Does not start anything. */
int hx_broker_init(hx_broker *b);
/* Write the policy file DIR/policy.json from a string. */
int hx_broker_write_policy(hx_broker *b, const char *json);
/*
 * Start agent-brokerd (--socket, --admin-socket, --state-dir, --policy,
 * plus b->extra_args) with stderr to b->log (and NOTIFY_SOCKET=b->notify if
 * b->use_notify),
 * and wait until GetInfo on the agent socket answers. Fails with -ECHILD
 * if the daemon exited, -ETIMEDOUT if it did not answer in time.
 */
int hx_broker_start(hx_broker *b);
/*
 * Start argv (a full command line: the daemon, or an activator wrapping
 * it) with the same stderr/notify plumbing, then wait until GetInfo on
 * sock_path answers.
 */
int hx_broker_start_argv(hx_broker *b, char *const argv[], const char *sock_path);
/* Poll until GetInfo on path answers or timeout_ms passes. */
int hx_wait_answering(hx_broker *b, const char *path, int timeout_ms);
/*
 * SIGTERM the daemon and wait (bounded) for it to exit. *ret_status gets
 * the wait status. On timeout SIGKILL and -ETIMEDOUT.
 */
int hx_broker_stop(hx_broker *b, int *ret_status);
/* Print /proc/PID/{status,wchan,stack,syscall} to stderr (for a process that hangs). */
void hx_proc_diag(pid_t pid);
/* How many fds the process holds (entries of /proc/PID/fd), or -1. */
int hx_proc_fd_count(pid_t pid);
/* The value (kB) of a /proc/PID/status line such as "VmRSS:" (key with its colon), or -1. */
long hx_proc_status_kb(pid_t pid, const char *key);
/* Stop the daemon if running (SIGKILL if need be), close conns, remove DIR. */
void hx_broker_cleanup(hx_broker *b);
/*
 * Teardown: stop the daemon if it runs and require exit status 0, scan its
 * log for sanitizer reports, then hx_broker_cleanup(). 0, or -1 (reported
 * on stderr with the log) if the daemon did not end cleanly.
 */
int hx_broker_finish(hx_broker *b);
/* Print the daemon's log to stderr (for failure diagnostics). */
void hx_broker_dump_log(const hx_broker *b);
/* Discard queued notify datagrams. */
void hx_drain_notify(hx_broker *b);
/* Receive notify datagrams until one contains needle or timeout. 0 or -ETIMEDOUT. */
int hx_wait_notify(hx_broker *b, const char *needle, int timeout_ms, char *out, size_t outmax);

/* ---- raw varlink ---------------------------------------------------------- */

/* Connect to a Unix stream socket (registered with b for cleanup if b). */
int hx_conn_open(hx_broker *b, const char *path, hx_conn **ret);
/* A listening Unix socket at path (replacing whatever is there), close-on-exec: its fd; fails the test if not. */
int hx_listen_unix(const char *path, int backlog);
/*
 * A fake server at path, in a child (gone after 60 s at most, or when
 * killed): serve(fd, ud) for each connection it accepts. Returns its pid.
 * hx_serve_reply is such a serve: it answers each message (NUL-ended) with
 * the string ud and its NUL, as long as the connection stays.
 */
pid_t hx_fake_server(const char *path, void (*serve)(int fd, const void *ud), const void *ud);
void hx_serve_reply(int fd, const void *reply);
void hx_conn_close(hx_broker *b, hx_conn *c);
/* Send all of buf (MSG_NOSIGNAL). Returns 0 or -errno (e.g. -EPIPE). */
int hx_conn_send(hx_conn *c, const void *buf, size_t len);
/* Send text and its terminating NUL. */
int hx_conn_send_msg(hx_conn *c, const char *text);
/*
 * Receive one message (up to the NUL) within timeout_ms. Returns 1 with
 * *ret (malloc'd, NUL-terminated, without the varlink NUL) and *ret_len;
 * 0 on orderly EOF with no partial message; -ECONNRESET; -ETIMEDOUT;
 * -EPROTO if the peer closed in the middle of a message.
 */
int hx_conn_recv(hx_conn *c, int timeout_ms, char **ret, size_t *ret_len);
/* Like hx_conn_recv, then parse: *ret_root is the whole reply object. */
int hx_conn_recv_json(hx_conn *c, int timeout_ms, json_t **ret_root);
/* Send text + NUL and receive the reply as JSON (1 on success, as recv_json). */
int hx_conn_call(hx_conn *c, const char *text, json_t **ret_root);
/*
 * Wait until the peer closes: 0 if it did (EOF or reset) with no more
 * messages, 1 if a message arrived instead, -ETIMEDOUT if still open.
 */
int hx_conn_wait_closed(hx_conn *c, int timeout_ms);
/* true if nothing arrives within ms (the connection stays quiet and open). */
bool hx_conn_quiet(hx_conn *c, int ms);

/* Reply helpers: the "error" string or NULL; the "parameters" object (never NULL). */
const char *hx_reply_error(const json_t *root);
json_t *hx_reply_params(const json_t *root);
/* String member of the parameters, or NULL. */
const char *hx_reply_str(const json_t *root, const char *key);

/* ---- child programs ------------------------------------------------------- */

typedef struct hx_run_result {
        int status;   /* wait status */
        int exit_code;/* WEXITSTATUS, or -1 if killed */
        char *out;    /* stdout, NUL-terminated (malloc'd) */
        char *err;    /* stderr */
        bool timed_out;
} hx_run_result;

void hx_run_result_done(hx_run_result *r);
/*
 * Run argv[0] (a path) with argv, stdin from stdin_text (NULL: /dev/null),
 * capturing stdout and stderr, bounded by timeout_ms (SIGKILL after).
 * uid (gid the same) >= 0: drop to it in the child before exec.
 */
int hx_run(char *const argv[], const char *stdin_text, int uid, int timeout_ms, hx_run_result *ret);
/* Run build/agent-brokerctl --socket b->sock --admin-socket b->admin_sock ARGS... (NULL-ended; as hx_ctlv). */
int hx_ctl(hx_broker *b, int uid, hx_run_result *ret, ...) __attribute__((sentinel));
/* The same with the arguments as a NULL-ended array, bounded by timeout_ms; -E2BIG past 58 of them. */
int hx_ctlv(hx_broker *b, int uid, const char *const *args, int timeout_ms, hx_run_result *ret);

/*
 * Fork; the child drops to uid/gid (setgroups, setgid, setuid; refusing
 * to go on unless the drop took), then runs fn(arg, out, outmax) whose
 * return value becomes its exit code; what fn writes into out comes back
 * through a pipe into ret_out. Bounded by timeout_ms. Returns 0 with
 * *ret_exit (the exit code, or -1 if the child was killed by a signal).
 */
typedef int (*hx_child_fn)(void *arg, char *out, size_t outmax);
int hx_run_as(uid_t uid, gid_t gid, hx_child_fn fn, void *arg, int timeout_ms, char *ret_out, size_t outmax,
              int *ret_exit);

/* ---- tokens --------------------------------------------------------------- */

/* Decode one base64url JWT segment into a JSON object (new reference) or NULL. */
json_t *hx_jwt_segment_json(const char *token, int index);

/* ---- cmocka fixtures and assertions ---------------------------------------- */
/*
 * For the test process only (they fail the running test through cmocka;
 * never call them in an hx_run_as child). Each prints what it got on
 * stderr before an assertion fails.
 */

/*
 * cmocka setup: *state = a calloc'd hx_broker after hx_broker_init. -1
 * (nothing left behind) if that fails.
 */
int hx_setup(void **state);
/*
 * hx_setup, then write policy_json as the policy and, if start, start the
 * daemon (its log is printed if it does not answer). -1 (nothing left
 * behind) if any of that fails.
 */
int hx_setup_policy(void **state, const char *policy_json, bool start);
/*
 * cmocka teardown for hx_setup: hx_broker_finish (a daemon still running
 * must exit 0, no sanitizer reports), free, *state = NULL. 0 or -1.
 */
int hx_teardown(void **state);

/* The fixture of the programs whose tests make files of their own, mount a tmpfs or run a helper. */
typedef struct hx_fixture {
        hx_broker b;
        char work[PATH_MAX]; /* DIR/work (mode 0755): the test's own files */
        char mnt[PATH_MAX];  /* the tmpfs hx_fixture_mount mounted, "" if none */
        pid_t helper;        /* a process the test started, 0 if none */
} hx_fixture;
/*
 * cmocka setup: *state = a calloc'd hx_fixture after hx_broker_init, with
 * DIR/work made. -1 (nothing left behind) if that fails.
 */
int hx_fixture_setup(void **state);
/*
 * cmocka teardown for hx_fixture_setup: SIGKILL and reap the helper, detach
 * the tmpfs (lazily: the daemon may still hold files open there), then
 * hx_broker_finish and free. 0 or -1 as hx_broker_finish.
 */
int hx_fixture_teardown(void **state);
/*
 * Mount a tmpfs of size (a mount option value such as "64k") on where
 * (made 0700 if missing), which must succeed; the teardown unmounts it.
 */
void hx_fixture_mount(hx_fixture *f, const char *where, const char *size);

/* Append one daemon argument for the next start (b->extra_args; at most HX_MAX_EXTRA_ARGS). */
void hx_add_arg(hx_broker *b, const char *arg);
/* hx_broker_start, which must succeed (else the log is printed). */
void hx_start(hx_broker *b);
/* hx_broker_stop: the daemon must exit with status 0 (else the log is printed). */
void hx_stop_clean(hx_broker *b);

/* hx_conn_open to path (registered with b), which must succeed. */
hx_conn *hx_connect(hx_broker *b, const char *path);
/* Send text, require exactly one reply object and return it (new reference). */
json_t *hx_call(hx_conn *c, const char *text);
/* The message text {"method": method, "parameters": params} (params stolen; NULL: {}), malloc'd. */
char *hx_call_msg(const char *method, json_t *params);
/* hx_call with hx_call_msg(method, params): the whole reply. */
json_t *hx_rpc(hx_conn *c, const char *method, json_t *params);

/* The reply is not an error. */
void hx_assert_ok(const json_t *root);
/* The reply is the varlink error name. */
void hx_assert_error_name(const json_t *root, const char *name);
/* hx_assert_error_name, and an io.agentbroker.* error has a non-empty "reason" parameter. */
void hx_assert_error(const json_t *root, const char *name);

/* out = dir/name, which must fit in outmax. */
void hx_path_in(char *out, size_t outmax, const char *dir, const char *name);
/* Read a whole file (at most max bytes), which must succeed; malloc'd, NUL-terminated; *ret_len if not NULL. */
char *hx_read_text(const char *path, size_t max, size_t *ret_len);
/*
 * Set the broker's test clock (the file named by AGENT_BROKER_TEST_CLOCK when
 * it started) to offset seconds, 2 ms after the last change so that the file's
 * mtime, which the broker watches, differs.
 */
void hx_set_test_clock(const char *path, long long offset);
/*
 * Verify tokens[0..n) with an independent verifier, python3-jwt run by
 * /usr/bin/python3 (which must be there), against the key of jwks_json (a
 * GetKeys reply's parameters) and audience. Returns an array with one
 * object per token: {"valid": true, "claims": {...}, "header": {...}} or
 * {"valid": false, "error": the exception's class name, "message": ...}.
 */
json_t *hx_py_jwt_verify(hx_broker *b, const char *jwks_json, const char *audience, char *const *tokens, size_t n);
/*
 * A copy of token (malloc'd) with one base64url character of segment seg
 * (0..2, which must be longer than 8) changed at its middle: 'A' <-> 'g',
 * values 0 and 32, which differ in the top bit.
 */
char *hx_jwt_tamper(const char *token, int seg);

#endif
