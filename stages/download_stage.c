/*
 * The download stage's FSM: check_exists -> fetch -> verify -> record.
 *
 *   check_exists  looks up the image (FOR UPDATE). A completed download of the same source
 *                 whose file is still there ends the work (downloaded=false), after checking
 *                 the request's checksum, if any, against the recorded one. A completed
 *                 download of a different source for the same image id is refused: image ids
 *                 name content, and silently replacing an image under a VM is worse than a
 *                 failed job. Otherwise the run claims the image row: 'pending'.
 *   fetch         claims again (see below), marks the row 'downloading', streams the object
 *                 into LOCAL_DIR/<image_id>.tar.part with SHA-256, resuming an earlier partial
 *                 download, then renames it into place (stages/download.c). Just before the
 *                 rename, the image row records size, checksum and ETag, so a fetch repeated
 *                 after a crash that followed the rename finds them: when S3 still has that
 *                 object (HEAD) and the file still hashes to them, it keeps the file instead
 *                 of downloading it again. A transient failure puts the row back to
 *                 'pending' with the error, until the retry.
 *   verify        after a resume in another process, re-hashes the file on disk and compares
 *                 it with what fetch recorded. The engine retries a step, never an earlier
 *                 one, so verify does fetch's work itself when the file is gone or changed:
 *                 it downloads the object again, as fetch would have.
 *   record        marks the image completed and, in the same transaction, writes the unpack
 *                 request to the outbox (the FSM's handoff hook, which also runs when a
 *                 request finds the key completed without a handoff, e.g. by process-image).
 *
 * One image, several runs: requests for one image with different idempotency keys (one with
 * a checksum, one without, say) are different runs, and the per-key lease does not keep them
 * apart. The images row does: it names the run working on the image, and a run that finds
 * another live run there (a fresh lease) waits for it, polling, instead of downloading a
 * second copy over the first. When that run completes, the waiter finds the completed image
 * and ends with downloaded=false; when it fails or its worker dies, the waiter takes over.
 *
 * Statuses: pending (accepted, no transfer going on: waiting to start or for a retry),
 * downloading (fetch is transferring), completed, failed (permanent error or out of attempts).
 * A failed run marks the image 'failed' with the error. Every step is safe to repeat.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <json-c/json.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "stages/download.h"
#include "stages/request.h"
#include "stages/s3_client.h"
#include "worker/metrics.h"
#include "worker/stage.h"

/* Poll for another run's download this often, for at most DOWNLOAD_TIMEOUT per attempt. */
#define DOWNLOAD_WAIT_POLL_MS 500
/* Space left free on LOCAL_DIR's filesystem after a download, for everything else. */
#define DOWNLOAD_FREE_MARGIN_BYTES (64ull << 20)

struct download_job {
        const struct stage_ctx *ctx;
        struct fsm_run *run; /* while fetch or verify downloads */
        struct download_request req;
        char bucket[REQUEST_BUCKET_MAX + 1];
        char dest[PATH_MAX];
        bool skip;         /* the finished download is there already */
        bool fetched_here; /* fetch ran in this process: the in-stream hash is fresh */
        char etag[S3_ETAG_MAX];
};

static void download_progress(uint64_t done, uint64_t total, void *userdata)
{
        struct download_job *job = userdata;

        if (job->ctx->progress)
                job->ctx->progress("download", done, total, job->ctx->progress_userdata);
}

/* Fill the response from an images row: image_id, local_path, checksum, size, time. */
static void download_response_set(struct json_object *resp, const char *image_id, const char *path,
                                  const char *checksum, int64_t size, bool downloaded,
                                  const char *downloaded_at)
{
        json_object_object_add(resp, "image_id", json_object_new_string(image_id));
        json_object_object_add(resp, "local_path", json_object_new_string(path));
        json_object_object_add(resp, "checksum", json_object_new_string(checksum));
        json_object_object_add(resp, "size_bytes", json_object_new_int64(size));
        json_object_object_add(resp, "downloaded", json_object_new_boolean(downloaded));
        if (downloaded_at)
                json_object_object_add(resp, "downloaded_at",
                                       json_object_new_string(downloaded_at));
}

