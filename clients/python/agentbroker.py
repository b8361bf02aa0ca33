# SPDX-License-Identifier: MIT
"""Client for agent-brokerd, the host's credential broker for AI agents.

Standard library only (Python 3.9+). The broker speaks Varlink: one JSON
object followed by a NUL byte per message over a Unix stream socket. It
identifies the calling *process* from the kernel, so there is nothing to log
in with: connect and ask.

    import agentbroker

    with agentbroker.connect() as broker:       # $AGENT_BROKER_SOCKET or the default
        tok = broker.issue("mcp://git.internal", ["repo:read"], ttl=300)
        headers = {"Authorization": "Bearer " + tok.token}

        # or let the client keep one fresh token per (audience, scopes):
        headers = {"Authorization": "Bearer " + broker.token("mcp://git.internal", ["repo:read"])}

Every error the broker returns is raised as a subclass of BrokerError named
after the varlink error (ScopeNotGranted, ReauthRequired, ...); a broker that
cannot be reached raises BrokerUnavailable. See docs/clients.md.
"""

import json
import os
import select
import socket
import threading
import time
import weakref

__all__ = [
    "DEFAULT_SOCKET", "DEFAULT_ADMIN_SOCKET", "MAX_MESSAGE", "connect", "Client", "Token",
    "BrokerError", "BrokerUnavailable", "ProtocolError", "NotAnAgent", "AudienceNotGranted",
    "ScopeNotGranted", "TtlTooLong", "ReauthRequired", "SessionExpired", "SessionRevoked",
    "InvalidToken", "DelegationTooDeep", "InvalidParameter", "InvalidMessage", "MessageTooLarge",
    "PeerGone", "RateLimited", "TooManyConnections", "PermissionDenied", "InternalError",
    "AuditUnavailable", "MethodNotFound", "LimitReached", "PolicyRejected", "NoSuchSession",
    "NoSuchAgent",
]

DEFAULT_SOCKET = "/run/agent-broker/io.agentbroker"
DEFAULT_ADMIN_SOCKET = "/run/agent-broker/io.agentbroker.admin"
MAX_MESSAGE = 64 * 1024  # largest varlink message, without its NUL
DEFAULT_TIMEOUT = 5.0
REFRESH_FRACTION = 2.0 / 3.0  # the cache renews a token after this share of its lifetime


# ---- errors -------------------------------------------------------------------

class BrokerError(Exception):
    """The broker answered with a varlink error, or the call failed.

    error: the full varlink error name ("io.agentbroker.ScopeNotGranted"),
    reason: the broker's sentence, parameters: the error's whole parameters
    object (for example sid, verdict, parameter).
    """

    def __init__(self, error, reason=None, parameters=None):
        self.error = error
        self.parameters = dict(parameters or {})
        self.reason = reason if reason is not None else self.parameters.get("reason")
        super().__init__("%s: %s" % (error, self.reason) if self.reason else error)


class BrokerUnavailable(BrokerError):
    """No broker answers on the socket (missing, refused, closed, timed out)."""

    def __init__(self, reason, path=None):
        self.path = path
        super().__init__("BrokerUnavailable", reason)


class ProtocolError(BrokerError):
    """The broker's reply was not valid varlink (malformed, oversized)."""

    def __init__(self, reason):
        super().__init__("ProtocolError", reason)


class NotAnAgent(BrokerError):
    """No policy entry matches the calling process."""


class AudienceNotGranted(BrokerError):
    """The agent may not have tokens for this audience (or a wider one on Attenuate)."""


class ScopeNotGranted(BrokerError):
    """A requested scope is not granted for the audience."""


class TtlTooLong(BrokerError):
    """The ttl asked for is above the grant's max_ttl (or past the parent's exp)."""


class ReauthRequired(BrokerError):
    """The session's reauth_interval passed: call authenticate() (the client does so once)."""


class SessionExpired(BrokerError):
    """The session reached its max_lifetime: authenticate() opens a new one."""


class SessionRevoked(BrokerError):
    """This process's session was revoked; this process gets no new one."""


class InvalidToken(BrokerError):
    """The token given (Attenuate, OpenPamSession) is not active; .verdict says why."""

    @property
    def verdict(self):
        return self.parameters.get("verdict")


class DelegationTooDeep(BrokerError):
    """Attenuating further would pass the agent's max_delegation_depth."""


class InvalidParameter(BrokerError):
    """A parameter is missing, of the wrong type or over its limit; .parameter names it."""

    @property
    def parameter(self):
        return self.parameters.get("parameter")


class InvalidMessage(BrokerError):
    """The broker could not parse the request."""


