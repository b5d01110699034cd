//! What a bound host answers, read as HTTP/1.1 so that the values are
//! masked in what the agent reads, not merely in the bytes on the wire: a
//! chunked body is decoded, scrubbed as one stream and chunked again with
//! airlock's own boundaries (the server's chunk framing can no more split
//! a value past the scrubber); a `Content-Length` body is scrubbed as one
//! stream (masks keep lengths); each head is scrubbed whole. An answer
//! the scrubber cannot read (a `Content-Encoding` other than identity,
//! which airlock asked for) is replaced by a `502` and the connection
//! closes. Bounded: a head of at most [`MAX_HEAD`], chunk and trailer
//! lines of at most [`MAX_LINE`].

use std::collections::VecDeque;

use super::http::{chunk_size, find};
use crate::model::scrub::{Scrubber, Stream};

/// Longest response head.
pub const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4096;
/// Most requests awaiting their answers (more are refused by the reader
/// of requests long before: one per head).
const MAX_PENDING: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailer,
    /// A body that ends when the server closes, or after `101`.
    ToClose,
}

/// Why an answer cannot be passed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable(pub String);

/// The answers on one connection.
#[derive(Debug)]
pub struct Answers {
    state: State,
    line: Vec<u8>,
    /// The methods of the requests sent, oldest first.
    methods: VecDeque<String>,
    scrub: Stream<'static>,
    scrubber: Scrubber,
}

/// What the status line and headers say about the body.
fn body_of(head: &str, method: Option<&str>) -> Result<(State, bool), Unreadable> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| Unreadable(format!("a malformed status line {status_line:?}")))?;
    if !version.starts_with("HTTP/1.") {
        return Err(Unreadable(format!("not HTTP/1.x: {status_line:?}")));
    }
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase()))
        .collect();
    fn value<'a>(
        headers: &'a [(String, String)],
        name: &'a str,
    ) -> impl Iterator<Item = &'a str> + 'a {
        headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    if let Some(enc) =
        value(&headers, "content-encoding").find(|v| !v.is_empty() && *v != "identity")
    {
        return Err(Unreadable(format!(
            "the answer is encoded ({enc}) although airlock asked for identity"
        )));
    }
    // An interim answer: no body, and the request still awaits its own.
    if (100..200).contains(&status) && status != 101 {
        return Ok((State::Head, false));
    }
    if status == 101 {
        return Ok((State::ToClose, true));
    }
    if method.is_some_and(|m| m.eq_ignore_ascii_case("HEAD")) || status == 204 || status == 304 {
        return Ok((State::Head, true));
    }
    let te: Vec<&str> = value(&headers, "transfer-encoding").collect();
    if let Some(last) = te.last() {
        if last.rsplit(',').next().map(str::trim) == Some("chunked") {
            if te
                .iter()
                .any(|t| t.split(',').any(|c| c.trim() != "chunked"))
            {
                return Err(Unreadable("a transfer coding other than chunked".into()));
            }
            return Ok((State::ChunkSize, true));
        }
        return Ok((State::ToClose, true));
    }
    let lengths: Vec<&str> = value(&headers, "content-length").collect();
    match lengths.as_slice() {
        [] => Ok((State::ToClose, true)),
        [n, rest @ ..] if rest.iter().all(|r| r == n) => n
            .parse::<u64>()
            .map(|n| (if n == 0 { State::Head } else { State::Body(n) }, true))
            .map_err(|_| Unreadable(format!("a malformed Content-Length {n:?}"))),
        _ => Err(Unreadable("differing Content-Lengths".into())),
    }
}

