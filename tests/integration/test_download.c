/*
 * Integration tests for stages/download and stages/s3_client against a real S3Proxy that
 * checks SigV4 (tests/infra/services.sh start s3; source /tmp/fim-services/services.env).
 * A missing S3_ENDPOINT fails the suite: it is never skipped.
 *
 * Faults come from tests/integration/faultproxy.py, started here on a free loopback port in
 * front of S3Proxy and driven through its standard input.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/util.h"
#include "helper_download.h"
#include "helper_faultproxy.h"
#include "stages/download.h"
#include "stages/s3_client.h"
#include "stages/s3_sigv4.h"

#define MIB (1024u * 1024u)
#define TEST_BUCKET "fim-download-test"

struct object {
        const char *name;
        size_t size;
        unsigned seed;
        char key[128];
        unsigned char *data;
        char sha256[SIGV4_HEX_LEN + 1];
};

static struct object objects[] = {
        {.name = "empty", .size = 0, .seed = 1},
        {.name = "one-byte", .size = 1, .seed = 2},
        {.name = "odd-size", .size = 2 * MIB + MIB / 2 + 17, .seed = 3},
        {.name = "large", .size = 5 * MIB + 123, .seed = 4},
        {.name = "resume", .size = 3 * MIB + 5, .seed = 5},
        {.name = "changing", .size = 4 * MIB + 3, .seed = 6},
        {.name = "replaced", .size = MIB + 7, .seed = 7},
};

enum { OBJ_EMPTY, OBJ_ONE, OBJ_ODD, OBJ_LARGE, OBJ_RESUME, OBJ_CHANGING, OBJ_REPLACED };

static struct {
        struct s3_client *client;
        char dir[256];
        char prefix[64];
        struct faultproxy proxy;
        struct s3_client *proxied;
} t;

static void fill(unsigned char *buf, size_t n, unsigned seed)
{
        uint32_t x = seed * 2654435761u + 1;

        for (size_t i = 0; i < n; i++) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                buf[i] = (unsigned char)x;
        }
}

static int client_from_env(const char *endpoint, const char *ak, const char *sk,
                           struct s3_client **ret)
{
        const char *force = getenv("S3_FORCE_PATH_STYLE");
        bool path_style = false;

        if (force)
                (void)util_parse_bool(force, &path_style);
        const struct s3_client_options o = {
                .endpoint = endpoint,
                .region = getenv("AWS_REGION"),
                .access_key_id = ak,
                .secret_access_key = sk,
                .force_path_style = path_style,
                .connect_timeout_ms = 5000,
        };

        return s3_client_new(&o, ret);
}

/* A client with the environment's credentials that puts the bucket in the Host header. */
static void virtual_host_client(const char *endpoint, struct s3_client **ret)
{
        const struct s3_client_options o = {
                .endpoint = endpoint,
                .region = getenv("AWS_REGION"),
                .access_key_id = getenv("AWS_ACCESS_KEY_ID"),
                .secret_access_key = getenv("AWS_SECRET_ACCESS_KEY"),
        };

        assert_int_equal(s3_client_new(&o, ret), 0);
}

/* Make @o's bytes for @seed (what upload() sends), without uploading them. */
static void generate(struct object *o, unsigned seed)
{
        o->seed = seed;
        free(o->data);
        o->data = malloc(o->size ? o->size : 1);
        assert_non_null(o->data);
        fill(o->data, o->size, seed);
        assert_int_equal(sigv4_sha256_hex(o->data, o->size, o->sha256), 0);
}

static void upload(struct object *o, unsigned seed)
{
        int r;

        generate(o, seed);
        r = s3_client_put(t.client, TEST_BUCKET, o->key, o->data, o->size, NULL);
        if (r < 0)
                fail_msg("upload of '%s' failed: %s", o->key, err_text(r));
}

static void dest_path(const char *name, char *buf, size_t size)
{
        (void)snprintf(buf, size, "%s/%s.tar", t.dir, name);
}

static bool exists(const char *path, const char *suffix)
{
        char p[600];

        (void)snprintf(p, sizeof(p), "%s%s", path, suffix);
        return access(p, F_OK) == 0;
}

static void assert_no_files(const char *dest)
{
        if (exists(dest, "") || exists(dest, ".part") || exists(dest, ".part.meta"))
                fail_msg("files left behind for '%s'", dest);
}

static void assert_file_is(const char *path, const struct object *o)
{
        FILE *f = fopen(path, "rbe");
        unsigned char *buf = malloc(o->size + 1);
        size_t n;

        assert_non_null(f);
        assert_non_null(buf);
        n = fread(buf, 1, o->size + 1, f);
        fclose(f);
        assert_int_equal(n, o->size);
        assert_memory_equal(buf, o->data, o->size);
        free(buf);
}

static struct download_params params(const struct object *o, const char *dest)
{
        return (struct download_params){
                .bucket = TEST_BUCKET,
                .key = o->key,
                .dest_path = dest,
                .parallel_threshold_bytes = MIB,
                .part_size = MIB,
                .max_connections = 4,
                .total_timeout_ms = 60000,
                .stall_timeout_ms = 10000,
        };
}

/* ---- the fault proxy ------------------------------------------------------------------- */

static void proxy_command(const char *cmd)
{
        faultproxy_command(&t.proxy, cmd);
}

/* Whether the proxy logged a GET of @key with "range=bytes=@offset-" and an If-Match. */
static bool proxy_saw_range(const char *key, uint64_t offset)
{
        char needle[64];

        (void)snprintf(needle, sizeof(needle), " range=bytes=%llu-", (unsigned long long)offset);
        return faultproxy_log_count(&t.proxy, "GET ", key, needle, "if-match=\"", NULL) > 0;
}

static int proxy_start(void)
{
        char log_path[512];

        (void)snprintf(log_path, sizeof(log_path), "%s/faultproxy.log", t.dir);
        if (faultproxy_start(&t.proxy, getenv("S3_ENDPOINT"), log_path) < 0)
                return -1;
        return client_from_env(t.proxy.url, getenv("AWS_ACCESS_KEY_ID"),
                               getenv("AWS_SECRET_ACCESS_KEY"), &t.proxied);
}

static void proxy_stop(void)
{
        faultproxy_stop(&t.proxy);
        t.proxied = s3_client_free(t.proxied);
}

/* ---- setup ---------------------------------------------------------------------------- */

static int group_setup(void **state)
{
        const char *endpoint = getenv("S3_ENDPOINT");
        int r;

        (void)state;
        if (!endpoint || !endpoint[0]) {
                fprintf(stderr, "S3_ENDPOINT is not set: run 'tests/infra/services.sh start s3' "
                                "and source /tmp/fim-services/services.env\n");
                return -1;
        }
        (void)snprintf(t.dir, sizeof(t.dir), "/tmp/fim-download-test-XXXXXX");
        if (!mkdtemp(t.dir))
                return -1;
        (void)snprintf(t.prefix, sizeof(t.prefix), "run-%ld-%lld", (long)getpid(),
                       (long long)util_now_realtime_ms());
        r = client_from_env(endpoint, getenv("AWS_ACCESS_KEY_ID"), getenv("AWS_SECRET_ACCESS_KEY"),
                            &t.client);
        if (r >= 0)
                r = s3_client_create_bucket(t.client, TEST_BUCKET, NULL);
        if (r < 0) {
                fprintf(stderr, "cannot reach S3 at '%s': %s\n", endpoint, err_text(r));
                return -1;
        }
        for (size_t i = 0; i < ARRAY_SIZE(objects); i++) {
                (void)snprintf(objects[i].key, sizeof(objects[i].key), "%s/images/%s.tar", t.prefix,
                               objects[i].name);
                upload(&objects[i], objects[i].seed);
        }
        if (proxy_start() < 0) {
                fprintf(stderr, "cannot start tests/integration/faultproxy.py\n");
                return -1;
        }
        return 0;
}

