//! The image store: images loaded from archives, by digest, each unpacked
//! once into a read-only erofs disk that a sandbox boots its container on.
//!
//! Layout (every directory 0700, owned by the user):
//!
//! ```text
//! $XDG_DATA_HOME/airlock/images/    (else ~/.local/share/airlock/images/)
//!   .lock                 flock(2)ed by whoever changes the store
//!   repositories.json     {"name:tag": "sha256:HEX", ...} (replaced atomically)
//!   sha256/HEX/           one image (HEX: the sha256 of its config blob)
//!     rootfs.erofs        its layers applied in order (mkfs.erofs -zlz4hc)
//!     config.json         its config blob, as loaded
//!     image.json          what loading it found (sizes, what was left out)
//!   tmp/                  loads in progress (each in a directory of its own)
//! ```
//!
//! An image is complete once its directory is renamed into `sha256/`; a
//! reader never sees half of one.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use super::source::{self, Image};
use super::unpack::{self, Limits, Unpacker};
use super::Error;

/// Shortest digest prefix (hex digits) a reference may use.
pub const MIN_PREFIX: usize = 4;

/// The store's directory: `$XDG_DATA_HOME/airlock/images`, else
/// `~/.local/share/airlock/images`.
pub fn default_dir() -> Result<PathBuf, Error> {
    let var = |n: &str| std::env::var_os(n).filter(|v| !v.is_empty());
    if let Some(d) = var("XDG_DATA_HOME") {
        return Ok(PathBuf::from(d).join("airlock/images"));
    }
    var("HOME")
        .map(|h| PathBuf::from(h).join(".local/share/airlock/images"))
        .ok_or(Error::NoHome)
}

/// An image in the store.
#[derive(Debug, Clone)]
pub struct Stored {
    /// `sha256:HEX`.
    pub digest: String,
    /// Its `name:tag`s, sorted.
    pub names: Vec<String>,
    pub dir: PathBuf,
}

impl Stored {
    pub fn disk(&self) -> PathBuf {
        self.dir.join("rootfs.erofs")
    }

