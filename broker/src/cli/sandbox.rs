//! The lifecycle commands: `create`, `exec`, `ls`, `inspect`, `stop`,
//! `rm`, `logs`: the command line over [`crate::sandbox::lifecycle`],
//! which does the work; here the arguments are checked and what happened
//! is printed. `create --supervise` (internal) is the supervisor itself.

use std::fs;
use std::io::{self, Read, Write};
use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::cli::{CreateArgs, ExecArgs, ListFormat, LogsArgs, LsArgs, NameArg, RmArgs, StopArgs};
use crate::exit::Exit;
use crate::sandbox::lifecycle::{self, NotStarted};
use crate::sandbox::server::Mode;
use crate::sandbox::{
    valid_name, write_json, Dir, ExecEnd, ExecSpec, Sandbox, State, KEEPER, KEEPER_BARE, MAX_LABEL,
    MAX_LABELS,
};

/// The variable that names the sandbox to the supervisor.
pub(crate) const NAME_ENV: &str = "AIRLOCK_SANDBOX_NAME";

fn usage(message: impl std::fmt::Display) -> Exit {
    eprintln!("airlock: error: {message}");
    Exit::Usage
}

fn failed(message: impl std::fmt::Display) -> Exit {
    eprintln!("airlock: error: {message}");
    Exit::SandboxFailed
}

/// A lifecycle error, said, as its exit code.
fn fail(e: &lifecycle::Error) -> Exit {
    eprintln!("airlock: error: {e}");
    match e {
        lifecycle::Error::Usage(_) => Exit::Usage,
        _ => Exit::SandboxFailed,
    }
}

/// Seconds since the Unix epoch (0 for a clock set before 1970).
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `airlock create`.
pub fn create(args: CreateArgs) -> Exit {
    if args.supervise {
        return supervise(args);
    }
    // The supervisor is this same command line, with --supervise.
    let original: Vec<std::ffi::OsString> = std::env::args_os()
        .skip_while(|a| a != "create")
        .skip(1)
        .collect();
    match start(args, original, Value::Null) {
        Ok(name) => {
            println!("{name}");
            Exit::Success
        }
        Err(exit) => exit,
    }
}

/// Creates and starts a sandbox from `args`, whose supervisor runs
/// `airlock create --supervise ORIGINAL`: `original` are the arguments
/// after `create` that `args` were parsed from. `front` is kept in its
/// config as `front_end` (the docker front end's own record). Returns the
/// name once an exec can run in it; on failure, what was said on stderr
/// is said and the exit code returned.
pub fn start(
    args: CreateArgs,
    mut original: Vec<std::ffi::OsString>,
    front: Value,
) -> Result<String, Exit> {
    let name = args.name.clone().unwrap_or_else(crate::sandbox::new_name);
    let config = plan(&args, &name, front)?;
    if !args.no_pool {
        let key = super::pool::key(&args, &config);
        match crate::sandbox::pool::take(&key, &name, &config) {
            Ok(Some(pool)) => {
                eprintln!("airlock: {name}: taken from the warm pool {pool}");
                return Ok(name);
            }
            Ok(None) => {}
            Err(e) => return Err(fail(&e)),
        }
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Err(failed(format!("cannot find airlock's own binary: {e}"))),
    };
    original.insert(0, "--supervise".into());
    original.insert(0, "create".into());
    let mut supervisor = Command::new(exe);
    supervisor.args(&original).env(NAME_ENV, &name);
    started(&name, Sandbox::create(&name, &config, supervisor))
}