static int group_teardown(void **state)
{
        char cmd[512];

        (void)state;
        /* test_download_reserves_space's filesystem, should that test have failed. */
        (void)snprintf(cmd, sizeof(cmd), "umount '%s/small-fs' 2>/dev/null", t.dir);
        (void)system(cmd);
        proxy_stop();
        t.client = s3_client_free(t.client);
        for (size_t i = 0; i < ARRAY_SIZE(objects); i++)
                free(objects[i].data);
        (void)snprintf(cmd, sizeof(cmd), "rm -rf '%s'", t.dir);
        return system(cmd) == 0 ? 0 : -1;
}

/* ---- happy paths ------------------------------------------------------------------------- */

static void download_and_check(const struct object *o, unsigned max_connections,
                               unsigned want_parts)
{
        char dest[512];
        struct download_result res;
        struct download_params p;
        uint64_t received = 0;
        int r;

        dest_path(o->name, dest, sizeof(dest));
        p = params(o, dest);
        p.received_bytes = &received;
        p.max_connections = max_connections;
        p.expected_sha256 = o->sha256;
        r = download_object(t.client, &p, NULL, NULL, &res);
        if (r < 0)
                fail_msg("download of '%s' failed: %s", o->key, err_text(r));
        assert_int_equal(res.size, o->size);
        assert_string_equal(res.sha256, o->sha256);
        assert_int_equal(res.parts, want_parts);
        assert_int_equal(res.resumed_from_offset, 0);
        assert_int_equal(received, o->size);
        assert_true(res.etag[0] == '"');
        assert_file_is(dest, o);
        assert_false(exists(dest, ".part"));
        assert_false(exists(dest, ".part.meta"));

        char hex[DOWNLOAD_SHA256_HEX_LEN + 1];
        uint64_t size;

        assert_int_equal(download_hash_file(dest, hex, &size), 0);
        assert_string_equal(hex, o->sha256);
        assert_int_equal(size, o->size);
        assert_int_equal(unlink(dest), 0);
}

static void test_download_sizes_single_and_parallel(void **state)
{
        (void)state;
        download_and_check(&objects[OBJ_EMPTY], 4, 1);
        download_and_check(&objects[OBJ_ONE], 4, 1);
        download_and_check(&objects[OBJ_ODD], 1, 1); /* single stream */
        download_and_check(&objects[OBJ_ODD], 4, 3); /* 1 MiB parts, the last one short */
        download_and_check(&objects[OBJ_LARGE], 4, 6);
        download_and_check(&objects[OBJ_LARGE], 1, 1);
}

struct progress {
        uint64_t last;
        uint64_t total;
        unsigned calls;
};

static void on_progress(uint64_t done, uint64_t total, void *userdata)
{
        struct progress *pr = userdata;

        assert_true(done <= total);
        pr->last = done;
        pr->total = total;
        pr->calls++;
}

static void test_download_progress_reports(void **state)
{
        const struct object *o = &objects[OBJ_LARGE];
        struct progress pr = {0};
        struct download_result res;
        char dest[512];

        (void)state;
        dest_path("progress", dest, sizeof(dest));
        const struct download_params p = params(o, dest);

        assert_int_equal(download_object(t.client, &p, on_progress, &pr, &res), 0);
        assert_true(pr.calls >= 1);
        assert_int_equal(pr.last, o->size);
        assert_int_equal(pr.total, o->size);
        assert_int_equal(unlink(dest), 0);
}

/* ---- permanent failures ------------------------------------------------------------------ */

static void expect_failure(struct s3_client *c, const char *bucket, const char *key, int want_r,
                           const char *want_text)
{
        struct download_result res;
        char dest[512];
        const struct download_params p = {
                .bucket = bucket,
                .key = key,
                .dest_path = dest,
                .stall_timeout_ms = 10000,
        };
        int r;

        dest_path("failure", dest, sizeof(dest));
        r = download_object(c, &p, NULL, NULL, &res);
        if (r != want_r || !strstr(err_last(), want_text))
                fail_msg("want %s with '%s', got %s: %s", err_name(want_r), want_text, err_name(r),
                         err_text(r));
        assert_false(err_is_transient(r));
        /* Messages quote the names and never carry credentials. */
        assert_non_null(strstr(err_last(), "'"));
        assert_null(strstr(err_last(), "Authorization"));
        assert_null(strstr(err_last(), "Signature="));
        assert_null(strstr(err_last(), getenv("AWS_SECRET_ACCESS_KEY")));
        assert_null(strstr(err_last(), "wrong-secret-key"));
        assert_no_files(dest);
        err_clear();
}

static void test_download_wrong_secret(void **state)
{
        struct s3_client *c = NULL;

        (void)state;
        assert_int_equal(client_from_env(getenv("S3_ENDPOINT"), getenv("AWS_ACCESS_KEY_ID"),
                                         "wrong-secret-key", &c),
                         0);
        expect_failure(c, TEST_BUCKET, objects[OBJ_ONE].key, -EACCES, "SignatureDoesNotMatch");
        expect_failure(c, TEST_BUCKET, objects[OBJ_ONE].key, -EACCES, objects[OBJ_ONE].key);
        s3_client_free(c);
}

static void test_download_unknown_access_key(void **state)
{
        struct s3_client *c = NULL;

        (void)state;
        assert_int_equal(client_from_env(getenv("S3_ENDPOINT"), "AKIAUNKNOWN000000000",
                                         getenv("AWS_SECRET_ACCESS_KEY"), &c),
                         0);
        expect_failure(c, TEST_BUCKET, objects[OBJ_ONE].key, -EACCES, "InvalidAccessKeyId");
        s3_client_free(c);
}

/* Without credentials requests go unsigned; this S3Proxy refuses them. */
static void test_download_anonymous_is_refused(void **state)
{
        struct s3_client *c = NULL;

        (void)state;
        assert_int_equal(client_from_env(getenv("S3_ENDPOINT"), NULL, NULL, &c), 0);
        expect_failure(c, TEST_BUCKET, objects[OBJ_ONE].key, -EACCES, "AccessDenied");
        s3_client_free(c);
}

static void test_download_missing_key_and_bucket(void **state)
{
        char key[256];

        (void)state;
        (void)snprintf(key, sizeof(key), "%s/no/such/key.tar", t.prefix);
        expect_failure(t.client, TEST_BUCKET, key, -ENOENT, "NoSuchKey");
        expect_failure(t.client, TEST_BUCKET, key, -ENOENT, "'" TEST_BUCKET "'");
        expect_failure(t.client, "fim-no-such-bucket-4711", key, -ENOENT, "NoSuchBucket");
}

