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
LIB=$HERE/../../.cache/kafka-lib

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

# The admin client is short-lived: a small heap and the C1 JIT start fastest.
exec java -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
        -cp "$LIB/*" "$HERE/kafka/CreateTopics.java" "$KAFKA_BROKERS" "${args[@]}"
