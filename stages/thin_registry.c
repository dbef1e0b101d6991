#include "stages/thin_registry.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "db/db.h"
#include "stages/thin_pool.h"

#define THIN_ROW_COLUMNS                                                                           \
        "device_id, kind, state, size_bytes, coalesce(checksum, ''),"                              \
        " coalesce(origin_id, -1), coalesce(run_id, ''), coalesce(file_count, 0),"                 \
        " coalesce(extracted_bytes, 0)"

void thin_registry_origin_name(uint32_t id, char *buf, unsigned long size)
{
        (void)snprintf(buf, size, "thin-%" PRIu32, id);
}

static void thin_row_from(const PGresult *res, int row, struct thin_row *ret)
{
        memset(ret, 0, sizeof(*ret));
        ret->device_id = (uint32_t)db_get_i64(res, row, 0);
        (void)snprintf(ret->kind, sizeof(ret->kind), "%s", db_get(res, row, 1));
        (void)snprintf(ret->state, sizeof(ret->state), "%s", db_get(res, row, 2));
        ret->size_bytes = (uint64_t)db_get_i64(res, row, 3);
        (void)snprintf(ret->checksum, sizeof(ret->checksum), "%s", db_get(res, row, 4));
        ret->origin_id = db_get_i64(res, row, 5);
        (void)snprintf(ret->run_id, sizeof(ret->run_id), "%s", db_get(res, row, 6));
        ret->file_count = db_get_i64(res, row, 7);
        ret->extracted_bytes = db_get_i64(res, row, 8);
}

static int thin_registry_query_one(struct db *db, const char *sql, int n, const char *const *params,
                                   struct thin_row *ret)
{
        PGresult *res = NULL;
        int r = db_query_row(db, &res, sql, n, params);

        if (r <= 0)
                return r;
        thin_row_from(res, 0, ret);
        PQclear(res);
        return 1;
}

int thin_registry_lock(struct db *db, const char *host)
{
        return db_exec(db, NULL, "SELECT pg_advisory_xact_lock(hashtext($1))", 1,
                       (const char *const[]){host});
}

int thin_registry_alloc(struct db *db, const char *host, const char *pool, const char *kind,
                        uint64_t size_bytes, const char *checksum, int64_t origin_id,
                        const char *run_id, uint32_t *ret_id)
{
        char size[24], origin[24];
        const char *lock[1] = {host};
        PGresult *res = NULL;
        uint32_t id;
        int r;

        /*
         * One allocator at a time per host, and the lowest id free on the whole host: the
         * seed names origins thin-<id>, and dm names are per host, so two pools on one host
         * must never hand out the same id. The lock may be held already (it stacks).
         */
        r = thin_registry_lock(db, host);
        if (r < 0)
                return r;
        r = db_query_row(db, &res,
                         "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM thin_devices WHERE"
                         " host_id = $1 AND device_id = 0) THEN 0 ELSE"
                         " (SELECT min(t.device_id) + 1 FROM thin_devices t WHERE"
                         " t.host_id = $1 AND NOT EXISTS (SELECT 1 FROM thin_devices u WHERE"
                         " u.host_id = $1 AND u.device_id = t.device_id + 1)) END",
                         1, lock);
        if (r < 0)
                return r;
        id = (uint32_t)db_get_i64(res, 0, 0);
        PQclear(res);
        if (id > THIN_POOL_DEV_ID_MAX)
                return err_set(-ENOSPC, "all thin device ids of pool '%s' are in use", pool);
        (void)snprintf(size, sizeof(size), "%" PRIu64, size_bytes);
        (void)snprintf(origin, sizeof(origin), "%" PRId64, origin_id);
        {
                char idbuf[16];
                const char *params[8] = {
                        host,  pool, idbuf, kind, size, checksum, origin_id >= 0 ? origin : NULL,
                        run_id};

                (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, id);
                r = db_exec(db, NULL,
                            "INSERT INTO thin_devices (host_id, pool_name, device_id, kind, state,"
                            " size_bytes, checksum, origin_id, run_id)"
                            " VALUES ($1, $2, $3, $4, 'creating', $5, $6, $7, $8)",
                            8, params);
        }
        if (r < 0)
                return r;
        *ret_id = id;
        return 0;
}

int thin_registry_get(struct db *db, const char *host, const char *pool, uint32_t id,
                      struct thin_row *ret)
{
        char idbuf[16];

