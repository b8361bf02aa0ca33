/* SPDX-License-Identifier: MIT */
/*
 * Varlink framing: messages are JSON texts, each ended by one NUL byte, on
 * a stream. ab_frame accumulates bytes as they arrive (split or merged
 * across reads) and hands out complete messages, with a hard maximum.
 */
#ifndef AB_FRAME_H
#define AB_FRAME_H

#include <stddef.h>

typedef struct ab_frame {
        char *buf;
        size_t len;  /* bytes held */
        size_t head; /* start of the first unconsumed message */
        size_t scan; /* bytes from head already known to hold no NUL */
        size_t cap;
        size_t max;  /* largest message, without its NUL */
        size_t last_head, last_end; /* where the message ab_frame_next returned last was (ab_frame_unread) */
} ab_frame;

/* Prepare an empty frame for messages up to max bytes. No allocation yet. */
void ab_frame_init(ab_frame *f, size_t max);

/* Free the buffer. Safe on an initialised or zeroed frame. */
void ab_frame_free(ab_frame *f);

/*
 * Room to read into: *ret_ptr, *ret_avail bytes (> 0). Compacts or grows
 * the buffer as needed, never beyond max + 1 bytes for one message plus
 * what is already held. Returns 0, -ENOMEM, or -ENOBUFS when the pending
 * message already fills max + 1 bytes (call ab_frame_next first: it
 * reports that case as AB_ERR_TOO_LARGE).
 */
int ab_frame_space(ab_frame *f, char **ret_ptr, size_t *ret_avail);

/* Record that n bytes were written at the pointer ab_frame_space gave. */
void ab_frame_commit(ab_frame *f, size_t n);

/*
 * The next complete message. Returns 1 with *ret_msg (NUL-terminated) and
 * *ret_len set, valid until the next call on f; 0 if no complete message
 * is buffered; AB_ERR_TOO_LARGE if the pending message already exceeds
 * max (the stream cannot be resynchronised: close it).
 */
int ab_frame_next(ab_frame *f, const char **ret_msg, size_t *ret_len);

/*
 * Put back the message ab_frame_next returned last, to be returned again
 * by the next call. Only before anything else is done with f (no read).
 */
void ab_frame_unread(ab_frame *f);

/* Bytes of an incomplete message held (0: idle between messages). */
size_t ab_frame_pending(const ab_frame *f);

#endif
