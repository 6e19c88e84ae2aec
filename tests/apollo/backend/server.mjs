// The walkthrough's GraphQL API: Apollo Server, and every request's bearer token verified with
// Okta's own library (@okta/jwt-verifier) the way the walkthrough's API does it: issuer,
// signature (keys from the issuer's /v1/keys), expiry, `aud` = OKTA_AUDIENCE with
// verifyAccessToken, then every required scope in `scp`. 401 without a valid token, 403 without
// the scopes.
//
// Environment:
//   OKTA_ISSUER      the backend authorization server, e.g. http://127.0.0.1:9400/oauth2/backend
//   OKTA_AUDIENCE    default "backend"
//   REQUIRED_SCOPES  space-separated, default "backend-api:read"
//   PORT             default 4000 (0: any free port; the URL is printed)
//   SEEN_LOG         optional file: one JSON line per request with what the API saw (the token's
//                    fingerprint and claims, whether it was accepted; never the token)
//
// Okta's verifier refuses an issuer that is not https. Only for an issuer on a loopback address
// (this machine's test IdP) is that check relaxed, with the verifier's own
// `testing.disableHttpsCheck`; any other http issuer still fails at start.

import { createHash } from 'node:crypto';
import { appendFileSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { ApolloServer } from '@apollo/server';
import { startStandaloneServer } from '@apollo/server/standalone';
import OktaJwtVerifier from '@okta/jwt-verifier';
import { GraphQLError } from 'graphql';

const here = (file) => fileURLToPath(new URL(file, import.meta.url));

const issuer = process.env.OKTA_ISSUER;
const audience = process.env.OKTA_AUDIENCE || 'backend';
const requiredScopes = (process.env.REQUIRED_SCOPES || 'backend-api:read').split(' ').filter(Boolean);
const port = Number(process.env.PORT ?? 4000);
const seenLog = process.env.SEEN_LOG;

function isLoopback(url) {
  let host;
  try {
    host = new URL(url).hostname;
  } catch {
    return false;
  }
  return host === 'localhost' || host === '[::1]' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

if (!issuer) {
  console.error('backend: OKTA_ISSUER is not set');
  process.exit(2);
}

let verifier;
try {
  verifier = new OktaJwtVerifier({
    issuer,
    testing: { disableHttpsCheck: issuer.startsWith('http://') && isLoopback(issuer) },
  });
} catch (e) {
  console.error(`backend: @okta/jwt-verifier refused the issuer ${issuer}: ${e.message}`);
  process.exit(2);
}

const data = JSON.parse(readFileSync(here('./data.json'), 'utf8'));
const typeDefs = readFileSync(here('../schema.graphql'), 'utf8');

const fingerprint = (token) => createHash('sha256').update(token).digest('hex').slice(0, 8);

function record(entry) {
  const line = JSON.stringify({ at: new Date().toISOString(), ...entry });
  console.log(`backend: ${line}`);
  if (seenLog) appendFileSync(seenLog, line + '\n');
}

function refuse(status, message) {
  const code = status === 401 ? 'UNAUTHENTICATED' : 'FORBIDDEN';
  return new GraphQLError(message, { extensions: { code, http: { status } } });
}

// Runs for every GraphQL request before any resolver: no valid token, no data.
async function context({ req }) {
  const header = req.headers.authorization || '';
  const match = header.match(/^Bearer (.+)$/);
  if (!match) {
    record({ accepted: false, error: 'no bearer token' });
    throw refuse(401, 'Authentication required. Please provide a Bearer token.');
  }
  const token = match[1];
  const fp = fingerprint(token);
  let jwt;
  try {
    // Signature (RS256, key by kid from the issuer's /v1/keys), expiry, iss and aud.
    jwt = await verifier.verifyAccessToken(token, audience);
  } catch (e) {
    // The claims, undecoded and unverified, only to say what was refused.
    let claims = {};
    try {
      claims = JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString('utf8'));
    } catch {}
    const error = String(e.message || e);
    record({ accepted: false, fingerprint: fp, sub: claims.sub, aud: claims.aud, error });
    throw refuse(401, 'Invalid or expired token');
  }
  const { sub, aud, scp, iss, cid } = jwt.claims;
  // Every required scope in `scp` (Okta: an array; a space-separated string is accepted too).
  const scopes = Array.isArray(scp) ? scp : typeof scp === 'string' ? scp.split(' ') : [];
  const missing = requiredScopes.filter((s) => !scopes.includes(s));
  if (missing.length) {
    record({ accepted: false, fingerprint: fp, sub, aud, scp, error: `missing scopes ${missing.join(' ')}` });
    throw refuse(403, 'Insufficient permissions');
  }
  record({ accepted: true, fingerprint: fp, sub, aud, scp, iss, cid });
  return { caller: { sub, aud, scopes, issuer: iss, tokenFingerprint: fp } };
}

const resolvers = {
  Query: {
    products: () => data.products,
    product: (_, { id }) => data.products.find((p) => p.id === id) ?? null,
    me: (_, __, { caller }) => caller,
  },
};

const server = new ApolloServer({ typeDefs, resolvers, includeStacktraceInErrorResponses: false });
const { url } = await startStandaloneServer(server, { context, listen: { host: '127.0.0.1', port } });
console.log(`backend: GraphQL API listening on ${url} (issuer ${issuer}, audience ${audience}, scopes ${requiredScopes.join(' ')})`);
