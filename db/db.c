#include "db/db.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "db/migrations.h"

/* Any fixed number: the key of the advisory lock that serialises migrations. */
#define DB_MIGRATION_LOCK_KEY "7263190641"
#define DB_TX_ATTEMPTS 5

struct db {
        PGconn *conn;
        char sqlstate[6];
};

static void db_notice_processor(void *arg, const char *message)
{
        (void)arg;
        log_debug("postgres notice", "text=%s", log_quote(message));
}

/* Map a failed libpq call to a negative errno; the single place that knows SQLSTATEs. */
static int db_error(struct db *db, const PGresult *res)
{
        const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
        const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
        const char *text = primary ? primary : PQerrorMessage(db->conn);
        int len = (int)strcspn(text, "\n");
        int r;

        (void)snprintf(db->sqlstate, sizeof(db->sqlstate), "%s", state ? state : "");
        if (PQstatus(db->conn) == CONNECTION_BAD || !state || strncmp(state, "08", 2) == 0 ||
            strncmp(state, "57P", 3) == 0)
                r = -ECONNRESET;
        else if (strcmp(state, "40001") == 0 || strcmp(state, "40P01") == 0 ||
                 strncmp(state, "53", 2) == 0 || strcmp(state, "55P03") == 0)
                r = -EAGAIN;
        else if (strcmp(state, "57014") == 0)
                r = -ETIMEDOUT; /* statement_timeout or a cancel: worth another try later */
        else if (strcmp(state, "23505") == 0)
                r = -EEXIST;
        else
                r = -EINVAL;
        if (state)
                return err_set(r, "postgres: %.*s (SQLSTATE %s)", len, text, state);
        return err_set(r, "postgres: %.*s", len, text);
}

/* Defaults that an operator's conninfo can still override. */
static const char *const db_connect_keys[] = {"connect_timeout", "application_name",
                                              "keepalives_idle", "dbname", NULL};
#define DB_CONNECT_TIMEOUT_DEFAULT "10"

/* The connect_timeout that applies to @conn, in ms; 0 means none (libpq's meaning). */
static int64_t db_connect_timeout_ms(PGconn *conn)
{
        PQconninfoOption *opts = PQconninfo(conn);
        int64_t ms = 0;

        for (PQconninfoOption *o = opts; o && o->keyword; o++) {
                if (strcmp(o->keyword, "connect_timeout") == 0 && o->val) {
                        uint64_t secs;

                        /* libpq reads garbage as 0 and anything below 2 as 2 seconds. */
                        if (util_parse_u64(o->val, &secs) == 0 && secs > 0)
                                ms = (int64_t)(secs < 2 ? 2 : secs > 86400 ? 86400 : secs) * 1000;
                }
        }
        PQconninfoFree(opts);
        return ms;
}

/*
 * Drive PQconnectPoll until the connection is made or fails, waiting at most
 * DB_CONNECT_SLICE_MS at a time so that @stop is asked often. 0, -ECANCELED or -ETIMEDOUT.
 */
#define DB_CONNECT_SLICE_MS 100
static int db_connect_poll(PGconn *conn, bool (*stop)(void *), void *userdata)
{
        int64_t timeout_ms = db_connect_timeout_ms(conn);
        int64_t deadline = util_now_monotonic_ms() + timeout_ms;
        PostgresPollingStatusType st = PGRES_POLLING_WRITING;

        while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED) {
                struct pollfd pfd = {.fd = PQsocket(conn)};
                int64_t left = deadline - util_now_monotonic_ms();
                int n;

                if (stop(userdata))
                        return err_set(-ECANCELED, "connecting to PostgreSQL was interrupted");
                if (timeout_ms > 0 && left <= 0)
                        return err_set(
                                -ETIMEDOUT,
                                "failed to connect to PostgreSQL: timeout expired after %lld s",
                                (long long)(timeout_ms / 1000));
                pfd.events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT;
                n = poll(&pfd, 1,
                         (int)(timeout_ms > 0 && left < DB_CONNECT_SLICE_MS ? left
                                                                            : DB_CONNECT_SLICE_MS));
                if (n < 0 && errno != EINTR)
                        return err_set(-errno, "failed to connect to PostgreSQL: poll: %s",
                                       strerror(errno));
                if (n > 0 || pfd.fd < 0)
                        st = PQconnectPoll(conn);
        }
        return 0;
}

