#pragma once

/*
 * A pipeline stage as the worker and process-image see it: a name, the topic it consumes,
 * and one entry point that takes a request message (JSON) and runs the stage's FSM for it.
 *
 * The entry point decodes and validates the request (a bad one is a permanent failure of
 * class "invalid_request", nothing runs), derives the idempotency key, executes the FSM,
 * and returns the outcome. When the run completes, its last transition has written the next
 * stage's request to the outbox in the same transaction (unless ctx->handoff is false), so
 * the worker's publisher sends it afterwards. A request whose key had already completed
 * comes back as FSM_OUTCOME_ALREADY_COMPLETE with the stored response, marked
 * already_exist=true and downloaded/unpacked/activated=false.
 */

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/err.h"
#include "common/ulid.h"
#include "worker/fsm.h"

struct config;
struct db;
struct lease_keeper;

enum stage_id {
        STAGE_DOWNLOAD,
        STAGE_UNPACK,
        STAGE_ACTIVATE,
        STAGE_COUNT,
};

struct stage_ctx {
        const struct config *cfg;
        struct db *db; /* this thread's connection */
        struct lease_keeper *leases;
        const char *worker_id;
        const atomic_int *stop;    /* optional */
        const char *trace_id;      /* optional, carried to the handoff */
        const char *parent_run_id; /* optional: previous stage's run */
        const char *source;        /* optional: "<topic>/<partition>/<offset>" */
        bool handoff;              /* write the next stage's request to the outbox */
        /* Optional progress callback for terminals (process-image). */
        void (*progress)(const char *stage, uint64_t done, uint64_t total, void *userdata);
        void *progress_userdata;
};

/* Error classes as they appear in DLQ headers and `status`. */
#define STAGE_ERROR_INVALID_REQUEST "invalid_request"
#define STAGE_ERROR_PERMANENT "permanent"
#define STAGE_ERROR_EXHAUSTED "exhausted"

struct stage_result {
        enum fsm_outcome outcome;
        char run_id[ULID_LEN + 1]; /* "" when nothing ran (invalid request) */
        char *response;            /* JSON, owned, may be NULL */
        int error;                 /* negative errno for FAILED/INTERRUPTED */
        const char *error_class;   /* FAILED: one of STAGE_ERROR_*; else NULL */
        char error_text[ERR_MSG_MAX];
        int attempts;
        int64_t first_failure_ms;
        int64_t last_failure_ms;
        bool dead_lettered; /* FAILED: a redelivery whose dead letter is already stored */
        char image_id[256]; /* from the request when it decoded, for logs and metrics */
};

struct stage {
        enum stage_id id;
        const char *name; /* "download", "unpack", "activate"; also the topic suffix */
        int (*handle)(const struct stage_ctx *ctx, const char *request_json,
                      struct stage_result *ret_result);
};

/* The name of a stage id ("download", ...), also for stages not built into this binary. */
const char *stage_name(enum stage_id id);

/* The stage with this id or name; NULL when unknown. */
const struct stage *stage_get(enum stage_id id);
const struct stage *stage_by_name(const char *name);

/* The next stage after @id, or NULL after activate. */
const struct stage *stage_next(enum stage_id id);

/* Free what a result owns. */
void stage_result_done(struct stage_result *result);

/* Topic name "<prefix>.<suffix>" into @buf. Returns 0 or -ENAMETOOLONG. */
int stage_topic(const char *prefix, const char *suffix, char *buf, unsigned long size);

/* Fill @ret from an FSM result (moves the response). For stages that call fsm_execute. */
void stage_result_from_fsm(struct stage_result *ret, struct fsm_result *fsm);

/*
 * Record a request that did not decode or validate (@r, with err_last() saying why) as a
 * permanent failure of class invalid_request; nothing runs. Returns 0.
 */
int stage_result_invalid(struct stage_result *ret, const char *stage, int r);

/*
 * Run @def for one decoded request: FSM options from @ctx, the run's subject @image_id,
 * idempotency @key, and @canonical, the request as understood (defaults applied), which is
 * stored with the run and freed here (NULL means out of memory). Fills @ret. When the key had
 * already completed, the stored response says so: already_exist=true and @done_field
 * ("downloaded", "unpacked", "activated") false. Returns 0 or a negative errno when the engine
 * could not run at all.
 */
int stage_execute(const struct stage_ctx *ctx, const struct fsm_def *def, const char *key,
                  char *canonical, const char *image_id, const char *done_field, void *userdata,
                  struct stage_result *ret);

/*
 * Insert the next stage's request into the outbox (inside a commit hook's transaction).
 * Headers carry the trace id, this run's id (as the next stage's parent) and attempt 1.
 */
int stage_outbox_insert(struct db *db, const struct stage_ctx *ctx, const char *run_id,
                        enum stage_id next, const char *message_key, const char *payload);
