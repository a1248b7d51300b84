/*
 * weft CNI shim: the program a container runtime executes as the "weft" CNI plugin.
 *
 * A Python plugin process pays the interpreter's start-up (~10-35 ms) on every call, and runtimes
 * call a plugin several times per container. This shim starts in well under a millisecond: it
 * reads stdin, and hands the environment, stdin, its stderr and (ADD, CHECK) the opened CNI_NETNS
 * to the weft router over a unix socket in one request. The router runs the very same plugin logic
 * (weft.cni.plugin.invoke) in-process and answers with the stdout bytes and the exit status, which
 * the shim prints and returns.
 *
 * When the router cannot be asked (socket missing or refused, or it closes before acknowledging
 * the request) the shim executes the Python plugin with the same environment and the same stdin
 * bytes (through a memfd), so "router down" behaves exactly as with the Python plugin (ADD: 11,
 * DEL: spooled and successful). When the router acknowledged the request but then closed, sent
 * garbage or did not answer in time, the Python plugin runs with WEFT_CNI_NO_ANSWER set and treats
 * every router request as unanswered (ADD: 11, DEL: spooled), as it would itself.
 *
 * Wire format (all integers big-endian u32), on the router's CNI socket (default
 * /run/weft/cni.sock, next to its API socket; root only):
 *   request:  "WCNI" flags netns_errno env_len stdin_len, env ("K=V\0"...), stdin
 *             SCM_RIGHTS with the header: stderr (flags & 1), then the netns fd (flags & 2);
 *             flags & 4: opening CNI_NETNS failed with netns_errno.
 *   answer:   "A" once the whole request is read, then "WCNR" exit_status stdout_len, stdout;
 *             or "P": declined (it needs our view of the filesystem), run the Python plugin.
 *
 * Compile-time settings (weft setup-cni passes them with -D): WEFT_CNI_SOCKET, WEFT_PYTHON,
 * WEFT_PYTHON_CODE (the fallback's "-c" program), WEFT_ANSWER_TIMEOUT (seconds).
 * Only libc; builds with cc -O2 [-static].
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef WEFT_CNI_SOCKET
#define WEFT_CNI_SOCKET "/run/weft/cni.sock"
#endif
#ifndef WEFT_PYTHON
#define WEFT_PYTHON "/usr/bin/python3"
#endif
#ifndef WEFT_PYTHON_CODE
#define WEFT_PYTHON_CODE "import sys\nfrom weft.cni.plugin import main\nsys.exit(main())\n"
#endif
#ifndef WEFT_ANSWER_TIMEOUT
#define WEFT_ANSWER_TIMEOUT 240
#endif

#define FLAG_STDERR 1u
#define FLAG_NETNS 2u
#define FLAG_NETNS_ERRNO 4u
#define MAX_ANSWER (64u << 20)

extern char **environ;

static unsigned char *in_buf;
static size_t in_len;

static const char *socket_path(void) { return WEFT_CNI_SOCKET; }

/* Run the Python plugin in our place; stdin is fed back from in_buf when `replay`. */
static void fallback(int replay, const char *no_answer) {
    if (replay) {
        int fd = memfd_create("weft-cni-stdin", MFD_CLOEXEC);
        if (fd >= 0) {
            size_t off = 0;
            while (off < in_len) {
                ssize_t n = write(fd, in_buf + off, in_len - off);
                if (n < 0 && errno == EINTR) continue;
                if (n <= 0) break;
                off += (size_t)n;
            }
            if (off != in_len || lseek(fd, 0, SEEK_SET) != 0) {
                close(fd);
                fd = -1;
            }
        }
        if (fd < 0) { /* no memfd: a pipe, written by a child (stdin may exceed its buffer) */
            int p[2];
            if (pipe(p) == 0) {
                pid_t pid = fork();
                if (pid == 0) {
                    close(p[0]);
                    size_t off = 0;
                    while (off < in_len) {
                        ssize_t n = write(p[1], in_buf + off, in_len - off);
                        if (n < 0 && errno == EINTR) continue;
                        if (n <= 0) break;
                        off += (size_t)n;
                    }
                    _exit(0);
                }
                close(p[1]);
                fd = p[0];
            }
        }
        if (fd >= 0) {
            dup2(fd, 0);
            if (fd != 0) close(fd);
        }
    }
    if (no_answer) {
        char value[512];
        snprintf(value, sizeof value, "%s: %s", socket_path(), no_answer);
        setenv("WEFT_CNI_NO_ANSWER", value, 1);
    }
    char *argv[] = {WEFT_PYTHON, "-IS", "-c", WEFT_PYTHON_CODE, NULL};
    execv(WEFT_PYTHON, argv);
    int err = errno;
    printf("{\"cniVersion\": \"1.1.0\", \"code\": 11, \"msg\": \"weft router not reachable and "
           "the Python plugin cannot start\", \"details\": \"%s: %s\"}\n",
           WEFT_PYTHON, strerror(err));
    exit(1);
}

