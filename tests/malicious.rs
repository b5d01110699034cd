//! A malicious guest, end to end: the command (or the guest kernel itself)
//! attacks the resources it was given. For each attack the host stays up,
//! the memory of airlock and of the VM process stays bounded, the run ends
//! with its documented exit code, the audit log verifies, and the user's
//! files are intact. On the tcg engine on this host and, for the attacks on
//! the VM's own memory and on the kernel, through our VMM in the nested test
//! bed.
//!
//! Attacks covered elsewhere: vsock connection and byte floods, garbage and
//! oversize frames (tests/run.rs, `airlock-hostile`), forged connections to
//! the results and other one-connection ports and vsock from the agent
//! (tests/files.rs, tests/hostile_guest.rs), hostile virtio-blk requests and descriptor chains (the
//! VMM's unit tests play the guest driver in guest memory).

use std::fs;
use std::path::Path;

use airlock_e2e::{
    audit_log_of, audit_records, bin, build_file, fields_of_kind, processes_mentioning, run_env,
    run_with_peaks, scratch, sha256_hex, testbed, Peaks, Run,
};

/// Guest memory of every run here, in MiB.
const MEM_MIB: u64 = 256;
/// What QEMU (or airlock-vmm) and the vsock backend may hold beyond guest
/// RAM, and airlock itself: generous, but far below "unbounded".
const OVERHEAD_MIB: u64 = 320;

/// `airlock run --engine tcg --mem 256 --image-root build/rootfs.img
/// [OPTS] -- CMD...`, sampled for memory.
fn tcg(opts: &[&str], cmd: &[&str], timeout_s: u64) -> (Run, Peaks) {
    let airlock = airlock_e2e::root().join(bin("airlock"));
    let image = build_file("rootfs.img");
    let mem = MEM_MIB.to_string();
    let mut argv = vec![
        airlock.to_str().expect("utf8"),
        "run",
        "--engine",
        "tcg",
        "--mem",
        mem.as_str(),
        "--image-root",
        image.as_str(),
    ];
    argv.extend_from_slice(opts);
    argv.push("--");
    argv.extend_from_slice(cmd);
    run_with_peaks(&argv, timeout_s)
}

/// The checks every attack must pass: documented exit code, bounded
/// memory, a verifying audit log with the given `run.end` outcome, nothing
/// left running.
fn survived(r: &Run, peaks: Peaks, code: i32, how: &str) {
    r.expect_code(code);
    assert!(
        peaks.tree_kib < (MEM_MIB + OVERHEAD_MIB) * 1024,
        "airlock and its VM peaked at {} KiB\n{r}",
        peaks.tree_kib
    );
    assert!(
        peaks.broker_kib < 64 * 1024,
        "airlock itself peaked at {} KiB\n{r}",
        peaks.broker_kib
    );
    let log = audit_log_of(r);
    let log_s = log.display().to_string();
    let airlock = bin("airlock");
    let verify = run_env(&[airlock.as_str(), "audit", "verify", &log_s], &[], 60);
    verify.expect_code(0);
    let end = fields_of_kind(&audit_records(&log), "run.end")
        .pop()
        .unwrap_or_else(|| panic!("no run.end in {log_s}"));
    assert_eq!(end["how"], how, "{end}\n{r}");
    assert_eq!(end["exit_code"], code, "{end}");
    let run_dir_leftovers = processes_mentioning("qemu-system-x86_64 -name airlock");
    assert!(
        !run_dir_leftovers.contains(&format!("{}", std::process::id())),
        "{run_dir_leftovers}"
    );
}

/// A workspace of a few files, and its digest.
fn workspace(dir: &Path) -> String {
    let ws = dir.join("ws");
    fs::create_dir_all(ws.join("src")).expect("mkdir");
    fs::write(ws.join("src/main.c"), b"int main(void) { return 0; }\n").expect("write");
    fs::write(ws.join("README"), b"the user's files\n").expect("write");
    tree_digest(&ws)
}

/// sha256 over the sorted (path, content) pairs of the files under `dir`.
fn tree_digest(dir: &Path) -> String {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut all = Vec::new();
    for f in files {
        all.extend(f.display().to_string().into_bytes());
        all.extend(fs::read(&f).expect("read"));
    }
    sha256_hex(&all)
}

#[test]
fn tcg_fork_bomb_is_held_by_the_pids_limit_and_the_timeout() {
    let dir = scratch("malicious-fork");
    let before = workspace(&dir);
    let ws = dir.join("ws").display().to_string();
    let (r, peaks) = tcg(
        &["--timeout", "45", "--workspace", &ws],
        &["bash", "-c", "bomb() { bomb | bomb & }; bomb; sleep 600"],
        240,
    );
    // The container's pids limit (4096) stops the forks; 4096 shells do
    // not fit in 256 MiB, so whether the guest kernel's OOM killer reaches
    // the command's own shell before --timeout depends on how fast the
    // emulated guest forks: either way the bomb is held inside the VM, and
    // airlock says which (124 timeout, or 123 out of memory).
    match r.code {
        Some(123) => survived(&r, peaks, 123, "out_of_memory"),
        _ => survived(&r, peaks, 124, "timeout"),
    }
    assert_eq!(
        tree_digest(&dir.join("ws")),
        before,
        "the user's files changed"
    );
}