class MessageTooLarge(BrokerError):
    """The request was over 64 KiB."""


class PeerGone(BrokerError):
    """The broker could not attest the calling process (it went away)."""


class RateLimited(BrokerError):
    """Too many requests from this uid; retry shortly."""


class TooManyConnections(BrokerError):
    """The broker's connection limit is reached."""


class PermissionDenied(BrokerError):
    """The caller may not do this (another agent's token or session, admin method)."""


class InternalError(BrokerError):
    """The broker failed (storage, signing)."""


class AuditUnavailable(BrokerError):
    """The audit trail cannot record the decision, so the broker refuses (fail closed)."""


class MethodNotFound(BrokerError):
    """The broker does not know the method (an older broker, or a typo)."""


class LimitReached(BrokerError):
    """A per-session limit is reached (e.g. 256 open PAM sessions); close some first."""


class PolicyRejected(BrokerError):
    """Admin ReloadPolicy: the sources do not compile; the policy in force is kept. .findings says why."""

    @property
    def findings(self):
        return self.parameters.get("findings") or []


class NoSuchSession(BrokerError):
    """Admin: no session with this id."""


class NoSuchAgent(BrokerError):
    """Admin: no agent with this id in the compiled policy."""


_ERRORS = {cls.__name__: cls for cls in (
    NotAnAgent, AudienceNotGranted, ScopeNotGranted, TtlTooLong, ReauthRequired, SessionExpired,
    SessionRevoked, InvalidToken, DelegationTooDeep, InvalidParameter, InvalidMessage, MessageTooLarge,
    PeerGone, RateLimited, TooManyConnections, PermissionDenied, InternalError, AuditUnavailable,
    MethodNotFound, LimitReached, PolicyRejected, NoSuchSession, NoSuchAgent)}


def error_from_reply(name, parameters):
    """The exception for a varlink error reply: the class named after the error's last part for
    io.agentbroker[.admin] and org.varlink.service errors we know, else BrokerError."""
    if not isinstance(parameters, dict):
        parameters = {}
    reason = parameters.get("reason")
    if not isinstance(reason, str):
        reason = None
    iface, _, short = name.rpartition(".")
    cls = None
    if iface in ("io.agentbroker", "io.agentbroker.admin", "org.varlink.service"):
        cls = _ERRORS.get(short)
    return (cls or BrokerError)(name, reason, parameters)


# ---- tokens -------------------------------------------------------------------

class Token:
    """A token the broker issued (IssueToken or Attenuate reply).

    token is the compact JWT to send as "Authorization: Bearer <token>";
    the other attributes are the reply's fields (expires_at, jti, scope, sid,
    agent, auth_time; parent and depth for attenuated tokens). raw is the
    whole reply. str() and repr() never show the token itself.
    """

    __slots__ = ("token", "token_type", "expires_in", "expires_at", "jti", "scope", "scopes", "agent",
                 "sid", "auth_time", "parent", "depth", "obtained_at", "raw")

    def __init__(self, reply, obtained_at=None):
        # The broker's reply is checked, not trusted: a wrong type is a ProtocolError here, never a
        # TypeError or ValueError (or a token string that is not one) later.
        if not isinstance(reply, dict) or not isinstance(reply.get("token"), str) or not reply["token"]:
            raise ProtocolError("token reply without a token")
        self.raw = reply
        self.token = reply["token"]
        self.token_type = _field(reply, "token_type", str, "Bearer")
        self.expires_in = _field(reply, "expires_in", int, 0)
        self.expires_at = _field(reply, "expires_at", int, 0)
        self.jti = _field(reply, "jti", str)
        self.scope = _field(reply, "scope", str, "")
        self.scopes = self.scope.split()
        self.agent = _field(reply, "agent", str)
        self.sid = _field(reply, "sid", str)
        self.auth_time = _field(reply, "auth_time", int)
        self.parent = _field(reply, "parent", str)
        self.depth = _field(reply, "depth", int)
        self.obtained_at = time.time() if obtained_at is None else obtained_at

    def expired(self, now=None):
        return (time.time() if now is None else now) >= self.expires_at

    def __str__(self):
        return "Token(jti=%s, scope=%r, expires_at=%d)" % (self.jti, self.scope, self.expires_at)

    __repr__ = __str__


def _field(reply, name, kind, default=None):
    """reply[name] if it is of kind (an int is never a bool), default if absent or null, else ProtocolError."""
    v = reply.get(name)
    if v is None:
        return default
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ProtocolError("reply: %s is not %s" % (name, "an integer" if kind is int else "a string"))
    return v


