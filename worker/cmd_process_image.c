/*
 * `process-image`: download, unpack and activate one image in this process, with the same
 * FSM records, idempotency and errors as the worker, and without Kafka. Each stage's
 * response is printed as it finishes; the exit status is 1 with the failing stage's error.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json-c/json.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "stages/request.h"
#include "worker/cli.h"
#include "worker/commands.h"
#include "worker/lease.h"
#include "worker/stage.h"

/* How long to wait for another worker that holds the same job before giving up. */
#define PROCESS_BUSY_WAIT_MS (10 * 60 * 1000)

static atomic_int process_stop;

static void process_on_signal(int sig)
{
        (void)sig;
        process_stop = 1;
}

struct process_progress {
        bool enabled;
        int64_t last_ms;
        bool drawn;
};

/*
 * One status line on the terminal, redrawn at most a few times a second, and once more when
 * a download completes so that it ends at 100%. The cursor goes back to the start of the
 * line after each draw: a log record written meanwhile then overwrites the status line
 * instead of being glued to its end.
 */
static void process_progress_cb(const char *stage, uint64_t done, uint64_t total, void *userdata)
{
        struct process_progress *p = userdata;
        int64_t now = util_now_monotonic_ms();
        bool download = strcmp(stage, "download") == 0;
        bool finished = download && total > 0 && done >= total;

        if (!p->enabled || (now - p->last_ms < 200 && !finished))
                return;
        p->last_ms = now;
        p->drawn = true;
        if (download && total > 0)
                fprintf(stderr, "\r  download: %" PRIu64 " / %" PRIu64 " MiB (%3.0f%%)   \r",
                        done >> 20, total >> 20, 100.0 * (double)done / (double)total);
        else if (strcmp(stage, "unpack") == 0)
                fprintf(stderr, "\r  unpack: %" PRIu64 " entries, %" PRIu64 " MiB   \r", done,
                        total >> 20);
        fflush(stderr);
}

static void process_progress_clear(struct process_progress *p)
{
        if (p->drawn)
                fprintf(stderr, "\r%60s\r", "");
        p->drawn = false;
}

static void process_print_text(const char *stage, const struct stage_result *res)
{
        struct json_object *o = res->response ? json_tokener_parse(res->response) : NULL;

        printf("%s: %s (run %s)\n", stage,
               res->outcome == FSM_OUTCOME_ALREADY_COMPLETE ? "already done" : "done", res->run_id);
        if (!o)
                return;
        json_object_object_foreach(o, k, v)
        {
                printf("  %-14s %s\n", k, json_object_get_string(v));
        }
        json_object_put(o);
}

/*
 * The job is another worker's: its run has a live lease. A worker that dies loses the lease
 * after LEASE_SECONDS and the next try takes the run over, so a holder still there after
 * the whole wait is alive and at work; one we stopped waiting for may be either.
 */
static int process_busy(const struct stage_ctx *ctx, const char *stage,
                        const struct stage_result *res)
{
        if (process_stop)
                return err_set(
                        -EBUSY,
                        "%s of image '%s' stopped while waiting for run %s, which another worker holds; see 'flyio-image-manager status --run-id %s', then run this command again: it finds the run finished, or takes it over once that worker's lease has expired (LEASE_SECONDS, %d s, after it died)",
                        stage, res->image_id, res->run_id, res->run_id, ctx->cfg->lease_seconds);
        return err_set(
                -EBUSY,
                "%s of image '%s' not done: run %s is still held by another worker after %d minutes (a live one: a dead worker's lease expires after LEASE_SECONDS, %d s); see 'flyio-image-manager status --run-id %s' and run this command again later",
                stage, res->image_id, res->run_id, PROCESS_BUSY_WAIT_MS / 60000,
                ctx->cfg->lease_seconds, res->run_id);
}

/* Run one stage, waiting while another worker holds the same job. */
static int process_stage(const struct stage_ctx *ctx, enum stage_id id, const char *request,
                         struct stage_result *res)
{
        const struct stage *st = stage_get(id);
        int64_t deadline = util_now_monotonic_ms() + PROCESS_BUSY_WAIT_MS;
        bool said = false;
        int r;

        for (;;) {
                r = st->handle(ctx, request, res);
                if (r < 0)
                        return err_wrap(r, "%s failed", st->name);
                if (res->outcome != FSM_OUTCOME_BUSY)
                        break;
                stage_result_done(res);
                if (!said)
                        fprintf(stderr,
                                "%s of image '%s': run %s is held by another worker; waiting for it (up to %d minutes)\n",
                                st->name, res->image_id, res->run_id, PROCESS_BUSY_WAIT_MS / 60000);
                said = true;
                if (process_stop || util_now_monotonic_ms() > deadline)
                        return process_busy(ctx, st->name, res);
                util_sleep_ms(1000);
        }
        switch (res->outcome) {
        case FSM_OUTCOME_COMPLETE:
        case FSM_OUTCOME_ALREADY_COMPLETE:
                return 0;
        case FSM_OUTCOME_FAILED:
                return err_set(res->error ? res->error : -EIO,
                               "%s of image '%s' failed (%s, run %s, %d attempt%s): %s", st->name,
                               res->image_id, res->error_class, res->run_id[0] ? res->run_id : "-",
                               res->attempts, res->attempts == 1 ? "" : "s", res->error_text);
        default:
                return err_set(res->error ? res->error : -EINTR,
                               "%s of image '%s' interrupted (run %s): %s", st->name, res->image_id,
                               res->run_id,
                               res->error_text[0] ? res->error_text
                                                  : "resume it by running the same command again");
        }
}

