#pragma once

/*
 * The durable FSM engine (DESIGN §3), after superfly/fsm.
 *
 * An FSM is a fixed, ordered list of named transitions. fsm_execute() claims the run for an
 * idempotency key (creating it, resuming it after a dead worker, or finding it finished),
 * then runs the transitions from the first incomplete one, recording each start, completion,
 * error, retry, abort and finish as an event row. Completion of a transition, its optional
 * commit hook and the saved response are one transaction, so after a crash a run resumes at
 * the first transition whose completion was not committed; every step must therefore be safe
 * to repeat after a crash in its middle.
 *
 * Errors from a step are classified by errno (err_is_transient): transient ones are retried
 * with exponential backoff and jitter until the run has used max_attempts; permanent ones
 * abort at once. A worker that dies mid-run counts as one attempt for the run, so a message
 * that kills its worker cannot loop forever.
 */

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/err.h"
#include "common/ulid.h"

struct db;
struct fsm_run;
struct json_object;
struct lease_keeper;

/* The work of a transition, outside any transaction. Negative errno on failure. */
typedef int (*fsm_step_fn)(struct fsm_run *run, void *userdata);

/* Database writes committed atomically with a transition's completion (or a run's failure). */
typedef int (*fsm_commit_fn)(struct fsm_run *run, struct db *db, void *userdata);

/*
 * Work that must follow a run's failure but must not hold the failure's transaction open
 * (device-mapper calls, which can wait seconds on a busy device): it runs once the failure is
 * committed, outside any transaction, on fsm_run_db(). Nothing records whether it ran, so what
 * it cleans up must also be found and repaired by other means after a crash (reconciliation).
 */
typedef void (*fsm_after_fn)(struct fsm_run *run, void *userdata);

struct fsm_transition {
        const char *name;
        fsm_step_fn step;
        fsm_commit_fn commit; /* optional */
};

struct fsm_def {
        const char *name; /* "download", "unpack", "activate" */
        const struct fsm_transition *transitions;
        size_t transition_count;
        fsm_commit_fn on_failure; /* optional: runs in the transaction that records failure */
        /*
         * Optional: write the next stage's request to the outbox (ON CONFLICT DO NOTHING).
         * Runs in the transaction that completes the run, after the last transition's commit
         * hook; and in the claim transaction when a request finds its key complete but the run
         * has no outbox row (it ran with the handoff off, as process-image does), so that the
         * pipeline goes on from there. Returns 1 when it wrote a request, 0 when none is
         * wanted, or a negative errno. The run's response is the stored one.
         */
        fsm_commit_fn handoff;
        fsm_after_fn after_failure; /* optional: runs once the failure is committed */
};

struct fsm_options {
        const char *host_id;
        const char *worker_id; /* shown as lease owner and in events */
        const char *subject;   /* image id, for the log context; optional */
        int max_attempts;
        int retry_base_ms;
        int retry_max_ms;
        struct lease_keeper *leases;
        const atomic_int *stop;    /* optional: graceful shutdown requested */
        const char *trace_id;      /* optional */
        const char *parent_run_id; /* optional: the previous stage's run */
        /*
         * Optional: where the request came from ("<topic>/<partition>/<offset>"). A failure
         * records it; a later call with the same source for the failed key is a redelivery
         * of that message and comes back FAILED without a new run.
         */
        const char *source;
};

enum fsm_outcome {
        FSM_OUTCOME_COMPLETE,         /* this call finished the run */
        FSM_OUTCOME_ALREADY_COMPLETE, /* the key's run had finished before: nothing ran */
        FSM_OUTCOME_BUSY,             /* another worker holds a live lease on the key's run */
        FSM_OUTCOME_FAILED,           /* aborted (permanent error) or out of attempts, by
                                         this call or, for a redelivery of the message that
                                         failed the key's run (opts->source), before it */
        FSM_OUTCOME_INTERRUPTED,      /* stop requested, lease lost or database unreachable */
};

struct fsm_result {
        enum fsm_outcome outcome;
        char run_id[ULID_LEN + 1];
        char *response; /* JSON text, owned; the latest saved response, may be NULL */
        int attempts;
        int error;      /* negative errno for FAILED and INTERRUPTED, else 0 */
        bool permanent; /* FAILED: true when aborted by a permanent error */
        char error_text[ERR_MSG_MAX];
        /*
         * FAILED: when the run first and last failed (ms since the epoch, the database's
         * clock), from its recorded history, so failures in earlier workers count: transient
         * errors, takeovers after an expired lease, and the final fail or abort. Else 0.
         */
        int64_t first_failure_ms;
        int64_t last_failure_ms;
        bool dead_lettered; /* FAILED before, and fsm_mark_dead_lettered() was called */
};

/*
 * Execute (or resume, or find finished) the run of @def for @key with @request_json. Returns
 * 0 with the outcome in *ret_result (also for FAILED: a failed job is a result, not an
 * error of this call), or a negative errno when the call itself could not proceed.
 */
int fsm_execute(struct db *db, const struct fsm_def *def, const struct fsm_options *opts,
                const char *key, const char *request_json, void *userdata,
                struct fsm_result *ret_result);

/* Free what a result owns. */
void fsm_result_done(struct fsm_result *result);

/*
 * Record that the failed run @run_id has its dead letter stored, so that a redelivery of the
 * message that failed it is acknowledged without a second one. Returns 0 or a negative errno.
 */
int fsm_mark_dead_lettered(struct db *db, const char *run_id);

/* For steps: */
const char *fsm_run_id(const struct fsm_run *run);
int fsm_run_attempt(const struct fsm_run *run);
const char *fsm_run_request(const struct fsm_run *run);
const char *fsm_run_host(const struct fsm_run *run);
struct db *fsm_run_db(struct fsm_run *run);

/* The response object: steps add or change fields; it is saved with each completion. */
struct json_object *fsm_run_response(struct fsm_run *run);

/* The error text of the failure being recorded (for the failure hooks), else "". */
const char *fsm_run_error(const struct fsm_run *run);

/* Whether the step should give up early: shutdown requested or the lease was lost. */
bool fsm_run_should_stop(const struct fsm_run *run);

/*
 * Backoff before retry number @attempt (1 = first retry): min(max, base * 2^(attempt-1)),
 * of which the upper half is random ("equal jitter"), so the result lies in [d/2, d].
 * @random is any 32-bit random value.
 */
int64_t fsm_backoff_ms(int attempt, int base_ms, int max_ms, uint32_t random);

/* Name of an outcome, for logs and JSON. */
const char *fsm_outcome_name(enum fsm_outcome outcome);
