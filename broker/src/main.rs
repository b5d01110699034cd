//! `airlock`: the host CLI. Boots untrusted agents and commands inside
//! disposable microVMs (see docs/DESIGN.md).
//!
//! `main` parses the command line, dispatches, and turns the outcome into
//! an exit code (listed in `--help`, defined in [`cli::Exit`]). It returns
//! the code instead of calling `process::exit`, so every destructor runs:
//! that is what kills the VM and removes the run directory.

mod archive;
mod audit;
mod cli;
mod control;
mod doctor;
mod engine;
mod files;
mod host;
mod image;
mod model;
mod paths;
mod pinned;
mod run;
mod sandbox;
mod session;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let exit = match cli.command {
        cli::Command::Run(args) => run::main(*args),
        cli::Command::Doctor(args) => doctor::main(args),
        cli::Command::Audit(args) => audit::main(args),
        cli::Command::Create(args) => sandbox::client::create(*args),
        cli::Command::Exec(args) => sandbox::client::exec(args),
        cli::Command::Ls(args) => sandbox::client::ls(args),
        cli::Command::Inspect(args) => sandbox::client::inspect(args),
        cli::Command::Stop(args) => sandbox::client::stop(args),
        cli::Command::Rm(args) => sandbox::client::rm(args),
        cli::Command::Logs(args) => sandbox::client::logs(args),
        cli::Command::Image(args) => image::main(args.command),
    };
    ExitCode::from(exit.code())
}

/// An error and its sources, as one line: `what: cause: cause`.
fn report(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Makes guest-controlled text safe to print on a terminal inside one of
/// our own lines: control characters (escape sequences) and bidirectional
/// overrides are shown escaped. Drops the `\r` of serial `\r\n` endings.
/// (The command's own output is passed through untouched: it is the data
/// the user asked for.)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_escapes_terminal_controls() {
        assert_eq!(sanitize(b"airlock-init: ready\r"), "airlock-init: ready");
        assert_eq!(sanitize(b"a\tb"), "a\tb");
        assert_eq!(sanitize(b"\x1b[2Jhi"), "\\u{1b}[2Jhi");
        assert_eq!(sanitize("x\u{202e}y".as_bytes()), "x\\u{202e}y");
        assert_eq!(sanitize(b"bad \xff utf8"), "bad \u{fffd} utf8");
        assert_eq!(sanitize("héllo".as_bytes()), "héllo");
    }
}
