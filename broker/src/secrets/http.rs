//! The agent's HTTP/1.1 requests to a bound host, read inside the TLS the
//! broker terminates: each request head is parsed (strictly: CRLF lines,
//! no folded or malformed headers, one framing) and handed to a rewrite
//! function; bodies (`Content-Length` or chunked) pass through as they
//! are, their framing followed so that the next head is found where the
//! server will find it. After an `Upgrade` request the connection is
//! passed through raw. Bounded: a head of at most [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] lines, chunk-size and trailer lines of at most
//! [`MAX_LINE`].

/// Longest request head.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in a head.
pub const MAX_HEADERS: usize = 200;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4096;

/// A refused request: what the agent is told and the audit log records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
    /// The secret whose placeholder was involved, if one was.
    pub secret: Option<String>,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, reason: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason,
            secret: None,
            message: message.into(),
        }
    }

    /// The HTTP response the agent gets (the connection closes after it).
    pub fn response(&self) -> Vec<u8> {
        let phrase = match self.status {
            400 => "Bad Request",
            403 => "Forbidden",
            431 => "Request Header Fields Too Large",
            501 => "Not Implemented",
            502 => "Bad Gateway",
            505 => "HTTP Version Not Supported",
            _ => "Error",
        };
        let body = format!("{}\n", self.message);
        format!(
            "HTTP/1.1 {} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\nx-airlock-egress: refused\r\n\r\n{body}",
            self.status,
            body.len()
        )
        .into_bytes()
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub target: String,
    pub version: String,
    /// Names as sent (compare without case), values trimmed.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The values of header `name`.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The head as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} {}\r\n", self.method, self.target, self.version);
        for (n, v) in &self.headers {
            out.push_str(n);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses a head (without its final empty line).
pub fn parse_head(text: &[u8]) -> Result<Head, Refusal> {
    let bad = |why: &str| Refusal::new(400, "bad_request", format!("airlock: {why}"));
    let text = std::str::from_utf8(text).map_err(|_| bad("a request head that is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) => (m, t, v),
        _ => return Err(bad("a malformed request line")),
    };
    if version == "HTTP/2.0" || method == "PRI" {
        return Err(Refusal::new(
            505,
            "http2",
            "airlock: HTTP/2 is not spoken to a host of --secret-bind: use HTTP/1.1",
        ));
    }
    if !is_token(method) || target.is_empty() || !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(bad("a malformed request line"));
    }
    if target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad("a request target with spaces or controls"));
    }
    let mut headers = Vec::new();
    for l in lines {
        if headers.len() == MAX_HEADERS {
            return Err(Refusal::new(
                431,
                "head_too_large",
                format!("airlock: more than {MAX_HEADERS} header lines"),
            ));
        }
        if l.starts_with([' ', '\t']) {
            return Err(bad("a folded header line"));
        }
        let (n, v) = l
            .split_once(':')
            .ok_or_else(|| bad("a header line without ':'"))?;
        if !is_token(n) {
            return Err(bad("a malformed header name"));
        }
        let v = v.trim_matches([' ', '\t']);
        if v.chars().any(|c| c.is_control() && c != '\t') {
            return Err(bad("a header value with controls"));
        }
        headers.push((n.to_owned(), v.to_owned()));
    }
    Ok(Head {
        method: method.to_owned(),
        target: target.to_owned(),
        version: version.to_owned(),
        headers,
    })
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
}

