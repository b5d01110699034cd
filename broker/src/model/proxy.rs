//! One model call: read the guest's request off its vsock connection
//! (bounded), check it against the rules and the policy, forward it to the
//! upstream with the real key, relay the response chunk by chunk as it
//! arrives, and audit the call (or its refusal).

use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use airlock_protocol::limits::MAX_HTTP_CHUNK;
use airlock_protocol::{encode, read_frame, FrameError, Message};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::body::Top;
use super::config::{AnthropicAuth, Settings};
use super::policy::{self, Ask, Budget, Exhausted, Reserved};
use super::rules::{self, Api, Denial, Kind, Reason};
use super::scrub::Scrubber;
use super::usage::{Scanner, Usage};
use crate::audit::records::{
    CapRecord, Charged, ModelCall, ModelDenied, ModelProtocolError, ModelSummary, ReservedRecord,
    Scrubbed,
};
use crate::audit::{AuditLog, Durability};

/// How long the guest may take between frames of its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a write of the answer to the guest may block.
const RESPONSE_WRITE_TIMEOUT: Duration = Duration::from_secs(300);
/// A body over the policy's limit is read and dropped up to this many
/// bytes (so that the guest gets its 413); beyond, the connection closes.
const MAX_DRAIN: u64 = 64 << 20;
/// How long to wait for the upstream to answer a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for the upstream's response head.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(600);
/// Most `model.denied` and `model.protocol_error` records per run; beyond,
/// they are counted in `model.summary`.
const MAX_DENIAL_RECORDS: u64 = 1000;
/// Most lines about upstream failures on stderr per run.
const MAX_NOTICES: u64 = 5;
/// Longest request target put in an audit record.
const MAX_AUDIT_TARGET: usize = 512;
/// Longest model name airlock forwards (and records).
const MAX_MODEL_NAME: usize = 256;

/// A request as the guest sent it.
#[derive(Debug)]
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    /// Kept up to the policy's limit.
    body: Vec<u8>,
    /// All body bytes the guest sent.
    body_bytes: u64,
    sha256: String,
    /// The share of [`MAX_HELD_BODIES`] this body holds (given back on
    /// drop); `None` when the body did not fit in what was left: the
    /// request is then refused as busy, not kept.
    held: Option<Held>,
}

/// Most request-body bytes the proxy holds at once over all the calls in
/// flight (each call holds its body until it is forwarded): a hostile
/// agent's concurrent large requests cannot make the host hold
/// `MAX_CONCURRENT` × the body limit.
pub const MAX_HELD_BODIES: u64 = 96 << 20;

/// A share of the held-bodies budget, given back on drop.
#[derive(Debug)]
struct Held {
    pool: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The pool's size ([`MAX_HELD_BODIES`]).
    limit: u64,
    bytes: u64,
}

impl Held {
    /// Takes `n` more bytes of the budget, if that many are left.
    fn grow(&mut self, n: u64) -> bool {
        let pool = &self.pool;
        let taken = pool.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
            used.checked_add(n).filter(|&u| u <= self.limit)
        });
        if taken.is_ok() {
            self.bytes += n;
        }
        taken.is_ok()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.pool.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// Why a connection was dropped without an answer.
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("the guest broke the model protocol")]
    Frame(#[source] FrameError),
    #[error("unexpected {0} on a model connection")]
    Unexpected(&'static str),
    #[error("request body over {MAX_DRAIN} bytes")]
    Flood,
}

/// The proxy of one run, shared by its connections.
#[derive(Debug)]
pub struct Proxy {
    settings: Settings,
    /// Every configured key, to mask in what goes back to the guest.
    scrubber: Scrubber,
    budget: Budget,
    audit: AuditLog,
    agent: ureq::Agent,
    calls: AtomicU64,
    denied: AtomicU64,
    broken: AtomicU64,
    notices: AtomicU64,
    /// The refusal reasons already told on stderr (once each per run).
    told: std::sync::Mutex<Vec<Reason>>,
    /// Request-body bytes held now, over all calls ([`MAX_HELD_BODIES`]).
    held: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn short(target: &str) -> &str {
    short_to(target, MAX_AUDIT_TARGET)
}

/// At most `max` bytes of `text`, cut on a character boundary.
fn short_to(text: &str, max: usize) -> &str {
    let target = text;
    let mut end = target.len().min(max);
    while !target.is_char_boundary(end) {
        end -= 1;
    }
    &target[..end]
}

/// What airlock changed in a request body before forwarding it: only the
/// output-token cap, lowered (or set) to the run's tokens left under a
/// token budget. Nothing else is ever added (an OpenAI stream's
/// `stream_options` stays as the client sent it: its usage is read when
/// the client asked for it, else the call is charged its reservation).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Rewrites {
    max_tokens: Option<OutputCap>,
}

/// An output-token cap airlock set on a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OutputCap {
    field: &'static str,
    /// What the agent asked for (`None`: nothing, or not a number).
    asked: Option<u64>,
    sent: u64,
    /// OpenAI's older `max_tokens`, given besides `max_completion_tokens`
    /// (an upstream or gateway may honour either), lowered too.
    also: Option<&'static str>,
}

