#!/usr/bin/env bash
# Build the extractor fuzzer with clang (libFuzzer + ASan + UBSan) into build-fuzz/ and run
# it for SECONDS (default 120) on a seed corpus generated at run time: the hostile and
# valid archives of tests/extract/make_corpus.py plus small archives from GNU tar and
# bsdtar in every format they write. Fails on any crash, leak, timeout or sanitizer report,
# and on an input that makes the extractor hold too much heap at once (see fuzz_extract.c);
# the offending input lands in build-fuzz/fuzz-artifacts/.
#
# Usage: tests/fuzz/run.sh [SECONDS]
# Runs as root (the extractor chowns). The evolving corpus is kept in tests/fuzz/corpus-run/
# (ignored by git) so that later runs start where earlier ones stopped. The seeds' attacks
# and absolute links aim at a sentinel tree at FIM_FUZZ_SENTINEL (default
# /tmp/fim-fuzz-sentinel), which the fuzzer creates and checks after every input.
set -euo pipefail

secs=${1:-120}
src=$(cd "$(dirname "$0")/../.." && pwd)
build=$src/build-fuzz
seeds=$build/fuzz-seeds
corpus=$src/tests/fuzz/corpus-run
artifacts=$build/fuzz-artifacts
max_len=65536
export FIM_FUZZ_SENTINEL=${FIM_FUZZ_SENTINEL:-/tmp/fim-fuzz-sentinel}

CC=clang cmake -S "$src" -B "$build" -DFIM_FUZZ=ON -DFIM_SANITIZE=ON \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" --target fuzz_extract -j"$(nproc)"

# --- seeds ----------------------------------------------------------------------------
rm -rf "$seeds"
mkdir -p "$seeds/all" "$corpus" "$artifacts"
python3 "$src/tests/extract/make_corpus.py" "$seeds/all" --sentinel "$FIM_FUZZ_SENTINEL"
tree=$seeds/tree
mkdir -p "$tree/d/e"
echo hello >"$tree/d/f"
ln "$tree/d/f" "$tree/d/hard"
ln -s ../d/f "$tree/d/e/rel"
ln -s "$FIM_FUZZ_SENTINEL/etc/passwd" "$tree/abs"
ln -s "$FIM_FUZZ_SENTINEL" "$tree/d/sent"
chmod 4755 "$tree/d/f"
truncate -s 64K "$tree/sparse"
printf x | dd of="$tree/sparse" bs=1 seek=40000 conv=notrunc status=none
python3 -c "import os,sys; os.setxattr(sys.argv[1], 'user.k', b'v')" "$tree/d/f"
for fmt in gnu oldgnu pax posix ustar v7; do
        tar --format=$fmt --sparse --xattrs -C "$tree" -cf "$seeds/all/gnutar-$fmt.tar" . \
                2>/dev/null || true
done
for fmt in pax ustar gnutar v7; do
        bsdtar --format $fmt -C "$tree" -cf "$seeds/all/bsdtar-$fmt.tar" . 2>/dev/null || true
done
tar --format=pax -C "$tree" -czf "$seeds/all/gnutar.tar.gz" .
tar --format=pax -C "$tree" -cJf "$seeds/all/gnutar.tar.xz" .
tar --format=pax -C "$tree" --zstd -cf "$seeds/all/gnutar.tar.zst" .
rm -rf "$tree"
# Larger seeds would only be cut at max_len; keep the small ones.
mkdir -p "$seeds/small"
find "$seeds/all" -type f -size -$((max_len / 1024))k -exec cp {} "$seeds/small/" \;
echo "fuzz: $(ls "$seeds/small" | wc -l) seeds, $(ls "$corpus" | wc -l) corpus entries, ${secs}s"

# --- run ------------------------------------------------------------------------------
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
"$build/tests/fuzz/fuzz_extract" \
        -max_total_time="$secs" -max_len=$max_len -timeout=10 -rss_limit_mb=2048 \
        -dict="$src/tests/fuzz/tar.dict" -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "$corpus" "$seeds/small"
