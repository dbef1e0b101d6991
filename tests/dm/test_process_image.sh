#!/usr/bin/env bash
# process-image end to end on a real thin pool (run inside the test VM by tests/dm/run_in_vm.sh,
# label "dm"), downloading from the real S3Proxy and recording in the real PostgreSQL on the
# host: a realistic image through all three stages, the repeat reported as already done,
# --json output, a missing object and a hostile tarball failing with the stage and the reason,
# the pool unchanged by the hostile tarball, and gc.
#
# Usage: test_process_image.sh path/to/flyio-image-manager
set -uo pipefail

BIN=${1:?usage: test_process_image.sh BIN}
for v in FIM_PG_ADMIN_URL S3_ENDPOINT AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY S3_BUCKET; do
        [ -n "${!v:-}" ] || { echo "FAIL: $v is not set (run through tests/dm/run_in_vm.sh)"; exit 1; }
done

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "PASS $1"; }
bad() { failed=$((failed + 1)); echo "FAIL $1"; [ -z "${2:-}" ] || printf '%s\n' "$2" | sed 's/^/    /'; }
check() { local name=$1; shift; if "$@"; then ok "$name"; else bad "$name"; fi; }

W=$(mktemp -d /tmp/fim-pi.XXXXXX)
DB="fim_pi_$$_$RANDOM"
export DATABASE_URL="${FIM_PG_ADMIN_URL%/*}/$DB"
export LOCAL_DIR=$W/images POOL_NAME=fimpipool HOST_ID=pi-host DEVICE_SIZE=256M
export MAX_ATTEMPTS=2 RETRY_BASE_MS=50 RETRY_MAX_MS=100 LOG_LEVEL=warning
KEY_PREFIX="pi-$$-$RANDOM"
mkdir -p "$LOCAL_DIR"

cleanup() {
        "$BIN" pool-setup --teardown --name "$POOL_NAME" --dir "$W/pool" --force >/dev/null 2>&1
        psql "$FIM_PG_ADMIN_URL" -qAtc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1
        rm -rf "$W"
}
trap cleanup EXIT

s3put() {
        curl -sf --aws-sigv4 "aws:amz:${AWS_REGION:-us-east-1}:s3" \
                -u "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
                -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' -T "$2" "$S3_ENDPOINT/$S3_BUCKET/$1"
}

psql "$FIM_PG_ADMIN_URL" -qAtc "CREATE DATABASE $DB" >/dev/null || exit 1
"$BIN" migrate >/dev/null || exit 1
"$BIN" pool-setup --name "$POOL_NAME" --dir "$W/pool" --data-size 1G >/dev/null || exit 1

# A small realistic root tree, and a hostile one that writes through a planted symlink.
mkdir -p "$W/src/etc" "$W/src/usr/bin" "$W/src/bin"
printf 'PRETTY_NAME="Process Image Test"\nID=pitest\n' >"$W/src/etc/os-release"
cp /bin/true "$W/src/usr/bin/passwd" && chmod 4755 "$W/src/usr/bin/passwd"
ln -s /usr/bin/passwd "$W/src/bin/passwd"
tar --numeric-owner -C "$W/src" -cf "$W/good.tar" .
python3 - "$W/evil.tar" <<'PY'
import io, sys, tarfile
with tarfile.open(sys.argv[1], "w") as t:
    i = tarfile.TarInfo("escape"); i.type = tarfile.SYMTYPE; i.linkname = "/etc"; t.addfile(i)
    d = b"root::0:0::/:/bin/sh\n"
    i = tarfile.TarInfo("escape/passwd"); i.size = len(d); t.addfile(i, io.BytesIO(d))
PY
s3put "$KEY_PREFIX/good.tar" "$W/good.tar" || { echo "FAIL upload"; exit 1; }
s3put "$KEY_PREFIX/evil.tar" "$W/evil.tar" || { echo "FAIL upload"; exit 1; }

