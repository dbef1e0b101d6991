/*
 * Unit tests for stages/prefix_hasher: SHA-256 of a growing file on a thread of its own,
 * checked against a one-shot hash of the same bytes.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/evp.h>

#include "common/err.h"
#include "common/util.h"
#include "stages/prefix_hasher.h"

#define DATA_LEN ((3u << 20) + 12345u) /* several of the hasher's 1 MiB reads, and a tail */

struct fixture {
        char path[64];
        int fd;
        unsigned char *data;
        EVP_MD_CTX *sha;
};

static int setup(void **state)
{
        struct fixture *f = calloc(1, sizeof(*f));
        uint32_t x = 2463534242u;

        assert_non_null(f);
        (void)snprintf(f->path, sizeof(f->path), "/tmp/fim-prefix-hasher-XXXXXX");
        f->fd = mkstemp(f->path);
        assert_true(f->fd >= 0);
        f->data = malloc(DATA_LEN);
        assert_non_null(f->data);
        for (size_t i = 0; i < DATA_LEN; i++) { /* xorshift: no two chunks alike */
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                f->data[i] = (unsigned char)x;
        }
        f->sha = EVP_MD_CTX_new();
        assert_non_null(f->sha);
        assert_int_equal(EVP_DigestInit_ex(f->sha, EVP_sha256(), NULL), 1);
        *state = f;
        return 0;
}

static int teardown(void **state)
{
        struct fixture *f = *state;

        (void)close(f->fd);
        (void)unlink(f->path);
        EVP_MD_CTX_free(f->sha);
        free(f->data);
        free(f);
        return 0;
}

static void write_at(struct fixture *f, size_t offset, size_t len)
{
        assert_int_equal(pwrite(f->fd, f->data + offset, len, (off_t)offset), (ssize_t)len);
}

/* Hex SHA-256 of what @sha was fed. */
static void final_hex(EVP_MD_CTX *sha, char hex[65])
{
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned int md_len = 0;

        assert_int_equal(EVP_DigestFinal_ex(sha, md, &md_len), 1);
        assert_int_equal(md_len, 32);
        util_hex_encode(md, md_len, hex);
}

static void expected_hex(const unsigned char *data, size_t len, char hex[65])
{
        EVP_MD_CTX *sha = EVP_MD_CTX_new();

        assert_non_null(sha);
        assert_int_equal(EVP_DigestInit_ex(sha, EVP_sha256(), NULL), 1);
        assert_int_equal(EVP_DigestUpdate(sha, data, len), 1);
        final_hex(sha, hex);
        EVP_MD_CTX_free(sha);
}

/* Finish @h and check that it hashed exactly the first @len bytes of the data. */
static void finish_and_check(struct fixture *f, struct prefix_hasher *h, uint64_t len)
{
        char got[65], want[65];
        uint64_t hashed = 0;

        assert_int_equal(prefix_hasher_finish(h, &hashed), 0);
        assert_int_equal(hashed, len);
        final_hex(f->sha, got);
        expected_hex(f->data, (size_t)len, want);
        assert_string_equal(got, want);
}

/* Written and handed over in pieces of odd sizes, as a download does: the same hash. */
static void test_prefix_hasher_follows_a_growing_file(void **state)
{
        struct fixture *f = *state;
        struct prefix_hasher *h = NULL;
        size_t off = 0, step = 1;

        assert_int_equal(prefix_hasher_start(f->fd, f->path, f->sha, 0, &h), 0);
        while (off < DATA_LEN) {
                size_t n = step < DATA_LEN - off ? step : DATA_LEN - off;

                write_at(f, off, n);
                off += n;
                prefix_hasher_advance(h, off);
                step = step * 3 + 7; /* 1 byte up to megabytes */
        }
        finish_and_check(f, h, DATA_LEN);
}

/* A resumed download fed the kept prefix itself: the hasher goes on from there. */
static void test_prefix_hasher_continues_a_hash_already_started(void **state)
{
        struct fixture *f = *state;
        struct prefix_hasher *h = NULL;
        const size_t kept = 1000000;

        write_at(f, 0, DATA_LEN);
        assert_int_equal(EVP_DigestUpdate(f->sha, f->data, kept), 1);
        assert_int_equal(prefix_hasher_start(f->fd, f->path, f->sha, kept, &h), 0);
        prefix_hasher_advance(h, DATA_LEN);
        finish_and_check(f, h, DATA_LEN);
}

/* Only the largest end counts; nothing past it is read. */
static void test_prefix_hasher_target_never_shrinks(void **state)
{
        struct fixture *f = *state;
        struct prefix_hasher *h = NULL;

        write_at(f, 0, DATA_LEN);
        assert_int_equal(prefix_hasher_start(f->fd, f->path, f->sha, 0, &h), 0);
        prefix_hasher_advance(h, 70000);
        prefix_hasher_advance(h, 5);
        finish_and_check(f, h, 70000);
}

/* Asked for bytes the file does not have: the error names the file, no hang. */
static void test_prefix_hasher_reports_a_short_file(void **state)
{
        struct fixture *f = *state;
        struct prefix_hasher *h = NULL;
        uint64_t hashed = 0;

        write_at(f, 0, 4096);
        assert_int_equal(prefix_hasher_start(f->fd, f->path, f->sha, 0, &h), 0);
        prefix_hasher_advance(h, 8192);
        assert_int_equal(prefix_hasher_finish(h, &hashed), -EIO);
        assert_int_equal(hashed, 4096);
        assert_non_null(strstr(err_last(), f->path));
        assert_non_null(strstr(err_last(), "file too short"));
        err_clear();
}

/* A failed download stops the hasher with work pending; nothing is left running or leaked. */
static void test_prefix_hasher_stops_with_work_pending(void **state)
{
        struct fixture *f = *state;
        struct prefix_hasher *h = NULL;

        write_at(f, 0, DATA_LEN);
        assert_int_equal(prefix_hasher_start(f->fd, f->path, f->sha, 0, &h), 0);
        prefix_hasher_advance(h, DATA_LEN);
        prefix_hasher_stop(h);
        prefix_hasher_stop(NULL);

        /* The file and the hash state are the caller's again: a new hasher can use them. */
        assert_int_equal(EVP_DigestInit_ex(f->sha, EVP_sha256(), NULL), 1);
        assert_int_equal(prefix_hasher_start(f->fd, f->path, f->sha, 0, &h), 0);
        prefix_hasher_advance(h, DATA_LEN);
        finish_and_check(f, h, DATA_LEN);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_prefix_hasher_follows_a_growing_file, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_prefix_hasher_continues_a_hash_already_started,
                                                setup, teardown),
                cmocka_unit_test_setup_teardown(test_prefix_hasher_target_never_shrinks, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_prefix_hasher_reports_a_short_file, setup,
                                                teardown),
                cmocka_unit_test_setup_teardown(test_prefix_hasher_stops_with_work_pending, setup,
                                                teardown),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
