/* pool-setup: create or remove a loop-backed thin pool (stages/pool_setup.h). */
#include "worker/cli.h"
#include "worker/commands.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "common/err.h"
#include "common/util.h"
#include "stages/pool_setup.h"

static const char cmd_pool_setup_usage[] =
        "Usage: flyio-image-manager pool-setup --name POOL --dir DIR [--data-size SIZE]\n"
        "                [--metadata-size auto|SIZE] [--block-size SIZE]\n"
        "                [--low-water-mark BLOCKS] [--error-if-no-space]\n"
        "       flyio-image-manager pool-setup --teardown --name POOL --dir DIR [--force]\n"
        "\n"
        "Create a device-mapper thin pool on two sparse files, DIR/POOL.data and DIR/POOL.meta,\n"
        "attached to loop devices: for development and tests. Running it again for a pool that\n"
        "exists is fine. Pools it did not create are never touched.\n"
        "\n"
        "  --name POOL             pool (dm device) name\n"
        "  --dir DIR               directory of the backing files (created if missing)\n"
        "  --data-size SIZE        data size (default 1G; suffixes K, M, G, T)\n"
        "  --metadata-size SIZE    metadata size, or auto: 48 bytes per data block, >= 2M\n"
        "  --block-size SIZE       data block size, a multiple of 64K (default 64K)\n"
        "  --low-water-mark N      free data blocks that trigger an event (default: 10%)\n"
        "  --error-if-no-space     fail writes at once when full instead of queueing them\n"
        "  --teardown              remove the pool, detach its loops, delete its files\n"
        "  --force                 with --teardown: deactivate active thin devices first\n"
        "  -h, --help              show this help\n";

struct cmd_pool_setup_args {
        struct pool_setup_opts opts;
        bool teardown;
        bool force;
        bool sized; /* a creation-only flag was given */
};

