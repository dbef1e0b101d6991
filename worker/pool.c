/*
 * A stage's worker pool.
 *
 * Threads. The dispatcher thread owns the consumer: it polls, runs the rebalance callback,
 * pauses and resumes partitions, and stores offsets. Worker threads take jobs (one message
 * each) from the ready list, run the stage, and put the job on the done list with its result;
 * the dispatcher then acts on it. The lists are the only state shared with workers, under one
 * mutex. A worker wakes the dispatcher out of its poll with rd_kafka_queue_yield().
 *
 * Offsets. Auto-commit stays on but auto-store is off: the dispatcher stores a partition's
 * offset with rd_kafka_offsets_store() when a job is done, which means its run finished (or
 * was found finished) and that transaction committed, or its dead letter was acknowledged.
 * The stored offset is the lowest offset still in flight on that partition (pool_offsets.c),
 * so nothing is stored past unfinished work. librdkafka then commits stored offsets every
 * auto.commit.interval.ms, when partitions are revoked, and on close: three places where a
 * hand-rolled commit would be easy to get wrong.
 *
 * Flow control. Jobs queued or running count against the pool's capacity: its threads plus a
 * buffer of queued jobs sized to the pool's pace (pool_flow_control). At capacity, or with
 * too many delayed retries, every assigned partition is paused; when half the buffer is used
 * up they resume. A rebalance re-applies the pause to what is newly assigned.
 *
 * Retries. FSM_OUTCOME_BUSY (another worker holds the run) and FSM_OUTCOME_INTERRUPTED (lease
 * lost, database unreachable) leave the message in flight, its offset unstored, and put the
 * job on a delayed list with exponential backoff and jitter, capped at the lease duration (a
 * dead owner's lease has run out by then). Other messages of the partition, and other
 * partitions, go on meanwhile, and nothing polls hot. A stage call that fails outright (the
 * engine could not claim or record the run) is retried the same way when the error is
 * transient, at most MAX_ATTEMPTS times unless PostgreSQL is unreachable, and otherwise
 * dead-lettered: no message can hold its partition's commit point for good.
 *
 * Rebalance. Newly assigned partitions get a fresh tracker under a new epoch. A revoked
 * partition's queued and delayed jobs are dropped (its new owner reads them again from the
 * committed offset); jobs already running finish, but their offsets are not stored, as the
 * partition is no longer ours: the new owner finds their keys complete, or busy until then.
 *
 * Shutdown. Queued and delayed jobs are dropped unacknowledged; running ones finish their
 * current transition (the stop flag makes the FSM engine stop and release the run) until the
 * deadline; finished work is stored and committed synchronously; the consumer is closed.
 */
#include "worker/pool.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <json-c/json.h>
#include <librdkafka/rdkafka.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "stages/request.h"
#include "worker/dlq.h"
#include "worker/fsm.h"
#include "worker/kafka_client.h"
#include "worker/kafka_producer.h"
#include "worker/metrics.h"
#include "worker/outbox_publisher.h"
#include "worker/pool_offsets.h"
#include "worker/stage.h"

#define POOL_POLL_MS 100
/*
 * After a resume, librdkafka 2.0.2 sends the next fetch only when its broker thread wakes up,
 * up to about 500 ms later (measured here; confluent-kafka-go issue 630 shows the same). The
 * queued-job buffer covers that long at the pool's current pace, within these bounds.
 */
#define POOL_REFETCH_MS 500
#define POOL_MAX_BUFFER 1024
#define POOL_RETRY_BASE_MS 200
#define POOL_DLQ_BACKOFF_MAX_MS 5000
#define POOL_ERROR_LOG_INTERVAL_MS 10000

enum pool_job_result {
        POOL_JOB_DONE,    /* store the offset */
        POOL_JOB_RETRY,   /* run again after a delay */
        POOL_JOB_ABANDON, /* shutting down: leave it for redelivery */
};

struct pool_job {
        struct pool_job *next;
        rd_kafka_message_t *msg; /* owned */
        uint64_t epoch;          /* of its partition when received */
        int retries;
        int failures;             /* transient failures of the stage call itself, for its bound */
        int64_t first_failure_ms; /* wall clock of the first of them, 0 before one */
        enum metrics_retry_reason retry_reason; /* why, when result is POOL_JOB_RETRY */
        int64_t not_before_ms;
        enum pool_job_result result;
};

struct pool_partition {
        struct pool_partition *next;
        int32_t partition;
        uint64_t epoch;
        struct pool_offsets *offsets;
        int64_t stored; /* last offset stored, -1 if none */
};

struct pool_thread {
        struct pool *pool;
        pthread_t thread;
        bool started;
        struct db *db;
        char worker_id[192];
};

struct job_list {
        struct pool_job *head, *tail;
        size_t n;
};

struct pool {
        struct pool_options opts;
        char topic[KAFKA_NAME_MAX];
        rd_kafka_t *rk;
        rd_kafka_queue_t *queue; /* the consumer queue, to yield the dispatcher's poll */
        pthread_t dispatcher;
        bool dispatcher_started;
        struct pool_thread *threads;

        /* Shared with the workers, under lock. */
        pthread_mutex_t lock;
        pthread_cond_t work;
        struct job_list ready;
        struct job_list done;
        int running;
        int64_t job_us; /* moving average of the duration of a job that finished */
        bool workers_exit;
        bool stopping;
        int64_t deadline_ms;

        /* Dispatcher only. */
        struct pool_partition *parts;
        uint64_t epochs;
        struct job_list delayed;
        bool paused;
        /* Since the last pause or resume, for its log line: */
        size_t load_peak;     /* most jobs queued or running */
        size_t capacity_peak; /* largest capacity (threads + buffer) flow control allowed */
        bool draining;        /* shutting down: received messages are dropped */
        bool all_finished;
        int64_t last_error_log_ms;

        atomic_bool failed;
        atomic_uint_fast64_t stats[5];
        atomic_int_fast64_t polled_ms; /* monotonic time of the dispatcher's last poll */
};

enum {
        POOL_STAT_COMPLETED,
        POOL_STAT_ALREADY,
        POOL_STAT_DLQ,
        POOL_STAT_RETRIED,
        POOL_STAT_ABANDONED,
};

static void pool_count(struct pool *pool, int stat)
{
        atomic_fetch_add(&pool->stats[stat], 1);
}

/* ---- job lists ---------------------------------------------------------------------- */

