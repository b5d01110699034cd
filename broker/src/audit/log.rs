//! Writing one run's audit log: the hash chain, durability, and the cap on
//! what the guest may make us write.
//!
//! [`AuditLog`] is a cloneable handle (the supervisor and the session thread
//! both write). Each record goes out in one `write` of its whole line, so a
//! log cut short by a crash ends at a record boundary unless the write
//! itself was cut; security-relevant records are followed by `fdatasync`.
//! After the first failed write nothing more is written (the chain could
//! not be continued honestly) and [`AuditLog::failure`] says why; the run
//! supervisor then stops the sandbox (fail closed).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use ed25519_dalek::SigningKey;
use serde_json::{Map, Value};

use super::keys;
use super::record::{hex, object, sha256_hex, Record, Source, ZERO_HASH};
use super::records::{
    self, AuditOverflow, GuestRecords, HostRecord, OutputCounts, RunSeal, Signature,
};
use super::time;
use super::{kind, Error};

/// Where records go: a file, or memory in tests.
pub trait Sink: Write + Send {
    /// Makes what was written durable.
    fn sync(&mut self) -> io::Result<()>;
}

impl Sink for File {
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

/// The caps on guest-sourced records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most `AuditEvent` records written per run.
    pub max_guest_records: u64,
    /// Most bytes of `AuditEvent` records (lines with their newlines).
    pub max_guest_bytes: u64,
}

/// Whether a record is made durable at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Written, synced later (at the next synced record or the end).
    Buffered,
    /// Security-relevant: synced before the call returns.
    Synced,
}

/// Counters that end up in `run.end`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestCounts {
    pub written: u64,
    pub written_bytes: u64,
    pub dropped: u64,
    pub dropped_bytes: u64,
}

/// What [`AuditLog::finish`] wrote last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Number of records in the log.
    pub records: u64,
    /// sha256 of the `run.end` record (what the seal signs).
    pub run_end_hash: String,
}

struct Inner {
    sink: Box<dyn Sink>,
    next_seq: u64,
    prev: String,
    limits: Limits,
    guest: GuestCounts,
    /// The command's output: (forwarded, discarded) bytes.
    output: Option<(u64, u64)>,
    key: Option<SigningKey>,
    /// The first write error; nothing is written after it.
    failed: Option<String>,
    finished: bool,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("next_seq", &self.next_seq)
            .field("prev", &self.prev)
            .field("limits", &self.limits)
            .field("guest", &self.guest)
            .field("signed", &self.key.is_some())
            .field("failed", &self.failed)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The record that would come next, and its line.
    fn next(
        &self,
        kind: &str,
        source: Source,
        fields: Map<String, Value>,
        ts: String,
    ) -> Result<(Record, Vec<u8>), String> {
        let record = Record {
            seq: self.next_seq,
            ts,
            kind: kind.to_owned(),
            source,
            fields,
            prev: self.prev.clone(),
        };
        let line = record.to_line().map_err(|e| e.to_string())?;
        Ok((record, line))
    }

    /// Appends `line` (the canonical bytes of the next record) and advances
    /// the chain. Returns the record's hash.
    fn append(&mut self, line: &[u8], durability: Durability) -> Option<String> {
        if self.failed.is_some() || self.finished {
            return None;
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line);
        bytes.push(b'\n');
        let written = self.sink.write_all(&bytes).and_then(|()| match durability {
            Durability::Synced => self.sink.sync(),
            Durability::Buffered => Ok(()),
        });
        if let Err(e) = written {
            self.failed = Some(e.to_string());
            return None;
        }
        let hash = sha256_hex(line);
        self.prev.clone_from(&hash);
        self.next_seq += 1;
        Some(hash)
    }

    fn record(
        &mut self,
        kind: &str,
        source: Source,
        fields: Map<String, Value>,
        durability: Durability,
    ) -> Option<String> {
        let ts = time::rfc3339(time::micros(SystemTime::now()));
        match self.next(kind, source, fields, ts) {
            Ok((_, line)) => self.append(&line, durability),
            Err(e) => {
                self.failed.get_or_insert(e);
                None
            }
        }
    }
}