static int cmd_pool_setup_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int cmd_pool_setup_usage_error(const char *fmt, ...)
{
        va_list ap;

        fputs("error: ", stderr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputs("\nTry 'flyio-image-manager pool-setup --help'.\n", stderr);
        return CMD_EXIT_USAGE;
}

static int cmd_pool_setup_size(const char *flag, const char *arg, uint64_t *ret_bytes)
{
        if (util_parse_size(arg, ret_bytes) < 0)
                return cmd_pool_setup_usage_error("invalid %s '%s'", flag, arg);
        return CMD_EXIT_OK;
}

/* Returns CMD_EXIT_OK to go on, or the exit status to stop with (-1 for --help). */
static int cmd_pool_setup_parse(int argc, char **argv, struct cmd_pool_setup_args *a)
{
        enum {
                OPT_NAME = 256,
                OPT_DIR,
                OPT_DATA,
                OPT_META,
                OPT_BLOCK,
                OPT_LWM,
                OPT_ENOSPC,
                OPT_TEARDOWN,
                OPT_FORCE
        };
        static const struct option options[] = {
                {"name", required_argument, NULL, OPT_NAME},
                {"dir", required_argument, NULL, OPT_DIR},
                {"data-size", required_argument, NULL, OPT_DATA},
                {"metadata-size", required_argument, NULL, OPT_META},
                {"block-size", required_argument, NULL, OPT_BLOCK},
                {"low-water-mark", required_argument, NULL, OPT_LWM},
                {"error-if-no-space", no_argument, NULL, OPT_ENOSPC},
                {"teardown", no_argument, NULL, OPT_TEARDOWN},
                {"force", no_argument, NULL, OPT_FORCE},
                {"help", no_argument, NULL, 'h'},
                {NULL, 0, NULL, 0},
        };
        int c, r = CMD_EXIT_OK;

        while (r == CMD_EXIT_OK && (c = cli_getopt(argc, argv, "h", options)) != -1) {
                a->sized |= c == OPT_DATA || c == OPT_META || c == OPT_BLOCK || c == OPT_LWM ||
                            c == OPT_ENOSPC;
                switch (c) {
                case OPT_NAME:
                        a->opts.name = optarg;
                        break;
                case OPT_DIR:
                        a->opts.dir = optarg;
                        break;
                case OPT_DATA:
                        r = cmd_pool_setup_size("--data-size", optarg, &a->opts.data_size);
                        break;
                case OPT_META:
                        a->opts.metadata_size = 0;
                        if (strcmp(optarg, "auto") != 0)
                                r = cmd_pool_setup_size("--metadata-size", optarg,
                                                        &a->opts.metadata_size);
                        break;
                case OPT_BLOCK:
                        r = cmd_pool_setup_size("--block-size", optarg, &a->opts.block_size);
                        break;
                case OPT_LWM:
                        if (util_parse_u64(optarg, &a->opts.low_water_mark) < 0 ||
                            a->opts.low_water_mark == POOL_SETUP_LOW_WATER_MARK_AUTO)
                                r = cmd_pool_setup_usage_error("invalid --low-water-mark '%s'",
                                                               optarg);
                        break;
                case OPT_ENOSPC:
                        a->opts.error_if_no_space = true;
                        break;
                case OPT_TEARDOWN:
                        a->teardown = true;
                        break;
                case OPT_FORCE:
                        a->force = true;
                        break;
                case 'h':
                        fputs(cmd_pool_setup_usage, stdout);
                        return -1;
                default: /* cli_getopt has said what is wrong */
                        return CMD_EXIT_USAGE;
                }
        }
        if (r != CMD_EXIT_OK)
                return r;
        if (optind < argc)
                return cmd_pool_setup_usage_error("unexpected argument '%s'", argv[optind]);
        if (!a->opts.name || !a->opts.dir)
                return cmd_pool_setup_usage_error("--name and --dir are required");
        if (a->force && !a->teardown)
                return cmd_pool_setup_usage_error("--force only goes with --teardown");
        if (a->sized && a->teardown)
                return cmd_pool_setup_usage_error("size options do not go with --teardown");
        return CMD_EXIT_OK;
}

/* "1 GiB", "64 KiB", "3 MiB" when exact, else bytes. */
static const char *cmd_pool_setup_fmt(uint64_t bytes, char *buf, size_t size)
{
        static const char *const units[] = {"TiB", "GiB", "MiB", "KiB"};

        for (unsigned i = 0; i < ARRAY_SIZE(units); i++) {
                unsigned shift = 40 - 10 * i;

                if (bytes >= (UINT64_C(1) << shift) && bytes % (UINT64_C(1) << shift) == 0) {
                        (void)snprintf(buf, size, "%" PRIu64 " %s", bytes >> shift, units[i]);
                        return buf;
                }
        }
        (void)snprintf(buf, size, "%" PRIu64 " bytes", bytes);
        return buf;
}

static int cmd_pool_setup_create(const struct cmd_pool_setup_args *a)
{
        struct pool_setup_result res;
        char d[32], m[32], b[32];
        int r = pool_setup_create(&a->opts, &res);

        if (r < 0) {
                fprintf(stderr, "error: %s\n", err_text(r));
                return CMD_EXIT_FAILURE;
        }
        cmd_pool_setup_fmt(res.data_size, d, sizeof(d));
        cmd_pool_setup_fmt(res.metadata_size, m, sizeof(m));
        cmd_pool_setup_fmt(res.block_size, b, sizeof(b));
        if (res.existed)
                printf("pool '%s' already exists (files in '%s'), nothing to do\n", a->opts.name,
                       a->opts.dir);
        else
                printf("%s pool '%s'\n", res.reattached ? "re-attached existing" : "created",
                       a->opts.name);
        printf("  data:     %s on %s (%s/%s.data)\n", d, res.data_loop, a->opts.dir, a->opts.name);
        printf("  metadata: %s on %s (%s/%s.meta)\n", m, res.metadata_loop, a->opts.dir,
               a->opts.name);
        printf("  block size: %s\n", b);
        return CMD_EXIT_OK;
}

static int cmd_pool_setup_teardown(const struct cmd_pool_setup_args *a)
{
        struct pool_setup_teardown_result res;
        int r = pool_setup_teardown(a->opts.name, a->opts.dir, a->force, &res);

        if (r < 0) {
                fprintf(stderr, "error: %s\n", err_text(r));
                return CMD_EXIT_FAILURE;
        }
        if (r == POOL_SETUP_NOTHING) {
                printf("pool '%s' not found and no files in '%s', nothing to do\n", a->opts.name,
                       a->opts.dir);
                return CMD_EXIT_OK;
        }
        printf("removed pool '%s'%s: %u thin device%s deactivated, %u loop device%s detached, "
               "%u file%s deleted\n",
               a->opts.name, res.pool_removed ? "" : " (was not active)", res.thin_deactivated,
               res.thin_deactivated == 1 ? "" : "s", res.loops_detached,
               res.loops_detached == 1 ? "" : "s", res.files_removed,
               res.files_removed == 1 ? "" : "s");
        return CMD_EXIT_OK;
}

int cmd_pool_setup(int argc, char **argv)
{
        struct cmd_pool_setup_args a = {.opts = POOL_SETUP_OPTS_INIT};
        int r = cmd_pool_setup_parse(argc, argv, &a);

        if (r < 0)
                return CMD_EXIT_OK; /* --help */
        if (r != CMD_EXIT_OK)
                return r;
        err_clear();
        return a.teardown ? cmd_pool_setup_teardown(&a) : cmd_pool_setup_create(&a);
}
