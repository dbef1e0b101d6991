#!/usr/bin/env bash
# The guest half of tests/e2e/run.sh: runs inside the VM (tests/vm/run.sh), where the kernel
# has dm-thin. Makes a loop-backed pool on guest /tmp, runs the real worker against the host's
# services, and checks cases 1-6 (see README.md), printing PASS/FAIL lines that run.sh counts.
#
# Settings come from the environment run.sh passes with -e: the worker's own (DATABASE_URL,
# S3_*, AWS_*, KAFKA_*, POOL_NAME, LOCAL_DIR, ...) and E2E_BIN, E2E_WORK (the host directory
# shared read-write: images.tsv in, logs out), E2E_PSQL, E2E_POOL_DIR.
#
# No `set -e`: a failed check prints FAIL and the run goes on to the next one.
set -uo pipefail

readonly BIN="$E2E_BIN" WORK="$E2E_WORK" PSQL="$E2E_PSQL"
readonly LOGS="$WORK/logs"
readonly SCRATCH="${LOCAL_DIR%/*}"
readonly METRICS="http://${METRICS_ADDR}/metrics"
readonly HOSTILE=e2e-hostile

worker=
worker_n=0
declare -A token sha

say() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; }

# check DESCRIPTION COMMAND...: PASS when COMMAND succeeds.
check() {
	local what="$1"

	shift
	if "$@"; then pass "$what"; else fail "$what"; fi
}

q() {
	"$PSQL" -X -q -At -v ON_ERROR_STOP=1 "$DATABASE_URL" -c "$1" 2>>"$LOGS/guest-commands.err"
}

# The product's CLI; its error output goes where case 7 looks for secrets.
fim() {
	"$BIN" "$@" 2>>"$LOGS/guest-commands.err"
}

worker_start() {
	worker_n=$((worker_n + 1))
	echo "starting worker #$worker_n ($*; log logs/worker-$worker_n.log)"
	env "$@" "$BIN" worker >>"$LOGS/worker-$worker_n.log" 2>&1 &
	worker=$!
}

worker_kill9() {
	kill -KILL "$worker" 2>/dev/null
	wait "$worker" 2>/dev/null
	echo "worker #$worker_n (pid $worker) killed with SIGKILL"
	worker=
}

worker_stop() {
	local rc=0

	[ -n "$worker" ] || return 0
	kill -TERM "$worker" 2>/dev/null
	wait "$worker" || rc=$?
	worker=
	return "$rc"
}
trap 'worker_stop; umount "$SCRATCH/mnt" 2>/dev/null' EXIT

# wait_until DESCRIPTION SECONDS INTERVAL COMMAND...: poll COMMAND until it succeeds. Gives up
# at the deadline, or at once when the worker has died.
wait_until() {
	local what="$1" deadline=$((SECONDS + $2)) interval="$3"

	shift 3
	while :; do
		"$@"
		case $? in
		0) return 0 ;;
		2) return 1 ;; # the condition says it can never become true
		esac
		if [ -n "$worker" ] && ! kill -0 "$worker" 2>/dev/null; then
			echo "the worker exited while waiting for: $what; its log ends:"
			tail -n 15 "$LOGS/worker-$worker_n.log"
			return 1
		fi
		if [ "$SECONDS" -ge "$deadline" ]; then
			echo "timed out waiting for: $what; worker log ends:"
			tail -n 15 "$LOGS/worker-$worker_n.log"
			return 1
		fi
		sleep "$interval"
	done
}

sql_list() {
	local out='' id

	for id in "$@"; do out+="${out:+,}'$id'"; done
	echo "$out"
}

# True when every image given has an active snapshot recorded; false (and says so) when a run
# of one of them failed, which no waiting will fix.
images_active() {
	local ids bad

	ids="$(sql_list "$@")"
	bad="$(q "SELECT string_agg(fsm || ' ' || (request ->> 'image_id') || ': ' || coalesce(error, ''), '; ')
		FROM fsm_runs WHERE status IN ('failed', 'aborted') AND request ->> 'image_id' IN ($ids)")"
	if [ -n "$bad" ]; then
		echo "a run failed: $bad"
		return 2
	fi
	[ "$(q "SELECT count(*) FROM snapshots WHERE state = 'active' AND image_id IN ($ids)")" -eq "$#" ]
}

