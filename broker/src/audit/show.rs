//! `airlock audit show FILE [--json]`: a readable timeline of a log, or its
//! records as JSON Lines. Showing does not verify (`airlock audit verify`
//! does); lines that are not records are shown as such. Every string from
//! the log is made safe for a terminal first: guest records carry whatever
//! the guest chose to write.

use serde_json::Value;

use super::record::Record;
use super::time;

/// Longest summary shown for a record.
const MAX_SUMMARY: usize = 240;

/// One line of the log, parsed or not.
#[derive(Debug)]
pub enum Line {
    Record(Record),
    /// Not a record: the 1-based line number and why.
    Bad(usize, String),
}

/// Parses every line of `bytes` (a partial last line included).
pub fn parse(bytes: &[u8]) -> Vec<Line> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| match serde_json::from_slice::<Record>(l) {
            Ok(r) => Line::Record(r),
            Err(e) => Line::Bad(i + 1, e.to_string()),
        })
        .collect()
}

/// A value as shown: strings bare, everything else as compact JSON.
fn value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `a.b.c` looked up in a record's fields.
fn at<'a>(r: &'a Record, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut v = r.fields.get(parts.next()?)?;
    for p in parts {
        v = v.get(p)?;
    }
    Some(v)
}

/// The key fields of a record, as `name=value` words.
fn summary(r: &Record) -> String {
    let picked: &[&str] = match r.kind.as_str() {
        "run.start" => &[
            "airlock_version",
            "policy.engine",
            "spec.argv",
            "kernel.sha256",
            "initrd.sha256",
            "init.sha256",
        ],
        "run.end" => &[
            "how",
            "exit_code",
            "command_status",
            "message",
            "durations_ms",
        ],
        "run.seal" => &["sha256", "public_key"],
        _ => &[],
    };
    let words: Vec<String> = if picked.is_empty() {
        r.fields
            .iter()
            .map(|(k, v)| format!("{k}={}", value(v)))
            .collect()
    } else {
        picked
            .iter()
            .filter_map(|p| at(r, p).filter(|v| !v.is_null()).map(|v| (p, v)))
            .map(|(p, v)| {
                let name =
                    p.rsplit_once('.').map_or(
                        *p,
                        |(head, tail)| {
                            if tail == "sha256" {
                                head
                            } else {
                                tail
                            }
                        },
                    );
                let shown = value(v);
                // Hashes: the first 16 digits are enough to tell them apart.
                let shown = if p.ends_with("sha256") {
                    shown.chars().take(16).collect()
                } else {
                    shown
                };
                format!("{name}={shown}")
            })
            .collect()
    };
    let text = crate::text::sanitize(words.join(" ").as_bytes());
    if text.chars().count() > MAX_SUMMARY {
        let mut cut: String = text.chars().take(MAX_SUMMARY).collect();
        cut.push('…');
        cut
    } else {
        text
    }
}

/// The timeline: `+SECONDS  SOURCE  KIND  FIELDS`, one line a record,
/// times relative to the first record.
pub fn timeline(lines: &[Line]) -> Vec<String> {
    let start = lines.iter().find_map(|l| match l {
        Line::Record(r) => time::parse_rfc3339(&r.ts),
        Line::Bad(..) => None,
    });
    lines
        .iter()
        .map(|l| match l {
            Line::Record(r) => {
                let offset = match (time::parse_rfc3339(&r.ts), start) {
                    (Some(t), Some(s)) => {
                        let ms = (t - s) / 1000;
                        format!("{:+}.{:03}s", ms / 1000, (ms % 1000).abs())
                    }
                    _ => "?".into(),
                };
                format!(
                    "{offset:>10}  {:<5}  {:<18}  {}",
                    r.source.name(),
                    crate::text::sanitize(r.kind.as_bytes()),
                    summary(r)
                )
            }
            Line::Bad(n, why) => format!(
                "{:>10}  line {n} is not a record: {}",
                "?",
                crate::text::sanitize(why.as_bytes())
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::log::{AuditLog, Durability, TEST_LIMITS};
    use serde_json::json;

    #[test]
    fn a_timeline_of_a_run() {
        let (log, memory) = AuditLog::memory(TEST_LIMITS, None);
        log.host(
            "run.start",
            json!({
                "airlock_version": "0.1.0",
                "policy": {"engine": "tcg"},
                "spec": {"argv": ["sh", "-c", "ls"]},
                "kernel": {"sha256": "ab".repeat(32)},
            }),
            Durability::Synced,
        );
        log.guest_event(
            "exec",
            vec![
                ("pid".into(), "12".into()),
                ("argv".into(), "ls \u{1b}[2J/".into()),
            ],
        );
        log.finish(json!({"how": "exited", "exit_code": 0}))
            .expect("finish");
        let mut bytes = memory.bytes();
        bytes.extend_from_slice(b"{\"seq\":4,\"ts\"");
        let shown = timeline(&parse(&bytes));
        assert_eq!(shown.len(), 5, "{shown:#?}");
        assert!(
            shown[0].starts_with("   +0.000s  host   run.start"),
            "{shown:#?}"
        );
        assert!(shown[0].contains("engine=tcg"), "{}", shown[0]);
        assert!(
            shown[0].contains("argv=[\"sh\",\"-c\",\"ls\"]"),
            "{}",
            shown[0]
        );
        assert!(
            shown[0].ends_with("kernel=abababababababab"),
            "{}",
            shown[0]
        );
        assert!(shown[1].contains("guest  exec"), "{}", shown[1]);
        // The guest's escape sequence is shown escaped.
        assert!(shown[1].contains("argv=ls \\u{1b}[2J/"), "{}", shown[1]);
        assert!(shown[2].contains("run.end") && shown[2].contains("how=exited"));
        assert!(shown[4].contains("line 5 is not a record"), "{}", shown[4]);
    }
}
