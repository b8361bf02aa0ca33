// SPDX-License-Identifier: MIT
/**
 * Client for agent-brokerd, the host's credential broker for AI agents.
 *
 * ESM, no dependencies, Node 18 or later. The broker speaks Varlink: one
 * JSON object followed by a NUL byte per message over a Unix stream socket.
 * It identifies the calling *process* from the kernel, so there is nothing
 * to log in with: connect and ask.
 *
 *     import { connect } from 'agentbroker';
 *
 *     const broker = await connect();            // $AGENT_BROKER_SOCKET or the default
 *     const tok = await broker.issue('mcp://git.internal', ['repo:read'], { ttl: 300 });
 *     headers.Authorization = `Bearer ${tok.token}`;
 *     // or keep one fresh token per (audience, scopes):
 *     headers.Authorization = `Bearer ${await broker.token('mcp://git.internal', ['repo:read'])}`;
 *     broker.close();
 *
 * Every error the broker returns is thrown as a subclass of BrokerError
 * named after the varlink error (ScopeNotGranted, ReauthRequired, ...); a
 * broker that cannot be reached throws BrokerUnavailable. See
 * docs/clients.md.
 */
import net from 'node:net';
import { inspect } from 'node:util';

export const DEFAULT_SOCKET = '/run/agent-broker/io.agentbroker';
export const DEFAULT_ADMIN_SOCKET = '/run/agent-broker/io.agentbroker.admin';
/** Largest varlink message, without its NUL. */
export const MAX_MESSAGE = 64 * 1024;
export const DEFAULT_TIMEOUT_MS = 5000;
/** The cache renews a token after this share of its lifetime. */
export const REFRESH_FRACTION = 2 / 3;

// ---- errors ------------------------------------------------------------------

/**
 * The broker answered with a varlink error, or the call failed.
 * error: the full varlink name ("io.agentbroker.ScopeNotGranted"); reason:
 * the broker's sentence; parameters: the error's whole parameters object.
 */
export class BrokerError extends Error {
  constructor(error, reason = undefined, parameters = {}) {
    const params = parameters && typeof parameters === 'object' ? { ...parameters } : {};
    const why = reason ?? (typeof params.reason === 'string' ? params.reason : undefined);
    super(why ? `${error}: ${why}` : error);
    this.name = new.target.name;
    this.error = error;
    this.reason = why;
    this.parameters = params;
  }
}

/** No broker answers on the socket (missing, refused, closed, timed out). */
export class BrokerUnavailable extends BrokerError {
  constructor(reason, path = undefined) {
    super('BrokerUnavailable', reason);
    this.path = path;
  }
}

/** The broker's reply was not valid varlink (malformed, oversized). */
export class ProtocolError extends BrokerError {
  constructor(reason) {
    super('ProtocolError', reason);
  }
}

/** No policy entry matches the calling process. */
export class NotAnAgent extends BrokerError {}
/** The agent may not have tokens for this audience (or another one on attenuate). */
export class AudienceNotGranted extends BrokerError {}
/** A requested scope is not granted for the audience. */
export class ScopeNotGranted extends BrokerError {}
/** The ttl is above the grant's max_ttl (or past the parent's exp). */
export class TtlTooLong extends BrokerError {}
/** The session's reauth_interval passed: authenticate() (the client does so once). */
export class ReauthRequired extends BrokerError {}
/** The session reached its max_lifetime: authenticate() opens a new one. */
export class SessionExpired extends BrokerError {}
/** This process's session was revoked; this process gets no new one. */
export class SessionRevoked extends BrokerError {}
/** The token given is not active; .verdict says why (an Introspect reason). */
export class InvalidToken extends BrokerError {
  get verdict() {
    return this.parameters.verdict;
  }
}
/** Attenuating further would pass the agent's max_delegation_depth. */
export class DelegationTooDeep extends BrokerError {}
/** A parameter is missing, of the wrong type or over its limit; .parameter names it. */
export class InvalidParameter extends BrokerError {
  get parameter() {
    return this.parameters.parameter;
  }
}
/** The broker could not parse the request. */
export class InvalidMessage extends BrokerError {}
/** The request was over 64 KiB. */
export class MessageTooLarge extends BrokerError {}
/** The broker could not attest the calling process. */
export class PeerGone extends BrokerError {}
/** Too many requests from this uid; retry shortly. */
export class RateLimited extends BrokerError {}
/** The broker's connection limit is reached. */
export class TooManyConnections extends BrokerError {}
/** The caller may not do this (another agent's token or session, admin method). */
export class PermissionDenied extends BrokerError {}
/** The broker failed (storage, signing). */
export class InternalError extends BrokerError {}
/** The audit trail cannot record the decision, so the broker refuses (fail closed). */
export class AuditUnavailable extends BrokerError {}
/** The broker does not know the method. */
export class MethodNotFound extends BrokerError {}
/** A per-session limit is reached (e.g. 256 open PAM sessions); close some first. */
export class LimitReached extends BrokerError {}
/** Admin ReloadPolicy: the sources do not compile; the policy in force is kept. `findings` says why. */
export class PolicyRejected extends BrokerError {
  get findings() {
    return Array.isArray(this.parameters.findings) ? this.parameters.findings : [];
  }
}
/** Admin: no session with this id. */
export class NoSuchSession extends BrokerError {}
/** Admin: no agent with this id in the compiled policy. */
export class NoSuchAgent extends BrokerError {}

