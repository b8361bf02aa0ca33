// SPDX-License-Identifier: MIT
// agentbroker.js against a scripted fake varlink server: framing, error
// mapping, retries, limits and the token cache. Needs no broker.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { inspect } from 'node:util';
import * as ab from '../agentbroker.js';

/**
 * A Unix socket server. handler(request, connIndex) returns what to send: an
 * object (JSON-encoded, NUL added), a string (NUL added), a Buffer (as is),
 * null (close without a reply), {close: Buffer} (send, then close), or
 * {delay: ms, then: reply}. The third argument is the server's end of the
 * connection, for a handler that writes more later.
 */
async function fakeBroker(t, handler) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ab-fake-'));
  const sockPath = path.join(dir, 'sock');
  const fb = { path: sockPath, requests: [], connections: 0, handler };
  const conns = new Set();
  const server = net.createServer((c) => {
    const index = ++fb.connections;
    conns.add(c);
    c.on('close', () => conns.delete(c));
    c.on('error', () => {});
    let buf = Buffer.alloc(0);
    c.on('data', async (d) => {
      buf = Buffer.concat([buf, d]);
      let nul;
      while ((nul = buf.indexOf(0)) >= 0) {
        const req = JSON.parse(buf.subarray(0, nul).toString());
        buf = buf.subarray(nul + 1);
        fb.requests.push(req);
        let out = fb.handler(req, index, c);
        if (out && out.delay) {
          await new Promise((r) => setTimeout(r, out.delay));
          out = out.then;
        }
        if (out === null) return c.destroy();
        if (out && out.close) return c.end(out.close);
        if (Buffer.isBuffer(out)) c.write(out);
        else if (typeof out === 'string') c.write(out + '\0');
        else c.write(JSON.stringify(out) + '\0');
      }
    });
  });
  await new Promise((r) => server.listen(sockPath, r));
  t.after(async () => {
    for (const c of conns) c.destroy();
    await new Promise((r) => server.close(r));
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return fb;
}

function tokenReply({ jti = 'j1', expiresIn = 300, scope = 'a b', now = Date.now() / 1000 } = {}) {
  now = Math.floor(now);
  return {
    parameters: {
      token: `h.p.${jti}`, token_type: 'Bearer', expires_in: expiresIn, expires_at: now + expiresIn, jti, scope,
      agent: 'x', sid: 's'.repeat(22), auth_time: now,
    },
  };
}

const err = (error, parameters = {}) => ({ error, parameters });

describe('framing', () => {
  test('a request is JSON and a NUL, without undefined parameters', async (t) => {
    const fb = await fakeBroker(t, () => tokenReply());
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    const tok = await c.issue('aud://x', ['b', 'a'], { ttl: 60 });
    await c.issue('aud://x', 'single');
    assert.deepEqual(fb.requests[0], {
      method: 'io.agentbroker.IssueToken', parameters: { audience: 'aud://x', scopes: ['b', 'a'], ttl: 60 },
    });
    assert.deepEqual(fb.requests[1].parameters.scopes, ['single']);
    assert.equal(tok.token, 'h.p.j1');
    assert.deepEqual(tok.scopes, ['a', 'b']);
    assert.equal(tok.expiresIn, 300);
    assert.equal(fb.connections, 1, 'one connection for several calls');
  });

  test('method names and parameter names', async (t) => {
    const fb = await fakeBroker(t, () => ({ parameters: { keys: [], revoked: 1, sessions: [{ sid: 'x' }], token: 'c' } }));
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    await c.authenticate();
    await c.whoami();
    assert.deepEqual((await c.getKeys()).keys, []);
    await c.introspect('tok', { audience: 'a', scope: 's', maxAuthAge: 5, service: 'svc' });
    assert.equal(await c.revoke({ jti: 'J' }), 1);
    await c.revoke({ sid: 'S' });
    await c.revoke({ token: 'T' });
    assert.deepEqual(await c.listSessions(), [{ sid: 'x' }]);
    await c.attenuate('P', { scopes: 'a', ttl: 10 });
    const got = fb.requests.map((r) => [r.method.split('.').pop(), r.parameters]);
    assert.deepEqual(got, [
      ['Authenticate', undefined], ['WhoAmI', undefined], ['GetKeys', undefined],
      ['Introspect', { token: 'tok', audience: 'a', scope: 's', max_auth_age: 5, service: 'svc' }],
      ['Revoke', { jti: 'J' }], ['Revoke', { sid: 'S' }], ['Revoke', { token: 'T' }], ['ListSessions', undefined],
      ['Attenuate', { token: 'P', scopes: ['a'], ttl: 10 }],
    ]);
  });

  test('revoke needs exactly one parameter', async (t) => {
    const fb = await fakeBroker(t, () => ({ parameters: { revoked: 1 } }));
    const c = new ab.Client({ path: fb.path });
    await assert.rejects(c.revoke(), TypeError);
    await assert.rejects(c.revoke({ jti: 'a', sid: 'b' }), TypeError);
    assert.equal(fb.requests.length, 0);
  });

  test('concurrent calls are answered in order on one connection', async (t) => {
    const fb = await fakeBroker(t, (req) => ({ parameters: { echo: req.parameters.token } }));
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    const want = Array.from({ length: 100 }, (_, i) => `t${i}`);
    const got = await Promise.all(want.map((v) => c.introspect(v).then((r) => r.echo)));
    assert.deepEqual(got, want);
    assert.equal(fb.connections, 1);
  });

  test('a reply split across reads, and two replies in one', async (t) => {
    let n = 0;
    const fb = await fakeBroker(t, () => {
      n++;
      return n === 1 ? Buffer.from('{"parameters":{"n":1}}\0') : { parameters: { n } };
    });
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    assert.deepEqual(await c.whoami(), { n: 1 });
    assert.deepEqual(await c.whoami(), { n: 2 });
  });

  test('two replies in one read: ProtocolError, and the next call opens a new connection', async (t) => {
    // One call, one reply (as the C and Python clients): a second reply would answer nothing we asked.
    const fb = await fakeBroker(t, (req, i) => (i === 1
      ? Buffer.from(`${JSON.stringify(tokenReply({ jti: 'asked' }))}\0${JSON.stringify(tokenReply({ jti: 'other' }))}\0`)
      : { parameters: { conn: i } }));
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    await assert.rejects(c.issue('aud', ['a']), (e) => e instanceof ab.ProtocolError && /more than one reply/.test(e.message));
    assert.deepEqual(await c.whoami(), { conn: 2 });
  });

  test('part of a second reply is a ProtocolError too', async (t) => {
    const fb = await fakeBroker(t, () => Buffer.from(`${JSON.stringify(tokenReply())}\0{"parameters":{"token":"INJ`));
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    await assert.rejects(c.issue('aud', ['a']), ab.ProtocolError);
  });

  test('bytes between calls are never the next reply', async (t) => {
    // a whole stale reply, or the start of one that the next reply would complete
    for (const stale of [`${JSON.stringify(tokenReply({ jti: 'stale' }))}\0`, '{"parameters":{"token":"stale","x":"']) {
      const fb = await fakeBroker(t, (req, i, conn) => {
        if (i > 1) return tokenReply({ jti: 'fresh' });
        setTimeout(() => conn.write(stale), 50);
        return { parameters: { conn: 1 } };
      });
      const c = await ab.connect(fb.path);
      t.after(() => c.close());
      assert.deepEqual(await c.whoami(), { conn: 1 });
      await new Promise((r) => setTimeout(r, 200));
      assert.equal((await c.issue('aud', ['a'])).jti, 'fresh', stale);
      assert.equal(fb.connections, 2);
    }
  });

  test('reply fields are type-checked', async (t) => {
    let params;
    const fb = await fakeBroker(t, () => ({ parameters: params }));
    const c = new ab.Client({ path: fb.path });
    t.after(() => c.close());
    const good = tokenReply().parameters;
    for (const [name, value] of [['token', ''], ['token', ['x']], ['expires_in', 'abc'], ['expires_in', '300'],
      ['expires_in', true], ['expires_in', 300.5], ['expires_in', 1e300], ['expires_at', 'x'], ['token_type', 1],
      ['jti', 5], ['scope', ['a']], ['sid', {}], ['agent', 1], ['auth_time', 'now'], ['parent', 1], ['depth', '1']]) {
      params = { ...good, [name]: value };
      await assert.rejects(c.issue('a', ['s']), ab.ProtocolError, `${name}=${JSON.stringify(value)}`);
      await assert.rejects(c.token('a', ['s']), ab.ProtocolError, `${name}=${JSON.stringify(value)}`);
    }
    params = { ...good, parent: null, depth: null };
    const tok = await c.issue('a', ['s']);
    assert.deepEqual([tok.expiresIn, tok.parent, tok.depth], [300, undefined, undefined]);
    params = { revoked: '1' };
    await assert.rejects(c.revoke({ jti: 'x' }), ab.ProtocolError);
    params = { sessions: 'abc' };
    await assert.rejects(c.listSessions(), ab.ProtocolError);
  });

  test('printing a Token never shows the token', () => {
    const tok = new ab.Token(tokenReply().parameters);
    assert.ok(!inspect(tok).includes('h.p.j1'));
    assert.ok(!String(tok).includes('h.p.j1'));
    assert.ok(!JSON.stringify(tok).includes('h.p.j1'));
    assert.equal(tok.token, 'h.p.j1');
  });

  test('the default socket and the environment', () => {
    const old = process.env.AGENT_BROKER_SOCKET;
    try {
      delete process.env.AGENT_BROKER_SOCKET;
      assert.equal(new ab.Client().path, '/run/agent-broker/io.agentbroker');
      process.env.AGENT_BROKER_SOCKET = '/tmp/some/where';
      assert.equal(new ab.Client().path, '/tmp/some/where');
      assert.equal(new ab.Client({ path: '/x' }).path, '/x');
    } finally {
      if (old === undefined) delete process.env.AGENT_BROKER_SOCKET;
      else process.env.AGENT_BROKER_SOCKET = old;
    }
  });
});

describe('errors', () => {
  const names = [
    'NotAnAgent', 'AudienceNotGranted', 'ScopeNotGranted', 'TtlTooLong', 'ReauthRequired', 'SessionExpired',
    'SessionRevoked', 'InvalidToken', 'DelegationTooDeep', 'InvalidParameter', 'InvalidMessage', 'MessageTooLarge',
    'PeerGone', 'RateLimited', 'TooManyConnections', 'PermissionDenied', 'InternalError', 'AuditUnavailable',
  ];

  test('every agent error has its class', async (t) => {
    let name;
    const fb = await fakeBroker(t, () => err(`io.agentbroker.${name}`, {
      reason: 'because', sid: 'S', verdict: 'expired', parameter: 'ttl',
    }));
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    for (name of names) {
      const e = await c.whoami().then(() => null, (x) => x);
      assert.ok(e instanceof ab.BrokerError, name);
      assert.equal(e.constructor, ab[name]);
      assert.equal(e.name, name);
      assert.equal(e.error, `io.agentbroker.${name}`);
      assert.equal(e.reason, 'because');
      assert.equal(e.parameters.sid, 'S');
      assert.match(e.message, /because/);
    }
    name = 'InvalidToken';
    await assert.rejects(c.whoami(), (e) => e.verdict === 'expired');
    name = 'InvalidParameter';
    await assert.rejects(c.whoami(), (e) => e.parameter === 'ttl');
  });

  test('limit and admin errors have their classes', async (t) => {
    const finding = { file: 'a.json', path: '$.agents[0].owner', severity: 'error', message: 'missing' };
    let name;
    let params;
    const fb = await fakeBroker(t, () => err(name, params));
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    for ([name, params] of [
      ['io.agentbroker.LimitReached', { reason: '256 open PAM sessions' }],
      ['io.agentbroker.admin.PolicyRejected', { reason: '1 error', findings: [finding] }],
      ['io.agentbroker.admin.NoSuchSession', { reason: 'no session with this id' }],
      ['io.agentbroker.admin.NoSuchAgent', { reason: 'no agent with this id' }],
    ]) {
      const short = name.slice(name.lastIndexOf('.') + 1);
      const e = await c.call('io.agentbroker.admin.X').then(() => null, (x) => x);
      assert.ok(typeof ab[short] === 'function', `${short} is exported`);
      assert.equal(e.constructor, ab[short], name);
      assert.ok(e instanceof ab.BrokerError);
      assert.equal(e.name, short);
      assert.equal(e.error, name);
      assert.equal(e.reason, params.reason);
      assert.match(e.message, new RegExp(params.reason));
    }
    [name, params] = ['io.agentbroker.admin.PolicyRejected', { reason: '1 error', findings: [finding] }];
    await assert.rejects(c.call('io.agentbroker.admin.ReloadPolicy'),
      (e) => e instanceof ab.PolicyRejected && JSON.stringify(e.findings) === JSON.stringify([finding]));
    params = { reason: 'no findings given' };
    await assert.rejects(c.call('io.agentbroker.admin.ReloadPolicy'),
      (e) => e instanceof ab.PolicyRejected && Array.isArray(e.findings) && e.findings.length === 0);
  });

  test('other interfaces', async (t) => {
    let name;
    const fb = await fakeBroker(t, () => err(name, { method: 'x' }));
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    for (const [n, cls] of [
      ['org.varlink.service.MethodNotFound', ab.MethodNotFound],
      ['org.varlink.service.InvalidParameter', ab.InvalidParameter],
      ['io.agentbroker.admin.PermissionDenied', ab.PermissionDenied],
      ['io.agentbroker.admin.SomethingNew', ab.BrokerError],
      ['io.agentbroker.SomethingNew', ab.BrokerError],
      ['io.agentbroker.toString', ab.BrokerError],
      ['com.example.NotAnAgent', ab.BrokerError],
    ]) {
      name = n;
      const e = await c.call('x.Y').then(() => null, (x) => x);
      assert.equal(e.constructor, cls, n);
      assert.equal(e.error, n);
      assert.equal(e.reason, undefined);
    }
  });

  test('no socket: BrokerUnavailable', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ab-none-'));
    try {
      await assert.rejects(ab.connect(path.join(dir, 'none')), (e) => e instanceof ab.BrokerUnavailable &&
        e.message.includes('none') && e.path === path.join(dir, 'none'));
      await assert.rejects(new ab.Client({ path: path.join(dir, 'none') }).whoami(), ab.BrokerUnavailable);
    } finally {
      fs.rmSync(dir, { recursive: true });
    }
  });

  test('malformed replies', async (t) => {
    let out;
    const fb = await fakeBroker(t, () => out);
    const c = new ab.Client({ path: fb.path });
    t.after(() => c.close());
    for (out of ['not json', '[1,2]', '{"parameters": 5}', '{"error": 7}', Buffer.from([0xff, 0xfe, 0]),
      '{"parameters": {"token": 1}}', 'null']) {
      await assert.rejects(c.issue('a', ['s']), ab.ProtocolError, String(out));
    }
  });

  test('a reply over 64 KiB is refused, one of 64 KiB is not', async (t) => {
    const head = '{"parameters":{"x":"';
    const tail = '"}}';
    let size;
    const fb = await fakeBroker(t, () => head + 'a'.repeat(size - head.length - tail.length) + tail);
    const c = new ab.Client({ path: fb.path });
    t.after(() => c.close());
    size = ab.MAX_MESSAGE;
    assert.equal((await c.whoami()).x.length, ab.MAX_MESSAGE - head.length - tail.length);
    size = ab.MAX_MESSAGE + 1;
    await assert.rejects(c.whoami(), ab.ProtocolError);
    size = ab.MAX_MESSAGE;
    assert.ok(await c.whoami(), 'the next call reconnects');
  });

  test('a request over 64 KiB is refused locally', async (t) => {
    const fb = await fakeBroker(t, () => ({ parameters: {} }));
    const c = new ab.Client({ path: fb.path });
    await assert.rejects(c.introspect('x'.repeat(ab.MAX_MESSAGE)), ab.MessageTooLarge);
    assert.equal(fb.requests.length, 0);
  });

  test('half a reply and then EOF', async (t) => {
    const fb = await fakeBroker(t, () => ({ close: Buffer.from('{"parameters":') }));
    const c = new ab.Client({ path: fb.path });
    t.after(() => c.close());
    await assert.rejects(c.whoami(), (e) => e instanceof ab.ProtocolError && /middle/.test(e.message));
  });

  test('a refusal is read even when the write fails', async (t) => {
    // A broker at its connection limit (or the admin socket refusing a uid) writes its error and
    // closes without reading: the write fails (EPIPE), and the error is still the answer.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ab-fake-'));
    const sockPath = path.join(dir, 'sock');
    const refusal = `${JSON.stringify(err('io.agentbroker.TooManyConnections', { reason: 'too many connections from this uid' }))}\0`;
    let n = 0;
    let refuseAll = false;
    let firstClosed;
    const closed = new Promise((r) => { firstClosed = r; });
    const server = net.createServer((s) => {
      s.on('error', () => {});
      if (++n === 1 || refuseAll) {
        s.end(refusal, () => s.destroy());
        s.on('close', firstClosed);
        return;
      }
      s.once('data', () => s.end('{"parameters":{"ok":true}}\0')); // a later connection is answered
    });
    await new Promise((r) => server.listen(sockPath, r));
    t.after(async () => {
      await new Promise((r) => server.close(r));
      fs.rmSync(dir, { recursive: true, force: true });
    });
    const c = await ab.connect(sockPath);
    t.after(() => c.close());
    await closed;
    await new Promise((r) => setTimeout(r, 50));
    await assert.rejects(c.whoami(), (e) => e instanceof ab.TooManyConnections && /too many/.test(e.reason));
    refuseAll = true;
    for (let i = 0; i < 5; i++) {
      const c2 = new ab.Client({ path: sockPath });
      await assert.rejects(c2.whoami(), ab.TooManyConnections);
      c2.close();
    }
  });

  test('timeout', async (t) => {
    const fb = await fakeBroker(t, () => ({ delay: 1000, then: { parameters: {} } }));
    const c = new ab.Client({ path: fb.path, timeout: 200 });
    t.after(() => c.close());
    const t0 = Date.now();
    await assert.rejects(c.whoami(), (e) => e instanceof ab.BrokerUnavailable && /no reply/.test(e.message));
    assert.ok(Date.now() - t0 < 900);
  });

  test('a connection closed while idle is reopened once', async (t) => {
    const handler = (req, i) => ({ parameters: { conn: i } });
    const fb = await fakeBroker(t, handler);
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    assert.deepEqual(await c.whoami(), { conn: 1 });
    fb.handler = (req, i) => (i === 1 ? null : handler(req, i));
    assert.deepEqual(await c.whoami(), { conn: 2 });
    fb.handler = () => null; // a fresh connection closed at once is an error, not a loop
    c.close();
    await assert.rejects(c.whoami(), ab.BrokerUnavailable);
  });
});

