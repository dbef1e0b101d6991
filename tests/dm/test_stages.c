/*
 * The unpack and activate stages against a real kernel thin pool (inside the test VM) and a
 * real PostgreSQL on the host (reached through the VM's forwarded port): a realistic root
 * filesystem end to end, compared file by file on the mounted snapshot with GNU tar's
 * extraction of the same tarball, idempotent repeats, images sharing one origin (also when
 * several processes unpack the same content at once), a re-pushed image id, hostile and
 * corrupt tarballs that leave the pool and device-mapper as they were, a pool above its
 * high-water mark, a pool that runs out of space, SIGKILL during unpack and activate and at
 * each crash point (between intent and result, inside the dm create and create_snap
 * sequences) with resume, runs resumed after their device vanished, and runs killed there
 * that never resume (aborted, out of attempts, killed after recording their failure),
 * reconciliation (of half-made devices, unknown ids, resumable runs, suspended origins, every
 * pool the rows name, and racing with deletes and with other processes), a snapshot id the
 * pool has but the database does not, verify-system on a stalled run and a second pool, id
 * allocation by several processes, list-snapshots' kernel view, gc (also of a snapshot in
 * use; --all-unreferenced, also racing with unpacks that share an origin), and an unpack
 * mount that must not propagate to a peer of a shared /run.
 *
 * After each step the pool, the rows and device-mapper must agree exactly: no leaked id, no
 * orphan device (assert_pool_matches_rows).
 */
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
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
#include "worker/commands.h"
#include "worker/lease.h"
#include "worker/reconcile.h"
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

        /* A failed case may leave mounts that would keep the pool busy for the next one. */
        sh("for m in /tmp/snapmnt /tmp/busymnt /tmp/originmnt /tmp/fim-rootfs"
           " /run/flyio-image-manager/mnt-*; do umount -l \"$m\" 2>/dev/null || true; done");
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

/*
 * Run the command line with this test's settings (database, LOCAL_DIR, POOL_NAME, HOST_ID)
 * and @args (NULL-terminated). Returns spawn_run()'s result; @out gets the output.
 */
static int run_cli(struct env *e, const char *const *args, char *out, size_t size)
{
        const char *argv[24] = {FIM_BINARY_DIR "/flyio-image-manager",
                                "--set",
                                NULL,
                                "--set",
                                "LOCAL_DIR=" LOCAL,
                                "--set",
                                "POOL_NAME=" POOL,
                                "--set",
                                "HOST_ID=vm-host"};
        char set_db[600];
        size_t n = 9;

        (void)snprintf(set_db, sizeof(set_db), "DATABASE_URL=%s", e->url);
        argv[2] = set_db;
        for (size_t i = 0; args[i]; i++) {
                assert_true(n < ARRAY_SIZE(argv) - 1);
                argv[n++] = args[i];
        }
        argv[n] = NULL;
        return spawn_run(argv, out, size);
}

/* verify-system without the checks of services the VM cannot reach. */
static int run_verify(struct env *e, char *out, size_t size)
{
        return run_cli(e, (const char *const[]){"verify-system", "--skip", "s3,kafka,disk", NULL},
                       out, size);
}

/* Whether verify-system's @out has a line of @status for @check whose detail starts so. */
static bool has_line(const char *out, const char *status, const char *check, const char *detail)
{
        char want[256];

        (void)snprintf(want, sizeof(want), "%-4s  %-14s %s", status, check, detail);
        return strstr(out, want) != NULL;
}

/* The "kernel" field list-snapshots --json gives snapshot @name ("" when it is not listed). */
static const char *kernel_state(struct env *e, const char *name, char *buf, size_t size)
{
        struct json_object *arr = NULL, *v = NULL;
        char out[8192];

        buf[0] = '\0';
        if (run_cli(e, (const char *const[]){"list-snapshots", "--json", NULL}, out, sizeof(out)) <
            0)
                fail_msg("list-snapshots: %s", err_last());
        arr = json_tokener_parse(out);
        if (!arr || !json_object_is_type(arr, json_type_array))
                fail_msg("list-snapshots --json: not a JSON array: %s", out);
        for (size_t i = 0; i < json_object_array_length(arr); i++) {
                struct json_object *o = json_object_array_get_idx(arr, i);

                if (json_object_object_get_ex(o, "snapshot_name", &v) &&
                    strcmp(json_object_get_string(v), name) == 0 &&
                    json_object_object_get_ex(o, "kernel", &v))
                        (void)snprintf(buf, size, "%s", json_object_get_string(v));
        }
        json_object_put(arr);
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
        char sql[1024];
        va_list ap;

        va_start(ap, fmt);
        (void)vsnprintf(sql, sizeof(sql), fmt, ap);
        va_end(ap);
        return pg_test_scalar(db, sql);
}

/* Run a shell command and keep its output (stdout and stderr, the last @size - 1 bytes). */
static void sh_out(const char *cmd, char *out, size_t size)
{
        const char *argv[] = {"/bin/sh", "-ec", cmd, NULL};

        if (spawn_run(argv, out, size) < 0)
                fail_msg("%s: %s", cmd, err_last());
}

/* Every dm device name, sorted, one per line (what the kernel has, not what we think). */
static void dm_names(char *buf, size_t size)
{
        sh_out("dmsetup ls | awk '$1 != \"No\" {print $1}' | sort", buf, size);
}

/* Whether @name is one of the newline-terminated lines of @lines. */
static bool lines_contain(const char *lines, const char *name)
{
        size_t n = strlen(name);

        for (const char *p = lines; *p; p += strcspn(p, "\n") + 1) {
                if (strncmp(p, name, n) == 0 && p[n] == '\n')
                        return true;
                if (!strchr(p, '\n'))
                        break;
        }
        return false;
}

/*
 * @pool's ids must be exactly its rows' ids, and device-mapper must hold exactly the devices
 * the rows say are active on it, each under its recorded name, live and not suspended. The
 * names found are appended to @listed, one per line.
 */
static void assert_one_pool_matches_rows(struct env *e, const char *pool, char *listed, size_t size)
{
        struct thin_pool_active_thin *devs = NULL;
        uint32_t *ids = NULL;
        size_t n = 0, ndevs = 0;

        assert_int_equal(thin_pool_metadata_thin_ids(pool, &ids, &n), 0);
        assert_int_equal(
                (long)n,
                scalar(e->db, "SELECT count(*) FROM thin_devices WHERE pool_name = '%s'", pool));
        for (size_t i = 0; i < n; i++)
                assert_int_equal(
                        scalar(e->db,
                               "SELECT count(*) FROM thin_devices WHERE device_id = %" PRIu32
                               " AND state = 'ready' AND pool_name = '%s'",
                               ids[i], pool),
                        1);
        free(ids);

        assert_int_equal(thin_pool_list_thin_ids(pool, &devs, &ndevs), 0);
        for (size_t i = 0; i < ndevs; i++) {
                size_t len = strlen(listed);

                if (devs[i].suspended)
                        fail_msg("device '%s' is left suspended", devs[i].name);
                if (scalar(e->db,
                           "SELECT count(*) FROM thin_devices d WHERE device_id = %" PRIu32
                           " AND state = 'ready' AND pool_name = '%s' AND ((kind = 'origin' AND"
                           " 'thin-' || device_id = '%s') OR (kind = 'snapshot' AND EXISTS"
                           " (SELECT 1 FROM snapshots s WHERE s.device_id = d.device_id AND"
                           " s.snapshot_name = '%s' AND s.state = 'active')))",
                           devs[i].dev_id, pool, devs[i].name, devs[i].name) != 1)
                        fail_msg("device '%s' (thin id %" PRIu32 ") is not what the rows record",
                                 devs[i].name, devs[i].dev_id);
                (void)snprintf(listed + len, size - len, "%s\n", devs[i].name);
        }
        assert_int_equal((long)ndevs,
                         scalar(e->db,
                                "SELECT (SELECT count(*) FROM thin_devices WHERE"
                                " kind = 'origin' AND state = 'ready' AND pool_name = '%s') +"
                                " (SELECT count(*) FROM snapshots WHERE state = 'active' AND"
                                " pool_name = '%s')",
                                pool, pool));
        free(devs);
}

