#!/usr/bin/env bash
# Self-check of the local test services: start them, prove that each one does
# the job the integration tests rely on, then stop them.
#
#   tests/infra/selftest.sh
#
# - PostgreSQL: a query through DATABASE_URL; a scratch database through
#   FIM_PG_ADMIN_URL (what tests do to isolate themselves).
# - S3Proxy: an object with every byte value round-trips unchanged; a wrong
#   secret gets 403 SignatureDoesNotMatch and a request without
#   x-amz-content-sha256 gets 400 XAmzContentSHA256Mismatch, i.e. requests
#   are really checked the way AWS checks them.
# - Kafka: topics created by kafka-topics.sh with the right partition counts;
#   kcat produces keyed messages and reads them back, also as a consumer
#   group; the GUEST listener advertises the VM-side address.
#
# If every service was already up before the test, they are left running
# (someone else is using them); otherwise the test stops what it started.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SERVICES=$HERE/services.sh
TMP=$(mktemp -d /tmp/fim-selftest.XXXXXX)
PASSED=0
FAILED=0
STOP_AT_END=1

cleanup() {
        rm -rf "$TMP"
        if [ "$STOP_AT_END" -eq 1 ]; then
                "$SERVICES" stop || true
        fi
}

# check NAME CMD...: run one check, record and print its verdict. The
# command's output is kept and shown only when it fails.
check() {
        local name=$1
        shift
        if "$@" >"$TMP/check.out" 2>&1; then
                PASSED=$((PASSED + 1))
                echo "ok   $name"
        else
                FAILED=$((FAILED + 1))
                echo "FAIL $name"
                sed 's/^/     | /' "$TMP/check.out"
        fi
}

# ------------------------------------------------------------- PostgreSQL --

pg_query() {
        [ "$(psql "$DATABASE_URL" -XAtc 'select 6 * 7')" = 42 ]
}

