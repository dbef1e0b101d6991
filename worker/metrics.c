#include "worker/metrics.h"

/*
 * DESIGN
 *
 * Registry. Every family has a fixed label set (stages, outcomes and DLQ error classes are
 * closed enumerations), so the values live in static arrays of relaxed atomics indexed by
 * those enums. An update is one or two atomic adds; nothing allocates, nothing locks. A
 * scrape reads each atomic once, so it may see a job counted in fim_jobs_total but not yet
 * in the histogram: Prometheus tolerates that, and the next scrape is consistent. Within a
 * histogram, _count is derived from the buckets the scrape read, so the +Inf bucket and
 * _count always agree. The duration sum is kept in whole microseconds, which makes it an
 * integer add and prints as an exact decimal.
 *
 * The pool gauges are the one dynamic label: a few named slots behind a mutex, taken for a
 * set (every few seconds, by one thread) and for a scrape. A fixed number of slots bounds the
 * series count even if a bug fed it a new name each time.
 *
 * Server. One thread polls the listening socket, a wake-up pipe and up to
 * METRICS_MAX_CONNECTIONS non-blocking connections. A connection goes READ -> WRITE -> DRAIN:
 * it must send its whole request head within metrics_read_timeout_ms of being accepted
 * (a total deadline, not an idle timer, so dribbling bytes does not extend it), gets one
 * response with "Connection: close", and after the response the server half-closes and
 * discards whatever the client still sends for a moment, so that a client that sent too much
 * reads the error instead of a reset. Because nothing blocks, a slow client costs one slot
 * and never delays another connection.
 */

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"

/* Upper bounds of the duration histogram in seconds, 0.1 s .. 1 h, and their le labels. */
static const struct {
        uint64_t le_us;
        const char *le;
} metrics_buckets[] = {
        {100000, "0.1"},      {250000, "0.25"},     {500000, "0.5"},    {1000000, "1"},
        {2500000, "2.5"},     {5000000, "5"},       {10000000, "10"},   {30000000, "30"},
        {60000000, "60"},     {120000000, "120"},   {300000000, "300"}, {600000000, "600"},
        {1800000000, "1800"}, {3600000000, "3600"},
};
#define METRICS_BUCKET_COUNT ARRAY_SIZE(metrics_buckets)

static const char *const metrics_dlq_classes[] = {
        STAGE_ERROR_INVALID_REQUEST, STAGE_ERROR_PERMANENT, STAGE_ERROR_EXHAUSTED,
        "other", /* must stay last */
};
#define METRICS_DLQ_CLASS_COUNT ARRAY_SIZE(metrics_dlq_classes)

static const char *const metrics_outcome_names[METRICS_OUTCOME_COUNT] = {
        [METRICS_OUTCOME_COMPLETE] = "complete",
        [METRICS_OUTCOME_ALREADY_COMPLETE] = "already_complete",
        [METRICS_OUTCOME_FAILED] = "failed",
        [METRICS_OUTCOME_INTERRUPTED] = "interrupted",
        [METRICS_OUTCOME_BUSY] = "busy",
        [METRICS_OUTCOME_INVALID] = "invalid",
};

static const char *const metrics_retry_reasons[METRICS_RETRY_COUNT] = {
        [METRICS_RETRY_TRANSITION] = "transition",
        [METRICS_RETRY_BUSY] = "busy",
        [METRICS_RETRY_INTERRUPTED] = "interrupted",
        [METRICS_RETRY_STAGE_CALL] = "stage_call",
};

/* Static storage: every atomic starts at zero, which is a valid initial value. */
static struct {
        _Atomic uint64_t jobs[STAGE_COUNT][METRICS_OUTCOME_COUNT];
        /* Per bucket, not cumulative; the extra last slot counts values above the top bound. */
        _Atomic uint64_t duration[STAGE_COUNT][METRICS_BUCKET_COUNT + 1];
        _Atomic uint64_t duration_sum_us[STAGE_COUNT];
        _Atomic uint64_t bytes_downloaded;
        _Atomic uint64_t bytes_extracted;
        _Atomic uint64_t retries[STAGE_COUNT][METRICS_RETRY_COUNT];
        _Atomic uint64_t dlq[STAGE_COUNT][METRICS_DLQ_CLASS_COUNT];
        _Atomic int64_t inflight[STAGE_COUNT];
        _Atomic int64_t lag[STAGE_COUNT];
} metrics;

struct metrics_pool {
        char name[METRICS_POOL_NAME_MAX + 1];
        uint64_t data_used;
        uint64_t data_total;
        uint64_t meta_used;
        uint64_t meta_total;
};

static pthread_mutex_t metrics_pools_lock = PTHREAD_MUTEX_INITIALIZER;
static struct metrics_pool metrics_pools[METRICS_POOLS_MAX];
static size_t metrics_npools;

#define metrics_add(var, n) atomic_fetch_add_explicit(&(var), (n), memory_order_relaxed)
#define metrics_load(var) atomic_load_explicit(&(var), memory_order_relaxed)
#define metrics_store(var, n) atomic_store_explicit(&(var), (n), memory_order_relaxed)

static void metrics_check_stage(enum stage_id stage)
{
        FIM_ASSERT((unsigned)stage < STAGE_COUNT);
}

const char *metrics_outcome_name(enum metrics_outcome outcome)
{
        FIM_ASSERT((unsigned)outcome < METRICS_OUTCOME_COUNT);
        return metrics_outcome_names[outcome];
}

