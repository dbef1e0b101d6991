/*
 * Benchmark: snapshot + activation through our libdevmapper layer versus the same kernel
 * messages sent through the dmsetup binary, as the activate stage does them.
 *
 *   thin_bench [--rounds N] [--dir DIR]
 *
 * Needs root and dm-thin (run it in the VM through tests/bench/dm_bench.sh). It sets up a
 * loop-backed pool in DIR (default: a fresh directory under /tmp), then for each scenario runs
 * N rounds, alternating ours and dmsetup so drift hits both alike:
 *
 *   inactive origin: ours = thin_pool_create_snap(NULL) + thin_pool_activate
 *                    dmsetup = message create_snap + create
 *   active origin:   ours = thin_pool_create_snap(origin) + thin_pool_activate
 *                    dmsetup = suspend origin + message create_snap + resume + create
 *
 * Each timed round ends with the snapshot active; removing and deleting it is not timed.
 * Prints the median of each side and their ratio. Exit status 0, or 1 on any failure.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/err.h"
#include "common/util.h"
#include "stages/pool_setup.h"
#include "stages/thin_pool.h"

#define BENCH_POOL "fimb-pool"
#define BENCH_ORIGIN "fimb-origin"
#define BENCH_SIZE (UINT64_C(256) << 20)
#define BENCH_MAX_ROUNDS 1000

struct bench {
        char dir[256];
        unsigned rounds;
        unsigned pool_major, pool_minor;
        uint32_t next_id;
        double ours_ms[BENCH_MAX_ROUNDS];
        double ours_snap_ms[BENCH_MAX_ROUNDS]; /* the create_snap part of ours_ms */
        double dmsetup_ms[BENCH_MAX_ROUNDS];
};

static double bench_now_ms(void)
{
        struct timespec ts;

        (void)clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static int bench_fail(const char *what, int r)
{
        fprintf(stderr, "thin_bench: %s: %s\n", what, err_text(r));
        return -1;
}

/* Run dmsetup with @argv (argv[0] = "dmsetup"); 0 when it exits 0. */
static int bench_dmsetup(char *const *argv)
{
        posix_spawn_file_actions_t fa;
        pid_t pid;
        int status = 0, e;

        (void)posix_spawn_file_actions_init(&fa);
        (void)posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
        e = posix_spawnp(&pid, "dmsetup", &fa, NULL, argv, environ);
        (void)posix_spawn_file_actions_destroy(&fa);
        if (e != 0) {
                fprintf(stderr, "thin_bench: cannot run dmsetup: %s\n", strerror(e));
                return -1;
        }
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
                ;
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                fprintf(stderr, "thin_bench: dmsetup %s failed (status %d)\n", argv[1], status);
                return -1;
        }
        return 0;
}

static int bench_cmp(const void *a, const void *b)
{
        double x = *(const double *)a, y = *(const double *)b;

        return (x > y) - (x < y);
}

static double bench_median(double *v, unsigned n)
{
        qsort(v, n, sizeof(*v), bench_cmp);
        return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2.0;
}

/* Untimed: remove the snapshot a round made and free its id. */
static int bench_cleanup_round(const char *name, uint32_t id)
{
        int r = thin_pool_deactivate(name, NULL);

        if (r < 0)
                return bench_fail("deactivate", r);
        r = thin_pool_delete(BENCH_POOL, id);
        if (r < 0)
                return bench_fail("delete", r);
        return 0;
}

static int bench_ours(struct bench *b, bool origin_active, double *ret_ms, double *ret_snap_ms)
{
        uint32_t id = b->next_id++;
        char name[64];
        double t0, t1;
        int r;

        (void)snprintf(name, sizeof(name), "fimb-snap-%" PRIu32, id);
        t0 = bench_now_ms();
        r = thin_pool_create_snap(BENCH_POOL, id, 1, origin_active ? BENCH_ORIGIN : NULL);
        if (r < 0)
                return bench_fail("create_snap", r);
        t1 = bench_now_ms();
        r = thin_pool_activate(BENCH_POOL, id, name, BENCH_SIZE, NULL);
        if (r < 0)
                return bench_fail("activate", r);
        *ret_ms = bench_now_ms() - t0;
        *ret_snap_ms = t1 - t0;
        return bench_cleanup_round(name, id);
}

