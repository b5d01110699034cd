//! `airlock pool`: warm pools of ready sandboxes (the library is
//! [`crate::sandbox::pool`]); here the options are checked, the pool's
//! key is computed, and the keeper and its members are started.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::cli::{CreateArgs, ListFormat, PoolArgs, PoolCommand, PoolLsArgs, PoolRmArgs};
use crate::exit::Exit;
use crate::sandbox::lifecycle::Sandbox;
use crate::sandbox::pool::{self, PoolDir, MAX_SIZE};
use crate::sandbox::{private_dir, write_json};

/// How long `pool` waits for its keeper to take the lock.
const KEEPER_PATIENCE: Duration = Duration::from_secs(20);
/// How long `pool --wait` waits for the pool to fill.
const FILL_PATIENCE: Duration = Duration::from_secs(1800);
/// Largest file whose content goes into a pool's key.
const MAX_KEY_FILE: u64 = 1 << 20;

fn usage(message: impl std::fmt::Display) -> Exit {
    eprintln!("airlock: error: {message}");
    Exit::Usage
}

fn failed(message: impl std::fmt::Display) -> Exit {
    eprintln!("airlock: error: {message}");
    Exit::SandboxFailed
}

/// `airlock pool`.
pub fn main(args: PoolArgs) -> Exit {
    match &args.command {
        Some(PoolCommand::Ls(ls_args)) => ls(ls_args),
        Some(PoolCommand::Rm(rm_args)) => rm(rm_args),
        None if args.member => {
            let dir = PoolDir::of(&args.pool);
            super::sandbox::supervise_in(args.create, Some(&dir))
        }
        None if args.keep => keep(&args),
        None => start(&args),
    }
}

/// The arguments after `pool` on our own command line (without
/// `--wait`, which is about this command, not the pool).
fn original_args() -> Vec<OsString> {
    std::env::args_os()
        .skip_while(|a| a != "pool")
        .skip(1)
        .filter(|a| a != "--wait")
        .collect()
}

