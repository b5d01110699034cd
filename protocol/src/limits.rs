//! Every limit of protocol version 1, as named constants.
//!
//! The decoder rejects anything past these and the encoder refuses to
//! produce it, so an honest peer never sends a frame the other side rejects.
//! Lengths are in bytes (strings are measured in UTF-8 bytes, not chars).

/// Bytes of the little-endian `u32` body length that starts every frame.
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest frame body (tag + payload): 1 MiB.
pub const MAX_FRAME_BODY: usize = 1024 * 1024;

/// Fewest `RunSpec.argv` entries.
pub const MIN_ARGV: usize = 1;

/// Most `RunSpec.argv` entries.
pub const MAX_ARGV: usize = 4096;

/// Most `RunSpec.env` pairs.
pub const MAX_ENV: usize = 4096;

/// Longest argv entry, env name, env value or cwd: 128 KiB.
pub const MAX_STRING: usize = 128 * 1024;

/// Most `Hello.capabilities` entries.
pub const MAX_CAPABILITIES: usize = 32;

/// Longest capability string.
pub const MAX_CAPABILITY_LEN: usize = 64;

/// Fewest bytes in a `Stdout`/`Stderr`/`Stdin` chunk (empty chunks are
/// refused: end of input is `StdinEnd`, not an empty chunk).
pub const MIN_CHUNK: usize = 1;

/// Most bytes in a `Stdout`/`Stderr`/`Stdin` chunk: 64 KiB.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Longest `Error.message`: 4 KiB.
pub const MAX_ERROR_MESSAGE: usize = 4 * 1024;

/// Largest exit code in `Exit{kind: 0}`.
pub const MAX_EXIT_CODE: i32 = 255;

/// Smallest signal number in `Exit{kind: 1}`.
pub const MIN_SIGNAL: i32 = 1;

/// Largest signal number in `Exit{kind: 1}` (Linux `SIGRTMAX`).
pub const MAX_SIGNAL: i32 = 64;

/// Longest `AuditEvent.kind` and field name (each at least 1 byte, of
/// `a-z`, `0-9`, `.`, `_` and `-` only).
pub const MAX_AUDIT_NAME: usize = 64;

/// Most `AuditEvent.fields` pairs.
pub const MAX_AUDIT_FIELDS: usize = 64;

/// Longest `AuditEvent` field value: 4 KiB.
pub const MAX_AUDIT_VALUE: usize = 4 * 1024;

/// Longest `FileEntry.path`: 4 KiB (Linux `PATH_MAX`).
pub const MAX_FILE_PATH: usize = 4096;

/// Most bytes in a `FileData` chunk: 64 KiB.
pub const MAX_FILE_CHUNK: usize = 64 * 1024;

/// Bytes of the sha256 digest in `FileEnd`.
pub const SHA256_LEN: usize = 32;

/// Permission bits a `FileEntry.mode` may carry (`0o7777`); the file type is
/// `FileEntry.kind`, never the mode.
pub const FILE_MODE_MASK: u32 = 0o7777;

/// Longest `HttpRequest.method`: 1 ..= 16 bytes of `A-Z`.
pub const MAX_HTTP_METHOD: usize = 16;

/// Longest `HttpRequest.target` (path and query): 8 KiB.
pub const MAX_HTTP_TARGET: usize = 8 * 1024;

/// Most header pairs in an `HttpRequest` or `HttpResponse`.
pub const MAX_HTTP_HEADERS: usize = 100;

/// Longest header name (1 ..= 256 bytes of HTTP token characters).
pub const MAX_HTTP_HEADER_NAME: usize = 256;

/// Longest header value (no CR, LF or NUL): 8 KiB.
pub const MAX_HTTP_HEADER_VALUE: usize = 8 * 1024;

/// Most bytes in an `HttpBody` chunk: 64 KiB.
pub const MAX_HTTP_CHUNK: usize = 64 * 1024;

/// Smallest and largest `HttpResponse.status`.
pub const MIN_HTTP_STATUS: u16 = 100;
/// Largest `HttpResponse.status`.
pub const MAX_HTTP_STATUS: u16 = 599;

/// Longest `RunAs.user` (`USER` or `USER:GROUP`).
pub const MAX_RUN_AS: usize = 256;

/// Most `Collect.patterns`.
pub const MAX_COLLECT_PATTERNS: usize = 64;

/// Largest model request body either side accepts: 32 MiB, the Messages
/// API's own limit. The in-guest endpoint and the host's proxy hold one
/// limit (`--model-max-request-bytes`, at most this, passed to the init on
/// the kernel command line as `airlock.model_max_body`).
pub const MAX_MODEL_BODY: u64 = 32 << 20;

/// Longest `ExecUser.user`.
pub const MAX_EXEC_USER: usize = 64;

/// Most live mounts (`Mounts.mounts`) of one sandbox.
pub const MAX_MOUNTS: usize = 32;

/// Smallest FUSE request on a mount connection (its `fuse_in_header`).
pub const MIN_FUSE_REQUEST: usize = 40;
/// Largest FUSE request or reply on a mount connection: 1 MiB of data
/// plus 4 KiB of headers. A length outside the bounds ends the connection.
pub const MAX_FUSE_MESSAGE: usize = (1 << 20) + 4096;
/// Smallest FUSE reply (its `fuse_out_header`).
pub const MIN_FUSE_REPLY: usize = 16;
