/*
 * The unpack stage's FSM:
 *   check_unpacked -> create_device -> make_fs -> extract -> verify_layout -> record
 *
 *   check_unpacked  checks the tarball (inside LOCAL_DIR, checksum as recorded or re-hashed),
 *                   finds an image already unpacked (unpacked=false) or an origin that holds
 *                   the same content (dedup: the image is mapped to it, unpacked=false), and
 *                   refuses new work on a pool above POOL_HIGH_WATER_PERCENT.
 *   create_device   allocates the lowest free thin id in PostgreSQL ('creating'), sends
 *                   create_thin and activates it as thin-<id>. After a crash it finds its own
 *                   row by run id and continues with the same id.
 *   make_fs         mkfs.ext4 on the device.
 *   extract         mounts it privately and extracts the tarball with the safe extractor,
 *                   then syncs and unmounts. Leftovers of an interrupted extraction are wiped
 *                   by making the filesystem again. A hostile or corrupt tarball deletes the
 *                   half-made device and frees its id at once.
 *   verify_layout   mounts it read-only and checks that it holds a tree.
 *   record          marks the origin ready, maps the image to it and, in the same
 *                   transaction, writes the activate request to the outbox (the FSM's
 *                   handoff hook, also run for a key found completed without a handoff).
 *
 * The origin stays active so that its device path in the response is usable; snapshots are
 * taken from it by the activate stage.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <json-c/json.h>

#include "common/err.h"
#include "common/log.h"
#include "common/spawn.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "stages/download.h"
#include "stages/extract.h"
#include "stages/request.h"
#include "stages/thin_pool.h"
#include "stages/thin_registry.h"
#include "worker/metrics.h"
#include "worker/stage.h"

#define UNPACK_MOUNT_BASE "/run/flyio-image-manager"
/* How often a run waiting for another run's origin of the same content looks again. */
#define UNPACK_WAIT_POLL_MS 500

struct unpack_job {
        const struct stage_ctx *ctx;
        struct unpack_request req;
        char pool[REQUEST_DM_NAME_MAX + 1];
        uint64_t size;
        bool skip;
        bool have_device;
        bool fresh; /* the device was (re)made blank and holds no filesystem yet */
        uint32_t device_id;
        char device_name[32];
        char device_path[64];
        int64_t deadline_ms;
};

static const char *unpack_host(const struct unpack_job *job)
{
        return job->ctx->cfg->host_id;
}

/* Fill the response for an origin row. */
static void unpack_response_set(struct fsm_run *run, const struct unpack_job *job, uint32_t id,
                                int64_t size_bytes, int64_t file_count, bool unpacked)
{
        struct json_object *resp = fsm_run_response(run);
        char buf[32];

        json_object_object_add(resp, "image_id", json_object_new_string(job->req.image_id));
        (void)snprintf(buf, sizeof(buf), "%" PRIu32, id);
        json_object_object_add(resp, "device_id", json_object_new_string(buf));
        thin_registry_origin_name(id, buf, sizeof(buf));
        json_object_object_add(resp, "device_name", json_object_new_string(buf));
        {
                char path[64];

                (void)snprintf(path, sizeof(path), "/dev/mapper/%s", buf);
                json_object_object_add(resp, "device_path", json_object_new_string(path));
        }
        json_object_object_add(resp, "size_bytes", json_object_new_int64(size_bytes));
        json_object_object_add(resp, "file_count", json_object_new_int64(file_count));
        json_object_object_add(resp, "unpacked", json_object_new_boolean(unpacked));
}

/*
 * check_unpacked answers "unpacked": false when the image needs no work (already unpacked, or
 * sharing an origin). The flag lives in the saved response, so a run resumed in another
 * process after check_unpacked still knows to skip the device steps.
 */
static bool unpack_skipping(struct fsm_run *run, struct unpack_job *job)
{
        struct json_object *v = NULL;

        if (!job->skip && json_object_object_get_ex(fsm_run_response(run), "unpacked", &v) &&
            !json_object_get_boolean(v))
                job->skip = true;
        return job->skip;
}

/* The tarball must lie inside LOCAL_DIR: a message must not make us read any file. */
static int unpack_check_tarball(struct unpack_job *job)
{
        char real_dir[PATH_MAX], real_tar[PATH_MAX];
        size_t n;

        if (!realpath(job->ctx->cfg->local_dir, real_dir))
                return err_set(-ENOENT, "LOCAL_DIR '%s' is not accessible: %s",
                               job->ctx->cfg->local_dir, strerror(errno));
        if (!realpath(job->req.local_path, real_tar)) {
                if (errno == ENOENT)
                        return err_set(
                                -ENOENT,
                                "tarball '%s' of image '%s' does not exist on this host: was it downloaded here (HOST_ID '%s')?",
                                job->req.local_path, job->req.image_id, unpack_host(job));
                return err_set(-errno, "tarball '%s': %s", job->req.local_path, strerror(errno));
        }
        n = strlen(real_dir);
        if (strncmp(real_tar, real_dir, n) != 0 || real_tar[n] != '/')
                return err_set(-EPERM,
                               "tarball '%s' is outside LOCAL_DIR '%s': refusing to unpack it",
                               job->req.local_path, job->ctx->cfg->local_dir);
        return 0;
}

