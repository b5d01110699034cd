//! The real keys never go back to the guest: every byte the upstream sends
//! that reaches the guest (the kept response headers, names and values,
//! and the body, JSON or server-sent events, chunk by chunk) passes through
//! a [`Scrubber`] holding every configured key, both providers', not only
//! the one the call carried. An upstream that reflects the request (an
//! echo server, a debugging gateway, an error page quoting the headers)
//! would otherwise hand the agent the key airlock added.
//!
//! What is caught, compared without ASCII case (so a dump that lower- or
//! upper-cases the headers is caught too): each key as it was sent (in
//! `x-api-key: KEY` and `Authorization: Bearer KEY` alike) and each key as
//! a JSON string holds it (`\"` and `\\` escaped, with or without `\/`).
//! Each occurrence is replaced by a mask of the same length
//! ([`mask`]: `AIRLOCK-SCRUBBED-` repeated), so lengths stay right; a
//! response header whose name holds a key is dropped. In a stream, bytes
//! that may begin a key are held back until the next chunk decides (at
//! most the longest pattern's length less one), and flushed at the end:
//! a key split across any number of chunks is caught.
//!
//! What is not: a key the upstream transforms (base64, percent- or
//! other encodings, split by other text, reversed, hashed). The upstream
//! is the user's choice and trusted code: scrubbing protects against one
//! that carelessly reflects what it got, not one that sets out to leak.
//! The status line's reason phrase never reaches the guest (only the
//! numeric status is relayed), nor do headers outside the kept list
//! ([`super::rules::keep_response_header`]).

use std::fmt;

/// The mask's pattern, repeated to the length of what it hides.
pub const MASK: &[u8] = b"AIRLOCK-SCRUBBED-";

/// A mask of `len` bytes.
pub fn mask(len: usize) -> impl Iterator<Item = u8> {
    MASK.iter().copied().cycle().take(len)
}

/// The byte strings to hide: each key in each of its caught forms,
/// longest first. Its `Debug` never shows them.
#[derive(Clone, Default)]
pub struct Scrubber {
    patterns: Vec<Vec<u8>>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubber({} patterns)", self.patterns.len())
    }
}

/// A key as a JSON string holds it: `\` and `"` escaped, and `/` too if
/// `solidus`.
fn json_escaped(key: &str, solidus: bool) -> String {
    let mut out = String::with_capacity(key.len() + 8);
    for c in key.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '/' if solidus => out.push_str("\\/"),
            c => out.push(c),
        }
    }
    out
}

impl Scrubber {
    /// A scrubber for these keys (empty ones are ignored).
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Scrubber {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        for key in keys.into_iter().filter(|k| !k.is_empty()) {
            for form in [
                key.to_owned(),
                json_escaped(key, false),
                json_escaped(key, true),
            ] {
                let form = form.into_bytes();
                if !patterns.iter().any(|p| p.eq_ignore_ascii_case(&form)) {
                    patterns.push(form);
                }
            }
        }
        // Longest first: at one position the longest match wins.
        patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Scrubber { patterns }
    }

    /// A scrubber for a stream.
    pub fn stream(&self) -> Stream<'_> {
        Stream {
            scrubber: std::borrow::Cow::Borrowed(self),
            held: Vec::new(),
            emitted: 0,
            count: 0,
        }
    }

    /// A stream that owns its scrubber.
    pub fn into_stream(self) -> Stream<'static> {
        Stream {
            scrubber: std::borrow::Cow::Owned(self),
            held: Vec::new(),
            emitted: 0,
            count: 0,
        }
    }

    /// A scrubber for these keys that also catches each in base64
    /// ([`base64_cores`]).
    pub fn with_base64<'a>(keys: impl IntoIterator<Item = &'a str>) -> Scrubber {
        let keys: Vec<&str> = keys.into_iter().collect();
        let cores: Vec<String> = keys
            .iter()
            .flat_map(|k| base64_cores(k.as_bytes()))
            .collect();
        Scrubber::new(keys.into_iter().chain(cores.iter().map(String::as_str)))
    }

    /// `text` with every key masked, and how many were.
    pub fn scrub_str(&self, text: &str) -> (String, usize) {
        let mut s = self.stream();
        let mut out = Vec::with_capacity(text.len());
        s.feed(text.as_bytes(), &mut out);
        s.finish(&mut out);
        // The masks are ASCII and replace whole ASCII keys: still UTF-8.
        let out = String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        (out, s.count)
    }

    /// Whether `text` holds a key.
    pub fn finds(&self, text: &str) -> bool {
        self.scrub_str(text).1 > 0
    }
}

