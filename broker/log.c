/* SPDX-License-Identifier: MIT */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include "log.h"

static int log_max = LOG_INFO;
static bool log_prefix;

void ab_log_init(int max_priority)
{
        log_max = max_priority;
        log_prefix = getenv("JOURNAL_STREAM") != NULL;
}

void ab_log(int priority, const char *fmt, ...)
{
        char line[1024];
        va_list ap;

        if (priority > log_max)
                return;
        va_start(ap, fmt);
        vsnprintf(line, sizeof line, fmt, ap);
        va_end(ap);
        if (log_prefix)
                fprintf(stderr, "<%d>%s\n", priority, line);
        else
                fprintf(stderr, "agent-brokerd: %s\n", line);
}
