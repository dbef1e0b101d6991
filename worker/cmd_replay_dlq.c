/*
 * `replay-dlq [--stage S] [--error-class C] [--since T] [--run-id ID] [--limit N] [--dry-run]`:
 * re-publish selected dead letters to their stage topic.
 *
 * The dead-letter topic is read from its beginning up to its end as of the start, by assigning
 * every partition at its low watermark rather than by joining a consumer group: nothing is
 * committed or created on the broker (so --dry-run changes nothing at all, and a second run
 * sees the same records), there is no group join or rebalance to wait for, and records that
 * arrive while we replay (a replayed job failing again) are not read in the same run. The
 * librdkafka consumer needs a group.id even for assign(); the one given is never joined.
 *
 * A replayed record carries the original key, value and headers (trace id, parent run id),
 * with "attempt" incremented and "replayed_from" naming the dead letter; the stage then starts
 * a new run for its failed key. Nothing is remembered between runs of the command: each run
 * replays every record that matches, so narrow it with --since, --run-id or --limit.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "stages/request.h"
#include "worker/cli.h"
#include "worker/commands.h"
#include "worker/dlq.h"
#include "worker/kafka_client.h"
#include "worker/kafka_producer.h"
#include "worker/stage.h"

#define REPLAY_TIMEOUT_MS 10000
#define REPLAY_IDLE_MS 30000
#define REPLAY_MAX_PARTITIONS 1024

struct replay_filter {
        const char *stage;
        const char *error_class;
        const char *run_id;
        int64_t since_ms; /* 0: any time */
        int limit;        /* 0: no limit */
        bool dry_run;
};

struct replay_state {
        const struct config *cfg;
        const struct replay_filter *filter;
        rd_kafka_t *consumer;
        struct kafka_producer *producer; /* NULL in a dry run */
        char dlq[KAFKA_NAME_MAX];
        int partitions;
        int64_t end[REPLAY_MAX_PARTITIONS]; /* high watermark at the start */
        bool done[REPLAY_MAX_PARTITIONS];
        long scanned, selected, replayed, failed;
};

static void cmd_replay_help(void)
{
        printf("Usage: flyio-image-manager replay-dlq [--stage S] [--error-class C]\n"
               "                                      [--since TIME] [--run-id ID] [--limit N]\n"
               "                                      [--dry-run]\n"
               "\n"
               "Read '<KAFKA_TOPIC_PREFIX>.dlq' from its beginning to its current end and\n"
               "re-publish the selected records (original key and value, attempt + 1) to\n"
               "their stage topic. Every filter given must match. Each run replays every\n"
               "matching record, also one replayed before.\n"
               "\n"
               "  --stage S          records of stage S (download, unpack, activate)\n"
               "  --error-class C    invalid_request, permanent or exhausted\n"
               "  --since TIME       last failure at or after TIME: RFC 3339\n"
               "                     (2026-12-03T18:00:00Z) or a duration ago (30m, 2h, 7d)\n"
               "  --run-id ID        the records of one failed run (any letter case)\n"
               "  --limit N          replay at most N records\n"
               "  --dry-run          only say what would be replayed\n");
}

/* "2026-12-03T18:00:00Z" or "90s", "30m", "2h", "7d" ago. */
static int cmd_replay_parse_since(const char *s, int64_t *ret_ms)
{
        static const struct {
                char unit;
                int64_t ms;
        } units[] = {{'s', 1000}, {'m', 60000}, {'h', 3600000}, {'d', 86400000}};
        size_t len = strlen(s);
        char digits[32];
        uint64_t n;

        if (request_parse_time(s, ret_ms) == 0)
                return 0;
        if (len < 2 || len >= sizeof(digits))
                return -EINVAL;
        memcpy(digits, s, len - 1);
        digits[len - 1] = '\0';
        if (util_parse_u64(digits, &n) < 0 || n > 100000000)
                return -EINVAL;
        for (size_t i = 0; i < ARRAY_SIZE(units); i++) {
                if (s[len - 1] == units[i].unit) {
                        *ret_ms = util_now_realtime_ms() - (int64_t)n * units[i].ms;
                        return 0;
                }
        }
        return -EINVAL;
}

static const char *const cmd_replay_error_classes[] = {
        STAGE_ERROR_INVALID_REQUEST,
        STAGE_ERROR_PERMANENT,
        STAGE_ERROR_EXHAUSTED,
};

static bool cmd_replay_known_class(const char *name)
{
        for (size_t i = 0; i < ARRAY_SIZE(cmd_replay_error_classes); i++) {
                if (strcmp(cmd_replay_error_classes[i], name) == 0)
                        return true;
        }
        return false;
}