static void job_list_push(struct job_list *l, struct pool_job *job)
{
        job->next = NULL;
        if (l->tail)
                l->tail->next = job;
        else
                l->head = job;
        l->tail = job;
        l->n++;
}

static struct pool_job *job_list_pop(struct job_list *l)
{
        struct pool_job *job = l->head;

        if (!job)
                return NULL;
        l->head = job->next;
        if (!l->head)
                l->tail = NULL;
        l->n--;
        job->next = NULL;
        return job;
}

static void pool_job_free(struct pool_job *job)
{
        if (!job)
                return;
        rd_kafka_message_destroy(job->msg);
        free(job);
}

/* Remove and free the jobs of @partition (every job when @partition < 0). */
static size_t job_list_drop(struct job_list *l, int32_t partition)
{
        struct job_list keep = {0};
        struct pool_job *job;
        size_t dropped = 0;

        while ((job = job_list_pop(l))) {
                if (partition < 0 || job->msg->partition == partition) {
                        pool_job_free(job);
                        dropped++;
                } else {
                        job_list_push(&keep, job);
                }
        }
        *l = keep;
        return dropped;
}

/* ---- partitions --------------------------------------------------------------------- */

static struct pool_partition *pool_partition_find(struct pool *pool, int32_t partition)
{
        for (struct pool_partition *p = pool->parts; p; p = p->next) {
                if (p->partition == partition)
                        return p;
        }
        return NULL;
}

static int pool_partition_add(struct pool *pool, int32_t partition)
{
        struct pool_partition *p = pool_partition_find(pool, partition);
        int r;

        if (p)
                return 0;
        p = calloc(1, sizeof(*p));
        if (!p)
                return err_set(-ENOMEM, "out of memory");
        r = pool_offsets_new(&p->offsets);
        if (r < 0) {
                free(p);
                return r;
        }
        p->partition = partition;
        p->epoch = ++pool->epochs;
        p->stored = -1;
        p->next = pool->parts;
        pool->parts = p;
        return 0;
}

static void pool_partition_remove(struct pool *pool, int32_t partition)
{
        for (struct pool_partition **pp = &pool->parts; *pp; pp = &(*pp)->next) {
                struct pool_partition *p = *pp;

                if (p->partition != partition)
                        continue;
                *pp = p->next;
                pool_offsets_free(p->offsets);
                free(p);
                return;
        }
}

/* The assigned partitions as a list for pause/resume; NULL when there are none. */
static rd_kafka_topic_partition_list_t *pool_partition_list(struct pool *pool)
{
        rd_kafka_topic_partition_list_t *list;
        int n = 0;

        for (struct pool_partition *p = pool->parts; p; p = p->next)
                n++;
        if (n == 0)
                return NULL;
        list = rd_kafka_topic_partition_list_new(n);
        for (struct pool_partition *p = pool->parts; p; p = p->next)
                (void)rd_kafka_topic_partition_list_add(list, pool->topic, p->partition);
        return list;
}

static void pool_set_paused(struct pool *pool, bool pause)
{
        rd_kafka_topic_partition_list_t *list = pool_partition_list(pool);
        rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;

        pool->paused = pause;
        if (!list)
                return;
        err = pause ? rd_kafka_pause_partitions(pool->rk, list)
                    : rd_kafka_resume_partitions(pool->rk, list);
        if (err)
                log_warning("failed to pause or resume partitions", "topic=%s pause=%d error=%s",
                            pool->topic, pause, rd_kafka_err2name(err));
        else
                log_debug(pause ? "partitions paused" : "partitions resumed",
                          "topic=%s partitions=%d load_peak=%zu capacity_peak=%zu", pool->topic,
                          list->cnt, pool->load_peak, pool->capacity_peak);
        pool->load_peak = 0;
        pool->capacity_peak = 0;
        rd_kafka_topic_partition_list_destroy(list);
}

/* Store the partition's commit point if it moved. */
static void pool_store_offset(struct pool *pool, struct pool_partition *p)
{
        int64_t point = pool_offsets_commit_point(p->offsets);
        rd_kafka_topic_partition_list_t *list;
        rd_kafka_resp_err_t err;

        if (point < 0 || point == p->stored)
                return;
        list = rd_kafka_topic_partition_list_new(1);
        rd_kafka_topic_partition_list_add(list, pool->topic, p->partition)->offset = point;
        err = rd_kafka_offsets_store(pool->rk, list);
        if (!err && list->elems[0].err)
                err = list->elems[0].err;
        rd_kafka_topic_partition_list_destroy(list);
        if (err) {
                log_debug("offset not stored",
                          "topic=%s partition=%" PRId32 " offset=%" PRId64 " error=%s", pool->topic,
                          p->partition, point, rd_kafka_err2name(err));
                return;
        }
        p->stored = point;
}

/* ---- rebalance ---------------------------------------------------------------------- */

static void pool_assign(struct pool *pool, rd_kafka_topic_partition_list_t *parts, bool cooperative)
{
        rd_kafka_error_t *error = NULL;
        rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;

        for (int i = 0; i < parts->cnt; i++) {
                if (pool_partition_add(pool, parts->elems[i].partition) < 0) {
                        log_err_errno(-ENOMEM, "failed to track an assigned partition", "");
                        atomic_store(&pool->failed, true);
                }
        }
        if (cooperative)
                error = rd_kafka_incremental_assign(pool->rk, parts);
        else
                err = rd_kafka_assign(pool->rk, parts);
        if (error) {
                log_err("failed to assign partitions", "topic=%s error=%s", pool->topic,
                        log_quote(rd_kafka_error_string(error)));
                rd_kafka_error_destroy(error);
        } else if (err) {
                log_err("failed to assign partitions", "topic=%s error=%s", pool->topic,
                        rd_kafka_err2name(err));
        }
        log_info("partitions assigned", "topic=%s count=%d paused=%d", pool->topic, parts->cnt,
                 pool->paused);
        /* A new assignment starts unpaused: re-apply a pause in force. */
        if (pool->paused)
                pool_set_paused(pool, true);
}

