//! `docker run`: one Airlock sandbox (its own microVM) per container.
//! The front end makes `airlock create`'s arguments from the parsed
//! command line and the policy file, starts the sandbox as `create`
//! does, then runs the container's main process (the image's Entrypoint
//! and Cmd as docker combines them with `--entrypoint` and the command)
//! as one exec, in the foreground or, with `-d`, in a detached process of
//! its own. When the main process ends the sandbox stops (and with `--rm`
//! is removed), and its exit code is `docker run`'s.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

use super::config::{self, Config};
use super::run_args::{self, DockerRun, EnvArg};
use super::{refuse, Code, HOST_NAMES};
use crate::cli::sandbox::now_unix;
use crate::sandbox::lifecycle::{ExecSpec, Sandbox, State};

/// The main process's output kept for `docker logs`, at most this much
/// (then a line saying so): a guest cannot grow the host's disk.
pub const MAX_MAIN_LOG: u64 = 16 << 20;

/// How long the sandbox is given to stop once its main process ended.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// The variables a proxy is named in.
const PROXY_VARS: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// An `--env-file` may not be larger than this.
const MAX_ENV_FILE: u64 = 1 << 20;

/// A new container ID: 64 hex digits.
pub fn new_id(name: &str) -> String {
    use sha2::Digest;
    let seed = format!("{}\0{name}\0{}", crate::audit::new_run_id(), now_unix());
    crate::audit::record::hex(&sha2::Sha256::digest(seed.as_bytes()))
}

/// `-e` and `--env-file` resolved as docker does: `NAME=VALUE` as given,
/// a bare `NAME` from our environment when it is set there (else left
/// out); files of `NAME=VALUE` / `NAME` lines, `#` comments.
fn resolve_env(run: &DockerRun) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut put = |name: String, value: String| {
        env.retain(|(n, _)| *n != name);
        env.push((name, value));
    };
    let inherit = |name: &str| std::env::var(name).ok();
    for file in &run.env_files {
        let mut text = String::new();
        fs::File::open(file)
            .and_then(|f| f.take(MAX_ENV_FILE + 1).read_to_string(&mut text))
            .map_err(|e| format!("--env-file {file}: {e}"))?;
        if text.len() as u64 > MAX_ENV_FILE {
            return Err(format!("--env-file {file}: larger than 1 MiB"));
        }
        for line in text.lines() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once('=') {
                Some((n, v)) => put(n.to_owned(), v.to_owned()),
                None => {
                    if let Some(v) = inherit(line.trim_end()) {
                        put(line.trim_end().to_owned(), v);
                    }
                }
            }
        }
    }
    for e in &run.env {
        match e {
            EnvArg::Set(n, v) => put(n.clone(), v.clone()),
            EnvArg::Inherit(n) => {
                if let Some(v) = inherit(n) {
                    put(n.clone(), v);
                }
            }
        }
    }
    for (name, value) in &env {
        if name.is_empty() || name.contains('\0') || value.contains('\0') {
            return Err(format!("-e {name:?}: not NAME=VALUE"));
        }
    }
    Ok(mirror_proxy_case(env))
}

/// A proxy variable given in one case is given in the other too (unless
/// that one is given as well): the sandbox's own defaults are set in both
/// cases, and clients differ in which they read first (Python's urllib and
/// curl prefer lower case), so a platform's `HTTPS_PROXY` must not be
/// shadowed by the sandbox's `https_proxy`.
fn mirror_proxy_case(mut env: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut add = Vec::new();
    for (name, value) in &env {
        let upper = name.to_ascii_uppercase();
        if !PROXY_VARS.contains(&upper.as_str()) && upper != "NO_PROXY" {
            continue;
        }
        let other = if *name == upper {
            name.to_ascii_lowercase()
        } else {
            upper
        };
        if !env.iter().any(|(n, _)| *n == other)
            && !add.iter().any(|(n, _): &(String, String)| *n == other)
        {
            add.push((other, value.clone()));
        }
    }
    env.extend(add);
    env
}

