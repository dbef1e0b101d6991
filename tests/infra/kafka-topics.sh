#!/usr/bin/env bash
# Create or delete the worker's topics on the test Kafka broker.
#
#   tests/infra/kafka-topics.sh create PREFIX [PARTITIONS]   # default 3
#   tests/infra/kafka-topics.sh delete PREFIX
#
# Topics: PREFIX.download, PREFIX.unpack, PREFIX.activate (PARTITIONS each)
# and PREFIX.dlq (always 1 partition: dead letters need no parallelism, and
# one partition keeps their order for inspection). Both modes are
# idempotent. Tests should use a unique PREFIX per run so they never see
# each other's messages.
#
# kcat cannot create topics, and broker auto-creation would give every topic
# num.partitions=1, so this runs a single-file Java program on the
# AdminClient from the broker's own jars (kafka-clients is among them).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=$(cd "$HERE/../.." && pwd)/.cache
# Spelled exactly as services.sh spells it: the broker's class-data archive
# is only accepted for the same classpath.
LIB=$CACHE/kafka-lib

usage() {
        echo "usage: $0 create PREFIX [PARTITIONS] | delete PREFIX" >&2
        exit 2
}

[ $# -ge 2 ] || usage
mode=$1 prefix=$2 partitions=${3:-3}
[[ $partitions =~ ^[1-9][0-9]*$ ]] || usage
[[ $prefix =~ ^[A-Za-z0-9._-]+$ ]] ||
        { echo "$0: PREFIX may hold only letters, digits, '.', '_' and '-'" >&2; exit 2; }

if [ -z "${KAFKA_BROKERS:-}" ]; then
        env_file=${FIM_SERVICES_DIR:-/tmp/fim-services}/services.env
        [ -f "$env_file" ] ||
                { echo "$0: KAFKA_BROKERS unset and no $env_file; run tests/infra/services.sh start kafka" >&2; exit 1; }
        # shellcheck source=/dev/null
        . "$env_file"
fi
[ -f "$LIB/.stamp" ] ||
        { echo "$0: no Kafka jars in $LIB; run tests/infra/services.sh start kafka" >&2; exit 1; }

topics=("$prefix.download" "$prefix.unpack" "$prefix.activate" "$prefix.dlq")
case $mode in
create) args=(create "$partitions" "${topics[@]:0:3}" "$prefix.dlq:1") ;;
delete) args=(delete "${topics[@]}") ;;
*) usage ;;
esac

JVM_OPTS=(-Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1)

# Compile CreateTopics.java once per source and jar set: running it through
# the single-file launcher compiles it on every call, which doubled the
# time of a call. The JRE has no javac binary, but its jdk.compiler module
# runs the same compiler. Built in a temporary directory and renamed, so
# concurrent first calls cannot see half-written classes.
compiled_classes() {
        local src=$HERE/kafka/CreateTopics.java key dir tmp
        key=$(cat "$src" "$LIB/.stamp" | sha256sum | cut -c1-16)
        dir=$CACHE/kafka-tools/$key
        if [ ! -f "$dir/CreateTopics.class" ]; then
                mkdir -p "$CACHE/kafka-tools"
                tmp=$(mktemp -d "$CACHE/kafka-tools/.build.XXXXXX")
                java "${JVM_OPTS[@]}" -m jdk.compiler/com.sun.tools.javac.Main \
                        -cp "$(echo "$LIB"/kafka-clients-*.jar)" -d "$tmp" "$src" >&2 ||
                        { rm -rf "$tmp"; exit 1; }
                mv -T "$tmp" "$dir" 2>/dev/null || rm -rf "$tmp"
        fi
        echo "$dir"
}

# Reuse the broker's class-data archive when services.sh has recorded one
# (same naming); a missing or stale archive only costs start-up time.
cds=()
java_bin=$(readlink -f "$(command -v java)")
archive=$LIB/kafka-$(stat -c %Y "${java_bin%/bin/java}/lib/server/libjvm.so" 2>/dev/null || echo 0).jsa
[ ! -s "$archive" ] || cds=("-XX:SharedArchiveFile=$archive" -Xlog:cds=off -Xlog:cds+dynamic=off)

classes=$(compiled_classes)
exec java "${JVM_OPTS[@]}" "${cds[@]}" -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
        -cp "$LIB/*:$classes" CreateTopics "$KAFKA_BROKERS" "${args[@]}"