/// Checks `args` as `create` does (everything `run` would refuse, the
/// name, labels, image) and builds the sandbox's `config.json`.
pub(crate) fn plan(args: &CreateArgs, name: &str, front: Value) -> Result<Value, Exit> {
    if let Err(e) = lifecycle::check_name(name) {
        return Err(fail(&e));
    }
    let mut labels = serde_json::Map::new();
    if args.labels.len() > MAX_LABELS {
        return Err(usage(format!("at most {MAX_LABELS} labels")));
    }
    for label in &args.labels {
        match label.split_once('=') {
            Some((k, v)) if !k.is_empty() && k.len() <= MAX_LABEL && v.len() <= MAX_LABEL => {
                labels.insert(k.to_owned(), json!(v));
            }
            _ => {
                return Err(usage(format!(
                    "--label '{label}': expected KEY=VALUE (each at most {MAX_LABEL} bytes)"
                )))
            }
        }
    }
    if !args.run.command.is_empty() {
        return Err(usage(
            "create takes no command: run commands with `airlock exec SANDBOX -- CMD`",
        ));
    }
    if args.run.interactive {
        return Err(usage(
            "create takes no -i: `airlock exec -i SANDBOX -- CMD` forwards stdin to one command",
        ));
    }
    if args.run.timeout.is_some() {
        return Err(usage("create has no --timeout: a sandbox lives until --max-lifetime (or --idle-timeout, stop, rm)"));
    }
    if args.max_lifetime == 0 || args.idle_timeout == Some(0) {
        return Err(usage(
            "--max-lifetime and --idle-timeout are at least 1 second",
        ));
    }
    // Everything `run` would refuse is refused now, before anything starts.
    if let Err(e) = crate::run::RunConfig::try_from(supervised_run(args)) {
        eprintln!("airlock: error: {}", crate::text::report(&e));
        return Err(e.exit());
    }
    let workspace_cwd = args.run.workspace.is_some() || args.run.out.is_some();
    // The image it boots from (a stored image by digest: `image rm` will
    // not take it away while the sandbox runs), and where execs start:
    // -w, else the image's WorkingDir, else the workspace or /.
    let mut image = Value::Null;
    let mut image_cwd = None;
    if let Some(value) = &args.run.image_archive {
        match crate::image::choose(value.as_os_str()) {
            Ok(crate::image::Choice::Stored(stored)) => {
                image = json!({"reference": stored.reference, "digest": stored.digest});
                image_cwd = stored.config.working_dir.clone();
            }
            Ok(crate::image::Choice::File(p)) => {
                image = json!({"file": std::path::absolute(&p).unwrap_or(p)});
            }
            Err(e) => {
                eprintln!("airlock: error: {e}");
                return Err(e.exit());
            }
        }
    }
    let cwd = args
        .run
        .workdir
        .clone()
        .or(image_cwd)
        .unwrap_or_else(|| if workspace_cwd { "/workspace" } else { "/" }.to_owned());
    Ok(json!({
        "front_end": front,
        "name": name,
        "labels": labels,
        "created_unix": now_unix(),
        "engine": format!("{:?}", args.run.engine).to_lowercase(),
        "mem_mib": args.run.mem,
        "cpus": args.run.cpus,
        "container": !args.run.no_container,
        "cwd": cwd,
        "image": image,
        "idle_timeout_secs": args.idle_timeout,
        "max_lifetime_secs": args.max_lifetime,
        "workspace": args.run.workspace.as_ref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
        "out": args.run.out.as_ref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
    }))
}

/// Says how a sandbox's start went: its name, or why it did not start
/// (its supervisor's log, its audit log) as an exit code.
pub(crate) fn started(
    name: &str,
    created: Result<Sandbox, lifecycle::Error>,
) -> Result<String, Exit> {
    match created {
        Ok(sandbox) => {
            // What airlock said while it booted (the engine, warnings):
            // nothing of the guest's has run yet.
            if let Ok(text) = fs::read(sandbox.dir().log()) {
                for line in text.split(|b| *b == b'\n') {
                    if line.starts_with(b"airlock: ") {
                        eprintln!("{}", crate::text::sanitize(line));
                    }
                }
            }
            Ok(name.to_owned())
        }
        Err(lifecycle::Error::NotStarted {
            how,
            log,
            audit_log,
        }) => {
            let usage_error = matches!(
                &how,
                NotStarted::Exited(status) if status.code() == Some(i32::from(Exit::Usage.code()))
            );
            if usage_error {
                // Its own lines: `airlock: error: ...`, as `run` prints them.
                for line in log.split(|b| *b == b'\n') {
                    if line.starts_with(b"airlock: error: ") {
                        eprintln!("{}", crate::text::sanitize(line));
                    }
                }
            } else {
                eprintln!("airlock: error: the sandbox {name} did not start: {how}; its log:");
                print_tail(&log, 20);
            }
            if let Some(path) = audit_log {
                eprintln!("airlock: audit log: {path}");
            }
            Err(if usage_error {
                Exit::Usage
            } else {
                Exit::SandboxFailed
            })
        }
        Err(e) => Err(fail(&e)),
    }
}

/// The `run` arguments the supervisor runs with: the keeper command, the
/// lifetime as the timeout, the console kept in the sandbox's directory.
pub(crate) fn supervised_run(args: &CreateArgs) -> crate::cli::RunArgs {
    let mut run = args.run.clone();
    let keeper = if run.no_container {
        KEEPER_BARE
    } else {
        KEEPER
    };
    run.command = keeper.iter().map(|s| (*s).to_owned()).collect();
    // The keeper runs as it is, not through an image's entrypoint (the
    // image's Env, WorkingDir and User still apply, to the execs too).
    run.entrypoint = Some(String::new());
    run.timeout = Some(args.max_lifetime);
    run
}