/// Refuses what a pool cannot hold (see the command's help).
fn check(args: &PoolArgs) -> Result<u32, Exit> {
    if !pool::valid_pool_name(&args.pool) {
        return Err(usage(format!(
            "--pool '{}': not a pool name ([a-zA-Z0-9][a-zA-Z0-9_.-]{{0,31}})",
            crate::text::sanitize(args.pool.as_bytes())
        )));
    }
    let size = match args.size {
        Some(n) if (1..=MAX_SIZE).contains(&n) => n,
        Some(n) => {
            return Err(usage(format!(
                "--size {n}: a pool holds 1 to {MAX_SIZE} sandboxes (`airlock pool rm` stops one)"
            )))
        }
        None => return Err(usage("--size N is needed (or `pool ls`, `pool rm NAME`)")),
    };
    let c = &args.create;
    let run = &c.run;
    let refused: [(bool, &str); 10] = [
        (c.name.is_some(), "--name"),
        (!c.labels.is_empty(), "--label"),
        (c.no_pool, "--no-pool"),
        (run.workspace.is_some(), "--workspace"),
        (run.out.is_some(), "--out"),
        (!run.mounts.is_empty(), "--mount"),
        (!run.volumes.is_empty(), "--volume"),
        (run.audit.is_some(), "--audit"),
        (run.report.is_some(), "--report"),
        (run.console_log.is_some(), "--console-log"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(given, _)| *given) {
        let why = if matches!(*flag, "--name" | "--label" | "--no-pool") {
            "names and labels are given when `create` takes a sandbox"
        } else {
            "a pooled sandbox boots before its user asks for it, so it cannot take host files in or write them"
        };
        return Err(usage(format!("a pool cannot take {flag}: {why}")));
    }
    Ok(size)
}

/// What `create` must match to take one of a pool's sandboxes: this
/// airlock binary, the options (names and labels aside), the sandbox's
/// config (the stored image's digest), and the values of the environment
/// variables and the contents of the files the options name.
pub(crate) fn key(create: &CreateArgs, config: &Value) -> String {
    let mut norm = create.clone();
    norm.name = None;
    norm.labels.clear();
    norm.supervise = false;
    norm.no_pool = false;
    let options = format!("{norm:?}");
    let mut h = Sha256::new();
    h.update(b"airlock pool key 1\0");
    if let Some(meta) = std::env::current_exe()
        .ok()
        .and_then(|e| fs::metadata(e).ok())
    {
        h.update(
            format!(
                "{}:{}:{}:{}.{}\0",
                meta.dev(),
                meta.ino(),
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec()
            )
            .as_bytes(),
        );
    }
    h.update(options.as_bytes());
    h.update(b"\0");
    let mut config = config.clone();
    if let Some(map) = config.as_object_mut() {
        for per_sandbox in ["name", "labels", "created_unix", "front_end"] {
            map.remove(per_sandbox);
        }
    }
    h.update(config.to_string().as_bytes());
    h.update(b"\0");
    // Every environment variable whose name the options mention, and the
    // provider keys read by default.
    let words: HashSet<&str> = options
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect();
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(name, _)| {
            name.to_str().is_some_and(|n| {
                words.contains(n)
                    || n == crate::model::config::ANTHROPIC_KEY_ENV
                    || n == crate::model::config::OPENAI_KEY_ENV
                    || n == crate::model::config::OAUTH_TOKEN_ENV
            })
        })
        .collect();
    vars.sort();
    for (name, value) in vars {
        h.update(name.as_encoded_bytes());
        h.update(b"=");
        h.update(Sha256::digest(value.as_encoded_bytes()));
        h.update(b"\0");
    }
    // What boots: the kernel and the initrd or root image as `run` resolves
    // them (flags, $AIRLOCK_KERNEL and the like, the build directory), by size,
    // modification time and inode (a rebuild changes the key).
    match crate::run::RunConfig::try_from(super::sandbox::supervised_run(create)) {
        Ok(run) => {
            let image = &run.image;
            for path in [
                Some(&image.kernel),
                Some(&image.initrd),
                image.root.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                h.update(path.as_os_str().as_encoded_bytes());
                if let Ok(meta) = fs::metadata(path) {
                    h.update(
                        format!(
                            ":{}:{}:{}.{}\0",
                            meta.ino(),
                            meta.len(),
                            meta.mtime(),
                            meta.mtime_nsec()
                        )
                        .as_bytes(),
                    );
                }
            }
        }
        Err(e) => h.update(format!("unresolved: {e}").as_bytes()),
    }
    // Every file a quoted option names (keys files, `file:` secrets).
    for quoted in options.split('"').skip(1).step_by(2) {
        let after_eq = quoted.rsplit_once('=').map(|(_, v)| v);
        let after_file = quoted.rsplit_once("file:").map(|(_, v)| v);
        for candidate in [Some(quoted), after_eq, after_file].into_iter().flatten() {
            let path = std::path::Path::new(candidate);
            let Ok(meta) = fs::metadata(path) else {
                continue;
            };
            if !meta.is_file() || meta.len() > MAX_KEY_FILE {
                continue;
            }
            if let Ok(content) = fs::read(path) {
                h.update(candidate.as_bytes());
                h.update(b"\0");
                h.update(Sha256::digest(&content));
            }
        }
    }
    crate::audit::record::hex(&h.finalize())
}

