/*
 * The real binary's worker with the real download stage, against S3Proxy, Kafka and
 * PostgreSQL: an enqueued request is downloaded and verified, and the unpack request it hands
 * off is published to "<prefix>.unpack" through the outbox with the run's id as parent. The
 * same request enqueued again is acknowledged without work and hands nothing off again. A
 * worker killed in the middle of a transfer (held by tests/integration/faultproxy.py) is
 * replaced by one that resumes the download from the dead one's checkpoint.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <json-c/json.h>

#include "common/util.h"
#include "helper_download.h"
#include "helper_faultproxy.h"
#include "helper_worker.h"
#include "stages/download.h"
#include "stages/request.h"
#include "worker/stage.h"

struct dl_env {
        struct wt_env wt;
        char dir[64];
        char images[128];
};

static int setup(void **state)
{
        struct dl_env *d = calloc(1, sizeof(*d));

        assert_non_null(d);
        if (!getenv("S3_ENDPOINT") || !getenv("S3_BUCKET"))
                fail_msg(
                        "S3_ENDPOINT/S3_BUCKET are not set: run the tests through scripts/test.sh, which starts S3Proxy");
        wt_setup(&d->wt, NULL);
        (void)snprintf(d->dir, sizeof(d->dir), "/tmp/fim-wtd-XXXXXX");
        assert_non_null(mkdtemp(d->dir));
        (void)snprintf(d->images, sizeof(d->images), "%s/images", d->dir);
        assert_int_equal(mkdir(d->images, 0755), 0);
        assert_int_equal(setenv("LOCAL_DIR", d->images, 1), 0);
        /* The test's own in-process runs see what the workers see. */
        config_done(&d->wt.cfg);
        assert_int_equal(config_load(&d->wt.cfg, NULL), 0);
        *state = d;
        return 0;
}

static int teardown(void **state)
{
        struct dl_env *d = *state;
        char cmd[256];

        wt_teardown(&d->wt);
        (void)snprintf(cmd, sizeof(cmd), "rm -rf '%s'", d->dir);
        (void)system(cmd);
        free(d);
        return 0;
}

/* A 300 KB file of varied bytes, uploaded to @key; its SHA-256 goes to @sha. */
static void seed_object(struct dl_env *d, const char *key, char *sha)
{
        char path[128], cmd[512];
        uint64_t size = 0;
        FILE *f;

        (void)snprintf(path, sizeof(path), "%s/source.tar", d->dir);
        f = fopen(path, "we");
        assert_non_null(f);
        for (uint32_t i = 0, x = 2463534242u; i < 300000; i++) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                fputc((int)(x & 0xff), f);
        }
        assert_int_equal(fclose(f), 0);
        assert_int_equal(download_hash_file(path, sha, &size), 0);
        (void)snprintf(cmd, sizeof(cmd), "bash %s/tests/infra/s3put.sh '%s' '%s' '%s'",
                       FIM_SOURCE_DIR, getenv("S3_BUCKET"), key, path);
        assert_int_equal(system(cmd), 0);
}

static const char *json_str(struct json_object *o, const char *field)
{
        struct json_object *v = NULL;

        if (!json_object_object_get_ex(o, field, &v))
                fail_msg("field '%s' missing", field);
        return json_object_get_string(v);
}

static void test_worker_download_stage_hands_off_to_unpack(void **state)
{
        struct dl_env *d = *state;
        struct wt_env *e = &d->wt;
        char key[128], image[80], sha[DOWNLOAD_SHA256_HEX_LEN + 1], out[4096];
        char local[256], got[DOWNLOAD_SHA256_HEX_LEN + 1];
        const char *worker[] = {"flyio-image-manager", "worker", "--stages", "download", NULL};
        const char *enqueue[] = {
                "flyio-image-manager", "enqueue", "--s3-key", key, "--image-id", image,
                "--checksum",          sha,       NULL};
        struct json_object *req;
        struct wt_msg *msgs = NULL;
        uint64_t size = 0;
        pid_t w;

        (void)snprintf(key, sizeof(key), "wt/%s/image.tar", e->prefix);
        (void)snprintf(image, sizeof(image), "img-%s", e->prefix);
        seed_object(d, key, sha);
        w = wt_cli_start(e, worker, NULL);
        assert_int_equal(wt_cli(e, out, sizeof(out), enqueue), 0);
        wt_wait_sql(e, 1, 60000,
                    "SELECT count(*) FROM images WHERE image_id = '%s' AND status = 'completed'",
                    image);
        wt_wait_sql(e, 1, 15000, "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL");

        (void)snprintf(local, sizeof(local), "%s/%s.tar", d->images, image);
        assert_int_equal(download_hash_file(local, got, &size), 0);
        assert_string_equal(got, sha);
        assert_int_equal(size, 300000);

        assert_int_equal(wt_read_topic(e, "unpack", &msgs), 1);
        assert_string_equal(msgs[0].key, image);
        req = json_tokener_parse(msgs[0].value);
        assert_non_null(req);
        assert_string_equal(json_str(req, "image_id"), image);
        assert_string_equal(json_str(req, "local_path"), local);
        assert_string_equal(json_str(req, "checksum"), sha);
        json_object_put(req);
        assert_int_equal(wt_sql(e,
                                "SELECT count(*) FROM fsm_runs WHERE fsm = 'download'"
                                " AND run_id = '%s' AND status = 'complete'",
                                wt_header(&msgs[0], "parent_run_id")),
                         1);
        wt_msgs_free(msgs, 1);

        /* Again: acknowledged without a new run, no second handoff. */
        assert_int_equal(wt_cli(e, out, sizeof(out), enqueue), 0);
        wt_wait_committed(e, "download", 30000);
        assert_int_equal(wt_topic_end(e, "download"), 2);
        assert_int_equal(wt_sql(e, "SELECT count(*) FROM fsm_runs"), 1);
        assert_int_equal(wt_sql(e, "SELECT count(*) FROM outbox"), 1);
        assert_int_equal(wt_topic_end(e, "unpack"), 1);
        assert_int_equal(wt_worker_stop(e, w, SIGTERM, 30000), 0);
}

