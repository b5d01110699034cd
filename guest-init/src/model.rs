//! The in-guest model endpoint: a small, strict HTTP/1.1 server on
//! `127.0.0.1:`[`PORT`] that relays each request to the host's model proxy
//! over its own vsock connection ([`MODEL_PORT`], PROTOCOL.md "Model
//! calls") and streams the answer back as it arrives.
//!
//! It runs only when the host's `Hello` listed the `model` capability. The
//! agent finds it through [`agent_env`]: `ANTHROPIC_BASE_URL`,
//! `OPENAI_BASE_URL`, and *placeholder* API keys (the SDKs refuse to start
//! without one). The real key stays on the host, which drops every
//! credential header the guest sends and injects its own.
//!
//! Where it listens:
//! - with the agent in a container ([`listen_in_new_netns`]): a helper
//!   thread unshares a fresh network namespace holding only `lo`, binds the
//!   listener there (a socket stays in the namespace it was made in) and
//!   pins the namespace at [`NETNS_PATH`], which podman joins with
//!   `--network ns:PATH`. The container has loopback and the endpoint, and
//!   still no network device.
//! - otherwise ([`listen_here`]), in the VM's own namespace.
//!
//! One thread accepts; each connection gets its own thread, at most
//! [`MAX_CONNECTIONS`] at once (beyond that: `429`). A request's head is at
//! most [`MAX_HEAD`] bytes, its body at most [`MAX_BODY`] (by
//! `Content-Length` or chunked), every client read and write times out
//! after [`CLIENT_TIMEOUT`] and the whole request must arrive within
//! [`REQUEST_DEADLINE`] (a client trickling bytes cannot keep a slot);
//! each read from the host waits at most [`HOST_TIMEOUT`] (a model may
//! think for minutes). Hop-by-hop headers are dropped ([`HOP_BY_HOP`]
//! and those `Connection` names); absolute-URL targets are refused. The
//! response goes back with `Connection: close`, chunked (or with the
//! host's `Content-Length`), each `HttpBody` written as it arrives so that
//! server-sent events reach the agent incrementally. Errors of the endpoint
//! itself are API-shaped JSON (Anthropic's `{"type":"error","error":{…}}`,
//! which OpenAI clients read too through `error.message`).

use std::ffi::CString;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use airlock_protocol::limits::{MAX_AUDIT_VALUE, MAX_HTTP_CHUNK, MAX_HTTP_HEADERS};
use airlock_protocol::{read_frame, write_frame, FrameError, Message, HOST_CID, MODEL_PORT};

use crate::console;
use crate::vsock::VsockStream;

/// The endpoint's TCP port on 127.0.0.1.
pub const PORT: u16 = 8088;
/// Where the agent container's network namespace is pinned.
pub const NETNS_PATH: &str = "/run/airlock/netns/agent";
/// The API key the agent sees: a placeholder, never a real key (the host
/// holds that one and drops whatever key the guest sends).
pub const PLACEHOLDER_KEY: &str = "airlock-placeholder";
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest request body: the protocol's model body limit (32 MiB). The
/// host passes its `--model-max-request-bytes` on the kernel command line
/// (`airlock.model_max_body`); the endpoint takes the smaller of the two,
/// so that the agent meets one limit end to end.
pub const MAX_BODY: u64 = airlock_protocol::limits::MAX_MODEL_BODY;
/// What the connectivity probe answers (`HEAD`/`GET /api/hello`, Claude
/// Code's check before its first call): never forwarded.
const HELLO_BODY: &str = r#"{"ok":true,"service":"airlock model endpoint"}"#;
/// Longest header value (the protocol's limit).
const MAX_HEADER_VALUE: usize = 8 * 1024;
/// Longest header name (the protocol's limit).
const MAX_HEADER_NAME: usize = 256;
/// Longest request target (the protocol's limit).
const MAX_TARGET: usize = 8 * 1024;
/// Longest chunk-size line (with extensions) or trailer line in a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
/// Longest chunked-body trailer section.
const MAX_TRAILERS: usize = 16 * 1024;
/// Bound on each read from and write to the agent.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on reading a whole request (head and body) from the agent.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(300);
/// Bound on each read from the host: a model may think for minutes before
/// its first byte.
pub const HOST_TIMEOUT: Duration = Duration::from_secs(600);
/// After an answer, how long unread request bytes are drained before
/// closing (closing with unread data would reset the connection and could
/// lose the answer on its way).
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes drained after an answer.
const LINGER_BYTES: u64 = MAX_BODY + 64 * 1024;

/// Request headers never relayed: hop-by-hop headers (RFC 9110 7.6.1), the
/// framing the init replaces with protocol frames, the host (the host
/// proxy picks the upstream), and `Expect`, which the init answers itself.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "upgrade",
    "te",
    "trailer",
    "expect",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether a header is never relayed (see [`HOP_BY_HOP`]; any `Proxy-*`).
fn hop_by_hop(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    HOP_BY_HOP.contains(&lower.as_str()) || lower.starts_with("proxy-")
}

