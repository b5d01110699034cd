//! Checking an audit log offline: `airlock audit verify FILE [--key PUB]`.
//!
//! Records are numbered from 0 by their position (record N is on line N+1
//! and must carry `seq` N). Each line must be a complete, canonical record
//! whose `prev` is the sha256 of the line before (64 zeros for the first).
//! The log must start with the host's `run.start` and end with the host's
//! `run.end` followed by the `run.seal`, every byte of which is fixed by
//! what precedes it (its `sha256` is the `run.end`'s hash, its `ts` the
//! `run.end`'s). A signed seal is checked against `--key`, or, without one,
//! against the key it names (which proves only that the log is intact as
//! sealed, not who sealed it); a `run.start` that names a signing key
//! requires a seal signed by that key.
//!
//! Without a key, the chain shows that the log is complete and unchanged
//! *unless whoever changed it rewrote every hash after the change*: only the
//! signature (with the public key kept elsewhere) rules that out.

use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use super::keys;
use super::kind;
use super::record::{is_hash, sha256_hex, Record, Source, ZERO_HASH};
use super::time;

/// A record that verified, as reports name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Good {
    /// Position (= seq), from 0.
    pub index: usize,
    pub kind: String,
}

impl Good {
    /// `record 3 (line 4, vm.start)`.
    pub fn describe(&self) -> String {
        format!(
            "record {} (line {}, {})",
            self.index,
            self.index + 1,
            self.kind
        )
    }
}

/// How the seal was signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signed {
    /// The seal carries no signature (the run had no `--audit-key`).
    No,
    /// Valid, by this key, which is the `--key` given.
    ByGivenKey(String),
    /// Valid, by the key the seal itself names (no `--key` was given).
    ByEmbeddedKey(String),
}

/// An intact log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intact {
    pub records: usize,
    pub run_id: Option<String>,
    /// The hash of `run.end`, which the seal carries (and signs).
    pub run_end_hash: String,
    pub signed: Signed,
}

/// A log that is not intact: the first problem, and the last record up to
/// which every record is well-formed and chained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub problem: String,
    pub intact_through: Option<Good>,
}

/// Where the walk is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    Running,
    /// After `run.end`, whose hash and ts are these.
    Ended {
        hash: String,
        ts: String,
    },
    /// After the seal.
    Sealed {
        signature: Option<(String, String)>,
        run_end_hash: String,
    },
}

/// The keys a seal has: `sha256`, plus `alg`, `public_key` and
/// `signature` when signed.
fn seal_signature(
    record: &Record,
    run_end_hash: &str,
    run_end_ts: &str,
) -> Result<Option<(String, String)>, String> {
    let f = &record.fields;
    let mut keys: Vec<&str> = f.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let signed = match keys.as_slice() {
        ["sha256"] => false,
        ["alg", "public_key", "sha256", "signature"] => true,
        _ => return Err(format!("run.seal has the fields {keys:?}")),
    };
    if f.get("sha256").and_then(Value::as_str) != Some(run_end_hash) {
        return Err("run.seal's sha256 is not the hash of run.end".into());
    }
    if record.ts != run_end_ts {
        return Err("run.seal's ts is not run.end's".into());
    }
    if !signed {
        return Ok(None);
    }
    if f.get("alg").and_then(Value::as_str) != Some("ed25519") {
        return Err("run.seal's alg is not ed25519".into());
    }
    let text = |name: &str| {
        f.get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("run.seal's {name} is not a string"))
    };
    Ok(Some((text("public_key")?, text("signature")?)))
}