/*
 * process-image downloaded the image (handoff off) and stopped before unpacking. The same
 * request enqueued later finds the download key complete and, since that run handed nothing
 * off, the worker writes the unpack request now: the image is not stranded.
 */
static void test_worker_download_completed_in_process_hands_off_later(void **state)
{
        struct dl_env *d = *state;
        struct wt_env *e = &d->wt;
        char key[128], image[80], sha[DOWNLOAD_SHA256_HEX_LEN + 1], out[4096], local[256];
        const char *worker[] = {"flyio-image-manager", "worker", "--stages", "download", NULL};
        const char *enqueue[] = {
                "flyio-image-manager", "enqueue", "--s3-key", key, "--image-id", image,
                "--checksum",          sha,       NULL};
        struct download_request req = {0};
        struct stage_result res = {0};
        struct wt_msg *msgs = NULL;
        struct json_object *next;
        char run_id[64];
        char *json;
        pid_t w;

        (void)snprintf(key, sizeof(key), "wt/%s/later.tar", e->prefix);
        (void)snprintf(image, sizeof(image), "later-%s", e->prefix);
        seed_object(d, key, sha);
        (void)snprintf(req.s3_key, sizeof(req.s3_key), "%s", key);
        (void)snprintf(req.image_id, sizeof(req.image_id), "%s", image);
        (void)snprintf(req.checksum, sizeof(req.checksum), "%s", sha);
        json = download_request_encode(&req);
        assert_non_null(json);
        assert_int_equal(wt_run_stage(e, stage_get(STAGE_DOWNLOAD), json, false, &res), 0);
        free(json);
        if (res.outcome != FSM_OUTCOME_COMPLETE)
                fail_msg("in-process download: %s", res.error_text);
        (void)snprintf(run_id, sizeof(run_id), "%s", res.run_id);
        stage_result_done(&res);
        assert_int_equal(wt_sql(e, "SELECT count(*) FROM outbox"), 0);

        w = wt_cli_start(e, worker, NULL);
        assert_int_equal(wt_cli(e, out, sizeof(out), enqueue), 0);
        wt_wait_sql(e, 1, 30000, "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL");
        wt_wait_committed(e, "download", 30000);
        assert_int_equal(wt_sql(e, "SELECT count(*) FROM fsm_runs"), 1);
        assert_int_equal(wt_read_topic(e, "unpack", &msgs), 1);
        assert_string_equal(wt_header(&msgs[0], "parent_run_id"), run_id);
        next = json_tokener_parse(msgs[0].value);
        assert_non_null(next);
        (void)snprintf(local, sizeof(local), "%s/%s.tar", d->images, image);
        assert_string_equal(json_str(next, "local_path"), local);
        assert_string_equal(json_str(next, "checksum"), sha);
        json_object_put(next);
        wt_msgs_free(msgs, 1);
        assert_int_equal(wt_worker_stop(e, w, SIGTERM, 30000), 0);
}

/*
 * A worker SIGKILLed in the middle of a real download. The proxy pauses the body twice: the
 * first pause outlasts the checkpoint interval (2 s), so the bytes after it bring a
 * checkpoint; the second outlasts the test, and the worker is killed in it. The restarted
 * worker gets the message again, takes the run over once its lease has lapsed and resumes
 * with a Range request from the dead worker's checkpoint: one completed run, one resume,
 * one handoff, and the file is the object.
 */
