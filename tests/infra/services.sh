#!/usr/bin/env bash
# Start and stop the real local services that the integration tests and the
# demo run against: PostgreSQL 15, S3Proxy (S3 API with real SigV4 checks)
# and a single-node Apache Kafka 4 broker in KRaft mode.
#
#   tests/infra/services.sh start [pg] [s3] [kafka]   # no names = all three
#   tests/infra/services.sh stop                      # everything, idempotent
#   tests/infra/services.sh status
#   tests/infra/services.sh env                       # print services.env
#   tests/infra/services.sh fetch [s3] [kafka]        # only fetch the jars into .cache
#
# After start, `source "$FIM_SERVICES_DIR/services.env"` (default
# /tmp/fim-services/services.env). It exports, for the services started:
#   DATABASE_URL, FIM_PG_ADMIN_URL (the postgres db, to create scratch dbs)
#   S3_ENDPOINT, S3_FORCE_PATH_STYLE, AWS_ACCESS_KEY_ID,
#     AWS_SECRET_ACCESS_KEY, AWS_REGION, S3_BUCKET (created)
#   S3_VHOST_ENDPOINT (http://localhost:PORT: a second S3Proxy on the same
#     objects that takes the bucket from the Host header, for tests of
#     virtual-host addressing)
#   KAFKA_BROKERS, FIM_KAFKA_GUEST_BROKERS (the address a qemu guest uses)
#   FIM_SERVICES_DIR
# Everything listens on 127.0.0.1 only. Knobs (environment, with defaults):
#   FIM_SERVICES_DIR=/tmp/fim-services  state: data dirs, logs, pid files
#   FIM_PG_PORT=55432  FIM_S3_PORT=19000  FIM_S3_VHOST_PORT=FIM_S3_PORT+1
#   FIM_KAFKA_PORT=19092
#   FIM_KAFKA_CONTROLLER_PORT=19093  FIM_KAFKA_GUEST_PORT=19094
#   FIM_KAFKA_GUEST_ADDR=10.0.2.100
#   FIM_PG_TIMEOUT=30  FIM_S3_TIMEOUT=60  FIM_KAFKA_TIMEOUT=90  (seconds)
# Logs: $FIM_SERVICES_DIR/{pg/postgres.log,s3/s3proxy.log,kafka/kafka.log}.
#
# Measured on the 2-core Debian 12 dev machine, wall clock (ranges: other
# builds were often loading both cores at the same time):
#
#   first run, empty ~/.m2 and .cache       48 s quiet, 88 s loaded
#     downloads 146 MB: s3proxy-lib 103 MB (237 jars), kafka-lib 43 MB (46);
#     the two Maven runs take turns (~/.m2 has no locking), so the second
#     service waits for the first one's download: pg 4-8 s, s3 37-68 s,
#     kafka 48-88 s. The first stop then takes 2-15 s while the JVMs write
#     their class-data archives (see cds_opts).
#   warm run (jars and archives cached)     3.6-7.3 s for all three
#     in parallel: pg 2-7 s, s3 1.5-4 s, kafka 3.6-6.6 s;
#     one at a time: pg 1.6-2 s, s3 0.9-5 s, kafka 2.9-8 s.
#     Without the class-data archives, measured alternately under the same
#     load: 10.6 and 13.3 s against 6.5 and 7.3 s with them.
#   already running                         0.1-0.3 s (checks, then reuses)
#   stop                                    0.4-2 s
#   kafka-topics.sh create                  1-1.5 s (2.7 s on the first call,
#                                           which compiles CreateTopics.java)
#
# Maven downloads dominate the first run (S3Proxy brings every cloud SDK it
# can proxy to). A fresh clone on the same machine copies the jars from ~/.m2
# in a few seconds and records new archives on its first stop.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

STATE=${FIM_SERVICES_DIR:-/tmp/fim-services}
CACHE=$ROOT/.cache

