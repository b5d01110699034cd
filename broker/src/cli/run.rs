//! `airlock run`: the command line made into a [`RunConfig`] (every
//! check on the user's input that needs no file or VM), then
//! [`run::run`].

use std::time::Duration;

use airlock_protocol::RunSpec;
use serde_json::Value;

use crate::audit::Limits;
use crate::cli::{ModelArgs, RunArgs};
use crate::door::session::EncodedSpec;
use crate::exit::Exit;
use crate::paths::ImagePaths;
use crate::run::{
    self, AuditConfig, ConsoleTarget, Error, FilesConfig, RunConfig, CPUS_RANGE,
    DEFAULT_TIMEOUT_SECS, MEM_MIB_RANGE,
};

/// The command's working directory in the guest, by default.
const GUEST_CWD: &str = "/";
/// ... and with `--workspace` or `--out`: its copy of the workspace.
const WORKSPACE_CWD: &str = "/workspace";

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
        let (command, mut env, cwd, user, image_applied) =
            shape_command(&args, stored_image.as_ref())?;
        let secrets = secrets(&args)?;
        if let Some(s) = &secrets {
            // The placeholders and the bundle's variables, over the
            // image's own, unless the user's -e sets the same names.
            let named =
                |e: &String, name: &str| e.split_once('=').map_or(e.as_str(), |(n, _)| n) == name;
            for (name, value) in s.guest_env() {
                if !args.env.iter().any(|e| named(e, &name)) {
                    env.retain(|e| !named(e, &name));
                    env.push(format!("{name}={value}"));
                }
            }
        }
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
        let mounts = mounts(&args, secrets.as_deref())?;
        spec.set_mounts(mounts.iter().map(crate::share::MountSpec::entry).collect())
            .map_err(Error::Spec)?;
        let mut egress = egress(&args)?;
        egress.secrets = secrets;
        let cmdline = args.cmdline.unwrap_or_default();
        if cmdline.contains('\0') {
            return Err(Error::NulInCmdline);
        }
        Ok(RunConfig {
            engine: args.engine,
            image: ImagePaths::from_env(
                args.image.kernel,
                args.image.initrd,
                args.image.image_root,
            ),
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
                deny: crate::door::files::Deny::new(&args.exclude),
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
            snapshots: !args.no_snapshot,
            sandbox: None,
            mounts,
            egress,
        })
    }
}

/// `--net-*` and `--host-port`, checked.
fn egress(args: &RunArgs) -> Result<crate::egress::Settings, Error> {
    use crate::egress::policy::{self, Action};
    let mut rules = Vec::new();
    for r in &args.net_allow {
        rules.push(policy::parse_rule(r, Action::Allow, "--net-allow").map_err(Error::Egress)?);
    }
    for r in &args.net_deny {
        rules.push(policy::parse_rule(r, Action::Deny, "--net-deny").map_err(Error::Egress)?);
    }
    if let Some(file) = &args.net_policy {
        let text = read_policy(file)
            .map_err(|e| Error::Egress(format!("--net-policy {}: {e}", file.display())))?;
        rules.extend(
            policy::parse_policy_file(&text, &file.display().to_string()).map_err(Error::Egress)?,
        );
    }
    if rules.len() > policy::MAX_RULES {
        return Err(Error::Egress(format!(
            "at most {} egress rules",
            policy::MAX_RULES
        )));
    }
    let mut host_ports: Vec<(u16, u16)> = Vec::new();
    for h in &args.host_port {
        let (port, host) = policy::parse_host_port(h).map_err(Error::Egress)?;
        if crate::egress::GUEST_PORTS.contains(&port) {
            return Err(Error::Egress(format!(
                "--host-port {h}: port {port} is the guest's own (model endpoint 8088, \
                 proxy 3128, SOCKS 1080): forward another"
            )));
        }
        if host_ports.iter().any(|(p, _)| *p == port) {
            return Err(Error::Egress(format!("--host-port {port} is given twice")));
        }
        host_ports.push((port, host));
    }
    if host_ports.len() > policy::MAX_HOST_PORTS {
        return Err(Error::Egress(format!(
            "at most {} --host-port forwards",
            policy::MAX_HOST_PORTS
        )));
    }
    if args.net_max_tunnels == 0 || args.net_connect_timeout == 0 || args.net_idle_timeout == 0 {
        return Err(Error::Egress(
            "--net-max-tunnels, --net-connect-timeout and --net-idle-timeout must be at least 1"
                .into(),
        ));
    }
    Ok(crate::egress::Settings {
        policy: crate::egress::Policy { rules, host_ports },
        max_tunnels: args.net_max_tunnels,
        max_bytes: args.net_max_bytes,
        connect_timeout: Duration::from_secs(args.net_connect_timeout),
        idle_timeout: Duration::from_secs(args.net_idle_timeout),
        secrets: None,
    })
}

