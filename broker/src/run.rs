//! `airlock run`: boot a sandbox, print its console, stop it.
//!
//! Order: validate the arguments ([`RunConfig`]) → resolve and check the
//! kernel and initrd → pick the engine → prepare the console file → spawn
//! the VM → follow the console until the VM ends, the timeout passes or a
//! signal arrives → judge the run ([`verdict`]) → clean up. Everything that
//! can be wrong with the input is found before a VM starts.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_protocol::INIT_READY_LINE;

use crate::cli::{Exit, ImageArgs, RunArgs};
use crate::engine::{self, Available, EngineChoice, ProcessExit, Vm, VmConfig};
use crate::paths::{self, ImagePaths};

/// Guest memory bounds, in MiB.
pub const MEM_MIB_RANGE: std::ops::RangeInclusive<u32> = 64..=65536;
/// vCPU bounds.
pub const CPUS_RANGE: std::ops::RangeInclusive<u32> = 1..=16;
/// The console substring that means the guest kernel died.
const PANIC_MARKER: &str = "Kernel panic";
/// How many console lines a failure report shows.
const TAIL_LINES: usize = 15;
/// A console "line" longer than this is cut (a guest may never send `\n`).
const MAX_LINE: usize = 4096;
/// How often the console file and the VM process are looked at.
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--mem {0} is out of range (use {min} to {max} MiB)", min = MEM_MIB_RANGE.start(), max = MEM_MIB_RANGE.end())]
    Mem(u32),
    #[error("--cpus {0} is out of range (use {min} to {max})", min = CPUS_RANGE.start(), max = CPUS_RANGE.end())]
    Cpus(u32),
    #[error("--timeout must be at least 1 second")]
    Timeout,
    #[error(transparent)]
    Image(#[from] paths::Error),
    #[error(transparent)]
    Engine(#[from] engine::SelectError),
    #[error("cannot create the console log at {}", path.display())]
    ConsoleLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a private run directory in {}", dir.display())]
    RunDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot install the SIGINT/SIGTERM handlers")]
    Signals(#[source] io::Error),
    #[error(transparent)]
    Spawn(#[from] engine::Error),
    #[error("lost track of the VM")]
    Supervise(#[source] io::Error),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::Mem(_)
            | Error::Cpus(_)
            | Error::Timeout
            | Error::Image(_)
            | Error::Engine(_)
            | Error::ConsoleLog { .. } => Exit::Usage,
            Error::RunDir { .. } | Error::Signals(_) | Error::Spawn(_) | Error::Supervise(_) => {
                Exit::SandboxFailed
            }
        }
    }
}

/// Where the console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// A private temporary directory, removed at the end unless `keep`.
    Temp { keep: bool },
    /// A file the user named; kept.
    File(PathBuf),
}

/// The validated `run` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    pub engine: EngineChoice,
    pub image: ImageArgs,
    pub mem_mib: u32,
    pub cpus: u8,
    pub timeout: Duration,
    pub console: ConsoleTarget,
}

impl TryFrom<RunArgs> for RunConfig {
    type Error = Error;

    fn try_from(args: RunArgs) -> Result<RunConfig, Error> {
        if !MEM_MIB_RANGE.contains(&args.mem) {
            return Err(Error::Mem(args.mem));
        }
        let cpus = Some(args.cpus)
            .filter(|c| CPUS_RANGE.contains(c))
            .and_then(|c| u8::try_from(c).ok())
            .ok_or(Error::Cpus(args.cpus))?;
        if args.timeout == 0 {
            return Err(Error::Timeout);
        }
        Ok(RunConfig {
            engine: args.engine,
            image: args.image,
            mem_mib: args.mem,
            cpus,
            timeout: Duration::from_secs(args.timeout),
            console: match args.console_log {
                Some(path) => ConsoleTarget::File(std::path::absolute(&path).unwrap_or(path)),
                None => ConsoleTarget::Temp {
                    keep: args.keep_console,
                },
            },
        })
    }
}

/// `airlock run`.
pub fn main(args: RunArgs) -> Exit {
    match run(args) {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("airlock: error: {}", crate::report(&e));
            e.exit()
        }
    }
}