/// `airlock pool --size N [--pool NAME] [CREATE OPTIONS]`.
fn start(args: &PoolArgs) -> Exit {
    let size = match check(args) {
        Ok(size) => size,
        Err(exit) => return exit,
    };
    let config = match super::sandbox::plan(&args.create, "pool-member", Value::Null) {
        Ok(config) => config,
        Err(exit) => return exit,
    };
    let key = key(&args.create, &config);
    let dir = PoolDir::of(&args.pool);
    let name = &args.pool;
    if dir.keeper().is_some() {
        let Some(mut spec) = dir.read_spec() else {
            return failed(format!("the pool {name} has no pool.json"));
        };
        if spec["key"].as_str() != Some(key.as_str()) {
            return usage(format!(
                "the pool {name} keeps sandboxes made with other options, files or variables, or by another airlock binary: `airlock pool rm {name}` first, or name another with --pool"
            ));
        }
        spec["size"] = json!(size);
        if let Err(e) = write_json(&dir.spec(), &spec) {
            return failed(format!("cannot write {}: {e}", dir.spec().display()));
        }
        println!("{name}");
        return if args.wait {
            wait_full(&dir, size)
        } else {
            Exit::Success
        };
    }
    // A pool whose keeper is gone: its waiting sandboxes go with it.
    if dir.path.exists() {
        remove_pool(&dir);
    }
    let made = private_dir(&pool::pools_root()).and_then(|()| {
        fs::DirBuilder::new().mode(0o700).create(&dir.path)?;
        fs::DirBuilder::new().mode(0o700).create(dir.members_dir())
    });
    if let Err(e) = made {
        return failed(format!("cannot make {}: {e}", dir.path.display()));
    }
    let shown: Vec<String> = original_args()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let spec = json!({
        "name": name,
        "size": size,
        "key": key,
        "config": config,
        "args": shown,
        "created_unix": super::sandbox::now_unix(),
    });
    if let Err(e) = write_json(&dir.spec(), &spec) {
        let _ = fs::remove_dir_all(&dir.path);
        return failed(format!("cannot write {}: {e}", dir.spec().display()));
    }
    if let Err(exit) = spawn_keeper(&dir) {
        let _ = fs::remove_dir_all(&dir.path);
        return exit;
    }
    println!("{name}");
    if args.wait {
        wait_full(&dir, size)
    } else {
        Exit::Success
    }
}

