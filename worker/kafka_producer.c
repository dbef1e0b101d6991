#include "worker/kafka_producer.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "config/config.h"
#include "worker/kafka_client.h"

struct kafka_producer {
        rd_kafka_t *rk;
        pthread_t thread;
        bool thread_started;
        atomic_bool stopping;
        atomic_bool failed;
        /* Guards every struct kafka_delivery between send and report. */
        pthread_mutex_t lock;
        pthread_cond_t reported;
};

/* Delivery reports run on our delivery thread, inside rd_kafka_poll(). */
static void kafka_producer_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque)
{
        struct kafka_producer *p = opaque;
        struct kafka_delivery *d = msg->_private;

        (void)rk;
        if (!d)
                return;
        pthread_mutex_lock(&p->lock);
        d->err = msg->err;
        d->partition = msg->partition;
        d->offset = msg->offset;
        d->done = true;
        pthread_cond_broadcast(&p->reported);
        pthread_mutex_unlock(&p->lock);
}

static void kafka_producer_error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
        struct kafka_producer *p = opaque;
        char fatal[512];

        if (err != RD_KAFKA_RESP_ERR__FATAL) {
                /* Transient trouble (broker down, ...): librdkafka retries on its own. */
                log_warning("kafka producer error, will retry", "kafka_error=%s reason=%s",
                            rd_kafka_err2name((rd_kafka_resp_err_t)err), log_quote(reason));
                return;
        }
        (void)rd_kafka_fatal_error(rk, fatal, sizeof(fatal));
        atomic_store(&p->failed, true);
        log_err("kafka producer failed fatally, restart needed", "reason=%s", log_quote(fatal));
}

static void *kafka_producer_main(void *arg)
{
        struct kafka_producer *p = arg;

        while (!atomic_load(&p->stopping))
                (void)rd_kafka_poll(p->rk, 100);
        return NULL;
}

int kafka_producer_new(const struct config *cfg, const char *name, int timeout_ms,
                       struct kafka_producer **ret)
{
        char timeout[16];
        const char *const props[] = {
                "enable.idempotence", "true", "message.timeout.ms", timeout, NULL,
        };
        struct kafka_producer *p = NULL;
        rd_kafka_conf_t *conf = NULL;
        sigset_t all, old;
        int r;

        (void)snprintf(timeout, sizeof(timeout), "%d", timeout_ms);
        p = calloc(1, sizeof(*p));
        if (!p)
                return err_set(-ENOMEM, "out of memory");
        pthread_mutex_init(&p->lock, NULL);
        pthread_cond_init(&p->reported, NULL);
        atomic_init(&p->stopping, false);
        atomic_init(&p->failed, false);
        r = kafka_client_conf_new(cfg, RD_KAFKA_PRODUCER, name, props, &conf);
        if (r < 0)
                goto fail;
        rd_kafka_conf_set_opaque(conf, p);
        rd_kafka_conf_set_dr_msg_cb(conf, kafka_producer_dr_cb);
        rd_kafka_conf_set_error_cb(conf, kafka_producer_error_cb);
        /* rd_kafka_new() takes the conf, also when it fails. */
        r = kafka_client_new(RD_KAFKA_PRODUCER, conf, &p->rk);
        conf = NULL;
        if (r < 0)
                goto fail;
        /* Signals are for the main thread only. */
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        r = pthread_create(&p->thread, NULL, kafka_producer_main, p);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (r != 0) {
                r = err_set(-r, "failed to start the producer thread: %s", strerror(r));
                goto fail;
        }
        p->thread_started = true;
        *ret = p;
        return 0;
fail:
        kafka_producer_free(p, 0);
        return r;
}

void kafka_producer_free(struct kafka_producer *p, int timeout_ms)
{
        if (!p)
                return;
        if (p->rk) {
                rd_kafka_resp_err_t err = rd_kafka_flush(p->rk, timeout_ms);

                if (err) {
                        log_warning("kafka producer not flushed, dropping its queue",
                                    "outq=%d kafka_error=%s", rd_kafka_outq_len(p->rk),
                                    rd_kafka_err2name(err));
                        (void)rd_kafka_purge(p->rk,
                                             RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
                        /* Serve the purge reports so that no waiter is left hanging. */
                        (void)rd_kafka_flush(p->rk, 1000);
                }
        }
        if (p->thread_started) {
                atomic_store(&p->stopping, true);
                (void)pthread_join(p->thread, NULL);
        }
        if (p->rk)
                rd_kafka_destroy(p->rk);
        pthread_cond_destroy(&p->reported);
        pthread_mutex_destroy(&p->lock);
        free(p);
}

int kafka_producer_send(struct kafka_producer *p, const struct kafka_record *rec,
                        struct kafka_delivery *d)
{
        rd_kafka_headers_t *hdrs = rec->headers;
        rd_kafka_resp_err_t err;

        memset(d, 0, sizeof(*d));
        for (;;) {
                err = rd_kafka_producev(p->rk, RD_KAFKA_V_TOPIC(rec->topic),
                                        RD_KAFKA_V_KEY((void *)rec->key, rec->key_len),
                                        RD_KAFKA_V_VALUE((void *)rec->value, rec->value_len),
                                        RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                        RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_OPAQUE(d),
                                        RD_KAFKA_V_END);
                if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
                        break;
                /* The delivery thread drains the queue; give it a moment. */
                util_sleep_ms(10);
        }
        if (err) {
                /* On failure the headers were not taken over. */
                if (hdrs)
                        rd_kafka_headers_destroy(hdrs);
                return kafka_client_errno(err, "failed to queue a Kafka message");
        }
        return 0;
}

int kafka_producer_wait(struct kafka_producer *p, struct kafka_delivery *d)
{
        rd_kafka_resp_err_t err;

        pthread_mutex_lock(&p->lock);
        while (!d->done)
                pthread_cond_wait(&p->reported, &p->lock);
        err = d->err;
        pthread_mutex_unlock(&p->lock);
        if (err)
                return kafka_client_errno(err, "Kafka delivery failed");
        return 0;
}

int kafka_producer_send_sync(struct kafka_producer *p, const struct kafka_record *rec,
                             struct kafka_delivery *ret_delivery)
{
        int r;

        r = kafka_producer_send(p, rec, ret_delivery);
        if (r < 0)
                return r;
        return kafka_producer_wait(p, ret_delivery);
}

bool kafka_producer_failed(const struct kafka_producer *p)
{
        return atomic_load(&((struct kafka_producer *)p)->failed);
}

rd_kafka_t *kafka_producer_handle(struct kafka_producer *p)
{
        return p->rk;
}

rd_kafka_headers_t *kafka_headers_new(size_t count, const char *const *names,
                                      const char *const *values)
{
        rd_kafka_headers_t *hdrs = rd_kafka_headers_new(count);

        if (!hdrs)
                return NULL;
        for (size_t i = 0; i < count; i++) {
                if (!values[i])
                        continue;
                (void)rd_kafka_header_add(hdrs, names[i], -1, values[i], -1);
        }
        return hdrs;
}