struct download_check {
        struct download_job *job;
        struct fsm_run *run;
        char owner[64]; /* -EINPROGRESS: the live run that works on the image */
};

/* A completed image of the same source: skip it, after checking the request's checksum. */
static int download_found_completed(struct download_check *c, PGresult *res)
{
        struct download_job *job = c->job;
        const char *have = db_get(res, 0, 3);

        if (job->req.checksum[0] && (!have || strcmp(have, job->req.checksum) != 0))
                return err_set(
                        -EBADMSG,
                        "image '%s' is already downloaded from 's3://%s/%s' with SHA-256 %s, but the request expects %s; the file is kept, as other work may use it: check the checksum in the request, or gc the image and request it again",
                        job->req.image_id, job->bucket, job->req.s3_key, have ? have : "(none)",
                        job->req.checksum);
        download_response_set(fsm_run_response(c->run), job->req.image_id, db_get(res, 0, 5), have,
                              db_get_i64(res, 0, 4), false, db_get(res, 0, 8));
        job->skip = true;
        return 0;
}

/* The image row, locked, and whether the run named in it is alive (holds a fresh lease). */
static const char download_claim_sql[] =
        "SELECT i.status, i.bucket, i.s3_key, i.checksum, i.size_bytes, i.local_path, i.run_id,"
        " coalesce(r.status IN ('pending', 'running') AND r.lease_owner IS NOT NULL"
        " AND r.lease_until > now(), false), " DB_TIME(
                "i.downloaded_at") " FROM images i LEFT JOIN fsm_runs r ON r.run_id = i.run_id"
                                   " WHERE i.host_id = $1 AND i.image_id = $2 FOR UPDATE OF i";

/*
 * Decide, under the row lock, what this run does with the image: skip it (completed), refuse
 * it, wait for another live run (-EINPROGRESS, c->owner set), or claim the row as 'pending'.
 */
static int download_claim_tx(struct db *db, void *userdata)
{
        struct download_check *c = userdata;
        struct download_job *job = c->job;
        const char *host = job->ctx->cfg->host_id;
        const char *me = fsm_run_id(c->run);
        PGresult *res = NULL;
        int r;

        job->skip = false;
        r = db_query_row(db, &res, download_claim_sql, 2,
                         (const char *const[]){host, job->req.image_id});
        if (r < 0)
                return r;
        if (r > 0 && strcmp(db_get(res, 0, 0), "completed") == 0) {
                bool same = strcmp(db_get(res, 0, 1), job->bucket) == 0 &&
                            strcmp(db_get(res, 0, 2), job->req.s3_key) == 0;
                const char *path = db_get(res, 0, 5);
                struct stat st;

                if (!same) {
                        r = err_set(
                                -EEXIST,
                                "image '%s' was already downloaded from 's3://%s/%s'; refusing 's3://%s/%s' for the same image id (use a new image id, or gc the old image first)",
                                job->req.image_id, db_get(res, 0, 1), db_get(res, 0, 2),
                                job->bucket, job->req.s3_key);
                        PQclear(res);
                        return r;
                }
                if (path && stat(path, &st) == 0 && st.st_size == db_get_i64(res, 0, 4)) {
                        r = download_found_completed(c, res);
                        PQclear(res);
                        return r;
                }
                /* Recorded as complete but the file is gone or changed: download again. */
        } else if (r > 0 && db_get(res, 0, 6) && strcmp(db_get(res, 0, 6), me) == 0) {
                /* Ours already (a retry, or fetch after check_exists): nothing to change. */
                PQclear(res);
                return 0;
        } else if (r > 0 && strcmp(db_get(res, 0, 7), "t") == 0) {
                (void)snprintf(c->owner, sizeof(c->owner), "%s", db_get(res, 0, 6));
                PQclear(res);
                return -EINPROGRESS;
        }
        PQclear(res);
        return db_exec(db, NULL,
                       "INSERT INTO images (host_id, image_id, bucket, s3_key, status, local_path,"
                       " run_id) VALUES ($1, $2, $3, $4, 'pending', $5, $6)"
                       " ON CONFLICT (host_id, image_id) DO UPDATE SET status = 'pending',"
                       " bucket = $3, s3_key = $4, local_path = $5, run_id = $6, error = NULL,"
                       " checksum = NULL, size_bytes = NULL, etag = NULL, downloaded_at = NULL,"
                       " updated_at = now()",
                       6,
                       (const char *const[]){host, job->req.image_id, job->bucket, job->req.s3_key,
                                             job->dest, me});
}

