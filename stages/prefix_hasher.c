#include "stages/prefix_hasher.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/err.h"

/*
 * Read 1 MiB at a time at most: large enough that a hasher which fell behind catches up in
 * few system calls, small enough to stay in the CPU's cache between the read and the hash.
 */
#define PREFIX_HASHER_CHUNK (1u << 20)

struct prefix_hasher {
        pthread_t thread;
        pthread_mutex_t lock;
        pthread_cond_t wake; /* the thread waits here for a new target, finish or stop */
        int fd;
        const char *path;
        EVP_MD_CTX *sha;
        unsigned char *buf;

        /* Under lock. */
        uint64_t target;
        uint64_t idle_at; /* where the thread stopped when it began to wait */
        bool waiting;
        bool finishing; /* exit once target is reached */
        bool stopping;  /* exit now */

        /* The thread's own while it runs; read by the caller after the join. */
        uint64_t hashed;
        int error;
        char message[ERR_MSG_MAX];
};

/* Record the thread's failure for prefix_hasher_finish() to pass on. */
static void prefix_hasher_fail(struct prefix_hasher *h, int r)
{
        h->error = r;
        (void)snprintf(h->message, sizeof(h->message), "%s", err_text(r));
}

/* Hash [hashed, end), one chunk per system call. */
static int prefix_hasher_hash_to(struct prefix_hasher *h, uint64_t end)
{
        uint64_t left = end - h->hashed;
        size_t want = left < PREFIX_HASHER_CHUNK ? (size_t)left : PREFIX_HASHER_CHUNK;
        ssize_t n = pread(h->fd, h->buf, want, (off_t)h->hashed);

        if (n < 0 && errno == EINTR)
                return 0;
        if (n <= 0)
                return err_set(n < 0 ? -errno : -EIO, "failed to read back '%s': %s", h->path,
                               n < 0 ? strerror(errno) : "file too short");
        if (EVP_DigestUpdate(h->sha, h->buf, (size_t)n) != 1)
                return err_set(-ENOMEM, "failed to hash '%s': OpenSSL error", h->path);
        h->hashed += (uint64_t)n;
        return 0;
}

static void *prefix_hasher_main(void *arg)
{
        struct prefix_hasher *h = arg;

        for (;;) {
                uint64_t end;
                int r;

                (void)pthread_mutex_lock(&h->lock);
                while (!h->stopping && !h->finishing && h->hashed >= h->target) {
                        h->idle_at = h->hashed;
                        h->waiting = true;
                        (void)pthread_cond_wait(&h->wake, &h->lock);
                        h->waiting = false;
                }
                end = h->target;
                if (h->stopping || h->hashed >= end) {
                        (void)pthread_mutex_unlock(&h->lock);
                        break;
                }
                (void)pthread_mutex_unlock(&h->lock);

                r = prefix_hasher_hash_to(h, end);
                if (r < 0) {
                        prefix_hasher_fail(h, r);
                        break;
                }
        }
        return NULL;
}

int prefix_hasher_start(int fd, const char *path, EVP_MD_CTX *sha, uint64_t hashed,
                        struct prefix_hasher **ret)
{
        struct prefix_hasher *h = calloc(1, sizeof(*h));
        sigset_t all, old;
        int e;

        if (!h)
                return -ENOMEM;
        h->buf = malloc(PREFIX_HASHER_CHUNK);
        if (!h->buf) {
                free(h);
                return -ENOMEM;
        }
        h->fd = fd;
        h->path = path;
        h->sha = sha;
        h->hashed = h->target = hashed;
        (void)pthread_mutex_init(&h->lock, NULL);
        (void)pthread_cond_init(&h->wake, NULL);

        /* Signals are for the threads that handle them (the worker blocks them elsewhere). */
        (void)sigfillset(&all);
        (void)pthread_sigmask(SIG_SETMASK, &all, &old);
        e = pthread_create(&h->thread, NULL, prefix_hasher_main, h);
        (void)pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (e != 0) {
                (void)pthread_cond_destroy(&h->wake);
                (void)pthread_mutex_destroy(&h->lock);
                free(h->buf);
                free(h);
                return err_set(-e, "failed to start a thread to hash '%s': %s", path, strerror(e));
        }
        (void)pthread_setname_np(h->thread, "fim-hash");
        *ret = h;
        return 0;
}

void prefix_hasher_advance(struct prefix_hasher *h, uint64_t end)
{
        (void)pthread_mutex_lock(&h->lock);
        if (end > h->target) {
                h->target = end;
                /*
                 * A waiting thread is woken for a full chunk, not for every write: a download
                 * that trickles in 64 KiB at a time would otherwise cost a wake-up per write.
                 * prefix_hasher_finish() wakes it for the rest.
                 */
                if (h->waiting && end - h->idle_at >= PREFIX_HASHER_CHUNK)
                        (void)pthread_cond_signal(&h->wake);
        }
        (void)pthread_mutex_unlock(&h->lock);
}

/* Tell the thread how to end, join it and free @h. */
static void prefix_hasher_end(struct prefix_hasher *h, bool wait_for_target)
{
        (void)pthread_mutex_lock(&h->lock);
        if (wait_for_target)
                h->finishing = true;
        else
                h->stopping = true;
        (void)pthread_cond_signal(&h->wake);
        (void)pthread_mutex_unlock(&h->lock);
        (void)pthread_join(h->thread, NULL);
        (void)pthread_cond_destroy(&h->wake);
        (void)pthread_mutex_destroy(&h->lock);
        free(h->buf);
}

int prefix_hasher_finish(struct prefix_hasher *h, uint64_t *ret_hashed)
{
        int r;

        prefix_hasher_end(h, true);
        *ret_hashed = h->hashed;
        r = h->error;
        if (r < 0)
                (void)err_set(r, "%s", h->message);
        free(h);
        return r;
}

void prefix_hasher_stop(struct prefix_hasher *h)
{
        if (!h)
                return;
        prefix_hasher_end(h, false);
        free(h);
}