static const char *process_field(struct json_object *o, const char *field)
{
        struct json_object *v = NULL;

        return json_object_object_get_ex(o, field, &v) ? json_object_get_string(v) : "";
}

/*
 * The response of a stage that completed, parsed, as the next stage's input. A run recorded
 * complete may have no stored response (stage.h) or an unreadable one: the pipeline cannot
 * go on from it, and rerunning would find the same run, so say which run it is.
 */
static int process_response(const struct stage_result *res, const char *stage, const char *next,
                            struct json_object **ret)
{
        struct json_object *o = res->response ? json_tokener_parse(res->response) : NULL;

        if (!o || !json_object_is_type(o, json_type_object)) {
                json_object_put(o);
                return err_set(
                        -EBADMSG,
                        "%s run %s is complete but has %s stored response, so %s has no input; see 'flyio-image-manager status --run-id %s'",
                        stage, res->run_id[0] ? res->run_id : "-",
                        res->response ? "an unreadable" : "no", next,
                        res->run_id[0] ? res->run_id : "-");
        }
        *ret = o;
        return 0;
}

struct process_args {
        struct download_request download;
        const char *pool;
        int64_t device_size;
        bool json;
};

static int process_run(const struct config *cfg, struct db *db, struct lease_keeper *leases,
                       const struct process_args *a)
{
        struct process_progress progress = {.enabled = isatty(STDERR_FILENO) == 1};
        char worker_id[300];
        struct stage_ctx ctx = {
                .cfg = cfg,
                .db = db,
                .leases = leases,
                .worker_id = worker_id,
                .stop = &process_stop,
                .handoff = false,
                .progress = process_progress_cb,
                .progress_userdata = &progress,
        };
        struct stage_result res[STAGE_COUNT] = {0};
        struct json_object *out = json_object_new_object();
        struct unpack_request unpack = {0};
        struct activate_request activate = {0};
        struct json_object *resp = NULL;
        char *request = NULL;
        int r;

        (void)snprintf(worker_id, sizeof(worker_id), "%s/process-image/%ld", cfg->host_id,
                       (long)getpid());
        request = download_request_encode(&a->download);
        r = request ? process_stage(&ctx, STAGE_DOWNLOAD, request, &res[0]) : -ENOMEM;
        free(request);
        process_progress_clear(&progress);
        if (r < 0)
                goto out;
        if (!a->json)
                process_print_text("download", &res[0]);

        r = process_response(&res[0], "download", "unpack", &resp);
        if (r < 0)
                goto out;
        (void)snprintf(unpack.image_id, sizeof(unpack.image_id), "%s", a->download.image_id);
        (void)snprintf(unpack.local_path, sizeof(unpack.local_path), "%s",
                       process_field(resp, "local_path"));
        (void)snprintf(unpack.checksum, sizeof(unpack.checksum), "%s",
                       process_field(resp, "checksum"));
        (void)snprintf(unpack.pool_name, sizeof(unpack.pool_name), "%s", a->pool ? a->pool : "");
        unpack.device_size = a->device_size;
        json_object_put(resp);
        resp = NULL;
        request = unpack_request_encode(&unpack);
        r = request ? process_stage(&ctx, STAGE_UNPACK, request, &res[1]) : -ENOMEM;
        free(request);
        process_progress_clear(&progress);
        if (r < 0)
                goto out;
        if (!a->json)
                process_print_text("unpack", &res[1]);

        r = process_response(&res[1], "unpack", "activate", &resp);
        if (r < 0)
                goto out;
        (void)snprintf(activate.image_id, sizeof(activate.image_id), "%s", a->download.image_id);
        (void)snprintf(activate.device_id, sizeof(activate.device_id), "%s",
                       process_field(resp, "device_id"));
        (void)snprintf(activate.device_name, sizeof(activate.device_name), "%s",
                       process_field(resp, "device_name"));
        (void)snprintf(activate.pool_name, sizeof(activate.pool_name), "%s",
                       a->pool ? a->pool : "");
        json_object_put(resp);
        resp = NULL;
        request = activate_request_encode(&activate);
        r = request ? process_stage(&ctx, STAGE_ACTIVATE, request, &res[2]) : -ENOMEM;
        free(request);
        if (r < 0)
                goto out;
        if (!a->json)
                process_print_text("activate", &res[2]);
out:
        if (a->json) {
                for (int i = 0; i < STAGE_COUNT; i++) {
                        struct json_object *st;

                        if (!res[i].run_id[0] && !res[i].response)
                                continue;
                        st = json_object_new_object();
                        json_object_object_add(st, "run_id", json_object_new_string(res[i].run_id));
                        json_object_object_add(
                                st, "outcome",
                                json_object_new_string(fsm_outcome_name(res[i].outcome)));
                        if (res[i].response)
                                json_object_object_add(st, "response",
                                                       json_tokener_parse(res[i].response));
                        if (res[i].error_class) {
                                json_object_object_add(st, "error_class",
                                                       json_object_new_string(res[i].error_class));
                                json_object_object_add(st, "error",
                                                       json_object_new_string(res[i].error_text));
                        }
                        json_object_object_add(out, stage_name((enum stage_id)i), st);
                }
                json_object_object_add(out, "ok", json_object_new_boolean(r == 0));
                printf("%s\n", json_object_to_json_string_ext(out, JSON_C_TO_STRING_PRETTY));
        }
        json_object_put(out);
        for (int i = 0; i < STAGE_COUNT; i++)
                stage_result_done(&res[i]);
        return r;
}

