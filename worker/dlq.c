#include "worker/dlq.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "stages/request.h"
#include "stages/s3_sigv4.h"
#include "worker/kafka_client.h"
#include "worker/kafka_producer.h"

static const char *const dlq_header_names[] = {
        DLQ_HEADER_STAGE,         DLQ_HEADER_ERROR_CLASS,
        DLQ_HEADER_ERROR,         DLQ_HEADER_ATTEMPTS,
        DLQ_HEADER_RUN_ID,        DLQ_HEADER_HOST,
        DLQ_HEADER_FIRST_FAILURE, DLQ_HEADER_LAST_FAILURE,
        DLQ_HEADER_SOURCE_TOPIC,  DLQ_HEADER_SOURCE_PARTITION,
        DLQ_HEADER_SOURCE_OFFSET,
};

bool dlq_is_dlq_header(const char *name)
{
        for (size_t i = 0; i < ARRAY_SIZE(dlq_header_names); i++) {
                if (strcmp(dlq_header_names[i], name) == 0)
                        return true;
        }
        return false;
}

/*
 * The original's headers, minus dead-letter headers from an earlier trip through the DLQ (a
 * replayed message that fails again gets one fresh set), and minus @skip and @skip2.
 */
static rd_kafka_headers_t *dlq_copy_headers(const rd_kafka_message_t *msg, const char *skip,
                                            const char *skip2, size_t extra)
{
        rd_kafka_headers_t *src = NULL, *dst;
        const char *name;
        const void *value;
        size_t size;

        if (rd_kafka_message_headers(msg, &src) != RD_KAFKA_RESP_ERR_NO_ERROR)
                src = NULL;
        dst = rd_kafka_headers_new((src ? rd_kafka_header_cnt(src) : 0) + extra);
        if (!dst)
                return NULL;
        for (size_t i = 0; src && rd_kafka_header_get_all(src, i, &name, &value, &size) ==
                                          RD_KAFKA_RESP_ERR_NO_ERROR;
             i++) {
                if (dlq_is_dlq_header(name) || (skip && strcmp(name, skip) == 0) ||
                    (skip2 && strcmp(name, skip2) == 0))
                        continue;
                (void)rd_kafka_header_add(dst, name, -1, value, (ssize_t)size);
        }
        return dst;
}

int dlq_send(struct kafka_producer *p, const struct config *cfg, const rd_kafka_message_t *msg,
             const struct dlq_failure *f)
{
        char topic[KAFKA_NAME_MAX], error[DLQ_ERROR_MAX], attempts[16], first[40], last[40];
        char partition[16], offset[24];
        int64_t now = util_now_realtime_ms();
        struct kafka_delivery d;
        struct kafka_record rec = {0};
        rd_kafka_headers_t *hdrs;
        const char *names[] = {DLQ_HEADER_STAGE,         DLQ_HEADER_ERROR_CLASS,
                               DLQ_HEADER_ERROR,         DLQ_HEADER_ATTEMPTS,
                               DLQ_HEADER_RUN_ID,        DLQ_HEADER_HOST,
                               DLQ_HEADER_FIRST_FAILURE, DLQ_HEADER_LAST_FAILURE,
                               DLQ_HEADER_SOURCE_TOPIC,  DLQ_HEADER_SOURCE_PARTITION,
                               DLQ_HEADER_SOURCE_OFFSET};
        const char *values[ARRAY_SIZE(names)];
        int r;

        r = kafka_client_topic(cfg, KAFKA_DLQ_SUFFIX, topic, sizeof(topic));
        if (r < 0)
                return r;
        (void)snprintf(error, sizeof(error), "%s", f->error_text ? f->error_text : "");
        log_redact(error);
        (void)snprintf(attempts, sizeof(attempts), "%d", f->attempts);
        util_format_time(f->first_failure_ms ? f->first_failure_ms : now, first, sizeof(first));
        util_format_time(f->last_failure_ms ? f->last_failure_ms : now, last, sizeof(last));
        (void)snprintf(partition, sizeof(partition), "%" PRId32, msg->partition);
        (void)snprintf(offset, sizeof(offset), "%" PRId64, msg->offset);
        values[0] = f->stage;
        values[1] = f->error_class;
        values[2] = error;
        values[3] = attempts;
        values[4] = f->run_id && f->run_id[0] ? f->run_id : NULL;
        values[5] = cfg->host_id;
        values[6] = first;
        values[7] = last;
        values[8] = msg->rkt ? rd_kafka_topic_name(msg->rkt) : NULL;
        values[9] = partition;
        values[10] = offset;

        hdrs = dlq_copy_headers(msg, NULL, NULL, ARRAY_SIZE(names));
        if (!hdrs)
                return err_set(-ENOMEM, "out of memory");
        for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
                if (values[i])
                        (void)rd_kafka_header_add(hdrs, names[i], -1, values[i], -1);
        }
        rec.topic = topic;
        rec.key = msg->key;
        rec.key_len = msg->key_len;
        rec.value = msg->payload;
        rec.value_len = msg->len;
        rec.headers = hdrs;
        r = kafka_producer_send_sync(p, &rec, &d);
        if (r < 0)
                return err_wrap(r, "failed to write to the dead-letter topic '%s'", topic);
        return 0;
}

