// SPDX-License-Identifier: MIT
// End to end: a real agent-brokerd, the notes MCP server (server.js) and the
// agent example (agent.js), each a process of its own.
//
// tests/integration/test-clients.c runs this after `npm ci` with:
//   AGENT_BROKER_SOCKET, AGENT_BROKER_ADMIN_SOCKET  the broker's sockets
//   MCP_RESOURCE   the audience the policy grants (mcp://notes.test)
//   AB_TEST_AGENT  the agent entry node processes match (node-client)
// The policy grants that agent MCP_RESOURCE with notes:read and notes:write,
// and https://other.test with other:read.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import '../webcrypto.js';
import { Client as McpClient } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { connect } from 'agentbroker';
// test-clients runs this file alone: it brings the broker-less tests of auth.js and agent.js along
import './unit.test.js';

const SOCK = process.env.AGENT_BROKER_SOCKET;
const ADMIN = process.env.AGENT_BROKER_ADMIN_SOCKET;
const RESOURCE = process.env.MCP_RESOURCE || 'mcp://notes.test';
const AGENT = process.env.AB_TEST_AGENT || 'node-client';
const OTHER = 'https://other.test';
const DIR = fileURLToPath(new URL('..', import.meta.url));
const skip = SOCK && ADMIN ? false : 'AGENT_BROKER_SOCKET and AGENT_BROKER_ADMIN_SOCKET must name a running broker';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const claimsOf = (jwt) => JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString());

/** Run a node script of this example; resolve {code, stdout, stderr}. */
function run(script, args, env = {}) {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [path.join(DIR, script), ...args], {
      env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    const timer = setTimeout(() => p.kill('SIGKILL'), 30000);
    p.stdout.on('data', (d) => { stdout += d; });
    p.stderr.on('data', (d) => { stderr += d; });
    p.on('error', reject);
    p.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? signal, stdout, stderr });
    });
  });
}

