#!/usr/bin/env bash
# Upload FILE to s3://BUCKET/KEY on the test S3Proxy with a real SigV4
# signature, e.g. to seed image tarballs before a worker test.
#   tests/infra/s3put.sh BUCKET KEY FILE
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 BUCKET KEY FILE" >&2; exit 2; }
[ -f "$3" ] || { echo "$0: $3: no such file" >&2; exit 1; }
# shellcheck source=s3common.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/s3common.sh"

resp=$(mktemp)
trap 'rm -f "$resp"' EXIT
s3_request 200 "$resp" -T "$3" "$(s3_url "$1" "$2")"
