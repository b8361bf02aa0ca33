/* SPDX-License-Identifier: MIT */
/* agent-brokerctl: ask the broker for tokens, and administer it. */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <jansson.h>
#include <sodium.h>
#include "agentbroker.h"
#include "client-internal.h"
#include "../common/util.h"
#include "../broker/policy.h"
#include "ctl.h"

static void usage(FILE *f)
{
        fprintf(f,
                "Usage: agent-brokerctl [--socket PATH] [--admin-socket PATH] [--timeout MS] COMMAND [ARGS]\n"
                "\n"
                "Commands:\n"
                "  token --audience AUD --scope S [--scope S ...] [--ttl N] [--task ID] [--json]\n"
                "        [--out FILE [--refresh]]\n"
                "                      print a token for this process (compact JWS, or the reply as JSON);\n"
                "                      --out writes FILE (mode 0600, atomic); --refresh keeps renewing it\n"
                "                      at 2/3 of its lifetime until SIGTERM\n"
                "  exec --audience AUD --scope S [--ttl N] [--task ID] [--env NAME] -- CMD [ARGS]\n"
                "                      run CMD with a fresh token in $NAME (default AGENT_BROKER_TOKEN);\n"
                "                      the exit status is then CMD's (126: not runnable, 127: not found)\n"
                "  keys [--jwks|--json] [--out FILE]\n"
                "                      the broker's JSON Web Key Set for verifiers; --out writes FILE\n"
                "                      (mode 0644, atomic) to publish, e.g. /run/agent-broker/jwks.json\n"
                "  keys list [--json]  every key with its status (admin socket)\n"
                "  keys rotate [--overlap SECONDS [--force]] [--json]\n"
                "                      new signing key; the old one stays in the JWKS for the overlap\n"
                "                      (default 24 h + 5 s, the longest token life); republish the JWKS.\n"
                "                      An overlap shorter than the policy's longest max_ttl is refused\n"
                "                      without --force (for a leaked key: its tokens stop verifying)\n"
                "  status [--json]     say whether the broker answers\n"
                "  whoami [--json]     show the agent entry the broker attests this process as\n"
                "  policy check [--json] PATH...   validate policy files (no broker needed);\n"
                "                      exit 0 clean, 1 warnings, 2 errors\n"
                "  policy show [AGENT] [--json]    the compiled policy (admin socket)\n"
                "  policy reload [--json]          recompile the policy sources now (admin socket);\n"
                "                      refused: exit 1 and each finding, as policy check shows it\n"
                "  policy sign --key FILE [--json] PATH   write PATH.sig, as a control plane would\n"
                "  keygen --out FILE [--json]      make a control-plane signing key (FILE, FILE.pub)\n"
                "  authenticate [--json]           open or re-authenticate this process's session\n"
                "  introspect TOKEN|- [--audience A] [--scope S] [--max-auth-age N] [--user U] [--json]\n"
                "                      print the verdict on a token (JSON); exit 0 only if it is active\n"
                "  attenuate TOKEN|- [--audience A] [--scope S ...] [--ttl N] [--task ID] [--json]\n"
                "                      print a narrower token derived from TOKEN\n"
                "  revoke (--jti ID | --session SID | --token TOKEN | --agent ID | --before TIME) [--json]\n"
                "                      revoke; --agent and --before need the admin socket, TIME is\n"
                "                      Unix seconds, @SECONDS, \"now\" or YYYY-MM-DDTHH:MM:SSZ\n"
                "  sessions [--agent ID] [--json]  list sessions (all on the admin socket, else your own)\n"
                "  audit [--since T] [--agent A] [--event E] [--json] [--file PATH]\n"
                "                      the audit trail (admin socket, or a file)\n"
                "  audit verify [--file PATH ...] [--keys JWKS] [--json]\n"
                "                      check the hash chain and signed checkpoints; exit 1 and name\n"
                "                      the first broken record if any\n"
                "  review [--json|--csv] [--unused-days N] [--policy PATH]  access review per agent; exit 1 on findings\n"
                "  coverage [--pam-dir DIR] [--policy PATH] [--json]  PAM services that bypass the broker; exit 1 if any\n"
                "  call [--admin] [--json] METHOD [JSON]   call any varlink method and print the reply (JSON)\n"
                "\n"
                "Options:\n"
                "  --socket PATH        agent socket ($AGENT_BROKER_SOCKET, default %s)\n"
                "  --admin-socket PATH  admin socket ($AGENT_BROKER_ADMIN_SOCKET, default %s)\n"
                "  --timeout MS         connect and reply timeout (default 5000)\n"
                "  -h, --help           this help;  --version  the version\n"
                "\n"
                "Commands that take the admin socket use it when this user can open it,\n"
                "else the agent socket (revoke: only your own tokens and sessions).\n"
                "\n"
                "Exit status: 0 success; 1 denied by the broker (reason on stderr),\n"
                "or an inactive token for introspect;\n"
                "2 bad usage (also a value the broker refuses as invalid);\n"
                "3 broker unreachable, or its socket refuses this user (permission denied);\n"
                "4 any other error.\n",
                AB_DEFAULT_SOCKET, AB_DEFAULT_ADMIN_SOCKET);
}

int ctl_exit_for(int r)
{
        switch (r) {
        case 0: return EXIT_OK;
        case AB_ERR_DENIED: return EXIT_DENIED;
        case AB_ERR_UNREACHABLE: return EXIT_UNREACHABLE;
        case AB_ERR_INVALID:
        case AB_ERR_TOO_LARGE: return EXIT_USAGE; /* what the command line gave */
        default: return EXIT_ERROR;
        }
}

/* s on f, each character a terminal acts on (ab_control_len) shown as '?', as ab_defang does. */
static void put_defanged(FILE *f, const char *s)
{
        while (*s) {
                size_t n = ab_control_len(s);
                if (n == 0) {
                        fputc(*s++, f);
                        continue;
                }
                for (size_t i = 0; i < n; i++)
                        fputc('?', f);
                s += n;
        }
}

int ctl_fail(ab_client *c, int r, const char *what)
{
        const char *name = c ? ab_client_error_name(c) : "";
        const char *msg = c ? ab_client_error_message(c) : "";
        const char *dot = strrchr(name, '.');

        if (*name) {
                /* the broker's reason may quote a file or a name from anyone: defanged */
                fprintf(stderr, "agent-brokerctl: %s: ", what);
                put_defanged(stderr, name);
                if (*msg) {
                        fputs(": ", stderr);
                        put_defanged(stderr, msg);
                }
                fputc('\n', stderr);
        } else
                fprintf(stderr, "agent-brokerctl: %s: %s\n", what, ab_strerror(r));
        /* the broker refused what was given on the command line (a cut-off too far ahead,
         * an overlap too short, a malformed jti): bad usage, not an internal failure */
        if ((r == AB_ERR_REMOTE || r == AB_ERR_DENIED) && dot && strcmp(dot, ".InvalidParameter") == 0)
                return EXIT_USAGE;
        return ctl_exit_for(r);
}

const char *ctl_socket_path(const opts *o, bool admin)
{
        const char *path = admin ? o->admin_socket : o->socket;

        if (!path && admin)
                path = getenv("AGENT_BROKER_ADMIN_SOCKET");
        if (!path && admin)
                path = AB_DEFAULT_ADMIN_SOCKET;
        return path; /* NULL: the library's default ($AGENT_BROKER_SOCKET or AB_DEFAULT_SOCKET) */
}

