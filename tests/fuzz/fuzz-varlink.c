/* SPDX-License-Identifier: MIT */
/*
 * Fuzz target: varlink framing and request decoding. The input is a byte
 * stream as a client would send it, delivered in chunks whose sizes come
 * from the input itself, so split and merged reads are both exercised.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "../../common/frame.h"
#include "../../common/varlink.h"

#ifndef FUZZ_ENTRY
#define FUZZ_ENTRY LLVMFuzzerTestOneInput
#endif

int FUZZ_ENTRY(const uint8_t *data, size_t size);

int FUZZ_ENTRY(const uint8_t *data, size_t size)
{
        ab_frame f;
        size_t off = 0;
        unsigned step = size ? data[0] % 17 + 1 : 1;

        ab_frame_init(&f, 4096); /* small max: the too-large path is reached often */
        while (off < size) {
                char *p;
                size_t avail, n;
                const char *msg;
                size_t len;
                int r;

                if (ab_frame_space(&f, &p, &avail) < 0)
                        break;
                n = size - off < step ? size - off : step;
                if (n > avail)
                        n = avail;
                memcpy(p, data + off, n);
                ab_frame_commit(&f, n);
                off += n;
                while ((r = ab_frame_next(&f, &msg, &len)) == 1) {
                        ab_vl_call call;
                        char reason[256];
                        if (ab_vl_parse_call(msg, len, &call, reason, sizeof reason) == 0)
                                ab_vl_call_done(&call);
                }
                if (r < 0)
                        break; /* the daemon closes such a connection */
                step = step * 7 % 61 + 1;
        }
        ab_frame_free(&f);
        return 0;
}
