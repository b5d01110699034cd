//! Ed25519 keys that seal an audit log, in a deliberately simple format.
//!
//! - Private key file: the 32-byte Ed25519 seed as 64 hex digits, on one
//!   line (a trailing newline is allowed). It must not be readable by group
//!   or others (mode 0600, as `airlock audit keygen` writes it).
//! - Public key file: the 32-byte Ed25519 public key as 64 hex digits.
//!
//! The seal signs [`seal_message`] of the hash of the `run.end` record,
//! which chains every record before it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use super::record::{hex, unhex};

/// Largest key file we read.
const MAX_KEY_FILE: u64 = 4096;

/// Why a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the key file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the key file {} is not 64 hex digits (an Ed25519 {what})", path.display())]
    Format { path: PathBuf, what: &'static str },
    #[error("the key file {} is not a valid Ed25519 public key", path.display())]
    PublicKey { path: PathBuf },
    #[error(
        "the private key file {} can be read by group or others (mode {mode:o}); chmod 600 it",
        path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("cannot write the key file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot get random bytes for a new key")]
    Random(#[source] io::Error),
}

/// The bytes the seal's signature covers: a domain tag, then the hex
/// sha256 of the `run.end` record.
pub fn seal_message(run_end_hash: &str) -> Vec<u8> {
    let mut message = b"airlock audit seal v1\n".to_vec();
    message.extend_from_slice(run_end_hash.as_bytes());
    message
}

/// Signs the seal message for `run_end_hash`; the signature in hex.
pub fn sign(key: &SigningKey, run_end_hash: &str) -> String {
    hex(&key.sign(&seal_message(run_end_hash)).to_bytes())
}

/// Whether `signature_hex` is `key`'s signature of the seal message.
pub fn verify(key: &VerifyingKey, run_end_hash: &str, signature_hex: &str) -> bool {
    let Some(bytes) = unhex(signature_hex, true) else {
        return false;
    };
    let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else {
        return false;
    };
    let signature = Signature::from_bytes(&bytes);
    key.verify_strict(&seal_message(run_end_hash), &signature)
        .is_ok()
}

/// A public key in hex.
pub fn public_hex(key: &VerifyingKey) -> String {
    hex(key.as_bytes())
}

/// A public key from its hex form.
pub fn public_from_hex(text: &str) -> Option<VerifyingKey> {
    let bytes = <[u8; 32]>::try_from(unhex(text, true)?.as_slice()).ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// The 32 bytes of a key file holding 64 hex digits.
fn read_32(path: &Path, what: &'static str) -> Result<[u8; 32], Error> {
    let read_error = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut text = String::new();
    File::open(path)
        .map_err(read_error)?
        .take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    let format = || Error::Format {
        path: path.to_path_buf(),
        what,
    };
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let bytes = unhex(text, false).ok_or_else(format)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| format())
}

/// Loads a private key (`--audit-key`), refusing one others can read.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, Error> {
    let meta = fs::metadata(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let seed = read_32(path, "private key seed")?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Loads a public key (`audit verify --key`).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, Error> {
    let bytes = read_32(path, "public key")?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| Error::PublicKey {
        path: path.to_path_buf(),
    })
}

/// The public key file that goes with private key file `private`.
pub fn public_path(private: &Path) -> PathBuf {
    let mut name = private.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

fn write_new(path: &Path, mode: u32, text: &str) -> Result<(), Error> {
    let write_error = |source| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_error)?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_error)
}

/// A new key from the kernel's random source.
pub fn generate() -> Result<SigningKey, Error> {
    let mut seed = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(Error::Random)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes a new key pair: `private` (mode 0600) and `private.pub`. Refuses
/// to overwrite either.
pub fn keygen(private: &Path) -> Result<(PathBuf, VerifyingKey), Error> {
    let key = generate()?;
    let public = public_path(private);
    if public.exists() {
        return Err(Error::Write {
            path: public,
            source: io::ErrorKind::AlreadyExists.into(),
        });
    }
    write_new(private, 0o600, &format!("{}\n", hex(&key.to_bytes())))?;
    let verifying = key.verifying_key();
    write_new(&public, 0o644, &format!("{}\n", public_hex(&verifying)))?;
    Ok((public, verifying))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::TestDir;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sign_and_verify() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let hash = super::super::record::sha256_hex(b"run.end");
        let sig = sign(&key, &hash);
        assert!(verify(&key.verifying_key(), &hash, &sig));
        assert!(!verify(&other.verifying_key(), &hash, &sig));
        let other_hash = super::super::record::sha256_hex(b"run.end!");
        assert!(!verify(&key.verifying_key(), &other_hash, &sig));
        assert!(!verify(&key.verifying_key(), &hash, "00"));
        assert!(!verify(&key.verifying_key(), &hash, &sig.to_uppercase()));
        let pk = public_hex(&key.verifying_key());
        assert_eq!(public_from_hex(&pk), Some(key.verifying_key()));
        assert_eq!(public_from_hex("abcd"), None);
    }

    #[test]
    fn keygen_writes_a_pair_that_loads() {
        let dir = TestDir::new("keygen");
        let private = dir.path().join("audit.key");
        let (public, verifying) = keygen(&private).expect("keygen");
        assert_eq!(public, dir.path().join("audit.key.pub"));
        let mode = fs::metadata(&private).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let key = load_signing_key(&private).expect("private");
        assert_eq!(key.verifying_key(), verifying);
        assert_eq!(load_verifying_key(&public).expect("public"), verifying);
        // Never overwritten.
        assert!(matches!(keygen(&private), Err(Error::Write { .. })));
        fs::remove_file(&private).expect("rm");
        assert!(matches!(keygen(&private), Err(Error::Write { .. })));
    }

    #[test]
    fn bad_key_files() {
        let dir = TestDir::new("badkeys");
        let path = dir.path().join("k");
        fs::write(&path, "not hex\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(load_signing_key(&path), Err(Error::Format { .. })));
        fs::write(&path, format!("{}\n", "ab".repeat(32))).expect("write");
        assert!(load_signing_key(&path).is_ok());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_signing_key(&path).expect_err("world-readable");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        fs::write(&path, "ab".repeat(31)).expect("write");
        assert!(matches!(
            load_verifying_key(&path),
            Err(Error::Format { .. })
        ));
        assert!(matches!(
            load_verifying_key(&dir.path().join("missing")),
            Err(Error::Read { .. })
        ));
    }
}