/*
 * Why connecting to path failed, from the kernel: the library says only
 * "unreachable". -EACCES/-EPERM when the socket (or its directory) refuses
 * this user, else 0.
 */
static int connect_denied(const char *path)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd, r = 0;

        if (strlen(path) >= sizeof sa.sun_path)
                return 0;
        memcpy(sa.sun_path, path, strlen(path) + 1);
        /* non-blocking: a full listen queue (EAGAIN) must not hang the probe */
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return 0;
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && (errno == EACCES || errno == EPERM))
                r = -errno;
        close(fd);
        return r;
}

int ctl_connect(const opts *o, bool admin, ab_client **ret)
{
        const char *path = ctl_socket_path(o, admin);
        const char *shown;
        int r;

        r = ab_client_connect(path, o->timeout_ms, ret);
        if (r < 0) {
                shown = path ? path : (getenv("AGENT_BROKER_SOCKET") ? getenv("AGENT_BROKER_SOCKET") : AB_DEFAULT_SOCKET);
                if (r == AB_ERR_UNREACHABLE && connect_denied(shown) < 0) {
                        /* the broker may well be running: this user may not use that socket (exit 3 still) */
                        if (admin)
                                fprintf(stderr, "agent-brokerctl: permission denied on the admin socket %s "
                                                "(needs root or the admin group)\n", shown);
                        else
                                fprintf(stderr, "agent-brokerctl: permission denied on the agent socket %s\n", shown);
                        return EXIT_UNREACHABLE;
                }
                fprintf(stderr, "agent-brokerctl: cannot reach the broker at %s: %s\n", shown, ab_strerror(r));
                return r == AB_ERR_INVALID ? EXIT_USAGE : EXIT_UNREACHABLE;
        }
        return 0;
}

/*
 * simple_call(), and when the broker answers with an error, *ret_error (if
 * not NULL) gets {"error": NAME, "parameters": {...}} (a new reference;
 * NULL for any other outcome), after the error was printed.
 */
static int call_keep_error(const opts *o, bool admin, const char *method, json_t *params, json_t **ret,
                           json_t **ret_error)
{
        ab_client *c = NULL;
        char *in = NULL, *out = NULL;
        int r, ex;

        ex = ctl_connect(o, admin, &c);
        if (ex) {
                json_decref(params);
                return ex;
        }
        if (params) {
                in = json_dumps(params, JSON_COMPACT);
                json_decref(params);
                if (!in) {
                        ab_client_free(c);
                        return EXIT_ERROR;
                }
        }
        r = ab_client_call(c, method, in, &out);
        free(in);
        if (r < 0) {
                ex = ctl_fail(c, r, method);
                if (ret_error && *ab_client_error_name(c))
                        *ret_error = json_pack("{s:s, s:O?}", "error", ab_client_error_name(c), "parameters",
                                               (json_t *)ab_client_error_parameters(c));
                ab_client_free(c);
                return ex;
        }
        ab_client_free(c);
        *ret = json_loads(out, 0, NULL);
        ab_token_free(out);
        return *ret ? EXIT_OK : EXIT_ERROR;
}

int simple_call(const opts *o, bool admin, const char *method, json_t *params, json_t **ret)
{
        return call_keep_error(o, admin, method, params, ret, NULL);
}

static int parse_uint_arg(const char *what, const char *v, long min, long max, long *ret);
static int only_json_arg(int argc, char **argv);

int print_json(json_t *v)
{
        char *s = json_dumps(v, JSON_INDENT(2));
        if (!s)
                return EXIT_ERROR;
        printf("%s\n", s);
        free(s);
        return EXIT_OK;
}

int print_safe(const char *s)
{
        int n = 0;

        for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
                if (*p == '"' || *p == '\\')
                        n += printf("\\%c", *p);
                else if (*p >= 0x20 && *p < 0x7f)
                        n += putchar(*p) != EOF;
                else
                        n += printf("\\x%02x", *p);
        }
        return n;
}

json_t *ctl_arg(const char *opt, const char *v)
{
        json_t *j = json_string(v);

        if (!j) {
                fprintf(stderr, "agent-brokerctl: %s: the value is not valid UTF-8\n", opt);
                exit(EXIT_USAGE);
        }
        return j;
}

json_t *ctl_json_text(const char *s)
{
        json_t *j = json_string(s);
        char *t, *q;

        if (j || !s)
                return j;
        /* not UTF-8 (a file name may be anything): bytes past ASCII as \xNN */
        t = malloc(strlen(s) * 4 + 1);
        if (!t)
                return NULL;
        q = t;
        for (const unsigned char *p = (const unsigned char *)s; *p; p++)
                q += *p < 0x80 ? sprintf(q, "%c", *p) : sprintf(q, "\\x%02x", *p);
        j = json_string(t);
        free(t);
        return j;
}

static int cmd_token(const opts *o, int argc, char **argv)
{
        static const struct option lo[] = {
                { "audience", required_argument, NULL, 'a' }, { "scope", required_argument, NULL, 's' },
                { "ttl", required_argument, NULL, 't' },      { "task", required_argument, NULL, 'k' },
                { "json", no_argument, NULL, 'j' },           { "help", no_argument, NULL, 'h' },
                { "out", required_argument, NULL, 'o' },      { "refresh", no_argument, NULL, 'r' },
                { 0 },
        };
        json_t *params = json_object(), *scopes = json_array(), *reply = NULL;
        bool as_json = false, refresh = false;
        const char *out = NULL;
        int c, ex;

        if (!params || !scopes)
                return EXIT_ERROR;
        json_object_set_new(params, "scopes", scopes);
        optind = 0;
        while ((c = getopt_long(argc, argv, "h", lo, NULL)) >= 0) {
                switch (c) {
                case 'a': json_object_set_new(params, "audience", ctl_arg("--audience", optarg)); break;
                case 's': json_array_append_new(scopes, ctl_arg("--scope", optarg)); break;
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
                case 'k': json_object_set_new(params, "task", ctl_arg("--task", optarg)); break;
                case 'j': as_json = true; break;
                case 'o': out = optarg; break;
                case 'r': refresh = true; break;
                case 'h': usage(stdout); json_decref(params); return EXIT_OK;
                default: json_decref(params); return EXIT_USAGE;
                }
        }
        if (!json_object_get(params, "audience") || json_array_size(scopes) == 0 || optind < argc) {
                fprintf(stderr, "agent-brokerctl: token needs --audience and at least one --scope\n");
                json_decref(params);
                return EXIT_USAGE;
        }
        if (refresh && !out) {
                fprintf(stderr, "agent-brokerctl: token --refresh needs --out FILE\n");
                json_decref(params);
                return EXIT_USAGE;
        }
        if (out) {
                ex = ctl_token_to_file(o, params, out, refresh);
                json_decref(params);
                return ex;
        }
        ex = simple_call(o, false, "io.agentbroker.IssueToken", params, &reply);
        if (ex)
                return ex;
        if (as_json)
                ex = print_json(reply);
        else if (json_is_string(json_object_get(reply, "token")))
                printf("%s\n", json_string_value(json_object_get(reply, "token")));
        else
                ex = EXIT_ERROR;
        json_decref(reply);
        return ex;
}

