#pragma once

/*
 * Lease keeper: one background thread with its own PostgreSQL connection that keeps the
 * leases of every run this process is executing alive. A run's lease says "worker W owns
 * this run until time T"; when a worker dies, its leases run out and the next worker that
 * sees the run's message takes it over (DESIGN §3).
 *
 * Every third of the lease duration the thread extends each registered lease, fenced on the
 * owner token. A lease is lost, and the FSM engine then stops the run without recording
 * anything more, when either
 *   - an extension finds the run owned by someone else (the lease had already expired and
 *     was taken over, e.g. after a long pause), or
 *   - no grant or extension has succeeded for a whole lease duration (the database is
 *     unreachable or too slow): from then on another worker may take the run over, so this
 *     one must stop. This is measured on the monotonic clock from the moment the last
 *     successful extension was sent, and checked by lease_lost() itself, so it holds even
 *     while the keeper thread is stuck in a database call.
 */

#include <stdbool.h>
#include <stdint.h>

/*
 * The longest lease owner token. The engine builds it from the worker id (host id, pid,
 * stage, thread) and a per-execution token; an owner that does not fit is refused rather
 * than truncated, since a truncated owner would never match its own lease.
 */
#define LEASE_OWNER_MAX 255

struct lease_keeper;
struct lease;

/* Start the keeper thread. @lease_ms is the lease duration. Returns 0 or -errno. */
int lease_keeper_new(const char *db_url, int lease_ms, struct lease_keeper **ret_keeper);

/* Stop the thread and free. Registered leases are not released (their runs may resume). */
void lease_keeper_free(struct lease_keeper *keeper);

/* The lease duration the keeper extends by, in ms. */
int lease_keeper_lease_ms(const struct lease_keeper *keeper);

/*
 * Start keeping @run_id's lease for @owner alive. @granted_ms is the monotonic time
 * (util_now_monotonic_ms) at or before which the lease was granted: the claim started then.
 * Returns 0, -ENAMETOOLONG for an owner longer than LEASE_OWNER_MAX, or -ENOMEM.
 */
int lease_keeper_add(struct lease_keeper *keeper, const char *run_id, const char *owner,
                     int64_t granted_ms, struct lease **ret_lease);

/* Stop keeping a lease alive and free the handle. NULL is a no-op. Never waits for I/O. */
void lease_keeper_remove(struct lease_keeper *keeper, struct lease *lease);

/*
 * Whether this lease is lost: taken over by someone else, or not extended for a whole lease
 * duration. Once lost, a lease stays lost.
 */
bool lease_lost(const struct lease *lease);

/* Mark a lease lost (the engine does this when a fenced write finds another owner). */
void lease_mark_lost(struct lease *lease);
