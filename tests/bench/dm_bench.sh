#!/usr/bin/env bash
# Benchmark: the device-mapper side of the worker against what an operator would script, in
# ONE boot of the test VM (the host kernel has no device-mapper), so both comparisons see the
# same guest, the same emulation and the same moment of the host's load.
#
#   activate  thin snapshot + activation through our libdevmapper layer against the same
#             kernel messages sent through the dmsetup binary, for an inactive and for an
#             active (suspended around the snapshot) origin; see tests/dm/thin_bench.c.
#   unpack    the unpack stage's FSM as the worker runs it (id in PostgreSQL, create_thin,
#             activate, mkfs.ext4, mount, the safe extractor, sync, the verify mount, record)
#             against create_thin + activate, mkfs.ext4 (same options), mount, GNU tar -xp
#             with the xattrs we keep, sync, unmount; see tests/dm/unpack_bench.c.
#
# Each prints its rounds, each side's median and the ratio. Under the VM's software emulation
# a process spawn costs ~40x what it does on a real host, so the activate ratio overstates the
# gap there; the absolute numbers of the library path are the ones to watch for regressions.
#
# Usage: tests/bench/dm_bench.sh [BUILD_DIR] [ACTIVATE_ROUNDS] [UNPACK_ROUNDS] [TARBALL]
#   BUILD_DIR        a built tree with tests/dm/thin_bench and tests/dm/unpack_bench
#                    (default: build)
#   ACTIVATE_ROUNDS  rounds per activate scenario and side (default 15)
#   UNPACK_ROUNDS    rounds per unpack side (default 3)
#   TARBALL          default: the demo's Debian image if cached (.cache/demo), else the
#                    extraction benchmark's rootfs (.cache/bench/rootfs.tar, built by
#                    tests/bench/extract_bench.sh)
# Needs PostgreSQL for the unpack stage: FIM_PG_ADMIN_URL as exported by
# tests/infra/services.sh (its port is forwarded into the VM; a scratch database is made and
# dropped).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
readonly here repo

build="${1:-build}"
thin_rounds="${2:-15}"
unpack_rounds="${3:-3}"
tarball="${4:-}"
case "$build" in /*) ;; *) build="$repo/$build" ;; esac
for b in thin_bench unpack_bench; do
	[ -x "$build/tests/dm/$b" ] ||
		{ echo "dm_bench.sh: no '$build/tests/dm/$b'; build the $b target" >&2; exit 2; }
done
for n in "$thin_rounds" "$unpack_rounds"; do
	[[ "$n" =~ ^[1-9][0-9]*$ ]] ||
		{ echo "dm_bench.sh: rounds must be positive numbers, got '$n'" >&2; exit 2; }
done
if [ -z "$tarball" ]; then
	for t in "$repo/.cache/demo/debian-bookworm-minbase.tar" "$repo/.cache/bench/rootfs.tar"; do
		[ -f "$t" ] && { tarball=$t; break; }
	done
fi
[ -n "$tarball" ] && [ -f "$tarball" ] || {
	echo "dm_bench.sh: no tarball: run scripts/demo.sh or tests/bench/extract_bench.sh once, or pass one" >&2
	exit 2
}
tarball="$(cd "$(dirname "$tarball")" && pwd -P)/$(basename "$tarball")"

url=${FIM_PG_ADMIN_URL:-}
re='^([a-z]+://([^@/]*@)?)(127\.0\.0\.1|localhost):([0-9]+)(/.*)$'
if ! [[ "$url" =~ $re ]]; then
	echo "dm_bench.sh: FIM_PG_ADMIN_URL must point at PostgreSQL on this host (source the services.env of tests/infra/services.sh)" >&2
	exit 2
fi
port="${BASH_REMATCH[4]}"
guest_url="${BASH_REMATCH[1]}10.0.2.100:$port${BASH_REMATCH[5]}"
[ "${FIM_VM_DIRECT:-0}" != 1 ] || guest_url=$url

# One guest command: both benchmarks, one after the other; the status is the first failure's.
exec "$repo/tests/vm/run.sh" -t 5400 -m 6144 -p "$port" -e "FIM_PG_ADMIN_URL=$guest_url" -- \
	bash -c 'echo "== activate: ours against dmsetup"; "$1" --rounds "$2"; a=$?
		echo; echo "== unpack: ours against mkfs.ext4 + GNU tar"; "$3" --rounds "$4" --tar "$5"; u=$?
		[ "$a" -ne 0 ] && exit "$a"; exit "$u"' dm_bench \
	"$build/tests/dm/thin_bench" "$thin_rounds" "$build/tests/dm/unpack_bench" "$unpack_rounds" \
	"$tarball"
