#pragma once

/*
 * The `worker` process: a pool per stage (pool.h), one outbox publisher, one lease keeper and
 * one idempotent producer, until SIGTERM or SIGINT.
 *
 * Shutdown: the first signal stops consuming and sets the FSM engine's stop flag, so running
 * runs finish their current transition and release their lease; after SHUTDOWN_TIMEOUT
 * seconds at most, finished work is committed, the consumers close, the publisher sends what
 * is left and the producer is flushed; the process exits 0. A run still going at that
 * deadline is left to its lease, and the process still exits 0 (see kafka_worker_run()). A
 * second signal exits at once with status 128 + signal number (leases let another worker
 * resume).
 */

#include <stdbool.h>
#include <stddef.h>

struct config;
struct stage;

struct kafka_worker_options {
        const struct config *cfg;
        const struct stage *const *stages; /* one pool each */
        size_t nstages;
};

/*
 * Install the SIGTERM/SIGINT handlers: the first signal asks for a graceful stop, a second
 * exits at once. Call before slow start-up work (reconciliation) so that a signal during it
 * ends the process cleanly; kafka_worker_run() then returns 0 without starting. Returns 0 or
 * a negative errno.
 */
int kafka_worker_signals(void);

/*
 * Whether a stop was asked for (a signal or a fatal failure). The argument is unused: the
 * signature is db_connect_interruptible()'s, so that start-up connections end on SIGTERM.
 */
bool kafka_worker_stopping(void *unused);

/*
 * Install the signal handlers, run until SIGTERM or SIGINT (or a fatal Kafka error), and shut
 * down. Returns the process exit status: 0 after a clean shutdown, 1 when start-up failed or
 * a component failed fatally. When it returns, no thread of the worker runs any more, so the
 * caller may free @opts->cfg and exit normally.
 *
 * When a run is still going at the shutdown deadline (or when start-up fails while one is),
 * its thread still reads @opts->cfg and the libraries' global state: then this does not
 * return. It flushes stdout and stderr and ends the process with _exit() and the same status
 * (0, or 1 after a fatal failure), skipping atexit handlers; the run is left to its lease.
 */
int kafka_worker_run(const struct kafka_worker_options *opts);

/* Threads for a stage's pool: DOWNLOAD_QUEUE_SIZE, UNPACK_QUEUE_SIZE or ACTIVATE_QUEUE_SIZE. */
int kafka_worker_threads(const struct config *cfg, const struct stage *stage);
