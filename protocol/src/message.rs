//! The messages of protocol version 1 and their payload encodings.

use crate::limits::{
    FILE_MODE_MASK, MAX_ARGV, MAX_AUDIT_FIELDS, MAX_AUDIT_NAME, MAX_AUDIT_VALUE, MAX_CAPABILITIES,
    MAX_CAPABILITY_LEN, MAX_CHUNK, MAX_ENV, MAX_ERROR_MESSAGE, MAX_EXIT_CODE, MAX_FILE_CHUNK,
    MAX_FILE_PATH, MAX_SIGNAL, MAX_STRING, MIN_ARGV, MIN_CHUNK, MIN_SIGNAL, SHA256_LEN,
};
use crate::wire::{Reader, WireError, Writer};

/// A message that breaks the rules of PROTOCOL.md, found while encoding or
/// decoding its payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// A field breaks the encoding rules.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The tag names no message.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// An env name that is empty or contains `=`.
    #[error("env name is empty or contains '='")]
    EnvName,
    /// A cwd that does not start with `/`.
    #[error("cwd is not absolute")]
    RelativeCwd,
    /// An exit kind other than 0/1, or a value out of range for its kind.
    #[error("exit kind {kind} with value {value} is out of range")]
    Exit { kind: u8, value: i32 },
    /// An error code PROTOCOL.md does not define.
    #[error("unknown error code {0}")]
    ErrorCode(u16),
    /// An audit kind or field name that is empty or has a character other
    /// than `a-z`, `0-9`, `.`, `_`, `-`.
    #[error("{0}: not a name of 1..={MAX_AUDIT_NAME} bytes of a-z 0-9 . _ -")]
    AuditName(&'static str),
    /// An audit field name given twice.
    #[error("audit field {0:?} is given twice")]
    DuplicateAuditField(String),
    /// A file path that is empty (in a message), or (from
    /// [`check_file_path`]) absolute or with an empty, `.` or `..` component.
    #[error("file path is not a relative path of normal components")]
    FilePath,
    /// A file kind other than 0 (directory) or 1 (regular file).
    #[error("unknown file kind {0}")]
    FileKind(u8),
    /// A file mode with bits outside `0o7777`.
    #[error("file mode {0:#o} has bits outside 0o7777")]
    FileMode(u32),
    /// A directory entry with a non-zero size.
    #[error("directory entry with size {0}")]
    DirSize(u64),
}

/// What a `FileEntry` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A directory (wire 0); no data follows.
    Dir,
    /// A regular file (wire 1); `FileData` chunks and a `FileEnd` follow.
    File,
}

impl FileKind {
    /// The wire value.
    pub fn code(self) -> u8 {
        match self {
            Self::Dir => 0,
            Self::File => 1,
        }
    }

    /// The kind for a wire value.
    pub fn from_code(code: u8) -> Result<Self, MessageError> {
        match code {
            0 => Ok(Self::Dir),
            1 => Ok(Self::File),
            other => Err(MessageError::FileKind(other)),
        }
    }
}

/// One entry of a file stream (workspace in, results out): a directory, or
/// a regular file whose `size` bytes follow as `FileData` chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the stream's root, `/`-separated, 1 ..=
    /// [`MAX_FILE_PATH`] bytes. The codec checks only its length, UTF-8 and
    /// NUL: a receiver checks the components (with [`check_file_path`] or
    /// its own) where it uses them, and refuses that one entry.
    pub path: String,
    /// Directory or regular file.
    pub kind: FileKind,
    /// Permission bits (within [`FILE_MODE_MASK`]).
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch (may be negative).
    pub mtime: i64,
    /// Bytes of data that follow; 0 for a directory.
    pub size: u64,
}

/// Checks a file path: 1 ..= [`MAX_FILE_PATH`] bytes without NUL, relative,
/// components neither empty nor `.` nor `..`. Not a codec rule (a bad path
/// refuses one entry, not the stream): senders and receivers call it.
pub fn check_file_path(path: &str) -> Result<(), MessageError> {
    let ok = !path.is_empty()
        && path.len() <= MAX_FILE_PATH
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(MessageError::FilePath)
    }
}

fn check_file_entry(e: &FileEntry) -> Result<(), MessageError> {
    if e.path.is_empty() {
        return Err(MessageError::FilePath);
    }
    if e.mode & !FILE_MODE_MASK != 0 {
        return Err(MessageError::FileMode(e.mode));
    }
    if e.kind == FileKind::Dir && e.size != 0 {
        return Err(MessageError::DirSize(e.size));
    }
    Ok(())
}

