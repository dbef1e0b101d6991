#!/usr/bin/env bash
# Download benchmark: our S3 client (single stream and parallel ranged parts) against
# `curl --aws-sigv4` on the local S3Proxy, plus our peak RSS for a 512 MiB and a 64 MiB
# object to show that memory does not grow with the object.
#
#   tests/bench/download_bench.sh [ROUNDS]          # default 3 rounds
#
# Two settings, in one run:
#   loopback      straight to S3Proxy: the disk and the CPU are the limit, not the network;
#   link          the 512 MiB object through tests/bench/throttle_relay.py, which limits each
#                 connection to FIM_BENCH_LINK_MIBS MiB/s, as S3 serves one connection: the
#                 network is the limit, as it is against a real S3.
#
# Environment:
#   FIM_BUILD_DIR     build tree with flyio-image-manager (default: build)
#   FIM_BENCH_DIR     where the source objects and downloads go (default: /tmp/fim-bench)
#   FIM_BENCH_PARALLEL / FIM_BENCH_PART_SIZE   parallel settings (default 4 and 8M)
#   FIM_BENCH_LINK_MIBS   per-connection limit of the link setting (default 64; 0 skips it)
#   FIM_SERVICES_DIR, FIM_S3_PORT              passed to tests/infra/services.sh
#
# S3Proxy is started through tests/infra/services.sh when services.env is missing. The
# objects are generated and uploaded once and reused by later runs (checked with a HEAD).
# Ours hashes (SHA-256, on a thread of its own) and fsyncs what it downloads; curl only
# writes. Two more rows give curl part of that work, so the comparison can be read several
# ways: "curl + sync" (curl, then `sync FILE`, an fsync of the file) and "curl + sha256sum"
# (a separate hashing pass; coreutils' sha256sum is several times slower than OpenSSL's
# SHA-256 here). The CPU columns show why loopback and link differ: on loopback the client
# and S3Proxy share the machine's cores, and SHA-256 alone costs about 0.3 s of CPU per
# 512 MiB, more than half of what plain curl spends on the whole transfer.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ROUNDS=${1:-3}
BUILD=${FIM_BUILD_DIR:-$ROOT/build}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
WORK=${FIM_BENCH_DIR:-/tmp/fim-bench}
PARALLEL=${FIM_BENCH_PARALLEL:-4}
PART_SIZE=${FIM_BENCH_PART_SIZE:-8M}
LINK_MIBS=${FIM_BENCH_LINK_MIBS:-64}
BUCKET=fim-bench
SERVICES_ENV=${FIM_SERVICES_DIR:-/tmp/fim-services}/services.env

die() {
        echo "download_bench: $*" >&2
        exit 1
}

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ $LINK_MIBS =~ ^[0-9]+$ ]] || die "FIM_BENCH_LINK_MIBS must be a whole number of MiB/s"
[ -x /usr/bin/time ] || die "/usr/bin/time is missing (apt-get install time)"
mkdir -p "$WORK"

# ---- S3 ---------------------------------------------------------------------------------
if [ ! -f "$SERVICES_ENV" ] || ! bash "$ROOT/tests/infra/services.sh" status 2>/dev/null |
        grep -q '^s3 *up'; then
        bash "$ROOT/tests/infra/services.sh" start s3 >&2
fi
# shellcheck source=/dev/null
. "$SERVICES_ENV"
ENDPOINT=$S3_ENDPOINT # where the runs go: S3Proxy, or the relay in front of it

