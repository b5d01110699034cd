//! The strict HTTP/1.1 request parser and the endpoint's own answers
//! (API-shaped JSON refusals). It depends on nothing of the init but
//! `std` and the protocol's limits, so that it is fuzzed on its own
//! (fuzz/fuzz_targets/http_request.rs).

use std::io::{self, BufRead, Read, Write};

use airlock_protocol::limits::{MAX_HTTP_CHUNK, MAX_HTTP_HEADERS};

use super::MAX_BODY;

/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 64 * 1024;

/// Longest header value (the protocol's limit).
pub(crate) const MAX_HEADER_VALUE: usize = 8 * 1024;

/// Longest header name (the protocol's limit).
pub(crate) const MAX_HEADER_NAME: usize = 256;

/// Longest request target (the protocol's limit).
pub(crate) const MAX_TARGET: usize = 8 * 1024;

/// Longest chunk-size line (with extensions) or trailer line in a chunked body.
pub(crate) const MAX_CHUNK_LINE: usize = 4096;

/// Longest chunked-body trailer section.
pub(crate) const MAX_TRAILERS: usize = 16 * 1024;

/// Request headers never relayed: hop-by-hop headers (RFC 9110 7.6.1), the
/// framing the init replaces with protocol frames, the host (the host
/// proxy picks the upstream), and `Expect`, which the init answers itself.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether a header is never relayed (see [`HOP_BY_HOP`]; any `Proxy-*`).
pub(crate) fn hop_by_hop(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    HOP_BY_HOP.contains(&lower.as_str()) || lower.starts_with("proxy-")
}

/// An answer the endpoint gives itself, as an API-shaped JSON error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub(crate) status: u16,
    pub(crate) kind: &'static str,
    pub(crate) message: String,
    /// Sending the same request again may succeed (a full endpoint, a
    /// host that broke off); else the answer says `x-should-retry: false`.
    pub(crate) retry: bool,
}

impl Refusal {
    pub(crate) fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry: false,
        }
    }

    pub(crate) fn retryable(self) -> Self {
        Self {
            retry: true,
            ..self
        }
    }

    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    /// `{"type":"error","error":{"type":KIND,"message":MESSAGE}}`.
    pub(crate) fn body(&self) -> String {
        format!(
            r#"{{"type":"error","error":{{"type":"{}","message":{}}}}}"#,
            self.kind,
            json_string(&self.message)
        )
    }
}

/// `s` as a JSON string literal.
pub(crate) fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub(crate) fn write_refusal(out: &mut (impl Write + ?Sized), refusal: &Refusal) -> io::Result<()> {
    let body = refusal.body();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n{}content-length: {}\r\nconnection: close\r\n\r\n",
        refusal.status,
        reason(refusal.status),
        if refusal.retry {
            ""
        } else {
            "x-should-retry: false\r\n"
        },
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body.as_bytes())?;
    out.flush()
}

/// A reason phrase for the status line (clients ignore it).
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        529 => "Overloaded",
        _ => "Status",
    }
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Body {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) method: String,
    pub(crate) target: String,
    /// HTTP/1.0: no chunked response; the end of the connection ends it.
    pub(crate) http10: bool,
    /// The headers to relay (hop-by-hop ones dropped).
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Body,
    pub(crate) expect_continue: bool,
}

/// Reads one line ending in CRLF, of at most `max` bytes with the CRLF,
/// without it. `Ok(None)` at a clean end of stream before any byte.
pub(crate) fn read_line(
    r: &mut impl BufRead,
    max: usize,
    what: &str,
    too_long: impl FnOnce() -> Refusal,
) -> Result<Option<Vec<u8>>, Refusal> {
    let mut line = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX);
    match Read::take(&mut *r, limit).read_until(b'\n', &mut line) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(err) if is_timeout(&err) => {
            return Err(Refusal::new(
                408,
                "invalid_request_error",
                format!("timed out reading the {what}"),
            ))
        }
        Err(err) => return Err(Refusal::bad(format!("cannot read the {what}: {err}"))),
    }
    if line.last() != Some(&b'\n') {
        if line.len() >= max {
            return Err(too_long());
        }
        return Err(Refusal::bad(format!("the {what} ends early")));
    }
    line.pop();
    if line.pop() != Some(b'\r') {
        return Err(Refusal::bad(format!("the {what} does not end in CRLF")));
    }
    Ok(Some(line))
}

pub(crate) fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// RFC 9110 token characters.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads and checks a request head (see the module docs). A refusal comes
/// with the request's method and target when the request line was read.
pub(crate) fn read_head(
    r: &mut impl BufRead,
    max_body: u64,
) -> Result<Option<Head>, (Option<String>, Refusal)> {
    let mut request = None;
    read_head_into(r, &mut request, max_body).map_err(|refusal| (request, refusal))
}

