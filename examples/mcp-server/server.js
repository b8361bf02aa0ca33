#!/usr/bin/env node
// SPDX-License-Identifier: MIT
// A small MCP server ("notes") that accepts agent-broker tokens as an OAuth
// 2.0 resource server would. Streamable HTTP on 127.0.0.1, stateless (one
// MCP server object per request), two tools with one scope each.
//
//   node server.js [--port 8787] [--resource mcp://notes.example]
//                  [--jwks FILE] [--broker-socket PATH] [--no-introspect] [--issuer ISS ...]
//
// Keys: --jwks FILE (what `agent-brokerctl keys --jwks` prints), else the
// broker's GetKeys over --broker-socket ($AGENT_BROKER_SOCKET, else the
// default socket). Revocation: with a broker socket every request is also
// introspected there; with only --jwks the server is offline and cannot see
// revocations (tokens still end at exp). See README.md.
import './webcrypto.js';
import fs from 'node:fs';
import http from 'node:http';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { z } from 'zod';
import { Client as BrokerClient, DEFAULT_SOCKET } from 'agentbroker';
import { AuthError, TokenVerifier, bearerToken, wwwAuthenticate } from './auth.js';

const MAX_BODY = 1024 * 1024;
const MAX_NOTES = 1000;
const MAX_NOTE_CHARS = 1000;

// ---- the tools: name, the scope a call needs, the MCP definition ----------------

const notes = [];

const TOOLS = {
  list_notes: {
    scope: 'notes:read',
    config: {
      title: 'List notes',
      description: 'All notes, oldest first, with who wrote them.',
      inputSchema: {},
      annotations: { readOnlyHint: true },
    },
    handler: async () => ({
      content: [{ type: 'text', text: notes.length ? notes.map((n) => `#${n.id} ${n.text} (by ${n.by})`).join('\n') : '(no notes)' }],
      structuredContent: { notes: notes.map((n) => ({ ...n })) },
    }),
  },
  add_note: {
    scope: 'notes:write',
    config: {
      title: 'Add a note',
      description: 'Store a short note; the token\'s subject (the agent) is recorded as its author.',
      inputSchema: { text: z.string().min(1).max(MAX_NOTE_CHARS) },
    },
    handler: async ({ text }, extra) => {
      if (notes.length >= MAX_NOTES) return { isError: true, content: [{ type: 'text', text: 'too many notes' }] };
      const note = { id: notes.length + 1, text, by: String(extra.authInfo?.extra?.sub ?? 'unknown'), at: Date.now() };
      notes.push(note);
      return { content: [{ type: 'text', text: `added note #${note.id}` }], structuredContent: { id: note.id } };
    },
  },
};

function buildMcpServer() {
  const server = new McpServer({ name: 'agent-broker-notes', version: '0.1.0' });
  for (const [name, tool] of Object.entries(TOOLS)) {
    server.registerTool(name, tool.config, async (args, extra) => {
      // The HTTP layer checked the scope already; refusing here too costs nothing.
      if (!extra.authInfo?.scopes?.includes(tool.scope)) {
        return { isError: true, content: [{ type: 'text', text: `needs the scope ${tool.scope}` }] };
      }
      return tool.handler(args, extra);
    });
  }
  return server;
}

/** The scopes a JSON-RPC message (or batch) needs: one per tools/call of a known tool. */
export function requiredScopes(body) {
  const msgs = Array.isArray(body) ? body : [body];
  const out = new Set();
  for (const m of msgs) {
    if (m && m.method === 'tools/call' && typeof m.params?.name === 'string' && Object.hasOwn(TOOLS, m.params.name)) {
      out.add(TOOLS[m.params.name].scope);
    }
  }
  return [...out];
}

// ---- HTTP ------------------------------------------------------------------------

/** The methods of a JSON-RPC body for the log: untrusted text, so only a safe alphabet, bounded. */
function describe(body) {
  const safe = (v) => String(v ?? '?').replace(/[^\w./:-]/g, '?').slice(0, 64);
  const msgs = [].concat(body).slice(0, 8);
  return msgs.map((m) => (m?.method === 'tools/call' ? `tools/call ${safe(m.params?.name)}` : safe(m?.method))).join(',');
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    const onData = (d) => {
      size += d.length;
      if (size > MAX_BODY) {
        req.off('data', onData);
        req.resume(); // discard the rest; the reply closes the connection
        reject(Object.assign(new Error('request body too large'), { status: 413 }));
        return;
      }
      chunks.push(d);
    };
    req.on('data', onData);
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function sendJson(res, status, obj, headers = {}) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store', ...headers });
  res.end(JSON.stringify(obj));
}