/// `data` wrapped as one chunk (nothing if empty).
fn chunk(data: &[u8], out: &mut Vec<u8>) {
    if !data.is_empty() {
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
}

impl Answers {
    pub fn new(scrubber: Scrubber) -> Answers {
        Answers {
            state: State::Head,
            line: Vec::new(),
            methods: VecDeque::new(),
            scrub: scrubber.clone().into_stream(),
            scrubber,
        }
    }

    /// A request was sent with `method`.
    pub fn request(&mut self, method: &str) {
        if self.methods.len() < MAX_PENDING {
            self.methods.push_back(method.to_owned());
        }
    }

    /// Scrubs with `scrubber` from now on (what is held stays held).
    pub fn rescrub(&mut self, scrubber: Scrubber) {
        let old = std::mem::replace(&mut self.scrub, Scrubber::default().into_stream());
        self.scrub = old.rebuild(scrubber.clone());
        self.scrubber = scrubber;
    }

    /// Whether bytes are held back (they may begin a value).
    pub fn holding(&self) -> bool {
        self.scrub.holding()
    }

    /// The server paused: what is held goes out (masked if it may be most
    /// of a value; see [`Stream::release`]).
    pub fn pause(&mut self, out: &mut Vec<u8>) {
        let mut released = Vec::new();
        self.scrub.release(&mut released);
        match self.state {
            State::ChunkSize | State::ChunkData(_) | State::ChunkEnd => chunk(&released, out),
            _ => out.extend_from_slice(&released),
        }
    }

    /// The server closed: the rest goes out.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let mut rest = Vec::new();
        self.scrub.finish(&mut rest);
        match self.state {
            // A chunked body cut short: what is left, as a chunk; the
            // agent sees the body end without its last chunk.
            State::ChunkSize | State::ChunkData(_) | State::ChunkEnd => chunk(&rest, out),
            _ => out.extend_from_slice(&rest),
        }
    }

    /// Takes what the server sent and appends to `out` what the agent
    /// gets.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), Unreadable> {
        while !data.is_empty() {
            match self.state {
                State::ToClose => {
                    self.scrub.feed(data, out);
                    return Ok(());
                }
                State::Body(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    self.scrub.feed(&data[..take], out);
                    data = &data[take..];
                    let left = n - take as u64;
                    if left == 0 {
                        // The body's end: a held tail goes out now (masks
                        // keep the length).
                        self.scrub.finish(out);
                        self.state = State::Head;
                    } else {
                        self.state = State::Body(left);
                    }
                }
                State::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    let mut scrubbed = Vec::with_capacity(take);
                    self.scrub.feed(&data[..take], &mut scrubbed);
                    chunk(&scrubbed, out);
                    data = &data[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left)
                    };
                }
                State::Head => {
                    let start = self.line.len().saturating_sub(3);
                    let room = (MAX_HEAD + 4).saturating_sub(self.line.len());
                    let take = data.len().min(room);
                    self.line.extend_from_slice(&data[..take]);
                    let Some(end) = find(&self.line[start..], b"\r\n\r\n").map(|i| i + start)
                    else {
                        if self.line.len() > MAX_HEAD {
                            return Err(Unreadable(format!(
                                "an answer head over {MAX_HEAD} bytes"
                            )));
                        }
                        data = &data[take..];
                        continue;
                    };
                    let past = self.line.len() - (end + 4);
                    data = &data[take - past..];
                    let head_bytes: Vec<u8> = self.line.drain(..).take(end + 4).collect();
                    let text = String::from_utf8_lossy(&head_bytes[..end]).into_owned();
                    let (state, done) = body_of(&text, self.methods.front().map(String::as_str))?;
                    if done {
                        self.methods.pop_front();
                    }
                    // The head, scrubbed whole.
                    let mut s = self.scrubber.stream();
                    s.feed(&head_bytes, out);
                    s.finish(out);
                    self.state = state;
                }
                State::ChunkSize | State::ChunkEnd | State::Trailer => {
                    let (i, found) = match data.iter().position(|&b| b == b'\n') {
                        Some(i) => (i + 1, true),
                        None => (data.len(), false),
                    };
                    self.line.extend_from_slice(&data[..i]);
                    data = &data[i..];
                    if self.line.len() > MAX_LINE {
                        return Err(Unreadable("a chunk line too long".into()));
                    }
                    if !found {
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let text = line
                        .strip_suffix(b"\r\n")
                        .unwrap_or(&line[..line.len() - 1]);
                    self.state = match self.state {
                        State::ChunkSize => {
                            let size = chunk_size(text, true)
                                .ok_or_else(|| Unreadable("a malformed chunk size".into()))?;
                            if size == 0 {
                                // The body's end: what is held, then the
                                // last chunk.
                                let mut rest = Vec::new();
                                self.scrub.finish(&mut rest);
                                chunk(&rest, out);
                                out.extend_from_slice(b"0\r\n");
                                State::Trailer
                            } else {
                                State::ChunkData(size)
                            }
                        }
                        State::ChunkEnd if text.is_empty() => State::ChunkSize,
                        State::ChunkEnd => {
                            return Err(Unreadable("chunk data longer than its size".into()))
                        }
                        _ => {
                            // A trailer line (scrubbed), or the end.
                            let mut s = self.scrubber.stream();
                            s.feed(&line, out);
                            s.finish(out);
                            if text.is_empty() {
                                State::Head
                            } else {
                                State::Trailer
                            }
                        }
                    };
                }
            }
        }
        Ok(())
    }
}