wait_images_active() {
	local timeout="$1"

	shift
	wait_until "active snapshots of $*" "$timeout" 1 images_active "$@"
}

enqueue() {
	local id

	for id in "$@"; do
		fim enqueue --s3-key "images/$id.tar" --image-id "$id" >>"$LOGS/guest-commands.out" ||
			fail "enqueue $id"
	done
}

# The thin ids the pool itself holds, from thin_dump of a metadata snapshot, sorted, one line.
pool_thin_ids() {
	local meta dev ids _

	meta="$(dmsetup table "$POOL_NAME" | awk '{ print $4 }')"
	dev="/dev/$(sed -n 's/^DEVNAME=//p' "/sys/dev/block/$meta/uevent")"
	for _ in 1 2 3 4 5; do
		# The worker takes a metadata snapshot too (reconciliation); only one can exist.
		if dmsetup message "$POOL_NAME" 0 reserve_metadata_snap 2>/dev/null; then
			ids="$(thin_dump -m --skip-mappings "$dev" | grep -o 'dev_id="[0-9]*"' |
				tr -dc '0-9\n' | sort -n | paste -sd, -)"
			dmsetup message "$POOL_NAME" 0 release_metadata_snap
			echo "$ids"
			return 0
		fi
		sleep 1
	done
	echo "cannot reserve a metadata snapshot of $POOL_NAME" >&2
	return 1
}

db_thin_ids() {
	q "SELECT string_agg(device_id::text, ',' ORDER BY device_id) FROM thin_devices
		WHERE pool_name = '$POOL_NAME'"
}

# metric NAME FILE [LABEL=VALUE]...: the sum of NAME's samples in a /metrics scrape that carry
# every label given (0 when there are none).
metric() {
	local name="$1" file="$2"

	shift 2
	awk -v name="$name" -v labels="$*" '
		index($0, name "{") == 1 || index($0, name " ") == 1 {
			n = split(labels, want, " ")
			for (i = 1; i <= n; i++) {
				split(want[i], kv, "=")
				if (index($0, kv[1] "=\"" kv[2] "\"") == 0)
					next
			}
			sum += $NF
		}
		END { printf "%d\n", sum }' "$file"
}

scrape() {
	curl -sf -m 10 "$METRICS" -o "$WORK/metrics-$1.txt"
}

# delta NAME BEFORE AFTER [LABEL=VALUE]...: how much NAME moved between two scrapes.
delta() {
	local name="$1" before="$2" after="$3"

	shift 3
	echo $(($(metric "$name" "$WORK/metrics-$after.txt" "$@") - $(metric "$name" "$WORK/metrics-$before.txt" "$@")))
}

# True while a run's transition_complete insert waits at a gate of run.sh (e2e_gates): the
# worker then sits inside the transaction that would record the transition, its work done.
gate_held() {
	[ "$(q "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
		AND wait_event = 'PgSleep' AND query ILIKE '%insert%fsm_events%'")" -gt 0 ]
}

# The bytes of regular file data in an image's tarball (images.tsv, column 6).
file_bytes() {
	awk -F'\t' -v id="$1" '$1 == id { print $6 }' "$WORK/images.tsv"
}

