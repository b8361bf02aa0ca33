/* SPDX-License-Identifier: MIT */
/*
 * agent-brokerctl against the real agent-brokerd (issue 10): --json on
 * every command that prints data (and --help and the man page say so),
 * keys --jwks --out (publishing the JWKS), token --out --refresh across
 * the broker's idle-connection timeout, the message for an admin socket
 * that refuses this user, the bash completion, policy check of a
 * directory (how many files) and a refused policy reload (its findings).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>
#include "harness.h"

#define AUD "mcp://cli.test"
#define AGENT_ID "cli-agent"

/* ---- fixtures ----------------------------------------------------------------- */

/* This test's uid is the agent cli-agent; nobody is nobody-agent. */
static void policy_text(char *policy, size_t max)
{
        int n;

        n = snprintf(policy, max,
                     "{\"version\": 1, \"agents\": [\n"
                     " {\"id\": \"" AGENT_ID "\", \"owner\": \"alice@example.com\", \"match\": {\"uid\": %d},\n"
                     "  \"grants\": [{\"audience\": \"" AUD "\", \"scopes\": [\"read\", \"write\"], \"max_ttl\": 600}]},\n"
                     " {\"id\": \"nobody-agent\", \"owner\": \"bob@example.com\", \"match\": {\"uid\": %d},\n"
                     "  \"grants\": [{\"audience\": \"" AUD "\", \"scopes\": [\"read\"], \"max_ttl\": 600}]}]}\n",
                     (int)geteuid(), HX_NOBODY_UID);
        assert_true(n > 0 && (size_t)n < max);
}

static void start(hx_broker *b)
{
        char policy[1024];

        policy_text(policy, sizeof policy);
        assert_int_equal(hx_broker_write_policy(b, policy), 0);
        hx_start(b);
}

/* The source tree: $AB_SOURCE_DIR, else the parent of the build directory. */
static void src_path(const char *rel, char *out, size_t max)
{
        const char *env = getenv("AB_SOURCE_DIR");
        char dir[PATH_MAX];

        if (env && *env) {
                snprintf(dir, sizeof dir, "%s", env);
        } else {
                assert_non_null(realpath(hx_build_dir(), dir));
                char *slash = strrchr(dir, '/');
                assert_true(slash && slash != dir);
                *slash = '\0';
        }
        assert_true((size_t)snprintf(out, max, "%s/%s", dir, rel) < max);
}

/* Run the CLI (see hx_ctl); on an unexpected exit code print what it said. */
#define CTL(b, uid, res, want_exit, ...)                                                                        \
        do {                                                                                                    \
                assert_int_equal(hx_ctl((b), (uid), (res), __VA_ARGS__, NULL), 0);                              \
                if ((res)->exit_code != (want_exit))                                                            \
                        fprintf(stderr, "agent-brokerctl %s: exit %d\nstdout: %s\nstderr: %s\n", #__VA_ARGS__,   \
                                (res)->exit_code, (res)->out, (res)->err);                                      \
                assert_int_equal((res)->exit_code, (want_exit));                                                \
        } while (0)

/* text must be one JSON object (and only that); a new reference. */
static json_t *json_of(const char *what, const char *text)
{
        json_error_t e;
        json_t *j = json_loads(text, 0, &e);

        if (!json_is_object(j))
                fprintf(stderr, "%s: not one JSON object (%s):\n%s\n", what, e.text, text);
        assert_true(json_is_object(j));
        return j;
}