/*
 * Claim the image for this run, waiting while another live run works on it: up to
 * DOWNLOAD_TIMEOUT (one attempt of theirs), then -EBUSY so that the FSM retries later.
 */
static int download_claim(struct fsm_run *run, struct download_job *job)
{
        struct download_check c = {.job = job, .run = run};
        int64_t give_up = util_now_monotonic_ms() + (int64_t)job->ctx->cfg->download_timeout * 1000;
        int r;

        for (;;) {
                r = db_tx(fsm_run_db(run), download_claim_tx, &c);
                if (r != -EINPROGRESS)
                        return r;
                if (fsm_run_should_stop(run))
                        return err_set(
                                -EINTR,
                                "stopped while waiting for run %s, which is downloading image '%s'",
                                c.owner, job->req.image_id);
                if (util_now_monotonic_ms() >= give_up)
                        return err_set(
                                -EBUSY,
                                "image '%s' is still being downloaded by run %s (another request for it) after %d s; will retry",
                                job->req.image_id, c.owner, job->ctx->cfg->download_timeout);
                util_sleep_ms(DOWNLOAD_WAIT_POLL_MS);
        }
}

static int download_check_exists(struct fsm_run *run, void *userdata)
{
        return download_claim(run, userdata);
}

static int download_s3_client(const struct config *cfg, struct s3_client **ret)
{
        struct s3_client_options o;

        s3_client_options_from_config(cfg, &o);
        return s3_client_new(&o, ret);
}

/* Whether the response already says the file is in place (skip, or fetch done). */
static bool download_response_done(struct fsm_run *run)
{
        struct json_object *v = NULL;

        return json_object_object_get_ex(fsm_run_response(run), "checksum", &v);
}

/* Set this run's image row to @status (and @error, may be NULL). */
static int download_set_status(struct fsm_run *run, const struct download_job *job,
                               const char *status, const char *error)
{
        return db_exec(fsm_run_db(run), NULL,
                       "UPDATE images SET status = $4, error = $5, updated_at = now()"
                       " WHERE host_id = $1 AND image_id = $2 AND run_id = $3",
                       5,
                       (const char *const[]){job->ctx->cfg->host_id, job->req.image_id,
                                             fsm_run_id(run), status, error});
}

/* After a transient failure: no transfer until the retry; the row says why. */
static void download_back_to_pending(struct fsm_run *run, const struct download_job *job, int r)
{
        char msg[ERR_MSG_MAX];

        (void)snprintf(msg, sizeof(msg), "%s", err_text(r));
        log_redact(msg);
        if (download_set_status(run, job, "pending", msg) < 0)
                log_debug("could not mark the image pending", "image_id=%s", job->req.image_id);
        (void)err_set(r, "%s", msg);
}

/*
 * download_object's before_rename hook: the image row learns what the file is about to be
 * before it takes its final name, so that a crash right after the rename costs a hash of the
 * file, not a new download (download_recorded()).
 */
