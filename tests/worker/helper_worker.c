#include "helper_worker.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <curl/curl.h>
#include <json-c/json.h>
#include <librdkafka/rdkafka.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "db/db.h"
#include "helper_pg.h"
#include "worker/fsm.h"
#include "worker/kafka_client.h"
#include "worker/kafka_producer.h"
#include "worker/kafka_worker.h"
#include "worker/lease.h"
#include "worker/stage.h"

#define WT_TIMEOUT_MS 15000

/* ---- sample stages ------------------------------------------------------------------ */

struct sample_job {
        const struct stage_ctx *ctx;
        enum stage_id id;
        char image_id[128];
        const char *request;
};

static bool sample_has_prefix(const char *s, const char *prefix)
{
        return strncmp(s, prefix, strlen(prefix)) == 0;
}

static int sample_failing(struct fsm_run *run, const char *image_id)
{
        PGresult *res = NULL;
        const char *params[1] = {image_id};
        int r = db_query_row(fsm_run_db(run), &res, "SELECT 1 FROM sample_fail WHERE image_id = $1",
                             1, params);

        if (r > 0)
                PQclear(res);
        return r;
}

/*
 * hold-*: wait until the test lists the image in sample_release. A stop cuts the wait short,
 * as a real stage's would be (-EINTR: the run is released, no attempt spent).
 */
static int sample_hold(struct fsm_run *run, const char *image_id)
{
        const char *params[1] = {image_id};
        int64_t deadline = util_now_monotonic_ms() + 120000;

        while (util_now_monotonic_ms() < deadline) {
                PGresult *res = NULL;
                int r = db_query_row(fsm_run_db(run), &res,
                                     "SELECT 1 FROM sample_release WHERE image_id = $1", 1, params);

                if (r < 0)
                        return r;
                if (r > 0) {
                        PQclear(res);
                        return 0;
                }
                if (fsm_run_should_stop(run))
                        return err_set(-EINTR, "sample stage stops holding '%s'", image_id);
                util_sleep_ms(50);
        }
        return err_set(-ETIMEDOUT, "sample stage held '%s' for too long", image_id);
}

static int sample_work_step(struct fsm_run *run, void *userdata)
{
        struct sample_job *job = userdata;
        const char *stage = stage_name(job->id);
        char pid[16];
        const char *params[4] = {stage, job->image_id, fsm_run_id(run), pid};
        int r;

        (void)snprintf(pid, sizeof(pid), "%ld", (long)getpid());
        r = db_exec(fsm_run_db(run), NULL,
                    "INSERT INTO sample_calls (stage, image_id, run_id, pid) VALUES ($1, $2, $3,"
                    " $4::int)",
                    4, params);
        if (r < 0)
                return r;
        if (sample_has_prefix(job->image_id, "slow-") && job->id == STAGE_DOWNLOAD) {
                const char *ms = getenv("FIM_TEST_SLOW_MS");

                util_sleep_ms(ms ? strtol(ms, NULL, 10) : 2000);
        }
        if (sample_has_prefix(job->image_id, "hold-") && job->id == STAGE_DOWNLOAD) {
                r = sample_hold(run, job->image_id);
                if (r < 0)
                        return r;
        }
        if (sample_has_prefix(job->image_id, "med-"))
                util_sleep_ms(150);
        if (sample_has_prefix(job->image_id, "fail-") && job->id == STAGE_DOWNLOAD) {
                r = sample_failing(run, job->image_id);
                if (r < 0)
                        return r;
                if (r > 0)
                        return err_set(-EACCES, "sample stage refuses image '%s'", job->image_id);
        }
        if (sample_has_prefix(job->image_id, "flaky-") && job->id == STAGE_DOWNLOAD)
                return err_set(-EAGAIN, "sample stage is flaky for '%s'", job->image_id);
        json_object_object_add(fsm_run_response(run), "image_id",
                               json_object_new_string(job->image_id));
        return 0;
}

static int sample_work_commit(struct fsm_run *run, struct db *db, void *userdata)
{
        struct sample_job *job = userdata;
        const char *params[3] = {stage_name(job->id), job->image_id, fsm_run_id(run)};

        return db_exec(db, NULL,
                       "INSERT INTO sample_effects (stage, image_id, run_id) VALUES ($1, $2, $3)",
                       3, params);
}

static int sample_record_step(struct fsm_run *run, void *userdata)
{
        struct sample_job *job = userdata;

        (void)run;
        if (sample_has_prefix(job->image_id, "slowlast-") && job->id == STAGE_DOWNLOAD) {
                const char *ms = getenv("FIM_TEST_SLOW_MS");

                util_sleep_ms(ms ? strtol(ms, NULL, 10) : 2000);
        }
        return 0;
}