const ERRORS = Object.fromEntries(
  [
    NotAnAgent, AudienceNotGranted, ScopeNotGranted, TtlTooLong, ReauthRequired, SessionExpired,
    SessionRevoked, InvalidToken, DelegationTooDeep, InvalidParameter, InvalidMessage, MessageTooLarge,
    PeerGone, RateLimited, TooManyConnections, PermissionDenied, InternalError, AuditUnavailable,
    MethodNotFound, LimitReached, PolicyRejected, NoSuchSession, NoSuchAgent,
  ].map((c) => [c.name, c]),
);
const KNOWN_INTERFACES = new Set(['io.agentbroker', 'io.agentbroker.admin', 'org.varlink.service']);

/**
 * The error object for a varlink error reply: the class named after the
 * error's last part for the broker's and org.varlink.service's errors we
 * know, else BrokerError.
 */
export function errorFromReply(name, parameters) {
  const params = parameters && typeof parameters === 'object' && !Array.isArray(parameters) ? parameters : {};
  const reason = typeof params.reason === 'string' ? params.reason : undefined;
  const dot = name.lastIndexOf('.');
  const Cls = dot > 0 && KNOWN_INTERFACES.has(name.slice(0, dot)) && Object.hasOwn(ERRORS, name.slice(dot + 1))
    ? ERRORS[name.slice(dot + 1)]
    : BrokerError;
  return new Cls(name, reason, params);
}

// ---- tokens ------------------------------------------------------------------

/**
 * A token the broker issued (IssueToken or Attenuate reply). token is the
 * compact JWT to send as "Authorization: Bearer <token>"; the other fields
 * are the reply's, in camelCase. Printing it (toString, util.inspect,
 * JSON.stringify) never shows the token itself.
 */
export class Token {
  constructor(reply, obtainedAt = Date.now() / 1000) {
    // The broker's reply is checked, not trusted: a wrong type is a ProtocolError here, never a
    // NaN expiry (or a token string that is not one) later.
    if (!reply || typeof reply !== 'object' || typeof reply.token !== 'string' || !reply.token) {
      throw new ProtocolError('token reply without a token');
    }
    Object.defineProperty(this, 'raw', { value: reply, enumerable: false });
    Object.defineProperty(this, 'token', { value: reply.token, enumerable: false });
    this.tokenType = field(reply, 'token_type', 'string', 'Bearer');
    this.expiresIn = field(reply, 'expires_in', 'integer', 0);
    this.expiresAt = field(reply, 'expires_at', 'integer', 0);
    this.jti = field(reply, 'jti', 'string');
    this.scope = field(reply, 'scope', 'string', '');
    this.scopes = this.scope.split(' ').filter(Boolean);
    this.agent = field(reply, 'agent', 'string');
    this.sid = field(reply, 'sid', 'string');
    this.authTime = field(reply, 'auth_time', 'integer');
    this.parent = field(reply, 'parent', 'string');
    this.depth = field(reply, 'depth', 'integer');
    this.obtainedAt = obtainedAt;
  }

  expired(now = Date.now() / 1000) {
    return now >= this.expiresAt;
  }

  toString() {
    return `Token(jti=${this.jti}, scope=${JSON.stringify(this.scope)}, expiresAt=${this.expiresAt})`;
  }