/* Trust the download stage's record of the checksum; hash the file when there is none. */
static int unpack_check_checksum(struct db *db, struct unpack_job *job)
{
        char have[DOWNLOAD_SHA256_HEX_LEN + 1];
        struct stat st;
        PGresult *res = NULL;
        uint64_t size;
        int r;

        if (stat(job->req.local_path, &st) < 0)
                return err_set(-errno, "tarball '%s': %s", job->req.local_path, strerror(errno));
        {
                char sizebuf[24];

                (void)snprintf(sizebuf, sizeof(sizebuf), "%lld", (long long)st.st_size);
                r = db_query_row(db, &res,
                                 "SELECT 1 FROM images WHERE host_id = $1 AND image_id = $2 AND"
                                 " status = 'completed' AND checksum = $3 AND local_path = $4"
                                 " AND size_bytes = $5",
                                 5,
                                 (const char *const[]){unpack_host(job), job->req.image_id,
                                                       job->req.checksum, job->req.local_path,
                                                       sizebuf});
        }
        if (r < 0)
                return r;
        if (r > 0) {
                PQclear(res);
                return 0;
        }
        r = download_hash_file(job->req.local_path, have, &size);
        if (r < 0)
                return err_wrap(r, "failed to hash tarball '%s'", job->req.local_path);
        if (strcmp(have, job->req.checksum) != 0)
                return err_set(
                        -EBADMSG,
                        "tarball '%s' has SHA-256 %s, but the request says %s: refusing to unpack it under the wrong content id",
                        job->req.local_path, have, job->req.checksum);
        return 0;
}

/*
 * An image id names one content for good. Returns the origin @image is mapped to (>= 0), -1
 * when it is not mapped, or a permanent error that says what to do: a re-pushed image with
 * other content must never get the old content back, nor silently replace it.
 */
static int unpack_check_mapping(struct db *db, const struct unpack_job *job, int64_t *ret_id)
{
        PGresult *res = NULL;
        int r;

        *ret_id = -1;
        r = db_query_row(db, &res,
                         "SELECT device_id, checksum, pool_name FROM unpacked_images WHERE"
                         " host_id = $1 AND image_id = $2",
                         2, (const char *const[]){unpack_host(job), job->req.image_id});
        if (r <= 0)
                return r;
        if (strcmp(db_get(res, 0, 1), job->req.checksum) != 0)
                r = err_set(
                        -EEXIST,
                        "image '%s' was unpacked from a tarball with sha256 %s; this request's tarball has sha256 %s; image ids are immutable: use a new image id, or remove the old one with `flyio-image-manager gc --image-id %s` first",
                        job->req.image_id, db_get(res, 0, 1), job->req.checksum, job->req.image_id);
        else if (strcmp(db_get(res, 0, 2), job->pool) != 0)
                r = err_set(
                        -EEXIST,
                        "image '%s' is already unpacked in pool '%s' on host '%s', not in '%s': remove it with `flyio-image-manager gc --image-id %s` first",
                        job->req.image_id, db_get(res, 0, 2), unpack_host(job), job->pool,
                        job->req.image_id);
        else
                *ret_id = db_get_i64(res, 0, 0);
        PQclear(res);
        return r < 0 ? r : 0;
}

/* Map the image to origin @id; an existing mapping must be to the same content. */
static int unpack_map_image_tx(struct db *db, const struct unpack_job *job, uint32_t id,
                               const char *run_id)
{
        char idbuf[16];
        int64_t mapped;
        int r;

        (void)snprintf(idbuf, sizeof(idbuf), "%" PRIu32, id);
        r = db_exec(db, NULL,
                    "INSERT INTO unpacked_images (host_id, image_id, pool_name, device_id,"
                    " checksum, run_id) VALUES ($1, $2, $3, $4, $5, $6)"
                    " ON CONFLICT (host_id, image_id) DO NOTHING",
                    6,
                    (const char *const[]){unpack_host(job), job->req.image_id, job->pool, idbuf,
                                          job->req.checksum, run_id});
        if (r < 0)
                return r;
        return unpack_check_mapping(db, job, &mapped);
}

/* Make sure the origin is active, so the device path we answer with exists. */
static int unpack_ensure_active(const struct unpack_job *job, uint32_t id, uint64_t size)
{
        char name[32];
        int r;

        thin_registry_origin_name(id, name, sizeof(name));
        r = thin_pool_activate(job->pool, id, name, size, NULL);
        return r < 0 ? r : 0;
}

struct unpack_share_ctx {
        struct unpack_job *job;
        const char *run_id;
        struct thin_row *origin;
        bool shared;
};

static int unpack_share_tx(struct db *db, void *userdata)
{
        struct unpack_share_ctx *c = userdata;
        struct unpack_job *job = c->job;
        int r;

        c->shared = false;
        r = thin_registry_lock(db, unpack_host(job));
        if (r < 0)
                return r;
        r = thin_registry_find_origin(db, unpack_host(job), job->pool, job->req.checksum,
                                      c->origin);
        if (r <= 0 || strcmp(c->origin->state, "ready") != 0)
                return r < 0 ? r : 0;
        c->shared = true;
        return unpack_map_image_tx(db, job, c->origin->device_id, c->run_id);
}