/// The endpoint could not be set up (the run goes on without it).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to create the agent's network namespace")]
    Unshare(#[source] io::Error),
    #[error("failed to bring up lo")]
    Loopback(#[source] io::Error),
    #[error("failed to pin the network namespace at {NETNS_PATH}")]
    Pin(#[source] io::Error),
    #[error("failed to listen on 127.0.0.1:{PORT}")]
    Listen(#[source] io::Error),
    #[error("failed to start the endpoint's thread")]
    Thread(#[source] io::Error),
}

/// The variables that point the agent at the endpoint, minus those the
/// run's own environment `spec_env` sets (the user's choice wins).
pub fn agent_env(spec_env: &[(String, String)]) -> Vec<(String, String)> {
    let base = format!("http://127.0.0.1:{PORT}");
    [
        ("ANTHROPIC_BASE_URL", base.clone()),
        ("OPENAI_BASE_URL", format!("{base}/v1")),
        ("ANTHROPIC_API_KEY", PLACEHOLDER_KEY.to_owned()),
        ("OPENAI_API_KEY", PLACEHOLDER_KEY.to_owned()),
    ]
    .into_iter()
    .filter(|(name, _)| !spec_env.iter().any(|(n, _)| n == name))
    .map(|(name, value)| (name.to_owned(), value))
    .collect()
}

fn loopback() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT)
}

/// Listens on 127.0.0.1:[`PORT`] in the VM's own network namespace (lo is
/// brought up first: the initramfs mode does not otherwise).
pub fn listen_here() -> Result<TcpListener, Error> {
    crate::image::loopback_up().map_err(Error::Loopback)?;
    TcpListener::bind(loopback()).map_err(Error::Listen)
}

/// Listens on 127.0.0.1:[`PORT`] in a new network namespace with only `lo`,
/// pinned at [`NETNS_PATH`] for the container engine to join.
pub fn listen_in_new_netns() -> Result<TcpListener, Error> {
    // A helper thread: unshare(CLONE_NEWNET) moves only the calling thread,
    // and the init's other threads (and podman, which it forks) must stay in
    // the VM's namespace. The thread ends once the listener exists; the
    // namespace lives on through the bind mount and the socket.
    thread::Builder::new()
        .name("model-netns".into())
        .spawn(|| -> Result<TcpListener, Error> {
            // SAFETY: unshare(2) takes no pointers; it affects this thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(Error::Unshare(io::Error::last_os_error()));
            }
            crate::image::loopback_up().map_err(Error::Loopback)?;
            pin_netns(Path::new(NETNS_PATH)).map_err(Error::Pin)?;
            TcpListener::bind(loopback()).map_err(Error::Listen)
        })
        .map_err(Error::Thread)?
        .join()
        .unwrap_or_else(|_| Err(Error::Thread(io::Error::other("the thread panicked"))))
}

/// Bind-mounts the calling thread's network namespace onto `target`.
fn pin_netns(target: &Path) -> io::Result<()> {
    if let Some(dir) = target.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::File::create(target)?;
    let source = c"/proc/thread-self/ns/net";
    let target = CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both paths are NUL-terminated strings that outlive the call;
    // the file system type and data may be null for a bind mount.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where requests go: a fresh connection to the host per request.
pub trait Relay: Send + Sync + 'static {
    /// A connection to the host's model proxy.
    type Conn: Read + Write + Send;
    /// Opens one.
    fn connect(&self) -> io::Result<Self::Conn>;
}

/// The real relay: vsock to the host's [`MODEL_PORT`].
#[derive(Debug)]
pub struct VsockRelay;

impl Relay for VsockRelay {
    type Conn = VsockStream;

    fn connect(&self) -> io::Result<VsockStream> {
        let conn = VsockStream::connect(HOST_CID, MODEL_PORT)?;
        conn.set_read_timeout(Some(HOST_TIMEOUT))?;
        Ok(conn)
    }
}

/// Most refusal reports waiting for the control session; more are dropped.
const MAX_PENDING_REPORTS: usize = 64;

/// Where the endpoint reports the requests it answers itself (refusals, and
/// a host it cannot reach): as `model.refused` audit claims for the control
/// session to send, which it is woken for through `wake`.
#[derive(Debug, Clone)]
pub struct Reporter {
    reports: SyncSender<Message>,
    wake: Arc<UnixStream>,
}

impl Reporter {
    /// A reporter that wakes `wake`'s peer after each report, and the
    /// receiving end of its reports.
    pub fn new(wake: UnixStream) -> (Self, Receiver<Message>) {
        let (reports, rx) = mpsc::sync_channel(MAX_PENDING_REPORTS);
        let wake = Arc::new(wake);
        (Self { reports, wake }, rx)
    }

    /// `AuditEvent{model.refused}`: `status`, `request` (method and target,
    /// when the request line was read) and `reason`.
    fn refused(&self, request: Option<&str>, status: u16, reason: &str) {
        let mut fields = vec![("status".to_owned(), status.to_string())];
        if let Some(request) = request {
            fields.push(("request".to_owned(), audit_value(request)));
        }
        fields.push(("reason".to_owned(), audit_value(reason)));
        let event = Message::AuditEvent {
            kind: "model.refused".into(),
            fields,
        };
        // A full queue drops the report: the agent cannot make the init
        // hold more than MAX_PENDING_REPORTS.
        if self.reports.try_send(event).is_ok() {
            let _ = (&*self.wake).write_all(&[1]);
        }
    }
}

/// `text` cut to an audit value's limit on a character boundary, without NUL.
fn audit_value(text: &str) -> String {
    let mut value = text.replace('\0', "");
    if value.len() > MAX_AUDIT_VALUE {
        let mut end = MAX_AUDIT_VALUE;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
    value
}

/// Serves `listener` on a thread of its own, for ever (the VM's end stops
/// it), reporting its own answers to `reporter` if any.
/// `max_body` is the host's request body limit (at most [`MAX_BODY`];
/// `None`: [`MAX_BODY`]).
pub fn spawn_server<R: Relay>(
    listener: TcpListener,
    relay: R,
    reporter: Option<Reporter>,
    max_body: Option<u64>,
) -> Result<(), Error> {
    let limits = Limits {
        body: max_body.map_or(MAX_BODY, |b| b.clamp(1, MAX_BODY)),
        ..Limits::DEFAULT
    };
    spawn_server_with(listener, relay, limits, reporter)
}

/// The server's limits that tests make smaller.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Most connections at once.
    connections: usize,
    /// Longest time to read one request.
    request_deadline: Duration,
    /// Largest request body.
    body: u64,
}

impl Limits {
    const DEFAULT: Self = Self {
        connections: MAX_CONNECTIONS,
        request_deadline: REQUEST_DEADLINE,
        body: MAX_BODY,
    };
}

fn spawn_server_with<R: Relay>(
    listener: TcpListener,
    relay: R,
    limits: Limits,
    reporter: Option<Reporter>,
) -> Result<(), Error> {
    let relay = Arc::new(relay);
    thread::Builder::new()
        .name("model-accept".into())
        .spawn(move || accept_loop(&listener, &relay, limits, reporter.as_ref()))
        .map_err(Error::Thread)?;
    Ok(())
}

/// Decrements the live-connection count when a connection thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop<R: Relay>(
    listener: &TcpListener,
    relay: &Arc<R>,
    limits: Limits,
    reporter: Option<&Reporter>,
) {
    let max = limits.connections;
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(conn) => conn,
            Err(err) => {
                // EMFILE and the like: wait for connections to end.
                console::debug(&format!("model endpoint: accept: {err}"));
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if live.fetch_add(1, Ordering::SeqCst) >= max {
            live.fetch_sub(1, Ordering::SeqCst);
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let refusal = Refusal::new(
                429,
                "rate_limit_error",
                format!("the sandbox's model endpoint serves at most {max} requests at once"),
            )
            .retryable();
            let _ = write_refusal(&mut conn, &refusal);
            let _ = conn.shutdown(Shutdown::Write);
            if let Some(reporter) = reporter {
                reporter.refused(None, refusal.status, &refusal.message);
            }
            continue;
        }
        let slot = Slot(Arc::clone(&live));
        let relay = Arc::clone(relay);
        let reporter = reporter.cloned();
        let spawned = thread::Builder::new()
            .name("model-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(conn, &*relay, limits, reporter.as_ref());
            });
        if let Err(err) = spawned {
            // The closure (and so the slot and the connection) was dropped.
            console::warn(&format!("model endpoint: cannot start a thread: {err}"));
        }
    }
}

fn serve_connection<R: Relay>(
    conn: TcpStream,
    relay: &R,
    limits: Limits,
    reporter: Option<&Reporter>,
) {
    if conn.set_write_timeout(Some(CLIENT_TIMEOUT)).is_err() {
        return;
    }
    let reader = Deadlined {
        conn: &conn,
        deadline: Instant::now() + limits.request_deadline,
    };
    let done = handle(reader, &conn, relay, limits.body);
    console::debug(&format!("model endpoint: {done}"));
    if let (Some(reporter), Done::Refused(request, status, reason)) = (reporter, &done) {
        reporter.refused(request.as_deref(), *status, reason);
    }
    // Lingering close: the answer is out; read what the agent still sends
    // (bounded in bytes and time) until it closes, so that closing does not
    // reset the connection under an answer still in flight.
    let _ = conn.shutdown(Shutdown::Write);
    let mut drain = Deadlined {
        conn: &conn,
        deadline: Instant::now() + LINGER,
    };
    let _ = io::copy(&mut (&mut drain).take(LINGER_BYTES), &mut io::sink());
}

/// Reads from the agent's connection until a deadline, each read also
/// bounded by [`CLIENT_TIMEOUT`]: a client that trickles bytes cannot hold
/// a connection slot for longer than the deadline.
struct Deadlined<'a> {
    conn: &'a TcpStream,
    deadline: Instant,
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.conn.set_read_timeout(Some(left.min(CLIENT_TIMEOUT)))?;
        let mut conn = self.conn;
        conn.read(buf)
    }
}

/// An answer the endpoint gives itself, as an API-shaped JSON error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    status: u16,
    kind: &'static str,
    message: String,
    /// Sending the same request again may succeed (a full endpoint, a
    /// host that broke off); else the answer says `x-should-retry: false`.
    retry: bool,
}

