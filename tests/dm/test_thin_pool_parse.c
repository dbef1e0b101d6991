/*
 * Offline tests for the thin pool layer: the kernel-output parsers, metadata sizing, name and
 * size validation and the pool-setup command line. Nothing here touches device-mapper, so this
 * file runs on the host with the unit tests (label "unit"); test_thin_pool.c needs the VM.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysmacros.h>

#include <cmocka.h>

#include "common/err.h"
#include "stages/pool_setup.h"
#include "stages/thin_pool.h"
#include "worker/cli.h"
#include "worker/commands.h"

#define MiB (UINT64_C(1) << 20)

static void test_thin_pool_parse_status_fresh_pool(void **state)
{
        struct thin_pool_status s;

        (void)state;
        assert_int_equal(thin_pool_parse_status("0 1653/16384 529/16384 - rw discard_passdown "
                                                "queue_if_no_space - 1024 ",
                                                &s),
                         0);
        assert_int_equal(s.transaction_id, 0);
        assert_int_equal(s.metadata_used_blocks, 1653);
        assert_int_equal(s.metadata_total_blocks, 16384);
        assert_int_equal(s.data_used_blocks, 529);
        assert_int_equal(s.data_total_blocks, 16384);
        assert_int_equal(s.held_metadata_root, 0);
        assert_int_equal(s.mode, THIN_POOL_MODE_RW);
        assert_int_equal(s.discard, THIN_POOL_DISCARD_PASSDOWN);
        assert_false(s.error_if_no_space);
        assert_false(s.needs_check);
        assert_int_equal(s.metadata_low_watermark, 1024);
}

static void test_thin_pool_parse_status_unhealthy_pool(void **state)
{
        struct thin_pool_status s;

        (void)state;
        /* Older kernels print no metadata low watermark. */
        assert_int_equal(thin_pool_parse_status("7 20/512 256/256 42 out_of_data_space "
                                                "no_discard_passdown error_if_no_space needs_check",
                                                &s),
                         0);
        assert_int_equal(s.transaction_id, 7);
        assert_int_equal(s.held_metadata_root, 42);
        assert_int_equal(s.mode, THIN_POOL_MODE_OUT_OF_DATA_SPACE);
        assert_int_equal(s.discard, THIN_POOL_DISCARD_NO_PASSDOWN);
        assert_true(s.error_if_no_space);
        assert_true(s.needs_check);
        assert_int_equal(s.metadata_low_watermark, 0);

        assert_int_equal(
                thin_pool_parse_status("1 2/3 4/5 - ro ignore_discard queue_if_no_space -", &s), 0);
        assert_int_equal(s.mode, THIN_POOL_MODE_RO);
        assert_int_equal(s.discard, THIN_POOL_DISCARD_IGNORE);

        assert_int_equal(thin_pool_parse_status("Fail", &s), 0);
        assert_int_equal(s.mode, THIN_POOL_MODE_FAIL);
        assert_int_equal(s.data_total_blocks, 0);
}

static void test_thin_pool_parse_status_rejects_garbage(void **state)
{
        static const char *const bad[] = {
                "",
                "0 1/2 3/4",
                "0 1/2 3/4 - rw discard_passdown queue_if_no_space",
                "x 1/2 3/4 - rw discard_passdown queue_if_no_space -",
                "0 3/2 3/4 - rw discard_passdown queue_if_no_space -",
                "0 1-2 3/4 - rw discard_passdown queue_if_no_space -",
                "0 1/2 3/4 - rx discard_passdown queue_if_no_space -",
                "0 1/2 3/4 - rw discard queue_if_no_space -",
                "0 1/2 3/4 - rw discard_passdown queue -",
                "0 1/2 3/4 - rw discard_passdown queue_if_no_space maybe",
                "0 1/2 3/4 z rw discard_passdown queue_if_no_space -",
        };
        struct thin_pool_status s;

        (void)state;
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                if (thin_pool_parse_status(bad[i], &s) != -EBADMSG)
                        fail_msg("accepted '%s'", bad[i]);
        }
}

