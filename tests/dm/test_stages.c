/*
 * The unpack and activate stages against a real kernel thin pool (inside the test VM) and a
 * real PostgreSQL on the host (reached through the VM's forwarded port): a realistic image
 * end to end with its files checked on the mounted snapshot, idempotent repeats, two images
 * sharing one origin, a hostile tarball that leaves the pool as it was, a pool above its
 * high-water mark, a pool that runs out of space, SIGKILL during unpack and activate with
 * resume (no leaked id), reconciliation of a half-made device and of an unknown id, and gc.
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
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <json-c/json.h>

#include "common/err.h"
#include "common/spawn.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "helper_pg.h"
#include "stages/download.h"
#include "stages/pool_setup.h"
#include "stages/thin_pool.h"
#include "stages/thin_registry.h"
#include "worker/lease.h"
#include "worker/stage.h"

#define POOL "fimtestpool"
#define POOL_DIR "/tmp/fim-stages-pool"
#define LOCAL "/tmp/fim-stages-images"

struct env {
        char url[512];
        struct config cfg;
        struct db *db;
        struct lease_keeper *leases;
};

static void sh(const char *cmd)
{
        const char *argv[] = {"/bin/sh", "-ec", cmd, NULL};
        char out[2048];

        if (spawn_run(argv, out, sizeof(out)) < 0)
                fail_msg("%s: %s", cmd, err_last());
}

/* A small but realistic root filesystem tree, tarred by GNU tar as images are. */
static void make_rootfs_tar(const char *image_id, const char *extra)
{
        char cmd[2048];

        (void)snprintf(
                cmd, sizeof(cmd),
                "ID=%s; rm -rf /tmp/src-$ID && mkdir -p /tmp/src-$ID && cd /tmp/src-$ID &&"
                " mkdir -p etc usr/bin usr/lib bin var/empty &&"
                " printf 'PRETTY_NAME=\"Test Linux %%s\"\\nID=test\\n' $ID > etc/os-release &&"
                " cp /bin/true usr/bin/true && cp /bin/true usr/bin/passwd &&"
                " chmod 4755 usr/bin/passwd && ln -s /usr/bin/true bin/true &&"
                " ln usr/bin/true usr/lib/true-hardlink && chmod 0555 var/empty &&"
                " head -c 300000 /dev/urandom > usr/lib/blob %s &&"
                " tar --numeric-owner -cf " LOCAL "/$ID.tar -C /tmp/src-$ID .",
                image_id, extra);
        sh(cmd);
}

static void tar_checksum(const char *image_id, char *hex)
{
        char path[256];
        uint64_t size;

        (void)snprintf(path, sizeof(path), LOCAL "/%s.tar", image_id);
        assert_int_equal(download_hash_file(path, hex, &size), 0);
}

static int setup(void **state)
{
        struct env *e = calloc(1, sizeof(*e));
        struct pool_setup_opts o = POOL_SETUP_OPTS_INIT;

        sh("rm -rf " LOCAL " && mkdir -p " LOCAL);
        o.name = POOL;
        o.dir = POOL_DIR;
        o.data_size = 512ULL << 20;
        o.error_if_no_space = true;
        assert_true(pool_setup_create(&o, NULL) >= 0);
        pg_test_create(e->url, sizeof(e->url));
        e->db = pg_test_connect(e->url);
        assert_int_equal(config_init(&e->cfg), 0);
        assert_int_equal(config_set(&e->cfg, "DATABASE_URL", e->url, CONFIG_SOURCE_FLAG), 0);
        assert_int_equal(config_set(&e->cfg, "LOCAL_DIR", LOCAL, CONFIG_SOURCE_FLAG), 0);
        assert_int_equal(config_set(&e->cfg, "POOL_NAME", POOL, CONFIG_SOURCE_FLAG), 0);
        assert_int_equal(config_set(&e->cfg, "HOST_ID", "vm-host", CONFIG_SOURCE_FLAG), 0);
        assert_int_equal(config_set(&e->cfg, "DEVICE_SIZE", "256M", CONFIG_SOURCE_FLAG), 0);
        assert_int_equal(config_set(&e->cfg, "MAX_ATTEMPTS", "3", CONFIG_SOURCE_FLAG), 0);
        assert_int_equal(config_set(&e->cfg, "RETRY_BASE_MS", "50", CONFIG_SOURCE_FLAG), 0);
        assert_int_equal(config_set(&e->cfg, "RETRY_MAX_MS", "100", CONFIG_SOURCE_FLAG), 0);
        assert_int_equal(lease_keeper_new(e->url, 2000, &e->leases), 0);
        *state = e;
        return 0;
}

