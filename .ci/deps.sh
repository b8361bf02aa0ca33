#!/bin/sh
# SPDX-License-Identifier: MIT
# Build and test dependencies on Debian 12, as root.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
        build-essential pkg-config \
        libsystemd-dev libsodium-dev liblmdb-dev libpam0g-dev libjansson-dev libcmocka-dev \
        systemd python3 python3-jwt python3-cryptography pamtester lmdb-utils >/dev/null