impl Refusal {
    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry: false,
        }
    }

    fn retryable(self) -> Self {
        Self {
            retry: true,
            ..self
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(400, "invalid_request_error", message)
    }

    /// `{"type":"error","error":{"type":KIND,"message":MESSAGE}}`.
    fn body(&self) -> String {
        format!(
            r#"{{"type":"error","error":{{"type":"{}","message":{}}}}}"#,
            self.kind,
            json_string(&self.message)
        )
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn write_refusal(out: &mut (impl Write + ?Sized), refusal: &Refusal) -> io::Result<()> {
    let body = refusal.body();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n{}content-length: {}\r\nconnection: close\r\n\r\n",
        refusal.status,
        reason(refusal.status),
        if refusal.retry {
            ""
        } else {
            "x-should-retry: false\r\n"
        },
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(body.as_bytes())?;
    out.flush()
}

/// A reason phrase for the status line (clients ignore it).
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        529 => "Overloaded",
        _ => "Status",
    }
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    method: String,
    target: String,
    /// HTTP/1.0: no chunked response; the end of the connection ends it.
    http10: bool,
    /// The headers to relay (hop-by-hop ones dropped).
    headers: Vec<(String, String)>,
    body: Body,
    expect_continue: bool,
}

/// Reads one line ending in CRLF, of at most `max` bytes with the CRLF,
/// without it. `Ok(None)` at a clean end of stream before any byte.
fn read_line(
    r: &mut impl BufRead,
    max: usize,
    what: &str,
    too_long: impl FnOnce() -> Refusal,
) -> Result<Option<Vec<u8>>, Refusal> {
    let mut line = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX);
    match Read::take(&mut *r, limit).read_until(b'\n', &mut line) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(err) if is_timeout(&err) => {
            return Err(Refusal::new(
                408,
                "invalid_request_error",
                format!("timed out reading the {what}"),
            ))
        }
        Err(err) => return Err(Refusal::bad(format!("cannot read the {what}: {err}"))),
    }
    if line.last() != Some(&b'\n') {
        if line.len() >= max {
            return Err(too_long());
        }
        return Err(Refusal::bad(format!("the {what} ends early")));
    }
    line.pop();
    if line.pop() != Some(b'\r') {
        return Err(Refusal::bad(format!("the {what} does not end in CRLF")));
    }
    Ok(Some(line))
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads and checks a request head (see the module docs). A refusal comes
/// with the request's method and target when the request line was read.
fn read_head(
    r: &mut impl BufRead,
    max_body: u64,
) -> Result<Option<Head>, (Option<String>, Refusal)> {
    let mut request = None;
    read_head_into(r, &mut request, max_body).map_err(|refusal| (request, refusal))
}

fn read_head_into(
    r: &mut impl BufRead,
    request: &mut Option<String>,
    max_body: u64,
) -> Result<Option<Head>, Refusal> {
    let head_too_long = || {
        Refusal::new(
            431,
            "invalid_request_error",
            format!("the request head is longer than {MAX_HEAD} bytes"),
        )
    };
    let mut budget = MAX_HEAD;
    let Some(line) = read_line(r, budget, "request line", head_too_long)? else {
        return Ok(None);
    };
    budget = budget.saturating_sub(line.len() + 2);
    let line =
        String::from_utf8(line).map_err(|_| Refusal::bad("the request line is not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::bad("malformed request line"));
    };
    *request = Some(format!("{method} {target}"));
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(Refusal::bad("malformed request method"));
    }
    if method.len() > 16 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Refusal::new(
            501,
            "invalid_request_error",
            format!("method {method} is not supported"),
        ));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => {
            return Err(Refusal::new(
                505,
                "invalid_request_error",
                "only HTTP/1.1 and HTTP/1.0 are supported",
            ))
        }
        _ => return Err(Refusal::bad("malformed request line")),
    };
    check_target(target)?;

    let mut headers = Vec::new();
    let mut connection_names: Vec<String> = Vec::new();
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut expect_continue = false;
    loop {
        if budget < 2 {
            return Err(head_too_long());
        }
        let Some(line) = read_line(r, budget, "request head", head_too_long)? else {
            return Err(Refusal::bad("the request head ends early"));
        };
        budget = budget.saturating_sub(line.len() + 2);
        if line.is_empty() {
            break;
        }
        let (name, value) = parse_header(&line)?;
        let lower = name.to_ascii_lowercase();
        match lower.as_str() {
            "content-length" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Refusal::bad("malformed Content-Length"));
                }
                let n: u64 = value.parse().unwrap_or(u64::MAX);
                if content_length.is_some_and(|m| m != n) {
                    return Err(Refusal::bad("conflicting Content-Length headers"));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                if transfer_encoding || !value.eq_ignore_ascii_case("chunked") {
                    return Err(Refusal::new(
                        501,
                        "invalid_request_error",
                        "only Transfer-Encoding: chunked is supported",
                    ));
                }
                transfer_encoding = true;
                chunked = true;
            }
            "connection" => connection_names.extend(
                value
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty()),
            ),
            "expect" => {
                if value.eq_ignore_ascii_case("100-continue") {
                    expect_continue = true;
                } else {
                    return Err(Refusal::new(
                        417,
                        "invalid_request_error",
                        "only Expect: 100-continue is supported",
                    ));
                }
            }
            _ => {}
        }
        headers.push((name, value));
    }
    if chunked && content_length.is_some() {
        return Err(Refusal::bad(
            "a request has either Content-Length or Transfer-Encoding, not both",
        ));
    }
    if chunked && http10 {
        return Err(Refusal::bad("chunked bodies need HTTP/1.1"));
    }
    let body = match (chunked, content_length) {
        (true, _) => Body::Chunked,
        (false, Some(n)) if n > max_body => {
            return Err(too_large(max_body));
        }
        (false, Some(0) | None) => Body::None,
        (false, Some(n)) => Body::Length(n),
    };
    headers.retain(|(name, _)| {
        !hop_by_hop(name) && !connection_names.contains(&name.to_ascii_lowercase())
    });
    if headers.len() > MAX_HTTP_HEADERS {
        return Err(Refusal::new(
            431,
            "invalid_request_error",
            format!("more than {MAX_HTTP_HEADERS} headers"),
        ));
    }
    Ok(Some(Head {
        method: method.to_owned(),
        target: target.to_owned(),
        http10,
        headers,
        body,
        expect_continue,
    }))
}

fn too_large(max: u64) -> Refusal {
    Refusal::new(
        413,
        "request_too_large",
        format!(
            "the request body is larger than the sandbox's limit of {max} bytes \
             (airlock run --model-max-request-bytes, at most {MAX_BODY})"
        ),
    )
}

/// Only origin-form targets (`/path?query`): an absolute URL or an
/// authority would name another server, and this endpoint only relays to
/// the host's model proxy.
fn check_target(target: &str) -> Result<(), Refusal> {
    if !target.starts_with('/') {
        return Err(Refusal::bad(format!(
            "the request target must be a path (origin form); {} is refused: \
             this endpoint only relays to the sandbox's model API",
            if target.contains("://") {
                "an absolute URL"
            } else {
                "this target"
            }
        )));
    }
    if target.len() > MAX_TARGET {
        return Err(Refusal::new(
            414,
            "invalid_request_error",
            format!("the request target is longer than {MAX_TARGET} bytes"),
        ));
    }
    if !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Refusal::bad(
            "the request target has characters outside printable ASCII",
        ));
    }
    Ok(())
}

/// `Name: value` with the value's surrounding blanks trimmed.
fn parse_header(line: &[u8]) -> Result<(String, String), Refusal> {
    if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return Err(Refusal::bad("folded header lines are not supported"));
    }
    let colon = line
        .iter()
        .position(|b| *b == b':')
        .ok_or_else(|| Refusal::bad("a header line has no colon"))?;
    let (name, rest) = line.split_at(colon);
    if name.is_empty() || !name.iter().copied().all(is_tchar) {
        return Err(Refusal::bad("malformed header name"));
    }
    if name.len() > MAX_HEADER_NAME {
        return Err(Refusal::new(
            431,
            "invalid_request_error",
            format!("a header name is longer than {MAX_HEADER_NAME} bytes"),
        ));
    }
    let value = rest.get(1..).unwrap_or_default();
    let value = value.trim_ascii();
    if value.len() > MAX_HEADER_VALUE {
        return Err(Refusal::new(
            431,
            "invalid_request_error",
            format!("a header value is longer than {MAX_HEADER_VALUE} bytes"),
        ));
    }
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(Refusal::bad("a header value has control characters"));
    }
    let value =
        std::str::from_utf8(value).map_err(|_| Refusal::bad("a header value is not UTF-8"))?;
    // The name is ASCII (token characters).
    let name = String::from_utf8_lossy(name).into_owned();
    Ok((name, value.to_owned()))
}

