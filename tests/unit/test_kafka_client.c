/* Unit tests for worker/kafka_client: librdkafka properties from the environment (offline). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/log.h"
#include "config/config.h"
#include "worker/kafka_client.h"

static void clear_env(void)
{
        unsetenv("FIM_KAFKA_OPTIONS");
        unsetenv("FIM_KAFKA_CONSUMER_OPTIONS");
        unsetenv("FIM_KAFKA_PRODUCER_OPTIONS");
}

static int conf_for(rd_kafka_type_t type)
{
        struct config cfg;
        rd_kafka_conf_t *conf = NULL;
        int r;

        assert_int_equal(config_init(&cfg), 0);
        r = kafka_client_conf_new(&cfg, type, "test", NULL, &conf);
        if (r == 0)
                rd_kafka_conf_destroy(conf);
        config_done(&cfg);
        return r;
}

static void test_kafka_client_options_applied_and_secrets_masked(void **state)
{
        char line[256] = "auth failed: sasl.password=Hunter2Secret key pw PemKeyPassw0rd";

        (void)state;
        clear_env();
        setenv("FIM_KAFKA_CONSUMER_OPTIONS",
               "session.timeout.ms=6000;sasl.password=Hunter2Secret;ssl.key.password=PemKeyPassw0rd",
               1);
        assert_int_equal(conf_for(RD_KAFKA_CONSUMER), 0);
        log_redact(line);
        assert_null(strstr(line, "Hunter2Secret"));
        assert_null(strstr(line, "PemKeyPassw0rd"));
        log_forget_secrets();
        clear_env();
}

static void test_kafka_client_option_errors_name_the_variable(void **state)
{
        (void)state;
        clear_env();
        setenv("FIM_KAFKA_CONSUMER_OPTIONS", "session.timeout.ms=6000;sasl.password:Hunter2Secret",
               1);
        assert_int_equal(conf_for(RD_KAFKA_CONSUMER), -EINVAL);
        assert_non_null(strstr(err_last(), "FIM_KAFKA_CONSUMER_OPTIONS: expected name=value"));
        assert_null(strstr(err_last(), "Hunter2Secret"));
        clear_env();

        setenv("FIM_KAFKA_PRODUCER_OPTIONS", "no.such.property=1", 1);
        assert_int_equal(conf_for(RD_KAFKA_PRODUCER), -EINVAL);
        assert_non_null(strstr(err_last(), "FIM_KAFKA_PRODUCER_OPTIONS: invalid Kafka property"));
        clear_env();

        /* An invalid value of a credential is masked even in librdkafka's own message. */
        setenv("FIM_KAFKA_OPTIONS", "sasl.mechanisms=PLAIN;sasl.password=Hunter2Secret", 1);
        assert_int_equal(conf_for(RD_KAFKA_CONSUMER), 0);
        {
                char msg[ERR_MSG_MAX];

                (void)snprintf(msg, sizeof(msg), "%s", "property sasl.password=Hunter2Secret");
                log_redact(msg);
                assert_string_equal(msg, "property sasl.password=[redacted]");
        }
        log_forget_secrets();
        clear_env();
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_kafka_client_options_applied_and_secrets_masked),
                cmocka_unit_test(test_kafka_client_option_errors_name_the_variable),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
