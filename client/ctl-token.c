/* SPDX-License-Identifier: MIT */
/*
 * Token delivery for tools: `token --out FILE [--refresh]` keeps a file
 * holding a valid token, and `exec` runs a command with a fresh token in
 * its environment.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sodium.h>
#include "ctl.h"
#include "../common/jwt.h"

int ctl_write_atomic(const char *path, const char *text, mode_t mode)
{
        char tmp[PATH_MAX], dir[PATH_MAX];
        size_t len = strlen(text);
        char *slash;
        int fd, r = 0;

        if (snprintf(tmp, sizeof tmp, "%s.XXXXXX", path) >= (int)sizeof tmp)
                return -ENAMETOOLONG;
        fd = mkostemp(tmp, O_CLOEXEC);
        if (fd < 0)
                return -errno;
        if (fchmod(fd, mode) < 0) /* exactly mode, whatever the umask */
                r = -errno;
        for (size_t off = 0; r == 0 && off < len;) {
                ssize_t n = write(fd, text + off, len - off);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        r = n < 0 ? -errno : -EIO;
                else
                        off += (size_t)n;
        }
        if (r == 0 && write(fd, "\n", 1) != 1)
                r = -EIO;
        if (r == 0 && fsync(fd) < 0)
                r = -errno;
        if (close(fd) < 0 && r == 0)
                r = -errno;
        if (r == 0 && rename(tmp, path) < 0)
                r = -errno;
        if (r < 0) {
                unlink(tmp);
                return r;
        }
        /* the rename itself durable too (best effort: the file is in place either way) */
        snprintf(dir, sizeof dir, "%s", path);
        slash = strrchr(dir, '/');
        if (!slash)
                snprintf(dir, sizeof dir, ".");
        else if (slash == dir)
                dir[1] = '\0';
        else
                *slash = '\0';
        fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd >= 0) {
                (void)fsync(fd);
                close(fd);
        }
        return 0;
}

static volatile sig_atomic_t stop_signal;

static void on_stop(int sig)
{
        stop_signal = sig;
}

/* Sleep up to ms, waking early on SIGTERM/SIGINT. false when told to stop. */
static bool nap(long long ms)
{
        struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000 };
        sigset_t empty;

        sigemptyset(&empty);
        if (!stop_signal)
                (void)ppoll(NULL, 0, &ts, &empty); /* signals are blocked except here */
        return !stop_signal;
}

