#pragma once

/*
 * A small S3 client over libcurl: HEAD, GET (ranged, conditional, streamed, several at once)
 * and, for tests and tooling, PUT and bucket creation. Requests are signed with SigV4
 * (stages/s3_sigv4.h) and always carry x-amz-content-sha256; without credentials they are
 * sent unsigned (public buckets).
 *
 * One client owns one curl multi handle, so connections are kept alive and reused across
 * calls. A client is not thread-safe: give each worker thread its own.
 *
 * Errors are negative errno values with a message in err_last() that names the S3 error code,
 * the request id when the server sent one, the bucket and key in single quotes, and what the
 * operator can do. Credentials never appear in messages.
 *
 *   NoSuchKey, NoSuchBucket, 404                        -ENOENT     permanent
 *   AccessDenied, InvalidAccessKeyId,
 *   SignatureDoesNotMatch, RequestTimeTooSkewed,
 *   expired or invalid tokens, 401, 403                 -EACCES     permanent
 *   InvalidRange, 416                                   -ERANGE     permanent
 *   PreconditionFailed, 412 (the ETag changed)          -ESTALE     permanent for this ETag
 *   NotImplemented, 501                                 -ENOSYS     permanent
 *   SlowDown, 503, InternalError, other 5xx, 429        -EAGAIN     transient
 *   RequestTimeout, 408, curl timeouts, stalls,
 *   the s3_limits deadline                              -ETIMEDOUT  transient
 *   connection reset or refused                         -ECONNRESET/-ECONNREFUSED transient
 *   truncated body                                      -EPIPE      transient
 *   anything else from the server                       -EBADMSG    permanent
 *   an unexpected curl failure                          -EIO        transient
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct s3_client;

#define S3_ETAG_MAX 192

struct s3_client_options {
        /*
         * "http://127.0.0.1:19000" or "https://host[:port][/prefix]"; NULL or "" means AWS,
         * https://s3.<region>.amazonaws.com, with virtual-host addressing.
         */
        const char *endpoint;
        const char *region;            /* NULL means "us-east-1" */
        const char *access_key_id;     /* NULL or "" with the secret: anonymous requests */
        const char *secret_access_key; /* registered with log_register_secret() */
        const char *session_token;     /* optional */
        bool force_path_style;         /* https://host/bucket/key instead of bucket.host */
        long connect_timeout_ms;       /* 0 means 10 s */
        long low_speed_limit;          /* fail a request slower than this many bytes/s */
        long low_speed_time_s;         /* for this many seconds; 0 turns curl's check off */
        const char *user_agent;        /* NULL means "flyio-image-manager/<version>" */
};

/* What HEAD and GET report about the object. */
struct s3_object_info {
        uint64_t size;           /* the whole object's size, also for ranged GETs */
        char etag[S3_ETAG_MAX];  /* as sent, with quotes; "" if absent or unusable */
        char last_modified[64];  /* HTTP date as sent; "" if absent */
        int64_t last_modified_s; /* seconds since the epoch, -1 if unknown */
};

/*
 * Time limits for one call. Zero fields mean "no limit". Both are checked by the client itself
 * (every 100 ms at most), so their -ETIMEDOUT messages say which limit ran out; curl's own
 * timeout is set a little later, as a backstop only.
 */
struct s3_limits {
        int64_t deadline_ms;       /* absolute, on the util_now_monotonic_ms() clock */
        int64_t stall_timeout_ms;  /* fail a request that receives nothing for this long */
        const char *stall_setting; /* for messages: the setting behind the stall timeout */
};

/*
 * Receives body bytes in order. Returns 0, or a negative errno to stop the transfer: the
 * call then fails with that value and the callback's err_set() message.
 */
typedef int (*s3_client_write_fn)(const void *data, size_t len, void *userdata);

/* One GET. Strings are borrowed for the duration of the call. */
struct s3_get {
        const char *bucket;
        const char *key;
        uint64_t offset;      /* first byte wanted */
        uint64_t length;      /* bytes wanted; 0 means to the end */
        const char *if_match; /* ETag the object must still have, or NULL */
        s3_client_write_fn write_cb;
        void *userdata;
};

