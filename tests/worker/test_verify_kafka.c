/*
 * verify_kafka() against the real broker: reachable brokers, present and missing topics, and
 * the lag of each stage group. The report sink is this file's own verify_report_add(), so
 * the checks are seen line by line without going through cmd_verify_system.c.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/util.h"
#include "config/config.h"
#include "helper_worker.h"
#include "worker/verify.h"

struct verify_report {
        int lines;
        char names[16][32];
        bool ok[16];
        char detail[16][1024];
};

void verify_report_add(struct verify_report *rep, const char *name, bool ok, const char *fmt, ...)
{
        va_list ap;
        int i = rep->lines++;

        assert_true(i < 16);
        (void)snprintf(rep->names[i], sizeof(rep->names[i]), "%s", name);
        rep->ok[i] = ok;
        va_start(ap, fmt);
        (void)vsnprintf(rep->detail[i], sizeof(rep->detail[i]), fmt, ap);
        va_end(ap);
        printf("%-4s  %-14s %s\n", ok ? "PASS" : "FAIL", name, rep->detail[i]);
}

static int find(const struct verify_report *rep, const char *name)
{
        for (int i = 0; i < rep->lines; i++) {
                if (strcmp(rep->names[i], name) == 0)
                        return i;
        }
        fail_msg("no '%s' check", name);
        return -1;
}

static int setup(void **state)
{
        struct wt_env *e = calloc(1, sizeof(*e));

        assert_non_null(e);
        wt_setup(e, NULL);
        *state = e;
        return 0;
}

static int teardown(void **state)
{
        struct wt_env *e = *state;

        wt_teardown(e);
        free(e);
        return 0;
}

static void test_verify_kafka_reports_topics_and_lag(void **state)
{
        struct wt_env *e = *state;
        struct verify_report rep = {0};
        int i;

        for (int n = 0; n < 3; n++)
                wt_produce(e, "download", "k", "{\"image_id\":\"k\"}");
        verify_kafka(&rep, &e->cfg);
        assert_true(rep.ok[find(&rep, "kafka")]);
        assert_true(rep.ok[find(&rep, "kafka-topics")]);
        i = find(&rep, "lag-download");
        assert_true(rep.ok[i]);
        assert_non_null(strstr(rep.detail[i], ": 3 message(s) behind over 3 partitions"));
        i = find(&rep, "lag-activate");
        assert_non_null(strstr(rep.detail[i], ": 0 message(s) behind"));
}

static void test_verify_kafka_missing_topics_fail(void **state)
{
        struct wt_env *e = *state;
        struct verify_report rep = {0};
        int i;

        free(e->cfg.kafka_topic_prefix);
        e->cfg.kafka_topic_prefix = strdup("no-such-prefix-here");
        verify_kafka(&rep, &e->cfg);
        assert_true(rep.ok[find(&rep, "kafka")]);
        i = find(&rep, "kafka-topics");
        assert_false(rep.ok[i]);
        assert_non_null(strstr(rep.detail[i], "'no-such-prefix-here.download'"));
        assert_non_null(strstr(rep.detail[i], "'no-such-prefix-here.dlq'"));
}

static void test_verify_kafka_unreachable_broker_fails(void **state)
{
        struct wt_env *e = *state;
        struct verify_report rep = {0};
        int64_t t0 = util_now_monotonic_ms();

        free(e->cfg.kafka_brokers);
        e->cfg.kafka_brokers = strdup("127.0.0.1:1");
        verify_kafka(&rep, &e->cfg);
        assert_false(rep.ok[find(&rep, "kafka")]);
        assert_false(rep.ok[find(&rep, "kafka-topics")]);
        assert_true(util_now_monotonic_ms() - t0 < 15000);
}

int main(int argc, char **argv)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_verify_kafka_reports_topics_and_lag, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_verify_kafka_missing_topics_fail, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_verify_kafka_unreachable_broker_fails, setup,
                                                teardown),
        };
        int status;

        if (wt_child_main(argc, argv, &status))
                return status;
        return cmocka_run_group_tests(tests, NULL, NULL);
}