pub(crate) fn read_head_into(
    r: &mut impl BufRead,
    request: &mut Option<String>,
    max_body: u64,
) -> Result<Option<Head>, Refusal> {
    let head_too_long = || {
        Refusal::new(
            431,
            "invalid_request_error",
            format!("the request head is longer than {MAX_HEAD} bytes"),
        )
    };
    let mut budget = MAX_HEAD;
    let Some(line) = read_line(r, budget, "request line", head_too_long)? else {
        return Ok(None);
    };
    budget = budget.saturating_sub(line.len() + 2);
    let line =
        String::from_utf8(line).map_err(|_| Refusal::bad("the request line is not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::bad("malformed request line"));
    };
    *request = Some(format!("{method} {target}"));
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(Refusal::bad("malformed request method"));
    }
    if method.len() > 16 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Refusal::new(
            501,
            "invalid_request_error",
            format!("method {method} is not supported"),
        ));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => {
            return Err(Refusal::new(
                505,
                "invalid_request_error",
                "only HTTP/1.1 and HTTP/1.0 are supported",
            ))
        }
        _ => return Err(Refusal::bad("malformed request line")),
    };
    check_target(target)?;

    let mut headers = Vec::new();
    let mut connection_names: Vec<String> = Vec::new();
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut expect_continue = false;
    loop {
        if budget < 2 {
            return Err(head_too_long());
        }
        let Some(line) = read_line(r, budget, "request head", head_too_long)? else {
            return Err(Refusal::bad("the request head ends early"));
        };
        budget = budget.saturating_sub(line.len() + 2);
        if line.is_empty() {
            break;
        }
        let (name, value) = parse_header(&line)?;
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "content-length" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Refusal::bad("malformed Content-Length"));
                }
                let n: u64 = value.parse().unwrap_or(u64::MAX);
                if content_length.is_some_and(|m| m != n) {
                    return Err(Refusal::bad("conflicting Content-Length headers"));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                if transfer_encoding || !value.eq_ignore_ascii_case("chunked") {
                    return Err(Refusal::new(
                        501,
                        "invalid_request_error",
                        "only Transfer-Encoding: chunked is supported",
                    ));
                }
                transfer_encoding = true;
                chunked = true;
            }
            "connection" => connection_names.extend(
                value
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty()),
            ),
            "expect" => {
                if value.eq_ignore_ascii_case("100-continue") {
                    expect_continue = true;
                } else {
                    return Err(Refusal::new(
                        417,
                        "invalid_request_error",
                        "only Expect: 100-continue is supported",
                    ));
                }
            }
            _ => {}
        }
        headers.push((name, value));
    }
    if chunked && content_length.is_some() {
        return Err(Refusal::bad(
            "a request has either Content-Length or Transfer-Encoding, not both",
        ));
    }
    if chunked && http10 {
        return Err(Refusal::bad("chunked bodies need HTTP/1.1"));
    }
    let body = match (chunked, content_length) {
        (true, _) => Body::Chunked,
        (false, Some(n)) if n > max_body => {
            return Err(too_large(max_body));
        }
        (false, Some(0) | None) => Body::None,
        (false, Some(n)) => Body::Length(n),
    };
    headers.retain(|(name, _)| {
        !hop_by_hop(name) && !connection_names.contains(&name.to_ascii_lowercase())
    });
    if headers.len() > MAX_HTTP_HEADERS {
        return Err(Refusal::new(
            431,
            "invalid_request_error",
            format!("more than {MAX_HTTP_HEADERS} headers"),
        ));
    }
    Ok(Some(Head {
        method: method.to_owned(),
        target: target.to_owned(),
        http10,
        headers,
        body,
        expect_continue,
    }))
}

pub(crate) fn too_large(max: u64) -> Refusal {
    Refusal::new(
        413,
        "request_too_large",
        format!(
            "the request body is larger than the sandbox's limit of {max} bytes \
             (airlock run --model-max-request-bytes, at most {MAX_BODY})"
        ),
    )
}

/// Only origin-form targets (`/path?query`): an absolute URL or an
/// authority would name another server, and this endpoint only relays to
/// the host's model proxy.
pub(crate) fn check_target(target: &str) -> Result<(), Refusal> {
    if !target.starts_with('/') {
        return Err(Refusal::bad(format!(
            "the request target must be a path (origin form); {} is refused: \
             this endpoint only relays to the sandbox's model API",
            if target.contains("://") {
                "an absolute URL"
            } else {
                "this target"
            }
        )));
    }
    if target.len() > MAX_TARGET {
        return Err(Refusal::new(
            414,
            "invalid_request_error",
            format!("the request target is longer than {MAX_TARGET} bytes"),
        ));
    }
    if !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Refusal::bad(
            "the request target has characters outside printable ASCII",
        ));
    }
    Ok(())
}

