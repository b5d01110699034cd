//! What the user can type: every command, option and its `--help`, and
//! the exit codes each promises.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::EngineChoice;

/// The default of `--max-output-bytes`: 1 GiB.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 30;

const RUN_EXIT_CODES: &str = "\
Exit codes:
  N    the command ran in the sandbox and exited with N (128+S if signal S
       killed it); the codes below come from airlock itself, which then says
       why on stderr in a line starting with `airlock:`
  2    bad usage or input (no command, bad --env, missing or non-ELF kernel,
       missing initrd, out-of-range value, requested engine unusable here,
       unreadable --workspace, --out not creatable); no VM was started
  120  the sandbox failed: the VM did not start, stopped before the guest
       connected, or the guest did not connect within the boot deadline
       (min(--timeout, 120 s)); the last console lines are shown
  121  the guest broke the protocol: a malformed or unexpected message, or the
       VM stopped before the command's exit status arrived
  123  out of memory: the command was killed after the guest kernel killed
       processes for memory (the VM has --mem MiB; the command's container
       a little less)
  124  timeout: the sandbox ran longer than --timeout and was stopped
  125  output limit: the command's stdout plus stderr reached
       --max-output-bytes; what fitted was forwarded, the sandbox was stopped
  127  the command could not be started in the sandbox (not found; 126 when
       it is not executable)
  130  interrupted by Ctrl-C (SIGINT; 143 for SIGTERM, 129 for SIGHUP, 141
       when our stdout or stderr was closed); the sandbox was stopped

Files: --workspace DIR goes into the guest's /workspace before the command
starts; with --out DIR, what the command leaves in /workspace/out comes back
into DIR after it exits, with modes airlock chooses (0644/0755, never
setuid, setgid or group/world writable). A result file that is refused (a
path outside DIR or through a symlink, a name already taken in DIR, over
--max-out-bytes, a size or sha256 mismatch, cut short, not matched by
--collect) is reported as `airlock: refused result file PATH: REASON` (the
first 20) and in the audit log; whatever was already at that path is left as
it was. A refused file does not change the exit code.

Output: the command's stdout and stderr arrive on airlock's stdout and stderr
as the command writes them. The guest console goes to a log file (see
--console-log, --keep-console), never to the terminal.

Audit log: every run writes one (see --audit), a hash-chained JSON Lines file
of what crossed the airlock: the kernel, initrd and init hashes, the policy
and the command (argv, and the --env names and values: never put a secret
there), the VM's start and end, every connection, protocol error and policy
denial, and what the guest reports (processes started, every exec in the VM).
Records say whether the host observed a fact or the guest claimed it. Its path
is printed at the end (`airlock: audit log: PATH`); check it with
`airlock audit verify PATH`.

Model calls: the agent in the sandbox calls the Anthropic or OpenAI API at its
own endpoint (ANTHROPIC_BASE_URL, OPENAI_BASE_URL, with placeholder keys).
With --model-upstream URL, airlock forwards POST /v1/messages (?beta=true),
POST /v1/messages/count_tokens, GET /v1/models[/ID], POST /v1/chat/completions,
POST /v1/responses and POST /v1/embeddings there with the real key (from
ANTHROPIC_API_KEY / OPENAI_API_KEY, --model-key-env or --model-key-file, or an
OAuth token with --model-auth bearer: it never enters the sandbox), within the
--model-* policy, and records each call in the audit log. Batches and files
are refused: they run outside the run's budget and lifetime. Each provider's key goes only to its
own upstream: https://api.anthropic.com serves Anthropic calls only,
https://api.openai.com OpenAI calls only, another host (a gateway) both;
anthropic=URL / openai=URL name a provider's upstream. Any key the upstream
sends back is masked before the agent sees it. Under --model-max-tokens each
call in flight holds its output cap against the budget. Anything else, and
every call when there is no --model-upstream, gets an API-shaped error (400,
403, 404, 413, 429, or 502 when the upstream cannot be reached) that names the
rule or limit and the flag that changes it, with x-should-retry: false; the
first refusal of each kind is also said on stderr.

Environment:
  AIRLOCK_HOME         directory holding build/ (default: found next to the airlock binary)
  AIRLOCK_KERNEL       kernel to boot when --kernel is not given
  AIRLOCK_INITRD       initrd to boot when --initrd is not given (and no root image)
  AIRLOCK_ROOTFS       root image to boot when --image-root is not given
  AIRLOCK_VMM          airlock-vmm binary, when none sits next to the airlock binary
  AIRLOCK_VHOST_VSOCK  vhost-device-vsock binary for the tcg engine
                       (default: $AIRLOCK_CACHE/tools/bin, else PATH)
  AIRLOCK_CACHE        Airlock's cache (default ~/.cache/airlock)
  XDG_STATE_HOME       where audit logs go by default (else ~/.local/state)
  TMPDIR               where the private run directory is made
  ANTHROPIC_API_KEY    with --model-upstream: the key for Anthropic calls
  OPENAI_API_KEY       with --model-upstream: the key for OpenAI calls
  CLAUDE_CODE_OAUTH_TOKEN  with --model-auth bearer: the OAuth token for Anthropic calls
The command gets only the variables given with --env: airlock never passes
its own environment into the sandbox.";

const DOCTOR_EXIT_CODES: &str = "\
Exit codes:
  0    at least one engine can run a sandbox on this host
  1    no engine can run a sandbox here (each FAIL line says how to fix it)
  2    bad usage";

const AUDIT_EXIT_CODES: &str = "\
Exit codes:
  0    done (verify: the log is intact)
  1    verify: the log is not intact (the first problem and the last intact
       record are printed)
  2    bad usage or input (missing or unreadable file, bad key file)";