/* keys rotate [--overlap SECONDS [--force]] [--json] */
static int cmd_keys_rotate(const opts *o, int argc, char **argv)
{
        json_t *reply = NULL, *params = json_object();
        bool as_json = false;
        int ex;

        if (!params)
                return EXIT_ERROR;
        for (int i = 1; i < argc; i++) {
                long v;
                if (strcmp(argv[i], "--json") == 0)
                        as_json = true;
                else if (strcmp(argv[i], "--force") == 0)
                        json_object_set_new(params, "force", json_true());
                else if (strcmp(argv[i], "--overlap") == 0 && i + 1 < argc &&
                         parse_uint_arg("--overlap", argv[i + 1], 0, 366L * 86400, &v) == 0) {
                        json_object_set_new(params, "overlap", json_integer(v));
                        i++;
                } else {
                        if (strcmp(argv[i], "--overlap") != 0 || i + 1 >= argc) /* parse_uint_arg said why */
                                fprintf(stderr, "agent-brokerctl: usage: keys rotate [--overlap SECONDS [--force]] "
                                                "[--json]\n");
                        json_decref(params);
                        return EXIT_USAGE;
                }
        }
        ex = simple_call(o, true, "io.agentbroker.admin.RotateKey", params, &reply);
        if (ex)
                return ex;
        if (as_json) {
                ex = print_json(reply);
        } else {
                time_t until = (time_t)json_integer_value(json_object_get(reply, "previous_valid_until"));
                struct tm tm;
                char when[32] = "?";
                if (gmtime_r(&until, &tm))
                        strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
                printf("new signing key %s; %s stays in the JWKS until %s\n",
                       json_string_value(json_object_get(reply, "kid")),
                       json_string_value(json_object_get(reply, "previous_kid")), when);
        }
        json_decref(reply);
        /* new tokens carry the new kid from now on: verifiers elsewhere need it */
        fprintf(stderr, "agent-brokerctl: republish the JWKS for remote verifiers now: "
                        "systemctl start agent-broker-jwks.service (or agent-brokerctl keys --jwks --out FILE)\n");
        return ex;
}

static int cmd_keys(const opts *o, int argc, char **argv)
{
        static const struct option lo[] = {
                { "jwks", no_argument, NULL, 'w' }, { "json", no_argument, NULL, 'j' },
                { "out", required_argument, NULL, 'o' }, { 0 },
        };
        json_t *reply = NULL;
        const char *out = NULL;
        char *text;
        int c, ex, r;

        if (argc > 1 && strcmp(argv[1], "rotate") == 0)
                return cmd_keys_rotate(o, argc - 1, argv + 1);
        if (argc > 1 && strcmp(argv[1], "list") == 0) {
                if (argc > 3 || (argc == 3 && strcmp(argv[2], "--json") != 0 && strcmp(argv[2], "--jwks") != 0)) {
                        fprintf(stderr, "agent-brokerctl: keys list [--json]\n");
                        return EXIT_USAGE;
                }
                ex = simple_call(o, true, "io.agentbroker.admin.ListKeys", NULL, &reply);
                if (ex)
                        return ex;
                ex = print_json(reply);
                json_decref(reply);
                return ex;
        }
        /* keys [--jwks] [--json] [--out FILE]: the JWKS is the only format, so --jwks and --json say the same */
        optind = 0;
        while ((c = getopt_long(argc, argv, "", lo, NULL)) >= 0) {
                switch (c) {
                case 'w': case 'j': break;
                case 'o': out = optarg; break;
                default: return EXIT_USAGE;
                }
        }
        if (optind != argc || (out && !*out)) {
                fprintf(stderr, "agent-brokerctl: keys [--jwks|--json] [--out FILE] | keys list [--json] | "
                                "keys rotate [--overlap SECONDS [--force]] [--json]\n");
                return EXIT_USAGE;
        }
        ex = simple_call(o, false, "io.agentbroker.GetKeys", NULL, &reply);
        if (ex)
                return ex;
        if (!out) {
                ex = print_json(reply);
                json_decref(reply);
                return ex;
        }
        if (!json_is_array(json_object_get(reply, "keys"))) {
                fprintf(stderr, "agent-brokerctl: keys: the broker's reply has no \"keys\"\n");
                json_decref(reply);
                return EXIT_ERROR;
        }
        /* for verifiers: world-readable, replaced atomically so a reader never sees half a file */
        text = json_dumps(reply, JSON_INDENT(2));
        json_decref(reply);
        if (!text)
                return EXIT_ERROR;
        r = ctl_write_atomic(out, text, 0644);
        free(text);
        if (r < 0) {
                fprintf(stderr, "agent-brokerctl: cannot write %s: %s\n", out, strerror(-r));
                return EXIT_ERROR;
        }
        return EXIT_OK;
}

static int cmd_status(const opts *o, int argc, char **argv)
{
        json_t *reply = NULL;
        int ex;

        ex = only_json_arg(argc, argv);
        if (ex == EXIT_OK)
                ex = simple_call(o, false, "org.varlink.service.GetInfo", NULL, &reply);
        if (ex)
                return ex;
        if (argc == 2) {
                ex = print_json(reply);
                json_decref(reply);
                return ex;
        }
        printf("%s %s is answering\n", json_string_value(json_object_get(reply, "product")),
               json_string_value(json_object_get(reply, "version")));
        json_decref(reply);
        return EXIT_OK;
}

static int cmd_call(const opts *o, int argc, char **argv)
{
        json_t *params = NULL, *reply = NULL;
        const char *args[2];
        bool admin = false;
        int ex, n = 0;

        /* call [--admin] [--json] METHOD [JSON]: the reply is JSON anyway, so --json (anywhere) changes nothing */
        for (int i = 1; i < argc; i++) {
                if (strcmp(argv[i], "--json") == 0)
                        continue;
                if (n == 0 && strcmp(argv[i], "--admin") == 0) {
                        admin = true;
                        continue;
                }
                if (n == 0 && argv[i][0] == '-') { /* a method name never starts with '-' */
                        fprintf(stderr, "agent-brokerctl call: unrecognized option '%s'\n", argv[i]);
                        return EXIT_USAGE;
                }
                if (n == 2) {
                        n = 3;
                        break;
                }
                args[n++] = argv[i];
        }
        if (n < 1 || n > 2) {
                fprintf(stderr, "agent-brokerctl: call [--admin] [--json] METHOD [JSON-PARAMETERS]\n");
                return EXIT_USAGE;
        }
        if (n == 2) {
                json_error_t jerr;
                params = json_loads(args[1], JSON_REJECT_DUPLICATES, &jerr);
                if (!json_is_object(params)) {
                        fprintf(stderr, "agent-brokerctl: call: the parameters must be one JSON object%s%s\n",
                                params ? "" : ": ", params ? "" : jerr.text);
                        json_decref(params);
                        return EXIT_USAGE;
                }
        }
        ex = simple_call(o, admin, args[0], params, &reply);
        if (ex)
                return ex;
        ex = print_json(reply);
        json_decref(reply);
        return ex;
}

/* A command whose only argument is an optional --json: EXIT_OK, or EXIT_USAGE after naming the first other one. */
static int only_json_arg(int argc, char **argv)
{
        for (int i = 1; i < argc; i++)
                if (i > 1 || strcmp(argv[i], "--json") != 0) {
                        fprintf(stderr, "agent-brokerctl: %s: unexpected argument \"%s\"\n", argv[0], argv[i]);
                        return EXIT_USAGE;
                }
        return EXIT_OK;
}

