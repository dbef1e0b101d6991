/*
 * `gc`: remove what an image left on this host: its snapshots, then its origin when no other
 * image shares it, then its tarball. Snapshots always go before their origin, so a crash in
 * the middle never leaves a snapshot whose origin is gone. --all-unreferenced removes origins
 * no image maps to, half-made devices of failed runs, and tarballs no image row knows.
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/err.h"
#include "common/util.h"
#include "config/config.h"
#include "db/db.h"
#include "stages/request.h"
#include "stages/thin_registry.h"
#include "worker/cli.h"
#include "worker/commands.h"

struct gc {
        const struct config *cfg;
        struct db *db;
        bool dry_run;
        int removed;
};

/* A device in use: say what to do about it. */
static int gc_busy(int r)
{
        char why[ERR_MSG_MAX];

        (void)snprintf(why, sizeof(why), "%s", err_last());
        return err_set(r, "%s; stop what uses it (a VM?), then run gc again", why);
}

static int gc_destroy(struct gc *g, const char *pool, uint32_t id, const char *what)
{
        int r;

        printf("%s %s thin id %" PRIu32 " in pool '%s'\n", g->dry_run ? "would remove" : "removing",
               what, id, pool);
        if (g->dry_run)
                return 0;
        r = thin_registry_destroy(g->db, g->cfg->host_id, pool, id);
        if (r == -EBUSY)
                return gc_busy(r);
        if (r < 0)
                return r;
        g->removed++;
        return 0;
}

/*
 * Remove origin @id unless something uses it by now (other than @image_id): gc's choice is
 * checked again, under the lock unpack maps images under. Returns 1 when it was kept.
 */
static int gc_destroy_origin(struct gc *g, const char *pool, uint32_t id, const char *what,
                             const char *image_id)
{
        int r;

        printf("%s %s thin id %" PRIu32 " in pool '%s'\n", g->dry_run ? "would remove" : "removing",
               what, id, pool);
        if (g->dry_run)
                return 0;
        r = thin_registry_destroy_unused_origin(g->db, g->cfg->host_id, pool, id, image_id);
        if (r == 1) {
                printf("keeping %s thin id %" PRIu32 ": an image has come to use it\n", what, id);
                return 1;
        }
        if (r == -EBUSY)
                return gc_busy(r);
        if (r < 0)
                return r;
        g->removed++;
        return 0;
}

static int gc_unlink(struct gc *g, const char *path)
{
        if (access(path, F_OK) < 0)
                return 0;
        printf("%s '%s'\n", g->dry_run ? "would delete" : "deleting", path);
        if (g->dry_run)
                return 0;
        if (unlink(path) < 0 && errno != ENOENT)
                return err_set(-errno, "failed to delete '%s': %s", path, strerror(errno));
        g->removed++;
        return 0;
}

