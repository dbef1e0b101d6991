#!/usr/bin/env bash
# Install every Debian package flyio-image-manager needs to build, test and run its demo.
# Idempotent: when every package is already installed it does nothing and touches no network.
set -euo pipefail

packages=(
        # build
        build-essential cmake pkg-config clang clang-format libclang-rt-14-dev
        # libraries the worker links
        librdkafka-dev libcurl4-openssl-dev libssl-dev libpq-dev libarchive-dev liblzma-dev
        libdevmapper-dev libjson-c-dev
        # unit tests
        libcmocka-dev
        # local services for tests and the demo (Kafka and S3Proxy come from Maven Central)
        postgresql-15 openjdk-17-jre-headless maven kcat curl
        # tools the stages run and the tests compare against
        e2fsprogs thin-provisioning-tools dmsetup tar libarchive-tools zstd xz-utils gzip time
        python3 python3-yaml jq debootstrap bc
        # the device-mapper VM for hosts whose kernel has no dm-thin
        qemu-system-x86 busybox-static cpio kmod
)

missing=()
for p in "${packages[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
                missing+=("$p")
        fi
done

if [ "${#missing[@]}" -eq 0 ]; then
        exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing packages: ${missing[*]}; run this script as root to install them" >&2
        exit 1
fi

echo "setup: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
