#!/usr/bin/env bash
# Proof that the VM harness works, in ONE VM boot (about 5-10 s under TCG):
#   dm-thin pool over loop devices, create_thin, mkfs.ext4, mount, write, snapshot with
#   suspend/resume, mount the snapshot, read back, remove, thin_check (selftest-guest.sh);
#   the guest's exit status reaches us (the guest half exits 42 on success);
#   stdout is byte-exact (a blob with every byte value and random data is echoed back);
#   a -p forward reaches a python3 http.server on host loopback, and nothing else is reachable.
# Plus, without a VM, the FIM_VM_DIRECT=1 path.
#
# Usage: tests/vm/selftest.sh [--full]
#   --full  two more boots: the -t timeout gives 125, and -w gives a throwaway writable root
#
# Ends with "N passed, N failed"; exit status 0 only if nothing failed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
readonly here repo run="$here/run.sh"

tmp=
http_pid=
passed=0
failed=0

pass() {
	echo "ok - $*"
	passed=$((passed + 1))
}

fail() {
	echo "not ok - $*"
	failed=$((failed + 1))
}

cleanup() {
	[ -z "$http_pid" ] || kill "$http_pid" 2>/dev/null || true
	[ -z "$tmp" ] || rm -rf "$tmp"
}

now() {
	echo "$EPOCHREALTIME"
}

since() {
	awk -v t0="$1" -v t1="$EPOCHREALTIME" 'BEGIN { printf "%.2f", t1 - t0 }'
}

# Every byte value (the raw serial line must pass \0, \r, \n, ^C, ^D, XON/XOFF, ESC
# untouched) followed by random data.
make_blob() {
	python3 - "$1" <<-'EOF'
		import os, sys
		with open(sys.argv[1], "wb") as f:
		    f.write(bytes(range(256)) * 256)
		    f.write(os.urandom(512 * 1024))
		    f.write(b"no trailing newline\r")
	EOF
}

# Start a loopback-only HTTP server on a port the kernel picks, and print that port.
start_http() {
	local dir="$1" log="$2" port

	python3 -u -m http.server 0 --bind 127.0.0.1 --directory "$dir" >"$log" 2>&1 &
	http_pid=$!
	for _ in $(seq 100); do
		port="$(sed -n 's/^Serving HTTP on 127\.0\.0\.1 port \([0-9]*\).*/\1/p' "$log")"
		if [ -n "$port" ]; then
			echo "$port"
			return
		fi
		sleep 0.05
	done
	echo "selftest: http.server did not start" >&2
	cat "$log" >&2
	return 1
}

# Split the VM's output into the guest's check lines and the blob after the marker; print the
# lines, and report whether the blob equals the file we sent.
check_output() {
	local out="$1" blob="$2"

	python3 - "$out" "$blob" <<-'EOF'
		import re, sys
		out = open(sys.argv[1], "rb").read()
		blob = open(sys.argv[2], "rb").read()
		m = re.search(rb"==fimvm-blob (\d+)==\n", out)
		text = out[:m.start()] if m else out
		sys.stdout.write(text.decode("utf-8", "replace"))
		if not m:
		    print("BLOB missing")
		elif int(m.group(1)) == len(blob) and out[m.end():] == blob:
		    print("BLOB exact %d" % len(blob))
		else:
		    print("BLOB differs: got %d bytes after the marker, want %d"
		          % (len(out) - m.end(), len(blob)))
	EOF
}

# The one VM boot that proves the harness.
vm_suite() {
	local port t0 rc=0 line

	make_blob "$tmp/blob.bin"
	port="$(start_http "$tmp" "$tmp/http.log")"

	t0=$(now)
	FIM_VM_TIMES=1 "$run" -t 300 -p "$port" -- \
		bash tests/vm/selftest-guest.sh "$tmp/blob.bin" "$port" >"$tmp/out" 2>"$tmp/err" ||
		rc=$?
	vm_wall="$(since "$t0")"

	while IFS= read -r line; do
		case "$line" in
		"ok - "*) pass "guest: ${line#ok - }" ;;
		"not ok - "*) fail "guest: ${line#not ok - }" ;;
		"BLOB exact "*) pass "output byte-exact (${line#BLOB exact } bytes over ttyS1)" ;;
		BLOB*) fail "output: ${line#BLOB }" ;;
		*) echo "# $line" ;;
		esac
	done < <(check_output "$tmp/out" "$tmp/blob.bin")

	if [ "$rc" -eq 42 ]; then
		pass "exit status propagates (guest exited 42, run.sh exited 42)"
	else
		fail "exit status: want 42, run.sh exited $rc"
		sed 's/^/# stderr: /' "$tmp/err"
	fi
	if grep -q '"GET /blob.bin HTTP/1.1" 200' "$tmp/http.log"; then
		pass "-p $port: host http.server on 127.0.0.1 served the guest"
	else
		fail "-p $port: host http.server saw no request"
	fi
	guest_times="$(sed -n 's/^run.sh: times: //p' "$tmp/err")"
}

# FIM_VM_DIRECT=1 keeps the contract without a VM: -e, cwd, exit status, timeout.
direct_suite() {
	local rc=0 out

	# shellcheck disable=SC2016 # expanded by the inner sh
	out="$(FIM_VM_DIRECT=1 "$run" -e FIMVM_X='a b' -- sh -c 'echo "$FIMVM_X|$(pwd)"; exit 3')" ||
		rc=$?
	if [ "$rc" -eq 3 ] && [ "$out" = "a b|$repo" ]; then
		pass "FIM_VM_DIRECT=1: env, cwd and exit status without a VM"
	else
		fail "FIM_VM_DIRECT=1: rc $rc, output '$out'"
	fi
}

full_suite() {
	local rc t0 wall out

	rc=0
	t0=$(now)
	"$run" -t 3 -- sleep 600 >/dev/null 2>"$tmp/err.timeout" || rc=$?
	wall="$(since "$t0")"
	if [ "$rc" -eq 125 ] && grep -q 'timed out' "$tmp/err.timeout"; then
		pass "-t 3 on a hanging command: 125 after ${wall}s"
	else
		fail "-t 3: want 125, got $rc after ${wall}s"
	fi

	rc=0
	out="$("$run" -w -- sh -c 'echo w >/etc/.fimvm-selftest && cat /etc/.fimvm-selftest')" || rc=$?
	if [ "$rc" -eq 0 ] && [ "$out" = w ] && [ ! -e /etc/.fimvm-selftest ]; then
		pass "-w: writable root in the guest, host untouched"
	else
		fail "-w: rc $rc, output '$out'"
	fi
}

main() {
	local t0 prep_wall

	cd "$repo"
	trap cleanup EXIT

	t0=$(now)
	"$here/prepare.sh"
	prep_wall="$(since "$t0")"
	pass "prepare.sh (${prep_wall}s)"

	# Not under /tmp: the guest sees the host's / but a fresh /tmp of its own.
	mkdir -p "$repo/.cache/vm"
	tmp="$(mktemp -d "$repo/.cache/vm/selftest.XXXXXX")"

	vm_suite
	direct_suite
	[ "${1:-}" != --full ] || full_suite

	echo "# timings: prepare ${prep_wall}s; dm-thin suite VM run ${vm_wall}s wall (${guest_times:-no guest times})"
	echo "$passed passed, $failed failed"
	[ "$failed" -eq 0 ]
}

main "$@"
