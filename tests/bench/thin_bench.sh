#!/usr/bin/env bash
# Benchmark: thin snapshot + activation through our libdevmapper layer versus the same kernel
# messages sent through the dmsetup binary, in one boot of the test VM.
#
# Usage: tests/bench/thin_bench.sh [BUILD_DIR] [ROUNDS]
#
#   BUILD_DIR  a built tree containing tests/dm/thin_bench (default: build)
#   ROUNDS     rounds per scenario and side (default 15)
#
# Two scenarios (see tests/dm/thin_bench.c): an inactive origin (ours: create_snap +
# activate; dmsetup: message + create) and an active origin (dmsetup adds suspend and resume).
# Prints each side's median and the ratio. Under the VM's software emulation a process spawn
# costs ~40x what it does on a real host, so the ratio overstates the gap there; the
# absolute numbers of the library path are the ones to watch for regressions.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
readonly here repo

build="${1:-build}"
rounds="${2:-15}"
case "$build" in
/*) ;;
*) build="$repo/$build" ;;
esac
if [ ! -x "$build/tests/dm/thin_bench" ]; then
	echo "thin_bench.sh: error: no '$build/tests/dm/thin_bench'; build the thin_bench target" >&2
	exit 2
fi
if ! [[ "$rounds" =~ ^[1-9][0-9]*$ ]]; then
	echo "thin_bench.sh: error: ROUNDS must be a positive number, got '$rounds'" >&2
	exit 2
fi

exec "$repo/tests/vm/run.sh" -t 1800 -- "$build/tests/dm/thin_bench" --rounds "$rounds"
