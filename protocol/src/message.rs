//! The messages of protocol version 1 and their payload encodings.

use crate::limits::{
    FILE_MODE_MASK, MAX_ARGV, MAX_AUDIT_FIELDS, MAX_AUDIT_NAME, MAX_AUDIT_VALUE, MAX_CAPABILITIES,
    MAX_CAPABILITY_LEN, MAX_CHUNK, MAX_ENV, MAX_ERROR_MESSAGE, MAX_EXEC_USER, MAX_EXIT_CODE,
    MAX_FILE_CHUNK, MAX_FILE_PATH, MAX_SIGNAL, MAX_STRING, MIN_ARGV, MIN_CHUNK, MIN_SIGNAL,
    SHA256_LEN,
};
use crate::limits::{
    MAX_COLLECT_PATTERNS, MAX_HTTP_CHUNK, MAX_HTTP_HEADERS, MAX_HTTP_HEADER_NAME,
    MAX_HTTP_HEADER_VALUE, MAX_HTTP_METHOD, MAX_HTTP_STATUS, MAX_HTTP_TARGET, MAX_MOUNTS,
    MAX_RUN_AS, MIN_HTTP_STATUS,
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
    /// An HTTP method that is empty or has a byte other than `A-Z`.
    #[error("http method is not 1..={MAX_HTTP_METHOD} bytes of A-Z")]
    HttpMethod,
    /// An HTTP target that does not start with `/` (absolute URLs and
    /// `authority` forms are refused) or holds a control byte or space.
    #[error("http target is not an origin-form path")]
    HttpTarget,
    /// A header name that is not an HTTP token, or a value with CR, LF or
    /// NUL.
    #[error("http header {0:?} is malformed")]
    HttpHeader(String),
    /// A status outside 100 ..= 599.
    #[error("http status {0} is out of range")]
    HttpStatus(u16),
    /// A collect pattern that is empty, absolute or has a `..` component.
    #[error("collect pattern {0:?} is not a relative pattern")]
    CollectPattern(String),
    /// An exec's user that is not 1 ..= 64 bytes of `A-Za-z0-9_.:-`.
    #[error("exec user {0:?} is not a user name or uid[:gid]")]
    ExecUser(String),
    /// A `RunAs` user that is not `USER` or `USER:GROUP`, each 1 or more
    /// of `A-Z a-z 0-9 _ . -`, not starting with `-`.
    #[error("run-as user {0:?} is not USER or USER:GROUP of A-Z a-z 0-9 _ . -")]
    RunAs(String),
    /// A `Mounts` entry whose target is not an absolute, normalized path
    /// without `,`, `:` or control characters, or whose file name is not
    /// one plain component.
    #[error("bad mount: {0:?}")]
    Mount(String),
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
    /// Guest → host, first on a model connection (port
    /// [`crate::MODEL_PORT`], only with the [`crate::capability::MODEL`]
    /// capability): one HTTP request's head. Its body follows as `HttpBody`
    /// chunks and an `HttpEnd`. `method` is 1 ..= 16 bytes of `A-Z`;
    /// `target` is origin form (starts with `/`, printable ASCII, no space);
    /// header names are HTTP tokens, values hold no CR, LF or NUL.
    HttpRequest {
        method: String,
        target: String,
        headers: Vec<(String, String)>,
    },
    /// Host → guest on a model connection, after the request's `HttpEnd`:
    /// the response head (status 100 ..= 599); its body follows as
    /// `HttpBody` chunks, as the upstream produces them, and an `HttpEnd`.
    HttpResponse {
        status: u16,
        headers: Vec<(String, String)>,
    },
    /// A chunk (1 ..= [`MAX_HTTP_CHUNK`] bytes) of an HTTP body, either way.
    HttpBody(Vec<u8>),
    /// The end of an HTTP body, either way.
    HttpEnd,
    /// Host → guest on the control connection, right after `RunSpec`, only
    /// when the guest's `Hello` listed [`crate::capability::COLLECT`]: the
    /// results to send instead of `/workspace/out`, as glob patterns
    /// relative to `/workspace` (`*` and `?` within a component, `**` for
    /// any number of components). 1 ..= 64 patterns.
    Collect { patterns: Vec<String> },
    /// Host → guest on an exec connection, right after `RunSpec`, only when
    /// the guest's `Hello` on that connection listed
    /// [`crate::capability::USER`]: who the command runs as in the agent's
    /// container (a user name or `uid[:gid]` as `podman exec --user` takes
    /// it): 1 ..= [`MAX_EXEC_USER`] bytes of `A-Za-z0-9_.:-`, not starting
    /// with `-`.
    ExecUser { user: String },
    /// Host → guest on the control connection, after `RunSpec` (and
    /// `Collect`, if one is sent), only when both `Hello`s listed
    /// [`crate::capability::RUN_AS`]: the user the command runs as in its
    /// container, `USER` or `USER:GROUP` (names or numbers, 1 ..=
    /// [`MAX_RUN_AS`] bytes of `A-Z a-z 0-9 _ . -` and one optional `:`),
    /// resolved by the container engine in the container's own root.
    RunAs { user: String },
    /// Host → guest on the control connection, after `RunAs` (or what
    /// precedes it), only when both `Hello`s listed
    /// [`crate::capability::MOUNTS`]: the live mounts of the agent's
    /// container, 1 ..= [`MAX_MOUNTS`]. Mount `i` is served on
    /// [`crate::MOUNTS_PORT`] by a connection that starts with
    /// [`crate::MOUNT_HELLO`] and `i` (`u32`, little-endian), then carries
    /// the FUSE protocol (docs/LIVE-MOUNTS.md).
    Mounts { mounts: Vec<MountEntry> },
}

