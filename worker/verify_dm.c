/*
 * verify-system: the device-mapper control node, the thin pool POOL_NAME and its health, and
 * whether the pool and PostgreSQL agree on the thin ids (reconciliation, report only).
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

struct verify_reconcile {
        struct verify_report *rep;
        int shown;
};

static void verify_reconcile_finding(enum thin_reconcile_finding what, uint32_t id,
                                     const char *detail, void *userdata)
{
        struct verify_reconcile *v = userdata;

        (void)id;
        if (what == THIN_RECONCILE_IN_PROGRESS)
                return;
        /* A handful of lines is enough to act on; the count says the rest. */
        if (v->shown++ < 5)
                verify_report_add(v->rep, "thin-ids", false, "%s", detail);
}

static void verify_thin_ids(struct verify_report *rep, const struct config *cfg)
{
        struct verify_reconcile v = {rep, 0};
        struct db *db = NULL;
        int r;

        r = db_connect(cfg->database_url, &db);
        if (r < 0) {
                verify_report_add(rep, "thin-ids", false, "not checked: database unreachable");
                return;
        }
        r = thin_registry_reconcile(db, cfg->host_id, cfg->pool_name, false,
                                    verify_reconcile_finding, &v);
        if (r < 0)
                verify_report_add(rep, "thin-ids", false, "could not compare pool and database: %s",
                                  err_text(r));
        else if (r == 0)
                verify_report_add(rep, "thin-ids", true,
                                  "pool '%s' and the database agree on every thin id",
                                  cfg->pool_name);
        else
                verify_report_add(
                        rep, "thin-ids", false,
                        "%d problem%s; the worker repairs what is safe at start, or run 'flyio-image-manager gc --all-unreferenced'",
                        r, r == 1 ? "" : "s");
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
