//! The egress door's two small frames ([`crate::EGRESS_PORT`], PROTOCOL.md
//! "Egress"). Each tunnel the agent opens through the in-guest proxy is a
//! connection of its own: the guest sends one [`Request`] (where to, by
//! name: the guest never resolves), the host answers one [`Reply`] (its
//! verdict), and after an [`Status::Ok`] the connection carries the
//! tunnel's raw bytes both ways until either side closes.
//!
//! Request: `aegr`, version (1), kind (1), port (`u16` big-endian), name
//! length (1), name. Reply: status (1), message length (`u16` big-endian),
//! message (UTF-8). Both are bounded; the decoders take no more than the
//! frame and check every byte of the name.

use std::io::{self, Read, Write};

/// The first 4 bytes of an egress connection.
pub const EGRESS_HELLO: [u8; 4] = *b"aegr";
/// The request format's version.
pub const EGRESS_VERSION: u8 = 1;
/// Longest destination name (a DNS name's limit; IPv6 literals are shorter).
pub const MAX_NAME: usize = 253;
/// Longest reply message.
pub const MAX_MESSAGE: usize = 1024;

/// How the agent asked for the tunnel (recorded; the policy is the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HTTP `CONNECT` (TLS, WebSocket, any TCP).
    Connect = 1,
    /// A plain HTTP request in absolute form, sent on as origin form.
    Http = 2,
    /// SOCKS5 `CONNECT`.
    Socks = 3,
    /// A `--host-port` forward: the agent connected to
    /// `host.docker.internal:PORT` directly.
    Forward = 4,
}

impl Kind {
    /// The kind's name in audit records.
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Http => "http",
            Self::Socks => "socks",
            Self::Forward => "forward",
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Connect,
            2 => Self::Http,
            3 => Self::Socks,
            4 => Self::Forward,
            _ => return None,
        })
    }
}

/// Where a tunnel is to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    /// A host name or an IP literal (IPv6 without brackets), as the agent
    /// gave it.
    pub name: String,
    pub port: u16,
}

/// A request or reply that breaks the format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EgressError {
    #[error("not an egress request")]
    Hello,
    #[error("egress request version {0} (this build speaks 1)")]
    Version(u8),
    #[error("unknown tunnel kind {0}")]
    Kind(u8),
    #[error("port 0")]
    Port,
    #[error("the name is empty or longer than {MAX_NAME} bytes")]
    NameLength,
    #[error("the name holds a byte no host name or IP literal has")]
    NameByte,
    #[error("unknown reply status {0}")]
    Status(u8),
    #[error("the reply message is longer than {MAX_MESSAGE} bytes or not UTF-8")]
    Message,
}

/// Checks a destination name: 1 ..= [`MAX_NAME`] bytes of letters, digits,
/// `-`, `.`, `_` and `:` (IPv6 literals), not starting with `-` or `.`.
pub fn check_name(name: &str) -> Result<(), EgressError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(EgressError::NameLength);
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(EgressError::NameByte)
    }
}

impl Request {
    /// The request's bytes, checked.
    pub fn encode(&self) -> Result<Vec<u8>, EgressError> {
        check_name(&self.name)?;
        if self.port == 0 {
            return Err(EgressError::Port);
        }
        let mut out = Vec::with_capacity(9 + self.name.len());
        out.extend_from_slice(&EGRESS_HELLO);
        out.push(EGRESS_VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.port.to_be_bytes());
        // check_name bounds it by MAX_NAME (253).
        out.push(u8::try_from(self.name.len()).map_err(|_| EgressError::NameLength)?);
        out.extend_from_slice(self.name.as_bytes());
        Ok(out)
    }

    /// Reads one request from `r` (at most 9 + [`MAX_NAME`] bytes).
    pub fn read(r: &mut impl Read) -> io::Result<Result<Self, EgressError>> {
        let mut head = [0u8; 9];
        r.read_exact(&mut head)?;
        if head[..4] != EGRESS_HELLO {
            return Ok(Err(EgressError::Hello));
        }
        if head[4] != EGRESS_VERSION {
            return Ok(Err(EgressError::Version(head[4])));
        }
        let Some(kind) = Kind::from_byte(head[5]) else {
            return Ok(Err(EgressError::Kind(head[5])));
        };
        let port = u16::from_be_bytes([head[6], head[7]]);
        let len = usize::from(head[8]);
        if len == 0 || len > MAX_NAME {
            return Ok(Err(EgressError::NameLength));
        }
        let mut name = vec![0u8; len];
        r.read_exact(&mut name)?;
        if port == 0 {
            return Ok(Err(EgressError::Port));
        }
        let Ok(name) = String::from_utf8(name) else {
            return Ok(Err(EgressError::NameByte));
        };
        if let Err(e) = check_name(&name) {
            return Ok(Err(e));
        }
        Ok(Ok(Self { kind, name, port }))
    }
}

