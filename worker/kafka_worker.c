#include "worker/kafka_worker.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "stages/thin_pool.h"
#include "worker/kafka_client.h"
#include "worker/kafka_producer.h"
#include "worker/lease.h"
#include "worker/metrics.h"
#include "worker/outbox_publisher.h"
#include "worker/pool.h"
#include "worker/stage.h"

#define KAFKA_WORKER_MAX_STAGES 8
/*
 * /readyz: PostgreSQL and the Kafka brokers are probed this often by a thread of its own.
 * PostgreSQL with a fresh connection each time (bounded by libpq's connect_timeout, so a dead
 * network cannot hang the probe or shutdown); Kafka with a metadata request through a client
 * of the probe's own, bounded by KAFKA_WORKER_KAFKA_PROBE_TIMEOUT_MS. The consumers cannot
 * tell: a consumer keeps its group membership while every broker is down. A probe older than
 * KAFKA_WORKER_PROBE_STALE_MS counts as a failure. Each consumer must have polled within
 * KAFKA_WORKER_POLL_STALE_MS (the dispatcher polls every 100 ms).
 */
#define KAFKA_WORKER_PROBE_MS 5000
#define KAFKA_WORKER_PROBE_STALE_MS 20000
#define KAFKA_WORKER_KAFKA_PROBE_TIMEOUT_MS 3000
#define KAFKA_WORKER_POLL_STALE_MS 10000

/* Set by the first SIGTERM/SIGINT (to its number) or by a fatal failure (to -1). */
static atomic_int kafka_worker_stop;

static void kafka_worker_on_signal(int signo)
{
        if (kafka_worker_stop)
                _exit(128 + signo);
        kafka_worker_stop = signo;
}

int kafka_worker_signals(void)
{
        struct sigaction sa;

        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = kafka_worker_on_signal;
        sa.sa_flags = SA_RESTART;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0)
                return err_set(-errno, "failed to install signal handlers: %s", strerror(errno));
        return 0;
}

int kafka_worker_threads(const struct config *cfg, const struct stage *stage)
{
        switch (stage->id) {
        case STAGE_DOWNLOAD:
                return cfg->download_queue_size;
        case STAGE_UNPACK:
                return cfg->unpack_queue_size;
        case STAGE_ACTIVATE:
                return cfg->activate_queue_size;
        case STAGE_COUNT:
        default:
                return 1;
        }
}

struct kafka_worker {
        const struct kafka_worker_options *opts;
        struct metrics_server *metrics;
        atomic_bool ready; /* started and not stopping; /readyz also asks the probes */
        struct kafka_worker_probe *probe;
        struct lease_keeper *leases;
        struct kafka_producer *producer;
        struct outbox_publisher *publisher;
        struct pool *pools[KAFKA_WORKER_MAX_STAGES];
        size_t npools;
};

/* The PostgreSQL and Kafka half of /readyz. */
struct kafka_worker_probe {
        const char *url;
        rd_kafka_t *kafka; /* the probe's own client: only its metadata requests use it */
        pthread_t thread;
        pthread_mutex_t lock;
        pthread_cond_t wake;
        bool stopping;
        int64_t ok_ms;       /* monotonic time of the last successful probe, 0 before one */
        char error[256];     /* why the last probe failed, "" when it succeeded */
        const char *failing; /* what failed the last probe, NULL when it succeeded */
};

/* Whether a broker answers a metadata request; 0, or a negative errno with err_last(). */
static int kafka_worker_kafka_probe_once(rd_kafka_t *rk)
{
        const struct rd_kafka_metadata *md = NULL;
        rd_kafka_resp_err_t err;

        /* No topic of ours: the answer lists the brokers only, whatever the cluster holds. */
        err = rd_kafka_metadata(rk, 0, NULL, &md, KAFKA_WORKER_KAFKA_PROBE_TIMEOUT_MS);
        if (md)
                rd_kafka_metadata_destroy(md);
        if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
                return kafka_client_errno(err, "no Kafka broker answers (KAFKA_BROKERS)");
        return 0;
}

static void kafka_worker_probe_once(struct kafka_worker_probe *p)
{
        struct db *db = NULL;
        PGresult *res = NULL;
        const char *failed = "PostgreSQL unreachable";
        int r;

        r = db_connect(p->url, &db);
        if (r == 0)
                r = db_query_row(db, &res, "SELECT 1", 0, NULL);
        if (r == 0)
                r = err_set(-EPROTO, "no row");
        if (r > 0) {
                failed = "Kafka unreachable";
                r = kafka_worker_kafka_probe_once(p->kafka);
                r = r < 0 ? r : 1;
        }
        pthread_mutex_lock(&p->lock);
        if (r > 0) {
                p->ok_ms = util_now_monotonic_ms();
                p->error[0] = '\0';
                if (p->failing)
                        log_notice("readiness probe: PostgreSQL and Kafka answer again", "");
                p->failing = NULL;
        } else {
                (void)snprintf(p->error, sizeof(p->error), "%s: %s", failed, err_last());
                log_redact(p->error);
                /* Once per outage of each service: the probe runs every few seconds. */
                if (p->failing != failed)
                        log_warning("readiness probe failed, /readyz reports not ready", "error=%s",
                                    log_quote(p->error));
                p->failing = failed;
        }
        pthread_mutex_unlock(&p->lock);
        if (res)
                PQclear(res);
        db_free(db);
}