int dlq_record_parse(const rd_kafka_message_t *msg, struct dlq_record *ret)
{
        struct dlq_record rec = {.attempt = 1};
        char buf[64];

        if (!kafka_client_header(msg, DLQ_HEADER_STAGE, rec.stage, sizeof(rec.stage)) ||
            !rec.stage[0])
                return err_set(-EINVAL, "record has no '%s' header", DLQ_HEADER_STAGE);
        (void)kafka_client_header(msg, DLQ_HEADER_ERROR_CLASS, rec.error_class,
                                  sizeof(rec.error_class));
        (void)kafka_client_header(msg, DLQ_HEADER_RUN_ID, rec.run_id, sizeof(rec.run_id));
        (void)kafka_client_header(msg, DLQ_HEADER_ERROR, rec.error, sizeof(rec.error));
        if (kafka_client_header(msg, MSG_HEADER_ATTEMPT, buf, sizeof(buf)) &&
            util_parse_int(buf, 1, 1000000, &rec.attempt) < 0)
                rec.attempt = 1;
        if (kafka_client_header(msg, DLQ_HEADER_ATTEMPTS, buf, sizeof(buf)) &&
            util_parse_int(buf, 0, 1000000, &rec.attempts) < 0)
                rec.attempts = 0;
        if (kafka_client_header(msg, DLQ_HEADER_LAST_FAILURE, buf, sizeof(buf)) &&
            request_parse_time(buf, &rec.last_failure_ms) < 0)
                rec.last_failure_ms = 0;
        *ret = rec;
        return 0;
}

rd_kafka_headers_t *dlq_replay_headers(const rd_kafka_message_t *msg, int attempt,
                                       const char *replayed_from)
{
        rd_kafka_headers_t *hdrs =
                dlq_copy_headers(msg, MSG_HEADER_ATTEMPT, MSG_HEADER_REPLAYED_FROM, 2);
        char value[16];

        if (!hdrs)
                return NULL;
        (void)snprintf(value, sizeof(value), "%d", attempt);
        (void)rd_kafka_header_add(hdrs, MSG_HEADER_ATTEMPT, -1, value, -1);
        (void)rd_kafka_header_add(hdrs, MSG_HEADER_REPLAYED_FROM, -1, replayed_from, -1);
        return hdrs;
}

/* The SHA-256 of @msg's value (empty for none) as lowercase hex. */
static int dlq_value_sha256(const rd_kafka_message_t *msg, char hex[SIGV4_HEX_LEN + 1])
{
        return sigv4_sha256_hex(msg->payload ? msg->payload : "", msg->payload ? msg->len : 0, hex);
}

int dlq_runless_stored(struct db *db, const char *source, const rd_kafka_message_t *msg)
{
        char digest[SIGV4_HEX_LEN + 1];
        const char *params[] = {source, digest};
        PGresult *res = NULL;
        int r = dlq_value_sha256(msg, digest);

        if (r < 0)
                return r;
        r = db_query_row(db, &res,
                         "SELECT 1 FROM runless_dead_letters WHERE source = $1"
                         " AND value_sha256 = $2",
                         2, params);
        if (res)
                PQclear(res);
        return r < 0 ? r : r > 0;
}

int dlq_runless_record(struct db *db, const struct config *cfg, const char *source,
                       const rd_kafka_message_t *msg)
{
        char digest[SIGV4_HEX_LEN + 1];
        const char *params[] = {source, digest, cfg->host_id};
        int r = dlq_value_sha256(msg, digest);

        if (r < 0)
                return r;
        return db_exec(db, NULL,
                       "WITH pruned AS (DELETE FROM runless_dead_letters"
                       " WHERE stored_at < now() - interval '30 days')"
                       " INSERT INTO runless_dead_letters (source, value_sha256, host_id)"
                       " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                       3, params);
}