static void pool_revoke(struct pool *pool, rd_kafka_topic_partition_list_t *parts, bool cooperative,
                        bool lost)
{
        size_t dropped = 0;

        pthread_mutex_lock(&pool->lock);
        for (int i = 0; i < parts->cnt; i++)
                dropped += job_list_drop(&pool->ready, parts->elems[i].partition);
        pthread_mutex_unlock(&pool->lock);
        for (int i = 0; i < parts->cnt; i++) {
                dropped += job_list_drop(&pool->delayed, parts->elems[i].partition);
                pool_partition_remove(pool, parts->elems[i].partition);
        }
        log_info("partitions revoked", "topic=%s count=%d lost=%d dropped_jobs=%zu", pool->topic,
                 parts->cnt, lost, dropped);
        /* With auto-commit on, librdkafka commits the stored offsets of what it removes. */
        if (cooperative) {
                rd_kafka_error_t *error = rd_kafka_incremental_unassign(pool->rk, parts);

                if (error) {
                        log_warning("failed to unassign partitions", "error=%s",
                                    log_quote(rd_kafka_error_string(error)));
                        rd_kafka_error_destroy(error);
                }
        } else {
                (void)rd_kafka_assign(pool->rk, NULL);
        }
}

static void pool_rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                              rd_kafka_topic_partition_list_t *parts, void *opaque)
{
        struct pool *pool = opaque;
        /* NULL when the group has no protocol yet (a failed rebalance): treat as eager. */
        const char *protocol = rd_kafka_rebalance_protocol(rk);
        bool cooperative = protocol && strcmp(protocol, "COOPERATIVE") == 0;

        if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS) {
                pool_assign(pool, parts, cooperative);
        } else if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS) {
                pool_revoke(pool, parts, cooperative, rd_kafka_assignment_lost(rk) == 1);
        } else {
                log_warning("rebalance failed", "topic=%s error=%s", pool->topic,
                            rd_kafka_err2name(err));
                pool_revoke(pool, parts, cooperative, true);
        }
}

static void pool_error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
        struct pool *pool = opaque;
        char fatal[512];

        if (err != RD_KAFKA_RESP_ERR__FATAL) {
                log_warning("kafka consumer error, will retry",
                            "topic=%s kafka_error=%s"
                            " reason=%s",
                            pool->topic, rd_kafka_err2name((rd_kafka_resp_err_t)err),
                            log_quote(reason));
                return;
        }
        (void)rd_kafka_fatal_error(rk, fatal, sizeof(fatal));
        log_err("kafka consumer failed fatally", "topic=%s reason=%s", pool->topic,
                log_quote(fatal));
        atomic_store(&pool->failed, true);
}

/* ---- the work of one message (worker threads) --------------------------------------- */

/* A NUL-terminated copy of the message value, or a reason why it is not a JSON document. */
static char *pool_job_value(const rd_kafka_message_t *msg, char *why, size_t why_size)
{
        enum json_tokener_error jerr = json_tokener_success;
        struct json_tokener *tok;
        struct json_object *obj;
        size_t end;
        char *value;

        if (!msg->payload || msg->len == 0) {
                (void)snprintf(why, why_size, "message has no value");
                return NULL;
        }
        if (msg->len > REQUEST_JSON_MAX) {
                (void)snprintf(why, why_size, "message of %zu bytes exceeds %d bytes", msg->len,
                               REQUEST_JSON_MAX);
                return NULL;
        }
        value = malloc(msg->len + 1);
        if (!value) {
                (void)snprintf(why, why_size, "out of memory");
                return NULL;
        }
        memcpy(value, msg->payload, msg->len);
        value[msg->len] = '\0';
        tok = json_tokener_new();
        obj = tok ? json_tokener_parse_ex(tok, value, (int)msg->len) : NULL;
        if (tok)
                jerr = json_tokener_get_error(tok);
        end = tok ? json_tokener_get_parse_end(tok) : 0;
        while (end < msg->len && strchr(" \t\r\n", value[end]))
                end++;
        if (!obj || jerr != json_tokener_success || end != msg->len || strlen(value) != msg->len) {
                (void)snprintf(why, why_size, "message is not a JSON document: %s",
                               obj ? "trailing data" : json_tokener_error_desc(jerr));
                free(value);
                value = NULL;
        }
        json_object_put(obj);
        if (tok)
                json_tokener_free(tok);
        return value;
}

static bool pool_stop_requested(const struct pool *pool)
{
        return pool->opts.stop && *pool->opts.stop;
}

/* "<topic>/<partition>/<offset>": how runs and run-less dead letters name a message. */
static void pool_job_source(const struct pool *pool, const struct pool_job *job, char *buf,
                            size_t size)
{
        (void)snprintf(buf, size, "%s/%" PRId32 "/%" PRId64, pool->topic, job->msg->partition,
                       job->msg->offset);
}

/*
 * Copy the message to the dead-letter topic, retrying until it is stored or we stop. A
 * message without a run has its dead letter recorded by dlq_runless_record(), so that its
 * redelivery after a crash is only acknowledged; a run records it itself (pool_job_failed).
 */
static enum pool_job_result pool_job_dead_letter(struct pool_thread *t, struct pool_job *job,
                                                 const struct dlq_failure *f)
{
        struct pool *pool = t->pool;
        bool runless = !f->run_id || !f->run_id[0];
        char source[KAFKA_NAME_MAX + 48];
        int64_t delay = 250;
        int r;

        pool_job_source(pool, job, source, sizeof(source));
        if (runless) {
                r = dlq_runless_stored(t->db, source, job->msg);
                if (r > 0) {
                        pool_count(pool, POOL_STAT_ALREADY);
                        log_info("dead letter already stored for this message, acknowledged",
                                 "offset=%" PRId64, job->msg->offset);
                        return POOL_JOB_DONE;
                }
                /* Unknown: writing it (again) loses nothing. */
                if (r < 0)
                        log_warning_errno(
                                r,
                                "could not check for an earlier dead letter of this message, writing one",
                                "offset=%" PRId64, job->msg->offset);
        }
        for (;;) {
                r = dlq_send(pool->opts.producer, pool->opts.cfg, job->msg, f);
                if (r == 0)
                        break;
                if (pool_stop_requested(pool))
                        return POOL_JOB_ABANDON;
                log_warning_errno(r, "failed to dead-letter a message, will retry",
                                  "topic=%s partition=%" PRId32 " offset=%" PRId64
                                  " retry_in_ms=%" PRId64,
                                  pool->topic, job->msg->partition, job->msg->offset, delay);
                for (int64_t slept = 0; slept < delay && !pool_stop_requested(pool); slept += 100)
                        util_sleep_ms(100);
                delay = delay * 2 > POOL_DLQ_BACKOFF_MAX_MS ? POOL_DLQ_BACKOFF_MAX_MS : delay * 2;
        }
        pool_count(pool, POOL_STAT_DLQ);
        metrics_dlq(pool->opts.stage->id, f->error_class);
        log_warning("message sent to the dead-letter topic",
                    "topic=%s partition=%" PRId32 " offset=%" PRId64 " error_class=%s error=%s",
                    pool->topic, job->msg->partition, job->msg->offset, f->error_class,
                    log_quote(f->error_text));
        if (runless) {
                r = dlq_runless_record(t->db, pool->opts.cfg, source, job->msg);
                if (r < 0)
                        log_warning_errno(
                                r,
                                "failed to record the dead letter, ignoring; a redelivery would write another",
                                "offset=%" PRId64, job->msg->offset);
        }
        return POOL_JOB_DONE;
}

