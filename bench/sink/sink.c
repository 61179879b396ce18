/*
 * bench/sink/sink.c: a small ESMTP sink for the client benchmarks.
 *
 * One process, one epoll loop, non-blocking sockets, OpenSSL for STARTTLS.
 * It speaks just enough ESMTP to take mail from a verifying, authenticating,
 * pipelining client as cheaply as possible, and counts what it accepts:
 *
 *   greeting, EHLO/HELO, STARTTLS (whatever was buffered behind the STARTTLS
 *   line is discarded), AUTH PLAIN (after TLS only, fixed user and password),
 *   MAIL, RCPT, DATA (end of data found with a byte automaton across reads;
 *   dot-stuffing needs no undoing since the body is thrown away), RSET, NOOP,
 *   QUIT. Replies to pipelined commands go out in order, batched per read.
 *
 * Usage: sink PORT CERT KEY USER PASSWORD [STATS_FILE]
 *   PORT 0 picks a free port; the first line on stdout is "port N".
 *   SIGUSR1 writes "seq=S accepted=A connections=C open=O cpu_user=U
 *   cpu_sys=Y" to STATS_FILE (atomically, via a temporary file and rename)
 *   and to stdout; SIGTERM or SIGINT does the same and exits, and so does
 *   the loss of the parent process (checked every second).
 *
 * Build: cc -O2 -Wall -o sink sink.c -lssl -lcrypto
 * A benchmark tool only: it listens on 127.0.0.1 and never stores anything.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define HOSTNAME "mx.test.example"
#define READ_CHUNK (64 * 1024)
#define MAX_LINE (8 * 1024)
#define MAX_EVENTS 256

enum state {
    S_COMMAND,   /* reading command lines */
    S_DATA,      /* inside DATA, looking for CRLF . CRLF */
    S_AUTH,      /* AUTH PLAIN sent without initial response: next line */
    S_TLS_WAIT,  /* 220 to STARTTLS queued, waiting for it to be written */
    S_HANDSHAKE, /* SSL_accept in progress */
    S_CLOSING    /* QUIT answered, close once the output is out */
};

struct conn {
    int fd;
    SSL *ssl;
    enum state state;
    int tls_done;
    int authed;
    int in_mail;
    int rcpts;
    int data_match; /* characters of "\r\n.\r\n" matched so far */
    char *in;       /* pending command bytes (never body bytes) */
    size_t in_len, in_cap;
    char *out; /* replies not yet written */
    size_t out_len, out_off, out_cap;
    int want_out; /* EPOLLOUT registered */
};

static int epfd;
static SSL_CTX *ctx;
static const char *auth_user, *auth_pass;
static const char *stats_path;
static uint64_t accepted, connections, open_conns, seq;
static volatile sig_atomic_t want_stats, want_exit;

static void on_signal(int sig)
{
    if (sig == SIGUSR1)
        want_stats = 1;
    else
        want_exit = 1;
}

static void report(void)
{
    struct rusage ru;
    char line[256];
    getrusage(RUSAGE_SELF, &ru);
    seq++;
    int n = snprintf(line, sizeof line,
                     "seq=%llu accepted=%llu connections=%llu open=%llu "
                     "cpu_user=%ld.%06ld cpu_sys=%ld.%06ld\n",
                     (unsigned long long)seq, (unsigned long long)accepted,
                     (unsigned long long)connections,
                     (unsigned long long)open_conns, (long)ru.ru_utime.tv_sec,
                     (long)ru.ru_utime.tv_usec, (long)ru.ru_stime.tv_sec,
                     (long)ru.ru_stime.tv_usec);
    fputs(line, stdout);
    fflush(stdout);
    if (stats_path != NULL) {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", stats_path);
        FILE *f = fopen(tmp, "w");
        if (f != NULL) {
            fwrite(line, 1, (size_t)n, f);
            fclose(f);
            rename(tmp, stats_path);
        }
    }
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n);
    if (q == NULL)
        die("realloc");
    return q;
}

static void set_events(struct conn *c, int want_out)
{
    if (c->want_out == want_out)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0),
                             .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl mod");
    c->want_out = want_out;
}

static void conn_close(struct conn *c)
{
    if (c->ssl != NULL) {
        if (c->tls_done)
            SSL_shutdown(c->ssl); /* one close_notify, not waited for */
        SSL_free(c->ssl);
    }
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
    open_conns--;
}

static void reply(struct conn *c, const char *text)
{
    size_t n = strlen(text);
    if (c->out_len + n > c->out_cap) {
        c->out_cap = (c->out_len + n) * 2;
        c->out = xrealloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, text, n);
    c->out_len += n;
}

