#pragma once

/*
 * The dead-letter topic "<prefix>.dlq". A message that cannot be processed (not JSON, an
 * invalid request, a run that aborted or used up its attempts) is copied there with its
 * original key, value and headers, plus headers that say what happened:
 *
 *   stage             the stage whose topic it came from ("download")
 *   error_class       invalid_request, permanent or exhausted
 *   error             the error text, with secrets masked
 *   attempts          how many attempts the run made (0: no run was started)
 *   run_id            the failed run (absent when no run was started)
 *   host              HOST_ID of the worker
 *   first_failure_at  RFC 3339 UTC times of the run's first and last failure
 *   last_failure_at
 *   source_topic, source_partition, source_offset   where the original was
 *
 * The original "attempt" header stays as it was; replay-dlq re-publishes the original with
 * attempt + 1, "replayed_from" set to the dead letter's "<dlq topic>/<partition>/<offset>",
 * and without the headers above.
 */

#include <stdbool.h>
#include <stdint.h>

#include <librdkafka/rdkafka.h>

#include "common/ulid.h"

struct config;
struct db;
struct kafka_producer;

#define DLQ_HEADER_STAGE "stage"
#define DLQ_HEADER_ERROR_CLASS "error_class"
#define DLQ_HEADER_ERROR "error"
#define DLQ_HEADER_ATTEMPTS "attempts"
#define DLQ_HEADER_RUN_ID "run_id"
#define DLQ_HEADER_HOST "host"
#define DLQ_HEADER_FIRST_FAILURE "first_failure_at"
#define DLQ_HEADER_LAST_FAILURE "last_failure_at"
#define DLQ_HEADER_SOURCE_TOPIC "source_topic"
#define DLQ_HEADER_SOURCE_PARTITION "source_partition"
#define DLQ_HEADER_SOURCE_OFFSET "source_offset"

/* Headers every message of the pipeline may carry. */
#define MSG_HEADER_TRACE_ID "trace_id"
#define MSG_HEADER_PARENT_RUN_ID "parent_run_id"
#define MSG_HEADER_ATTEMPT "attempt"
#define MSG_HEADER_REPLAYED_FROM "replayed_from"

/* Longest error text kept in a header. */
#define DLQ_ERROR_MAX 1024

struct dlq_failure {
        const char *stage;
        const char *error_class;
        const char *error_text;
        const char *run_id; /* NULL or "" when no run was started */
        int attempts;
        int64_t first_failure_ms; /* 0: now */
        int64_t last_failure_ms;  /* 0: now */
};

/*
 * Copy @msg to the dead-letter topic with the failure headers and wait for the broker's
 * acknowledgement. Returns 0 once the record is stored, else a negative errno (the caller
 * retries; the original's offset must not be stored before this succeeded).
 */
int dlq_send(struct kafka_producer *p, const struct config *cfg, const rd_kafka_message_t *msg,
             const struct dlq_failure *f);

/*
 * A message dead-lettered without a run (not JSON, an invalid request, a stage call that
 * could not record a run) has no run to remember its dead letter on; these two keep the
 * record in PostgreSQL instead, by @source ("<topic>/<partition>/<offset>") and the SHA-256
 * of the message's value, so that a redelivery of the very same message after a crash is only
 * acknowledged.
 *
 * dlq_runless_stored() returns 1 when this message's dead letter is recorded as stored, 0 when
 * not, or a negative errno. dlq_runless_record() records it, after the broker acknowledged the
 * dead letter, and prunes records older than 30 days; returns 0 or a negative errno.
 */
int dlq_runless_stored(struct db *db, const char *source, const rd_kafka_message_t *msg);
int dlq_runless_record(struct db *db, const struct config *cfg, const char *source,
                       const rd_kafka_message_t *msg);

/* What replay-dlq selects by. Missing headers leave fields empty or 0. */
struct dlq_record {
        char stage[32];
        char error_class[32];
        char run_id[ULID_LEN + 1];
        char error[DLQ_ERROR_MAX];
        int attempt;             /* the original's attempt header; 1 when absent */
        int attempts;            /* the run's attempts */
        int64_t last_failure_ms; /* 0 when absent or unreadable */
};

/* Read the headers of a record from the dead-letter topic. Returns 0, or -EINVAL without a stage.
 */
int dlq_record_parse(const rd_kafka_message_t *msg, struct dlq_record *ret);

/*
 * Headers to re-publish a dead letter with: the original's headers without the dead-letter
 * ones, "attempt" set to @attempt and "replayed_from" to @replayed_from. NULL on ENOMEM.
 */
rd_kafka_headers_t *dlq_replay_headers(const rd_kafka_message_t *msg, int attempt,
                                       const char *replayed_from);

/* Whether @name is one of the headers dlq_send() adds. */
bool dlq_is_dlq_header(const char *name);