/// The supervisor: holds the sandbox's lock for its whole life, runs it,
/// and writes how it ended.
fn supervise(args: CreateArgs) -> Exit {
    supervise_in(args, None)
}

/// The supervisor of a sandbox named in `$AIRLOCK_SANDBOX_NAME`: in the
/// state root, or, for a warm pool's member, in `pool`'s directory.
pub(crate) fn supervise_in(args: CreateArgs, pool: Option<&crate::sandbox::pool::PoolDir>) -> Exit {
    let Some(name) = std::env::var(NAME_ENV).ok().filter(|n| valid_name(n)) else {
        return usage("--supervise is internal to `airlock create`");
    };
    let dir = match pool {
        Some(pool) => pool.member(&name),
        None => Dir::of(&name),
    };
    let lock = match crate::sandbox::take_lock(&dir.lock()) {
        Ok(Some(lock)) => lock,
        Ok(None) => return usage(format!("the sandbox {name} already has a supervisor")),
        Err(e) => return failed(format!("cannot open {}: {e}", dir.lock().display())),
    };
    let mut run = supervised_run(&args);
    if run.console_log.is_none() && !run.keep_console {
        run.console_log = Some(dir.console());
    }
    let mode = Mode {
        dir: dir.clone(),
        idle_timeout: args.idle_timeout.map(Duration::from_secs),
        container: !args.run.no_container,
        pool: pool.map(|p| p.name.clone()),
    };
    let exit = super::run::main_sandbox(run, mode);
    // Adopted from a pool: it lives under its new name now.
    let dir = crate::sandbox::server::current_dir().unwrap_or(dir);
    let _ = fs::remove_file(dir.ctl());
    let _ = write_json(
        &dir.state(),
        &json!({ "state": "stopped", "exit_code": exit.code(), "ended_unix": now_unix() }),
    );
    drop(lock);
    exit
}

/// `airlock exec`.
pub fn exec(args: ExecArgs) -> Exit {
    let sandbox = match Sandbox::open(&args.name) {
        Ok(sandbox) => sandbox,
        Err(e) => return fail(&e),
    };
    let mut env = Vec::new();
    for arg in &args.env {
        match super::run::parse_env(arg) {
            Ok(pair) => env.push(pair),
            Err(e) => return usage(crate::text::report(&e)),
        }
    }
    let cwd = args
        .workdir
        .clone()
        .unwrap_or_else(|| sandbox.config()["cwd"].as_str().unwrap_or("/").to_owned());
    if let Some(user) = &args.user {
        if let Err(e) = airlock_protocol::check_exec_user(user) {
            return usage(format!("-u: {e}"));
        }
    }
    if !cwd.starts_with('/') {
        return usage(format!("-w {cwd}: the working directory must be absolute"));
    }
    let spec = ExecSpec {
        argv: args.command.clone(),
        env,
        cwd,
        user: args.user.clone(),
    };
    let ended = exec_attached(&sandbox, &spec, args.interactive, "airlock: exec");
    match ended {
        Ok(ExecEnd::Exited {
            status,
            spawn_failed,
        }) => {
            if spawn_failed && status.exit_code() == 127 {
                return Exit::SpawnFailed;
            }
            u8::try_from(status.exit_code()).map_or(Exit::ProtocolError, Exit::Command)
        }
        Ok(ExecEnd::OutputClosed) => Exit::Interrupted(libc::SIGPIPE),
        Err(e) => fail(&e),
    }
}

/// Runs `spec` in `sandbox` with our stdout and stderr (and stdin when
/// `interactive`); the guest's error messages on stderr after `prefix`,
/// escaped.
pub fn exec_attached(
    sandbox: &Sandbox,
    spec: &ExecSpec,
    interactive: bool,
    prefix: &str,
) -> Result<ExecEnd, lifecycle::Error> {
    let stdin: Option<Box<dyn Read + Send>> = if interactive {
        Some(Box::new(io::stdin()))
    } else {
        None
    };
    sandbox.exec(
        spec,
        stdin,
        &mut io::stdout().lock(),
        &mut io::stderr(),
        &mut |message| {
            eprintln!("{prefix}: {}", crate::text::sanitize(message.as_bytes()));
        },
    )
}

