#pragma once

/*
 * The download stage's data path: fetch one S3 object into a local file, hashing it with
 * SHA-256 on the way, resumable after a crash or a dropped connection.
 *
 *   dest_path.part       the bytes so far (pwrite at their offsets)
 *   dest_path.part.meta  a small text sidecar: ETag, size, part size, what is on disk
 *
 * A finished download is fsynced, renamed to dest_path, and its directory fsynced; the
 * sidecar is then removed. Whether dest_path already holds a complete download is the
 * caller's concern (the FSM's idempotency check); download_hash_file() verifies one. A caller
 * that records what it downloaded (the before_rename hook) can hand that record back in a
 * later call (recorded), which then keeps a dest_path that still matches it instead of
 * downloading the object again.
 */

#include <stdbool.h>
#include <stdint.h>

#include "stages/s3_client.h"

#define DOWNLOAD_SHA256_HEX_LEN 64
#define DOWNLOAD_DEFAULT_PART_SIZE (8u << 20)
/* Objects are never split into more parts than this; the part size grows instead. */
#define DOWNLOAD_MAX_PARTS 10000u

struct download_result;

/*
 * Called once the whole object is on disk, hashed and synced under the partial name, right
 * before the rename to dest_path, with what the call will return. A negative errno (with
 * err_set()) fails the call with it; after a transient one the complete partial file stays,
 * so the next call has nothing left to fetch.
 */
typedef int (*download_before_rename_fn)(const struct download_result *result, void *userdata);

struct download_params {
        const char *bucket;
        const char *key;
        const char *dest_path;             /* final path; the partial file is dest_path".part" */
        uint64_t max_object_bytes;         /* refuse larger objects (-EFBIG); 0: no limit */
        uint64_t min_free_bytes;           /* space to leave free on the filesystem */
        uint64_t parallel_threshold_bytes; /* larger objects download in parts; 0: never */
        uint64_t part_size;                /* 0: DOWNLOAD_DEFAULT_PART_SIZE */
        unsigned max_connections;          /* parts in flight; 0 or 1: a single stream */
        int64_t total_timeout_ms;          /* bounds the whole call; 0: none */
        int64_t stall_timeout_ms;          /* no bytes for this long: -ETIMEDOUT; 0: none */
        int64_t checkpoint_ms;             /* sync and record progress this often; 0: 2 s */
        const char *expected_sha256;       /* 64 hex digits (either case), or NULL */
        /*
         * Optional: incremented by every byte of object data received in this call, including
         * those of an attempt that then fails; not the resumed ones.
         */
        uint64_t *received_bytes;
        /*
         * Optional: what an earlier call left at dest_path (its result, as the caller recorded
         * it from before_rename). When the HEAD shows the same ETag and size, and dest_path has
         * that size and SHA-256 (it is read and hashed to be sure), nothing is transferred and
         * the result says kept. Anything else downloads the object as without it.
         */
        const struct download_result *recorded;
        download_before_rename_fn before_rename; /* optional */
        void *before_rename_userdata;
};

struct download_result {
        uint64_t size;
        char sha256[DOWNLOAD_SHA256_HEX_LEN + 1];
        char etag[S3_ETAG_MAX];
        /*
         * Bytes kept from an earlier attempt. For a single stream this is the offset the
         * Range request started at; for parts, the total of the parts already complete.
         */
        uint64_t resumed_from_offset;
        unsigned parts; /* ranged parts the object was split into; 1 for a single stream */
        bool kept;      /* dest_path was what params.recorded says: nothing was transferred */
};

/* Progress report: bytes on disk so far (including resumed ones) of @total. */
typedef void (*download_progress_fn)(uint64_t done, uint64_t total, void *userdata);

/*
 * Download @p->bucket/@p->key to @p->dest_path. @progress_cb may be NULL; it runs on the
 * calling thread, at most a few times per second.
 *
 * Returns 0 and fills @ret_result, or a negative errno with err_last() set:
 *   -EFBIG    the object is larger than max_object_bytes            (permanent)
 *   -ENOSPC   the filesystem lacks what is missing + min_free_bytes (permanent); the
 *             missing bytes are reserved with fallocate where the filesystem supports it
 *   -EBADMSG  the SHA-256 differs from expected_sha256              (permanent)
 *   -EBUSY    another process is downloading to the same path       (transient)
 *   -ETIMEDOUT total_timeout_ms (this call) or stall timeout       (transient)
 *   and the S3 client's errors (stages/s3_client.h).
 * A server that ignores Range (HTTP 200 to a ranged GET) gets the object in one stream from
 * byte zero instead.
 * After a transient error the partial file and its sidecar stay for the next call to
 * resume; after a permanent one both are removed, so no partial file is left behind. An
 * object that changes during the download (412 on the ETag guard) is restarted from zero
 * once within the call; a second change returns -EAGAIN.
 */
int download_object(struct s3_client *client, const struct download_params *p,
                    download_progress_fn progress_cb, void *userdata,
                    struct download_result *ret_result);

/* SHA-256 (hex) and size of a whole file. Returns 0 or a negative errno. */
int download_hash_file(const char *path, char *ret_hex, uint64_t *ret_size);

#ifdef FIM_UNIT_TEST
/* Called between opening the partial file and locking it, to stage the race tests need. */
extern void (*download_test_after_open)(const char *part_path);
#endif