static void kafka_worker_deadline(struct timespec *ts, int64_t ms)
{
        (void)clock_gettime(CLOCK_MONOTONIC, ts);
        ts->tv_sec += (time_t)(ms / 1000);
        ts->tv_nsec += (long)(ms % 1000) * 1000000L;
        if (ts->tv_nsec >= 1000000000L) {
                ts->tv_sec++;
                ts->tv_nsec -= 1000000000L;
        }
}

static void *kafka_worker_probe_main(void *arg)
{
        struct kafka_worker_probe *p = arg;

        pthread_mutex_lock(&p->lock);
        while (!p->stopping) {
                struct timespec until;

                pthread_mutex_unlock(&p->lock);
                kafka_worker_probe_once(p);
                kafka_worker_deadline(&until, KAFKA_WORKER_PROBE_MS);
                pthread_mutex_lock(&p->lock);
                if (!p->stopping)
                        (void)pthread_cond_timedwait(&p->wake, &p->lock, &until);
        }
        pthread_mutex_unlock(&p->lock);
        return NULL;
}

/*
 * The probe's Kafka client is a producer that never produces. Its own connection failures
 * are not logged: the consumers and the producer of the worker already report them.
 */
static int kafka_worker_probe_kafka_new(const struct config *cfg, rd_kafka_t **ret_rk)
{
        static const char *const props[] = {"log_level", "2", NULL};
        rd_kafka_conf_t *conf = NULL;
        int r;

        r = kafka_client_conf_new(cfg, RD_KAFKA_PRODUCER, "probe", props, &conf);
        if (r < 0)
                return r;
        return kafka_client_new(RD_KAFKA_PRODUCER, conf, ret_rk);
}

static int kafka_worker_probe_start(const struct config *cfg, struct kafka_worker_probe **ret)
{
        struct kafka_worker_probe *p;
        pthread_condattr_t attr;
        int r;

        p = calloc(1, sizeof(*p));
        if (!p)
                return err_set(-ENOMEM, "out of memory");
        p->url = cfg->database_url;
        r = kafka_worker_probe_kafka_new(cfg, &p->kafka);
        if (r < 0) {
                free(p);
                return r;
        }
        (void)snprintf(p->error, sizeof(p->error), "PostgreSQL and Kafka not probed yet");
        pthread_mutex_init(&p->lock, NULL);
        pthread_condattr_init(&attr);
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        pthread_cond_init(&p->wake, &attr);
        pthread_condattr_destroy(&attr);
        r = pthread_create(&p->thread, NULL, kafka_worker_probe_main, p);
        if (r != 0) {
                pthread_cond_destroy(&p->wake);
                pthread_mutex_destroy(&p->lock);
                rd_kafka_destroy(p->kafka);
                free(p);
                return err_set(-r, "failed to start the readiness probe: %s", strerror(r));
        }
        *ret = p;
        return 0;
}

static void kafka_worker_probe_stop(struct kafka_worker_probe *p)
{
        if (!p)
                return;
        pthread_mutex_lock(&p->lock);
        p->stopping = true;
        pthread_cond_signal(&p->wake);
        pthread_mutex_unlock(&p->lock);
        (void)pthread_join(p->thread, NULL);
        pthread_cond_destroy(&p->wake);
        pthread_mutex_destroy(&p->lock);
        rd_kafka_destroy(p->kafka);
        free(p);
}

static bool kafka_worker_probe_ready(struct kafka_worker_probe *p, char *reason, size_t size)
{
        bool ok;

        if (!p)
                return true;
        pthread_mutex_lock(&p->lock);
        ok = p->error[0] == '\0' &&
             util_now_monotonic_ms() - p->ok_ms <= KAFKA_WORKER_PROBE_STALE_MS;
        if (!ok)
                (void)snprintf(reason, size, "%s",
                               p->error[0] ? p->error : "readiness probe overdue");
        pthread_mutex_unlock(&p->lock);
        return ok;
}

bool kafka_worker_stopping(void *unused)
{
        (void)unused;
        return atomic_load(&kafka_worker_stop) != 0;
}

