#pragma once

/*
 * Shared machinery of the worker tests: a scratch database and a unique topic prefix per
 * test, worker processes (this test binary re-executed as "worker", running the sample
 * stages), the real CLI, and small Kafka helpers (produce, read a topic, committed offsets).
 *
 * The sample stages are named download, unpack and activate and are built on the FSM engine
 * like the real ones, with two transitions: "work" records a call in sample_calls (outside any
 * transaction, so it survives a crash) and its effect in sample_effects (committed with the
 * transition); "record" writes the handoff to the next stage into the outbox in the
 * transaction that completes the run. What the work step does depends on the image id:
 *
 *   slow-*    sleeps FIM_TEST_SLOW_MS (default 2000) ms in the download stage's work step
 *   slowlast-* the same in the download stage's last step, "record"
 *   hold-*    waits in the download stage's work step until sample_release lists the image
 *             (or the worker stops)
 *   med-*     sleeps 150 ms in every stage
 *   fail-*    fails permanently in the download stage while sample_fail lists the image
 *   flaky-*   fails transiently in the download stage, every time
 *   broken-*  the download stage's call fails with -EINVAL before any run (engine trouble)
 *   stuck-*   the download stage's call fails with -EAGAIN before any run, every time
 *
 * A request without a non-empty string "image_id" is an invalid request.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "config/config.h"
#include "worker/stage.h"

struct db;

struct wt_env {
        char url[512];
        struct db *db;
        char prefix[64];
        char brokers[256];
        struct config cfg; /* what the worker processes see, for the test's own clients */
        pid_t workers[8];
};

/*
 * If argv asks for it ("worker"), run a sample worker process from the environment and
 * return true with its exit status in *ret_status. Call first thing in main(). In the test
 * process, FIM_TEST_FILTER (a cmocka pattern such as "test_worker_poison*") selects cases.
 * With FIM_TEST_ATEXIT_NOTE set, a worker process says on stderr when exit() runs its atexit
 * handlers ("test worker: atexit handlers ran").
 */
bool wt_child_main(int argc, char **argv, int *ret_status);

/*
 * Run @stage's handler in this process, as process-image does (@handoff false) or as a worker
 * does, with the test's configuration and database. Returns what the handler returns.
 */
int wt_run_stage(struct wt_env *e, const struct stage *stage, const char *json, bool handoff,
                 struct stage_result *ret);

/* The sample stage @id, as the worker processes run it. */
const struct stage *wt_sample_stage(enum stage_id id);

/*
 * Create the database, the sample tables and the topics (3 partitions per stage, 1 for the
 * DLQ) of a fresh prefix on @brokers (NULL: $KAFKA_BROKERS), and export the environment the
 * workers and the CLI read. Fails the test when a service is missing.
 */
void wt_setup(struct wt_env *e, const char *brokers);

/* Kill leftover workers, drop the database. */
void wt_teardown(struct wt_env *e);

/* Start a worker process (stderr goes to ours). Extra "NAME=value" settings may follow. */
pid_t wt_worker_start(struct wt_env *e, const char *const *extra_env);

/* The same with the worker's stderr appended to the file @log. */
pid_t wt_worker_start_log(struct wt_env *e, const char *const *extra_env, const char *log);

/* Start the real binary with @args (NULL-terminated) in the background, like a worker. */
pid_t wt_cli_start(struct wt_env *e, const char *const *args, const char *const *extra_env);

/*
 * Send @sig to a worker and wait up to @timeout_ms for it to exit. Returns its exit status
 * (128 + n when killed by signal n), or -1 after a timeout (it is then SIGKILLed).
 */
int wt_worker_stop(struct wt_env *e, pid_t pid, int sig, int timeout_ms);

/* Produce one message to "<prefix>.<suffix>" and wait for the broker; fails the test. */
void wt_produce(struct wt_env *e, const char *suffix, const char *key, const char *value);

/* The same with the given headers (NUL-terminated values; NULL values are left out). */
void wt_produce_headers(struct wt_env *e, const char *suffix, const char *key, const char *value,
                        size_t nheaders, const char *const *names, const char *const *values);

/* Sum of the high watermarks of "<prefix>.<suffix>". */
long wt_topic_end(struct wt_env *e, const char *suffix);

struct wt_msg {
        int32_t partition;
        int64_t offset;
        char *key;
        char *value;
        size_t nheaders;
        char *names[24];
        char *values[24];
};

/* Every message of "<prefix>.<suffix>" up to its current end, by partition then offset. */
size_t wt_read_topic(struct wt_env *e, const char *suffix, struct wt_msg **ret);
void wt_msgs_free(struct wt_msg *msgs, size_t n);

/* A header's value, or NULL. */
const char *wt_header(const struct wt_msg *m, const char *name);

/*
 * Committed offset of group "<prefix>.<suffix>" for each partition of that topic (-1 where
 * none); returns the partition count (at most @max).
 */
int wt_committed(struct wt_env *e, const char *suffix, int64_t *ret, int max);

/* High watermark per partition; returns the partition count. */
int wt_ends(struct wt_env *e, const char *suffix, int64_t *ret, int max);

/* Wait until every partition's committed offset equals its end; fails after @timeout_ms. */
void wt_wait_committed(struct wt_env *e, const char *suffix, int timeout_ms);

/* Wait until the query (printf-style) returns @expect; fails with the last value. */
void wt_wait_sql(struct wt_env *e, long expect, int timeout_ms, const char *fmt, ...)
        __attribute__((format(printf, 4, 5)));

/* One integer from a query (printf-style). */
long wt_sql(struct wt_env *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * Run the real binary with @args (NULL-terminated) in the test environment; stdout goes to
 * @out. Returns the exit status.
 */
int wt_cli(struct wt_env *e, char *out, size_t size, const char *const *args);

/* Wait until group "<prefix>.<suffix>" is stable with @members members. */
void wt_wait_group(struct wt_env *e, const char *suffix, int members, int timeout_ms);

/* A loopback port that was free a moment ago. */
uint16_t wt_free_port(void);

/* GET http://127.0.0.1:@port@path: the status (-1 when nothing answers), the body's start. */
long wt_http_get(uint16_t port, const char *path, char body[512]);

/*
 * Poll a worker's /readyz on @port until it answers @want with a body containing @want_text
 * (NULL: any body); returns the milliseconds it took. Fails the test after @timeout_ms or when
 * @worker exits. @body gets the last answer's start.
 */
int64_t wt_wait_readyz(uint16_t port, pid_t worker, long want, const char *want_text,
                       int timeout_ms, char body[512]);