# Case 1 (and 4): mount the snapshot read-only and check the tree made from the tarball.
check_files() {
	local id="$1" dev="/dev/mapper/snapshot-$1" m="$SCRATCH/mnt" ok=1 small want

	mkdir -p "$m"
	if ! mount -o ro "$dev" "$m" 2>>"$LOGS/guest-commands.err"; then
		fail "files $id: cannot mount $dev read-only"
		return
	fi
	grep -qx "E2E_TOKEN=${token[$id]}" "$m/etc/os-release" ||
		{ ok=0; echo "  $id: /etc/os-release is not this image's: $(tr '\n' ' ' <"$m/etc/os-release")"; }
	[ "$(stat -c %a "$m/bin/su")" = 4755 ] ||
		{ ok=0; echo "  $id: /bin/su mode $(stat -c %a "$m/bin/su"), expected 4755 (setuid)"; }
	[ "$(readlink "$m/usr/bin/payload")" = /usr/lib/payload.bin ] ||
		{ ok=0; echo "  $id: /usr/bin/payload -> '$(readlink "$m/usr/bin/payload")'"; }
	if [ "$(stat -c %i "$m/usr/lib/payload.bin")" != "$(stat -c %i "$m/usr/lib/payload.hardlink")" ] ||
		[ "$(stat -c %h "$m/usr/lib/payload.bin")" != 2 ]; then
		ok=0
		echo "  $id: payload.hardlink is not a hardlink of payload.bin"
	fi
	[ "$(sha256sum "$m/usr/lib/payload.bin" | cut -c1-64)" = "${sha[$id]}" ] ||
		{ ok=0; echo "  $id: payload.bin content differs"; }
	[ "$(stat -c %a "$m/tmp")" = 1777 ] || { ok=0; echo "  $id: /tmp mode $(stat -c %a "$m/tmp")"; }
	[ "$(stat -c %u:%g "$m/bin/su")" = 0:0 ] || { ok=0; echo "  $id: /bin/su owner $(stat -c %u:%g "$m/bin/su")"; }
	small="$(find "$m/usr/share/doc" -type f | wc -l)"
	want="$(awk -F'\t' -v id="$id" '$1 == id { print $5 }' "$WORK/images.tsv")"
	[ -z "$want" ] || [ "$small" = "$want" ] || { ok=0; echo "  $id: $small doc files, expected $want"; }
	umount "$m"
	if [ "$ok" = 1 ]; then
		pass "files $id: os-release is its own (${token[$id]}), setuid, absolute symlink, hardlink, payload sha256, $small doc files"
	else
		fail "files $id: the snapshot's tree is not the tarball's"
	fi
}

setup() {
	local id tok s

	say "pool '$POOL_NAME' on loop files in $E2E_POOL_DIR"
	mkdir -p "$LOCAL_DIR" "$E2E_POOL_DIR"
	fim pool-setup --name "$POOL_NAME" --dir "$E2E_POOL_DIR" --data-size 2G >>"$LOGS/guest-commands.out" ||
		{ fail "pool-setup"; exit 1; }
	while IFS=$'\t' read -r id _ tok s _; do
		token[$id]="$tok"
		sha[$id]="$s"
	done <"$WORK/images.tsv"
	fim verify-system >"$WORK/verify-system-before.txt"
	check "verify-system passes before the worker starts (pool, PostgreSQL, Kafka, S3)" \
		test "$(grep -c '^FAIL' "$WORK/verify-system-before.txt")" -eq 0
	grep '^FAIL' "$WORK/verify-system-before.txt"
}

