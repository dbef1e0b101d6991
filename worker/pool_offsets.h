#pragma once

/*
 * Per-partition offset bookkeeping for a pool that runs a partition's messages concurrently.
 *
 * Kafka keeps one committed offset per partition: "everything below this is done". With
 * several messages of a partition in flight and finishing out of order, the offset that may
 * be stored is the lowest offset still in flight; when nothing is in flight, one past the
 * highest offset finished. Storing more would skip an unfinished message after a crash;
 * storing less only makes a restarted consumer see finished messages again, which the
 * idempotency keys absorb.
 *
 * Not thread-safe: the pool's dispatcher thread owns every tracker.
 */

#include <stddef.h>
#include <stdint.h>

struct pool_offsets;

/* A tracker with nothing in flight. Returns 0 or -ENOMEM. */
int pool_offsets_new(struct pool_offsets **ret);

/* NULL is a no-op. */
void pool_offsets_free(struct pool_offsets *t);

/*
 * A message at @offset was received and is now in flight. Returns 0, 1 when that offset is
 * already in flight (a duplicate delivery: the caller drops it), or -ENOMEM.
 */
int pool_offsets_add(struct pool_offsets *t, int64_t offset);

/* The message at @offset is finished. Returns 0, or -ENOENT when it was not in flight. */
int pool_offsets_done(struct pool_offsets *t, int64_t offset);

/*
 * The offset to store (the next one a restarted consumer should read), or -1 when nothing
 * has finished yet.
 */
int64_t pool_offsets_commit_point(const struct pool_offsets *t);

/* How many offsets are in flight (received, not finished). */
size_t pool_offsets_in_flight(const struct pool_offsets *t);
