//! virtio-blk request parsing and execution (`block::request::execute`)
//! against a hostile descriptor chain (see common/chain.rs) and an
//! 8-sector disk in memory. Whatever the chain says, the disk never grows,
//! and a read-only disk never changes.

#![no_main]

#[path = "common/chain.rs"]
mod chain;

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::FromRawFd;

use airlock_vmm::devices::virtio::block::request::{execute, Disk, MAX_REQUEST_BYTES};
use libfuzzer_sys::fuzz_target;

const SECTORS: u64 = 8;

fn disk(read_only: bool) -> Option<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: memfd_create returned this fd and nothing else owns it.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let content: Vec<u8> = (0..SECTORS as u8).flat_map(|s| [s; 512]).collect();
    file.write_all(&content).ok()?;
    let _ = read_only;
    Some(file)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let read_only = mode & 1 == 1;
    let Some(file) = disk(read_only) else {
        return;
    };
    let Ok(mut check) = file.try_clone() else {
        return;
    };
    let mut d = Disk {
        file,
        capacity: SECTORS,
        read_only,
    };
    let Some((mem, mut queue)) = chain::guest(rest, &[u16::from(mode >> 1), u16::from(mode >> 5)])
    else {
        return;
    };
    for _ in 0..2 {
        if let Some(c) = chain::pop(&mut queue, &mem) {
            let (used, _) = execute(&mem, c, &mut d);
            assert!(used as usize <= MAX_REQUEST_BYTES + 1, "used {used}");
        }
    }
    let mut after = Vec::new();
    check.rewind().expect("rewind");
    check.read_to_end(&mut after).expect("read");
    assert_eq!(after.len() as u64, SECTORS * 512, "the disk changed size");
    if read_only {
        let before: Vec<u8> = (0..SECTORS as u8).flat_map(|s| [s; 512]).collect();
        assert_eq!(after, before, "a read-only disk was written");
    }
});
