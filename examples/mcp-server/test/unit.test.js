// SPDX-License-Identifier: MIT
// The verifier (auth.js) and the agent's helpers (agent.js) without a broker:
// keys made here, tokens signed here, fake fetch and fake broker clients.
// e2e.test.js imports this file, so `node --test test/e2e.test.js` (what
// tests/integration/test-clients runs) runs these too.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import '../webcrypto.js';
import { AuthError, MAX_TOKEN_LIFETIME, TokenVerifier } from '../auth.js';
import { bearerFetch, discoverResource } from '../agent.js';

const RESOURCE = 'mcp://unit.test';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');

function newKey(kid) {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('ed25519');
  return { kid, privateKey, jwk: { ...publicKey.export({ format: 'jwk' }), kid, alg: 'EdDSA', use: 'sig' } };
}

/** A token as the broker signs it, claims and header overridable (an undefined member is left out). */
function mint(key, claims = {}, header = {}) {
  const now = Math.floor(Date.now() / 1000);
  const input = `${b64({ alg: 'EdDSA', typ: 'at+jwt', kid: key.kid, ...header })}.${b64({
    iss: 'urn:unit', sub: 'agent', aud: RESOURCE, scope: 'notes:read', iat: now, nbf: now, exp: now + 300,
    jti: crypto.randomBytes(8).toString('hex'), ...claims,
  })}`;
  return `${input}.${crypto.sign(null, Buffer.from(input), key.privateKey).toString('base64url')}`;
}

/** Write a JWKS the way `agent-brokerctl keys --jwks --out` does: a new file renamed over the old. */
function publish(file, keys) {
  fs.writeFileSync(`${file}.tmp`, JSON.stringify({ keys: keys.map((k) => k.jwk) }));
  fs.renameSync(`${file}.tmp`, file);
}

async function verdict(v, token) {
  try {
    return (await v.authenticate(token)).sub;
  } catch (e) {
    if (!(e instanceof AuthError)) throw e;
    return e.status;
  }
}