/* Every non-empty line of text is a JSON object; returns how many. */
static size_t json_lines(const char *what, const char *text)
{
        size_t n = 0;
        char *copy = strdup(text), *save = NULL;

        assert_non_null(copy);
        for (char *l = strtok_r(copy, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
                json_decref(json_of(what, l));
                n++;
        }
        free(copy);
        return n;
}

static const char *str(json_t *j, const char *key)
{
        const char *v = json_string_value(json_object_get(j, key));
        if (!v)
                fprintf(stderr, "no string \"%s\" in the reply\n", key);
        assert_non_null(v);
        return v;
}

/* ---- --json everywhere ----------------------------------------------------------- */

/* Each command that prints data, with --json: valid JSON on stdout. */
static void test_json_on_every_command(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        char path[PATH_MAX + 64], key[PATH_MAX + 64], src[PATH_MAX + 64], audit[PATH_MAX + 64], jwks[PATH_MAX + 64],
                bad[PATH_MAX + 64], pamdir[PATH_MAX + 64];
        char token[4096], jti[128], key_id[64];
        json_t *j;

        start(b);

        CTL(b, -1, &res, 0, "token", "--audience", AUD, "--scope", "read", "--json");
        j = json_of("token --json", res.out);
        snprintf(token, sizeof token, "%s", str(j, "token"));
        snprintf(jti, sizeof jti, "%s", str(j, "jti"));
        json_decref(j);
        hx_run_result_done(&res);

        static const char *const simple[][4] = {
                { "keys", NULL },           { "keys", "--json", NULL },   { "keys", "--jwks", NULL },
                { "keys", "list", "--json", NULL }, { "status", "--json", NULL }, { "whoami", "--json", NULL },
                { "authenticate", "--json", NULL }, { "sessions", "--json", NULL },
                { "policy", "show", "--json", NULL }, { "policy", "show", AGENT_ID, "--json" },
                { "policy", "reload", "--json", NULL },
        };
        for (size_t i = 0; i < sizeof simple / sizeof simple[0]; i++) {
                assert_int_equal(hx_ctl(b, -1, &res, simple[i][0], simple[i][1], simple[i][2], simple[i][3], NULL), 0);
                if (res.exit_code != 0)
                        fprintf(stderr, "%s %s: exit %d: %s\n", simple[i][0], simple[i][1] ? simple[i][1] : "",
                                res.exit_code, res.err);
                assert_int_equal(res.exit_code, 0);
                json_decref(json_of(simple[i][0], res.out));
                hx_run_result_done(&res);
        }

        CTL(b, -1, &res, 0, "introspect", token, "--audience", AUD, "--json");
        j = json_of("introspect --json", res.out);
        assert_true(json_is_true(json_object_get(j, "active")));
        json_decref(j);
        hx_run_result_done(&res);

        CTL(b, -1, &res, 0, "attenuate", token, "--ttl", "30", "--json");
        json_decref(json_of("attenuate --json", res.out));
        hx_run_result_done(&res);

        /* policy check, keygen and policy sign need no broker */
        assert_int_equal(hx_ctl(b, -1, &res, "policy", "check", "--json", b->policy, NULL), 0);
        assert_true(res.exit_code == 0 || res.exit_code == 1);
        json_decref(json_of("policy check --json", res.out));
        hx_run_result_done(&res);

        snprintf(key, sizeof key, "%s/cp.key", b->dir);
        CTL(b, -1, &res, 0, "keygen", "--out", key, "--json");
        j = json_of("keygen --json", res.out);
        assert_string_equal(str(j, "secret_key_file"), key);
        snprintf(path, sizeof path, "%s.pub", key);
        assert_string_equal(str(j, "public_key_file"), path);
        assert_int_equal(strlen(str(j, "key_id")), 16);
        assert_int_equal(strlen(str(j, "public_key")), 44);
        snprintf(key_id, sizeof key_id, "%s", str(j, "key_id"));
        json_decref(j);
        hx_run_result_done(&res);
        assert_int_equal(access(key, R_OK), 0);
        assert_int_equal(access(path, R_OK), 0);
        {
                /* keygen never replaces a key (every host may trust it), nor half of one */
                char *before = NULL, *after = NULL, other[PATH_MAX];
                size_t nb = 0, na = 0;
                assert_int_equal(hx_read_file(key, 4096, &before, &nb), 0);
                CTL(b, -1, &res, 2, "keygen", "--out", key);
                assert_non_null(strstr(res.err, "exists"));
                hx_run_result_done(&res);
                assert_int_equal(hx_read_file(key, 4096, &after, &na), 0);
                assert_int_equal(na, nb);
                assert_memory_equal(after, before, nb);
                free(before);
                free(after);
                snprintf(other, sizeof other, "%s/lone.key", b->dir);
                snprintf(src, sizeof src, "%s.pub", other);
                assert_int_equal(hx_write_file(src, "someone's public key\n", 0644), 0);
                CTL(b, -1, &res, 2, "keygen", "--out", other);
                hx_run_result_done(&res);
                assert_int_equal(access(other, F_OK), -1); /* no secret key without its public half */
        }

        snprintf(src, sizeof src, "%s/signed.json", b->dir);
        assert_int_equal(hx_write_file(src, "{\"version\": 1, \"agents\": []}\n", 0644), 0);
        CTL(b, -1, &res, 0, "policy", "sign", "--key", key, "--json", src);
        j = json_of("policy sign --json", res.out);
        assert_string_equal(str(j, "source"), src);
        snprintf(path, sizeof path, "%s.sig", src);
        assert_string_equal(str(j, "signature_file"), path);
        assert_string_equal(str(j, "key_id"), key_id); /* the key keygen made */
        json_decref(j);
        hx_run_result_done(&res);
        assert_int_equal(access(path, R_OK), 0);
        /* and without --json as before: the .sig path alone */
        CTL(b, -1, &res, 0, "policy", "sign", "--key", key, src);
        assert_true(strncmp(res.out, path, strlen(path)) == 0 && res.out[strlen(path)] == '\n');
        hx_run_result_done(&res);

        CTL(b, -1, &res, 0, "audit", "--json");
        assert_true(json_lines("audit --json", res.out) >= 3);
        hx_run_result_done(&res);

        /* audit verify: from the broker's file, a given file, with keys from a file */
        CTL(b, -1, &res, 0, "audit", "verify", "--json");
        j = json_of("audit verify --json", res.out);
        assert_true(json_is_true(json_object_get(j, "intact")));
        assert_true(json_integer_value(json_object_get(j, "records")) >= 3);
        assert_null(json_object_get(j, "broken"));
        json_decref(j);
        hx_run_result_done(&res);

        snprintf(audit, sizeof audit, "%s/audit.jsonl", b->state);
        snprintf(jwks, sizeof jwks, "%s/jwks.json", b->dir);
        CTL(b, -1, &res, 0, "keys", "list", "--json");
        assert_int_equal(hx_write_file(jwks, res.out, 0644), 0);
        hx_run_result_done(&res);
        CTL(b, -1, &res, 0, "audit", "verify", "--file", audit, "--keys", jwks, "--json");
        j = json_of("audit verify --file --json", res.out);
        assert_true(json_is_true(json_object_get(j, "intact")));
        assert_string_equal(json_string_value(json_array_get(json_object_get(j, "files"), 0)), audit);
        assert_true(json_integer_value(json_object_get(j, "last_seq")) >= 3);
        json_decref(j);
        hx_run_result_done(&res);

        /* a broken copy: intact false, where, exit 1 */
        {
                char *text = NULL, *p;
                size_t len = 0;
                assert_int_equal(hx_read_file(audit, 1 << 20, &text, &len), 0);
                p = strstr(text, "\"agent\":\"" AGENT_ID "\"");
                assert_non_null(p);
                p[9] = 'X'; /* cli-agent -> Xli-agent */
                snprintf(bad, sizeof bad, "%s/audit-edited.jsonl", b->dir);
                assert_int_equal(hx_write_file(bad, text, 0644), 0);
                free(text);
        }
        CTL(b, -1, &res, 1, "audit", "verify", "--file", bad, "--keys", jwks, "--json");
        j = json_of("audit verify (broken) --json", res.out);
        assert_true(json_is_false(json_object_get(j, "intact")));
        json_t *broken = json_object_get(j, "broken");
        assert_true(json_is_object(broken));
        assert_string_equal(str(broken, "file"), bad);
        assert_true(json_integer_value(json_object_get(broken, "line")) >= 2);
        assert_true(json_integer_value(json_object_get(broken, "seq")) >= 2);
        assert_non_null(strstr(str(broken, "error"), "prev does not match"));
        json_decref(j);
        hx_run_result_done(&res);
        /* the text form is unchanged: FILE:LINE: seq N: what */
        CTL(b, -1, &res, 1, "audit", "verify", "--file", bad, "--keys", jwks);
        assert_non_null(strstr(res.out, "audit-edited.jsonl:"));
        assert_non_null(strstr(res.out, ": seq "));
        hx_run_result_done(&res);

        assert_int_equal(hx_ctl(b, -1, &res, "review", "--json", NULL), 0);
        assert_true(res.exit_code == 0 || res.exit_code == 1);
        j = json_loads(res.out, 0, NULL); /* one entry per agent */
        assert_true(json_is_array(j) && json_array_size(j) == 2);
        json_decref(j);
        hx_run_result_done(&res);

        snprintf(pamdir, sizeof pamdir, "%s/pam.d", b->dir);
        assert_int_equal(mkdir(pamdir, 0755), 0);
        assert_int_equal(hx_write_file(strcat(strcpy(path, pamdir), "/tool"), "auth required pam_unix.so\n", 0644), 0);
        assert_int_equal(hx_ctl(b, -1, &res, "coverage", "--pam-dir", pamdir, "--json", NULL), 0);
        assert_true(res.exit_code == 0 || res.exit_code == 1);
        json_decref(json_of("coverage --json", res.out));
        hx_run_result_done(&res);

        /* call prints JSON anyway: --json is accepted before or after the method, not taken as parameters */
        CTL(b, -1, &res, 0, "call", "--json", "io.agentbroker.WhoAmI");
        j = json_of("call --json", res.out);
        assert_string_equal(str(j, "agent"), AGENT_ID);
        json_decref(j);
        hx_run_result_done(&res);
        CTL(b, -1, &res, 0, "call", "io.agentbroker.WhoAmI", "--json");
        json_decref(json_of("call METHOD --json", res.out));
        hx_run_result_done(&res);
        CTL(b, -1, &res, 0, "call", "--admin", "--json", "io.agentbroker.admin.ShowPolicy", "{\"agent\": \"" AGENT_ID "\"}");
        json_decref(json_of("call --admin --json METHOD PARAMS", res.out));
        hx_run_result_done(&res);
        CTL(b, -1, &res, 0, "call", "org.varlink.service.GetInfo", "{}", "--json");
        json_decref(json_of("call METHOD PARAMS --json", res.out));
        hx_run_result_done(&res);
        CTL(b, -1, &res, 2, "call", "--json");
        hx_run_result_done(&res);
        CTL(b, -1, &res, 2, "call", "io.agentbroker.WhoAmI", "{}", "{}");
        hx_run_result_done(&res);

        CTL(b, -1, &res, 0, "revoke", "--jti", jti, "--json");
        json_decref(json_of("revoke --json", res.out));
        hx_run_result_done(&res);

        CTL(b, -1, &res, 0, "keys", "rotate", "--json");
        j = json_of("keys rotate --json", res.out);
        assert_non_null(str(j, "kid"));
        json_decref(j);
        assert_non_null(strstr(res.err, "republish the JWKS"));
        hx_run_result_done(&res);
}

/*
 * The synopsis of each command in text (the --help output, or the man
 * page's .B lines with the font escapes taken out) mentions --json.
 */
static const char *const json_commands[] = {
        "token ",      "keys [",       "keys list",  "keys rotate", "status",     "whoami",       "policy check",
        "policy show", "policy reload", "policy sign", "keygen",     "authenticate", "introspect", "attenuate",
        "revoke",      "sessions",     "audit [",    "audit verify", "review",    "coverage",     "call",
};

/* entries: one per command, its synopsis and description lines joined. */
static void check_synopses(const char *what, char **entries, size_t n)
{
        for (size_t i = 0; i < sizeof json_commands / sizeof json_commands[0]; i++) {
                bool found = false;
                for (size_t k = 0; k < n; k++) {
                        if (strncmp(entries[k], json_commands[i], strlen(json_commands[i])) != 0)
                                continue;
                        found = true;
                        if (!strstr(entries[k], "--json"))
                                fprintf(stderr, "%s: \"%s\" does not list --json:\n%s\n", what, json_commands[i],
                                        entries[k]);
                        assert_non_null(strstr(entries[k], "--json"));
                }
                if (!found)
                        fprintf(stderr, "%s: no entry for \"%s\"\n", what, json_commands[i]);
                assert_true(found);
        }
}

/* Bad usage is one line on stderr (the reason) and exit 2, nothing on stdout. */
/*
 * exec: the command it runs may talk to the broker itself without ending
 * the token it was given. Before, exec asked for the token as its own
 * process and then became CMD: CMD's first call found that session opened
 * by another program (ReauthRequired), and the Authenticate a client then
 * sends ended the session of the handed-over token (helper-42). Now a
 * child asks, and CMD opens a session of its own.
 */
static void test_exec_token_survives_own_calls(void **state)
{
        hx_broker *b = *state;
        char ctl[PATH_MAX], agent[PATH_MAX], *line, *save = NULL, *token = NULL;
        hx_run_result res;
        json_t *root;
        hx_conn *c;
        int issued = 0;

        start(b);
        assert_int_equal(hx_build_path("agent-brokerctl", ctl, sizeof ctl), 0);
        assert_int_equal(hx_build_path("tests/helper-agent", agent, sizeof agent), 0);
        char *argv[] = { ctl, (char *)"--socket", b->sock, (char *)"exec", (char *)"--audience", (char *)AUD,
                         (char *)"--scope", (char *)"read", (char *)"--", agent, b->sock, NULL };
        assert_int_equal(hx_run(argv,
                                "env AGENT_BROKER_TOKEN\n"
                                "call io.agentbroker.IssueToken {\"audience\":\"" AUD "\",\"scopes\":[\"read\"]}\n"
                                "call io.agentbroker.Authenticate {}\n"
                                "quit\n",
                                -1, 10000, &res),
                     0);
        assert_int_equal(res.exit_code, 0);
        for (line = strtok_r(res.out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                if (strncmp(line, "ENV ", 4) == 0)
                        token = strdup(line + 4);
                if (strstr(line, "\"token\""))
                        issued++;
                if (strstr(line, "ReauthRequired"))
                        fprintf(stderr, "GAP: the command exec ran was asked to re-authenticate on its first call: %s\n",
                                line);
        }
        assert_non_null(token);
        assert_int_equal(issued, 1); /* CMD's own IssueToken, answered at once */
        c = hx_connect(b, b->sock);
        root = hx_rpc(c, "io.agentbroker.Introspect", json_pack("{s:s, s:s}", "token", token, "audience", AUD));
        hx_assert_ok(root);
        if (!json_is_true(json_object_get(hx_reply_params(root), "active")))
                fprintf(stderr, "GAP: the token exec handed over is inactive (%s) once CMD talked to the broker\n",
                        hx_reply_str(root, "reason"));
        assert_true(json_is_true(json_object_get(hx_reply_params(root), "active")));
        json_decref(root);
        hx_conn_close(b, c);
        free(token);
        hx_run_result_done(&res);

        /* started with SIGCHLD ignored (a supervisor's, kept across exec): the documented exit
         * codes still hold (waitpid failed with ECHILD and the status was garbage: helper-47),
         * and CMD still gets SIGCHLD ignored */
        char script[PATH_MAX * 2 + 256];
        snprintf(script, sizeof script,
                 "trap '' CHLD; \"$0\" --socket \"$1\" exec --audience " AUD " --scope admin -- true; echo \"denied $?\"; "
                 "\"$0\" --socket \"$1\" exec --audience " AUD " --scope read -- "
                 "grep -q '^SigIgn:.*[13579bdf]....$' /proc/self/status && echo ignored");
        /* bash: dash does not pass an ignored SIGCHLD on */
        char *sh[] = { (char *)"/bin/bash", (char *)"-c", script, ctl, b->sock, NULL };
        assert_int_equal(hx_run(sh, NULL, -1, 10000, &res), 0);
        if (!strstr(res.out, "denied 1\n") || !strstr(res.out, "ignored"))
                fprintf(stderr, "exec with SIGCHLD ignored: exit %d, stdout %s, stderr %s\n", res.exit_code, res.out,
                        res.err);
        assert_non_null(strstr(res.out, "denied 1\n"));
        assert_non_null(strstr(res.out, "ignored"));
        assert_int_equal(res.exit_code, 0);
        hx_run_result_done(&res);
}

/*
 * A server that answers IssueToken without a token: token --out and exec
 * report a protocol error (exit 4). Before, both crashed (strlen(NULL),
 * setenv(NULL): exit 139) (helper-42).
 */
static void test_reply_without_token(void **state)
{
        hx_broker *b = *state;
        char path[PATH_MAX], out[PATH_MAX], ctl[PATH_MAX];
        pid_t pid;

        snprintf(path, sizeof path, "%s/fake.sock", b->dir);
        snprintf(out, sizeof out, "%s/token.out", b->dir);
        pid = hx_fake_server(path, hx_serve_reply, "{\"parameters\":{\"expires_in\":60,\"jti\":\"x\"}}");
        assert_int_equal(hx_build_path("agent-brokerctl", ctl, sizeof ctl), 0);
        {
                char *argv[] = { ctl, (char *)"--socket", path, (char *)"token", (char *)"--audience", (char *)AUD,
                                 (char *)"--scope", (char *)"read", (char *)"--out", out, NULL };
                hx_run_result res;
                assert_int_equal(hx_run(argv, NULL, -1, 10000, &res), 0);
                if (res.exit_code != 4)
                        fprintf(stderr, "token --out: exit %d, stderr %s\n", res.exit_code, res.err);
                assert_int_equal(res.exit_code, 4);
                assert_int_equal(access(out, F_OK), -1);
                hx_run_result_done(&res);
        }
        {
                char *argv[] = { ctl, (char *)"--socket", path, (char *)"exec", (char *)"--audience", (char *)AUD,
                                 (char *)"--scope", (char *)"read", (char *)"--", (char *)"true", NULL };
                hx_run_result res;
                assert_int_equal(hx_run(argv, NULL, -1, 10000, &res), 0);
                if (res.exit_code != 4)
                        fprintf(stderr, "exec: exit %d, stderr %s\n", res.exit_code, res.err);
                assert_int_equal(res.exit_code, 4);
                hx_run_result_done(&res);
        }
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
}

static void test_usage_errors_are_one_line(void **state)
{
        hx_broker *b = *state;
        static const char *const cases[][4] = {
                { "--bogus", "status", NULL }, { "--socket", NULL, NULL }, { "-x", NULL, NULL },
                { NULL, NULL, NULL }, { "nosuchcommand", NULL, NULL }, { "--timeout", "0", "status" },
                /* each command's own options (getopt_long names the option) */
                { "token", "--audience", "x", "--bogus" }, { "token", "--audience", NULL },
                { "keys", "--bogus", NULL }, { "keys", "rotate", "--zzz" }, { "keys", "rotate", "--overlap", "abc" },
                { "introspect", "--bogus", NULL }, { "introspect", "--max-auth-age", NULL },
                { "sessions", "--bogus", NULL }, { "revoke", "--bogus", NULL }, { "revoke", "--jti", NULL },
                { "attenuate", "--bogus", NULL }, { "exec", "--bogus", NULL }, { "audit", "--bogus", NULL },
                { "audit", "verify", "--bogus" }, { "audit", "verify", "--file" }, { "review", "--bogus", NULL },
                { "coverage", "--bogus", NULL }, { "whoami", "--bogus", NULL }, { "authenticate", "--bogus", NULL },
                { "policy", "check", "--bogus" }, { "keygen", "--bogus", NULL }, { "call", "--bogus", NULL },
                /* values the broker would never see right: said so, not dropped or taken differently */
                { "--socket=", "status", NULL }, { "--admin-socket=", "sessions", NULL },
                { "token", "--audience", "a\xff", "--scope=x" }, { "token", "--audience=a", "--scope", "x\xff" },
                { "introspect", "--audience", "mcp://other\xff", "T" }, { "introspect", "--user", "\xff", "T" },
                { "attenuate", "--scope", "repo:read\xff", "T" }, { "attenuate", "--ttl", "0", "T" },
                { "revoke", "--jti", "\xff", NULL }, { "revoke", "--before", "2026-02-31T00:00:00Z", NULL },
                { "sessions", "foo", NULL }, { "whoami", "--json", "extra" }, { "authenticate", "--json", "extra" },
                { "status", "--json", "extra" }, { "policy", "show", "a", "b" },
                { "call", "io.agentbroker.WhoAmI", "{\"a\":1,\"a\":2}", NULL },
        };
        char ctl[PATH_MAX];

        assert_int_equal(hx_build_path("agent-brokerctl", ctl, sizeof ctl), 0);
        (void)b;
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
                char *argv[6] = { ctl };
                hx_run_result res;
                size_t n = 1, lines = 0;
                for (size_t k = 0; k < 4 && cases[i][k]; k++)
                        argv[n++] = (char *)cases[i][k];
                assert_int_equal(hx_run(argv, NULL, -1, 10000, &res), 0);
                for (const char *p = res.err; *p; p++)
                        lines += *p == '\n';
                if (res.exit_code != 2 || lines != 1 || res.out[0])
                        fprintf(stderr, "case %zu (%s %s %s): exit %d, stderr %zu lines:\n%s", i,
                                cases[i][0] ? cases[i][0] : "", cases[i][1] ? cases[i][1] : "",
                                cases[i][2] ? cases[i][2] : "", res.exit_code, lines, res.err);
                assert_int_equal(res.exit_code, 2);
                assert_int_equal(lines, 1);
                assert_string_equal(res.out, "");
                hx_run_result_done(&res);
        }

        /* audit verify takes 64 files: a 65th is refused, not dropped unchecked */
        {
                char *argv[80] = { ctl, (char *)"audit", (char *)"verify" };
                hx_run_result res;
                for (int i = 0; i < 65; i++)
                        argv[3 + i] = (char *)"/nonexistent/audit.log";
                assert_int_equal(hx_run(argv, NULL, -1, 10000, &res), 0);
                assert_int_equal(res.exit_code, 2);
                assert_non_null(strstr(res.err, "at most 64 files"));
                hx_run_result_done(&res);
        }

        /* what the broker refuses as invalid (InvalidParameter) is bad usage too, not "any other error" */
        start(b);
        {
                static const char *const refused[][5] = {
                        { "revoke", "--jti", "AAAA", NULL },
                        { "revoke", "--before", "2099-01-01T00:00:00Z", NULL },
                        { "keys", "rotate", "--overlap", "10", NULL },
                };
                for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
                        hx_run_result res;
                        assert_int_equal(hx_ctlv(b, -1, refused[i], 10000, &res), 0);
                        if (res.exit_code != 2 || !strstr(res.err, "InvalidParameter"))
                                fprintf(stderr, "%s %s %s: exit %d: %s", refused[i][0], refused[i][1], refused[i][2],
                                        res.exit_code, res.err);
                        assert_int_equal(res.exit_code, 2);
                        assert_non_null(strstr(res.err, "InvalidParameter"));
                        hx_run_result_done(&res);
                }
        }
}

