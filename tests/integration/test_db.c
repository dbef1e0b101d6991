/* db/ against a real PostgreSQL: migrations, error mapping, transaction retries. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/util.h"
#include "db/db.h"
#include "db/migrations.h"
#include "helper_pg.h"
#include "helper_pgproxy.h"

static void test_db_migrate_from_empty_then_noop(void **state)
{
        char url[512];
        struct db *db;
        int applied = -1, version = -1;

        (void)state;
        pg_test_create_empty(url, sizeof(url));
        db = pg_test_connect(url);

        assert_int_equal(db_schema_version(db, &version), 0);
        assert_int_equal(version, 0);
        assert_int_equal(db_schema_check(db), -ESTALE);
        assert_non_null(strstr(err_last(), "run 'flyio-image-manager migrate'"));

        assert_int_equal(db_migrate(db, &applied, &version), 0);
        assert_int_equal(applied, (int)db_migrations_count);
        assert_int_equal(version, db_schema_latest());
        assert_int_equal(db_schema_check(db), 0);
        assert_int_equal(pg_test_scalar(db, "SELECT count(*) FROM schema_migrations"),
                         (long)db_migrations_count);

        assert_int_equal(db_migrate(db, &applied, &version), 0);
        assert_int_equal(applied, 0);
        assert_int_equal(version, db_schema_latest());

        /* A database newer than the binary is refused too. */
        assert_int_equal(db_exec_script(db, "INSERT INTO schema_migrations (version, name)"
                                            " VALUES (9999, 'from_the_future')"),
                         0);
        assert_int_equal(db_schema_check(db), -ESTALE);
        assert_non_null(strstr(err_last(), "upgrade flyio-image-manager"));
        db_free(db);
        pg_test_drop(url);
}

static void test_db_concurrent_migrations_are_safe(void **state)
{
        char url[512];
        pid_t pids[4];
        struct db *db;

        (void)state;
        pg_test_create_empty(url, sizeof(url));
        for (int i = 0; i < 4; i++) {
                pids[i] = fork();
                assert_true(pids[i] >= 0);
                if (pids[i] == 0) {
                        struct db *child = NULL;
                        int applied, version;

                        if (db_connect(url, &child) < 0 ||
                            db_migrate(child, &applied, &version) < 0 ||
                            version != db_schema_latest())
                                _exit(1);
                        db_free(child);
                        _exit(0);
                }
        }
        for (int i = 0; i < 4; i++) {
                int status;

                assert_int_equal(waitpid(pids[i], &status, 0), pids[i]);
                assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        }
        db = pg_test_connect(url);
        assert_int_equal(pg_test_scalar(db, "SELECT count(*) FROM schema_migrations"),
                         (long)db_migrations_count);
        db_free(db);
        pg_test_drop(url);
}

static void test_db_error_mapping(void **state)
{
        char url[512];
        struct db *db;

        (void)state;
        pg_test_create(url, sizeof(url));
        db = pg_test_connect(url);
        assert_int_equal(db_exec_script(db, "CREATE TABLE t (k int PRIMARY KEY)"), 0);
        assert_int_equal(db_exec_script(db, "INSERT INTO t VALUES (1)"), 0);
        assert_int_equal(db_exec_script(db, "INSERT INTO t VALUES (1)"), -EEXIST);
        assert_non_null(strstr(err_last(), "SQLSTATE 23505"));
        assert_string_equal(db_last_sqlstate(db), "23505");
        assert_false(err_is_transient(-EEXIST));

        assert_int_equal(db_exec_script(db, "SELECT * FROM no_such_table"), -EINVAL);
        assert_non_null(strstr(err_last(), "SQLSTATE 42P01"));

        assert_int_equal(
                db_exec_script(db,
                               "DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '40001'; END $$"),
                -EAGAIN);
        assert_true(err_is_transient(-EAGAIN));
        assert_int_equal(
                db_exec_script(db,
                               "DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = '40P01'; END $$"),
                -EAGAIN);

        /* A statement timeout (or a cancel) is worth another try later. */
        assert_int_equal(db_exec_script(db, "SET statement_timeout = '50ms';"
                                            " SELECT pg_sleep(2)"),
                         -ETIMEDOUT);
        assert_string_equal(db_last_sqlstate(db), "57014");
        assert_true(err_is_transient(-ETIMEDOUT));
        assert_int_equal(db_exec_script(db, "RESET statement_timeout"), 0);

        /* The server ends our session: a lost connection, transient. */
        assert_int_equal(db_exec_script(db, "SELECT pg_terminate_backend(pg_backend_pid())"),
                         -ECONNRESET);
        assert_true(err_is_transient(-ECONNRESET));
        assert_int_equal(db_reconnect(db), 0);
        assert_int_equal(pg_test_scalar(db, "SELECT count(*) FROM t"), 1);
        db_free(db);
        pg_test_drop(url);
}