static void test_thin_pool_parse_table(void **state)
{
        struct thin_pool_table t;

        (void)state;
        assert_int_equal(thin_pool_parse_table("7:1 7:0 128 1638", &t), 0);
        assert_int_equal(major(t.metadata_dev), 7);
        assert_int_equal(minor(t.metadata_dev), 1);
        assert_int_equal(minor(t.data_dev), 0);
        assert_int_equal(t.block_sectors, 128);
        assert_int_equal(t.low_water_mark, 1638);
        assert_false(t.skip_block_zeroing);

        assert_int_equal(thin_pool_parse_table("259:10 259:11 2048 0 2 skip_block_zeroing "
                                               "error_if_no_space",
                                               &t),
                         0);
        assert_int_equal(major(t.metadata_dev), 259);
        assert_int_equal(t.block_sectors, 2048);
        assert_true(t.skip_block_zeroing);
        assert_true(t.error_if_no_space);
        assert_false(t.read_only);

        assert_int_equal(thin_pool_parse_table("7:1 7:0 128", &t), -EBADMSG);
        assert_int_equal(thin_pool_parse_table("7:1 7:0 128 0 2 skip_block_zeroing", &t), -EBADMSG);
        assert_int_equal(thin_pool_parse_table("7-1 7:0 128 0", &t), -EBADMSG);
        assert_int_equal(thin_pool_parse_table("7:1 7: 128 0", &t), -EBADMSG);
        assert_int_equal(thin_pool_parse_table("7:1 7:0 0 0", &t), -EBADMSG);
}

static void test_thin_pool_parse_thin_table(void **state)
{
        dev_t pool;
        uint32_t id;

        (void)state;
        assert_int_equal(thin_pool_parse_thin_table("254:0 5", &pool, &id), 0);
        assert_int_equal(major(pool), 254);
        assert_int_equal(minor(pool), 0);
        assert_int_equal(id, 5);
        assert_int_equal(thin_pool_parse_thin_table("254:3 16777215 7:4", &pool, &id), 0);
        assert_int_equal(id, 16777215);
        assert_int_equal(thin_pool_parse_thin_table("254:3 16777216", &pool, &id), -EBADMSG);
        assert_int_equal(thin_pool_parse_thin_table("254:3", &pool, &id), -EBADMSG);
        assert_int_equal(thin_pool_parse_thin_table("/dev/mapper/pool 1", &pool, &id), -EBADMSG);
}

static void test_thin_pool_parse_dump_ids(void **state)
{
        static const char xml[] =
                "<superblock uuid=\"\" time=\"3\" transaction=\"0\" flags=\"0\" version=\"2\" "
                "data_block_size=\"128\" nr_data_blocks=\"16384\">\n"
                "  <device dev_id=\"7\" mapped_blocks=\"0\" transaction=\"0\" "
                "creation_time=\"0\" snap_time=\"0\">\n  </device>\n"
                "  <device dev_id=\"1\" mapped_blocks=\"12\" transaction=\"0\" "
                "creation_time=\"0\" snap_time=\"1\">\n  </device>\n"
                "  <device dev_id=\"16777215\" mapped_blocks=\"0\">\n  </device>\n"
                "</superblock>\n";
        uint32_t *ids = NULL;
        size_t n = 0;

        (void)state;
        assert_int_equal(thin_pool_parse_dump_ids(xml, &ids, &n), 0);
        assert_int_equal(n, 3);
        assert_int_equal(ids[0], 1);
        assert_int_equal(ids[1], 7);
        assert_int_equal(ids[2], 16777215);
        free(ids);

        assert_int_equal(thin_pool_parse_dump_ids("<superblock>\n</superblock>\n", &ids, &n), 0);
        assert_int_equal(n, 0);
        assert_null(ids);
        assert_int_equal(thin_pool_parse_dump_ids("bad checksum in superblock", &ids, &n),
                         -EBADMSG);
        assert_int_equal(thin_pool_parse_dump_ids("<superblock><device dev_id=\"x\">", &ids, &n),
                         -EBADMSG);
        assert_int_equal(
                thin_pool_parse_dump_ids("<superblock><device dev_id=\"99999999\">", &ids, &n),
                -EBADMSG);
}

static void test_thin_pool_metadata_size_rule(void **state)
{
        (void)state;
        /* 48 bytes per 64 KiB block; never below 2 MiB. */
        assert_int_equal(pool_setup_metadata_size(16 * MiB, 64 << 10), 2 * MiB);
        assert_int_equal(pool_setup_metadata_size(UINT64_C(1) << 30, 64 << 10), 2 * MiB);
        assert_int_equal(pool_setup_metadata_size(UINT64_C(100) << 30, 64 << 10), 75 * MiB);
        /* Rounded up to whole 4 KiB metadata blocks. */
        assert_int_equal(pool_setup_metadata_size((UINT64_C(1) << 40) + (64 << 10), 64 << 10),
                         (UINT64_C(48) << 24) + 4096);
        /* Capped at what the kernel can use. */
        assert_int_equal(pool_setup_metadata_size(UINT64_C(1) << 50, 64 << 10),
                         POOL_SETUP_MAX_METADATA_SIZE);
        assert_int_equal(POOL_SETUP_MAX_METADATA_SIZE, UINT64_C(17045913600));
}

