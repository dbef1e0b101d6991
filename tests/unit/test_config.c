/* Unit tests for config/: defaults, precedence, validation messages, secret masking. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/log.h"
#include "config/config.h"
#include "stages/extract.h"

static void clear_env(void)
{
        static const char *const names[] = {
                "S3_BUCKET",         "AWS_REGION",   "AWS_ACCESS_KEY_ID",   "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "DATABASE_URL", "DOWNLOAD_QUEUE_SIZE", "FIM_CONFIG",
                "LOG_LEVEL",         "HOST_ID",      "POOL_NAME",           "UNPACK_QUEUE_SIZE",
        };

        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
                unsetenv(names[i]);
}

static void test_config_seed_defaults(void **state)
{
        struct config cfg;

        (void)state;
        clear_env();
        assert_int_equal(config_load(&cfg, NULL), 0);
        assert_string_equal(cfg.s3_bucket, "flyio-container-images");
        assert_string_equal(cfg.s3_region, "us-east-1");
        assert_string_equal(cfg.db_path, "/var/lib/flyio/images.db");
        assert_string_equal(cfg.fsm_db_path, "/var/lib/flyio/fsm");
        assert_string_equal(cfg.pool_name, "pool");
        assert_string_equal(cfg.local_dir, "/var/lib/flyio/images");
        assert_int_equal(cfg.download_queue_size, 5);
        assert_int_equal(cfg.unpack_queue_size, 2);
        assert_int_equal(cfg.download_timeout, 300);
        assert_int_equal(cfg.unpack_timeout, 1800);
        assert_string_equal(cfg.kafka_topic_prefix, "images");
        assert_true(cfg.device_size == 10ULL << 30);
        assert_true(cfg.host_id[0] != '\0');
        assert_false(config_has_s3_credentials(&cfg));
        assert_int_equal(config_validate(&cfg), 0);
        config_done(&cfg);
}

static void test_config_precedence_file_env_flag(void **state)
{
        char path[] = "/tmp/fim-config-test-XXXXXX";
        int fd = mkstemp(path);
        FILE *f;
        struct config cfg;

        (void)state;
        clear_env();
        assert_true(fd >= 0);
        f = fdopen(fd, "w");
        fputs("# comment\nexport POOL_NAME=filepool\nDOWNLOAD_QUEUE_SIZE = \"7\"\n"
              "S3_BUCKET=file-bucket\n\n",
              f);
        fclose(f);

        setenv("DOWNLOAD_QUEUE_SIZE", "9", 1);
        assert_int_equal(config_load(&cfg, path), 0);
        assert_string_equal(cfg.pool_name, "filepool"); /* file over default */
        assert_int_equal(cfg.download_queue_size, 9);   /* env over file */
        assert_int_equal(config_set(&cfg, "S3_BUCKET", "flag-bucket", CONFIG_SOURCE_FLAG), 0);
        assert_string_equal(cfg.s3_bucket, "flag-bucket"); /* flag over file */
        config_done(&cfg);

        setenv("FIM_CONFIG", path, 1);
        unsetenv("DOWNLOAD_QUEUE_SIZE");
        assert_int_equal(config_load(&cfg, NULL), 0);
        assert_int_equal(cfg.download_queue_size, 7);
        config_done(&cfg);
        unsetenv("FIM_CONFIG");
        unlink(path);
}