/// Reads a chunked body, handing each piece of data (≤ `MAX_HTTP_CHUNK`)
/// to `sink` as it arrives; refuses more than `max` bytes in all.
fn read_chunked(
    r: &mut impl BufRead,
    max: u64,
    mut sink: impl FnMut(&[u8]) -> Result<(), Refusal>,
) -> Result<(), Refusal> {
    let mut total: u64 = 0;
    loop {
        let line = read_line(r, MAX_CHUNK_LINE, "chunk size line", || {
            Refusal::bad("a chunk size line is too long")
        })?
        .ok_or_else(|| Refusal::bad("the chunked body ends early"))?;
        let size_part = line
            .split(|b| *b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        if size_part.is_empty()
            || size_part.len() > 16
            || !size_part.iter().all(u8::is_ascii_hexdigit)
        {
            return Err(Refusal::bad("malformed chunk size"));
        }
        let size = std::str::from_utf8(size_part)
            .ok()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| Refusal::bad("malformed chunk size"))?;
        if size == 0 {
            break;
        }
        total = total.saturating_add(size);
        if total > max {
            return Err(too_large(max));
        }
        copy_exact(r, size, &mut sink)?;
        let mut crlf = [0u8; 2];
        read_exact(r, &mut crlf)?;
        if crlf != *b"\r\n" {
            return Err(Refusal::bad("a chunk does not end in CRLF"));
        }
    }
    // Trailers: read and dropped.
    let too_long = || Refusal::new(431, "invalid_request_error", "the trailers are too long");
    let mut budget = MAX_TRAILERS;
    loop {
        let line = read_line(r, MAX_CHUNK_LINE, "trailer", too_long)?
            .ok_or_else(|| Refusal::bad("the chunked body ends early"))?;
        if line.is_empty() {
            return Ok(());
        }
        budget = budget.checked_sub(line.len() + 2).ok_or_else(too_long)?;
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), Refusal> {
    r.read_exact(buf).map_err(|err| client_read_error(&err))
}

fn client_read_error(err: &io::Error) -> Refusal {
    if is_timeout(err) {
        Refusal::new(
            408,
            "invalid_request_error",
            "timed out reading the request body",
        )
    } else {
        Refusal::bad("the request body ends early")
    }
}

/// Hands exactly `n` bytes of `r` to `sink` in pieces of ≤ `MAX_HTTP_CHUNK`.
fn copy_exact(
    r: &mut impl Read,
    mut n: u64,
    sink: &mut impl FnMut(&[u8]) -> Result<(), Refusal>,
) -> Result<(), Refusal> {
    let mut buf = vec![0u8; MAX_HTTP_CHUNK.min(usize::try_from(n).unwrap_or(MAX_HTTP_CHUNK))];
    while n > 0 {
        let want = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
        let piece = buf.get_mut(..want).unwrap_or_default();
        let got = match r.read(piece) {
            Ok(0) => return Err(Refusal::bad("the request body ends early")),
            Ok(got) => got,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(client_read_error(&err)),
        };
        sink(piece.get(..got).unwrap_or_default())?;
        n -= u64::try_from(got).unwrap_or(n);
    }
    Ok(())
}

/// What became of one connection, for the debug log.
#[derive(Debug)]
enum Done {
    /// The agent closed without a request.
    Idle,
    /// The endpoint answered itself, before the host saw the request (the
    /// request line, when it was read).
    Refused(Option<String>, u16, String),
    /// The host's answer was relayed (status, body bytes).
    Relayed(String, u16, u64),
    /// The relay broke half way.
    Broken(String, String),
    /// The connectivity probe, answered here.
    Probe(String),
}

impl std::fmt::Display for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idle => write!(f, "connection closed without a request"),
            Self::Refused(_, status, why) => write!(f, "refused with {status}: {why}"),
            Self::Relayed(req, status, n) => write!(f, "{req} -> {status}, {n} body bytes"),
            Self::Broken(req, why) => write!(f, "{req}: {why}"),
            Self::Probe(req) => write!(f, "{req} -> 200 (the probe, answered here)"),
        }
    }
}

/// The host's side broke; the body of the 502 the agent gets.
fn host_broke(what: impl std::fmt::Display) -> Refusal {
    Refusal::new(
        502,
        "api_error",
        format!("the sandbox's model relay failed: {what}"),
    )
    .retryable()
}

/// Whether a request is the connectivity probe the endpoint answers
/// itself (`HEAD` or `GET /api/hello`, any query).
fn is_probe(head: &Head) -> bool {
    let path = head.target.split('?').next().unwrap_or_default();
    path == "/api/hello" && matches!(head.method.as_str(), "HEAD" | "GET")
}

/// Answers the probe: 200, a small JSON body (none for `HEAD`).
fn answer_probe(out: &mut impl Write, head: &Head) -> io::Result<()> {
    let mut text = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        HELLO_BODY.len()
    );
    if head.method == "GET" {
        text.push_str(HELLO_BODY);
    }
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Serves one request read from `reader`, answering on `out`.
fn handle<R: Relay>(reader: impl Read, mut out: impl Write, relay: &R, max_body: u64) -> Done {
    let mut reader = BufReader::with_capacity(16 * 1024, reader);
    let refuse = |out: &mut dyn Write, request: Option<String>, refusal: Refusal| {
        let _ = write_refusal(out, &refusal);
        Done::Refused(request, refusal.status, refusal.message)
    };
    let head = match read_head(&mut reader, max_body) {
        Ok(Some(head)) => head,
        Ok(None) => return Done::Idle,
        Err((request, refusal)) => return refuse(&mut out, request, refusal),
    };
    let request = format!("{} {}", head.method, head.target);
    if is_probe(&head) {
        // Its body, if any, is drained by the lingering close.
        return match answer_probe(&mut out, &head) {
            Ok(()) => Done::Probe(request),
            Err(_) => Done::Broken(request, "the agent went away".into()),
        };
    }
    let mut host = match relay.connect() {
        Ok(conn) => conn,
        Err(err) => {
            return refuse(
                &mut out,
                Some(request),
                Refusal::new(
                    502,
                    "api_error",
                    format!("the sandbox cannot reach the host's model proxy: {err}"),
                ),
            )
        }
    };
    let start = Message::HttpRequest {
        method: head.method.clone(),
        target: head.target.clone(),
        headers: head.headers.clone(),
    };
    if let Err(err) = write_frame(&mut host, &start) {
        return refuse(&mut out, Some(request), host_broke(err));
    }
    if head.expect_continue
        && head.body != Body::None
        && out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
    {
        return Done::Broken(request, "the agent went away".into());
    }
    // The body, frame by frame. A failed write to the host stops the
    // forwarding: its answer (say, a refusal) may already be waiting.
    let mut host_ok = true;
    let mut forward = |data: &[u8]| -> Result<(), Refusal> {
        if host_ok && write_frame(&mut host, &Message::HttpBody(data.to_vec())).is_err() {
            host_ok = false;
        }
        Ok(())
    };
    let body = match head.body {
        Body::None => Ok(()),
        Body::Length(n) => copy_exact(&mut reader, n, &mut forward),
        Body::Chunked => read_chunked(&mut reader, max_body, &mut forward),
    };
    if let Err(refusal) = body {
        // The host sees the connection end without HttpEnd: no request.
        drop(host);
        return refuse(&mut out, Some(request), refusal);
    }
    if host_ok {
        let _ = write_frame(&mut host, &Message::HttpEnd);
    }
    relay_response(&mut host, &mut out, &head, request)
}

