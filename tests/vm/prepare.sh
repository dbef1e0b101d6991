#!/usr/bin/env bash
# Build (or confirm) the kernel + initramfs that tests/vm/run.sh boots.
#
# The host kernel has no device-mapper, so dm-thin code runs in a throwaway qemu guest that
# boots Debian's own kernel package. This script fetches that package with apt, unpacks it
# without installing it, and produces two files in .cache/vm/ (git-ignored):
#
#   vmlinux      the uncompressed kernel ELF; qemu boots it through its PVH entry point, which
#                skips the bzImage xz decompressor (2-3 s under software emulation)
#   initrd.cpio  static busybox + the modules we need + tests/vm/init, uncompressed because
#                decompressing it inside an emulated guest costs more than reading it
#
# Idempotent: every step is skipped when its output is already there and up to date, so a
# second run only asks apt-cache which kernel is current and checks a stamp.
#
# Usage: tests/vm/prepare.sh [-f]     (-f: throw the cache away and rebuild everything)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
readonly here repo cache="$repo/.cache/vm"

# Modules the guest needs: virtio PCI transport and 9p for the host root and the share (loaded
# first, in order, because every mount needs them), then overlay for the writable-root option,
# loop + ext4 + dm-thin for the tests. Each of those four gets its own dependency chain that
# the guest loads in parallel with the others and with its mounts: module loading is ~0.6 s
# of CPU under TCG, and the guest has 2+ vCPUs. The net set is loaded only when run.sh is
# asked to forward a port, because it costs ~0.7 s per boot.
readonly boot_modules=(virtio_pci 9pnet_virtio 9p)
readonly chain_modules=(overlay loop ext4 dm-thin-pool)
readonly net_modules=(virtio_net)

log() {
	echo "prepare: $*" >&2
}

die() {
	echo "prepare: error: $*" >&2
	exit 1
}

# Print the versioned kernel package linux-image-amd64 currently depends on. The ABI name
# (6.1.0-NN) moves with Debian point and security releases, so it is never hard-coded.
resolve_kernel_package() {
	local pkg

	# apt's answer can only change when its package lists change. Without a pkgcache.bin
	# (Debian's docker images disable it) every apt-cache call re-parses all lists, ~0.9 s, so
	# reuse the last answer while no list is newer than it.
	if [ -f "$cache/kernel.pkg" ] && [ -d /var/lib/apt/lists ] &&
		[ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' \
			-newer "$cache/kernel.pkg" -print -quit)" ]; then
		cat "$cache/kernel.pkg"
		return
	fi

	pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
		sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n 1)"
	if [ -z "$pkg" ]; then
		# No package lists yet (fresh machine): only now is a network round trip worth it.
		log "apt-cache knows no linux-image-amd64; running apt-get update"
		apt-get update -qq >&2 || log "apt-get update failed"
		pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
			sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n 1)"
	fi
	if [ -z "$pkg" ] && [ -f "$cache/kernel.pkg" ]; then
		# Offline with a warm cache is fine: keep using what we have.
		pkg="$(cat "$cache/kernel.pkg")"
		log "cannot resolve linux-image-amd64; reusing cached $pkg"
	fi
	[ -n "$pkg" ] || die "cannot resolve the kernel package behind linux-image-amd64"
	echo "$pkg"
}

# Download the .deb into $cache/debs unless a copy is already there. apt-get download checks
# it against the signed repository index, so a cached file came through the same check.
download_kernel() {
	local pkg="$1" deb
	local -a apt_opts=()

	deb="$(ls "$cache/debs/${pkg}"_*.deb 2>/dev/null | head -n 1 || true)"
	if [ -n "$deb" ]; then
		echo "$deb"
		return
	fi
	mkdir -p "$cache/debs"
	# As root apt drops to the _apt user for downloads, which cannot write into our root-owned
	# cache and then warns; downloading as root avoids that noise.
	[ "$(id -u)" -ne 0 ] || apt_opts=(-o APT::Sandbox::User=root)
	log "downloading $pkg"
	(cd "$cache/debs" && apt-get download -q "${apt_opts[@]}" "$pkg" >&2) ||
		die "apt-get download $pkg failed"
	deb="$(ls "$cache/debs/${pkg}"_*.deb 2>/dev/null | head -n 1 || true)"
	[ -n "$deb" ] || die "apt-get download left no ${pkg}_*.deb"
	echo "$deb"
}