# The ports a running set was started with, so that status, stop and a later start find it
# without the caller repeating them (a port the caller sets still wins).
PORTS_FILE=$STATE/ports.env
if [ -f "$PORTS_FILE" ]; then
        while IFS='=' read -r var value; do
                case $var in
                FIM_PG_PORT | FIM_S3_PORT | FIM_S3_VHOST_PORT | FIM_KAFKA_PORT | \
                        FIM_KAFKA_CONTROLLER_PORT | FIM_KAFKA_GUEST_PORT)
                        [[ "$value" =~ ^[0-9]+$ ]] && [ -z "${!var:-}" ] && export "$var=$value"
                        ;;
                esac
        done <"$PORTS_FILE"
fi

PG_PORT=${FIM_PG_PORT:-55432}
S3_PORT=${FIM_S3_PORT:-19000}
S3_VHOST_PORT=${FIM_S3_VHOST_PORT:-$((S3_PORT + 1))}
KAFKA_PORT=${FIM_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${FIM_KAFKA_CONTROLLER_PORT:-19093}
# A qemu guest with restricted user networking reaches the host's loopback
# only through a guestfwd address (see shared/notes/dm-in-vm.md), so the
# broker advertises that address on a listener of its own.
KAFKA_GUEST_PORT=${FIM_KAFKA_GUEST_PORT:-19094}
KAFKA_GUEST_ADDR=${FIM_KAFKA_GUEST_ADDR:-10.0.2.100}

PGBIN=/usr/lib/postgresql/15/bin
PG_OS_USER=postgres
PG_DB=fim_test

# Fixed, public test credentials: they protect nothing but make S3Proxy check
# real SigV4 signatures, so a signing bug in the worker fails the tests.
S3_ACCESS_KEY=AKIAFIMTEST000000001
S3_SECRET_KEY=fim-test-secret-key-not-a-real-one
S3_REGION=us-east-1
S3_BUCKET=fim-test-images

PG_TIMEOUT=${FIM_PG_TIMEOUT:-30}
S3_TIMEOUT=${FIM_S3_TIMEOUT:-60}
KAFKA_TIMEOUT=${FIM_KAFKA_TIMEOUT:-90}

# Small heaps and a quick-to-start JIT: the machine has 2 cores and the tests
# push little data, so start-up time matters more than peak throughput.
JVM_OPTS=(-Xms64m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1
          -Djava.awt.headless=true)

ALL_SERVICES=(pg s3 kafka)

# ---------------------------------------------------------------- helpers --

die() {
        printf 'services: %s\n' "$*" >&2
        exit 1
}

# Microseconds since the epoch, from bash itself (no fork per sample).
now_us() {
        local t=$EPOCHREALTIME
        echo "${t/./}"
}

# "12.3s" from a start timestamp taken with now_us.
elapsed() {
        local d=$(( $(now_us) - $1 ))
        printf '%d.%01ds' $(( d / 1000000 )) $(( d % 1000000 / 100000 ))
}

# Die with the last lines of a log, so a CI failure shows why at once.
fail_with_log() {
        local name=$1 log=$2
        shift 2
        {
                printf 'services: %s: %s\n' "$name" "$*"
                if [ -f "$log" ]; then
                        printf -- '--- last 40 lines of %s ---\n' "$log"
                        tail -n 40 "$log"
                        printf -- '--- end of %s ---\n' "$log"
                fi
        } >&2
        exit 1
}

# True when something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Die because PORT is taken, naming the process that holds it: several
# engineers run these services side by side on one machine.
die_port_busy() {
        local name=$1 port=$2 knob=$3 holder
        holder=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:.*' | head -n 1 || true)
        die "$name: port 127.0.0.1:$port is in use by another process${holder:+ ($holder)}; set $knob or stop it"
}

# True while PID exists and is not a zombie. kill -0 also succeeds on a
# zombie, and a killed service that was orphaned stays one until init gets
# round to reaping it, which is not instant here.
running() {
        local stat
        stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
        stat=${stat##*) }
        [ "${stat%% *}" != Z ]
}

# Print the pid recorded in $STATE/NAME.pid if that process is still alive
# and is still ours: a pid file left by a crash may name a recycled pid, and
# every service we start has our state dir on its command line.
live_pid() {
        local pidfile=$STATE/$1.pid pid
        [ -f "$pidfile" ] || return 1
        pid=$(<"$pidfile")
        [[ $pid =~ ^[0-9]+$ ]] || return 1
        [ -r "/proc/$pid/cmdline" ] || return 1
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$STATE" || return 1
        echo "$pid"
}

# Start a long-running command in its own session, so a Ctrl-C or hang-up
# aimed at the caller does not take the service down mid-test. The child
# writes its own pid before exec'ing, which stays right whether or not setsid
# has to fork. fd 9 is the start/stop lock: it must not leak into services.
launch() {
        local name=$1 log=$2
        shift 2
        rm -f "$STATE/$name.pid"
        # shellcheck disable=SC2016 # expanded by the inner bash, on purpose
        setsid bash -c 'echo $$ >"$0"; exec "$@"' "$STATE/$name.pid" "$@" \
                </dev/null >"$log" 2>&1 9>&- &
        local _
        for _ in $(seq 1 100); do
                [ -s "$STATE/$name.pid" ] && return 0
                sleep 0.05
        done
        fail_with_log "$name" "$log" "process did not start"
}

# Poll CHECK... every 0.25 s until it succeeds. Gives up after TIMEOUT
# seconds, or as soon as the service's process has died.
wait_ready() {
        local name=$1 log=$2 timeout=$3
        shift 3
        local deadline=$(( $(now_us) + timeout * 1000000 ))
        until "$@" >/dev/null 2>&1; do
                if ! live_pid "$name" >/dev/null; then
                        fail_with_log "$name" "$log" "process exited during start-up"
                fi
                if [ "$(now_us)" -gt "$deadline" ]; then
                        # A half-up JVM would hold the ports and make a retry
                        # fail on "port in use"; the log stays for a look.
                        stop_pid "$name" 5
                        fail_with_log "$name" "$log" "not ready after ${timeout}s"
                fi
                sleep 0.25
        done
}

# Fetch the runtime classpath described by POM into LIBDIR, once. The pom's
# hash is the cache stamp, so a version bump re-downloads, and the copy goes
# to a temporary directory first so an interrupted download is never taken
# for a complete one. Maven 3.8 does not lock ~/.m2, hence the flock around
# concurrent downloads (Kafka's and S3Proxy's share some artifacts).
fetch_jars() {
        local name=$1 pom=$2 lib=$3 log=$4
        local stamp
        stamp=$(sha256sum "$pom" | cut -c1-64)
        [ "$(cat "$lib/.stamp" 2>/dev/null)" = "$stamp" ] && return 0

        mkdir -p "$CACHE"
        local fd
        exec {fd}>"$CACHE/.mvn.lock"
        flock "$fd"
        if [ "$(cat "$lib/.stamp" 2>/dev/null)" != "$stamp" ]; then
                local tmp=$lib.tmp.$$
                rm -rf "$tmp"
                # The plugin is named with its full version so Maven does not
                # go looking for the newest one on every run.
                if ! mvn -B -q -ntp -f "$pom" \
                        org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
                        -DoutputDirectory="$tmp" -DincludeScope=runtime >"$log" 2>&1; then
                        rm -rf "$tmp"
                        fail_with_log "$name" "$log" "maven download of $pom failed"
                fi
                echo "$stamp" >"$tmp/.stamp"
                rm -rf "$lib"
                mv "$tmp" "$lib"
        fi
        exec {fd}>&-
}

# Write one service's lines of services.env; start assembles the file.
write_env() {
        local name=$1
        shift
        mkdir -p "$STATE/env.d"
        printf 'export %s\n' "$@" >"$STATE/env.d/$name.env"
}

# Class-data sharing for a JVM service. Loading and verifying thousands of
# classes is most of a JVM's start-up CPU; with a dynamic CDS archive of the
# classes a previous run used, the Kafka broker needs about half the CPU to
# come up (3.5 s -> 1.6 s measured). The first run records the archive when
# the JVM exits (stop sends SIGTERM); stop then moves it next to the jars, so
# it is dropped together with them when the pom changes. A stale or broken
# archive is only a warning: the JVM then starts without it.
#
# An archive only fits the JVM build that wrote it, so its name carries the
# build (libjvm's mtime): after a JDK update a new one is recorded instead of
# a stale one being ignored forever.
cds_archive() {
        local java tag
        java=$(readlink -f "$(command -v java)")
        tag=$(stat -c %Y "${java%/bin/java}/lib/server/libjvm.so" 2>/dev/null || echo 0)
        echo "$2/$1-$tag.jsa"
}

cds_opts() {
        local name=$1 lib=$2 archive
        archive=$(cds_archive "$name" "$lib")
        if [ -s "$archive" ]; then
                echo "-XX:SharedArchiveFile=$archive"
        else
                echo "-XX:ArchiveClassesAtExit=$STATE/$name.jsa"
        fi
}

# Keep the archive a cleanly stopped JVM wrote. Copied under a temporary name
# and renamed, so a concurrent start never maps a half-copied file.
cds_keep() {
        local name=$1 lib=$2 archive
        archive=$(cds_archive "$name" "$lib")
        [ -s "$STATE/$name.jsa" ] && [ -d "$lib" ] && [ ! -e "$archive" ] || return 0
        if ! { cp "$STATE/$name.jsa" "$lib/.$name.jsa.$$" &&
                mv "$lib/.$name.jsa.$$" "$archive"; }; then
                rm -f "$lib/.$name.jsa.$$"
        fi
}

# ------------------------------------------------------------- PostgreSQL --

pg_ready() {
        "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -d postgres -U postgres
}

pg_psql() {
        "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"
}

start_pg() {
        local t0 dir=$STATE/pg note=""
        t0=$(now_us)
        local data=$dir/data log=$dir/postgres.log

        # postgres itself refuses to run as root, and so do initdb and pg_ctl;
        # runuser drops to the packaged postgres user without a login or PAM.
        id "$PG_OS_USER" >/dev/null 2>&1 ||
                die "pg: OS user $PG_OS_USER missing (is postgresql-15 installed? scripts/setup.sh)"

        if [ -f "$data/postmaster.pid" ] && pg_ready; then
                note=" (already running)"
        else
                # After a crash the old postmaster may linger as a zombie for
                # a moment; postgres would take it for a live server.
                local old _
                old=$(head -n 1 "$data/postmaster.pid" 2>/dev/null || true)
                if [[ $old =~ ^[0-9]+$ ]]; then
                        for _ in $(seq 1 100); do
                                if [ ! -e "/proc/$old" ] || running "$old"; then
                                        break
                                fi
                                sleep 0.1
                        done
                fi
                port_open "$PG_PORT" &&
                        die_port_busy pg "$PG_PORT" FIM_PG_PORT
                mkdir -p "$dir"
                chown "$PG_OS_USER:" "$dir"
                # The server user must be able to reach its data dir.
                runuser -u "$PG_OS_USER" -- test -w "$dir" ||
                        die "pg: $PG_OS_USER cannot write $dir; put FIM_SERVICES_DIR where every user can traverse (e.g. /tmp)"

                if [ ! -f "$data/PG_VERSION" ]; then
                        runuser -u "$PG_OS_USER" -- "$PGBIN/initdb" -D "$data" -U postgres \
                                -A trust -E UTF8 --no-locale --no-sync >"$dir/initdb.log" 2>&1 ||
                                fail_with_log pg "$dir/initdb.log" "initdb failed"
                fi

                # Durability is worthless for throwaway test data; skipping
                # fsync makes schema setup and every commit much faster.
                # 9>&-: the postmaster keeps every inherited fd, and holding
                # the start/stop lock would make the next stop wait forever.
                runuser -u "$PG_OS_USER" -- "$PGBIN/pg_ctl" -D "$data" -l "$log" \
                        -w -t "$PG_TIMEOUT" -o "-k $dir -p $PG_PORT \
                        -c listen_addresses=127.0.0.1 -c fsync=off \
                        -c synchronous_commit=off -c full_page_writes=off" \
                        start >"$dir/pg_ctl.log" 2>&1 9>&- ||
                        fail_with_log pg "$log" "pg_ctl start failed: $(tail -n 3 "$dir/pg_ctl.log")"
        fi

        if [ "$(pg_psql -d postgres -Atc "select 1 from pg_database where datname = '$PG_DB'")" != 1 ]; then
                pg_psql -d postgres -c "create database $PG_DB" ||
                        die "pg: create database $PG_DB failed"
        fi

        write_env pg \
                "DATABASE_URL=postgresql://postgres@127.0.0.1:$PG_PORT/$PG_DB" \
                "FIM_PG_ADMIN_URL=postgresql://postgres@127.0.0.1:$PG_PORT/postgres"
        printf '%-6s up in %-6s 127.0.0.1:%s%s\n' pg "$(elapsed "$t0")" "$PG_PORT" "$note"
}

stop_pg() {
        local dir=$STATE/pg
        [ -f "$dir/data/postmaster.pid" ] || return 0
        # -m fast: roll back open transactions instead of waiting for test
        # clients that may never disconnect.
        if ! runuser -u "$PG_OS_USER" -- "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w -t 30 \
                stop >/dev/null 2>&1; then
                local pid
                pid=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null || true)
                if [[ $pid =~ ^[0-9]+$ ]] && running "$pid"; then
                        echo "services: pg: pg_ctl stop failed, killing postmaster $pid" >&2
                        kill -KILL "$pid" 2>/dev/null || true
                fi
        fi
}

# ---------------------------------------------------------------- S3Proxy --

s3_curl() {
        curl -sS --aws-sigv4 "aws:amz:$S3_REGION:s3" -u "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
                -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$@"
}

# S3Proxy answers an unsigned request with 403 AccessDenied once it serves.
# HOST:PORT, default the main instance.
s3_ready() {
        [ "$(curl -s -o /dev/null -w '%{http_code}' "http://${1:-127.0.0.1:$S3_PORT}/")" = 403 ]
}

s3_vhost_ready() {
        s3_ready "localhost:$S3_VHOST_PORT"
}

# Write an S3Proxy config: FILE PORT [EXTRA LINE...]
s3_conf() {
        local file=$1 port=$2
        shift 2
        # filesystem-nio2 keeps objects on disk, not in the JVM heap,
        # so large image tarballs do not need a large -Xmx.
        {
                echo "s3proxy.endpoint=http://127.0.0.1:$port"
                echo "s3proxy.authorization=aws-v4"
                echo "s3proxy.identity=$S3_ACCESS_KEY"
                echo "s3proxy.credential=$S3_SECRET_KEY"
                echo "jclouds.provider=filesystem-nio2"
                echo "jclouds.filesystem.basedir=$STATE/s3/blobs"
                # Unknown x-amz-* headers are otherwise refused with 501; this
                # lets x-amz-security-token (AWS_SESSION_TOKEN) through, still
                # covered by the signature check.
                echo "s3proxy.ignore-unknown-headers=true"
                printf '%s\n' "$@"
        } >"$file"
}

# A second S3Proxy on the same objects, for virtual-host addressing: a request
# for http://BUCKET.localhost:PORT/KEY names its bucket in the Host header
# (curl resolves *.localhost to loopback by itself). It is a separate
# instance because with s3proxy.virtual-host set, S3Proxy takes any other
# Host (127.0.0.1, a qemu guest's 10.0.2.100) for a bucket name, which would
# break every path-style client of the main one. It reads the class-data
# archive the main one recorded, and records none of its own.
start_s3_vhost() {
        local dir=$STATE/s3 lib=$CACHE/s3proxy-lib archive cds=()
        live_pid s3vhost >/dev/null && s3_vhost_ready && return 0
        port_open "$S3_VHOST_PORT" &&
                die_port_busy s3 "$S3_VHOST_PORT" FIM_S3_VHOST_PORT
        s3_conf "$dir/s3proxy-vhost.conf" "$S3_VHOST_PORT" "s3proxy.virtual-host=localhost"
        archive=$(cds_archive s3 "$lib")
        [ ! -s "$archive" ] || cds=("-XX:SharedArchiveFile=$archive")
        launch s3vhost "$dir/s3proxy-vhost.log" java "${JVM_OPTS[@]}" "${cds[@]}" \
                -Dlogback.configurationFile="$HERE/s3proxy/logback.xml" \
                -cp "$lib/*" org.gaul.s3proxy.Main --properties "$dir/s3proxy-vhost.conf"
}

start_s3() {
        local t0 dir=$STATE/s3 note=""
        t0=$(now_us)
        local log=$dir/s3proxy.log lib=$CACHE/s3proxy-lib

        if live_pid s3 >/dev/null && s3_ready; then
                note=" (already running)"
        else
                port_open "$S3_PORT" &&
                        die_port_busy s3 "$S3_PORT" FIM_S3_PORT
                mkdir -p "$dir/blobs"
                fetch_jars s3 "$HERE/s3proxy/pom.xml" "$lib" "$dir/maven.log"
                [ -z "$(ls -A "$dir/blobs")" ] || note=" (kept existing objects)"

                s3_conf "$dir/s3proxy.conf" "$S3_PORT"
                launch s3 "$log" java "${JVM_OPTS[@]}" "$(cds_opts s3 "$lib")" \
                        -Dlogback.configurationFile="$HERE/s3proxy/logback.xml" \
                        -cp "$lib/*" org.gaul.s3proxy.Main --properties "$dir/s3proxy.conf"
        fi
        start_s3_vhost
        live_pid s3 >/dev/null && s3_ready || wait_ready s3 "$log" "$S3_TIMEOUT" s3_ready
        wait_ready s3vhost "$dir/s3proxy-vhost.log" "$S3_TIMEOUT" s3_vhost_ready

        # 200 = created, 409 BucketAlreadyOwnedByYou = there from a previous
        # start; both are what we want.
        local code
        code=$(s3_curl -o "$dir/mb.out" -w '%{http_code}' -X PUT \
                "http://127.0.0.1:$S3_PORT/$S3_BUCKET") || true
        case $code in
        200 | 409) ;;
        *) fail_with_log s3 "$dir/mb.out" "creating bucket $S3_BUCKET failed (HTTP $code)" ;;
        esac

        write_env s3 \
                "S3_ENDPOINT=http://127.0.0.1:$S3_PORT" \
                "S3_FORCE_PATH_STYLE=true" \
                "S3_VHOST_ENDPOINT=http://localhost:$S3_VHOST_PORT" \
                "AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY" \
                "AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY" \
                "AWS_REGION=$S3_REGION" \
                "S3_BUCKET=$S3_BUCKET"
        printf '%-6s up in %-6s 127.0.0.1:%s, virtual-host localhost:%s%s\n' s3 "$(elapsed "$t0")" \
                "$S3_PORT" "$S3_VHOST_PORT" "$note"
}

