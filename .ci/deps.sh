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
        openssh-server openssh-client sshpass \
        valgrind ca-certificates >/dev/null
# Node.js for the client tests: a machine that has one (NodeSource's nodejs
# carries its own npm and conflicts with Debian's npm package) keeps it;
# otherwise Debian's nodejs and npm.
if ! command -v node >/dev/null 2>&1; then
        apt-get install -y -qq --no-install-recommends nodejs >/dev/null
fi
if ! command -v npm >/dev/null 2>&1; then
        apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
if [ "${PACKAGING:-0}" = 1 ]; then
        apt-get install -y -qq --no-install-recommends \
                debhelper devscripts lintian fakeroot rpm rpmlint >/dev/null
fi