/*
 * Every pool (POOL and any other the rows name) must match its rows, and no device of our
 * naming may exist that is not a live thin device the rows record: nothing leaked, nothing
 * lost, no orphan or half-made device.
 */
static void assert_pool_matches_rows(struct env *e)
{
        char listed[8192] = "", names[8192];
        PGresult *res = NULL;

        assert_int_equal(db_exec(e->db, &res,
                                 "SELECT pool_name FROM thin_devices UNION SELECT '" POOL "'"
                                 " ORDER BY 1",
                                 0, NULL),
                         0);
        for (int i = 0; i < PQntuples(res); i++)
                assert_one_pool_matches_rows(e, db_get(res, i, 0), listed, sizeof(listed));
        PQclear(res);

        dm_names(names, sizeof(names));
        for (char *line = names, *end; *line; line = end) {
                end = line + strcspn(line, "\n");
                if (*end)
                        *end++ = '\0';
                if (strncmp(line, "thin-", 5) != 0 && strncmp(line, "snapshot-", 9) != 0)
                        continue;
                if (!lines_contain(listed, line))
                        fail_msg("orphan device-mapper device '%s'", line);
        }
}

/* What a failed unpack must leave as it was: the pool's ids and every dm device. */
struct pool_view {
        uint32_t *ids;
        size_t n;
        char names[8192];
};

static void pool_view_take(struct pool_view *v)
{
        assert_int_equal(thin_pool_metadata_thin_ids(POOL, &v->ids, &v->n), 0);
        dm_names(v->names, sizeof(v->names));
}

static void pool_view_assert_same(struct pool_view *before, struct pool_view *after)
{
        assert_int_equal((long)before->n, (long)after->n);
        for (size_t i = 0; i < before->n; i++)
                assert_int_equal(before->ids[i], after->ids[i]);
        assert_string_equal(before->names, after->names);
        free(after->ids);
        after->ids = NULL;
}

#define ROOTFS_COMPARE FIM_SOURCE_DIR "/tests/extract/rootfs_compare.sh"
#define ROOTFS_WORK "/tmp/fim-rootfs"

static void test_stages_unpack_activate_realistic_image(void **state)
{
        struct env *e = *state;
        struct stage_result act, again;
        char json[1024], path[128], buf[256];
        uint32_t origin;

        /*
         * The extraction suite's realistic root filesystem (setuid files, capabilities and
         * user xattrs, hardlinks, absolute and dangling symlinks, sparse files, odd modes and
         * owners, fixed mtimes, devices we skip), and GNU tar's extraction of it to compare
         * the snapshot with. Built on ext4: the guest's tmpfs keeps no user xattrs.
         */
        sh("mkdir -p " ROOTFS_WORK " && truncate -s 512M /tmp/fim-rootfs.img &&"
           " mkfs.ext4 -q -F /tmp/fim-rootfs.img && mount -o loop /tmp/fim-rootfs.img " ROOTFS_WORK
           " && bash " ROOTFS_COMPARE " --build " ROOTFS_WORK " >/dev/null &&"
           " cp " ROOTFS_WORK "/rootfs.tar " LOCAL "/alpine-1.tar");
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

        /*
         * The snapshot holds the image: owners, modes, mtimes, xattrs, link targets, hardlink
         * groups and contents as GNU tar extracts them.
         */
        sh_out("mkdir -p /tmp/snapmnt && mount -o ro /dev/mapper/snapshot-alpine-1 /tmp/snapmnt &&"
               " bash " ROOTFS_COMPARE " --compare " ROOTFS_WORK " /tmp/snapmnt; rc=$?;"
               " umount /tmp/snapmnt; exit $rc",
               buf, sizeof(buf));
        if (!strstr(buf, "rootfs_compare: identical"))
                fail_msg("rootfs_compare said: %s", buf);
        sh("umount " ROOTFS_WORK " && rm -rf " ROOTFS_WORK " /tmp/fim-rootfs.img");

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

        /*
         * list-snapshots shows the kernel's view next to the database's: active, then missing
         * once the device is removed behind the tool's back.
         */
        assert_string_equal(kernel_state(e, "snapshot-alpine-1", buf, sizeof(buf)), "active");
        assert_int_equal(thin_pool_deactivate("snapshot-alpine-1", NULL), 0);
        assert_string_equal(kernel_state(e, "snapshot-alpine-1", buf, sizeof(buf)), "missing");

        /* gc removes snapshot, origin and tarball, and the pool is empty again. */
        if (run_cli(e, (const char *const[]){"gc", "--image-id", "alpine-1", NULL}, buf,
                    sizeof(buf)) < 0)
                fail_msg("gc: %s", err_last());
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

/* Unpack @image_id; it must fail permanently with @needle in its error. */
static void unpack_must_fail(struct env *e, const char *image_id, const char *needle)
{
        struct stage_result res;
        char json[1024];

        unpack_json(image_id, json, sizeof(json));
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &res), 0);
        if (res.outcome != FSM_OUTCOME_FAILED || !strstr(res.error_text, needle))
                fail_msg("unpack of '%s': %s, error '%s' (expected one with '%s')", image_id,
                         fsm_outcome_name(res.outcome), res.error_text, needle);
        assert_string_equal(res.error_class, STAGE_ERROR_PERMANENT);
        stage_result_done(&res);
}

/*
 * Hostile and corrupt tarballs fail permanently and leave the pool's thin ids and every dm
 * device exactly as they were.
 */