int db_connect_interruptible(const char *url, bool (*stop)(void *), void *userdata,
                             struct db **ret_db)
{
        const char *vals[] = {DB_CONNECT_TIMEOUT_DEFAULT, "flyio-image-manager", "30", url, NULL};
        struct db *db = NULL;
        int r;

        db = calloc(1, sizeof(*db));
        if (!db)
                return err_set(-ENOMEM, "out of memory");
        if (stop)
                db->conn = PQconnectStartParams(db_connect_keys, vals, 1);
        else
                db->conn = PQconnectdbParams(db_connect_keys, vals, 1);
        if (!db->conn) {
                r = err_set(-ENOMEM, "out of memory");
                goto out;
        }
        if (stop && PQstatus(db->conn) != CONNECTION_BAD) {
                r = db_connect_poll(db->conn, stop, userdata);
                if (r < 0)
                        goto out;
        }
        if (PQstatus(db->conn) != CONNECTION_OK) {
                const char *msg = PQerrorMessage(db->conn);

                r = err_set(-ECONNREFUSED, "failed to connect to PostgreSQL: %.*s",
                            (int)strcspn(msg, "\n"), msg);
                goto out;
        }
        (void)PQsetNoticeProcessor(db->conn, db_notice_processor, NULL);
        *ret_db = steal_ptr(db);
        r = 0;
out:
        db_free(db);
        return r;
}

int db_connect(const char *url, struct db **ret_db)
{
        return db_connect_interruptible(url, NULL, NULL, ret_db);
}

void db_free(struct db *db)
{
        if (!db)
                return;
        PQfinish(db->conn);
        free(db);
}

int db_server_version(const struct db *db)
{
        return PQserverVersion(db->conn);
}

const char *db_last_sqlstate(const struct db *db)
{
        return db->sqlstate;
}

int db_reconnect(struct db *db)
{
        PQreset(db->conn);
        if (PQstatus(db->conn) != CONNECTION_OK) {
                const char *msg = PQerrorMessage(db->conn);

                return err_set(-ECONNRESET, "failed to reconnect to PostgreSQL: %.*s",
                               (int)strcspn(msg, "\n"), msg);
        }
        return 0;
}

int db_exec(struct db *db, PGresult **ret_res, const char *sql, int nparams,
            const char *const *params)
{
        PGresult *res;
        ExecStatusType st;
        int r;

        res = PQexecParams(db->conn, sql, nparams, NULL, params, NULL, NULL, 0);
        st = PQresultStatus(res);
        if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
                r = db_error(db, res);
                PQclear(res);
                return r;
        }
        db->sqlstate[0] = '\0';
        if (ret_res)
                *ret_res = res;
        else
                PQclear(res);
        return 0;
}

int db_exec_script(struct db *db, const char *sql)
{
        PGresult *res = PQexec(db->conn, sql);
        ExecStatusType st = PQresultStatus(res);
        int r = 0;

        if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && st != PGRES_EMPTY_QUERY)
                r = db_error(db, res);
        PQclear(res);
        return r;
}

int db_query_row(struct db *db, PGresult **ret_res, const char *sql, int nparams,
                 const char *const *params)
{
        PGresult *res = NULL;
        int r;

        r = db_exec(db, &res, sql, nparams, params);
        if (r < 0)
                return r;
        if (PQntuples(res) == 0) {
                PQclear(res);
                return 0;
        }
        *ret_res = res;
        return 1;
}

/*
 * BEGIN, @fn, COMMIT once. Returns 0 with @fn's result in *ret_result once committed; a
 * negative errno when it rolled back (or never began); or DB_COMMIT_UNKNOWN when the
 * connection was lost while COMMIT was in flight, so that nobody knows whether it committed.
 */
