#pragma once

/*
 * Runtime configuration. The seed's Config with its defaults and environment variables, plus
 * what a fleet of Kafka workers on PostgreSQL needs.
 *
 * Precedence, lowest first: built-in default, config file, environment, flags. Each layer
 * overrides the one before it. The config file holds KEY=value lines with the same names as
 * the environment variables (an example is config/flyio-image-manager.conf.example).
 *
 * Secrets (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, the password in DATABASE_URL) are
 * registered with the logger so that they are masked wherever they might surface, and are
 * never printed by config_print().
 */

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/*
 * The longest HOST_ID. A host id goes into lease owners (with a pid, stage and token, within
 * LEASE_OWNER_MAX), idempotency keys and Kafka client ids, so it is bounded well below those.
 */
#define CONFIG_HOST_ID_MAX 128

struct config {
        /* S3 */
        char *s3_bucket;
        char *s3_region;
        char *s3_access_key;
        char *s3_secret_key;
        char *s3_session_token;
        char *s3_endpoint;
        bool s3_force_path_style;

        /* Seed's SQLite paths: accepted so that old environments still parse; unused. */
        char *db_path;
        char *fsm_db_path;

        /* State */
        char *database_url;
        char *host_id;

        /* Storage */
        char *pool_name;
        char *local_dir;
        uint64_t device_size;
        int pool_high_water_percent;
        uint64_t max_object_size;

        /* Extraction limits (the unpack stage's; file data is bounded by the device size) */
        int extract_max_entries;
        int extract_max_depth;
        int extract_max_path_length;
        int extract_max_sparse_entries;

        /* Queues and timeouts (seconds) */
        int download_queue_size;
        int unpack_queue_size;
        int activate_queue_size;
        int download_timeout;
        int unpack_timeout;
        int download_stall_timeout;
        uint64_t download_parallel_threshold;
        uint64_t download_part_size;
        int download_connections;

        /* Kafka and the FSM engine */
        char *kafka_brokers;
        char *kafka_topic_prefix;
        int max_attempts;
        int retry_base_ms;
        int retry_max_ms;
        int lease_seconds;
        int shutdown_timeout;

        /* Operations */
        char *metrics_addr;
        char *log_level;

        /* Where each setting came from (enum config_source), indexed like the key table. */
        unsigned char sources[64];
};

/* Where a value came from, for error messages and show-config. */
enum config_source {
        CONFIG_SOURCE_DEFAULT,
        CONFIG_SOURCE_FILE,
        CONFIG_SOURCE_ENV,
        CONFIG_SOURCE_FLAG,
};

/* Fill @cfg with the built-in defaults. HOST_ID defaults to the hostname. Returns 0/-ENOMEM. */
int config_init(struct config *cfg);

/* Free every string in @cfg and zero it. Safe on a zeroed struct. */
void config_done(struct config *cfg);

/*
 * Apply one setting by variable name (e.g. "DOWNLOAD_QUEUE_SIZE"). Validates the value; on
 * failure returns -EINVAL with a message such as
 * "DOWNLOAD_QUEUE_SIZE='abc': expected a positive integer" (secrets are not echoed).
 * Unknown names give -ENOENT.
 */
int config_set(struct config *cfg, const char *name, const char *value, enum config_source src);

/* Read a KEY=value file ('#' comments, blank lines, optional "export " and quotes). */
int config_load_file(struct config *cfg, const char *path);

/* Apply every known variable present in the environment. */
int config_load_env(struct config *cfg);

/*
 * The usual sequence: defaults, then @file (or $FIM_CONFIG, or /etc/flyio-image-manager/config
 * when it exists; an explicitly named file must exist), then the environment. Flags are
 * applied by the caller with config_set(..., CONFIG_SOURCE_FLAG). Also registers secrets
 * with the logger and applies LOG_LEVEL.
 */
int config_load(struct config *cfg, const char *file);

/* Checks that involve several values (e.g. both or neither of the S3 key pair). */
int config_validate(const struct config *cfg);

/* Print every setting as "NAME=value  # source", secrets as "[set]" or "[not set]". */
void config_print(const struct config *cfg, FILE *out);

/* Whether S3 credentials are configured (otherwise requests are anonymous). */
bool config_has_s3_credentials(const struct config *cfg);

/* Fetch a setting's value rendered as text, secrets masked. For tests and diagnostics. */
int config_get_display(const struct config *cfg, const char *name, char *buf, size_t size);