/* Call method with no parameters and print the reply as JSON (whoami, authenticate: JSON with or without --json). */
static int call_and_print(const opts *o, int argc, char **argv, const char *method)
{
        json_t *reply = NULL;
        int ex = only_json_arg(argc, argv);

        if (ex == EXIT_OK)
                ex = simple_call(o, false, method, NULL, &reply);
        if (ex)
                return ex;
        ex = print_json(reply);
        json_decref(reply);
        return ex;
}

static int cmd_whoami(const opts *o, int argc, char **argv)
{
        return call_and_print(o, argc, argv, "io.agentbroker.WhoAmI");
}

/*
 * One policy finding, as policy check and policy reload show it: the line
 * "FILE: PATH: severity: message" on f, or (f NULL) appended to the JSON
 * array findings as {file, path, severity, message}.
 */
static void put_finding(FILE *f, json_t *findings, const char *file, const char *path, const char *severity,
                        const char *msg)
{
        if (f) {
                /* the broker's findings quote the file, which may come from anyone (a broker
                 * before it did not defang them): no escape sequence reaches the terminal */
                put_defanged(f, file);
                fputs(": ", f);
                put_defanged(f, path);
                fprintf(f, ": %s: ", severity);
                put_defanged(f, msg);
                fputc('\n', f);
        } else
                json_array_append_new(findings, json_pack("{s:o, s:o, s:s, s:o}", "file", ctl_json_text(file), "path",
                                                          ctl_json_text(path), "severity", severity, "message",
                                                          ctl_json_text(msg)));
}

typedef struct check_out {
        json_t *findings;
        bool as_json;
} check_out;

static void check_emit(void *ud, int sev, const char *file, const char *path, const char *msg)
{
        check_out *co = ud;

        put_finding(co->as_json ? NULL : stdout, co->findings, file, path,
                    sev == AB_DIAG_ERROR ? "error" : "warning", msg);
}

/* What the broker (as root) would say of path's owner and mode: an error, a warning, or nothing. */
static void check_trust(check_out *co, ab_diag *diag, const char *path)
{
        uid_t owner = 0;
        char msg[200];

        switch (ab_trust_problem(path, &owner)) {
        case 2:
                diag->errors++;
                check_emit(co, AB_DIAG_ERROR, path, "$",
                           "writable by users other than root: the broker refuses it (it decides what agents get)");
                break;
        case 1:
                diag->warnings++;
                snprintf(msg, sizeof msg, "owned by uid %u, not root: a broker running as root refuses it",
                         (unsigned)owner);
                check_emit(co, AB_DIAG_WARNING, path, "$", msg);
                break;
        default:
                break;
        }
}

/*
 * How many sources ab_policy_load_path() compiles from the directory dir:
 * its *.json files, hidden ones left out (the same rule), each and the
 * directory checked for what the broker refuses (check_trust). -errno if
 * it cannot be listed.
 */
static int count_policy_sources(check_out *co, ab_diag *diag, const char *dir)
{
        DIR *d = opendir(dir);
        struct dirent *de;
        int n = 0;

        if (!d)
                return -errno;
        check_trust(co, diag, dir);
        while ((de = readdir(d))) {
                size_t l = strlen(de->d_name);
                if (de->d_name[0] != '.' && l >= 6 && strcmp(de->d_name + l - 5, ".json") == 0 && n < INT_MAX) {
                        char path[PATH_MAX];
                        n++;
                        if (snprintf(path, sizeof path, "%s/%s", dir, de->d_name) < (int)sizeof path)
                                check_trust(co, diag, path);
                }
        }
        closedir(d);
        return n;
}

static int cmd_policy_check(int argc, char **argv)
{
        check_out co = { .findings = json_array() };
        ab_diag diag = { .emit = check_emit, .userdata = &co, .lint = true };
        ab_policy *p = NULL;
        int i = 1, files = 0;
        bool dashdash = false;

        if (i < argc && strcmp(argv[i], "--json") == 0) {
                co.as_json = true;
                i++;
        }
        if (i < argc && strcmp(argv[i], "--") == 0) { /* file names follow, even those that start with '-' */
                dashdash = true;
                i++;
        }
        if (i >= argc) {
                fprintf(stderr, "agent-brokerctl: policy check [--json] [--] PATH...\n");
                json_decref(co.findings);
                return EXIT_USAGE;
        }
        for (int k = i; k < argc; k++)
                if (!dashdash && argv[k][0] == '-' && argv[k][1]) { /* an option here is a mistake */
                        fprintf(stderr, "agent-brokerctl policy check: unrecognized option '%s' (--json comes first)\n",
                                argv[k]);
                        json_decref(co.findings);
                        return EXIT_USAGE;
                }
        if (ab_policy_new(&p) < 0)
                return EXIT_ERROR;
        for (; i < argc; i++) {
                struct stat st;
                char msg[256];
                int r;
                if (stat(argv[i], &st) == 0 && S_ISDIR(st.st_mode)) {
                        /* compiled as the broker would (*.json in name order), and each of them is a file */
                        ab_policy *dp = NULL;
                        r = count_policy_sources(&co, &diag, argv[i]);
                        if (r < 0) {
                                snprintf(msg, sizeof msg, "cannot read: %s", ab_strerror(r));
                                diag.errors++;
                                check_emit(&co, AB_DIAG_ERROR, argv[i], "$", msg);
                                continue;
                        }
                        files += r;
                        if (ab_policy_load_path(argv[i], &diag, &dp) == 0)
                                ab_policy_free(dp);
                } else {
                        char *text = NULL;
                        size_t len = 0;
                        r = ab_read_file(argv[i], AB_POLICY_MAX_FILE, &text, &len);
                        if (r < 0) {
                                snprintf(msg, sizeof msg, "cannot read: %s", ab_strerror(r));
                                diag.errors++;
                                check_emit(&co, AB_DIAG_ERROR, argv[i], "$", msg);
                        } else {
                                (void)ab_policy_add_document(p, argv[i], text, len, &diag);
                        }
                        free(text);
                        files++;
                }
        }
        ab_policy_free(p);
        if (co.as_json) {
                json_t *out = json_pack("{s:i, s:i, s:i, s:o}", "files", files, "errors", (int)diag.errors,
                                        "warnings", (int)diag.warnings, "findings", co.findings);
                print_json(out);
                json_decref(out);
        } else {
                printf("%d file%s: %u error%s, %u warning%s\n", files, files == 1 ? "" : "s", diag.errors,
                       diag.errors == 1 ? "" : "s", diag.warnings, diag.warnings == 1 ? "" : "s");
                json_decref(co.findings);
        }
        return diag.errors ? 2 : diag.warnings ? 1 : 0;
}

/*
 * Write data to path (mode), synced: if replace, through a temporary file
 * renamed over path; else created where path is (O_EXCL: never over an
 * existing file; no link(), which vfat lacks), and removed again if the
 * write fails. 0 or -errno.
 */
