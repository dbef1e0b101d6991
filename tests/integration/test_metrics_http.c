/*
 * Integration tests for the metrics endpoint: a real server on loopback, scraped with libcurl
 * and with raw sockets for the requests curl would never send.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cmocka.h>
#include <curl/curl.h>

#include "common/err.h"
#include "common/util.h"
#include "worker/metrics.h"

#define SCRAPERS 4
#define COUNTERS 4
#define BATCHES 10
#define JOBS_PER_BATCH 2000

struct body {
        char *data;
        size_t len;
};

static size_t body_write(char *ptr, size_t size, size_t nmemb, void *userdata)
{
        struct body *b = userdata;
        size_t n = size * nmemb;
        char *p = realloc(b->data, b->len + n + 1);

        if (!p)
                return 0;
        memcpy(p + b->len, ptr, n);
        b->data = p;
        b->len += n;
        b->data[b->len] = '\0';
        return n;
}

/* GET (or @method) http://127.0.0.1:@port@path; returns the status, body in *ret_body. */
static long http_get(uint16_t port, const char *path, const char *method, char **ret_body,
                     char **ret_type)
{
        struct body b = {.data = calloc(1, 1)};
        char url[128];
        CURL *h = curl_easy_init();
        long status = -1;
        char *type = NULL;
        CURLcode rc;

        assert_non_null(h);
        assert_non_null(b.data);
        (void)snprintf(url, sizeof(url), "http://127.0.0.1:%u%s", (unsigned)port, path);
        curl_easy_setopt(h, CURLOPT_URL, url);
        curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, body_write);
        curl_easy_setopt(h, CURLOPT_WRITEDATA, &b);
        curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 10000L);
        curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
        if (method && strcmp(method, "HEAD") == 0)
                curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
        else if (method)
                curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
        rc = curl_easy_perform(h);
        if (rc != CURLE_OK)
                fail_msg("GET %s: %s", url, curl_easy_strerror(rc));
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
        if (ret_type) {
                curl_easy_getinfo(h, CURLINFO_CONTENT_TYPE, &type);
                *ret_type = strdup(type ? type : "");
        }
        curl_easy_cleanup(h);
        if (ret_body)
                *ret_body = b.data;
        else
                free(b.data);
        return status;
}

/* A value from exposition text, by the exact series name; -1 when absent. */
static long long series_value(const char *text, const char *series)
{
        size_t n = strlen(series);

        for (const char *line = text; line && *line;) {
                if (strncmp(line, series, n) == 0 && line[n] == ' ')
                        return strtoll(line + n + 1, NULL, 10);
                line = strchr(line, '\n');
                if (line)
                        line++;
        }
        return -1;
}

static int connect_to(uint16_t port)
{
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
        struct timeval tv = {.tv_sec = 10};
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

        assert_true(fd >= 0);
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
        assert_int_equal(setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)), 0);
        return fd;
}

static void send_all(int fd, const char *data, size_t len)
{
        while (len > 0) {
                ssize_t n = send(fd, data, len, MSG_NOSIGNAL);

                assert_true(n > 0);
                data += n;
                len -= (size_t)n;
        }
}

/* Read until the server closes; returns the owned response text. */
static char *recv_all(int fd)
{
        struct body b = {.data = calloc(1, 1)};
        char buf[4096];
        ssize_t n;

        assert_non_null(b.data);
        while ((n = recv(fd, buf, sizeof(buf), 0)) > 0)
                assert_int_equal(body_write(buf, 1, (size_t)n, &b), (size_t)n);
        if (n < 0)
                fail_msg("recv: %s", strerror(errno));
        return b.data;
}

/* Send @req on a fresh connection and return the whole response. */
static char *raw_request(uint16_t port, const char *req, size_t len)
{
        int fd = connect_to(port);
        char *resp;

        send_all(fd, req, len);
        resp = recv_all(fd);
        (void)close(fd);
        return resp;
}

static atomic_bool ready_flag;
static char ready_userdata[] = "userdata";

static bool ready_cb(char *reason, size_t size, void *userdata)
{
        assert_ptr_equal(userdata, ready_userdata);
        if (atomic_load(&ready_flag))
                return true;
        (void)snprintf(reason, size, "no partitions assigned");
        return false;
}

struct fixture {
        struct metrics_server *server;
        uint16_t port;
};

static int setup(void **state)
{
        struct fixture *f = calloc(1, sizeof(*f));

        assert_non_null(f);
        metrics_reset();
        metrics_read_timeout_ms = 5000;
        atomic_store(&ready_flag, true);
        assert_int_equal(metrics_server_start("127.0.0.1:0", ready_cb, ready_userdata, &f->server),
                         0);
        assert_non_null(f->server);
        f->port = metrics_server_port(f->server);
        assert_true(f->port > 0);
        *state = f;
        return 0;
}

