/*
 * The activate stage's FSM: check_active -> create_snapshot -> activate -> record.
 *
 *   check_active     checks that the origin is a ready origin of ours that holds this image,
 *                    and finds a snapshot that is already active (activated=false). A snapshot
 *                    name taken by another image is refused.
 *   create_snapshot  allocates the snapshot's thin id and its rows ('creating'), then sends
 *                    create_snap; the origin, which stays active, is suspended around the
 *                    message by the thin pool layer and always resumed.
 *   activate         activates the snapshot as /dev/mapper/<snapshot name>.
 *   record           marks the snapshot active.
 *
 * A failed run deletes the half-made snapshot and frees its id.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "stages/request.h"
#include "stages/thin_pool.h"
#include "stages/thin_registry.h"
#include "worker/stage.h"

struct activate_job {
        const struct stage_ctx *ctx;
        struct activate_request req;
        char pool[REQUEST_DM_NAME_MAX + 1];
        uint32_t origin_id;
        uint64_t size;
        bool skip;
        uint32_t snap_id;
        bool have_snap;
        char device_path[REQUEST_DM_NAME_MAX + 16];
};

static const char *activate_host(const struct activate_job *job)
{
        return job->ctx->cfg->host_id;
}

/* The origin's size, read again when a run resumes past check_active in another process. */
static int activate_load_origin(struct fsm_run *run, struct activate_job *job)
{
        struct thin_row origin;
        int r;

        if (job->size)
                return 0;
        r = thin_registry_get(fsm_run_db(run), activate_host(job), job->pool, job->origin_id,
                              &origin);
        if (r < 0)
                return r;
        if (r == 0)
                return err_set(-ENOENT, "origin thin device %" PRIu32 " vanished", job->origin_id);
        job->size = origin.size_bytes;
        return 0;
}

/*
 * check_active fills snapshot_id when the snapshot already exists; that answer is saved with
 * the run, so a resume after check_active still skips creating another one.
 */
static bool activate_skipping(struct fsm_run *run, struct activate_job *job)
{
        struct json_object *v = NULL;

        if (!job->skip && !job->have_snap &&
            json_object_object_get_ex(fsm_run_response(run), "snapshot_id", &v))
                job->skip = true;
        return job->skip;
}

static void activate_response_set(struct fsm_run *run, const struct activate_job *job,
                                  uint32_t snap_id, bool activated)
{
        struct json_object *resp = fsm_run_response(run);
        char buf[16];

        (void)snprintf(buf, sizeof(buf), "%" PRIu32, snap_id);
        json_object_object_add(resp, "image_id", json_object_new_string(job->req.image_id));
        json_object_object_add(resp, "snapshot_id", json_object_new_string(buf));
        json_object_object_add(resp, "snapshot_name",
                               json_object_new_string(job->req.snapshot_name));
        json_object_object_add(resp, "device_path", json_object_new_string(job->device_path));
        json_object_object_add(resp, "active", json_object_new_boolean(1));
        json_object_object_add(resp, "activated", json_object_new_boolean(activated));
}

