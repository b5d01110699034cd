//! `airlock run -- CMD ARGS...`: boot a sandbox, run one command in it,
//! stream its output, and exit with its exit code.
//!
//! Order: validate the arguments and encode the run spec ([`RunConfig`]) →
//! resolve and check the kernel and the initrd, or the root image in image
//! mode ([`boot_cmdline`]) → pick the engine → load the
//! audit key, create the audit log and write `run.start` (with the hashes of
//! what will boot) → make the private run directory ([`RunDir`]) → listen
//! on the control port's socket, and on the file ports the run serves
//! (`--workspace`: 1025, `--out`: 1026; [`crate::files`], each stream served
//! in its accept thread) → spawn the VM → [`supervise`]: hand the
//! guest's control connection to a session thread ([`session::serve`]),
//! watch the VM, the deadlines, the signals and the audit log → [`judge`]
//! the end → clean up (dropping the [`Vm`] kills and reaps every engine
//! process; dropping the [`RunDir`] removes it) → write `run.end` and the
//! seal. Everything that can be wrong with the input is found before a VM
//! starts; once the audit log exists, every way the run ends is recorded in
//! it, and a run whose log cannot be written is stopped (fail closed).
//!
//! A workspace that cannot be read, or an `--out` that cannot be created,
//! is a usage error found before any VM starts.
//!
//! Threads: the main thread supervises and owns the VM (it spawned it, which
//! `PR_SET_PDEATHSIG` needs); [`control::Acceptor`] accepts on the control
//! socket; one session thread runs the conversation with blocking I/O. They
//! report to the main thread over one channel.

