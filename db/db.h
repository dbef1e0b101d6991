#pragma once

/*
 * PostgreSQL access (libpq). One struct db wraps one connection and is used by one thread at
 * a time. Every libpq failure is turned into a negative errno here, and only here:
 *
 *   connection lost, admin shutdown (08xxx, 57P0x)   -ECONNRESET   transient
 *   serialization failure, deadlock (40001, 40P01)   -EAGAIN       transient
 *   out of resources (53xxx), lock timeout (55P03)   -EAGAIN       transient
 *   statement timeout, query canceled (57014)        -ETIMEDOUT    transient
 *   unique violation (23505)                         -EEXIST       permanent
 *   other integrity or SQL errors (a bug)            -EINVAL       permanent
 *
 * The message (err_last) carries the server's text and the SQLSTATE.
 */

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>

#include <libpq-fe.h>

struct db;

/* Connect to @url (conninfo or URI). Returns 0 or a negative errno (-ECONNREFUSED, ...). */
int db_connect(const char *url, struct db **ret_db);

/*
 * db_connect that asks @stop(@userdata) every 100 ms while it waits on the server, and gives
 * up with -ECANCELED when it says so: for start-up work that a signal must be able to cut
 * short even while the server does not answer. connect_timeout (default 10 s) bounds the
 * whole attempt (-ETIMEDOUT), over every host of a multi-host conninfo together.
 */
int db_connect_interruptible(const char *url, bool (*stop)(void *), void *userdata,
                             struct db **ret_db);

/* Close and free. NULL is a no-op. */
void db_free(struct db *db);

/* The server's version number (e.g. 150018), 0 when not connected. */
int db_server_version(const struct db *db);

/* The SQLSTATE of the last failed statement, or "" . Borrowed. */
const char *db_last_sqlstate(const struct db *db);

/*
 * Run one statement with text parameters ($1...). On success, *ret_res (if not NULL) gets the
 * result, which the caller frees with PQclear. NULL entries in @params are SQL NULLs.
 */
int db_exec(struct db *db, PGresult **ret_res, const char *sql, int nparams,
            const char *const *params);

/* Run one or more parameterless statements (migrations, BEGIN, COMMIT). */
int db_exec_script(struct db *db, const char *sql);

/* Run a query expected to return at most one row; returns 1 if a row came back, else 0. */
int db_query_row(struct db *db, PGresult **ret_res, const char *sql, int nparams,
                 const char *const *params);

typedef int (*db_tx_fn)(struct db *db, void *userdata);

/*
 * What a transaction returns when the connection was lost while its COMMIT was in flight:
 * it may or may not have committed. It is transient (err_is_transient), so a caller that
 * cannot tell which treats it like a crash right after the commit and repeats its step, which
 * every FSM step must survive anyway. No other db function returns -ENOTCONN.
 */
#define DB_COMMIT_UNKNOWN (-ENOTCONN)

/*
 * Run @fn inside a transaction and commit. When the transaction fails transiently
 * (serialization failure, deadlock, lost connection) before its COMMIT was sent, it is rolled
 * back, the connection is re-established if needed, and the whole function is run again, up
 * to a few times with a short backoff; so @fn must only touch the database and its own
 * userdata. A non-transient error from @fn rolls back and is returned as is. A positive
 * return of @fn is committed and returned. When the connection is lost during COMMIT, @fn is
 * not run again blindly: db_tx returns DB_COMMIT_UNKNOWN.
 */
int db_tx(struct db *db, db_tx_fn fn, void *userdata);

/*
 * Whether the transaction that @fn ran last is in the database: 1 yes, 0 no, or a negative
 * errno. Called on a fresh connection, with the userdata @fn filled in; it should look for
 * something only that transaction wrote (e.g. a row keyed by a per-execution token).
 */
typedef int (*db_tx_check_fn)(struct db *db, void *userdata);

/*
 * db_tx, resolving a lost COMMIT: reconnect and ask @committed. If it committed, return what
 * @fn returned; if not, run @fn again like any transient failure. When the connection cannot
 * be re-established within the attempts, return DB_COMMIT_UNKNOWN. @committed may be NULL
 * (that is db_tx).
 */
int db_tx_checked(struct db *db, db_tx_fn fn, db_tx_check_fn committed, void *userdata);

/* Re-establish a broken connection. */
int db_reconnect(struct db *db);

/*
 * Apply every compiled-in migration not yet applied, in order, in one transaction under an
 * advisory lock (concurrent runs wait for each other and then find nothing to do), recording
 * each one's SHA-256. Refuses (-ESTALE, naming it) when an applied migration's text differs
 * from what was recorded; migrations applied before checksums were kept are recorded with
 * this binary's. *ret_applied gets the number applied, *ret_version the resulting version.
 */
int db_migrate(struct db *db, int *ret_applied, int *ret_version);

/* The schema version recorded in the database (0 when never migrated). */
int db_schema_version(struct db *db, int *ret_version);

/* The newest schema version this binary knows. */
int db_schema_latest(void);

/*
 * Refuse to work against a schema older or newer than this binary's, or one whose applied
 * migrations were changed since: returns -ESTALE with a message that says what fixes it (run
 * migrate, upgrade the binary, restore the migration).
 */
int db_schema_check(struct db *db);

/* A timestamptz column rendered as RFC 3339 UTC with milliseconds, for SELECT lists. */
#define DB_TIME(col) "to_char(" col " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

/* Helpers for reading results. */
const char *db_get(const PGresult *res, int row, int col); /* NULL for SQL NULL */
int64_t db_get_i64(const PGresult *res, int row, int col); /* 0 for SQL NULL */
