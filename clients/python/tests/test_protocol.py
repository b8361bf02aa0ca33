# SPDX-License-Identifier: MIT
"""agentbroker.py against a scripted fake varlink server: framing, error
mapping, retries, limits and the token cache. Needs no broker."""

import json
import os
import socket
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import agentbroker as ab  # noqa: E402


class FakeBroker:
    """A Unix socket server in a thread. handler(request_dict, conn_index) returns the
    bytes to send (without the NUL: str/dict are encoded and NUL-terminated), or None to
    close the connection without a reply, or ("close", bytes) to send and then close, or a
    list of those to send one after the other, where a float is a pause (seconds)."""

    def __init__(self, handler):
        self.dir = tempfile.mkdtemp(prefix="ab-fake-")
        self.path = os.path.join(self.dir, "sock")
        self.handler = handler
        self.requests = []
        self.connections = 0
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(8)
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._conn, args=(conn, self.connections), daemon=True).start()

    def _conn(self, conn, index):
        buf = b""
        with conn:
            while not self.stop:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    req = json.loads(raw.decode())
                    self.requests.append(req)
                    out = self.handler(req, index)
                    if out is None:
                        return
                    close_after = isinstance(out, tuple)
                    if close_after:
                        out = out[1]
                    try:
                        for part in out if isinstance(out, list) else [out]:
                            if isinstance(part, float):
                                time.sleep(part)
                                continue
                            if isinstance(part, dict):
                                part = json.dumps(part).encode() + b"\0"
                            elif isinstance(part, str):
                                part = part.encode() + b"\0"
                            conn.sendall(part)
                    except OSError:
                        return
                    if close_after:
                        return

    def close(self):
        self.stop = True
        try:
            self.srv.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self.srv.close()
        self.thread.join(2)
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.rmdir(self.dir)


def token_reply(jti="j1", expires_in=300, scope="a b", now=None):
    now = int(time.time() if now is None else now)
    return {"parameters": {"token": "h.p." + jti, "token_type": "Bearer", "expires_in": expires_in,
                           "expires_at": now + expires_in, "jti": jti, "scope": scope, "agent": "x",
                           "sid": "s" * 22, "auth_time": now}}


def fb_ttl(req):
    return req.get("parameters", {}).get("ttl")


def err(name, **params):
    return {"error": name, "parameters": params}


class Base(unittest.TestCase):
    def serve(self, handler):
        fb = FakeBroker(handler)
        self.addCleanup(fb.close)
        return fb