static int teardown(void **state)
{
        struct fixture *f = *state;

        metrics_server_stop(f->server);
        free(f);
        return 0;
}

static void test_metrics_http_scrape(void **state)
{
        static const char head[] = "HEAD /metrics HTTP/1.0\r\n\r\n";
        struct fixture *f = *state;
        char *body, *type;

        metrics_job_finished(STAGE_UNPACK, METRICS_OUTCOME_COMPLETE, 3.0);
        metrics_add_bytes_downloaded(4096);
        assert_int_equal(http_get(f->port, "/metrics", NULL, &body, &type), 200);
        assert_string_equal(type, "text/plain; version=0.0.4; charset=utf-8");
        assert_non_null(strstr(body, "# TYPE fim_jobs_total counter\n"));
        assert_int_equal(
                series_value(body, "fim_jobs_total{stage=\"unpack\",outcome=\"complete\"}"), 1);
        assert_int_equal(series_value(body, "fim_downloaded_bytes_total"), 4096);
        assert_int_equal(
                series_value(body, "fim_stage_duration_seconds_bucket{stage=\"unpack\",le=\"5\"}"),
                1);
        free(body);
        free(type);

        /* HEAD: same status and headers, no body. */
        assert_int_equal(http_get(f->port, "/metrics", "HEAD", &body, NULL), 200);
        assert_string_equal(body, "");
        free(body);
        body = raw_request(f->port, head, sizeof(head) - 1);
        assert_true(strncmp(body, "HTTP/1.1 200 OK\r\n", 17) == 0);
        assert_non_null(strstr(body, "\r\nContent-Length: "));
        assert_true(strlen(strstr(body, "\r\n\r\n")) == 4);
        free(body);
}

static void test_metrics_http_health_and_readiness(void **state)
{
        struct fixture *f = *state;
        char *body;

        assert_int_equal(http_get(f->port, "/healthz", NULL, &body, NULL), 200);
        assert_string_equal(body, "ok\n");
        free(body);

        assert_int_equal(http_get(f->port, "/readyz", NULL, &body, NULL), 200);
        assert_string_equal(body, "ready\n");
        free(body);

        atomic_store(&ready_flag, false);
        assert_int_equal(http_get(f->port, "/readyz", NULL, &body, NULL), 503);
        assert_string_equal(body, "not ready: no partitions assigned\n");
        free(body);
        /* Liveness does not depend on readiness. */
        assert_int_equal(http_get(f->port, "/healthz", NULL, NULL, NULL), 200);

        atomic_store(&ready_flag, true);
        assert_int_equal(http_get(f->port, "/readyz", NULL, NULL, NULL), 200);
}

static void test_metrics_http_errors(void **state)
{
        static const char bad[] = "BLAH\r\n\r\n";
        static const char garbage[] = "GET /metrics HTTP/1.1\r\nthis is not a header\r\n\r\n";
        struct fixture *f = *state;
        char *resp;

        assert_int_equal(http_get(f->port, "/nope", NULL, NULL, NULL), 404);
        assert_int_equal(http_get(f->port, "/", NULL, NULL, NULL), 404);
        assert_int_equal(http_get(f->port, "/metrics", "POST", NULL, NULL), 405);

        resp = raw_request(f->port, bad, sizeof(bad) - 1);
        assert_true(strncmp(resp, "HTTP/1.1 400 Bad Request\r\n", 26) == 0);
        assert_non_null(strstr(resp, "Connection: close\r\n"));
        free(resp);
        resp = raw_request(f->port, garbage, sizeof(garbage) - 1);
        assert_true(strncmp(resp, "HTTP/1.1 400 ", 13) == 0);
        free(resp);

        /* The server keeps serving after every one of them. */
        assert_int_equal(http_get(f->port, "/healthz", NULL, NULL, NULL), 200);
}

static void test_metrics_http_oversized_request(void **state)
{
        struct fixture *f = *state;
        size_t len = 2 * METRICS_REQUEST_MAX;
        char *req = malloc(len), *resp;

        assert_non_null(req);
        memcpy(req, "GET /metrics HTTP/1.1\r\nX-Pad: ", 30);
        memset(req + 30, 'a', len - 30);
        /* A head that never ends, twice the limit: the client still reads the answer. */
        resp = raw_request(f->port, req, len);
        assert_true(strncmp(resp, "HTTP/1.1 431 ", 13) == 0);
        free(resp);
        free(req);
        assert_int_equal(http_get(f->port, "/metrics", NULL, NULL, NULL), 200);
}

