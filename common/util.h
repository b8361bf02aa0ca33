/* SPDX-License-Identifier: MIT */
/* Small helpers shared by every part of agent-broker. */
#ifndef AB_UTIL_H
#define AB_UTIL_H

#include <stddef.h>
#include <stdint.h>
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

#endif