const TOP_EXIT_CODES: &str = "\
Exit codes:
  0    success (run: otherwise the command's own exit code)
  1    doctor: no engine can run a sandbox on this host; audit verify: the
       log is not intact; image load: the image could not be stored
  2    bad usage or input; nothing was started
  120  the sandbox failed (the VM did not boot or crashed; create: it did
       not become ready; the audit log could not be kept)
  121  the guest broke the protocol
  123  run: out of memory (the guest kernel killed processes for memory)
  124  timeout
  125  run: output limit (stdout plus stderr reached --max-output-bytes)
  127  run, exec: the command could not be started in the sandbox
  130  interrupted (SIGINT; 143 for SIGTERM, 129 for SIGHUP, 141 when our
       output was closed)

Run `airlock doctor` to check what this host can run.";

/// Run untrusted agents and commands inside disposable KVM microVMs.
#[derive(Debug, Parser)]
#[command(name = "airlock", version, after_help = TOP_EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command inside a fresh, disposable microVM and exit with its code.
    ///
    /// `airlock run [OPTIONS] -- CMD [ARGS...]` boots a sandbox, runs CMD
    /// there (no network, only the environment given with --env, cwd /),
    /// streams its stdout and stderr to ours, and stops the sandbox.
    #[command(
        after_help = RUN_EXIT_CODES,
        override_usage = "airlock run [OPTIONS] -- CMD [ARGS]..."
    )]
    Run(Box<RunArgs>),
    /// Check whether this host can run sandboxes, and say how to fix what is missing.
    #[command(after_help = DOCTOR_EXIT_CODES)]
    Doctor(DoctorArgs),
    /// Check, show and sign the audit logs that runs write.
    #[command(after_help = AUDIT_EXIT_CODES)]
    Audit(AuditArgs),
    /// Boot a sandbox that lives: it stays up, under a supervisor of its
    /// own, for `airlock exec` to run commands in, until `stop`, `rm`,
    /// `--idle-timeout` or `--max-lifetime` ends it.
    ///
    /// Takes `run`'s options (engine, image, memory, workspace, model and
    /// audit options, limits; `--out` brings results back when it stops)
    /// and no command. Returns once an exec can run in it, printing its
    /// name. On the guest root image, execs run in the agent's container.
    #[command(
        after_help = SANDBOX_EXIT_CODES,
        override_usage = "airlock create [--name NAME] [--label KEY=VALUE]... [RUN OPTIONS]"
    )]
    Create(Box<CreateArgs>),
    /// Run a command in a live sandbox and exit with its code.
    ///
    /// In the sandbox's agent container (as its root; without a container,
    /// as the sandbox's user), in /workspace (or /) unless -w says
    /// otherwise, with the sandbox's environment and -e's; several execs may
    /// run at once.
    #[command(
        after_help = SANDBOX_EXIT_CODES,
        override_usage = "airlock exec [-i] [-u USER] [-e NAME=VALUE]... [-w DIR] SANDBOX -- CMD [ARGS]..."
    )]
    Exec(ExecArgs),
    /// List the sandboxes (running ones; --all: stopped ones too).
    #[command(after_help = SANDBOX_EXIT_CODES)]
    Ls(LsArgs),
    /// Show a sandbox as JSON: its state, options, supervisor, audit log.
    #[command(after_help = SANDBOX_EXIT_CODES)]
    Inspect(NameArg),
    /// Stop a sandbox: SIGTERM to its processes, SIGKILL after -t seconds,
    /// then the VM stops (results come back to its --out).
    #[command(after_help = SANDBOX_EXIT_CODES)]
    Stop(StopArgs),
    /// Remove stopped sandboxes (-f: stop running ones first, at once).
    ///
    /// Each name on its own: a missing one, or a running one without -f,
    /// is said and left, the others are removed; the exit status is the
    /// first failure's.
    #[command(after_help = SANDBOX_EXIT_CODES)]
    Rm(RmArgs),
    /// Print the end of a sandbox's guest console log.
    #[command(after_help = SANDBOX_EXIT_CODES)]
    Logs(LogsArgs),
    /// Keep booted, ready sandboxes waiting, for `create` to take at once.
    ///
    /// `airlock pool --size N [--pool NAME] [CREATE OPTIONS]` starts a pool
    /// keeper (in the background) that keeps N sandboxes booted with these
    /// options, each ready for an exec; `airlock create` with the same
    /// options (names and labels aside) takes one and names it, and the
    /// keeper boots another. A pooled sandbox that dies is replaced. Run
    /// again with another --size to resize; `pool ls` shows the pools,
    /// `pool rm NAME` stops one and its waiting sandboxes.
    #[command(
        after_help = POOL_HELP,
        override_usage = "airlock pool --size N [--pool NAME] [--wait] [CREATE OPTIONS]\n       airlock pool ls [--format json]\n       airlock pool rm NAME..."
    )]
    Pool(Box<PoolArgs>),
    /// Load, list, inspect and remove images, for `run --image NAME`.
    ///
    /// An image is loaded once from a docker or OCI archive (`docker save`
    /// / `podman save` output) and kept by digest under
    /// $XDG_DATA_HOME/airlock/images (else ~/.local/share/airlock/images),
    /// unpacked into a read-only erofs disk that a sandbox's container
    /// boots straight into (no `podman load` in the VM).
    #[command(after_help = IMAGE_EXIT_CODES)]
    Image(ImageCmdArgs),
    /// A docker-compatible front end: each container is a sandbox of its
    /// own (its own microVM).
    ///
    /// `airlock docker ARGS` is the same as the airlock binary invoked as
    /// `docker` (a symlink named `docker` on an agent platform's PATH):
    /// run, exec, ps, stop, kill, rm, logs, images, image inspect, load,
    /// save, build, rmi, info, version. Policy (egress, host ports, model
    /// upstream, limits, engine) comes from $AIRLOCK_DOCKER_CONFIG, else
    /// ~/.config/airlock/docker.toml. Flags that would weaken the sandbox
    /// (--privileged, --cap-add, --device, --network host, ...) and
    /// anything unknown are refused with exit 125. `airlock docker --help`
    /// lists the commands; docs/DOCKER.md has the mapping.
    #[command(disable_help_flag = true)]
    Docker {
        /// The docker command line
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// (Internal) the live mounts' file server of one sandbox, started by
    /// airlock itself.
    #[command(hide = true)]
    ShareServer,
}

