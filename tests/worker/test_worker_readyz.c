/*
 * What a running worker's metrics endpoint reports about the worker itself (worker processes
 * with the sample stages, the real kafka_worker_run and metrics server):
 *
 * - /readyz follows PostgreSQL: the worker reaches it through a TCP relay of this test, which
 *   the test cuts and restores. While cut, /readyz must answer 503 and name PostgreSQL; once
 *   restored, 200 again; /healthz stays 200 throughout.
 * - Consumer lag after a restart: every message was consumed and committed by a first worker;
 *   a second one, which has fetched nothing yet, must report no lag (not the whole topic).
 * - The gauges and counters move with the work: a job held in its step shows in flight, the
 *   backlog behind a full (paused) pool shows as lag, and both go back to 0 once it is done;
 *   a stage call that fails transiently counts a retry, and so does a transition.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
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
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <curl/curl.h>
#include <libpq-fe.h>

#include "common/util.h"
#include "helper_worker.h"

#define RELAY_MAX_PAIRS 64

/* A loopback TCP relay to PostgreSQL that can be cut: then it drops every connection. */
struct relay {
        int listen_fd;
        uint16_t port;
        uint16_t target_port;
        atomic_bool down;
        atomic_bool stop;
        pthread_t thread;
        int fds[RELAY_MAX_PAIRS][2]; /* client, server; -1 when free */
};

static int relay_connect_target(const struct relay *r)
{
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(r->target_port)};
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
                close(fd);
                fd = -1;
        }
        return fd;
}

static void relay_close_pair(struct relay *r, int i)
{
        close(r->fds[i][0]);
        close(r->fds[i][1]);
        r->fds[i][0] = r->fds[i][1] = -1;
}

