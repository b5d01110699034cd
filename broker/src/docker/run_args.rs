//! `docker run`'s command line as an agent platform writes it (NanoClaw
//! v2's shape, issue 18), parsed into what an Airlock sandbox is to be:
//! [`DockerRun`]. Flags that would weaken the sandbox (`--privileged`,
//! `--cap-add`, `--device`, a host network or namespace, the docker socket
//! mounted in, published ports) are refused with the reason; any other
//! flag this front end does not know is refused too: never a silent
//! ignore. Pure: no files read, nothing started.

use std::fmt;

/// A refusal: the message after `airlock docker: `; exit 125.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed `docker run`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DockerRun {
    pub rm: bool,
    pub name: Option<String>,
    /// `--label KEY=VALUE` (a bare KEY has an empty value), in order.
    pub labels: Vec<(String, String)>,
    /// `-e NAME=VALUE`, or `-e NAME` (taken from the caller's environment
    /// when set there, as docker does), in order.
    pub env: Vec<EnvArg>,
    pub env_files: Vec<String>,
    /// `-v HOST:GUEST[:ro|:rw]`, as given (checked by the live mounts).
    pub volumes: Vec<String>,
    /// `--mount type=bind,...`, as given.
    pub mounts: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub entrypoint: Option<String>,
    /// `--add-host NAME:host-gateway`: the names (their ports reach the
    /// host through the sandbox's forwards).
    pub host_gateway_names: Vec<String>,
    pub interactive: bool,
    pub detach: bool,
    pub memory_mib: Option<u32>,
    pub cpus: Option<u8>,
    pub image: String,
    pub command: Vec<String>,
}

/// One `-e`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvArg {
    Set(String, String),
    Inherit(String),
}

/// Flags refused outright, with why.
const REFUSED: &[(&str, &str)] = &[
    (
        "--privileged",
        "a privileged container would weaken the sandbox",
    ),
    ("--cap-add", "added capabilities would weaken the sandbox"),
    ("--device", "host devices are not passed into a sandbox"),
    ("--pid", "the sandbox has its own process namespace"),
    ("--ipc", "the sandbox has its own IPC namespace"),
    ("--uts", "the sandbox has its own host name"),
    ("--userns", "the sandbox has its own user namespace"),
    (
        "--security-opt",
        "the sandbox's security options are airlock's",
    ),
    (
        "--volumes-from",
        "volumes of other containers are not shared",
    ),
    (
        "-p",
        "a sandbox has no network device: it publishes no ports",
    ),
    (
        "--publish",
        "a sandbox has no network device: it publishes no ports",
    ),
    (
        "-P",
        "a sandbox has no network device: it publishes no ports",
    ),
    (
        "--publish-all",
        "a sandbox has no network device: it publishes no ports",
    ),
    ("-t", "a sandbox has no terminal (use -i for stdin)"),
    ("--tty", "a sandbox has no terminal (use -i for stdin)"),
];

/// Flags that take a value.
const WITH_VALUE: &[&str] = &[
    "--name",
    "--label",
    "-l",
    "-e",
    "--env",
    "--env-file",
    "-v",
    "--volume",
    "--mount",
    "-u",
    "--user",
    "-w",
    "--workdir",
    "--entrypoint",
    "--add-host",
    "-m",
    "--memory",
    "--cpus",
    "--network",
    "--net",
];

/// A decimal `N` or `N.F` (at most 6 fraction digits) in millionths.
fn millionths(text: &str) -> Option<u128> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if int.is_empty() && frac.is_empty()
        || frac.len() > 6
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
        || int.len() > 20
    {
        return None;
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac: u128 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    Some(int * 1_000_000 + frac)
}

/// Parses a docker size (`512m`, `1g`, `1073741824`, `1.5g`) into MiB,
/// rounded up.
pub fn parse_memory(text: &str) -> Option<u32> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, unit): (&str, u128) = match t.chars().last()? {
        'k' => (&t[..t.len() - 1], 1 << 10),
        'm' => (&t[..t.len() - 1], 1 << 20),
        'g' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let bytes_millionths = millionths(num)?.checked_mul(unit)?;
    let mib = bytes_millionths.div_ceil(1_000_000u128 << 20);
    u32::try_from(mib).ok().filter(|m| *m >= 1)
}

/// Parses `--cpus` (`1`, `1.5`, `0.25`) into whole vCPUs, rounded up.
pub fn parse_cpus(text: &str) -> Option<u8> {
    let m = millionths(text.trim())?;
    u8::try_from(m.div_ceil(1_000_000)).ok().filter(|n| *n >= 1)
}

fn refused(flag: &str, why: &str) -> Refused {
    Refused(format!("run {flag} is refused: {why}"))
}

