#!/usr/bin/env bash
# Benchmark extraction: our extractor against GNU tar and bsdtar on a ~300 MiB realistic
# root filesystem tarball, all extracting into the same filesystem, ROUNDS rounds each
# (default 3), interleaved. Prints the median wall time, min/max, peak RSS and the ratios,
# then the same for a smaller tarball, and our peak RSS for both: it should not grow with
# the archive.
#
# Usage: tests/bench/extract_bench.sh [ROUNDS]
# Environment:
#   FIM_BIN   the flyio-image-manager binary (default: build it, Release, in build-bench/)
#   COMPRESS  none (default), gz, xz or zst: benchmark a compressed copy of the tarball
#   OUT_DIR   where to extract (default .cache/bench/out); e.g. /dev/shm/x to take the disk
#             out of the picture
#
# The tarballs are built once from this host's tree (/etc, /usr/sbin, /usr/include, Python
# and Perl libraries, zoneinfo, small programs of /usr/bin; the small one only the first
# three and zoneinfo) and cached in .cache/bench/.
# Runs as root. Nothing is synced inside the timed runs; `sync` runs before each one. Wall
# time suffers from whatever else the machine is doing; CPU time (user + system) much less.
set -euo pipefail

rounds=${1:-3}
compress=${COMPRESS:-none}
src=$(cd "$(dirname "$0")/../.." && pwd)
cache=$src/.cache/bench
out=${OUT_DIR:-$cache/out}

if [ "$(id -u)" -ne 0 ]; then
        echo "extract_bench: run as root (all three tools restore owners)" >&2
        exit 1
fi
for tool in tar bsdtar /usr/bin/time; do
        command -v "$tool" >/dev/null || { echo "extract_bench: $tool is missing" >&2; exit 1; }
done

bin=${FIM_BIN:-}
if [ -z "$bin" ]; then
        cmake -S "$src" -B "$src/build-bench" -DCMAKE_BUILD_TYPE=Release >/dev/null
        cmake --build "$src/build-bench" --target flyio-image-manager -j"$(nproc)" >/dev/null
        bin=$src/build-bench/flyio-image-manager
fi
if ! "$bin" extract --help >/dev/null 2>&1; then
        echo "extract_bench: '$bin extract' does not work (set FIM_BIN?)" >&2
        exit 1
fi

# --- the tarballs, once ---------------------------------------------------------------
# The large one is the benchmark proper; the small one (about half of it) is there to
# show that peak RSS does not grow with the archive.
mkdir -p "$cache"
build_tarball() {
        local tarball=$1 with_bin=$2 stage=$cache/stage
        shift 2
        [ -f "$tarball" ] && return
        rm -rf "$stage"
        mkdir -p "$stage/usr/bin" "$stage/usr/lib/x86_64-linux-gnu" "$stage/usr/share"
        for d in "$@"; do
                [ -e "$d" ] || continue
                mkdir -p "$stage$(dirname "$d")"
                cp -a "$d" "$stage$d"
        done
        if [ "$with_bin" = yes ]; then
                (cd /usr/bin && find . -maxdepth 1 \( -type l -o \( -type f -size -2M \) \) -print0 |
                        cpio -0 -pdm --quiet "$stage/usr/bin")
        fi
        ln -s usr/bin "$stage/bin"
        ln -s usr/lib "$stage/lib"
        tar --format=pax --numeric-owner -C "$stage" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$stage"
}
build_tarball "$cache/rootfs.tar" yes /etc /usr/sbin /usr/include /usr/lib/python3.11 \
        /usr/lib/x86_64-linux-gnu/perl /usr/lib/x86_64-linux-gnu/gconv /usr/share/perl \
        /usr/share/zoneinfo
build_tarball "$cache/rootfs-small.tar" no /etc /usr/sbin /usr/include /usr/share/zoneinfo

compressed() {
        local tarball=$1
        case $compress in
        none) echo "$tarball" ;;
        gz) [ -f "$tarball.gz" ] || gzip -c "$tarball" >"$tarball.gz"; echo "$tarball.gz" ;;
        xz) [ -f "$tarball.xz" ] || xz -T0 -c "$tarball" >"$tarball.xz"; echo "$tarball.xz" ;;
        zst) [ -f "$tarball.zst" ] || zstd -q -T0 -c "$tarball" >"$tarball.zst"; echo "$tarball.zst" ;;
        *) echo "extract_bench: COMPRESS must be none, gz, xz or zst" >&2; exit 1 ;;
        esac
}

# --- the runs -------------------------------------------------------------------------
declare -A times cpu rss
run() {
        local name=$1
        shift
        rm -rf "$out"
        mkdir -p "$out"
        sync
        /usr/bin/time -f "%e %U %S %M" -o "$cache/time.txt" "$@" >/dev/null
        read -r t u s m <"$cache/time.txt"
        times[$name]="${times[$name]:-} $t"
        cpu[$name]="${cpu[$name]:-} $(awk -v u="$u" -v s="$s" 'BEGIN {print u + s}')"
        if [ "$m" -gt "${rss[$name]:-0}" ]; then rss[$name]=$m; fi
}
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
stat3() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR] = $1} END {printf "%s %s", v[1], v[NR]}'; }

declare -A summary
for size in small large; do
        tarball=$cache/rootfs.tar
        [ "$size" = small ] && tarball=$cache/rootfs-small.tar
        input=$(compressed "$tarball")
        size_mib=$(($(stat -c %s "$tarball") >> 20))
        entries=$(tar -tf "$tarball" | wc -l)
        echo
        echo "extract_bench: $size: $(basename "$input"), $size_mib MiB uncompressed, $entries" \
                "entries, $rounds rounds, into $(mkdir -p "$out" && df --output=fstype "$out" |
                tail -1) at $out"
        times=() cpu=() rss=()
        for ((i = 1; i <= rounds; i++)); do
                run ours "$bin" extract --tar "$input" --root "$out"
                run gnu-tar tar --numeric-owner -xpf "$input" -C "$out"
                run bsdtar bsdtar --numeric-owner -xpf "$input" -C "$out"
        done
        rm -rf "$out"

        printf '%-8s %9s %7s %7s %11s %14s\n' tool median_s min_s max_s median_cpu_s peak_rss_kib
        for name in ours gnu-tar bsdtar; do
                read -r lo hi <<<"$(echo "${times[$name]}" | stat3)"
                printf '%-8s %9s %7s %7s %11s %14s\n' "$name" "$(echo "${times[$name]}" | median)" \
                        "$lo" "$hi" "$(echo "${cpu[$name]}" | median)" "${rss[$name]}"
        done
        for what in times cpu; do
                declare -n m=$what
                ours=$(echo "${m[ours]}" | median)
                gnu=$(echo "${m[gnu-tar]}" | median)
                bsd=$(echo "${m[bsdtar]}" | median)
                awk -v w="$what" -v o="$ours" -v g="$gnu" -v b="$bsd" 'BEGIN {
                        printf "ratio ours/gnu-tar (%s): %.2f\nratio ours/bsdtar  (%s): %.2f\n",
                                w == "times" ? "wall" : "cpu", o / g, w == "times" ? "wall" : "cpu", o / b }'
                unset -n m
        done
        summary[$size]="$size_mib MiB, $entries entries: ${rss[ours]} KiB"
done
echo
echo "peak RSS of ours: small ${summary[small]}; large ${summary[large]}"
