/*
 * The durable FSM engine.
 *
 * Claiming. The idempotency key row is the lock: the claim transaction selects it FOR
 * UPDATE, so two workers that race for one key serialise there. The outcomes are:
 *   - no row: create the run and the key (the loser of a race on the insert retries the
 *     claim and finds the winner's row);
 *   - key complete: nothing to do, the stored response is returned; if the run has no
 *     outbox row, the FSM's handoff hook writes the next stage's request now;
 *   - key running with a live lease: another worker has it (BUSY);
 *   - key running with an expired or released lease: take the run over and resume it at
 *     next_transition; a takeover after an expired lease counts as an attempt;
 *   - key failed: a new run replaces the failed one (this is how a replay from the DLQ runs),
 *     unless the request is the very message that failed the run (same opts->source: a
 *     redelivery after a crash before its offset was committed); then the earlier failure is
 *     returned and nothing runs.
 *
 * Fencing. Every write that records progress is conditioned on lease_owner being our
 * owner token. If it is not, another worker took the run over after our lease lapsed; we
 * stop without writing anything, and the other worker's view wins.
 *
 * Shutdown. When opts->stop is set, the engine finishes the step in progress, records it,
 * and releases the lease (lease_owner NULL, lease_until now) so that the next worker can
 * resume immediately without counting an attempt.
 */
#include "worker/fsm.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include <json-c/json.h>

#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "worker/lease.h"
#include "worker/metrics.h"

#define FSM_CLAIM_ATTEMPTS 5

/*
 * An owner is "<worker id>/<10 token characters>", and worker ids are the host id plus at
 * most 64 characters of pid, stage and thread number (worker/pool.c, process-image).
 */
#define FSM_OWNER_TOKEN_LEN 10
_Static_assert(CONFIG_HOST_ID_MAX + 64 + 1 + FSM_OWNER_TOKEN_LEN <= LEASE_OWNER_MAX,
               "a lease owner built from the longest HOST_ID must fit LEASE_OWNER_MAX");

struct fsm_run {
        struct db *db;
        const struct fsm_def *def;
        const struct fsm_options *opts;
        void *userdata;
        char run_id[ULID_LEN + 1];
        char owner[LEASE_OWNER_MAX + 1];
        const char *key;
        const char *request;
        struct json_object *response;
        struct lease *lease;
        int next;    /* index of the first incomplete transition */
        int attempt; /* 1-based */
        int max_attempts;
        int64_t first_failure_ms;
        int64_t last_failure_ms;

        /* Claim results. */
        enum fsm_outcome claim_outcome;
        bool claimed;
        char *stored_response;
        bool exhausted_on_takeover;
        /* FAILED at claim: this message had failed the key's run before. */
        bool failed_aborted;
        bool failed_dead_lettered;
        char *failed_error;
        const char *error_text; /* set while a failure is being recorded */
};

const char *fsm_outcome_name(enum fsm_outcome outcome)
{
        static const char *const names[] = {
                [FSM_OUTCOME_COMPLETE] = "complete",
                [FSM_OUTCOME_ALREADY_COMPLETE] = "already_complete",
                [FSM_OUTCOME_BUSY] = "busy",
                [FSM_OUTCOME_FAILED] = "failed",
                [FSM_OUTCOME_INTERRUPTED] = "interrupted",
        };
        return names[outcome];
}

int64_t fsm_backoff_ms(int attempt, int base_ms, int max_ms, uint32_t random)
{
        int64_t d = base_ms;

        for (int i = 1; i < attempt && d < max_ms; i++)
                d *= 2;
        if (d > max_ms)
                d = max_ms;
        return d / 2 + (int64_t)(random % (uint32_t)(d / 2 + 1));
}

const char *fsm_run_id(const struct fsm_run *run)
{
        return run->run_id;
}

int fsm_run_attempt(const struct fsm_run *run)
{
        return run->attempt;
}

const char *fsm_run_request(const struct fsm_run *run)
{
        return run->request;
}

const char *fsm_run_host(const struct fsm_run *run)
{
        return run->opts->host_id;
}

struct db *fsm_run_db(struct fsm_run *run)
{
        return run->db;
}

struct json_object *fsm_run_response(struct fsm_run *run)
{
        return run->response;
}

const char *fsm_run_error(const struct fsm_run *run)
{
        return run->error_text ? run->error_text : "";
}

bool fsm_run_should_stop(const struct fsm_run *run)
{
        return (run->opts->stop && *run->opts->stop) || (run->lease && lease_lost(run->lease));
}

static void fsm_log_context(const struct fsm_run *run)
{
        log_context_set(run->run_id, run->opts->subject, run->def->name, run->attempt);
}

static int fsm_event_at(struct db *db, const struct fsm_run *run, int attempt, const char *kind,
                        const char *transition, const char *detail)
{
        char n[16];
        const char *params[6] = {run->run_id, kind, transition, n, run->owner, detail};

        (void)snprintf(n, sizeof(n), "%d", attempt);
        return db_exec(db, NULL,
                       "INSERT INTO fsm_events (run_id, kind, transition, attempt, worker, detail)"
                       " VALUES ($1, $2, $3, $4, $5, $6)",
                       6, params);
}