/*
 * A failed run goes to the dead-letter topic, and the run records that its dead letter is
 * stored. A redelivery of the same message (the worker died before committing its offset)
 * then finds the failure recorded against this very message: it starts no new run and, when
 * the dead letter is known to be stored, writes no second one.
 */
static enum pool_job_result pool_job_failed(struct pool_thread *t, struct pool_job *job,
                                            const struct stage_result *res,
                                            const struct dlq_failure *f)
{
        struct pool *pool = t->pool;
        enum pool_job_result result;
        int r;

        if (res->dead_lettered) {
                pool_count(pool, POOL_STAT_ALREADY);
                log_info("dead letter already stored for this message, acknowledged",
                         "offset=%" PRId64, job->msg->offset);
                return POOL_JOB_DONE;
        }
        result = pool_job_dead_letter(t, job, f);
        if (result != POOL_JOB_DONE || !res->run_id[0])
                return result;
        r = fsm_mark_dead_lettered(t->db, res->run_id);
        if (r < 0)
                log_warning_errno(r,
                                  "failed to record the dead letter on its run, ignoring;"
                                  " a redelivery would write another",
                                  "offset=%" PRId64, job->msg->offset);
        return result;
}

static enum pool_job_result pool_job_outcome(struct pool_thread *t, struct pool_job *job,
                                             struct stage_result *res)
{
        struct pool *pool = t->pool;
        struct dlq_failure f = {
                .stage = pool->opts.stage->name,
                .error_class = res->error_class ? res->error_class : STAGE_ERROR_PERMANENT,
                .error_text = res->error_text,
                .run_id = res->run_id,
                .attempts = res->attempts,
                .first_failure_ms = res->first_failure_ms,
                .last_failure_ms = res->last_failure_ms,
        };

        switch (res->outcome) {
        case FSM_OUTCOME_COMPLETE:
                pool_count(pool, POOL_STAT_COMPLETED);
                if (pool->opts.publisher)
                        outbox_publisher_wake(pool->opts.publisher);
                return POOL_JOB_DONE;
        case FSM_OUTCOME_ALREADY_COMPLETE:
                /* An unpublished handoff goes out by the publisher's next pass; a missing one
                 * (a run made with the handoff off) was written by the claim. */
                pool_count(pool, POOL_STAT_ALREADY);
                log_debug("already complete, acknowledged", "offset=%" PRId64, job->msg->offset);
                return POOL_JOB_DONE;
        case FSM_OUTCOME_FAILED:
                return pool_job_failed(t, job, res, &f);
        case FSM_OUTCOME_BUSY:
                log_debug("run busy in another worker, will retry", "offset=%" PRId64,
                          job->msg->offset);
                job->retry_reason = METRICS_RETRY_BUSY;
                return POOL_JOB_RETRY;
        case FSM_OUTCOME_INTERRUPTED:
        default:
                if (pool_stop_requested(pool))
                        return POOL_JOB_ABANDON;
                log_warning("run interrupted, will retry", "offset=%" PRId64 " error=%s",
                            job->msg->offset, log_quote(res->error_text));
                job->retry_reason = METRICS_RETRY_INTERRUPTED;
                return POOL_JOB_RETRY;
        }
}

/*
 * The trace id and parent run id as the run will store them. A producer's value that is not
 * printable ASCII (invalid UTF-8 would make PostgreSQL refuse the run; a long non-ASCII value
 * would be cut mid-character) is not used: the message still runs, under a new trace id,
 * without a parent.
 */
static void pool_job_headers(struct pool *pool, const struct pool_job *job, struct stage_ctx *ctx,
                             char *trace_id, size_t trace_size, char *parent, size_t parent_size)
{
        int r;

        r = kafka_client_header_text(job->msg, MSG_HEADER_TRACE_ID, trace_id, trace_size);
        if (r < 0)
                log_notice("bad trace id header, using a new trace id",
                           "topic=%s partition=%" PRId32 " offset=%" PRId64 " error=%s",
                           pool->topic, job->msg->partition, job->msg->offset,
                           log_quote(err_last()));
        if (r <= 0 && ulid_new(trace_id) < 0)
                ctx->trace_id = NULL;
        r = kafka_client_header_text(job->msg, MSG_HEADER_PARENT_RUN_ID, parent, parent_size);
        if (r < 0)
                log_notice("bad parent run id header, ignoring",
                           "topic=%s partition=%" PRId32 " offset=%" PRId64 " error=%s",
                           pool->topic, job->msg->partition, job->msg->offset,
                           log_quote(err_last()));
        ctx->parent_run_id = r > 0 ? parent : NULL;
        err_clear();
}

/*
 * The stage call failed before deciding anything (@r < 0): the engine could not claim or
 * record the run. A permanent error will not go away by itself (PostgreSQL refusing a value,
 * an idempotency key too long), so the message is dead-lettered at once. A transient one is
 * retried with backoff, at most MAX_ATTEMPTS times, then dead-lettered as exhausted: a message
 * that keeps failing must not hold its partition's commit point, and the pool's delayed-job
 * budget, forever. PostgreSQL being unreachable is not counted against the message: every
 * message fails alike then, and the pool waits (paused) until it is back.
 */
