/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "frame.h"
#include "util.h"

#define FRAME_MIN_ALLOC 4096

void ab_frame_init(ab_frame *f, size_t max)
{
        *f = (ab_frame){ .max = max };
}

void ab_frame_free(ab_frame *f)
{
        free(f->buf);
        *f = (ab_frame){ .max = f->max };
}

void ab_frame_unread(ab_frame *f)
{
        /* after the last message the frame was emptied (head = len = 0), its bytes still in place */
        if (f->len < f->last_end)
                f->len = f->last_end;
        f->head = f->last_head;
        f->scan = 0;
}

size_t ab_frame_pending(const ab_frame *f)
{
        return f->len - f->head;
}

int ab_frame_space(ab_frame *f, char **ret_ptr, size_t *ret_avail)
{
        size_t want;

        if (f->head > 0) { /* drop consumed messages */
                memmove(f->buf, f->buf + f->head, f->len - f->head);
                f->len -= f->head;
                f->head = 0;
        }
        /* Room for one whole maximal message and its NUL, at least. */
        want = f->max + 1;
        if (f->cap < FRAME_MIN_ALLOC || (f->len == f->cap && f->cap < want)) {
                size_t ncap = f->cap ? f->cap * 2 : FRAME_MIN_ALLOC;
                char *n;
                if (ncap > want)
                        ncap = want;
                if (ncap < FRAME_MIN_ALLOC)
                        ncap = FRAME_MIN_ALLOC;
                if (ncap <= f->cap)
                        return -ENOMEM;
                n = realloc(f->buf, ncap);
                if (!n)
                        return -ENOMEM;
                f->buf = n;
                f->cap = ncap;
        }
        if (f->len == f->cap)
                return -ENOBUFS; /* caller checks ab_frame_next first */
        *ret_ptr = f->buf + f->len;
        *ret_avail = f->cap - f->len;
        return 0;
}

void ab_frame_commit(ab_frame *f, size_t n)
{
        f->len += n;
}

int ab_frame_next(ab_frame *f, const char **ret_msg, size_t *ret_len)
{
        size_t avail = f->len - f->head - f->scan;
        char *start = f->buf + f->head;
        char *nul;

        if (avail == 0)
                goto incomplete;
        nul = memchr(start + f->scan, '\0', avail);
        if (!nul) {
                f->scan += avail;
                goto incomplete;
        }
        if ((size_t)(nul - start) > f->max)
                return AB_ERR_TOO_LARGE;
        *ret_msg = start;
        *ret_len = (size_t)(nul - start);
        f->last_head = f->head;
        f->last_end = f->head + *ret_len + 1;
        f->head += *ret_len + 1;
        f->scan = 0;
        if (f->head == f->len)
                f->head = f->len = 0;
        return 1;
incomplete:
        if (f->scan > f->max)
                return AB_ERR_TOO_LARGE;
        return 0;
}