static void relay_accept(struct relay *r)
{
        int c = accept4(r->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        int s;

        if (c < 0)
                return;
        /* Cut: the connection opens and closes at once, as with a server that went away. */
        if (atomic_load(&r->down) || (s = relay_connect_target(r)) < 0) {
                close(c);
                return;
        }
        for (int i = 0; i < RELAY_MAX_PAIRS; i++) {
                if (r->fds[i][0] < 0) {
                        r->fds[i][0] = c;
                        r->fds[i][1] = s;
                        return;
                }
        }
        close(c);
        close(s);
}

static void *relay_main(void *arg)
{
        struct relay *r = arg;

        while (!atomic_load(&r->stop)) {
                struct pollfd p[1 + 2 * RELAY_MAX_PAIRS];
                int idx[1 + 2 * RELAY_MAX_PAIRS];
                nfds_t n = 0;

                if (atomic_load(&r->down)) {
                        for (int i = 0; i < RELAY_MAX_PAIRS; i++) {
                                if (r->fds[i][0] >= 0)
                                        relay_close_pair(r, i);
                        }
                }
                p[n].fd = r->listen_fd;
                p[n++].events = POLLIN;
                for (int i = 0; i < RELAY_MAX_PAIRS; i++) {
                        for (int side = 0; side < 2 && r->fds[i][0] >= 0; side++) {
                                idx[n] = i * 2 + side;
                                p[n].fd = r->fds[i][side];
                                p[n++].events = POLLIN;
                        }
                }
                if (poll(p, n, 100) <= 0)
                        continue;
                if (p[0].revents & POLLIN)
                        relay_accept(r);
                for (nfds_t k = 1; k < n; k++) {
                        int i = idx[k] / 2, side = idx[k] % 2;
                        char buf[16384];
                        ssize_t got;

                        if (!p[k].revents || r->fds[i][0] < 0)
                                continue;
                        /* Never block on a slow reader: that would stall the relay and,
                         * with it, relay_stop(). A peer that cannot take a buffer loses the
                         * connection, as over a broken network. */
                        got = read(r->fds[i][side], buf, sizeof(buf));
                        if (got <= 0 || send(r->fds[i][!side], buf, (size_t)got,
                                             MSG_DONTWAIT | MSG_NOSIGNAL) != got)
                                relay_close_pair(r, i);
                }
        }
        for (int i = 0; i < RELAY_MAX_PAIRS; i++) {
                if (r->fds[i][0] >= 0)
                        relay_close_pair(r, i);
        }
        return NULL;
}

static void relay_start(struct relay *r, uint16_t target_port)
{
        struct sockaddr_in a = {.sin_family = AF_INET};
        socklen_t len = sizeof(a);

        memset(r, 0, sizeof(*r));
        memset(r->fds, -1, sizeof(r->fds));
        r->target_port = target_port;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        r->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_true(r->listen_fd >= 0);
        assert_int_equal(bind(r->listen_fd, (struct sockaddr *)&a, sizeof(a)), 0);
        assert_int_equal(listen(r->listen_fd, 64), 0);
        assert_int_equal(getsockname(r->listen_fd, (struct sockaddr *)&a, &len), 0);
        r->port = ntohs(a.sin_port);
        assert_int_equal(pthread_create(&r->thread, NULL, relay_main, r), 0);
}

static void relay_stop(struct relay *r)
{
        if (r->listen_fd <= 0)
                return;
        atomic_store(&r->stop, true);
        (void)pthread_join(r->thread, NULL);
        close(r->listen_fd);
        r->listen_fd = 0;
}

/*
 * The one relay, outside any test's stack frame: a failed assertion leaves the test function
 * at once, and teardown must still stop the relay's thread before anything else runs.
 */
static struct relay the_relay;

/* The conninfo of @url with host and port replaced by the relay's. */
static void relayed_url(const char *url, uint16_t relay_port, uint16_t *ret_port, char *out,
                        size_t size)
{
        PQconninfoOption *opts = PQconninfoParse(url, NULL);
        size_t len;

        assert_non_null(opts);
        len = (size_t)snprintf(out, size, "host=127.0.0.1 port=%u", (unsigned)relay_port);
        *ret_port = 5432;
        for (PQconninfoOption *o = opts; o->keyword; o++) {
                if (!o->val || !o->val[0])
                        continue;
                if (strcmp(o->keyword, "port") == 0)
                        *ret_port = (uint16_t)strtoul(o->val, NULL, 10);
                else if (strcmp(o->keyword, "dbname") == 0 || strcmp(o->keyword, "user") == 0 ||
                         strcmp(o->keyword, "password") == 0)
                        len += (size_t)snprintf(out + len, size - len, " %s=%s", o->keyword,
                                                o->val);
        }
        assert_true(len < size);
        PQconninfoFree(opts);
}

/* Each test gets its own environment; teardown kills its workers even when it failed. */
static int setup(void **state)
{
        struct wt_env *e = calloc(1, sizeof(*e));

        assert_non_null(e);
        wt_setup(e, NULL);
        *state = e;
        return 0;
}

static int teardown(void **state)
{
        relay_stop(&the_relay);
        wt_teardown(*state);
        free(*state);
        return 0;
}

static void test_worker_readyz_follows_postgres(void **state)
{
        struct wt_env *e = *state;
        struct relay *relay = &the_relay;
        char url[768], env_url[800], env_metrics[64], body[512];
        uint16_t pg_port, metrics_port = wt_free_port();
        int64_t took;
        pid_t worker;

        relayed_url(e->url, 0, &pg_port, url, sizeof(url));
        relay_start(relay, pg_port);
        relayed_url(e->url, relay->port, &pg_port, url, sizeof(url));
        (void)snprintf(env_url, sizeof(env_url), "DATABASE_URL=%s", url);
        (void)snprintf(env_metrics, sizeof(env_metrics), "METRICS_ADDR=127.0.0.1:%u",
                       (unsigned)metrics_port);
        worker = wt_worker_start(
                e, (const char *const[]){env_url, env_metrics, "FIM_TEST_STAGES=download", NULL});

        took = wt_wait_readyz(metrics_port, worker, 200, NULL, 60000, body);
        print_message("ready %ld ms after the start\n", (long)took);

        atomic_store(&relay->down, true);
        took = wt_wait_readyz(metrics_port, worker, 503, "PostgreSQL", 20000, body);
        print_message("503 %ld ms after PostgreSQL went away: %s", (long)took, body);
        assert_int_equal(wt_http_get(metrics_port, "/healthz", body), 200);

        atomic_store(&relay->down, false);
        took = wt_wait_readyz(metrics_port, worker, 200, NULL, 30000, body);
        print_message("ready again %ld ms after PostgreSQL came back\n", (long)took);

        assert_int_equal(wt_worker_stop(e, worker, SIGTERM, 30000), 0);
        relay_stop(relay);
}

/* The sum of a metric's samples that carry @label (e.g. stage="download"), from /metrics. */
static long metric_value(uint16_t port, const char *name, const char *label)
{
        CURL *h = curl_easy_init();
        char url[128], *body = NULL, *line, *save = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&body, &len);
        long sum = -1;

        (void)snprintf(url, sizeof(url), "http://127.0.0.1:%u/metrics", (unsigned)port);
        curl_easy_setopt(h, CURLOPT_URL, url);
        curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 3000L);
        curl_easy_setopt(h, CURLOPT_WRITEDATA, f);
        assert_int_equal(curl_easy_perform(h), CURLE_OK);
        curl_easy_cleanup(h);
        fclose(f);
        for (line = strtok_r(body, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
                if (strncmp(line, name, strlen(name)) != 0 || line[strlen(name)] != '{' ||
                    !strstr(line, label))
                        continue;
                sum = (sum < 0 ? 0 : sum) + strtol(strrchr(line, ' ') + 1, NULL, 10);
        }
        free(body);
        return sum;
}

