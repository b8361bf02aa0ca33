#!/usr/bin/env node
// SPDX-License-Identifier: MIT
// An agent that calls the notes MCP server with a token from agent-broker.
//
//   node agent.js [--url http://127.0.0.1:8787/mcp] [--resource ID] [--note TEXT]
//
// 1. Learn the server's resource id and scopes from its Protected Resource
//    Metadata (RFC 9728), unless --resource is given.
// 2. Ask the local broker ($AGENT_BROKER_SOCKET or the default socket) for a
//    token naming exactly that audience and only the scopes this run needs:
//    notes:read, plus notes:write with --note. The broker decides from the
//    kernel's view of this process whether it may have them.
// 3. Talk MCP over Streamable HTTP with the official SDK; every HTTP request
//    carries "Authorization: Bearer <token>" from the client's token cache,
//    which renews the token after 2/3 of its lifetime.
import './webcrypto.js';
import { parseArgs } from 'node:util';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { connect as connectBroker } from 'agentbroker';

const { values } = parseArgs({
  options: {
    url: { type: 'string', default: process.env.MCP_URL || 'http://127.0.0.1:8787/mcp' },
    resource: { type: 'string' },
    note: { type: 'string' },
  },
});

async function discoverResource(url) {
  const res = await fetch(new URL('/.well-known/oauth-protected-resource', url));
  if (!res.ok) throw new Error(`no protected resource metadata at ${url} (HTTP ${res.status})`);
  const meta = await res.json();
  if (typeof meta.resource !== 'string') throw new Error('the protected resource metadata names no resource');
  return meta.resource;
}

async function main() {
  const url = new URL(values.url);
  const resource = values.resource ?? (await discoverResource(url));
  const scopes = values.note ? ['notes:read', 'notes:write'] : ['notes:read'];

  const broker = await connectBroker();
  const who = await broker.whoami();
  console.log(`agent ${who.agent} (owner ${who.owner}) asks for ${resource} [${scopes.join(' ')}]`);

  const authorizedFetch = async (input, init = {}) => {
    const headers = new Headers(init.headers);
    headers.set('authorization', `Bearer ${await broker.token(resource, scopes)}`);
    return fetch(input, { ...init, headers });
  };
  const mcp = new Client({ name: 'agent-broker-example-agent', version: '0.1.0' });
  const transport = new StreamableHTTPClientTransport(url, { fetch: authorizedFetch });
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

main().catch((e) => {
  console.error(`agent: ${e.name}: ${e.message}`);
  process.exit(1);
});