fn run(args: RunArgs) -> Result<Exit, Error> {
    let config = RunConfig::try_from(args)?;
    let image = ImagePaths::from_env(config.image.kernel.clone(), config.image.initrd.clone());
    paths::check_kernel(&image.kernel)?;
    paths::check_initrd(&image.initrd)?;
    let selection = engine::select(config.engine, Available::gather())?;
    if let Some(warning) = &selection.warning {
        eprintln!("airlock: warning: {warning}");
    }
    eprintln!(
        "airlock: engine: {} ({})",
        selection.engine.name(),
        selection.reason
    );

    let console = ConsoleFile::create(&config.console)?;
    let vm_config = VmConfig {
        kernel: image.kernel,
        initrd: image.initrd,
        mem_mib: config.mem_mib,
        cpus: config.cpus,
        console_log: console.path.clone(),
        extra_cmdline: Vec::new(),
    };
    let mut follower = Follower::open(&console.path).map_err(|source| Error::ConsoleLog {
        path: console.path.clone(),
        source,
    })?;
    // Installed just before the VM starts: from here on a signal means
    // "stop the VM and clean up", not "die at once".
    let stop = StopSignal::install().map_err(Error::Signals)?;
    let started = Instant::now();
    let mut vm = selection.engine.spawn(&vm_config)?;
    let mut scan = ConsoleScan::default();
    let end = supervise(
        &mut vm,
        &mut follower,
        &mut scan,
        started.checked_add(config.timeout),
        &stop,
    )
    .map_err(Error::Supervise)?;
    drop(vm);

    let exit = match verdict(&end, &scan) {
        Verdict::Success => {
            eprintln!(
                "airlock: sandbox finished in {:.2} s",
                started.elapsed().as_secs_f64()
            );
            Exit::Success
        }
        Verdict::Failed(reason) => {
            eprintln!(
                "airlock: error: the sandbox failed: {reason}; {}",
                scan.describe_tail()
            );
            if matches!(config.console, ConsoleTarget::Temp { keep: false }) {
                eprintln!("airlock: (pass --keep-console to keep the whole console log)");
            }
            Exit::SandboxFailed
        }
        Verdict::TimedOut => {
            eprintln!(
                "airlock: error: the sandbox did not finish within {} s and was stopped (raise --timeout); {}",
                config.timeout.as_secs(),
                scan.describe_tail()
            );
            Exit::Timeout
        }
        Verdict::Interrupted(signal) => {
            let name = match signal {
                libc::SIGINT => "SIGINT",
                libc::SIGTERM => "SIGTERM",
                libc::SIGHUP => "SIGHUP",
                _ => "a signal",
            };
            eprintln!("airlock: interrupted by {name}; the sandbox was stopped");
            Exit::Interrupted(signal)
        }
    };
    if let Some(kept) = console.finish() {
        eprintln!("airlock: console log: {}", kept.display());
    }
    Ok(exit)
}

/// How the supervision of a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Exited(ProcessExit),
    TimedOut,
    Interrupted(i32),
}

/// What the run amounts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Failed(String),
    TimedOut,
    Interrupted(i32),
}

/// Success only if the VM exited cleanly, the init said it was ready, and
/// the kernel did not panic (with `panic=-1` a panic is a reboot, which the
/// engines report as a clean exit).
pub fn verdict(end: &End, scan: &ConsoleScan) -> Verdict {
    let exit = match *end {
        End::TimedOut => return Verdict::TimedOut,
        End::Interrupted(signal) => return Verdict::Interrupted(signal),
        End::Exited(exit) => exit,
    };
    let stage = if scan.ready {
        "after airlock-init reported ready"
    } else {
        "before airlock-init reported ready"
    };
    if scan.panic {
        Verdict::Failed(format!("the guest kernel panicked {stage}"))
    } else if !exit.success() {
        Verdict::Failed(format!("the VM process ended with {exit} {stage}"))
    } else if !scan.ready {
        Verdict::Failed(format!(
            "the VM stopped without airlock-init reporting ready (no \"{INIT_READY_LINE}\" line)"
        ))
    } else {
        Verdict::Success
    }
}

/// What the console said so far.
#[derive(Debug, Default)]
pub struct ConsoleScan {
    pub ready: bool,
    pub panic: bool,
    tail: VecDeque<String>,
}