static void test_stages_hostile_tarball_leaves_pool_unchanged(void **state)
{
        struct env *e = *state;
        struct pool_view before, after;

        make_rootfs_tar("good", "");
        {
                struct stage_result act;

                (void)unpack_and_activate(e, "good", &act);
                stage_result_done(&act);
        }
        pool_view_take(&before);

        sh("python3 -c \"import tarfile,io\n"
           "t=tarfile.open('" LOCAL "/evil.tar','w')\n"
           "i=tarfile.TarInfo('etc'); i.type=tarfile.DIRTYPE; t.addfile(i)\n"
           "i=tarfile.TarInfo('escape'); i.type=tarfile.SYMTYPE; i.linkname='/etc'; t.addfile(i)\n"
           "d=b'root::0:0::/:/bin/sh\\\\n'; i=tarfile.TarInfo('escape/passwd'); i.size=len(d);"
           " t.addfile(i, io.BytesIO(d))\n"
           "t.close()\"");
        unpack_must_fail(e, "evil", "escape");
        pool_view_take(&after);
        pool_view_assert_same(&before, &after);

        /* Cut off in the middle of a file's data, as an interrupted upload leaves it. */
        make_rootfs_tar("cut", "");
        sh("truncate -s 200000 " LOCAL "/cut.tar");
        unpack_must_fail(e, "cut", "failed to unpack image 'cut'");
        pool_view_take(&after);
        pool_view_assert_same(&before, &after);

        /* Not a tarball at all. */
        sh("head -c 300000 /dev/urandom > " LOCAL "/junk.tar");
        unpack_must_fail(e, "junk", "failed to unpack image 'junk'");
        pool_view_take(&after);
        pool_view_assert_same(&before, &after);

        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 2);
        assert_pool_matches_rows(e);
        free(before.ids);
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
        pid_t pid;
        int status;

        (void)fflush(NULL);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                struct db *db = NULL;
                struct lease_keeper *leases = NULL;
                struct stage_result res;

                setenv("FIM_CRASH_AT", point, 1);
                if (db_connect(e->url, &db) < 0 || lease_keeper_new(e->url, 2000, &leases) < 0)
                        _exit(100);
                if (run_stage(e, db, leases, stage, json, &res) == 0)
                        fprintf(stderr, "child survived '%s': %s %s\n", point,
                                fsm_outcome_name(res.outcome), res.error_text);
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

/* Reconciliation findings by kind, and their text. */
struct findings {
        int count[THIN_RECONCILE_STALLED + 1];
        char text[4096];
};

static void collect(enum thin_reconcile_finding what, uint32_t id, const char *detail,
                    void *userdata)
{
        struct findings *f = userdata;
        size_t len = strlen(f->text);

        (void)id;
        f->count[what]++;
        (void)snprintf(f->text + len, sizeof(f->text) - len, "%s\n", detail);
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
        /* The half-made device goes; the unknown id stays, reserved, and is still a problem. */
        r = thin_registry_reconcile(e->db, "vm-host", POOL, true, NULL, NULL);
        assert_int_equal(r, 1);
        assert_int_equal(thin_pool_metadata_thin_ids(POOL, &ids, &n), 0);
        assert_int_equal((int)n, 1);
        assert_int_equal(ids[0], 500);
        free(ids);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices WHERE device_id = 500"
                                       " AND kind = 'unknown'"),
                         1);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices WHERE device_id = 7"), 0);

        /* Reported on every pass, with what to do about it, until an operator acts. */
        for (int pass = 0; pass < 2; pass++) {
                struct findings f = {0};

                assert_int_equal(
                        thin_registry_reconcile(e->db, "vm-host", POOL, pass == 1, collect, &f), 1);
                assert_int_equal(f.count[THIN_RECONCILE_RESERVED_UNKNOWN], 1);
                assert_non_null(strstr(f.text, "thin id 500"));
                assert_non_null(strstr(f.text, "delete 500"));
        }

        /* Once the operator deleted it, its row goes and the id is free again. */
        assert_int_equal(thin_pool_delete(POOL, 500), 0);
        assert_int_equal(thin_registry_reconcile(e->db, "vm-host", POOL, true, NULL, NULL), 0);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 0);
        assert_int_equal(thin_registry_reconcile(e->db, "vm-host", POOL, false, NULL, NULL), 0);
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

/*
 * Run @stage in a child process with its own connections and leases of @lease_ms; it exits 0
 * when the run completed.
 */
static pid_t stage_child_lease(struct env *e, enum stage_id stage, const char *json, int lease_ms)
{
        pid_t pid;

        (void)fflush(NULL);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                struct db *db = NULL;
                struct lease_keeper *leases = NULL;
                struct stage_result res;

                if (db_connect(e->url, &db) < 0 || lease_keeper_new(e->url, lease_ms, &leases) < 0)
                        _exit(100);
                if (run_stage(e, db, leases, stage, json, &res) < 0)
                        _exit(101);
                if (res.outcome != FSM_OUTCOME_COMPLETE) {
                        fprintf(stderr, "child: %s: %s\n", fsm_outcome_name(res.outcome),
                                res.error_text);
                        _exit(1);
                }
                _exit(0);
        }
        return pid;
}

static pid_t stage_child(struct env *e, enum stage_id stage, const char *json)
{
        return stage_child_lease(e, stage, json, 2000);
}

static void wait_ok(pid_t pid, const char *what)
{
        int status;

        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
                fail_msg("%s: child exited with status %d", what, status);
}

/* A killed child may leave its mount of the device behind, in our shared namespace. */
static void umount_leftovers(void)
{
        sh("for m in /run/flyio-image-manager/mnt-*; do [ -d \"$m\" ] || continue;"
           " umount -l \"$m\" 2>/dev/null || true; done");
}

/* The origin of @image_id holds the os-release of the tarball made for image @made_as. */
static void assert_origin_holds_tar_of(struct env *e, const char *image_id, const char *made_as)
{
        char cmd[512];

        (void)snprintf(cmd, sizeof(cmd),
                       "mkdir -p /tmp/originmnt && mount -o ro /dev/mapper/thin-%ld"
                       " /tmp/originmnt && grep -q 'Test Linux %s' /tmp/originmnt/etc/os-release;"
                       " rc=$?; umount /tmp/originmnt; exit $rc",
                       scalar(e->db, "SELECT device_id FROM unpacked_images WHERE image_id = '%s'",
                              image_id),
                       made_as);
        sh(cmd);
}

/* The origin of @image_id holds its tarball's os-release. */
static void assert_origin_holds(struct env *e, const char *image_id)
{
        assert_origin_holds_tar_of(e, image_id, image_id);
}

static int run_gc(struct env *e, const char *image_id, char *out, size_t size)
{
        return run_cli(e, (const char *const[]){"gc", "--image-id", image_id, NULL}, out, size);
}

#define MANY_FILES "&& for i in $(seq 1 40); do head -c 1000000 /dev/urandom > usr/lib/f$i; done"

/*
 * A worker killed mid-extract whose run resumes long after its lease lapsed: reconciliation
 * in between must leave the device of a run that can still resume, and the run completes on
 * its original id.
 */
