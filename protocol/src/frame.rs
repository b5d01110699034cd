//! Framing: `u32` little-endian body length, then the body (tag + payload).
//!
//! [`encode`] and [`decode_body`] are pure. [`read_frame`] and
//! [`write_frame`] are blocking helpers over `std::io` for callers that own a
//! blocking stream; they add no policy (no timeouts, no retries beyond
//! `Interrupted`), only the framing and its limits. Callers with their own
//! I/O read [`FRAME_HEADER_LEN`] bytes, call [`body_len`], read that many
//! bytes and call [`decode_body`].

use std::io::{self, Read, Write};

use crate::limits::{FRAME_HEADER_LEN, MAX_FRAME_BODY};
use crate::message::{Message, MessageError};
use crate::wire::{Reader, Writer};

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The message breaks a rule of PROTOCOL.md.
    #[error("invalid {kind} message")]
    Invalid {
        kind: &'static str,
        #[source]
        source: MessageError,
    },
    /// The body would exceed [`MAX_FRAME_BODY`].
    #[error("frame body of {0} bytes exceeds {MAX_FRAME_BODY}")]
    TooLarge(usize),
}

/// Why a frame body was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A body length of 0 or above [`MAX_FRAME_BODY`].
    #[error("frame body length {0} outside 1..={MAX_FRAME_BODY}")]
    Length(u64),
    /// The body breaks a rule of PROTOCOL.md.
    #[error("malformed frame")]
    Message(#[from] MessageError),
}