static int write_file_mode(const char *path, const char *data, mode_t mode, bool replace)
{
        char tmp[4200];
        int fd;
        size_t len = strlen(data);

        if (!replace) {
                fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
                if (fd < 0)
                        return -errno;
                errno = 0; /* a short write sets none */
                if (write(fd, data, len) != (ssize_t)len || fsync(fd) < 0) {
                        int r = errno ? -errno : -EIO;
                        close(fd);
                        unlink(path);
                        return r;
                }
                return close(fd) < 0 ? -errno : 0;
        }
        snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
        if (fd < 0)
                return -errno;
        if (write(fd, data, len) != (ssize_t)len || fsync(fd) < 0) {
                int r = -errno;
                close(fd);
                unlink(tmp);
                return r ? r : -EIO;
        }
        close(fd);
        if (rename(tmp, path) < 0) {
                int r = -errno;
                unlink(tmp);
                return r;
        }
        return 0;
}

static int b64_line(const uint8_t *bin, size_t n, char *out, size_t outmax)
{
        if (outmax < sodium_base64_ENCODED_LEN(n, sodium_base64_VARIANT_ORIGINAL) + 1)
                return -1;
        sodium_bin2base64(out, outmax, bin, n, sodium_base64_VARIANT_ORIGINAL);
        strcat(out, "\n");
        return 0;
}

/* The key id keygen prints for an Ed25519 public key: the first 8 bytes of its SHA-256, in hex. */
static void key_id(const uint8_t pk[crypto_sign_PUBLICKEYBYTES], char id[17])
{
        uint8_t h[crypto_hash_sha256_BYTES];

        crypto_hash_sha256(h, pk, crypto_sign_PUBLICKEYBYTES);
        sodium_bin2hex(id, 17, h, 8);
}

static int cmd_keygen(int argc, char **argv)
{
        static const struct option lo[] = {
                { "out", required_argument, NULL, 'o' }, { "json", no_argument, NULL, 'j' }, { 0 },
        };
        uint8_t pk[crypto_sign_PUBLICKEYBYTES], sk[crypto_sign_SECRETKEYBYTES];
        char skb[128], pkb[64], pubpath[4200], id[17];
        const char *out = NULL;
        bool as_json = false;
        int c, r;

        optind = 0;
        while ((c = getopt_long(argc, argv, "", lo, NULL)) >= 0) {
                switch (c) {
                case 'o': out = optarg; break;
                case 'j': as_json = true; break;
                default: return EXIT_USAGE;
                }
        }
        if (!out || !*out || optind != argc) {
                fprintf(stderr, "agent-brokerctl: keygen --out FILE [--json]\n");
                return EXIT_USAGE;
        }
        snprintf(pubpath, sizeof pubpath, "%s.pub", out);
        /* a key that exists may be the one every host trusts: never replaced */
        for (int i = 0; i < 2; i++) {
                struct stat st;
                const char *p = i ? pubpath : out;
                if (lstat(p, &st) == 0) {
                        fprintf(stderr, "agent-brokerctl: keygen: %s exists; remove it first to make a new key\n", p);
                        return EXIT_USAGE;
                }
        }
        crypto_sign_keypair(pk, sk);
        b64_line(sk, sizeof sk, skb, sizeof skb);
        b64_line(pk, sizeof pk, pkb, sizeof pkb);
        sodium_memzero(sk, sizeof sk);
        r = write_file_mode(out, skb, 0600, false);
        sodium_memzero(skb, sizeof skb);
        if (r < 0) {
                fprintf(stderr, "agent-brokerctl: keygen: %s: %s\n", out, strerror(-r));
                return EXIT_ERROR;
        }
        r = write_file_mode(pubpath, pkb, 0644, false);
        if (r < 0) {
                fprintf(stderr, "agent-brokerctl: keygen: %s: %s\n", pubpath, strerror(-r));
                unlink(out); /* no secret key without its public half */
                return EXIT_ERROR;
        }
        key_id(pk, id);
        if (as_json) {
                json_t *j;
                pkb[strcspn(pkb, "\n")] = '\0';
                j = json_pack("{s:s, s:s, s:s, s:s}", "secret_key_file", out, "public_key_file", pubpath,
                              "public_key", pkb, "key_id", id);
                r = j ? print_json(j) : EXIT_ERROR;
                json_decref(j);
                return r;
        }
        printf("secret key %s (keep it on the control plane), public key %s, key id %s\n"
               "Install the public key as /etc/agent-broker/trusted-keys/NAME.pub on each host.\n",
               out, pubpath, id);
        return EXIT_OK;
}

static int cmd_policy_sign(int argc, char **argv)
{
        static const struct option lo[] = {
                { "key", required_argument, NULL, 'k' }, { "json", no_argument, NULL, 'j' }, { 0 },
        };
        uint8_t sk[crypto_sign_SECRETKEYBYTES], sig[crypto_sign_BYTES];
        char *text = NULL, *keytext = NULL, sigb[128], sigpath[4200], id[17];
        const char *key = NULL, *src;
        size_t len = 0, klen = 0, got = 0;
        bool as_json = false;
        int c, r;

        optind = 0;
        while ((c = getopt_long(argc, argv, "", lo, NULL)) >= 0) {
                switch (c) {
                case 'k': key = optarg; break;
                case 'j': as_json = true; break;
                default: return EXIT_USAGE;
                }
        }
        if (!key || optind + 1 != argc) {
                fprintf(stderr, "agent-brokerctl: policy sign --key FILE [--json] PATH\n");
                return EXIT_USAGE;
        }
        src = argv[optind];
        r = ab_read_file(key, 4096, &keytext, &klen);
        if (r == 0 && (sodium_base642bin(sk, sizeof sk, keytext, klen, " \t\r\n", &got, NULL,
                                         sodium_base64_VARIANT_ORIGINAL) != 0 || got != sizeof sk))
                r = AB_ERR_CRYPTO;
        if (keytext)
                sodium_memzero(keytext, klen);
        free(keytext);
        if (r < 0) {
                fprintf(stderr, "agent-brokerctl: %s: not a key made by 'agent-brokerctl keygen' (%s)\n", key,
                        ab_strerror(r));
                return EXIT_ERROR;
        }
        r = ab_read_file(src, AB_POLICY_MAX_FILE, &text, &len);
        if (r < 0) {
                sodium_memzero(sk, sizeof sk);
                fprintf(stderr, "agent-brokerctl: %s: %s\n", src, ab_strerror(r));
                return EXIT_ERROR;
        }
        crypto_sign_detached(sig, NULL, (const uint8_t *)text, len, sk);
        key_id(sk + crypto_sign_SEEDBYTES, id); /* libsodium's secret key ends with the public key */
        sodium_memzero(sk, sizeof sk);
        free(text);
        b64_line(sig, sizeof sig, sigb, sizeof sigb);
        snprintf(sigpath, sizeof sigpath, "%s.sig", src);
        r = write_file_mode(sigpath, sigb, 0644, true);
        if (r < 0) {
                fprintf(stderr, "agent-brokerctl: %s: %s\n", sigpath, strerror(-r));
                return EXIT_ERROR;
        }
        if (as_json) {
                json_t *j = json_pack("{s:s, s:s, s:s}", "source", src, "signature_file", sigpath, "key_id", id);
                r = j ? print_json(j) : EXIT_ERROR;
                json_decref(j);
                return r;
        }
        printf("%s\n", sigpath);
        return EXIT_OK;
}


bool admin_usable(const opts *o)
{
        const char *path = o->admin_socket ? o->admin_socket : getenv("AGENT_BROKER_ADMIN_SOCKET");
        if (!path)
                path = AB_DEFAULT_ADMIN_SOCKET;
        return access(path, R_OK | W_OK) == 0;
}

