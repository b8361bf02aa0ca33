/* SPDX-License-Identifier: MIT */
/*
 * agent-brokerctl audit: read the audit trail (from the running broker over
 * the admin socket, or from a file) and verify its hash chain and signed
 * checkpoints.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sodium.h>
#include "ctl.h"
#include "../broker/audit.h"
#include "../common/b64.h"
#include "../common/util.h"

typedef struct filter {
        long long since;     /* seconds, 0: any */
        const char *agent, *event;
} filter;

static bool matches(json_t *rec, const filter *f)
{
        const char *a = json_string_value(json_object_get(rec, "agent"));
        const char *e = json_string_value(json_object_get(rec, "event"));
        if (f->since && json_integer_value(json_object_get(rec, "time")) < f->since * 1000000LL)
                return false;
        if (f->agent && (!a || strcmp(a, f->agent) != 0))
                return false;
        if (f->event && (!e || strcmp(e, f->event) != 0))
                return false;
        return true;
}

static void pad(int printed, int width)
{
        printf("%*s", printed < width ? width - printed : 0, "");
}

static void print_record(json_t *rec, bool as_json)
{
        static const char *const keys[] = { "agent", "uid", "pid", "audience", "scopes", "jti", "sid", "parent",
                                            "service", "user", "pam_id", "source" };
        long long us = json_integer_value(json_object_get(rec, "time"));
        time_t t = (time_t)(us / 1000000);
        struct tm tm;
        char when[40] = "?";
        const char *event, *decision;
        json_t *v;

        if (as_json) {
                char *s = json_dumps(rec, JSON_COMPACT);
                if (s)
                        printf("%s\n", s);
                free(s);
                return;
        }
        if (gmtime_r(&t, &tm))
                strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
        printf("%s.%06lldZ %6lld ", when, us % 1000000, (long long)json_integer_value(json_object_get(rec, "seq")));
        /* every string as print_safe shows it: a record's text cannot pose as another line */
        event = json_string_value(json_object_get(rec, "event"));
        decision = json_string_value(json_object_get(rec, "decision"));
        pad(print_safe(event ? event : "?"), 24);
        putchar(' ');
        pad(print_safe(decision ? decision : ""), 8);
        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
                v = json_object_get(rec, keys[i]);
                if (json_is_string(v)) {
                        printf(" %s=", keys[i]);
                        print_safe(json_string_value(v));
                } else if (json_is_integer(v)) {
                        printf(" %s=%lld", keys[i], (long long)json_integer_value(v));
                }
        }
        v = json_object_get(rec, "reason");
        if (json_is_string(v)) {
                printf(" reason=\"");
                print_safe(json_string_value(v));
                putchar('"');
        }
        printf("\n");
}

/*
 * The longest line a trail can hold: a record of at most AB_AUDIT_MAX_RECORD
 * bytes and its newline. Longer lines are none the broker wrote.
 */
#define LINE_MAX_BYTES (AB_AUDIT_MAX_RECORD + 1)

static int list_file(const char *path, const filter *f, bool as_json)
{
        FILE *in = fopen(path, "re");
        char *line = malloc(LINE_MAX_BYTES);
        size_t n, lineno = 0;
        ssize_t r; /* the bytes of a line in the file: more than n for a longer line (ab_read_line) */
        int ex = EXIT_OK;

        if (!in || !line) {
                fprintf(stderr, "agent-brokerctl: audit: %s: %s\n", path, strerror(errno));
                if (in)
                        fclose(in);
                free(line);
                return EXIT_ERROR;
        }
        while ((r = ab_read_line(in, line, LINE_MAX_BYTES, &n)) > 0) {
                lineno++;
                if ((size_t)r > n) {
                        /* not a record the broker wrote: say so, and list the rest */
                        fflush(stdout);
                        fprintf(stderr,
                                "agent-brokerctl: audit: %s:%zu: a line longer than any audit record (%d bytes), "
                                "skipped: run 'agent-brokerctl audit verify'\n",
                                path, lineno, AB_AUDIT_MAX_RECORD);
                        continue;
                }
                json_t *rec = json_loadb(line, n, 0, NULL);
                if (rec && matches(rec, f))
                        print_record(rec, as_json);
                json_decref(rec);
        }
        if (r < 0) {
                fflush(stdout);
                fprintf(stderr, "agent-brokerctl: audit: %s: cannot read line %zu: %s\n", path, lineno + 1,
                        strerror((int)-r));
                ex = EXIT_ERROR;
        }
        free(line);
        fclose(in);
        return ex;
}