/// The output-cap fields of a request body, the one airlock records first:
/// `max_tokens` for Anthropic; `max_output_tokens` for OpenAI Responses;
/// for OpenAI Chat Completions `max_completion_tokens`, or the older
/// `max_tokens` if that is the only one given, and both when both are.
fn cap_fields(
    api: Api,
    responses: bool,
    obj: &serde_json::Map<String, Value>,
) -> &'static [&'static str] {
    match api {
        Api::Anthropic => &["max_tokens"],
        Api::OpenAi if responses => &["max_output_tokens"],
        Api::OpenAi => match (
            obj.contains_key("max_completion_tokens"),
            obj.contains_key("max_tokens"),
        ) {
            (true, true) => &["max_completion_tokens", "max_tokens"],
            (false, true) => &["max_tokens"],
            _ => &["max_completion_tokens"],
        },
    }
}

/// What a completion asks of the budget: the largest output cap it gives
/// (`None` if one is missing or not a number, as the upstream's default
/// then applies), OpenAI's `n` (any API: a gateway may honour it on
/// either) and the input estimate. A `n` that is not a positive integer
/// is refused.
fn ask_of(
    api: Api,
    responses: bool,
    obj: &serde_json::Map<String, Value>,
    body_bytes: u64,
) -> Result<Ask, &'static str> {
    let mut output = Some(0u64);
    for field in cap_fields(api, responses, obj) {
        let asked = obj.get(*field).and_then(Value::as_u64);
        output = output.zip(asked).map(|(a, b)| a.max(b));
    }
    let n = match obj.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .ok_or("n must be a positive integer")?,
    };
    Ok(Ask {
        output,
        n,
        input_estimate: policy::input_estimate(body_bytes),
    })
}

/// Under a token budget, no call may ask for more output than the run has
/// left (`limit`, per choice): the request's cap fields ([`cap_fields`])
/// are lowered to `limit`, or set when missing or not a number. `None`
/// when the agent already asked for no more.
fn cap_output_tokens(
    api: Api,
    responses: bool,
    obj: &mut serde_json::Map<String, Value>,
    limit: u64,
) -> Option<OutputCap> {
    let mut capped: Option<OutputCap> = None;
    for field in cap_fields(api, responses, obj) {
        let asked = obj.get(*field).and_then(Value::as_u64);
        if asked.is_some_and(|a| a <= limit) {
            continue;
        }
        obj.insert((*field).into(), Value::from(limit));
        match &mut capped {
            None => {
                capped = Some(OutputCap {
                    field,
                    asked,
                    sent: limit,
                    also: None,
                })
            }
            Some(first) => first.also = Some(field),
        }
    }
    capped
}

/// The beta the Anthropic API asks of a call made with an OAuth token.
pub const OAUTH_BETA: &str = "oauth-2025-04-20";

/// Adds [`OAUTH_BETA`] to the `anthropic-beta` list the guest sent (or
/// sets it), unless it is there already.
fn add_oauth_beta(headers: &mut Vec<(String, String)>) {
    match headers.iter_mut().find(|(n, _)| n == "anthropic-beta") {
        Some((_, v)) if v.split(',').any(|b| b.trim() == OAUTH_BETA) => {}
        Some((_, v)) if v.trim().is_empty() => *v = OAUTH_BETA.into(),
        Some((_, v)) => *v = format!("{v},{OAUTH_BETA}"),
        None => headers.push(("anthropic-beta".into(), OAUTH_BETA.into())),
    }
}

/// The TLS error behind a failed call, if it is one.
fn tls_error(e: &ureq::Error) -> Option<&rustls::Error> {
    match e {
        ureq::Error::Rustls(t) => Some(t),
        ureq::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        _ => None,
    }
}

/// Why the upstream could not be reached, for the agent's 502, the audit
/// record and stderr: a TLS failure is named as one.
fn unreachable_reason(e: &ureq::Error) -> String {
    match tls_error(e) {
        Some(t @ rustls::Error::InvalidCertificate(_)) => {
            format!("TLS handshake failed: the upstream's certificate is not trusted: {t}")
        }
        Some(t) => format!("TLS handshake failed: {t}"),
        None => e.to_string(),
    }
}

