#pragma once

/*
 * The outbox publisher: a thread with its own PostgreSQL connection that sends the rows of
 * the outbox table (handoffs to the next stage, written in the transaction that completed a
 * run) to Kafka and marks them published.
 *
 * Each pass locks a batch of this host's unpublished rows with FOR UPDATE SKIP LOCKED, so
 * several worker processes on one host share the work without sending a row twice at once;
 * sends them through the idempotent producer with the row's headers; waits for every delivery
 * report; and marks the delivered rows published in the same transaction. A row whose
 * delivery failed stays unpublished for the next pass. A crash between delivery and commit
 * sends the row again later: consumers tolerate duplicates, never a loss.
 */

#include <stdint.h>

struct config;
struct db;
struct kafka_producer;
struct outbox_publisher;

/* Rows per pass. */
#define OUTBOX_BATCH 64

/*
 * Connect to DATABASE_URL and start the thread. @producer is borrowed and must outlive the
 * publisher. Returns 0 or a negative errno.
 */
int outbox_publisher_new(const struct config *cfg, struct kafka_producer *producer,
                         struct outbox_publisher **ret);

/* Ask for a pass now (a run just completed and wrote a handoff). Cheap; any thread. */
void outbox_publisher_wake(struct outbox_publisher *pub);

/*
 * Keep publishing until nothing is left or the monotonic clock passes @deadline_ms, then stop
 * the thread. Waking a stopped publisher is harmless. Idempotent.
 */
void outbox_publisher_stop(struct outbox_publisher *pub, int64_t deadline_ms);

/* Stop at once (if not stopped yet) and free. NULL is a no-op. */
void outbox_publisher_free(struct outbox_publisher *pub);

/* Rows published so far by this publisher. */
uint64_t outbox_publisher_published(const struct outbox_publisher *pub);

/*
 * One pass on @db: send up to @limit unpublished rows of @host_id and mark the delivered ones.
 * Returns the number published (0 when there was nothing), or a negative errno.
 */
int outbox_publish_batch(struct db *db, struct kafka_producer *producer, const char *host_id,
                         int limit);
