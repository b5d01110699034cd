//! `boot-clock`: time a VMM from spawn to a console line and to its exit.
//!
//! ```text
//! boot-clock [--line TEXT | --bytes] [--verbose] [--kill-after SECS] [--no-aslr] -- CMD [ARGS...]
//! ```
//!
//! Spawns CMD with stdout and stderr piped (stdin is /dev/null), and measures
//! with the monotonic clock, from just before the spawn:
//!
//! - `line_ms`: until the first stdout line containing TEXT
//!   (default `airlock-init: ready`) has been read;
//! - `exit_ms`: until CMD has exited and been reaped.
//!
//! It also picks up the number in `guest init reached after <ms> ms`
//! from CMD's stderr (airlock-vmm's boot timer), if CMD prints one, and
//! with `--ready TEXT` notes when the first stderr line containing TEXT was
//! read (`ready_ms`, printed before `code`): airlock-vmm's `--timings` line
//! `first vsock packet from the guest` is when a host would see the guest's
//! init connect, the point `airlock` calls ready.
//!
//! Nothing of CMD's output is passed through unless `--verbose` (then stdout
//! and stderr both go to our stderr). It prints one line on stdout:
//!
//! ```text
//! line_ms=<f|-> exit_ms=<f> boot_timer_ms=<f|-> code=<n>
//! ```
//!
//! `code` is CMD's exit status, or 128 + the signal that killed it. Exit
//! status: 0 if CMD exited 0 and the line was seen, 1 otherwise, 2 on a usage
//! error or if CMD could not be started.
//!
//! With `--bytes` (for throughput: `scripts/bench-run`) it looks for no line:
//! it counts CMD's stdout bytes and notes when the first and the last of them
//! were read, and prints
//!
//! ```text
//! exit_ms=<f> bytes=<n> first_byte_ms=<f|-> last_byte_ms=<f|-> boot_timer_ms=<f|-> code=<n>
//! ```
//!
//! exiting 0 if CMD exited 0. `--verbose` then copies only CMD's stderr.
//!
//! `--kill-after SECS` sends CMD `SIGKILL` SECS seconds after the spawn if it
//! is still running (a VMM that keeps running after its line): no `timeout`
//! process between us and CMD whose own start would land on every number.
//!
//! `--no-aslr` starts CMD with address-space randomisation off
//! (`personality(ADDR_NO_RANDOMIZE)`, inherited by what CMD starts). Only for
//! measuring in the nested test bed: L1's TCG translates code per virtual
//! address, so a position-independent program loaded at a new random address
//! has all its code translated anew at every start, a cost hardware does not
//! have (docs/FACTS.md, "Timing in the test bed").

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The read size of `--bytes` mode: twice a default pipe's capacity, so one
/// read can drain a full pipe.
const BYTES_CHUNK: usize = 128 * 1024;

const DEFAULT_LINE: &str = "airlock-init: ready";
const BOOT_TIMER_MARK: &str = "guest init reached after ";

const USAGE: &str = "\
usage: boot-clock [--line TEXT | --bytes] [--ready TEXT] [--verbose] [--kill-after SECS] [--no-aslr] -- CMD [ARGS...]

Runs CMD and prints one line:
  line_ms=<f|-> exit_ms=<f> boot_timer_ms=<f|-> code=<n>
line_ms: ms from spawn to the first stdout line containing TEXT
         (default 'airlock-init: ready'); exit_ms: ms from spawn to CMD's exit;
boot_timer_ms: the <ms> of 'guest init reached after <ms> ms' on CMD's stderr.
With --ready TEXT, ready_ms=<f|-> comes before code: ms from spawn to the
first stderr line containing TEXT.
Exits 0 only if CMD exited 0 and the line was seen.

With --bytes, prints instead:
  exit_ms=<f> bytes=<n> first_byte_ms=<f|-> last_byte_ms=<f|-> boot_timer_ms=<f|-> code=<n>
