#!/usr/bin/env bash
# Benchmark: unpacking an image into a thin device, ours against the baseline an operator
# would script, in one boot of the test VM (the host kernel has no device-mapper).
#
#   ours      mkfs.ext4 + mount + `flyio-image-manager extract` (the unpack stage's data path:
#             the safe extractor with its per-entry checks)
#   baseline  mkfs.ext4 + mount + GNU tar -xpf
#
# Both run on a fresh thin device of the same size in the same pool each round; the time
# includes a final sync. Prints each side's median, the ratio and the extracted entry count.
#
# Usage: tests/bench/unpack_bench.sh [BUILD_DIR] [ROUNDS] [TARBALL]
#   TARBALL  default: the demo's Debian image if cached (.cache/demo), else the extraction
#            benchmark's rootfs (.cache/bench/rootfs.tar, built by tests/bench/extract_bench.sh)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="${1:-build}"
rounds="${2:-3}"
tarball="${3:-}"
case "$build" in /*) ;; *) build="$repo/$build" ;; esac
bin="$build/flyio-image-manager"
[ -x "$bin" ] || { echo "unpack_bench.sh: no '$bin'; build first" >&2; exit 2; }
if [ -z "$tarball" ]; then
        for t in "$repo/.cache/demo/debian-bookworm-minbase.tar" "$repo/.cache/bench/rootfs.tar"; do
                [ -f "$t" ] && { tarball=$t; break; }
        done
fi
[ -n "$tarball" ] && [ -f "$tarball" ] || {
        echo "unpack_bench.sh: no tarball: run scripts/demo.sh or tests/bench/extract_bench.sh once, or pass one" >&2
        exit 2
}

if [ "${FIM_UNPACK_BENCH_GUEST:-0}" != 1 ]; then
        exec "$repo/tests/vm/run.sh" -t 3600 -m 3072 -e FIM_UNPACK_BENCH_GUEST=1 -- \
                bash "$here/unpack_bench.sh" "$build" "$rounds" "$tarball"
fi

# --- inside the VM ------------------------------------------------------------------------
pool=fimbench
"$bin" pool-setup --name "$pool" --dir /tmp/benchpool --data-size 6G >/dev/null
mnt=/tmp/benchmnt
mkdir -p "$mnt"
id=0

# run_round TOOL: a fresh thin device, mkfs, mount, extract with TOOL, sync; prints seconds.
run_round() {
        local tool=$1 dev start end
        id=$((id + 1))
        dmsetup message "$pool" 0 "create_thin $id"
        dmsetup create "bench$id" --table "0 $((4 * 1024 * 1024 * 2)) thin /dev/mapper/$pool $id"
        dev=/dev/mapper/bench$id
        start=$(date +%s.%N)
        mkfs.ext4 -q -F -m 0 -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 "$dev"
        mount -o noatime "$dev" "$mnt"
        if [ "$tool" = ours ]; then
                "$bin" extract --tar "$tarball" --root "$mnt" >/dev/null
        else
                tar --numeric-owner -xpf "$tarball" -C "$mnt"
        fi
        sync -f "$mnt"
        end=$(date +%s.%N)
        umount "$mnt"
        dmsetup remove "bench$id"
        dmsetup message "$pool" 0 "delete $id" 2>/dev/null || true
        echo "$end - $start" | bc -l
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

# Warm the page cache for the tarball so both sides read it from memory.
cat "$tarball" >/dev/null
ours=()
base=()
for r in $(seq 1 "$rounds"); do
        ours+=("$(run_round ours)")
        base+=("$(run_round tar)")
        echo "round $r: ours ${ours[-1]} s, GNU tar ${base[-1]} s"
done
mo=$(printf '%s\n' "${ours[@]}" | median)
mb=$(printf '%s\n' "${base[@]}" | median)
entries=$(tar -tf "$tarball" | wc -l)
printf '\ntarball: %s (%s MiB, %s entries), %s rounds, TCG VM\n' "$tarball" \
        "$(( $(stat -c %s "$tarball") >> 20 ))" "$entries" "$rounds"
printf 'median  ours (mkfs + safe extract): %.2f s\n' "$mo"
printf 'median  baseline (mkfs + GNU tar):  %.2f s\n' "$mb"
printf 'ratio   ours / baseline:            %.2f\n' "$(echo "$mo / $mb" | bc -l)"
"$bin" pool-setup --teardown --name "$pool" --dir /tmp/benchpool --force >/dev/null
