#!/usr/bin/env bash
# Guest half of tests/vm/selftest.sh; runs inside the VM (run.sh -p PORT ... -- bash THIS).
#
# Usage: selftest-guest.sh BLOB PORT
#   BLOB  a host file (visible read-only through the 9p root) copied verbatim to stdout at the
#         end, after a marker line, for the host to compare byte for byte
#   PORT  host loopback port forwarded by run.sh -p; serves BLOB's directory over HTTP
#
# Prints one "ok"/"not ok" line per check with its guest-side duration. On success it exits
# with 42, not 0, so the host also proves that a non-zero status crosses the VM boundary.
# errtrace (-E): the ERR trap must also fire inside functions.
set -Eeuo pipefail

readonly blob="$1" port="$2"
readonly pool=fimvm-selftest-pool thin=fimvm-selftest-thin snap=fimvm-selftest-snap
work=
meta=
data=
step_name=
step_t0=

begin() {
	step_name="$1"
	step_t0=$EPOCHREALTIME
}

ok() {
	awk -v name="$step_name" -v t0="$step_t0" -v t1="$EPOCHREALTIME" \
		'BEGIN { printf "ok - %s (%.2fs)\n", name, t1 - t0 }'
}

# set -e ends the script at the first failing command; say which check it was part of.
on_err() {
	echo "not ok - $step_name: '$BASH_COMMAND' failed at line $1"
}
trap 'on_err $LINENO' ERR

# Leave no dm devices or loop devices behind, even after a failure, so that thin_check and
# a later step never trip over leftovers (the VM is thrown away anyway, but a direct-mode run
# on a real host is not).
cleanup() {
	trap - ERR
	mountpoint -q "$work/m1" 2>/dev/null && umount "$work/m1"
	mountpoint -q "$work/m0" 2>/dev/null && umount "$work/m0"
	for dev in "$snap" "$thin" "$pool"; do
		dmsetup info "$dev" >/dev/null 2>&1 && dmsetup remove "$dev"
	done
	[ -z "$meta" ] || losetup -d "$meta" 2>/dev/null
	[ -z "$data" ] || losetup -d "$data" 2>/dev/null
	[ -z "$work" ] || rm -rf "$work"
	return 0
}
trap cleanup EXIT

check_environment() {
	begin "guest environment: DM_DISABLE_UDEV=1, fresh /run, host root read-only"
	[ "${DM_DISABLE_UDEV:-}" = 1 ]
	[ "${FIM_VM:-}" = 1 ]
	[ ! -e /run/udev ]
	# Not `! touch`: set -e ignores a negated command, so it could never fail the check.
	if touch /usr/.fimvm-selftest 2>/dev/null; then
		false
	fi
	[ -f "$blob" ]
	ok
}

make_pool() {
	begin "thin-pool over loop devices on guest /tmp"
	work="$(mktemp -d /tmp/fimvm-selftest.XXXXXX)"
	mkdir "$work/m0" "$work/m1"
	truncate -s 64M "$work/meta.img"
	truncate -s 1G "$work/data.img"
	meta="$(losetup -f --show "$work/meta.img")"
	data="$(losetup -f --show "$work/data.img")"
	# A zeroed first block marks the metadata device as new for the thin-pool target.
	dd if=/dev/zero of="$meta" bs=4096 count=1 status=none
	dmsetup create "$pool" --table \
		"0 $(blockdev --getsz "$data") thin-pool $meta $data 128 32768"
	# Proves DM_DISABLE_UDEV=1 works: libdevmapper made the node itself, no udev involved.
	[ -b "/dev/mapper/$pool" ]
	ok
}

make_thin() {
	begin "create_thin, mkfs.ext4, mount, write"
	dmsetup message "/dev/mapper/$pool" 0 "create_thin 0"
	dmsetup create "$thin" --table "0 2097152 thin /dev/mapper/$pool 0"
	mkfs.ext4 -q -E nodiscard,lazy_itable_init=1 "/dev/mapper/$thin"
	mount "/dev/mapper/$thin" "$work/m0"
	echo "before snapshot" >"$work/m0/hello.txt"
	head -c 4M /dev/urandom >"$work/m0/random.bin"
	sha256sum <"$work/m0/random.bin" >"$work/random.sha256"
	ok
}

# Snapshot the origin while it is mounted and active: the kernel's thin-provisioning doc asks
# for the origin to be suspended around create_snap (suspend also freezes the filesystem, so
# the snapshot is a clean ext4 that mounts read-only without journal replay).
make_snapshot() {
	begin "snapshot with suspend/resume of the live origin"
	dmsetup suspend "$thin"
	dmsetup message "/dev/mapper/$pool" 0 "create_snap 1 0"
	dmsetup resume "$thin"
	echo "after snapshot" >"$work/m0/hello.txt"
	sync
	ok
}

read_snapshot() {
	begin "mount the snapshot, read back pre-snapshot data"
	dmsetup create "$snap" --table "0 2097152 thin /dev/mapper/$pool 1"
	mount -o ro "/dev/mapper/$snap" "$work/m1"
	[ "$(cat "$work/m1/hello.txt")" = "before snapshot" ]
	[ "$(cat "$work/m0/hello.txt")" = "after snapshot" ]
	sha256sum <"$work/m1/random.bin" | cmp -s - "$work/random.sha256"
	ok
}

remove_and_check() {
	begin "remove devices, thin_check the metadata"
	umount "$work/m1"
	umount "$work/m0"
	dmsetup status "$pool"
	dmsetup remove "$snap"
	dmsetup remove "$thin"
	dmsetup remove "$pool"
	[ ! -e "/dev/mapper/$pool" ]
	thin_check "$meta"
	ok
}

# Only 10.0.2.100:PORT leads anywhere; the slirp gateway 10.0.2.2 (which without restrict=on
# would NAT to the host) must refuse. Static busybox, not python: under TCG python's start-up
# and imports cost seconds.
check_forward() {
	begin "-p forward to host loopback HTTP, nothing else reachable"
	busybox wget -q -O - "http://$FIM_VM_HOST_ADDR:$port/$(basename "$blob")" | cmp -s - "$blob"
	if busybox nc -w 3 10.0.2.2 "$port" </dev/null >/dev/null 2>&1; then
		echo "10.0.2.2:$port is reachable despite restrict=on"
		false
	fi
	ok
}

main() {
	check_environment
	make_pool
	make_thin
	make_snapshot
	read_snapshot
	remove_and_check
	check_forward
	cleanup
	trap - EXIT ERR

	echo "==fimvm-blob $(stat -c %s "$blob")=="
	cat "$blob"
	exit 42
}

main
