//! The run's model policy: which models, how many requests, how many
//! tokens, how large a request body. From `--model-policy FILE` (JSON) and
//! the flags, which override the file. [`Budget`] keeps the counts of one
//! run across the connections' threads.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::{json, Value};

/// Default `max_requests`: more than a long coding session makes (Claude
/// Code makes one per turn and tool result; a few hundred in an hour).
pub const DEFAULT_MAX_REQUESTS: u64 = 2000;
/// Default `max_request_bytes`: 32 MiB, the Messages API's own limit
/// (a long conversation with images and documents grows that large).
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = MAX_REQUEST_BYTES_LIMIT;
/// The largest `max_request_bytes` allowed: 32 MiB, the in-guest
/// endpoint's hard limit too ([`airlock_protocol::limits::MAX_MODEL_BODY`]):
/// the body is held in memory before it is forwarded.
pub const MAX_REQUEST_BYTES_LIMIT: u64 = airlock_protocol::limits::MAX_MODEL_BODY;
/// Largest policy file read.
const MAX_POLICY_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the model policy {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("the model policy {} is not valid: {why}", .0.display(), why = .1)]
    Invalid(PathBuf, String),
    #[error("{0}")]
    Value(String),
}

/// What the policy file may hold; every field optional, no other field.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    allowed_models: Option<Vec<String>>,
    max_requests: Option<u64>,
    max_tokens_per_run: Option<u64>,
    max_request_bytes: Option<u64>,
}

/// The policy in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `None`: any model.
    pub allowed_models: Option<Vec<String>>,
    pub max_requests: u64,
    /// `None`: no token budget.
    pub max_tokens_per_run: Option<u64>,
    pub max_request_bytes: u64,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            allowed_models: None,
            max_requests: DEFAULT_MAX_REQUESTS,
            max_tokens_per_run: None,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

/// The flags that override the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub allowed_models: Vec<String>,
    pub max_requests: Option<u64>,
    pub max_tokens_per_run: Option<u64>,
    pub max_request_bytes: Option<u64>,
}

impl Policy {
    /// The policy from the file (if any) and the flags.
    pub fn load(file: Option<&Path>, flags: &Overrides) -> Result<Policy, Error> {
        let from_file = match file {
            Some(path) => {
                use std::io::Read;
                let mut text = String::new();
                std::fs::File::open(path)
                    .and_then(|f| f.take(MAX_POLICY_FILE).read_to_string(&mut text))
                    .map_err(|e| Error::Read(path.to_path_buf(), e))?;
                let parsed: File = serde_json::from_str(&text)
                    .map_err(|e| Error::Invalid(path.to_path_buf(), e.to_string()))?;
                check(&parsed).map_err(|why| Error::Invalid(path.to_path_buf(), why))?;
                parsed
            }
            None => File::default(),
        };
        let flags_file = File {
            allowed_models: (!flags.allowed_models.is_empty())
                .then(|| flags.allowed_models.clone()),
            max_requests: flags.max_requests,
            max_tokens_per_run: flags.max_tokens_per_run,
            max_request_bytes: flags.max_request_bytes,
        };
        check(&flags_file).map_err(Error::Value)?;
        let d = Policy::default();
        Ok(Policy {
            allowed_models: flags_file.allowed_models.or(from_file.allowed_models),
            max_requests: flags_file
                .max_requests
                .or(from_file.max_requests)
                .unwrap_or(d.max_requests),
            max_tokens_per_run: flags_file
                .max_tokens_per_run
                .or(from_file.max_tokens_per_run),
            max_request_bytes: flags_file
                .max_request_bytes
                .or(from_file.max_request_bytes)
                .unwrap_or(d.max_request_bytes),
        })
    }

    /// The policy as `run.start` records it.
    pub fn fields(&self) -> Value {
        json!({
            "allowed_models": self.allowed_models,
            "max_requests": self.max_requests,
            "max_tokens_per_run": self.max_tokens_per_run,
            "max_request_bytes": self.max_request_bytes,
        })
    }

    /// Whether `model` may be asked for.
    pub fn allows_model(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|list| list.iter().any(|m| m == model))
    }
}

