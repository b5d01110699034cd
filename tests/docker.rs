//! The docker front end (`airlock docker`, the binary invoked as `docker`):
//! NanoClaw v2's side played exactly (tests/fixtures/nanoclaw/host.py) with
//! a fixture agent image of our own, two sessions at once; every refused
//! flag; and the commands whose output format matters against the same
//! commands under real `podman` on this host. Each test has its own
//! sandbox directory, image store and policy file.

use airlock_e2e::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The test's own `docker`: a symlink to airlock, and the environment that
/// keeps its sandboxes, images and policy apart.
struct Docker {
    dir: PathBuf,
    link: String,
    tmp: TempDir,
}

impl Docker {
    fn new(test: &str, policy: &str) -> Docker {
        let dir = scratch(test);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).expect("mkdir");
        let link = dir.join("bin/docker");
        std::os::unix::fs::symlink(root().join(bin("airlock")), &link).expect("symlink");
        let image_root = root().join(build_file("rootfs.img"));
        fs::write(
            dir.join("docker.toml"),
            format!(
                "engine = \"tcg\"\nimage_root = \"{}\"\nmem = 768\n{policy}",
                image_root.display()
            ),
        )
        .expect("policy");
        Docker {
            link: link.display().to_string(),
            dir,
            tmp: TempDir::new(test),
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "AIRLOCK_SANDBOX_DIR".into(),
                self.dir.join("sbx").display().to_string(),
            ),
            (
                "XDG_DATA_HOME".into(),
                self.dir.join("data").display().to_string(),
            ),
            (
                "AIRLOCK_DOCKER_CONFIG".into(),
                self.dir.join("docker.toml").display().to_string(),
            ),
            ("TMPDIR".into(), self.tmp.as_str().to_owned()),
        ]
    }

    /// `docker ARGS`.
    fn run(&self, args: &[&str], timeout_s: u32) -> Run {
        let mut argv = vec![self.link.as_str()];
        argv.extend_from_slice(args);
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        run_env(&argv, &env, timeout_s)
    }

    /// `docker ARGS` with `input` on stdin.
    fn run_stdin(&self, args: &[&str], input: &[u8]) -> Run {
        let mut argv = vec![self.link.as_str()];
        argv.extend_from_slice(args);
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        run_raw_with_stdin(&argv, &env, input, 300).into_run()
    }
}

/// The fixture agent image (a docker archive): bash and Python from the
/// guest image's Debian, uid 1000 `node` (tests/fixtures/agent_rootfs.py).
fn agent_image(dir: &Path, tag: &str) -> PathBuf {
    let extracted = dir.join("extracted");
    let _ = fs::remove_dir_all(&extracted);
    let ok = Command::new("fsck.erofs")
        .arg(format!("--extract={}", extracted.display()))
        .arg(root().join(build_file("rootfs.img")))
        .stdout(Stdio::null())
        .status()
        .expect("fsck.erofs (erofs-utils)");
    assert!(ok.success(), "fsck.erofs --extract failed");
    let rootfs = dir.join("agent-root");
    let ok = Command::new("python3")
        .arg(root().join("tests/fixtures/agent_rootfs.py"))
        .args([&extracted, &rootfs])
        .status()
        .expect("agent_rootfs.py");
    assert!(ok.success(), "agent_rootfs.py failed");
    let _ = fs::remove_dir_all(&extracted);
    let config = dir.join("agent-config.json");
    fs::write(
        &config,
        r#"{"Env": ["PATH=/usr/bin:/bin", "AGENT_IMAGE=fixture"], "Cmd": ["python3", "-c", "print('image cmd')"], "User": "node", "WorkingDir": "/workspace"}"#,
    )
    .expect("config");
    let archive = dir.join("agent.tar");
    let ok = Command::new("python3")
        .arg(root().join("tests/fixtures/image_archive.py"))
        .args([
            rootfs.as_os_str(),
            tag.as_ref(),
            archive.as_os_str(),
            config.as_os_str(),
        ])
        .status()
        .expect("image_archive.py");
    assert!(ok.success(), "image_archive.py failed");
    archive
}

