#pragma once

/*
 * Lease keeper: one background thread with its own PostgreSQL connection that keeps the
 * leases of every run this process is executing alive. A run's lease says "worker W owns
 * this run until time T"; when a worker dies, its leases run out and the next worker that
 * sees the run's message takes it over (DESIGN §3).
 *
 * Every third of the lease duration the thread extends each registered lease, fenced on the
 * owner token. When an extension finds the run owned by someone else (the lease had already
 * expired and was taken over, e.g. after a long pause), the lease is marked lost; the FSM
 * engine then stops the run without recording anything more.
 */

#include <stdbool.h>

struct lease_keeper;
struct lease;

/* Start the keeper thread. @lease_ms is the lease duration. Returns 0 or -errno. */
int lease_keeper_new(const char *db_url, int lease_ms, struct lease_keeper **ret_keeper);

/* Stop the thread and free. Registered leases are not released (their runs may resume). */
void lease_keeper_free(struct lease_keeper *keeper);

/* The lease duration the keeper extends by, in ms. */
int lease_keeper_lease_ms(const struct lease_keeper *keeper);

/* Start keeping @run_id's lease for @owner alive. Returns 0 or -ENOMEM. */
int lease_keeper_add(struct lease_keeper *keeper, const char *run_id, const char *owner,
                     struct lease **ret_lease);

/* Stop keeping a lease alive and free the handle. NULL is a no-op. */
void lease_keeper_remove(struct lease_keeper *keeper, struct lease *lease);

/* Whether the keeper found that this lease is owned by someone else now. */
bool lease_lost(const struct lease *lease);

/* Mark a lease lost (the engine does this when a fenced write finds another owner). */
void lease_mark_lost(struct lease *lease);
