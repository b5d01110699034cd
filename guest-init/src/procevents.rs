//! What the guest tells the host's audit log: the command's start and end,
//! and every exec inside the VM, from the kernel's process events connector
//! (`CONFIG_PROC_EVENTS`: netlink `NETLINK_CONNECTOR`, group `CN_IDX_PROC`).
//!
//! [`Socket`] subscribes to the events (`PROC_CN_MCAST_LISTEN`; needs
//! `CAP_NET_ADMIN`, which PID 1 has). [`Recorder`] turns them into
//! `AuditEvent` messages: `exec` (pid, argv from `/proc/PID/cmdline`, comm;
//! best effort, as the process may be gone by the time we look) and `exit`
//! (only for processes whose exec was reported). At most
//! [`MAX_EVENTS_PER_SECOND`] go out in each second; the rest are counted and
//! reported in an `exec.dropped` event at most once a second and at the end,
//! with the kernel's own overruns (`ENOBUFS`: the socket buffer filled up).
//!
//! Everything here is a claim the host cannot check: the host records it as
//! `source: guest` and caps how much of it it writes.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use airlock_protocol::limits::MAX_AUDIT_VALUE;
use airlock_protocol::{ExitStatus, Message};
use libc::{c_int, pid_t};

/// The connector's index and value for process events
/// (`linux/connector.h`).
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
/// `enum proc_cn_mcast_op` (`linux/cn_proc.h`).
const PROC_CN_MCAST_LISTEN: u32 = 1;
/// `enum what` values of `struct proc_event`.
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// `NLMSG_DONE`: the type of a single-part netlink message.
const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr`: len u32, type u16, flags u16, seq u32, pid u32.
const NLMSG_HDRLEN: usize = 16;
/// `struct cn_msg`: id {idx u32, val u32}, seq u32, ack u32, len u16, flags u16.
const CN_MSG_LEN: usize = 20;
/// `struct proc_event` up to its `event_data`: what u32, cpu u32,
/// timestamp_ns u64.
const PROC_EVENT_HEAD: usize = 16;

/// Most exec/exit events sent to the host in one second.
pub const MAX_EVENTS_PER_SECOND: u32 = 200;
/// Most datagrams read per wake-up, so the command's output is not starved.
const RECV_BUDGET: usize = 64;
/// Most pids remembered for their `exit` event.
const MAX_TRACKED: usize = 4096;
/// The socket's receive buffer we ask for.
const RECV_BUFFER: c_int = 1 << 20;
/// Most bytes of `/proc/PID/cmdline` read.
const MAX_CMDLINE: u64 = 8 * 1024;
/// How often a count of dropped events goes out, at most.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(1);

/// A `sockaddr_nl` for `pid` and `groups`.
fn sockaddr_nl(pid: u32, groups: u32) -> io::Result<libc::sockaddr_nl> {
    // SAFETY: all-zero is a valid sockaddr_nl (integers only); the fields
    // that matter are set below.
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::sa_family_t::try_from(libc::AF_NETLINK)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    addr.nl_pid = pid;
    addr.nl_groups = groups;
    Ok(addr)
}

fn sockaddr_nl_len() -> io::Result<libc::socklen_t> {
    libc::socklen_t::try_from(mem::size_of::<libc::sockaddr_nl>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// The subscription request: a netlink header, a connector header, the op.
fn listen_request() -> Vec<u8> {
    let total = NLMSG_HDRLEN + CN_MSG_LEN + 4;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&u32::try_from(total).unwrap_or(u32::MAX).to_ne_bytes());
    m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&std::process::id().to_ne_bytes());
    m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // ack
    m.extend_from_slice(&4u16.to_ne_bytes()); // len of the data
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    m
}

/// A netlink socket subscribed to process events (non-blocking,
/// close-on-exec: the command never inherits it).
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    /// Opens, binds to the process events group and subscribes.
    pub fn open() -> io::Result<Socket> {
        // SAFETY: socket(2) takes no pointers; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor socket(2) just returned; nothing
        // else owns it, so `OwnedFd` may close it once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = RECV_BUFFER;
        let len = libc::socklen_t::try_from(mem::size_of::<c_int>())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `size` is a live c_int and `len` its size; setsockopt only
        // reads it during the call. Best effort: a smaller buffer only means
        // more overruns, which are counted.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const size).cast::<libc::c_void>(),
                len,
            )
        };
        let local = sockaddr_nl(0, CN_IDX_PROC)?;
        // SAFETY: `local` is an initialised sockaddr_nl living across the
        // call and the length is its size; bind(2) keeps no pointer.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const local).cast::<libc::sockaddr>(),
                sockaddr_nl_len()?,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let kernel = sockaddr_nl(0, 0)?;
        let request = listen_request();
        // SAFETY: `request` and `kernel` are live and initialised for the
        // whole call, with their exact lengths; sendto(2) only reads them.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                request.as_ptr().cast::<libc::c_void>(),
                request.len(),
                0,
                (&raw const kernel).cast::<libc::sockaddr>(),
                sockaddr_nl_len()?,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket { fd })
    }

    /// One datagram from the kernel into `buf`: `Ok(None)` when there is
    /// none. Datagrams from anyone but the kernel are skipped.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            let mut from = sockaddr_nl(0, 0)?;
            let mut from_len = sockaddr_nl_len()?;
            // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes,
            // `from`/`from_len` a live sockaddr_nl and its size; the kernel
            // writes only inside them during the call.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut from).cast::<libc::sockaddr>(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                return match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(err),
                };
            }
            if from.nl_pid != 0 {
                continue;
            }
            return Ok(usize::try_from(n).ok());
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// One process event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// `pid` (thread) of process `tgid` called exec.
    Exec { pid: pid_t, tgid: pid_t },
    /// Thread `pid` of process `tgid` ended with this raw wait status.
    Exit {
        pid: pid_t,
        tgid: pid_t,
        status: u32,
    },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The exec and exit events in one datagram (other events and anything
/// malformed are skipped). Every read is bounds-checked.
pub fn parse(datagram: &[u8]) -> Vec<ProcEvent> {
    let mut events = Vec::new();
    let mut rest = datagram;
    while let Some(len) = u32_at(rest, 0).and_then(|l| usize::try_from(l).ok()) {
        if len < NLMSG_HDRLEN || len > rest.len() {
            break;
        }
        let msg = rest.get(..len).unwrap_or_default();
        if let Some(event) = parse_one(msg) {
            events.push(event);
        }
        // NLMSG_ALIGN: messages start on 4-byte boundaries.
        let next = len.saturating_add(3) & !3;
        rest = rest.get(next..).unwrap_or_default();
    }
    events
}

fn parse_one(msg: &[u8]) -> Option<ProcEvent> {
    let cn = msg.get(NLMSG_HDRLEN..)?;
    if u32_at(cn, 0)? != CN_IDX_PROC || u32_at(cn, 4)? != CN_VAL_PROC {
        return None;
    }
    let data_len = usize::from(u16_at(cn, 16)?);
    let event = cn.get(CN_MSG_LEN..CN_MSG_LEN.checked_add(data_len)?)?;
    let what = u32_at(event, 0)?;
    let data = event.get(PROC_EVENT_HEAD..)?;
    match what {
        PROC_EVENT_EXEC => Some(ProcEvent::Exec {
            pid: i32_at(data, 0)?,
            tgid: i32_at(data, 4)?,
        }),
        PROC_EVENT_EXIT => Some(ProcEvent::Exit {
            pid: i32_at(data, 0)?,
            tgid: i32_at(data, 4)?,
            status: u32_at(data, 8)?,
        }),
        _ => None,
    }
}

/// A word as a shell would read it back: bare if it is plain, else in
/// single quotes.
fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'.' | b'/' | b':' | b'=' | b'@' | b'%' | b'+' | b',' | b'-'
                )
        });
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `text` cut to at most [`MAX_AUDIT_VALUE`] bytes on a character
/// boundary, and whether it was cut.
fn bounded(mut text: String) -> (String, bool) {
    if text.len() <= MAX_AUDIT_VALUE {
        return (text, false);
    }
    let mut end = MAX_AUDIT_VALUE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    (text, true)
}

/// An argv as one audit value: the words quoted and joined with spaces,
/// bounded; `true` if it was cut.
pub fn argv_value<S: AsRef<str>>(argv: &[S]) -> (String, bool) {
    let words: Vec<String> = argv.iter().map(|a| quote(a.as_ref())).collect();
    bounded(words.join(" "))
}

/// A process's argv from `/proc/PID/cmdline`: the value, and whether it
/// was cut. `None` if it is gone or has none (a zombie, a kernel thread).
fn read_argv(pid: pid_t) -> Option<(String, bool)> {
    let mut raw = Vec::new();
    File::open(format!("/proc/{pid}/cmdline"))
        .ok()?
        .take(MAX_CMDLINE)
        .read_to_end(&mut raw)
        .ok()?;
    if raw.is_empty() {
        return None;
    }
    let cut_raw = u64::try_from(raw.len()).is_ok_and(|n| n >= MAX_CMDLINE);
    let raw = raw.strip_suffix(b"\0").unwrap_or(&raw);
    let words: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let (value, cut) = argv_value(&words);
    Some((value, cut || cut_raw))
}

/// A process's `comm` (the name the kernel keeps, even for a zombie).
fn read_comm(pid: pid_t) -> Option<String> {
    let mut raw = Vec::new();
    File::open(format!("/proc/{pid}/comm"))
        .ok()?
        .take(64)
        .read_to_end(&mut raw)
        .ok()?;
    let text = String::from_utf8_lossy(&raw)
        .trim_end_matches('\n')
        .to_owned();
    (!text.is_empty()).then_some(text)
}

/// A raw wait status as audit fields: `code` or `signal`.
fn status_fields(raw: u32) -> Vec<(String, String)> {
    let raw = c_int::from_ne_bytes(raw.to_ne_bytes());
    if libc::WIFSIGNALED(raw) {
        vec![("signal".into(), libc::WTERMSIG(raw).to_string())]
    } else {
        vec![("code".into(), libc::WEXITSTATUS(raw).to_string())]
    }
}

fn event(kind: &str, fields: Vec<(String, String)>) -> Message {
    Message::AuditEvent {
        kind: kind.to_owned(),
        fields,
    }
}

/// The `process.start` event for the command.
pub fn process_start(pid: pid_t, argv: &[String], cwd: &str) -> Message {
    let (argv, cut) = argv_value(argv);
    let (cwd, _) = bounded(cwd.to_owned());
    let mut fields = vec![
        ("pid".into(), pid.to_string()),
        ("argv".into(), argv),
        ("cwd".into(), cwd),
    ];
    if cut {
        fields.push(("argv_truncated".into(), "true".into()));
    }
    event("process.start", fields)
}

/// The `process.exit` event for the command.
pub fn process_exit(pid: pid_t, status: ExitStatus, timed_out: bool) -> Message {
    let mut fields = vec![("pid".into(), pid.to_string())];
    fields.push(match status {
        ExitStatus::Exited(code) => ("code".into(), code.to_string()),
        ExitStatus::Signaled(signal) => ("signal".into(), signal.to_string()),
    });
    fields.push(("timed_out".into(), timed_out.to_string()));
    event("process.exit", fields)
}

/// At most [`MAX_EVENTS_PER_SECOND`] in each one-second window.
#[derive(Debug)]
struct RateLimit {
    window: Instant,
    used: u32,
}

impl RateLimit {
    fn allow(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.used = 0;
        }
        if self.used < MAX_EVENTS_PER_SECOND {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

/// Turns process events into `AuditEvent`s, within the rate limit.
#[derive(Debug)]
pub struct Recorder {
    limit: RateLimit,
    /// Processes whose exec was reported: their exit will be too.
    execs: HashSet<pid_t>,
    dropped_unreported: u64,
    dropped_total: u64,
    overruns: u64,
    last_report: Instant,
}

impl Recorder {
    pub fn new() -> Recorder {
        let now = Instant::now();
        Recorder {
            limit: RateLimit {
                window: now,
                used: 0,
            },
            execs: HashSet::new(),
            dropped_unreported: 0,
            dropped_total: 0,
            overruns: 0,
            last_report: now,
        }
    }

    /// Reads what `socket` holds (a bounded number of datagrams) and sends
    /// each event that passes the rate limit through `emit`.
    pub fn drain<E>(
        &mut self,
        socket: &Socket,
        mut emit: impl FnMut(Message) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut buf = [0u8; 8192];
        for _ in 0..RECV_BUDGET {
            match socket.recv(&mut buf) {
                Ok(Some(n)) => {
                    for ev in parse(buf.get(..n).unwrap_or_default()) {
                        self.handle(ev, Instant::now(), &mut emit)?;
                    }
                }
                Ok(None) => break,
                // ENOBUFS: the kernel dropped events for want of room. Any
                // other error is counted the same way and ends this round.
                Err(_) => {
                    self.overruns += 1;
                    break;
                }
            }
        }
        if self.dropped_unreported > 0 && self.last_report.elapsed() >= DROP_REPORT_EVERY {
            self.flush(&mut emit)?;
        }
        Ok(())
    }

    /// One event: an `exec` or `exit` message if the limit allows.
    fn handle<E>(
        &mut self,
        ev: ProcEvent,
        now: Instant,
        emit: &mut impl FnMut(Message) -> Result<(), E>,
    ) -> Result<(), E> {
        let message = match ev {
            ProcEvent::Exec { pid, tgid } => {
                if !self.limit.allow(now) {
                    self.dropped_unreported += 1;
                    return Ok(());
                }
                let mut fields = vec![
                    ("pid".into(), tgid.to_string()),
                    ("tid".into(), pid.to_string()),
                ];
                match read_argv(tgid) {
                    Some((argv, cut)) => {
                        fields.push(("argv".into(), argv));
                        if cut {
                            fields.push(("argv_truncated".into(), "true".into()));
                        }
                    }
                    None => fields.push(("argv_unavailable".into(), "true".into())),
                }
                if let Some(comm) = read_comm(tgid) {
                    fields.push(("comm".into(), comm));
                }
                if self.execs.len() < MAX_TRACKED {
                    self.execs.insert(tgid);
                }
                event("exec", fields)
            }
            ProcEvent::Exit { pid, tgid, status } => {
                // Threads end too; only a process's end, and only of one
                // whose exec was reported.
                if pid != tgid || !self.execs.remove(&tgid) {
                    return Ok(());
                }
                if !self.limit.allow(now) {
                    self.dropped_unreported += 1;
                    return Ok(());
                }
                let mut fields = vec![("pid".into(), tgid.to_string())];
                fields.extend(status_fields(status));
                event("exit", fields)
            }
        };
        emit(message)
    }

    /// Sends the count of events dropped since the last report, if any.
    pub fn flush<E>(&mut self, mut emit: impl FnMut(Message) -> Result<(), E>) -> Result<(), E> {
        if self.dropped_unreported == 0 && self.overruns == 0 {
            return Ok(());
        }
        self.dropped_total += self.dropped_unreported;
        let message = event(
            "exec.dropped",
            vec![
                ("dropped".into(), self.dropped_unreported.to_string()),
                ("dropped_total".into(), self.dropped_total.to_string()),
                ("kernel_overruns".into(), self.overruns.to_string()),
                ("max_per_second".into(), MAX_EVENTS_PER_SECOND.to_string()),
            ],
        );
        self.dropped_unreported = 0;
        self.overruns = 0;
        self.last_report = Instant::now();
        emit(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    /// A datagram as the kernel sends it for one event.
    fn datagram(what: u32, data: &[u8]) -> Vec<u8> {
        let mut event = what.to_ne_bytes().to_vec();
        event.extend(0u32.to_ne_bytes()); // cpu
        event.extend(0u64.to_ne_bytes()); // timestamp
        event.extend_from_slice(data);
        let total = NLMSG_HDRLEN + CN_MSG_LEN + event.len();
        let mut m = u32::try_from(total).expect("small").to_ne_bytes().to_vec();
        m.extend(NLMSG_DONE.to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend(CN_IDX_PROC.to_ne_bytes());
        m.extend(CN_VAL_PROC.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend(u16::try_from(event.len()).expect("small").to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(event);
        m
    }

    fn ints(values: &[i32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_ne_bytes()).collect()
    }

    #[test]
    fn parses_exec_and_exit_events() {
        let exec = datagram(PROC_EVENT_EXEC, &ints(&[42, 42]));
        assert_eq!(parse(&exec), [ProcEvent::Exec { pid: 42, tgid: 42 }]);
        let exit = datagram(PROC_EVENT_EXIT, &ints(&[43, 42, 9, 17, 1, 1]));
        assert_eq!(
            parse(&exit),
            [ProcEvent::Exit {
                pid: 43,
                tgid: 42,
                status: 9
            }]
        );
        // Two messages in one datagram; a fork event is skipped.
        let mut both = datagram(1, &ints(&[1, 1, 2, 2]));
        both.extend(exec.clone());
        assert_eq!(parse(&both), [ProcEvent::Exec { pid: 42, tgid: 42 }]);
        // The listen request's format is what the parser reads.
        assert_eq!(listen_request().len(), 40);
    }

    #[test]
    fn malformed_datagrams_yield_nothing() {
        let exec = datagram(PROC_EVENT_EXEC, &ints(&[42, 42]));
        for cut in 0..exec.len() {
            assert!(parse(&exec[..cut]).is_empty(), "cut {cut}");
        }
        // A length beyond the datagram, or below a header.
        let mut bad = exec.clone();
        bad[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse(&bad).is_empty());
        bad[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse(&bad).is_empty());
        // Another connector.
        let mut other = exec.clone();
        other[NLMSG_HDRLEN..NLMSG_HDRLEN + 4].copy_from_slice(&7u32.to_ne_bytes());
        assert!(parse(&other).is_empty());
        // A data length beyond the message.
        let mut long = exec;
        long[NLMSG_HDRLEN + 16..NLMSG_HDRLEN + 18].copy_from_slice(&u16::MAX.to_ne_bytes());
        assert!(parse(&long).is_empty());
        assert!(parse(&[]).is_empty());
    }

    #[test]
    fn argv_values_quote_and_bound() {
        assert_eq!(argv_value(&["ls", "/"]), ("ls /".into(), false));
        assert_eq!(
            argv_value(&["sh", "-c", "echo hi; it's"]),
            (r"sh -c 'echo hi; it'\''s'".into(), false)
        );
        assert_eq!(argv_value(&[""]), ("''".into(), false));
        let (long, cut) = argv_value(&["é".repeat(MAX_AUDIT_VALUE)]);
        assert!(cut);
        assert!(long.len() <= MAX_AUDIT_VALUE);
    }

    #[test]
    fn status_fields_read_like_wait() {
        assert_eq!(status_fields(3 << 8), [("code".into(), "3".into())]);
        assert_eq!(status_fields(9), [("signal".into(), "9".into())]);
    }

    #[test]
    fn the_rate_limit_drops_and_counts() {
        let mut r = Recorder::new();
        let mut sent = Vec::new();
        let now = Instant::now();
        let mut emit = |m: Message| -> Result<(), Infallible> {
            sent.push(m);
            Ok(())
        };
        // Pids that do not exist: the argv is unavailable, the event still goes.
        for i in 0..500 {
            r.handle(
                ProcEvent::Exec {
                    pid: -1 - i,
                    tgid: -1 - i,
                },
                now,
                &mut emit,
            )
            .expect("infallible");
        }
        assert_eq!(r.dropped_unreported, 300);
        // An exit of a reported exec is sent in the next window; one of a
        // process never seen is not.
        let later = now + Duration::from_secs(1);
        for (pid, tgid) in [(-1, -1), (-999_999, -999_999), (-2, -3)] {
            r.handle(
                ProcEvent::Exit {
                    pid,
                    tgid,
                    status: 0,
                },
                later,
                &mut emit,
            )
            .expect("infallible");
        }
        r.flush(&mut emit).expect("infallible");
        assert_eq!(sent.len(), 202);
        let Message::AuditEvent { kind, fields } = &sent[200] else {
            panic!("{:?}", sent[200])
        };
        assert_eq!(kind, "exit");
        assert_eq!(fields[0], ("pid".into(), "-1".into()));
        let Message::AuditEvent { kind, fields } = &sent[201] else {
            panic!("{:?}", sent[201])
        };
        assert_eq!(kind, "exec.dropped");
        assert_eq!(fields[0], ("dropped".into(), "300".into()));
        // Every message is one the protocol accepts.
        for m in &sent {
            airlock_protocol::encode(m).expect("valid AuditEvent");
        }
        let Message::AuditEvent { fields, .. } = &sent[0] else {
            panic!()
        };
        assert!(fields.iter().any(|(n, _)| n == "argv_unavailable"));
    }

    #[test]
    fn command_events_are_valid_messages() {
        let start = process_start(7, &["sh".into(), "-c".into(), "ls /".into()], "/");
        assert_eq!(
            start,
            Message::AuditEvent {
                kind: "process.start".into(),
                fields: vec![
                    ("pid".into(), "7".into()),
                    ("argv".into(), "sh -c 'ls /'".into()),
                    ("cwd".into(), "/".into()),
                ]
            }
        );
        airlock_protocol::encode(&start).expect("valid");
        let exit = process_exit(7, ExitStatus::Signaled(9), true);
        airlock_protocol::encode(&exit).expect("valid");
    }

    /// Through the real connector, where this test may open it (root with
    /// CAP_NET_ADMIN, a kernel with CONFIG_PROC_EVENTS): an exec of ours
    /// shows up with its argv.
    #[test]
    fn the_kernel_reports_an_exec() {
        let socket = match Socket::open() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skipped: cannot subscribe to process events here: {e}");
                return;
            }
        };
        let mut child = std::process::Command::new("sleep")
            .arg("0.5")
            .spawn()
            .expect("spawn sleep");
        let pid = pid_t::try_from(child.id()).expect("pid");
        let mut r = Recorder::new();
        let mut found = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while found.is_none() && Instant::now() < deadline {
            r.drain(&socket, |m| -> Result<(), Infallible> {
                if let Message::AuditEvent { kind, fields } = &m {
                    if kind == "exec" && fields[0].1 == pid.to_string() {
                        found = Some(fields.clone());
                    }
                }
                Ok(())
            })
            .expect("infallible");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait().expect("wait");
        let fields = found.expect("an exec event for our child");
        assert!(
            fields.iter().any(|(n, v)| n == "argv" && v == "sleep 0.5")
                || fields.iter().any(|(n, v)| n == "comm" && v == "sleep"),
            "{fields:?}"
        );
    }
}