/// What the host asks the guest to run. Carries no secret: no API key, token
/// or host path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    /// Program and arguments; `argv[0]` is looked up on the guest's `PATH`.
    /// 1 ..= [`MAX_ARGV`] entries.
    pub argv: Vec<String>,
    /// Environment, in order. At most [`MAX_ENV`] pairs; names are non-empty
    /// and contain no `=`.
    pub env: Vec<(String, String)>,
    /// Absolute working directory in the guest.
    pub cwd: String,
    /// Wall-clock limit for the command, if any.
    pub timeout_ms: Option<u64>,
    /// Most bytes of stdout plus stderr the host accepts.
    pub max_output_bytes: u64,
    /// Whether the host will send `Stdin` chunks and a `StdinEnd`.
    pub stdin: bool,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(u8),
    /// A signal (1 ..= [`MAX_SIGNAL`]) killed it.
    Signaled(u8),
}

impl ExitStatus {
    /// The shell's view of the status: the exit code, or 128 + signal.
    pub fn exit_code(&self) -> i32 {
        match *self {
            Self::Exited(code) => i32::from(code),
            Self::Signaled(sig) => 128 + i32::from(sig),
        }
    }

    /// The wire `(kind, value)` pair; fails on a signal out of range.
    fn to_wire(self) -> Result<(u8, i32), MessageError> {
        let (kind, value) = match self {
            Self::Exited(code) => (0, i32::from(code)),
            Self::Signaled(sig) => (1, i32::from(sig)),
        };
        Self::from_wire(kind, value).map(|_| (kind, value))
    }

    /// Checks a wire `(kind, value)` pair.
    fn from_wire(kind: u8, value: i32) -> Result<Self, MessageError> {
        let bad = MessageError::Exit { kind, value };
        match kind {
            0 if (0..=MAX_EXIT_CODE).contains(&value) => {
                u8::try_from(value).map(Self::Exited).map_err(|_| bad)
            }
            1 if (MIN_SIGNAL..=MAX_SIGNAL).contains(&value) => {
                u8::try_from(value).map(Self::Signaled).map_err(|_| bad)
            }
            _ => Err(bad),
        }
    }
}

/// The error codes of an `Error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The peer speaks another protocol version.
    VersionMismatch = 1,
    /// A frame broke the encoding rules.
    MalformedFrame = 2,
    /// A well-formed message arrived where the conversation does not allow it.
    UnexpectedMessage = 3,
    /// The command could not be started.
    SpawnFailed = 4,
    /// Something else went wrong.
    Internal = 5,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [Self; 5] = [
        Self::VersionMismatch,
        Self::MalformedFrame,
        Self::UnexpectedMessage,
        Self::SpawnFailed,
        Self::Internal,
    ];

    /// The wire value.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The code for a wire value, if it is one PROTOCOL.md defines.
    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }
}

/// One message of the control conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message each way: the sender's version and capabilities. Any
    /// version decodes; whether it is spoken is the receiver's call.
    Hello {
        version: u32,
        capabilities: Vec<String>,
    },
    /// Host → guest: what to run.
    RunSpec(RunSpec),
    /// Guest → host: a chunk of the command's stdout.
    Stdout(Vec<u8>),
    /// Guest → host: a chunk of the command's stderr.
    Stderr(Vec<u8>),
    /// Host → guest: a chunk of the command's stdin.
    Stdin(Vec<u8>),
    /// Host → guest: no more stdin.
    StdinEnd,
    /// Guest → host: the command ended.
    Exit(ExitStatus),
    /// Either way: the conversation failed.
    Error { code: ErrorCode, message: String },
    /// Guest → host, only after the host's `Hello` listed the
    /// [`crate::capability::AUDIT`] capability: something the guest saw,
    /// for the host's audit log. A claim, never verified by the host.
    /// `kind` and each field name are 1 ..= [`MAX_AUDIT_NAME`] bytes of
    /// `a-z 0-9 . _ -`; at most [`MAX_AUDIT_FIELDS`] fields with distinct
    /// names; each value at most [`MAX_AUDIT_VALUE`] bytes.
    AuditEvent {
        kind: String,
        fields: Vec<(String, String)>,
    },
    /// Sender → receiver on a file connection (only with the
    /// [`crate::capability::FILES`] capability): the next directory or file.
    FileEntry(FileEntry),
    /// A chunk (1 ..= [`MAX_FILE_CHUNK`] bytes) of the current file's data.
    FileData(Vec<u8>),
    /// The end of the current file: the sha256 the sender computed.
    FileEnd { sha256: [u8; SHA256_LEN] },
    /// The end of the stream: how many entries and data bytes it held.
    FilesDone { count: u64, bytes: u64 },
}

