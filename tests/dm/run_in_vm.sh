#!/usr/bin/env bash
# Run the device-mapper tests (ctest label "dm") inside one throwaway qemu VM.
#
# Usage: tests/dm/run_in_vm.sh [BUILD_DIR] [CTEST ARGS...]
#
#   BUILD_DIR   a configured and built tree (default: build); relative to the repository root
#               or absolute
#   CTEST ARGS  passed on, e.g. -R test_thin_pool or -V
#
# The host kernel has no device-mapper, so the tests run in the VM of tests/vm/run.sh, which
# sees the host's / read-only. -w gives the guest a throwaway writable root, so that ctest can
# write its logs into BUILD_DIR/Testing; nothing reaches the host. Exit status: ctest's, or
# 125 when the VM gave none. FIM_DM_TIMEOUT (seconds, default 900) bounds the whole VM run.
set -euo pipefail

readonly here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly repo="$(cd "$here/../.." && pwd)"

build="${1:-build}"
[ "$#" -eq 0 ] || shift
case "$build" in
/*) ;;
*) build="$repo/$build" ;;
esac
if [ ! -f "$build/tests/dm/CTestTestfile.cmake" ]; then
	echo "run_in_vm.sh: error: '$build' is not a configured build tree with tests/dm" >&2
	exit 2
fi
build="$(cd "$build" && pwd -P)"

exec "$repo/tests/vm/run.sh" -w -t "${FIM_DM_TIMEOUT:-900}" -- \
	ctest --test-dir "$build" -L dm --output-on-failure "$@"
