/*
 * Benchmark: our unpack stage against what an operator would script, on the same kind of
 * device in the same pool.
 *
 *   unpack_bench --tar PATH [--rounds N] [--dir DIR] [--device-size BYTES]
 *
 *   ours      the unpack stage's FSM, as the worker runs it: check_unpacked (the checksum
 *             trusted from a completed download row, as after a real download), the id
 *             allocated in PostgreSQL, create_thin, activate, mkfs.ext4, mount, the safe
 *             extractor, syncfs, unmount, the read-only mount of verify_layout, record
 *   baseline  create_thin, activate, mkfs.ext4 (same options), mount, GNU tar -xp with the
 *             xattrs we keep (user.*, security.capability), syncfs, unmount
 *
 * Needs root, dm-thin and PostgreSQL (FIM_PG_ADMIN_URL; a scratch database is created and
 * dropped): run it in the VM through tests/bench/dm_bench.sh. Rounds alternate ours and
 * the baseline so drift hits both alike; each round's device is removed untimed. Prints each
 * round, each side's median and their ratio. Exit status 0, or 1 on any failure.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "common/err.h"
#include "common/spawn.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "stages/download.h"
#include "stages/pool_setup.h"
#include "stages/thin_pool.h"
#include "stages/thin_registry.h"
#include "worker/lease.h"
#include "worker/stage.h"

#define BENCH_POOL "fimub-pool"
#define BENCH_HOST "bench-host"
#define BENCH_BASE_NAME "fimub-base"
#define BENCH_MAX_ROUNDS 100

struct bench {
        const char *tar;
        char tar_dir[PATH_MAX];
        char checksum[DOWNLOAD_SHA256_HEX_LEN + 1];
        uint64_t tar_size;
        unsigned rounds;
        uint64_t device_size;
        char dir[256];
        char mnt[300];
        char admin_url[512];
        char url[600];
        char dbname[64];
        bool db_created;
        bool pool_created;
        struct config cfg;
        bool cfg_ready;
        struct db *db;
        struct lease_keeper *leases;
        uint32_t next_base_id;
        double ours_s[BENCH_MAX_ROUNDS];
        double base_s[BENCH_MAX_ROUNDS];
};

static double bench_now(void)
{
        struct timespec ts;

        (void)clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int bench_fail(const char *what, int r)
{
        fprintf(stderr, "unpack_bench: %s: %s\n", what, err_text(r));
        return -1;
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

/* A scratch database with our schema, on the server of FIM_PG_ADMIN_URL. */
static int bench_db(struct bench *b)
{
        const char *admin = getenv("FIM_PG_ADMIN_URL");
        const char *slash;
        struct db *adb = NULL;
        char sql[128];
        int applied, version, r;

        if (!admin || !admin[0]) {
                fprintf(stderr, "unpack_bench: FIM_PG_ADMIN_URL is not set\n");
                return -1;
        }
        (void)snprintf(b->admin_url, sizeof(b->admin_url), "%s", admin);
        slash = strrchr(b->admin_url, '/');
        if (!slash || strchr(slash, '?')) {
                fprintf(stderr, "unpack_bench: FIM_PG_ADMIN_URL must end in /DBNAME\n");
                return -1;
        }
        (void)snprintf(b->dbname, sizeof(b->dbname), "fim_unpack_bench_%ld", (long)getpid());
        (void)snprintf(b->url, sizeof(b->url), "%.*s/%s", (int)(slash - b->admin_url), b->admin_url,
                       b->dbname);
        r = db_connect(b->admin_url, &adb);
        if (r < 0)
                return bench_fail("connect", r);
        (void)snprintf(sql, sizeof(sql), "CREATE DATABASE %s", b->dbname);
        r = db_exec_script(adb, sql);
        db_free(adb);
        if (r < 0)
                return bench_fail("create database", r);
        b->db_created = true;
        r = db_connect(b->url, &b->db);
        if (r == 0)
                r = db_migrate(b->db, &applied, &version);
        if (r == 0)
                r = lease_keeper_new(b->url, 10000, &b->leases);
        if (r < 0)
                return bench_fail("database", r);
        return 0;
}

static int bench_config(struct bench *b)
{
        char size[24];
        int r;

        r = config_init(&b->cfg);
        if (r < 0)
                return bench_fail("config", r);
        b->cfg_ready = true;
        (void)snprintf(size, sizeof(size), "%" PRIu64, b->device_size);
        if (config_set(&b->cfg, "DATABASE_URL", b->url, CONFIG_SOURCE_FLAG) < 0 ||
            config_set(&b->cfg, "LOCAL_DIR", b->tar_dir, CONFIG_SOURCE_FLAG) < 0 ||
            config_set(&b->cfg, "POOL_NAME", BENCH_POOL, CONFIG_SOURCE_FLAG) < 0 ||
            config_set(&b->cfg, "HOST_ID", BENCH_HOST, CONFIG_SOURCE_FLAG) < 0 ||
            config_set(&b->cfg, "DEVICE_SIZE", size, CONFIG_SOURCE_FLAG) < 0 ||
            config_set(&b->cfg, "POOL_HIGH_WATER_PERCENT", "99", CONFIG_SOURCE_FLAG) < 0)
                return bench_fail("config", -EINVAL);
        return 0;
}

