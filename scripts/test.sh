#!/usr/bin/env bash
# The whole test suite, on a fresh machine as on a developer's: installs what is missing,
# builds three times (warnings as errors; ASan+UBSan; TSan), starts real PostgreSQL, S3Proxy
# and Kafka on loopback, runs unit and integration tests in the first two builds and the
# threaded worker-pool tests in the TSan build, runs the device-mapper
# suites inside one qemu VM boot (the host kernel has no dm-thin), the end-to-end suite and
# the README's main command (scripts/demo.sh) in a VM boot each, and a short fuzz run of
# the tar extractor. Stops the services on exit, also on failure.
#
# Usage: scripts/test.sh [--no-vm] [--no-fuzz] [--no-asan] [--no-tsan]
#   (the flags are for quick local iterations; CI runs everything)
# Environment: FIM_FUZZ_SECONDS (default 120), FIM_VM_DIRECT=1 to run the dm suites on this
# host instead of a VM when its kernel has dm-thin.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

run_vm=1
run_fuzz=1
run_asan=1
run_tsan=1
for arg in "$@"; do
        case "$arg" in
        --no-vm) run_vm=0 ;;
        --no-fuzz) run_fuzz=0 ;;
        --no-asan) run_asan=0 ;;
        --no-tsan) run_tsan=0 ;;
        *) echo "usage: scripts/test.sh [--no-vm] [--no-fuzz] [--no-asan] [--no-tsan]" >&2; exit 2 ;;
        esac
done

JOBS=$(nproc)
SUITES_PASSED=0
SUITES_FAILED=0
FAILED_NAMES=()
T0=$(date +%s)

step() { printf '\n=== %s (%ds)\n' "$*" $(( $(date +%s) - T0 )); }

# suite NAME COMMAND...: run one suite, record the outcome, keep going.
suite() {
        local name=$1
        shift
        step "$name"
        if "$@"; then
                SUITES_PASSED=$((SUITES_PASSED + 1))
        else
                SUITES_FAILED=$((SUITES_FAILED + 1))
                FAILED_NAMES+=("$name")
                echo "*** suite '$name' FAILED"
        fi
}

step "setup: Debian packages"
bash scripts/setup.sh

suite "static checks" bash scripts/check-style.sh

step "build: warnings as errors"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFIM_WERROR=ON >/dev/null
cmake --build build -j"$JOBS"
if [ "$run_asan" = 1 ]; then
        step "build: ASan + UBSan"
        cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DFIM_WERROR=ON -DFIM_SANITIZE=ON >/dev/null
        cmake --build build-asan -j"$JOBS"
fi

if [ "$run_tsan" = 1 ]; then
        step "build: TSan"
        cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=Debug -DFIM_WERROR=ON -DFIM_SANITIZE=thread >/dev/null
        cmake --build build-tsan -j"$JOBS"
fi

step "services: PostgreSQL, S3Proxy, Kafka"
export FIM_SERVICES_DIR=${FIM_SERVICES_DIR:-/tmp/fim-services-test}
trap 'bash tests/infra/services.sh stop >/dev/null 2>&1 || true' EXIT
bash tests/infra/services.sh start
# shellcheck disable=SC1091
source "$FIM_SERVICES_DIR/services.env"

# Fail fast on sanitizer reports, and keep leak checking on (the default for ASan).
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

suite "unit + integration tests" ctest --test-dir build -LE dm --output-on-failure -j"$JOBS"
if [ "$run_asan" = 1 ]; then
        suite "unit + integration tests (ASan+UBSan)" \
                ctest --test-dir build-asan -LE dm --output-on-failure -j"$JOBS"
fi

if [ "$run_tsan" = 1 ]; then
        # The threaded parts: the FSM engine and lease keeper, and the worker pools. The shim
        # lets TSan follow librdkafka's C11 threads (tests/tsan/c11threads.c).
        suite "worker-pool tests (TSan)" env \
                LD_PRELOAD="$ROOT/build-tsan/tests/tsan/libfim_tsan_c11.so" \
                TSAN_OPTIONS="suppressions=$ROOT/tests/tsan/tsan.supp halt_on_error=1" \
                ctest --test-dir build-tsan --output-on-failure -j"$JOBS" \
                -R '^test_(fsm|pool_offsets|worker.*|verify_kafka|prefix_hasher|download)$'
fi

if [ "$run_vm" = 1 ]; then
        suite "VM harness self-test" bash tests/vm/selftest.sh
        suite "device-mapper suites (qemu VM, real dm-thin)" bash tests/dm/run_in_vm.sh build
        suite "end to end: real worker in the VM" bash tests/e2e/run.sh build
        suite "the README's main command (scripts/demo.sh, twice, then --clean)" \
                bash tests/demo/test_demo.sh
fi

if [ "$run_fuzz" = 1 ] && [ -x tests/fuzz/run.sh ]; then
        suite "fuzz: tar extractor (${FIM_FUZZ_SECONDS:-120} s)" \
                bash tests/fuzz/run.sh "${FIM_FUZZ_SECONDS:-120}"
fi

step "done"
if [ "${#FAILED_NAMES[@]}" -gt 0 ]; then
        printf 'failed suite: %s\n' "${FAILED_NAMES[@]}"
fi
echo "$SUITES_PASSED passed, $SUITES_FAILED failed"
[ "$SUITES_FAILED" -eq 0 ]