#[test]
fn tcg_memory_hog_is_killed_inside_the_vm() {
    let (r, peaks) = tcg(
        &["--timeout", "200"],
        &[
            "python3",
            "-c",
            "x = []\nwhile True: x.append(bytearray(1 << 20))",
        ],
        300,
    );
    // The container's memory cgroup OOM-kills the hog; the guest says the
    // kernel killed for memory: out of memory, 123.
    survived(&r, peaks, 123, "out_of_memory");
    r.expect_stderr("ran out of memory");
}

#[test]
fn tcg_disk_filler_fills_only_its_own_scratch_space() {
    let dir = scratch("malicious-disk");
    let before = workspace(&dir);
    let ws = dir.join("ws").display().to_string();
    let image_before =
        sha256_hex(&fs::read(airlock_e2e::root().join(build_file("rootfs.img"))).expect("image"));
    let (r, peaks) = tcg(
        &["--timeout", "200", "--workspace", &ws],
        &[
            "sh",
            "-c",
            "cat /dev/zero > /workspace/fill; echo fill-exit=$?; \
             cat /dev/zero > /var/fill; echo root-exit=$?; exit 3",
        ],
        300,
    );
    // Either write fails (no space) and the command goes on to exit 3, or
    // the memory cgroup (tmpfs pages count) kills the shell itself: out of
    // memory, 123.
    match r.code {
        Some(3) => survived(&r, peaks, 3, "exited"),
        _ => survived(&r, peaks, 123, "out_of_memory"),
    }
    assert_eq!(
        tree_digest(&dir.join("ws")),
        before,
        "the user's files changed"
    );
    assert_eq!(
        sha256_hex(&fs::read(airlock_e2e::root().join(build_file("rootfs.img"))).expect("image")),
        image_before,
        "the image changed"
    );
}

#[test]
fn tcg_output_flood_is_cut_at_the_limit_and_stops_the_run() {
    let (r, peaks) = tcg(
        &["--timeout", "120", "--max-output-bytes", "100000"],
        &["yes", "flood"],
        200,
    );
    survived(&r, peaks, 125, "output_limit");
    assert_eq!(r.stdout.len(), 100_000, "exactly the limit reaches us");
    assert!(r.stderr.contains("max-output-bytes"), "said so\n{r}");
}

/// `airlock run --engine tcg [OPTS] --initrd build/initramfs.cpio
/// --cmdline rdinit=PID1 -- true`, sampled for memory: the guest kernel runs
/// PID1 instead of the init.
fn tcg_initrd_pid1(pid1: &str, opts: &[&str]) -> (Run, Peaks) {
    let airlock = airlock_e2e::root().join(bin("airlock"));
    let initrd = build_file("initramfs.cpio");
    let rdinit = format!("rdinit={pid1}");
    let mut argv = vec![airlock.to_str().expect("utf8"), "run", "--engine", "tcg"];
    argv.extend_from_slice(opts);
    argv.extend(["--initrd", &initrd, "--cmdline", &rdinit, "--", "true"]);
    run_with_peaks(&argv, 200)
}

#[test]
fn tcg_guest_kernel_panic_is_a_failed_sandbox() {
    // PID 1 exits at once (busybox with no applet prints its usage): the
    // kernel panics ("Attempted to kill init") and, with panic=-1, resets.
    let (r, peaks) = tcg_initrd_pid1("/bin/busybox", &[]);
    survived(&r, peaks, 120, "boot_failure");
    assert!(
        r.stderr.contains("Kernel panic"),
        "the console tail says why\n{r}"
    );
}

#[test]
fn tcg_guest_that_never_boots_is_stopped_at_the_deadline() {
    // PID 1 reads the console forever (cat of an input nobody types on):
    // the guest never connects.
    let (r, peaks) = tcg_initrd_pid1("/bin/cat", &["--timeout", "20"]);
    survived(&r, peaks, 124, "timeout");
}

#[test]
fn kvm_memory_hog_and_kernel_panic_through_our_vmm() {
    // In the VM itself (no container): the guest kernel's OOM killer ends
    // the hog, the init survives and reports it: 123. Then a kernel panic.
    let script = format!(
        "{airlock} run --engine kvm --mem 256 --initrd {initrd} -- \
           sh -c 'x=a; while true; do x=$x$x; done'; echo hog-exit=$?; \
         {airlock} run --engine kvm --initrd {initrd} --cmdline rdinit=/bin/busybox -- true; \
           echo panic-exit=$?",
        airlock = bin("airlock"),
        initrd = build_file("initramfs.cpio"),
    );
    let r = testbed(&["sh", "-c", &script], 900);
    r.expect_code(0)
        .expect_stdout_line("hog-exit=123")
        .expect_stdout_line("panic-exit=120")
        .expect_stderr("Kernel panic");
}
