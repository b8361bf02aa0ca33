/* SPDX-License-Identifier: MIT */
/*
 * Unit tests for the library's token calls (client/client-internal.h), as
 * the PAM module makes them: ab_encode_token_call writes the request text,
 * token included, into a caller's buffer without jansson; ab_client_call_token
 * sends it to a fake broker. Every free() of the library (linked with
 * -Wl,--wrap=free) and of jansson (json_set_alloc_funcs) is scanned while a
 * call runs: no freed block may still hold the token.
 */
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <cmocka.h>
#if __has_include(<valgrind/memcheck.h>)
#include <valgrind/memcheck.h>
#else
#define VALGRIND_MAKE_MEM_DEFINED(p, n) ((void)(p), (void)(n))
#endif

#include "../../client/client-internal.h"
#include "../../common/jwt.h"
#include "../../common/util.h"
#include "../../common/varlink.h"

#define M_INTROSPECT "io.agentbroker.Introspect"
#define SIG "U0VDUkVULVNJRy1NQVJLRVI" /* what the scan looks for */
#define TOKEN "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ3YXRjaCJ9." SIG

/* ---- freed-memory scan ----------------------------------------------------- */

void __real_free(void *p);
void __wrap_free(void *p);

static const char *watch;  /* set while a call runs */
static unsigned watch_hits; /* freed blocks that held it */

static void scan(void *p)
{
        size_t n;

        if (!p || !watch)
                return;
        n = malloc_usable_size(p);
        VALGRIND_MAKE_MEM_DEFINED(p, n); /* slack past what was written is not an error here */
        if (memmem(p, n, watch, strlen(watch)))
                __atomic_add_fetch(&watch_hits, 1, __ATOMIC_RELAXED);
}

void __wrap_free(void *p)
{
        scan(p);
        __real_free(p);
}

static void jansson_free(void *p)
{
        scan(p);
        __real_free(p);
}

static void watch_start(const char *s)
{
        watch_hits = 0;
        watch = s;
}

static unsigned watch_stop(void)
{
        watch = NULL;
        return watch_hits;
}

/* ---- encoding ------------------------------------------------------------- */

static int encode(const char *method, const char *token, const json_t *params, char *buf, size_t max,
                  size_t *ret_len)
{
        return ab_encode_token_call(method, token, params, buf, max, ret_len);
}

/* Encode, check the NUL and the length, compare with want. */
static void expect_text(const char *token, json_t *params, const char *want)
{
        static char buf[AB_MAX_MESSAGE + 1];
        size_t len = 0;

        assert_int_equal(encode(M_INTROSPECT, token, params, buf, sizeof buf, &len), 0);
        assert_int_equal(len, strlen(want) + 1);
        assert_int_equal(buf[len - 1], '\0');
        assert_string_equal(buf, want);
        json_decref(params);
}

static void test_shapes(void **state)
{
        expect_text(TOKEN, NULL, "{\"method\":\"" M_INTROSPECT "\",\"parameters\":{\"token\":\"" TOKEN "\"}}");
        expect_text(TOKEN, json_object(), "{\"method\":\"" M_INTROSPECT "\",\"parameters\":{\"token\":\"" TOKEN "\"}}");
        expect_text(TOKEN, json_pack("{s:s, s:s, s:i}", "audience", "pam:x", "user", "root", "max_auth_age", 300),
                    "{\"method\":\"" M_INTROSPECT "\",\"parameters\":{\"token\":\"" TOKEN
                    "\",\"audience\":\"pam:x\",\"user\":\"root\",\"max_auth_age\":300}}");
        expect_text(NULL, json_pack("{s:s}", "id", "abc"),
                    "{\"method\":\"" M_INTROSPECT "\",\"parameters\":{\"id\":\"abc\"}}");
        expect_text(NULL, json_object(), "{\"method\":\"" M_INTROSPECT "\",\"parameters\":{}}");
        expect_text(NULL, NULL, "{\"method\":\"" M_INTROSPECT "\",\"parameters\":{}}");
}