static void test_help_and_man_list_json(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        char *entries[128], man[PATH_MAX], *text = NULL, *save = NULL;
        size_t n = 0, len = 0;

        /* --help: an entry starts with two spaces and a letter; continuation lines are indented further */
        assert_int_equal(hx_ctl(b, -1, &res, "--help", NULL), 0);
        assert_int_equal(res.exit_code, 0);
        char *commands = strstr(res.out, "Commands:\n"), *end = strstr(res.out, "\nOptions:");
        assert_true(commands && end);
        *end = '\0';
        for (char *l = strtok_r(commands, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
                if (l[0] == ' ' && l[1] == ' ' && l[2] >= 'a' && l[2] <= 'z') {
                        assert_true(n < 128);
                        entries[n++] = strdup(l + 2);
                } else if (n > 0 && l[0] == ' ') {
                        size_t a = strlen(entries[n - 1]);
                        entries[n - 1] = realloc(entries[n - 1], a + strlen(l) + 2);
                        entries[n - 1][a] = ' ';
                        strcpy(entries[n - 1] + a + 1, l);
                }
        }
        check_synopses("--help", entries, n);
        /* exec runs a command and prints no data of its own */
        for (size_t k = 0; k < n; k++) {
                if (strncmp(entries[k], "exec ", 5) == 0)
                        assert_null(strstr(entries[k], "--json"));
                free(entries[k]);
        }
        hx_run_result_done(&res);

        /* the man page: ".B COMMAND ..." lines under .SH COMMANDS */
        src_path("docs/man/agent-brokerctl.1", man, sizeof man);
        assert_int_equal(hx_read_file(man, 1 << 20, &text, &len), 0);
        n = 0;
        save = NULL;
        for (char *l = strtok_r(strstr(text, ".SH COMMANDS"), "\n", &save); l && strncmp(l, ".SH ENV", 7) != 0;
             l = strtok_r(NULL, "\n", &save)) {
                char plain[1024];
                size_t o = 0;
                if (strncmp(l, ".B ", 3) != 0)
                        continue;
                for (const char *p = l + 3; *p && o < sizeof plain - 1; p++) {
                        if (p[0] == '\\' && p[1] == 'f' && p[2]) {
                                p += 2; /* \fR \fP \fI \fB */
                        } else if (p[0] == '\\' && p[1] == '-') {
                                plain[o++] = '-';
                                p++;
                        } else {
                                plain[o++] = *p;
                        }
                }
                plain[o] = '\0';
                assert_true(n < 128);
                entries[n++] = strdup(plain);
        }
        check_synopses("agent-brokerctl.1", entries, n);
        for (size_t k = 0; k < n; k++)
                free(entries[k]);
        free(text);
}

/* ---- keys --jwks --out ------------------------------------------------------------- */

static void test_keys_jwks_out(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        char dir[PATH_MAX + 16], out[PATH_MAX + 32], rootdir[PATH_MAX + 16], *text = NULL, *printed;
        struct stat st, st2;
        size_t len = 0;
        mode_t old;
        json_t *j;

        start(b);
        CTL(b, -1, &res, 0, "keys");
        printed = strdup(res.out);
        hx_run_result_done(&res);

        /* any user may publish: nobody, into its own directory, under a umask that would hide the file */
        snprintf(dir, sizeof dir, "%s/pub", b->dir);
        assert_int_equal(mkdir(dir, 0755), 0);
        assert_int_equal(chown(dir, HX_NOBODY_UID, HX_NOBODY_GID), 0);
        snprintf(out, sizeof out, "%s/jwks.json", dir);
        old = umask(077);
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "keys", "--jwks", "--out", out, NULL), 0);
        umask(old);
        if (res.exit_code != 0)
                fprintf(stderr, "keys --jwks --out: %s", res.err);
        assert_int_equal(res.exit_code, 0);
        assert_string_equal(res.out, "");
        assert_string_equal(res.err, "");
        hx_run_result_done(&res);
        assert_int_equal(stat(out, &st), 0);
        assert_int_equal(st.st_mode & 07777, 0644);
        assert_int_equal(st.st_uid, HX_NOBODY_UID);
        assert_int_equal(hx_read_file(out, 1 << 20, &text, &len), 0);
        assert_string_equal(text, printed); /* what `keys` prints */
        j = json_of("published JWKS", text);
        assert_int_equal(json_array_size(json_object_get(j, "keys")), 1);
        json_decref(j);
        free(text);

        /* replaced by rename (a new inode), nothing left beside it */
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "keys", "--out", out, NULL), 0);
        assert_int_equal(res.exit_code, 0);
        hx_run_result_done(&res);
        assert_int_equal(stat(out, &st2), 0);
        assert_true(st2.st_ino != st.st_ino);
        {
                DIR *d = opendir(dir);
                struct dirent *e;
                int files = 0;
                assert_non_null(d);
                while ((e = readdir(d)))
                        if (e->d_name[0] != '.') {
                                assert_string_equal(e->d_name, "jwks.json");
                                files++;
                        }
                closedir(d);
                assert_int_equal(files, 1);
        }

        /* after a rotation (which says to republish) the published set holds both keys */
        CTL(b, -1, &res, 0, "keys", "rotate");
        assert_non_null(strstr(res.err, "republish the JWKS for remote verifiers now"));
        assert_non_null(strstr(res.err, "agent-broker-jwks.service"));
        hx_run_result_done(&res);
        CTL(b, HX_NOBODY_UID, &res, 0, "keys", "--jwks", "--out", out);
        hx_run_result_done(&res);
        assert_int_equal(hx_read_file(out, 1 << 20, &text, &len), 0);
        j = json_of("republished JWKS", text);
        assert_int_equal(json_array_size(json_object_get(j, "keys")), 2);
        json_decref(j);
        free(text);

        /* a directory nobody may not write: exit 4, the old file untouched */
        snprintf(rootdir, sizeof rootdir, "%s/rootonly", b->dir);
        assert_int_equal(mkdir(rootdir, 0755), 0);
        snprintf(out, sizeof out, "%s/jwks.json", rootdir);
        CTL(b, HX_NOBODY_UID, &res, 4, "keys", "--jwks", "--out", out);
        assert_non_null(strstr(res.err, "cannot write"));
        hx_run_result_done(&res);
        assert_int_equal(access(out, F_OK), -1);

        /* usage: --overlap belongs to rotate, --out to keys alone */
        CTL(b, -1, &res, 2, "keys", "--overlap", "60");
        hx_run_result_done(&res);
        CTL(b, -1, &res, 2, "keys", "list", "--out", out);
        hx_run_result_done(&res);
        CTL(b, -1, &res, 2, "keys", "rotate", "--out", out);
        hx_run_result_done(&res);
        /* an overlap shorter than the policy's longest token life: refused unless forced */
        hx_ctl(b, -1, &res, "keys", "rotate", "--overlap", "1", NULL);
        assert_int_not_equal(res.exit_code, 0);
        assert_non_null(strstr(res.err, "--force"));
        hx_run_result_done(&res);
        CTL(b, -1, &res, 0, "keys", "rotate", "--overlap", "1", "--force", "--json");
        j = json_of("keys rotate --force", res.out);
        assert_non_null(json_object_get(j, "previous_valid_until"));
        json_decref(j);
        hx_run_result_done(&res);
        CTL(b, -1, &res, 2, "keys", "--jwks", "extra");
        hx_run_result_done(&res);
        free(printed);
}

