#!/usr/bin/env bash
# The main job, end to end, on a fresh machine: install what is needed, build, start local
# PostgreSQL, S3Proxy and Kafka, build a real Debian root filesystem image (debootstrap,
# cached), upload it, enqueue it, and run the real worker on a real kernel thin pool: directly
# when this host's kernel has dm-thin, else inside a qemu VM. download -> unpack -> activate.
# Then show list-images, list-snapshots and /etc/os-release read from the activated snapshot.
#
# Run it twice: the second run's worker acknowledges the re-enqueued request as already
# complete, and process-image finds every stage done. Services and state stay up between runs;
# `scripts/demo.sh --clean` removes the demo's state (and stops the services it started).
#
# Environment:
#   FIM_DEMO_DIR      state: pool files, tarballs, worker log (default /var/tmp/fim-demo)
#   FIM_SERVICES_DIR  reuse the services of this directory (e.g. /tmp/fim-services) instead of
#                     starting the demo's own set in FIM_DEMO_DIR/services. The demo never
#                     stops services it did not start, not even with --clean.
#   FIM_DEMO_MIRROR   Debian mirror for debootstrap (default: the one apt uses, when
#                     debootstrap can use it; see scripts/demo-mirror.sh)
#   FIM_VM_DIRECT     1 = run on this host, 0 = boot the VM; default: 1 when dm-thin is present
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=demo-mirror.sh
. "$ROOT/scripts/demo-mirror.sh"

# Everything below needs root: apt-get, debootstrap, loop devices and device-mapper.
if [ "$(id -u)" -ne 0 ]; then
        echo "demo: must run as root (it installs packages, runs debootstrap and sets up a" \
                "device-mapper thin pool on loop files): sudo bash scripts/demo.sh $*" >&2
        exit 1
fi

STATE=${FIM_DEMO_DIR:-/var/tmp/fim-demo}
if [ -n "${FIM_SERVICES_DIR:-}" ] && [ "$FIM_SERVICES_DIR" != "$STATE/services" ]; then
        own_services=0
else
        own_services=1
        export FIM_SERVICES_DIR="$STATE/services"
fi
IMAGE_ID=debian-12-minbase
S3_KEY=images/debian-bookworm-minbase.tar
TARBALL="$ROOT/.cache/demo/debian-bookworm-minbase.tar"
DEMO_DB=fim_demo
# Names of the demo's own, so that it shares a running Kafka and PostgreSQL with nobody.
export KAFKA_TOPIC_PREFIX=fimdemo POOL_NAME=fimdemo HOST_ID=demo-host DEVICE_SIZE=4G
export LOCAL_DIR="$STATE/images" LOG_LEVEL=info

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# dm-thin on this host: the module is loaded (or built in and registered as a target), or
# can be loaded now; a stock kernel ships it as a module that nothing has loaded yet.
host_has_dm_thin() {
        [ -d /sys/module/dm_thin_pool ] && return 0
        dmsetup targets 2>/dev/null | grep -q '^thin-pool' && return 0
        modprobe dm_thin_pool 2>/dev/null || return 1
        [ -d /sys/module/dm_thin_pool ] || dmsetup targets 2>/dev/null | grep -q '^thin-pool'
}

if [ "${1:-}" = --clean ]; then
        BIN="$ROOT/build-demo/flyio-image-manager"
        if host_has_dm_thin && [ -x "$BIN" ] && dmsetup info "$POOL_NAME" >/dev/null 2>&1; then
                "$BIN" pool-setup --teardown --force --name "$POOL_NAME" --dir "$STATE/pool" || true
        fi
        if [ "$own_services" = 1 ]; then
                bash tests/infra/services.sh stop || true
        elif [ -f "$FIM_SERVICES_DIR/services.env" ]; then
                # shellcheck disable=SC1091
                source "$FIM_SERVICES_DIR/services.env"
                psql "$FIM_PG_ADMIN_URL" -qAtc "DROP DATABASE IF EXISTS $DEMO_DB WITH (FORCE)" || true
                bash tests/infra/kafka-topics.sh delete "$KAFKA_TOPIC_PREFIX" || true
                echo "services in $FIM_SERVICES_DIR are not the demo's own: left running"
        fi
        rm -rf "$STATE"
        echo "demo state removed ($STATE); the cached image stays in .cache/demo"
        exit 0
fi
[ "$#" -eq 0 ] || { echo "usage: scripts/demo.sh [--clean]" >&2; exit 2; }

# A failure part-way leaves services, state and perhaps a pool behind: say how to remove them.
on_exit() {
        local status=$?

        [ -z "${work:-}" ] || rm -rf "$work"
        [ "$status" -ne 0 ] || return 0
        {
                echo
                echo "demo failed (exit status $status). Its state is in $STATE (worker log: $STATE/worker.log)."
                echo "Fix the cause and run 'bash scripts/demo.sh' again: it resumes where it stopped."
                if [ "$own_services" = 1 ]; then
                        echo "Or remove everything with: bash scripts/demo.sh --clean"
                else
                        echo "Or remove the demo's state, database and topics (services in $FIM_SERVICES_DIR stay up) with:"
                        echo "  FIM_SERVICES_DIR=$FIM_SERVICES_DIR bash scripts/demo.sh --clean"
                fi
        } >&2
}
trap on_exit EXIT

say "installing packages (scripts/setup.sh)"
bash scripts/setup.sh