static int bench_setup(struct bench *b)
{
        struct pool_setup_opts o = POOL_SETUP_OPTS_INIT;
        char real[PATH_MAX], copy[PATH_MAX];
        int r;

        if (!realpath(b->tar, real)) {
                fprintf(stderr, "unpack_bench: '%s': %s\n", b->tar, strerror(errno));
                return -1;
        }
        (void)snprintf(copy, sizeof(copy), "%s", real);
        (void)snprintf(b->tar_dir, sizeof(b->tar_dir), "%s", dirname(copy));
        b->tar = strdup(real);
        if (!b->tar)
                return bench_fail("strdup", -ENOMEM);
        /* Untimed, as the download stage does it; also warms the page cache for both sides. */
        r = download_hash_file(b->tar, b->checksum, &b->tar_size);
        if (r < 0)
                return bench_fail("hash the tarball", r);
        if (bench_db(b) < 0 || bench_config(b) < 0)
                return -1;
        o.name = BENCH_POOL;
        o.dir = b->dir;
        /*
         * No bigger than the device: the pool's files live in the guest's tmpfs, and a pool
         * hands out fresh blocks before it reuses freed ones, so a large pool would fill
         * guest memory round after round.
         */
        o.data_size = b->device_size;
        r = pool_setup_create(&o, NULL);
        if (r < 0)
                return bench_fail("pool setup", r);
        b->pool_created = true;
        (void)snprintf(b->mnt, sizeof(b->mnt), "%s/mnt", b->dir);
        if (mkdir(b->mnt, 0700) < 0 && errno != EEXIST)
                return bench_fail("mkdir", -errno);
        b->next_base_id = 1000;
        return 0;
}

/* One run of the unpack stage for a fresh image id; the time of the whole FSM. */
static int bench_ours(struct bench *b, unsigned round, double *ret_s)
{
        struct stage_ctx ctx = {.cfg = &b->cfg,
                                .db = b->db,
                                .leases = b->leases,
                                .worker_id = "unpack-bench",
                                .handoff = false};
        struct stage_result res;
        struct json_object *resp = NULL, *v = NULL;
        char image[32], size[24], json[PATH_MAX + 256];
        uint32_t origin = 0;
        double t0;
        int r;

        (void)snprintf(image, sizeof(image), "bench-%u", round);
        (void)snprintf(size, sizeof(size), "%" PRIu64, b->tar_size);
        r = db_exec(b->db, NULL,
                    "INSERT INTO images (host_id, image_id, bucket, s3_key, status, local_path,"
                    " checksum, size_bytes) VALUES ($1, $2, 'bench', $2, 'completed', $3, $4, $5)",
                    5, (const char *const[]){BENCH_HOST, image, b->tar, b->checksum, size});
        if (r < 0)
                return bench_fail("insert image row", r);
        (void)snprintf(json, sizeof(json),
                       "{\"image_id\":\"%s\",\"local_path\":\"%s\",\"checksum\":\"%s\"}", image,
                       b->tar, b->checksum);
        t0 = bench_now();
        r = stage_get(STAGE_UNPACK)->handle(&ctx, json, &res);
        *ret_s = bench_now() - t0;
        if (r < 0)
                return bench_fail("unpack stage", r);
        if (res.outcome != FSM_OUTCOME_COMPLETE) {
                fprintf(stderr, "unpack_bench: unpack %s: %s\n", fsm_outcome_name(res.outcome),
                        res.error_text);
                stage_result_done(&res);
                return -1;
        }
        resp = json_tokener_parse(res.response);
        if (resp && json_object_object_get_ex(resp, "device_id", &v))
                origin = (uint32_t)strtoul(json_object_get_string(v), NULL, 10);
        json_object_put(resp);
        stage_result_done(&res);

        /* Untimed: remove the origin and forget the run, so the next round unpacks again. */
        r = thin_registry_destroy(b->db, BENCH_HOST, BENCH_POOL, origin);
        if (r == 0)
                r = db_exec_script(b->db, "DELETE FROM idempotency_keys; DELETE FROM fsm_runs;"
                                          " DELETE FROM images");
        if (r < 0)
                return bench_fail("clean up a round", r);
        return 0;
}

static int bench_run(const char *const *argv)
{
        char out[1024];
        int r = spawn_run(argv, out, sizeof(out));

        return r < 0 ? bench_fail(argv[0], r) : 0;
}

