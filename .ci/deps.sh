#!/bin/sh
# SPDX-License-Identifier: MIT
# Build and test dependencies on Debian 12, as root.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
        build-essential pkg-config clang \
        libsystemd-dev libsodium-dev liblmdb-dev libpam0g-dev libjansson-dev libcmocka-dev \
        systemd python3 python3-jwt python3-cryptography python3-nacl pamtester lmdb-utils \
        valgrind nodejs npm ca-certificates >/dev/null
if [ "${PACKAGING:-0}" = 1 ]; then
        apt-get install -y -qq --no-install-recommends \
                debhelper devscripts lintian fakeroot rpm rpmlint >/dev/null
fi
