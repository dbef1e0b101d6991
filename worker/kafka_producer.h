#pragma once

/*
 * One idempotent Kafka producer per process, shared by the outbox publisher, the pools (dead
 * letters) and the CLI commands. Each send names a caller-owned struct kafka_delivery that
 * the delivery report fills in; kafka_producer_wait() blocks until it has. A background
 * thread serves the delivery reports, so any number of threads may send and wait at once.
 *
 * With enable.idempotence=true the broker de-duplicates librdkafka's internal retries, so a
 * message that reports success was written exactly once by that send; a caller that sends
 * again after a failed or timed-out report may still produce a duplicate, which every consumer
 * of ours tolerates (idempotency keys).
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <librdkafka/rdkafka.h>

struct config;
struct kafka_producer;

/* Filled in by the delivery report. Zero it before the send; keep it alive until waited on. */
struct kafka_delivery {
        bool done;
        rd_kafka_resp_err_t err;
        int32_t partition;
        int64_t offset;
};

/* One message to send. @headers (may be NULL) is taken over by kafka_producer_send(). */
struct kafka_record {
        const char *topic;
        const void *key;
        size_t key_len;
        const void *value;
        size_t value_len;
        rd_kafka_headers_t *headers;
};

/*
 * Create the producer (enable.idempotence=true, acks=all) and its delivery thread. @name goes
 * into the client.id; @timeout_ms is message.timeout.ms, how long librdkafka keeps trying a
 * message before its delivery reports failure (FIM_KAFKA_OPTIONS may override it). Returns 0
 * or a negative errno.
 */
int kafka_producer_new(const struct config *cfg, const char *name, int timeout_ms,
                       struct kafka_producer **ret);

/*
 * Wait up to @timeout_ms for outstanding messages, purge what is left (their deliveries
 * report failure, waking any waiter), stop the thread and free. NULL is a no-op.
 */
void kafka_producer_free(struct kafka_producer *p, int timeout_ms);

/*
 * Queue @rec for sending; key and value are copied. Takes rec->headers in all cases. On
 * success @d is filled in later by the delivery report; on failure (returns a negative
 * errno) no report will come. A full local queue is waited out, not reported.
 */
int kafka_producer_send(struct kafka_producer *p, const struct kafka_record *rec,
                        struct kafka_delivery *d);

/*
 * Block until @d has its delivery report (at most message.timeout.ms after the send).
 * Returns 0 when the broker acknowledged the
 * message, else a negative errno with the reason in err_last().
 */
int kafka_producer_wait(struct kafka_producer *p, struct kafka_delivery *d);

/* Send and wait: 0 once the broker has the message. */
int kafka_producer_send_sync(struct kafka_producer *p, const struct kafka_record *rec,
                             struct kafka_delivery *ret_delivery);

/*
 * Whether the producer hit a fatal error (e.g. the idempotence sequence broke): it will not
 * deliver again and the process should restart.
 */
bool kafka_producer_failed(const struct kafka_producer *p);

/* The librdkafka handle, borrowed, for metadata queries. */
rd_kafka_t *kafka_producer_handle(struct kafka_producer *p);

/* A header set made of NUL-terminated name/value pairs; NULL values are skipped. */
rd_kafka_headers_t *kafka_headers_new(size_t count, const char *const *names,
                                      const char *const *values);
