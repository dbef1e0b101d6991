#!/usr/bin/env bash
# Run one command inside a throwaway qemu VM that has device-mapper, thin-pool, loop and ext4.
#
# Usage: tests/vm/run.sh [-t SECONDS] [-m MB] [-p PORT]... [-e VAR=VALUE]... [-w] -- COMMAND [ARGS...]
#
#   -t SECONDS   host-side timeout for the whole VM run (default 600)
#   -m MB        guest memory (default 2048; guest /tmp is a tmpfs of half of it)
#   -p PORT      let the guest reach host 127.0.0.1:PORT at 10.0.2.100:PORT (repeatable); no
#                other address is reachable. The command gets FIM_VM_HOST_ADDR=10.0.2.100.
#   -e VAR=VALUE environment for the command (repeatable); nothing else is inherited
#   -w           writable root: an overlay over the host root, discarded at power-off
#   -s DIR       share the host directory DIR (absolute, existing) read-write at the same path,
#                so that state (e.g. a demo's pool files) survives from one VM boot to the next
#
# The guest sees the host's / read-only (over virtio-9p) and runs COMMAND chroot'ed into it, in
# the same working directory, with fresh tmpfs on /tmp, /var/tmp and /run, DM_DISABLE_UDEV=1,
# FIM_VM=1 and a standard PATH. COMMAND's stdout and stderr arrive together on our stdout.
# Exit status: COMMAND's, or 125 when the VM produced none (timeout, panic, harness failure);
# the guest console tail then goes to stderr.
#
# Environment: FIM_VM_DIRECT=1 runs COMMAND on this host instead (for hosts whose kernel has
# dm-thin; -w then writes to the real root). FIM_VM_DEBUG=1 traces the guest init and prints
# the console. FIM_VM_TIMES=1 prints boot and command timings to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="$(cd "$here/../.." && pwd)/.cache/vm"
readonly here cache
# The guest-side address of the forwarded ports. Inside qemu's 10.0.2.0/24 user network, but
# not the gateway (10.0.2.2), which restrict=on makes unreachable anyway.
readonly host_addr=10.0.2.100

timeout_s=600
mem_mb=2048
overlay=0
persist=
ports=()
envs=()
workdir=
child=
child_err=
interrupted=0

usage() {
	# The header comment above, whatever its length.
	awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
	exit 2
}

die() {
	echo "run.sh: error: $*" >&2
	exit 125
}

cleanup() {
	[ -z "$workdir" ] || rm -rf "$workdir"
}

# A signal while we wait: stop the child (qemu or the direct command, through timeout(1)),
# which makes the wait loop below finish; we then exit like a shell does on that signal.
on_signal() {
	interrupted=1
	[ -z "$child" ] || kill -TERM "$child" 2>/dev/null || true
}

parse_args() {
	local opt

	while getopts ":t:m:p:e:s:wh" opt; do
		case "$opt" in
		t) [[ "$OPTARG" =~ ^[1-9][0-9]*$ ]] || die "-t wants seconds, got '$OPTARG'"
		   timeout_s="$OPTARG" ;;
		m) [[ "$OPTARG" =~ ^[1-9][0-9]{2,5}$ ]] && [ "$OPTARG" -ge 256 ] ||
			die "-m wants megabytes >= 256, got '$OPTARG'"
		   mem_mb="$OPTARG" ;;
		p) [[ "$OPTARG" =~ ^[1-9][0-9]{0,4}$ ]] && [ "$OPTARG" -le 65535 ] ||
			die "-p wants a TCP port, got '$OPTARG'"
		   ports+=("$OPTARG") ;;
		e) [[ "$OPTARG" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
			die "-e wants VAR=VALUE, got '$OPTARG'"
		   envs+=("$OPTARG") ;;
		w) overlay=1 ;;
		s) [ -d "$OPTARG" ] && [ "${OPTARG#/}" != "$OPTARG" ] ||
			die "-s wants an existing absolute directory, got '$OPTARG'"
		   persist="$(cd "$OPTARG" && pwd -P)" ;;
		h) usage ;;
		:) die "-$OPTARG needs a value" ;;
		*) die "unknown option -$OPTARG (see -h)" ;;
		esac
	done
	shift $((OPTIND - 1))
	[ "$#" -gt 0 ] || usage
	cmd_argv=("$@")
}