/* Write what is pending. Returns -1 when the connection must be closed. */
static int flush_out(struct conn *c)
{
    while (c->out_off < c->out_len) {
        size_t left = c->out_len - c->out_off;
        if (c->ssl != NULL && c->tls_done) {
            int n = SSL_write(c->ssl, c->out + c->out_off, (int)left);
            if (n <= 0) {
                int err = SSL_get_error(c->ssl, n);
                if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) {
                    set_events(c, 1);
                    return 0;
                }
                return -1;
            }
            c->out_off += (size_t)n;
        } else {
            ssize_t n = write(c->fd, c->out + c->out_off, left);
            if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    set_events(c, 1);
                    return 0;
                }
                if (errno == EINTR)
                    continue;
                return -1;
            }
            c->out_off += (size_t)n;
        }
    }
    c->out_len = c->out_off = 0;
    set_events(c, 0);
    return 0;
}

/* base64 decode of a NUL-terminated string; returns length or -1. */
static int b64decode(const char *src, unsigned char *dst, size_t dst_cap)
{
    size_t n = strlen(src);
    if (n == 0 || n % 4 != 0 || n / 4 * 3 > dst_cap)
        return -1;
    int len = EVP_DecodeBlock(dst, (const unsigned char *)src, (int)n);
    if (len < 0)
        return -1;
    if (src[n - 1] == '=')
        len--;
    if (src[n - 2] == '=')
        len--;
    return len;
}

static void check_plain(struct conn *c, const char *b64)
{
    unsigned char buf[1024];
    int n = b64decode(b64, buf, sizeof buf);
    /* authzid NUL authcid NUL password */
    if (n > 0) {
        unsigned char *first = memchr(buf, 0, (size_t)n);
        if (first != NULL) {
            unsigned char *user = first + 1;
            size_t rest = (size_t)n - (size_t)(user - buf);
            unsigned char *second = memchr(user, 0, rest);
            if (second != NULL) {
                unsigned char *pass = second + 1;
                size_t user_len = (size_t)(second - user);
                size_t pass_len = (size_t)n - (size_t)(pass - buf);
                if (user_len == strlen(auth_user) &&
                    memcmp(user, auth_user, user_len) == 0 &&
                    pass_len == strlen(auth_pass) &&
                    memcmp(pass, auth_pass, pass_len) == 0) {
                    c->authed = 1;
                    reply(c, "235 2.7.0 Authentication successful\r\n");
                    return;
                }
            }
        }
    }
    reply(c, "535 5.7.8 Authentication credentials invalid\r\n");
}

static int verb_is(const char *line, size_t len, const char *verb)
{
    size_t n = strlen(verb);
    return len >= n && strncasecmp(line, verb, n) == 0 &&
           (len == n || line[n] == ' ' || line[n] == ':');
}

/* One command line (CRLF stripped, NUL-terminated). Returns 1 to stop
 * processing the rest of the input buffer (STARTTLS, QUIT). */