static void test_download_checksum_mismatch(void **state)
{
        const struct object *o = &objects[OBJ_ODD];
        struct download_result res;
        char dest[512];
        struct download_params p;

        (void)state;
        dest_path("mismatch", dest, sizeof(dest));
        p = params(o, dest);
        p.expected_sha256 = SIGV4_EMPTY_SHA256;
        assert_int_equal(download_object(t.client, &p, NULL, NULL, &res), -EBADMSG);
        assert_non_null(strstr(err_last(), o->sha256));
        assert_no_files(dest);
        p.max_connections = 1;
        assert_int_equal(download_object(t.client, &p, NULL, NULL, &res), -EBADMSG);
        assert_no_files(dest);
        err_clear();
}

static void test_download_size_and_space_limits(void **state)
{
        const struct object *o = &objects[OBJ_ODD];
        struct download_result res;
        char dest[512], want[600];
        struct download_params p;

        (void)state;
        dest_path("limits", dest, sizeof(dest));
        p = params(o, dest);
        p.max_object_bytes = MIB;
        assert_int_equal(download_object(t.client, &p, NULL, NULL, &res), -EFBIG);
        (void)snprintf(want, sizeof(want), "%zu bytes", o->size);
        assert_non_null(strstr(err_last(), want));
        assert_non_null(strstr(err_last(), "1048576"));
        assert_no_files(dest);

        p = params(o, dest);
        p.min_free_bytes = UINT64_MAX / 2;
        assert_int_equal(download_object(t.client, &p, NULL, NULL, &res), -ENOSPC);
        /* The numbers: needed (object + margin), available, and where. */
        (void)snprintf(want, sizeof(want), "%llu bytes must be free in '%s' (LOCAL_DIR; ",
                       (unsigned long long)(o->size + UINT64_MAX / 2), t.dir);
        if (!strstr(err_last(), want))
                fail_msg("want '%s' in: %s", want, err_last());
        {
                const char *avail = strstr(err_last(), "but only ");
                unsigned long long n = 0;

                assert_non_null(avail);
                assert_int_equal(sscanf(avail, "but only %llu are available", &n), 1);
                assert_true(n > 0);
        }
        assert_no_files(dest);
        err_clear();
}

static int discard(const void *data, size_t len, void *userdata)
{
        (void)data;
        (void)len;
        (void)userdata;
        return 0;
}

/* The client's If-Match guard: a stale ETag is -ESTALE with PreconditionFailed. */
static void test_download_client_if_match_and_range(void **state)
{
        const struct object *o = &objects[OBJ_ODD];
        struct s3_object_info info;
        const struct s3_get get = {
                .bucket = TEST_BUCKET,
                .key = o->key,
                .offset = 10,
                .length = 5,
                .if_match = "\"0123456789abcdef0123456789abcdef\"",
                .write_cb = discard,
        };
        int r;

        (void)state;
        r = s3_client_get(t.client, &get, NULL, &info);
        assert_int_equal(r, -ESTALE);
        assert_non_null(strstr(err_last(), "PreconditionFailed"));

        assert_int_equal(s3_client_head(t.client, TEST_BUCKET, o->key, NULL, &info), 0);
        assert_int_equal(info.size, o->size);
        assert_true(info.last_modified_s > 0);

        struct s3_get beyond = get;

        beyond.if_match = NULL;
        beyond.offset = o->size + 100;
        assert_int_equal(s3_client_get(t.client, &beyond, NULL, NULL), -ERANGE);
        assert_non_null(strstr(err_last(), "InvalidRange"));
        err_clear();
}

/* ---- faults ---------------------------------------------------------------------------- */

static void test_download_resumes_after_cut(void **state)
{
        const struct object *o = &objects[OBJ_RESUME];
        const uint64_t cut = MIB;
        struct download_result res;
        struct download_params p;
        char dest[512], cmd[64];
        uint64_t received = 0;
        int r;

        (void)state;
        dest_path("resume", dest, sizeof(dest));
        p = params(o, dest);
        p.parallel_threshold_bytes = 4 * MIB; /* one stream */
        p.expected_sha256 = o->sha256;
        p.received_bytes = &received;
        (void)snprintf(cmd, sizeof(cmd), "cut %llu GET", (unsigned long long)cut);
        proxy_command(cmd);
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        if (r >= 0 || !err_is_transient(r))
                fail_msg("want a transient error, got %s: %s", err_name(r), err_text(r));
        assert_true(exists(dest, ".part"));
        assert_true(exists(dest, ".part.meta"));
        assert_false(exists(dest, ""));
        /* The failed attempt's bytes count: everything before the cut, less the head. */
        assert_true(received > cut - 2048 && received < cut);

        received = 0;
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        if (r < 0)
                fail_msg("resume failed: %s", err_text(r));
        assert_int_equal(received, o->size - res.resumed_from_offset);
        assert_string_equal(res.sha256, o->sha256);
        /* Resumed where the cut was, less the response head (status line and headers). */
        assert_true(res.resumed_from_offset > cut - 2048);
        assert_true(res.resumed_from_offset < cut);
        assert_true(proxy_saw_range(o->key, res.resumed_from_offset));
        assert_file_is(dest, o);
        assert_false(exists(dest, ".part"));
        assert_false(exists(dest, ".part.meta"));
        assert_int_equal(unlink(dest), 0);
}

static void test_download_restarts_when_object_changed(void **state)
{
        struct object *o = &objects[OBJ_RESUME];
        struct download_result res;
        struct download_params p;
        char dest[512];
        int r;

        (void)state;
        dest_path("changed", dest, sizeof(dest));
        p = params(o, dest);
        p.parallel_threshold_bytes = 4 * MIB;
        proxy_command("cut 1500000 GET");
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_true(r < 0 && err_is_transient(r));
        assert_true(exists(dest, ".part"));

        upload(o, o->seed + 100); /* same key, other bytes, new ETag */
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        if (r < 0)
                fail_msg("download after change failed: %s", err_text(r));
        assert_int_equal(res.resumed_from_offset, 0);
        assert_string_equal(res.sha256, o->sha256);
        assert_file_is(dest, o);
        assert_int_equal(unlink(dest), 0);
}

/* Parts from one version, then a shorter version: nothing of the old file survives. */
static void test_download_parallel_restarts_when_object_shrank(void **state)
{
        struct object *o = &objects[OBJ_CHANGING];
        struct download_result res;
        struct download_params p;
        char dest[512];
        int r;

        (void)state;
        dest_path("changing", dest, sizeof(dest));
        p = params(o, dest);
        p.max_connections = 2;
        proxy_command("cut 200000 GET 2");
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_true(r < 0 && err_is_transient(r));
        assert_true(exists(dest, ".part.meta"));

        o->size = 2 * MIB + 9;
        upload(o, o->seed + 100);
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        if (r < 0)
                fail_msg("download after change failed: %s", err_text(r));
        assert_int_equal(res.resumed_from_offset, 0);
        assert_int_equal(res.parts, 3);
        assert_string_equal(res.sha256, o->sha256);
        assert_file_is(dest, o); /* exactly the new size: no tail of the old version */
        assert_int_equal(unlink(dest), 0);
}

