//! The vsock device's guest-facing code: TX packets read from a hostile
//! descriptor chain (`packet::read_tx`), RX packets written into one
//! (`packet::RxBuffer`), and the connection state machine behind them
//! (`muxer::Muxer`: connects, data, credit, shutdown, resets) with live
//! Unix sockets on the host side, including a host client's `CONNECT` line.
//!
//! Input: a descriptor table and guest memory (see common/chain.rs) whose
//! first two chains are one TX and one RX packet; after a 0xff separator, a
//! sequence of packets fed to the muxer directly (44-byte header, then
//! `len` payload bytes), bytes a host peer sends, and a `CONNECT` line.

#![no_main]

#[path = "common/chain.rs"]
mod chain;

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use airlock_vmm::devices::virtio::vsock::muxer::{Muxer, HOST_CID};
use airlock_vmm::devices::virtio::vsock::packet::{read_tx, Header, RxBuffer, MAX_PKT_DATA};
use libfuzzer_sys::fuzz_target;

const GUEST_CID: u64 = 3;
/// A vsock packet header on the wire.
const PKT_HEADER_SIZE: usize = 44;
/// The host port with a listener behind it.
const HOST_PORT: u32 = 1024;

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("airlock-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&d);
    d
}

fn drain(m: &mut Muxer) {
    // Bounded: each call yields at most one packet.
    for _ in 0..256 {
        match m.next_rx(MAX_PKT_DATA) {
            Some((h, data)) => assert!(data.len() <= MAX_PKT_DATA && h.dst_cid == GUEST_CID),
            None => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (device_part, mux_part) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let d = dir();
    let uds = d.join("v");
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(d.join(format!("v_{HOST_PORT}")));
    let Ok(host) = UnixListener::bind(d.join(format!("v_{HOST_PORT}"))) else {
        return;
    };
    let _ = host.set_nonblocking(true);
    let Ok(mut m) = Muxer::new(GUEST_CID, uds.clone()) else {
        return;
    };

    // 1. The guest's rings.
    if let Some((mem, mut queue)) = chain::guest(device_part, &[0, 1]) {
        if let Some(tx) = chain::pop(&mut queue, &mem) {
            if let Ok((h, payload)) = read_tx(&mem, tx) {
                assert!(payload.len() <= MAX_PKT_DATA);
                m.on_guest_packet(&h, &payload);
            }
        }
        if let Some(rx) = chain::pop(&mut queue, &mem) {
            if let Ok(buf) = RxBuffer::new(&mem, rx) {
                let cap = buf.capacity();
                if let Some((h, payload)) = m.next_rx(cap) {
                    assert!(payload.len() <= cap);
                    let _ = buf.write(h, &payload);
                }
            }
        }
    }

    // 2. The state machine, packet by packet.
    let mut rest = mux_part;
    let mut peers: Vec<UnixStream> = Vec::new();
    for _ in 0..64 {
        if rest.len() < PKT_HEADER_SIZE {
            break;
        }
        let raw: [u8; PKT_HEADER_SIZE] = chain::take(&mut rest, PKT_HEADER_SIZE)
            .try_into()
            .expect("header size");
        let mut h = Header::from_bytes(&raw);
        // Mostly well-addressed packets, so the state machine gets deep.
        if raw[0] & 1 == 0 {
            h.src_cid = GUEST_CID;
            h.dst_cid = HOST_CID;
            h.type_ = 1;
        }
        if raw[4] & 1 == 0 {
            h.dst_port = HOST_PORT;
        }
        let len = (h.len as usize).min(rest.len()).min(MAX_PKT_DATA);
        let payload = chain::take(&mut rest, len);
        m.on_guest_packet(&h, payload);
        // The host side accepts and answers with a few bytes.
        while let Ok((mut s, _)) = host.accept() {
            let _ = s.set_nonblocking(true);
            let _ = s.write_all(&raw[..(raw[5] as usize % 16)]);
            peers.push(s);
        }
        drain(&mut m);
        if raw[6] & 3 == 0 {
            peers.clear(); // the host closes its ends
            drain(&mut m);
        }
    }

    // 3. A host client's handshake line.
    if !rest.is_empty() {
        if let Ok(mut client) = UnixStream::connect(&uds) {
            let _ = client.write_all(chain::take(&mut rest, 40));
            m.accept();
            for (fd, _, _) in m.interests(true) {
                if m.is_connecting(fd) {
                    m.on_connect_line(fd);
                }
            }
            drain(&mut m);
        }
    }
    assert!(m.connections() <= 64);
});