static int teardown(void **state)
{
        struct env *e = *state;

        lease_keeper_free(e->leases);
        db_free(e->db);
        config_done(&e->cfg);
        pg_test_drop(e->url);
        (void)pool_setup_teardown(POOL, POOL_DIR, true, NULL);
        sh("rm -rf " LOCAL " /tmp/src-*");
        free(e);
        return 0;
}

static int run_stage(struct env *e, struct db *db, struct lease_keeper *leases, enum stage_id id,
                     const char *json, struct stage_result *res)
{
        struct stage_ctx ctx = {.cfg = &e->cfg,
                                .db = db,
                                .leases = leases,
                                .worker_id = "vm-test",
                                .handoff = true};

        return stage_get(id)->handle(&ctx, json, res);
}

static void unpack_json(const char *image_id, char *buf, size_t size)
{
        char hex[65];

        tar_checksum(image_id, hex);
        (void)snprintf(buf, size,
                       "{\"image_id\":\"%s\",\"local_path\":\"" LOCAL
                       "/%s.tar\",\"checksum\":\"%s\"}",
                       image_id, image_id, hex);
}

static const char *field(const char *doc, const char *name, char *buf, size_t size)
{
        struct json_object *o = json_tokener_parse(doc), *v = NULL;

        buf[0] = '\0';
        if (o && json_object_object_get_ex(o, name, &v))
                (void)snprintf(buf, size, "%s", json_object_get_string(v));
        json_object_put(o);
        return buf;
}

/* Unpack then activate; returns the origin id. */
static uint32_t unpack_and_activate(struct env *e, const char *image_id, struct stage_result *act)
{
        struct stage_result res;
        char json[1024], dev[16], name[64];

        unpack_json(image_id, json, sizeof(json));
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &res), 0);
        if (res.outcome != FSM_OUTCOME_COMPLETE)
                fail_msg("unpack %s: %s %s", image_id, fsm_outcome_name(res.outcome),
                         res.error_text);
        field(res.response, "device_id", dev, sizeof(dev));
        field(res.response, "device_name", name, sizeof(name));
        stage_result_done(&res);
        (void)snprintf(json, sizeof(json),
                       "{\"image_id\":\"%s\",\"device_id\":\"%s\",\"device_name\":\"%s\"}",
                       image_id, dev, name);
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_ACTIVATE, json, act), 0);
        if (act->outcome != FSM_OUTCOME_COMPLETE)
                fail_msg("activate %s: %s %s", image_id, fsm_outcome_name(act->outcome),
                         act->error_text);
        return (uint32_t)strtoul(dev, NULL, 10);
}