static void process_help(void)
{
        printf("Usage: flyio-image-manager process-image --s3-key KEY --image-id ID [flags]\n"
               "\n"
               "Download s3://BUCKET/KEY, unpack it into a new thin device of the pool and\n"
               "activate a snapshot of it as /dev/mapper/snapshot-ID, in this process. Each\n"
               "stage is skipped when its work is already done. Needs root, a thin pool and\n"
               "a migrated database.\n"
               "\n"
               "  --s3-key KEY        S3 object key of the image tarball (required)\n"
               "  --image-id ID       image identifier: letters, digits, '-', '_', '.' (required)\n"
               "  --bucket BUCKET     S3 bucket (default S3_BUCKET)\n"
               "  --checksum SHA256   expected SHA-256 of the tarball (optional)\n"
               "  --pool NAME         devicemapper thin pool (default POOL_NAME)\n"
               "  --device-size SIZE  thin device size, e.g. 10G (default DEVICE_SIZE)\n"
               "  --json              print the stage responses as one JSON document\n");
}

int cmd_process_image(int argc, char **argv)
{
        static const struct option opts[] = {
                {"s3-key", required_argument, NULL, 'k'},
                {"image-id", required_argument, NULL, 'i'},
                {"bucket", required_argument, NULL, 'b'},
                {"checksum", required_argument, NULL, 'c'},
                {"pool", required_argument, NULL, 'p'},
                {"device-size", required_argument, NULL, 's'},
                {"json", no_argument, NULL, 'j'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        struct process_args a = {0};
        const char *key = NULL, *id = NULL, *bucket = NULL, *checksum = NULL;
        struct config cfg;
        struct db *db = NULL;
        struct lease_keeper *leases = NULL;
        struct sigaction sa = {.sa_handler = process_on_signal, .sa_flags = SA_RESTART};
        uint64_t size;
        int c, r, status = CMD_EXIT_FAILURE;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                switch (c) {
                case 'k':
                        key = optarg;
                        break;
                case 'i':
                        id = optarg;
                        break;
                case 'b':
                        bucket = optarg;
                        break;
                case 'c':
                        checksum = optarg;
                        break;
                case 'p':
                        a.pool = optarg;
                        break;
                case 's':
                        if (util_parse_size(optarg, &size) < 0 || size == 0 || size % 512 ||
                            size > (uint64_t)INT64_MAX)
                                return cli_usage(
                                        argv[0],
                                        "--device-size '%s': expected a positive size that is a multiple of 512 bytes (e.g. 10G)",
                                        optarg);
                        a.device_size = (int64_t)size;
                        break;
                case 'j':
                        a.json = true;
                        break;
                case 'h':
                        process_help();
                        return CMD_EXIT_OK;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        if (!key || !id)
                return cli_usage(argv[0], "missing required flag %s",
                                 !key ? "--s3-key" : "--image-id");
        if (util_snprintf(a.download.s3_key, sizeof(a.download.s3_key), "%s", key) < 0 ||
            util_snprintf(a.download.image_id, sizeof(a.download.image_id), "%s", id) < 0 ||
            util_snprintf(a.download.bucket, sizeof(a.download.bucket), "%s",
                          bucket ? bucket : "") < 0 ||
            util_snprintf(a.download.checksum, sizeof(a.download.checksum), "%s",
                          checksum ? checksum : "") < 0 ||
            download_request_validate(&a.download) < 0 ||
            (a.pool && request_validate_dm_name("pool_name", a.pool) < 0))
                return cli_usage(argv[0], "%s", err_last()[0] ? err_last() : "a value is too long");

        if (cli_config(&cfg) < 0)
                return CMD_EXIT_USAGE;
        if (cli_db_open(&cfg, true, &db) < 0)
                goto out;
        r = lease_keeper_new(cfg.database_url, cfg.lease_seconds * 1000, &leases);
        if (r < 0) {
                cli_fail(r);
                goto out;
        }
        (void)sigaction(SIGINT, &sa, NULL);
        (void)sigaction(SIGTERM, &sa, NULL);
        r = process_run(&cfg, db, leases, &a);
        status = r < 0 ? cli_fail(r) : CMD_EXIT_OK;
out:
        lease_keeper_free(leases);
        db_free(db);
        config_done(&cfg);
        return status;
}
