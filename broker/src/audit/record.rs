//! One audit record, its canonical bytes and the hash chain over them.
//!
//! A record is one line of JSON with exactly these members, in this order:
//! `seq`, `ts`, `kind`, `source`, `fields`, `prev`. Its canonical bytes are
//! the line exactly as written, without the trailing newline; `prev` is the
//! lowercase hex sha256 of the previous record's canonical bytes
//! ([`ZERO_HASH`] for the first record). A line is canonical when
//! re-serializing what it parses to gives the same bytes back, so there is
//! one way to write each record (sorted `fields` keys, no whitespace,
//! serde_json's escapes).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The `prev` of the first record.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who vouches for a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Observed by the broker on the host.
    Host,
    /// Claimed by the guest; the host has not verified it.
    Guest,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Host => "host",
            Source::Guest => "guest",
        }
    }
}

/// One record. The member order here is the order on the line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: u64,
    pub ts: String,
    pub kind: String,
    pub source: Source,
    pub fields: Map<String, Value>,
    pub prev: String,
}

impl Record {
    /// The canonical bytes (no newline).
    pub fn to_line(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// The bytes of an even-length lowercase (or uppercase, if `strict` is
/// false) hex string.
pub fn unhex(text: &str, strict: bool) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if !strict => Some(c - b'A' + 10),
        _ => None,
    };
    let b = text.as_bytes();
    if b.len() % 2 != 0 {
        return None;
    }
    b.chunks_exact(2)
        .map(|pair| match pair {
            [hi, lo] => Some(digit(*hi)? << 4 | digit(*lo)?),
            _ => None,
        })
        .collect()
}

/// Whether `text` is a lowercase hex sha256.
pub fn is_hash(text: &str) -> bool {
    text.len() == 64 && unhex(text, true).is_some()
}

/// sha256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The `fields` object of `value`: itself if it is an object, else
/// `{"value": value}`.
pub fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => {
            let mut map = Map::new();
            map.insert("value".into(), other);
            map
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> Record {
        Record {
            seq: 3,
            ts: "2025-06-01T12:34:56.123456Z".into(),
            kind: "exec".into(),
            source: Source::Guest,
            fields: object(json!({"pid": "7", "argv": "ls /", "a": {"z": 1, "b": [1, 2]}})),
            prev: ZERO_HASH.into(),
        }
    }

    #[test]
    fn the_line_has_a_fixed_member_order_and_sorted_fields() {
        let line = String::from_utf8(record().to_line().expect("json")).expect("utf8");
        assert_eq!(
            line,
            r#"{"seq":3,"ts":"2025-06-01T12:34:56.123456Z","kind":"exec","source":"guest","fields":{"a":{"b":[1,2],"z":1},"argv":"ls /","pid":"7"},"prev":"0000000000000000000000000000000000000000000000000000000000000000"}"#
        );
        let back: Record = serde_json::from_str(&line).expect("parses");
        assert_eq!(back, record());
        assert_eq!(back.to_line().expect("json"), line.as_bytes());
    }

    #[test]
    fn unknown_or_missing_members_are_refused() {
        let line = String::from_utf8(record().to_line().expect("json")).expect("utf8");
        let extra = line.replacen("{\"seq\"", "{\"x\":1,\"seq\"", 1);
        assert!(serde_json::from_str::<Record>(&extra).is_err());
        let missing = line.replacen("\"kind\":\"exec\",", "", 1);
        assert!(serde_json::from_str::<Record>(&missing).is_err());
        let bad_source = line.replacen("\"guest\"", "\"vm\"", 1);
        assert!(serde_json::from_str::<Record>(&bad_source).is_err());
    }

    #[test]
    fn hex_and_hashes() {
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00abff", true), Some(vec![0, 0xab, 0xff]));
        assert_eq!(unhex("00ABFF", true), None);
        assert_eq!(unhex("00ABFF", false), Some(vec![0, 0xab, 0xff]));
        assert_eq!(unhex("0", true), None);
        assert_eq!(unhex("zz", false), None);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_hash(ZERO_HASH));
        assert!(!is_hash(&ZERO_HASH.to_uppercase().replace('0', "A")));
        assert!(!is_hash("00"));
    }
}
