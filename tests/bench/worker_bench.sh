#!/usr/bin/env bash
# Worker benchmark: what the worker machinery (consume, claim, transitions, outbox handoff,
# offset bookkeeping) costs per job, against a bare librdkafka consume-and-commit loop over
# the same messages in the same run.
#
#   tests/bench/worker_bench.sh [N]          # default 2000 jobs
#
# Phases, each with a fresh worker process that has joined its groups before the clock starts:
#   new jobs   N new requests flow download -> unpack -> activate (three sample stages from
#              tests/worker/helper_worker.c: FSM runs of two transitions whose work is one
#              recorded INSERT each, handoffs through the outbox)
#   fast path  the same N requests to each stage again (the handoff payloads from the outbox
#              for unpack and activate): every key is complete, so each message is a claim
#              that finds the finished run and an offset store
#   bare       a plain consumer, joined to its group before the clock starts like the
#              workers, reads the same 3N messages as the fast path (the same lines produced
#              the same way to three topics of their own) and stores every offset with
#              auto-commit (the worker's commit strategy), then commits
# Every phase is timed alike: from the first produce to the moment the group had committed
# all its messages (auto.commit.interval.ms=100 for all, so +-0.1 s; producing is inside the
# clock for every phase). PostgreSQL round trips are counted in the worker process by an
# LD_PRELOAD shim around PQexec and PQexecParams: everything the process did (claims, events,
# outbox, lease keeper, publisher).
#
# Environment:
#   FIM_BUILD_DIR     build tree with flyio-image-manager and tests/worker/test_worker
#                     (default: build)
#   FIM_BENCH_DIR     scratch directory (default: /tmp/fim-bench-worker)
#   FIM_SERVICES_DIR  where services.env is (default /tmp/fim-services); PostgreSQL and Kafka
#                     are started there with tests/infra/services.sh when it has none
#   DOWNLOAD_QUEUE_SIZE, UNPACK_QUEUE_SIZE, ACTIVATE_QUEUE_SIZE   pool sizes (defaults 5/2/4)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
N=${1:-2000}
BUILD=${FIM_BUILD_DIR:-$ROOT/build}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
WORK=${FIM_BENCH_DIR:-/tmp/fim-bench-worker}
SERVICES_ENV=${FIM_SERVICES_DIR:-/tmp/fim-services}/services.env
FIM=$BUILD/flyio-image-manager
WORKER=$BUILD/tests/worker/test_worker

die() {
        echo "worker_bench: $*" >&2
        exit 1
}

