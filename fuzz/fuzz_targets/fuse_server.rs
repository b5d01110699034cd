//! The live mounts' share server (broker/src/share/): arbitrary bytes as
//! the FUSE requests a hostile guest kernel sends on a mount connection,
//! after a valid `FUSE_INIT`, served by the passthrough file system under
//! our rules on a scratch tree. It must never panic, every reply it sends
//! must be a well-formed FUSE reply within the bounds, and nothing outside
//! the shared directory may change: a file beside it keeps its content and
//! no entry appears next to it.
//!
//! The broker is a binary crate: the two modules are compiled in here from
//! their files.

#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use fuse_backend_rs::api::server::Server;
use libfuzzer_sys::fuzz_target;

#[path = "../../broker/src/share/fs.rs"]
#[allow(dead_code)]
mod fs;
#[path = "../../broker/src/share/serve.rs"]
#[allow(dead_code)]
mod serve;

use fs::Share;

/// The scratch tree: `base/share` is served, `base/outside.txt` must stay.
fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("airlock-fuzz-fuse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("share/sub")).expect("scratch");
        std::fs::write(base.join("share/a.txt"), "hello").expect("scratch");
        std::fs::write(base.join("share/.env"), "SECRET").expect("scratch");
        std::fs::write(base.join("outside.txt"), "untouched").expect("scratch");
        std::os::unix::fs::symlink(base.join("outside.txt"), base.join("share/link"))
            .expect("scratch");
        base
    })
}

fn init_request() -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&56u32.to_le_bytes());
    m.extend_from_slice(&26u32.to_le_bytes()); // FUSE_INIT
    m.extend_from_slice(&1u64.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&[0u8; 16]);
    for v in [7u32, 31, 131072, 0] {
        m.extend_from_slice(&v.to_le_bytes());
    }
    m
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let deny: fs::Deny = Box::new(|name| name.to_string_lossy().starts_with(".env"));
    let Ok(share) = Share::new(base.join("share").to_str().expect("utf-8"), data.first() == Some(&1), deny, (0, 0), fs::Limits { max_write_bytes: 64 << 20, max_created: 10_000 }) else {
        return;
    };
    let server = Server::new(Arc::new(share));
    let mut input = init_request();
    input.extend_from_slice(data);
    let mut reader: &[u8] = &input;
    let mut replies = Vec::new();
    let undecodable = std::sync::atomic::AtomicU64::new(0);
    // Two workers: replies from both must still come out whole.
    let _ = serve::serve(&mut reader, &mut replies, &server, 2, &undecodable);
    // Replies: a sequence of whole FUSE replies within the bounds.
    let mut rest = &replies[..];
    while !rest.is_empty() {
        assert!(rest.len() >= 16, "a torn reply header");
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        assert!((16..=(1 << 20) + 4096).contains(&len), "reply length {len}");
        assert!(len <= rest.len(), "a torn reply");
        rest = &rest[len..];
    }
    // Nothing outside the share changed.
    assert_eq!(std::fs::read_to_string(base.join("outside.txt")).expect("outside.txt"), "untouched");
    let mut names: Vec<_> = std::fs::read_dir(base)
        .expect("base")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["outside.txt", "share"]);
});