bytes: how many bytes CMD wrote to stdout; first_byte_ms, last_byte_ms: ms
from spawn until the first and the last of them were read. Exits 0 if CMD
exited 0.

  --line TEXT   the stdout text to wait for
  --bytes       count stdout bytes instead of waiting for a line
  --ready TEXT  also time the first stderr line containing TEXT (ready_ms)
  --verbose     copy CMD's stdout (not with --bytes) and stderr to our stderr
  --kill-after SECS
                SIGKILL CMD if it still runs SECS seconds after the spawn
  --no-aslr     start CMD without address-space randomisation (measuring in
                the nested test bed only: TCG translates a randomised
                program's code anew at every start)
  -h, --help    this help";

/// What boot-clock watches CMD's stdout for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Watch {
    /// The first line containing this text.
    Line(String),
    /// Every byte: count them, time the first and the last.
    Bytes,
}

#[derive(Debug)]
struct Args {
    watch: Watch,
    verbose: bool,
    /// SIGKILL CMD this long after the spawn.
    kill_after: Option<Duration>,
    no_aslr: bool,
    /// Also time the first stderr line containing this text.
    ready: Option<String>,
    cmd: Vec<OsString>,
}

/// Parses our arguments; `Ok(None)` means `--help` was asked for.
fn parse_args(mut it: impl Iterator<Item = OsString>) -> Result<Option<Args>, String> {
    let mut line = None;
    let mut bytes = false;
    let mut verbose = false;
    let mut kill_after = None;
    let mut no_aslr = false;
    let mut ready = None;
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--") => {
                let cmd: Vec<OsString> = it.collect();
                if cmd.is_empty() {
                    return Err("no command given after --".to_owned());
                }
                let watch = match (line, bytes) {
                    (Some(_), true) => {
                        return Err("--line and --bytes exclude each other".to_owned())
                    }
                    (_, true) => Watch::Bytes,
                    (line, false) => Watch::Line(line.unwrap_or_else(|| DEFAULT_LINE.to_owned())),
                };
                return Ok(Some(Args {
                    watch,
                    verbose,
                    kill_after,
                    no_aslr,
                    ready,
                    cmd,
                }));
            }
            Some("-h" | "--help") => return Ok(None),
            Some("--verbose" | "-v") => verbose = true,
            Some("--bytes") => bytes = true,
            Some("--no-aslr") => no_aslr = true,
            Some("--kill-after") => {
                let secs = it
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
                    .ok_or("--kill-after needs SECS, a number of seconds (0 < SECS <= 86400)")?;
                kill_after = Some(Duration::from_secs_f64(secs));
            }
            Some(option @ ("--line" | "--ready")) => {
                let text = it
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .ok_or_else(|| format!("{option} needs a UTF-8 TEXT argument"))?;
                if text.is_empty() {
                    return Err(format!("{option} TEXT must not be empty"));
                }
                if option == "--line" {
                    line = Some(text);
                } else {
                    ready = Some(text);
                }
            }
            _ => {
                return Err(format!(
                    "unexpected argument {arg:?} (the command goes after --)"
                ))
            }
        }
    }
    Err("no command given (expected -- CMD [ARGS...])".to_owned())
}

