/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include "util.h"

static uint64_t clock_usec(clockid_t id)
{
        struct timespec ts;
        clock_gettime(id, &ts);
        return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t ab_now_usec(void) { return clock_usec(CLOCK_REALTIME); }
uint64_t ab_mono_usec(void) { return clock_usec(CLOCK_MONOTONIC); }

int ab_close(int fd)
{
        if (fd >= 0) {
                int saved = errno;
                close(fd);
                errno = saved;
        }
        return -1;
}

int ab_is_scope_token(const char *s, size_t len)
{
        if (len == 0)
                return 0;
        for (size_t i = 0; i < len; i++) {
                unsigned char c = (unsigned char)s[i];
                if (c < 0x21 || c > 0x7e || c == '"' || c == '\\')
                        return 0;
        }
        return 1;
}

int ab_is_printable(const char *s, size_t max)
{
        size_t i;
        for (i = 0; s[i]; i++) {
                if (i >= max)
                        return 0;
                if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
                        return 0;
        }
        return i > 0;
}

size_t ab_control_len(const char *s)
{
        const unsigned char *p = (const unsigned char *)s;

        if (p[0] < 0x20 || p[0] == 0x7f)
                return p[0] ? 1 : 0;
        if (p[0] == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f)
                return 2;
        if (p[0] == 0xd8 && p[1] == 0x9c) /* U+061C ARABIC LETTER MARK, a bidi control */
                return 2;
        if (p[0] == 0xe2 && p[1] == 0x80 && ((p[2] >= 0x8e && p[2] <= 0x8f) || (p[2] >= 0xaa && p[2] <= 0xae)))
                return 3;
        if (p[0] == 0xe2 && p[1] == 0x81 && p[2] >= 0xa6 && p[2] <= 0xa9)
                return 3;
        return 0;
}

ssize_t ab_read_line(FILE *f, char *buf, size_t max, size_t *ret_kept)
{
        size_t kept = 0;
        ssize_t took = 0;
        int c;

        while ((c = getc_unlocked(f)) != EOF) {
                took++;
                if (kept < max)
                        buf[kept++] = (char)c;
                if (c == '\n')
                        break;
        }
        if (c == EOF && ferror(f))
                return errno ? -errno : -EIO;
        *ret_kept = kept;
        return took;
}

void ab_defang(char *s)
{
        while (*s) {
                size_t n = ab_control_len(s);
                if (n == 0) {
                        s++;
                        continue;
                }
                memset(s, '?', n);
                s += n;
        }
}

size_t ab_utf8_cut(const char *s, size_t len, size_t max)
{
        size_t n = len;

        if (n > max)
                for (n = max; n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80; n--)
                        ;
        return n;
}