def _reject_constant(name):
    # json accepts NaN, Infinity and -Infinity, which are not JSON (RFC 8259) and which no broker sends
    raise ValueError("not JSON: " + name)


def _token_text(token):
    if isinstance(token, Token):
        return token.token
    if isinstance(token, str):
        return token
    raise TypeError("token must be a str or a Token")


def _scope_list(scopes):
    if isinstance(scopes, str):
        return [scopes]
    out = list(scopes)
    if not all(isinstance(s, str) for s in out):
        raise TypeError("scopes must be strings")
    return out


def _scope_set(scopes):
    # the broker grants a set: order and repetition do not change what a token allows
    return tuple(sorted(set(scopes)))


def _cache_key(audience, scopes, ttl, task):
    # Everything IssueToken is asked, so a cached token answers only an identical request: a
    # token asked with ttl=60 is not handed to a caller who asked for 300 (nor the reverse), and
    # one labelled for a task is not reused for another (the audit record names the task).
    # ttl and task as they are sent (JSON), so 60, 60.0 and True stay apart.
    return (audience, _scope_set(scopes), json.dumps(ttl), json.dumps(task))


# ---- connection ---------------------------------------------------------------

def default_socket_path():
    """$AGENT_BROKER_SOCKET, else /run/agent-broker/io.agentbroker."""
    return os.environ.get("AGENT_BROKER_SOCKET") or DEFAULT_SOCKET


# Every Client of this process, so that a forked child can reset them all (see _reset_after_fork).
_CLIENTS = weakref.WeakSet()


def _clients_after_fork():
    # In the child of os.fork() only this thread exists. A client lock held by another thread of
    # the parent at fork time would never be released here: each client gets a new lock, and
    # drops its connection and tokens, which belong to the parent (see Client._reset_after_fork).
    for c in list(_CLIENTS):
        c._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_clients_after_fork)