# Cases 1, 2 and 6: five images, two of them with the same tarball.
phase_images() {
	local images=(e2e-alpha e2e-bravo e2e-charlie e2e-twin-a e2e-twin-b) id a b sa sb
	local metrics_up=0 d

	say "cases 1, 2, 6: five images through worker #1"
	worker_start LOG_LEVEL=info
	if wait_until "/healthz at $METRICS_ADDR" 20 0.5 curl -sf -m 2 -o /dev/null "http://$METRICS_ADDR/healthz" &&
		scrape before; then
		metrics_up=1
		# /readyz: consuming and reaching PostgreSQL, soon after the partitions are assigned.
		if wait_until "/readyz" 30 0.5 curl -sf -m 2 -o /dev/null "http://$METRICS_ADDR/readyz"; then
			pass "metrics: /healthz and /readyz answer 200 while worker #1 consumes"
		else
			fail "metrics: /readyz does not answer 200 within 30 s of the start"
		fi
	fi
	enqueue "${images[@]}"
	if wait_images_active 300 "${images[@]}"; then
		pass "images: all ${#images[@]} enqueued images have an active snapshot"
	else
		fail "images: not every enqueued image reached an active snapshot"
	fi

	for id in e2e-alpha e2e-bravo e2e-charlie e2e-twin-a e2e-twin-b; do
		check_files "$id"
	done
	if [ "$(printf '%s\n' "${token[e2e-alpha]}" "${token[e2e-bravo]}" "${token[e2e-charlie]}" | sort -u | wc -l)" = 3 ]; then
		pass "images: the three distinct images carry three distinct os-release tokens"
	else
		fail "images: os-release tokens are not distinct"
	fi

	say "case 2: identical content, two image ids"
	a="$(q "SELECT device_id FROM unpacked_images WHERE image_id = 'e2e-twin-a'")"
	b="$(q "SELECT device_id FROM unpacked_images WHERE image_id = 'e2e-twin-b'")"
	if [ -n "$a" ] && [ "$a" = "$b" ]; then
		pass "dedup: e2e-twin-a and e2e-twin-b share origin device $a (unpacked_images)"
	else
		fail "dedup: origins differ: twin-a '$a', twin-b '$b'"
	fi
	a="$(q "SELECT response ->> 'device_id' FROM fsm_runs WHERE fsm = 'unpack' AND request ->> 'image_id' = 'e2e-twin-a'")"
	b="$(q "SELECT response ->> 'device_id' FROM fsm_runs WHERE fsm = 'unpack' AND request ->> 'image_id' = 'e2e-twin-b'")"
	check "dedup: both unpack responses name device_id '$a' = '$b'" test -n "$a" -a "$a" = "$b"
	d="$(q "SELECT count(*) FROM thin_devices WHERE kind = 'origin' AND checksum =
		(SELECT checksum FROM unpacked_images WHERE image_id = 'e2e-twin-a')")"
	check "dedup: one origin row for the twins' checksum (found $d)" test "$d" = 1
	sa="$(q "SELECT device_id FROM snapshots WHERE image_id = 'e2e-twin-a' AND state = 'active'")"
	sb="$(q "SELECT device_id FROM snapshots WHERE image_id = 'e2e-twin-b' AND state = 'active'")"
	check "dedup: distinct snapshots ($sa, $sb) of the shared origin" \
		test -n "$sa" -a -n "$sb" -a "$sa" != "$sb"

	say "case 6: metrics while worker #1 runs"
	if [ "$metrics_up" = 1 ] && scrape after-images; then
		for s in download unpack activate; do
			d=$(($(metric fim_jobs_total "$WORK/metrics-after-images.txt" stage=$s outcome=complete) -
				$(metric fim_jobs_total "$WORK/metrics-before.txt" stage=$s outcome=complete)))
			check "metrics: fim_jobs_total{stage=\"$s\",outcome=\"complete\"} moved by $d, expected ${#images[@]}" \
				test "$d" -eq "${#images[@]}"
		done
		d=$(($(metric fim_downloaded_bytes_total "$WORK/metrics-after-images.txt") -
			$(metric fim_downloaded_bytes_total "$WORK/metrics-before.txt")))
		s=0
		for id in "${images[@]}"; do
			s=$((s + $(q "SELECT size_bytes FROM images WHERE image_id = '$id'")))
		done
		check "metrics: fim_downloaded_bytes_total moved by $d, expected $s (the tarballs' sizes)" \
			test "$d" -eq "$s"
		check_metrics_more "${images[@]}"
	else
		fail "metrics: the worker serves no /metrics at METRICS_ADDR=$METRICS_ADDR"
	fi
}