static long scalar(struct db *db, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static long scalar(struct db *db, const char *fmt, ...)
{
        char sql[512];
        va_list ap;

        va_start(ap, fmt);
        (void)vsnprintf(sql, sizeof(sql), fmt, ap);
        va_end(ap);
        return pg_test_scalar(db, sql);
}

/* The pool's ids must be exactly the rows' ids: nothing leaked, nothing lost. */
static void assert_pool_matches_rows(struct env *e)
{
        uint32_t *ids = NULL;
        size_t n = 0;

        assert_int_equal(thin_pool_metadata_thin_ids(POOL, &ids, &n), 0);
        assert_int_equal((long)n, scalar(e->db, "SELECT count(*) FROM thin_devices"));
        for (size_t i = 0; i < n; i++)
                assert_int_equal(
                        scalar(e->db,
                               "SELECT count(*) FROM thin_devices WHERE device_id = %" PRIu32
                               " AND state = 'ready'",
                               ids[i]),
                        1);
        free(ids);
}

static void test_stages_unpack_activate_realistic_image(void **state)
{
        struct env *e = *state;
        struct stage_result act, again;
        char json[1024], path[128], buf[256];
        uint32_t origin;

        make_rootfs_tar("alpine-1", "");
        origin = unpack_and_activate(e, "alpine-1", &act);
        assert_string_equal(field(act.response, "snapshot_name", buf, sizeof(buf)),
                            "snapshot-alpine-1");
        assert_string_equal(field(act.response, "device_path", buf, sizeof(buf)),
                            "/dev/mapper/snapshot-alpine-1");
        assert_string_equal(field(act.response, "activated", buf, sizeof(buf)), "true");
        stage_result_done(&act);
        assert_int_equal(access("/dev/mapper/snapshot-alpine-1", F_OK), 0);
        (void)snprintf(path, sizeof(path), "/dev/mapper/thin-%" PRIu32, origin);
        assert_int_equal(access(path, F_OK), 0);

        /* The snapshot holds the image: compare with the source tree. */
        sh("mkdir -p /tmp/snapmnt && mount -o ro /dev/mapper/snapshot-alpine-1 /tmp/snapmnt &&"
           " diff -r --no-dereference /tmp/src-alpine-1 /tmp/snapmnt -x lost+found &&"
           " test \"$(readlink /tmp/snapmnt/bin/true)\" = /usr/bin/true &&"
           " test \"$(stat -c %a /tmp/snapmnt/usr/bin/passwd)\" = 4755 &&"
           " test \"$(stat -c %a /tmp/snapmnt/var/empty)\" = 555 &&"
           " test \"$(stat -c %i /tmp/snapmnt/usr/bin/true)\" = \"$(stat -c %i /tmp/snapmnt/usr/lib/true-hardlink)\" &&"
           " grep -q 'Test Linux alpine-1' /tmp/snapmnt/etc/os-release; rc=$?; umount /tmp/snapmnt; exit $rc");

        /* Repeats do nothing and say so. */
        unpack_json("alpine-1", json, sizeof(json));
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &again), 0);
        assert_int_equal(again.outcome, FSM_OUTCOME_ALREADY_COMPLETE);
        assert_string_equal(field(again.response, "unpacked", buf, sizeof(buf)), "false");
        stage_result_done(&again);
        (void)snprintf(json, sizeof(json),
                       "{\"image_id\":\"alpine-1\",\"device_id\":\"%" PRIu32
                       "\",\"device_name\":\"thin-%" PRIu32 "\"}",
                       origin, origin);
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_ACTIVATE, json, &again), 0);
        assert_int_equal(again.outcome, FSM_OUTCOME_ALREADY_COMPLETE);
        assert_string_equal(field(again.response, "activated", buf, sizeof(buf)), "false");
        stage_result_done(&again);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM fsm_runs"), 2);
        assert_int_equal(
                scalar(e->db, "SELECT count(*) FROM outbox WHERE topic = 'images.activate'"), 1);
        assert_pool_matches_rows(e);

        /* list-snapshots shows the database's state next to the kernel's. */
        {
                const char *argv[] = {FIM_BINARY_DIR "/flyio-image-manager",
                                      "--set",
                                      NULL,
                                      "--set",
                                      "HOST_ID=vm-host",
                                      "list-snapshots",
                                      NULL};
                char set_db[600], out[2048];

                (void)snprintf(set_db, sizeof(set_db), "DATABASE_URL=%s", e->url);
                argv[2] = set_db;
                if (spawn_run(argv, out, sizeof(out)) < 0)
                        fail_msg("list-snapshots: %s", err_last());
                if (!strstr(out, "snapshot-alpine-1") || !strstr(out, "active  ") ||
                    strstr(out, "missing"))
                        fail_msg("list-snapshots output: %s", out);
        }

        /* gc removes snapshot, origin and tarball, and the pool is empty again. */
        {
                const char *argv[] = {FIM_BINARY_DIR "/flyio-image-manager",
                                      "--set",
                                      NULL,
                                      "--set",
                                      "LOCAL_DIR=" LOCAL,
                                      "--set",
                                      "POOL_NAME=" POOL,
                                      "--set",
                                      "HOST_ID=vm-host",
                                      "gc",
                                      "--image-id",
                                      "alpine-1",
                                      NULL};
                char set_db[600], out[2048];

                (void)snprintf(set_db, sizeof(set_db), "DATABASE_URL=%s", e->url);
                argv[2] = set_db;
                if (spawn_run(argv, out, sizeof(out)) < 0)
                        fail_msg("gc: %s", err_last());
        }
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 0);
        assert_int_equal(access("/dev/mapper/snapshot-alpine-1", F_OK), -1);
        assert_int_equal(access(LOCAL "/alpine-1.tar", F_OK), -1);
        assert_pool_matches_rows(e);
}

