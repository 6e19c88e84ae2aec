//! `oci-image`: packs the filter module as an OCI image (layout directory and/or tarball) that
//! Istio's `WasmPlugin` (`url: oci://…`) and Envoy Gateway's `EnvoyExtensionPolicy`
//! (`code.type: Image`) can pull once it is pushed to a registry. No container engine needed.
//!
//! ```text
//! oci-image --wasm target/wasm32-wasip1/release/mcp_token_exchange.wasm \
//!           --out target/oci/mcp-token-exchange-0.1.0 [--tar target/oci/….oci.tar] \
//!           [--version 0.1.0] [--revision <git commit>] [--tag 0.1.0] [--variant oci|compat]
//! ```
//!
//! Prints the manifest digest (for `WasmPlugin.sha256` / `code.image.sha256`) and the module's
//! digest. See `gateway_tests::oci` for the layouts.

use gateway_tests::cli::Flags;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use gateway_tests::oci::{self, ImageSpec, Variant};

const USAGE: &str = "\
usage: oci-image --wasm FILE (--out DIR | --tar FILE) [options]

  --wasm FILE        the filter module (target/wasm32-wasip1/release/mcp_token_exchange.wasm)
  --out DIR          write an OCI image layout here (must not exist or be empty)
  --tar FILE         write the same layout as a tarball
  --version V        image version annotation (default: this crate's version)
  --revision REV     git commit annotation (optional)
  --tag TAG          tag recorded in index.json (default: the version)
  --variant V        oci (default: config + raw .wasm layer) or compat (one tar+gzip layer
                     holding plugin.wasm)
  --root-id ID       root id recorded in the oci variant's runtime config
                     (default mcp_token_exchange)
  -h, --help         this text";

struct Args {
    wasm: PathBuf,
    out: Option<PathBuf>,
    tar: Option<PathBuf>,
    version: String,
    revision: Option<String>,
    tag: Option<String>,
    variant: Variant,
    root_id: String,
}

fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut wasm = None;
    let mut args = Args {
        wasm: PathBuf::new(),
        out: None,
        tar: None,
        version: env!("CARGO_PKG_VERSION").to_string(),
        revision: None,
        tag: None,
        variant: Variant::Oci,
        root_id: "mcp_token_exchange".into(),
    };
    let mut flags = Flags::new(std::env::args().skip(1));
    while let Some(flag) = flags.next_flag() {
        let mut value = || flags.value().map_err(|e| anyhow!(e));
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--wasm" => wasm = Some(PathBuf::from(value()?)),
            "--out" => args.out = Some(PathBuf::from(value()?)),
            "--tar" => args.tar = Some(PathBuf::from(value()?)),
            "--version" => args.version = value()?,
            "--revision" => args.revision = Some(value()?),
            "--tag" => args.tag = Some(value()?),
            "--variant" => args.variant = Variant::parse(&value()?)?,
            "--root-id" => args.root_id = value()?,
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    args.wasm = wasm.ok_or_else(|| anyhow!("--wasm is required\n\n{USAGE}"))?;
    if args.out.is_none() && args.tar.is_none() {
        bail!("give --out, --tar or both\n\n{USAGE}");
    }
    Ok(Some(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    let wasm = std::fs::read(&args.wasm)
        .with_context(|| format!("reading {} (run `make wasm`)", args.wasm.display()))?;
    let tag = args.tag.clone().unwrap_or_else(|| args.version.clone());
    let image = oci::build(&ImageSpec {
        wasm: &wasm,
        variant: args.variant,
        version: &args.version,
        revision: args.revision.as_deref(),
        root_id: &args.root_id,
        ref_name: &tag,
    })?;
    println!(
        "OCI image ({} variant) of {} ({} bytes), tag {tag}",
        image.variant.as_str(),
        args.wasm.display(),
        wasm.len()
    );
    if let Some(dir) = &args.out {
        oci::write_layout(&image, dir)?;
        println!("  layout:  {}", dir.display());
    }
    if let Some(tar) = &args.tar {
        if let Some(parent) = tar.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        oci::write_tar(&image, tar)?;
        println!("  tarball: {}", tar.display());
    }
    println!(
        "manifest-sha256: {}  <- WasmPlugin.sha256 (oci:// URL), EnvoyExtensionPolicy code.image.sha256",
        image.manifest_sha256()
    );
    println!(
        "module-sha256:   {}  <- sha256 of the .wasm (for an https:// URL)",
        image.module_sha256
    );
    Ok(())
}

fn main() -> ExitCode {
    match parse_args() {
        Ok(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Some(args)) => match run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("oci-image: {e:#}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("oci-image: {e:#}");
            ExitCode::from(2)
        }
    }
}