static int gc_image(struct gc *g, const char *image_id)
{
        const char *host = g->cfg->host_id;
        PGresult *res = NULL;
        char path[PATH_MAX];
        int r;

        /* 1. Snapshots of the image. */
        r = db_exec(
                g->db, &res,
                "SELECT pool_name, device_id FROM snapshots WHERE host_id = $1 AND image_id = $2"
                " ORDER BY device_id",
                2, (const char *const[]){host, image_id});
        if (r < 0)
                return r;
        for (int i = 0; i < PQntuples(res) && r >= 0; i++)
                r = gc_destroy(g, db_get(res, i, 0), (uint32_t)db_get_i64(res, i, 1), "snapshot");
        PQclear(res);
        if (r < 0)
                return r;

        /* 2. The image's origin, unless another image or a snapshot still uses it. */
        r = db_exec(g->db, &res,
                    "SELECT u.pool_name, u.device_id, (SELECT count(*) FROM unpacked_images o"
                    " WHERE o.host_id = u.host_id AND o.pool_name = u.pool_name AND"
                    " o.device_id = u.device_id AND o.image_id <> u.image_id) + (SELECT count(*)"
                    " FROM snapshots s WHERE s.host_id = u.host_id AND s.pool_name = u.pool_name"
                    " AND s.origin_id = u.device_id AND s.image_id <> u.image_id)"
                    " FROM unpacked_images u WHERE u.host_id = $1 AND u.image_id = $2",
                    2, (const char *const[]){host, image_id});
        if (r < 0)
                return r;
        for (int i = 0; i < PQntuples(res) && r >= 0; i++) {
                const char *pool = db_get(res, i, 0);
                uint32_t id = (uint32_t)db_get_i64(res, i, 1);
                bool shared = db_get_i64(res, i, 2) > 0;

                if (shared)
                        printf("keeping origin thin id %" PRIu32 ": other images share it\n", id);
                else
                        r = gc_destroy_origin(g, pool, id, "origin", image_id);
                /* Kept (shared, or shared since the query): only this image's mapping goes. */
                if ((shared || r > 0) && !g->dry_run)
                        r = db_exec(g->db, NULL,
                                    "DELETE FROM unpacked_images WHERE host_id = $1 AND"
                                    " image_id = $2",
                                    2, (const char *const[]){host, image_id});
        }
        PQclear(res);
        if (r < 0)
                return r;

        /* 3. The tarball, the image row, and the idempotency keys that would skip the work. */
        r = util_snprintf(path, sizeof(path), "%s/%s.tar", g->cfg->local_dir, image_id);
        if (r < 0)
                return r;
        r = gc_unlink(g, path);
        if (r < 0)
                return r;
        strcat(path, ".part");
        (void)gc_unlink(g, path);
        strcat(path, ".meta");
        (void)gc_unlink(g, path);
        if (g->dry_run)
                return 0;
        return db_exec(g->db, NULL,
                       "WITH k AS (DELETE FROM idempotency_keys WHERE run_id IN (SELECT run_id"
                       " FROM fsm_runs WHERE host_id = $1 AND request->>'image_id' = $2))"
                       " DELETE FROM images WHERE host_id = $1 AND image_id = $2",
                       2, (const char *const[]){host, image_id});
}

static void gc_report(enum thin_reconcile_finding what, uint32_t id, const char *detail,
                      void *userdata)
{
        (void)what;
        (void)id;
        (void)userdata;
        printf("reconcile: %s\n", detail);
}

/* Half-made devices of failed runs and interrupted deletes, in every pool of this host. */
static int gc_reconcile(struct gc *g)
{
        char **pools = NULL;
        int r;

        r = thin_registry_pools(g->db, g->cfg->host_id, g->cfg->pool_name, &pools);
        if (r < 0)
                return r;
        for (char **p = pools; *p && r >= 0; p++) {
                r = thin_registry_reconcile(g->db, g->cfg->host_id, *p, !g->dry_run, gc_report,
                                            NULL);
                if (r < 0)
                        r = err_wrap(r, "failed to reconcile pool '%s'", *p);
        }
        thin_registry_pools_free(pools);
        return r < 0 ? r : 0;
}

