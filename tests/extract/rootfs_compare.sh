#!/usr/bin/env bash
# Extract a realistic root filesystem tarball with our extractor and with GNU tar, and
# compare the two trees exactly: paths, types, modes, owners, link targets, contents,
# mtimes, xattrs and hardlink groups. Device nodes and FIFOs, which we skip on purpose, are
# left out of the comparison (and must be absent from our tree). The extractor's counts
# (files, bytes of file data, directories, symlinks, hardlinks, skipped devices) must match
# what GNU tar's tree holds, counted here with stat and the archive's sparse maps.
#
# Usage: rootfs_compare.sh FLYIO_IMAGE_MANAGER [WORKDIR]
#
# The tarball is built at run time from parts of this host (/etc, /usr/sbin, the small
# programs of /usr/bin, a few libraries) plus the awkward cases a real image has: setuid
# programs, absolute symlinks, hardlinks (one to a symlink), a file capability, user
# xattrs, a sparse file, read-only and sticky directories, other owners, long and UTF-8
# names, devices, a FIFO.
# Needs root (owners, mknod, security.capability), GNU tar, cpio and python3; takes a few
# seconds.
#
# Two more forms let other suites put a tree made another way (the unpack stage's thin device,
# tests/dm) through the same comparison:
#   rootfs_compare.sh --build WORKDIR         build WORKDIR/rootfs.tar and GNU tar's tree only
#   rootfs_compare.sh --compare WORKDIR TREE  compare TREE with GNU tar's tree of --build; an
#                                             ext4 lost+found at TREE's top is not counted
set -euo pipefail

mode=full
case "${1:-}" in
--build | --compare) mode=${1#--} && shift ;;
esac
usage="usage: rootfs_compare.sh FLYIO_IMAGE_MANAGER [WORKDIR] | --build WORKDIR | --compare WORKDIR TREE"
bin=
tree=
case $mode in
full) bin=${1:?$usage} && work=${2:-} ;;
build) work=${1:?$usage} ;;
compare) work=${1:?$usage} && tree=${2:?$usage} ;;
esac

if [ "$(id -u)" -ne 0 ]; then
        echo "rootfs_compare: must run as root (owners, device nodes, capabilities)" >&2
        exit 1
fi
if [ -n "$bin" ] && ! "$bin" extract --help >/dev/null 2>&1; then
        echo "rootfs_compare: '$bin extract --help' failed: is the extract command wired into the CLI?" >&2
        exit 1
fi

if [ -z "$work" ]; then
        work=$(mktemp -d "${TMPDIR:-/tmp}/fim-rootfs-compare.XXXXXX")
        trap 'rm -rf "$work"' EXIT
fi
src=$work/src
# Build (full and --build modes). Not indented: the section holds a python heredoc.
if [ "$mode" != compare ]; then
rm -rf "$src" "$work/ours" "$work/gnu" "$work/rootfs.tar"
mkdir -p "$src/usr/bin" "$src/usr/lib/x86_64-linux-gnu" "$work/ours" "$work/gnu"

# --- the source tree -------------------------------------------------------------------

cp -a /etc "$src/etc"
cp -a /usr/sbin "$src/usr/sbin"
(cd /usr/bin && find . -maxdepth 1 \( -type l -o \( -type f -size -100k \) \) -print0 |
        cpio -0 -pdm --quiet "$src/usr/bin")
for f in passwd su mount umount chsh newgrp gpasswd; do
        [ -e "/usr/bin/$f" ] && cp -a "/usr/bin/$f" "$src/usr/bin/"
done
(cd /usr/lib/x86_64-linux-gnu &&
        ls -d libc.so* ld-linux* libz.so* libm.so* libarchive.so* libacl.so* libattr.so* \
                libselinux.so* libpcre2-8.so* libzstd.so* liblzma.so* 2>/dev/null |
        cpio -pdm --quiet "$src/usr/lib/x86_64-linux-gnu")
ln -s usr/bin "$src/bin"
ln -s usr/sbin "$src/sbin"
ln -s usr/lib "$src/lib"
ln -s /usr/lib/x86_64-linux-gnu/libc.so.6 "$src/abs-libc"
ln -s ../../nowhere "$src/usr/dangling"