# Case 6, more: extracted bytes, duration histograms and pool gauges against what happened.
check_metrics_more() {
	local id s d n want=0 extracted="" used_before

	# Which images extracted comes from the log; how many bytes, from the tarballs.
	for id in "$@"; do
		if grep -q "msg=\"image extracted\".* image_id=$id " "$LOGS/worker-$worker_n.log"; then
			extracted+=" $id"
			want=$((want + $(file_bytes "$id")))
		fi
	done
	d=$(delta fim_extracted_bytes_total before after-images)
	check "metrics: fim_extracted_bytes_total moved by $d, expected $want (file data of$extracted)" \
		test "$d" -eq "$want" -a "$want" -gt 0
	for s in download unpack activate; do
		d=$(delta fim_stage_duration_seconds_count before after-images stage=$s)
		n=$(delta fim_jobs_total before after-images stage=$s)
		check "metrics: fim_stage_duration_seconds_count{stage=\"$s\"} moved by $d, as many as its jobs ($n, at least $#)" \
			test "$d" -eq "$n" -a "$d" -ge "$#"
		d=$(delta "fim_stage_duration_seconds_bucket" before after-images stage=$s le=+Inf)
		check "metrics: the $s histogram's +Inf bucket moved with its count ($d)" test "$d" -eq "$n"
	done
	# The pool gauges are refreshed every 15 s: wait for the images' blocks to show.
	used_before=$(metric fim_pool_data_used_blocks "$WORK/metrics-before.txt" pool="$POOL_NAME")
	pool_grew() {
		scrape pool && [ "$(metric fim_pool_data_used_blocks "$WORK/metrics-pool.txt" pool="$POOL_NAME")" -gt "$used_before" ]
	}
	if wait_until "fim_pool_data_used_blocks to grow" 30 2 pool_grew; then
		pass "metrics: fim_pool_data_used_blocks{pool=\"$POOL_NAME\"} grew from $used_before to $(metric fim_pool_data_used_blocks "$WORK/metrics-pool.txt" pool="$POOL_NAME") blocks"
	else
		fail "metrics: fim_pool_data_used_blocks{pool=\"$POOL_NAME\"} did not grow from $used_before"
	fi
	d=$(metric fim_pool_data_total_blocks "$WORK/metrics-pool.txt" pool="$POOL_NAME")
	n=$(metric fim_pool_metadata_used_blocks "$WORK/metrics-pool.txt" pool="$POOL_NAME")
	check "metrics: the pool's data total ($d blocks) and metadata in use ($n blocks) are reported" \
		test "$d" -gt 0 -a "$n" -gt 0
	n=$(metric fim_inflight_jobs "$WORK/metrics-pool.txt")
	check "metrics: no job in flight once every image is active ($n)" test "$n" -eq 0
}

# Case 3: a hostile tarball ends in the DLQ (checked on the host) and leaves the pool as it was.
phase_hostile() {
	local ids_before ids_after db_before db_after dm_before dm_after st d

	say "case 3: a hostile tarball (escape -> /etc, then escape/passwd)"
	ids_before="$(pool_thin_ids)"
	db_before="$(q "SELECT string_agg(device_id || ':' || kind || ':' || state, ',' ORDER BY device_id) FROM thin_devices")"
	dm_before="$(dmsetup ls | sort | tr '\n' ' ')"
	[ -f "$WORK/metrics-after-images.txt" ] || scrape after-images
	enqueue "$HOSTILE"
	hostile_done() {
		[ -n "$(q "SELECT 1 FROM fsm_runs WHERE fsm = 'unpack' AND request ->> 'image_id' = '$HOSTILE'
			AND status IN ('aborted', 'failed')")" ]
	}
	if wait_until "the hostile unpack run to end" 180 1 hostile_done; then
		st="$(q "SELECT status || ' ' || error_class || ': ' || left(error, 160) FROM fsm_runs
			WHERE fsm = 'unpack' AND request ->> 'image_id' = '$HOSTILE'")"
		check "hostile: the unpack run aborted on a permanent error ($st)" \
			test "${st%%:*}" = "aborted permanent"
	else
		fail "hostile: the unpack run did not end"
	fi
	check "hostile: no activate run was started" \
		test "$(q "SELECT count(*) FROM fsm_runs WHERE fsm = 'activate' AND request ->> 'image_id' = '$HOSTILE'")" = 0
	check "hostile: no origin mapped, no snapshot recorded" test "$(q "SELECT
		(SELECT count(*) FROM unpacked_images WHERE image_id = '$HOSTILE') +
		(SELECT count(*) FROM snapshots WHERE image_id = '$HOSTILE')")" = 0
	ids_after="$(pool_thin_ids)"
	db_after="$(q "SELECT string_agg(device_id || ':' || kind || ':' || state, ',' ORDER BY device_id) FROM thin_devices")"
	dm_after="$(dmsetup ls | sort | tr '\n' ' ')"
	check "hostile: the pool's thin ids are unchanged (thin_dump: $ids_after)" \
		test -n "$ids_before" -a "$ids_before" = "$ids_after"
	check "hostile: thin_devices rows are unchanged" test "$db_before" = "$db_after"
	check "hostile: dmsetup ls is unchanged" test "$dm_before" = "$dm_after"
	if scrape after-hostile; then
		d=$(($(metric fim_dlq_messages_total "$WORK/metrics-after-hostile.txt" stage=unpack error_class=permanent) -
			$(metric fim_dlq_messages_total "$WORK/metrics-after-images.txt" stage=unpack error_class=permanent)))
		check "metrics: fim_dlq_messages_total{stage=\"unpack\",error_class=\"permanent\"} moved by $d, expected 1" \
			test "$d" -eq 1
		d=$(($(metric fim_jobs_total "$WORK/metrics-after-hostile.txt" stage=unpack outcome=failed) -
			$(metric fim_jobs_total "$WORK/metrics-after-images.txt" stage=unpack outcome=failed)))
		check "metrics: fim_jobs_total{stage=\"unpack\",outcome=\"failed\"} moved by $d, expected 1" \
			test "$d" -eq 1
	fi
}