        (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, id);
        return thin_registry_query_one(db,
                                       "SELECT " THIN_ROW_COLUMNS " FROM thin_devices WHERE"
                                       " host_id = $1 AND pool_name = $2 AND device_id = $3",
                                       3, (const char *const[]){host, pool, idbuf}, ret);
}

int thin_registry_find_by_run(struct db *db, const char *host, const char *pool, const char *kind,
                              const char *run_id, struct thin_row *ret)
{
        return thin_registry_query_one(db,
                                       "SELECT " THIN_ROW_COLUMNS " FROM thin_devices WHERE"
                                       " host_id = $1 AND pool_name = $2 AND kind = $3 AND"
                                       " run_id = $4 ORDER BY device_id LIMIT 1",
                                       4, (const char *const[]){host, pool, kind, run_id}, ret);
}

int thin_registry_find_origin(struct db *db, const char *host, const char *pool,
                              const char *checksum, struct thin_row *ret)
{
        return thin_registry_query_one(db,
                                       "SELECT " THIN_ROW_COLUMNS " FROM thin_devices WHERE"
                                       " host_id = $1 AND pool_name = $2 AND kind = 'origin'"
                                       " AND checksum = $3 AND state <> 'deleting'",
                                       3, (const char *const[]){host, pool, checksum}, ret);
}

int thin_registry_set_state(struct db *db, const char *host, const char *pool, uint32_t id,
                            const char *state)
{
        char idbuf[16];

        (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, id);
        return db_exec(db, NULL,
                       "UPDATE thin_devices SET state = $4, updated_at = now() WHERE"
                       " host_id = $1 AND pool_name = $2 AND device_id = $3",
                       4, (const char *const[]){host, pool, idbuf, state});
}

/*
 * Deactivate every active device that maps @id on @pool; with @check_only, only check that
 * none of them is open (-EBUSY naming the device and its holder when one is).
 */
static int thin_registry_deactivate_id(const char *pool, uint32_t id, bool check_only)
{
        struct thin_pool_active_thin *devs = NULL;
        size_t n = 0;
        int r;

        r = thin_pool_list_thin_ids(pool, &devs, &n);
        if (r < 0)
                return r;
        for (size_t i = 0; i < n && r >= 0; i++) {
                if (devs[i].dev_id != id)
                        continue;
                if (check_only)
                        r = thin_pool_check_unused(devs[i].name);
                else
                        r = thin_pool_deactivate(devs[i].name, NULL);
                if (r > 0)
                        r = 0;
        }
        free(devs);
        return r < 0 ? r : 0;
}

/*
 * Remove what a process killed inside thin_pool_activate() left under the names our rows give
 * @id: thin-<id>, and the name of any snapshot row of it. Such a device holds no live table;
 * one with an inactive table keeps the id open in the pool, and delete would say EBUSY.
 */
static int thin_registry_remove_leftovers(struct db *db, const char *host, const char *pool,
                                          uint32_t id)
{
        char name[THIN_POOL_NAME_MAX + 1], idbuf[16];
        PGresult *res = NULL;
        int r;

        thin_registry_origin_name(id, name, sizeof(name));
        r = thin_pool_remove_leftover(pool, name);
        if (r < 0)
                return r;
        (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, id);
        r = db_exec(db, &res,
                    "SELECT snapshot_name FROM snapshots WHERE host_id = $1 AND pool_name = $2"
                    " AND device_id = $3",
                    3, (const char *const[]){host, pool, idbuf});
        if (r < 0)
                return r;
        for (int i = 0; i < PQntuples(res) && r >= 0; i++)
                r = thin_pool_remove_leftover(pool, db_get(res, i, 0));
        PQclear(res);
        return r < 0 ? r : 0;
}

