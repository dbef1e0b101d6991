/*
 * Helpers for tests/bench/worker_bench.sh (a benchmark tool, not a test):
 *
 *   kafka_bench produce BROKERS TOPIC            lines "key<TAB>value" from stdin
 *   kafka_bench wait BROKERS SINCE_MS TIMEOUT_MS GROUP=TOPIC:COUNT...
 *       print "GROUP MS" once the group has committed COUNT messages of TOPIC (every
 *       partition at its end), MS counted from SINCE_MS (wall clock, epoch ms)
 *   kafka_bench stable BROKERS TIMEOUT_MS GROUP...
 *       wait until every GROUP is stable with at least one member (a worker has joined)
 *   kafka_bench bare BROKERS GROUP COUNT TOPIC...
 *       the baseline: a plain consumer in GROUP subscribed to the TOPICs that reads COUNT
 *       messages and stores each offset (auto-commit every 100 ms, as the bench's workers
 *       do), then commits and leaves. The bench script starts it before producing and times
 *       it from the first produce to the group's last commit, as it times the workers; its
 *       own line "bare N MS" (first message to final commit) is for information
 *
 * Built by the bench script with cc and pkg-config; depends on librdkafka only.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#define MAX_PARTITIONS 64

static int64_t now_ms(void)
{
        struct timespec ts;

        (void)clock_gettime(CLOCK_REALTIME, &ts);
        return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static rd_kafka_t *client(rd_kafka_type_t type, const char *brokers, const char *const *props)
{
        rd_kafka_conf_t *conf = rd_kafka_conf_new();
        char errstr[512];
        rd_kafka_t *rk;

        if (rd_kafka_conf_set(conf, "bootstrap.servers", brokers, errstr, sizeof(errstr)))
                goto fail;
        for (size_t i = 0; props && props[i]; i += 2) {
                if (rd_kafka_conf_set(conf, props[i], props[i + 1], errstr, sizeof(errstr)))
                        goto fail;
        }
        rk = rd_kafka_new(type, conf, errstr, sizeof(errstr));
        if (!rk) {
                fprintf(stderr, "kafka_bench: %s\n", errstr);
                exit(1);
        }
        return rk;
fail:
        fprintf(stderr, "kafka_bench: %s\n", errstr);
        exit(1);
}

static int cmd_produce(const char *brokers, const char *topic)
{
        static const char *const props[] = {"enable.idempotence", "true", "linger.ms", "5", NULL};
        rd_kafka_t *rk = client(RD_KAFKA_PRODUCER, brokers, props);
        char *line = NULL;
        size_t cap = 0;
        long n = 0;
        ssize_t len;
        int64_t t0 = now_ms();

        while ((len = getline(&line, &cap, stdin)) > 0) {
                char *tab = strchr(line, '\t');
                rd_kafka_resp_err_t err;

                if (line[len - 1] == '\n')
                        line[--len] = '\0';
                if (!tab)
                        continue;
                *tab = '\0';
                do {
                        err = rd_kafka_producev(
                                rk, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_KEY(line, strlen(line)),
                                RD_KAFKA_V_VALUE(tab + 1, strlen(tab + 1)),
                                RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                RD_KAFKA_V_HEADER("attempt", "1", 1), RD_KAFKA_V_END);
                        if (err == RD_KAFKA_RESP_ERR__QUEUE_FULL)
                                rd_kafka_poll(rk, 10);
                } while (err == RD_KAFKA_RESP_ERR__QUEUE_FULL);
                if (err) {
                        fprintf(stderr, "kafka_bench: produce: %s\n", rd_kafka_err2str(err));
                        return 1;
                }
                n++;
                rd_kafka_poll(rk, 0);
        }
        if (rd_kafka_flush(rk, 60000)) {
                fprintf(stderr, "kafka_bench: flush timed out\n");
                return 1;
        }
        fprintf(stderr, "produced %ld messages to %s in %" PRId64 " ms\n", n, topic, now_ms() - t0);
        free(line);
        rd_kafka_destroy(rk);
        return 0;
}

/* Committed messages of @group on @topic if every partition is at its end, else -1. */
static long committed_if_done(const char *brokers, const char *group, const char *topic)
{
        const char *props[] = {"group.id", group, NULL};
        rd_kafka_t *rk = client(RD_KAFKA_CONSUMER, brokers, props);
        rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(MAX_PARTITIONS);
        const struct rd_kafka_metadata *md = NULL;
        rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
        long sum = -1;

        if (rd_kafka_metadata(rk, 0, rkt, &md, 5000) || md->topic_cnt != 1)
                goto out;
        for (int i = 0; i < md->topics[0].partition_cnt && i < MAX_PARTITIONS; i++)
                rd_kafka_topic_partition_list_add(list, topic, md->topics[0].partitions[i].id);
        if (rd_kafka_committed(rk, list, 5000))
                goto out;
        sum = 0;
        for (int i = 0; i < list->cnt; i++) {
                int64_t low = 0, high = 0;

                if (rd_kafka_query_watermark_offsets(rk, topic, list->elems[i].partition, &low,
                                                     &high, 5000)) {
                        sum = -1;
                        break;
                }
                if (high > 0 && list->elems[i].offset != high) {
                        sum = -1;
                        break;
                }
                sum += high > 0 ? (long)list->elems[i].offset : 0;
        }
out:
        if (md)
                rd_kafka_metadata_destroy(md);
        rd_kafka_topic_destroy(rkt);
        rd_kafka_topic_partition_list_destroy(list);
        rd_kafka_destroy(rk);
        return sum;
}

