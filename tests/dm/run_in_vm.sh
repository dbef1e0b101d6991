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
#
# Services on the host: FIM_PG_ADMIN_URL, DATABASE_URL and S3_ENDPOINT (as exported by
# tests/infra/services.sh) that point at 127.0.0.1 or localhost get their port forwarded into
# the guest and their host rewritten to the guest's view of it; nothing else is reachable.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
readonly here repo

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

# The address under which run.sh's guest reaches a forwarded host port (see run.sh -p); the
# host itself in FIM_VM_DIRECT mode.
guest_host=10.0.2.100
[ "${FIM_VM_DIRECT:-0}" != 1 ] || guest_host=127.0.0.1

vm_args=(-w -t "${FIM_DM_TIMEOUT:-900}")
declare -A forwarded=()
for var in FIM_PG_ADMIN_URL DATABASE_URL S3_ENDPOINT; do
	url="${!var:-}"
	[ -n "$url" ] || continue
	re='^([a-z]+://([^@/]*@)?)(127\.0\.0\.1|localhost):([0-9]+)(/.*)?$'
	if [[ "$url" =~ $re ]]; then
		port="${BASH_REMATCH[4]}"
		url="${BASH_REMATCH[1]}$guest_host:$port${BASH_REMATCH[5]}"
		[ -n "${forwarded[$port]:-}" ] || vm_args+=(-p "$port")
		forwarded[$port]=1
	fi
	vm_args+=(-e "$var=$url")
done
# The rest of S3's settings pass as they are (process-image's test downloads for real), and
# FIM_TEST_FILTER selects cases of the C suites while iterating.
for var in AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION S3_BUCKET S3_FORCE_PATH_STYLE \
	FIM_TEST_FILTER; do
	[ -z "${!var:-}" ] || vm_args+=(-e "$var=${!var}")
done

exec "$repo/tests/vm/run.sh" "${vm_args[@]}" -- \
	ctest --test-dir "$build" -L dm --output-on-failure "$@"
