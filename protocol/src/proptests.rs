//! Property tests over generated messages and arbitrary bytes.

use proptest::collection::vec;
use proptest::prelude::*;

use crate::limits::{MAX_CHUNK, MIN_SIGNAL};
use crate::{
    decode_body, encode, read_frame, ErrorCode, ExitStatus, FileEntry, FileKind, Message, RunSpec,
};

/// A string without NUL of up to `max_chars` chars.
fn text(max_chars: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[^\\x00]{{0,{max_chars}}}")).expect("valid regex")
}

fn env_name() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[^\\x00=]{1,12}").expect("valid regex")
}

fn chunk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => vec(any::<u8>(), 1..=256),
        1 => vec(any::<u8>(), MAX_CHUNK - 2..=MAX_CHUNK),
    ]
}

fn run_spec() -> impl Strategy<Value = RunSpec> {
    (
        vec(text(24), 1..6),
        vec((env_name(), text(24)), 0..6),
        text(24).prop_map(|s| format!("/{s}")),
        any::<Option<u64>>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            |(argv, env, cwd, timeout_ms, max_output_bytes, stdin)| RunSpec {
                argv,
                env,
                cwd,
                timeout_ms,
                max_output_bytes,
                stdin,
            },
        )
}

fn exit_status() -> impl Strategy<Value = ExitStatus> {
    let max_signal = u8::try_from(crate::limits::MAX_SIGNAL).expect("fits");
    let min_signal = u8::try_from(MIN_SIGNAL).expect("fits");
    prop_oneof![
        any::<u8>().prop_map(ExitStatus::Exited),
        (min_signal..=max_signal).prop_map(ExitStatus::Signaled),
    ]
}

fn audit_name() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9._-]{1,16}").expect("valid regex")
}

/// An AuditEvent with distinct field names.
fn audit_event() -> impl Strategy<Value = Message> {
    (
        audit_name(),
        proptest::collection::btree_map(audit_name(), text(24), 0..8),
    )
        .prop_map(|(kind, fields)| Message::AuditEvent {
            kind,
            fields: fields.into_iter().collect(),
        })
}

/// A valid relative file path of 1..4 normal components.
fn file_path() -> impl Strategy<Value = String> {
    vec(
        proptest::string::string_regex("[^\\x00/]{1,12}")
            .expect("valid regex")
            .prop_filter("normal component", |c| c != "." && c != ".."),
        1..4,
    )
    .prop_map(|parts| parts.join("/"))
}

fn file_entry() -> impl Strategy<Value = Message> {
    (
        file_path(),
        any::<bool>(),
        0u32..=0o7777,
        any::<i64>(),
        any::<u64>(),
    )
        .prop_map(|(path, dir, mode, mtime, size)| {
            Message::FileEntry(FileEntry {
                path,
                kind: if dir { FileKind::Dir } else { FileKind::File },
                mode,
                mtime,
                size: if dir { 0 } else { size },
            })
        })
}

/// Any valid message.
fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u32>(), vec(text(16), 0..=8)).prop_map(|(version, capabilities)| {
            Message::Hello {
                version,
                capabilities,
            }
        }),
        run_spec().prop_map(Message::RunSpec),
        chunk().prop_map(Message::Stdout),
        chunk().prop_map(Message::Stderr),
        chunk().prop_map(Message::Stdin),
        Just(Message::StdinEnd),
        exit_status().prop_map(Message::Exit),
        (proptest::sample::select(ErrorCode::ALL.to_vec()), text(64))
            .prop_map(|(code, message)| Message::Error { code, message }),
        audit_event(),
        file_entry(),
        chunk().prop_map(Message::FileData),
        any::<[u8; 32]>().prop_map(|sha256| Message::FileEnd { sha256 }),
        (any::<u64>(), any::<u64>()).prop_map(|(count, bytes)| Message::FilesDone { count, bytes }),
        (
            "[A-Z]{1,16}",
            "/[!-~]{0,64}",
            vec(("[a-zA-Z0-9-]{1,20}", "[ -~]{0,40}"), 0..=8)
        )
            .prop_map(|(method, target, headers)| Message::HttpRequest {
                method,
                target,
                headers
            }),
        (100u16..=599, vec(("[a-z-]{1,20}", "[ -~]{0,40}"), 0..=8))
            .prop_map(|(status, headers)| Message::HttpResponse { status, headers }),
        chunk().prop_map(Message::HttpBody),
        Just(Message::HttpEnd),
        vec("[a-z*?]{1,8}(/[a-z*?]{1,8}){0,3}", 1..=4)
            .prop_map(|patterns| Message::Collect { patterns }),
        "[a-z0-9_][a-z0-9_.:-]{0,20}".prop_map(|user| Message::ExecUser { user }),
        "[a-z0-9_][a-z0-9_.-]{0,31}(:[a-z0-9_][a-z0-9_.-]{0,31})?"
            .prop_map(|user| Message::RunAs { user }),
        vec(
            (
                "(/[a-z0-9_.-]{1,8}){1,4}",
                proptest::option::of("[a-z0-9_-]{1,12}"),
                any::<bool>()
            ),
            1..=4
        )
        .prop_filter("plain components", |m| m
            .iter()
            .all(|(t, _, _)| !t.split('/').any(|c| c == "." || c == "..")))
        .prop_map(|m| Message::Mounts {
            mounts: m
                .into_iter()
                .map(|(target, file, readonly)| crate::MountEntry {
                    target,
                    file,
                    readonly
                })
                .collect()
        }),
    ]
}

/// Decodes one frame from the front of `bytes`; on success also returns how
/// many bytes it consumed.
fn read_prefix(bytes: &[u8]) -> Option<(Message, usize)> {
    let mut r = bytes;
    let msg = read_frame(&mut r).ok()?;
    Some((msg, bytes.len() - r.len()))
}

proptest! {
    #[test]
    fn encode_then_decode_is_identity(msg in message()) {
        let frame = encode(&msg).expect("generated messages are valid");
        let (back, used) = read_prefix(&frame).expect("decodes");
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in vec(any::<u8>(), 0..512)) {
        let _ = decode_body(&bytes);
        let _ = read_prefix(&bytes);
    }

    /// Arbitrary payloads behind a valid header and a real tag reach deeper
    /// into the decoder than fully random bytes.
    #[test]
    fn decoding_arbitrary_payloads_never_panics(tag in 0u8..=20, payload in vec(any::<u8>(), 0..512)) {
        let mut body = vec![tag];
        body.extend(payload);
        if let Ok(msg) = decode_body(&body) {
            prop_assert_eq!(encode(&msg).ok().map(|f| f[4..].to_vec()), Some(body));
        }
    }

    /// The encoding is canonical: whatever decodes re-encodes to exactly the
    /// bytes it came from.
    #[test]
    fn a_flipped_byte_errors_or_decodes_to_a_valid_message(
        msg in message(),
        pos in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let mut frame = encode(&msg).expect("generated messages are valid");
        let i = pos.index(frame.len());
        if let Some(b) = frame.get_mut(i) {
            *b ^= mask;
        }
        if let Some((back, used)) = read_prefix(&frame) {
            let again = encode(&back).expect("a decoded message re-encodes");
            prop_assert_eq!(&again[..], &frame[..used]);
        }
    }
}