/// The `<ms>` of `guest init reached after <ms> ms` in `line`, if any.
fn boot_timer_ms(line: &str) -> Option<f64> {
    let rest = &line[line.find(BOOT_TIMER_MARK)? + BOOT_TIMER_MARK.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn millis(start: Instant, at: Instant) -> f64 {
    at.duration_since(start).as_secs_f64() * 1000.0
}

fn fmt_ms(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// Exit code, or 128 + signal number for a process killed by a signal.
fn status_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Reads `src` line by line until end of file, calling `each` with every
/// line (lossily decoded, line ending removed) as soon as it is complete.
fn for_each_line(src: impl Read, verbose: bool, mut each: impl FnMut(&str)) -> io::Result<()> {
    let mut reader = BufReader::new(src);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        if verbose {
            // Best effort: a closed stderr must not stop the measurement.
            let _ = io::stderr().write_all(&buf);
        }
        let text = String::from_utf8_lossy(&buf);
        each(text.trim_end_matches(['\n', '\r']));
    }
}

/// What `--bytes` mode saw on a stream.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ByteCount {
    bytes: u64,
    /// When the first and the last byte were read (`None` for no bytes).
    first: Option<Instant>,
    last: Option<Instant>,
}

/// Reads `src` to end of file, counting its bytes and noting when the first
/// and the last chunk arrived.
fn count_bytes(mut src: impl Read) -> io::Result<ByteCount> {
    let mut buf = vec![0u8; BYTES_CHUNK];
    let mut seen = ByteCount {
        bytes: 0,
        first: None,
        last: None,
    };
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(seen),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let now = Instant::now();
        seen.first.get_or_insert(now);
        seen.last = Some(now);
        seen.bytes += n as u64;
    }
}

/// What was watched on CMD's stdout.
enum Seen<'a> {
    /// The text looked for, and when it was seen.
    Line(&'a str, Option<Instant>),
    Bytes(ByteCount),
}

