/* SPDX-License-Identifier: MIT */
/* agent-brokerctl: ask the broker for tokens, and administer it. */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>
#include "agentbroker.h"
#include "../common/util.h"

enum {
        EXIT_OK = 0,
        EXIT_DENIED = 1,      /* the broker said no */
        EXIT_USAGE = 2,
        EXIT_UNREACHABLE = 3, /* no broker answering */
        EXIT_ERROR = 4,       /* any other failure */
};

typedef struct opts {
        const char *socket;
        const char *admin_socket;
        int timeout_ms;
} opts;

static void usage(FILE *f)
{
        fprintf(f,
                "Usage: agent-brokerctl [--socket PATH] [--admin-socket PATH] [--timeout MS] COMMAND [ARGS]\n"
                "\n"
                "Commands:\n"
                "  token --audience AUD --scope S [--scope S ...] [--ttl N] [--task ID] [--json]\n"
                "                      print a token for this process (compact JWS, or the reply as JSON)\n"
                "  keys                print the broker's JSON Web Key Set\n"
                "  status              say whether the broker answers\n"
                "  call METHOD [JSON]  call any varlink method and print the reply\n"
                "\n"
                "Options:\n"
                "  --socket PATH        agent socket ($AGENT_BROKER_SOCKET, default %s)\n"
                "  --admin-socket PATH  admin socket ($AGENT_BROKER_ADMIN_SOCKET, default %s)\n"
                "  --timeout MS         connect and reply timeout (default 5000)\n"
                "  -h, --help           this help;  --version  the version\n"
                "\n"
                "Exit status: 0 success; 1 denied by the broker (reason on stderr);\n"
                "2 bad usage; 3 broker unreachable; 4 any other error.\n",
                AB_DEFAULT_SOCKET, AB_DEFAULT_ADMIN_SOCKET);
}

static int exit_for(int r)
{
        switch (r) {
        case 0: return EXIT_OK;
        case AB_ERR_DENIED: return EXIT_DENIED;
        case AB_ERR_UNREACHABLE: return EXIT_UNREACHABLE;
        case AB_ERR_INVALID: return EXIT_USAGE;
        default: return EXIT_ERROR;
        }
}

static int fail(ab_client *c, int r, const char *what)
{
        const char *name = c ? ab_client_error_name(c) : "";
        const char *msg = c ? ab_client_error_message(c) : "";

        if (*name)
                fprintf(stderr, "agent-brokerctl: %s: %s%s%s\n", what, name, *msg ? ": " : "", msg);
        else
                fprintf(stderr, "agent-brokerctl: %s: %s\n", what, ab_strerror(r));
        return exit_for(r);
}

static int connect_to(const opts *o, bool admin, ab_client **ret)
{
        const char *path = admin ? o->admin_socket : o->socket;
        int r;

        if (!path && admin)
                path = getenv("AGENT_BROKER_ADMIN_SOCKET");
        if (!path && admin)
                path = AB_DEFAULT_ADMIN_SOCKET;
        r = ab_client_connect(path, o->timeout_ms, ret);
        if (r < 0) {
                fprintf(stderr, "agent-brokerctl: cannot reach the broker at %s: %s\n",
                        path ? path : (getenv("AGENT_BROKER_SOCKET") ? getenv("AGENT_BROKER_SOCKET") : AB_DEFAULT_SOCKET),
                        ab_strerror(r));
                return r == AB_ERR_INVALID ? EXIT_USAGE : EXIT_UNREACHABLE;
        }
        return 0;
}

/* Call method on the agent (or admin) socket; prints nothing; returns an exit code. */
static int simple_call(const opts *o, bool admin, const char *method, json_t *params, json_t **ret)
{
        ab_client *c = NULL;
        char *in = NULL, *out = NULL;
        int r, ex;

        ex = connect_to(o, admin, &c);
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
                ex = fail(c, r, method);
                ab_client_free(c);
                return ex;
        }
        ab_client_free(c);
        *ret = json_loads(out, 0, NULL);
        ab_token_free(out);
        return *ret ? EXIT_OK : EXIT_ERROR;
}

static int print_json(json_t *v)
{
        char *s = json_dumps(v, JSON_INDENT(2));
        if (!s)
                return EXIT_ERROR;
        printf("%s\n", s);
        free(s);
        return EXIT_OK;
}