static int db_tx_once(struct db *db, db_tx_fn fn, void *userdata, int *ret_result)
{
        int r, commit;

        r = db_exec_script(db, "BEGIN");
        if (r < 0)
                return r;
        r = fn(db, userdata);
        if (r < 0) {
                /* Keep fn's message: the rollback's own outcome matters less. */
                if (PQstatus(db->conn) != CONNECTION_BAD)
                        PQclear(PQexec(db->conn, "ROLLBACK"));
                return r;
        }
        *ret_result = r;
        commit = db_exec_script(db, "COMMIT");
        if (commit == 0)
                return 0;
        /*
         * A server that answers COMMIT with an error (a serialization failure or a deferred
         * constraint) has rolled back. A lost connection tells nothing: the commit record may
         * have been written just before it dropped.
         */
        if (commit != -ECONNRESET)
                return commit;
        return err_wrap(
                DB_COMMIT_UNKNOWN,
                "connection lost during COMMIT, the transaction may or may not have committed");
}

int db_tx_checked(struct db *db, db_tx_fn fn, db_tx_check_fn committed, void *userdata)
{
        bool unknown = false;
        int result = 0, r = 0;

        for (int attempt = 1; attempt <= DB_TX_ATTEMPTS; attempt++) {
                if (attempt > 1) {
                        log_debug("retrying transaction", "attempt=%d sqlstate=%s unknown=%d",
                                  attempt, db->sqlstate, unknown);
                        util_sleep_ms(20LL << attempt);
                }
                if (PQstatus(db->conn) == CONNECTION_BAD) {
                        r = db_reconnect(db);
                        if (r < 0)
                                continue;
                }
                if (unknown) {
                        /* Find out before doing anything twice. */
                        r = committed(db, userdata);
                        if (r > 0)
                                return result;
                        if (r < 0 && r != -EAGAIN && r != -ECONNRESET)
                                return r;
                        if (r < 0)
                                continue;
                        unknown = false;
                }
                r = db_tx_once(db, fn, userdata, &result);
                if (r == 0)
                        return result;
                if (r == DB_COMMIT_UNKNOWN) {
                        if (!committed)
                                return r;
                        unknown = true;
                        continue;
                }
                /* Only database-level transient failures repeat the transaction. */
                if (r != -EAGAIN && r != -ECONNRESET)
                        return r;
        }
        if (unknown)
                return err_wrap(
                        DB_COMMIT_UNKNOWN,
                        "could not find out whether a transaction committed after its connection was lost");
        return r;
}

int db_tx(struct db *db, db_tx_fn fn, void *userdata)
{
        return db_tx_checked(db, fn, NULL, userdata);
}

int db_schema_latest(void)
{
        return db_migrations_count ? db_migrations[db_migrations_count - 1].version : 0;
}

int db_schema_version(struct db *db, int *ret_version)
{
        PGresult *res = NULL;
        int r;

        r = db_query_row(db, &res, "SELECT to_regclass('schema_migrations') IS NOT NULL", 0, NULL);
        if (r < 0)
                return r;
        if (strcmp(db_get(res, 0, 0), "t") != 0) {
                PQclear(res);
                *ret_version = 0;
                return 0;
        }
        PQclear(res);
        r = db_query_row(db, &res, "SELECT coalesce(max(version), 0) FROM schema_migrations", 0,
                         NULL);
        if (r < 0)
                return r;
        *ret_version = (int)db_get_i64(res, 0, 0);
        PQclear(res);
        return 0;
}

struct db_migrate_state {
        int applied;
        int version;
};

static const struct db_migration *db_migration_find(int version)
{
        for (unsigned i = 0; i < db_migrations_count; i++) {
                if (db_migrations[i].version == version)
                        return &db_migrations[i];
        }
        return NULL;
}

/*
 * Compare the checksum recorded for each applied migration with this binary's copy: a
 * migration edited after it ran means the database does not have the schema this binary
 * describes. With @record, migrations applied before checksums were kept get this binary's
 * (the first binary to look vouches for them). Returns 0 or -ESTALE naming the migration.
 */
