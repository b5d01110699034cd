//! `airlock-upstream`: a local model API for Airlock's tests, benchmarks and
//! offline demo. It speaks the Anthropic Messages API (`POST /v1/messages`,
//! any query such as `?beta=true`), the OpenAI Chat Completions API
//! (`POST /v1/chat/completions`) and Responses API (`POST /v1/responses`),
//! each streaming (server-sent events) and not, and answers
//! `POST /v1/messages/count_tokens` (a quarter of the body's bytes),
//! `GET /v1/models`, `GET /v1/models/{id}` and `POST /v1/embeddings`; it
//! plays a scripted conversation ([`script`]) including tool calls.
//!
//! Every request is logged as one JSON line to `--log` (method, path, all
//! headers, the key it carried, body sha256, turn, and for streams when the
//! first and last events were sent), so tests can check what reached the
//! upstream. A completion's usage honours its output cap (`max_tokens` /
//! `max_completion_tokens` / `max_output_tokens`, times OpenAI's `n`; the text itself is not
//! cut), and the log records the cap and `n` it got.
//!
//! With `--reflect` it plays a careless upstream that echoes the request:
//! every request header comes back as a response header
//! `anthropic-echo-NAME: VALUE` (a name the providers' own header prefix
//! lets through a proxy) and, as `NAME: VALUE` lines, at the start of the
//! reply's text; streamed replies are then written in 1- and 3-byte HTTP
//! chunks, so that what is echoed straddles chunk boundaries.
//!
//! One thread per connection, at most [`MAX_CONNECTIONS`] at once
//! (beyond that: 503). With `--tls-cert` and `--tls-key` it serves HTTPS
//! ([`tls`]) instead of plain HTTP, the rest unchanged.

mod http;
mod script;
mod tls;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::http::{Chunked, Request};
use crate::script::{pieces, thirds, Script, Turn};
use crate::tls::Conn;

/// Most connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A scripted model API (Anthropic Messages and OpenAI Chat Completions) on
/// a local port, for tests and offline demos.
///
/// Prints the bound address (HOST:PORT) as the first line of stdout, then
/// serves until killed.
#[derive(Debug, Parser)]
#[command(name = "airlock-upstream", version)]
struct Cli {
    /// The conversation to play: {"turns": [{"text": ...} | {"tool": {"name": ..., "input": {...}}}, ...]}
    #[arg(long, value_name = "FILE")]
    script: PathBuf,
    /// Address to listen on (port 0: any free port)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: String,
    /// Append one JSON line per request to this file
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Wait this long between streamed events
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay_ms: u64,
    /// Answer 401 (as the real APIs do) unless the request carries this key
    /// (x-api-key for Anthropic, Authorization: Bearer for OpenAI)
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first) instead of
    /// plain HTTP
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM)
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Echo every request header back, in the response headers
    /// (anthropic-echo-NAME) and at the start of the reply's text, and
    /// stream in 1- and 3-byte chunks: a careless upstream, for testing
    /// that the proxy scrubs its key from what comes back
    #[arg(long)]
    reflect: bool,
}

/// Which API a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Anthropic,
    OpenAi,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::Anthropic => "anthropic",
            Api::OpenAi => "openai",
        }
    }
}

#[derive(Debug)]
struct Server {
    script: Script,
    log: Option<Mutex<File>>,
    delay: Duration,
    key: Option<String>,
    tls: Option<Arc<rustls::ServerConfig>>,
    reflect: bool,
    busy: AtomicUsize,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let text = match std::fs::read_to_string(&cli.script) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "airlock-upstream: cannot read {}: {e}",
                cli.script.display()
            );
            return ExitCode::from(2);
        }
    };
    let script = match Script::parse(&text) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("airlock-upstream: {}: {e}", cli.script.display());
            return ExitCode::from(2);
        }
    };
    let log = match &cli.log {
        Some(path) => match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => Some(Mutex::new(f)),
            Err(e) => {
                eprintln!("airlock-upstream: cannot open {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let tls = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => match tls::server_config(cert, key) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("airlock-upstream: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let listener = match TcpListener::bind(&cli.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("airlock-upstream: cannot listen on {}: {e}", cli.listen);
            return ExitCode::from(2);
        }
    };
    match listener.local_addr() {
        Ok(addr) => {
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{addr}");
            let _ = out.flush();
        }
        Err(e) => {
            eprintln!("airlock-upstream: {e}");
            return ExitCode::from(2);
        }
    }
    let server = Arc::new(Server {
        script,
        log,
        delay: Duration::from_millis(cli.delay_ms),
        key: cli.key,
        tls,
        reflect: cli.reflect,
        busy: AtomicUsize::new(0),
    });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if server.busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            server.busy.fetch_sub(1, Ordering::SeqCst);
            if server.tls.is_none() {
                let _ = http::respond(&stream, 503, "text/plain", b"too many connections\n");
            }
            continue;
        }
        let server = Arc::clone(&server);
        let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
            server.serve(stream);
            server.busy.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            eprintln!("airlock-upstream: cannot start a thread");
        }
    }
    ExitCode::SUCCESS
}

