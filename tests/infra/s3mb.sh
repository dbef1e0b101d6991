#!/usr/bin/env bash
# Create BUCKET on the test S3Proxy. Idempotent: a bucket we already own
# (409 BucketAlreadyOwnedByYou) counts as success.
#   tests/infra/s3mb.sh BUCKET
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 BUCKET" >&2; exit 2; }
# shellcheck source=s3common.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/s3common.sh"

resp=$(mktemp)
trap 'rm -f "$resp"' EXIT
if ! s3_request "200 409" "$resp" -X PUT "$(s3_url "$1")"; then
        exit 1
fi
# 409 is also sent for a name owned by someone else; only ours is fine.
if grep -q '<Code>' "$resp" && ! grep -q BucketAlreadyOwnedByYou "$resp"; then
        cat "$resp" >&2
        exit 1
fi
