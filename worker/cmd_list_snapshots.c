/* `list-snapshots [--active-only[=BOOL]]`: activated snapshots on this host. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "worker/cli.h"
#include "worker/commands.h"

static const char cmd_list_snapshots_sql[] =
        "SELECT snapshot_name, image_id, device_id, origin_id, pool_name, state, device_path,"
        " " DB_TIME(
                "activated_at") " FROM snapshots WHERE host_id = $1 AND (NOT $2::bool OR state = 'active')"
                                " ORDER BY snapshot_name";

static const char cmd_list_snapshots_json_sql[] =
        "SELECT coalesce(json_agg(s ORDER BY s.snapshot_name), '[]') FROM (SELECT host_id,"
        " snapshot_name, image_id, device_id AS snapshot_id, origin_id, pool_name, state,"
        " device_path, state = 'active' AS active, run_id, created_at, activated_at FROM snapshots"
        " WHERE host_id = $1 AND (NOT $2::bool OR state = 'active')) s";

int cmd_list_snapshots(int argc, char **argv)
{
        static const struct option opts[] = {
                {"active-only", optional_argument, NULL, 'a'},
                {"all", no_argument, NULL, 'A'},
                {"json", no_argument, NULL, 'j'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        static const char *const headers[] = {"SNAPSHOT", "IMAGE_ID", "SNAPSHOT_ID", "ORIGIN_ID",
                                              "POOL",     "STATE",    "DEVICE",      "ACTIVATED"};
        bool active_only = true, json = false;
        struct config cfg;
        struct db *db = NULL;
        PGresult *res = NULL;
        int c, r, status = CMD_EXIT_FAILURE;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                switch (c) {
                case 'a':
                        if (optarg && util_parse_bool(optarg, &active_only) < 0)
                                return cli_usage(argv[0],
                                                 "--active-only='%s': expected true or false",
                                                 optarg);
                        if (!optarg)
                                active_only = true;
                        break;
                case 'A':
                        active_only = false;
                        break;
                case 'j':
                        json = true;
                        break;
                case 'h':
                        printf("Usage: flyio-image-manager list-snapshots [--active-only[=BOOL]] [--all] [--json]\n"
                               "\n"
                               "List snapshots made by the activate stage on this host (HOST_ID).\n"
                               "\n"
                               "  --active-only[=BOOL]  only active snapshots (default true)\n"
                               "  --all                 every snapshot, same as --active-only=false\n"
                               "  --json                machine-readable output\n");
                        return CMD_EXIT_OK;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        if (cli_config(&cfg) < 0)
                return CMD_EXIT_FAILURE;
        if (cli_db_open(&cfg, true, &db) < 0)
                goto out;
        {
                const char *params[2] = {cfg.host_id, active_only ? "true" : "false"};

                if (json) {
                        r = cli_print_json_query(db, cmd_list_snapshots_json_sql, 2, params);
                } else {
                        r = db_exec(db, &res, cmd_list_snapshots_sql, 2, params);
                        if (r == 0)
                                cli_print_table(res, headers);
                }
        }
        status = r < 0 ? cli_fail(r) : CMD_EXIT_OK;
out:
        PQclear(res);
        db_free(db);
        config_done(&cfg);
        return status;
}
