#!/usr/bin/env bash
# Install every Debian package flyio-image-manager needs to build, test and run its demo.
# Idempotent: when every package is already installed it does nothing and touches no network.
set -euo pipefail

# Every package a script or test of the repository runs a tool from. Some are Essential or
# pulled in by others on a normal Debian system; they are listed anyway, so that a minimal
# image (a container, a debootstrap chroot) gets them too.
packages=(
        # build; clang and its runtime also build the fuzzers (-DFIM_FUZZ=ON)
        build-essential cmake pkg-config clang clang-format libclang-rt-14-dev
        # the style check lists the sources with git ls-files
        git
        # libraries the worker links
        librdkafka-dev libcurl4-openssl-dev libssl-dev libpq-dev libarchive-dev liblzma-dev
        libdevmapper-dev libjson-c-dev
        # unit tests
        libcmocka-dev
        # local services for tests and the demo (Kafka and S3Proxy come from Maven Central);
        # psql for the test and demo scripts; ss (iproute2) names what holds a busy port
        postgresql-15 postgresql-client-15 openjdk-17-jre-headless maven kcat curl iproute2
        # flock, setsid, runuser, losetup (util-linux), mount/umount, script (bsdutils) for
        # the progress test on a pseudo-terminal
        util-linux mount bsdutils
        # tools the stages run and the tests compare against
        e2fsprogs thin-provisioning-tools dmsetup tar libarchive-tools zstd xz-utils gzip time
        python3 python3-yaml jq bc
        # the demo's root filesystem image
        debootstrap
        # systemd-analyze verifies the systemd unit example (tests/docker)
        systemd
        # the device-mapper VM for hosts whose kernel has no dm-thin (apt-get download and
        # dpkg fetch and unpack its kernel)
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
