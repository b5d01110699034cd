//! Just enough HTTP/1.1 for a test server: read one request (head, then a
//! `Content-Length` or chunked body, both bounded) and write a response,
//! whole or as a chunked stream. Every connection is closed after one
//! response (`Connection: close`), which every client handles.

use std::io::{self, BufRead, BufReader, Read, Write};

/// Longest request head (request line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Most header lines.
const MAX_HEADERS: usize = 200;
/// Largest request body.
pub const MAX_BODY: usize = 32 << 20;

/// One parsed request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_owned())
}

/// Reads a line ending in CRLF or LF, counting it against `budget`.
fn line<R: BufRead>(r: &mut R, budget: &mut usize) -> io::Result<String> {
    let mut buf = Vec::new();
    let limit = u64::try_from(*budget).unwrap_or(u64::MAX);
    r.by_ref().take(limit).read_until(b'\n', &mut buf)?;
    if !buf.ends_with(b"\n") {
        return Err(bad("request head too long or cut short"));
    }
    *budget = budget.saturating_sub(buf.len());
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    String::from_utf8(buf).map_err(|_| bad("request head is not UTF-8"))
}

/// Reads one request from `stream`.
pub fn read_request<R: Read>(stream: R) -> io::Result<Request> {
    let mut r = BufReader::new(stream);
    let mut budget = MAX_HEAD;
    let request_line = line(&mut r, &mut budget)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not HTTP/1.x"));
    }
    let mut headers = Vec::new();
    loop {
        let l = line(&mut r, &mut budget)?;
        if l.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(bad("too many headers"));
        }
        let (name, value) = l.split_once(':').ok_or_else(|| bad("malformed header"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut req = Request {
        method: method.to_owned(),
        target: target.to_owned(),
        headers,
        body: Vec::new(),
    };
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    if chunked {
        loop {
            let mut small = 1024;
            let size_line = line(&mut r, &mut small)?;
            let hex = size_line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(hex, 16).map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !line(&mut r, &mut small)?.is_empty() {}
                break;
            }
            if req.body.len().saturating_add(size) > MAX_BODY {
                return Err(bad("body too large"));
            }
            let start = req.body.len();
            req.body.resize(start + size, 0);
            r.read_exact(&mut req.body[start..])?;
            line(&mut r, &mut small)?;
        }
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        if len > MAX_BODY {
            return Err(bad("body too large"));
        }
        req.body.resize(len, 0);
        r.read_exact(&mut req.body)?;
    }
    Ok(req)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Writes a whole response with a `Content-Length`.
pub fn respond<W: Write>(w: W, status: u16, content_type: &str, body: &[u8]) -> io::Result<()> {
    respond_with(w, status, content_type, &[], body)
}

/// Header lines, each `name: value\r\n`.
fn header_lines(extra: &[(String, String)]) -> String {
    extra.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect()
}

/// [`respond`] with `extra` headers.
pub fn respond_with<W: Write>(
    mut w: W,
    status: u16,
    content_type: &str,
    extra: &[(String, String)],
    body: &[u8],
) -> io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         request-id: req_local\r\n{}connection: close\r\n\r\n",
        reason(status),
        body.len(),
        header_lines(extra)
    )?;
    w.write_all(body)?;
    w.flush()
}

/// A chunked response in progress: each [`Chunked::send`] is one chunk,
/// flushed at once.
#[derive(Debug)]
pub struct Chunked<W: Write> {
    w: W,
}

impl<W: Write> Chunked<W> {
    /// Writes the head of a `200` chunked response, with `extra` headers.
    pub fn start(
        mut w: W,
        content_type: &str,
        extra: &[(String, String)],
    ) -> io::Result<Chunked<W>> {
        write!(
            w,
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncache-control: no-cache\r\n\
             transfer-encoding: chunked\r\nrequest-id: req_local\r\n{}connection: close\r\n\r\n",
            header_lines(extra)
        )?;
        w.flush()?;
        Ok(Chunked { w })
    }

    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        write!(self.w, "{:x}\r\n", data.len())?;
        self.w.write_all(data)?;
        self.w.write_all(b"\r\n")?;
        self.w.flush()
    }

    pub fn finish(mut self) -> io::Result<()> {
        self.w.write_all(b"0\r\n\r\n")?;
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_content_length_and_chunked_bodies() {
        let raw = b"POST /v1/messages?x=1 HTTP/1.1\r\nHost: a\r\nX-Api-Key: k\r\nContent-Length: 5\r\n\r\nhello";
        let req = read_request(&raw[..]).expect("parses");
        assert_eq!(req.method, "POST");
        assert_eq!(req.path(), "/v1/messages");
        assert_eq!(req.header("x-api-key"), Some("k"));
        assert_eq!(req.body, b"hello");
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(read_request(&raw[..]).expect("parses").body, b"abcde");
    }

    #[test]
    fn refuses_garbage() {
        assert!(read_request(&b"GET\r\n\r\n"[..]).is_err());
        assert!(read_request(&b"GET / HTTP/1.1\r\nno colon\r\n\r\n"[..]).is_err());
        assert!(
            read_request(&b"GET / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n"[..]).is_err()
        );
        assert!(read_request(&b"GET / HTTP/1.1\r\n"[..]).is_err());
    }

    #[test]
    fn writes_chunks() {
        let mut out = Vec::new();
        let extra = [("anthropic-echo-a".to_owned(), "b".to_owned())];
        let mut c = Chunked::start(&mut out, "text/event-stream", &extra).expect("start");
        c.send(b"hello").expect("send");
        c.finish().expect("finish");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains("transfer-encoding: chunked\r\n"));
        assert!(text.contains("\r\nanthropic-echo-a: b\r\n"));
        assert!(text.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"));
    }
}
