/* floor: the cheapest HTTP/1.1 upstream there can be, to measure the proxy hop.
 *
 *   cc -O2 -o floor bench/floor.c && ./floor /path/to/floor.sock [PROCESSES]
 *
 * One thread, one epoll set, edge-triggered; every complete request head
 * ("\r\n\r\n") in a read is answered with the same canned keep-alive response,
 * written with one write(2) per read. No parsing, no allocation after
 * accept, no clock. Bodies are not supported (GET only): bench/run.sh uses it
 * for GET /healthz, so that "nginx -> floor" is what nginx -> *any* upstream
 * can reach on this machine, the ceiling the healthz target is measured
 * against. Not a server for anything else.
 *
 * PROCESSES (default 1) > 1 forks after listen(2), each process with its own
 * epoll where the listener is EPOLLEXCLUSIVE: the cheapest prefork server,
 * to tell what N upstream processes cost the hop, apart from what a server
 * does per request.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static const char RESP[] =
    "HTTP/1.1 200 OK\r\n"
    "content-type: application/json\r\n"
    "content-length: 11\r\n"
    "\r\n"
    "{\"ok\":true}";

int main(int argc, char **argv) {
    /* A write to a connection nginx has closed must not kill the ceiling
     * mid-run (SIGPIPE's default): the write fails, the close follows. */
    signal(SIGPIPE, SIG_IGN);
    int procs = argc == 3 ? atoi(argv[2]) : 1;
    if (argc < 2 || argc > 3 || procs < 1 || procs > 64 ||
        strlen(argv[1]) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        fprintf(stderr, "usage: floor SOCKET_PATH [PROCESSES]\n");
        return 2;
    }
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strcpy(sa.sun_path, argv[1]);
    unlink(argv[1]);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 1024) < 0) {
        perror("floor: listen");
        return 1;
    }
    chmod(argv[1], 0666);
    /* PROCESSES > 1: prefork, each process with its own epoll where the
     * listener is exclusive (one idle process woken per connection), as
     * notesd's workers; they die with the first. */
    for (int p = 1; p < procs; p++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("floor: fork");
            return 1;
        }
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            break;
        }
    }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN | (procs > 1 ? EPOLLEXCLUSIVE : 0), .data.fd = lfd};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0) {
        perror("floor: epoll");
        return 1;
    }
    /* Bytes of an unfinished request head carried over per fd (a head split
     * across reads): only the last 3 are needed to find "\r\n\r\n". */
    static char tail[65536][3];
    static char buf[65536];
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0 && errno != EINTR) {
            perror("floor: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    if (c >= 65536) {
                        close(c);
                        continue;
                    }
                    memset(tail[c], 0, 3);
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLET | EPOLLRDHUP, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            for (;;) {
                ssize_t r = read(fd, buf + 3, sizeof buf - 3);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    close(fd);
                    break;
                }
                if (r < 0) {
                    break;
                }
                memcpy(buf, tail[fd], 3);
                int heads = 0;
                for (ssize_t k = 0; k + 3 < r + 3; k++) {
                    if (buf[k] == '\r' && buf[k + 1] == '\n' && buf[k + 2] == '\r' && buf[k + 3] == '\n') {
                        heads++;
                    }
                }
                memcpy(tail[fd], buf + r, 3);
                static char out[64 * sizeof RESP];
                size_t len = 0;
                for (int h = 0; h < heads; h++) {
                    if (len + sizeof RESP - 1 > sizeof out) {
                        if (write(fd, out, len) < 0) { /* peer gone: its close follows */ }
                        len = 0;
                    }
                    memcpy(out + len, RESP, sizeof RESP - 1);
                    len += sizeof RESP - 1;
                }
                if (len > 0 && write(fd, out, len) < 0) { /* peer gone: its close follows */ }
                if ((size_t)r < sizeof buf - 3) {
                    break; /* drained: edge-triggered epoll reports the next bytes */
                }
            }
        }
    }
}