mkdir -m 1777 "$src/tmp"
mkdir -p "$src/home/user/.config" "$src/var/lib/ro/inner" "$src/dev" "$src/run"
echo "settings" >"$src/home/user/.config/app.conf"
chown -R 1234:5678 "$src/home/user"
chmod 0700 "$src/home/user"
echo "inner" >"$src/var/lib/ro/inner/file"
chmod 0500 "$src/var/lib/ro/inner"
chmod 0555 "$src/var/lib/ro"

# Hardlinks, one group of three across directories.
echo "shared" >"$src/var/lib/shared"
ln "$src/var/lib/shared" "$src/var/lib/shared2"
ln "$src/var/lib/shared" "$src/home/shared3"
[ -e "$src/usr/bin/passwd" ] && ln "$src/usr/bin/passwd" "$src/usr/bin/passwd-hard"
# A hardlink to a symlink: GNU tar archives and restores it as one inode.
ln -s /usr/lib/x86_64-linux-gnu/libc.so.6 "$src/usr/lib/libc-link"
ln -P "$src/usr/lib/libc-link" "$src/usr/lib/libc-link2"

# A file capability (what setcap cap_net_bind_service=+ep writes) and user xattrs.
cp /usr/bin/true "$src/usr/bin/with-cap"
python3 - "$src" <<'EOF'
import os, sys
root = sys.argv[1]
cap = bytes.fromhex("01000002" "00040000" "00000000" "00000000" "00000000")
os.setxattr(os.path.join(root, "usr/bin/with-cap"), "security.capability", cap)
os.setxattr(os.path.join(root, "var/lib/shared"), "user.origin", b"rootfs_compare")
os.setxattr(os.path.join(root, "home/user/.config"), "user.dir", b"yes")
EOF

# A sparse file, a long name, UTF-8 names, setgid and odd modes.
truncate -s 8M "$src/var/lib/sparse"
printf 'middle' | dd of="$src/var/lib/sparse" bs=1 seek=$((4 << 20)) conv=notrunc status=none
long=$src/var/lib/$(printf 'L%.0s' $(seq 1 120))/$(printf 'f%.0s' $(seq 1 150))
mkdir -p "$(dirname "$long")"
echo long >"$long"
mkdir -p "$src/srv/café"
echo "naïve" >"$src/srv/café/naïve.txt"
install -m 2755 -g 5 /dev/null "$src/usr/bin/setgid-tool"
install -m 0000 /dev/null "$src/var/lib/no-perms"

# What we skip: devices and a FIFO.
mknod "$src/dev/null" c 1 3
mknod "$src/dev/sda" b 8 0
mkfifo "$src/run/fifo"

# Fixed times on a few directories (GNU tar and we must both restore them after contents).
touch -h -d '2020-02-02 02:02:02.123456789' "$src/var/lib" "$src/usr/dangling" "$src/home"
touch -d '2001-01-01 00:00:00' "$src"
chmod 0751 "$src"

# --- extract both ways ------------------------------------------------------------------

tar --numeric-owner --xattrs --xattrs-include='*' --format=pax --sparse -C "$src" \
        -cf "$work/rootfs.tar" .
[ "$mode" = build ] || "$bin" extract --tar "$work/rootfs.tar" --root "$work/ours" --json >"$work/ours.json"
tar --numeric-owner --same-owner -p --xattrs --xattrs-include='user.*' \
        --xattrs-include='security.capability' -C "$work/gnu" -xf "$work/rootfs.tar"
fi
[ "$mode" != build ] || exit 0

# --- compare ----------------------------------------------------------------------------

# In compare mode there are no counts from our extractor (""), and TREE is the ext4 root.
if [ "$mode" = compare ]; then
        set -- "$tree" "$work/gnu" "" "$work/rootfs.tar" lost+found
else
        set -- "$work/ours" "$work/gnu" "$work/ours.json" "$work/rootfs.tar"
fi
python3 - "$@" <<'EOF'
import hashlib, json, os, stat, sys, tarfile