static void test_stages_resumable_run_survives_reconciliation(void **state)
{
        struct env *e = *state;
        struct stage_result res;
        struct findings f = {0};
        char json[1024], dev[16], out[4096];
        long id;

        make_rootfs_tar("late", MANY_FILES);
        unpack_json("late", json, sizeof(json));
        kill_during(e, STAGE_UNPACK, json, "extract");
        id = scalar(e->db, "SELECT device_id FROM thin_devices WHERE state = 'creating'");
        assert_int_equal(db_exec_script(e->db, "UPDATE fsm_runs SET lease_until = now() -"
                                               " interval '1 day'"),
                         0);
        assert_int_equal(thin_registry_reconcile(e->db, "vm-host", POOL, true, collect, &f), 0);
        assert_int_equal(f.count[THIN_RECONCILE_IN_PROGRESS], 1);
        assert_int_equal(f.count[THIN_RECONCILE_REMOVED_HALF_MADE], 0);
        assert_non_null(strstr(f.text, "lease expired"));
        assert_int_equal(
                scalar(e->db, "SELECT count(*) FROM thin_devices WHERE device_id = %ld", id), 1);

        /*
         * verify-system calls a run that has not come back for longer than UNPACK_TIMEOUT
         * after its lease expired a problem, and says how to finish it.
         */
        if (run_verify(e, out, sizeof(out)) == 0)
                fail_msg("verify-system passed with a stalled run: %s", out);
        if (!has_line(out, "FAIL", "stalled-runs", "") || !strstr(out, "process-image") ||
            !strstr(out, "'late'"))
                fail_msg("verify-system output: %s", out);

        resume_until_done(e, STAGE_UNPACK, json, &res);
        assert_int_equal(strtol(field(res.response, "device_id", dev, sizeof(dev)), NULL, 10), id);
        stage_result_done(&res);
        assert_origin_holds(e, "late");
        assert_pool_matches_rows(e);
        if (run_verify(e, out, sizeof(out)) < 0)
                fail_msg("verify-system: %s", err_last());
        if (!has_line(out, "PASS", "stalled-runs", ""))
                fail_msg("verify-system output: %s", out);
}

/*
 * A run that resumes after its device was removed under it (an operator's gc, or an older
 * version's reconciliation) makes it again instead of failing: in extract, in verify_layout,
 * and a snapshot in activate.
 */
static void test_stages_resume_after_device_vanished(void **state)
{
        struct env *e = *state;
        struct stage_result res;
        char json[1024], dev[16], name[64];

        make_rootfs_tar("gone-1", MANY_FILES);
        unpack_json("gone-1", json, sizeof(json));
        kill_during(e, STAGE_UNPACK, json, "extract");
        umount_leftovers();
        assert_int_equal(thin_registry_destroy(e->db, "vm-host", POOL,
                                               (uint32_t)scalar(e->db, "SELECT device_id FROM"
                                                                       " thin_devices WHERE"
                                                                       " state = 'creating'")),
                         0);
        resume_until_done(e, STAGE_UNPACK, json, &res);
        stage_result_done(&res);
        assert_origin_holds(e, "gone-1");
        assert_pool_matches_rows(e);

        make_rootfs_tar("gone-2", "");
        unpack_json("gone-2", json, sizeof(json));
        crash_at(e, STAGE_UNPACK, json, "unpack.before_verify");
        assert_int_equal(thin_registry_destroy(e->db, "vm-host", POOL,
                                               (uint32_t)scalar(e->db, "SELECT device_id FROM"
                                                                       " thin_devices WHERE"
                                                                       " state = 'creating'")),
                         0);
        resume_until_done(e, STAGE_UNPACK, json, &res);
        field(res.response, "device_id", dev, sizeof(dev));
        field(res.response, "device_name", name, sizeof(name));
        stage_result_done(&res);
        assert_origin_holds(e, "gone-2");
        assert_pool_matches_rows(e);

        (void)snprintf(json, sizeof(json),
                       "{\"image_id\":\"gone-2\",\"device_id\":\"%s\",\"device_name\":\"%s\"}", dev,
                       name);
        crash_at(e, STAGE_ACTIVATE, json, "activate.before_activate");
        assert_int_equal(thin_registry_destroy(e->db, "vm-host", POOL,
                                               (uint32_t)scalar(e->db, "SELECT device_id FROM"
                                                                       " thin_devices WHERE"
                                                                       " kind = 'snapshot'")),
                         0);
        resume_until_done(e, STAGE_ACTIVATE, json, &res);
        stage_result_done(&res);
        sh("mkdir -p /tmp/snapmnt && mount -o ro /dev/mapper/snapshot-gone-2 /tmp/snapmnt &&"
           " grep -q 'Test Linux gone-2' /tmp/snapmnt/etc/os-release; rc=$?;"
           " umount /tmp/snapmnt; exit $rc");
        assert_pool_matches_rows(e);
}

/*
 * Several processes unpack image ids whose tarballs are identical, at once: every run
 * completes (none hits the unique index, none spends its attempts waiting), and they share
 * one origin.
 */
static void test_stages_concurrent_identical_content(void **state)
{
        enum { N = 4 };
        struct env *e = *state;
        char json[N][1024];
        pid_t pids[N];

        make_rootfs_tar("same-0", "&& head -c 40000000 /dev/urandom > usr/lib/big");
        sh("for i in 1 2 3; do cp " LOCAL "/same-0.tar " LOCAL "/same-$i.tar; done");
        for (int i = 0; i < N; i++) {
                char image[16];

                (void)snprintf(image, sizeof(image), "same-%d", i);
                unpack_json(image, json[i], sizeof(json[i]));
        }
        for (int i = 0; i < N; i++)
                pids[i] = stage_child(e, STAGE_UNPACK, json[i]);
        for (int i = 0; i < N; i++)
                wait_ok(pids[i], "unpack of identical content");
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices WHERE kind = 'origin'"),
                         1);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM unpacked_images"), N);
        assert_int_equal(scalar(e->db, "SELECT count(DISTINCT device_id) FROM unpacked_images"), 1);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM fsm_runs WHERE status = 'complete'"),
                         N);
        assert_pool_matches_rows(e);
}

/* An image id pushed again with other content is refused, never answered with the old one. */
static void test_stages_repushed_image_is_refused(void **state)
{
        struct env *e = *state;
        struct stage_result res;
        char json[1024], old_sum[65], new_sum[65], out[2048];

        make_rootfs_tar("repush", "");
        tar_checksum("repush", old_sum);
        unpack_json("repush", json, sizeof(json));
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_COMPLETE);
        stage_result_done(&res);

        make_rootfs_tar("repush", "&& echo v2 > etc/v2");
        tar_checksum("repush", new_sum);
        assert_string_not_equal(old_sum, new_sum);
        unpack_json("repush", json, sizeof(json));
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_FAILED);
        assert_string_equal(res.error_class, STAGE_ERROR_PERMANENT);
        if (!strstr(res.error_text, "image ids are immutable") ||
            !strstr(res.error_text, old_sum) || !strstr(res.error_text, new_sum) ||
            !strstr(res.error_text, "flyio-image-manager gc --image-id repush"))
                fail_msg("unexpected error: %s", res.error_text);
        stage_result_done(&res);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM unpacked_images WHERE checksum = '%s'",
                                old_sum),
                         1);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 1);
        assert_pool_matches_rows(e);

        /* The way out the message gives works. */
        if (run_gc(e, "repush", out, sizeof(out)) < 0)
                fail_msg("gc: %s", err_last());
        make_rootfs_tar("repush", "&& echo v3 > etc/v3");
        unpack_json("repush", json, sizeof(json));
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_COMPLETE);
        stage_result_done(&res);
        assert_origin_holds(e, "repush");
        assert_pool_matches_rows(e);
}

