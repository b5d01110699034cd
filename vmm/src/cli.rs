//! The `airlock-vmm` command line, parsed by hand.
//!
//! Twenty long options, no subcommands: a table and a loop. (It was clap,
//! whose parser was an eighth of the VMM's machine code and, in the test
//! bed's L1 where every start translates the code it runs anew, ~20 ms of
//! each wake from a snapshot.) What it accepts is what clap accepted:
//! `--name VALUE` and `--name=VALUE`, `-h`/`--help`, `-V`/`--version`;
//! an unknown or repeated option, a missing or malformed value, a missing
//! `--kernel`, `--vsock-cid` without `--vsock-uds`, `--prefault` or
//! `--record-working-set` without `--restore` (or together), and
//! `--snapshot-to` with `--restore` are usage errors (exit status 2, as
//! clap's).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use airlock_vmm::config::{DiskConfig, MAX_MEM_MIB, MIN_MEM_MIB};
use airlock_vmm::jail;

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Boot (or wake) a VM.
    Run(Box<Cli>),
    /// `-h`/`--help`: print [`help`].
    Help,
    /// `-V`/`--version`: print [`version`].
    Version,
}

/// The options of a run (their meaning: [`help`]).
#[derive(Debug)]
pub struct Cli {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub mem: u32,
    pub cpus: u8,
    pub cmdline: String,
    pub console: String,
    pub vsock_uds: Option<PathBuf>,
    pub disks: Vec<DiskConfig>,
    pub vsock_cid: u32,
    pub no_seccomp: bool,
    pub no_jail: bool,
    pub jail_uid: u32,
    pub test_forbidden_syscall: Option<u64>,
    pub test_report_jail: bool,
    pub dump_memory: Option<PathBuf>,
    pub snapshot_to: Option<PathBuf>,
    pub restore: Option<PathBuf>,
    pub prefault: Prefault,
    pub record_working_set: Option<PathBuf>,
    pub timings: bool,
}

/// `--prefault`'s value: what of a snapshot's memory a restore maps ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefault {
    /// The snapshot's recorded working set, if it has one (the default).
    WorkingSet,
    /// Every data page of the memory file.
    All,
    /// Nothing: every page faults in on demand.
    None,
}

/// The short usage line of the errors and of `--help`.
pub const USAGE: &str = "Usage: airlock-vmm [OPTIONS] --kernel <PATH>";

/// `--version`'s line.
pub fn version() -> String {
    format!("airlock-vmm {}\n", env!("CARGO_PKG_VERSION"))
}