/*
 * Map the image to the ready origin @origin found for its content, looking again under the
 * allocation lock: gc chooses origins to remove under it too, and one it has marked is not
 * found again. Sets job->skip (and refreshes @origin) when the image now shares the origin.
 */
static int unpack_share(struct fsm_run *run, struct unpack_job *job, struct thin_row *origin)
{
        struct unpack_share_ctx c = {job, fsm_run_id(run), origin, false};
        int r;

        r = db_tx(fsm_run_db(run), unpack_share_tx, &c);
        if (r < 0)
                return r;
        job->skip = c.shared;
        return 0;
}

static int unpack_check_unpacked(struct fsm_run *run, void *userdata)
{
        struct unpack_job *job = userdata;
        struct db *db = fsm_run_db(run);
        struct thin_row origin;
        struct thin_pool_status st;
        int64_t mapped;
        int r;

        job->skip = false;
        r = unpack_check_tarball(job);
        if (r < 0)
                return r;

        /* Already unpacked: answer from the origin it is mapped to. */
        r = unpack_check_mapping(db, job, &mapped);
        if (r < 0)
                return r;
        if (mapped >= 0) {
                r = thin_registry_get(db, unpack_host(job), job->pool, (uint32_t)mapped, &origin);
                if (r < 0)
                        return r;
                if (r > 0 && strcmp(origin.state, "ready") == 0) {
                        r = unpack_ensure_active(job, origin.device_id, origin.size_bytes);
                        if (r < 0)
                                return r;
                        unpack_response_set(run, job, origin.device_id, origin.extracted_bytes,
                                            origin.file_count, false);
                        job->skip = true;
                        return 0;
                }
        }

        r = unpack_check_checksum(db, job);
        if (r < 0)
                return r;

        /* Same content already unpacked for another image: share its origin. */
        r = thin_registry_find_origin(db, unpack_host(job), job->pool, job->req.checksum, &origin);
        if (r < 0)
                return r;
        if (r > 0 && strcmp(origin.state, "ready") == 0) {
                util_crash_point("unpack.share.after_lookup");
                r = unpack_share(run, job, &origin);
                if (r < 0)
                        return r;
        }
        if (job->skip) {
                r = unpack_ensure_active(job, origin.device_id, origin.size_bytes);
                if (r < 0)
                        return r;
                unpack_response_set(run, job, origin.device_id, origin.extracted_bytes,
                                    origin.file_count, false);
                log_info("image shares an existing origin", "device_id=%" PRIu32 " checksum=%s",
                         origin.device_id, job->req.checksum);
                return 0;
        }

        r = thin_pool_check_space(job->pool, job->ctx->cfg->pool_high_water_percent, &st);
        if (r == -ENOSPC)
                return err_set(
                        -ENOSPC,
                        "thin pool '%s' is above its high-water mark (data %.1f%%, metadata %.1f%%, limit %d%%): refusing to unpack image '%s'; free space with 'flyio-image-manager gc' or grow the pool",
                        job->pool, st.data_used_percent, st.metadata_used_percent,
                        job->ctx->cfg->pool_high_water_percent, job->req.image_id);
        if (r < 0)
                return err_wrap(r, "thin pool '%s' cannot take new devices", job->pool);
        return 0;
}

enum unpack_alloc_outcome {
        UNPACK_ALLOC_NEW,   /* job->device_id is ours, in state 'creating' */
        UNPACK_ALLOC_SHARE, /* a ready origin holds the content: the image is mapped to it */
        UNPACK_ALLOC_WAIT,  /* a run that can still resume is making the origin */
        UNPACK_ALLOC_STALE, /* a half-made origin of a run that cannot resume is in the way */
};

struct unpack_alloc {
        struct unpack_job *job;
        const char *run_id;
        enum unpack_alloc_outcome outcome;
        struct thin_row origin; /* SHARE, WAIT, STALE */
};

static int unpack_alloc_tx(struct db *db, void *userdata)
{
        struct unpack_alloc *a = userdata;
        struct unpack_job *job = a->job;
        PGresult *res = NULL;
        int r;

        a->outcome = UNPACK_ALLOC_NEW;
        /*
         * The lookup and the insert under one lock: two runs with the same checksum would
         * otherwise both find nothing, and the second insert would hit the unique index.
         */
        r = thin_registry_lock(db, unpack_host(job));
        if (r < 0)
                return r;
        r = thin_registry_find_origin(db, unpack_host(job), job->pool, job->req.checksum,
                                      &a->origin);
        if (r < 0)
                return r;
        if (r == 0)
                return thin_registry_alloc(db, unpack_host(job), job->pool, "origin", job->size,
                                           job->req.checksum, -1, a->run_id, &job->device_id);
        if (strcmp(a->origin.state, "ready") == 0) {
                a->outcome = UNPACK_ALLOC_SHARE;
                return unpack_map_image_tx(db, job, a->origin.device_id, a->run_id);
        }
        r = db_query_row(db, &res,
                         "SELECT 1 FROM fsm_runs WHERE run_id = $1 AND status IN ('pending',"
                         " 'running')",
                         1, (const char *const[]){a->origin.run_id});
        if (r < 0)
                return r;
        PQclear(res);
        a->outcome = r > 0 ? UNPACK_ALLOC_WAIT : UNPACK_ALLOC_STALE;
        return 0;
}

