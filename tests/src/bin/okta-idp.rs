//! `okta-idp`: the Okta-compatible identity provider of the e2e suite, as a standalone server.
//!
//! ```text
//! okta-idp [--listen 127.0.0.1:9400] [--client-id gateway-client]
//!          [--client-secret-env TOKEN_EXCHANGE_CLIENT_SECRET] [--public-url URL]
//!          [--exchange-ttl-secs 3600] [--omit-issued-token-type] [--quiet]
//! ```
//!
//! The client secret is read from the named environment variable (never from the command line).

use gateway_tests::cli::Flags;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use gateway_tests::idp::{self, IdpConfig};

const USAGE: &str = "\
usage: okta-idp [options]

  --listen ADDR               listen address (default 127.0.0.1:9400; port 0 = any free port)
  --client-id ID              the gateway's client id (default gateway-client)
  --client-secret-env VAR     env var holding the client secret
                              (default TOKEN_EXCHANGE_CLIENT_SECRET; if unset: gateway-secret)
  --public-url URL            base URL for issuers and metadata (default http://<listen address>)
  --exchange-ttl-secs N       lifetime of exchanged tokens (default 3600)
  --omit-issued-token-type    leave issued_token_type out of exchange responses
  --quiet                     no per-request log lines
  -h, --help                  this text

Authorization servers: mcp (audience mcpserver) and backend (audience backend, trusts mcp).
RFC 7662 introspection: POST /oauth2/{as_id}/v1/introspect (of opaque tokens minted here).
Test-only admin API: POST /__admin/mint (opaque: true for an opaque token), POST
/__admin/revoke, GET /__admin/stats, POST|DELETE /__admin/faults, POST /__admin/rotate/{as_id}.";

struct Args {
    listen: SocketAddr,
    client_id: String,
    secret_env: String,
    public_url: Option<String>,
    exchange_ttl_secs: i64,
    omit_issued_token_type: bool,
    quiet: bool,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 9400)),
        client_id: "gateway-client".into(),
        secret_env: "TOKEN_EXCHANGE_CLIENT_SECRET".into(),
        public_url: None,
        exchange_ttl_secs: 3600,
        omit_issued_token_type: false,
        quiet: false,
    };
    let mut flags = Flags::new(std::env::args().skip(1));
    while let Some(flag) = flags.next_flag() {
        let mut value = || flags.value().map_err(|e| anyhow!(e));
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--listen" => {
                let v = value()?;
                args.listen = v.parse().with_context(|| {
                    format!("--listen {v:?} is not an address like 127.0.0.1:9400")
                })?;
            }
            "--client-id" => args.client_id = value()?,
            "--client-secret-env" => args.secret_env = value()?,
            "--public-url" => args.public_url = Some(value()?),
            "--exchange-ttl-secs" => {
                let v = value()?;
                args.exchange_ttl_secs = v
                    .parse()
                    .with_context(|| format!("--exchange-ttl-secs {v:?} is not a number"))?;
            }
            "--omit-issued-token-type" => args.omit_issued_token_type = true,
            "--quiet" => args.quiet = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Some(args))
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("okta-idp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return Ok(());
        }
        Err(e) => {
            eprintln!("{USAGE}\n");
            return Err(e);
        }
    };
    let secret = match std::env::var(&args.secret_env) {
        Ok(s) if !s.is_empty() => s,
        _ => {
            eprintln!(
                "okta-idp: ${} is not set; using the default client secret \"gateway-secret\"",
                args.secret_env
            );
            "gateway-secret".to_string()
        }
    };

    let mut config = IdpConfig::reference(&args.client_id, &secret);
    config.public_base_url = args.public_url;
    config.exchange_ttl_secs = args.exchange_ttl_secs;
    config.omit_issued_token_type = args.omit_issued_token_type;
    config.log_requests = !args.quiet;
    let as_ids: Vec<String> = config
        .authorization_servers
        .iter()
        .map(|s| s.id.clone())
        .collect();

    let handle = idp::start(args.listen, config).await?;
    println!("okta-idp listening on {}", handle.base_url());
    for id in &as_ids {
        println!(
            "  issuer {}  (token endpoint {})",
            handle.issuer(id),
            handle.token_endpoint(id)
        );
    }
    println!("  client {} (token exchange enabled)", args.client_id);

    shutdown_signal().await;
    eprintln!("okta-idp: shutting down");
    handle.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
