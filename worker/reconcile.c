#include "worker/reconcile.h"

#include <inttypes.h>

#include "common/err.h"
#include "common/log.h"
#include "config/config.h"
#include "stages/thin_registry.h"

static void reconcile_log(enum thin_reconcile_finding what, uint32_t id, const char *detail,
                          void *userdata)
{
        const char *pool = userdata;

        if (what == THIN_RECONCILE_IN_PROGRESS)
                log_info("reconcile", "pool=%s thin_id=%" PRIu32 " detail=%s", log_quote(pool), id,
                         log_quote(detail));
        else if (what == THIN_RECONCILE_STALLED)
                log_warning("reconcile", "pool=%s thin_id=%" PRIu32 " detail=%s", log_quote(pool),
                            id, log_quote(detail));
        else
                log_notice("reconcile", "pool=%s thin_id=%" PRIu32 " detail=%s", log_quote(pool),
                           id, log_quote(detail));
}

static int reconcile_pool(const struct config *cfg, struct db *db, const char *pool)
{
        int r;

        r = thin_registry_reconcile(db, cfg->host_id, pool, true, reconcile_log, (void *)pool);
        if (r < 0)
                return log_warning_errno(r, "failed to reconcile the thin pool", "pool=%s",
                                         log_quote(pool));
        if (r > 0)
                log_warning("thin pool and database disagree; see the reconcile lines above",
                            "pool=%s problems=%d", log_quote(pool), r);
        r = thin_registry_stalled(db, cfg->host_id, pool, cfg->unpack_timeout, reconcile_log,
                                  (void *)pool);
        if (r < 0)
                log_warning_errno(r, "failed to look for stalled runs", "pool=%s", log_quote(pool));
        r = thin_registry_reactivate(db, cfg->host_id, pool, reconcile_log, (void *)pool);
        if (r < 0)
                return log_warning_errno(r, "failed to re-activate devices", "pool=%s",
                                         log_quote(pool));
        if (r > 0)
                log_notice("re-activated devices after a restart", "pool=%s count=%d",
                           log_quote(pool), r);
        return 0;
}

int reconcile_at_start(const struct config *cfg, struct db *db)
{
        char **pools = NULL;
        int first = 0;
        int r;

        /* Requests may name any pool: every one this host has rows in, and POOL_NAME. */
        r = thin_registry_pools(db, cfg->host_id, cfg->pool_name, &pools);
        if (r < 0)
                return log_warning_errno(r, "failed to list the thin pools to reconcile", "");
        for (char **p = pools; *p; p++) {
                r = reconcile_pool(cfg, db, *p);
                if (r < 0 && first == 0)
                        first = r;
        }
        thin_registry_pools_free(pools);
        return first;
}
