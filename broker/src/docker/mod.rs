//! The docker-compatible front end (issue 18): `airlock docker ARGS`, and
//! the binary invoked as `docker` (a symlink named `docker` on an agent
//! platform's PATH is the whole installation), so that a platform that
//! drives `docker` (NanoClaw v2) runs each agent session in its own
//! microVM, unchanged. docs/DOCKER.md has the mapping.
//!
//! Each subcommand translates onto what a live sandbox already has
//! (`crate::cli::sandbox`, `crate::sandbox::lifecycle`, the image store):
//! `run` is `create` plus one foreground exec of the image's main process
//! ([`run`]); `stop`, `kill`, `rm`, `exec`, `logs`, `ps` are the sandbox's;
//! `images`, `image inspect`, `load`, `save`, `build` the store's
//! ([`images`]). Everything else, and every flag that would weaken the
//! sandbox, is refused with exit 125: never a silent ignore.

pub mod config;
pub mod format;
pub mod images;
pub mod run;
pub mod run_args;

use std::io::{self, Read, Write};
use std::time::Duration;

use serde_json::Value;

use crate::sandbox::lifecycle::{ExecEnd, ExecSpec, Sandbox, State};
use format::{Row, Template};

/// The names a container reaches the host by.
pub const HOST_NAMES: [&str; 2] = ["host.docker.internal", "host.airlock.internal"];

/// docker's own exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// What the daemon said went wrong (no such container, ...).
    Error = 1,
    /// docker's "the docker command itself failed": refused, unsupported.
    Refused = 125,
    /// The sandbox could not be made or did not answer.
    Failed = 126,
}

/// Says `message` as `airlock docker: ...`; `code`.
pub fn error(code: Code, message: &str) -> u8 {
    eprintln!(
        "airlock docker: {}",
        crate::text::sanitize(message.as_bytes())
    );
    code as u8
}

/// A refusal: exit 125.
pub fn refuse(message: &str) -> u8 {
    error(Code::Refused, message)
}

fn unsupported(what: &str) -> u8 {
    refuse(&format!("{what} is not supported"))
}

/// Whether we were invoked as `docker` (argv\[0\]'s file name).
pub fn invoked_as_docker() -> bool {
    std::env::args_os()
        .next()
        .as_ref()
        .and_then(|a| {
            std::path::Path::new(a)
                .file_name()
                .map(std::ffi::OsStr::to_owned)
        })
        .is_some_and(|n| n == "docker")
}

const HELP: &str = "\
Usage:  docker COMMAND   (airlock's docker-compatible front end)

