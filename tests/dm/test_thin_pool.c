/*
 * The thin pool layer against a real kernel: pool setup (library and command line), status,
 * thin devices with ext4 on them, snapshots of a mounted origin, busy removal, deletes,
 * listings, metadata ids, a pool that runs out of space and guarded teardown.
 *
 * Needs root and device-mapper with dm-thin, loop and ext4: it runs inside the test VM
 * (tests/dm/run_in_vm.sh; ctest label "dm"). Without device-mapper it fails, never
 * skips. The cases run in order and build on each other, so one VM boot covers them all;
 * the loop files live in a fresh directory under /tmp (a tmpfs in the VM).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/loop.h>
#include <pthread.h>
#include <setjmp.h>
#include <spawn.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "stages/pool_setup.h"
#include "stages/thin_pool.h"
#include "worker/cli.h"
#include "worker/commands.h"

#define MiB (UINT64_C(1) << 20)
#define POOL "fimt-pool"
#define POOL_CLI "fimt-cli"
#define POOL_FULL "fimt-full"
#define THIN1 "fimt-thin1"
#define SNAP2 "fimt-snap2"
#define SNAP3 "fimt-snap3"
#define THIN_SIZE (64 * MiB)

static struct {
        char dir[64];   /* the pool files */
        char other[96]; /* an empty directory: pools in it are not ours */
        char mnt1[96];
        char mnt2[96];
} T;