/*
 * gc of an image whose snapshot is in use fails with a message that says so, and changes
 * nothing: the rows stay as they were, so no later reconciliation deletes the snapshot once
 * it is closed.
 */
static void test_stages_gc_of_snapshot_in_use(void **state)
{
        struct env *e = *state;
        struct stage_result act;
        char out[2048];

        make_rootfs_tar("busy", "");
        (void)unpack_and_activate(e, "busy", &act);
        stage_result_done(&act);
        sh("mkdir -p /tmp/busymnt && mount -o ro /dev/mapper/snapshot-busy /tmp/busymnt");
        assert_true(run_gc(e, "busy", out, sizeof(out)) < 0);
        if (!strstr(err_last(), "in use") || !strstr(err_last(), "mounted at '/tmp/busymnt'") ||
            !strstr(err_last(), "run gc again"))
                fail_msg("unexpected gc error: %s", err_last());
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices WHERE state = 'ready'"),
                         2);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM snapshots WHERE state = 'active'"), 1);
        assert_int_equal(access(LOCAL "/busy.tar", F_OK), 0);

        assert_int_equal(thin_registry_reconcile(e->db, "vm-host", POOL, true, NULL, NULL), 0);
        sh("umount /tmp/busymnt");
        assert_int_equal(thin_registry_reconcile(e->db, "vm-host", POOL, true, NULL, NULL), 0);
        assert_int_equal(access("/dev/mapper/snapshot-busy", F_OK), 0);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 2);
        assert_pool_matches_rows(e);

        if (run_gc(e, "busy", out, sizeof(out)) < 0)
                fail_msg("gc: %s", err_last());
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 0);
        assert_pool_matches_rows(e);
}

#define SLOW_DUMP "/tmp/fim-slow-thin-dump"

/*
 * Reconciliation against other processes: several reading the pool's metadata at once
 * (one metadata snapshot per pool), and a delete that lands while it dumps the metadata
 * (the deleted ids must not come back as unknown, reserved forever).
 */
static void test_stages_reconcile_races(void **state)
{
        enum { N = 3 };
        struct env *e = *state;
        struct stage_result act;
        int64_t deadline;
        pid_t pids[N], pid;

        for (int i = 0; i < N; i++) {
                (void)fflush(NULL);
                pids[i] = fork();
                assert_true(pids[i] >= 0);
                if (pids[i] == 0) {
                        for (int k = 0; k < 8; k++) {
                                uint32_t *ids = NULL;
                                size_t n = 0;

                                if (thin_pool_metadata_thin_ids(POOL, &ids, &n) < 0) {
                                        fprintf(stderr, "child: %s\n", err_last());
                                        _exit(1);
                                }
                                free(ids);
                        }
                        _exit(0);
                }
        }
        for (int i = 0; i < N; i++)
                wait_ok(pids[i], "concurrent metadata dumps");

        make_rootfs_tar("racy", "");
        (void)unpack_and_activate(e, "racy", &act);
        stage_result_done(&act);
        sh("rm -f /tmp/fim-dumped /tmp/fim-go && printf '#!/bin/sh\\n"
           "/usr/sbin/thin_dump \"$@\"; rc=$?\\ntouch /tmp/fim-dumped\\n"
           "while [ ! -e /tmp/fim-go ]; do sleep 0.05; done\\nexit $rc\\n' > " SLOW_DUMP
           " && chmod +x " SLOW_DUMP);
        (void)fflush(NULL);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                struct db *db = NULL;
                int r;

                setenv("FIM_THIN_DUMP", SLOW_DUMP, 1);
                if (db_connect(e->url, &db) < 0)
                        _exit(100);
                r = thin_registry_reconcile(db, "vm-host", POOL, true, NULL, NULL);
                if (r != 0)
                        fprintf(stderr, "child: reconcile returned %d: %s\n", r, err_last());
                _exit(r == 0 ? 0 : 1);
        }
        deadline = util_now_monotonic_ms() + 120000;
        while (access("/tmp/fim-dumped", F_OK) < 0) {
                assert_true(util_now_monotonic_ms() < deadline);
                util_sleep_ms(20);
        }
        /* gc of the image, between the dump and the rest of reconciliation. */
        assert_int_equal(thin_registry_destroy(e->db, "vm-host", POOL,
                                               (uint32_t)scalar(e->db, "SELECT device_id FROM"
                                                                       " thin_devices WHERE"
                                                                       " kind = 'snapshot'")),
                         0);
        assert_int_equal(thin_registry_destroy(e->db, "vm-host", POOL,
                                               (uint32_t)scalar(e->db, "SELECT device_id FROM"
                                                                       " thin_devices WHERE"
                                                                       " kind = 'origin'")),
                         0);
        sh("touch /tmp/fim-go");
        wait_ok(pid, "reconcile racing with a delete");
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 0);
        assert_pool_matches_rows(e);
}

/*
 * SIGKILL inside the dm sequences: between creating a device and loading its table, between
 * loading and resuming it (the name is left taken by a device without a table), and inside
 * create_snap with the origin suspended. The rerun completes; reconciliation resumes the
 * suspended origin too.
 */
static void test_stages_crash_inside_dm_sequences(void **state)
{
        static const char *const points[] = {"dm.after_create", "dm.after_load"};
        struct env *e = *state;
        struct thin_pool_device_info d;
        struct stage_result res;
        struct findings f = {0};
        char json[1024], dev[16], name[64];

        for (int i = 0; i < 2; i++) {
                char image[32], thin[32];

                (void)snprintf(image, sizeof(image), "dmcrash-%d", i);
                make_rootfs_tar(image, "");
                unpack_json(image, json, sizeof(json));
                crash_at(e, STAGE_UNPACK, json, points[i]);
                (void)snprintf(thin, sizeof(thin), "thin-%ld",
                               scalar(e->db, "SELECT device_id FROM thin_devices WHERE"
                                             " state = 'creating'"));
                assert_int_equal(thin_pool_device_info(thin, &d), 0);
                assert_true(d.exists);
                assert_int_equal(d.target_count, 0);
                resume_until_done(e, STAGE_UNPACK, json, &res);
                field(res.response, "device_id", dev, sizeof(dev));
                field(res.response, "device_name", name, sizeof(name));
                stage_result_done(&res);
                assert_origin_holds(e, image);
                assert_pool_matches_rows(e);
        }

        (void)snprintf(json, sizeof(json),
                       "{\"image_id\":\"dmcrash-1\",\"device_id\":\"%s\",\"device_name\":\"%s\"}",
                       dev, name);
        crash_at(e, STAGE_ACTIVATE, json, "dm.create_snap.after_suspend");
        assert_int_equal(thin_pool_device_info(name, &d), 0);
        assert_true(d.suspended);
        assert_int_equal(thin_registry_reconcile(e->db, "vm-host", POOL, true, collect, &f), 0);
        assert_int_equal(f.count[THIN_RECONCILE_RESUMED_SUSPENDED], 1);
        assert_int_equal(thin_pool_device_info(name, &d), 0);
        assert_false(d.suspended);

        /* Killed there again (once the dead child's lease is over): the rerun resumes it. */
        assert_int_equal(db_exec_script(e->db, "UPDATE fsm_runs SET lease_until = now()"), 0);
        crash_at(e, STAGE_ACTIVATE, json, "dm.create_snap.after_suspend");
        assert_int_equal(thin_pool_device_info(name, &d), 0);
        assert_true(d.suspended);
        resume_until_done(e, STAGE_ACTIVATE, json, &res);
        stage_result_done(&res);
        assert_int_equal(thin_pool_device_info(name, &d), 0);
        assert_false(d.suspended);
        assert_int_equal(access("/dev/mapper/snapshot-dmcrash-1", F_OK), 0);
        assert_pool_matches_rows(e);
}