static void test_download_parallel_resume_keeps_done_parts(void **state)
{
        const struct object *o = &objects[OBJ_LARGE];
        struct download_result res;
        struct download_params p;
        char dest[512];
        int r;

        (void)state;
        dest_path("parallel-resume", dest, sizeof(dest));
        p = params(o, dest);
        p.max_connections = 2;
        p.expected_sha256 = o->sha256;
        /* Let three part GETs through, cut the fourth in its body. */
        proxy_command("cut 300000 GET 3");
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        if (r >= 0 || !err_is_transient(r))
                fail_msg("want a transient error, got %s: %s", err_name(r), err_text(r));
        assert_true(exists(dest, ".part.meta"));

        r = download_object(t.proxied, &p, NULL, NULL, &res);
        if (r < 0)
                fail_msg("resume failed: %s", err_text(r));
        assert_int_equal(res.parts, 6);
        /*
         * What was kept is whole parts, never the one cut. With two connections the third part
         * may still be in flight when the fourth is cut, and parts finish in any order, so the
         * 123-byte last one may be among them.
         */
        assert_true(res.resumed_from_offset >= 2 * MIB);
        assert_true(res.resumed_from_offset <= o->size - MIB);
        assert_true(res.resumed_from_offset % MIB == 0 || res.resumed_from_offset % MIB == 123);
        assert_string_equal(res.sha256, o->sha256);
        assert_file_is(dest, o);
        assert_int_equal(unlink(dest), 0);
}

static void test_download_slowdown_is_transient(void **state)
{
        const struct object *o = &objects[OBJ_ONE];
        struct download_result res;
        struct download_params p;
        char dest[512];
        int r;

        (void)state;
        dest_path("slowdown", dest, sizeof(dest));
        p = params(o, dest);

        /* A GET answered 503 carries the SlowDown document. */
        const struct s3_get get = {.bucket = TEST_BUCKET, .key = o->key, .write_cb = discard};

        proxy_command("slowdown 1");
        r = s3_client_get(t.proxied, &get, NULL, NULL);
        assert_int_equal(r, -EAGAIN);
        assert_non_null(strstr(err_last(), "SlowDown"));
        assert_non_null(strstr(err_last(), "FAULTPROXY503"));

        /* The whole download: transient, and the next attempt succeeds. */
        proxy_command("slowdown 1");
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_int_equal(r, -EAGAIN);
        assert_true(err_is_transient(r));
        assert_false(exists(dest, ""));
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_int_equal(r, 0);
        assert_string_equal(res.sha256, o->sha256);
        assert_int_equal(unlink(dest), 0);
        err_clear();
}

static void test_download_stall_times_out(void **state)
{
        const struct object *o = &objects[OBJ_ODD];
        struct download_result res;
        struct download_params p;
        char dest[512];
        int64_t start;
        int r;

        (void)state;
        dest_path("stall", dest, sizeof(dest));
        p = params(o, dest);
        p.max_connections = 1;
        p.stall_timeout_ms = 1000;
        p.total_timeout_ms = 30000;
        proxy_command("stall 6 200000 GET");
        start = util_now_monotonic_ms();
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_int_equal(r, -ETIMEDOUT);
        assert_true(err_is_transient(r));
        assert_non_null(strstr(err_last(), "stalled"));
        assert_non_null(strstr(err_last(), "DOWNLOAD_STALL_TIMEOUT is 1000 ms"));
        assert_true(util_now_monotonic_ms() - start < 5000);
        assert_true(exists(dest, ".part"));

        r = download_object(t.proxied, &p, NULL, NULL, &res);
        if (r < 0)
                fail_msg("download after stall failed: %s", err_text(r));
        assert_true(res.resumed_from_offset > 0);
        assert_string_equal(res.sha256, o->sha256);
        assert_int_equal(unlink(dest), 0);
}

static void test_download_total_timeout(void **state)
{
        const struct object *o = &objects[OBJ_ODD];
        struct download_result res;
        struct download_params p;
        char dest[512];
        int64_t start;
        int r;

        (void)state;
        dest_path("deadline", dest, sizeof(dest));
        p = params(o, dest);
        p.max_connections = 1;
        p.stall_timeout_ms = 0;
        p.total_timeout_ms = 1500;
        proxy_command("stall 4 100000 GET");
        start = util_now_monotonic_ms();
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_int_equal(r, -ETIMEDOUT);
        assert_true(err_is_transient(r));
        /* Our deadline fires first (curl's backstop would at 3.5 s), and says which limit. */
        assert_true(util_now_monotonic_ms() - start < 3400);
        assert_non_null(strstr(err_last(), "DOWNLOAD_TIMEOUT (1.5 s)"));
        assert_non_null(strstr(err_last(), " of 2621457 bytes after 1."));
        assert_null(strstr(err_last(), "Timeout was reached"));
        assert_true(exists(dest, ".part"));
        (void)download_object(
                t.proxied,
                &(struct download_params){.bucket = TEST_BUCKET, .key = o->key, .dest_path = dest},
                NULL, NULL, &res);
        assert_int_equal(unlink(dest), 0);
        err_clear();
}

/* ---- cancellation, fallbacks, races ---------------------------------------------------- */

struct done_log {
        unsigned calls;
        unsigned failures;
};

static void on_get_done(size_t index, int r, void *userdata)
{
        struct done_log *l = userdata;

        (void)index;
        l->calls++;
        l->failures += r < 0;
}

