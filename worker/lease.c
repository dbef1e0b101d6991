#include "worker/lease.h"

#include <errno.h>
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
        struct lease *next;
        char run_id[ULID_LEN + 1];
        char owner[256];
        atomic_bool lost;
};

struct lease_keeper {
        struct db *db;
        int lease_ms;
        pthread_t thread;
        bool thread_started;
        pthread_mutex_t lock;
        pthread_cond_t wake;
        bool stopping;
        struct lease *leases;
};

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

static void lease_keeper_extend_all(struct lease_keeper *k)
{
        char ms[16];

        (void)snprintf(ms, sizeof(ms), "%d", k->lease_ms);
        /* The list is only changed under the lock; extensions are quick, so hold it. */
        for (struct lease *l = k->leases; l; l = l->next) {
                const char *params[3] = {l->run_id, l->owner, ms};
                PGresult *res = NULL;
                int r;

                if (atomic_load(&l->lost))
                        continue;
                r = db_exec(
                        k->db, &res,
                        "UPDATE fsm_runs SET lease_until = now() + $3::int * interval '1 millisecond'"
                        " WHERE run_id = $1 AND lease_owner = $2 AND status = 'running'",
                        3, params);
                if (r < 0) {
                        /* The lease may still be valid; the next tick tries again. */
                        log_warning_errno(r, "failed to extend lease, will retry", "run_id=%s",
                                          l->run_id);
                        if (r == -ECONNRESET)
                                (void)db_reconnect(k->db);
                        continue;
                }
                if (strcmp(PQcmdTuples(res), "0") == 0 && lease_keeper_taken_over(k, l))
                        atomic_store(&l->lost, true);
                PQclear(res);
        }
}

static void *lease_keeper_main(void *arg)
{
        struct lease_keeper *k = arg;
        int interval_ms = k->lease_ms / 3 > 0 ? k->lease_ms / 3 : 1;

        pthread_mutex_lock(&k->lock);
        while (!k->stopping) {
                struct timespec until;

                (void)clock_gettime(CLOCK_REALTIME, &until);
                until.tv_sec += interval_ms / 1000;
                until.tv_nsec += (long)(interval_ms % 1000) * 1000000L;
                if (until.tv_nsec >= 1000000000L) {
                        until.tv_sec++;
                        until.tv_nsec -= 1000000000L;
                }
                (void)pthread_cond_timedwait(&k->wake, &k->lock, &until);
                if (k->stopping)
                        break;
                lease_keeper_extend_all(k);
        }
        pthread_mutex_unlock(&k->lock);
        return NULL;
}

int lease_keeper_new(const char *db_url, int lease_ms, struct lease_keeper **ret_keeper)
{
        struct lease_keeper *k;
        int r;

        k = calloc(1, sizeof(*k));
        if (!k)
                return err_set(-ENOMEM, "out of memory");
        k->lease_ms = lease_ms;
        pthread_mutex_init(&k->lock, NULL);
        pthread_cond_init(&k->wake, NULL);
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
                pthread_mutex_lock(&k->lock);
                k->stopping = true;
                pthread_cond_signal(&k->wake);
                pthread_mutex_unlock(&k->lock);
                (void)pthread_join(k->thread, NULL);
        }
        while (k->leases) {
                struct lease *l = k->leases;

                k->leases = l->next;
                free(l);
        }
        db_free(k->db);
        pthread_cond_destroy(&k->wake);
        pthread_mutex_destroy(&k->lock);
        free(k);
}

int lease_keeper_lease_ms(const struct lease_keeper *keeper)
{
        return keeper->lease_ms;
}

int lease_keeper_add(struct lease_keeper *k, const char *run_id, const char *owner,
                     struct lease **ret_lease)
{
        struct lease *l = calloc(1, sizeof(*l));

        if (!l)
                return err_set(-ENOMEM, "out of memory");
        (void)snprintf(l->run_id, sizeof(l->run_id), "%s", run_id);
        (void)snprintf(l->owner, sizeof(l->owner), "%s", owner);
        atomic_init(&l->lost, false);
        pthread_mutex_lock(&k->lock);
        l->next = k->leases;
        k->leases = l;
        pthread_mutex_unlock(&k->lock);
        *ret_lease = l;
        return 0;
}

void lease_keeper_remove(struct lease_keeper *k, struct lease *lease)
{
        if (!lease)
                return;
        pthread_mutex_lock(&k->lock);
        for (struct lease **p = &k->leases; *p; p = &(*p)->next) {
                if (*p == lease) {
                        *p = lease->next;
                        break;
                }
        }
        pthread_mutex_unlock(&k->lock);
        free(lease);
}

bool lease_lost(const struct lease *lease)
{
        return atomic_load(&((struct lease *)lease)->lost);
}

void lease_mark_lost(struct lease *lease)
{
        atomic_store(&lease->lost, true);
}