# ------------------------------------------------------------------ Kafka --

# The broker is usable once it answers Metadata and lists itself.
kafka_ready() {
        kcat -b "127.0.0.1:$KAFKA_PORT" -L -m 2 2>/dev/null | grep -q '1 brokers:'
}

# A Kafka cluster id is 16 random bytes in unpadded base64url. Made here
# rather than with `StorageTool random-uuid`, which would cost a JVM start.
kafka_cluster_id() {
        head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '='
}

start_kafka() {
        local t0 dir=$STATE/kafka note=""
        t0=$(now_us)
        local log=$dir/kafka.log lib=$CACHE/kafka-lib

        if live_pid kafka >/dev/null && kafka_ready; then
                note=" (already running)"
        else
                local p
                for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_GUEST_PORT"; do
                        port_open "$p" &&
                                die_port_busy kafka "$p" "FIM_KAFKA_PORT/_CONTROLLER_PORT/_GUEST_PORT"
                done
                mkdir -p "$dir/data"
                fetch_jars kafka "$HERE/kafka/pom.xml" "$lib" "$dir/maven.log"

                # Combined broker+controller with a static voter list, so the
                # formatter needs no --standalone. The GUEST listener is bound
                # on loopback but advertised at the qemu guestfwd address, so
                # clients inside the VM are sent to an address they can reach.
                # Internal topics get replication factor 1 (there is one
                # node) and one partition (faster first group/txn use);
                # no initial rebalance delay keeps consumer tests quick.
                cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,GUEST://127.0.0.1:$KAFKA_GUEST_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,GUEST://$KAFKA_GUEST_ADDR:$KAFKA_GUEST_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,GUEST:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
                if [ ! -f "$dir/data/meta.properties" ]; then
                        # The broker's archive fits the formatter too (same
                        # classpath); without one, don't record a second.
                        local fmt_cds=() archive
                        archive=$(cds_archive kafka "$lib")
                        [ ! -s "$archive" ] || fmt_cds=("-XX:SharedArchiveFile=$archive")
                        java "${JVM_OPTS[@]}" "${fmt_cds[@]}" \
                                -cp "$lib/*" kafka.tools.StorageTool format \
                                -t "$(kafka_cluster_id)" -c "$dir/server.properties" \
                                >"$dir/format.log" 2>&1 ||
                                fail_with_log kafka "$dir/format.log" "formatting the log dir failed"
                fi
                # slf4j-simple logs to stderr at INFO; timestamps make the
                # log tail of a failed start readable.
                launch kafka "$log" java "${JVM_OPTS[@]}" "$(cds_opts kafka "$lib")" \
                        -Dorg.slf4j.simpleLogger.showDateTime=true \
                        -Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS \
                        -cp "$lib/*" kafka.Kafka "$dir/server.properties"
                wait_ready kafka "$log" "$KAFKA_TIMEOUT" kafka_ready
        fi

        write_env kafka \
                "KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT" \
                "FIM_KAFKA_GUEST_BROKERS=$KAFKA_GUEST_ADDR:$KAFKA_GUEST_PORT"
        printf '%-6s up in %-6s 127.0.0.1:%s (guest %s:%s)%s\n' kafka "$(elapsed "$t0")" \
                "$KAFKA_PORT" "$KAFKA_GUEST_ADDR" "$KAFKA_GUEST_PORT" "$note"
}

