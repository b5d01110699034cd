//! Helpers for Airlock's end-to-end tests: where the built artefacts are, how
//! to run a command (on the host or in the nested test bed) with a deadline,
//! and what it printed.
//!
//! The tests need `scripts/build.sh` to have run (the README's test command
//! does it); a missing artefact fails the test with that instruction.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn must_exist(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run scripts/build.sh first (the README's test command does)",
        path.display()
    );
    path
}

/// A static release binary built by `scripts/build.sh`, relative to the root
/// (so the same path works inside the test bed).
pub fn bin(name: &str) -> String {
    let rel = format!("target/x86_64-unknown-linux-gnu/release/{name}");
    must_exist(root().join(&rel));
    rel
}

/// A file under `build/`, relative to the root.
pub fn build_file(name: &str) -> String {
    let rel = format!("build/{name}");
    must_exist(root().join(&rel));
    rel
}

/// What a finished command printed and how it exited.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl Run {
    /// Panics with both streams unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "unexpected exit status\n{self}");
        self
    }

    /// Panics unless stdout has a line equal to `line`.
    pub fn expect_stdout_line(&self, line: &str) -> &Self {
        assert!(
            self.stdout.lines().any(|l| l.trim_end() == line),
            "stdout lacks the line {line:?}\n{self}"
        );
        self
    }

    /// Panics unless stderr contains `text`.
    pub fn expect_stderr(&self, text: &str) -> &Self {
        assert!(self.stderr.contains(text), "stderr lacks {text:?}\n{self}");
        self
    }

    /// Panics unless stderr is exactly one line containing `text`.
    pub fn expect_one_line_error(&self, text: &str) -> &Self {
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "expected a one-line error\n{self}");
        self.expect_stderr(text)
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `argv` from the repository root, killed after `timeout_s` seconds.
pub fn run(argv: &[&str], timeout_s: u32) -> Run {
    run_env(argv, &[], timeout_s)
}

/// Where the tests' runs keep their default audit logs, instead of the
/// user's own state directory.
pub fn state_dir() -> PathBuf {
    root().join("build/tests/state")
}

/// The initrd the runs of the tests boot unless they say otherwise: the
/// suites written before the root image (run, audit, boot) check initramfs
/// mode, which an existing build/rootfs.img would otherwise replace;
/// tests/image.rs passes --image-root. Passed on into the test bed, which
/// forwards AIRLOCK_* variables; relative to the repository root, the
/// working directory of every run here and in the test bed.
pub const TEST_INITRD_ENV: (&str, &str) = ("AIRLOCK_INITRD", "build/initramfs.cpio");

/// Runs `argv` from the repository root with extra environment variables
/// (and [`TEST_INITRD_ENV`] unless `env` sets it).
pub fn run_env(argv: &[&str], env: &[(&str, &str)], timeout_s: u32) -> Run {
    run_raw(argv, env, timeout_s).into_run()
}

/// Runs `argv` inside the nested test bed (L1 Linux with real `kvm_amd`).
pub fn testbed(argv: &[&str], timeout_s: u32) -> Run {
    let limit = timeout_s.to_string();
    let mut full = vec!["scripts/testbed", "--timeout", limit.as_str(), "--"];
    full.extend_from_slice(argv);
    testbed_run(&full, timeout_s)
}

/// What `scripts/testbed` says when L1 itself hung (its vCPU halted for
/// good with an interrupt pending, or its QEMU under 5 % of a CPU for
/// 120 s with the command not ended): the test bed failed, not what ran
/// in it (docs/FACTS.md).
const L1_HUNG: &str = "testbed: L1 hung";

/// How many times a test-bed command is run in all when L1 hangs.
const L1_TRIES: usize = 3;

/// Runs `scripts/testbed ...` (`full`); if L1 hung, runs it again (up to
/// [`L1_TRIES`] times in all), saying so on the result's stderr. Whatever
/// ran in L1 had not finished, and a run in L1 starts from nothing of the
/// last one's VMs.
fn testbed_run(full: &[&str], timeout_s: u32) -> Run {
    let mut hung = Vec::new();
    loop {
        let mut r = run(full, timeout_s + 30);
        if r.code != Some(125) || !r.stderr.contains(L1_HUNG) || hung.len() + 1 == L1_TRIES {
            if !hung.is_empty() {
                let mut said = String::new();
                for (i, stderr) in hung.iter().enumerate() {
                    said += &format!(
                        "(the test bed's L1 hung on try {} and was run again; its stderr:)\n{stderr}\n",
                        i + 1
                    );
                }
                r.stderr = format!("{said}(try {}:)\n{}", hung.len() + 1, r.stderr);
            }
            return r;
        }
        hung.push(r.stderr);
    }
}

