#pragma once

/*
 * What every Kafka client of the worker shares: configuration from struct config, the one
 * place where librdkafka error codes become negative errno values, librdkafka's log lines
 * forwarded into our logger, and message header helpers.
 *
 * Extra librdkafka properties can be given in the environment as ';'-separated name=value
 * pairs, applied last:
 *
 *   FIM_KAFKA_OPTIONS="security.protocol=ssl;ssl.ca.location=/etc/ca.pem"    every client
 *   FIM_KAFKA_CONSUMER_OPTIONS="session.timeout.ms=6000"                      consumers only
 *   FIM_KAFKA_PRODUCER_OPTIONS="linger.ms=20"                                 producers only
 *
 * Tests and benchmarks use them to shorten group timeouts; operators can set TLS or SASL.
 * The values of credential properties (any name containing "password", "secret" or "token",
 * ssl.key.pem, sasl.oauthbearer.config) are registered with the log mask before librdkafka
 * sees them, so they never appear in logs or error messages.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <librdkafka/rdkafka.h>

struct config;

/* The topic suffixes of every stage of the pipeline and of the dead-letter topic. */
#define KAFKA_DLQ_SUFFIX "dlq"
extern const char *const kafka_stage_suffixes[3];

/* Longest topic or group name we build ("<prefix>.<suffix>"). */
#define KAFKA_NAME_MAX 256

/*
 * Turn a librdkafka error code into a negative errno and set the thread's last error to
 * "<what>: <librdkafka's text>". Transient conditions (broker down, timeouts, leader
 * changes) map to transient errnos (err_is_transient). Returns the negative errno.
 */
int kafka_client_errno(rd_kafka_resp_err_t err, const char *what);

/*
 * A configuration for a client of @type with KAFKA_BROKERS, a client.id naming this host and
 * @name, our log callback, and the environment's options applied on top of @props
 * (NULL-terminated name, value pairs; may be NULL). The caller owns *ret_conf until
 * rd_kafka_new() takes it. Returns 0, or -EINVAL with a message naming the property refused.
 */
int kafka_client_conf_new(const struct config *cfg, rd_kafka_type_t type, const char *name,
                          const char *const *props, rd_kafka_conf_t **ret_conf);

/* rd_kafka_new() with the conf from kafka_client_conf_new(); takes @conf in all cases. */
int kafka_client_new(rd_kafka_type_t type, rd_kafka_conf_t *conf, rd_kafka_t **ret_rk);

/*
 * Copy the last header called @name into @buf as a NUL-terminated string. Returns 1 when
 * found, 0 when absent (buf gets ""); a value longer than @size - 1 is truncated.
 */
int kafka_client_header(const rd_kafka_message_t *msg, const char *name, char *buf, size_t size);

/*
 * Like kafka_client_header() for headers whose value ends up in PostgreSQL text columns and
 * logs (trace id, parent run id): only printable ASCII (0x20-0x7e) of at most @size - 1 bytes
 * is copied. Returns 1 when found and copied, 0 when absent or empty, or -EINVAL (buf gets "",
 * err_last() says why) for anything else, including invalid UTF-8 and a value that a
 * truncated copy would cut.
 */
int kafka_client_header_text(const rd_kafka_message_t *msg, const char *name, char *buf,
                             size_t size);

/* "<prefix>.<suffix>" into @buf (KAFKA_NAME_MAX). Returns 0 or -ENAMETOOLONG. */
int kafka_client_topic(const struct config *cfg, const char *suffix, char *buf, size_t size);

/*
 * The high watermark of every partition of @topic, summed, and the partition count.
 * Returns 0, -ENOENT for an unknown topic, or another negative errno.
 */
int kafka_client_topic_end(rd_kafka_t *rk, const char *topic, int timeout_ms, int *ret_partitions,
                           int64_t *ret_end_sum);