/// `--help`'s text.
pub fn help() -> String {
    format!(
        "\
Boot an Airlock microVM on KVM.

Loads an uncompressed ELF kernel (PVH entry) and an optional initramfs, runs
the guest with a serial console, and exits when the guest resets or powers
off. Airlock's broker (`airlock run`) normally starts this for you.

Exit status: 0 the guest stopped cleanly (reset, triple fault or power off),
or the snapshot was written (`--snapshot-to`); 1 the VM failed (KVM error: the
message shows the exit reason, RIP and the instruction bytes); 2 bad input
(missing or non-ELF kernel, bad sizes, no access to /dev/kvm, a usage error);
3 the `--restore` snapshot is damaged or of another VMM build, kernel, CPU or
machine shape (nothing ran: boot cold instead).

{USAGE}

Options:
      --kernel <PATH>
          Uncompressed ELF kernel (vmlinux) with a PVH entry point.
      --initrd <PATH>
          Initramfs (newc cpio) handed to the kernel.
      --mem <MiB>
          Guest memory in MiB, {MIN_MEM_MIB} to {MAX_MEM_MIB} [default: 256].
      --cpus <N>
          Number of vCPUs, 1 to 16 [default: 1].
      --cmdline <STR>
          Extra kernel command-line arguments, appended to the VMM's own
          (`console=ttyS0 reboot=k panic=-1 quiet`) [default: \"\"].
      --console <PATH|-|none>
          Where the guest's serial console goes: a file path, `-` for standard
          output, or `none` [default: -].
      --vsock-uds <PATH>
          Give the guest a virtio-vsock device whose host side is this Unix
          socket path (Firecracker's hybrid vsock): a guest connection to host
          port P arrives at `PATH_P`; host programs connect to PATH and write
          `CONNECT <guest port>\\n`.
      --disk <ro:PATH|rw:PATH>
          A disk for the guest, `ro:PATH` (read-only) or `rw:PATH`; repeat for
          more. The guest sees them as /dev/vda, /dev/vdb, ... in this order.
      --vsock-cid <CID>
          The guest's vsock context id (3 or more) [default: 3]. Needs
          --vsock-uds.
      --no-seccomp
          Debugging only: run without the seccomp filters.
      --no-jail
          Debugging only: run without the jail (namespaces, empty root,
          rlimits, dropped privileges).
      --jail-uid <ID>
          The uid and gid to run as when started by root [default: {uid}].
      --snapshot-to <DIR>
          Boot, and when the guest's init reaches its snapshot point (it writes
          the snapshot mark: `airlock.snapshot=1` on its command line) write a
          snapshot into DIR (`state` and `memory`, created mode 0600) and stop.
          Not with --restore.
      --restore <DIR>
          Do not boot: wake the guest from the snapshot in DIR (made by this
          airlock-vmm build with the same kernel, memory, vCPUs and disks; the
          console, vsock socket and disk paths are this run's). Its memory is
          mapped copy-on-write: VMs woken from one snapshot share the pages
          none of them wrote.
      --prefault <working-set|all|none>
          With --restore: what of the snapshot's memory to map into KVM's
          page tables before the guest runs (KVM_PRE_FAULT_MEMORY, else
          MADV_POPULATE_READ), sparing the woken guest those page faults.
          `working-set`: the pages the snapshot's recorded working set lists
          (DIR/working-set, from --record-working-set; its written pages are
          copied ahead, the others stay shared with sibling VMs); nothing if
          the snapshot has none or it is damaged (said on stderr). `all`:
          every data page of the memory file (more than it saves where faults
          are cheap). `none`: fault everything in on demand.
          [default: working-set]
      --record-working-set <FILE>
          With --restore: run the woken guest until its first vsock packet,
          stop it, and write to FILE (mode 0600) the guest pages it touched
          until then, read from /proc/self/pagemap, and which of them it
          wrote: the snapshot's working set for later restores (save it as
          DIR/working-set). Nothing is prefaulted, the kernel's fault-around
          is kept off (a read fault maps only its own page: a userfaultfd
          registration, else the memory file's clean pages dropped from the
          page cache; the success line says which), and the guest is not
          answered. Not with --prefault.
      --timings
          Print on stderr where the start goes: milliseconds since main() at
          each step (jail, restore or boot set-up, first KVM_RUN, the guest's
          first vsock packet and console line, with the vCPU exits so far;
          with --no-seccomp also KVM's counters of vCPU 0). The start's lines
          are held until the guest's first vsock packet or console line (or
          the end), so that writing them does not slow what they measure.
  -h, --help
          Print this help.
  -V, --version
          Print the version.

Options take their value as `--name VALUE` or `--name=VALUE`.
",
        uid = jail::DEFAULT_ID,
    )
}

/// The options that take a value.
const WITH_VALUE: [&str; 16] = [
    "kernel",
    "initrd",
    "mem",
    "cpus",
    "cmdline",
    "console",
    "vsock-uds",
    "disk",
    "vsock-cid",
    "jail-uid",
    "test-forbidden-syscall",
    "dump-memory",
    "snapshot-to",
    "restore",
    "prefault",
    "record-working-set",
];

/// The options that are flags.
const FLAGS: [&str; 6] = [
    "no-seccomp",
    "no-jail",
    "test-report-jail",
    "timings",
    "help",
    "version",
];

/// Parses the arguments after the program's name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut seen: Vec<&'static str> = Vec::new();
    let mut cli = Cli {
        kernel: PathBuf::new(),
        initrd: None,
        mem: 256,
        cpus: 1,
        cmdline: String::new(),
        console: "-".to_owned(),
        vsock_uds: None,
        disks: Vec::new(),
        vsock_cid: 3,
        no_seccomp: false,
        no_jail: false,
        jail_uid: jail::DEFAULT_ID,
        test_forbidden_syscall: None,
        test_report_jail: false,
        dump_memory: None,
        snapshot_to: None,
        restore: None,
        prefault: Prefault::WorkingSet,
        record_working_set: None,
        timings: false,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let bytes = arg.as_bytes();
        let (name, inline) = match bytes {
            b"-h" => (&b"help"[..], None),
            b"-V" => (&b"version"[..], None),
            [b'-', b'-', rest @ ..] if !rest.is_empty() => {
                match rest.iter().position(|&b| b == b'=') {
                    Some(i) => (&rest[..i], Some(OsStr::from_bytes(&rest[i + 1..]))),
                    None => (rest, None),
                }
            }
            _ => return Err(format!("unexpected argument '{}'", arg.to_string_lossy())),
        };
        let known = |list: &[&'static str]| list.iter().copied().find(|n| n.as_bytes() == name);
        if let Some(flag) = known(&FLAGS) {
            if inline.is_some() {
                return Err(format!("'--{flag}' takes no value"));
            }
            match flag {
                "help" => return Ok(Command::Help),
                "version" => return Ok(Command::Version),
                _ => {}
            }
            once(&mut seen, flag)?;
            match flag {
                "no-seccomp" => cli.no_seccomp = true,
                "no-jail" => cli.no_jail = true,
                "test-report-jail" => cli.test_report_jail = true,
                _ => cli.timings = true,
            }
            continue;
        }
        let Some(option) = known(&WITH_VALUE) else {
            return Err(format!("unexpected argument '{}'", arg.to_string_lossy()));
        };
        if option != "disk" {
            once(&mut seen, option)?;
        }
        let value: OsString = match inline {
            Some(v) => v.to_owned(),
            None => args
                .next()
                .ok_or_else(|| format!("a value is required for '--{option}'"))?,
        };
        let text = || {
            value
                .to_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("invalid value for '--{option}': not UTF-8"))
        };
        let path = || PathBuf::from(&value);
        match option {
            "kernel" => cli.kernel = path(),
            "initrd" => cli.initrd = Some(path()),
            "mem" => cli.mem = number(option, &text()?, MIN_MEM_MIB, MAX_MEM_MIB)?,
            "cpus" => cli.cpus = number(option, &text()?, 1u8, 16)?,
            "cmdline" => cli.cmdline = text()?,
            "console" => cli.console = text()?,
            "vsock-uds" => cli.vsock_uds = Some(path()),
            "disk" => cli.disks.push(
                parse_disk(&text()?).map_err(|e| format!("invalid value for '--disk': {e}"))?,
            ),
            "vsock-cid" => cli.vsock_cid = number(option, &text()?, 0, u32::MAX)?,
            "jail-uid" => cli.jail_uid = number(option, &text()?, 0, u32::MAX)?,
            "test-forbidden-syscall" => {
                cli.test_forbidden_syscall = Some(number(option, &text()?, 0, u64::MAX)?)
            }
            "dump-memory" => cli.dump_memory = Some(path()),
            "snapshot-to" => cli.snapshot_to = Some(path()),
            "prefault" => {
                cli.prefault = match value.as_bytes() {
                    b"working-set" => Prefault::WorkingSet,
                    b"all" => Prefault::All,
                    b"none" => Prefault::None,
                    _ => {
                        return Err(format!(
                            "invalid value '{}' for '--prefault': one of working-set, all, none",
                            value.to_string_lossy()
                        ))
                    }
                }
            }
            "record-working-set" => cli.record_working_set = Some(path()),
            _ => cli.restore = Some(path()),
        }
    }
    let given = |name: &str| seen.contains(&name);
    if !given("kernel") {
        return Err("the required option '--kernel <PATH>' was not given".to_owned());
    }
    if given("vsock-cid") && !given("vsock-uds") {
        return Err("'--vsock-cid' needs '--vsock-uds'".to_owned());
    }
    for option in ["prefault", "record-working-set"] {
        if given(option) && cli.restore.is_none() {
            return Err(format!("'--{option}' needs '--restore'"));
        }
    }
    if given("prefault") && given("record-working-set") {
        return Err("'--record-working-set' cannot be used with '--prefault'".to_owned());
    }
    if cli.snapshot_to.is_some() && cli.restore.is_some() {
        return Err("'--snapshot-to' cannot be used with '--restore'".to_owned());
    }
    Ok(Command::Run(Box::new(cli)))
}