static int fsm_event(struct db *db, const struct fsm_run *run, const char *kind,
                     const char *transition, const char *detail)
{
        return fsm_event_at(db, run, run->attempt, kind, transition, detail);
}

/*
 * Whether this execution wrote event @kind for @transition at @attempt: 1 or 0. Every event
 * carries the per-execution owner token, so after a COMMIT whose outcome was lost, finding
 * the event that the transaction wrote proves that it committed (db_tx_check_fn).
 */
static int fsm_event_written(struct db *db, const struct fsm_run *run, int attempt,
                             const char *kind, const char *transition)
{
        char n[16];
        const char *params[5] = {run->run_id, kind, run->owner, n, transition};
        PGresult *res = NULL;
        int r;

        (void)snprintf(n, sizeof(n), "%d", attempt);
        r = db_query_row(db, &res,
                         "SELECT 1 FROM fsm_events WHERE run_id = $1 AND kind = $2 AND worker = $3"
                         " AND attempt = $4 AND transition IS NOT DISTINCT FROM $5 LIMIT 1",
                         5, params);
        if (r > 0)
                PQclear(res);
        return r;
}

/* One event in its own transaction, retried over lost connections without duplicates. */
struct fsm_event_ctx {
        struct fsm_run *run;
        const char *kind;
        const char *transition;
        const char *detail;
};

static int fsm_event_tx(struct db *db, void *userdata)
{
        const struct fsm_event_ctx *c = userdata;

        return fsm_event(db, c->run, c->kind, c->transition, c->detail);
}

static int fsm_event_tx_committed(struct db *db, void *userdata)
{
        const struct fsm_event_ctx *c = userdata;

        return fsm_event_written(db, c->run, c->run->attempt, c->kind, c->transition);
}

static int fsm_event_durable(struct fsm_run *run, const char *kind, const char *transition,
                             const char *detail)
{
        struct fsm_event_ctx c = {run, kind, transition, detail};

        return db_tx_checked(run->db, fsm_event_tx, fsm_event_tx_committed, &c);
}

/* The detail of a takeover's "resume" event: the owner died or hung, an attempt was lost. */
#define FSM_RESUME_EXPIRED "previous worker's lease expired"
#define FSM_RESUME_RELEASED "previous worker released the run"

/*
 * When the failed run @run first and last failed, from its history rather than from this
 * process's memory: the run may have failed in other workers before this one took it over.
 * Its failures are the events of transient errors, of takeovers after an expired lease (a
 * worker died mid-attempt) and of the final fail or abort. Both times are the database's
 * clock, so they compare with each other whichever hosts wrote them. Keeps the times already
 * set when the history has no failure (rows from before events were kept).
 */
static int fsm_failure_times(struct db *db, struct fsm_run *run)
{
        const char *params[2] = {run->run_id, FSM_RESUME_EXPIRED};
        PGresult *res = NULL;
        int r;

        r = db_query_row(db, &res,
                         "SELECT (extract(epoch FROM min(at)) * 1000)::bigint,"
                         " (extract(epoch FROM max(at)) * 1000)::bigint FROM fsm_events"
                         " WHERE run_id = $1 AND (kind IN ('error', 'fail', 'abort')"
                         " OR (kind = 'resume' AND detail = $2))",
                         2, params);
        if (r < 0)
                return r;
        if (r > 0 && db_get(res, 0, 0)) {
                run->first_failure_ms = db_get_i64(res, 0, 0);
                run->last_failure_ms = db_get_i64(res, 0, 1);
        }
        if (r > 0)
                PQclear(res);
        return 0;
}

/* ---- claim ---------------------------------------------------------------------------- */

static int fsm_insert_run(struct db *db, struct fsm_run *run)
{
        char max[16], lease_ms[16];
        const char *params[10] = {run->run_id,         run->def->name,
                                  run->opts->host_id,  run->key,
                                  run->request,        max,
                                  run->owner,          lease_ms,
                                  run->opts->trace_id, run->opts->parent_run_id};
        int r;

        r = ulid_new(run->run_id);
        if (r < 0)
                return err_set(r, "failed to make a run id");
        (void)snprintf(max, sizeof(max), "%d", run->max_attempts);
        (void)snprintf(lease_ms, sizeof(lease_ms), "%d", lease_keeper_lease_ms(run->opts->leases));
        return db_exec(db, NULL,
                       "INSERT INTO fsm_runs (run_id, fsm, host_id, idempotency_key, request,"
                       " state, next_transition, status, attempt, max_attempts, lease_owner,"
                       " lease_until, trace_id, parent_run_id)"
                       " VALUES ($1, $2, $3, $4, $5::jsonb, 'start', 0, 'running', 1, $6, $7,"
                       " now() + $8::int * interval '1 millisecond', $9, $10)",
                       10, params);
}