static int activate_check_active(struct fsm_run *run, void *userdata)
{
        struct activate_job *job = userdata;
        struct db *db = fsm_run_db(run);
        struct thin_row origin;
        char expected[32], idbuf[16];
        PGresult *res = NULL;
        int r;

        job->skip = false;
        r = thin_registry_get(db, activate_host(job), job->pool, job->origin_id, &origin);
        if (r < 0)
                return r;
        if (r == 0 || strcmp(origin.kind, "origin") != 0 || strcmp(origin.state, "ready") != 0)
                return err_set(
                        -ENOENT,
                        "thin device %" PRIu32
                        " in pool '%s' is not an unpacked image on host '%s': unpack the image first",
                        job->origin_id, job->pool, activate_host(job));
        thin_registry_origin_name(job->origin_id, expected, sizeof(expected));
        if (strcmp(expected, job->req.device_name) != 0)
                return err_set(-EINVAL,
                               "device_name '%s' does not match device_id %" PRIu32
                               " (expected '%s')",
                               job->req.device_name, job->origin_id, expected);
        job->size = origin.size_bytes;
        (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, job->origin_id);
        r = db_query_row(
                db, &res,
                "SELECT 1 FROM unpacked_images WHERE host_id = $1 AND image_id = $2 AND"
                " pool_name = $3 AND device_id = $4",
                4, (const char *const[]){activate_host(job), job->req.image_id, job->pool, idbuf});
        if (r < 0)
                return r;
        if (r == 0)
                return err_set(-EINVAL,
                               "image '%s' is not unpacked on thin device %" PRIu32 " of pool '%s'",
                               job->req.image_id, job->origin_id, job->pool);
        PQclear(res);

        r = db_query_row(db, &res,
                         "SELECT image_id, device_id, state, origin_id FROM snapshots WHERE"
                         " host_id = $1 AND snapshot_name = $2",
                         2, (const char *const[]){activate_host(job), job->req.snapshot_name});
        if (r < 0)
                return r;
        if (r > 0) {
                bool same = strcmp(db_get(res, 0, 0), job->req.image_id) == 0 &&
                            (uint32_t)db_get_i64(res, 0, 3) == job->origin_id;
                uint32_t snap = (uint32_t)db_get_i64(res, 0, 1);
                bool active = strcmp(db_get(res, 0, 2), "active") == 0;

                if (!same) {
                        r = err_set(
                                -EEXIST,
                                "snapshot name '%s' is already used by image '%s': choose another snapshot_name",
                                job->req.snapshot_name, db_get(res, 0, 0));
                        PQclear(res);
                        return r;
                }
                PQclear(res);
                if (active) {
                        /* Recorded active: make sure the kernel agrees (e.g. after a reboot). */
                        r = thin_pool_activate(job->pool, snap, job->req.snapshot_name, job->size,
                                               NULL);
                        if (r < 0)
                                return err_wrap(r, "failed to re-activate snapshot '%s'",
                                                job->req.snapshot_name);
                        activate_response_set(run, job, snap, r == 0);
                        job->skip = true;
                }
                return 0;
        }
        return 0;
}

struct activate_alloc {
        struct activate_job *job;
        const char *run_id;
};

static int activate_alloc_tx(struct db *db, void *userdata)
{
        struct activate_alloc *a = userdata;
        struct activate_job *job = a->job;
        char idbuf[16], originbuf[16];
        int r;

        r = thin_registry_alloc(db, activate_host(job), job->pool, "snapshot", job->size, NULL,
                                job->origin_id, a->run_id, &job->snap_id);
        if (r < 0)
                return r;
        (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, job->snap_id);
        (void)snprintf(originbuf, sizeof(originbuf), "%" PRIu32, job->origin_id);
        r = db_exec(db, NULL,
                    "INSERT INTO snapshots (host_id, snapshot_name, image_id, pool_name,"
                    " device_id, origin_id, device_path, state, run_id)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, 'creating', $8)",
                    8,
                    (const char *const[]){activate_host(job), job->req.snapshot_name,
                                          job->req.image_id, job->pool, idbuf, originbuf,
                                          job->device_path, a->run_id});
        if (r == -EEXIST)
                return err_set(-EEXIST, "snapshot name '%s' is already taken",
                               job->req.snapshot_name);
        return r;
}

/*
 * This run's snapshot row: 1 when found (job->snap_id set), 0 when none. With @in_step (not
 * inside a commit hook), a row left 'deleting' by an interrupted delete is finished off first
 * and counts as none.
 */
static int activate_find_snapshot(struct fsm_run *run, struct activate_job *job, bool in_step)
{
        struct db *db = fsm_run_db(run);
        struct thin_row row;
        int r;

        if (job->have_snap)
                return 1;
        r = thin_registry_find_by_run(db, activate_host(job), job->pool, "snapshot",
                                      fsm_run_id(run), &row);
        if (r <= 0)
                return r;
        if (in_step && strcmp(row.state, "deleting") == 0) {
                r = thin_registry_destroy(db, activate_host(job), job->pool, row.device_id);
                return r < 0 ? r : 0;
        }
        job->snap_id = row.device_id;
        job->have_snap = true;
        return 1;
}

struct activate_reserve {
        struct activate_job *job;
        const char *run_id;
};