/*
 * Allocate the origin's thin id, or share an origin that holds the same content (then
 * job->skip is set and the response says unpacked=false). An origin that another run is
 * still making is waited for, up to UNPACK_TIMEOUT: failing at once would spend this run's
 * attempts while a large image unpacks, and send it to the DLQ.
 */
static int unpack_alloc(struct fsm_run *run, struct unpack_job *job)
{
        struct db *db = fsm_run_db(run);
        int64_t deadline = util_now_monotonic_ms() + (int64_t)job->ctx->cfg->unpack_timeout * 1000;
        bool waited = false;
        int r;

        for (;;) {
                struct unpack_alloc a = {.job = job, .run_id = fsm_run_id(run)};

                r = db_tx(db, unpack_alloc_tx, &a);
                if (r < 0)
                        return r;
                switch (a.outcome) {
                case UNPACK_ALLOC_NEW:
                        return 0;
                case UNPACK_ALLOC_SHARE:
                        unpack_response_set(run, job, a.origin.device_id, a.origin.extracted_bytes,
                                            a.origin.file_count, false);
                        log_info("image shares an origin another job made",
                                 "device_id=%" PRIu32 " checksum=%s waited=%s", a.origin.device_id,
                                 job->req.checksum, waited ? "yes" : "no");
                        job->skip = true;
                        return 0;
                case UNPACK_ALLOC_STALE:
                        /* What reconciliation would do: that run will never finish it. */
                        r = thin_registry_destroy(db, unpack_host(job), job->pool,
                                                  a.origin.device_id);
                        if (r < 0)
                                return err_wrap(r,
                                                "failed to remove the half-made origin %" PRIu32
                                                " of run %s, which holds the same content",
                                                a.origin.device_id, a.origin.run_id);
                        continue;
                case UNPACK_ALLOC_WAIT:
                        break;
                }
                if (fsm_run_should_stop(run))
                        return err_set(-EINTR, "unpack interrupted: worker shutting down");
                if (util_now_monotonic_ms() > deadline)
                        return err_set(
                                -EAGAIN,
                                "run %s is still unpacking the same content (thin id %" PRIu32
                                ") after UNPACK_TIMEOUT (%d s); will retry",
                                a.origin.run_id, a.origin.device_id, job->ctx->cfg->unpack_timeout);
                if (!waited)
                        log_info("waiting for another job unpacking the same content",
                                 "device_id=%" PRIu32 " other_run=%s", a.origin.device_id,
                                 a.origin.run_id);
                waited = true;
                util_sleep_ms(UNPACK_WAIT_POLL_MS);
        }
}

/*
 * Our own origin row, if any. A row left 'deleting' (a delete interrupted) is finished off
 * first and counts as none. Returns 1 with @ret filled, 0 or a negative errno.
 */
static int unpack_own_row(struct fsm_run *run, struct unpack_job *job, struct thin_row *ret)
{
        struct db *db = fsm_run_db(run);
        int r;

        r = thin_registry_find_by_run(db, unpack_host(job), job->pool, "origin", fsm_run_id(run),
                                      ret);
        if (r <= 0 || strcmp(ret->state, "deleting") != 0)
                return r;
        r = thin_registry_destroy(db, unpack_host(job), job->pool, ret->device_id);
        return r < 0 ? r : 0;
}

/*
 * Create thin id job->device_id in the pool and activate it as thin-<id>. @resumed: the id
 * is ours from before a crash, so one the pool has already is ours too. The device is blank
 * (job->fresh) unless it was made before the crash.
 */
static int unpack_make_thin(struct fsm_run *run, struct unpack_job *job, bool resumed)
{
        struct db *db = fsm_run_db(run);
        char *path = NULL;
        int r;

        job->have_device = true;
        job->fresh = true;
        thin_registry_origin_name(job->device_id, job->device_name, sizeof(job->device_name));
        util_crash_point("unpack.after_intent");
        r = thin_pool_create_thin(job->pool, job->device_id);
        if (r == -EEXIST && !resumed) {
                /* The pool has an id we did not know: keep it reserved, take another. */
                (void)db_exec(db, NULL,
                              "UPDATE thin_devices SET kind = 'unknown', state = 'ready',"
                              " checksum = NULL, run_id = NULL WHERE host_id = $1 AND"
                              " pool_name = $2 AND run_id = $3 AND kind = 'origin'",
                              3,
                              (const char *const[]){unpack_host(job), job->pool, fsm_run_id(run)});
                job->have_device = false;
                return err_set(
                        -EAGAIN,
                        "thin id %" PRIu32
                        " already exists in pool '%s' but not in the database; reserved it, will retry with another id",
                        job->device_id, job->pool);
        }
        if (r < 0 && r != -EEXIST)
                return err_wrap(r, "failed to create thin device %" PRIu32 " in pool '%s'",
                                job->device_id, job->pool);
        util_crash_point("unpack.after_create_thin");
        r = thin_pool_activate(job->pool, job->device_id, job->device_name, job->size, &path);
        if (r < 0)
                return err_wrap(r, "failed to activate thin device %" PRIu32, job->device_id);
        (void)snprintf(job->device_path, sizeof(job->device_path), "%s", path);
        free(path);
        return 0;
}

