/*
 * The FSM engine against a real PostgreSQL, with real processes: crash (SIGKILL) in the
 * middle of every transition and resume, a race of several processes for one idempotency
 * key, lease expiry and takeover with fencing of the paused owner, retries with backoff,
 * permanent aborts, exhaustion, and replay of a failed key.
 *
 * The sample FSM has four transitions. Each step records that it was called in sample_calls
 * (autocommit: it survives a crash), and each transition's commit hook records its effect in
 * sample_effects (committed with the transition). "Exactly once" means one effect row per
 * transition, whatever crashed.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <json-c/json.h>

#include "common/err.h"
#include "common/util.h"
#include "db/db.h"
#include "helper_pg.h"
#include "helper_pgproxy.h"
#include "worker/fsm.h"
#include "worker/lease.h"

#define LEASE_MS 1200

struct sample {
        const char *hang_at; /* step that sleeps hang_ms before returning */
        int hang_ms;         /* < 0: forever */
        const char *fail_at; /* step that fails */
        int fail_errno;      /* negative errno returned by fail_at */
        int fail_times;      /* how many calls of fail_at fail (-1: all) */
        int fail_calls;
        int failures_recorded;               /* on_failure hook calls */
        const char *check_url;               /* after_failure reads the run's status here */
        char status_after_failure[16];       /* ... as another connection sees it */
        char error_after_failure[128];       /* ... and fsm_run_error() then */
        const char *arm_at;                  /* step that arms a COMMIT fault on g_proxy ... */
        enum pgproxy_commit_fault arm_fault; /* ... this one */
        bool cut_when_failing;               /* fail_at cuts g_proxy's connections first */
        const char *stop_at;                 /* step that asks for a graceful stop */
        bool stop_fails;                     /* ... and then fails with -EINTR, as a stage does */
        const char *wait_stop_at;            /* step that runs until told to stop */
        int64_t stopped_after_ms;            /* ... and how long that took */
};

/* For the tests that put a proxy between the engine and PostgreSQL. */
static struct pgproxy *g_proxy;
static atomic_int g_stop;

static int sample_step(struct fsm_run *run, void *userdata, const char *name)
{
        struct sample *s = userdata;
        const char *params[3] = {fsm_run_id(run), name, NULL};
        char pid[16];
        int r;

        (void)snprintf(pid, sizeof(pid), "%ld", (long)getpid());
        params[2] = pid;
        r = db_exec(fsm_run_db(run), NULL,
                    "INSERT INTO sample_calls (run_id, transition, pid) VALUES ($1, $2, $3)", 3,
                    params);
        if (r < 0)
                return r;
        if (s->arm_at && strcmp(s->arm_at, name) == 0)
                pgproxy_arm_commit(g_proxy, s->arm_fault);
        if (s->stop_at && strcmp(s->stop_at, name) == 0) {
                g_stop = 1;
                if (s->stop_fails)
                        return err_set(-EINTR, "sample step '%s' interrupted: stopping", name);
        }
        if (s->wait_stop_at && strcmp(s->wait_stop_at, name) == 0) {
                int64_t start = util_now_monotonic_ms();

                while (!fsm_run_should_stop(run) && util_now_monotonic_ms() - start < 20000)
                        util_sleep_ms(10);
                s->stopped_after_ms = util_now_monotonic_ms() - start;
        }
        if (s->hang_at && strcmp(s->hang_at, name) == 0) {
                if (s->hang_ms < 0)
                        for (;;)
                                pause();
                util_sleep_ms(s->hang_ms);
        }
        if (s->fail_at && strcmp(s->fail_at, name) == 0) {
                s->fail_calls++;
                if (s->fail_times < 0 || s->fail_calls <= s->fail_times) {
                        if (s->cut_when_failing)
                                pgproxy_cut(g_proxy);
                        return err_set(s->fail_errno, "sample step '%s' failed on purpose", name);
                }
        }
        json_object_object_add(fsm_run_response(run), name, json_object_new_boolean(1));
        return 0;
}

static int sample_commit(struct fsm_run *run, struct db *db, const char *name)
{
        const char *params[2] = {fsm_run_id(run), name};

        return db_exec(db, NULL, "INSERT INTO sample_effects (run_id, transition) VALUES ($1, $2)",
                       2, params);
}