/*
 * Counters work in batches and, after each batch, wait until two rounds of scrapes have
 * finished, so that some scrape is guaranteed to run between batches and see a value that
 * is neither the start nor the end.
 */
static atomic_int scrapes_done;
static atomic_bool counting_done;

struct scraper {
        uint16_t port;
        long long last;
        bool saw_intermediate;
        int failures;
};

static void *scrape_loop(void *arg)
{
        struct scraper *s = arg;

        while (!atomic_load(&counting_done)) {
                char *body = NULL;
                long long v;

                if (http_get(s->port, "/metrics", NULL, &body, NULL) != 200) {
                        s->failures++;
                        free(body);
                        break;
                }
                v = series_value(body, "fim_jobs_total{stage=\"download\",outcome=\"complete\"}");
                /* A counter never goes backwards between scrapes. */
                if (v < s->last)
                        s->failures++;
                if (v > 0 && v < COUNTERS * BATCHES * JOBS_PER_BATCH)
                        s->saw_intermediate = true;
                s->last = v;
                free(body);
                atomic_fetch_add(&scrapes_done, 1);
        }
        return NULL;
}

static void *count_loop(void *arg)
{
        (void)arg;
        for (int b = 0; b < BATCHES; b++) {
                int seen = atomic_load(&scrapes_done);

                for (int i = 0; i < JOBS_PER_BATCH; i++) {
                        metrics_job_finished(STAGE_DOWNLOAD, METRICS_OUTCOME_COMPLETE, 0.2);
                        metrics_add_bytes_downloaded(10);
                        metrics_retry(STAGE_ACTIVATE, METRICS_RETRY_BUSY);
                        metrics_inflight_add(STAGE_UNPACK, 1);
                        metrics_inflight_add(STAGE_UNPACK, -1);
                }
                while (atomic_load(&scrapes_done) < seen + 2 * SCRAPERS)
                        util_sleep_ms(1);
        }
        return NULL;
}

static void test_metrics_http_concurrent_scrapes_while_counting(void **state)
{
        const long long total = COUNTERS * BATCHES * JOBS_PER_BATCH;
        struct fixture *f = *state;
        pthread_t scrapers[SCRAPERS], counters[COUNTERS];
        struct scraper s[SCRAPERS] = {0};
        bool saw_intermediate = false;
        char *body;

        atomic_store(&scrapes_done, 0);
        atomic_store(&counting_done, false);
        for (int i = 0; i < SCRAPERS; i++) {
                s[i].port = f->port;
                assert_int_equal(pthread_create(&scrapers[i], NULL, scrape_loop, &s[i]), 0);
        }
        for (int i = 0; i < COUNTERS; i++)
                assert_int_equal(pthread_create(&counters[i], NULL, count_loop, NULL), 0);
        for (int i = 0; i < COUNTERS; i++)
                assert_int_equal(pthread_join(counters[i], NULL), 0);
        atomic_store(&counting_done, true);
        for (int i = 0; i < SCRAPERS; i++) {
                assert_int_equal(pthread_join(scrapers[i], NULL), 0);
                assert_int_equal(s[i].failures, 0);
                saw_intermediate |= s[i].saw_intermediate;
        }
        assert_true(saw_intermediate);
        assert_true(atomic_load(&scrapes_done) >= 2 * SCRAPERS * BATCHES);

        assert_int_equal(http_get(f->port, "/metrics", NULL, &body, NULL), 200);
        assert_int_equal(
                series_value(body, "fim_jobs_total{stage=\"download\",outcome=\"complete\"}"),
                total);
        assert_int_equal(series_value(body, "fim_downloaded_bytes_total"), 10 * total);
        assert_int_equal(
                series_value(body, "fim_retries_total{stage=\"activate\",reason=\"busy\"}"), total);
        assert_int_equal(series_value(body, "fim_inflight_jobs{stage=\"unpack\"}"), 0);
        assert_int_equal(
                series_value(body,
                             "fim_stage_duration_seconds_bucket{stage=\"download\",le=\"0.25\"}"),
                total);
        assert_int_equal(series_value(body, "fim_stage_duration_seconds_count{stage=\"download\"}"),
                         total);
        free(body);
}

static void test_metrics_http_slow_client_does_not_block(void **state)
{
        static const char half[] = "GET /metr";
        struct fixture *f = *state;
        int slow = connect_to(f->port);
        int64_t t0;
        char *resp;

        send_all(slow, half, sizeof(half) - 1);
        /* While that client dawdles, a normal scrape is served at once. */
        t0 = util_now_monotonic_ms();
        assert_int_equal(http_get(f->port, "/metrics", NULL, NULL, NULL), 200);
        assert_true(util_now_monotonic_ms() - t0 < 1000);
        (void)close(slow);

        /* With a short deadline, the slow client is told so and dropped. */
        metrics_read_timeout_ms = 300;
        slow = connect_to(f->port);
        send_all(slow, half, sizeof(half) - 1);
        t0 = util_now_monotonic_ms();
        resp = recv_all(slow);
        assert_true(strncmp(resp, "HTTP/1.1 408 ", 13) == 0);
        assert_true(util_now_monotonic_ms() - t0 < 3000);
        free(resp);
        (void)close(slow);
}