/// A run's audit log. Cloning gives another handle on the same log.
#[derive(Debug, Clone)]
pub struct AuditLog {
    inner: Arc<Mutex<Inner>>,
    /// Where the log file was created, for [`AuditLog::check_place`].
    place: Option<Arc<Place>>,
}

/// The log file airlock created: its path, identity, and a read-only
/// descriptor on it (opened at creation, before any guest ran).
#[derive(Debug)]
struct Place {
    path: PathBuf,
    dev: u64,
    ino: u64,
    reader: File,
}

/// What [`AuditLog::check_place`] found: the log is at its path, and these
/// are its bytes' sha256 and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
}

impl AuditLog {
    /// A log writing to `sink`, signed at the end with `key` if given.
    pub fn new(sink: Box<dyn Sink>, limits: Limits, key: Option<SigningKey>) -> AuditLog {
        AuditLog {
            inner: Arc::new(Mutex::new(Inner {
                sink,
                next_seq: 0,
                prev: ZERO_HASH.to_owned(),
                limits,
                guest: GuestCounts::default(),
                output: None,
                key,
                failed: None,
                finished: false,
            })),
            place: None,
        }
    }

    /// Creates the log file at `path`: a new file (never an existing one,
    /// nor through a symlink), mode 0600, append-only.
    pub fn create(path: &Path, limits: Limits, key: Option<SigningKey>) -> Result<AuditLog, Error> {
        let create_error = |source| Error::Create {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(create_error)?;
        // Best effort: make the new file's name durable with it.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        // A second, read-only descriptor on the same file, from the one we
        // hold (not the path): the end of the run reads the log through it.
        let reader =
            File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(create_error)?;
        let meta = file.metadata().map_err(create_error)?;
        let mut log = AuditLog::new(Box::new(file), limits, key);
        log.place = Some(Arc::new(Place {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            reader,
        }));
        Ok(log)
    }

    /// After [`AuditLog::finish`]: checks that the file at the log's path
    /// is still the one airlock wrote (a result renamed over it, or its
    /// removal, would leave airlock writing to an unlinked file and the
    /// path naming something else). If it is, returns its sha256 and size;
    /// if not, copies what airlock wrote to a new file beside it and says
    /// where. A log not made by [`AuditLog::create`] has no place: `None`.
    pub fn check_place(&self) -> Option<Result<Placed, Error>> {
        let place = self.place.as_ref()?;
        let (sha256, bytes) = match digest_of(&place.reader) {
            Ok(d) => d,
            Err(source) => {
                return Some(Err(Error::Read {
                    path: place.path.clone(),
                    source,
                }))
            }
        };
        let here = std::fs::symlink_metadata(&place.path)
            .is_ok_and(|m| m.dev() == place.dev && m.ino() == place.ino);
        if here {
            return Some(Ok(Placed {
                path: place.path.clone(),
                sha256,
                bytes,
            }));
        }
        Some(Err(match keep_copy(place) {
            Ok(kept) => Error::Replaced {
                path: place.path.clone(),
                kept,
            },
            Err(source) => Error::Lost {
                path: place.path.clone(),
                source,
            },
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the chain consistent (the
        // state only moves after a complete write), so carry on.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A record the broker observed itself, of a kind typed in
    /// [`super::records`].
    pub fn record<R: super::records::HostRecord>(&self, record: &R, durability: Durability) {
        self.host(R::KIND, super::records::fields(record), durability);
    }

    /// A guest claim of a kind typed in [`super::records`].
    pub fn claim<R: super::records::GuestClaim>(&self, claim: &R, durability: Durability) {
        self.guest_claim(R::KIND, super::records::fields(claim), durability);
    }

    /// Ends the log with the `run.end` record `end` (see [`AuditLog::finish`]).
    pub fn end(&self, end: &super::records::RunEnd) -> Result<Finished, Error> {
        self.finish(super::records::fields(end))
    }

    /// A record the broker observed itself.
    pub fn host(&self, kind: &str, fields: Value, durability: Durability) {
        self.lock()
            .record(kind, Source::Host, object(fields), durability);
    }

    /// A guest claim the broker read off the protocol (the command's exit
    /// status, a spawn failure): bounded in number by the protocol, so not
    /// counted against the guest caps.
    pub fn guest_claim(&self, kind: &str, fields: Value, durability: Durability) {
        self.lock()
            .record(kind, Source::Guest, object(fields), durability);
    }

    /// An `AuditEvent` from the guest. Written only while the guest is
    /// within both caps; beyond them it is counted and dropped, never
    /// buffered.
    pub fn guest_event(&self, kind: &str, fields: Vec<(String, String)>) {
        let mut inner = self.lock();
        let map: Map<String, Value> = fields
            .into_iter()
            .map(|(name, value)| (name, Value::String(value)))
            .collect();
        let ts = time::rfc3339(time::micros(SystemTime::now()));
        let line = match inner.next(kind, Source::Guest, map, ts) {
            Ok((_, line)) => line,
            Err(e) => {
                inner.failed.get_or_insert(e);
                return;
            }
        };
        let size = u64::try_from(line.len() + 1).unwrap_or(u64::MAX);
        let limits = inner.limits;
        let counts = &mut inner.guest;
        if counts.written >= limits.max_guest_records
            || counts.written_bytes.saturating_add(size) > limits.max_guest_bytes
            || counts.dropped > 0
        {
            counts.dropped += 1;
            counts.dropped_bytes = counts.dropped_bytes.saturating_add(size);
            return;
        }
        if inner.append(&line, Durability::Buffered).is_some() {
            inner.guest.written += 1;
            inner.guest.written_bytes += size;
        }
    }

    /// The command's output totals, for `run.end`.
    pub fn set_output(&self, forwarded: u64, discarded: u64) {
        self.lock().output = Some((forwarded, discarded));
    }

    /// The guest record counters so far.
    #[cfg(test)]
    pub fn guest_counts(&self) -> GuestCounts {
        self.lock().guest
    }

    /// Why the log stopped being written, if it did.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Ends the log: an `audit.overflow` record if guest records were
    /// dropped, `run.end` with `fields` (plus the guest and output
    /// counters), and the `run.seal` (signed if there is a key), all synced.
    pub fn finish(&self, fields: Value) -> Result<Finished, Error> {
        let mut inner = self.lock();
        let guest = inner.guest;
        let limits = inner.limits;
        if guest.dropped > 0 {
            inner.record(
                AuditOverflow::KIND,
                Source::Host,
                object(records::fields(&AuditOverflow {
                    dropped_records: guest.dropped,
                    dropped_bytes: guest.dropped_bytes,
                    written_records: guest.written,
                    written_bytes: guest.written_bytes,
                    max_guest_records: limits.max_guest_records,
                    max_guest_bytes: limits.max_guest_bytes,
                })),
                Durability::Synced,
            );
        }
        let mut fields = object(fields);
        fields.insert(
            "guest_records".into(),
            records::fields(&GuestRecords {
                written: guest.written,
                written_bytes: guest.written_bytes,
                dropped: guest.dropped,
                dropped_bytes: guest.dropped_bytes,
            }),
        );
        if let Some((forwarded, discarded)) = inner.output {
            fields.insert(
                "output".into(),
                records::fields(&OutputCounts {
                    forwarded_bytes: forwarded,
                    discarded_bytes: discarded,
                }),
            );
        }
        let ts = time::rfc3339(time::micros(SystemTime::now()));
        let end = inner
            .next(kind::RUN_END, Source::Host, fields, ts.clone())
            .map_err(Error::Encode)?;
        let hash = inner.append(&end.1, Durability::Synced);
        let seal = hash.as_ref().map(|hash| RunSeal {
            sha256: hash.clone(),
            signed: inner.key.as_ref().map(|key| Signature {
                alg: "ed25519",
                public_key: keys::public_hex(&key.verifying_key()),
                signature: keys::sign(key, hash),
            }),
        });
        if let (Some(hash), Some(seal)) = (hash, seal) {
            // The seal carries the run.end's time: every byte of it is then
            // fixed by what precedes it.
            let (_, line) = inner
                .next(
                    RunSeal::KIND,
                    Source::Host,
                    object(records::fields(&seal)),
                    ts,
                )
                .map_err(Error::Encode)?;
            inner.append(&line, Durability::Synced);
            if inner.failed.is_none() {
                inner.finished = true;
                return Ok(Finished {
                    records: inner.next_seq,
                    run_end_hash: hash,
                });
            }
        }
        Err(Error::Write(
            inner
                .failed
                .clone()
                .unwrap_or_else(|| "the log was already finished".into()),
        ))
    }
}

/// Where the audit log goes when `--audit` is not given:
/// `$XDG_STATE_HOME/airlock/audit` (if set and absolute), else
/// `$HOME/.local/state/airlock/audit`.
pub fn default_dir() -> Result<PathBuf, Error> {
    let xdg = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = match xdg {
        Some(dir) => dir,
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .ok_or(Error::NoStateDir)?
            .join(".local/state"),
    };
    Ok(base.join("airlock").join("audit"))
}

/// `<dir>/<UTC timestamp>-<run id>.jsonl`, creating `dir` (mode 0700) if
/// needed.
pub fn default_path(dir: &Path, now_micros: i64, run_id: &str) -> Result<PathBuf, Error> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Create {
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(dir.join(format!("{}-{run_id}.jsonl", time::compact(now_micros))))
}

/// A memory sink for tests: what was written, shared.
#[cfg(test)]
#[derive(Debug, Clone, Default)]
pub struct Memory(pub Arc<Mutex<Vec<u8>>>);

#[cfg(test)]
impl Memory {
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// The fields of the records of `kind`, in order.
    pub fn fields_of(&self, kind: &str) -> Vec<serde_json::Value> {
        String::from_utf8(self.bytes())
            .expect("utf-8")
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
            .filter(|r| r["kind"] == kind)
            .map(|r| r["fields"].clone())
            .collect()
    }
}

#[cfg(test)]
impl Write for Memory {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl Sink for Memory {
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl AuditLog {
    /// A log in memory, and a handle on its bytes.
    pub fn memory(limits: Limits, key: Option<SigningKey>) -> (AuditLog, Memory) {
        let memory = Memory::default();
        (AuditLog::new(Box::new(memory.clone()), limits, key), memory)
    }
}

/// The sha256 (hex) and size of everything in `file`, read from its start
/// (positioned reads: the descriptor's offset is not used).
fn digest_of(file: &File) -> io::Result<(String, u64)> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok((hex(&hasher.finalize()), at))
}

/// Copies the log airlock wrote (through its own descriptor) to a new file
/// beside its path: `PATH.airlock-kept`, or `PATH.airlock-kept-N`.
fn keep_copy(place: &Place) -> io::Result<PathBuf> {
    use std::os::unix::fs::FileExt;
    let mut name = place.path.clone().into_os_string();
    name.push(".airlock-kept");
    let base = PathBuf::from(name);
    for n in 0..100 {
        let path = if n == 0 {
            base.clone()
        } else {
            PathBuf::from(format!("{}-{n}", base.display()))
        };
        let mut out = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        loop {
            let n = place.reader.read_at(&mut buf, at)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            at += n as u64;
        }
        out.sync_all()?;
        return Ok(path);
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free name for a copy",
    ))
}

#[cfg(test)]
pub const TEST_LIMITS: Limits = Limits {
    max_guest_records: 1000,
    max_guest_bytes: 1 << 20,
};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines(memory: &Memory) -> Vec<Record> {
        memory
            .bytes()
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("record"))
            .collect()
    }

    #[test]
    fn a_log_replaced_during_the_run_is_caught_and_kept() {
        let dir = crate::paths::TestDir::new("audit-place");
        let path = dir.path().join("audit.jsonl");
        // Intact: the path's file is ours, and its digest is given.
        let log = AuditLog::create(&path, TEST_LIMITS, None).expect("create");
        log.host(kind::RUN_START, json!({"a": 1}), Durability::Synced);
        log.finish(json!({"how": "exited"})).expect("finish");
        let placed = log.check_place().expect("a place").expect("intact");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(placed.bytes, bytes.len() as u64);
        assert_eq!(placed.sha256, sha256_hex(&bytes));
        std::fs::remove_file(&path).expect("rm");

        // A forgery renamed over the live log (as a result named like it
        // would be): airlock says so, and keeps what it wrote.
        let log = AuditLog::create(&path, TEST_LIMITS, None).expect("create");
        log.host(kind::RUN_START, json!({"a": 1}), Durability::Synced);
        let forged = dir.path().join("forged");
        std::fs::write(&forged, b"{\"forged\": true}\n").expect("write");
        std::fs::rename(&forged, &path).expect("rename");
        log.finish(json!({"how": "exited"})).expect("finish");
        let err = log.check_place().expect("a place").expect_err("replaced");
        let Error::Replaced { kept, .. } = &err else {
            panic!("{err}")
        };
        let kept_bytes = std::fs::read(kept).expect("kept copy");
        assert!(kept_bytes.starts_with(b"{"));
        assert!(String::from_utf8_lossy(&kept_bytes).contains("run.seal"));
        assert_eq!(std::fs::read(&path).expect("read"), b"{\"forged\": true}\n");
        assert!(err.to_string().contains("replaced or removed"), "{err}");
        // Removed altogether: the same.
        std::fs::remove_file(&path).expect("rm");
        assert!(matches!(
            log.check_place().expect("a place"),
            Err(Error::Replaced { .. })
        ));
    }

    #[test]
    fn the_chain_links_each_record_to_the_line_before() {
        let (log, memory) = AuditLog::memory(TEST_LIMITS, None);
        log.host(kind::RUN_START, json!({"a": 1}), Durability::Synced);
        log.guest_event("exec", vec![("pid".into(), "7".into())]);
        log.guest_claim("command.exit", json!({"exited": 0}), Durability::Buffered);
        let done = log.finish(json!({"how": "exited"})).expect("finish");
        assert_eq!(done.records, 5);
        let bytes = memory.bytes();
        assert!(bytes.ends_with(b"\n"));
        let raw: Vec<&[u8]> = bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let records = lines(&memory);
        assert_eq!(records.len(), 5);
        assert_eq!(records[0].prev, ZERO_HASH);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.seq, u64::try_from(i).expect("small"));
            if i > 0 {
                assert_eq!(r.prev, sha256_hex(raw[i - 1]));
            }
            // The line is exactly the canonical serialization.
            assert_eq!(r.to_line().expect("json"), raw[i]);
        }
        let kinds: Vec<(&str, Source)> = records
            .iter()
            .map(|r| (r.kind.as_str(), r.source))
            .collect();
        assert_eq!(
            kinds,
            [
                ("run.start", Source::Host),
                ("exec", Source::Guest),
                ("command.exit", Source::Guest),
                ("run.end", Source::Host),
                ("run.seal", Source::Host),
            ]
        );
        assert_eq!(records[1].fields["pid"], "7");
        assert_eq!(records[3].fields["guest_records"]["written"], 1);
        assert_eq!(records[4].fields["sha256"], done.run_end_hash);
        assert_eq!(records[4].ts, records[3].ts);
        assert_eq!(done.run_end_hash, sha256_hex(raw[3]));
        // Nothing after the end.
        log.host("late", json!({}), Durability::Synced);
        assert_eq!(lines(&memory).len(), 5);
        assert!(log.finish(json!({})).is_err());
    }

    #[test]
    fn guest_records_stop_at_the_caps_and_one_overflow_record_says_so() {
        let limits = Limits {
            max_guest_records: 10,
            max_guest_bytes: 1 << 20,
        };
        let (log, memory) = AuditLog::memory(limits, None);
        log.host(kind::RUN_START, json!({}), Durability::Synced);
        for i in 0..1000 {
            log.guest_event("exec", vec![("pid".into(), i.to_string())]);
        }
        log.finish(json!({})).expect("finish");
        let records = lines(&memory);
        let guest = records.iter().filter(|r| r.source == Source::Guest).count();
        assert_eq!(guest, 10);
        let overflow: Vec<_> = records
            .iter()
            .filter(|r| r.kind == kind::AUDIT_OVERFLOW)
            .collect();
        assert_eq!(overflow.len(), 1);
        assert_eq!(overflow[0].source, Source::Host);
        assert_eq!(overflow[0].fields["dropped_records"], 990);
        assert_eq!(records.len(), 1 + 10 + 1 + 2);

        // The byte cap: no guest line beyond it, even if the count allows.
        let limits = Limits {
            max_guest_records: 1000,
            max_guest_bytes: 1000,
        };
        let (log, memory) = AuditLog::memory(limits, None);
        for _ in 0..100 {
            log.guest_event("exec", vec![("argv".into(), "x".repeat(300))]);
        }
        let counts = log.guest_counts();
        assert!(counts.written_bytes <= 1000, "{counts:?}");
        assert_eq!(counts.written + counts.dropped, 100);
        let guest_bytes: usize = memory.bytes().len();
        assert!(guest_bytes <= 1000);
        // After the first drop nothing more gets in, even a small event.
        log.guest_event("x", vec![]);
        assert_eq!(log.guest_counts().written, counts.written);
    }

    #[test]
    fn a_signed_log_carries_the_signature_in_its_seal() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let (log, memory) = AuditLog::memory(TEST_LIMITS, Some(key.clone()));
        log.host(kind::RUN_START, json!({}), Durability::Synced);
        let done = log.finish(json!({})).expect("finish");
        let records = lines(&memory);
        let seal = &records[2].fields;
        assert_eq!(seal["alg"], "ed25519");
        assert_eq!(seal["public_key"], keys::public_hex(&key.verifying_key()));
        let sig = seal["signature"].as_str().expect("signature");
        assert!(keys::verify(&key.verifying_key(), &done.run_end_hash, sig));
    }

    /// A sink that fails after `ok` writes.
    struct Failing {
        ok: usize,
    }
    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err(io::Error::other("disk full"));
            }
            self.ok -= 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl Sink for Failing {
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_stops_the_log_and_is_reported() {
        let log = AuditLog::new(Box::new(Failing { ok: 1 }), TEST_LIMITS, None);
        log.host(kind::RUN_START, json!({}), Durability::Synced);
        assert_eq!(log.failure(), None);
        log.host("vm.start", json!({}), Durability::Synced);
        assert_eq!(log.failure().as_deref(), Some("disk full"));
        let err = log.finish(json!({})).expect_err("failed");
        assert!(err.to_string().contains("disk full"), "{err}");
    }

    #[test]
    fn files_are_new_private_and_appended() {
        let dir = crate::paths::TestDir::new("auditfile");
        let path = dir.path().join("a.jsonl");
        let log = AuditLog::create(&path, TEST_LIMITS, None).expect("create");
        log.host(kind::RUN_START, json!({}), Durability::Synced);
        log.finish(json!({})).expect("finish");
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read(&path)
                .expect("read")
                .split(|&b| b == b'\n')
                .count(),
            4
        );
        // Never an existing file.
        assert!(matches!(
            AuditLog::create(&path, TEST_LIMITS, None),
            Err(Error::Create { .. })
        ));
    }

    #[test]
    fn default_paths() {
        let dir = crate::paths::TestDir::new("auditdir");
        let audit = dir.path().join("state/airlock/audit");
        let path = default_path(&audit, 1_748_781_296_123_456, "00ff").expect("path");
        assert_eq!(path, audit.join("20250601T123456Z-00ff.jsonl"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&audit)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