static int fsm_claim_new(struct db *db, struct fsm_run *run, const char *replaced_run)
{
        const char *params[4] = {run->key, run->def->name, run->opts->host_id, run->run_id};
        PGresult *res = NULL;
        char detail[128];
        int r;

        r = fsm_insert_run(db, run);
        if (r < 0)
                return r;
        if (replaced_run) {
                r = db_exec(db, NULL,
                            "UPDATE idempotency_keys SET run_id = $2, status = 'running',"
                            " completed_at = NULL WHERE key = $1",
                            2, (const char *const[]){run->key, run->run_id});
                if (r < 0)
                        return r;
        } else {
                r = db_exec(db, &res,
                            "INSERT INTO idempotency_keys (key, fsm, host_id, run_id, status)"
                            " VALUES ($1, $2, $3, $4, 'running') ON CONFLICT (key) DO NOTHING",
                            4, params);
                if (r < 0)
                        return r;
                if (strcmp(PQcmdTuples(res), "1") != 0) {
                        PQclear(res);
                        /* Lost a race with another worker: roll back and look again. */
                        return -EALREADY;
                }
                PQclear(res);
        }
        run->next = 0;
        run->attempt = 1;
        if (replaced_run)
                (void)snprintf(detail, sizeof(detail), "replaces failed run %s", replaced_run);
        r = fsm_event(db, run, "start", NULL, replaced_run ? detail : NULL);
        if (r < 0)
                return r;
        run->claimed = true;
        return 0;
}

static int fsm_claim_takeover(struct db *db, struct fsm_run *run, const char *run_id, bool released)
{
        char lease_ms[16];
        const char *params[4] = {run_id, run->owner, lease_ms, released ? "0" : "1"};
        PGresult *res = NULL;
        const char *response;
        int r;

        (void)snprintf(lease_ms, sizeof(lease_ms), "%d", lease_keeper_lease_ms(run->opts->leases));
        r = db_query_row(db, &res,
                         "UPDATE fsm_runs SET lease_owner = $2, attempt = attempt + $4::int,"
                         " lease_until = now() + $3::int * interval '1 millisecond',"
                         " updated_at = now() WHERE run_id = $1"
                         " RETURNING next_transition, attempt, max_attempts, response::text",
                         4, params);
        if (r < 0)
                return r;
        if (r == 0)
                return err_set(-EIO, "run '%s' vanished during takeover", run_id);
        (void)snprintf(run->run_id, sizeof(run->run_id), "%s", run_id);
        run->next = (int)db_get_i64(res, 0, 0);
        run->attempt = (int)db_get_i64(res, 0, 1);
        run->max_attempts = (int)db_get_i64(res, 0, 2);
        response = db_get(res, 0, 3);
        if (response) {
                run->stored_response = strdup(response);
                if (!run->stored_response) {
                        PQclear(res);
                        return err_set(-ENOMEM, "out of memory");
                }
        }
        PQclear(res);
        r = fsm_event(db, run, "resume", NULL, released ? FSM_RESUME_RELEASED : FSM_RESUME_EXPIRED);
        if (r < 0)
                return r;
        run->exhausted_on_takeover = run->attempt > run->max_attempts;
        run->claimed = true;
        return 0;
}

static int fsm_load_response(struct fsm_run *run);

/*
 * The key's run completed without writing its handoff (process-image runs the stages with
 * the handoff off, and may stop after one). A request for the key arriving on the stage's
 * topic means the pipeline should go on: write the handoff now, in the claim transaction.
 */
static int fsm_claim_handoff(struct db *db, struct fsm_run *run)
{
        int r;

        r = fsm_load_response(run);
        if (r < 0)
                return r;
        r = run->def->handoff(run, db, run->userdata);
        json_object_put(run->response);
        run->response = NULL;
        if (r > 0)
                log_info("wrote the handoff of a run that completed without one", "run_id=%s",
                         run->run_id);
        return r < 0 ? r : 0;
}

/* The key's run failed on this very message before: report that failure again. */
static int fsm_claim_failed_before(struct db *db, struct fsm_run *run, PGresult *res)
{
        const char *error = db_get(res, 0, 9);

        run->claim_outcome = FSM_OUTCOME_FAILED;
        run->failed_aborted = strcmp(db_get(res, 0, 2), "aborted") == 0;
        run->failed_dead_lettered = strcmp(db_get(res, 0, 8), "t") == 0;
        run->attempt = (int)db_get_i64(res, 0, 10);
        /* Only when the history has no failure: its end is the best there is. */
        run->first_failure_ms = db_get_i64(res, 0, 11);
        run->last_failure_ms = run->first_failure_ms;
        free(run->failed_error);
        run->failed_error = strdup(error ? error : "");
        if (!run->failed_error)
                return err_set(-ENOMEM, "out of memory");
        return fsm_failure_times(db, run);
}