/* Create a client. Returns 0, -EINVAL (bad endpoint, region or half-set credentials), -ENOMEM. */
int s3_client_new(const struct s3_client_options *opts, struct s3_client **ret);

struct config;

/*
 * The options the settings give: S3_ENDPOINT, AWS_REGION, the credentials (an empty session
 * token means none), S3_FORCE_PATH_STYLE; everything else zero (the defaults). The strings
 * are borrowed from @cfg.
 */
void s3_client_options_from_config(const struct config *cfg, struct s3_client_options *ret);

/* Free a client and its connections. NULL-safe; returns NULL. */
struct s3_client *s3_client_free(struct s3_client *c);

/*
 * HEAD an object. When the server refuses without a body (HEAD responses have none), one
 * ranged GET of byte 0 is sent to learn the exact S3 error code (NoSuchKey vs NoSuchBucket).
 * @limits may be NULL.
 */
int s3_client_head(struct s3_client *c, const char *bucket, const char *key,
                   const struct s3_limits *limits, struct s3_object_info *ret_info);

/*
 * GET an object or a byte range of it, streaming the body to @get->write_cb. A ranged GET
 * fails with -ENOTSUP, before any byte reaches @get->write_cb, if the server ignores the Range
 * header (HTTP 200 with the whole object); with -EPROTO if it answers another range.
 * @ret_info may be NULL.
 */
int s3_client_get(struct s3_client *c, const struct s3_get *get, const struct s3_limits *limits,
                  struct s3_object_info *ret_info);

/* Called once for every GET of s3_client_get_many() that finished, with its result. */
typedef void (*s3_client_done_fn)(size_t index, int r, void *userdata);

/*
 * Run @n GETs with at most @max_parallel in flight, each on its own connection. @done_cb (may
 * be NULL) runs on the calling thread as each one finishes, in completion order. At the
 * first failure (done_cb runs for it) nothing new is started, the ones in flight are cancelled
 * at once (no done_cb for them) and that first failure is returned with its message. The
 * stall timeout applies to each request, the deadline to the whole call.
 */
int s3_client_get_many(struct s3_client *c, const struct s3_get *gets, size_t n,
                       unsigned max_parallel, const struct s3_limits *limits,
                       s3_client_done_fn done_cb, void *userdata);

/* PUT @len bytes from memory (the payload is hashed and signed). For tests and tooling. */
int s3_client_put(struct s3_client *c, const char *bucket, const char *key, const void *data,
                  size_t len, const struct s3_limits *limits);

/* PUT a whole file, streamed, with an UNSIGNED-PAYLOAD hash. For tests and tooling. */
int s3_client_put_file(struct s3_client *c, const char *bucket, const char *key, const char *path,
                       const struct s3_limits *limits);

/* Create a bucket; one that exists and is ours already counts as success. */
int s3_client_create_bucket(struct s3_client *c, const char *bucket,
                            const struct s3_limits *limits);

/* The parts of an S3 XML error document we keep (sanitised: printable ASCII only). */
struct s3_error {
        char code[64];
        char message[256];
        char request_id[128];
};

#ifdef FIM_UNIT_TEST
/* Internals exposed to tests/unit/test_s3_client.c. */

/* Parse an S3 XML error body of @len bytes (untrusted, not NUL-terminated). 0 or -ENODATA. */
int s3_client_parse_error(const char *body, size_t len, struct s3_error *ret);

/* The errno for an S3 error code (may be "") and HTTP status, and the operator's hint. */
int s3_client_errno_for(long status, const char *code, const char **ret_hint);

/* The URL, Host header and signed wire path for a bucket and key (key NULL: the bucket). */
int s3_client_build_url(const struct s3_client *c, const char *bucket, const char *key,
                        char **ret_url, char **ret_host, char **ret_path);
#endif