/// Reads `HttpRequest`, `HttpBody`…, `HttpEnd`, keeping at most `max`
/// body bytes.
fn read_request<R: Read>(
    mut r: R,
    max: u64,
    pool: &std::sync::Arc<std::sync::atomic::AtomicU64>,
    pool_limit: u64,
) -> Result<Request, Broken> {
    let (method, target, headers) = match read_frame(&mut r).map_err(Broken::Frame)? {
        Message::HttpRequest {
            method,
            target,
            headers,
        } => (method, target, headers),
        other => return Err(Broken::Unexpected(other.kind())),
    };
    let mut body = Vec::new();
    let mut body_bytes = 0u64;
    let mut hash = Sha256::new();
    let mut held = Some(Held {
        pool: std::sync::Arc::clone(pool),
        limit: pool_limit,
        bytes: 0,
    });
    loop {
        match read_frame(&mut r).map_err(Broken::Frame)? {
            Message::HttpBody(data) => {
                let n = u64::try_from(data.len()).unwrap_or(u64::MAX);
                body_bytes = body_bytes.saturating_add(n);
                hash.update(&data);
                if body_bytes > MAX_DRAIN {
                    return Err(Broken::Flood);
                }
                if body_bytes <= max {
                    // Capacity grows by doubling, never past the limit,
                    // and the budget is charged what is allocated.
                    let need = body.len() + data.len();
                    let cap = body.capacity();
                    let grown = if need <= cap {
                        Some(cap)
                    } else {
                        let limit = usize::try_from(max).unwrap_or(usize::MAX);
                        Some((cap * 2).max(need).min(limit.max(need)))
                    };
                    let fits = grown.is_some_and(|new_cap| {
                        new_cap == cap
                            || held.as_mut().is_some_and(|h| {
                                h.grow(u64::try_from(new_cap - cap).unwrap_or(u64::MAX))
                            })
                    });
                    if fits {
                        if let Some(new_cap) = grown {
                            body.reserve_exact(new_cap - body.len());
                        }
                        body.extend_from_slice(&data);
                    } else {
                        // Busy: read on (the guest gets its answer after
                        // its request), keep nothing.
                        held = None;
                        body = Vec::new();
                    }
                }
            }
            Message::HttpEnd => break,
            other => return Err(Broken::Unexpected(other.kind())),
        }
    }
    Ok(Request {
        method,
        target,
        headers,
        body,
        body_bytes,
        sha256: hex(&hash.finalize()),
        held,
    })
}