Each container is an Airlock sandbox: its own microVM, no network device
(egress only through the policy's proxy), model keys on the host, an
audit log. Policy: $AIRLOCK_DOCKER_CONFIG, else ~/.config/airlock/docker.toml
(egress rules, host_ports, model upstream, limits, engine).

Commands:
  run       Run a command in a new container (one microVM)
  exec      Run a command in a running container
  ps        List containers (-a, --filter label=K=V|name=N, --format, -q)
  stop      Stop containers (-t SECS)
  kill      Kill containers
  rm        Remove containers (-f)
  logs      Show a container's main process output (--tail N, -f)
  images    List images
  image     inspect | ls | load | save | rm
  load      Load an image from a docker or OCI archive (-i FILE or stdin)
  save      Save a loaded image (-o FILE)
  build     Build an image with the host's podman or buildah, then load it
  rmi       Remove images
  info      Whether this host can run sandboxes
  version   Versions

Refused, with the reason: --privileged, --cap-add, --device, host
namespaces, --security-opt, published ports, -t, --network other than
none, the engine's socket mounted in; anything else unknown: exit 125.
";

/// `docker ARGS`: the exit code.
pub fn main(args: &[String]) -> u8 {
    let Some(first) = args.first() else {
        print!("{HELP}");
        return 0;
    };
    let rest = &args[1..];
    match first.as_str() {
        "-h" | "--help" | "help" => {
            print!("{HELP}");
            0
        }
        "-v" | "--version" => {
            println!(
                "Docker version 24.0.0-airlock, build airlock {}",
                env!("CARGO_PKG_VERSION")
            );
            0
        }
        "run" => run::run(rest),
        "__main" => match rest {
            [name] => run::main_process(name, false, false),
            _ => refuse("__main is internal"),
        },
        "container" => match rest.split_first() {
            Some((sub, more))
                if ["run", "stop", "kill", "rm", "ls", "ps", "exec", "logs"]
                    .contains(&sub.as_str()) =>
            {
                let sub = if sub == "ls" { "ps" } else { sub.as_str() };
                let mut again = vec![sub.to_owned()];
                again.extend_from_slice(more);
                main(&again)
            }
            Some((sub, _)) => unsupported(&format!("container {sub}")),
            None => unsupported("container"),
        },
        "stop" => stop(rest, false),
        "kill" => stop(rest, true),
        "rm" => rm(rest),
        "ps" => ps(rest),
        "exec" => exec(rest),
        "logs" => logs(rest),
        "info" => info(rest),
        "version" => version(rest),
        "images" => images::images(rest),
        "image" => images::image(rest),
        "load" => images::load(rest),
        "save" => images::save(rest),
        "build" => images::build(rest),
        "rmi" => images::rmi(rest),
        other if other.starts_with('-') => {
            refuse(&format!("the global option {other} is not supported"))
        }
        other => unsupported(other),
    }
}

use crate::cli::sandbox::now_unix;

/// A container's ID: the front end's, else one derived from the
/// sandbox's name and creation time (`config` is the sandbox's).
pub fn id_of(name: &str, config: &Value) -> String {
    use sha2::Digest;
    if let Some(id) = config["front_end"]["id"].as_str() {
        return id.to_owned();
    }
    let seed = format!("{name}\0{}", config["created_unix"]);
    crate::audit::record::hex(&sha2::Sha256::digest(seed.as_bytes()))
}

/// The container a name or an ID (or a unique ID prefix) names.
fn find(what: &str) -> Result<Sandbox, String> {
    if let Ok(s) = Sandbox::open(what) {
        return Ok(s);
    }
    let hexish =
        !what.is_empty() && what.len() <= 64 && what.bytes().all(|b| b.is_ascii_hexdigit());
    if hexish {
        let mut matches: Vec<Sandbox> = Sandbox::list()
            .into_iter()
            .filter(|s| id_of(s.name(), &s.config()).starts_with(&what.to_ascii_lowercase()))
            .collect();
        if matches.len() == 1 {
            return Ok(matches.remove(0));
        }
        if matches.len() > 1 {
            return Err(format!("multiple IDs found with prefix: {what}"));
        }
    }
    Err(format!(
        "No such container: {}",
        crate::text::sanitize(what.as_bytes())
    ))
}

/// [`find`], or its error said as docker's daemon says it (exit 1).
fn find_or_say(what: &str) -> Result<Sandbox, u8> {
    find(what).map_err(|e| error(Code::Error, &format!("Error response from daemon: {e}")))
}

/// Splits `args` into flags (with their values, for those in
/// `with_value`) and the rest, docker's way: `--flag=v`, `-t5`, `-t 5`,
/// clusters of short switches.
#[derive(Debug)]
struct Flags {
    seen: Vec<(String, String)>,
    rest: Vec<String>,
}

fn flags(
    command: &str,
    args: &[String],
    switches: &[&str],
    with_value: &[&str],
    stop_at_first_positional: bool,
) -> Result<Flags, String> {
    let mut seen = Vec::new();
    let mut rest = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--" {
            rest.extend_from_slice(&args[i + 1..]);
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            if stop_at_first_positional {
                rest.extend_from_slice(&args[i..]);
                break;
            }
            rest.push(arg.clone());
            i += 1;
            continue;
        }
        let (flag, inline) =
            if let Some((f, v)) = arg.split_once('=').filter(|(f, _)| f.starts_with("--")) {
                (f.to_owned(), Some(v.to_owned()))
            } else if !arg.starts_with("--") && arg.len() > 2 && with_value.contains(&&arg[..2]) {
                (arg[..2].to_owned(), Some(arg[2..].to_owned()))
            } else if !arg.starts_with("--") && arg.len() > 2 {
                // A cluster of short switches.
                for c in arg[1..].chars() {
                    let f = format!("-{c}");
                    if !switches.contains(&f.as_str()) {
                        return Err(format!("{command} flag {f} is not supported"));
                    }
                    seen.push((f, String::new()));
                }
                i += 1;
                continue;
            } else {
                (arg.clone(), None)
            };
        if with_value.contains(&flag.as_str()) {
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| format!("{command} {flag} needs a value"))?
                }
            };
            seen.push((flag, value));
        } else if switches.contains(&flag.as_str()) {
            match inline.as_deref() {
                None | Some("true") => seen.push((flag, String::new())),
                Some("false") => {}
                Some(v) => return Err(format!("{command} {flag}={v}: expected true or false")),
            }
        } else {
            return Err(format!("{command} flag {flag} is not supported"));
        }
        i += 1;
    }
    Ok(Flags { seen, rest })
}

