//! `airlock`: the host CLI. Boots untrusted agents and commands inside
//! disposable microVMs (see DESIGN.md).
//!
//! `main` parses the command line, dispatches, and turns the outcome into
//! an exit code (listed in `--help`, defined in [`cli::Exit`]). It returns
//! the code instead of calling `process::exit`, so every destructor runs:
//! that is what kills the VM and removes the run directory.

mod cli;
mod doctor;
mod engine;
mod host;
mod paths;
mod run;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let exit = match cli.command {
        cli::Command::Run(args) => run::main(args),
        cli::Command::Doctor(args) => doctor::main(args),
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