# ---------------------------------------------------------------- stopping --

# SIGTERM lets Kafka shut down cleanly and S3Proxy finish writes; SIGKILL
# after TIMEOUT so a wedged JVM cannot hang the caller's cleanup. With LIB,
# a class-data archive the JVM wrote on its way out is kept there.
stop_pid() {
        local name=$1 timeout=$2 lib=${3-} pid _
        pid=$(live_pid "$name") || { rm -f "$STATE/$name.pid"; return 0; }
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 $(( timeout * 10 ))); do
                running "$pid" || break
                sleep 0.1
        done
        if running "$pid"; then
                echo "services: $name: still running after ${timeout}s, sending SIGKILL" >&2
                kill -KILL "$pid" 2>/dev/null || true
                while running "$pid"; do sleep 0.1; done
                # Possibly cut off while being written.
                rm -f "$STATE/$name.jsa"
        fi
        rm -f "$STATE/$name.pid"
        [ -z "$lib" ] || cds_keep "$name" "$lib"
}

# ---------------------------------------------------------------- commands --

check_tools() {
        local t missing=()
        for t in java mvn kcat curl runuser setsid flock; do
                command -v "$t" >/dev/null || missing+=("$t")
        done
        [ -x "$PGBIN/postgres" ] || missing+=("postgresql-15")
        [ "${#missing[@]}" -eq 0 ] ||
                die "missing ${missing[*]}: run scripts/setup.sh as root"
        [ "$(id -u)" -eq 0 ] || die "run as root (postgres is started through runuser)"
}