/// A CA and a certificate it signed for `api.anthropic.com`: the credential
/// gateway's, `(ca.pem, cert.pem, key.pem)`.
fn gateway_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    test_pki_for(
        dir,
        &["api.anthropic.com"],
        ["gw-ca.pem", "gw.pem", "gw.key"],
    )
}

/// A child process killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// NanoClaw's port for its credential gateway.
const GATEWAY_PORT: &str = "10255";

#[test]
fn tcg_nanoclaw_v2_runs_unchanged_two_sessions_each_in_its_own_vm() {
    let d = Docker::new(
        "docker-nanoclaw",
        &format!("host_ports = [{GATEWAY_PORT}]\n"),
    );
    let archive = agent_image(&d.dir, "localhost/nanoclaw-agent:latest");
    d.run(&["load", "-i", archive.to_str().expect("utf-8")], 120)
        .expect_code(0)
        .expect_stdout_line("Loaded image: localhost/nanoclaw-agent:latest");
    // The model API, behind the platform's credential gateway: only the
    // gateway holds the key.
    let key = secret_key("docker");
    let script = d.dir.join("script.json");
    fs::write(&script, r#"{"turns": [{"text": "pong from the model"}]}"#).expect("script");
    let upstream = Upstream::start(&script, &d.dir, &["--key", &key]);
    let (ca, cert, cert_key) = gateway_pki(&d.dir);
    let token = "gw-token-0123";
    let gw_log = d.dir.join("gateway.jsonl");
    let mut gateway = Command::new("python3")
        .arg(root().join("tests/fixtures/nanoclaw/gateway.py"))
        .args(["--port", GATEWAY_PORT, "--token", token, "--key", &key])
        .args(["--upstream", &upstream.addr])
        .arg("--cert")
        .arg(&cert)
        .arg("--cert-key")
        .arg(&cert_key)
        .arg("--log")
        .arg(&gw_log)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the gateway");
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(gateway.stdout.take().expect("stdout")),
        &mut ready,
    )
    .expect("gateway ready");
    assert_eq!(ready.trim(), "ready", "the gateway did not start");
    let _gateway = Child(gateway);

    let nc_root = d.dir.join("nanoclaw");
    let root_s = nc_root.display().to_string();
    let ca_s = ca.display().to_string();
    let agent = root().join("tests/fixtures/nanoclaw/agent.py");
    let host_py = root().join("tests/fixtures/nanoclaw/host.py");
    let agent_s = agent.display().to_string();
    let host_s = host_py.display().to_string();
    let r = {
        let env = d.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        run_env(
            &[
                "python3",
                &host_s,
                "--docker",
                &d.link,
                "--image",
                "nanoclaw-agent:latest",
                "--root",
                &root_s,
                "--gateway-port",
                GATEWAY_PORT,
                "--token",
                token,
                "--ca",
                &ca_s,
                "--agent",
                &agent_s,
                "--sessions",
                "2",
                "--messages",
                "20",
            ],
            &env,
            1500,
        )
    };
    r.expect_code(0);
    let report: Value =
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("report: {e}\n{r}"));
    assert_eq!(report["info_exit"], 0, "docker info\n{r}");
    assert_eq!(report["image_inspect_exit"], 0, "docker image inspect\n{r}");
    let sessions = report["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 2);
    for s in sessions {
        let name = s["name"].as_str().expect("name");
        let why = serde_json::to_string_pretty(s).unwrap_or_default();
        assert!(s["error"].is_null(), "{why}");
        // 20 round trips, each answered by the model through the gateway.
        let answers = s["answers"].as_array().expect("answers");
        assert_eq!(answers.len(), 20, "{why}");
        for a in answers {
            assert_eq!(a["text"], "pong from the model", "{why}");
        }
        // Its own session directory, as uid 1000 with HOME=/home/node.
        assert_eq!(s["whoami"]["session"], s["marker"], "{why}");
        assert_eq!(s["whoami"]["uid"], 1000, "{why}");
        assert_eq!(s["whoami"]["home"], "/home/node", "{why}");
        // The heartbeat moves on.
        let beats: Vec<f64> = s["heartbeats"]
            .as_array()
            .expect("beats")
            .iter()
            .map(|b| b.as_f64().expect("mtime"))
            .collect();
        assert!(
            beats.len() >= 2 && beats[beats.len() - 1] > beats[0],
            "{why}"
        );
        // The other session's directories are nowhere in this VM; the
        // nested and single-file mounts are.
        let probe = s["probe"].as_object().expect("probe");
        for (path, seen) in probe {
            let mine = path.starts_with("/workspace")
                || path.starts_with("/app")
                || path.starts_with("/tmp/gw-ca");
            assert_eq!(seen.as_bool(), Some(mine), "{path}\n{why}");
        }
        // No key, and no host path, in the agent's environment.
        let env = serde_json::to_string(&s["env"]).expect("env");
        assert!(!env.contains(&key), "the key reached the guest: {env}");
        assert!(
            !env.contains(&root_s),
            "a host path reached the guest: {env}"
        );
        assert_eq!(
            s["env"]["HTTPS_PROXY"],
            format!("http://x:{token}@host.docker.internal:{GATEWAY_PORT}")
        );
        assert_eq!(s["env"]["https_proxy"], s["env"]["HTTPS_PROXY"], "{why}");
        // `docker ps --filter label=... --format {{.Names}}` while alive; not after stop.
        assert_eq!(s["ps_alive"][0], 0, "{why}");
        assert_eq!(s["ps_alive"][1], format!("{name}\n"), "{why}");
        assert_eq!(s["stop"][0], 0, "{why}");
        assert_eq!(s["stop"][1], format!("{name}\n"), "{why}");
        // The agent ended on SIGTERM (143) or SIGKILL (137), as under docker.
        let exit = s["run_exit"].as_i64().expect("run exit");
        assert!(exit == 143 || exit == 137, "{why}");
        assert_eq!(s["ps_after"], serde_json::json!([0, ""]), "{why}");
    }
    // Every model call went through the gateway, which saw only the
    // placeholder and put the key on; the model saw the key.
    let calls = lines(&gw_log);
    let through: Vec<&Value> = calls
        .iter()
        .filter(|c| c["path"] == "/v1/messages")
        .collect();
    assert_eq!(through.len(), 40, "{calls:?}");
    for c in &through {
        assert_eq!(c["status"], 200, "{c}");
        assert_ne!(c["client_key"], key.as_str(), "{c}");
    }
    assert!(calls.iter().all(|c| c["denied"].is_null()), "{calls:?}");
    let seen = upstream.requests();
    assert_eq!(
        seen.iter().filter(|q| q["path"] == "/v1/messages").count(),
        40
    );
    // Nothing left: no container, no sandbox, no VM.
    d.run(&["ps", "-a", "--format", "{{.Names}}"], 30)
        .expect_code(0);
    assert_eq!(d.run(&["ps", "-a", "-q"], 30).stdout, "");
    let left: Vec<_> = fs::read_dir(d.dir.join("sbx"))
        .map(|r| r.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "sandboxes left: {left:?}");
    assert_eq!(
        processes_mentioning(&d.dir.join("sbx").display().to_string()),
        ""
    );
}