static int command(struct conn *c, char *line, size_t len)
{
    if (c->state == S_AUTH) {
        c->state = S_COMMAND;
        if (len == 1 && line[0] == '*')
            reply(c, "501 5.7.0 Authentication cancelled\r\n");
        else
            check_plain(c, line);
        return 0;
    }
    if (verb_is(line, len, "EHLO")) {
        c->in_mail = 0;
        c->rcpts = 0;
        if (c->tls_done)
            reply(c, "250-" HOSTNAME "\r\n250-PIPELINING\r\n"
                     "250-SIZE 1073741824\r\n250-8BITMIME\r\n"
                     "250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN\r\n");
        else
            reply(c, "250-" HOSTNAME "\r\n250-PIPELINING\r\n"
                     "250-SIZE 1073741824\r\n250-8BITMIME\r\n"
                     "250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n");
    } else if (verb_is(line, len, "HELO")) {
        c->in_mail = 0;
        c->rcpts = 0;
        reply(c, "250 " HOSTNAME "\r\n");
    } else if (verb_is(line, len, "STARTTLS")) {
        if (c->tls_done) {
            reply(c, "503 5.5.1 TLS already active\r\n");
            return 0;
        }
        reply(c, "220 2.0.0 Ready to start TLS\r\n");
        c->state = S_TLS_WAIT;
        c->in_len = 0; /* RFC 3207: nothing sent before TLS survives it */
        return 1;
    } else if (verb_is(line, len, "AUTH")) {
        if (!c->tls_done)
            reply(c, "538 5.7.11 Encryption required for requested "
                     "authentication mechanism\r\n");
        else if (c->authed)
            reply(c, "503 5.5.1 Already authenticated\r\n");
        else if (len >= 10 && strncasecmp(line + 5, "PLAIN ", 6) == 0)
            check_plain(c, line + 11);
        else if (len == 10 && strncasecmp(line + 5, "PLAIN", 5) == 0) {
            c->state = S_AUTH;
            reply(c, "334 \r\n");
        } else
            reply(c, "504 5.5.4 Unrecognized authentication type\r\n");
    } else if (verb_is(line, len, "MAIL")) {
        if (!c->authed)
            reply(c, "530 5.7.0 Authentication required\r\n");
        else if (c->in_mail)
            reply(c, "503 5.5.1 Nested MAIL command\r\n");
        else {
            c->in_mail = 1;
            c->rcpts = 0;
            reply(c, "250 2.1.0 Ok\r\n");
        }
    } else if (verb_is(line, len, "RCPT")) {
        if (!c->in_mail)
            reply(c, "503 5.5.1 Need MAIL command\r\n");
        else {
            c->rcpts++;
            reply(c, "250 2.1.5 Ok\r\n");
        }
    } else if (verb_is(line, len, "DATA")) {
        if (!c->in_mail || c->rcpts == 0)
            reply(c, "554 5.5.1 No valid recipients\r\n");
        else {
            c->state = S_DATA;
            c->data_match = 2; /* the DATA line's CRLF starts the terminator */
            reply(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
        }
    } else if (verb_is(line, len, "RSET")) {
        c->in_mail = 0;
        c->rcpts = 0;
        reply(c, "250 2.0.0 Ok\r\n");
    } else if (verb_is(line, len, "NOOP")) {
        reply(c, "250 2.0.0 Ok\r\n");
    } else if (verb_is(line, len, "QUIT")) {
        reply(c, "221 2.0.0 Bye\r\n");
        c->state = S_CLOSING;
        c->in_len = 0;
        return 1;
    } else {
        reply(c, "500 5.5.2 Error: command not recognized\r\n");
    }
    return 0;
}

/* Scan body bytes; returns how many were consumed (all, or up to and
 * including the terminator, after which the state is back to commands). */
static size_t scan_data(struct conn *c, const char *p, size_t n)
{
    static const char term[] = "\r\n.\r\n";
    int m = c->data_match;
    size_t i = 0;
    while (i < n) {
        if (m == 0) {
            const char *cr = memchr(p + i, '\r', n - i);
            if (cr == NULL)
                return n;
            i = (size_t)(cr - p) + 1;
            m = 1;
            continue;
        }
        char ch = p[i++];
        if (ch == term[m]) {
            if (++m == 5) {
                c->state = S_COMMAND;
                c->in_mail = 0;
                c->rcpts = 0;
                c->data_match = 0;
                accepted++;
                reply(c, "250 2.0.0 Ok: queued\r\n");
                return i;
            }
        } else {
            m = ch == '\r' ? 1 : 0;
        }
    }
    c->data_match = m;
    return n;
}

/* Consume freshly read bytes. Returns 1 when reading must stop (TLS about to
 * start or closing), -1 on a protocol error that ends the connection. */
static int consume(struct conn *c, const char *p, size_t n)
{
    while (n > 0) {
        if (c->state == S_TLS_WAIT || c->state == S_CLOSING)
            return 1;
        if (c->state == S_DATA) {
            size_t used = scan_data(c, p, n);
            p += used;
            n -= used;
            continue;
        }
        /* Command mode: append to the line buffer, then take whole lines. */
        const char *nl = memchr(p, '\n', n);
        size_t take = nl != NULL ? (size_t)(nl - p) + 1 : n;
        if (c->in_len + take + 1 > c->in_cap) {
            c->in_cap = (c->in_len + take + 1) * 2;
            c->in = xrealloc(c->in, c->in_cap);
        }
        memcpy(c->in + c->in_len, p, take);
        c->in_len += take;
        p += take;
        n -= take;
        if (nl == NULL) {
            if (c->in_len > MAX_LINE)
                return -1;
            break;
        }
        size_t len = c->in_len - 1;
        if (len > 0 && c->in[len - 1] == '\r')
            len--;
        c->in[len] = '\0';
        c->in_len = 0;
        if (command(c, c->in, len))
            return 1;
    }
    return 0;
}

static void start_handshake(struct conn *c);

/* Read everything available (plain or TLS) and act on it. */
static void on_readable(struct conn *c)
{
    static char buf[READ_CHUNK];
    for (;;) {
        if (c->state == S_TLS_WAIT || c->state == S_CLOSING ||
            c->state == S_HANDSHAKE)
            break;
        ssize_t n;
        if (c->ssl != NULL) {
            int r = SSL_read(c->ssl, buf, sizeof buf);
            if (r <= 0) {
                int err = SSL_get_error(c->ssl, r);
                if (err == SSL_ERROR_WANT_READ)
                    break;
                if (err == SSL_ERROR_WANT_WRITE) {
                    set_events(c, 1);
                    break;
                }
                ERR_clear_error();
                conn_close(c);
                return;
            }
            n = r;
        } else {
            n = read(c->fd, buf, sizeof buf);
            if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                if (errno == EINTR)
                    continue;
                conn_close(c);
                return;
            }
            if (n == 0) {
                conn_close(c);
                return;
            }
        }
        if (consume(c, buf, (size_t)n) < 0) {
            conn_close(c);
            return;
        }
    }
    if (flush_out(c) < 0) {
        conn_close(c);
        return;
    }
    if (c->out_len == 0) {
        if (c->state == S_CLOSING) {
            conn_close(c);
            return;
        }
        if (c->state == S_TLS_WAIT)
            start_handshake(c);
    }
}