# One lock per state dir: two test runs starting or stopping the same
# services at once would otherwise race on ports and data dirs.
take_lock() {
        mkdir -p "$(dirname "$STATE")"
        exec 9>"$STATE.lock"
        flock -w 300 9 || die "timed out waiting for $STATE.lock"
}

cmd_start() {
        local names=() name
        local -A seen=()
        [ $# -gt 0 ] || set -- "${ALL_SERVICES[@]}"
        for name in "$@"; do
                case $name in
                pg | s3 | kafka) ;;
                *) die "unknown service '$name' (expected: ${ALL_SERVICES[*]})" ;;
                esac
                # Twice the same name would start two racing copies.
                [ -n "${seen[$name]-}" ] || names+=("$name")
                seen[$name]=1
        done
        check_tools
        take_lock
        mkdir -p "$STATE"
        chmod 755 "$STATE"
        printf '%s\n' "FIM_PG_PORT=$PG_PORT" "FIM_S3_PORT=$S3_PORT" "FIM_S3_VHOST_PORT=$S3_VHOST_PORT" \
                "FIM_KAFKA_PORT=$KAFKA_PORT" "FIM_KAFKA_CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT" \
                "FIM_KAFKA_GUEST_PORT=$KAFKA_GUEST_PORT" >"$PORTS_FILE"

        # Each service starts in its own background job: the JVMs take
        # seconds to boot on 2 cores and need not wait for one another.
        local t0 failed=0
        local -A jobs=()
        t0=$(now_us)
        for name in "${names[@]}"; do
                "start_$name" &
                jobs[$name]=$!
        done
        for name in "${names[@]}"; do
                wait "${jobs[$name]}" || failed=1
        done

        # services.env covers every service that is up, including ones
        # started by an earlier `start NAME`.
        {
                echo "# written by tests/infra/services.sh; source this file"
                echo "export FIM_SERVICES_DIR=$STATE"
                for name in "${ALL_SERVICES[@]}"; do
                        [ ! -f "$STATE/env.d/$name.env" ] || cat "$STATE/env.d/$name.env"
                done
        } >"$STATE/services.env.tmp"
        mv "$STATE/services.env.tmp" "$STATE/services.env"

        if [ "$failed" -ne 0 ]; then
                die "start failed after $(elapsed "$t0"); run '$0 stop' to clean up"
        fi
        echo "all    up in $(elapsed "$t0"); env: $STATE/services.env"
}