impl Flags {
    fn has(&self, names: &[&str]) -> bool {
        self.seen.iter().any(|(f, _)| names.contains(&f.as_str()))
    }

    fn values(&self, names: &[&str]) -> Vec<String> {
        self.seen
            .iter()
            .filter(|(f, _)| names.contains(&f.as_str()))
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn last(&self, names: &[&str]) -> Option<String> {
        self.values(names).pop()
    }
}

/// `docker stop [-t N] NAME...` / `docker kill NAME...`: what docker
/// does: the names it stopped on stdout, `No such container` for the
/// others (exit 1).
fn stop(args: &[String], kill: bool) -> u8 {
    let command = if kill { "kill" } else { "stop" };
    let with_value: &[&str] = if kill {
        &["-s", "--signal"]
    } else {
        &["-t", "--time", "-s", "--signal"]
    };
    let f = match flags(command, args, &[], with_value, false) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    if f.rest.is_empty() {
        return refuse(&format!("{command} needs at least one container"));
    }
    if let Some(signal) = f.last(&["-s", "--signal"]) {
        let s = signal.trim_start_matches("SIG").to_ascii_uppercase();
        let ok = if kill {
            ["KILL", "9"].contains(&s.as_str())
        } else {
            ["TERM", "15"].contains(&s.as_str())
        };
        if !ok {
            return refuse(&format!(
                "{command} --signal {signal} is not supported ({command} sends SIG{})",
                if kill { "KILL" } else { "TERM" }
            ));
        }
    }
    let grace = if kill {
        0
    } else {
        match f.last(&["-t", "--time"]).map(|t| t.parse::<i64>()) {
            None => 10,
            Some(Ok(t)) if t < 0 => 3600,
            Some(Ok(t)) => u64::try_from(t).unwrap_or(0).min(3600),
            Some(Err(_)) => return refuse(&format!("{command} -t: not a number of seconds")),
        }
    };
    let mut code = 0;
    for what in &f.rest {
        let sandbox = match find_or_say(what) {
            Ok(s) => s,
            Err(c) => {
                code = c;
                continue;
            }
        };
        if !matches!(sandbox.state(), State::Running(_)) {
            if kill {
                code = error(
                    Code::Error,
                    &format!("Error response from daemon: container {what} is not running"),
                );
                continue;
            }
        } else if !sandbox.stop(Duration::from_secs(grace)) {
            code = error(
                Code::Error,
                &format!("the sandbox {} did not stop", sandbox.name()),
            );
            continue;
        } else {
            wait_for_main_exit(&sandbox);
        }
        println!("{what}");
    }
    code
}

/// Once a `run` sandbox has stopped, its main process's front end writes
/// how it ended: waits for that (a few seconds at most), so that what
/// `ps -a` says right after `stop` is the main process's exit.
fn wait_for_main_exit(sandbox: &Sandbox) {
    if sandbox.config()["front_end"]["kind"] != "docker" {
        return;
    }
    let path = run::main_exit(sandbox);
    for _ in 0..50 {
        if path.exists() || !sandbox.dir().exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `docker rm [-f] [-v] NAME...`.
fn rm(args: &[String]) -> u8 {
    let f = match flags(
        "rm",
        args,
        &["-f", "--force", "-v", "--volumes"],
        &[],
        false,
    ) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    if f.rest.is_empty() {
        return refuse("rm needs at least one container");
    }
    let force = f.has(&["-f", "--force"]);
    let mut code = 0;
    for what in &f.rest {
        let sandbox = match find_or_say(what) {
            Ok(s) => s,
            Err(c) => {
                code = c;
                continue;
            }
        };
        if matches!(sandbox.state(), State::Running(_)) && !force {
            code = error(
                Code::Error,
                &format!(
                    "Error response from daemon: You cannot remove a running container {what}. \
                     Stop the container before attempting removal or force remove"
                ),
            );
            continue;
        }
        match sandbox.remove(force) {
            Ok(()) => println!("{what}"),
            Err(e) => code = error(Code::Error, &e.to_string()),
        }
    }
    code
}

/// A sandbox as a `ps` row.
fn row(sandbox: &Sandbox) -> Row {
    let config = sandbox.config();
    let front = &config["front_end"];
    let main_exit = crate::sandbox::Dir::read_json(&run::main_exit(sandbox));
    let ended = crate::sandbox::Dir::read_json(&sandbox.dir().state());
    let labels = config["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let image = front["image"]
        .as_str()
        .or_else(|| config["image"]["reference"].as_str())
        .unwrap_or("(airlock guest root)")
        .to_owned();
    let command = serde_json::from_value(front["argv"].clone()).unwrap_or_else(|_| {
        crate::sandbox::KEEPER
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    });
    Row {
        id: id_of(sandbox.name(), &config),
        image,
        command,
        created_unix: config["created_unix"].as_u64().unwrap_or(0),
        running: matches!(sandbox.state(), State::Running(_)),
        exit_code: main_exit
            .as_ref()
            .and_then(|e| e["exit_code"].as_i64())
            .or_else(|| ended.as_ref().and_then(|e| e["exit_code"].as_i64())),
        ended_unix: main_exit
            .as_ref()
            .and_then(|e| e["finished_unix"].as_u64())
            .or_else(|| ended.as_ref().and_then(|e| e["ended_unix"].as_u64())),
        names: sandbox.name().to_owned(),
        labels,
        mounts: Vec::new(),
    }
}

/// `docker ps [-a] [-q] [--no-trunc] [--filter F]... [--format T]`.
fn ps(args: &[String]) -> u8 {
    let f = match flags(
        "ps",
        args,
        &["-a", "--all", "-q", "--quiet", "--no-trunc"],
        &["-f", "--filter", "--format"],
        false,
    ) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    if !f.rest.is_empty() {
        return refuse(&format!("ps takes no arguments ({:?})", f.rest));
    }
    let all = f.has(&["-a", "--all"]);
    let no_trunc = f.has(&["--no-trunc"]);
    let mut filters: Vec<(String, String, Option<String>)> = Vec::new();
    for filter in f.values(&["-f", "--filter"]) {
        match filter.split_once('=') {
            Some(("label", kv)) => match kv.split_once('=') {
                Some((k, v)) => filters.push(("label".into(), k.into(), Some(v.into()))),
                None => filters.push(("label".into(), kv.into(), None)),
            },
            Some(("name", n)) => filters.push(("name".into(), n.into(), None)),
            Some(("id", n)) => filters.push(("id".into(), n.to_ascii_lowercase(), None)),
            Some(("status", s)) if ["running", "exited", "created"].contains(&s) => {
                filters.push(("status".into(), s.into(), None));
            }
            _ => {
                return refuse(&format!(
                    "ps --filter {filter} is not supported (label=KEY[=VALUE], name=NAME, id=ID, status=running|exited)"
                ))
            }
        }
    }
    let format = if f.has(&["-q", "--quiet"]) {
        "{{.ID}}".to_owned()
    } else {
        f.last(&["--format"])
            .unwrap_or_else(|| format::PS_DEFAULT.to_owned())
    };
    let template = match Template::parse(&format) {
        Ok(t) => t,
        Err(e) => return refuse(&e),
    };
    let now = now_unix();
    let mut rows: Vec<(u64, Value)> = Vec::new();
    for sandbox in Sandbox::list() {
        let r = row(&sandbox);
        if !all && !r.running {
            continue;
        }
        // docker: filters of one kind are OR, of different kinds AND.
        let kinds = ["label", "name", "id", "status"];
        let pass = kinds.iter().all(|kind| {
            let of_kind: Vec<_> = filters.iter().filter(|(k, _, _)| k == kind).collect();
            of_kind.is_empty()
                || of_kind.iter().any(|(_, a, b)| match *kind {
                    "label" => r
                        .labels
                        .iter()
                        .any(|(k, v)| k == a && b.as_ref().is_none_or(|b| b == v)),
                    // docker matches a name filter as a substring (regexp).
                    "name" => r.names.contains(a.as_str()),
                    "id" => r.id.starts_with(a.as_str()),
                    _ => (a == "running") == r.running && a != "created",
                })
        });
        if pass {
            rows.push((r.created_unix, r.to_json(now, no_trunc)));
        }
    }
    // Newest first, as docker lists them.
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    let rows: Vec<Value> = rows.into_iter().map(|(_, v)| v).collect();
    print!(
        "{}",
        format::render_all(&template, format::PS_HEADERS, &rows)
    );
    0
}

/// `docker exec [-i] [-e N=V] [-u USER] [-w DIR] NAME CMD...`: by
/// default as the container's user and in its working directory.
fn exec(args: &[String]) -> u8 {
    let tty = args.iter().take_while(|a| a.starts_with('-')).any(|a| {
        a == "--tty"
            || (!a.starts_with("--")
                && a[1..].contains('t')
                && a[1..].chars().all(|c| "itd".contains(c)))
    });
    if tty {
        return refuse("exec -t is refused: a sandbox has no terminal (use -i for stdin)");
    }
    let f = match flags(
        "exec",
        args,
        &["-i", "--interactive"],
        &[
            "-e",
            "--env",
            "-u",
            "--user",
            "-w",
            "--workdir",
            "--env-file",
        ],
        true,
    ) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    let Some((what, command)) = f.rest.split_first() else {
        return refuse("exec needs a container and a command");
    };
    if command.is_empty() {
        return refuse("exec needs a command");
    }
    let sandbox = match find_or_say(what) {
        Ok(s) => s,
        Err(c) => return c,
    };
    if !matches!(sandbox.state(), State::Running(_)) {
        return error(
            Code::Error,
            &format!("Error response from daemon: container {what} is not running"),
        );
    }
    let config = sandbox.config();
    let mut env = Vec::new();
    for e in f.values(&["-e", "--env"]) {
        match e.split_once('=') {
            Some((n, v)) if !n.is_empty() => env.push((n.to_owned(), v.to_owned())),
            _ => {
                if let Ok(v) = std::env::var(&e) {
                    env.push((e, v));
                }
            }
        }
    }
    if !f.values(&["--env-file"]).is_empty() {
        return unsupported("exec --env-file");
    }
    let (run_cwd, run_user) = run_cwd_user(&config);
    let user = f.last(&["-u", "--user"]).or(run_user);
    if let Some(u) = &user {
        if let Err(e) = airlock_protocol::check_exec_user(u) {
            return refuse(&format!("exec -u: {e}"));
        }
    }
    let cwd = f.last(&["-w", "--workdir"]).unwrap_or(run_cwd);
    if !cwd.starts_with('/') {
        return refuse(&format!(
            "exec -w {cwd}: the working directory must be absolute"
        ));
    }
    let spec = ExecSpec {
        argv: command.to_vec(),
        env,
        cwd,
        user,
    };
    let ended = crate::cli::sandbox::exec_attached(
        &sandbox,
        &spec,
        f.has(&["-i", "--interactive"]),
        "airlock docker: exec",
    );
    match ended {
        Ok(end) => exit_code(end),
        Err(e) => error(Code::Failed, &e.to_string()),
    }
}

/// docker's exit code for how a command in a container ended: its own,
/// 127 when it could not be started, 141 (SIGPIPE) when our output closed.
fn exit_code(end: ExecEnd) -> u8 {
    match end {
        ExecEnd::Exited {
            status,
            spawn_failed,
        } => {
            if spawn_failed && status.exit_code() == 127 {
                127
            } else {
                u8::try_from(status.exit_code()).unwrap_or(Code::Failed as u8)
            }
        }
        ExecEnd::OutputClosed => 128 + 13,
    }
}

/// Where a `run` container's commands start and as whom: its working
/// directory and user (the run's `-w`/`-u`, else the image's), else the
/// sandbox's working directory and its container's own user.
fn run_cwd_user(config: &Value) -> (String, Option<String>) {
    let front = &config["front_end"];
    let cwd = front["cwd"]
        .as_str()
        .or_else(|| config["cwd"].as_str())
        .unwrap_or("/")
        .to_owned();
    (cwd, front["user"].as_str().map(str::to_owned))
}

/// `docker logs [--tail N] [-f] NAME`: the main process's output (what
/// `docker run` printed, or `-d` kept), as it was: it is the data asked
/// for, as `docker logs` gives it.
fn logs(args: &[String]) -> u8 {
    let f = match flags(
        "logs",
        args,
        &["-f", "--follow", "-t", "--timestamps"],
        &["-n", "--tail", "--since", "--until"],
        false,
    ) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    if f.has(&["-t", "--timestamps"]) || f.has(&["--since", "--until"]) {
        return unsupported("logs --timestamps/--since/--until");
    }
    let [what] = f.rest.as_slice() else {
        return refuse("logs takes one container");
    };
    let sandbox = match find_or_say(what) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let tail = match f.last(&["-n", "--tail"]).as_deref() {
        None | Some("all") => None,
        Some(n) => match n.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => return refuse(&format!("logs --tail {n}: not a number")),
        },
    };
    let path = run::main_log(&sandbox);
    let text = std::fs::read(&path).unwrap_or_default();
    let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
    let start = tail.map_or(0, |n| lines.len().saturating_sub(n));
    let mut out = io::stdout().lock();
    for line in &lines[start..] {
        let _ = out.write_all(line);
    }
    let _ = out.flush();
    if f.has(&["-f", "--follow"]) {
        let mut offset = text.len() as u64;
        loop {
            let running = matches!(sandbox.state(), State::Running(_));
            if let Ok(mut file) = std::fs::File::open(&path) {
                use std::io::Seek;
                if file.seek(io::SeekFrom::Start(offset)).is_ok() {
                    let mut more = Vec::new();
                    if file.read_to_end(&mut more).is_ok() && !more.is_empty() {
                        offset += more.len() as u64;
                        let _ = out.write_all(&more);
                        let _ = out.flush();
                    }
                }
            }
            if !running {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    0
}

/// The doctor's facts for the policy file's kernel and root image.
fn doctor_args(config: &config::Config) -> crate::cli::DoctorArgs {
    let mut argv = vec!["airlock".to_owned(), "doctor".to_owned()];
    let mut i = 0;
    while i + 1 < config.flags.len() {
        if ["--kernel", "--initrd", "--image-root"].contains(&config.flags[i].as_str()) {
            argv.push(config.flags[i].clone());
            argv.push(config.flags[i + 1].clone());
        }
        i += 2;
    }
    match <crate::cli::Cli as clap::Parser>::try_parse_from(argv) {
        Ok(crate::cli::Cli {
            command: crate::cli::Command::Doctor(d),
        }) => d,
        _ => crate::cli::DoctorArgs {
            image: crate::cli::ImageArgs {
                kernel: None,
                initrd: None,
                image_root: None,
            },
        },
    }
}

/// `docker info`: exit 0 when this host can run sandboxes (the doctor's
/// checks with the policy file's kernel and image), 1 otherwise.
fn info(args: &[String]) -> u8 {
    let f = match flags("info", args, &[], &["-f", "--format"], false) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    if f.has(&["-f", "--format"]) {
        return unsupported("info --format");
    }
    let config = match config::load() {
        Ok(c) => c,
        Err(e) => return refuse(&format!("the policy file: {e}")),
    };
    let (checks, can_run) = crate::cli::doctor::checks(crate::cli::doctor::DoctorFacts::gather(
        &doctor_args(&config),
    ));
    let all = Sandbox::list();
    let running = all
        .iter()
        .filter(|s| matches!(s.state(), State::Running(_)))
        .count();
    let images = crate::image::store::Store::open_default()
        .and_then(|s| s.list())
        .map_or(0, |l| l.len());
    println!("Server:");
    println!(" Containers: {}", all.len());
    println!("  Running: {running}");
    println!("  Stopped: {}", all.len() - running);
    println!(" Images: {images}");
    println!(" Server Version: airlock-{}", env!("CARGO_PKG_VERSION"));
    println!(" Isolation: one microVM per container, no network device");
    println!(
        " Policy file: {}",
        config.source.as_ref().map_or_else(
            || "(none: defaults)".to_owned(),
            |p| p.display().to_string()
        )
    );
    println!(" Sandboxes: {}", crate::sandbox::root().display());
    println!(" Host checks:");
    for c in &checks {
        println!("  {c}");
    }
    if can_run {
        0
    } else {
        error(
            Code::Error,
            "this host cannot run sandboxes yet: see the FAIL lines (`airlock doctor`)",
        )
    }
}

/// `docker version`.
fn version(args: &[String]) -> u8 {
    if !args.is_empty() {
        return unsupported(&format!("version {}", args.join(" ")));
    }
    let v = env!("CARGO_PKG_VERSION");
    println!("Client: airlock docker front end");
    println!(" Version:           24.0.0-airlock-{v}");
    println!(" API version:       1.43");
    println!(" OS/Arch:           linux/amd64");
    println!();
    println!("Server: Airlock");
    println!(" Engine:");
    println!("  Version:          airlock-{v}");
    println!("  Isolation:        microVM (kvm: airlock-vmm; tcg: QEMU)");
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn flags_split_as_docker() {
        let f = flags(
            "stop",
            &argv(&["-t", "1", "a", "--time=3", "b"]),
            &[],
            &["-t", "--time"],
            false,
        )
        .expect("parses");
        assert_eq!(f.values(&["-t", "--time"]), ["1", "3"]);
        assert_eq!(f.rest, ["a", "b"]);
        let f = flags("stop", &argv(&["-t5", "a"]), &[], &["-t"], false).expect("parses");
        assert_eq!(f.last(&["-t"]).as_deref(), Some("5"));
        let f = flags("rm", &argv(&["-fv", "a"]), &["-f", "-v"], &[], false).expect("parses");
        assert!(f.has(&["-f"]) && f.has(&["-v"]));
        let e = flags("rm", &argv(&["--link", "a"]), &["-f"], &[], false).expect_err("unknown");
        assert_eq!(e, "rm flag --link is not supported");
        let e = flags("stop", &argv(&["a", "-t"]), &[], &["-t"], false).expect_err("no value");
        assert_eq!(e, "stop -t needs a value");
        // exec: flags end at the container; the command keeps its own.
        let f = flags("exec", &argv(&["-i", "c", "ls", "-l"]), &["-i"], &[], true).expect("parses");
        assert_eq!(f.rest, ["c", "ls", "-l"]);
    }

    #[test]
    fn unknown_subcommands_and_global_flags_exit_125() {
        assert_eq!(main(&argv(&["network", "create", "x"])), 125);
        assert_eq!(main(&argv(&["--host", "tcp://x", "ps"])), 125);
        assert_eq!(main(&argv(&["compose", "up"])), 125);
        assert_eq!(main(&argv(&["container", "prune"])), 125);
        assert_eq!(main(&argv(&["run", "--privileged", "img"])), 125);
        assert_eq!(main(&argv(&["ps", "--filter", "ancestor=x"])), 125);
        assert_eq!(main(&argv(&["ps", "--format", "{{range .}}{{end}}"])), 125);
        assert_eq!(main(&argv(&["kill", "-s", "HUP", "x"])), 125);
        assert_eq!(main(&argv(&["exec", "-t", "x", "sh"])), 125);
        assert_eq!(main(&argv(&["--version"])), 0);
    }
}
