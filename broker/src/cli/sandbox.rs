//! The lifecycle commands: `create`, `exec`, `ls`, `inspect`, `stop`,
//! `rm`, `logs`. They find a sandbox by its directory ([`super::Dir`])
//! and talk to its supervisor over its control socket
//! ([`super::server`]).

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use airlock_protocol::limits::MAX_CHUNK;
use airlock_protocol::{read_frame, write_frame, ErrorCode, Message};
use serde_json::{json, Value};

use crate::cli::{CreateArgs, ExecArgs, ListFormat, LogsArgs, LsArgs, NameArg, RmArgs, StopArgs};
use crate::exit::Exit;
use crate::sandbox::server::{self, Mode};
use crate::sandbox::{
    private_dir, root, valid_name, write_json, Dir, KEEPER, KEEPER_BARE, MAX_LABEL, MAX_LABELS,
};

/// The variable that names the sandbox to the supervisor.
const NAME_ENV: &str = "AIRLOCK_SANDBOX_NAME";
/// How long `create` waits for the supervisor's control socket.
const SOCKET_PATIENCE: Duration = Duration::from_secs(120);

fn usage(message: impl std::fmt::Display) -> Exit {
    eprintln!("airlock: error: {message}");
    Exit::Usage
}

fn failed(message: impl std::fmt::Display) -> Exit {
    eprintln!("airlock: error: {message}");
    Exit::SandboxFailed
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The sandbox named `name`, which must exist.
fn existing(name: &str) -> Result<Dir, Exit> {
    if !valid_name(name) {
        return Err(usage(format!(
            "'{}' is not a sandbox name ([a-zA-Z0-9][a-zA-Z0-9_.-]{{0,62}})",
            crate::text::sanitize(name.as_bytes())
        )));
    }
    let dir = Dir::of(name);
    if !dir.exists() {
        return Err(usage(format!(
            "no sandbox named {name} (see `airlock ls --all`)"
        )));
    }
    Ok(dir)
}

/// A request to the supervisor, and its one-line JSON answer.
fn ask(dir: &Dir, request: &Value, patience: Duration) -> io::Result<Value> {
    let mut stream = UnixStream::connect(dir.ctl())?;
    stream.set_read_timeout(Some(patience))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = Vec::new();
    BufReader::new((&stream).take(server::MAX_REQUEST)).read_until(b'\n', &mut line)?;
    serde_json::from_slice(&line).map_err(io::Error::other)
}

/// Waits until the supervisor has gone (its lock is free), at most `limit`.
fn wait_gone(dir: &Dir, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while dir.supervisor().is_some() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
    true
}

/// `airlock create`.
pub fn create(args: CreateArgs) -> Exit {
    if args.supervise {
        return supervise(args);
    }
    let name = args.name.clone().unwrap_or_else(crate::sandbox::new_name);
    if !valid_name(&name) {
        return usage(format!(
            "'{}' is not a sandbox name ([a-zA-Z0-9][a-zA-Z0-9_.-]{{0,62}})",
            crate::text::sanitize(name.as_bytes())
        ));
    }
    let mut labels = serde_json::Map::new();
    if args.labels.len() > MAX_LABELS {
        return usage(format!("at most {MAX_LABELS} labels"));
    }
    for label in &args.labels {
        match label.split_once('=') {
            Some((k, v)) if !k.is_empty() && k.len() <= MAX_LABEL && v.len() <= MAX_LABEL => {
                labels.insert(k.to_owned(), json!(v));
            }
            _ => {
                return usage(format!(
                    "--label '{label}': expected KEY=VALUE (each at most {MAX_LABEL} bytes)"
                ))
            }
        }
    }
    if !args.run.command.is_empty() {
        return usage("create takes no command: run commands with `airlock exec SANDBOX -- CMD`");
    }
    if args.run.interactive {
        return usage(
            "create takes no -i: `airlock exec -i SANDBOX -- CMD` forwards stdin to one command",
        );
    }
    if args.run.timeout.is_some() {
        return usage("create has no --timeout: a sandbox lives until --max-lifetime (or --idle-timeout, stop, rm)");
    }
    if args.max_lifetime == 0 || args.idle_timeout == Some(0) {
        return usage("--max-lifetime and --idle-timeout are at least 1 second");
    }
    // Everything `run` would refuse is refused now, before anything starts.
    if let Err(e) = crate::run::RunConfig::try_from(supervised_run(&args)) {
        eprintln!("airlock: error: {}", crate::text::report(&e));
        return e.exit();
    }
    let base = root();
    if let Err(e) = private_dir(&base) {
        return failed(format!("cannot make {}: {e}", base.display()));
    }
    let dir = Dir::of(&name);
    match fs::DirBuilder::new().mode(0o700).create(&dir.path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let state = if dir.supervisor().is_some() {
                "running"
            } else {
                "stopped: `airlock rm` it first"
            };
            return usage(format!("a sandbox named {name} already exists ({state})"));
        }
        Err(e) => return failed(format!("cannot make {}: {e}", dir.path.display())),
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
                let _ = fs::remove_dir_all(&dir.path);
                eprintln!("airlock: error: {e}");
                return e.exit();
            }
        }
    }
    let cwd = args
        .run
        .workdir
        .clone()
        .or(image_cwd)
        .unwrap_or_else(|| if workspace_cwd { "/workspace" } else { "/" }.to_owned());
    let config = json!({
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
    });
    if let Err(e) = write_json(&dir.config(), &config) {
        let _ = fs::remove_dir_all(&dir.path);
        return failed(format!("cannot write {}: {e}", dir.config().display()));
    }
    let log = match fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.log())
    {
        Ok(f) => f,
        Err(e) => return failed(format!("cannot open {}: {e}", dir.log().display())),
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return failed(format!("cannot find airlock's own binary: {e}")),
    };
    let mut original: Vec<std::ffi::OsString> = std::env::args_os()
        .skip_while(|a| a != "create")
        .skip(1)
        .collect();
    original.insert(0, "--supervise".into());
    original.insert(0, "create".into());
    let mut command = Command::new(exe);
    command
        .args(&original)
        .env(NAME_ENV, &name)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_or_else(|_| Stdio::null(), Stdio::from))
        .stderr(Stdio::from(log));
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of ours;
    // in the child it makes the supervisor its own session, so the
    // terminal's signals (Ctrl-C) do not reach it.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return failed(format!("cannot start the supervisor: {e}")),
    };
    // Its control socket, then an exec that succeeds.
    let deadline = Instant::now() + SOCKET_PATIENCE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            // Its own errors (usage: exit 2) are airlock's lines in its log.
            let usage_error = status.code() == Some(i32::from(Exit::Usage.code()));
            if usage_error {
                // Its own lines: `airlock: error: ...`, as `run` prints them.
                if let Ok(text) = fs::read(dir.log()) {
                    for line in text.split(|b| *b == b'\n') {
                        if line.starts_with(b"airlock: error: ") {
                            eprintln!("{}", crate::text::sanitize(line));
                        }
                    }
                }
            } else {
                eprintln!("airlock: error: the sandbox {name} did not start ({status}); its log:");
                print_tail(&dir.log(), 20);
            }
            give_up(&dir);
            return if usage_error {
                Exit::Usage
            } else {
                Exit::SandboxFailed
            };
        }
        if UnixStream::connect(dir.ctl()).is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            print_tail(&dir.log(), 20);
            give_up(&dir);
            return failed(format!(
                "the sandbox {name} did not start within {} s",
                SOCKET_PATIENCE.as_secs()
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
    let why = match ask(&dir, &json!({"op": "ready"}), Duration::from_secs(600)) {
        Ok(answer) if answer["ok"] == true => {
            // What airlock said while it booted (the engine, warnings):
            // nothing of the guest's has run yet.
            if let Ok(text) = fs::read(dir.log()) {
                for line in text.split(|b| *b == b'\n') {
                    if line.starts_with(b"airlock: ") {
                        eprintln!("{}", crate::text::sanitize(line));
                    }
                }
            }
            println!("{name}");
            return Exit::Success;
        }
        Ok(answer) => answer["error"]
            .as_str()
            .unwrap_or("no reason given")
            .to_owned(),
        Err(e) => format!("no answer: {e}"),
    };
    eprintln!("airlock: error: the sandbox {name} did not become ready: {why}; its log:");
    let _ = stop_dir(&dir, Duration::ZERO);
    let _ = child.wait();
    print_tail(&dir.log(), 20);
    give_up(&dir);
    Exit::SandboxFailed
}

/// A sandbox that never became ready leaves nothing behind but its audit
/// log (named here): its name is free again.
fn give_up(dir: &Dir) {
    if let Ok(path) = fs::read_to_string(dir.path.join("audit.path")) {
        eprintln!("airlock: audit log: {}", path.trim());
    }
    if dir.supervisor().is_none() {
        let _ = fs::remove_dir_all(&dir.path);
    }
}

/// The `run` arguments the supervisor runs with: the keeper command, the
/// lifetime as the timeout, the console kept in the sandbox's directory.
fn supervised_run(args: &CreateArgs) -> crate::cli::RunArgs {
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
    let Some(name) = std::env::var(NAME_ENV).ok().filter(|n| valid_name(n)) else {
        return usage("--supervise is internal to `airlock create`");
    };
    let dir = Dir::of(&name);
    let lock = match fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.lock())
    {
        Ok(f) => f,
        Err(e) => return failed(format!("cannot open {}: {e}", dir.lock().display())),
    };
    // SAFETY: flock(2) on a descriptor we own; no pointers.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        return usage(format!("the sandbox {name} already has a supervisor"));
    }
    let _ = lock.set_len(0);
    let _ = (&lock).write_all(format!("{}\n", std::process::id()).as_bytes());
    let mut run = supervised_run(&args);
    if run.console_log.is_none() && !run.keep_console {
        run.console_log = Some(dir.console());
    }
    let mode = Mode {
        dir: dir.clone(),
        idle_timeout: args.idle_timeout.map(Duration::from_secs),
        container: !args.run.no_container,
    };
    let exit = super::run::main_sandbox(run, mode);
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
    let dir = match existing(&args.name) {
        Ok(dir) => dir,
        Err(exit) => return exit,
    };
    if dir.supervisor().is_none() {
        return usage(format!("the sandbox {} is not running", args.name));
    }
    let mut env = Vec::new();
    for arg in &args.env {
        match super::run::parse_env(arg) {
            Ok(pair) => env.push(json!([pair.0, pair.1])),
            Err(e) => return usage(crate::text::report(&e)),
        }
    }
    let config = Dir::read_json(&dir.config()).unwrap_or_default();
    let cwd = args
        .workdir
        .clone()
        .unwrap_or_else(|| config["cwd"].as_str().unwrap_or("/").to_owned());
    if let Some(user) = &args.user {
        if let Err(e) = airlock_protocol::check_exec_user(user) {
            return usage(format!("-u: {e}"));
        }
    }
    if !cwd.starts_with('/') {
        return usage(format!("-w {cwd}: the working directory must be absolute"));
    }
    let request = json!({
        "op": "exec",
        "argv": args.command,
        "env": env,
        "cwd": cwd,
        "stdin": args.interactive,
        "user": args.user,
    });
    let mut stream = match UnixStream::connect(dir.ctl()) {
        Ok(s) => s,
        Err(e) => return failed(format!("the sandbox {} does not answer: {e}", args.name)),
    };
    if let Err(e) = stream.write_all(format!("{request}\n").as_bytes()) {
        return failed(format!("the sandbox {} does not answer: {e}", args.name));
    }
    if args.interactive {
        let Ok(mut to) = stream.try_clone() else {
            return failed("cannot forward stdin");
        };
        thread::spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = vec![0u8; MAX_CHUNK];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = write_frame(&mut to, &Message::StdinEnd);
                        return;
                    }
                    Ok(n) => {
                        if write_frame(&mut to, &Message::Stdin(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    let mut stdout = io::stdout().lock();
    let mut stderr = io::stderr();
    let mut spawn_failed = false;
    loop {
        match read_frame(&mut stream) {
            Ok(Message::Stdout(data)) => {
                if stdout
                    .write_all(&data)
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return Exit::Interrupted(libc::SIGPIPE);
                }
            }
            Ok(Message::Stderr(data)) => {
                let _ = stderr.write_all(&data);
            }
            Ok(Message::Error { code, message }) => {
                eprintln!(
                    "airlock: exec: {}",
                    crate::text::sanitize(message.as_bytes())
                );
                if code == ErrorCode::SpawnFailed {
                    spawn_failed = true;
                }
            }
            Ok(Message::Exit(status)) => {
                if spawn_failed && status.exit_code() == 127 {
                    return Exit::SpawnFailed;
                }
                return u8::try_from(status.exit_code()).map_or(Exit::ProtocolError, Exit::Command);
            }
            Ok(other) => return failed(format!("unexpected {} from the supervisor", other.kind())),
            Err(e) => {
                return failed(format!(
                    "the exec in {} ended without an exit status ({e})",
                    args.name
                ))
            }
        }
    }
}

/// One sandbox as `ls` and `inspect` see it.
fn describe(dir: &Dir) -> Value {
    let config = Dir::read_json(&dir.config()).unwrap_or_default();
    let pid = dir.supervisor();
    let state = match (pid, Dir::read_json(&dir.state())) {
        (Some(_), _) => "running",
        (None, Some(_)) => "stopped",
        (None, None) => "dead",
    };
    let mut v = json!({
        "name": dir.name,
        "state": state,
        "labels": config["labels"],
        "created_unix": config["created_unix"],
        "engine": config["engine"],
    });
    if let Some(pid) = pid {
        v["supervisor_pid"] = json!(pid);
    }
    v
}

fn all_dirs() -> Vec<Dir> {
    let mut dirs: Vec<Dir> = fs::read_dir(root())
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| valid_name(n))
                .map(|n| Dir::of(&n))
                .filter(Dir::exists)
                .collect()
        })
        .unwrap_or_default();
    dirs.sort_by(|a, b| a.name.cmp(&b.name));
    dirs
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
    let rows: Vec<Value> = all_dirs()
        .iter()
        .map(describe)
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
    let dir = match existing(&args.name) {
        Ok(dir) => dir,
        Err(exit) => return exit,
    };
    let mut v = describe(&dir);
    v["config"] = Dir::read_json(&dir.config()).unwrap_or_default();
    v["directory"] = json!(dir.path);
    v["console_log"] = json!(dir.console());
    v["supervisor_log"] = json!(dir.log());
    if let Ok(path) = fs::read_to_string(dir.path.join("audit.path")) {
        v["audit_log"] = json!(path.trim());
    }
    if let Some(end) = Dir::read_json(&dir.state()) {
        v["ended"] = end;
    }
    if v["state"] == "running" {
        if let Ok(status) = ask(&dir, &json!({"op": "status"}), Duration::from_secs(5)) {
            v["status"] = status;
        }
    }
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Exit::Success
}

