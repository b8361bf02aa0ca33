/* SPDX-License-Identifier: MIT */
/* Unit tests for common/frame.c: NUL-delimited varlink framing. */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "../../common/frame.h"
#include "../../common/util.h"

/* Copy data[0..n) into f through ab_frame_space/commit, at most chunk bytes per commit. */
static void put(ab_frame *f, const void *data, size_t n, size_t chunk)
{
        const char *p = data;

        while (n > 0) {
                char *dst = NULL;
                size_t avail = 0, k;

                assert_int_equal(ab_frame_space(f, &dst, &avail), 0);
                assert_non_null(dst);
                assert_true(avail > 0);
                k = AB_MIN(AB_MIN(avail, chunk), n);
                memcpy(dst, p, k);
                ab_frame_commit(f, k);
                p += k;
                n -= k;
        }
}

static void put_str(ab_frame *f, const char *s, size_t n)
{
        put(f, s, n, SIZE_MAX);
}

static void expect_msg(ab_frame *f, const char *want, size_t want_len)
{
        const char *msg = NULL;
        size_t len = 0;

        assert_int_equal(ab_frame_next(f, &msg, &len), 1);
        assert_int_equal(len, want_len);
        assert_memory_equal(msg, want, want_len);
        assert_int_equal(msg[len], '\0');
}

static void expect_none(ab_frame *f)
{
        const char *msg = (const char *)0x1;
        size_t len = 4242;

        assert_int_equal(ab_frame_next(f, &msg, &len), 0);
        assert_ptr_equal(msg, (const char *)0x1); /* untouched */
        assert_int_equal(len, 4242);
}

static void test_init_free(void **state)
{
        ab_frame f, z = { 0 };

        ab_frame_init(&f, 100);
        assert_null(f.buf);
        assert_int_equal(f.max, 100);
        assert_int_equal(ab_frame_pending(&f), 0);
        expect_none(&f);
        ab_frame_free(&f);
        ab_frame_free(&f); /* twice is fine */
        ab_frame_free(&z); /* zeroed frame */

        ab_frame_init(&f, 100);
        put_str(&f, "abc", 3);
        ab_frame_free(&f); /* frees a partial message; LeakSanitizer checks */
        assert_null(f.buf);
        assert_int_equal(f.len, 0);
        assert_int_equal(f.max, 100);
        assert_int_equal(ab_frame_pending(&f), 0);

        /* usable again after free */
        put_str(&f, "x\0", 2);
        expect_msg(&f, "x", 1);
        ab_frame_free(&f);
}

/* A message put back comes out again, the one in the middle and the last (after which the frame was emptied). */
static void test_unread(void **state)
{
        ab_frame f;

        (void)state;
        ab_frame_init(&f, 64);
        put_str(&f, "one\0two\0", 8);
        expect_msg(&f, "one", 3);
        ab_frame_unread(&f);
        assert_int_equal(ab_frame_pending(&f), 8);
        expect_msg(&f, "one", 3);
        expect_msg(&f, "two", 3);
        assert_int_equal(ab_frame_pending(&f), 0);
        ab_frame_unread(&f);
        assert_int_equal(ab_frame_pending(&f), 4);
        expect_msg(&f, "two", 3);
        expect_none(&f);
        /* and reading goes on after it as before */
        put_str(&f, "three\0", 6);
        expect_msg(&f, "three", 5);
        expect_none(&f);
        ab_frame_free(&f);
}

static void test_one_byte_commits(void **state)
{
        static const char stream[] = "{\"method\":\"a.B\"}\0{\"parameters\":{}}\0{}\0";
        ab_frame f;
        size_t got = 0;

        ab_frame_init(&f, 64);
        for (size_t i = 0; i < sizeof stream - 1; i++) {
                const char *msg;
                size_t len;
                int r;

                put(&f, stream + i, 1, 1);
                r = ab_frame_next(&f, &msg, &len);
                assert_true(r == 0 || r == 1);
                if (stream[i] != '\0') {
                        assert_int_equal(r, 0);
                        continue;
                }
                assert_int_equal(r, 1);
                switch (got++) {
                case 0: assert_string_equal(msg, "{\"method\":\"a.B\"}"); break;
                case 1: assert_string_equal(msg, "{\"parameters\":{}}"); break;
                case 2: assert_string_equal(msg, "{}"); break;
                default: fail();
                }
                assert_int_equal(len, strlen(msg));
                assert_int_equal(ab_frame_pending(&f), 0);
        }
        assert_int_equal(got, 3);
        ab_frame_free(&f);
}