fn check(f: &File) -> Result<(), String> {
    if let Some(models) = &f.allowed_models {
        if models.is_empty() {
            return Err("allowed_models is empty (leave it out to allow any model)".into());
        }
        if models.iter().any(|m| m.is_empty() || m.len() > 256) {
            return Err("allowed_models holds an empty or over-long name".into());
        }
    }
    if f.max_request_bytes == Some(0) || f.max_request_bytes > Some(MAX_REQUEST_BYTES_LIMIT) {
        return Err(format!(
            "max_request_bytes must be 1 to {MAX_REQUEST_BYTES_LIMIT}"
        ));
    }
    Ok(())
}

/// Why [`Budget::admit`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    Requests(u64),
    /// Nothing left: `used` by calls that ended, `reserved` by calls in
    /// flight.
    Tokens {
        used: u64,
        reserved: u64,
        max: u64,
    },
    /// What is left cannot give each of the `n` choices asked for one
    /// output token.
    Choices {
        n: u64,
        left: u64,
    },
}

/// What a completion call may spend, read from its body before it is
/// admitted (see [`Budget::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// The output cap per choice the agent asked for (`None`: none, or
    /// not a number).
    pub output: Option<u64>,
    /// Choices asked for (OpenAI's `n`; 1 when absent).
    pub n: u64,
    /// A rough estimate of the input tokens (see [`input_estimate`]).
    pub input_estimate: u64,
}

/// A rough estimate of the input tokens of a request body of `bytes`
/// bytes: a quarter of them (about what the tokenizers give for English
/// text and JSON). Not a bound: the upstream's count replaces it when the
/// call ends.
pub fn input_estimate(bytes: u64) -> u64 {
    bytes.div_ceil(4)
}

/// A call [`Budget::admit`] let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Its number in the run, from 1.
    pub number: u64,
    /// Tokens left of the run's budget when it started, after what ended
    /// calls used and calls in flight reserved (`None`: no token budget).
    pub tokens_left: Option<u64>,
    /// Under a token budget, for a completion: the most output each choice
    /// may ask for (`tokens_left / n`), to which the proxy lowers the
    /// request's cap.
    pub output_limit: Option<u64>,
    /// What the call holds against the budget while it is in flight:
    /// `n ×` its output cap (after lowering) plus the input estimate.
    pub reserved: Option<Reserved>,
}

/// Tokens a call in flight holds against the run's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    /// `n ×` the output cap sent.
    pub output: u64,
    pub input_estimate: u64,
    pub n: u64,
}

impl Reserved {
    pub fn total(&self) -> u64 {
        self.output.saturating_add(self.input_estimate)
    }
}

/// The run's counts, shared by the connections.
#[derive(Debug, Default)]
pub struct Budget {
    inner: Mutex<Counts>,
}

/// Counts so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Calls admitted (forwarded or attempted).
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Held by the calls in flight (see [`Reserved`]).
    pub reserved: u64,
}

impl Budget {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits one more call if both budgets allow it, counting it.
    ///
    /// Under a token budget the tokens left are those neither used by the
    /// calls that ended nor reserved by the calls in flight. A completion
    /// (`ask`) gets an output limit per choice of `left / n` (refused when
    /// that is 0) and reserves `n ×` its cap (what it asked for, or the
    /// limit if that is lower) plus its input estimate, in the same step:
    /// concurrent calls cannot together be sent more output than the
    /// budget. Only input, unknown until the upstream counts it, may take
    /// the run past the budget. The reservation is held until
    /// [`Budget::settle`].
    ///
    /// A call that spends no tokens (`tokens` false: `count_tokens`, the
    /// model list) counts against the request budget only: a spent token
    /// budget does not refuse it.
    pub fn admit(
        &self,
        policy: &Policy,
        ask: Option<&Ask>,
        tokens: bool,
    ) -> Result<Admitted, Exhausted> {
        let mut c = self.lock();
        if c.requests >= policy.max_requests {
            return Err(Exhausted::Requests(policy.max_requests));
        }
        let mut admitted = Admitted {
            number: 0,
            tokens_left: None,
            output_limit: None,
            reserved: None,
        };
        if let Some(max) = policy.max_tokens_per_run.filter(|_| tokens) {
            let used = c.input_tokens.saturating_add(c.output_tokens);
            let left = max.saturating_sub(used).saturating_sub(c.reserved);
            if left == 0 {
                return Err(Exhausted::Tokens {
                    used,
                    reserved: c.reserved,
                    max,
                });
            }
            admitted.tokens_left = Some(left);
            if let Some(ask) = ask {
                let n = ask.n.max(1);
                let limit = left / n;
                if limit == 0 {
                    return Err(Exhausted::Choices { n, left });
                }
                let cap = ask.output.map_or(limit, |o| o.min(limit));
                let reserved = Reserved {
                    output: cap.saturating_mul(n),
                    input_estimate: ask.input_estimate,
                    n,
                };
                c.reserved = c.reserved.saturating_add(reserved.total());
                admitted.output_limit = Some(limit);
                admitted.reserved = Some(reserved);
            }
        }
        c.requests += 1;
        admitted.number = c.requests;
        Ok(admitted)
    }