static void test_stages_identical_content_shares_one_origin(void **state)
{
        struct env *e = *state;
        struct stage_result a, b;
        char buf[64];
        uint32_t oa, ob;

        make_rootfs_tar("img-a", "");
        sh("cp " LOCAL "/img-a.tar " LOCAL "/img-b.tar");
        oa = unpack_and_activate(e, "img-a", &a);
        ob = unpack_and_activate(e, "img-b", &b);
        assert_int_equal(oa, ob);
        assert_string_not_equal(field(a.response, "snapshot_id", buf, sizeof(buf)),
                                field(b.response, "snapshot_id", buf + 32, 32));
        stage_result_done(&a);
        stage_result_done(&b);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices WHERE kind = 'origin'"),
                         1);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM snapshots WHERE state = 'active'"), 2);
        assert_pool_matches_rows(e);
}

static void test_stages_hostile_tarball_leaves_pool_unchanged(void **state)
{
        struct env *e = *state;
        struct stage_result res;
        struct thin_pool_status before, after;
        char json[1024];

        make_rootfs_tar("good", "");
        {
                struct stage_result act;

                (void)unpack_and_activate(e, "good", &act);
                stage_result_done(&act);
        }
        assert_int_equal(thin_pool_status(POOL, &before), 0);
        sh("python3 -c \"import tarfile,io\n"
           "t=tarfile.open('" LOCAL "/evil.tar','w')\n"
           "i=tarfile.TarInfo('etc'); i.type=tarfile.DIRTYPE; t.addfile(i)\n"
           "i=tarfile.TarInfo('escape'); i.type=tarfile.SYMTYPE; i.linkname='/etc'; t.addfile(i)\n"
           "d=b'root::0:0::/:/bin/sh\\\\n'; i=tarfile.TarInfo('escape/passwd'); i.size=len(d);"
           " t.addfile(i, io.BytesIO(d))\n"
           "t.close()\"");
        unpack_json("evil", json, sizeof(json));
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_FAILED);
        assert_string_equal(res.error_class, STAGE_ERROR_PERMANENT);
        assert_non_null(strstr(res.error_text, "escape"));
        stage_result_done(&res);
        assert_int_equal(thin_pool_status(POOL, &after), 0);
        assert_true(after.transaction_id == before.transaction_id);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 2);
        assert_pool_matches_rows(e);
}