static void test_merged_messages(void **state)
{
        ab_frame f;

        ab_frame_init(&f, 64);
        put_str(&f, "one\0two\0three\0\0four", 19);
        expect_msg(&f, "one", 3);
        expect_msg(&f, "two", 3);
        expect_msg(&f, "three", 5);
        expect_msg(&f, "", 0);
        expect_none(&f);
        assert_int_equal(ab_frame_pending(&f), 4);
        put_str(&f, "\0", 1);
        expect_msg(&f, "four", 4);
        expect_none(&f);
        assert_int_equal(ab_frame_pending(&f), 0);
        ab_frame_free(&f);
}

static void test_empty_message(void **state)
{
        ab_frame f;

        ab_frame_init(&f, 16);
        put_str(&f, "\0", 1);
        expect_msg(&f, "", 0);
        expect_none(&f);
        put_str(&f, "\0\0\0", 3);
        expect_msg(&f, "", 0);
        expect_msg(&f, "", 0);
        expect_msg(&f, "", 0);
        expect_none(&f);
        ab_frame_free(&f);

        /* max 0: only empty messages */
        ab_frame_init(&f, 0);
        put_str(&f, "\0\0", 2);
        expect_msg(&f, "", 0);
        expect_msg(&f, "", 0);
        expect_none(&f);
        put_str(&f, "a", 1);
        {
                const char *msg;
                size_t len;
                assert_int_equal(ab_frame_next(&f, &msg, &len), AB_ERR_TOO_LARGE);
        }
        ab_frame_free(&f);
}

/* A message of n bytes of 'a'..'z' (NUL-terminated for convenience). */
static char *make_msg(size_t n)
{
        char *m = malloc(n + 1);
        assert_non_null(m);
        for (size_t i = 0; i < n; i++)
                m[i] = (char)('a' + i % 26);
        m[n] = '\0';
        return m;
}

static void check_max(size_t max, size_t chunk)
{
        ab_frame f;
        char *m = make_msg(max + 1);
        const char *msg;
        size_t len;

        /* exactly max bytes: accepted, both as one commit and as chunks */
        ab_frame_init(&f, max);
        put(&f, m, max, chunk);
        expect_none(&f); /* max bytes without the NUL: still waiting, not an error */
        assert_int_equal(ab_frame_pending(&f), max);
        put(&f, "\0", 1, chunk);
        assert_int_equal(ab_frame_next(&f, &msg, &len), 1);
        assert_int_equal(len, max);
        assert_memory_equal(msg, m, max);
        assert_int_equal(msg[max], '\0');
        expect_none(&f);
        assert_int_equal(ab_frame_pending(&f), 0);

        /* the frame is reusable for another maximal message */
        put(&f, m, max, chunk);
        put(&f, "\0", 1, chunk);
        assert_int_equal(ab_frame_next(&f, &msg, &len), 1);
        assert_int_equal(len, max);
        ab_frame_free(&f);

        /* max + 1 bytes, then the NUL: rejected once the NUL arrives, or
         * before it as soon as max + 1 bytes are held */
        ab_frame_init(&f, max);
        put(&f, m, max, chunk);
        expect_none(&f);
        {
                char *dst;
                size_t avail;
                assert_int_equal(ab_frame_space(&f, &dst, &avail), 0);
                assert_true(avail >= 1);
                dst[0] = m[max];
                if (avail >= 2) {
                        dst[1] = '\0';
                        ab_frame_commit(&f, 2);
                } else {
                        ab_frame_commit(&f, 1);
                }
        }
        assert_int_equal(ab_frame_next(&f, &msg, &len), AB_ERR_TOO_LARGE);
        ab_frame_free(&f);

        /* max + 1 bytes and the NUL never arrives */
        ab_frame_init(&f, max);
        put(&f, m, max + 1, chunk);
        assert_int_equal(ab_frame_next(&f, &msg, &len), AB_ERR_TOO_LARGE);
        ab_frame_free(&f);

        /* max + 1 bytes arriving one by one: the error comes at byte max + 1, not before */
        ab_frame_init(&f, max);
        for (size_t i = 0; i <= max; i++) {
                put(&f, m + i, 1, 1);
                if (i < max)
                        assert_int_equal(ab_frame_next(&f, &msg, &len), 0);
                else
                        assert_int_equal(ab_frame_next(&f, &msg, &len), AB_ERR_TOO_LARGE);
        }
        ab_frame_free(&f);
        free(m);
}

