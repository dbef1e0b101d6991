#pragma once

/* verify-system's checks live beside the modules they check; they report through this. */

#include <stdbool.h>

struct config;
struct verify_report;

/* Add one check line: PASS or FAIL, a short name and the reason. */
void verify_report_add(struct verify_report *rep, const char *name, bool ok, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));

/* Device-mapper: control node, pool POOL_NAME present and healthy. */
void verify_devicemapper(struct verify_report *rep, const struct config *cfg);

/* Kafka: brokers reachable, stage and dead-letter topics exist, lag of each stage's group. */
void verify_kafka(struct verify_report *rep, const struct config *cfg);

/* S3: endpoint reachable with the configured credentials, bucket S3_BUCKET present. */
void verify_s3(struct verify_report *rep, const struct config *cfg);
