// SPDX-License-Identifier: MIT
// An OAuth 2.0 resource server's view of agent-broker tokens.
//
// 1. Offline, with jose: the signature against the broker's JWKS (from a
//    file, re-read when it changes; or over the broker socket), alg EdDSA,
//    typ at+jwt (RFC 9068), exp, aud equal to this server's resource id, iss
//    if one (or a list) is configured, a kid in the header, iss equal to the
//    issuer of the key that verified it when the key set says whose keys
//    they are (a host's set, a fleet's merged set), and a lifetime
//    (exp - iat) no broker issues past.
//    Failure: 401 invalid_token. A key set that cannot be (re)loaded: 503.
// 2. Scope: every scope the request needs (per tool) must be in the token's
//    "scope" claim. Failure: 403 insufficient_scope.
// 3. Revocation: a signature cannot say that a token was revoked, so when a
//    broker socket is configured every request is also introspected there
//    (agent-broker's Introspect, RFC 7662 style). Inactive: 401
//    invalid_token. Broker unreachable: 503 (fail closed).
//
// Failures carry a WWW-Authenticate header in the manner of RFC 6750 §3 with
// the resource_metadata parameter of RFC 9728 (as MCP clients expect).
import './webcrypto.js';
import fs from 'node:fs';
import { createLocalJWKSet, jwtVerify } from 'jose';
import { BrokerError } from 'agentbroker';

/** The longest life of a broker token: AB_TTL_MAX (24 h) plus the 5 s the broker allows clocks. */
export const MAX_TOKEN_LIFETIME = 24 * 3600 + 5;
/** How far in the future an iat may be (the broker's Introspect allows 5 s). */
const CLOCK_LEEWAY = 5;

/** A refusal: HTTP status, RFC 6750 error code (or undefined: no credentials), description, scope. */
export class AuthError extends Error {
  constructor(status, code, description, scope = undefined) {
    super(description);
    this.status = status;
    this.code = code;
    this.scope = scope;
  }
}

// RFC 6750 §3: error_description and scope are %x20-21 / %x23-5B / %x5D-7E.
const quoted = (s) => `"${String(s).replace(/[^\x20\x21\x23-\x5b\x5d-\x7e]/g, '?')}"`;

/** The WWW-Authenticate value for a refusal. */
export function wwwAuthenticate({ realm, resourceMetadata, error }) {
  const parts = [`realm=${quoted(realm)}`];
  if (resourceMetadata) parts.push(`resource_metadata=${quoted(resourceMetadata)}`);
  if (error?.code) {
    parts.push(`error=${quoted(error.code)}`);
    if (error.message) parts.push(`error_description=${quoted(error.message)}`);
    if (error.scope) parts.push(`scope=${quoted(error.scope)}`);
  }
  return `Bearer ${parts.join(', ')}`;
}

/** The bearer token of an Authorization header (RFC 6750 §2.1), or throws a 401 without an error code. */
export function bearerToken(header) {
  const m = /^Bearer +([A-Za-z0-9\-._~+/]+=*) *$/i.exec(header ?? '');
  if (!header) throw new AuthError(401, undefined, 'no bearer token');
  if (!m) throw new AuthError(401, 'invalid_request', 'the Authorization header is not "Bearer <token>"');
  return m[1];
}

function describeJoseError(e) {
  switch (e?.code) {
    case 'ERR_JWT_EXPIRED':
      return 'the token expired';
    case 'ERR_JWT_CLAIM_VALIDATION_FAILED':
      if (e.claim === 'aud') return 'the token is for another audience';
      if (e.claim === 'iss') return 'the token is from another issuer';
      if (e.claim === 'typ') return 'the token is not an access token (typ at+jwt)';
      return `the token's "${e.claim}" claim is not acceptable`;
    case 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED':
      return 'the signature does not verify';
    case 'ERR_JWKS_NO_MATCHING_KEY':
      return 'the token is signed with a key this server does not know';
    case 'ERR_JOSE_ALG_NOT_ALLOWED':
      return 'the token is not signed with EdDSA';
    default:
      return 'the token is malformed';
  }
}

