//! A request body's top level, read without building its tree: a body may
//! be as large as `--model-max-request-bytes` (32 MiB), and a JSON tree
//! of small values takes many times its text in memory (16 connections at
//! once). Airlock reads only a few top-level scalars ([`READ`]: the model,
//! the output caps, `n`, `background`); every other value stays the raw
//! text the guest sent, checked to be well-formed JSON but never held as
//! a tree. A rewritten body ([`Top::rebuild`]) is the guest's bytes with
//! only the changed fields' values replaced (or appended), in the guest's
//! order.
//!
//! Bounds: at most [`MAX_FIELDS`] top-level fields, each read field's
//! value at most [`MAX_READ`] bytes; a key given twice is refused (parsers
//! differ on which value counts: airlock could check one `model` or
//! `max_tokens` and the upstream act on the other).

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Most top-level fields in a request body (the APIs define a few dozen).
pub const MAX_FIELDS: usize = 256;
/// Longest value of a field airlock reads.
pub const MAX_READ: usize = 4096;
/// The top-level fields airlock reads.
pub const READ: &[&str] = &[
    "model",
    "n",
    "background",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
];

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the request body is not a JSON object")]
    NotObject,
    #[error("the request body has more than {MAX_FIELDS} top-level fields")]
    TooManyFields,
    #[error("airlock refuses a request body that names {0:?} twice")]
    Twice(String),
    #[error("the request body's {0:?} is over {MAX_READ} bytes")]
    TooLong(String),
}

/// The top-level fields of a JSON object body, each with its raw value.
#[derive(Debug)]
pub struct Top<'a> {
    fields: Vec<(String, &'a RawValue)>,
}

struct Fields;

impl<'de> Visitor<'de> for Fields {
    type Value = Result<Vec<(String, &'de RawValue)>, Error>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields: Vec<(String, &'de RawValue)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value::<&'de RawValue>()?;
            if fields.iter().any(|(k, _)| *k == key) {
                return Ok(Err(Error::Twice(key)));
            }
            if fields.len() == MAX_FIELDS {
                return Ok(Err(Error::TooManyFields));
            }
            fields.push((key, value));
        }
        Ok(Ok(fields))
    }
}

impl<'a> Top<'a> {
    /// Reads `body`'s top level; fails unless it is one well-formed JSON
    /// object within the bounds.
    pub fn parse(body: &'a [u8]) -> Result<Top<'a>, Error> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let fields = de.deserialize_map(Fields).map_err(|_| Error::NotObject)??;
        de.end().map_err(|_| Error::NotObject)?;
        Ok(Top { fields })
    }

    /// The [`READ`] fields present, parsed (each at most [`MAX_READ`]
    /// bytes).
    pub fn read(&self) -> Result<Map<String, Value>, Error> {
        let mut out = Map::new();
        for (key, raw) in &self.fields {
            if !READ.contains(&key.as_str()) {
                continue;
            }
            if raw.get().len() > MAX_READ {
                return Err(Error::TooLong(key.clone()));
            }
            let value = serde_json::from_str(raw.get()).map_err(|_| Error::NotObject)?;
            out.insert(key.clone(), value);
        }
        Ok(out)
    }

    /// The body again, with the values of `changed` taken from `values`
    /// (appended when the body did not have them); every other byte of a
    /// field is the guest's.
    pub fn rebuild(&self, values: &Map<String, Value>, changed: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        out.push(b'{');
        let mut first = true;
        let mut put = |out: &mut Vec<u8>, key: &str, value: &str| {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(Value::from(key).to_string().as_bytes());
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
        };
        for (key, raw) in &self.fields {
            match values.get(key).filter(|_| changed.contains(&key.as_str())) {
                Some(v) => put(&mut out, key, &v.to_string()),
                None => put(&mut out, key, raw.get()),
            }
        }
        for key in changed {
            if !self.fields.iter().any(|(k, _)| k == key) {
                if let Some(v) = values.get(*key) {
                    put(&mut out, key, &v.to_string());
                }
            }
        }
        out.push(b'}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_and_rebuilds_the_rest_as_sent() {
        let body = br#"{ "model" : "m", "messages":[ {"a": 1} ],"max_tokens":9,"x":"\u00e9"}"#;
        let top = Top::parse(body).expect("object");
        let mut read = top.read().expect("read");
        assert_eq!(read.len(), 2);
        assert_eq!(read["model"], "m");
        assert_eq!(
            top.rebuild(&read, &[]),
            br#"{"model":"m","messages":[ {"a": 1} ],"max_tokens":9,"x":"\u00e9"}"#
        );
        read.insert("max_tokens".into(), 5.into());
        read.insert("n".into(), 2.into());
        let out = top.rebuild(&read, &["max_tokens", "n"]);
        assert_eq!(
            out,
            br#"{"model":"m","messages":[ {"a": 1} ],"max_tokens":5,"x":"\u00e9","n":2}"#
        );
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["x"], "\u{e9}");
    }

    #[test]
    fn bounds_and_malformed_bodies() {
        for bad in [&b"[]"[..], b"{", b"{} {}", b"\"x\"", b"{\"a\":}", b""] {
            assert_eq!(
                Top::parse(bad).map(|_| ()),
                Err(Error::NotObject),
                "{bad:?}"
            );
        }
        assert_eq!(
            Top::parse(br#"{"model":"a","model":"b"}"#).map(|_| ()),
            Err(Error::Twice("model".into()))
        );
        assert_eq!(
            Top::parse(br#"{"max_tokens":1,"max\u005ftokens":2}"#).map(|_| ()),
            Err(Error::Twice("max_tokens".into()))
        );
        let many: Vec<String> = (0..=MAX_FIELDS).map(|i| format!("\"k{i}\":0")).collect();
        let many = format!("{{{}}}", many.join(","));
        assert_eq!(
            Top::parse(many.as_bytes()).map(|_| ()),
            Err(Error::TooManyFields)
        );
        let long = format!(
            r#"{{"model":"{}","other":"{}"}}"#,
            "m".repeat(MAX_READ),
            "o".repeat(MAX_READ * 4)
        );
        let top = Top::parse(long.as_bytes()).expect("object");
        assert_eq!(top.read(), Err(Error::TooLong("model".into())));
        // Deep nesting in a field airlock does not read: checked, not built.
        let deep = format!(
            r#"{{"model":"m","m":{}{}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert!(Top::parse(deep.as_bytes()).is_ok());
    }
}
