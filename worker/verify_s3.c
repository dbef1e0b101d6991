/* verify-system: S3 reachable with the configured credentials, bucket S3_BUCKET present. */
#include <errno.h>
#include <string.h>

#include "common/err.h"
#include "config/config.h"
#include "stages/s3_client.h"
#include "worker/verify.h"

/* A key no image uses: a NoSuchKey answer proves the endpoint, credentials and bucket. */
#define VERIFY_S3_PROBE_KEY "flyio-image-manager-verify-system-probe"

void verify_s3(struct verify_report *rep, const struct config *cfg)
{
        struct s3_limits limits = {.stall_timeout_ms = 10000};
        struct s3_client_options o;
        struct s3_client *client = NULL;
        struct s3_object_info info;
        const char *who = config_has_s3_credentials(cfg) ? "signed" : "anonymous";
        int r;

        s3_client_options_from_config(cfg, &o);
        o.connect_timeout_ms = 5000;
        r = s3_client_new(&o, &client);
        if (r < 0) {
                verify_report_add(rep, "s3", false, "%s", err_text(r));
                return;
        }
        r = s3_client_head(client, cfg->s3_bucket, VERIFY_S3_PROBE_KEY, &limits, &info);
        if (r == 0 || (r == -ENOENT && !strstr(err_last(), "NoSuchBucket")))
                verify_report_add(rep, "s3", true, "bucket '%s' reachable (%s requests, %s)",
                                  cfg->s3_bucket, who,
                                  cfg->s3_endpoint[0] ? cfg->s3_endpoint : "AWS");
        else
                verify_report_add(rep, "s3", false, "%s", err_text(r));
        s3_client_free(client);
}
