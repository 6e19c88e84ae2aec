#!/usr/bin/env bash
# `make demo-apollo`: the stack of `make run` with the walkthrough's parts upstream of Envoy:
#
#   MCP client ─► Envoy :10000 + filter ─► Apollo MCP Server :9500 ─► GraphQL API :9600
#                      │ JWKS + exchange        │ discovery + JWKS         │ @okta/jwt-verifier
#                      └──────────────► test IdP :9400 (Okta-compatible) ◄┘──────────┘
#
# Envoy runs envoy/demo.yaml unchanged (its upstream is :9500). Shows, step by step, the client's
# token being refused by Apollo MCP Server, the same call through Envoy succeeding, and what the
# GraphQL API verified. DEMO_EXIT=1 stops after the demonstration (`make test-apollo` uses it).
set -euo pipefail
cd "$(dirname "$0")/../.."

RUN=.run/apollo
BIN=target/debug
ENVOY=${ENVOY_BIN:-.venv/bin/envoy}
APOLLO_SERVER_BIN=${APOLLO_SERVER_BIN:-.apollo/bin/apollo-mcp-server}
NODE=${NODE:-node}
IDP=http://127.0.0.1:9400
GATEWAY=http://127.0.0.1:10000
APOLLO=http://127.0.0.1:9500
BACKEND=http://127.0.0.1:9600/
mkdir -p "$RUN"

for need in "$APOLLO_SERVER_BIN" tests/apollo/backend/node_modules/@okta/jwt-verifier "$BIN/okta-idp" "$BIN/mcp-client"; do
  [ -e "$need" ] || { echo "missing $need: run 'make demo-apollo' (it installs the Apollo parts)" >&2; exit 1; }
done

APOLLO_SERVER_BIN=$(realpath "$APOLLO_SERVER_BIN")
SEEN=$(realpath "$RUN")/backend-seen.jsonl
rm -f "$SEEN"

# Apollo MCP Server reads every APOLLO_MCP_* variable as configuration: none may leak in.
for v in $(compgen -e | grep '^APOLLO_MCP_' || true); do unset "$v"; done

export TOKEN_EXCHANGE_CLIENT_SECRET=${TOKEN_EXCHANGE_CLIENT_SECRET:-demo-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}

for port in 9400 9500 9600 10000 9901; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "port $port is already in use (is another 'make run' or 'make demo-apollo' still up?)" >&2
    exit 1
  fi
done