static int list_broker(const opts *o, const filter *f, bool as_json)
{
        long long after = 0;

        for (;;) {
                json_t *p = json_pack("{s:I}", "after_seq", (json_int_t)after), *reply = NULL, *rec;
                size_t i;
                int ex;
                if (f->since)
                        json_object_set_new(p, "since", json_integer(f->since));
                if (f->agent)
                        json_object_set_new(p, "agent", ctl_arg("--agent", f->agent));
                if (f->event)
                        json_object_set_new(p, "event", ctl_arg("--event", f->event));
                ex = simple_call(o, true, "io.agentbroker.admin.ReadAudit", p, &reply);
                if (ex)
                        return ex;
                json_array_foreach(json_object_get(reply, "records"), i, rec)
                        print_record(rec, as_json);
                long long next = json_integer_value(json_object_get(reply, "next_seq"));
                bool more = json_is_true(json_object_get(reply, "more"));
                json_decref(reply);
                if (!more)
                        return EXIT_OK;
                if (next <= after) {
                        /* asking again would get the same page for ever */
                        fprintf(stderr,
                                "agent-brokerctl: audit: the broker's page after seq %lld does not advance "
                                "(next_seq %lld); stopping\n",
                                after, next);
                        return EXIT_ERROR;
                }
                after = next;
        }
}

/* ---- verify ---------------------------------------------------------------- */

typedef struct verifier {
        json_t *keys;        /* JWKS "keys" array, or NULL */
        long long seq;       /* last seq seen, -1 before the first */
        char prev[65];       /* hash of the last line */
        unsigned records, checkpoints, unchecked;
        unsigned tail;       /* records after the last verified checkpoint: protected by the chain only */
        json_t *broken;      /* the first broken record: {file, line, seq, error}, or NULL */
} verifier;

static bool checkpoint_members_only(json_t *rec)
{
        static const char *const allowed[] = { "time", "event", "seq", "prev", "kid", "sig", "alg" };
        const char *k;
        json_t *val;

        json_object_foreach(rec, k, val) {
                size_t i;
                for (i = 0; i < AB_ARRAY_SIZE(allowed) && strcmp(k, allowed[i]) != 0; i++)
                        ;
                if (i == AB_ARRAY_SIZE(allowed))
                        return false;
        }
        return json_is_integer(json_object_get(rec, "time"));
}

static int fail_at(verifier *v, const char *file, size_t line, long long seq, const char *what)
{
        json_decref(v->broken);
        v->broken = json_pack("{s:s, s:I, s:I, s:s}", "file", file, "line", (json_int_t)line, "seq", (json_int_t)seq,
                              "error", what);
        return EXIT_DENIED;
}

/* k is an Ed25519 public JWK with a kid: its key into out. */
static bool ed25519_jwk(json_t *k, const char **ret_kid, uint8_t out[32])
{
        const char *x = json_string_value(json_object_get(k, "x"));
        const char *kty = json_string_value(json_object_get(k, "kty"));
        const char *crv = json_string_value(json_object_get(k, "crv"));
        size_t n = 0;

        if (!x || !kty || !crv || strcmp(kty, "OKP") != 0 || strcmp(crv, "Ed25519") != 0 ||
            !json_is_string(json_object_get(k, "kid")) || ab_b64url_decode(x, strlen(x), out, 32, &n) != 0 || n != 32)
                return false;
        *ret_kid = json_string_value(json_object_get(k, "kid"));
        return true;
}

static const uint8_t *find_key(verifier *v, const char *kid, uint8_t out[32])
{
        size_t i;
        json_t *k;
        const char *id;

        json_array_foreach(v->keys, i, k) {
                if (kid && ed25519_jwk(k, &id, out) && strcmp(id, kid) == 0)
                        return out;
        }
        return NULL;
}