/// Records that `name` was given, refusing it a second time.
fn once(seen: &mut Vec<&'static str>, name: &'static str) -> Result<(), String> {
    if seen.contains(&name) {
        return Err(format!("'--{name}' cannot be used more than once"));
    }
    seen.push(name);
    Ok(())
}

/// A decimal number in `min..=max`.
fn number<T: Copy + Into<u64> + TryFrom<u64>>(
    option: &str,
    text: &str,
    min: T,
    max: T,
) -> Result<T, String> {
    let n: u64 = text
        .parse()
        .map_err(|_| format!("invalid value '{text}' for '--{option}': not a number"))?;
    let (lo, hi) = (min.into(), max.into());
    if !(lo..=hi).contains(&n) {
        return Err(format!(
            "invalid value '{text}' for '--{option}': {n} is not in {lo}..={hi}"
        ));
    }
    T::try_from(n).map_err(|_| format!("invalid value '{text}' for '--{option}'"))
}

/// A `--disk` value: `ro:PATH` or `rw:PATH`.
pub fn parse_disk(spec: &str) -> Result<DiskConfig, String> {
    let (read_only, path) = match spec.split_once(':') {
        Some(("ro", path)) => (true, path),
        Some(("rw", path)) => (false, path),
        _ => return Err(format!("expected ro:PATH or rw:PATH, got {spec:?}")),
    };
    if path.is_empty() {
        return Err("empty disk path".into());
    }
    Ok(DiskConfig {
        path: path.into(),
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Cli, String> {
        match parse(args.iter().map(OsString::from))? {
            Command::Run(cli) => Ok(*cli),
            other => panic!("not a run: {other:?}"),
        }
    }

    #[test]
    fn disk_specs_name_their_mode() {
        let d = parse_disk("ro:/img/a.ext4").expect("ro");
        assert_eq!((d.path, d.read_only), ("/img/a.ext4".into(), true));
        let d = parse_disk("rw:scratch:1.img").expect("rw");
        assert_eq!((d.path, d.read_only), ("scratch:1.img".into(), false));
        assert!(parse_disk("/img/a.ext4").is_err());
        assert!(parse_disk("ro:").is_err());
        assert!(parse_disk("xx:/a").is_err());
    }

    #[test]
    fn the_broker_s_command_line_parses_with_its_defaults() {
        let cli = run(&["--kernel", "/k"]).expect("minimal");
        assert_eq!(cli.kernel, PathBuf::from("/k"));
        assert_eq!((cli.mem, cli.cpus, cli.vsock_cid), (256, 1, 3));
        assert_eq!((cli.cmdline.as_str(), cli.console.as_str()), ("", "-"));
        assert_eq!(cli.jail_uid, jail::DEFAULT_ID);
        assert!(!cli.no_seccomp && !cli.no_jail && !cli.timings);
        assert_eq!(cli.prefault, Prefault::WorkingSet);
        assert_eq!(cli.record_working_set, None);
        let cli = run(&[
            "--kernel=/k",
            "--initrd",
            "/i",
            "--disk",
            "ro:/a",
            "--disk=rw:/b",
            "--mem",
            "512",
            "--cpus=2",
            "--console",
            "none",
            "--vsock-uds",
            "/s/v",
            "--vsock-cid",
            "7",
            "--cmdline",
            "airlock.x=1 a=b=c",
            "--restore",
            "/snap",
            "--prefault",
            "all",
            "--timings",
            "--jail-uid",
            "1000",
        ])
        .expect("all");
        assert_eq!(cli.initrd, Some("/i".into()));
        assert_eq!(
            cli.disks
                .iter()
                .map(|d| (d.path.clone(), d.read_only))
                .collect::<Vec<_>>(),
            vec![("/a".into(), true), ("/b".into(), false)]
        );
        assert_eq!(
            (cli.mem, cli.cpus, cli.vsock_cid, cli.jail_uid),
            (512, 2, 7, 1000)
        );
        assert_eq!(cli.console, "none");
        assert_eq!(cli.cmdline, "airlock.x=1 a=b=c");
        assert_eq!(cli.vsock_uds, Some("/s/v".into()));
        assert_eq!(cli.restore, Some("/snap".into()));
        assert!(cli.timings);
        assert_eq!(cli.prefault, Prefault::All);
        let restore = |more: &[&str]| {
            let mut args = vec!["--kernel", "/k", "--restore", "/snap"];
            args.extend_from_slice(more);
            run(&args)
        };
        assert_eq!(
            restore(&["--prefault=none"]).expect("none").prefault,
            Prefault::None
        );
        assert_eq!(
            restore(&["--prefault", "working-set"])
                .expect("working set")
                .prefault,
            Prefault::WorkingSet
        );
        assert_eq!(
            restore(&["--record-working-set", "/snap/ws"])
                .expect("record")
                .record_working_set,
            Some("/snap/ws".into())
        );
        // An empty value and a value that looks like an option are values.
        assert_eq!(
            run(&["--kernel", "/k", "--cmdline="])
                .expect("empty")
                .cmdline,
            ""
        );
        assert_eq!(
            run(&["--kernel", "/k", "--console", "-"])
                .expect("-")
                .console,
            "-"
        );
    }

    #[test]
    fn paths_need_not_be_utf8() {
        use std::os::unix::ffi::OsStringExt;
        let odd = OsString::from_vec(b"/k\xff".to_vec());
        let mut eq = b"--dump-memory=/d\xfe".to_vec();
        let args = vec![
            OsString::from("--kernel"),
            odd.clone(),
            OsString::from_vec(std::mem::take(&mut eq)),
        ];
        let Ok(Command::Run(cli)) = parse(args) else {
            panic!("non-UTF-8 paths refused")
        };
        assert_eq!(cli.kernel, PathBuf::from(odd));
        assert_eq!(
            cli.dump_memory,
            Some(PathBuf::from(OsString::from_vec(b"/d\xfe".to_vec())))
        );
        // Text options do need UTF-8.
        let args = vec![
            OsString::from("--kernel=/k"),
            OsString::from("--cmdline"),
            OsString::from_vec(b"a\xff".to_vec()),
        ];
        assert!(matches!(parse(args), Err(e) if e.contains("not UTF-8")));
    }

    #[test]
    fn help_and_version_answer_whatever_follows() {
        for args in [
            &["-h"][..],
            &["--help"],
            &["--kernel", "/k", "--help"],
            &["--help", "--bogus"],
        ] {
            assert!(
                matches!(parse(args.iter().map(OsString::from)), Ok(Command::Help)),
                "{args:?}"
            );
        }
        for args in [&["-V"][..], &["--version"]] {
            assert!(matches!(
                parse(args.iter().map(OsString::from)),
                Ok(Command::Version)
            ));
        }
        assert!(version().starts_with("airlock-vmm "));
        let help = help();
        for option in WITH_VALUE.iter().chain(&FLAGS) {
            if !option.starts_with("test-") && *option != "dump-memory" {
                assert!(
                    help.contains(&format!("--{option}")),
                    "--help lacks --{option}"
                );
            }
        }
    }

    #[test]
    fn usage_errors_say_what_is_wrong() {
        let err = |args: &[&str]| run(args).expect_err("accepted");
        assert!(err(&[]).contains("'--kernel <PATH>' was not given"));
        assert!(err(&["--kernel", "/k", "--bogus"]).contains("unexpected argument '--bogus'"));
        assert!(err(&["--kernel", "/k", "stray"]).contains("unexpected argument 'stray'"));
        assert!(err(&["--kernel", "/k", "-x"]).contains("unexpected argument '-x'"));
        assert!(err(&["--kernel", "/k", "--"]).contains("unexpected argument '--'"));
        assert!(err(&["--kernel"]).contains("a value is required for '--kernel'"));
        assert!(err(&["--kernel", "/k", "--kernel", "/j"]).contains("more than once"));
        assert!(err(&["--kernel", "/k", "--timings", "--timings"]).contains("more than once"));
        assert!(err(&["--kernel", "/k", "--timings=yes"]).contains("takes no value"));
        assert!(err(&["--kernel", "/k", "--mem", "5"]).contains("5 is not in 64..=65536"));
        assert!(err(&["--kernel", "/k", "--mem", "65537"]).contains("not in"));
        assert!(err(&["--kernel", "/k", "--mem", "lots"]).contains("not a number"));
        assert!(err(&["--kernel", "/k", "--mem", "-1"]).contains("not a number"));
        assert!(err(&["--kernel", "/k", "--cpus", "0"]).contains("not in 1..=16"));
        assert!(err(&["--kernel", "/k", "--cpus", "17"]).contains("not in 1..=16"));
        assert!(err(&["--kernel", "/k", "--vsock-cid", "4294967296"]).contains("not in"));
        assert!(err(&["--kernel", "/k", "--disk", "/a"]).contains("expected ro:PATH or rw:PATH"));
        assert!(err(&["--kernel", "/k", "--vsock-cid", "4"]).contains("needs '--vsock-uds'"));
        assert!(err(&["--kernel", "/k", "--prefault", "all"]).contains("needs '--restore'"));
        assert!(
            err(&["--kernel", "/k", "--record-working-set", "/w"]).contains("needs '--restore'")
        );
        assert!(err(&["--kernel", "/k", "--restore", "/s", "--prefault"])
            .contains("a value is required for '--prefault'"));
        assert!(
            err(&["--kernel", "/k", "--restore", "/s", "--prefault", "some"])
                .contains("one of working-set, all, none")
        );
        assert!(err(&[
            "--kernel",
            "/k",
            "--restore",
            "/s",
            "--prefault=all",
            "--record-working-set=/w"
        ])
        .contains("cannot be used with '--prefault'"));
        assert!(
            err(&["--kernel", "/k", "--restore", "/s", "--snapshot-to", "/t"])
                .contains("cannot be used with")
        );
        // The same bounds as the VMM's own check.
        assert!(run(&["--kernel", "/k", "--mem", &MIN_MEM_MIB.to_string()]).is_ok());
        assert!(run(&["--kernel", "/k", "--mem", &MAX_MEM_MIB.to_string()]).is_ok());
    }
}
