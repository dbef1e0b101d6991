/*
 * A broker restart in the middle of a stream loses no job. The test starts a private Kafka
 * broker (tests/infra/services.sh with its own state directory and ports) so that restarting
 * it cannot disturb tests running in parallel against the shared one; the restart is a
 * SIGTERM (controlled shutdown) and a relaunch of the same command line on the same data.
 * The same broker outage must show in the worker's /readyz, and go away with it.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>
#include <librdkafka/rdkafka.h>

#include "common/util.h"
#include "helper_worker.h"

#define JOBS_BEFORE 20
#define JOBS_DURING 20

static struct {
        char dir[256];
        char brokers[64];
        char env[3][64];
} broker;

static int services(const char *verb)
{
        char cmd[1024];

        (void)snprintf(cmd, sizeof(cmd),
                       "env FIM_SERVICES_DIR=%s %s %s %s bash %s/tests/infra/services.sh %s %s",
                       broker.dir, broker.env[0], broker.env[1], broker.env[2], FIM_SOURCE_DIR,
                       verb, strcmp(verb, "start") == 0 ? "kafka" : "");
        return system(cmd);
}

static int group_setup(void **state)
{
        (void)state;
        (void)snprintf(broker.dir, sizeof(broker.dir), "/tmp/fim-wt-kafka-%ld", (long)getpid());
        /* Ports picked free may be taken by someone else before the JVM binds them: retry. */
        for (int attempt = 1;; attempt++) {
                int port = wt_free_port();

                (void)snprintf(broker.env[0], sizeof(broker.env[0]), "FIM_KAFKA_PORT=%d", port);
                (void)snprintf(broker.env[1], sizeof(broker.env[1]), "FIM_KAFKA_CONTROLLER_PORT=%d",
                               wt_free_port());
                (void)snprintf(broker.env[2], sizeof(broker.env[2]), "FIM_KAFKA_GUEST_PORT=%d",
                               wt_free_port());
                (void)snprintf(broker.brokers, sizeof(broker.brokers), "127.0.0.1:%d", port);
                if (services("start") == 0)
                        return 0;
                (void)services("stop");
                if (attempt == 3)
                        fail_msg("could not start a private Kafka broker in %s", broker.dir);
                printf("starting the private broker failed, retrying\n");
        }
}

static int group_teardown(void **state)
{
        (void)state;
        (void)services("stop");
        return 0;
}

static int setup(void **state)
{
        struct wt_env *e = calloc(1, sizeof(*e));

        assert_non_null(e);
        wt_setup(e, broker.brokers);
        *state = e;
        return 0;
}

static int teardown(void **state)
{
        struct wt_env *e = *state;

        wt_teardown(e);
        free(e);
        return 0;
}

/* Whether @pid is alive and not a zombie. */
static bool alive(pid_t pid)
{
        char path[64], buf[512];
        const char *p;
        FILE *f;
        size_t n;

        (void)snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
        f = fopen(path, "re");
        if (!f)
                return false;
        n = fread(buf, 1, sizeof(buf) - 1, f);
        fclose(f);
        buf[n] = '\0';
        p = strrchr(buf, ')');
        return p && p[1] == ' ' && p[2] != 'Z';
}

/*
 * SIGTERM the broker, wait for it to exit, call @while_down (may be NULL), and start the same
 * command line again.
 */
static void restart_broker(void (*while_down)(void *), void *userdata)
{
        char pidfile[320], cmdline[320], args[8192], log[320];
        char *argv[256];
        size_t n = 0, argc = 0;
        int64_t deadline;
        long pid = 0;
        FILE *f;

        (void)snprintf(pidfile, sizeof(pidfile), "%s/kafka.pid", broker.dir);
        f = fopen(pidfile, "re");
        assert_non_null(f);
        assert_int_equal(fscanf(f, "%ld", &pid), 1);
        fclose(f);
        (void)snprintf(cmdline, sizeof(cmdline), "/proc/%ld/cmdline", pid);
        f = fopen(cmdline, "re");
        assert_non_null(f);
        n = fread(args, 1, sizeof(args) - 1, f);
        fclose(f);
        args[n] = '\0';
        for (size_t i = 0; i < n && argc < 255; i += strlen(args + i) + 1)
                argv[argc++] = args + i;
        argv[argc] = NULL;

        printf("restarting broker %ld\n", pid);
        assert_int_equal(kill((pid_t)pid, SIGTERM), 0);
        deadline = util_now_monotonic_ms() + 60000;
        while (alive((pid_t)pid)) {
                assert_true(util_now_monotonic_ms() < deadline);
                util_sleep_ms(100);
        }
        if (while_down)
                while_down(userdata);
        (void)snprintf(log, sizeof(log), "%s/kafka/kafka.log", broker.dir);
        fflush(NULL);
        if (fork() == 0) {
                int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);

                (void)setsid();
                f = fopen(pidfile, "we");
                if (f) {
                        fprintf(f, "%ld\n", (long)getpid());
                        fclose(f);
                }
                if (fd >= 0) {
                        (void)dup2(fd, STDOUT_FILENO);
                        (void)dup2(fd, STDERR_FILENO);
                }
                execvp(argv[0], argv);
                _exit(127);
        }
}

static void produce_jobs(struct wt_env *e, const char *prefix, int n)
{
        char image[32], json[64];

        for (int i = 0; i < n; i++) {
                (void)snprintf(image, sizeof(image), "%s%d", prefix, i);
                (void)snprintf(json, sizeof(json), "{\"image_id\":\"%s\"}", image);
                wt_produce(e, "download", image, json);
        }
}