/* What the broker parses is what was given, whatever the other parameters hold. */
static void test_round_trip_escapes(void **state)
{
        static const char *const users[] = {
                "root", "a\"b", "back\\slash", "tab\there", "nl\n", "\x01\x1f\x7f", "caf\xc3\xa9", "}{,\":",
        };
        static char buf[AB_MAX_MESSAGE + 1];

        for (size_t i = 0; i < AB_ARRAY_SIZE(users); i++) {
                json_t *p = json_pack("{s:s, s:s}", "user", users[i], "service", "pam:\"svc\"");
                ab_vl_call call;
                size_t len = 0;

                assert_non_null(p);
                assert_int_equal(encode(M_INTROSPECT, TOKEN, p, buf, sizeof buf, &len), 0);
                assert_int_equal(ab_vl_parse_call(buf, len - 1, &call, NULL, 0), 0);
                assert_string_equal(call.method, M_INTROSPECT);
                assert_int_equal(json_object_size(call.parameters), 3);
                assert_string_equal(json_string_value(json_object_get(call.parameters, "token")), TOKEN);
                assert_string_equal(json_string_value(json_object_get(call.parameters, "user")), users[i]);
                assert_string_equal(json_string_value(json_object_get(call.parameters, "service")), "pam:\"svc\"");
                ab_vl_call_done(&call);
                json_decref(p);
        }
}

/* Every byte outside [A-Za-z0-9_.-] is refused, wherever it is; the set itself passes. */
static void test_token_alphabet(void **state)
{
        static char buf[AB_MAX_MESSAGE + 1];
        size_t len = 0;

        for (int ch = 1; ch < 256; ch++) {
                bool ok = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') ||
                          ch == '-' || ch == '_' || ch == '.';
                char tok[16];

                snprintf(tok, sizeof tok, "eyJ%c.a.b", ch);
                assert_int_equal(encode(M_INTROSPECT, tok, NULL, buf, sizeof buf, &len), ok ? 0 : AB_ERR_INVALID);
                snprintf(tok, sizeof tok, "%c", ch);
                assert_int_equal(encode(M_INTROSPECT, tok, NULL, buf, sizeof buf, &len), ok ? 0 : AB_ERR_INVALID);
        }
        assert_int_equal(encode(M_INTROSPECT, "", NULL, buf, sizeof buf, &len), AB_ERR_INVALID);
}

/* The token: AB_JWT_MAX bytes pass, one more does not. */
static void test_token_limit(void **state)
{
        static char buf[AB_MAX_MESSAGE + 1];
        char *tok = malloc(AB_JWT_MAX + 2);
        size_t len = 0;

        assert_non_null(tok);
        memset(tok, 'a', AB_JWT_MAX);
        tok[AB_JWT_MAX] = '\0';
        assert_int_equal(encode(M_INTROSPECT, tok, NULL, buf, sizeof buf, &len), 0);
        assert_int_equal(len, strlen("{\"method\":\"" M_INTROSPECT "\",\"parameters\":{\"token\":\"\"}}") + AB_JWT_MAX + 1);
        tok[AB_JWT_MAX] = 'a';
        tok[AB_JWT_MAX + 1] = '\0';
        assert_int_equal(encode(M_INTROSPECT, tok, NULL, buf, sizeof buf, &len), AB_ERR_TOO_LARGE);
        free(tok);
}

/*
 * The buffer: exactly the message and its NUL fit; every smaller buffer is
 * AB_ERR_TOO_LARGE and nothing is written past it.
 */
static void test_buffer_limit(void **state)
{
        static char buf[1024];
        json_t *p = json_pack("{s:s, s:s}", "user", "ro\"ot", "service", "pam:x");
        size_t len = 0, want;

        assert_non_null(p);
        assert_int_equal(encode(M_INTROSPECT, TOKEN, p, buf, sizeof buf, &len), 0);
        want = len;
        for (size_t max = 0; max < want; max++) {
                memset(buf, 'G', sizeof buf);
                len = 12345;
                assert_int_equal(encode(M_INTROSPECT, TOKEN, p, buf, max, &len), AB_ERR_TOO_LARGE);
                assert_int_equal(len, 12345); /* untouched on failure */
                for (size_t i = max; i < sizeof buf; i++)
                        assert_int_equal(buf[i], 'G');
        }
        assert_int_equal(encode(M_INTROSPECT, TOKEN, p, buf, want, &len), 0);
        assert_int_equal(len, want);
        assert_int_equal(buf[want - 1], '\0');
        json_decref(p);
}