#define SAMPLE_TRANSITION(n)                                                                       \
        static int step_##n(struct fsm_run *run, void *u)                                          \
        {                                                                                          \
                return sample_step(run, u, #n);                                                    \
        }                                                                                          \
        static int commit_##n(struct fsm_run *run, struct db *db, void *u)                         \
        {                                                                                          \
                (void)u;                                                                           \
                return sample_commit(run, db, #n);                                                 \
        }

SAMPLE_TRANSITION(a)
SAMPLE_TRANSITION(b)
SAMPLE_TRANSITION(c)
SAMPLE_TRANSITION(d)

static int sample_on_failure(struct fsm_run *run, struct db *db, void *userdata)
{
        struct sample *s = userdata;

        (void)run;
        (void)db;
        s->failures_recorded++;
        return 0;
}

/* What another connection sees of the run once the failure hook after the commit runs. */
static void sample_after_failure(struct fsm_run *run, void *userdata)
{
        struct sample *s = userdata;
        struct db *db = NULL;
        PGresult *res = NULL;

        (void)snprintf(s->error_after_failure, sizeof(s->error_after_failure), "%s",
                       fsm_run_error(run));
        if (!s->check_url || db_connect(s->check_url, &db) < 0)
                return;
        if (db_query_row(db, &res, "SELECT status FROM fsm_runs WHERE run_id = $1", 1,
                         (const char *const[]){fsm_run_id(run)}) > 0) {
                (void)snprintf(s->status_after_failure, sizeof(s->status_after_failure), "%s",
                               db_get(res, 0, 0));
                PQclear(res);
        }
        db_free(db);
}

static const struct fsm_transition sample_transitions[] = {
        {"a", step_a, commit_a},
        {"b", step_b, commit_b},
        {"c", step_c, commit_c},
        {"d", step_d, commit_d},
};

static const struct fsm_def sample_fsm = {
        .name = "sample",
        .transitions = sample_transitions,
        .transition_count = 4,
        .on_failure = sample_on_failure,
        .after_failure = sample_after_failure,
};

struct env {
        char url[512];
        struct db *db;
};

static int setup(void **state)
{
        struct env *e = calloc(1, sizeof(*e));

        pg_test_create(e->url, sizeof(e->url));
        e->db = pg_test_connect(e->url);
        assert_int_equal(
                db_exec_script(e->db, "CREATE TABLE sample_calls (run_id text, transition text,"
                                      " pid int, at timestamptz DEFAULT clock_timestamp());"
                                      "CREATE TABLE sample_effects (run_id text, transition text)"),
                0);
        *state = e;
        return 0;
}

static int teardown(void **state)
{
        struct env *e = *state;

        db_free(e->db);
        pg_test_drop(e->url);
        free(e);
        return 0;
}

static struct fsm_options sample_options(struct lease_keeper *leases, const char *worker)
{
        struct fsm_options o = {
                .host_id = "test-host",
                .worker_id = worker,
                .subject = "sample-image",
                .max_attempts = 5,
                .retry_base_ms = 100,
                .retry_max_ms = 400,
                .leases = leases,
                .stop = &g_stop,
        };
        return o;
}

/* Execute once with a fresh connection to @db_url and a lease keeper on @keeper_url. */
static int sample_execute_via(const char *db_url, const char *keeper_url, const char *key,
                              struct sample *s, struct fsm_result *res)
{
        struct db *db = pg_test_connect(db_url);
        struct lease_keeper *leases = NULL;
        struct fsm_options o;
        int r;

        assert_int_equal(lease_keeper_new(keeper_url, LEASE_MS, &leases), 0);
        o = sample_options(leases, "test-worker");
        r = fsm_execute(db, &sample_fsm, &o, key, "{\"image_id\":\"sample-image\"}", s, res);
        lease_keeper_free(leases);
        db_free(db);
        return r;
}

/* Execute once in this process with a fresh connection and lease keeper. */
static int sample_execute(const char *url, const char *key, struct sample *s,
                          struct fsm_result *res)
{
        return sample_execute_via(url, url, key, s, res);
}

/* Keep executing while another worker holds the run, up to a deadline. */
static void sample_execute_until_not_busy(const char *url, const char *key, struct sample *s,
                                          struct fsm_result *res)
{
        int64_t deadline = util_now_monotonic_ms() + 15000;

        for (;;) {
                assert_int_equal(sample_execute(url, key, s, res), 0);
                if (res->outcome != FSM_OUTCOME_BUSY)
                        return;
                fsm_result_done(res);
                assert_true(util_now_monotonic_ms() < deadline);
                util_sleep_ms(200);
        }
}

/* Whether a response JSON document has @field set to true. */
static bool response_has(const char *json, const char *field)
{
        struct json_object *o = json_tokener_parse(json), *v = NULL;
        bool yes = o && json_object_object_get_ex(o, field, &v) && json_object_get_boolean(v);

        json_object_put(o);
        return yes;
}

static long count_where(struct db *db, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static long count_where(struct db *db, const char *fmt, ...)
{
        char sql[512];
        va_list ap;

        va_start(ap, fmt);
        (void)vsnprintf(sql, sizeof(sql), fmt, ap);
        va_end(ap);
        return pg_test_scalar(db, sql);
}

/* Fork a worker that hangs inside @transition; return once it is there. */
static pid_t spawn_hanging_worker(struct env *e, const char *key, const char *transition,
                                  int hang_ms)
{
        pid_t pid = fork();
        int64_t deadline;

        assert_true(pid >= 0);
        if (pid == 0) {
                struct sample s = {.hang_at = transition, .hang_ms = hang_ms};
                struct fsm_result res;

                if (sample_execute(e->url, key, &s, &res) < 0)
                        _exit(100);
                _exit(res.outcome);
        }
        deadline = util_now_monotonic_ms() + 15000;
        while (count_where(e->db,
                           "SELECT count(*) FROM sample_calls c JOIN fsm_runs r USING (run_id)"
                           " WHERE r.idempotency_key = '%s' AND c.transition = '%s'",
                           key, transition) == 0) {
                assert_true(util_now_monotonic_ms() < deadline);
                util_sleep_ms(20);
        }
        return pid;
}

static void test_fsm_crash_at_every_transition_resumes_exactly_once(void **state)
{
        struct env *e = *state;

        for (size_t k = 0; k < sample_fsm.transition_count; k++) {
                const char *name = sample_transitions[k].name;
                char key[64];
                struct sample s = {0};
                struct fsm_result res;
                int status;
                pid_t pid;

                (void)snprintf(key, sizeof(key), "crash-at-%s", name);
                pid = spawn_hanging_worker(e, key, name, -1);
                assert_int_equal(kill(pid, SIGKILL), 0);
                assert_int_equal(waitpid(pid, &status, 0), pid);
                assert_true(WIFSIGNALED(status));

                /* While the dead worker's lease lasts, the run is busy; then it resumes. */
                sample_execute_until_not_busy(e->url, key, &s, &res);
                assert_int_equal(res.outcome, FSM_OUTCOME_COMPLETE);
                assert_int_equal(res.attempts, 2);
                assert_true(response_has(res.response, "d"));

                for (size_t t = 0; t < sample_fsm.transition_count; t++) {
                        const char *tn = sample_transitions[t].name;

                        assert_int_equal(count_where(e->db,
                                                     "SELECT count(*) FROM sample_effects WHERE"
                                                     " run_id = '%s' AND transition = '%s'",
                                                     res.run_id, tn),
                                         1);
                        /* Only the transition that was interrupted ran twice. */
                        assert_int_equal(count_where(e->db,
                                                     "SELECT count(*) FROM sample_calls WHERE"
                                                     " run_id = '%s' AND transition = '%s'",
                                                     res.run_id, tn),
                                         t == k ? 2 : 1);
                }
                assert_int_equal(count_where(e->db,
                                             "SELECT count(*) FROM fsm_events WHERE run_id = '%s'"
                                             " AND kind = '%s'",
                                             res.run_id, "resume"),
                                 1);
                assert_int_equal(count_where(e->db,
                                             "SELECT count(*) FROM fsm_runs WHERE"
                                             " idempotency_key = '%s' AND status = '%s'",
                                             key, "complete"),
                                 1);
                fsm_result_done(&res);
        }
}

static void test_fsm_racing_processes_run_one_key_once(void **state)
{
        struct env *e = *state;
        enum { N = 4 };
        pid_t pids[N];
        int outcomes[5] = {0};
        struct fsm_result res;
        struct sample s = {0};

        for (int i = 0; i < N; i++) {
                pids[i] = fork();
                assert_true(pids[i] >= 0);
                if (pids[i] == 0) {
                        struct sample cs = {.hang_at = "b", .hang_ms = 1500};
                        struct fsm_result cres;

                        if (sample_execute(e->url, "race-key", &cs, &cres) < 0)
                                _exit(100);
                        _exit(cres.outcome);
                }
        }
        for (int i = 0; i < N; i++) {
                int status;

                assert_int_equal(waitpid(pids[i], &status, 0), pids[i]);
                assert_true(WIFEXITED(status) && WEXITSTATUS(status) < 5);
                outcomes[WEXITSTATUS(status)]++;
        }
        assert_int_equal(outcomes[FSM_OUTCOME_COMPLETE], 1);
        assert_int_equal(outcomes[FSM_OUTCOME_BUSY], N - 1);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM fsm_runs WHERE idempotency_key = '%s'%s",
                                     "race-key", ""),
                         1);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM sample_effects e JOIN fsm_runs r USING"
                                     " (run_id) WHERE r.idempotency_key = '%s'%s",
                                     "race-key", ""),
                         4);

        /* Afterwards the key is complete: nothing runs, the response comes back. */
        assert_int_equal(sample_execute(e->url, "race-key", &s, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_ALREADY_COMPLETE);
        assert_true(response_has(res.response, "a"));
        fsm_result_done(&res);
}