# Run "$@" in the background under timeout(1) and wait for it, staying responsive to signals
# (bash runs traps only between foreground commands, but interrupts `wait`). Sets child_rc
# and timed_out. timeout(1) runs in a process group of its own and on expiry kills all of it.
# The child's stderr goes to $child_err when that is set.
run_with_timeout() {
	local start=$SECONDS

	trap on_signal INT TERM HUP
	if [ -n "$child_err" ]; then
		timeout -k 10 "$timeout_s" "$@" </dev/null 2>"$child_err" &
	else
		timeout -k 10 "$timeout_s" "$@" </dev/null &
	fi
	child=$!
	while :; do
		child_rc=0
		wait "$child" || child_rc=$?
		kill -0 "$child" 2>/dev/null || break
	done
	child=
	trap - INT TERM HUP
	timed_out=0
	if [ "$child_rc" -eq 124 ] && [ $((SECONDS - start)) -ge "$timeout_s" ]; then
		timed_out=1
	fi
	if [ "$interrupted" -eq 1 ]; then
		echo "run.sh: interrupted" >&2
		exit 130
	fi
}

# FIM_VM_DIRECT=1: same contract, no VM. The command runs on this host with our environment
# plus the -e variables; a forwarded port is simply 127.0.0.1.
run_direct() {
	local -a env_args=()

	# -w asks for a writable root; the host's already is. Nothing is thrown away afterwards,
	# which callers like tests/dm/run_in_vm.sh (-w only so that ctest can write its logs) accept.
	[ "$overlay" -eq 0 ] || echo "run.sh: FIM_VM_DIRECT=1: -w writes go to the real host root" >&2
	[ "${#ports[@]}" -eq 0 ] || env_args+=(FIM_VM_HOST_ADDR=127.0.0.1)
	run_with_timeout env "${env_args[@]}" "${envs[@]}" "${cmd_argv[@]}"
	if [ "$timed_out" -eq 1 ]; then
		echo "run.sh: command timed out after ${timeout_s}s" >&2
		exit 125
	fi
	exit "$child_rc"
}

# Build the kernel and initramfs if missing, or rebuild the initramfs when init or prepare.sh
# changed since (cheap mtime test; prepare.sh itself checks content stamps).
ensure_cache() {
	if [ ! -e "$cache/vmlinux" ] || [ ! -e "$cache/initrd.cpio" ] ||
		[ "$here/init" -nt "$cache/initrd.cpio" ] ||
		[ "$here/prepare.sh" -nt "$cache/initrd.cpio" ]; then
		"$here/prepare.sh" >&2 || die "prepare.sh failed"
	fi
}