describe('re-authentication', () => {
  test('ReauthRequired: authenticate once, retry', async (t) => {
    let authed = false;
    const fb = await fakeBroker(t, (req) => {
      if (req.method.endsWith('Authenticate')) {
        authed = true;
        return { parameters: { sid: 's'.repeat(22) } };
      }
      return authed ? tokenReply() : err('io.agentbroker.ReauthRequired', { reason: 'call Authenticate', sid: 'x' });
    });
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    assert.equal((await c.issue('aud', ['a'])).jti, 'j1');
    assert.deepEqual(fb.requests.map((r) => r.method.split('.').pop()), ['IssueToken', 'Authenticate', 'IssueToken']);
  });

  test('only once', async (t) => {
    const fb = await fakeBroker(t, (req) => (req.method.endsWith('Authenticate')
      ? { parameters: {} } : err('io.agentbroker.ReauthRequired', { reason: 'again', sid: 'x' })));
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    await assert.rejects(c.issue('aud', ['a']), (e) => e instanceof ab.ReauthRequired && e.parameters.sid === 'x');
    assert.equal(fb.requests.length, 3);
  });

  test('SessionExpired opens a new session', async (t) => {
    let n = 0;
    const fb = await fakeBroker(t, (req) => {
      n++;
      if (n === 1) return err('io.agentbroker.SessionExpired', { reason: 'max_lifetime', sid: 'old' });
      return req.method.endsWith('Authenticate') ? { parameters: {} } : tokenReply({ jti: 'after' });
    });
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    assert.equal((await c.attenuate('parent', { scopes: ['a'] })).jti, 'after');
  });

  test('revocation and denials are not retried', async (t) => {
    let name;
    const fb = await fakeBroker(t, () => err(name, { reason: 'no', sid: 'x' }));
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    for (const [n, cls] of [['SessionRevoked', ab.SessionRevoked], ['ScopeNotGranted', ab.ScopeNotGranted],
      ['RateLimited', ab.RateLimited]]) {
      name = `io.agentbroker.${n}`;
      fb.requests.length = 0;
      await assert.rejects(c.issue('aud', ['a']), cls);
      assert.equal(fb.requests.length, 1);
    }
  });
});

