//! A real MCP client: initialize → tools/list → tools/call whoami (or `--tool`) over Streamable
//! HTTP, with `Authorization: Bearer <token>` on every request.
//!
//! ```text
//! mcp-client --url http://127.0.0.1:10000/mcp --token TOKEN
//! mcp-client --url http://127.0.0.1:10000/mcp --mint-from http://127.0.0.1:9400 [--sub user@example.com]
//! mcp-client --url http://127.0.0.1:10000/mcp --token TOKEN --tool GetProduct --args '{"id":"p-2"}'
//! ```
//!
//! `--mint-from` asks the test IdP for a user token of its MCP authorization server
//! (`POST {idp}/__admin/mint` with `{"as_id":"mcp","sub":…}`). Exit code 1 on failure, with the
//! HTTP status when the gateway or server answered non-2xx.

use gateway_tests::cli::Flags;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use gateway_tests::mcp::{error_status, McpSession};
use serde_json::{json, Value};

const USAGE: &str = "usage: mcp-client --url MCP_URL (--token TOKEN | --mint-from IDP_URL \
[--sub SUBJECT (default user@example.com)]) [--tool NAME (default whoami)] [--args JSON_OBJECT]";

struct Args {
    url: String,
    token: Option<String>,
    mint_from: Option<String>,
    sub: String,
    tool: String,
    tool_args: Value,
}

fn parse(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut url = None;
    let mut token = None;
    let mut mint_from = None;
    let mut sub = None;
    let mut tool = None;
    let mut tool_args = Value::Null;
    let mut flags = Flags::new(args);
    while let Some(name) = flags.next_flag() {
        if name == "-h" || name == "--help" {
            return Err(USAGE.to_string());
        }
        let mut value = || flags.value().map_err(|e| format!("{e}\n{USAGE}"));
        match name.as_str() {
            "--url" => url = Some(value()?),
            "--token" => token = Some(value()?),
            "--mint-from" => mint_from = Some(value()?),
            "--sub" => sub = Some(value()?),
            "--tool" => tool = Some(value()?),
            "--args" => {
                tool_args = serde_json::from_str(&value()?)
                    .map_err(|e| format!("--args is not JSON: {e}\n{USAGE}"))?
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if token.is_some() == mint_from.is_some() {
        return Err(format!(
            "give exactly one of --token and --mint-from\n{USAGE}"
        ));
    }
    Ok(Args {
        url: url.ok_or_else(|| format!("--url is required\n{USAGE}"))?,
        token,
        mint_from,
        sub: sub.unwrap_or_else(|| "user@example.com".to_string()),
        tool: tool.unwrap_or_else(|| "whoami".to_string()),
        tool_args,
    })
}

/// `POST {idp}/__admin/mint` → `access_token`.
async fn mint(idp: &str, sub: &str) -> anyhow::Result<String> {
    let url = format!("{}/__admin/mint", idp.trim_end_matches('/'));
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
    let response = http
        .post(&url)
        .json(&json!({"as_id": "mcp", "sub": sub}))
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("POST {url}: HTTP {status}: {body}");
    }
    let value: Value =
        serde_json::from_str(&body).with_context(|| format!("POST {url}: not JSON: {body}"))?;
    value["access_token"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("POST {url}: no access_token in {body}"))
}

/// The token's claims, undecoded signature, for display only.
fn peek_claims(token: &str) -> Option<Value> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let token = match (&args.token, &args.mint_from) {
        (Some(token), _) => token.clone(),
        (None, Some(idp)) => {
            let token = mint(idp, &args.sub).await?;
            println!("minted a user token for {} from {idp}", args.sub);
            token
        }
        (None, None) => unreachable!("checked by parse"),
    };
    if let Some(claims) = peek_claims(&token) {
        println!(
            "client token: sub={} aud={} scopes={} iss={}",
            claims["sub"],
            claims["aud"],
            claims
                .get("scp")
                .or(claims.get("scope"))
                .unwrap_or(&Value::Null),
            claims["iss"]
        );
    }

    println!("connecting to {}", args.url);
    let session = McpSession::connect(&args.url, &token).await?;
    println!(
        "initialize: ok (server {}, protocol {})",
        session.server_name().unwrap_or_else(|| "?".into()),
        session.protocol_version().unwrap_or_else(|| "?".into())
    );
    let outcome = async {
        let tools = session.tools().await?;
        println!("tools/list: {}", tools.join(", "));
        if args.tool != "whoami" {
            let result = session.call(&args.tool, args.tool_args.clone()).await?;
            println!("tools/call {}: {result}", args.tool);
            return anyhow::Ok(());
        }
        let who = session.call("whoami", Value::Null).await?;
        println!(
            "tools/call whoami: the MCP server saw sub={} aud={} scopes={} iss={} client_id={}",
            who["sub"], who["aud"], who["scopes"], who["iss"], who["client_id"]
        );
        println!("{}", serde_json::to_string_pretty(&who)?);
        anyhow::Ok(())
    }
    .await;
    session.close().await;
    outcome
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match error_status(&e) {
                Some(status) => eprintln!("mcp-client: failed (HTTP {status}): {e:#}"),
                None => eprintln!("mcp-client: failed: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