static int64_t cpu_ms(void)
{
        struct rusage ru;

        assert_int_equal(getrusage(RUSAGE_SELF, &ru), 0);
        return (int64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000 +
               (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1000;
}

/* One part fails while the others crawl: the call returns at once, without their done_cb. */
static void test_download_part_failure_cancels_the_rest(void **state)
{
        const struct object *o = &objects[OBJ_LARGE];
        const struct s3_limits lim = {.stall_timeout_ms = 20000};
        struct s3_get gets[4];
        struct done_log log = {0};
        int64_t start, cpu;
        int r;

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(gets); i++)
                gets[i] = (struct s3_get){.bucket = TEST_BUCKET,
                                          .key = o->key,
                                          .offset = i * MIB,
                                          .length = MIB,
                                          .write_cb = discard};
        proxy_command("error 500 GET 0.3");
        for (int i = 0; i < 3; i++)
                proxy_command("stall 8 0 GET");
        start = util_now_monotonic_ms();
        cpu = cpu_ms();
        r = s3_client_get_many(t.proxied, gets, ARRAY_SIZE(gets), 4, &lim, on_get_done, &log);
        assert_int_equal(r, -EAGAIN);
        assert_non_null(strstr(err_last(), "InternalError"));
        assert_non_null(strstr(err_last(), "FAULTPROXY500"));
        assert_true(util_now_monotonic_ms() - start < 4000);
        assert_true(cpu_ms() - cpu < 500); /* no busy loop while the others hang */
        assert_int_equal(log.calls, 1);
        assert_int_equal(log.failures, 1);
        proxy_command("clear");
        err_clear();
}

/* 501 NotImplemented will not change on a retry. */
static void test_download_not_implemented_is_permanent(void **state)
{
        const struct object *o = &objects[OBJ_ONE];
        struct download_result res;
        struct download_params p;
        char dest[512];
        int r;

        (void)state;
        dest_path("not-implemented", dest, sizeof(dest));
        p = params(o, dest);
        proxy_command("error 501 GET");
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_int_equal(r, -ENOSYS);
        assert_false(err_is_transient(r));
        assert_non_null(strstr(err_last(), "NotImplemented"));
        assert_no_files(dest);
        err_clear();
}

/* A server that ignores Range: the download starts over in one stream from byte zero. */
static void test_download_range_ignored_falls_back_to_one_stream(void **state)
{
        const struct object *o = &objects[OBJ_RESUME];
        struct download_result res;
        struct download_params p;
        char dest[512];
        int r;

        (void)state;
        dest_path("norange", dest, sizeof(dest));
        p = params(o, dest);
        p.parallel_threshold_bytes = 4 * MIB; /* one stream */
        p.expected_sha256 = o->sha256;
        proxy_command("cut 1000000 GET");
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_true(r < 0 && err_is_transient(r));
        assert_true(exists(dest, ".part.meta"));
        proxy_command("norange 1");
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        if (r < 0)
                fail_msg("download after an ignored Range failed: %s", err_text(r));
        assert_int_equal(res.resumed_from_offset, 0);
        assert_string_equal(res.sha256, o->sha256);
        assert_file_is(dest, o);
        assert_int_equal(faultproxy_log_count(&t.proxy, "GET ", o->key, "fault=norange", NULL), 1);
        assert_int_equal(unlink(dest), 0);

        /* Parts: the first ranged answer is a 200, so one stream instead. */
        p = params(o, dest);
        p.expected_sha256 = o->sha256;
        proxy_command("norange 1");
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        if (r < 0)
                fail_msg("parallel download after an ignored Range failed: %s", err_text(r));
        assert_int_equal(res.parts, 1);
        assert_string_equal(res.sha256, o->sha256);
        assert_file_is(dest, o);
        assert_int_equal(faultproxy_log_count(&t.proxy, "GET ", o->key, "fault=norange", NULL), 2);
        assert_int_equal(unlink(dest), 0);
}

static const char *race_dest;
static int race_calls;

/* The holder finishes between our open() and our flock(): the name now leads elsewhere. */
static void race_rename_to_dest(const char *part_path)
{
        if (race_calls++ == 0)
                assert_int_equal(rename(part_path, race_dest), 0);
}

static void race_unlink(const char *part_path)
{
        if (race_calls++ == 0)
                assert_int_equal(unlink(part_path), 0);
}

static void test_download_part_file_replaced_before_lock(void **state)
{
        const struct object *o = &objects[OBJ_ODD];
        void (*hooks[])(const char *) = {race_rename_to_dest, race_unlink};
        struct download_result res;
        char dest[512], part[600];
        int r;

        (void)state;
        dest_path("lockrace", dest, sizeof(dest));
        (void)snprintf(part, sizeof(part), "%s.part", dest);
        for (size_t i = 0; i < ARRAY_SIZE(hooks); i++) {
                struct download_params p = params(o, dest);
                FILE *f = fopen(part, "we");

                p.max_connections = 1;
                assert_non_null(f);
                fputs("a finished download, or a failed one", f);
                fclose(f);
                race_dest = dest;
                race_calls = 0;
                download_test_after_open = hooks[i];
                r = download_object(t.client, &p, NULL, NULL, &res);
                download_test_after_open = NULL;
                if (r < 0)
                        fail_msg("download with a replaced partial file failed: %s", err_text(r));
                assert_int_equal(race_calls, 2); /* opened twice: the stale inode was let go */
                assert_string_equal(res.sha256, o->sha256);
                assert_file_is(dest, o);
                assert_false(exists(dest, ".part"));
                assert_int_equal(unlink(dest), 0);
        }
}

/* Run a shell command, failing the test when it fails. */
static void shell(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void shell(const char *fmt, ...)
{
        char cmd[2048];
        va_list ap;

        va_start(ap, fmt);
        (void)vsnprintf(cmd, sizeof(cmd), fmt, ap);
        va_end(ap);
        if (system(cmd) != 0)
                fail_msg("command failed: %s", cmd);
}

/*
 * Two downloads into one small filesystem: the first one's partial file reserves the whole
 * object, so the second is refused before it fetches anything, with the numbers. Without the
 * reservation it would pass the free-space check and fail half way.
 */
static void test_download_reserves_space(void **state)
{
        const struct object *first = &objects[OBJ_RESUME], *second = &objects[OBJ_ODD];
        struct download_result res;
        struct download_params p;
        char dir[300], dest[512], want[512];
        int gets, r;

        (void)state;
        (void)snprintf(dir, sizeof(dir), "%s/small-fs", t.dir);
        assert_int_equal(mkdir(dir, 0755), 0);
        /* 4 MiB: room for the first object (3 MiB), not for both. Needs root, as CI has. */
        shell("mount -t tmpfs -o size=4m fim-download-test '%s'", dir);

        (void)snprintf(dest, sizeof(dest), "%s/first.tar", dir);
        p = params(first, dest);
        p.parallel_threshold_bytes = 0;
        proxy_command("cut 500000 GET");
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_true(r < 0 && err_is_transient(r));
        assert_true(exists(dest, ".part"));

        (void)snprintf(dest, sizeof(dest), "%s/second.tar", dir);
        p = params(second, dest);
        gets = faultproxy_log_count(&t.proxy, "GET ", second->key, NULL);
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_int_equal(r, -ENOSPC);
        (void)snprintf(want, sizeof(want), "%zu bytes must be free in '%s' (LOCAL_DIR; ",
                       second->size, dir);
        if (!strstr(err_last(), want))
                fail_msg("want '%s' in: %s", want, err_last());
        assert_non_null(strstr(err_last(), "are available"));
        assert_int_equal(faultproxy_log_count(&t.proxy, "GET ", second->key, NULL), gets);
        assert_no_files(dest);
        shell("umount '%s'", dir);
        assert_int_equal(rmdir(dir), 0);
        err_clear();
}

/* ---- addressing and credentials against the real server ------------------------------- */

/*
 * Upload @o's bytes to @url_path (already percent-encoded, no single quotes) with curl's own
 * SigV4 signer, independent of ours; @extra_args go on curl's command line as they are.
 */
static void put_with_curl(const struct object *o, const char *url_path, const char *extra_args)
{
        char src[512];
        FILE *f;

        (void)snprintf(src, sizeof(src), "%s/curl-upload.src", t.dir);
        f = fopen(src, "we");
        assert_non_null(f);
        assert_int_equal(fwrite(o->data, 1, o->size, f), o->size);
        fclose(f);
        shell("curl -sSf --aws-sigv4 'aws:amz:%s:s3' -u \"$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY\""
              " -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD'%s -T '%s' '%s/%s/%s' -o /dev/null",
              getenv("AWS_REGION") ? getenv("AWS_REGION") : "us-east-1", extra_args, src,
              getenv("S3_ENDPOINT"), TEST_BUCKET, url_path);
        assert_int_equal(unlink(src), 0);
}

/* Anonymous requests read a public-read object (S3Proxy checks the object's ACL). */
static void test_download_anonymous_public_object(void **state)
{
        const struct object *o = &objects[OBJ_ODD];
        struct s3_client *anon = NULL;
        struct download_result res;
        struct download_params p;
        char key[256], dest[512];
        int r;

        (void)state;
        (void)snprintf(key, sizeof(key), "%s/public/image.tar", t.prefix);
        /* Our client sets no ACLs; curl signs this one upload. */
        put_with_curl(o, key, " -H 'x-amz-acl: public-read'");

        assert_int_equal(client_from_env(getenv("S3_ENDPOINT"), NULL, NULL, &anon), 0);
        dest_path("anonymous", dest, sizeof(dest));
        p = params(o, dest);
        p.key = key;
        p.expected_sha256 = o->sha256;
        r = download_object(anon, &p, NULL, NULL, &res);
        if (r < 0)
                fail_msg("anonymous download of a public object failed: %s", err_text(r));
        assert_int_equal(res.parts, 3);
        assert_file_is(dest, o);
        assert_int_equal(unlink(dest), 0);
        s3_client_free(anon);
}

/*
 * Percent-encode @key for a URL path: all but unreserved characters and '/'. Written here, not
 * taken from sigv4_uri_encode(), because the encoder is what the test checks.
 */
static void url_encode_path(const char *key, char *buf, size_t size)
{
        static const char hex[] = "0123456789ABCDEF";
        size_t n = 0;

        for (const unsigned char *k = (const unsigned char *)key; *k; k++) {
                assert_true(n + 4 < size);
                if ((*k >= 'A' && *k <= 'Z') || (*k >= 'a' && *k <= 'z') ||
                    (*k >= '0' && *k <= '9') || strchr("-._~/", *k)) {
                        buf[n++] = (char)*k;
                } else {
                        buf[n++] = '%';
                        buf[n++] = hex[*k >> 4];
                        buf[n++] = hex[*k & 15];
                }
        }
        buf[n] = '\0';
}

/*
 * Keys with characters that URLs and SigV4 encode (space, '+', '=', '&', '%', '?', '#',
 * shell quotes, UTF-8, a double slash): uploaded by curl, then downloaded by ours in one
 * stream and in ranged parts, path-style and virtual-host. S3Proxy checks every signature,
 * so a key encoded differently in the URL and in the canonical request fails here. Job
 * requests only carry keys of letters, digits and '-_./'; the client and the `download`
 * command take any key.
 */
static void test_download_keys_that_need_encoding(void **state)
{
        static const char *const names[] = {
                "a b.tar",           "a+b=c&d.tar", "caf\xc3\xa9 \xc3\xbc/x.tar",
                "~!$'()*,;:@[].tar", "100%.tar",    "/double-slash.tar",
                "q?x#y.tar",
        };
        const struct object *o = &objects[OBJ_ODD];
        const char *vhost = getenv("S3_VHOST_ENDPOINT");
        struct s3_client *clients[2] = {t.client, NULL};
        struct download_result res;
        struct download_params p;
        char key[256], url_path[800], dest[512];
        int r;

        (void)state;
        if (!vhost || !vhost[0])
                fail_msg("S3_VHOST_ENDPOINT is not set: start the services with "
                         "tests/infra/services.sh and source services.env");
        virtual_host_client(vhost, &clients[1]);
        for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
                (void)snprintf(key, sizeof(key), "%s/keys/%s", t.prefix, names[i]);
                url_encode_path(key, url_path, sizeof(url_path));
                put_with_curl(o, url_path, "");
                for (size_t c = 0; c < ARRAY_SIZE(clients); c++) {
                        for (unsigned conns = 1; conns <= 4; conns += 3) {
                                dest_path("encoded", dest, sizeof(dest));
                                p = params(o, dest);
                                p.key = key;
                                p.max_connections = conns;
                                p.expected_sha256 = o->sha256;
                                r = download_object(clients[c], &p, NULL, NULL, &res);
                                if (r < 0)
                                        fail_msg("%s download of key '%s' failed: %s",
                                                 c == 0 ? "path-style" : "virtual-host", key,
                                                 err_text(r));
                                assert_int_equal(res.parts, conns == 1 ? 1 : 3);
                                assert_file_is(dest, o);
                                assert_int_equal(unlink(dest), 0);
                        }
                }
        }
        s3_client_free(clients[1]);
}

/* AWS_SESSION_TOKEN is sent and signed (S3Proxy verifies the signature over it). */
static void test_download_session_token(void **state)
{
        const struct object *o = &objects[OBJ_ODD];
        struct s3_client *c = NULL;
        struct download_result res;
        struct download_params p;
        char dest[512];
        const struct s3_client_options opts = {
                .endpoint = t.proxy.url,
                .region = getenv("AWS_REGION"),
                .access_key_id = getenv("AWS_ACCESS_KEY_ID"),
                .secret_access_key = getenv("AWS_SECRET_ACCESS_KEY"),
                .session_token = "FQoGZXIvYXdzEJr-fim-test-session-token",
                .force_path_style = true,
        };
        int r;

        (void)state;
        assert_int_equal(s3_client_new(&opts, &c), 0);
        dest_path("token", dest, sizeof(dest));
        p = params(o, dest);
        p.expected_sha256 = o->sha256;
        r = download_object(c, &p, NULL, NULL, &res);
        if (r < 0)
                fail_msg("download with a session token failed: %s", err_text(r));
        assert_int_equal(faultproxy_log_count(&t.proxy, "GET ", o->key, "token=yes", NULL), 3);
        assert_int_equal(faultproxy_log_count(&t.proxy, "HEAD ", o->key, "token=yes", NULL), 1);
        assert_int_equal(unlink(dest), 0);
        s3_client_free(c);
}

/*
 * Virtual-host addressing: bucket.localhost resolves to loopback inside curl, and the second
 * S3Proxy of tests/infra/services.sh (S3_VHOST_ENDPOINT, s3proxy.virtual-host=localhost) takes
 * the bucket from the Host header. A fault proxy in front of it shows what was sent.
 */
static void test_download_virtual_host(void **state)
{
        const struct object *o = &objects[OBJ_ODD];
        const char *vhost = getenv("S3_VHOST_ENDPOINT");
        struct faultproxy fp;
        struct s3_client *c = NULL;
        struct download_result res;
        struct download_params p;
        char endpoint[64], host[128], dest[512], target[256], log_path[300];
        int r;

        (void)state;
        if (!vhost || !vhost[0])
                fail_msg("S3_VHOST_ENDPOINT is not set: start the services with "
                         "tests/infra/services.sh and source services.env");
        (void)snprintf(log_path, sizeof(log_path), "%s/vhost-proxy.log", t.dir);
        assert_int_equal(faultproxy_start(&fp, vhost, log_path), 0);
        (void)snprintf(endpoint, sizeof(endpoint), "http://localhost:%d", fp.port);
        virtual_host_client(endpoint, &c);
        dest_path("vhost", dest, sizeof(dest));
        p = params(o, dest);
        p.expected_sha256 = o->sha256;
        r = download_object(c, &p, NULL, NULL, &res);
        if (r < 0)
                fail_msg("virtual-host download failed: %s", err_text(r));
        assert_file_is(dest, o);
        /* The bucket went in the Host header, not in the path. */
        (void)snprintf(host, sizeof(host), "host=" TEST_BUCKET ".localhost:%d", fp.port);
        (void)snprintf(target, sizeof(target), "GET /%s ", o->key);
        assert_int_equal(faultproxy_log_count(&fp, target, host, NULL), 3);
        assert_int_equal(unlink(dest), 0);
        s3_client_free(c);
        faultproxy_stop(&fp);
}

/* ---- crashes and changes mid-download --------------------------------------------------- */

/* A process killed mid-transfer: the next one resumes from the last checkpoint, not zero. */
static void test_download_resumes_after_sigkill(void **state)
{
        const struct object *o = &objects[OBJ_LARGE];
        struct download_result res;
        struct download_params p;
        char dest[512], needle[64];
        uint64_t verified = 0;
        pid_t pid;
        int status, r;

        (void)state;
        dest_path("killed", dest, sizeof(dest));
        p = params(o, dest);
        p.parallel_threshold_bytes = 0;
        p.checkpoint_ms = 1; /* a checkpoint at every written buffer */
        p.expected_sha256 = o->sha256;
        /*
         * Held back far longer than the wait below, so the child is surely still in the body
         * when it is killed however slow this machine is (sanitizers, a loaded CI host). The
         * hold starts well past the 3 MiB the wait looks for: a checkpoint covers what came
         * in before it, and bytes that arrive while one is syncing are only covered by the
         * next one, which a body that stops right after them never triggers.
         */
        p.stall_timeout_ms = 300000;
        p.total_timeout_ms = 300000;
        proxy_command("stall 300 5000000 GET");
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                struct s3_client *c = NULL;

                if (client_from_env(t.proxy.url, getenv("AWS_ACCESS_KEY_ID"),
                                    getenv("AWS_SECRET_ACCESS_KEY"), &c) < 0)
                        _exit(1);
                (void)download_object(c, &p, NULL, NULL, &res);
                _exit(2); /* not reached while the proxy holds the rest back */
        }
        for (int i = 0; i < 1200 && verified < 3 * MIB; i++) {
                util_sleep_ms(50);
                verified = download_test_verified(dest);
                if (waitpid(pid, &status, WNOHANG) == pid)
                        fail_msg(
                                "the downloading child exited by itself (status %d) before the kill, verified %llu",
                                WIFEXITED(status) ? WEXITSTATUS(status) : -1,
                                (unsigned long long)verified);
        }
        assert_int_equal(kill(pid, SIGKILL), 0);
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFSIGNALED(status));
        if (verified < 3 * MIB)
                fail_msg("no checkpoint past 3 MiB before the kill (verified %llu)",
                         (unsigned long long)verified);
        verified = download_test_verified(dest); /* what the dead process left */
        assert_true(verified >= 3 * MIB && verified < o->size);

        r = download_object(t.proxied, &p, NULL, NULL, &res);
        if (r < 0)
                fail_msg("resume after SIGKILL failed: %s", err_text(r));
        assert_int_equal(res.resumed_from_offset, verified);
        assert_string_equal(res.sha256, o->sha256);
        (void)snprintf(needle, sizeof(needle), "range=bytes=%llu- ", (unsigned long long)verified);
        assert_int_equal(faultproxy_log_count(&t.proxy, "GET ", o->key, needle, NULL), 1);
        assert_file_is(dest, o);
        assert_int_equal(unlink(dest), 0);
}