static void test_config_invalid_values_name_variable_and_value(void **state)
{
        struct config cfg;

        (void)state;
        clear_env();
        setenv("DOWNLOAD_QUEUE_SIZE", "abc", 1);
        assert_int_equal(config_load(&cfg, NULL), -EINVAL);
        assert_string_equal(
                err_last(),
                "DOWNLOAD_QUEUE_SIZE='abc': expected a positive integer (at most 1024) (from the environment)");
        config_done(&cfg);
        setenv("DOWNLOAD_QUEUE_SIZE", "0", 1);
        assert_int_equal(config_load(&cfg, NULL), -EINVAL);
        config_done(&cfg);
        unsetenv("DOWNLOAD_QUEUE_SIZE");

        assert_int_equal(config_init(&cfg), 0);
        assert_int_equal(config_set(&cfg, "S3_BUCKET", "Bad_Bucket", CONFIG_SOURCE_FLAG), -EINVAL);
        assert_non_null(strstr(err_last(), "S3_BUCKET='Bad_Bucket'"));
        assert_int_equal(config_set(&cfg, "S3_FORCE_PATH_STYLE", "maybe", CONFIG_SOURCE_ENV),
                         -EINVAL);
        assert_int_equal(config_set(&cfg, "DEVICE_SIZE", "10Q", CONFIG_SOURCE_ENV), -EINVAL);
        assert_int_equal(config_set(&cfg, "LOG_LEVEL", "loud", CONFIG_SOURCE_ENV), -EINVAL);
        assert_int_equal(config_set(&cfg, "HOST_ID", "a/b", CONFIG_SOURCE_ENV), -EINVAL);
        assert_int_equal(config_set(&cfg, "NO_SUCH", "x", CONFIG_SOURCE_ENV), -ENOENT);
        assert_int_equal(config_set(&cfg, "DATABASE_URL", "host='unterminated", CONFIG_SOURCE_ENV),
                         -EINVAL);
        assert_int_equal(config_set(&cfg, "AWS_ACCESS_KEY_ID", "AKIAX", CONFIG_SOURCE_ENV), 0);
        assert_int_equal(config_validate(&cfg), -EINVAL);
        assert_non_null(strstr(err_last(), "must be set together"));
        config_done(&cfg);
}

static void test_config_secrets_never_printed(void **state)
{
        struct config cfg;
        char *buf = NULL;
        size_t len = 0;
        FILE *out;

        (void)state;
        clear_env();
        setenv("AWS_ACCESS_KEY_ID", "AKIATESTKEY", 1);
        setenv("AWS_SECRET_ACCESS_KEY", "SuperSecretValue123", 1);
        setenv("AWS_SESSION_TOKEN", "SessionTokenValue456", 1);
        setenv("DATABASE_URL", "postgresql://app:DbPassw0rd@db.example:5432/images", 1);
        assert_int_equal(config_load(&cfg, NULL), 0);
        out = open_memstream(&buf, &len);
        config_print(&cfg, out);
        fclose(out);
        assert_null(strstr(buf, "SuperSecretValue123"));
        assert_null(strstr(buf, "SessionTokenValue456"));
        assert_null(strstr(buf, "DbPassw0rd"));
        assert_non_null(strstr(buf, "AWS_SECRET_ACCESS_KEY=[set]  # environment"));
        assert_non_null(strstr(buf, "DATABASE_URL=postgresql://app:****@db.example:5432/images"));
        assert_non_null(strstr(buf, "POOL_NAME=pool  # default"));
        free(buf);

        /* A secret is masked even where a library echoes it into an error. */
        assert_int_equal(config_set(&cfg, "AWS_SECRET_ACCESS_KEY", "", CONFIG_SOURCE_FLAG), 0);
        {
                char line[128] = "auth failed for DbPassw0rd and SuperSecretValue123";

                log_redact(line);
                assert_null(strstr(line, "DbPassw0rd"));
                assert_null(strstr(line, "SuperSecretValue123"));
        }
        config_done(&cfg);
        log_forget_secrets();
        clear_env();
}

/* One setting at every level: each level's value wins over the ones below it. */
static void test_config_precedence_one_setting_every_level(void **state)
{
        char path[] = "/tmp/fim-config-test-XXXXXX";
        int fd = mkstemp(path);
        char shown[64];
        FILE *f;
        struct config cfg;

        (void)state;
        clear_env();
        assert_true(fd >= 0);
        f = fdopen(fd, "w");
        fputs("UNPACK_QUEUE_SIZE=3\n", f);
        fclose(f);

        assert_int_equal(config_load(&cfg, NULL), 0);
        assert_int_equal(cfg.unpack_queue_size, 2); /* default */
        config_done(&cfg);

        assert_int_equal(config_load(&cfg, path), 0);
        assert_int_equal(cfg.unpack_queue_size, 3); /* file over default */
        config_done(&cfg);

        setenv("UNPACK_QUEUE_SIZE", "4", 1);
        assert_int_equal(config_load(&cfg, path), 0);
        assert_int_equal(cfg.unpack_queue_size, 4); /* environment over file */
        assert_int_equal(config_set(&cfg, "UNPACK_QUEUE_SIZE", "5", CONFIG_SOURCE_FLAG), 0);
        assert_int_equal(cfg.unpack_queue_size, 5); /* flag over environment and file */
        assert_int_equal(config_get_display(&cfg, "UNPACK_QUEUE_SIZE", shown, sizeof(shown)), 0);
        assert_string_equal(shown, "5");
        config_done(&cfg);
        unsetenv("UNPACK_QUEUE_SIZE");
        unlink(path);
}