# Unpack the package next to the cache (never into /) and create modules.dep, which Debian
# builds in the postinst and so is not in the .deb.
extract_kernel() {
	local deb="$1" root="$2" kver="$3"

	[ -f "$root/.extracted" ] && return
	log "extracting $(basename "$deb")"
	rm -rf "$root"
	mkdir -p "$root"
	dpkg -x "$deb" "$root"
	[ -f "$root/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $deb"
	depmod -b "$root" "$kver"
	touch "$root/.extracted"
}

# vmlinuz is a bzImage: real-mode setup + a decompressor + the kernel as an xz stream. Find
# the xz magic and decompress from there; what follows the stream is decompressor padding.
extract_vmlinux() {
	local vmlinuz="$1" out="$2"

	[ -f "$out" ] && return
	log "extracting vmlinux from $(basename "$vmlinuz")"
	python3 - "$vmlinuz" "$out.tmp" <<-'EOF'
		import lzma, sys
		data = open(sys.argv[1], "rb").read()
		off = data.find(b"\xfd7zXZ\x00")
		if off < 0:
		    sys.exit("no xz stream in " + sys.argv[1])
		elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[off:])
		if elf[:4] != b"\x7fELF":
		    sys.exit("xz stream in %s is not an ELF image" % sys.argv[1])
		open(sys.argv[2], "wb").write(elf)
	EOF
	mv "$out.tmp" "$out"
}

# Print, one per line and in load order, the .ko paths that modprobe would insmod for the
# given modules. busybox insmod does no dependency resolution, so the guest needs this list.
module_order() {
	local root="$1" kver="$2"
	shift 2

	# -a: without it modprobe takes every name after the first as a module parameter.
	modprobe -d "$root" -S "$kver" --show-depends -a "$@" |
		awk '$1 == "insmod" && !seen[$2]++ { print $2 }'
}

# Copy modules (SRC DST pairs) into the initramfs without their appended signatures. The kernel
# then logs a one-time "module verification failed" taint (harmless: signatures are not
# enforced), and loading gets ~0.2 s faster because the guest no longer verifies 24 PKCS#7
# blobs under TCG. One python run for all of them: each start costs ~0.1 s.
copy_modules_unsigned() {
	python3 - "$@" <<-'EOF'
		import struct, sys
		MAGIC = b"~Module signature appended~\n"
		args = sys.argv[1:]
		for src, dst in zip(args[0::2], args[1::2]):
		    data = open(src, "rb").read()
		    if data.endswith(MAGIC):
		        # struct module_signature (12 bytes) precedes the magic; its last field is
		        # the big-endian length of the signature that precedes it.
		        end = len(data) - len(MAGIC)
		        sig_len = struct.unpack(">I", data[end - 4:end])[0]
		        data = data[:end - 12 - sig_len]
		    open(dst, "wb").write(data)
	EOF
}

# Everything the initramfs is built from. A change to any of it (a new kernel, an edited
# init, a new busybox, this script's module list) changes the stamp and forces a rebuild.
initrd_stamp() {
	local kver="$1"

	{
		echo "$kver"
		sha256sum "$here/init" "$here/prepare.sh" /bin/busybox
	} | sha256sum | cut -d' ' -f1
}

# Stage the modules needed for the given names and write their load order to LIST. Modules
# already staged for an earlier list are left out: the guest loads boot.order before anything
# else. Chains may share a dependency; the kernel makes a second, concurrent insmod of the
# same module wait for the first and then fail with EEXIST, so the guest ignores that.
stage_modules() {
	local root="$1" kver="$2" stage="$3" list="$4"
	shift 4
	local ko name
	local -a pairs=()

	: >"$stage/lib/modules/$list"
	while read -r ko; do
		name="$(basename "$ko")"
		if [ -e "$stage/lib/modules/$name" ]; then
			grep -qx "$name" "$stage/lib/modules/boot.order" 2>/dev/null && continue
		else
			: >"$stage/lib/modules/$name"
			pairs+=("$ko" "$stage/lib/modules/$name")
		fi
		echo "$name" >>"$stage/lib/modules/$list"
	done < <(module_order "$root" "$kver" "$@")
	[ -s "$stage/lib/modules/$list" ] || die "no modules resolved for $*"
	[ "${#pairs[@]}" -eq 0 ] || copy_modules_unsigned "${pairs[@]}"
}