/* Check a call that returns >= 0 on success, printing the error text when it does not. */
#define assert_ok(expr)                                                                            \
        do {                                                                                       \
                int r_ = (expr);                                                                   \
                if (r_ < 0)                                                                        \
                        print_error("%s = %d (%s): %s\n", #expr, r_, err_name(r_), err_last());    \
                assert_true(r_ >= 0);                                                              \
        } while (0)

#define assert_rc(expr, want)                                                                      \
        do {                                                                                       \
                int r_ = (expr);                                                                   \
                if (r_ != (want))                                                                  \
                        print_error("%s = %d (%s), want %d: %s\n", #expr, r_, err_name(r_),        \
                                    (int)(want), err_last());                                      \
                assert_int_equal(r_, (want));                                                      \
        } while (0)

#define assert_err_contains(text)                                                                  \
        do {                                                                                       \
                if (!strstr(err_last(), (text)))                                                   \
                        fail_msg("error '%s' lacks '%s'", err_last(), (text));                     \
        } while (0)

/* Run a program (stdout silenced) and return its exit status, or -1. */
static int run_program(const char *const *argv)
{
        posix_spawn_file_actions_t fa;
        pid_t pid;
        int status = 0;

        assert_int_equal(posix_spawn_file_actions_init(&fa), 0);
        assert_int_equal(posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0), 0);
        if (posix_spawnp(&pid, argv[0], &fa, NULL, (char *const *)argv, environ) != 0) {
                (void)posix_spawn_file_actions_destroy(&fa);
                return -1;
        }
        (void)posix_spawn_file_actions_destroy(&fa);
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static void make_ext4(const char *dev)
{
        const char *const argv[] = {
                "mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                dev,         NULL};

        assert_int_equal(run_program(argv), 0);
}

static void write_file(const char *dir, const char *name, const char *text)
{
        char path[160];
        FILE *f;

        (void)snprintf(path, sizeof(path), "%s/%s", dir, name);
        f = fopen(path, "we");
        assert_non_null(f);
        assert_true(fputs(text, f) >= 0);
        assert_int_equal(fflush(f), 0);
        assert_int_equal(fsync(fileno(f)), 0);
        assert_int_equal(fclose(f), 0);
}

static bool file_has(const char *dir, const char *name, const char *text)
{
        char path[160], buf[64] = "";
        FILE *f;

        (void)snprintf(path, sizeof(path), "%s/%s", dir, name);
        f = fopen(path, "re");
        if (!f)
                return false;
        if (!fgets(buf, sizeof(buf), f))
                buf[0] = '\0';
        (void)fclose(f);
        return strcmp(buf, text) == 0;
}

static void mount_ext4(const char *dev, const char *dir, unsigned long flags, const char *data)
{
        if (mount(dev, dir, "ext4", flags, data) < 0)
                fail_msg("mount %s on %s: %s", dev, dir, strerror(errno));
}

static void umount_dir(const char *dir)
{
        if (umount2(dir, 0) < 0)
                fail_msg("umount %s: %s", dir, strerror(errno));
}

static void detach_loop(const char *node)
{
        int fd = open(node, O_RDONLY | O_CLOEXEC);

        assert_true(fd >= 0);
        assert_int_equal(ioctl(fd, LOOP_CLR_FD, 0), 0);
        (void)close(fd);
}

static int run_cli(int argc, const char *const *argv)
{
        char *copy[16];

        assert_true(argc < 16);
        for (int i = 0; i < argc; i++)
                copy[i] = (char *)argv[i];
        copy[argc] = NULL;
        cli_getopt_reset();
        return cmd_pool_setup(argc, copy);
}

static int group_setup(void **state)
{
        struct pool_setup_opts o = POOL_SETUP_OPTS_INIT;
        struct pool_setup_result res;
        int r;

        (void)state;
        (void)snprintf(T.dir, sizeof(T.dir), "/tmp/fim-dm-test.XXXXXX");
        if (!mkdtemp(T.dir)) {
                print_error("mkdtemp: %s\n", strerror(errno));
                return -1;
        }
        (void)snprintf(T.other, sizeof(T.other), "%s/other", T.dir);
        (void)snprintf(T.mnt1, sizeof(T.mnt1), "%s/m1", T.dir);
        (void)snprintf(T.mnt2, sizeof(T.mnt2), "%s/m2", T.dir);
        if (mkdir(T.other, 0755) < 0 || mkdir(T.mnt1, 0755) < 0 || mkdir(T.mnt2, 0755) < 0)
                return -1;
        o.name = POOL;
        o.dir = T.dir;
        r = pool_setup_create(&o, &res);
        if (r != 0) {
                print_error("pool_setup_create: %s\n", err_text(r));
                return -1;
        }
        return 0;
}

/* Best effort: the last test removes the pool; this only cleans up after a failure. */
static int group_teardown(void **state)
{
        const char *const pools[] = {POOL, POOL_CLI, POOL_FULL};

        (void)state;
        (void)umount2(T.mnt1, MNT_DETACH);
        (void)umount2(T.mnt2, MNT_DETACH);
        for (size_t i = 0; i < ARRAY_SIZE(pools); i++) {
                int r = pool_setup_teardown(pools[i], T.dir, true, NULL);

                if (r < 0)
                        print_error("teardown of '%s': %s\n", pools[i], err_text(r));
        }
        (void)rmdir(T.mnt1);
        (void)rmdir(T.mnt2);
        (void)rmdir(T.other);
        (void)rmdir(T.dir);
        return 0;
}

static void test_thin_pool_setup_is_idempotent_and_guarded(void **state)
{
        struct pool_setup_opts o = POOL_SETUP_OPTS_INIT;
        struct pool_setup_result res;
        struct thin_pool_device_info info;

        (void)state;
        o.name = POOL;
        o.dir = T.dir;
        assert_rc(pool_setup_create(&o, &res), POOL_SETUP_EXISTED);
        assert_true(res.existed);
        assert_int_equal(res.data_size, POOL_SETUP_DEFAULT_DATA_SIZE);
        assert_int_equal(res.metadata_size, 2 * MiB);
        assert_non_null(strstr(res.data_loop, "/dev/loop"));

        assert_ok(thin_pool_device_info(POOL, &info));
        assert_true(info.exists);
        assert_string_equal(info.uuid, "FIM-pool-" POOL);
        assert_string_equal(info.target_type, "thin-pool");

        /* The same pool name from a directory without our files: not ours, hands off. */
        o.dir = T.other;
        assert_rc(pool_setup_create(&o, NULL), -EPERM);
        assert_err_contains("refusing");
        assert_rc(pool_setup_teardown(POOL, T.other, true, NULL), -EPERM);
        assert_err_contains("refusing");
        assert_ok(thin_pool_device_info(POOL, &info));
        assert_true(info.exists);
}

static void test_thin_pool_setup_cli(void **state)
{
        const char *const create[] = {"pool-setup",  "--name", POOL_CLI,       "--dir", T.dir,
                                      "--data-size", "64M",    "--block-size", "128K"};
        const char *const teardown[] = {"pool-setup", "--teardown", "--name",
                                        POOL_CLI,     "--dir",      T.dir};
        const char *const foreign[] = {"pool-setup", "--teardown", "--name",
                                       POOL,         "--dir",      T.other};
        struct pool_setup_opts o = POOL_SETUP_OPTS_INIT;
        struct pool_setup_result res;
        struct thin_pool_status s;
        struct thin_pool_device_info info;
        char path[128];

        (void)state;
        assert_int_equal(run_cli(9, create), CMD_EXIT_OK);
        assert_int_equal(run_cli(9, create), CMD_EXIT_OK); /* "already exists" */
        assert_ok(thin_pool_status(POOL_CLI, &s));
        assert_int_equal(s.data_block_size, 128 << 10);
        assert_int_equal(s.data_total_bytes, 64 * MiB);
        assert_int_equal(s.low_water_mark, 512 / 10);

        assert_int_equal(run_cli(6, foreign), CMD_EXIT_FAILURE);

        /*
         * After a reboot (no pool, no loops, the files remain) setup attaches the files again
         * and formats nothing: thin id 7 made before is still there. A wrong block size is
         * refused with a hint, and leaves no loop attached behind.
         */
        o.name = POOL_CLI;
        o.dir = T.dir;
        o.block_size = 128 << 10;
        assert_ok(thin_pool_create_thin(POOL_CLI, 7));
        assert_rc(pool_setup_create(&o, &res), POOL_SETUP_EXISTED);
        assert_rc(thin_pool_deactivate(POOL_CLI, NULL), 0);
        detach_loop(res.data_loop);
        detach_loop(res.metadata_loop);
        o.block_size = 64 << 10;
        assert_true(pool_setup_create(&o, NULL) < 0);
        assert_err_contains("another block size");
        o.block_size = 128 << 10;
        assert_rc(pool_setup_create(&o, &res), 0);
        assert_true(res.reattached);
        assert_int_equal(res.data_size, 64 * MiB);
        assert_ok(thin_pool_activate(POOL_CLI, 7, "fimt-cli7", 4 * MiB, NULL));
        assert_rc(thin_pool_deactivate("fimt-cli7", NULL), 0);

        assert_int_equal(run_cli(6, teardown), CMD_EXIT_OK);
        assert_ok(thin_pool_device_info(POOL_CLI, &info));
        assert_false(info.exists);
        (void)snprintf(path, sizeof(path), "%s/%s.data", T.dir, POOL_CLI);
        assert_int_equal(access(path, F_OK), -1);
        assert_int_equal(run_cli(6, teardown), CMD_EXIT_OK); /* nothing to do */
}

static void test_thin_pool_status_of_fresh_pool(void **state)
{
        struct thin_pool_status s;

        (void)state;
        assert_ok(thin_pool_status(POOL, &s));
        assert_int_equal(s.transaction_id, 0);
        assert_int_equal(s.data_block_size, 64 << 10);
        assert_int_equal(s.data_total_blocks, 16384);
        assert_int_equal(s.data_total_bytes, UINT64_C(1) << 30);
        assert_int_equal(s.data_used_blocks, 0);
        assert_int_equal(s.metadata_total_blocks, 512);
        assert_true(s.metadata_used_blocks > 0 && s.metadata_used_blocks < 512);
        assert_true(s.metadata_used_percent > 0.0 && s.metadata_used_percent < 50.0);
        assert_true(s.data_used_percent == 0.0);
        assert_int_equal(s.mode, THIN_POOL_MODE_RW);
        assert_int_equal(s.discard, THIN_POOL_DISCARD_PASSDOWN);
        assert_false(s.error_if_no_space);
        assert_false(s.needs_check);
        assert_int_equal(s.held_metadata_root, 0);
        assert_int_equal(s.low_water_mark, 1638);
        assert_ok(thin_pool_check_space(POOL, 90.0, NULL));

        assert_rc(thin_pool_status("fimt-nope", &s), -ENODEV);
        assert_string_equal(err_last(), "pool 'fimt-nope' not found");
        assert_rc(thin_pool_message("fimt-nope", "create_thin 1"), -ENODEV);
}

static void test_thin_pool_transaction_id(void **state)
{
        struct thin_pool_status s;

        (void)state;
        assert_ok(thin_pool_set_transaction_id(POOL, 0, 1));
        assert_ok(thin_pool_status(POOL, &s));
        assert_int_equal(s.transaction_id, 1);
        assert_rc(thin_pool_set_transaction_id(POOL, 0, 2), -EINVAL);
        assert_err_contains("it is not 0");
        assert_ok(thin_pool_set_transaction_id(POOL, 1, 0));
}

static void test_thin_pool_thin_device_with_ext4(void **state)
{
        struct thin_pool_status s;
        char *path = NULL;

        (void)state;
        assert_ok(thin_pool_create_thin(POOL, 1));
        assert_rc(thin_pool_create_thin(POOL, 1), -EEXIST);
        assert_err_contains("already exists");

        assert_rc(thin_pool_activate(POOL, 1, THIN1, THIN_SIZE, &path), 0);
        assert_string_equal(path, "/dev/mapper/" THIN1);
        assert_int_equal(access(path, F_OK), 0);
        free(path);
        path = NULL;
        assert_rc(thin_pool_activate(POOL, 1, THIN1, THIN_SIZE, NULL), THIN_POOL_ALREADY);
        assert_rc(thin_pool_activate(POOL, 1, THIN1, 2 * THIN_SIZE, NULL), -EEXIST);
        assert_err_contains("another table");

        make_ext4("/dev/mapper/" THIN1);
        mount_ext4("/dev/mapper/" THIN1, T.mnt1, 0, NULL);
        write_file(T.mnt1, "hello.txt", "hello");
        umount_dir(T.mnt1);
        assert_ok(thin_pool_status(POOL, &s));
        assert_true(s.data_used_blocks > 0);
        assert_true(s.data_used_percent > 0.0);
}

static void test_thin_pool_snapshot_of_mounted_origin(void **state)
{
        struct thin_pool_device_info info;

        (void)state;
        mount_ext4("/dev/mapper/" THIN1, T.mnt1, 0, NULL);
        write_file(T.mnt1, "before.txt", "before");

        assert_ok(thin_pool_create_snap(POOL, 2, 1, THIN1));
        /* Resumed: the origin takes writes again. */
        assert_ok(thin_pool_device_info(THIN1, &info));
        assert_false(info.suspended);
        write_file(T.mnt1, "after.txt", "after");

        assert_ok(thin_pool_activate(POOL, 2, SNAP2, THIN_SIZE, NULL));
        mount_ext4("/dev/mapper/" SNAP2, T.mnt2, MS_RDONLY, "noload");
        assert_true(file_has(T.mnt2, "hello.txt", "hello"));
        assert_true(file_has(T.mnt2, "before.txt", "before"));
        assert_false(file_has(T.mnt2, "after.txt", "after"));

        /* Without a name the active users of the origin are found and suspended. */
        assert_ok(thin_pool_create_snap(POOL, 3, 1, NULL));
        assert_ok(thin_pool_device_info(THIN1, &info));
        assert_false(info.suspended);
        write_file(T.mnt1, "after3.txt", "after3");

        /* Only the origin's users are touched, and one suspended by somebody else stays so. */
        assert_ok(thin_pool_suspend(SNAP2));
        assert_ok(thin_pool_create_snap(POOL, 5, 1, NULL));
        assert_ok(thin_pool_device_info(SNAP2, &info));
        assert_true(info.suspended);
        assert_ok(thin_pool_resume(SNAP2));
        assert_ok(thin_pool_suspend(THIN1));
        assert_ok(thin_pool_create_snap(POOL, 6, 1, THIN1));
        assert_ok(thin_pool_device_info(THIN1, &info));
        assert_true(info.suspended);
        assert_ok(thin_pool_resume(THIN1));

        assert_rc(thin_pool_create_snap(POOL, 4, 1, SNAP2), -EINVAL); /* SNAP2 maps id 2 */
        assert_rc(thin_pool_create_snap(POOL, 2, 1, THIN1), -EEXIST);
        assert_ok(thin_pool_device_info(THIN1, &info));
        assert_false(info.suspended); /* resumed after the failed message too */
        assert_rc(thin_pool_create_snap(POOL, 4, 999, NULL), -ENODATA);
}

static void test_thin_pool_deactivate_busy_device(void **state)
{
        const struct thin_pool_remove_opts quick = {
                .attempts = 3, .delay_ms = 20, .max_delay_ms = 100, .deferred = false};
        const struct thin_pool_remove_opts deferred = {
                .attempts = 2, .delay_ms = 10, .max_delay_ms = 10, .deferred = true};
        struct thin_pool_device_info info;
        int64_t t0;

        (void)state;
        /* SNAP2 is mounted at mnt2: retried, then refused with the reason. */
        t0 = util_now_monotonic_ms();
        assert_rc(thin_pool_deactivate(SNAP2, &quick), -EBUSY);
        assert_true(util_now_monotonic_ms() - t0 >= 20 + 40);
        print_message("busy: %s\n", err_last());
        assert_err_contains("'" SNAP2 "'");
        assert_err_contains("after 3 attempts");
        assert_err_contains("mounted at '");
        umount_dir(T.mnt2);
        assert_rc(thin_pool_deactivate(SNAP2, &quick), 0);
        assert_rc(thin_pool_deactivate(SNAP2, &quick), THIN_POOL_ALREADY);
        assert_int_equal(access("/dev/mapper/" SNAP2, F_OK), -1);

        /* Deferred: THIN1 stays while mounted and goes away on the unmount. */
        assert_rc(thin_pool_deactivate(THIN1, &deferred), THIN_POOL_DEFERRED);
        assert_ok(thin_pool_device_info(THIN1, &info));
        assert_true(info.exists);
        umount_dir(T.mnt1);
        /* The kernel removes it from a workqueue after the last close: give it a moment. */
        for (int i = 0; i < 300; i++) {
                assert_ok(thin_pool_device_info(THIN1, &info));
                if (!info.exists)
                        break;
                util_sleep_ms(10);
        }
        assert_false(info.exists);
}

static void test_thin_pool_delete(void **state)
{
        (void)state;
        assert_rc(thin_pool_delete(POOL, 2), 0);
        assert_rc(thin_pool_delete(POOL, 5), 0);
        assert_rc(thin_pool_delete(POOL, 6), 0);
        assert_rc(thin_pool_delete(POOL, 2), THIN_POOL_ALREADY);
        assert_rc(thin_pool_delete(POOL, 12345), THIN_POOL_ALREADY);

        assert_ok(thin_pool_activate(POOL, 3, SNAP3, THIN_SIZE, NULL));
        assert_rc(thin_pool_delete(POOL, 3), -EBUSY);
        assert_err_contains("deactivate it first");
}

static void test_thin_pool_activate_missing_id(void **state)
{
        struct thin_pool_device_info info;
        int r;

        (void)state;
        r = thin_pool_activate(POOL, 777, "fimt-missing", THIN_SIZE, NULL);
        print_message("activate of a missing id: %d (%s): %s\n", r, err_name(r), err_last());
        assert_true(r < 0);
        assert_err_contains("777");
        assert_err_contains("does not exist");
        assert_ok(thin_pool_device_info("fimt-missing", &info));
        assert_false(info.exists); /* the half-made device was removed again */
        assert_rc(thin_pool_activate("fimt-nope", 1, "fimt-missing", THIN_SIZE, NULL), -ENODEV);
}

static void test_thin_pool_device_info_and_lists(void **state)
{
        struct thin_pool_device_info info, pool;
        struct thin_pool_active_thin *devs = NULL;
        size_t n = 0;

        (void)state;
        assert_ok(thin_pool_activate(POOL, 1, THIN1, THIN_SIZE, NULL));
        assert_ok(thin_pool_device_info(POOL, &pool));
        assert_false(pool.is_thin);
        assert_ok(thin_pool_device_info(THIN1, &info));
        assert_true(info.exists);
        assert_true(info.is_thin);
        assert_int_equal(info.thin_dev_id, 1);
        assert_string_equal(info.target_type, "thin");
        assert_int_equal(info.target_count, 1);
        assert_int_equal(info.size_sectors, THIN_SIZE / 512);
        assert_int_equal(info.open_count, 0);
        assert_false(info.suspended);
        assert_true(info.thin_pool_dev == makedev(pool.major, pool.minor));

        assert_ok(thin_pool_list_thin_ids(POOL, &devs, &n));
        assert_int_equal(n, 2);
        assert_int_equal(devs[0].dev_id, 1);
        assert_string_equal(devs[0].name, THIN1);
        assert_int_equal(devs[0].size_bytes, THIN_SIZE);
        assert_int_equal(devs[1].dev_id, 3);
        assert_string_equal(devs[1].name, SNAP3);
        free(devs);

        assert_ok(thin_pool_suspend(SNAP3));
        assert_ok(thin_pool_device_info(SNAP3, &info));
        assert_true(info.suspended);
        assert_ok(thin_pool_resume(SNAP3));
        assert_ok(thin_pool_device_info(SNAP3, &info));
        assert_false(info.suspended);
        assert_rc(thin_pool_suspend("fimt-nope"), -ENODEV);

        /* Another dm device stacked on SNAP3 holds it: the error says which. */
        const char *const stack[] = {
                "dmsetup", "create", "fimt-holder", "--table", "0 8 linear /dev/mapper/" SNAP3 " 0",
                NULL};
        const char *const unstack[] = {"dmsetup", "remove", "fimt-holder", NULL};
        const struct thin_pool_remove_opts once = {.attempts = 1};

        assert_int_equal(run_program(stack), 0);
        assert_rc(thin_pool_deactivate(SNAP3, &once), -EBUSY);
        print_message("busy: %s\n", err_last());
        assert_err_contains("held by 'fimt-holder' (dm-");
        assert_int_equal(run_program(unstack), 0);

        assert_ok(thin_pool_device_info("fimt-nope", &info));
        assert_false(info.exists);
}

static void test_thin_pool_metadata_thin_ids(void **state)
{
        struct thin_pool_status s;
        uint32_t *ids = NULL;
        size_t n = 0;

        (void)state;
        assert_ok(thin_pool_create_thin(POOL, 50)); /* never activated */
        assert_ok(thin_pool_metadata_thin_ids(POOL, &ids, &n));
        assert_int_equal(n, 3);
        assert_int_equal(ids[0], 1);
        assert_int_equal(ids[1], 3);
        assert_int_equal(ids[2], 50);
        free(ids);
        assert_ok(thin_pool_status(POOL, &s));
        assert_int_equal(s.held_metadata_root, 0); /* released */

        /* A snapshot left held (by a crash) is released and taken again. */
        assert_ok(thin_pool_message(POOL, "reserve_metadata_snap"));
        assert_ok(thin_pool_status(POOL, &s));
        assert_true(s.held_metadata_root != 0);
        assert_ok(thin_pool_metadata_thin_ids(POOL, &ids, &n));
        assert_int_equal(n, 3);
        free(ids);
        assert_ok(thin_pool_status(POOL, &s));
        assert_int_equal(s.held_metadata_root, 0);
}

struct worker_arg {
        uint32_t first_id;
        int failures;
        char error[256];
};

/* Create, activate, inspect, deactivate and delete its own ids, racing the other workers. */
static void *concurrent_worker(void *p)
{
        struct worker_arg *a = p;

        for (uint32_t i = 0; i < 8 && a->failures == 0; i++) {
                uint32_t id = a->first_id + i;
                struct thin_pool_device_info info;
                struct thin_pool_status s;
                char name[32];
                int r;

                (void)snprintf(name, sizeof(name), "fimt-c%" PRIu32, id);
                r = thin_pool_create_thin(POOL, id);
                if (r == 0)
                        r = thin_pool_activate(POOL, id, name, 4 * MiB, NULL);
                if (r == 0)
                        r = thin_pool_device_info(name, &info);
                if (r == 0 && (!info.exists || info.thin_dev_id != id))
                        r = err_set(-EIO, "wrong info for '%s'", name);
                if (r == 0)
                        r = thin_pool_status(POOL, &s);
                if (r == 0)
                        r = thin_pool_deactivate(name, NULL);
                if (r == 0)
                        r = thin_pool_delete(POOL, id);
                if (r != 0) {
                        a->failures++;
                        (void)snprintf(a->error, sizeof(a->error), "%s: %d %s", name, r,
                                       err_last());
                }
        }
        return NULL;
}

static void test_thin_pool_concurrent_callers(void **state)
{
        pthread_t threads[4];
        struct worker_arg args[4];
        struct thin_pool_active_thin *devs = NULL;
        size_t n = 0;

        (void)state;
        for (size_t i = 0; i < ARRAY_SIZE(threads); i++) {
                args[i] = (struct worker_arg){.first_id = 1000 + 100 * (uint32_t)i};
                assert_int_equal(pthread_create(&threads[i], NULL, concurrent_worker, &args[i]), 0);
        }
        for (size_t i = 0; i < ARRAY_SIZE(threads); i++) {
                assert_int_equal(pthread_join(threads[i], NULL), 0);
                if (args[i].failures)
                        fail_msg("worker %zu: %s", i, args[i].error);
        }
        assert_ok(thin_pool_list_thin_ids(POOL, &devs, &n));
        assert_int_equal(n, 2); /* THIN1 and SNAP3 only */
        free(devs);
}

static void test_thin_pool_out_of_space(void **state)
{
        struct pool_setup_opts o = POOL_SETUP_OPTS_INIT;
        struct thin_pool_status s;
        void *buf = NULL;
        uint64_t written = 0;
        int fd, err = 0;

        (void)state;
        o.name = POOL_FULL;
        o.dir = T.dir;
        o.data_size = 16 * MiB;
        o.error_if_no_space = true; /* else writes queue for 60 s before failing */
        assert_rc(pool_setup_create(&o, NULL), 0);
        assert_ok(thin_pool_create_thin(POOL_FULL, 1));
        assert_ok(thin_pool_activate(POOL_FULL, 1, "fimt-full1", THIN_SIZE, NULL));

        assert_int_equal(posix_memalign(&buf, 4096, MiB), 0);
        memset(buf, 0xab, MiB);
        fd = open("/dev/mapper/fimt-full1", O_WRONLY | O_DIRECT | O_CLOEXEC);
        assert_true(fd >= 0);
        while (written < 32 * MiB) {
                ssize_t n = pwrite(fd, buf, MiB, (off_t)written);

                if (n < 0) {
                        err = errno;
                        break;
                }
                written += (uint64_t)n;
        }
        (void)close(fd);
        free(buf);
        print_message("pool full after %llu MiB: %s\n", (unsigned long long)(written / MiB),
                      strerror(err));
        assert_true(err == ENOSPC || err == EIO);
        assert_true(written <= 16 * MiB);

        assert_ok(thin_pool_status(POOL_FULL, &s));
        assert_int_equal(s.mode, THIN_POOL_MODE_OUT_OF_DATA_SPACE);
        assert_true(s.error_if_no_space);
        assert_int_equal(s.data_used_blocks, s.data_total_blocks);
        assert_true(s.data_used_percent == 100.0);
        assert_rc(thin_pool_check_space(POOL_FULL, 90.0, &s), -ENOSPC);
        assert_err_contains("out of data space");

        assert_rc(pool_setup_teardown(POOL_FULL, T.dir, false, NULL), -EBUSY);
        assert_rc(pool_setup_teardown(POOL_FULL, T.dir, true, NULL), 0);
}

static void test_thin_pool_teardown_guards_active_devices(void **state)
{
        struct pool_setup_teardown_result res;
        struct thin_pool_device_info info;
        char path[128];

        (void)state;
        assert_rc(pool_setup_teardown(POOL, T.dir, false, &res), -EBUSY);
        assert_err_contains("2 active thin devices");
        assert_err_contains("'" THIN1 "'");
        assert_ok(thin_pool_device_info(POOL, &info));
        assert_true(info.exists);

        assert_rc(pool_setup_teardown(POOL, T.dir, true, &res), 0);
        assert_true(res.pool_removed);
        assert_int_equal(res.thin_deactivated, 2);
        assert_int_equal(res.loops_detached, 2);
        assert_int_equal(res.files_removed, 2);
        assert_ok(thin_pool_device_info(THIN1, &info));
        assert_false(info.exists);
        (void)snprintf(path, sizeof(path), "%s/%s.meta", T.dir, POOL);
        assert_int_equal(access(path, F_OK), -1);
        assert_rc(pool_setup_teardown(POOL, T.dir, false, NULL), POOL_SETUP_NOTHING);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_thin_pool_setup_is_idempotent_and_guarded),
                cmocka_unit_test(test_thin_pool_setup_cli),
                cmocka_unit_test(test_thin_pool_status_of_fresh_pool),
                cmocka_unit_test(test_thin_pool_transaction_id),
                cmocka_unit_test(test_thin_pool_thin_device_with_ext4),
                cmocka_unit_test(test_thin_pool_snapshot_of_mounted_origin),
                cmocka_unit_test(test_thin_pool_deactivate_busy_device),
                cmocka_unit_test(test_thin_pool_delete),
                cmocka_unit_test(test_thin_pool_activate_missing_id),
                cmocka_unit_test(test_thin_pool_device_info_and_lists),
                cmocka_unit_test(test_thin_pool_metadata_thin_ids),
                cmocka_unit_test(test_thin_pool_concurrent_callers),
                cmocka_unit_test(test_thin_pool_out_of_space),
                cmocka_unit_test(test_thin_pool_teardown_guards_active_devices),
        };
        const char *debug = getenv("FIM_TEST_DEBUG");

        /* Line by line: when the VM times out, the output shows where it stopped. */
        (void)setvbuf(stdout, NULL, _IOLBF, 0);
        /* The node alone proves nothing: libdevmapper creates it even without a driver. */
        if (access("/dev/mapper/control", F_OK) != 0 ||
            access("/sys/class/misc/device-mapper", F_OK) != 0) {
                fprintf(stderr, "test_thin_pool: device-mapper is not available "
                                "(no /dev/mapper/control or no driver); run these tests in the "
                                "VM: tests/dm/run_in_vm.sh\n");
                return 1;
        }
        if (geteuid() != 0) {
                fprintf(stderr, "test_thin_pool: needs root (loop devices, dm ioctls, mount)\n");
                return 1;
        }
        if (debug && strcmp(debug, "1") == 0)
                log_set_level(LOG_LEVEL_DEBUG);
        return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