static enum pool_job_result pool_job_stage_error(struct pool_thread *t, struct pool_job *job, int r,
                                                 const struct stage_result *res)
{
        struct pool *pool = t->pool;
        bool db_down = r == -ECONNRESET || r == -ECONNREFUSED;
        char text[ERR_MSG_MAX];
        struct dlq_failure f = {
                .stage = pool->opts.stage->name,
                .error_class = STAGE_ERROR_PERMANENT,
                .error_text = text,
                .run_id = res->run_id,
        };

        if (pool_stop_requested(pool))
                return POOL_JOB_ABANDON;
        (void)snprintf(text, sizeof(text), "%s", err_text(r));
        log_redact(text);
        /* No run records these failures: the job itself remembers when they began. */
        if (!job->first_failure_ms)
                job->first_failure_ms = util_now_realtime_ms();
        f.first_failure_ms = job->first_failure_ms;
        if (err_is_transient(r)) {
                if (!db_down)
                        job->failures++;
                if (job->failures < pool->opts.cfg->max_attempts) {
                        log_warning_errno(r, "stage call failed, will retry",
                                          "offset=%" PRId64 " failures=%d", job->msg->offset,
                                          job->failures);
                        job->retry_reason = METRICS_RETRY_STAGE_CALL;
                        return POOL_JOB_RETRY;
                }
                f.error_class = STAGE_ERROR_EXHAUSTED;
        }
        /* Logged once, by the dead letter's own line. */
        f.attempts = job->failures > 0 ? job->failures : 1;
        return pool_job_dead_letter(t, job, &f);
}

static enum pool_job_result pool_job_run(struct pool_thread *t, struct pool_job *job)
{
        struct pool *pool = t->pool;
        const struct stage *stage = pool->opts.stage;
        char trace_id[64], parent[64], why[256], source[KAFKA_NAME_MAX + 48];
        struct stage_result res = {0};
        struct stage_ctx ctx = {
                .cfg = pool->opts.cfg,
                .db = t->db,
                .leases = pool->opts.leases,
                .worker_id = t->worker_id,
                .stop = pool->opts.stop,
                .trace_id = trace_id,
                .source = source,
                .handoff = true,
        };
        enum pool_job_result result;
        int64_t started_ms;
        char *value;
        int r;

        log_context_set(NULL, NULL, stage->name, -1);
        pool_job_headers(pool, job, &ctx, trace_id, sizeof(trace_id), parent, sizeof(parent));
        pool_job_source(pool, job, source, sizeof(source));
        value = pool_job_value(job->msg, why, sizeof(why));
        if (!value) {
                struct dlq_failure f = {.stage = stage->name,
                                        .error_class = STAGE_ERROR_INVALID_REQUEST,
                                        .error_text = why};

                metrics_job_finished(stage->id, METRICS_OUTCOME_INVALID, 0);
                result = pool_job_dead_letter(t, job, &f);
                log_context_clear();
                return result;
        }
        started_ms = util_now_monotonic_ms();
        r = stage->handle(&ctx, value, &res);
        free(value);
        metrics_job_finished(stage->id,
                             r < 0 ? METRICS_OUTCOME_INTERRUPTED : metrics_outcome_of(&res),
                             (double)(util_now_monotonic_ms() - started_ms) / 1000.0);
        log_context_set(res.run_id[0] ? res.run_id : NULL, res.image_id[0] ? res.image_id : NULL,
                        stage->name, res.run_id[0] ? res.attempts : -1);
        if (r < 0) {
                /* The call could not proceed (database down, ...): nothing was decided. */
                result = pool_job_stage_error(t, job, r, &res);
        } else {
                result = pool_job_outcome(t, job, &res);
        }
        stage_result_done(&res);
        log_context_clear();
        return result;
}

static void *pool_worker_main(void *arg)
{
        struct pool_thread *t = arg;
        struct pool *pool = t->pool;

        for (;;) {
                int64_t started, took_us;
                struct pool_job *job;

                pthread_mutex_lock(&pool->lock);
                while (!pool->ready.head && !pool->workers_exit)
                        pthread_cond_wait(&pool->work, &pool->lock);
                job = job_list_pop(&pool->ready);
                if (job) {
                        pool->running++;
                        metrics_inflight_set(pool->opts.stage->id, pool->running);
                }
                pthread_mutex_unlock(&pool->lock);
                if (!job)
                        break;

                started = util_now_monotonic_ms();
                job->result = pool_job_run(t, job);
                took_us = (util_now_monotonic_ms() - started) * 1000 + 500;

                pthread_mutex_lock(&pool->lock);
                /* The pace of finishing messages: a quick "busy, retry later" is not one. */
                if (job->result != POOL_JOB_RETRY)
                        pool->job_us = pool->job_us ? (7 * pool->job_us + took_us) / 8 : took_us;
                pool->running--;
                metrics_inflight_set(pool->opts.stage->id, pool->running);
                job_list_push(&pool->done, job);
                pthread_mutex_unlock(&pool->lock);
                rd_kafka_queue_yield(pool->queue);
        }
        return NULL;
}

/* ---- dispatcher --------------------------------------------------------------------- */

static uint32_t pool_random(void)
{
        uint32_t v = 0;

        if (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v))
                v = (uint32_t)util_now_monotonic_ms();
        return v;
}

/* Put a retried job on the delayed list, ordered by due time. */
static void pool_delay(struct pool *pool, struct pool_job *job)
{
        int lease_ms = pool->opts.cfg->lease_seconds * 1000;
        struct pool_job **pp = &pool->delayed.head;
        int64_t delay;

        job->retries++;
        delay = fsm_backoff_ms(job->retries, POOL_RETRY_BASE_MS, lease_ms, pool_random());
        job->not_before_ms = util_now_monotonic_ms() + delay;
        /* Counted here, not by the worker thread: a job of a revoked partition is no retry. */
        pool_count(pool, POOL_STAT_RETRIED);
        metrics_retry(pool->opts.stage->id, job->retry_reason);
        while (*pp && (*pp)->not_before_ms <= job->not_before_ms)
                pp = &(*pp)->next;
        job->next = *pp;
        *pp = job;
        if (!job->next)
                pool->delayed.tail = job;
        pool->delayed.n++;
}

static void pool_finish(struct pool *pool, struct pool_job *job)
{
        struct pool_partition *p = pool_partition_find(pool, job->msg->partition);

        if (!p || p->epoch != job->epoch) {
                /* Revoked while it ran: the partition's new owner reads it again. */
                pool_job_free(job);
                return;
        }
        switch (job->result) {
        case POOL_JOB_DONE:
                (void)pool_offsets_done(p->offsets, job->msg->offset);
                pool_store_offset(pool, p);
                pool_job_free(job);
                break;
        case POOL_JOB_RETRY:
                pool_delay(pool, job);
                break;
        case POOL_JOB_ABANDON:
                /* Stays in flight: its offset is never stored by this consumer. */
                pool_count(pool, POOL_STAT_ABANDONED);
                pool_job_free(job);
                break;
        }
}

