// SPDX-License-Identifier: MIT
// Types for agentbroker.js (the client for agent-brokerd). See docs/clients.md.

export const DEFAULT_SOCKET: string;
export const DEFAULT_ADMIN_SOCKET: string;
export const MAX_MESSAGE: number;
export const DEFAULT_TIMEOUT_MS: number;
export const REFRESH_FRACTION: number;

export class BrokerError extends Error {
  constructor(error: string, reason?: string, parameters?: Record<string, unknown>);
  /** The full varlink error name, e.g. "io.agentbroker.ScopeNotGranted". */
  readonly error: string;
  readonly reason: string | undefined;
  readonly parameters: Record<string, unknown>;
}
export class BrokerUnavailable extends BrokerError {
  constructor(reason: string, path?: string);
  readonly path: string | undefined;
}
export class ProtocolError extends BrokerError {
  constructor(reason: string);
}
export class NotAnAgent extends BrokerError {}
export class AudienceNotGranted extends BrokerError {}
export class ScopeNotGranted extends BrokerError {}
export class TtlTooLong extends BrokerError {}
export class ReauthRequired extends BrokerError {}
export class SessionExpired extends BrokerError {}
export class SessionRevoked extends BrokerError {}
export class InvalidToken extends BrokerError {
  readonly verdict: string | undefined;
}
export class DelegationTooDeep extends BrokerError {}
export class InvalidParameter extends BrokerError {
  readonly parameter: string | undefined;
}
export class InvalidMessage extends BrokerError {}
export class MessageTooLarge extends BrokerError {}
export class PeerGone extends BrokerError {}
export class RateLimited extends BrokerError {}
export class TooManyConnections extends BrokerError {}
export class PermissionDenied extends BrokerError {}
export class InternalError extends BrokerError {}
export class AuditUnavailable extends BrokerError {}
export class MethodNotFound extends BrokerError {}
export class LimitReached extends BrokerError {}
export interface PolicyFinding {
  file: string;
  path: string;
  severity: 'error' | 'warning';
  message: string;
}
export class PolicyRejected extends BrokerError {
  readonly findings: PolicyFinding[];
}
export class NoSuchSession extends BrokerError {}
export class NoSuchAgent extends BrokerError {}

export function errorFromReply(name: string, parameters?: Record<string, unknown>): BrokerError;
export function defaultSocketPath(): string;

export class Token {
  constructor(reply: Record<string, unknown>, obtainedAt?: number);
  /** The compact JWT, for "Authorization: Bearer <token>". Not enumerable. */
  readonly token: string;
  /** The broker's reply as it came. Not enumerable. */
  readonly raw: Record<string, unknown>;
  tokenType: string;
  expiresIn: number;
  expiresAt: number;
  jti: string;
  scope: string;
  scopes: string[];
  agent: string;
  sid: string;
  authTime: number | undefined;
  /** Attenuated tokens: the parent's jti and the delegation depth. */
  parent: string | undefined;
  depth: number | undefined;
  /** Client clock (seconds) when the request was sent. */
  obtainedAt: number;
  expired(now?: number): boolean;
}

export interface ClientOptions {
  /** Socket path; default $AGENT_BROKER_SOCKET, else DEFAULT_SOCKET. */
  path?: string;
  /** Milliseconds for connecting, and for each call from its request to the end of its reply (5000). */
  timeout?: number;
  /** Seconds since the epoch (for tests). */
  clock?: () => number;
  /** Share of a token's lifetime after which token() renews it (2/3). */
  refreshFraction?: number;
}

export interface Session {
  sid: string;
  agent: string;
  uid: number;
  pid: number;
  exe: string;
  sha256: string;
  created: number;
  auth_time: number;
  expires: number;
  reauth_before: number;
  state: string;
  [k: string]: unknown;
}

export type Verdict =
  | ({ active: true; token_type: string; iss: string; sub: string; aud: string; scope: string; exp: number;
      iat: number; jti: string; sid: string; auth_time: number } & Record<string, unknown>)
  | { active: false; reason: string };

export interface Jwks {
  keys: Array<{ kty: string; crv: string; x: string; kid: string; alg: string; use: string }>;
  /** The iss of the tokens these keys sign (the broker's --issuer, by default urn:agent-broker:MACHINE-ID). */
  issuer?: string;
}

export class Client {
  constructor(options?: ClientOptions);
  readonly path: string;
  timeout: number;
  open(): Promise<this>;
  close(): void;
  call(method: string, parameters?: Record<string, unknown>): Promise<Record<string, any>>;
  authenticate(): Promise<Session>;
  issue(audience: string, scopes: string | string[], options?: { ttl?: number; task?: string }): Promise<Token>;
  attenuate(
    token: string | Token,
    options?: { audience?: string; scopes?: string | string[]; ttl?: number; task?: string },
  ): Promise<Token>;
  introspect(
    token: string | Token,
    options?: { audience?: string; scope?: string; maxAuthAge?: number; user?: string; service?: string },
  ): Promise<Verdict>;
  revoke(which: { jti: string } | { sid: string } | { token: string | Token }): Promise<number>;
  getKeys(): Promise<Jwks>;
  whoami(): Promise<Record<string, any>>;
  listSessions(): Promise<Session[]>;
  /** Cached per (audience, set of scopes, ttl, task): reused only for an identical request. */
  token(audience: string, scopes: string | string[], options?: { ttl?: number; task?: string }): Promise<string>;
  cachedToken(audience: string, scopes: string | string[], options?: { ttl?: number; task?: string }): Promise<Token>;
  /** Drops all, one audience's, or one (audience, scopes)'s cached tokens, whatever their ttl and task. */
  invalidate(audience?: string, scopes?: string | string[]): void;
}

export function connect(path?: string, options?: Omit<ClientOptions, 'path'>): Promise<Client>;