/// What one request led to, for the log.
#[derive(Debug, Default)]
struct Served {
    status: u16,
    turn: Option<usize>,
    stream: bool,
    first_event_ms: Option<u64>,
    last_event_ms: Option<u64>,
    events: usize,
    response_bytes: usize,
    /// The output cap a completion asked for (the larger field if both).
    max_tokens: Option<u64>,
    /// OpenAI's `n`.
    n: Option<u64>,
}

impl Server {
    fn serve(&self, stream: TcpStream) {
        let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
        let _ = stream.set_nodelay(true);
        let mut conn = match Conn::accept(stream, self.tls.as_ref()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("airlock-upstream: TLS handshake failed: {e}");
                return;
            }
        };
        self.serve_conn(&mut conn);
        conn.close();
    }

    fn serve_conn(&self, stream: &mut Conn) {
        let received_ms = now_ms();
        let req = match http::read_request(&mut *stream) {
            Ok(r) => r,
            Err(e) => {
                let _ = http::respond(stream, 400, "text/plain", format!("{e}\n").as_bytes());
                return;
            }
        };
        let api = if matches!(
            req.path(),
            "/v1/chat/completions" | "/v1/responses" | "/v1/embeddings"
        ) || (req.path().starts_with("/v1/models")
            && req.header("anthropic-version").is_none())
        {
            Api::OpenAi
        } else {
            Api::Anthropic
        };
        let key = match api {
            Api::Anthropic => req.header("x-api-key").map(str::to_owned),
            Api::OpenAi => req
                .header("authorization")
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned),
        };
        let served = self
            .answer(stream, &req, api, key.as_deref())
            .unwrap_or_else(|e| {
                Served {
                    status: 599,
                    first_event_ms: None,
                    ..Served::default()
                }
                .with_error(&e)
            });
        self.log(&req, api, key, received_ms, &served);
    }

    fn answer(
        &self,
        stream: &mut Conn,
        req: &Request,
        api: Api,
        key: Option<&str>,
    ) -> io::Result<Served> {
        if let Some(want) = &self.key {
            if key != Some(want.as_str()) {
                let body = error_body(api, 401, "authentication_error", "invalid x-api-key");
                http::respond(&mut *stream, 401, "application/json", &body)?;
                return Ok(Served::status(401));
            }
        }
        match (req.method.as_str(), req.path()) {
            ("GET", "/v1/models") => {
                let body = models(api).to_string();
                http::respond(&mut *stream, 200, "application/json", body.as_bytes())?;
                Ok(Served::status(200))
            }
            ("GET", path) if path.starts_with("/v1/models/") => {
                let id = &path["/v1/models/".len()..];
                let found = models(api)["data"]
                    .as_array()
                    .and_then(|d| d.iter().find(|m| m["id"] == id).cloned());
                match found {
                    Some(model) => {
                        let body = model.to_string();
                        http::respond(&mut *stream, 200, "application/json", body.as_bytes())?;
                        Ok(Served::status(200))
                    }
                    None => {
                        let body = error_body(api, 404, "not_found_error", "no such model");
                        http::respond(&mut *stream, 404, "application/json", &body)?;
                        Ok(Served::status(404))
                    }
                }
            }
            ("POST", "/v1/messages/count_tokens") => {
                let body = json!({ "input_tokens": (req.body.len() / 4).max(1) }).to_string();
                http::respond(&mut *stream, 200, "application/json", body.as_bytes())?;
                Ok(Served::status(200))
            }
            ("POST", "/v1/embeddings") => {
                let tokens = (req.body.len() / 4).max(1);
                let body = json!({
                    "object": "list",
                    "data": [{ "object": "embedding", "index": 0, "embedding": [0.0, 0.5, 1.0] }],
                    "model": "embedding-scripted-1",
                    "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
                })
                .to_string();
                http::respond(&mut *stream, 200, "application/json", body.as_bytes())?;
                Ok(Served::status(200))
            }
            ("POST", "/v1/messages" | "/v1/chat/completions" | "/v1/responses") => {
                let body: Value = match serde_json::from_slice(&req.body) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => {
                        let body = error_body(
                            api,
                            400,
                            "invalid_request_error",
                            "body is not a JSON object",
                        );
                        http::respond(&mut *stream, 400, "application/json", &body)?;
                        return Ok(Served::status(400));
                    }
                };
                self.complete(stream, req, api, &body)
            }
            (_, "/v1/models" | "/v1/messages" | "/v1/chat/completions") => {
                let body = error_body(api, 405, "invalid_request_error", "method not allowed");
                http::respond(&mut *stream, 405, "application/json", &body)?;
                Ok(Served::status(405))
            }
            _ => {
                let body = error_body(api, 404, "not_found_error", "no such endpoint");
                http::respond(&mut *stream, 404, "application/json", &body)?;
                Ok(Served::status(404))
            }
        }
    }

    fn complete(
        &self,
        stream: &mut Conn,
        req: &Request,
        api: Api,
        body: &Value,
    ) -> io::Result<Served> {
        let responses = req.path() == "/v1/responses";
        let messages = body
            .get(if responses { "input" } else { "messages" })
            .and_then(Value::as_array);
        let turn_index = messages
            .map(|m| {
                m.iter()
                    .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
                    .count()
            })
            .unwrap_or(0);
        let mut turn = self.script.turn(turn_index);
        let echoed = self.echo_headers(req);
        if self.reflect {
            let dump: String = req
                .headers
                .iter()
                .map(|(n, v)| format!("{n}: {v}\n"))
                .collect();
            let text = turn.text.take().unwrap_or_default();
            turn.text = Some(format!(
                "You sent: {} {}\n{dump}{text}",
                req.method, req.target
            ));
        }
        let model = body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("scripted")
            .to_owned();
        let input_tokens = (req.body.len() / 4).max(1);
        let tool_json = turn
            .tool
            .as_ref()
            .map(|t| t.input.to_string())
            .unwrap_or_default();
        let max_tokens = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .filter_map(|f| body.get(*f).and_then(Value::as_u64))
            .max();
        let n = body.get("n").and_then(Value::as_u64);
        let natural = (turn.text.as_deref().unwrap_or_default().len() + tool_json.len()) / 4 + 1;
        let per_choice = max_tokens.map_or(natural, |cap| {
            natural.min(usize::try_from(cap).unwrap_or(usize::MAX))
        });
        let output_tokens =
            per_choice.saturating_mul(usize::try_from(n.unwrap_or(1)).unwrap_or(usize::MAX));
        let usage = Usage {
            input: input_tokens,
            output: output_tokens,
        };
        let streaming = body.get("stream").and_then(Value::as_bool) == Some(true);
        let reply = Reply {
            id: format!(
                "{}_local_{turn_index}",
                if api == Api::Anthropic {
                    "msg"
                } else {
                    "chatcmpl"
                }
            ),
            model,
            turn,
            turn_index,
            usage,
            tool_json,
        };
        let mut served = Served {
            status: 200,
            turn: Some(turn_index),
            stream: streaming,
            max_tokens,
            n,
            ..Served::default()
        };
        if !streaming {
            let json = match api {
                Api::Anthropic => reply.anthropic_json(),
                Api::OpenAi if responses => reply.responses_json(),
                Api::OpenAi => reply.openai_json(),
            }
            .to_string();
            http::respond_with(
                &mut *stream,
                200,
                "application/json",
                &echoed,
                json.as_bytes(),
            )?;
            served.response_bytes = json.len();
            return Ok(served);
        }
        let events = match api {
            Api::Anthropic => reply.anthropic_events(),
            Api::OpenAi if responses => reply.responses_events(),
            Api::OpenAi => {
                let usage = body
                    .get("stream_options")
                    .and_then(|o| o.get("include_usage"))
                    .and_then(Value::as_bool)
                    == Some(true);
                reply.openai_events(usage)
            }
        };
        let mut out = Chunked::start(&mut *stream, "text/event-stream", &echoed)?;
        for (i, event) in events.iter().enumerate() {
            if i > 0 && !self.delay.is_zero() {
                thread::sleep(self.delay);
            }
            if self.reflect {
                let mut rest = event.as_bytes();
                let mut odd = true;
                while !rest.is_empty() {
                    let (piece, tail) = rest.split_at(rest.len().min(if odd { 1 } else { 3 }));
                    out.send(piece)?;
                    rest = tail;
                    odd = !odd;
                }
            } else {
                out.send(event.as_bytes())?;
            }
            let t = now_ms();
            served.first_event_ms.get_or_insert(t);
            served.last_event_ms = Some(t);
            served.events += 1;
            served.response_bytes += event.len();
        }
        out.finish()?;
        Ok(served)
    }

    /// With `--reflect`, every request header as a response header
    /// `anthropic-echo-NAME`; else none.
    fn echo_headers(&self, req: &Request) -> Vec<(String, String)> {
        if !self.reflect {
            return Vec::new();
        }
        req.headers
            .iter()
            .map(|(n, v)| (format!("anthropic-echo-{n}"), v.clone()))
            .collect()
    }

    fn log(&self, req: &Request, api: Api, key: Option<String>, received_ms: u64, served: &Served) {
        let Some(log) = &self.log else { return };
        let headers: Vec<Value> = req.headers.iter().map(|(n, v)| json!([n, v])).collect();
        let line = json!({
            "received_ms": received_ms,
            "method": req.method,
            "target": req.target,
            "path": req.path(),
            "api": api.name(),
            "headers": headers,
            "key": key,
            "body_bytes": req.body.len(),
            "body_sha256": hex(&Sha256::digest(&req.body)),
            "status": served.status,
            "turn": served.turn,
            "stream": served.stream,
            "events": served.events,
            "first_event_ms": served.first_event_ms,
            "last_event_ms": served.last_event_ms,
            "response_bytes": served.response_bytes,
            "max_tokens": served.max_tokens,
            "n": served.n,
        });
        let mut f = log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(f, "{line}");
        let _ = f.flush();
    }
}

