#!/usr/bin/env bash
# Download s3://BUCKET/KEY from the test S3Proxy to OUT (default: stdout).
#   tests/infra/s3get.sh BUCKET KEY [OUT]
set -euo pipefail
[ $# -eq 2 ] || [ $# -eq 3 ] || { echo "usage: $0 BUCKET KEY [OUT]" >&2; exit 2; }
# shellcheck source=s3common.sh source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/s3common.sh"

out=$(mktemp)
trap 'rm -f "$out"' EXIT
s3_request 200 "$out" "$(s3_url "$1" "$2")"
if [ $# -eq 3 ]; then
        mv "$out" "$3"
else
        cat "$out"
fi