/* The handoff hook: the next stage gets the same request. */
static int sample_handoff(struct fsm_run *run, struct db *db, void *userdata)
{
        struct sample_job *job = userdata;
        int r;

        if (job->id == STAGE_ACTIVATE || !job->ctx->handoff)
                return 0;
        r = stage_outbox_insert(db, job->ctx, fsm_run_id(run), (enum stage_id)(job->id + 1),
                                job->image_id, job->request);
        return r < 0 ? r : 1;
}

static const struct fsm_transition sample_transitions[] = {
        {"work", sample_work_step, sample_work_commit},
        {"record", sample_record_step, NULL},
};

static const struct fsm_def sample_defs[STAGE_COUNT] = {
        [STAGE_DOWNLOAD] = {"download", sample_transitions, 2, NULL, sample_handoff},
        [STAGE_UNPACK] = {"unpack", sample_transitions, 2, NULL, sample_handoff},
        /* The last stage hands nothing off, like the real activate stage. */
        [STAGE_ACTIVATE] = {"activate", sample_transitions, 2, NULL, NULL},
};

static bool sample_image_id(const char *json, char *buf, size_t size)
{
        struct json_object *o = json_tokener_parse(json), *v = NULL;
        bool ok = o && json_object_object_get_ex(o, "image_id", &v) &&
                  json_object_is_type(v, json_type_string) && json_object_get_string_len(v) > 0 &&
                  (size_t)json_object_get_string_len(v) < size;

        if (ok)
                (void)snprintf(buf, size, "%s", json_object_get_string(v));
        json_object_put(o);
        return ok;
}

static int sample_handle(const struct stage_ctx *ctx, const char *json, struct stage_result *ret,
                         enum stage_id id)
{
        const struct config *cfg = ctx->cfg;
        struct sample_job job = {.ctx = ctx, .id = id, .request = json};
        struct fsm_result fres = {0};
        struct fsm_options o = {
                .host_id = cfg->host_id,
                .worker_id = ctx->worker_id,
                .max_attempts = cfg->max_attempts,
                .retry_base_ms = cfg->retry_base_ms,
                .retry_max_ms = cfg->retry_max_ms,
                .leases = ctx->leases,
                .stop = ctx->stop,
                .trace_id = ctx->trace_id,
                .parent_run_id = ctx->parent_run_id,
                .source = ctx->source,
        };
        char key[300];
        int r;

        memset(ret, 0, sizeof(*ret));
        if (sample_image_id(json, job.image_id, sizeof(job.image_id)) && id == STAGE_DOWNLOAD) {
                /* The engine call itself failing, as when PostgreSQL refuses a value. */
                if (sample_has_prefix(job.image_id, "broken-"))
                        return err_set(-EINVAL, "sample engine refuses '%s'", job.image_id);
                if (sample_has_prefix(job.image_id, "stuck-"))
                        return err_set(-EAGAIN, "sample engine is stuck on '%s'", job.image_id);
        }
        if (!job.image_id[0]) {
                ret->outcome = FSM_OUTCOME_FAILED;
                ret->error = -EINVAL;
                ret->error_class = STAGE_ERROR_INVALID_REQUEST;
                (void)snprintf(ret->error_text, sizeof(ret->error_text),
                               "field 'image_id' is required");
                return 0;
        }
        o.subject = job.image_id;
        (void)snprintf(key, sizeof(key), "%s:%s:%s", stage_name(id), cfg->host_id, job.image_id);
        r = fsm_execute(ctx->db, &sample_defs[id], &o, key, json, &job, &fres);
        if (r < 0)
                return r;
        stage_result_from_fsm(ret, &fres);
        (void)snprintf(ret->image_id, sizeof(ret->image_id), "%s", job.image_id);
        fsm_result_done(&fres);
        return 0;
}

static int sample_download(const struct stage_ctx *ctx, const char *json, struct stage_result *r)
{
        return sample_handle(ctx, json, r, STAGE_DOWNLOAD);
}

static int sample_unpack(const struct stage_ctx *ctx, const char *json, struct stage_result *r)
{
        return sample_handle(ctx, json, r, STAGE_UNPACK);
}

static int sample_activate(const struct stage_ctx *ctx, const char *json, struct stage_result *r)
{
        return sample_handle(ctx, json, r, STAGE_ACTIVATE);
}

static const struct stage sample_stages[] = {
        {STAGE_DOWNLOAD, "download", sample_download},
        {STAGE_UNPACK, "unpack", sample_unpack},
        {STAGE_ACTIVATE, "activate", sample_activate},
};