/*
 * DATABASE_URL's password in every way libpq accepts it: shown as "****" in its place, and
 * masked in logs both as written (percent-encoded, escaped) and as libpq decodes it.
 */
static void test_config_db_password_masked_in_every_form(void **state)
{
        static const struct {
                const char *url;
                const char *shown;
                const char *forms[2];
        } cases[] = {
                {"postgresql://app:p%40ss%2Fw0rd@db.example:5432/images",
                 "postgresql://app:****@db.example:5432/images",
                 {"p%40ss%2Fw0rd", "p@ss/w0rd"}},
                {"postgres://app:plainPassw0rd@db/x?sslmode=disable",
                 "postgres://app:****@db/x?sslmode=disable",
                 {"plainPassw0rd", NULL}},
                {"postgresql://app@db/x?sslmode=disable&password=Qu%65ryPw1",
                 "postgresql://app@db/x?sslmode=disable&password=****",
                 {"Qu%65ryPw1", "QueryPw1"}},
                {"host=db user=app password='sp ace\\'quoteX' dbname=x",
                 "host=db user=app password='****' dbname=x",
                 {"sp ace\\'quoteX", "sp ace'quoteX"}},
                {"host=db password=bareSecret9 dbname=x",
                 "host=db password=**** dbname=x",
                 {"bareSecret9", NULL}},
        };
        struct config cfg;
        char shown[256];

        (void)state;
        clear_env();
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                char *buf = NULL;
                size_t len = 0;
                FILE *out;

                assert_int_equal(config_init(&cfg), 0);
                assert_int_equal(config_set(&cfg, "DATABASE_URL", cases[i].url, CONFIG_SOURCE_ENV),
                                 0);
                assert_int_equal(config_get_display(&cfg, "DATABASE_URL", shown, sizeof(shown)), 0);
                assert_string_equal(shown, cases[i].shown);
                out = open_memstream(&buf, &len);
                config_print(&cfg, out);
                fclose(out);
                for (int k = 0; k < 2 && cases[i].forms[k]; k++) {
                        char line[256];

                        assert_null(strstr(buf, cases[i].forms[k]));
                        (void)snprintf(line, sizeof(line), "libpq said: %s!", cases[i].forms[k]);
                        log_redact(line);
                        assert_null(strstr(line, cases[i].forms[k]));
                }
                free(buf);
                config_done(&cfg);
                log_forget_secrets();
        }
}

/*
 * Every setting whose value is used later: accepted at its limits, refused just past them
 * with a message that names the variable, shows the value and says what was expected.
 */