/** Start server.js with args; resolve {url, origin, proc, log()} once it listens. */
function startServer(args, env = {}) {
  return new Promise((resolve, reject) => {
    const proc = spawn(process.execPath, [path.join(DIR, 'server.js'), '--port', '0', '--resource', RESOURCE, ...args], {
      env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let errText = '';
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`server did not start: ${errText}`));
    }, 15000);
    proc.stderr.on('data', (d) => { errText += d; });
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /listening on (http:\/\/\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        const url = m[1];
        resolve({ url, origin: new URL(url).origin, proc, log: () => errText });
      }
    });
    proc.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited ${code}: ${errText}`));
    });
  });
}

function stopServer(s) {
  if (!s || s.proc.exitCode !== null) return Promise.resolve();
  return new Promise((r) => {
    s.proc.once('exit', r);
    s.proc.kill('SIGTERM');
  });
}

let rpcId = 0;
/** POST one JSON-RPC message to the MCP endpoint: {status, www, json}. */
async function rpc(url, token, method, params = {}) {
  const headers = { 'content-type': 'application/json', accept: 'application/json, text/event-stream' };
  if (token !== undefined) headers.authorization = `Bearer ${token}`;
  const res = await fetch(url, {
    method: 'POST', headers, body: JSON.stringify({ jsonrpc: '2.0', id: ++rpcId, method, params }),
  });
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = text;
  }
  return { status: res.status, www: res.headers.get('www-authenticate'), json };
}
const callTool = (url, token, name, args = {}) => rpc(url, token, 'tools/call', { name, arguments: args });

/** The auth-params of a Bearer challenge. */
function challenge(www) {
  assert.ok(www, 'a WWW-Authenticate header');
  assert.match(www, /^Bearer /);
  const params = {};
  for (const m of www.slice(7).matchAll(/([a-z_]+)="([^"]*)"/g)) params[m[1]] = m[2];
  return params;
}

function assertRefused(r, status, error, descriptionPattern) {
  assert.equal(r.status, status, JSON.stringify(r.json));
  const c = challenge(r.www);
  assert.equal(c.error, error);
  assert.equal(c.realm, RESOURCE);
  assert.match(c.resource_metadata, /\/\.well-known\/oauth-protected-resource$/);
  if (descriptionPattern) assert.match(c.error_description, descriptionPattern);
  return c;
}

describe('MCP server with broker tokens', { skip }, () => {
  let broker;
  let admin;
  let online; // keys and revocation from the broker socket
  let offline; // keys from a JWKS file only
  let closedBroker; // JWKS file, and a broker socket where nobody answers
  let tmp;
  let jwks; // the offline servers' key file

  before(async () => {
    broker = await connect();
    admin = await connect(ADMIN);
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ab-mcp-e2e-'));
    jwks = path.join(tmp, 'jwks.json');
    fs.writeFileSync(jwks, JSON.stringify(await broker.getKeys()));
    [online, offline, closedBroker] = await Promise.all([
      startServer([]),
      startServer(['--jwks', jwks], { AGENT_BROKER_SOCKET: '' }),
      startServer(['--jwks', jwks, '--broker-socket', path.join(tmp, 'nobody-here.sock')]),
    ]);
  });

  after(async () => {
    await Promise.all([stopServer(online), stopServer(offline), stopServer(closedBroker)]);
    broker?.close();
    admin?.close();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  test('the agent example gets a token and calls the tools', async () => {
    const note = `hello from the e2e test ${process.pid}`;
    // the server's resource id is not its URL, so the agent is told which one to expect
    const r = await run('agent.js', ['--url', online.url, '--resource', RESOURCE, '--note', note]);
    assert.equal(r.code, 0, r.stderr + online.log());
    assert.match(r.stdout, new RegExp(`agent ${AGENT} .* asks for ${RESOURCE.replace(/[.]/g, '\\.')} \\[notes:read notes:write\\]`));
    assert.match(r.stdout, /tools: add_note, list_notes/);
    assert.match(r.stdout, /add_note: added note #\d+/);
    assert.ok(r.stdout.includes(`${note} (by ${AGENT})`), r.stdout);
    // read only: it asks for notes:read alone, and listing works with it
    const r2 = await run('agent.js', ['--url', online.url, '--resource', RESOURCE]);
    assert.equal(r2.code, 0, r2.stderr);
    assert.match(r2.stdout, /\[notes:read\]/);
    assert.ok(r2.stdout.includes(note));
  });

  test('the agent asks for no token when the metadata names another resource than expected', async () => {
    // RFC 9728 §3.3: without --resource the metadata must name the URL used; here it names mcp://notes.test
    const r = await run('agent.js', ['--url', online.url]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /says it is "mcp:\/\/notes\.test", not "http:\/\/127\.0\.0\.1:\d+\/mcp"/);
    assert.doesNotMatch(r.stdout, /asks for/);
    const r2 = await run('agent.js', ['--url', online.url, '--resource', OTHER]);
    assert.equal(r2.code, 1);
    assert.match(r2.stderr, /--resource/);
    assert.doesNotMatch(r2.stdout, /asks for/);
  });

  test('an allowed tool call succeeds (SDK client and plain HTTP)', async () => {
    const tok = await broker.issue(RESOURCE, ['notes:read', 'notes:write'], { ttl: 60 });
    const mcp = new McpClient({ name: 'e2e', version: '0' });
    await mcp.connect(new StreamableHTTPClientTransport(new URL(online.url), {
      requestInit: { headers: { authorization: `Bearer ${tok.token}` } },
    }));
    try {
      const added = await mcp.callTool({ name: 'add_note', arguments: { text: 'via the SDK' } });
      assert.ok(!added.isError, JSON.stringify(added));
      const listed = await mcp.callTool({ name: 'list_notes', arguments: {} });
      assert.match(listed.content[0].text, /via the SDK \(by node-client\)/);
    } finally {
      await mcp.close();
    }
    const r = await callTool(online.url, tok.token, 'list_notes');
    assert.equal(r.status, 200);
    assert.match(r.json.result.content[0].text, /via the SDK/);
    assert.equal(r.www, null);
  });

  test('no token: 401 with a challenge naming the resource metadata', async () => {
    const r = await callTool(online.url, undefined, 'list_notes');
    assert.equal(r.status, 401);
    const c = challenge(r.www);
    assert.equal(c.error, undefined, 'no error code without credentials (RFC 6750 §3.1)');
    assert.equal(c.resource_metadata, `${online.origin}/.well-known/oauth-protected-resource`);
    const meta = await (await fetch(c.resource_metadata)).json();
    assert.equal(meta.resource, RESOURCE);
    assert.deepEqual(meta.scopes_supported.sort(), ['notes:read', 'notes:write']);
    assert.deepEqual(meta.bearer_methods_supported, ['header']);
  });

  test('garbage and forged tokens: 401 invalid_token', async () => {
    assertRefused(await callTool(online.url, 'abc.def.ghi', 'list_notes'), 401, 'invalid_token', /malformed/);
    const tok = await broker.issue(RESOURCE, ['notes:read'], { ttl: 60 });
    const [h, , s] = tok.token.split('.');
    const claims = claimsOf(tok.token);
    const forged = `${h}.${Buffer.from(JSON.stringify({ ...claims, scope: 'notes:read notes:write' })).toString('base64url')}.${s}`;
    assertRefused(await callTool(online.url, forged, 'add_note', { text: 'x' }), 401, 'invalid_token', /signature/);
    assertRefused(await callTool(offline.url, forged, 'add_note', { text: 'x' }), 401, 'invalid_token', /signature/);
  });

  test('a token for another audience: 401 invalid_token', async () => {
    const tok = await broker.issue(OTHER, ['other:read'], { ttl: 60 });
    for (const s of [online, offline]) {
      assertRefused(await callTool(s.url, tok.token, 'list_notes'), 401, 'invalid_token', /another audience/);
      assertRefused(await rpc(s.url, tok.token, 'tools/list'), 401, 'invalid_token', /another audience/);
    }
  });

  test('a token without the tool\'s scope: 403 insufficient_scope', async () => {
    const tok = await broker.issue(RESOURCE, ['notes:read'], { ttl: 60 });
    for (const s of [online, offline]) {
      const c = assertRefused(await callTool(s.url, tok.token, 'add_note', { text: 'not allowed' }), 403,
        'insufficient_scope', /notes:write/);
      assert.equal(c.scope, 'notes:write');
      assert.equal((await callTool(s.url, tok.token, 'list_notes')).status, 200, 'the scope it has still works');
    }
    // the SDK client sees the refusal as an error too
    const mcp = new McpClient({ name: 'e2e', version: '0' });
    await mcp.connect(new StreamableHTTPClientTransport(new URL(online.url), {
      requestInit: { headers: { authorization: `Bearer ${tok.token}` } },
    }));
    try {
      await assert.rejects(mcp.callTool({ name: 'add_note', arguments: { text: 'nope' } }), /insufficient_scope/);
    } finally {
      await mcp.close();
    }
    const listed = await callTool(online.url, tok.token, 'list_notes');
    assert.ok(!listed.json.result.content[0].text.includes('nope'));
  });

  test('an expired token: 401 invalid_token', async () => {
    const tok = await broker.issue(RESOURCE, ['notes:read'], { ttl: 2 });
    assert.equal((await callTool(online.url, tok.token, 'list_notes')).status, 200, 'valid at first');
    while (Date.now() / 1000 < tok.expiresAt + 0.05) await sleep(100);
    for (const s of [online, offline]) {
      assertRefused(await callTool(s.url, tok.token, 'list_notes'), 401, 'invalid_token', /expired/);
    }
  });

  test('a revoked token: 401 invalid_token where the server asks the broker', async () => {
    const tok = await broker.issue(RESOURCE, ['notes:read'], { ttl: 300 });
    assert.equal((await callTool(online.url, tok.token, 'list_notes')).status, 200, 'valid before');
    const r = await admin.call('io.agentbroker.admin.Revoke', { jti: tok.jti });
    assert.ok(r.revoked >= 1);
    assertRefused(await callTool(online.url, tok.token, 'list_notes'), 401, 'invalid_token', /revoked/);
    assertRefused(await rpc(online.url, tok.token, 'tools/list'), 401, 'invalid_token', /revoked/);
    // The documented limit of offline verification: it cannot see a revocation before exp.
    assert.equal((await callTool(offline.url, tok.token, 'list_notes')).status, 200);
  });

  test('a revoked session ends its tokens at the server', async () => {
    const tok = await broker.issue(RESOURCE, ['notes:read'], { ttl: 300 });
    // an agent's own revocation through its client works the same way
    const child = await broker.attenuate(tok, { ttl: 60 });
    assert.equal((await callTool(online.url, child.token, 'list_notes')).status, 200);
    await broker.revoke({ jti: tok.jti });
    assertRefused(await callTool(online.url, child.token, 'list_notes'), 401, 'invalid_token', /revoked/);
  });

  test('broker unreachable: the server fails closed (503)', async () => {
    const tok = await broker.issue(RESOURCE, ['notes:read'], { ttl: 60 });
    const r = await callTool(closedBroker.url, tok.token, 'list_notes');
    assert.equal(r.status, 503);
    assert.equal(r.json.error, 'temporarily_unavailable');
    assert.equal(r.www, null);
  });

  test('a foreign Host header is refused (DNS rebinding)', async () => {
    const tok = await broker.issue(RESOURCE, ['notes:read'], { ttl: 60 });
    const status = await new Promise((resolve, reject) => {
      const req = http.request(online.url, {
        method: 'POST', headers: { host: 'evil.example', authorization: `Bearer ${tok.token}`, 'content-type': 'application/json' },
      }, (res) => {
        res.resume();
        resolve(res.statusCode);
      });
      req.on('error', reject);
      req.end('{}');
    });
    assert.equal(status, 403);
  });

  test('request limits: body over 1 MiB 413, not JSON 400, GET 405', async () => {
    const tok = await broker.issue(RESOURCE, ['notes:read'], { ttl: 60 });
    const headers = { authorization: `Bearer ${tok.token}`, 'content-type': 'application/json',
      accept: 'application/json, text/event-stream' };
    const big = await fetch(online.url, { method: 'POST', headers, body: `"${'x'.repeat(1024 * 1024)}"` });
    assert.equal(big.status, 413);
    const bad = await fetch(online.url, { method: 'POST', headers, body: '{"jsonrpc": ' });
    assert.equal(bad.status, 400);
    assert.equal((await bad.json()).error.code, -32700);
    const get = await fetch(online.url, { headers });
    assert.equal(get.status, 405);
    assert.equal(get.headers.get('allow'), 'POST');
    assert.equal((await fetch(online.url, { headers: { accept: headers.accept } })).status, 401, 'no token first');
  });

  // Last of the tests that use tokens: it retires the key the others were signed with.
  test('a key retired at once (rotate --overlap 0 --force) stops verifying once republished', async () => {
    const old = await broker.issue(RESOURCE, ['notes:read'], { ttl: 300 });
    assert.equal((await callTool(offline.url, old.token, 'list_notes')).status, 200, 'valid before');
    const r = await admin.call('io.agentbroker.admin.RotateKey', { overlap: 0, force: true });
    assert.equal(r.previous_kid, JSON.parse(Buffer.from(old.token.split('.')[0], 'base64url')).kid);
    // republish as `agent-brokerctl keys --jwks --out` does: a new file renamed over the old
    fs.writeFileSync(`${jwks}.new`, JSON.stringify(await broker.getKeys()));
    fs.renameSync(`${jwks}.new`, jwks);
    let status;
    for (let i = 0; i < 50 && status !== 401; i++) {
      await sleep(100);
      status = (await callTool(offline.url, old.token, 'list_notes')).status;
    }
    assertRefused(await callTool(offline.url, old.token, 'list_notes'), 401, 'invalid_token', /key this server does not know/);
    assertRefused(await callTool(online.url, old.token, 'list_notes'), 401, 'invalid_token');
    const fresh = await broker.issue(RESOURCE, ['notes:read'], { ttl: 60 });
    assert.equal((await callTool(offline.url, fresh.token, 'list_notes')).status, 200, 'the new key verifies');
  });

  test('the server never logs a token', async () => {
    await sleep(100);
    for (const s of [online, offline, closedBroker]) assert.doesNotMatch(s.log(), /eyJ[A-Za-z0-9_-]{10,}\./);
  });
});
