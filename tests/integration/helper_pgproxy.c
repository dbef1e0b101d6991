#include "helper_pgproxy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#define PGPROXY_MAX_CONNS 32

/* libpq's simple-protocol COMMIT: 'Q', length 4 + 7, "COMMIT\0". */
static const char pgproxy_commit_msg[] = {'Q', 0, 0, 0, 11, 'C', 'O', 'M', 'M', 'I', 'T', 0};

struct pgproxy_conn {
        int client;
        int server;
        char tail[sizeof(pgproxy_commit_msg) - 1]; /* last client bytes, for split messages */
        size_t tail_len;
        enum { PGPROXY_CONN_OPEN, PGPROXY_CONN_DROP_ON_REPLY, PGPROXY_CONN_CUT_AFTER_REPLY } state;
};

struct pgproxy {
        int listen_fd;
        int port;
        struct sockaddr_in upstream;
        pthread_t thread;
        int wake[2];
        pthread_mutex_t lock;
        pthread_cond_t acked;
        /* Under the lock: */
        unsigned requests; /* changes asked for */
        unsigned applied;  /* changes the thread has acted on */
        enum pgproxy_mode mode;
        bool cut;
        bool stopping;
        bool armed;
        enum pgproxy_commit_fault fault;
        bool fault_done;
        /* The thread's own: */
        struct pgproxy_conn conns[PGPROXY_MAX_CONNS];
        size_t nconns;
};

static void pgproxy_close_conn(struct pgproxy *p, size_t i)
{
        (void)close(p->conns[i].client);
        (void)close(p->conns[i].server);
        p->conns[i] = p->conns[--p->nconns];
}

static bool pgproxy_write_all(int fd, const char *buf, size_t len)
{
        while (len > 0) {
                ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return false;
                buf += n;
                len -= (size_t)n;
        }
        return true;
}

static void pgproxy_accept(struct pgproxy *p, enum pgproxy_mode mode)
{
        int c = accept4(p->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        int s;

        if (c < 0)
                return;
        if (mode == PGPROXY_REFUSE || p->nconns == PGPROXY_MAX_CONNS) {
                (void)close(c);
                return;
        }
        s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0 || connect(s, (const struct sockaddr *)&p->upstream, sizeof(p->upstream)) < 0) {
                if (s >= 0)
                        (void)close(s);
                (void)close(c);
                return;
        }
        p->conns[p->nconns++] = (struct pgproxy_conn){.client = c, .server = s};
}

/* Whether a COMMIT message ends in @buf (with the connection's earlier bytes before it). */
static bool pgproxy_saw_commit(struct pgproxy_conn *c, const char *buf, size_t len)
{
        char window[sizeof(c->tail) + 65536];
        size_t n = c->tail_len + len;
        bool found;

        memcpy(window, c->tail, c->tail_len);
        memcpy(window + c->tail_len, buf, len);
        found = memmem(window, n, pgproxy_commit_msg, sizeof(pgproxy_commit_msg)) != NULL;
        c->tail_len = n < sizeof(c->tail) ? n : sizeof(c->tail);
        memcpy(c->tail, window + n - c->tail_len, c->tail_len);
        return found;
}

/* Client to server. Returns false when the connection is to be closed. */
static bool pgproxy_from_client(struct pgproxy *p, struct pgproxy_conn *c)
{
        char buf[65536];
        ssize_t n = recv(c->client, buf, sizeof(buf), 0);
        bool fault = false;
        enum pgproxy_commit_fault kind = PGPROXY_COMMIT_DROP_BEFORE;

        if (n <= 0)
                return false;
        if (pgproxy_saw_commit(c, buf, (size_t)n)) {
                pthread_mutex_lock(&p->lock);
                if (p->armed) {
                        fault = true;
                        kind = p->fault;
                        p->armed = false;
                        p->fault_done = true;
                }
                pthread_mutex_unlock(&p->lock);
        }
        if (fault && kind == PGPROXY_COMMIT_DROP_BEFORE)
                return false;
        if (fault)
                c->state = kind == PGPROXY_COMMIT_DROP_AFTER ? PGPROXY_CONN_DROP_ON_REPLY
                                                             : PGPROXY_CONN_CUT_AFTER_REPLY;
        return pgproxy_write_all(c->server, buf, (size_t)n);
}

/* Server to client. Returns false when the connection is to be closed. */
static bool pgproxy_from_server(struct pgproxy_conn *c)
{
        char buf[65536];
        ssize_t n = recv(c->server, buf, sizeof(buf), 0);

        if (n <= 0 || c->state == PGPROXY_CONN_DROP_ON_REPLY)
                return false;
        if (!pgproxy_write_all(c->client, buf, (size_t)n))
                return false;
        /* COMMIT's reply ends with ReadyForQuery ('Z', length 5, status). */
        return !(c->state == PGPROXY_CONN_CUT_AFTER_REPLY && n >= 6 && buf[n - 6] == 'Z');
}