static int cmd_wait(const char *brokers, int64_t since, int64_t timeout, int n, char **specs)
{
        bool done[32] = {0};
        int left = n;

        if (n > 32)
                return 2;
        while (left > 0) {
                for (int i = 0; i < n; i++) {
                        char group[256], *topic, *count;
                        long got;

                        if (done[i])
                                continue;
                        (void)snprintf(group, sizeof(group), "%s", specs[i]);
                        topic = strchr(group, '=');
                        count = topic ? strrchr(topic, ':') : NULL;
                        if (!topic || !count)
                                return 2;
                        *topic++ = '\0';
                        *count++ = '\0';
                        got = committed_if_done(brokers, group, topic);
                        if (got >= strtol(count, NULL, 10)) {
                                printf("%s %" PRId64 "\n", group, now_ms() - since);
                                fflush(stdout);
                                done[i] = true;
                                left--;
                        }
                }
                if (now_ms() - since > timeout) {
                        fprintf(stderr, "kafka_bench: timed out waiting for commits\n");
                        return 1;
                }
                usleep(50000);
        }
        return 0;
}

static int cmd_stable(const char *brokers, int64_t timeout, int n, char **groups)
{
        rd_kafka_t *rk = client(RD_KAFKA_PRODUCER, brokers, NULL);
        int64_t t0 = now_ms();

        for (int i = 0; i < n;) {
                const struct rd_kafka_group_list *gl = NULL;
                bool ok = false;

                if (rd_kafka_list_groups(rk, groups[i], &gl, 5000) == 0 && gl->group_cnt == 1)
                        ok = strcmp(gl->groups[0].state, "Stable") == 0 &&
                             gl->groups[0].member_cnt > 0;
                if (gl)
                        rd_kafka_group_list_destroy(gl);
                if (ok) {
                        i++;
                        continue;
                }
                if (now_ms() - t0 > timeout) {
                        fprintf(stderr, "kafka_bench: group '%s' not stable\n", groups[i]);
                        return 1;
                }
                usleep(100000);
        }
        rd_kafka_destroy(rk);
        return 0;
}

static int cmd_bare(const char *brokers, const char *group, long count, int ntopics, char **topics)
{
        const char *props[] = {"group.id",
                               group,
                               "enable.auto.offset.store",
                               "false",
                               "enable.auto.commit",
                               "true",
                               "auto.commit.interval.ms",
                               "100",
                               "auto.offset.reset",
                               "earliest",
                               NULL};
        rd_kafka_topic_partition_list_t *sub = rd_kafka_topic_partition_list_new(ntopics);
        rd_kafka_t *rk;
        int64_t first = 0, end;
        long n = 0;

        rk = client(RD_KAFKA_CONSUMER, brokers, props);
        rd_kafka_poll_set_consumer(rk);
        for (int i = 0; i < ntopics; i++)
                rd_kafka_topic_partition_list_add(sub, topics[i], RD_KAFKA_PARTITION_UA);
        if (rd_kafka_subscribe(rk, sub)) {
                fprintf(stderr, "kafka_bench: subscribe failed\n");
                return 1;
        }
        while (n < count) {
                rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 1000);

                if (!m)
                        continue;
                if (!m->err) {
                        rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);

                        if (!first)
                                first = now_ms();
                        rd_kafka_topic_partition_list_add(l, rd_kafka_topic_name(m->rkt),
                                                          m->partition)
                                ->offset = m->offset + 1;
                        (void)rd_kafka_offsets_store(rk, l);
                        rd_kafka_topic_partition_list_destroy(l);
                        n++;
                }
                rd_kafka_message_destroy(m);
        }
        (void)rd_kafka_commit(rk, NULL, 0);
        end = now_ms();
        printf("bare %ld %" PRId64 "\n", n, end - first);
        rd_kafka_topic_partition_list_destroy(sub);
        (void)rd_kafka_consumer_close(rk);
        rd_kafka_destroy(rk);
        return 0;
}

int main(int argc, char **argv)
{
        if (argc == 4 && strcmp(argv[1], "produce") == 0)
                return cmd_produce(argv[2], argv[3]);
        if (argc >= 6 && strcmp(argv[1], "wait") == 0)
                return cmd_wait(argv[2], strtoll(argv[3], NULL, 10), strtoll(argv[4], NULL, 10),
                                argc - 5, argv + 5);
        if (argc >= 5 && strcmp(argv[1], "stable") == 0)
                return cmd_stable(argv[2], strtoll(argv[3], NULL, 10), argc - 4, argv + 4);
        if (argc >= 6 && strcmp(argv[1], "bare") == 0)
                return cmd_bare(argv[2], argv[3], strtol(argv[4], NULL, 10), argc - 5, argv + 5);
        fprintf(stderr, "usage: kafka_bench produce BROKERS TOPIC < key<TAB>value lines\n"
                        "       kafka_bench wait BROKERS SINCE_MS TIMEOUT_MS GROUP=TOPIC:COUNT...\n"
                        "       kafka_bench stable BROKERS TIMEOUT_MS GROUP...\n"
                        "       kafka_bench bare BROKERS GROUP COUNT TOPIC...\n");
        return 2;
}