struct alloc_one {
        uint32_t id;
};

static int alloc_one_tx(struct db *db, void *userdata)
{
        struct alloc_one *a = userdata;

        return thin_registry_alloc(db, "vm-host", POOL, "snapshot", 1 << 20, NULL, -1, NULL,
                                   &a->id);
}

/* One child of the allocation test: 6 ids made in the pool, every second one deleted again. */
static int alloc_child(struct env *e)
{
        struct db *db = NULL;
        uint32_t prev = 0;

        if (db_connect(e->url, &db) < 0)
                return 100;
        for (int k = 0; k < 6; k++) {
                struct alloc_one a = {0};
                int r = db_tx(db, alloc_one_tx, &a);

                if (r == 0)
                        r = thin_pool_create_thin(POOL, a.id);
                if (r == 0)
                        r = thin_registry_set_state(db, "vm-host", POOL, a.id, "ready");
                if (r == 0 && k % 2 == 1)
                        r = thin_registry_destroy(db, "vm-host", POOL, prev);
                if (r < 0) {
                        fprintf(stderr, "child: %s\n", err_last());
                        return 1;
                }
                prev = a.id;
        }
        return 0;
}

/*
 * Several processes allocate thin ids and create them in the real pool at once, freeing some
 * as they go: no id is handed out twice (create_thin would fail with EEXIST), freed ids are
 * reused lowest first, and the pool ends up with exactly the rows' ids.
 */
static void test_stages_concurrent_id_allocation(void **state)
{
        enum { N = 4 };
        struct env *e = *state;
        pid_t pids[N];

        for (int i = 0; i < N; i++) {
                (void)fflush(NULL);
                pids[i] = fork();
                assert_true(pids[i] >= 0);
                if (pids[i] == 0)
                        _exit(alloc_child(e));
        }
        for (int i = 0; i < N; i++)
                wait_ok(pids[i], "concurrent allocation");
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), N * 3);
        assert_true(scalar(e->db, "SELECT max(device_id) FROM thin_devices") < N * 6);
        assert_pool_matches_rows(e);
}

/*
 * The unpack mount never reaches another mount namespace's view: with /run shared and a
 * peer of it elsewhere, a device mounted for extraction (the process killed while it was
 * mounted) shows up in the peer as a plain directory, not as a mount.
 */
static void test_stages_unpack_mount_does_not_propagate(void **state)
{
        struct env *e = *state;
        struct stage_result res;
        char json[1024], out[1024];

        sh("mount --make-shared /run && mkdir -p /tmp/runpeer && mount --bind /run /tmp/runpeer");
        make_rootfs_tar("private", "");
        unpack_json("private", json, sizeof(json));
        crash_at(e, STAGE_UNPACK, json, "unpack.after_mount");
        sh_out("for d in /run/flyio-image-manager/mnt-*; do mountpoint -q \"$d\" && echo mounted;"
               " p=/tmp/runpeer/${d#/run/}; ! mountpoint -q \"$p\" || echo propagated; done;"
               " mount --make-rprivate /tmp/runpeer; umount -R /tmp/runpeer;"
               " mount --make-private /run",
               out, sizeof(out));
        if (!strstr(out, "mounted") || strstr(out, "propagated"))
                fail_msg("unpack mount: '%s' (want mounted, not propagated)", out);
        umount_leftovers();
        assert_int_equal(db_exec_script(e->db, "UPDATE fsm_runs SET lease_until = now()"), 0);
        resume_until_done(e, STAGE_UNPACK, json, &res);
        stage_result_done(&res);
        assert_origin_holds(e, "private");
        assert_pool_matches_rows(e);
}

/*
 * A snapshot id the pool has but the database does not (an operator's, made since the last
 * reconciliation) makes create_snap answer EEXIST: activate reserves the id as unknown and
 * takes another, as unpack does, and never deletes it.
 */
static void test_stages_activate_keeps_an_unknown_id(void **state)
{
        struct env *e = *state;
        struct stage_result res;
        char json[1024], dev[16], name[64], snap[16];
        uint32_t *ids = NULL;
        size_t n = 0;
        bool kept = false;
        long foreign;

        make_rootfs_tar("foreign", "");
        unpack_json("foreign", json, sizeof(json));
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_COMPLETE);
        field(res.response, "device_id", dev, sizeof(dev));
        field(res.response, "device_name", name, sizeof(name));
        stage_result_done(&res);
        /* The id the snapshot gets next, made behind the database's back. */
        foreign = scalar(e->db, "SELECT max(device_id) + 1 FROM thin_devices");
        assert_int_equal(thin_pool_create_thin(POOL, (uint32_t)foreign), 0);

        (void)snprintf(json, sizeof(json),
                       "{\"image_id\":\"foreign\",\"device_id\":\"%s\",\"device_name\":\"%s\"}",
                       dev, name);
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_ACTIVATE, json, &res), 0);
        if (res.outcome != FSM_OUTCOME_COMPLETE)
                fail_msg("activate: %s %s", fsm_outcome_name(res.outcome), res.error_text);
        assert_int_not_equal(
                strtol(field(res.response, "snapshot_id", snap, sizeof(snap)), NULL, 10), foreign);
        stage_result_done(&res);
        assert_int_equal(scalar(e->db,
                                "SELECT count(*) FROM thin_devices WHERE device_id = %ld AND"
                                " kind = 'unknown' AND state = 'ready'",
                                foreign),
                         1);
        assert_int_equal(thin_pool_metadata_thin_ids(POOL, &ids, &n), 0);
        for (size_t i = 0; i < n; i++)
                kept |= ids[i] == (uint32_t)foreign;
        free(ids);
        assert_true(kept);
        assert_pool_matches_rows(e);

        /* The operator's way out, as reconciliation reports it. */
        assert_int_equal(thin_pool_delete(POOL, (uint32_t)foreign), 0);
        assert_int_equal(thin_registry_reconcile(e->db, "vm-host", POOL, true, NULL, NULL), 0);
        assert_pool_matches_rows(e);
}

/* Make the killed child's run use up its attempts: the next takeover fails it. */
static void exhaust_running_runs(struct env *e)
{
        assert_int_equal(db_exec_script(e->db, "UPDATE fsm_runs SET attempt = max_attempts,"
                                               " lease_until = now() - interval '1 second'"
                                               " WHERE status = 'running'"),
                         0);
}

/*
 * A process killed inside the dm create sequence of a run that then never resumes: between
 * creating the device and loading its table (a device without a table), and between loading
 * and resuming it (an inactive table, which holds the thin id open in the pool: delete says
 * EBUSY). Whether the run is aborted (reconciliation cleans up), uses up its attempts (its
 * failure hook does), or its worker dies right after recording the failure (reconciliation
 * again), no id leaks and no device is left behind.
 */
