/* SPDX-License-Identifier: MIT */
/* agent-brokerd: the host's credential broker for AI agents. */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sodium.h>
#include "log.h"
#include "manager.h"
#include "../common/util.h"

static void help(void)
{
        printf("Usage: agent-brokerd [OPTIONS]\n"
               "\n"
               "Hand local agent processes short-lived, scoped tokens over a Unix socket,\n"
               "after identifying them from the kernel.\n"
               "\n"
               "  --socket PATH            agent socket (default %s)\n"
               "  --admin-socket PATH      admin socket, root only (default %s)\n"
               "  --state-dir DIR          keys and state (default %s)\n"
               "  --policy PATH            policy file or directory of *.json (default %s)\n"
               "  --config FILE            broker.conf (default %s)\n"
               "  --trusted-keys DIR       control-plane public keys, *.pub (default %s)\n"
               "  --require-signed         refuse policy sources without a valid .sig\n"
               "  --audit-log PATH         hash-chained audit file (default " AB_AUDIT_DEFAULT_PATH ",\n"
               "                           or audit.jsonl in --state-dir when that is given)\n"
               "  --audit-max-size MIB     rotate the audit file past this size (default 64, 0: never)\n"
               "  --audit-keep N           keep the N newest rotated audit files, delete older ones\n"
               "                           (default 0: keep every one, never delete)\n"
               "  --store-max-size MIB     the state store's map (default 1024); past 90%% of it no new\n"
               "                           session or PAM record is opened: revocations keep their room;\n"
               "                           past 75%%, none for a uid holding most of the sessions\n"
               "  --issuer ISS             token issuer (default urn:agent-broker:MACHINE-ID)\n"
               "  --exit-idle SECONDS      exit after this long without connections (0: never)\n"
               "  --max-connections N      connections in all (default 4096)\n"
               "  --max-connections-per-uid N   (default 1024)\n"
               "  --rate-limit N[/BURST]   requests per second per uid, 0 for none (default 5000/10000)\n"
               "  --idle-timeout SECONDS   close connections idle this long (default 300)\n"
               "  --debug                  log debug messages\n"
               "  -h, --help               show this help\n"
               "  --version                show the version\n"
               "\n"
               "Sockets passed by systemd (FileDescriptorName=agent / admin) are used\n"
               "instead of --socket / --admin-socket. SIGTERM stops the broker cleanly;\n"
               "SIGHUP recompiles the policy.\n",
               AB_DEFAULT_SOCKET, AB_DEFAULT_ADMIN_SOCKET, AB_DEFAULT_STATE_DIR, AB_DEFAULT_POLICY,
               AB_DEFAULT_CONFIG, AB_DEFAULT_TRUSTED_KEYS);
}

static int parse_uint(const char *s, unsigned long long max, unsigned long long *ret)
{
        char *end;
        unsigned long long v;

        if (!s || !*s || *s == '-')
                return -EINVAL;
        errno = 0;
        v = strtoull(s, &end, 10);
        if (errno || *end || v > max)
                return -EINVAL;
        *ret = v;
        return 0;
}