/*
 * A complete key is answered from one read, without the claim's row lock: while another
 * transaction holds that lock, a repeat still returns at once (with lock_timeout set, the
 * locking claim would fail instead), with the run id and response of the finished run.
 */
static void test_fsm_complete_key_answers_without_its_lock(void **state)
{
        struct env *e = *state;
        struct lease_keeper *leases = NULL;
        struct fsm_result first, again;
        struct sample s = {0};
        struct fsm_options o;
        struct db *db;

        assert_int_equal(sample_execute(e->url, "fast-key", &s, &first), 0);
        assert_int_equal(first.outcome, FSM_OUTCOME_COMPLETE);

        assert_int_equal(db_exec_script(e->db, "BEGIN"), 0);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM (SELECT 1 FROM idempotency_keys"
                                     " WHERE key = '%s' FOR UPDATE%s) k",
                                     "fast-key", ""),
                         1);
        db = pg_test_connect(e->url);
        assert_int_equal(db_exec_script(db, "SET lock_timeout = '1s'"), 0);
        assert_int_equal(lease_keeper_new(e->url, LEASE_MS, &leases), 0);
        o = sample_options(leases, "test-worker");
        assert_int_equal(fsm_execute(db, &sample_fsm, &o, "fast-key",
                                     "{\"image_id\":\"sample-image\"}", &s, &again),
                         0);
        assert_int_equal(again.outcome, FSM_OUTCOME_ALREADY_COMPLETE);
        assert_string_equal(again.run_id, first.run_id);
        assert_true(response_has(again.response, "d"));
        assert_int_equal(db_exec_script(e->db, "ROLLBACK"), 0);
        lease_keeper_free(leases);
        db_free(db);
        fsm_result_done(&first);
        fsm_result_done(&again);
}

static void test_fsm_lease_expiry_takeover_fences_paused_owner(void **state)
{
        struct env *e = *state;
        struct sample s = {0};
        struct fsm_result res;
        int status;
        pid_t pid;

        /* The owner sits in b for 4 s; we freeze it so that its lease lapses. */
        pid = spawn_hanging_worker(e, "pause-key", "b", 4000);
        assert_int_equal(kill(pid, SIGSTOP), 0);
        sample_execute_until_not_busy(e->url, "pause-key", &s, &res);
        assert_int_equal(res.outcome, FSM_OUTCOME_COMPLETE);

        /* The old owner wakes up, finishes its step, and must not record anything. */
        assert_int_equal(kill(pid, SIGCONT), 0);
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFEXITED(status));
        assert_int_equal(WEXITSTATUS(status), FSM_OUTCOME_INTERRUPTED);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM sample_effects WHERE run_id = '%s'%s",
                                     res.run_id, ""),
                         4);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM fsm_runs WHERE run_id = '%s'"
                                     " AND status = '%s'",
                                     res.run_id, "complete"),
                         1);
        fsm_result_done(&res);
}