use std::fs::{self, OpenOptions};
use std::io::{self, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use airlock_protocol::{
    EncodeError, ExitStatus, RunSpec, CONTROL_PORT, DEFAULT_GUEST_CID, FILES_IN_PORT,
    FILES_OUT_PORT, PROTOCOL_VERSION,
};
use ed25519_dalek::SigningKey;
use serde_json::{json, Value};

use crate::audit::{self, digest, keys, kind, AuditLog, Durability, Limits};
use crate::cli::{Exit, ImageArgs, RunArgs};
use crate::control::{self, Accepted, Acceptor};
use crate::engine::{self, Available, Disk, EngineChoice, ProcessExit, Vm, VmConfig};
use crate::paths::{self, ImagePaths};
use crate::pinned::Pinned;
use crate::session::{self, EncodedSpec, Outcome, Output, Progress, Stage, Violation};

/// Guest memory bounds, in MiB.
pub const MEM_MIB_RANGE: std::ops::RangeInclusive<u32> = 64..=65536;
/// vCPU bounds.
pub const CPUS_RANGE: std::ops::RangeInclusive<u32> = 1..=16;
/// The console substring that means the guest kernel died.
const PANIC_MARKER: &str = "Kernel panic";
/// The guest must say Hello within this long (or `--timeout`, if shorter).
/// Generous: the tcg engine boots in ~3 s, our VMM in the nested test bed in
/// ~10 s; a loaded CI machine may be several times slower.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(120);
/// How long the guest may take to power off after the command's exit status.
pub const POWER_OFF_GRACE: Duration = Duration::from_secs(10);
/// The same with `--debug-dump-guest-memory`, which the VMM writes first.
const DUMP_GRACE: Duration = Duration::from_secs(300);
/// After the VM process ends before the exit status came, how long the
/// session may still read what the engine had in flight.
const DRAIN: Duration = Duration::from_secs(1);
/// How long we wait for the session thread once its stream is shut down (it
/// may be blocked writing to a slow stdout).
const SESSION_END: Duration = Duration::from_secs(2);
/// How long after the run's timeout a results stream may still be read;
/// then it is abandoned, so that `--timeout` bounds airlock's own exit.
const RESULTS_GRACE: Duration = Duration::from_secs(2);
/// How often the VM, the deadlines and the signals are looked at.
const POLL: Duration = Duration::from_millis(20);
/// The working directory of the command in the guest.
const GUEST_CWD: &str = "/";
/// The working directory with `--workspace` or `--out`.
const WORKSPACE_CWD: &str = "/workspace";
/// The hybrid-vsock base socket's name in the run directory.
const VSOCK_NAME: &str = "vsock";
/// `--timeout`'s default, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--mem {0} is out of range (use {min} to {max} MiB)", min = MEM_MIB_RANGE.start(), max = MEM_MIB_RANGE.end())]
    Mem(u32),
    #[error("--cpus {0} is out of range (use {min} to {max})", min = CPUS_RANGE.start(), max = CPUS_RANGE.end())]
    Cpus(u32),
    #[error("--timeout must be at least 1 second")]
    Timeout,
    #[error("no command given (usage: airlock run [OPTIONS] -- CMD [ARGS...])")]
    NoCommand,
    #[error("--env {arg:?}: {why}")]
    Env { arg: String, why: &'static str },
    #[error("--env {0} is given twice")]
    DuplicateEnv(String),
    #[error("argument {0} of the command contains a NUL byte")]
    NulInArgument(usize),
    #[error("--cmdline contains a NUL byte")]
    NulInCmdline,
    #[error("the command and its environment do not fit the protocol's limits")]
    Spec(#[source] EncodeError),
    #[error(transparent)]
    Image(#[from] paths::Error),
    #[error(transparent)]
    Archive(#[from] crate::archive::Error),
    #[error(
        "--image needs the guest root image (its podman loads the archive): not with --initrd"
    )]
    ArchiveWithoutRoot,
    #[error(transparent)]
    ImageStore(#[from] crate::image::Error),
    #[error("-w {0:?}: the working directory must be an absolute path without NUL")]
    Workdir(String),
    #[error("-u {0:?}: not USER or USER:GROUP of A-Z a-z 0-9 _ . - (names or numbers)")]
    User(String),
    #[error("-u sets the user of the agent's container: not with --no-container or --initrd (without a container the command runs as uid 1000, or root with --vm-root)")]
    UserWithoutContainer,
    #[error("--nested needs the guest root image (podman is in it): not with --initrd")]
    NestedWithoutRoot,
    #[error("--vm-root is for a command that runs directly in the VM: add --no-container")]
    VmRootInContainer,
    #[error("--collect {0:?}: not a relative pattern (no leading /, no empty, . or .. component)")]
    CollectPattern(String),
    #[error("--collect is given more than {max} times", max = airlock_protocol::limits::MAX_COLLECT_PATTERNS)]
    TooManyCollect,
    #[error(transparent)]
    Engine(#[from] engine::SelectError),
    #[error("cannot create the console log at {}", path.display())]
    ConsoleLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a private run directory in {}", dir.display())]
    RunDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the socket path {} is longer than {MAX_SOCKET_PATH} bytes (set TMPDIR to a shorter directory)", .0.display())]
    SocketPath(PathBuf),
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot install the SIGINT/SIGTERM handlers")]
    Signals(#[source] io::Error),
    #[error(transparent)]
    Spawn(#[from] engine::Error),
    #[error("lost track of the VM")]
    Supervise(#[source] io::Error),
    #[error(transparent)]
    Audit(#[from] audit::Error),
    #[error(transparent)]
    Files(#[from] crate::files::Error),
    #[error("cannot create the output directory {}", .0.display())]
    OutDir(PathBuf, #[source] io::Error),
    #[error("cannot open {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot hash {} for the audit log", path.display())]
    Digest {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Model(#[from] crate::model::config::Error),
    #[error(
        "{what} {} is inside --out {}, where the sandbox's results are written (a result \
         could replace it): put it somewhere else", path.display(), out.display()
    )]
    InsideOut {
        what: &'static str,
        path: PathBuf,
        out: PathBuf,
    },
    #[error("cannot check where {} is", .0.display())]
    Place(PathBuf, #[source] io::Error),
    #[error("cannot write the report {}", .0.display())]
    Report(PathBuf, #[source] io::Error),
}

impl Error {
    pub fn exit(&self) -> Exit {
        match self {
            Error::Mem(_)
            | Error::Cpus(_)
            | Error::Timeout
            | Error::NoCommand
            | Error::Env { .. }
            | Error::DuplicateEnv(_)
            | Error::NulInArgument(_)
            | Error::NulInCmdline
            | Error::Spec(_)
            | Error::Image(_)
            | Error::Archive(_)
            | Error::ArchiveWithoutRoot
            | Error::NestedWithoutRoot
            | Error::VmRootInContainer
            | Error::CollectPattern(_)
            | Error::TooManyCollect
            | Error::Engine(_)
            | Error::ConsoleLog { .. }
            | Error::SocketPath(_)
            | Error::Files(_)
            | Error::OutDir(..)
            | Error::Pin { .. }
            | Error::Digest { .. }
            | Error::Model(_)
            | Error::InsideOut { .. }
            | Error::Place(..) => Exit::Usage,
            Error::Report(..) => Exit::SandboxFailed,
            Error::ImageStore(e) => e.exit(),
            Error::Workdir(_) | Error::User(_) | Error::UserWithoutContainer => Exit::Usage,
            Error::Audit(e) => match e {
                audit::Error::Create { .. }
                | audit::Error::Read { .. }
                | audit::Error::NoStateDir
                | audit::Error::Key(_) => Exit::Usage,
                audit::Error::Write(_)
                | audit::Error::Encode(_)
                | audit::Error::Replaced { .. }
                | audit::Error::Lost { .. } => Exit::SandboxFailed,
            },
            Error::RunDir { .. }
            | Error::Listen { .. }
            | Error::Signals(_)
            | Error::Spawn(_)
            | Error::Supervise(_) => Exit::SandboxFailed,
        }
    }

    /// How the run ended, for `run.end`, when this error ended it.
    fn how(&self) -> &'static str {
        match self {
            Error::Spawn(_) => "boot_failure",
            Error::Audit(_) => "audit_failure",
            _ => "error",
        }
    }
}

/// Where the console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// The private run directory, removed at the end unless `keep`.
    Temp { keep: bool },
    /// A file the user named; kept.
    File(PathBuf),
}

/// What the audit log of a run is to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// `--audit`, made absolute; `None` for the default place.
    pub path: Option<PathBuf>,
    /// `--audit-key`.
    pub key: Option<PathBuf>,
    pub limits: Limits,
}

/// The validated `run` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    pub engine: EngineChoice,
    pub image: ImageArgs,
    pub mem_mib: u32,
    pub cpus: u8,
    pub timeout: Duration,
    pub console: ConsoleTarget,
    /// The RunSpec frame, encoded (so within the protocol's limits).
    pub spec: EncodedSpec,
    /// The same RunSpec, for the audit log.
    pub run_spec: RunSpec,
    pub max_output_bytes: u64,
    pub extra_cmdline: Vec<String>,
    /// In image mode, run the command in a container (not `--no-container`).
    pub container: bool,
    /// `--image FILE`: the container's image archive, made absolute.
    pub archive: Option<PathBuf>,
    /// `--image NAME`: an image of the store, whose erofs disk the
    /// container runs on.
    pub stored_image: Option<crate::image::Resolved>,
    /// With a stored image: where the command, environment, directory and
    /// user came from (image or options), for the audit log.
    pub image_applied: Option<Value>,
    /// The container's user (`-u`, or the stored image's `User`).
    pub user: Option<String>,
    /// `--nested`: the command may run podman itself.
    pub nested: bool,
    /// `--vm-root`: without a container, the command runs as root.
    pub vm_root: bool,
    pub audit: AuditConfig,
    pub files: FilesConfig,
    /// The model proxy (`--model-*`), keys included (never logged).
    pub model: crate::model::Settings,
    /// `--report FILE`: the run's summary, written by airlock at the end.
    pub report: Option<PathBuf>,
    /// `--debug-dump-guest-memory`.
    pub dump_memory: Option<PathBuf>,
    /// `airlock create`: the supervisor of a live sandbox.
    pub sandbox: Option<crate::sandbox::server::Mode>,
}

/// `--workspace`, `--exclude`, `--out`, `--max-out-bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesConfig {
    pub workspace: Option<PathBuf>,
    pub deny: crate::files::Deny,
    pub out: Option<PathBuf>,
    pub max_out_bytes: u64,
    /// `--collect` patterns (empty: `/workspace/out`).
    pub collect: Vec<String>,
}

/// The kernel command line words of image mode: the root image is the
/// first disk, read-only erofs.
const IMAGE_CMDLINE: [&str; 3] = ["root=/dev/vda", "rootfstype=erofs", "ro"];
/// Tells the init to run the command directly in the VM (read from
/// /proc/cmdline; the protocol is unchanged).
const NO_CONTAINER_CMDLINE: &str = "airlock.container=0";
/// Tells the init that the second disk is an image archive to load and run
/// the container from.
const ARCHIVE_CMDLINE: &str = "airlock.archive=1";
/// Tells the init that the second disk is an image's root (erofs) to run
/// the container on.
const IMAGE_DISK_CMDLINE: &str = "airlock.imagedisk=1";
/// Tells the init to give the container what nested podman needs.
const NESTED_CMDLINE: &str = "airlock.nested=1";
/// Tells the init to run a command outside a container as root, not as
/// its unprivileged agent user (image and initramfs mode alike).
const VM_ROOT_CMDLINE: &str = "airlock.vmroot=1";
/// The host's wall clock at boot, in seconds since the epoch.
const EPOCH_CMDLINE: &str = "airlock.epoch";
/// The model request body limit (`--model-max-request-bytes`), for the
/// in-guest endpoint: one limit end to end.
const MODEL_MAX_BODY_CMDLINE: &str = "airlock.model_max_body";

/// The boot word that gives the in-guest model endpoint the proxy's body
/// limit.
fn model_max_body_word(config: &RunConfig) -> String {
    format!(
        "{MODEL_MAX_BODY_CMDLINE}={}",
        config.model.policy.max_request_bytes
    )
}

/// The words appended to the engine's base command line: in image mode
/// the root, and `airlock.container=0` for `--no-container`;
/// `airlock.vmroot=1` for `--vm-root`; then the user's `--cmdline`, which
/// comes last so that it can override.
pub fn boot_cmdline(config: &RunConfig, image_mode: bool) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    if image_mode {
        words.extend(IMAGE_CMDLINE.iter().map(|w| (*w).to_owned()));
        if !config.container {
            words.push(NO_CONTAINER_CMDLINE.to_owned());
        }
        if config.archive.is_some() {
            words.push(ARCHIVE_CMDLINE.to_owned());
        }
        if config.stored_image.is_some() {
            words.push(IMAGE_DISK_CMDLINE.to_owned());
        }
        if config.nested {
            words.push(NESTED_CMDLINE.to_owned());
        }
    }
    if config.vm_root {
        words.push(VM_ROOT_CMDLINE.to_owned());
    }
    words.extend(config.extra_cmdline.iter().cloned());
    words
}

/// Who the command runs as in the VM, for the audit log's `run.start`, as
/// the init reads `words` (the whole `boot_cmdline`, the user's `--cmdline`
/// included: the last `airlock.container` / `airlock.vmroot` wins there).
fn command_user(words: &[String], image_mode: bool) -> &'static str {
    let flag = |key: &str, default: bool| {
        words
            .iter()
            .rev()
            .find_map(|w| match w.split_once('=') {
                Some((k, v)) if k == key => Some(matches!(
                    v.to_ascii_lowercase().as_str(),
                    "1" | "y" | "yes" | "on" | "true"
                )),
                None if w == key => Some(true),
                _ => None,
            })
            .unwrap_or(default)
    };
    if image_mode && flag("airlock.container", true) {
        if flag("airlock.nested", false) {
            "privileged container root"
        } else {
            "container root"
        }
    } else if flag("airlock.vmroot", false) {
        "root"
    } else {
        "uid 1000"
    }
}

/// Parses one `--env NAME=VALUE`. The name is non-empty and holds no `=`
/// (it ends at the first one) and no NUL; the value holds no NUL. A bare
/// `NAME` is refused: nothing is ever taken from the host's environment.
pub fn parse_env(arg: &str) -> Result<(String, String), Error> {
    let bad = |why| Error::Env {
        arg: arg.to_owned(),
        why,
    };
    let (name, value) = arg.split_once('=').ok_or_else(|| {
        bad("expected NAME=VALUE (the host's environment is never passed on, so a bare NAME means nothing)")
    })?;
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    if name.contains('\0') || value.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// Parses every `--env`; a name given twice is refused.
fn parse_envs(env: &[String]) -> Result<Vec<(String, String)>, Error> {
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(env.len());
    for arg in env {
        let (name, value) = parse_env(arg)?;
        if pairs.iter().any(|(n, _)| *n == name) {
            return Err(Error::DuplicateEnv(name));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// What `--image` and the image's config make of the command: argv, env
/// (as `NAME=VALUE`), a working directory and a user over the defaults,
/// and, with a stored image, where each came from.
type Shaped = (
    Vec<String>,
    Vec<String>,
    Option<String>,
    Option<String>,
    Option<Value>,
);

/// Shapes the command: with an image of the store, its config under the
/// options ([`crate::image::apply`]); otherwise the command as given,
/// after `--entrypoint` if any.
fn shape_command(args: &RunArgs, stored: Option<&crate::image::Resolved>) -> Result<Shaped, Error> {
    match stored {
        Some(image) => {
            let applied = crate::image::apply(
                &image.config,
                crate::image::Overrides {
                    command: args.command.clone(),
                    entrypoint: args.entrypoint.clone(),
                    env: parse_envs(&args.env)?,
                    workdir: args.workdir.clone(),
                    user: args.user.clone(),
                },
            )?;
            let env = applied
                .env
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            Ok((
                applied.argv,
                env,
                applied.cwd,
                applied.user,
                Some(applied.fields),
            ))
        }
        None => {
            let mut argv: Vec<String> = args
                .entrypoint
                .iter()
                .filter(|e| !e.is_empty())
                .cloned()
                .collect();
            argv.extend(args.command.iter().cloned());
            Ok((
                argv,
                args.env.clone(),
                args.workdir.clone(),
                args.user.clone(),
                None,
            ))
        }
    }
}

/// The run spec for `command` with exactly the `--env` variables: cwd `/`,
/// no guest-side timeout (the host enforces `--timeout`), no stdin.
pub fn run_spec(
    command: Vec<String>,
    env: &[String],
    max_output_bytes: u64,
) -> Result<RunSpec, Error> {
    if command.is_empty() {
        return Err(Error::NoCommand);
    }
    if let Some(i) = command.iter().position(|a| a.contains('\0')) {
        return Err(Error::NulInArgument(i));
    }
    let pairs = parse_envs(env)?;
    Ok(RunSpec {
        argv: command,
        env: pairs,
        cwd: GUEST_CWD.into(),
        timeout_ms: None,
        max_output_bytes,
        stdin: false,
    })
}

impl TryFrom<RunArgs> for RunConfig {
    type Error = Error;

    fn try_from(args: RunArgs) -> Result<RunConfig, Error> {
        if !MEM_MIB_RANGE.contains(&args.mem) {
            return Err(Error::Mem(args.mem));
        }
        let cpus = Some(args.cpus)
            .filter(|c| CPUS_RANGE.contains(c))
            .and_then(|c| u8::try_from(c).ok())
            .ok_or(Error::Cpus(args.cpus))?;
        let timeout = args.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS);
        if timeout == 0 {
            return Err(Error::Timeout);
        }
        let (archive, stored_image) = match &args.image_archive {
            Some(value) => match crate::image::choose(value.as_os_str())? {
                crate::image::Choice::File(p) => (Some(std::path::absolute(&p).unwrap_or(p)), None),
                crate::image::Choice::Stored(image) => (None, Some(image)),
            },
            None => (None, None),
        };
        let (command, env, cwd, user, image_applied) = shape_command(&args, stored_image.as_ref())?;
        let mut run_spec = run_spec(command, &env, args.max_output_bytes)?;
        run_spec.stdin = args.interactive;
        if args.workspace.is_some() || args.out.is_some() {
            // The command works on its copy of the workspace.
            run_spec.cwd = WORKSPACE_CWD.into();
        }
        if let Some(cwd) = cwd {
            // -w, or the image's WorkingDir: the workspace stays /workspace.
            if !cwd.starts_with('/') || cwd.contains('\0') {
                return Err(Error::Workdir(cwd));
            }
            run_spec.cwd = cwd;
        }
        if let Some(u) = &user {
            if airlock_protocol::check_run_as(u).is_err() {
                return Err(Error::User(u.clone()));
            }
            if args.no_container {
                return Err(Error::UserWithoutContainer);
            }
        }
        let mut spec = EncodedSpec::new(run_spec.clone()).map_err(Error::Spec)?;
        spec.set_run_as(user.as_deref()).map_err(Error::Spec)?;
        spec.workspace = args.workspace.is_some();
        spec.results = args.out.is_some();
        if args.collect.len() > airlock_protocol::limits::MAX_COLLECT_PATTERNS {
            return Err(Error::TooManyCollect);
        }
        if let Some(bad) = args
            .collect
            .iter()
            .find(|p| airlock_protocol::check_file_path(p).is_err())
        {
            return Err(Error::CollectPattern(bad.clone()));
        }
        spec.set_collect(&args.collect).map_err(Error::Spec)?;
        let cmdline = args.cmdline.unwrap_or_default();
        if cmdline.contains('\0') {
            return Err(Error::NulInCmdline);
        }
        Ok(RunConfig {
            engine: args.engine,
            image: args.image,
            mem_mib: args.mem,
            cpus,
            timeout: Duration::from_secs(timeout),
            console: match args.console_log {
                Some(path) => ConsoleTarget::File(std::path::absolute(&path).unwrap_or(path)),
                None => ConsoleTarget::Temp {
                    keep: args.keep_console,
                },
            },
            spec,
            run_spec,
            max_output_bytes: args.max_output_bytes,
            extra_cmdline: cmdline.split_whitespace().map(str::to_owned).collect(),
            container: !args.no_container,
            archive,
            stored_image,
            image_applied,
            user,
            nested: args.nested,
            vm_root: args.vm_root,
            audit: AuditConfig {
                path: args.audit.map(|p| std::path::absolute(&p).unwrap_or(p)),
                key: args.audit_key,
                limits: Limits {
                    max_guest_records: args.audit_max_guest_events,
                    max_guest_bytes: args.audit_max_guest_bytes,
                },
            },
            files: FilesConfig {
                workspace: args.workspace.map(|p| std::path::absolute(&p).unwrap_or(p)),
                deny: crate::files::Deny::new(&args.exclude),
                out: args.out.map(|p| std::path::absolute(&p).unwrap_or(p)),
                max_out_bytes: args.max_out_bytes,
                collect: args.collect,
            },
            model: model_settings(&args.model)?,
            report: args.report.map(|p| std::path::absolute(&p).unwrap_or(p)),
            dump_memory: args
                .model
                .debug_dump_guest_memory
                .map(|p| std::path::absolute(&p).unwrap_or(p)),
            sandbox: None,
        })
    }
}

/// The model proxy's settings; the keys come from airlock's environment
/// (or `--model-key-file`), only when `--model-upstream` is given.
fn model_settings(args: &crate::cli::ModelArgs) -> Result<crate::model::Settings, Error> {
    let args = crate::model::Args {
        upstreams: args.model_upstream.clone(),
        key_env: args.model_key_env.clone(),
        key_file: args.model_key_file.clone(),
        ca_file: args.model_ca.clone(),
        policy_file: args.model_policy.clone(),
        bearer: args.model_auth.as_deref() == Some("bearer"),
        oauth_token_env: args.model_oauth_token_env.clone(),
        openai_organization: args.model_openai_organization.clone(),
        openai_project: args.model_openai_project.clone(),
        overrides: crate::model::policy::Overrides {
            allowed_models: args.model_allow.clone(),
            max_requests: args.model_max_requests,
            max_tokens_per_run: args.model_max_tokens,
            max_request_bytes: args.model_max_request_bytes,
        },
    };
    Ok(crate::model::Settings::resolve(&args, &|name| {
        std::env::var(name).ok()
    })?)
}

/// `airlock run`.
pub fn main(args: RunArgs) -> Exit {
    match run(args) {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("airlock: error: {}", crate::report(&e));
            e.exit()
        }
    }
}

/// `airlock create`'s supervisor: the run of a live sandbox, whose
/// command keeps it up while execs come and go.
pub fn main_sandbox(args: RunArgs, mode: crate::sandbox::server::Mode) -> Exit {
    match run_with(args, Some(mode)) {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("airlock: error: {}", crate::report(&e));
            e.exit()
        }
    }
}

fn run(args: RunArgs) -> Result<Exit, Error> {
    run_with(args, None)
}

fn run_with(args: RunArgs, sandbox: Option<crate::sandbox::server::Mode>) -> Result<Exit, Error> {
    let began = Instant::now();
    let mut config = RunConfig::try_from(args)?;
    if sandbox.is_some() {
        config.spec.execs = true;
    }
    config.sandbox = sandbox;
    let image = ImagePaths::from_env(
        config.image.kernel.clone(),
        config.image.initrd.clone(),
        config.image.image_root.clone(),
    );
    paths::check_kernel(&image.kernel)?;
    match &image.root {
        Some(root) => paths::check_root(root)?,
        None => paths::check_initrd(&image.initrd)?,
    }
    if let Some(ws) = &config.files.workspace {
        crate::files::check_workspace(ws, &config.files.deny)?;
    }
    if let Some(out) = &config.files.out {
        fs::create_dir_all(out).map_err(|e| Error::OutDir(out.clone(), e))?;
    }
    let key = match &config.audit.key {
        Some(path) => Some(keys::load_signing_key(path).map_err(audit::Error::from)?),
        None => None,
    };
    let run_id = audit::new_run_id();
    let audit_path = match &config.audit.path {
        Some(path) => path.clone(),
        None => audit::log::default_path(
            &audit::log::default_dir()?,
            audit::time::micros(SystemTime::now()),
            &run_id,
        )?,
    };
    // Nothing airlock writes for the user may be where results land: a
    // result named like it would replace it mid-run.
    if let Some(out) = &config.files.out {
        let what = if config.audit.path.is_some() {
            "--audit"
        } else {
            "the default audit log (pass --audit FILE elsewhere)"
        };
        let mut checks = vec![(what, audit_path.clone())];
        if let ConsoleTarget::File(path) = &config.console {
            checks.push(("--console-log", path.clone()));
        }
        if let Some(path) = &config.report {
            checks.push(("--report", path.clone()));
        }
        for (what, path) in checks {
            if paths::is_within(out, &path).map_err(|e| Error::Place(path.clone(), e))? {
                return Err(Error::InsideOut {
                    what,
                    path,
                    out: out.clone(),
                });
            }
        }
    }
    if image.root.is_none() && !config.container {
        eprintln!("airlock: warning: --no-container: no root image, so no container anyway");
    }
    if config.stored_image.is_some() && image.root.is_none() {
        return Err(Error::ArchiveWithoutRoot);
    }
    if config.user.is_some() && image.root.is_none() {
        return Err(Error::UserWithoutContainer);
    }
    let archive_format = match &config.archive {
        Some(_) if image.root.is_none() => return Err(Error::ArchiveWithoutRoot),
        Some(path) => Some(crate::archive::check(path)?),
        None => None,
    };
    if config.nested && image.root.is_none() {
        return Err(Error::NestedWithoutRoot);
    }
    if config.vm_root && config.container && image.root.is_some() {
        return Err(Error::VmRootInContainer);
    }
    // From here on airlock hashes, and the engine boots, these open files.
    let second_disk = config
        .archive
        .clone()
        .or_else(|| config.stored_image.as_ref().map(|i| i.disk.clone()));
    let pins = Pins::open(&image, second_disk.as_deref())?;
    let selection = engine::select(config.engine, Available::gather())?;
    if let Some(warning) = &selection.warning {
        eprintln!("airlock: warning: {warning}");
    }
    eprintln!(
        "airlock: engine: {} ({})",
        selection.engine.name(),
        selection.reason
    );

    let mut start = run_start_fields(&config, &pins, &selection, &run_id, key.as_ref())?;
    if let (Some(pin), Some(format)) = (&pins.archive, archive_format) {
        let path = pin.path();
        let d =
            digest::file_cached(&pin.fd_path(), digest_cache().as_deref()).map_err(|source| {
                Error::Digest {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        start["container_image"] = json!({
            "source": "file",
            "path": path.display().to_string(),
            "format": format.name(),
            "sha256": d.sha256,
            "bytes": d.bytes,
        });
    }
    if let (Some(pin), Some(stored)) = (&pins.archive, &config.stored_image) {
        let d =
            digest::file_cached(&pin.fd_path(), digest_cache().as_deref()).map_err(|source| {
                Error::Digest {
                    path: pin.path().to_path_buf(),
                    source,
                }
            })?;
        start["container_image"] = json!({
            "source": "store",
            "reference": stored.reference,
            "digest": stored.digest,
            "names": stored.names,
            "disk": {
                "path": pin.path().display().to_string(),
                "sha256": d.sha256,
                "bytes": d.bytes,
            },
            "config_applied": config.image_applied,
        });
    }
    let audit = AuditLog::create(&audit_path, config.audit.limits, key)?;
    if let Some(mode) = &config.sandbox {
        // For `airlock inspect`: the sandbox's one audit log.
        let _ = fs::write(
            mode.dir.path.join("audit.path"),
            format!("{}\n", audit_path.display()),
        );
    }
    audit.host(kind::RUN_START, start, Durability::Synced);
    if let Some(why) = audit.failure() {
        return Err(audit::Error::Write(why).into());
    }

    let (mut exit, end, console_log) = match boot(&config, &pins, &selection, &audit, began) {
        Ok(ran) => (ran.exit, ran.end, ran.console_log),
        Err(e) => {
            eprintln!("airlock: error: {}", crate::report(&e));
            let end = json!({
                "how": e.how(),
                "exit_code": e.exit().code(),
                "command_status": null,
                "message": crate::report(&e),
                "durations_ms": { "total": millis(began.elapsed()) },
            });
            (e.exit(), end, None)
        }
    };
    let finished = match audit.finish(end.clone()) {
        Ok(finished) => Some(finished),
        Err(e) => {
            eprintln!("airlock: error: {}", crate::report(&e));
            exit = Exit::SandboxFailed;
            None
        }
    };
    // The log is judged where the user will look for it.
    let placed = match audit.check_place() {
        Some(Ok(placed)) => Some(placed),
        Some(Err(e)) => {
            eprintln!("airlock: error: {}", crate::report(&e));
            exit = Exit::SandboxFailed;
            None
        }
        None => None,
    };
    eprintln!("airlock: audit log: {}", audit_path.display());
    if let Some(path) = &config.report {
        let report = json!({
            "airlock_version": env!("CARGO_PKG_VERSION"),
            "run_id": run_id,
            "exit_code": exit.code(),
            "how": end["how"],
            "command_status": end["command_status"],
            "message": end["message"],
            "audit_log": {
                "path": audit_path.display().to_string(),
                "intact_at_path": placed.is_some(),
                "sha256": placed.as_ref().map(|p| p.sha256.clone()),
                "bytes": placed.as_ref().map(|p| p.bytes),
                "records": finished.as_ref().map(|f| f.records),
                "run_end_sha256": finished.as_ref().map(|f| f.run_end_hash.clone()),
                "signed": config.audit.key.is_some(),
            },
            "console_log": console_log.map(|p| p.display().to_string()),
            "out": config.files.out.as_ref().map(|p| p.display().to_string()),
        });
        if let Err(e) = write_report(path, &report) {
            let e = Error::Report(path.clone(), e);
            eprintln!("airlock: error: {}", crate::report(&e));
            exit = Exit::SandboxFailed;
        }
    }
    Ok(exit)
}

/// Writes `report` to `path` atomically: a new temporary file beside it,
/// synced, renamed over it.
fn write_report(path: &Path, report: &Value) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".airlock-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let mut bytes = serde_json::to_vec_pretty(report).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// The files a run boots, opened once: hashed for `run.start` and read by
/// the engine through the same descriptors ([`crate::pinned`]).
#[derive(Debug)]
struct Pins {
    kernel: Pinned,
    /// The initrd (initramfs mode) or the root image (image mode).
    root: Pinned,
    image_mode: bool,
    /// The container image archive (`--image`), the second disk.
    archive: Option<Pinned>,
}

impl Pins {
    fn open(image: &ImagePaths, archive: Option<&Path>) -> Result<Pins, Error> {
        let pin = |path: &Path| {
            Pinned::open(path).map_err(|source| Error::Pin {
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(Pins {
            kernel: pin(&image.kernel)?,
            root: pin(image.root.as_deref().unwrap_or(&image.initrd))?,
            image_mode: image.root.is_some(),
            archive: archive.map(pin).transpose()?,
        })
    }

    /// Every descriptor the VM process must inherit.
    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        [Some(&self.kernel), Some(&self.root), self.archive.as_ref()]
            .into_iter()
            .flatten()
            .map(Pinned::fd)
            .collect()
    }
}

/// Where file digests are remembered: `digests/` in the Airlock cache.
fn digest_cache() -> Option<PathBuf> {
    paths::cache_dir(
        std::env::var_os("AIRLOCK_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
    .map(|c| c.join("digests"))
}

/// A duration in whole milliseconds, for the audit log.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The `run.start` record: what will boot (with hashes), the policy in
/// force and the run spec.
fn run_start_fields(
    config: &RunConfig,
    pins: &Pins,
    selection: &engine::Selection,
    run_id: &str,
    key: Option<&SigningKey>,
) -> Result<Value, Error> {
    let digest_error = |pin: &Pinned| {
        let path = pin.path().to_path_buf();
        move |source| Error::Digest { path, source }
    };
    let cache = digest_cache();
    let kernel = digest::file_cached(&pins.kernel.fd_path(), cache.as_deref())
        .map_err(digest_error(&pins.kernel))?;
    let root = &pins.root;
    let (initrd, root, init) = if pins.image_mode {
        // Image mode: the init is /sbin/init inside the image, which the
        // image's hash covers (140 MB hash in about 0.3 s: simply done).
        let d =
            digest::file_cached(&root.fd_path(), cache.as_deref()).map_err(digest_error(root))?;
        let fields = json!({
            "path": root.path().display().to_string(),
            "sha256": d.sha256,
            "bytes": d.bytes,
        });
        let init = json!({
            "path": "/sbin/init",
            "sha256": null,
            "note": "inside the root image; root_image.sha256 covers it",
        });
        (Value::Null, fields, init)
    } else {
        let initrd = digest::initrd(&root.fd_path()).map_err(digest_error(root))?;
        let init = match initrd.init {
            Some((name, d)) => json!({ "path": name, "sha256": d.sha256, "bytes": d.bytes }),
            None => json!({
                "path": null,
                "sha256": null,
                "note": "no init found in the initrd (not an uncompressed newc cpio archive); \
                         initrd.sha256 covers it",
            }),
        };
        let fields = json!({
            "path": root.path().display().to_string(),
            "sha256": initrd.whole.sha256,
            "bytes": initrd.whole.bytes,
        });
        (fields, Value::Null, init)
    };
    let spec = &config.run_spec;
    let env: serde_json::Map<String, Value> = spec
        .env
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(value.clone())))
        .collect();
    let uid = fs::metadata("/proc/self")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    Ok(json!({
        "airlock_version": env!("CARGO_PKG_VERSION"),
        "protocol_version": PROTOCOL_VERSION,
        "run_id": run_id,
        "kernel": {
            "path": pins.kernel.path().display().to_string(),
            "sha256": kernel.sha256,
            "bytes": kernel.bytes,
        },
        "initrd": initrd,
        "root_image": root,
        "init": init,
        "policy": {
            "engine": selection.engine.name(),
            "engine_requested": engine_name(config.engine),
            "engine_reason": selection.reason,
            "timeout_s": config.timeout.as_secs(),
            "boot_deadline_s": config.timeout.min(BOOT_DEADLINE).as_secs(),
            "max_output_bytes": config.max_output_bytes,
            "mem_mib": config.mem_mib,
            "cpus": config.cpus,
            "network": "none",
            "extra_cmdline": config.extra_cmdline,
            "boot_cmdline": boot_cmdline(config, pins.image_mode),
            "container": pins.image_mode && config.container,
            "nested_containers": config.nested,
            "command_user": match &config.user {
                Some(user) if pins.image_mode && config.container => {
                    format!("container user {user}")
                }
                _ => command_user(&boot_cmdline(config, pins.image_mode), pins.image_mode)
                    .to_owned(),
            },
            "collect": config.files.collect,
            "audit_max_guest_records": config.audit.limits.max_guest_records,
            "audit_max_guest_bytes": config.audit.limits.max_guest_bytes,
            "model": config.model.fields(),
        },
        "spec": {
            "argv": spec.argv,
            "env": env,
            "env_note": "the --env names and values as given: user input, never a secret \
                         (airlock passes nothing else of its environment into the sandbox)",
            "cwd": spec.cwd,
            "stdin": spec.stdin,
            "timeout_ms": spec.timeout_ms,
        },
        "audit": {
            "public_key": key.map(|k| keys::public_hex(&k.verifying_key())),
        },
        "host": { "pid": std::process::id(), "uid": uid },
    }))
}

/// The engine choice as the user types it.
fn engine_name(choice: EngineChoice) -> &'static str {
    match choice {
        EngineChoice::Kvm => "kvm",
        EngineChoice::Tcg => "tcg",
        EngineChoice::Auto => "auto",
    }
}

/// How a booted run ended: the exit code and the `run.end` fields.
#[derive(Debug)]
struct Ran {
    exit: Exit,
    end: Value,
    /// The console log, when it is kept.
    console_log: Option<PathBuf>,
}

/// Boots the VM, supervises it, judges the end and tells the user.
fn boot(
    config: &RunConfig,
    pins: &Pins,
    selection: &engine::Selection,
    audit: &AuditLog,
    began: Instant,
) -> Result<Ran, Error> {
    let run_dir = RunDir::create(&config.console)?;
    let vsock_uds = run_dir.dir.join(VSOCK_NAME);
    let control_path = engine::port_path(&vsock_uds, CONTROL_PORT);
    // The engines' own sockets in the run directory have names no longer
    // than this one's.
    if control_path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::SocketPath(control_path));
    }
    // Listening before the VM starts: the guest's connection always finds us.
    let listener = UnixListener::bind(&control_path).map_err(|source| Error::Listen {
        path: control_path.clone(),
        source,
    })?;
    let mut extra_cmdline = boot_cmdline(config, pins.image_mode);
    // The guest has no clock of its own worth trusting: the init sets it
    // from this (files the command writes get real mtimes). Not a secret.
    if let Ok(now) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        extra_cmdline.insert(0, format!("{EPOCH_CMDLINE}={}", now.as_secs()));
    }
    // Before the user's --cmdline, which may lower it (the init caps it).
    extra_cmdline.insert(0, model_max_body_word(config));
    // The engine reads the pinned files through the descriptors it inherits.
    let (initrd, disks) = if pins.image_mode {
        let disks = std::iter::once(&pins.root)
            .chain(pins.archive.as_ref())
            .map(|pin| Disk {
                path: pin.fd_path(),
                read_only: true,
            })
            .collect();
        (None, disks)
    } else {
        (Some(pins.root.fd_path()), Vec::new())
    };
    let vm_config = VmConfig {
        kernel: pins.kernel.fd_path(),
        initrd,
        disks,
        mem_mib: config.mem_mib,
        cpus: config.cpus,
        console_log: run_dir.console.clone(),
        extra_cmdline,
        run_dir: run_dir.dir.clone(),
        vsock_uds,
        guest_cid: DEFAULT_GUEST_CID,
        dump_memory: config.dump_memory.clone(),
        inherited_fds: pins.fds(),
    };
    let file_acceptors = file_ports(config, &vm_config.vsock_uds, audit)?;
    let model_port = model_port(config, &vm_config.vsock_uds, audit)?;
    if let Some(mode) = &config.sandbox {
        let ctl = mode.dir.ctl();
        crate::sandbox::server::start(mode, &vm_config.vsock_uds, audit, config.max_output_bytes)
            .map_err(|source| Error::Listen { path: ctl, source })?;
    }
    let (events_tx, events) = mpsc::channel();
    let acceptor = {
        let tx = events_tx.clone();
        Acceptor::start(listener, move |accepted| {
            let _ = tx.send(Event::Accepted(accepted));
        })
        .map_err(|source| Error::Listen {
            path: control_path.clone(),
            source,
        })?
    };
    // Installed just before the VM starts: from here on a signal means
    // "stop the VM and clean up", not "die at once".
    let stop = StopSignal::install().map_err(Error::Signals)?;
    let started = Instant::now();
    let mut vm = selection.engine.spawn(&vm_config)?;
    let processes: Vec<Value> = vm
        .processes()
        .into_iter()
        .map(|(name, pid)| json!({ "name": name, "pid": pid }))
        .collect();
    audit.host(
        kind::VM_START,
        json!({ "engine": selection.engine.name(), "processes": processes }),
        Durability::Synced,
    );
    let mut deadlines = Deadlines::from_start(started, config.timeout);
    if config.dump_memory.is_some() {
        // The engine writes the guest's RAM out before it exits.
        deadlines.power_off_grace = DUMP_GRACE;
        deadlines.past_timeout = None;
    }
    let session = SessionParams {
        spec: config.spec.clone(),
        max_output_bytes: config.max_output_bytes,
        events: events_tx,
        writers: terminal,
        audit: audit.clone(),
    };
    let mut timings = Timings::default();
    let end = supervise(&mut vm, &events, &session, deadlines, &stop, &mut timings)
        .map_err(Error::Supervise);
    // Whatever happened, nothing of the VM outlives this point.
    let killed = vm.kill();
    drop(acceptor);
    // Waits for a file stream still in progress: the VM is gone, so it ends.
    drop(file_acceptors);
    // Calls still in progress end; `model.summary` is written.
    drop(model_port);
    audit.host(
        kind::VM_EXIT,
        vm_exit_fields(end.as_ref().ok(), killed.as_ref().ok()),
        Durability::Synced,
    );
    let end = end?;
    killed.map_err(Error::Supervise)?;

    let verdict = judge(&end, config.timeout);
    if let Some(line) = &verdict.message {
        eprintln!("airlock: {line}");
    }
    if verdict.diagnostics {
        for line in diagnostics(&run_dir.console, &vm) {
            eprintln!("airlock: {line}");
        }
        if matches!(config.console, ConsoleTarget::Temp { keep: false }) {
            eprintln!("airlock: (pass --keep-console to keep the whole console log)");
        }
    }
    drop(vm);
    let console_log = run_dir.finish();
    if let Some(kept) = &console_log {
        eprintln!("airlock: console log: {}", kept.display());
    }
    let since =
        |from: Instant, to: Option<Instant>| to.map(|t| millis(t.saturating_duration_since(from)));
    let end = json!({
        "how": how(&end),
        "exit_code": verdict.exit.code(),
        "command_status": command_status(&end).map(session::status_fields),
        "message": verdict.message,
        "durations_ms": {
            "total": millis(began.elapsed()),
            "boot": since(started, timings.hello),
            "command": timings.hello.and_then(|hello| since(hello, timings.exited)),
        },
    });
    Ok(Ran {
        exit: verdict.exit,
        end,
        console_log,
    })
}

/// Listens on the file ports this run serves (`--workspace`: 1025,
/// `--out`: 1026). Each accepts one connection, served in its accept thread
/// (so dropping the acceptor waits for the stream to end); later ones are
/// refused like the control port's.
fn file_ports(
    config: &RunConfig,
    vsock_uds: &Path,
    audit: &AuditLog,
) -> Result<Vec<Acceptor>, Error> {
    let mut acceptors = Vec::new();
    if let Some(root) = &config.files.workspace {
        let (root, deny, log) = (root.clone(), config.files.deny.clone(), audit.clone());
        let serve = move |stream: &UnixStream| match crate::files::send_workspace(
            io::BufWriter::with_capacity(256 * 1024, stream),
            &root,
            &deny,
            &log,
        ) {
            Ok(sent) => {
                if sent.symlinks > 0 {
                    eprintln!(
                        "airlock: workspace: skipped {} symlink(s) (never followed)",
                        sent.symlinks
                    );
                }
                json!({ "direction": "in", "entries": sent.entries, "bytes": sent.bytes,
                        "denied": sent.denied, "symlinks": sent.symlinks,
                        "skipped": sent.skipped })
            }
            Err(e) => {
                eprintln!("airlock: error: {}", crate::report(&e));
                json!({ "direction": "in", "error": crate::report(&e) })
            }
        };
        acceptors.push(file_port(FILES_IN_PORT, vsock_uds, audit, serve)?);
    }
    if let Some(out) = &config.files.out {
        let (out, max, log) = (out.clone(), config.files.max_out_bytes, audit.clone());
        let collect = config.files.collect.clone();
        // The results pass never keeps airlock past the run's time: the VM
        // is stopped at the timeout, and what is still queued is abandoned
        // shortly after.
        let deadline = Instant::now() + config.timeout + RESULTS_GRACE;
        let serve = move |stream: &UnixStream| {
            // Short reads, so that the deadline is seen even if the guest
            // stops sending mid-frame.
            let _ = stream.set_read_timeout(Some(POLL * 10));
            let policy = crate::files::ResultsPolicy {
                out: &out,
                max_bytes: max,
                collect: &collect,
                deadline: Some(deadline),
            };
            let result = crate::files::receive_results(
                BufReader::with_capacity(256 * 1024, stream),
                &policy,
                &log,
                &mut |path: &str, why: &str| {
                    // Both come from the guest's names: no control bytes
                    // reach the terminal, no line can pass as airlock's.
                    eprintln!(
                        "airlock: refused result file {}: {}",
                        crate::sanitize(path.as_bytes()),
                        crate::sanitize(why.as_bytes())
                    )
                },
            );
            // Closing tells the guest we have it all.
            let _ = stream.shutdown(Shutdown::Both);
            match result {
                Ok(got) => {
                    if got.unnamed > 0 {
                        eprintln!(
                            "airlock: refused {} more result file(s), not named here \
                             (the audit log has them)",
                            got.unnamed
                        );
                    }
                    json!({ "direction": "out", "accepted": got.accepted,
                            "refused": got.refused, "bytes": got.bytes,
                            "unrecorded": {
                                "accepted": got.unrecorded_accepted,
                                "refused": got.unrecorded_refused,
                                "records_sha256": got.unrecorded_sha256,
                            },
                            "dir_mtimes_not_restored": got.dir_times_dropped })
                }
                Err(e) => {
                    eprintln!(
                        "airlock: refused the rest of the results: {}",
                        crate::report(&e)
                    );
                    json!({ "direction": "out", "error": crate::report(&e),
                            "abandoned": matches!(e, crate::files::Error::Abandoned) })
                }
            }
        };
        acceptors.push(file_port(FILES_OUT_PORT, vsock_uds, audit, serve)?);
    }
    Ok(acceptors)
}

/// One file port: its first connection is audited as accepted, served by
/// `serve` (whose fields make the `files.done` record), later ones are
/// refused and audited. The first is served on a thread of its own (the
/// guest holds the results connection open while the command runs), so
/// that a later connection is refused, audited and named as it comes;
/// dropping the acceptor still waits for that thread.
fn file_port(
    port: u32,
    vsock_uds: &Path,
    audit: &AuditLog,
    serve: impl FnOnce(&UnixStream) -> Value + Send + 'static,
) -> Result<Acceptor, Error> {
    let path = engine::port_path(vsock_uds, port);
    let listen_error = |source| Error::Listen {
        path: path.clone(),
        source,
    };
    let listener = UnixListener::bind(&path).map_err(listen_error)?;
    let audit = audit.clone();
    let mut serve = Some(serve);
    // Owned by the accept loop's callback: joined when the loop ends.
    let mut server = JoinOnDrop(None);
    Acceptor::start(listener, move |accepted| match accepted {
        Accepted::Session(stream) => {
            audit.host(
                kind::CONTROL_ACCEPTED,
                json!({ "port": port }),
                Durability::Synced,
            );
            let (Some(serve), log) = (serve.take(), audit.clone()) else {
                return;
            };
            let spawned = std::thread::Builder::new()
                .name(format!("file-port-{port}"))
                .spawn(move || {
                    let fields = serve(&stream);
                    log.host(kind::FILES_DONE, fields, Durability::Synced);
                });
            match spawned {
                Ok(handle) => server.hold(handle),
                Err(e) => audit.host(
                    kind::CONTROL_FAILED,
                    json!({ "port": port, "error": e.to_string() }),
                    Durability::Synced,
                ),
            }
        }
        Accepted::Refused(n) => {
            audit.host(
                kind::CONTROL_REFUSED,
                json!({ "port": port, "count": n }),
                Durability::Synced,
            );
            eprintln!("airlock: refused extra connection {n} to file port {port}");
        }
        Accepted::Capped => audit.host(
            kind::CONTROL_CAPPED,
            json!({ "port": port, "max": control::MAX_CONNECTIONS }),
            Durability::Synced,
        ),
        Accepted::Failed(e) => audit.host(
            kind::CONTROL_FAILED,
            json!({ "port": port, "error": e.to_string() }),
            Durability::Synced,
        ),
    })
    .map_err(listen_error)
}

/// Joins its thread when dropped.
#[derive(Debug)]
struct JoinOnDrop(Option<std::thread::JoinHandle<()>>);

impl JoinOnDrop {
    fn hold(&mut self, handle: std::thread::JoinHandle<()>) {
        self.0 = Some(handle);
    }
}

impl Drop for JoinOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            // A panic there is reported by the thread itself.
            let _ = handle.join();
        }
    }
}

/// Listens on the model port (1027): always, so that an agent without
/// `--model-upstream` gets an API-shaped refusal rather than no answer.
fn model_port(
    config: &RunConfig,
    vsock_uds: &Path,
    audit: &AuditLog,
) -> Result<crate::model::ModelPort, Error> {
    crate::model::listen(&config.model, vsock_uds, audit).map_err(|source| Error::Listen {
        path: engine::port_path(vsock_uds, airlock_protocol::MODEL_PORT),
        source,
    })
}

/// When the guest said Hello and when the command's exit status came.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    pub hello: Option<Instant>,
    pub exited: Option<Instant>,
}

/// The `vm.exit` record: how the VM process ended, who stopped it and why.
fn vm_exit_fields(end: Option<&End>, exit: Option<&ProcessExit>) -> Value {
    let (by, why) = match end {
        Some(End::Session {
            outcome,
            vm: Some(_),
        }) => (
            "itself",
            match outcome {
                Outcome::Exited(_) | Outcome::OutOfMemory(_) | Outcome::SpawnFailed { .. } => {
                    "the guest powered off after the command ended".to_owned()
                }
                _ => "it stopped during the control session".to_owned(),
            },
        ),
        Some(End::StoppedBeforeConnect(_)) => {
            ("itself", "it stopped before the guest connected".to_owned())
        }
        Some(End::SessionLost(_)) => (
            "itself",
            "it stopped and the control session did not finish".to_owned(),
        ),
        Some(End::Session { outcome, vm: None }) => (
            "airlock",
            match outcome {
                Outcome::Exited(_) | Outcome::OutOfMemory(_) | Outcome::SpawnFailed { .. } => {
                    "the guest did not power off after the command ended".to_owned()
                }
                Outcome::Broken(_) => "the guest broke the protocol".to_owned(),
                Outcome::OutputClosed(_) => "our output was closed".to_owned(),
                Outcome::OutputLimit(_) => "the output limit was reached".to_owned(),
            },
        ),
        Some(End::BootTimeout(limit)) => (
            "airlock",
            format!(
                "the guest did not connect within the boot deadline ({} s)",
                limit.as_secs()
            ),
        ),
        Some(End::TimedOut { .. }) => ("airlock", "--timeout passed".to_owned()),
        Some(End::Interrupted(signal)) => ("airlock", format!("airlock got signal {signal}")),
        Some(End::AuditFailed(_)) => ("airlock", "the audit log could not be written".to_owned()),
        None => ("airlock", "airlock lost track of the VM".to_owned()),
    };
    json!({
        "status": exit.map(ToString::to_string),
        "stopped_by": by,
        "why": why,
    })
}

/// The command's status as the guest reported it, if it did.
fn command_status(end: &End) -> Option<ExitStatus> {
    match end {
        End::Session {
            outcome: Outcome::Exited(status) | Outcome::OutOfMemory(status),
            ..
        }
        | End::Session {
            outcome:
                Outcome::SpawnFailed {
                    status: Some(status),
                    ..
                },
            ..
        } => Some(*status),
        _ => None,
    }
}

/// How the run ended, as `run.end` says it. Pure.
pub fn how(end: &End) -> &'static str {
    match end {
        End::Session { outcome, vm } => match outcome {
            Outcome::Exited(ExitStatus::Exited(_)) => "exited",
            Outcome::Exited(ExitStatus::Signaled(_)) => "signaled",
            Outcome::SpawnFailed { .. } => "spawn_failed",
            Outcome::OutputClosed(_) => "interrupted",
            Outcome::OutputLimit(_) => "output_limit",
            Outcome::OutOfMemory(_) => "out_of_memory",
            Outcome::Broken(Violation::Closed {
                stage: Stage::BeforeHello,
            }) if vm.is_some() => "boot_failure",
            Outcome::Broken(_) => "protocol_error",
        },
        End::StoppedBeforeConnect(_) | End::BootTimeout(_) => "boot_failure",
        End::TimedOut { .. } => "timeout",
        End::Interrupted(_) => "interrupted",
        End::SessionLost(_) => "protocol_error",
        End::AuditFailed(_) => "audit_failure",
    }
}

/// What the other threads tell the supervisor.
#[derive(Debug)]
enum Event {
    Accepted(Accepted),
    Progress(Progress),
    Ended(Outcome),
}

/// When the run must have booted and finished, and the patience of each
/// later step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// The guest's Hello must come before this.
    pub boot: Instant,
    pub boot_limit: Duration,
    /// `--timeout`.
    pub timeout: Instant,
    /// [`POWER_OFF_GRACE`].
    pub power_off_grace: Duration,
    /// [`DRAIN`].
    pub drain: Duration,
    /// [`SESSION_END`].
    pub session_end: Duration,
    /// After `--timeout`, how long a guest that already sent its exit
    /// status may still take to power off ([`RESULTS_GRACE`]; `None`: the
    /// whole grace, as when the VMM dumps guest memory first).
    pub past_timeout: Option<Duration>,
}

impl Deadlines {
    /// Boot deadline: `min(timeout, BOOT_DEADLINE)` after `start`.
    pub fn from_start(start: Instant, timeout: Duration) -> Deadlines {
        let boot_limit = timeout.min(BOOT_DEADLINE);
        Deadlines {
            boot: start + boot_limit,
            boot_limit,
            timeout: start + timeout,
            power_off_grace: POWER_OFF_GRACE,
            drain: DRAIN,
            session_end: SESSION_END,
            past_timeout: Some(RESULTS_GRACE),
        }
    }

    /// When a guest whose command ended at `exited_at` must be off: the
    /// power-off grace, but never more than [`Deadlines::past_timeout`]
    /// beyond `--timeout`, which thus bounds airlock's own exit.
    pub fn power_off_by(&self, exited_at: Instant) -> Instant {
        let end = exited_at + self.power_off_grace;
        match self.past_timeout {
            Some(past) => end.min(self.timeout.max(exited_at) + past),
            None => end,
        }
    }
}

/// Where a session writes the command's stdout and stderr.
type Writers = fn() -> (Box<dyn Write>, Box<dyn Write>);

/// Our own stdout and stderr (each chunk is flushed at once by [`Output`]).
fn terminal() -> (Box<dyn Write>, Box<dyn Write>) {
    (Box::new(io::stdout()), Box::new(io::stderr()))
}

/// What a session thread needs.
#[derive(Debug)]
struct SessionParams {
    spec: EncodedSpec,
    max_output_bytes: u64,
    events: Sender<Event>,
    writers: Writers,
    audit: AuditLog,
}

/// The running session: a handle on its stream, to shut it down.
#[derive(Debug)]
struct SessionThread {
    stream: UnixStream,
}

/// `run -i`: forwards our stdin to the command as `Stdin` frames, then
/// `StdinEnd`, from a thread of its own (the session thread only reads
/// from here on). It stops at our end of file, or when the conversation
/// is shut down (the command exited; the guest went away).
fn pump_stdin(stream: &UnixStream) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let spawned = thread::Builder::new().name("stdin".into()).spawn(move || {
        use std::io::Read as _;
        let mut input = io::stdin().lock();
        let mut buf = vec![0u8; airlock_protocol::limits::MAX_CHUNK];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // An unreadable stdin ends as an empty rest.
                Err(_) => break,
            };
            if airlock_protocol::write_frame(
                &mut out,
                &airlock_protocol::Message::Stdin(buf[..n].to_vec()),
            )
            .is_err()
            {
                return;
            }
        }
        let _ = airlock_protocol::write_frame(&mut out, &airlock_protocol::Message::StdinEnd);
    });
    if spawned.is_err() {
        eprintln!("airlock: warning: cannot start the stdin thread: the command's stdin is empty");
    }
}

