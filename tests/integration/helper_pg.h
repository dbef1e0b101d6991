#pragma once

/*
 * Scratch databases for integration tests on the real PostgreSQL that scripts/test.sh
 * starts. FIM_PG_ADMIN_URL must point at a database where CREATE DATABASE is allowed; a
 * missing variable fails the test (a missing service is never a silent skip).
 */

#include <stddef.h>

struct db;

/* Create an empty database with a unique name; its URL goes to @url. Fails the test on error. */
void pg_test_create_empty(char *url, size_t size);

/* Same, then apply all migrations. */
void pg_test_create(char *url, size_t size);

/* Drop a database made by pg_test_create*. */
void pg_test_drop(const char *url);

/* Connect or fail the test. */
struct db *pg_test_connect(const char *url);

/* Run SQL returning one integer (count(*) etc.), failing the test on error. */
long pg_test_scalar(struct db *db, const char *sql);