struct flaky {
        int calls;
        int fail_times;
        const char *how;
};

static int flaky_tx(struct db *db, void *userdata)
{
        struct flaky *f = userdata;
        int r;

        f->calls++;
        r = db_exec_script(db, "INSERT INTO t2 VALUES (1)");
        if (r < 0)
                return r;
        if (f->calls <= f->fail_times)
                return db_exec_script(db, f->how);
        return 0;
}

static void test_db_tx_retries_transient_failures(void **state)
{
        char url[512];
        struct db *db;
        struct flaky serial = {0, 2,
                               "DO $$ BEGIN RAISE EXCEPTION 's' USING ERRCODE = '40001'; END $$"};
        struct flaky lost = {0, 1, "SELECT pg_terminate_backend(pg_backend_pid())"};
        struct flaky bug = {0, 1, "SELECT * FROM no_such_table"};

        (void)state;
        pg_test_create(url, sizeof(url));
        db = pg_test_connect(url);
        assert_int_equal(db_exec_script(db, "CREATE TABLE t2 (k int)"), 0);

        assert_int_equal(db_tx(db, flaky_tx, &serial), 0);
        assert_int_equal(serial.calls, 3);
        /* Rolled-back attempts left nothing behind: exactly one row. */
        assert_int_equal(pg_test_scalar(db, "SELECT count(*) FROM t2"), 1);

        assert_int_equal(db_tx(db, flaky_tx, &lost), 0);
        assert_int_equal(lost.calls, 2);
        assert_int_equal(pg_test_scalar(db, "SELECT count(*) FROM t2"), 2);

        /* A permanent error is not retried and leaves nothing. */
        assert_int_equal(db_tx(db, flaky_tx, &bug), -EINVAL);
        assert_int_equal(bug.calls, 1);
        assert_int_equal(pg_test_scalar(db, "SELECT count(*) FROM t2"), 2);
        db_free(db);
        pg_test_drop(url);
}

/* ---- a connection lost during COMMIT ------------------------------------------------------ */

struct counted {
        int calls;
        int checks;
};

static int counted_insert_tx(struct db *db, void *userdata)
{
        struct counted *c = userdata;

        c->calls++;
        return db_exec_script(db, "INSERT INTO t3 VALUES (1)") < 0 ? -EINVAL : 7;
}

/* The row that counted_insert_tx writes is the proof that its transaction committed. */
static int counted_check(struct db *db, void *userdata)
{
        struct counted *c = userdata;

        c->checks++;
        return pg_test_scalar(db, "SELECT count(*) FROM t3") > 0 ? 1 : 0;
}

/* A check that cannot reach the database. */
static int unreachable_check(struct db *db, void *userdata)
{
        struct counted *c = userdata;

        (void)db;
        c->checks++;
        return err_set(-ECONNRESET, "postgres: no connection to the server");
}

/*
 * db_tx never runs a transaction again when it cannot know whether its COMMIT went through:
 * it says so (DB_COMMIT_UNKNOWN). db_tx_checked asks, and either returns what the committed
 * transaction returned or runs it again. Both outcomes of a lost COMMIT are made exactly: the
 * proxy drops the connection instead of forwarding COMMIT (it cannot commit) or instead of
 * forwarding the server's reply to it (it has committed).
 */