[[ $N =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer"
[ -x "$FIM" ] && [ -x "$WORKER" ] || die "build first: cmake --build $BUILD (needs $FIM and $WORKER)"
mkdir -p "$WORK"

# ---- services and tools -----------------------------------------------------------------
# An existing services.env is used as it is (its ports may not be services.sh's defaults, so
# `services.sh status` cannot judge it); the services are started only when there is none.
if [ ! -f "$SERVICES_ENV" ]; then
        bash "$ROOT/tests/infra/services.sh" start pg kafka >&2
fi
# shellcheck source=/dev/null
. "$SERVICES_ENV"
[ -n "${FIM_PG_ADMIN_URL:-}" ] && psql "$FIM_PG_ADMIN_URL" -qAtc 'SELECT 1' >/dev/null 2>&1 ||
        die "PostgreSQL of $SERVICES_ENV is not reachable: tests/infra/services.sh start pg"
[ -n "${KAFKA_BROKERS:-}" ] && kcat -b "$KAFKA_BROKERS" -L -m 5 >/dev/null 2>&1 ||
        die "Kafka of $SERVICES_ENV is not reachable: tests/infra/services.sh start kafka"

cc -std=c17 -D_GNU_SOURCE -O2 -o "$WORK/kafka_bench" "$HERE/kafka_bench.c" \
        $(pkg-config --cflags --libs rdkafka)
cc -std=c17 -D_GNU_SOURCE -O2 -shared -fPIC -o "$WORK/pqcount.so" \
        "$HERE/kafka_bench_pqcount.c" $(pkg-config --cflags libpq) -ldl
KB=$WORK/kafka_bench

# ---- a scratch database and topics ------------------------------------------------------
PREFIX=wb$$
DBNAME=fim_bench_$$
WPID=
cleanup() {
        [ -z "$WPID" ] || kill -KILL "$WPID" 2>/dev/null || true
        psql "$FIM_PG_ADMIN_URL" -qAtc "DROP DATABASE IF EXISTS $DBNAME WITH (FORCE)" \
                >/dev/null 2>&1 || true
        bash "$ROOT/tests/infra/kafka-topics.sh" delete "$PREFIX" >/dev/null 2>&1 || true
        bash "$ROOT/tests/infra/kafka-topics.sh" delete "${PREFIX}x" >/dev/null 2>&1 || true
}
trap cleanup EXIT

psql "$FIM_PG_ADMIN_URL" -qAtc "CREATE DATABASE $DBNAME" >/dev/null
export DATABASE_URL="${FIM_PG_ADMIN_URL%/*}/$DBNAME"
export KAFKA_TOPIC_PREFIX=$PREFIX HOST_ID=bench-host LOG_LEVEL=${FIM_BENCH_LOG_LEVEL:-warning}
export FIM_KAFKA_CONSUMER_OPTIONS="auto.commit.interval.ms=100${FIM_BENCH_CONSUMER_OPTIONS:+;$FIM_BENCH_CONSUMER_OPTIONS}"
unset FIM_CONFIG FIM_TEST_STAGES
"$FIM" migrate >/dev/null
psql "$DATABASE_URL" -qAtX -v ON_ERROR_STOP=1 -c \
        "CREATE TABLE sample_calls (stage text, image_id text, run_id text, pid int,
                                    at timestamptz DEFAULT clock_timestamp());
         CREATE TABLE sample_effects (stage text, image_id text, run_id text);
         CREATE TABLE sample_fail (image_id text PRIMARY KEY)"
bash "$ROOT/tests/infra/kafka-topics.sh" create "$PREFIX" 3 >/dev/null
bash "$ROOT/tests/infra/kafka-topics.sh" create "${PREFIX}x" 3 >/dev/null
sql() { psql "$DATABASE_URL" -qAtX -v ON_ERROR_STOP=1 -c "$1"; }

for i in $(seq 1 "$N"); do
        printf 'bench-%d\t{"image_id":"bench-%d","s3_key":"bench/%d.tar"}\n' "$i" "$i" "$i"
done >"$WORK/download.txt"

start_worker() {
        FIM_BENCH_PQCOUNT_FILE=$WORK/pq.$1 LD_PRELOAD=$WORK/pqcount.so \
                "$WORKER" worker 2>"$WORK/worker.$1.log" &
        WPID=$!
        "$KB" stable "$KAFKA_BROKERS" 60000 "$PREFIX.download" "$PREFIX.unpack" \
                "$PREFIX.activate"
}

stop_worker() {
        kill -TERM "$WPID"
        wait "$WPID" || die "worker exited with status $? (log: $WORK/worker.$1.log)"
        WPID=
}

now_ms() { date +%s%3N; }

# "GROUP MS" lines from kafka_bench wait -> MS of one group.
ms_of() { awk -v g="$PREFIX.$2" '$1 == g { print $2 }' "$1"; }
rate() { awk -v n="$1" -v ms="$2" 'BEGIN { printf "%.0f", n * 1000 / (ms > 0 ? ms : 1) }'; }
secs() { awk -v ms="$1" 'BEGIN { printf "%.2f", ms / 1000 }'; }
per() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a / b }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / (b > 0 ? b : 1) }'; }

# ---- phase 1: new jobs ------------------------------------------------------------------
echo "phase 1: $N new jobs" >&2
start_worker new
t0=$(now_ms)
"$KB" produce "$KAFKA_BROKERS" "$PREFIX.download" <"$WORK/download.txt"
"$KB" wait "$KAFKA_BROKERS" "$t0" 600000 "$PREFIX.download=$PREFIX.download:$N" \
        "$PREFIX.unpack=$PREFIX.unpack:$N" "$PREFIX.activate=$PREFIX.activate:$N" \
        >"$WORK/times.new"
stop_worker new
[ "$(sql "SELECT count(*) FROM fsm_runs WHERE status = 'complete'")" = $((3 * N)) ] ||
        die "phase 1: not every run completed"
pq_new=$(cat "$WORK/pq.new")

# ---- phase 2: the same jobs again (idempotent fast path) --------------------------------
echo "phase 2: $N already-complete jobs per stage" >&2
sql "SELECT message_key || E'\t' || payload FROM outbox WHERE topic = '$PREFIX.unpack'" \
        >"$WORK/unpack.txt"
sql "SELECT message_key || E'\t' || payload FROM outbox WHERE topic = '$PREFIX.activate'" \
        >"$WORK/activate.txt"
start_worker fast
t0=$(now_ms)
"$KB" produce "$KAFKA_BROKERS" "$PREFIX.download" <"$WORK/download.txt"
"$KB" produce "$KAFKA_BROKERS" "$PREFIX.unpack" <"$WORK/unpack.txt"
"$KB" produce "$KAFKA_BROKERS" "$PREFIX.activate" <"$WORK/activate.txt"
"$KB" wait "$KAFKA_BROKERS" "$t0" 600000 "$PREFIX.download=$PREFIX.download:$((2 * N))" \
        "$PREFIX.unpack=$PREFIX.unpack:$((2 * N))" \
        "$PREFIX.activate=$PREFIX.activate:$((2 * N))" >"$WORK/times.fast"
