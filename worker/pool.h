#pragma once

/*
 * A stage's worker pool: one Kafka consumer in group "<prefix>.<stage>" on topic
 * "<prefix>.<stage>" (cooperative-sticky assignment), a dispatcher thread that owns the
 * consumer, and a bounded set of worker threads, each with its own PostgreSQL connection,
 * that run the stage for one message at a time. See pool.c for how offsets, pausing,
 * retries and dead letters work.
 */

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct config;
struct kafka_producer;
struct lease_keeper;
struct outbox_publisher;
struct pool;
struct stage;

struct pool_options {
        const struct config *cfg;
        const struct stage *stage;
        int threads;                        /* worker threads, >= 1 */
        struct lease_keeper *leases;        /* borrowed */
        struct kafka_producer *producer;    /* borrowed: dead letters */
        struct outbox_publisher *publisher; /* borrowed, optional: woken after completions */
        const atomic_int *stop;             /* shutdown requested: runs stop between steps */
};

struct pool_stats {
        uint64_t completed;        /* runs finished by this pool */
        uint64_t already_complete; /* messages whose key had finished before */
        uint64_t dead_lettered;
        uint64_t retried;   /* BUSY, INTERRUPTED or a transient stage-call failure, re-run
                               after a delay (fim_retries_total counts them by reason) */
        uint64_t abandoned; /* left unacknowledged at shutdown, for redelivery */
};

/*
 * Connect the worker threads to DATABASE_URL, create the consumer, subscribe and start the
 * threads. Returns 0 or a negative errno; nothing is left running on failure.
 */
int pool_new(const struct pool_options *opts, struct pool **ret_pool);

/*
 * Begin shutdown: stop taking messages, drop queued ones (they are redelivered later), let
 * running jobs finish until the monotonic clock reaches @deadline_ms, store and commit the
 * offsets of finished work, close the consumer. Returns at once; pool_wait() waits.
 */
void pool_stop(struct pool *pool, int64_t deadline_ms);

/*
 * Wait for the shutdown begun by pool_stop(). Returns true when every worker thread has
 * finished; false when some job was still running at the deadline (its run is left to its
 * lease, and the pool must not be freed).
 */
bool pool_wait(struct pool *pool);

/* Free a pool whose pool_wait() returned true. NULL is a no-op. */
void pool_free(struct pool *pool);

/* Whether the pool stopped working on its own (fatal consumer error, out of memory). */
bool pool_failed(const struct pool *pool);

/*
 * For /readyz: whether the dispatcher polled the consumer within @max_idle_ms and the consumer
 * has joined its group. Otherwise writes why not into @reason. Safe from any thread.
 */
bool pool_consuming(struct pool *pool, int64_t max_idle_ms, char *reason, size_t reason_size);

/* Counters so far. */
void pool_get_stats(const struct pool *pool, struct pool_stats *ret);

/* The stage's name, for logs. */
const char *pool_stage_name(const struct pool *pool);
