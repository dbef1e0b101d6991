/*
 * `list-images [--status S] [--all-hosts] [--json]`: the download stage's images on this
 * host. The table shows the whole SHA-256: it is what an operator compares with a published
 * checksum or a request's, and a prefix cannot be compared with confidence.
 */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "config/config.h"
#include "db/db.h"
#include "worker/cli.h"
#include "worker/commands.h"

static const char *const cmd_list_images_statuses[] = {"pending", "downloading", "completed",
                                                       "failed"};

static const char cmd_list_images_sql[] =
        "SELECT image_id, status, size_bytes, checksum, bucket || '/' || s3_key,"
        " " DB_TIME(
                "updated_at") ", error"
                              " FROM images WHERE ($1::text IS NULL OR host_id = $1) AND ($2::text IS NULL OR status = $2)"
                              " ORDER BY image_id, host_id";

static const char cmd_list_images_json_sql[] =
        "SELECT coalesce(json_agg(i ORDER BY i.image_id, i.host_id), '[]') FROM (SELECT host_id,"
        " image_id, status, bucket, s3_key, local_path, checksum, size_bytes, etag, error, run_id,"
        " created_at, updated_at, downloaded_at FROM images"
        " WHERE ($1::text IS NULL OR host_id = $1) AND ($2::text IS NULL OR status = $2)) i";

int cmd_list_images(int argc, char **argv)
{
        static const struct option opts[] = {
                {"status", required_argument, NULL, 's'},
                {"all-hosts", no_argument, NULL, 'a'},
                {"json", no_argument, NULL, 'j'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        static const char *const headers[] = {"IMAGE_ID", "STATUS",  "SIZE", "CHECKSUM",
                                              "SOURCE",   "UPDATED", "ERROR"};
        const char *status_filter = NULL;
        bool json = false, all_hosts = false;
        struct config cfg;
        struct db *db = NULL;
        PGresult *res = NULL;
        int c, r, status = CMD_EXIT_FAILURE;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                switch (c) {
                case 's':
                        status_filter = optarg;
                        break;
                case 'a':
                        all_hosts = true;
                        break;
                case 'j':
                        json = true;
                        break;
                case 'h':
                        printf("Usage: flyio-image-manager list-images [--status STATUS] [--all-hosts] [--json]\n"
                               "\n"
                               "List the images the download stage knows on this host (HOST_ID).\n"
                               "\n"
                               "  --status STATUS  only pending, downloading, completed or failed\n"
                               "  --all-hosts      every host's images, not only this host's\n"
                               "  --json           machine-readable output\n");
                        return CMD_EXIT_OK;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        if (status_filter) {
                bool known = false;

                for (size_t i = 0; i < 4; i++)
                        known = known || strcmp(status_filter, cmd_list_images_statuses[i]) == 0;
                if (!known)
                        return cli_usage(
                                argv[0],
                                "--status '%s': expected pending, downloading, completed or failed",
                                status_filter);
        }
        if (cli_config(&cfg) < 0)
                return CMD_EXIT_USAGE;
        if (cli_db_open(&cfg, true, &db) < 0)
                goto out;
        {
                const char *params[2] = {all_hosts ? NULL : cfg.host_id, status_filter};

                if (json) {
                        r = cli_print_json_query(db, cmd_list_images_json_sql, 2, params);
                } else {
                        r = db_exec(db, &res, cmd_list_images_sql, 2, params);
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