describe('token cache', () => {
  async function setup(t) {
    const st = { now: Date.now() / 1000, n: 0 };
    st.fb = await fakeBroker(t, (req) => {
      st.n++;
      const p = req.parameters ?? {};
      return tokenReply({ jti: `t${st.n}`, expiresIn: p.ttl ?? 300, scope: (p.scopes ?? []).join(' '), now: st.now });
    });
    st.c = await ab.connect(st.fb.path, { clock: () => st.now });
    t.after(() => st.c.close());
    return st;
  }

  test('reused until 2/3 of its lifetime', async (t) => {
    const st = await setup(t);
    const t1 = await st.c.token('aud', ['b', 'a'], { ttl: 300 });
    assert.equal(t1, 'h.p.t1');
    st.now += 199;
    assert.equal(await st.c.token('aud', ['a', 'b', 'a'], { ttl: 300 }), t1, 'sorted, deduplicated scopes');
    st.now += 1.5;
    assert.equal(await st.c.token('aud', ['a', 'b'], { ttl: 300 }), 'h.p.t2');
    assert.equal(st.n, 2);
  });

  test('keyed by audience and scopes', async (t) => {
    const st = await setup(t);
    const a = await st.c.token('aud', ['a']);
    const b = await st.c.token('aud', ['a', 'b']);
    const d = await st.c.token('other', ['a']);
    assert.equal(new Set([a, b, d]).size, 3);
    assert.equal(await st.c.token('aud', 'a'), a);
  });

  test('keyed by ttl and task too: reused only for the same request', async (t) => {
    const st = await setup(t);
    const c = st.c;
    const params = () => st.fb.requests.at(-1).parameters;
    const t30 = await c.cachedToken('aud', ['a'], { ttl: 30 });
    const t300 = await c.cachedToken('aud', ['a'], { ttl: 300 });
    assert.notEqual(t300.jti, t30.jti, 'a 30 s token is not what ttl 300 asked for');
    assert.equal(t300.expiresIn, 300);
    assert.equal(params().ttl, 300);
    assert.equal((await c.cachedToken('aud', ['a'], { ttl: 30 })).jti, t30.jti);
    assert.equal((await c.cachedToken('aud', ['a'], { ttl: 300 })).jti, t300.jti);
    const d = await c.cachedToken('aud', ['a']);
    assert.ok(![t30.jti, t300.jti].includes(d.jti), "no ttl (the policy's default) is a request of its own");
    assert.equal(params().ttl, undefined);
    assert.equal((await c.cachedToken('aud', ['a'], { ttl: null })).jti, d.jti, 'null and undefined both send no ttl');
    const n = st.n;
    const x = await c.cachedToken('aud', ['a'], { ttl: 30, task: 'triage #1' });
    assert.equal(params().task, 'triage #1');
    const y = await c.cachedToken('aud', ['a'], { ttl: 30, task: 'triage #2' });
    assert.equal(params().task, 'triage #2');
    assert.equal(new Set([x.jti, y.jti, t30.jti]).size, 3, 'a task label is not reused for another task');
    assert.equal((await c.cachedToken('aud', ['a'], { ttl: 30, task: 'triage #1' })).jti, x.jti);
    assert.equal(await c.token('aud', ['a'], { ttl: 30, task: 'triage #2' }), y.token);
    assert.equal(st.n, n + 2);
    // concurrent callers share a request only when they ask for the same token
    const [p, q] = await Promise.all([c.cachedToken('b', ['a'], { ttl: 30 }), c.cachedToken('b', ['a'], { ttl: 60 })]);
    assert.deepEqual([p.expiresIn, q.expiresIn], [30, 60]);
    // invalidate(audience, scopes) drops them whatever their ttl and task
    c.invalidate('aud', ['a']);
    assert.notEqual((await c.cachedToken('aud', ['a'], { ttl: 30, task: 'triage #1' })).jti, x.jti);
    assert.notEqual((await c.cachedToken('aud', ['a'], { ttl: 300 })).jti, t300.jti);
    assert.equal((await c.cachedToken('b', ['a'], { ttl: 30 })).jti, p.jti, 'another audience stays');
  });

  test('concurrent callers share one request', async (t) => {
    const st = await setup(t);
    const all = await Promise.all(Array.from({ length: 10 }, () => st.c.token('aud', ['a'])));
    assert.equal(new Set(all).size, 1);
    assert.equal(st.n, 1);
  });

  test('invalidate and revoke forget', async (t) => {
    const st = await setup(t);
    const c = st.c;
    const t1 = await c.cachedToken('aud', ['a']);
    c.invalidate('aud', ['a']);
    const t2 = await c.cachedToken('aud', ['a']);
    assert.notEqual(t1.jti, t2.jti);
    await c.revoke({ jti: t2.jti });
    const t3 = await c.cachedToken('aud', ['a']);
    assert.notEqual(t3.jti, t2.jti);
    await c.cachedToken('x', ['a']);
    c.invalidate('aud');
    assert.notEqual((await c.cachedToken('aud', ['a'])).jti, t3.jti);
    const n = st.n;
    c.invalidate();
    await c.token('x', ['a']);
    assert.equal(st.n, n + 1);
  });

  test('short tokens', async (t) => {
    const st = await setup(t);
    const t1 = await st.c.token('aud', ['a'], { ttl: 3 });
    st.now += 1.9;
    assert.equal(await st.c.token('aud', ['a'], { ttl: 3 }), t1);
    st.now += 0.2;
    assert.notEqual(await st.c.token('aud', ['a'], { ttl: 3 }), t1);
  });

  test('a failed issue is not cached', async (t) => {
    let fail = true;
    const fb = await fakeBroker(t, () => (fail ? err('io.agentbroker.RateLimited', { reason: 'slow down' }) : tokenReply()));
    const c = await ab.connect(fb.path);
    t.after(() => c.close());
    await assert.rejects(c.token('aud', ['a']), ab.RateLimited);
    fail = false;
    assert.equal(await c.token('aud', ['a']), 'h.p.j1');
  });

  test('refreshFraction must be in (0, 1]', () => {
    assert.throws(() => new ab.Client({ refreshFraction: 0 }), RangeError);
    assert.throws(() => new ab.Client({ refreshFraction: 1.5 }), RangeError);
  });
});