/* thin_registry_destroy(); a deactivation that finds the device busy sets @restore back. */
static int thin_registry_destroy_from(struct db *db, const char *host, const char *pool,
                                      uint32_t id, const char *restore)
{
        char idbuf[16];
        const char *params[3] = {host, pool, idbuf};
        int r;

        (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, id);
        /*
         * A device in use (a VM's root) is refused before the row says 'deleting': a row left
         * 'deleting' would make the next reconciliation delete it as soon as it is closed.
         */
        r = thin_registry_deactivate_id(pool, id, true);
        if (r < 0)
                return err_wrap(r, "not removing thin id %" PRIu32 " of pool '%s'", id, pool);
        r = thin_registry_set_state(db, host, pool, id, "deleting");
        if (r < 0)
                return r;
        util_crash_point("destroy.after_intent");
        r = thin_registry_deactivate_id(pool, id, false);
        if (r == -EBUSY && restore) {
                /* Opened since the check: put the row back as it was, keep the message. */
                char saved[ERR_MSG_MAX];

                (void)snprintf(saved, sizeof(saved), "%s", err_last());
                if (thin_registry_set_state(db, host, pool, id, restore) < 0)
                        log_debug("failed to restore a thin row's state",
                                  "device_id=%" PRIu32 " state=%s", id, restore);
                (void)err_set(r, "%s", saved);
        }
        if (r == 0)
                r = thin_registry_remove_leftovers(db, host, pool, id);
        if (r < 0)
                return err_wrap(r, "failed to deactivate thin device %" PRIu32 " of pool '%s'", id,
                                pool);
        r = thin_pool_delete(pool, id);
        if (r < 0)
                return err_wrap(r, "failed to delete thin device %" PRIu32 " of pool '%s'", id,
                                pool);
        util_crash_point("destroy.after_delete");
        return db_exec(db, NULL,
                       "WITH s AS (DELETE FROM snapshots WHERE host_id = $1 AND pool_name = $2"
                       " AND device_id = $3), u AS (DELETE FROM unpacked_images WHERE"
                       " host_id = $1 AND pool_name = $2 AND device_id = $3)"
                       " DELETE FROM thin_devices WHERE host_id = $1 AND pool_name = $2 AND"
                       " device_id = $3",
                       3, params);
}

int thin_registry_destroy(struct db *db, const char *host, const char *pool, uint32_t id)
{
        struct thin_row row;
        int r;

        r = thin_registry_get(db, host, pool, id, &row);
        if (r <= 0)
                return r; /* no row: gone already, or not ours (an id we do not know stays) */
        return thin_registry_destroy_from(db, host, pool, id,
                                          strcmp(row.state, "deleting") != 0 ? row.state : NULL);
}

struct thin_claim {
        const char *host;
        const char *pool;
        const char *except_image;
        uint32_t id;
        int outcome; /* 1: still used, leave it; 0: marked 'deleting'; -1: no such row */
        bool was_ready;
};

/*
 * Under the allocation lock, which unpack holds while it maps an image to an existing origin:
 * check again that nothing uses origin @c->id, and mark it 'deleting' (from then on no image
 * can come to share it), in one transaction. A busy device changes nothing.
 */
static int thin_registry_claim_tx(struct db *db, void *userdata)
{
        struct thin_claim *c = userdata;
        char idbuf[16];
        const char *params[4] = {c->host, c->pool, idbuf, c->except_image ? c->except_image : ""};
        PGresult *res = NULL;
        bool used;
        int r;

        c->outcome = 0;
        c->was_ready = false;
        (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, c->id);
        r = thin_registry_lock(db, c->host);
        if (r < 0)
                return r;
        r = db_query_row(db, &res,
                         "SELECT d.state, d.state = 'creating' OR EXISTS (SELECT 1 FROM"
                         " unpacked_images u WHERE u.host_id = d.host_id AND"
                         " u.pool_name = d.pool_name AND u.device_id = d.device_id AND"
                         " u.image_id <> $4) OR EXISTS (SELECT 1 FROM snapshots s WHERE"
                         " s.host_id = d.host_id AND s.pool_name = d.pool_name AND"
                         " s.origin_id = d.device_id AND s.image_id <> $4)"
                         " FROM thin_devices d WHERE d.host_id = $1 AND d.pool_name = $2 AND"
                         " d.device_id = $3 AND d.kind = 'origin' FOR UPDATE",
                         4, params);
        if (r == 0)
                c->outcome = -1;
        if (r <= 0)
                return r;
        c->was_ready = strcmp(db_get(res, 0, 0), "ready") == 0;
        used = strcmp(db_get(res, 0, 1), "t") == 0;
        PQclear(res);
        if (used) {
                c->outcome = 1;
                return 0;
        }
        if (!c->was_ready)
                return 0; /* 'deleting' already */
        r = thin_registry_deactivate_id(c->pool, c->id, true);
        if (r < 0)
                return err_wrap(r, "not removing thin id %" PRIu32 " of pool '%s'", c->id, c->pool);
        return thin_registry_set_state(db, c->host, c->pool, c->id, "deleting");
}