enum metrics_outcome metrics_outcome_of(const struct stage_result *result)
{
        static const enum metrics_outcome from_fsm[] = {
                [FSM_OUTCOME_COMPLETE] = METRICS_OUTCOME_COMPLETE,
                [FSM_OUTCOME_ALREADY_COMPLETE] = METRICS_OUTCOME_ALREADY_COMPLETE,
                [FSM_OUTCOME_BUSY] = METRICS_OUTCOME_BUSY,
                [FSM_OUTCOME_FAILED] = METRICS_OUTCOME_FAILED,
                [FSM_OUTCOME_INTERRUPTED] = METRICS_OUTCOME_INTERRUPTED,
        };

        if (result->error_class && strcmp(result->error_class, STAGE_ERROR_INVALID_REQUEST) == 0)
                return METRICS_OUTCOME_INVALID;
        FIM_ASSERT((unsigned)result->outcome < ARRAY_SIZE(from_fsm));
        return from_fsm[result->outcome];
}

void metrics_job_finished(enum stage_id stage, enum metrics_outcome outcome, double duration_s)
{
        uint64_t us;
        size_t b = 0;

        metrics_check_stage(stage);
        FIM_ASSERT((unsigned)outcome < METRICS_OUTCOME_COUNT);
        metrics_add(metrics.jobs[stage][outcome], 1);
        if (outcome != METRICS_OUTCOME_COMPLETE && outcome != METRICS_OUTCOME_FAILED)
                return;

        /* Written so that NaN lands on 0 too; a week caps absurd values before the cast. */
        if (!(duration_s > 0.0))
                duration_s = 0.0;
        if (duration_s > 604800.0)
                duration_s = 604800.0;
        us = (uint64_t)(duration_s * 1e6 + 0.5);
        while (b < METRICS_BUCKET_COUNT && us > metrics_buckets[b].le_us)
                b++;
        metrics_add(metrics.duration[stage][b], 1);
        metrics_add(metrics.duration_sum_us[stage], us);
}

void metrics_add_bytes_downloaded(uint64_t n)
{
        metrics_add(metrics.bytes_downloaded, n);
}

void metrics_add_bytes_extracted(uint64_t n)
{
        metrics_add(metrics.bytes_extracted, n);
}

void metrics_retry(enum stage_id stage, enum metrics_retry_reason reason)
{
        metrics_check_stage(stage);
        FIM_ASSERT((unsigned)reason < METRICS_RETRY_COUNT);
        metrics_add(metrics.retries[stage][reason], 1);
}

void metrics_retry_by_name(const char *stage)
{
        for (size_t s = 0; s < STAGE_COUNT; s++) {
                if (strcmp(stage, stage_name((enum stage_id)s)) == 0) {
                        metrics_add(metrics.retries[s][METRICS_RETRY_TRANSITION], 1);
                        return;
                }
        }
}

void metrics_dlq(enum stage_id stage, const char *error_class)
{
        size_t c = 0;

        metrics_check_stage(stage);
        while (c < METRICS_DLQ_CLASS_COUNT - 1 &&
               (!error_class || strcmp(error_class, metrics_dlq_classes[c]) != 0))
                c++;
        metrics_add(metrics.dlq[stage][c], 1);
}

void metrics_inflight_set(enum stage_id stage, int64_t n)
{
        metrics_check_stage(stage);
        metrics_store(metrics.inflight[stage], n);
}

void metrics_inflight_add(enum stage_id stage, int64_t delta)
{
        metrics_check_stage(stage);
        metrics_add(metrics.inflight[stage], delta);
}

void metrics_lag_set(enum stage_id stage, int64_t lag)
{
        metrics_check_stage(stage);
        metrics_store(metrics.lag[stage], lag);
}

static void metrics_pools_lock_or_die(void)
{
        int e = pthread_mutex_lock(&metrics_pools_lock);

        FIM_ASSERT(e == 0);
}

static void metrics_pools_unlock(void)
{
        int e = pthread_mutex_unlock(&metrics_pools_lock);

        FIM_ASSERT(e == 0);
}

int metrics_pool_set(const char *pool, uint64_t data_used, uint64_t data_total, uint64_t meta_used,
                     uint64_t meta_total)
{
        struct metrics_pool *slot = NULL;

        if (strlen(pool) > METRICS_POOL_NAME_MAX)
                return -ENAMETOOLONG;

        metrics_pools_lock_or_die();
        for (size_t i = 0; i < metrics_npools && !slot; i++) {
                if (strcmp(metrics_pools[i].name, pool) == 0)
                        slot = &metrics_pools[i];
        }
        if (!slot && metrics_npools < METRICS_POOLS_MAX) {
                slot = &metrics_pools[metrics_npools++];
                (void)snprintf(slot->name, sizeof(slot->name), "%s", pool);
        }
        if (slot) {
                slot->data_used = data_used;
                slot->data_total = data_total;
                slot->meta_used = meta_used;
                slot->meta_total = meta_total;
        }
        metrics_pools_unlock();
        return slot ? 0 : -ENOSPC;
}