static int verify_file(verifier *v, const char *path)
{
        FILE *in = fopen(path, "re");
        char *line = malloc(LINE_MAX_BYTES);
        size_t n, lineno = 0;
        ssize_t r = 0; /* as in list_file */
        int ex = EXIT_OK;

        if (!in || !line) {
                fprintf(stderr, "agent-brokerctl: audit verify: %s: %s\n", path, strerror(errno));
                if (in)
                        fclose(in);
                free(line);
                return EXIT_ERROR;
        }
        while (ex == EXIT_OK && (r = ab_read_line(in, line, LINE_MAX_BYTES, &n)) > 0) {
                json_error_t jerr;
                json_t *rec, *jseq;
                const char *prev, *event;
                long long seq;
                uint8_t h[crypto_hash_sha256_BYTES];
                char hex[65];
                bool verified = false; /* a checkpoint whose signature verified: the chain up to it is signed */

                lineno++;
                if ((size_t)r > n) {
                        char what[96];
                        snprintf(what, sizeof what, "a line longer than any audit record (%d bytes)",
                                 AB_AUDIT_MAX_RECORD);
                        ex = fail_at(v, path, lineno, v->seq + 1, what);
                        break;
                }
                if (line[n - 1] != '\n') {
                        ex = fail_at(v, path, lineno, v->seq + 1, "the last record is incomplete (torn write)");
                        break;
                }
                rec = json_loadb(line, (size_t)n - 1, JSON_REJECT_DUPLICATES, &jerr);
                jseq = json_object_get(rec, "seq");
                prev = json_string_value(json_object_get(rec, "prev"));
                event = json_string_value(json_object_get(rec, "event"));
                if (!json_is_object(rec) || !json_is_integer(jseq) || !prev || !event) {
                        ex = fail_at(v, path, lineno, v->seq + 1, "not an audit record (bad JSON or missing seq/prev/event)");
                        json_decref(rec);
                        break;
                }
                seq = json_integer_value(jseq);
                if (seq < 1 || seq >= AB_AUDIT_MAX_SEQ) {
                        /* as the broker's recovery: it does not go on from 2^53 (and v->seq + 1 must not overflow) */
                        ex = fail_at(v, path, lineno, seq, "seq out of range (1 to 2^53 - 1)");
                } else if (v->seq < 0 && seq != 1 && strcmp(event, "audit.rotated") != 0 &&
                           strcmp(event, "audit.reopened") != 0) {
                        /* only a file begun by rotation (or after the old one was moved away) may start mid-chain */
                        ex = fail_at(v, path, lineno, seq,
                                     "the chain does not start here (seq 1, or audit.rotated after a rotation): "
                                     "the records before it are missing");
                } else if (v->seq >= 0 && seq != v->seq + 1) {
                        char what[128];
                        snprintf(what, sizeof what, "expected seq %lld: a record is missing, repeated or out of order",
                                 v->seq + 1);
                        ex = fail_at(v, path, lineno, seq, what);
                } else if (v->seq >= 0 ? strcmp(prev, v->prev) != 0
                                       : (seq == 1 && strspn(prev, "0") != 64)) {
                        char what[200];
                        snprintf(what, sizeof what,
                                 "prev does not match the hash of the record before it (line %zu): that record was "
                                 "edited, or records were removed or reordered",
                                 lineno - 1);
                        ex = fail_at(v, path, lineno, seq, what);
                } else if (strcmp(event, "audit.checkpoint") == 0) {
                        char input[160];
                        uint8_t pk[32], sig[64];
                        size_t sl = 0;
                        const char *sig64 = json_string_value(json_object_get(rec, "sig"));
                        const char *kid = json_string_value(json_object_get(rec, "kid"));
                        const char *alg = json_string_value(json_object_get(rec, "alg"));
                        int in_len = ab_audit_checkpoint_input((uint64_t)seq, prev, input, sizeof input);
                        if (!checkpoint_members_only(rec)) {
                                /* its signature covers seq and prev only: nothing else may ride on it */
                                ex = fail_at(v, path, lineno, seq,
                                             "a checkpoint holds time, event, seq, prev, kid, sig and alg only");
                        } else if (!alg || strcmp(alg, "EdDSA") != 0) {
                                ex = fail_at(v, path, lineno, seq, "checkpoint alg is not EdDSA");
                        } else if (!v->keys) {
                                v->unchecked++;
                        } else if (!find_key(v, kid, pk)) {
                                ex = fail_at(v, path, lineno, seq, "checkpoint signed by a key the broker does not list");
                        } else if (!sig64 || ab_b64url_decode(sig64, strlen(sig64), sig, sizeof sig, &sl) < 0 ||
                                   sl != 64 || in_len < 0 ||
                                   crypto_sign_verify_detached(sig, (const uint8_t *)input, (size_t)in_len, pk) != 0) {
                                ex = fail_at(v, path, lineno, seq, "checkpoint signature does not verify");
                        } else {
                                v->checkpoints++;
                                verified = true;
                        }
                }
                v->tail = verified ? 0 : v->tail + 1;
                crypto_hash_sha256(h, (const uint8_t *)line, (size_t)n - 1);
                sodium_bin2hex(hex, sizeof hex, h, sizeof h);
                memcpy(v->prev, hex, sizeof hex);
                v->seq = seq;
                v->records++;
                json_decref(rec);
        }
        if (r < 0) {
                /* a file read in part is no verdict: the lines not read may be the forged ones */
                fprintf(stderr, "agent-brokerctl: audit verify: %s: cannot read line %zu: %s\n", path, lineno + 1,
                        strerror((int)-r));
                ex = EXIT_ERROR;
        }
        free(line);
        fclose(in);
        return ex;
}