/*
 * Act on the finished jobs. Returns how many jobs were running when the done list was taken:
 * read under the same lock, so when it is 0 no job can finish later and be missed (during
 * shutdown nothing new is started).
 */
static int pool_drain_done(struct pool *pool)
{
        struct job_list done;
        struct pool_job *job;
        int running;

        pthread_mutex_lock(&pool->lock);
        done = pool->done;
        memset(&pool->done, 0, sizeof(pool->done));
        running = pool->running;
        pthread_mutex_unlock(&pool->lock);
        while ((job = job_list_pop(&done)))
                pool_finish(pool, job);
        return running;
}

/* Move delayed jobs whose time has come to the ready list. */
static void pool_release_due(struct pool *pool)
{
        int64_t now = util_now_monotonic_ms();
        bool any = false;

        pthread_mutex_lock(&pool->lock);
        while (pool->delayed.head && pool->delayed.head->not_before_ms <= now) {
                job_list_push(&pool->ready, job_list_pop(&pool->delayed));
                any = true;
        }
        if (any)
                pthread_cond_broadcast(&pool->work);
        pthread_mutex_unlock(&pool->lock);
}

/*
 * Pause at capacity: every thread busy and the buffer of queued jobs full; resume once half
 * the buffer is used up, so that workers still have queued jobs while the refetch after a
 * resume travels (a pause drops what librdkafka had prefetched for the partitions). The
 * buffer holds what the threads get through in POOL_REFETCH_MS at the recent job duration:
 * a few jobs for a stage that works for seconds, up to POOL_MAX_BUFFER for messages that
 * are acknowledged in a millisecond.
 */
static void pool_flow_control(struct pool *pool)
{
        size_t threads = (size_t)pool->opts.threads;
        size_t delayed_max = threads * 4 > 16 ? threads * 4 : 16;
        size_t buffer, load;
        int64_t job_us;

        pthread_mutex_lock(&pool->lock);
        load = pool->ready.n + (size_t)pool->running;
        job_us = pool->job_us;
        pthread_mutex_unlock(&pool->lock);
        buffer = job_us > 0 ? (size_t)((int64_t)threads * POOL_REFETCH_MS * 1000 / job_us) : 0;
        if (buffer > POOL_MAX_BUFFER)
                buffer = POOL_MAX_BUFFER;
        if (buffer < threads * 2)
                buffer = threads * 2;
        if (threads + buffer > pool->capacity_peak)
                pool->capacity_peak = threads + buffer;
        if (load > pool->load_peak)
                pool->load_peak = load;
        if (!pool->paused && (load >= threads + buffer || pool->delayed.n >= delayed_max))
                pool_set_paused(pool, true);
        else if (pool->paused && load <= threads + buffer / 2 && pool->delayed.n < delayed_max)
                pool_set_paused(pool, false);
}

static void pool_receive(struct pool *pool, rd_kafka_message_t *msg)
{
        struct pool_partition *p;
        struct pool_job *job;
        int r;

        if (msg->err) {
                int64_t now = util_now_monotonic_ms();

                if (now - pool->last_error_log_ms >= POOL_ERROR_LOG_INTERVAL_MS) {
                        pool->last_error_log_ms = now;
                        log_warning("kafka consumer error, will retry",
                                    "topic=%s kafka_error=%s reason=%s", pool->topic,
                                    rd_kafka_err2name(msg->err),
                                    log_quote(rd_kafka_message_errstr(msg)));
                }
                rd_kafka_message_destroy(msg);
                return;
        }
        p = pool_partition_find(pool, msg->partition);
        if (!p || pool->draining) {
                /* Not ours (any more), or shutting down: it stays unacknowledged. */
                rd_kafka_message_destroy(msg);
                return;
        }
        r = pool_offsets_add(p->offsets, msg->offset);
        if (r == 1) {
                /* Delivered twice: the first copy is in flight already. */
                rd_kafka_message_destroy(msg);
                return;
        }
        job = r == 0 ? calloc(1, sizeof(*job)) : NULL;
        if (!job) {
                /* The partition's commit point cannot pass it; stop rather than stall. */
                log_err_errno(-ENOMEM, "failed to track a message, stopping the pool", "");
                atomic_store(&pool->failed, true);
                rd_kafka_message_destroy(msg);
                return;
        }
        job->msg = msg;
        job->epoch = p->epoch;
        pthread_mutex_lock(&pool->lock);
        job_list_push(&pool->ready, job);
        pthread_cond_signal(&pool->work);
        pthread_mutex_unlock(&pool->lock);
}

/* Commit what is stored now and close the consumer (its revocation commits once more). */
static void pool_close_consumer(struct pool *pool)
{
        rd_kafka_resp_err_t err = rd_kafka_commit(pool->rk, NULL, 0);

        if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
                log_warning("failed to commit offsets at shutdown", "topic=%s kafka_error=%s",
                            pool->topic, rd_kafka_err2name(err));
        err = rd_kafka_consumer_close(pool->rk);
        if (err)
                log_warning("failed to close the consumer cleanly", "topic=%s kafka_error=%s",
                            pool->topic, rd_kafka_err2name(err));
}

static void pool_shutdown(struct pool *pool)
{
        size_t dropped;
        int running;

        pool->draining = true;
        pool_set_paused(pool, true);
        pthread_mutex_lock(&pool->lock);
        dropped = job_list_drop(&pool->ready, -1);
        pthread_mutex_unlock(&pool->lock);
        dropped += job_list_drop(&pool->delayed, -1);
        for (;;) {
                rd_kafka_message_t *msg;

                running = pool_drain_done(pool);
                if (running == 0 || util_now_monotonic_ms() >= pool->deadline_ms)
                        break;
                /* Keep serving the group (heartbeats, rebalances) while runs finish. */
                msg = rd_kafka_consumer_poll(pool->rk, POOL_POLL_MS);
                if (msg)
                        pool_receive(pool, msg);
        }
        pthread_mutex_lock(&pool->lock);
        pool->workers_exit = true;
        pthread_cond_broadcast(&pool->work);
        pthread_mutex_unlock(&pool->lock);
        pool->all_finished = running == 0;
        if (running > 0)
                log_warning(
                        "runs still going at the shutdown deadline, leaving them to their leases",
                        "topic=%s running=%d", pool->topic, running);
        pool_close_consumer(pool);
        log_info("pool stopped",
                 "topic=%s dropped_unstarted=%zu completed=%" PRIu64 " already_complete=%" PRIu64
                 " dead_lettered=%" PRIu64,
                 pool->topic, dropped, (uint64_t)atomic_load(&pool->stats[POOL_STAT_COMPLETED]),
                 (uint64_t)atomic_load(&pool->stats[POOL_STAT_ALREADY]),
                 (uint64_t)atomic_load(&pool->stats[POOL_STAT_DLQ]));
}