# Case 4a: SIGKILL inside the unpack run's extract transition, after every file is written and
# before the transition is recorded (the gate of run.sh holds the worker there, whatever the
# machine's speed); a new worker takes the run over and must redo the extraction.
phase_kill_unpack() {
	local id=e2e-kill-unpack st ev

	say "case 4: SIGKILL of the worker during unpack (extract)"
	q "INSERT INTO e2e_gates VALUES ('extract', '$id')"
	enqueue "$id"
	if ! wait_until "the unpack run of $id to reach the gate after extract" 240 0.5 gate_held; then
		q "DELETE FROM e2e_gates"
		fail "kill-unpack: the run never finished extract"
		return
	fi
	st="$(q "SELECT status || ' ' || state FROM fsm_runs WHERE fsm = 'unpack' AND request ->> 'image_id' = '$id'")"
	ev="$(q "SELECT string_agg(e.kind, ',' ORDER BY e.id) FROM fsm_events e JOIN fsm_runs r USING (run_id)
		WHERE r.fsm = 'unpack' AND r.request ->> 'image_id' = '$id' AND e.transition = 'extract'")"
	echo "unpack run at the kill: status and last completed transition: $st; extract events: $ev"
	check "kill-unpack: the kill lands inside unpack, extract done but not recorded (run: $st; extract events: $ev)" \
		test "$st" = "running make_fs" -a "$ev" = transition_start
	worker_kill9
	q "DELETE FROM e2e_gates"
	worker_start LOG_LEVEL=debug
	if wait_images_active 240 "$id"; then
		pass "kill-unpack: worker #$worker_n completed $id"
	else
		fail "kill-unpack: $id did not complete after the restart"
	fi
}

# Case 4b: SIGKILL inside create_snapshot, after the create_snap message and before the
# transition is recorded (the gate of run.sh holds the worker there).
phase_kill_activate() {
	local id=e2e-kill-activate snap row in_pool

	say "case 4: SIGKILL of the worker during activate (create_snapshot)"
	q "INSERT INTO e2e_gates VALUES ('create_snapshot', '$id')"
	enqueue "$id"
	if ! wait_until "the activate run of $id to reach the gate" 240 0.5 gate_held; then
		q "DELETE FROM e2e_gates"
		fail "kill-activate: the run never finished create_snapshot"
		return
	fi
	row="$(q "SELECT t.device_id || ' ' || t.state FROM thin_devices t JOIN fsm_runs r USING (run_id)
		WHERE r.fsm = 'activate' AND r.request ->> 'image_id' = '$id'")"
	snap="${row%% *}"
	echo "snapshot intent at the kill: thin id and state: $row; pool ids: $(pool_thin_ids)"
	in_pool=0
	pool_thin_ids | tr , '\n' | grep -qx "$snap" && in_pool=1
	check "kill-activate: the kill comes after create_snap (thin id $snap 'creating' in PostgreSQL, present in the pool)" \
		test "${row#* }" = creating -a "$in_pool" = 1
	worker_kill9
	q "DELETE FROM e2e_gates"
	worker_start LOG_LEVEL=info
	if wait_images_active 240 "$id"; then
		pass "kill-activate: worker #$worker_n completed $id"
	else
		fail "kill-activate: $id did not complete after the restart"
	fi
	for id in e2e-kill-unpack e2e-kill-activate; do
		check_files "$id"
	done
}

