/*
 * `extract`: unpack one tarball into a directory with the unpack stage's safe extractor,
 * without PostgreSQL, Kafka or a thin device. A developer, test and benchmark aid; the
 * worker calls the same extract_*() functions from its FSM.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/err.h"
#include "common/util.h"
#include "stages/extract.h"
#include "worker/cli.h"
#include "worker/commands.h"

struct cmd_extract_args {
        const char *tar;
        const char *root;
        struct extract_options opts;
        bool json;
};

static void cmd_extract_help(void)
{
        printf("Usage: flyio-image-manager extract --tar FILE --root DIR [FLAGS]\n"
               "\n"
               "Extract the tarball FILE (plain, gzip, zstd or xz) into the existing directory\n"
               "DIR. Nothing outside DIR is ever written or followed, nor any mount point below\n"
               "it: members that try are refused and the command fails. Device nodes and FIFOs\n"
               "are skipped and counted.\n"
               "\n"
               "Run as root, it keeps the archive's owners (like GNU tar); run as another user,\n"
               "files belong to that user and setuid/setgid bits and file capabilities are\n"
               "dropped.\n"
               "\n"
               "Flags:\n"
               "  --tar FILE              the tarball\n"
               "  --root DIR              the directory to extract into\n"
               "  --max-bytes N           limit on file data, e.g. 10G (default 64G)\n"
               "  --max-entries N         limit on archive members (default 1000000)\n"
               "  --max-depth N           limit on path components (default 64)\n"
               "  --max-path-length N     limit on name and link target length (default 4096)\n"
               "  --max-sparse-entries N  limit on one sparse file's map entries (default 65536)\n"
               "  --same-owner            keep the archive's owners and setuid/setgid bits\n"
               "                          (the default as root; otherwise needs CAP_CHOWN)\n"
               "  --no-same-owner         keep files owned by the caller; drops setuid/setgid\n"
               "                          bits and file capabilities (the default as non-root)\n"
               "  --json                  print the counts as one JSON object\n"
               "  -h, --help              print this help\n");
}

/* Parse a positive count that fits an unsigned int; 0 or a usage exit status. */
static int cmd_extract_parse_uint(const char *command, const char *flag, const char *s,
                                  unsigned max, unsigned *ret)
{
        uint64_t v;

        if (util_parse_u64(s, &v) < 0 || v == 0 || v > max)
                return cli_usage(command, "%s '%s': expected a number from 1 to %u", flag, s, max);
        *ret = (unsigned)v;
        return 0;
}

