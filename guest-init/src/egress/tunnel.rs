//! One tunnel to the host's egress door: the request, the verdict, then
//! bytes both ways.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;

use airlock_protocol::egress::{Reply, Request, Status};
use airlock_protocol::{EGRESS_PORT, HOST_CID};

use super::HOST_TIMEOUT;
use crate::vsock::VsockStream;

/// After the host's side of a tunnel ended, how long the client may stay
/// silent before its side is ended too.
const AFTER_CLOSE: std::time::Duration = std::time::Duration::from_secs(60);

/// Opens a tunnel: `Ok(Ok(stream))` once the host connected,
/// `Ok(Err(reply))` when it refused (the reply says why), `Err` when the
/// door itself failed.
pub fn open(req: &Request) -> io::Result<Result<VsockStream, Reply>> {
    let bytes = req
        .encode()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut host = VsockStream::connect(HOST_CID, EGRESS_PORT)?;
    host.write_all(&bytes)?;
    host.set_read_timeout(Some(HOST_TIMEOUT))?;
    let reply = Reply::read(&mut host)?
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    host.set_read_timeout(None)?;
    Ok(match reply.status {
        Status::Ok => Ok(host),
        _ => Err(reply),
    })
}

/// Copies bytes both ways between the agent's `client` and the `host`
/// tunnel (`first`: bytes the client already sent, passed on first) until
/// both directions are closed; a half-close is passed on.
pub fn splice(client: &TcpStream, host: &VsockStream, first: &[u8]) {
    let (Ok(mut c_read), Ok(mut h_write)) = (client.try_clone(), host.try_clone()) else {
        return;
    };
    let first = first.to_vec();
    let up = thread::Builder::new()
        .name("egress-up".into())
        .spawn(move || {
            if h_write.write_all(&first).is_ok() {
                let _ = copy(&mut c_read, &mut h_write);
            }
            let _ = h_write.shutdown_write();
        });
    let (Ok(mut h_read), Ok(mut c_write)) = (host.try_clone(), client.try_clone()) else {
        return;
    };
    let _ = copy(&mut h_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Write);
    // The host's side is done: the client may still send (a half-close),
    // but not hold its slot in silence for ever.
    let _ = client.set_read_timeout(Some(AFTER_CLOSE));
    match up {
        Ok(up) => {
            let _ = up.join();
        }
        Err(_) => {
            let _ = client.shutdown(Shutdown::Both);
        }
    }
}

/// `io::copy` with a 32 KiB buffer (vsock writes are capped anyway).
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 32 * 1024];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}