/* Our rows of an id the pool has but nobody recorded: keep the id, as 'unknown'. */
static int activate_reserve_tx(struct db *db, void *userdata)
{
        const struct activate_reserve *c = userdata;
        const struct activate_job *job = c->job;
        char idbuf[16];
        const char *params[4] = {activate_host(job), job->pool, idbuf, c->run_id};
        int r;

        (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, job->snap_id);
        r = db_exec(db, NULL,
                    "DELETE FROM snapshots WHERE host_id = $1 AND pool_name = $2 AND"
                    " device_id = $3 AND run_id = $4",
                    4, params);
        if (r < 0)
                return r;
        return db_exec(
                db, NULL,
                "UPDATE thin_devices SET kind = 'unknown', state = 'ready', origin_id = NULL,"
                " run_id = NULL, updated_at = now() WHERE host_id = $1 AND pool_name = $2"
                " AND device_id = $3 AND run_id = $4 AND kind = 'snapshot'",
                4, params);
}

/*
 * Allocate the snapshot's id and rows (unless @resumed: they are ours from before a crash)
 * and send create_snap. A resumed id the pool already has was made before the crash; a fresh
 * one it has is somebody else's (an operator's, made since reconciliation last looked): it is
 * reserved, never deleted, and the step is retried with another id, as unpack does.
 */
static int activate_make_snapshot(struct fsm_run *run, struct activate_job *job, bool resumed)
{
        int r;

        if (!resumed) {
                struct activate_alloc a = {job, fsm_run_id(run)};

                r = db_tx(fsm_run_db(run), activate_alloc_tx, &a);
                if (r < 0)
                        return r;
                job->have_snap = true;
        }
        util_crash_point("activate.after_intent");
        r = thin_pool_create_snap(job->pool, job->snap_id, job->origin_id, NULL);
        util_crash_point("activate.after_create_snap");
        if (r == -EEXIST && resumed)
                return 0; /* made before a crash */
        if (r == -EEXIST) {
                struct activate_reserve c = {job, fsm_run_id(run)};

                r = db_tx(fsm_run_db(run), activate_reserve_tx, &c);
                if (r < 0)
                        return err_wrap(r,
                                        "failed to reserve thin id %" PRIu32
                                        ", which pool '%s' has but the database does not",
                                        job->snap_id, job->pool);
                job->have_snap = false;
                return err_set(
                        -EAGAIN,
                        "thin id %" PRIu32
                        " already exists in pool '%s' but not in the database; reserved it, will retry with another id",
                        job->snap_id, job->pool);
        }
        if (r < 0)
                return err_wrap(
                        r, "failed to snapshot thin device %" PRIu32 " as %" PRIu32 " in pool '%s'",
                        job->origin_id, job->snap_id, job->pool);
        return 0;
}

static int activate_create_snapshot(struct fsm_run *run, void *userdata)
{
        struct activate_job *job = userdata;
        bool resumed;
        int r;

        r = activate_find_snapshot(run, job, true);
        if (r < 0)
                return r;
        resumed = r > 0;
        if (!resumed && activate_skipping(run, job))
                return 0;
        r = activate_load_origin(run, job);
        if (r < 0)
                return r;
        return activate_make_snapshot(run, job, resumed);
}

static int activate_activate(struct fsm_run *run, void *userdata)
{
        struct activate_job *job = userdata;
        int r;

        r = activate_find_snapshot(run, job, true);
        if (r < 0)
                return r;
        if (r == 0 && activate_skipping(run, job))
                return 0;
        r = activate_load_origin(run, job);
        if (r < 0)
                return r;
        util_crash_point("activate.before_activate");
        if (!job->have_snap) {
                /*
                 * The run resumed after its snapshot was removed (an operator's gc, an older
                 * reconciliation): take it again rather than fail a run that can finish.
                 */
                log_notice("the snapshot of a resumed run is gone, taking it again", "snapshot=%s",
                           log_quote(job->req.snapshot_name));
                r = activate_make_snapshot(run, job, false);
                if (r < 0)
                        return r;
        }
        r = thin_pool_activate(job->pool, job->snap_id, job->req.snapshot_name, job->size, NULL);
        if (r == -ENODATA) {
                /* The row outlived its id in the pool: take the snapshot again, same id. */
                r = activate_make_snapshot(run, job, true);
                if (r == 0)
                        r = thin_pool_activate(job->pool, job->snap_id, job->req.snapshot_name,
                                               job->size, NULL);
        }
        if (r < 0)
                return err_wrap(r, "failed to activate snapshot '%s'", job->req.snapshot_name);
        activate_response_set(run, job, job->snap_id, true);
        return 0;
}