int wt_run_stage(struct wt_env *e, const struct stage *stage, const char *json, bool handoff,
                 struct stage_result *ret)
{
        struct lease_keeper *leases = NULL;
        struct stage_ctx ctx = {
                .cfg = &e->cfg,
                .db = e->db,
                .worker_id = "wt-host/test/in-process",
                .handoff = handoff,
        };
        int r;

        assert_int_equal(lease_keeper_new(e->url, e->cfg.lease_seconds * 1000, &leases), 0);
        ctx.leases = leases;
        r = stage->handle(&ctx, json, ret);
        lease_keeper_free(leases);
        return r;
}

const struct stage *wt_sample_stage(enum stage_id id)
{
        return &sample_stages[id];
}

/* Tells the test that exit() ran the atexit handlers (FIM_TEST_ATEXIT_NOTE). */
static void wt_atexit_note(void)
{
        static const char note[] = "test worker: atexit handlers ran\n";

        (void)!write(STDERR_FILENO, note, sizeof(note) - 1);
}

bool wt_child_main(int argc, char **argv, int *ret_status)
{
        const struct stage *stages[STAGE_COUNT];
        struct kafka_worker_options wo = {.stages = stages};
        const char *only = getenv("FIM_TEST_STAGES");
        struct config cfg;

        if (argc < 2 || strcmp(argv[1], "worker") != 0) {
                /* The test process: FIM_TEST_FILTER="test_worker_poison*" runs some cases. */
                if (getenv("FIM_TEST_FILTER"))
                        cmocka_set_test_filter(getenv("FIM_TEST_FILTER"));
                return false;
        }
        if (config_load(&cfg, NULL) < 0) {
                fprintf(stderr, "worker: bad configuration: %s\n", err_last());
                config_done(&cfg);
                *ret_status = 1;
                return true;
        }
        for (size_t i = 0; i < ARRAY_SIZE(sample_stages); i++) {
                if (!only || strstr(only, sample_stages[i].name))
                        stages[wo.nstages++] = &sample_stages[i];
        }
        wo.cfg = &cfg;
        if (getenv("FIM_TEST_ATEXIT_NOTE"))
                (void)atexit(wt_atexit_note);
        *ret_status = kafka_worker_run(&wo);
        config_done(&cfg);
        return true;
}

/* ---- setup -------------------------------------------------------------------------- */

static rd_kafka_t *wt_client(struct wt_env *e, rd_kafka_type_t type, const char *group)
{
        const char *props[] = {
                "group.id", group, "enable.auto.commit", "false", "enable.partition.eof",
                "true",     NULL};
        rd_kafka_conf_t *conf = NULL;
        rd_kafka_t *rk = NULL;

        assert_int_equal(kafka_client_conf_new(&e->cfg, type, "test", group ? props : NULL, &conf),
                         0);
        if (kafka_client_new(type, conf, &rk) < 0)
                fail_msg("kafka client: %s", err_last());
        return rk;
}

static void wt_topic_name(struct wt_env *e, const char *suffix, char *buf, size_t size)
{
        assert_int_equal(kafka_client_topic(&e->cfg, suffix, buf, size), 0);
}

static void wt_create_topics(struct wt_env *e)
{
        const char *suffixes[] = {"download", "unpack", "activate", KAFKA_DLQ_SUFFIX};
        rd_kafka_t *rk = wt_client(e, RD_KAFKA_PRODUCER, NULL);
        rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
        rd_kafka_NewTopic_t *nt[4];
        rd_kafka_AdminOptions_t *o;
        const rd_kafka_topic_result_t **results;
        rd_kafka_event_t *ev;
        char errstr[256];
        size_t n = 0;

        for (size_t i = 0; i < 4; i++) {
                char topic[KAFKA_NAME_MAX];

                wt_topic_name(e, suffixes[i], topic, sizeof(topic));
                nt[i] = rd_kafka_NewTopic_new(topic, i == 3 ? 1 : 3, 1, errstr, sizeof(errstr));
                assert_non_null(nt[i]);
        }
        o = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
        (void)rd_kafka_AdminOptions_set_operation_timeout(o, 10000, errstr, sizeof(errstr));
        rd_kafka_CreateTopics(rk, nt, 4, o, q);
        ev = rd_kafka_queue_poll(q, 30000);
        if (!ev || rd_kafka_event_error(ev))
                fail_msg("CreateTopics failed: %s",
                         ev ? rd_kafka_event_error_string(ev) : "timed out");
        results = rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &n);
        for (size_t i = 0; i < n; i++) {
                rd_kafka_resp_err_t err = rd_kafka_topic_result_error(results[i]);

                if (err && err != RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS)
                        fail_msg("creating topic '%s': %s", rd_kafka_topic_result_name(results[i]),
                                 rd_kafka_err2str(err));
        }
        rd_kafka_event_destroy(ev);
        rd_kafka_AdminOptions_destroy(o);
        rd_kafka_NewTopic_destroy_array(nt, 4);
        rd_kafka_queue_destroy(q);
        rd_kafka_destroy(rk);
        /* Until every partition has a leader, produce and consume would stall. */
        for (size_t i = 0; i < 4; i++) {
                int64_t ends[8];
                int64_t deadline = util_now_monotonic_ms() + WT_TIMEOUT_MS;

                while (wt_ends(e, suffixes[i], ends, 8) != (i == 3 ? 1 : 3)) {
                        assert_true(util_now_monotonic_ms() < deadline);
                        util_sleep_ms(100);
                }
        }
}

