//! The HTTP proxy on 127.0.0.1:3128: `CONNECT host:port` opens a tunnel
//! (TLS, WebSocket, any TCP); an absolute-form `http://` request opens one
//! and goes on in origin form with `Connection: close` (one request per
//! tunnel; clients open the next). Anything else is refused with a short
//! plain-text answer. The head reader and parser ([`super::head`]) are
//! pure and bounded (fuzz target `proxy_request`).

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::Instant;

use airlock_protocol::egress::{Kind, Request, Status};

pub use super::head::*;
use super::{tunnel, HEAD_DEADLINE};

/// Writes a plain-text answer with `status` and closes the exchange.
pub fn write_error(out: &mut impl Write, status: u16, message: &str) -> io::Result<()> {
    let body = format!("{message}\n");
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\nx-airlock-egress: refused\r\n\r\n",
        reason(status),
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body.as_bytes())?;
    out.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// The HTTP status for a host refusal.
pub fn status_of(status: Status) -> u16 {
    match status {
        Status::Denied => 403,
        Status::NoSuchHost | Status::Refused => 502,
        Status::Unreachable => 504,
        Status::Limit => 429,
        Status::Bad | Status::Ok => 400,
    }
}

/// Serves one proxy client.
pub fn serve(mut conn: TcpStream, reporter: Option<&crate::model::Reporter>) {
    let deadline = Instant::now() + HEAD_DEADLINE;
    let mut reader = crate::model::Deadlined {
        conn: &conn,
        deadline,
    };
    let read = read_head(&mut reader, deadline);
    let parsed = read.and_then(|(head, rest)| parse_head(&head).map(|h| (h, rest)));
    let (head, rest) = match parsed {
        Ok(x) => x,
        Err((status, message)) => {
            let _ = write_error(&mut conn, status, &message);
            // A client that closed before sending anything is no refusal.
            if message != "airlock proxy: the client closed mid-head" {
                super::refused(reporter, "http", status, &message);
            }
            return;
        }
    };
    let _ = conn.set_read_timeout(None);
    let (kind, host, port) = match &head.target {
        Target::Connect { host, port } => (Kind::Connect, host.clone(), *port),
        Target::Http { host, port, .. } => (Kind::Http, host.clone(), *port),
    };
    let req = Request {
        kind,
        name: host,
        port,
    };
    match tunnel::open(&req) {
        Ok(Ok(tunnel)) => match kind {
            Kind::Connect => {
                if conn
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .is_ok()
                {
                    tunnel::splice(&conn, &tunnel, &rest);
                }
            }
            _ => {
                let mut first = origin_head(&head);
                first.extend_from_slice(&rest);
                tunnel::splice(&conn, &tunnel, &first);
            }
        },
        Ok(Err(reply)) => {
            let _ = write_error(&mut conn, status_of(reply.status), &reply.message);
        }
        Err(err) => {
            let _ = write_error(
                &mut conn,
                502,
                &format!("airlock proxy: the egress door failed: {err}"),
            );
        }
    }
}
