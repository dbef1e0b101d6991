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

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_config_seed_defaults),
                cmocka_unit_test(test_config_precedence_file_env_flag),
                cmocka_unit_test(test_config_invalid_values_name_variable_and_value),
                cmocka_unit_test(test_config_secrets_never_printed),
                cmocka_unit_test(test_config_precedence_one_setting_every_level),
                cmocka_unit_test(test_config_db_password_masked_in_every_form),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