/// Asks the supervisor to stop the sandbox and waits for it to be gone
/// (SIGKILL to the supervisor, whose VM dies with it, if it takes too long).
fn stop_dir(dir: &Dir, grace: Duration) -> bool {
    let asked = ask(
        dir,
        &json!({"op": "stop", "grace_secs": grace.as_secs()}),
        Duration::from_secs(5),
    );
    let patience = grace + Duration::from_secs(30);
    if asked.is_ok() && wait_gone(dir, patience) {
        return true;
    }
    if let Some(pid) = dir.supervisor().filter(|p| *p > 0) {
        // SAFETY: kill(2) with a pid read from the lock its holder wrote;
        // the lock is still held, so that process still lives.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    wait_gone(dir, Duration::from_secs(10))
}

/// `airlock stop`.
pub fn stop(args: StopArgs) -> Exit {
    let dir = match existing(&args.name) {
        Ok(dir) => dir,
        Err(exit) => return exit,
    };
    if dir.supervisor().is_none() {
        eprintln!("airlock: {} is not running", args.name);
        return Exit::Success;
    }
    if !stop_dir(&dir, Duration::from_secs(args.time.min(3600))) {
        return failed(format!("the sandbox {} did not stop", args.name));
    }
    println!("{}", args.name);
    Exit::Success
}

/// `airlock rm`.
pub fn rm(args: RmArgs) -> Exit {
    let mut dirs = Vec::new();
    for name in &args.names {
        match existing(name) {
            Ok(dir) => {
                if dir.supervisor().is_some() && !args.force {
                    return usage(format!(
                        "the sandbox {name} is running: `airlock stop {name}` first, or `airlock rm -f {name}`"
                    ));
                }
                dirs.push(dir);
            }
            Err(exit) => return exit,
        }
    }
    for dir in dirs {
        if dir.supervisor().is_some() && !stop_dir(&dir, Duration::ZERO) {
            return failed(format!("the sandbox {} did not stop", dir.name));
        }
        if let Err(e) = fs::remove_dir_all(&dir.path) {
            return failed(format!("cannot remove {}: {e}", dir.path.display()));
        }
        println!("{}", dir.name);
    }
    Exit::Success
}

fn print_tail(path: &std::path::Path, lines: usize) {
    let text = fs::read(path).unwrap_or_default();
    let all: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    let start = all.len().saturating_sub(lines + 1);
    for line in &all[start..] {
        if !line.is_empty() {
            eprintln!("  {}", crate::text::sanitize(line));
        }
    }
}

/// `airlock logs`: the console is the guest's: shown escaped.
pub fn logs(args: LogsArgs) -> Exit {
    let dir = match existing(&args.name) {
        Ok(dir) => dir,
        Err(exit) => return exit,
    };
    let text = fs::read(dir.console()).unwrap_or_default();
    let all: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    let start = all.len().saturating_sub(args.lines + 1);
    let mut out = io::stdout().lock();
    for line in &all[start..] {
        if !line.is_empty() {
            let _ = writeln!(out, "{}", crate::text::sanitize(line));
        }
    }
    Exit::Success
}