/* ---- token --out --refresh across idle timeouts ----------------------------------------- */

/* Start `agent-brokerctl ARGS` in the background with stderr to err_path; its pid. */
static pid_t spawn_ctl(hx_broker *b, const char *err_path, char *const args[])
{
        char ctl[PATH_MAX];
        char *argv[32];
        size_t n = 0;
        pid_t pid;

        assert_int_equal(hx_build_path("agent-brokerctl", ctl, sizeof ctl), 0);
        argv[n++] = ctl;
        argv[n++] = (char *)"--socket";
        argv[n++] = b->sock;
        for (size_t i = 0; args[i] && n < 31; i++)
                argv[n++] = args[i];
        argv[n] = NULL;
        fflush(NULL);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                int fd = open(err_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
                int null = open("/dev/null", O_RDWR | O_CLOEXEC);
                if (fd < 0 || null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(fd, 2) < 0)
                        _exit(126);
                execv(argv[0], argv);
                _exit(127);
        }
        return pid;
}

static int wait_exit(pid_t pid, int timeout_ms)
{
        long long deadline = hx_now_ms() + timeout_ms;
        int st;

        while (hx_now_ms() < deadline) {
                pid_t r = waitpid(pid, &st, WNOHANG);
                if (r == pid)
                        return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
                usleep(20000);
        }
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
        return -1;
}