ours_root, gnu_root, counts_path, tar_path = sys.argv[1:5]
IGNORED_TOP = set(sys.argv[5:])  # in ours only: what mkfs made, not the tarball
KEPT_XATTRS = ("user.", "security.capability")
SKIPPED = (stat.S_ISCHR, stat.S_ISBLK, stat.S_ISFIFO, stat.S_ISSOCK)


def xattrs(path):
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False)
            for n in names if n.startswith(KEPT_XATTRS)}


def describe(root):
    tree, inodes, skipped = {}, {}, 0
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root and root == ours_root:
            dirnames[:] = [d for d in dirnames if d not in IGNORED_TOP]
        for name in [""] + dirnames + filenames if dirpath == root else dirnames + filenames:
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if any(f(st.st_mode) for f in SKIPPED):
                skipped += 1
                continue
            d = {"mode": oct(st.st_mode), "owner": (st.st_uid, st.st_gid),
                 "mtime": st.st_mtime_ns, "xattrs": xattrs(path)}
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    d["sha256"] = hashlib.sha256(f.read()).hexdigest()
                d["size"] = st.st_size
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                d["target"] = os.readlink(path)
                inodes.setdefault(st.st_ino, []).append(rel)
            tree[rel] = d
    groups = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return tree, groups, skipped


def expected_counts(root):
    """The counts the extractor must report, from GNU tar's tree and the archive's sparse maps.

    Every path of the tree is one member: a directory, or a file or symlink whose first path
    (in walk order, which need not be the archive's) carries the inode and the rest are
    hardlinks. File data is the size of each regular inode, less the holes of sparse members,
    which are never written; Python's tarfile, not libarchive, reads the maps."""
    c = dict(file_count=0, size_bytes=0, dir_count=0, symlink_count=0, hardlink_count=0)
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames if dirpath == root else dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name) if name else dirpath)
            if stat.S_ISDIR(st.st_mode):
                c["dir_count"] += 1
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                c["file_count"] += 1
                if st.st_ino in seen:
                    c["hardlink_count"] += 1
                    continue
                seen.add(st.st_ino)
                if stat.S_ISLNK(st.st_mode):
                    c["symlink_count"] += 1
                else:
                    c["size_bytes"] += st.st_size
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if m.sparse is not None:
                c["size_bytes"] -= m.size - sum(size for _, size in m.sparse)
    return c


ours, ours_groups, ours_skipped = describe(ours_root)
gnu, gnu_groups, gnu_skipped = describe(gnu_root)
diffs = []
for rel in sorted(set(ours) | set(gnu)):
    if rel not in ours:
        diffs.append("missing in ours: %s" % rel)
    elif rel not in gnu:
        diffs.append("only in ours: %s" % rel)
    else:
        for key in sorted(set(ours[rel]) | set(gnu[rel])):
            if ours[rel].get(key) != gnu[rel].get(key):
                diffs.append("%s: %s ours=%r gnu=%r" % (rel, key, ours[rel].get(key),
                                                       gnu[rel].get(key)))
if ours_groups != gnu_groups:
    diffs.append("hardlink groups differ: ours=%r gnu=%r" % (ours_groups, gnu_groups))
if ours_skipped != 0:
    diffs.append("our tree has %d device nodes or FIFOs" % ours_skipped)

counts = json.load(open(counts_path)) if counts_path else {}
if counts and counts["skipped_devices"] != gnu_skipped:
    diffs.append("skipped_devices=%d, GNU tar created %d" % (counts["skipped_devices"],
                                                             gnu_skipped))
if counts:
    for key, want in expected_counts(gnu_root).items():
        if counts[key] != want:
            diffs.append("%s=%d, GNU tar's tree holds %d" % (key, counts[key], want))
sparse = os.lstat(os.path.join(ours_root, "var/lib/sparse"))
if sparse.st_blocks * 512 >= 1 << 20:
    diffs.append("var/lib/sparse: holes were filled (%d blocks)" % sparse.st_blocks)

if diffs:
    print("rootfs_compare: %d differences" % len(diffs))
    for d in diffs[:40]:
        print("  " + d)
    sys.exit(1)
print("rootfs_compare: identical: %d paths, %d hardlink groups, %d skipped devices; counts %s"
      % (len(ours), len(ours_groups), gnu_skipped, json.dumps(counts)))
EOF
