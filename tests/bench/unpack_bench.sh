#!/usr/bin/env bash
# Benchmark: our unpack stage against the baseline an operator would script, on the same
# kind of thin device, in one boot of the test VM (the host kernel has no device-mapper).
#
#   ours      the unpack stage's FSM as the worker runs it (id in PostgreSQL, create_thin,
#             activate, mkfs.ext4, mount, the safe extractor, sync, the verify mount, record)
#   baseline  create_thin + activate, mkfs.ext4 (same options), mount, GNU tar -xp with the
#             xattrs we keep, sync, unmount
#
# See tests/dm/unpack_bench.c. Prints each round, each side's median and the ratio.
#
# Usage: tests/bench/unpack_bench.sh [BUILD_DIR] [ROUNDS] [TARBALL]
#   TARBALL  default: the demo's Debian image if cached (.cache/demo), else the extraction
#            benchmark's rootfs (.cache/bench/rootfs.tar, built by tests/bench/extract_bench.sh)
# Needs PostgreSQL: FIM_PG_ADMIN_URL as exported by tests/infra/services.sh (its port is
# forwarded into the VM; the benchmark makes and drops a scratch database).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="${1:-build}"
rounds="${2:-3}"
tarball="${3:-}"
case "$build" in /*) ;; *) build="$repo/$build" ;; esac
bench="$build/tests/dm/unpack_bench"
[ -x "$bench" ] || { echo "unpack_bench.sh: no '$bench'; build the unpack_bench target" >&2; exit 2; }
if [ -z "$tarball" ]; then
        for t in "$repo/.cache/demo/debian-bookworm-minbase.tar" "$repo/.cache/bench/rootfs.tar"; do
                [ -f "$t" ] && { tarball=$t; break; }
        done
fi
[ -n "$tarball" ] && [ -f "$tarball" ] || {
        echo "unpack_bench.sh: no tarball: run scripts/demo.sh or tests/bench/extract_bench.sh once, or pass one" >&2
        exit 2
}
tarball="$(cd "$(dirname "$tarball")" && pwd -P)/$(basename "$tarball")"

url=${FIM_PG_ADMIN_URL:-}
re='^([a-z]+://([^@/]*@)?)(127\.0\.0\.1|localhost):([0-9]+)(/.*)$'
if ! [[ "$url" =~ $re ]]; then
        echo "unpack_bench.sh: FIM_PG_ADMIN_URL must point at PostgreSQL on this host (source the services.env of tests/infra/services.sh)" >&2
        exit 2
fi
port="${BASH_REMATCH[4]}"
guest_url="${BASH_REMATCH[1]}10.0.2.100:$port${BASH_REMATCH[5]}"
[ "${FIM_VM_DIRECT:-0}" != 1 ] || guest_url=$url

exec "$repo/tests/vm/run.sh" -t 3600 -m 6144 -p "$port" -e "FIM_PG_ADMIN_URL=$guest_url" -- \
        "$bench" --rounds "$rounds" --tar "$tarball"