static int unpack_create_device(struct fsm_run *run, void *userdata)
{
        struct unpack_job *job = userdata;
        struct thin_row row;
        int r;

        if (unpack_skipping(run, job))
                return 0;
        r = unpack_own_row(run, job, &row);
        if (r < 0)
                return r;
        if (r > 0) {
                job->device_id = row.device_id;
                return unpack_make_thin(run, job, true);
        }
        r = unpack_alloc(run, job);
        if (r < 0 || job->skip)
                return r;
        return unpack_make_thin(run, job, false);
}

/*
 * Find our device again after a resume in another process. A run that can resume must not
 * fail for want of its device (an operator's gc may have removed it, or an older
 * reconciliation): one that is gone is made again, blank (job->fresh), and the caller makes
 * the filesystem and extracts again. If another run has unpacked the same content meanwhile,
 * the image shares that origin instead (job->skip).
 */
static int unpack_load_device(struct fsm_run *run, struct unpack_job *job)
{
        struct thin_row row;
        int r;

        if (job->have_device || job->skip)
                return 0;
        r = unpack_own_row(run, job, &row);
        if (r < 0)
                return r;
        if (r == 0) {
                log_notice("the thin device of a resumed run is gone, making it again", "");
                r = unpack_alloc(run, job);
                if (r < 0 || job->skip)
                        return r;
                return unpack_make_thin(run, job, false);
        }
        job->device_id = row.device_id;
        thin_registry_origin_name(job->device_id, job->device_name, sizeof(job->device_name));
        (void)snprintf(job->device_path, sizeof(job->device_path), "/dev/mapper/%s",
                       job->device_name);
        r = thin_pool_activate(job->pool, job->device_id, job->device_name, job->size, NULL);
        if (r == -ENODATA) {
                log_notice("the thin id of a resumed run is gone from the pool, making it again",
                           "device_id=%" PRIu32, job->device_id);
                return unpack_make_thin(run, job, true);
        }
        if (r < 0)
                return err_wrap(r, "failed to activate thin device %" PRIu32, job->device_id);
        job->have_device = true;
        return 0;
}

static int unpack_mkfs(struct unpack_job *job)
{
        const char *argv[] = {"mkfs.ext4",
                              "-q",
                              "-F",
                              "-m",
                              "0",
                              "-E",
                              "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                              job->device_path,
                              NULL};
        int r = spawn_run(argv, NULL, 0);

        if (r < 0)
                return err_wrap(-EIO, "failed to make a filesystem on '%s'", job->device_path);
        job->fresh = false;
        return 0;
}

static int unpack_make_fs(struct fsm_run *run, void *userdata)
{
        struct unpack_job *job = userdata;
        int r;

        if (unpack_skipping(run, job))
                return 0;
        r = unpack_load_device(run, job);
        if (r < 0 || job->skip)
                return r;
        return unpack_mkfs(job);
}

/*
 * Make UNPACK_MOUNT_BASE a mount point of its own with private propagation, before anything
 * is mounted under it. A mount made under a shared parent is copied to the parent's peers
 * (other mount namespaces: containers, a systemd service's namespace) the moment it is made;
 * making it private afterwards is too late, and its copies would keep the device open.
 */
static int unpack_mount_base(void)
{
        static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
        static bool done;
        struct statx stx;
        int e, r = 0;

        e = pthread_mutex_lock(&lock);
        FIM_ASSERT(e == 0);
        if (done)
                goto out;
        if (mkdir(UNPACK_MOUNT_BASE, 0700) < 0 && errno != EEXIST) {
                r = err_set(-errno, "failed to create '%s': %s", UNPACK_MOUNT_BASE,
                            strerror(errno));
                goto out;
        }
        if (statx(AT_FDCWD, UNPACK_MOUNT_BASE, AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS, &stx) < 0) {
                r = err_set(-errno, "failed to stat '%s': %s", UNPACK_MOUNT_BASE, strerror(errno));
                goto out;
        }
        /* Another process may have made it a mount point already: no second layer then. */
        if (!(stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) ||
            !(stx.stx_attributes & STATX_ATTR_MOUNT_ROOT)) {
                if (mount(UNPACK_MOUNT_BASE, UNPACK_MOUNT_BASE, NULL, MS_BIND, NULL) < 0) {
                        r = err_set(-errno, "failed to bind-mount '%s' onto itself: %s",
                                    UNPACK_MOUNT_BASE, strerror(errno));
                        goto out;
                }
        }
        if (mount(NULL, UNPACK_MOUNT_BASE, NULL, MS_PRIVATE, NULL) < 0) {
                r = err_set(-errno, "failed to make '%s' a private mount: %s", UNPACK_MOUNT_BASE,
                            strerror(errno));
                goto out;
        }
        done = true;
out:
        e = pthread_mutex_unlock(&lock);
        FIM_ASSERT(e == 0);
        return r;
}