/*
 * How long each retry waited, from the database's own clock: the "retry in N ms" event and
 * the transition_start that followed it. Returns the number of retries found.
 */
static int retry_gaps(struct db *db, const char *run_id, int64_t *ret_delay, double *ret_gap,
                      int max)
{
        PGresult *res = NULL;
        int n;

        assert_int_equal(db_exec(db, &res,
                                 "SELECT r.detail, extract(epoch FROM s.at - r.at) * 1000"
                                 " FROM fsm_events r CROSS JOIN LATERAL"
                                 " (SELECT at FROM fsm_events s WHERE s.run_id = r.run_id"
                                 "  AND s.id > r.id AND s.kind = 'transition_start'"
                                 "  ORDER BY s.id LIMIT 1) s"
                                 " WHERE r.run_id = $1 AND r.kind = 'retry' ORDER BY r.id",
                                 1, (const char *const[]){run_id}),
                         0);
        n = PQntuples(res);
        assert_true(n <= max);
        for (int i = 0; i < n; i++) {
                long long delay;

                assert_int_equal(sscanf(db_get(res, i, 0), "retry in %lld ms", &delay), 1);
                ret_delay[i] = delay;
                ret_gap[i] = strtod(db_get(res, i, 1), NULL);
        }
        PQclear(res);
        return n;
}

static void test_fsm_transient_errors_retry_with_backoff(void **state)
{
        /* Slack for one short transaction between the end of a sleep and the next event. */
        const double epsilon_ms = 100;
        struct env *e = *state;
        struct sample s = {.fail_at = "c", .fail_errno = -ECONNRESET, .fail_times = 4};
        struct fsm_result res;
        int64_t delay[8];
        double gap[8], fraction[8];
        int n, distinct = 0;

        assert_int_equal(sample_execute(e->url, "retry-key", &s, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_COMPLETE);
        assert_int_equal(res.attempts, 5);
        n = retry_gaps(e->db, res.run_id, delay, gap, 8);
        assert_int_equal(n, 4);
        for (int i = 0; i < n; i++) {
                /* Nominal delay d of retry i+1 with base 100 ms, cap 400 ms: 100, 200, 400, 400. */
                int64_t d = 100 << i > 400 ? 400 : 100 << i;

                if (delay[i] < d / 2 || delay[i] > d)
                        fail_msg("retry %d: delay %lld ms outside [%lld, %lld]", i + 1,
                                 (long long)delay[i], (long long)(d / 2), (long long)d);
                /*
                 * The engine really waited that long (less 2 ms: it counts whole milliseconds,
                 * the server microseconds), and not much longer.
                 */
                if (gap[i] < (double)delay[i] - 2 || gap[i] > (double)delay[i] + epsilon_ms)
                        fail_msg("retry %d: waited %.1f ms for a delay of %lld ms", i + 1, gap[i],
                                 (long long)delay[i]);
                fraction[i] = (double)(delay[i] - d / 2) / (double)(d / 2);
        }
        /* The random half varies: without jitter every fraction would be the same. */
        for (int i = 1; i < n; i++) {
                if (fraction[i] != fraction[0])
                        distinct++;
        }
        assert_true(distinct > 0);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM sample_effects WHERE run_id = '%s'%s",
                                     res.run_id, ""),
                         4);
        fsm_result_done(&res);
}

static void test_fsm_permanent_error_aborts_then_replay_runs_again(void **state)
{
        struct env *e = *state;
        struct sample bad = {
                .fail_at = "b", .fail_errno = -EINVAL, .fail_times = -1, .check_url = e->url};
        struct sample good = {0};
        struct fsm_result res, again;

        assert_int_equal(sample_execute(e->url, "abort-key", &bad, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_FAILED);
        assert_true(res.permanent);
        assert_int_equal(res.error, -EINVAL);
        assert_int_equal(res.attempts, 1);
        assert_int_equal(bad.fail_calls, 1);
        assert_int_equal(bad.failures_recorded, 1);
        assert_non_null(strstr(res.error_text, "failed on purpose"));
        /* The hook for device-mapper work runs once the failure is visible to everybody. */
        assert_string_equal(bad.status_after_failure, "aborted");
        assert_non_null(strstr(bad.error_after_failure, "failed on purpose"));
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM fsm_runs WHERE run_id = '%s'"
                                     " AND status = '%s' AND error_class = 'permanent'",
                                     res.run_id, "aborted"),
                         1);

        /* A replay of the same request gets a new run that replaces the failed one. */
        assert_int_equal(sample_execute(e->url, "abort-key", &good, &again), 0);
        assert_int_equal(again.outcome, FSM_OUTCOME_COMPLETE);
        assert_string_not_equal(again.run_id, res.run_id);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM fsm_events WHERE run_id = '%s'"
                                     " AND detail LIKE 'replaces failed run %s'",
                                     again.run_id, res.run_id),
                         1);
        fsm_result_done(&res);
        fsm_result_done(&again);
}

static void test_fsm_exhausts_attempts(void **state)
{
        struct env *e = *state;
        struct sample s = {.fail_at = "a", .fail_errno = -ETIMEDOUT, .fail_times = -1};
        struct fsm_result res;

        assert_int_equal(sample_execute(e->url, "exhaust-key", &s, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_FAILED);
        assert_false(res.permanent);
        assert_int_equal(res.attempts, 5);
        assert_int_equal(s.fail_calls, 5);
        assert_true(res.first_failure_ms > 0 && res.last_failure_ms >= res.first_failure_ms);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM fsm_runs WHERE run_id = '%s'"
                                     " AND status = '%s' AND error_class = 'transient'",
                                     res.run_id, "failed"),
                         1);
        fsm_result_done(&res);
}

