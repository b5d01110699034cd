//! A secret's value, fetched on the host from its source and cached:
//! `env:` and `file:` once (when the sandbox starts), `cmd:` again when
//! what the program said expired (`expires_in`), else every
//! [`CMD_DEFAULT_TTL`].

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::config::Source;

/// Longest value (and a `cmd:` program's output).
pub const MAX_VALUE: usize = 16 * 1024;
/// How long a `cmd:` program may run.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `cmd:` value without `expires_in` is kept.
pub const CMD_DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Most past values of one secret kept to mask in answers.
const MAX_SEEN: usize = 64;
/// A `cmd:` value is kept at least this long, whatever `expires_in` says.
pub const CMD_MIN_TTL: Duration = Duration::from_secs(1);
/// After a failed fetch, the next waits this long (requests meanwhile are
/// refused at once).
pub const RETRY_AFTER: Duration = Duration::from_secs(5);
/// A value is fetched again this long before it expires.
const EARLY: Duration = Duration::from_millis(200);

/// A fetched value; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Value(String);

impl Value {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Value({} bytes)", self.0.len())
    }
}

/// A value must be one line of visible ASCII or UTF-8 without controls:
/// it goes into HTTP headers.
fn check(value: &str, what: &str) -> Result<Value, String> {
    let value = value.strip_suffix('\n').unwrap_or(value);
    let value = value.strip_suffix('\r').unwrap_or(value);
    if value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if value.len() > MAX_VALUE {
        return Err(format!("{what} is longer than {MAX_VALUE} bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "{what} holds a control character (a line break?): it must fit in an HTTP header"
        ));
    }
    if value.starts_with(super::PLACEHOLDER_PREFIX) {
        return Err(format!("{what} is an airlock placeholder, not a secret"));
    }
    Ok(Value(value.to_owned()))
}

/// Reads a source once: the value, and until when it holds.
pub fn fetch(
    source: &Source,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Value, Option<Instant>), String> {
    match source {
        Source::Env(var) => {
            let v =
                env(var).ok_or_else(|| format!("env:{var}: airlock's environment has no {var}"))?;
            Ok((check(&v, &format!("env:{var}"))?, None))
        }
        Source::File(path) => {
            let mut text = String::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_VALUE as u64 + 2).read_to_string(&mut text))
                .map_err(|e| format!("file:{}: {e}", path.display()))?;
            Ok((check(&text, &format!("file:{}", path.display()))?, None))
        }
        Source::Cmd(cmd) => run_cmd(cmd),
    }
}

/// When a value fetched now and good for `ttl` is fetched again: at
/// least [`CMD_MIN_TTL`] from now (a program cannot make every request
/// run it), at most a year.
fn until(ttl: Duration) -> Instant {
    let ttl = ttl.clamp(CMD_MIN_TTL, Duration::from_secs(365 * 86_400));
    let now = Instant::now();
    now.checked_add(ttl).unwrap_or(now)
}

/// Runs a `cmd:` source: `sh -c COMMAND`, stdin empty, stderr to ours,
/// at most [`CMD_TIMEOUT`] and [`MAX_VALUE`] bytes of output; exit 0.
fn run_cmd(cmd: &str) -> Result<(Value, Option<Instant>), String> {
    let what = format!("cmd:{cmd}");
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let mut out = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.take(MAX_VALUE as u64 + 4096).read_to_end(&mut buf);
        }
        buf
    });
    let deadline = Instant::now() + CMD_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what}: still running after {} s: stopped",
                    CMD_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    };
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(format!("{what}: exited with {status}"));
    }
    let text = String::from_utf8(out).map_err(|_| format!("{what}: its output is not UTF-8"))?;
    let trimmed = text.trim();
    if trimmed.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(trimmed)
            .map_err(|e| format!("{what}: its JSON output is malformed: {e}"))?;
        let value = v["value"]
            .as_str()
            .ok_or_else(|| format!("{what}: its JSON output has no string \"value\""))?;
        let ttl = match &v["expires_in"] {
            serde_json::Value::Null => CMD_DEFAULT_TTL,
            n => Duration::from_secs(n.as_u64().ok_or_else(|| {
                format!("{what}: \"expires_in\" must be a whole number of seconds")
            })?),
        };
        return Ok((check(value, &what)?, Some(until(ttl))));
    }
    Ok((check(trimmed, &what)?, Some(until(CMD_DEFAULT_TTL))))
}

/// A secret's value as the door uses it: fetched again when expired.
#[derive(Debug)]
pub struct Cached {
    source: Source,
    state: Mutex<(Value, Option<Instant>)>,
    /// The last failure and when it happened (retried after [`RETRY_AFTER`]).
    failed: Mutex<Option<(String, Instant)>>,
    /// Every value held so far, to mask in what bound hosts answer.
    seen: Mutex<Vec<Value>>,
}

impl Cached {
    /// Fetches the first value (an error stops the sandbox before it boots).
    pub fn new(source: Source, env: &dyn Fn(&str) -> Option<String>) -> Result<Cached, String> {
        let first = fetch(&source, env)?;
        Ok(Cached {
            source,
            seen: Mutex::new(vec![first.0.clone()]),
            state: Mutex::new(first),
            failed: Mutex::new(None),
        })
    }

    /// The current value, and whether it was fetched anew now.
    pub fn get(&self) -> Result<(Value, bool), String> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let expired = state.1.is_some_and(|until| Instant::now() + EARLY >= until);
        if !expired {
            return Ok((state.0.clone(), false));
        }
        let mut failed = self
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((why, at)) = failed.as_ref() {
            if at.elapsed() < RETRY_AFTER {
                return Err(why.clone());
            }
        }
        let fresh = match fetch(&self.source, &|n| std::env::var(n).ok()) {
            Ok(f) => f,
            Err(why) => {
                *failed = Some((why.clone(), Instant::now()));
                return Err(why);
            }
        };
        *failed = None;
        *state = fresh;
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !seen.contains(&state.0) {
            // The latest values are masked; the oldest give way.
            if seen.len() == MAX_SEEN {
                seen.remove(0);
            }
            seen.push(state.0.clone());
        }
        Ok((state.0.clone(), true))
    }

    /// Every value held so far.
    pub fn seen(&self) -> Vec<Value> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}