/* What the before_rename hook saw, and whether it fails the call. */
struct rename_probe {
        const char *dest;
        int calls;
        int fail_with;
        bool dest_existed;
        struct download_result seen;
};

static int probe_before_rename(const struct download_result *result, void *userdata)
{
        struct rename_probe *probe = userdata;

        probe->calls++;
        probe->seen = *result;
        probe->dest_existed = exists(probe->dest, "");
        if (probe->fail_with)
                return err_set(probe->fail_with, "could not record the download (test)");
        return 0;
}

static int proxy_count(const char *method, const char *key)
{
        return faultproxy_log_count(&t.proxy, method, key, NULL);
}

/*
 * before_rename sees the result before the file has its final name; when it fails, the call
 * fails and the next one has nothing left to fetch. A recorded result is kept when the file
 * and the object still match it (one HEAD, no GET), and downloaded again when the file's
 * bytes or the object's ETag differ from the record. In one stream and in parts.
 */
static void test_download_before_rename_and_recorded(void **state)
{
        const struct object *o = &objects[OBJ_ODD];
        struct rename_probe probe = {0};
        struct download_result res, recorded;
        struct download_params p;
        char dest[512];
        int gets, heads, fd, r;

        (void)state;
        dest_path("recorded", dest, sizeof(dest));
        probe.dest = dest;
        for (int parallel = 0; parallel < 2; parallel++) {
                p = params(o, dest);
                p.parallel_threshold_bytes = parallel ? MIB : 0;
                p.before_rename = probe_before_rename;
                p.before_rename_userdata = &probe;
                probe.calls = 0;
                probe.fail_with = -ECONNRESET;
                gets = proxy_count("GET ", o->key);
                r = download_object(t.proxied, &p, NULL, NULL, &res);
                assert_int_equal(r, -ECONNRESET);
                assert_int_equal(probe.calls, 1);
                assert_false(probe.dest_existed);
                assert_string_equal(probe.seen.sha256, o->sha256);
                assert_false(exists(dest, ""));
                assert_true(exists(dest, ".part"));
                assert_int_equal(proxy_count("GET ", o->key), gets + (parallel ? 3 : 1));

                probe.fail_with = 0;
                r = download_object(t.proxied, &p, NULL, NULL, &res);
                if (r < 0)
                        fail_msg("second call failed: %s", err_text(r));
                assert_int_equal(probe.calls, 2);
                assert_int_equal(res.resumed_from_offset, o->size);
                assert_false(res.kept);
                assert_int_equal(proxy_count("GET ", o->key), gets + (parallel ? 3 : 1));
                assert_string_equal(res.sha256, probe.seen.sha256);
                assert_string_equal(res.etag, probe.seen.etag);
                assert_file_is(dest, o);
                recorded = res;

                /* Recorded and unchanged: kept, after one HEAD; no partial file left. */
                p.recorded = &recorded;
                heads = proxy_count("HEAD ", o->key);
                gets = proxy_count("GET ", o->key);
                r = download_object(t.proxied, &p, NULL, NULL, &res);
                if (r < 0)
                        fail_msg("call with a matching record failed: %s", err_text(r));
                assert_true(res.kept);
                assert_int_equal(res.size, o->size);
                assert_string_equal(res.sha256, o->sha256);
                assert_string_equal(res.etag, recorded.etag);
                assert_int_equal(probe.calls, 2);
                assert_int_equal(proxy_count("HEAD ", o->key), heads + 1);
                assert_int_equal(proxy_count("GET ", o->key), gets);
                assert_false(exists(dest, ".part"));
                assert_false(exists(dest, ".part.meta"));

                /* Same size, one byte changed: the hash tells, and it is downloaded again. */
                fd = open(dest, O_WRONLY | O_CLOEXEC);
                assert_true(fd >= 0);
                assert_int_equal(pwrite(fd, "!", 1, 1000), 1);
                assert_int_equal(close(fd), 0);
                r = download_object(t.proxied, &p, NULL, NULL, &res);
                if (r < 0)
                        fail_msg("call after the file changed failed: %s", err_text(r));
                assert_false(res.kept);
                assert_int_equal(probe.calls, 3);
                assert_true(proxy_count("GET ", o->key) > gets);
                assert_file_is(dest, o);

                /* A record of another version of the object (another ETag): downloaded again. */
                (void)snprintf(recorded.etag, sizeof(recorded.etag), "\"%s\"", "0123456789abcdef");
                gets = proxy_count("GET ", o->key);
                r = download_object(t.proxied, &p, NULL, NULL, &res);
                if (r < 0)
                        fail_msg("call with another ETag recorded failed: %s", err_text(r));
                assert_false(res.kept);
                assert_true(proxy_count("GET ", o->key) > gets);
                assert_file_is(dest, o);
                assert_int_equal(unlink(dest), 0);
        }
}