/// `airlock ls`.
pub fn ls(args: LsArgs) -> Exit {
    let mut filters = Vec::new();
    for f in &args.filters {
        if let Some(name) = f.strip_prefix("name=") {
            filters.push(("name", name.to_owned(), String::new()));
        } else if let Some((k, v)) = f.strip_prefix("label=").and_then(|kv| kv.split_once('=')) {
            filters.push(("label", k.to_owned(), v.to_owned()));
        } else {
            return usage(format!(
                "--filter '{f}': expected name=NAME or label=KEY=VALUE"
            ));
        }
    }
    let rows: Vec<Value> = Sandbox::list()
        .iter()
        .map(Sandbox::describe)
        .filter(|d| args.all || d["state"] == "running")
        .filter(|d| {
            filters.iter().all(|(what, a, b)| match *what {
                "name" => d["name"] == a.as_str(),
                _ => d["labels"][a.as_str()] == b.as_str(),
            })
        })
        .collect();
    match args.format {
        ListFormat::Json => println!("{}", Value::Array(rows)),
        ListFormat::Table => {
            println!(
                "{:<24} {:<8} {:<6} {:<20} LABELS",
                "NAME", "STATE", "ENGINE", "CREATED"
            );
            for d in rows {
                let labels: Vec<String> = d["labels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                            .collect()
                    })
                    .unwrap_or_default();
                println!(
                    "{:<24} {:<8} {:<6} {:<20} {}",
                    d["name"].as_str().unwrap_or(""),
                    d["state"].as_str().unwrap_or(""),
                    d["engine"].as_str().unwrap_or(""),
                    d["created_unix"]
                        .as_u64()
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    labels.join(",")
                );
            }
        }
    }
    Exit::Success
}

/// `airlock inspect`.
pub fn inspect(args: NameArg) -> Exit {
    match Sandbox::open(&args.name) {
        Ok(sandbox) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&sandbox.inspect()).unwrap_or_default()
            );
            Exit::Success
        }
        Err(e) => fail(&e),
    }
}

/// `airlock stop`.
pub fn stop(args: StopArgs) -> Exit {
    let sandbox = match Sandbox::open(&args.name) {
        Ok(sandbox) => sandbox,
        Err(e) => return fail(&e),
    };
    if !matches!(sandbox.state(), State::Running(_)) {
        eprintln!("airlock: {} is not running", args.name);
        return Exit::Success;
    }
    if !sandbox.stop(Duration::from_secs(args.time.min(3600))) {
        return failed(format!("the sandbox {} did not stop", args.name));
    }
    println!("{}", args.name);
    Exit::Success
}

/// `airlock rm`: every name is checked before any is removed.
pub fn rm(args: RmArgs) -> Exit {
    // Each name on its own, as `docker rm`: one that is missing, or running
    // without -f, is said and left; the others are still removed. The exit
    // status is the first failure's.
    let mut exit = Exit::Success;
    for name in &args.names {
        let outcome = match Sandbox::open(name) {
            Ok(sandbox) if matches!(sandbox.state(), State::Running(_)) && !args.force => usage(
                format!(
                    "the sandbox {name} is running: `airlock stop {name}` first, or `airlock rm -f {name}`"
                ),
            ),
            Ok(sandbox) => match sandbox.remove(args.force) {
                Ok(()) => {
                    println!("{name}");
                    Exit::Success
                }
                Err(e) => fail(&e),
            },
            Err(e) => fail(&e),
        };
        if matches!(exit, Exit::Success) {
            exit = outcome;
        }
    }
    exit
}

/// The non-empty lines among the last `lines` of `text`.
fn tail(text: &[u8], lines: usize) -> impl Iterator<Item = &[u8]> {
    let all: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    let start = all.len().saturating_sub(lines + 1);
    all.into_iter().skip(start).filter(|line| !line.is_empty())
}

/// The last `lines` lines of `text` on stderr, indented and escaped.
fn print_tail(text: &[u8], lines: usize) {
    for line in tail(text, lines) {
        eprintln!("  {}", crate::text::sanitize(line));
    }
}

/// `airlock logs`: the console is the guest's: shown escaped.
pub fn logs(args: LogsArgs) -> Exit {
    let sandbox = match Sandbox::open(&args.name) {
        Ok(sandbox) => sandbox,
        Err(e) => return fail(&e),
    };
    let text = fs::read(sandbox.dir().console()).unwrap_or_default();
    let mut out = io::stdout().lock();
    for line in tail(&text, args.lines) {
        let _ = writeln!(out, "{}", crate::text::sanitize(line));
    }
    Exit::Success
}
