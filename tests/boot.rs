//! Boot the real kernel and init on both engines, the tiny smoke guest on our
//! VMM, and check the errors a user gets for bad input.

use airlock_e2e::{bin, build_file, host_is_kvm_pvm, rel, run, scratch, testbed};
use airlock_protocol::INIT_READY_LINE;

const POWER_OFF_LINE: &str = "airlock-init: powering off";

#[test]
fn tcg_engine_boots_our_kernel_and_init() {
    let dir = scratch("tcg-boot");
    let console = dir.join("console.log");
    let r = run(
        &[
            &bin("airlock"),
            "run",
            "--engine",
            "tcg",
            "--console-log",
            &rel(&console),
            "--",
            "true",
        ],
        300,
    );
    r.expect_code(0).expect_stderr("engine: tcg");
    // The console goes to the log file, not to the terminal.
    let log = std::fs::read_to_string(&console).expect("console log");
    assert!(log.contains(INIT_READY_LINE), "{log}");
    assert!(log.contains(POWER_OFF_LINE), "{log}");
    assert!(!r.stdout.contains(INIT_READY_LINE), "{r}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn our_vmm_runs_the_tiny_smoke_guest_in_the_testbed() {
    let dir = scratch("smoke");
    let elf = dir.join("smoke.elf");
    let code = airlock_vmm::tiny_guest::smoke_code(b"airlock smoke: serial works\n");
    std::fs::write(&elf, airlock_vmm::tiny_guest::pvh_elf(&code)).expect("write smoke guest");
    let r = testbed(
        &[
            &bin("airlock-vmm"),
            "--kernel",
            &rel(&elf),
            "--console",
            "-",
        ],
        600,
    );
    r.expect_code(0)
        .expect_stdout_line("airlock smoke: serial works")
        .expect_stderr("airlock-vmm: boot-timer: guest init reached after")
        .expect_stderr("airlock-vmm: guest stopped: guest reset the machine");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn our_vmm_boots_our_kernel_and_init_on_two_vcpus_in_the_testbed() {
    let r = testbed(
        &[
            &bin("airlock-vmm"),
            "--kernel",
            &build_file("vmlinux"),
            "--initrd",
            &build_file("initramfs.cpio"),
            "--cpus",
            "2",
            "--mem",
            "256",
            "--cmdline",
            "airlock.debug=1",
        ],
        600,
    );
    r.expect_code(0)
        .expect_stdout_line(INIT_READY_LINE)
        .expect_stdout_line(POWER_OFF_LINE)
        // The init's boot-timer write reached our MMIO device.
        .expect_stderr("airlock-vmm: boot-timer: guest init reached after")
        .expect_stderr("airlock-vmm: guest stopped: guest reset the machine");
    assert!(!r.stdout.contains("Kernel panic"), "{r}");
}

#[test]
fn airlock_auto_picks_our_vmm_where_kvm_works() {
    // In the test bed /dev/kvm is real kvm_amd: auto must choose kvm.
    let r = testbed(
        &[
            &bin("airlock"),
            "run",
            "--engine",
            "auto",
            "--",
            "echo",
            "hi",
        ],
        600,
    );
    r.expect_code(0)
        .expect_stdout_line("hi")
        .expect_stderr("engine: kvm");
}

#[test]
fn vmm_rejects_bad_input_with_one_line_and_exit_2() {
    let vmm = bin("airlock-vmm");
    let dir = scratch("badinput");
    let not_elf = dir.join("bzImage");
    std::fs::write(&not_elf, b"MZ\x00\x00 definitely not an ELF").expect("write");
    let not_elf = rel(&not_elf);

    run(&[&vmm, "--kernel", "build/does-not-exist"], 30)
        .expect_code(2)
        .expect_one_line_error("kernel not found at build/does-not-exist");
    run(&[&vmm, "--kernel", &not_elf], 30)
        .expect_code(2)
        .expect_one_line_error("is not an ELF64 vmlinux");
    run(
        &[
            &vmm,
            "--kernel",
            &build_file("vmlinux"),
            "--initrd",
            "nope.cpio",
        ],
        30,
    )
    .expect_code(2)
    .expect_one_line_error("initrd not found at nope.cpio");
    let r = run(
        &[&vmm, "--kernel", &build_file("vmlinux"), "--mem", "16"],
        30,
    );
    r.expect_code(2).expect_stderr("--mem");
    // Too little memory for this kernel and initrd is caught by the loader.
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn vmm_without_access_to_dev_kvm_says_how_to_fix_it() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("no /dev/kvm on this host: the permission case cannot arise");
        return;
    }
    // As an unprivileged user (nobody), /dev/kvm (0600 root or 0660 kvm) is closed.
    let vmm = airlock_e2e::root().join(bin("airlock-vmm"));
    let vmlinux = airlock_e2e::root().join(build_file("vmlinux"));
    let r = run(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            vmm.to_str().expect("utf8"),
            "--kernel",
            vmlinux.to_str().expect("utf8"),
        ],
        30,
    );
    r.expect_code(2)
        .expect_one_line_error("no permission on /dev/kvm");
}

