//! Lines on the console (the serial port, every byte a VM exit: keep them
//! few and short).
//!
//! Writes never fail loudly: if the console is gone there is no one to tell.
//! Every line is written with one `write` and flushed, so stdout and stderr
//! lines appear in order.

use std::error::Error;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Prefix of every line the init prints.
const PREFIX: &str = "airlock-init";

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Turns the debug lines on or off.
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

/// Whether the debug lines are on.
pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Prints `line` as it is on stdout (for lines the host looks for, such as
/// [`airlock_protocol::INIT_READY_LINE`]).
pub fn out(line: &str) {
    write_line(&mut io::stdout().lock(), line);
}

/// Prints `airlock-init: <msg>` on stdout.
pub fn info(msg: &str) {
    out(&format!("{PREFIX}: {msg}"));
}

/// Prints `airlock-init: <msg>` on stderr when debug lines are on.
pub fn debug(msg: &str) {
    if debug_enabled() {
        write_line(&mut io::stderr().lock(), &format!("{PREFIX}: {msg}"));
    }
}

/// Prints `airlock-init: warning: <msg>` on stderr.
pub fn warn(msg: &str) {
    write_line(
        &mut io::stderr().lock(),
        &format!("{PREFIX}: warning: {msg}"),
    );
}

/// Prints `airlock-init: error: <msg>` on stderr.
pub fn error(msg: &str) {
    write_line(&mut io::stderr().lock(), &format!("{PREFIX}: error: {msg}"));
}

/// An error and its sources, joined with `": "`.
pub fn chain(err: &dyn Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn write_line(w: &mut impl Write, line: &str) {
    let mut buf = String::with_capacity(line.len() + 1);
    buf.push_str(line);
    buf.push('\n');
    // Nothing to do if the console cannot be written: stay silent.
    let _ = w.write_all(buf.as_bytes());
    let _ = w.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("failed to mount proc on /proc")]
    struct Outer(#[source] io::Error);

    #[test]
    fn chain_joins_sources() {
        let err = Outer(io::Error::other("no such device"));
        assert_eq!(chain(&err), "failed to mount proc on /proc: no such device");
    }

    #[test]
    fn write_line_appends_newline() {
        let mut buf = Vec::new();
        write_line(&mut buf, "airlock-init: ready");
        assert_eq!(buf, b"airlock-init: ready\n");
    }
}