export async function startServer({ port = 8787, resource, jwksFile, brokerSocket, introspect = true, issuer,
  log = (m) => process.stderr.write(`notes-mcp: ${m}\n`) }) {
  const broker = brokerSocket ? new BrokerClient({ path: brokerSocket }) : null;
  const verifier = new TokenVerifier({ resource, issuer, jwksFile, broker, introspect, service: 'mcp:notes', log });
  const nkeys = await verifier.loadKeys();
  let origin = '';
  let allowedHosts = new Set();

  const metadata = () => ({
    resource,
    resource_name: 'agent-broker notes example',
    ...(issuer ? { authorization_servers: [issuer].flat() } : {}),
    scopes_supported: [...new Set(Object.values(TOOLS).map((t) => t.scope))],
    bearer_methods_supported: ['header'],
    resource_signing_alg_values_supported: ['EdDSA'],
  });

  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, 'http://x');
    // Loopback only, and no DNS rebinding: the Host must be ours.
    if (!allowedHosts.has(req.headers.host)) return sendJson(res, 403, { error: 'forbidden host' });
    if (url.pathname === '/.well-known/oauth-protected-resource' ||
        url.pathname === '/.well-known/oauth-protected-resource/mcp') {
      return req.method === 'GET' ? sendJson(res, 200, metadata()) : sendJson(res, 405, { error: 'method not allowed' });
    }
    if (url.pathname !== '/mcp') return sendJson(res, 404, { error: 'not found' });

    const challenge = (error) => ({
      'www-authenticate': wwwAuthenticate({
        realm: resource, resourceMetadata: `${origin}/.well-known/oauth-protected-resource`, error,
      }),
    });
    const refuse = (e) => {
      log(`${req.method} /mcp refused: ${e.status} ${e.code ?? ''} ${e.message}`);
      if (e.status === 503) {
        return sendJson(res, 503, { error: 'temporarily_unavailable', error_description: e.message }, { 'retry-after': '2' });
      }
      return sendJson(res, e.status, { error: e.code ?? 'unauthorized', error_description: e.message }, challenge(e));
    };
    try {
      const token = bearerToken(req.headers.authorization);
      const claims = await verifier.authenticate(token);
      if (req.method !== 'POST') {
        // Stateless server: no standalone SSE stream (GET), no session to end (DELETE).
        return sendJson(res, 405, { error: 'method not allowed' }, { allow: 'POST' });
      }
      let body;
      try {
        body = JSON.parse(await readBody(req));
      } catch (e) {
        if (e.status) return sendJson(res, e.status, { error: e.message }, { connection: 'close' });
        return sendJson(res, 400, { jsonrpc: '2.0', error: { code: -32700, message: 'Parse error' }, id: null });
      }
      const scopes = requiredScopes(body);
      req.auth = await verifier.authorize(token, claims, scopes);
      log(`POST /mcp ${describe(body)} by ${claims.sub} (jti ${claims.jti})`);

      const mcp = buildMcpServer();
      const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
      res.on('close', () => {
        transport.close();
        mcp.close();
      });
      await mcp.connect(transport);
      await transport.handleRequest(req, res, body);
    } catch (e) {
      if (e instanceof AuthError) return refuse(e);
      log(`internal error: ${e?.stack ?? e}`);
      if (!res.headersSent) sendJson(res, 500, { error: 'internal error' });
      else res.end();
    }
  });

  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', resolve);
  });
  const actual = server.address().port;
  origin = `http://127.0.0.1:${actual}`;
  allowedHosts = new Set([`127.0.0.1:${actual}`, `localhost:${actual}`]);
  log(`${nkeys} key(s) from ${jwksFile ?? `the broker at ${brokerSocket}`}; ` +
      (verifier.introspect ? `revocation checked by introspection at ${brokerSocket}` : 'offline: revocation NOT checked'));
  return {
    url: `${origin}/mcp`,
    origin,
    close: () => new Promise((r) => {
      broker?.close();
      server.closeAllConnections?.();
      server.close(() => r());
    }),
  };
}

async function main() {
  const { values } = parseArgs({
    options: {
      port: { type: 'string', default: '8787' },
      resource: { type: 'string', default: process.env.MCP_RESOURCE || 'mcp://notes.example' },
      jwks: { type: 'string' },
      'broker-socket': { type: 'string' },
      'no-introspect': { type: 'boolean', default: false },
      issuer: { type: 'string', multiple: true },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write('usage: server.js [--port N] [--resource ID] [--jwks FILE] [--broker-socket PATH]\n' +
      '                 [--no-introspect] [--issuer ISS ...]\n');
    return;
  }
  // A broker socket when named, or from the environment, or by default when there is no JWKS file.
  const brokerSocket = values['broker-socket'] || process.env.AGENT_BROKER_SOCKET || (values.jwks ? undefined : DEFAULT_SOCKET);
  const port = Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new Error(`bad --port ${values.port}`);
  const srv = await startServer({
    port, resource: values.resource, jwksFile: values.jwks, brokerSocket, introspect: !values['no-introspect'],
    issuer: values.issuer?.length ? values.issuer : undefined,
  });
  process.stdout.write(`notes MCP server for ${values.resource} listening on ${srv.url}\n`);
  const stop = async () => {
    await srv.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

if (process.argv[1] && pathToFileURL(fs.realpathSync(process.argv[1])).href === import.meta.url) {
  main().catch((e) => {
    process.stderr.write(`notes-mcp: ${e.message}\n`);
    process.exit(1);
  });
}