static void test_max_small(void **state)
{
        check_max(100, SIZE_MAX);
        check_max(100, 7);
        check_max(1, 1);
}

/* Larger than the initial allocation, so the buffer has to grow. */
static void test_max_large(void **state)
{
        check_max(4095, SIZE_MAX);
        check_max(4096, SIZE_MAX);
        check_max(4097, 1000);
        check_max(10000, SIZE_MAX);
        check_max(AB_MAX_MESSAGE, 4096);
}

/*
 * A maximal message complete in the buffer together with the start of the
 * next, in one commit (max + 1 below the minimal allocation leaves room).
 */
static void test_max_then_more(void **state)
{
        const size_t max = 1000;
        char *m = make_msg(max);
        ab_frame f;

        ab_frame_init(&f, max);
        put(&f, m, max, SIZE_MAX);
        put(&f, "\0xy", 3, SIZE_MAX);
        expect_msg(&f, m, max);
        expect_none(&f);
        assert_int_equal(ab_frame_pending(&f), 2);
        put(&f, m, max - 2, SIZE_MAX); /* the second message grows to exactly max */
        expect_none(&f);
        put(&f, "\0", 1, SIZE_MAX);
        {
                const char *msg;
                size_t len;
                assert_int_equal(ab_frame_next(&f, &msg, &len), 1);
                assert_int_equal(len, max);
                assert_memory_equal(msg, "xy", 2);
                assert_memory_equal(msg + 2, m, max - 2);
        }
        ab_frame_free(&f);
        free(m);
}

/*
 * When the buffer is exactly max + 1 bytes, a maximal message fills it:
 * the caller takes it with ab_frame_next before asking for more space.
 */
static void test_full_buffer(void **state)
{
        const size_t max = 10000;
        char *m = make_msg(max);
        char *dst;
        size_t avail;
        ab_frame f;

        ab_frame_init(&f, max);
        put(&f, m, max, SIZE_MAX);
        put(&f, "\0", 1, SIZE_MAX);
        assert_int_equal(f.len, f.cap);
        assert_int_not_equal(ab_frame_space(&f, &dst, &avail), 0); /* full: next first */
        expect_msg(&f, m, max);
        assert_int_equal(ab_frame_space(&f, &dst, &avail), 0);
        assert_true(avail >= max + 1);
        ab_frame_free(&f);
        free(m);
}

static void test_interleaving(void **state)
{
        ab_frame f;
        char *dst;
        size_t avail;

        ab_frame_init(&f, 32);
        expect_none(&f);
        assert_int_equal(ab_frame_space(&f, &dst, &avail), 0);
        memcpy(dst, "ab", 2);
        ab_frame_commit(&f, 2);
        expect_none(&f);
        assert_int_equal(ab_frame_pending(&f), 2);

        /* space again without next in between, then a partial commit */
        assert_int_equal(ab_frame_space(&f, &dst, &avail), 0);
        memcpy(dst, "c\0de", 4);
        ab_frame_commit(&f, 4);
        expect_msg(&f, "abc", 3);
        expect_none(&f);
        assert_int_equal(ab_frame_pending(&f), 2);

        /* space compacts the consumed message away, the partial one stays */
        assert_int_equal(ab_frame_space(&f, &dst, &avail), 0);
        assert_int_equal(ab_frame_pending(&f), 2);
        memcpy(dst, "\0", 1);
        ab_frame_commit(&f, 1);
        expect_msg(&f, "de", 2);
        assert_int_equal(ab_frame_pending(&f), 0);

        /* commit of 0 bytes changes nothing */
        assert_int_equal(ab_frame_space(&f, &dst, &avail), 0);
        ab_frame_commit(&f, 0);
        expect_none(&f);
        assert_int_equal(ab_frame_pending(&f), 0);
        ab_frame_free(&f);
}