/// `Name: value` with the value's surrounding blanks trimmed.
pub(crate) fn parse_header(line: &[u8]) -> Result<(String, String), Refusal> {
    if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return Err(Refusal::bad("folded header lines are not supported"));
    }
    let colon = line
        .iter()
        .position(|b| *b == b':')
        .ok_or_else(|| Refusal::bad("a header line has no colon"))?;
    let (name, rest) = line.split_at(colon);
    if name.is_empty() || !name.iter().copied().all(is_tchar) {
        return Err(Refusal::bad("malformed header name"));
    }
    if name.len() > MAX_HEADER_NAME {
        return Err(Refusal::new(
            431,
            "invalid_request_error",
            format!("a header name is longer than {MAX_HEADER_NAME} bytes"),
        ));
    }
    let value = rest.get(1..).unwrap_or_default();
    let value = value.trim_ascii();
    if value.len() > MAX_HEADER_VALUE {
        return Err(Refusal::new(
            431,
            "invalid_request_error",
            format!("a header value is longer than {MAX_HEADER_VALUE} bytes"),
        ));
    }
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(Refusal::bad("a header value has control characters"));
    }
    let value =
        std::str::from_utf8(value).map_err(|_| Refusal::bad("a header value is not UTF-8"))?;
    // The name is ASCII (token characters).
    let name = String::from_utf8_lossy(name).into_owned();
    Ok((name, value.to_owned()))
}

/// Reads a chunked body, handing each piece of data (≤ `MAX_HTTP_CHUNK`)
/// to `sink` as it arrives; refuses more than `max` bytes in all.
pub(crate) fn read_chunked(
    r: &mut impl BufRead,
    max: u64,
    mut sink: impl FnMut(&[u8]) -> Result<(), Refusal>,
) -> Result<(), Refusal> {
    let mut total: u64 = 0;
    loop {
        let line = read_line(r, MAX_CHUNK_LINE, "chunk size line", || {
            Refusal::bad("a chunk size line is too long")
        })?
        .ok_or_else(|| Refusal::bad("the chunked body ends early"))?;
        let size_part = line
            .split(|b| *b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if size_part.is_empty()
            || size_part.len() > 16
            || !size_part.iter().all(u8::is_ascii_hexdigit)
        {
            return Err(Refusal::bad("malformed chunk size"));
        }
        let size = std::str::from_utf8(size_part)
            .ok()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| Refusal::bad("malformed chunk size"))?;
        if size == 0 {
            break;
        }
        total = total.saturating_add(size);
        if total > max {
            return Err(too_large(max));
        }
        copy_exact(r, size, &mut sink)?;
        let mut crlf = [0u8; 2];
        read_exact(r, &mut crlf)?;
        if crlf != *b"\r\n" {
            return Err(Refusal::bad("a chunk does not end in CRLF"));
        }
    }
    // Trailers: read and dropped.
    let too_long = || Refusal::new(431, "invalid_request_error", "the trailers are too long");
    let mut budget = MAX_TRAILERS;
    loop {
        let line = read_line(r, MAX_CHUNK_LINE, "trailer", too_long)?
            .ok_or_else(|| Refusal::bad("the chunked body ends early"))?;
        if line.is_empty() {
            return Ok(());
        }
        budget = budget.checked_sub(line.len() + 2).ok_or_else(too_long)?;
    }
}

pub(crate) fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), Refusal> {
    r.read_exact(buf).map_err(|err| client_read_error(&err))
}

pub(crate) fn client_read_error(err: &io::Error) -> Refusal {
    if is_timeout(err) {
        Refusal::new(
            408,
            "invalid_request_error",
            "timed out reading the request body",
        )
    } else {
        Refusal::bad("the request body ends early")
    }
}

/// Hands exactly `n` bytes of `r` to `sink` in pieces of ≤ `MAX_HTTP_CHUNK`.
pub(crate) fn copy_exact(
    r: &mut impl Read,
    mut n: u64,
    sink: &mut impl FnMut(&[u8]) -> Result<(), Refusal>,
) -> Result<(), Refusal> {
    let mut buf = vec![0u8; MAX_HTTP_CHUNK.min(usize::try_from(n).unwrap_or(MAX_HTTP_CHUNK))];
    while n > 0 {
        let want = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
        let piece = buf.get_mut(..want).unwrap_or_default();
        let got = match r.read(piece) {
            Ok(0) => return Err(Refusal::bad("the request body ends early")),
            Ok(got) => got,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(client_read_error(&err)),
        };
        sink(piece.get(..got).unwrap_or_default())?;
        n -= u64::try_from(got).unwrap_or(n);
    }
    Ok(())
}