static void test_stages_pool_limits(void **state)
{
        struct env *e = *state;
        struct stage_result res, act;
        char json[1024];

        make_rootfs_tar("first", "");
        (void)unpack_and_activate(e, "first", &act);
        stage_result_done(&act);

        /* Above the high-water mark: refused before anything is allocated. */
        assert_int_equal(config_set(&e->cfg, "POOL_HIGH_WATER_PERCENT", "1", CONFIG_SOURCE_FLAG),
                         0);
        make_rootfs_tar("second", "");
        unpack_json("second", json, sizeof(json));
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_FAILED);
        assert_int_equal(res.error, -ENOSPC);
        assert_non_null(strstr(res.error_text, "high-water mark"));
        stage_result_done(&res);
        assert_pool_matches_rows(e);

        /* An image larger than its pool: the pool fills up, the error says so, the device
         * goes. A pool of its own keeps guest memory (its /tmp) small. */
        {
                struct pool_setup_opts o = POOL_SETUP_OPTS_INIT;

                o.name = "fimsmallpool";
                o.dir = POOL_DIR "-small";
                o.data_size = 64ULL << 20;
                o.error_if_no_space = true;
                assert_true(pool_setup_create(&o, NULL) >= 0);
        }
        assert_int_equal(config_set(&e->cfg, "POOL_HIGH_WATER_PERCENT", "90", CONFIG_SOURCE_FLAG),
                         0);
        assert_int_equal(config_set(&e->cfg, "POOL_NAME", "fimsmallpool", CONFIG_SOURCE_FLAG), 0);
        make_rootfs_tar("huge", "&& head -c 120000000 /dev/urandom > usr/lib/huge");
        sh("rm -rf /tmp/src-huge");
        unpack_json("huge", json, sizeof(json));
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_FAILED);
        if (!strstr(res.error_text, "ran out of data space"))
                fail_msg("unexpected error: %s", res.error_text);
        stage_result_done(&res);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices WHERE pool_name ="
                                       " 'fimsmallpool'"),
                         0);
        {
                uint32_t *ids = NULL;
                size_t n = 0;

                assert_int_equal(thin_pool_metadata_thin_ids("fimsmallpool", &ids, &n), 0);
                assert_int_equal((int)n, 0);
                free(ids);
        }
        assert_int_equal(config_set(&e->cfg, "POOL_NAME", POOL, CONFIG_SOURCE_FLAG), 0);
        assert_true(pool_setup_teardown("fimsmallpool", POOL_DIR "-small", true, NULL) >= 0);
        assert_pool_matches_rows(e);
}

/* Fork a process that runs @stage and is killed once @transition has started. */
static void kill_during(struct env *e, enum stage_id stage, const char *json,
                        const char *transition)
{
        pid_t pid = fork();
        int64_t deadline = util_now_monotonic_ms() + 120000;
        int status;

        assert_true(pid >= 0);
        if (pid == 0) {
                struct db *db = NULL;
                struct lease_keeper *leases = NULL;
                struct stage_result res;

                if (db_connect(e->url, &db) < 0 || lease_keeper_new(e->url, 2000, &leases) < 0)
                        _exit(100);
                (void)run_stage(e, db, leases, stage, json, &res);
                _exit(0);
        }
        while (scalar(e->db,
                      "SELECT count(*) FROM fsm_events WHERE kind = 'transition_start' AND"
                      " transition = '%s'",
                      transition) == 0) {
                assert_true(util_now_monotonic_ms() < deadline);
                assert_int_equal(waitpid(pid, &status, WNOHANG), 0);
                util_sleep_ms(10);
        }
        assert_int_equal(kill(pid, SIGKILL), 0);
        assert_int_equal(waitpid(pid, &status, 0), pid);
}

static void resume_until_done(struct env *e, enum stage_id stage, const char *json,
                              struct stage_result *res)
{
        int64_t deadline = util_now_monotonic_ms() + 60000;

        for (;;) {
                assert_int_equal(run_stage(e, e->db, e->leases, stage, json, res), 0);
                if (res->outcome != FSM_OUTCOME_BUSY)
                        break;
                stage_result_done(res);
                assert_true(util_now_monotonic_ms() < deadline);
                util_sleep_ms(300);
        }
        if (res->outcome != FSM_OUTCOME_COMPLETE)
                fail_msg("resume: %s %s", fsm_outcome_name(res->outcome), res->error_text);
}

static void test_stages_sigkill_during_unpack_and_activate(void **state)
{
        struct env *e = *state;
        struct stage_result res;
        char json[1024], dev[16], name[64];

        make_rootfs_tar(
                "crashy",
                "&& for i in $(seq 1 40); do head -c 1000000 /dev/urandom > usr/lib/f$i; done");
        unpack_json("crashy", json, sizeof(json));
        kill_during(e, STAGE_UNPACK, json, "extract");
        resume_until_done(e, STAGE_UNPACK, json, &res);
        field(res.response, "device_id", dev, sizeof(dev));
        field(res.response, "device_name", name, sizeof(name));
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM fsm_events WHERE kind = 'resume'"), 1);
        stage_result_done(&res);
        assert_pool_matches_rows(e);

        (void)snprintf(json, sizeof(json),
                       "{\"image_id\":\"crashy\",\"device_id\":\"%s\",\"device_name\":\"%s\"}", dev,
                       name);
        kill_during(e, STAGE_ACTIVATE, json, "create_snapshot");
        resume_until_done(e, STAGE_ACTIVATE, json, &res);
        stage_result_done(&res);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM fsm_runs WHERE status = 'complete'"),
                         2);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 2);
        assert_int_equal(access("/dev/mapper/snapshot-crashy", F_OK), 0);
        assert_pool_matches_rows(e);
}