class TestFraming(Base):
    def test_request_is_json_and_nul_and_omits_none(self):
        fb = self.serve(lambda req, i: token_reply())
        with ab.connect(fb.path) as c:
            t = c.issue("aud://x", ["b", "a"], ttl=60)
            c.issue("aud://x", "single")
        self.assertEqual(fb.requests[0], {"method": "io.agentbroker.IssueToken",
                                          "parameters": {"audience": "aud://x", "scopes": ["b", "a"], "ttl": 60}})
        self.assertEqual(fb.requests[1]["parameters"]["scopes"], ["single"])
        self.assertEqual(t.token, "h.p.j1")
        self.assertEqual(t.scopes, ["a", "b"])
        self.assertEqual(fb.connections, 1, "one connection for several calls")

    def test_method_names(self):
        fb = self.serve(lambda req, i: {"parameters": {"keys": [], "revoked": 1, "active": False,
                                                       "sessions": [{"sid": "x"}]}})
        with ab.connect(fb.path) as c:
            c.authenticate()
            c.whoami()
            self.assertEqual(c.get_keys(), {"keys": [], "revoked": 1, "active": False, "sessions": [{"sid": "x"}]})
            c.introspect("tok", audience="a", scope="s", max_auth_age=5)
            self.assertEqual(c.revoke(jti="J"), 1)
            c.revoke(sid="S")
            c.revoke(token="T")
            self.assertEqual(c.list_sessions(), [{"sid": "x"}])
        got = [(r["method"].rsplit(".", 1)[1], r.get("parameters")) for r in fb.requests]
        self.assertEqual(got, [
            ("Authenticate", None), ("WhoAmI", None), ("GetKeys", None),
            ("Introspect", {"token": "tok", "audience": "a", "scope": "s", "max_auth_age": 5}),
            ("Revoke", {"jti": "J"}), ("Revoke", {"sid": "S"}), ("Revoke", {"token": "T"}),
            ("ListSessions", None)])

    def test_attenuate_parameters(self):
        fb = self.serve(lambda req, i: token_reply(jti="child"))
        with ab.connect(fb.path) as c:
            parent = c.issue("aud", ["a", "b"])
            child = c.attenuate(parent, scopes="a", ttl=10, task="t")
        self.assertEqual(fb.requests[1]["parameters"], {"token": "h.p.child", "scopes": ["a"], "ttl": 10, "task": "t"})
        self.assertEqual(child.jti, "child")

    def test_revoke_needs_exactly_one(self):
        fb = self.serve(lambda req, i: {"parameters": {"revoked": 1}})
        c = ab.Client(fb.path)
        self.assertRaises(ValueError, c.revoke)
        self.assertRaises(ValueError, c.revoke, jti="a", sid="b")
        self.assertEqual(fb.requests, [])

    def test_two_replies_in_one_read(self):
        # One call, one reply (as the C client): bytes after the reply answer nothing we asked
        # (a broker answering twice would hand the second reply, a token for another audience,
        # to the next call). The call fails and the connection is closed; the next opens anew.
        def handler(req, i):
            if req["method"].endswith("IssueToken") and i == 1:
                return b'{"parameters":{"n":1}}\0' + json.dumps(token_reply(jti="other")).encode() + b"\0"
            return {"parameters": {"conn": i}}
        fb = self.serve(handler)
        with ab.connect(fb.path) as c:
            with self.assertRaises(ab.ProtocolError) as cm:
                c.issue("aud", ["a"])
            self.assertIn("more than one reply", str(cm.exception))
            self.assertEqual(c.authenticate(), {"conn": 2})

    def test_part_of_a_second_reply_is_an_error_too(self):
        fb = self.serve(lambda req, i: json.dumps(token_reply()).encode() + b'\0{"parameters":{"token":"INJ')
        with ab.connect(fb.path) as c:
            self.assertRaises(ab.ProtocolError, c.issue, "aud", ["a"])

    def test_a_reply_nobody_asked_for_is_never_the_next_reply(self):
        # Bytes that come between calls are no answer to the next: that connection is dropped.
        def handler(req, i):
            if i == 1:
                return [{"parameters": {"conn": 1}}, 0.1, json.dumps(token_reply(jti="stale")).encode() + b"\0"]
            return token_reply(jti="fresh")
        fb = self.serve(handler)
        with ab.connect(fb.path) as c:
            self.assertEqual(c.whoami(), {"conn": 1})
            time.sleep(0.4)
            self.assertEqual(c.issue("aud", ["a"]).jti, "fresh")
        self.assertEqual(fb.connections, 2)

    def test_threads_share_one_client(self):
        fb = self.serve(lambda req, i: {"parameters": {"echo": req["parameters"]["token"]}})
        c = ab.connect(fb.path)
        self.addCleanup(c.close)
        bad = []

        def worker(n):
            for k in range(50):
                v = "%d-%d" % (n, k)
                if c.introspect(v)["echo"] != v:
                    bad.append(v)
        ts = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        self.assertEqual(bad, [])

    def test_a_forked_child_opens_its_own_connection(self):
        # The broker attests whoever opened the connection: a child must not use its parent's.
        fb = self.serve(lambda req, i: {"parameters": {"conn": i}} if "WhoAmI" in req["method"] else token_reply(jti="c%d" % i))
        c = ab.connect(fb.path)
        self.addCleanup(c.close)
        self.assertEqual(c.whoami(), {"conn": 1})
        parent_token = c.token("aud", ["a"])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                out = {"conn": c.whoami()["conn"], "token": c.token("aud", ["a"])}
                os.write(w, json.dumps(out).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            out = json.loads(f.read().decode())
        os.waitpid(pid, 0)
        self.assertEqual(out["conn"], 2)
        self.assertNotEqual(out["token"], parent_token, "the parent's cached token stays with the parent")
        self.assertEqual(c.whoami(), {"conn": 1}, "the parent keeps its connection")
        self.assertEqual(c.token("aud", ["a"]), parent_token)

    def test_a_fork_while_another_thread_holds_the_client(self):
        # A thread is in a call (it holds the client's lock) when the process forks. In the child
        # that thread does not exist: the child must not wait for its lock forever.
        def handler(req, i):
            if i == 1:
                time.sleep(1.5)
            return {"parameters": {"conn": i}}
        fb = self.serve(handler)
        c = ab.Client(fb.path, timeout=5.0)
        self.addCleanup(c.close)
        t = threading.Thread(target=c.whoami, daemon=True)
        t.start()
        time.sleep(0.3)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.write(w, json.dumps(c.whoami()).encode())
            finally:
                os._exit(0)
        os.close(w)
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(r)
            self.fail("the child is stuck on the lock its parent's thread held at fork time")
        with os.fdopen(r, "rb") as f:
            self.assertEqual(json.loads(f.read().decode()), {"conn": 2})
        t.join(5)

    def test_token_repr_hides_the_token(self):
        t = ab.Token(token_reply()["parameters"])
        self.assertNotIn("h.p.j1", repr(t))
        self.assertNotIn("h.p.j1", str(t))


class TestErrors(Base):
    def test_every_agent_error_has_its_class(self):
        names = ["NotAnAgent", "AudienceNotGranted", "ScopeNotGranted", "TtlTooLong", "ReauthRequired",
                 "SessionExpired", "SessionRevoked", "InvalidToken", "DelegationTooDeep", "InvalidParameter",
                 "InvalidMessage", "MessageTooLarge", "PeerGone", "RateLimited", "TooManyConnections",
                 "PermissionDenied", "InternalError", "AuditUnavailable"]
        box = {}
        fb = self.serve(lambda req, i: err("io.agentbroker." + box["name"], reason="because", sid="S",
                                           verdict="expired", parameter="ttl"))
        c = ab.connect(fb.path)
        self.addCleanup(c.close)
        for name in names:
            box["name"] = name
            with self.assertRaises(ab.BrokerError) as cm:
                c.whoami()
            e = cm.exception
            self.assertIs(type(e), getattr(ab, name))
            self.assertEqual(e.error, "io.agentbroker." + name)
            self.assertEqual(e.reason, "because")
            self.assertEqual(e.parameters["sid"], "S")
            self.assertIn("because", str(e))
        box["name"] = "InvalidToken"
        with self.assertRaises(ab.InvalidToken) as cm:
            c.whoami()
        self.assertEqual(cm.exception.verdict, "expired")
        box["name"] = "InvalidParameter"
        with self.assertRaises(ab.InvalidParameter) as cm:
            c.whoami()
        self.assertEqual(cm.exception.parameter, "ttl")

    def test_limit_and_admin_errors_have_their_classes(self):
        finding = {"file": "a.json", "path": "$.agents[0].owner", "severity": "error", "message": "missing"}
        box = {}
        fb = self.serve(lambda req, i: err(box["name"], **box["params"]))
        c = ab.connect(fb.path)
        self.addCleanup(c.close)
        for name, cls, params in [
                ("io.agentbroker.LimitReached", ab.LimitReached, {"reason": "256 open PAM sessions"}),
                ("io.agentbroker.admin.PolicyRejected", ab.PolicyRejected,
                 {"reason": "1 error", "findings": [finding]}),
                ("io.agentbroker.admin.NoSuchSession", ab.NoSuchSession, {"reason": "no session with this id"}),
                ("io.agentbroker.admin.NoSuchAgent", ab.NoSuchAgent, {"reason": "no agent with this id"})]:
            box["name"], box["params"] = name, params
            with self.assertRaises(ab.BrokerError) as cm:
                c.call("io.agentbroker.admin.X")
            e = cm.exception
            self.assertIs(type(e), cls, name)
            self.assertIn(cls.__name__, ab.__all__)
            self.assertEqual(e.error, name)
            self.assertEqual(e.reason, params["reason"])
            self.assertIn(params["reason"], str(e))
        box["name"], box["params"] = "io.agentbroker.admin.PolicyRejected", {"reason": "1 error", "findings": [finding]}
        with self.assertRaises(ab.PolicyRejected) as cm:
            c.call("io.agentbroker.admin.ReloadPolicy")
        self.assertEqual(cm.exception.findings, [finding])
        box["params"] = {"reason": "no findings given"}
        with self.assertRaises(ab.PolicyRejected) as cm:
            c.call("io.agentbroker.admin.ReloadPolicy")
        self.assertEqual(cm.exception.findings, [])

    def test_other_interfaces(self):
        box = {}
        fb = self.serve(lambda req, i: err(box["name"], method="x"))
        c = ab.connect(fb.path)
        self.addCleanup(c.close)
        for name, cls in [("org.varlink.service.MethodNotFound", ab.MethodNotFound),
                          ("org.varlink.service.InvalidParameter", ab.InvalidParameter),
                          ("io.agentbroker.admin.PermissionDenied", ab.PermissionDenied),
                          ("io.agentbroker.admin.SomethingNew", ab.BrokerError),
                          ("io.agentbroker.SomethingNew", ab.BrokerError),
                          ("com.example.NotAnAgent", ab.BrokerError)]:
            box["name"] = name
            with self.assertRaises(ab.BrokerError) as cm:
                c.call("x.Y")
            self.assertIs(type(cm.exception), cls, name)
            self.assertEqual(cm.exception.error, name)
            self.assertIsNone(cm.exception.reason)

    def test_no_socket_is_unavailable(self):
        d = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, d)
        with self.assertRaises(ab.BrokerUnavailable) as cm:
            ab.connect(os.path.join(d, "none"))
        self.assertIn("none", str(cm.exception))
        c = ab.Client(os.path.join(d, "none"))
        self.assertRaises(ab.BrokerUnavailable, c.whoami)

    def test_default_path_and_env(self):
        old = os.environ.pop("AGENT_BROKER_SOCKET", None)
        try:
            self.assertEqual(ab.Client().path, "/run/agent-broker/io.agentbroker")
            os.environ["AGENT_BROKER_SOCKET"] = "/tmp/some/where"
            self.assertEqual(ab.Client().path, "/tmp/some/where")
            self.assertEqual(ab.Client("/x").path, "/x")
        finally:
            if old is None:
                os.environ.pop("AGENT_BROKER_SOCKET", None)
            else:
                os.environ["AGENT_BROKER_SOCKET"] = old

    def test_malformed_replies(self):
        box = {}
        fb = self.serve(lambda req, i: box["out"])
        c = ab.Client(fb.path)
        self.addCleanup(c.close)
        for out in [b"not json\0", b"[1,2]\0", b'{"parameters": 5}\0', b'{"error": 7}\0', b"\xff\xfe\0",
                    b'{"parameters": {"token": 1}}\0']:
            box["out"] = out
            with self.assertRaises(ab.ProtocolError, msg=repr(out)):
                c.issue("a", ["s"])

    def test_hostile_json_is_a_protocol_error(self):
        # Python's json takes NaN and Infinity (not JSON) and recurses on nesting: neither may
        # escape as anything but ProtocolError.
        box = {}
        fb = self.serve(lambda req, i: box["out"])
        c = ab.Client(fb.path)
        self.addCleanup(c.close)
        deep_array = b"[" * 60000 + b"\0"
        deep_object = b'{"parameters":' + b'{"a":' * 10000 + b"1" + b"}" * 10001 + b"\0"
        for out in [b'{"parameters":{"token":"t","expires_in":NaN,"expires_at":0}}\0',
                    b'{"parameters":{"token":"t","expires_in":Infinity,"expires_at":0}}\0',
                    b'{"parameters":{"token":"t","expires_in":-Infinity,"expires_at":0}}\0',
                    deep_array, deep_object]:
            box["out"] = out
            with self.assertRaises(ab.ProtocolError, msg=repr(out[:60])):
                c.issue("a", ["s"])
            with self.assertRaises(ab.ProtocolError, msg=repr(out[:60])):
                c.whoami()

    def test_token_fields_are_type_checked(self):
        box = {}
        fb = self.serve(lambda req, i: {"parameters": box["params"]})
        c = ab.Client(fb.path)
        self.addCleanup(c.close)
        good = token_reply()["parameters"]
        for name, value in [("token", ""), ("token", ["x"]), ("expires_in", "abc"), ("expires_in", "300"),
                            ("expires_in", True), ("expires_in", 300.5), ("expires_in", 1e400),
                            ("expires_at", "x"), ("token_type", 1), ("jti", 5), ("scope", ["a"]), ("sid", {}),
                            ("agent", 1), ("auth_time", "now"), ("parent", 1), ("depth", "1")]:
            box["params"] = dict(good, **{name: value})
            with self.assertRaises(ab.ProtocolError, msg="%s=%r" % (name, value)):
                c.issue("a", ["s"])
            with self.assertRaises(ab.ProtocolError, msg="%s=%r" % (name, value)):
                c.token("a", ["s"])
        box["params"] = dict(good, parent=None, depth=None)
        t = c.issue("a", ["s"])
        self.assertEqual((t.expires_in, t.parent, t.depth), (300, None, None))
        box["params"] = {"revoked": "1"}
        self.assertRaises(ab.ProtocolError, c.revoke, jti="x")
        box["params"] = {"sessions": "abc"}
        self.assertRaises(ab.ProtocolError, c.list_sessions)

    def test_reply_over_64k(self):
        big = b'{"parameters":{"x":"' + b"a" * ab.MAX_MESSAGE + b'"}}\0'
        fb = self.serve(lambda req, i: big)
        c = ab.Client(fb.path)
        self.addCleanup(c.close)
        with self.assertRaises(ab.ProtocolError):
            c.whoami()

    def test_reply_at_64k_is_fine(self):
        head, tail = b'{"parameters":{"x":"', b'"}}'
        exact = head + b"a" * (ab.MAX_MESSAGE - len(head) - len(tail)) + tail
        self.assertEqual(len(exact), ab.MAX_MESSAGE)
        fb = self.serve(lambda req, i: exact + b"\0")
        with ab.connect(fb.path) as c:
            self.assertEqual(len(c.whoami()["x"]), ab.MAX_MESSAGE - len(head) - len(tail))

    def test_request_over_64k_is_refused_locally(self):
        fb = self.serve(lambda req, i: {"parameters": {}})
        c = ab.Client(fb.path)
        with self.assertRaises(ab.MessageTooLarge):
            c.introspect("x" * ab.MAX_MESSAGE)
        self.assertEqual(fb.requests, [])

    def test_close_in_the_middle_of_a_reply(self):
        fb = self.serve(lambda req, i: b'{"parameters":')  # no NUL, and the connection stays open
        c = ab.Client(fb.path, timeout=0.5)
        self.addCleanup(c.close)
        with self.assertRaises(ab.BrokerUnavailable) as cm:
            c.whoami()
        self.assertIn("no reply", str(cm.exception))

    def test_half_reply_then_eof(self):
        fb = self.serve(lambda req, i: ("close", b'{"parameters":'))
        c = ab.Client(fb.path, timeout=2)
        self.addCleanup(c.close)
        with self.assertRaises(ab.ProtocolError) as cm:
            c.whoami()
        self.assertIn("middle", str(cm.exception))

    def test_timeout(self):
        fb = self.serve(lambda req, i: (time.sleep(1.0), b"")[1])
        c = ab.Client(fb.path, timeout=0.3)
        self.addCleanup(c.close)
        t0 = time.monotonic()
        self.assertRaises(ab.BrokerUnavailable, c.whoami)
        self.assertLess(time.monotonic() - t0, 0.9)

    def test_no_timeout(self):
        # timeout=None blocks, as socket.settimeout(None) does (it raised TypeError on every call)
        fb = self.serve(lambda req, i: (time.sleep(0.2), b'{"parameters":{"agent":"a"}}\0')[1])
        c = ab.Client(fb.path, timeout=None)
        self.addCleanup(c.close)
        self.assertEqual(c.whoami().get("agent"), "a")

    def test_timeout_bounds_the_whole_reply(self):
        # A broker that trickles its reply, a byte at a time, is still held to the timeout.
        reply = json.dumps({"parameters": {"x": "y" * 20}}).encode() + b"\0"
        trickle = []
        for b in reply:
            trickle += [bytes([b]), 0.05]
        fb = self.serve(lambda req, i: trickle)
        c = ab.Client(fb.path, timeout=0.5)
        self.addCleanup(c.close)
        t0 = time.monotonic()
        with self.assertRaises(ab.BrokerUnavailable) as cm:
            c.whoami()
        self.assertLess(time.monotonic() - t0, 1.0)
        self.assertIn("no reply", str(cm.exception))

    def test_a_refusal_is_read_even_when_the_send_fails(self):
        # A broker at its connection limit (or the admin socket refusing a uid) writes its error
        # and closes without reading: the send fails (EPIPE), the reply is the answer.
        d = tempfile.mkdtemp(prefix="ab-fake-")
        path = os.path.join(d, "sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(8)
        refusal = json.dumps(err("io.agentbroker.TooManyConnections", reason="too many connections from this uid"))
        closed = threading.Event()
        served = {"n": 0}

        def serve():
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                served["n"] += 1
                if served["n"] == 1 or refuse_all.is_set():
                    conn.sendall(refusal.encode() + b"\0")
                    conn.close()
                    closed.set()
                    continue
                with conn:  # a second connection is answered: the refusal must not be skipped
                    conn.recv(65536)
                    conn.sendall(b'{"parameters":{"ok":true}}\0')

        refuse_all = threading.Event()
        th = threading.Thread(target=serve, daemon=True)
        th.start()

        def cleanup():
            srv.close()
            th.join(2)
            os.unlink(path)
            os.rmdir(d)
        self.addCleanup(cleanup)
        c = ab.connect(path)
        self.addCleanup(c.close)
        self.assertTrue(closed.wait(2))
        time.sleep(0.05)
        with self.assertRaises(ab.TooManyConnections) as cm:
            c.whoami()
        self.assertIn("too many connections", cm.exception.reason)
        refuse_all.set()
        for _ in range(5):
            self.assertRaises(ab.TooManyConnections, ab.Client(path).whoami)

    def test_idle_close_reconnects_once(self):
        # The broker closes idle connections; the next call opens a new one.
        def handler(req, i):
            return {"parameters": {"conn": i}}
        fb = self.serve(handler)
        c = ab.connect(fb.path)
        self.addCleanup(c.close)
        self.assertEqual(c.whoami(), {"conn": 1})
        fb.handler = lambda req, i: None if i == 1 else handler(req, i)
        self.assertEqual(c.whoami(), {"conn": 2})
        # but a fresh connection that is closed at once is an error, not a loop
        fb.handler = lambda req, i: None
        c.close()
        self.assertRaises(ab.BrokerUnavailable, c.whoami)


class TestReauth(Base):
    def test_reauth_required_authenticates_once_and_retries(self):
        state = {"authed": False}

        def handler(req, i):
            m = req["method"]
            if m.endswith("Authenticate"):
                state["authed"] = True
                return {"parameters": {"sid": "s" * 22, "state": "active"}}
            if not state["authed"]:
                return err("io.agentbroker.ReauthRequired", reason="call Authenticate", sid="s" * 22)
            return token_reply()
        fb = self.serve(handler)
        with ab.connect(fb.path) as c:
            t = c.issue("aud", ["a"])
        self.assertEqual(t.jti, "j1")
        self.assertEqual([r["method"] for r in fb.requests],
                         ["io.agentbroker.IssueToken", "io.agentbroker.Authenticate", "io.agentbroker.IssueToken"])

    def test_only_once(self):
        def handler(req, i):
            if req["method"].endswith("Authenticate"):
                return {"parameters": {}}
            return err("io.agentbroker.ReauthRequired", reason="again", sid="x")
        fb = self.serve(handler)
        with ab.connect(fb.path) as c:
            with self.assertRaises(ab.ReauthRequired) as cm:
                c.issue("aud", ["a"])
        self.assertEqual(cm.exception.parameters["sid"], "x")
        self.assertEqual(len(fb.requests), 3)

    def test_session_expired_opens_a_new_session(self):
        state = {"n": 0}

        def handler(req, i):
            state["n"] += 1
            if state["n"] == 1:
                return err("io.agentbroker.SessionExpired", reason="max_lifetime", sid="old")
            if req["method"].endswith("Authenticate"):
                return {"parameters": {"sid": "new"}}
            return token_reply(jti="after")
        fb = self.serve(handler)
        with ab.connect(fb.path) as c:
            self.assertEqual(c.attenuate("parent", scopes=["a"]).jti, "after")

    def test_revoked_and_denials_are_not_retried(self):
        box = {}
        fb = self.serve(lambda req, i: err(box["name"], reason="no", sid="x"))
        c = ab.connect(fb.path)
        self.addCleanup(c.close)
        for name, cls in [("io.agentbroker.SessionRevoked", ab.SessionRevoked),
                          ("io.agentbroker.ScopeNotGranted", ab.ScopeNotGranted),
                          ("io.agentbroker.RateLimited", ab.RateLimited)]:
            box["name"] = name
            del fb.requests[:]
            self.assertRaises(cls, c.issue, "aud", ["a"])
            self.assertEqual(len(fb.requests), 1)


class TestCache(Base):
    def setUp(self):
        self.now = time.time()
        self.n = 0

        def handler(req, i):
            self.n += 1
            p = req.get("parameters", {})
            ttl = p.get("ttl") or 300
            return token_reply(jti="t%d" % self.n, expires_in=ttl, scope=" ".join(p.get("scopes", [])),
                               now=self.now)
        self.fb = self.serve(handler)
        self.c = ab.connect(self.fb.path, clock=lambda: self.now)
        self.addCleanup(self.c.close)

    def test_reuses_until_two_thirds(self):
        c = self.c
        t1 = c.token("aud", ["b", "a"], ttl=300)
        self.assertEqual(t1, "h.p.t1")
        self.now += 199
        self.assertEqual(c.token("aud", ["a", "b", "a"], ttl=300), t1, "same key: sorted, deduplicated scopes")
        self.now += 1.5  # past 200 s = 2/3 of 300
        t2 = c.token("aud", ["a", "b"], ttl=300)
        self.assertEqual(t2, "h.p.t2")
        self.assertEqual(self.n, 2)

    def test_keys_are_audience_and_scopes(self):
        c = self.c
        a = c.token("aud", ["a"])
        b = c.token("aud", ["a", "b"])
        d = c.token("other", ["a"])
        self.assertEqual(len({a, b, d}), 3)
        self.assertEqual(c.token("aud", "a"), a)

    def test_keys_include_ttl_and_task(self):
        c = self.c
        t60 = c.cached_token("aud", ["a"], ttl=60)
        t300 = c.cached_token("aud", ["a"], ttl=300)
        self.assertNotEqual(t300.jti, t60.jti, "a 60 s token is not what ttl=300 asked for")
        self.assertEqual(t300.expires_in, 300)
        self.assertEqual(fb_ttl(self.fb.requests[-1]), 300)
        self.assertEqual(c.cached_token("aud", ["a"], ttl=60).jti, t60.jti)
        self.assertEqual(c.cached_token("aud", ["a"], ttl=300).jti, t300.jti)
        d = c.cached_token("aud", ["a"])
        self.assertNotIn(d.jti, (t60.jti, t300.jti), "no ttl (the policy's default) is a request of its own")
        self.assertNotIn("ttl", self.fb.requests[-1].get("parameters", {}))
        n = self.n
        x = c.cached_token("aud", ["a"], ttl=60, task="triage #1")
        y = c.cached_token("aud", ["a"], ttl=60, task="triage #2")
        self.assertEqual(len({x.jti, y.jti, t60.jti}), 3, "a task label is not reused for another task")
        self.assertEqual([r["parameters"].get("task") for r in self.fb.requests[-2:]], ["triage #1", "triage #2"])
        self.assertEqual(c.cached_token("aud", ["a"], ttl=60, task="triage #1").jti, x.jti)
        self.assertEqual(c.token("aud", ["a"], ttl=60, task="triage #2"), y.token)
        self.assertEqual(self.n, n + 2)
        # invalidate(audience, scopes) drops them whatever their ttl and task
        c.invalidate("aud", ["a"])
        self.assertNotEqual(c.cached_token("aud", ["a"], ttl=60, task="triage #1").jti, x.jti)
        self.assertNotEqual(c.cached_token("aud", ["a"], ttl=300).jti, t300.jti)

    def test_invalidate_and_revoke_forget(self):
        c = self.c
        t1 = c.cached_token("aud", ["a"])
        c.invalidate("aud", ["a"])
        t2 = c.cached_token("aud", ["a"])
        self.assertNotEqual(t1.jti, t2.jti)
        c.revoke(jti=t2.jti)
        t3 = c.cached_token("aud", ["a"])
        self.assertNotEqual(t3.jti, t2.jti)
        c.cached_token("x", ["a"])
        c.invalidate("aud")
        self.assertNotEqual(c.cached_token("aud", ["a"]).jti, t3.jti)
        n = self.n
        c.invalidate()
        c.token("x", ["a"])
        self.assertEqual(self.n, n + 1)

    def test_short_tokens(self):
        c = self.c
        t1 = c.token("aud", ["a"], ttl=3)
        self.now += 1.9
        self.assertEqual(c.token("aud", ["a"], ttl=3), t1)
        self.now += 0.2
        self.assertNotEqual(c.token("aud", ["a"], ttl=3), t1)

    def test_bad_fraction(self):
        self.assertRaises(ValueError, ab.Client, "/x", refresh_fraction=0)
        self.assertRaises(ValueError, ab.Client, "/x", refresh_fraction=1.5)


if __name__ == "__main__":
    unittest.main()