/// Every flag that would weaken the sandbox, and anything unknown, is
/// refused with exit 125 and the reason; before any VM starts.
#[test]
fn every_refused_flag_exits_125_with_its_reason() {
    let d = Docker::new("docker-refused", "host_ports = [10255]\n");
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--privileged", "img"],
            "--privileged is refused: a privileged container",
        ),
        (
            &["run", "--cap-add", "SYS_ADMIN", "img"],
            "--cap-add is refused",
        ),
        (
            &["run", "--device", "/dev/kvm", "img"],
            "--device is refused: host devices",
        ),
        (
            &["run", "--network", "host", "img"],
            "--network host is refused: a sandbox has no network device",
        ),
        (
            &["run", "--net=bridge", "img"],
            "--network bridge is refused",
        ),
        (&["run", "--pid", "host", "img"], "--pid is refused"),
        (&["run", "--ipc=host", "img"], "--ipc is refused"),
        (&["run", "--uts", "host", "img"], "--uts is refused"),
        (&["run", "--userns", "host", "img"], "--userns is refused"),
        (
            &["run", "--security-opt", "seccomp=unconfined", "img"],
            "--security-opt is refused",
        ),
        (
            &["run", "--volumes-from", "x", "img"],
            "--volumes-from is refused",
        ),
        (
            &["run", "-p", "8080:80", "img"],
            "-p is refused: a sandbox has no network device",
        ),
        (&["run", "--publish", "80", "img"], "--publish is refused"),
        (&["run", "-P", "img"], "-P is refused"),
        (
            &["run", "-it", "img"],
            "-t is refused: a sandbox has no terminal",
        ),
        (&["run", "--tty", "img"], "--tty is refused"),
        (
            &[
                "run",
                "-v",
                "/var/run/docker.sock:/var/run/docker.sock",
                "img",
            ],
            "-v is refused: the container engine's socket",
        ),
        (
            &[
                "run",
                "--mount",
                "type=bind,src=/run/podman/podman.sock,dst=/s",
                "img",
            ],
            "--mount is refused",
        ),
        (
            &["run", "--add-host", "db:10.0.0.1", "img"],
            "--add-host is refused",
        ),
        (
            &["run", "--add-host", "db.local:host-gateway", "img"],
            "--add-host db.local:host-gateway is refused",
        ),
        (
            &["run", "--restart", "always", "img"],
            "run flag --restart is not supported",
        ),
        (
            &[
                "run",
                "-e",
                "HTTPS_PROXY=http://x@host.docker.internal:9999",
                "img",
            ],
            "host port 9999",
        ),
        (
            &["run", "nosuchimage:latest"],
            "Unable to find image 'nosuchimage:latest' locally",
        ),
        (
            &["exec", "-t", "x", "sh"],
            "exec -t is refused: a sandbox has no terminal",
        ),
        (
            &["kill", "-s", "HUP", "x"],
            "kill --signal HUP is not supported",
        ),
        (
            &["ps", "--filter", "ancestor=img"],
            "ps --filter ancestor=img is not supported",
        ),
        (
            &["ps", "--format", "{{range .}}{{end}}"],
            "--format: {{range .}} is not supported",
        ),
        (&["network", "create", "n"], "network is not supported"),
        (&["compose", "up"], "compose is not supported"),
        (
            &["--host", "tcp://1.2.3.4:2375", "ps"],
            "the global option --host is not supported",
        ),
        (&["container", "prune"], "container prune is not supported"),
        (&["image", "pull", "x"], "image pull is not supported"),
        (&["pull", "x"], "pull is not supported"),
        (
            &["logs", "--since", "1m", "x"],
            "logs --timestamps/--since/--until is not supported",
        ),
        (&["build", "."], "build needs -t NAME[:TAG]"),
    ];
    for (args, says) in cases {
        let r = d.run(args, 30);
        assert_eq!(r.code, Some(125), "{args:?}\n{r}");
        r.expect_stderr("airlock docker: ");
        assert!(
            r.stderr.contains(says),
            "{args:?}: stderr lacks {says:?}\n{r}"
        );
    }
    // None of them started anything.
    assert!(
        !d.dir.join("sbx").exists()
            || fs::read_dir(d.dir.join("sbx"))
                .expect("dir")
                .next()
                .is_none()
    );
    // A bad policy file is refused naming the file and the key.
    fs::write(d.dir.join("docker.toml"), "privileged = true\n").expect("policy");
    let r = d.run(&["run", "img"], 30);
    r.expect_code(125)
        .expect_stderr("docker.toml: unknown key \"privileged\"");
    // `airlock docker` is the same front end.
    let airlock = bin("airlock");
    let env = d.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let r = run_env(
        &[&airlock, "docker", "run", "--privileged", "img"],
        &env,
        30,
    );
    r.expect_code(125).expect_stderr("--privileged is refused");
    let r = run_env(&[&airlock, "docker", "--help"], &env, 30);
    r.expect_code(0);
    assert!(r.stdout.contains("Usage:  docker COMMAND"), "{r}");
}