/*
 * A run used up by interruptions across processes: the first worker's first attempt fails
 * (transiently), its second hangs and the worker is killed; the run has no attempt left, so
 * the next worker's takeover fails it at once. Its first failure is the first worker's error,
 * from the run's history, and its last the final failure: not both "now", which is all the
 * last worker saw itself.
 */
static void test_fsm_interrupted_run_dates_its_first_failure(void **state)
{
        struct env *e = *state;
        struct sample s = {0};
        struct fsm_result res;
        int64_t deadline;
        pid_t pid = fork();

        assert_true(pid >= 0);
        if (pid == 0) {
                struct sample dies = {.fail_at = "a",
                                      .fail_errno = -ETIMEDOUT,
                                      .fail_times = 1,
                                      .hang_at = "b",
                                      .hang_ms = -1};

                (void)sample_execute(e->url, "interrupted-key", &dies, &res);
                _exit(100);
        }
        deadline = util_now_monotonic_ms() + 15000;
        while (count_where(e->db, "SELECT count(*) FROM sample_calls WHERE transition = '%s'",
                           "b") == 0) {
                assert_true(util_now_monotonic_ms() < deadline);
                util_sleep_ms(20);
        }
        assert_int_equal(kill(pid, SIGKILL), 0);
        assert_int_equal(waitpid(pid, NULL, 0), pid);
        /* Its retry made this attempt 2: the takeover's attempt 3 is one too many. */
        assert_int_equal(count_where(e->db,
                                     "WITH u AS (UPDATE fsm_runs SET max_attempts = 2"
                                     " WHERE attempt = 2 RETURNING 1) SELECT count(*) FROM u"),
                         1);

        sample_execute_until_not_busy(e->url, "interrupted-key", &s, &res);
        assert_int_equal(res.outcome, FSM_OUTCOME_FAILED);
        assert_false(res.permanent);
        assert_non_null(strstr(res.error_text, "interrupted"));
        assert_int_equal(s.fail_calls, 0);
        assert_int_equal(res.first_failure_ms,
                         count_where(e->db,
                                     "SELECT (extract(epoch FROM min(at)) * 1000)::bigint"
                                     " FROM fsm_events WHERE run_id = '%s' AND kind = 'error'",
                                     res.run_id));
        assert_int_equal(res.last_failure_ms,
                         count_where(e->db,
                                     "SELECT (extract(epoch FROM max(at)) * 1000)::bigint"
                                     " FROM fsm_events WHERE run_id = '%s' AND kind = 'fail'",
                                     res.run_id));
        /* The lease had to lapse in between. */
        assert_true(res.last_failure_ms - res.first_failure_ms >= LEASE_MS / 2);
        fsm_result_done(&res);
}

/* ---- the database connection fails under the engine ------------------------------------ */

/* Check the run of @res: complete, one effect and @calls_b step calls of b, no takeover. */
static void assert_clean_completion(struct env *e, const struct fsm_result *res, int attempts)
{
        assert_int_equal(res->outcome, FSM_OUTCOME_COMPLETE);
        assert_int_equal(res->attempts, attempts);
        for (size_t t = 0; t < sample_fsm.transition_count; t++)
                assert_int_equal(count_where(e->db,
                                             "SELECT count(*) FROM sample_effects WHERE"
                                             " run_id = '%s' AND transition = '%s'",
                                             res->run_id, sample_transitions[t].name),
                                 1);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM fsm_events WHERE run_id = '%s'"
                                     " AND kind = '%s'",
                                     res->run_id, "resume"),
                         0);
}

/*
 * The claim's COMMIT went through but its reply was lost (or it never arrived): the engine
 * finds out which, instead of claiming again and finding its own live lease (BUSY).
 */
static void test_fsm_lost_commit_of_claim_is_resolved(void **state)
{
        static const enum pgproxy_commit_fault faults[] = {PGPROXY_COMMIT_DROP_AFTER,
                                                           PGPROXY_COMMIT_DROP_BEFORE};
        struct env *e = *state;
        char purl[600];

        g_proxy = pgproxy_start(e->url);
        pgproxy_url(g_proxy, e->url, purl, sizeof(purl));
        for (size_t i = 0; i < 2; i++) {
                struct sample s = {0};
                struct fsm_result res;
                char key[32];

                (void)snprintf(key, sizeof(key), "lost-claim-%zu", i);
                /* The first COMMIT of an execution is the claim's. */
                pgproxy_arm_commit(g_proxy, faults[i]);
                assert_int_equal(sample_execute_via(purl, e->url, key, &s, &res), 0);
                assert_true(pgproxy_commit_fault_done(g_proxy));
                assert_clean_completion(e, &res, 1);
                assert_int_equal(count_where(e->db,
                                             "SELECT count(*) FROM fsm_runs WHERE"
                                             " idempotency_key = '%s'%s",
                                             key, ""),
                                 1);
                assert_int_equal(count_where(e->db,
                                             "SELECT count(*) FROM fsm_events WHERE run_id = '%s'"
                                             " AND kind = '%s'",
                                             res.run_id, "start"),
                                 1);
                fsm_result_done(&res);
        }
        pgproxy_stop(g_proxy);
        g_proxy = NULL;
}

/*
 * A transition's completion committed but its reply was lost (or it was not committed): the
 * engine looks for its own transition_complete event, so the effect is recorded once and the
 * step is not run again.
 */
