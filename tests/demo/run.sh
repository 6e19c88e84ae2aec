#!/usr/bin/env bash
# The demo stack behind `make run`: the local Okta-compatible IdP, the MCP server, and Envoy with
# the filter (envoy/demo.yaml). Shows one MCP session crossing the gateway with its token swapped,
# then keeps the stack up until Ctrl-C. DEMO_EXIT=1 stops after the demonstration (used by
# `make test` to prove this command works).
set -euo pipefail
cd "$(dirname "$0")/../.."

RUN=.run
BIN=target/debug
ENVOY=${ENVOY_BIN:-.venv/bin/envoy}
IDP=http://127.0.0.1:9400
GATEWAY=http://127.0.0.1:10000
mkdir -p "$RUN"

# The gateway's client secret lives only in the environment of the IdP and Envoy.
export TOKEN_EXCHANGE_CLIENT_SECRET=${TOKEN_EXCHANGE_CLIENT_SECRET:-demo-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}

for port in 9400 9500 10000 9901; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "port $port is already in use (is another 'make run' still up?)" >&2
    exit 1
  fi
done

pids=()
cleanup() {
  if [ ${#pids[@]} -gt 0 ]; then kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # url, what
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$2 did not come up; see $RUN/*.log" >&2
  exit 1
}

"$BIN/okta-idp" --listen 127.0.0.1:9400 >"$RUN/idp.log" 2>&1 & pids+=($!)
wait_for "$IDP/oauth2/mcp/v1/keys" "the IdP"
"$BIN/mcp-upstream" --listen 127.0.0.1:9500 --issuer "$IDP/oauth2/backend" \
  --jwks-url "$IDP/oauth2/backend/v1/keys" >"$RUN/mcp-upstream.log" 2>&1 & pids+=($!)
wait_for http://127.0.0.1:9500/healthz "the MCP server"
"$ENVOY" -c envoy/demo.yaml --disable-hot-restart --concurrency 2 -l info --file-flush-interval-msec 1000 >"$RUN/envoy.log" 2>&1 & pids+=($!)
for _ in $(seq 1 150); do grep -q "JWKS loaded" "$RUN/envoy.log" 2>/dev/null && break; sleep 0.1; done
grep -q "JWKS loaded" "$RUN/envoy.log" || { echo "Envoy did not load the IdP's keys; see $RUN/envoy.log" >&2; tail -20 "$RUN/envoy.log" >&2; exit 1; }

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Stack up: IdP $IDP (authorization servers 'mcp' and 'backend'), MCP server :9500, Envoy $GATEWAY"

step "1. No token: Envoy + filter answer as an OAuth resource server (RFC 6750)"
curl -s -o /dev/null -D - -X POST "$GATEWAY/mcp" -H 'content-type: application/json' \
  -d '{"jsonrpc":"2.0","id":1,"method":"tools/list"}' | grep -iE '^(HTTP|www-authenticate)'

step "2. The challenge points MCP clients at the RFC 9728 metadata, served by the filter"
curl -s "$GATEWAY/.well-known/oauth-protected-resource/mcp"; echo

step "3. The user signs in at the MCP authorization server (here: minted by the test IdP)"
TOKEN=$(curl -fsS -X POST "$IDP/__admin/mint" -H 'content-type: application/json' \
  -d '{"as_id":"mcp","sub":"user@example.com","scopes":["mcp:tools:call"]}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
python3 - "$TOKEN" <<'PY'
import base64, json, sys
payload = sys.argv[1].split(".")[1]
claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
print("client's token:", json.dumps({k: claims[k] for k in ("iss", "aud", "scp", "sub")}))
PY

step "4. A real MCP client calls the MCP server through Envoy; the server reports the token it got"
"$BIN/mcp-client" --url "$GATEWAY/mcp" --token "$TOKEN"

step "5. What the gateway logged (token fingerprints, never tokens) and its audit record"
grep -o 'exchanged token.*' "$RUN/envoy.log" | head -3
# Audit records are batched to Envoy's log, one JSON object per line, on the filter's 500 ms tick.
sleep 0.7
grep '^{"audit"' "$RUN/envoy.log" | tail -1

if [ "${DEMO_EXIT:-0}" = 1 ]; then
  echo; echo "demo OK"
  exit 0
fi

step "Try it yourself (in another terminal)"
cat <<EOT
  TOKEN=\$(curl -s -X POST $IDP/__admin/mint -H 'content-type: application/json' -d '{"sub":"you@example.com"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  $BIN/mcp-client --url $GATEWAY/mcp --token "\$TOKEN"
  curl -si -X POST $GATEWAY/mcp -H "authorization: Bearer \$TOKEN" -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' -d '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"curl","version":"1"}}}'
Logs: $RUN/envoy.log  $RUN/idp.log  $RUN/mcp-upstream.log   Envoy admin: http://127.0.0.1:9901
Press Ctrl-C to stop.
EOT
wait
