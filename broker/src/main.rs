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
mod secrets;
mod share;
mod text;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // The docker front end parses its own command line, docker's way:
    // invoked as `docker`, or as `airlock docker ...`.
    if docker::invoked_as_docker() {
        let args: Vec<String> = std::env::args().skip(1).collect();
        return ExitCode::from(docker::main(&args));
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "docker") {
        let args: Vec<String> = std::env::args().skip(2).collect();
        return ExitCode::from(docker::main(&args));
    }
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
        cli::Command::Pool(args) => cli::pool::main(*args),
        cli::Command::Image(args) => cli::image::main(args.command),
        cli::Command::Docker { args } => return ExitCode::from(docker::main(&args)),
        cli::Command::ShareServer => return ExitCode::from(share::child::main()),
    };
    ExitCode::from(exit.code())
}