/* The message text: AB_MAX_MESSAGE bytes pass, one more does not, whatever the buffer. */
static void test_message_limit(void **state)
{
        static char buf[AB_MAX_MESSAGE + 64];
        const size_t fixed = strlen("{\"method\":\"" M_INTROSPECT "\",\"parameters\":{\"token\":\"" TOKEN
                                    "\",\"pad\":\"\"}}");
        size_t padlen = AB_MAX_MESSAGE - fixed, len = 0;
        char *pad = malloc(padlen + 2);
        json_t *p;

        assert_non_null(pad);
        memset(pad, 'x', padlen);
        pad[padlen] = '\0';
        p = json_pack("{s:s}", "pad", pad);
        assert_int_equal(encode(M_INTROSPECT, TOKEN, p, buf, sizeof buf, &len), 0);
        assert_int_equal(len, AB_MAX_MESSAGE + 1);
        json_decref(p);
        pad[padlen] = 'x';
        pad[padlen + 1] = '\0';
        p = json_pack("{s:s}", "pad", pad);
        assert_int_equal(encode(M_INTROSPECT, TOKEN, p, buf, sizeof buf, &len), AB_ERR_TOO_LARGE);
        json_decref(p);
        free(pad);
}

static void test_bad_arguments(void **state)
{
        static char buf[256];
        json_t *with_token = json_pack("{s:s}", "token", "x");
        json_t *array = json_array();
        size_t len = 0;

        assert_int_equal(encode(M_INTROSPECT, TOKEN, with_token, buf, sizeof buf, &len), AB_ERR_INVALID);
        assert_int_equal(encode(M_INTROSPECT, NULL, with_token, buf, sizeof buf, &len), AB_ERR_INVALID);
        assert_int_equal(encode(M_INTROSPECT, TOKEN, array, buf, sizeof buf, &len), AB_ERR_INVALID);
        assert_int_equal(encode("Introspect", TOKEN, NULL, buf, sizeof buf, &len), AB_ERR_INVALID);
        assert_int_equal(encode("io.agentbroker.Intro\"spect", TOKEN, NULL, buf, sizeof buf, &len), AB_ERR_INVALID);
        assert_int_equal(encode(NULL, TOKEN, NULL, buf, sizeof buf, &len), AB_ERR_INVALID);
        assert_int_equal(encode(M_INTROSPECT, TOKEN, NULL, NULL, sizeof buf, &len), AB_ERR_INVALID);
        assert_int_equal(encode(M_INTROSPECT, TOKEN, NULL, buf, sizeof buf, NULL), AB_ERR_INVALID);
        json_decref(with_token);
        json_decref(array);
}

/* ---- a call to a fake broker ------------------------------------------------ */

typedef struct fake {
        char dir[64];
        char path[128];
        int listen_fd;
        const char *reply; /* with its NUL written after it */
        char got[AB_MAX_MESSAGE + 1];
        size_t got_len;    /* the request, without its NUL */
        pthread_t thread;
} fake;

/* One connection, one request, one reply; no allocation (the scan would see it). */
static void *fake_run(void *arg)
{
        fake *f = arg;
        int fd = accept(f->listen_fd, NULL, NULL);

        if (fd < 0)
                return NULL;
        while (f->got_len < sizeof f->got) {
                ssize_t n = read(fd, f->got + f->got_len, sizeof f->got - f->got_len);
                if (n <= 0)
                        break;
                f->got_len += (size_t)n;
                if (memchr(f->got, '\0', f->got_len))
                        break;
        }
        if (f->got_len > 0 && f->got[f->got_len - 1] == '\0')
                f->got_len--;
        ssize_t w = write(fd, f->reply, strlen(f->reply) + 1);
        (void)w; /* if it failed, the client sees the close */
        close(fd);
        return NULL;
}

