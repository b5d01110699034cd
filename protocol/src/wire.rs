//! Field encoding: the `u8`…`u64`, `bytes`, `string`, `list` and `option`
//! forms of PROTOCOL.md.
//!
//! [`Reader`] is a cursor over a frame body whose every read is
//! bounds-checked; [`Writer`] builds one. Length, count and string rules are
//! checked by the same functions in both directions, so the encoder refuses
//! exactly what the decoder rejects.

/// A field that breaks the encoding rules. `field` names the field for audit
/// lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The payload ends before the field does.
    #[error("{field}: truncated ({needed} bytes needed, {remaining} left)")]
    Truncated {
        field: &'static str,
        needed: usize,
        remaining: usize,
    },
    /// Bytes are left after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A `bytes` or `string` length outside its limits.
    #[error("{field}: length {len} outside {min}..={max}")]
    Length {
        field: &'static str,
        len: u64,
        min: usize,
        max: usize,
    },
    /// A `list` count outside its limits.
    #[error("{field}: count {count} outside {min}..={max}")]
    Count {
        field: &'static str,
        count: u64,
        min: usize,
        max: usize,
    },
    /// A `string` that is not UTF-8.
    #[error("{field}: not UTF-8")]
    Utf8 { field: &'static str },
    /// A `string` that contains a NUL byte.
    #[error("{field}: contains NUL")]
    Nul { field: &'static str },
    /// An `option` tag or a 0/1 flag with another value.
    #[error("{field}: flag {value} is neither 0 nor 1")]
    Flag { field: &'static str, value: u8 },
}

/// Checks a `bytes`/`string` length against `min..=max`.
fn check_len(field: &'static str, len: usize, min: usize, max: usize) -> Result<(), WireError> {
    if (min..=max).contains(&len) {
        Ok(())
    } else {
        Err(WireError::Length {
            field,
            len: u64::try_from(len).unwrap_or(u64::MAX),
            min,
            max,
        })
    }
}

/// Checks a `list` count against `min..=max`.
fn check_count(field: &'static str, count: usize, min: usize, max: usize) -> Result<(), WireError> {
    if (min..=max).contains(&count) {
        Ok(())
    } else {
        Err(WireError::Count {
            field,
            count: u64::try_from(count).unwrap_or(u64::MAX),
            min,
            max,
        })
    }
}

/// Checks the rules every string obeys beyond its length: no NUL.
fn check_str(field: &'static str, s: &str) -> Result<(), WireError> {
    if s.as_bytes().contains(&0) {
        Err(WireError::Nul { field })
    } else {
        Ok(())
    }
}

/// Maps a wire `u8` to a 0/1 flag.
fn flag(field: &'static str, value: u8) -> Result<bool, WireError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        value => Err(WireError::Flag { field, value }),
    }
}

/// A bounds-checked cursor over a payload.
#[derive(Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { rest: buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Succeeds only if every byte has been read.
    pub fn finish(self) -> Result<(), WireError> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], WireError> {
        let (head, tail) = self.rest.split_at_checked(n).ok_or(WireError::Truncated {
            field,
            needed: n,
            remaining: self.rest.len(),
        })?;
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(WireError::Truncated {
                field,
                needed: N,
                remaining: self.rest.len(),
            })?;
        self.rest = tail;
        Ok(*head)
    }

    /// A `u8`.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        let [b] = self.array::<1>(field)?;
        Ok(b)
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        self.array(field).map(u16::from_le_bytes)
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        self.array(field).map(u32::from_le_bytes)
    }

    /// A little-endian `i32`.
    pub fn i32(&mut self, field: &'static str) -> Result<i32, WireError> {
        self.array(field).map(i32::from_le_bytes)
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// A little-endian `i64`.
    pub fn i64(&mut self, field: &'static str) -> Result<i64, WireError> {
        self.array(field).map(i64::from_le_bytes)
    }

    /// A `u8` that must be 0 or 1.
    pub fn flag(&mut self, field: &'static str) -> Result<bool, WireError> {
        let v = self.u8(field)?;
        flag(field, v)
    }

    /// A `u32` length, checked against `min..=max` before anything is read
    /// or allocated.
    fn len(&mut self, field: &'static str, min: usize, max: usize) -> Result<usize, WireError> {
        let raw = self.u32(field)?;
        let len = usize::try_from(raw).unwrap_or(usize::MAX);
        check_len(field, len, min, max)?;
        Ok(len)
    }

    /// A `bytes` field of `min..=max` bytes, borrowed from the payload.
    pub fn bytes(
        &mut self,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<&'a [u8], WireError> {
        let len = self.len(field, min, max)?;
        self.take(field, len)
    }

    /// A `string` field of at most `max` bytes: UTF-8 without NUL.
    pub fn string(&mut self, field: &'static str, max: usize) -> Result<&'a str, WireError> {
        let len = self.len(field, 0, max)?;
        let raw = self.take(field, len)?;
        let s = std::str::from_utf8(raw).map_err(|_| WireError::Utf8 { field })?;
        check_str(field, s)?;
        Ok(s)
    }

    /// A `list` count in `min..=max`. Callers may reserve
    /// `min(count, remaining / smallest element)`; never the raw count.
    pub fn count(
        &mut self,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<usize, WireError> {
        let raw = self.u32(field)?;
        let count = usize::try_from(raw).unwrap_or(usize::MAX);
        check_count(field, count, min, max)?;
        Ok(count)
    }

    /// An `option` tag: `false` for none, `true` for some.
    pub fn option(&mut self, field: &'static str) -> Result<bool, WireError> {
        self.flag(field)
    }
}

/// Builds a payload. Scalar writes cannot fail; `bytes`, `string` and `list`
/// writes check the same rules as [`Reader`].
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A writer whose output starts with `prefix` (e.g. a header to fill in
    /// later).
    pub fn with_prefix(prefix: &[u8]) -> Self {
        Self {
            buf: prefix.to_vec(),
        }
    }

    /// The bytes written so far.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    /// A `u8`.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian `i32`.
    pub fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A little-endian `i64`.
    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A 0/1 flag.
    pub fn flag(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    /// An `option` tag.
    pub fn option(&mut self, some: bool) {
        self.flag(some);
    }

    /// A `u32` length or count already checked against a limit.
    fn u32_len(&mut self, field: &'static str, n: usize, max: usize) -> Result<(), WireError> {
        let n = u32::try_from(n).map_err(|_| WireError::Length {
            field,
            len: u64::try_from(n).unwrap_or(u64::MAX),
            min: 0,
            max,
        })?;
        self.u32(n);
        Ok(())
    }

    /// A `bytes` field of `min..=max` bytes.
    pub fn bytes(
        &mut self,
        field: &'static str,
        data: &[u8],
        min: usize,
        max: usize,
    ) -> Result<(), WireError> {
        check_len(field, data.len(), min, max)?;
        self.u32_len(field, data.len(), max)?;
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// A `string` field of at most `max` bytes, without NUL.
    pub fn string(&mut self, field: &'static str, s: &str, max: usize) -> Result<(), WireError> {
        check_len(field, s.len(), 0, max)?;
        check_str(field, s)?;
        self.u32_len(field, s.len(), max)?;
        self.buf.extend_from_slice(s.as_bytes());
        Ok(())
    }

    /// A `list` count in `min..=max`.
    pub fn count(
        &mut self,
        field: &'static str,
        count: usize,
        min: usize,
        max: usize,
    ) -> Result<(), WireError> {
        check_count(field, count, min, max)?;
        self.u32_len(field, count, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_round_trip_little_endian() {
        let mut w = Writer::default();
        w.u8(0xab);
        w.u16(0x0102);
        w.u32(0x0304_0506);
        w.i32(-2);
        w.u64(0x0708_090a_0b0c_0d0e);
        w.flag(true);
        let buf = w.into_inner();
        assert_eq!(&buf[1..3], &[0x02, 0x01]);
        let mut r = Reader::new(&buf);
        assert_eq!(r.u8("a"), Ok(0xab));
        assert_eq!(r.u16("b"), Ok(0x0102));
        assert_eq!(r.u32("c"), Ok(0x0304_0506));
        assert_eq!(r.i32("d"), Ok(-2));
        assert_eq!(r.u64("e"), Ok(0x0708_090a_0b0c_0d0e));
        assert_eq!(r.flag("f"), Ok(true));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn every_read_is_bounds_checked() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(
            r.u32("x"),
            Err(WireError::Truncated {
                field: "x",
                needed: 4,
                remaining: 3
            })
        );
        // A failed read consumes nothing.
        assert_eq!(r.remaining(), 3);
        assert!(r.u64("x").is_err());
        assert_eq!(Reader::new(&[]).u8("x").map_err(|_| ()), Err(()));
    }

    #[test]
    fn finish_rejects_trailing_bytes() {
        let mut r = Reader::new(&[1, 2]);
        assert_eq!(r.u8("x"), Ok(1));
        assert_eq!(r.finish(), Err(WireError::Trailing(1)));
    }

    #[test]
    fn bytes_length_is_checked_before_the_data() {
        // Claims u32::MAX bytes with none present: a Length error, not an
        // attempt to take them.
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            r.bytes("d", 1, 10),
            Err(WireError::Length {
                len: 0xffff_ffff,
                ..
            })
        ));
        // Within the limit but past the end: Truncated.
        let mut r = Reader::new(&[5, 0, 0, 0, 1]);
        assert!(matches!(
            r.bytes("d", 1, 10),
            Err(WireError::Truncated { needed: 5, .. })
        ));
        // Below the minimum.
        let mut r = Reader::new(&[0, 0, 0, 0]);
        assert!(matches!(
            r.bytes("d", 1, 10),
            Err(WireError::Length { len: 0, .. })
        ));
    }

    #[test]
    fn string_rules() {
        let mut w = Writer::default();
        w.string("s", "héllo", 16).expect("valid string");
        let buf = w.into_inner();
        let mut r = Reader::new(&buf);
        assert_eq!(r.string("s", 16), Ok("héllo"));
        assert_eq!(r.finish(), Ok(()));

        let mut r = Reader::new(&[2, 0, 0, 0, 0xc3, 0x28]);
        assert_eq!(r.string("s", 16), Err(WireError::Utf8 { field: "s" }));
        let mut r = Reader::new(&[2, 0, 0, 0, b'a', 0]);
        assert_eq!(r.string("s", 16), Err(WireError::Nul { field: "s" }));
        let mut r = Reader::new(&[3, 0, 0, 0, b'a', b'b', b'c']);
        assert!(matches!(r.string("s", 2), Err(WireError::Length { .. })));

        assert_eq!(
            Writer::default().string("s", "a\0b", 16),
            Err(WireError::Nul { field: "s" })
        );
        assert!(matches!(
            Writer::default().string("s", "abc", 2),
            Err(WireError::Length { .. })
        ));
    }

    #[test]
    fn flags_and_counts() {
        assert_eq!(Reader::new(&[0]).option("o"), Ok(false));
        assert_eq!(Reader::new(&[1]).option("o"), Ok(true));
        assert_eq!(
            Reader::new(&[2]).option("o"),
            Err(WireError::Flag {
                field: "o",
                value: 2
            })
        );
        assert!(matches!(
            Reader::new(&[5, 0, 0, 0]).count("l", 1, 4),
            Err(WireError::Count { count: 5, .. })
        ));
        assert!(matches!(
            Reader::new(&[0, 0, 0, 0]).count("l", 1, 4),
            Err(WireError::Count { count: 0, .. })
        ));
        assert_eq!(Reader::new(&[4, 0, 0, 0]).count("l", 1, 4), Ok(4));
        assert!(matches!(
            Writer::default().count("l", 5, 1, 4),
            Err(WireError::Count { .. })
        ));
    }
}