static void test_config_values_at_and_past_their_limits(void **state)
{
        static const struct {
                const char *name;
                const char *value;
                const char *message; /* NULL: accepted */
        } cases[] = {
                /* LOCAL_DIR: an absolute path, or unpack requests for it fail validation. */
                {"LOCAL_DIR", "/", NULL},
                {"LOCAL_DIR", "/var/lib/images/", NULL},
                {"LOCAL_DIR", "images", "LOCAL_DIR='images': expected an absolute path"},
                {"LOCAL_DIR", "./images", "LOCAL_DIR='./images': expected an absolute path"},
                {"LOCAL_DIR", "", "LOCAL_DIR='': expected an absolute path"},
                {"LOCAL_DIR", "/a\nb", "LOCAL_DIR='/a?b': expected an absolute path"},
                /* S3_ENDPOINT: empty (AWS) or an http(s) URL. */
                {"S3_ENDPOINT", "", NULL},
                {"S3_ENDPOINT", "http://127.0.0.1:9000", NULL},
                {"S3_ENDPOINT", "https://s3.example.com/prefix/", NULL},
                {"S3_ENDPOINT", "HTTP://[::1]:65535", NULL},
                {"S3_ENDPOINT", "ftp://x y",
                 "S3_ENDPOINT='ftp://x y': expected an http:// or https:// URL"},
                {"S3_ENDPOINT", "http://x y", "S3_ENDPOINT='http://x y': expected an http"},
                {"S3_ENDPOINT", "127.0.0.1:9000", "expected an http:// or https:// URL"},
                {"S3_ENDPOINT", "http://", "S3_ENDPOINT='http://': expected"},
                {"S3_ENDPOINT", "http://h:65536", "S3_ENDPOINT='http://h:65536': expected"},
                {"S3_ENDPOINT", "http://h:0", "S3_ENDPOINT='http://h:0': expected"},
                {"S3_ENDPOINT", "http://user:pw@h", "expected an http:// or https:// URL"},
                {"S3_ENDPOINT", "http://h/?x=1", "expected an http:// or https:// URL"},
                /* METRICS_ADDR: empty (off) or host:port. */
                {"METRICS_ADDR", "", NULL},
                {"METRICS_ADDR", ":9100", NULL},
                {"METRICS_ADDR", "127.0.0.1:0", NULL},
                {"METRICS_ADDR", "[::1]:65535", NULL},
                {"METRICS_ADDR", "garbage", "METRICS_ADDR='garbage': expected host:port"},
                {"METRICS_ADDR", "h:65536", "METRICS_ADDR='h:65536': expected host:port"},
                {"METRICS_ADDR", "::1:9100", "METRICS_ADDR='::1:9100': expected host:port"},
                {"METRICS_ADDR", "h:", "METRICS_ADDR='h:': expected host:port"},
                {"METRICS_ADDR", "h:x", "METRICS_ADDR='h:x': expected host:port"},
                /* AWS_REGION: a DNS label and SigV4 scope. */
                {"AWS_REGION", "eu-central-1", NULL},
                {"AWS_REGION", "auto", NULL},
                {"AWS_REGION", "us east", "AWS_REGION='us east': expected a region name"},
                {"AWS_REGION", "", "AWS_REGION='': expected a region name"},
                {"AWS_REGION", "us/east", "AWS_REGION='us/east': expected a region name"},
                {"AWS_REGION", "-us", "AWS_REGION='-us': expected a region name"},
                {"AWS_REGION", "a123456789012345678901234567890123456789012345678901234567890bc",
                 NULL},
                {"AWS_REGION", "a123456789012345678901234567890123456789012345678901234567890bcd",
                 "expected a region name"},
                /* DEVICE_SIZE: 1M to the 16 TiB a request may ask for, in whole sectors. */
                {"DEVICE_SIZE", "1M", NULL},
                {"DEVICE_SIZE", "16T", NULL},
                {"DEVICE_SIZE", "17592186044416", NULL},
                {"DEVICE_SIZE", "17592186044928",
                 "DEVICE_SIZE='17592186044928': expected a size from 1M to 16T that is a multiple of 512 bytes"},
                {"DEVICE_SIZE", "9000000T",
                 "DEVICE_SIZE='9000000T': expected a size from 1M to 16T"},
                {"DEVICE_SIZE", "1048064", "DEVICE_SIZE='1048064': expected a size from 1M"},
                {"DEVICE_SIZE", "1048577", "multiple of 512 bytes"},
                {"DEVICE_SIZE", "99999999999999999999", "expected a size"},
                /* DOWNLOAD_PART_SIZE: S3's part bounds. */
                {"DOWNLOAD_PART_SIZE", "5M", NULL},
                {"DOWNLOAD_PART_SIZE", "5G", NULL},
                {"DOWNLOAD_PART_SIZE", "1",
                 "DOWNLOAD_PART_SIZE='1': expected a size from 5M to 5G"},
                {"DOWNLOAD_PART_SIZE", "5242879", "expected a size from 5M to 5G"},
                {"DOWNLOAD_PART_SIZE", "5368709121", "expected a size from 5M to 5G"},
                {"DOWNLOAD_PARALLEL_THRESHOLD", "5M", NULL},
                {"DOWNLOAD_PARALLEL_THRESHOLD", "16T", NULL},
                {"DOWNLOAD_PARALLEL_THRESHOLD", "4M", "expected a size from 5M to 16T"},
                {"DOWNLOAD_PARALLEL_THRESHOLD", "17T", "expected a size from 5M to 16T"},
                {"MAX_OBJECT_SIZE", "1K", NULL},
                {"MAX_OBJECT_SIZE", "16T", NULL},
                {"MAX_OBJECT_SIZE", "1023",
                 "MAX_OBJECT_SIZE='1023': expected a size from 1K to 16T"},
                {"MAX_OBJECT_SIZE", "16385G", "expected a size from 1K to 16T"},
                {"MAX_OBJECT_SIZE", "0", "expected a size from 1K to 16T"},
                /* HOST_ID: bounded so that lease owners and keys built from it fit. */
                {"HOST_ID", "h", NULL},
                {"HOST_ID", "host-1.example.com", NULL},
                {"HOST_ID", "", "HOST_ID='': expected a name"},
                {"HOST_ID", "a/b",
                 "HOST_ID='a/b': expected a name of letters, digits, '-', '_' or '.' (at most 128 characters)"},
                /* POOL_NAME: a device-mapper name. */
                {"POOL_NAME", "pool-1", NULL},
                {"POOL_NAME", "..", "POOL_NAME='..': expected a device-mapper name"},
                {"POOL_NAME", "a b", "POOL_NAME='a b': expected a device-mapper name"},
                /* KAFKA_BROKERS: what librdkafka's bootstrap.servers takes. */
                {"KAFKA_BROKERS", "k1:9092,k2:9092", NULL},
                {"KAFKA_BROKERS", "kafka", NULL},
                {"KAFKA_BROKERS", "SASL_SSL://k1:9093,[::1]:9092", NULL},
                {"KAFKA_BROKERS", "", "KAFKA_BROKERS='': expected a comma-separated list"},
                {"KAFKA_BROKERS", "k1:9092,", "KAFKA_BROKERS='k1:9092,': expected"},
                {"KAFKA_BROKERS", "k 1:9092", "expected a comma-separated list of host[:port]"},
                {"KAFKA_BROKERS", "k1:99999", "expected a comma-separated list of host[:port]"},
                {"KAFKA_BROKERS", "://k1", "expected a comma-separated list of host[:port]"},
                /* KAFKA_TOPIC_PREFIX: prefix + ".download" is a topic name of at most 249. */
                {"KAFKA_TOPIC_PREFIX", "images.host-1", NULL},
                {"KAFKA_TOPIC_PREFIX", "images/x",
                 "KAFKA_TOPIC_PREFIX='images/x': expected a name"},
                /* AWS_ACCESS_KEY_ID: part of a comma-separated Authorization header. */
                {"AWS_ACCESS_KEY_ID", "", NULL},
                {"AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE", NULL},
                {"AWS_ACCESS_KEY_ID", "AKIA X",
                 "AWS_ACCESS_KEY_ID='AKIA X': expected an access key id"},
                {"AWS_ACCESS_KEY_ID", "a/b", "expected an access key id"},
                {"AWS_ACCESS_KEY_ID", "a,b", "expected an access key id"},
                /* Secrets: no control characters (a header injection), and never echoed. */
                {"AWS_SESSION_TOKEN", "tok\r\nX-Evil: 1",
                 "AWS_SESSION_TOKEN: expected a value without control characters (not shown: it is a secret)"},
                {"AWS_SECRET_ACCESS_KEY", "abc\n",
                 "AWS_SECRET_ACCESS_KEY: expected a value without control characters"},
                /* Integers at their bounds. */
                {"LEASE_SECONDS", "2", NULL},
                {"LEASE_SECONDS", "1", "LEASE_SECONDS='1': expected an integer from 2 to 86400"},
                {"LEASE_SECONDS", "86401", "expected an integer from 2 to 86400"},
                {"POOL_HIGH_WATER_PERCENT", "100", NULL},
                {"POOL_HIGH_WATER_PERCENT", "101", "expected an integer from 1 to 100"},
                {"DOWNLOAD_CONNECTIONS", "64", NULL},
                {"DOWNLOAD_CONNECTIONS", "65", "expected an integer from 1 to 64"},
                {"MAX_ATTEMPTS", "0", "expected an integer from 1 to 100"},
                /* Extraction limits: each upper bound caps the memory of one unpack. */
                {"EXTRACT_MAX_ENTRIES", "1", NULL},
                {"EXTRACT_MAX_ENTRIES", "10000000", NULL},
                {"EXTRACT_MAX_ENTRIES", "0",
                 "EXTRACT_MAX_ENTRIES='0': expected a positive integer (at most 10000000)"},
                {"EXTRACT_MAX_ENTRIES", "10000001",
                 "EXTRACT_MAX_ENTRIES='10000001': expected a positive integer (at most 10000000)"},
                {"EXTRACT_MAX_ENTRIES", "1M", "EXTRACT_MAX_ENTRIES='1M': expected a positive"},
                {"EXTRACT_MAX_ENTRIES", "-5", "EXTRACT_MAX_ENTRIES='-5': expected a positive"},
                {"EXTRACT_MAX_DEPTH", "1", NULL},
                {"EXTRACT_MAX_DEPTH", "4096", NULL},
                {"EXTRACT_MAX_DEPTH", "0",
                 "EXTRACT_MAX_DEPTH='0': expected a positive integer (at most 4096)"},
                {"EXTRACT_MAX_DEPTH", "4097",
                 "EXTRACT_MAX_DEPTH='4097': expected a positive integer (at most 4096)"},
                {"EXTRACT_MAX_DEPTH", "", "EXTRACT_MAX_DEPTH='': expected a positive integer"},
                {"EXTRACT_MAX_PATH_LENGTH", "1", NULL},
                {"EXTRACT_MAX_PATH_LENGTH", "1048576", NULL},
                {"EXTRACT_MAX_PATH_LENGTH", "0",
                 "EXTRACT_MAX_PATH_LENGTH='0': expected a positive integer (at most 1048576)"},
                {"EXTRACT_MAX_PATH_LENGTH", "1048577",
                 "EXTRACT_MAX_PATH_LENGTH='1048577': expected a positive integer (at most 1048576)"},
                {"EXTRACT_MAX_SPARSE_ENTRIES", "1", NULL},
                {"EXTRACT_MAX_SPARSE_ENTRIES", "1048576", NULL},
                {"EXTRACT_MAX_SPARSE_ENTRIES", "0",
                 "EXTRACT_MAX_SPARSE_ENTRIES='0': expected a positive integer (at most 1048576)"},
                {"EXTRACT_MAX_SPARSE_ENTRIES", "1048577",
                 "EXTRACT_MAX_SPARSE_ENTRIES='1048577': expected a positive integer (at most 1048576)"},
                {"EXTRACT_MAX_SPARSE_ENTRIES", "99999999999",
                 "EXTRACT_MAX_SPARSE_ENTRIES='99999999999': expected a positive integer"},
        };
        struct config cfg;

        (void)state;
        clear_env();
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                int r;

                assert_int_equal(config_init(&cfg), 0);
                err_clear();
                r = config_set(&cfg, cases[i].name, cases[i].value, CONFIG_SOURCE_ENV);
                if (!cases[i].message && r != 0)
                        fail_msg("%s='%s' refused: %s", cases[i].name, cases[i].value, err_last());
                if (cases[i].message && r != -EINVAL)
                        fail_msg("%s='%s' accepted", cases[i].name, cases[i].value);
                if (cases[i].message && !strstr(err_last(), cases[i].message))
                        fail_msg("%s='%s': message '%s' lacks '%s'", cases[i].name, cases[i].value,
                                 err_last(), cases[i].message);
                if (cases[i].message && !strstr(err_last(), "(from the environment)"))
                        fail_msg("%s: message '%s' does not say where the value came from",
                                 cases[i].name, err_last());
                config_done(&cfg);
                log_forget_secrets();
        }
}

