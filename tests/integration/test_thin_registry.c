/*
 * Thin id allocation in PostgreSQL (stages/thin_registry.c), no device-mapper needed:
 * several processes allocating at once get distinct ids, lowest free first, unique per host
 * across pools; a freed id is reused; one live origin per checksum.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "db/db.h"
#include "helper_pg.h"
#include "stages/thin_registry.h"

#define PROCS 4
#define PER_PROC 10

struct alloc_args {
        const char *host;
        const char *pool;
        const char *kind;
        const char *checksum;
        uint32_t id;
};

static int alloc_tx(struct db *db, void *userdata)
{
        struct alloc_args *a = userdata;

        return thin_registry_alloc(db, a->host, a->pool, a->kind, 1 << 20, a->checksum, -1, NULL,
                                   &a->id);
}

static int alloc(struct db *db, const char *host, const char *pool, const char *checksum,
                 uint32_t *ret)
{
        struct alloc_args a = {host, pool, checksum ? "origin" : "snapshot", checksum, 0};
        int r = db_tx(db, alloc_tx, &a);

        if (r == 0)
                *ret = a.id;
        return r;
}

static void test_thin_registry_concurrent_allocation_is_dense_and_unique(void **state)
{
        char url[512];
        pid_t pids[PROCS];
        struct db *db;

        (void)state;
        pg_test_create(url, sizeof(url));
        for (int p = 0; p < PROCS; p++) {
                pids[p] = fork();
                assert_true(pids[p] >= 0);
                if (pids[p] == 0) {
                        struct db *child = NULL;
                        uint32_t id;

                        if (db_connect(url, &child) < 0)
                                _exit(1);
                        for (int i = 0; i < PER_PROC; i++) {
                                /* Two pools on one host: ids are unique per host. */
                                if (alloc(child, "h1", i % 2 ? "pool-a" : "pool-b", NULL, &id) < 0)
                                        _exit(2);
                        }
                        db_free(child);
                        _exit(0);
                }
        }
        for (int p = 0; p < PROCS; p++) {
                int status;

                assert_int_equal(waitpid(pids[p], &status, 0), pids[p]);
                assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        }
        db = pg_test_connect(url);
        assert_int_equal(pg_test_scalar(db, "SELECT count(*) FROM thin_devices"), PROCS * PER_PROC);
        assert_int_equal(pg_test_scalar(db, "SELECT count(DISTINCT device_id) FROM thin_devices"),
                         PROCS * PER_PROC);
        assert_int_equal(pg_test_scalar(db, "SELECT max(device_id) FROM thin_devices"),
                         PROCS * PER_PROC - 1);

        /* Another host has its own ids. */
        {
                uint32_t id = 99;

                assert_int_equal(alloc(db, "h2", "pool-a", NULL, &id), 0);
                assert_int_equal(id, 0);
        }
        /* A freed id is the next one handed out. */
        assert_int_equal(db_exec_script(db, "DELETE FROM thin_devices WHERE host_id = 'h1' AND"
                                            " device_id = 7"),
                         0);
        {
                uint32_t id = 0;

                assert_int_equal(alloc(db, "h1", "pool-b", NULL, &id), 0);
                assert_int_equal(id, 7);
                assert_int_equal(alloc(db, "h1", "pool-b", NULL, &id), 0);
                assert_int_equal(id, PROCS * PER_PROC);
        }
        db_free(db);
        pg_test_drop(url);
}

static void test_thin_registry_one_origin_per_checksum(void **state)
{
        char url[512];
        struct db *db;
        struct thin_row row;
        uint32_t a = 0, b = 0;

        (void)state;
        pg_test_create(url, sizeof(url));
        db = pg_test_connect(url);
        assert_int_equal(alloc(db, "h", "pool", "abc", &a), 0);
        assert_int_equal(alloc(db, "h", "pool", "abc", &b), -EEXIST);
        assert_int_equal(thin_registry_find_origin(db, "h", "pool", "abc", &row), 1);
        assert_int_equal(row.device_id, a);
        assert_string_equal(row.state, "creating");
        /* An origin being deleted no longer blocks a new one for the same content. */
        assert_int_equal(thin_registry_set_state(db, "h", "pool", a, "deleting"), 0);
        assert_int_equal(alloc(db, "h", "pool", "abc", &b), 0);
        assert_int_not_equal(a, b);
        db_free(db);
        pg_test_drop(url);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_thin_registry_concurrent_allocation_is_dense_and_unique),
                cmocka_unit_test(test_thin_registry_one_origin_per_checksum),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
