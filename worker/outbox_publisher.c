#include "worker/outbox_publisher.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <json-c/json.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "worker/kafka_producer.h"

/* How often an idle publisher looks for rows written by other processes of this host. */
#define OUTBOX_IDLE_MS 500
#define OUTBOX_BACKOFF_MAX_MS 5000

struct outbox_publisher {
        const struct config *cfg;
        struct kafka_producer *producer;
        struct db *db;
        pthread_t thread;
        bool thread_started;
        pthread_mutex_t lock;
        pthread_cond_t cond;
        bool woken;
        bool stopping;
        int64_t deadline_ms;
        atomic_uint_fast64_t published;
};

/* The row's headers JSON ({"trace_id": "...", "attempt": "1"}) as Kafka headers. */
static rd_kafka_headers_t *outbox_headers(const char *json)
{
        struct json_object *obj = json ? json_tokener_parse(json) : NULL;
        rd_kafka_headers_t *hdrs;

        hdrs = rd_kafka_headers_new(8);
        if (!hdrs) {
                json_object_put(obj);
                return NULL;
        }
        if (obj && json_object_is_type(obj, json_type_object)) {
                json_object_object_foreach(obj, name, v)
                {
                        const char *s =
                                json_object_is_type(v, json_type_string)
                                        ? json_object_get_string(v)
                                        : json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN);

                        if (!json_object_is_type(v, json_type_null))
                                (void)rd_kafka_header_add(hdrs, name, -1, s, -1);
                }
        }
        json_object_put(obj);
        return hdrs;
}

/* Send every row of @res; fills @d. Returns how many were queued (a prefix of the rows). */
static int outbox_send_rows(struct kafka_producer *producer, PGresult *res,
                            struct kafka_delivery *d)
{
        int rows = PQntuples(res), sent = 0;

        for (int i = 0; i < rows; i++) {
                const char *key = db_get(res, i, 2), *payload = db_get(res, i, 3);
                struct kafka_record rec = {
                        .topic = db_get(res, i, 1),
                        .key = key,
                        .key_len = strlen(key),
                        .value = payload,
                        .value_len = strlen(payload),
                        .headers = outbox_headers(db_get(res, i, 4)),
                };
                int r;

                if (!rec.headers)
                        break;
                r = kafka_producer_send(producer, &rec, &d[i]);
                if (r < 0) {
                        log_warning_errno(r, "failed to send outbox row, will retry",
                                          "outbox_id=%s topic=%s", db_get(res, i, 0),
                                          log_quote(rec.topic));
                        break;
                }
                sent++;
        }
        return sent;
}

/* Wait for the @sent deliveries and collect the delivered ids as a Postgres array literal. */
static int outbox_collect(struct kafka_producer *producer, PGresult *res, struct kafka_delivery *d,
                          int sent, char *ids, size_t size)
{
        size_t len = 0;
        int ok = 0;

        ids[len++] = '{';
        for (int i = 0; i < sent; i++) {
                int r = kafka_producer_wait(producer, &d[i]);

                if (r < 0) {
                        log_warning_errno(r, "outbox row not delivered, will retry",
                                          "outbox_id=%s topic=%s", db_get(res, i, 0),
                                          log_quote(db_get(res, i, 1)));
                        continue;
                }
                len += (size_t)snprintf(ids + len, size - len, "%s%s", ok ? "," : "",
                                        db_get(res, i, 0));
                ok++;
        }
        (void)snprintf(ids + len, size - len, "}");
        return ok;
}

int outbox_publish_batch(struct db *db, struct kafka_producer *producer, const char *host_id,
                         int limit)
{
        struct kafka_delivery d[OUTBOX_BATCH];
        char ids[OUTBOX_BATCH * 24 + 4];
        char lim[16];
        const char *params[2] = {host_id, lim};
        PGresult *res = NULL;
        int sent, ok = 0, r;

        FIM_ASSERT(limit > 0 && limit <= OUTBOX_BATCH);
        (void)snprintf(lim, sizeof(lim), "%d", limit);
        r = db_exec_script(db, "BEGIN");
        if (r < 0)
                return r;
        r = db_exec(db, &res,
                    "SELECT id, topic, message_key, payload, headers::text FROM outbox"
                    " WHERE published_at IS NULL AND host_id = $1 ORDER BY id LIMIT $2::int"
                    " FOR UPDATE SKIP LOCKED",
                    2, params);
        if (r < 0)
                goto rollback;
        if (PQntuples(res) > 0) {
                /* The rows stay locked while they travel: no other publisher takes them. */
                sent = outbox_send_rows(producer, res, d);
                ok = outbox_collect(producer, res, d, sent, ids, sizeof(ids));
        }
        if (ok > 0) {
                const char *upd[1] = {ids};

                r = db_exec(db, NULL,
                            "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
                            1, upd);
                if (r < 0)
                        goto rollback;
        }
        PQclear(res);
        r = db_exec_script(db, "COMMIT");
        if (r < 0)
                return r;
        return ok;
rollback:
        PQclear(res);
        (void)db_exec_script(db, "ROLLBACK");
        return r;
}

