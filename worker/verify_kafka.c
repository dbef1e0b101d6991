/*
 * verify-system: Kafka. The brokers answer a metadata request, every stage topic and the
 * dead-letter topic exist, and each stage group's lag (high watermark minus committed offset,
 * summed over partitions) is reported. Lag is information, not a failure: a busy host has
 * some.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <librdkafka/rdkafka.h>

#include "common/err.h"
#include "common/util.h"
#include "config/config.h"
#include "worker/kafka_client.h"
#include "worker/verify.h"

#define VERIFY_KAFKA_TIMEOUT_MS 5000

static const struct rd_kafka_metadata_topic *verify_kafka_topic(const struct rd_kafka_metadata *md,
                                                                const char *name)
{
        for (int i = 0; i < md->topic_cnt; i++) {
                if (strcmp(md->topics[i].topic, name) == 0 && !md->topics[i].err)
                        return &md->topics[i];
        }
        return NULL;
}

static void verify_kafka_topics(struct verify_report *rep, const struct config *cfg,
                                const struct rd_kafka_metadata *md)
{
        const char *suffixes[] = {kafka_stage_suffixes[0], kafka_stage_suffixes[1],
                                  kafka_stage_suffixes[2], KAFKA_DLQ_SUFFIX};
        char missing[1024] = "", present[1024] = "";
        size_t mlen = 0, plen = 0;

        for (size_t i = 0; i < ARRAY_SIZE(suffixes); i++) {
                const struct rd_kafka_metadata_topic *t;
                char topic[KAFKA_NAME_MAX];

                if (kafka_client_topic(cfg, suffixes[i], topic, sizeof(topic)) < 0)
                        continue;
                t = verify_kafka_topic(md, topic);
                if (!t)
                        mlen += (size_t)snprintf(missing + mlen, sizeof(missing) - mlen, "%s'%s'",
                                                 mlen ? ", " : "", topic);
                else
                        plen += (size_t)snprintf(present + plen, sizeof(present) - plen,
                                                 "%s'%s' (%d partition(s))", plen ? ", " : "",
                                                 topic, t->partition_cnt);
                if (mlen >= sizeof(missing) || plen >= sizeof(present))
                        break;
        }
        if (missing[0])
                verify_report_add(
                        rep, "kafka-topics", false,
                        "missing %s: create them before starting workers (or enable broker auto-creation)",
                        missing);
        else
                verify_report_add(rep, "kafka-topics", true, "%s", present);
}

/* Sum of (high watermark - committed) over the topic's partitions, for its stage group. */
static int verify_kafka_lag(const struct config *cfg, const struct rd_kafka_metadata_topic *t,
                            int64_t *ret_lag, int *ret_uncommitted)
{
        const char *props[] = {"group.id", t->topic, "enable.auto.commit", "false", NULL};
        rd_kafka_topic_partition_list_t *list = NULL;
        rd_kafka_conf_t *conf = NULL;
        rd_kafka_t *rk = NULL;
        rd_kafka_resp_err_t err;
        int64_t lag = 0;
        int uncommitted = 0, r;

        r = kafka_client_conf_new(cfg, RD_KAFKA_CONSUMER, "verify", props, &conf);
        if (r < 0)
                return r;
        /* Not subscribed: asking for committed offsets does not join the group. */
        r = kafka_client_new(RD_KAFKA_CONSUMER, conf, &rk);
        if (r < 0)
                return r;
        list = rd_kafka_topic_partition_list_new(t->partition_cnt);
        for (int i = 0; i < t->partition_cnt; i++)
                rd_kafka_topic_partition_list_add(list, t->topic, t->partitions[i].id);
        err = rd_kafka_committed(rk, list, VERIFY_KAFKA_TIMEOUT_MS);
        if (err) {
                r = kafka_client_errno(err, "failed to read committed offsets");
                goto out;
        }
        for (int i = 0; i < list->cnt; i++) {
                int64_t low = 0, high = 0;

                err = rd_kafka_query_watermark_offsets(rk, t->topic, list->elems[i].partition, &low,
                                                       &high, VERIFY_KAFKA_TIMEOUT_MS);
                if (err) {
                        r = kafka_client_errno(err, "failed to query watermark offsets");
                        goto out;
                }
                if (list->elems[i].offset < 0) {
                        uncommitted++;
                        lag += high - low;
                } else {
                        lag += high - list->elems[i].offset;
                }
        }
        *ret_lag = lag;
        *ret_uncommitted = uncommitted;
        r = 0;
out:
        rd_kafka_topic_partition_list_destroy(list);
        (void)rd_kafka_consumer_close(rk);
        rd_kafka_destroy(rk);
        return r;
}

static void verify_kafka_lags(struct verify_report *rep, const struct config *cfg,
                              const struct rd_kafka_metadata *md)
{
        for (size_t i = 0; i < ARRAY_SIZE(kafka_stage_suffixes); i++) {
                const struct rd_kafka_metadata_topic *t;
                char topic[KAFKA_NAME_MAX], name[32];
                int64_t lag = 0;
                int uncommitted = 0, r;

                (void)snprintf(name, sizeof(name), "lag-%s", kafka_stage_suffixes[i]);
                if (kafka_client_topic(cfg, kafka_stage_suffixes[i], topic, sizeof(topic)) < 0)
                        continue;
                t = verify_kafka_topic(md, topic);
                if (!t)
                        continue;
                r = verify_kafka_lag(cfg, t, &lag, &uncommitted);
                if (r < 0)
                        verify_report_add(rep, name, false, "group '%s': %s", topic, err_text(r));
                else
                        verify_report_add(
                                rep, name, true,
                                "group '%s': %" PRId64
                                " message(s) behind over %d partitions (%d never committed)",
                                topic, lag, t->partition_cnt, uncommitted);
        }
}

void verify_kafka(struct verify_report *rep, const struct config *cfg)
{
        const struct rd_kafka_metadata *md = NULL;
        rd_kafka_conf_t *conf = NULL;
        rd_kafka_resp_err_t err;
        rd_kafka_t *rk = NULL;
        int r;

        r = kafka_client_conf_new(cfg, RD_KAFKA_PRODUCER, "verify", NULL, &conf);
        if (r == 0)
                r = kafka_client_new(RD_KAFKA_PRODUCER, conf, &rk);
        if (r < 0) {
                verify_report_add(rep, "kafka", false, "%s", err_text(r));
                return;
        }
        err = rd_kafka_metadata(rk, 1, NULL, &md, VERIFY_KAFKA_TIMEOUT_MS);
        if (err) {
                verify_report_add(rep, "kafka", false,
                                  "brokers '%s' unreachable: %s (check KAFKA_BROKERS)",
                                  cfg->kafka_brokers, rd_kafka_err2str(err));
                verify_report_add(rep, "kafka-topics", false, "not checked: brokers unreachable");
                rd_kafka_destroy(rk);
                return;
        }
        verify_report_add(rep, "kafka", true, "%d broker(s) reachable via '%s'", md->broker_cnt,
                          cfg->kafka_brokers);
        verify_kafka_topics(rep, cfg, md);
        verify_kafka_lags(rep, cfg, md);
        rd_kafka_metadata_destroy(md);
        rd_kafka_destroy(rk);
}