# 1. The whole pipeline.
out=$("$BIN" process-image --s3-key "$KEY_PREFIX/good.tar" --image-id pi-good 2>&1); rc=$?
check "process-image succeeds" test "$rc" -eq 0
if grep -q '^download: done' <<<"$out" && grep -q '^unpack: done' <<<"$out" &&
        grep -q '^activate: done' <<<"$out" &&
        grep -q 'device_path *\/dev\/mapper\/snapshot-pi-good' <<<"$out"; then
        ok "each stage's response is printed"
else
        bad "each stage's response is printed" "$out"
fi
check "snapshot device exists" test -b /dev/mapper/snapshot-pi-good
mkdir -p "$W/mnt"
if mount -o ro /dev/mapper/snapshot-pi-good "$W/mnt"; then
        check "snapshot holds the image" grep -q 'Process Image Test' "$W/mnt/etc/os-release"
        check "setuid kept" test "$(stat -c %a "$W/mnt/usr/bin/passwd")" = 4755
        check "absolute symlink kept" test "$(readlink "$W/mnt/bin/passwd")" = /usr/bin/passwd
        umount "$W/mnt"
else
        bad "mount the snapshot"
fi

# 2. Again: every stage already done, and the same runs.
runs_before=$(psql "$DATABASE_URL" -qAtc "SELECT count(*) FROM fsm_runs")
out=$("$BIN" process-image --s3-key "$KEY_PREFIX/good.tar" --image-id pi-good 2>&1); rc=$?
check "repeat succeeds" test "$rc" -eq 0
if [ "$(grep -c ': already done' <<<"$out")" = 3 ] && grep -q 'activated *false' <<<"$out"; then
        ok "repeat reports every stage already done"
else
        bad "repeat reports every stage already done" "$out"
fi
check "repeat starts no run" test "$(psql "$DATABASE_URL" -qAtc "SELECT count(*) FROM fsm_runs")" = "$runs_before"

# 3. --json
out=$("$BIN" process-image --s3-key "$KEY_PREFIX/good.tar" --image-id pi-good --json 2>/dev/null)
check "--json is one document" python3 -c '
import json, sys
d = json.loads(sys.argv[1])
assert d["ok"] is True
assert d["activate"]["response"]["snapshot_name"] == "snapshot-pi-good"
assert d["unpack"]["outcome"] == "already_complete" and d["unpack"]["response"]["unpacked"] is False
' "$out"

# 4. A missing object: the download stage fails, permanently, with S3's reason.
out=$("$BIN" process-image --s3-key "$KEY_PREFIX/missing.tar" --image-id pi-missing 2>&1); rc=$?
check "missing object exits 1" test "$rc" -eq 1
if grep -q "download of image 'pi-missing' failed (permanent" <<<"$out" && grep -q 'NoSuchKey' <<<"$out"; then
        ok "missing object names stage and S3 error"
else
        bad "missing object names stage and S3 error" "$out"
fi
check "missing object leaves no file" test -z "$(ls "$LOCAL_DIR" | grep pi-missing)"

# 5. A hostile tarball: unpack fails permanently, names the member, the pool is unchanged.
ids_before=$(psql "$DATABASE_URL" -qAtc "SELECT string_agg(device_id::text, ',' ORDER BY device_id) FROM thin_devices")
tid_before=$(dmsetup status "$POOL_NAME" | awk '{print $4}')
out=$("$BIN" process-image --s3-key "$KEY_PREFIX/evil.tar" --image-id pi-evil 2>&1); rc=$?
check "hostile tarball exits 1" test "$rc" -eq 1
if grep -q "unpack of image 'pi-evil' failed (permanent" <<<"$out" && grep -q "escape" <<<"$out"; then
        ok "hostile tarball names stage and member"
else
        bad "hostile tarball names stage and member" "$out"