static int fsm_claim_tx(struct db *db, void *userdata)
{
        struct fsm_run *run = userdata;
        const char *params[2] = {run->key, run->opts->source};
        PGresult *res = NULL;
        int r;

        free(run->stored_response);
        run->stored_response = NULL;
        run->claimed = false;
        r = db_query_row(db, &res,
                         "SELECT k.status, k.run_id, r.status, r.lease_until > now(),"
                         " r.lease_owner IS NULL, r.response::text,"
                         " CASE WHEN k.status = 'complete' THEN EXISTS (SELECT 1 FROM outbox o"
                         " WHERE o.run_id = k.run_id) END,"
                         " coalesce(r.failed_source = $2::text, false),"
                         " r.dead_lettered_at IS NOT NULL, r.error, r.attempt,"
                         " (extract(epoch FROM r.finished_at) * 1000)::bigint"
                         " FROM idempotency_keys k JOIN fsm_runs r ON r.run_id = k.run_id"
                         " WHERE k.key = $1 FOR UPDATE OF k",
                         2, params);
        if (r < 0)
                return r;
        if (r == 0)
                return fsm_claim_new(db, run, NULL);

        {
                const char *key_status = db_get(res, 0, 0);
                const char *run_id = db_get(res, 0, 1);
                const char *live = db_get(res, 0, 3);
                bool released = strcmp(db_get(res, 0, 4), "t") == 0;
                const char *response = db_get(res, 0, 5);

                (void)snprintf(run->run_id, sizeof(run->run_id), "%s", run_id);
                if (strcmp(key_status, "complete") == 0) {
                        const char *outbox = db_get(res, 0, 6);
                        bool handed_off = outbox && strcmp(outbox, "t") == 0;

                        run->claim_outcome = FSM_OUTCOME_ALREADY_COMPLETE;
                        run->stored_response = response ? strdup(response) : NULL;
                        if (response && !run->stored_response)
                                r = err_set(-ENOMEM, "out of memory");
                        else if (run->def->handoff && !handed_off)
                                r = fsm_claim_handoff(db, run);
                        else
                                r = 0;
                } else if (strcmp(key_status, "failed") == 0 &&
                           strcmp(db_get(res, 0, 7), "t") == 0) {
                        r = fsm_claim_failed_before(db, run, res);
                } else if (strcmp(key_status, "failed") == 0) {
                        char old[ULID_LEN + 1];

                        (void)snprintf(old, sizeof(old), "%s", run_id);
                        PQclear(res);
                        return fsm_claim_new(db, run, old);
                } else if (live && strcmp(live, "t") == 0 && !released) {
                        run->claim_outcome = FSM_OUTCOME_BUSY;
                        r = 0;
                } else {
                        char id[ULID_LEN + 1];

                        (void)snprintf(id, sizeof(id), "%s", run_id);
                        PQclear(res);
                        return fsm_claim_takeover(db, run, id, released);
                }
        }
        PQclear(res);
        return r;
}

/* ---- progress ------------------------------------------------------------------------- */

struct fsm_complete_ctx {
        struct fsm_run *run;
        const struct fsm_transition *t;
        bool last;
        bool fenced_out;
};

/* Write progress conditioned on still owning the run. Sets fenced_out when we do not. */
static int fsm_fenced_update(struct db *db, struct fsm_run *run, const char *sql, int nparams,
                             const char *const *params, bool *fenced_out)
{
        PGresult *res = NULL;
        int r;

        r = db_exec(db, &res, sql, nparams, params);
        if (r < 0)
                return r;
        *fenced_out = strcmp(PQcmdTuples(res), "0") == 0;
        PQclear(res);
        if (*fenced_out) {
                lease_mark_lost(run->lease);
                return -ESTALE;
        }
        return 0;
}

/* The completion committed iff its transition_complete event, with our owner, is there. */
static int fsm_complete_tx_committed(struct db *db, void *userdata)
{
        const struct fsm_complete_ctx *c = userdata;

        return fsm_event_written(db, c->run, c->run->attempt, "transition_complete", c->t->name);
}

