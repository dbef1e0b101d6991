#include "worker/kafka_client.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"

#define KAFKA_CLIENT_ERRSTR_MAX 512

const char *const kafka_stage_suffixes[3] = {"download", "unpack", "activate"};

int kafka_client_errno(rd_kafka_resp_err_t err, const char *what)
{
        int r;

        switch (err) {
        case RD_KAFKA_RESP_ERR__TIMED_OUT:
        case RD_KAFKA_RESP_ERR__MSG_TIMED_OUT:
        case RD_KAFKA_RESP_ERR__TIMED_OUT_QUEUE:
        case RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT:
                r = -ETIMEDOUT;
                break;
        case RD_KAFKA_RESP_ERR__TRANSPORT:
        case RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN:
        case RD_KAFKA_RESP_ERR_NETWORK_EXCEPTION:
        case RD_KAFKA_RESP_ERR_BROKER_NOT_AVAILABLE:
                r = -ECONNRESET;
                break;
        case RD_KAFKA_RESP_ERR__QUEUE_FULL:
        case RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE:
        case RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION:
        case RD_KAFKA_RESP_ERR_NOT_COORDINATOR:
        case RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE:
        case RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS:
        case RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS:
        case RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS:
        case RD_KAFKA_RESP_ERR__WAIT_COORD:
                r = -EAGAIN;
                break;
        case RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC:
        case RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION:
        case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART:
                r = -ENOENT;
                break;
        case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
                r = -EMSGSIZE;
                break;
        case RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED:
        case RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED:
        case RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED:
                r = -EACCES;
                break;
        case RD_KAFKA_RESP_ERR__INVALID_ARG:
        case RD_KAFKA_RESP_ERR__CONFLICT:
        case RD_KAFKA_RESP_ERR__STATE:
        case RD_KAFKA_RESP_ERR_INVALID_CONFIG:
                r = -EINVAL;
                break;
        case RD_KAFKA_RESP_ERR__NO_OFFSET:
                r = -ENODATA;
                break;
        default:
                r = -EIO;
                break;
        }
        return err_set(r, "%s: %s", what, rd_kafka_err2str(err));
}

/* librdkafka logs with syslog levels; ours are a subset. */
static enum log_level kafka_client_log_level(int level)
{
        if (level <= 3)
                return LOG_LEVEL_ERR;
        if (level == 4)
                return LOG_LEVEL_WARNING;
        if (level == 5)
                return LOG_LEVEL_NOTICE;
        if (level == 6)
                return LOG_LEVEL_INFO;
        return LOG_LEVEL_DEBUG;
}

/* Runs on librdkafka's threads; the logger is thread-safe and writes one line per record. */
static void kafka_client_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
        enum log_level ours = kafka_client_log_level(level);

        if (!log_enabled(ours))
                return;
        log_emit(ours, 0, "librdkafka", "facility=%s client=%s text=%s", fac,
                 rk ? rd_kafka_name(rk) : "-", log_quote(buf));
}

static int kafka_client_set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
        char errstr[KAFKA_CLIENT_ERRSTR_MAX];

        if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
                return err_set(-EINVAL, "invalid Kafka property '%s': %s", name, errstr);
        return 0;
}

/*
 * Whether a librdkafka property holds a credential: every "*password*", "*secret*" or
 * "*token*" property (sasl.password, ssl.key.password, ssl.keystore.password,
 * sasl.oauthbearer.client.secret, ...), the inline private key and the OAUTHBEARER config.
 */
static bool kafka_client_is_secret(const char *name)
{
        static const char *const words[] = {"password", "secret", "token"};
        static const char *const names[] = {"ssl.key.pem", "sasl.oauthbearer.config"};

        for (size_t i = 0; i < ARRAY_SIZE(words); i++) {
                if (strcasestr(name, words[i]))
                        return true;
        }
        for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
                if (strcasecmp(name, names[i]) == 0)
                        return true;
        }
        return false;
}

/* Apply the options in environment variable @var: "a=1;b=2". */
static int kafka_client_apply_env(rd_kafka_conf_t *conf, const char *var)
{
        const char *env = getenv(var);
        char *copy, *p;
        int r = 0;

        if (!env || !env[0])
                return 0;
        copy = strdup(env);
        if (!copy)
                return err_set(-ENOMEM, "out of memory");
        p = copy;
        while (p && *p) {
                char *end = strchr(p, ';');
                char *eq;

                if (end)
                        *end = '\0';
                eq = strchr(p, '=');
                if (eq && eq != p) {
                        *eq = '\0';
                        /* Before librdkafka sees it: its errors may quote the value. */
                        if (kafka_client_is_secret(p)) {
                                r = log_register_secret(eq + 1);
                                if (r == -EINVAL) {
                                        log_warning(
                                                "secret too short to be masked in logs: use a longer one",
                                                "setting=%s property=%s min_length=%d", var, p,
                                                LOG_SECRET_MIN);
                                } else if (r < 0) {
                                        r = err_set(r,
                                                    "%s: failed to remember '%s' for log masking",
                                                    var, p);
                                        break;
                                }
                        }
                        r = kafka_client_set(conf, p, eq + 1);
                        if (r < 0) {
                                r = err_wrap(r, "%s", var);
                                break;
                        }
                } else if (*p) {
                        /* Not echoed: a mistyped "sasl.password:..." would leak the password. */
                        r = err_set(
                                -EINVAL,
                                "%s: expected name=value pairs separated by ';', got an item without '=' at offset %zu",
                                var, (size_t)(p - copy));
                        break;
                }
                p = end ? end + 1 : NULL;
        }
        free(copy);
        return r;
}

