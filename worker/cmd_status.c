/* `status --run-id ID`: one FSM run and its whole event history. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "common/err.h"
#include "common/ulid.h"
#include "config/config.h"
#include "db/db.h"
#include "worker/cli.h"
#include "worker/commands.h"

static const char cmd_status_run_sql[] =
        "SELECT run_id, fsm, status, state, next_transition, attempt, max_attempts, host_id,"
        " idempotency_key, lease_owner, " DB_TIME("lease_until") ", " DB_TIME(
                "created_at") ","
                              " " DB_TIME("updated_at") ", " DB_TIME(
                                      "finished_at") ", error, error_detail, error_class,"
                                                     " request::text, response::text, trace_id, parent_run_id"
                                                     " FROM fsm_runs WHERE run_id = $1";

static const char cmd_status_events_sql[] =
        "SELECT " DB_TIME("at") ", kind, coalesce(transition, ''), attempt, coalesce(detail, '')"
                                " FROM fsm_events WHERE run_id = $1 ORDER BY id";

static const char cmd_status_json_sql[] =
        "SELECT json_build_object('run', (SELECT row_to_json(r) FROM (SELECT run_id, fsm, status,"
        " state, next_transition, attempt, max_attempts, host_id, idempotency_key, lease_owner,"
        " lease_until, created_at, updated_at, finished_at, error, error_detail, error_class,"
        " request, response, trace_id, parent_run_id FROM fsm_runs WHERE run_id = $1) r),"
        " 'events', (SELECT coalesce(json_agg(e ORDER BY e.id), '[]') FROM (SELECT id, at, kind,"
        " transition, attempt, worker, detail FROM fsm_events WHERE run_id = $1) e))";

static void cmd_status_help(void)
{
        printf("Usage: flyio-image-manager status --run-id ID [--json]\n"
               "\n"
               "Show an FSM run (download, unpack or activate): its status, current state,\n"
               "attempts, lease, error, request and response, and every event in its history.\n"
               "\n"
               "  --run-id ID   the run's ULID (printed by process-image and in the logs)\n"
               "  --json        machine-readable output\n");
}

static void cmd_status_print_run(const PGresult *run, const PGresult *events)
{
        static const char *const labels[] = {
                "run_id",   "fsm",      "status",     "state",        NULL,          "attempt",
                NULL,       "host",     "key",        "lease_owner",  "lease_until", "created",
                "updated",  "finished", "error",      "error_detail", "error_class", "request",
                "response", "trace_id", "parent_run",
        };

        for (int c = 0; c < (int)(sizeof(labels) / sizeof(labels[0])); c++) {
                const char *v = db_get(run, 0, c);

                if (!labels[c] || !v)
                        continue;
                if (c == 3)
                        printf("%-13s%s (next transition #%s)\n", "state:", v, db_get(run, 0, 4));
                else if (c == 5)
                        printf("%-13s%s of %s\n", "attempt:", v, db_get(run, 0, 6));
                else
                        printf("%s:%*s%s\n", labels[c], 12 - (int)strlen(labels[c]), "", v);
        }
        printf("\nevents:\n");
        for (int i = 0; i < PQntuples(events); i++) {
                printf("  %s  %-19s %-16s attempt=%s%s%s\n", db_get(events, i, 0),
                       db_get(events, i, 1), db_get(events, i, 2), db_get(events, i, 3),
                       db_get(events, i, 4)[0] ? "  " : "", db_get(events, i, 4));
        }
}

int cmd_status(int argc, char **argv)
{
        static const struct option opts[] = {
                {"run-id", required_argument, NULL, 'r'},
                {"json", no_argument, NULL, 'j'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        const char *run_id = NULL;
        char id[ULID_LEN + 1];
        bool json = false;
        struct config cfg;
        struct db *db = NULL;
        PGresult *run = NULL, *events = NULL;
        int c, r, status = CMD_EXIT_FAILURE;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                switch (c) {
                case 'r':
                        run_id = optarg;
                        break;
                case 'j':
                        json = true;
                        break;
                case 'h':
                        cmd_status_help();
                        return CMD_EXIT_OK;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        if (!run_id)
                return cli_usage(argv[0], "missing required flag --run-id");
        /* Ids are stored uppercase; one typed or pasted in lowercase is the same id. */
        if (ulid_normalize(run_id, id) < 0)
                return cli_usage(
                        argv[0],
                        "--run-id '%s' is not a ULID (26 characters of Crockford base32: digits and letters except I, L, O and U, the first at most 7)",
                        run_id);
        run_id = id;
        if (cli_config(&cfg) < 0)
                return CMD_EXIT_USAGE;
        if (cli_db_open(&cfg, true, &db) < 0)
                goto out;

        r = db_query_row(db, &run, cmd_status_run_sql, 1, (const char *const[]){run_id});
        if (r == 0)
                r = err_set(-ENOENT, "no run with id '%s'", run_id);
        if (r < 0) {
                status = cli_fail(r);
                goto out;
        }
        if (json) {
                r = cli_print_json_query(db, cmd_status_json_sql, 1, (const char *const[]){run_id});
        } else {
                r = db_exec(db, &events, cmd_status_events_sql, 1, (const char *const[]){run_id});
                if (r == 0)
                        cmd_status_print_run(run, events);
        }
        status = r < 0 ? cli_fail(r) : CMD_EXIT_OK;
out:
        PQclear(run);
        PQclear(events);
        db_free(db);
        config_done(&cfg);
        return status;
}
