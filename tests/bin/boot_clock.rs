//! `boot-clock`: time a VMM from spawn to a console line and to its exit.
//!
//! ```text
//! boot-clock [--line TEXT] [--verbose] -- CMD [ARGS...]
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
//! from CMD's stderr (airlock-vmm's boot timer), if CMD prints one.
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

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::thread;
use std::time::Instant;

const DEFAULT_LINE: &str = "airlock-init: ready";
const BOOT_TIMER_MARK: &str = "guest init reached after ";

const USAGE: &str = "\
usage: boot-clock [--line TEXT] [--verbose] -- CMD [ARGS...]

Runs CMD and prints one line:
  line_ms=<f|-> exit_ms=<f> boot_timer_ms=<f|-> code=<n>
line_ms: ms from spawn to the first stdout line containing TEXT
         (default 'airlock-init: ready'); exit_ms: ms from spawn to CMD's exit;
boot_timer_ms: the <ms> of 'guest init reached after <ms> ms' on CMD's stderr.
Exits 0 only if CMD exited 0 and the line was seen.

  --line TEXT   the stdout text to wait for
  --verbose     copy CMD's stdout and stderr to our stderr
  -h, --help    this help";

#[derive(Debug)]
struct Args {
    line: String,
    verbose: bool,
    cmd: Vec<OsString>,
}

/// Parses our arguments; `Ok(None)` means `--help` was asked for.
fn parse_args(mut it: impl Iterator<Item = OsString>) -> Result<Option<Args>, String> {
    let mut line = DEFAULT_LINE.to_owned();
    let mut verbose = false;
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--") => {
                let cmd: Vec<OsString> = it.collect();
                if cmd.is_empty() {
                    return Err("no command given after --".to_owned());
                }
                return Ok(Some(Args { line, verbose, cmd }));
            }
            Some("-h" | "--help") => return Ok(None),
            Some("--verbose" | "-v") => verbose = true,
            Some("--line") => {
                line = it
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .ok_or("--line needs a UTF-8 TEXT argument")?;
                if line.is_empty() {
                    return Err("--line TEXT must not be empty".to_owned());
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

    let start = Instant::now();
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.to_string_lossy()))?;
    let stdout = child.stdout.take().ok_or("child has no stdout pipe")?;
    let stderr = child.stderr.take().ok_or("child has no stderr pipe")?;

    let verbose = args.verbose;
    let stderr_reader = thread::spawn(move || {
        let mut found = None;
        let res = for_each_line(stderr, verbose, |l| {
            if found.is_none() {
                found = boot_timer_ms(l);
            }
        });
        (found, res)
    });

    let mut line_at = None;
    let stdout_res = for_each_line(stdout, verbose, |l| {
        if line_at.is_none() && l.contains(args.line.as_str()) {
            line_at = Some(Instant::now());
        }
    });
    if let Err(e) = &stdout_res {
        eprintln!("boot-clock: reading the command's stdout: {e}");
    }

    let status = child
        .wait()
        .map_err(|e| format!("waiting for {}: {e}", program.to_string_lossy()))?;
    let exit_at = Instant::now();

    let boot_timer = match stderr_reader.join() {
        Ok((found, Ok(()))) => found,
        Ok((found, Err(e))) => {
            eprintln!("boot-clock: reading the command's stderr: {e}");
            found
        }
        Err(_) => {
            eprintln!("boot-clock: the stderr reader thread panicked");
            None
        }
    };

    let code = status_code(status);
    println!(
        "line_ms={} exit_ms={} boot_timer_ms={} code={code}",
        fmt_ms(line_at.map(|t| millis(start, t))),
        fmt_ms(Some(millis(start, exit_at))),
        fmt_ms(boot_timer),
    );
    if line_at.is_none() {
        eprintln!(
            "boot-clock: never saw a stdout line containing {:?}",
            args.line
        );
    }
    Ok(status.success() && line_at.is_some() && stdout_res.is_ok())
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
        assert_eq!(a.map(|a| a.line.as_str()), Some("hi"));
        assert_eq!(a.map(|a| a.cmd.len()), Some(2));
        assert!(matches!(parse_args(os(&["--help"])), Ok(None)));
        assert!(parse_args(os(&["--"])).is_err());
        assert!(parse_args(os(&["echo"])).is_err());
        assert!(parse_args(os(&["--line"])).is_err());
    }
}