static void test_worker_download_sigkill_mid_transfer_resumes(void **state)
{
        struct dl_env *d = *state;
        struct wt_env *e = &d->wt;
        char key[128], image[80], sha[DOWNLOAD_SHA256_HEX_LEN + 1],
                got[DOWNLOAD_SHA256_HEX_LEN + 1];
        char out[4096], dest[256], log_path[256], needle[64], endpoint[128];
        const char *worker[] = {"flyio-image-manager", "worker", "--stages", "download", NULL};
        const char *enqueue[] = {"flyio-image-manager", "enqueue", "--s3-key", key,
                                 "--image-id",          image,     NULL};
        /* The held body must not end the attempt: only the kill does. */
        const char *env[] = {endpoint, "DOWNLOAD_STALL_TIMEOUT=900", "DOWNLOAD_TIMEOUT=900", NULL};
        struct faultproxy fp;
        uint64_t verified = 0, size = 0;
        int64_t deadline;
        pid_t w;

        (void)snprintf(key, sizeof(key), "wt/%s/killed.tar", e->prefix);
        (void)snprintf(image, sizeof(image), "killed-%s", e->prefix);
        (void)snprintf(dest, sizeof(dest), "%s/%s.tar", d->images, image);
        seed_object(d, key, sha);
        (void)snprintf(log_path, sizeof(log_path), "%s/faultproxy.log", d->dir);
        assert_int_equal(faultproxy_start(&fp, getenv("S3_ENDPOINT"), log_path), 0);
        (void)snprintf(endpoint, sizeof(endpoint), "S3_ENDPOINT=%s", fp.url);
        faultproxy_command(&fp, "stalls 4@100000 900@200000 GET");

        w = wt_cli_start(e, worker, env);
        assert_int_equal(wt_cli(e, out, sizeof(out), enqueue), 0);
        deadline = util_now_monotonic_ms() + 120000;
        while ((verified = download_test_verified(dest)) == 0) {
                if (util_now_monotonic_ms() > deadline)
                        fail_msg("no download checkpoint of '%s' within 120 s", dest);
                util_sleep_ms(50);
        }
        assert_int_equal(wt_worker_stop(e, w, SIGKILL, 10000), 128 + SIGKILL);
        verified = download_test_verified(dest); /* what the dead worker left */
        assert_true(verified > 0 && verified < 300000);
        assert_int_equal(access(dest, F_OK), -1);
        assert_int_equal(wt_sql(e,
                                "SELECT count(*) FROM images WHERE image_id = '%s'"
                                " AND status = 'downloading'",
                                image),
                         1);
        assert_int_equal(faultproxy_log_count(&fp, "GET ", key, NULL), 1);

        w = wt_cli_start(e, worker, env);
        wt_wait_sql(e, 1, 120000,
                    "SELECT count(*) FROM images WHERE image_id = '%s' AND status = 'completed'",
                    image);
        assert_int_equal(download_hash_file(dest, got, &size), 0);
        assert_string_equal(got, sha);
        assert_int_equal(size, 300000);
        assert_int_equal(access(dest, F_OK), 0);

        /* One more GET, from the checkpoint, guarded by the ETag. */
        (void)snprintf(needle, sizeof(needle), " range=bytes=%llu- ", (unsigned long long)verified);
        assert_int_equal(faultproxy_log_count(&fp, "GET ", key, NULL), 2);
        assert_int_equal(faultproxy_log_count(&fp, "GET ", key, needle, "if-match=\"", NULL), 1);

        assert_int_equal(wt_sql(e, "SELECT count(*) FROM fsm_runs"), 1);
        assert_int_equal(wt_sql(e, "SELECT count(*) FROM fsm_runs WHERE status = 'complete'"
                                   " AND attempt = 2"),
                         1);
        assert_int_equal(wt_sql(e, "SELECT count(*) FROM fsm_events WHERE kind = 'resume'"), 1);
        assert_int_equal(wt_sql(e, "SELECT count(*) FROM fsm_events WHERE kind ="
                                   " 'transition_complete' AND transition = 'fetch'"),
                         1);
        wt_wait_sql(e, 1, 30000, "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL");
        assert_int_equal(wt_topic_end(e, "unpack"), 1);
        wt_wait_committed(e, "download", 30000);
        assert_int_equal(wt_worker_stop(e, w, SIGTERM, 30000), 0);
        faultproxy_command(&fp, "release");
        faultproxy_stop(&fp);
}

int main(int argc, char **argv)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_worker_download_stage_hands_off_to_unpack,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(
                        test_worker_download_completed_in_process_hands_off_later, setup, teardown),
                cmocka_unit_test_setup_teardown(test_worker_download_sigkill_mid_transfer_resumes,
                                                setup, teardown),
        };
        int status;

        if (wt_child_main(argc, argv, &status))
                return status;
        return cmocka_run_group_tests(tests, NULL, NULL);
}