static bool cmd_replay_known_stage(const char *name)
{
        for (size_t i = 0; i < ARRAY_SIZE(kafka_stage_suffixes); i++) {
                if (strcmp(kafka_stage_suffixes[i], name) == 0)
                        return true;
        }
        return false;
}

/* Returns 0, -1 after --help, or a usage status. */
static int cmd_replay_args(int argc, char **argv, struct replay_filter *f)
{
        static const struct option opts[] = {
                {"stage", required_argument, NULL, 's'},
                {"error-class", required_argument, NULL, 'e'},
                {"since", required_argument, NULL, 't'},
                {"run-id", required_argument, NULL, 'r'},
                {"limit", required_argument, NULL, 'l'},
                {"dry-run", no_argument, NULL, 'n'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        int c;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                switch (c) {
                case 's':
                        if (!cmd_replay_known_stage(optarg))
                                return cli_usage(
                                        argv[0],
                                        "unknown stage '%s' (expected download, unpack or activate)",
                                        optarg);
                        f->stage = optarg;
                        break;
                case 'e':
                        if (!cmd_replay_known_class(optarg))
                                return cli_usage(
                                        argv[0],
                                        "unknown error class '%s' (expected invalid_request, permanent or exhausted)",
                                        optarg);
                        f->error_class = optarg;
                        break;
                case 't':
                        if (cmd_replay_parse_since(optarg, &f->since_ms) < 0)
                                return cli_usage(
                                        argv[0],
                                        "--since expects an RFC 3339 time or a duration such as 30m, 2h, 7d; got '%s'",
                                        optarg);
                        break;
                case 'r':
                        f->run_id = optarg;
                        break;
                case 'l':
                        if (util_parse_int(optarg, 1, INT_MAX, &f->limit) < 0)
                                return cli_usage(argv[0], "--limit expects a positive integer");
                        break;
                case 'n':
                        f->dry_run = true;
                        break;
                case 'h':
                        cmd_replay_help();
                        return -1;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        return cli_no_positional(argv[0], argc, argv);
}

static bool cmd_replay_selected(const struct replay_filter *f, const struct dlq_record *rec)
{
        if (f->stage && strcmp(f->stage, rec->stage) != 0)
                return false;
        if (f->error_class && strcmp(f->error_class, rec->error_class) != 0)
                return false;
        /* ULIDs are case-insensitive, and `status` accepts them in lower case. */
        if (f->run_id && strcasecmp(f->run_id, rec->run_id) != 0)
                return false;
        if (f->since_ms && rec->last_failure_ms < f->since_ms)
                return false;
        return true;
}

/* Assign every non-empty partition at its low watermark; remember where each ends. */
static int cmd_replay_assign(struct replay_state *st)
{
        const struct rd_kafka_metadata *md = NULL;
        rd_kafka_topic_partition_list_t *list = NULL;
        rd_kafka_topic_t *rkt;
        rd_kafka_resp_err_t err;
        int r = 0;

        rkt = rd_kafka_topic_new(st->consumer, st->dlq, NULL);
        if (!rkt)
                return kafka_client_errno(rd_kafka_last_error(), "failed to open the DLQ topic");
        err = rd_kafka_metadata(st->consumer, 0, rkt, &md, REPLAY_TIMEOUT_MS);
        if (!err && (md->topic_cnt != 1 || md->topics[0].err))
                err = md->topic_cnt ? md->topics[0].err : RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART;
        if (err) {
                r = kafka_client_errno(err, "failed to read the dead-letter topic's metadata");
                goto out;
        }
        st->partitions = md->topics[0].partition_cnt;
        if (st->partitions > REPLAY_MAX_PARTITIONS) {
                r = err_set(-E2BIG, "dead-letter topic has %d partitions", st->partitions);
                goto out;
        }
        list = rd_kafka_topic_partition_list_new(st->partitions);
        for (int i = 0; i < st->partitions; i++) {
                int32_t id = md->topics[0].partitions[i].id;
                int64_t low = 0, high = 0;

                err = rd_kafka_query_watermark_offsets(st->consumer, st->dlq, id, &low, &high,
                                                       REPLAY_TIMEOUT_MS);
                if (err) {
                        r = kafka_client_errno(err, "failed to query the dead-letter topic");
                        goto out;
                }
                FIM_ASSERT(id >= 0 && id < REPLAY_MAX_PARTITIONS);
                st->end[id] = high;
                st->done[id] = high <= low;
                if (high > low)
                        rd_kafka_topic_partition_list_add(list, st->dlq, id)->offset = low;
        }
        if (list->cnt > 0) {
                err = rd_kafka_assign(st->consumer, list);
                if (err)
                        r = kafka_client_errno(err, "failed to assign the dead-letter topic");
        }
out:
        if (list)
                rd_kafka_topic_partition_list_destroy(list);
        if (md)
                rd_kafka_metadata_destroy(md);
        rd_kafka_topic_destroy(rkt);
        return r;
}

static bool cmd_replay_finished(const struct replay_state *st)
{
        for (int i = 0; i < st->partitions; i++) {
                if (!st->done[i])
                        return false;
        }
        return true;
}

static int cmd_replay_publish(struct replay_state *st, const rd_kafka_message_t *msg,
                              const struct dlq_record *rec, const char *topic)
{
        char from[KAFKA_NAME_MAX + 48];
        struct kafka_delivery d;
        struct kafka_record out = {
                .topic = topic,
                .key = msg->key,
                .key_len = msg->key_len,
                .value = msg->payload,
                .value_len = msg->len,
        };

        (void)snprintf(from, sizeof(from), "%s/%" PRId32 "/%" PRId64, st->dlq, msg->partition,
                       msg->offset);
        out.headers = dlq_replay_headers(msg, rec->attempt + 1, from);

        if (!out.headers)
                return err_set(-ENOMEM, "out of memory");
        return kafka_producer_send_sync(st->producer, &out, &d);
}

/*
 * What a record says about itself (its key, its headers) is anybody's bytes: escaped before
 * it reaches the operator's terminal, where an ESC could rewrite the screen and a newline fake
 * a line of our own. The key is always quoted; a header value only when it is more than a
 * plain token, as error classes and run ids are.
 */
static void cmd_replay_field(const char *value, size_t len, bool quote, char *buf, size_t size)
{
        bool plain = len > 0;
        size_t end;

        for (size_t i = 0; i < len && plain; i++)
                plain = isalnum((unsigned char)value[i]) || value[i] == '_' || value[i] == '-';
        if (plain && !quote) {
                util_escape_bytes(value, len, buf, size);
                return;
        }
        buf[0] = '"';
        util_escape_bytes(value, len, buf + 1, size - 2);
        end = strlen(buf);
        buf[end] = '"';
        buf[end + 1] = '\0';
}

/* The record's key, error class and run id as cmd_replay_record() prints them. */
struct replay_shown {
        char key[256]; /* a longer one is cut, and ends in "..." */
        char error_class[160];
        char run_id[160];
};

static void cmd_replay_show(const rd_kafka_message_t *msg, const struct dlq_record *rec,
                            struct replay_shown *ret)
{
        cmd_replay_field(msg->key ? msg->key : "", msg->key ? msg->key_len : 0, true, ret->key,
                         sizeof(ret->key));
        cmd_replay_field(rec->error_class, strlen(rec->error_class), false, ret->error_class,
                         sizeof(ret->error_class));
        if (rec->run_id[0])
                cmd_replay_field(rec->run_id, strlen(rec->run_id), false, ret->run_id,
                                 sizeof(ret->run_id));
        else
                (void)snprintf(ret->run_id, sizeof(ret->run_id), "-");
}

static void cmd_replay_record(struct replay_state *st, const rd_kafka_message_t *msg)
{
        const struct replay_filter *f = st->filter;
        char topic[KAFKA_NAME_MAX];
        struct replay_shown shown;
        struct dlq_record rec;
        int r;

        st->scanned++;
        if (dlq_record_parse(msg, &rec) < 0 || !cmd_replay_known_stage(rec.stage)) {
                printf("skipped       %s[%" PRId32 "]@%" PRId64 ": not a dead letter of ours\n",
                       st->dlq, msg->partition, msg->offset);
                return;
        }
        if (!cmd_replay_selected(f, &rec) || (f->limit && st->selected >= f->limit))
                return;
        st->selected++;
        if (kafka_client_topic(st->cfg, rec.stage, topic, sizeof(topic)) < 0)
                return;
        cmd_replay_show(msg, &rec, &shown);
        if (f->dry_run) {
                printf("would replay  %s[%" PRId32 "]@%" PRId64 " -> '%s' key=%s"
                       " error_class=%s run_id=%s attempt=%d\n",
                       st->dlq, msg->partition, msg->offset, topic, shown.key, shown.error_class,
                       shown.run_id, rec.attempt + 1);
                return;
        }
        r = cmd_replay_publish(st, msg, &rec, topic);
        if (r < 0) {
                st->failed++;
                printf("FAILED        %s[%" PRId32 "]@%" PRId64 " -> '%s': %s\n", st->dlq,
                       msg->partition, msg->offset, topic, err_text(r));
                return;
        }
        st->replayed++;
        printf("replayed      %s[%" PRId32 "]@%" PRId64 " -> '%s' key=%s"
               " error_class=%s run_id=%s attempt=%d\n",
               st->dlq, msg->partition, msg->offset, topic, shown.key, shown.error_class,
               shown.run_id, rec.attempt + 1);
}

/* Read every assigned partition up to its starting end. */
static int cmd_replay_scan(struct replay_state *st)
{
        int64_t idle_since = util_now_monotonic_ms();

        while (!cmd_replay_finished(st)) {
                rd_kafka_message_t *msg = rd_kafka_consumer_poll(st->consumer, 500);

                if (!msg) {
                        if (util_now_monotonic_ms() - idle_since > REPLAY_IDLE_MS)
                                return err_set(-ETIMEDOUT,
                                               "no progress reading '%s' for %d s: is Kafka up?",
                                               st->dlq, REPLAY_IDLE_MS / 1000);
                        continue;
                }
                idle_since = util_now_monotonic_ms();
                if (msg->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
                        if (msg->partition >= 0 && msg->partition < st->partitions)
                                st->done[msg->partition] = true;
                } else if (msg->err) {
                        fprintf(stderr, "warning: %s\n", rd_kafka_message_errstr(msg));
                } else if (msg->partition >= 0 && msg->partition < st->partitions &&
                           !st->done[msg->partition]) {
                        if (msg->offset < st->end[msg->partition])
                                cmd_replay_record(st, msg);
                        if (msg->offset >= st->end[msg->partition] - 1)
                                st->done[msg->partition] = true;
                }
                rd_kafka_message_destroy(msg);
        }
        return 0;
}

static int cmd_replay_consumer(struct replay_state *st)
{
        char group[KAFKA_NAME_MAX + 64];
        const char *props[] = {
                "group.id",
                group,
                "enable.auto.commit",
                "false",
                "enable.auto.offset.store",
                "false",
                "enable.partition.eof",
                "true",
                NULL,
        };
        rd_kafka_conf_t *conf = NULL;
        int r;

        (void)snprintf(group, sizeof(group), "%s.replay-dlq.unjoined.%ld", st->dlq, (long)getpid());
        r = kafka_client_conf_new(st->cfg, RD_KAFKA_CONSUMER, "replay-dlq", props, &conf);
        if (r < 0)
                return r;
        /* rd_kafka_new() takes the conf. */
        return kafka_client_new(RD_KAFKA_CONSUMER, conf, &st->consumer);
}

static int cmd_replay_run(struct replay_state *st)
{
        int r;

        r = kafka_client_topic(st->cfg, KAFKA_DLQ_SUFFIX, st->dlq, sizeof(st->dlq));
        if (r < 0)
                return r;
        r = cmd_replay_consumer(st);
        if (r < 0)
                return r;
        r = cmd_replay_assign(st);
        if (r < 0)
                return r;
        if (!st->filter->dry_run) {
                r = kafka_producer_new(st->cfg, "replay-dlq", 15000, &st->producer);
                if (r < 0)
                        return r;
        }
        return cmd_replay_scan(st);
}

int cmd_replay_dlq(int argc, char **argv)
{
        struct replay_filter filter = {0};
        struct replay_state st = {.filter = &filter};
        struct config cfg;
        int r;

        r = cmd_replay_args(argc, argv, &filter);
        if (r < 0)
                return CMD_EXIT_OK;
        if (r > 0)
                return r;
        if (cli_config(&cfg) < 0)
                return CMD_EXIT_USAGE;
        st.cfg = &cfg;
        r = cmd_replay_run(&st);
        if (st.consumer) {
                (void)rd_kafka_consumer_close(st.consumer);
                rd_kafka_destroy(st.consumer);
        }
        kafka_producer_free(st.producer, 5000);
        if (r == 0) {
                if (filter.dry_run)
                        printf("dry run: scanned %ld record%s of '%s', would replay %ld; nothing changed\n",
                               st.scanned, st.scanned == 1 ? "" : "s", st.dlq, st.selected);
                else
                        printf("scanned %ld record%s of '%s', selected %ld, replayed %ld, failed %ld\n",
                               st.scanned, st.scanned == 1 ? "" : "s", st.dlq, st.selected,
                               st.replayed, st.failed);
        }
        config_done(&cfg);
        if (r < 0)
                return cli_fail(r);
        return st.failed ? CMD_EXIT_FAILURE : CMD_EXIT_OK;
}
