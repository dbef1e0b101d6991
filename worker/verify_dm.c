/* verify-system: the device-mapper control node and the thin pool POOL_NAME. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <libdevmapper.h>

#include "config/config.h"
#include "worker/verify.h"

void verify_devicemapper(struct verify_report *rep, const struct config *cfg)
{
        struct dm_task *dmt = NULL;
        struct dm_info info;

        if (access("/dev/mapper/control", R_OK | W_OK) < 0) {
                verify_report_add(
                        rep, "devicemapper", false,
                        "/dev/mapper/control is not usable (%s): this kernel has no device-mapper or we lack privileges; run the worker as root on a host with dm-thin",
                        strerror(errno));
                return;
        }
        dmt = dm_task_create(DM_DEVICE_INFO);
        if (!dmt || !dm_task_set_name(dmt, cfg->pool_name) || !dm_task_run(dmt) ||
            !dm_task_get_info(dmt, &info)) {
                verify_report_add(rep, "devicemapper", false,
                                  "failed to query device-mapper for pool '%s'", cfg->pool_name);
        } else if (!info.exists) {
                verify_report_add(
                        rep, "devicemapper", false,
                        "thin pool '%s' does not exist: create it (pool-setup for development) or set POOL_NAME",
                        cfg->pool_name);
        } else {
                verify_report_add(rep, "devicemapper", true, "thin pool '%s' present (%u:%u)",
                                  cfg->pool_name, info.major, info.minor);
        }
        if (dmt)
                dm_task_destroy(dmt);
}