static int fsm_complete_tx(struct db *db, void *userdata)
{
        struct fsm_complete_ctx *c = userdata;
        struct fsm_run *run = c->run;
        char next[16];
        const char *response =
                json_object_to_json_string_ext(run->response, JSON_C_TO_STRING_PLAIN);
        const char *params[5] = {run->run_id, run->owner, c->t->name, next, response};
        int r;

        (void)snprintf(next, sizeof(next), "%d", run->next + 1);
        r = fsm_fenced_update(db, run,
                              c->last ? "UPDATE fsm_runs SET state = $3, next_transition = $4,"
                                        " response = $5::jsonb, status = 'complete',"
                                        " lease_owner = NULL, lease_until = NULL, error = NULL,"
                                        " error_detail = NULL, error_class = NULL,"
                                        " finished_at = now(), updated_at = now()"
                                        " WHERE run_id = $1 AND lease_owner = $2"
                                      : "UPDATE fsm_runs SET state = $3, next_transition = $4,"
                                        " response = $5::jsonb, updated_at = now()"
                                        " WHERE run_id = $1 AND lease_owner = $2",
                              5, params, &c->fenced_out);
        if (r < 0)
                return r;
        if (c->t->commit) {
                r = c->t->commit(run, db, run->userdata);
                if (r < 0)
                        return r;
        }
        if (c->last && run->def->handoff) {
                r = run->def->handoff(run, db, run->userdata);
                if (r < 0)
                        return r;
        }
        r = fsm_event(db, run, "transition_complete", c->t->name, NULL);
        if (r < 0)
                return r;
        if (!c->last)
                return 0;
        r = db_exec(db, NULL,
                    "UPDATE idempotency_keys SET status = 'complete', completed_at = now()"
                    " WHERE key = $1 AND run_id = $2",
                    2, (const char *const[]){run->key, run->run_id});
        if (r < 0)
                return r;
        return fsm_event(db, run, "finish", NULL, NULL);
}

struct fsm_fail_ctx {
        struct fsm_run *run;
        const char *transition;
        int error;
        bool permanent;
        const char *text;
        bool fenced_out;
};

static int fsm_fail_tx(struct db *db, void *userdata)
{
        struct fsm_fail_ctx *c = userdata;
        struct fsm_run *run = c->run;
        char detail[256];
        const char *status = c->permanent ? "aborted" : "failed";
        const char *params[7] = {run->run_id,      run->owner,
                                 status,           c->text,
                                 detail,           c->permanent ? "permanent" : "transient",
                                 run->opts->source};
        int r;

        (void)snprintf(detail, sizeof(detail), "transition '%s', %s, attempt %d of %d",
                       c->transition, err_name(c->error), run->attempt, run->max_attempts);
        r = fsm_fenced_update(db, run,
                              "UPDATE fsm_runs SET status = $3, error = $4, error_detail = $5,"
                              " error_class = $6, failed_source = $7, lease_owner = NULL,"
                              " lease_until = NULL, finished_at = now(), updated_at = now()"
                              " WHERE run_id = $1 AND lease_owner = $2",
                              7, params, &c->fenced_out);
        if (r < 0)
                return r;
        r = db_exec(db, NULL,
                    "UPDATE idempotency_keys SET status = 'failed', completed_at = now()"
                    " WHERE key = $1 AND run_id = $2",
                    2, (const char *const[]){run->key, run->run_id});
        if (r < 0)
                return r;
        if (run->def->on_failure) {
                r = run->def->on_failure(run, db, run->userdata);
                if (r < 0)
                        return r;
        }
        r = fsm_event(db, run, c->permanent ? "abort" : "fail", c->transition, c->text);
        if (r < 0)
                return r;
        return fsm_failure_times(db, run);
}

struct fsm_retry_ctx {
        struct fsm_run *run;
        const char *transition;
        const char *text;
        int64_t delay_ms;
};

static int fsm_retry_tx(struct db *db, void *userdata)
{
        const struct fsm_retry_ctx *c = userdata;
        struct fsm_run *run = c->run;
        char attempt[16], detail[64];
        const char *params[4] = {run->run_id, run->owner, attempt, c->text};
        bool fenced_out = false;
        int r;

        r = fsm_event(db, run, "error", c->transition, c->text);
        if (r < 0)
                return r;
        (void)snprintf(attempt, sizeof(attempt), "%d", run->attempt + 1);
        r = fsm_fenced_update(db, run,
                              "UPDATE fsm_runs SET attempt = $3, error = $4,"
                              " error_class = 'transient', updated_at = now()"
                              " WHERE run_id = $1 AND lease_owner = $2",
                              4, params, &fenced_out);
        if (r < 0)
                return r;
        (void)snprintf(detail, sizeof(detail), "retry in %" PRId64 " ms", c->delay_ms);
        return fsm_event_at(db, run, run->attempt + 1, "retry", c->transition, detail);
}

static int fsm_retry_tx_committed(struct db *db, void *userdata)
{
        const struct fsm_retry_ctx *c = userdata;

        return fsm_event_written(db, c->run, c->run->attempt + 1, "retry", c->transition);
}

/*
 * Record a transient failure and the coming retry, and bump the attempt counter: one
 * transaction, so that a lost connection neither loses the attempt nor counts it twice.
 */
static int fsm_retry_record(struct fsm_run *run, const char *transition, const char *text,
                            int64_t delay_ms)
{
        struct fsm_retry_ctx c = {run, transition, text, delay_ms};
        int r;

        r = db_tx_checked(run->db, fsm_retry_tx, fsm_retry_tx_committed, &c);
        if (r < 0)
                return r;
        run->attempt++;
        return 0;
}

struct fsm_release_ctx {
        struct fsm_run *run;
        const char *why;
};