/* A token from an argument, or from stdin when it is "-". */
static char *token_arg(const char *arg)
{
        char buf[16384];
        size_t n;

        if (strcmp(arg, "-") != 0)
                return strdup(arg);
        n = fread(buf, 1, sizeof buf - 1, stdin);
        buf[n] = '\0';
        while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r' || buf[n - 1] == ' '))
                buf[--n] = '\0';
        char *t = strdup(buf);
        sodium_memzero(buf, sizeof buf);
        return t;
}

static int parse_uint_arg(const char *what, const char *v, long min, long max, long *ret)
{
        char *end;
        long x;
        errno = 0;
        x = strtol(v, &end, 10);
        if (errno || *end || end == v || x < min || x > max) {
                fprintf(stderr, "agent-brokerctl: %s takes a number from %ld to %ld\n", what, min, max);
                return -1;
        }
        *ret = x;
        return 0;
}

int parse_time_arg(const char *v, long long *ret)
{
        struct tm tm = { 0 };
        const char *e;
        char *end;

        if (strcmp(v, "now") == 0) {
                *ret = (long long)time(NULL);
                return 0;
        }
        if (*v == '@')
                v++;
        errno = 0;
        *ret = strtoll(v, &end, 10);
        if (!errno && *end == '\0' && end != v && *ret >= 0 && *ret <= AB_TIME_ARG_MAX)
                return 0;
        e = strptime(v, "%Y-%m-%dT%H:%M:%S", &tm);
        if (e && (strcmp(e, "Z") == 0 || *e == '\0')) {
                struct tm back = tm;
                time_t t = timegm(&back);
                struct tm chk;
                /* a date that does not exist (February 31st) is refused, not moved on to March */
                if (gmtime_r(&t, &chk) && chk.tm_year == tm.tm_year && chk.tm_mon == tm.tm_mon &&
                    chk.tm_mday == tm.tm_mday && chk.tm_hour == tm.tm_hour && chk.tm_min == tm.tm_min &&
                    chk.tm_sec == tm.tm_sec && t >= 0 && (long long)t <= AB_TIME_ARG_MAX) {
                        *ret = (long long)t;
                        return 0;
                }
        }
        fprintf(stderr, "agent-brokerctl: a time takes Unix seconds, @SECONDS, now, or YYYY-MM-DDTHH:MM:SSZ (up to year 9999)\n");
        return -1;
}

static int cmd_authenticate(const opts *o, int argc, char **argv)
{
        return call_and_print(o, argc, argv, "io.agentbroker.Authenticate");
}

static int cmd_introspect(const opts *o, int argc, char **argv)
{
        static const struct option lo[] = {
                { "audience", required_argument, NULL, 'a' }, { "scope", required_argument, NULL, 's' },
                { "max-auth-age", required_argument, NULL, 'm' }, { "user", required_argument, NULL, 'u' },
                { "json", no_argument, NULL, 'j' }, { 0 },
        };
        json_t *params = json_object(), *reply = NULL;
        char *token;
        long v;
        int c, ex;

        optind = 0;
        while ((c = getopt_long(argc, argv, "", lo, NULL)) >= 0) {
                switch (c) {
                case 'a': json_object_set_new(params, "audience", ctl_arg("--audience", optarg)); break;
                case 's': json_object_set_new(params, "scope", ctl_arg("--scope", optarg)); break;
                case 'u': json_object_set_new(params, "user", ctl_arg("--user", optarg)); break;
                case 'm':
                        if (parse_uint_arg("--max-auth-age", optarg, 0, 366L * 86400, &v) < 0) {
                                json_decref(params);
                                return EXIT_USAGE;
                        }
                        json_object_set_new(params, "max_auth_age", json_integer(v));
                        break;
                case 'j': break; /* the verdict is printed as JSON anyway */
                default: json_decref(params); return EXIT_USAGE;
                }
        }
        if (optind + 1 != argc) {
                fprintf(stderr, "agent-brokerctl: introspect TOKEN|- [--audience A] [--scope S] [--max-auth-age N]\n");
                json_decref(params);
                return EXIT_USAGE;
        }
        token = token_arg(argv[optind]);
        if (!token) {
                json_decref(params);
                return EXIT_ERROR;
        }
        json_object_set_new(params, "token", ctl_arg("the token", token));
        sodium_memzero(token, strlen(token));
        free(token);
        ex = simple_call(o, false, "io.agentbroker.Introspect", params, &reply);
        if (ex)
                return ex;
        ex = print_json(reply);
        if (ex == EXIT_OK && !json_is_true(json_object_get(reply, "active")))
                ex = EXIT_DENIED;
        json_decref(reply);
        return ex;
}

static int cmd_attenuate(const opts *o, int argc, char **argv)
{
        static const struct option lo[] = {
                { "audience", required_argument, NULL, 'a' }, { "scope", required_argument, NULL, 's' },
                { "ttl", required_argument, NULL, 't' }, { "task", required_argument, NULL, 'k' },
                { "json", no_argument, NULL, 'j' }, { 0 },
        };
        json_t *params = json_object(), *scopes = json_array(), *reply = NULL;
        bool as_json = false;
        char *token;
        long v;
        int c, ex;

        optind = 0;
        while ((c = getopt_long(argc, argv, "", lo, NULL)) >= 0) {
                switch (c) {
                case 'a': json_object_set_new(params, "audience", ctl_arg("--audience", optarg)); break;
                case 's': json_array_append_new(scopes, ctl_arg("--scope", optarg)); break;
                case 'k': json_object_set_new(params, "task", ctl_arg("--task", optarg)); break;
                case 't':
                        if (parse_uint_arg("--ttl", optarg, 1, 86400, &v) < 0) {
                                json_decref(params);
                                json_decref(scopes);
                                return EXIT_USAGE;
                        }
                        json_object_set_new(params, "ttl", json_integer(v));
                        break;
                case 'j': as_json = true; break;
                default: json_decref(params); json_decref(scopes); return EXIT_USAGE;
                }
        }
        if (optind + 1 != argc) {
                fprintf(stderr, "agent-brokerctl: attenuate TOKEN|- [--audience A] [--scope S ...] [--ttl N]\n");
                json_decref(params);
                json_decref(scopes);
                return EXIT_USAGE;
        }
        if (json_array_size(scopes) > 0)
                json_object_set_new(params, "scopes", scopes);
        else
                json_decref(scopes);
        token = token_arg(argv[optind]);
        if (!token) {
                json_decref(params);
                return EXIT_ERROR;
        }
        json_object_set_new(params, "token", ctl_arg("the token", token));
        sodium_memzero(token, strlen(token));
        free(token);
        ex = simple_call(o, false, "io.agentbroker.Attenuate", params, &reply);
        if (ex)
                return ex;
        if (as_json)
                ex = print_json(reply);
        else
                printf("%s\n", json_string_value(json_object_get(reply, "token")));
        json_decref(reply);
        return ex;
}