static int load_keys(const opts *o, const char *keys_file, verifier *v)
{
        json_t *jwks = NULL;

        if (keys_file) {
                json_error_t e;
                jwks = json_load_file(keys_file, 0, &e);
                if (!jwks) {
                        fprintf(stderr, "agent-brokerctl: audit verify: %s: %s\n", keys_file, e.text);
                        return EXIT_USAGE;
                }
        } else {
                ab_client *c = NULL;
                char *out = NULL;
                bool admin = admin_usable(o);
                /* quietly: verifying a file needs no broker; without keys the
                 * checkpoints are reported unchecked */
                if (ab_client_connect(ctl_socket_path(o, admin), o->timeout_ms, &c) < 0)
                        return EXIT_OK;
                /* the admin list keeps retired keys too, so old checkpoints still verify */
                if (ab_client_call(c, admin ? "io.agentbroker.admin.ListKeys" : "io.agentbroker.GetKeys", NULL,
                                   &out) == 0)
                        jwks = json_loads(out, 0, NULL);
                ab_token_free(out);
                ab_client_free(c);
        }
        if (jwks && json_is_array(json_object_get(jwks, "keys")))
                v->keys = json_incref(json_object_get(jwks, "keys"));
        json_decref(jwks);
        if (keys_file) {
                /* keys the user named must be keys: a set that checks nothing would let every
                 * checkpoint through as "not checked", and a rewritten chain pass as intact */
                size_t i, usable = 0;
                json_t *k;
                const char *id;
                uint8_t pk[32];
                json_array_foreach(v->keys, i, k) {
                        if (ed25519_jwk(k, &id, pk))
                                usable++;
                }
                if (usable == 0) {
                        fprintf(stderr,
                                "agent-brokerctl: audit verify: %s: no Ed25519 key in it (a JWKS: "
                                "{\"keys\": [{\"kty\": \"OKP\", \"crv\": \"Ed25519\", \"kid\": ..., \"x\": ...}]}, "
                                "as 'agent-brokerctl keys' prints)\n",
                                keys_file);
                        return EXIT_USAGE;
                }
        }
        return EXIT_OK;
}

/* The broker's current audit file, asked over the admin socket; NULL if it cannot say. */
static char *broker_file(const opts *o)
{
        json_t *reply = NULL;
        char *path = NULL;
        if (!admin_usable(o) || simple_call(o, true, "io.agentbroker.admin.ReadAudit", json_pack("{s:i}", "limit", 1),
                                            &reply) != 0)
                return NULL;
        if (json_is_string(json_object_get(reply, "file")))
                path = strdup(json_string_value(json_object_get(reply, "file")));
        json_decref(reply);
        return path;
}

