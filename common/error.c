/* SPDX-License-Identifier: MIT */
#include <string.h>
#include "util.h"

const char *ab_strerror(int code)
{
        switch (code) {
        case AB_OK: return "success";
        case AB_ERR_DENIED: return "denied by the broker";
        case AB_ERR_UNREACHABLE: return "broker unreachable";
        case AB_ERR_TIMEOUT: return "timed out";
        case AB_ERR_PROTOCOL: return "protocol error";
        case AB_ERR_REMOTE: return "broker returned an error";
        case AB_ERR_INVALID: return "invalid argument";
        case AB_ERR_TOO_LARGE: return "input too large";
        case AB_ERR_CRYPTO: return "cryptographic failure";
        case AB_ERR_STORE: return "storage failure";
        case AB_ERR_POLICY: return "invalid policy";
        case AB_ERR_CLOSED: return "connection closed";
        default: break;
        }
        if (code < 0 && code > -4096) {
                /* strerrordesc_np is static and thread-safe (glibc >= 2.32). */
                const char *s = strerrordesc_np(-code);
                if (s)
                        return s;
        }
        return "unknown error";
}