fn run(args: &Args) -> Result<bool, String> {
    let (program, rest) = args
        .cmd
        .split_first()
        .ok_or("no command given (expected -- CMD [ARGS...])")?;
    let mut command = Command::new(program);
    command
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if args.no_aslr {
        use std::os::unix::process::CommandExt;
        // SAFETY: personality(2) is async-signal-safe and touches no memory
        // of ours; it only sets a flag the following exec honours.
        unsafe {
            command.pre_exec(|| {
                let current = libc::personality(0xffff_ffff);
                let flags = libc::c_ulong::try_from(current)
                    .map_err(|_| io::Error::last_os_error())?
                    | libc::c_ulong::from(libc::ADDR_NO_RANDOMIZE.unsigned_abs());
                if libc::personality(flags) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    let start = Instant::now();
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.to_string_lossy()))?;
    // The watchdog: SIGKILL after --kill-after unless told first that CMD
    // has exited (its sender dropped, before CMD is reaped).
    let watchdog = args.kill_after.map(|limit| {
        let (exited, watch_exited) = mpsc::channel::<()>();
        let pid = libc::pid_t::try_from(child.id()).unwrap_or(0);
        let handle = thread::spawn(move || {
            let left = limit.saturating_sub(start.elapsed());
            if pid > 0 && watch_exited.recv_timeout(left) == Err(mpsc::RecvTimeoutError::Timeout) {
                // SAFETY: kill(2) on CMD's pid, not reaped yet: the main
                // thread joins this thread before it reaps CMD.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        (exited, handle)
    });
    let stdout = child.stdout.take().ok_or("child has no stdout pipe")?;
    let stderr = child.stderr.take().ok_or("child has no stderr pipe")?;

    let verbose = args.verbose;
    let ready = args.ready.clone();
    let stderr_reader = thread::spawn(move || {
        let mut found = None;
        let mut ready_at = None;
        let res = for_each_line(stderr, verbose, |l| {
            if found.is_none() {
                found = boot_timer_ms(l);
            }
            if ready_at.is_none() && ready.as_deref().is_some_and(|r| l.contains(r)) {
                ready_at = Some(Instant::now());
            }
        });
        (found, ready_at, res)
    });

    let (seen, stdout_res) = match &args.watch {
        Watch::Line(text) => {
            let mut line_at = None;
            let res = for_each_line(stdout, verbose, |l| {
                if line_at.is_none() && l.contains(text.as_str()) {
                    line_at = Some(Instant::now());
                }
            });
            (Seen::Line(text, line_at), res)
        }
        Watch::Bytes => match count_bytes(stdout) {
            Ok(count) => (Seen::Bytes(count), Ok(())),
            Err(e) => (
                Seen::Bytes(ByteCount {
                    bytes: 0,
                    first: None,
                    last: None,
                }),
                Err(e),
            ),
        },
    };
    if let Err(e) = &stdout_res {
        eprintln!("boot-clock: reading the command's stdout: {e}");
    }

    if let Some((exited, watchdog)) = watchdog {
        // Wait for CMD's exit without reaping it (WNOWAIT), so that its pid
        // stays CMD's until the watchdog is gone.
        let pid = libc::id_t::from(child.id());
        // SAFETY: waitid(2) writes only into `info`, which we own.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: as above.
            let r = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid,
                    &raw mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break;
            }
        }
        drop(exited);
        let _ = watchdog.join();
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {}: {e}", program.to_string_lossy()))?;
    let exit_at = Instant::now();

    let (boot_timer, ready_at) = match stderr_reader.join() {
        Ok((found, ready_at, Ok(()))) => (found, ready_at),
        Ok((found, ready_at, Err(e))) => {
            eprintln!("boot-clock: reading the command's stderr: {e}");
            (found, ready_at)
        }
        Err(_) => {
            eprintln!("boot-clock: the stderr reader thread panicked");
            (None, None)
        }
    };

    let code = status_code(status);
    let exit_ms = fmt_ms(Some(millis(start, exit_at)));
    let at = |t: Option<Instant>| fmt_ms(t.map(|t| millis(start, t)));
    let boot_timer = fmt_ms(boot_timer);
    let code = match args.ready {
        Some(_) => format!("ready_ms={} code={code}", at(ready_at)),
        None => format!("code={code}"),
    };
    let watched = match seen {
        Seen::Line(text, line_at) => {
            println!(
                "line_ms={} exit_ms={exit_ms} boot_timer_ms={boot_timer} {code}",
                at(line_at)
            );
            if line_at.is_none() {
                eprintln!("boot-clock: never saw a stdout line containing {text:?}");
            }
            line_at.is_some()
        }
        Seen::Bytes(count) => {
            println!(
                "exit_ms={exit_ms} bytes={} first_byte_ms={} last_byte_ms={} \
                 boot_timer_ms={boot_timer} {code}",
                count.bytes,
                at(count.first),
                at(count.last)
            );
            true
        }
    };
    Ok(status.success() && watched && stdout_res.is_ok())
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("boot-clock: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("boot-clock: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> impl Iterator<Item = OsString> {
        v.iter().map(OsString::from).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn parses_boot_timer() {
        let l = "airlock-vmm: boot-timer: guest init reached after 123.4 ms";
        assert_eq!(boot_timer_ms(l), Some(123.4));
        assert_eq!(boot_timer_ms("guest init reached after 7 ms"), Some(7.0));
        assert_eq!(boot_timer_ms("guest stopped: after 5 ms"), None);
        assert_eq!(boot_timer_ms("guest init reached after x ms"), None);
    }

    #[test]
    fn parses_args() {
        let a = parse_args(os(&["--line", "hi", "--", "echo", "--line"]))
            .ok()
            .flatten();
        let a = a.as_ref();
        assert_eq!(a.map(|a| &a.watch), Some(&Watch::Line("hi".to_owned())));
        assert_eq!(a.map(|a| a.cmd.len()), Some(2));
        assert!(matches!(parse_args(os(&["--help"])), Ok(None)));
        assert!(parse_args(os(&["--"])).is_err());
        assert!(parse_args(os(&["echo"])).is_err());
        assert!(parse_args(os(&["--line"])).is_err());
    }

    #[test]
    fn parses_kill_after_and_no_aslr() {
        let a = parse_args(os(&["--kill-after", "2.5", "--no-aslr", "--", "cat"]))
            .ok()
            .flatten();
        let a = a.as_ref();
        assert_eq!(
            a.and_then(|a| a.kill_after),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(a.map(|a| a.no_aslr), Some(true));
        let default = parse_args(os(&["--", "cat"])).ok().flatten();
        assert_eq!(
            default.map(|a| (a.kill_after, a.no_aslr)),
            Some((None, false))
        );
        for bad in ["0", "-1", "x", "inf", "NaN", "100000"] {
            assert!(
                parse_args(os(&["--kill-after", bad, "--", "cat"])).is_err(),
                "{bad}"
            );
        }
        assert!(parse_args(os(&["--kill-after"])).is_err());
    }

    fn args(kill_after: Option<Duration>, no_aslr: bool, cmd: &[&str]) -> Args {
        Args {
            watch: Watch::Bytes,
            verbose: false,
            kill_after,
            no_aslr,
            ready: None,
            cmd: cmd.iter().map(OsString::from).collect(),
        }
    }

    #[test]
    fn parses_ready() {
        let a = parse_args(os(&["--ready", "first vsock", "--line", "x", "--", "cat"]))
            .ok()
            .flatten();
        assert_eq!(a.and_then(|a| a.ready), Some("first vsock".to_owned()));
        let default = parse_args(os(&["--", "cat"])).ok().flatten();
        assert_eq!(default.map(|a| a.ready), Some(None));
        assert!(parse_args(os(&["--ready", "", "--", "cat"])).is_err());
        assert!(parse_args(os(&["--ready"])).is_err());
    }

    #[test]
    fn kills_a_command_that_outlives_kill_after() {
        let t = Instant::now();
        let r = run(&args(
            Some(Duration::from_millis(300)),
            false,
            &["sleep", "30"],
        ));
        assert_eq!(r, Ok(false), "killed, so not a success");
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        // One that ends in time is left alone and succeeds.
        let r = run(&args(Some(Duration::from_secs(60)), false, &["true"]));
        assert_eq!(r, Ok(true));
    }

    #[test]
    fn no_aslr_reaches_the_command_and_its_children() {
        // /proc/self/personality is the flags in hex: ADDR_NO_RANDOMIZE is 0x0040000.
        let check = "p=$(cat /proc/self/personality) && [ $((0x$p & 0x40000)) -ne 0 ]";
        assert_eq!(run(&args(None, true, &["sh", "-c", check])), Ok(true));
        assert_eq!(run(&args(None, false, &["sh", "-c", check])), Ok(false));
    }

    #[test]
    fn parses_bytes_mode() {
        let a = parse_args(os(&["--bytes", "--verbose", "--", "cat"]))
            .ok()
            .flatten();
        let a = a.as_ref();
        assert_eq!(a.map(|a| &a.watch), Some(&Watch::Bytes));
        assert_eq!(a.map(|a| a.verbose), Some(true));
        let default = parse_args(os(&["--", "cat"])).ok().flatten();
        assert_eq!(
            default.map(|a| a.watch),
            Some(Watch::Line(DEFAULT_LINE.to_owned()))
        );
        assert!(parse_args(os(&["--bytes", "--line", "x", "--", "cat"])).is_err());
        assert!(parse_args(os(&["--line", "x", "--bytes", "--", "cat"])).is_err());
        assert!(parse_args(os(&["--bytes"])).is_err());
    }

    /// Hands out its data a few bytes per read, with an interruption.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        interrupted: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if !self.interrupted {
                self.interrupted = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(3).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn counts_bytes() {
        let empty = count_bytes(io::empty()).ok();
        assert_eq!(
            empty.map(|c| (c.bytes, c.first, c.last)),
            Some((0, None, None))
        );
        let src = Trickle {
            data: vec![7; 10],
            pos: 0,
            interrupted: false,
        };
        let c = count_bytes(src).ok();
        assert_eq!(c.map(|c| c.bytes), Some(10));
        assert!(c.is_some_and(|c| c.first.is_some() && c.first <= c.last));
        let big = count_bytes(&vec![0u8; 3 * BYTES_CHUNK + 1][..]).ok();
        assert_eq!(big.map(|c| c.bytes), Some(3 * BYTES_CHUNK as u64 + 1));
    }
}
