/* `migrate`: bring the database schema up to this binary's version. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>

#include "common/err.h"
#include "config/config.h"
#include "db/db.h"
#include "worker/cli.h"
#include "worker/commands.h"

static void cmd_migrate_help(void)
{
        printf("Usage: flyio-image-manager migrate\n"
               "\n"
               "Apply the SQL migrations compiled into this binary that the database (DATABASE_URL)\n"
               "has not seen yet, in one transaction under an advisory lock. Safe to run from\n"
               "several hosts at once and to re-run.\n");
}

int cmd_migrate(int argc, char **argv)
{
        static const struct option opts[] = {
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        struct config cfg;
        struct db *db = NULL;
        int applied = 0, version = 0;
        int c, r, status;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                switch (c) {
                case 'h':
                        cmd_migrate_help();
                        return CMD_EXIT_OK;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        if (cli_config(&cfg) < 0)
                return CMD_EXIT_USAGE;
        if (cli_db_open(&cfg, false, &db) < 0) {
                config_done(&cfg);
                return CMD_EXIT_FAILURE;
        }
        r = db_migrate(db, &applied, &version);
        /* A newer schema has nothing for us to apply, but it is not "nothing to do": this
         * binary would run against tables it does not know. */
        if (r == 0 && version > db_schema_latest())
                r = err_set(
                        -ESTALE,
                        "database schema is at version %d, newer than this binary's %d: this flyio-image-manager is older than the schema; upgrade it (migrations never go backwards)",
                        version, db_schema_latest());
        if (r < 0) {
                status = cli_fail(r);
        } else {
                if (applied == 0)
                        printf("schema already at version %d, nothing to do\n", version);
                else
                        printf("applied %d migration%s, schema now at version %d\n", applied,
                               applied == 1 ? "" : "s", version);
                status = CMD_EXIT_OK;
        }
        db_free(db);
        config_done(&cfg);
        return status;
}
