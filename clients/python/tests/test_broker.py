# SPDX-License-Identifier: MIT
"""agentbroker.py against a real agent-brokerd.

tests/integration/test-clients.c starts the broker with a policy made for
these tests and sets:

  AGENT_BROKER_SOCKET        the agent socket (without it every test here is skipped)
  AGENT_BROKER_ADMIN_SOCKET  the admin socket (optional: the admin revocation test)
  AB_TEST_AGENT              the agent entry this interpreter matches (python-client)
  AB_TEST_REAUTH             its session's reauth_interval in seconds (3)

The policy grants that agent mcp://notes.test (notes:read, notes:write,
max_ttl 600) and https://other.test (other:read, max_ttl 60), default
max_delegation_depth 1; uid 65534 is the agent nobody-client (mcp://notes.test
notes:read); uid 1 matches no agent.
"""

import base64
import json
import os
import socket
import stat
import sys
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import agentbroker as ab  # noqa: E402

SOCK = os.environ.get("AGENT_BROKER_SOCKET")
ADMIN = os.environ.get("AGENT_BROKER_ADMIN_SOCKET")
AGENT = os.environ.get("AB_TEST_AGENT", "python-client")
REAUTH = int(os.environ.get("AB_TEST_REAUTH", "3"))
NOTES = "mcp://notes.test"
OTHER = "https://other.test"


def have_broker():
    try:
        return SOCK is not None and stat.S_ISSOCK(os.stat(SOCK).st_mode)
    except OSError:
        return False


def jwt_part(token, i):
    seg = token.split(".")[i]
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