void metrics_reset(void)
{
        for (size_t s = 0; s < STAGE_COUNT; s++) {
                for (size_t o = 0; o < METRICS_OUTCOME_COUNT; o++)
                        metrics_store(metrics.jobs[s][o], 0);
                for (size_t b = 0; b <= METRICS_BUCKET_COUNT; b++)
                        metrics_store(metrics.duration[s][b], 0);
                for (size_t c = 0; c < METRICS_DLQ_CLASS_COUNT; c++)
                        metrics_store(metrics.dlq[s][c], 0);
                for (size_t r = 0; r < METRICS_RETRY_COUNT; r++)
                        metrics_store(metrics.retries[s][r], 0);
                metrics_store(metrics.duration_sum_us[s], 0);
                metrics_store(metrics.inflight[s], 0);
                metrics_store(metrics.lag[s], 0);
        }
        metrics_store(metrics.bytes_downloaded, 0);
        metrics_store(metrics.bytes_extracted, 0);

        metrics_pools_lock_or_die();
        memset(metrics_pools, 0, sizeof(metrics_pools));
        metrics_npools = 0;
        metrics_pools_unlock();
}

/* A growing text buffer; after an allocation failure it stops growing and remembers. */
struct metrics_buf {
        char *data;
        size_t len;
        size_t cap;
        bool oom;
};

static void metrics_buf_printf(struct metrics_buf *b, const char *fmt, ...)
        __attribute__((format(printf, 2, 3)));