pg_scratch_db() {
        local db=fim_selftest_$$
        psql "$FIM_PG_ADMIN_URL" -Xq -v ON_ERROR_STOP=1 -c "create database $db"
        # Same URL with the database swapped, as a test would derive it.
        local url=${FIM_PG_ADMIN_URL%/*}/$db
        psql "$url" -Xq -v ON_ERROR_STOP=1 \
                -c 'create table t (id int primary key)' -c 'insert into t values (1)'
        [ "$(psql "$url" -XAtc 'select count(*) from t')" = 1 ]
        psql "$FIM_PG_ADMIN_URL" -Xq -v ON_ERROR_STOP=1 -c "drop database $db"
}

# ---------------------------------------------------------------- S3Proxy --

s3_roundtrip() {
        # Every byte value plus random data: catches any text-mode mangling.
        { python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(256)))'
          head -c 1048576 /dev/urandom; } >"$TMP/obj.in"
        local key="selftest/$$/obj with space+plus.bin"
        "$HERE/s3put.sh" "$S3_BUCKET" "$key" "$TMP/obj.in"
        "$HERE/s3get.sh" "$S3_BUCKET" "$key" "$TMP/obj.out"
        cmp "$TMP/obj.in" "$TMP/obj.out"
}

s3_wrong_secret() {
        local code
        code=$(curl -sS -o "$TMP/err.xml" -w '%{http_code}' \
                --aws-sigv4 "aws:amz:$AWS_REGION:s3" -u "$AWS_ACCESS_KEY_ID:not-the-secret" \
                -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$S3_ENDPOINT/$S3_BUCKET/")
        cat "$TMP/err.xml"
        [ "$code" = 403 ] && grep -q '<Code>SignatureDoesNotMatch</Code>' "$TMP/err.xml"
}

# The pitfall from shared/notes/test-infra.md: curl's SigV4 alone sends no
# x-amz-content-sha256, and S3Proxy must refuse that like AWS does.
s3_missing_sha256_header() {
        local code
        code=$(curl -sS -o "$TMP/err.xml" -w '%{http_code}' \
                --aws-sigv4 "aws:amz:$AWS_REGION:s3" \
                -u "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$S3_ENDPOINT/$S3_BUCKET/")
        cat "$TMP/err.xml"
        [ "$code" = 400 ] && grep -q '<Code>XAmzContentSHA256Mismatch</Code>' "$TMP/err.xml"
}

# ------------------------------------------------------------------ Kafka --

PREFIX=selftest-$$

kafka_topics() {
        "$HERE/kafka-topics.sh" create "$PREFIX"
        "$HERE/kafka-topics.sh" create "$PREFIX" # idempotent
        kcat -b "$KAFKA_BROKERS" -L -t "$PREFIX.download" | tee "$TMP/md"
        grep -q "topic \"$PREFIX.download\" with 3 partitions" "$TMP/md"
        kcat -b "$KAFKA_BROKERS" -L -t "$PREFIX.dlq" | grep -q "with 1 partitions"
}

kafka_produce_consume() {
        seq 1 20 | sed 's/.*/job-&:{"n":&}/' >"$TMP/sent"
        kcat -b "$KAFKA_BROKERS" -P -t "$PREFIX.download" -K: <"$TMP/sent"
        # Three partitions: order holds per key only, so compare sorted.
        timeout 30 kcat -b "$KAFKA_BROKERS" -C -t "$PREFIX.download" -o beginning \
                -e -q -f '%k:%s\n' >"$TMP/got"
        diff <(sort "$TMP/sent") <(sort "$TMP/got")
}

# The worker consumes as a group member: that needs the group coordinator
# and the __consumer_offsets topic, which plain -C never touches.
kafka_consumer_group() {
        timeout 60 kcat -b "$KAFKA_BROKERS" -G "$PREFIX-group" -o beginning -e -q \
                -X session.timeout.ms=6000 -f '%k:%s\n' "$PREFIX.download" >"$TMP/got-group"
        diff <(sort "$TMP/sent") <(sort "$TMP/got-group")
}

# Clients in the VM are sent to 10.0.2.100:19094 by the GUEST listener.
kafka_guest_listener() {
        local port=${FIM_KAFKA_GUEST_BROKERS##*:}
        kcat -b "127.0.0.1:$port" -L -t "$PREFIX.download" | tee "$TMP/md-guest"
        grep -q "broker 1 at $FIM_KAFKA_GUEST_BROKERS" "$TMP/md-guest"
}

kafka_delete_topics() {
        "$HERE/kafka-topics.sh" delete "$PREFIX"
}

main() {
        if "$SERVICES" status >/dev/null 2>&1; then
                STOP_AT_END=0
                echo "services already running: reusing them and leaving them up"
        fi
        trap cleanup EXIT
        "$SERVICES" start
        # shellcheck source=/dev/null
        . "${FIM_SERVICES_DIR:-/tmp/fim-services}/services.env"

        check "pg: query through DATABASE_URL" pg_query
        check "pg: scratch database through FIM_PG_ADMIN_URL" pg_scratch_db
        check "s3: 1 MiB object round-trips byte for byte" s3_roundtrip
        check "s3: wrong secret -> 403 SignatureDoesNotMatch" s3_wrong_secret
        check "s3: no x-amz-content-sha256 header -> 400 XAmzContentSHA256Mismatch" s3_missing_sha256_header
        check "kafka: kafka-topics.sh create (3 + dlq 1 partitions)" kafka_topics
        check "kafka: kcat produce + consume 20 keyed messages" kafka_produce_consume
        check "kafka: consumer group reads them too" kafka_consumer_group
        check "kafka: GUEST listener advertises $FIM_KAFKA_GUEST_BROKERS" kafka_guest_listener
        check "kafka: kafka-topics.sh delete" kafka_delete_topics

        echo "selftest: $PASSED passed, $FAILED failed"
        [ "$FAILED" -eq 0 ]
}

main "$@"