/// `sh -c SCRIPT` in the test bed, whose L1 gets `mem_mib` of memory and
/// is ended after `timeout_s`.
pub fn testbed_script(mem_mib: u32, timeout_s: u32, script: &str) -> Run {
    let (mem, limit) = (mem_mib.to_string(), timeout_s.to_string());
    testbed_run(
        &[
            "scripts/testbed",
            "--mem",
            &mem,
            "--timeout",
            &limit,
            "--",
            "sh",
            "-c",
            script,
        ],
        timeout_s,
    )
}

/// A scratch directory under `build/tests/` (reachable from the test bed),
/// unique to this test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = root()
        .join("build/tests")
        .join(format!("{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    dir
}

/// The path of `p` relative to the repository root.
pub fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

/// Whether this host's `/dev/kvm` is the emulating `kvm_pvm` (docs/FACTS.md).
pub fn host_is_kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// What a finished command printed, with stdout kept as raw bytes (for
/// binary output).
#[derive(Debug)]
pub struct RawRun {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output, byte for byte.
    pub stdout: Vec<u8>,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl RawRun {
    /// The same run with stdout lossily decoded.
    pub fn into_run(self) -> Run {
        Run {
            code: self.code,
            stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
            stderr: self.stderr,
        }
    }
}

/// `argv` under `timeout` with the tests' state directory and initrd, `env`
/// over them, in the repository root.
fn test_command(argv: &[&str], env: &[(&str, &str)], timeout_s: u32) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", &timeout_s.to_string()])
        .args(argv)
        .env("XDG_STATE_HOME", state_dir())
        .env(TEST_INITRD_ENV.0, TEST_INITRD_ENV.1)
        .envs(env.iter().copied())
        .current_dir(root());
    cmd
}

fn raw_run(out: std::process::Output) -> RawRun {
    RawRun {
        code: out.status.code(),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Like [`run_env`], keeping stdout as bytes.
pub fn run_raw(argv: &[&str], env: &[(&str, &str)], timeout_s: u32) -> RawRun {
    let out = test_command(argv, env, timeout_s)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    raw_run(out)
}

/// Like [`run_raw`], with `input` written to the command's stdin (from a
/// thread of its own, then closed).
pub fn run_raw_with_stdin(
    argv: &[&str],
    env: &[(&str, &str)],
    input: &[u8],
    timeout_s: u32,
) -> RawRun {
    let mut child = test_command(argv, env, timeout_s)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    feeder.join().expect("feeder");
    raw_run(out)
}

/// A fresh directory under the system temp dir, unique to this test and
/// process, with a short path (Unix socket paths are limited to 107 bytes;
/// pass it as `TMPDIR` so that `airlock run` makes its run directory there).
/// Removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("al-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The path as a string, for argv and environment values.
    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("temp dir path is UTF-8")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test's own sandbox state root (`AIRLOCK_SANDBOX_DIR`, under
/// `build/tests/`) and temp dir, for the tests of live sandboxes and pools.
/// Dropped, it kills every process that still holds a lock under it, pool
/// keepers first (so they boot nothing more), then sandbox supervisors
/// (their VMs die with them): a test that fails half-way leaves nothing
/// running.
#[derive(Debug)]
pub struct StateRoot {
    pub dir: PathBuf,
    pub tmp: TempDir,
}

impl StateRoot {
    pub fn new(test: &str) -> StateRoot {
        let dir = scratch(test).join("sbx");
        let _ = std::fs::remove_dir_all(&dir);
        StateRoot {
            dir,
            tmp: TempDir::new(test),
        }
    }

    /// The variables that point `airlock` here.
    pub fn env(&self) -> Vec<(&str, &str)> {
        vec![
            ("AIRLOCK_SANDBOX_DIR", self.dir.to_str().expect("utf-8")),
            ("TMPDIR", self.tmp.as_str()),
        ]
    }

    /// `airlock ARGS` here, with `extra` variables.
    pub fn airlock_env(&self, args: &[&str], extra: &[(&str, &str)], timeout_s: u32) -> Run {
        let airlock = bin("airlock");
        let mut argv = vec![airlock.as_str()];
        argv.extend_from_slice(args);
        let mut env = self.env();
        env.extend_from_slice(extra);
        run_env(&argv, &env, timeout_s)
    }

    /// `airlock ARGS` here.
    pub fn airlock(&self, args: &[&str], timeout_s: u32) -> Run {
        self.airlock_env(args, &[], timeout_s)
    }
}

impl Drop for StateRoot {
    fn drop(&mut self) {
        let mut held = Vec::new();
        held_locks(&self.dir, &mut held);
        held.sort_by_key(|(p, _)| p.file_name() != Some("keeper.lock".as_ref()));
        for (_, pid) in held {
            // SAFETY: kill(2) of a process this test started, which still
            // holds its lock.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Every lock file (`lock`, `keeper.lock`) under `dir` that a live process
/// holds, and its pid.
pub fn held_locks(dir: &Path, out: &mut Vec<(PathBuf, i32)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            held_locks(&path, out);
            continue;
        }
        let name = entry.file_name();
        if name != "lock" && name != "keeper.lock" {
            continue;
        }
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        // SAFETY: flock(2) on a descriptor we own; no pointers.
        let free = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::LOCK_SH | libc::LOCK_NB,
            )
        } == 0;
        let pid = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let (false, Some(pid)) = (free, pid) {
            out.push((path, pid));
        }
    }
}

/// The processes whose command line mentions `text` (`pgrep -af`), one per
/// line; empty when there are none.
pub fn processes_mentioning(text: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-af", text])
        .output()
        .unwrap_or_else(|e| panic!("cannot run pgrep: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The sha256 of `data`, in hex (through `sha256sum`).
pub fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run sha256sum: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("sha256sum output");
    writer.join().expect("writer").expect("write to sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Peak resident memory of a run, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peaks {
    /// `airlock` itself (its VmHWM).
    pub broker_kib: u64,
    /// `airlock` and every process under it (QEMU or airlock-vmm, the
    /// vsock backend), summed at each sample (every 50 ms).
    pub tree_kib: u64,
}

/// The field `name` (in kB) of `/proc/PID/status`.
fn status_kib(pid: u32, name: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

/// `pid` and all its descendants (from each process's parent in
/// `/proc/*/stat`).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and parens.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok());
            if let Some(ppid) = ppid {
                parent_of.push((p, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// Runs `argv` like [`run`] (same environment, no `timeout` wrapper, so
/// that `airlock` is the child) while sampling the peak memory of it and of
/// its process tree.
pub fn run_with_peaks(argv: &[&str], timeout_s: u64) -> (Run, Peaks) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .env("XDG_STATE_HOME", state_dir())
        .env(TEST_INITRD_ENV.0, TEST_INITRD_ENV.1)
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut peaks = Peaks::default();
            while !done.load(Ordering::Relaxed) {
                if let Some(kib) = status_kib(pid, "VmHWM:") {
                    peaks.broker_kib = peaks.broker_kib.max(kib);
                }
                let sum: u64 = process_tree(pid)
                    .into_iter()
                    .filter_map(|p| status_kib(p, "VmRSS:"))
                    .sum();
                peaks.tree_kib = peaks.tree_kib.max(sum);
                std::thread::sleep(Duration::from_millis(50));
            }
            peaks
        })
    };
    let (mut out, mut err) = (
        child.stdout.take().expect("stdout"),
        child.stderr.take().expect("stderr"),
    );
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut b);
        String::from_utf8_lossy(&b).into_owned()
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut b);
        String::from_utf8_lossy(&b).into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            done.store(true, Ordering::Relaxed);
            panic!("{argv:?} did not finish within {timeout_s} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    done.store(true, Ordering::Relaxed);
    let run = Run {
        code,
        stdout: out_t.join().expect("stdout"),
        stderr: err_t.join().expect("stderr"),
    };
    (run, sampler.join().expect("sampler"))
}

/// The records of an audit log; panics on a line that is not JSON.
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read the audit log {}: {e}", path.display()));
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not JSON in {}: {e}: {l}", path.display()))
        })
        .collect()
}

/// The fields of each record of `kind`, in log order.
pub fn fields_of_kind(records: &[serde_json::Value], kind: &str) -> Vec<serde_json::Value> {
    records
        .iter()
        .filter(|r| r["kind"] == kind)
        .map(|r| r["fields"].clone())
        .collect()
}

/// The audit log a run named on its stderr (`airlock: audit log: PATH`):
/// the last such line, which airlock prints after the VM is gone. The
/// sandbox's own stderr, which comes before it, may hold a forged one.
/// (Scripts should rather use `--audit FILE` or `--report FILE`.)
pub fn audit_log_of(r: &Run) -> PathBuf {
    r.stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("airlock: audit log: "))
        .map(|p| PathBuf::from(p.trim()))
        .unwrap_or_else(|| panic!("no audit log named\n{r}"))
}