static int download_record_file(const struct download_result *result, void *userdata)
{
        struct download_job *job = userdata;
        char size[24];

        (void)snprintf(size, sizeof(size), "%" PRIu64, result->size);
        return db_exec(fsm_run_db(job->run), NULL,
                       "UPDATE images SET checksum = $4, size_bytes = $5, etag = $6,"
                       " updated_at = now() WHERE host_id = $1 AND image_id = $2 AND run_id = $3",
                       6,
                       (const char *const[]){job->ctx->cfg->host_id, job->req.image_id,
                                             fsm_run_id(job->run), result->sha256, size,
                                             result->etag[0] ? result->etag : NULL});
}

/*
 * What this run recorded on the image row before renaming a download into place: 1 with
 * @ret filled, 0 when nothing is recorded (no download of this run got that far), or a
 * negative errno.
 */
static int download_recorded(struct fsm_run *run, const struct download_job *job,
                             struct download_result *ret)
{
        PGresult *res = NULL;
        int r;

        r = db_query_row(
                fsm_run_db(run), &res,
                "SELECT checksum, size_bytes, etag FROM images WHERE host_id = $1"
                " AND image_id = $2 AND run_id = $3 AND checksum IS NOT NULL"
                " AND size_bytes IS NOT NULL AND etag IS NOT NULL",
                3,
                (const char *const[]){job->ctx->cfg->host_id, job->req.image_id, fsm_run_id(run)});
        if (r <= 0)
                return r;
        *ret = (struct download_result){.size = (uint64_t)db_get_i64(res, 0, 1)};
        (void)snprintf(ret->sha256, sizeof(ret->sha256), "%s", db_get(res, 0, 0));
        (void)snprintf(ret->etag, sizeof(ret->etag), "%s", db_get(res, 0, 2));
        PQclear(res);
        return 1;
}

/*
 * Put the object at job->dest and fill the response: keep the file there when it is what
 * @recorded (may be NULL) describes and S3 still has that object, else download it, resuming
 * a partial file. Marks the image 'downloading' meanwhile, 'pending' after a transient failure.
 */
static int download_obtain(struct fsm_run *run, struct download_job *job,
                           const struct download_result *recorded)
{
        const struct config *cfg = job->ctx->cfg;
        struct s3_client *client = NULL;
        struct download_result result = {0};
        uint64_t received = 0;
        struct download_params p = {
                .bucket = job->bucket,
                .key = job->req.s3_key,
                .dest_path = job->dest,
                .max_object_bytes = cfg->max_object_size,
                .parallel_threshold_bytes = cfg->download_parallel_threshold,
                .part_size = cfg->download_part_size,
                .max_connections = (unsigned)cfg->download_connections,
                .min_free_bytes = DOWNLOAD_FREE_MARGIN_BYTES,
                .total_timeout_ms = (int64_t)cfg->download_timeout * 1000,
                .stall_timeout_ms = (int64_t)cfg->download_stall_timeout * 1000,
                .expected_sha256 = job->req.checksum[0] ? job->req.checksum : NULL,
                .received_bytes = &received,
                .recorded = recorded,
                .before_rename = download_record_file,
                .before_rename_userdata = job,
        };
        int r;

        r = download_set_status(run, job, "downloading", NULL);
        if (r < 0)
                return r;
        job->run = run;
        r = download_s3_client(cfg, &client);
        if (r >= 0)
                r = download_object(client, &p, download_progress, job, &result);
        s3_client_free(client);
        job->run = NULL;
        /* Bytes moved, whether or not this attempt succeeds: what the link carried. */
        metrics_add_bytes_downloaded(received);
        if (r < 0) {
                if (err_is_transient(r))
                        download_back_to_pending(run, job, r);
                return r;
        }
        util_crash_point("download.after_rename");
        job->fetched_here = true;
        (void)snprintf(job->etag, sizeof(job->etag), "%s", result.etag);
        download_response_set(fsm_run_response(run), job->req.image_id, job->dest, result.sha256,
                              (int64_t)result.size, true, NULL);
        if (result.kept)
                log_info("downloaded file kept: it still is the object recorded at its rename",
                         "bucket=%s key=%s bytes=%" PRIu64 " sha256=%s", log_quote(job->bucket),
                         log_quote(job->req.s3_key), result.size, result.sha256);
        else
                log_info("object downloaded",
                         "bucket=%s key=%s bytes=%" PRIu64 " sha256=%s resumed_from=%" PRIu64
                         " parts=%u",
                         log_quote(job->bucket), log_quote(job->req.s3_key), result.size,
                         result.sha256, result.resumed_from_offset, result.parts);
        return 0;
}