static bool pool_is_stopping(struct pool *pool)
{
        bool stopping;

        pthread_mutex_lock(&pool->lock);
        stopping = pool->stopping;
        pthread_mutex_unlock(&pool->lock);
        return stopping || atomic_load(&pool->failed);
}

/*
 * Consumer lag of this pool's partitions for /metrics: high watermark minus position, from
 * librdkafka's cached values. A partition assigned but not fetched from yet has no position:
 * its consumption starts at the group's committed offset, asked from the coordinator (only
 * then, and only for those partitions), or at the low watermark when nothing was committed
 * (auto.offset.reset=earliest). Taking the low watermark whenever the position is unknown
 * would report the whole retained topic as lag after every restart.
 */
static void pool_report_lag(struct pool *pool)
{
        rd_kafka_topic_partition_list_t *list = pool_partition_list(pool);
        rd_kafka_topic_partition_list_t *unknown = NULL;
        int64_t lag = 0;

        if (!list) {
                metrics_lag_set(pool->opts.stage->id, 0);
                return;
        }
        if (rd_kafka_position(pool->rk, list) != RD_KAFKA_RESP_ERR_NO_ERROR)
                goto out;
        for (int i = 0; i < list->cnt; i++) {
                if (list->elems[i].offset < 0) {
                        if (!unknown)
                                unknown = rd_kafka_topic_partition_list_new(list->cnt);
                        (void)rd_kafka_topic_partition_list_add(unknown, pool->topic,
                                                                list->elems[i].partition);
                }
        }
        /* On failure the unknown partitions are left out rather than guessed. */
        if (unknown && rd_kafka_committed(pool->rk, unknown, 1000) != RD_KAFKA_RESP_ERR_NO_ERROR) {
                rd_kafka_topic_partition_list_destroy(unknown);
                unknown = NULL;
        }
        for (int i = 0; i < list->cnt; i++) {
                int64_t low, high, from = list->elems[i].offset;
                rd_kafka_topic_partition_t *c = NULL;

                if (from < 0) {
                        c = unknown ? rd_kafka_topic_partition_list_find(unknown, pool->topic,
                                                                         list->elems[i].partition)
                                    : NULL;
                        if (!c || c->err)
                                continue;
                }
                if (rd_kafka_get_watermark_offsets(pool->rk, pool->topic, list->elems[i].partition,
                                                   &low, &high) != RD_KAFKA_RESP_ERR_NO_ERROR ||
                    high < 0)
                        continue;
                if (c)
                        from = c->offset >= 0 ? c->offset : low;
                lag += high > from ? high - from : 0;
        }
out:
        if (unknown)
                rd_kafka_topic_partition_list_destroy(unknown);
        rd_kafka_topic_partition_list_destroy(list);
        metrics_lag_set(pool->opts.stage->id, lag);
}

static void *pool_dispatch_main(void *arg)
{
        struct pool *pool = arg;
        int64_t lag_at = 0;

        while (!pool_is_stopping(pool)) {
                rd_kafka_message_t *msg;

                if (util_now_monotonic_ms() >= lag_at) {
                        pool_report_lag(pool);
                        lag_at = util_now_monotonic_ms() + 5000;
                }
                (void)pool_drain_done(pool);
                pool_release_due(pool);
                pool_flow_control(pool);
                msg = rd_kafka_consumer_poll(pool->rk, POOL_POLL_MS);
                atomic_store(&pool->polled_ms, util_now_monotonic_ms());
                if (msg)
                        pool_receive(pool, msg);
        }
        pthread_mutex_lock(&pool->lock);
        if (!pool->stopping) {
                /* Failed on its own: give running jobs the usual grace period. */
                pool->stopping = true;
                pool->deadline_ms =
                        util_now_monotonic_ms() + (int64_t)pool->opts.cfg->shutdown_timeout * 1000;
        }
        pthread_mutex_unlock(&pool->lock);
        pool_shutdown(pool);
        return NULL;
}

/* ---- lifecycle ---------------------------------------------------------------------- */

static int pool_consumer_new(struct pool *pool)
{
        const char *props[] = {
                "group.id",
                pool->topic,
                "partition.assignment.strategy",
                "cooperative-sticky",
                "enable.auto.offset.store",
                "false",
                "enable.auto.commit",
                "true",
                "auto.commit.interval.ms",
                "1000",
                /* A job enqueued before its group first existed must still run. */
                "auto.offset.reset",
                "earliest",
                /* Prefetch little: the pool pauses at a few jobs per thread anyway. */
                "queued.min.messages",
                "1000",
                NULL,
        };
        rd_kafka_topic_partition_list_t *topics;
        rd_kafka_conf_t *conf = NULL;
        rd_kafka_resp_err_t err;
        int r;

        r = kafka_client_conf_new(pool->opts.cfg, RD_KAFKA_CONSUMER, pool->opts.stage->name, props,
                                  &conf);
        if (r < 0)
                return r;
        rd_kafka_conf_set_opaque(conf, pool);
        rd_kafka_conf_set_rebalance_cb(conf, pool_rebalance_cb);
        rd_kafka_conf_set_error_cb(conf, pool_error_cb);
        /* rd_kafka_new() takes the conf. */
        r = kafka_client_new(RD_KAFKA_CONSUMER, conf, &pool->rk);
        conf = NULL;
        if (r < 0)
                return r;
        (void)rd_kafka_poll_set_consumer(pool->rk);
        pool->queue = rd_kafka_queue_get_consumer(pool->rk);
        topics = rd_kafka_topic_partition_list_new(1);
        (void)rd_kafka_topic_partition_list_add(topics, pool->topic, RD_KAFKA_PARTITION_UA);
        err = rd_kafka_subscribe(pool->rk, topics);
        rd_kafka_topic_partition_list_destroy(topics);
        if (err)
                return kafka_client_errno(err, "failed to subscribe");
        return 0;
}