/// The host port a proxy URL names on the host's own names, if it does:
/// `http://user:pw@host.docker.internal:10255` → 10255.
pub fn host_proxy_port(url: &str) -> Option<u16> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok()?),
        None => (
            hostport,
            match scheme.to_ascii_lowercase().as_str() {
                "https" => 443,
                s if s.starts_with("socks") => 1080,
                _ => 80,
            },
        ),
    };
    HOST_NAMES
        .iter()
        .any(|n| n.eq_ignore_ascii_case(host))
        .then_some(port)
}

/// The host ports the sandbox forwards: every allowed one with
/// `--add-host NAME:host-gateway`, and any a proxy variable names (which
/// must be allowed).
fn forwards(
    run: &DockerRun,
    env: &[(String, String)],
    config: &Config,
) -> Result<Vec<(u16, u16)>, String> {
    for name in &run.host_gateway_names {
        if !HOST_NAMES.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            return Err(format!(
                "run --add-host {name}:host-gateway is refused: a sandbox names the host only as {}",
                HOST_NAMES.join(" or ")
            ));
        }
    }
    let mut out: Vec<(u16, u16)> = Vec::new();
    if !run.host_gateway_names.is_empty() {
        out.extend(config.host_ports.iter().copied());
    }
    for (name, value) in env {
        if !PROXY_VARS.contains(&name.as_str()) {
            continue;
        }
        let Some(port) = host_proxy_port(value) else {
            continue;
        };
        let Some(pair) = config.host_ports.iter().find(|(p, _)| *p == port) else {
            return Err(format!(
                "{name} names host port {port} on {}, which the policy file ({}) does not \
                 allow: add {port} to its host_ports",
                HOST_NAMES[0],
                config.source.as_ref().map_or_else(
                    || config::path().map_or_else(String::new, |p| p.display().to_string()),
                    |p| p.display().to_string()
                )
            ));
        };
        if !out.contains(pair) {
            out.push(*pair);
        }
    }
    Ok(out)
}

/// The image: a stored one, by the reference given.
fn stored_image(reference: &str) -> Result<crate::image::store::Stored, String> {
    let store =
        crate::image::store::Store::open_default().map_err(|e| format!("the image store: {e}"))?;
    store.resolve(reference).map_err(|e| match e {
        crate::image::Error::NotFound(_) => format!(
            "Unable to find image '{reference}' locally: airlock does not pull; load it \
             with `docker load -i FILE` or build it with `docker build -t {reference} .`"
        ),
        other => other.to_string(),
    })
}