/// A partial match this long or longer that has to go out (the stream
/// ended, or paused) goes out masked; a shorter one goes out as it is,
/// and the rest of the key, if it follows, is masked.
pub const MIN_MASKED_TAIL: usize = 4;

/// Scrubs a stream chunk by chunk.
#[derive(Debug)]
pub struct Stream<'a> {
    scrubber: std::borrow::Cow<'a, Scrubber>,
    /// The tail of the data so far that may begin a key.
    held: Vec<u8>,
    /// How many leading bytes of `held` are already out (released at a
    /// pause): a key that began in them still has its rest masked.
    emitted: usize,
    count: usize,
}

impl Stream<'_> {
    /// Scrubs `data` into `out`, holding back a tail that may begin a key.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.scrubber.patterns.is_empty() {
            out.extend_from_slice(data);
            return;
        }
        self.held.extend_from_slice(data);
        self.scan(false, out);
    }

    /// Flushes what is held (scrubbed) into `out`: the stream ended.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.scan(true, out);
        self.held.clear();
        self.emitted = 0;
    }

    /// Lets what is held go out now (the stream paused), masked if it is
    /// [`MIN_MASKED_TAIL`] or longer; it stays as context, so that the
    /// rest of a key that follows is still masked.
    pub fn release(&mut self, out: &mut Vec<u8>) {
        if self.held.len() <= self.emitted {
            return;
        }
        if self.held.len() >= MIN_MASKED_TAIL {
            out.extend(mask(self.held.len() - self.emitted));
            self.count += 1;
        } else {
            out.extend_from_slice(&self.held[self.emitted..]);
        }
        self.emitted = self.held.len();
    }

    /// The same stream, scrubbing with `scrubber` from now on (what is
    /// held stays held).
    pub fn rebuild(self, scrubber: Scrubber) -> Stream<'static> {
        Stream {
            scrubber: std::borrow::Cow::Owned(scrubber),
            held: self.held,
            emitted: self.emitted,
            count: self.count,
        }
    }

    /// Keys masked so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether bytes are held back (they may begin a key) and not out yet.
    pub fn holding(&self) -> bool {
        self.held.len() > self.emitted
    }

    fn scan(&mut self, at_end: bool, out: &mut Vec<u8>) {
        let data = std::mem::take(&mut self.held);
        let done = std::mem::take(&mut self.emitted);
        // Writes data[range] (masked or not), less what is already out.
        let push = |out: &mut Vec<u8>, from: usize, to: usize, masked: bool| {
            let from = from.max(done);
            if from < to {
                if masked {
                    out.extend(mask(to - from));
                } else {
                    out.extend_from_slice(&data[from..to]);
                }
            }
        };
        let mut i = 0;
        let mut from = 0;
        'at: while i < data.len() {
            for p in &self.scrubber.patterns {
                let avail = data.len() - i;
                if avail >= p.len() {
                    if data[i..i + p.len()].eq_ignore_ascii_case(p) {
                        push(out, from, i, false);
                        push(out, i, i + p.len(), true);
                        self.count += 1;
                        i += p.len();
                        from = i;
                        continue 'at;
                    }
                } else if data[i..].eq_ignore_ascii_case(&p[..avail]) {
                    push(out, from, i, false);
                    if !at_end {
                        // A key may begin here: wait for the next chunk.
                        self.held = data[i..].to_vec();
                        self.emitted = done.saturating_sub(i);
                        return;
                    }
                    if avail >= MIN_MASKED_TAIL {
                        // The stream ends inside what may be a key.
                        push(out, i, data.len(), true);
                        self.count += 1;
                        return;
                    }
                    from = i;
                }
            }
            i += 1;
        }
        push(out, from, data.len(), false);
    }
}