static int fsm_release_tx(struct db *db, void *userdata)
{
        const struct fsm_release_ctx *c = userdata;
        const char *params[2] = {c->run->run_id, c->run->owner};
        bool fenced_out = false;
        int r;

        r = fsm_fenced_update(db, c->run,
                              "UPDATE fsm_runs SET lease_owner = NULL, lease_until = now(),"
                              " updated_at = now() WHERE run_id = $1 AND lease_owner = $2",
                              2, params, &fenced_out);
        if (r < 0)
                return r;
        return fsm_event(db, c->run, "release", NULL, c->why);
}

static int fsm_release_tx_committed(struct db *db, void *userdata)
{
        const struct fsm_release_ctx *c = userdata;

        return fsm_event_written(db, c->run, c->run->attempt, "release", NULL);
}

/*
 * Give the run back so that the next worker resumes it at once, without an attempt. When
 * this fails the run stays leased to us, and resumes (as an attempt) once the lease lapses.
 */
static void fsm_release(struct fsm_run *run, const char *why)
{
        struct fsm_release_ctx c = {run, why};
        int r;

        r = db_tx_checked(run->db, fsm_release_tx, fsm_release_tx_committed, &c);
        if (r < 0 && r != -ESTALE)
                log_warning_errno(r, "failed to release the run, it resumes when its lease lapses",
                                  "lease_ms=%d", lease_keeper_lease_ms(run->opts->leases));
}

/* Sleep up to @ms, waking early for shutdown or a lost lease. */
static void fsm_backoff_sleep(const struct fsm_run *run, int64_t ms)
{
        int64_t until = util_now_monotonic_ms() + ms;

        while (!fsm_run_should_stop(run)) {
                int64_t left = until - util_now_monotonic_ms();

                if (left <= 0)
                        break;
                util_sleep_ms(left < 100 ? left : 100);
        }
}

static uint32_t fsm_random(void)
{
        uint32_t v = 0;

        if (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v))
                v = (uint32_t)util_now_monotonic_ms();
        return v;
}

static int fsm_fail_tx_committed(struct db *db, void *userdata)
{
        const struct fsm_fail_ctx *c = userdata;

        return fsm_event_written(db, c->run, c->run->attempt, c->permanent ? "abort" : "fail",
                                 c->transition);
}

static int fsm_fail(struct fsm_run *run, const char *transition, int error, bool permanent,
                    struct fsm_result *res)
{
        struct fsm_fail_ctx c = {run, transition, error, permanent, res->error_text, false};
        int r;

        run->error_text = res->error_text;
        r = db_tx_checked(run->db, fsm_fail_tx, fsm_fail_tx_committed, &c);
        run->error_text = NULL;
        if (c.fenced_out) {
                res->outcome = FSM_OUTCOME_INTERRUPTED;
                return 0;
        }
        if (r < 0)
                return err_wrap(r, "failed to record the failure of run %s", run->run_id);
        res->outcome = FSM_OUTCOME_FAILED;
        res->permanent = permanent;
        log_warning("run failed", "transition=%s class=%s error=%s", transition,
                    permanent ? "permanent" : "exhausted", log_quote(res->error_text));
        util_crash_point("fsm.after_failure_commit");
        if (run->def->after_failure) {
                run->error_text = res->error_text;
                run->def->after_failure(run, run->userdata);
                run->error_text = NULL;
        }
        return 0;
}