static int read_stdin(void) {
    size_t cap = 65536;
    in_buf = malloc(cap);
    if (!in_buf) return -1;
    for (;;) {
        if (in_len == cap) {
            unsigned char *bigger = realloc(in_buf, cap * 2);
            if (!bigger) return -1;
            in_buf = bigger;
            cap *= 2;
        }
        ssize_t n = read(0, in_buf + in_len, cap - in_len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        if (n == 0) return 0;
        in_len += (size_t)n;
    }
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static uint32_t get32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int send_all(int sock, const void *data, size_t len) {
    const unsigned char *p = data;
    while (len) {
        ssize_t n = send(sock, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Read exactly len bytes before the deadline: 0; -1 timeout or cut short; -2 closed or reset
 * before the first byte (for the acknowledgement: the router did not take the request). */
static int recv_all(int sock, unsigned char *buf, size_t len, long long deadline) {
    size_t got = 0;
    while (got < len) {
        long long left = deadline - now_ms();
        if (left <= 0) return -1;
        struct pollfd pfd = {.fd = sock, .events = POLLIN};
        int r = poll(&pfd, 1, left > 60000 ? 60000 : (int)left);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return got == 0 ? -2 : -1;
        if (r == 0) continue;
        ssize_t n = recv(sock, buf + got, len - got, 0);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) return got == 0 ? -2 : -1; /* EOF, or ECONNRESET: closed with our data unread */
        got += (size_t)n;
    }
    return 0;
}

int main(void) {
    const char *command = getenv("CNI_COMMAND");
    if ((!command || !*command) && isatty(0)) fallback(0, NULL); /* a human: the usage text */
    if (read_stdin() != 0) fallback(0, NULL); /* Python reports the read error (code 5) */

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    const char *path = socket_path();
    if (sock < 0 || strlen(path) >= sizeof addr.sun_path) fallback(1, NULL);
    memcpy(addr.sun_path, path, strlen(path) + 1);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0) fallback(1, NULL);

    size_t env_len = 0;
    for (char **e = environ; *e; e++) env_len += strlen(*e) + 1;
    unsigned char *env_block = malloc(env_len ? env_len : 1);
    if (!env_block) fallback(1, NULL);
    size_t off = 0;
    for (char **e = environ; *e; e++) {
        size_t n = strlen(*e) + 1;
        memcpy(env_block + off, *e, n);
        off += n;
    }

    uint32_t flags = 0, netns_errno = 0;
    int fds[2], nfds = 0;
    if (fcntl(2, F_GETFD) >= 0) {
        flags |= FLAG_STDERR;
        fds[nfds++] = 2;
    }
    const char *netns = getenv("CNI_NETNS");
    if (command && netns && *netns && (!strcmp(command, "ADD") || !strcmp(command, "CHECK"))) {
        int fd = open(netns, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            flags |= FLAG_NETNS;
            fds[nfds++] = fd;
        } else {
            flags |= FLAG_NETNS_ERRNO;
            netns_errno = (uint32_t)errno;
        }
    }

    unsigned char header[20];
    memcpy(header, "WCNI", 4);
    put32(header + 4, flags);
    put32(header + 8, netns_errno);
    put32(header + 12, (uint32_t)env_len);
    put32(header + 16, (uint32_t)in_len);
    struct iovec iov = {.iov_base = header, .iov_len = sizeof header};
    union {
        char buf[CMSG_SPACE(sizeof(int) * 2)];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds) {
        memset(&control, 0, sizeof control);
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t sent;
    do sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent < 0) fallback(1, NULL);
    if ((size_t)sent < sizeof header && send_all(sock, header + sent, sizeof header - (size_t)sent))
        fallback(1, NULL);
    if (send_all(sock, env_block, env_len) || send_all(sock, in_buf, in_len)) fallback(1, NULL);
    if (flags & FLAG_NETNS) close(fds[nfds - 1]);

    long long deadline = now_ms() + (long long)WEFT_ANSWER_TIMEOUT * 1000;
    unsigned char ack, answer[12];
    int r = recv_all(sock, &ack, 1, deadline);
    if (r == -2) fallback(1, NULL); /* closed (or reset) before taking the request */
    if (r == 0 && ack == 'P') fallback(1, NULL); /* declined: run it here */
    if (r != 0 || ack != 'A') fallback(1, r == 0 ? "bad acknowledgement" : "timed out");
    if (recv_all(sock, answer, sizeof answer, deadline) != 0 || memcmp(answer, "WCNR", 4) != 0)
        fallback(1, "closed without an answer");
    uint32_t status = get32(answer + 4), out_len = get32(answer + 8);
    if (out_len > MAX_ANSWER) fallback(1, "answer too long");
    unsigned char *out = malloc(out_len ? out_len : 1);
    if (!out) fallback(1, "out of memory");
    if (recv_all(sock, out, out_len, deadline) != 0) fallback(1, "closed without an answer");
    close(sock);
    for (size_t done = 0; done < out_len;) {
        ssize_t n = write(1, out + done, out_len - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return 1;
        done += (size_t)n;
    }
    return (int)(status & 0xff);
}