say "building"
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-demo -j"$(nproc)" --target flyio-image-manager >/dev/null
BIN="$ROOT/build-demo/flyio-image-manager"
"$BIN" --version

mkdir -p "$STATE/images" "$STATE/pool"
chmod 755 "$STATE"
if [ "$own_services" = 1 ]; then
        say "starting PostgreSQL, S3Proxy and Kafka on loopback"
        bash tests/infra/services.sh start
else
        say "using the running services of $FIM_SERVICES_DIR"
        bash tests/infra/services.sh status
        # kafka-topics.sh runs on the broker's jars from this checkout's cache.
        bash tests/infra/services.sh fetch kafka
fi
# shellcheck disable=SC1091
source "$FIM_SERVICES_DIR/services.env"
# The services' own settings, then the demo's names again (services.env sets a few of them).
export KAFKA_TOPIC_PREFIX=fimdemo POOL_NAME=fimdemo HOST_ID=demo-host DEVICE_SIZE=4G
export LOCAL_DIR="$STATE/images" LOG_LEVEL=info
export DATABASE_URL="${FIM_PG_ADMIN_URL%/*}/$DEMO_DB"
if [ "$(psql "$FIM_PG_ADMIN_URL" -qAtc "SELECT count(*) FROM pg_database WHERE datname = '$DEMO_DB'")" = 0 ]; then
        psql "$FIM_PG_ADMIN_URL" -qAtc "CREATE DATABASE $DEMO_DB"
fi

say "building a Debian bookworm root filesystem image"
if [ ! -s "$TARBALL" ]; then
        mirror=${FIM_DEMO_MIRROR:-$(demo_debian_mirror)}
        work=$(mktemp -d /var/tmp/fim-demo-rootfs.XXXXXX)
        echo "debootstrap --variant=minbase bookworm from $mirror (about 2 minutes, once)"
        debootstrap --variant=minbase bookworm "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
                { tail -20 "$work/debootstrap.log"; echo "debootstrap failed" >&2; exit 1; }
        mkdir -p "$(dirname "$TARBALL")"
        tar --numeric-owner --xattrs -C "$work/root" -cf "$TARBALL.tmp" .
        mv "$TARBALL.tmp" "$TARBALL"
        rm -rf "$work"
        work=
fi
ls -l "$TARBALL"

say "uploading it to s3://$S3_BUCKET/$S3_KEY"
bash tests/infra/s3put.sh "$S3_BUCKET" "$S3_KEY" "$TARBALL"

say "migrating the database ($DEMO_DB), creating topics, checking the system"
"$BIN" migrate
bash tests/infra/kafka-topics.sh create "$KAFKA_TOPIC_PREFIX" 3
"$BIN" verify-system ||
        echo "(the devicemapper check fails here: the pool '$POOL_NAME' is set up next, by the part that runs on a kernel with dm-thin)"

say "enqueueing the image"
"$BIN" enqueue --s3-key "$S3_KEY" --image-id "$IMAGE_ID"

if [ -z "${FIM_VM_DIRECT:-}" ]; then
        if host_has_dm_thin; then FIM_VM_DIRECT=1; else FIM_VM_DIRECT=0; fi
fi
export FIM_VM_DIRECT
pg_port=${DATABASE_URL##*:}
pg_port=${pg_port%%/*}
s3_port=${S3_ENDPOINT##*:}
kafka_guest=${FIM_KAFKA_GUEST_BROKERS:-10.0.2.100:19094}
kafka_guest_port=${kafka_guest##*:}
if [ "$FIM_VM_DIRECT" = 1 ]; then
        say "running the worker on a real thin pool, on this host (it has dm-thin)"
        guest=127.0.0.1
        kafka_guest=$KAFKA_BROKERS
else
        say "running the worker on a real thin pool, in a qemu VM (this host's kernel has no dm-thin)"
        guest=10.0.2.100
fi
tests/vm/run.sh -t 2400 -m 3072 -s "$STATE" -p "$pg_port" -p "$s3_port" -p "$kafka_guest_port" \
        -e DATABASE_URL="postgresql://postgres@$guest:$pg_port/$DEMO_DB" \
        -e S3_ENDPOINT="http://$guest:$s3_port" -e S3_FORCE_PATH_STYLE=true \
        -e AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" -e AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
        -e AWS_REGION="$AWS_REGION" -e S3_BUCKET="$S3_BUCKET" -e KAFKA_BROKERS="$kafka_guest" \
        -e KAFKA_TOPIC_PREFIX="$KAFKA_TOPIC_PREFIX" -e LOCAL_DIR="$LOCAL_DIR" \
        -e POOL_NAME="$POOL_NAME" -e HOST_ID="$HOST_ID" -e DEVICE_SIZE="$DEVICE_SIZE" \
        -e FIM_DEMO_DIR="$STATE" -e METRICS_ADDR=127.0.0.1:9464 -- \
        bash scripts/demo-guest.sh "$BIN" "$IMAGE_ID" "$S3_KEY"

say "done"
if [ "$own_services" = 1 ]; then
        clean="bash scripts/demo.sh --clean"
else
        clean="FIM_SERVICES_DIR=$FIM_SERVICES_DIR bash scripts/demo.sh --clean"
fi
cat <<MSG
Run 'bash scripts/demo.sh' again: the worker acknowledges the request as already complete.
State: $STATE (pool files, tarballs, worker log); services keep running.
Clean up with: $clean
MSG
