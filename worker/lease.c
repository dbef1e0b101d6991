#include "worker/lease.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/err.h"
#include "common/log.h"
#include "common/ulid.h"
#include "common/util.h"
#include "db/db.h"

struct lease {
        struct lease *next;       /* the keeper's list, under its lock */
        struct lease *batch_next; /* the keeper thread's current batch */
        unsigned refs;            /* under the lock: one for the list, one while in a batch */
        char run_id[ULID_LEN + 1];
        char owner[LEASE_OWNER_MAX + 1];
        int lease_ms;
        /* Monotonic ms when the last successful grant or extension was sent. */
        _Atomic int64_t valid_from_ms;
        atomic_bool lost;
};

struct lease_keeper {
        struct db *db; /* used by the keeper thread only */
        int lease_ms;
        pthread_t thread;
        bool thread_started;
        pthread_mutex_t lock;
        pthread_cond_t wake;
        bool stopping;
        struct lease *leases;
};

static void lease_keeper_lock(struct lease_keeper *k)
{
        int e = pthread_mutex_lock(&k->lock);

        FIM_ASSERT(e == 0);
}

static void lease_keeper_unlock(struct lease_keeper *k)
{
        int e = pthread_mutex_unlock(&k->lock);

        FIM_ASSERT(e == 0);
}

/* Drop a reference; the lock must be held. */
static void lease_unref_locked(struct lease *l)
{
        FIM_ASSERT(l->refs > 0);
        if (--l->refs == 0)
                free(l);
}

/*
 * An extension that matched no row means either that the run ended or was released between
 * two ticks (normal), or that another worker took it over (our lease is lost). Only the
 * latter stops the run.
 */
static bool lease_keeper_taken_over(struct lease_keeper *k, const struct lease *l)
{
        PGresult *res = NULL;
        bool taken;

        if (db_query_row(k->db, &res,
                         "SELECT status = 'running' AND lease_owner IS NOT NULL AND"
                         " lease_owner <> $2 FROM fsm_runs WHERE run_id = $1",
                         2, (const char *const[]){l->run_id, l->owner}) <= 0)
                return false;
        taken = strcmp(db_get(res, 0, 0), "t") == 0;
        PQclear(res);
        if (taken)
                log_warning("lease lost to another worker", "run_id=%s", l->run_id);
        return taken;
}

static void lease_keeper_extend(struct lease_keeper *k, struct lease *l)
{
        int64_t sent = util_now_monotonic_ms();
        char ms[16];
        const char *params[3] = {l->run_id, l->owner, ms};
        PGresult *res = NULL;
        int r;

        if (lease_lost(l))
                return;
        (void)snprintf(ms, sizeof(ms), "%d", l->lease_ms);
        r = db_exec(k->db, &res,
                    "UPDATE fsm_runs SET lease_until = now() + $3::int * interval '1 millisecond'"
                    " WHERE run_id = $1 AND lease_owner = $2 AND status = 'running'",
                    3, params);
        if (r < 0) {
                /* Still valid until a lease duration after the last success; lease_lost says. */
                log_warning_errno(r, "failed to extend lease, will retry",
                                  "run_id=%s valid_for_ms=%" PRId64, l->run_id,
                                  atomic_load(&l->valid_from_ms) + l->lease_ms - sent);
                if (r == -ECONNRESET)
                        (void)db_reconnect(k->db);
                return;
        }
        if (strcmp(PQcmdTuples(res), "0") != 0)
                atomic_store(&l->valid_from_ms, sent);
        else if (lease_keeper_taken_over(k, l))
                lease_mark_lost(l);
        PQclear(res);
}

/*
 * One tick: take a reference on every lease under the lock, then extend them without it, so
 * that lease_keeper_add() and lease_keeper_remove() in the worker threads never wait for the
 * database. A lease removed meanwhile is freed by the last unref, after its extension.
 */
static void lease_keeper_tick(struct lease_keeper *k)
{
        struct lease *batch = NULL;

        for (struct lease *l = k->leases; l; l = l->next) {
                l->refs++;
                l->batch_next = batch;
                batch = l;
        }
        lease_keeper_unlock(k);
        for (struct lease *l = batch; l; l = l->batch_next)
                lease_keeper_extend(k, l);
        lease_keeper_lock(k);
        while (batch) {
                struct lease *l = batch;

                batch = l->batch_next;
                lease_unref_locked(l);
        }
}