impl SessionThread {
    /// Serves `stream` in a new thread, which reports to the supervisor.
    fn start(stream: UnixStream, params: &SessionParams) -> io::Result<SessionThread> {
        let handle = stream.try_clone()?;
        let spec = params.spec.clone();
        let limit = params.max_output_bytes;
        let events = params.events.clone();
        let writers = params.writers;
        let audit = params.audit.clone();
        // Detached: it ends when its stream is shut down (or at exit, if
        // stuck writing to a stdout nobody reads).
        thread::Builder::new()
            .name("control-session".into())
            .spawn(move || {
                let (out, err) = writers();
                let mut output = Output::new(out, err, limit);
                let progress_events = events.clone();
                let stdin = spec.stdin;
                let outcome = session::serve(
                    BufReader::with_capacity(128 * 1024, &stream),
                    &stream,
                    &spec,
                    &mut output,
                    &mut |p| {
                        if p == Progress::SpecSent && stdin {
                            pump_stdin(&stream);
                        }
                        let _ = progress_events.send(Event::Progress(p));
                    },
                    &audit,
                );
                let _ = events.send(Event::Ended(outcome));
            })?;
        Ok(SessionThread { stream: handle })
    }

    /// Half-closes the conversation: the guest reads end-of-file.
    fn close_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Ends the conversation: the session's reads see end-of-file (after
    /// whatever is already buffered) and its writes fail.
    fn shut_down(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// How the supervision ended.
#[derive(Debug)]
pub enum End {
    /// The control conversation ended with `outcome`. `vm` is how the VM
    /// process ended, if it stopped by itself (`None`: we stopped it).
    Session {
        outcome: Outcome,
        vm: Option<ProcessExit>,
    },
    /// The VM process ended before any control connection.
    StoppedBeforeConnect(ProcessExit),
    /// No Hello within the boot deadline; the VM was stopped.
    BootTimeout(Duration),
    /// `--timeout` passed; the VM was stopped. `booted`: the guest had
    /// said Hello.
    TimedOut { booted: bool },
    /// A signal came; the VM was stopped.
    Interrupted(i32),
    /// The VM process ended during the session, and the session thread did
    /// not finish (it is stuck).
    SessionLost(ProcessExit),
    /// The audit log could not be written (why); the VM was stopped.
    AuditFailed(String),
}

/// Supervises a running VM until the run is over (see [`End`]). On return
/// the VM may still be running: the caller kills it.
fn supervise(
    vm: &mut Vm,
    events: &Receiver<Event>,
    params: &SessionParams,
    deadlines: Deadlines,
    stop: &StopSignal,
    timings: &mut Timings,
) -> io::Result<End> {
    let audit = &params.audit;
    let port = CONTROL_PORT;
    let mut session: Option<SessionThread> = None;
    let mut handshaken = false;
    // When the command's exit status arrived.
    let mut exited_at: Option<Instant> = None;
    // How the conversation ended, once it has.
    let mut outcome: Option<Outcome> = None;
    // How and when the VM process ended by itself.
    let mut vm_stopped: Option<(ProcessExit, Instant)> = None;
    // When the conversation broke, if it did.
    let mut broken_at: Option<Instant> = None;
    loop {
        match events.recv_timeout(POLL) {
            Ok(Event::Accepted(Accepted::Session(stream))) => {
                audit.host(
                    kind::CONTROL_ACCEPTED,
                    json!({ "port": port }),
                    Durability::Synced,
                );
                session = Some(SessionThread::start(stream, params)?);
            }
            Ok(Event::Accepted(Accepted::Refused(n))) => {
                audit.host(
                    kind::CONTROL_REFUSED,
                    json!({ "port": port, "count": n }),
                    Durability::Synced,
                );
                eprintln!(
                    "airlock: guest protocol error: refused connection {n} to the control port \
                     (one control session per run)"
                )
            }
            Ok(Event::Accepted(Accepted::Capped)) => {
                audit.host(
                    kind::CONTROL_CAPPED,
                    json!({ "port": port, "max": control::MAX_CONNECTIONS }),
                    Durability::Synced,
                );
                eprintln!(
                    "airlock: guest protocol error: {} connections to the control port; \
                     no longer accepting any",
                    control::MAX_CONNECTIONS
                )
            }
            Ok(Event::Accepted(Accepted::Failed(e))) => {
                audit.host(
                    kind::CONTROL_FAILED,
                    json!({ "port": port, "error": e.to_string() }),
                    Durability::Synced,
                );
                eprintln!("airlock: warning: the control port stopped accepting: {e}")
            }
            Ok(Event::Progress(Progress::SpecSent)) => {}
            Ok(Event::Progress(Progress::Handshaken)) => {
                handshaken = true;
                timings.hello = Some(Instant::now());
            }
            Ok(Event::Progress(Progress::Exited(_))) => {
                let now = Instant::now();
                exited_at = Some(now);
                timings.exited = Some(now);
                // Tell the guest we have its exit status: it waits for this
                // end-of-file before powering off, so nothing it sent is
                // lost in a VM reset. We keep reading: anything after Exit
                // is still a violation.
                if let Some(session) = &session {
                    session.close_write();
                }
            }
            Ok(Event::Ended(ended)) => outcome = Some(ended),
            Err(RecvTimeoutError::Timeout) => {}
            // We hold a sender ourselves (`params.events`): cannot happen.
            Err(RecvTimeoutError::Disconnected) => {
                return Err(io::Error::other("the supervisor's channel closed"))
            }
        }
        let now = Instant::now();

        if let Some(signal) = stop.received() {
            vm.kill()?;
            end_session(session.as_ref(), events, deadlines.session_end);
            return Ok(End::Interrupted(signal));
        }
        // A run that can no longer be audited does not go on.
        if let Some(why) = audit.failure() {
            vm.kill()?;
            end_session(session.as_ref(), events, deadlines.session_end);
            return Ok(End::AuditFailed(why));
        }
        if vm_stopped.is_none() {
            vm_stopped = vm.try_wait()?.map(|exit| (exit, now));
        }

        // The conversation is over.
        if let Some(ended) = outcome.take() {
            let command_done = matches!(ended, Outcome::Exited(_) | Outcome::OutOfMemory(_));
            let grace_left = exited_at.is_some_and(|at| now < deadlines.power_off_by(at));
            // A connection that broke may be the VM process dying (a VMM
            // crash, its seccomp filter): give it a moment to end by itself,
            // so that the report says how it ended and shows its log.
            let broken = matches!(ended, Outcome::Broken(_));
            let broke_at = *broken_at.get_or_insert(now);
            let dying = broken && now < broke_at + deadlines.drain;
            if vm_stopped.is_none() && ((command_done && grace_left) || dying) {
                // Let the guest power off (or the VM process end) by itself.
                outcome = Some(ended);
            } else {
                return Ok(End::Session {
                    outcome: ended,
                    vm: vm_stopped.map(|(exit, _)| exit),
                });
            }
        }

        // The VM stopped while the conversation goes on (or never began).
        if let Some((exit, at)) = vm_stopped {
            let Some(session) = &session else {
                return Ok(End::StoppedBeforeConnect(exit));
            };
            // After the exit status nothing more is expected; before it, let
            // the session read what the engine still had in flight.
            if exited_at.is_some() || now >= at + deadlines.drain {
                // The helpers go (their sockets close), then the stream.
                vm.kill()?;
                session.shut_down();
                return Ok(match wait_outcome(events, deadlines.session_end) {
                    Some(outcome) => End::Session {
                        outcome,
                        vm: Some(exit),
                    },
                    None => End::SessionLost(exit),
                });
            }
            continue;
        }

        // The command ended but the guest does not power off.
        if exited_at.is_some_and(|at| now >= deadlines.power_off_by(at)) {
            vm.kill()?;
            if let Some(session) = &session {
                session.shut_down();
            }
            if let Some(outcome) = outcome
                .take()
                .or_else(|| wait_outcome(events, deadlines.session_end))
            {
                return Ok(End::Session { outcome, vm: None });
            }
            // The status did arrive, but the session thread is stuck.
            return Ok(End::TimedOut { booted: true });
        }

        // Deadlines count only while the command has not ended.
        if exited_at.is_none() && now >= deadlines.timeout {
            vm.kill()?;
            end_session(session.as_ref(), events, deadlines.session_end);
            return Ok(End::TimedOut { booted: handshaken });
        }
        if !handshaken && now >= deadlines.boot {
            vm.kill()?;
            end_session(session.as_ref(), events, deadlines.session_end);
            return Ok(End::BootTimeout(deadlines.boot_limit));
        }
    }
}

/// Shuts the session down and gives it a moment to finish writing.
fn end_session(session: Option<&SessionThread>, events: &Receiver<Event>, limit: Duration) {
    if let Some(session) = session {
        session.shut_down();
        let _ = wait_outcome(events, limit);
    }
}

/// Waits up to `limit` for the session's outcome, dropping other events.
fn wait_outcome(events: &Receiver<Event>, limit: Duration) -> Option<Outcome> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(Event::Ended(outcome)) => return Some(outcome),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// What a run amounts to: the exit code, the line to print (after
/// `airlock: `), and whether the console and engine logs help explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub exit: Exit,
    pub message: Option<String>,
    pub diagnostics: bool,
}

fn command_exit(status: ExitStatus) -> Exit {
    // exit_code() is 0..=255 or 129..=192 (128 + signal 1..=64).
    u8::try_from(status.exit_code()).map_or(Exit::ProtocolError, Exit::Command)
}

/// Judges how the run ended. Pure.
pub fn judge(end: &End, timeout: Duration) -> Verdict {
    let verdict = |exit, message: String, diagnostics| Verdict {
        exit,
        message: Some(message),
        diagnostics,
    };
    match end {
        End::Session { outcome, vm } => match (outcome, vm) {
            (Outcome::Exited(status), Some(exit)) if exit.success() => Verdict {
                exit: command_exit(*status),
                message: None,
                diagnostics: false,
            },
            (Outcome::Exited(status), Some(exit)) => verdict(
                command_exit(*status),
                format!("warning: the VM process ended with {exit} after the command ended"),
                true,
            ),
            (Outcome::Exited(status), None) => verdict(
                command_exit(*status),
                format!(
                    "warning: the guest did not power off within {} s after the command ended; \
                     the VM was stopped",
                    POWER_OFF_GRACE.as_secs()
                ),
                false,
            ),
            (Outcome::SpawnFailed { message, status }, _) => verdict(
                // The init's shell-style code (127 not found, 126 not
                // executable) when it sent one, else 127.
                status
                    .filter(|s| s.exit_code() != 0)
                    .map_or(Exit::SpawnFailed, command_exit),
                format!("error: the command could not be started in the sandbox: {message}"),
                false,
            ),
            (Outcome::OutputClosed(e), _) => verdict(
                Exit::Interrupted(libc::SIGPIPE),
                format!("our output was closed ({e}); the sandbox was stopped"),
                false,
            ),
            (Outcome::OutOfMemory(status), _) => verdict(
                Exit::OutOfMemory,
                format!(
                    "error: the sandbox ran out of memory: the command was killed ({}) after \
                     the guest kernel killed processes for memory (raise --mem)",
                    match status {
                        ExitStatus::Signaled(sig) => format!("signal {sig}"),
                        ExitStatus::Exited(code) => format!("exit {code}"),
                    }
                ),
                false,
            ),
            (Outcome::OutputLimit(limit), _) => verdict(
                Exit::OutputLimit,
                format!(
                    "error: the command's output reached --max-output-bytes ({limit} bytes); \
                     the sandbox was stopped"
                ),
                false,
            ),
            (
                Outcome::Broken(Violation::Closed {
                    stage: Stage::BeforeHello,
                }),
                Some(exit),
            ) => verdict(
                Exit::SandboxFailed,
                format!(
                    "error: the sandbox failed: the VM process ended with {exit} \
                     before the guest's Hello"
                ),
                true,
            ),
            (Outcome::Broken(violation), vm) => {
                let mut line = format!("guest protocol error: {}", crate::report(violation));
                if let Some(exit) = vm {
                    line.push_str(&format!(" (the VM process ended with {exit})"));
                }
                verdict(Exit::ProtocolError, line, vm.is_some())
            }
        },
        End::StoppedBeforeConnect(exit) => verdict(
            Exit::SandboxFailed,
            format!(
                "error: the sandbox failed: the VM process ended with {exit} \
                 before the guest connected"
            ),
            true,
        ),
        End::BootTimeout(limit) => verdict(
            Exit::SandboxFailed,
            format!(
                "error: the sandbox failed: the guest did not connect within {} s \
                 (the boot deadline); the VM was stopped",
                limit.as_secs()
            ),
            true,
        ),
        End::TimedOut { booted } => verdict(
            Exit::Timeout,
            format!(
                "error: the sandbox ran longer than --timeout {} s and was stopped{}",
                timeout.as_secs(),
                if *booted {
                    ""
                } else {
                    " (the guest had not connected yet)"
                }
            ),
            // A guest that never connected: the console may say why.
            !booted,
        ),
        End::Interrupted(signal) => {
            let name = match *signal {
                libc::SIGINT => "SIGINT",
                libc::SIGTERM => "SIGTERM",
                libc::SIGHUP => "SIGHUP",
                _ => "a signal",
            };
            verdict(
                Exit::Interrupted(*signal),
                format!("interrupted by {name}; the sandbox was stopped"),
                false,
            )
        }
        End::SessionLost(exit) => verdict(
            Exit::ProtocolError,
            format!(
                "guest protocol error: the VM process ended with {exit} and the control \
                 session did not finish"
            ),
            true,
        ),
        End::AuditFailed(why) => verdict(
            Exit::SandboxFailed,
            format!("error: the audit log could not be written ({why}); the sandbox was stopped"),
            false,
        ),
    }
}

/// The lines that explain a failed run: whether the guest kernel panicked,
/// the end of the console, the end of each engine log that has anything.
fn diagnostics(console: &Path, vm: &Vm) -> Vec<String> {
    let mut lines = Vec::new();
    // The whole tail window, to find a panic message among the trace lines.
    let window = engine::tail_lines(console, usize::MAX);
    if window.iter().any(|l| l.contains(PANIC_MARKER)) {
        lines.push("the guest kernel panicked".into());
    }
    let skip = window.len().saturating_sub(engine::TAIL_LINES);
    lines.push(engine::describe_tail(&window[skip..], "the console"));
    for (name, log) in vm.logs() {
        let tail = engine::tail_lines(log, engine::TAIL_LINES);
        if !tail.is_empty() {
            lines.push(engine::describe_tail(&tail, &format!("the {name} log")));
        }
    }
    lines
}

/// The private directory of one run (mode 0700, made fresh): the console
/// log (unless the user named a file), the control and engine sockets, the
/// engine logs. Removed on drop unless kept.
#[derive(Debug)]
struct RunDir {
    dir: PathBuf,
    console: PathBuf,
    /// Keep the directory (with the console log) at the end.
    keep: bool,
    /// The console is the user's own file.
    user_console: bool,
}

impl RunDir {
    /// Makes the directory and creates (or truncates) the console file, so
    /// that a bad path is found before the VM starts and no stale content
    /// is shown.
    fn create(target: &ConsoleTarget) -> Result<RunDir, Error> {
        let dir = make_private_dir(&std::env::temp_dir())?;
        let run_dir = match target {
            ConsoleTarget::File(path) => RunDir {
                dir,
                console: path.clone(),
                keep: false,
                user_console: true,
            },
            ConsoleTarget::Temp { keep } => RunDir {
                console: dir.join("console.log"),
                dir,
                keep: *keep,
                user_console: false,
            },
        };
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&run_dir.console)
            .map_err(|source| Error::ConsoleLog {
                path: run_dir.console.clone(),
                source,
            })?;
        Ok(run_dir)
    }