/// Parses the arguments after `run`.
pub fn parse(args: &[String]) -> Result<DockerRun, Refused> {
    let mut run = DockerRun::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if arg == "--" {
            i += 1;
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            break;
        }
        // --flag=value, or a short flag with its value attached (-eX=1).
        let (flag, inline): (String, Option<String>) =
            if let Some((f, v)) = arg.split_once('=').filter(|(f, _)| f.starts_with("--")) {
                (f.to_owned(), Some(v.to_owned()))
            } else if !arg.starts_with("--") && arg.len() > 2 {
                let first = &arg[..2];
                if WITH_VALUE.contains(&first) {
                    (first.to_owned(), Some(arg[2..].to_owned()))
                } else {
                    // A cluster of short booleans: -it, -di, --rm is long.
                    for c in arg[1..].chars() {
                        match c {
                            'i' => run.interactive = true,
                            'd' => run.detach = true,
                            't' => {
                                return Err(refused(
                                    "-t",
                                    "a sandbox has no terminal (use -i for stdin)",
                                ))
                            }
                            _ => {
                                return Err(Refused(format!(
                                    "run flag -{c} (in {arg}) is not supported"
                                )))
                            }
                        }
                    }
                    i += 1;
                    continue;
                }
            } else {
                (arg.clone(), None)
            };
        if let Some((_, why)) = REFUSED.iter().find(|(f, _)| *f == flag) {
            return Err(refused(&flag, why));
        }
        let value = if WITH_VALUE.contains(&flag.as_str()) {
            match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .ok_or_else(|| Refused(format!("run {flag} needs a value")))?
                }
            }
        } else {
            if inline.is_some() && flag != "--rm" && flag != "--interactive" && flag != "--detach" {
                return Err(Refused(format!("run flag {flag} is not supported")));
            }
            String::new()
        };
        match flag.as_str() {
            "--rm" => run.rm = true,
            "-i" | "--interactive" => run.interactive = true,
            "-d" | "--detach" => run.detach = true,
            "--name" => run.name = Some(value),
            "--label" | "-l" => {
                let (k, v) = value.split_once('=').unwrap_or((&value, ""));
                run.labels.push((k.to_owned(), v.to_owned()));
            }
            "-e" | "--env" => run.env.push(match value.split_once('=') {
                Some((k, v)) => EnvArg::Set(k.to_owned(), v.to_owned()),
                None => EnvArg::Inherit(value),
            }),
            "--env-file" => run.env_files.push(value),
            "-v" | "--volume" => {
                let source = value.split(':').next().unwrap_or("");
                if source.ends_with("docker.sock") || source.ends_with("podman.sock") {
                    return Err(refused(
                        "-v",
                        "the container engine's socket would let the agent out of its sandbox",
                    ));
                }
                run.volumes.push(value);
            }
            "--mount" => {
                if value.contains("docker.sock") || value.contains("podman.sock") {
                    return Err(refused(
                        "--mount",
                        "the container engine's socket would let the agent out of its sandbox",
                    ));
                }
                run.mounts.push(value);
            }
            "-u" | "--user" => run.user = Some(value),
            "-w" | "--workdir" => run.workdir = Some(value),
            "--entrypoint" => run.entrypoint = Some(value),
            "--add-host" => {
                match value.split_once(':') {
                    Some((name, "host-gateway")) if !name.is_empty() => {
                        run.host_gateway_names.push(name.to_owned());
                    }
                    _ => return Err(refused(
                        "--add-host",
                        "a sandbox reaches only the host (NAME:host-gateway), through its forwards",
                    )),
                }
            }
            "-m" | "--memory" => {
                run.memory_mib = Some(
                    parse_memory(&value)
                        .ok_or_else(|| Refused(format!("run --memory {value:?} is not a size")))?,
                );
            }
            "--cpus" => {
                run.cpus = Some(
                    parse_cpus(&value)
                        .ok_or_else(|| Refused(format!("run --cpus {value:?} is not 0.01-255")))?,
                );
            }
            "--network" | "--net" => {
                if value != "none" {
                    return Err(refused(
                        &format!("--network {value}"),
                        "a sandbox has no network device; it reaches out only through its \
                         egress proxy, under airlock's policy (--network none is accepted)",
                    ));
                }
            }
            _ => return Err(Refused(format!("run flag {flag} is not supported"))),
        }
        i += 1;
    }
    let Some(image) = args.get(i) else {
        return Err(Refused("run needs an image".into()));
    };
    run.image = image.clone();
    run.command = args[i + 1..].to_vec();
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn nanoclaws_run_parses() {
        let args = argv(&[
            "--rm",
            "--name",
            "nanoclaw-v2-main-1733300000000",
            "--label",
            "nanoclaw-install=abc",
            "-e",
            "TZ=Europe/Berlin",
            "-e",
            "HTTPS_PROXY=http://x:tok@host.docker.internal:10255",
            "-e",
            "NODE_USE_ENV_PROXY=1",
            "-v",
            "/tmp/gw-ca.pem:/tmp/gw-ca.pem:ro",
            "--add-host=host.docker.internal:host-gateway",
            "--user",
            "1000:1000",
            "-e",
            "HOME=/home/node",
            "-v",
            "/s/sess:/workspace",
            "-v",
            "/s/group:/workspace/agent",
            "-v",
            "/s/group/container.json:/workspace/agent/container.json:ro",
            "--entrypoint",
            "bash",
            "nanoclaw-agent:latest",
            "-c",
            "exec bun run /app/src/index.ts",
        ]);
        let run = parse(&args).expect("parse");
        assert!(run.rm && !run.interactive && !run.detach);
        assert_eq!(run.name.as_deref(), Some("nanoclaw-v2-main-1733300000000"));
        assert_eq!(run.labels, [("nanoclaw-install".into(), "abc".into())]);
        assert_eq!(run.env.len(), 4);
        assert_eq!(
            run.env[1],
            EnvArg::Set(
                "HTTPS_PROXY".into(),
                "http://x:tok@host.docker.internal:10255".into()
            )
        );
        assert_eq!(run.volumes.len(), 4);
        assert_eq!(run.host_gateway_names, ["host.docker.internal"]);
        assert_eq!(run.user.as_deref(), Some("1000:1000"));
        assert_eq!(run.entrypoint.as_deref(), Some("bash"));
        assert_eq!(run.image, "nanoclaw-agent:latest");
        assert_eq!(run.command, ["-c", "exec bun run /app/src/index.ts"]);
        // The probe: echo '{}' | docker run -i --rm --entrypoint /bin/echo IMAGE "Container OK"
        let run = parse(&argv(&[
            "-i",
            "--rm",
            "--entrypoint",
            "/bin/echo",
            "img",
            "Container OK",
        ]))
        .expect("probe");
        assert!(run.interactive && run.rm);
        assert_eq!(run.command, ["Container OK"]);
    }

    #[test]
    fn forms_of_flags() {
        let run = parse(&argv(&[
            "-di",
            "--name=n",
            "-eA=1",
            "-e",
            "B",
            "-m",
            "512m",
            "--cpus",
            "1.5",
            "--network",
            "none",
            "-w",
            "/w",
            "--",
            "img",
            "--not-a-flag",
        ]))
        .expect("parse");
        assert!(run.detach && run.interactive);
        assert_eq!(run.name.as_deref(), Some("n"));
        assert_eq!(
            run.env,
            [
                EnvArg::Set("A".into(), "1".into()),
                EnvArg::Inherit("B".into())
            ]
        );
        assert_eq!((run.memory_mib, run.cpus), (Some(512), Some(2)));
        assert_eq!(run.workdir.as_deref(), Some("/w"));
        assert_eq!(run.command, ["--not-a-flag"]);
        assert_eq!(parse_memory("1g"), Some(1024));
        assert_eq!(parse_memory("1073741824"), Some(1024));
        assert_eq!(parse_memory("1.5G"), Some(1536));
        assert_eq!(parse_memory("100k"), Some(1));
        for bad in ["", "x", "-1m", "0", "1t", ".", "1.2.3m"] {
            assert_eq!(parse_memory(bad), None, "{bad}");
        }
        assert_eq!(parse_cpus("0.25"), Some(1));
        assert_eq!(parse_cpus("2"), Some(2));
        for bad in ["0", "256", "-1", "x", "1e3"] {
            assert_eq!(parse_cpus(bad), None, "{bad}");
        }
    }

    #[test]
    fn weakening_and_unknown_flags_are_refused_with_the_reason() {
        for (args, needle) in [
            (&["--privileged", "img"][..], "privileged"),
            (&["--cap-add", "SYS_ADMIN", "img"], "capabilities"),
            (&["--cap-add=ALL", "img"], "capabilities"),
            (&["--device", "/dev/kvm", "img"], "devices"),
            (&["--network", "host", "img"], "no network device"),
            (&["--net=bridge", "img"], "no network device"),
            (&["--pid=host", "img"], "process namespace"),
            (
                &["-v", "/var/run/docker.sock:/var/run/docker.sock", "img"],
                "socket",
            ),
            (
                &[
                    "--mount",
                    "type=bind,src=/run/podman/podman.sock,dst=/s",
                    "img",
                ],
                "socket",
            ),
            (&["-p", "8080:80", "img"], "publishes no ports"),
            (&["-it", "img"], "terminal"),
            (&["--add-host", "db:10.0.0.5", "img"], "host-gateway"),
            (
                &["--security-opt", "seccomp=unconfined", "img"],
                "security options",
            ),
            (&["--restart", "always", "img"], "not supported"),
            (&["-x", "img"], "not supported"),
            (&["--rm"], "needs an image"),
            (&["--name"], "needs a value"),
            (&["--memory", "lots", "img"], "not a size"),
            (&["--cpus", "0", "img"], "0.01-255"),
        ] {
            let e = parse(&argv(args)).expect_err(&format!("{args:?}"));
            assert!(e.0.contains(needle), "{args:?}: {e}");
        }
    }
}