/// Wire tags, as in PROTOCOL.md.
mod tag {
    pub const HELLO: u8 = 1;
    pub const RUN_SPEC: u8 = 2;
    pub const STDOUT: u8 = 3;
    pub const STDERR: u8 = 4;
    pub const STDIN: u8 = 5;
    pub const STDIN_END: u8 = 6;
    pub const EXIT: u8 = 7;
    pub const ERROR: u8 = 8;
    pub const AUDIT_EVENT: u8 = 9;
    pub const FILE_ENTRY: u8 = 10;
    pub const FILE_DATA: u8 = 11;
    pub const FILE_END: u8 = 12;
    pub const FILES_DONE: u8 = 13;
}

fn check_env_name(name: &str) -> Result<(), MessageError> {
    if name.is_empty() || name.contains('=') {
        Err(MessageError::EnvName)
    } else {
        Ok(())
    }
}

fn check_cwd(cwd: &str) -> Result<(), MessageError> {
    if cwd.starts_with('/') {
        Ok(())
    } else {
        Err(MessageError::RelativeCwd)
    }
}

/// Checks an audit kind or field name: 1 ..= [`MAX_AUDIT_NAME`] bytes of
/// `a-z 0-9 . _ -` (the length is checked by the wire layer first).
fn check_audit_name(field: &'static str, name: &str) -> Result<(), MessageError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_AUDIT_NAME
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(MessageError::AuditName(field))
    }
}

/// Checks that no audit field name repeats (at most [`MAX_AUDIT_FIELDS`]
/// names, so the quadratic scan is bounded).
fn check_unique_fields(fields: &[(String, String)]) -> Result<(), MessageError> {
    for (i, (name, _)) in fields.iter().enumerate() {
        if fields.iter().take(i).any(|(n, _)| n == name) {
            return Err(MessageError::DuplicateAuditField(name.clone()));
        }
    }
    Ok(())
}

/// Smallest encoded `string`: its length word.
const MIN_STRING_WIRE: usize = 4;