/*
 * The broker closes connections idle for --idle-timeout (1 s here); token
 * --refresh renews every 2 s (ttl 3), so each renewal meets a closed
 * connection: it must reconnect at once, quietly. When the broker is gone
 * for good, the failed retry is logged.
 */
static void test_token_refresh_reconnects_quietly(void **state)
{
        hx_broker *b = *state;
        char file[PATH_MAX + 16], errp[PATH_MAX + 16], last[4096] = "", *text = NULL, *err = NULL;
        long long changes[16], t0;
        size_t n = 0, len = 0;
        hx_conn *idle = NULL;
        pid_t pid;
        int code, st = -1;

        b->extra_args[b->n_extra_args++] = "--idle-timeout";
        b->extra_args[b->n_extra_args++] = "1";
        start(b);

        /* the premise: an idle connection is closed by the broker after about a second */
        assert_int_equal(hx_conn_open(b, b->sock, &idle), 0);
        assert_int_equal(hx_conn_wait_closed(idle, 4000), 0);
        hx_conn_close(b, idle);

        snprintf(file, sizeof file, "%s/token", b->dir);
        snprintf(errp, sizeof errp, "%s/refresh.err", b->dir);
        char *args[] = { (char *)"token", (char *)"--audience", (char *)AUD, (char *)"--scope", (char *)"read",
                         (char *)"--ttl", (char *)"3", (char *)"--out", file, (char *)"--refresh", NULL };
        pid = spawn_ctl(b, errp, args);

        /* watch the file: the first token, then one every ~2 s */
        t0 = hx_now_ms();
        while (hx_now_ms() - t0 < 7000 && n < 16) {
                if (hx_read_file(file, 8192, &text, &len) == 0) {
                        if (len > 0 && text[len - 1] == '\n' && strcmp(text, last) != 0) {
                                snprintf(last, sizeof last, "%s", text);
                                changes[n++] = hx_now_ms();
                        }
                        free(text);
                        text = NULL;
                }
                usleep(25000);
        }
        assert_int_equal(hx_read_file(errp, 1 << 16, &err, &len), 0);
        if (len > 0 || n < 3)
                fprintf(stderr, "token --refresh: %zu tokens in 7 s; stderr: %s\n", n, err);
        assert_string_equal(err, ""); /* no "connection closed", no retry message */
        free(err);
        err = NULL;
        assert_true(n >= 3);
        for (size_t i = 1; i < n; i++) {
                /* renewed at 2/3 of 3 s, not after a 1 s backoff on top */
                if (changes[i] - changes[i - 1] > 2700)
                        fprintf(stderr, "renewal %zu came %lld ms after the one before\n", i,
                                changes[i] - changes[i - 1]);
                assert_true(changes[i] - changes[i - 1] <= 2700);
        }

        /* now the broker goes away: the retry fails too, and that is logged */
        assert_int_equal(hx_broker_stop(b, &st), 0);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        t0 = hx_now_ms();
        do {
                usleep(100000);
                free(err);
                err = NULL;
                assert_int_equal(hx_read_file(errp, 1 << 16, &err, &len), 0);
        } while (len == 0 && hx_now_ms() - t0 < 5000);
        assert_non_null(strstr(err, "cannot reach the broker"));
        assert_null(strstr(err, "connection closed"));
        free(err);

        /* SIGTERM: a clean stop, exit 0, the file keeps its last token */
        assert_int_equal(kill(pid, SIGTERM), 0);
        code = wait_exit(pid, 5000);
        assert_int_equal(code, 0);
        assert_int_equal(hx_read_file(file, 8192, &text, &len), 0);
        assert_string_equal(text, last);
        free(text);
}

