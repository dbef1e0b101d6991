/*
 * `verify-system`: one line per check, PASS or FAIL with the reason; exit 1 if any fails.
 * The checks are the seed's (version, devicemapper pool, database, S3, disk space) plus the
 * schema version.
 */
#include <errno.h>
#include <stdarg.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <archive.h>
#include <curl/curl.h>
#include <json-c/json.h>
#include <libdevmapper.h>
#include <librdkafka/rdkafka.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "worker/cli.h"
#include "worker/commands.h"
#include "worker/verify.h"

/* Below this much free space in LOCAL_DIR no realistic image fits. */
#define VERIFY_MIN_FREE_BYTES (1ULL << 30)

struct verify_report {
        bool json;
        int failures;
        struct json_object *checks;
};

void verify_report_add(struct verify_report *rep, const char *name, bool ok, const char *fmt, ...)
{
        char detail[ERR_MSG_MAX];
        va_list ap;

        va_start(ap, fmt);
        (void)vsnprintf(detail, sizeof(detail), fmt, ap);
        va_end(ap);
        log_redact(detail);
        if (!ok)
                rep->failures++;
        if (rep->json) {
                struct json_object *o = json_object_new_object();

                json_object_object_add(o, "check", json_object_new_string(name));
                json_object_object_add(o, "ok", json_object_new_boolean(ok));
                json_object_object_add(o, "detail", json_object_new_string(detail));
                json_object_array_add(rep->checks, o);
                return;
        }
        printf("%-4s  %-14s %s\n", ok ? "PASS" : "FAIL", name, detail);
}

static void verify_version(struct verify_report *rep)
{
        char dm[64] = "?";

        (void)dm_get_library_version(dm, sizeof(dm));
        verify_report_add(
                rep, "version", true,
                "flyio-image-manager %s (libpq %d, librdkafka %s, libcurl %s, %s, libdevmapper %s, json-c %s)",
                FIM_VERSION, PQlibVersion(), rd_kafka_version_str(),
                curl_version_info(CURLVERSION_NOW)->version, archive_version_string(), dm,
                json_c_version());
}

static void verify_database(struct verify_report *rep, const struct config *cfg)
{
        struct db *db = NULL;
        int version = 0, r;

        r = db_connect(cfg->database_url, &db);
        if (r < 0) {
                verify_report_add(rep, "database", false, "%s", err_text(r));
                verify_report_add(rep, "schema", false, "not checked: database unreachable");
                return;
        }
        verify_report_add(rep, "database", true, "connected (PostgreSQL server %d)",
                          db_server_version(db));
        r = db_schema_check(db);
        (void)db_schema_version(db, &version);
        if (r < 0)
                verify_report_add(rep, "schema", false, "%s", err_text(r));
        else
                verify_report_add(rep, "schema", true, "version %d", version);
        db_free(db);
}

static void verify_local_dir(struct verify_report *rep, const struct config *cfg)
{
        struct statvfs st;
        uint64_t free_bytes;

        if (access(cfg->local_dir, W_OK | X_OK) < 0) {
                verify_report_add(
                        rep, "disk", false,
                        "LOCAL_DIR '%s' is not a writable directory: %s (create it or set LOCAL_DIR)",
                        cfg->local_dir, strerror(errno));
                return;
        }
        if (statvfs(cfg->local_dir, &st) < 0) {
                verify_report_add(rep, "disk", false, "cannot stat LOCAL_DIR '%s': %s",
                                  cfg->local_dir, strerror(errno));
                return;
        }
        free_bytes = (uint64_t)st.f_bavail * st.f_frsize;
        verify_report_add(rep, "disk", free_bytes >= VERIFY_MIN_FREE_BYTES,
                          "LOCAL_DIR '%s' has %" PRIu64 " MiB free (need at least %llu MiB)",
                          cfg->local_dir, free_bytes >> 20, VERIFY_MIN_FREE_BYTES >> 20);
}

int cmd_verify_system(int argc, char **argv)
{
        static const struct option opts[] = {
                {"json", no_argument, NULL, 'j'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        struct verify_report rep = {0};
        struct config cfg;
        int c;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                switch (c) {
                case 'j':
                        rep.json = true;
                        break;
                case 'h':
                        printf("Usage: flyio-image-manager verify-system [--json]\n"
                               "\n"
                               "Check the version, configuration, database and schema, LOCAL_DIR\n"
                               "free space, the devicemapper pool, S3 access and the Kafka\n"
                               "brokers. Prints one line per check; exits 1 if any check fails.\n");
                        return CMD_EXIT_OK;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        rep.checks = json_object_new_array();
        verify_version(&rep);
        if (cli_config(&cfg) < 0) {
                verify_report_add(&rep, "configuration", false, "%s", err_last());
        } else {
                verify_report_add(&rep, "configuration", true, "valid (HOST_ID=%s)", cfg.host_id);
                verify_database(&rep, &cfg);
                verify_local_dir(&rep, &cfg);
                verify_devicemapper(&rep, &cfg);
                verify_s3(&rep, &cfg);
                verify_kafka(&rep, &cfg);
        }
        config_done(&cfg);
        if (rep.json) {
                struct json_object *o = json_object_new_object();

                json_object_object_add(o, "ok", json_object_new_boolean(rep.failures == 0));
                json_object_object_add(o, "checks", rep.checks);
                printf("%s\n", json_object_to_json_string_ext(o, JSON_C_TO_STRING_PRETTY));
                json_object_put(o);
        } else {
                json_object_put(rep.checks);
                printf("%s: %d check%s failed\n", rep.failures ? "FAILED" : "OK", rep.failures,
                       rep.failures == 1 ? "" : "s");
        }
        return rep.failures ? CMD_EXIT_FAILURE : CMD_EXIT_OK;
}