static void *pgproxy_main(void *arg)
{
        struct pgproxy *p = arg;

        for (;;) {
                struct pollfd fds[2 + 2 * PGPROXY_MAX_CONNS];
                enum pgproxy_mode mode;
                nfds_t nfds = 0;
                bool cut;

                unsigned requests;

                pthread_mutex_lock(&p->lock);
                mode = p->mode;
                cut = p->cut || mode == PGPROXY_REFUSE;
                p->cut = false;
                requests = p->requests;
                if (p->stopping) {
                        pthread_mutex_unlock(&p->lock);
                        break;
                }
                pthread_mutex_unlock(&p->lock);
                while (cut && p->nconns > 0)
                        pgproxy_close_conn(p, 0);
                pthread_mutex_lock(&p->lock);
                p->applied = requests;
                pthread_cond_broadcast(&p->acked);
                pthread_mutex_unlock(&p->lock);

                fds[nfds++] = (struct pollfd){.fd = p->wake[0], .events = POLLIN};
                if (mode != PGPROXY_BLACKHOLE) {
                        fds[nfds++] = (struct pollfd){.fd = p->listen_fd, .events = POLLIN};
                        for (size_t i = 0; i < p->nconns; i++) {
                                fds[nfds++] =
                                        (struct pollfd){.fd = p->conns[i].client, .events = POLLIN};
                                fds[nfds++] =
                                        (struct pollfd){.fd = p->conns[i].server, .events = POLLIN};
                        }
                }
                if (poll(fds, nfds, 1000) <= 0)
                        continue;
                if (fds[0].revents) {
                        char b[64];

                        (void)read(p->wake[0], b, sizeof(b));
                        continue;
                }
                /* Connections first, from the last, so that closing one moves no unseen one. */
                for (size_t i = p->nconns; i-- > 0;) {
                        const struct pollfd *cf = &fds[2 + 2 * i], *sf = &fds[3 + 2 * i];
                        bool ok = true;

                        if (cf->revents)
                                ok = pgproxy_from_client(p, &p->conns[i]);
                        if (ok && sf->revents)
                                ok = pgproxy_from_server(&p->conns[i]);
                        if (!ok)
                                pgproxy_close_conn(p, i);
                }
                if (fds[1].revents)
                        pgproxy_accept(p, mode);
        }
        while (p->nconns > 0)
                pgproxy_close_conn(p, 0);
        return NULL;
}

/* Wake the thread for a change made under the lock, and wait until it has acted on it. */
static void pgproxy_sync_locked(struct pgproxy *p)
{
        unsigned want = ++p->requests;

        (void)write(p->wake[1], "x", 1);
        while ((int)(p->applied - want) < 0)
                pthread_cond_wait(&p->acked, &p->lock);
}

struct pgproxy *pgproxy_start(const char *url)
{
        struct pgproxy *p = calloc(1, sizeof(*p));
        struct sockaddr_in addr = {.sin_family = AF_INET};
        socklen_t len = sizeof(addr);
        const char *at, *colon;
        int port;

        assert_non_null(p);
        /* postgresql://user@127.0.0.1:PORT/db */
        at = strchr(strstr(url, "://") + 3, '@');
        at = at ? at + 1 : strstr(url, "://") + 3;
        colon = strchr(at, ':');
        assert_non_null(colon);
        port = (int)strtol(colon + 1, NULL, 10);
        p->upstream.sin_family = AF_INET;
        p->upstream.sin_port = htons((uint16_t)port);
        assert_int_equal(inet_pton(AF_INET, "127.0.0.1", &p->upstream.sin_addr), 1);

        p->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_true(p->listen_fd >= 0);
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        assert_int_equal(bind(p->listen_fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
        assert_int_equal(listen(p->listen_fd, 16), 0);
        assert_int_equal(getsockname(p->listen_fd, (struct sockaddr *)&addr, &len), 0);
        p->port = ntohs(addr.sin_port);
        assert_int_equal(pipe2(p->wake, O_CLOEXEC | O_NONBLOCK), 0);
        assert_int_equal(pthread_mutex_init(&p->lock, NULL), 0);
        assert_int_equal(pthread_cond_init(&p->acked, NULL), 0);
        assert_int_equal(pthread_create(&p->thread, NULL, pgproxy_main, p), 0);
        return p;
}

void pgproxy_stop(struct pgproxy *p)
{
        if (!p)
                return;
        pthread_mutex_lock(&p->lock);
        p->stopping = true;
        pthread_mutex_unlock(&p->lock);
        (void)write(p->wake[1], "x", 1);
        (void)pthread_join(p->thread, NULL);
        (void)close(p->listen_fd);
        (void)close(p->wake[0]);
        (void)close(p->wake[1]);
        (void)pthread_cond_destroy(&p->acked);
        (void)pthread_mutex_destroy(&p->lock);
        free(p);
}

void pgproxy_url(const struct pgproxy *p, const char *url, char *out, size_t size)
{
        const char *at = strchr(strstr(url, "://") + 3, '@');
        const char *host = at ? at + 1 : strstr(url, "://") + 3;
        const char *path = strchr(host, '/');

        assert_non_null(path);
        assert_true((size_t)snprintf(out, size, "%.*s127.0.0.1:%d%s", (int)(host - url), url,
                                     p->port, path) < size);
}

void pgproxy_set_mode(struct pgproxy *p, enum pgproxy_mode mode)
{
        pthread_mutex_lock(&p->lock);
        p->mode = mode;
        pgproxy_sync_locked(p);
        pthread_mutex_unlock(&p->lock);
}

void pgproxy_cut(struct pgproxy *p)
{
        pthread_mutex_lock(&p->lock);
        p->cut = true;
        pgproxy_sync_locked(p);
        pthread_mutex_unlock(&p->lock);
}

void pgproxy_arm_commit(struct pgproxy *p, enum pgproxy_commit_fault fault)
{
        pthread_mutex_lock(&p->lock);
        p->armed = true;
        p->fault = fault;
        p->fault_done = false;
        pthread_mutex_unlock(&p->lock);
}

bool pgproxy_commit_fault_done(struct pgproxy *p)
{
        bool done;

        pthread_mutex_lock(&p->lock);
        done = p->fault_done;
        pthread_mutex_unlock(&p->lock);
        return done;
}