SIG=(--aws-sigv4 "aws:amz:${AWS_REGION:-us-east-1}:s3" -u "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY"
        -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD')

# ---- the download command ---------------------------------------------------------------
FIM=("$BUILD/flyio-image-manager" download)
[ -x "${FIM[0]}" ] || die "no ${FIM[0]}: build first (cmake --build $BUILD)"

# ---- objects ----------------------------------------------------------------------------
object_exists() {
        [ "$(curl -s -o /dev/null -w '%{http_code}' -I "${SIG[@]}" "$S3_ENDPOINT/$BUCKET/$1")" = 200 ]
}

ensure_object() { # NAME MIB
        local name=$1 mib=$2 src=$WORK/$1.src
        object_exists "$name" && [ -f "$src" ] && return 0
        echo "uploading $name ($mib MiB, once)" >&2
        head -c "$((mib * 1024 * 1024))" /dev/urandom >"$src"
        curl -sf "${SIG[@]}" -X PUT "$S3_ENDPOINT/$BUCKET" -o /dev/null || true # exists: fine
        curl -sSf "${SIG[@]}" -T "$src" "$S3_ENDPOINT/$BUCKET/$name" -o /dev/null
}

ensure_object big.bin 512
ensure_object small.bin 64

# ---- runs -------------------------------------------------------------------------------
# Each run prints "SECONDS RSS_KIB CLIENT_CPU_S SERVER_CPU_S" on stdout; the output file is
# removed afterwards. CPU is user + system time: the client's (with its children), and
# S3Proxy's over the same run, read from /proc ("-" when its pid is unknown). On loopback
# the two together show how much of the machine's cores a run kept busy.
S3PROXY_PID=$(cat "${FIM_SERVICES_DIR:-/tmp/fim-services}/s3.pid" 2>/dev/null || true)
[[ $S3PROXY_PID =~ ^[0-9]+$ ]] && [ -r "/proc/$S3PROXY_PID/stat" ] || S3PROXY_PID=
CLK_TCK=$(getconf CLK_TCK)

server_ticks() { # utime + stime of S3Proxy, in clock ticks
        [ -n "$S3PROXY_PID" ] || return 0
        # The fields after the command name, which is in parentheses and may hold spaces.
        sed 's/.*) //' "/proc/$S3PROXY_PID/stat" | awk '{ print $12 + $13 }'
}

# Print "SECONDS RSS CLIENT_CPU SERVER_CPU" from /usr/bin/time's "%e %M %U %S" and the
# server's ticks before the run.
report_run() { # STATS_FILE TICKS_BEFORE
        local after
        after=$(server_ticks)
        awk -v b="$2" -v a="$after" -v hz="$CLK_TCK" '{
                printf "%s %s %.2f %s\n", $1, $2, $3 + $4, (a == "" ? "-" : sprintf("%.2f", (a - b) / hz))
        }' "$1"
}

# Every run starts from the same state: the previous run's output is deleted, and the
# deletion's writeback and discards (this disk is mounted with `discard`) are let through
# before the clock starts. Otherwise whichever client runs right after a 512 MiB delete pays
# for it: measured here, the same download took 0.55 s settled and 1.1-1.7 s right after one.
settle() {
        sync
        sleep 1
}

run_ours() { # KEY PARALLEL
        local out=$WORK/out.bin stats=$WORK/time.txt ticks
        rm -f "$out" "$out.part" "$out.part.meta"
        settle
        ticks=$(server_ticks)
        S3_ENDPOINT=$ENDPOINT /usr/bin/time -f '%e %M %U %S' -o "$stats" "${FIM[@]}" \
                --bucket "$BUCKET" --key "$1" --output "$out" --parallel "$2" \
                --part-size "$PART_SIZE" >"$WORK/ours.txt"
        sha=$(sed -n 's/.* sha256=\([0-9a-f]*\).*/\1/p' "$WORK/ours.txt")
        [ "$sha" = "$(cat "$WORK/${1%.bin}.sha")" ] || die "wrong SHA-256 from our download of $1"
        rm -f "$out"
        report_run "$stats" "$ticks"
}

run_curl() { # KEY [hash|sync]
        local out=$WORK/out.bin stats=$WORK/time.txt ticks
        rm -f "$out"
        settle
        ticks=$(server_ticks)
        if [ "${2:-}" = sync ]; then
                # shellcheck disable=SC2016 # expanded by the inner bash
                /usr/bin/time -f '%e %M %U %S' -o "$stats" bash -c \
                        'curl -sSf "${@:3}" -o "$1" "$2" && sync "$1"' _ \
                        "$out" "$ENDPOINT/$BUCKET/$1" "${SIG[@]}"
        elif [ "${2:-}" = hash ]; then
                # shellcheck disable=SC2016 # expanded by the inner bash
                /usr/bin/time -f '%e %M %U %S' -o "$stats" bash -c \
                        'curl -sSf "${@:3}" -o "$1" "$2" && sha256sum "$1" >/dev/null' _ \
                        "$out" "$ENDPOINT/$BUCKET/$1" "${SIG[@]}"
        else
                /usr/bin/time -f '%e %M %U %S' -o "$stats" curl -sSf "${SIG[@]}" -o "$out" \
                        "$ENDPOINT/$BUCKET/$1"
        fi
        rm -f "$out"
        report_run "$stats" "$ticks"
}

median() {
        sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

for name in big small; do
        if [ ! "$WORK/$name.sha" -nt "$WORK/$name.bin.src" ]; then
                sha256sum "$WORK/$name.bin.src" | cut -d' ' -f1 >"$WORK/$name.sha"
        fi
done

# One timed run of client KIND on object NAME, recorded under SETTING.KIND (SETTING
# defaults to NAME).
run_kind() { # NAME KIND [SETTING]
        local t m c s key=${3:-$1}.$2
        case $2 in
        single) read -r t m c s < <(run_ours "$1.bin" 1) ;;
        parallel) read -r t m c s < <(run_ours "$1.bin" "$PARALLEL") ;;
        curl) read -r t m c s < <(run_curl "$1.bin") ;;
        curlsync) read -r t m c s < <(run_curl "$1.bin" sync); m= ;;
        curlhash) read -r t m c s < <(run_curl "$1.bin" hash); m= ;;
        esac
        times[$key]+="$t "
        cpu[$key]+="$c "
        [ "$s" = - ] || server_cpu[$key]+="$s "
        [ -z "$m" ] || rss[$key]+="$m "
}

