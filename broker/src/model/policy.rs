//! The run's model policy: which models, how many requests, how many
//! tokens, how large a request body. From `--model-policy FILE` (JSON) and
//! the flags, which override the file. [`Budget`] keeps the counts of one
//! run across the connections' threads.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::{json, Value};

/// Default `max_requests`.
pub const DEFAULT_MAX_REQUESTS: u64 = 200;
/// Default `max_request_bytes`: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 1 << 20;
/// The largest `max_request_bytes` allowed: 32 MiB (the body is held in
/// memory before it is forwarded).
pub const MAX_REQUEST_BYTES_LIMIT: u64 = 32 << 20;
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
    Tokens { used: u64, max: u64 },
}

/// A call [`Budget::admit`] let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Its number in the run, from 1.
    pub number: u64,
    /// Tokens left of the run's budget when it started (`None`: no token
    /// budget): the most output the call may ask for.
    pub tokens_left: Option<u64>,
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
}

impl Budget {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits one more call if both budgets allow it, counting it. The
    /// proxy caps the call's output at the tokens left; its input (unknown
    /// until the upstream counts it) may still take the count past the
    /// budget, and the next call is refused.
    pub fn admit(&self, policy: &Policy) -> Result<Admitted, Exhausted> {
        let mut c = self.lock();
        if c.requests >= policy.max_requests {
            return Err(Exhausted::Requests(policy.max_requests));
        }
        let mut tokens_left = None;
        if let Some(max) = policy.max_tokens_per_run {
            let used = c.input_tokens.saturating_add(c.output_tokens);
            if used >= max {
                return Err(Exhausted::Tokens { used, max });
            }
            tokens_left = Some(max - used);
        }
        c.requests += 1;
        Ok(Admitted {
            number: c.requests,
            tokens_left,
        })
    }

    /// Adds the tokens a call used.
    pub fn spend(&self, input: u64, output: u64) {
        let mut c = self.lock();
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
            })
        };
        assert_eq!(b.admit(&p), admitted(1, 50));
        b.spend(10, 5);
        assert_eq!(b.admit(&p), admitted(2, 35));
        assert_eq!(b.admit(&p), Err(Exhausted::Requests(2)));
        let p = Policy {
            max_requests: 10,
            ..p
        };
        b.spend(30, 5);
        assert_eq!(b.admit(&p), Err(Exhausted::Tokens { used: 50, max: 50 }));
        assert_eq!(
            b.counts(),
            Counts {
                requests: 2,
                input_tokens: 40,
                output_tokens: 10
            }
        );
    }
}