static void test_db_tx_lost_commit_is_not_blindly_repeated(void **state)
{
        char url[512], purl[600];
        struct pgproxy *proxy;
        struct db *db, *direct;

        (void)state;
        pg_test_create(url, sizeof(url));
        direct = pg_test_connect(url);
        assert_int_equal(db_exec_script(direct, "CREATE TABLE t3 (k int)"), 0);
        proxy = pgproxy_start(url);
        pgproxy_url(proxy, url, purl, sizeof(purl));
        db = pg_test_connect(purl);

        {
                /* Committed, reply lost: db_tx reports it and does not insert twice. */
                struct counted c = {0};

                pgproxy_arm_commit(proxy, PGPROXY_COMMIT_DROP_AFTER);
                assert_int_equal(db_tx(db, counted_insert_tx, &c), DB_COMMIT_UNKNOWN);
                assert_true(pgproxy_commit_fault_done(proxy));
                assert_non_null(strstr(err_last(), "may or may not have committed"));
                assert_true(err_is_transient(DB_COMMIT_UNKNOWN));
                assert_int_equal(c.calls, 1);
                assert_int_equal(pg_test_scalar(direct, "SELECT count(*) FROM t3"), 1);
        }
        {
                /* Never committed: db_tx reports it too; the caller's retry is safe. */
                struct counted c = {0};

                assert_int_equal(db_exec_script(direct, "TRUNCATE t3"), 0);
                pgproxy_arm_commit(proxy, PGPROXY_COMMIT_DROP_BEFORE);
                assert_int_equal(db_tx(db, counted_insert_tx, &c), DB_COMMIT_UNKNOWN);
                assert_int_equal(c.calls, 1);
                assert_int_equal(pg_test_scalar(direct, "SELECT count(*) FROM t3"), 0);
        }
        {
                /* Checked, committed: fn's result comes back, fn ran once. */
                struct counted c = {0};

                pgproxy_arm_commit(proxy, PGPROXY_COMMIT_DROP_AFTER);
                assert_int_equal(db_tx_checked(db, counted_insert_tx, counted_check, &c), 7);
                assert_int_equal(c.calls, 1);
                assert_int_equal(c.checks, 1);
                assert_int_equal(pg_test_scalar(direct, "SELECT count(*) FROM t3"), 1);
        }
        {
                /* Checked, not committed: run again, once. */
                struct counted c = {0};

                assert_int_equal(db_exec_script(direct, "TRUNCATE t3"), 0);
                pgproxy_arm_commit(proxy, PGPROXY_COMMIT_DROP_BEFORE);
                assert_int_equal(db_tx_checked(db, counted_insert_tx, counted_check, &c), 7);
                assert_int_equal(c.calls, 2);
                assert_int_equal(c.checks, 1);
                assert_int_equal(pg_test_scalar(direct, "SELECT count(*) FROM t3"), 1);
        }
        {
                /* Unknown until the attempts run out: fn is never run a second time. */
                struct counted c = {0};

                assert_int_equal(db_exec_script(direct, "TRUNCATE t3"), 0);
                pgproxy_arm_commit(proxy, PGPROXY_COMMIT_DROP_BEFORE);
                assert_int_equal(db_tx_checked(db, counted_insert_tx, unreachable_check, &c),
                                 DB_COMMIT_UNKNOWN);
                assert_non_null(strstr(err_last(), "could not find out whether"));
                assert_int_equal(c.calls, 1);
                assert_true(c.checks >= 2);
        }
        db_free(db);
        pgproxy_stop(proxy);
        db_free(direct);
        pg_test_drop(url);
}

/*
 * The same without a proxy, as the server does it: a deferred constraint trigger ends the
 * session in the middle of COMMIT, before the commit record.
 */