static void *lease_keeper_main(void *arg)
{
        struct lease_keeper *k = arg;
        int interval_ms = k->lease_ms / 3 > 0 ? k->lease_ms / 3 : 1;

        lease_keeper_lock(k);
        while (!k->stopping) {
                struct timespec until;

                (void)clock_gettime(CLOCK_MONOTONIC, &until);
                until.tv_sec += interval_ms / 1000;
                until.tv_nsec += (long)(interval_ms % 1000) * 1000000L;
                if (until.tv_nsec >= 1000000000L) {
                        until.tv_sec++;
                        until.tv_nsec -= 1000000000L;
                }
                (void)pthread_cond_timedwait(&k->wake, &k->lock, &until);
                if (k->stopping)
                        break;
                lease_keeper_tick(k);
        }
        lease_keeper_unlock(k);
        return NULL;
}

int lease_keeper_new(const char *db_url, int lease_ms, struct lease_keeper **ret_keeper)
{
        struct lease_keeper *k;
        pthread_condattr_t attr;
        int r;

        k = calloc(1, sizeof(*k));
        if (!k)
                return err_set(-ENOMEM, "out of memory");
        k->lease_ms = lease_ms;
        r = pthread_mutex_init(&k->lock, NULL);
        FIM_ASSERT(r == 0);
        /* The tick is measured on the monotonic clock, like lease validity. */
        r = pthread_condattr_init(&attr);
        FIM_ASSERT(r == 0);
        r = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        FIM_ASSERT(r == 0);
        r = pthread_cond_init(&k->wake, &attr);
        FIM_ASSERT(r == 0);
        (void)pthread_condattr_destroy(&attr);
        r = db_connect(db_url, &k->db);
        if (r < 0)
                goto fail;
        r = pthread_create(&k->thread, NULL, lease_keeper_main, k);
        if (r != 0) {
                r = err_set(-r, "failed to start the lease keeper thread: %s", strerror(r));
                goto fail;
        }
        k->thread_started = true;
        *ret_keeper = k;
        return 0;
fail:
        lease_keeper_free(k);
        return r;
}

void lease_keeper_free(struct lease_keeper *k)
{
        if (!k)
                return;
        if (k->thread_started) {
                lease_keeper_lock(k);
                k->stopping = true;
                (void)pthread_cond_signal(&k->wake);
                lease_keeper_unlock(k);
                (void)pthread_join(k->thread, NULL);
        }
        while (k->leases) {
                struct lease *l = k->leases;

                k->leases = l->next;
                lease_unref_locked(l);
        }
        db_free(k->db);
        (void)pthread_cond_destroy(&k->wake);
        (void)pthread_mutex_destroy(&k->lock);
        free(k);
}

int lease_keeper_lease_ms(const struct lease_keeper *keeper)
{
        return keeper->lease_ms;
}

int lease_keeper_add(struct lease_keeper *k, const char *run_id, const char *owner,
                     int64_t granted_ms, struct lease **ret_lease)
{
        struct lease *l;

        if (strlen(owner) > LEASE_OWNER_MAX)
                return err_set(-ENAMETOOLONG,
                               "lease owner '%.64s...' is %zu characters long, above %d", owner,
                               strlen(owner), LEASE_OWNER_MAX);
        l = calloc(1, sizeof(*l));
        if (!l)
                return err_set(-ENOMEM, "out of memory");
        (void)snprintf(l->run_id, sizeof(l->run_id), "%s", run_id);
        (void)snprintf(l->owner, sizeof(l->owner), "%s", owner);
        l->lease_ms = k->lease_ms;
        l->refs = 1;
        atomic_init(&l->valid_from_ms, granted_ms);
        atomic_init(&l->lost, false);
        lease_keeper_lock(k);
        l->next = k->leases;
        k->leases = l;
        lease_keeper_unlock(k);
        *ret_lease = l;
        return 0;
}

void lease_keeper_remove(struct lease_keeper *k, struct lease *lease)
{
        if (!lease)
                return;
        lease_keeper_lock(k);
        for (struct lease **p = &k->leases; *p; p = &(*p)->next) {
                if (*p == lease) {
                        *p = lease->next;
                        break;
                }
        }
        lease_unref_locked(lease);
        lease_keeper_unlock(k);
}

bool lease_lost(const struct lease *lease)
{
        struct lease *l = (struct lease *)lease;
        int64_t idle;

        if (atomic_load(&l->lost))
                return true;
        idle = util_now_monotonic_ms() - atomic_load(&l->valid_from_ms);
        if (idle < l->lease_ms)
                return false;
        /* Log once, from whichever thread notices first. */
        if (!atomic_exchange(&l->lost, true))
                log_warning("lease lost: not extended for a whole lease duration",
                            "run_id=%s lease_ms=%d idle_ms=%" PRId64, l->run_id, l->lease_ms, idle);
        return true;
}

void lease_mark_lost(struct lease *lease)
{
        atomic_store(&lease->lost, true);
}
