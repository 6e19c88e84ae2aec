//! The filter module as an OCI image, built without a container engine, in the layouts that
//! Istio's and Envoy Gateway's Wasm image fetchers accept (the Solo.io "Wasm image" spec):
//!
//! - **oci** variant (the default): manifest `config` is a small JSON blob of media type
//!   `application/vnd.module.wasm.config.v1+json`, and the manifest has exactly **two** layers:
//!   that same config blob, then the raw module as
//!   `application/vnd.module.wasm.content.layer.v1+wasm`. Both fetchers require exactly two
//!   layers for this variant (`number of layers must be 2`) and take the module from the layer of
//!   the wasm media type, byte for byte. This is the layout `wasme` pushes.
//! - **compat** variant: one `application/vnd.oci.image.layer.v1.tar+gzip` layer holding
//!   `plugin.wasm`, manifest annotation `module.wasm.image/variant: compat`, and an ordinary OCI
//!   image config (`os` `wasip1`, `architecture` `wasm`). For registries or tools that only
//!   handle container-image media types.
//!
//! Output is an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`), optionally as a
//! tarball of the same files. Everything is deterministic: the same module, version and revision
//! give the same manifest digest. That digest is what `WasmPlugin.sha256` (Istio, `oci://` URL)
//! and `code.image.sha256` (Envoy Gateway) take; the module's own digest is for `https://` URLs.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::Path;

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub const OCI_LAYOUT_VERSION: &str = "1.0.0";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// oci variant: the runtime config blob (manifest `config` and first layer).
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.module.wasm.config.v1+json";
/// oci variant: the raw module.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// compat variant: the image config.
pub const IMAGE_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// compat variant: the layer, a gzipped tar holding `plugin.wasm`.
pub const TAR_GZIP_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const COMPAT_ANNOTATION: &str = "module.wasm.image/variant";
/// The file name the compat variant's layer must hold.
pub const COMPAT_WASM_FILE: &str = "plugin.wasm";
/// `index.json` annotation naming the tag (`oras cp --from-oci-layout DIR:TAG`, `skopeo oci:DIR:TAG`).
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Oci,
    Compat,
}

impl Variant {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        match text {
            "oci" => Ok(Variant::Oci),
            "compat" => Ok(Variant::Compat),
            other => bail!("unknown image variant {other:?} (oci or compat)"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Oci => "oci",
            Variant::Compat => "compat",
        }
    }
}

/// What goes into the image.
pub struct ImageSpec<'a> {
    /// The `.wasm` module, exactly as Envoy will load it.
    pub wasm: &'a [u8],
    pub variant: Variant,
    /// `org.opencontainers.image.version` and, by default, the tag.
    pub version: &'a str,
    /// `org.opencontainers.image.revision` (the git commit), if known.
    pub revision: Option<&'a str>,
    /// The filter's root id, recorded in the oci variant's runtime config.
    pub root_id: &'a str,
    /// The tag recorded in `index.json`.
    pub ref_name: &'a str,
}

/// A content-addressed blob.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: &'static str,
    pub bytes: Vec<u8>,
}

impl Blob {
    /// Lowercase hex SHA-256 of the bytes.
    pub fn hex(&self) -> String {
        sha256_hex(&self.bytes)
    }

    /// An OCI descriptor of this blob, with optional annotations.
    fn descriptor(&self, annotations: &[(&str, &str)]) -> Value {
        let mut d = json!({
            "mediaType": self.media_type,
            "digest": format!("sha256:{}", self.hex()),
            "size": self.bytes.len(),
        });
        if !annotations.is_empty() {
            let map: BTreeMap<&str, &str> = annotations.iter().copied().collect();
            d["annotations"] = json!(map);
        }
        d
    }
}

/// A built image: every blob (config, layers, manifest) and the index that points at it.
#[derive(Clone, Debug)]
pub struct Image {
    pub variant: Variant,
    pub manifest: Blob,
    /// Config and layer blobs (deduplicated by digest; the oci variant's config is also a layer).
    pub blobs: Vec<Blob>,
    pub index_json: Vec<u8>,
    /// SHA-256 of the module itself.
    pub module_sha256: String,
}

