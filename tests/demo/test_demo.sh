#!/usr/bin/env bash
# The README's main command, scripts/demo.sh, as a user runs it: twice, then --clean. It runs
# on the services scripts/test.sh started (FIM_SERVICES_DIR), in a state directory of its own,
# so it builds its own binary, makes (or reuses the cached) Debian image, boots the VM and
# runs the real worker. The checks are on what the demo shows the user:
#
#   first run:  the worker ran the three stages, list-images shows the image completed with
#               its checksum, list-snapshots shows the snapshot active in the kernel, and
#               /etc/os-release read from the snapshot is Debian's;
#   second run: the worker acknowledges the request as already complete and process-image
#               reports every stage already done;
#   --clean:    the state directory, the demo's database and topics are gone, and the
#               services (not the demo's own) are still up.
#
# Usage: tests/demo/test_demo.sh      (run by scripts/test.sh after the VM suites)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
: "${FIM_SERVICES_DIR:?FIM_SERVICES_DIR is not set: run through scripts/test.sh}"
export FIM_DEMO_DIR=${FIM_DEMO_TEST_DIR:-/tmp/fim-demo-test}
# shellcheck disable=SC1091
source "$FIM_SERVICES_DIR/services.env"

passed=0
failed=0
OUT=$(mktemp -d /tmp/fim-demo-test-out.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

check() {
        local name=$1
        shift
        if "$@"; then
                passed=$((passed + 1))
                echo "PASS $name"
        else
                failed=$((failed + 1))
                echo "FAIL $name"
        fi
}
has() { grep -Eq -- "$2" "$1"; }

# A state directory left by an earlier, interrupted run would make the first run a second.
FIM_SERVICES_DIR=$FIM_SERVICES_DIR bash "$ROOT/scripts/demo.sh" --clean >/dev/null 2>&1

bash "$ROOT/scripts/demo.sh" >"$OUT/first.log" 2>&1
status=$?
check "first run exits 0" test "$status" -eq 0
[ "$status" -eq 0 ] || tail -40 "$OUT/first.log" | sed 's/^/    /'
check "first run: the worker ran every stage" \
        has "$OUT/first.log" "the worker ran download -> unpack -> activate"
check "first run: each stage completed once" has "$OUT/first.log" \
        "download complete=1 already_complete=0, unpack complete=1, activate complete=1"
check "first run: list-images shows the image completed with its SHA-256" \
        has "$OUT/first.log" "^debian-12-minbase +completed +[0-9]+ +[0-9a-f]{64} "
check "first run: list-snapshots shows the snapshot active in the kernel" \
        has "$OUT/first.log" "^snapshot-debian-12-minbase .* active$"
check "first run: /etc/os-release of the snapshot is Debian 12's" \
        has "$OUT/first.log" '^PRETTY_NAME="Debian GNU/Linux 12 \(bookworm\)"$'

bash "$ROOT/scripts/demo.sh" >"$OUT/second.log" 2>&1
status=$?
check "second run exits 0" test "$status" -eq 0
[ "$status" -eq 0 ] || tail -40 "$OUT/second.log" | sed 's/^/    /'
check "second run: the worker acknowledges the request as already complete" \
        has "$OUT/second.log" "acknowledged the re-enqueued download request as already complete"
check "second run: no stage ran again" has "$OUT/second.log" \
        "download complete=0 already_complete=1, unpack complete=0, activate complete=0"
check "second run: process-image finds every stage done" \
        test "$(grep -Ec '^(download|unpack|activate): already done' "$OUT/second.log")" -eq 3

FIM_SERVICES_DIR=$FIM_SERVICES_DIR bash "$ROOT/scripts/demo.sh" --clean >"$OUT/clean.log" 2>&1
check "--clean exits 0" test $? -eq 0
check "--clean removes the state directory" test ! -e "$FIM_DEMO_DIR"
check "--clean drops the demo's database" test "$(psql "$FIM_PG_ADMIN_URL" -qAtc \
        "SELECT count(*) FROM pg_database WHERE datname = 'fim_demo'")" = 0
services_up() { bash "$ROOT/tests/infra/services.sh" status >/dev/null; }
check "--clean leaves services it did not start running" services_up

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
