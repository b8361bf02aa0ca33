// SPDX-License-Identifier: MIT
// agentbroker.js against a real agent-brokerd.
//
// tests/integration/test-clients.c starts the broker with a policy made for
// these tests and sets:
//   AGENT_BROKER_SOCKET        the agent socket (without it every test here is skipped)
//   AGENT_BROKER_ADMIN_SOCKET  the admin socket (optional: the admin revocation test)
//   AB_TEST_AGENT              the agent entry this node matches (node-client)
//   AB_TEST_REAUTH             its session's reauth_interval in seconds (3)
// The policy grants that agent mcp://notes.test (notes:read, notes:write,
// max_ttl 600) and https://other.test (other:read, max_ttl 60), default
// max_delegation_depth 1; uid 65534 is the agent nobody-client
// (mcp://notes.test notes:read); uid 1 matches no agent.
import { test as nodeTest, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as ab from '../agentbroker.js';

const SOCK = process.env.AGENT_BROKER_SOCKET;
const ADMIN = process.env.AGENT_BROKER_ADMIN_SOCKET;
const AGENT = process.env.AB_TEST_AGENT || 'node-client';
const REAUTH = Number(process.env.AB_TEST_REAUTH || 3);
const NOTES = 'mcp://notes.test';
const OTHER = 'https://other.test';
const CLIENT_JS = fileURLToPath(new URL('../agentbroker.js', import.meta.url));
const isRoot = process.geteuid() === 0;

function haveBroker() {
  try {
    return Boolean(SOCK) && fs.statSync(SOCK).isSocket();
  } catch {
    return false;
  }
}
const skip = haveBroker()
  ? false
  : 'no broker: AGENT_BROKER_SOCKET names no broker socket (make check runs these against a real agent-brokerd)';

// Without a broker every test below is reported as skipped, with the reason:
// a skipped describe() would hide them (node counts none of them as skipped).
function test(name, options, fn) {
  if (typeof options === 'function') [options, fn] = [{}, options];
  return nodeTest(name, skip ? { ...options, skip } : options, fn);
}

const b64json = (seg) => JSON.parse(Buffer.from(seg, 'base64url').toString());
const claimsOf = (jwt) => b64json(jwt.split('.')[1]);
const headerOf = (jwt) => b64json(jwt.split('.')[0]);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Run body (the text of an async function taking the client module `ab`) in
 * a new node process (its own broker session), as uid if given; resolve with
 * what it returned, or {exception, error} for what it threw.
 */
let childDir;
function inChild(body, uid = undefined) {
  if (!childDir) {
    // a copy anyone may read: the child may run as another uid
    childDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ab-node-test-'));
    fs.chmodSync(childDir, 0o755);
    fs.copyFileSync(CLIENT_JS, path.join(childDir, 'agentbroker.mjs'));
    fs.chmodSync(path.join(childDir, 'agentbroker.mjs'), 0o644);
  }
  const script = `
    import * as ab from ${JSON.stringify(path.join(childDir, 'agentbroker.mjs'))};
    const fn = ${body};
    let out;
    try { out = await fn(ab); } catch (e) { out = { exception: e.name, error: e.error, message: e.message }; }
    process.stdout.write(JSON.stringify(out ?? null));`;
  const opts = { stdio: ['ignore', 'pipe', 'pipe'], env: process.env, cwd: '/' };
  if (uid !== undefined) Object.assign(opts, { uid, gid: uid });
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ['--input-type=module', '-e', script], opts);
    let out = '';
    let errText = '';
    const timer = setTimeout(() => p.kill('SIGKILL'), 15000);
    p.stdout.on('data', (d) => { out += d; });
    p.stderr.on('data', (d) => { errText += d; });
    p.on('error', reject);
    p.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code !== 0) return reject(new Error(`child exited ${code ?? signal}: ${errText}`));
      resolve(JSON.parse(out));
    });
  });
}

