#!/bin/bash
# SPDX-License-Identifier: MIT
# make check-packaging: build the .deb and .rpm packages, lint them, unpack
# the .debs into a scratch root and check that every file is where the units
# and man pages say, check the installed units with systemd-analyze (verify,
# and security: exposure at most 2.0), then run the packaged broker as the
# unit would (socket activation with the unit's socket names, the unit's
# capability bounding set, a read-only file system, /home hidden, /proc
# with subset=pid,hidepid=invisible) and fetch tokens end to end with the
# packaged CLI and library. Needs root (unshare, setpriv).
#
# Environment: PKG_DIR (default $B/pkg), B (default build), MAKE,
# EXPOSURE_MAX (default 2.0), KEEP=1 keeps the scratch directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=$PWD
MAKE=${MAKE:-make}
B=${B:-build}
PKG_DIR=${PKG_DIR:-$SRC/$B/pkg}
EXPOSURE_MAX=${EXPOSURE_MAX:-2.0}
T0=$(date +%s)
T=
BROKER_PID=

fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo "== $* ($(($(date +%s) - T0)) s)"; }
ok() { echo "   ok: $*"; }
cleanup() {
        if [ -n "$BROKER_PID" ]; then kill "$BROKER_PID" 2>/dev/null || true; wait "$BROKER_PID" 2>/dev/null || true; fi
        if [ -n "$T" ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$T"; fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || fail "run as root (the end-to-end part uses unshare and setpriv)"
for tool in dpkg-buildpackage dpkg-architecture lintian rpmbuild rpmlint systemd-analyze \
            systemd-socket-activate setpriv unshare findmnt cc; do
        command -v "$tool" >/dev/null || fail "$tool is missing: sudo PACKAGING=1 .ci/deps.sh"
done
MA=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
mkdir -p "$PKG_DIR"
T=$(mktemp -d /tmp/agent-broker-pkgtest.XXXXXX)
chmod 0711 "$T"

# ---- build ------------------------------------------------------------------
step "make deb"
$MAKE --no-print-directory B="$B" PKG_DIR="$PKG_DIR" deb >"$T/deb.log" 2>&1 || { tail -40 "$T/deb.log"; fail "make deb"; }
ls "$PKG_DIR"/deb/*.deb | sed 's|.*/|   |'
step "make rpm"
$MAKE --no-print-directory B="$B" PKG_DIR="$PKG_DIR" rpm >"$T/rpm.log" 2>&1 || { tail -40 "$T/rpm.log"; fail "make rpm"; }
ls "$PKG_DIR"/rpm/RPMS/*/*.rpm | sed 's|.*/|   |'

# ---- lint -------------------------------------------------------------------
step "lintian"
lintian --display-level ">=pedantic" "$PKG_DIR"/deb/*.changes >"$T/lintian.out" 2>"$T/lintian.err" || true
grep -v 'running with root privileges' "$T/lintian.err" >&2 || true
sed 's/^/   /' "$T/lintian.out"
LE=$(grep -c '^E:' "$T/lintian.out" || true)
LW=$(grep -c '^W:' "$T/lintian.out" || true)
LI=$(grep -c '^[IPX]:' "$T/lintian.out" || true)
echo "   lintian: $LE errors, $LW warnings ($LI info/pedantic)"
[ "$LE" = 0 ] && [ "$LW" = 0 ] || fail "lintian reports errors or warnings"

step "rpmlint"
rpmlint -r packaging/rpm/agent-broker.rpmlintrc packaging/rpm/agent-broker.spec \
        "$PKG_DIR"/rpm/RPMS/*/*.rpm >"$T/rpmlint.out" 2>&1 || true
grep -E '^[^ ]+: [EW]: ' "$T/rpmlint.out" | sed 's/^/   /' || true
summary=$(grep -E '[0-9]+ errors, [0-9]+ warnings' "$T/rpmlint.out" | tail -1)
[ -n "$summary" ] || { cat "$T/rpmlint.out"; fail "rpmlint gave no summary"; }
RE=$(sed -E 's/.* ([0-9]+) errors, ([0-9]+) warnings.*/\1/' <<<"$summary")
RW=$(sed -E 's/.* ([0-9]+) errors, ([0-9]+) warnings.*/\2/' <<<"$summary")
echo "   rpmlint: $RE errors, $RW warnings"
[ "$RE" = 0 ] || fail "rpmlint reports errors"

# ---- scratch install --------------------------------------------------------
step "unpack the .debs into a scratch root"
ROOT=$T/root
mkdir -p "$ROOT"
for deb in "$PKG_DIR"/deb/*.deb; do
        case $deb in *-dbgsym_*) continue ;; esac
        dpkg-deb -x "$deb" "$ROOT"
done
UNITS=$ROOT/lib/systemd/system
SVC=$UNITS/agent-broker.service
ALL_UNITS="agent-broker.socket agent-broker-admin.socket agent-broker.service agent-broker-jwks.service agent-broker-jwks.timer"
for u in $ALL_UNITS; do
        [ -f "$UNITS/$u" ] || fail "$u not in /lib/systemd/system"
done
ok "units in /lib/systemd/system"

unit_value() { # unit key: the last value of key= in the unit
        sed -n "s/^$2=//p" "$1" | tail -1
}
EXEC=$(unit_value "$SVC" ExecStart)
EXEC_BIN=${EXEC%% *}
EXEC_ARGS=${EXEC#"$EXEC_BIN"}
[ -x "$ROOT$EXEC_BIN" ] || fail "ExecStart binary $EXEC_BIN is not in the package"
ok "ExecStart $EXEC"
reload_bin=$(unit_value "$SVC" ExecReload); reload_bin=${reload_bin%% *}
[ -x "$reload_bin" ] || fail "ExecReload binary $reload_bin missing on this host"
dpkg-deb -f "$PKG_DIR"/deb/agent-broker_*.deb Depends | grep -q procps || fail "agent-broker does not depend on procps ($reload_bin)"
ok "ExecReload $reload_bin (procps)"
[ -x "$ROOT/usr/bin/agent-brokerctl" ] || fail "agent-brokerctl missing"
JWKS_SVC=$UNITS/agent-broker-jwks.service
JWKS_EXEC=$(unit_value "$JWKS_SVC" ExecStart)
[ -x "$ROOT${JWKS_EXEC%% *}" ] || fail "the JWKS service's ExecStart binary ${JWKS_EXEC%% *} is not in the package"
[ "$(unit_value "$JWKS_SVC" RuntimeDirectory)" = agent-broker ] && [ "$(unit_value "$JWKS_SVC" RuntimeDirectoryPreserve)" = yes ] \
        || fail "agent-broker-jwks.service must keep /run/agent-broker (RuntimeDirectoryPreserve=yes): it holds the sockets"
ok "JWKS publisher: $JWKS_EXEC (RuntimeDirectoryPreserve=yes)"

# Every man page the units and the pages name, and every page in docs/man.
for ref in $(grep -h '^Documentation=' "$UNITS"/agent-broker*.s* "$UNITS"/agent-broker*.timer | sed 's/^Documentation=//' | tr ' ' '\n' | sort -u); do
        page=${ref#man:}; name=${page%(*}; sec=${page##*(}; sec=${sec%)}
        [ -f "$ROOT/usr/share/man/man$sec/$name.$sec.gz" ] || fail "unit documentation $ref is not installed"
done
for f in docs/man/*.[1-8]; do
        sec=${f##*.}
        [ -f "$ROOT/usr/share/man/man$sec/$(basename "$f").gz" ] || fail "$f is not installed"
done
for b in agent-brokerd:8 agent-brokerctl:1; do
        [ -f "$ROOT/usr/share/man/man${b#*:}/${b%:*}.${b#*:}.gz" ] || fail "no man page for ${b%:*}"
done
ok "man pages: $(cd "$ROOT/usr/share/man" && ls man*/* | tr '\n' ' ')"

# The PAM module where this host's libpam looks for modules.
PAM_HOST_DIR=$(dirname "$(dpkg -L libpam-modules 2>/dev/null | grep '/pam_unix\.so$' | head -1)")
[ -n "$PAM_HOST_DIR" ] && [ "$PAM_HOST_DIR" != . ] || PAM_HOST_DIR=/lib/$MA/security
[ -f "$ROOT$PAM_HOST_DIR/pam_agent_broker.so" ] || fail "pam_agent_broker.so is not in $PAM_HOST_DIR"
ok "PAM module in $PAM_HOST_DIR"

# Library, header, pkg-config.
LIBDIR=/usr/lib/$MA
[ -e "$ROOT$LIBDIR/libagentbroker.so.0" ] && [ -e "$ROOT$LIBDIR/libagentbroker.so" ] || fail "library or its links missing in $LIBDIR"
[ "$(readlink -f "$ROOT$LIBDIR/libagentbroker.so")" = "$(readlink -f "$ROOT$LIBDIR/libagentbroker.so.0")" ] || fail "libagentbroker.so does not point at .so.0"
[ -f "$ROOT/usr/include/agentbroker.h" ] || fail "agentbroker.h missing"
PC=$ROOT$LIBDIR/pkgconfig/agentbroker.pc
grep -qx "libdir=$LIBDIR" "$PC" && grep -qx "includedir=/usr/include" "$PC" || fail "agentbroker.pc has the wrong paths: $(cat "$PC")"
ok "libagentbroker in $LIBDIR, agentbroker.h, agentbroker.pc"

# The library package's symbols and shlibs: every symbol the library exports,
# with a version, so that dpkg-shlibdeps gives dependants the right minimum.
LIBDEB=$(ls "$PKG_DIR"/deb/libagentbroker0_*.deb)
SYMS=$(dpkg-deb -I "$LIBDEB" symbols) || fail "libagentbroker0 has no DEBIAN/symbols"
head -1 <<<"$SYMS" | grep -qx 'libagentbroker.so.0 libagentbroker0 #MINVER#' || fail "symbols: wrong header: $(head -1 <<<"$SYMS")"
exported=$(objdump -T "$ROOT$LIBDIR/libagentbroker.so.0" | awk '$2 == "g" && $(NF-1) ~ /^AGENTBROKER_/ { print $NF "@" $(NF-1) }' | sort)
listed=$(sed -n 's/^ \([^ ]*\) .*/\1/p' <<<"$SYMS" | sort)
[ -n "$exported" ] && [ "$exported" = "$listed" ] || fail "symbols file and library differ: $(diff <(echo "$listed") <(echo "$exported") | tr '\n' ' ')"
dpkg-deb -I "$LIBDEB" shlibs | grep -qx 'libagentbroker 0 libagentbroker0 (>= 0.1.0)' || fail "libagentbroker0 has no versioned shlibs"
ok "libagentbroker0: symbols ($(wc -l <<<"$listed") symbols) and shlibs"

# Configuration: broker.conf a conffile; policy.d and trusted-keys present.
[ -f "$ROOT/etc/agent-broker/broker.conf" ] && [ -d "$ROOT/etc/agent-broker/policy.d" ] && \
        [ -d "$ROOT/etc/agent-broker/trusted-keys" ] || fail "/etc/agent-broker incomplete"
dpkg-deb --ctrl-tarfile "$PKG_DIR"/deb/agent-broker_*.deb | tar -xOf - ./conffiles | grep -qx /etc/agent-broker/broker.conf \
        || fail "broker.conf is not a conffile"
ok "/etc/agent-broker/broker.conf is a conffile; policy.d/ and trusted-keys/"
[ -f "$ROOT/usr/share/doc/agent-broker/examples/demo.json" ] || fail "example policy missing"
[ -f "$ROOT/usr/share/bash-completion/completions/agent-brokerctl" ] || fail "bash completion missing"
ok "examples, bash completion"

# Maintainer scripts: sockets enabled and started, state removed on purge only.
CTL=$T/control; mkdir -p "$CTL"; dpkg-deb -e "$PKG_DIR"/deb/agent-broker_*.deb "$CTL"
for s in postinst prerm postrm; do sh -n "$CTL/$s" || fail "$s: syntax"; done
# An upgrade stops nothing: the sockets keep listening, an enabled JWKS timer keeps running.
if [ -f "$CTL/preinst" ] && grep -q "stop" "$CTL/preinst"; then fail "preinst stops units on upgrade"; fi
grep -q "enable 'agent-broker.socket'" "$CTL/postinst" && grep -q "enable 'agent-broker-admin.socket'" "$CTL/postinst" \
        || fail "postinst does not enable the sockets"
grep -q "start 'agent-broker-admin.socket' 'agent-broker.socket'" "$CTL/postinst" || fail "postinst does not start the sockets"
grep -q "try-restart agent-broker.service" "$CTL/postinst" || fail "postinst does not restart the service on upgrade"
grep -q "stop 'agent-broker-admin.socket' 'agent-broker.socket'" "$CTL/prerm" || fail "prerm does not stop the sockets"
# The JWKS timer is opt-in: postinst keeps an admin's choice (enable only
# where it was enabled before), never starts it; prerm stops it on removal.
awk '/^# Automatically added/ { b = "" } { b = b $0 "\n" }
     /^# End automatically added/ && b ~ /enable .agent-broker-jwks\.timer/ && b !~ /debian-installed .agent-broker-jwks\.timer/ { bad = 1 }
     END { exit bad }' "$CTL/postinst" || fail "postinst enables the JWKS timer on a new install (it is opt-in)"
grep -q "update-state 'agent-broker-jwks.timer'" "$CTL/postinst" || fail "postinst does not register the JWKS timer"
if grep -q "start .*agent-broker-jwks" "$CTL/postinst"; then fail "postinst starts the JWKS timer"; fi
grep -q "stop agent-broker.service agent-broker-jwks.timer agent-broker-jwks.service" "$CTL/prerm" || fail "prerm does not stop the JWKS timer"
PURGE_ROOT=$T/purge; mkdir -p "$PURGE_ROOT/var/lib/agent-broker" "$PURGE_ROOT/var/log/agent-broker"
# Our own part of postrm only (debhelper's part would touch this host's systemd state).
{ echo 'set -e'; sed -n '/^if \[ "\$1" = purge \]; then/,/^fi/p' "$CTL/postrm"; } >"$T/postrm.test"
grep -q 'DPKG_ROOT' "$T/postrm.test" || fail "postrm's purge ignores DPKG_ROOT"
DPKG_ROOT=$PURGE_ROOT sh "$T/postrm.test" remove || fail "postrm remove"
[ -d "$PURGE_ROOT/var/lib/agent-broker" ] || fail "postrm remove deleted the state"
DPKG_ROOT=$PURGE_ROOT sh "$T/postrm.test" purge 2>"$T/purge.err" || fail "postrm purge"
[ -d "$PURGE_ROOT/var/lib/agent-broker" ] && [ -d "$PURGE_ROOT/var/log/agent-broker" ] || fail "postrm purge deleted the audit trail or keys"
grep -q "kept $PURGE_ROOT/var/log/agent-broker" "$T/purge.err" || fail "postrm purge does not say where the audit trail is"
ok "maintainer scripts: sockets enabled and started, nothing stopped on upgrade, service try-restarted, JWKS timer shipped but not enabled, state and audit trail kept on remove and purge"

# The same paths in the .rpm.
RPM_MAIN=$(ls "$PKG_DIR"/rpm/RPMS/*/agent-broker-[0-9]*.rpm)
rpm_files=$(rpm -qlp "$PKG_DIR"/rpm/RPMS/*/*.rpm 2>/dev/null)
RPM_UNITDIR=$(rpm --eval '%{?_unitdir}%{!?_unitdir:/usr/lib/systemd/system}')  # as the spec's fallback
for f in "$RPM_UNITDIR/agent-broker.socket" "$RPM_UNITDIR/agent-broker-admin.socket" \
         "$RPM_UNITDIR/agent-broker.service" "$RPM_UNITDIR/agent-broker-jwks.service" "$RPM_UNITDIR/agent-broker-jwks.timer" \
         "$EXEC_BIN" /usr/bin/agent-brokerctl \
         "$(rpm --eval '%{_libdir}')/security/pam_agent_broker.so" /etc/agent-broker/broker.conf \
         "$(rpm --eval '%{_libdir}')/libagentbroker.so.0" /usr/include/agentbroker.h; do
        grep -qx "$f" <<<"$rpm_files" || fail "$f is not in the .rpm packages"
done
# the examples where agent-broker.policy(5) says (Debian's rpm names the docdir NAME-VERSION, Fedora's NAME)
grep -Eqx "/usr/share/doc/agent-broker(-[0-9.]+)?/examples/demo.json" <<<"$rpm_files" || fail "the .rpm has no docdir/examples/"
for f in docs/man/*.[1-8]; do
        grep -q "/man${f##*.}/$(basename "$f")" <<<"$rpm_files" || fail "$f is not in the .rpm"
done
rpm -qp --configfiles "$RPM_MAIN" 2>/dev/null | grep -qx /etc/agent-broker/broker.conf || fail "broker.conf is not %config in the .rpm"
rpm -qp --scripts "$RPM_MAIN" 2>/dev/null | grep -q 'agent-broker.socket' || fail ".rpm scriptlets do not name the sockets"
rpm -qp --scripts "$RPM_MAIN" 2>/dev/null | grep -q 'agent-broker-jwks.timer' || fail ".rpm scriptlets do not name the JWKS timer"
ok ".rpm: the same files, broker.conf %config, scriptlets for the units"

# ---- systemd-analyze --------------------------------------------------------
step "systemd-analyze verify (scratch root, with this host's target units)"
cp -an /lib/systemd/system/. "$UNITS"/
[ -e "$ROOT$reload_bin" ] || { mkdir -p "$ROOT$(dirname "$reload_bin")"; cp "$reload_bin" "$ROOT$reload_bin"; }
# shellcheck disable=SC2046
MANPATH=$ROOT/usr/share/man systemd-analyze verify --root="$ROOT" $(for u in $ALL_UNITS; do echo "/lib/systemd/system/$u"; done) \
        >"$T/verify.out" 2>&1 \
        || { cat "$T/verify.out"; fail "systemd-analyze verify"; }
[ ! -s "$T/verify.out" ] || { cat "$T/verify.out"; fail "systemd-analyze verify printed warnings"; }
ok "verify: no findings ($ALL_UNITS)"

step "systemd-analyze security --offline=true"
systemd-analyze security --offline=true --root="$ROOT" agent-broker.service >"$T/security.out" 2>&1 || true
EXPOSURE=$(sed -n 's/.*Overall exposure level for agent-broker.service: \([0-9.]*\).*/\1/p' "$T/security.out")
[ -n "$EXPOSURE" ] || { cat "$T/security.out"; fail "no exposure figure"; }
grep '✗' "$T/security.out" | sed 's/  */ /g; s/^/   /' || true
echo "   exposure: $EXPOSURE (at most $EXPOSURE_MAX)"
awk -v e="$EXPOSURE" -v m="$EXPOSURE_MAX" 'BEGIN { exit !(e <= m) }' || fail "exposure $EXPOSURE > $EXPOSURE_MAX"
systemd-analyze security --offline=true --root="$ROOT" agent-broker-jwks.service >"$T/security-jwks.out" 2>&1 || true
JWKS_EXPOSURE=$(sed -n 's/.*Overall exposure level for agent-broker-jwks.service: \([0-9.]*\).*/\1/p' "$T/security-jwks.out")
[ -n "$JWKS_EXPOSURE" ] || { cat "$T/security-jwks.out"; fail "no exposure figure for agent-broker-jwks.service"; }
echo "   agent-broker-jwks.service exposure: $JWKS_EXPOSURE (at most $EXPOSURE_MAX)"
awk -v e="$JWKS_EXPOSURE" -v m="$EXPOSURE_MAX" 'BEGIN { exit !(e <= m) }' || fail "JWKS service exposure $JWKS_EXPOSURE > $EXPOSURE_MAX"

# ---- end to end -------------------------------------------------------------
step "packaged broker under socket activation, in the unit's sandbox"
AGENT_SOCK=$(unit_value "$UNITS/agent-broker.socket" ListenStream)
ADMIN_SOCK=$(unit_value "$UNITS/agent-broker-admin.socket" ListenStream)
AGENT_NAME=$(unit_value "$UNITS/agent-broker.socket" FileDescriptorName)
ADMIN_NAME=$(unit_value "$UNITS/agent-broker-admin.socket" FileDescriptorName)
help=$("$ROOT$EXEC_BIN" --help)
grep -q "default $AGENT_SOCK)" <<<"$help" || fail "the agent socket $AGENT_SOCK is not the daemon's default"
grep -q "default $ADMIN_SOCK)" <<<"$help" || fail "the admin socket $ADMIN_SOCK is not the daemon's default"
grep -q "FileDescriptorName=$AGENT_NAME / $ADMIN_NAME" <<<"$help" || fail "names $AGENT_NAME/$ADMIN_NAME are not the daemon's"
ctlhelp=$("$ROOT/usr/bin/agent-brokerctl" --help)
grep -q "default $AGENT_SOCK)" <<<"$ctlhelp" && grep -q "default $ADMIN_SOCK)" <<<"$ctlhelp" || fail "the CLI's default sockets differ from the units"
ok "socket paths and names agree: units, agent-brokerd, agent-brokerctl"
SETPRIV_CAPS=-all
for cap in $(unit_value "$SVC" CapabilityBoundingSet); do
        c=${cap#CAP_}; SETPRIV_CAPS="$SETPRIV_CAPS,+${c,,}"
done
ok "capability bounding set from the unit: $SETPRIV_CAPS"

mkdir -p "$T/run" "$T/state" "$T/log" "$T/policy" "$T/home/agent"
chmod 0711 "$T/run" "$T/home"
CTL_BIN=$ROOT/usr/bin/agent-brokerctl
# An unprivileged agent whose binary only its owner can read, under a
# directory the broker's sandbox hides (as ProtectHome=yes hides /home).
cp "$CTL_BIN" "$T/home/agent/agent-brokerctl"
chown -R 65534:65534 "$T/home/agent"; chmod 0700 "$T/home/agent" "$T/home/agent/agent-brokerctl"
SHA=$(sha256sum "$CTL_BIN" | cut -d' ' -f1)
cat >"$T/policy/test.json" <<EOF
{"version": 1, "agents": [
 {"id": "pkg-root", "owner": "packaging test", "match": {"uid": 0, "sha256": "$SHA"},
  "grants": [{"audience": "mcp://pkg.test", "scopes": ["read"]}]},
 {"id": "pkg-nobody", "owner": "packaging test",
  "match": {"uid": 65534, "sha256": "$SHA", "exe": "$T/home/agent/agent-brokerctl"},
  "grants": [{"audience": "mcp://pkg.test", "scopes": ["read"]}]},
 {"id": "pkg-lib", "owner": "packaging test", "match": {"uid": 0},
  "grants": [{"audience": "mcp://pkg.test", "scopes": ["read"]}]}]}
EOF
"$CTL_BIN" policy check "$T/policy/test.json" >/dev/null 2>&1 || [ $? = 1 ] || fail "test policy does not check"

# start_broker CAPS EXTRA_ARGS...: the packaged daemon with the unit's
# ExecStart arguments, under systemd-socket-activate with the unit's socket
# names, in a mount namespace like the unit's: everything read-only but the
# state, log and socket directories (ProtectSystem=strict), the agent's
# directory hidden (ProtectHome=yes), /proc with subset=pid,hidepid=invisible
# (ProcSubset=pid, ProtectProc=invisible), and the given bounding set.
start_broker() {
        local caps=$1; shift
        rm -f "$T/run/agent" "$T/run/admin"
        # shellcheck disable=SC2086
        unshare -m --propagation private sh -c '
                set -e
                T=$1; shift
                for d in "$T/state" "$T/log" "$T/run"; do mount --bind "$d" "$d"; done
                mount -o remount,bind,ro /
                m=$(findmnt -no TARGET -T "$T"); [ "$m" = / ] || mount -o remount,bind,ro "$m"
                mount -t proc -o subset=pid,hidepid=invisible proc /proc
                mount -t tmpfs -o mode=0755 tmpfs "$T/home"
                exec "$@"' sh "$T" \
                systemd-socket-activate -l "$T/run/agent" -l "$T/run/admin" --fdname="$AGENT_NAME:$ADMIN_NAME" \
                setpriv --bounding-set="$caps" --inh-caps=-all -- \
                "$ROOT$EXEC_BIN" $EXEC_ARGS --state-dir "$T/state" --policy "$T/policy" \
                --config "$ROOT/etc/agent-broker/broker.conf" --trusted-keys "$ROOT/etc/agent-broker/trusted-keys" \
                --audit-log "$T/log/audit.jsonl" "$@" >>"$T/broker.log" 2>&1 &
        BROKER_PID=$!
        for _ in $(seq 100); do [ -S "$T/run/admin" ] && break; sleep 0.05; done
        [ -S "$T/run/admin" ] || { cat "$T/broker.log"; fail "sockets did not appear"; }
        chmod 0666 "$T/run/agent"; chmod 0600 "$T/run/admin"  # SocketMode= of the units
}
stop_broker() {
        kill -TERM "$BROKER_PID"; local rc=0; wait "$BROKER_PID" || rc=$?; BROKER_PID=
        [ "$rc" = 0 ] || { tail -20 "$T/broker.log"; fail "broker exited with $rc on SIGTERM"; }
}
CTL() { "$CTL_BIN" --socket "$T/run/agent" --admin-socket "$T/run/admin" "$@"; }
AS_NOBODY() { setpriv --reuid=65534 --regid=65534 --clear-groups "$T/home/agent/agent-brokerctl" --socket "$T/run/agent" "$@"; }

start_broker "$SETPRIV_CAPS"
TOKEN=$(CTL token --audience mcp://pkg.test --scope read) || { cat "$T/broker.log"; fail "root: no token"; }
[ "$(tr -cd . <<<"$TOKEN" | wc -c)" = 2 ] || fail "not a compact JWS: $TOKEN"
ok "root: token ${TOKEN:0:24}..."
CTL introspect "$TOKEN" --audience mcp://pkg.test >/dev/null || fail "introspect: token not active"
ok "introspect: active"
rc=0; CTL token --audience mcp://pkg.test --scope write >/dev/null 2>&1 || rc=$?
[ "$rc" = 1 ] || fail "a scope outside policy: exit $rc, expected 1 (denied)"
ok "scope outside policy denied (exit 1)"
PID_DAEMON=$(pgrep -f "^$ROOT$EXEC_BIN" | head -1)
[ -n "$PID_DAEMON" ] && grep -q "^CapEff:.*0000000000080004$" "/proc/$PID_DAEMON/status" || \
        echo "   note: daemon capabilities: $(grep CapEff "/proc/$PID_DAEMON/status" 2>/dev/null)"
NTOKEN=$(AS_NOBODY token --audience mcp://pkg.test --scope read) || { tail -5 "$T/broker.log"; fail "uid 65534: no token"; }
ok "uid 65534, 0700 binary under a hidden directory, matched by sha256 and exe: token ${NTOKEN:0:24}..."
# The packaged library, header and pkg-config file, from C.
cat >"$T/libtest.c" <<'EOF'
#include <stdio.h>
#include <agentbroker.h>
int main(int argc, char **argv)
{
        ab_client *c = NULL;
        char *token = NULL;
        const char *scopes[] = { "read" };
        int r = ab_client_connect(argv[1], 0, &c);
        if (r == 0)
                r = ab_issue_token(c, "mcp://pkg.test", scopes, 1, 0, NULL, &token);
        if (r < 0) {
                fprintf(stderr, "%s\n", ab_strerror(r));
                return 1;
        }
        puts(token);
        ab_token_free(token);
        ab_client_free(c);
        return argc == 2 ? 0 : 1;
}
EOF
# shellcheck disable=SC2046
cc -o "$T/libtest" "$T/libtest.c" $(PKG_CONFIG_SYSROOT_DIR="$ROOT" PKG_CONFIG_LIBDIR="$ROOT$LIBDIR/pkgconfig" \
        pkg-config --cflags --libs agentbroker) || fail "cannot build against the packaged library"
LD_LIBRARY_PATH=$ROOT$LIBDIR "$T/libtest" "$T/run/agent" >/dev/null || fail "the packaged library got no token"
ok "libagentbroker (pkg-config, header, .so) from C: token"
CTL sessions >"$T/sessions.out" || fail "admin socket: sessions"
grep -q pkg-root "$T/sessions.out" && grep -q pkg-nobody "$T/sessions.out" || { cat "$T/sessions.out"; fail "sessions incomplete"; }
ok "admin socket: sessions of pkg-root and pkg-nobody"
CTL keys >"$T/jwks.json" || fail "keys"
# The JWKS service's own command line, the path moved into the scratch dir,
# as nobody and under a umask that would hide the file: still 0644, the same keys.
JWKS_OUT=$T/run/pub/jwks.json
mkdir -p "$T/run/pub"; chown 65534:65534 "$T/run/pub"
# shellcheck disable=SC2086
(umask 077; AS_NOBODY $(sed "s|/run/agent-broker/jwks.json|$JWKS_OUT|" <<<"${JWKS_EXEC#* }")) || fail "keys --jwks --out as nobody"
[ "$(stat -c %a "$JWKS_OUT")" = 644 ] || fail "published JWKS has mode $(stat -c %a "$JWKS_OUT"), not 0644"
cmp -s "$JWKS_OUT" "$T/jwks.json" || fail "published JWKS differs from agent-brokerctl keys"
[ "$(ls "$T/run/pub")" = jwks.json ] || fail "temporary files left beside the JWKS: $(ls "$T/run/pub")"
ok "JWKS service command: $JWKS_OUT, mode 0644, the broker's keys (as uid 65534)"
stop_broker
CTL audit verify --file "$T/log/audit.jsonl" --keys "$T/jwks.json" >/dev/null || fail "audit verify"
ok "SIGTERM: clean exit; the audit trail in the logs directory verifies against the JWKS"

step "idle exit and activation again (state in LMDB)"
SID=$(awk '$2 == "pkg-root" { print $1 }' "$T/sessions.out" | head -1)
start_broker "$SETPRIV_CAPS" --exit-idle 1
CTL status >/dev/null || fail "status after restart"
for _ in $(seq 60); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$BROKER_PID" 2>/dev/null; then fail "broker did not exit when idle"; fi
rc=0; wait "$BROKER_PID" || rc=$?; BROKER_PID=
[ "$rc" = 0 ] || fail "idle exit status $rc"
ok "exited after 1 s idle with status 0"
start_broker "$SETPRIV_CAPS"
CTL sessions | grep -q "^$SID" || fail "session $SID lost across the restart"
CTL introspect "$TOKEN" --audience mcp://pkg.test >/dev/null || fail "token not active after the restart"
ok "activated again: session $SID and the earlier token still known"
stop_broker

step "each capability of the unit is needed"
for cap in $(unit_value "$SVC" CapabilityBoundingSet); do
        without=$(sed "s/,+${cap#CAP_}//I" <<<"$SETPRIV_CAPS")
        start_broker "$without"
        rc=0; AS_NOBODY token --audience mcp://pkg.test --scope read >/dev/null 2>&1 || rc=$?
        stop_broker
        [ "$rc" != 0 ] || fail "uid 65534 got a token without $cap: the unit could drop it"
        ok "without $cap: uid 65534 refused (exit $rc)"
done

echo "PASS: packaging (lintian $LE errors $LW warnings; rpmlint $RE errors $RW warnings; exposure $EXPOSURE, JWKS service $JWKS_EXPOSURE) in $(($(date +%s) - T0)) s"
