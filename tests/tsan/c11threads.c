/*
 * For TSan builds only, loaded with LD_PRELOAD: C11 threads on top of pthreads.
 *
 * librdkafka starts its threads with C11 thrd_create and locks with mtx_lock/cnd_wait.
 * glibc implements those by calling its pthread functions internally, where the TSan
 * runtime of this toolchain (GCC 12, clang 14) cannot intercept them: a librdkafka thread
 * then runs without TSan's per-thread state and crashes at its first allocation. These
 * definitions take precedence over glibc's and go through the public pthread functions,
 * which TSan does intercept. Built without instrumentation, so preloading it into ctest or
 * a shell is harmless.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <threads.h>

struct c11_start {
        thrd_start_t fn;
        void *arg;
};

static void *c11_trampoline(void *p)
{
        struct c11_start s = *(struct c11_start *)p;

        free(p);
        return (void *)(intptr_t)s.fn(s.arg);
}

static int c11_result(int r)
{
        if (r == 0)
                return thrd_success;
        if (r == ENOMEM)
                return thrd_nomem;
        if (r == EBUSY)
                return thrd_busy;
        if (r == ETIMEDOUT)
                return thrd_timedout;
        return thrd_error;
}

int thrd_create(thrd_t *thr, thrd_start_t fn, void *arg)
{
        struct c11_start *s = malloc(sizeof(*s));
        int r;

        if (!s)
                return thrd_nomem;
        s->fn = fn;
        s->arg = arg;
        r = pthread_create((pthread_t *)thr, NULL, c11_trampoline, s);
        if (r != 0)
                free(s);
        return c11_result(r);
}

int thrd_join(thrd_t thr, int *res)
{
        void *v = NULL;
        int r = pthread_join((pthread_t)thr, &v);

        if (r == 0 && res)
                *res = (int)(intptr_t)v;
        return c11_result(r);
}

int thrd_detach(thrd_t thr)
{
        return c11_result(pthread_detach((pthread_t)thr));
}

int mtx_init(mtx_t *m, int type)
{
        pthread_mutexattr_t attr;
        int r;

        (void)pthread_mutexattr_init(&attr);
        if (type & mtx_recursive)
                (void)pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE);
        r = pthread_mutex_init((pthread_mutex_t *)m, &attr);
        (void)pthread_mutexattr_destroy(&attr);
        return c11_result(r);
}

int mtx_lock(mtx_t *m)
{
        return c11_result(pthread_mutex_lock((pthread_mutex_t *)m));
}

int mtx_trylock(mtx_t *m)
{
        return c11_result(pthread_mutex_trylock((pthread_mutex_t *)m));
}

int mtx_timedlock(mtx_t *restrict m, const struct timespec *restrict ts)
{
        return c11_result(pthread_mutex_timedlock((pthread_mutex_t *)m, ts));
}

int mtx_unlock(mtx_t *m)
{
        return c11_result(pthread_mutex_unlock((pthread_mutex_t *)m));
}

void mtx_destroy(mtx_t *m)
{
        (void)pthread_mutex_destroy((pthread_mutex_t *)m);
}

int cnd_init(cnd_t *c)
{
        return c11_result(pthread_cond_init((pthread_cond_t *)c, NULL));
}

int cnd_signal(cnd_t *c)
{
        return c11_result(pthread_cond_signal((pthread_cond_t *)c));
}

int cnd_broadcast(cnd_t *c)
{
        return c11_result(pthread_cond_broadcast((pthread_cond_t *)c));
}

int cnd_wait(cnd_t *c, mtx_t *m)
{
        return c11_result(pthread_cond_wait((pthread_cond_t *)c, (pthread_mutex_t *)m));
}

int cnd_timedwait(cnd_t *restrict c, mtx_t *restrict m, const struct timespec *restrict ts)
{
        return c11_result(pthread_cond_timedwait((pthread_cond_t *)c, (pthread_mutex_t *)m, ts));
}

void cnd_destroy(cnd_t *c)
{
        (void)pthread_cond_destroy((pthread_cond_t *)c);
}