fn send<W: Write>(w: &mut W, msg: &Message) -> io::Result<()> {
    let frame = encode(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    w.write_all(&frame)?;
    w.flush()
}

/// Writes a whole small response.
fn respond<W: Write>(
    w: &mut W,
    status: u16,
    headers: Vec<(String, String)>,
    body: &[u8],
) -> io::Result<()> {
    send(w, &Message::HttpResponse { status, headers })?;
    for chunk in body.chunks(MAX_HTTP_CHUNK) {
        send(w, &Message::HttpBody(chunk.to_vec()))?;
    }
    send(w, &Message::HttpEnd)
}

/// Sends body bytes the scrubber let through, in frames the protocol
/// carries, adding them to `hash`, and empties `data`.
fn relay<W: Write>(out: &mut W, data: &mut Vec<u8>, hash: &mut Sha256) -> io::Result<()> {
    hash.update(&data[..]);
    let sent = data
        .chunks(MAX_HTTP_CHUNK)
        .try_for_each(|piece| send(out, &Message::HttpBody(piece.to_vec())));
    data.clear();
    sent
}

/// A header pair the protocol can carry back to the guest.
fn carriable(name: &str, value: &str) -> bool {
    use airlock_protocol::limits::{MAX_HTTP_HEADER_NAME, MAX_HTTP_HEADER_VALUE};
    !name.is_empty()
        && name.len() <= MAX_HTTP_HEADER_NAME
        && value.len() <= MAX_HTTP_HEADER_VALUE
        && !value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// A call that passed the rules and the policy.
#[derive(Debug)]
struct Checked {
    route: rules::Route,
    /// The model the body names.
    model: Option<String>,
    /// The body to forward, when airlock changed it (else the guest's).
    body: Option<Vec<u8>>,
    /// What airlock changed in it.
    rewrites: Rewrites,
    /// What it holds against the token budget until it ends.
    reserved: Option<Reserved>,
}

/// The tokens a call that ended is charged: the upstream's counts; where
/// the upstream answered 2xx without a count, what the call reserved (it
/// may have used as much); the same when the answer was cut short (the
/// agent went away, or the upstream), as a stream's count is a running
/// one and the upstream may have generated more than was read; nothing
/// when it was not reached.
fn charge(relayed: &Relayed, reserved: Option<&Reserved>) -> (u64, u64) {
    let answered =
        relayed.head_ms.is_some() && relayed.status.is_some_and(|s| (200..300).contains(&s));
    let (input, output) = match reserved {
        Some(r) if answered => (r.input_estimate, r.output),
        _ => (0, 0),
    };
    let output = match relayed.usage.output {
        Some(o) if answered && !relayed.complete => o.max(output),
        Some(o) => o,
        None => output,
    };
    (relayed.usage.input.unwrap_or(input), output)
}

/// What a forwarded call led to.
#[derive(Debug, Default)]
struct Relayed {
    status: Option<u16>,
    head_ms: Option<u64>,
    first_chunk_ms: Option<u64>,
    response_bytes: u64,
    response_sha256: Option<String>,
    usage: Usage,
    /// What went wrong, if something did.
    error: Option<String>,
    /// The response reached the guest whole.
    complete: bool,
    /// Keys masked in the response headers (a header whose name holds
    /// one is dropped and counted here) and in its body.
    scrubbed_headers: usize,
    scrubbed_body: usize,
}

impl Proxy {
    pub fn new(settings: Settings, audit: AuditLog) -> Proxy {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &settings.ca {
            // The built-in roots and the user's: ureq takes one list.
            let roots = webpki_root_certs::TLS_SERVER_ROOT_CERTS
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .chain(
                    ca.certs
                        .iter()
                        .map(|der| ureq::tls::Certificate::from_der(der).to_owned()),
                );
            tls = tls.root_certs(ureq::tls::RootCerts::from(roots));
        }
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_recv_response(Some(RESPONSE_TIMEOUT))
            // A redirect goes back to the guest as it is: never follow one
            // to another host with the key.
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent("")
            .accept("")
            // Identity, so that the usage can be read on the way.
            .accept_encoding("identity")
            .build()
            .into();
        let scrubber = Scrubber::new(
            [&settings.anthropic_key, &settings.openai_key]
                .into_iter()
                .flatten()
                .map(|k| k.secret.expose()),
        );
        Proxy {
            settings,
            scrubber,
            budget: Budget::default(),
            audit,
            agent,
            calls: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            broken: AtomicU64::new(0),
            notices: AtomicU64::new(0),
            told: std::sync::Mutex::new(Vec::new()),
            held: std::sync::Arc::default(),
        }
    }

    /// Serves one connection from the guest, to its end. Never panics on
    /// the guest's input.
    pub fn serve(&self, stream: &UnixStream) {
        let started = Instant::now();
        let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        // An agent that stops reading its answer does not hold the thread
        // (and the upstream connection) for ever.
        let _ = stream.set_write_timeout(Some(RESPONSE_WRITE_TIMEOUT));
        let max = self.settings.policy.max_request_bytes;
        let req = match read_request(BufReader::new(stream), max, &self.held, MAX_HELD_BODIES) {
            Ok(r) => r,
            Err(e) => {
                if self.broken.fetch_add(1, Ordering::SeqCst) < MAX_DENIAL_RECORDS {
                    self.audit.record(
                        &ModelProtocolError {
                            port: airlock_protocol::MODEL_PORT,
                            reason: crate::text::report(&e),
                        },
                        Durability::Synced,
                    );
                }
                return;
            }
        };
        let mut out = stream;
        let (_, dropped) = rules::filter_request_headers(&req.headers);
        // Credentials the guest tried to send: dropped, never forwarded.
        let credentials: Vec<&str> = dropped
            .iter()
            .filter(|n| rules::is_credential(n))
            .map(String::as_str)
            .collect();
        let checked = self.check(&req);
        let Checked {
            route,
            model,
            body,
            rewrites,
            reserved,
        } = match checked {
            Ok(ok) => ok,
            Err((denial, model)) => {
                let _ = respond(&mut out, denial.status(), denial.headers(), &denial.body());
                self.tell(&req, &denial);
                if self.denied.fetch_add(1, Ordering::SeqCst) < MAX_DENIAL_RECORDS {
                    self.audit.record(
                        &ModelDenied {
                            api: denial.api.name(),
                            method: &req.method,
                            target: short(&req.target),
                            model: model.as_deref(),
                            reason: denial.reason.name(),
                            status: denial.status(),
                            message: &denial.message,
                            request_bytes: req.body_bytes,
                            dropped_headers: &dropped,
                            guest_credentials_dropped: credentials,
                        },
                        Durability::Synced,
                    );
                }
                return;
            }
        };
        let number = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let sent = body.as_deref().unwrap_or(&req.body);
        let mut relayed = self.forward(&req, &route, sent, &mut out, started);
        // An error may quote what was sent: scrubbed for stderr and the log.
        relayed.error = relayed.error.map(|e| self.scrubber.scrub_str(&e).0);
        if relayed.status == Some(502) && relayed.head_ms.is_none() {
            // Unreachable: the guest got an API-shaped 502; the user hears
            // of the first few.
            if self.notices.fetch_add(1, Ordering::SeqCst) < MAX_NOTICES {
                let error = relayed.error.as_deref().unwrap_or("unknown error");
                let hint = match &self.settings.ca {
                    _ if !error.contains("certificate is not trusted") => String::new(),
                    None => "; for a private or corporate CA, pass it with --model-ca FILE".into(),
                    Some(ca) => format!(
                        "; neither the built-in roots nor --model-ca {} vouch for it",
                        ca.path.display()
                    ),
                };
                eprintln!(
                    "airlock: model upstream {} unreachable: {error} (the agent got a 502){hint}",
                    self.settings
                        .upstream(route.api)
                        .map(|u| u.display())
                        .unwrap_or_default(),
                );
            }
        }
        let scrubbed = relayed.scrubbed_headers + relayed.scrubbed_body;
        if scrubbed > 0 {
            eprintln!(
                "airlock: warning: model call {number}: the upstream sent an API key back \
                 ({scrubbed} times); airlock masked it before the agent saw it"
            );
        }
        let (charged_input, charged_output) = charge(&relayed, reserved.as_ref());
        self.budget
            .settle(reserved.as_ref(), charged_input, charged_output);
        let forwarded_sha = body.as_ref().map(|b| hex(&Sha256::digest(b)));
        self.audit.record(
            &ModelCall {
                call: number,
                api: route.api.name(),
                method: &req.method,
                target: short(&req.target),
                model: model.as_deref(),
                status: relayed.status,
                input_tokens: relayed.usage.input,
                output_tokens: relayed.usage.output,
                latency_ms: millis(started.elapsed()),
                upstream_head_ms: relayed.head_ms,
                first_chunk_ms: relayed.first_chunk_ms,
                request_bytes: req.body_bytes,
                request_sha256: &req.sha256,
                forwarded_sha256: forwarded_sha,
                max_tokens_capped: rewrites.max_tokens.map(|c| CapRecord {
                    field: c.field,
                    asked: c.asked,
                    sent: c.sent,
                    also: c.also,
                }),
                reserved: reserved.map(|r| ReservedRecord {
                    output: r.output,
                    input_estimate: r.input_estimate,
                    n: r.n,
                }),
                charged: Charged {
                    input: charged_input,
                    output: charged_output,
                },
                scrubbed: (scrubbed > 0).then_some(Scrubbed {
                    headers: relayed.scrubbed_headers,
                    body: relayed.scrubbed_body,
                }),
                response_bytes: relayed.response_bytes,
                response_sha256: relayed.response_sha256,
                complete: relayed.complete,
                error: relayed.error,
                dropped_headers: &dropped,
                guest_credentials_dropped: credentials,
            },
            Durability::Synced,
        );
    }

    /// One `airlock: model: …` line on stderr for the first refusal of
    /// each reason in the run: the user learns which rule or limit and
    /// which flag, without a line per call of an agent that insists.
    fn tell(&self, req: &Request, denial: &Denial) {
        let mut told = self
            .told
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if told.contains(&denial.reason) {
            return;
        }
        told.push(denial.reason);
        drop(told);
        eprintln!(
            "airlock: model: refused {} {:?} ({} {}): {} [further refusals for this reason \
             only in the audit log]",
            req.method,
            short(&req.target),
            denial.status(),
            denial.reason.name(),
            denial.message,
        );
    }

    /// The reasons told on stderr so far, in order.
    #[cfg(test)]
    pub(super) fn told(&self) -> Vec<&'static str> {
        self.told
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|r| r.name())
            .collect()
    }

    /// The rules and the policy, in order. On success: the route, the
    /// model named, the body to forward and what airlock changed in it.
    #[allow(clippy::type_complexity)]
    fn check(&self, req: &Request) -> Result<Checked, (Denial, Option<String>)> {
        let policy = &self.settings.policy;
        let route = rules::route(&req.method, &req.target, &req.headers).map_err(|d| (d, None))?;
        let api = route.api;
        rules::check_host(api, &req.headers).map_err(|d| (d, None))?;
        let deny = |reason, message: String, model: Option<String>| {
            // A malformed body breaks a rule no flag changes: say so.
            let message = if reason == Reason::BadBody {
                format!("{message} (airlock's request body rules; no flag changes them)")
            } else {
                message
            };
            Err((Denial::new(api, reason, message), model))
        };
        if req.held.is_none() && req.body_bytes <= policy.max_request_bytes {
            return deny(
                Reason::Busy,
                format!(
                    "airlock holds {} MiB of request bodies at most over all calls in flight, \
                     and this {}-byte body did not fit: retry when fewer large calls run at once",
                    MAX_HELD_BODIES >> 20,
                    req.body_bytes
                ),
                None,
            );
        }
        if req.body_bytes > policy.max_request_bytes {
            return deny(
                Reason::BodyTooLarge,
                format!(
                    "request body of {} bytes is over airlock's limit of {} bytes \
                     (raise it with --model-max-request-bytes, at most {})",
                    req.body_bytes,
                    policy.max_request_bytes,
                    policy::MAX_REQUEST_BYTES_LIMIT
                ),
                None,
            );
        }
        // The body's top level only, and of it only the fields airlock
        // reads, as JSON values ([`Top`]).
        let mut top: Option<Top> = None;
        let mut json: Option<Value> = None;
        if route.completion {
            match Top::parse(&req.body).and_then(|t| Ok((t.read()?, t))) {
                Ok((read, t)) => {
                    json = Some(Value::Object(read));
                    top = Some(t);
                }
                Err(e) => return deny(Reason::BadBody, e.to_string(), None),
            }
        }
        let model = json
            .as_ref()
            .and_then(|v| v.get("model"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        // The name goes into audit records and messages: no real model has
        // a long one, and a megabyte-long one must not fill the log.
        if model.as_ref().is_some_and(|m| m.len() > MAX_MODEL_NAME) {
            return deny(
                Reason::BadBody,
                format!("airlock refuses a model name longer than {MAX_MODEL_NAME} bytes"),
                model.map(|m| short_to(&m, MAX_MODEL_NAME).to_owned()),
            );
        }
        if !self.settings.has_upstream() {
            return deny(
                Reason::NoUpstream,
                "model calls are not enabled for this sandbox: airlock run was given no --model-upstream".into(),
                model,
            );
        }
        if self.settings.upstream(api).is_none() {
            // The upstream's URL is not shown: it may hold an account's
            // name or a token in its path.
            return deny(
                Reason::NoRoute,
                format!(
                    "airlock routes no {api} calls in this run (its --model-upstream serves \
                     another API only); they would need --model-upstream {api}=URL",
                    api = api.name()
                ),
                model,
            );
        }
        if self.settings.key(api).is_none() {
            return deny(
                Reason::NoKey,
                format!(
                    "airlock has no API key for the {} API on this host (set {} in \
                     airlock's environment, or pass --model-key-env or --model-key-file)",
                    api.name(),
                    super::config::key_env_of(api)
                ),
                model,
            );
        }
        if route.completion {
            match &model {
                Some(m) if policy.allows_model(m) => {}
                Some(m) => {
                    return deny(
                        Reason::ModelNotAllowed,
                        format!(
                            "model {m:?} is not allowed by airlock's policy (allowed: {}; \
                             change it with --model-allow or --model-policy)",
                            policy
                                .allowed_models
                                .as_deref()
                                .unwrap_or_default()
                                .join(", ")
                        ),
                        model,
                    )
                }
                None => return deny(Reason::BadBody, "the request names no model".into(), None),
            }
        }
        let responses = route.target.starts_with("/v1/responses");
        if responses && json.as_ref().and_then(|v| v.get("background")) == Some(&Value::Bool(true))
        {
            return deny(
                Reason::OutOfRun,
                "airlock refuses background responses: they run, and are billed, after this \
                 call returns and outside this run's budget (no flag enables them)"
                    .into(),
                model,
            );
        }
        // Only what generates asks for output (and is capped and reserved).
        let ask = match json.as_ref() {
            Some(Value::Object(obj)) if route.kind == Kind::Generate => {
                match ask_of(api, responses, obj, req.body_bytes) {
                    Ok(ask) => Some(ask),
                    Err(why) => return deny(Reason::BadBody, why.into(), model),
                }
            }
            _ => None,
        };
        // From here on the call is admitted: nothing refuses it, and what
        // it reserved is settled when it ends (`serve`).
        let admitted = match self
            .budget
            .admit(policy, ask.as_ref(), route.spends_tokens())
        {
            Ok(admitted) => admitted,
            Err(Exhausted::Requests(max)) => {
                return deny(
                    Reason::RequestBudget,
                    format!(
                        "airlock's budget of {max} model requests for this run is spent \
                         (raise it with --model-max-requests)"
                    ),
                    model,
                )
            }
            Err(Exhausted::Tokens {
                used,
                reserved,
                max,
            }) => {
                return deny(
                    Reason::TokenBudget,
                    format!(
                        "airlock's budget of {max} tokens for this run is spent ({used} used, \
                         {reserved} held by calls in progress; raise it with --model-max-tokens)"
                    ),
                    model,
                )
            }
            Err(Exhausted::Choices { n, left }) => {
                return deny(
                    Reason::TokenBudget,
                    format!(
                        "this request asks for {n} choices (n) but only {left} tokens of \
                         airlock's budget for this run are left (--model-max-tokens)"
                    ),
                    model,
                )
            }
        };
        let mut rewrites = Rewrites::default();
        if let (Some(Value::Object(obj)), Some(limit)) = (json.as_mut(), admitted.output_limit) {
            rewrites.max_tokens = cap_output_tokens(api, responses, obj, limit);
        }
        let body = match (json, top, rewrites.max_tokens) {
            (Some(Value::Object(values)), Some(top), Some(cap)) => {
                let changed: Vec<&str> = std::iter::once(cap.field).chain(cap.also).collect();
                Some(top.rebuild(&values, &changed))
            }
            _ => None,
        };
        Ok(Checked {
            route,
            model,
            body,
            rewrites,
            reserved: admitted.reserved,
        })
    }

    /// Sends the call upstream and relays the answer to `out`.
    fn forward<W: Write>(
        &self,
        req: &Request,
        route: &rules::Route,
        body: &[u8],
        out: &mut W,
        started: Instant,
    ) -> Relayed {
        let mut relayed = Relayed::default();
        // Each provider's key goes only to that provider's upstream.
        let (Some(upstream), Some(key)) = (
            self.settings.upstream(route.api),
            self.settings.key(route.api),
        ) else {
            relayed.error = Some("no upstream or key".into());
            return relayed;
        };
        let (mut kept, _) = rules::filter_request_headers(&req.headers);
        let bearer = match route.api {
            Api::Anthropic => self.settings.anthropic_auth == AnthropicAuth::Bearer,
            Api::OpenAi => true,
        };
        if route.api == Api::Anthropic && bearer {
            add_oauth_beta(&mut kept);
        }
        if route.api == Api::OpenAi {
            kept.extend(self.settings.openai_headers.iter().cloned());
        }
        let mut builder = ureq::http::Request::builder()
            .method(req.method.as_str())
            .uri(upstream.url(&route.target));
        for (name, value) in &kept {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder = if bearer {
            builder.header("authorization", format!("Bearer {}", key.secret.expose()))
        } else {
            builder.header("x-api-key", key.secret.expose())
        };
        let result = if route.completion {
            builder
                .body(body.to_vec())
                .map_err(ureq::Error::from)
                .and_then(|r| self.agent.run(r))
        } else {
            builder
                .body(())
                .map_err(ureq::Error::from)
                .and_then(|r| self.agent.run(r))
        };
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                let why = unreachable_reason(&e);
                // An error may quote what was sent: scrubbed like the rest.
                let why = self.scrubber.scrub_str(&why).0;
                let denial = Denial::new(
                    route.api,
                    Reason::Unreachable,
                    format!("airlock could not reach the model upstream: {why}"),
                );
                relayed.status = Some(denial.status());
                relayed.error = Some(why);
                relayed.complete =
                    respond(out, denial.status(), denial.headers(), &denial.body()).is_ok();
                return relayed;
            }
        };
        relayed.head_ms = Some(millis(started.elapsed()));
        let status = response.status().as_u16();
        relayed.status = Some(status);
        let mut headers = Vec::new();
        let mut content_type = None;
        for (name, value) in response.headers() {
            let Ok(value) = value.to_str() else { continue };
            if name.as_str() == "content-type" {
                content_type = Some(value.to_owned());
            }
            if rules::keep_response_header(name.as_str())
                && carriable(name.as_str(), value)
                && headers.len() < airlock_protocol::limits::MAX_HTTP_HEADERS
            {
                if self.scrubber.finds(name.as_str()) {
                    relayed.scrubbed_headers += 1;
                    continue;
                }
                let (value, n) = self.scrubber.scrub_str(value);
                relayed.scrubbed_headers += n;
                headers.push((name.as_str().to_owned(), value));
            }
        }
        if let Err(e) = send(out, &Message::HttpResponse { status, headers }) {
            relayed.error = Some(format!("the guest went away: {e}"));
            return relayed;
        }
        let mut scanner = Scanner::new(content_type.as_deref());
        let mut scrub = self.scrubber.stream();
        let mut scrubbed = Vec::with_capacity(MAX_HTTP_CHUNK);
        let mut hash = Sha256::new();
        let mut reader = response.into_body().into_reader();
        let mut buf = vec![0u8; MAX_HTTP_CHUNK];
        let mut guest_gone = false;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Cut short: closing without HttpEnd tells the guest.
                    relayed.error = Some(format!("the upstream's response was cut short: {e}"));
                    break;
                }
            };
            let chunk = &buf[..n];
            relayed
                .first_chunk_ms
                .get_or_insert_with(|| millis(started.elapsed()));
            scanner.feed(chunk);
            relayed.response_bytes += u64::try_from(n).unwrap_or(u64::MAX);
            scrub.feed(chunk, &mut scrubbed);
            if scrubbed.is_empty() {
                continue;
            }
            if let Err(e) = relay(out, &mut scrubbed, &mut hash) {
                relayed.error = Some(format!("the guest went away: {e}"));
                guest_gone = true;
                break;
            }
        }
        // What was held back as a possible key's beginning.
        scrub.finish(&mut scrubbed);
        relayed.scrubbed_body = scrub.count();
        if !scrubbed.is_empty() && !guest_gone {
            if let Err(e) = relay(out, &mut scrubbed, &mut hash) {
                relayed.error = Some(format!("the guest went away: {e}"));
            }
        }
        relayed.usage = scanner.finish();
        relayed.response_sha256 = Some(hex(&hash.finalize()));
        if relayed.error.is_none() {
            match send(out, &Message::HttpEnd) {
                Ok(()) => relayed.complete = true,
                Err(e) => relayed.error = Some(format!("the guest went away: {e}")),
            }
        }
        relayed
    }

    /// The `model.summary` record's fields.
    pub fn summary(&self) -> ModelSummary {
        let c = self.budget.counts();
        let denied = self.denied.load(Ordering::SeqCst);
        let broken = self.broken.load(Ordering::SeqCst);
        ModelSummary {
            calls: self.calls.load(Ordering::SeqCst),
            denied,
            protocol_errors: broken,
            unrecorded: denied.saturating_sub(MAX_DENIAL_RECORDS)
                + broken.saturating_sub(MAX_DENIAL_RECORDS),
            requests_admitted: c.requests,
            input_tokens: c.input_tokens,
            output_tokens: c.output_tokens,
            unfinished_at_end: None,
        }
    }
}