static int bench_dmsetup_round(struct bench *b, bool origin_active, double *ret_ms)
{
        uint32_t id = b->next_id++;
        char name[64], msg[64], table[128];
        char *suspend[] = {(char *)"dmsetup", (char *)"suspend", (char *)BENCH_ORIGIN, NULL};
        char *resume[] = {(char *)"dmsetup", (char *)"resume", (char *)BENCH_ORIGIN, NULL};
        char *message[] = {
                (char *)"dmsetup", (char *)"message", (char *)BENCH_POOL, (char *)"0", msg, NULL};
        char *create[] = {
                (char *)"dmsetup", (char *)"create", name, (char *)"--table", table, NULL};
        double t0;
        int r = 0;

        (void)snprintf(name, sizeof(name), "fimb-snap-%" PRIu32, id);
        (void)snprintf(msg, sizeof(msg), "create_snap %" PRIu32 " 1", id);
        (void)snprintf(table, sizeof(table), "0 %" PRIu64 " thin %u:%u %" PRIu32, BENCH_SIZE / 512,
                       b->pool_major, b->pool_minor, id);
        t0 = bench_now_ms();
        if (origin_active && bench_dmsetup(suspend) < 0)
                return -1;
        r = bench_dmsetup(message);
        if (origin_active && bench_dmsetup(resume) < 0)
                return -1;
        if (r < 0 || bench_dmsetup(create) < 0)
                return -1;
        *ret_ms = bench_now_ms() - t0;
        return bench_cleanup_round(name, id);
}

static int bench_scenario(struct bench *b, bool origin_active)
{
        const char *label = origin_active ? "active origin" : "inactive origin";
        double ours, snap, dm;

        for (unsigned i = 0; i < b->rounds; i++) {
                if (bench_ours(b, origin_active, &b->ours_ms[i], &b->ours_snap_ms[i]) < 0 ||
                    bench_dmsetup_round(b, origin_active, &b->dmsetup_ms[i]) < 0)
                        return -1;
        }
        ours = bench_median(b->ours_ms, b->rounds);
        snap = bench_median(b->ours_snap_ms, b->rounds);
        dm = bench_median(b->dmsetup_ms, b->rounds);
        printf("%-16s rounds=%u  ours median %8.2f ms (create_snap %.2f)  dmsetup median %8.2f ms"
               "  dmsetup/ours %.1fx\n",
               label, b->rounds, ours, snap, dm, dm / ours);
        return 0;
}

static int bench_setup(struct bench *b)
{
        struct pool_setup_opts o = POOL_SETUP_OPTS_INIT;
        struct thin_pool_device_info info;
        int r;

        o.name = BENCH_POOL;
        o.dir = b->dir;
        r = pool_setup_create(&o, NULL);
        if (r < 0)
                return bench_fail("pool setup", r);
        r = thin_pool_device_info(BENCH_POOL, &info);
        if (r < 0)
                return bench_fail("pool info", r);
        b->pool_major = info.major;
        b->pool_minor = info.minor;
        r = thin_pool_create_thin(BENCH_POOL, 1);
        if (r < 0)
                return bench_fail("create origin", r);
        b->next_id = 100;
        return 0;
}

static int bench_parse_args(int argc, char **argv, struct bench *b)
{
        int rounds;

        b->rounds = 15;
        b->dir[0] = '\0';
        for (int i = 1; i < argc; i++) {
                if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc &&
                    util_parse_int(argv[i + 1], 1, BENCH_MAX_ROUNDS, &rounds) == 0) {
                        b->rounds = (unsigned)rounds;
                        i++;
                } else if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc) {
                        (void)snprintf(b->dir, sizeof(b->dir), "%s", argv[++i]);
                } else {
                        fprintf(stderr, "usage: thin_bench [--rounds 1..%d] [--dir DIR]\n",
                                BENCH_MAX_ROUNDS);
                        return -1;
                }
        }
        if (b->dir[0] == '\0') {
                (void)snprintf(b->dir, sizeof(b->dir), "/tmp/fim-bench.XXXXXX");
                if (!mkdtemp(b->dir)) {
                        perror("thin_bench: mkdtemp");
                        return -1;
                }
        }
        return 0;
}

int main(int argc, char **argv)
{
        static struct bench b;
        int r = 1, rr;

        if (bench_parse_args(argc, argv, &b) < 0)
                return 2;
        if (bench_setup(&b) < 0)
                goto out;
        if (bench_scenario(&b, false) < 0)
                goto out;
        rr = thin_pool_activate(BENCH_POOL, 1, BENCH_ORIGIN, BENCH_SIZE, NULL);
        if (rr < 0) {
                bench_fail("activate origin", rr);
                goto out;
        }
        if (bench_scenario(&b, true) < 0)
                goto out;
        r = 0;
out:
        rr = pool_setup_teardown(BENCH_POOL, b.dir, true, NULL);
        if (rr < 0)
                bench_fail("teardown", rr);
        return r;
}