/* ---- policy check DIR, policy reload refused ------------------------------------------------ */

/* Two sources that do not compile, with what policy check says of them. */
#define BAD_ID_SRC "{\"version\": 1, \"agents\": [{\"id\": \"bad agent!\", \"match\": {\"uid\": 5}, \"grants\": []}]}\n"
#define BAD_ID_PATH "$.agents[0]"
#define BAD_ID_MSG "\"id\" may hold only letters, digits and - _ . @ (at most 64)"
#define BAD_KEY_SRC "{\"version\": 1, \"agents\": [], \"extra\": 1}\n"
#define BAD_KEY_MSG "unknown key \"extra\""
/* and one with two errors (the broker reports the first source that fails, with all its findings) */
#define BAD_TWO_SRC                                                                                             \
        "{\"version\": 1, \"agents\": [{\"id\": \"bad agent!\", \"owner\": \"a@example.com\", \"match\": {\"uid\": 5}, " \
        "\"grants\": []}, {\"id\": \"ok\", \"owner\": \"a@example.com\", \"match\": {\"uid\": 6}, \"grants\": "           \
        "[{\"audience\": \"mcp://x\", \"scopes\": [\"r\"], \"max_ttl\": 99999999}]}]}\n"
#define BAD_TTL_PATH "$.agents[1].grants[0]"
#define BAD_TTL_MSG "\"max_ttl\" must be between 1 and 86400 seconds"

static void write_in(const char *dir, const char *name, const char *text)
{
        char path[PATH_MAX + 64];

        assert_true((size_t)snprintf(path, sizeof path, "%s/%s", dir, name) < sizeof path);
        assert_int_equal(hx_write_file(path, text, 0644), 0);
}

/* text holds the line "DIR/NAME: PATH: SEVERITY: MESSAGE" (a whole line). */
static void assert_finding_line(const char *text, const char *dir, const char *name, const char *path,
                                const char *sev, const char *msg)
{
        char line[PATH_MAX + 512];
        const char *p;

        snprintf(line, sizeof line, "%s/%s: %s: %s: %s\n", dir, name, path, sev, msg);
        p = strstr(text, line);
        if (!p || (p != text && p[-1] != '\n'))
                fprintf(stderr, "no line \"%.*s\" in:\n%s\n", (int)strlen(line) - 1, line, text);
        assert_true(p && (p == text || p[-1] == '\n'));
}

/* findings (an array) holds {file: DIR/NAME, path, severity, message}. */
static void assert_finding_json(json_t *findings, const char *dir, const char *name, const char *path,
                                const char *sev, const char *msg)
{
        char file[PATH_MAX + 64];
        json_t *want, *f;
        size_t i;
        bool found = false;

        snprintf(file, sizeof file, "%s/%s", dir, name);
        want = json_pack("{s:s, s:s, s:s, s:s}", "file", file, "path", path, "severity", sev, "message", msg);
        assert_non_null(want);
        assert_true(json_is_array(findings));
        json_array_foreach(findings, i, f) found = found || json_equal(f, want);
        if (!found) {
                char *a = json_dumps(findings, JSON_INDENT(2)), *w = json_dumps(want, 0);
                fprintf(stderr, "no finding %s in %s\n", w, a);
                free(a);
                free(w);
        }
        assert_true(found);
        json_decref(want);
}

/* Whether text holds a byte or character a terminal acts on: C0 but newline, DEL, C1 in UTF-8. */
static bool has_control(const char *text)
{
        for (const unsigned char *p = (const unsigned char *)text; *p; p++)
                if ((*p < 0x20 && *p != '\n') || *p == 0x7f || (p[0] == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f))
                        return true;
        return false;
}

/*
 * A policy under review quotes its own text in policy check's findings (an
 * unknown key, a scope group): an escape sequence in it reached the
 * reviewer's terminal raw (OSC 52 writes the clipboard, CSI rewrites the
 * screen: helper-54). And a file name with a C1 control is refused like
 * one with a C0 control.
 */
static void test_policy_check_defangs_findings(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        char dir[PATH_MAX + 64];

        snprintf(dir, sizeof dir, "%s/evil.d", b->dir);
        assert_int_equal(mkdir(dir, 0755), 0);
        write_in(dir, "10-keys.json",
                 "{\"version\": 1, \"agents\": [], \"\\u001b]52;c;QUJD\\u0007\": 1, \"\\u009b2J\": 2,"
                 " \"\\u202eevil\": 3}\n");
        write_in(dir, "20-name\xc2\x9b" "2J.json", "{\"version\": 1, \"agents\": []}\n");
        CTL(b, -1, &res, 2, "policy", "check", dir);
        if (has_control(res.out) || has_control(res.err))
                fail_msg("a control character reached the terminal:\n%s\n%s", res.out, res.err);
        assert_null(strstr(res.out, "\xe2\x80\xae")); /* nor a right-to-left override */
        assert_non_null(strstr(res.out, "not printable UTF-8")); /* the file name */
        assert_non_null(strstr(res.out, "unknown key"));
        hx_run_result_done(&res);
}

/*
 * policy check DIR counts the sources it compiles (each *.json of the
 * directory, not hidden ones), as policy check DIR/\*.json does: it said
 * "1 file" for any directory.
 */
