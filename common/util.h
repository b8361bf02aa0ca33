/* SPDX-License-Identifier: MIT */
/* Small helpers shared by every part of agent-broker. */
#ifndef AB_UTIL_H
#define AB_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>
#include <string.h>
#include "../client/agentbroker.h" /* the AB_ERR_* table is public ABI */

#define AB_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define AB_MIN(a, b) ((a) < (b) ? (a) : (b))
#define AB_MAX(a, b) ((a) > (b) ? (a) : (b))
#define AB_UNUSED __attribute__((unused))
#define AB_WUR __attribute__((warn_unused_result))

/* Wall clock and monotonic clock in microseconds. */
uint64_t ab_now_usec(void);
uint64_t ab_mono_usec(void);

/* Close fd if >= 0, preserving errno; returns -1 for "fd = ab_close(fd)". */
int ab_close(int fd);

/* true if s[0..len) is printable ASCII without spaces or quotes/backslash (RFC 6749 scope-token). */
int ab_is_scope_token(const char *s, size_t len);
/* true if s is printable UTF-8-free ASCII 0x20..0x7e, length 1..max. */
int ab_is_printable(const char *s, size_t max);
/* The length of s (len bytes of UTF-8) cut to at most max bytes, never inside a character. */
size_t ab_utf8_cut(const char *s, size_t len, size_t max);
/* The bytes of the character at s if it is one a terminal acts on (C0, DEL, C1 U+0080..U+009F in
 * UTF-8, a bidi control U+061C, U+200E/F, U+202A..E, U+2066..9), else 0. */
size_t ab_control_len(const char *s);
/* Each byte of such a character in s replaced by '?', in place: text from files for a terminal. */
void ab_defang(char *s);
/*
 * One line of f into buf (max bytes), its newline included; *ret_kept:
 * the bytes buf holds. Returns the bytes the line took in f (0 at the end
 * of the file), more than *ret_kept for a longer line, which is read to
 * its end without being kept whole; -errno if f cannot be read (never a
 * short end: a file read in part is no verdict on it).
 */
ssize_t ab_read_line(FILE *f, char *buf, size_t max, size_t *ret_kept);

/* A 64-bit number in 8 bytes, big-endian (LMDB keys and values sort and compare as numbers). */
static inline void put_be64(uint8_t *p, uint64_t v)
{
        for (int i = 7; i >= 0; i--, v >>= 8)
                p[i] = (uint8_t)v;
}

static inline uint64_t get_be64(const void *q)
{
        const uint8_t *p = q;
        uint64_t v = 0;
        for (int i = 0; i < 8; i++)
                v = v << 8 | p[i];
        return v;
}

#endif