static int kafka_worker_check_schema(const struct config *cfg)
{
        struct db *db = NULL;
        int r;

        r = db_connect_interruptible(cfg->database_url, kafka_worker_stopping, NULL, &db);
        if (r == -ECANCELED)
                return r;
        if (r < 0)
                return err_wrap(r, "database unreachable (DATABASE_URL)");
        r = db_schema_check(db);
        db_free(db);
        return r;
}

static int kafka_worker_start(struct kafka_worker *w)
{
        const struct config *cfg = w->opts->cfg;
        int r;

        r = kafka_worker_check_schema(cfg);
        if (r < 0)
                return r;
        r = lease_keeper_new(cfg->database_url, cfg->lease_seconds * 1000, &w->leases);
        if (r < 0)
                return r;
        /* Long enough to ride out a broker restart, short enough that a publisher holding
         * outbox rows or a worker holding a dead letter gets an answer. */
        r = kafka_producer_new(cfg, "producer", 60000, &w->producer);
        if (r < 0)
                return r;
        r = outbox_publisher_new(cfg, w->producer, &w->publisher);
        if (r < 0)
                return r;
        for (size_t i = 0; i < w->opts->nstages; i++) {
                struct pool_options po = {
                        .cfg = cfg,
                        .stage = w->opts->stages[i],
                        .threads = kafka_worker_threads(cfg, w->opts->stages[i]),
                        .leases = w->leases,
                        .producer = w->producer,
                        .publisher = w->publisher,
                        .stop = &kafka_worker_stop,
                };

                r = pool_new(&po, &w->pools[w->npools]);
                if (r < 0)
                        return err_wrap(r, "failed to start the '%s' pool",
                                        w->opts->stages[i]->name);
                w->npools++;
                log_info("pool started", "stage=%s threads=%d", po.stage->name, po.threads);
        }
        return 0;
}

/* Whether a component failed in a way that needs a restart. */
static bool kafka_worker_failed(const struct kafka_worker *w)
{
        if (w->producer && kafka_producer_failed(w->producer))
                return true;
        for (size_t i = 0; i < w->npools; i++) {
                if (pool_failed(w->pools[i]))
                        return true;
        }
        return false;
}

/* Stop everything by @deadline_ms; returns whether every thread finished (safe to free). */
static bool kafka_worker_stop_all(struct kafka_worker *w, int64_t deadline_ms)
{
        bool finished = true;
        int64_t left;

        for (size_t i = 0; i < w->npools; i++)
                pool_stop(w->pools[i], deadline_ms);
        for (size_t i = 0; i < w->npools; i++)
                finished &= pool_wait(w->pools[i]);
        /* Handoffs of runs that completed during shutdown go out now, not at next start. */
        if (w->publisher)
                outbox_publisher_stop(w->publisher, deadline_ms);
        left = deadline_ms - util_now_monotonic_ms();
        if (!finished) {
                /* Stuck workers may still wake the publisher and send dead letters: flush the
                 * producer, free nothing. */
                if (w->producer)
                        (void)rd_kafka_flush(kafka_producer_handle(w->producer),
                                             left > 1000 ? (int)left : 1000);
                return false;
        }
        kafka_producer_free(w->producer, left > 1000 ? (int)left : 1000);
        w->producer = NULL;
        return true;
}

static void kafka_worker_free(struct kafka_worker *w)
{
        for (size_t i = 0; i < w->npools; i++)
                pool_free(w->pools[i]);
        outbox_publisher_free(w->publisher);
        kafka_producer_free(w->producer, 0);
        lease_keeper_free(w->leases);
}

static void kafka_worker_log_totals(const struct kafka_worker *w)
{
        for (size_t i = 0; i < w->npools; i++) {
                struct pool_stats st;

                pool_get_stats(w->pools[i], &st);
                log_info("pool totals",
                         "stage=%s completed=%" PRIu64 " already_complete=%" PRIu64
                         " dead_lettered=%" PRIu64 " retried=%" PRIu64 " abandoned=%" PRIu64,
                         pool_stage_name(w->pools[i]), st.completed, st.already_complete,
                         st.dead_lettered, st.retried, st.abandoned);
        }
}

/*
 * Ready: started and not stopping, PostgreSQL answered a recent probe, and every consumer is
 * polling and has joined its group. Only reads state that other threads keep up to date.
 */
static bool kafka_worker_ready(char *reason, size_t reason_size, void *userdata)
{
        struct kafka_worker *w = userdata;

        if (!atomic_load(&w->ready)) {
                (void)snprintf(reason, reason_size, "%s",
                               kafka_worker_stop ? "shutting down" : "starting");
                return false;
        }
        if (!kafka_worker_probe_ready(w->probe, reason, reason_size))
                return false;
        for (size_t i = 0; i < w->npools; i++) {
                if (!pool_consuming(w->pools[i], KAFKA_WORKER_POLL_STALE_MS, reason, reason_size))
                        return false;
        }
        return true;
}