static void test_worker_lag_after_restart_is_committed_not_retained(void **state)
{
        static const char *const images[] = {"lag-1", "lag-2", "lag-3", "lag-4", "lag-5", "lag-6"};
        const int n = (int)(sizeof(images) / sizeof(images[0]));
        struct wt_env *e = *state;
        char env_metrics[64], body[512], req[128];
        uint16_t port = wt_free_port();
        const char *env[] = {env_metrics, "FIM_TEST_STAGES=download", NULL};
        long lag;
        pid_t worker;

        (void)snprintf(env_metrics, sizeof(env_metrics), "METRICS_ADDR=127.0.0.1:%u",
                       (unsigned)port);
        for (int i = 0; i < n; i++) {
                (void)snprintf(req, sizeof(req), "{\"image_id\":\"%s\",\"s3_key\":\"k\"}",
                               images[i]);
                wt_produce(e, "download", images[i], req);
        }
        worker = wt_worker_start(e, env);
        wt_wait_committed(e, "download", 60000);
        assert_int_equal(wt_worker_stop(e, worker, SIGTERM, 30000), 0);

        /* A new consumer: its partitions have no position until a message is consumed. */
        worker = wt_worker_start(e, env);
        (void)wt_wait_readyz(port, worker, 200, NULL, 60000, body);
        /* The dispatcher reports lag every 5 s; wait for a report made while consuming. */
        util_sleep_ms(6000);
        lag = metric_value(port, "fim_consumer_lag_messages", "stage=\"download\"");
        print_message("lag after the restart: %ld (the topic holds %d messages)\n", lag, n);
        assert_int_equal(lag, 0);
        assert_int_equal(wt_worker_stop(e, worker, SIGTERM, 30000), 0);
}

/* Poll /metrics until @name{@label} is exactly @want, or fail. */
static void wait_metric(uint16_t port, const char *name, const char *label, long want,
                        int timeout_ms)
{
        int64_t deadline = util_now_monotonic_ms() + timeout_ms;
        long v;

        while ((v = metric_value(port, name, label)) != want) {
                if (util_now_monotonic_ms() > deadline)
                        fail_msg("%s{%s} is %ld after %d ms, expected %ld", name, label, v,
                                 timeout_ms, want);
                util_sleep_ms(250);
        }
}

/* Wait until the dead-letter topic holds @n messages. */
static void wait_dead_letters(struct wt_env *e, long n, int timeout_ms)
{
        int64_t deadline = util_now_monotonic_ms() + timeout_ms;

        while (wt_topic_end(e, "dlq") < n) {
                assert_true(util_now_monotonic_ms() < deadline);
                util_sleep_ms(200);
        }
}

