#!/usr/bin/env bash
# End to end: the real `flyio-image-manager worker` inside one qemu VM boot (the only place
# with a thin pool), against PostgreSQL, Kafka and S3 on this host's loopback, reached through
# forwarded ports only. See tests/e2e/README.md for the cases.
#
# Usage: tests/e2e/run.sh [BUILD_DIR]     (default: build; relative to the repository root)
#
# Services: when the environment has what tests/infra/services.sh exports (DATABASE_URL,
# FIM_PG_ADMIN_URL, S3_ENDPOINT, AWS_*, KAFKA_BROKERS, FIM_KAFKA_GUEST_BROKERS), as under
# scripts/test.sh, those are used. Otherwise a set of our own is started on ports of its own
# (FIM_PG_PORT etc. override them) and stopped at the end.
#
# Everything the run makes is its own and removed at the end: a scratch database, topics
# under the prefix e2e<pid>, a bucket, the VM's pool (guest /tmp). FIM_E2E_KEEP=1 keeps the
# work directory (logs, tarballs) and the database for a look.
#
# Output: PASS/FAIL lines per check, then `N passed, N failed`; exit 1 when any check failed.
# Environment: FIM_E2E_TIMEOUT (seconds for the VM, default 900), FIM_VM_DIRECT=1 as for
# tests/vm/run.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
readonly here repo
readonly PSQL=/usr/lib/postgresql/15/bin/psql