/* Mount the device at a directory of our own, under the private base; returns the directory. */
static int unpack_mount(const struct unpack_job *job, const char *run_id, bool read_only, char *dir,
                        size_t size)
{
        int r;

        r = unpack_mount_base();
        if (r < 0)
                return r;
        r = util_snprintf(dir, size, "%s/mnt-%s", UNPACK_MOUNT_BASE, run_id);
        if (r < 0)
                return r;
        /* A crashed earlier attempt may have left it mounted. */
        (void)umount2(dir, MNT_DETACH);
        if (mkdir(dir, 0700) < 0 && errno != EEXIST)
                return err_set(-errno, "failed to create mount point '%s': %s", dir,
                               strerror(errno));
        if (mount(job->device_path, dir, "ext4",
                  MS_NOATIME | MS_NODEV | MS_NOSUID | (read_only ? MS_RDONLY : 0), NULL) < 0)
                return err_set(-errno, "failed to mount '%s' at '%s': %s", job->device_path, dir,
                               strerror(errno));
        return 0;
}

static void unpack_umount(const char *dir)
{
        if (umount2(dir, 0) < 0)
                (void)umount2(dir, MNT_DETACH);
        (void)rmdir(dir);
}

/* Whether a freshly made filesystem holds anything besides lost+found. */
static int unpack_root_entries(int root_fd)
{
        int fd = fcntl(root_fd, F_DUPFD_CLOEXEC, 0);
        DIR *d;
        struct dirent *de;
        int n = 0;

        if (fd < 0)
                return -errno;
        d = fdopendir(fd);
        if (!d) {
                close(fd);
                return -errno;
        }
        while ((de = readdir(d)) != NULL) {
                if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..") &&
                    strcmp(de->d_name, "lost+found"))
                        n++;
        }
        closedir(d);
        return n;
}

/*
 * A full pool shows up as I/O errors in the filesystem: when the pool is out of data space,
 * say so instead of passing the EIO on.
 */
static int unpack_explain_failure(const struct unpack_job *job, int r)
{
        struct thin_pool_status st;

        if (thin_pool_status(job->pool, &st) == 0 && st.mode == THIN_POOL_MODE_OUT_OF_DATA_SPACE)
                return err_set(
                        -ENOSPC,
                        "thin pool '%s' ran out of data space while unpacking image '%s' (%" PRIu64
                        " of %" PRIu64
                        " MiB used): free space with 'flyio-image-manager gc' or grow the pool",
                        job->pool, job->req.image_id, st.data_used_bytes >> 20,
                        st.data_total_bytes >> 20);
        return r;
}

struct unpack_progress {
        struct unpack_job *job;
        struct fsm_run *run;
        uint64_t counted; /* bytes already added to fim_extracted_bytes_total */
};

static int unpack_progress_cb(uint64_t entries, uint64_t bytes, void *userdata)
{
        struct unpack_progress *p = userdata;

        /* Counted as written, so that a failed or interrupted extraction counts too. */
        metrics_add_bytes_extracted(bytes - p->counted);
        p->counted = bytes;
        if (p->job->ctx->progress)
                p->job->ctx->progress("unpack", entries, bytes, p->job->ctx->progress_userdata);
        /* Transient: the run resumes where it stopped, it did not fail. */
        if (fsm_run_should_stop(p->run))
                return err_set(-EINTR, "unpack interrupted: worker shutting down");
        if (util_now_monotonic_ms() > p->job->deadline_ms)
                return err_set(-ETIMEDOUT, "unpack of image '%s' exceeded UNPACK_TIMEOUT (%d s)",
                               p->job->req.image_id, p->job->ctx->cfg->unpack_timeout);
        return 0;
}

/* Mount the device and open its root, making the filesystem again if it holds anything. */
static int unpack_open_root(struct fsm_run *run, struct unpack_job *job, char *dir, size_t size,
                            int *ret_fd)
{
        int fd, r;

        r = unpack_mount(job, fsm_run_id(run), false, dir, size);
        if (r < 0)
                return r;
        fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0) {
                r = err_set(-errno, "failed to open '%s': %s", dir, strerror(errno));
                unpack_umount(dir);
                return r;
        }
        if (unpack_root_entries(fd) > 0) {
                /* An interrupted extraction left files: start from an empty filesystem. */
                close(fd);
                unpack_umount(dir);
                r = unpack_mkfs(job);
                if (r < 0)
                        return r;
                return unpack_open_root(run, job, dir, size, ret_fd);
        }
        *ret_fd = fd;
        return 0;
}