static bool outbox_should_exit(struct outbox_publisher *pub, bool drained)
{
        bool stop;

        pthread_mutex_lock(&pub->lock);
        stop = pub->stopping && (drained || util_now_monotonic_ms() >= pub->deadline_ms);
        pthread_mutex_unlock(&pub->lock);
        return stop;
}

/* Sleep until woken, or stopped (unless @backoff: a failing pass must not spin), or @ms. */
static void outbox_wait(struct outbox_publisher *pub, int64_t ms, bool backoff)
{
        struct timespec until;

        (void)clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += (time_t)(ms / 1000);
        until.tv_nsec += (long)(ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
        }
        pthread_mutex_lock(&pub->lock);
        while (!pub->woken && (backoff || !pub->stopping)) {
                if (pthread_cond_timedwait(&pub->cond, &pub->lock, &until) != 0)
                        break;
        }
        pub->woken = false;
        pthread_mutex_unlock(&pub->lock);
}

static void *outbox_main(void *arg)
{
        struct outbox_publisher *pub = arg;
        int64_t backoff = 0;

        for (;;) {
                int n = outbox_publish_batch(pub->db, pub->producer, pub->cfg->host_id,
                                             OUTBOX_BATCH);

                if (n > 0) {
                        atomic_fetch_add(&pub->published, (uint64_t)n);
                        log_debug("outbox rows published", "count=%d", n);
                }
                if (n < 0) {
                        backoff = backoff ? backoff * 2 : 250;
                        if (backoff > OUTBOX_BACKOFF_MAX_MS)
                                backoff = OUTBOX_BACKOFF_MAX_MS;
                        log_warning_errno(n, "outbox pass failed, will retry",
                                          "retry_in_ms=%" PRId64, backoff);
                        if (n == -ECONNRESET)
                                (void)db_reconnect(pub->db);
                        if (outbox_should_exit(pub, false))
                                break;
                        outbox_wait(pub, backoff, true);
                        continue;
                }
                backoff = 0;
                if (outbox_should_exit(pub, n == 0))
                        break;
                if (n < OUTBOX_BATCH)
                        outbox_wait(pub, OUTBOX_IDLE_MS, false);
        }
        return NULL;
}

int outbox_publisher_new(const struct config *cfg, struct kafka_producer *producer,
                         struct outbox_publisher **ret)
{
        struct outbox_publisher *pub;
        sigset_t all, old;
        int r;

        pub = calloc(1, sizeof(*pub));
        if (!pub)
                return err_set(-ENOMEM, "out of memory");
        pub->cfg = cfg;
        pub->producer = producer;
        pthread_mutex_init(&pub->lock, NULL);
        pthread_cond_init(&pub->cond, NULL);
        atomic_init(&pub->published, 0);
        r = db_connect(cfg->database_url, &pub->db);
        if (r < 0)
                goto fail;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        r = pthread_create(&pub->thread, NULL, outbox_main, pub);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (r != 0) {
                r = err_set(-r, "failed to start the outbox publisher: %s", strerror(r));
                goto fail;
        }
        pub->thread_started = true;
        *ret = pub;
        return 0;
fail:
        outbox_publisher_free(pub);
        return r;
}

void outbox_publisher_wake(struct outbox_publisher *pub)
{
        pthread_mutex_lock(&pub->lock);
        pub->woken = true;
        pthread_cond_signal(&pub->cond);
        pthread_mutex_unlock(&pub->lock);
}

void outbox_publisher_stop(struct outbox_publisher *pub, int64_t deadline_ms)
{
        if (!pub->thread_started)
                return;
        pthread_mutex_lock(&pub->lock);
        pub->stopping = true;
        pub->deadline_ms = deadline_ms;
        pthread_cond_signal(&pub->cond);
        pthread_mutex_unlock(&pub->lock);
        (void)pthread_join(pub->thread, NULL);
        pub->thread_started = false;
}

void outbox_publisher_free(struct outbox_publisher *pub)
{
        if (!pub)
                return;
        outbox_publisher_stop(pub, 0);
        db_free(pub->db);
        pthread_cond_destroy(&pub->cond);
        pthread_mutex_destroy(&pub->lock);
        free(pub);
}

uint64_t outbox_publisher_published(const struct outbox_publisher *pub)
{
        return atomic_load(&((struct outbox_publisher *)pub)->published);
}
