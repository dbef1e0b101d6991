/*
 * `download`: fetch one S3 object to a file with the download stage's code path, without
 * PostgreSQL or Kafka. A developer and benchmark aid; the worker uses the same
 * download_object() from its FSM.
 *
 * S3 settings come from the configuration like every other command's (default, file,
 * environment, --set): S3_ENDPOINT, S3_FORCE_PATH_STYLE, AWS_REGION, the credentials, and
 * S3_BUCKET and DOWNLOAD_STALL_TIMEOUT as defaults for --bucket and --stall-timeout.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/util.h"
#include "config/config.h"
#include "stages/download.h"
#include "stages/s3_client.h"
#include "worker/cli.h"
#include "worker/commands.h"

struct cmd_download_args {
        const char *bucket;
        const char *key;
        const char *output;
        const char *sha256;
        int parallel;
        uint64_t part_size;
        int64_t stall_ms;
};

static void cmd_download_help(void)
{
        printf("Usage: flyio-image-manager download --bucket B --key K --output FILE [FLAGS]\n"
               "\n"
               "Download one S3 object to FILE (through FILE.part, resumable) and print its\n"
               "size and SHA-256. S3 settings come from the configuration, as for every\n"
               "command (config file, environment, --set): S3_ENDPOINT, S3_FORCE_PATH_STYLE,\n"
               "AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN.\n"
               "\n"
               "Flags:\n"
               "  --bucket B          bucket name (default S3_BUCKET)\n"
               "  --key K             object key\n"
               "  --output FILE       destination file\n"
               "  --parallel N        ranged parts in flight, 1-64 (default 4; 1: one stream)\n"
               "  --part-size S       part size, e.g. 8M (default 8M); larger objects are split\n"
               "  --sha256 HEX        fail unless the object has this SHA-256\n"
               "  --stall-timeout MS  give up when no byte arrives for MS ms\n"
               "                      (default DOWNLOAD_STALL_TIMEOUT)\n"
               "  -h, --help          print this help\n");
}

/* Returns 0, CMD_EXIT_USAGE after printing, or -1 when --help was printed. */
static int cmd_download_parse(int argc, char **argv, struct cmd_download_args *a)
{
        static const struct option opts[] = {
                {"bucket", required_argument, NULL, 'b'},
                {"key", required_argument, NULL, 'k'},
                {"output", required_argument, NULL, 'o'},
                {"parallel", required_argument, NULL, 'p'},
                {"part-size", required_argument, NULL, 's'},
                {"sha256", required_argument, NULL, 'x'},
                {"stall-timeout", required_argument, NULL, 't'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        int c, ms;

        while ((c = cli_getopt(argc, argv, "ho:", opts)) != -1) {
                switch (c) {
                case 'b':
                        a->bucket = optarg;
                        break;
                case 'k':
                        a->key = optarg;
                        break;
                case 'o':
                        a->output = optarg;
                        break;
                case 'p':
                        if (util_parse_int(optarg, 1, 64, &a->parallel) < 0)
                                return cli_usage(argv[0], "--parallel '%s': expected 1 to 64",
                                                 optarg);
                        break;
                case 's':
                        if (util_parse_size(optarg, &a->part_size) < 0 || a->part_size < 4096)
                                return cli_usage(
                                        argv[0],
                                        "--part-size '%s': expected a size of at least 4K, e.g. 8M",
                                        optarg);
                        break;
                case 'x':
                        if (!util_is_sha256_hex(optarg))
                                return cli_usage(argv[0],
                                                 "--sha256: expected 64 lower-case hex digits");
                        a->sha256 = optarg;
                        break;
                case 't':
                        if (util_parse_int(optarg, 1, 3600000, &ms) < 0)
                                return cli_usage(argv[0],
                                                 "--stall-timeout '%s': expected milliseconds",
                                                 optarg);
                        a->stall_ms = ms;
                        break;
                case 'h':
                        cmd_download_help();
                        return -1;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        if (!a->key || !a->output)
                return cli_usage(argv[0], "--key and --output are required");
        return 0;
}

static int cmd_download_client(const struct config *cfg, struct s3_client **ret)
{
        struct s3_client_options o;

        s3_client_options_from_config(cfg, &o);
        return s3_client_new(&o, ret);
}

int cmd_download(int argc, char **argv)
{
        struct cmd_download_args a = {.parallel = 4, .part_size = 8u << 20};
        struct download_result res;
        struct s3_client *client = NULL;
        struct config cfg;
        int64_t start;
        int r, status;

        r = cmd_download_parse(argc, argv, &a);
        if (r != 0)
                return r < 0 ? CMD_EXIT_OK : r;
        if (cli_config(&cfg) < 0)
                return CMD_EXIT_USAGE;
        r = cmd_download_client(&cfg, &client);
        if (r < 0) {
                status = cli_fail(r);
                goto out;
        }

        const struct download_params p = {
                .bucket = a.bucket ? a.bucket : cfg.s3_bucket,
                .key = a.key,
                .dest_path = a.output,
                .parallel_threshold_bytes = a.part_size,
                .part_size = a.part_size,
                .max_connections = (unsigned)a.parallel,
                .stall_timeout_ms =
                        a.stall_ms ? a.stall_ms : (int64_t)cfg.download_stall_timeout * 1000,
                .expected_sha256 = a.sha256,
        };

        start = util_now_monotonic_ms();
        r = download_object(client, &p, NULL, NULL, &res);
        if (r < 0) {
                status = cli_fail(r);
                goto out;
        }
        printf("size=%" PRIu64 " sha256=%s etag=%s parts=%u resumed_from=%" PRIu64
               " elapsed_ms=%" PRId64 "\n",
               res.size, res.sha256, res.etag, res.parts, res.resumed_from_offset,
               util_now_monotonic_ms() - start);
        status = CMD_EXIT_OK;
out:
        s3_client_free(client);
        config_done(&cfg);
        return status;
}