/** What identifies a version of a file: a rename over it (new inode) or a write (size, times) changes it. */
function fileVersion(st) {
  return `${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
}

/**
 * Verifies broker tokens for one resource.
 *
 * options: resource (required: the audience tokens must name), issuer
 * (optional: the iss required, or a list of those accepted), jwksFile (a JWKS as `agent-brokerctl keys
 * --jwks` prints it) and/or broker (an agentbroker Client: keys via
 * GetKeys when there is no file, and revocation via Introspect unless
 * introspect is false), service (names this server in the broker's audit
 * trail), log (a function for one-line decisions; never given a token).
 *
 * The key set is current, not the one of the start: a key the broker
 * retired (`keys rotate`, also `--overlap 0 --force` after a leak) stops
 * verifying here once the key set without it is published. The file is
 * looked at (stat) at most every fileCheckInterval ms (1 s) and re-read
 * when it changed; it, or the broker's set, is re-read in any case every
 * refreshInterval ms (60 s), and at once (at most every 10 s) for a token
 * naming an unknown kid. A key set that cannot be re-read is not used:
 * tokens are refused (503) until it can.
 *
 * Whose keys: a key set's "issuer" member (GetKeys and `keys --jwks` write
 * it), or a key's own "iss" member (a fleet's merged set, docs/clients.md),
 * binds its keys to that issuer: a token verified by one must carry that
 * iss. Without it, a leak of one host's key (or that host's policy author)
 * could sign tokens in any other host's name. Once any key of a set is bound,
 * a key of it that is not (no kid, or no issuer) verifies nothing. A token
 * must name its key (kid: the broker always does): otherwise jose picks the
 * only key that fits, and the issuer that key is bound to is not looked up.
 * The keys and their issuers are one snapshot of one load: a token is
 * checked against the issuers of the set that verified it, whatever is
 * reloaded meanwhile.
 */
export class TokenVerifier {
  // { keys: jose key set, issuers: Map kid -> the iss its tokens must carry (null: none may),
  //   bound: whether any key is bound (then a kid not in issuers verifies nothing), count }
  #current = null;
  #loadedAt = 0;
  #unknownKidAt = 0; // the last reload for an unknown kid: at most one every 10 s
  #checkedAt = 0;
  #version = null;
  #loading = null;

  constructor({ resource, issuer, jwksFile, broker, introspect = true, service = 'mcp-server', log = () => {},
    refreshInterval = 60000, fileCheckInterval = 1000 }) {
    if (!resource) throw new Error('a resource id is required');
    if (!jwksFile && !broker) throw new Error('give a JWKS file or a broker client (or both)');
    this.resource = resource;
    this.issuer = issuer;
    this.jwksFile = jwksFile;
    this.broker = broker;
    this.introspect = Boolean(broker) && introspect;
    this.service = service;
    this.log = log;
    this.refreshInterval = refreshInterval;
    this.fileCheckInterval = fileCheckInterval;
  }

  /** Load the key set (file, else the broker); resolves with the number of keys. Concurrent calls share one load. */
  async loadKeys() {
    return (await this.#loadShared()).count;
  }

  /** The snapshot of one load (shared by concurrent callers). */
  #loadShared() {
    if (!this.#loading) this.#loading = this.#load().finally(() => { this.#loading = null; });
    return this.#loading;
  }

  async #load() {
    try {
      let jwks;
      let version = null;
      if (this.jwksFile) {
        // stat first: a file replaced between the two is seen as changed at the next check
        version = fileVersion(fs.statSync(this.jwksFile));
        jwks = JSON.parse(fs.readFileSync(this.jwksFile, 'utf8'));
      } else {
        jwks = await this.broker.getKeys();
      }
      if (!Array.isArray(jwks?.keys)) throw new Error('the JWKS has no "keys" array');
      // A key's issuer: its own "iss" member, else the set's "issuer"; one that is there but
      // not a string, or a kid listed under two issuers, binds the key to no issuer (null).
      const issuers = new Map();
      let bound = jwks.issuer !== undefined;
      for (const k of jwks.keys) {
        const own = k !== null && typeof k === 'object' && 'iss' in k;
        bound ||= own;
        if (typeof k?.kid !== 'string') continue;
        let iss = own ? k.iss : jwks.issuer;
        if (iss === undefined) continue;
        if (typeof iss !== 'string' || (issuers.has(k.kid) && issuers.get(k.kid) !== iss)) iss = null;
        issuers.set(k.kid, iss);
      }
      const current = { keys: createLocalJWKSet({ keys: jwks.keys }), issuers, bound, count: jwks.keys.length };
      this.#current = current;
      this.#version = version;
      this.#loadedAt = this.#checkedAt = Date.now();
      return current;
    } catch (e) {
      this.#current = null; // never verify with a set we could not confirm
      throw e;
    }
  }

  /** Reload, or refuse with 503: keys that may have been retired are not used. Resolves with the new snapshot. */
  async #reload(why) {
    try {
      return await this.#loadShared();
    } catch (e) {
      this.log(`cannot load the key set (${why}): ${e.message}`);
      throw new AuthError(503, undefined, 'the key set cannot be loaded; try again shortly');
    }
  }

  /** The key set snapshot ({ keys, issuers, bound }), re-read if it is due or its file changed. */
  async #currentKeys() {
    const now = Date.now();
    if (!this.#current) {
      return this.#reload('not loaded');
    } else if (now - this.#loadedAt >= this.refreshInterval) {
      return this.#reload('periodic');
    } else if (this.jwksFile && now - this.#checkedAt >= this.fileCheckInterval) {
      this.#checkedAt = now;
      let version;
      try {
        version = fileVersion(fs.statSync(this.jwksFile));
      } catch {
        version = 'gone';
      }
      if (version !== this.#version) return this.#reload('the file changed');
    }
    return this.#current;
  }

  async #verifyJwt(token) {
    const options = {
      audience: this.resource,
      algorithms: ['EdDSA'],
      typ: 'at+jwt',
      requiredClaims: ['exp', 'iat', 'jti', 'sub'],
    };
    if (this.issuer) options.issuer = this.issuer;
    // The key is looked up by kid: without one, jose would pick the only key that fits, and
    // which key that was (so its issuer) is not known here.
    const byKid = (keys) => (header, jws) => {
      if (typeof header?.kid !== 'string') throw new AuthError(401, 'invalid_token', 'the token names no key (kid)');
      return keys(header, jws);
    };
    // One snapshot for the signature and the issuer check: a reload meanwhile must not
    // change the issuer the key is checked against.
    let current = await this.#currentKeys();
    let payload;
    let header;
    try {
      ({ payload, protectedHeader: header } = await jwtVerify(token, byKid(current.keys), options));
    } catch (e) {
      // A key rotated in since we loaded: reload once (at most every 10 s) and try again.
      // Throttled on its own clock: the periodic reload must not make a key rotated in just
      // after it wait 10 s (every token of the new key was refused meanwhile). A set loaded
      // within the last second is current enough.
      const now = Date.now();
      if (e?.code !== 'ERR_JWKS_NO_MATCHING_KEY' || now - this.#unknownKidAt < 10000 || now - this.#loadedAt < 1000) {
        throw e;
      }
      this.#unknownKidAt = Date.now();
      current = await this.#reload('unknown kid');
      ({ payload, protectedHeader: header } = await jwtVerify(token, byKid(current.keys), options));
    }
    if (typeof header.kid !== 'string') throw new AuthError(401, 'invalid_token', 'the token names no key (kid)');
    const bound = current.issuers.get(header.kid);
    if (bound === undefined ? current.bound : (bound === null || payload.iss !== bound)) {
      throw new AuthError(401, 'invalid_token', 'the token\'s iss is not the issuer of the key that signed it');
    }
    // The broker never signs a longer life nor a future iat: such a token was not made by it
    // (for instance with a leaked key, to outlive the key's retirement).
    const { iat, exp } = payload;
    if (!Number.isInteger(iat) || !Number.isInteger(exp)) {
      throw new AuthError(401, 'invalid_token', 'the token\'s iat or exp is not an integer');
    }
    if (exp - iat > MAX_TOKEN_LIFETIME) {
      throw new AuthError(401, 'invalid_token', 'the token lives longer than broker tokens do');
    }
    if (iat > Date.now() / 1000 + CLOCK_LEEWAY) throw new AuthError(401, 'invalid_token', 'the token is issued in the future');
    return payload;
  }

  /** Step 1: the token's signature and claims. Resolves with the claims; throws AuthError (401). */
  async authenticate(token) {
    try {
      return await this.#verifyJwt(token);
    } catch (e) {
      if (e instanceof AuthError) throw e;
      if (!e?.code?.startsWith?.('ERR_J')) throw e; // not a verdict on the token: a fault
      throw new AuthError(401, 'invalid_token', describeJoseError(e));
    }
  }

  /**
   * Steps 2 and 3: the scopes the request needs, and (with a broker) that
   * the token is still active. Resolves with the MCP SDK's AuthInfo; throws
   * AuthError (403 insufficient_scope, 401 invalid_token, 503).
   */
  async authorize(token, claims, requiredScopes = []) {
    const scopes = typeof claims.scope === 'string' ? claims.scope.split(' ').filter(Boolean) : [];
    const missing = requiredScopes.filter((s) => !scopes.includes(s));
    if (missing.length) {
      throw new AuthError(403, 'insufficient_scope', `this call needs the scope ${missing.join(' ')}`,
        requiredScopes.join(' '));
    }
    if (this.introspect) {
      let verdict;
      try {
        verdict = await this.broker.introspect(token, {
          audience: this.resource,
          scope: requiredScopes.length === 1 ? requiredScopes[0] : undefined,
          service: this.service,
        });
      } catch (e) {
        if (!(e instanceof BrokerError)) throw e;
        this.log(`introspection failed: ${e.message}`);
        throw new AuthError(503, undefined, 'the token broker cannot be asked; try again shortly');
      }
      if (!verdict.active) {
        if (verdict.reason === 'scope_missing') {
          throw new AuthError(403, 'insufficient_scope', 'the broker says the token lacks the scope',
            requiredScopes.join(' '));
        }
        throw new AuthError(401, 'invalid_token', `the broker says the token is not active: ${verdict.reason}`);
      }
    }
    return {
      token,
      clientId: String(claims.client_id ?? claims.sub),
      scopes,
      expiresAt: claims.exp,
      resource: safeUrl(this.resource),
      extra: { iss: claims.iss, sub: claims.sub, sid: claims.sid, jti: claims.jti, owner: claims.owner, act: claims.act },
    };
  }
}

function safeUrl(s) {
  try {
    return new URL(s);
  } catch {
    return undefined;
  }
}