/// The signing key `run.start` names (`fields.audit.public_key`), if any.
fn named_key(start: &Record) -> Option<String> {
    start
        .fields
        .get("audit")
        .and_then(|a| a.get("public_key"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Verifies a whole log file's bytes. `key` is the trusted public key, if
/// the caller has one.
pub fn verify(bytes: &[u8], key: Option<&VerifyingKey>) -> Result<Intact, Broken> {
    let mut rest = bytes;
    let mut prev = ZERO_HASH.to_owned();
    let mut stage = Stage::Running;
    let mut last: Option<Good> = None;
    let mut before_last: Option<Good> = None;
    let mut start: Option<Record> = None;
    let mut index = 0usize;
    let broken = |problem: String, intact_through: Option<Good>| Broken {
        problem,
        intact_through,
    };
    while !rest.is_empty() {
        let name = format!("record {index} (line {})", index + 1);
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            return Err(broken(
                format!(
                    "truncated: {name} is partially written ({} bytes and no newline)",
                    rest.len()
                ),
                last,
            ));
        };
        let (line, tail) = rest.split_at(end);
        rest = tail.get(1..).unwrap_or_default();

        let fail = |what: String| Err(broken(format!("{name}: {what}"), last.clone()));
        if line.is_empty() {
            return fail("an empty line".into());
        }
        let record: Record = match serde_json::from_slice(line) {
            Ok(r) => r,
            Err(e) => return fail(format!("not a valid record ({e})")),
        };
        if record.to_line().ok().as_deref() != Some(line) {
            return fail("not in canonical form (it was edited)".into());
        }
        if u64::try_from(index).ok() != Some(record.seq) {
            return fail(format!(
                "seq is {}, expected {index} (a record was removed, added or moved)",
                record.seq
            ));
        }
        if !is_hash(&record.prev) {
            return fail("prev is not a sha256".into());
        }
        if record.prev != prev {
            let problem = if index == 0 {
                format!("{name}: prev is not 64 zeros (the log does not start here)")
            } else {
                format!(
                    "{name}: prev does not match sha256 of record {} (one of the two was changed)",
                    index - 1
                )
            };
            return Err(broken(problem, before_last));
        }
        if time::parse_rfc3339(&record.ts).is_none() {
            return fail("ts is not an RFC 3339 UTC time".into());
        }
        let host = record.source == Source::Host;
        if index == 0 && !(host && record.kind == kind::RUN_START) {
            return fail(format!(
                "the first record is {} from the {}, not run.start from the host",
                record.kind,
                record.source.name()
            ));
        }
        match &stage {
            Stage::Sealed { .. } => {
                return fail(format!(
                    "{} after run.seal (the log ends there)",
                    record.kind
                ))
            }
            Stage::Ended { hash, ts } => {
                if !(host && record.kind == kind::RUN_SEAL) {
                    return fail(format!(
                        "{} after run.end (only run.seal may follow)",
                        record.kind
                    ));
                }
                match seal_signature(&record, hash, ts) {
                    Ok(signature) => {
                        stage = Stage::Sealed {
                            signature,
                            run_end_hash: hash.clone(),
                        }
                    }
                    Err(e) => return fail(e),
                }
            }
            Stage::Running if host => match record.kind.as_str() {
                kind::RUN_START if index > 0 => return fail("a second run.start".into()),
                kind::RUN_SEAL => return fail("run.seal before run.end".into()),
                kind::RUN_END => {
                    stage = Stage::Ended {
                        hash: sha256_hex(line),
                        ts: record.ts.clone(),
                    }
                }
                _ => {}
            },
            Stage::Running => {}
        }
        prev = sha256_hex(line);
        before_last = last.take();
        last = Some(Good {
            index,
            kind: record.kind.clone(),
        });
        if index == 0 {
            start = Some(record);
        }
        index += 1;
    }

    let (signature, run_end_hash) = match stage {
        Stage::Running if last.is_none() => {
            return Err(broken("empty: the log has no record".into(), None))
        }
        Stage::Running => {
            return Err(broken(
                "truncated: no run.end record (the run did not end: it was killed, or its host crashed)"
                    .into(),
                last,
            ))
        }
        Stage::Ended { .. } => {
            return Err(broken(
                "truncated: no run.seal record after run.end".into(),
                last,
            ))
        }
        Stage::Sealed {
            signature,
            run_end_hash,
        } => (signature, run_end_hash),
    };
    let sig_fail = |problem: &str| Err(broken(problem.to_owned(), last.clone()));
    let named = start.as_ref().and_then(named_key);
    let signed = match (&signature, key) {
        (None, Some(_)) => return sig_fail("signature missing: the log is not signed"),
        (None, None) if named.is_some() => {
            return sig_fail(
                "signature missing: run.start names a signing key but the seal is unsigned",
            )
        }
        (None, None) => Signed::No,
        (Some((public, signature)), given) => {
            if named.as_ref().is_some_and(|n| n != public) {
                return sig_fail(
                    "signature invalid: the seal's key is not the one run.start names",
                );
            }
            let (trusted, signed) = match given {
                Some(given) => {
                    if keys::public_hex(given) != *public {
                        return sig_fail("signature invalid: sealed by another key than --key");
                    }
                    (*given, Signed::ByGivenKey(public.clone()))
                }
                None => match keys::public_from_hex(public) {
                    Some(k) => (k, Signed::ByEmbeddedKey(public.clone())),
                    None => {
                        return sig_fail("signature invalid: the seal's public key is not a key")
                    }
                },
            };
            if !keys::verify(&trusted, &run_end_hash, signature) {
                return sig_fail("signature invalid");
            }
            signed
        }
    };
    Ok(Intact {
        records: index,
        run_id: start
            .as_ref()
            .and_then(|s| s.fields.get("run_id"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        run_end_hash,
        signed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::log::{AuditLog, Durability, TEST_LIMITS};
    use ed25519_dalek::SigningKey;
    use serde_json::json;

    /// A clean log of `guest` guest records, signed with `key` if given.
    fn log_with(key: Option<&SigningKey>, named: bool, guest: usize) -> Vec<u8> {
        let (log, memory) = AuditLog::memory(TEST_LIMITS, key.cloned());
        let public = key
            .filter(|_| named)
            .map(|k| keys::public_hex(&k.verifying_key()));
        log.host(
            kind::RUN_START,
            json!({"run_id": "abcd", "audit": {"public_key": public}}),
            Durability::Synced,
        );
        log.host("vm.start", json!({"engine": "tcg"}), Durability::Synced);
        for i in 0..guest {
            log.guest_event("exec", vec![("pid".into(), i.to_string())]);
        }
        log.guest_claim("command.exit", json!({"exited": 0}), Durability::Buffered);
        log.finish(json!({"how": "exited", "exit_code": 0}))
            .expect("finish");
        memory.bytes()
    }

    fn clean() -> Vec<u8> {
        log_with(None, false, 3)
    }

    fn lines(bytes: &[u8]) -> Vec<Vec<u8>> {
        bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn join(lines: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(l);
            out.push(b'\n');
        }
        out
    }

    fn problem(bytes: &[u8]) -> Broken {
        verify(bytes, None).expect_err("should be broken")
    }

    #[test]
    fn a_clean_log_verifies() {
        let bytes = clean();
        let intact = verify(&bytes, None).expect("intact");
        assert_eq!(intact.records, 8);
        assert_eq!(intact.run_id.as_deref(), Some("abcd"));
        assert_eq!(intact.signed, Signed::No);
        let end = &lines(&bytes)[6];
        assert_eq!(intact.run_end_hash, sha256_hex(end));
    }

    #[test]
    fn every_single_byte_edit_is_caught() {
        let bytes = clean();
        for i in 0..bytes.len() {
            for replacement in [b'0', b'1', b'a', b' ', b'"', b'\n', b'}'] {
                if bytes[i] == replacement {
                    continue;
                }
                let mut edited = bytes.clone();
                edited[i] = replacement;
                assert!(
                    verify(&edited, None).is_err(),
                    "byte {i} ({:?}) -> {:?} went unnoticed",
                    char::from(bytes[i]),
                    char::from(replacement)
                );
            }
        }
    }

    #[test]
    fn an_edit_is_named_at_the_record_or_the_one_after() {
        let mut l = lines(&clean());
        // Change the engine in record 1: record 2's prev no longer matches.
        l[1] = String::from_utf8(l[1].clone())
            .expect("utf8")
            .replace("tcg", "kvm")
            .into_bytes();
        let b = problem(&join(&l));
        assert_eq!(
            b.problem,
            "record 2 (line 3): prev does not match sha256 of record 1 (one of the two was changed)"
        );
        assert_eq!(b.intact_through.expect("good").index, 0);
        // An edit of a non-canonical kind is caught on its own line.
        let mut l = lines(&clean());
        l[3] = String::from_utf8(l[3].clone())
            .expect("utf8")
            .replacen("{\"seq\"", "{ \"seq\"", 1)
            .into_bytes();
        let b = problem(&join(&l));
        assert_eq!(
            b.problem,
            "record 3 (line 4): not in canonical form (it was edited)"
        );
        assert_eq!(b.intact_through.expect("good").index, 2);
    }

    #[test]
    fn deleting_swapping_or_appending_records_is_caught() {
        let l = lines(&clean());
        let mut deleted = l.clone();
        deleted.remove(4);
        assert_eq!(
            problem(&join(&deleted)).problem,
            "record 4 (line 5): seq is 5, expected 4 (a record was removed, added or moved)"
        );
        let mut swapped = l.clone();
        swapped.swap(3, 4);
        assert!(problem(&join(&swapped))
            .problem
            .starts_with("record 3 (line 4): seq is 4"));
        let mut first = l.clone();
        first.remove(0);
        assert!(problem(&join(&first))
            .problem
            .starts_with("record 0 (line 1): seq is 1"));

        // A forged record after the seal, correctly chained.
        let mut forged = l.clone();
        let last = forged.last().expect("seal").clone();
        let record = Record {
            seq: u64::try_from(l.len()).expect("small"),
            ts: "2030-01-01T00:00:00.000000Z".into(),
            kind: "exec".into(),
            source: Source::Guest,
            fields: serde_json::Map::new(),
            prev: sha256_hex(&last),
        };
        forged.push(record.to_line().expect("json"));
        let b = problem(&join(&forged));
        assert_eq!(
            b.problem,
            "record 8 (line 9): exec after run.seal (the log ends there)"
        );
        assert_eq!(b.intact_through.expect("good").kind, "run.seal");
    }

    #[test]
    fn truncations_are_reported_with_the_last_good_record() {
        let l = lines(&clean());
        // Killed mid-run: whole records, no run.end.
        let b = problem(&join(&l[..4]));
        assert!(
            b.problem.starts_with("truncated: no run.end record"),
            "{}",
            b.problem
        );
        assert_eq!(
            b.intact_through.expect("good").describe(),
            "record 3 (line 4, exec)"
        );
        // A partial last line.
        let mut cut = join(&l[..4]);
        cut.extend_from_slice(&l[4][..10]);
        let b = problem(&cut);
        assert_eq!(
            b.problem,
            "truncated: record 4 (line 5) is partially written (10 bytes and no newline)"
        );
        assert_eq!(b.intact_through.expect("good").index, 3);
        // Cut between run.end and the seal.
        let b = problem(&join(&l[..7]));
        assert_eq!(b.problem, "truncated: no run.seal record after run.end");
        // Every cut of the file fails.
        let bytes = clean();
        for n in 0..bytes.len() {
            assert!(verify(&bytes[..n], None).is_err(), "cut at {n}");
        }
        assert_eq!(problem(b"").problem, "empty: the log has no record");
    }

    #[test]
    fn the_last_record_cannot_be_edited_either() {
        let l = lines(&clean());
        let seal = String::from_utf8(l[7].clone()).expect("utf8");
        let mut later = l.clone();
        later[7] = seal.replacen("\"ts\":\"", "\"ts\":\"1", 1).into_bytes();
        assert!(verify(&join(&later), None).is_err());
        // Re-chaining a forged run.end still needs the seal to match it.
        let mut forged = l.clone();
        forged[6] = String::from_utf8(l[6].clone())
            .expect("utf8")
            .replace("\"exit_code\":0", "\"exit_code\":1")
            .into_bytes();
        assert_eq!(
            problem(&join(&forged)).problem,
            "record 7 (line 8): prev does not match sha256 of record 6 (one of the two was changed)"
        );
    }

    #[test]
    fn signatures() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let signed = log_with(Some(&key), true, 2);
        let public = key.verifying_key();
        let intact = verify(&signed, Some(&public)).expect("right key");
        assert_eq!(intact.signed, Signed::ByGivenKey(keys::public_hex(&public)));
        assert!(matches!(
            verify(&signed, None).expect("embedded").signed,
            Signed::ByEmbeddedKey(_)
        ));
        let b = verify(&signed, Some(&other.verifying_key())).expect_err("wrong key");
        assert!(b.problem.starts_with("signature invalid"), "{}", b.problem);

        // An unsigned log fails when a key is expected.
        let b = verify(&clean(), Some(&public)).expect_err("unsigned");
        assert!(b.problem.starts_with("signature missing"), "{}", b.problem);

        // Re-sealing a forged log with another key: the chain is fine, the
        // signature is not (run.start names the real key, or --key does).
        let forged_by_other = log_with(Some(&other), false, 2);
        let b = verify(&forged_by_other, Some(&public)).expect_err("other key");
        assert!(b.problem.starts_with("signature invalid"), "{}", b.problem);

        // A flipped signature byte.
        let mut l = lines(&signed);
        let seal = String::from_utf8(l[6].clone()).expect("utf8");
        let at = seal.find("\"signature\":\"").expect("sig") + 13;
        let mut bytes = seal.into_bytes();
        bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
        l[6] = bytes;
        let b = verify(&join(&l), Some(&public)).expect_err("flipped");
        assert_eq!(b.problem, "signature invalid");

        // Stripping the signature from a log whose run.start names a key.
        let unsigned_seal = lines(&log_with(Some(&key), true, 2));
        let mut l = unsigned_seal.clone();
        let seal: Record = serde_json::from_slice(&l[6]).expect("seal");
        let mut stripped = seal.clone();
        stripped.fields.retain(|k, _| k == "sha256");
        l[6] = stripped.to_line().expect("json");
        let b = verify(&join(&l), None).expect_err("stripped");
        assert!(b.problem.starts_with("signature missing"), "{}", b.problem);
    }

    #[test]
    fn structure() {
        // A log that starts with anything but run.start.
        let (log, memory) = AuditLog::memory(TEST_LIMITS, None);
        log.host("vm.start", json!({}), Durability::Synced);
        log.finish(json!({})).expect("finish");
        assert_eq!(
            problem(&memory.bytes()).problem,
            "record 0 (line 1): the first record is vm.start from the host, not run.start from the host"
        );
        // A guest cannot end the run by naming a kind.
        let (log, memory) = AuditLog::memory(TEST_LIMITS, None);
        log.host(kind::RUN_START, json!({}), Durability::Synced);
        log.guest_event("run.end", vec![]);
        log.guest_event("run.seal", vec![]);
        let b = problem(&memory.bytes());
        assert!(
            b.problem.starts_with("truncated: no run.end"),
            "{}",
            b.problem
        );
    }
}
