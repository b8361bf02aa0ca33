/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include "worker.h"
#include "../common/util.h"

struct ab_worker {
        pthread_t thread;
        pthread_mutex_t lock;
        pthread_cond_t cond;
        ab_job *todo, **todo_tail; /* submitted, not yet run */
        ab_job *done, **done_tail; /* run, done() not yet called */
        bool stop;
        bool running;              /* a job's run() is under way */
        pthread_cond_t idle;       /* signalled when todo is empty and nothing runs */
        int efd;
        sd_event_source *src;
};

static void *worker_main(void *userdata)
{
        ab_worker *w = userdata;

        pthread_mutex_lock(&w->lock);
        for (;;) {
                ab_job *j;
                bool wake;

                while (!w->todo && !w->stop) {
                        pthread_cond_broadcast(&w->idle);
                        pthread_cond_wait(&w->cond, &w->lock);
                }
                if (!w->todo)
                        break; /* stopping, and nothing left */
                j = w->todo;
                w->todo = j->next;
                if (!w->todo)
                        w->todo_tail = &w->todo;
                w->running = true;
                pthread_mutex_unlock(&w->lock);

                j->run(j);

                pthread_mutex_lock(&w->lock);
                w->running = false;
                j->next = NULL;
                wake = !w->done;
                *w->done_tail = j;
                w->done_tail = &j->next;
                if (wake) {
                        uint64_t one = 1;
                        (void)!write(w->efd, &one, sizeof one); /* a full counter still wakes */
                }
        }
        pthread_mutex_unlock(&w->lock);
        return NULL;
}

/* Call done() of every finished job, in order. */
static void run_done(ab_worker *w)
{
        ab_job *j, *next;

        pthread_mutex_lock(&w->lock);
        j = w->done;
        w->done = NULL;
        w->done_tail = &w->done;
        pthread_mutex_unlock(&w->lock);
        for (; j; j = next) {
                next = j->next;
                j->done(j);
        }
}

static int on_event(sd_event_source *s, int fd, uint32_t revents, void *userdata)
{
        uint64_t n;

        (void)s;
        (void)revents;
        (void)!read(fd, &n, sizeof n);
        run_done(userdata);
        return 0;
}

/* Free what ab_worker_new made (the thread not running, or joined). */
static void worker_destroy(ab_worker *w)
{
        sd_event_source_disable_unref(w->src);
        ab_close(w->efd);
        pthread_cond_destroy(&w->cond);
        pthread_cond_destroy(&w->idle);
        pthread_mutex_destroy(&w->lock);
        free(w);
}

int ab_worker_new(sd_event *e, const char *name, ab_worker **ret)
{
        ab_worker *w = calloc(1, sizeof *w);
        sigset_t all, old;
        int r;

        if (!w)
                return -ENOMEM;
        w->todo_tail = &w->todo;
        w->done_tail = &w->done;
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->cond, NULL);
        pthread_cond_init(&w->idle, NULL);
        w->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (w->efd < 0) {
                r = -errno;
                worker_destroy(w);
                return r;
        }
        r = sd_event_add_io(e, &w->src, w->efd, EPOLLIN, on_event, w);
        if (r < 0) {
                worker_destroy(w);
                return r;
        }
        /* the loop takes signals through signalfd: the thread must never get one */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        r = -pthread_create(&w->thread, NULL, worker_main, w);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (r < 0) {
                worker_destroy(w);
                return r;
        }
        if (name)
                (void)pthread_setname_np(w->thread, name);
        *ret = w;
        return 0;
}

void ab_worker_submit(ab_worker *w, ab_job *j)
{
        j->next = NULL;
        pthread_mutex_lock(&w->lock);
        *w->todo_tail = j;
        w->todo_tail = &j->next;
        pthread_cond_signal(&w->cond);
        pthread_mutex_unlock(&w->lock);
}

/* Block until every submitted job has run (their done() may still be pending). */
static void wait_idle(ab_worker *w)
{
        pthread_mutex_lock(&w->lock);
        while (w->todo || w->running)
                pthread_cond_wait(&w->idle, &w->lock);
        pthread_mutex_unlock(&w->lock);
}

void ab_worker_drain(ab_worker *w)
{
        wait_idle(w);
        run_done(w);
}

void ab_worker_free(ab_worker *w)
{
        if (!w)
                return;
        pthread_mutex_lock(&w->lock);
        w->stop = true;
        pthread_cond_signal(&w->cond);
        pthread_mutex_unlock(&w->lock);
        pthread_join(w->thread, NULL); /* it runs what was submitted first */
        run_done(w);
        worker_destroy(w);
}
