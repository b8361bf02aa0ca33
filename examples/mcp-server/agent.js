#!/usr/bin/env node
// SPDX-License-Identifier: MIT
// An agent that calls the notes MCP server with a token from agent-broker.
//
//   node agent.js [--url http://127.0.0.1:8787/mcp] [--resource ID] [--note TEXT]
//
// 1. Learn the server's resource id from its Protected Resource Metadata
//    (RFC 9728). The id must be the URL the agent uses (RFC 9728 §3.3), or
//    the one given with --resource: a server cannot make the agent ask the
//    broker for a token meant for another audience.
// 2. Ask the local broker ($AGENT_BROKER_SOCKET or the default socket) for a
//    token naming exactly that audience and only the scopes this run needs:
//    notes:read, plus notes:write with --note. The broker decides from the
//    kernel's view of this process whether it may have them.
// 3. Talk MCP over Streamable HTTP with the official SDK; every HTTP request
//    carries "Authorization: Bearer <token>" from the client's token cache,
//    which renews the token after 2/3 of its lifetime. A 401 drops the
//    cached token (revoked, or signed with a retired key) and the request
//    is tried once more with a new one.
import './webcrypto.js';
import fs from 'node:fs';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { connect as connectBroker } from 'agentbroker';

/**
 * The resource id to ask the broker for. The server's metadata
 * (/.well-known/oauth-protected-resource + the URL's path, RFC 9728 §3.1)
 * must name the URL itself, or, with pinned (--resource), that id; with a
 * pinned id, a server whose metadata cannot be had (no such document, an
 * error, no answer) is taken at that id: only metadata naming another
 * resource is refused.
 */
export async function discoverResource(url, { pinned, fetchImpl = fetch } = {}) {
  const u = new URL(url);
  u.hash = '';
  const expected = pinned ?? u.href;
  const metaUrl = new URL(`/.well-known/oauth-protected-resource${u.pathname === '/' ? '' : u.pathname}`, u);
  let meta;
  try {
    const res = await fetchImpl(metaUrl);
    if (!res.ok) throw new Error(`no protected resource metadata at ${metaUrl} (HTTP ${res.status})`);
    meta = await res.json();
  } catch (e) {
    if (pinned) return pinned; // no metadata to be had: taken at the pinned id
    throw e;
  }
  if (typeof meta?.resource !== 'string') throw new Error('the protected resource metadata names no resource');
  if (meta.resource !== expected) {
    throw new Error(`the server at ${u.href} says it is ${JSON.stringify(meta.resource)}, not ` +
      `${JSON.stringify(expected)}${pinned ? ' (--resource)' : ' (give --resource to name it)'}: no token asked for`);
  }
  return meta.resource;
}

/**
 * A fetch for the SDK's transport that adds the broker token for (resource,
 * scopes) from broker's cache. After a 401 the cached token is dropped
 * (docs/clients.md) and the request is sent once more with a new one.
 */
export function bearerFetch(broker, resource, scopes, fetchImpl = fetch) {
  const send = async (input, init) => {
    const headers = new Headers(init.headers);
    headers.set('authorization', `Bearer ${await broker.token(resource, scopes)}`);
    return fetchImpl(input, { ...init, headers });
  };
  return async (input, init = {}) => {
    const res = await send(input, init);
    if (res.status !== 401) return res;
    broker.invalidate(resource, scopes);
    if (init.body !== undefined && init.body !== null && typeof init.body !== 'string') return res; // not replayable
    await res.body?.cancel().catch(() => {});
    return send(input, init);
  };
}

async function main() {
  const { values } = parseArgs({
    options: {
      url: { type: 'string', default: process.env.MCP_URL || 'http://127.0.0.1:8787/mcp' },
      resource: { type: 'string' },
      note: { type: 'string' },
    },
  });
  const url = new URL(values.url);
  const resource = await discoverResource(url, { pinned: values.resource });
  const scopes = values.note ? ['notes:read', 'notes:write'] : ['notes:read'];

  const broker = await connectBroker();
  const who = await broker.whoami();
  console.log(`agent ${who.agent} (owner ${who.owner}) asks for ${resource} [${scopes.join(' ')}]`);

  const mcp = new Client({ name: 'agent-broker-example-agent', version: '0.1.0' });
  const transport = new StreamableHTTPClientTransport(url, { fetch: bearerFetch(broker, resource, scopes) });
  try {
    await mcp.connect(transport);
    const { tools } = await mcp.listTools();
    console.log(`tools: ${tools.map((t) => t.name).sort().join(', ')}`);
    if (values.note) {
      const added = await mcp.callTool({ name: 'add_note', arguments: { text: values.note } });
      if (added.isError) throw new Error(`add_note failed: ${added.content?.[0]?.text}`);
      console.log(`add_note: ${added.content[0].text}`);
    }
    const listed = await mcp.callTool({ name: 'list_notes', arguments: {} });
    if (listed.isError) throw new Error(`list_notes failed: ${listed.content?.[0]?.text}`);
    console.log(`list_notes:\n${listed.content[0].text}`);
  } finally {
    await mcp.close().catch(() => {});
    broker.close();
  }
}

if (process.argv[1] && pathToFileURL(fs.realpathSync(process.argv[1])).href === import.meta.url) {
  main().catch((e) => {
    console.error(`agent: ${e.name}: ${e.message}`);
    process.exit(1);
  });
}