static void test_fsm_lost_commit_of_completion_is_resolved(void **state)
{
        static const struct {
                const char *at;
                enum pgproxy_commit_fault fault;
        } cases[] = {
                {"b", PGPROXY_COMMIT_DROP_AFTER},
                {"d", PGPROXY_COMMIT_DROP_AFTER}, /* the last one also completes the run */
                {"b", PGPROXY_COMMIT_DROP_BEFORE},
        };
        struct env *e = *state;
        char purl[600];

        g_proxy = pgproxy_start(e->url);
        pgproxy_url(g_proxy, e->url, purl, sizeof(purl));
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                /* Armed inside the step: the next COMMIT is that transition's completion. */
                struct sample s = {.arm_at = cases[i].at, .arm_fault = cases[i].fault};
                struct fsm_result res;
                char key[32];

                (void)snprintf(key, sizeof(key), "lost-complete-%zu", i);
                assert_int_equal(sample_execute_via(purl, e->url, key, &s, &res), 0);
                assert_true(pgproxy_commit_fault_done(g_proxy));
                assert_clean_completion(e, &res, 1);
                for (size_t t = 0; t < sample_fsm.transition_count; t++)
                        assert_int_equal(count_where(e->db,
                                                     "SELECT count(*) FROM sample_calls WHERE"
                                                     " run_id = '%s' AND transition = '%s'",
                                                     res.run_id, sample_transitions[t].name),
                                         1);
                assert_int_equal(count_where(e->db,
                                             "SELECT count(*) FROM fsm_events WHERE run_id = '%s'"
                                             " AND kind = '%s'",
                                             res.run_id, "transition_complete"),
                                 4);
                fsm_result_done(&res);
        }
        pgproxy_stop(g_proxy);
        g_proxy = NULL;
}

/*
 * One dropped connection between transactions costs a reconnect, not a lease timeout and an
 * attempt: the transition_start event, the retry record and the release on shutdown all
 * reconnect and retry like transactions do.
 */
static void test_fsm_dropped_connection_costs_no_attempt(void **state)
{
        struct env *e = *state;
        char purl[600];
        struct fsm_result res;
        int64_t start;

        g_proxy = pgproxy_start(e->url);
        pgproxy_url(g_proxy, e->url, purl, sizeof(purl));
        {
                /* b's completion commits, then the connection drops before c's start event. */
                struct sample s = {.arm_at = "b", .arm_fault = PGPROXY_COMMIT_CUT_AFTER_REPLY};

                start = util_now_monotonic_ms();
                assert_int_equal(sample_execute_via(purl, e->url, "drop-start", &s, &res), 0);
                assert_true(pgproxy_commit_fault_done(g_proxy));
                assert_clean_completion(e, &res, 1);
                assert_true(util_now_monotonic_ms() - start < LEASE_MS);
                fsm_result_done(&res);
        }
        {
                /* c fails transiently, and the connection is gone when the retry is recorded. */
                struct sample s = {.fail_at = "c",
                                   .fail_errno = -ECONNRESET,
                                   .fail_times = 1,
                                   .cut_when_failing = true};

                assert_int_equal(sample_execute_via(purl, e->url, "drop-retry", &s, &res), 0);
                assert_clean_completion(e, &res, 2);
                assert_int_equal(count_where(e->db,
                                             "SELECT count(*) FROM fsm_events WHERE run_id = '%s'"
                                             " AND kind = '%s'",
                                             res.run_id, "retry"),
                                 1);
                fsm_result_done(&res);
        }
        {
                /* Shutdown after b; the connection drops before the run is released. */
                struct sample s = {
                        .stop_at = "b", .arm_at = "b", .arm_fault = PGPROXY_COMMIT_CUT_AFTER_REPLY};

                g_stop = 0;
                assert_int_equal(sample_execute_via(purl, e->url, "drop-release", &s, &res), 0);
                g_stop = 0;
                assert_int_equal(res.outcome, FSM_OUTCOME_INTERRUPTED);
                assert_int_equal(count_where(e->db,
                                             "SELECT count(*) FROM fsm_runs WHERE run_id = '%s'"
                                             " AND lease_owner IS NULL AND status = '%s'",
                                             res.run_id, "running"),
                                 1);
                assert_int_equal(count_where(e->db,
                                             "SELECT count(*) FROM fsm_events WHERE run_id = '%s'"
                                             " AND kind = '%s'",
                                             res.run_id, "release"),
                                 1);
                fsm_result_done(&res);

                /* Released, so the next worker resumes at once, without an attempt. */
                s = (struct sample){0};
                assert_int_equal(sample_execute(e->url, "drop-release", &s, &res), 0);
                assert_int_equal(res.outcome, FSM_OUTCOME_COMPLETE);
                assert_int_equal(res.attempts, 1);
                fsm_result_done(&res);
        }
        pgproxy_stop(g_proxy);
        g_proxy = NULL;
}

struct lease_thread {
        const char *url;
        struct lease_keeper *leases;
        struct sample s;
        struct fsm_result res;
        int r;
};

static void *lease_thread_main(void *arg)
{
        struct lease_thread *t = arg;
        struct db *db = NULL;
        struct fsm_options o = sample_options(t->leases, "test-worker");

        if (db_connect(t->url, &db) < 0) {
                t->r = -ECONNREFUSED;
                return NULL;
        }
        t->r = fsm_execute(db, &sample_fsm, &o, "lease-loss", "{\"image_id\":\"sample-image\"}",
                           &t->s, &t->res);
        db_free(db);
        return NULL;
}

struct add_remove {
        struct lease_keeper *leases;
        bool done;
};

static void *add_remove_main(void *arg)
{
        struct add_remove *a = arg;
        struct lease *extra = NULL;

        if (lease_keeper_add(a->leases, "01JABCDEFGHJKMNPQRSTVWXYZ0", "other",
                             util_now_monotonic_ms(), &extra) == 0)
                lease_keeper_remove(a->leases, extra);
        a->done = true;
        return NULL;
}

/*
 * How long registering and removing a lease takes, from another thread, as a worker thread
 * does it; if it blocks for a second, unblock the keeper (so the test ends) and fail.
 */