/// The standard base64 forms of `key` wherever it sits in an encoded
/// text: for each of its three alignments, the characters that only its
/// own bytes decide (so `Basic` credentials with any user name, or a key
/// inside any base64 text, are caught). Only forms of 8 characters or more.
pub fn base64_cores(key: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for k in 0..3usize {
        let mut padded = vec![0u8; k];
        padded.extend_from_slice(key);
        let enc = crate::secrets::http::base64_encode(&padded);
        let (first, last) = (8 * k, 8 * (k + key.len()));
        let core: String = enc
            .chars()
            .enumerate()
            .filter(|(j, _)| 6 * j >= first && 6 * j + 6 <= last)
            .map(|(_, c)| c)
            .collect();
        if core.len() >= 8 {
            out.push(core);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-ant-api03-Secret/Key_0123";

    fn stream_in(s: &Scrubber, data: &[u8], chunk: usize) -> (Vec<u8>, usize, usize) {
        let mut st = s.stream();
        let mut out = Vec::new();
        let mut most_held = 0;
        for part in data.chunks(chunk) {
            st.feed(part, &mut out);
            most_held = most_held.max(st.held.len());
        }
        st.finish(&mut out);
        (out, st.count(), most_held)
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    }

    #[test]
    fn every_form_is_masked_whatever_the_chunking() {
        let s = Scrubber::new([KEY, "sk-openai-other-key"]);
        let body = format!(
            "x-api-key: {KEY}\nauthorization: Bearer sk-openai-other-key\n\
             {{\"echo\":\"{json}\"}}\n{{\"echo\":\"{solidus}\"}}\nUPPER {upper} end",
            json = json_escaped(KEY, false),
            solidus = json_escaped(KEY, true),
            upper = KEY.to_ascii_uppercase(),
        );
        let longest = s.patterns.iter().map(Vec::len).max().unwrap_or(0);
        for chunk in [1, 2, 3, 5, 7, 13, 64, 100_000] {
            let (out, count, held) = stream_in(&s, body.as_bytes(), chunk);
            assert_eq!(out.len(), body.len(), "chunk {chunk}: the length changed");
            assert_eq!(count, 5, "chunk {chunk}: {}", String::from_utf8_lossy(&out));
            for key in [KEY, "sk-openai-other-key", "Secret/Key", "Secret\\/Key"] {
                assert!(!contains(&out, key.as_bytes()), "chunk {chunk}: {key}");
            }
            assert!(contains(&out, b"AIRLOCK-SCRUBBED-"), "chunk {chunk}");
            assert!(held < longest, "chunk {chunk}: held {held}");
            let text = String::from_utf8(out).expect("utf-8");
            assert!(
                text.starts_with("x-api-key: AIRLOCK-SCRUBBED-AIRLOCK"),
                "{text}"
            );
            assert!(text.ends_with(" end"), "{text}");
        }
    }

    #[test]
    fn other_text_passes_unchanged_and_prefixes_are_flushed() {
        let s = Scrubber::new([KEY]);
        // Ends in a short prefix of the key: held, then flushed as it is;
        // a longer one (MIN_MASKED_TAIL or more) goes out masked.
        let text = "nothing secret here, just sk-";
        let (out, count, _) = stream_in(&s, text.as_bytes(), 4);
        assert_eq!((out.as_slice(), count), (text.as_bytes(), 0));
        let text = "nothing secret here, just sk-ant-api03-Sec";
        let (out, count, _) = stream_in(&s, text.as_bytes(), 4);
        assert_eq!(count, 1);
        assert_eq!(&out[..26], &text.as_bytes()[..26]);
        assert!(!contains(&out, b"sk-ant-api03-Sec") && out.len() == text.len());
        // Overlapping starts: a near-miss right before the key.
        let text = format!("sk-ant-api03-{KEY}!");
        let (out, count, _) = stream_in(&s, text.as_bytes(), 1);
        assert_eq!(count, 1);
        assert_eq!(&out[..13], b"sk-ant-api03-");
        assert_eq!(out.last(), Some(&b'!'));
        // No keys: a pass-through.
        let none = Scrubber::new([""]);
        assert_eq!(stream_in(&none, b"abc", 1).0, b"abc");
        assert!(!format!("{s:?}").contains("Secret"));
    }

    #[test]
    fn whole_strings() {
        let s = Scrubber::new([KEY]);
        let (out, n) = s.scrub_str(&format!("Bearer {KEY}"));
        assert_eq!(n, 1);
        assert_eq!(out.len(), 7 + KEY.len());
        assert!(!out.contains(KEY) && out.starts_with("Bearer AIRLOCK-SCRUBBED-"));
        assert!(s.finds(&format!("req_{KEY}")));
        assert!(!s.finds("req_1"));
        assert_eq!(mask(5).collect::<Vec<u8>>(), b"AIRLO");
    }

    #[test]
    fn a_pause_never_lets_a_key_out_whole() {
        let s = Scrubber::new([KEY]);
        // The stream pauses after most of the key: that part goes out
        // masked, and the rest, when it comes, masked too.
        let mut st = s.stream();
        let mut out = Vec::new();
        st.feed(format!("a{}", &KEY[..20]).as_bytes(), &mut out);
        assert!(st.holding());
        st.release(&mut out);
        assert!(!st.holding());
        st.feed(format!("{}b", &KEY[20..]).as_bytes(), &mut out);
        st.finish(&mut out);
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text.len(), KEY.len() + 2);
        assert!(text.starts_with('a') && text.ends_with('b'), "{text}");
        assert!(
            !text.contains(&KEY[..4]) && !text.contains(&KEY[20..]),
            "{text}"
        );
        // A pause after fewer than MIN_MASKED_TAIL bytes: they go out, the
        // rest of the key is still masked.
        let mut st = s.stream();
        let mut out = Vec::new();
        st.feed(&KEY.as_bytes()[..2], &mut out);
        st.release(&mut out);
        st.feed(&KEY.as_bytes()[2..], &mut out);
        st.finish(&mut out);
        assert_eq!(&out[..2], &KEY.as_bytes()[..2]);
        assert!(!contains(&out, &KEY.as_bytes()[2..]));
        // A stream that ends inside a key's first bytes: masked.
        let mut st = s.stream();
        let mut out = Vec::new();
        st.feed(format!("x{}", &KEY[..10]).as_bytes(), &mut out);
        st.finish(&mut out);
        assert_eq!(out.len(), 11);
        assert!(!contains(&out, &KEY.as_bytes()[..10]));
        // A rebuilt stream keeps what it held.
        let mut st = s.stream().rebuild(Scrubber::new([KEY, "other"]));
        let mut out = Vec::new();
        st.feed(&KEY.as_bytes()[..20], &mut out);
        let mut st = st.rebuild(Scrubber::new([KEY]));
        st.feed(&KEY.as_bytes()[20..], &mut out);
        st.finish(&mut out);
        assert!(!contains(&out, KEY.as_bytes()));
    }

    #[test]
    fn a_key_in_base64_is_caught_at_any_alignment_and_with_any_user() {
        let s = Scrubber::with_base64([KEY]);
        for user in ["", "a", "ab", "x-access-token", "someone-else"] {
            let basic = crate::secrets::http::base64_encode(format!("{user}:{KEY}").as_bytes());
            let (out, n) = s.scrub_str(&format!("Authorization: Basic {basic}\n"));
            assert!(n >= 1, "{user}: {out}");
            assert!(out.contains("AIRLOCK-SCRUB"), "{user}: {out}");
            for core in base64_cores(KEY.as_bytes()) {
                // Each alignment's core is at least all but the key's
                // first and last two bytes: none of them is left.
                assert!(!out.contains(&core[..8]), "{user}: {out}");
            }
        }
        assert_eq!(base64_cores(b"ab").len(), 0, "short keys have no core");
    }
}
