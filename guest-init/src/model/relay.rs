//! One request, relayed: to the host's model proxy over its own vsock
//! connection, and the answer streamed back; refusals reported for the
//! audit log.

use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;

use airlock_protocol::limits::MAX_AUDIT_VALUE;
use airlock_protocol::{read_frame, write_frame, FrameError, Message, HOST_CID, MODEL_PORT};

use crate::vsock::VsockStream;

use super::*;

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
pub(crate) const MAX_PENDING_REPORTS: usize = 64;

/// Where the endpoint reports the requests it answers itself (refusals, and
/// a host it cannot reach): as `model.refused` audit claims for the control
/// session to send, which it is woken for through `wake`.
#[derive(Debug, Clone)]
pub struct Reporter {
    pub(crate) reports: SyncSender<Message>,
    pub(crate) wake: Arc<UnixStream>,
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
    pub(crate) fn refused(&self, request: Option<&str>, status: u16, reason: &str) {
        let mut fields = vec![("status".to_owned(), status.to_string())];
        if let Some(request) = request {
            fields.push(("request".to_owned(), audit_value(request)));
        }
        fields.push(("reason".to_owned(), audit_value(reason)));
        self.report("model.refused", fields);
    }

    /// An `AuditEvent` of `kind` with `fields` (values already bounded).
    pub(crate) fn report(&self, kind: &str, fields: Vec<(String, String)>) {
        let event = Message::AuditEvent {
            kind: kind.into(),
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
pub(crate) fn audit_value(text: &str) -> String {
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

/// What became of one connection, for the debug log.
#[derive(Debug)]
pub(crate) enum Done {
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
pub(crate) fn host_broke(what: impl std::fmt::Display) -> Refusal {
    Refusal::new(
        502,
        "api_error",
        format!("the sandbox's model relay failed: {what}"),
    )
    .retryable()
}

/// Whether a request is the connectivity probe the endpoint answers
/// itself (`HEAD` or `GET /api/hello`, any query).
pub(crate) fn is_probe(head: &Head) -> bool {
    let path = head.target.split('?').next().unwrap_or_default();
    path == "/api/hello" && matches!(head.method.as_str(), "HEAD" | "GET")
}

/// Answers the probe: 200, a small JSON body (none for `HEAD`).
pub(crate) fn answer_probe(out: &mut impl Write, head: &Head) -> io::Result<()> {
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
pub(crate) fn handle<R: Relay>(
    reader: impl Read,
    mut out: impl Write,
    relay: &R,
    max_body: u64,
) -> Done {
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
pub(crate) fn relay_response(
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

pub(crate) fn describe_frame_error(err: &FrameError) -> String {
    match err {
        FrameError::Closed => "the host closed the connection".into(),
        FrameError::Io(e) if is_timeout(e) => "the host did not answer in time".into(),
        other => other.to_string(),
    }
}