/* Run transitions from run->next to the end. Fills @res; returns <0 only for engine trouble. */
static int fsm_run_transitions(struct fsm_run *run, struct fsm_result *res)
{
        const struct fsm_def *def = run->def;
        int r;

        while (run->next < (int)def->transition_count) {
                const struct fsm_transition *t = &def->transitions[run->next];
                struct fsm_complete_ctx c = {run, t, run->next == (int)def->transition_count - 1,
                                             false};
                int step;

                fsm_log_context(run);
                if (fsm_run_should_stop(run)) {
                        if (!lease_lost(run->lease))
                                fsm_release(run, "worker shutting down");
                        res->outcome = FSM_OUTCOME_INTERRUPTED;
                        return 0;
                }
                r = fsm_event_durable(run, "transition_start", t->name, NULL);
                if (r < 0)
                        goto db_trouble;
                log_debug("transition start", "transition=%s", t->name);
                err_clear();
                step = t->step(run, run->userdata);
                if (lease_lost(run->lease)) {
                        res->outcome = FSM_OUTCOME_INTERRUPTED;
                        return 0;
                }
                if (step >= 0) {
                        r = db_tx_checked(run->db, fsm_complete_tx, fsm_complete_tx_committed, &c);
                        if (c.fenced_out) {
                                res->outcome = FSM_OUTCOME_INTERRUPTED;
                                return 0;
                        }
                        if (r >= 0) {
                                run->next++;
                                continue;
                        }
                        /* The commit hook or the database failed: handle like a step error. */
                        step = r;
                }
                /*
                 * A step cut short because the worker is stopping (it says so with -EINTR or
                 * -ECANCELED, or anything transient) did not fail: the run is released for
                 * the next worker, as at a transition boundary, and no attempt is spent. A
                 * permanent error is still one, stopping or not.
                 */
                if (run->opts->stop && *run->opts->stop &&
                    (step == -ECANCELED || err_is_transient(step))) {
                        log_info("transition cut short by shutdown, not counted as an attempt",
                                 "transition=%s error=%s", t->name, log_quote(err_text(step)));
                        fsm_release(run, "worker shutting down");
                        res->outcome = FSM_OUTCOME_INTERRUPTED;
                        return 0;
                }

                (void)snprintf(res->error_text, sizeof(res->error_text), "%s", err_text(step));
                log_redact(res->error_text);
                res->error = step;
                if (!err_is_transient(step))
                        return fsm_fail(run, t->name, step, true, res);
                if (run->attempt >= run->max_attempts)
                        return fsm_fail(run, t->name, step, false, res);
                {
                        int64_t delay = fsm_backoff_ms(run->attempt, run->opts->retry_base_ms,
                                                       run->opts->retry_max_ms, fsm_random());

                        log_warning_errno(step, "transition failed, will retry",
                                          "transition=%s retry_in_ms=%" PRId64, t->name, delay);
                        r = fsm_retry_record(run, t->name, res->error_text, delay);
                        if (r == -ESTALE && lease_lost(run->lease)) {
                                res->outcome = FSM_OUTCOME_INTERRUPTED;
                                return 0;
                        }
                        if (r < 0)
                                goto db_trouble;
                        metrics_retry_by_name(def->name);
                        fsm_backoff_sleep(run, delay);
                }
        }
        res->outcome = FSM_OUTCOME_COMPLETE;
        res->error = 0;
        res->error_text[0] = '\0';
        return 0;

db_trouble:
        /* The run stays leased; it resumes when the lease lapses. */
        res->outcome = FSM_OUTCOME_INTERRUPTED;
        res->error = r;
        (void)snprintf(res->error_text, sizeof(res->error_text), "%s", err_text(r));
        return 0;
}

/*
 * Whether the claim transaction that fsm_claim_tx ran last committed. A claim that took the
 * run left our per-execution owner token on it; one that only read (busy, already complete)
 * wrote nothing and is simply run again.
 */
static int fsm_claim_tx_committed(struct db *db, void *userdata)
{
        const struct fsm_run *run = userdata;
        PGresult *res = NULL;
        int r;

        if (!run->claimed)
                return 0;
        r = db_query_row(db, &res, "SELECT 1 FROM fsm_runs WHERE run_id = $1 AND lease_owner = $2",
                         2, (const char *const[]){run->run_id, run->owner});
        if (r > 0)
                PQclear(res);
        return r;
}

/*
 * The fast path for a request already done, which redeliveries, replays and repeated
 * producers make the most common case: one statement outside a transaction, without a row
 * lock, instead of the locking claim's BEGIN, SELECT ... FOR UPDATE and COMMIT. Returns 1
 * when the key is complete and nothing is left to do for it (its handoff, if any, is written),
 * else 0, also when the read failed: the locking claim then decides, and reports errors.
 * A complete key never goes back to another state (gc only deletes it), so what the read
 * sees stays true; a delete that commits after it orders this message before the delete.
 * Any other key pays this read on top of the locking claim: one indexed lookup against the
 * tens of round trips a run that does work makes (worker_bench: 26 per run).
 */
static int fsm_claim_if_complete(struct fsm_run *run)
{
        PGresult *res = NULL;
        const char *response;
        int r;

        r = db_query_row(run->db, &res,
                         "SELECT k.run_id, r.response::text,"
                         " EXISTS (SELECT 1 FROM outbox o WHERE o.run_id = k.run_id)"
                         " FROM idempotency_keys k JOIN fsm_runs r ON r.run_id = k.run_id"
                         " WHERE k.key = $1 AND k.status = 'complete'",
                         1, (const char *const[]){run->key});
        if (r <= 0) {
                err_clear();
                return 0;
        }
        r = 0;
        response = db_get(res, 0, 1);
        if (!run->def->handoff || strcmp(db_get(res, 0, 2), "t") == 0) {
                free(run->stored_response);
                run->stored_response = response ? strdup(response) : NULL;
                if (!response || run->stored_response) {
                        (void)snprintf(run->run_id, sizeof(run->run_id), "%s", db_get(res, 0, 0));
                        run->claimed = false;
                        run->claim_outcome = FSM_OUTCOME_ALREADY_COMPLETE;
                        r = 1;
                }
        }
        PQclear(res);
        return r;
}