static void wt_export(const char *name, const char *value)
{
        assert_int_equal(setenv(name, value, 1), 0);
}

void wt_setup(struct wt_env *e, const char *brokers)
{
        static unsigned counter;
        const char *b = brokers ? brokers : getenv("KAFKA_BROKERS");
        const char *level = getenv("FIM_TEST_LOG_LEVEL");

        memset(e, 0, sizeof(*e));
        if (!b || !b[0])
                fail_msg(
                        "KAFKA_BROKERS is not set: run the tests through scripts/test.sh, which starts Kafka");
        (void)snprintf(e->brokers, sizeof(e->brokers), "%s", b);
        (void)snprintf(e->prefix, sizeof(e->prefix), "wt%ldx%u", (long)getpid(), counter++);
        pg_test_create(e->url, sizeof(e->url));
        e->db = pg_test_connect(e->url);
        assert_int_equal(
                db_exec_script(
                        e->db,
                        "CREATE TABLE sample_calls (stage text, image_id text, run_id text,"
                        " pid int, at timestamptz DEFAULT clock_timestamp());"
                        "CREATE TABLE sample_effects (stage text, image_id text, run_id text);"
                        "CREATE TABLE sample_fail (image_id text PRIMARY KEY);"
                        "CREATE TABLE sample_release (image_id text PRIMARY KEY)"),
                0);
        (void)unsetenv("FIM_CONFIG");
        wt_export("DATABASE_URL", e->url);
        wt_export("KAFKA_BROKERS", e->brokers);
        wt_export("KAFKA_TOPIC_PREFIX", e->prefix);
        wt_export("HOST_ID", "wt-host");
        wt_export("LEASE_SECONDS", "3");
        wt_export("SHUTDOWN_TIMEOUT", "20");
        wt_export("MAX_ATTEMPTS", "2");
        wt_export("RETRY_BASE_MS", "50");
        wt_export("RETRY_MAX_MS", "200");
        wt_export("DOWNLOAD_QUEUE_SIZE", "2");
        wt_export("UNPACK_QUEUE_SIZE", "2");
        wt_export("ACTIVATE_QUEUE_SIZE", "2");
        wt_export("LOG_LEVEL", level ? level : "notice");
        /* Quick group membership changes and commits. */
        wt_export("FIM_KAFKA_CONSUMER_OPTIONS",
                  "session.timeout.ms=6000;heartbeat.interval.ms=500;"
                  "max.poll.interval.ms=20000;auto.commit.interval.ms=200;"
                  "topic.metadata.refresh.interval.ms=2000");
        (void)unsetenv("FIM_TEST_STAGES");
        assert_int_equal(config_load(&e->cfg, NULL), 0);
        wt_create_topics(e);
}

void wt_teardown(struct wt_env *e)
{
        for (size_t i = 0; i < ARRAY_SIZE(e->workers); i++) {
                if (e->workers[i] > 0) {
                        (void)kill(e->workers[i], SIGKILL);
                        (void)waitpid(e->workers[i], NULL, 0);
                }
        }
        db_free(e->db);
        pg_test_drop(e->url);
        config_done(&e->cfg);
}

/* ---- processes ---------------------------------------------------------------------- */

/*
 * Fork and exec @path with @argv and the extra settings, stderr appended to @log when not
 * NULL; the pid is remembered in @e.
 */
static pid_t wt_spawn(struct wt_env *e, const char *path, const char *const *argv,
                      const char *const *extra_env, const char *log)
{
        pid_t parent = getpid();
        size_t slot = 0;
        pid_t pid;

        while (slot < ARRAY_SIZE(e->workers) && e->workers[slot] > 0)
                slot++;
        assert_true(slot < ARRAY_SIZE(e->workers));
        fflush(NULL);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                /* A test process that dies (a sanitizer's halt_on_error, a crash) takes its
                 * workers along: an orphan would keep ctest's output pipe open until the
                 * test's timeout. */
                if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent)
                        _exit(125);
                for (size_t i = 0; extra_env && extra_env[i]; i++)
                        (void)putenv((char *)extra_env[i]);
                if (log) {
                        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);

                        if (fd < 0 || dup2(fd, STDERR_FILENO) < 0)
                                _exit(126);
                }
                execv(path, (char *const *)argv);
                _exit(127);
        }
        e->workers[slot] = pid;
        return pid;
}