    /// Returns the console path if it is kept (the run directory, minus its
    /// sockets, stays with it when it lives there).
    fn finish(self) -> Option<PathBuf> {
        if self.keep {
            if let Ok(entries) = fs::read_dir(&self.dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_socket()) {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
        (self.keep || self.user_console).then(|| self.console.clone())
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Creates a fresh directory only we can read, under `parent`.
fn make_private_dir(parent: &Path) -> Result<PathBuf, Error> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    for attempt in 0..16u32 {
        let dir = parent.join(format!(
            "airlock-run.{}.{:08x}",
            std::process::id(),
            stamp.wrapping_add(attempt.wrapping_mul(0x9e37_79b9))
        ));
        // create (not create_all): fails if the name exists, so we never
        // reuse a directory someone else prepared.
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
            Err(source) => {
                return Err(Error::RunDir {
                    dir: parent.to_path_buf(),
                    source,
                })
            }
        }
    }
    Err(Error::RunDir {
        dir: parent.to_path_buf(),
        source: last,
    })
}

/// Set by SIGINT, SIGTERM or SIGHUP to the signal's number.
#[derive(Debug)]
struct StopSignal(Arc<AtomicUsize>);

impl StopSignal {
    fn install() -> io::Result<StopSignal> {
        let flag = Arc::new(AtomicUsize::new(0));
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let value = usize::try_from(signal).map_err(io::Error::other)?;
            signal_hook::flag::register_usize(signal, Arc::clone(&flag), value)?;
        }
        Ok(StopSignal(flag))
    }

    fn received(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            signal => i32::try_from(signal).ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::TestDir;
    use airlock_protocol::{read_frame, Message};

    fn args() -> RunArgs {
        RunArgs {
            engine: EngineChoice::Auto,
            image: ImageArgs {
                kernel: None,
                initrd: None,
                image_root: None,
            },
            mem: 256,
            no_container: false,
            cpus: 1,
            timeout: None,
            env: Vec::new(),
            interactive: false,
            max_output_bytes: 1 << 30,
            cmdline: None,
            console_log: None,
            keep_console: false,
            audit: None,
            audit_key: None,
            report: None,
            audit_max_guest_events: 10_000,
            audit_max_guest_bytes: 16 << 20,
            workspace: None,
            exclude: Vec::new(),
            out: None,
            max_out_bytes: 1 << 30,
            collect: Vec::new(),
            image_archive: None,
            entrypoint: None,
            user: None,
            workdir: None,
            nested: false,
            vm_root: false,
            model: crate::cli::ModelArgs::default(),
            command: vec!["true".into()],
        }
    }

    /// The RunSpec a config would send.
    fn sent_spec(config: &RunConfig) -> RunSpec {
        let mut out = Vec::new();
        let mut output = Output::new(Vec::new(), Vec::new(), 0);
        let mut hello = Vec::new();
        airlock_protocol::write_frame(
            &mut hello,
            &Message::Hello {
                version: 1,
                capabilities: vec![],
            },
        )
        .expect("hello");
        let (audit, _) = AuditLog::memory(crate::audit::log::TEST_LIMITS, None);
        let _ = session::serve(
            hello.as_slice(),
            &mut out,
            &config.spec,
            &mut output,
            &mut |_| {},
            &audit,
        );
        let mut r = out.as_slice();
        let _hello = read_frame(&mut r).expect("hello");
        match read_frame(&mut r).expect("spec") {
            Message::RunSpec(spec) => spec,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn valid_args() {
        let config = RunConfig::try_from(args()).expect("valid");
        assert_eq!(config.mem_mib, 256);
        assert_eq!(config.cpus, 1);
        assert_eq!(config.timeout, Duration::from_secs(300));
        assert_eq!(config.console, ConsoleTarget::Temp { keep: false });
        assert!(config.extra_cmdline.is_empty());
        for (mem, cpus) in [(64, 16), (65536, 1)] {
            let config = RunConfig::try_from(RunArgs {
                mem,
                cpus,
                ..args()
            })
            .expect("valid");
            assert_eq!((config.mem_mib, u32::from(config.cpus)), (mem, cpus));
        }
        let config = RunConfig::try_from(RunArgs {
            console_log: Some("/tmp/c.log".into()),
            cmdline: Some(" airlock.debug=1  foo ".into()),
            ..args()
        })
        .expect("valid");
        assert_eq!(config.console, ConsoleTarget::File("/tmp/c.log".into()));
        assert_eq!(config.extra_cmdline, ["airlock.debug=1", "foo"]);
    }

    /// The in-guest endpoint gets the proxy's body limit: the default, or
    /// --model-max-request-bytes.
    #[test]
    fn the_model_body_limit_goes_to_the_guest() {
        let config = RunConfig::try_from(args()).expect("valid");
        assert_eq!(
            model_max_body_word(&config),
            format!("airlock.model_max_body={}", 32u64 << 20)
        );
        let mut a = args();
        a.model.model_max_request_bytes = Some(4096);
        let config = RunConfig::try_from(a).expect("valid");
        assert_eq!(model_max_body_word(&config), "airlock.model_max_body=4096");
    }

    #[test]
    fn image_mode_boots_the_root_read_only_with_or_without_a_container() {
        let mut config = RunConfig::try_from(RunArgs {
            cmdline: Some("airlock.debug=1".into()),
            ..args()
        })
        .expect("valid");
        assert_eq!(
            boot_cmdline(&config, true),
            ["root=/dev/vda", "rootfstype=erofs", "ro", "airlock.debug=1"]
        );
        config.container = false;
        assert_eq!(
            boot_cmdline(&config, true),
            [
                "root=/dev/vda",
                "rootfstype=erofs",
                "ro",
                "airlock.container=0",
                "airlock.debug=1"
            ]
        );
        config.container = true;
        config.archive = Some("/a.tar".into());
        config.nested = true;
        assert_eq!(
            boot_cmdline(&config, true),
            [
                "root=/dev/vda",
                "rootfstype=erofs",
                "ro",
                "airlock.archive=1",
                "airlock.nested=1",
                "airlock.debug=1"
            ]
        );
        assert_eq!(boot_cmdline(&config, false), ["airlock.debug=1"]);
        // --vm-root reaches the init in both modes.
        config.archive = None;
        config.nested = false;
        config.container = false;
        config.vm_root = true;
        assert_eq!(
            boot_cmdline(&config, false),
            ["airlock.vmroot=1", "airlock.debug=1"]
        );
        assert_eq!(
            boot_cmdline(&config, true),
            [
                "root=/dev/vda",
                "rootfstype=erofs",
                "ro",
                "airlock.container=0",
                "airlock.vmroot=1",
                "airlock.debug=1"
            ]
        );
    }

    /// The guest holds its results connection open while the command runs:
    /// meanwhile a second connection to the port is refused at once (closed
    /// unread) and audited with its port, and the first is served to its end;
    /// dropping the acceptor waits for it.
    #[test]
    fn a_file_port_refuses_a_later_connection_while_serving_the_first() {
        use std::io::Read;
        let dir = TestDir::new("file-port");
        let uds = dir.path().join("vsock");
        let (audit, memory) = AuditLog::memory(crate::audit::log::TEST_LIMITS, None);
        let (served, got) = mpsc::channel();
        let acceptor = file_port(FILES_OUT_PORT, &uds, &audit, move |stream| {
            let mut bytes = Vec::new();
            let _ = (&*stream).read_to_end(&mut bytes);
            let _ = served.send(bytes);
            json!({ "direction": "out" })
        })
        .expect("listen");
        let path = engine::port_path(&uds, FILES_OUT_PORT);
        let mut first = UnixStream::connect(&path).expect("first");
        first.write_all(b"real").expect("write");
        let mut second = UnixStream::connect(&path).expect("second");
        let _ = second.write_all(b"forged");
        second
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 8];
        match second.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("the second connection was not closed: {other:?}"),
        }
        let log = || String::from_utf8_lossy(&memory.bytes()).into_owned();
        let give_up = Instant::now() + Duration::from_secs(10);
        while !log().contains("control.refused") && Instant::now() < give_up {
            thread::sleep(Duration::from_millis(10));
        }
        let text = log();
        let refused = text
            .lines()
            .find(|l| l.contains("control.refused"))
            .unwrap_or_else(|| panic!("not audited while the first is served:\n{text}"));
        assert!(refused.contains("\"port\":1026"), "{refused}");
        assert!(
            got.try_recv().is_err(),
            "the first was not still being served"
        );
        drop(first);
        let bytes = got
            .recv_timeout(Duration::from_secs(10))
            .expect("served to its end");
        assert_eq!(bytes, b"real", "only the first connection's bytes are read");
        drop(acceptor);
        assert!(log().contains("files.done"), "{}", log());
    }

    #[test]
    fn the_command_user_is_what_the_init_reads() {
        let words = |w: &[&str]| w.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(command_user(&words(&["ro"]), true), "container root");
        assert_eq!(
            command_user(&words(&["airlock.nested=1"]), true),
            "privileged container root"
        );
        assert_eq!(
            command_user(&words(&["airlock.container=0"]), true),
            "uid 1000"
        );
        assert_eq!(command_user(&words(&[]), false), "uid 1000");
        assert_eq!(command_user(&words(&["airlock.vmroot=1"]), false), "root");
        assert_eq!(
            command_user(&words(&["airlock.container=0", "airlock.vmroot=1"]), true),
            "root"
        );
        // The user's --cmdline comes last and wins, as in the init.
        assert_eq!(
            command_user(&words(&["airlock.vmroot=1", "airlock.vmroot=0"]), false),
            "uid 1000"
        );
        assert_eq!(command_user(&words(&["airlock.vmroot"]), false), "root");
        assert_eq!(
            command_user(
                &words(&["airlock.container=0", "airlock.container=1"]),
                true
            ),
            "container root"
        );
    }

    #[test]
    fn with_a_workspace_the_command_runs_in_it() {
        let plain = RunConfig::try_from(args()).expect("valid");
        assert_eq!(plain.run_spec.cwd, GUEST_CWD);
        let ws = RunConfig::try_from(RunArgs {
            workspace: Some("/tmp/ws".into()),
            ..args()
        })
        .expect("valid");
        assert_eq!(ws.run_spec.cwd, WORKSPACE_CWD);
        let out = RunConfig::try_from(RunArgs {
            out: Some("/tmp/o".into()),
            ..args()
        })
        .expect("valid");
        assert_eq!(sent_spec(&out).cwd, WORKSPACE_CWD);
    }

    #[test]
    fn collect_patterns_must_be_relative() {
        for bad in ["/etc/*", "../x", "a/../b", ""] {
            let err = RunConfig::try_from(RunArgs {
                collect: vec![bad.into()],
                out: Some("/tmp/o".into()),
                ..args()
            })
            .expect_err(bad);
            assert!(matches!(err, Error::CollectPattern(_)), "{bad}: {err}");
            assert_eq!(err.exit(), Exit::Usage);
        }
        let too_many = RunConfig::try_from(RunArgs {
            collect: vec!["x".into(); 65],
            out: Some("/tmp/o".into()),
            ..args()
        });
        assert!(matches!(too_many, Err(Error::TooManyCollect)));
    }

    #[test]
    fn the_spec_carries_only_what_was_asked() {
        std::env::set_var("AIRLOCK_TEST_HOST_SECRET", "do-not-forward");
        let config = RunConfig::try_from(RunArgs {
            command: vec!["sh".into(), "-c".into(), "echo $A".into()],
            env: vec!["A=1".into(), "B=x=y".into(), "C=".into()],
            max_output_bytes: 1234,
            ..args()
        })
        .expect("valid");
        let spec = sent_spec(&config);
        assert_eq!(spec.argv, ["sh", "-c", "echo $A"]);
        assert_eq!(
            spec.env,
            [
                ("A".to_string(), "1".to_string()),
                ("B".into(), "x=y".into()),
                ("C".into(), String::new())
            ]
        );
        assert_eq!(spec.cwd, "/");
        assert_eq!(spec.timeout_ms, None);
        assert_eq!(spec.max_output_bytes, 1234);
        assert!(!spec.stdin);
    }

    #[test]
    fn invalid_args() {
        for mem in [0, 63, 65537] {
            let err = RunConfig::try_from(RunArgs { mem, ..args() }).expect_err("bad mem");
            assert!(matches!(err, Error::Mem(m) if m == mem));
            assert_eq!(err.exit(), Exit::Usage);
            assert!(err.to_string().contains("64 to 65536 MiB"), "{err}");
        }
        for cpus in [0, 17, 256, 1000] {
            let err = RunConfig::try_from(RunArgs { cpus, ..args() }).expect_err("bad cpus");
            assert!(matches!(err, Error::Cpus(c) if c == cpus));
            assert_eq!(err.exit(), Exit::Usage);
        }
        let err = RunConfig::try_from(RunArgs {
            timeout: Some(0),
            ..args()
        })
        .expect_err("bad timeout");
        assert_eq!(err.exit(), Exit::Usage);
        let err = RunConfig::try_from(RunArgs {
            command: vec![],
            ..args()
        })
        .expect_err("no command");
        assert!(matches!(err, Error::NoCommand));
        assert_eq!(err.exit(), Exit::Usage);
        assert!(!err.to_string().contains('\n'));
        let err = RunConfig::try_from(RunArgs {
            command: vec!["a".into(), "b\0c".into()],
            ..args()
        })
        .expect_err("nul");
        assert!(matches!(err, Error::NulInArgument(1)));
        let err = RunConfig::try_from(RunArgs {
            command: vec!["x".repeat(airlock_protocol::limits::MAX_STRING + 1)],
            ..args()
        })
        .expect_err("too long");
        assert!(matches!(err, Error::Spec(_)));
        assert_eq!(err.exit(), Exit::Usage);
        let err = RunConfig::try_from(RunArgs {
            cmdline: Some("a\0b".into()),
            ..args()
        })
        .expect_err("nul cmdline");
        assert_eq!(err.exit(), Exit::Usage);
    }

    #[test]
    fn env_validation() {
        assert_eq!(
            parse_env("K=V").expect("ok"),
            ("K".to_string(), "V".to_string())
        );
        assert_eq!(
            parse_env("K==V").expect("ok"),
            ("K".to_string(), "=V".to_string())
        );
        assert_eq!(
            parse_env("K=").expect("ok"),
            ("K".to_string(), String::new())
        );
        for bad in ["K", "", "=V", "=", "K\0=V", "K=V\0"] {
            let err = parse_env(bad).expect_err(bad);
            assert_eq!(err.exit(), Exit::Usage, "{bad:?}");
        }
        assert!(parse_env("HOME")
            .expect_err("bare")
            .to_string()
            .contains("never passed on"));
        let err =
            run_spec(vec!["x".into()], &["A=1".into(), "A=2".into()], 0).expect_err("duplicate");
        assert!(matches!(err, Error::DuplicateEnv(n) if n == "A"));
    }

    #[test]
    fn deadlines() {
        let start = Instant::now();
        let d = Deadlines::from_start(start, Duration::from_secs(5));
        assert_eq!(d.boot, start + Duration::from_secs(5));
        assert_eq!(d.timeout, start + Duration::from_secs(5));
        let d = Deadlines::from_start(start, Duration::from_secs(300));
        assert_eq!(d.boot_limit, BOOT_DEADLINE);
        assert_eq!(d.timeout, start + Duration::from_secs(300));
    }

    fn session(outcome: Outcome, vm: Option<ProcessExit>) -> End {
        End::Session { outcome, vm }
    }

    const T: Duration = Duration::from_secs(300);

    #[test]
    fn a_memory_kill_is_out_of_memory_123() {
        let v = judge(
            &session(
                Outcome::OutOfMemory(ExitStatus::Exited(137)),
                Some(ProcessExit::Code(0)),
            ),
            T,
        );
        assert_eq!(v.exit.code(), 123);
        assert!(v.message.expect("says why").contains("out of memory"));
        assert_eq!(
            how(&session(
                Outcome::OutOfMemory(ExitStatus::Signaled(9)),
                None
            )),
            "out_of_memory"
        );
    }

    #[test]
    fn the_output_limit_stops_the_run_with_125() {
        let v = judge(&session(Outcome::OutputLimit(1000), None), T);
        assert_eq!(v.exit, Exit::OutputLimit);
        assert_eq!(v.exit.code(), 125);
        assert!(v
            .message
            .expect("says why")
            .contains("--max-output-bytes (1000 bytes)"));
        assert_eq!(how(&session(Outcome::OutputLimit(1), None)), "output_limit");
    }

    #[test]
    fn judging_a_completed_command() {
        let clean = Some(ProcessExit::Code(0));
        let v = judge(&session(Outcome::Exited(ExitStatus::Exited(7)), clean), T);
        assert_eq!(
            v,
            Verdict {
                exit: Exit::Command(7),
                message: None,
                diagnostics: false
            }
        );
        let v = judge(&session(Outcome::Exited(ExitStatus::Signaled(9)), clean), T);
        assert_eq!(v.exit.code(), 137);
        let v = judge(&session(Outcome::Exited(ExitStatus::Exited(0)), None), T);
        assert_eq!(v.exit, Exit::Command(0));
        assert!(v.message.expect("warning").contains("did not power off"));
        let v = judge(
            &session(
                Outcome::Exited(ExitStatus::Exited(0)),
                Some(ProcessExit::Code(1)),
            ),
            T,
        );
        assert_eq!(v.exit, Exit::Command(0));
        assert!(v.diagnostics);
    }

    #[test]
    fn judging_failures() {
        let stopped = Some(ProcessExit::Code(0));
        let v = judge(
            &session(
                Outcome::Broken(Violation::Unexpected {
                    kind: "RunSpec",
                    stage: Stage::Running,
                }),
                None,
            ),
            T,
        );
        assert_eq!(v.exit.code(), 121);
        assert_eq!(
            v.message.as_deref(),
            Some("guest protocol error: unexpected RunSpec message while the command ran")
        );
        assert!(!v.diagnostics);

        let v = judge(
            &session(
                Outcome::Broken(Violation::Closed {
                    stage: Stage::Running,
                }),
                stopped,
            ),
            T,
        );
        assert_eq!(v.exit.code(), 121);
        assert!(v.diagnostics);
        assert!(v
            .message
            .expect("line")
            .contains("(the VM process ended with exit status 0)"));

        let v = judge(
            &session(
                Outcome::Broken(Violation::Closed {
                    stage: Stage::BeforeHello,
                }),
                stopped,
            ),
            T,
        );
        assert_eq!(v.exit.code(), 120);

        let failed = |status| {
            judge(
                &session(
                    Outcome::SpawnFailed {
                        message: "no such file".into(),
                        status,
                    },
                    None,
                ),
                T,
            )
        };
        let v = failed(None);
        assert_eq!(v.exit.code(), 127);
        assert!(v.message.expect("line").ends_with("no such file"));
        assert_eq!(failed(Some(ExitStatus::Exited(126))).exit.code(), 126);
        assert_eq!(failed(Some(ExitStatus::Exited(0))).exit.code(), 127);

        let v = judge(
            &session(
                Outcome::OutputClosed(io::ErrorKind::BrokenPipe.into()),
                None,
            ),
            T,
        );
        assert_eq!(v.exit.code(), 141);

        let v = judge(&End::StoppedBeforeConnect(ProcessExit::Signal(11)), T);
        assert_eq!(v.exit.code(), 120);
        assert!(v
            .message
            .expect("line")
            .contains("signal 11 before the guest connected"));
        assert!(v.diagnostics);

        let v = judge(&End::BootTimeout(Duration::from_secs(120)), T);
        assert_eq!(v.exit.code(), 120);
        assert!(v.message.expect("line").contains("within 120 s"));

        let v = judge(&End::TimedOut { booted: true }, Duration::from_secs(5));
        assert_eq!(v.exit.code(), 124);
        assert!(!v.diagnostics);
        assert_eq!(
            v.message.as_deref(),
            Some("error: the sandbox ran longer than --timeout 5 s and was stopped")
        );
        let v = judge(&End::TimedOut { booted: false }, Duration::from_secs(5));
        assert_eq!(v.exit.code(), 124);
        assert!(v.diagnostics);
        assert!(v.message.expect("line").contains("had not connected"));

        assert_eq!(judge(&End::Interrupted(libc::SIGINT), T).exit.code(), 130);
        assert_eq!(judge(&End::Interrupted(libc::SIGTERM), T).exit.code(), 143);
        assert_eq!(
            judge(&End::SessionLost(ProcessExit::Code(0)), T)
                .exit
                .code(),
            121
        );
    }

    // ---- supervise(), with a shell script as the "VM" and a thread as the guest ----

    fn discard() -> (Box<dyn Write>, Box<dyn Write>) {
        (Box::new(io::sink()), Box::new(io::sink()))
    }

    struct Harness {
        dir: TestDir,
        control: PathBuf,
        events: Receiver<Event>,
        params: SessionParams,
        _acceptor: Acceptor,
    }

    impl Harness {
        fn new(name: &str) -> Harness {
            let dir = TestDir::new(name);
            let control = dir.path().join("vsock_1024");
            let listener = UnixListener::bind(&control).expect("bind");
            let (tx, events) = mpsc::channel();
            let acceptor = {
                let tx = tx.clone();
                Acceptor::start(listener, move |a| {
                    let _ = tx.send(Event::Accepted(a));
                })
                .expect("acceptor")
            };
            let spec = run_spec(vec!["true".into()], &[], 1 << 20).expect("spec");
            Harness {
                control,
                events,
                params: SessionParams {
                    spec: EncodedSpec::new(spec).expect("encodes"),
                    max_output_bytes: 1 << 20,
                    events: tx,
                    writers: discard,
                    audit: AuditLog::memory(crate::audit::log::TEST_LIMITS, None).0,
                },
                _acceptor: acceptor,
                dir,
            }
        }

        /// A "VM" running `script`; `$OFF` is a file whose creation makes
        /// `wait_off` return (the guest "powering off").
        fn vm(&self, script: &str) -> Vm {
            let off = self.off();
            let script = format!(
                "OFF='{}'; wait_off() {{ while [ ! -e \"$OFF\" ]; do sleep 0.02; done; }}; {script}",
                off.display()
            );
            let main = engine::Process::spawn(
                "vm",
                Path::new("/bin/sh"),
                &["-c".into(), script.into()],
                &self.dir.path().join("vm.log"),
                &[],
            )
            .expect("spawn");
            Vm::new(main, Vec::new())
        }

        fn off(&self) -> PathBuf {
            self.dir.path().join("off")
        }

        /// A guest that connects, shakes hands, reads the spec, then does `then`.
        fn guest(
            &self,
            then: impl FnOnce(UnixStream, PathBuf) + Send + 'static,
        ) -> thread::JoinHandle<()> {
            let control = self.control.clone();
            let off = self.off();
            thread::spawn(move || {
                let stream = UnixStream::connect(&control).expect("connect");
                airlock_protocol::write_frame(&stream, &hello()).expect("hello");
                let mut r = &stream;
                assert!(matches!(read_frame(&mut r), Ok(Message::Hello { .. })));
                assert!(matches!(read_frame(&mut r), Ok(Message::RunSpec(_))));
                then(stream, off);
            })
        }

        fn supervise(&self, vm: &mut Vm, deadlines: Deadlines, stop: &StopSignal) -> End {
            supervise(
                vm,
                &self.events,
                &self.params,
                deadlines,
                stop,
                &mut Timings::default(),
            )
            .expect("supervise")
        }
    }

    fn hello() -> Message {
        Message::Hello {
            version: 1,
            capabilities: vec![],
        }
    }

    #[test]
    fn the_power_off_grace_never_runs_far_past_the_timeout() {
        let start = Instant::now();
        let d = Deadlines::from_start(start, Duration::from_secs(100));
        // Early exit: the whole grace.
        let early = start + Duration::from_secs(10);
        assert_eq!(d.power_off_by(early), early + POWER_OFF_GRACE);
        // Just before the timeout: cut to RESULTS_GRACE past it.
        let late = start + Duration::from_secs(99);
        assert_eq!(d.power_off_by(late), d.timeout + RESULTS_GRACE);
        // Dumping guest memory keeps its whole grace.
        let dumping = Deadlines {
            power_off_grace: DUMP_GRACE,
            past_timeout: None,
            ..d
        };
        assert_eq!(dumping.power_off_by(late), late + DUMP_GRACE);
    }

    fn quick(timeout: Duration) -> Deadlines {
        Deadlines {
            power_off_grace: Duration::from_millis(500),
            drain: Duration::from_millis(200),
            session_end: Duration::from_secs(2),
            ..Deadlines::from_start(Instant::now(), timeout)
        }
    }

    fn no_signal() -> StopSignal {
        StopSignal(Arc::new(AtomicUsize::new(0)))
    }

    fn touch(path: &Path) {
        fs::write(path, b"").expect("touch");
    }

    #[test]
    fn supervise_a_whole_run() {
        let h = Harness::new("sup-whole");
        let mut vm = h.vm("wait_off; exit 0");
        let guest = h.guest(|stream, off| {
            airlock_protocol::write_frame(&stream, &Message::Stdout(b"hi".to_vec()))
                .expect("stdout");
            airlock_protocol::write_frame(&stream, &Message::Exit(ExitStatus::Exited(7)))
                .expect("exit");
            drop(stream);
            touch(&off);
        });
        let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
        guest.join().expect("guest");
        assert!(
            matches!(
                end,
                End::Session {
                    outcome: Outcome::Exited(ExitStatus::Exited(7)),
                    vm: Some(ProcessExit::Code(0))
                }
            ),
            "{end:?}"
        );
        assert_eq!(judge(&end, T).exit.code(), 7);
    }

    #[test]
    fn supervise_the_guest_keeps_the_connection_after_powering_off() {
        // As vhost-device-vsock may: the VM process is gone, the socket is not.
        let h = Harness::new("sup-keep");
        let mut vm = h.vm("wait_off; exit 0");
        let guest = h.guest(|stream, off| {
            airlock_protocol::write_frame(&stream, &Message::Exit(ExitStatus::Exited(0)))
                .expect("exit");
            touch(&off);
            thread::sleep(Duration::from_secs(3));
            drop(stream);
        });
        let start = Instant::now();
        let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "waited for the socket"
        );
        guest.join().expect("guest");
        assert!(
            matches!(
                end,
                End::Session {
                    outcome: Outcome::Exited(ExitStatus::Exited(0)),
                    vm: Some(ProcessExit::Code(0))
                }
            ),
            "{end:?}"
        );
    }

    #[test]
    fn supervise_the_vm_stops_before_the_guest_connects() {
        let h = Harness::new("sup-noboot");
        let mut vm = h.vm("exit 3");
        let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
        assert!(
            matches!(end, End::StoppedBeforeConnect(ProcessExit::Code(3))),
            "{end:?}"
        );
        assert_eq!(judge(&end, T).exit.code(), 120);
    }

    #[test]
    fn supervise_the_vm_stops_in_the_middle_of_the_command() {
        let h = Harness::new("sup-crash");
        let mut vm = h.vm("wait_off; exit 0");
        let guest = h.guest(|stream, off| {
            touch(&off);
            thread::sleep(Duration::from_secs(3));
            drop(stream);
        });
        let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
        guest.join().expect("guest");
        assert!(
            matches!(
                end,
                End::Session {
                    outcome: Outcome::Broken(Violation::Closed {
                        stage: Stage::Running
                    }),
                    vm: Some(ProcessExit::Code(0))
                }
            ),
            "{end:?}"
        );
        assert_eq!(judge(&end, T).exit.code(), 121);
    }

    #[test]
    fn supervise_garbage_ends_the_run_at_once() {
        let h = Harness::new("sup-garbage");
        let mut vm = h.vm("exec sleep 30");
        let control = h.control.clone();
        let guest = thread::spawn(move || {
            let mut stream = UnixStream::connect(&control).expect("connect");
            stream.write_all(b"\xff\xff\xff\xffgarbage").expect("write");
            thread::sleep(Duration::from_secs(1));
        });
        let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
        vm.kill().expect("kill");
        guest.join().expect("guest");
        assert!(
            matches!(
                end,
                End::Session {
                    outcome: Outcome::Broken(Violation::Frame {
                        stage: Stage::BeforeHello,
                        ..
                    }),
                    vm: None
                }
            ),
            "{end:?}"
        );
        assert_eq!(judge(&end, T).exit.code(), 121);
    }

    #[test]
    fn supervise_a_vm_process_dying_with_its_connection_is_reported() {
        // The VMM killed by its seccomp filter: the connection breaks a
        // moment before the process is gone.
        let h = Harness::new("sup-dying");
        let mut vm = h.vm("sleep 0.1; kill -SYS $$");
        let control = h.control.clone();
        let guest = thread::spawn(move || {
            let mut stream = UnixStream::connect(&control).expect("connect");
            stream.write_all(b"\xff\xff\xff\xffgarbage").expect("write");
        });
        let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
        let _ = vm.kill();
        guest.join().expect("guest");
        assert!(
            matches!(
                end,
                End::Session {
                    outcome: Outcome::Broken(_),
                    vm: Some(ProcessExit::Signal(31))
                }
            ),
            "{end:?}"
        );
        let v = judge(&end, T);
        assert_eq!(v.exit.code(), 121);
        assert!(v.message.expect("why").contains("signal 31"));
        assert!(v.diagnostics, "the VM's log is shown");
    }

    #[test]
    fn supervise_a_guest_that_never_powers_off() {
        let h = Harness::new("sup-nooff");
        let mut vm = h.vm("exec sleep 30");
        let guest = h.guest(|stream, _| {
            airlock_protocol::write_frame(&stream, &Message::Exit(ExitStatus::Exited(5)))
                .expect("exit");
            thread::sleep(Duration::from_secs(3));
        });
        let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &no_signal());
        guest.join().expect("guest");
        assert!(
            matches!(
                end,
                End::Session {
                    outcome: Outcome::Exited(ExitStatus::Exited(5)),
                    vm: None
                }
            ),
            "{end:?}"
        );
        assert_eq!(judge(&end, T).exit.code(), 5);
    }