cmd_stop() {
        take_lock
        if [ ! -d "$STATE" ]; then
                return 0
        fi
        local t0
        t0=$(now_us)
        stop_pid kafka 30 "$CACHE/kafka-lib" &
        stop_pid s3 15 "$CACHE/s3proxy-lib" &
        stop_pid s3vhost 15 &
        stop_pg &
        wait
        rm -rf "$STATE"
        echo "stopped in $(elapsed "$t0")"
}

cmd_status() {
        local rc=0
        if [ -f "$STATE/pg/data/postmaster.pid" ] && pg_ready; then
                echo "pg     up   127.0.0.1:$PG_PORT"
        else
                echo "pg     down"; rc=3
        fi
        if live_pid s3 >/dev/null && s3_ready && live_pid s3vhost >/dev/null && s3_vhost_ready; then
                echo "s3     up   127.0.0.1:$S3_PORT, virtual-host localhost:$S3_VHOST_PORT"
        else
                echo "s3     down"; rc=3
        fi
        if live_pid kafka >/dev/null && kafka_ready; then
                echo "kafka  up   127.0.0.1:$KAFKA_PORT"
        else
                echo "kafka  down"; rc=3
        fi
        return "$rc"
}

# Fetch the jars of the JVM services into this checkout's cache without starting anything:
# tools such as kafka-topics.sh need them even when the services were started from another
# checkout (e.g. a demo that reuses a running set).
cmd_fetch() {
        local name
        [ $# -gt 0 ] || set -- s3 kafka
        for name in "$@"; do
                case $name in
                s3) fetch_jars s3 "$HERE/s3proxy/pom.xml" "$CACHE/s3proxy-lib" "$CACHE/maven-s3.log" ;;
                kafka) fetch_jars kafka "$HERE/kafka/pom.xml" "$CACHE/kafka-lib" "$CACHE/maven-kafka.log" ;;
                *) die "fetch: unknown service '$name' (expected: s3 kafka)" ;;
                esac
        done
}

cmd_env() {
        [ -f "$STATE/services.env" ] || die "no $STATE/services.env: run '$0 start' first"
        cat "$STATE/services.env"
}

usage() {
        echo "usage: $0 start [pg] [s3] [kafka] | stop | status | env | fetch [s3] [kafka]" >&2
        exit 2
}

main() {
        [ $# -gt 0 ] || usage
        local cmd=$1
        shift
        case $cmd in
        start) cmd_start "$@" ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        env) cmd_env ;;
        fetch) cmd_fetch "$@" ;;
        *) usage ;;
        esac
}

main "$@"