impl Message {
    /// The message's name, for audit and log lines.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "Hello",
            Self::RunSpec(_) => "RunSpec",
            Self::Stdout(_) => "Stdout",
            Self::Stderr(_) => "Stderr",
            Self::Stdin(_) => "Stdin",
            Self::StdinEnd => "StdinEnd",
            Self::Exit(_) => "Exit",
            Self::Error { .. } => "Error",
            Self::AuditEvent { .. } => "AuditEvent",
            Self::FileEntry(_) => "FileEntry",
            Self::FileData(_) => "FileData",
            Self::FileEnd { .. } => "FileEnd",
            Self::FilesDone { .. } => "FilesDone",
        }
    }

    /// The wire tag.
    pub fn tag(&self) -> u8 {
        match self {
            Self::Hello { .. } => tag::HELLO,
            Self::RunSpec(_) => tag::RUN_SPEC,
            Self::Stdout(_) => tag::STDOUT,
            Self::Stderr(_) => tag::STDERR,
            Self::Stdin(_) => tag::STDIN,
            Self::StdinEnd => tag::STDIN_END,
            Self::Exit(_) => tag::EXIT,
            Self::Error { .. } => tag::ERROR,
            Self::AuditEvent { .. } => tag::AUDIT_EVENT,
            Self::FileEntry(_) => tag::FILE_ENTRY,
            Self::FileData(_) => tag::FILE_DATA,
            Self::FileEnd { .. } => tag::FILE_END,
            Self::FilesDone { .. } => tag::FILES_DONE,
        }
    }

    /// Appends the payload (everything after the tag) to `w`, refusing
    /// anything the decoder would reject.
    pub(crate) fn encode_payload(&self, w: &mut Writer) -> Result<(), MessageError> {
        match self {
            Self::Hello {
                version,
                capabilities,
            } => {
                w.u32(*version);
                w.count("capabilities", capabilities.len(), 0, MAX_CAPABILITIES)?;
                for cap in capabilities {
                    w.string("capability", cap, MAX_CAPABILITY_LEN)?;
                }
            }
            Self::RunSpec(spec) => {
                w.count("argv", spec.argv.len(), MIN_ARGV, MAX_ARGV)?;
                for arg in &spec.argv {
                    w.string("argv entry", arg, MAX_STRING)?;
                }
                w.count("env", spec.env.len(), 0, MAX_ENV)?;
                for (name, value) in &spec.env {
                    check_env_name(name)?;
                    w.string("env name", name, MAX_STRING)?;
                    w.string("env value", value, MAX_STRING)?;
                }
                check_cwd(&spec.cwd)?;
                w.string("cwd", &spec.cwd, MAX_STRING)?;
                w.option(spec.timeout_ms.is_some());
                if let Some(ms) = spec.timeout_ms {
                    w.u64(ms);
                }
                w.u64(spec.max_output_bytes);
                w.flag(spec.stdin);
            }
            Self::Stdout(data) | Self::Stderr(data) | Self::Stdin(data) => {
                w.bytes("data", data, MIN_CHUNK, MAX_CHUNK)?;
            }
            Self::StdinEnd => {}
            Self::Exit(status) => {
                let (kind, value) = status.to_wire()?;
                w.u8(kind);
                w.i32(value);
            }
            Self::Error { code, message } => {
                w.u16(code.code());
                w.string("error message", message, MAX_ERROR_MESSAGE)?;
            }
            Self::AuditEvent { kind, fields } => {
                w.string("audit kind", kind, MAX_AUDIT_NAME)?;
                check_audit_name("audit kind", kind)?;
                w.count("audit fields", fields.len(), 0, MAX_AUDIT_FIELDS)?;
                for (name, value) in fields {
                    w.string("audit field name", name, MAX_AUDIT_NAME)?;
                    check_audit_name("audit field name", name)?;
                    w.string("audit field value", value, MAX_AUDIT_VALUE)?;
                }
                check_unique_fields(fields)?;
            }
            Self::FileEntry(e) => {
                w.string("file path", &e.path, MAX_FILE_PATH)?;
                check_file_entry(e)?;
                w.u8(e.kind.code());
                w.u32(e.mode);
                w.i64(e.mtime);
                w.u64(e.size);
            }
            Self::FileData(data) => {
                w.bytes("file data", data, MIN_CHUNK, MAX_FILE_CHUNK)?;
            }
            Self::FileEnd { sha256 } => {
                w.bytes("sha256", sha256, SHA256_LEN, SHA256_LEN)?;
            }
            Self::FilesDone { count, bytes } => {
                w.u64(*count);
                w.u64(*bytes);
            }
        }
        Ok(())
    }

    /// Decodes the payload of a message with tag `tag`; `r` must hold
    /// exactly that payload.
    pub(crate) fn decode_payload(tag: u8, mut r: Reader<'_>) -> Result<Self, MessageError> {
        let msg = match tag {
            tag::HELLO => {
                let version = r.u32("version")?;
                let n = r.count("capabilities", 0, MAX_CAPABILITIES)?;
                let mut capabilities = Vec::with_capacity(n);
                for _ in 0..n {
                    capabilities.push(r.string("capability", MAX_CAPABILITY_LEN)?.to_owned());
                }
                Self::Hello {
                    version,
                    capabilities,
                }
            }
            tag::RUN_SPEC => {
                let n = r.count("argv", MIN_ARGV, MAX_ARGV)?;
                let mut argv = Vec::with_capacity(n.min(r.remaining() / MIN_STRING_WIRE));
                for _ in 0..n {
                    argv.push(r.string("argv entry", MAX_STRING)?.to_owned());
                }
                let n = r.count("env", 0, MAX_ENV)?;
                let mut env = Vec::with_capacity(n.min(r.remaining() / (2 * MIN_STRING_WIRE)));
                for _ in 0..n {
                    let name = r.string("env name", MAX_STRING)?;
                    check_env_name(name)?;
                    let value = r.string("env value", MAX_STRING)?;
                    env.push((name.to_owned(), value.to_owned()));
                }
                let cwd = r.string("cwd", MAX_STRING)?;
                check_cwd(cwd)?;
                let timeout_ms = if r.option("timeout_ms")? {
                    Some(r.u64("timeout_ms")?)
                } else {
                    None
                };
                let max_output_bytes = r.u64("max_output_bytes")?;
                let stdin = r.flag("stdin")?;
                Self::RunSpec(RunSpec {
                    argv,
                    env,
                    cwd: cwd.to_owned(),
                    timeout_ms,
                    max_output_bytes,
                    stdin,
                })
            }
            tag::STDOUT => Self::Stdout(r.bytes("data", MIN_CHUNK, MAX_CHUNK)?.to_vec()),
            tag::STDERR => Self::Stderr(r.bytes("data", MIN_CHUNK, MAX_CHUNK)?.to_vec()),
            tag::STDIN => Self::Stdin(r.bytes("data", MIN_CHUNK, MAX_CHUNK)?.to_vec()),
            tag::STDIN_END => Self::StdinEnd,
            tag::EXIT => {
                let kind = r.u8("exit kind")?;
                let value = r.i32("exit value")?;
                Self::Exit(ExitStatus::from_wire(kind, value)?)
            }
            tag::ERROR => {
                let raw = r.u16("error code")?;
                let code = ErrorCode::from_code(raw).ok_or(MessageError::ErrorCode(raw))?;
                let message = r.string("error message", MAX_ERROR_MESSAGE)?.to_owned();
                Self::Error { code, message }
            }
            tag::AUDIT_EVENT => {
                let kind = r.string("audit kind", MAX_AUDIT_NAME)?;
                check_audit_name("audit kind", kind)?;
                let n = r.count("audit fields", 0, MAX_AUDIT_FIELDS)?;
                let mut fields = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = r.string("audit field name", MAX_AUDIT_NAME)?;
                    check_audit_name("audit field name", name)?;
                    let value = r.string("audit field value", MAX_AUDIT_VALUE)?;
                    fields.push((name.to_owned(), value.to_owned()));
                }
                check_unique_fields(&fields)?;
                Self::AuditEvent {
                    kind: kind.to_owned(),
                    fields,
                }
            }
            tag::FILE_ENTRY => {
                let path = r.string("file path", MAX_FILE_PATH)?.to_owned();
                let kind = FileKind::from_code(r.u8("file kind")?)?;
                let mode = r.u32("file mode")?;
                let mtime = r.i64("file mtime")?;
                let size = r.u64("file size")?;
                let e = FileEntry {
                    path,
                    kind,
                    mode,
                    mtime,
                    size,
                };
                check_file_entry(&e)?;
                Self::FileEntry(e)
            }
            tag::FILE_DATA => {
                Self::FileData(r.bytes("file data", MIN_CHUNK, MAX_FILE_CHUNK)?.to_vec())
            }
            tag::FILE_END => {
                let raw = r.bytes("sha256", SHA256_LEN, SHA256_LEN)?;
                let mut sha256 = [0u8; SHA256_LEN];
                sha256.copy_from_slice(raw);
                Self::FileEnd { sha256 }
            }
            tag::FILES_DONE => {
                let count = r.u64("file count")?;
                let bytes = r.u64("file bytes")?;
                Self::FilesDone { count, bytes }
            }
            other => return Err(MessageError::UnknownTag(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_is_code_or_128_plus_signal() {
        assert_eq!(ExitStatus::Exited(0).exit_code(), 0);
        assert_eq!(ExitStatus::Exited(255).exit_code(), 255);
        assert_eq!(ExitStatus::Signaled(9).exit_code(), 137);
        assert_eq!(ExitStatus::Signaled(64).exit_code(), 192);
    }

    #[test]
    fn exit_wire_ranges() {
        assert_eq!(ExitStatus::from_wire(0, 0), Ok(ExitStatus::Exited(0)));
        assert_eq!(ExitStatus::from_wire(0, 255), Ok(ExitStatus::Exited(255)));
        assert_eq!(ExitStatus::from_wire(1, 1), Ok(ExitStatus::Signaled(1)));
        assert_eq!(ExitStatus::from_wire(1, 64), Ok(ExitStatus::Signaled(64)));
        for (kind, value) in [(0, -1), (0, 256), (1, 0), (1, 65), (1, -9), (2, 0)] {
            assert_eq!(
                ExitStatus::from_wire(kind, value),
                Err(MessageError::Exit { kind, value })
            );
        }
        assert!(ExitStatus::Signaled(0).to_wire().is_err());
        assert!(ExitStatus::Signaled(65).to_wire().is_err());
        assert_eq!(ExitStatus::Exited(7).to_wire(), Ok((0, 7)));
    }

    #[test]
    fn error_codes_are_1_to_5() {
        for (i, code) in ErrorCode::ALL.into_iter().enumerate() {
            let wire = u16::try_from(i + 1).expect("small");
            assert_eq!(code.code(), wire);
            assert_eq!(ErrorCode::from_code(wire), Some(code));
        }
        assert_eq!(ErrorCode::from_code(0), None);
        assert_eq!(ErrorCode::from_code(6), None);
    }

    #[test]
    fn kinds_name_every_variant() {
        let all = [
            Message::Hello {
                version: 1,
                capabilities: vec![],
            },
            Message::RunSpec(RunSpec {
                argv: vec!["true".into()],
                env: vec![],
                cwd: "/".into(),
                timeout_ms: None,
                max_output_bytes: 0,
                stdin: false,
            }),
            Message::Stdout(vec![1]),
            Message::Stderr(vec![1]),
            Message::Stdin(vec![1]),
            Message::StdinEnd,
            Message::Exit(ExitStatus::Exited(0)),
            Message::Error {
                code: ErrorCode::Internal,
                message: String::new(),
            },
            Message::AuditEvent {
                kind: "exec".into(),
                fields: vec![],
            },
            Message::FileEntry(FileEntry {
                path: "a".into(),
                kind: FileKind::File,
                mode: 0o644,
                mtime: 0,
                size: 1,
            }),
            Message::FileData(vec![1]),
            Message::FileEnd { sha256: [0; 32] },
            Message::FilesDone { count: 0, bytes: 0 },
        ];
        let kinds: Vec<_> = all.iter().map(Message::kind).collect();
        assert_eq!(
            kinds,
            [
                "Hello",
                "RunSpec",
                "Stdout",
                "Stderr",
                "Stdin",
                "StdinEnd",
                "Exit",
                "Error",
                "AuditEvent",
                "FileEntry",
                "FileData",
                "FileEnd",
                "FilesDone"
            ]
        );
        let tags: Vec<_> = all.iter().map(Message::tag).collect();
        assert_eq!(tags, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
    }

    #[test]
    fn audit_names() {
        for good in [
            "exec",
            "a",
            "process.exit",
            "x_1-2",
            &"n".repeat(MAX_AUDIT_NAME),
        ] {
            assert_eq!(check_audit_name("k", good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "Exec",
            "ex ec",
            "ex\u{e9}c",
            "a/b",
            "a=b",
            &"n".repeat(MAX_AUDIT_NAME + 1),
        ] {
            assert_eq!(
                check_audit_name("k", bad),
                Err(MessageError::AuditName("k")),
                "{bad:?}"
            );
        }
        let fields = |names: &[&str]| -> Vec<(String, String)> {
            names
                .iter()
                .map(|n| ((*n).to_owned(), String::new()))
                .collect()
        };
        assert_eq!(check_unique_fields(&fields(&["a", "b", "c"])), Ok(()));
        assert_eq!(
            check_unique_fields(&fields(&["a", "b", "a"])),
            Err(MessageError::DuplicateAuditField("a".into()))
        );
    }

    #[test]
    fn file_paths() {
        for good in [
            "a",
            "a/b",
            "a.b/.c/..d",
            "out/x y",
            &"p".repeat(MAX_FILE_PATH),
        ] {
            assert_eq!(check_file_path(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/./b",
            ".",
            "a//b",
            "a/",
            "a\0b",
            &"p".repeat(MAX_FILE_PATH + 1),
        ] {
            assert_eq!(check_file_path(bad), Err(MessageError::FilePath), "{bad:?}");
        }
    }

    #[test]
    fn file_entry_rules() {
        let e = |kind, mode, size| FileEntry {
            path: "x".into(),
            kind,
            mode,
            mtime: -1,
            size,
        };
        assert_eq!(
            check_file_entry(&e(FileKind::File, 0o7777, u64::MAX)),
            Ok(())
        );
        assert_eq!(check_file_entry(&e(FileKind::Dir, 0o755, 0)), Ok(()));
        assert_eq!(
            check_file_entry(&e(FileKind::File, 0o10644, 0)),
            Err(MessageError::FileMode(0o10644))
        );
        assert_eq!(
            check_file_entry(&e(FileKind::Dir, 0o755, 1)),
            Err(MessageError::DirSize(1))
        );
        assert_eq!(FileKind::from_code(2), Err(MessageError::FileKind(2)));
    }
}