# Case 4 (the outcome) and case 5.
phase_final() {
	local good=(e2e-alpha e2e-bravo e2e-charlie e2e-twin-a e2e-twin-b e2e-kill-unpack e2e-kill-activate)
	local ids s n bad pool db listed kernel

	say "case 4: every job completed exactly once, no thin id leaked"
	ids="$(sql_list "${good[@]}")"
	for s in download unpack activate; do
		bad="$(q "SELECT string_agg(i || ' (' || coalesce(n, 0) || ' runs, ' || coalesce(c, 0) || ' complete)', ', ')
			FROM unnest(ARRAY[$ids]) i LEFT JOIN (SELECT request ->> 'image_id' AS img, count(*) n,
				count(*) FILTER (WHERE status = 'complete') c FROM fsm_runs WHERE fsm = '$s' GROUP BY 1) r
			ON r.img = i WHERE coalesce(n, 0) <> 1 OR coalesce(c, 0) <> 1")"
		check "once: one $s run per image, complete, for all ${#good[@]} images${bad:+ (not: $bad)}" test -z "$bad"
	done
	n="$(q "SELECT count(*) FROM fsm_runs r WHERE status = 'complete' AND (SELECT count(*) FROM fsm_events e
		WHERE e.run_id = r.run_id AND e.kind = 'finish') <> 1")"
	check "once: every complete run has exactly one finish event ($n have not)" test "$n" = 0
	bad="$(q "SELECT string_agg(fsm || ' ' || (request ->> 'image_id') || ' attempt ' || attempt, ', ')
		FROM fsm_runs r WHERE (fsm = 'unpack' AND request ->> 'image_id' = 'e2e-kill-unpack'
			OR fsm = 'activate' AND request ->> 'image_id' = 'e2e-kill-activate')
		AND EXISTS (SELECT 1 FROM fsm_events e WHERE e.run_id = r.run_id AND e.kind = 'resume')")"
	echo "killed runs taken over: $bad"
	check "once: both killed runs were resumed by the next worker, not started again" \
		test "$(echo "$bad" | tr ',' '\n' | grep -c attempt)" = 2
	n="$(q "SELECT count(*) FROM outbox WHERE published_at IS NULL")"
	check "once: every outbox handoff was published ($n pending)" test "$n" = 0
	n="$(q "SELECT count(*) FROM outbox")"
	check "once: $n handoffs for 7 complete images and 1 hostile (download->unpack 8, unpack->activate 7)" \
		test "$n" = 15

	pool="$(pool_thin_ids)"
	db="$(db_thin_ids)"
	check "leaks: the pool's thin ids (thin_dump) are exactly PostgreSQL's: pool {$pool}, db {$db}" \
		test -n "$pool" -a "$pool" = "$db"
	n="$(q "SELECT count(*) FROM thin_devices WHERE state <> 'ready'")"
	check "leaks: no thin id left 'creating' or 'deleting' ($n)" test "$n" = 0
	bad="$(q "SELECT string_agg(device_id::text, ',') FROM thin_devices t WHERE NOT EXISTS
		(SELECT 1 FROM unpacked_images u WHERE u.device_id = t.device_id AND u.pool_name = t.pool_name)
		AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.device_id = t.device_id AND s.pool_name = t.pool_name)")"
	check "leaks: every thin id belongs to an unpacked image or a snapshot${bad:+ (orphans: $bad)}" test -z "$bad"
	n="$(q "SELECT count(*) FILTER (WHERE kind = 'origin') || ' ' || count(*) FILTER (WHERE kind = 'snapshot') FROM thin_devices")"
	check "leaks: 6 origins (the twins share one) and 7 snapshots; found $n" test "$n" = "6 7"
	fim verify-system >"$WORK/verify-system-after.txt"
	check "leaks: verify-system: $(grep thin-ids "$WORK/verify-system-after.txt" | tr -s ' ')" \
		grep -q '^PASS  thin-ids' "$WORK/verify-system-after.txt"

	say "case 5: list-snapshots --json against dmsetup ls"
	fim list-snapshots --json >"$WORK/list-snapshots.json"
	dmsetup ls --target thin | awk '{ print $1 }' | sort >"$WORK/dmsetup-ls.txt"
	listed="$(jq -r '.[] | select(.state == "active") | .snapshot_name' "$WORK/list-snapshots.json" | sort)"
	kernel="$(jq -r '.[] | select(.kernel != "active") | .snapshot_name + "=" + .kernel' "$WORK/list-snapshots.json")"
	check "list-snapshots: every listed snapshot is active and kernel=active${kernel:+ (not: $kernel)}" test -z "$kernel"
	check "list-snapshots: the 7 snapshots listed are exactly the snapshot devices in dmsetup ls" \
		test "$listed" = "$(grep -v '^thin-' "$WORK/dmsetup-ls.txt")" -a "$(echo "$listed" | wc -l)" = 7
	check "list-snapshots: each device_path is /dev/mapper/<snapshot_name> and exists" \
		test "$(jq -r '.[] | select(.device_path != "/dev/mapper/" + .snapshot_name) | .snapshot_name' \
			"$WORK/list-snapshots.json")" = "" -a "$(jq -r '.[].device_path' "$WORK/list-snapshots.json" |
			while read -r p; do [ -b "$p" ] || echo "$p"; done)" = ""
	check "list-snapshots: the origins in dmsetup ls are thin-<id> of the 6 unpacked origins" \
		test "$(grep '^thin-' "$WORK/dmsetup-ls.txt" | tr '\n' ' ')" = \
		"$(q "SELECT string_agg(DISTINCT 'thin-' || device_id, ' ') FROM unpacked_images" |
			tr ' ' '\n' | sort | tr '\n' ' ')"
}