describe('against agent-brokerd', () => {
  let c;
  before(async () => {
    if (!skip) c = await ab.connect();
  });
  after(() => {
    c?.close();
    if (childDir) fs.rmSync(childDir, { recursive: true, force: true });
  });

  test('connect uses the environment', () => {
    assert.equal(c.path, SOCK);
  });

  test('whoami', async () => {
    const w = await c.whoami();
    assert.equal(w.agent, AGENT);
    assert.equal(w.uid, process.geteuid());
    assert.equal(w.pid, process.pid);
    assert.equal(fs.realpathSync(w.exe), fs.realpathSync(process.execPath));
    assert.deepEqual(w.grants.map((g) => g.audience).sort(), [OTHER, NOTES]);
  });

  test('authenticate', async () => {
    const s = await c.authenticate();
    assert.equal(s.sid.length, 22);
    assert.equal(s.agent, AGENT);
    assert.equal(s.state, 'active');
    assert.ok(Math.abs(s.auth_time - Date.now() / 1000) <= 2);
    assert.equal(s.reauth_before, s.auth_time + REAUTH);
    assert.equal((await c.whoami()).session.sid, s.sid);
    assert.ok((await c.listSessions()).some((x) => x.sid === s.sid));
  });

  test('issue, and the signature verifies with the JWKS', async () => {
    const t = await c.issue(NOTES, ['notes:read'], { ttl: 120, task: 'node test' });
    assert.equal(t.tokenType, 'Bearer');
    assert.equal(t.scope, 'notes:read');
    assert.equal(t.agent, AGENT);
    assert.ok(t.expiresIn > 0 && t.expiresIn <= 120);
    assert.equal(t.jti.slice(0, 21), t.sid.slice(0, 21), 'a jti starts with its session id');
    const hdr = headerOf(t.token);
    const claims = claimsOf(t.token);
    assert.deepEqual([hdr.alg, hdr.typ], ['EdDSA', 'at+jwt']);
    assert.deepEqual([claims.aud, claims.sub, claims.scope, claims.jti, claims.exp],
      [NOTES, AGENT, 'notes:read', t.jti, t.expiresAt]);
    const jwk = (await c.getKeys()).keys.find((k) => k.kid === hdr.kid);
    assert.ok(jwk, 'the kid is in the JWKS');
    const key = crypto.createPublicKey({ key: { kty: jwk.kty, crv: jwk.crv, x: jwk.x }, format: 'jwk' });
    const [h, p, s] = t.token.split('.');
    assert.ok(crypto.verify(null, Buffer.from(`${h}.${p}`), key, Buffer.from(s, 'base64url')));
    assert.ok(!crypto.verify(null, Buffer.from(`${h}.${p}x`), key, Buffer.from(s, 'base64url')));
  });

  test('default ttl, one scope as a string', async () => {
    const t = await c.issue(NOTES, 'notes:write');
    assert.deepEqual(t.scopes, ['notes:write']);
    assert.ok(t.expiresIn > 0 && t.expiresIn <= 300);
  });

  test('denials are typed', async () => {
    await assert.rejects(c.issue('https://nope.test', ['x']), (e) => e instanceof ab.AudienceNotGranted &&
      e.error === 'io.agentbroker.AudienceNotGranted' && Boolean(e.reason));
    await assert.rejects(c.issue(NOTES, ['notes:read', 'notes:admin']), ab.ScopeNotGranted);
    await assert.rejects(c.issue(OTHER, ['other:read'], { ttl: 61 }), ab.TtlTooLong);
    await c.issue(OTHER, ['other:read'], { ttl: 60 });
    await assert.rejects(c.issue(NOTES, ['notes:read'], { ttl: 0 }), (e) => e instanceof ab.InvalidParameter &&
      e.parameter === 'ttl');
    await assert.rejects(c.call('io.agentbroker.NoSuchMethod'), ab.MethodNotFound);
  });

  test('introspect', async () => {
    const t = await c.issue(NOTES, ['notes:read', 'notes:write'], { ttl: 60 });
    const v = await c.introspect(t, { audience: NOTES, scope: 'notes:write', service: 'node-test' });
    assert.equal(v.active, true);
    assert.deepEqual([v.aud, v.sub, v.jti, v.sid], [NOTES, AGENT, t.jti, t.sid]);
    assert.deepEqual(await c.introspect(t.token, { audience: OTHER }), { active: false, reason: 'wrong_audience' });
    assert.equal((await c.introspect(t, { scope: 'notes:admin' })).reason, 'scope_missing');
    assert.equal((await c.introspect('a.b.c')).reason, 'bad_signature');
  });

  test('attenuate', async () => {
    const parent = await c.issue(NOTES, ['notes:read', 'notes:write'], { ttl: 120 });
    const child = await c.attenuate(parent, { scopes: ['notes:read'], ttl: 30, task: 'read only' });
    assert.equal(child.scope, 'notes:read');
    assert.deepEqual([child.parent, child.depth], [parent.jti, 1]);
    assert.ok(child.expiresAt <= parent.expiresAt);
    assert.equal(claimsOf(child.token).act.sub, AGENT);
    assert.equal((await c.introspect(child, { audience: NOTES })).active, true);
    const narrow = await c.issue(NOTES, ['notes:read'], { ttl: 60 });
    await assert.rejects(c.attenuate(narrow, { scopes: ['notes:read', 'notes:write'] }), ab.ScopeNotGranted);
    await assert.rejects(c.attenuate(parent, { audience: OTHER }), ab.AudienceNotGranted);
    await assert.rejects(c.attenuate(parent, { ttl: 600 }), ab.TtlTooLong);
    await assert.rejects(c.attenuate(child), ab.DelegationTooDeep);
    await assert.rejects(c.attenuate('not.a.token'), (e) => e instanceof ab.InvalidToken && e.verdict === 'bad_signature');
  });

  test('revoke own tokens', async () => {
    const a = await c.issue(NOTES, ['notes:read'], { ttl: 60 });
    const b = await c.issue(NOTES, ['notes:read'], { ttl: 60 });
    const child = await c.attenuate(b, { ttl: 30 });
    assert.ok(await c.revoke({ jti: a.jti }) >= 1);
    assert.equal((await c.introspect(a)).reason, 'revoked');
    assert.equal((await c.introspect(b)).active, true);
    assert.ok(await c.revoke({ token: b }) >= 1);
    assert.equal((await c.introspect(b)).reason, 'revoked');
    assert.equal((await c.introspect(child)).reason, 'revoked', 'revoking a parent ends its children');
    await assert.rejects(c.attenuate(b), (e) => e instanceof ab.InvalidToken && e.verdict === 'revoked');
    assert.equal((await c.introspect(await c.issue(NOTES, ['notes:read']))).active, true, 'the session goes on');
  });

  test('token cache', async () => {
    let now = Date.now() / 1000;
    const cc = await ab.connect(undefined, { clock: () => now });
    try {
      const t1 = await cc.cachedToken(NOTES, ['notes:write', 'notes:read'], { ttl: 60 });
      assert.equal((await cc.cachedToken(NOTES, ['notes:read', 'notes:write'], { ttl: 60 })).jti, t1.jti);
      now += 39;
      assert.equal(await cc.token(NOTES, ['notes:read', 'notes:write'], { ttl: 60 }), t1.token);
      now += 2;
      const t2 = await cc.cachedToken(NOTES, ['notes:read', 'notes:write'], { ttl: 60 });
      assert.notEqual(t2.jti, t1.jti);
      assert.equal((await cc.introspect(t2, { audience: NOTES, scope: 'notes:write' })).active, true);
      await cc.revoke({ jti: t2.jti });
      const t3 = await cc.cachedToken(NOTES, ['notes:read', 'notes:write'], { ttl: 60 });
      assert.notEqual(t3.jti, t2.jti, 'a token revoked through the client leaves the cache');
    } finally {
      cc.close();
    }
  });

  test('the token cache answers only the same request (ttl, task)', async () => {
    const cc = await ab.connect();
    try {
      const short = await cc.cachedToken(NOTES, ['notes:read'], { ttl: 30 });
      const long = await cc.cachedToken(NOTES, ['notes:read'], { ttl: 300 });
      assert.notEqual(long.jti, short.jti);
      let cl = claimsOf(long.token);
      assert.equal(cl.exp - cl.iat, 300, 'ttl 300 gets a 300 s token, not the cached 30 s one');
      cl = claimsOf(await cc.token(NOTES, ['notes:read'], { ttl: 30 }));
      assert.deepEqual([cl.jti, cl.exp - cl.iat], [short.jti, 30]);
      const a = await cc.cachedToken(NOTES, ['notes:read'], { ttl: 30, task: 'task A' });
      const b = await cc.cachedToken(NOTES, ['notes:read'], { ttl: 30, task: 'task B' });
      assert.equal(claimsOf(a.token).task, 'task A');
      assert.equal(claimsOf(b.token).task, 'task B', 'a token labelled for task A is not reused for B');
      assert.equal(claimsOf(short.token).task, undefined);
      assert.equal((await cc.cachedToken(NOTES, ['notes:read'], { ttl: 30, task: 'task A' })).jti, a.jti);
    } finally {
      cc.close();
    }
  });

  test('ReauthRequired is handled', async () => {
    const first = await c.authenticate();
    await sleep((REAUTH + 1.1) * 1000);
    await assert.rejects(c.call('io.agentbroker.IssueToken', { audience: NOTES, scopes: ['notes:read'] }),
      (e) => e instanceof ab.ReauthRequired && e.parameters.sid === first.sid);
    const t = await c.issue(NOTES, ['notes:read']);
    assert.equal(t.sid, first.sid, 're-authentication keeps the session');
    assert.ok(t.authTime > first.auth_time);
    assert.equal(claimsOf(t.token).auth_time, t.authTime);
  });

  test('a process that revokes its own session gets no new one', async () => {
    const out = await inChild(`async (ab) => {
      const c = await ab.connect();
      const t = await c.issue(${JSON.stringify(NOTES)}, ['notes:read']);
      const out = { revoked: await c.revoke({ sid: t.sid }), verdict: (await c.introspect(t)).reason };
      for (const [name, fn] of [['issue', () => c.issue(${JSON.stringify(NOTES)}, ['notes:read'])],
                                ['authenticate', () => c.authenticate()]]) {
        try { await fn(); out[name] = 'no error'; } catch (e) { out[name] = e.name; }
      }
      c.close();
      return out;
    }`);
    assert.ok(out.revoked >= 1, JSON.stringify(out));
    assert.equal(out.verdict, 'revoked');
    assert.equal(out.issue, 'SessionRevoked');
    assert.equal(out.authenticate, 'SessionRevoked');
    assert.equal((await c.introspect(await c.issue(NOTES, ['notes:read']))).active, true);
  });

  test('a process that is no agent: NotAnAgent', { skip: !isRoot && 'needs root to run a child as uid 1' }, async () => {
    const out = await inChild(`async (ab) => {
      const c = await ab.connect();
      await c.issue(${JSON.stringify(NOTES)}, ['notes:read']);
      return { exception: null };
    }`, 1);
    assert.equal(out.exception, 'NotAnAgent');
    assert.equal(out.error, 'io.agentbroker.NotAnAgent');
  });

  test('another uid\'s token: PermissionDenied', { skip: !isRoot && 'needs root to run a child as uid 65534' }, async () => {
    const out = await inChild(`async (ab) => {
      const c = await ab.connect();
      const t = await c.issue(${JSON.stringify(NOTES)}, ['notes:read']);
      c.close();
      return { token: t.token };
    }`, 65534);
    assert.ok(out.token, JSON.stringify(out));
    assert.equal(claimsOf(out.token).sub, 'nobody-client');
    await assert.rejects(c.revoke({ token: out.token }), ab.PermissionDenied);
    await assert.rejects(c.revoke({ jti: claimsOf(out.token).jti }), ab.PermissionDenied);
    await assert.rejects(c.attenuate(out.token), ab.PermissionDenied);
    assert.equal((await c.introspect(out.token)).active, true, 'anyone may introspect');
  });

  test('admin revocation', { skip: !ADMIN && 'AGENT_BROKER_ADMIN_SOCKET not set' }, async () => {
    const t = await c.issue(NOTES, ['notes:read'], { ttl: 60 });
    const admin = await ab.connect(ADMIN);
    try {
      assert.ok((await admin.call('io.agentbroker.admin.Revoke', { jti: t.jti })).revoked >= 1);
      await assert.rejects(admin.call('io.agentbroker.admin.Revoke', {}), ab.InvalidParameter);
    } finally {
      admin.close();
    }
    assert.equal((await c.introspect(t)).reason, 'revoked');
  });

  test('admin errors are typed', { skip: !ADMIN && 'AGENT_BROKER_ADMIN_SOCKET not set' }, async () => {
    const admin = await ab.connect(ADMIN);
    try {
      await assert.rejects(admin.call('io.agentbroker.admin.Revoke', { sid: 'A'.repeat(22) }),
        (e) => e instanceof ab.NoSuchSession && e.error === 'io.agentbroker.admin.NoSuchSession');
      await assert.rejects(admin.call('io.agentbroker.admin.ShowPolicy', { agent: 'no-such-agent' }),
        (e) => e instanceof ab.NoSuchAgent && e.error === 'io.agentbroker.admin.NoSuchAgent');
    } finally {
      admin.close();
    }
  });

  test('an idle client does not keep the process alive', async () => {
    const out = await inChild(`async (ab) => {
      const c = await ab.connect();
      await c.whoami();
      setTimeout(() => { process.stdout.write('"timer"'); }, 1000).unref();
      return 'done';
    }`);
    assert.equal(out, 'done');
  });
});