/* Make the filesystem if the device is blank, mount it, extract the tarball, sync, unmount. */
static int unpack_fill(struct fsm_run *run, struct unpack_job *job)
{
        struct unpack_progress prog = {job, run, 0};
        struct extract_options opts;
        struct extract_result result;
        char dir[PATH_MAX];
        int root_fd = -1;
        int r;

        if (job->fresh) {
                r = unpack_mkfs(job);
                if (r < 0)
                        return r;
        }
        r = unpack_open_root(run, job, dir, sizeof(dir), &root_fd);
        if (r < 0)
                return r;
        util_crash_point("unpack.after_mount");
        extract_options_init(&opts);
        opts.max_total_bytes = job->size;
        opts.max_entries = (uint64_t)job->ctx->cfg->extract_max_entries;
        opts.max_path_depth = (unsigned)job->ctx->cfg->extract_max_depth;
        opts.max_path_length = (unsigned)job->ctx->cfg->extract_max_path_length;
        opts.max_sparse_entries = (uint64_t)job->ctx->cfg->extract_max_sparse_entries;
        opts.progress = unpack_progress_cb;
        opts.userdata = &prog;
        job->deadline_ms = util_now_monotonic_ms() + (int64_t)job->ctx->cfg->unpack_timeout * 1000;
        r = extract_file(root_fd, job->req.local_path, &opts, &result);
        if (r < 0) {
                r = unpack_explain_failure(
                        job, err_wrap(r, "failed to unpack image '%s'", job->req.image_id));
                goto out;
        }
        if (syncfs(root_fd) < 0) {
                r = unpack_explain_failure(
                        job, err_set(-errno, "failed to sync the filesystem of image '%s': %s",
                                     job->req.image_id, strerror(errno)));
                goto out;
        }
        /* The last progress report came at the end; this adds what it may have missed. */
        if (result.size_bytes > prog.counted)
                metrics_add_bytes_extracted(result.size_bytes - prog.counted);
        unpack_response_set(run, job, job->device_id, (int64_t)result.size_bytes,
                            (int64_t)result.file_count, true);
        log_info("image extracted",
                 "device_id=%" PRIu32 " files=%" PRIu64 " bytes=%" PRIu64 " dirs=%" PRIu64
                 " skipped_devices=%" PRIu64 " skipped_xattrs=%" PRIu64 " skipped_other=%" PRIu64,
                 job->device_id, result.file_count, result.size_bytes, result.dir_count,
                 result.skipped_devices, result.skipped_xattrs, result.skipped_other);
out:
        close(root_fd);
        unpack_umount(dir);
        /* A hostile or corrupt tarball never gets better: give the pool back now. */
        if (r < 0 && !err_is_transient(r)) {
                char saved[ERR_MSG_MAX];

                (void)snprintf(saved, sizeof(saved), "%s", err_last());
                if (thin_registry_destroy(fsm_run_db(run), unpack_host(job), job->pool,
                                          job->device_id) == 0)
                        job->have_device = false;
                (void)err_set(r, "%s", saved);
        }
        return r;
}

static int unpack_extract(struct fsm_run *run, void *userdata)
{
        struct unpack_job *job = userdata;
        int r;

        if (unpack_skipping(run, job))
                return 0;
        r = unpack_load_device(run, job);
        if (r < 0 || job->skip)
                return r;
        return unpack_fill(run, job);
}

static int unpack_verify_layout(struct fsm_run *run, void *userdata)
{
        struct unpack_job *job = userdata;
        char dir[PATH_MAX];
        int root_fd, n, r;

        if (unpack_skipping(run, job))
                return 0;
        r = unpack_load_device(run, job);
        if (r < 0 || job->skip)
                return r;
        util_crash_point("unpack.before_verify");
        if (job->fresh) {
                /* Made again after it vanished: what extract put there is gone. */
                r = unpack_fill(run, job);
                if (r < 0)
                        return r;
        }
        r = unpack_mount(job, fsm_run_id(run), true, dir, sizeof(dir));
        if (r < 0)
                return r;
        root_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        n = root_fd < 0 ? -errno : unpack_root_entries(root_fd);
        if (root_fd >= 0)
                close(root_fd);
        unpack_umount(dir);
        if (n < 0)
                return err_set(n, "failed to read the root of image '%s': %s", job->req.image_id,
                               strerror(-n));
        if (n == 0)
                return err_set(-EBADMSG, "tarball of image '%s' holds no files: nothing to boot",
                               job->req.image_id);
        return 0;
}

static int unpack_record(struct fsm_run *run, void *userdata)
{
        char now[40];

        (void)userdata;
        util_format_time(util_now_realtime_ms(), now, sizeof(now));
        json_object_object_add(fsm_run_response(run), "unpacked_at", json_object_new_string(now));
        return 0;
}

static int64_t unpack_response_i64(struct fsm_run *run, const char *field)
{
        struct json_object *v = NULL;

        return json_object_object_get_ex(fsm_run_response(run), field, &v)
                       ? json_object_get_int64(v)
                       : 0;
}

