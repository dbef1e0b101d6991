#!/usr/bin/env bash
# Deployment files, checked without a Docker engine or a running systemd.
#
#   tests/docker/test_docker.sh docker path/to/flyio-image-manager
#       docker/Dockerfile against scripts/setup.sh, CMake's pkg-config modules and the
#       libraries the binary links (ldd, dpkg -S); docker/compose.yaml parsed as YAML, its
#       services, privileges, mounts and ordering; docker/worker.env.example parsed by the
#       binary.
#   tests/docker/test_docker.sh config path/to/flyio-image-manager
#       config/flyio-image-manager.conf.example against config/config.c's settings table
#       and show-config; config/flyio-image-manager.service's ExecStart, stop and restart
#       settings, and systemd-analyze verify.
#
# The checks live in check_deploy.py. After them, a self-test breaks copies of the files in
# typical ways and makes sure the checks notice each one, so a checker that quietly stopped
# checking fails too. Ends with "N passed, N failed"; exit status 1 on any failure.
set -uo pipefail

GROUP=${1:-}
BIN=${2:-}
if [[ ! $GROUP =~ ^(docker|config)$ || -z $BIN ]]; then
        echo "usage: $0 docker|config path/to/flyio-image-manager" >&2
        exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CHECK=$HERE/check_deploy.py

passed=0
failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }
finish() { echo "$passed passed, $failed failed"; [ "$failed" -eq 0 ]; exit $?; }

# Debian's interpreter first: python3-yaml installs PyYAML for it, not for others on PATH.
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3 || true)
if [ -z "$PY" ]; then
        fail "setup: python3 is missing (scripts/setup.sh installs it)"
        finish
fi
if [ "$GROUP" = docker ] && ! "$PY" -c 'import yaml' 2>/dev/null; then
        fail "setup: PyYAML is missing for $PY: install python3-yaml (scripts/setup.sh lists it)"
        finish
fi

# The checker's lines without its closing count; counts its results.
run_checks() {
        local out
        out=$("$PY" "$CHECK" "$GROUP" "$BIN" 2>&1)
        printf '%s\n' "$out" | grep -v -E '^[0-9]+ passed, [0-9]+ failed$'
        passed=$((passed + $(printf '%s\n' "$out" | grep -c '^PASS ')))
        failed=$((failed + $(printf '%s\n' "$out" | grep -c '^FAIL ')))
        # A crash prints no FAIL line: count it.
        if ! printf '%s\n' "$out" | grep -qE '^[0-9]+ passed, [0-9]+ failed$'; then
                fail "check_deploy.py $GROUP did not finish"
        fi
}

run_checks

# The files check_deploy.py reads, copied so that a mutation never touches the tree.
copy_tree() {
        local dst=$1
        mkdir -p "$dst/docker" "$dst/config" "$dst/scripts" "$dst/cmake" "$dst/tests" \
                "$dst/stages"
        cp "$ROOT"/docker/* "$dst/docker/"
        cp "$ROOT/stages/thin_pool.h" "$ROOT/stages/unpack_stage.c" "$dst/stages/"
        cp "$ROOT/config/config.c" "$ROOT"/config/flyio-image-manager.* "$dst/config/"
        cp "$ROOT/scripts/setup.sh" "$dst/scripts/"
        cp "$ROOT/cmake/FimDependencies.cmake" "$dst/cmake/"
        cp "$ROOT/tests/CMakeLists.txt" "$dst/tests/"
}

# mutant NAME FILE SED-EXPR EXPECTED-ERE: break FILE in a copy; the checks must fail with a
# message matching EXPECTED-ERE.
mutant() {
        local name=$1 file=$2 expr=$3 want=$4 dir out
        dir=$(mktemp -d /tmp/fim-deploy-mutant.XXXXXX)
        copy_tree "$dir"
        sed -i -e "$expr" "$dir/$file"
        if cmp -s "$ROOT/$file" "$dir/$file"; then
                fail "self-test '$name': the mutation no longer applies to $file; update it"
        else
                out=$(FIM_CHECK_ROOT=$dir "$PY" "$CHECK" "$GROUP" "$BIN" 2>&1)
                if printf '%s\n' "$out" | grep -E '^FAIL ' | grep -qE -- "$want"; then
                        pass "self-test: the checks notice $name"
                else
                        fail "self-test: the checks did not notice $name (wanted /$want/):"
                        printf '%s\n' "$out" | grep '^FAIL ' | sed 's/^/    /'
                fi
        fi
        rm -rf "$dir"
}

if [ "$GROUP" = docker ]; then
        mutant "a runtime library left out" docker/Dockerfile '/^ *libjson-c5 \\$/d' \
                'runtime stage does not install: libjson-c5'
        mutant "a build package setup.sh lacks" docker/Dockerfile \
                's/^\( *\)libcmocka-dev \\$/\1libcmocka-dev libfoo-dev \\/' \
                'setup.sh does not list: libfoo-dev'
        mutant "an unprivileged worker" docker/compose.yaml \
                's/privileged: true/privileged: false/' 'must be privileged'
        mutant "a worker without the host's run directory" docker/compose.yaml \
                '\#^ *- /run/flyio-image-manager:/run/flyio-image-manager$#d' \
                'does not bind-mount the host.s /run/flyio-image-manager'
        mutant "migrate not waiting for a healthy postgres" docker/compose.yaml \
                's/condition: service_healthy$/condition: service_started/' \
                'depend on postgres with condition: service_healthy'
        mutant "a duplicated compose key" docker/compose.yaml \
                's/^  postgres:$/  postgres:\n    image: x\n  postgres:/' \
                "key 'postgres' appears twice"
        mutant "a misspelt setting in worker.env.example" docker/worker.env.example \
                's/^POOL_NAME=/POOL_NAM=/' 'unknown settings: POOL_NAM'
else
        mutant "a setting missing from the example" config/flyio-image-manager.conf.example \
                '/^LEASE_SECONDS=/d' 'LEASE_SECONDS is missing'
        mutant "a default that drifted" config/flyio-image-manager.conf.example \
                's/^DEVICE_SIZE=10G$/DEVICE_SIZE=20G/' 'DEVICE_SIZE=20G should be DEVICE_SIZE=10G'
        new_row='{"LOG_FORMAT", CONFIG_STRING, STR(log_level), "text", 0, 0, "x"},'
        mutant "a new setting in config.c" config/config.c \
                "s/{\"LOG_LEVEL\", /$new_row\\n        {\"LOG_LEVEL\", /" 'LOG_FORMAT is missing'
        mutant "a unit that does not run the worker" config/flyio-image-manager.service \
                's/ worker$//' 'does not run'
        mutant "a stop timeout below SHUTDOWN_TIMEOUT" config/flyio-image-manager.service \
                's/^TimeoutStopSec=.*/TimeoutStopSec=30/' 'TimeoutStopSec=30 is not above'
        if command -v systemd-analyze >/dev/null; then
                mutant "a misspelt unit key" config/flyio-image-manager.service \
                        's/^LockPersonality=yes/LockPersonalty=yes/' "Unknown key 'LockPersonalty'"
        fi
fi

finish
