/* db/ against a real PostgreSQL: migrations, error mapping, transaction retries. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "db/db.h"
#include "db/migrations.h"
#include "helper_pg.h"

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

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_db_migrate_from_empty_then_noop),
                cmocka_unit_test(test_db_concurrent_migrations_are_safe),
                cmocka_unit_test(test_db_error_mapping),
                cmocka_unit_test(test_db_tx_retries_transient_failures),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
