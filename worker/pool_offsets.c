/*
 * A sorted array of the offsets in flight, each with a "finished" mark. Finished offsets at
 * the front are dropped as soon as they are; what remains at the front is the lowest message
 * still running, waiting for a retry, or queued. Messages of a partition arrive in offset
 * order, so an add almost always appends; the general insert only serves redeliveries after a
 * seek. The array stays as small as the pool's capacity plus its delayed retries.
 */
#include "worker/pool_offsets.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"

struct pool_offsets_entry {
        int64_t offset;
        bool done;
};

struct pool_offsets {
        struct pool_offsets_entry *v;
        size_t n, cap;
        int64_t last_done; /* highest offset dropped from the front, -1 if none */
};

int pool_offsets_new(struct pool_offsets **ret)
{
        struct pool_offsets *t = calloc(1, sizeof(*t));

        if (!t)
                return err_set(-ENOMEM, "out of memory");
        t->last_done = -1;
        *ret = t;
        return 0;
}

void pool_offsets_free(struct pool_offsets *t)
{
        if (!t)
                return;
        free(t->v);
        free(t);
}

/* Index of the first entry with offset >= @offset. */
static size_t pool_offsets_lower_bound(const struct pool_offsets *t, int64_t offset)
{
        size_t lo = 0, hi = t->n;

        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;

                if (t->v[mid].offset < offset)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        return lo;
}

int pool_offsets_add(struct pool_offsets *t, int64_t offset)
{
        size_t i = pool_offsets_lower_bound(t, offset);

        if (i < t->n && t->v[i].offset == offset)
                return 1;
        if (t->n == t->cap) {
                size_t cap = t->cap ? t->cap * 2 : 16;
                struct pool_offsets_entry *v = realloc(t->v, cap * sizeof(*v));

                if (!v)
                        return err_set(-ENOMEM, "out of memory");
                t->v = v;
                t->cap = cap;
        }
        memmove(&t->v[i + 1], &t->v[i], (t->n - i) * sizeof(*t->v));
        t->v[i].offset = offset;
        t->v[i].done = false;
        t->n++;
        return 0;
}

int pool_offsets_done(struct pool_offsets *t, int64_t offset)
{
        size_t i = pool_offsets_lower_bound(t, offset), drop = 0;

        if (i == t->n || t->v[i].offset != offset || t->v[i].done)
                return -ENOENT;
        t->v[i].done = true;
        while (drop < t->n && t->v[drop].done)
                drop++;
        if (drop == 0)
                return 0;
        if (t->v[drop - 1].offset > t->last_done)
                t->last_done = t->v[drop - 1].offset;
        memmove(&t->v[0], &t->v[drop], (t->n - drop) * sizeof(*t->v));
        t->n -= drop;
        return 0;
}

int64_t pool_offsets_commit_point(const struct pool_offsets *t)
{
        if (t->n > 0) {
                /* Only a finished message lets the point move at all. */
                if (t->last_done < 0)
                        return -1;
                return t->v[0].offset;
        }
        return t->last_done < 0 ? -1 : t->last_done + 1;
}

size_t pool_offsets_in_flight(const struct pool_offsets *t)
{
        return t->n;
}