    #[test]
    fn supervise_deadlines_and_signals() {
        let h = Harness::new("sup-deadlines");
        let mut vm = h.vm("exec sleep 30");
        let end = h.supervise(&mut vm, quick(Duration::from_millis(300)), &no_signal());
        assert!(matches!(end, End::TimedOut { booted: false }), "{end:?}");
        vm.kill().expect("kill");

        let mut vm = h.vm("exec sleep 30");
        let deadlines = Deadlines {
            boot: Instant::now() + Duration::from_millis(300),
            ..quick(Duration::from_secs(30))
        };
        let end = h.supervise(&mut vm, deadlines, &no_signal());
        assert!(matches!(end, End::BootTimeout(_)), "{end:?}");
        vm.kill().expect("kill");

        let mut vm = h.vm("exec sleep 30");
        let stop = StopSignal(Arc::new(AtomicUsize::new(15)));
        let end = h.supervise(&mut vm, quick(Duration::from_secs(30)), &stop);
        assert!(matches!(end, End::Interrupted(15)), "{end:?}");
        // The VM is already gone.
        assert_eq!(
            vm.try_wait().expect("wait"),
            Some(ProcessExit::Signal(libc::SIGKILL))
        );
    }

    #[test]
    fn run_dir_is_private_and_removed() {
        let run_dir = RunDir::create(&ConsoleTarget::Temp { keep: false }).expect("create");
        let dir = run_dir.dir.clone();
        assert!(run_dir.console.is_file());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&dir).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(run_dir.finish(), None);
        assert!(!dir.exists());

        let run_dir = RunDir::create(&ConsoleTarget::Temp { keep: true }).expect("create");
        let dir = run_dir.dir.clone();
        let socket = dir.join("vsock_1024");
        let _listener = UnixListener::bind(&socket).expect("bind");
        let kept = run_dir.finish().expect("kept");
        assert!(kept.is_file());
        assert!(!socket.exists(), "sockets are not kept");
        fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn console_file_named_by_user_is_truncated_and_kept() {
        let dir = TestDir::new("userlog");
        let path = dir.path().join("c.log");
        fs::write(&path, b"stale").expect("write");
        let run_dir = RunDir::create(&ConsoleTarget::File(path.clone())).expect("create");
        let private = run_dir.dir.clone();
        assert_eq!(fs::read(&path).expect("read"), b"");
        assert_eq!(run_dir.finish(), Some(path));
        assert!(!private.exists());

        let bad = RunDir::create(&ConsoleTarget::File(dir.path().join("no/such/dir/c.log")))
            .expect_err("bad path");
        assert_eq!(bad.exit(), Exit::Usage);
    }
}