static int64_t add_remove_took_ms(struct lease_keeper *leases)
{
        struct add_remove a = {leases, false};
        int64_t start = util_now_monotonic_ms();
        struct timespec until;
        pthread_t thread;
        int r;

        assert_int_equal(pthread_create(&thread, NULL, add_remove_main, &a), 0);
        (void)clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 1;
        r = pthread_timedjoin_np(thread, NULL, &until);
        if (r == ETIMEDOUT) {
                pgproxy_set_mode(g_proxy, PGPROXY_PASS);
                pgproxy_cut(g_proxy);
                assert_int_equal(pthread_join(thread, NULL), 0);
                fail_msg(
                        "lease_keeper_add/remove blocked while the keeper waited for the database");
        }
        assert_int_equal(r, 0);
        assert_true(a.done);
        return util_now_monotonic_ms() - start;
}

/*
 * The lease keeper cannot reach the database (it hangs, or it refuses connections) while
 * the engine can: no extension succeeds, so within a lease duration the lease counts as lost
 * and the run stops, as it would after a takeover, leaving the run to whoever takes it next.
 * Meanwhile registering and removing leases never waits for the stuck keeper.
 */
static void test_fsm_lease_lost_when_database_unreachable(void **state)
{
        static const enum pgproxy_mode modes[] = {PGPROXY_BLACKHOLE, PGPROXY_REFUSE};
        struct env *e = *state;
        char purl[600];

        for (size_t m = 0; m < 2; m++) {
                struct lease_thread t = {.url = e->url, .s = {.wait_stop_at = "b"}};
                struct fsm_result again;
                struct sample s = {0};
                pthread_t thread;
                int64_t cut, took;

                assert_int_equal(db_exec_script(e->db, "TRUNCATE fsm_events, idempotency_keys,"
                                                       " fsm_runs, sample_calls, sample_effects"),
                                 0);
                g_proxy = pgproxy_start(e->url);
                pgproxy_url(g_proxy, e->url, purl, sizeof(purl));
                assert_int_equal(lease_keeper_new(purl, LEASE_MS, &t.leases), 0);
                assert_int_equal(pthread_create(&thread, NULL, lease_thread_main, &t), 0);
                while (count_where(e->db,
                                   "SELECT count(*) FROM sample_calls WHERE transition = '%s'%s",
                                   "b", "") == 0)
                        util_sleep_ms(10);
                pgproxy_set_mode(g_proxy, modes[m]);
                cut = util_now_monotonic_ms();

                /* After the keeper's next tick it is stuck (or failing); add/remove are not. */
                util_sleep_ms(LEASE_MS / 3 + 200);
                took = add_remove_took_ms(t.leases);
                if (took > 100)
                        fail_msg("lease_keeper_add/remove waited %lld ms for the keeper",
                                 (long long)took);

                assert_int_equal(pthread_join(thread, NULL), 0);
                took = util_now_monotonic_ms() - cut;
                assert_int_equal(t.r, 0);
                assert_int_equal(t.res.outcome, FSM_OUTCOME_INTERRUPTED);
                /* Lost between 2/3 and 1 lease duration after the last extension. */
                if (took < LEASE_MS / 2 || took > LEASE_MS + 400)
                        fail_msg("mode %zu: the run stopped %lld ms after the database went away",
                                 m, (long long)took);
                assert_true(t.s.stopped_after_ms < 20000);
                /* Nothing recorded after the loss: b is not complete, the lease not released. */
                assert_int_equal(count_where(e->db,
                                             "SELECT count(*) FROM fsm_runs WHERE run_id = '%s'"
                                             " AND next_transition = 1 AND lease_owner LIKE '%s'",
                                             t.res.run_id, "test-worker/%"),
                                 1);
                pgproxy_set_mode(g_proxy, PGPROXY_PASS);
                pgproxy_cut(g_proxy); /* unblocks the keeper's call, so that it can stop */
                lease_keeper_free(t.leases);
                pgproxy_stop(g_proxy);
                g_proxy = NULL;

                /* Whoever comes next takes the run over once the lease has lapsed. */
                sample_execute_until_not_busy(e->url, "lease-loss", &s, &again);
                assert_int_equal(again.outcome, FSM_OUTCOME_COMPLETE);
                assert_string_equal(again.run_id, t.res.run_id);
                assert_int_equal(again.attempts, 2);
                assert_int_equal(count_where(e->db,
                                             "SELECT count(*) FROM sample_effects WHERE"
                                             " run_id = '%s'%s",
                                             again.run_id, ""),
                                 4);
                fsm_result_done(&again);
                fsm_result_done(&t.res);
        }
}

/*
 * A lease owner that does not fit is refused, not truncated: a truncated owner would never
 * match its own lease. The longest HOST_ID config allows still fits (static assertion in
 * fsm.c); this is what happens past it.
 */