static int fsm_claim(struct fsm_run *run)
{
        int r = 0;

        if (fsm_claim_if_complete(run) > 0)
                return 0;
        for (int i = 0; i < FSM_CLAIM_ATTEMPTS; i++) {
                run->claim_outcome = FSM_OUTCOME_COMPLETE;
                r = db_tx_checked(run->db, fsm_claim_tx, fsm_claim_tx_committed, run);
                if (r != -EALREADY)
                        return r;
        }
        return err_set(-EAGAIN, "could not claim idempotency key '%s' after %d attempts", run->key,
                       FSM_CLAIM_ATTEMPTS);
}

static int fsm_load_response(struct fsm_run *run)
{
        if (run->stored_response) {
                run->response = json_tokener_parse(run->stored_response);
                if (!run->response)
                        return err_set(-EBADMSG, "stored response of run %s is not JSON",
                                       run->run_id);
        } else {
                run->response = json_object_new_object();
                if (!run->response)
                        return err_set(-ENOMEM, "out of memory");
        }
        return 0;
}

int fsm_execute(struct db *db, const struct fsm_def *def, const struct fsm_options *opts,
                const char *key, const char *request_json, void *userdata,
                struct fsm_result *ret_result)
{
        struct fsm_run run = {
                .db = db,
                .def = def,
                .opts = opts,
                .userdata = userdata,
                .key = key,
                .request = request_json,
                .max_attempts = opts->max_attempts,
        };
        struct fsm_result res = {0};
        char token[ULID_LEN + 1];
        int64_t claim_ms;
        int r;

        FIM_ASSERT(def->transition_count > 0 && opts->leases && opts->max_attempts > 0);
        r = ulid_new(token);
        if (r < 0)
                return err_set(r, "failed to make a lease token");
        /* A token per execution: two threads of one worker never share an owner. */
        r = util_snprintf(run.owner, sizeof(run.owner), "%s/%s", opts->worker_id,
                          token + ULID_LEN - FSM_OWNER_TOKEN_LEN);
        if (r < 0)
                return err_set(r, "worker id '%.64s...' is too long for a lease owner (at most %d)",
                               opts->worker_id, LEASE_OWNER_MAX - FSM_OWNER_TOKEN_LEN - 1);

        /* The claim grants the lease at some point after this. */
        claim_ms = util_now_monotonic_ms();
        r = fsm_claim(&run);
        if (r < 0)
                goto out;
        (void)snprintf(res.run_id, sizeof(res.run_id), "%s", run.run_id);
        if (!run.claimed) {
                res.outcome = run.claim_outcome;
                res.response = steal_ptr(run.stored_response);
                if (res.outcome == FSM_OUTCOME_FAILED) {
                        /* The errno is not stored; the text says what it was. */
                        res.error = -EALREADY;
                        res.permanent = run.failed_aborted;
                        res.dead_lettered = run.failed_dead_lettered;
                        (void)snprintf(res.error_text, sizeof(res.error_text), "%s",
                                       run.failed_error);
                        log_info("redelivered message of a failed run, not run again",
                                 "run_id=%s dead_lettered=%d", run.run_id,
                                 run.failed_dead_lettered);
                }
                r = 0;
                goto out;
        }

        r = lease_keeper_add(opts->leases, run.run_id, run.owner, claim_ms, &run.lease);
        if (r < 0)
                goto out;
        r = fsm_load_response(&run);
        if (r < 0)
                goto out;
        fsm_log_context(&run);
        if (run.exhausted_on_takeover) {
                (void)snprintf(
                        res.error_text, sizeof(res.error_text),
                        "run was interrupted %d times (worker died or lease expired); giving up",
                        run.max_attempts);
                res.error = -ETIMEDOUT;
                r = fsm_fail(
                        &run,
                        def->transitions[run.next < (int)def->transition_count ? run.next : 0].name,
                        -ETIMEDOUT, false, &res);
        } else {
                r = fsm_run_transitions(&run, &res);
        }
        if (r < 0)
                goto out;
        res.response = strdup(json_object_to_json_string_ext(run.response, JSON_C_TO_STRING_PLAIN));
        if (!res.response) {
                r = err_set(-ENOMEM, "out of memory");
                goto out;
        }
        if (res.outcome == FSM_OUTCOME_COMPLETE)
                log_info("run complete", "fsm=%s", def->name);

out:
        res.attempts = run.attempt;
        res.first_failure_ms = run.first_failure_ms;
        res.last_failure_ms = run.last_failure_ms;
        if (run.lease)
                lease_keeper_remove(opts->leases, run.lease);
        json_object_put(run.response);
        free(run.stored_response);
        free(run.failed_error);
        log_context_clear();
        if (r < 0) {
                fsm_result_done(&res);
                return r;
        }
        *ret_result = res;
        return 0;
}

int fsm_mark_dead_lettered(struct db *db, const char *run_id)
{
        return db_exec(db, NULL,
                       "UPDATE fsm_runs SET dead_lettered_at = now() WHERE run_id = $1"
                       " AND status IN ('failed', 'aborted')",
                       1, (const char *const[]){run_id});
}

void fsm_result_done(struct fsm_result *result)
{
        free(result->response);
        result->response = NULL;
}
