/*
 * `enqueue --s3-key K --image-id I [--bucket B] [--checksum SHA256]`: produce one download
 * request to "<prefix>.download", keyed by the image id (so requests for one image stay in
 * order on one partition), and wait until the broker has it.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/ulid.h"
#include "common/util.h"
#include "config/config.h"
#include "stages/request.h"
#include "worker/cli.h"
#include "worker/commands.h"
#include "worker/dlq.h"
#include "worker/kafka_client.h"
#include "worker/kafka_producer.h"

static void cmd_enqueue_help(void)
{
        printf("Usage: flyio-image-manager enqueue --s3-key KEY --image-id ID [--bucket B]\n"
               "                                   [--checksum SHA256]\n"
               "\n"
               "Produce a download request to '<KAFKA_TOPIC_PREFIX>.download' and wait for\n"
               "the broker to acknowledge it. A worker then downloads, unpacks and activates\n"
               "the image. The bucket defaults to the worker's S3_BUCKET.\n");
}

/* Fill the request from flags; returns 0 or a usage status. */
static int cmd_enqueue_args(int argc, char **argv, struct download_request *req)
{
        static const struct option opts[] = {
                {"s3-key", required_argument, NULL, 'k'},
                {"image-id", required_argument, NULL, 'i'},
                {"bucket", required_argument, NULL, 'b'},
                {"checksum", required_argument, NULL, 'c'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        int c;

        memset(req, 0, sizeof(*req));
        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                char *dst;
                size_t size;

                switch (c) {
                case 'k':
                        dst = req->s3_key;
                        size = sizeof(req->s3_key);
                        break;
                case 'i':
                        dst = req->image_id;
                        size = sizeof(req->image_id);
                        break;
                case 'b':
                        dst = req->bucket;
                        size = sizeof(req->bucket);
                        break;
                case 'c':
                        dst = req->checksum;
                        size = sizeof(req->checksum);
                        break;
                case 'h':
                        cmd_enqueue_help();
                        return -1;
                default:
                        return CMD_EXIT_USAGE;
                }
                if (util_snprintf(dst, size, "%s", optarg) < 0)
                        return cli_usage(argv[0], "'%s' is too long", argv[optind - 1]);
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        if (!req->s3_key[0] || !req->image_id[0])
                return cli_usage(argv[0], "--s3-key and --image-id are required");
        if (download_request_validate(req) < 0)
                return cli_usage(argv[0], "%s", err_last());
        return 0;
}

static int cmd_enqueue_send(const struct config *cfg, const struct download_request *req)
{
        struct kafka_producer *producer = NULL;
        char topic[KAFKA_NAME_MAX], trace_id[ULID_LEN + 1];
        const char *names[] = {MSG_HEADER_TRACE_ID, MSG_HEADER_ATTEMPT};
        const char *values[] = {trace_id, "1"};
        struct kafka_delivery d;
        struct kafka_record rec = {0};
        char *payload = NULL;
        int r;

        r = kafka_client_topic(cfg, "download", topic, sizeof(topic));
        if (r < 0)
                return r;
        r = ulid_new(trace_id);
        if (r < 0)
                return err_set(r, "failed to make a trace id");
        payload = download_request_encode(req);
        if (!payload)
                return err_set(-ENOMEM, "out of memory");
        r = kafka_producer_new(cfg, "enqueue", 15000, &producer);
        if (r < 0)
                goto out;
        rec.topic = topic;
        rec.key = req->image_id;
        rec.key_len = strlen(req->image_id);
        rec.value = payload;
        rec.value_len = strlen(payload);
        rec.headers = kafka_headers_new(ARRAY_SIZE(names), names, values);
        r = kafka_producer_send_sync(producer, &rec, &d);
        if (r < 0) {
                err_wrap(r, "failed to enqueue to '%s' (KAFKA_BROKERS=%s)", topic,
                         cfg->kafka_brokers);
                goto out;
        }
        printf("enqueued download of image '%s' to '%s' (partition %" PRId32 ", offset %" PRId64
               ", trace_id %s)\n",
               req->image_id, topic, d.partition, d.offset, trace_id);
        printf("request: %s\n", payload);
out:
        kafka_producer_free(producer, 5000);
        free(payload);
        return r;
}

int cmd_enqueue(int argc, char **argv)
{
        struct download_request req;
        struct config cfg;
        int r;

        r = cmd_enqueue_args(argc, argv, &req);
        if (r < 0)
                return CMD_EXIT_OK;
        if (r > 0)
                return r;
        if (cli_config(&cfg) < 0)
                return CMD_EXIT_USAGE;
        r = cmd_enqueue_send(&cfg, &req);
        config_done(&cfg);
        return r < 0 ? cli_fail(r) : CMD_EXIT_OK;
}