/* Run @stage in a child that kills itself at crash point @point; it must die there. */
static void crash_at(struct env *e, enum stage_id stage, const char *json, const char *point)
{
        pid_t pid = fork();
        int status;

        assert_true(pid >= 0);
        if (pid == 0) {
                struct db *db = NULL;
                struct lease_keeper *leases = NULL;
                struct stage_result res;

                setenv("FIM_CRASH_AT", point, 1);
                if (db_connect(e->url, &db) < 0 || lease_keeper_new(e->url, 2000, &leases) < 0)
                        _exit(100);
                (void)run_stage(e, db, leases, stage, json, &res);
                _exit(0);
        }
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
                fail_msg("child did not die at crash point '%s' (status %d)", point, status);
}

/*
 * A crash between the intent row and the dm message, and between the message and the
 * result, for create_thin and create_snap: the rerun completes the job, and the pool and
 * the rows agree (no leaked id, no orphan device).
 */
static void test_stages_crash_between_intent_and_result(void **state)
{
        static const char *const unpack_points[] = {"unpack.after_intent",
                                                    "unpack.after_create_thin"};
        static const char *const activate_points[] = {"activate.after_intent",
                                                      "activate.after_create_snap"};
        struct env *e = *state;

        for (int i = 0; i < 2; i++) {
                struct stage_result res;
                char image[32], json[1024], dev[16], name[64];

                (void)snprintf(image, sizeof(image), "crashpoint-%d", i);
                make_rootfs_tar(image, "");
                unpack_json(image, json, sizeof(json));
                crash_at(e, STAGE_UNPACK, json, unpack_points[i]);
                resume_until_done(e, STAGE_UNPACK, json, &res);
                field(res.response, "device_id", dev, sizeof(dev));
                field(res.response, "device_name", name, sizeof(name));
                stage_result_done(&res);
                assert_pool_matches_rows(e);

                (void)snprintf(json, sizeof(json),
                               "{\"image_id\":\"%s\",\"device_id\":\"%s\",\"device_name\":\"%s\"}",
                               image, dev, name);
                crash_at(e, STAGE_ACTIVATE, json, activate_points[i]);
                resume_until_done(e, STAGE_ACTIVATE, json, &res);
                stage_result_done(&res);
                assert_pool_matches_rows(e);
        }
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 4);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM snapshots WHERE state = 'active'"), 2);
}

/* A crash inside a delete (gc): reconciliation finishes it. */
static void test_stages_crash_during_delete(void **state)
{
        static const char *const points[] = {"destroy.after_intent", "destroy.after_delete"};
        struct env *e = *state;

        for (int i = 0; i < 2; i++) {
                struct stage_result act;
                char image[32];
                pid_t pid;
                int status;

                (void)snprintf(image, sizeof(image), "deleted-%d", i);
                make_rootfs_tar(image, "");
                (void)unpack_and_activate(e, image, &act);
                stage_result_done(&act);
                pid = fork();
                assert_true(pid >= 0);
                if (pid == 0) {
                        struct db *db = NULL;

                        setenv("FIM_CRASH_AT", points[i], 1);
                        if (db_connect(e->url, &db) < 0)
                                _exit(100);
                        (void)thin_registry_destroy(db, "vm-host", POOL,
                                                    (uint32_t)scalar(db, "SELECT device_id FROM"
                                                                         " snapshots LIMIT 1"));
                        _exit(0);
                }
                assert_int_equal(waitpid(pid, &status, 0), pid);
                assert_true(WIFSIGNALED(status));
                assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices WHERE"
                                               " state = 'deleting'"),
                                 1);
                assert_int_equal(thin_registry_reconcile(e->db, "vm-host", POOL, true, NULL, NULL),
                                 0);
                assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices WHERE"
                                               " state = 'deleting'"),
                                 0);
                assert_int_equal(scalar(e->db, "SELECT count(*) FROM snapshots"), 0);
                assert_pool_matches_rows(e);
        }
}