static int cmd_audit_verify(const opts *o, int argc, char **argv)
{
        static const struct option lo[] = {
                { "file", required_argument, NULL, 'f' }, { "keys", required_argument, NULL, 'k' },
                { "json", no_argument, NULL, 'j' }, { 0 },
        };
        const char *files[64], *keys_file = NULL;
        size_t n = 0;
        char *auto_file = NULL;
        verifier v = { .seq = -1 };
        bool as_json = false;
        int c, ex = EXIT_OK;

        optind = 0;
        while ((c = getopt_long(argc, argv, "", lo, NULL)) >= 0) {
                switch (c) {
                case 'f':
                        if (n == sizeof files / sizeof files[0])
                                goto too_many;
                        files[n++] = optarg;
                        break;
                case 'k': keys_file = optarg; break;
                case 'j': as_json = true; break;
                default: return EXIT_USAGE;
                }
        }
        for (; optind < argc; optind++) {
                if (n == sizeof files / sizeof files[0])
                        goto too_many;
                files[n++] = argv[optind];
        }
        if (n == 0) {
                auto_file = broker_file(o);
                files[n++] = auto_file ? auto_file : AB_AUDIT_DEFAULT_PATH;
        }
        ex = load_keys(o, keys_file, &v);
        for (size_t i = 0; ex == EXIT_OK && i < n; i++)
                ex = verify_file(&v, files[i]);
        if (as_json && (ex == EXIT_OK || v.broken)) {
                /* the verdict as one object: intact or not, and where it broke */
                json_t *fl = json_array(), *out;
                for (size_t i = 0; i < n; i++)
                        json_array_append_new(fl, ctl_json_text(files[i]));
                out = json_pack("{s:b, s:o, s:I, s:I, s:I, s:I, s:I}", "intact", ex == EXIT_OK, "files", fl,
                                "records", (json_int_t)v.records, "last_seq", (json_int_t)(v.records ? v.seq : 0),
                                "checkpoints_verified", (json_int_t)v.checkpoints,
                                "checkpoints_unchecked", (json_int_t)v.unchecked,
                                "records_after_last_checkpoint", (json_int_t)v.tail);
                if (out && v.broken)
                        json_object_set(out, "broken", v.broken);
                if (!out || print_json(out) != EXIT_OK)
                        ex = EXIT_ERROR;
                json_decref(out);
        } else if (v.broken) {
                printf("%s:%lld: seq %lld: %s\n", json_string_value(json_object_get(v.broken, "file")),
                       (long long)json_integer_value(json_object_get(v.broken, "line")),
                       (long long)json_integer_value(json_object_get(v.broken, "seq")),
                       json_string_value(json_object_get(v.broken, "error")));
        } else if (ex == EXIT_OK) {
                printf("audit chain intact: %u records", v.records);
                if (v.records)
                        printf(" (seq up to %lld)", v.seq);
                printf(", %u signed checkpoints verified", v.checkpoints);
                if (v.unchecked)
                        printf(", %u not checked (no keys: run with --keys JWKS or a reachable broker)", v.unchecked);
                if (v.tail)
                        printf("; the last %u records follow the last verified checkpoint: the hash chain alone "
                               "protects them (records added or edited there are not detected)", v.tail);
                printf("\n");
        }
        json_decref(v.broken);
        json_decref(v.keys);
        free(auto_file);
        return ex;
too_many:
        fprintf(stderr, "agent-brokerctl: audit verify takes at most %zu files in one run\n",
                sizeof files / sizeof files[0]);
        return EXIT_USAGE;
}

int cmd_audit(const opts *o, int argc, char **argv)
{
        static const struct option lo[] = {
                { "since", required_argument, NULL, 's' }, { "agent", required_argument, NULL, 'a' },
                { "event", required_argument, NULL, 'e' }, { "json", no_argument, NULL, 'j' },
                { "file", required_argument, NULL, 'f' },  { 0 },
        };
        filter f = { 0 };
        const char *file = NULL;
        bool as_json = false;
        int c;

        if (argc > 1 && strcmp(argv[1], "verify") == 0) {
                argv[1] = (char *)"agent-brokerctl audit verify"; /* getopt_long's messages name it */
                return cmd_audit_verify(o, argc - 1, argv + 1);
        }
        optind = 0;
        while ((c = getopt_long(argc, argv, "", lo, NULL)) >= 0) {
                switch (c) {
                case 's':
                        if (parse_time_arg(optarg, &f.since) < 0)
                                return EXIT_USAGE;
                        break;
                case 'a': f.agent = optarg; break;
                case 'e': f.event = optarg; break;
                case 'j': as_json = true; break;
                case 'f': file = optarg; break;
                default: return EXIT_USAGE;
                }
        }
        if (optind != argc) {
                fprintf(stderr, "agent-brokerctl: audit [--since T] [--agent A] [--event E] [--json] [--file PATH] | "
                                "audit verify [--file PATH ...] [--keys JWKS] [--json]\n");
                return EXIT_USAGE;
        }
        return file ? list_file(file, &f, as_json) : list_broker(o, &f, as_json);
}
