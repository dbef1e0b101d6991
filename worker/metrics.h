#pragma once

/*
 * Process-wide metrics and the HTTP endpoint that serves them.
 *
 * The registry is a fixed set of families (the names below), kept in relaxed atomics: every
 * metrics_* update is a few atomic adds, safe from any thread, with no lock and no allocation,
 * so stage and worker code call it unconditionally whether or not a server is running. Only
 * the pool gauges, whose label set is dynamic, take a mutex, and they are set rarely.
 *
 *   fim_jobs_total{stage,outcome}                     counter
 *   fim_stage_duration_seconds{stage}                 histogram, 0.1 s .. 1 h
 *   fim_downloaded_bytes_total, fim_extracted_bytes_total   counters
 *   fim_retries_total{stage,reason}                   counter
 *   fim_dlq_messages_total{stage,error_class}         counter
 *   fim_inflight_jobs{stage}                          gauge
 *   fim_consumer_lag_messages{stage}                  gauge
 *   fim_pool_{data,metadata}_usage_ratio{pool}        gauges 0..1
 *   fim_pool_{data,metadata}_{used,total}_blocks{pool} gauges
 *   fim_build_info{version}                           gauge, always 1
 *
 * The server (one thread, plain sockets, poll) answers GET/HEAD on /metrics (Prometheus text
 * format 0.0.4), /healthz (200 while the process runs) and /readyz (200 or 503, from a
 * callback the worker supplies). Any other path is 404, another method on a known path 405,
 * a malformed request 400, one larger than METRICS_REQUEST_MAX 431. Every connection gets a
 * total deadline to send its request, so a slow client holds one of METRICS_MAX_CONNECTIONS
 * slots for at most that long and never delays the others.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "worker/stage.h"

/* The outcome label of fim_jobs_total. */
enum metrics_outcome {
        METRICS_OUTCOME_COMPLETE,
        METRICS_OUTCOME_ALREADY_COMPLETE,
        METRICS_OUTCOME_FAILED,
        METRICS_OUTCOME_INTERRUPTED,
        METRICS_OUTCOME_BUSY,
        METRICS_OUTCOME_INVALID, /* the request did not decode; nothing ran */
        METRICS_OUTCOME_COUNT,
};

/* The reason label of fim_retries_total: why a job of a stage is tried again. */
enum metrics_retry_reason {
        METRICS_RETRY_TRANSITION,  /* a transition failed transiently; its run retries it */
        METRICS_RETRY_BUSY,        /* another worker holds the run; the pool asks again later */
        METRICS_RETRY_INTERRUPTED, /* lease lost or database unreachable mid-run; the pool
                                      runs the message again */
        METRICS_RETRY_STAGE_CALL,  /* the stage call failed transiently before any run was
                                      claimed or recorded; the pool runs the message again */
        METRICS_RETRY_COUNT,
};

/* Distinct pools the usage gauges keep; metrics_pool_set() refuses more. */
#define METRICS_POOLS_MAX 8
/* Longest pool name accepted as a label value. */
#define METRICS_POOL_NAME_MAX 127
/* Largest request (request line and headers) the server reads. */
#define METRICS_REQUEST_MAX 8192
/* Connections served at once; further clients wait in the listen backlog. */
#define METRICS_MAX_CONNECTIONS 16

/* Label value of an outcome ("complete", ...). */
const char *metrics_outcome_name(enum metrics_outcome outcome);

/*
 * The outcome label of a stage's result: METRICS_OUTCOME_INVALID when the request did not
 * decode (error class "invalid_request"), else the FSM outcome.
 */
enum metrics_outcome metrics_outcome_of(const struct stage_result *result);

/*
 * Count one finished job of @stage. @duration_s (wall time spent in the stage call) goes
 * into the stage's duration histogram only for COMPLETE and FAILED, the outcomes where the
 * stage did its work to an end; skipped, busy, interrupted and invalid jobs would only pile
 * up near zero. Negative or NaN durations count as 0.
 */
void metrics_job_finished(enum stage_id stage, enum metrics_outcome outcome, double duration_s);

/*
 * Bytes actually moved, counted as they are written, so that failed and interrupted attempts
 * count too (a retried download counts its bytes each time; resumed bytes once): bytes of
 * tarballs received from S3 and written to LOCAL_DIR, and file bytes written by extraction.
 */