pid_t wt_worker_start(struct wt_env *e, const char *const *extra_env)
{
        return wt_worker_start_log(e, extra_env, NULL);
}

pid_t wt_worker_start_log(struct wt_env *e, const char *const *extra_env, const char *log)
{
        static const char *const argv[] = {"test-worker", "worker", NULL};

        return wt_spawn(e, "/proc/self/exe", argv, extra_env, log);
}

pid_t wt_cli_start(struct wt_env *e, const char *const *args, const char *const *extra_env)
{
        return wt_spawn(e, FIM_BINARY_DIR "/flyio-image-manager", args, extra_env, NULL);
}

static void wt_forget(struct wt_env *e, pid_t pid)
{
        for (size_t i = 0; i < ARRAY_SIZE(e->workers); i++) {
                if (e->workers[i] == pid)
                        e->workers[i] = 0;
        }
}

/* Print what a process that did not stop is doing: its signal masks and each thread's state. */
static void wt_describe_stuck(pid_t pid)
{
        char path[320], line[256];
        struct dirent *d;
        FILE *f;
        DIR *dir;

        (void)snprintf(path, sizeof(path), "/proc/%ld/status", (long)pid);
        f = fopen(path, "re");
        while (f && fgets(line, sizeof(line), f)) {
                if (strncmp(line, "Sig", 3) == 0 || strncmp(line, "ShdPnd", 6) == 0 ||
                    strncmp(line, "Threads", 7) == 0)
                        printf("process %ld did not stop: %s", (long)pid, line);
        }
        if (f)
                fclose(f);
        (void)snprintf(path, sizeof(path), "/proc/%ld/task", (long)pid);
        dir = opendir(path);
        while (dir && (d = readdir(dir))) {
                char wchan[64] = "", stat[256] = "";

                if (d->d_name[0] == '.')
                        continue;
                (void)snprintf(path, sizeof(path), "/proc/%ld/task/%s/wchan", (long)pid, d->d_name);
                if ((f = fopen(path, "re"))) {
                        (void)!fgets(wchan, sizeof(wchan), f);
                        fclose(f);
                }
                (void)snprintf(path, sizeof(path), "/proc/%ld/task/%s/stat", (long)pid, d->d_name);
                if ((f = fopen(path, "re"))) {
                        (void)!fgets(stat, sizeof(stat), f);
                        fclose(f);
                }
                stat[strcspn(stat, "\n")] = '\0';
                printf("  thread %s wchan=%s stat=%.120s\n", d->d_name, wchan, stat);
        }
        if (dir)
                closedir(dir);
        fflush(stdout);
}

int wt_worker_stop(struct wt_env *e, pid_t pid, int sig, int timeout_ms)
{
        int64_t deadline = util_now_monotonic_ms() + timeout_ms;
        int status = 0;

        (void)kill(pid, sig);
        for (;;) {
                pid_t r = waitpid(pid, &status, WNOHANG);

                if (r == pid)
                        break;
                if (util_now_monotonic_ms() > deadline) {
                        if (sig != SIGKILL)
                                wt_describe_stuck(pid);
                        (void)kill(pid, SIGKILL);
                        (void)waitpid(pid, NULL, 0);
                        wt_forget(e, pid);
                        return -1;
                }
                util_sleep_ms(50);
        }
        wt_forget(e, pid);
        if (WIFSIGNALED(status))
                return 128 + WTERMSIG(status);
        return WEXITSTATUS(status);
}

int wt_cli(struct wt_env *e, char *out, size_t size, const char *const *args)
{
        int fds[2], status = 0;
        size_t len = 0;
        pid_t pid;

        (void)e;
        assert_int_equal(pipe2(fds, O_CLOEXEC), 0);
        fflush(NULL);
        pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                (void)dup2(fds[1], STDOUT_FILENO);
                execv(FIM_BINARY_DIR "/flyio-image-manager", (char *const *)args);
                _exit(127);
        }
        close(fds[1]);
        for (;;) {
                ssize_t n = read(fds[0], out + len, size - 1 - len);

                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        break;
                len += (size_t)n;
                if (len == size - 1)
                        break;
        }
        out[len] = '\0';
        close(fds[0]);
        assert_int_equal(waitpid(pid, &status, 0), pid);
        printf("$ flyio-image-manager");
        for (size_t i = 1; args[i]; i++)
                printf(" %s", args[i]);
        printf("\n%s", out);
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* ---- kafka -------------------------------------------------------------------------- */