    /// Ends a call: releases what it reserved (if anything) and adds the
    /// tokens it is charged.
    pub fn settle(&self, reserved: Option<&Reserved>, input: u64, output: u64) {
        let mut c = self.lock();
        if let Some(r) = reserved {
            c.reserved = c.reserved.saturating_sub(r.total());
        }
        c.input_tokens = c.input_tokens.saturating_add(input);
        c.output_tokens = c.output_tokens.saturating_add(output);
    }

    pub fn counts(&self) -> Counts {
        *self.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::TestDir;

    #[test]
    fn defaults_file_and_flags() {
        let p = Policy::load(None, &Overrides::default()).expect("default");
        assert_eq!(p, Policy::default());
        assert!(p.allows_model("anything"));
        let dir = TestDir::new("policy");
        let path = dir.path().join("p.json");
        std::fs::write(
            &path,
            r#"{"allowed_models":["a","b"],"max_requests":3,"max_tokens_per_run":100}"#,
        )
        .expect("write");
        let p = Policy::load(Some(&path), &Overrides::default()).expect("file");
        assert_eq!(p.max_requests, 3);
        assert_eq!(p.max_tokens_per_run, Some(100));
        assert_eq!(p.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        assert!(p.allows_model("b") && !p.allows_model("c"));
        let flags = Overrides {
            allowed_models: vec!["c".into()],
            max_requests: Some(9),
            max_tokens_per_run: None,
            max_request_bytes: Some(10),
        };
        let p = Policy::load(Some(&path), &flags).expect("both");
        assert_eq!(
            (p.max_requests, p.max_request_bytes, p.max_tokens_per_run),
            (9, 10, Some(100))
        );
        assert!(p.allows_model("c") && !p.allows_model("a"));
    }

    #[test]
    fn malformed_files_name_the_path() {
        let dir = TestDir::new("policy-bad");
        let path = dir.path().join("bad.json");
        for bad in [
            "{",
            r#"{"max_requests":"many"}"#,
            r#"{"max_requests":-1}"#,
            r#"{"allowed_models":[]}"#,
            r#"{"max_request_bytes":0}"#,
            r#"{"bogus":1}"#,
            "[]",
        ] {
            std::fs::write(&path, bad).expect("write");
            let e = Policy::load(Some(&path), &Overrides::default()).expect_err(bad);
            assert!(matches!(e, Error::Invalid(..)), "{bad}: {e:?}");
            assert!(e.to_string().contains("bad.json"), "{e}");
        }
        let e = Policy::load(
            Some(&dir.path().join("missing.json")),
            &Overrides::default(),
        )
        .expect_err("missing");
        assert!(e.to_string().contains("missing.json"));
        let flags = Overrides {
            max_request_bytes: Some(MAX_REQUEST_BYTES_LIMIT + 1),
            ..Overrides::default()
        };
        assert!(matches!(Policy::load(None, &flags), Err(Error::Value(_))));
    }

    #[test]
    fn budgets() {
        let p = Policy {
            max_requests: 2,
            max_tokens_per_run: Some(50),
            ..Policy::default()
        };
        let b = Budget::default();
        let admitted = |number, left| {
            Ok(Admitted {
                number,
                tokens_left: Some(left),
                output_limit: None,
                reserved: None,
            })
        };
        assert_eq!(b.admit(&p, None, true), admitted(1, 50));
        b.settle(None, 10, 5);
        assert_eq!(b.admit(&p, None, true), admitted(2, 35));
        assert_eq!(b.admit(&p, None, true), Err(Exhausted::Requests(2)));
        let p = Policy {
            max_requests: 10,
            ..p
        };
        b.settle(None, 30, 5);
        assert_eq!(
            b.admit(&p, None, true),
            Err(Exhausted::Tokens {
                used: 50,
                reserved: 0,
                max: 50
            })
        );
        assert_eq!(
            b.counts(),
            Counts {
                requests: 2,
                input_tokens: 40,
                output_tokens: 10,
                reserved: 0,
            }
        );
    }

    /// Calls in flight hold their output caps (times `n`) and input
    /// estimates: the next call sees only what is left after them; what
    /// a call reserved is replaced by what it used when it ends.
    #[test]
    fn reservations_hold_while_calls_are_in_flight() {
        let p = Policy {
            max_tokens_per_run: Some(1000),
            ..Policy::default()
        };
        let b = Budget::default();
        let ask = |output, n| Ask {
            output,
            n,
            input_estimate: 10,
        };
        // Asks 300 of 1000: gets it, holds 310.
        let a = b.admit(&p, Some(&ask(Some(300), 1)), true).expect("a");
        assert_eq!((a.tokens_left, a.output_limit), (Some(1000), Some(1000)));
        let ra = a.reserved.expect("reserved");
        assert_eq!((ra.output, ra.total()), (300, 310));
        // No cap asked, n = 3: 690 left, 230 a choice, 690 + 10 held.
        let c = b.admit(&p, Some(&ask(None, 3)), true).expect("c");
        assert_eq!((c.tokens_left, c.output_limit), (Some(690), Some(230)));
        let rc = c.reserved.expect("reserved");
        assert_eq!((rc.output, rc.n), (690, 3));
        // Everything (and the estimate beyond) is held: the next call is
        // refused.
        assert_eq!(
            b.admit(&p, Some(&ask(Some(1), 1)), true),
            Err(Exhausted::Tokens {
                used: 0,
                reserved: 1010,
                max: 1000
            })
        );
        assert_eq!(b.counts().requests, 2, "a refusal is not counted");
        // `a` ends having used 20 in and 100 out: 880 held or used.
        b.settle(Some(&ra), 20, 100);
        assert_eq!(b.counts().reserved, 700);
        // 180 left; n = 181 cannot get a token each.
        assert_eq!(
            b.admit(&p, Some(&ask(Some(5), 181)), true),
            Err(Exhausted::Choices { n: 181, left: 180 })
        );
        // `c` fails: its reservation is released whole.
        b.settle(Some(&rc), 0, 0);
        let d = b.admit(&p, Some(&ask(Some(5000), 1)), true).expect("d");
        assert_eq!(d.output_limit, Some(880));
        assert_eq!(d.reserved.map(|r| r.output), Some(880));
        // Without a budget nothing is reserved.
        let free = Budget::default();
        let e = free
            .admit(&Policy::default(), Some(&ask(Some(5), 2)), true)
            .expect("e");
        assert_eq!((e.output_limit, e.reserved), (None, None));
        assert_eq!(input_estimate(0), 0);
        assert_eq!(input_estimate(9), 3);
    }

    /// A call that spends no tokens is not refused by a spent token
    /// budget, reserves nothing, and still counts as a request.
    #[test]
    fn calls_without_tokens_count_only_as_requests() {
        let p = Policy {
            max_requests: 3,
            max_tokens_per_run: Some(10),
            ..Policy::default()
        };
        let b = Budget::default();
        b.settle(None, 10, 0);
        assert!(matches!(
            b.admit(&p, None, true),
            Err(Exhausted::Tokens { .. })
        ));
        let a = b.admit(&p, None, false).expect("free");
        assert_eq!((a.tokens_left, a.reserved), (None, None));
        b.admit(&p, None, false).expect("free");
        b.admit(&p, None, false).expect("free");
        assert_eq!(b.admit(&p, None, false), Err(Exhausted::Requests(3)));
        assert_eq!(b.counts().reserved, 0);
    }
}