impl ConsoleScan {
    pub fn line(&mut self, line: &str) {
        self.ready |= line.contains(INIT_READY_LINE);
        self.panic |= line.contains(PANIC_MARKER);
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_owned());
    }

    /// The last console lines, for a failure report.
    pub fn describe_tail(&self) -> String {
        if self.tail.is_empty() {
            return "the console was empty".into();
        }
        let mut text = String::from("last console lines:");
        for line in &self.tail {
            text.push_str("\n    ");
            text.push_str(line);
        }
        text
    }
}

/// Makes a console line safe to print on a terminal: the guest is
/// untrusted, so control characters (escape sequences) and bidirectional
/// overrides are shown escaped. Drops the `\r` of serial `\r\n` endings.
pub fn sanitize(raw: &[u8]) -> String {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if (c.is_control() && c != '\t') || bidi {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Reads a growing console file and cuts it into lines.
#[derive(Debug)]
pub struct Follower {
    file: File,
    partial: Vec<u8>,
}

impl Follower {
    pub fn open(path: &Path) -> io::Result<Follower> {
        Ok(Follower {
            file: File::open(path)?,
            partial: Vec::new(),
        })
    }

    /// The complete lines written since the last call.
    pub fn poll(&mut self) -> io::Result<Vec<String>> {
        let mut lines = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for &byte in &buf[..n] {
                if byte == b'\n' {
                    lines.push(sanitize(&self.partial));
                    self.partial.clear();
                } else {
                    self.partial.push(byte);
                    if self.partial.len() >= MAX_LINE {
                        lines.push(sanitize(&self.partial));
                        self.partial.clear();
                    }
                }
            }
        }
        Ok(lines)
    }

    /// The rest: new complete lines and an unterminated last line.
    pub fn finish(&mut self) -> io::Result<Vec<String>> {
        let mut lines = self.poll()?;
        if !self.partial.is_empty() {
            lines.push(sanitize(&self.partial));
            self.partial.clear();
        }
        Ok(lines)
    }
}

/// The console file of one run, and the private directory holding it.
#[derive(Debug)]
struct ConsoleFile {
    path: PathBuf,
    /// The private run directory to remove at the end, if any.
    run_dir: Option<PathBuf>,
    keep: bool,
}

impl ConsoleFile {
    /// Creates (or truncates) the console file, so that a bad path is found
    /// before the VM starts and no stale content is followed.
    fn create(target: &ConsoleTarget) -> Result<ConsoleFile, Error> {
        let console = match target {
            ConsoleTarget::File(path) => ConsoleFile {
                path: path.clone(),
                run_dir: None,
                keep: true,
            },
            ConsoleTarget::Temp { keep } => {
                let dir = make_private_dir(&std::env::temp_dir())?;
                ConsoleFile {
                    path: dir.join("console.log"),
                    run_dir: Some(dir),
                    keep: *keep,
                }
            }
        };
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&console.path)
            .map_err(|source| Error::ConsoleLog {
                path: console.path.clone(),
                source,
            })?;
        Ok(console)
    }

    /// Removes what is not to be kept; returns the console path if kept.
    fn finish(self) -> Option<PathBuf> {
        self.keep.then(|| self.path.clone())
    }
}

impl Drop for ConsoleFile {
    fn drop(&mut self) {
        if let (Some(dir), false) = (&self.run_dir, self.keep) {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Creates a fresh directory only we can read, under `parent`.
fn make_private_dir(parent: &Path) -> Result<PathBuf, Error> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    for attempt in 0..16u32 {
        let dir = parent.join(format!(
            "airlock-run.{}.{:08x}",
            std::process::id(),
            stamp.wrapping_add(attempt.wrapping_mul(0x9e37_79b9))
        ));
        // create (not create_all): fails if the name exists, so we never
        // reuse a directory someone else prepared.
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
            Err(source) => {
                return Err(Error::RunDir {
                    dir: parent.to_path_buf(),
                    source,
                })
            }
        }
    }
    Err(Error::RunDir {
        dir: parent.to_path_buf(),
        source: last,
    })
}

/// Set by SIGINT, SIGTERM or SIGHUP to the signal's number.
#[derive(Debug)]
struct StopSignal(Arc<AtomicUsize>);

impl StopSignal {
    fn install() -> io::Result<StopSignal> {
        let flag = Arc::new(AtomicUsize::new(0));
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let value = usize::try_from(signal).map_err(io::Error::other)?;
            signal_hook::flag::register_usize(signal, Arc::clone(&flag), value)?;
        }
        Ok(StopSignal(flag))
    }

