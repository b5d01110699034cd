//! Reads an image out of a docker or OCI archive (what `--image FILE`
//! accepts, [`crate::archive`]): its config, its layers in order, its
//! names. The archive is untrusted input: JSON documents and entry counts
//! are bounded, and every blob is checked against the digest that names it
//! (the config's sha256 is the image's digest; each layer's uncompressed
//! sha256 must be the config's `rootfs.diff_ids` entry, and in an OCI
//! archive the blob's own digest too).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::archive::Format;

/// Most entries read from the outer archive.
const MAX_ENTRIES: usize = 100_000;
/// Largest JSON document read (manifest, index, config).
const MAX_JSON: u64 = 4 << 20;
/// Most layers in one image.
pub const MAX_LAYERS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the image archive {}", .0.display())]
    Read(PathBuf, #[source] io::Error),
    #[error("{}: {why}", path.display())]
    Bad { path: PathBuf, why: String },
}

/// One layer: where its bytes are in the archive and what they must hash to.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Byte offset and length of the blob in the archive file.
    pub offset: u64,
    pub len: u64,
    /// `sha256:HEX` of the blob as stored (OCI descriptors), if known.
    pub blob_digest: Option<String>,
    /// `sha256:HEX` of the uncompressed tar (`rootfs.diff_ids`), if known.
    pub diff_id: Option<String>,
}

/// The image an archive holds.
#[derive(Debug, Clone)]
pub struct Image {
    /// `sha256:HEX` of the config blob: the image's id.
    pub digest: String,
    /// The config blob, as stored.
    pub config: Vec<u8>,
    pub layers: Vec<Layer>,
    /// `name:tag` references it carries (docker `RepoTags`, OCI
    /// `io.containerd.image.name` / `org.opencontainers.image.ref.name`).
    pub names: Vec<String>,
    pub format: Format,
}

/// Where each entry of the archive is.
struct Index {
    file: File,
    /// Regular files: name → (offset, len).
    files: HashMap<String, (u64, u64)>,
    /// Symbolic and hard links: name → target name (resolved once).
    links: HashMap<String, String>,
}

fn clean(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

impl Index {
    fn open(path: &Path) -> Result<Index, Error> {
        let read = |e| Error::Read(path.to_path_buf(), e);
        let file = File::open(path).map_err(read)?;
        let mut files = HashMap::new();
        let mut links = HashMap::new();
        let mut archive = tar::Archive::new(BufReader::new(file.try_clone().map_err(read)?));
        for (i, entry) in archive.entries().map_err(read)?.enumerate() {
            if i >= MAX_ENTRIES {
                return Err(bad(path, format!("more than {MAX_ENTRIES} entries")));
            }
            let entry = entry.map_err(read)?;
            let name = clean(&String::from_utf8_lossy(&entry.path_bytes()));
            let kind = entry.header().entry_type();
            if kind.is_file() {
                files.insert(name, (entry.raw_file_position(), entry.size()));
            } else if kind.is_symlink() || kind.is_hard_link() {
                if let Some(target) = entry.link_name_bytes() {
                    let target = String::from_utf8_lossy(&target).into_owned();
                    let resolved = if kind.is_symlink() {
                        let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
                        clean(&format!("{dir}/{target}"))
                    } else {
                        clean(&target)
                    };
                    links.insert(name, resolved);
                }
            }
        }
        Ok(Index { file, files, links })
    }

    fn find(&self, name: &str) -> Option<(u64, u64)> {
        let name = clean(name);
        self.files.get(&name).copied().or_else(|| {
            let target = self.links.get(&name)?;
            self.files.get(target).copied()
        })
    }

    fn read_json(&self, path: &Path, name: &str) -> Result<(Vec<u8>, Value), Error> {
        let (offset, len) = self
            .find(name)
            .ok_or_else(|| bad(path, format!("it has no {name}")))?;
        if len > MAX_JSON {
            return Err(bad(path, format!("{name} is larger than {MAX_JSON} bytes")));
        }
        let mut bytes = Vec::new();
        let mut f = &self.file;
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.take(len).read_to_end(&mut bytes))
            .map_err(|e| Error::Read(path.to_path_buf(), e))?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(path, format!("{name} is not JSON: {e}")))?;
        Ok((bytes, value))
    }
}

