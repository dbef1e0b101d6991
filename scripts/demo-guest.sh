#!/usr/bin/env bash
# The part of scripts/demo.sh that needs device-mapper: runs inside the VM (or directly on a
# host with dm-thin). Sets up (or re-attaches) the demo's loop-backed thin pool, starts the
# real worker, waits for the image's snapshot, shows the result and stops the worker.
#
# Usage: scripts/demo-guest.sh BIN IMAGE_ID S3_KEY   (settings come from the environment)
set -euo pipefail

BIN=$1
IMAGE_ID=$2
S3_KEY=$3
STATE=${FIM_DEMO_DIR:?}
WORKER_LOG="$STATE/worker.log"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "thin pool '$POOL_NAME' (loop files in $STATE/pool; re-attached when they exist)"
"$BIN" pool-setup --name "$POOL_NAME" --dir "$STATE/pool" --data-size 8G

say "starting the worker (log: $WORKER_LOG)"
"$BIN" worker >>"$WORKER_LOG" 2>&1 &
worker=$!
trap 'kill -TERM $worker 2>/dev/null || true; wait $worker 2>/dev/null || true' EXIT

# Wait until the snapshot is recorded active and present in the kernel, or a run failed.
deadline=$((SECONDS + 1800))
while :; do
        if "$BIN" list-snapshots --json 2>/dev/null | grep -q "\"snapshot-$IMAGE_ID\".*\"kernel\":\"active\""; then
                break
        fi
        if ! kill -0 "$worker" 2>/dev/null; then
                echo "the worker exited; its log:" >&2
                tail -30 "$WORKER_LOG" >&2
                exit 1
        fi
        failed=$("$BIN" list-images --json --status failed 2>/dev/null | grep -c "\"$IMAGE_ID\"" || true)
        if [ "$failed" != 0 ] || [ $SECONDS -gt $deadline ]; then
                echo "the image did not make it; worker log tail:" >&2
                tail -30 "$WORKER_LOG" >&2
                exit 1
        fi
        sleep 2
done

say "list-images"
"$BIN" list-images
say "list-snapshots"
"$BIN" list-snapshots

say "/etc/os-release read from the activated snapshot /dev/mapper/snapshot-$IMAGE_ID"
mkdir -p /tmp/snapshot
mount -o ro "/dev/mapper/snapshot-$IMAGE_ID" /tmp/snapshot
cat /tmp/snapshot/etc/os-release
echo "($(find /tmp/snapshot -xdev | wc -l) entries; $(du -sh /tmp/snapshot | cut -f1) used)"
umount /tmp/snapshot

say "the same image again, in-process: every stage is already done"
"$BIN" process-image --s3-key "$S3_KEY" --image-id "$IMAGE_ID"

say "metrics (a few lines of /metrics)"
curl -s http://127.0.0.1:9464/metrics 2>/dev/null | grep -E '^fim_jobs_total|^fim_bytes' | head -12 || true

say "worker log (last lines)"
tail -8 "$WORKER_LOG"
