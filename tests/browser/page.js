// What a browser MCP client (vscode.dev, the MCP Inspector) does against the gateway, run inside
// a real page: the MCP TypeScript SDK's Streamable HTTP client, and plain fetch() for the probes
// the SDK has no call for. esbuild bundles this file for the page (run.mjs); every cross-origin
// rule that applies is the browser's own.
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import {
  extractWWWAuthenticateParams,
  discoverOAuthProtectedResourceMetadata,
} from '@modelcontextprotocol/sdk/client/auth.js';

const INITIALIZE = JSON.stringify({
  jsonrpc: '2.0',
  id: 1,
  method: 'initialize',
  params: {
    protocolVersion: '2025-06-18',
    capabilities: {},
    clientInfo: { name: 'browser-probe', version: '0' },
  },
});

/// An exception as data: the browser reports a refused CORS request as a TypeError, with nothing
/// about the answer (status, headers) visible to the page.
function failure(e) {
  return { error: `${e?.name ?? 'Error'}: ${e?.message ?? e}`, code: e?.code ?? null };
}

function newClient() {
  return new Client({ name: 'gateway-browser-test', version: '0.0.0' });
}

/// The SDK client without a token: connect() must fail with the gateway's 401 as the SDK read it
/// (a CORS failure would be a TypeError without a status). The SDK's own WWW-Authenticate parser
/// then reads the challenge from that 401 — possible only if the answer exposes the header — and
/// the SDK's RFC 9728 discovery follows resource_metadata to the protected resource document.
async function withoutToken(url) {
  let challenged = null;
  const recordingFetch = async (input, init) => {
    const res = await fetch(input, init);
    if (res.status === 401 && challenged === null) {
      challenged = res.clone();
    }
    return res;
  };
  const out = {};
  const client = newClient();
  try {
    await client.connect(new StreamableHTTPClientTransport(new URL(url), { fetch: recordingFetch }));
    out.connected = true;
  } catch (e) {
    out.connect = failure(e);
  }
  if (challenged) {
    out.status = challenged.status;
    out.wwwAuthenticate = challenged.headers.get('www-authenticate');
    const params = extractWWWAuthenticateParams(challenged);
    out.resourceMetadataUrl = params.resourceMetadataUrl?.href ?? null;
    out.scope = params.scope ?? null;
    if (params.resourceMetadataUrl) {
      try {
        const doc = await discoverOAuthProtectedResourceMetadata(url, {
          resourceMetadataUrl: params.resourceMetadataUrl,
        });
        out.metadata = { resource: doc.resource, authorization_servers: doc.authorization_servers };
      } catch (e) {
        out.metadata = failure(e);
      }
    }
  }
  return out;
}

/// The SDK client with a token: initialize (the session id comes back in Mcp-Session-Id, which
/// the SDK can only read if the answer exposes it), tools/list and tools/call in that session,
/// then DELETE to end it.
async function withToken(url, token) {
  const out = {};
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { Authorization: `Bearer ${token}` } },
  });
  const client = newClient();
  try {
    await client.connect(transport);
    out.sessionId = transport.sessionId ?? null;
    out.tools = (await client.listTools()).tools.map((t) => t.name).sort();
    const result = await client.callTool({ name: 'whoami', arguments: {} });
    out.whoami = result.structuredContent ?? JSON.parse(result.content?.[0]?.text ?? 'null');
    await transport.terminateSession();
    out.terminated = transport.sessionId === undefined;
  } catch (e) {
    out.failure = failure(e);
  }
  try {
    await client.close();
  } catch (_) {
    // already closed
  }
  return out;
}

/// One POST initialize with plain fetch: what the page can see of the answer.
async function probe(url, { token, headers = {}, credentials } = {}) {
  const h = { 'content-type': 'application/json', accept: 'application/json, text/event-stream', ...headers };
  if (token !== undefined) {
    h.authorization = `Bearer ${token}`;
  }
  try {
    const init = { method: 'POST', headers: h, body: INITIALIZE };
    if (credentials) {
      init.credentials = credentials;
    }
    const res = await fetch(url, init);
    await res.arrayBuffer();
    return {
      status: res.status,
      wwwAuthenticate: res.headers.get('www-authenticate'),
      sessionId: res.headers.get('mcp-session-id'),
    };
  } catch (e) {
    return failure(e);
  }
}

/// Everything one page runs; `params`: { url, token, badToken, noScopeToken, allowed }.
async function run(params) {
  const { url, token } = params;
  const out = { origin: location.origin };
  out.withoutToken = await withoutToken(url);
  out.withToken = await withToken(url, token);
  out.invalidToken = await probe(url, { token: params.badToken });
  out.insufficientScope = await probe(url, { token: params.noScopeToken });
  out.unlistedHeader = await probe(url, { token, headers: { 'x-unlisted-header': '1' } });
  out.withCookies = await probe(url, { token, credentials: 'include' });
  out.plain = await probe(url, { token });
  return out;
}

window.gatewayBrowserTest = { run };
