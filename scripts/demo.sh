#!/usr/bin/env bash
# The main job, end to end, on a fresh machine: install what is needed, build, start local
# PostgreSQL, S3Proxy and Kafka, build a real Debian root filesystem image (debootstrap,
# cached), upload it, enqueue it, and run the real worker on a real kernel thin pool (inside a
# qemu VM when this host's kernel has no device-mapper): download -> unpack -> activate. Then
# show list-images, list-snapshots and /etc/os-release read from the activated snapshot.
#
# Run it twice: the second run finds every stage done and says so. Services and state stay
# up between runs; `scripts/demo.sh --clean` stops the services and removes the state.
#
# Environment: FIM_DEMO_DIR (state, default /var/tmp/fim-demo), FIM_DEMO_MIRROR (Debian
# mirror for debootstrap, default the one apt uses), FIM_VM_DIRECT=1 on a host with dm-thin.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

STATE=${FIM_DEMO_DIR:-/var/tmp/fim-demo}
export FIM_SERVICES_DIR="$STATE/services"
IMAGE_ID=debian-12-minbase
S3_KEY=images/debian-bookworm-minbase.tar
TARBALL="$ROOT/.cache/demo/debian-bookworm-minbase.tar"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

if [ "${1:-}" = --clean ]; then
        bash tests/infra/services.sh stop || true
        rm -rf "$STATE"
        echo "demo state removed ($STATE); the cached image stays in .cache/demo"
        exit 0
fi
[ "$#" -eq 0 ] || { echo "usage: scripts/demo.sh [--clean]" >&2; exit 2; }

say "installing packages (scripts/setup.sh)"
bash scripts/setup.sh

say "building"
cmake -S . -B build-demo -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build-demo -j"$(nproc)" --target flyio-image-manager >/dev/null
BIN="$ROOT/build-demo/flyio-image-manager"
"$BIN" --version

say "starting PostgreSQL, S3Proxy and Kafka on loopback"
mkdir -p "$STATE/images" "$STATE/pool"
chmod 755 "$STATE"
bash tests/infra/services.sh start
# shellcheck disable=SC1091
source "$FIM_SERVICES_DIR/services.env"

say "building a Debian bookworm root filesystem image"
if [ ! -s "$TARBALL" ]; then
        mirror=${FIM_DEMO_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
        mirror=${mirror:-http://deb.debian.org/debian}
        work=$(mktemp -d /var/tmp/fim-demo-rootfs.XXXXXX)
        trap 'rm -rf "$work"' EXIT
        echo "debootstrap --variant=minbase bookworm from $mirror (about 2 minutes, once)"
        debootstrap --variant=minbase bookworm "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
                { tail -20 "$work/debootstrap.log"; echo "debootstrap failed" >&2; exit 1; }
        mkdir -p "$(dirname "$TARBALL")"
        tar --numeric-owner --xattrs -C "$work/root" -cf "$TARBALL.tmp" .
        mv "$TARBALL.tmp" "$TARBALL"
        rm -rf "$work"
        trap - EXIT
fi
ls -l "$TARBALL"

say "uploading it to s3://$S3_BUCKET/$S3_KEY"
bash tests/infra/s3put.sh "$S3_BUCKET" "$S3_KEY" "$TARBALL"

# The settings every command below shares (the worker in the VM gets the guest's view).
export LOCAL_DIR="$STATE/images" POOL_NAME=fimdemo HOST_ID=demo-host DEVICE_SIZE=4G
export KAFKA_TOPIC_PREFIX=images LOG_LEVEL=info

say "migrating the database and checking the system"
"$BIN" migrate
"$BIN" verify-system || echo "(a failing devicemapper check is expected on a host without dm-thin: the pipeline runs in the VM)"

say "creating topics and enqueueing the image"
bash tests/infra/kafka-topics.sh create "$KAFKA_TOPIC_PREFIX" 3
"$BIN" enqueue --s3-key "$S3_KEY" --image-id "$IMAGE_ID"

say "running the worker on a real thin pool"
pg_port=${DATABASE_URL##*:}
pg_port=${pg_port%%/*}
s3_port=${S3_ENDPOINT##*:}
kafka_guest=${FIM_KAFKA_GUEST_BROKERS:-10.0.2.100:19094}
kafka_guest_port=${kafka_guest##*:}
guest="10.0.2.100"
[ "${FIM_VM_DIRECT:-0}" != 1 ] || { guest=127.0.0.1; kafka_guest=$KAFKA_BROKERS; }
tests/vm/run.sh -t 2400 -m 3072 -s "$STATE" -p "$pg_port" -p "$s3_port" -p "$kafka_guest_port" \
        -e DATABASE_URL="postgresql://postgres@$guest:$pg_port/fim_test" \
        -e S3_ENDPOINT="http://$guest:$s3_port" -e S3_FORCE_PATH_STYLE=true \
        -e AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" -e AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
        -e AWS_REGION="$AWS_REGION" -e S3_BUCKET="$S3_BUCKET" -e KAFKA_BROKERS="$kafka_guest" \
        -e KAFKA_TOPIC_PREFIX="$KAFKA_TOPIC_PREFIX" -e LOCAL_DIR="$LOCAL_DIR" \
        -e POOL_NAME="$POOL_NAME" -e HOST_ID="$HOST_ID" -e DEVICE_SIZE="$DEVICE_SIZE" \
        -e FIM_DEMO_DIR="$STATE" -e METRICS_ADDR=127.0.0.1:9464 -- \
        bash scripts/demo-guest.sh "$BIN" "$IMAGE_ID" "$S3_KEY"

say "done"
cat <<MSG
Run 'bash scripts/demo.sh' again: every stage is found done and skipped.
State: $STATE (pool files, tarballs, worker log); services keep running.
Clean up with: bash scripts/demo.sh --clean
MSG