int thin_registry_destroy_unused_origin(struct db *db, const char *host, const char *pool,
                                        uint32_t id, const char *except_image)
{
        struct thin_claim c = {host, pool, except_image, id, 0, false};
        int r;

        r = db_tx(db, thin_registry_claim_tx, &c);
        if (r < 0)
                return r;
        if (c.outcome != 0)
                return c.outcome > 0 ? 1 : 0;
        util_crash_point("destroy.after_claim");
        /* Back to 'ready' if it turns out busy: nothing could share it meanwhile. */
        return thin_registry_destroy_from(db, host, pool, id, c.was_ready ? "ready" : NULL);
}

int thin_registry_pools(struct db *db, const char *host, const char *also, char ***ret_pools)
{
        PGresult *res = NULL;
        char **pools = NULL;
        int n, r;

        r = db_exec(db, &res,
                    "SELECT pool_name FROM thin_devices WHERE host_id = $1 UNION"
                    " SELECT $2::text ORDER BY 1",
                    2, (const char *const[]){host, also});
        if (r < 0)
                return r;
        n = PQntuples(res);
        pools = calloc((size_t)n + 1, sizeof(*pools));
        for (int i = 0; pools && i < n; i++) {
                pools[i] = strdup(db_get(res, i, 0));
                if (!pools[i]) {
                        thin_registry_pools_free(pools);
                        pools = NULL;
                }
        }
        PQclear(res);
        if (!pools)
                return err_set(-ENOMEM, "out of memory");
        *ret_pools = pools;
        return n;
}

void thin_registry_pools_free(char **pools)
{
        if (!pools)
                return;
        for (char **p = pools; *p; p++)
                free(*p);
        free(pools);
}

static void thin_reconcile_report(thin_reconcile_fn cb, void *userdata,
                                  enum thin_reconcile_finding what, uint32_t id, const char *fmt,
                                  ...) __attribute__((format(printf, 5, 6)));

static void thin_reconcile_report(thin_reconcile_fn cb, void *userdata,
                                  enum thin_reconcile_finding what, uint32_t id, const char *fmt,
                                  ...)
{
        char detail[512];
        va_list ap;

        va_start(ap, fmt);
        (void)vsnprintf(detail, sizeof(detail), fmt, ap);
        va_end(ap);
        log_debug("reconcile finding", "id=%" PRIu32 " detail=%s", id, log_quote(detail));
        if (cb)
                cb(what, id, detail, userdata);
}

static bool thin_ids_contain(const uint32_t *ids, size_t n, uint32_t id)
{
        size_t lo = 0, hi = n;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;

                if (ids[mid] == id)
                        return true;
                if (ids[mid] < id)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        return false;
}

/* Columns of the rows reconciliation reads. */
enum {
        RC_ID,
        RC_KIND,
        RC_STATE,
        RC_RUN_STATUS,
        RC_RESUMABLE,
        RC_RUN_ID,
        RC_LEASE,
};

static bool thin_rows_contain(const PGresult *rows, uint32_t id)
{
        for (int j = 0; j < PQntuples(rows); j++) {
                if ((uint32_t)db_get_i64(rows, j, RC_ID) == id)
                        return true;
        }
        return false;
}

/*
 * Resume what a process killed inside create_snap left suspended (the thin pool layer
 * recorded it), then report any device of our rows that is still suspended: somebody else
 * suspended it, or (without @repair) a snapshot is in progress or was interrupted. Returns
 * the number of such devices, or a negative errno.
 */
/* Whether @name is one of the newline-separated @lines. */
static bool thin_lines_contain(const char *lines, const char *name)
{
        size_t n = strlen(name);

        for (const char *p = lines; *p;) {
                size_t len = strcspn(p, "\n");

                if (len == n && strncmp(p, name, n) == 0)
                        return true;
                p += len + (p[len] == '\n');
        }
        return false;
}