# process-image on a terminal draws extraction progress (entries and MiB), which needs a pool,
# so it is checked here; tests/cli checks the download progress and the quiet pipe.
phase_progress() {
	local id=e2e-progress out

	say "process-image on a terminal: extraction progress"
	# script(1) gives the command a pseudo-terminal; -e returns its exit status.
	out="$(script -qefc "$(printf '%q ' "$BIN" process-image --s3-key "images/$id.tar" --image-id "$id")" \
		/dev/null 2>&1)"
	check "progress: process-image on a terminal completes ($(tr -d '\r' <<<"$out" | grep -c ': done') stages done)" \
		grep -q '^activate: done' <<<"$out"
	check "progress: extraction draws entries and MiB on the terminal" \
		grep -Eq $'\r  unpack: [1-9][0-9]* entries, [0-9]+ MiB' <<<"$out"
	tr '\r' '\n' <<<"$out" | grep -E '^  (download|unpack):' | tail -n 3
}

# Case 7, guest side: error paths that hold the secrets must not print them.
provoke_errors() {
	say "case 7: error paths that hold the secrets (output checked on the host)"
	fim show-config >>"$LOGS/guest-commands.out"
	DATABASE_URL="${DATABASE_URL%/*}/no_such_db" "$BIN" list-images \
		>>"$LOGS/guest-commands.out" 2>>"$LOGS/guest-commands.err"
	check "errors: list-images against a missing database fails with status 1" test "$?" = 1
	"$BIN" download --bucket "no-such-bucket-$$" --key nothing --output "$SCRATCH/nothing" \
		>>"$LOGS/guest-commands.out" 2>>"$LOGS/guest-commands.err"
	check "errors: download from a missing bucket fails with status 1" test "$?" = 1
	tail -n 2 "$LOGS/guest-commands.err" | cut -c1-200
}

main() {
	local rc

	setup
	phase_images
	phase_hostile
	phase_kill_unpack
	phase_kill_activate
	phase_final
	provoke_errors
	phase_progress
	say "stopping worker #$worker_n with SIGTERM"
	worker_stop
	rc=$?
	check "worker #$worker_n stopped cleanly on SIGTERM (status $rc)" test "$rc" = 0
}

main