    fn received(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            signal => i32::try_from(signal).ok(),
        }
    }
}

/// Prints the console as it arrives until the VM ends, the deadline
/// passes, or a signal arrives; in the last two cases kills the VM.
fn supervise(
    vm: &mut Vm,
    follower: &mut Follower,
    scan: &mut ConsoleScan,
    deadline: Option<Instant>,
    stop: &StopSignal,
) -> io::Result<End> {
    let mut emit = |lines: Vec<String>| {
        let mut out = io::stdout().lock();
        for line in lines {
            // A closed stdout must not leave the VM unsupervised: ignore it.
            let _ = writeln!(out, "{line}");
            scan.line(&line);
        }
        let _ = out.flush();
    };
    loop {
        emit(follower.poll()?);
        if let Some(signal) = stop.received() {
            vm.kill()?;
            emit(follower.finish()?);
            return Ok(End::Interrupted(signal));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            vm.kill()?;
            emit(follower.finish()?);
            return Ok(End::TimedOut);
        }
        if let Some(exit) = vm.wait_timeout(POLL)? {
            emit(follower.finish()?);
            return Ok(End::Exited(exit));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::TestDir;

    fn args() -> RunArgs {
        RunArgs {
            engine: EngineChoice::Auto,
            image: ImageArgs {
                kernel: None,
                initrd: None,
            },
            mem: 256,
            cpus: 1,
            timeout: 300,
            console_log: None,
            keep_console: false,
        }
    }

    #[test]
    fn valid_args() {
        let config = RunConfig::try_from(args()).expect("valid");
        assert_eq!(config.mem_mib, 256);
        assert_eq!(config.cpus, 1);
        assert_eq!(config.timeout, Duration::from_secs(300));
        assert_eq!(config.console, ConsoleTarget::Temp { keep: false });
        for (mem, cpus) in [(64, 16), (65536, 1)] {
            let config = RunConfig::try_from(RunArgs {
                mem,
                cpus,
                ..args()
            })
            .expect("valid");
            assert_eq!((config.mem_mib, u32::from(config.cpus)), (mem, cpus));
        }
        let config = RunConfig::try_from(RunArgs {
            console_log: Some("/tmp/c.log".into()),
            ..args()
        })
        .expect("valid");
        assert_eq!(config.console, ConsoleTarget::File("/tmp/c.log".into()));
    }

    #[test]
    fn invalid_args() {
        for mem in [0, 63, 65537] {
            let err = RunConfig::try_from(RunArgs { mem, ..args() }).expect_err("bad mem");
            assert!(matches!(err, Error::Mem(m) if m == mem));
            assert_eq!(err.exit(), Exit::Usage);
            assert!(err.to_string().contains("64 to 65536 MiB"), "{err}");
        }
        for cpus in [0, 17, 256, 1000] {
            let err = RunConfig::try_from(RunArgs { cpus, ..args() }).expect_err("bad cpus");
            assert!(matches!(err, Error::Cpus(c) if c == cpus));
            assert_eq!(err.exit(), Exit::Usage);
        }
        let err = RunConfig::try_from(RunArgs {
            timeout: 0,
            ..args()
        })
        .expect_err("bad timeout");
        assert_eq!(err.exit(), Exit::Usage);
    }

    fn scan_of(lines: &[&str]) -> ConsoleScan {
        let mut scan = ConsoleScan::default();
        for line in lines {
            scan.line(line);
        }
        scan
    }

    #[test]
    fn success_needs_clean_exit_ready_and_no_panic() {
        let ok = scan_of(&["airlock-init: ready", "airlock-init: powering off"]);
        let clean = End::Exited(ProcessExit::Code(0));
        assert_eq!(verdict(&clean, &ok), Verdict::Success);

        let not_ready = scan_of(&["something else"]);
        assert!(
            matches!(verdict(&clean, &not_ready), Verdict::Failed(r) if r.contains("without airlock-init reporting ready"))
        );

        let panicked = scan_of(&[
            "airlock-init: ready",
            "Kernel panic - not syncing: Attempted to kill init!",
        ]);
        assert!(
            matches!(verdict(&clean, &panicked), Verdict::Failed(r) if r.contains("panicked after"))
        );

        let crashed = End::Exited(ProcessExit::Code(1));
        assert!(
            matches!(verdict(&crashed, &ok), Verdict::Failed(r) if r.contains("exit status 1 after"))
        );
        let killed = End::Exited(ProcessExit::Signal(11));
        assert!(
            matches!(verdict(&killed, &not_ready), Verdict::Failed(r) if r.contains("signal 11 before"))
        );

        assert_eq!(verdict(&End::TimedOut, &ok), Verdict::TimedOut);
        assert_eq!(
            verdict(&End::Interrupted(libc::SIGINT), &ok),
            Verdict::Interrupted(libc::SIGINT)
        );
    }

    #[test]
    fn ready_line_may_share_a_line_with_kernel_output() {
        let scan = scan_of(&["[    1.0] random: crng init done airlock-init: ready"]);
        assert!(scan.ready);
        assert!(!scan.panic);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let mut scan = ConsoleScan::default();
        assert_eq!(scan.describe_tail(), "the console was empty");
        for i in 0..100 {
            scan.line(&format!("line {i}"));
        }
        let tail = scan.describe_tail();
        assert!(tail.starts_with("last console lines:"));
        assert!(tail.contains("line 99"));
        assert!(tail.contains(&format!("line {}", 100 - TAIL_LINES)));
        assert!(!tail.contains(&format!("line {}\n", 99 - TAIL_LINES)));
    }

    #[test]
    fn sanitize_escapes_terminal_controls() {
        assert_eq!(sanitize(b"airlock-init: ready\r"), "airlock-init: ready");
        assert_eq!(sanitize(b"a\tb"), "a\tb");
        assert_eq!(sanitize(b"\x1b[2Jhi"), "\\u{1b}[2Jhi");
        assert_eq!(sanitize("x\u{202e}y".as_bytes()), "x\\u{202e}y");
        assert_eq!(sanitize(b"bad \xff utf8"), "bad \u{fffd} utf8");
        assert_eq!(sanitize("héllo".as_bytes()), "héllo");
    }

    #[test]
    fn follower_cuts_lines_as_they_grow() {
        let dir = TestDir::new("follow");
        let path = dir.path().join("console.log");
        let mut writer = File::create(&path).expect("create");
        let mut follower = Follower::open(&path).expect("open");
        assert!(follower.poll().expect("poll").is_empty());
        writer.write_all(b"first\r\nsec").expect("write");
        assert_eq!(follower.poll().expect("poll"), ["first"]);
        writer.write_all(b"ond\nthird").expect("write");
        assert_eq!(follower.poll().expect("poll"), ["second"]);
        assert_eq!(follower.finish().expect("finish"), ["third"]);
        assert!(follower.finish().expect("finish").is_empty());
    }

    #[test]
    fn follower_bounds_line_length() {
        let dir = TestDir::new("longline");
        let path = dir.path().join("console.log");
        fs::write(&path, vec![b'x'; MAX_LINE * 2 + 10]).expect("write");
        let mut follower = Follower::open(&path).expect("open");
        let lines = follower.finish().expect("finish");
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].len(), MAX_LINE);
        assert_eq!(lines[2].len(), 10);
    }

    #[test]
    fn console_file_in_private_dir_is_removed() {
        let console = ConsoleFile::create(&ConsoleTarget::Temp { keep: false }).expect("create");
        let dir = console.run_dir.clone().expect("temp dir");
        assert!(console.path.is_file());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&dir).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(console.finish(), None);
        assert!(!dir.exists());

        let console = ConsoleFile::create(&ConsoleTarget::Temp { keep: true }).expect("create");
        let dir = console.run_dir.clone().expect("temp dir");
        let kept = console.finish().expect("kept");
        assert!(kept.is_file());
        fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn console_file_named_by_user_is_truncated_and_kept() {
        let dir = TestDir::new("userlog");
        let path = dir.path().join("c.log");
        fs::write(&path, b"stale").expect("write");
        let console = ConsoleFile::create(&ConsoleTarget::File(path.clone())).expect("create");
        assert_eq!(fs::read(&path).expect("read"), b"");
        assert_eq!(console.finish(), Some(path));

        let bad = ConsoleFile::create(&ConsoleTarget::File(dir.path().join("no/such/dir/c.log")))
            .expect_err("bad path");
        assert_eq!(bad.exit(), Exit::Usage);
    }
}