static int thin_reconcile_suspended(const char *pool, const PGresult *rows, bool repair,
                                    thin_reconcile_fn cb, void *userdata)
{
        struct thin_pool_active_thin *devs = NULL;
        char resumed[2048] = "";
        size_t n = 0;
        int left = 0;
        int r;

        if (repair) {
                r = thin_pool_resume_leftovers(pool, resumed, sizeof(resumed));
                if (r < 0)
                        return r;
        }
        r = thin_pool_list_thin_ids(pool, &devs, &n);
        if (r < 0)
                return r;
        for (size_t i = 0; i < n; i++) {
                if (thin_lines_contain(resumed, devs[i].name)) {
                        thin_reconcile_report(
                                cb, userdata, THIN_RECONCILE_RESUMED_SUSPENDED, devs[i].dev_id,
                                "device '%s' was left suspended by an interrupted snapshot: resumed",
                                devs[i].name);
                        continue;
                }
                if (!devs[i].suspended || !thin_rows_contain(rows, devs[i].dev_id))
                        continue;
                left++;
                thin_reconcile_report(
                        cb, userdata, THIN_RECONCILE_RESUMED_SUSPENDED, devs[i].dev_id,
                        repair ? "device '%s' is suspended, not by us: left alone"
                               : "device '%s' is suspended (by a snapshot in progress or interrupted, or by hand)",
                        devs[i].name);
        }
        free(devs);
        return left;
}

/* A transitional row ('creating' of a run that cannot resume, or 'deleting'): undo or finish. */
static int thin_reconcile_transitional(struct db *db, const char *host, const char *pool,
                                       const PGresult *rows, int i, bool in_pool, bool repair,
                                       thin_reconcile_fn cb, void *userdata)
{
        uint32_t id = (uint32_t)db_get_i64(rows, i, RC_ID);
        const char *state = db_get(rows, i, RC_STATE);
        const char *run_status = db_get(rows, i, RC_RUN_STATUS);
        enum thin_reconcile_finding what =
                state[0] == 'c' ? THIN_RECONCILE_REMOVED_HALF_MADE : THIN_RECONCILE_FINISHED_DELETE;
        int r;

        if (!repair) {
                thin_reconcile_report(cb, userdata, what, id,
                                      "thin id %" PRIu32 " was left %s (run %s)%s", id, state,
                                      run_status, in_pool ? "" : ", not in the pool");
                return 1;
        }
        r = thin_registry_destroy(db, host, pool, id);
        if (r < 0) {
                thin_reconcile_report(cb, userdata, what, id,
                                      "could not remove thin id %" PRIu32 ": %s", id, err_last());
                return 1;
        }
        thin_reconcile_report(cb, userdata, what, id,
                              "thin id %" PRIu32 " left %s by a %s run: removed", id, state,
                              run_status);
        return 0;
}

/* A row of kind 'unknown': reported while the pool has the id, dropped once it does not. */
static int thin_reconcile_unknown_row(struct db *db, const char *host, const char *pool,
                                      uint32_t id, bool in_pool, bool repair, thin_reconcile_fn cb,
                                      void *userdata)
{
        char idbuf[16];
        int r;

        if (in_pool) {
                thin_reconcile_report(
                        cb, userdata, THIN_RECONCILE_RESERVED_UNKNOWN, id,
                        "thin id %" PRIu32
                        " is in pool '%s' but no job of ours made it: reserved, never deleted automatically (if it is not an operator's, delete it with 'dmsetup message %s 0 \"delete %" PRIu32
                        "\"')",
                        id, pool, pool, id);
                return 1;
        }
        if (!repair) {
                thin_reconcile_report(cb, userdata, THIN_RECONCILE_RESERVED_UNKNOWN, id,
                                      "reserved unknown thin id %" PRIu32
                                      " is no longer in the pool: its row can go",
                                      id);
                return 1;
        }
        (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, id);
        r = db_exec(db, NULL,
                    "DELETE FROM thin_devices WHERE host_id = $1 AND pool_name = $2 AND"
                    " device_id = $3 AND kind = 'unknown'",
                    3, (const char *const[]){host, pool, idbuf});
        if (r < 0)
                return r;
        thin_reconcile_report(cb, userdata, THIN_RECONCILE_RESERVED_UNKNOWN, id,
                              "reserved unknown thin id %" PRIu32
                              " is no longer in the pool: row removed, id free again",
                              id);
        return 0;
}