static void test_policy_check_counts_directory_sources(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        char dir[PATH_MAX + 64], empty[PATH_MAX + 64], one[PATH_MAX + 64], f[4][PATH_MAX + 64], policy[1024];
        static const char *const names[4] = { "10-agents.json", "20-empty.json", "30-bad-id.json", "40-bad-key.json" };
        json_t *j;

        policy_text(policy, sizeof policy);
        snprintf(dir, sizeof dir, "%s/policy.d", b->dir);
        assert_int_equal(mkdir(dir, 0755), 0);
        write_in(dir, names[0], policy);
        write_in(dir, names[1], "{\"version\": 1, \"agents\": []}\n");
        write_in(dir, names[2], BAD_ID_SRC);
        write_in(dir, names[3], BAD_KEY_SRC);
        /* not sources: another extension, a hidden file (which would not compile) */
        write_in(dir, "README", "not a source\n");
        write_in(dir, ".hidden.json", "{}\n");
        for (int i = 0; i < 4; i++)
                snprintf(f[i], sizeof f[i], "%s/%s", dir, names[i]);

        CTL(b, -1, &res, 2, "policy", "check", dir);
        assert_non_null(strstr(res.out, "\n4 files: 2 errors, "));
        assert_finding_line(res.out, dir, names[2], BAD_ID_PATH, "error", BAD_ID_MSG);
        assert_finding_line(res.out, dir, names[3], "$", "error", BAD_KEY_MSG);
        assert_null(strstr(res.out, ".hidden.json"));
        hx_run_result_done(&res);
        /* the same as naming each source */
        CTL(b, -1, &res, 2, "policy", "check", f[0], f[1], f[2], f[3]);
        assert_non_null(strstr(res.out, "\n4 files: 2 errors, "));
        hx_run_result_done(&res);

        CTL(b, -1, &res, 2, "policy", "check", "--json", dir);
        j = json_of("policy check --json DIR", res.out);
        assert_int_equal(json_integer_value(json_object_get(j, "files")), 4);
        assert_int_equal(json_integer_value(json_object_get(j, "errors")), 2);
        assert_finding_json(json_object_get(j, "findings"), dir, names[2], BAD_ID_PATH, "error", BAD_ID_MSG);
        json_decref(j);
        hx_run_result_done(&res);
        CTL(b, -1, &res, 2, "policy", "check", "--json", f[0], f[1], f[2], f[3]);
        j = json_of("policy check --json DIR/*.json", res.out);
        assert_int_equal(json_integer_value(json_object_get(j, "files")), 4);
        json_decref(j);
        hx_run_result_done(&res);

        /* a directory and a file: 5; an empty directory: none; one source: 1 */
        CTL(b, -1, &res, 2, "policy", "check", "--json", dir, f[1]);
        j = json_of("policy check --json DIR FILE", res.out);
        assert_int_equal(json_integer_value(json_object_get(j, "files")), 5);
        json_decref(j);
        hx_run_result_done(&res);
        snprintf(empty, sizeof empty, "%s/empty.d", b->dir);
        assert_int_equal(mkdir(empty, 0755), 0);
        CTL(b, -1, &res, 0, "policy", "check", empty);
        assert_string_equal(res.out, "0 files: 0 errors, 0 warnings\n");
        hx_run_result_done(&res);
        snprintf(one, sizeof one, "%s/one.d", b->dir);
        assert_int_equal(mkdir(one, 0755), 0);
        write_in(one, "only.json", "{\"version\": 1, \"agents\": []}\n");
        CTL(b, -1, &res, 0, "policy", "check", one);
        assert_string_equal(res.out, "1 file: 0 errors, 0 warnings\n");
        hx_run_result_done(&res);

        /* what the broker refuses in a directory, as it does: a source others may write (an
         * error; before, "0 errors" while the broker served nobody: helper-44), one owned by
         * another user (a warning: the check may run as that user), the directory itself */
        char only[PATH_MAX + 80];
        snprintf(only, sizeof only, "%s/only.json", one);
        assert_int_equal(chmod(only, 0666), 0);
        CTL(b, -1, &res, 2, "policy", "check", one);
        char want[PATH_MAX + 160];
        snprintf(want, sizeof want, "%s: $: error: writable by users other than root", only);
        assert_non_null(strstr(res.out, want));
        hx_run_result_done(&res);
        assert_int_equal(chmod(only, 0644), 0);
        assert_int_equal(chown(only, HX_NOBODY_UID, 0), 0);
        CTL(b, -1, &res, 1, "policy", "check", one);
        snprintf(want, sizeof want, "%s: $: warning: owned by uid %d, not root", only, HX_NOBODY_UID);
        assert_non_null(strstr(res.out, want));
        hx_run_result_done(&res);
        assert_int_equal(chown(only, 0, 0), 0);
        assert_int_equal(chmod(one, 0777), 0);
        CTL(b, -1, &res, 2, "policy", "check", one);
        assert_non_null(strstr(res.out, "writable by users other than root"));
        hx_run_result_done(&res);
}

/*
 * policy reload that the broker refuses (PolicyRejected): each finding on
 * stderr as policy check prints it, and with --json an object with the
 * findings on stdout; exit 1 as before, and the policy in force is kept.
 * It said only "...: invalid policy (2 errors)" and printed nothing with
 * --json.
 */
static void test_policy_reload_shows_findings(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        char dir[PATH_MAX + 64], policy[1024];
        json_t *j, *check, *f;
        size_t i;

        /* the broker on a directory of sources, as installed */
        policy_text(policy, sizeof policy);
        snprintf(dir, sizeof dir, "%s/policy.d", b->dir);
        assert_int_equal(mkdir(dir, 0755), 0);
        write_in(dir, "10-agents.json", policy);
        assert_true((size_t)snprintf(b->policy, sizeof b->policy, "%s", dir) < sizeof b->policy);
        hx_start(b);
        CTL(b, -1, &res, 0, "policy", "reload");
        hx_run_result_done(&res);

        write_in(dir, "30-bad.json", BAD_TWO_SRC);

        CTL(b, -1, &res, 1, "policy", "reload");
        assert_string_equal(res.out, "");
        assert_non_null(strstr(res.err, "io.agentbroker.admin.PolicyRejected: "));
        assert_finding_line(res.err, dir, "30-bad.json", BAD_ID_PATH, "error", BAD_ID_MSG);
        assert_finding_line(res.err, dir, "30-bad.json", BAD_TTL_PATH, "error", BAD_TTL_MSG);
        hx_run_result_done(&res);

        CTL(b, -1, &res, 1, "policy", "reload", "--json");
        j = json_of("policy reload --json (rejected)", res.out);
        assert_string_equal(str(j, "error"), "io.agentbroker.admin.PolicyRejected");
        assert_non_null(strstr(str(j, "reason"), "invalid policy"));
        assert_int_equal(json_integer_value(json_object_get(j, "errors")), 2);
        assert_true(json_is_integer(json_object_get(j, "warnings")));
        assert_finding_json(json_object_get(j, "findings"), dir, "30-bad.json", BAD_ID_PATH, "error", BAD_ID_MSG);
        assert_finding_json(json_object_get(j, "findings"), dir, "30-bad.json", BAD_TTL_PATH, "error", BAD_TTL_MSG);
        /* the lines are on stderr with --json too */
        assert_finding_line(res.err, dir, "30-bad.json", BAD_TTL_PATH, "error", BAD_TTL_MSG);
        hx_run_result_done(&res);

        /* the shape of policy check --json: each finding the broker gave, policy check gives */
        CTL(b, -1, &res, 2, "policy", "check", "--json", dir);
        check = json_of("policy check --json", res.out);
        assert_int_equal(json_integer_value(json_object_get(check, "errors")), 2);
        json_array_foreach(json_object_get(j, "findings"), i, f) {
                assert_finding_json(json_object_get(check, "findings"), dir, strrchr(str(f, "file"), '/') + 1,
                                    str(f, "path"), str(f, "severity"), str(f, "message"));
                assert_int_equal(json_object_size(f), 4);
        }
        json_decref(check);
        json_decref(j);
        hx_run_result_done(&res);

        /* the policy in force is kept */
        CTL(b, -1, &res, 0, "whoami", "--json");
        j = json_of("whoami --json", res.out);
        assert_string_equal(str(j, "agent"), AGENT_ID);
        json_decref(j);
        hx_run_result_done(&res);
}

/* ---- the admin socket refuses this user ------------------------------------------------- */

