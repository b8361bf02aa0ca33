#!/bin/sh
# SPDX-License-Identifier: MIT
# Quick start: run agent-brokerd with examples/policy/demo.json in a
# temporary state dir, fetch a token as this user, decode it, stop.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
B=${B:-$top/build}
dir=$(mktemp -d /tmp/agent-broker-demo.XXXXXX)
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT INT TERM

"$B/agent-brokerd" --socket "$dir/io.agentbroker" --admin-socket "$dir/io.agentbroker.admin" \
        --state-dir "$dir/state" --policy "$top/examples/policy/demo.json" &
pid=$!
export AGENT_BROKER_SOCKET="$dir/io.agentbroker"
i=0
until "$B/agent-brokerctl" status >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -lt 50 ] || { echo "broker did not start" >&2; exit 1; }
        sleep 0.1
done

echo "\$ agent-brokerctl token --audience mcp://git.internal --scope repo:read"
token=$("$B/agent-brokerctl" token --audience mcp://git.internal --scope repo:read)
echo "$token"
echo
echo "decoded header and claims:"
for part in 1 2; do
        seg=$(printf '%s' "$token" | cut -d. -f$part | tr '_-' '/+')
        while [ $(( ${#seg} % 4 )) -ne 0 ]; do seg="$seg="; done
        printf '%s' "$seg" | base64 -d
        echo
done
echo
echo "\$ agent-brokerctl token --audience mcp://git.internal --scope repo:admin   (not granted)"
"$B/agent-brokerctl" token --audience mcp://git.internal --scope repo:admin || echo "(exit status $?: denied)"