/* Returns 0, CMD_EXIT_USAGE after printing, or -1 when --help was printed. */
static int cmd_extract_parse(int argc, char **argv, struct cmd_extract_args *a)
{
        static const struct option opts[] = {
                {"tar", required_argument, NULL, 't'},
                {"root", required_argument, NULL, 'r'},
                {"max-bytes", required_argument, NULL, 'b'},
                {"max-entries", required_argument, NULL, 'e'},
                {"max-depth", required_argument, NULL, 'd'},
                {"max-path-length", required_argument, NULL, 'l'},
                {"max-sparse-entries", required_argument, NULL, 's'},
                {"same-owner", no_argument, NULL, 'O'},
                {"no-same-owner", no_argument, NULL, 'o'},
                {"json", no_argument, NULL, 'j'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        int c;
        int r;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                r = 0;
                switch (c) {
                case 't':
                        a->tar = optarg;
                        break;
                case 'r':
                        a->root = optarg;
                        break;
                case 'b':
                        if (util_parse_size(optarg, &a->opts.max_total_bytes) < 0)
                                return cli_usage(argv[0],
                                                 "--max-bytes '%s': expected a size, e.g. 10G",
                                                 optarg);
                        break;
                case 'e':
                        if (util_parse_u64(optarg, &a->opts.max_entries) < 0)
                                return cli_usage(argv[0], "--max-entries '%s': expected a number",
                                                 optarg);
                        break;
                case 'd':
                        r = cmd_extract_parse_uint(argv[0], "--max-depth", optarg, 4096,
                                                   &a->opts.max_path_depth);
                        break;
                case 'l':
                        r = cmd_extract_parse_uint(argv[0], "--max-path-length", optarg, 1u << 20,
                                                   &a->opts.max_path_length);
                        break;
                case 's':
                        if (util_parse_u64(optarg, &a->opts.max_sparse_entries) < 0 ||
                            a->opts.max_sparse_entries == 0)
                                return cli_usage(
                                        argv[0],
                                        "--max-sparse-entries '%s': expected a positive number",
                                        optarg);
                        break;
                case 'O':
                        a->opts.preserve_owner = true;
                        break;
                case 'o':
                        a->opts.preserve_owner = false;
                        break;
                case 'j':
                        a->json = true;
                        break;
                case 'h':
                        cmd_extract_help();
                        return -1;
                default:
                        return CMD_EXIT_USAGE;
                }
                if (r != 0)
                        return r;
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        if (!a->tar || !a->root)
                return cli_usage(argv[0], "--tar and --root are required");
        return 0;
}

/* Progress on a terminal's stderr: entries and MiB, overwritten in place. */
static int cmd_extract_progress(uint64_t entries, uint64_t bytes, void *userdata)
{
        (void)userdata;
        fprintf(stderr, "\r%" PRIu64 " entries, %.1f MiB", entries, (double)bytes / 1048576.0);
        (void)fflush(stderr);
        return 0;
}

static void cmd_extract_print(const struct extract_result *res, bool json, int64_t elapsed_ms)
{
        if (json) {
                printf("{\"file_count\":%" PRIu64 ",\"size_bytes\":%" PRIu64
                       ",\"dir_count\":%" PRIu64 ",\"symlink_count\":%" PRIu64
                       ",\"hardlink_count\":%" PRIu64 ",\"skipped_devices\":%" PRIu64
                       ",\"skipped_xattrs\":%" PRIu64 ",\"skipped_other\":%" PRIu64
                       ",\"elapsed_ms\":%" PRId64 "}\n",
                       res->file_count, res->size_bytes, res->dir_count, res->symlink_count,
                       res->hardlink_count, res->skipped_devices, res->skipped_xattrs,
                       res->skipped_other, elapsed_ms);
                return;
        }
        printf("files=%" PRIu64 " bytes=%" PRIu64 " dirs=%" PRIu64 " symlinks=%" PRIu64
               " hardlinks=%" PRIu64 " skipped_devices=%" PRIu64 " skipped_xattrs=%" PRIu64
               " skipped_other=%" PRIu64 " elapsed_ms=%" PRId64 "\n",
               res->file_count, res->size_bytes, res->dir_count, res->symlink_count,
               res->hardlink_count, res->skipped_devices, res->skipped_xattrs, res->skipped_other,
               elapsed_ms);
}

int cmd_extract(int argc, char **argv)
{
        struct cmd_extract_args a = {0};
        struct extract_result res = {0};
        bool progress;
        int64_t start;
        int r;

        extract_options_init(&a.opts);
        /* Only root can give files away: like GNU tar, keep owners by default only then. */
        a.opts.preserve_owner = geteuid() == 0;
        r = cmd_extract_parse(argc, argv, &a);
        if (r != 0)
                return r < 0 ? CMD_EXIT_OK : r;

        progress = !a.json && isatty(STDERR_FILENO) == 1;
        if (progress)
                a.opts.progress = cmd_extract_progress;
        start = util_now_monotonic_ms();
        r = extract_path(a.root, a.tar, &a.opts, &res);
        if (progress)
                fputc('\n', stderr);
        if (r == -EPERM && a.opts.preserve_owner && geteuid() != 0 &&
            strstr(err_last(), "failed to set the owner")) {
                (void)cli_fail(r);
                fprintf(stderr,
                        "hint: keeping the archive's owners needs root: run as root, or pass --no-same-owner\n");
                return CMD_EXIT_FAILURE;
        }
        if (r < 0) {
                uint64_t made = res.file_count + res.dir_count;

                (void)cli_fail(r);
                /* The root may have held files before: only the operator can clean it up. */
                if (made > 0)
                        fprintf(stderr,
                                "note: nothing outside '%s' was changed; what was extracted before the failure (%" PRIu64
                                " member%s) is still in it: remove it before using the directory\n",
                                a.root, made, made == 1 ? "" : "s");
                return CMD_EXIT_FAILURE;
        }
        cmd_extract_print(&res, a.json, util_now_monotonic_ms() - start);
        return CMD_EXIT_OK;
}