static void test_stages_leftovers_of_runs_that_never_resume(void **state)
{
        static const char *const points[] = {"dm.after_create", "dm.after_load"};
        struct env *e = *state;
        struct stage_result res;
        char image[32], json[1024];

        for (int i = 0; i < 2; i++) {
                (void)snprintf(image, sizeof(image), "never-%d", i);
                make_rootfs_tar(image, "");
                unpack_json(image, json, sizeof(json));
                crash_at(e, STAGE_UNPACK, json, points[i]);
                assert_int_equal(db_exec_script(e->db, "UPDATE fsm_runs SET status = 'aborted',"
                                                       " lease_owner = NULL, lease_until = NULL"
                                                       " WHERE status = 'running'"),
                                 0);
                assert_int_equal(thin_registry_reconcile(e->db, "vm-host", POOL, true, NULL, NULL),
                                 0);
                assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 0);
                assert_pool_matches_rows(e);
        }

        /* Its attempts used up: the takeover fails the run and its failure hook cleans up. */
        make_rootfs_tar("never-2", "");
        unpack_json("never-2", json, sizeof(json));
        crash_at(e, STAGE_UNPACK, json, "dm.after_load");
        exhaust_running_runs(e);
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_FAILED);
        stage_result_done(&res);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 0);
        assert_pool_matches_rows(e);

        /* Killed once the failure is committed, before the hook: reconciliation cleans up. */
        make_rootfs_tar("never-3", "");
        unpack_json("never-3", json, sizeof(json));
        crash_at(e, STAGE_UNPACK, json, "dm.after_load");
        exhaust_running_runs(e);
        crash_at(e, STAGE_UNPACK, json, "fsm.after_failure_commit");
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM fsm_runs WHERE status = 'failed'"), 2);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices WHERE"
                                       " state = 'creating'"),
                         1);
        assert_int_equal(thin_registry_reconcile(e->db, "vm-host", POOL, true, NULL, NULL), 0);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 0);
        assert_pool_matches_rows(e);
}

static int run_gc_all(struct env *e, bool dry_run, char *out, size_t size)
{
        return run_cli(
                e,
                dry_run ? (const char *const[]){"gc", "--all-unreferenced", "--dry-run", NULL}
                        : (const char *const[]){"gc", "--all-unreferenced", NULL},
                out, size);
}

/* Unpack @image_id, then drop its image row: its origin is left unreferenced. */
static long unreferenced_origin(struct env *e, const char *image_id)
{
        struct stage_result res;
        char json[1024];
        long id;

        make_rootfs_tar(image_id, "");
        unpack_json(image_id, json, sizeof(json));
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_COMPLETE);
        stage_result_done(&res);
        id = scalar(e->db, "SELECT device_id FROM unpacked_images WHERE image_id = '%s'", image_id);
        assert_int_equal(db_exec(e->db, NULL, "DELETE FROM unpacked_images WHERE image_id = $1", 1,
                                 (const char *const[]){image_id}),
                         0);
        return id;
}

/*
 * gc --all-unreferenced in a child of ours (crash and stop points work there), stopped at
 * @stop_at until the caller lets it go on (SIGCONT).
 */
static pid_t gc_all_child(struct env *e, const char *stop_at)
{
        pid_t pid;

        (void)fflush(NULL);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                char *argv[] = {(char *)"gc", (char *)"--all-unreferenced", NULL};

                setenv("FIM_STOP_AT", stop_at, 1);
                setenv("DATABASE_URL", e->url, 1);
                setenv("LOCAL_DIR", LOCAL, 1);
                setenv("POOL_NAME", POOL, 1);
                setenv("HOST_ID", "vm-host", 1);
                (void)freopen("/dev/null", "w", stdout);
                _exit(cmd_gc(2, argv));
        }
        return pid;
}

static void wait_stopped(pid_t pid)
{
        int status;

        assert_int_equal(waitpid(pid, &status, WUNTRACED), pid);
        if (!WIFSTOPPED(status))
                fail_msg("child did not stop (status %d)", status);
}

/*
 * gc --all-unreferenced removes an origin no image maps to, the half-made device of a failed
 * run and a tarball no image row knows (--dry-run only says so), and leaves an image in use
 * alone. An image that comes to share an unreferenced origin while gc is between choosing it
 * and removing it keeps it: gc checks again, under the lock unpack maps images under. And
 * an unpack that saw the origin before gc removed it makes its own instead of mapping to it.
 */
static void test_stages_gc_all_unreferenced(void **state)
{
        struct env *e = *state;
        struct stage_result act, res;
        char json[1024], out[4096], buf[32];
        long used, orphan, lonely;
        pid_t gc, unpack;

        make_rootfs_tar("used", "");
        used = unpack_and_activate(e, "used", &act);
        stage_result_done(&act);
        orphan = unreferenced_origin(e, "orphan");
        make_rootfs_tar("failed", "");
        unpack_json("failed", json, sizeof(json));
        crash_at(e, STAGE_UNPACK, json, "unpack.after_create_thin");
        assert_int_equal(db_exec_script(e->db, "UPDATE fsm_runs SET status = 'failed',"
                                               " lease_owner = NULL WHERE status = 'running'"),
                         0);
        sh("head -c 1000 /dev/urandom > " LOCAL "/stray.tar");

        if (run_gc_all(e, true, out, sizeof(out)) < 0)
                fail_msg("gc --dry-run: %s", err_last());
        (void)snprintf(buf, sizeof(buf), "thin id %ld ", orphan);
        if (!strstr(out, "would remove unreferenced origin") || !strstr(out, buf) ||
            !strstr(out, "stray.tar") || !strstr(out, "left creating"))
                fail_msg("gc --dry-run output: %s", out);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 4);
        assert_int_equal(access(LOCAL "/stray.tar", F_OK), 0);

        if (run_gc_all(e, false, out, sizeof(out)) < 0)
                fail_msg("gc: %s", err_last());
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 2);
        assert_int_equal(
                scalar(e->db, "SELECT count(*) FROM thin_devices WHERE device_id = %ld", used), 1);
        assert_int_equal(access(LOCAL "/stray.tar", F_OK), -1);
        assert_int_equal(access("/dev/mapper/snapshot-used", F_OK), 0);
        assert_pool_matches_rows(e);

        /* An image maps to the origin between gc's choice and its removal. */
        lonely = unreferenced_origin(e, "lonely");
        sh("cp " LOCAL "/lonely.tar " LOCAL "/twin.tar");
        gc = gc_all_child(e, "gc.after_select");
        wait_stopped(gc);
        unpack_json("twin", json, sizeof(json));
        assert_int_equal(run_stage(e, e->db, e->leases, STAGE_UNPACK, json, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_COMPLETE);
        assert_int_equal(strtol(field(res.response, "device_id", buf, sizeof(buf)), NULL, 10),
                         lonely);
        stage_result_done(&res);
        assert_int_equal(kill(gc, SIGCONT), 0);
        wait_ok(gc, "gc --all-unreferenced");
        assert_int_equal(scalar(e->db, "SELECT device_id FROM unpacked_images WHERE"
                                       " image_id = 'twin'"),
                         lonely);
        assert_origin_holds_tar_of(e, "twin", "lonely");
        assert_pool_matches_rows(e);

        /*
         * An unpack looked the origin up before gc removed it: it must not map to it. Its
         * tarball has an image row, or gc would take it too.
         */
        lonely = unreferenced_origin(e, "lonely-2");
        sh("cp " LOCAL "/lonely-2.tar " LOCAL "/twin-2.tar");
        assert_int_equal(db_exec_script(e->db, "INSERT INTO images (host_id, image_id, bucket,"
                                               " s3_key) VALUES ('vm-host', 'twin-2', 'b', 'k')"),
                         0);
        unpack_json("twin-2", json, sizeof(json));
        setenv("FIM_STOP_AT", "unpack.share.after_lookup", 1);
        /* A lease that outlasts the stop: the run must go on, not be taken over. */
        unpack = stage_child_lease(e, STAGE_UNPACK, json, 600000);
        unsetenv("FIM_STOP_AT");
        wait_stopped(unpack);
        if (run_gc_all(e, false, out, sizeof(out)) < 0)
                fail_msg("gc: %s", err_last());
        assert_int_equal(
                scalar(e->db, "SELECT count(*) FROM thin_devices WHERE device_id = %ld", lonely),
                0);
        assert_int_equal(kill(unpack, SIGCONT), 0);
        wait_ok(unpack, "unpack of content whose origin gc removed");
        assert_origin_holds_tar_of(e, "twin-2", "lonely-2");
        assert_pool_matches_rows(e);
}