/// `airlock run --engine tcg --image-root build/rootfs.img OPTS -- CMD` on
/// this host, with `env` added to airlock's environment.
pub fn tcg_on_image(opts: &[&str], cmd: &[&str], env: &[(&str, &str)], timeout_s: u32) -> Run {
    tcg_on_image_raw(opts, cmd, env, timeout_s).into_run()
}

/// [`tcg_on_image`] with stdout kept as bytes.
pub fn tcg_on_image_raw(
    opts: &[&str],
    cmd: &[&str],
    env: &[(&str, &str)],
    timeout_s: u32,
) -> RawRun {
    let airlock = bin("airlock");
    let image = build_file("rootfs.img");
    let mut argv = vec![
        airlock.as_str(),
        "run",
        "--engine",
        "tcg",
        "--image-root",
        image.as_str(),
    ];
    argv.extend_from_slice(opts);
    argv.push("--");
    argv.extend_from_slice(cmd);
    run_raw(&argv, env, timeout_s)
}

/// A key no guest may see: unique per test process.
pub fn secret_key(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("sk-{test}-airlock-{}-{nanos:08x}", std::process::id())
}

/// The scripted model API (`airlock-upstream`), killed on drop.
#[derive(Debug)]
pub struct Upstream {
    child: std::process::Child,
    pub addr: String,
    pub log: PathBuf,
}

