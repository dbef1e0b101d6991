/* `list-snapshots [--active-only[=BOOL]]`: activated snapshots on this host. */
#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <json-c/json.h>

#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "stages/thin_pool.h"
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

/*
 * What device-mapper has under the snapshot's name: "active" (thin id @device_id of pool
 * @pool), "other" (a device of that name that maps something else), "missing" (recorded, not
 * in the kernel) or "unknown" (no device-mapper here, or the pool is not there to compare).
 */
static const char *list_snapshots_kernel_state(const char *name, const char *pool,
                                               const char *device_id)
{
        struct thin_pool_device_info info, pool_info;
        uint64_t id;

        if (access("/dev/mapper/control", R_OK | W_OK) < 0 ||
            thin_pool_device_info(name, &info) < 0)
                return "unknown";
        if (!info.exists)
                return "missing";
        if (!pool || !device_id || util_parse_u64(device_id, &id) < 0 ||
            thin_pool_device_info(pool, &pool_info) < 0 || !pool_info.exists)
                return "unknown";
        if (info.is_thin && info.thin_dev_id == id &&
            info.thin_pool_dev == makedev(pool_info.major, pool_info.minor))
                return "active";
        return "other";
}

/* The table with the kernel's view added: what the database says and what device-mapper has. */
static void list_snapshots_print(const PGresult *res)
{
        static const char *const headers[] = {"SNAPSHOT",  "IMAGE_ID",  "SNAPSHOT_ID",
                                              "ORIGIN_ID", "POOL",      "STATE",
                                              "DEVICE",    "ACTIVATED", "KERNEL"};
        int rows = PQntuples(res);
        size_t w[9] = {0};
        const char **kernel = calloc((size_t)rows + 1, sizeof(*kernel));

        for (int c = 0; c < 9; c++)
                w[c] = strlen(headers[c]);
        for (int i = 0; i < rows; i++) {
                kernel[i] = list_snapshots_kernel_state(db_get(res, i, 0), db_get(res, i, 4),
                                                        db_get(res, i, 2));
                for (int c = 0; c < 9; c++) {
                        const char *v = c < 8 ? db_get(res, i, c) : kernel[i];
                        size_t n = strlen(v ? v : "-");

                        w[c] = n > w[c] ? n : w[c];
                }
        }
        for (int c = 0; c < 9; c++)
                printf("%-*s%s", c == 8 ? 0 : (int)w[c], headers[c], c == 8 ? "\n" : "  ");
        for (int i = 0; i < rows; i++) {
                for (int c = 0; c < 9; c++) {
                        const char *v = c < 8 ? db_get(res, i, c) : kernel[i];

                        printf("%-*s%s", c == 8 ? 0 : (int)w[c], v ? v : "-", c == 8 ? "\n" : "  ");
                }
        }
        free(kernel);
}

/* --json with the kernel's view added to each snapshot. */
static int list_snapshots_json(struct db *db, const char *const *params)
{
        PGresult *res = NULL;
        struct json_object *arr;
        int r;

        r = db_query_row(db, &res, cmd_list_snapshots_json_sql, 2, params);
        if (r <= 0)
                return r;
        arr = json_tokener_parse(db_get(res, 0, 0));
        PQclear(res);
        if (!arr)
                return -EBADMSG;
        for (size_t i = 0; i < json_object_array_length(arr); i++) {
                struct json_object *o = json_object_array_get_idx(arr, i);
                struct json_object *name = NULL, *pool = NULL, *id = NULL;

                if (!json_object_object_get_ex(o, "snapshot_name", &name))
                        continue;
                (void)json_object_object_get_ex(o, "pool_name", &pool);
                (void)json_object_object_get_ex(o, "snapshot_id", &id);
                json_object_object_add(o, "kernel",
                                       json_object_new_string(list_snapshots_kernel_state(
                                               json_object_get_string(name),
                                               pool ? json_object_get_string(pool) : NULL,
                                               id ? json_object_get_string(id) : NULL)));
        }
        printf("%s\n", json_object_to_json_string_ext(arr, JSON_C_TO_STRING_PLAIN));
        json_object_put(arr);
        return 0;
}

int cmd_list_snapshots(int argc, char **argv)
{
        static const struct option opts[] = {
                {"active-only", optional_argument, NULL, 'a'},
                {"all", no_argument, NULL, 'A'},
                {"json", no_argument, NULL, 'j'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        bool active_only = true, json = false;
        struct config cfg;
        struct db *db = NULL;
        PGresult *res = NULL;
        int c, r, status = CMD_EXIT_FAILURE;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                switch (c) {
                case 'a':
                        if (cli_bool_flag(argc, argv, "--active-only", &active_only))
                                return CMD_EXIT_USAGE;
                        break;
                case 'A':
                        active_only = false;
                        break;
                case 'j':
                        json = true;
                        break;
                case 'h':
                        printf("Usage: flyio-image-manager list-snapshots [--active-only [BOOL]] [--all] [--json]\n"
                               "\n"
                               "List snapshots made by the activate stage on this host (HOST_ID).\n"
                               "\n"
                               "  --active-only [BOOL]  only active snapshots (default true); BOOL may follow\n"
                               "                        as --active-only=false or --active-only false\n"
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
                return CMD_EXIT_USAGE;
        if (cli_db_open(&cfg, true, &db) < 0)
                goto out;
        {
                const char *params[2] = {cfg.host_id, active_only ? "true" : "false"};

                if (json) {
                        r = list_snapshots_json(db, params);
                } else {
                        r = db_exec(db, &res, cmd_list_snapshots_sql, 2, params);
                        if (r == 0)
                                list_snapshots_print(res);
                }
        }
        status = r < 0 ? cli_fail(r) : CMD_EXIT_OK;
out:
        PQclear(res);
        db_free(db);
        config_done(&cfg);
        return status;
}