static int db_migrations_verify(struct db *db, bool record)
{
        PGresult *res = NULL;
        int r;

        r = db_exec(db, &res, "SELECT version, checksum FROM schema_migrations ORDER BY version", 0,
                    NULL);
        if (r < 0)
                return r;
        for (int i = 0; i < PQntuples(res) && r == 0; i++) {
                const struct db_migration *m = db_migration_find((int)db_get_i64(res, i, 0));
                const char *sum = db_get(res, i, 1);

                if (!m)
                        continue; /* newer than this binary: db_schema_check says so */
                if (!sum && record)
                        r = db_exec(db, NULL,
                                    "UPDATE schema_migrations SET checksum = $2 WHERE version = $1",
                                    2, (const char *const[]){db_get(res, i, 0), m->checksum});
                else if (sum && strcmp(sum, m->checksum) != 0)
                        r = err_set(
                                -ESTALE,
                                "migration %04d_%s was changed after it was applied: the database recorded SHA-256 %.12s..., this binary's copy is %.12s...; restore the applied text of migrations/%04d_%s.sql and put the change in a new migration",
                                m->version, m->name, sum, m->checksum, m->version, m->name);
        }
        PQclear(res);
        return r;
}

static int db_migrate_tx(struct db *db, void *userdata)
{
        struct db_migrate_state *st = userdata;
        int current;
        int r;

        st->applied = 0;
        r = db_exec_script(db, "SELECT pg_advisory_xact_lock(" DB_MIGRATION_LOCK_KEY ")");
        if (r < 0)
                return r;
        r = db_exec_script(db,
                           "CREATE TABLE IF NOT EXISTS schema_migrations ("
                           " version integer PRIMARY KEY,"
                           " name text NOT NULL,"
                           " applied_at timestamptz NOT NULL DEFAULT now(),"
                           " checksum text);"
                           "ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text");
        if (r < 0)
                return r;
        r = db_migrations_verify(db, true);
        if (r < 0)
                return r;
        r = db_schema_version(db, &current);
        if (r < 0)
                return r;
        for (unsigned i = 0; i < db_migrations_count; i++) {
                const struct db_migration *m = &db_migrations[i];
                char version[16];
                const char *params[3] = {version, m->name, m->checksum};

                if (m->version <= current)
                        continue;
                r = db_exec_script(db, m->sql);
                if (r < 0)
                        return err_wrap(r, "failed to apply migration %04d_%s", m->version,
                                        m->name);
                (void)snprintf(version, sizeof(version), "%d", m->version);
                r = db_exec(db, NULL,
                            "INSERT INTO schema_migrations (version, name, checksum)"
                            " VALUES ($1, $2, $3)",
                            3, params);
                if (r < 0)
                        return r;
                st->applied++;
                current = m->version;
        }
        st->version = current;
        return 0;
}

int db_migrate(struct db *db, int *ret_applied, int *ret_version)
{
        struct db_migrate_state st = {0};
        int r;

        r = db_tx(db, db_migrate_tx, &st);
        if (r < 0)
                return r;
        *ret_applied = st.applied;
        *ret_version = st.version;
        return 0;
}

int db_schema_check(struct db *db)
{
        int version, latest = db_schema_latest();
        PGresult *res = NULL;
        int r;

        r = db_schema_version(db, &version);
        if (r < 0)
                return r;
        if (version < latest)
                return err_set(
                        -ESTALE,
                        "database schema is at version %d but this binary needs version %d: run 'flyio-image-manager migrate'",
                        version, latest);
        if (version > latest)
                return err_set(
                        -ESTALE,
                        "database schema is at version %d, newer than this binary knows (%d): upgrade flyio-image-manager",
                        version, latest);
        /* A database migrated before checksums were kept has none to compare yet. */
        r = db_query_row(
                db, &res,
                "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('schema_migrations')"
                " AND attname = 'checksum' AND NOT attisdropped",
                0, NULL);
        if (r <= 0)
                return r;
        PQclear(res);
        return db_migrations_verify(db, false);
}

const char *db_get(const PGresult *res, int row, int col)
{
        if (PQgetisnull(res, row, col))
                return NULL;
        return PQgetvalue(res, row, col);
}

int64_t db_get_i64(const PGresult *res, int row, int col)
{
        const char *v = db_get(res, row, col);

        return v ? strtoll(v, NULL, 10) : 0;
}