static void test_fsm_long_owner_is_refused(void **state)
{
        struct env *e = *state;
        struct lease_keeper *leases = NULL;
        struct lease *lease = NULL;
        struct fsm_options o;
        struct fsm_result res;
        char worker[LEASE_OWNER_MAX + 2];
        struct sample s = {0};

        memset(worker, 'w', sizeof(worker) - 1);
        worker[sizeof(worker) - 1] = '\0';
        assert_int_equal(lease_keeper_new(e->url, LEASE_MS, &leases), 0);
        assert_int_equal(lease_keeper_add(leases, "01JABCDEFGHJKMNPQRSTVWXYZ0", worker,
                                          util_now_monotonic_ms(), &lease),
                         -ENAMETOOLONG);
        worker[LEASE_OWNER_MAX] = '\0';
        assert_int_equal(lease_keeper_add(leases, "01JABCDEFGHJKMNPQRSTVWXYZ0", worker,
                                          util_now_monotonic_ms(), &lease),
                         0);
        lease_keeper_remove(leases, lease);

        /* The engine adds "/<token>" to the worker id: one that leaves no room is refused. */
        worker[LEASE_OWNER_MAX - 10] = '\0';
        o = sample_options(leases, worker);
        assert_int_equal(fsm_execute(e->db, &sample_fsm, &o, "long-owner", "{}", &s, &res),
                         -ENAMETOOLONG);
        assert_non_null(strstr(err_last(), "too long for a lease owner"));
        assert_int_equal(count_where(e->db, "SELECT count(*) FROM fsm_runs%s%s", "", ""), 0);
        /*
         * The longest that fits, through a step that outlasts two lease durations: only
         * extensions that match the owner in full keep the lease from being lost.
         */
        worker[LEASE_OWNER_MAX - 11] = '\0';
        o = sample_options(leases, worker);
        s.hang_at = "b";
        s.hang_ms = 2 * LEASE_MS;
        assert_int_equal(fsm_execute(e->db, &sample_fsm, &o, "long-owner", "{}", &s, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_COMPLETE);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM fsm_events WHERE run_id = '%s'"
                                     " AND length(worker) = %d",
                                     res.run_id, LEASE_OWNER_MAX),
                         10);
        fsm_result_done(&res);
        lease_keeper_free(leases);
}

/*
 * A step that gives up because the worker is stopping (-EINTR) has not failed: on the run's
 * last attempt it is neither retried nor failed as exhausted; the run is released, keeps its
 * attempt count, and the next worker resumes it at that step at once.
 */
static void test_fsm_step_cut_short_by_shutdown_costs_no_attempt(void **state)
{
        struct env *e = *state;
        struct sample s = {.stop_at = "b", .stop_fails = true};
        struct lease_keeper *leases = NULL;
        struct fsm_options o;
        struct fsm_result res;

        assert_int_equal(lease_keeper_new(e->url, LEASE_MS, &leases), 0);
        o = sample_options(leases, "test-worker");
        o.max_attempts = 1;
        g_stop = 0;
        assert_int_equal(fsm_execute(e->db, &sample_fsm, &o, "stop-key", "{}", &s, &res), 0);
        g_stop = 0;
        assert_int_equal(res.outcome, FSM_OUTCOME_INTERRUPTED);
        assert_int_equal(s.failures_recorded, 0);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM fsm_runs WHERE run_id = '%s' AND"
                                     " status = 'running' AND attempt = 1 AND lease_owner IS NULL"
                                     " AND next_transition = 1",
                                     res.run_id),
                         1);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM fsm_events WHERE run_id = '%s'"
                                     " AND kind IN ('error', 'retry', 'fail', 'abort')",
                                     res.run_id),
                         0);
        fsm_result_done(&res);

        /* The next execution (no stop now) finishes it within the one attempt it has. */
        s.stop_at = NULL;
        assert_int_equal(fsm_execute(e->db, &sample_fsm, &o, "stop-key", "{}", &s, &res), 0);
        assert_int_equal(res.outcome, FSM_OUTCOME_COMPLETE);
        assert_int_equal(res.attempts, 1);
        assert_int_equal(count_where(e->db,
                                     "SELECT count(*) FROM sample_effects WHERE run_id = '%s'"
                                     " AND transition = '%s'",
                                     res.run_id, "b"),
                         1);
        fsm_result_done(&res);
        lease_keeper_free(leases);
}

static void test_fsm_backoff_bounds(void **state)
{
        (void)state;
        for (int attempt = 1; attempt <= 12; attempt++) {
                int64_t d = 1000, lo = INT64_MAX, hi = 0;

                for (int i = 1; i < attempt; i++)
                        d = d * 2 > 30000 ? 30000 : d * 2;
                for (uint32_t rnd = 0; rnd < 50000; rnd += 997) {
                        int64_t b = fsm_backoff_ms(attempt, 1000, 30000, rnd * 2654435761u);

                        assert_true(b >= d / 2);
                        assert_true(b <= d);
                        lo = b < lo ? b : lo;
                        hi = b > hi ? b : hi;
                }
                /* The random half is used: the spread covers most of [d/2, d]. */
                assert_true(hi - lo > d / 4);
                /* Both ends are reachable. */
                assert_true(fsm_backoff_ms(attempt, 1000, 30000, 0) == d / 2);
                assert_true(fsm_backoff_ms(attempt, 1000, 30000, (uint32_t)(d / 2)) == d);
        }
        assert_true(fsm_backoff_ms(40, 1000, 30000, 0) == 15000);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_fsm_backoff_bounds),
                cmocka_unit_test_setup_teardown(
                        test_fsm_crash_at_every_transition_resumes_exactly_once, setup, teardown),
                cmocka_unit_test_setup_teardown(test_fsm_racing_processes_run_one_key_once, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_fsm_complete_key_answers_without_its_lock,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(test_fsm_lease_expiry_takeover_fences_paused_owner,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(test_fsm_transient_errors_retry_with_backoff, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(
                        test_fsm_permanent_error_aborts_then_replay_runs_again, setup, teardown),
                cmocka_unit_test_setup_teardown(test_fsm_exhausts_attempts, setup, teardown),
                cmocka_unit_test_setup_teardown(test_fsm_interrupted_run_dates_its_first_failure,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(test_fsm_lost_commit_of_claim_is_resolved, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_fsm_lost_commit_of_completion_is_resolved,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(test_fsm_dropped_connection_costs_no_attempt, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_fsm_lease_lost_when_database_unreachable,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(test_fsm_long_owner_is_refused, setup, teardown),
                cmocka_unit_test_setup_teardown(
                        test_fsm_step_cut_short_by_shutdown_costs_no_attempt, setup, teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
