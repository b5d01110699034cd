//! The SOCKS5 listener on 127.0.0.1:1080 (RFC 1928): no authentication,
//! `CONNECT` only, destinations by name (`socks5h://`) or address, each a
//! tunnel through the egress door. The handshake must come whole within
//! [`HEAD_DEADLINE`]; anything malformed ends the connection (with the
//! RFC's reply code where there is one).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, TcpStream};
use std::time::Instant;

use airlock_protocol::egress::{Kind, Request, Status};

use super::{tunnel, HEAD_DEADLINE};
use crate::console;

/// Reply codes (RFC 1928 section 6).
pub const GENERAL_FAILURE: u8 = 1;
pub const NOT_ALLOWED: u8 = 2;
pub const HOST_UNREACHABLE: u8 = 4;
pub const CONNECTION_REFUSED: u8 = 5;
pub const COMMAND_NOT_SUPPORTED: u8 = 7;
pub const ADDRESS_NOT_SUPPORTED: u8 = 8;

/// The SOCKS reply code of a host refusal.
pub fn code_of(status: Status) -> u8 {
    match status {
        Status::Ok => 0,
        Status::Denied => NOT_ALLOWED,
        Status::NoSuchHost | Status::Unreachable => HOST_UNREACHABLE,
        Status::Refused => CONNECTION_REFUSED,
        Status::Limit | Status::Bad => GENERAL_FAILURE,
    }
}

/// A handshake that went wrong: the reply code to send, if any, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Failed(pub Option<u8>, pub String);

/// Reads the greeting and the request; answers the method choice on
/// `out`. Returns the destination.
pub fn handshake(r: &mut impl Read, out: &mut impl Write) -> Result<(String, u16), Failed> {
    let io = |e: io::Error| Failed(None, format!("handshake: {e}"));
    let mut head = [0u8; 2];
    r.read_exact(&mut head).map_err(io)?;
    if head[0] != 5 {
        return Err(Failed(None, format!("not SOCKS5 (version {})", head[0])));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    r.read_exact(&mut methods).map_err(io)?;
    if !methods.contains(&0) {
        let _ = out.write_all(&[5, 0xff]);
        return Err(Failed(None, "no acceptable method (only no-auth)".into()));
    }
    out.write_all(&[5, 0]).map_err(io)?;
    let mut req = [0u8; 4];
    r.read_exact(&mut req).map_err(io)?;
    if req[0] != 5 {
        return Err(Failed(Some(GENERAL_FAILURE), "bad request version".into()));
    }
    if req[1] != 1 {
        return Err(Failed(
            Some(COMMAND_NOT_SUPPORTED),
            format!("command {} (CONNECT only)", req[1]),
        ));
    }
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            r.read_exact(&mut a).map_err(io)?;
            Ipv4Addr::from(a).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            r.read_exact(&mut len).map_err(io)?;
            let mut name = vec![0u8; usize::from(len[0])];
            r.read_exact(&mut name).map_err(io)?;
            let name = String::from_utf8(name)
                .map_err(|_| Failed(Some(ADDRESS_NOT_SUPPORTED), "name not UTF-8".into()))?;
            airlock_protocol::egress::check_name(&name)
                .map_err(|e| Failed(Some(ADDRESS_NOT_SUPPORTED), format!("name: {e}")))?;
            name
        }
        4 => {
            let mut a = [0u8; 16];
            r.read_exact(&mut a).map_err(io)?;
            Ipv6Addr::from(a).to_string()
        }
        t => {
            return Err(Failed(
                Some(ADDRESS_NOT_SUPPORTED),
                format!("address type {t}"),
            ))
        }
    };
    let mut port = [0u8; 2];
    r.read_exact(&mut port).map_err(io)?;
    let port = u16::from_be_bytes(port);
    if port == 0 {
        return Err(Failed(Some(GENERAL_FAILURE), "port 0".into()));
    }
    Ok((host, port))
}

/// The reply with `code` and an unspecified bound address.
pub fn reply(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// Serves one SOCKS5 client.
pub fn serve(conn: TcpStream, reporter: Option<&crate::model::Reporter>) {
    let mut reader = crate::model::Deadlined {
        conn: &conn,
        deadline: Instant::now() + HEAD_DEADLINE,
    };
    let (host, port) = match handshake(&mut reader, &mut &conn) {
        Ok(x) => x,
        Err(Failed(code, why)) => {
            if let Some(code) = code {
                let _ = (&conn).write_all(&reply(code));
            }
            super::refused(reporter, "socks", code.map_or(0, u16::from), &why);
            return;
        }
    };
    let _ = conn.set_read_timeout(None);
    let req = Request {
        kind: Kind::Socks,
        name: host,
        port,
    };
    match tunnel::open(&req) {
        Ok(Ok(tunnel)) => {
            if (&conn).write_all(&reply(0)).is_ok() {
                tunnel::splice(&conn, &tunnel, &[]);
            }
        }
        Ok(Err(refused)) => {
            console::debug(&format!("egress socks: {}", refused.message));
            let _ = (&conn).write_all(&reply(code_of(refused.status)));
        }
        Err(err) => {
            console::debug(&format!("egress socks: the door failed: {err}"));
            let _ = (&conn).write_all(&reply(GENERAL_FAILURE));
        }
    }
}