  [inspect.custom]() {
    return this.toString();
  }
}

/** reply[name] if of kind ('string' or 'integer'), dflt if absent or null, else ProtocolError. */
function field(reply, name, kind, dflt = undefined) {
  const v = reply[name];
  if (v === undefined || v === null) return dflt;
  if (kind === 'integer' ? !Number.isSafeInteger(v) : typeof v !== kind) {
    throw new ProtocolError(`reply: ${name} is not ${kind === 'integer' ? 'an integer' : 'a string'}`);
  }
  return v;
}

function tokenText(t) {
  if (t instanceof Token) return t.token;
  if (typeof t === 'string') return t;
  throw new TypeError('token must be a string or a Token');
}

function scopeList(scopes) {
  const list = typeof scopes === 'string' ? [scopes] : [...scopes];
  if (!list.every((s) => typeof s === 'string')) throw new TypeError('scopes must be strings');
  return list;
}

// The broker grants a set: order and repetition do not change what a token allows.
function scopeSet(scopes) {
  return [...new Set(scopes)].sort();
}

// Everything IssueToken is asked, so a cached token answers only an identical
// request: a token asked with ttl 30 is not handed to a caller who asked for
// 300 (nor the reverse), and one labelled for a task is not reused for
// another (the audit record names the task). undefined and null are both
// "not given": neither is sent.
function cacheKey(audience, scopes, ttl, task) {
  return JSON.stringify([audience, scopeSet(scopes), ttl ?? null, task ?? null]);
}

function compact(params) {
  const out = {};
  for (const [k, v] of Object.entries(params ?? {})) if (v !== undefined && v !== null) out[k] = v;
  return out;
}

// ---- transport ---------------------------------------------------------------

/** The connection ended or failed before a reply (internal: call() turns it into BrokerUnavailable). */
class ConnectionLost extends Error {
  constructor(message, code = undefined) {
    super(message);
    this.code = code;
  }

  /** The broker closed before reading our request (EPIPE, ECONNRESET): it never saw it. */
  get unread() {
    return this.code === 'EPIPE' || this.code === 'ECONNRESET';
  }
}

/** How long a second connection listens for the broker's refusal before it writes (ms). */
const REFUSAL_WAIT_MS = 250;

/**
 * One socket, one request at a time, one reply per request: bytes after a
 * reply, or bytes while no request waits, put the connection out of step, so
 * it is closed (a ProtocolError for the request that waits, if one does).
 */
class Connection {
  #sock;
  #chunks = [];
  #size = 0;
  #waiter = null;
  #dead = null;
  #requested = false; // a request was sent (or answered by #early)
  #early = null; // a message that came before any request: the broker refusing the connection

