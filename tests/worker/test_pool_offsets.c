/*
 * The per-partition offset tracker: the offset stored is always the lowest one still in
 * flight, or one past the highest finished when nothing is in flight.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "worker/pool_offsets.h"

static struct pool_offsets *tracker(void)
{
        struct pool_offsets *t = NULL;

        assert_int_equal(pool_offsets_new(&t), 0);
        return t;
}

static void test_pool_offsets_nothing_finished_stores_nothing(void **state)
{
        struct pool_offsets *t = tracker();

        (void)state;
        assert_int_equal(pool_offsets_commit_point(t), -1);
        assert_int_equal(pool_offsets_add(t, 10), 0);
        assert_int_equal(pool_offsets_add(t, 11), 0);
        assert_int_equal(pool_offsets_commit_point(t), -1);
        assert_int_equal(pool_offsets_in_flight(t), 2);
        pool_offsets_free(t);
}

static void test_pool_offsets_in_order_completion(void **state)
{
        struct pool_offsets *t = tracker();

        (void)state;
        for (int64_t o = 0; o < 5; o++)
                assert_int_equal(pool_offsets_add(t, o), 0);
        assert_int_equal(pool_offsets_done(t, 0), 0);
        assert_int_equal(pool_offsets_commit_point(t), 1);
        assert_int_equal(pool_offsets_done(t, 1), 0);
        assert_int_equal(pool_offsets_commit_point(t), 2);
        for (int64_t o = 2; o < 5; o++)
                assert_int_equal(pool_offsets_done(t, o), 0);
        assert_int_equal(pool_offsets_commit_point(t), 5);
        assert_int_equal(pool_offsets_in_flight(t), 0);
        pool_offsets_free(t);
}

static void test_pool_offsets_out_of_order_waits_for_lowest(void **state)
{
        struct pool_offsets *t = tracker();

        (void)state;
        for (int64_t o = 100; o < 104; o++)
                assert_int_equal(pool_offsets_add(t, o), 0);
        /* 100 is slow; 101..103 finish first: nothing may pass 100. */
        assert_int_equal(pool_offsets_done(t, 102), 0);
        assert_int_equal(pool_offsets_done(t, 103), 0);
        assert_int_equal(pool_offsets_done(t, 101), 0);
        assert_int_equal(pool_offsets_commit_point(t), -1);
        assert_int_equal(pool_offsets_done(t, 100), 0);
        assert_int_equal(pool_offsets_commit_point(t), 104);
        /* More arrive while one in the middle is retried. */
        assert_int_equal(pool_offsets_add(t, 104), 0);
        assert_int_equal(pool_offsets_add(t, 105), 0);
        assert_int_equal(pool_offsets_add(t, 106), 0);
        assert_int_equal(pool_offsets_done(t, 104), 0);
        assert_int_equal(pool_offsets_done(t, 106), 0);
        assert_int_equal(pool_offsets_commit_point(t), 105);
        assert_int_equal(pool_offsets_in_flight(t), 2);
        pool_offsets_free(t);
}

static void test_pool_offsets_duplicates_and_unknown(void **state)
{
        struct pool_offsets *t = tracker();

        (void)state;
        assert_int_equal(pool_offsets_add(t, 7), 0);
        assert_int_equal(pool_offsets_add(t, 7), 1);
        assert_int_equal(pool_offsets_done(t, 8), -ENOENT);
        assert_int_equal(pool_offsets_done(t, 7), 0);
        assert_int_equal(pool_offsets_done(t, 7), -ENOENT);
        assert_int_equal(pool_offsets_commit_point(t), 8);
        pool_offsets_free(t);
}

static void test_pool_offsets_redelivery_below_finished(void **state)
{
        struct pool_offsets *t = tracker();

        (void)state;
        assert_int_equal(pool_offsets_add(t, 50), 0);
        assert_int_equal(pool_offsets_done(t, 50), 0);
        assert_int_equal(pool_offsets_commit_point(t), 51);
        /* A rewind (seek) hands us 40 again: the point goes back to it, never past it. */
        assert_int_equal(pool_offsets_add(t, 40), 0);
        assert_int_equal(pool_offsets_commit_point(t), 40);
        assert_int_equal(pool_offsets_done(t, 40), 0);
        assert_int_equal(pool_offsets_commit_point(t), 51);
        pool_offsets_free(t);
}

static void test_pool_offsets_many(void **state)
{
        struct pool_offsets *t = tracker();

        (void)state;
        for (int64_t o = 0; o < 1000; o++)
                assert_int_equal(pool_offsets_add(t, o), 0);
        /* Finish evens, then odds from the top down. */
        for (int64_t o = 0; o < 1000; o += 2)
                assert_int_equal(pool_offsets_done(t, o), 0);
        assert_int_equal(pool_offsets_commit_point(t), 1);
        for (int64_t o = 999; o > 0; o -= 2)
                assert_int_equal(pool_offsets_done(t, o), 0);
        assert_int_equal(pool_offsets_commit_point(t), 1000);
        assert_int_equal(pool_offsets_in_flight(t), 0);
        pool_offsets_free(t);
}

int main(void)
{
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_pool_offsets_nothing_finished_stores_nothing),
                cmocka_unit_test(test_pool_offsets_in_order_completion),
                cmocka_unit_test(test_pool_offsets_out_of_order_waits_for_lowest),
                cmocka_unit_test(test_pool_offsets_duplicates_and_unknown),
                cmocka_unit_test(test_pool_offsets_redelivery_below_finished),
                cmocka_unit_test(test_pool_offsets_many),
        };

        return cmocka_run_group_tests(tests, NULL, NULL);
}