/// podman on this host, in storage of the test's own (vfs), able to run
/// containers here (runc; the sandbox this suite runs in lets no process
/// raise its RLIMIT_NOFILE/NPROC, so the defaults are lowered). The same
/// environment is given to `docker build`, which runs podman.
struct Podman {
    env: Vec<(String, String)>,
}

impl Podman {
    fn new(dir: &Path) -> Podman {
        let conf = dir.join("containers.conf");
        fs::write(
            &conf,
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=4096:4096\"]\n[engine]\nruntime = \"runc\"\n",
        )
        .expect("containers.conf");
        let storage = dir.join("storage.conf");
        fs::write(
            &storage,
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                dir.join("podman-root").display(),
                dir.join("podman-run").display()
            ),
        )
        .expect("storage.conf");
        Podman {
            env: vec![
                ("CONTAINERS_CONF".into(), conf.display().to_string()),
                (
                    "CONTAINERS_STORAGE_CONF".into(),
                    storage.display().to_string(),
                ),
            ],
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        let mut argv = vec!["podman"];
        argv.extend_from_slice(args);
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        run_env(&argv, &env, 300)
    }
}

#[test]
fn tcg_docker_commands_match_podman_where_the_format_matters() {
    let d = Docker::new("docker-podman", "");
    let archive = agent_image(&d.dir, "localhost/agent:1");
    let archive_s = archive.display().to_string();
    let p = Podman::new(&d.dir);
    p.run(&["load", "-i", &archive_s]).expect_code(0);
    d.run(&["load", "-i", &archive_s], 120)
        .expect_code(0)
        .expect_stdout_line("Loaded image: localhost/agent:1");

    // image inspect: the same image, the same fields (docker's Id keeps its
    // sha256: prefix, podman's does not).
    for format in [
        "{{json .Config.Cmd}}",
        "{{json .Config.Env}}",
        "{{.Config.User}}",
        "{{.Config.WorkingDir}}",
        "{{.Config.Cmd}}",
        "{{.Architecture}}",
        "{{.Os}}",
        "{{json .RepoTags}}",
        "{{json .RootFS.Layers}}",
    ] {
        let ours = d.run(&["image", "inspect", "--format", format, "agent:1"], 30);
        let theirs = p.run(&["image", "inspect", "--format", format, "localhost/agent:1"]);
        ours.expect_code(0);
        theirs.expect_code(0);
        assert_eq!(ours.stdout, theirs.stdout, "{format}\n{ours}\n{theirs}");
    }
    let id = d.run(&["image", "inspect", "--format", "{{.Id}}", "agent:1"], 30);
    let pid = p.run(&[
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        "localhost/agent:1",
    ]);
    assert_eq!(id.stdout.trim(), format!("sha256:{}", pid.stdout.trim()));
    let whole: Value = serde_json::from_str(&d.run(&["image", "inspect", "agent:1"], 30).stdout)
        .expect("inspect JSON");
    assert_eq!(whole[0]["Config"]["User"], "node");
    let missing = d.run(&["image", "inspect", "no-such:1"], 30);
    missing
        .expect_code(1)
        .expect_stderr("No such image: no-such:1");
    assert_eq!(missing.stdout.trim(), "[]");
    let images = d.run(&["images", "--format", "{{.Repository}}:{{.Tag}}"], 30);
    assert_eq!(images.stdout, "localhost/agent:1\n");

    // ps: the same container under both, the same lines.
    p.run(&[
        "run",
        "-d",
        "--name",
        "twin",
        "--label",
        "suite=podman",
        "localhost/agent:1",
        "sleep",
        "300",
    ])
    .expect_code(0);
    let started = d.run(
        &[
            "run",
            "-d",
            "--name",
            "twin",
            "--label",
            "suite=airlock",
            "--label",
            "k=v",
            "localhost/agent:1",
            "sleep",
            "300",
        ],
        300,
    );
    started.expect_code(0);
    let full_id = started.stdout.trim().to_owned();
    assert!(
        full_id.len() == 64 && full_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{started}"
    );
    for (ours_filter, theirs_filter) in [
        ("label=suite=airlock", "label=suite=podman"),
        ("name=twin", "name=twin"),
    ] {
        // (podman's {{.State}} is its status text; docker's, and ours, is `running`.)
        for format in ["{{.Names}}", "{{.Image}}"] {
            let ours = d.run(&["ps", "--filter", ours_filter, "--format", format], 30);
            let theirs = p.run(&["ps", "--filter", theirs_filter, "--format", format]);
            ours.expect_code(0);
            assert_eq!(ours.stdout, theirs.stdout, "{format}\n{ours}\n{theirs}");
        }
    }
    let status = d.run(&["ps", "--format", "{{.Status}}|{{.ID}}"], 30);
    let (st, short) = status.stdout.trim().split_once('|').expect("one row");
    assert!(st.starts_with("Up "), "{status}");
    assert_eq!(short, &full_id[..12]);
    let theirs = p.run(&["ps", "--format", "{{.Status}}"]);
    assert!(theirs.stdout.starts_with("Up "), "{theirs}");
    let json: Value =
        serde_json::from_str(d.run(&["ps", "--format", "{{json .}}"], 30).stdout.trim())
            .expect("{{json .}}");
    assert_eq!(json["Names"], "twin");
    assert_eq!(json["State"], "running");
    assert_eq!(json["Labels"], "k=v,suite=airlock");
    let table = d.run(&["ps"], 30);
    assert!(table.stdout.starts_with("CONTAINER ID   IMAGE"), "{table}");
    assert_eq!(d.run(&["ps", "-q"], 30).stdout.trim(), &full_id[..12]);
    assert_eq!(
        d.run(&["ps", "--filter", "label=k=other", "-q"], 30).stdout,
        ""
    );

    // exec: by the ID prefix too, as the image's user, -e, -w, -i.
    let r = d.run(&["exec", &full_id[..8], "id", "-un"], 120);
    r.expect_code(0).expect_stdout_line("node");
    let r = d.run(
        &[
            "exec",
            "-u",
            "0",
            "-e",
            "X=1",
            "-w",
            "/tmp",
            "twin",
            "sh",
            "-c",
            "echo $X $(pwd) $(id -u) $AGENT_IMAGE",
        ],
        120,
    );
    r.expect_code(0).expect_stdout_line("1 /tmp 0 fixture");
    let r = d.run_stdin(&["exec", "-i", "twin", "cat"], b"through stdin\n");
    r.expect_code(0).expect_stdout_line("through stdin");
    d.run(&["exec", "twin", "sh", "-c", "exit 7"], 120)
        .expect_code(7);
    // stop, then ps -a says Exited, logs has what the main process said.
    d.run(&["stop", "-t", "1", "twin"], 120)
        .expect_code(0)
        .expect_stdout_line("twin");
    assert_eq!(d.run(&["ps", "-q"], 30).stdout, "");
    let exited = d.run(&["ps", "-a", "--format", "{{.Names}} {{.Status}}"], 30);
    assert!(exited.stdout.starts_with("twin Exited (1"), "{exited}");
    d.run(&["exec", "twin", "true"], 30)
        .expect_code(1)
        .expect_stderr("is not running");
    d.run(&["rm", "twin"], 60)
        .expect_code(0)
        .expect_stdout_line("twin");
    d.run(&["rm", "twin"], 60)
        .expect_code(1)
        .expect_stderr("No such container: twin");
    p.run(&["rm", "-f", "-t", "0", "twin"]).expect_code(0);

    // run in the foreground: the image's Cmd, output, exit codes, -w, -e,
    // --env-file, --memory, --cpus, --network none, -i.
    let r = d.run(&["run", "--rm", "agent:1"], 300);
    r.expect_code(0).expect_stdout_line("image cmd");
    let env_file = d.dir.join("env.list");
    fs::write(&env_file, "# comment\nFROM_FILE=yes\n").expect("env file");
    let env_file_s = env_file.display().to_string();
    let r = d.run(
        &[
            "run",
            "--rm",
            "--name",
            "fg",
            "-w",
            "/tmp",
            "-e",
            "A=b",
            "--env-file",
            &env_file_s,
            "--memory",
            "600m",
            "--cpus",
            "2",
            "--network",
            "none",
            "agent:1",
            "sh",
            "-c",
            "echo $A $FROM_FILE $(pwd) $(nproc); grep MemTotal /proc/meminfo; echo err >&2; exit 4",
        ],
        300,
    );
    r.expect_code(4)
        .expect_stdout_line("b yes /tmp 2")
        .expect_stderr("err");
    let mem_kb: u64 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    assert!(
        (400_000..=614_400).contains(&mem_kb),
        "--memory 600m: MemTotal {mem_kb} kB\n{r}"
    );
    // NanoClaw's probe.
    let r = d.run_stdin(
        &[
            "run",
            "-i",
            "--rm",
            "--entrypoint",
            "/bin/echo",
            "agent:1",
            "Container OK",
        ],
        b"{}\n",
    );
    r.expect_code(0).expect_stdout_line("Container OK");
    let r = d.run_stdin(&["run", "-i", "--rm", "agent:1", "cat"], b"piped in\n");
    r.expect_code(0).expect_stdout_line("piped in");
    let r = d.run(&["run", "--rm", "agent:1", "no-such-program"], 300);
    r.expect_code(127);
    // --rm left nothing; a name in use is refused.
    assert_eq!(d.run(&["ps", "-a", "-q"], 30).stdout, "");
    d.run(
        &["run", "-d", "--name", "busy", "agent:1", "sleep", "300"],
        300,
    )
    .expect_code(0);
    d.run(&["run", "--name", "busy", "agent:1", "true"], 60)
        .expect_code(125)
        .expect_stderr("is already in use");
    let logs = d.run(&["logs", "busy"], 30);
    logs.expect_code(0);
    d.run(&["kill", "busy"], 120)
        .expect_code(0)
        .expect_stdout_line("busy");
    d.run(&["rm", "-f", "busy"], 60).expect_code(0);
    let r = d.run(
        &[
            "run",
            "-d",
            "--name",
            "talker",
            "agent:1",
            "sh",
            "-c",
            "echo said-this; sleep 300",
        ],
        300,
    );
    r.expect_code(0);
    let mut said = String::new();
    for _ in 0..100 {
        said = d.run(&["logs", "talker"], 30).stdout;
        if said.contains("said-this") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    assert_eq!(said, "said-this\n");
    d.run(&["rm", "-f", "talker"], 60).expect_code(0);

    // A guest that floods its output cannot grow the host's disk: the log
    // keeps 16 MiB and says so.
    d.run(
        &[
            "run",
            "-d",
            "--name",
            "flood",
            "agent:1",
            "python3",
            "-c",
            "import sys; sys.stdout.write('a' * 20_000_000)",
        ],
        300,
    )
    .expect_code(0);
    let mut status = String::new();
    for _ in 0..300 {
        status = d
            .run(
                &[
                    "ps",
                    "-a",
                    "--filter",
                    "name=flood",
                    "--format",
                    "{{.Status}}",
                ],
                30,
            )
            .stdout;
        if status.starts_with("Exited") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(status.starts_with("Exited (0)"), "{status}");
    let logs = d.run(&["logs", "--tail", "2", "flood"], 60);
    assert!(
        logs.stdout
            .ends_with("[airlock: the log is full (16 MiB); the rest is not kept]\n"),
        "{}",
        &logs.stdout[logs.stdout.len().saturating_sub(200)..]
    );
    let all = d.run(&["logs", "flood"], 60);
    assert!(
        all.stdout.len() < (16 << 20) + 200,
        "{} bytes",
        all.stdout.len()
    );
    d.run(&["rm", "flood"], 60).expect_code(0);
    // load from stdin, as `docker load < FILE`.
    let r = d.run_stdin(&["load"], &fs::read(&archive).expect("archive"));
    r.expect_code(0)
        .expect_stdout_line("Loaded image: localhost/agent:1");
    // save gives back what load took, byte for byte.
    let saved = d.dir.join("saved.tar");
    d.run(
        &["save", "-o", saved.to_str().expect("utf-8"), "agent:1"],
        60,
    )
    .expect_code(0);
    assert_eq!(
        sha256_hex(&fs::read(&saved).expect("saved")),
        sha256_hex(&fs::read(&archive).expect("archive"))
    );
    // build: the host's podman builds, the store gets the result.
    let ctx = d.dir.join("ctx");
    fs::create_dir_all(&ctx).expect("mkdir");
    fs::write(ctx.join("hello.txt"), "built by podman\n").expect("write");
    fs::write(
        ctx.join("Dockerfile"),
        "FROM localhost/agent:1\nCOPY hello.txt /hello.txt\nCMD [\"cat\", \"/hello.txt\"]\n",
    )
    .expect("write");
    let env = d.env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    env.extend(p.env.iter().map(|(a, b)| (a.as_str(), b.as_str())));
    let ctx_s = ctx.display().to_string();
    let r = run_env(
        &[
            &d.link,
            "build",
            "-t",
            "built:1",
            "-f",
            &format!("{ctx_s}/Dockerfile"),
            &ctx_s,
        ],
        &env,
        600,
    );
    r.expect_code(0)
        .expect_stdout_line("Loaded image: localhost/built:1");
    let r = d.run(&["run", "--rm", "built:1"], 300);
    r.expect_code(0).expect_stdout_line("built by podman");
    p.run(&["rm", "-a", "-f"]);
}

/// The docker front end on our VMM: the nested test bed (L1 with real
/// kvm_amd), the same image store (loaded here, shared into L1 at the same
/// path), the kvm engine from the policy file.
#[test]
fn kvm_docker_front_end_through_our_vmm_in_the_test_bed() {
    let d = Docker::new("docker-kvm", "");
    let archive = agent_image(&d.dir, "localhost/agent:1");
    d.run(&["load", "-i", archive.to_str().expect("utf-8")], 120)
        .expect_code(0);
    let image_root = root().join(build_file("rootfs.img"));
    fs::write(
        d.dir.join("docker-kvm.toml"),
        format!(
            "engine = \"kvm\"\nimage_root = \"{}\"\nmem = 512\n",
            image_root.display()
        ),
    )
    .expect("policy");
    let s = format!(
        "set -e; export AIRLOCK_SANDBOX_DIR=/tmp/sbx XDG_DATA_HOME={data} \
         AIRLOCK_DOCKER_CONFIG={dir}/docker-kvm.toml; D={docker}; \
         set +e; $D run --rm agent:1 sh -c 'echo hello from $(id -un); exit 3'; echo \"code=$?\"; set -e; \
         $D run -d --name k --label suite=kvm agent:1 sleep 300 | wc -c; \
         $D ps --filter label=suite=kvm --format '{{{{.Names}}}} {{{{.State}}}}'; \
         $D exec k id -un; \
         echo piped | $D exec -i k cat; \
         $D stop -t 1 k; \
         $D ps -a --format '{{{{.Names}}}} {{{{.Status}}}}' | cut -c1-11; \
         $D rm k; \
         $D ps -a -q | wc -l",
        data = d.dir.join("data").display(),
        dir = d.dir.display(),
        docker = d.link,
    );
    let r = testbed(&["sh", "-c", &s], 900);
    r.expect_code(0).expect_stderr("engine: kvm");
    let lines: Vec<&str> = r.stdout.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        [
            "hello from node",
            "code=3",
            "65",
            "k running",
            "node",
            "piped",
            "k",
            "k Exited (1",
            "k",
            "0"
        ],
        "{r}"
    );
}