static void metrics_buf_printf(struct metrics_buf *b, const char *fmt, ...)
{
        va_list ap;
        int n;

        if (b->oom)
                return;
        va_start(ap, fmt);
        n = vsnprintf(b->data ? b->data + b->len : NULL, b->data ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        FIM_ASSERT(n >= 0);
        if (b->data && (size_t)n < b->cap - b->len) {
                b->len += (size_t)n;
                return;
        }

        size_t cap = b->cap ? b->cap : 4096;
        char *p;

        while (cap < b->len + (size_t)n + 1)
                cap *= 2;
        p = realloc(b->data, cap);
        if (!p) {
                b->oom = true;
                return;
        }
        b->data = p;
        b->cap = cap;
        va_start(ap, fmt);
        n = vsnprintf(b->data + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        FIM_ASSERT(n >= 0 && (size_t)n < b->cap - b->len);
        b->len += (size_t)n;
}

static void metrics_buf_append(struct metrics_buf *b, const char *data, size_t len)
{
        if (len > 0)
                metrics_buf_printf(b, "%.*s", (int)len, data);
}

FIM_TESTABLE void metrics_escape_label(const char *in, char *out, size_t size)
{
        size_t o = 0;

        FIM_ASSERT(size > 0);
        for (; *in; in++) {
                const char *rep = NULL;
                size_t n;

                if (*in == '\\')
                        rep = "\\\\";
                else if (*in == '"')
                        rep = "\\\"";
                else if (*in == '\n')
                        rep = "\\n";
                n = rep ? 2 : 1;
                if (o + n >= size)
                        break;
                if (rep)
                        memcpy(out + o, rep, n);
                else
                        out[o] = *in;
                o += n;
        }
        out[o] = '\0';
}

static void metrics_family(struct metrics_buf *b, const char *name, const char *type,
                           const char *help)
{
        metrics_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void metrics_render_jobs(struct metrics_buf *b)
{
        metrics_family(b, "fim_jobs_total", "counter",
                       "Jobs finished by this process, by stage and outcome.");
        for (size_t s = 0; s < STAGE_COUNT; s++) {
                for (size_t o = 0; o < METRICS_OUTCOME_COUNT; o++)
                        metrics_buf_printf(
                                b, "fim_jobs_total{stage=\"%s\",outcome=\"%s\"} %" PRIu64 "\n",
                                stage_name((enum stage_id)s), metrics_outcome_names[o],
                                metrics_load(metrics.jobs[s][o]));
        }
}

static void metrics_render_durations(struct metrics_buf *b)
{
        metrics_family(b, "fim_stage_duration_seconds", "histogram",
                       "Wall time of stage runs that completed or failed.");
        for (size_t s = 0; s < STAGE_COUNT; s++) {
                const char *name = stage_name((enum stage_id)s);
                uint64_t cumulative = 0;

                for (size_t i = 0; i <= METRICS_BUCKET_COUNT; i++) {
                        cumulative += metrics_load(metrics.duration[s][i]);
                        metrics_buf_printf(
                                b,
                                "fim_stage_duration_seconds_bucket{stage=\"%s\",le=\"%s\"} %" PRIu64
                                "\n",
                                name, i < METRICS_BUCKET_COUNT ? metrics_buckets[i].le : "+Inf",
                                cumulative);
                }

                uint64_t sum_us = metrics_load(metrics.duration_sum_us[s]);

                metrics_buf_printf(b,
                                   "fim_stage_duration_seconds_sum{stage=\"%s\"} %" PRIu64
                                   ".%06" PRIu64 "\n",
                                   name, sum_us / 1000000, sum_us % 1000000);
                metrics_buf_printf(b,
                                   "fim_stage_duration_seconds_count{stage=\"%s\"} %" PRIu64 "\n",
                                   name, cumulative);
        }
}

static void metrics_render_stage_values(struct metrics_buf *b, const char *family, const char *type,
                                        const char *help, _Atomic int64_t *values)
{
        metrics_family(b, family, type, help);
        for (size_t s = 0; s < STAGE_COUNT; s++)
                metrics_buf_printf(b, "%s{stage=\"%s\"} %" PRId64 "\n", family,
                                   stage_name((enum stage_id)s), metrics_load(values[s]));
}

static void metrics_render_counters(struct metrics_buf *b)
{
        metrics_family(
                b, "fim_downloaded_bytes_total", "counter",
                "Bytes of image tarballs received from S3 and written to LOCAL_DIR, failed attempts included.");
        metrics_buf_printf(b, "fim_downloaded_bytes_total %" PRIu64 "\n",
                           metrics_load(metrics.bytes_downloaded));
        metrics_family(
                b, "fim_extracted_bytes_total", "counter",
                "Bytes of file contents written by extraction, failed extractions included.");
        metrics_buf_printf(b, "fim_extracted_bytes_total %" PRIu64 "\n",
                           metrics_load(metrics.bytes_extracted));

        metrics_family(
                b, "fim_retries_total", "counter",
                "Retries scheduled, by stage and reason: a transition's transient failure, a run busy in another worker, an interrupted run, a failed stage call.");
        for (size_t s = 0; s < STAGE_COUNT; s++) {
                for (size_t r = 0; r < METRICS_RETRY_COUNT; r++)
                        metrics_buf_printf(
                                b, "fim_retries_total{stage=\"%s\",reason=\"%s\"} %" PRIu64 "\n",
                                stage_name((enum stage_id)s), metrics_retry_reasons[r],
                                metrics_load(metrics.retries[s][r]));
        }

        metrics_family(b, "fim_dlq_messages_total", "counter",
                       "Messages published to the dead-letter topic, by stage and error class.");
        for (size_t s = 0; s < STAGE_COUNT; s++) {
                for (size_t c = 0; c < METRICS_DLQ_CLASS_COUNT; c++)
                        metrics_buf_printf(
                                b,
                                "fim_dlq_messages_total{stage=\"%s\",error_class=\"%s\"} %" PRIu64
                                "\n",
                                stage_name((enum stage_id)s), metrics_dlq_classes[c],
                                metrics_load(metrics.dlq[s][c]));
        }
}

static double metrics_ratio(uint64_t used, uint64_t total)
{
        return total ? (double)used / (double)total : 0.0;
}

static void metrics_render_pools(struct metrics_buf *b)
{
        static const struct {
                const char *name;
                const char *help;
        } families[] = {
                {"fim_pool_data_usage_ratio", "Thin pool data space in use, 0 to 1."},
                {"fim_pool_data_used_blocks", "Thin pool data blocks in use."},
                {"fim_pool_data_total_blocks", "Thin pool data blocks in total."},
                {"fim_pool_metadata_usage_ratio", "Thin pool metadata space in use, 0 to 1."},
                {"fim_pool_metadata_used_blocks", "Thin pool metadata blocks in use."},
                {"fim_pool_metadata_total_blocks", "Thin pool metadata blocks in total."},
        };
        struct metrics_pool pools[METRICS_POOLS_MAX];
        char label[2 * METRICS_POOL_NAME_MAX + 1];
        size_t n;

        metrics_pools_lock_or_die();
        n = metrics_npools;
        memcpy(pools, metrics_pools, n * sizeof(pools[0]));
        metrics_pools_unlock();

        for (size_t f = 0; f < ARRAY_SIZE(families); f++) {
                metrics_family(b, families[f].name, "gauge", families[f].help);
                for (size_t i = 0; i < n; i++) {
                        const struct metrics_pool *p = &pools[i];

                        metrics_escape_label(p->name, label, sizeof(label));
                        metrics_buf_printf(b, "%s{pool=\"%s\"} ", families[f].name, label);
                        switch (f) {
                        case 0:
                                metrics_buf_printf(b, "%.6g\n",
                                                   metrics_ratio(p->data_used, p->data_total));
                                break;
                        case 1:
                                metrics_buf_printf(b, "%" PRIu64 "\n", p->data_used);
                                break;
                        case 2:
                                metrics_buf_printf(b, "%" PRIu64 "\n", p->data_total);
                                break;
                        case 3:
                                metrics_buf_printf(b, "%.6g\n",
                                                   metrics_ratio(p->meta_used, p->meta_total));
                                break;
                        case 4:
                                metrics_buf_printf(b, "%" PRIu64 "\n", p->meta_used);
                                break;
                        default:
                                metrics_buf_printf(b, "%" PRIu64 "\n", p->meta_total);
                                break;
                        }
                }
        }
}

int metrics_render(char **ret_text, size_t *ret_len)
{
        struct metrics_buf b = {0};
        char version[64];

        metrics_render_jobs(&b);
        metrics_render_durations(&b);
        metrics_render_counters(&b);
        metrics_render_stage_values(&b, "fim_inflight_jobs", "gauge",
                                    "Jobs running now in this process, by stage pool.",
                                    metrics.inflight);
        metrics_render_stage_values(&b, "fim_consumer_lag_messages", "gauge",
                                    "Messages behind the end of the assigned partitions, by stage.",
                                    metrics.lag);
        metrics_render_pools(&b);
        metrics_escape_label(FIM_VERSION, version, sizeof(version));
        metrics_family(&b, "fim_build_info", "gauge", "Always 1; the version is a label.");
        metrics_buf_printf(&b, "fim_build_info{version=\"%s\"} 1\n", version);
        if (b.oom) {
                free(b.data);
                return -ENOMEM;
        }
        *ret_text = b.data;
        *ret_len = b.len;
        return 0;
}

/* ---- HTTP server ---- */

FIM_TESTABLE int metrics_read_timeout_ms = 5000;
FIM_TESTABLE int metrics_write_timeout_ms = 10000;

/* How long a finished connection may keep sending before it is closed. */
#define METRICS_LINGER_MS 1000
/* Pause after accept() fails for want of descriptors, instead of spinning. */
#define METRICS_ACCEPT_PAUSE_MS 100

enum metrics_conn_state {
        METRICS_CONN_FREE,
        METRICS_CONN_READ,
        METRICS_CONN_WRITE,
        METRICS_CONN_DRAIN,
};

struct metrics_conn {
        enum metrics_conn_state state;
        int fd;
        int64_t deadline_ms;
        size_t in_len;
        char *out;
        size_t out_len;
        size_t out_off;
        char in[METRICS_REQUEST_MAX];
};

struct metrics_server {
        int listen_fd;
        int wake[2];
        pthread_t thread;
        bool thread_started;
        uint16_t port;
        metrics_ready_fn ready;
        void *userdata;
        int64_t accept_paused_until_ms;
        struct metrics_conn conns[METRICS_MAX_CONNECTIONS];
};

static const char *metrics_status_text(int status)
{
        switch (status) {
        case 200:
                return "OK";
        case 400:
                return "Bad Request";
        case 404:
                return "Not Found";
        case 405:
                return "Method Not Allowed";
        case 408:
                return "Request Timeout";
        case 431:
                return "Request Header Fields Too Large";
        case 503:
                return "Service Unavailable";
        default:
                return "Internal Server Error";
        }
}

/* Whether the request line is "<METHOD> /<target> HTTP/1.<d>"; sets the method and path. */
static bool metrics_parse_request_line(const char *line, size_t len, const char **ret_method,
                                       size_t *ret_method_len, const char **ret_path,
                                       size_t *ret_path_len)
{
        const char *sp1 = memchr(line, ' ', len);
        const char *target, *sp2, *version;

        if (!sp1 || sp1 == line)
                return false;
        for (const char *p = line; p < sp1; p++) {
                if (*p < 'A' || *p > 'Z')
                        return false;
        }
        target = sp1 + 1;
        sp2 = memchr(target, ' ', len - (size_t)(target - line));
        if (!sp2 || *target != '/')
                return false;
        for (const char *p = target; p < sp2; p++) {
                if (*p <= ' ' || *p >= 0x7f)
                        return false;
        }
        version = sp2 + 1;
        if (len - (size_t)(version - line) != 8 || memcmp(version, "HTTP/1.", 7) != 0 ||
            version[7] < '0' || version[7] > '9')
                return false;

        const char *query = memchr(target, '?', (size_t)(sp2 - target));

        *ret_method = line;
        *ret_method_len = (size_t)(sp1 - line);
        *ret_path = target;
        *ret_path_len = (size_t)((query ? query : sp2) - target);
        return true;
}

/* Whether every header line up to the empty one is "name: value" (no folding). */
static bool metrics_headers_valid(const char *p, const char *end)
{
        while (p < end) {
                const char *nl = memchr(p, '\n', (size_t)(end - p));
                size_t len;

                if (!nl)
                        return false;
                len = (size_t)(nl - p);
                if (len > 0 && p[len - 1] == '\r')
                        len--;
                if (len == 0)
                        return true;

                const char *colon = memchr(p, ':', len);

                if (!colon || colon == p || *p == ' ' || *p == '\t')
                        return false;
                p = nl + 1;
        }
        return false;
}

FIM_TESTABLE int metrics_parse_request(const char *buf, size_t len, enum metrics_page *ret_page,
                                       bool *ret_head)
{
        static const struct {
                const char *path;
                enum metrics_page page;
        } pages[] = {
                {"/metrics", METRICS_PAGE_METRICS},
                {"/healthz", METRICS_PAGE_HEALTHZ},
                {"/readyz", METRICS_PAGE_READYZ},
        };
        const char *nl = memchr(buf, '\n', len);
        const char *method, *path;
        size_t method_len, path_len, line_len;

        if (!nl || memchr(buf, '\0', len))
                return 400;
        line_len = (size_t)(nl - buf);
        if (line_len > 0 && buf[line_len - 1] == '\r')
                line_len--;
        if (!metrics_parse_request_line(buf, line_len, &method, &method_len, &path, &path_len))
                return 400;
        if (!metrics_headers_valid(nl + 1, buf + len))
                return 400;

        for (size_t i = 0; i < ARRAY_SIZE(pages); i++) {
                if (strlen(pages[i].path) != path_len || memcmp(pages[i].path, path, path_len) != 0)
                        continue;
                if (method_len == 3 && memcmp(method, "GET", 3) == 0)
                        *ret_head = false;
                else if (method_len == 4 && memcmp(method, "HEAD", 4) == 0)
                        *ret_head = true;
                else
                        return 405;
                *ret_page = pages[i].page;
                return 200;
        }
        return 404;
}

static void metrics_conn_close(struct metrics_conn *c)
{
        if (c->fd >= 0)
                (void)close(c->fd);
        free(c->out);
        c->fd = -1;
        c->out = NULL;
        c->out_len = c->out_off = c->in_len = 0;
        c->state = METRICS_CONN_FREE;
}

/* The body and status of a routed request. Returns 0 or -ENOMEM. */
static int metrics_page_body(const struct metrics_server *s, enum metrics_page page,
                             struct metrics_buf *body, int *ret_status)
{
        char reason[256] = "not ready";
        char *text;
        size_t len;
        int r;

        switch (page) {
        case METRICS_PAGE_METRICS:
                r = metrics_render(&text, &len);
                if (r < 0)
                        return r;
                metrics_buf_append(body, text, len);
                free(text);
                *ret_status = 200;
                break;
        case METRICS_PAGE_HEALTHZ:
                metrics_buf_printf(body, "ok\n");
                *ret_status = 200;
                break;
        case METRICS_PAGE_READYZ:
                if (!s->ready || s->ready(reason, sizeof(reason), s->userdata)) {
                        metrics_buf_printf(body, "ready\n");
                        *ret_status = 200;
                } else {
                        reason[sizeof(reason) - 1] = '\0';
                        metrics_buf_printf(body, "not ready: %s\n", reason);
                        *ret_status = 503;
                }
                break;
        }
        return body->oom ? -ENOMEM : 0;
}

/*
 * Prepare the response for @status (200 means: route @page) and switch to writing it. When
 * memory runs out the connection is dropped; the client sees a closed connection.
 */
static void metrics_conn_respond(const struct metrics_server *s, struct metrics_conn *c, int status,
                                 enum metrics_page page, bool head, int64_t now)
{
        struct metrics_buf body = {0}, out = {0};
        const char *type = "text/plain; charset=utf-8";

        if (status == 200) {
                if (metrics_page_body(s, page, &body, &status) < 0) {
                        free(body.data);
                        body = (struct metrics_buf){0};
                        status = 500;
                }
                if (page == METRICS_PAGE_METRICS && status == 200)
                        type = "text/plain; version=0.0.4; charset=utf-8";
        }
        if (status != 200 && status != 503)
                metrics_buf_printf(&body, "%s\n", metrics_status_text(status));

        metrics_buf_printf(&out,
                           "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                           "Cache-Control: no-store\r\nConnection: close\r\n%s\r\n",
                           status, metrics_status_text(status), type, body.len,
                           status == 405 ? "Allow: GET, HEAD\r\n" : "");
        if (!head)
                metrics_buf_append(&out, body.data, body.len);
        free(body.data);
        if (out.oom || body.oom) {
                free(out.data);
                metrics_conn_close(c);
                return;
        }
        c->out = out.data;
        c->out_len = out.len;
        c->out_off = 0;
        c->state = METRICS_CONN_WRITE;
        c->deadline_ms = now + metrics_write_timeout_ms;
}

/* Where the request head ends (just past the empty line), or 0 while it is incomplete. */
static size_t metrics_head_end(const char *buf, size_t len)
{
        for (size_t i = 0; i + 1 < len; i++) {
                if (buf[i] != '\n')
                        continue;
                if (buf[i + 1] == '\n')
                        return i + 2;
                if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n')
                        return i + 3;
        }
        return 0;
}

static void metrics_conn_read(const struct metrics_server *s, struct metrics_conn *c, int64_t now)
{
        for (;;) {
                ssize_t n = recv(c->fd, c->in + c->in_len, sizeof(c->in) - c->in_len, 0);
                enum metrics_page page = METRICS_PAGE_HEALTHZ;
                bool head = false;
                size_t end;
                int status;

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                        return;
                if (n <= 0) {
                        /* Gone before the request was complete: nobody to answer. */
                        metrics_conn_close(c);
                        return;
                }
                c->in_len += (size_t)n;
                end = metrics_head_end(c->in, c->in_len);
                if (end > 0) {
                        status = metrics_parse_request(c->in, end, &page, &head);
                        metrics_conn_respond(s, c, status, page, head, now);
                        return;
                }
                if (c->in_len == sizeof(c->in)) {
                        metrics_conn_respond(s, c, 431, page, false, now);
                        return;
                }
        }
}

static void metrics_conn_write(struct metrics_conn *c, int64_t now)
{
        while (c->out_off < c->out_len) {
                ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                        return;
                if (n < 0) {
                        metrics_conn_close(c);
                        return;
                }
                c->out_off += (size_t)n;
        }

        /* All sent: half-close and read out what the client still sends (see DESIGN). */
        free(c->out);
        c->out = NULL;
        (void)shutdown(c->fd, SHUT_WR);
        c->state = METRICS_CONN_DRAIN;
        c->deadline_ms = now + METRICS_LINGER_MS;
}

static void metrics_conn_drain(struct metrics_conn *c)
{
        char scratch[4096];

        for (;;) {
                ssize_t n = recv(c->fd, scratch, sizeof(scratch), 0);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                        return;
                if (n <= 0) {
                        metrics_conn_close(c);
                        return;
                }
        }
}

static void metrics_conn_io(const struct metrics_server *s, struct metrics_conn *c, short revents,
                            int64_t now)
{
        switch (c->state) {
        case METRICS_CONN_READ:
                if (revents & (POLLIN | POLLHUP | POLLERR))
                        metrics_conn_read(s, c, now);
                break;
        case METRICS_CONN_WRITE:
                if (revents & (POLLOUT | POLLHUP | POLLERR))
                        metrics_conn_write(c, now);
                break;
        case METRICS_CONN_DRAIN:
                if (revents & (POLLIN | POLLHUP | POLLERR))
                        metrics_conn_drain(c);
                break;
        case METRICS_CONN_FREE:
                break;
        }
        /* A response prepared by the read can usually go out at once. */
        if (c->state == METRICS_CONN_WRITE && c->out_off == 0)
                metrics_conn_write(c, now);
}

static void metrics_conn_expire(const struct metrics_server *s, struct metrics_conn *c, int64_t now)
{
        if (c->state == METRICS_CONN_FREE || now < c->deadline_ms)
                return;
        if (c->state != METRICS_CONN_READ) {
                metrics_conn_close(c);
                return;
        }
        /* Too slow to send a request: say so, briefly, and let the write deadline decide. */
        metrics_conn_respond(s, c, 408, METRICS_PAGE_HEALTHZ, false, now);
        if (c->state == METRICS_CONN_WRITE)
                metrics_conn_write(c, now);
}

static void metrics_accept(struct metrics_server *s, int64_t now)
{
        for (size_t i = 0; i < METRICS_MAX_CONNECTIONS; i++) {
                struct metrics_conn *c = &s->conns[i];
                int fd;

                if (c->state != METRICS_CONN_FREE)
                        continue;
                /* A client that gave up while queued is no reason to stop accepting. */
                do {
                        fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                } while (fd < 0 && (errno == EINTR || errno == ECONNABORTED));
                if (fd < 0) {
                        if (errno != EAGAIN && errno != EWOULDBLOCK) {
                                log_debug("metrics server failed to accept, pausing", "errno=%s",
                                          err_name(-errno));
                                s->accept_paused_until_ms = now + METRICS_ACCEPT_PAUSE_MS;
                        }
                        return;
                }
                c->fd = fd;
                c->state = METRICS_CONN_READ;
                c->in_len = 0;
                c->deadline_ms = now + metrics_read_timeout_ms;
        }
}

/* Milliseconds until the earliest deadline, or -1 when there is none. */
static int metrics_poll_timeout(const struct metrics_server *s, int64_t now)
{
        int64_t first = s->accept_paused_until_ms > now ? s->accept_paused_until_ms : INT64_MAX;

        for (size_t i = 0; i < METRICS_MAX_CONNECTIONS; i++) {
                if (s->conns[i].state != METRICS_CONN_FREE && s->conns[i].deadline_ms < first)
                        first = s->conns[i].deadline_ms;
        }
        if (first == INT64_MAX)
                return -1;
        if (first <= now)
                return 0;
        return first - now > 60000 ? 60000 : (int)(first - now);
}

static void *metrics_server_main(void *arg)
{
        struct metrics_server *s = arg;
        struct pollfd pfds[2 + METRICS_MAX_CONNECTIONS];
        size_t slot[2 + METRICS_MAX_CONNECTIONS];

        for (;;) {
                int64_t now = util_now_monotonic_ms();
                bool can_accept = now >= s->accept_paused_until_ms;
                nfds_t n = 2;
                int r;

                pfds[0] = (struct pollfd){.fd = s->wake[0], .events = POLLIN};
                pfds[1] = (struct pollfd){.fd = -1, .events = POLLIN};
                for (size_t i = 0; i < METRICS_MAX_CONNECTIONS; i++) {
                        const struct metrics_conn *c = &s->conns[i];

                        if (c->state == METRICS_CONN_FREE) {
                                pfds[1].fd = can_accept ? s->listen_fd : -1;
                                continue;
                        }
                        pfds[n] = (struct pollfd){
                                .fd = c->fd,
                                .events = c->state == METRICS_CONN_WRITE ? POLLOUT : POLLIN,
                        };
                        slot[n++] = i;
                }

                r = poll(pfds, n, metrics_poll_timeout(s, now));
                if (r < 0) {
                        if (errno != EINTR) {
                                log_warning_errno(-errno, "metrics server poll failed, will retry",
                                                  "");
                                util_sleep_ms(100);
                        }
                        continue;
                }
                if (pfds[0].revents)
                        break;

                now = util_now_monotonic_ms();
                for (nfds_t i = 2; i < n; i++) {
                        if (pfds[i].revents)
                                metrics_conn_io(s, &s->conns[slot[i]], pfds[i].revents, now);
                }
                for (size_t i = 0; i < METRICS_MAX_CONNECTIONS; i++)
                        metrics_conn_expire(s, &s->conns[i], now);
                if (pfds[1].revents & POLLIN)
                        metrics_accept(s, now);
        }
        return NULL;
}

/*
 * Split "host:port", "[v6]:port" or ":port" into @host ("" for every interface) and @port.
 * Returns 0 or -EINVAL with the reason in err_last().
 */
static int metrics_split_addr(const char *addr, char *host, size_t host_size, char *port,
                              size_t port_size)
{
        const char *colon = strrchr(addr, ':');
        const char *h = addr;
        size_t hlen;
        int p;

        if (!colon)
                return err_set(-EINVAL, "metrics address '%s': expected host:port", addr);
        hlen = (size_t)(colon - addr);
        if (hlen > 0 && addr[0] == '[') {
                if (addr[hlen - 1] != ']' || hlen < 3)
                        return err_set(-EINVAL, "metrics address '%s': expected [ipv6]:port", addr);
                h = addr + 1;
                hlen -= 2;
        } else if (memchr(addr, ':', hlen)) {
                return err_set(-EINVAL, "metrics address '%s': put an IPv6 address in brackets",
                               addr);
        }
        if (hlen >= host_size || strlen(colon + 1) >= port_size ||
            util_parse_int(colon + 1, 0, 65535, &p) < 0)
                return err_set(-EINVAL,
                               "metrics address '%s': expected host:port with a port 0-65535",
                               addr);
        memcpy(host, h, hlen);
        host[hlen] = '\0';
        (void)snprintf(port, port_size, "%d", p);
        return 0;
}

static int metrics_gai_errno(int e)
{
        switch (e) {
        case EAI_SYSTEM:
                return errno > 0 ? -errno : -EIO;
        case EAI_AGAIN:
                return -EAGAIN;
        case EAI_MEMORY:
                return -ENOMEM;
        default:
                return -EADDRNOTAVAIL;
        }
}

/* Bind one listening socket for @ai. Returns the descriptor or a negative errno. */
static int metrics_bind(const struct addrinfo *ai, bool wildcard)
{
        int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        int one = 1, zero = 0, r;

        if (fd < 0)
                return -errno;
        (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        /* "::" for ":port" should take IPv4 clients too. */
        if (wildcard && ai->ai_family == AF_INET6)
                (void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 64) < 0) {
                r = -errno;
                (void)close(fd);
                return r;
        }
        return fd;
}

/*
 * Listen on the first address of @host:@port that binds; for the wildcard, IPv6 (dual stack)
 * before IPv4. Sets s->listen_fd and s->port.
 */
static int metrics_listen(struct metrics_server *s, const char *addr, const char *host,
                          const char *port)
{
        const struct addrinfo hints = {
                .ai_family = AF_UNSPEC,
                .ai_socktype = SOCK_STREAM,
                .ai_flags = AI_PASSIVE | AI_NUMERICSERV,
        };
        struct addrinfo *res = NULL;
        struct sockaddr_storage sa;
        socklen_t salen = sizeof(sa);
        bool wildcard = host[0] == '\0';
        int r, e;

        e = getaddrinfo(wildcard ? NULL : host, port, &hints, &res);
        if (e != 0)
                return err_set(metrics_gai_errno(e), "failed to resolve metrics address '%s': %s",
                               addr, gai_strerror(e));
        r = -EADDRNOTAVAIL;
        for (int pass = 0; pass < 2 && s->listen_fd < 0; pass++) {
                for (const struct addrinfo *ai = res; ai && s->listen_fd < 0; ai = ai->ai_next) {
                        if (wildcard && (pass == 0) != (ai->ai_family == AF_INET6))
                                continue;
                        if (!wildcard && pass == 1)
                                break;
                        r = metrics_bind(ai, wildcard);
                        if (r >= 0)
                                s->listen_fd = r;
                }
        }
        freeaddrinfo(res);
        if (s->listen_fd < 0)
                return err_set(r, "failed to listen on metrics address '%s': %s", addr,
                               strerror(-r));
        if (getsockname(s->listen_fd, (struct sockaddr *)&sa, &salen) < 0)
                return err_set(-errno, "failed to read the metrics socket's address: %s",
                               strerror(errno));
        if (sa.ss_family == AF_INET6)
                s->port = ntohs(((struct sockaddr_in6 *)&sa)->sin6_port);
        else
                s->port = ntohs(((struct sockaddr_in *)&sa)->sin_port);
        return 0;
}

/* Start the thread with every signal blocked: signals belong to the main thread's loop. */
static int metrics_start_thread(struct metrics_server *s)
{
        sigset_t all, old;
        int e;

        sigfillset(&all);
        e = pthread_sigmask(SIG_SETMASK, &all, &old);
        if (e != 0)
                return -e;
        e = pthread_create(&s->thread, NULL, metrics_server_main, s);
        (void)pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (e != 0)
                return -e;
        s->thread_started = true;
        return 0;
}

int metrics_server_start(const char *addr, metrics_ready_fn ready, void *userdata,
                         struct metrics_server **ret_server)
{
        struct metrics_server *s = NULL;
        char host[256], port[8];
        int r;

        if (addr[0] == '\0') {
                *ret_server = NULL;
                return 0;
        }
        r = metrics_split_addr(addr, host, sizeof(host), port, sizeof(port));
        if (r < 0)
                return r;

        s = calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->listen_fd = s->wake[0] = s->wake[1] = -1;
        for (size_t i = 0; i < METRICS_MAX_CONNECTIONS; i++)
                s->conns[i].fd = -1;
        s->ready = ready;
        s->userdata = userdata;

        r = metrics_listen(s, addr, host, port);
        if (r < 0)
                goto out;
        if (pipe2(s->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
                r = err_set(-errno, "failed to create the metrics wake-up pipe: %s",
                            strerror(errno));
                goto out;
        }
        r = metrics_start_thread(s);
        if (r < 0) {
                r = err_set(r, "failed to start the metrics thread: %s", strerror(-r));
                goto out;
        }
        log_info("metrics server listening", "addr=%s port=%u", log_quote(addr), (unsigned)s->port);
        *ret_server = steal_ptr(s);
        r = 0;
out:
        metrics_server_stop(s);
        return r;
}

uint16_t metrics_server_port(const struct metrics_server *server)
{
        return server->port;
}

void metrics_server_stop(struct metrics_server *server)
{
        if (!server)
                return;
        if (server->thread_started) {
                ssize_t n;

                do {
                        n = write(server->wake[1], "x", 1);
                } while (n < 0 && errno == EINTR);
                FIM_ASSERT(n == 1);
                int e = pthread_join(server->thread, NULL);

                FIM_ASSERT(e == 0);
        }
        for (size_t i = 0; i < METRICS_MAX_CONNECTIONS; i++)
                metrics_conn_close(&server->conns[i]);
        if (server->listen_fd >= 0)
                (void)close(server->listen_fd);
        for (size_t i = 0; i < 2; i++) {
                if (server->wake[i] >= 0)
                        (void)close(server->wake[i]);
        }
        free(server);
}