static int cmd_token(const opts *o, int argc, char **argv)
{
        static const struct option lo[] = {
                { "audience", required_argument, NULL, 'a' }, { "scope", required_argument, NULL, 's' },
                { "ttl", required_argument, NULL, 't' },      { "task", required_argument, NULL, 'k' },
                { "json", no_argument, NULL, 'j' },           { "help", no_argument, NULL, 'h' },
                { 0 },
        };
        json_t *params = json_object(), *scopes = json_array(), *reply = NULL;
        bool as_json = false;
        int c, ex;

        if (!params || !scopes)
                return EXIT_ERROR;
        json_object_set_new(params, "scopes", scopes);
        optind = 1;
        while ((c = getopt_long(argc, argv, "h", lo, NULL)) >= 0) {
                switch (c) {
                case 'a': json_object_set_new(params, "audience", json_string(optarg)); break;
                case 's': json_array_append_new(scopes, json_string(optarg)); break;
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
                case 'k': json_object_set_new(params, "task", json_string(optarg)); break;
                case 'j': as_json = true; break;
                case 'h': usage(stdout); json_decref(params); return EXIT_OK;
                default: json_decref(params); return EXIT_USAGE;
                }
        }
        if (!json_object_get(params, "audience") || json_array_size(scopes) == 0 || optind < argc) {
                fprintf(stderr, "agent-brokerctl: token needs --audience and at least one --scope\n");
                json_decref(params);
                return EXIT_USAGE;
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

static int cmd_keys(const opts *o, int argc, char **argv)
{
        json_t *reply = NULL;
        int ex;

        (void)argv;
        if (argc > 1 && strcmp(argv[1], "--jwks") != 0 && strcmp(argv[1], "--json") != 0) {
                fprintf(stderr, "agent-brokerctl: keys: unexpected argument \"%s\"\n", argv[1]);
                return EXIT_USAGE;
        }
        ex = simple_call(o, false, "io.agentbroker.GetKeys", NULL, &reply);
        if (ex)
                return ex;
        ex = print_json(reply);
        json_decref(reply);
        return ex;
}

static int cmd_status(const opts *o, int argc, char **argv)
{
        json_t *reply = NULL;
        int ex;

        if (argc > 1) {
                fprintf(stderr, "agent-brokerctl: status: unexpected argument \"%s\"\n", argv[1]);
                return EXIT_USAGE;
        }
        ex = simple_call(o, false, "org.varlink.service.GetInfo", NULL, &reply);
        if (ex)
                return ex;
        printf("%s %s is answering\n", json_string_value(json_object_get(reply, "product")),
               json_string_value(json_object_get(reply, "version")));
        json_decref(reply);
        return EXIT_OK;
}

static int cmd_call(const opts *o, int argc, char **argv)
{
        json_t *params = NULL, *reply = NULL;
        bool admin = false;
        int ex, i = 1;

        if (i < argc && strcmp(argv[i], "--admin") == 0) {
                admin = true;
                i++;
        }
        if (i >= argc || argc - i > 2) {
                fprintf(stderr, "agent-brokerctl: call [--admin] METHOD [JSON-PARAMETERS]\n");
                return EXIT_USAGE;
        }
        if (i + 1 < argc) {
                params = json_loads(argv[i + 1], JSON_REJECT_DUPLICATES, NULL);
                if (!json_is_object(params)) {
                        fprintf(stderr, "agent-brokerctl: parameters must be a JSON object\n");
                        json_decref(params);
                        return EXIT_USAGE;
                }
        }
        ex = simple_call(o, admin, argv[i], params, &reply);
        if (ex)
                return ex;
        ex = print_json(reply);
        json_decref(reply);
        return ex;
}

int main(int argc, char **argv)
{
        static const struct option lo[] = {
                { "socket", required_argument, NULL, 's' }, { "admin-socket", required_argument, NULL, 'A' },
                { "timeout", required_argument, NULL, 'T' }, { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, 'V' },      { 0 },
        };
        static const struct { const char *name; int (*fn)(const opts *, int, char **); } cmds[] = {
                { "token", cmd_token }, { "keys", cmd_keys }, { "status", cmd_status }, { "call", cmd_call },
        };
        opts o = { .timeout_ms = 5000 };
        int c;

        while ((c = getopt_long(argc, argv, "+h", lo, NULL)) >= 0) {
                switch (c) {
                case 's': o.socket = optarg; break;
                case 'A': o.admin_socket = optarg; break;
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
                default: usage(stderr); return EXIT_USAGE;
                }
        }
        if (optind >= argc) {
                usage(stderr);
                return EXIT_USAGE;
        }
        for (size_t i = 0; i < AB_ARRAY_SIZE(cmds); i++)
                if (strcmp(argv[optind], cmds[i].name) == 0)
                        return cmds[i].fn(&o, argc - optind, argv + optind);
        fprintf(stderr, "agent-brokerctl: unknown command \"%s\"; see --help\n", argv[optind]);
        return EXIT_USAGE;
}