  constructor(sock) {
    this.#sock = sock;
    sock.on('data', (d) => this.#onData(d));
    sock.on('error', (e) => this.#fail(new ConnectionLost(e.message, e.code)));
    sock.on('close', () => this.#fail(new ConnectionLost('the broker closed the connection')));
    sock.unref(); // an idle client never keeps the process alive
  }

  static open(path, timeoutMs) {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection({ path });
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new BrokerUnavailable(`cannot connect to ${path}: timed out`, path));
      }, timeoutMs);
      sock.once('error', (e) => {
        clearTimeout(timer);
        reject(new BrokerUnavailable(`cannot connect to ${path}: ${e.code ?? e.message}`, path));
      });
      sock.once('connect', () => {
        clearTimeout(timer);
        sock.removeAllListeners('error');
        resolve(new Connection(sock));
      });
    });
  }

  /** Unusable for another request (a refusal still to be read counts as usable: it is the reply). */
  get dead() {
    return this.#dead !== null && this.#early === null;
  }

  close() {
    this.#early = null;
    this.#fail(new ConnectionLost('closed'));
    this.#sock.destroy();
  }

  #fail(err) {
    if (this.#dead === null) this.#dead = err;
    const w = this.#waiter;
    this.#waiter = null;
    if (w) {
      w.reject(this.#size > 0 ? new ProtocolError('the broker closed the connection in the middle of a reply') : err);
    }
  }

  #onData(d) {
    if (this.#dead) return;
    const w = this.#waiter;
    if (!w && (this.#requested || this.#early)) return this.#protocolError('the broker sent bytes that answer no request');
    const nul = d.indexOf(0);
    if (nul < 0) {
      this.#chunks.push(d);
      this.#size += d.length;
      if (this.#size > MAX_MESSAGE) this.#protocolError(`reply over ${MAX_MESSAGE} bytes`);
      return;
    }
    const msg = Buffer.concat([...this.#chunks, d.subarray(0, nul)]);
    this.#chunks = [];
    this.#size = 0;
    if (msg.length > MAX_MESSAGE) return this.#protocolError(`reply over ${MAX_MESSAGE} bytes`);
    // One request, one reply: bytes after it answer nothing we asked.
    if (nul + 1 < d.length) return this.#protocolError('the broker sent more than one reply');
    if (!w) {
      this.#early = msg; // the reply to the first request (which need not be sent)
      return;
    }
    this.#waiter = null;
    w.resolve(msg);
  }

  #protocolError(reason) {
    const w = this.#waiter;
    this.#waiter = null;
    this.#early = null;
    this.#dead = new ProtocolError(reason);
    this.#sock.destroy();
    if (w) w.reject(this.#dead);
  }

  /**
   * Send data (ending in NUL) and resolve with the reply's bytes (without the
   * NUL). writeDelayMs: listen that long before writing, so that a refusal
   * the broker writes on accepting is read before a write could fail.
   */
  request(data, timeoutMs, path, writeDelayMs = 0) {
    this.#requested = true;
    if (this.#early) {
      const msg = this.#early; // the broker refused this connection: that is the reply
      this.#early = null;
      return Promise.resolve(msg);
    }
    if (this.#dead) return Promise.reject(this.#dead);
    return new Promise((resolve, reject) => {
      let delay = null;
      const timer = setTimeout(() => {
        this.#waiter = null;
        this.#dead = new BrokerUnavailable(`no reply within ${timeoutMs} ms`, path);
        this.#sock.destroy(); // a late reply would put the stream out of step
        reject(this.#dead);
      }, timeoutMs);
      this.#sock.ref();
      const done = () => {
        clearTimeout(timer);
        if (delay) clearTimeout(delay);
        this.#sock.unref();
      };
      const w = {
        resolve: (v) => { done(); resolve(v); },
        reject: (e) => { done(); reject(e); },
      };
      this.#waiter = w;
      const send = () => {
        if (this.#waiter === w && !this.#dead) this.#sock.write(data);
      };
      if (writeDelayMs > 0) delay = setTimeout(send, writeDelayMs);
      else send();
    });
  }
}

/** $AGENT_BROKER_SOCKET, else /run/agent-broker/io.agentbroker. */
export function defaultSocketPath() {
  return process.env.AGENT_BROKER_SOCKET || DEFAULT_SOCKET;
}

// ---- the client --------------------------------------------------------------

/**
 * One connection to the broker. Calls are queued and sent one at a time, so
 * one client may be shared by all of a process's tasks. The broker keeps one
 * session per process, not per connection; the client reconnects by itself
 * when the broker closed an idle connection.
 */
export class Client {
  #conn = null;
  #queue = Promise.resolve();
  #cache = new Map();
  #inflight = new Map();
  #clock;
  #fraction;

  /**
   * @param {object} [options]
   * @param {string} [options.path] socket (default: $AGENT_BROKER_SOCKET, else DEFAULT_SOCKET)
   * @param {number} [options.timeout] ms for connecting, and for each call from its request to the end of its reply (5000)
   * @param {() => number} [options.clock] seconds since the epoch (tests)
   * @param {number} [options.refreshFraction] share of a token's life after which token() renews it (2/3)
   */
  constructor({ path, timeout = DEFAULT_TIMEOUT_MS, clock, refreshFraction = REFRESH_FRACTION } = {}) {
    if (!(refreshFraction > 0 && refreshFraction <= 1)) throw new RangeError('refreshFraction must be in (0, 1]');
    this.path = path || defaultSocketPath();
    this.timeout = timeout;
    this.#clock = clock ?? (() => Date.now() / 1000);
    this.#fraction = refreshFraction;
  }

  /** Connect now (the first call does it otherwise). Throws BrokerUnavailable. */
  async open() {
    await this.#serialized(async () => {
      if (!this.#conn || this.#conn.dead) this.#conn = await Connection.open(this.path, this.timeout);
    });
    return this;
  }

  close() {
    if (this.#conn) this.#conn.close();
    this.#conn = null;
  }

  #serialized(fn) {
    const run = this.#queue.then(fn, fn);
    this.#queue = run.catch(() => {});
    return run;
  }

  /**
   * Send one varlink call; resolve with the reply's parameters. Throws the
   * BrokerError subclass for an error reply, BrokerUnavailable when no
   * broker answers, ProtocolError for a malformed reply. A connection the
   * broker closed while idle is reopened once.
   */
  call(method, parameters = undefined) {
    const msg = { method };
    const p = compact(parameters);
    if (Object.keys(p).length) msg.parameters = p;
    const body = Buffer.from(JSON.stringify(msg), 'utf8');
    if (body.length > MAX_MESSAGE) {
      return Promise.reject(new MessageTooLarge('io.agentbroker.MessageTooLarge', `request over ${MAX_MESSAGE} bytes`));
    }
    const data = Buffer.concat([body, Buffer.from([0])]);
    return this.#serialized(async () => {
      let raw;
      if (!this.#conn || this.#conn.dead) {
        raw = await this.#exchangeNew(data);
      } else {
        try {
          raw = await this.#conn.request(data, this.timeout, this.path);
        } catch (e) {
          if (!(e instanceof ConnectionLost)) throw e;
          // The broker closes idle connections; the session belongs to the process, so asking
          // again on a new connection is the same request.
          raw = await this.#exchangeNew(data);
        }
      }
      let reply;
      try {
        reply = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(raw));
      } catch {
        this.close();
        throw new ProtocolError('reply is not JSON');
      }
      if (!reply || typeof reply !== 'object' || Array.isArray(reply)) throw new ProtocolError('reply is not a JSON object');
      const params = reply.parameters ?? {};
      if (typeof params !== 'object' || Array.isArray(params)) throw new ProtocolError('reply parameters are not an object');
      if (reply.error !== undefined && reply.error !== null) {
        if (typeof reply.error !== 'string') throw new ProtocolError('reply error is not a string');
        throw errorFromReply(reply.error, params);
      }
      return params;
    });
  }

  /** One request on a new connection; its failure is BrokerUnavailable (or the broker's refusal). */
  async #exchangeNew(data) {
    this.#conn = await Connection.open(this.path, this.timeout);
    try {
      return await this.#conn.request(data, this.timeout, this.path);
    } catch (e) {
      if (!(e instanceof ConnectionLost)) throw e;
      if (!e.unread) throw new BrokerUnavailable(e.message, this.path);
    }
    // A broker that refuses a connection (TooManyConnections, PermissionDenied on the admin
    // socket) writes why and closes. Our write then fails (EPIPE) and Node destroys the socket
    // before that reply is read. It never saw the request, so ask once more on a new
    // connection, listening first: the refusal, if it comes again, is the reply.
    this.#conn = await Connection.open(this.path, this.timeout);
    try {
      return await this.#conn.request(data, this.timeout, this.path, Math.min(REFUSAL_WAIT_MS, this.timeout / 2));
    } catch (e) {
      if (e instanceof ConnectionLost) throw new BrokerUnavailable(e.message, this.path);
      throw e;
    }
  }

  /** call(), re-authenticating once on ReauthRequired or SessionExpired and retrying. */
  async #callSession(method, parameters) {
    try {
      return await this.call(method, parameters);
    } catch (e) {
      if (!(e instanceof ReauthRequired || e instanceof SessionExpired)) throw e;
      await this.authenticate();
      return this.call(method, parameters);
    }
  }

  // -- io.agentbroker --

  /** Open or re-attest this process's session: {sid, agent, auth_time, expires, reauth_before, state, ...}. */
  authenticate() {
    return this.call('io.agentbroker.Authenticate');
  }

  /**
   * A new token for audience and scopes (an array, or one scope as a string).
   * @returns {Promise<Token>}
   */
  async issue(audience, scopes, { ttl, task } = {}) {
    const now = this.#clock();
    const reply = await this.#callSession('io.agentbroker.IssueToken', { audience, scopes: scopeList(scopes), ttl, task });
    return new Token(reply, now);
  }

  /**
   * A narrower child of token (string or Token): a subset of its scopes, a shorter ttl.
   * @returns {Promise<Token>}
   */
  async attenuate(token, { audience, scopes, ttl, task } = {}) {
    const now = this.#clock();
    const reply = await this.#callSession('io.agentbroker.Attenuate', {
      token: tokenText(token), audience, scopes: scopes === undefined ? undefined : scopeList(scopes), ttl, task,
    });
    return new Token(reply, now);
  }

  /** RFC 7662-style verdict: {active: true, ...claims} or {active: false, reason}. */
  introspect(token, { audience, scope, maxAuthAge, user, service } = {}) {
    return this.call('io.agentbroker.Introspect', {
      token: tokenText(token), audience, scope, max_auth_age: maxAuthAge, user, service,
    });
  }

  /** Revoke one of this agent's own tokens ({jti} or {token}) or sessions ({sid}). Resolves with the count. */
  async revoke({ jti, sid, token } = {}) {
    const given = Object.entries({ jti, sid, token }).filter(([, v]) => v !== undefined && v !== null);
    if (given.length !== 1) throw new TypeError('revoke takes exactly one of jti, sid, token');
    let [k, v] = given[0];
    if (k === 'token') v = tokenText(v);
    const reply = await this.call('io.agentbroker.Revoke', { [k]: v });
    for (const [key, t] of this.#cache) {
      if ((k === 'token' && t.token === v) || (k === 'jti' && t.jti === v) || (k === 'sid' && t.sid === v)) {
        this.#cache.delete(key);
      }
    }
    return field(reply, 'revoked', 'integer', 0);
  }

  /** The broker's JSON Web Key Set ({keys: [...]}), e.g. for jose's createLocalJWKSet. */
  getKeys() {
    return this.call('io.agentbroker.GetKeys');
  }

  /** The caller's agent entry as attested now (agent, owner, grants, session, ...). */
  whoami() {
    return this.call('io.agentbroker.WhoAmI');
  }

  /** This agent's sessions for this uid (every page: the broker answers a page at a time). */
  async listSessions() {
    const out = [];
    let after;
    for (let page = 0; page < 1000000; page++) {
      const reply = await this.call('io.agentbroker.ListSessions', after ? { after } : undefined);
      const sessions = reply.sessions ?? [];
      if (!Array.isArray(sessions)) throw new ProtocolError('ListSessions reply: sessions is not an array');
      out.push(...sessions);
      const next = reply.next;
      if (typeof next !== 'string' || next === '' || next === after) break;
      after = next;
    }
    return out;
  }

  // -- token cache --

  /**
   * A valid token string for (audience, scopes, ttl, task) from the cache,
   * issuing a new one once the cached one has used refreshFraction (2/3) of
   * its life. A cached token is reused only for the same request: the same
   * audience, set of scopes, ttl and task.
   */
  async token(audience, scopes, options = {}) {
    return (await this.cachedToken(audience, scopes, options)).token;
  }

  /** As token(), but resolves with the Token. Concurrent callers for one key share one request. */
  cachedToken(audience, scopes, { ttl, task } = {}) {
    const list = scopeList(scopes);
    const key = cacheKey(audience, list, ttl, task);
    const t = this.#cache.get(key);
    if (t && this.#clock() < t.obtainedAt + Math.max(0, t.expiresIn) * this.#fraction) return Promise.resolve(t);
    let p = this.#inflight.get(key);
    if (!p) {
      p = this.issue(audience, list, { ttl, task })
        .then((fresh) => {
          this.#cache.set(key, fresh);
          return fresh;
        })
        .finally(() => this.#inflight.delete(key));
      this.#inflight.set(key, p);
    }
    return p;
  }

  /** Drop cached tokens: all, one audience's, or one (audience, scopes)'s (whatever their ttl and task). */
  invalidate(audience = undefined, scopes = undefined) {
    if (audience === undefined) return this.#cache.clear();
    const want = scopes === undefined ? undefined : JSON.stringify(scopeSet(scopeList(scopes)));
    for (const key of [...this.#cache.keys()]) {
      const [aud, set] = JSON.parse(key);
      if (aud === audience && (want === undefined || JSON.stringify(set) === want)) this.#cache.delete(key);
    }
  }
}

/**
 * A connected Client. path: the socket, else $AGENT_BROKER_SOCKET, else
 * /run/agent-broker/io.agentbroker. Throws BrokerUnavailable.
 */
export function connect(path = undefined, options = {}) {
  return new Client({ ...options, path }).open();
}
