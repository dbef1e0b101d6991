/*
 * `verify-system`: one line per check, PASS or FAIL with the reason; exit 1 if any fails,
 * 2 if the configuration itself is invalid (like every command). The checks are the seed's
 * (version, devicemapper pool, database, S3, disk space) plus the schema version and Kafka.
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

/* The groups of checks --skip can leave out, and the check lines each one reports. */
enum verify_group {
        VERIFY_DATABASE = 1 << 0,
        VERIFY_DISK = 1 << 1,
        VERIFY_DEVICEMAPPER = 1 << 2,
        VERIFY_S3 = 1 << 3,
        VERIFY_KAFKA = 1 << 4,
};

static const struct {
        const char *name;
        enum verify_group group;
} verify_groups[] = {
        {"database", VERIFY_DATABASE},
        {"disk", VERIFY_DISK},
        {"devicemapper", VERIFY_DEVICEMAPPER},
        {"s3", VERIFY_S3},
        {"kafka", VERIFY_KAFKA},
};

/* Parse a --skip value: group names separated by commas. Returns 0 or prints, returns 2. */
static int verify_parse_skip(const char *command, const char *value, unsigned *skip)
{
        const char *p = value;

        for (;;) {
                size_t len = strcspn(p, ",");
                bool found = false;

                for (size_t i = 0; i < ARRAY_SIZE(verify_groups); i++) {
                        if (strlen(verify_groups[i].name) == len &&
                            strncmp(verify_groups[i].name, p, len) == 0) {
                                *skip |= verify_groups[i].group;
                                found = true;
                        }
                }
                if (!found)
                        return cli_usage(
                                command,
                                "--skip '%.*s': expected database, disk, devicemapper, s3 or kafka (comma-separated)",
                                (int)len, p);
                if (p[len] == '\0')
                        return 0;
                p += len + 1;
        }
}

/* A check left out on purpose: shown, never a failure. */
static void verify_report_skip(struct verify_report *rep, const char *name)
{
        if (rep->json) {
                struct json_object *o = json_object_new_object();

                json_object_object_add(o, "check", json_object_new_string(name));
                json_object_object_add(o, "ok", json_object_new_boolean(true));
                json_object_object_add(o, "skipped", json_object_new_boolean(true));
                json_object_object_add(o, "detail", json_object_new_string("skipped (--skip)"));
                json_object_array_add(rep->checks, o);
                return;
        }
        printf("%-4s  %-14s %s\n", "SKIP", name, "skipped (--skip)");
}

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

static void verify_run_checks(struct verify_report *rep, const struct config *cfg, unsigned skip)
{
        if (skip & VERIFY_DATABASE)
                verify_report_skip(rep, "database");
        else
                verify_database(rep, cfg);
        if (skip & VERIFY_DISK)
                verify_report_skip(rep, "disk");
        else
                verify_local_dir(rep, cfg);
        if (skip & VERIFY_DEVICEMAPPER)
                verify_report_skip(rep, "devicemapper");
        else
                verify_devicemapper(rep, cfg);
        if (skip & VERIFY_S3)
                verify_report_skip(rep, "s3");
        else
                verify_s3(rep, cfg);
        if (skip & VERIFY_KAFKA)
                verify_report_skip(rep, "kafka");
        else
                verify_kafka(rep, cfg);
}

int cmd_verify_system(int argc, char **argv)
{
        static const struct option opts[] = {
                {"json", no_argument, NULL, 'j'},
                {"skip", required_argument, NULL, 's'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        struct verify_report rep = {0};
        struct config cfg;
        unsigned skip = 0;
        bool config_ok;
        int c;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                switch (c) {
                case 'j':
                        rep.json = true;
                        break;
                case 's':
                        if (verify_parse_skip(argv[0], optarg, &skip) != 0)
                                return CMD_EXIT_USAGE;
                        break;
                case 'h':
                        printf("Usage: flyio-image-manager verify-system [--json] [--skip LIST]\n"
                               "\n"
                               "Check the version, configuration, database and schema, LOCAL_DIR\n"
                               "free space, the devicemapper pool, S3 access and the Kafka\n"
                               "brokers. Prints one line per check; exits 1 if any check fails,\n"
                               "2 if the configuration is invalid.\n"
                               "\n"
                               "  --skip LIST    leave out groups of checks, comma-separated: database,\n"
                               "                 disk, devicemapper, s3, kafka (shown as SKIP)\n");
                        return CMD_EXIT_OK;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        rep.checks = json_object_new_array();
        verify_version(&rep);
        config_ok = cli_config(&cfg) == 0;
        if (!config_ok) {
                verify_report_add(&rep, "configuration", false, "%s", err_last());
        } else {
                verify_report_add(&rep, "configuration", true, "valid (HOST_ID=%s)", cfg.host_id);
                verify_run_checks(&rep, &cfg, skip);
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
        /* An invalid configuration is a usage error, as for every other command. */
        if (!config_ok)
                return CMD_EXIT_USAGE;
        return rep.failures ? CMD_EXIT_FAILURE : CMD_EXIT_OK;
}