/// Reads the host's answer and writes it to the agent as it comes.
fn relay_response(
    host: &mut impl Read,
    out: &mut impl Write,
    head: &Head,
    request: String,
) -> Done {
    let (status, headers) = match read_frame(&mut *host) {
        Ok(Message::HttpResponse { status, headers }) if status >= 200 => (status, headers),
        Ok(Message::HttpResponse { status, .. }) => {
            let refusal = host_broke(format!("the host answered with status {status}"));
            let _ = write_refusal(out, &refusal);
            return Done::Broken(request, refusal.message);
        }
        Ok(other) => {
            let refusal = host_broke(format!(
                "the host sent {} instead of a response",
                other.kind()
            ));
            let _ = write_refusal(out, &refusal);
            return Done::Broken(request, refusal.message);
        }
        Err(err) => {
            let refusal = host_broke(describe_frame_error(&err));
            let _ = write_refusal(out, &refusal);
            return Done::Broken(request, refusal.message);
        }
    };
    let no_body = head.method == "HEAD" || status == 204 || status == 304;
    // The host's Content-Length, when it gave exactly one: then the body
    // goes out as is; otherwise chunked (HTTP/1.0: until the close).
    let lengths: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim())
        .collect();
    let length = match lengths.as_slice() {
        [one] if !one.is_empty() && one.bytes().all(|b| b.is_ascii_digit()) => {
            one.parse::<u64>().ok()
        }
        _ => None,
    };
    let chunked = !no_body && length.is_none() && !head.http10;
    let mut text = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (name, value) in &headers {
        if !hop_by_hop(name) {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    if let Some(n) = length {
        text.push_str(&format!("content-length: {n}\r\n"));
    } else if chunked {
        text.push_str("transfer-encoding: chunked\r\n");
    }
    text.push_str("connection: close\r\n\r\n");
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        return Done::Broken(request, "the agent went away".into());
    }
    let mut sent: u64 = 0;
    loop {
        match read_frame(&mut *host) {
            Ok(Message::HttpBody(data)) => {
                if no_body {
                    continue;
                }
                let n = u64::try_from(data.len()).unwrap_or(u64::MAX);
                if length.is_some_and(|len| sent.saturating_add(n) > len) {
                    return Done::Broken(
                        request,
                        "the host sent more than its Content-Length".into(),
                    );
                }
                let written = if chunked {
                    let mut piece = format!("{:x}\r\n", data.len()).into_bytes();
                    piece.extend_from_slice(&data);
                    piece.extend_from_slice(b"\r\n");
                    out.write_all(&piece)
                } else {
                    out.write_all(&data)
                };
                if written.and_then(|()| out.flush()).is_err() {
                    return Done::Broken(request, "the agent went away".into());
                }
                sent = sent.saturating_add(n);
            }
            Ok(Message::HttpEnd) => break,
            Ok(other) => {
                return Done::Broken(
                    request,
                    format!("the host sent {} in a response body", other.kind()),
                )
            }
            // The agent sees the answer end early (no last chunk, or fewer
            // bytes than its length): never a truncated answer that looks whole.
            Err(err) => return Done::Broken(request, describe_frame_error(&err)),
        }
    }
    if length.is_some_and(|len| sent != len) {
        return Done::Broken(
            request,
            "the host's body is shorter than its Content-Length".into(),
        );
    }
    if chunked
        && out
            .write_all(b"0\r\n\r\n")
            .and_then(|()| out.flush())
            .is_err()
    {
        return Done::Broken(request, "the agent went away".into());
    }
    Done::Relayed(request, status, sent)
}

fn describe_frame_error(err: &FrameError) -> String {
    match err {
        FrameError::Closed => "the host closed the connection".into(),
        FrameError::Io(e) if is_timeout(e) => "the host did not answer in time".into(),
        other => other.to_string(),
    }
}