/* The object is replaced between our HEAD and our GET: 412, and one restart within the call. */
static void test_download_restarts_when_replaced_mid_call(void **state)
{
        struct object *o = &objects[OBJ_REPLACED];
        struct download_result res;
        struct download_params p;
        char dest[512];
        unsigned seed = o->seed + 200;
        pid_t pid;
        int status, r;

        (void)state;
        dest_path("replaced", dest, sizeof(dest));
        p = params(o, dest);
        proxy_command("hold 3 GET");
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                struct s3_client *c = NULL;

                /* Replace it once the HEAD is done and the GET is being held back. */
                for (int i = 0; i < 200; i++) {
                        if (faultproxy_log_count(&t.proxy, "GET ", o->key, "fault=hold", NULL))
                                break;
                        util_sleep_ms(10);
                }
                if (client_from_env(getenv("S3_ENDPOINT"), getenv("AWS_ACCESS_KEY_ID"),
                                    getenv("AWS_SECRET_ACCESS_KEY"), &c) < 0)
                        _exit(1);
                fill(o->data, o->size, seed);
                _exit(s3_client_put(c, TEST_BUCKET, o->key, o->data, o->size, NULL) < 0 ? 1 : 0);
        }
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        if (r < 0)
                fail_msg("download of a replaced object failed: %s", err_text(r));
        generate(o, seed);
        assert_string_equal(res.sha256, o->sha256);
        assert_int_equal(res.resumed_from_offset, 0);
        assert_file_is(dest, o);
        assert_int_equal(faultproxy_log_count(&t.proxy, "GET ", o->key, "fault=hold", NULL), 1);
        assert_int_equal(faultproxy_log_count(&t.proxy, "HEAD ", o->key, NULL), 2);
        assert_int_equal(unlink(dest), 0);
}

