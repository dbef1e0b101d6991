#include "helper_pg.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/util.h"
#include "db/db.h"

static const char *pg_test_admin_url(void)
{
        const char *url = getenv("FIM_PG_ADMIN_URL");

        if (!url || !url[0])
                fail_msg(
                        "FIM_PG_ADMIN_URL is not set: run the tests through scripts/test.sh, which starts PostgreSQL");
        return url;
}

/* Replace the database name (the path after the last '/') of a URI. */
static void pg_test_url_with_db(const char *admin, const char *dbname, char *url, size_t size)
{
        const char *slash = strrchr(admin, '/');
        const char *query = strchr(admin, '?');

        assert_non_null(slash);
        assert_int_equal(util_snprintf(url, size, "%.*s/%s%s", (int)(slash - admin), admin, dbname,
                                       query ? query : ""),
                         0);
}

static void pg_test_dbname(const char *url, char *name, size_t size)
{
        const char *slash = strrchr(url, '/');
        size_t n = strcspn(slash + 1, "?");

        assert_true(n < size);
        memcpy(name, slash + 1, n);
        name[n] = '\0';
}

struct db *pg_test_connect(const char *url)
{
        struct db *db = NULL;
        int r = db_connect(url, &db);

        if (r < 0)
                fail_msg("cannot connect to %s: %s", url, err_text(r));
        return db;
}

void pg_test_create_empty(char *url, size_t size)
{
        static unsigned counter;
        const char *admin = pg_test_admin_url();
        struct db *db = pg_test_connect(admin);
        char name[64], sql[128];
        int r;

        (void)snprintf(name, sizeof(name), "fim_t_%ld_%u_%lld", (long)getpid(), counter++,
                       (long long)(util_now_realtime_ms() % 100000));
        (void)snprintf(sql, sizeof(sql), "CREATE DATABASE %s", name);
        r = db_exec_script(db, sql);
        if (r < 0)
                fail_msg("%s: %s", sql, err_text(r));
        db_free(db);
        pg_test_url_with_db(admin, name, url, size);
}

void pg_test_create(char *url, size_t size)
{
        struct db *db;
        int applied = 0, version = 0, r;

        pg_test_create_empty(url, size);
        db = pg_test_connect(url);
        r = db_migrate(db, &applied, &version);
        if (r < 0)
                fail_msg("migrate: %s", err_text(r));
        db_free(db);
}

void pg_test_drop(const char *url)
{
        struct db *db = pg_test_connect(pg_test_admin_url());
        char name[64], sql[160];

        pg_test_dbname(url, name, sizeof(name));
        (void)snprintf(sql, sizeof(sql), "DROP DATABASE IF EXISTS %s WITH (FORCE)", name);
        (void)db_exec_script(db, sql);
        db_free(db);
}

long pg_test_scalar(struct db *db, const char *sql)
{
        PGresult *res = NULL;
        long v;
        int r = db_query_row(db, &res, sql, 0, NULL);

        if (r <= 0)
                fail_msg("%s: %s", sql, r < 0 ? err_text(r) : "no row");
        v = (long)db_get_i64(res, 0, 0);
        PQclear(res);
        return v;
}