static int gc_unreferenced(struct gc *g)
{
        const char *host = g->cfg->host_id;
        PGresult *res = NULL;
        DIR *d;
        struct dirent *de;
        int r;

        r = db_exec(g->db, &res,
                    "SELECT d.pool_name, d.device_id FROM thin_devices d WHERE d.host_id = $1 AND"
                    " d.kind = 'origin' AND d.state = 'ready' AND NOT EXISTS (SELECT 1 FROM"
                    " unpacked_images u WHERE u.host_id = d.host_id AND u.pool_name = d.pool_name"
                    " AND u.device_id = d.device_id) AND NOT EXISTS (SELECT 1 FROM snapshots s"
                    " WHERE s.host_id = d.host_id AND s.pool_name = d.pool_name AND"
                    " s.origin_id = d.device_id) ORDER BY d.device_id",
                    1, (const char *const[]){host});
        if (r < 0)
                return r;
        util_crash_point("gc.after_select");
        for (int i = 0; i < PQntuples(res) && r >= 0; i++)
                r = gc_destroy_origin(g, db_get(res, i, 0), (uint32_t)db_get_i64(res, i, 1),
                                      "unreferenced origin", NULL);
        PQclear(res);
        if (r < 0)
                return r;
        r = gc_reconcile(g);
        if (r < 0)
                return r;

        /* Tarballs in LOCAL_DIR that no image row knows. */
        d = opendir(g->cfg->local_dir);
        if (!d)
                return 0;
        while ((de = readdir(d)) != NULL) {
                char id[REQUEST_IMAGE_ID_MAX + 1], path[PATH_MAX];
                size_t n = strlen(de->d_name);

                if (n <= 4 || n - 4 > REQUEST_IMAGE_ID_MAX || strcmp(de->d_name + n - 4, ".tar"))
                        continue;
                memcpy(id, de->d_name, n - 4);
                id[n - 4] = '\0';
                if (request_validate_image_id(id) < 0)
                        continue;
                r = db_query_row(g->db, &res,
                                 "SELECT 1 FROM images WHERE host_id = $1 AND image_id = $2", 2,
                                 (const char *const[]){host, id});
                if (r < 0)
                        break;
                if (r > 0) {
                        PQclear(res);
                        continue;
                }
                if (util_snprintf(path, sizeof(path), "%s/%s", g->cfg->local_dir, de->d_name) == 0)
                        r = gc_unlink(g, path);
        }
        closedir(d);
        err_clear();
        return r < 0 ? r : 0;
}

int cmd_gc(int argc, char **argv)
{
        static const struct option opts[] = {
                {"image-id", required_argument, NULL, 'i'},
                {"all-unreferenced", no_argument, NULL, 'a'},
                {"dry-run", no_argument, NULL, 'n'},
                {"help", no_argument, NULL, 'h'},
                {0, 0, 0, 0},
        };
        const char *image_id = NULL;
        bool all = false;
        struct config cfg;
        struct gc g = {0};
        int c, r, status = CMD_EXIT_FAILURE;

        while ((c = cli_getopt(argc, argv, "h", opts)) != -1) {
                switch (c) {
                case 'i':
                        image_id = optarg;
                        break;
                case 'a':
                        all = true;
                        break;
                case 'n':
                        g.dry_run = true;
                        break;
                case 'h':
                        printf("Usage: flyio-image-manager gc (--image-id ID | --all-unreferenced) [--dry-run]\n"
                               "\n"
                               "Remove an image's snapshots, its origin (unless another image shares\n"
                               "it) and its tarball, in that order; or, with --all-unreferenced,\n"
                               "origins no image maps to, half-made devices of failed runs, and\n"
                               "tarballs in LOCAL_DIR that no image row knows. Snapshots in use by a\n"
                               "VM are busy and make gc fail for that image.\n"
                               "\n"
                               "  --image-id ID        the image to remove\n"
                               "  --all-unreferenced   remove everything nothing refers to\n"
                               "  --dry-run            say what would be removed, change nothing\n");
                        return CMD_EXIT_OK;
                default:
                        return CMD_EXIT_USAGE;
                }
        }
        if (cli_no_positional(argv[0], argc, argv))
                return CMD_EXIT_USAGE;
        if (!image_id == !all)
                return cli_usage(argv[0], "give exactly one of --image-id and --all-unreferenced");
        if (image_id && request_validate_image_id(image_id) < 0)
                return cli_usage(argv[0], "--image-id: %s", err_last());
        if (cli_config(&cfg) < 0)
                return CMD_EXIT_USAGE;
        g.cfg = &cfg;
        if (cli_db_open(&cfg, true, &g.db) < 0)
                goto out;
        r = image_id ? gc_image(&g, image_id) : gc_unreferenced(&g);
        if (r < 0) {
                status = cli_fail(r);
                goto out;
        }
        printf("%s%d item%s removed\n", g.dry_run ? "dry run: " : "", g.removed,
               g.removed == 1 ? "" : "s");
        status = CMD_EXIT_OK;
out:
        db_free(g.db);
        config_done(&cfg);
        return status;
}