/* An id in the pool that no row read before the dump describes. */
static int thin_reconcile_unknown_id(struct db *db, const char *host, const char *pool, uint32_t id,
                                     bool repair, thin_reconcile_fn cb, void *userdata)
{
        struct thin_row row;
        PGresult *res = NULL;
        char idbuf[16];
        int r;

        if (!repair) {
                /* Made after the rows were read: its row exists by now. */
                r = thin_registry_get(db, host, pool, id, &row);
                if (r != 0)
                        return r < 0 ? r : 0;
                thin_reconcile_report(cb, userdata, THIN_RECONCILE_RESERVED_UNKNOWN, id,
                                      "thin id %" PRIu32 " is in the pool but not in the database",
                                      id);
                return 1;
        }
        (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, id);
        r = db_exec(db, &res,
                    "INSERT INTO thin_devices (host_id, pool_name, device_id, kind, state,"
                    " size_bytes) VALUES ($1, $2, $3, 'unknown', 'ready', 0)"
                    " ON CONFLICT DO NOTHING RETURNING device_id",
                    3, (const char *const[]){host, pool, idbuf});
        if (r < 0)
                return r;
        r = PQntuples(res) > 0;
        PQclear(res);
        if (r == 0)
                return 0; /* made after the rows were read: its row exists by now */
        thin_reconcile_report(
                cb, userdata, THIN_RECONCILE_RESERVED_UNKNOWN, id,
                "thin id %" PRIu32
                " is in pool '%s' but not in the database: reserved, not deleted (if it is not an operator's, delete it with 'dmsetup message %s 0 \"delete %" PRIu32
                "\"')",
                id, pool, pool, id);
        return 1;
}

int thin_registry_reconcile(struct db *db, const char *host, const char *pool, bool repair,
                            thin_reconcile_fn cb, void *userdata)
{
        uint32_t *ids = NULL;
        size_t nids = 0;
        PGresult *rows = NULL;
        int unrepaired = 0;
        int r;

        /*
         * Rows first, then the pool: every id in the pool that has no row then was made
         * before its row (never: rows come first) or after the rows were read, and a row
         * deleted meanwhile only makes its id look missing, which is re-checked. Reading the
         * pool first would make an id deleted in between look unknown, and reserve it forever.
         *
         * A run that is neither finished nor failed can still resume (its message comes
         * back, however late): its 'creating' device is left alone.
         */
        r = db_exec(db, &rows,
                    "SELECT d.device_id, d.kind, d.state, coalesce(r.status, 'gone'),"
                    " coalesce(r.status IN ('pending', 'running'), false),"
                    " coalesce(d.run_id, ''), CASE WHEN r.lease_until IS NULL THEN 'no lease'"
                    " WHEN r.lease_until > now() THEN 'leased' ELSE 'lease expired ' ||"
                    " date_trunc('second', now() - r.lease_until)::text || ' ago' END"
                    " FROM thin_devices d LEFT JOIN fsm_runs r ON r.run_id = d.run_id"
                    " WHERE d.host_id = $1 AND d.pool_name = $2 ORDER BY d.device_id",
                    2, (const char *const[]){host, pool});
        if (r < 0)
                goto out;
        r = thin_pool_metadata_thin_ids(pool, &ids, &nids);
        if (r < 0)
                goto out;
        r = thin_reconcile_suspended(pool, rows, repair, cb, userdata);
        if (r < 0)
                goto out;
        unrepaired += r;
        for (int i = 0; i < PQntuples(rows); i++) {
                uint32_t id = (uint32_t)db_get_i64(rows, i, RC_ID);
                const char *kind = db_get(rows, i, RC_KIND);
                const char *state = db_get(rows, i, RC_STATE);
                bool resumable = strcmp(db_get(rows, i, RC_RESUMABLE), "t") == 0;
                bool in_pool = thin_ids_contain(ids, nids, id);
                struct thin_row now;

                if (strcmp(state, "creating") == 0 && resumable) {
                        thin_reconcile_report(
                                cb, userdata, THIN_RECONCILE_IN_PROGRESS, id,
                                "thin id %" PRIu32 " is being made by run %s (%s, %s): left for it",
                                id, db_get(rows, i, RC_RUN_ID), db_get(rows, i, RC_RUN_STATUS),
                                db_get(rows, i, RC_LEASE));
                        continue;
                }
                if (strcmp(state, "creating") == 0 || strcmp(state, "deleting") == 0) {
                        unrepaired += thin_reconcile_transitional(db, host, pool, rows, i, in_pool,
                                                                  repair, cb, userdata);
                        continue;
                }
                if (strcmp(kind, "unknown") == 0) {
                        r = thin_reconcile_unknown_row(db, host, pool, id, in_pool, repair, cb,
                                                       userdata);
                        if (r < 0)
                                goto out;
                        unrepaired += r;
                        continue;
                }
                if (in_pool)
                        continue;
                /* Deleted since the rows were read? Then it is not missing. */
                r = thin_registry_get(db, host, pool, id, &now);
                if (r < 0)
                        goto out;
                if (r == 0 || strcmp(now.state, "ready") != 0)
                        continue;
                unrepaired++;
                thin_reconcile_report(
                        cb, userdata, THIN_RECONCILE_MISSING_IN_POOL, id,
                        "thin id %" PRIu32
                        " is recorded as %s but the pool does not have it (was the pool recreated?)",
                        id, state);
        }
        for (size_t i = 0; i < nids; i++) {
                if (thin_rows_contain(rows, ids[i]))
                        continue;
                r = thin_reconcile_unknown_id(db, host, pool, ids[i], repair, cb, userdata);
                if (r < 0)
                        goto out;
                unrepaired += r;
        }
        r = unrepaired;
out:
        PQclear(rows);
        free(ids);
        return r;
}