/* create_thin + activate, mkfs, mount, GNU tar, syncfs, unmount: the time of all of it. */
static int bench_baseline(struct bench *b, double *ret_s)
{
        uint32_t id = b->next_base_id++;
        char *path = NULL;
        const char *mkfs[] = {"mkfs.ext4",
                              "-q",
                              "-F",
                              "-m",
                              "0",
                              "-E",
                              "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                              NULL,
                              NULL};
        const char *tar[] = {"tar",
                             "--numeric-owner",
                             "--same-owner",
                             "-xp",
                             "--xattrs",
                             "--xattrs-include=user.*",
                             "--xattrs-include=security.capability",
                             "-f",
                             b->tar,
                             "-C",
                             b->mnt,
                             NULL};
        double t0;
        int fd, r;

        t0 = bench_now();
        r = thin_pool_create_thin(BENCH_POOL, id);
        if (r == 0)
                r = thin_pool_activate(BENCH_POOL, id, BENCH_BASE_NAME, b->device_size, &path);
        if (r < 0)
                return bench_fail("baseline device", r);
        mkfs[7] = path;
        r = bench_run(mkfs);
        if (r == 0 && mount(path, b->mnt, "ext4", MS_NOATIME | MS_NODEV | MS_NOSUID, NULL) < 0)
                r = bench_fail("mount", -errno);
        free(path);
        if (r < 0)
                return r;
        r = bench_run(tar);
        fd = open(b->mnt, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0 || syncfs(fd) < 0)
                r = bench_fail("syncfs", -errno);
        if (fd >= 0)
                (void)close(fd);
        if (umount2(b->mnt, 0) < 0 && r == 0)
                r = bench_fail("umount", -errno);
        *ret_s = bench_now() - t0;
        if (r < 0)
                return r;

        r = thin_pool_deactivate(BENCH_BASE_NAME, NULL);
        if (r >= 0)
                r = thin_pool_delete(BENCH_POOL, id);
        return r < 0 ? bench_fail("clean up a baseline round", r) : 0;
}

static int bench_parse_args(int argc, char **argv, struct bench *b)
{
        int rounds;

        b->rounds = 3;
        b->device_size = UINT64_C(2) << 30;
        for (int i = 1; i < argc; i++) {
                if (strcmp(argv[i], "--rounds") == 0 && i + 1 < argc &&
                    util_parse_int(argv[i + 1], 1, BENCH_MAX_ROUNDS, &rounds) == 0) {
                        b->rounds = (unsigned)rounds;
                        i++;
                } else if (strcmp(argv[i], "--tar") == 0 && i + 1 < argc) {
                        b->tar = argv[++i];
                } else if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc) {
                        (void)snprintf(b->dir, sizeof(b->dir), "%s", argv[++i]);
                } else if (strcmp(argv[i], "--device-size") == 0 && i + 1 < argc &&
                           util_parse_u64(argv[i + 1], &b->device_size) == 0 &&
                           b->device_size % 512 == 0 && b->device_size > 0) {
                        i++;
                } else {
                        fprintf(stderr,
                                "usage: unpack_bench --tar PATH [--rounds 1..%d] [--dir DIR]"
                                " [--device-size BYTES]\n",
                                BENCH_MAX_ROUNDS);
                        return -1;
                }
        }
        if (!b->tar) {
                fprintf(stderr, "unpack_bench: --tar is required\n");
                return -1;
        }
        if (b->dir[0] == '\0') {
                (void)snprintf(b->dir, sizeof(b->dir), "/tmp/fim-unpack-bench.XXXXXX");
                if (!mkdtemp(b->dir)) {
                        perror("unpack_bench: mkdtemp");
                        return -1;
                }
        }
        return 0;
}

static void bench_teardown(struct bench *b)
{
        struct db *adb = NULL;
        char sql[128];
        int r;

        lease_keeper_free(b->leases);
        db_free(b->db);
        if (b->cfg_ready)
                config_done(&b->cfg);
        if (b->pool_created) {
                r = pool_setup_teardown(BENCH_POOL, b->dir, true, NULL);
                if (r < 0)
                        (void)bench_fail("teardown", r);
        }
        if (b->db_created && db_connect(b->admin_url, &adb) == 0) {
                (void)snprintf(sql, sizeof(sql), "DROP DATABASE IF EXISTS %s", b->dbname);
                if (db_exec_script(adb, sql) < 0)
                        (void)bench_fail("drop database", -EIO);
                db_free(adb);
        }
}

int main(int argc, char **argv)
{
        static struct bench b;
        double ours, base;
        int r = 1;

        if (bench_parse_args(argc, argv, &b) < 0)
                return 2;
        if (bench_setup(&b) < 0)
                goto out;
        for (unsigned i = 0; i < b.rounds; i++) {
                if (bench_ours(&b, i, &b.ours_s[i]) < 0 || bench_baseline(&b, &b.base_s[i]) < 0)
                        goto out;
                printf("round %u: ours %.2f s, mkfs.ext4 + GNU tar %.2f s\n", i + 1, b.ours_s[i],
                       b.base_s[i]);
                (void)fflush(stdout);
        }
        ours = bench_median(b.ours_s, b.rounds);
        base = bench_median(b.base_s, b.rounds);
        printf("\ntarball: %s (%" PRIu64 " MiB), device %" PRIu64 " MiB, %u rounds\n", b.tar,
               b.tar_size >> 20, b.device_size >> 20, b.rounds);
        printf("median  ours (the unpack stage):             %.2f s\n", ours);
        printf("median  baseline (mkfs.ext4 + GNU tar):      %.2f s\n", base);
        printf("ratio   ours / baseline:                     %.2f\n", ours / base);
        r = 0;
out:
        bench_teardown(&b);
        return r;
}