#[cfg(test)]
mod held_tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// The frames of a POST with a `len`-byte body.
    fn request_frames(len: usize) -> Vec<u8> {
        let mut out = encode(&Message::HttpRequest {
            method: "POST".into(),
            target: "/v1/messages".into(),
            headers: vec![],
        })
        .expect("head");
        let chunk = vec![b' '; MAX_HTTP_CHUNK];
        let mut left = len;
        while left > 0 {
            let n = left.min(MAX_HTTP_CHUNK);
            out.extend(encode(&Message::HttpBody(chunk[..n].to_vec())).expect("body"));
            left -= n;
        }
        out.extend(encode(&Message::HttpEnd).expect("end"));
        out
    }

    #[test]
    fn concurrent_bodies_share_one_bounded_budget() {
        let pool = Arc::new(AtomicU64::new(0));
        // The real sizes (64 MiB limit, 96 MiB pool) scaled down 64 times.
        let (max, limit) = (1 << 20, 3 << 19);
        let big = request_frames(960 << 10);
        let first = read_request(big.as_slice(), max, &pool, limit).expect("first");
        assert!(first.held.is_some());
        assert_eq!(first.body.len(), 960 << 10);
        assert_eq!(pool.load(Ordering::SeqCst), first.body.capacity() as u64);
        // A second one that does not fit beside it: read, not kept.
        let second =
            read_request(request_frames(640 << 10).as_slice(), max, &pool, limit).expect("second");
        assert!(second.held.is_none());
        assert!(second.body.is_empty());
        assert_eq!(second.body_bytes, 640 << 10);
        assert_eq!(
            pool.load(Ordering::SeqCst),
            first.body.capacity() as u64,
            "the busy one holds nothing"
        );
        drop(second);
        drop(first);
        assert_eq!(pool.load(Ordering::SeqCst), 0, "all given back");
        let third =
            read_request(request_frames(640 << 10).as_slice(), max, &pool, limit).expect("third");
        assert!(third.held.is_some());
        assert_eq!(third.body.len(), 640 << 10);
        // What the body holds is charged, and never more than the limit.
        assert_eq!(pool.load(Ordering::SeqCst), third.body.capacity() as u64);
        assert!(third.body.capacity() <= usize::try_from(max).expect("fits"));
    }

    #[test]
    fn a_busy_refusal_may_be_retried() {
        let d = Denial::new(rules::Api::Anthropic, Reason::Busy, "busy");
        assert_eq!(d.status(), 503);
        assert!(!d
            .headers()
            .iter()
            .any(|(n, v)| n == "x-should-retry" && v == "false"));
    }
}