/// A `--net-policy` file: UTF-8, at most 1 MiB.
fn read_policy(file: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(file)?
        .take(1 << 20)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// `--secret`, `--secret-env`, `--secret-bind`, `--secret-ca`: the
/// values fetched, the placeholders and the sandbox's CA made.
fn secrets(args: &RunArgs) -> Result<Option<std::sync::Arc<crate::secrets::Secrets>>, Error> {
    let flags = crate::secrets::config::parse(
        &args.secrets,
        &args.secret_env,
        &args.secret_bind,
        args.secret_ca.as_deref(),
    )
    .map_err(Error::Egress)?;
    if flags.secrets.is_empty() {
        if !args.secret_env.is_empty() || !args.secret_bind.is_empty() {
            return Err(Error::Egress(
                "--secret-env and --secret-bind need --secret".into(),
            ));
        }
        return Ok(None);
    }
    if !flags.binds.is_empty() && args.no_container {
        return Err(Error::Egress(
            "--secret-bind installs the sandbox's CA in the agent's container: not with \
             --no-container"
                .into(),
        ));
    }
    let secrets = crate::secrets::Secrets::new(flags, &|name| std::env::var(name).ok())
        .map_err(Error::Egress)?;
    Ok(Some(std::sync::Arc::new(secrets)))
}

/// `--mount` and `-v`, in that order (the guest numbers them so), and the
/// CA bundle of `--secret-bind` last, checked.
fn mounts(
    args: &RunArgs,
    secrets: Option<&crate::secrets::Secrets>,
) -> Result<Vec<crate::share::MountSpec>, Error> {
    use crate::share::spec;
    let mut all = Vec::new();
    for m in &args.mounts {
        all.push(spec::parse_mount(m).map_err(Error::Mount)?);
    }
    for v in &args.volumes {
        all.push(spec::parse_volume(v).map_err(Error::Mount)?);
    }
    if let Some(file) = secrets.and_then(crate::secrets::Secrets::bundle_file) {
        all.push(crate::secrets::bundle_mount(&file).map_err(Error::Mount)?);
    }
    spec::check_all(&all).map_err(Error::Mount)?;
    for m in &mut all {
        m.max_write_bytes = args.mount_max_write;
        m.max_files = args.mount_max_files;
    }
    if !args.exclude.is_empty() && args.workspace.is_none() && all.is_empty() {
        return Err(Error::Mount(
            "--exclude applies to --workspace and live mounts: give one of them".into(),
        ));
    }
    if !all.is_empty() && args.no_container {
        return Err(Error::Mount(
            "live mounts appear in the agent's container: not with --no-container".into(),
        ));
    }
    if let Some(m) = all.iter().find(|m| {
        (args.workspace.is_some() || args.out.is_some())
            && (m.target == "/workspace" || "/workspace".starts_with(&format!("{}/", m.target)))
    }) {
        return Err(Error::Mount(format!(
            "{} would hide the copied-in /workspace of --workspace/--out: mount it elsewhere, \
             or share the folder live instead of copying it",
            m.target
        )));
    }
    Ok(all)
}

/// The model proxy's settings; the keys come from airlock's environment
/// (or `--model-key-file`), only when `--model-upstream` is given.
fn model_settings(args: &ModelArgs) -> Result<crate::model::Settings, Error> {
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
    finish(RunConfig::try_from(args).and_then(run::run))
}

/// `airlock create`'s supervisor: the run of a live sandbox, whose
/// command keeps it up while execs come and go.
pub fn main_sandbox(args: RunArgs, mode: crate::sandbox::server::Mode) -> Exit {
    finish(RunConfig::try_from(args).and_then(|mut config| {
        config.sandbox = Some(mode);
        run::run(config)
    }))
}

/// The exit code of a run, or of the error that stopped it (said on stderr).
fn finish(ran: Result<Exit, Error>) -> Exit {
    match ran {
        Ok(exit) => exit,
        Err(e) => {
            eprintln!("airlock: error: {}", crate::text::report(&e));
            e.exit()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditLog;
    use crate::cli::ImageArgs;
    use crate::door::session::{self, Output};
    use crate::engine::EngineChoice;
    use crate::run::{boot_cmdline, command_user, model_max_body_word};
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
            mounts: Vec::new(),
            volumes: Vec::new(),
            mount_max_write: crate::share::spec::DEFAULT_MAX_WRITE_BYTES,
            mount_max_files: crate::share::spec::DEFAULT_MAX_FILES,
            out: None,
            max_out_bytes: 1 << 30,
            collect: Vec::new(),
            image_archive: None,
            entrypoint: None,
            user: None,
            workdir: None,
            nested: false,
            vm_root: false,
            no_snapshot: false,
            model: crate::cli::ModelArgs::default(),
            net_allow: Vec::new(),
            net_deny: Vec::new(),
            net_policy: None,
            host_port: Vec::new(),
            net_max_tunnels: crate::egress::DEFAULT_MAX_TUNNELS,
            net_max_bytes: crate::egress::DEFAULT_MAX_BYTES,
            net_connect_timeout: crate::egress::DEFAULT_CONNECT_TIMEOUT_S,
            net_idle_timeout: crate::egress::DEFAULT_IDLE_TIMEOUT_S,
            secrets: Vec::new(),
            secret_env: Vec::new(),
            secret_bind: Vec::new(),
            secret_ca: None,
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
    fn a_live_sandboxs_snapshot_holds_its_container_when_it_can() {
        use crate::run::prepare_words_of;
        let keeper = RunArgs {
            command: crate::sandbox::KEEPER.map(str::to_owned).to_vec(),
            ..args()
        };
        let config = RunConfig::try_from(keeper.clone()).expect("valid");
        assert_eq!(
            prepare_words_of(&config, true),
            [
                "airlock.prepare=1",
                "airlock.prepare_cwd=/",
                "airlock.prepare_user="
            ]
        );
        // Only a live sandbox, only its keeper, only with snapshots and a
        // container.
        assert!(prepare_words_of(&config, false).is_empty());
        let other = RunConfig::try_from(args()).expect("valid");
        assert!(prepare_words_of(&other, true).is_empty());
        let mut c = config.clone();
        c.snapshots = false;
        assert!(prepare_words_of(&c, true).is_empty());
        let mut c = config.clone();
        c.container = false;
        assert!(prepare_words_of(&c, true).is_empty());
        let mut c = config.clone();
        c.archive = Some("/a.tar".into());
        assert!(prepare_words_of(&c, true).is_empty());
        // Its directory and user go along; one that could split the word
        // means no container in the snapshot.
        let mut c = config.clone();
        c.run_spec.cwd = "/app".into();
        c.user = Some("node".into());
        assert_eq!(
            prepare_words_of(&c, true),
            [
                "airlock.prepare=1",
                "airlock.prepare_cwd=/app",
                "airlock.prepare_user=node"
            ]
        );
        for cwd in [
            "/my app".to_owned(),
            "/a\"b".into(),
            format!("/{}", "a".repeat(300)),
        ] {
            c.run_spec.cwd = cwd;
            assert!(prepare_words_of(&c, true).is_empty());
        }
        c.run_spec.cwd = "/app".into();
        for user in ["-x", "a:b:c", "a b"] {
            c.user = Some(user.into());
            assert!(prepare_words_of(&c, true).is_empty(), "{user}");
        }
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
}