/* A partial download followed by a permanent error: nothing of it stays. */
static void test_download_permanent_error_after_partial(void **state)
{
        const struct object *o = &objects[OBJ_RESUME];
        struct s3_client *bad = NULL;
        struct download_result res;
        struct download_params p;
        char dest[512];
        int r;

        (void)state;
        dest_path("partial-then-permanent", dest, sizeof(dest));
        p = params(o, dest);
        p.parallel_threshold_bytes = 0;
        proxy_command("cut 1000000 GET");
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_true(r < 0 && err_is_transient(r));
        assert_true(exists(dest, ".part") && exists(dest, ".part.meta"));
        assert_int_equal(client_from_env(getenv("S3_ENDPOINT"), getenv("AWS_ACCESS_KEY_ID"),
                                         "wrong-secret-key", &bad),
                         0);
        assert_int_equal(download_object(bad, &p, NULL, NULL, &res), -EACCES);
        assert_no_files(dest);
        s3_client_free(bad);

        /* And a wrong checksum found only after a resume. */
        proxy_command("cut 1000000 GET");
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_true(r < 0 && err_is_transient(r));
        p.expected_sha256 = SIGV4_EMPTY_SHA256;
        assert_int_equal(download_object(t.proxied, &p, NULL, NULL, &res), -EBADMSG);
        assert_no_files(dest);
        err_clear();
}

/* Parallel parts never use more than max_connections at once. */
static void test_download_parallel_connection_bound(void **state)
{
        const struct object *o = &objects[OBJ_LARGE];
        struct faultproxy fp;
        struct s3_client *c = NULL;
        struct download_result res;
        struct download_params p;
        char dest[512], answer[128], log_path[300];
        int inflight = -1, conns = -1;

        (void)state;
        /* A proxy of its own: its counters see this download only. */
        (void)snprintf(log_path, sizeof(log_path), "%s/bound-proxy.log", t.dir);
        assert_int_equal(faultproxy_start(&fp, getenv("S3_ENDPOINT"), log_path), 0);
        assert_int_equal(client_from_env(fp.url, getenv("AWS_ACCESS_KEY_ID"),
                                         getenv("AWS_SECRET_ACCESS_KEY"), &c),
                         0);
        dest_path("bound", dest, sizeof(dest));
        p = params(o, dest);
        p.max_connections = 2;
        faultproxy_command(&fp, "stall 0.5 0 GET"); /* the first part is slow: the next overlaps */
        assert_int_equal(download_object(c, &p, NULL, NULL, &res), 0);
        assert_int_equal(res.parts, 6);
        faultproxy_query(&fp, "stats", answer, sizeof(answer));
        assert_int_equal(sscanf(answer, "ok inflight=%d conns=%d", &inflight, &conns), 2);
        assert_int_equal(inflight, 2);
        assert_true(conns >= 1 && conns <= 2);
        assert_int_equal(faultproxy_log_count(&fp, "GET ", o->key, NULL), 6);
        assert_int_equal(unlink(dest), 0);
        s3_client_free(c);
        faultproxy_stop(&fp);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_download_sizes_single_and_parallel),
                cmocka_unit_test(test_download_progress_reports),
                cmocka_unit_test(test_download_wrong_secret),
                cmocka_unit_test(test_download_unknown_access_key),
                cmocka_unit_test(test_download_anonymous_is_refused),
                cmocka_unit_test(test_download_missing_key_and_bucket),
                cmocka_unit_test(test_download_checksum_mismatch),
                cmocka_unit_test(test_download_size_and_space_limits),
                cmocka_unit_test(test_download_client_if_match_and_range),
                cmocka_unit_test(test_download_resumes_after_cut),
                cmocka_unit_test(test_download_restarts_when_object_changed),
                cmocka_unit_test(test_download_parallel_restarts_when_object_shrank),
                cmocka_unit_test(test_download_parallel_resume_keeps_done_parts),
                cmocka_unit_test(test_download_slowdown_is_transient),
                cmocka_unit_test(test_download_stall_times_out),
                cmocka_unit_test(test_download_total_timeout),
                cmocka_unit_test(test_download_part_failure_cancels_the_rest),
                cmocka_unit_test(test_download_not_implemented_is_permanent),
                cmocka_unit_test(test_download_range_ignored_falls_back_to_one_stream),
                cmocka_unit_test(test_download_part_file_replaced_before_lock),
                cmocka_unit_test(test_download_reserves_space),
                cmocka_unit_test(test_download_anonymous_public_object),
                cmocka_unit_test(test_download_keys_that_need_encoding),
                cmocka_unit_test(test_download_session_token),
                cmocka_unit_test(test_download_virtual_host),
                cmocka_unit_test(test_download_resumes_after_sigkill),
                cmocka_unit_test(test_download_before_rename_and_recorded),
                cmocka_unit_test(test_download_restarts_when_replaced_mid_call),
                cmocka_unit_test(test_download_permanent_error_after_partial),
                cmocka_unit_test(test_download_parallel_connection_bound),
        };

        return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
