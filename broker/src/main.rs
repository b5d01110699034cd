//! `airlock`: the host CLI. Boots untrusted agents and commands inside
//! disposable microVMs (see docs/DESIGN.md).
//!
//! `main` parses the command line, dispatches, and turns the outcome into
//! an exit code (listed in `--help`, defined in [`exit::Exit`]). It returns
//! the code instead of calling `process::exit`, so every destructor runs:
//! that is what kills the VM and removes the run directory.

mod archive;
mod audit;
mod cli;
// Not wired to a command yet (issue 18 in progress): its parser is tested.
#[cfg_attr(not(test), allow(dead_code))]
mod docker;
mod door;
mod egress;
mod engine;
mod exit;
mod host;
mod image;
mod model;
mod paths;
mod pinned;
mod run;
mod sandbox;
mod share;
mod text;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let exit = match cli.command {
        cli::Command::Run(args) => cli::run::main(*args),
        cli::Command::Doctor(args) => cli::doctor::main(args),
        cli::Command::Audit(args) => cli::audit::main(args),
        cli::Command::Create(args) => cli::sandbox::create(*args),
        cli::Command::Exec(args) => cli::sandbox::exec(args),
        cli::Command::Ls(args) => cli::sandbox::ls(args),
        cli::Command::Inspect(args) => cli::sandbox::inspect(args),
        cli::Command::Stop(args) => cli::sandbox::stop(args),
        cli::Command::Rm(args) => cli::sandbox::rm(args),
        cli::Command::Logs(args) => cli::sandbox::logs(args),
        cli::Command::Image(args) => cli::image::main(args.command),
        cli::Command::ShareServer => return ExitCode::from(share::child::main()),
    };
    ExitCode::from(exit.code())
}
