#!/usr/bin/env bash
# The part of scripts/demo.sh that needs device-mapper: runs inside the VM (or directly on a
# host with dm-thin). Sets up (or re-attaches) the demo's loop-backed thin pool, starts the
# real worker, waits until the worker has handled the enqueued request, shows the result and
# stops the worker.
#
# Usage: scripts/demo-guest.sh BIN IMAGE_ID S3_KEY   (settings come from the environment)
set -euo pipefail

BIN=$1
IMAGE_ID=$2
S3_KEY=$3
STATE=${FIM_DEMO_DIR:?}
WORKER_LOG="$STATE/worker.log"
METRICS_URL="http://${METRICS_ADDR:?}/metrics"
DEADLINE_S=${FIM_DEMO_DEADLINE:-1800}

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# fim_jobs_total for one stage and outcome, from the worker's /metrics (0 before it serves).
jobs_count() {
        { curl -fsS "$METRICS_URL" 2>/dev/null || true; } |
                awk -v m="fim_jobs_total{stage=\"$1\",outcome=\"$2\"}" '$1 == m { print $2; f = 1 } END { if (!f) print 0 }'
}

# Whether list-snapshots shows this image's snapshot active in the kernel. Parsed as JSON: the
# list is one line, so a pattern could pair one snapshot's name with another's state.
snapshot_active() {
        "$BIN" list-snapshots --json 2>/dev/null |
                jq -e --arg n "snapshot-$IMAGE_ID" 'any(.[]; .snapshot_name == $n and .kernel == "active")' \
                        >/dev/null 2>&1
}

# The first run of this image that failed or was aborted since we started, as one line.
failed_run() {
        psql "$DATABASE_URL" -qAtX -v ON_ERROR_STOP=1 -c \
                "SELECT fsm || ' run ' || run_id || ' ' || status || ' (' || coalesce(error_class, '?') || '): ' || coalesce(error, '')
                   FROM fsm_runs
                  WHERE host_id = '$HOST_ID' AND status IN ('failed', 'aborted')
                    AND updated_at >= '$since' AND request->>'image_id' = '$IMAGE_ID'
                  ORDER BY updated_at LIMIT 1"
}

fail() {
        echo "demo: $*" >&2
        echo "worker log tail ($WORKER_LOG):" >&2
        tail -30 "$WORKER_LOG" >&2
        exit 1
}

# The database's clock, so that a run from an earlier demo does not count as this one's.
since=$(psql "$DATABASE_URL" -qAtX -v ON_ERROR_STOP=1 -c "SELECT now()")

say "thin pool '$POOL_NAME' (loop files in $STATE/pool; re-attached when they exist)"
"$BIN" pool-setup --name "$POOL_NAME" --dir "$STATE/pool" --data-size 8G

say "starting the worker (log: $WORKER_LOG)"
echo "--- worker started $since ---" >>"$WORKER_LOG"
"$BIN" worker >>"$WORKER_LOG" 2>&1 &
worker=$!
trap 'kill -TERM $worker 2>/dev/null || true; wait $worker 2>/dev/null || true' EXIT

# Done when the worker has handled the download request enqueued for this run (completed it,
# or acknowledged it as already complete) and the snapshot is active in the kernel. The
# snapshot alone is not enough: on a second run the worker re-activates it at start-up, before
# it reads the request. A failed or aborted run ends the wait at once.
deadline=$((SECONDS + DEADLINE_S))
while :; do
        done_now=$(jobs_count download complete)
        already=$(jobs_count download already_complete)
        if [ "$((done_now + already))" -gt 0 ] && snapshot_active; then
                break
        fi
        kill -0 "$worker" 2>/dev/null || fail "the worker exited before the image was done"
        failed=$(failed_run) || fail "cannot read fsm_runs from DATABASE_URL"
        [ -z "$failed" ] || fail "a run failed: $failed (see: $BIN status --run-id <run id>)"
        [ "$SECONDS" -le "$deadline" ] || fail "the image was not done after $DEADLINE_S s"
        sleep 2
done
if [ "$already" -gt 0 ]; then
        say "the worker acknowledged the re-enqueued download request as already complete: nothing to redo"
else
        say "the worker ran download -> unpack -> activate"
fi
echo "fim_jobs_total: download complete=$(jobs_count download complete) already_complete=$(jobs_count download already_complete)," \
        "unpack complete=$(jobs_count unpack complete), activate complete=$(jobs_count activate complete)"

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
curl -s "$METRICS_URL" 2>/dev/null | grep -E '^fim_(jobs_total|downloaded_bytes_total|extracted_bytes_total)' | grep -v ' 0$' | head -12 || true

say "worker log (last lines)"
tail -8 "$WORKER_LOG"