static void continue_handshake(struct conn *c)
{
    int r = SSL_accept(c->ssl);
    if (r == 1) {
        c->tls_done = 1;
        c->state = S_COMMAND;
        c->in_mail = 0;
        c->rcpts = 0;
        set_events(c, 0);
        /* The client's EHLO may already sit in OpenSSL's buffer. */
        on_readable(c);
        return;
    }
    int err = SSL_get_error(c->ssl, r);
    if (err == SSL_ERROR_WANT_READ)
        set_events(c, 0);
    else if (err == SSL_ERROR_WANT_WRITE)
        set_events(c, 1);
    else {
        ERR_clear_error();
        conn_close(c);
    }
}

static void start_handshake(struct conn *c)
{
    c->ssl = SSL_new(ctx);
    if (c->ssl == NULL || SSL_set_fd(c->ssl, c->fd) != 1) {
        conn_close(c);
        return;
    }
    SSL_set_mode(c->ssl, SSL_MODE_ENABLE_PARTIAL_WRITE |
                             SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    c->state = S_HANDSHAKE;
    continue_handshake(c);
}

static void on_writable(struct conn *c)
{
    if (c->state == S_HANDSHAKE) {
        continue_handshake(c);
        return;
    }
    if (flush_out(c) < 0) {
        conn_close(c);
        return;
    }
    if (c->out_len == 0) {
        if (c->state == S_CLOSING)
            conn_close(c);
        else if (c->state == S_TLS_WAIT)
            start_handshake(c);
        else
            on_readable(c); /* a TLS write may have been waiting on a read */
    }
}

static void on_accept(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            return; /* EAGAIN, or out of descriptors: try again later */
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        if (c == NULL)
            die("calloc");
        c->fd = fd;
        c->state = S_COMMAND;
        connections++;
        open_conns++;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
            die("epoll_ctl add");
        reply(c, "220 " HOSTNAME " ESMTP benchmark sink\r\n");
        if (flush_out(c) < 0)
            conn_close(c);
    }
}

int main(int argc, char **argv)
{
    if (argc < 6 || argc > 7) {
        fprintf(stderr, "usage: %s PORT CERT KEY USER PASSWORD [STATS_FILE]\n",
                argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    auth_user = argv[4];
    auth_pass = argv[5];
    stats_path = argc == 7 ? argv[6] : NULL;

    pid_t parent = getppid();
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    /* The signals stay blocked except inside epoll_pwait, so none is lost
     * between checking the flags and going to sleep. */
    sigset_t blocked, during_wait;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGUSR1);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGINT);
    sigprocmask(SIG_BLOCK, &blocked, &during_wait);
    sigdelset(&during_wait, SIGUSR1);
    sigdelset(&during_wait, SIGTERM);
    sigdelset(&during_wait, SIGINT);

    ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL)
        die("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (SSL_CTX_use_certificate_chain_file(ctx, argv[2]) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, argv[3], SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0)
        die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0)
        die("bind");
    if (listen(lfd, 4096) < 0)
        die("listen");
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);
    printf("port %d\n", ntohs(addr.sin_port));
    fflush(stdout);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) < 0)
        die("epoll_ctl listen");

    struct epoll_event events[MAX_EVENTS];
    while (!want_exit) {
        if (want_stats) {
            want_stats = 0;
            report();
        }
        /* Wake once a second to notice a dead driver: never outlive it. */
        int n = epoll_pwait(epfd, events, MAX_EVENTS, 1000, &during_wait);
        if (getppid() != parent)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c == NULL) {
                on_accept(lfd);
                continue;
            }
            uint32_t e = events[i].events;
            if (e & EPOLLOUT)
                on_writable(c); /* may close c: nothing after it */
            else if (e & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                if (c->state == S_HANDSHAKE)
                    continue_handshake(c);
                else
                    on_readable(c);
            }
        }
    }
    report();
    return 0;
}