build="${1:-build}"
case "$build" in
/*) ;;
*) build="$repo/$build" ;;
esac
bin="$build/flyio-image-manager"
if [ ! -x "$bin" ]; then
	echo "e2e: error: no $bin; build first (cmake --build $build)" >&2
	exit 2
fi
bin="$(cd "$(dirname "$bin")" && pwd -P)/flyio-image-manager"

passed=0
failed=0
own_services=
work=
db_name=
prefix="e2e$$"
bucket="fim-e2e-$$-$RANDOM"
# A password in DATABASE_URL: PostgreSQL here trusts loopback and ignores it, but the worker
# must never print it (case 7).
db_password="e2eSecretPw$RANDOM$RANDOM"

say() { printf '\n== %s\n' "$*"; }
pass() { passed=$((passed + 1)); echo "PASS: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL: $*"; }

admin_psql() {
	"$PSQL" -X -q -At -v ON_ERROR_STOP=1 "$FIM_PG_ADMIN_URL" "$@"
}

db_psql() {
	"$PSQL" -X -q -At -v ON_ERROR_STOP=1 "$db_url" "$@"
}

cleanup() {
	local rc=$?

	set +e
	if [ "${FIM_E2E_KEEP:-0}" = 1 ]; then
		echo "e2e: kept $work and database $db_name (FIM_E2E_KEEP=1)" >&2
	else
		if [ -n "$db_name" ]; then
			admin_psql -c "DROP DATABASE IF EXISTS $db_name WITH (FORCE)" >/dev/null 2>&1
		fi
		if [ -n "${KAFKA_BROKERS:-}" ]; then
			bash "$repo/tests/infra/kafka-topics.sh" delete "$prefix" >/dev/null 2>&1
		fi
		if [ -n "${S3_ENDPOINT:-}" ]; then
			s3_remove_bucket >/dev/null 2>&1
		fi
		[ -z "$work" ] || rm -rf "$work"
	fi
	if [ -n "$own_services" ]; then
		FIM_SERVICES_DIR="$own_services" bash "$repo/tests/infra/services.sh" stop >/dev/null 2>&1
		rm -f "$own_services.lock"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# Our own services when the caller gave none, on ports that do not collide with a
# scripts/test.sh or demo run next to us.
ensure_services() {
	local v missing=

	for v in DATABASE_URL FIM_PG_ADMIN_URL S3_ENDPOINT AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY \
		KAFKA_BROKERS FIM_KAFKA_GUEST_BROKERS; do
		[ -n "${!v:-}" ] || missing+=" $v"
	done
	if [ -z "$missing" ]; then
		echo "e2e: using the services in the environment ($KAFKA_BROKERS, $S3_ENDPOINT)"
		return 0
	fi
	own_services="/tmp/fim-services-e2e.$$"
	say "starting services of our own in $own_services (environment lacks:$missing)"
	FIM_SERVICES_DIR="$own_services" FIM_PG_PORT="${FIM_PG_PORT:-55470}" \
		FIM_S3_PORT="${FIM_S3_PORT:-19030}" FIM_KAFKA_PORT="${FIM_KAFKA_PORT:-19112}" \
		FIM_KAFKA_CONTROLLER_PORT="${FIM_KAFKA_CONTROLLER_PORT:-19113}" \
		FIM_KAFKA_GUEST_PORT="${FIM_KAFKA_GUEST_PORT:-19114}" \
		bash "$repo/tests/infra/services.sh" start
	# shellcheck disable=SC1091
	source "$own_services/services.env"
}

s3_remove_bucket() {
	# shellcheck source=../infra/s3common.sh source-path=SCRIPTDIR
	. "$repo/tests/infra/s3common.sh"
	local key

	while read -r key; do
		s3_curl -o /dev/null -X DELETE "$(s3_url "$bucket" "$key")"
	done < <(s3_curl "$(s3_url "$bucket")?list-type=2" | grep -o '<Key>[^<]*</Key>' |
		sed 's/<Key>\(.*\)<\/Key>/\1/')
	s3_curl -o /dev/null -X DELETE "$(s3_url "$bucket")"
}

# make_image DIR ID TOKEN PAYLOAD_KB SMALL_FILES: a small but realistic root tree, tarred with
# GNU tar: /etc/os-release naming the image, a setuid binary, an absolute symlink, a hardlink,
# a payload file and SMALL_FILES small files under /usr/share/doc. Prints the payload's SHA-256.
make_image() {
	local dir="$1" id="$2" token="$3" payload_kb="$4" small="$5" root

	root="$dir/$id.root"
	mkdir -p "$root"/{etc,bin,usr/bin,usr/lib,usr/share/doc,var/log,root,tmp}
	chmod 1777 "$root/tmp"
	chmod 700 "$root/root"
	cat >"$root/etc/os-release" <<EOF
PRETTY_NAME="fim e2e image $id"
NAME="fim-e2e"
ID=fim-e2e
VERSION_ID="$token"
E2E_IMAGE_ID=$id
E2E_TOKEN=$token
EOF
	echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
	head -c "$((payload_kb * 1024))" /dev/urandom >"$root/usr/lib/payload.bin"
	printf '#!/bin/sh\necho su %s\n' "$token" >"$root/bin/su"
	chmod 4755 "$root/bin/su"
	ln -s /usr/lib/payload.bin "$root/usr/bin/payload"
	ln "$root/usr/lib/payload.bin" "$root/usr/lib/payload.hardlink"
	seq 1 "$small" | while read -r i; do
		mkdir -p "$root/usr/share/doc/pkg$((i % 40))"
		printf 'package %s file %s of image %s\n' "$((i % 40))" "$i" "$id" \
			>"$root/usr/share/doc/pkg$((i % 40))/file$i.txt"
	done
	tar --numeric-owner --owner=0 --group=0 -C "$root" -cf "$dir/$id.tar" .
	sha256sum "$root/usr/lib/payload.bin" | cut -c1-64
	rm -rf "$root"
}

# Bytes of regular file data in the tarball $1.
tar_file_bytes() {
	python3 -c 'import sys, tarfile; print(sum(m.size for m in tarfile.open(sys.argv[1]) if m.isreg()))' "$1"
}

# The hostile tarball: a symlink `escape -> /etc`, then `escape/passwd` written through it.
make_hostile() {
	python3 - "$1" <<'EOF'
import io, sys, tarfile

with tarfile.open(sys.argv[1], "w", format=tarfile.GNU_FORMAT) as t:
    d = tarfile.TarInfo("etc")
    d.type, d.mode = tarfile.DIRTYPE, 0o755
    t.addfile(d)
    data = b'ID=hostile\n'
    f = tarfile.TarInfo("etc/os-release")
    f.size, f.mode = len(data), 0o644
    t.addfile(f, io.BytesIO(data))
    s = tarfile.TarInfo("escape")
    s.type, s.linkname, s.mode = tarfile.SYMTYPE, "/etc", 0o777
    t.addfile(s)
    data = b"pwned:x:0:0::/root:/bin/sh\n"
    f = tarfile.TarInfo("escape/passwd")
    f.size, f.mode = len(data), 0o644
    t.addfile(f, io.BytesIO(data))
EOF
}

# The port of a URL on 127.0.0.1 or localhost, into the global url_port.
split_local_url() {
	local re='^[a-z]+://([^@/]*@)?(127\.0\.0\.1|localhost):([0-9]+)(/.*)?$'

	[[ "$1" =~ $re ]] || { echo "e2e: error: '$1' is not on 127.0.0.1" >&2; exit 2; }
	url_port="${BASH_REMATCH[3]}"
}

prepare() {
	local id token sha n twin f

	ensure_services
	work="$(mktemp -d /tmp/fim-e2e.XXXXXX)"
	chmod 755 "$work"
	mkdir -p "$work/logs" "$work/images"

	split_local_url "$FIM_PG_ADMIN_URL"
	pg_port="$url_port"
	split_local_url "$S3_ENDPOINT"
	s3_port="$url_port"
	kafka_guest="$FIM_KAFKA_GUEST_BROKERS"
	guest_addr=10.0.2.100
	if [ "${FIM_VM_DIRECT:-0}" = 1 ]; then
		guest_addr=127.0.0.1
		kafka_guest="$KAFKA_BROKERS"
	fi

	say "scratch database, topics '$prefix.*', bucket '$bucket'"
	db_name="fim_e2e_$$"
	admin_psql -c "CREATE DATABASE $db_name" >/dev/null
	db_url="postgresql://postgres:$db_password@127.0.0.1:$pg_port/$db_name"
	guest_db_url="postgresql://postgres:$db_password@$guest_addr:$pg_port/$db_name"
	DATABASE_URL="$db_url" "$bin" migrate 2>>"$work/logs/host-commands.err"
	# A test-only gate (case 4): a run's transition_complete event for a gated
	# (transition, image) waits while the gate row exists. The worker then sits inside the
	# transaction that would record the transition, after the transition's work (e.g. the
	# create_snap message) is done: the one moment a crash is hardest to recover from.
	db_psql <<'SQL'
CREATE TABLE e2e_gates (transition text NOT NULL, image_id text NOT NULL);
CREATE FUNCTION e2e_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	IF NEW.kind = 'transition_complete' THEN
		WHILE EXISTS (SELECT 1 FROM e2e_gates g JOIN fsm_runs r
				ON r.request ->> 'image_id' = g.image_id
				WHERE r.run_id = NEW.run_id AND g.transition = NEW.transition) LOOP
			PERFORM pg_sleep(0.1);
		END LOOP;
	END IF;
	RETURN NEW;
END $$;
CREATE TRIGGER e2e_gate BEFORE INSERT ON fsm_events FOR EACH ROW EXECUTE FUNCTION e2e_gate();
SQL
	bash "$repo/tests/infra/kafka-topics.sh" create "$prefix" 3 >/dev/null
	bash "$repo/tests/infra/s3mb.sh" "$bucket" >/dev/null

	say "building and uploading the test images"
	# images.tsv, read by guest.sh: id, S3 key, os-release token, payload SHA-256, small files,
	# bytes of regular file data (what extraction writes: hardlinks and symlinks hold none).
	: >"$work/images.tsv"
	n=0
	while read -r id payload small; do
		[ "${id#\#}" = "$id" ] || continue
		n=$((n + 1))
		token="tok$n-$RANDOM$RANDOM"
		sha="$(make_image "$work/images" "$id" "$token" "$payload" "$small")"
		printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$id" "images/$id.tar" "$token" "$sha" "$small" \
			"$(tar_file_bytes "$work/images/$id.tar")" >>"$work/images.tsv"
	done <<'EOF'
# id payload-KiB small-files
e2e-alpha 1024 120
e2e-bravo 1536 80
e2e-charlie 512 200
e2e-twin-a 768 60
e2e-kill-unpack 6144 3000
e2e-kill-activate 1024 100
e2e-progress 2048 1500
EOF
	# The twin: another image id whose tarball is byte for byte e2e-twin-a's.
	cp "$work/images/e2e-twin-a.tar" "$work/images/e2e-twin-b.tar"
	twin="$(awk -F'\t' -v OFS='\t' '$1 == "e2e-twin-a" { $1 = "e2e-twin-b"; $2 = "images/e2e-twin-b.tar"; print }' \
		"$work/images.tsv")"
	printf '%s\n' "$twin" >>"$work/images.tsv"
	make_hostile "$work/images/e2e-hostile.tar"
	for f in "$work"/images/*.tar; do
		bash "$repo/tests/infra/s3put.sh" "$bucket" "images/$(basename "$f")" "$f"
	done
	stat -c '  %n %s bytes' "$work"/images/*.tar
}

run_guest() {
	local kv rc=0
	local -a env=(
		E2E_BIN="$bin" E2E_WORK="$work" E2E_PSQL="$PSQL"
		DATABASE_URL="$guest_db_url"
		S3_ENDPOINT="http://$guest_addr:$s3_port" S3_FORCE_PATH_STYLE=true
		AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"
		AWS_REGION="${AWS_REGION:-us-east-1}" S3_BUCKET="$bucket"
		KAFKA_BROKERS="$kafka_guest" KAFKA_TOPIC_PREFIX="$prefix"
		POOL_NAME="e2epool$$" HOST_ID=e2e-host DEVICE_SIZE=128M
		LOCAL_DIR="/tmp/fim-e2e-guest.$$/images" E2E_POOL_DIR="/tmp/fim-e2e-guest.$$/pool"
		# Quick takeover after a SIGKILL: a 5 s lease, and a dead consumer leaves the group
		# after 6 s instead of 45.
		LEASE_SECONDS=5 SHUTDOWN_TIMEOUT=20 RETRY_BASE_MS=200 RETRY_MAX_MS=2000
		FIM_KAFKA_CONSUMER_OPTIONS="session.timeout.ms=6000;heartbeat.interval.ms=500;max.poll.interval.ms=60000;auto.commit.interval.ms=200;topic.metadata.refresh.interval.ms=2000"
		METRICS_ADDR=127.0.0.1:9464
	)
	# 3 GiB: guest /tmp (half of it) holds LOCAL_DIR, which verify-system wants 1 GiB free in.
	local -a vm=(-t "${FIM_E2E_TIMEOUT:-900}" -m 3072 -s "$work" -p "$pg_port" -p "$s3_port"
		-p "${kafka_guest##*:}")

	for kv in "${env[@]}"; do
		vm+=(-e "$kv")
	done
	say "booting the VM: the real worker on a real thin pool"
	"$repo/tests/vm/run.sh" "${vm[@]}" -- bash "$here/guest.sh" | tee "$work/guest.out" || rc=$?
	passed=$((passed + $(grep -c '^PASS: ' "$work/guest.out" || true)))
	failed=$((failed + $(grep -c '^FAIL: ' "$work/guest.out" || true)))
	if [ "$rc" -ne 0 ] && ! grep -q '^FAIL: ' "$work/guest.out"; then
		fail "the VM run ended with status $rc and no FAIL line (timeout or crash?)"
	fi
}

# Case 3, host side: the hostile image's unpack request is in <prefix>.dlq with the headers
# an operator needs, and names the run that PostgreSQL recorded as aborted.
check_dlq() {
	local run_id json n

	say "case 3: the dead-letter topic, read from the host"
	run_id="$(db_psql -c "SELECT run_id FROM fsm_runs WHERE fsm = 'unpack'
		AND request ->> 'image_id' = 'e2e-hostile'")"
	json="$(kcat -C -b "$KAFKA_BROKERS" -t "$prefix.dlq" -e -J -q 2>>"$work/logs/host-commands.err" || true)"
	n="$(printf '%s' "$json" | grep -c . || true)"
	if [ "$n" -ne 1 ]; then
		fail "dlq: expected exactly one record in $prefix.dlq, found $n"
		return
	fi
	# kcat -J gives headers as a flat [name, value, name, value, ...] list.
	hdr() {
		printf '%s' "$json" | jq -r --arg h "$1" \
			'.headers as $x | [range(0; $x | length; 2) | select($x[.] == $h) | $x[. + 1]] | first // ""'
	}
	if [ "$(hdr stage)" = unpack ]; then
		pass "dlq: header stage=unpack"
	else
		fail "dlq: header stage is '$(hdr stage)', expected unpack"
	fi
	if [ "$(hdr error_class)" = permanent ]; then
		pass "dlq: header error_class=permanent"
	else
		fail "dlq: header error_class is '$(hdr error_class)', expected permanent"
	fi
	if [ -n "$run_id" ] && [ "$(hdr run_id)" = "$run_id" ]; then
		pass "dlq: header run_id=$run_id is the unpack run recorded in PostgreSQL"
	else
		fail "dlq: header run_id '$(hdr run_id)' is not the unpack run '$run_id'"
	fi
	if printf '%s' "$json" | jq -e '.payload | fromjson | .image_id == "e2e-hostile"' >/dev/null; then
		pass "dlq: the record keeps the original request (image_id e2e-hostile)"
	else
		fail "dlq: the record's payload is not the original unpack request"
	fi
	if [ -n "$(hdr error)" ] && [ -n "$(hdr attempts)" ] && [ -n "$(hdr host)" ]; then
		pass "dlq: headers error, attempts, host present (error: $(hdr error | cut -c1-100))"
	else
		fail "dlq: a header is missing among error, attempts, host"
	fi
}

# Case 7: no secret in any log or error output, from the guest or from here, nor in what the
# run left in PostgreSQL (every row of every table: run errors, event details, requests,
# responses, outbox) or in the dead-letter topic (headers and payloads).
check_secrets() {
	local secret name hits t

	say "case 7: secrets in logs, error output, the database and the DLQ"
	mkdir -p "$work/stored"
	for t in $(db_psql -c "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"); do
		db_psql -c "COPY $t TO STDOUT" >"$work/stored/db-$t.txt" 2>>"$work/logs/host-commands.err"
	done
	kcat -C -b "$KAFKA_BROKERS" -t "$prefix.dlq" -e -J -q >"$work/stored/dlq.json" \
		2>>"$work/logs/host-commands.err" || true
	echo "looking in: $(cd "$work/logs" && echo *), the guest's output, $(cd "$work/stored" && echo *)"
	if ! grep -q headers "$work/stored/dlq.json" || ! grep -q . "$work/stored/db-fsm_runs.txt" ||
		! grep -q . "$work/stored/db-fsm_events.txt"; then
		fail "secrets: the DLQ or the run tables came back empty: nothing to look in"
	fi
	for name in AWS_SECRET_ACCESS_KEY DB_PASSWORD; do
		if [ "$name" = DB_PASSWORD ]; then secret="$db_password"; else secret="$AWS_SECRET_ACCESS_KEY"; fi
		hits="$(grep -rlF -- "$secret" "$work/logs" "$work/guest.out" 2>/dev/null || true)"
		if [ -z "$hits" ]; then
			pass "secrets: $name appears in no log or error output ($(cat "$work"/logs/* | wc -l) lines)"
		else
			fail "secrets: $name appears in: $(echo "$hits" | tr '\n' ' ')"
		fi
		hits="$(grep -rlF -- "$secret" "$work/stored" 2>/dev/null || true)"
		if [ -z "$hits" ]; then
			pass "secrets: $name is stored nowhere: $(cat "$work"/stored/db-*.txt | wc -l) database rows, the DLQ records"
		else
			fail "secrets: $name is stored in: $(echo "$hits" | tr '\n' ' ')"
		fi
	done
}

# Case 8: every worker log line is one record of key=value fields that parses back (a value
# bare, or double-quoted with escapes), and every line about a run carries run_id, image_id,
# stage and attempt, including those written after it (dead letter sent, run interrupted).
check_log_lines() {
	local out

	say "case 8: worker log lines parse as key=value and carry the run context"
	if out="$(python3 - "$work"/logs/worker-*.log <<'PY'
import re, sys

FIELD = re.compile(r'([a-z_][a-z0-9_]*)=("(?:[^"\\\n]|\\.)*"|[^ "=\\\n]+)(?: |$)')
bad, lines, runs, after = [], 0, 0, 0
for path in sys.argv[1:]:
    for n, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
        line = line.rstrip("\n")
        lines += 1
        keys, pos = [], 0
        while pos < len(line):
            m = FIELD.match(line, pos)
            if not m:
                break
            keys.append(m.group(1))
            pos = m.end()
        where = "%s:%d: %s" % (path.rsplit("/", 1)[-1], n, line[:200])
        if pos != len(line) or keys[:4] != ["ts", "level", "thread", "msg"]:
            bad.append("does not parse: " + where)
            continue
        if len(set(keys)) != len(keys):
            bad.append("repeats a key: " + where)
            continue
        if "run_id" in keys or "image_id" in keys:
            runs += 1
            missing = [k for k in ("run_id", "image_id", "stage", "attempt") if k not in keys]
            if missing:
                bad.append("lacks %s: %s" % (",".join(missing), where))
            if re.search(r'msg="(message sent to the dead-letter topic|run interrupted, will retry)"', line):
                after += 1
print("%d lines, %d about a run, %d written after a run (DLQ, interrupted)" % (lines, runs, after))
if after == 0:
    bad.append("no dead-letter line with the run context: the hostile image should have written one")
for b in bad[:15]:
    print(b)
sys.exit(1 if bad else 0)
PY
)"; then
		pass "logs: every worker line parses; every run line has run_id, image_id, stage, attempt ($out)"
	else
		fail "logs: $out"
	fi
}

main() {
	local t0=$SECONDS

	prepare
	run_guest
	check_dlq
	check_secrets
	check_log_lines
	say "end to end: $((SECONDS - t0)) s"
	echo "$passed passed, $failed failed"
	[ "$failed" -eq 0 ]
}

main