/* Lengths: exactly at the limit passes, one more is refused. */
static void test_config_lengths_at_and_past_their_limits(void **state)
{
        static const struct {
                const char *name;
                size_t max;
                char fill;
                char first;
        } cases[] = {
                {"HOST_ID", CONFIG_HOST_ID_MAX, 'h', 'h'}, {"POOL_NAME", 127, 'p', 'p'},
                {"KAFKA_TOPIC_PREFIX", 240, 't', 't'},     {"AWS_ACCESS_KEY_ID", 128, 'A', 'A'},
                {"LOCAL_DIR", 4096 - 255 - 2, 'd', '/'},
        };
        struct config cfg;
        char value[5000];

        (void)state;
        clear_env();
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                memset(value, cases[i].fill, cases[i].max + 1);
                value[0] = cases[i].first;
                value[cases[i].max] = '\0';
                assert_int_equal(config_init(&cfg), 0);
                if (config_set(&cfg, cases[i].name, value, CONFIG_SOURCE_FLAG) != 0)
                        fail_msg("%s of %zu characters refused: %s", cases[i].name, cases[i].max,
                                 err_last());
                value[cases[i].max] = cases[i].fill;
                value[cases[i].max + 1] = '\0';
                assert_int_equal(config_set(&cfg, cases[i].name, value, CONFIG_SOURCE_FLAG),
                                 -EINVAL);
                assert_non_null(strstr(err_last(), cases[i].name));
                /* A long value is cut in the message, not echoed whole. */
                assert_true(strlen(err_last()) < 600);
                config_done(&cfg);
        }
}

