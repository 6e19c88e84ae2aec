//! The MCP upstream behind Envoy: a Streamable HTTP MCP server that validates the exchanged
//! token itself.
//!
//! ```text
//! mcp-upstream --listen 127.0.0.1:9500 --issuer URL --jwks-url URL \
//!              [--audience backend] [--scope backend-api:read]...
//! ```

use gateway_tests::cli::Flags;
use std::net::SocketAddr;
use std::process::ExitCode;

use gateway_tests::mcp::{start_upstream, UpstreamConfig};

const USAGE: &str = "usage: mcp-upstream --listen ADDR --issuer URL --jwks-url URL \
[--audience AUD (default backend)] [--scope SCOPE]... (default backend-api:read)";

struct Args {
    listen: SocketAddr,
    config: UpstreamConfig,
}

fn parse(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut listen = None;
    let mut issuer = None;
    let mut jwks_url = None;
    let mut audience = None;
    let mut scopes = Vec::new();
    let mut flags = Flags::new(args);
    while let Some(name) = flags.next_flag() {
        if name == "-h" || name == "--help" {
            return Err(USAGE.to_string());
        }
        let mut value = || flags.value().map_err(|e| format!("{e}\n{USAGE}"));
        match name.as_str() {
            "--listen" => {
                let v = value()?;
                listen = Some(
                    v.parse::<SocketAddr>()
                        .map_err(|e| format!("--listen {v}: {e}"))?,
                );
            }
            "--issuer" => issuer = Some(value()?),
            "--jwks-url" => jwks_url = Some(value()?),
            "--audience" => audience = Some(value()?),
            "--scope" => scopes.push(value()?),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if scopes.is_empty() {
        scopes.push("backend-api:read".to_string());
    }
    Ok(Args {
        listen: listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?,
        config: UpstreamConfig {
            issuer: issuer.ok_or_else(|| format!("--issuer is required\n{USAGE}"))?,
            jwks_url: jwks_url.ok_or_else(|| format!("--jwks-url is required\n{USAGE}"))?,
            audience: audience.unwrap_or_else(|| "backend".to_string()),
            required_scopes: scopes,
        },
    })
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
    let summary = format!(
        "issuer {} audience {} scopes [{}] keys {}",
        args.config.issuer,
        args.config.audience,
        args.config.required_scopes.join(" "),
        args.config.jwks_url
    );
    let upstream = match start_upstream(args.listen, args.config).await {
        Ok(upstream) => upstream,
        Err(e) => {
            eprintln!("mcp-upstream: cannot start on {}: {e:#}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    println!("mcp-upstream listening on {}", upstream.mcp_url());
    println!("mcp-upstream accepts tokens with {summary}");
    match tokio::signal::ctrl_c().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => {
            // No signal handling available: serve forever.
            std::future::pending::<()>().await;
            ExitCode::SUCCESS
        }
    }
}
