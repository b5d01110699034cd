//! Token usage read off a response as it is relayed: from server-sent
//! events line by line (Anthropic's `message_start` and `message_delta`,
//! OpenAI's final chunk with `usage`), or from a whole JSON body. Bounded:
//! an SSE line longer than [`MAX_LINE`] and a JSON body longer than
//! [`MAX_JSON`] are not parsed (the call is recorded without usage).

use serde_json::Value;

/// Longest SSE line looked at.
pub const MAX_LINE: usize = 1 << 20;
/// Largest whole JSON body looked at.
pub const MAX_JSON: usize = 8 << 20;

/// Tokens a call used, as far as the response said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: Option<u64>,
    pub output: Option<u64>,
}

impl Usage {
    /// Takes the counts an object `usage` holds, in either API's names
    /// (Anthropic: `input_tokens` + cache tokens, `output_tokens`; OpenAI:
    /// `prompt_tokens`, `completion_tokens`). A later count replaces an
    /// earlier one: the APIs report running totals.
    fn take(&mut self, usage: &Value) {
        let n = |k: &str| usage.get(k).and_then(Value::as_u64);
        let anthropic_in = n("input_tokens").map(|i| {
            i.saturating_add(n("cache_creation_input_tokens").unwrap_or(0))
                .saturating_add(n("cache_read_input_tokens").unwrap_or(0))
        });
        if let Some(i) = anthropic_in.or_else(|| n("prompt_tokens")) {
            self.input = Some(i);
        }
        if let Some(o) = n("output_tokens").or_else(|| n("completion_tokens")) {
            self.output = Some(o);
        }
    }

    /// Usage from one parsed JSON value: a whole response, an Anthropic
    /// event, an OpenAI chunk, or an OpenAI Responses event.
    fn take_json(&mut self, v: &Value) {
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.take(u);
        }
        // Anthropic's message_start nests it in the message, OpenAI
        // Responses' response.completed in the response.
        for outer in ["message", "response"] {
            if let Some(u) = v
                .get(outer)
                .and_then(|m| m.get("usage"))
                .filter(|u| u.is_object())
            {
                self.take(u);
            }
        }
    }
}

/// How the response body is scanned.
#[derive(Debug)]
enum Mode {
    /// `text/event-stream`: `data:` lines.
    Sse { line: Vec<u8>, skipping: bool },
    /// Anything else: one JSON body, kept up to [`MAX_JSON`].
    Json { body: Vec<u8>, over: bool },
}

/// Scans a response body chunk by chunk.
#[derive(Debug)]
pub struct Scanner {
    mode: Mode,
    usage: Usage,
}

impl Scanner {
    /// A scanner for a body of this `content-type`.
    pub fn new(content_type: Option<&str>) -> Scanner {
        let sse = content_type.is_some_and(|t| {
            t.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        });
        Scanner {
            mode: if sse {
                Mode::Sse {
                    line: Vec::new(),
                    skipping: false,
                }
            } else {
                Mode::Json {
                    body: Vec::new(),
                    over: false,
                }
            },
            usage: Usage::default(),
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        match &mut self.mode {
            Mode::Sse { line, skipping } => {
                for &b in data {
                    if b == b'\n' {
                        if !*skipping {
                            sse_line(line, &mut self.usage);
                        }
                        line.clear();
                        *skipping = false;
                    } else if !*skipping {
                        if line.len() >= MAX_LINE {
                            line.clear();
                            *skipping = true;
                        } else {
                            line.push(b);
                        }
                    }
                }
            }
            Mode::Json { body, over } => {
                if !*over {
                    if body.len() + data.len() > MAX_JSON {
                        *over = true;
                        body.clear();
                    } else {
                        body.extend_from_slice(data);
                    }
                }
            }
        }
    }

    /// The usage the whole body reported.
    pub fn finish(mut self) -> Usage {
        match &mut self.mode {
            Mode::Sse { line, skipping } => {
                if !*skipping {
                    sse_line(line, &mut self.usage);
                }
            }
            Mode::Json { body, over: false } => {
                if let Ok(v) = serde_json::from_slice::<Value>(body) {
                    self.usage.take_json(&v);
                }
            }
            Mode::Json { over: true, .. } => {}
        }
        self.usage
    }
}

fn sse_line(line: &[u8], usage: &mut Usage) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(data) = line.strip_prefix(b"data:") else {
        return;
    };
    // Cheap filter: only events that mention usage are parsed.
    if !data.windows(5).any(|w| w == b"usage") {
        return;
    }
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        usage.take_json(&v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(content_type: &str, body: &str, chunk: usize) -> Usage {
        let mut s = Scanner::new(Some(content_type));
        for part in body.as_bytes().chunks(chunk) {
            s.feed(part);
        }
        s.finish()
    }

    const ANTHROPIC_SSE: &str = "event: message_start\r\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"the usage is\"}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    const OPENAI_SSE: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"total_tokens\":15}}\n\n\
data: [DONE]\n\n";

    #[test]
    fn streaming_usage_whatever_the_chunking() {
        for chunk in [1, 7, 64, 100_000] {
            assert_eq!(
                scan("text/event-stream; charset=utf-8", ANTHROPIC_SSE, chunk),
                Usage {
                    input: Some(30),
                    output: Some(15)
                },
                "chunk {chunk}"
            );
            assert_eq!(
                scan("text/event-stream", OPENAI_SSE, chunk),
                Usage {
                    input: Some(12),
                    output: Some(3)
                }
            );
        }
    }

    #[test]
    fn openai_responses_stream_usage() {
        let sse = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n\
event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n\
event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":4,\"total_tokens\":13}}}\n\n";
        for chunk in [1, 9, 4096] {
            assert_eq!(
                scan("text/event-stream", sse, chunk),
                Usage {
                    input: Some(9),
                    output: Some(4)
                }
            );
        }
    }

    #[test]
    fn whole_bodies() {
        let anthropic = r#"{"id":"m","content":[],"usage":{"input_tokens":7,"output_tokens":9}}"#;
        assert_eq!(
            scan("application/json", anthropic, 3),
            Usage {
                input: Some(7),
                output: Some(9)
            }
        );
        let openai = r#"{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#;
        assert_eq!(
            scan("application/json", openai, 5),
            Usage {
                input: Some(4),
                output: Some(2)
            }
        );
        assert_eq!(scan("application/json", "{not json", 5), Usage::default());
    }

    #[test]
    fn bounded() {
        // A stream without usage, an endless line, a huge body: no usage, no growth.
        assert_eq!(
            scan("text/event-stream", "data: {\"x\":1}\n\n", 2),
            Usage::default()
        );
        let mut s = Scanner::new(Some("text/event-stream"));
        let junk = vec![b'a'; 64 * 1024];
        for _ in 0..40 {
            s.feed(&junk);
        }
        s.feed(b"\ndata: {\"usage\":{\"output_tokens\":2}}\n");
        assert_eq!(s.finish().output, Some(2));
        let mut s = Scanner::new(None);
        for _ in 0..200 {
            s.feed(&junk);
        }
        assert_eq!(s.finish(), Usage::default());
    }
}
