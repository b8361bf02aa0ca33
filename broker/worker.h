/* SPDX-License-Identifier: MIT */
/*
 * A worker thread for the event loop: jobs run on it in the order they
 * were submitted, and each job's done() is called back in the event loop
 * thread (through an eventfd source), in the same order. The loop uses it
 * for work that blocks or burns CPU without touching the loop's state:
 * the audit trail's write + fdatasync, signatures.
 *
 * A job owns everything run() touches; the loop must not touch it
 * between ab_worker_submit() and done().
 */
#ifndef AB_WORKER_H
#define AB_WORKER_H

#include <systemd/sd-event.h>

typedef struct ab_job ab_job;
struct ab_job {
        void (*run)(ab_job *j);  /* on the worker thread */
        void (*done)(ab_job *j); /* in the event loop, after run() */
        ab_job *next;            /* the worker's */
};

typedef struct ab_worker ab_worker;

/* Start the thread (all signals blocked in it) and add its eventfd to e. 0 or -errno. */
int ab_worker_new(sd_event *e, const char *name, ab_worker **ret);
void ab_worker_submit(ab_worker *w, ab_job *j);
/* Block until every submitted job has run, then call the done() not yet called (in this thread). */
void ab_worker_drain(ab_worker *w);
/*
 * Wait for every submitted job, call the done() of those not yet called
 * (in this thread), stop the thread. Accepts NULL.
 */
void ab_worker_free(ab_worker *w);

#endif