/// One live mount of the agent's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it appears in the container: absolute, normalized (no empty,
    /// `.` or `..` component), no `,`, `:` or control characters, at most
    /// [`MAX_FILE_PATH`] bytes, not `/`.
    pub target: String,
    /// A single-file mount: the file's name in the served directory (one
    /// plain component); `None`: the served directory itself.
    pub file: Option<String>,
    /// Read-only (the host enforces it; the guest also mounts it so).
    pub readonly: bool,
}

/// Checks a mount entry (see [`MountEntry`]).
pub fn check_mount(m: &MountEntry) -> Result<(), MessageError> {
    let bad = |c: char| c.is_control() || c == ',' || c == ':';
    let target_ok = m.target.len() > 1
        && m.target.len() <= MAX_FILE_PATH
        && m.target.starts_with('/')
        && !m.target.contains(bad)
        && check_file_path(&m.target[1..]).is_ok();
    let file_ok = match &m.file {
        None => true,
        Some(name) => {
            !name.is_empty()
                && name.len() <= 255
                && name != "."
                && name != ".."
                && !name.contains('/')
                && !name.contains(|c: char| c.is_control())
        }
    };
    if target_ok && file_ok {
        Ok(())
    } else {
        Err(MessageError::Mount(m.target.clone()))
    }
}

/// Checks an exec's user: 1 ..= [`MAX_EXEC_USER`] bytes of
/// `A-Za-z0-9_.:-`, not starting with `-`.
pub fn check_exec_user(user: &str) -> Result<(), MessageError> {
    let ok = !user.is_empty()
        && user.len() <= MAX_EXEC_USER
        && !user.starts_with('-')
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(MessageError::ExecUser(user.to_owned()))
    }
}

/// Checks a `RunAs` user: `USER` or `USER:GROUP`, each part non-empty, of
/// `A-Z a-z 0-9 _ . -`, not starting with `-`.
pub fn check_run_as(user: &str) -> Result<(), MessageError> {
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('-')
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    };
    let ok = user.len() <= MAX_RUN_AS
        && match user.split_once(':') {
            Some((u, g)) => part(u) && part(g),
            None => part(user),
        };
    if ok {
        Ok(())
    } else {
        Err(MessageError::RunAs(user.to_owned()))
    }
}

/// Checks an HTTP method: 1 ..= [`MAX_HTTP_METHOD`] bytes of `A-Z`.
fn check_http_method(m: &str) -> Result<(), MessageError> {
    if !m.is_empty() && m.len() <= MAX_HTTP_METHOD && m.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(MessageError::HttpMethod)
    }
}

/// Checks an HTTP target: origin form (starts with `/`), printable ASCII
/// without spaces.
fn check_http_target(t: &str) -> Result<(), MessageError> {
    if t.starts_with('/') && t.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(MessageError::HttpTarget)
    }
}