#[test]
fn airlock_rejects_bad_input_with_exit_2_and_starts_nothing() {
    let airlock = bin("airlock");
    let dir = scratch("airlock-badinput");
    let not_elf = dir.join("not-a-kernel");
    std::fs::write(&not_elf, b"hello").expect("write");
    run(
        &[
            &airlock,
            "run",
            "--engine",
            "tcg",
            "--kernel",
            &rel(&dir.join("missing")),
            "--",
            "true",
        ],
        30,
    )
    .expect_code(2)
    .expect_stderr("kernel not found");
    run(
        &[
            &airlock,
            "run",
            "--engine",
            "tcg",
            "--kernel",
            &rel(&not_elf),
            "--",
            "true",
        ],
        30,
    )
    .expect_code(2)
    .expect_stderr("not an ELF");
    run(&[&airlock, "run", "--bogus-flag"], 30).expect_code(2);
    // Nothing was started for any of these: no VMM or QEMU has our paths.
    // (pgrep directly: through `run`, it would find its own `timeout` wrapper.)
    let left = airlock_e2e::processes_mentioning(&dir.display().to_string());
    assert!(left.is_empty(), "a process was left behind:\n{left}");
    if host_is_kvm_pvm() {
        run(&[&airlock, "run", "--engine", "kvm", "--", "true"], 30)
            .expect_code(2)
            .expect_stderr("kvm_pvm");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn doctor_names_the_engine_auto_would_use() {
    let r = run(&[&bin("airlock"), "doctor"], 60);
    r.expect_code(0);
    let want = if host_is_kvm_pvm() {
        "would use tcg"
    } else {
        "would use"
    };
    assert!(r.stdout.contains(want) || r.stderr.contains(want), "{r}");
}

#[test]
fn our_vmm_serves_read_only_and_read_write_disks_in_the_testbed() {
    // airlock run --engine kvm with a VMM wrapper that adds two disks: the
    // guest reads the read-only one, cannot write it, and writes the other.
    let dir = scratch("disks");
    let ro: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.join("ro.img"), &ro).expect("ro image");
    std::fs::write(dir.join("rw.img"), vec![0u8; 1024 * 1024]).expect("rw image");
    let wrapper = dir.join("vmm-with-disks");
    let vmm = airlock_e2e::root().join(bin("airlock-vmm"));
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} \"$@\" --disk ro:{} --disk rw:{}\n",
            vmm.display(),
            dir.join("ro.img").display(),
            dir.join("rw.img").display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let script = format!(
        "AIRLOCK_VMM={} {} run --engine kvm --vm-root -- sh -c '\
         cat /sys/block/vda/ro /sys/block/vda/size; sha256sum < /dev/vda; \
         if echo x | dd of=/dev/vda conv=fsync 2>/dev/null; then echo ro-write-succeeded; fi; \
         printf airlock-disk-write | dd of=/dev/vdb bs=512 seek=3 conv=fsync 2>/dev/null; \
         cat /sys/block/vdb/ro'",
        rel(&wrapper),
        bin("airlock")
    );
    let r = testbed(&["sh", "-c", &script], 600);
    let want_sha = {
        use std::fmt::Write as _;
        let digest = airlock_e2e::sha256_hex(&ro);
        let mut s = String::new();
        let _ = write!(s, "{digest}  -");
        s
    };
    r.expect_code(0)
        .expect_stdout_line("1")
        .expect_stdout_line("2048")
        .expect_stdout_line(&want_sha)
        .expect_stdout_line("0");
    assert!(!r.stdout.contains("ro-write-succeeded"), "{r}");
    let rw = std::fs::read(dir.join("rw.img")).expect("rw image");
    assert_eq!(
        &rw[3 * 512..3 * 512 + 18],
        b"airlock-disk-write",
        "the guest's write reached the file"
    );
    assert_eq!(
        std::fs::read(dir.join("ro.img")).expect("ro"),
        ro,
        "read-only image unchanged"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A stand-in for QEMU's human monitor on a Unix socket: the banner and
/// prompt, each command echoed the way QEMU's line editor draws it (with
/// terminal escapes), then the recorded answer; `info registers -a` and
/// `info lapic N` answer from `registers` and `lapic`.
fn fake_monitor(
    path: &std::path::Path,
    registers: String,
    lapic: String,
) -> std::thread::JoinHandle<()> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind");
    std::thread::spawn(move || {
        // One connection per question asked (scripts/hmp.py reconnects).
        for conn in listener.incoming().take(2) {
            let Ok(mut conn) = conn else { return };
            let crlf = |s: &str| s.replace('\n', "\r\n");
            let _ = conn
                .write_all(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ");
            let mut lines = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            while lines.read_line(&mut line).unwrap_or(0) > 0 {
                let cmd = line.trim().to_owned();
                line.clear();
                let answer = if cmd == "info registers -a" {
                    registers.clone()
                } else if cmd.starts_with("info lapic") {
                    lapic.clone()
                } else {
                    format!("unknown command: '{cmd}'\n")
                };
                let echo = format!("{cmd}\x1b[K\r\n");
                let _ = conn.write_all(format!("{echo}{}(qemu) ", crlf(&answer)).as_bytes());
            }
        }
    })
}

/// The test bed's check for an L1 whose vCPU stopped for good (QEMU 7.2
/// TCG left it halted with a deliverable timer interrupt pending: recorded
/// from a real hang in the test bed, 2026-12-06) says so, and says nothing
/// for an idle L1 whose timer still runs, a running vCPU, one halted with
/// interrupts off, or an interrupt the processor priority holds back; its
/// wake-up byte reaches the serial socket.
#[test]
fn testbed_tells_a_stuck_l1_from_an_idle_one() {
    let dir = scratch("hmp");
    let fixture = |name: &str| {
        std::fs::read_to_string(airlock_e2e::root().join("tests/fixtures/hmp").join(name))
            .expect("fixture")
    };
    let (stuck_regs, stuck_lapic) = (fixture("stuck-registers.txt"), fixture("stuck-lapic.txt"));
    let cases = [
        ("stuck", stuck_regs.clone(), stuck_lapic.clone(), Some(0)),
        (
            "idle",
            fixture("idle-registers.txt"),
            fixture("idle-lapic.txt"),
            Some(3),
        ),
        (
            "running",
            stuck_regs.replace("HLT=1", "HLT=0"),
            stuck_lapic.clone(),
            Some(3),
        ),
        (
            "interrupts-off",
            stuck_regs.replace("RFL=00000246", "RFL=00000046"),
            stuck_lapic.clone(),
            Some(3),
        ),
        (
            "held-back",
            stuck_regs.clone(),
            stuck_lapic.replace("PPR 0x10", "PPR 0xf0"),
            Some(3),
        ),
    ];
    for (name, regs, lapic, code) in cases {
        let sock = dir.join(format!("{name}.sock"));
        // (A case that asks once leaves its server waiting: it ends with the test.)
        let _server = fake_monitor(&sock, regs, lapic);
        let r = run(&["python3", "scripts/hmp.py", "--stuck", &rel(&sock)], 30);
        assert_eq!(r.code, code, "{name}: {r}");
        if name == "stuck" {
            assert_eq!(
                r.stdout.trim(),
                "vCPU 0 halted with interrupts enabled and interrupt vector 236 pending",
                "{r}"
            );
        } else {
            assert_eq!(r.stdout, "", "{name}: {r}");
        }
    }
    // Nothing to ask: an error, not a verdict.
    let r = run(
        &[
            "python3",
            "scripts/hmp.py",
            "--stuck",
            &rel(&dir.join("none.sock")),
        ],
        30,
    );
    assert_eq!(r.code, Some(1), "{r}");
    // The wake-up byte: one newline on the serial socket.
    let serial = dir.join("serial.sock");
    let listener = std::os::unix::net::UnixListener::bind(&serial).expect("bind");
    let r = run(&["python3", "scripts/hmp.py", "--poke", &rel(&serial)], 30);
    assert_eq!(r.code, Some(0), "{r}");
    let (mut conn, _) = listener.accept().expect("accept");
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut conn, &mut got).expect("read");
    assert_eq!(got, b"\n");
    let _ = std::fs::remove_dir_all(dir);
}
