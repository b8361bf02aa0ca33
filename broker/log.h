/* SPDX-License-Identifier: MIT */
/*
 * Daemon logging: lines on stderr, with sd-daemon priority prefixes when
 * stderr is the journal (JOURNAL_STREAM set). Never a token or a key.
 */
#ifndef AB_LOG_H
#define AB_LOG_H

#include <syslog.h>

void ab_log_init(int max_priority);
void ab_log(int priority, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