static int parse_args(int argc, char **argv, ab_config *cfg, const char **trusted_flag, bool *signed_flag)
{
        bool state_given = false;
        enum { O_SOCKET = 256, O_ADMIN, O_STATE, O_POLICY, O_ISSUER, O_EXIT_IDLE, O_MAXCONN, O_MAXCONN_UID,
               O_RATE, O_IDLE, O_DEBUG, O_VERSION, O_CONFIG, O_TRUSTED, O_REQSIGNED, O_AUDIT, O_AUDIT_MAX, O_AUDIT_KEEP,
               O_STORE_MAX };
        static const struct option opts[] = {
                { "socket", required_argument, NULL, O_SOCKET },
                { "admin-socket", required_argument, NULL, O_ADMIN },
                { "state-dir", required_argument, NULL, O_STATE },
                { "policy", required_argument, NULL, O_POLICY },
                { "issuer", required_argument, NULL, O_ISSUER },
                { "exit-idle", required_argument, NULL, O_EXIT_IDLE },
                { "max-connections", required_argument, NULL, O_MAXCONN },
                { "max-connections-per-uid", required_argument, NULL, O_MAXCONN_UID },
                { "rate-limit", required_argument, NULL, O_RATE },
                { "idle-timeout", required_argument, NULL, O_IDLE },
                { "debug", no_argument, NULL, O_DEBUG },
                { "config", required_argument, NULL, O_CONFIG },
                { "trusted-keys", required_argument, NULL, O_TRUSTED },
                { "require-signed", no_argument, NULL, O_REQSIGNED },
                { "audit-log", required_argument, NULL, O_AUDIT },
                { "audit-max-size", required_argument, NULL, O_AUDIT_MAX },
                { "audit-keep", required_argument, NULL, O_AUDIT_KEEP },
                { "store-max-size", required_argument, NULL, O_STORE_MAX },
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, O_VERSION },
                { 0 },
        };
        unsigned long long v;
        int c;

        while ((c = getopt_long(argc, argv, "h", opts, NULL)) >= 0) {
                switch (c) {
                case O_SOCKET: cfg->socket_path = optarg; break;
                case O_ADMIN: cfg->admin_socket_path = optarg; break;
                case O_STATE: cfg->state_dir = optarg; state_given = true; break;
                case O_AUDIT: cfg->audit_path = optarg; break;
                case O_AUDIT_MAX:
                        if (parse_uint(optarg, 1ull << 40, &v) < 0)
                                goto bad;
                        cfg->audit_max_size = v * 1024 * 1024;
                        break;
                case O_AUDIT_KEEP:
                        if (parse_uint(optarg, AB_AUDIT_MAX_ROTATED, &v) < 0) {
                                fprintf(stderr,
                                        "agent-brokerd: --audit-keep takes a number of rotated files from 0 (keep "
                                        "every one) to %d, not \"%s\"\n",
                                        AB_AUDIT_MAX_ROTATED, optarg);
                                return -EINVAL;
                        }
                        cfg->audit_keep = (unsigned)v;
                        break;
                case O_STORE_MAX:
                        if (parse_uint(optarg, 1u << 20, &v) < 0 || v == 0) {
                                fprintf(stderr, "agent-brokerd: --store-max-size takes MiB from 1 to 1048576, not \"%s\"\n",
                                        optarg);
                                return -EINVAL;
                        }
                        cfg->store_max_size = v * 1024 * 1024;
                        break;
                case O_POLICY: cfg->policy_path = optarg; break;
                case O_ISSUER:
                        if (!ab_is_printable(optarg, 120)) {
                                fprintf(stderr, "agent-brokerd: --issuer must be printable ASCII, at most 120 bytes\n");
                                return -EINVAL;
                        }
                        cfg->issuer = optarg;
                        break;
                case O_EXIT_IDLE:
                        if (parse_uint(optarg, 86400, &v) < 0)
                                goto bad;
                        cfg->exit_idle_usec = v * 1000000ull;
                        break;
                case O_MAXCONN:
                        if (parse_uint(optarg, 1000000, &v) < 0 || v == 0)
                                goto bad;
                        cfg->max_connections = (unsigned)v;
                        break;
                case O_MAXCONN_UID:
                        if (parse_uint(optarg, 1000000, &v) < 0 || v == 0)
                                goto bad;
                        cfg->max_connections_per_uid = (unsigned)v;
                        break;
                case O_RATE: {
                        char buf[64], *slash;
                        unsigned long long burst;
                        snprintf(buf, sizeof buf, "%s", optarg);
                        slash = strchr(buf, '/');
                        if (slash)
                                *slash = '\0';
                        if (parse_uint(buf, 10000000, &v) < 0)
                                goto bad;
                        burst = 2 * v;
                        if (slash && (parse_uint(slash + 1, 100000000, &burst) < 0 || burst == 0))
                                goto bad;
                        cfg->rate_per_sec = (unsigned)v;
                        cfg->rate_burst = (unsigned)burst;
                        break;
                }
                case O_IDLE:
                        if (parse_uint(optarg, 86400, &v) < 0 || v == 0)
                                goto bad;
                        cfg->idle_timeout_usec = v * 1000000ull;
                        break;
                case O_DEBUG: cfg->log_level = LOG_DEBUG; break;
                case O_CONFIG: cfg->config_path = optarg; break;
                case O_TRUSTED: *trusted_flag = optarg; break;
                case O_REQSIGNED: *signed_flag = true; break;
                case 'h': help(); return 1;
                case O_VERSION: printf("agent-brokerd %s\n", AGENTBROKER_VERSION); return 1;
                default: return -EINVAL;
                }
        }
        if (!cfg->audit_path && state_given) {
                /* a broker with its own state dir keeps its audit trail there too */
                static char path[4096];
                snprintf(path, sizeof path, "%s/%s", cfg->state_dir, AB_AUDIT_FILE);
                cfg->audit_path = path;
        }
        if (optind < argc) {
                fprintf(stderr, "agent-brokerd: unexpected argument \"%s\"\n", argv[optind]);
                return -EINVAL;
        }
        return 0;
bad:
        fprintf(stderr, "agent-brokerd: invalid value \"%s\" for an option; see --help\n", optarg);
        return -EINVAL;
}

int main(int argc, char **argv)
{
        ab_manager *m = NULL;
        ab_config cfg;
        int r;

        const char *trusted_flag = NULL;
        bool signed_flag = false;

        /* SIGTERM, SIGINT and SIGHUP wait (blocked, in every thread made later) for the event
         * loop's signalfd: before, one during start-up (a reload racing a start, a stop right
         * after the socket appeared) killed the broker with no shutdown checkpoint (helper-54) */
        sigset_t ss;
        sigemptyset(&ss);
        sigaddset(&ss, SIGTERM);
        sigaddset(&ss, SIGINT);
        sigaddset(&ss, SIGHUP);
        sigprocmask(SIG_BLOCK, &ss, NULL);

        ab_config_defaults(&cfg);
        r = parse_args(argc, argv, &cfg, &trusted_flag, &signed_flag);
        if (r != 0)
                return r > 0 ? EXIT_SUCCESS : 2;
        ab_log_init(cfg.log_level);
        /* broker.conf, then the command line wins (again at every reload) */
        cfg.trusted_keys_arg = trusted_flag;
        cfg.require_signed_arg = signed_flag;
        if (ab_config_apply_file(&cfg) < 0)
                return EXIT_FAILURE;
        if (sodium_init() < 0) {
                ab_log(LOG_ERR, "libsodium failed to initialise");
                return EXIT_FAILURE;
        }
        r = ab_manager_new(&cfg, &m);
        if (r >= 0)
                r = ab_manager_startup(m);
        if (r >= 0)
                r = ab_manager_run(m);
        if (r < 0)
                ab_log(LOG_ERR, "exiting: %s", ab_strerror(r));
        ab_manager_free(m);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