const IMAGE_EXIT_CODES: &str = "\
Exit codes:
  0    done
  1    the image could not be stored (mkfs.erofs missing or failing, a
       write to the store failing); the store is left as it was
  2    bad usage or input: not an image archive, a layer that does not match
       its digest, an unknown or ambiguous reference; nothing changed

References: NAME[:TAG] (`:latest` when no tag; `localhost/NAME` too, as
podman names local images) or sha256:DIGEST (a unique prefix of at least 4
hex digits). Loading an archive whose name another image has moves the
name to the new image (the old one stays, as <none>, until `image rm`).

Unpacking: the layers are applied in order (OCI whiteouts included) on the
host, never through a symlink and never outside the image's root (entries
that try are left out and counted); device nodes are dropped; modes and
owners are kept; extended attributes are not. Each layer must match its
digest.";

/// `airlock image`.
#[derive(Debug, Clone, Args)]
pub struct ImageCmdArgs {
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ImageCommand {
    /// Load a docker or OCI image archive (uncompressed tar) into the
    /// store, unpacked into an erofs disk, under the archive's names
    #[command(after_help = IMAGE_EXIT_CODES)]
    Load(ImageLoadArgs),
    /// List the images in the store
    #[command(after_help = IMAGE_EXIT_CODES)]
    Ls(ImageLsArgs),
    /// Show an image as JSON: digest, names, config, disk (path, size)
    #[command(after_help = IMAGE_EXIT_CODES)]
    Inspect(ImageRefArg),
    /// Remove names or images: a NAME[:TAG] loses that name (the image
    /// goes with its last name); a sha256: digest removes the image and
    /// all its names. Every reference is checked before anything is removed
    #[command(after_help = IMAGE_EXIT_CODES)]
    Rm(ImageRmArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ImageLoadArgs {
    /// The archive (`docker save` / `podman save` output)
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ImageLsArgs {
    #[arg(long, value_enum, default_value_t = ListFormat::Table)]
    pub format: ListFormat,
}

#[derive(Debug, Clone, Args)]
pub struct ImageRefArg {
    /// NAME[:TAG] or sha256:DIGEST (a unique prefix will do)
    #[arg(value_name = "REF")]
    pub reference: String,
}

#[derive(Debug, Clone, Args)]
pub struct ImageRmArgs {
    /// NAME[:TAG] or sha256:DIGEST
    #[arg(value_name = "REF", required = true)]
    pub references: Vec<String>,
}

const SANDBOX_EXIT_CODES: &str = "\
Exit codes:
  0    done (exec: otherwise the command's own exit code, 128+N for signal N)
  2    bad usage or input: unknown, duplicate or bad name, a sandbox that is
       not running (exec) or is running (rm without -f); nothing changed
  120  the sandbox failed (did not boot, or its supervisor is gone)
  127  exec: the command could not be started in the sandbox

Sandboxes live under $XDG_RUNTIME_DIR/airlock/sandboxes (root:
/run/airlock/sandboxes; $AIRLOCK_SANDBOX_DIR overrides), one private
directory each. Each keeps one audit log for its whole life.";

const POOL_HELP: &str = "\
Exit codes:
  0    done
  2    bad usage: a bad pool name or size, an option a pool cannot take, a
       pool of that name with other options; nothing changed
  120  the keeper did not start, or (--wait) the pool did not fill

What a pool may hold: the options are those of `create` (engine, image,
memory, vCPUs, egress and model policy, secrets, limits, --idle-timeout,
--max-lifetime); names and labels are given when `create` takes a sandbox.
Options that bring host files in or write them at boot (--workspace, --out,
--mount, --volume, --audit, --report, --console-log) are refused: a pooled
sandbox is booted before its user asks for it.

What `create` matches: the same options, the same stored image digest, the
same airlock binary (a rebuild or upgrade leaves a running pool unmatched:
start it again), the same kernel and root image files (by size, mtime and
inode, as `run` resolves them), and the same values of every environment
variable the options read (ANTHROPIC_API_KEY, OPENAI_API_KEY,
CLAUDE_CODE_OAUTH_TOKEN, the variables of --model-key-env and
--secret ...=env:VAR) and of every file they name (--secret ...=file:PATH,
keys files). Anything else boots cold, as `create --no-pool` always does. A pooled sandbox reads
its keys and secrets when it boots, with the environment of `airlock pool`.

--max-lifetime counts from a pooled sandbox's boot; --idle-timeout from
when `create` takes it. The audit log of a pooled sandbox starts at its
boot; `sandbox.adopt` records when it was taken and by which name.

Pools live under the sandboxes' state root, in .pools/NAME: pool.json,
keeper.log (the keeper's lines: members booted, died, replaced), and the
waiting sandboxes' directories.";

/// `airlock pool`.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PoolArgs {
    #[command(subcommand)]
    pub command: Option<PoolCommand>,
    /// The pool's name: [a-zA-Z0-9][a-zA-Z0-9_.-]{0,31}
    #[arg(long = "pool", value_name = "NAME", default_value = "default")]
    pub pool: String,
    /// How many booted, ready sandboxes to keep waiting (1 to 32)
    #[arg(long, value_name = "N")]
    pub size: Option<u32>,
    /// Return only once the pool holds --size ready sandboxes
    #[arg(long)]
    pub wait: bool,
    /// (Internal) be the pool's keeper.
    #[arg(long, hide = true)]
    pub keep: bool,
    /// (Internal) be the supervisor of one of the pool's sandboxes.
    #[arg(long, hide = true)]
    pub member: bool,
    #[command(flatten)]
    pub create: CreateArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum PoolCommand {
    /// List the pools: size, ready and booting sandboxes, keeper
    Ls(PoolLsArgs),
    /// Stop pools: their keepers, and the sandboxes still waiting
    Rm(PoolRmArgs),
}

#[derive(Debug, Clone, Args)]
pub struct PoolLsArgs {
    #[arg(long, value_enum, default_value_t = ListFormat::Table)]
    pub format: ListFormat,
}

#[derive(Debug, Clone, Args)]
pub struct PoolRmArgs {
    /// The pools
    #[arg(value_name = "NAME", required = true)]
    pub names: Vec<String>,
}

/// `airlock create`.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// The sandbox's name: [a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}, unique per
    /// user [default: a new sbx-... name]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// A label, for `ls --filter label=KEY=VALUE` (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Stop the sandbox once no exec has run for this long
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
    /// Stop the sandbox this long after it was created, whatever it does
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    pub max_lifetime: u64,
    /// (Internal) be the supervisor of the sandbox named in
    /// $AIRLOCK_SANDBOX_NAME.
    #[arg(long, hide = true)]
    pub supervise: bool,
    /// Boot a new sandbox even if a warm pool (`airlock pool`) has a ready
    /// one made with these same options
    #[arg(long)]
    pub no_pool: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `airlock exec`.
#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    /// Forward our stdin to the command (to its end of file)
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Set NAME=VALUE in the command's environment (repeatable)
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Run as this user in the agent's container: a name or uid[:gid]
    /// [default: the container's root]
    #[arg(short = 'u', long = "user", value_name = "USER")]
    pub user: Option<String>,
    /// The command's working directory in the sandbox [default: the
    /// sandbox's: /workspace with --workspace or --out, else /]
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// The sandbox
    #[arg(value_name = "SANDBOX")]
    pub name: String,
    /// The command and its arguments (after `--`)
    #[arg(value_name = "CMD", trailing_var_arg = true, required = true)]
    pub command: Vec<String>,
}

/// How `ls` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    Table,
    Json,
}

/// `airlock ls`.
#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    /// Also list stopped sandboxes (and those whose supervisor died)
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Only sandboxes that match: name=NAME or label=KEY=VALUE (repeatable:
    /// all must match)
    #[arg(long = "filter", value_name = "FILTER")]
    pub filters: Vec<String>,
    #[arg(long, value_enum, default_value_t = ListFormat::Table)]
    pub format: ListFormat,
}

/// A sandbox's name.
#[derive(Debug, Clone, Args)]
pub struct NameArg {
    /// The sandbox
    #[arg(value_name = "SANDBOX")]
    pub name: String,
}

/// `airlock stop`.
#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    /// Seconds between SIGTERM and SIGKILL
    #[arg(short = 't', long = "time", value_name = "SECS", default_value_t = 10)]
    pub time: u64,
    /// The sandbox
    #[arg(value_name = "SANDBOX")]
    pub name: String,
}

/// `airlock rm`.
#[derive(Debug, Clone, Args)]
pub struct RmArgs {
    /// Stop a running sandbox first (SIGKILL at once)
    #[arg(short = 'f', long)]
    pub force: bool,
    /// The sandboxes
    #[arg(value_name = "SANDBOX", required = true)]
    pub names: Vec<String>,
}

/// `airlock logs`.
#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// How many lines from the end
    #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 100)]
    pub lines: usize,
    /// The sandbox
    #[arg(value_name = "SANDBOX")]
    pub name: String,
}

#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// Check a log: the hash chain, the seq numbers, every record, that it
    /// ends with run.end and its seal, and the seal's signature. Exits 0
    /// only if the log is intact.
    #[command(after_help = AUDIT_EXIT_CODES)]
    Verify(VerifyArgs),
    /// Print a log as a timeline (time offset, source, kind, key fields),
    /// or its records as JSON Lines. Does not verify it.
    #[command(after_help = AUDIT_EXIT_CODES)]
    Show(ShowArgs),
    /// Write a new Ed25519 key pair for sealing logs: OUT (the private key,
    /// mode 0600, for `run --audit-key`) and OUT.pub (for `verify --key`).
    /// Each holds 64 hex digits: the 32-byte seed, or the public key.
    #[command(after_help = AUDIT_EXIT_CODES)]
    Keygen(KeygenArgs),
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The audit log
    pub file: PathBuf,
    /// The public key the log must be signed with (a file of 64 hex digits)
    #[arg(long, value_name = "PUB")]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// The audit log
    pub file: PathBuf,
    /// Print the records as JSON Lines instead of a timeline
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct KeygenArgs {
    /// Where to write the private key (the public key goes to OUT.pub);
    /// neither may exist yet
    #[arg(value_name = "OUT")]
    pub out: PathBuf,
}

/// Where the guest kernel and initrd come from.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ImageArgs {
    /// Guest kernel: an uncompressed x86-64 ELF vmlinux with a PVH entry
    /// [default: $AIRLOCK_KERNEL, else build/vmlinux under the Airlock home]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Guest initrd (cpio archive holding airlock-init)
    /// [default: $AIRLOCK_INITRD, else build/initramfs.cpio under the Airlock home].
    /// Given, it boots the initrd and no root image
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Guest root image (erofs, from scripts/build-image.sh), attached
    /// read-only; the command runs in a container on it
    /// [default: $AIRLOCK_ROOTFS, else build/rootfs.img under the Airlock
    /// home if it exists and no initrd was asked for]
    #[arg(long, value_name = "PATH", conflicts_with = "initrd")]
    pub image_root: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Which engine boots the VM
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,
    #[command(flatten)]
    pub image: ImageArgs,
    /// Guest memory in MiB (64 to 65536)
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    pub mem: u32,
    /// Number of vCPUs (1 to 16)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// Stop the sandbox and exit with 124 if it runs longer than this, boot
    /// included (at least 1) [default: 300]
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Set NAME=VALUE in the command's environment (repeatable). Nothing
    /// else from airlock's environment reaches the sandbox.
    #[arg(long = "env", short = 'e', value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Forward our stdin to the command, to its end of file (binary-safe;
    /// without -i the command's stdin is empty)
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Forward at most this many bytes of the command's stdout plus stderr;
    /// reaching it stops the sandbox (exit 125)
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_OUTPUT_BYTES)]
    pub max_output_bytes: u64,
    /// With a root image, run the command directly in the VM rather than in
    /// a container
    #[arg(long)]
    pub no_container: bool,
    /// Run the command as root in the VM (only without a container:
    /// --no-container, or --initrd), instead of as an unprivileged user
    /// (uid 1000, no capabilities, no vsock). Root in the VM can reach the
    /// guest init and the host's ports: this gives up the guarantee that
    /// the exit code and the results are the command's own
    #[arg(long, conflicts_with = "nested")]
    pub vm_root: bool,
    /// Extra words for the guest kernel command line (e.g. airlock.debug=1)
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Write the guest console to this file and keep it (default: a private
    /// temporary file, removed at the end)
    #[arg(long, value_name = "PATH", conflicts_with = "keep_console")]
    pub console_log: Option<PathBuf>,
    /// Keep the temporary console log (and the engine's logs) and print
    /// where they are
    #[arg(long)]
    pub keep_console: bool,
    /// Write the audit log to this new file [default:
    /// $XDG_STATE_HOME/airlock/audit/UTCTIME-RUNID.jsonl, else under
    /// ~/.local/state/airlock/audit/]
    #[arg(long, value_name = "FILE")]
    pub audit: Option<PathBuf>,
    /// Sign the audit log's seal with this Ed25519 private key (a mode-0600
    /// file of 64 hex digits, the key's seed: see `airlock audit keygen`)
    #[arg(long, value_name = "FILE")]
    pub audit_key: Option<PathBuf>,
    /// When the run ends, write a JSON summary to FILE (replaced
    /// atomically): exit code, how the run ended, the audit log's path,
    /// sha256 and record count, the console log. Written by airlock alone,
    /// so scripts can find the audit log without reading stderr, where the
    /// sandbox's own output also goes
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Write at most this many records the guest reports; the rest are
    /// counted in one audit.overflow record
    #[arg(long, value_name = "N", default_value_t = crate::audit::DEFAULT_MAX_GUEST_RECORDS)]
    pub audit_max_guest_events: u64,
    /// Write at most this many bytes of records the guest reports
    #[arg(long, value_name = "BYTES", default_value_t = crate::audit::DEFAULT_MAX_GUEST_BYTES)]
    pub audit_max_guest_bytes: u64,
    /// Copy this directory into the guest's /workspace before the command
    /// starts, and run the command there (regular files and directories
    /// with their modes and mtimes;
    /// symlinks are skipped, never followed; .env*, .ssh, .aws, .gnupg,
    /// *.pem and id_* are never copied)
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Also leave out of the workspace, and hide in every live mount, every
    /// file or directory whose name matches PATTERN (`*` and `?`;
    /// repeatable; needs --workspace, --mount or -v)
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Share a host directory or file live with the agent's container, at
    /// GUEST, while the sandbox runs (repeatable, at most 32; nested
    /// targets and single files too). Writes on either side are seen by
    /// the other: a host write followed by close is seen at the guest's
    /// next open; a guest write is on the host when its write returns.
    /// Served by a jailed file server on the host over the vsock door (no
    /// network, no virtio-fs): symlinks are served as links and never
    /// followed on the host; .env*, .ssh, .aws, .gnupg, *.pem, id_* and
    /// --exclude names do not exist for the guest; `ro` is enforced on the
    /// host; files the guest makes belong to you (or uid=/gid=, as root);
    /// set-user-ID bits and chown are dropped. Not with --no-container.
    /// SQLite across the boundary: rollback journal modes only (not WAL),
    /// one writer per file
    #[arg(
        long = "mount",
        value_name = "type=bind,src=HOST,dst=GUEST[,ro][,uid=N][,gid=N]"
    )]
    pub mounts: Vec<String>,
    /// The docker short form of --mount: HOST:GUEST[:ro|:rw] (repeatable)
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    pub volumes: Vec<String>,
    /// Refuse (EDQUOT) writes through a live mount past this many bytes
    /// written or preallocated in all, per mount: the guest cannot fill the
    /// host's disk
    #[arg(long, value_name = "BYTES", default_value_t = crate::share::spec::DEFAULT_MAX_WRITE_BYTES)]
    pub mount_max_write: u64,
    /// Refuse (EDQUOT) making files, directories and links through a live
    /// mount past this many, per mount
    #[arg(long, value_name = "N", default_value_t = crate::share::spec::DEFAULT_MAX_FILES)]
    pub mount_max_files: u64,
    /// Bring back what the command wrote under /workspace/out into DIR
    /// (created if missing) after it exits; the command runs in /workspace.
    /// Each file is written atomically,
    /// never through a symlink, never outside DIR, size and sha256 checked,
    /// with modes airlock chooses (0644, or 0755 if executable; directories
    /// 0755; never setuid, setgid or group/world writable); directories
    /// already in DIR are left as they are. --audit, --console-log and
    /// --report cannot be inside DIR
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Bring back, instead of /workspace/out, the files under /workspace
    /// whose path (relative to /workspace) matches PATTERN: `*` and `?`
    /// within one path component, `**` for any number of components
    /// (repeatable; needs --out)
    #[arg(long, value_name = "PATTERN", requires = "out")]
    pub collect: Vec<String>,
    /// Run the command in a container made from this image instead of the
    /// guest image's own root: NAME[:TAG] or sha256:DIGEST of an image
    /// loaded with `airlock image load` (its erofs disk is attached
    /// read-only and the image's Entrypoint, Cmd, Env, WorkingDir and User
    /// apply; see --entrypoint, -u, -w, -e), or a FILE, an OCI or docker
    /// archive (`podman save` / `docker save` output, uncompressed tar),
    /// attached read-only and loaded with podman in the VM at each run,
    /// the command run as given (as root unless -u). A value that exists as
    /// a path, starts with / ./ ../ or ends in .tar is a FILE
    #[arg(long = "image", value_name = "IMAGE", conflicts_with = "no_container")]
    pub image_archive: Option<PathBuf>,
    /// The container's entrypoint: CMD runs as `ENTRYPOINT CMD...`.
    /// Replaces the image's Entrypoint and drops its Cmd, as docker does;
    /// "" clears it
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,
    /// Run the command as USER[:GROUP] (names or numbers, resolved in the
    /// container's root) in its container [default: the image's User, else
    /// root]
    #[arg(short = 'u', long = "user", value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// The command's working directory [default: the image's WorkingDir,
    /// else /workspace with --workspace or --out, else /]; the workspace is
    /// /workspace whatever it is
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Let the command use podman itself (nested containers): its
    /// container is privileged within the VM and gets its own empty
    /// container storage. The VM stays the isolation boundary; the
    /// container layer then no longer confines the command within the VM,
    /// and as with --vm-root the exit code and the results are no longer
    /// guaranteed to be the command's own
    #[arg(long, conflicts_with = "no_container")]
    pub nested: bool,
    /// kvm engine: boot from scratch rather than wake from the snapshot
    /// cache (a snapshot of the booted guest, made on first use for each
    /// kernel, image, memory, vCPUs and boot options; for `create` without
    /// live mounts or an image archive it holds the sandbox's container
    /// started; see docs/SNAPSHOTS.md)
    #[arg(long)]
    pub no_snapshot: bool,
    /// Accept at most this many bytes of result files in total (and per
    /// file); larger files are refused
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_OUTPUT_BYTES)]
    pub max_out_bytes: u64,
    /// Let the agent reach what RULE names through the sandbox's egress
    /// proxy (HTTP_PROXY, HTTPS_PROXY and ALL_PROXY at 127.0.0.1:3128,
    /// SOCKS5 at 127.0.0.1:1080 in the guest; the guest has no network
    /// device, so nothing else gets out). RULE: a host name, *.domain (names below it), * (any), an IP
    /// or a CIDR, with :PORT or :* (without: ports 80 and 443); IPv6 as
    /// [::1]:443. Default deny. airlock resolves names on the host and
    /// checks each address: loopback, private, link-local (cloud metadata)
    /// and other special addresses are only reached when a rule names that
    /// host exactly or holds that IP, never through a wildcard (repeatable)
    #[arg(long, value_name = "RULE")]
    pub net_allow: Vec<String>,
    /// Refuse RULE (as --net-allow): deny wins over allow, by name and
    /// again on the resolved addresses (repeatable)
    #[arg(long, value_name = "RULE")]
    pub net_deny: Vec<String>,
    /// Read rules from FILE: one per line, `allow RULE` or `deny RULE`,
    /// `#` comments
    #[arg(long, value_name = "FILE")]
    pub net_policy: Option<PathBuf>,
    /// Forward host.docker.internal:PORT and host.airlock.internal:PORT in
    /// the guest (directly, and through the proxy) to the host's
    /// 127.0.0.1:HOSTPORT (default: the same port), for credential
    /// gateways and local services (repeatable, at most 32)
    #[arg(long, value_name = "PORT[:HOSTPORT]")]
    pub host_port: Vec<String>,
    /// Most egress tunnels open at once (more wait)
    #[arg(long, value_name = "N", default_value_t = crate::egress::DEFAULT_MAX_TUNNELS)]
    pub net_max_tunnels: usize,
    /// Most bytes through the egress door, both ways, in the sandbox's
    /// life: past it tunnels are cut and new ones refused
    #[arg(long, value_name = "BYTES", default_value_t = crate::egress::DEFAULT_MAX_BYTES)]
    pub net_max_bytes: u64,
    /// Give up connecting to a destination after this many seconds
    #[arg(long, value_name = "SECS", default_value_t = crate::egress::DEFAULT_CONNECT_TIMEOUT_S)]
    pub net_connect_timeout: u64,
    /// Close a tunnel with no bytes either way for this many seconds
    #[arg(long, value_name = "SECS", default_value_t = crate::egress::DEFAULT_IDLE_TIMEOUT_S)]
    pub net_idle_timeout: u64,
    /// Keep a credential on the host: NAME's value comes from airlock's
    /// environment (env:VAR), a file (file:PATH) or a host program
    /// (cmd:COMMAND, run with sh -c; its output is the value, or JSON
    /// {"value": ..., "expires_in": SECS}; run again when it expires, else
    /// every 300 s). The guest only ever gets a placeholder,
    /// AIRLOCK_SECRET_<NAME>=airlock-ph-<random>; the broker puts the value
    /// in requests to the hosts of --secret-bind (repeatable, at most 32)
    #[arg(long = "secret", value_name = "NAME=env:VAR|file:PATH|cmd:COMMAND")]
    pub secrets: Vec<String>,
    /// Also put secret NAME's placeholder in the guest's variable VAR
    /// (e.g. GITHUB_TOKEN, ANTHROPIC_API_KEY) (repeatable)
    #[arg(long = "secret-env", value_name = "NAME=VAR")]
    pub secret_env: Vec<String>,
    /// Put secret NAME's value in requests to HOST (a name, *.domain, or a
    /// preset: @anthropic, @openai, @github, @npm, @pypi), on any port the
    /// egress policy allows: the broker terminates TLS for these hosts only
    /// (a CA made for this sandbox, trusted in the guest through
    /// /etc/ssl/certs/ca-certificates.crt and SSL_CERT_FILE,
    /// REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, GIT_SSL_CAINFO,
    /// NODE_EXTRA_CA_CERTS), verifies the real server, replaces the
    /// placeholder in request headers (inside Basic credentials too; the
    /// request line with :url) or sets header=HEADER (formats raw, bearer,
    /// token, basic, basic=USER), and masks the value in the answers. The
    /// placeholder sent anywhere else is refused. Other hosts stay
    /// end-to-end TLS (repeatable)
    #[arg(
        long = "secret-bind",
        value_name = "NAME=HOST[,HOST...][:header=HEADER[:FORMAT]][:url]"
    )]
    pub secret_bind: Vec<String>,
    /// Also trust the CA certificates in FILE (PEM) when connecting onward
    /// to the hosts of --secret-bind (Mozilla's roots are always trusted)
    #[arg(long = "secret-ca", value_name = "FILE")]
    pub secret_ca: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// The command to run in the sandbox, and its arguments (after `--`)
    #[arg(value_name = "CMD", trailing_var_arg = true)]
    pub command: Vec<String>,
}