impl Upstream {
    /// Starts `airlock-upstream --script SCRIPT --log DIR/upstream.jsonl ARGS`.
    pub fn start(script: &Path, dir: &Path, args: &[&str]) -> Upstream {
        let log = dir.join("upstream.jsonl");
        let _ = std::fs::remove_file(&log);
        let mut child = std::process::Command::new(root().join(bin("airlock-upstream")))
            .arg("--script")
            .arg(script)
            .arg("--log")
            .arg(&log)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start airlock-upstream");
        let mut first = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut first,
        )
        .expect("read the address");
        let addr = first.trim().to_owned();
        assert!(addr.starts_with("127.0.0.1:"), "upstream printed {first:?}");
        Upstream { child, addr, log }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests it logged.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("upstream log line"))
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a server certificate it signed for 127.0.0.1 and localhost,
/// made at test time: `(ca.pem, cert.pem, key.pem)` in `dir`.
pub fn test_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    test_pki_for(
        dir,
        &["127.0.0.1", "localhost"],
        ["ca.pem", "cert.pem", "key.pem"],
    )
}

/// A CA and a server certificate it signed for `names`, made at test time,
/// written to `files` (CA, certificate, key) in `dir`.
pub fn test_pki_for(dir: &Path, names: &[&str], files: [&str; 3]) -> (PathBuf, PathBuf, PathBuf) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Airlock e2e CA");
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .expect("params")
        .signed_by(&key, &ca)
        .expect("sign");
    let paths = (dir.join(files[0]), dir.join(files[1]), dir.join(files[2]));
    std::fs::write(&paths.0, ca.pem()).expect("write the CA");
    std::fs::write(&paths.1, cert.pem()).expect("write the certificate");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write the key");
    paths
}

/// The value of the first line of `r`'s stdout that starts with `prefix`
/// (the prefix and trailing white space cut off); panics with the run if
/// there is none.
pub fn field<'a>(r: &'a Run, prefix: &str) -> &'a str {
    r.stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line\n{r}"))
        .trim_end()
}

/// Where `needle` first occurs in `hay` (glibc's memmem: a GiB of guest
/// RAM is searched in well under a second, even in a debug build).
pub fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    // SAFETY: both pointers and lengths come from live slices, which memmem
    // only reads; the result is null or points into `hay`.
    let p = unsafe {
        libc::memmem(
            hay.as_ptr().cast(),
            hay.len(),
            needle.as_ptr().cast(),
            needle.len(),
        )
    };
    (!p.is_null()).then(|| p as usize - hay.as_ptr() as usize)
}

/// Runs `cmd` with `sh -c` in `dir`; panics unless it succeeds; its stdout.
pub fn sh_in(dir: &Path, cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host's UTC time as `YYYY-MM-DD hh:mm:ss` (for L1's `date -s`).
pub fn utc_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