impl Image {
    /// The manifest digest, lowercase hex without `sha256:`: what `WasmPlugin.sha256` takes for
    /// an `oci://` URL.
    pub fn manifest_sha256(&self) -> String {
        self.manifest.hex()
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `\0asm` followed by version 1: the WebAssembly binary format's preamble.
pub fn is_wasm_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

fn to_json(value: &Value) -> anyhow::Result<Vec<u8>> {
    // serde_json's maps are sorted (no `preserve_order`), so the bytes are stable.
    Ok(serde_json::to_vec(value)?)
}

/// Builds the image in memory.
pub fn build(spec: &ImageSpec<'_>) -> anyhow::Result<Image> {
    if !is_wasm_module(spec.wasm) {
        bail!("the module is not a WebAssembly binary (no \\0asm version 1 preamble)");
    }
    if spec.version.is_empty() || spec.ref_name.is_empty() {
        bail!("version and tag must not be empty");
    }
    let module_sha256 = sha256_hex(spec.wasm);
    let mut manifest_annotations = vec![
        ("org.opencontainers.image.title", "mcp-token-exchange"),
        (
            "org.opencontainers.image.description",
            "proxy-wasm filter: validates an MCP client's JWT and exchanges it (RFC 8693) for a backend token",
        ),
        ("org.opencontainers.image.version", spec.version),
        ("org.opencontainers.image.licenses", "Apache-2.0"),
    ];
    if let Some(rev) = spec.revision.filter(|r| !r.is_empty()) {
        manifest_annotations.push(("org.opencontainers.image.revision", rev));
    }

    let (config, layers, layer_descriptors) = match spec.variant {
        Variant::Oci => {
            let config = Blob {
                media_type: WASM_CONFIG_MEDIA_TYPE,
                bytes: to_json(&json!({
                    "type": "envoy_proxy",
                    "abiVersions": ["proxy_abi_version_0_2_1"],
                    "config": { "rootIds": [spec.root_id] },
                }))?,
            };
            let wasm = Blob {
                media_type: WASM_LAYER_MEDIA_TYPE,
                bytes: spec.wasm.to_vec(),
            };
            let descriptors = vec![
                config.descriptor(&[(TITLE_ANNOTATION, "runtime-config.json")]),
                wasm.descriptor(&[(TITLE_ANNOTATION, COMPAT_WASM_FILE)]),
            ];
            (config, vec![wasm], descriptors)
        }
        Variant::Compat => {
            let tar = tar_of(&[(COMPAT_WASM_FILE, spec.wasm)])?;
            let diff_id = format!("sha256:{}", sha256_hex(&tar));
            let layer = Blob {
                media_type: TAR_GZIP_LAYER_MEDIA_TYPE,
                bytes: gzip(&tar)?,
            };
            let config = Blob {
                media_type: IMAGE_CONFIG_MEDIA_TYPE,
                bytes: to_json(&json!({
                    "architecture": "wasm",
                    "os": "wasip1",
                    "config": {},
                    "rootfs": { "type": "layers", "diff_ids": [diff_id] },
                }))?,
            };
            let descriptors = vec![layer.descriptor(&[])];
            manifest_annotations.push((COMPAT_ANNOTATION, "compat"));
            (config, vec![layer], descriptors)
        }
    };

    let annotations: BTreeMap<&str, &str> = manifest_annotations.into_iter().collect();
    let manifest = Blob {
        media_type: MANIFEST_MEDIA_TYPE,
        bytes: to_json(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.descriptor(&[]),
            "layers": layer_descriptors,
            "annotations": annotations,
        }))?,
    };
    let index_json = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [manifest.descriptor(&[(REF_NAME_ANNOTATION, spec.ref_name)])],
    }))?;
    let mut blobs = vec![config];
    blobs.extend(layers);
    Ok(Image {
        variant: spec.variant,
        manifest,
        blobs,
        index_json,
        module_sha256,
    })
}

/// The files of the image layout, relative paths in a fixed order.
fn layout_files(image: &Image) -> Vec<(String, &[u8])> {
    let mut files: Vec<(String, &[u8])> = vec![
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.as_slice(),
        ),
        ("index.json".into(), image.index_json.as_slice()),
    ];
    let mut blobs: BTreeMap<String, &[u8]> = BTreeMap::new();
    for blob in image.blobs.iter().chain(std::iter::once(&image.manifest)) {
        blobs.insert(blob.hex(), blob.bytes.as_slice());
    }
    for (hex, bytes) in blobs {
        files.push((format!("blobs/sha256/{hex}"), bytes));
    }
    files
}

/// Writes the image as an OCI image layout into `dir`, which must not exist or be empty.
pub fn write_layout(image: &Image, dir: &Path) -> anyhow::Result<()> {
    if dir.exists()
        && fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!("{} exists and is not empty; remove it first", dir.display());
    }
    for (rel, bytes) in layout_files(image) {
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Writes the image layout as one tarball (the files at its root, as `skopeo`'s `oci-archive:`
/// and `oras --from-oci-layout` expect).
pub fn write_tar(image: &Image, path: &Path) -> anyhow::Result<()> {
    let files = layout_files(image);
    let entries: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), *b)).collect();
    let bytes = tar_of(&entries)?;
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&bytes)?;
    Ok(())
}

/// A deterministic ustar archive: regular files, mode 0644, owner 0:0, mtime 0; parent
/// directories are created as entries before their first file.
pub fn tar_of(files: &[(&str, &[u8])]) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (name, bytes) in files {
        let mut parent = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            parent.push_str(part);
            parent.push('/');
            if dirs.insert(parent.clone()) {
                let mut header = tar::Header::new_ustar();
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_uid(0);
                header.set_gid(0);
                header.set_mtime(0);
                header.set_size(0);
                builder.append_data(&mut header, &parent, std::io::empty())?;
            }
        }
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(bytes.len() as u64);
        builder.append_data(&mut header, name, *bytes)?;
    }
    Ok(builder.into_inner()?)
}

/// gzip with a fixed header (mtime 0), so the compressed bytes are reproducible.
fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut enc = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes)?;
    Ok(enc.finish()?)
}