static void test_thin_pool_validates_before_touching_dm(void **state)
{
        char long_name[200];

        (void)state;
        memset(long_name, 'a', sizeof(long_name) - 1);
        long_name[sizeof(long_name) - 1] = '\0';
        assert_true(thin_pool_name_is_valid("thin-42"));
        assert_false(thin_pool_name_is_valid(""));
        assert_false(thin_pool_name_is_valid("a/b"));
        assert_false(thin_pool_name_is_valid(".."));
        assert_false(thin_pool_name_is_valid(long_name));

        assert_int_equal(thin_pool_activate("pool", 1, "thin-1", 1000, NULL), -EINVAL);
        assert_non_null(strstr(err_last(), "multiple of 512"));
        assert_int_equal(thin_pool_activate("pool", 1, "thin-1", 0, NULL), -EINVAL);
        assert_int_equal(thin_pool_activate("pool", 1, "a/b", 4096, NULL), -EINVAL);
        assert_int_equal(thin_pool_create_thin("pool", THIN_POOL_DEV_ID_MAX + 1), -EINVAL);
        assert_int_equal(thin_pool_create_snap("pool", 2, 1u << 24, NULL), -EINVAL);
        assert_int_equal(thin_pool_deactivate("", NULL), -EINVAL);

        struct pool_setup_opts o = POOL_SETUP_OPTS_INIT;

        o.name = "p";
        o.dir = "/nonexistent";
        o.data_size = 100 * 1000;
        assert_int_equal(pool_setup_create(&o, NULL), -EINVAL);
        o.data_size = 16 * MiB;
        o.block_size = 96 << 10;
        assert_int_equal(pool_setup_create(&o, NULL), -EINVAL);
        o.block_size = 64 << 10;
        o.metadata_size = MiB;
        assert_int_equal(pool_setup_create(&o, NULL), -EINVAL);
        err_clear();
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

static void test_thin_pool_cli_usage(void **state)
{
        static const char *const help[] = {"pool-setup", "--help"};
        static const char *const none[] = {"pool-setup"};
        static const char *const no_dir[] = {"pool-setup", "--name", "p"};
        static const char *const force[] = {"pool-setup", "--name", "p", "--dir", "/x", "--force"};
        static const char *const size[] = {"pool-setup", "--name",      "p",   "--dir",
                                           "/x",         "--data-size", "lots"};
        static const char *const mixed[] = {"pool-setup", "--teardown", "--name",      "p",
                                            "--dir",      "/x",         "--data-size", "1G"};
        static const char *const extra[] = {"pool-setup", "--name", "p", "--dir", "/x", "more"};
        static const char *const unknown[] = {"pool-setup", "--colour"};

        (void)state;
        assert_int_equal(run_cli(2, help), CMD_EXIT_OK);
        assert_int_equal(run_cli(1, none), CMD_EXIT_USAGE);
        assert_int_equal(run_cli(3, no_dir), CMD_EXIT_USAGE);
        assert_int_equal(run_cli(6, force), CMD_EXIT_USAGE);
        assert_int_equal(run_cli(7, size), CMD_EXIT_USAGE);
        assert_int_equal(run_cli(8, mixed), CMD_EXIT_USAGE);
        assert_int_equal(run_cli(6, extra), CMD_EXIT_USAGE);
        assert_int_equal(run_cli(2, unknown), CMD_EXIT_USAGE);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_thin_pool_parse_status_fresh_pool),
                cmocka_unit_test(test_thin_pool_parse_status_unhealthy_pool),
                cmocka_unit_test(test_thin_pool_parse_status_rejects_garbage),
                cmocka_unit_test(test_thin_pool_parse_table),
                cmocka_unit_test(test_thin_pool_parse_thin_table),
                cmocka_unit_test(test_thin_pool_parse_dump_ids),
                cmocka_unit_test(test_thin_pool_metadata_size_rule),
                cmocka_unit_test(test_thin_pool_validates_before_touching_dm),
                cmocka_unit_test(test_thin_pool_cli_usage),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
