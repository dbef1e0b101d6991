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
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/util.h"
#include "stages/download.h"
#include "stages/s3_client.h"
#include "stages/s3_sigv4.h"

#define MIB (1024u * 1024u)
#define TEST_BUCKET "fim-download-test"
#define FAULTPROXY FIM_SOURCE_DIR "/tests/integration/faultproxy.py"

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
};

enum { OBJ_EMPTY, OBJ_ONE, OBJ_ODD, OBJ_LARGE, OBJ_RESUME, OBJ_CHANGING };

struct proxy {
        pid_t pid;
        FILE *in;  /* commands */
        FILE *out; /* answers */
        int port;
        char log_path[512];
};

static struct {
        struct s3_client *client;
        char dir[256];
        char prefix[64];
        struct proxy proxy;
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

static void upload(struct object *o, unsigned seed)
{
        int r;

        o->seed = seed;
        free(o->data);
        o->data = malloc(o->size ? o->size : 1);
        assert_non_null(o->data);
        fill(o->data, o->size, seed);
        assert_int_equal(sigv4_sha256_hex(o->data, o->size, o->sha256), 0);
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
        char answer[128];

        fprintf(t.proxy.in, "%s\n", cmd);
        fflush(t.proxy.in);
        assert_non_null(fgets(answer, sizeof(answer), t.proxy.out));
        if (strcmp(answer, "ok\n") != 0)
                fail_msg("faultproxy refused '%s': %s", cmd, answer);
}

/* Whether the proxy logged a GET of @key with "range=bytes=@offset-". */
static bool proxy_saw_range(const char *key, uint64_t offset)
{
        char needle[256], line[1024];
        FILE *f = fopen(t.proxy.log_path, "re");
        bool found = false;

        assert_non_null(f);
        (void)snprintf(needle, sizeof(needle), " range=bytes=%llu-", (unsigned long long)offset);
        while (fgets(line, sizeof(line), f)) {
                if (strncmp(line, "GET ", 4) == 0 && strstr(line, key) && strstr(line, needle) &&
                    strstr(line, "if-match=\""))
                        found = true;
        }
        fclose(f);
        return found;
}

static int proxy_start(void)
{
        const char *endpoint = getenv("S3_ENDPOINT");
        const char *hostport = strstr(endpoint, "://");
        int in[2], out[2];
        char upstream[256], line[64], url[64];

        if (!hostport)
                return -1;
        (void)snprintf(upstream, sizeof(upstream), "%s", hostport + 3);
        upstream[strcspn(upstream, "/")] = '\0';
        (void)snprintf(t.proxy.log_path, sizeof(t.proxy.log_path), "%s/faultproxy.log", t.dir);
        if (pipe2(in, O_CLOEXEC) < 0 || pipe2(out, O_CLOEXEC) < 0)
                return -1;
        t.proxy.pid = fork();
        if (t.proxy.pid < 0)
                return -1;
        if (t.proxy.pid == 0) {
                (void)dup2(in[0], STDIN_FILENO);
                (void)dup2(out[1], STDOUT_FILENO);
                execlp("python3", "python3", FAULTPROXY, "--upstream", upstream, "--log",
                       t.proxy.log_path, (char *)NULL);
                _exit(127);
        }
        (void)close(in[0]);
        (void)close(out[1]);
        t.proxy.in = fdopen(in[1], "w");
        t.proxy.out = fdopen(out[0], "r");
        if (!t.proxy.in || !t.proxy.out || !fgets(line, sizeof(line), t.proxy.out) ||
            sscanf(line, "port %d", &t.proxy.port) != 1)
                return -1;
        (void)snprintf(url, sizeof(url), "http://127.0.0.1:%d", t.proxy.port);
        return client_from_env(url, getenv("AWS_ACCESS_KEY_ID"), getenv("AWS_SECRET_ACCESS_KEY"),
                               &t.proxied);
}

static void proxy_stop(void)
{
        if (t.proxy.in)
                fclose(t.proxy.in); /* end of input stops it */
        if (t.proxy.out)
                fclose(t.proxy.out);
        if (t.proxy.pid > 0) {
                int status;

                for (int i = 0; i < 50 && waitpid(t.proxy.pid, &status, WNOHANG) == 0; i++)
                        util_sleep_ms(100);
                if (waitpid(t.proxy.pid, &status, WNOHANG) == 0) {
                        (void)kill(t.proxy.pid, SIGKILL);
                        (void)waitpid(t.proxy.pid, &status, 0);
                }
        }
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
                fprintf(stderr, "cannot start %s\n", FAULTPROXY);
                return -1;
        }
        return 0;
}

static int group_teardown(void **state)
{
        char cmd[512];

        (void)state;
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
        char dest[512], want[64];
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
        assert_non_null(strstr(err_last(), "available"));
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
        assert_true(res.resumed_from_offset >= 2 * MIB);
        assert_int_equal(res.resumed_from_offset % MIB, 0);
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
        assert_non_null(strstr(err_last(), "stall"));
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
        int r;

        (void)state;
        dest_path("deadline", dest, sizeof(dest));
        p = params(o, dest);
        p.max_connections = 1;
        p.stall_timeout_ms = 0;
        p.total_timeout_ms = 1500;
        proxy_command("stall 4 100000 GET");
        r = download_object(t.proxied, &p, NULL, NULL, &res);
        assert_int_equal(r, -ETIMEDOUT);
        assert_true(err_is_transient(r));
        (void)download_object(
                t.proxied,
                &(struct download_params){.bucket = TEST_BUCKET, .key = o->key, .dest_path = dest},
                NULL, NULL, &res);
        assert_int_equal(unlink(dest), 0);
        err_clear();
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
        };

        return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