int kafka_client_conf_new(const struct config *cfg, rd_kafka_type_t type, const char *name,
                          const char *const *props, rd_kafka_conf_t **ret_conf)
{
        rd_kafka_conf_t *conf = rd_kafka_conf_new();
        char client_id[KAFKA_NAME_MAX];
        int r;

        if (!conf)
                return err_set(-ENOMEM, "out of memory");
        (void)snprintf(client_id, sizeof(client_id), "flyio-image-manager.%s.%ld.%s", cfg->host_id,
                       (long)getpid(), name);
        rd_kafka_conf_set_log_cb(conf, kafka_client_log_cb);
        r = kafka_client_set(conf, "bootstrap.servers", cfg->kafka_brokers);
        if (r < 0)
                goto fail;
        r = kafka_client_set(conf, "client.id", client_id);
        if (r < 0)
                goto fail;
        /* An idle connection closed by the broker is not worth an error line. */
        r = kafka_client_set(conf, "log.connection.close", "false");
        if (r < 0)
                goto fail;
        for (size_t i = 0; props && props[i]; i += 2) {
                r = kafka_client_set(conf, props[i], props[i + 1]);
                if (r < 0)
                        goto fail;
        }
        r = kafka_client_apply_env(conf, "FIM_KAFKA_OPTIONS");
        if (r < 0)
                goto fail;
        r = kafka_client_apply_env(conf, type == RD_KAFKA_CONSUMER ? "FIM_KAFKA_CONSUMER_OPTIONS"
                                                                   : "FIM_KAFKA_PRODUCER_OPTIONS");
        if (r < 0)
                goto fail;
        *ret_conf = conf;
        return 0;
fail:
        rd_kafka_conf_destroy(conf);
        return r;
}

int kafka_client_new(rd_kafka_type_t type, rd_kafka_conf_t *conf, rd_kafka_t **ret_rk)
{
        char errstr[KAFKA_CLIENT_ERRSTR_MAX];
        rd_kafka_t *rk;

        rk = rd_kafka_new(type, conf, errstr, sizeof(errstr));
        if (!rk) {
                rd_kafka_conf_destroy(conf);
                return err_set(-EINVAL, "failed to create Kafka client: %s", errstr);
        }
        *ret_rk = rk;
        return 0;
}

int kafka_client_header(const rd_kafka_message_t *msg, const char *name, char *buf, size_t size)
{
        rd_kafka_headers_t *hdrs = NULL;
        const void *value = NULL;
        size_t len = 0;

        buf[0] = '\0';
        /* The headers stay owned by the message. */
        if (rd_kafka_message_headers(msg, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR)
                return 0;
        if (rd_kafka_header_get_last(hdrs, name, &value, &len) != RD_KAFKA_RESP_ERR_NO_ERROR)
                return 0;
        if (!value)
                len = 0;
        if (len > size - 1)
                len = size - 1;
        memcpy(buf, value, len);
        buf[len] = '\0';
        return 1;
}

int kafka_client_header_text(const rd_kafka_message_t *msg, const char *name, char *buf,
                             size_t size)
{
        rd_kafka_headers_t *hdrs = NULL;
        const unsigned char *value = NULL;
        size_t len = 0;

        buf[0] = '\0';
        if (rd_kafka_message_headers(msg, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR)
                return 0;
        if (rd_kafka_header_get_last(hdrs, name, (const void **)&value, &len) !=
            RD_KAFKA_RESP_ERR_NO_ERROR)
                return 0;
        if (!value || len == 0)
                return 0;
        if (len > size - 1)
                return err_set(-EINVAL, "header '%s' is %zu bytes, more than %zu", name, len,
                               size - 1);
        for (size_t i = 0; i < len; i++) {
                if (value[i] < 0x20 || value[i] > 0x7e)
                        return err_set(-EINVAL,
                                       "header '%s' has byte 0x%02x at %zu, not printable ASCII",
                                       name, value[i], i);
        }
        memcpy(buf, value, len);
        buf[len] = '\0';
        return 1;
}

int kafka_client_topic(const struct config *cfg, const char *suffix, char *buf, size_t size)
{
        int r = util_snprintf(buf, size, "%s.%s", cfg->kafka_topic_prefix, suffix);

        if (r < 0)
                return err_set(r, "topic name '%s.%s' is too long", cfg->kafka_topic_prefix,
                               suffix);
        return 0;
}

int kafka_client_topic_end(rd_kafka_t *rk, const char *topic, int timeout_ms, int *ret_partitions,
                           int64_t *ret_end_sum)
{
        rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
        const struct rd_kafka_metadata *md = NULL;
        rd_kafka_resp_err_t err;
        int64_t sum = 0;
        int n = 0, r;

        if (!rkt)
                return kafka_client_errno(rd_kafka_last_error(), "failed to open topic");
        err = rd_kafka_metadata(rk, 0, rkt, &md, timeout_ms);
        if (err) {
                r = kafka_client_errno(err, "failed to fetch topic metadata");
                goto out;
        }
        if (md->topic_cnt != 1 || md->topics[0].err) {
                r = kafka_client_errno(md->topic_cnt ? md->topics[0].err
                                                     : RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
                                       topic);
                goto out;
        }
        for (int i = 0; i < md->topics[0].partition_cnt; i++) {
                int64_t low = 0, high = 0;

                err = rd_kafka_query_watermark_offsets(rk, topic, md->topics[0].partitions[i].id,
                                                       &low, &high, timeout_ms);
                if (err) {
                        r = kafka_client_errno(err, "failed to query watermark offsets");
                        goto out;
                }
                sum += high;
                n++;
        }
        *ret_partitions = n;
        *ret_end_sum = sum;
        r = 0;
out:
        if (md)
                rd_kafka_metadata_destroy(md);
        rd_kafka_topic_destroy(rkt);
        return r;
}