int thin_registry_stalled(struct db *db, const char *host, const char *pool, int older_than_s,
                          thin_reconcile_fn cb, void *userdata)
{
        char secs[16];
        PGresult *rows = NULL;
        int n;
        int r;

        (void)snprintf(secs, sizeof(secs), "%d", older_than_s);
        r = db_exec(db, &rows,
                    "SELECT d.device_id, d.run_id, r.fsm, coalesce(r.request->>'image_id', ''),"
                    " date_trunc('second', now() - coalesce(r.lease_until, r.updated_at))::text"
                    " FROM thin_devices d JOIN fsm_runs r ON r.run_id = d.run_id"
                    " WHERE d.host_id = $1 AND d.pool_name = $2 AND d.state = 'creating' AND"
                    " r.status IN ('pending', 'running') AND coalesce(r.lease_until,"
                    " r.updated_at) < now() - $3::int * interval '1 second'"
                    " ORDER BY d.device_id",
                    3, (const char *const[]){host, pool, secs});
        if (r < 0)
                return r;
        n = PQntuples(rows);
        for (int i = 0; i < n; i++) {
                uint32_t id = (uint32_t)db_get_i64(rows, i, 0);
                const char *image = db_get(rows, i, 3);

                thin_reconcile_report(
                        cb, userdata, THIN_RECONCILE_STALLED, id,
                        "thin id %" PRIu32
                        " is held by %s run %s of image '%s', whose lease expired %s ago (more than UNPACK_TIMEOUT) and which has not come back: its message is probably lost; to finish the run, send image '%s' through 'flyio-image-manager process-image' again (same image id and pool)",
                        id, db_get(rows, i, 2), db_get(rows, i, 1), image, db_get(rows, i, 4),
                        image);
        }
        PQclear(rows);
        return n;
}

int thin_registry_reactivate(struct db *db, const char *host, const char *pool,
                             thin_reconcile_fn cb, void *userdata)
{
        PGresult *rows = NULL;
        int activated = 0;
        int r;

        r = db_exec(db, &rows,
                    "SELECT d.device_id, d.size_bytes, coalesce(s.snapshot_name, '')"
                    " FROM thin_devices d LEFT JOIN snapshots s ON s.host_id = d.host_id AND"
                    " s.pool_name = d.pool_name AND s.device_id = d.device_id"
                    " WHERE d.host_id = $1 AND d.pool_name = $2 AND d.state = 'ready' AND"
                    " (d.kind = 'origin' OR (d.kind = 'snapshot' AND s.state = 'active'))"
                    " ORDER BY d.device_id",
                    2, (const char *const[]){host, pool});
        if (r < 0)
                return r;
        for (int i = 0; i < PQntuples(rows); i++) {
                uint32_t id = (uint32_t)db_get_i64(rows, i, 0);
                const char *snap = db_get(rows, i, 2);
                char name[THIN_POOL_NAME_MAX + 1];

                if (snap[0])
                        (void)snprintf(name, sizeof(name), "%s", snap);
                else
                        thin_registry_origin_name(id, name, sizeof(name));
                r = thin_pool_activate(pool, id, name, (uint64_t)db_get_i64(rows, i, 1), NULL);
                if (r == 0)
                        activated++;
                else if (r < 0)
                        thin_reconcile_report(cb, userdata, THIN_RECONCILE_MISSING_IN_POOL, id,
                                              "could not re-activate '%s' (thin id %" PRIu32
                                              "): %s",
                                              name, id, err_last());
        }
        PQclear(rows);
        return activated;
}