static int unpack_record_commit(struct fsm_run *run, struct db *db, void *userdata)
{
        struct unpack_job *job = userdata;
        struct json_object *v = NULL;
        char files[24], bytes[24], idbuf[16];
        uint32_t id;
        int r;

        if (!json_object_object_get_ex(fsm_run_response(run), "device_id", &v))
                return err_set(-EIO, "run %s finished without a device", fsm_run_id(run));
        (void)snprintf(idbuf, sizeof(idbuf), "%s", json_object_get_string(v));
        id = (uint32_t)strtoul(idbuf, NULL, 10);
        if (!unpack_skipping(run, job)) {
                (void)snprintf(files, sizeof(files), "%" PRId64,
                               unpack_response_i64(run, "file_count"));
                (void)snprintf(bytes, sizeof(bytes), "%" PRId64,
                               unpack_response_i64(run, "size_bytes"));
                r = db_exec(
                        db, NULL,
                        "UPDATE thin_devices SET state = 'ready', file_count = $4,"
                        " extracted_bytes = $5, updated_at = now() WHERE host_id = $1 AND"
                        " pool_name = $2 AND device_id = $3",
                        5, (const char *const[]){unpack_host(job), job->pool, idbuf, files, bytes});
                if (r < 0)
                        return r;
                r = unpack_map_image_tx(db, job, id, fsm_run_id(run));
                if (r < 0)
                        return r;
        }
        return 0;
}

/* The activate request; also written later for a run that completed with the handoff off. */
static int unpack_handoff(struct fsm_run *run, struct db *db, void *userdata)
{
        struct unpack_job *job = userdata;
        struct activate_request next = {0};
        struct json_object *v = NULL;
        char idbuf[16];
        char *payload;
        uint32_t id;
        int r;

        if (!job->ctx->handoff)
                return 0;
        if (!json_object_object_get_ex(fsm_run_response(run), "device_id", &v))
                return err_set(-EIO, "run %s finished without a device", fsm_run_id(run));
        (void)snprintf(idbuf, sizeof(idbuf), "%s", json_object_get_string(v));
        id = (uint32_t)strtoul(idbuf, NULL, 10);
        (void)snprintf(next.image_id, sizeof(next.image_id), "%s", job->req.image_id);
        (void)snprintf(next.device_id, sizeof(next.device_id), "%s", idbuf);
        thin_registry_origin_name(id, next.device_name, sizeof(next.device_name));
        (void)snprintf(next.pool_name, sizeof(next.pool_name), "%s", job->pool);
        payload = activate_request_encode(&next);
        if (!payload)
                return err_set(-ENOMEM, "out of memory");
        r = stage_outbox_insert(db, job->ctx, fsm_run_id(run), STAGE_ACTIVATE, job->req.image_id,
                                payload);
        free(payload);
        return r < 0 ? r : 1;
}

/*
 * Leave no half-made device. Runs once the failure is committed, so the row's 'deleting' intent
 * is durable before the delete and no transaction waits on device-mapper; reconciliation
 * finishes this if it fails here, or if the process dies before it runs.
 */
static void unpack_after_failure(struct fsm_run *run, void *userdata)
{
        struct unpack_job *job = userdata;
        struct db *db = fsm_run_db(run);
        struct thin_row row;
        int r;

        r = thin_registry_find_by_run(db, unpack_host(job), job->pool, "origin", fsm_run_id(run),
                                      &row);
        if (r == 0 || (r > 0 && strcmp(row.state, "ready") == 0))
                return;
        if (r > 0)
                r = thin_registry_destroy(db, unpack_host(job), job->pool, row.device_id);
        if (r < 0)
                log_warning_errno(r,
                                  "failed to remove a half-made device, reconciliation will retry",
                                  "pool=%s", log_quote(job->pool));
}

static const struct fsm_transition unpack_transitions[] = {
        {"check_unpacked", unpack_check_unpacked, NULL},
        {"create_device", unpack_create_device, NULL},
        {"make_fs", unpack_make_fs, NULL},
        {"extract", unpack_extract, NULL},
        {"verify_layout", unpack_verify_layout, NULL},
        {"record", unpack_record, unpack_record_commit},
};

static const struct fsm_def unpack_fsm = {
        .name = "unpack",
        .transitions = unpack_transitions,
        .transition_count = ARRAY_SIZE(unpack_transitions),
        .after_failure = unpack_after_failure,
        .handoff = unpack_handoff,
};

static int unpack_handle(const struct stage_ctx *ctx, const char *request_json,
                         struct stage_result *ret)
{
        struct unpack_job job = {.ctx = ctx};
        char key[1024];
        int r;

        memset(ret, 0, sizeof(*ret));
        r = unpack_request_decode(request_json, &job.req);
        if (r < 0)
                return stage_result_invalid(ret, "unpack", r);
        (void)snprintf(job.pool, sizeof(job.pool), "%s",
                       job.req.pool_name[0] ? job.req.pool_name : ctx->cfg->pool_name);
        job.size = job.req.device_size ? (uint64_t)job.req.device_size : ctx->cfg->device_size;
        job.req.device_size = (int64_t)job.size;
        (void)snprintf(job.req.pool_name, sizeof(job.req.pool_name), "%s", job.pool);
        r = util_snprintf(key, sizeof(key), "unpack/%s/%s/%s/%s", ctx->cfg->host_id, job.pool,
                          job.req.image_id, job.req.checksum);
        if (r < 0)
                return err_set(r, "idempotency key too long");
        return stage_execute(ctx, &unpack_fsm, key, unpack_request_encode(&job.req),
                             job.req.image_id, "unpacked", &job, ret);
}

const struct stage stage_unpack = {
        .id = STAGE_UNPACK,
        .name = "unpack",
        .handle = unpack_handle,
};