/// A chunked body joined, as a client reads it (tests).
#[cfg(test)]
pub(crate) fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let i = find(body, b"\r\n").expect("size line");
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..i]).expect("utf8"), 16).expect("hex");
        body = &body[i + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ghp_0123456789abcdefghijklmnopqrstuv";

    fn run(answers: &mut Answers, parts: &[&[u8]]) -> Result<Vec<u8>, Unreadable> {
        let mut out = Vec::new();
        for p in parts {
            answers.feed(p, &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn a_value_split_by_the_servers_chunks_is_masked() {
        let body = format!("you sent: Authorization: Bearer {KEY}\n");
        // The server cuts its chunks in the middle of the value, at every
        // place.
        for cut in 1..body.len() {
            let (a, b) = body.split_at(cut);
            let wire = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            );
            for step in [1usize, 5, 4096] {
                let mut ans = Answers::new(Scrubber::new([KEY]));
                ans.request("GET");
                let parts: Vec<&[u8]> = wire.as_bytes().chunks(step).collect();
                let out = run(&mut ans, &parts).expect("answer");
                let text = String::from_utf8_lossy(&out).into_owned();
                let (head, rest) = text.split_once("\r\n\r\n").expect("head");
                assert!(head.contains("Transfer-Encoding: chunked"));
                let decoded = String::from_utf8(dechunk(rest.as_bytes())).expect("utf8");
                assert_eq!(decoded.len(), body.len());
                assert!(
                    !decoded.contains(&KEY[..8]) && decoded.contains("AIRLOCK-SCRUBBED"),
                    "{decoded}"
                );
                assert!(text.ends_with("0\r\n\r\n"), "{text}");
            }
        }
    }

    #[test]
    fn lengths_heads_and_keep_alive_answers_follow_each_other() {
        let mut ans = Answers::new(Scrubber::new([KEY]));
        for m in ["HEAD", "GET", "GET"] {
            ans.request(m);
        }
        let wire = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 99\r\nX-Echo: {KEY}\r\n\r\n\
             HTTP/1.1 100 Continue\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{KEY}\
             HTTP/1.1 204 No Content\r\n\r\n",
            KEY.len()
        );
        let out = run(&mut ans, &[wire.as_bytes()]).expect("answers");
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(text.len(), wire.len());
        assert!(!text.contains(KEY), "{text}");
        assert_eq!(text.matches("HTTP/1.1 ").count(), 4);
    }

    #[test]
    fn an_encoded_or_malformed_answer_is_refused() {
        for wire in [
            "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 2xx OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let mut ans = Answers::new(Scrubber::new([KEY]));
            ans.request("GET");
            assert!(run(&mut ans, &[wire.as_bytes()]).is_err(), "{wire}");
        }
        let mut ans = Answers::new(Scrubber::new([KEY]));
        let big = vec![b'a'; MAX_HEAD + 10];
        assert!(run(&mut ans, &[b"HTTP/1.1 200 OK\r\nX: ", &big]).is_err());
    }

    #[test]
    fn a_body_to_the_close_and_an_upgrade_are_scrubbed_as_streams() {
        let mut ans = Answers::new(Scrubber::new([KEY]));
        ans.request("GET");
        let mut out = run(
            &mut ans,
            &[b"HTTP/1.1 200 OK\r\n\r\nstart ", &KEY.as_bytes()[..10]],
        )
        .expect("answer");
        ans.feed(&KEY.as_bytes()[10..], &mut out).expect("rest");
        ans.finish(&mut out);
        let text = String::from_utf8(out).expect("utf8");
        assert!(
            !text.contains(&KEY[..6]) && text.ends_with("AIRLOCK-SCRUBBED-AIRLOCK-SCRUBBED-AI"),
            "{text}"
        );
    }
}