function tmpdir(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ab-mcp-unit-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

describe('TokenVerifier: the key set stays current', () => {
  test('a key retired from the JWKS file stops verifying within the check interval', async (t) => {
    const file = path.join(tmpdir(t), 'jwks.json');
    const [oldKey, newKey2] = [newKey('old'), newKey('new')];
    publish(file, [oldKey]);
    const v = new TokenVerifier({ resource: RESOURCE, jwksFile: file, fileCheckInterval: 100 });
    assert.equal(await v.loadKeys(), 1);
    const leaked = mint(oldKey, { exp: Math.floor(Date.now() / 1000) + 3600 });
    assert.equal(await verdict(v, leaked), 'agent');
    // keys rotate --overlap 0 --force, then republish: only the new key
    publish(file, [newKey2]);
    await sleep(150);
    assert.equal(await verdict(v, leaked), 401, 'the retired key no longer verifies');
    assert.equal(await verdict(v, mint(newKey2)), 'agent', 'the new key does');
  });

  test('a file rewritten in place (same size, mtime put back) is re-read', async (t) => {
    const file = path.join(tmpdir(t), 'jwks.json');
    const [a, b] = [newKey('aaaa'), newKey('bbbb')];
    publish(file, [a]);
    const st = fs.statSync(file);
    const v = new TokenVerifier({ resource: RESOURCE, jwksFile: file, fileCheckInterval: 0 });
    await v.loadKeys();
    const tok = mint(a);
    assert.equal(await verdict(v, tok), 'agent');
    fs.writeFileSync(file, JSON.stringify({ keys: [b.jwk] }));
    assert.equal(fs.statSync(file).size, st.size);
    fs.utimesSync(file, st.atime, st.mtime);
    assert.equal(await verdict(v, tok), 401);
  });

  test('the file is re-read every refreshInterval even when it looks the same', async (t) => {
    const file = path.join(tmpdir(t), 'jwks.json');
    const [a, b] = [newKey('aaaa'), newKey('bbbb')];
    publish(file, [a]);
    const v = new TokenVerifier({ resource: RESOURCE, jwksFile: file, fileCheckInterval: 1e9, refreshInterval: 200 });
    await v.loadKeys();
    const tok = mint(a);
    publish(file, [b]);
    assert.equal(await verdict(v, tok), 'agent', 'not yet checked');
    await sleep(250);
    assert.equal(await verdict(v, tok), 401);
  });

  test('keys from the broker are fetched again every refreshInterval', async (t) => {
    const [a, b] = [newKey('aaaa'), newKey('bbbb')];
    let set = [a];
    let calls = 0;
    const broker = { getKeys: async () => { calls++; return { keys: set.map((k) => k.jwk) }; } };
    const v = new TokenVerifier({ resource: RESOURCE, broker, introspect: false, refreshInterval: 200 });
    await v.loadKeys();
    const tok = mint(a);
    assert.equal(await verdict(v, tok), 'agent');
    set = [b];
    await sleep(250);
    assert.equal(await verdict(v, tok), 401, 'a key the broker no longer lists stops verifying');
    assert.equal(await verdict(v, mint(b)), 'agent');
    assert.equal(calls, 2);
  });

  test('a key rotated in just after a periodic reload verifies at once', async () => {
    // the unknown-kid reload has a 10 s throttle of its own: a periodic reload (which
    // loads the set too) must not start it (every token of the new key was refused)
    const [a, b] = [newKey('aaaa'), newKey('bbbb')];
    let set = [a];
    const broker = { getKeys: async () => ({ keys: set.map((k) => k.jwk) }) };
    const v = new TokenVerifier({ resource: RESOURCE, broker, introspect: false, refreshInterval: 100 });
    await v.loadKeys();
    await sleep(150);
    assert.equal(await verdict(v, mint(a)), 'agent'); // a periodic reload here
    set = [a, b];
    await sleep(1050); // the set is not fresh any more (and the next periodic reload is not due)
    v.refreshInterval = 60000;
    assert.equal(await verdict(v, mint(b)), 'agent', 'the new kid is looked up at once');
    set = [a, b, newKey('cccc')];
    assert.equal(await verdict(v, mint(newKey('dddd'))), 401, 'an unknown kid: no second lookup within 10 s');
  });

  test('a key set that cannot be re-read is not used: 503 until it can', async (t) => {
    const file = path.join(tmpdir(t), 'jwks.json');
    const a = newKey('aaaa');
    publish(file, [a]);
    const logged = [];
    const v = new TokenVerifier({ resource: RESOURCE, jwksFile: file, fileCheckInterval: 0, log: (m) => logged.push(m) });
    await v.loadKeys();
    const tok = mint(a);
    fs.writeFileSync(file, '{"keys": [');
    assert.equal(await verdict(v, tok), 503);
    fs.rmSync(file);
    assert.equal(await verdict(v, tok), 503);
    publish(file, [a]);
    assert.equal(await verdict(v, tok), 'agent');
    assert.ok(logged.some((m) => /cannot load the key set/.test(m)));
  });
});

describe('TokenVerifier: lifetimes the broker never issues', () => {
  const key = newKey('k');
  const jwks = { getKeys: async () => ({ keys: [key.jwk] }) };

  test(`exp - iat at most ${MAX_TOKEN_LIFETIME} s (AB_TTL_MAX + 5 s)`, async () => {
    assert.equal(MAX_TOKEN_LIFETIME, 24 * 3600 + 5);
    const v = new TokenVerifier({ resource: RESOURCE, broker: jwks, introspect: false });
    const now = Math.floor(Date.now() / 1000);
    assert.equal(await verdict(v, mint(key, { iat: now, exp: now + MAX_TOKEN_LIFETIME })), 'agent');
    assert.equal(await verdict(v, mint(key, { iat: now, exp: now + MAX_TOKEN_LIFETIME + 1 })), 401);
    assert.equal(await verdict(v, mint(key, { iat: now - 10, exp: now + 365 * 86400 })), 401);
    await assert.rejects(v.authenticate(mint(key, { iat: now, exp: now + 2 * 86400 })),
      (e) => e instanceof AuthError && e.code === 'invalid_token' && /longer/.test(e.message));
  });

  test('iat more than 5 s ahead, or not an integer', async () => {
    const v = new TokenVerifier({ resource: RESOURCE, broker: jwks, introspect: false });
    const now = Math.floor(Date.now() / 1000);
    assert.equal(await verdict(v, mint(key, { iat: now + 4, nbf: now, exp: now + 300 })), 'agent');
    assert.equal(await verdict(v, mint(key, { iat: now + 60, nbf: now, exp: now + 300 })), 401);
    assert.equal(await verdict(v, mint(key, { iat: now + 0.5, exp: now + 300 })), 401);
  });
});

describe('TokenVerifier: each key signs for its own issuer', () => {
  const [a, b] = [newKey('host-a'), newKey('host-b')];
  // what docs/clients.md's jq recipe makes of two hosts' `keys --jwks` files
  const fleet = { keys: [{ ...a.jwk, iss: 'urn:host-a' }, { ...b.jwk, iss: 'urn:host-b' }] };
  const from = (jwks) => ({ getKeys: async () => jwks });

  test('in a merged fleet set, a host\'s key cannot sign in another host\'s name', async () => {
    const v = new TokenVerifier({ resource: RESOURCE, broker: from(fleet), introspect: false });
    assert.equal(await verdict(v, mint(b, { iss: 'urn:host-b' })), 'agent');
    assert.equal(await verdict(v, mint(b, { iss: 'urn:host-a' })), 401, 'host B\'s key, host A\'s name');
    assert.equal(await verdict(v, mint(b, { iss: undefined })), 401, 'no iss');
    await assert.rejects(v.authenticate(mint(a, { iss: 'urn:host-b' })),
      (e) => e instanceof AuthError && /issuer of the key/.test(e.message));
  });

  test('--issuer picks the hosts whose tokens a server takes', async () => {
    const v = new TokenVerifier({ resource: RESOURCE, broker: from(fleet), introspect: false, issuer: ['urn:host-a'] });
    assert.equal(await verdict(v, mint(a, { iss: 'urn:host-a' })), 'agent');
    assert.equal(await verdict(v, mint(b, { iss: 'urn:host-b' })), 401, 'host B is not one of them');
  });

  test('one host\'s set names its issuer; a kid listed for two issuers verifies nothing', async () => {
    let v = new TokenVerifier({ resource: RESOURCE, broker: from({ keys: [a.jwk], issuer: 'urn:host-a' }), introspect: false });
    assert.equal(await verdict(v, mint(a, { iss: 'urn:host-a' })), 'agent');
    assert.equal(await verdict(v, mint(a, { iss: 'urn:elsewhere' })), 401);
    const twice = { keys: [{ ...a.jwk, iss: 'urn:host-a' }, { ...a.jwk, iss: 'urn:host-b' }] };
    v = new TokenVerifier({ resource: RESOURCE, broker: from(twice), introspect: false });
    assert.equal(await verdict(v, mint(a, { iss: 'urn:host-a' })), 401);
  });

  test('a token without a kid is refused, even where only one key could have signed it', async () => {
    // jose picks the only matching key itself: without a kid there is no key to look the issuer up by
    const v = new TokenVerifier({ resource: RESOURCE, broker: from({ keys: [a.jwk], issuer: 'urn:host-a' }), introspect: false });
    assert.equal(await verdict(v, mint(a, { iss: 'urn:host-a' })), 'agent');
    assert.equal(await verdict(v, mint(a, { iss: 'urn:host-b' }, { kid: undefined })), 401, 'host A\'s key, host B\'s name, no kid');
    assert.equal(await verdict(v, mint(a, { iss: 'urn:host-a' }, { kid: undefined })), 401, 'the broker always sets kid');
    await assert.rejects(v.authenticate(mint(a, {}, { kid: 42 })), (e) => e instanceof AuthError && e.status === 401);
    // nor in a set that binds no key
    const plain = new TokenVerifier({ resource: RESOURCE, broker: from({ keys: [a.jwk] }), introspect: false });
    assert.equal(await verdict(plain, mint(a)), 'agent');
    assert.equal(await verdict(plain, mint(a, {}, { kid: undefined })), 401);
  });

  test('in a set that binds keys, a key it does not bind verifies nothing', async () => {
    const v = new TokenVerifier({ resource: RESOURCE, broker: from({ keys: [{ ...a.jwk, iss: 'urn:host-a' }, b.jwk] }),
      introspect: false });
    assert.equal(await verdict(v, mint(a, { iss: 'urn:host-a' })), 'agent');
    assert.equal(await verdict(v, mint(b, { iss: 'urn:host-a' })), 401, 'an unbound key, a bound host\'s name');
    assert.equal(await verdict(v, mint(b, { iss: 'urn:host-b' })), 401);
  });

  test('a reload while a token is checked: the key and its issuer come from the same set', async () => {
    // A's set, then (reloaded while A's key verifies a token) a set without A's kid that binds
    // no key: the issuer check must use the set that verified the token, not the one loaded since
    let set = { keys: [a.jwk], issuer: 'urn:host-a' };
    let loads = 0;
    const v = new TokenVerifier({ resource: RESOURCE, broker: { getKeys: async () => { loads++; return set; } },
      introspect: false });
    await v.loadKeys();
    set = { keys: [b.jwk] };
    const subtle = globalThis.crypto.subtle;
    const verify = subtle.verify;
    subtle.verify = async (...args) => { // called once jose has picked the key: reload then
      subtle.verify = verify;
      await v.loadKeys();
      return verify.apply(subtle, args);
    };
    try {
      assert.equal(await verdict(v, mint(a, { iss: 'urn:host-b' })), 401, 'host A\'s key, host B\'s name');
    } finally {
      subtle.verify = verify;
    }
    assert.equal(loads, 2, 'the reload happened during the check');
    assert.equal(await verdict(v, mint(a, { iss: 'urn:host-a' })), 401, 'A\'s key is gone now');
  });
});

/** A fetch that answers from a list of [status, body] and records what it was asked. */
function fakeFetch(answers) {
  const calls = [];
  const f = async (input, init = {}) => {
    calls.push({ url: String(input), auth: new Headers(init.headers).get('authorization'), body: init.body });
    const [status, body] = answers.shift();
    return new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json' } });
  };
  f.calls = calls;
  return f;
}

describe('agent: the resource it asks tokens for', () => {
  test('the metadata must name the URL the agent uses (RFC 9728 §3.3)', async () => {
    const url = 'http://127.0.0.1:1/mcp';
    const ok = fakeFetch([[200, { resource: url }]]);
    assert.equal(await discoverResource(url, { fetchImpl: ok }), url);
    assert.equal(ok.calls[0].url, 'http://127.0.0.1:1/.well-known/oauth-protected-resource/mcp');
    // a server that claims another audience (one the agent holds grants for) gets no token for it
    const liar = fakeFetch([[200, { resource: 'mcp://git.internal' }]]);
    await assert.rejects(discoverResource(url, { fetchImpl: liar }), /says it is "mcp:\/\/git\.internal"/);
    await assert.rejects(discoverResource(url, { fetchImpl: fakeFetch([[200, {}]]) }), /names no resource/);
  });

  test('or the id pinned with --resource', async () => {
    const url = 'http://127.0.0.1:1/mcp';
    assert.equal(await discoverResource(url, { pinned: 'mcp://notes', fetchImpl: fakeFetch([[200, { resource: 'mcp://notes' }]]) }),
      'mcp://notes');
    assert.equal(await discoverResource(url, { pinned: 'mcp://notes', fetchImpl: fakeFetch([[404, {}]]) }), 'mcp://notes');
    // pinned: metadata that cannot be had is no reason to refuse (only metadata naming another resource is)
    for (const status of [401, 403, 500]) {
      assert.equal(await discoverResource(url, { pinned: 'mcp://notes', fetchImpl: fakeFetch([[status, {}]]) }),
        'mcp://notes');
    }
    const down = async () => { throw new TypeError('fetch failed'); };
    assert.equal(await discoverResource(url, { pinned: 'mcp://notes', fetchImpl: down }), 'mcp://notes');
    await assert.rejects(discoverResource(url, { fetchImpl: down }), /fetch failed/);
    await assert.rejects(discoverResource(url, { pinned: 'mcp://notes', fetchImpl: fakeFetch([[200, { resource: 'mcp://other' }]]) }),
      /--resource/);
  });

  test('a 401 drops the cached token and the request is tried once with a new one', async () => {
    let n = 0;
    const invalidated = [];
    const broker = { token: async () => `tok${++n}`, invalidate: (aud, scopes) => invalidated.push([aud, scopes]) };
    const f = fakeFetch([[401, {}], [200, { ok: true }]]);
    const res = await bearerFetch(broker, 'mcp://notes', ['notes:read'], f)('http://x/mcp', { method: 'POST', body: '{}' });
    assert.equal(res.status, 200);
    assert.deepEqual(invalidated, [['mcp://notes', ['notes:read']]]);
    assert.deepEqual(f.calls.map((c) => [c.auth, c.body]), [['Bearer tok1', '{}'], ['Bearer tok2', '{}']]);
    // refused again: that answer is the caller's, no loop
    const f2 = fakeFetch([[401, {}], [401, {}]]);
    assert.equal((await bearerFetch(broker, 'mcp://notes', ['notes:read'], f2)('http://x/mcp', {})).status, 401);
    assert.equal(f2.calls.length, 2);
  });
});