build_initrd() {
	local root="$1" kver="$2" out="$3"
	local applet m

	stage="$(mktemp -d "$cache/initrd.XXXXXX")"
	mkdir -p "$stage"/{bin,dev,proc,sys,tmp,host,newroot,share,lib/modules}

	cp /bin/busybox "$stage/bin/busybox"
	# Applet links made here, not with `busybox --install` at boot: it saves guest time.
	for applet in $(/bin/busybox --list); do
		[ "$applet" = busybox ] || ln -s busybox "$stage/bin/$applet"
	done
	ln -s bin "$stage/sbin"
	install -m 0755 "$here/init" "$stage/init"

	stage_modules "$root" "$kver" "$stage" boot.order "${boot_modules[@]}"
	for m in "${chain_modules[@]}"; do
		stage_modules "$root" "$kver" "$stage" "$m.chain" "$m"
	done
	stage_modules "$root" "$kver" "$stage" net.order "${net_modules[@]}"

	# The kernel opens /dev/console for init before anything is mounted. Creating the node
	# needs root; without it init still reopens its output on devtmpfs's console.
	mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true

	(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet -o -H newc --owner=0:0 --reproducible >"$out.tmp")
	mv "$out.tmp" "$out"
	log "initrd: $(find "$stage/lib/modules" -name '*.ko' | wc -l) modules," \
		"$(stat -c %s "$out") bytes"
	rm -rf "$stage"
	stage=
}

link_if_changed() {
	[ "$(readlink "$2" 2>/dev/null)" = "$1" ] || ln -sfn "$1" "$2"
}

# Drop kernels and packages other than the current one: each extracted tree is ~400 MB.
prune_old_kernels() {
	local kver="$1" pkg="$2" d f

	for d in "$cache"/kernel/*; do
		[ -e "$d" ] || continue
		[ "$(basename "$d")" = "$kver" ] || { log "removing old $d"; rm -rf "$d"; }
	done
	for f in "$cache"/debs/*.deb; do
		[ -e "$f" ] || continue
		case "$(basename "$f")" in
		"${pkg}"_*) ;;
		*) log "removing old $f"; rm -f "$f" ;;
		esac
	done
}

# The initramfs staging directory, global so that an exit on error still removes it.
stage=
trap '[ -z "$stage" ] || rm -rf "$stage"' EXIT

main() {
	local pkg kver deb kdir stamp tool did=0

	for tool in apt-cache apt-get dpkg depmod modprobe python3 cpio flock; do
		command -v "$tool" >/dev/null || die "$tool not found; run scripts/setup.sh"
	done
	if ! [ -x /bin/busybox ] || ! /bin/busybox --list | grep -qx nc; then
		die "/bin/busybox missing or not the full static build; run scripts/setup.sh"
	fi
	mkdir -p "$cache"
	# Several run.sh may call us at once (parallel test jobs, other developers in the same
	# tree); one builds, the others wait and then find everything up to date.
	exec 9>"$cache/.lock"
	flock 9
	if [ "${1:-}" = "-f" ]; then
		log "emptying $cache"
		find "$cache" -mindepth 1 -maxdepth 1 ! -name .lock -exec rm -rf {} +
	fi

	pkg="$(resolve_kernel_package)"
	kver="${pkg#linux-image-}"
	kdir="$cache/kernel/$kver"

	if [ ! -f "$kdir/vmlinux" ] || [ ! -f "$kdir/root/.extracted" ]; then
		deb="$(download_kernel "$pkg")"
		extract_kernel "$deb" "$kdir/root" "$kver"
		extract_vmlinux "$kdir/root/boot/vmlinuz-$kver" "$kdir/vmlinux"
		did=1
	fi

	stamp="$(initrd_stamp "$kver")"
	if [ "$(cat "$kdir/initrd.stamp" 2>/dev/null)" != "$stamp" ] || [ ! -f "$kdir/initrd.cpio" ]; then
		build_initrd "$kdir/root" "$kver" "$kdir/initrd.cpio"
		echo "$stamp" >"$kdir/initrd.stamp"
		did=1
	elif [ "$here/init" -nt "$kdir/initrd.cpio" ] || [ "$here/prepare.sh" -nt "$kdir/initrd.cpio" ]; then
		# Touched but not changed (checkout, editor): renew the mtime that run.sh compares,
		# or every run.sh would call us again.
		touch "$kdir/initrd.cpio"
	fi

	# Stable names for run.sh, whatever the kernel version is. Replaced only when they change:
	# a concurrent run.sh must never find them missing.
	link_if_changed "kernel/$kver/vmlinux" "$cache/vmlinux"
	link_if_changed "kernel/$kver/initrd.cpio" "$cache/initrd.cpio"
	echo "$pkg" >"$cache/kernel.pkg"
	prune_old_kernels "$kver" "$pkg"

	if [ "$did" -eq 1 ]; then
		log "ready: $pkg ($cache)"
	else
		log "up to date: $pkg ($cache)"
	fi
}

main "$@"