static void test_db_tx_commit_killed_by_the_server(void **state)
{
        char url[512];
        struct db *db, *direct;
        struct counted c = {0};

        (void)state;
        pg_test_create(url, sizeof(url));
        direct = pg_test_connect(url);
        assert_int_equal(
                db_exec_script(
                        direct,
                        "CREATE TABLE t3 (k int);"
                        "CREATE FUNCTION kill_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$"
                        " BEGIN"
                        "  PERFORM pg_terminate_backend(pg_backend_pid());"
                        "  RETURN NULL;"
                        " END $$;"
                        "CREATE CONSTRAINT TRIGGER kill_at_commit AFTER INSERT ON t3"
                        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION kill_at_commit()"),
                0);
        db = pg_test_connect(url);
        assert_int_equal(db_tx(db, counted_insert_tx, &c), DB_COMMIT_UNKNOWN);
        assert_int_equal(c.calls, 1);
        assert_int_equal(pg_test_scalar(direct, "SELECT count(*) FROM t3"), 0);

        /*
         * Checked: not committed, so it runs again. The trigger now kills once only (a
         * sequence, since the rolled-back transaction could not remember it).
         */
        assert_int_equal(db_exec_script(direct, "CREATE SEQUENCE kills;"
                                                "CREATE OR REPLACE FUNCTION kill_at_commit()"
                                                " RETURNS trigger LANGUAGE plpgsql AS $$"
                                                " BEGIN"
                                                "  IF nextval('kills') = 1 THEN"
                                                "   PERFORM pg_terminate_backend(pg_backend_pid());"
                                                "  END IF;"
                                                "  RETURN NULL;"
                                                " END $$"),
                         0);
        c = (struct counted){0};
        assert_int_equal(db_tx_checked(db, counted_insert_tx, counted_check, &c), 7);
        assert_int_equal(c.calls, 2);
        assert_int_equal(c.checks, 1);
        assert_int_equal(pg_test_scalar(direct, "SELECT count(*) FROM t3"), 1);
        db_free(db);
        db_free(direct);
        pg_test_drop(url);
}

/* An applied migration whose text changed is refused, by migrate and by the schema check. */
static void test_db_changed_migration_is_refused(void **state)
{
        char url[512], sql[256];
        struct db *db;
        int applied, version;

        (void)state;
        pg_test_create(url, sizeof(url));
        db = pg_test_connect(url);
        assert_int_equal(pg_test_scalar(db, "SELECT count(*) FROM schema_migrations"
                                            " WHERE checksum ~ '^[0-9a-f]{64}$'"),
                         (long)db_migrations_count);
        (void)snprintf(sql, sizeof(sql),
                       "SELECT count(*) FROM schema_migrations WHERE version = 1"
                       " AND checksum = '%s'",
                       db_migrations[0].checksum);
        assert_int_equal(pg_test_scalar(db, sql), 1);

        /* As if migrations/0001_initial.sql had been edited after it ran here. */
        assert_int_equal(db_exec_script(db,
                                        "UPDATE schema_migrations SET checksum = repeat('0', 64)"
                                        " WHERE version = 1"),
                         0);
        assert_int_equal(db_migrate(db, &applied, &version), -ESTALE);
        assert_non_null(
                strstr(err_last(), "migration 0001_initial was changed after it was applied"));
        assert_non_null(
                strstr(err_last(), "restore the applied text of migrations/0001_initial.sql"));
        assert_int_equal(db_schema_check(db), -ESTALE);
        assert_non_null(strstr(err_last(), "0001_initial"));

        /* A database migrated before checksums were kept: migrate records them, quietly. */
        assert_int_equal(db_exec_script(db, "ALTER TABLE schema_migrations DROP COLUMN checksum"),
                         0);
        assert_int_equal(db_schema_check(db), 0);
        assert_int_equal(db_migrate(db, &applied, &version), 0);
        assert_int_equal(applied, 0);
        assert_int_equal(pg_test_scalar(db, sql), 1);
        assert_int_equal(db_schema_check(db), 0);
        db_free(db);
        pg_test_drop(url);
}

/* A loopback listener that never accepts: connections to it hang in the startup packet. */
static int silent_listener(char *url, size_t size, int connect_timeout)
{
        struct sockaddr_in addr = {.sin_family = AF_INET};
        socklen_t len = sizeof(addr);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

        assert_true(fd >= 0);
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        assert_int_equal(bind(fd, (struct sockaddr *)&addr, sizeof(addr)), 0);
        assert_int_equal(listen(fd, 4), 0);
        assert_int_equal(getsockname(fd, (struct sockaddr *)&addr, &len), 0);
        (void)snprintf(url, size, "postgresql://postgres@127.0.0.1:%d/none?connect_timeout=%d",
                       ntohs(addr.sin_port), connect_timeout);
        return fd;
}

static bool stop_after_calls(void *userdata)
{
        int *calls = userdata;

        return --*calls < 0;
}

static bool never_stop(void *userdata)
{
        (void)userdata;
        return false;
}

/*
 * db_connect_interruptible: connects like db_connect; a server that never answers ends in
 * connect_timeout; a stop request ends the wait at once, long before that.
 */
static void test_db_connect_interruptible(void **state)
{
        char url[512], silent[160];
        struct db *db = NULL;
        int64_t t0, took;
        int calls, fd;

        (void)state;
        pg_test_create(url, sizeof(url));
        assert_int_equal(db_connect_interruptible(url, never_stop, NULL, &db), 0);
        assert_true(db_server_version(db) >= 150000);
        assert_int_equal(db_exec_script(db, "SELECT 1"), 0);
        db_free(db);
        db = NULL;
        pg_test_drop(url);

        fd = silent_listener(silent, sizeof(silent), 2);
        t0 = util_now_monotonic_ms();
        assert_int_equal(db_connect_interruptible(silent, never_stop, NULL, &db), -ETIMEDOUT);
        took = util_now_monotonic_ms() - t0;
        print_message("silent server: gave up after %ld ms: %s\n", (long)took, err_last());
        assert_true(took >= 1900 && took < 6000);
        assert_non_null(strstr(err_last(), "timeout expired"));
        assert_null(db);

        /* Stop on the fifth look: about 400 ms of waiting, not the 30 s connect_timeout. */
        close(fd);
        fd = silent_listener(silent, sizeof(silent), 30);
        calls = 5;
        t0 = util_now_monotonic_ms();
        assert_int_equal(db_connect_interruptible(silent, stop_after_calls, &calls, &db),
                         -ECANCELED);
        took = util_now_monotonic_ms() - t0;
        print_message("stopped after %ld ms\n", (long)took);
        assert_true(took < 5000);
        assert_null(db);
        close(fd);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_db_migrate_from_empty_then_noop),
                cmocka_unit_test(test_db_concurrent_migrations_are_safe),
                cmocka_unit_test(test_db_error_mapping),
                cmocka_unit_test(test_db_tx_retries_transient_failures),
                cmocka_unit_test(test_db_tx_lost_commit_is_not_blindly_repeated),
                cmocka_unit_test(test_db_tx_commit_killed_by_the_server),
                cmocka_unit_test(test_db_changed_migration_is_refused),
                cmocka_unit_test(test_db_connect_interruptible),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
