//! `--image FILE`: checks, before any VM starts, that FILE is a container
//! image archive the guest's podman can load: an uncompressed tar (what
//! `podman save` and `docker save` write) holding either a docker archive
//! (`manifest.json`) or an OCI layout (`oci-layout` and `index.json`).
//!
//! The archive reaches the guest as a read-only virtio-blk disk, which is a
//! whole number of 512-byte sectors: a tar archive always is, so a file of
//! another size is not one. Only the tar headers are read (the contents are
//! skipped with seeks), so a large archive costs a few reads per entry.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// A tar block, in bytes.
const BLOCK_LEN: usize = 512;
/// The same, for file offsets.
const BLOCK: u64 = BLOCK_LEN as u64;
/// Most entries read before giving up: an archive with more is refused.
const MAX_ENTRIES: u64 = 1_000_000;
/// Longest GNU long name (`L` entry) read.
const MAX_LONG_NAME: u64 = 4096;

/// The image formats podman loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `docker save` / `podman save --format docker-archive`.
    Docker,
    /// `podman save --format oci-archive`.
    Oci,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Docker => "docker-archive",
            Format::Oci => "oci-archive",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the image archive {}", .0.display())]
    Read(PathBuf, #[source] io::Error),
    #[error(
        "{} is not an image archive: {why} (expected an uncompressed tar from `podman save` \
         or `docker save`)",
        path.display()
    )]
    NotTar { path: PathBuf, why: String },
    #[error(
        "{} is a tar archive but not a container image: it holds neither manifest.json \
         (docker archive) nor oci-layout and index.json (OCI archive)",
        .0.display()
    )]
    NotImage(PathBuf),
}

/// Checks `path` (see the module docs) and says which format it is.
pub fn check(path: &Path) -> Result<Format, Error> {
    let read_err = |e| Error::Read(path.to_path_buf(), e);
    let file = File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(Error::NotTar {
            path: path.into(),
            why: "not a regular file".into(),
        });
    }
    let len = meta.len();
    if len == 0 || len % BLOCK != 0 {
        return Err(Error::NotTar {
            path: path.into(),
            why: format!("its size ({len} bytes) is not a whole number of 512-byte tar blocks"),
        });
    }
    let names = entry_names(BufReader::new(file), len).map_err(|why| match why {
        Walk::Io(e) => Error::Read(path.to_path_buf(), e),
        Walk::Bad(why) => Error::NotTar {
            path: path.into(),
            why,
        },
    })?;
    let has = |want: &str| names.iter().any(|n| n == want);
    if has("manifest.json") {
        Ok(Format::Docker)
    } else if has("oci-layout") && has("index.json") {
        Ok(Format::Oci)
    } else {
        Err(Error::NotImage(path.into()))
    }
}

enum Walk {
    Io(io::Error),
    Bad(String),
}

impl From<io::Error> for Walk {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Walk::Bad("it ends in the middle of an entry".into())
        } else {
            Walk::Io(e)
        }
    }
}

/// The names of the top-level entries of the tar stream `r` of `len` bytes
/// (`./` stripped; deeper entries are not kept).
fn entry_names<R: Read + Seek>(mut r: R, len: u64) -> Result<Vec<String>, Walk> {
    let mut names = Vec::new();
    let mut long_name: Option<String> = None;
    let mut pos = 0u64;
    let mut header = [0u8; BLOCK_LEN];
    for _ in 0..MAX_ENTRIES {
        if pos + BLOCK > len {
            return Err(Walk::Bad("it has no end-of-archive marker".into()));
        }
        r.read_exact(&mut header)?;
        pos += BLOCK;
        if header.iter().all(|&b| b == 0) {
            return Ok(names);
        }
        if &header[257..262] != b"ustar" {
            return Err(Walk::Bad(format!("no tar header at byte {}", pos - BLOCK)));
        }
        if !checksum_ok(&header) {
            return Err(Walk::Bad(format!(
                "bad tar header checksum at byte {}",
                pos - BLOCK
            )));
        }
        let size = parse_size(&header[124..136])
            .ok_or_else(|| Walk::Bad(format!("bad size field at byte {}", pos - BLOCK)))?;
        let padded = size
            .checked_add(BLOCK - 1)
            .map(|s| s / BLOCK * BLOCK)
            .filter(|p| pos.checked_add(*p).is_some_and(|end| end <= len))
            .ok_or_else(|| Walk::Bad("an entry runs past the end of the file".into()))?;
        match header[156] {
            b'L' => {
                if size > MAX_LONG_NAME {
                    return Err(Walk::Bad("a long name is too long".into()));
                }
                let mut name = vec![0u8; usize::try_from(size).unwrap_or(0)];
                r.read_exact(&mut name)?;
                r.seek(SeekFrom::Current(i64::try_from(padded - size).unwrap_or(0)))?;
                long_name = Some(c_string(&name));
            }
            _ => {
                let name = long_name.take().unwrap_or_else(|| {
                    let base = c_string(&header[0..100]);
                    let prefix = c_string(&header[345..500]);
                    if prefix.is_empty() || &header[257..263] != b"ustar\0" {
                        base
                    } else {
                        format!("{prefix}/{base}")
                    }
                });
                let name = name.trim_start_matches("./").trim_end_matches('/');
                if !name.is_empty() && !name.contains('/') {
                    names.push(name.to_owned());
                }
                r.seek(SeekFrom::Current(
                    i64::try_from(padded).map_err(|_| Walk::Bad("entry too large".into()))?,
                ))?;
            }
        }
        pos += padded;
    }
    Err(Walk::Bad(format!("more than {MAX_ENTRIES} entries")))
}

