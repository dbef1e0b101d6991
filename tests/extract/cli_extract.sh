#!/usr/bin/env bash
# The `extract` command end to end: flags reach the extractor, counts are printed, and a
# refused archive exits non-zero with a message that names the member and leaves nothing
# outside the root; owners are kept by default as root only. Builds its tarballs with python3
# and GNU tar at run time. Runs as root (it also runs the command as "nobody", with setpriv).
#
# Usage: cli_extract.sh FLYIO_IMAGE_MANAGER
set -euo pipefail

bin=${1:?usage: cli_extract.sh FLYIO_IMAGE_MANAGER}
work=$(mktemp -d "${TMPDIR:-/tmp}/fim-cli-extract.XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
nobody=65534
failures=0

python3 - "$work" <<'EOF'
import io, sys, tarfile

def tar(path, members, uid=0):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data, link in members:
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mode, ti.uid, ti.gid = kind, link, 0o644, uid, uid
            ti.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(ti, io.BytesIO(data) if ti.size else None)

work = sys.argv[1]
tar(work + "/three.tar", [("a", tarfile.REGTYPE, b"A", ""), ("b", tarfile.REGTYPE, b"BB", ""),
                          ("c", tarfile.SYMTYPE, b"", "a")])
tar(work + "/escape.tar", [("ok", tarfile.REGTYPE, b"x", ""),
                           ("../outside", tarfile.REGTYPE, b"pwned", "")])
tar(work + "/absolute.tar", [("/etc/x", tarfile.REGTYPE, b"x", "")])
tar(work + "/deep.tar", [("d1/d2/d3/f", tarfile.REGTYPE, b"x", "")])
tar(work + "/owned.tar", [("o", tarfile.REGTYPE, b"owned", "")], uid=1234)

# Read-only directories with contents, for a caller without CAP_DAC_OVERRIDE: "late" comes
# after its contents, "ro/ro2" is read-only inside read-only.
with tarfile.open(work + "/readonly.tar", "w", format=tarfile.PAX_FORMAT) as tf:
    for name, mode, data in (("ro/", 0o555, None), ("ro/a", 0o444, b"A"),
                             ("ro/sub/", 0o500, None), ("ro/sub/b", 0o600, b"B"),
                             ("ro/ro2/", 0o555, None), ("ro/ro2/deep/", 0o500, None),
                             ("ro/ro2/deep/c", 0o400, b"C"), ("late/x", 0o644, b"X"),
                             ("late/", 0o555, None)):
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
        ti.mode, ti.mtime, ti.size = mode, 1600000000, len(data or b"")
        tf.addfile(ti, io.BytesIO(data) if data else None)
EOF
# A sparse file of 10 data segments, as GNU tar stores it.
mkdir "$work/sparse"
truncate -s 1M "$work/sparse/s"
for i in $(seq 0 9); do
        printf x | dd of="$work/sparse/s" bs=1 seek=$((i * 65536 + 4096)) conv=notrunc status=none
done
tar --sparse --format=gnu -C "$work/sparse" -cf "$work/sparse.tar" s
chmod 644 "$work"/*.tar

# check NAME WANT_STATUS PATTERN... -- ARGS: run the command, compare status and output. With
# AS=nobody in the environment, the command runs as that user, into a root it owns.
check() {
        local name=$1 want=$2 status=0 out
        shift 2
        local patterns=()
        while [ "$1" != "--" ]; do patterns+=("$1"); shift; done
        shift
        rm -rf "$work/root" && mkdir "$work/root"
        if [ "${AS:-}" = nobody ]; then
                chown "$nobody:$nobody" "$work/root"
                out=$(setpriv --reuid="$nobody" --regid="$nobody" --clear-groups \
                        "$bin" extract "$@" 2>&1) || status=$?
        else
                out=$("$bin" extract "$@" 2>&1) || status=$?
        fi
        if [ "$status" -ne "$want" ]; then
                echo "FAIL $name: exit status $status, want $want; output: $out"
                failures=$((failures + 1))
                return
        fi
        for p in "${patterns[@]}"; do
                if ! grep -qF -- "$p" <<<"$out"; then
                        echo "FAIL $name: output lacks '$p': $out"
                        failures=$((failures + 1))
                        return
                fi
        done
        echo "ok   $name"
}

check "extracts and counts" 0 '"file_count":3' '"size_bytes":3' '"symlink_count":1' -- \
        --tar "$work/three.tar" --root "$work/root" --json
[ "$(cat "$work/root/b")" = BB ] || { echo "FAIL extracts: b is wrong"; failures=$((failures + 1)); }

check "--max-entries refuses the member past the limit" 1 \
        "error: failed to extract 'c': archive has more than 2 entries" -- \
        --tar "$work/three.tar" --root "$work/root" --max-entries 2
check "--max-bytes refuses the member past the limit" 1 \
        "error: failed to extract 'b': archive holds more than 2 bytes of file data" -- \
        --tar "$work/three.tar" --root "$work/root" --max-bytes 2
check "--max-depth refuses a deeper member" 1 \
        "error: failed to extract 'd1/d2/d3/f': path is 4 levels deep, more than the limit of 3" -- \
        --tar "$work/deep.tar" --root "$work/root" --max-depth 3
check "--max-depth at the member's depth" 0 "files=1" -- \
        --tar "$work/deep.tar" --root "$work/root" --max-depth 4
check "--max-path-length refuses a longer name" 1 \
        "error: failed to extract 'd1/d2/d3/f': name is 10 bytes long, more than the limit of 9" -- \
        --tar "$work/deep.tar" --root "$work/root" --max-path-length 9

check "an escaping member fails, named; what came before it is reported" 1 \
        "error: failed to extract '../outside': path has a '..' component" \
        "note: nothing outside '$work/root' was changed; what was extracted before the failure (1 member) is still in it" -- \
        --tar "$work/escape.tar" --root "$work/root"
check "a member refused first is named" 1 "error: failed to extract '/etc/x'" -- \
        --tar "$work/absolute.tar" --root "$work/root"
if "$bin" extract --tar "$work/absolute.tar" --root "$work/root" 2>&1 | grep -q "^note:"; then
        echo "FAIL a member refused first: a note about members extracted before it"
        failures=$((failures + 1))
fi
if [ -e "$work/outside" ]; then
        echo "FAIL an escaping member: '$work/outside' was created"
        failures=$((failures + 1))
fi

check "a missing tarball fails, named" 1 "error: failed to open '$work/none.tar'" -- \
        --tar "$work/none.tar" --root "$work/root"
check "a bad limit is a usage error" 2 "--max-depth '0': expected a number from 1 to 4096" -- \
        --tar "$work/three.tar" --root "$work/root" --max-depth 0

check "--max-sparse-entries refuses a longer map" 1 \
        "error: failed to extract 's': sparse map has more than 5 entries" -- \
        --tar "$work/sparse.tar" --root "$work/root" --max-sparse-entries 5
check "--max-sparse-entries at the map's size" 0 "files=1" -- \
        --tar "$work/sparse.tar" --root "$work/root" --max-sparse-entries 11
check "--max-sparse-entries 0 is a usage error" 2 \
        "--max-sparse-entries '0': expected a positive number" -- \
        --tar "$work/sparse.tar" --root "$work/root" --max-sparse-entries 0
check "the default sparse limit" 0 "files=1" -- --tar "$work/sparse.tar" --root "$work/root"
cmp -s "$work/sparse/s" "$work/root/s" || { echo "FAIL sparse: contents differ"; failures=$((failures + 1)); }

# owner FILE UID: the file's owner must be UID.
owner() {
        local got
        got=$(stat -c %u "$1")
        if [ "$got" != "$2" ]; then
                echo "FAIL owner of $1 is $got, want $2"
                failures=$((failures + 1))
        fi
}
check "root keeps the archive's owners by default" 0 "files=1" -- \
        --tar "$work/owned.tar" --root "$work/root"
owner "$work/root/o" 1234
check "root with --no-same-owner keeps its own" 0 "files=1" -- \
        --tar "$work/owned.tar" --root "$work/root" --no-same-owner
owner "$work/root/o" 0
AS=nobody check "another user keeps its own owner by default" 0 "files=1" -- \
        --tar "$work/owned.tar" --root "$work/root"
owner "$work/root/o" "$nobody"
AS=nobody check "another user with --same-owner fails with a hint" 1 \
        "error: failed to extract 'o': failed to set the owner" \
        "hint: keeping the archive's owners needs root" -- \
        --tar "$work/owned.tar" --root "$work/root" --same-owner
# Directory modes are applied after the directory's contents: a caller that cannot override
# permissions (root can, which hides an early chmod) could not fill a 0555 directory otherwise.
# tree_is DIR PATH:MODE:CONTENT...: each path has the mode (octal), owner nobody and, for a
# file, the content ("-" for a directory).
tree_is() {
        local dir=$1 spec path mode content got
        shift
        for spec in "$@"; do
                IFS=: read -r path mode content <<<"$spec"
                got=$(stat -c '%a %u' "$dir/$path" 2>&1) || true
                if [ "$got" != "$mode $nobody" ]; then
                        echo "FAIL $path: mode and owner '$got', want '$mode $nobody'"
                        failures=$((failures + 1))
                elif [ "$content" != - ] && [ "$(cat "$dir/$path")" != "$content" ]; then
                        echo "FAIL $path: content '$(cat "$dir/$path")', want '$content'"
                        failures=$((failures + 1))
                elif [ "$(stat -c %Y "$dir/$path")" != 1600000000 ]; then
                        echo "FAIL $path: mtime $(stat -c %Y "$dir/$path"), want 1600000000"
                        failures=$((failures + 1))
                fi
        done
}
AS=nobody check "another user fills read-only directories" 0 '"file_count":4' \
        '"dir_count":5' -- --tar "$work/readonly.tar" --root "$work/root" --json
tree_is "$work/root" ro:555:- ro/a:444:A ro/sub:500:- ro/sub/b:600:B ro/ro2:555:- \
        ro/ro2/deep:500:- ro/ro2/deep/c:400:C late:555:- late/x:644:X

check "--help says who keeps owners" 0 "Run as root, it keeps the archive's owners" \
        "--same-owner" "--max-sparse-entries" -- --help

if [ "$failures" -ne 0 ]; then
        echo "cli_extract: $failures failures"
        exit 1
fi
echo "cli_extract: all passed"