impl Served {
    fn status(status: u16) -> Served {
        Served {
            status,
            ..Served::default()
        }
    }

    fn with_error(self, e: &io::Error) -> Served {
        eprintln!("airlock-upstream: connection ended: {e}");
        self
    }
}

fn error_body(api: Api, status: u16, kind: &str, message: &str) -> Vec<u8> {
    let v = match api {
        Api::Anthropic => json!({ "type": "error", "error": { "type": kind, "message": message } }),
        Api::OpenAi => json!({ "error": { "message": message, "type": kind, "code": status } }),
    };
    v.to_string().into_bytes()
}

fn models(api: Api) -> Value {
    let ids = ["claude-scripted-1", "gpt-scripted-1"];
    match api {
        Api::Anthropic => json!({
            "data": ids.iter().map(|id| json!({
                "type": "model", "id": id, "display_name": id, "created_at": "2025-01-01T00:00:00Z"
            })).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": ids[0],
            "last_id": ids[1],
        }),
        Api::OpenAi => json!({
            "object": "list",
            "data": ids.iter().map(|id| json!({
                "id": id, "object": "model", "created": 1_735_689_600, "owned_by": "airlock"
            })).collect::<Vec<_>>(),
        }),
    }
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    input: usize,
    output: usize,
}

/// One scripted reply, ready to render in either API's shape.
#[derive(Debug)]
struct Reply {
    id: String,
    model: String,
    turn: Turn,
    turn_index: usize,
    usage: Usage,
    tool_json: String,
}

