/* SPDX-License-Identifier: MIT */
/*
 * helper-agent SOCKET: a long-lived agent process driven through a pipe,
 * so that one process (one pid and start time, so one broker session)
 * makes many calls while the test does other things in between (restarts
 * the broker, sleeps, acts as another uid).
 *
 * It prints "READY PID" once, then reads commands, one a line, on stdin:
 *
 *   call METHOD JSON     open a new connection to SOCKET, send
 *                        {"method": METHOD, "parameters": JSON}, print the
 *                        reply object on one line (or "ERR what")
 *   exec PATH [ARG...]   replace this process image (same pid and start
 *                        time, another executable)
 *   grow MB              map MB more of (untouched) address space: the
 *                        process's virtual size changes, nothing else; "OK"
 *   env NAME             print "ENV " and the variable's value (or "ERR unset")
 *   quit                 exit 0
 *
 * Every call uses a fresh connection on purpose: the session belongs to
 * the process, not to a connection. Exits 0 at EOF.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define LINE_MAX_LEN (64 * 1024)
#define REPLY_MAX (1024 * 1024)
#define IO_TIMEOUT_MS 10000

static int connect_to(const char *path)
{
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int fd;

        if (strlen(path) >= sizeof sa.sun_path)
                return -ENAMETOOLONG;
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        memcpy(sa.sun_path, path, strlen(path) + 1);
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
                int r = -errno;
                close(fd);
                return r;
        }
        return fd;
}

static int send_all(int fd, const char *p, size_t n)
{
        while (n > 0) {
                ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
                if (w < 0 && errno == EINTR)
                        continue;
                if (w < 0)
                        return -errno;
                p += w;
                n -= (size_t)w;
        }
        return 0;
}

/* Read up to the first NUL into a malloc'd string. */
static int recv_msg(int fd, char **ret)
{
        size_t len = 0, cap = 8192;
        char *buf = malloc(cap);

        if (!buf)
                return -ENOMEM;
        for (;;) {
                struct pollfd pf = { .fd = fd, .events = POLLIN };
                ssize_t n;
                char *nul = memchr(buf, '\0', len);
                if (nul) {
                        *ret = buf;
                        return 0;
                }
                if (cap - len < 4096) {
                        char *nb;
                        if (cap >= REPLY_MAX) {
                                free(buf);
                                return -EMSGSIZE;
                        }
                        nb = realloc(buf, cap * 2);
                        if (!nb) {
                                free(buf);
                                return -ENOMEM;
                        }
                        buf = nb;
                        cap *= 2;
                }
                if (poll(&pf, 1, IO_TIMEOUT_MS) <= 0) {
                        free(buf);
                        return -ETIMEDOUT;
                }
                n = recv(fd, buf + len, cap - len, 0);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0) {
                        free(buf);
                        return n == 0 ? -ECONNRESET : -errno;
                }
                len += (size_t)n;
        }
}

static void do_call(const char *sock, char *args)
{
        char *sp = strchr(args, ' '), *msg = NULL, *reply = NULL;
        const char *params = "{}";
        size_t n;
        int fd, r;

        if (sp) {
                *sp = '\0';
                params = sp + 1;
        }
        n = strlen(args) + strlen(params) + 64;
        msg = malloc(n);
        if (!msg) {
                printf("ERR nomem\n");
                return;
        }
        snprintf(msg, n, "{\"method\":\"%s\",\"parameters\":%s}", args, params);
        fd = connect_to(sock);
        if (fd < 0) {
                printf("ERR connect %s\n", strerror(-fd));
                free(msg);
                return;
        }
        r = send_all(fd, msg, strlen(msg) + 1);
        free(msg);
        if (r == 0)
                r = recv_msg(fd, &reply);
        close(fd);
        if (r < 0) {
                printf("ERR io %s\n", strerror(-r));
                return;
        }
        for (char *p = reply; *p; p++)
                if (*p == '\n' || *p == '\r')
                        *p = ' ';
        printf("%s\n", reply);
        free(reply);
}

static void do_exec(char *args)
{
        char *argv[32];
        size_t n = 0;

        for (char *tok = strtok(args, " "); tok && n < 31; tok = strtok(NULL, " "))
                argv[n++] = tok;
        argv[n] = NULL;
        if (n == 0) {
                printf("ERR exec needs a path\n");
                return;
        }
        fflush(stdout);
        execv(argv[0], argv);
        printf("ERR exec %s\n", strerror(errno));
}

int main(int argc, char **argv)
{
        char *line = malloc(LINE_MAX_LEN);

        if (argc != 2 || !line) {
                fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
                return 2;
        }
        setvbuf(stdout, NULL, _IOLBF, 0);
        printf("READY %d\n", (int)getpid());
        while (fgets(line, LINE_MAX_LEN, stdin)) {
                line[strcspn(line, "\n")] = '\0';
                if (strncmp(line, "call ", 5) == 0)
                        do_call(argv[1], line + 5);
                else if (strncmp(line, "exec ", 5) == 0)
                        do_exec(line + 5);
                else if (strncmp(line, "grow ", 5) == 0) {
                        size_t mb = strtoul(line + 5, NULL, 10);
                        void *m = mmap(NULL, mb << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                        printf(m == MAP_FAILED ? "ERR mmap\n" : "OK\n");
                }
                else if (strncmp(line, "env ", 4) == 0) {
                        const char *v = getenv(line + 4);
                        if (v)
                                printf("ENV %s\n", v);
                        else
                                printf("ERR unset\n");
                }
                else if (strcmp(line, "quit") == 0)
                        break;
                else
                        printf("ERR unknown command\n");
                fflush(stdout);
        }
        free(line);
        return 0;
}