static void fake_start(fake *f, const char *reply)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };

        memset(f, 0, sizeof *f);
        snprintf(f->dir, sizeof f->dir, "/tmp/test-token-call.XXXXXX");
        assert_non_null(mkdtemp(f->dir));
        snprintf(f->path, sizeof f->path, "%s/sock", f->dir);
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s", f->path);
        f->reply = reply;
        f->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_true(f->listen_fd >= 0);
        assert_int_equal(bind(f->listen_fd, (struct sockaddr *)&sa, sizeof sa), 0);
        assert_int_equal(listen(f->listen_fd, 1), 0);
        assert_int_equal(pthread_create(&f->thread, NULL, fake_run, f), 0);
}

static void fake_stop(fake *f)
{
        pthread_join(f->thread, NULL);
        close(f->listen_fd);
        unlink(f->path);
        rmdir(f->dir);
}

static void test_call_sends_the_text_and_leaves_no_copy(void **state)
{
        static fake f;
        static char want[1024];
        json_t *p = json_pack("{s:s, s:s}", "audience", "pam:x", "user", "root");
        json_t *reply = NULL;
        ab_client *c = NULL;
        size_t want_len = 0;

        assert_int_equal(encode(M_INTROSPECT, TOKEN, p, want, sizeof want, &want_len), 0);
        fake_start(&f, "{\"parameters\":{\"active\":false,\"reason\":\"revoked\"}}");
        assert_int_equal(ab_client_connect(f.path, 5000, &c), 0);

        watch_start(SIG);
        assert_int_equal(ab_client_call_token(c, M_INTROSPECT, TOKEN, p, &reply), 0);
        json_decref(p);
        ab_client_free(c);
        assert_int_equal(watch_stop(), 0);

        fake_stop(&f);
        assert_int_equal(f.got_len, want_len - 1);
        assert_memory_equal(f.got, want, want_len - 1);
        assert_true(json_is_false(json_object_get(reply, "active")));
        assert_string_equal(json_string_value(json_object_get(reply, "reason")), "revoked");
        json_decref(reply);
}

/* The same for an error reply, and for a token the library refuses to send. */
static void test_call_errors_leave_no_copy(void **state)
{
        static fake f;
        json_t *reply = NULL;
        ab_client *c = NULL;

        fake_start(&f, "{\"error\":\"io.agentbroker.RateLimited\",\"parameters\":{\"reason\":\"slow down\"}}");
        assert_int_equal(ab_client_connect(f.path, 5000, &c), 0);
        watch_start(SIG);
        /* a limit, not a denial (AB_ERR_REMOTE: worth a retry) */
        assert_int_equal(ab_client_call_token(c, M_INTROSPECT, TOKEN, NULL, &reply), AB_ERR_REMOTE);
        assert_string_equal(ab_client_error_name(c), "io.agentbroker.RateLimited");
        assert_int_equal(ab_client_call_token(c, M_INTROSPECT, TOKEN "\"", NULL, &reply), AB_ERR_INVALID);
        assert_string_equal(ab_client_error_name(c), "");
        ab_client_free(c);
        assert_int_equal(watch_stop(), 0);
        fake_stop(&f);
        assert_null(reply);
}

/* The scan itself sees a copy that jansson frees, and one that the library's code frees. */
static void test_scan_sees_copies(void **state)
{
        char *volatile copy; /* or the compiler drops the strdup and the free */
        json_t *s;

        watch_start(SIG);
        s = json_string(TOKEN);
        assert_non_null(s);
        json_decref(s);
        assert_true(watch_stop() >= 1);

        watch_start(SIG);
        copy = strdup(TOKEN);
        assert_non_null(copy);
        free(copy);
        assert_int_equal(watch_stop(), 1);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_shapes),
                cmocka_unit_test(test_round_trip_escapes),
                cmocka_unit_test(test_token_alphabet),
                cmocka_unit_test(test_token_limit),
                cmocka_unit_test(test_buffer_limit),
                cmocka_unit_test(test_message_limit),
                cmocka_unit_test(test_bad_arguments),
                cmocka_unit_test(test_call_sends_the_text_and_leaves_no_copy),
                cmocka_unit_test(test_call_errors_leave_no_copy),
                cmocka_unit_test(test_scan_sees_copies),
        };

        json_set_alloc_funcs(malloc, jansson_free);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