/// Starts the endpoint for a run; returns the `--network` value for the
/// agent's container (`ns:PATH`), if any. Failures are warned about: the
/// run goes on without the endpoint (and so without the variables).
pub fn start(
    container: bool,
    reporter: Option<Reporter>,
    max_body: Option<u64>,
) -> Result<Option<String>, Error> {
    let listener = if container {
        listen_in_new_netns()?
    } else {
        listen_here()?
    };
    spawn_server(listener, VsockRelay, reporter, max_body)?;
    console::debug(&format!("model endpoint on 127.0.0.1:{PORT}"));
    Ok(container.then(|| format!("ns:{NETNS_PATH}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc::Sender;
    use std::sync::Mutex;

    /// Hands the host end of each new connection to the test.
    struct FakeRelay(Mutex<Sender<UnixStream>>);

    impl Relay for FakeRelay {
        type Conn = UnixStream;
        fn connect(&self) -> io::Result<UnixStream> {
            let (guest, host) = UnixStream::pair()?;
            guest.set_read_timeout(Some(Duration::from_secs(10)))?;
            host.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .send(host)
                .map_err(io::Error::other)?;
            Ok(guest)
        }
    }

    fn fake_relay() -> (FakeRelay, Receiver<UnixStream>) {
        let (tx, rx) = mpsc::channel();
        (FakeRelay(Mutex::new(tx)), rx)
    }

    /// No host at all: the vsock connect is refused.
    struct DownRelay;

    impl Relay for DownRelay {
        type Conn = UnixStream;
        fn connect(&self) -> io::Result<UnixStream> {
            Err(io::Error::from_raw_os_error(libc::ECONNRESET))
        }
    }

    /// A server on an ephemeral port of the test machine's loopback.
    fn server<R: Relay>(relay: R, max: usize) -> SocketAddrV4 {
        server_with(
            relay,
            Limits {
                connections: max,
                ..Limits::DEFAULT
            },
        )
    }

    fn server_with<R: Relay>(relay: R, limits: Limits) -> SocketAddrV4 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
            panic!("not v4")
        };
        spawn_server_with(listener, relay, limits, None).expect("server");
        addr
    }

    fn client(addr: SocketAddrV4) -> TcpStream {
        let c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        c
    }

    /// Sends `request` and reads the whole response.
    fn exchange(addr: SocketAddrV4, request: &[u8]) -> Vec<u8> {
        let mut c = client(addr);
        c.write_all(request).expect("send");
        let mut response = Vec::new();
        c.read_to_end(&mut response).expect("read");
        response
    }

    /// (status, lower-cased headers, body) of a raw response; a chunked body is
    /// decoded (and must end with its last chunk).
    fn parse_response(raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("head end");
        let head = std::str::from_utf8(&raw[..end]).expect("utf-8 head");
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .expect("status line")
            .split(' ')
            .nth(1)
            .expect("status")
            .parse()
            .expect("number");
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("header");
                (n.to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        let mut body = &raw[end + 4..];
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v == "chunked");
        if !chunked {
            return (status, headers, body.to_vec());
        }
        let mut out = Vec::new();
        loop {
            let eol = body
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk line");
            let size = usize::from_str_radix(std::str::from_utf8(&body[..eol]).expect("hex"), 16)
                .expect("size");
            body = &body[eol + 2..];
            if size == 0 {
                assert_eq!(body, b"\r\n", "the last chunk ends the body");
                break;
            }
            out.extend_from_slice(&body[..size]);
            assert_eq!(&body[size..size + 2], b"\r\n");
            body = &body[size + 2..];
        }
        (status, headers, out)
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// What a fake host read: the request head and its whole body.
    fn read_request(host: &mut UnixStream) -> (Message, Vec<u8>) {
        let head = read_frame(&mut *host).expect("request");
        let mut body = Vec::new();
        loop {
            match read_frame(&mut *host).expect("body frame") {
                Message::HttpBody(d) => {
                    assert!(d.len() <= MAX_HTTP_CHUNK);
                    body.extend_from_slice(&d);
                }
                Message::HttpEnd => return (head, body),
                other => panic!("{other:?}"),
            }
        }
    }

    fn respond(host: &mut UnixStream, status: u16, headers: &[(&str, &str)], chunks: &[&[u8]]) {
        let headers = headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        write_frame(&mut *host, &Message::HttpResponse { status, headers }).expect("response");
        for c in chunks {
            write_frame(&mut *host, &Message::HttpBody(c.to_vec())).expect("body");
        }
        write_frame(&mut *host, &Message::HttpEnd).expect("end");
    }

    fn error_message(body: &[u8]) -> String {
        let text = std::str::from_utf8(body).expect("utf-8");
        assert!(
            text.starts_with(r#"{"type":"error","error":{"type":""#),
            "{text}"
        );
        text.to_owned()
    }

    #[test]
    fn a_request_is_relayed_without_hop_by_hop_headers_and_the_answer_comes_back() {
        let (relay, hosts) = fake_relay();
        let addr = server(relay, 4);
        let host = thread::spawn(move || {
            let mut host = hosts.recv().expect("a connection");
            let got = read_request(&mut host);
            respond(
                &mut host,
                200,
                &[
                    ("content-type", "application/json"),
                    ("connection", "keep-alive"),
                    ("x-request-id", "r1"),
                ],
                &[b"{\"ok\":", b"true}"],
            );
            got
        });
        let body = br#"{"model":"m","max_tokens":5}"#;
        let request = format!(
            "POST /v1/messages?beta=true HTTP/1.1\r\nHost: 127.0.0.1:8088\r\nContent-Type: application/json\r\n\
             x-api-key: airlock-placeholder\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Authorization: Basic eA==\r\nTE: trailers\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut raw = request.into_bytes();
        raw.extend_from_slice(body);
        let (status, headers, got_body) = parse_response(&exchange(addr, &raw));
        let (head, relayed_body) = host.join().expect("host");
        assert_eq!(
            head,
            Message::HttpRequest {
                method: "POST".into(),
                target: "/v1/messages?beta=true".into(),
                headers: vec![
                    ("Content-Type".into(), "application/json".into()),
                    ("x-api-key".into(), "airlock-placeholder".into()),
                ],
            }
        );
        assert_eq!(relayed_body, body);
        assert_eq!(status, 200);
        assert_eq!(got_body, b"{\"ok\":true}");
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
        assert_eq!(header(&headers, "x-request-id"), Some("r1"));
        assert_eq!(header(&headers, "connection"), Some("close"));
        assert_eq!(header(&headers, "transfer-encoding"), Some("chunked"));
        assert_eq!(headers.iter().filter(|(n, _)| n == "connection").count(), 1);
    }

    #[test]
    fn a_chunked_request_body_is_decoded_and_a_content_length_answer_kept() {
        let (relay, hosts) = fake_relay();
        let addr = server(relay, 4);
        // A body of 100 KiB in uneven chunks: relayed in frames of ≤ 64 KiB.
        let data: Vec<u8> = (0..100 * 1024u32)
            .map(|i| u8::try_from(i % 251).expect("small"))
            .collect();
        let host = thread::spawn(move || {
            let mut host = hosts.recv().expect("a connection");
            let got = read_request(&mut host);
            respond(&mut host, 201, &[("Content-Length", "5")], &[b"he", b"llo"]);
            got
        });
        let mut raw =
            b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let mut rest = &data[..];
        for size in [1usize, 70_000, 10, 4096] {
            let (piece, tail) = rest.split_at(size);
            raw.extend_from_slice(format!("{size:X};ext=1\r\n").as_bytes());
            raw.extend_from_slice(piece);
            raw.extend_from_slice(b"\r\n");
            rest = tail;
        }
        raw.extend_from_slice(format!("{:x}\r\n", rest.len()).as_bytes());
        raw.extend_from_slice(rest);
        raw.extend_from_slice(b"\r\n0\r\nX-Trailer: dropped\r\n\r\n");
        let (status, headers, body) = parse_response(&exchange(addr, &raw));
        let (head, relayed) = host.join().expect("host");
        assert!(
            matches!(head, Message::HttpRequest { ref headers, .. } if headers.is_empty()),
            "{head:?}"
        );
        assert_eq!(relayed, data);
        assert_eq!(status, 201);
        assert_eq!(header(&headers, "content-length"), Some("5"));
        assert_eq!(header(&headers, "transfer-encoding"), None);
        assert_eq!(body, b"hello");
    }

    #[test]
    fn server_sent_events_reach_the_agent_before_the_host_sends_the_rest() {
        let (relay, hosts) = fake_relay();
        let addr = server(relay, 4);
        let (seen_tx, seen_rx) = mpsc::channel::<()>();
        let host = thread::spawn(move || {
            let mut host = hosts.recv().expect("a connection");
            read_request(&mut host);
            let headers = vec![("content-type".into(), "text/event-stream".into())];
            write_frame(
                &mut host,
                &Message::HttpResponse {
                    status: 200,
                    headers,
                },
            )
            .expect("head");
            write_frame(
                &mut host,
                &Message::HttpBody(b"event: message_start\ndata: {}\n\n".to_vec()),
            )
            .expect("ev1");
            // The rest only once the agent has the first event.
            seen_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the first event never reached the agent");
            write_frame(
                &mut host,
                &Message::HttpBody(b"event: message_stop\ndata: {}\n\n".to_vec()),
            )
            .expect("ev2");
            write_frame(&mut host, &Message::HttpEnd).expect("end");
        });
        let mut c = client(addr);
        c.write_all(b"POST /v1/messages HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            .expect("send");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !contains(&got, b"event: message_start") {
            let n = c.read(&mut buf).expect("the first event");
            assert!(n > 0, "closed before the first event");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(!contains(&got, b"event: message_stop"));
        seen_tx.send(()).expect("signal");
        c.read_to_end(&mut got).expect("the rest");
        host.join().expect("host");
        let (status, _, body) = parse_response(&got);
        assert_eq!(status, 200);
        assert_eq!(
            body,
            b"event: message_start\ndata: {}\n\nevent: message_stop\ndata: {}\n\n"
        );
    }

    #[test]
    fn absolute_urls_and_malformed_heads_are_refused_before_the_host_is_asked() {
        let (relay, hosts) = fake_relay();
        let addr = server(relay, 4);
        for (request, status) in [
            (&b"GET http://evil.example/v1/models HTTP/1.1\r\n\r\n"[..], 400),
            (b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n", 400),
            (b"GET * HTTP/1.1\r\n\r\n", 400),
            (b"get /v1/models HTTP/1.1\r\n\r\n", 501),
            (b"GET /v1/models HTTP/2.0\r\n\r\n", 505),
            (b"GET /v1/models HTTP/1.1\nHost: x\n\n", 400),
            (b"GET /v1 models HTTP/1.1\r\n\r\n", 400),
            (b"GET /v1/models HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
            (b"GET /v1/models HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
            (b"GET /v1/models HTTP/1.1\r\nA: b\x01c\r\n\r\n", 400),
            (b"POST /v1/messages HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            (b"POST /v1/messages HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
            (b"POST /v1/messages HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (b"POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"POST /v1/messages HTTP/1.1\r\nExpect: magic\r\n\r\n", 417),
        ] {
            let (got, _, body) = parse_response(&exchange(addr, request));
            assert_eq!(got, status, "{}", String::from_utf8_lossy(request));
            let text = error_message(&body);
            assert!(text.contains("invalid_request_error"), "{text}");
        }
        let (_, _, body) = parse_response(&exchange(
            addr,
            b"GET http://evil.example/ HTTP/1.1\r\n\r\n",
        ));
        assert!(error_message(&body).contains("an absolute URL is refused"));
        assert!(hosts.try_recv().is_err(), "the host was asked");
    }

    #[test]
    fn oversize_heads_and_bodies_are_refused() {
        const LIMIT: u64 = 8 << 20;
        let (relay, hosts) = fake_relay();
        // The host's limit, as airlock.model_max_body passes it.
        let addr = server_with(
            relay,
            Limits {
                connections: 4,
                body: LIMIT,
                ..Limits::DEFAULT
            },
        );
        let mut big_head = b"GET /v1/models HTTP/1.1\r\n".to_vec();
        for i in 0..2000 {
            big_head.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "y".repeat(40)).as_bytes());
        }
        big_head.extend_from_slice(b"\r\n");
        let (status, _, _) = parse_response(&exchange(addr, &big_head));
        assert_eq!(status, 431);
        let long_value = format!(
            "GET /v1/models HTTP/1.1\r\nX-Long: {}\r\n\r\n",
            "v".repeat(9000)
        );
        assert_eq!(
            parse_response(&exchange(addr, long_value.as_bytes())).0,
            431
        );
        let many = format!(
            "GET /v1/models HTTP/1.1\r\n{}\r\n",
            "X-A: 1\r\n".repeat(101)
        );
        assert_eq!(parse_response(&exchange(addr, many.as_bytes())).0, 431);
        let long_target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
        assert_eq!(
            parse_response(&exchange(addr, long_target.as_bytes())).0,
            414
        );
        let declared = format!(
            "POST /v1/messages HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            LIMIT + 1
        );
        let (status, headers, body) = parse_response(&exchange(addr, declared.as_bytes()));
        assert_eq!(status, 413);
        assert!(error_message(&body).contains("request_too_large"));
        assert!(error_message(&body).contains("--model-max-request-bytes"));
        assert_eq!(header(&headers, "x-should-retry"), Some("false"));
        assert!(hosts.try_recv().is_err(), "the host was asked");

        // A chunked body is only known to be too large as it comes: the host
        // connection is dropped without HttpEnd, the agent gets a 413.
        let host = thread::spawn(move || {
            let mut host = hosts.recv().expect("a connection");
            let mut frames = 0;
            let end = loop {
                match read_frame(&mut host) {
                    Ok(Message::HttpEnd) => break "HttpEnd",
                    Ok(_) => frames += 1,
                    Err(_) => break "closed",
                }
            };
            (frames, end)
        });
        let mut c = client(addr);
        c.write_all(b"POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .expect("head");
        let chunk = vec![b'x'; 1 << 20];
        let mut response = Vec::new();
        for _ in 0..9 {
            let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
            piece.extend_from_slice(&chunk);
            piece.extend_from_slice(b"\r\n");
            if c.write_all(&piece).is_err() {
                break;
            }
        }
        let _ = c.read_to_end(&mut response);
        assert_eq!(parse_response(&response).0, 413);
        let (frames, end) = host.join().expect("host");
        assert_eq!(end, "closed", "the host must not see a complete request");
        assert!(frames >= 2, "the body was being streamed ({frames} frames)");
    }

    #[test]
    fn an_unreachable_host_is_an_api_shaped_502() {
        let addr = server(DownRelay, 4);
        let (status, headers, body) = parse_response(&exchange(
            addr,
            b"POST /v1/messages HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        ));
        assert_eq!(status, 502);
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
        let text = error_message(&body);
        assert!(text.contains(r#""type":"api_error""#), "{text}");
        assert!(
            text.contains("cannot reach the host's model proxy"),
            "{text}"
        );
    }

    #[test]
    fn a_host_that_breaks_off_is_a_502_or_a_visibly_cut_answer() {
        let (relay, hosts) = fake_relay();
        let addr = server(relay, 4);
        let host = thread::spawn(move || {
            // Before the response: closes.
            let mut host = hosts.recv().expect("a connection");
            read_request(&mut host);
            drop(host);
            // Mid-body: closes after one chunk.
            let mut host = hosts.recv().expect("a connection");
            read_request(&mut host);
            let headers = vec![];
            write_frame(
                &mut host,
                &Message::HttpResponse {
                    status: 200,
                    headers,
                },
            )
            .expect("head");
            write_frame(&mut host, &Message::HttpBody(b"part".to_vec())).expect("body");
        });
        let request = b"GET /v1/models HTTP/1.1\r\n\r\n";
        let (status, _, body) = parse_response(&exchange(addr, request));
        assert_eq!(status, 502);
        assert!(error_message(&body).contains("the host closed the connection"));
        let raw = exchange(addr, request);
        host.join().expect("host");
        assert!(
            raw.ends_with(b"4\r\npart\r\n"),
            "{}",
            String::from_utf8_lossy(&raw)
        );
    }

    #[test]
    fn http10_answers_end_with_the_connection_and_expect_continue_is_answered() {
        let (relay, hosts) = fake_relay();
        let addr = server(relay, 4);
        let host = thread::spawn(move || {
            let mut host = hosts.recv().expect("a connection");
            read_request(&mut host);
            respond(&mut host, 200, &[], &[b"old", b"-style"]);
            let mut host = hosts.recv().expect("a connection");
            let got = read_request(&mut host);
            respond(&mut host, 200, &[], &[]);
            got
        });
        let raw = exchange(addr, b"GET /v1/models HTTP/1.0\r\n\r\n");
        let (status, headers, body) = parse_response(&raw);
        assert_eq!(status, 200);
        assert_eq!(header(&headers, "transfer-encoding"), None);
        assert_eq!(body, b"old-style");

        let mut c = client(addr);
        c.write_all(
            b"POST /v1/messages HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        )
        .expect("head");
        let mut interim = [0u8; 25];
        c.read_exact(&mut interim).expect("100 Continue");
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        c.write_all(b"abc").expect("body");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).expect("answer");
        assert_eq!(parse_response(&rest).0, 200);
        let (head, body) = host.join().expect("host");
        assert_eq!(body, b"abc");
        assert!(
            matches!(head, Message::HttpRequest { ref headers, .. } if headers.is_empty()),
            "{head:?}"
        );
    }

    #[test]
    fn beyond_the_connection_limit_the_agent_gets_429() {
        let (relay, hosts) = fake_relay();
        let addr = server(relay, 2);
        // Two requests the host holds open.
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = client(addr);
            c.write_all(b"GET /v1/models HTTP/1.1\r\n\r\n")
                .expect("send");
            held.push((
                c,
                hosts
                    .recv_timeout(Duration::from_secs(10))
                    .expect("relayed"),
            ));
        }
        let (status, _, body) = parse_response(&exchange(addr, b"GET /v1/models HTTP/1.1\r\n\r\n"));
        assert_eq!(status, 429);
        assert!(error_message(&body).contains("rate_limit_error"));
        // Once one ends, a new request is served again.
        let (mut c, mut host) = held.pop().expect("held");
        read_request(&mut host);
        respond(&mut host, 200, &[], &[b"x"]);
        let mut raw = Vec::new();
        c.read_to_end(&mut raw).expect("answer");
        assert_eq!(parse_response(&raw).0, 200);
        let deadline = Instant::now() + Duration::from_secs(10);
        let next = thread::spawn(move || {
            let mut host = hosts
                .recv_timeout(Duration::from_secs(10))
                .expect("relayed");
            read_request(&mut host);
            respond(&mut host, 200, &[], &[b"y"]);
        });
        loop {
            let (status, _, _) =
                parse_response(&exchange(addr, b"GET /v1/models HTTP/1.1\r\n\r\n"));
            if status == 200 {
                break;
            }
            assert_eq!(status, 429);
            assert!(Instant::now() < deadline, "the slot was never freed");
            thread::sleep(Duration::from_millis(20));
        }
        next.join().expect("host");
    }

    #[test]
    fn a_client_that_trickles_its_request_loses_its_slot_at_the_deadline() {
        let (relay, hosts) = fake_relay();
        let addr = server_with(
            relay,
            Limits {
                connections: 1,
                request_deadline: Duration::from_millis(600),
                ..Limits::DEFAULT
            },
        );
        let mut c = client(addr);
        c.write_all(b"GET /v1/models HTTP/1.1\r\n").expect("send");
        // One byte every 50 ms: each read succeeds, the request never ends.
        // Only the deadline answers it (the per-read timeout never fires,
        // and this client gives up reading after 10 s).
        let mut response = Vec::new();
        for _ in 0..100 {
            thread::sleep(Duration::from_millis(50));
            if c.write_all(b"X").is_err() {
                break;
            }
            let _ = c.set_nonblocking(true);
            let mut buf = [0u8; 4096];
            if let Ok(n) = c.read(&mut buf) {
                response.extend_from_slice(&buf[..n]);
            }
            let _ = c.set_nonblocking(false);
            if !response.is_empty() {
                break;
            }
        }
        let _ = c.read_to_end(&mut response);
        assert_eq!(
            parse_response(&response).0,
            408,
            "{}",
            String::from_utf8_lossy(&response)
        );
        assert!(hosts.try_recv().is_err(), "the host was asked");
        // The slot is free again (the lingering close is bounded too).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, _, _) = parse_response(&exchange(addr, b"GET http://x/ HTTP/1.1\r\n\r\n"));
            if status == 400 {
                break;
            }
            assert_eq!(status, 429);
            assert!(Instant::now() < deadline, "the slot was never freed");
            thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn the_endpoints_own_answers_are_reported_as_audit_claims() {
        let (wake_rx, wake_tx) = UnixStream::pair().expect("socketpair");
        let (reporter, reports) = Reporter::new(wake_tx);
        let (relay, hosts) = fake_relay();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
            panic!("not v4")
        };
        spawn_server_with(listener, relay, Limits::DEFAULT, Some(reporter)).expect("server");
        let field = |m: &Message, name: &str| match m {
            Message::AuditEvent { kind, fields } => {
                assert_eq!(kind, "model.refused");
                fields
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
            }
            other => panic!("{other:?}"),
        };
        // Relayed: the host saw it, nothing to report.
        let host = thread::spawn(move || {
            let mut host = hosts.recv().expect("a connection");
            read_request(&mut host);
            respond(&mut host, 403, &[], &[b"{}"]);
        });
        assert_eq!(
            parse_response(&exchange(addr, b"GET /v1/models HTTP/1.1\r\n\r\n")).0,
            403
        );
        host.join().expect("host");
        // Refused by the endpoint itself: reported, and the session woken.
        let target = format!("http://evil.example/{}", "a".repeat(5000));
        let request = format!("POST {target} HTTP/1.1\r\n\r\n");
        assert_eq!(parse_response(&exchange(addr, request.as_bytes())).0, 400);
        let report = reports
            .recv_timeout(Duration::from_secs(10))
            .expect("a report");
        assert_eq!(field(&report, "status").as_deref(), Some("400"));
        let seen = field(&report, "request").expect("the request");
        assert!(seen.starts_with("POST http://evil.example/aaa"), "{seen}");
        assert_eq!(seen.len(), MAX_AUDIT_VALUE, "bounded");
        assert!(field(&report, "reason")
            .expect("reason")
            .contains("absolute URL"));
        let mut byte = [0u8; 1];
        (&wake_rx).read_exact(&mut byte).expect("woken");
        // A head that never names a request: reported without one.
        assert_eq!(
            parse_response(&exchange(addr, b"\x16\x03\x01 TLS?\r\n\r\n")).0,
            400
        );
        let report = reports
            .recv_timeout(Duration::from_secs(10))
            .expect("a report");
        assert_eq!(field(&report, "request"), None);
        assert!(reports.try_recv().is_err(), "one report per refusal");
    }

    #[test]
    fn the_agent_env_points_at_the_endpoint_unless_the_run_sets_it() {
        let env = agent_env(&[]);
        let get = |env: &[(String, String)], n: &str| {
            env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
        };
        assert_eq!(
            get(&env, "ANTHROPIC_BASE_URL").as_deref(),
            Some("http://127.0.0.1:8088")
        );
        assert_eq!(
            get(&env, "OPENAI_BASE_URL").as_deref(),
            Some("http://127.0.0.1:8088/v1")
        );
        assert_eq!(
            get(&env, "ANTHROPIC_API_KEY").as_deref(),
            Some(PLACEHOLDER_KEY)
        );
        assert_eq!(
            get(&env, "OPENAI_API_KEY").as_deref(),
            Some(PLACEHOLDER_KEY)
        );
        assert_eq!(env.len(), 4);
        let mine = vec![(
            "OPENAI_BASE_URL".to_owned(),
            "http://elsewhere/v1".to_owned(),
        )];
        let env = agent_env(&mine);
        assert_eq!(env.len(), 3);
        assert_eq!(get(&env, "OPENAI_BASE_URL"), None);
    }

    #[test]
    fn json_errors_escape_their_message() {
        let r = Refusal::bad("a \"quoted\"\\ line\nand \u{1} more");
        assert_eq!(
            r.body(),
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"a \"quoted\"\\ line\nand \u0001 more"}}"#
        );
    }

    /// Claude Code's connectivity probe is answered here, never relayed.
    #[test]
    fn the_hello_probe_is_answered_by_the_endpoint() {
        let (relay, hosts) = fake_relay();
        let addr = server(relay, 4);
        let (status, headers, body) = parse_response(&exchange(
            addr,
            b"HEAD /api/hello HTTP/1.1\r\nHost: x\r\n\r\n",
        ));
        assert_eq!(status, 200);
        assert!(body.is_empty(), "a HEAD answer has no body");
        assert_eq!(
            header(&headers, "content-length"),
            Some(HELLO_BODY.len().to_string().as_str())
        );
        let (status, _, body) =
            parse_response(&exchange(addr, b"GET /api/hello?x=1 HTTP/1.1\r\n\r\n"));
        assert_eq!((status, body.as_slice()), (200, HELLO_BODY.as_bytes()));
        assert!(hosts.try_recv().is_err(), "the probe was relayed");
        // Any other method or path on it goes to the host (and its rules).
        let (relay, hosts) = fake_relay();
        let addr = server(relay, 4);
        let host = thread::spawn(move || {
            let mut host = hosts.recv().expect("a connection");
            let (head, _) = read_request(&mut host);
            respond(&mut host, 404, &[], &[b"{}"]);
            head
        });
        let (status, _, _) = parse_response(&exchange(
            addr,
            b"POST /api/hello HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        ));
        assert_eq!(status, 404);
        assert!(matches!(
            host.join().expect("host"),
            Message::HttpRequest { method, .. } if method == "POST"
        ));
    }

    /// The default limit is the host's largest: a body over the old 8 MiB
    /// goes through; the host's smaller limit is taken, a larger one capped.
    #[test]
    fn the_body_limit_is_the_hosts() {
        let (relay, hosts) = fake_relay();
        let addr = server(relay, 4);
        let size = (9 << 20) + 1;
        let host = thread::spawn(move || {
            let mut host = hosts.recv().expect("a connection");
            let (_, body) = read_request(&mut host);
            respond(&mut host, 200, &[], &[b"{}"]);
            body.len()
        });
        let mut request =
            format!("POST /v1/messages HTTP/1.1\r\nContent-Length: {size}\r\n\r\n").into_bytes();
        request.resize(request.len() + size, b'x');
        let (status, _, _) = parse_response(&exchange(addr, &request));
        assert_eq!(status, 200);
        assert_eq!(host.join().expect("host"), size);
        let listener = |max| {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let std::net::SocketAddr::V4(a) = l.local_addr().expect("addr") else {
                panic!("not v4")
            };
            spawn_server(l, DownRelay, None, max).expect("server");
            a
        };
        let small = listener(Some(100));
        let (status, _, body) = parse_response(&exchange(
            small,
            b"POST /v1/messages HTTP/1.1\r\nContent-Length: 101\r\n\r\n",
        ));
        assert_eq!(status, 413);
        assert!(error_message(&body).contains("limit of 100 bytes"));
        let huge = listener(Some(u64::MAX));
        let declared = format!(
            "POST /v1/messages HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(parse_response(&exchange(huge, declared.as_bytes())).0, 413);
    }
}
