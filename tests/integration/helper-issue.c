/* SPDX-License-Identifier: MIT */
/*
 * helper-issue SOCKET AUDIENCE SCOPE [SCOPE...]: ask the broker for a
 * token as this program (an executable whose SHA-256 differs from the
 * CLI's and the test's). Prints "OK TOKEN" and exits 0, or prints
 * "ERR NAME: MESSAGE" and exits 1 (denied or remote error), 3 unreachable,
 * 2 usage, 4 other.
 */
#include <stdio.h>
#include <stdlib.h>
#include "../../client/agentbroker.h"

int main(int argc, char **argv)
{
        ab_client *c = NULL;
        char *token = NULL;
        int r;

        if (argc < 4) {
                fprintf(stderr, "usage: %s SOCKET AUDIENCE SCOPE [SCOPE...]\n", argv[0]);
                return 2;
        }
        r = ab_client_connect(argv[1], 5000, &c);
        if (r < 0) {
                printf("ERR connect: %s\n", ab_strerror(r));
                return 3;
        }
        r = ab_issue_token(c, argv[2], (const char *const *)argv + 3, (size_t)(argc - 3), 0, NULL, &token);
        if (r == 0) {
                printf("OK %s\n", token);
                ab_token_free(token);
                ab_client_free(c);
                return 0;
        }
        printf("ERR %s: %s\n", ab_client_error_name(c), ab_client_error_message(c));
        ab_client_free(c);
        return r == AB_ERR_DENIED || r == AB_ERR_REMOTE ? 1 : 4;
}