#define OTHER_POOL "fimotherpool"
#define OTHER_POOL_DIR POOL_DIR "-other"

/* Make the half-made device of a failed unpack run of @image_id in the configured pool. */
static void half_made_device(struct env *e, const char *image_id)
{
        char json[1024];

        make_rootfs_tar(image_id, "");
        unpack_json(image_id, json, sizeof(json));
        crash_at(e, STAGE_UNPACK, json, "unpack.after_create_thin");
        assert_int_equal(db_exec_script(e->db, "UPDATE fsm_runs SET status = 'failed',"
                                               " lease_owner = NULL WHERE status = 'running'"),
                         0);
}

/*
 * Requests may name another pool than POOL_NAME: the worker's start (reconcile_at_start),
 * verify-system and gc --all-unreferenced cover every pool this host has rows in.
 */
static void test_stages_every_pool_is_reconciled(void **state)
{
        struct env *e = *state;
        struct pool_setup_opts o = POOL_SETUP_OPTS_INIT;
        struct stage_result act;
        char out[4096], origin[32];

        o.name = OTHER_POOL;
        o.dir = OTHER_POOL_DIR;
        o.data_size = 512ULL << 20;
        assert_true(pool_setup_create(&o, NULL) >= 0);
        assert_int_equal(config_set(&e->cfg, "POOL_NAME", OTHER_POOL, CONFIG_SOURCE_FLAG), 0);
        make_rootfs_tar("elsewhere", "");
        thin_registry_origin_name(unpack_and_activate(e, "elsewhere", &act), origin,
                                  sizeof(origin));
        stage_result_done(&act);
        half_made_device(e, "elsewhere-half-1");
        assert_int_equal(config_set(&e->cfg, "POOL_NAME", POOL, CONFIG_SOURCE_FLAG), 0);

        if (run_verify(e, out, sizeof(out)) == 0)
                fail_msg("verify-system passed with a half-made device in '" OTHER_POOL "': %s",
                         out);
        if (!has_line(out, "FAIL", "thin-ids", "pool '" OTHER_POOL "'") ||
            !has_line(out, "PASS", "thin-ids", "pool '" POOL "'"))
                fail_msg("verify-system output: %s", out);
        if (run_gc_all(e, false, out, sizeof(out)) < 0)
                fail_msg("gc: %s", err_last());
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 2);
        assert_pool_matches_rows(e);

        /* Another half-made device there, then a reboot: the worker's start repairs both. */
        assert_int_equal(config_set(&e->cfg, "POOL_NAME", OTHER_POOL, CONFIG_SOURCE_FLAG), 0);
        half_made_device(e, "elsewhere-half-2");
        assert_int_equal(config_set(&e->cfg, "POOL_NAME", POOL, CONFIG_SOURCE_FLAG), 0);
        assert_int_equal(thin_pool_deactivate("snapshot-elsewhere", NULL), 0);
        assert_int_equal(thin_pool_deactivate(origin, NULL), 0);
        assert_int_equal(reconcile_at_start(&e->cfg, e->db), 0);
        assert_int_equal(access("/dev/mapper/snapshot-elsewhere", F_OK), 0);
        assert_int_equal(scalar(e->db, "SELECT count(*) FROM thin_devices"), 2);
        assert_pool_matches_rows(e);
        if (run_verify(e, out, sizeof(out)) < 0)
                fail_msg("verify-system: %s", err_last());

        if (run_gc(e, "elsewhere", out, sizeof(out)) < 0)
                fail_msg("gc: %s", err_last());
        assert_true(pool_setup_teardown(OTHER_POOL, OTHER_POOL_DIR, true, NULL) >= 0);
}

/* Whether @name matches one of the comma-separated fnmatch patterns of @filter. */
static bool filter_matches(const char *filter, const char *name)
{
        char pattern[256];

        for (const char *p = filter; *p;) {
                size_t len = strcspn(p, ",");

                (void)snprintf(pattern, sizeof(pattern), "%.*s", (int)len, p);
                if (fnmatch(pattern, name, 0) == 0)
                        return true;
                p += len + (p[len] == ',');
        }
        return false;
}

int main(void)
{
        struct CMUnitTest tests[] = {
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
                cmocka_unit_test_setup_teardown(test_stages_resumable_run_survives_reconciliation,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(test_stages_resume_after_device_vanished, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_stages_concurrent_identical_content, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_stages_repushed_image_is_refused, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_stages_gc_of_snapshot_in_use, setup, teardown),
                cmocka_unit_test_setup_teardown(test_stages_reconcile_races, setup, teardown),
                cmocka_unit_test_setup_teardown(test_stages_crash_inside_dm_sequences, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_stages_concurrent_id_allocation, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_stages_unpack_mount_does_not_propagate, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_stages_activate_keeps_an_unknown_id, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_stages_leftovers_of_runs_that_never_resume,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(test_stages_gc_all_unreferenced, setup, teardown),
                cmocka_unit_test_setup_teardown(test_stages_every_pool_is_reconciled, setup,
                                                teardown),
        };
        const char *filter = getenv("FIM_TEST_FILTER");
        size_t n = 0;

        /* FIM_TEST_FILTER=pattern[,pattern...] runs only the cases matching one (fnmatch). */
        for (size_t i = 0; i < ARRAY_SIZE(tests); i++) {
                if (!filter || filter_matches(filter, tests[i].name))
                        tests[n++] = tests[i];
        }
        return _cmocka_run_group_tests("test_stages", tests, n, NULL, NULL);
}
