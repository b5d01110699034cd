//! The scripted conversation: a JSON file of turns. The reply to a request
//! is the turn whose index is the number of assistant messages already in
//! the request, so the server keeps no state between requests.
//!
//! ```json
//! { "turns": [
//!     { "tool": { "name": "bash", "input": { "command": "ls -la /workspace" } } },
//!     { "text": "Let me write it.", "tool": { "name": "write_file", "input": { "path": "out/a.txt", "content": "hi" } } },
//!     { "text": "Done.", "filler": 0 }
//! ] }
//! ```
//!
//! A turn has `text`, `tool` or both (text first); `filler` appends that
//! many bytes of filler words to the text (for throughput benchmarks).

use serde_json::Value;

/// Largest `filler` a turn may ask for.
const MAX_FILLER: u64 = 256 << 20;

/// A tool call the model makes.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// A JSON object.
    pub input: Value,
}

/// One scripted reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub text: Option<String>,
    pub tool: Option<ToolCall>,
}

impl Turn {
    /// The reply for a request past the end of the script.
    pub fn past_the_end(index: usize) -> Turn {
        Turn {
            text: Some(format!(
                "(the scripted conversation has no turn {index}: it is over)"
            )),
            tool: None,
        }
    }
}

/// A parsed script.
#[derive(Debug, Clone, PartialEq)]
pub struct Script {
    pub turns: Vec<Turn>,
}

fn filler(bytes: u64) -> String {
    const WORDS: &str =
        "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor ";
    let n = usize::try_from(bytes).unwrap_or(usize::MAX);
    WORDS.chars().cycle().take(n).collect()
}

impl Script {
    /// Parses a script, saying what is wrong with it.
    pub fn parse(text: &str) -> Result<Script, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let turns = v
            .get("turns")
            .and_then(Value::as_array)
            .ok_or("no \"turns\" array")?;
        let mut out = Vec::with_capacity(turns.len());
        for (i, t) in turns.iter().enumerate() {
            let obj = t
                .as_object()
                .ok_or_else(|| format!("turn {i} is not an object"))?;
            if let Some(k) = obj
                .keys()
                .find(|k| !matches!(k.as_str(), "text" | "tool" | "filler"))
            {
                return Err(format!("turn {i}: unknown field {k:?}"));
            }
            let mut text = match obj.get("text") {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(format!("turn {i}: text is not a string")),
            };
            if let Some(f) = obj.get("filler") {
                let n = f.as_u64().filter(|n| *n <= MAX_FILLER).ok_or_else(|| {
                    format!("turn {i}: filler is not a byte count ≤ {MAX_FILLER}")
                })?;
                if n > 0 {
                    text.get_or_insert_with(String::new).push_str(&filler(n));
                }
            }
            let tool = match obj.get("tool") {
                None => None,
                Some(tool) => {
                    let name = tool
                        .get("name")
                        .and_then(Value::as_str)
                        .filter(|n| !n.is_empty())
                        .ok_or_else(|| format!("turn {i}: tool has no name"))?;
                    let input = tool
                        .get("input")
                        .filter(|v| v.is_object())
                        .ok_or_else(|| format!("turn {i}: tool input is not an object"))?;
                    Some(ToolCall {
                        name: name.to_owned(),
                        input: input.clone(),
                    })
                }
            };
            if text.is_none() && tool.is_none() {
                return Err(format!("turn {i}: neither text nor tool"));
            }
            out.push(Turn { text, tool });
        }
        Ok(Script { turns: out })
    }

    /// The reply to a request holding `assistant_messages` earlier replies.
    pub fn turn(&self, assistant_messages: usize) -> Turn {
        self.turns
            .get(assistant_messages)
            .cloned()
            .unwrap_or_else(|| Turn::past_the_end(assistant_messages))
    }
}

/// Splits `text` into streaming pieces: about eight per text, whole words,
/// between 16 and 1024 bytes each (the last may be shorter).
pub fn pieces(text: &str) -> Vec<String> {
    let target = (text.len() / 8).clamp(16, 1024);
    let mut out = Vec::new();
    let mut cur = String::new();
    for word in text.split_inclusive(' ') {
        if !cur.is_empty() && cur.len() + word.len() > target.max(cur.len()) && cur.len() >= 16 {
            out.push(std::mem::take(&mut cur));
        }
        if word.len() > 1024 {
            // One very long word: cut on character boundaries.
            let mut rest = word;
            while !rest.is_empty() {
                let mut cut = rest.len().min(1024);
                while !rest.is_char_boundary(cut) {
                    cut -= 1;
                }
                out.push(rest[..cut].to_owned());
                rest = &rest[cut..];
            }
            continue;
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Splits a JSON string into three pieces on character boundaries, as
/// `input_json_delta`s and OpenAI argument deltas arrive.
pub fn thirds(json: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = json;
    for parts_left in (1..=3usize).rev() {
        let mut cut = rest.len().div_ceil(parts_left);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        if cut > 0 {
            out.push(rest[..cut].to_owned());
        }
        rest = &rest[cut..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_turns() {
        let s = Script::parse(
            r#"{"turns":[{"tool":{"name":"bash","input":{"command":"ls"}}},{"text":"a","filler":5}]}"#,
        )
        .expect("parses");
        assert_eq!(s.turns.len(), 2);
        assert_eq!(
            s.turns[0].tool.as_ref().map(|t| t.name.as_str()),
            Some("bash")
        );
        assert_eq!(s.turns[1].text.as_deref(), Some("alorem"));
        assert_eq!(s.turn(5).tool, None);
        assert!(s.turn(5).text.unwrap_or_default().contains("no turn 5"));
    }

    #[test]
    fn refuses_bad_scripts() {
        for bad in [
            "[]",
            r#"{"turns":[{}]}"#,
            r#"{"turns":[{"text":1}]}"#,
            r#"{"turns":[{"tool":{"name":"x","input":[]}}]}"#,
            r#"{"turns":[{"text":"a","bogus":1}]}"#,
        ] {
            assert!(Script::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pieces_cover_the_text() {
        for text in [
            "",
            "one",
            "Hello there, this is a reply of several words.",
            &filler(100_000),
        ] {
            let p = pieces(text);
            assert_eq!(p.concat(), text);
            assert!(p.iter().all(|s| s.len() <= 1024));
        }
        assert!(pieces("Hello there, this is a reply of several words in it.").len() >= 2);
        let j = r#"{"command": "ls -la /workspace"}"#;
        assert_eq!(thirds(j).concat(), j);
        assert_eq!(thirds(j).len(), 3);
    }
}