/// Why [`read_frame`] or [`write_frame`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly before the first byte of a frame.
    #[error("stream closed")]
    Closed,
    /// Reading or writing failed, or the stream ended inside a frame
    /// (`UnexpectedEof`).
    #[error("frame i/o failed")]
    Io(#[from] io::Error),
    /// The peer sent a frame this side rejects.
    #[error("bad frame")]
    Decode(#[from] DecodeError),
    /// The message to send breaks a rule.
    #[error("cannot encode frame")]
    Encode(#[from] EncodeError),
}

/// Encodes `msg` as a whole frame: length prefix, tag, payload. Refuses any
/// message the decoder would reject.
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut w = Writer::with_prefix(&[0; FRAME_HEADER_LEN]);
    w.u8(msg.tag());
    msg.encode_payload(&mut w)
        .map_err(|source| EncodeError::Invalid {
            kind: msg.kind(),
            source,
        })?;
    let mut buf = w.into_inner();
    let body = buf.len().saturating_sub(FRAME_HEADER_LEN);
    let len = match u32::try_from(body) {
        Ok(len) if body <= MAX_FRAME_BODY => len,
        _ => return Err(EncodeError::TooLarge(body)),
    };
    if let Some(header) = buf.first_chunk_mut::<FRAME_HEADER_LEN>() {
        *header = len.to_le_bytes();
    }
    Ok(buf)
}

/// The body length a frame header announces, if it is within
/// 1 ..= [`MAX_FRAME_BODY`]. Check this before allocating for the body.
pub fn body_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, DecodeError> {
    let raw = u32::from_le_bytes(header);
    match usize::try_from(raw) {
        Ok(len) if (1..=MAX_FRAME_BODY).contains(&len) => Ok(len),
        _ => Err(DecodeError::Length(u64::from(raw))),
    }
}

/// Decodes a frame body (the bytes after the length prefix): tag, then
/// exactly that tag's payload.
pub fn decode_body(body: &[u8]) -> Result<Message, DecodeError> {
    let Some((&tag, payload)) = body.split_first() else {
        return Err(DecodeError::Length(0));
    };
    if body.len() > MAX_FRAME_BODY {
        return Err(DecodeError::Length(
            u64::try_from(body.len()).unwrap_or(u64::MAX),
        ));
    }
    Ok(Message::decode_payload(tag, Reader::new(payload))?)
}

/// Reads one frame from a blocking reader: the header, a length check before
/// any allocation, then exactly the body. Returns [`FrameError::Closed`] if
/// the stream ends before the header's first byte.
pub fn read_frame<R: Read>(mut reader: R) -> Result<Message, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while let Some(rest) = header.get_mut(got..).filter(|rest| !rest.is_empty()) {
        match reader.read(rest) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = body_len(header)?;
    // Grow with the bytes that actually arrive rather than trusting the
    // announced length for the allocation.
    let mut body = Vec::new();
    let limit = u64::try_from(len).unwrap_or(u64::MAX);
    let read = reader.by_ref().take(limit).read_to_end(&mut body)?;
    if read != len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(decode_body(&body)?)
}

/// Encodes `msg` and writes the whole frame to a blocking writer, then
/// flushes it. Nothing is written if the message cannot be encoded.
pub fn write_frame<W: Write>(mut writer: W, msg: &Message) -> Result<(), FrameError> {
    let frame = encode(msg)?;
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{
        MAX_ARGV, MAX_CAPABILITIES, MAX_CHUNK, MAX_ERROR_MESSAGE, MAX_FILE_CHUNK, MAX_FILE_PATH,
        MAX_STRING,
    };
    use crate::message::{ErrorCode, ExitStatus, FileEntry, FileKind, RunSpec};
    use crate::wire::WireError;

    fn spec() -> RunSpec {
        RunSpec {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("X".into(), "a=b".into()),
            ],
            cwd: "/work".into(),
            timeout_ms: Some(30_000),
            max_output_bytes: 1 << 20,
            stdin: true,
        }
    }

    fn every_variant() -> Vec<Message> {
        let mut all = vec![
            Message::Hello {
                version: 1,
                capabilities: vec!["stdin".into(), "ünïcode".into()],
            },
            Message::Hello {
                version: u32::MAX,
                capabilities: vec![],
            },
            Message::RunSpec(spec()),
            Message::RunSpec(RunSpec {
                argv: vec![String::new()],
                env: vec![],
                cwd: "/".into(),
                timeout_ms: None,
                max_output_bytes: 0,
                stdin: false,
            }),
            Message::Stdout(b"hello\n".to_vec()),
            Message::Stderr(vec![0, 0xff]),
            Message::Stdin(vec![7; MAX_CHUNK]),
            Message::StdinEnd,
            Message::Exit(ExitStatus::Exited(0)),
            Message::Exit(ExitStatus::Exited(255)),
            Message::Exit(ExitStatus::Signaled(1)),
            Message::Exit(ExitStatus::Signaled(64)),
        ];
        for code in ErrorCode::ALL {
            all.push(Message::Error {
                code,
                message: "it broke".into(),
            });
        }
        all.push(Message::AuditEvent {
            kind: "exec".into(),
            fields: vec![
                ("pid".into(), "42".into()),
                ("argv".into(), "ls -l /".into()),
                ("empty".into(), String::new()),
            ],
        });
        all.push(Message::AuditEvent {
            kind: "exec.dropped".into(),
            fields: vec![],
        });
        all.extend([
            Message::FileEntry(FileEntry {
                path: "src/main.rs".into(),
                kind: FileKind::File,
                mode: 0o755,
                mtime: 1_700_000_000,
                size: 12,
            }),
            Message::FileEntry(FileEntry {
                path: "d".into(),
                kind: FileKind::Dir,
                mode: 0o700,
                mtime: -5,
                size: 0,
            }),
            Message::FileData(vec![9; MAX_FILE_CHUNK]),
            Message::FileEnd { sha256: [0xab; 32] },
            Message::FilesDone {
                count: 3,
                bytes: u64::MAX,
            },
        ]);
        all
    }

    /// A frame from a tag and raw payload, length prefix computed.
    fn raw_frame(tag: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len() + 1).expect("small");
        let mut f = len.to_le_bytes().to_vec();
        f.push(tag);
        f.extend_from_slice(payload);
        f
    }

    /// A `string`/`bytes` field.
    fn field(data: &[u8]) -> Vec<u8> {
        let mut f = u32::try_from(data.len())
            .expect("small")
            .to_le_bytes()
            .to_vec();
        f.extend_from_slice(data);
        f
    }

    /// Raw env pairs for [`run_spec_payload`].
    type EnvPairs<'a> = &'a [(&'a [u8], &'a [u8])];

    /// A RunSpec payload built by hand, so the decoder can be fed what the
    /// encoder refuses to produce.
    fn run_spec_payload(argv: &[&[u8]], env: EnvPairs<'_>, cwd: &[u8], opt: &[u8]) -> Vec<u8> {
        let mut p = u32::try_from(argv.len())
            .expect("small")
            .to_le_bytes()
            .to_vec();
        for a in argv {
            p.extend(field(a));
        }
        p.extend(u32::try_from(env.len()).expect("small").to_le_bytes());
        for (n, v) in env {
            p.extend(field(n));
            p.extend(field(v));
        }
        p.extend(field(cwd));
        p.extend_from_slice(opt);
        p.extend(1000u64.to_le_bytes());
        p.push(0);
        p
    }

    fn decode(frame: &[u8]) -> Result<Message, FrameError> {
        read_frame(frame)
    }

    fn message_error(r: Result<Message, FrameError>) -> MessageError {
        match r {
            Err(FrameError::Decode(DecodeError::Message(e))) => e,
            other => panic!("expected a message error, got {other:?}"),
        }
    }

    fn invalid(r: Result<Vec<u8>, EncodeError>) -> MessageError {
        match r {
            Err(EncodeError::Invalid { source, .. }) => source,
            other => panic!("expected an invalid-message error, got {other:?}"),
        }
    }

    #[test]
    fn every_variant_round_trips() {
        for msg in every_variant() {
            let frame = encode(&msg).expect("valid message");
            let body = body_len(frame[..4].try_into().expect("header")).expect("length");
            assert_eq!(body, frame.len() - 4, "{msg:?}");
            assert_eq!(decode_body(&frame[4..]).as_ref(), Ok(&msg));
            assert_eq!(decode(&frame).expect("decodes"), msg);
        }
    }

    #[test]
    fn golden_bytes() {
        assert_eq!(encode(&Message::StdinEnd), Ok(vec![1, 0, 0, 0, 6]));
        assert_eq!(
            encode(&Message::Exit(ExitStatus::Signaled(9))),
            Ok(vec![6, 0, 0, 0, 7, 1, 9, 0, 0, 0])
        );
        assert_eq!(
            encode(&Message::Hello {
                version: 1,
                capabilities: vec!["ab".into()]
            }),
            Ok(vec![
                15, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', b'b'
            ])
        );
        assert_eq!(
            encode(&Message::Error {
                code: ErrorCode::SpawnFailed,
                message: "x".into()
            }),
            Ok(vec![8, 0, 0, 0, 8, 4, 0, 1, 0, 0, 0, b'x'])
        );
        let run = Message::RunSpec(RunSpec {
            argv: vec!["a".into()],
            env: vec![("K".into(), "v".into())],
            cwd: "/".into(),
            timeout_ms: Some(5),
            max_output_bytes: 258,
            stdin: true,
        });
        let mut want = vec![2];
        want.extend([1, 0, 0, 0, 1, 0, 0, 0, b'a']);
        want.extend([1, 0, 0, 0, 1, 0, 0, 0, b'K', 1, 0, 0, 0, b'v']);
        want.extend([1, 0, 0, 0, b'/']);
        want.extend([1, 5, 0, 0, 0, 0, 0, 0, 0]);
        want.extend([2, 1, 0, 0, 0, 0, 0, 0]);
        want.push(1);
        let mut frame = u32::try_from(want.len())
            .expect("small")
            .to_le_bytes()
            .to_vec();
        frame.extend(want);
        assert_eq!(encode(&run), Ok(frame));
    }

    #[test]
    fn write_then_read_a_stream_of_frames() {
        let mut stream = Vec::new();
        let all = every_variant();
        for msg in &all {
            write_frame(&mut stream, msg).expect("writes");
        }
        let mut r = stream.as_slice();
        for msg in &all {
            assert_eq!(&read_frame(&mut r).expect("reads"), msg);
        }
        assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn write_frame_writes_nothing_for_an_invalid_message() {
        let mut out = Vec::new();
        let r = write_frame(&mut out, &Message::Stdout(vec![]));
        assert!(matches!(r, Err(FrameError::Encode(_))));
        assert!(out.is_empty());
    }

    #[test]
    fn rejects_zero_length() {
        assert!(matches!(
            decode(&[0, 0, 0, 0]),
            Err(FrameError::Decode(DecodeError::Length(0)))
        ));
        assert_eq!(decode_body(&[]), Err(DecodeError::Length(0)));
    }

    /// Yields the header, then fails the test if anything reads further.
    struct HeaderOnly {
        header: [u8; 4],
        pos: usize,
    }

    impl Read for HeaderOnly {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let rest = &self.header[self.pos..];
            assert!(!rest.is_empty(), "read past the header");
            let n = rest.len().min(buf.len()).min(1); // one byte at a time
            buf[..n].copy_from_slice(&rest[..n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn rejects_oversize_length_without_reading_the_body() {
        let too_big = u32::try_from(MAX_FRAME_BODY + 1).expect("fits");
        for len in [too_big, u32::MAX] {
            let r = read_frame(HeaderOnly {
                header: len.to_le_bytes(),
                pos: 0,
            });
            assert!(
                matches!(r, Err(FrameError::Decode(DecodeError::Length(l))) if l == u64::from(len)),
                "{r:?}"
            );
        }
        let r = read_frame(HeaderOnly {
            header: [0; 4],
            pos: 0,
        });
        assert!(matches!(r, Err(FrameError::Decode(DecodeError::Length(0)))));
        assert_eq!(
            decode_body(&vec![6; MAX_FRAME_BODY + 1]),
            Err(DecodeError::Length(
                u64::try_from(MAX_FRAME_BODY + 1).expect("fits")
            ))
        );
    }

    #[test]
    fn accepts_the_largest_body() {
        assert_eq!(
            body_len(u32::try_from(MAX_FRAME_BODY).expect("fits").to_le_bytes()),
            Ok(MAX_FRAME_BODY)
        );
        // A RunSpec close to the frame limit still encodes and decodes.
        let big = "x".repeat(MAX_STRING);
        let msg = Message::RunSpec(RunSpec {
            argv: vec![big; 7],
            ..spec()
        });
        let frame = encode(&msg).expect("fits in a frame");
        assert!(frame.len() - 4 > 7 * MAX_STRING);
        assert_eq!(decode(&frame).expect("decodes"), msg);
    }

    #[test]
    fn encoder_refuses_a_run_spec_over_the_frame_limit() {
        let msg = Message::RunSpec(RunSpec {
            argv: vec!["x".repeat(MAX_STRING); 8],
            ..spec()
        });
        assert!(matches!(encode(&msg), Err(EncodeError::TooLarge(n)) if n > MAX_FRAME_BODY));
    }

    #[test]
    fn rejects_eof_inside_a_frame() {
        let frame = encode(&Message::Stdout(b"abc".to_vec())).expect("valid");
        for cut in 1..frame.len() {
            match decode(&frame[..cut]) {
                Err(FrameError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        assert!(matches!(decode(&[]), Err(FrameError::Closed)));
    }

    #[test]
    fn rejects_truncated_payload() {
        // The length prefix matches the bytes, but the payload is short of
        // its fields.
        let frame = encode(&Message::Exit(ExitStatus::Exited(3))).expect("valid");
        let body = &frame[4..frame.len() - 1];
        assert!(matches!(
            decode(&raw_frame(body[0], &body[1..])),
            Err(FrameError::Decode(DecodeError::Message(
                MessageError::Wire(WireError::Truncated { .. })
            )))
        ));
        // A bytes field claiming more than is there.
        let mut payload = field(b"abcd");
        payload.pop();
        assert!(matches!(
            message_error(decode(&raw_frame(3, &payload))),
            MessageError::Wire(WireError::Truncated { .. })
        ));
        // Every strict prefix of every variant's body fails to decode.
        for msg in every_variant() {
            let frame = encode(&msg).expect("valid");
            for cut in 1..frame.len() - 4 {
                assert!(
                    decode_body(&frame[4..4 + cut]).is_err(),
                    "{msg:?} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn rejects_trailing_byte() {
        for msg in every_variant() {
            let frame = encode(&msg).expect("valid");
            let mut body = frame[4..].to_vec();
            body.push(0);
            assert!(
                matches!(
                    decode_body(&body),
                    Err(DecodeError::Message(MessageError::Wire(
                        WireError::Trailing(1)
                    )))
                ),
                "{msg:?}"
            );
        }
    }

    #[test]
    fn rejects_unknown_tag() {
        for tag in [0, 22, 255] {
            assert_eq!(
                message_error(decode(&raw_frame(tag, &[]))),
                MessageError::UnknownTag(tag)
            );
        }
    }

    #[test]
    fn rejects_bad_utf8() {
        // Hello: version 1, one capability.
        let payload = [
            1u32.to_le_bytes().to_vec(),
            1u32.to_le_bytes().to_vec(),
            field(&[0xc3, 0x28]),
        ]
        .concat();
        assert!(matches!(
            message_error(decode(&raw_frame(1, &payload))),
            MessageError::Wire(WireError::Utf8 { .. })
        ));
        let payload = run_spec_payload(&[b"\xff"], &[], b"/", &[0]);
        assert!(matches!(
            message_error(decode(&raw_frame(2, &payload))),
            MessageError::Wire(WireError::Utf8 { .. })
        ));
    }

    #[test]
    fn rejects_nul_in_strings() {
        let payloads = [
            run_spec_payload(&[b"a\0b"], &[], b"/", &[0]),
            run_spec_payload(&[b"a"], &[(b"K\0", b"v")], b"/", &[0]),
            run_spec_payload(&[b"a"], &[(b"K", b"v\0")], b"/", &[0]),
            run_spec_payload(&[b"a"], &[], b"/tmp\0", &[0]),
        ];
        for payload in payloads {
            assert!(matches!(
                message_error(decode(&raw_frame(2, &payload))),
                MessageError::Wire(WireError::Nul { .. })
            ));
        }
        let payload = [5u16.to_le_bytes().to_vec(), field(b"oops\0")].concat();
        assert!(matches!(
            message_error(decode(&raw_frame(8, &payload))),
            MessageError::Wire(WireError::Nul { .. })
        ));
        let mut s = spec();
        s.argv.push("x\0y".into());
        assert!(matches!(
            invalid(encode(&Message::RunSpec(s))),
            MessageError::Wire(WireError::Nul { .. })
        ));
    }

    #[test]
    fn rejects_bad_option_tag_and_stdin_flag() {
        let payload = run_spec_payload(&[b"a"], &[], b"/", &[2]);
        assert!(matches!(
            message_error(decode(&raw_frame(2, &payload))),
            MessageError::Wire(WireError::Flag { value: 2, .. })
        ));
        let mut payload = run_spec_payload(&[b"a"], &[], b"/", &[1, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(decode(&raw_frame(2, &payload)).is_ok());
        if let Some(last) = payload.last_mut() {
            *last = 2;
        }
        assert!(matches!(
            message_error(decode(&raw_frame(2, &payload))),
            MessageError::Wire(WireError::Flag { value: 2, .. })
        ));
    }

    #[test]
    fn argv_count_limits() {
        let arg: &[u8] = b"a";
        let max = vec![arg; MAX_ARGV];
        assert!(decode(&raw_frame(2, &run_spec_payload(&max, &[], b"/", &[0]))).is_ok());
        let over = vec![arg; MAX_ARGV + 1];
        assert!(matches!(
            message_error(decode(&raw_frame(
                2,
                &run_spec_payload(&over, &[], b"/", &[0])
            ))),
            MessageError::Wire(WireError::Count { field: "argv", .. })
        ));
        // The count is rejected before its entries are read.
        let mut p = u32::MAX.to_le_bytes().to_vec();
        p.extend(field(b"a"));
        assert!(matches!(
            message_error(decode(&raw_frame(2, &p))),
            MessageError::Wire(WireError::Count { field: "argv", .. })
        ));
        assert!(matches!(
            message_error(decode(&raw_frame(
                2,
                &run_spec_payload(&[], &[], b"/", &[0])
            ))),
            MessageError::Wire(WireError::Count { field: "argv", .. })
        ));
        let mut s = spec();
        s.argv = vec!["a".into(); MAX_ARGV + 1];
        assert!(matches!(
            invalid(encode(&Message::RunSpec(s.clone()))),
            MessageError::Wire(WireError::Count { .. })
        ));
        s.argv.clear();
        assert!(matches!(
            invalid(encode(&Message::RunSpec(s))),
            MessageError::Wire(WireError::Count { .. })
        ));
    }

    #[test]
    fn env_rules() {
        for name in [&b""[..], b"A=B", b"="] {
            let payload = run_spec_payload(&[b"a"], &[(name, b"v")], b"/", &[0]);
            assert_eq!(
                message_error(decode(&raw_frame(2, &payload))),
                MessageError::EnvName
            );
            let mut s = spec();
            s.env
                .push((String::from_utf8(name.to_vec()).expect("utf8"), "v".into()));
            assert_eq!(invalid(encode(&Message::RunSpec(s))), MessageError::EnvName);
        }
        let mut s = spec();
        s.env = vec![("K".into(), "v".into()); crate::limits::MAX_ENV + 1];
        assert!(matches!(
            invalid(encode(&Message::RunSpec(s))),
            MessageError::Wire(WireError::Count { field: "env", .. })
        ));
    }

    #[test]
    fn rejects_relative_cwd() {
        for cwd in [&b""[..], b"tmp", b"./x"] {
            let payload = run_spec_payload(&[b"a"], &[], cwd, &[0]);
            assert_eq!(
                message_error(decode(&raw_frame(2, &payload))),
                MessageError::RelativeCwd
            );
            let mut s = spec();
            s.cwd = String::from_utf8(cwd.to_vec()).expect("utf8");
            assert_eq!(
                invalid(encode(&Message::RunSpec(s))),
                MessageError::RelativeCwd
            );
        }
    }

    #[test]
    fn string_length_limits() {
        let long = vec![b'a'; MAX_STRING + 1];
        let payload = run_spec_payload(&[&long], &[], b"/", &[0]);
        assert!(matches!(
            message_error(decode(&raw_frame(2, &payload))),
            MessageError::Wire(WireError::Length { .. })
        ));
        let mut s = spec();
        s.cwd = format!("/{}", "a".repeat(MAX_STRING));
        assert!(matches!(
            invalid(encode(&Message::RunSpec(s))),
            MessageError::Wire(WireError::Length { field: "cwd", .. })
        ));
        let msg = Message::Error {
            code: ErrorCode::Internal,
            message: "e".repeat(MAX_ERROR_MESSAGE),
        };
        let mut frame = encode(&msg).expect("at the limit");
        assert_eq!(decode(&frame).expect("decodes"), msg);
        // Bump the message's length word and add a byte.
        frame[7] = frame[7].wrapping_add(1);
        frame.push(b'e');
        frame[0] = frame[0].wrapping_add(1);
        assert!(matches!(
            message_error(decode(&frame)),
            MessageError::Wire(WireError::Length { .. })
        ));
        let msg = Message::Error {
            code: ErrorCode::Internal,
            message: "e".repeat(MAX_ERROR_MESSAGE + 1),
        };
        assert!(matches!(
            invalid(encode(&msg)),
            MessageError::Wire(WireError::Length { .. })
        ));
    }

    #[test]
    fn capability_limits() {
        let hello = |capabilities: Vec<String>| Message::Hello {
            version: 1,
            capabilities,
        };
        let at_limit = hello(vec![
            "c".repeat(crate::limits::MAX_CAPABILITY_LEN);
            MAX_CAPABILITIES
        ]);
        let frame = encode(&at_limit).expect("at the limit");
        assert_eq!(decode(&frame).expect("decodes"), at_limit);
        assert!(matches!(
            invalid(encode(&hello(vec!["c".into(); MAX_CAPABILITIES + 1]))),
            MessageError::Wire(WireError::Count { .. })
        ));
        assert!(matches!(
            invalid(encode(&hello(vec![
                "c".repeat(crate::limits::MAX_CAPABILITY_LEN + 1)
            ]))),
            MessageError::Wire(WireError::Length { .. })
        ));
        let mut payload = 1u32.to_le_bytes().to_vec();
        payload.extend(
            u32::try_from(MAX_CAPABILITIES + 1)
                .expect("small")
                .to_le_bytes(),
        );
        for _ in 0..=MAX_CAPABILITIES {
            payload.extend(field(b"c"));
        }
        assert!(matches!(
            message_error(decode(&raw_frame(1, &payload))),
            MessageError::Wire(WireError::Count { .. })
        ));
    }

    #[test]
    fn chunk_limits() {
        for tag in [3, 4, 5] {
            assert!(matches!(
                message_error(decode(&raw_frame(tag, &field(&[])))),
                MessageError::Wire(WireError::Length { len: 0, .. })
            ));
            assert!(decode(&raw_frame(tag, &field(&vec![1; MAX_CHUNK]))).is_ok());
            assert!(matches!(
                message_error(decode(&raw_frame(tag, &field(&vec![1; MAX_CHUNK + 1])))),
                MessageError::Wire(WireError::Length { .. })
            ));
        }
        for msg in [
            Message::Stdout(vec![]),
            Message::Stderr(vec![]),
            Message::Stdin(vec![]),
            Message::Stdout(vec![0; MAX_CHUNK + 1]),
        ] {
            assert!(matches!(
                invalid(encode(&msg)),
                MessageError::Wire(WireError::Length { .. })
            ));
        }
    }

    #[test]
    fn exit_rules() {
        let exit = |kind: u8, value: i32| {
            let mut p = vec![kind];
            p.extend(value.to_le_bytes());
            decode(&raw_frame(7, &p))
        };
        assert_eq!(
            message_error(exit(1, 0)),
            MessageError::Exit { kind: 1, value: 0 }
        );
        assert_eq!(
            message_error(exit(1, 65)),
            MessageError::Exit { kind: 1, value: 65 }
        );
        assert_eq!(
            message_error(exit(0, 256)),
            MessageError::Exit {
                kind: 0,
                value: 256
            }
        );
        assert_eq!(
            message_error(exit(0, -1)),
            MessageError::Exit { kind: 0, value: -1 }
        );
        assert_eq!(
            message_error(exit(2, 0)),
            MessageError::Exit { kind: 2, value: 0 }
        );
        assert_eq!(
            exit(1, 9).expect("valid"),
            Message::Exit(ExitStatus::Signaled(9))
        );
        assert_eq!(
            invalid(encode(&Message::Exit(ExitStatus::Signaled(0)))),
            MessageError::Exit { kind: 1, value: 0 }
        );
    }

    #[test]
    fn rejects_unknown_error_code() {
        for code in [0u16, 6, u16::MAX] {
            let payload = [code.to_le_bytes().to_vec(), field(b"x")].concat();
            assert_eq!(
                message_error(decode(&raw_frame(8, &payload))),
                MessageError::ErrorCode(code)
            );
        }
    }

    /// An AuditEvent payload built by hand.
    fn audit_payload(kind: &[u8], fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut p = field(kind);
        p.extend(u32::try_from(fields.len()).expect("small").to_le_bytes());
        for (n, v) in fields {
            p.extend(field(n));
            p.extend(field(v));
        }
        p
    }

    #[test]
    fn audit_event_golden_bytes() {
        let msg = Message::AuditEvent {
            kind: "x".into(),
            fields: vec![("k".into(), "v".into())],
        };
        let mut want = vec![9];
        want.extend(audit_payload(b"x", &[(b"k", b"v")]));
        let mut frame = u32::try_from(want.len())
            .expect("small")
            .to_le_bytes()
            .to_vec();
        frame.extend(want);
        assert_eq!(encode(&msg), Ok(frame));
    }

    #[test]
    fn audit_event_rules() {
        use crate::limits::{MAX_AUDIT_FIELDS, MAX_AUDIT_NAME, MAX_AUDIT_VALUE};
        // At the limits: decodes, and the encoder agrees.
        let names: Vec<String> = (0..MAX_AUDIT_FIELDS).map(|i| format!("f{i}")).collect();
        let at_limit = Message::AuditEvent {
            kind: "k".repeat(MAX_AUDIT_NAME),
            fields: names
                .iter()
                .map(|n| (n.clone(), "v".repeat(MAX_AUDIT_VALUE)))
                .collect(),
        };
        let frame = encode(&at_limit).expect("at the limit");
        assert_eq!(decode(&frame).expect("decodes"), at_limit);

        let long_name = vec![b'n'; MAX_AUDIT_NAME + 1];
        let long_value = vec![b'v'; MAX_AUDIT_VALUE + 1];
        for (payload, want) in [
            (audit_payload(b"", &[]), "AuditName"),
            (audit_payload(b"Exec", &[]), "AuditName"),
            (audit_payload(&long_name, &[]), "Length"),
            (audit_payload(b"x", &[(b"", b"v")]), "AuditName"),
            (audit_payload(b"x", &[(b"a b", b"v")]), "AuditName"),
            (audit_payload(b"x", &[(&long_name, b"v")]), "Length"),
            (audit_payload(b"x", &[(b"k", &long_value)]), "Length"),
            (audit_payload(b"x", &[(b"k", b"a\0b")]), "Nul"),
            (audit_payload(b"x", &[(b"k", b"\xff")]), "Utf8"),
            (
                audit_payload(b"x", &[(b"k", b"1"), (b"k", b"2")]),
                "Duplicate",
            ),
        ] {
            let e = message_error(decode(&raw_frame(9, &payload)));
            let got = format!("{e:?}");
            assert!(got.contains(want), "{got} lacks {want}");
        }
        // Too many fields: refused at the count, before any is read.
        let mut p = field(b"x");
        p.extend(
            u32::try_from(MAX_AUDIT_FIELDS + 1)
                .expect("small")
                .to_le_bytes(),
        );
        assert!(matches!(
            message_error(decode(&raw_frame(9, &p))),
            MessageError::Wire(WireError::Count { .. })
        ));

        // The encoder refuses the same.
        let event = |kind: &str, fields: Vec<(&str, String)>| Message::AuditEvent {
            kind: kind.into(),
            fields: fields.into_iter().map(|(n, v)| (n.into(), v)).collect(),
        };
        assert_eq!(
            invalid(encode(&event("Bad", vec![]))),
            MessageError::AuditName("audit kind")
        );
        assert_eq!(
            invalid(encode(&event(
                "x",
                vec![("k", "1".into()), ("k", "2".into())]
            ))),
            MessageError::DuplicateAuditField("k".into())
        );
        assert!(matches!(
            invalid(encode(&event(
                "x",
                vec![("k", "v".repeat(MAX_AUDIT_VALUE + 1))]
            ))),
            MessageError::Wire(WireError::Length { .. })
        ));
        let many = (0..=MAX_AUDIT_FIELDS)
            .map(|i| (format!("f{i}"), String::new()))
            .collect();
        assert!(matches!(
            invalid(encode(&Message::AuditEvent {
                kind: "x".into(),
                fields: many
            })),
            MessageError::Wire(WireError::Count { .. })
        ));
    }

    #[test]
    fn errors_render_short_messages() {
        let e = message_error(decode(&raw_frame(0, &[])));
        assert_eq!(e.to_string(), "unknown message tag 0");
        let e = invalid(encode(&Message::Stdin(vec![])));
        assert_eq!(e.to_string(), "data: length 0 outside 1..=65536");
    }

    #[test]
    fn file_messages_golden_bytes() {
        let entry = Message::FileEntry(FileEntry {
            path: "a/b".into(),
            kind: FileKind::File,
            mode: 0o644,
            mtime: 2,
            size: 3,
        });
        let mut payload = field(b"a/b");
        payload.push(1);
        payload.extend(0o644u32.to_le_bytes());
        payload.extend(2i64.to_le_bytes());
        payload.extend(3u64.to_le_bytes());
        assert_eq!(encode(&entry), Ok(raw_frame(10, &payload)));
        assert_eq!(
            encode(&Message::FileData(vec![7])),
            Ok(raw_frame(11, &field(&[7])))
        );
        assert_eq!(
            encode(&Message::FileEnd { sha256: [1; 32] }),
            Ok(raw_frame(12, &field(&[1; 32])))
        );
        let mut done = 4u64.to_le_bytes().to_vec();
        done.extend(5u64.to_le_bytes());
        assert_eq!(
            encode(&Message::FilesDone { count: 4, bytes: 5 }),
            Ok(raw_frame(13, &done))
        );
    }

    #[test]
    fn file_message_rules() {
        let entry_payload = |path: &[u8], kind: u8, mode: u32, size: u64| {
            let mut p = field(path);
            p.push(kind);
            p.extend(mode.to_le_bytes());
            p.extend(0i64.to_le_bytes());
            p.extend(size.to_le_bytes());
            p
        };
        assert!(decode(&raw_frame(10, &entry_payload(b"ok", 1, 0o600, 1))).is_ok());
        // Components are the receiver's to check (one entry refused, not
        // the stream); the codec refuses only an empty path, bad UTF-8, NUL.
        for path in [&b"../etc/passwd"[..], b"/abs", b"a//b", b"a/./b"] {
            assert!(decode(&raw_frame(10, &entry_payload(path, 1, 0o600, 1))).is_ok());
        }
        for path in [&b""[..], b"a\0b", b"\xff"] {
            assert!(decode(&raw_frame(10, &entry_payload(path, 1, 0o600, 1))).is_err());
        }
        let long = vec![b'p'; MAX_FILE_PATH + 1];
        assert!(matches!(
            message_error(decode(&raw_frame(10, &entry_payload(&long, 1, 0, 0)))),
            MessageError::Wire(WireError::Length { .. })
        ));
        assert_eq!(
            message_error(decode(&raw_frame(10, &entry_payload(b"x", 2, 0, 0)))),
            MessageError::FileKind(2)
        );
        assert_eq!(
            message_error(decode(&raw_frame(
                10,
                &entry_payload(b"x", 1, 0o170_000, 0)
            ))),
            MessageError::FileMode(0o170_000)
        );
        assert_eq!(
            message_error(decode(&raw_frame(10, &entry_payload(b"x", 0, 0o755, 1)))),
            MessageError::DirSize(1)
        );
        // FileData: 1 ..= 64 KiB.
        assert!(decode(&raw_frame(11, &field(&[]))).is_err());
        assert!(decode(&raw_frame(11, &field(&vec![1; MAX_FILE_CHUNK]))).is_ok());
        assert!(matches!(
            message_error(decode(&raw_frame(11, &field(&vec![1; MAX_FILE_CHUNK + 1])))),
            MessageError::Wire(WireError::Length { .. })
        ));
        assert!(encode(&Message::FileData(vec![0; MAX_FILE_CHUNK + 1])).is_err());
        assert!(encode(&Message::FileData(vec![])).is_err());
        // FileEnd: exactly 32 bytes.
        assert!(decode(&raw_frame(12, &field(&[0; 31]))).is_err());
        assert!(decode(&raw_frame(12, &field(&[0; 33]))).is_err());
        // The encoder refuses an empty path too.
        assert_eq!(
            invalid(encode(&Message::FileEntry(FileEntry {
                path: String::new(),
                kind: FileKind::File,
                mode: 0,
                mtime: 0,
                size: 0,
            }))),
            MessageError::FilePath
        );
    }
}
