//! The sha256 of what a run boots: the kernel, the initrd, and the init
//! binary inside the initrd (found by walking its `newc` cpio headers in
//! the same single pass that hashes the whole file).

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::record::hex;

/// A file's sha256 and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub sha256: String,
    pub bytes: u64,
}

/// The initrd's digest, and its init's if one was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitrdDigest {
    pub whole: FileDigest,
    /// The path of the init inside the archive, and its digest.
    pub init: Option<(String, FileDigest)>,
}

/// Passes reads through, hashing and counting every byte.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(read) = buf.get(..n) {
            self.hasher.update(read);
        }
        self.bytes += u64::try_from(n).unwrap_or(u64::MAX);
        Ok(n)
    }
}

impl<R: Read> Hashing<R> {
    fn new(inner: R) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Reads to the end and returns the digest of everything read.
    fn finish(mut self) -> io::Result<FileDigest> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(FileDigest {
            sha256: hex(&self.hasher.finalize()),
            bytes: self.bytes,
        })
    }
}

/// The sha256 of a file.
#[cfg(test)]
pub fn file(path: &Path) -> io::Result<FileDigest> {
    Hashing::new(BufReader::with_capacity(64 * 1024, File::open(path)?)).finish()
}

/// The sha256 of a file, remembered in `cache` (a directory, created mode
/// 0700) under the file's identity: device, inode, size, mtime and ctime,
/// to the nanosecond. Any write to the file changes its mtime and ctime,
/// and nobody but root can set a ctime, so a file that kept its identity
/// kept its bytes. A large root image is then hashed once, not on every
/// run (on hardware KVM the hash would cost more than the boot). Without a
/// usable cache it just hashes.
pub fn file_cached(path: &Path, cache: Option<&Path>) -> io::Result<FileDigest> {
    use std::os::unix::fs::MetadataExt;
    let file = File::open(path)?;
    let meta = file.metadata()?;
    let identity = format!(
        "airlock-digest-v1 {} {} {} {}.{} {}.{}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    let entry = cache.map(|dir| dir.join(&hex(&Sha256::digest(identity.as_bytes()))[..32]));
    if let Some(entry) = &entry {
        if let Some(d) = std::fs::read_to_string(entry)
            .ok()
            .and_then(|text| parse_entry(&text, meta.len()))
        {
            return Ok(d);
        }
    }
    let d = Hashing::new(BufReader::with_capacity(64 * 1024, file)).finish()?;
    if let (Some(dir), Some(entry)) = (cache, &entry) {
        // Best effort: a cache that cannot be written only costs time.
        let _ = remember(dir, entry, &d);
    }
    Ok(d)
}

/// A cache entry: `<64 hex digits> <size>\n`, for a file of `size` bytes.
fn parse_entry(text: &str, size: u64) -> Option<FileDigest> {
    let (sha, bytes) = text.trim_end().split_once(' ')?;
    let ok = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
    (ok && bytes.parse::<u64>().ok()? == size).then(|| FileDigest {
        sha256: sha.to_ascii_lowercase(),
        bytes: size,
    })
}

fn remember(dir: &Path, entry: &Path, d: &FileDigest) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = entry.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(format!("{} {}\n", d.sha256, d.bytes).as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, entry).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The names under which a cpio archive holds the init the kernel runs.
const INIT_NAMES: [&str; 2] = ["init", "./init"];
/// The longest name we read from a cpio header.
const MAX_NAME: u64 = 4096;

/// One `newc` header's file size, name size and mode, or `None` at a
/// header that is not `newc` (or the end of the input).
fn header<R: Read>(r: &mut R) -> Option<(u64, u64, u32)> {
    let mut h = [0u8; 110];
    r.read_exact(&mut h).ok()?;
    if !(h.starts_with(b"070701") || h.starts_with(b"070702")) {
        return None;
    }
    let field = |i: usize| -> Option<u64> {
        let text = std::str::from_utf8(h.get(6 + 8 * i..6 + 8 * (i + 1))?).ok()?;
        u64::from_str_radix(text, 16).ok()
    };
    let mode = u32::try_from(field(1)?).ok()?;
    Some((field(6)?, field(11)?, mode))
}

/// Skips `n` bytes of `r`.
fn skip<R: Read>(r: &mut R, n: u64) -> Option<()> {
    let copied = io::copy(&mut r.by_ref().take(n), &mut io::sink()).ok()?;
    (copied == n).then_some(())
}

/// Padding after `len` bytes to the next multiple of 4.
fn pad4(len: u64) -> u64 {
    (4 - len % 4) % 4
}

/// Walks the archive to the init entry and hashes it; `None` if the
/// archive is not an uncompressed `newc` cpio or holds no init.
fn find_init<R: Read>(r: &mut R) -> Option<(String, FileDigest)> {
    loop {
        let (size, name_size, mode) = header(r)?;
        if name_size == 0 || name_size > MAX_NAME {
            return None;
        }
        let mut name = Vec::new();
        r.by_ref().take(name_size).read_to_end(&mut name).ok()?;
        skip(r, pad4(110 + name_size))?;
        let name = String::from_utf8_lossy(name.strip_suffix(b"\0")?).into_owned();
        if name == "TRAILER!!!" {
            return None;
        }
        let regular = mode & 0o170_000 == 0o100_000;
        if regular && INIT_NAMES.contains(&name.as_str()) {
            let digest = Hashing::new(r.by_ref().take(size)).finish().ok()?;
            return (digest.bytes == size).then_some((name, digest));
        }
        skip(r, size + pad4(size))?;
    }
}

/// The initrd's sha256 and, when it is an uncompressed `newc` cpio archive
/// with an `init`, that init's.
pub fn initrd(path: &Path) -> io::Result<InitrdDigest> {
    let mut reader = Hashing::new(BufReader::with_capacity(64 * 1024, File::open(path)?));
    let init = find_init(&mut reader);
    Ok(InitrdDigest {
        whole: reader.finish()?,
        init,
    })
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn a_cached_digest_is_used_until_the_file_changes() {
        let dir = crate::paths::TestDir::new("digest-cache");
        let path = dir.path().join("image");
        let cache = dir.path().join("cache");
        std::fs::write(&path, b"first").expect("write");
        let first = file_cached(&path, Some(&cache)).expect("hash");
        assert_eq!(first, file(&path).expect("hash"));
        assert_eq!(std::fs::read_dir(&cache).expect("cache").count(), 1);
        // Poison the entry: a second call must trust it (proving it is
        // used) as long as the file is the same.
        let entry = std::fs::read_dir(&cache)
            .expect("cache")
            .next()
            .expect("entry")
            .expect("entry")
            .path();
        let forged = format!("{} 5\n", "ab".repeat(32));
        std::fs::write(&entry, &forged).expect("write");
        assert_eq!(
            file_cached(&path, Some(&cache)).expect("hash").sha256,
            "ab".repeat(32)
        );
        // Any write changes the identity: hashed again.
        std::fs::write(&path, b"other").expect("write");
        let again = file_cached(&path, Some(&cache)).expect("hash");
        assert_eq!(again, file(&path).expect("hash"));
        assert_ne!(again.sha256, "ab".repeat(32));
        // A malformed entry or no cache: hashed.
        assert_eq!(parse_entry("zz 5", 5), None);
        assert_eq!(parse_entry(&forged, 6), None);
        assert_eq!(file_cached(&path, None).expect("hash"), again);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::sha256_hex;

    /// A `newc` entry.
    fn entry(name: &str, mode: u32, data: &[u8]) -> Vec<u8> {
        let name_size = name.len() + 1;
        let mut out = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name_size,
            0
        )
        .into_bytes();
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(
            out.len() + usize::try_from(pad4(110 + name_size as u64)).expect("small"),
            0,
        );
        out.extend_from_slice(data);
        out.resize(
            out.len() + usize::try_from(pad4(data.len() as u64)).expect("small"),
            0,
        );
        out
    }

    fn archive(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, mode, data) in entries {
            out.extend(entry(name, *mode, data));
        }
        out.extend(entry("TRAILER!!!", 0, b""));
        out
    }

    #[test]
    fn finds_and_hashes_the_init() {
        let dir = crate::paths::TestDir::new("digest");
        let path = dir.path().join("initrd.cpio");
        let bytes = archive(&[
            ("bin", 0o040_755, b""),
            ("bin/busybox", 0o100_755, b"busybox bytes!"),
            ("sbin/init", 0o120_777, b"/init"),
            ("init", 0o100_755, b"the init binary"),
            ("zzz", 0o100_644, b"after"),
        ]);
        std::fs::write(&path, &bytes).expect("write");
        let d = initrd(&path).expect("digest");
        assert_eq!(d.whole.sha256, sha256_hex(&bytes));
        assert_eq!(d.whole.bytes, u64::try_from(bytes.len()).expect("small"));
        let (name, init) = d.init.expect("init found");
        assert_eq!(name, "init");
        assert_eq!(init.sha256, sha256_hex(b"the init binary"));
        assert_eq!(file(&path).expect("file").sha256, sha256_hex(&bytes));
    }

    #[test]
    fn no_init_in_other_archives() {
        let dir = crate::paths::TestDir::new("digest-none");
        let path = dir.path().join("x");
        let bytes = archive(&[("bin/sh", 0o100_755, b"sh")]);
        std::fs::write(&path, &bytes).expect("write");
        let d = initrd(&path).expect("digest");
        assert_eq!(d.init, None);
        assert_eq!(d.whole.sha256, sha256_hex(&bytes));
        // A compressed (or any other) file: just its hash.
        std::fs::write(&path, b"\x1f\x8b\x08 gzip-ish").expect("write");
        let d = initrd(&path).expect("digest");
        assert_eq!(d.init, None);
        assert_eq!(d.whole.sha256, sha256_hex(b"\x1f\x8b\x08 gzip-ish"));
        // A truncated init entry is not reported.
        let mut cut = archive(&[("init", 0o100_755, b"0123456789")]);
        cut.truncate(120);
        std::fs::write(&path, &cut).expect("write");
        assert_eq!(initrd(&path).expect("digest").init, None);
    }
}