/// Checks header pairs: names are RFC 9110 tokens, values have no CR, LF
/// or NUL.
fn check_http_headers(headers: &[(String, String)]) -> Result<(), MessageError> {
    for (name, value) in headers {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        let ok = !name.is_empty()
            && name.bytes().all(token)
            && !value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0));
        if !ok {
            return Err(MessageError::HttpHeader(name.clone()));
        }
    }
    Ok(())
}

fn check_http_status(status: u16) -> Result<(), MessageError> {
    if (MIN_HTTP_STATUS..=MAX_HTTP_STATUS).contains(&status) {
        Ok(())
    } else {
        Err(MessageError::HttpStatus(status))
    }
}

/// Checks a collect pattern: non-empty, relative, no empty, `.` or `..`
/// component (the glob characters `*`, `?` and `**` are allowed).
fn check_collect_pattern(p: &str) -> Result<(), MessageError> {
    check_file_path(p).map_err(|_| MessageError::CollectPattern(p.to_owned()))
}

fn write_headers(w: &mut Writer, headers: &[(String, String)]) -> Result<(), MessageError> {
    w.count("http headers", headers.len(), 0, MAX_HTTP_HEADERS)?;
    for (name, value) in headers {
        w.string("http header name", name, MAX_HTTP_HEADER_NAME)?;
        w.string("http header value", value, MAX_HTTP_HEADER_VALUE)?;
    }
    check_http_headers(headers)
}