/// The host's verdict on a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Connected: raw bytes follow.
    Ok = 0,
    /// The policy refuses it (the message names the rule or the default
    /// and the flag that would allow it).
    Denied = 1,
    /// The name does not resolve.
    NoSuchHost = 2,
    /// The destination refused the connection.
    Refused = 3,
    /// The destination did not answer in time, or is unreachable.
    Unreachable = 4,
    /// A limit of the sandbox (tunnels at once, bytes) was reached.
    Limit = 5,
    /// The request broke the format.
    Bad = 6,
}

impl Status {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Ok,
            1 => Self::Denied,
            2 => Self::NoSuchHost,
            3 => Self::Refused,
            4 => Self::Unreachable,
            5 => Self::Limit,
            6 => Self::Bad,
            _ => return None,
        })
    }
}

/// The host's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    /// For the agent (and its model): why, and what would change it.
    pub message: String,
}

impl Reply {
    /// Writes the reply (the message cut at [`MAX_MESSAGE`] bytes, on a
    /// character boundary).
    pub fn write(&self, w: &mut impl Write) -> io::Result<()> {
        let mut end = self.message.len().min(MAX_MESSAGE);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &self.message.as_bytes()[..end];
        let mut out = Vec::with_capacity(3 + message.len());
        out.push(self.status as u8);
        // At most MAX_MESSAGE (1024): fits.
        out.extend_from_slice(&u16::try_from(message.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(message);
        w.write_all(&out)?;
        w.flush()
    }

    /// Reads one reply from `r` (at most 3 + [`MAX_MESSAGE`] bytes).
    pub fn read(r: &mut impl Read) -> io::Result<Result<Self, EgressError>> {
        let mut head = [0u8; 3];
        r.read_exact(&mut head)?;
        let Some(status) = Status::from_byte(head[0]) else {
            return Ok(Err(EgressError::Status(head[0])));
        };
        let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
        if len > MAX_MESSAGE {
            return Ok(Err(EgressError::Message));
        }
        let mut message = vec![0u8; len];
        r.read_exact(&mut message)?;
        match String::from_utf8(message) {
            Ok(message) => Ok(Ok(Self { status, message })),
            Err(_) => Ok(Err(EgressError::Message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, port: u16) -> Request {
        Request {
            kind: Kind::Connect,
            name: name.into(),
            port,
        }
    }

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        for name in [
            "example.com",
            "10.0.0.1",
            "fe80::1",
            "a_b-c.d",
            &"a".repeat(253),
        ] {
            let bytes = req(name, 443).encode().expect("encode");
            let back = Request::read(&mut &bytes[..]).expect("io").expect("decode");
            assert_eq!(back, req(name, 443));
        }
        for name in ["", "a b", "a/b", "-x", ".x", "ä", &"a".repeat(254), "a\0"] {
            assert!(req(name, 443).encode().is_err(), "{name:?}");
        }
        assert_eq!(req("x", 0).encode(), Err(EgressError::Port));
        let good = req("example.com", 80).encode().expect("encode");
        let mut bad = good.clone();
        bad[0] = b'x';
        assert_eq!(
            Request::read(&mut &bad[..]).expect("io"),
            Err(EgressError::Hello)
        );
        let mut bad = good.clone();
        bad[4] = 2;
        assert_eq!(
            Request::read(&mut &bad[..]).expect("io"),
            Err(EgressError::Version(2))
        );
        let mut bad = good.clone();
        bad[5] = 9;
        assert_eq!(
            Request::read(&mut &bad[..]).expect("io"),
            Err(EgressError::Kind(9))
        );
        let mut bad = good.clone();
        bad[8] = 0;
        assert_eq!(
            Request::read(&mut &bad[..]).expect("io"),
            Err(EgressError::NameLength)
        );
        let mut bad = good.clone();
        bad[9] = b'/';
        assert_eq!(
            Request::read(&mut &bad[..]).expect("io"),
            Err(EgressError::NameByte)
        );
        let mut bad = good.clone();
        bad[8] = 200; // longer than what follows
        assert!(Request::read(&mut &bad[..]).is_err());
        // A request cut short is an I/O error, never a panic.
        for n in 0..good.len() {
            assert!(Request::read(&mut &good[..n]).is_err());
        }
    }

    #[test]
    fn replies_round_trip_and_are_bounded() {
        let reply = Reply {
            status: Status::Denied,
            message: "denied by default: --net-allow example.com".into(),
        };
        let mut bytes = Vec::new();
        reply.write(&mut bytes).expect("write");
        assert_eq!(Reply::read(&mut &bytes[..]).expect("io"), Ok(reply));
        let long = Reply {
            status: Status::Ok,
            message: "é".repeat(MAX_MESSAGE),
        };
        let mut bytes = Vec::new();
        long.write(&mut bytes).expect("write");
        assert!(bytes.len() <= 3 + MAX_MESSAGE);
        let back = Reply::read(&mut &bytes[..]).expect("io").expect("decode");
        assert_eq!(back.message.len(), MAX_MESSAGE);
        assert_eq!(
            Reply::read(&mut &[9u8, 0, 0][..]).expect("io"),
            Err(EgressError::Status(9))
        );
        assert_eq!(
            Reply::read(&mut &[0u8, 0xff, 0xff][..]).expect("io"),
            Err(EgressError::Message)
        );
    }
}