stop_worker fast
[ "$(sql "SELECT count(*) FROM fsm_runs")" = $((3 * N)) ] || die "phase 2 started new runs"
[ "$(sql "SELECT count(*) FROM outbox")" = $((2 * N)) ] || die "phase 2 wrote new handoffs"
pq_fast=$(cat "$WORK/pq.fast")

# ---- phase 3: bare librdkafka over the fast path's messages -----------------------------
echo "phase 3: bare consume-and-commit over $((3 * N)) messages" >&2
BARE=${PREFIX}x
"$KB" bare "$KAFKA_BROKERS" "$BARE.bare" $((3 * N)) "$BARE.download" "$BARE.unpack" \
        "$BARE.activate" >"$WORK/bare.out" &
WPID=$!
"$KB" stable "$KAFKA_BROKERS" 60000 "$BARE.bare"
t0=$(now_ms)
"$KB" produce "$KAFKA_BROKERS" "$BARE.download" <"$WORK/download.txt"
"$KB" produce "$KAFKA_BROKERS" "$BARE.unpack" <"$WORK/unpack.txt"
"$KB" produce "$KAFKA_BROKERS" "$BARE.activate" <"$WORK/activate.txt"
"$KB" wait "$KAFKA_BROKERS" "$t0" 600000 "$BARE.bare=$BARE.download:$N" \
        "$BARE.bare=$BARE.unpack:$N" "$BARE.bare=$BARE.activate:$N" >"$WORK/times.bare"
wait "$WPID" || die "bare consumer exited with status $?"
WPID=
bare_n=$((3 * N))
bare_ms=$(awk 'BEGIN { m = 0 } $2 > m { m = $2 } END { print m }' "$WORK/times.bare")
read -r _ _ bare_inner_ms <"$WORK/bare.out"

# ---- report -----------------------------------------------------------------------------
printf '\nworker bench: N=%d, 3 sample stages, pools %s/%s/%s threads, librdkafka %s\n' "$N" \
        "${DOWNLOAD_QUEUE_SIZE:-5}" "${UNPACK_QUEUE_SIZE:-2}" "${ACTIVATE_QUEUE_SIZE:-4}" \
        "$(pkg-config --modversion rdkafka)"
printf '%-12s %-10s %8s %9s %9s\n' phase stage messages seconds "msgs/s"
for s in download unpack activate; do
        ms=$(ms_of "$WORK/times.new" $s)
        printf '%-12s %-10s %8d %9s %9s\n' "new jobs" $s "$N" "$(secs "$ms")" "$(rate "$N" "$ms")"
done
ms_new=$(ms_of "$WORK/times.new" activate)
printf '%-12s %-10s %8d %9s %9s\n' "new jobs" end-to-end "$N" "$(secs "$ms_new")" \
        "$(rate "$N" "$ms_new")"
ms_fast=0
for s in download unpack activate; do
        ms=$(ms_of "$WORK/times.fast" $s)
        [ "$ms" -gt "$ms_fast" ] && ms_fast=$ms
        printf '%-12s %-10s %8d %9s %9s\n' "fast path" $s "$N" "$(secs "$ms")" "$(rate "$N" "$ms")"
done
printf '%-12s %-10s %8d %9s %9s\n' "fast path" "all" $((3 * N)) "$(secs "$ms_fast")" \
        "$(rate $((3 * N)) "$ms_fast")"
printf '%-12s %-10s %8d %9s %9s\n' "bare" "all" "$bare_n" "$(secs "$bare_ms")" \
        "$(rate "$bare_n" "$bare_ms")"
printf '(bare consumer alone, first message to final commit: %s s)\n' "$(secs "$bare_inner_ms")"
printf '\nPostgreSQL round trips (whole worker process):\n'
printf '  new jobs:  %d total, %s per job (3 stage runs), %s per stage run\n' "$pq_new" \
        "$(per "$pq_new" "$N")" "$(per "$pq_new" $((3 * N)))"
printf '  fast path: %d total, %s per message\n' "$pq_fast" "$(per "$pq_fast" $((3 * N)))"
printf '\nratio worker/bare (messages per second, both timed from the first produce):\n'
printf '  fast path, all stages: %s\n' "$(ratio "$bare_ms" "$ms_fast")"
printf '  new jobs, per stage run (3N runs): %s\n' "$(ratio "$bare_ms" "$ms_new")"
printf '  new jobs, end to end (N jobs against 3N bare messages): %s\n' \
        "$(ratio "$bare_ms" $((3 * ms_new)))"
