#pragma once

/*
 * Thin device ids in PostgreSQL, per (host, pool), and the repair of what a crash leaves.
 *
 * Ids are allocated lowest-free-first under a transaction-scoped advisory lock per host. An
 * id is unique on its host, not only in its pool, because origins are named thin-<id> (the
 * seed's names) and device-mapper names are per host. Like containerd's devmapper snapshotter,
 * every row records its intent before the dm message that acts on it: 'creating' before
 * create_thin/create_snap, 'deleting' before delete, 'ready' once the device is complete. A crash
 * between intent and result leaves a row that says what to check: reconciliation compares rows with
 * the pool's metadata and finishes or undoes the step.
 */

#include <stdbool.h>
#include <stdint.h>

struct db;

struct thin_row {
        uint32_t device_id;
        char kind[16];  /* origin, snapshot, unknown */
        char state[16]; /* creating, ready, deleting */
        uint64_t size_bytes;
        char checksum[65];
        int64_t origin_id; /* -1 when none */
        char run_id[32];
        int64_t file_count;
        int64_t extracted_bytes;
};

/*
 * Take the host's allocation lock (a transaction-scoped advisory lock) inside a transaction.
 * thin_registry_alloc() takes it too; a caller that must look something up before allocating
 * (content dedup) takes it first, so the lookup and the insert are one atomic step.
 */
int thin_registry_lock(struct db *db, const char *host);

/*
 * Allocate the lowest free id and insert its row in state 'creating'. Must run inside a
 * transaction (db_tx). -EEXIST when @kind is origin and a live origin for @checksum exists
 * (the unique index); -ENOSPC when all 2^24 ids are taken.
 */
int thin_registry_alloc(struct db *db, const char *host, const char *pool, const char *kind,
                        uint64_t size_bytes, const char *checksum, int64_t origin_id,
                        const char *run_id, uint32_t *ret_id);

/* Look up rows. Return 1 when found (and fill @ret), 0 when not, or a negative errno. */
int thin_registry_get(struct db *db, const char *host, const char *pool, uint32_t id,
                      struct thin_row *ret);
int thin_registry_find_by_run(struct db *db, const char *host, const char *pool, const char *kind,
                              const char *run_id, struct thin_row *ret);
int thin_registry_find_origin(struct db *db, const char *host, const char *pool,
                              const char *checksum, struct thin_row *ret);

/* Set a row's state. */
int thin_registry_set_state(struct db *db, const char *host, const char *pool, uint32_t id,
                            const char *state);

/*
 * Remove a thin device for good: mark the row 'deleting', deactivate every active device that
 * maps the id, remove what a killed activation left under the row's names (a device without a
 * live table, whose inactive table would keep the id busy), delete the id from the pool (an id
 * the pool no longer has counts as deleted), then delete the row and any snapshot or image row
 * naming it. Each step is safe to repeat. An id without a row is left alone (gone already, or
 * not ours). A device that is open (a VM's root, a mount) makes it fail with -EBUSY before
 * anything changes; one opened between that check and the deactivation gets its row's state
 * back.
 */
int thin_registry_destroy(struct db *db, const char *host, const char *pool, uint32_t id);

/*
 * thin_registry_destroy() for origin @id, unless something still uses it: an image other than
 * @except_image (NULL: any image) maps to it, a snapshot of another image was taken from it,
 * or it is still being made. The check and the 'deleting' mark are one transaction under the
 * allocation lock, which unpack also holds when it maps an image to an existing origin, so no
 * image can come to share an origin that gc has chosen. Returns 0 when removed (or no such
 * row), 1 when it is in use and was left alone, or a negative errno: -EBUSY when the device is
 * open, with nothing changed.
 */
int thin_registry_destroy_unused_origin(struct db *db, const char *host, const char *pool,
                                        uint32_t id, const char *except_image);

/*
 * The pools this host has rows in, plus @also (POOL_NAME), sorted and without duplicates: a
 * request may name any pool. Returns how many, with @ret_pools a NULL-terminated array owned
 * by the caller (thin_registry_pools_free()), or a negative errno.
 */
int thin_registry_pools(struct db *db, const char *host, const char *also, char ***ret_pools);
void thin_registry_pools_free(char **pools);

/* What reconciliation found about one id. */
enum thin_reconcile_finding {
        THIN_RECONCILE_REMOVED_HALF_MADE, /* 'creating' row of a dead or failed run: undone */
        THIN_RECONCILE_FINISHED_DELETE,   /* 'deleting' row: the delete was completed */
        THIN_RECONCILE_RESERVED_UNKNOWN,  /* id in the pool, not in the database: reserved */
        THIN_RECONCILE_MISSING_IN_POOL,   /* 'ready' row whose id the pool does not have */
        THIN_RECONCILE_IN_PROGRESS,       /* 'creating' row of a resumable run: left alone */
        THIN_RECONCILE_RESUMED_SUSPENDED, /* devices a killed create_snap left suspended */
        THIN_RECONCILE_STALLED,           /* a run that can resume has not, for too long */
};

typedef void (*thin_reconcile_fn)(enum thin_reconcile_finding what, uint32_t id, const char *detail,
                                  void *userdata);

/*
 * Compare the rows of (@host, @pool) with the ids in the pool's metadata and, when @repair,
 * fix what is safe to fix: undo half-made devices of runs that can no longer resume (failed,
 * aborted, complete, or gone; a 'pending' or 'running' run resumes when its message comes
 * back, however late, so its device stays), finish interrupted deletes, resume devices a
 * killed snapshot left suspended, reserve ids the pool has but the database does not (they
 * may belong to an operator: never deleted automatically) and drop reserved rows whose id
 * has left the pool. Reserved ids are reported on every call, and so are rows whose id the
 * pool lacks. @cb (may be NULL) hears every finding. Returns the number of problems left
 * unrepaired (0 = consistent), or a negative errno.
 */
int thin_registry_reconcile(struct db *db, const char *host, const char *pool, bool repair,
                            thin_reconcile_fn cb, void *userdata);

/*
 * The 'creating' rows of (@host, @pool) whose run could still resume but has not come back
 * for more than @older_than_s seconds after its lease expired: its message was probably lost,
 * and its half-made device stays until somebody finishes the run (reconciliation leaves it
 * alone). @cb hears each (THIN_RECONCILE_STALLED), told what to do. Returns how many, or a
 * negative errno.
 */
int thin_registry_stalled(struct db *db, const char *host, const char *pool, int older_than_s,
                          thin_reconcile_fn cb, void *userdata);

/*
 * Bring the kernel back in line with the rows after a reboot: activate every ready origin as
 * thin-<id> and every active snapshot under its name (devices already active are left as
 * they are). Returns the number activated, or a negative errno; @cb hears failures.
 */
int thin_registry_reactivate(struct db *db, const char *host, const char *pool,
                             thin_reconcile_fn cb, void *userdata);

/* "thin-<id>" */
void thin_registry_origin_name(uint32_t id, char *buf, unsigned long size);