static void test_metrics_http_every_slot_taken_delays_briefly(void **state)
{
        struct fixture *f = *state;
        int slow[METRICS_MAX_CONNECTIONS + 4];
        int64_t t0;

        /* More dawdlers than slots: a scrape waits for a deadline, not forever. */
        metrics_read_timeout_ms = 300;
        for (size_t i = 0; i < ARRAY_SIZE(slow); i++) {
                slow[i] = connect_to(f->port);
                send_all(slow[i], "G", 1);
        }
        t0 = util_now_monotonic_ms();
        assert_int_equal(http_get(f->port, "/healthz", NULL, NULL, NULL), 200);
        assert_true(util_now_monotonic_ms() - t0 < 3000);
        for (size_t i = 0; i < ARRAY_SIZE(slow); i++)
                (void)close(slow[i]);
}

static void test_metrics_http_addresses(void **state)
{
        static const char *const bad[] = {
                "nohost", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:x",
                "::1:80", "[::1:80",   "[]:80",
        };
        struct metrics_server *s = (struct metrics_server *)1;
        int r;

        (void)state;
        /* Empty means disabled: success, and no server. */
        assert_int_equal(metrics_server_start("", NULL, NULL, &s), 0);
        assert_null(s);
        metrics_server_stop(NULL);

        for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
                s = NULL;
                r = metrics_server_start(bad[i], NULL, NULL, &s);
                if (r != -EINVAL)
                        fail_msg("'%s' gave %d", bad[i], r);
                assert_null(s);
                assert_non_null(strstr(err_last(), bad[i]));
        }

        /* A name, and a callback-less server is always ready. */
        assert_int_equal(metrics_server_start("localhost:0", NULL, NULL, &s), 0);
        assert_int_equal(http_get(metrics_server_port(s), "/readyz", NULL, NULL, NULL), 200);

        /* The port is taken now: binding it again fails with the address in the message. */
        {
                char addr[32];
                struct metrics_server *again = NULL;

                (void)snprintf(addr, sizeof(addr), "127.0.0.1:%u",
                               (unsigned)metrics_server_port(s));
                assert_int_equal(metrics_server_start(addr, NULL, NULL, &again), -EADDRINUSE);
                assert_null(again);
                assert_non_null(strstr(err_last(), addr));
        }
        metrics_server_stop(s);

        /* IPv6 loopback, where the host has it. */
        s = NULL;
        r = metrics_server_start("[::1]:0", NULL, NULL, &s);
        if (r == 0)
                metrics_server_stop(s);
        else
                assert_true(r == -EADDRNOTAVAIL || r == -EAFNOSUPPORT);

        /* Every interface (dual stack, or IPv4 alone); reachable on 127.0.0.1. */
        assert_int_equal(metrics_server_start(":0", NULL, NULL, &s), 0);
        assert_int_equal(http_get(metrics_server_port(s), "/healthz", NULL, NULL, NULL), 200);
        metrics_server_stop(s);
}

static void test_metrics_http_stop_with_open_connections(void **state)
{
        struct fixture *f = *state;
        int fd = connect_to(f->port);
        char *resp;

        send_all(fd, "GET /he", 7);
        /* Give the server time to accept it, then stop under its feet. */
        util_sleep_ms(100);
        metrics_server_stop(f->server);
        f->server = NULL;
        resp = recv_all(fd);
        assert_string_equal(resp, "");
        free(resp);
        (void)close(fd);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_metrics_http_scrape, setup, teardown),
                cmocka_unit_test_setup_teardown(test_metrics_http_health_and_readiness, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_metrics_http_errors, setup, teardown),
                cmocka_unit_test_setup_teardown(test_metrics_http_oversized_request, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_metrics_http_concurrent_scrapes_while_counting,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(test_metrics_http_slow_client_does_not_block, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_metrics_http_every_slot_taken_delays_briefly,
                                                setup, teardown),
                cmocka_unit_test(test_metrics_http_addresses),
                cmocka_unit_test_setup_teardown(test_metrics_http_stop_with_open_connections, setup,
                                                teardown),
        };
        int r;

        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
                return 1;
        r = cmocka_run_group_tests(tests, NULL, NULL);
        curl_global_cleanup();
        return r;
}
