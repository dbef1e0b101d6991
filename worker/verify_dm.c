/*
 * verify-system: the device-mapper control node, the thin pool POOL_NAME and its health,
 * whether every pool this host has rows in and PostgreSQL agree on the thin ids
 * (reconciliation, report only), and runs that hold a half-made device and have been gone for
 * longer than UNPACK_TIMEOUT.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/err.h"
#include "config/config.h"
#include "db/db.h"
#include "stages/thin_pool.h"
#include "stages/thin_registry.h"
#include "worker/verify.h"

/* Findings beyond these are counted, not shown: a handful of lines is enough to act on. */
#define VERIFY_SHOWN_MAX 5

struct verify_reconcile {
        struct verify_report *rep;
        const char *check;
        const char *pool;
        int shown;
};

static void verify_reconcile_finding(enum thin_reconcile_finding what, uint32_t id,
                                     const char *detail, void *userdata)
{
        struct verify_reconcile *v = userdata;

        (void)id;
        if (what == THIN_RECONCILE_IN_PROGRESS)
                return;
        if (v->shown++ < VERIFY_SHOWN_MAX)
                verify_report_add(v->rep, v->check, false, "pool '%s': %s", v->pool, detail);
}

static void verify_thin_ids_of(struct verify_report *rep, struct db *db, const struct config *cfg,
                               const char *pool)
{
        struct verify_reconcile v = {rep, "thin-ids", pool, 0};
        int r;

        r = thin_registry_reconcile(db, cfg->host_id, pool, false, verify_reconcile_finding, &v);
        if (r < 0)
                verify_report_add(rep, "thin-ids", false,
                                  "pool '%s': could not compare the pool and the database: %s",
                                  pool, err_text(r));
        else if (r == 0)
                verify_report_add(rep, "thin-ids", true,
                                  "pool '%s' and the database agree on every thin id", pool);
        else
                verify_report_add(
                        rep, "thin-ids", false,
                        "pool '%s': %d problem%s; the worker repairs what is safe at start, or run 'flyio-image-manager gc --all-unreferenced'",
                        pool, r, r == 1 ? "" : "s");
}

/*
 * A 'creating' row of a run that can still resume is not a problem while its message may come
 * back; one that has not for longer than UNPACK_TIMEOUT after its lease expired is.
 */
static void verify_stalled(struct verify_report *rep, struct db *db, const struct config *cfg,
                           char **pools)
{
        int total = 0, shown = 0;

        for (char **p = pools; *p; p++) {
                struct verify_reconcile v = {rep, "stalled-runs", *p, shown};
                int r = thin_registry_stalled(db, cfg->host_id, *p, cfg->unpack_timeout,
                                              verify_reconcile_finding, &v);

                if (r < 0) {
                        verify_report_add(rep, "stalled-runs", false,
                                          "pool '%s': could not look for stalled runs: %s", *p,
                                          err_text(r));
                        return;
                }
                total += r;
                shown = v.shown;
        }
        if (total == 0)
                verify_report_add(
                        rep, "stalled-runs", true,
                        "no half-made device is held by a run gone for longer than UNPACK_TIMEOUT (%d s)",
                        cfg->unpack_timeout);
        else if (total > VERIFY_SHOWN_MAX)
                verify_report_add(rep, "stalled-runs", false, "%d stalled runs in all", total);
}

/* Every pool this host has rows in, and POOL_NAME: requests may name any pool. */
static void verify_thin_ids(struct verify_report *rep, const struct config *cfg)
{
        struct db *db = NULL;
        char **pools = NULL;
        int r;

        r = db_connect(cfg->database_url, &db);
        if (r < 0) {
                verify_report_add(rep, "thin-ids", false, "not checked: database unreachable");
                return;
        }
        r = thin_registry_pools(db, cfg->host_id, cfg->pool_name, &pools);
        if (r < 0) {
                verify_report_add(rep, "thin-ids", false, "could not list the pools: %s",
                                  err_text(r));
                goto out;
        }
        for (char **p = pools; *p; p++)
                verify_thin_ids_of(rep, db, cfg, *p);
        verify_stalled(rep, db, cfg, pools);
out:
        thin_registry_pools_free(pools);
        db_free(db);
}

void verify_devicemapper(struct verify_report *rep, const struct config *cfg)
{
        static const char *const modes[] = {"rw", "out of data space", "read-only", "failed"};
        struct thin_pool_status st;
        int r;

        if (access("/dev/mapper/control", R_OK | W_OK) < 0) {
                verify_report_add(
                        rep, "devicemapper", false,
                        "/dev/mapper/control is not usable (%s): this kernel has no device-mapper or we lack privileges; run the worker as root on a host with dm-thin",
                        strerror(errno));
                return;
        }
        r = thin_pool_status(cfg->pool_name, &st);
        if (r == -ENODEV) {
                verify_report_add(
                        rep, "devicemapper", false,
                        "thin pool '%s' does not exist: create it (pool-setup for development) or set POOL_NAME",
                        cfg->pool_name);
                return;
        }
        if (r < 0) {
                verify_report_add(rep, "devicemapper", false, "thin pool '%s': %s", cfg->pool_name,
                                  err_text(r));
                return;
        }
        verify_report_add(rep, "devicemapper",
                          st.mode == THIN_POOL_MODE_RW && !st.needs_check &&
                                  st.data_used_percent < cfg->pool_high_water_percent &&
                                  st.metadata_used_percent < cfg->pool_high_water_percent,
                          "thin pool '%s': %s%s, data %.1f%% of %" PRIu64
                          " MiB, metadata %.1f%% of %" PRIu64 " MiB (high-water mark %d%%)",
                          cfg->pool_name, modes[st.mode],
                          st.needs_check ? ", needs_check (run thin_check on its metadata)" : "",
                          st.data_used_percent, st.data_total_bytes >> 20, st.metadata_used_percent,
                          st.metadata_total_bytes >> 20, cfg->pool_high_water_percent);
        verify_thin_ids(rep, cfg);
}