fn read_headers(r: &mut Reader<'_>) -> Result<Vec<(String, String)>, MessageError> {
    let n = r.count("http headers", 0, MAX_HTTP_HEADERS)?;
    let mut headers = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.string("http header name", MAX_HTTP_HEADER_NAME)?;
        let value = r.string("http header value", MAX_HTTP_HEADER_VALUE)?;
        headers.push((name.to_owned(), value.to_owned()));
    }
    check_http_headers(&headers)?;
    Ok(headers)
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
    pub const HTTP_REQUEST: u8 = 14;
    pub const HTTP_RESPONSE: u8 = 15;
    pub const HTTP_BODY: u8 = 16;
    pub const HTTP_END: u8 = 17;
    pub const COLLECT: u8 = 18;
    pub const EXEC_USER: u8 = 19;
    pub const RUN_AS: u8 = 20;
    pub const MOUNTS: u8 = 21;
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
            Self::HttpRequest { .. } => "HttpRequest",
            Self::HttpResponse { .. } => "HttpResponse",
            Self::HttpBody(_) => "HttpBody",
            Self::HttpEnd => "HttpEnd",
            Self::Collect { .. } => "Collect",
            Self::ExecUser { .. } => "ExecUser",
            Self::RunAs { .. } => "RunAs",
            Self::Mounts { .. } => "Mounts",
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
            Self::HttpRequest { .. } => tag::HTTP_REQUEST,
            Self::HttpResponse { .. } => tag::HTTP_RESPONSE,
            Self::HttpBody(_) => tag::HTTP_BODY,
            Self::HttpEnd => tag::HTTP_END,
            Self::Collect { .. } => tag::COLLECT,
            Self::ExecUser { .. } => tag::EXEC_USER,
            Self::RunAs { .. } => tag::RUN_AS,
            Self::Mounts { .. } => tag::MOUNTS,
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
            Self::HttpRequest {
                method,
                target,
                headers,
            } => {
                w.string("http method", method, MAX_HTTP_METHOD)?;
                check_http_method(method)?;
                w.string("http target", target, MAX_HTTP_TARGET)?;
                check_http_target(target)?;
                write_headers(w, headers)?;
            }
            Self::HttpResponse { status, headers } => {
                check_http_status(*status)?;
                w.u16(*status);
                write_headers(w, headers)?;
            }
            Self::HttpBody(data) => {
                w.bytes("http body", data, MIN_CHUNK, MAX_HTTP_CHUNK)?;
            }
            Self::HttpEnd => {}
            Self::Collect { patterns } => {
                w.count("collect patterns", patterns.len(), 1, MAX_COLLECT_PATTERNS)?;
                for p in patterns {
                    w.string("collect pattern", p, MAX_FILE_PATH)?;
                    check_collect_pattern(p)?;
                }
            }
            Self::ExecUser { user } => {
                w.string("exec user", user, MAX_EXEC_USER)?;
                check_exec_user(user)?;
            }
            Self::RunAs { user } => {
                w.string("run-as user", user, MAX_RUN_AS)?;
                check_run_as(user)?;
            }
            Self::Mounts { mounts } => {
                w.count("mounts", mounts.len(), 1, MAX_MOUNTS)?;
                for m in mounts {
                    check_mount(m)?;
                    w.string("mount target", &m.target, MAX_FILE_PATH)?;
                    w.string("mount file", m.file.as_deref().unwrap_or(""), 255)?;
                    w.flag(m.readonly);
                }
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
            tag::HTTP_REQUEST => {
                let method = r.string("http method", MAX_HTTP_METHOD)?.to_owned();
                check_http_method(&method)?;
                let target = r.string("http target", MAX_HTTP_TARGET)?.to_owned();
                check_http_target(&target)?;
                let headers = read_headers(&mut r)?;
                Self::HttpRequest {
                    method,
                    target,
                    headers,
                }
            }
            tag::HTTP_RESPONSE => {
                let status = r.u16("http status")?;
                check_http_status(status)?;
                let headers = read_headers(&mut r)?;
                Self::HttpResponse { status, headers }
            }
            tag::HTTP_BODY => {
                Self::HttpBody(r.bytes("http body", MIN_CHUNK, MAX_HTTP_CHUNK)?.to_vec())
            }
            tag::HTTP_END => Self::HttpEnd,
            tag::COLLECT => {
                let n = r.count("collect patterns", 1, MAX_COLLECT_PATTERNS)?;
                let mut patterns = Vec::with_capacity(n);
                for _ in 0..n {
                    let p = r.string("collect pattern", MAX_FILE_PATH)?;
                    check_collect_pattern(p)?;
                    patterns.push(p.to_owned());
                }
                Self::Collect { patterns }
            }
            tag::EXEC_USER => {
                let user = r.string("exec user", MAX_EXEC_USER)?;
                check_exec_user(user)?;
                Self::ExecUser {
                    user: user.to_owned(),
                }
            }
            tag::RUN_AS => {
                let user = r.string("run-as user", MAX_RUN_AS)?;
                check_run_as(user)?;
                Self::RunAs {
                    user: user.to_owned(),
                }
            }
            tag::MOUNTS => {
                let n = r.count("mounts", 1, MAX_MOUNTS)?;
                let mut mounts = Vec::with_capacity(n);
                for _ in 0..n {
                    let target = r.string("mount target", MAX_FILE_PATH)?.to_owned();
                    let file = r.string("mount file", 255)?;
                    let file = (!file.is_empty()).then(|| file.to_owned());
                    let readonly = r.flag("mount readonly")?;
                    let m = MountEntry {
                        target,
                        file,
                        readonly,
                    };
                    check_mount(&m)?;
                    mounts.push(m);
                }
                Self::Mounts { mounts }
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
            Message::HttpRequest {
                method: "GET".into(),
                target: "/v1/models".into(),
                headers: vec![],
            },
            Message::HttpResponse {
                status: 200,
                headers: vec![],
            },
            Message::HttpBody(vec![1]),
            Message::HttpEnd,
            Message::Collect {
                patterns: vec!["*.txt".into()],
            },
            Message::ExecUser {
                user: "1000:1000".into(),
            },
            Message::RunAs {
                user: "1000".into(),
            },
            Message::Mounts {
                mounts: vec![MountEntry {
                    target: "/workspace".into(),
                    file: None,
                    readonly: false,
                }],
            },
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
                "FilesDone",
                "HttpRequest",
                "HttpResponse",
                "HttpBody",
                "HttpEnd",
                "Collect",
                "ExecUser",
                "RunAs",
                "Mounts"
            ]
        );
        let tags: Vec<_> = all.iter().map(Message::tag).collect();
        assert_eq!(
            tags,
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
        );
    }

    #[test]
    fn run_as_users() {
        for good in [
            "0",
            "1000",
            "1000:1000",
            "app",
            "app:staff",
            "a.b_c-d",
            &"u".repeat(256),
        ] {
            assert_eq!(check_run_as(good), Ok(()), "{good}");
            let msg = Message::RunAs { user: good.into() };
            let frame = crate::encode(&msg).expect("encodes");
            let mut r = frame.as_slice();
            assert_eq!(crate::read_frame(&mut r).expect("decodes"), msg);
        }
        for bad in [
            "",
            ":",
            "app:",
            ":staff",
            "a:b:c",
            "-u",
            "app:-g",
            "a b",
            "a/b",
            "a\n",
            "\u{e9}",
            "root\0",
            &"u".repeat(257),
        ] {
            assert!(check_run_as(bad).is_err(), "{bad:?}");
            assert!(
                crate::encode(&Message::RunAs { user: bad.into() }).is_err(),
                "the encoder refuses {bad:?}"
            );
        }
        // A hand-made frame with a bad user is refused by the decoder.
        let payload = {
            let mut p = vec![19u8];
            p.extend_from_slice(&3u32.to_le_bytes());
            p.extend_from_slice(b"a/b");
            p
        };
        let mut frame = u32::try_from(payload.len())
            .expect("len")
            .to_le_bytes()
            .to_vec();
        frame.extend_from_slice(&payload);
        let mut r = frame.as_slice();
        assert!(crate::read_frame(&mut r).is_err());
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
    fn http_rules() {
        assert_eq!(check_http_method("POST"), Ok(()));
        for bad in ["", "post", "GET ", &"A".repeat(MAX_HTTP_METHOD + 1)] {
            assert_eq!(
                check_http_method(bad),
                Err(MessageError::HttpMethod),
                "{bad:?}"
            );
        }
        assert_eq!(check_http_target("/v1/messages?beta=true"), Ok(()));
        for bad in ["", "v1", "http://evil/v1", "/a b", "/a\r\nX: y", "//x\0"] {
            assert_eq!(
                check_http_target(bad),
                Err(MessageError::HttpTarget),
                "{bad:?}"
            );
        }
        let h = |n: &str, v: &str| vec![(n.to_owned(), v.to_owned())];
        assert_eq!(check_http_headers(&h("x-api-key", "abc def")), Ok(()));
        for (n, v) in [
            ("", "x"),
            ("a b", "x"),
            ("a:b", "x"),
            ("a", "x\r\ny: z"),
            ("a", "\0"),
        ] {
            assert!(check_http_headers(&h(n, v)).is_err(), "{n:?} {v:?}");
        }
        assert_eq!(check_http_status(200), Ok(()));
        assert_eq!(check_http_status(99), Err(MessageError::HttpStatus(99)));
        assert_eq!(check_http_status(600), Err(MessageError::HttpStatus(600)));
        assert_eq!(check_collect_pattern("**/*.txt"), Ok(()));
        for bad in ["", "/etc/*", "../x", "a/../b"] {
            assert!(check_collect_pattern(bad).is_err(), "{bad:?}");
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

    #[test]
    fn exec_users_are_names_or_ids() {
        for good in ["root", "1000", "1000:1000", "agent", "www-data", "a.b_c"] {
            let msg = Message::ExecUser { user: good.into() };
            let frame = crate::encode(&msg).expect(good);
            assert_eq!(crate::read_frame(frame.as_slice()).expect(good), msg);
        }
        for bad in ["", "-u", "a b", "a/b", "a\n", "é", &"u".repeat(65), "$(id)"] {
            assert!(
                crate::encode(&Message::ExecUser { user: bad.into() }).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn mount_targets_and_file_names_are_checked() {
        let entry = |target: &str, file: Option<&str>| MountEntry {
            target: target.into(),
            file: file.map(str::to_owned),
            readonly: true,
        };
        for good in [
            entry("/workspace", None),
            entry("/workspace/agent/CLAUDE.md", Some("CLAUDE.md")),
            entry("/home/node/.claude", None),
        ] {
            check_mount(&good).expect("a good mount");
            let msg = Message::Mounts { mounts: vec![good] };
            let frame = crate::encode(&msg).expect("encodes");
            assert_eq!(crate::decode_body(&frame[4..]).expect("decodes"), msg);
        }
        for bad in [
            entry("/", None),
            entry("", None),
            entry("workspace", None),
            entry("/a/../etc", None),
            entry("/a//b", None),
            entry("/a/./b", None),
            entry("/a/", None),
            entry("/a,b", None),
            entry("/a:ro", None),
            entry("/a\nb", None),
            entry("/a", Some("")),
            entry("/a", Some("..")),
            entry("/a", Some("x/y")),
        ] {
            assert!(check_mount(&bad).is_err(), "{bad:?}");
            assert!(crate::encode(&Message::Mounts { mounts: vec![bad] }).is_err());
        }
        let many = vec![entry("/m", None); MAX_MOUNTS + 1];
        assert!(crate::encode(&Message::Mounts { mounts: many }).is_err());
    }
}