/// The model proxy: how the agent's model calls leave the sandbox.
#[derive(Debug, Clone, Default, Args)]
pub struct ModelArgs {
    /// Forward the agent's model calls (Anthropic Messages, OpenAI Chat
    /// Completions) to this base URL, each with its own provider's key
    /// from $ANTHROPIC_API_KEY / $OPENAI_API_KEY (or --model-key-env /
    /// --model-key-file). https://api.anthropic.com serves only Anthropic
    /// calls and https://api.openai.com only OpenAI calls; any other host
    /// (a gateway) serves both. anthropic=URL or openai=URL names the
    /// provider; repeatable, at most one upstream per provider. A call
    /// with no upstream for its API gets an API-shaped 403
    #[arg(long, value_name = "[PROVIDER=]URL")]
    pub model_upstream: Vec<String>,
    /// Take the API key (for both APIs) from this variable of airlock's
    /// environment
    #[arg(
        long,
        value_name = "NAME",
        requires = "model_upstream",
        conflicts_with = "model_key_file"
    )]
    pub model_key_env: Option<String>,
    /// Take the API key from this file: one line (the key, for both APIs),
    /// or ANTHROPIC_API_KEY=... / OPENAI_API_KEY=... lines
    #[arg(long, value_name = "PATH", requires = "model_upstream")]
    pub model_key_file: Option<PathBuf>,
    /// How the Anthropic credential goes upstream: key (the API key as
    /// x-api-key) or bearer (an OAuth token, a Claude subscription's, as
    /// Authorization: Bearer, read from $CLAUDE_CODE_OAUTH_TOKEN or
    /// --model-oauth-token-env; it replaces the Anthropic API key and,
    /// like it, never enters the sandbox) [default: key]
    #[arg(
        long,
        value_name = "KIND",
        value_parser = ["key", "bearer"],
        requires = "model_upstream"
    )]
    pub model_auth: Option<String>,
    /// Read the Anthropic OAuth token from this variable of airlock's
    /// environment (implies --model-auth bearer) [default:
    /// CLAUDE_CODE_OAUTH_TOKEN]
    #[arg(long, value_name = "NAME", requires = "model_upstream")]
    pub model_oauth_token_env: Option<String>,
    /// Send this OpenAI-Organization with OpenAI calls (the guest's own is
    /// always dropped)
    #[arg(long, value_name = "ID", requires = "model_upstream")]
    pub model_openai_organization: Option<String>,
    /// Send this OpenAI-Project with OpenAI calls (the guest's own is
    /// always dropped)
    #[arg(long, value_name = "ID", requires = "model_upstream")]
    pub model_openai_project: Option<String>,
    /// Also trust the CA certificates in this PEM file for an https://
    /// --model-upstream, besides the built-in (Mozilla) roots: for a
    /// TLS-inspecting corporate proxy or a gateway with an internal CA.
    /// The file is read once before the VM starts (its path and sha256 go
    /// in the audit log); an unreadable file, one without a certificate or
    /// malformed PEM is refused, and so is an http:// upstream (nothing to
    /// verify)
    #[arg(long, value_name = "PATH", requires = "model_upstream")]
    pub model_ca: Option<PathBuf>,
    /// The model policy, a JSON file: {"allowed_models": [...],
    /// "max_requests": N, "max_tokens_per_run": N, "max_request_bytes": N}
    /// (every field optional; the flags below override it)
    #[arg(long, value_name = "FILE")]
    pub model_policy: Option<PathBuf>,
    /// Allow only this model (repeatable) [default: any]
    #[arg(long = "model-allow", value_name = "MODEL")]
    pub model_allow: Vec<String>,
    /// Refuse model calls (429) after this many in the run (count_tokens
    /// and model lists count too) [default: 2000]
    #[arg(long, value_name = "N")]
    pub model_max_requests: Option<u64>,
    /// Refuse model calls (429) once the run has used this many tokens
    /// (input + output, from the responses' usage; count_tokens and model
    /// lists spend none and are not refused); each call's output cap
    /// (max_tokens / max_completion_tokens / max_output_tokens, per choice
    /// of OpenAI's n) is
    /// lowered to the tokens left, and held against the budget while the
    /// call is in flight, so concurrent calls cannot together exceed it
    /// [default: no limit]
    #[arg(long, value_name = "N")]
    pub model_max_tokens: Option<u64>,
    /// Refuse (413) a model request whose body is larger; the in-guest
    /// endpoint holds the same limit [default and most: 32 MiB]
    #[arg(long, value_name = "BYTES")]
    pub model_max_request_bytes: Option<u64>,
    /// Debugging and tests: after the VM stops, leave a copy of its RAM at
    /// PATH (a new file)
    #[arg(long, value_name = "PATH", hide = true)]
    pub debug_dump_guest_memory: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub image: ImageArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::Exit;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn run_args(argv: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(argv).expect("parses");
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        *args
    }

    #[test]
    fn run_defaults() {
        let args = run_args(&["airlock", "run"]);
        assert_eq!(args.engine, EngineChoice::Auto);
        assert_eq!(args.mem, 256);
        assert_eq!(args.cpus, 1);
        assert_eq!(args.timeout, None);
        assert!(args.console_log.is_none());
        assert!(!args.keep_console);
        assert!(args.env.is_empty());
        assert_eq!(args.max_output_bytes, 1 << 30);
        assert!(args.cmdline.is_none());
        assert!(args.command.is_empty());
        assert!(args.audit.is_none());
        assert!(args.audit_key.is_none());
        assert_eq!(args.audit_max_guest_events, 10_000);
        assert_eq!(args.audit_max_guest_bytes, 16 << 20);
    }

    #[test]
    fn audit_subcommands() {
        let cli = Cli::try_parse_from(["airlock", "audit", "verify", "f.jsonl", "--key", "k.pub"])
            .expect("parses");
        let Command::Audit(AuditArgs {
            command: AuditCommand::Verify(v),
        }) = cli.command
        else {
            panic!("not verify")
        };
        assert_eq!(v.file, PathBuf::from("f.jsonl"));
        assert_eq!(v.key, Some(PathBuf::from("k.pub")));
        let cli = Cli::try_parse_from(["airlock", "audit", "show", "--json", "f"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Audit(AuditArgs {
                command: AuditCommand::Show(ShowArgs { json: true, .. })
            })
        ));
        let err = Cli::try_parse_from(["airlock", "audit", "verify"]).expect_err("no file");
        assert_eq!(err.exit_code(), 2);
        assert_eq!(Exit::NotIntact.code(), 1);
    }

    #[test]
    fn run_takes_the_command_after_the_options() {
        let args = run_args(&[
            "airlock",
            "run",
            "--env",
            "A=1",
            "-e",
            "B=2",
            "--timeout",
            "5",
            "--",
            "sh",
            "-c",
            "exit 7",
            "--timeout",
        ]);
        assert_eq!(args.env, ["A=1", "B=2"]);
        assert_eq!(args.timeout, Some(5));
        assert_eq!(args.command, ["sh", "-c", "exit 7", "--timeout"]);
        // Without `--`, options stop at the command's name.
        let args = run_args(&["airlock", "run", "--mem", "128", "ls", "-l", "--mem"]);
        assert_eq!(args.mem, 128);
        assert_eq!(args.command, ["ls", "-l", "--mem"]);
    }

    #[test]
    fn unknown_options_are_still_usage_errors() {
        let err = Cli::try_parse_from(["airlock", "run", "--bogus-flag"]).expect_err("bogus");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn console_log_conflicts_with_keep_console() {
        let err = Cli::try_parse_from(["airlock", "run", "--console-log", "x", "--keep-console"])
            .expect_err("conflict");
        assert_eq!(err.exit_code(), 2);
    }

    /// Every code airlock itself exits with is explained in `--help`.
    #[test]
    fn the_top_help_lists_every_exit_code() {
        for exit in [
            Exit::Success,
            Exit::HostUnfit,
            Exit::NotIntact,
            Exit::Usage,
            Exit::SandboxFailed,
            Exit::ProtocolError,
            Exit::Timeout,
            Exit::OutputLimit,
            Exit::OutOfMemory,
            Exit::SpawnFailed,
            Exit::Interrupted(libc::SIGINT),
            Exit::Interrupted(libc::SIGTERM),
            Exit::Interrupted(libc::SIGHUP),
            Exit::Interrupted(libc::SIGPIPE),
        ] {
            let code = exit.code().to_string();
            assert!(
                TOP_EXIT_CODES.contains(&format!("  {code:<4} "))
                    || TOP_EXIT_CODES.contains(&format!(" {code} ")),
                "{exit:?} ({code}) is not in airlock --help"
            );
            assert!(
                RUN_EXIT_CODES.contains(&code)
                    || matches!(exit, Exit::HostUnfit | Exit::NotIntact | Exit::Success),
                "{exit:?} ({code}) is not in airlock run --help"
            );
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Exit::Success.code(), 0);
        assert_eq!(Exit::Usage.code(), 2);
        assert_eq!(Exit::SandboxFailed.code(), 120);
        assert_eq!(Exit::ProtocolError.code(), 121);
        assert_eq!(Exit::Timeout.code(), 124);
        assert_eq!(Exit::SpawnFailed.code(), 127);
        assert_eq!(Exit::Command(7).code(), 7);
        assert_eq!(Exit::Command(137).code(), 137);
        assert_eq!(Exit::Interrupted(libc::SIGPIPE).code(), 141);
        assert_eq!(Exit::Interrupted(libc::SIGINT).code(), 130);
        assert_eq!(Exit::Interrupted(libc::SIGTERM).code(), 143);
    }
}