static int cmd_revoke(const opts *o, int argc, char **argv)
{
        static const struct option lo[] = {
                { "jti", required_argument, NULL, 'j' }, { "session", required_argument, NULL, 's' },
                { "sid", required_argument, NULL, 's' }, { "token", required_argument, NULL, 't' },
                { "agent", required_argument, NULL, 'a' }, { "before", required_argument, NULL, 'b' },
                { "json", no_argument, NULL, 'J' }, { 0 },
        };
        json_t *params = json_object(), *reply = NULL;
        bool as_json = false, admin, needs_admin = false;
        long long t;
        int c, ex, n = 0;

        optind = 0;
        while ((c = getopt_long(argc, argv, "", lo, NULL)) >= 0) {
                switch (c) {
                case 'j': json_object_set_new(params, "jti", ctl_arg("--jti", optarg)); n++; break;
                case 's': json_object_set_new(params, "sid", ctl_arg("--session", optarg)); n++; break;
                case 't': {
                        char *tok = token_arg(optarg);
                        json_object_set_new(params, "token", ctl_arg("--token", tok ? tok : ""));
                        if (tok) {
                                sodium_memzero(tok, strlen(tok));
                                free(tok);
                        }
                        n++;
                        break;
                }
                case 'a': json_object_set_new(params, "agent", ctl_arg("--agent", optarg)); n++; needs_admin = true; break;
                case 'b':
                        if (parse_time_arg(optarg, &t) < 0) {
                                json_decref(params);
                                return EXIT_USAGE;
                        }
                        if (strcmp(optarg, "now") == 0)
                                t++; /* everything up to and including this second */
                        json_object_set_new(params, "before", json_integer(t));
                        n++;
                        needs_admin = true;
                        break;
                case 'J': as_json = true; break;
                default: json_decref(params); return EXIT_USAGE;
                }
        }
        if (n != 1 || optind != argc) {
                fprintf(stderr, "agent-brokerctl: revoke takes exactly one of --jti, --session, --token, --agent, --before\n");
                json_decref(params);
                return EXIT_USAGE;
        }
        /* --agent and --before exist on the admin socket only: a user who may
         * not open it hears so from ctl_connect (exit 3) */
        admin = needs_admin || admin_usable(o);
        if (admin && json_object_get(params, "token")) {
                /* the admin interface revokes by jti: take it from the token */
                json_t *q = json_pack("{s:O}", "token", json_object_get(params, "token")), *v = NULL;
                ex = simple_call(o, true, "io.agentbroker.admin.Introspect", q, &v);
                if (ex) {
                        json_decref(params);
                        return ex;
                }
                if (!json_is_string(json_object_get(v, "jti"))) {
                        fprintf(stderr, "agent-brokerctl: revoke: the token is not active (%s); nothing to revoke\n",
                                json_string_value(json_object_get(v, "reason")));
                        json_decref(v);
                        json_decref(params);
                        return EXIT_DENIED;
                }
                json_object_del(params, "token");
                json_object_set(params, "jti", json_object_get(v, "jti"));
                json_decref(v);
        }
        ex = simple_call(o, admin, admin ? "io.agentbroker.admin.Revoke" : "io.agentbroker.Revoke", params, &reply);
        if (ex)
                return ex;
        if (as_json)
                ex = print_json(reply);
        else
                printf("%s\n", json_string_value(json_object_get(reply, "message")));
        json_decref(reply);
        return ex;
}

/*
 * Every page of ListSessions (the broker answers under 64 KiB at a time),
 * as {"sessions": [...]}; agent filters (on the agent socket, here).
 */
static int list_all_sessions(const opts *o, bool admin, const char *agent, json_t **ret)
{
        json_t *all = json_array(), *reply = NULL;
        char after[64] = "";
        size_t i;
        int ex = EXIT_OK;

        if (!all)
                return EXIT_ERROR;
        for (unsigned page = 0; page < 1000000; page++) {
                json_t *p = json_object();
                const char *next;
                if (p && admin && agent)
                        json_object_set_new(p, "agent", ctl_arg("--agent", agent));
                if (p && after[0])
                        json_object_set_new(p, "after", json_string(after));
                ex = simple_call(o, admin, admin ? "io.agentbroker.admin.ListSessions" : "io.agentbroker.ListSessions",
                                 p, &reply);
                if (ex)
                        break;
                json_array_extend(all, json_object_get(reply, "sessions"));
                next = json_string_value(json_object_get(reply, "next"));
                if (!next || !*next || strlen(next) >= sizeof after || strcmp(next, after) == 0) {
                        json_decref(reply);
                        break;
                }
                snprintf(after, sizeof after, "%s", next);
                json_decref(reply);
        }
        if (ex) {
                json_decref(all);
                return ex;
        }
        if (!admin && agent)
                for (i = json_array_size(all); i-- > 0;)
                        if (strcmp(json_string_value(json_object_get(json_array_get(all, i), "agent")), agent))
                                json_array_remove(all, i);
        *ret = json_pack("{s:o}", "sessions", all);
        return *ret ? EXIT_OK : EXIT_ERROR;
}

static int cmd_sessions(const opts *o, int argc, char **argv)
{
        static const struct option lo[] = {
                { "agent", required_argument, NULL, 'a' }, { "json", no_argument, NULL, 'j' }, { 0 },
        };
        json_t *reply = NULL, *s;
        const char *agent = NULL;
        bool as_json = false, admin = admin_usable(o);
        size_t i;
        int c, ex;

        optind = 0;
        while ((c = getopt_long(argc, argv, "", lo, NULL)) >= 0) {
                switch (c) {
                case 'a': agent = optarg; break;
                case 'j': as_json = true; break;
                default: return EXIT_USAGE;
                }
        }
        if (optind != argc) {
                fprintf(stderr, "agent-brokerctl: sessions: unexpected argument \"%s\"\n", argv[optind]);
                return EXIT_USAGE;
        }
        ex = list_all_sessions(o, admin, agent, &reply);
        if (ex)
                return ex;
        if (as_json) {
                ex = print_json(reply);
                json_decref(reply);
                return ex;
        }
        printf("%-22s  %-20s  %6s  %7s  %-8s  %-20s  %s\n", "SID", "AGENT", "UID", "PID", "STATE", "EXPIRES", "PAM");
        json_array_foreach(json_object_get(reply, "sessions"), i, s) {
                time_t e = (time_t)json_integer_value(json_object_get(s, "expires"));
                struct tm tm;
                char when[32] = "";
                json_t *pam = json_object_get(s, "pam"), *ps;
                size_t k;
                if (gmtime_r(&e, &tm))
                        strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
                printf("%-22s  %-20s  %6lld  %7lld  %-8s  %-20s  %zu\n",
                       json_string_value(json_object_get(s, "sid")), json_string_value(json_object_get(s, "agent")),
                       (long long)json_integer_value(json_object_get(s, "uid")),
                       (long long)json_integer_value(json_object_get(s, "pid")),
                       json_string_value(json_object_get(s, "state")), when,
                       json_array_size(pam) + (size_t)json_integer_value(json_object_get(s, "pam_omitted")));
                json_array_foreach(pam, k, ps)
                        printf("    pam %s  service %s  user %s%s%s%s%s\n", json_string_value(json_object_get(ps, "id")),
                               json_string_value(json_object_get(ps, "service")),
                               json_string_value(json_object_get(ps, "user")),
                               json_object_get(ps, "tty") ? "  tty " : "",
                               json_object_get(ps, "tty") ? json_string_value(json_object_get(ps, "tty")) : "",
                               json_object_get(ps, "rhost") ? "  rhost " : "",
                               json_object_get(ps, "rhost") ? json_string_value(json_object_get(ps, "rhost")) : "");
                if (json_integer_value(json_object_get(s, "pam_omitted")) > 0)
                        printf("    (%lld more PAM sessions not listed)\n",
                               (long long)json_integer_value(json_object_get(s, "pam_omitted")));
        }
        json_decref(reply);
        return EXIT_OK;
}