/* Every handoff of @stage reached Kafka at least once, one per image. */
static void assert_handoffs(struct wt_env *e, const char *suffix, int expect)
{
        struct wt_msg *msgs = NULL;
        size_t n = wt_read_topic(e, suffix, &msgs);
        char seen[JOBS_BEFORE + JOBS_DURING][32];
        int distinct = 0;

        for (size_t i = 0; i < n; i++) {
                bool dup = false;

                for (int j = 0; j < distinct; j++)
                        dup = dup || strcmp(seen[j], msgs[i].key) == 0;
                if (!dup && distinct < JOBS_BEFORE + JOBS_DURING)
                        (void)snprintf(seen[distinct++], sizeof(seen[0]), "%s", msgs[i].key);
        }
        printf("%s: %zu handoffs, %d distinct\n", suffix, n, distinct);
        assert_int_equal(distinct, expect);
        wt_msgs_free(msgs, n);
}

static void test_worker_broker_restart_loses_no_job(void **state)
{
        struct wt_env *e = *state;
        pid_t w;

        w = wt_worker_start(e, NULL);
        produce_jobs(e, "med-a", JOBS_BEFORE);
        wt_wait_sql(e, 1, 30000,
                    "SELECT (count(*) >= 4)::int FROM fsm_runs WHERE fsm = 'unpack'"
                    " AND status = 'complete'");
        restart_broker(NULL, NULL);
        /* Produced while the broker is down or starting: the producer waits it out. */
        produce_jobs(e, "med-b", JOBS_DURING);
        wt_wait_sql(e, JOBS_BEFORE + JOBS_DURING, 120000,
                    "SELECT count(*) FROM fsm_runs WHERE fsm = 'activate' AND status = 'complete'");
        for (size_t i = 0; i < 3; i++) {
                static const char *const stages[] = {"download", "unpack", "activate"};

                assert_int_equal(wt_sql(e,
                                        "SELECT count(*) FROM fsm_runs WHERE fsm = '%s'"
                                        " AND status = 'complete'",
                                        stages[i]),
                                 JOBS_BEFORE + JOBS_DURING);
                assert_int_equal(wt_sql(e, "SELECT count(*) FROM sample_effects WHERE stage = '%s'",
                                        stages[i]),
                                 JOBS_BEFORE + JOBS_DURING);
        }
        assert_int_equal(wt_sql(e, "SELECT count(*) FROM fsm_runs"),
                         3 * (JOBS_BEFORE + JOBS_DURING));
        wt_wait_sql(e, 0, 30000, "SELECT count(*) FROM outbox WHERE published_at IS NULL");
        assert_handoffs(e, "unpack", JOBS_BEFORE + JOBS_DURING);
        assert_handoffs(e, "activate", JOBS_BEFORE + JOBS_DURING);
        wt_wait_committed(e, "download", 30000);
        wt_wait_committed(e, "unpack", 30000);
        wt_wait_committed(e, "activate", 30000);
        assert_int_equal(wt_worker_stop(e, w, SIGTERM, 30000), 0);
}

struct readyz_watch {
        uint16_t port;
        pid_t worker;
};

/*
 * While the broker is down: /readyz turns 503 and, once the probe has run, says that no broker
 * answers (the consumer's "not joined" may come first); /healthz stays 200.
 */
static void readyz_turns_unready(void *userdata)
{
        const struct readyz_watch *rw = userdata;
        char body[512];
        int64_t took;

        took = wt_wait_readyz(rw->port, rw->worker, 503, "Kafka unreachable", 30000, body);
        printf("503 %ld ms after the broker stopped: %s", (long)took, body);
        assert_int_equal(wt_http_get(rw->port, "/healthz", body), 200);
}

/*
 * /readyz follows the brokers: a consumer keeps its group membership while every broker is
 * down, so only the worker's own probe can tell.
 */
static void test_worker_readyz_follows_kafka(void **state)
{
        struct wt_env *e = *state;
        struct readyz_watch rw = {.port = wt_free_port()};
        char env_metrics[64], body[512];
        int64_t took;

        (void)snprintf(env_metrics, sizeof(env_metrics), "METRICS_ADDR=127.0.0.1:%u",
                       (unsigned)rw.port);
        rw.worker = wt_worker_start(
                e, (const char *const[]){env_metrics, "FIM_TEST_STAGES=download", NULL});
        took = wt_wait_readyz(rw.port, rw.worker, 200, NULL, 60000, body);
        printf("ready %ld ms after the start\n", (long)took);
        restart_broker(readyz_turns_unready, &rw);
        took = wt_wait_readyz(rw.port, rw.worker, 200, NULL, 120000, body);
        printf("ready again %ld ms after the broker was started again\n", (long)took);
        /* Still doing its job after the outage. */
        wt_produce(e, "download", "after-outage", "{\"image_id\":\"after-outage\"}");
        wt_wait_sql(e, 1, 60000,
                    "SELECT count(*) FROM fsm_runs WHERE fsm = 'download' AND status = 'complete'");
        assert_int_equal(wt_worker_stop(e, rw.worker, SIGTERM, 30000), 0);
}

int main(int argc, char **argv)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_worker_broker_restart_loses_no_job, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_worker_readyz_follows_kafka, setup, teardown),
        };
        int status;

        if (wt_child_main(argc, argv, &status))
                return status;
        return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