# The share carries the command in and its status out (see init for the protocol). cmd.sh is
# bash: printf %q quotes every argument and value so bash reads back exactly what we were given.
write_share() {
	local share="$1" cwd kv

	cwd="$(pwd -P)"
	{
		echo "# generated by tests/vm/run.sh"
		for kv in "${envs[@]}"; do
			printf 'export %s=%q\n' "${kv%%=*}" "${kv#*=}"
		done
		[ "${#ports[@]}" -eq 0 ] || echo "export FIM_VM_HOST_ADDR=$host_addr"
		# 125: the harness, not the command, failed (as env(1) and chroot(1) use it).
		printf 'cd -- %q || exit 125\n' "$cwd"
		printf 'exec'
		printf ' %q' "${cmd_argv[@]}"
		printf '\n'
	} >"$share/cmd.sh"
	printf '%s' "$cwd" >"$share/cwd"
	printf 'OVERLAY=%s\nNET=%s\nPERSIST=%q\n' "$overlay" \
		"$([ "${#ports[@]}" -gt 0 ] && echo 1 || echo 0)" "$persist" >"$share/vm.conf"
}

# KVM only where it can work: /dev/kvm usable AND hardware virtualisation in the CPU flags.
# Some hosts expose a /dev/kvm without VT-x/AMD-V (nested PVM) on which guests crawl or abort.
accel_args() {
	if [ -r /dev/kvm ] && [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
		echo "-accel kvm -cpu host"
	else
		echo "-accel tcg,thread=multi,tb-size=256 -cpu max"
	fi
}

build_qemu_cmd() {
	local share="$1" console="$2" smp append port netdev

	smp="$(nproc)"
	[ "$smp" -le 4 ] || smp=4
	append="console=ttyS0 panic=-1 mitigations=off cryptomgr.notests audit=0 apparmor=0"
	if [ "${FIM_VM_DEBUG:-0}" = 1 ]; then
		append+=" fimvm.debug=1"
	else
		append+=" quiet loglevel=1"
	fi

	# shellcheck disable=SC2207,SC2054 # accel_args prints plain words; commas are qemu's
	qemu=(qemu-system-x86_64 $(accel_args) -M q35 -m "$mem_mb" -smp "$smp"
		-nodefaults -no-user-config -nographic -no-reboot
		# ttyS0: kernel console and init messages, to a file; ttyS1: the command's output,
		# to our stdout (qemu's stdin is /dev/null, so it never touches a terminal).
		-serial "file:$console"
		-chardev stdio,id=out,signal=off -serial chardev:out
		-kernel "$cache/vmlinux" -initrd "$cache/initrd.cpio" -append "$append"
		# The host root, read-only; multidevs=remap keeps inode numbers unique across the
		# host mounts that one 9p export spans.
		-fsdev local,id=root,path=/,security_model=none,readonly=on,multidevs=remap
		-device virtio-9p-pci,fsdev=root,mount_tag=hostroot
		-fsdev "local,id=share,path=$share,security_model=none,multidevs=remap"
		-device virtio-9p-pci,fsdev=share,mount_tag=share)
	if [ -n "$persist" ]; then
		# qemu option values escape a comma by doubling it.
		# shellcheck disable=SC2054 # commas are qemu's
		qemu+=(-fsdev "local,id=persist,path=${persist//,/,,},security_model=none,multidevs=remap"
			-device virtio-9p-pci,fsdev=persist,mount_tag=persist)
	fi

	[ "${#ports[@]}" -gt 0 ] || return 0
	# restrict=on: the guest reaches nothing but the guestfwd targets. Each connection to
	# 10.0.2.100:PORT spawns one busybox nc to host loopback (the tcp: form would serve one
	# connection only, and Debian has no other nc by default).
	netdev="user,id=n0,restrict=on"
	for port in "${ports[@]}"; do
		netdev+=",guestfwd=tcp:$host_addr:$port-cmd:/bin/busybox nc 127.0.0.1 $port"
	done
	# romfile= skips loading the iPXE option ROM: we never boot from the network.
	# shellcheck disable=SC2054 # commas are qemu's
	qemu+=(-netdev "$netdev" -device virtio-net-pci,netdev=n0,romfile=)
}

# No status from the guest: explain as much as we can on stderr.
report_no_status() {
	local dir="$1"

	if [ "$timed_out" -eq 1 ]; then
		echo "run.sh: VM timed out after ${timeout_s}s" >&2
	else
		echo "run.sh: VM ended without an exit status (qemu exit $child_rc)" >&2
	fi
	if [ -s "$dir/qemu.err" ]; then
		echo "run.sh: qemu stderr:" >&2
		tail -n 20 "$dir/qemu.err" >&2
	fi
	echo "run.sh: guest console tail:" >&2
	# SeaBIOS writes escape sequences and \r to ttyS0; drop them for a readable tail.
	tr -d '\r' <"$dir/console.log" | sed 's/\x1b\[[0-9;?]*[a-zA-Z]//g; s/\x1bc//g' |
		tail -n 60 >&2 || true
}

print_times() {
	local dir="$1" wall="$2" t0 t1

	[ -f "$dir/share/times" ] || return 0
	read -r t0 t1 <"$dir/share/times"
	awk -v t0="$t0" -v t1="$t1" -v wall="$wall" 'BEGIN {
		printf "run.sh: times: guest uptime at command start %.2fs, command %.2fs, wall %ss\n",
			t0, t1 - t0, wall }' >&2
}

run_vm() {
	local rc t_start wall

	ensure_cache
	workdir="$(mktemp -d /tmp/fimvm.XXXXXX)"
	trap cleanup EXIT
	mkdir "$workdir/share"
	: >"$workdir/console.log"
	write_share "$workdir/share"
	build_qemu_cmd "$workdir/share" "$workdir/console.log"

	t_start=$EPOCHREALTIME
	child_err="$workdir/qemu.err"
	run_with_timeout "${qemu[@]}"
	wall="$(awk "BEGIN { printf \"%.2f\", $EPOCHREALTIME - $t_start }")"

	if [ "${FIM_VM_DEBUG:-0}" = 1 ]; then
		echo "run.sh: guest console:" >&2
		tr -d '\r' <"$workdir/console.log" >&2
	fi
	[ "${FIM_VM_TIMES:-0}" != 1 ] || print_times "$workdir" "$wall"

	rc="$(cat "$workdir/share/rc" 2>/dev/null || true)"
	if ! [[ "$rc" =~ ^[0-9]+$ ]]; then
		report_no_status "$workdir"
		exit 125
	fi
	exit "$rc"
}

main() {
	parse_args "$@"
	if [ "${FIM_VM_DIRECT:-0}" = 1 ]; then
		run_direct
	fi
	command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found; run scripts/setup.sh"
	run_vm
}

main "$@"