# The clients take turns going first: round R starts with client R (mod 5). A run pays for
# what the one before it left behind (here, a run right after a 512 MiB file of curl's was
# written and deleted took 2-3 times as long, whichever client it was), so a fixed order
# would always bill the same client for it.
KINDS=(single parallel curl curlsync curlhash)
declare -A times rss cpu server_cpu
for round in $(seq 1 "$ROUNDS"); do
        echo "round $round/$ROUNDS (loopback)" >&2
        for name in big small; do
                for i in 0 1 2 3 4; do
                        run_kind "$name" "${KINDS[$(((round - 1 + i) % 5))]}"
                done
        done
done

# The link setting: the same clients through the relay (curl + sha256sum adds nothing here).
relay_pid=
stop_relay() {
        [ -z "$relay_pid" ] || kill "$relay_pid" 2>/dev/null || true
}
trap stop_relay EXIT
if [ "$LINK_MIBS" -gt 0 ]; then
        relay_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        coproc RELAY { exec python3 "$HERE/throttle_relay.py" --listen "$relay_port" \
                --upstream "${S3_ENDPOINT#http://}" --rate "$LINK_MIBS"; }
        relay_pid=$RELAY_PID
        read -r ready <&"${RELAY[0]}" && [ "$ready" = ready ] || die "the throttling relay did not start"
        ENDPOINT=http://127.0.0.1:$relay_port
        LINK_KINDS=(single parallel curl curlsync)
        for round in $(seq 1 "$ROUNDS"); do
                echo "round $round/$ROUNDS (link, $LINK_MIBS MiB/s per connection)" >&2
                for i in 0 1 2 3; do
                        run_kind big "${LINK_KINDS[$(((round - 1 + i) % 4))]}" link
                done
        done
        stop_relay
        ENDPOINT=$S3_ENDPOINT
fi

# ---- report -----------------------------------------------------------------------------
printf '\nS3Proxy at %s, %s round(s), parallel=%s part-size=%s\n' "$S3_ENDPOINT" "$ROUNDS" \
        "$PARALLEL" "$PART_SIZE"
[ "$LINK_MIBS" -gt 0 ] && printf 'link: the 512 MiB object with each connection limited to %s MiB/s\n' \
        "$LINK_MIBS"
printf '%-8s %-22s %10s %10s %12s %14s %10s %10s\n' object client median_s MiB/s vs_curl \
        peak_rss_KiB cpu_s s3_cpu_s
settings=(big small)
[ "$LINK_MIBS" -gt 0 ] && settings+=(link)
for name in "${settings[@]}"; do
        mib=$([ $name = small ] && echo 64 || echo 512)
        curl_med=$(tr ' ' '\n' <<<"${times[$name.curl]}" | grep . | median)
        for kind in single parallel curl curlsync curlhash; do
                [ -n "${times[$name.$kind]:-}" ] || continue
                med=$(tr ' ' '\n' <<<"${times[$name.$kind]}" | grep . | median)
                peak=-
                [ -n "${rss[$name.$kind]:-}" ] && peak=$(tr ' ' '\n' <<<"${rss[$name.$kind]}" | grep . | sort -n | tail -1)
                ccpu=$(tr ' ' '\n' <<<"${cpu[$name.$kind]}" | grep . | median)
                scpu=-
                [ -n "${server_cpu[$name.$kind]:-}" ] && scpu=$(tr ' ' '\n' <<<"${server_cpu[$name.$kind]}" | grep . | median)
                label=$kind
                case $kind in
                single) label="ours, 1 stream" ;;
                parallel) label="ours, $PARALLEL parts" ;;
                curl) label="curl --aws-sigv4" ;;
                curlsync) label="curl + sync" ;;
                curlhash) label="curl + sha256sum" ;;
                esac
                awk -v n="$name" -v l="$label" -v m="$med" -v c="$curl_med" -v s="$mib" -v p="$peak" \
                        -v cc="$ccpu" -v sc="$scpu" \
                        'BEGIN { printf "%-8s %-22s %10.2f %10.1f %11.2fx %14s %10s %10s\n", n "(" s "M)", l, m, (m > 0 ? s / m : 0), (m > 0 ? c / m : 0), p, cc, sc }'
        done
done
echo "vs_curl > 1 means faster than plain curl (which neither hashes nor fsyncs)."
echo "cpu_s: the client's user + system time; s3_cpu_s: S3Proxy's over the same run (medians)."
echo "On loopback, client and server share this machine's $(nproc) cores."