    pub fn config(&self) -> Result<Value, Error> {
        let path = self.dir.join("config.json");
        let bytes = fs::read(&path).map_err(|e| Error::Io(path.clone(), e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Io(path, io::Error::other(e)))
    }

    pub fn meta(&self) -> Value {
        fs::read(self.dir.join("image.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }
}

/// What `load` did.
#[derive(Debug)]
pub struct Loaded {
    pub image: Stored,
    /// It was in the store already (only its names were set).
    pub existed: bool,
    pub stats: Option<unpack::Stats>,
    /// Names in the archive that are not valid references (left out).
    pub bad_names: Vec<String>,
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

fn mkdir_private(path: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

impl Store {
    /// The store at `dir`, made (0700) if missing.
    pub fn open(dir: &Path) -> Result<Store, Error> {
        let io_err = |e| Error::Io(dir.to_path_buf(), e);
        if let Some(parent) = dir.parent() {
            // The airlock directory above it is private too.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_err)?;
        }
        mkdir_private(dir).map_err(io_err)?;
        let meta = fs::symlink_metadata(dir).map_err(io_err)?;
        if !meta.is_dir() {
            return Err(io_err(io::Error::other("not a directory")));
        }
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        }
        for sub in ["sha256", "tmp"] {
            mkdir_private(&dir.join(sub)).map_err(|e| Error::Io(dir.join(sub), e))?;
        }
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    /// The store at [`default_dir`].
    pub fn open_default() -> Result<Store, Error> {
        Store::open(&default_dir()?)
    }

    /// Holds the store's lock until dropped.
    fn lock(&self) -> Result<fs::File, Error> {
        let path = self.dir.join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::Io(path.clone(), e))?;
        // SAFETY: flock(2) on a descriptor we own; no pointers.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) } != 0 {
            return Err(Error::Io(path, io::Error::last_os_error()));
        }
        Ok(f)
    }

    fn repositories(&self) -> Result<BTreeMap<String, String>, Error> {
        let path = self.dir.join("repositories.json");
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| Error::Io(path, io::Error::other(e)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(Error::Io(path, e)),
        }
    }

    fn write_repositories(&self, repos: &BTreeMap<String, String>) -> Result<(), Error> {
        let path = self.dir.join("repositories.json");
        let tmp = self
            .dir
            .join(format!(".repositories.json.{}", std::process::id()));
        let mut bytes = serde_json::to_vec_pretty(repos)
            .map_err(|e| Error::Io(path.clone(), io::Error::other(e)))?;
        bytes.push(b'\n');
        write_new(&tmp, &bytes)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                Error::Io(path, e)
            })
    }

    fn image_dir(&self, digest: &str) -> PathBuf {
        self.dir
            .join("sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    fn stored(&self, digest: &str, repos: &BTreeMap<String, String>) -> Stored {
        let mut names: Vec<String> = repos
            .iter()
            .filter(|(_, d)| *d == digest)
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        Stored {
            digest: digest.to_owned(),
            names,
            dir: self.image_dir(digest),
        }
    }

    /// Every complete image, sorted by digest.
    pub fn list(&self) -> Result<Vec<Stored>, Error> {
        let repos = self.repositories()?;
        let dir = self.dir.join("sha256");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| Error::Io(dir.clone(), e))? {
            let e = e.map_err(|e| Error::Io(dir.clone(), e))?;
            let Some(hex) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let digest = format!("sha256:{hex}");
            if source::is_digest(&digest) && e.path().join("rootfs.erofs").is_file() {
                out.push(self.stored(&digest, &repos));
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// The image `reference` names: `name[:tag]` (`:latest` if no tag;
    /// `localhost/NAME` too, as podman names local images), or
    /// `sha256:HEX` with a unique prefix of at least [`MIN_PREFIX`] digits.
    pub fn resolve(&self, reference: &str) -> Result<Stored, Error> {
        let repos = self.repositories()?;
        if let Some(prefix) = reference.strip_prefix("sha256:") {
            if prefix.len() < MIN_PREFIX
                || prefix.len() > 64
                || !prefix
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(Error::BadRef(reference.to_owned()));
            }
            let matches: Vec<Stored> = self
                .list()?
                .into_iter()
                .filter(|s| s.digest["sha256:".len()..].starts_with(prefix))
                .collect();
            let n = matches.len();
            return match matches.into_iter().next() {
                None => Err(Error::NotFound(reference.to_owned())),
                Some(one) if n == 1 => Ok(one),
                Some(_) => Err(Error::Ambiguous(reference.to_owned(), n)),
            };
        }
        let name = normalize(reference).ok_or_else(|| Error::BadRef(reference.to_owned()))?;
        let local = format!("localhost/{name}");
        let found = repos
            .get(&name)
            .or_else(|| (!name.contains('/')).then(|| repos.get(&local)).flatten());
        match found {
            Some(digest) if self.image_dir(digest).join("rootfs.erofs").is_file() => {
                Ok(self.stored(digest, &repos))
            }
            _ => Err(Error::NotFound(reference.to_owned())),
        }
    }

    /// Loads the archive at `path`: reads and checks it, unpacks its
    /// layers (unless the store has that digest already) into an erofs
    /// disk, then gives it the archive's names, taking each from the image
    /// that had it.
    pub fn load(&self, path: &Path, mkfs: &Path) -> Result<Loaded, Error> {
        let format = crate::archive::check(path)?;
        let image = source::read(path, format)?;
        let (names, bad_names): (Vec<String>, Vec<String>) = image
            .names
            .iter()
            .cloned()
            .partition(|n| normalize(n).is_some());
        let names: Vec<String> = names.iter().filter_map(|n| normalize(n)).collect();
        let target = self.image_dir(&image.digest);
        let mut stats = None;
        let existed = target.join("rootfs.erofs").is_file();
        if !existed {
            stats = Some(self.unpack(path, &image, mkfs, &target)?);
        }
        let _lock = self.lock()?;
        let mut repos = self.repositories()?;
        for n in &names {
            repos.insert(n.clone(), image.digest.clone());
        }
        self.write_repositories(&repos)?;
        Ok(Loaded {
            image: self.stored(&image.digest, &repos),
            existed,
            stats,
            bad_names,
        })
    }

    fn unpack(
        &self,
        path: &Path,
        image: &Image,
        mkfs: &Path,
        target: &Path,
    ) -> Result<unpack::Stats, Error> {
        let work = self.dir.join("tmp").join(format!(
            "{}-{}",
            image.digest.trim_start_matches("sha256:"),
            std::process::id()
        ));
        if work.exists() {
            unpack::remove_all(&work).map_err(|e| Error::Io(work.clone(), e))?;
        }
        mkdir_private(&work).map_err(|e| Error::Io(work.clone(), e))?;
        let result = (|| {
            let root = work.join("root");
            mkdir_private(&root).map_err(|e| Error::Io(root.clone(), e))?;
            let mut unpacker =
                Unpacker::new(&root, Limits::default()).map_err(|e| Error::Io(root.clone(), e))?;
            for (i, layer) in image.layers.iter().enumerate() {
                apply_layer(&mut unpacker, path, i + 1, layer)?;
            }
            let stats = unpacker.stats().clone();
            let disk = work.join("rootfs.erofs");
            let out = Command::new(mkfs)
                .arg("-zlz4hc")
                .arg("--quiet")
                .arg(&disk)
                .arg(&root)
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| Error::Mkfs(format!("cannot run {}: {e}", mkfs.display())))?;
            if !out.status.success() {
                return Err(Error::Mkfs(format!(
                    "{} failed ({}): {}",
                    mkfs.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            unpack::remove_all(&root).map_err(|e| Error::Io(root.clone(), e))?;
            fs::set_permissions(&disk, fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::Io(disk.clone(), e))?;
            let disk_bytes = fs::metadata(&disk).map(|m| m.len()).unwrap_or(0);
            write_new(&work.join("config.json"), &image.config)
                .map_err(|e| Error::Io(work.join("config.json"), e))?;
            let meta = json!({
                "digest": image.digest,
                "format": image.format.name(),
                "layers": image.layers.len(),
                "loaded_at": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                "disk_bytes": disk_bytes,
                "unpacked": stats,
            });
            let mut bytes = serde_json::to_vec_pretty(&meta).unwrap_or_default();
            bytes.push(b'\n');
            write_new(&work.join("image.json"), &bytes)
                .map_err(|e| Error::Io(work.join("image.json"), e))?;
            Ok(stats)
        })();
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                let _ = unpack::remove_all(&work);
                return Err(e);
            }
        };
        let _lock = self.lock()?;
        if target.join("rootfs.erofs").is_file() {
            // Another load of the same image finished first.
            let _ = unpack::remove_all(&work);
        } else {
            if target.exists() {
                unpack::remove_all(target).map_err(|e| Error::Io(target.to_path_buf(), e))?;
            }
            fs::rename(&work, target).map_err(|e| Error::Io(target.to_path_buf(), e))?;
        }
        Ok(stats)
    }

    /// Removes `reference`: a name loses that name (and the image goes
    /// when it has no name left); a digest removes the image and every
    /// name it has.
    pub fn remove(&self, reference: &str) -> Result<Removed, Error> {
        let image = self.resolve(reference)?;
        let _lock = self.lock()?;
        let mut repos = self.repositories()?;
        let mut untagged = Vec::new();
        if reference.starts_with("sha256:") {
            repos.retain(|n, d| {
                let keep = *d != image.digest;
                if !keep {
                    untagged.push(n.clone());
                }
                keep
            });
        } else {
            let name = normalize(reference).unwrap_or_default();
            let key = if repos.contains_key(&name) {
                name
            } else {
                format!("localhost/{name}")
            };
            if repos.remove(&key).is_some() {
                untagged.push(key);
            }
        }
        let deleted = !repos.values().any(|d| *d == image.digest);
        self.write_repositories(&repos)?;
        if deleted {
            // Renamed away first, so the image vanishes at once; a VM
            // still running from it keeps its open disk.
            let gone = self.dir.join("tmp").join(format!(
                "rm-{}-{}",
                image.digest.trim_start_matches("sha256:"),
                std::process::id()
            ));
            fs::rename(&image.dir, &gone).map_err(|e| Error::Io(image.dir.clone(), e))?;
            unpack::remove_all(&gone).map_err(|e| Error::Io(gone.clone(), e))?;
        }
        Ok(Removed {
            digest: image.digest,
            untagged,
            deleted,
        })
    }
}

/// What `remove` did.
#[derive(Debug)]
pub struct Removed {
    pub digest: String,
    pub untagged: Vec<String>,
    pub deleted: bool,
}

fn apply_layer(
    unpacker: &mut Unpacker,
    path: &Path,
    n: usize,
    layer: &source::Layer,
) -> Result<(), Error> {
    let bad = |why: String| {
        Error::Source(source::Error::Bad {
            path: path.to_path_buf(),
            why: format!("layer {n}: {why}"),
        })
    };
    let raw = source::open_layer(path, layer).map_err(|e| Error::Io(path.to_path_buf(), e))?;
    let mut blob = source::Hashing::new(raw);
    let mut magic = [0u8; 4];
    let got = read_up_to(&mut blob, &mut magic).map_err(|e| Error::Io(path.to_path_buf(), e))?;
    let head = io::Cursor::new(magic[..got].to_vec());
    let diff = match magic[..got] {
        [0x1f, 0x8b, ..] => {
            let mut tar = source::Hashing::new(flate2::read::GzDecoder::new(head.chain(&mut blob)));
            unpacker.apply_layer(&mut tar)?;
            tar.finish()
                .map_err(|e| bad(format!("cannot decompress: {e}")))?
        }
        [0x28, 0xb5, 0x2f, 0xfd] => {
            return Err(bad(
                "zstd-compressed layers are not supported (gzip or uncompressed only)".into(),
            ))
        }
        _ => {
            let mut tar = source::Hashing::new(head.chain(&mut blob));
            unpacker.apply_layer(&mut tar)?;
            tar.finish().map_err(|e| Error::Io(path.to_path_buf(), e))?
        }
    };
    let blob_digest = blob
        .finish()
        .map_err(|e| Error::Io(path.to_path_buf(), e))?;
    if let Some(want) = &layer.blob_digest {
        if *want != blob_digest {
            return Err(bad(format!(
                "its blob is {blob_digest}, not {want} as the manifest says"
            )));
        }
    }
    if let Some(want) = &layer.diff_id {
        if *want != diff {
            return Err(bad(format!(
                "its content is {diff}, not {want} as the config says"
            )));
        }
    }
    Ok(())
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// A valid `name[:tag]` as stored (`:latest` added), or `None`. Names:
/// 1 ..= 255 bytes of `a-z A-Z 0-9 . _ / : -`, starting with a letter or a
/// digit, never `sha256:`; tags: 1 ..= 128 of `A-Z a-z 0-9 _ . -`, not
/// starting with `.` or `-`.
pub fn normalize(reference: &str) -> Option<String> {
    if reference.starts_with("sha256:") || reference.len() > 255 {
        return None;
    }
    let (name, tag) = match reference.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => (reference, "latest"),
    };
    let name_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_/:".contains(&b))
        && !name.contains("//")
        && !name.ends_with('/');
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && !tag.starts_with(['.', '-'])
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    (name_ok && tag_ok).then(|| format!("{name}:{tag}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::unpack::tests::{file, tar};

    fn hexsha(b: &[u8]) -> String {
        source::sha256(b)["sha256:".len()..].to_owned()
    }

    /// A docker archive of `layers` tagged `tags`, with `env` in its config.
    fn docker_archive(layers: &[Vec<u8>], tags: &[&str], env: &str) -> Vec<u8> {
        let diff_ids: Vec<String> = layers.iter().map(|l| source::sha256(l)).collect();
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": [env], "User": "1000", "WorkingDir": "/app", "Entrypoint": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .expect("json");
        let config_name = format!("{}.json", hexsha(&config));
        let layer_names: Vec<String> = layers
            .iter()
            .map(|l| format!("{}/layer.tar", hexsha(l)))
            .collect();
        let manifest = serde_json::to_vec(&json!([{
            "Config": config_name, "RepoTags": tags, "Layers": layer_names,
        }]))
        .expect("json");
        let mut entries = Vec::new();
        for (n, l) in layer_names.iter().zip(layers) {
            entries.push(file(n, l));
        }
        entries.push(file(&config_name, &config));
        entries.push(file("manifest.json", &manifest));
        tar(&entries)
    }

    /// An OCI archive of `layers` (gzip-compressed), named `name`.
    fn oci_archive(layers: &[Vec<u8>], name: &str) -> Vec<u8> {
        use std::io::Write as _;
        let gz: Vec<Vec<u8>> = layers
            .iter()
            .map(|l| {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(l).expect("gzip");
                e.finish().expect("gzip")
            })
            .collect();
        let config = serde_json::to_vec(&json!({
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| source::sha256(l)).collect::<Vec<_>>()},
        }))
        .expect("json");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "config": {"digest": source::sha256(&config), "size": config.len()},
            "layers": gz.iter().map(|g| json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": source::sha256(g), "size": g.len(),
            })).collect::<Vec<_>>(),
        }))
        .expect("json");
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{"digest": source::sha256(&manifest), "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": name}}],
        }))
        .expect("json");
        let names: Vec<String> = gz
            .iter()
            .map(|g| format!("blobs/sha256/{}", hexsha(g)))
            .collect();
        let cname = format!("blobs/sha256/{}", hexsha(&config));
        let mname = format!("blobs/sha256/{}", hexsha(&manifest));
        let mut entries = vec![
            file("oci-layout", b"{\"imageLayoutVersion\":\"1.0.0\"}"),
            file("index.json", &index),
        ];
        for (n, g) in names.iter().zip(&gz) {
            entries.push(file(n, g));
        }
        entries.push(file(&cname, &config));
        entries.push(file(&mname, &manifest));
        tar(&entries)
    }

    fn mkfs() -> Option<PathBuf> {
        [
            "/usr/bin/mkfs.erofs",
            "/usr/sbin/mkfs.erofs",
            "/sbin/mkfs.erofs",
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    }

    fn setup(name: &str) -> (PathBuf, Store) {
        let d = std::env::temp_dir().join(format!("airlock-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("mkdir");
        let store = Store::open(&d.join("data/airlock/images")).expect("store");
        (d, store)
    }

    fn write(d: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = d.join(name);
        fs::write(&p, bytes).expect("write");
        p
    }

    #[test]
    fn load_ls_resolve_tag_move_and_rm() {
        let Some(mkfs) = mkfs() else {
            eprintln!("skipped: no mkfs.erofs");
            return;
        };
        let (d, store) = setup("cycle");
        let mode = fs::metadata(d.join("data/airlock/images"))
            .expect("dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let l1 = tar(&[file("bin/hello", b"one")]);
        let l2 = tar(&[file("bin/.wh.hello", b""), file("etc/two", b"two")]);
        let a1 = write(
            &d,
            "a1.tar",
            &docker_archive(&[l1.clone(), l2], &["localhost/agent:1"], "A=1"),
        );
        let loaded = store.load(&a1, &mkfs).expect("load");
        assert!(!loaded.existed);
        assert_eq!(loaded.image.names, ["localhost/agent:1"]);
        let first = loaded.image.digest.clone();
        assert!(loaded.image.disk().is_file());
        assert!(!d
            .join("data/airlock/images/tmp")
            .read_dir()
            .expect("tmp")
            .any(|_| true));
        // By name, short name, digest prefix.
        assert_eq!(
            store.resolve("localhost/agent:1").expect("name").digest,
            first
        );
        assert_eq!(store.resolve("agent:1").expect("localhost/").digest, first);
        assert_eq!(store.resolve(&first[..12]).expect("prefix").digest, first);
        assert!(
            matches!(store.resolve("agent"), Err(Error::NotFound(_))),
            "agent:latest is not there"
        );
        // Loading again changes nothing but says so.
        assert!(store.load(&a1, &mkfs).expect("again").existed);
        // A second image with the same tag takes it; the first stays, unnamed.
        let a2 = write(
            &d,
            "a2.tar",
            &docker_archive(&[l1], &["localhost/agent:1", "other"], "A=2"),
        );
        let second = store.load(&a2, &mkfs).expect("load 2").image;
        assert_ne!(second.digest, first);
        assert_eq!(second.names, ["localhost/agent:1", "other:latest"]);
        assert_eq!(
            store.resolve("agent:1").expect("moved").digest,
            second.digest
        );
        let list = store.list().expect("ls");
        assert_eq!(list.len(), 2);
        let old = list.iter().find(|i| i.digest == first).expect("first");
        assert!(old.names.is_empty(), "the tag moved");
        // rm a name: the image keeps its other name; rm its last: it goes.
        let r = store.remove("agent:1").expect("rm name");
        assert_eq!(
            (r.untagged.as_slice(), r.deleted),
            (&["localhost/agent:1".to_owned()][..], false)
        );
        let r = store.remove("other").expect("rm last name");
        assert!(r.deleted);
        assert!(!second.dir.exists());
        // rm by digest.
        let r = store.remove(&first).expect("rm digest");
        assert!(r.deleted && !old.dir.exists());
        assert!(store.list().expect("ls").is_empty());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn an_oci_archive_with_gzip_layers() {
        let Some(mkfs) = mkfs() else {
            return;
        };
        let (d, store) = setup("oci");
        let l1 = tar(&[file("etc/os", b"oci")]);
        let a = write(&d, "o.tar", &oci_archive(&[l1], "localhost/oci:2"));
        let img = store.load(&a, &mkfs).expect("load").image;
        assert_eq!(img.names, ["localhost/oci:2"]);
        let config = crate::image::ImageConfig::from_json(&img.config().expect("config"));
        assert_eq!(config.cmd, ["/bin/true"]);
        // A bare tag names nothing.
        let (d2, store2) = setup("oci-bare");
        let l = tar(&[file("x", b"y")]);
        let a = write(&d2, "o.tar", &oci_archive(&[l], "latest"));
        assert!(store2.load(&a, &mkfs).expect("load").image.names.is_empty());
        let _ = fs::remove_dir_all(&d);
        let _ = fs::remove_dir_all(&d2);
    }

    #[test]
    fn bad_input_changes_nothing() {
        let Some(mkfs) = mkfs() else {
            return;
        };
        let (d, store) = setup("bad");
        let listing = |s: &Store| s.list().expect("ls").len();
        // Not an archive; a plain tar; a layer that does not match its diff_id.
        let text = write(&d, "t.txt", &b"hello\n".repeat(512));
        assert!(matches!(store.load(&text, &mkfs), Err(Error::Archive(_))));
        let plain = write(&d, "p.tar", &tar(&[file("etc/passwd", b"x")]));
        assert!(matches!(store.load(&plain, &mkfs), Err(Error::Archive(_))));
        let l = tar(&[file("a", b"1")]);
        let mut bytes = docker_archive(&[l], &["x:1"], "A=1");
        // Change one byte of the layer's file content ("1" → "2").
        let pos = bytes
            .windows(512)
            .position(|w| w[0] == b'a' && w[1] == 0)
            .map(|p| p + 512)
            .expect("the layer's entry");
        bytes[pos] = b'2';
        let forged = write(&d, "f.tar", &bytes);
        let err = store.load(&forged, &mkfs).expect_err("forged");
        assert!(err.to_string().contains("not sha256:"), "{err}");
        assert_eq!(listing(&store), 0);
        assert!(!d.join("data/airlock/images/repositories.json").exists());
        assert!(!d
            .join("data/airlock/images/tmp")
            .read_dir()
            .expect("tmp")
            .any(|_| true));
        // Unknown, malformed and ambiguous references.
        for r in ["nope", "nope:1", "sha256:abcd"] {
            assert!(matches!(store.resolve(r), Err(Error::NotFound(_))), "{r}");
            assert!(matches!(store.remove(r), Err(Error::NotFound(_))), "{r}");
        }
        for r in [
            "",
            "-x",
            "a b",
            "UP/../x:1:",
            "sha256:ab",
            "sha256:xyz1",
            "x:",
            "x:-t",
        ] {
            assert!(matches!(store.resolve(r), Err(Error::BadRef(_))), "{r:?}");
        }
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn references_are_normalized() {
        assert_eq!(normalize("alpine").as_deref(), Some("alpine:latest"));
        assert_eq!(normalize("localhost/a:1").as_deref(), Some("localhost/a:1"));
        assert_eq!(
            normalize("reg:5000/a").as_deref(),
            Some("reg:5000/a:latest")
        );
        assert_eq!(
            normalize("reg:5000/a:v1.2").as_deref(),
            Some("reg:5000/a:v1.2")
        );
        for bad in [
            "",
            ":x",
            "a:",
            "/a",
            "a/",
            "a//b",
            "a b",
            "sha256:abcd",
            "a:.x",
            "é",
        ] {
            assert_eq!(normalize(bad), None, "{bad:?}");
        }
    }
}
