/* `worker [--stages download,unpack,activate]`: run the stage pools until SIGTERM/SIGINT. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "worker/cli.h"
#include "worker/commands.h"
#include "worker/kafka_worker.h"
#include "worker/reconcile.h"
#include "worker/stage.h"

static void cmd_worker_help(void)
{
        printf("Usage: flyio-image-manager worker [--stages LIST]\n"
               "\n"
               "Consume stage requests from Kafka and run them: one consumer group\n"
               "'<KAFKA_TOPIC_PREFIX>.<stage>' per stage, with DOWNLOAD_QUEUE_SIZE,\n"
               "UNPACK_QUEUE_SIZE and ACTIVATE_QUEUE_SIZE threads. Handoffs to the next stage\n"
               "go through the outbox; failed messages go to '<KAFKA_TOPIC_PREFIX>.dlq'.\n"
               "SIGTERM or SIGINT stops it gracefully within SHUTDOWN_TIMEOUT seconds; a\n"
               "second signal stops it at once.\n"
               "\n"
               "  --stages LIST   comma-separated stages to run (default: every available one)\n");
}

/* The registered stages, in pipeline order. */
static size_t cmd_worker_all(const struct stage **ret, size_t max)
{
        size_t n = 0;

        for (int id = 0; id < STAGE_COUNT && n < max; id++) {
                const struct stage *s = stage_get((enum stage_id)id);

                if (s)
                        ret[n++] = s;
        }
        return n;
}

static void cmd_worker_names(char *buf, size_t size)
{
        const struct stage *all[STAGE_COUNT];
        size_t n = cmd_worker_all(all, STAGE_COUNT), len = 0;

        buf[0] = '\0';
        for (size_t i = 0; i < n && len < size; i++)
                len += (size_t)snprintf(buf + len, size - len, "%s%s", i ? ", " : "", all[i]->name);
}

/* Parse "download,unpack" into stages; returns 0 or a usage status. */
static int cmd_worker_parse(const char *cmd, const char *list, const struct stage **ret,
                            size_t *ret_n)
{
        char copy[256], names[128];
        size_t n = 0;
        char *save = NULL;

        if (util_snprintf(copy, sizeof(copy), "%s", list) < 0)
                return cli_usage(cmd, "--stages list is too long");
        for (char *name = strtok_r(copy, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
                const struct stage *s = stage_by_name(name);

                if (!s) {
                        cmd_worker_names(names, sizeof(names));
                        return cli_usage(cmd, "unknown stage '%s' (available: %s)", name, names);
                }
                for (size_t i = 0; i < n; i++) {
                        if (ret[i] == s)
                                return cli_usage(cmd, "stage '%s' given twice", name);
                }
                if (n == STAGE_COUNT)
                        return cli_usage(cmd, "too many stages");
                ret[n++] = s;
        }
        if (n == 0)
                return cli_usage(cmd, "--stages needs at least one stage");
        *ret_n = n;
        return 0;
}

/*
 * Before taking jobs, a worker that runs unpack or activate repairs what crashes left in the
 * pool and re-activates what a reboot took away (worker/reconcile.h). A pool that cannot be
 * read is logged and the worker starts anyway: its jobs then fail with the pool's error.
 */
static void cmd_worker_reconcile(const struct config *cfg, const struct stage *const *stages,
                                 size_t n)
{
        struct db *db = NULL;
        bool uses_pool = false;

        for (size_t i = 0; i < n; i++)
                uses_pool = uses_pool || stages[i]->id != STAGE_DOWNLOAD;
        if (!uses_pool ||
            db_connect_interruptible(cfg->database_url, kafka_worker_stopping, NULL, &db) < 0)
                return;
        if (db_schema_check(db) == 0)
                (void)reconcile_at_start(cfg, db);
        db_free(db);
}

int cmd_worker(int argc, char **argv)
{
        static const struct option opts[] = {
                {"stages", required_argument, NULL, 's'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        const struct stage *stages[STAGE_COUNT];
        const char *list = NULL;
        struct config cfg;
        size_t n = 0;
        int c, r;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                switch (c) {
                case 's':
                        list = optarg;
                        break;
                case 'h':
                        cmd_worker_help();
                        return CMD_EXIT_OK;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        if (list) {
                r = cmd_worker_parse(argv[0], list, stages, &n);
                if (r)
                        return r;
        } else {
                n = cmd_worker_all(stages, STAGE_COUNT);
                if (n == 0) {
                        fprintf(stderr, "%s: no stage is available in this build\n", argv[0]);
                        return CMD_EXIT_FAILURE;
                }
        }
        if (cli_config(&cfg) < 0)
                return CMD_EXIT_USAGE;
        /* Before reconciliation, which may take a while: SIGTERM then still stops cleanly. */
        r = kafka_worker_signals();
        if (r < 0) {
                config_done(&cfg);
                return cli_fail(r);
        }
        cmd_worker_reconcile(&cfg, stages, n);
        {
                struct kafka_worker_options wo = {.cfg = &cfg, .stages = stages, .nstages = n};

                r = kafka_worker_run(&wo);
        }
        /* Safe: kafka_worker_run() ends the process itself when any of its threads lives on. */
        config_done(&cfg);
        return r;
}