/// The body framing of `head`: one `Content-Length`, or
/// `Transfer-Encoding: chunked`; both, or anything else, refused.
pub fn framing(head: &Head) -> Result<Framing, Refusal> {
    let te: Vec<&str> = head.values("transfer-encoding").collect();
    let cl: Vec<&str> = head.values("content-length").collect();
    if !te.is_empty() {
        if !cl.is_empty() {
            return Err(Refusal::new(
                400,
                "bad_request",
                "airlock: both Content-Length and Transfer-Encoding",
            ));
        }
        if te.len() != 1 || !te[0].eq_ignore_ascii_case("chunked") {
            return Err(Refusal::new(
                501,
                "bad_request",
                "airlock: only Transfer-Encoding: chunked is passed on",
            ));
        }
        return Ok(Framing::Chunked);
    }
    match cl.as_slice() {
        [] => Ok(Framing::Length(0)),
        [n] if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && n.len() <= 18 => {
            Ok(Framing::Length(n.parse().unwrap_or(0)))
        }
        _ => Err(Refusal::new(
            400,
            "bad_request",
            "airlock: a malformed or repeated Content-Length",
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailer,
    /// After an upgrade: bytes as they are.
    Raw,
}

/// Follows a connection's requests: heads rewritten, bodies passed on.
#[derive(Debug)]
pub struct Requests {
    state: State,
    /// The head (or chunk line) read so far.
    line: Vec<u8>,
    /// Heads seen.
    pub count: u64,
}

impl Default for Requests {
    fn default() -> Self {
        Requests {
            state: State::Head,
            line: Vec::new(),
            count: 0,
        }
    }
}

impl Requests {
    /// Takes `data` from the agent and appends to `out` what goes on to
    /// the server, each complete head through `rewrite`. A refusal stops
    /// the connection (what was appended before it may still be sent).
    pub fn feed(
        &mut self,
        mut data: &[u8],
        out: &mut Vec<u8>,
        rewrite: &mut dyn FnMut(&Head) -> Result<Vec<u8>, Refusal>,
    ) -> Result<(), Refusal> {
        while !data.is_empty() {
            match self.state {
                State::Raw => {
                    out.extend_from_slice(data);
                    return Ok(());
                }
                State::Body(n) | State::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    out.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    let left = n - take as u64;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), l) => State::Body(l),
                        (_, 0) => State::ChunkEnd,
                        (_, l) => State::ChunkData(l),
                    };
                }
                State::Head => {
                    // Up to the end of the head, or all of it.
                    let start = self.line.len().saturating_sub(3);
                    let take = data
                        .len()
                        .min(MAX_HEAD + 4 - self.line.len().min(MAX_HEAD + 4));
                    self.line.extend_from_slice(&data[..take]);
                    let Some(end) = find(&self.line[start..], b"\r\n\r\n").map(|i| i + start)
                    else {
                        if self.line.len() > MAX_HEAD {
                            return Err(Refusal::new(
                                431,
                                "head_too_large",
                                format!("airlock: a request head over {MAX_HEAD} bytes"),
                            ));
                        }
                        data = &data[take..];
                        continue;
                    };
                    // Bytes past the head go back to `data`.
                    let past = self.line.len() - (end + 4);
                    data = &data[take - past..];
                    let head = parse_head(&self.line[..end])?;
                    self.line.clear();
                    let framing = framing(&head)?;
                    let upgrade = head.values("upgrade").next().is_some()
                        && head
                            .values("connection")
                            .any(|v| v.to_ascii_lowercase().contains("upgrade"));
                    out.extend_from_slice(&rewrite(&head)?);
                    self.count += 1;
                    self.state = match framing {
                        Framing::Length(0) => State::Head,
                        Framing::Length(n) => State::Body(n),
                        Framing::Chunked => State::ChunkSize,
                    };
                    if upgrade {
                        self.state = State::Raw;
                    }
                }
                State::ChunkSize | State::ChunkEnd | State::Trailer => {
                    let (i, found) = match data.iter().position(|&b| b == b'\n') {
                        Some(i) => (i + 1, true),
                        None => (data.len(), false),
                    };
                    self.line.extend_from_slice(&data[..i]);
                    out.extend_from_slice(&data[..i]);
                    data = &data[i..];
                    if self.line.len() > MAX_LINE {
                        return Err(Refusal::new(
                            400,
                            "bad_request",
                            "airlock: a chunk line too long",
                        ));
                    }
                    if !found {
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let text = line.strip_suffix(b"\r\n").ok_or_else(|| {
                        Refusal::new(400, "bad_request", "airlock: a chunk line without CRLF")
                    })?;
                    self.state = match self.state {
                        State::ChunkSize => {
                            let size = chunk_size(text, false).ok_or_else(|| {
                                Refusal::new(400, "bad_request", "airlock: a malformed chunk size")
                            })?;
                            if size == 0 {
                                State::Trailer
                            } else {
                                State::ChunkData(size)
                            }
                        }
                        State::ChunkEnd if text.is_empty() => State::ChunkSize,
                        State::ChunkEnd => {
                            return Err(Refusal::new(
                                400,
                                "bad_request",
                                "airlock: chunk data longer than its size",
                            ))
                        }
                        _ if text.is_empty() => State::Head,
                        _ => State::Trailer,
                    };
                }
            }
        }
        Ok(())
    }
}