/// The bytes up to the first NUL, as text (lossy).
fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// A tar size field: octal digits (NUL/space padded), or GNU base-256
/// (high bit of the first byte set).
fn parse_size(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ')
        .take_while(|&b| b != 0 && b != b' ')
        .collect();
    if digits.is_empty() || !digits.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&digits).ok()?, 8).ok()
}

/// The header checksum: the sum of its bytes with the checksum field read
/// as spaces.
fn checksum_ok(header: &[u8; BLOCK_LEN]) -> bool {
    let Some(stored) = parse_size(&header[148..156]) else {
        return false;
    };
    let sum: u64 = header
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    sum == stored
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A ustar header for `name` with `size` bytes of content.
    fn header(name: &str, size: u64, kind: u8) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        let size = format!("{size:011o}");
        h[124..135].copy_from_slice(size.as_bytes());
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        h
    }

    fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in entries {
            out.extend(header(name, data.len() as u64, b'0'));
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend(vec![0u8; 1024]);
        out
    }

    fn check_bytes(name: &str, bytes: &[u8]) -> Result<Format, Error> {
        let dir = std::env::temp_dir().join(format!("airlock-archive-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        File::create(&path)
            .and_then(|mut f| f.write_all(bytes))
            .expect("write test file");
        let r = check(&path);
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn docker_and_oci_archives_are_recognised() {
        let docker = tar(&[
            ("abc/layer.tar", &[7u8; 600]),
            ("manifest.json", b"[]"),
            ("repositories", b"{}"),
        ]);
        assert_eq!(check_bytes("d.tar", &docker).ok(), Some(Format::Docker));
        let oci = tar(&[
            ("./oci-layout", b"{}"),
            ("./index.json", b"{}"),
            ("./blobs/sha256/aa", b"x"),
        ]);
        assert_eq!(check_bytes("o.tar", &oci).ok(), Some(Format::Oci));
    }

    #[test]
    fn other_files_are_refused_with_the_reason() {
        let plain = tar(&[("etc/passwd", b"root"), ("hello", b"hi")]);
        assert!(matches!(
            check_bytes("p.tar", &plain),
            Err(Error::NotImage(_))
        ));
        let err = check_bytes("t.txt", &[b'x'; 1024]).expect_err("refused");
        assert!(err.to_string().contains("no tar header"), "{err}");
        let err = check_bytes("odd", b"hello").expect_err("refused");
        assert!(err.to_string().contains("512-byte"), "{err}");
        let mut truncated = tar(&[("manifest.json", &[1u8; 4000])]);
        truncated.truncate(1024);
        let err = check_bytes("cut.tar", &truncated).expect_err("refused");
        assert!(err.to_string().contains("past the end"), "{err}");
        let mut bad_sum = tar(&[("manifest.json", b"[]")]);
        bad_sum[0] = b'M';
        let err = check_bytes("sum.tar", &bad_sum).expect_err("refused");
        assert!(err.to_string().contains("checksum"), "{err}");
        let err = check(Path::new("/nonexistent/image.tar")).expect_err("refused");
        assert!(err.to_string().contains("/nonexistent/image.tar"), "{err}");
    }

    #[test]
    fn sizes_in_octal_and_base_256() {
        assert_eq!(parse_size(b"00000001750\0"), Some(1000));
        assert_eq!(parse_size(b"     1750 \0\0"), Some(1000));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 1;
        big[10] = 1;
        assert_eq!(parse_size(&big), Some(257));
        assert_eq!(parse_size(b"12x\0\0\0\0\0\0\0\0\0"), None);
        assert_eq!(parse_size(b"\0\0\0\0\0\0\0\0\0\0\0\0"), None);
    }
}