/* Pool usage gauges for /metrics, when this worker runs a stage that uses the pool. */
static void kafka_worker_report_pool(const struct kafka_worker *w)
{
        const struct config *cfg = w->opts->cfg;
        struct thin_pool_status st;
        bool uses_pool = false;

        for (size_t i = 0; i < w->opts->nstages; i++)
                uses_pool = uses_pool || w->opts->stages[i]->id != STAGE_DOWNLOAD;
        if (!uses_pool || !cfg->metrics_addr[0])
                return;
        if (thin_pool_status(cfg->pool_name, &st) < 0) {
                log_debug("pool status for metrics unavailable", "pool=%s", cfg->pool_name);
                return;
        }
        (void)metrics_pool_set(cfg->pool_name, st.data_used_blocks, st.data_total_blocks,
                               st.metadata_used_blocks, st.metadata_total_blocks);
}

/*
 * Some thread is still running (a run outlasted the deadline, or was going when start-up
 * failed): it reads the configuration, its pool and the libraries' global state, so nothing
 * may be freed, and exit() must not run the atexit handlers (OpenSSL's, libpq's) under it.
 * End the process here; the run is left to its lease. The log writes straight to fd 2; stdio
 * may still hold output of the command.
 */
static _Noreturn void kafka_worker_leave(int status)
{
        (void)fflush(stdout);
        (void)fflush(stderr);
        _exit(status);
}

int kafka_worker_run(const struct kafka_worker_options *opts)
{
        struct kafka_worker w = {.opts = opts};
        const struct config *cfg = opts->cfg;
        int64_t pool_report_at = 0;
        bool failed = false;
        int64_t deadline;
        int r;

        FIM_ASSERT(opts->nstages > 0 && opts->nstages <= KAFKA_WORKER_MAX_STAGES);
        /* Installing again is harmless, and keeps a signal that came in during start-up. */
        r = kafka_worker_signals();
        if (r < 0) {
                log_err_errno(r, "worker failed to start", "");
                return 1;
        }
        if (kafka_worker_stop) {
                log_notice("worker stopped before it started", "signal=%d", (int)kafka_worker_stop);
                return 0;
        }
        r = metrics_server_start(cfg->metrics_addr, kafka_worker_ready, &w, &w.metrics);
        if (r < 0) {
                log_err_errno(r, "worker failed to start its metrics endpoint", "addr=%s",
                              log_quote(cfg->metrics_addr));
                return 1;
        }
        r = kafka_worker_start(&w);
        if (r == 0 && cfg->metrics_addr[0])
                r = kafka_worker_probe_start(cfg, &w.probe);
        if (r < 0) {
                int signo = kafka_worker_stop;

                /* Asked to stop while starting: that is a clean stop, whatever start-up hit. */
                if (signo > 0)
                        log_notice("worker stopped before it started", "signal=%d", signo);
                else
                        log_err_errno(r, "worker failed to start", "");
                metrics_server_stop(w.metrics);
                kafka_worker_probe_stop(w.probe);
                kafka_worker_stop = -1;
                if (!kafka_worker_stop_all(&w, util_now_monotonic_ms()))
                        kafka_worker_leave(signo > 0 ? 0 : 1);
                kafka_worker_free(&w);
                return signo > 0 ? 0 : 1;
        }
        log_info("worker started", "host=%s prefix=%s brokers=%s stages=%zu", cfg->host_id,
                 cfg->kafka_topic_prefix, log_quote(cfg->kafka_brokers), w.npools);
        atomic_store(&w.ready, true);
        while (!kafka_worker_stop) {
                if (kafka_worker_failed(&w)) {
                        failed = true;
                        kafka_worker_stop = -1;
                        break;
                }
                if (util_now_monotonic_ms() >= pool_report_at) {
                        kafka_worker_report_pool(&w);
                        pool_report_at = util_now_monotonic_ms() + 15000;
                }
                util_sleep_ms(100);
        }
        atomic_store(&w.ready, false);
        log_notice("worker shutting down", "signal=%d timeout_s=%d", (int)kafka_worker_stop,
                   cfg->shutdown_timeout);
        deadline = util_now_monotonic_ms() + (int64_t)cfg->shutdown_timeout * 1000;
        if (!kafka_worker_stop_all(&w, deadline)) {
                metrics_server_stop(w.metrics);
                kafka_worker_probe_stop(w.probe);
                kafka_worker_log_totals(&w);
                log_warning("worker stopped with runs still going; their leases will expire", "");
                kafka_worker_leave(failed ? 1 : 0);
        }
        metrics_server_stop(w.metrics);
        kafka_worker_probe_stop(w.probe);
        kafka_worker_log_totals(&w);
        kafka_worker_free(&w);
        log_notice("worker stopped", "");
        return failed ? 1 : 0;
}
