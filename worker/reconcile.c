#include "worker/reconcile.h"

#include <inttypes.h>

#include "common/err.h"
#include "common/log.h"
#include "config/config.h"
#include "stages/thin_registry.h"

static void reconcile_log(enum thin_reconcile_finding what, uint32_t id, const char *detail,
                          void *userdata)
{
        (void)userdata;
        if (what == THIN_RECONCILE_IN_PROGRESS)
                log_info("reconcile", "thin_id=%" PRIu32 " detail=%s", id, log_quote(detail));
        else
                log_notice("reconcile", "thin_id=%" PRIu32 " detail=%s", id, log_quote(detail));
}

int reconcile_at_start(const struct config *cfg, struct db *db)
{
        int r;

        r = thin_registry_reconcile(db, cfg->host_id, cfg->pool_name, true, reconcile_log, NULL);
        if (r < 0)
                return log_warning_errno(r, "failed to reconcile the thin pool", "pool=%s",
                                         cfg->pool_name);
        if (r > 0)
                log_warning("thin pool and database disagree; see the reconcile lines above",
                            "pool=%s problems=%d", cfg->pool_name, r);
        r = thin_registry_reactivate(db, cfg->host_id, cfg->pool_name, reconcile_log, NULL);
        if (r < 0)
                return log_warning_errno(r, "failed to re-activate devices", "pool=%s",
                                         cfg->pool_name);
        if (r > 0)
                log_notice("re-activated devices after a restart", "pool=%s count=%d",
                           cfg->pool_name, r);
        return 0;
}