/// Starts the keeper (`airlock pool --keep ...`, its own session, its
/// lines in keeper.log) and waits until it holds the pool's lock.
fn spawn_keeper(dir: &PoolDir) -> Result<(), Exit> {
    let exe = std::env::current_exe()
        .map_err(|e| failed(format!("cannot find airlock's own binary: {e}")))?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.log())
        .map_err(|e| failed(format!("cannot open {}: {e}", dir.log().display())))?;
    let mut command = Command::new(exe);
    command
        .arg("pool")
        .arg("--keep")
        .args(original_args())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_or_else(|_| Stdio::null(), Stdio::from))
        .stderr(Stdio::from(log));
    crate::sandbox::detach(&mut command);
    let mut child = command
        .spawn()
        .map_err(|e| failed(format!("cannot start the pool's keeper: {e}")))?;
    let deadline = Instant::now() + KEEPER_PATIENCE;
    while dir.keeper().is_none() {
        if let Ok(Some(status)) = child.try_wait() {
            let log = fs::read(dir.log()).unwrap_or_default();
            eprintln!("airlock: error: the pool's keeper exited ({status}); its log:");
            eprint!("{}", crate::text::sanitize(&log));
            return Err(Exit::SandboxFailed);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Err(failed("the pool's keeper did not start"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Waits until `dir` holds `size` ready members.
fn wait_full(dir: &PoolDir, size: u32) -> Exit {
    let deadline = Instant::now() + FILL_PATIENCE;
    loop {
        let ready = dir
            .members()
            .iter()
            .filter(|m| pool::describe_member(m)["state"] == "ready")
            .count();
        if ready >= usize::try_from(size).unwrap_or(usize::MAX) {
            return Exit::Success;
        }
        if dir.keeper().is_none() {
            return failed(format!(
                "the pool {}'s keeper ended; see {}",
                dir.name,
                dir.log().display()
            ));
        }
        if Instant::now() >= deadline {
            return failed(format!(
                "the pool {} did not fill in {} s; see {}",
                dir.name,
                FILL_PATIENCE.as_secs(),
                dir.log().display()
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The keeper: holds the pool's lock, boots members as `airlock pool
/// --member ...`, until SIGTERM/SIGINT/SIGHUP or its pool.json is gone.
fn keep(args: &PoolArgs) -> Exit {
    let dir = PoolDir::of(&args.pool);
    let lock = match crate::sandbox::take_lock(&dir.lock()) {
        Ok(Some(lock)) => lock,
        Ok(None) => return usage(format!("the pool {} already has a keeper", dir.name)),
        Err(e) => return failed(format!("cannot open {}: {e}", dir.lock().display())),
    };
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let value = usize::try_from(sig).unwrap_or(1);
        if let Err(e) = signal_hook::flag::register_usize(sig, Arc::clone(&signal), value) {
            return failed(format!("cannot handle signals: {e}"));
        }
    }
    let Some(spec) = dir.read_spec() else {
        return failed(format!("no {}", dir.spec().display()));
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return failed(format!("cannot find airlock's own binary: {e}")),
    };
    // The members' command line: ours, with --member for --keep.
    let member_args: Vec<OsString> = std::iter::once(OsString::from("pool"))
        .chain(std::iter::once(OsString::from("--member")))
        .chain(original_args().into_iter().filter(|a| a != "--keep"))
        .collect();
    let log = |line: &str| {
        eprintln!(
            "airlock: pool {}: {}: {line}",
            dir.name,
            crate::audit::time::rfc3339(crate::audit::time::micros(std::time::SystemTime::now()))
        );
    };
    log(&format!(
        "keeper {} started, size {}",
        std::process::id(),
        spec["size"]
    ));
    let boot = |member: crate::sandbox::Dir| {
        let mut config = spec["config"].clone();
        config["name"] = json!(member.name);
        config["created_unix"] = json!(super::sandbox::now_unix());
        let mut supervisor = Command::new(&exe);
        supervisor
            .args(&member_args)
            .env(super::sandbox::NAME_ENV, &member.name);
        Sandbox::create_at(member, &config, supervisor)
    };
    let done = || signal.load(Ordering::SeqCst) != 0 || !dir.spec().exists();
    pool::keep(&pool::Keeper {
        pool: &dir,
        boot: &boot,
        done: &done,
        log: &log,
    });
    let _ = fs::remove_dir_all(&dir.path);
    log("keeper ended; the pool is removed");
    drop(lock);
    Exit::Success
}

/// Stops a pool whose keeper is gone: its members, then its directory.
fn remove_pool(dir: &PoolDir) {
    for member in dir.members() {
        pool::stop_member(&member);
    }
    let _ = fs::remove_dir_all(&dir.path);
}

/// `airlock pool ls`.
fn ls(args: &PoolLsArgs) -> Exit {
    let rows: Vec<Value> = pool::list()
        .iter()
        .map(|dir| {
            let spec = dir.read_spec().unwrap_or_default();
            let members: Vec<Value> = dir.members().iter().map(pool::describe_member).collect();
            let count = |state: &str| members.iter().filter(|m| m["state"] == state).count();
            json!({
                "name": dir.name,
                "size": spec["size"],
                "ready": count("ready"),
                "booting": count("booting"),
                "keeper_pid": dir.keeper(),
                "state": if dir.keeper().is_some() { "running" } else { "dead" },
                "args": spec["args"],
                "members": members,
                "log": dir.log(),
            })
        })
        .collect();
    match args.format {
        ListFormat::Json => println!("{}", Value::Array(rows)),
        ListFormat::Table => {
            println!(
                "{:<20} {:<8} {:>4} {:>5} {:>7}  OPTIONS",
                "POOL", "STATE", "SIZE", "READY", "BOOTING"
            );
            for r in rows {
                let options: Vec<&str> = r["args"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                println!(
                    "{:<20} {:<8} {:>4} {:>5} {:>7}  {}",
                    r["name"].as_str().unwrap_or(""),
                    r["state"].as_str().unwrap_or(""),
                    r["size"].as_u64().unwrap_or(0),
                    r["ready"].as_u64().unwrap_or(0),
                    r["booting"].as_u64().unwrap_or(0),
                    crate::text::sanitize(options.join(" ").as_bytes())
                );
            }
        }
    }
    Exit::Success
}

/// `airlock pool rm NAME...`.
fn rm(args: &PoolRmArgs) -> Exit {
    let mut exit = Exit::Success;
    for name in &args.names {
        if !pool::valid_pool_name(name) || !PoolDir::of(name).spec().exists() {
            exit = usage(format!(
                "no pool named {} (see `airlock pool ls`)",
                crate::text::sanitize(name.as_bytes())
            ));
            continue;
        }
        let dir = PoolDir::of(name);
        match dir.keeper().filter(|pid| *pid > 0) {
            Some(pid) => {
                // SAFETY: kill(2) of the pid the lock's holder wrote; it
                // still holds the lock, so it still lives.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(120);
                while dir.keeper().is_some() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                if dir.keeper().is_some() {
                    exit = failed(format!("the pool {name}'s keeper did not stop"));
                    continue;
                }
            }
            None => remove_pool(&dir),
        }
        println!("{name}");
    }
    exit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command as Cmd};
    use clap::Parser;

    fn create(args: &[&str]) -> CreateArgs {
        let argv = ["airlock", "create"].iter().chain(args.iter());
        match Cli::try_parse_from(argv).expect("parses").command {
            Cmd::Create(c) => *c,
            _ => unreachable!("create"),
        }
    }

    fn key_of(args: &[&str]) -> String {
        key(&create(args), &json!({"image": null, "cwd": "/"}))
    }

    /// What `create` must match: the options and what they read, never
    /// the name, labels or other per-sandbox fields.
    #[test]
    fn the_key_covers_what_a_sandbox_is_made_of() {
        let dir = std::env::temp_dir().join(format!("airlock-pool-key-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        fs::write(&file, "one").expect("file");
        let file_secret = format!("F=file:{}", file.display());
        std::env::set_var("AIRLOCK_POOL_KEY_TEST_A", "one");
        std::env::set_var("AIRLOCK_POOL_KEY_TEST_UNUSED", "x");
        let base = ["--mem", "300", "--secret", "T=env:AIRLOCK_POOL_KEY_TEST_A"];
        let k = key_of(&base);
        // Names, labels, --no-pool, other sandboxes' fields: the same key.
        let named: Vec<&str> = ["--name", "n", "--label", "a=b", "--no-pool"]
            .into_iter()
            .chain(base)
            .collect();
        assert_eq!(key_of(&named), k);
        assert_eq!(
            key(
                &create(&base),
                &json!({"image": null, "cwd": "/", "name": "x", "labels": {"a": "b"}, "created_unix": 5, "front_end": {"docker": 1}})
            ),
            k
        );
        // An unrelated variable changes nothing.
        std::env::set_var("AIRLOCK_POOL_KEY_TEST_UNUSED", "y");
        assert_eq!(key_of(&base), k);
        // Options, the sandbox's config, a value the options read: all differ.
        assert_ne!(
            key_of(&["--mem", "301", "--secret", "T=env:AIRLOCK_POOL_KEY_TEST_A"]),
            k
        );
        assert_ne!(
            key(
                &create(&base),
                &json!({"image": {"digest": "d"}, "cwd": "/"})
            ),
            k
        );
        std::env::set_var("AIRLOCK_POOL_KEY_TEST_A", "two");
        assert_ne!(key_of(&base), k);
        std::env::set_var("AIRLOCK_POOL_KEY_TEST_A", "one");
        assert_eq!(key_of(&base), k);
        // A file the options name: its content counts.
        let with_file = key_of(&["--secret", &file_secret]);
        fs::write(&file, "two").expect("file");
        assert_ne!(key_of(&["--secret", &file_secret]), with_file);
        // The root image that boots: a rebuild (here: touched) changes it.
        let root = dir.join("rootfs.img");
        fs::write(&root, "erofs").expect("root");
        let root_arg = root.display().to_string();
        let on_root = key_of(&["--image-root", &root_arg]);
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        fs::File::options()
            .write(true)
            .open(&root)
            .and_then(|f| f.set_modified(later))
            .expect("touch");
        assert_ne!(key_of(&["--image-root", &root_arg]), on_root);
        let _ = fs::remove_dir_all(&dir);
    }
}