fi
check "pool transaction id unchanged" test "$(dmsetup status "$POOL_NAME" | awk '{print $4}')" = "$tid_before"
check "thin id rows unchanged" test "$(psql "$DATABASE_URL" -qAtc "SELECT string_agg(device_id::text, ',' ORDER BY device_id) FROM thin_devices")" = "$ids_before"
out=$("$BIN" verify-system 2>&1)
check "pool and database agree" grep -Eq '^PASS +thin-ids' <<<"$out"
check "no stray thin device" test -z "$(dmsetup ls --target thin | grep -v -e snapshot-pi-good -e '^thin-' )"

# 6. Another pool and device size than the defaults, from the flags: the origin is made in
# that pool with that size, and the rows say so.
"$BIN" pool-setup --name "${POOL_NAME}2" --dir "$W/pool2" --data-size 512M >/dev/null ||
        bad "pool-setup of a second pool"
out=$("$BIN" process-image --s3-key "$KEY_PREFIX/good.tar" --image-id pi-other \
        --pool "${POOL_NAME}2" --device-size 128M 2>&1); rc=$?
check "process-image --pool --device-size succeeds" test "$rc" -eq 0
other_id=$(psql "$DATABASE_URL" -qAtc "SELECT device_id FROM thin_devices WHERE kind = 'origin' AND pool_name = '${POOL_NAME}2'")
if [ -n "$other_id" ] && [ -b "/dev/mapper/thin-$other_id" ]; then
        check "the origin has the requested size" \
                test "$(blockdev --getsize64 "/dev/mapper/thin-$other_id")" = $((128 << 20))
        pool2_dev=$(dmsetup info -c --noheadings -o major,minor "${POOL_NAME}2" | tr -d ' ')
        check "the origin lives in the requested pool" \
                grep -q " thin $pool2_dev $other_id\$" <<<" $(dmsetup table "thin-$other_id")"
else
        bad "an origin row and device in the second pool" "$out"
fi
check "the snapshot of the other image exists" test -b /dev/mapper/snapshot-pi-other
check "no row of that image in the default pool" test "$(psql "$DATABASE_URL" -qAtc \
        "SELECT count(*) FROM snapshots WHERE image_id = 'pi-other' AND pool_name <> '${POOL_NAME}2'")" = 0
out=$("$BIN" verify-system 2>&1)
check "verify-system checks the second pool too" grep -Eq "^PASS +thin-ids.*${POOL_NAME}2" <<<"$out"
out=$("$BIN" gc --image-id pi-other 2>&1); rc=$?
check "gc of the other image succeeds" test "$rc" -eq 0
check "gc left no rows in the second pool" test "$(psql "$DATABASE_URL" -qAtc \
        "SELECT count(*) FROM thin_devices WHERE pool_name = '${POOL_NAME}2'")" = 0
check "gc removed the other image's devices" \
        test ! -e /dev/mapper/snapshot-pi-other -a ! -e "/dev/mapper/thin-${other_id:-none}"
"$BIN" pool-setup --teardown --name "${POOL_NAME}2" --dir "$W/pool2" --force >/dev/null 2>&1

# 7. Usage errors.
"$BIN" process-image --image-id x >/dev/null 2>&1; check "missing --s3-key is a usage error" test $? -eq 2
"$BIN" process-image --s3-key k --image-id 'a/b' >/dev/null 2>&1; check "bad image id is a usage error" test $? -eq 2
"$BIN" process-image --s3-key k --image-id a --device-size 1000 >/dev/null 2>&1; check "bad device size is a usage error" test $? -eq 2

# 8. gc removes snapshot, origin and tarball.
out=$("$BIN" gc --image-id pi-good 2>&1); rc=$?
check "gc succeeds" test "$rc" -eq 0
check "gc removed the snapshot" test ! -e /dev/mapper/snapshot-pi-good
check "gc removed the tarball" test ! -e "$LOCAL_DIR/pi-good.tar"
check "gc left no thin ids" test "$(psql "$DATABASE_URL" -qAtc "SELECT count(*) FROM thin_devices")" = 0

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