/// `docker run ARGS`.
pub fn run(args: &[String]) -> u8 {
    let parsed = match run_args::parse(args) {
        Ok(p) => p,
        Err(e) => return refuse(&e.0),
    };
    let config = match config::load() {
        Ok(c) => c,
        Err(e) => return refuse(&format!("the policy file: {e}")),
    };
    let env = match resolve_env(&parsed) {
        Ok(env) => env,
        Err(e) => return refuse(&e),
    };
    let forwards = match forwards(&parsed, &env, &config) {
        Ok(f) => f,
        Err(e) => return refuse(&e),
    };
    let image = match stored_image(&parsed.image) {
        Ok(i) => i,
        Err(e) => return refuse(&e),
    };
    let image_config = match image.config() {
        Ok(c) => crate::image::ImageConfig::from_json(&c),
        Err(e) => return refuse(&e.to_string()),
    };
    // The main process, as docker makes it from the image and the options.
    let applied = match crate::image::apply(
        &image_config,
        crate::image::Overrides {
            command: parsed.command.clone(),
            entrypoint: parsed.entrypoint.clone(),
            env: Vec::new(),
            workdir: parsed.workdir.clone(),
            user: parsed.user.clone(),
        },
    ) {
        Ok(a) => a,
        Err(e) => return refuse(&e.to_string()),
    };
    if applied.argv.is_empty() {
        return refuse(
            "No command specified: the image has no Entrypoint or Cmd and none was given",
        );
    }
    let name = parsed.name.clone().unwrap_or_else(crate::sandbox::new_name);
    if let Ok(existing) = Sandbox::open(&name) {
        if existing.dir().exists() {
            return super::error(
                Code::Refused,
                &format!(
                    "Conflict. The container name \"/{name}\" is already in use: remove it \
                     with `docker rm -f {name}`"
                ),
            );
        }
    }
    // `airlock create`'s arguments: the policy file's, then the run's.
    // `--memory` and `--cpus` of the run stand over the policy file's.
    let mut create: Vec<String> = Vec::new();
    for pair in config.flags.chunks(2) {
        let over = (pair[0] == "--mem" && parsed.memory_mib.is_some())
            || (pair[0] == "--cpus" && parsed.cpus.is_some());
        if !over {
            create.extend_from_slice(pair);
        }
    }
    if !config.sets_mem && parsed.memory_mib.is_none() {
        create.extend(["--mem".into(), config::DEFAULT_MEM_MIB.to_string()]);
    }
    if let Some(m) = parsed.memory_mib {
        create.extend(["--mem".into(), m.to_string()]);
    }
    if let Some(c) = parsed.cpus {
        create.extend(["--cpus".into(), c.to_string()]);
    }
    create.extend(["--name".into(), name.clone()]);
    for (k, v) in &parsed.labels {
        create.extend(["--label".into(), format!("{k}={v}")]);
    }
    for (n, v) in &env {
        create.extend(["-e".into(), format!("{n}={v}")]);
    }
    for v in &parsed.volumes {
        create.extend(["-v".into(), v.clone()]);
    }
    for m in &parsed.mounts {
        create.extend(["--mount".into(), m.clone()]);
    }
    if let Some(w) = &applied.cwd {
        create.extend(["-w".into(), w.clone()]);
    }
    for (port, host) in &forwards {
        create.extend(["--host-port".into(), format!("{port}:{host}")]);
    }
    create.extend(["--image".into(), image.digest.clone()]);
    let parsed_create = match crate::cli::Cli::try_parse_from(
        ["airlock", "create"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain(create.iter().cloned()),
    ) {
        Ok(crate::cli::Cli {
            command: crate::cli::Command::Create(c),
        }) => *c,
        Ok(_) => return refuse("internal: not a create command line"),
        Err(e) => {
            // clap's own words name the option (from the policy file,
            // or one of the run's values).
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ");
            return refuse(&format!(
                "{first} (the policy file's and the run's options as `airlock create` takes them)"
            ));
        }
    };
    let id = new_id(&name);
    let front = json!({
        "kind": "docker",
        "id": id,
        "image": parsed.image,
        "argv": applied.argv,
        "cwd": applied.cwd,
        "user": applied.user,
        "rm": parsed.rm,
        "detach": parsed.detach,
    });
    let original: Vec<OsString> = create.iter().map(OsString::from).collect();
    let started = crate::cli::sandbox::start(parsed_create, original, front);
    if let Err(exit) = started {
        return match exit {
            crate::exit::Exit::Usage => Code::Refused as u8,
            _ => Code::Failed as u8,
        };
    }
    if parsed.detach {
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                return super::error(
                    Code::Failed,
                    &format!("cannot find airlock's own binary: {e}"),
                )
            }
        };
        let mut child = Command::new(exe);
        child
            .args(["docker", "__main", &name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid(2) in the child before exec; async-signal-safe.
        unsafe {
            child.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        if let Err(e) = child.spawn() {
            let _ = Sandbox::open(&name).map(|s| s.remove(true));
            return super::error(Code::Failed, &format!("cannot start the main process: {e}"));
        }
        println!("{id}");
        return 0;
    }
    main_process(&name, parsed.interactive, true)
}

/// The main log of a sandbox: its main process's output.
pub fn main_log(sandbox: &Sandbox) -> PathBuf {
    sandbox.dir().path.join("main.log")
}

/// Where the main process's exit is kept.
pub fn main_exit(sandbox: &Sandbox) -> PathBuf {
    sandbox.dir().path.join("main.exit.json")
}

/// Output to our own stream (unless detached) and to the main log, the
/// log bounded.
struct Tee {
    to: Option<Box<dyn Write>>,
    log: Option<fs::File>,
    logged: u64,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(log) = &mut self.log {
            let room = MAX_MAIN_LOG.saturating_sub(self.logged);
            let n = usize::try_from(room).unwrap_or(usize::MAX).min(buf.len());
            if n > 0 && log.write_all(&buf[..n]).is_ok() {
                self.logged += n as u64;
            }
            if n < buf.len() {
                let _ =
                    log.write_all(b"\n[airlock: the log is full (16 MiB); the rest is not kept]\n");
                self.log = None;
            }
        }
        if let Some(to) = &mut self.to {
            to.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.to.as_mut().map_or(Ok(()), Write::flush)
    }
}

/// Runs the sandbox `name`'s main process (its config's `front_end`) to
/// its end, then stops the sandbox (removing it with `--rm`); its exit
/// code. `attached`: our stdout/stderr are the container's and SIGINT /
/// SIGTERM / SIGHUP to us stop the sandbox, as docker's proxied signals
/// end the container.
pub fn main_process(name: &str, stdin: bool, attached: bool) -> u8 {
    let sandbox = match Sandbox::open(name) {
        Ok(s) => s,
        Err(e) => return super::error(Code::Failed, &e.to_string()),
    };
    let config = sandbox.config();
    let front = &config["front_end"];
    let (cwd, user) = super::run_cwd_user(&config);
    let spec = ExecSpec {
        argv: serde_json::from_value(front["argv"].clone()).unwrap_or_default(),
        env: Vec::new(),
        cwd,
        user,
    };
    let stopping = Arc::new(AtomicBool::new(false));
    if attached {
        let signalled = Arc::new(AtomicBool::new(false));
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let _ = signal_hook::flag::register(signal, Arc::clone(&signalled));
        }
        let stopping = Arc::clone(&stopping);
        let name = name.to_owned();
        std::thread::spawn(move || loop {
            if signalled.load(Ordering::SeqCst) {
                stopping.store(true, Ordering::SeqCst);
                if let Ok(s) = Sandbox::open(&name) {
                    s.stop(Duration::from_secs(10));
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        });
    }
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(main_log(&sandbox))
        .ok();
    let log2 = log.as_ref().and_then(|f| f.try_clone().ok());
    let mut out = Tee {
        to: attached.then(|| Box::new(io::stdout()) as Box<dyn Write>),
        log,
        logged: 0,
    };
    let mut err = Tee {
        to: attached.then(|| Box::new(io::stderr()) as Box<dyn Write>),
        log: log2,
        logged: 0,
    };
    let input: Option<Box<dyn Read + Send>> =
        stdin.then(|| Box::new(io::stdin()) as Box<dyn Read + Send>);
    let ended = sandbox.exec(&spec, input, &mut out, &mut err, &mut |message| {
        if attached {
            eprintln!(
                "airlock docker: {}",
                crate::text::sanitize(message.as_bytes())
            );
        }
    });
    let stopped_from_outside = !matches!(sandbox.state(), State::Running(_));
    let code: u8 = match ended {
        Ok(end) => super::exit_code(end),
        // The sandbox was stopped under it (`docker stop`, `kill`): its
        // processes were killed, as docker says: 137.
        Err(_) if stopped_from_outside || stopping.load(Ordering::SeqCst) => 137,
        Err(e) => {
            if attached {
                eprintln!("airlock docker: {e}");
            }
            Code::Failed as u8
        }
    };
    let _ = crate::sandbox::write_json(
        &main_exit(&sandbox),
        &json!({"exit_code": code, "finished_unix": now_unix()}),
    );
    if matches!(sandbox.state(), State::Running(_)) {
        sandbox.stop(STOP_GRACE);
    }
    if front["rm"].as_bool() == Some(true) {
        if let Ok(s) = Sandbox::open(name) {
            let _ = s.remove(true);
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_on_the_host_name_their_port() {
        assert_eq!(
            host_proxy_port("http://x:tok@host.docker.internal:10255"),
            Some(10255)
        );
        assert_eq!(host_proxy_port("http://host.docker.internal"), Some(80));
        assert_eq!(host_proxy_port("https://HOST.AIRLOCK.INTERNAL/"), Some(443));
        assert_eq!(
            host_proxy_port("socks5h://host.docker.internal"),
            Some(1080)
        );
        assert_eq!(host_proxy_port("host.docker.internal:3128"), Some(3128));
        assert_eq!(host_proxy_port("http://proxy.example:3128"), None);
        assert_eq!(host_proxy_port("http://host.docker.internal.evil:1"), None);
        assert_eq!(host_proxy_port("http://host.docker.internal:99999"), None);
    }

    fn run(hosts: &[&str]) -> DockerRun {
        DockerRun {
            host_gateway_names: hosts.iter().map(|h| (*h).to_owned()).collect(),
            ..DockerRun::default()
        }
    }

    #[test]
    fn forwards_come_from_host_gateway_and_proxies_within_the_policy() {
        let config = Config {
            host_ports: vec![(10255, 10255), (8080, 18080)],
            ..Config::default()
        };
        let none: Vec<(String, String)> = Vec::new();
        assert_eq!(forwards(&run(&[]), &none, &config), Ok(vec![]));
        assert_eq!(
            forwards(&run(&["host.docker.internal"]), &none, &config),
            Ok(vec![(10255, 10255), (8080, 18080)])
        );
        let proxy = vec![(
            "HTTPS_PROXY".to_owned(),
            "http://x:tok@host.docker.internal:10255".to_owned(),
        )];
        assert_eq!(
            forwards(&run(&[]), &proxy, &config),
            Ok(vec![(10255, 10255)])
        );
        let other = vec![(
            "HTTP_PROXY".to_owned(),
            "http://host.docker.internal:9999".to_owned(),
        )];
        let e = forwards(&run(&[]), &other, &config).expect_err("not allowed");
        assert!(
            e.contains("host port 9999") && e.contains("host_ports"),
            "{e}"
        );
        let e = forwards(&run(&["db.local"]), &none, &config).expect_err("other name");
        assert!(
            e.contains("--add-host db.local:host-gateway is refused"),
            "{e}"
        );
        // A variable that is not a proxy's is not a forward.
        let not_proxy = vec![(
            "DB_URL".to_owned(),
            "http://host.docker.internal:9999".to_owned(),
        )];
        assert_eq!(forwards(&run(&[]), &not_proxy, &config), Ok(vec![]));
    }

    #[test]
    fn env_resolves_as_docker() {
        let dir = std::env::temp_dir().join(format!("airlock-envfile-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("env");
        fs::write(
            &file,
            "# comment\n\nA=1\nPATH\nUNSET_AIRLOCK_TEST_VAR\nB=x=y\n",
        )
        .expect("write");
        let r = DockerRun {
            env_files: vec![file.display().to_string()],
            env: vec![
                EnvArg::Set("A".into(), "2".into()),
                EnvArg::Inherit("UNSET_AIRLOCK_TEST_VAR_2".into()),
            ],
            ..DockerRun::default()
        };
        let env = resolve_env(&r).expect("resolves");
        let get = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert_eq!(get("A").as_deref(), Some("2"));
        assert_eq!(get("B").as_deref(), Some("x=y"));
        assert_eq!(get("PATH"), std::env::var("PATH").ok());
        assert_eq!(get("UNSET_AIRLOCK_TEST_VAR"), None);
        assert_eq!(get("UNSET_AIRLOCK_TEST_VAR_2"), None);
        let r = DockerRun {
            env: vec![
                EnvArg::Set("HTTPS_PROXY".into(), "http://gw:1".into()),
                EnvArg::Set("no_proxy".into(), "a".into()),
                EnvArg::Set("HTTP_PROXY".into(), "http://gw:2".into()),
                EnvArg::Set("http_proxy".into(), "http://other:3".into()),
            ],
            ..DockerRun::default()
        };
        let env = resolve_env(&r).expect("resolves");
        let get = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert_eq!(get("https_proxy").as_deref(), Some("http://gw:1"));
        assert_eq!(get("NO_PROXY").as_deref(), Some("a"));
        assert_eq!(get("http_proxy").as_deref(), Some("http://other:3"));
        assert_eq!(get("HTTP_PROXY").as_deref(), Some("http://gw:2"));
        assert_eq!(get("ALL_PROXY"), None);
        let _ = fs::remove_dir_all(&dir);
    }
}
