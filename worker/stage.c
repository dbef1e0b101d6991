#include "worker/stage.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "common/util.h"
#include "config/config.h"
#include "db/db.h"

extern const struct stage stage_download;
extern const struct stage stage_unpack;
extern const struct stage stage_activate;

static const struct stage *const stages[STAGE_COUNT] = {
        [STAGE_DOWNLOAD] = &stage_download,
        [STAGE_UNPACK] = &stage_unpack,
        [STAGE_ACTIVATE] = &stage_activate,
};

static const char *const stage_names[STAGE_COUNT] = {
        [STAGE_DOWNLOAD] = "download",
        [STAGE_UNPACK] = "unpack",
        [STAGE_ACTIVATE] = "activate",
};

const char *stage_name(enum stage_id id)
{
        return (unsigned)id < STAGE_COUNT ? stage_names[id] : "unknown";
}

const struct stage *stage_get(enum stage_id id)
{
        return (unsigned)id < STAGE_COUNT ? stages[id] : NULL;
}

const struct stage *stage_by_name(const char *name)
{
        for (size_t i = 0; i < STAGE_COUNT; i++) {
                if (stages[i] && strcmp(stages[i]->name, name) == 0)
                        return stages[i];
        }
        return NULL;
}

const struct stage *stage_next(enum stage_id id)
{
        return id + 1 < STAGE_COUNT ? stages[id + 1] : NULL;
}

void stage_result_done(struct stage_result *result)
{
        free(result->response);
        result->response = NULL;
}

int stage_topic(const char *prefix, const char *suffix, char *buf, unsigned long size)
{
        return util_snprintf(buf, size, "%s.%s", prefix, suffix);
}

void stage_result_from_fsm(struct stage_result *ret, struct fsm_result *fsm)
{
        ret->outcome = fsm->outcome;
        (void)snprintf(ret->run_id, sizeof(ret->run_id), "%s", fsm->run_id);
        ret->response = steal_ptr(fsm->response);
        ret->error = fsm->error;
        ret->attempts = fsm->attempts;
        ret->first_failure_ms = fsm->first_failure_ms;
        ret->last_failure_ms = fsm->last_failure_ms;
        ret->dead_lettered = fsm->dead_lettered;
        (void)snprintf(ret->error_text, sizeof(ret->error_text), "%s", fsm->error_text);
        if (fsm->outcome == FSM_OUTCOME_FAILED)
                ret->error_class = fsm->permanent ? STAGE_ERROR_PERMANENT : STAGE_ERROR_EXHAUSTED;
        else
                ret->error_class = NULL;
}

int stage_outbox_insert(struct db *db, const struct stage_ctx *ctx, const char *run_id,
                        enum stage_id next, const char *message_key, const char *payload)
{
        struct json_object *headers = json_object_new_object();
        char topic[256];
        const char *params[6];
        int r;

        if (!headers)
                return err_set(-ENOMEM, "out of memory");
        if (ctx->trace_id)
                json_object_object_add(headers, "trace_id", json_object_new_string(ctx->trace_id));
        json_object_object_add(headers, "parent_run_id", json_object_new_string(run_id));
        json_object_object_add(headers, "attempt", json_object_new_string("1"));
        r = stage_topic(ctx->cfg->kafka_topic_prefix, stage_name(next), topic, sizeof(topic));
        if (r < 0) {
                json_object_put(headers);
                return err_set(r, "topic name too long");
        }
        params[0] = ctx->cfg->host_id;
        params[1] = run_id;
        params[2] = topic;
        params[3] = message_key;
        params[4] = payload;
        params[5] = json_object_to_json_string_ext(headers, JSON_C_TO_STRING_PLAIN);
        r = db_exec(
                db, NULL,
                "INSERT INTO outbox (host_id, run_id, topic, message_key, payload, headers)"
                " VALUES ($1, $2, $3, $4, $5, $6::jsonb) ON CONFLICT (run_id, topic) DO NOTHING",
                6, params);
        json_object_put(headers);
        return r;
}

int stage_result_invalid(struct stage_result *ret, const char *stage, int r)
{
        ret->outcome = FSM_OUTCOME_FAILED;
        ret->error = r;
        ret->error_class = STAGE_ERROR_INVALID_REQUEST;
        (void)snprintf(ret->error_text, sizeof(ret->error_text), "invalid %s request: %s", stage,
                       err_last());
        return 0;
}

/* A response found complete from an earlier run: nothing was done by this one. */
static void stage_mark_already(struct stage_result *res, const char *done_field)
{
        struct json_object *o = res->response ? json_tokener_parse(res->response) : NULL;
        char *json;

        if (!o)
                return;
        json_object_object_add(o, done_field, json_object_new_boolean(0));
        json_object_object_add(o, "already_exist", json_object_new_boolean(1));
        json = strdup(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
        if (json) {
                free(res->response);
                res->response = json;
        }
        json_object_put(o);
}

int stage_execute(const struct stage_ctx *ctx, const struct fsm_def *def, const char *key,
                  char *canonical, const char *image_id, const char *done_field, void *userdata,
                  struct stage_result *ret)
{
        struct fsm_options opts = {
                .host_id = ctx->cfg->host_id,
                .worker_id = ctx->worker_id,
                .subject = image_id,
                .max_attempts = ctx->cfg->max_attempts,
                .retry_base_ms = ctx->cfg->retry_base_ms,
                .retry_max_ms = ctx->cfg->retry_max_ms,
                .leases = ctx->leases,
                .stop = ctx->stop,
                .trace_id = ctx->trace_id,
                .parent_run_id = ctx->parent_run_id,
                .source = ctx->source,
        };
        struct fsm_result fres = {0};
        int r;

        if (!canonical)
                return err_set(-ENOMEM, "out of memory");
        (void)snprintf(ret->image_id, sizeof(ret->image_id), "%s", image_id);
        r = fsm_execute(ctx->db, def, &opts, key, canonical, userdata, &fres);
        free(canonical);
        if (r < 0)
                return r;
        stage_result_from_fsm(ret, &fres);
        fsm_result_done(&fres);
        if (ret->outcome == FSM_OUTCOME_ALREADY_COMPLETE)
                stage_mark_already(ret, done_field);
        return 0;
}