static void test_pending_accounting(void **state)
{
        ab_frame f;

        ab_frame_init(&f, 64);
        assert_int_equal(ab_frame_pending(&f), 0);
        put_str(&f, "hello", 5);
        assert_int_equal(ab_frame_pending(&f), 5);
        expect_none(&f);
        assert_int_equal(ab_frame_pending(&f), 5); /* next does not consume partial data */
        put_str(&f, " world", 6);
        assert_int_equal(ab_frame_pending(&f), 11);
        put_str(&f, "\0", 1);
        expect_msg(&f, "hello world", 11);
        assert_int_equal(ab_frame_pending(&f), 0);

        put_str(&f, "a\0bc", 4);
        expect_msg(&f, "a", 1);
        assert_int_equal(ab_frame_pending(&f), 2);
        put_str(&f, "\0", 1);
        expect_msg(&f, "bc", 2);
        assert_int_equal(ab_frame_pending(&f), 0);
        ab_frame_free(&f);
}

/* A long stream of messages fed in odd-sized chunks: every message comes out intact and in order. */
static void check_stream(size_t max, size_t count)
{
        static const size_t chunks[] = { 1, 2, 3, 7, 13, 64, 1000, 4096, 65536 };
        char *stream, *p;
        size_t total = 0;

        for (size_t i = 0; i < count; i++)
                total += (i * 37) % (max + 1) + 1;
        stream = malloc(total);
        assert_non_null(stream);
        p = stream;
        for (size_t i = 0; i < count; i++) {
                size_t n = (i * 37) % (max + 1);
                for (size_t k = 0; k < n; k++)
                        *p++ = (char)('A' + (i + k) % 26);
                *p++ = '\0';
        }

        for (size_t c = 0; c < AB_ARRAY_SIZE(chunks); c++) {
                ab_frame f;
                size_t off = 0, seen = 0;

                ab_frame_init(&f, max);
                while (off < total) {
                        char *dst;
                        size_t avail, k;
                        const char *msg;
                        size_t len;
                        int r;

                        assert_int_equal(ab_frame_space(&f, &dst, &avail), 0);
                        k = AB_MIN(AB_MIN(avail, chunks[c]), total - off);
                        memcpy(dst, stream + off, k);
                        ab_frame_commit(&f, k);
                        off += k;
                        while ((r = ab_frame_next(&f, &msg, &len)) == 1) {
                                size_t want = (seen * 37) % (max + 1);
                                assert_int_equal(len, want);
                                for (size_t i = 0; i < len; i++)
                                        assert_int_equal(msg[i], (char)('A' + (seen + i) % 26));
                                seen++;
                        }
                        assert_int_equal(r, 0);
                }
                assert_int_equal(seen, count);
                assert_int_equal(ab_frame_pending(&f), 0);
                /* the buffer never holds more than one maximal message plus a read */
                assert_true(f.cap <= AB_MAX(4096u, max + 1));
                ab_frame_free(&f);
        }
        free(stream);
}

static void test_stream_many_messages(void **state)
{
        check_stream(300, 2000);  /* fits the minimal allocation */
        check_stream(5000, 200);  /* messages longer than the minimal allocation */
}

/* The allocation stays bounded by max + 1 (or the minimum allocation). */
static void test_growth_bounded(void **state)
{
        const size_t max = 20000;
        char *m = make_msg(max);
        ab_frame f;

        ab_frame_init(&f, max);
        put(&f, m, max, SIZE_MAX);
        assert_true(f.cap >= max + 1);
        assert_true(f.cap <= max + 1);
        put(&f, "\0", 1, SIZE_MAX);
        expect_msg(&f, m, max);
        ab_frame_free(&f);
        free(m);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_init_free),
                cmocka_unit_test(test_one_byte_commits),
                cmocka_unit_test(test_unread),
                cmocka_unit_test(test_merged_messages),
                cmocka_unit_test(test_empty_message),
                cmocka_unit_test(test_max_small),
                cmocka_unit_test(test_max_large),
                cmocka_unit_test(test_max_then_more),
                cmocka_unit_test(test_full_buffer),
                cmocka_unit_test(test_interleaving),
                cmocka_unit_test(test_pending_accounting),
                cmocka_unit_test(test_stream_many_messages),
                cmocka_unit_test(test_growth_bounded),
        };
        return cmocka_run_group_tests_name("frame", tests, NULL, NULL);
}