static void test_admin_socket_permission_denied(void **state)
{
        hx_broker *b = *state;
        hx_run_result res;
        char want[PATH_MAX + 128], nowhere[PATH_MAX + 32];
        struct stat st;

        if (geteuid() != 0) {
                printf("SKIPPED: needs root to run the CLI as uid %d\n", HX_NOBODY_UID);
                skip();
        }
        start(b);
        assert_int_equal(stat(b->admin_sock, &st), 0);
        assert_int_equal(st.st_mode & 0777, 0600);

        snprintf(want, sizeof want, "agent-brokerctl: permission denied on the admin socket %s (needs root or the admin group)\n",
                 b->admin_sock);
        static const char *const cmds[][3] = {
                { "policy", "show", NULL }, { "keys", "list", NULL }, { "keys", "rotate", NULL }, { "audit", NULL, NULL },
        };
        for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
                assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, cmds[i][0], cmds[i][1], cmds[i][2], NULL), 0);
                assert_int_equal(res.exit_code, 3); /* as documented: 3, the socket refuses this user */
                assert_string_equal(res.err, want);
                hx_run_result_done(&res);
        }
        /* the agent socket still serves nobody */
        CTL(b, HX_NOBODY_UID, &res, 0, "whoami");
        hx_run_result_done(&res);
        /* no socket at all is still "cannot reach" */
        snprintf(nowhere, sizeof nowhere, "%s/none.sock", b->dir);
        assert_int_equal(hx_ctl(b, HX_NOBODY_UID, &res, "--admin-socket", nowhere, "keys", "list", NULL), 0);
        assert_int_equal(res.exit_code, 3);
        assert_non_null(strstr(res.err, "cannot reach the broker at"));
        assert_null(strstr(res.err, "permission denied"));
        hx_run_result_done(&res);
        /* and --help documents exit 3 for it */
        CTL(b, -1, &res, 0, "--help");
        assert_non_null(strstr(res.out, "3 broker unreachable, or its socket refuses this user (permission denied)"));
        hx_run_result_done(&res);
}

/* ---- bash completion ----------------------------------------------------------------------- */

/* The words completion offers after "agent-brokerctl ARGS" with the cursor on cur (space-joined). */
static void complete(const char *script, const char *line, char *out, size_t max)
{
        char prog[8192];
        hx_run_result res;

        snprintf(prog, sizeof prog,
                 "set -u; source \"$1\"; read -r -a COMP_WORDS <<<\"agent-brokerctl $2\"; "
                 "[[ $2 == *' ' || -z $2 ]] && COMP_WORDS+=(''); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); "
                 "COMP_LINE=\"agent-brokerctl $2\"; COMP_POINT=${#COMP_LINE}; _agent_brokerctl; "
                 "printf ' %%s' \"${COMPREPLY[@]}\"; echo ' '");
        char *argv[] = { (char *)"/bin/bash", (char *)"--norc", (char *)"--noprofile", (char *)"-c", prog,
                         (char *)"bash", (char *)script, (char *)line, NULL };
        assert_int_equal(hx_run(argv, NULL, -1, HX_RUN_TIMEOUT_MS, &res), 0);
        if (res.exit_code != 0)
                fprintf(stderr, "completion of \"%s\": exit %d: %s\n", line, res.exit_code, res.err);
        assert_int_equal(res.exit_code, 0);
        snprintf(out, max, "%s", res.out);
        hx_run_result_done(&res);
}

/* line completes to words that include every word of has and none of lacks (space-separated). */
static void expect(const char *script, const char *line, const char *has, const char *lacks)
{
        char got[16384], w[256];
        const char *p;
        int n;

        complete(script, line, got, sizeof got);
        for (p = has; p && sscanf(p, "%255s%n", w, &n) == 1; p += n) {
                char needle[260];
                snprintf(needle, sizeof needle, " %s ", w);
                if (!strstr(got, needle))
                        fprintf(stderr, "completion of \"%s\": no \"%s\" in [%s]\n", line, w, got);
                assert_non_null(strstr(got, needle));
        }
        for (p = lacks; p && sscanf(p, "%255s%n", w, &n) == 1; p += n) {
                char needle[260];
                snprintf(needle, sizeof needle, " %s ", w);
                if (strstr(got, needle))
                        fprintf(stderr, "completion of \"%s\": \"%s\" offered in [%s]\n", line, w, got);
                assert_null(strstr(got, needle));
        }
}

/* line completes to nothing at all. */
static void expect_none(const char *script, const char *line)
{
        char got[16384];
        complete(script, line, got, sizeof got);
        if (strcmp(got, " \n") != 0 && strcmp(got, "  \n") != 0)
                fprintf(stderr, "completion of \"%s\": expected nothing, got [%s]\n", line, got);
        assert_true(strcmp(got, " \n") == 0 || strcmp(got, "  \n") == 0);
}

static void test_bash_completion(void **state)
{
        char script[PATH_MAX];
        (void)state;

        if (access("/bin/bash", X_OK) != 0) {
                printf("SKIPPED: no /bin/bash\n");
                skip();
        }
        src_path("client/agent-brokerctl.bash", script, sizeof script);

        expect(script, "", "token exec keys audit call --socket", NULL);
        /* where a value is expected, no flags */
        expect_none(script, "revoke --token ");
        expect_none(script, "revoke --jti ");
        expect_none(script, "token --audience ");
        expect_none(script, "token --ttl ");
        expect_none(script, "keys rotate --overlap ");
        expect_none(script, "--timeout ");
        expect_none(script, "attenuate --task ");
        /* a value is skipped when finding the command and subcommand */
        expect(script, "--socket /tmp/x ", "token keys", "--overlap");
        expect(script, "keys --out /tmp/x ", "--jwks --json", "list rotate --overlap");
        /* keys: --jwks/--out only on keys itself, --overlap only under rotate */
        expect(script, "keys ", "list rotate --jwks --json --out", "--overlap");
        expect(script, "keys rotate ", "--overlap --json", "--jwks --out list");
        expect(script, "keys list ", "--json", "--jwks --out --overlap rotate");
        expect(script, "token ", "--audience --scope --ttl --json --out --refresh", "--overlap --jwks");
        expect(script, "revoke ", "--jti --session --token --agent --before --json", "--overlap --jwks");
        /* --json where the command has it */
        expect(script, "audit verify ", "--file --keys --json", "verify");
        expect(script, "audit ", "verify --since --json", NULL);
        expect(script, "keygen ", "--out --json", NULL);
        expect(script, "policy sign ", "--key --json", NULL);
        expect(script, "policy ", "check show reload sign", "--json");
        expect(script, "call ", "--admin --json io.agentbroker.WhoAmI", NULL);
        expect(script, "call io.agentbroker.WhoAmI ", "--json", "io.agentbroker.GetKeys");
        /* exec ... -- CMD: command names, not exec's options */
        expect(script, "exec --audience a --scope s -- tru", "true", "--audience");
        expect(script, "exec -- ", "true", "--audience --scope --env");
        expect(script, "exec ", "--audience --scope --env --", NULL);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_json_on_every_command, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_help_and_man_list_json, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_usage_errors_are_one_line, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_exec_token_survives_own_calls, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_reply_without_token, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_keys_jwks_out, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_token_refresh_reconnects_quietly, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_admin_socket_permission_denied, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_bash_completion, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_policy_check_counts_directory_sources, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_policy_check_defangs_findings, hx_setup, hx_teardown),
                cmocka_unit_test_setup_teardown(test_policy_reload_shows_findings, hx_setup, hx_teardown),
        };
        if (getenv("HX_FILTER"))
                cmocka_set_test_filter(getenv("HX_FILTER"));
        return cmocka_run_group_tests_name("integration: agent-brokerctl (--json, JWKS, refresh, completion, policy)", tests,
                                           NULL, NULL);
}