/// The size a chunk-size line gives (before any `;` extension): hex
/// digits only, at most 15 of them; `tolerant` allows white space around
/// them (as servers send, read in answers), not in requests.
pub fn chunk_size(line: &[u8], tolerant: bool) -> Option<u64> {
    let size = line.split(|&b| b == b';').next().unwrap_or_default();
    let size = std::str::from_utf8(size).ok()?;
    let size = if tolerant { size.trim() } else { size };
    (!size.is_empty() && size.len() <= 15 && size.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(size, 16).ok())
        .flatten()
}

/// The first position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 (padding optional); `None` if malformed.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = u32::try_from(B64.iter().position(|&b| b == c)?).ok()?;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    (text.len() % 4 != 1).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[&[u8]]) -> (Vec<u8>, Vec<Head>, Result<(), Refusal>) {
        let mut r = Requests::default();
        let mut out = Vec::new();
        let mut heads = Vec::new();
        for part in input {
            let res = r.feed(part, &mut out, &mut |h: &Head| {
                heads.push(h.clone());
                let mut h = h.clone();
                h.headers.push(("x-seen".into(), "1".into()));
                Ok(h.to_bytes())
            });
            if res.is_err() {
                return (out, heads, res);
            }
        }
        (out, heads, Ok(()))
    }

    #[test]
    fn heads_are_rewritten_and_bodies_pass_whatever_the_split() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nT: 1\r\n\r\nGET /c HTTP/1.1\r\nHost: h\r\n\r\n";
        let want_heads = ["/a", "/b", "/c"];
        for split in 0..stream.len() {
            for step in [1usize, 7, 1000] {
                let mut parts: Vec<&[u8]> = vec![&stream[..split]];
                let rest = &stream[split..];
                parts.extend(rest.chunks(step));
                let (out, heads, res) = all(&parts);
                assert!(res.is_ok(), "{res:?}");
                let targets: Vec<&str> = heads.iter().map(|h| h.target.as_str()).collect();
                assert_eq!(targets, want_heads);
                let text = String::from_utf8(out).expect("utf8");
                assert_eq!(text.matches("x-seen: 1\r\n").count(), 3);
                assert!(text.contains("\r\n\r\nhelloGET /b"), "{text}");
                assert!(text.contains("3;x=1\r\nabc\r\n0\r\nT: 1\r\n\r\nGET /c"));
            }
        }
    }

    #[test]
    fn smuggling_shapes_and_oversize_heads_are_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nabcde\r\n",
        ] {
            let (_, _, res) = all(&[bad]);
            let e = res.expect_err(&String::from_utf8_lossy(bad));
            assert!(matches!(e.status, 400 | 501), "{e:?}");
        }
        let (_, _, res) = all(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]);
        assert_eq!(res.expect_err("h2").status, 505);
        let big = vec![b'a'; MAX_HEAD + 10];
        let (_, heads, res) = all(&[b"GET / HTTP/1.1\r\nX: ", &big]);
        assert_eq!(res.expect_err("big").status, 431);
        assert!(heads.is_empty());
        let (_, _, res) =
            all(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcdefg\r\n"]);
        assert_eq!(res.expect_err("long chunk").status, 400);
    }

    #[test]
    fn after_an_upgrade_bytes_pass_as_they_are() {
        let (out, heads, res) = all(&[
            b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /not-a-head HTTP/1.1\r\n\r\n",
        ]);
        assert!(res.is_ok());
        assert_eq!(heads.len(), 1);
        assert!(String::from_utf8_lossy(&out).ends_with("GET /not-a-head HTTP/1.1\r\n\r\n"));
    }

    #[test]
    fn base64_round_trips() {
        for s in [
            "",
            "a",
            "ab",
            "abc",
            "abcd",
            "x-access-token:airlock-ph-0123",
        ] {
            let e = base64_encode(s.as_bytes());
            assert_eq!(base64_decode(&e).as_deref(), Some(s.as_bytes()), "{s}");
        }
        assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64_decode("not base64!"), None);
    }
}