static int activate_record(struct fsm_run *run, void *userdata)
{
        (void)run;
        (void)userdata;
        return 0;
}

static int activate_record_commit(struct fsm_run *run, struct db *db, void *userdata)
{
        struct activate_job *job = userdata;
        char idbuf[16];
        int r;

        /* Only a run that made a snapshot has one to mark active. */
        r = activate_find_snapshot(run, job, false);
        if (r <= 0)
                return r;
        (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, job->snap_id);
        r = thin_registry_set_state(db, activate_host(job), job->pool, job->snap_id, "ready");
        if (r < 0)
                return r;
        return db_exec(db, NULL,
                       "UPDATE snapshots SET state = 'active', activated_at = now(),"
                       " updated_at = now(), run_id = $4 WHERE host_id = $1 AND"
                       " snapshot_name = $2 AND device_id = $3",
                       4,
                       (const char *const[]){activate_host(job), job->req.snapshot_name, idbuf,
                                             fsm_run_id(run)});
}

/* Once the failure is committed (see unpack_after_failure): the half-made snapshot goes. */
static void activate_after_failure(struct fsm_run *run, void *userdata)
{
        struct activate_job *job = userdata;
        struct db *db = fsm_run_db(run);
        struct thin_row row;
        int r;

        r = thin_registry_find_by_run(db, activate_host(job), job->pool, "snapshot",
                                      fsm_run_id(run), &row);
        if (r == 0 || (r > 0 && strcmp(row.state, "ready") == 0))
                return;
        if (r > 0)
                r = thin_registry_destroy(db, activate_host(job), job->pool, row.device_id);
        if (r < 0)
                log_warning_errno(
                        r, "failed to remove a half-made snapshot, reconciliation will retry",
                        "pool=%s", log_quote(job->pool));
}

static const struct fsm_transition activate_transitions[] = {
        {"check_active", activate_check_active, NULL},
        {"create_snapshot", activate_create_snapshot, NULL},
        {"activate", activate_activate, NULL},
        {"record", activate_record, activate_record_commit},
};

static const struct fsm_def activate_fsm = {
        .name = "activate",
        .transitions = activate_transitions,
        .transition_count = ARRAY_SIZE(activate_transitions),
        .after_failure = activate_after_failure,
};

static int activate_handle(const struct stage_ctx *ctx, const char *request_json,
                           struct stage_result *ret)
{
        struct activate_job job = {.ctx = ctx};
        char key[1024];
        int r;

        memset(ret, 0, sizeof(*ret));
        r = activate_request_decode(request_json, &job.req);
        if (r == 0 && !job.req.snapshot_name[0]) {
                r = util_snprintf(job.req.snapshot_name, sizeof(job.req.snapshot_name),
                                  "snapshot-%s", job.req.image_id);
                if (r < 0)
                        r = err_set(-EINVAL,
                                    "image_id too long for a snapshot name; give snapshot_name");
        }
        if (r < 0)
                return stage_result_invalid(ret, "activate", r);
        (void)snprintf(job.pool, sizeof(job.pool), "%s",
                       job.req.pool_name[0] ? job.req.pool_name : ctx->cfg->pool_name);
        (void)snprintf(job.req.pool_name, sizeof(job.req.pool_name), "%s", job.pool);
        job.origin_id = (uint32_t)strtoul(job.req.device_id, NULL, 10);
        (void)snprintf(job.device_path, sizeof(job.device_path), "/dev/mapper/%s",
                       job.req.snapshot_name);
        r = util_snprintf(key, sizeof(key), "activate/%s/%s/%s/%s", ctx->cfg->host_id, job.pool,
                          job.req.snapshot_name, job.req.device_id);
        if (r < 0)
                return err_set(r, "idempotency key too long");
        return stage_execute(ctx, &activate_fsm, key, activate_request_encode(&job.req),
                             job.req.image_id, "activated", &job, ret);
}

const struct stage stage_activate = {
        .id = STAGE_ACTIVATE,
        .name = "activate",
        .handle = activate_handle,
};