static void test_stages_reconcile_repairs_what_is_safe(void **state)
{
        struct env *e = *state;
        uint32_t *ids = NULL;
        size_t n = 0;
        int r;

        /* A half-made device of a run that failed, and an id nobody recorded. */
        assert_int_equal(
                db_exec_script(e->db,
                               "INSERT INTO fsm_runs (run_id, fsm, host_id, idempotency_key,"
                               " request, state, status, max_attempts) VALUES"
                               " ('01JAAAAAAAAAAAAAAAAAAAAAAA', 'unpack', 'vm-host', 'k',"
                               " '{}', 'create_device', 'failed', 3);"
                               "INSERT INTO thin_devices (host_id, pool_name, device_id, kind,"
                               " state, size_bytes, checksum, run_id) VALUES ('vm-host', '" POOL
                               "', 7, 'origin', 'creating', 268435456, 'abc',"
                               " '01JAAAAAAAAAAAAAAAAAAAAAAA')"),
                0);
        assert_int_equal(thin_pool_create_thin(POOL, 7), 0);
        assert_int_equal(thin_pool_create_thin(POOL, 500), 0);

        r = thin_registry_reconcile(e->db, "vm-host", POOL, false, NULL, NULL);
        assert_int_equal(r, 2);
        r = thin_registry_reconcile(e->db, "vm-host", POOL, true, NULL, NULL);
        assert_int_equal(r, 0);
        assert_int_equal(thin_pool_metadata_thin_ids(POOL, &ids, &n), 0);
        assert_int_equal((int)n, 1);
        assert_int_equal(ids[0], 500);
        free(ids);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices WHERE device_id = 500"
                                       " AND kind = 'unknown'"),
                         1);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices WHERE device_id = 7"), 0);
        assert_int_equal(thin_registry_reconcile(e->db, "vm-host", POOL, false, NULL, NULL), 0);
        assert_int_equal(thin_pool_delete(POOL, 500), 0);
}

static void test_stages_reactivate_after_reboot(void **state)
{
        struct env *e = *state;
        struct stage_result act;
        char origin_name[32];
        uint32_t origin;

        make_rootfs_tar("rebooted", "");
        origin = unpack_and_activate(e, "rebooted", &act);
        stage_result_done(&act);
        thin_registry_origin_name(origin, origin_name, sizeof(origin_name));
        /* What a reboot does to device-mapper: every device is gone, the pool's data stays. */
        assert_int_equal(thin_pool_deactivate("snapshot-rebooted", NULL), 0);
        assert_int_equal(thin_pool_deactivate(origin_name, NULL), 0);
        assert_int_equal(thin_registry_reactivate(e->db, "vm-host", POOL, NULL, NULL), 2);
        assert_int_equal(access("/dev/mapper/snapshot-rebooted", F_OK), 0);
        sh("mkdir -p /tmp/snapmnt && mount -o ro /dev/mapper/snapshot-rebooted /tmp/snapmnt &&"
           " grep -q 'Test Linux rebooted' /tmp/snapmnt/etc/os-release; rc=$?;"
           " umount /tmp/snapmnt; exit $rc");
        /* A second call finds everything active. */
        assert_int_equal(thin_registry_reactivate(e->db, "vm-host", POOL, NULL, NULL), 0);
        assert_pool_matches_rows(e);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_stages_unpack_activate_realistic_image, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_stages_identical_content_shares_one_origin,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(test_stages_hostile_tarball_leaves_pool_unchanged,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(test_stages_pool_limits, setup, teardown),
                cmocka_unit_test_setup_teardown(test_stages_sigkill_during_unpack_and_activate,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(test_stages_reconcile_repairs_what_is_safe, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_stages_reactivate_after_reboot, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_stages_crash_between_intent_and_result, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_stages_crash_during_delete, setup, teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