pids=()
cleanup() {
  if [ ${#pids[@]} -gt 0 ]; then kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # url, what, log, pid
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    kill -0 "$4" 2>/dev/null || break
    sleep 0.1
  done
  echo "$2 did not come up; see its log $3:" >&2
  tail -15 "$3" >&2
  exit 1
}

"$BIN/okta-idp" --listen 127.0.0.1:9400 >"$RUN/idp.log" 2>&1 & pids+=($!)
wait_for "$IDP/oauth2/mcp/v1/keys" "the IdP" "$RUN/idp.log" $!

(cd tests/apollo/backend && OKTA_ISSUER="$IDP/oauth2/backend" OKTA_AUDIENCE=backend \
  REQUIRED_SCOPES=backend-api:read PORT=9600 SEEN_LOG="$SEEN" \
  exec "$NODE" server.mjs) >"$RUN/backend.log" 2>&1 & pids+=($!)
for _ in $(seq 1 300); do grep -q "GraphQL API listening" "$RUN/backend.log" 2>/dev/null && break; kill -0 $! 2>/dev/null || break; sleep 0.1; done
grep -q "GraphQL API listening" "$RUN/backend.log" || {
  echo "the GraphQL backend (tests/apollo/backend) did not come up; see its log $RUN/backend.log:" >&2
  tail -15 "$RUN/backend.log" >&2; exit 1; }

(cd tests/apollo && WALKTHROUGH_AUTH_SERVER="$IDP/oauth2/backend" WALKTHROUGH_GRAPHQL_ENDPOINT="$BACKEND" \
  WALKTHROUGH_MCP_PORT=9500 WALKTHROUGH_MCP_RESOURCE="$GATEWAY/mcp" exec "$APOLLO_SERVER_BIN" apollo-mcp.yaml) \
  >"$RUN/apollo-mcp-server.log" 2>&1 & pids+=($!)
wait_for "$APOLLO/health" "Apollo MCP Server ($APOLLO_SERVER_BIN)" "$RUN/apollo-mcp-server.log" $!

"$ENVOY" -c envoy/demo.yaml --disable-hot-restart --concurrency 2 -l info --file-flush-interval-msec 1000 >"$RUN/envoy.log" 2>&1 & pids+=($!)
for _ in $(seq 1 150); do grep -q "JWKS loaded" "$RUN/envoy.log" 2>/dev/null && break; sleep 0.1; done
grep -q "JWKS loaded" "$RUN/envoy.log" || { echo "Envoy did not load the IdP's keys; see $RUN/envoy.log" >&2; tail -20 "$RUN/envoy.log" >&2; exit 1; }

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fp() { printf '%s' "$1" | sha256sum | cut -c1-8; }

step "Stack up: IdP $IDP, Envoy $GATEWAY, Apollo MCP Server $APOLLO (auth: backend AS), GraphQL API $BACKEND"

step "1. The user's token from the MCP authorization server (what VS Code would hold)"
TOKEN=$(curl -fsS -X POST "$IDP/__admin/mint" -H 'content-type: application/json' \
  -d '{"as_id":"mcp","sub":"user@example.com","scopes":["mcp:tools:call"]}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
CLIENT_FP=$(fp "$TOKEN")
python3 - "$TOKEN" "$CLIENT_FP" <<'PY'
import base64, json, sys
payload = sys.argv[1].split(".")[1]
claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
print(f"client's token (sha256 {sys.argv[2]}…):", json.dumps({k: claims[k] for k in ("iss", "aud", "scp", "sub")}))
PY

step "2. That token straight to Apollo MCP Server: refused (it accepts aud=backend only)"
if "$BIN/mcp-client" --url "$APOLLO/mcp" --token "$TOKEN" --tool ListProducts 2>"$RUN/direct.err"; then
  echo "Apollo MCP Server accepted the client's token: the walkthrough's setup is not what this demo shows" >&2
  exit 1
fi
sed 's/^/  /' "$RUN/direct.err"

step "3. The same token through Envoy + the filter: exchanged, and Apollo MCP Server serves the tools"
"$BIN/mcp-client" --url "$GATEWAY/mcp" --token "$TOKEN" --tool GetProduct --args '{"id":"p-2"}'
"$BIN/mcp-client" --url "$GATEWAY/mcp" --token "$TOKEN" --tool WhoAmI | tail -1

step "4. What the GraphQL API's @okta/jwt-verifier accepted (tokens by fingerprint, never whole)"
python3 - "$SEEN" "$CLIENT_FP" <<'PY'
import json, sys
records = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in records:
    print(" ", {k: r.get(k) for k in ("accepted", "fingerprint", "sub", "aud", "scp", "iss")})
ok = records and all(r["accepted"] and r["sub"] == "user@example.com" and r["aud"] == "backend"
                     and "backend-api:read" in r["scp"] and r["fingerprint"] != sys.argv[2] for r in records)
print(f"same sub, aud=backend, backend-api:read; the client's token ({sys.argv[2]}) never reached it:",
      "yes" if ok else "NO")
sys.exit(0 if ok else 1)
PY

step "5. The gateway's log: the exchange (fingerprints only)"
grep -o 'exchanged token.*' "$RUN/envoy.log" | head -3

if [ "${DEMO_EXIT:-0}" = 1 ]; then
  echo; echo "demo-apollo OK"
  exit 0
fi

step "Try it yourself (in another terminal)"
cat <<EOT
  TOKEN=\$(curl -s -X POST $IDP/__admin/mint -H 'content-type: application/json' -d '{"sub":"you@example.com"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  $BIN/mcp-client --url $GATEWAY/mcp --token "\$TOKEN" --tool ListProducts
Logs: $RUN/*.log   What the GraphQL API saw: $RUN/backend-seen.jsonl
Press Ctrl-C to stop.
EOT
wait