class Client:
    """One connection to the broker, shared safely between threads (calls are serialized).

    The broker keeps one session per process, not per connection: several
    clients in one process share it, and the client reconnects by itself if
    the broker closed an idle connection.
    """

    def __init__(self, path=None, timeout=DEFAULT_TIMEOUT, clock=time.time, refresh_fraction=REFRESH_FRACTION):
        self.path = path or default_socket_path()
        self.timeout = timeout
        self._clock = clock
        if not 0.0 < refresh_fraction <= 1.0:
            raise ValueError("refresh_fraction must be in (0, 1]")
        self._refresh_fraction = refresh_fraction
        self._sock = None
        self._used = False  # a call was sent on _sock
        self._buf = b""
        self._lock = threading.RLock()
        self._cache = {}
        self._pid = os.getpid()
        _CLIENTS.add(self)

    # -- transport --

    def _reset_after_fork(self):
        # The broker attests the process that opened the connection: a forked child must not
        # speak on its parent's socket (it would be taken for the parent), nor use the parent's
        # tokens. Drop both; the child opens its own connection and gets its own session. The
        # lock is new: the parent's may have been held by a thread that does not exist here.
        self._lock = threading.RLock()
        if self._sock is not None:
            try:
                self._sock.close()  # the child's copy of the descriptor only
            except OSError:
                pass
        self._sock = None
        self._used = False
        self._buf = b""
        self._cache = {}
        self._pid = os.getpid()

    def _after_fork(self):
        # Also for a child that did not come from os.fork() (no fork handlers ran).
        if self._pid != os.getpid():
            self._reset_after_fork()

    def open(self):
        """Connect now (the first call does it otherwise). Raises BrokerUnavailable."""
        with self._lock:
            self._after_fork()
            if self._sock is None:
                self._sock = self._connect()
        return self

    def _connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | getattr(socket, "SOCK_CLOEXEC", 0))
        try:
            s.settimeout(self.timeout)
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise BrokerUnavailable("cannot connect to %s: %s" % (self.path, e.strerror or e), self.path) from None
        self._buf = b""
        self._used = False
        return s

    def close(self):
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.close()
                finally:
                    self._sock = None
                    self._used = False
                    self._buf = b""

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _stale(self):
        # Between calls the broker sends nothing: if the socket is readable now, it was closed
        # (idle timeout) or holds bytes that answer no call of ours. Either way it is not used
        # again. A connection not used yet may hold the broker's refusal (TooManyConnections):
        # that is read as the reply to the first call.
        if not self._used or self._buf:
            return bool(self._buf)
        try:
            p = select.poll()
            p.register(self._sock, select.POLLIN)
            return bool(p.poll(0))
        except (OSError, ValueError):
            return True

    def _recv_message(self, deadline):
        while True:
            nul = self._buf.find(b"\0")
            if nul >= 0:
                msg, self._buf = self._buf[:nul], self._buf[nul + 1:]
                if len(msg) > MAX_MESSAGE:
                    raise ProtocolError("reply over %d bytes" % MAX_MESSAGE)
                # One call, one reply: bytes after it answer nothing we asked.
                if self._buf:
                    raise ProtocolError("the broker sent more than one reply")
                return msg
            if len(self._buf) > MAX_MESSAGE:
                raise ProtocolError("reply over %d bytes" % MAX_MESSAGE)
            try:
                if deadline is not None:  # None: timeout=None, block as socket.settimeout(None) does
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise socket.timeout()
                    self._sock.settimeout(left)
                chunk = self._sock.recv(MAX_MESSAGE + 1)
            except socket.timeout:
                raise BrokerUnavailable("no reply within %g s" % self.timeout, self.path) from None
            except OSError as e:
                if self._buf:
                    raise ProtocolError("the broker closed the connection in the middle of a reply") from None
                raise ConnectionError(e.strerror or str(e)) from None
            if not chunk:
                if self._buf:
                    raise ProtocolError("the broker closed the connection in the middle of a reply")
                raise ConnectionError("the broker closed the connection")
            self._buf += chunk

    def _exchange(self, data):
        # The timeout bounds the whole call (sending and the whole reply), not each read.
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        self._used = True
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(data)
        except socket.timeout:
            raise BrokerUnavailable("could not send within %g s" % self.timeout, self.path) from None
        except (BrokenPipeError, ConnectionResetError) as e:
            # A broker that refuses the connection (TooManyConnections, PermissionDenied on the
            # admin socket) writes its reason and closes: that reply is the answer, not the EPIPE.
            try:
                return self._recv_message(deadline)
            except ConnectionError:
                raise ConnectionError(e.strerror or str(e)) from None
        except OSError as e:
            raise ConnectionError(e.strerror or str(e)) from None
        return self._recv_message(deadline)

    def call(self, method, parameters=None):
        """Send one varlink call and return the reply's parameters (a dict).

        Raises the BrokerError subclass for an error reply, BrokerUnavailable
        when no broker answers within the timeout, ProtocolError for a
        malformed reply or one followed by more bytes. A connection the broker
        closed while idle is reopened once.
        """
        msg = {"method": method}
        if parameters:
            msg["parameters"] = {k: v for k, v in parameters.items() if v is not None}
        data = json.dumps(msg, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(data) > MAX_MESSAGE:
            raise MessageTooLarge("io.agentbroker.MessageTooLarge", "request over %d bytes" % MAX_MESSAGE)
        data += b"\0"
        with self._lock:
            self._after_fork()
            if self._sock is not None and self._stale():
                self.close()
            fresh = self._sock is None
            if fresh:
                self._sock = self._connect()
            try:
                raw = self._exchange(data)
            except ConnectionError as e:
                self.close()
                if fresh:
                    raise BrokerUnavailable(str(e), self.path) from None
                # The broker closes idle connections; the session belongs to the process, so
                # asking again on a new connection is the same request.
                self._sock = self._connect()
                try:
                    raw = self._exchange(data)
                except ConnectionError as e2:
                    self.close()
                    raise BrokerUnavailable(str(e2), self.path) from None
                except BaseException:
                    self.close()
                    raise
            except BaseException:
                self.close()  # a reply may still be in flight: the stream is out of step
                raise
        try:
            reply = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            self.close()
            raise ProtocolError("reply is not JSON") from None
        if not isinstance(reply, dict):
            raise ProtocolError("reply is not a JSON object")
        params = reply.get("parameters", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ProtocolError("reply parameters are not an object")
        err = reply.get("error")
        if err is not None:
            if not isinstance(err, str):
                raise ProtocolError("reply error is not a string")
            raise error_from_reply(err, params)
        return params

    def _call_session(self, method, parameters):
        """call(), re-authenticating once on ReauthRequired or SessionExpired and retrying."""
        try:
            return self.call(method, parameters)
        except (ReauthRequired, SessionExpired):
            self.authenticate()
            return self.call(method, parameters)

    # -- io.agentbroker --

    def authenticate(self):
        """Open or re-attest this process's session; returns the session (sid, auth_time, expires, ...)."""
        return self.call("io.agentbroker.Authenticate")

    def issue(self, audience, scopes, ttl=None, task=None):
        """A new token for audience and scopes (a list, or one scope as a str). Returns a Token."""
        now = self._clock()
        reply = self._call_session("io.agentbroker.IssueToken", {
            "audience": audience, "scopes": _scope_list(scopes), "ttl": ttl, "task": task})
        return Token(reply, now)

    def attenuate(self, token, audience=None, scopes=None, ttl=None, task=None):
        """A narrower child of token (str or Token): a subset of its scopes, a shorter ttl."""
        now = self._clock()
        reply = self._call_session("io.agentbroker.Attenuate", {
            "token": _token_text(token), "audience": audience,
            "scopes": None if scopes is None else _scope_list(scopes), "ttl": ttl, "task": task})
        return Token(reply, now)

    def introspect(self, token, audience=None, scope=None, max_auth_age=None, user=None, service=None):
        """RFC 7662-style verdict: {"active": True, claims...} or {"active": False, "reason": ...}."""
        return self.call("io.agentbroker.Introspect", {
            "token": _token_text(token), "audience": audience, "scope": scope,
            "max_auth_age": max_auth_age, "user": user, "service": service})

    def revoke(self, jti=None, sid=None, token=None):
        """Revoke one of this agent's own tokens (jti or token) or sessions (sid). Returns the count."""
        given = [(k, v) for k, v in (("jti", jti), ("sid", sid), ("token", token)) if v is not None]
        if len(given) != 1:
            raise ValueError("revoke takes exactly one of jti, sid, token")
        k, v = given[0]
        if k == "token":
            v = _token_text(v)
        reply = self.call("io.agentbroker.Revoke", {k: v})
        self._forget(lambda t: (k == "token" and t.token == v) or (k == "jti" and t.jti == v) or
                     (k == "sid" and t.sid == v))
        return _field(reply, "revoked", int, 0)

    def get_keys(self):
        """The broker's JSON Web Key Set: {"keys": [...]}, for verifying its tokens."""
        return self.call("io.agentbroker.GetKeys")

    def whoami(self):
        """The caller's agent entry as attested now (agent, owner, grants, session, ...)."""
        return self.call("io.agentbroker.WhoAmI")

    def list_sessions(self):
        """This agent's sessions for this uid (every page: the broker answers a page at a time)."""
        out, after = [], None
        for _ in range(1000000):
            reply = self.call("io.agentbroker.ListSessions", {"after": after} if after else None)
            sessions = reply.get("sessions") or []
            if not isinstance(sessions, list):
                raise ProtocolError("ListSessions reply: sessions is not an array")
            out.extend(sessions)
            nxt = reply.get("next")
            if not isinstance(nxt, str) or not nxt or nxt == after:
                break
            after = nxt
        return out

    # -- token cache --

    def token(self, audience, scopes, ttl=None, task=None):
        """A valid token string for (audience, scopes, ttl, task) from the cache, issuing a new
        one when the cached one has used refresh_fraction (2/3) of its lifetime."""
        return self.cached_token(audience, scopes, ttl, task).token

    def cached_token(self, audience, scopes, ttl=None, task=None):
        """As token(), but returns the Token. A cached token is reused only for the same request:
        the same audience, set of scopes, ttl and task."""
        scopes = _scope_list(scopes)
        key = _cache_key(audience, scopes, ttl, task)
        with self._lock:
            self._after_fork()
            t = self._cache.get(key)
            if t is not None and self._clock() < self._refresh_at(t):
                return t
            t = self.issue(audience, scopes, ttl=ttl, task=task)
            self._cache[key] = t
            return t

    def _refresh_at(self, t):
        # obtained_at is the clock before the request, so this errs towards renewing early
        return t.obtained_at + max(0, t.expires_in) * self._refresh_fraction

    def invalidate(self, audience=None, scopes=None):
        """Drop cached tokens: all, one audience's, or one (audience, scopes)'s (whatever their
        ttl and task)."""
        with self._lock:
            if audience is None:
                self._cache.clear()
                return
            want = None if scopes is None else _scope_set(_scope_list(scopes))
            for k in [k for k in self._cache if k[0] == audience and (want is None or k[1] == want)]:
                del self._cache[k]

    def _forget(self, pred):
        with self._lock:
            for k in [k for k, t in self._cache.items() if pred(t)]:
                del self._cache[k]


def connect(path=None, timeout=DEFAULT_TIMEOUT, **kwargs):
    """A connected Client. path: the socket, else $AGENT_BROKER_SOCKET, else
    /run/agent-broker/io.agentbroker. timeout bounds connecting, and each call from sending
    its request to the end of the reply (seconds).
    Raises BrokerUnavailable."""
    return Client(path, timeout, **kwargs).open()