static int pool_start_threads(struct pool *pool)
{
        sigset_t all, old;
        int r = 0;

        /* Signals go to the main thread only. */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        for (int i = 0; i < pool->opts.threads && r == 0; i++) {
                r = pthread_create(&pool->threads[i].thread, NULL, pool_worker_main,
                                   &pool->threads[i]);
                pool->threads[i].started = r == 0;
        }
        if (r == 0) {
                r = pthread_create(&pool->dispatcher, NULL, pool_dispatch_main, pool);
                pool->dispatcher_started = r == 0;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (r != 0)
                return err_set(-r, "failed to start pool threads: %s", strerror(r));
        return 0;
}

int pool_new(const struct pool_options *opts, struct pool **ret_pool)
{
        struct pool *pool;
        int r;

        FIM_ASSERT(opts->threads >= 1 && opts->stage && opts->leases && opts->producer);
        pool = calloc(1, sizeof(*pool));
        if (!pool)
                return err_set(-ENOMEM, "out of memory");
        pool->opts = *opts;
        pthread_mutex_init(&pool->lock, NULL);
        pthread_cond_init(&pool->work, NULL);
        atomic_init(&pool->failed, false);
        atomic_init(&pool->polled_ms, 0);
        for (size_t i = 0; i < ARRAY_SIZE(pool->stats); i++)
                atomic_init(&pool->stats[i], 0);
        r = kafka_client_topic(opts->cfg, opts->stage->name, pool->topic, sizeof(pool->topic));
        if (r < 0)
                goto fail;
        pool->threads = calloc((size_t)opts->threads, sizeof(*pool->threads));
        if (!pool->threads) {
                r = err_set(-ENOMEM, "out of memory");
                goto fail;
        }
        for (int i = 0; i < opts->threads; i++) {
                struct pool_thread *t = &pool->threads[i];

                t->pool = pool;
                (void)snprintf(t->worker_id, sizeof(t->worker_id), "%s/%ld/%s.%d",
                               opts->cfg->host_id, (long)getpid(), opts->stage->name, i);
                r = db_connect(opts->cfg->database_url, &t->db);
                if (r < 0)
                        goto fail;
        }
        r = pool_consumer_new(pool);
        if (r < 0)
                goto fail;
        r = pool_start_threads(pool);
        if (r < 0)
                goto fail;
        *ret_pool = pool;
        return 0;
fail:
        pool_stop(pool, 0);
        (void)pool_wait(pool);
        pool_free(pool);
        return r;
}

void pool_stop(struct pool *pool, int64_t deadline_ms)
{
        pthread_mutex_lock(&pool->lock);
        if (!pool->stopping) {
                pool->stopping = true;
                pool->deadline_ms = deadline_ms;
        }
        /* Idle workers may exit now; busy ones finish first. */
        pthread_cond_broadcast(&pool->work);
        pthread_mutex_unlock(&pool->lock);
        if (pool->queue)
                rd_kafka_queue_yield(pool->queue);
}

bool pool_wait(struct pool *pool)
{
        if (pool->dispatcher_started) {
                (void)pthread_join(pool->dispatcher, NULL);
                pool->dispatcher_started = false;
        } else {
                /* Never started: nothing runs, let the workers go. */
                pthread_mutex_lock(&pool->lock);
                pool->workers_exit = true;
                pthread_cond_broadcast(&pool->work);
                pthread_mutex_unlock(&pool->lock);
                pool->all_finished = true;
        }
        if (!pool->all_finished)
                return false;
        for (int i = 0; pool->threads && i < pool->opts.threads; i++) {
                if (pool->threads[i].started)
                        (void)pthread_join(pool->threads[i].thread, NULL);
                pool->threads[i].started = false;
        }
        return true;
}

void pool_free(struct pool *pool)
{
        if (!pool)
                return;
        (void)pool_drain_done(pool);
        (void)job_list_drop(&pool->ready, -1);
        (void)job_list_drop(&pool->delayed, -1);
        while (pool->parts)
                pool_partition_remove(pool, pool->parts->partition);
        if (pool->queue)
                rd_kafka_queue_destroy(pool->queue);
        if (pool->rk)
                rd_kafka_destroy(pool->rk);
        for (int i = 0; pool->threads && i < pool->opts.threads; i++)
                db_free(pool->threads[i].db);
        free(pool->threads);
        pthread_cond_destroy(&pool->work);
        pthread_mutex_destroy(&pool->lock);
        free(pool);
}

bool pool_failed(const struct pool *pool)
{
        return atomic_load(&((struct pool *)pool)->failed);
}

bool pool_consuming(struct pool *pool, int64_t max_idle_ms, char *reason, size_t reason_size)
{
        int64_t polled = atomic_load(&pool->polled_ms);
        char *member;

        if (atomic_load(&pool->failed)) {
                (void)snprintf(reason, reason_size, "the %s consumer failed", pool->topic);
                return false;
        }
        if (polled == 0 || util_now_monotonic_ms() - polled > max_idle_ms) {
                (void)snprintf(reason, reason_size,
                               "the %s consumer has not polled for %" PRId64 " ms", pool->topic,
                               polled ? util_now_monotonic_ms() - polled : -1);
                return false;
        }
        /* Thread-safe: librdkafka reads the member id under its own lock. */
        member = rd_kafka_memberid(pool->rk);
        if (!member || !member[0]) {
                (void)snprintf(reason, reason_size, "the %s consumer has not joined its group yet",
                               pool->topic);
                if (member)
                        rd_kafka_mem_free(pool->rk, member);
                return false;
        }
        rd_kafka_mem_free(pool->rk, member);
        return true;
}

void pool_get_stats(const struct pool *pool, struct pool_stats *ret)
{
        struct pool *p = (struct pool *)pool;

        ret->completed = atomic_load(&p->stats[POOL_STAT_COMPLETED]);
        ret->already_complete = atomic_load(&p->stats[POOL_STAT_ALREADY]);
        ret->dead_lettered = atomic_load(&p->stats[POOL_STAT_DLQ]);
        ret->retried = atomic_load(&p->stats[POOL_STAT_RETRIED]);
        ret->abandoned = atomic_load(&p->stats[POOL_STAT_ABANDONED]);
}

const char *pool_stage_name(const struct pool *pool)
{
        return pool->opts.stage->name;
}