void wt_produce(struct wt_env *e, const char *suffix, const char *key, const char *value)
{
        static const char *const names[] = {"attempt"};
        static const char *const values[] = {"1"};

        wt_produce_headers(e, suffix, key, value, 1, names, values);
}

void wt_produce_headers(struct wt_env *e, const char *suffix, const char *key, const char *value,
                        size_t nheaders, const char *const *names, const char *const *values)
{
        static struct kafka_producer *producer;
        static char brokers[256];
        char topic[KAFKA_NAME_MAX];
        struct kafka_delivery d;
        struct kafka_record rec = {
                .topic = topic,
                .key = key,
                .key_len = key ? strlen(key) : 0,
                .value = value,
                .value_len = strlen(value),
                .headers = kafka_headers_new(nheaders, names, values),
        };

        /* One producer per broker address for the whole test program. */
        if (producer && strcmp(brokers, e->brokers) != 0) {
                kafka_producer_free(producer, 5000);
                producer = NULL;
        }
        if (!producer) {
                assert_int_equal(kafka_producer_new(&e->cfg, "test", 30000, &producer), 0);
                (void)snprintf(brokers, sizeof(brokers), "%s", e->brokers);
        }
        wt_topic_name(e, suffix, topic, sizeof(topic));
        if (kafka_producer_send_sync(producer, &rec, &d) < 0)
                fail_msg("produce to '%s': %s", topic, err_last());
}