/*
 * One download thread, held by a job that waits in its step, and 8 messages behind it on the
 * same partition: the job is in flight, and the pool, full with two queued, has paused, so
 * the rest shows as lag. Released, everything completes and both go back to 0. Then a stage
 * call that fails transiently (MAX_ATTEMPTS=2: one retry, then a dead letter) counts one
 * retry for its reason, and a transition that fails transiently one for its own.
 */
static void test_worker_metrics_follow_jobs(void **state)
{
        static const char *const download = "stage=\"download\"";
        struct wt_env *e = *state;
        char env_metrics[64], body[512], req[128];
        uint16_t port = wt_free_port();
        const char *env[] = {env_metrics, "FIM_TEST_STAGES=download", "DOWNLOAD_QUEUE_SIZE=1",
                             NULL};
        int64_t deadline;
        long inflight = 0, lag = 0;
        pid_t worker;

        (void)snprintf(env_metrics, sizeof(env_metrics), "METRICS_ADDR=127.0.0.1:%u",
                       (unsigned)port);
        /* One key: one partition, in this order. */
        wt_produce(e, "download", "m", "{\"image_id\":\"hold-1\"}");
        for (int i = 0; i < 8; i++) {
                (void)snprintf(req, sizeof(req), "{\"image_id\":\"behind-%d\"}", i);
                wt_produce(e, "download", "m", req);
        }
        worker = wt_worker_start(e, env);
        (void)wt_wait_readyz(port, worker, 200, NULL, 60000, body);

        /* The dispatcher reports lag every 5 s: wait for a report made while held. */
        deadline = util_now_monotonic_ms() + 60000;
        while (inflight < 1 || lag < 1) {
                if (util_now_monotonic_ms() > deadline)
                        fail_msg("in flight %ld, lag %ld while a job is held", inflight, lag);
                util_sleep_ms(250);
                inflight = metric_value(port, "fim_inflight_jobs", download);
                lag = metric_value(port, "fim_consumer_lag_messages", download);
        }
        print_message("held: %ld in flight, lag %ld\n", inflight, lag);
        assert_int_equal(inflight, 1);
        assert_true(lag <= 8);
        assert_int_equal(wt_sql(e, "SELECT count(*) FROM sample_calls WHERE image_id LIKE"
                                   " 'behind-%%'"),
                         0);

        assert_int_equal(wt_sql(e, "INSERT INTO sample_release VALUES ('hold-1') RETURNING 1"), 1);
        wt_wait_sql(e, 9, 60000,
                    "SELECT count(*) FROM fsm_runs WHERE fsm = 'download' AND status = 'complete'");
        wt_wait_committed(e, "download", 60000);
        wait_metric(port, "fim_inflight_jobs", download, 0, 30000);
        wait_metric(port, "fim_consumer_lag_messages", download, 0, 30000);
        assert_int_equal(metric_value(port, "fim_retries_total", download), 0);

        wt_produce(e, "download", "stuck-1", "{\"image_id\":\"stuck-1\"}");
        wait_dead_letters(e, 1, 60000);
        assert_int_equal(
                metric_value(port, "fim_retries_total", "stage=\"download\",reason=\"stage_call\""),
                1);
        assert_int_equal(metric_value(port, "fim_retries_total", download), 1);

        wt_produce(e, "download", "flaky-1", "{\"image_id\":\"flaky-1\"}");
        wait_dead_letters(e, 2, 60000);
        assert_int_equal(
                metric_value(port, "fim_retries_total", "stage=\"download\",reason=\"transition\""),
                1);
        assert_int_equal(metric_value(port, "fim_retries_total", download), 2);
        assert_int_equal(wt_worker_stop(e, worker, SIGTERM, 30000), 0);
}

int main(int argc, char **argv)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_worker_readyz_follows_postgres, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(
                        test_worker_lag_after_restart_is_committed_not_retained, setup, teardown),
                cmocka_unit_test_setup_teardown(test_worker_metrics_follow_jobs, setup, teardown),
        };
        int status;

        if (wt_child_main(argc, argv, &status))
                return status;
        curl_global_init(CURL_GLOBAL_DEFAULT);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