static int cmd_keygen_o(const opts *o, int argc, char **argv)
{
        (void)o;
        return cmd_keygen(argc, argv);
}

#define POLICY_REJECTED "io.agentbroker.admin.PolicyRejected"

/*
 * A reload the broker refused (PolicyRejected, whose parameters carry
 * "findings"): each finding on stderr as policy check prints it, and with
 * as_json {error, reason, errors, warnings, findings} on stdout, findings
 * as policy check --json gives them.
 */
static void show_rejected(const json_t *params, bool as_json)
{
        json_t *findings = json_array(), *f;
        unsigned errors = 0, warnings = 0;
        size_t i;

        if (!findings)
                return;
        json_array_foreach(json_object_get(params, "findings"), i, f) {
                const char *file = json_string_value(json_object_get(f, "file"));
                const char *path = json_string_value(json_object_get(f, "path"));
                const char *sev = json_string_value(json_object_get(f, "severity"));
                const char *msg = json_string_value(json_object_get(f, "message"));
                if (!file || !path || !sev || !msg)
                        continue; /* not a finding */
                if (strcmp(sev, "error") == 0)
                        errors++;
                else if (strcmp(sev, "warning") == 0)
                        warnings++;
                put_finding(stderr, NULL, file, path, sev, msg);
                put_finding(NULL, findings, file, path, sev, msg);
        }
        if (as_json) {
                const char *reason = json_string_value(json_object_get(params, "reason"));
                json_t *out = json_pack("{s:s, s:s, s:i, s:i, s:O}", "error", POLICY_REJECTED, "reason",
                                        reason ? reason : "", "errors", (int)errors, "warnings", (int)warnings,
                                        "findings", findings);
                if (out)
                        print_json(out);
                json_decref(out);
        }
        json_decref(findings);
}

static int cmd_policy(const opts *o, int argc, char **argv)
{
        json_t *reply = NULL, *params = NULL;
        int ex;

        if (argc < 2) {
                fprintf(stderr, "agent-brokerctl: policy check|show|reload|sign ...\n");
                return EXIT_USAGE;
        }
        if (strcmp(argv[1], "check") == 0)
                return cmd_policy_check(argc - 1, argv + 1);
        if (strcmp(argv[1], "sign") == 0)
                return cmd_policy_sign(argc - 1, argv + 1);
        if (strcmp(argv[1], "reload") == 0 && (argc == 2 || (argc == 3 && strcmp(argv[2], "--json") == 0))) {
                json_t *err = NULL;
                ex = call_keep_error(o, true, "io.agentbroker.admin.ReloadPolicy", NULL, &reply, &err);
                if (ex) {
                        if (err && strcmp(json_string_value(json_object_get(err, "error")), POLICY_REJECTED) == 0)
                                show_rejected(json_object_get(err, "parameters"), argc == 3);
                        json_decref(err);
                        return ex;
                }
                if (argc == 3)
                        print_json(reply);
                else
                        printf("%s\n", json_string_value(json_object_get(reply, "message")));
                json_decref(reply);
                return EXIT_OK;
        }
        if (strcmp(argv[1], "show") == 0) {
                for (int i = 2; i < argc; i++) {
                        if (strcmp(argv[i], "--json") == 0)
                                continue;
                        if (params) {
                                fprintf(stderr, "agent-brokerctl: policy show [AGENT] [--json]: one agent at most\n");
                                json_decref(params);
                                return EXIT_USAGE;
                        }
                        params = json_object();
                        json_object_set_new(params, "agent", ctl_arg("the agent", argv[i]));
                }
                ex = simple_call(o, true, "io.agentbroker.admin.ShowPolicy", params, &reply);
                if (ex)
                        return ex;
                ex = print_json(reply);
                json_decref(reply);
                return ex;
        }
        fprintf(stderr, "agent-brokerctl: policy check|show|reload|sign ...; see --help\n");
        return EXIT_USAGE;
}

int main(int argc, char **argv)
{
        static const struct option lo[] = {
                { "socket", required_argument, NULL, 's' }, { "admin-socket", required_argument, NULL, 'A' },
                { "timeout", required_argument, NULL, 'T' }, { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, 'V' },      { 0 },
        };
        static const struct { const char *name; int (*fn)(const opts *, int, char **); } cmds[] = {
                { "token", cmd_token },   { "keys", cmd_keys },     { "status", cmd_status },
                { "call", cmd_call },     { "whoami", cmd_whoami }, { "policy", cmd_policy },
                { "keygen", cmd_keygen_o }, { "authenticate", cmd_authenticate },
                { "introspect", cmd_introspect }, { "attenuate", cmd_attenuate },
                { "revoke", cmd_revoke },   { "sessions", cmd_sessions },
                { "audit", cmd_audit },     { "exec", cmd_exec },
                { "review", cmd_review }, { "coverage", cmd_coverage },
        };
        opts o = { .timeout_ms = 5000 };
        int c;

        if (sodium_init() < 0)
                return EXIT_ERROR;

        opterr = 0; /* one line of our own below */
        while ((c = getopt_long(argc, argv, "+:h", lo, NULL)) >= 0) {
                switch (c) {
                case 's':
                case 'A':
                        if (!*optarg) {
                                fprintf(stderr, "agent-brokerctl: %s takes a path\n",
                                        c == 's' ? "--socket" : "--admin-socket");
                                return EXIT_USAGE;
                        }
                        *(c == 's' ? &o.socket : &o.admin_socket) = optarg;
                        break;
                case 'T': {
                        char *end;
                        long v = strtol(optarg, &end, 10);
                        if (*end || v <= 0 || v > 600000) {
                                fprintf(stderr, "agent-brokerctl: --timeout takes milliseconds\n");
                                return EXIT_USAGE;
                        }
                        o.timeout_ms = (int)v;
                        break;
                }
                case 'h': usage(stdout); return EXIT_OK;
                case 'V': printf("agent-brokerctl %s\n", AGENTBROKER_VERSION); return EXIT_OK;
                case ':':
                        fprintf(stderr, "agent-brokerctl: option %s needs a value (see agent-brokerctl --help)\n",
                                argv[optind - 1]);
                        return EXIT_USAGE;
                default:
                        fprintf(stderr, "agent-brokerctl: unknown option %s (see agent-brokerctl --help)\n",
                                argv[optind - 1]);
                        return EXIT_USAGE;
                }
        }
        opterr = 1; /* the commands' own getopt_long calls name a bad option on stderr */
        if (optind >= argc) {
                fprintf(stderr, "agent-brokerctl: no command given; see agent-brokerctl --help\n");
                return EXIT_USAGE;
        }
        for (size_t i = 0; i < AB_ARRAY_SIZE(cmds); i++)
                if (strcmp(argv[optind], cmds[i].name) == 0) {
                        /* getopt_long's messages name the program by argv[0]: "agent-brokerctl token: ..." */
                        char prog[64];
                        snprintf(prog, sizeof prog, "agent-brokerctl %s", cmds[i].name);
                        argv[optind] = prog;
                        return cmds[i].fn(&o, argc - optind, argv + optind);
                }
        fprintf(stderr, "agent-brokerctl: unknown command \"%s\"; see --help\n", argv[optind]);
        return EXIT_USAGE;
}