int wt_ends(struct wt_env *e, const char *suffix, int64_t *ret, int max)
{
        rd_kafka_t *rk = wt_client(e, RD_KAFKA_PRODUCER, NULL);
        const struct rd_kafka_metadata *md = NULL;
        char topic[KAFKA_NAME_MAX];
        rd_kafka_topic_t *rkt;
        int n = 0;

        wt_topic_name(e, suffix, topic, sizeof(topic));
        rkt = rd_kafka_topic_new(rk, topic, NULL);
        if (rd_kafka_metadata(rk, 0, rkt, &md, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR &&
            md->topic_cnt == 1 && !md->topics[0].err) {
                for (int i = 0; i < md->topics[0].partition_cnt && n < max; i++) {
                        int64_t low = 0, high = 0;
                        int32_t id = md->topics[0].partitions[i].id;

                        if (id >= max ||
                            rd_kafka_query_watermark_offsets(rk, topic, id, &low, &high, 5000)) {
                                n = -1;
                                break;
                        }
                        ret[id] = high;
                        n++;
                }
        }
        if (md)
                rd_kafka_metadata_destroy(md);
        rd_kafka_topic_destroy(rkt);
        rd_kafka_destroy(rk);
        return n;
}

long wt_topic_end(struct wt_env *e, const char *suffix)
{
        int64_t ends[16];
        long sum = 0;
        int n = wt_ends(e, suffix, ends, 16);

        assert_true(n > 0);
        for (int i = 0; i < n; i++)
                sum += (long)ends[i];
        return sum;
}

static int wt_msg_cmp(const void *a, const void *b);

static void wt_msg_fill(struct wt_msg *m, const rd_kafka_message_t *msg)
{
        rd_kafka_headers_t *hdrs = NULL;
        const char *name;
        const void *value;
        size_t size;

        m->partition = msg->partition;
        m->offset = msg->offset;
        m->key = msg->key ? strndup(msg->key, msg->key_len) : NULL;
        m->value = msg->payload ? strndup(msg->payload, msg->len) : strdup("");
        if (rd_kafka_message_headers(msg, &hdrs))
                return;
        for (size_t i = 0; m->nheaders < ARRAY_SIZE(m->names) &&
                           !rd_kafka_header_get_all(hdrs, i, &name, &value, &size);
             i++) {
                m->names[m->nheaders] = strdup(name);
                m->values[m->nheaders] = value ? strndup(value, size) : strdup("");
                m->nheaders++;
        }
}

size_t wt_read_topic(struct wt_env *e, const char *suffix, struct wt_msg **ret)
{
        char topic[KAFKA_NAME_MAX], group[KAFKA_NAME_MAX + 16];
        int64_t ends[16];
        int n = wt_ends(e, suffix, ends, 16);
        rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(16);
        struct wt_msg *msgs = NULL;
        size_t count = 0, cap = 0;
        int64_t deadline = util_now_monotonic_ms() + WT_TIMEOUT_MS;
        bool done[16] = {0};
        int remaining = 0;
        rd_kafka_t *rk;

        assert_true(n > 0);
        wt_topic_name(e, suffix, topic, sizeof(topic));
        (void)snprintf(group, sizeof(group), "%s.reader", topic);
        rk = wt_client(e, RD_KAFKA_CONSUMER, group);
        for (int p = 0; p < n; p++) {
                done[p] = ends[p] == 0;
                if (!done[p]) {
                        rd_kafka_topic_partition_list_add(list, topic, p)->offset =
                                RD_KAFKA_OFFSET_BEGINNING;
                        remaining++;
                }
        }
        if (remaining)
                assert_int_equal(rd_kafka_assign(rk, list), 0);
        while (remaining > 0) {
                rd_kafka_message_t *msg = rd_kafka_consumer_poll(rk, 200);

                assert_true(util_now_monotonic_ms() < deadline);
                if (!msg)
                        continue;
                if (!msg->err && msg->partition < n && !done[msg->partition] &&
                    msg->offset < ends[msg->partition]) {
                        if (count == cap) {
                                cap = cap ? cap * 2 : 64;
                                msgs = realloc(msgs, cap * sizeof(*msgs));
                                assert_non_null(msgs);
                        }
                        memset(&msgs[count], 0, sizeof(*msgs));
                        wt_msg_fill(&msgs[count++], msg);
                }
                if ((!msg->err || msg->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) &&
                    msg->partition < n && !done[msg->partition] &&
                    msg->offset >= ends[msg->partition] - 1) {
                        done[msg->partition] = true;
                        remaining--;
                }
                rd_kafka_message_destroy(msg);
        }
        rd_kafka_topic_partition_list_destroy(list);
        (void)rd_kafka_consumer_close(rk);
        rd_kafka_destroy(rk);
        if (count > 1)
                qsort(msgs, count, sizeof(*msgs), wt_msg_cmp);
        *ret = msgs;
        return count;
}

static int wt_msg_cmp(const void *a, const void *b)
{
        const struct wt_msg *x = a, *y = b;

        if (x->partition != y->partition)
                return x->partition < y->partition ? -1 : 1;
        return x->offset < y->offset ? -1 : x->offset > y->offset;
}

void wt_msgs_free(struct wt_msg *msgs, size_t n)
{
        for (size_t i = 0; i < n; i++) {
                free(msgs[i].key);
                free(msgs[i].value);
                for (size_t h = 0; h < msgs[i].nheaders; h++) {
                        free(msgs[i].names[h]);
                        free(msgs[i].values[h]);
                }
        }
        free(msgs);
}

const char *wt_header(const struct wt_msg *m, const char *name)
{
        const char *v = NULL;

        for (size_t i = 0; i < m->nheaders; i++) {
                if (strcmp(m->names[i], name) == 0)
                        v = m->values[i];
        }
        return v;
}

int wt_committed(struct wt_env *e, const char *suffix, int64_t *ret, int max)
{
        char topic[KAFKA_NAME_MAX];
        int64_t ends[16];
        int n = wt_ends(e, suffix, ends, 16);
        rd_kafka_topic_partition_list_t *list;
        rd_kafka_t *rk;

        assert_true(n > 0 && n <= max);
        wt_topic_name(e, suffix, topic, sizeof(topic));
        rk = wt_client(e, RD_KAFKA_CONSUMER, topic);
        list = rd_kafka_topic_partition_list_new(n);
        for (int p = 0; p < n; p++)
                rd_kafka_topic_partition_list_add(list, topic, p);
        assert_int_equal(rd_kafka_committed(rk, list, 10000), 0);
        for (int i = 0; i < list->cnt; i++)
                ret[list->elems[i].partition] = list->elems[i].offset;
        rd_kafka_topic_partition_list_destroy(list);
        rd_kafka_destroy(rk);
        return n;
}

void wt_wait_committed(struct wt_env *e, const char *suffix, int timeout_ms)
{
        int64_t deadline = util_now_monotonic_ms() + timeout_ms;

        for (;;) {
                int64_t ends[16], committed[16];
                int n = wt_ends(e, suffix, ends, 16);
                bool all = n > 0 && wt_committed(e, suffix, committed, 16) == n;

                for (int p = 0; all && p < n; p++) {
                        if (ends[p] > 0 && committed[p] != ends[p])
                                all = false;
                }
                if (all)
                        return;
                if (util_now_monotonic_ms() > deadline) {
                        for (int p = 0; p < n; p++)
                                printf("partition %d: end %" PRId64 " committed %" PRId64 "\n", p,
                                       ends[p], committed[p]);
                        fail_msg("group '%s.%s' did not commit everything in %d ms", e->prefix,
                                 suffix, timeout_ms);
                }
                util_sleep_ms(200);
        }
}

void wt_wait_group(struct wt_env *e, const char *suffix, int members, int timeout_ms)
{
        char group[KAFKA_NAME_MAX];
        rd_kafka_t *rk = wt_client(e, RD_KAFKA_PRODUCER, NULL);
        int64_t deadline = util_now_monotonic_ms() + timeout_ms;

        wt_topic_name(e, suffix, group, sizeof(group));
        for (;;) {
                const struct rd_kafka_group_list *gl = NULL;
                bool ok = false;

                if (rd_kafka_list_groups(rk, group, &gl, 5000) == 0 && gl->group_cnt == 1)
                        ok = strcmp(gl->groups[0].state, "Stable") == 0 &&
                             gl->groups[0].member_cnt == members;
                if (gl)
                        rd_kafka_group_list_destroy(gl);
                if (ok)
                        break;
                if (util_now_monotonic_ms() > deadline)
                        fail_msg("group '%s' not stable with %d members", group, members);
                util_sleep_ms(200);
        }
        rd_kafka_destroy(rk);
}

/* ---- sql ---------------------------------------------------------------------------- */

static long wt_vsql(struct wt_env *e, const char *fmt, va_list ap)
        __attribute__((format(printf, 2, 0)));

static long wt_vsql(struct wt_env *e, const char *fmt, va_list ap)
{
        char sql[2048];

        (void)vsnprintf(sql, sizeof(sql), fmt, ap);
        return pg_test_scalar(e->db, sql);
}

long wt_sql(struct wt_env *e, const char *fmt, ...)
{
        va_list ap;
        long v;

        va_start(ap, fmt);
        v = wt_vsql(e, fmt, ap);
        va_end(ap);
        return v;
}

void wt_wait_sql(struct wt_env *e, long expect, int timeout_ms, const char *fmt, ...)
{
        int64_t deadline = util_now_monotonic_ms() + timeout_ms;
        char sql[2048];
        va_list ap;

        va_start(ap, fmt);
        (void)vsnprintf(sql, sizeof(sql), fmt, ap);
        va_end(ap);
        for (;;) {
                long v = pg_test_scalar(e->db, sql);

                if (v == expect)
                        return;
                if (util_now_monotonic_ms() > deadline)
                        fail_msg("waited %d ms for %ld, got %ld: %s", timeout_ms, expect, v, sql);
                util_sleep_ms(100);
        }
}

/* A loopback port that was free a moment ago. */
uint16_t wt_free_port(void)
{
        struct sockaddr_in a = {.sin_family = AF_INET};
        socklen_t len = sizeof(a);
        int fd = socket(AF_INET, SOCK_STREAM, 0);

        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
        assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
        close(fd);
        return ntohs(a.sin_port);
}

static size_t wt_body_write(char *ptr, size_t size, size_t nmemb, void *userdata)
{
        char *body = userdata;
        size_t have = strlen(body), n = size * nmemb;

        if (have + n < 512) {
                memcpy(body + have, ptr, n);
                body[have + n] = '\0';
        }
        return n;
}

/* GET http://127.0.0.1:@port@path: the status (-1 when nothing answers), the body's start. */
long wt_http_get(uint16_t port, const char *path, char body[512])
{
        CURL *h = curl_easy_init();
        char url[128];
        long status = -1;

        body[0] = '\0';
        (void)snprintf(url, sizeof(url), "http://127.0.0.1:%u%s", (unsigned)port, path);
        curl_easy_setopt(h, CURLOPT_URL, url);
        curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 3000L);
        curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, wt_body_write);
        curl_easy_setopt(h, CURLOPT_WRITEDATA, body);
        if (curl_easy_perform(h) == CURLE_OK)
                curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_cleanup(h);
        return status;
}

/* Poll /readyz until it answers @want (and @want_text, unless NULL); returns the time taken. */
int64_t wt_wait_readyz(uint16_t port, pid_t worker, long want, const char *want_text,
                       int timeout_ms, char body[512])
{
        int64_t start = util_now_monotonic_ms();
        long status = -1;

        while (util_now_monotonic_ms() - start < timeout_ms) {
                status = wt_http_get(port, "/readyz", body);
                if (status == want && (!want_text || strstr(body, want_text)))
                        return util_now_monotonic_ms() - start;
                if (waitpid(worker, NULL, WNOHANG) == worker)
                        fail_msg("the worker exited while /readyz was expected to turn %ld", want);
                util_sleep_ms(250);
        }
        fail_msg("/readyz still answers %ld (%s) after %d ms, expected %ld%s%s", status, body,
                 timeout_ms, want, want_text ? " with " : "", want_text ? want_text : "");
        return -1;
}