static long long clock_ms(clockid_t id)
{
        struct timespec ts;
        clock_gettime(id, &ts);
        return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* When to renew: wall is the wall clock's reading, boot CLOCK_BOOTTIME's. */
typedef struct deadline {
        long long wall, boot;
} deadline;

static deadline deadline_in(long long ms)
{
        return (deadline){ clock_ms(CLOCK_REALTIME) + ms, clock_ms(CLOCK_BOOTTIME) + ms };
}

/*
 * Sleep until d, by whichever clock gets there first: CLOCK_BOOTTIME counts
 * a suspend and ignores clock steps (a step back delayed renewal by the
 * step, with an expired token in the file), the wall clock follows a step
 * forward (the token's times are wall-clock times). ppoll's own clock stops
 * during a suspend: naps of at most 10 s, both clocks read after each.
 * false when told to stop.
 */
static bool nap_until(deadline d)
{
        for (;;) {
                long long lw = d.wall - clock_ms(CLOCK_REALTIME), lb = d.boot - clock_ms(CLOCK_BOOTTIME);
                long long left = lw < lb ? lw : lb;
                if (left <= 0)
                        return !stop_signal;
                if (!nap(left < 10000 ? left : 10000))
                        return false;
        }
}

/*
 * One issuance on c, re-authenticating when the broker asks for it.
 * Returns 0 with *ret_reply, or a library error.
 */
static int issue(ab_client *c, json_t *params, json_t **ret_reply)
{
        for (int attempt = 0; attempt < 2; attempt++) {
                char *in = json_dumps(params, JSON_COMPACT), *out = NULL;
                int r;
                if (!in)
                        return -ENOMEM;
                r = ab_client_call(c, "io.agentbroker.IssueToken", in, &out);
                free(in);
                if (r == 0) {
                        json_t *reply = json_loads(out, 0, NULL);
                        ab_token_free(out);
                        /* a reply without its token is the broker's error, never a crash here */
                        if (!json_is_string(json_object_get(reply, "token")) ||
                            !json_is_integer(json_object_get(reply, "expires_in"))) {
                                json_decref(reply);
                                return AB_ERR_PROTOCOL;
                        }
                        *ret_reply = reply;
                        return 0;
                }
                const char *name = ab_client_error_name(c);
                if (attempt == 0 && (strcmp(name, "io.agentbroker.ReauthRequired") == 0 ||
                                     strcmp(name, "io.agentbroker.SessionExpired") == 0)) {
                        char *a = NULL;
                        r = ab_client_call(c, "io.agentbroker.Authenticate", NULL, &a);
                        if (r == 0) {
                                ab_token_free(a);
                                continue;
                        }
                        /* Authenticate's own failure (a rate limit, say) is the one to report */
                }
                return r;
        }
        return AB_ERR_DENIED;
}

/*
 * May a failed renewal succeed later? A lost or silent broker, its limits
 * (RateLimited, TooManyConnections, LimitReached), an audit trail that
 * cannot record, a failure on its side: yes. A denial or a request it
 * calls bad (InvalidParameter, MethodNotFound, ...): never.
 */
static bool may_heal(ab_client *c, int r)
{
        static const char *const healing[] = {
                "io.agentbroker.RateLimited",   "io.agentbroker.TooManyConnections", "io.agentbroker.LimitReached",
                "io.agentbroker.AuditUnavailable", "io.agentbroker.PeerGone",       "io.agentbroker.InternalError",
        };
        const char *name = ab_client_error_name(c);

        if (r == AB_ERR_DENIED)
                return false;
        if (r != AB_ERR_REMOTE)
                return r != AB_ERR_INVALID && r != AB_ERR_TOO_LARGE; /* the transport: yes */
        for (size_t i = 0; i < sizeof healing / sizeof healing[0]; i++)
                if (strcmp(name, healing[i]) == 0)
                        return true;
        return false;
}

int ctl_token_to_file(const opts *o, json_t *params, const char *path, bool refresh)
{
        struct sigaction sa = { .sa_handler = on_stop };
        sigset_t block;
        ab_client *c = NULL;
        long long backoff = 1000;
        bool used = false; /* c has served a request */
        int ex = EXIT_OK;

        sigemptyset(&block);
        sigaddset(&block, SIGTERM);
        sigaddset(&block, SIGINT);
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        sigprocmask(SIG_BLOCK, &block, NULL);
        for (;;) {
                json_t *reply = NULL;
                int r;

                if (!c) {
                        if ((ex = ctl_connect(o, false, &c)) != 0) {
                                if (!refresh || ex == EXIT_USAGE) /* a socket path that can never work */
                                        break;
                                c = NULL;
                                goto retry;
                        }
                        used = false;
                }
                r = issue(c, params, &reply);
                if (r == AB_ERR_CLOSED && used) {
                        /*
                         * The broker closes a connection idle for its
                         * --idle-timeout (300 s), which renewals far apart
                         * outlast: reconnect once and send again at once,
                         * quietly. A new connection that fails is logged.
                         */
                        ab_client_free(c);
                        c = NULL;
                        continue;
                }
                if (r < 0) {
                        ex = ctl_fail(c, r, "io.agentbroker.IssueToken");
                        if (!refresh || !may_heal(c, r))
                                break;
                        ab_client_free(c);
                        c = NULL;
                        goto retry;
                }
                deadline renew = deadline_in(0);
                r = ctl_write_atomic(path, json_string_value(json_object_get(reply, "token")), 0600);
                if (r < 0) {
                        fprintf(stderr, "agent-brokerctl: cannot write %s: %s\n", path, strerror(-r));
                        json_decref(reply);
                        ex = EXIT_ERROR;
                        break;
                }
                long long ttl = json_integer_value(json_object_get(reply, "expires_in"));
                json_decref(reply);
                ex = EXIT_OK;
                backoff = 1000;
                used = true;
                if (!refresh)
                        break;
                /* renew at two thirds of the lifetime */
                long long wait = ttl > 0 ? ttl * 2000 / 3 : 1000;
                renew.wall += wait;
                renew.boot += wait;
                if (!nap_until(renew))
                        break;
                continue;
        retry:
                if (!nap(backoff))
                        break;
                backoff = backoff < 30000 ? backoff * 2 : 30000;
        }
        ab_client_free(c);
        if (stop_signal)
                return EXIT_OK; /* stopped cleanly; the file keeps its last valid token */
        return ex;
}

int cmd_exec(const opts *o, int argc, char **argv)
{
        static const struct option lo[] = {
                { "audience", required_argument, NULL, 'a' }, { "scope", required_argument, NULL, 's' },
                { "ttl", required_argument, NULL, 't' },      { "task", required_argument, NULL, 'k' },
                { "env", required_argument, NULL, 'e' },      { 0 },
        };
        json_t *params = json_object(), *scopes = json_array(), *reply = NULL;
        const char *env = "AGENT_BROKER_TOKEN";
        ab_client *c = NULL;
        int ch, ex, r;

        json_object_set_new(params, "scopes", scopes);
        optind = 0;
        while ((ch = getopt_long(argc, argv, "+", lo, NULL)) >= 0) {
                switch (ch) {
                case 'a': json_object_set_new(params, "audience", ctl_arg("--audience", optarg)); break;
                case 's': json_array_append_new(scopes, ctl_arg("--scope", optarg)); break;
                case 'k': json_object_set_new(params, "task", ctl_arg("--task", optarg)); break;
                case 'e': env = optarg; break;
                case 't': {
                        char *end;
                        long v = strtol(optarg, &end, 10);
                        if (*end || v <= 0 || v > 86400) {
                                fprintf(stderr, "agent-brokerctl: --ttl takes seconds from 1 to 86400\n");
                                json_decref(params);
                                return EXIT_USAGE;
                        }
                        json_object_set_new(params, "ttl", json_integer(v));
                        break;
                }
                default: json_decref(params); return EXIT_USAGE;
                }
        }
        if (!json_object_get(params, "audience") || json_array_size(scopes) == 0 || optind >= argc || !*env ||
            strchr(env, '=')) {
                fprintf(stderr, "agent-brokerctl: exec --audience A --scope S [--ttl N] [--task ID] [--env NAME] -- CMD [ARGS]\n");
                json_decref(params);
                return EXIT_USAGE;
        }
        /*
         * The token is fetched by a child that then exits. The broker binds a
         * session to the process that asks; had this process asked and then
         * exec'd CMD, CMD's own first call would find "its" session opened by
         * another program, get ReauthRequired, and re-authenticating would
         * end the session of the token it was given (helper-42). CMD's own
         * calls now open a session of their own.
         */
        int pfd[2];
        pid_t pid, parent = getpid();
        char token[AB_JWT_MAX + 2];
        size_t len = 0;
        int status = 0;
        struct sigaction dfl = { .sa_handler = SIG_DFL }, inherited;

        /* an ignored SIGCHLD (a supervisor's, kept across exec) would make the kernel reap the
         * child and waitpid fail: the default while it runs, and CMD gets what we inherited */
        sigemptyset(&dfl.sa_mask);
        sigaction(SIGCHLD, &dfl, &inherited);
        fflush(NULL);
        if (pipe2(pfd, O_CLOEXEC) < 0 || (pid = fork()) < 0) {
                fprintf(stderr, "agent-brokerctl: exec: %s\n", strerror(errno));
                json_decref(params);
                return EXIT_ERROR;
        }
        if (pid == 0) {
                /* no token for nobody: it goes when the command's process does */
                if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0 || getppid() != parent)
                        _exit(EXIT_ERROR);
                close(pfd[0]);
                ex = ctl_connect(o, false, &c);
                if (ex == 0) {
                        r = issue(c, params, &reply);
                        if (r < 0)
                                ex = ctl_fail(c, r, "io.agentbroker.IssueToken");
                        ab_client_free(c);
                }
                if (ex == 0) {
                        const char *t = json_string_value(json_object_get(reply, "token"));
                        size_t n = strlen(t);
                        for (size_t off = 0; ex == 0 && off < n;) {
                                ssize_t w = write(pfd[1], t + off, n - off);
                                if (w < 0 && errno == EINTR)
                                        continue;
                                if (w <= 0)
                                        ex = EXIT_ERROR;
                                else
                                        off += (size_t)w;
                        }
                }
                json_decref(reply);
                fflush(NULL);
                _exit(ex);
        }
        close(pfd[1]);
        json_decref(params);
        for (;;) {
                ssize_t n = read(pfd[0], token + len, sizeof token - 1 - len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                len += (size_t)n;
                if (len == sizeof token - 1)
                        break;
        }
        close(pfd[0]);
        token[len] = '\0';
        for (;;) {
                if (waitpid(pid, &status, 0) >= 0) {
                        ex = WIFEXITED(status) ? WEXITSTATUS(status) : EXIT_ERROR;
                        if (WIFSIGNALED(status))
                                fprintf(stderr, "agent-brokerctl: exec: the token request was killed by signal %d\n",
                                        WTERMSIG(status));
                        break;
                }
                if (errno != EINTR) {
                        fprintf(stderr, "agent-brokerctl: exec: waiting for the token request: %s\n", strerror(errno));
                        ex = EXIT_ERROR;
                        break;
                }
        }
        sigaction(SIGCHLD, &inherited, NULL);
        if (ex == 0 && (len == 0 || len > AB_JWT_MAX))
                ex = EXIT_ERROR;
        if (ex != 0 || setenv(env, token, 1) < 0) {
                sodium_memzero(token, sizeof token);
                return ex ? ex : EXIT_ERROR;
        }
        sodium_memzero(token, sizeof token); /* the environment holds the copy CMD gets */
        execvp(argv[optind], argv + optind);
        fprintf(stderr, "agent-brokerctl: exec %s: %s\n", argv[optind], strerror(errno));
        return errno == ENOENT ? 127 : 126;
}