/*
 * The extraction limits default to the extractor's own defaults, so that a worker without
 * these settings unpacks exactly as before; show-config lists them, and a file sets them.
 */
static void test_config_extract_limits(void **state)
{
        char path[] = "/tmp/fim-config-test-XXXXXX";
        int fd = mkstemp(path);
        char *buf = NULL;
        size_t len = 0;
        struct config cfg;
        FILE *f;

        (void)state;
        clear_env();
        assert_int_equal(config_load(&cfg, NULL), 0);
        assert_true((uint64_t)cfg.extract_max_entries == EXTRACT_DEFAULT_MAX_ENTRIES);
        assert_true((unsigned)cfg.extract_max_depth == EXTRACT_DEFAULT_MAX_PATH_DEPTH);
        assert_true((unsigned)cfg.extract_max_path_length == EXTRACT_DEFAULT_MAX_PATH_LENGTH);
        assert_true((uint64_t)cfg.extract_max_sparse_entries == EXTRACT_DEFAULT_MAX_SPARSE_ENTRIES);
        f = open_memstream(&buf, &len);
        config_print(&cfg, f);
        fclose(f);
        assert_non_null(strstr(buf, "EXTRACT_MAX_ENTRIES=1000000  # default\n"));
        assert_non_null(strstr(buf, "EXTRACT_MAX_DEPTH=64  # default\n"));
        assert_non_null(strstr(buf, "EXTRACT_MAX_PATH_LENGTH=4096  # default\n"));
        assert_non_null(strstr(buf, "EXTRACT_MAX_SPARSE_ENTRIES=65536  # default\n"));
        free(buf);
        config_done(&cfg);

        assert_true(fd >= 0);
        f = fdopen(fd, "w");
        fputs("EXTRACT_MAX_ENTRIES=2000000\nEXTRACT_MAX_DEPTH=128\n"
              "EXTRACT_MAX_PATH_LENGTH=8192\nEXTRACT_MAX_SPARSE_ENTRIES=100\n",
              f);
        fclose(f);
        assert_int_equal(config_load(&cfg, path), 0);
        assert_int_equal(cfg.extract_max_entries, 2000000);
        assert_int_equal(cfg.extract_max_depth, 128);
        assert_int_equal(cfg.extract_max_path_length, 8192);
        assert_int_equal(cfg.extract_max_sparse_entries, 100);
        buf = NULL;
        f = open_memstream(&buf, &len);
        config_print(&cfg, f);
        fclose(f);
        assert_non_null(strstr(buf, "EXTRACT_MAX_SPARSE_ENTRIES=100  # file\n"));
        free(buf);
        config_done(&cfg);
        unlink(path);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_config_seed_defaults),
                cmocka_unit_test(test_config_precedence_file_env_flag),
                cmocka_unit_test(test_config_invalid_values_name_variable_and_value),
                cmocka_unit_test(test_config_secrets_never_printed),
                cmocka_unit_test(test_config_precedence_one_setting_every_level),
                cmocka_unit_test(test_config_db_password_masked_in_every_form),
                cmocka_unit_test(test_config_values_at_and_past_their_limits),
                cmocka_unit_test(test_config_lengths_at_and_past_their_limits),
                cmocka_unit_test(test_config_extract_limits),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