void metrics_add_bytes_downloaded(uint64_t n);
void metrics_add_bytes_extracted(uint64_t n);

/* One retry was scheduled for a job of @stage, for @reason. */
void metrics_retry(enum stage_id stage, enum metrics_retry_reason reason);

/*
 * metrics_retry(METRICS_RETRY_TRANSITION) for the FSM engine, which knows the stage by its
 * definition's name only ("download", ...). Names that are not a stage are ignored.
 */
void metrics_retry_by_name(const char *stage);

/*
 * One message of @stage was published to the dead-letter topic. @error_class is one of
 * STAGE_ERROR_*; anything else (or NULL) counts as "other", which keeps the label set fixed.
 */
void metrics_dlq(enum stage_id stage, const char *error_class);

/* Jobs of @stage's pool currently running in this process: set, or change by @delta. */
void metrics_inflight_set(enum stage_id stage, int64_t n);
void metrics_inflight_add(enum stage_id stage, int64_t delta);

/* Consumer lag of @stage's group, summed over this process's assigned partitions. */
void metrics_lag_set(enum stage_id stage, int64_t lag);

/*
 * Usage of thin pool @pool in blocks (data blocks and metadata blocks, as dm-thin status
 * reports them). The first METRICS_POOLS_MAX distinct names get a slot for the rest of the
 * process; later names are refused. Returns 0, -ENOSPC when every slot holds another pool,
 * or -ENAMETOOLONG for a name longer than METRICS_POOL_NAME_MAX.
 */
int metrics_pool_set(const char *pool, uint64_t data_used, uint64_t data_total, uint64_t meta_used,
                     uint64_t meta_total);

/*
 * The exposition text of every family, in Prometheus text format 0.0.4. On success
 * *ret_text is an owned, NUL-terminated buffer (free()) and *ret_len its length. Returns 0
 * or -ENOMEM.
 */
int metrics_render(char **ret_text, size_t *ret_len);

/* Zero every value and forget the pools. For tests; not safe while other threads update. */
void metrics_reset(void);

/*
 * Readiness, asked on every GET /readyz from the server thread (so it must be thread-safe
 * and quick: read flags, do not connect anywhere). Returns true when ready; otherwise writes
 * a short reason (e.g. "no partitions assigned") into @reason, which holds @reason_size bytes.
 */
typedef bool (*metrics_ready_fn)(char *reason, size_t reason_size, void *userdata);

struct metrics_server;

/*
 * Listen on @addr ("host:port", "[v6addr]:port", "localhost:port", ":port" for every
 * interface, IPv6 dual-stack where available; port 0 picks a free one; a name binds the first
 * of its addresses that works) and serve from a new thread. An empty @addr means
 * metrics are disabled: returns 0 with *ret_server NULL. @ready may be NULL (always ready).
 * Returns 0 with an owned server in *ret_server, -EINVAL for an unparsable address, or the
 * negative errno of resolving, binding or starting the thread, with err_last() saying which.
 */
int metrics_server_start(const char *addr, metrics_ready_fn ready, void *userdata,
                         struct metrics_server **ret_server);

/* The TCP port the server listens on (the chosen one when it was started with port 0). */
uint16_t metrics_server_port(const struct metrics_server *server);

/* Stop serving, join the thread, close every connection and free @server. NULL is a no-op. */
void metrics_server_stop(struct metrics_server *server);

/* The pages the server answers. */
enum metrics_page {
        METRICS_PAGE_METRICS,
        METRICS_PAGE_HEALTHZ,
        METRICS_PAGE_READYZ,
};

#ifdef FIM_UNIT_TEST
/* Escape a label value (backslash, double quote, newline) into @out; always terminated. */
void metrics_escape_label(const char *in, char *out, size_t size);

/*
 * Parse one complete request head (@len bytes, ending in an empty line). Returns the HTTP
 * status to answer with: 200 with *ret_page and *ret_head set, or 400, 404 or 405.
 */
int metrics_parse_request(const char *buf, size_t len, enum metrics_page *ret_page, bool *ret_head);

/* Per-connection deadlines in milliseconds; tests shorten them. */
extern int metrics_read_timeout_ms;
extern int metrics_write_timeout_ms;
#endif