static int download_fetch(struct fsm_run *run, void *userdata)
{
        struct download_job *job = userdata;
        struct download_result recorded;
        int r;

        /* Another run may have finished the image since check_exists (or be at it now). */
        r = download_claim(run, job);
        if (r < 0 || job->skip)
                return r;
        r = download_recorded(run, job, &recorded);
        if (r < 0)
                return r;
        return download_obtain(run, job, r > 0 ? &recorded : NULL);
}

static const char *download_response_str(struct fsm_run *run, const char *field)
{
        struct json_object *v = NULL;

        if (!json_object_object_get_ex(fsm_run_response(run), field, &v))
                return NULL;
        return json_object_get_string(v);
}

static int64_t download_response_i64(struct fsm_run *run, const char *field)
{
        struct json_object *v = NULL;

        if (!json_object_object_get_ex(fsm_run_response(run), field, &v))
                return -1;
        return json_object_get_int64(v);
}

static int download_fetch_commit(struct fsm_run *run, struct db *db, void *userdata)
{
        struct download_job *job = userdata;
        char size[24];

        if (job->skip)
                return 0;
        (void)snprintf(size, sizeof(size), "%" PRId64, download_response_i64(run, "size_bytes"));
        return db_exec(db, NULL,
                       "UPDATE images SET checksum = $3, size_bytes = $4, etag = $5,"
                       " updated_at = now() WHERE host_id = $1 AND image_id = $2",
                       5,
                       (const char *const[]){job->ctx->cfg->host_id, job->req.image_id,
                                             download_response_str(run, "checksum"), size,
                                             job->etag[0] ? job->etag : NULL});
}

static int download_verify(struct fsm_run *run, void *userdata)
{
        struct download_job *job = userdata;
        const char *want = download_response_str(run, "checksum");
        int64_t want_size = download_response_i64(run, "size_bytes");
        char have[DOWNLOAD_SHA256_HEX_LEN + 1];
        uint64_t size = 0;
        int r;

        util_crash_point("download.before_verify");
        if (!want || !download_response_done(run))
                return err_set(-EIO, "no checksum recorded for image '%s' before verify",
                               job->req.image_id);
        /* The stream hash is fresh when fetch ran here; after a resume, read the file again. */
        if (job->skip || job->fetched_here)
                return 0;
        r = download_hash_file(job->dest, have, &size);
        if (r < 0 && r != -ENOENT)
                return r;
        if (r == 0 && strcmp(have, want) == 0 && (int64_t)size == want_size)
                return 0;
        log_info("downloaded file gone or changed since fetch, downloading it again",
                 "path=%s sha256=%s expected=%s", log_quote(job->dest), r == 0 ? have : "-", want);
        if (r == 0)
                (void)unlink(job->dest);
        return download_obtain(run, job, NULL);
}

static int download_record(struct fsm_run *run, void *userdata)
{
        char now[40];

        (void)userdata;
        if (!download_response_str(run, "downloaded_at")) {
                util_format_time(util_now_realtime_ms(), now, sizeof(now));
                json_object_object_add(fsm_run_response(run), "downloaded_at",
                                       json_object_new_string(now));
        }
        return 0;
}

