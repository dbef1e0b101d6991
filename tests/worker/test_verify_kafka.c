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
#include <librdkafka/rdkafka.h>

#include "common/util.h"
#include "config/config.h"
#include "helper_worker.h"
#include "worker/kafka_client.h"
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

/* Put @count messages on @partition of @topic, and wait for the broker to have them. */
static void produce_to(struct wt_env *e, const char *topic, int32_t partition, int count)
{
        rd_kafka_conf_t *conf = NULL;
        rd_kafka_t *rk = NULL;

        assert_int_equal(kafka_client_conf_new(&e->cfg, RD_KAFKA_PRODUCER, "test", NULL, &conf), 0);
        assert_int_equal(kafka_client_new(RD_KAFKA_PRODUCER, conf, &rk), 0);
        for (int i = 0; i < count; i++)
                assert_int_equal(rd_kafka_producev(rk, RD_KAFKA_V_TOPIC(topic),
                                                   RD_KAFKA_V_PARTITION(partition),
                                                   RD_KAFKA_V_VALUE((void *)"{}", 2),
                                                   RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                                   RD_KAFKA_V_END),
                                 RD_KAFKA_RESP_ERR_NO_ERROR);
        assert_int_equal(rd_kafka_flush(rk, 30000), RD_KAFKA_RESP_ERR_NO_ERROR);
        rd_kafka_destroy(rk);
}

/* Commit @offset for @partition of @topic in the stage's group (named after its topic). */
static void commit_at(struct wt_env *e, const char *topic, int32_t partition, int64_t offset)
{
        const char *props[] = {"group.id", topic, "enable.auto.commit", "false", NULL};
        rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(1);
        rd_kafka_conf_t *conf = NULL;
        rd_kafka_t *rk = NULL;

        assert_int_equal(kafka_client_conf_new(&e->cfg, RD_KAFKA_CONSUMER, "test", props, &conf),
                         0);
        assert_int_equal(kafka_client_new(RD_KAFKA_CONSUMER, conf, &rk), 0);
        rd_kafka_topic_partition_list_add(list, topic, partition)->offset = offset;
        /* Not subscribed: a plain offset commit, no group join. */
        assert_int_equal(rd_kafka_commit(rk, list, 0), RD_KAFKA_RESP_ERR_NO_ERROR);
        rd_kafka_topic_partition_list_destroy(list);
        (void)rd_kafka_consumer_close(rk);
        rd_kafka_destroy(rk);
}

/*
 * Lag counts from the committed offset where there is one: partition 0 holds 5 messages and
 * has 2 committed (3 behind), partition 1 holds 4 and has none (4), partition 2 holds 2 and
 * has both committed (0): 7 in all, one partition never committed.
 */
static void test_verify_kafka_lag_counts_from_committed_offsets(void **state)
{
        struct wt_env *e = *state;
        struct verify_report rep = {0};
        int64_t ends[16], committed[16];
        char topic[KAFKA_NAME_MAX];
        int i;

        assert_int_equal(kafka_client_topic(&e->cfg, "download", topic, sizeof(topic)), 0);
        produce_to(e, topic, 0, 5);
        produce_to(e, topic, 1, 4);
        produce_to(e, topic, 2, 2);
        assert_int_equal(wt_ends(e, "download", ends, 16), 3);
        assert_true(ends[0] == 5 && ends[1] == 4 && ends[2] == 2);
        commit_at(e, topic, 0, 2);
        commit_at(e, topic, 2, 2);
        assert_int_equal(wt_committed(e, "download", committed, 16), 3);
        assert_true(committed[0] == 2 && committed[1] < 0 && committed[2] == 2);

        verify_kafka(&rep, &e->cfg);
        i = find(&rep, "lag-download");
        assert_true(rep.ok[i]);
        assert_non_null(strstr(rep.detail[i],
                               ": 7 message(s) behind over 3 partitions (1 never committed)"));
        i = find(&rep, "lag-unpack");
        assert_non_null(strstr(rep.detail[i], ": 0 message(s) behind over 3 partitions (3 never"));
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
                cmocka_unit_test_setup_teardown(test_verify_kafka_lag_counts_from_committed_offsets,
                                                setup, teardown),
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