fn sse(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

impl Reply {
    fn tool_id(&self, prefix: &str) -> String {
        format!("{prefix}_local_{}", self.turn_index)
    }

    fn anthropic_stop_reason(&self) -> &'static str {
        if self.turn.tool.is_some() {
            "tool_use"
        } else {
            "end_turn"
        }
    }

    fn anthropic_json(&self) -> Value {
        let mut content = Vec::new();
        if let Some(text) = &self.turn.text {
            content.push(json!({ "type": "text", "text": text }));
        }
        if let Some(tool) = &self.turn.tool {
            content.push(json!({ "type": "tool_use", "id": self.tool_id("toolu"), "name": tool.name, "input": tool.input }));
        }
        json!({
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": content, "stop_reason": self.anthropic_stop_reason(), "stop_sequence": null,
            "usage": { "input_tokens": self.usage.input, "output_tokens": self.usage.output },
        })
    }

    fn anthropic_events(&self) -> Vec<String> {
        let mut out = vec![sse(
            "message_start",
            &json!({ "type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": self.usage.input, "output_tokens": 1 } } }),
        )];
        let mut index = 0;
        if let Some(text) = &self.turn.text {
            out.push(sse("content_block_start", &json!({ "type": "content_block_start", "index": index, "content_block": { "type": "text", "text": "" } })));
            out.push(sse("ping", &json!({ "type": "ping" })));
            for piece in pieces(text) {
                out.push(sse("content_block_delta", &json!({ "type": "content_block_delta", "index": index, "delta": { "type": "text_delta", "text": piece } })));
            }
            out.push(sse(
                "content_block_stop",
                &json!({ "type": "content_block_stop", "index": index }),
            ));
            index += 1;
        }
        if let Some(tool) = &self.turn.tool {
            out.push(sse("content_block_start", &json!({ "type": "content_block_start", "index": index,
                "content_block": { "type": "tool_use", "id": self.tool_id("toolu"), "name": tool.name, "input": {} } })));
            for piece in thirds(&self.tool_json) {
                out.push(sse("content_block_delta", &json!({ "type": "content_block_delta", "index": index, "delta": { "type": "input_json_delta", "partial_json": piece } })));
            }
            out.push(sse(
                "content_block_stop",
                &json!({ "type": "content_block_stop", "index": index }),
            ));
        }
        out.push(sse(
            "message_delta",
            &json!({ "type": "message_delta",
            "delta": { "stop_reason": self.anthropic_stop_reason(), "stop_sequence": null },
            "usage": { "output_tokens": self.usage.output } }),
        ));
        out.push(sse("message_stop", &json!({ "type": "message_stop" })));
        out
    }

    fn openai_finish(&self) -> &'static str {
        if self.turn.tool.is_some() {
            "tool_calls"
        } else {
            "stop"
        }
    }

    fn openai_usage(&self) -> Value {
        json!({ "prompt_tokens": self.usage.input, "completion_tokens": self.usage.output,
                "total_tokens": self.usage.input + self.usage.output })
    }

    /// An OpenAI Responses object: the text as an output message, the
    /// tool call as a function call.
    fn responses_json(&self) -> Value {
        let mut output = Vec::new();
        if let Some(text) = &self.turn.text {
            output.push(
                json!({ "type": "message", "id": "msg_local", "role": "assistant",
                "status": "completed",
                "content": [{ "type": "output_text", "text": text, "annotations": [] }] }),
            );
        }
        if let Some(tool) = &self.turn.tool {
            output.push(json!({ "type": "function_call", "id": "fc_local",
                "call_id": self.tool_id("call"), "name": tool.name,
                "arguments": self.tool_json, "status": "completed" }));
        }
        json!({
            "id": self.id.replace("chatcmpl", "resp"), "object": "response",
            "created_at": now_ms() / 1000, "status": "completed", "model": self.model,
            "output": output,
            "usage": { "input_tokens": self.usage.input, "output_tokens": self.usage.output,
                "total_tokens": self.usage.input + self.usage.output },
        })
    }

    /// Responses' server-sent events: created, the text in deltas, then
    /// completed with the whole response (and its usage).
    fn responses_events(&self) -> Vec<String> {
        let whole = self.responses_json();
        let mut created = whole.clone();
        created["status"] = json!("in_progress");
        created["output"] = json!([]);
        created["usage"] = Value::Null;
        let mut out = vec![format!(
            "event: response.created\ndata: {}\n\n",
            json!({ "type": "response.created", "response": created })
        )];
        for piece in pieces(self.turn.text.as_deref().unwrap_or_default()) {
            let v = json!({ "type": "response.output_text.delta", "output_index": 0,
                "content_index": 0, "delta": piece });
            out.push(format!("event: response.output_text.delta\ndata: {v}\n\n"));
        }
        out.push(format!(
            "event: response.completed\ndata: {}\n\n",
            json!({ "type": "response.completed", "response": whole })
        ));
        out
    }

    fn openai_json(&self) -> Value {
        let mut message = json!({ "role": "assistant", "content": self.turn.text });
        if let Some(tool) = &self.turn.tool {
            message["tool_calls"] = json!([{ "id": self.tool_id("call"), "type": "function",
                "function": { "name": tool.name, "arguments": self.tool_json } }]);
        }
        json!({
            "id": self.id, "object": "chat.completion", "created": now_ms() / 1000, "model": self.model,
            "choices": [{ "index": 0, "message": message, "finish_reason": self.openai_finish() }],
            "usage": self.openai_usage(),
        })
    }

    fn openai_events(&self, usage: bool) -> Vec<String> {
        let created = now_ms() / 1000;
        let chunk = |choices: Value| {
            let v = json!({ "id": self.id, "object": "chat.completion.chunk", "created": created,
                            "model": self.model, "choices": choices });
            format!("data: {v}\n\n")
        };
        let mut out = vec![chunk(
            json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }]),
        )];
        if let Some(text) = &self.turn.text {
            for piece in pieces(text) {
                out.push(chunk(
                    json!([{ "index": 0, "delta": { "content": piece }, "finish_reason": null }]),
                ));
            }
        }
        if let Some(tool) = &self.turn.tool {
            out.push(chunk(json!([{ "index": 0, "delta": { "tool_calls": [{ "index": 0, "id": self.tool_id("call"),
                "type": "function", "function": { "name": tool.name, "arguments": "" } }] }, "finish_reason": null }])));
            for piece in thirds(&self.tool_json) {
                out.push(chunk(
                    json!([{ "index": 0, "delta": { "tool_calls": [{ "index": 0,
                    "function": { "arguments": piece } }] }, "finish_reason": null }]),
                ));
            }
        }
        out.push(chunk(
            json!([{ "index": 0, "delta": {}, "finish_reason": self.openai_finish() }]),
        ));
        if usage {
            let v = json!({ "id": self.id, "object": "chat.completion.chunk", "created": created,
                            "model": self.model, "choices": [], "usage": self.openai_usage() });
            out.push(format!("data: {v}\n\n"));
        }
        out.push("data: [DONE]\n\n".to_owned());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::script::ToolCall;

    fn reply(text: Option<&str>, tool: bool) -> Reply {
        let tool = tool.then(|| ToolCall {
            name: "bash".into(),
            input: json!({ "command": "ls -la /workspace" }),
        });
        let tool_json = tool
            .as_ref()
            .map(|t| t.input.to_string())
            .unwrap_or_default();
        Reply {
            id: "msg_1".into(),
            model: "m".into(),
            turn: Turn {
                text: text.map(str::to_owned),
                tool,
            },
            turn_index: 0,
            usage: Usage {
                input: 10,
                output: 7,
            },
            tool_json,
        }
    }

    /// The JSON of each `data:` line of SSE events.
    fn data(events: &[String]) -> Vec<Value> {
        events
            .iter()
            .flat_map(|e| e.lines())
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).expect("json"))
            .collect()
    }

    #[test]
    fn anthropic_stream_rebuilds_the_tool_call() {
        let r = reply(Some("Looking at the workspace now."), true);
        let events = data(&r.anthropic_events());
        let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(types.first(), Some(&"message_start"));
        assert_eq!(types.last(), Some(&"message_stop"));
        let text: String = events
            .iter()
            .filter(|e| e["delta"]["type"] == "text_delta")
            .filter_map(|e| e["delta"]["text"].as_str())
            .collect();
        assert_eq!(text, "Looking at the workspace now.");
        let json: String = events
            .iter()
            .filter(|e| e["delta"]["type"] == "input_json_delta")
            .filter_map(|e| e["delta"]["partial_json"].as_str())
            .collect();
        let input: Value = serde_json::from_str(&json).expect("input json");
        assert_eq!(input["command"], "ls -la /workspace");
        let delta = events
            .iter()
            .find(|e| e["type"] == "message_delta")
            .expect("delta");
        assert_eq!(delta["usage"]["output_tokens"], 7);
        assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    }

    #[test]
    fn openai_stream_ends_with_usage_and_done() {
        let r = reply(None, true);
        let raw = r.openai_events(true);
        assert_eq!(raw.last().map(String::as_str), Some("data: [DONE]\n\n"));
        let events = data(&raw);
        assert_eq!(
            events.last().expect("usage")["usage"]["completion_tokens"],
            7
        );
        let args: String = events
            .iter()
            .filter_map(|e| {
                e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&args).expect("args")["command"],
            "ls -la /workspace"
        );
        assert!(data(&r.openai_events(false))
            .iter()
            .all(|e| e.get("usage").is_none()));
    }

    /// With --tls-cert/--tls-key the same API is served over HTTPS, a
    /// stream included, and the request is logged with its key.
    #[test]
    fn serves_https() {
        let dir = std::env::temp_dir().join(format!("airlock-upstream-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, made.cert.pem()).expect("write");
        std::fs::write(&key, made.signing_key.serialize_pem()).expect("write");
        let log = dir.join("log.jsonl");
        let server = Arc::new(Server {
            script: Script::parse(r#"{"turns":[{"text":"over TLS"}]}"#).expect("script"),
            log: Some(Mutex::new(File::create(&log).expect("log"))),
            delay: Duration::ZERO,
            key: None,
            tls: Some(tls::server_config(&cert, &key).expect("tls config")),
            reflect: false,
            busy: AtomicUsize::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let s = Arc::clone(&server);
        let t = thread::spawn(move || {
            let (sock, _) = listener.accept().expect("accept");
            s.serve(sock);
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(made.cert.der().clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr).expect("connect"));
        let body = r#"{"model":"m","stream":true,"messages":[]}"#;
        write!(
            tls,
            "POST /v1/messages HTTP/1.1\r\nhost: localhost\r\nx-api-key: sk-tls\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut tls, &mut answer).expect("a clean TLS close");
        t.join().expect("server");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.contains("over TLS") && answer.contains("message_stop"),
            "{answer}"
        );
        assert!(answer.ends_with("0\r\n\r\n"), "{answer}");
        let line: Value =
            serde_json::from_str(&std::fs::read_to_string(&log).expect("log")).expect("json");
        assert_eq!(
            (line["key"].as_str(), line["status"].as_u64()),
            (Some("sk-tls"), Some(200))
        );
        assert_eq!(line["stream"], true);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With --reflect the request's headers come back in the response
    /// headers and the text, streamed in 1- and 3-byte chunks; the usage
    /// honours the output cap, which the log records.
    #[test]
    fn reflects_the_request_and_honours_the_cap() {
        let dir =
            std::env::temp_dir().join(format!("airlock-upstream-reflect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let log = dir.join("log.jsonl");
        let server = Arc::new(Server {
            script: Script::parse(
                r#"{"turns":[{"text":"a reply long enough to be more than two tokens"}]}"#,
            )
            .expect("script"),
            log: Some(Mutex::new(File::create(&log).expect("log"))),
            delay: Duration::ZERO,
            key: None,
            tls: None,
            reflect: true,
            busy: AtomicUsize::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let s = Arc::clone(&server);
        let t = thread::spawn(move || {
            let (sock, _) = listener.accept().expect("accept");
            s.serve(sock);
        });
        let mut sock = TcpStream::connect(addr).expect("connect");
        let body = r#"{"model":"m","stream":true,"max_tokens":2,"messages":[]}"#;
        write!(
            sock,
            "POST /v1/messages HTTP/1.1\r\nhost: localhost\r\nx-api-key: sk-reflected\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut sock, &mut answer).expect("read");
        t.join().expect("server");
        let (head, chunks) = answer.split_once("\r\n\r\n").expect("head");
        assert!(
            head.contains("\r\nanthropic-echo-x-api-key: sk-reflected\r\n"),
            "{head}"
        );
        // De-chunk: every chunk is at most 3 bytes.
        let mut rest = chunks;
        let mut text = String::new();
        let mut count = 0;
        loop {
            let (size, tail) = rest.split_once("\r\n").expect("size line");
            let n = usize::from_str_radix(size, 16).expect("hex");
            if n == 0 {
                break;
            }
            assert!(n <= 3, "a chunk of {n}");
            count += 1;
            text.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        assert!(count * 2 >= text.len(), "{count} chunks for {}", text.len());
        assert!(text.contains("You sent: POST /v1/messages"), "{text}");
        assert!(text.contains("x-api-key: "), "{text}");
        assert!(text.contains("sk-reflected"), "{text}");
        let usage = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|e| e["type"] == "message_delta")
            .expect("message_delta");
        assert_eq!(usage["usage"]["output_tokens"], 2);
        let line: Value =
            serde_json::from_str(&std::fs::read_to_string(&log).expect("log")).expect("json");
        assert_eq!(
            (line["max_tokens"].as_u64(), line["key"].as_str()),
            (Some(2), Some("sk-reflected"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn whole_replies() {
        let r = reply(Some("done"), false);
        let a = r.anthropic_json();
        assert_eq!(a["content"][0]["text"], "done");
        assert_eq!(a["stop_reason"], "end_turn");
        let o = reply(None, true).openai_json();
        assert_eq!(o["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(o["usage"]["prompt_tokens"], 10);
    }

    /// Serves one request on a fresh server; the raw answer.
    fn one(request: &str) -> String {
        let server = Arc::new(Server {
            script: Script::parse(r#"{"turns":[{"text":"a scripted reply"}]}"#).expect("script"),
            log: None,
            delay: Duration::ZERO,
            key: None,
            tls: None,
            reflect: false,
            busy: AtomicUsize::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let t = thread::spawn(move || {
            let (sock, _) = listener.accept().expect("accept");
            server.serve(sock);
        });
        let mut sock = TcpStream::connect(addr).expect("connect");
        sock.write_all(request.as_bytes()).expect("send");
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut sock, &mut answer).expect("read");
        t.join().expect("server");
        answer
    }

    fn post(target: &str, headers: &str, body: &str) -> String {
        one(&format!(
            "POST {target} HTTP/1.1\r\nhost: localhost\r\n{headers}content-length: {}\r\n\r\n{body}",
            body.len()
        ))
    }

    /// The routes the SDKs and Claude Code use beyond messages and chat.
    #[test]
    fn serves_count_tokens_models_responses_and_embeddings() {
        let a = post(
            "/v1/messages/count_tokens?beta=true",
            "anthropic-version: 2023-06-01\r\n",
            r#"{"model":"claude-scripted-1","messages":[]}"#,
        );
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
        assert!(a.contains(r#"{"input_tokens":10}"#), "{a}");
        let a = one(
            "GET /v1/models/claude-scripted-1?beta=true HTTP/1.1\r\nanthropic-version: 1\r\n\r\n",
        );
        assert!(
            a.starts_with("HTTP/1.1 200") && a.contains(r#""type":"model""#),
            "{a}"
        );
        let a = one("GET /v1/models/gpt-scripted-1 HTTP/1.1\r\n\r\n");
        assert!(
            a.starts_with("HTTP/1.1 200") && a.contains(r#""object":"model""#),
            "{a}"
        );
        let a = one("GET /v1/models/nope HTTP/1.1\r\n\r\n");
        assert!(a.starts_with("HTTP/1.1 404"), "{a}");
        let a = post("/v1/embeddings", "", r#"{"model":"e","input":"hi"}"#);
        assert!(
            a.contains(r#""embedding":"#) && a.contains("prompt_tokens"),
            "{a}"
        );
        let a = post(
            "/v1/responses",
            "",
            r#"{"model":"gpt-scripted-1","input":"hi","max_output_tokens":2}"#,
        );
        let body = a.split_once("\r\n\r\n").expect("head").1;
        let v: Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["object"], "response");
        assert_eq!(v["output"][0]["content"][0]["text"], "a scripted reply");
        assert_eq!(v["usage"]["output_tokens"], 2, "the cap is honoured");
        let a = post(
            "/v1/responses",
            "",
            r#"{"model":"gpt-scripted-1","input":"hi","stream":true}"#,
        );
        assert!(a.contains("event: response.created"), "{a}");
        assert!(a.contains("response.output_text.delta"), "{a}");
        assert!(a.contains("event: response.completed"), "{a}");
    }
}