fn bad(path: &Path, why: impl Into<String>) -> Error {
    Error::Bad {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// `sha256:` and the hex digest of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `sha256:` digest of 64 lowercase hex digits (the only kind taken).
pub fn is_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Reads the image that the archive at `path` (of `format`) holds.
pub fn read(path: &Path, format: Format) -> Result<Image, Error> {
    let index = Index::open(path)?;
    let (config_name, names, mut layers) = match format {
        Format::Docker => docker(&index, path)?,
        Format::Oci => oci(&index, path)?,
    };
    let (config, config_json) = index.read_json(path, &config_name)?;
    let digest = sha256(&config);
    if let Some(hexname) = config_name.strip_prefix("blobs/sha256/") {
        if format!("sha256:{hexname}") != digest {
            return Err(bad(path, "the config does not match its digest"));
        }
    }
    let diff_ids: Vec<String> = config_json
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if diff_ids.len() != layers.len() {
        return Err(bad(
            path,
            format!(
                "the config lists {} layers (rootfs.diff_ids), the manifest {}",
                diff_ids.len(),
                layers.len()
            ),
        ));
    }
    for (layer, id) in layers.iter_mut().zip(diff_ids) {
        if !is_digest(&id) {
            return Err(bad(
                path,
                format!("a layer's diff_id {id:?} is not a sha256 digest"),
            ));
        }
        layer.diff_id = Some(id);
    }
    Ok(Image {
        digest,
        config,
        layers,
        names,
        format,
    })
}

type Parts = (String, Vec<String>, Vec<Layer>);

fn layer_at(
    index: &Index,
    path: &Path,
    name: &str,
    blob_digest: Option<String>,
) -> Result<Layer, Error> {
    let (offset, len) = index
        .find(name)
        .ok_or_else(|| bad(path, format!("it has no layer {name}")))?;
    Ok(Layer {
        offset,
        len,
        blob_digest,
        diff_id: None,
    })
}

fn docker(index: &Index, path: &Path) -> Result<Parts, Error> {
    let (_, manifest) = index.read_json(path, "manifest.json")?;
    let images = manifest
        .as_array()
        .ok_or_else(|| bad(path, "manifest.json is not a list"))?;
    let [image] = images.as_slice() else {
        return Err(bad(
            path,
            format!(
                "manifest.json lists {} images; load an archive of one",
                images.len()
            ),
        ));
    };
    let config = image
        .get("Config")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(path, "manifest.json names no Config"))?
        .to_owned();
    let names = strings(image.get("RepoTags"));
    let layer_names = strings(image.get("Layers"));
    if layer_names.len() > MAX_LAYERS {
        return Err(bad(path, format!("more than {MAX_LAYERS} layers")));
    }
    let layers = layer_names
        .iter()
        .map(|n| layer_at(index, path, n, None))
        .collect::<Result<_, _>>()?;
    Ok((config, names, layers))
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn blob_name(path: &Path, digest: &str) -> Result<String, Error> {
    if !is_digest(digest) {
        return Err(bad(path, format!("{digest:?} is not a sha256 digest")));
    }
    Ok(format!("blobs/sha256/{}", &digest["sha256:".len()..]))
}

fn oci(index: &Index, path: &Path) -> Result<Parts, Error> {
    let (_, idx) = index.read_json(path, "index.json")?;
    let manifests = idx
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(path, "index.json lists no manifests"))?;
    let [desc] = manifests.as_slice() else {
        return Err(bad(
            path,
            format!(
                "index.json lists {} manifests; load an archive of one image",
                manifests.len()
            ),
        ));
    };
    let mut names = Vec::new();
    let ann = |k: &str| {
        desc.pointer(&format!("/annotations/{}", k.replace('/', "~1")))
            .and_then(Value::as_str)
    };
    if let Some(n) = ann("io.containerd.image.name") {
        names.push(n.to_owned());
    } else if let Some(n) = ann("org.opencontainers.image.ref.name") {
        // A whole reference (podman); a bare tag names nothing.
        if n.contains(':') || n.contains('/') {
            names.push(n.to_owned());
        }
    }
    let digest = desc
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(path, "index.json's manifest has no digest"))?;
    let manifest_name = blob_name(path, digest)?;
    let (mbytes, manifest) = index.read_json(path, &manifest_name)?;
    if sha256(&mbytes) != digest {
        return Err(bad(path, "the manifest does not match its digest"));
    }
    let config_digest = manifest
        .pointer("/config/digest")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            bad(
                path,
                "the manifest names no config (an index of indexes is not taken)",
            )
        })?;
    let config = blob_name(path, config_digest)?;
    let descs = manifest
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(path, "the manifest lists no layers"))?;
    if descs.len() > MAX_LAYERS {
        return Err(bad(path, format!("more than {MAX_LAYERS} layers")));
    }
    let mut layers = Vec::new();
    for d in descs {
        let digest = d
            .get("digest")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(path, "a layer has no digest"))?;
        let name = blob_name(path, digest)?;
        layers.push(layer_at(index, path, &name, Some(digest.to_owned()))?);
    }
    Ok((config, names, layers))
}

/// A reader that hashes what passes through it.
pub struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R) -> Self {
        Hashing {
            inner,
            hash: Sha256::new(),
        }
    }

    /// Reads what is left (a tar stream's padding after its end marker)
    /// and returns the `sha256:` digest of everything.
    pub fn finish(mut self) -> io::Result<String> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            let n = self.inner.read(&mut buf)?;
            if n == 0 {
                break;
            }
            self.hash.update(&buf[..n]);
        }
        Ok(format!("sha256:{}", hex(&self.hash.finalize())))
    }
}

impl<R> std::fmt::Debug for Hashing<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hashing")
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Opens `layer` of the archive at `path` as a stream of its blob's bytes.
pub fn open_layer(path: &Path, layer: &Layer) -> io::Result<io::Take<File>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(layer.offset))?;
    Ok(f.take(layer.len))
}