def in_child(fn, uid=None):
    """Run fn() in a forked child (a new process: its own broker session), as uid if given.
    Returns (exit code, what fn returned or the exception it raised as a dict)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            out = fn()
        except BaseException as e:  # report everything to the parent
            out = {"exception": type(e).__name__, "error": getattr(e, "error", None), "message": str(e)}
            code = 1
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    _, st = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(st), json.loads(data.decode() or "null")


@unittest.skipUnless(have_broker(), "AGENT_BROKER_SOCKET names no broker socket: run through make check")
class TestBroker(unittest.TestCase):
    def setUp(self):
        self.c = ab.connect()
        self.addCleanup(self.c.close)

    def test_connect_uses_the_environment(self):
        self.assertEqual(self.c.path, SOCK)

    def test_whoami(self):
        w = self.c.whoami()
        self.assertEqual(w["agent"], AGENT)
        self.assertEqual(w["uid"], os.geteuid())
        self.assertEqual(w["pid"], os.getpid())
        self.assertEqual(os.path.realpath(w["exe"]), os.path.realpath(sys.executable))
        self.assertEqual(sorted(g["audience"] for g in w["grants"]), [OTHER, NOTES])

    def test_authenticate(self):
        s = self.c.authenticate()
        now = time.time()
        self.assertEqual(len(s["sid"]), 22)
        self.assertEqual(s["agent"], AGENT)
        self.assertEqual(s["state"], "active")
        self.assertLessEqual(abs(s["auth_time"] - now), 2)
        self.assertEqual(s["reauth_before"], s["auth_time"] + REAUTH)
        self.assertEqual(self.c.whoami()["session"]["sid"], s["sid"])
        self.assertIn(s["sid"], [x["sid"] for x in self.c.list_sessions()])

    def test_issue(self):
        t = self.c.issue(NOTES, ["notes:read"], ttl=120, task="unit test")
        self.assertEqual(t.token_type, "Bearer")
        self.assertEqual(t.scope, "notes:read")
        self.assertEqual(t.agent, AGENT)
        self.assertTrue(0 < t.expires_in <= 120)
        self.assertEqual(len(t.jti), 43)
        self.assertEqual(t.jti[:21], t.sid[:21], "a jti starts with its session id")
        hdr, claims = jwt_part(t.token, 0), jwt_part(t.token, 1)
        self.assertEqual((hdr["alg"], hdr["typ"]), ("EdDSA", "at+jwt"))
        self.assertEqual(claims["aud"], NOTES)
        self.assertEqual(claims["sub"], AGENT)
        self.assertEqual(claims["scope"], "notes:read")
        self.assertEqual(claims["jti"], t.jti)
        self.assertEqual(claims["exp"], t.expires_at)
        self.assertIn(hdr["kid"], [k["kid"] for k in self.c.get_keys()["keys"]])

    def test_default_ttl_and_scope_string(self):
        t = self.c.issue(NOTES, "notes:write")
        self.assertEqual(t.scopes, ["notes:write"])
        self.assertTrue(0 < t.expires_in <= 300)

    def test_get_keys(self):
        keys = self.c.get_keys()["keys"]
        self.assertGreaterEqual(len(keys), 1)
        for k in keys:
            self.assertEqual((k["kty"], k["crv"], k["alg"]), ("OKP", "Ed25519", "EdDSA"))
            self.assertEqual(len(base64.urlsafe_b64decode(k["x"] + "=")), 32)

    def test_denials_are_typed(self):
        with self.assertRaises(ab.AudienceNotGranted) as cm:
            self.c.issue("https://nope.test", ["x"])
        self.assertEqual(cm.exception.error, "io.agentbroker.AudienceNotGranted")
        self.assertTrue(cm.exception.reason)
        self.assertRaises(ab.ScopeNotGranted, self.c.issue, NOTES, ["notes:read", "notes:admin"])
        self.assertRaises(ab.TtlTooLong, self.c.issue, OTHER, ["other:read"], ttl=61)
        self.c.issue(OTHER, ["other:read"], ttl=60)
        with self.assertRaises(ab.InvalidParameter) as cm:
            self.c.issue(NOTES, ["notes:read"], ttl=0)
        self.assertEqual(cm.exception.parameter, "ttl")
        with self.assertRaises(ab.MethodNotFound):
            self.c.call("io.agentbroker.NoSuchMethod")

    def test_introspect(self):
        t = self.c.issue(NOTES, ["notes:read", "notes:write"], ttl=60)
        v = self.c.introspect(t, audience=NOTES, scope="notes:write", service="python-test")
        self.assertIs(v["active"], True)
        self.assertEqual((v["aud"], v["sub"], v["jti"], v["sid"]), (NOTES, AGENT, t.jti, t.sid))
        self.assertEqual(self.c.introspect(t.token, audience=OTHER), {"active": False, "reason": "wrong_audience"})
        self.assertEqual(self.c.introspect(t, scope="notes:admin")["reason"], "scope_missing")
        self.assertEqual(self.c.introspect("a.b.c")["reason"], "bad_signature")
        parts = t.token.split(".")
        forged = parts[0] + "." + parts[1] + "." + parts[2][:-4] + ("AAAA" if parts[2][-4:] != "AAAA" else "BBBB")
        self.assertEqual(self.c.introspect(forged)["active"], False)

    def test_attenuate(self):
        parent = self.c.issue(NOTES, ["notes:read", "notes:write"], ttl=120)
        child = self.c.attenuate(parent, scopes=["notes:read"], ttl=30, task="read only")
        self.assertEqual(child.scope, "notes:read")
        self.assertEqual((child.parent, child.depth), (parent.jti, 1))
        self.assertTrue(child.expires_at <= parent.expires_at)
        claims = jwt_part(child.token, 1)
        self.assertEqual(claims["act"]["sub"], AGENT)
        self.assertIs(self.c.introspect(child, audience=NOTES)["active"], True)
        # never wider, never silently narrower
        narrow = self.c.issue(NOTES, ["notes:read"], ttl=60)
        self.assertRaises(ab.ScopeNotGranted, self.c.attenuate, narrow, scopes=["notes:read", "notes:write"])
        self.assertRaises(ab.AudienceNotGranted, self.c.attenuate, parent, audience=OTHER)
        self.assertRaises(ab.TtlTooLong, self.c.attenuate, parent, ttl=600)
        self.assertRaises(ab.DelegationTooDeep, self.c.attenuate, child)
        with self.assertRaises(ab.InvalidToken) as cm:
            self.c.attenuate("not.a.token")
        self.assertEqual(cm.exception.verdict, "bad_signature")

    def test_revoke_own(self):
        a = self.c.issue(NOTES, ["notes:read"], ttl=60)
        b = self.c.issue(NOTES, ["notes:read"], ttl=60)
        child = self.c.attenuate(b, ttl=30)
        self.assertGreaterEqual(self.c.revoke(jti=a.jti), 1)
        self.assertEqual(self.c.introspect(a)["reason"], "revoked")
        self.assertIs(self.c.introspect(b)["active"], True)
        self.assertGreaterEqual(self.c.revoke(token=b), 1)
        self.assertEqual(self.c.introspect(b)["reason"], "revoked")
        self.assertEqual(self.c.introspect(child)["reason"], "revoked", "revoking a parent ends its children")
        with self.assertRaises(ab.InvalidToken) as cm:
            self.c.attenuate(b)
        self.assertEqual(cm.exception.verdict, "revoked")
        # the session itself goes on
        self.assertIs(self.c.introspect(self.c.issue(NOTES, ["notes:read"]))["active"], True)

    def test_cache(self):
        now = [time.time()]
        c = ab.connect(clock=lambda: now[0])
        self.addCleanup(c.close)
        t1 = c.cached_token(NOTES, ["notes:write", "notes:read"], ttl=60)
        self.assertEqual(c.cached_token(NOTES, ["notes:read", "notes:write"], ttl=60).jti, t1.jti)
        now[0] += 39
        self.assertEqual(c.token(NOTES, ["notes:read", "notes:write"], ttl=60), t1.token)
        now[0] += 2  # past 2/3 of 60 s
        t2 = c.cached_token(NOTES, ["notes:read", "notes:write"], ttl=60)
        self.assertNotEqual(t2.jti, t1.jti)
        self.assertIs(c.introspect(t2, audience=NOTES, scope="notes:write")["active"], True)
        c.revoke(jti=t2.jti)
        t3 = c.cached_token(NOTES, ["notes:read", "notes:write"], ttl=60)
        self.assertNotEqual(t3.jti, t2.jti, "a token revoked through the client leaves the cache")

    def test_cache_answers_only_the_same_request(self):
        c = ab.connect()
        self.addCleanup(c.close)
        short = c.cached_token(NOTES, ["notes:read"], ttl=60)
        long = c.cached_token(NOTES, ["notes:read"], ttl=300)
        self.assertNotEqual(long.jti, short.jti)
        claims = jwt_part(long.token, 1)
        self.assertEqual(claims["exp"] - claims["iat"], 300, "ttl=300 gets a 300 s token, not the cached 60 s one")
        claims = jwt_part(c.token(NOTES, ["notes:read"], ttl=60), 1)
        self.assertEqual((claims["jti"], claims["exp"] - claims["iat"]), (short.jti, 60))
        a = c.cached_token(NOTES, ["notes:read"], ttl=60, task="task A")
        b = c.cached_token(NOTES, ["notes:read"], ttl=60, task="task B")
        self.assertEqual(jwt_part(a.token, 1).get("task"), "task A")
        self.assertEqual(jwt_part(b.token, 1).get("task"), "task B", "a token labelled for task A is not reused for B")
        self.assertNotIn("task", jwt_part(short.token, 1))
        self.assertEqual(c.cached_token(NOTES, ["notes:read"], ttl=60, task="task A").jti, a.jti)

    def test_reauth_required_is_handled(self):
        first = self.c.authenticate()
        time.sleep(REAUTH + 1.1)
        with self.assertRaises(ab.ReauthRequired) as cm:
            self.c.call("io.agentbroker.IssueToken", {"audience": NOTES, "scopes": ["notes:read"]})
        self.assertEqual(cm.exception.parameters["sid"], first["sid"])
        t = self.c.issue(NOTES, ["notes:read"])  # authenticates once and retries
        self.assertEqual(t.sid, first["sid"], "re-authentication keeps the session")
        self.assertGreater(t.auth_time, first["auth_time"])
        self.assertEqual(jwt_part(t.token, 1)["auth_time"], t.auth_time)

    def test_own_session_revoked(self):
        def child():
            c = ab.connect()
            t = c.issue(NOTES, ["notes:read"])
            n = c.revoke(sid=t.sid)
            out = {"revoked": n, "verdict": c.introspect(t)["reason"]}
            for name, fn in (("issue", lambda: c.issue(NOTES, ["notes:read"])), ("authenticate", c.authenticate)):
                try:
                    fn()
                    out[name] = "no error"
                except ab.BrokerError as e:
                    out[name] = type(e).__name__
            return out
        code, out = in_child(child)
        self.assertEqual(code, 0, out)
        self.assertGreaterEqual(out["revoked"], 1)
        self.assertEqual(out["verdict"], "revoked")
        self.assertEqual(out["issue"], "SessionRevoked")
        self.assertEqual(out["authenticate"], "SessionRevoked")
        # this process's session is another one and still works
        self.assertIs(self.c.introspect(self.c.issue(NOTES, ["notes:read"]))["active"], True)

    @unittest.skipUnless(os.geteuid() == 0, "needs root to run a child as another uid")
    def test_not_an_agent(self):
        def child():
            c = ab.connect()
            try:
                c.issue(NOTES, ["notes:read"])
            except ab.NotAnAgent as e:
                return {"error": e.error, "reason": e.reason}
            return {"error": None}
        code, out = in_child(child, uid=1)
        self.assertEqual(code, 0, out)
        self.assertEqual(out["error"], "io.agentbroker.NotAnAgent")
        self.assertTrue(out["reason"])

    @unittest.skipUnless(os.geteuid() == 0, "needs root to run a child as another uid")
    def test_another_uids_token(self):
        code, out = in_child(lambda: {"token": ab.connect().issue(NOTES, ["notes:read"]).token}, uid=65534)
        self.assertEqual(code, 0, out)
        theirs = out["token"]
        self.assertEqual(jwt_part(theirs, 1)["sub"], "nobody-client")
        self.assertRaises(ab.PermissionDenied, self.c.revoke, token=theirs)
        self.assertRaises(ab.PermissionDenied, self.c.revoke, jti=jwt_part(theirs, 1)["jti"])
        self.assertRaises(ab.PermissionDenied, self.c.attenuate, theirs)
        self.assertIs(self.c.introspect(theirs)["active"], True, "anyone may introspect")

    @unittest.skipUnless(ADMIN, "AGENT_BROKER_ADMIN_SOCKET not set")
    def test_admin_revocation(self):
        t = self.c.issue(NOTES, ["notes:read"], ttl=60)
        with ab.connect(ADMIN) as admin:
            self.assertGreaterEqual(admin.call("io.agentbroker.admin.Revoke", {"jti": t.jti})["revoked"], 1)
            self.assertRaises(ab.InvalidParameter, admin.call, "io.agentbroker.admin.Revoke", {})
        self.assertEqual(self.c.introspect(t)["reason"], "revoked")

    @unittest.skipUnless(ADMIN, "AGENT_BROKER_ADMIN_SOCKET not set")
    def test_admin_errors_are_typed(self):
        with ab.connect(ADMIN) as admin:
            with self.assertRaises(ab.NoSuchSession) as cm:
                admin.call("io.agentbroker.admin.Revoke", {"sid": "A" * 22})
            self.assertEqual(cm.exception.error, "io.agentbroker.admin.NoSuchSession")
            with self.assertRaises(ab.NoSuchAgent) as cm:
                admin.call("io.agentbroker.admin.ShowPolicy", {"agent": "no-such-agent"})
            self.assertEqual(cm.exception.error, "io.agentbroker.admin.NoSuchAgent")

    def test_socket_closed_by_broker_is_reopened(self):
        self.c.whoami()
        # what an idle timeout does: the broker's end goes away
        self.c._sock.shutdown(socket.SHUT_WR)
        time.sleep(0.1)
        self.assertEqual(self.c.whoami()["agent"], AGENT)


if __name__ == "__main__":
    unittest.main()