static int download_record_commit(struct fsm_run *run, struct db *db, void *userdata)
{
        struct download_job *job = userdata;
        char size[24];

        (void)snprintf(size, sizeof(size), "%" PRId64, download_response_i64(run, "size_bytes"));
        return db_exec(db, NULL,
                       "UPDATE images SET status = 'completed', local_path = $3, checksum = $4,"
                       " size_bytes = $5, run_id = $6, error = NULL,"
                       " downloaded_at = coalesce(downloaded_at, now()), updated_at = now()"
                       " WHERE host_id = $1 AND image_id = $2",
                       6,
                       (const char *const[]){job->ctx->cfg->host_id, job->req.image_id, job->dest,
                                             download_response_str(run, "checksum"), size,
                                             fsm_run_id(run)});
}

/* The unpack request; also written later for a run that completed with the handoff off. */
static int download_handoff(struct fsm_run *run, struct db *db, void *userdata)
{
        struct download_job *job = userdata;
        struct unpack_request next = {0};
        char *payload = NULL;
        int r;

        if (!job->ctx->handoff)
                return 0;
        (void)snprintf(next.image_id, sizeof(next.image_id), "%s", job->req.image_id);
        (void)snprintf(next.local_path, sizeof(next.local_path), "%s", job->dest);
        (void)snprintf(next.checksum, sizeof(next.checksum), "%s",
                       download_response_str(run, "checksum"));
        payload = unpack_request_encode(&next);
        if (!payload)
                return err_set(-ENOMEM, "out of memory");
        r = stage_outbox_insert(db, job->ctx, fsm_run_id(run), STAGE_UNPACK, job->req.image_id,
                                payload);
        free(payload);
        return r < 0 ? r : 1;
}

static int download_on_failure(struct fsm_run *run, struct db *db, void *userdata)
{
        struct download_job *job = userdata;
        const char *error = fsm_run_error(run);

        return db_exec(db, NULL,
                       "UPDATE images SET status = 'failed', error = $4, updated_at = now()"
                       " WHERE host_id = $1 AND image_id = $2 AND run_id = $3",
                       4,
                       (const char *const[]){job->ctx->cfg->host_id, job->req.image_id,
                                             fsm_run_id(run), error});
}

static const struct fsm_transition download_transitions[] = {
        {"check_exists", download_check_exists, NULL},
        {"fetch", download_fetch, download_fetch_commit},
        {"verify", download_verify, NULL},
        {"record", download_record, download_record_commit},
};

static const struct fsm_def download_fsm = {
        .name = "download",
        .transitions = download_transitions,
        .transition_count = ARRAY_SIZE(download_transitions),
        .on_failure = download_on_failure,
        .handoff = download_handoff,
};

/* Mark a stored response as coming from an earlier run. */
static int download_handle(const struct stage_ctx *ctx, const char *request_json,
                           struct stage_result *ret)
{
        struct download_job job = {.ctx = ctx};
        char key[2048];
        int r;

        memset(ret, 0, sizeof(*ret));
        r = download_request_decode(request_json, &job.req);
        if (r < 0)
                return stage_result_invalid(ret, "download", r);
        (void)snprintf(job.bucket, sizeof(job.bucket), "%s",
                       job.req.bucket[0] ? job.req.bucket : ctx->cfg->s3_bucket);
        r = util_snprintf(job.dest, sizeof(job.dest), "%s/%s.tar", ctx->cfg->local_dir,
                          job.req.image_id);
        if (r < 0)
                return err_set(r, "LOCAL_DIR is too long");
        r = util_snprintf(key, sizeof(key), "download/%s/%s/s3://%s/%s/%s", ctx->cfg->host_id,
                          job.req.image_id, job.bucket, job.req.s3_key,
                          job.req.checksum[0] ? job.req.checksum : "-");
        if (r < 0)
                return err_set(r, "idempotency key too long");

        /* Store the request as understood, with the bucket default applied. */
        (void)snprintf(job.req.bucket, sizeof(job.req.bucket), "%s", job.bucket);
        return stage_execute(ctx, &download_fsm, key, download_request_encode(&job.req),
                             job.req.image_id, "downloaded", &job, ret);
}

const struct stage stage_download = {
        .id = STAGE_DOWNLOAD,
        .name = "download",
        .handle = download_handle,
};
