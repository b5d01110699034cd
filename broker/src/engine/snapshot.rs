//! Fast wake on the kvm engine: a cache of snapshots of ready guests.
//!
//! A snapshot is taken at the init's snapshot point (booted, mounts done,
//! before it has talked to the host: `airlock.snapshot=1`, see
//! guest-init's `wake`), one per **key**: the digests of the kernel, the
//! initrd or root image and the container image disk (those `run.start`
//! records), the VMM binary (path, size, mtime; the VMM also checks its own
//! build id), memory, vCPUs, the guest's CID, the disks' modes and the boot
//! command line but its clock word. A key changes whenever anything the
//! guest booted with changes, and with it the snapshot used.
//!
//! On first use of a key the broker boots a VM that stops at the snapshot
//! point and writes the snapshot (`airlock-vmm --snapshot-to`) into the
//! cache, wakes it once to record its working set (`--record-working-set`:
//! the pages a woken guest touches until it is ready, which every restore
//! then maps ahead of the guest), then wakes the run's VM from it
//! (`--restore`) like every later run. Each woken guest first connects to [`WAKE_PORT`] and gets the
//! time, 32 bytes of fresh entropy and its own sandbox id
//! ([`airlock_protocol::wake::Wake`]): siblings of one snapshot share its
//! untouched memory pages (copy-on-write), never their randomness.
//!
//! A snapshot the VMM refuses (damaged, another VMM build, kernel or CPU:
//! exit 3) is removed, said on stderr, and the run boots cold. So does any
//! failure to make one. The cache holds at most [`MAX_SNAPSHOTS`] (least
//! recently used go first): each is a sparse memory file (the guest's
//! non-zero pages, tens of MiB) and a state file of a few KiB.
//!
//! Where: `$AIRLOCK_SNAPSHOT_DIR`, else `$XDG_CACHE_HOME/airlock/snapshots`,
//! else `~/.cache/airlock/snapshots` (mode 0700).

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use airlock_protocol::wake::Wake;
use airlock_protocol::WAKE_PORT;
use sha2::{Digest, Sha256};

/// Most snapshots kept.
pub const MAX_SNAPSHOTS: usize = 8;
/// How long making a snapshot may take (a boot to the snapshot point and
/// writing the memory: seconds, minutes in the nested test bed).
const MAKE_PATIENCE: Duration = Duration::from_secs(300);
/// How long a restore may take before the VM counts as woken or failed.
const RESTORE_PATIENCE: Duration = Duration::from_secs(60);
/// Most connections the wake port answers in a run.
const MAX_WAKES: u32 = 8;
/// How long the wake port waits for the guest.
const WAKE_PATIENCE: Duration = Duration::from_secs(120);
/// How long a failed try is remembered.
const RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The VMM's line once a restore is done.
pub const RESTORED_LINE: &str = "airlock-vmm: restored from the snapshot";
/// The VMM's line once a snapshot is written.
const WRITTEN_LINE: &str = "airlock-vmm: snapshot written";
/// The VMM's line once a working set is recorded.
const RECORDED_LINE: &str = "airlock-vmm: working set recorded";
/// A snapshot's working set, beside its `state` and `memory`.
pub const WORKING_SET_FILE: &str = "working-set";
/// The VMM's exit code for a snapshot it refuses.
const REFUSED_EXIT: i32 = 3;
/// The kernel command-line word a snapshot's boot adds.
pub const SNAPSHOT_CMDLINE: &str = "airlock.snapshot=1";

/// A run's use of the cache: the key and its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub key: String,
    pub dir: PathBuf,
    /// Words only the boot that makes the snapshot adds to the run's
    /// command line (after [`SNAPSHOT_CMDLINE`]), part of the key: a live
    /// sandbox's `airlock.prepare=1` and its shape.
    pub boot_words: Vec<String>,
}

/// What went into a key.
#[derive(Debug, Clone)]
pub struct KeyParts<'a> {
    pub kernel_sha256: &'a str,
    pub root_sha256: &'a str,
    pub image_disk_sha256: Option<&'a str>,
    pub vmm: &'a Path,
    pub mem_mib: u32,
    pub cpus: u8,
    pub guest_cid: u32,
    pub disks_read_only: Vec<bool>,
    pub cmdline: &'a [String],
}

/// The cache's directory.
pub fn cache_root() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("AIRLOCK_SNAPSHOT_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("airlock/snapshots"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|home| PathBuf::from(home).join(".cache/airlock/snapshots"))
}

/// The key of a run's snapshot (module docs).
pub fn key(parts: &KeyParts<'_>) -> String {
    let mut h = Sha256::new();
    let mut put = |label: &str, value: &[u8]| {
        h.update(label.as_bytes());
        h.update(b"=");
        h.update(u64::try_from(value.len()).unwrap_or(0).to_le_bytes());
        h.update(value);
    };
    put("format", b"airlock snapshot key 1");
    put("kernel", parts.kernel_sha256.as_bytes());
    put("root", parts.root_sha256.as_bytes());
    put("image", parts.image_disk_sha256.unwrap_or("").as_bytes());
    put("vmm", parts.vmm.as_os_str().as_encoded_bytes());
    if let Ok(meta) = fs::metadata(parts.vmm) {
        use std::os::unix::fs::MetadataExt;
        put(
            "vmm-file",
            format!("{}:{}.{}", meta.len(), meta.mtime(), meta.mtime_nsec()).as_bytes(),
        );
    }
    put("mem", &parts.mem_mib.to_le_bytes());
    put("cpus", &[parts.cpus]);
    put("cid", &parts.guest_cid.to_le_bytes());
    let disks: Vec<u8> = parts
        .disks_read_only
        .iter()
        .map(|ro| u8::from(*ro))
        .collect();
    put("disks", &disks);
    for word in parts.cmdline {
        if !word.starts_with(&format!("{}=", crate::run::EPOCH_CMDLINE)) {
            put("cmdline", word.as_bytes());
        }
    }
    crate::audit::record::hex(&h.finalize())
}

/// How the run's VM came up from the cache, for `vm.start`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Used {
    pub key: String,
    /// SHA-256 of the snapshot's state file (which carries its memory
    /// file's random tag).
    pub state_sha256: String,
    /// Made by this run (the first of its key).
    pub made: bool,
}

/// Why a snapshot was not used: said, then the run boots cold.
#[derive(Debug)]
pub struct Fallback(pub String);

/// Makes the snapshot of `plan` if the cache has none (`boot` spawns the
/// snapshot's VM: its arguments with `--snapshot-to DIR` and the snapshot
/// word on the command line, console and `log` given; `record` then wakes
/// it once with `--restore DIR --record-working-set DIR/working-set`, its
/// log `record_log`), returning whether this run made it.
pub fn ensure(
    plan: &Plan,
    boot: &dyn Fn(&Path) -> Result<super::Process, super::Error>,
    record: &dyn Fn(&Path) -> Result<super::Process, super::Error>,
    log: &Path,
    record_log: &Path,
) -> Result<bool, Fallback> {
    if plan.dir.join("state").is_file() {
        return Ok(false);
    }
    let failed = plan.dir.join("failed");
    if let Ok(meta) = fs::metadata(&failed) {
        let age = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if age < RETRY_AFTER {
            let why = fs::read_to_string(&failed).unwrap_or_default();
            return Err(Fallback(format!(
                "none for this guest: an earlier try failed ({}); airlock tries again after an hour, or remove {}",
                why.trim(),
                plan.dir.display()
            )));
        }
        let _ = fs::remove_dir_all(&plan.dir);
    }
    let root = plan
        .dir
        .parent()
        .ok_or_else(|| Fallback("the snapshot cache has no directory".into()))?;
    crate::sandbox::private_dir(root)
        .map_err(|e| Fallback(format!("cannot make {}: {e}", root.display())))?;
    evict(root, MAX_SNAPSHOTS.saturating_sub(1));
    let tmp = root.join(format!(
        ".making-{}-{}",
        plan.key.get(..16).unwrap_or(&plan.key),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(|e| Fallback(format!("cannot make {}: {e}", tmp.display())))?;
    let made = make(&tmp, boot, log);
    if made.is_ok() {
        if let Err(why) = record_working_set(&tmp, record, record_log) {
            let _ = fs::remove_file(tmp.join(WORKING_SET_FILE));
            eprintln!("airlock: snapshot: its working set was not recorded ({why}); woken guests fault their pages in on demand");
        }
        warm(&tmp.join("memory"));
    }
    match made {
        Ok(()) => match fs::rename(&tmp, &plan.dir) {
            Ok(()) => Ok(true),
            // Another run made it meanwhile: theirs is as good.
            Err(_) if plan.dir.join("state").is_file() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(false)
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                Err(Fallback(format!("cannot keep the snapshot: {e}")))
            }
        },
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            // Remembered, so that every run does not pay for the try.
            if fs::create_dir(&plan.dir).is_ok() {
                let _ = fs::write(plan.dir.join("failed"), format!("{}\n", e.0));
            }
            Err(e)
        }
    }
}

fn make(
    tmp: &Path,
    boot: &dyn Fn(&Path) -> Result<super::Process, super::Error>,
    log: &Path,
) -> Result<(), Fallback> {
    let mut vmm = boot(tmp).map_err(|e| Fallback(format!("cannot start its VM: {e}")))?;
    let deadline = Instant::now() + MAKE_PATIENCE;
    let console = tmp.join("console.log");
    let status = loop {
        // The init says it is ready only after the snapshot point: one
        // that says so here did not stop there (an image whose init
        // knows no snapshots).
        if fs::read_to_string(&console).is_ok_and(|c| c.contains(airlock_protocol::INIT_READY_LINE))
        {
            let _ = vmm.kill();
            return Err(Fallback(
                "the guest's init went past the snapshot point (an image without snapshot support?)".into(),
            ));
        }
        match vmm.try_wait() {
            Ok(Some(exit)) => break exit,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = vmm.kill();
                return Err(Fallback(format!(
                    "its VM did not reach the snapshot point in {} s",
                    MAKE_PATIENCE.as_secs()
                )));
            }
        }
    };
    let text = fs::read_to_string(log).unwrap_or_default();
    if status == super::ProcessExit::Code(0) && text.contains(WRITTEN_LINE) {
        return Ok(());
    }
    Err(Fallback(format!(
        "it could not be made: {}",
        last_error(&text)
            .unwrap_or_else(|| format!("its VM ended ({status}) before the snapshot point"))
    )))
}

/// Wakes the snapshot in `dir` once to record its working set (the pages a
/// woken guest touches until it is ready: airlock-vmm's `working_set`),
/// which every later restore maps ahead of the guest. The woken guest's wake
/// request is not answered: the VMM stops it at its first vsock packet.
fn record_working_set(
    dir: &Path,
    record: &dyn Fn(&Path) -> Result<super::Process, super::Error>,
    log: &Path,
) -> Result<(), String> {
    let mut vmm = record(dir).map_err(|e| format!("cannot start its VM: {e}"))?;
    let deadline = Instant::now() + RESTORE_PATIENCE;
    let status = loop {
        match vmm.try_wait() {
            Ok(Some(exit)) => break exit,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = vmm.kill();
                return Err(format!(
                    "its VM did not finish in {} s",
                    RESTORE_PATIENCE.as_secs()
                ));
            }
        }
    };
    let text = fs::read_to_string(log).unwrap_or_default();
    if status == super::ProcessExit::Code(0) && text.contains(RECORDED_LINE) {
        return Ok(());
    }
    Err(last_error(&text).unwrap_or_else(|| format!("its VM ended ({status})")))
}

/// Asks the kernel to read `path` into the page cache in the background: a
/// recording leaves only the working set's pages cached.
fn warm(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(file) = fs::File::open(path) {
        // SAFETY: advice on a file descriptor we own; no memory involved.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    }
}

/// The last `airlock-vmm: error:` line of a log.
fn last_error(log: &str) -> Option<String> {
    log.lines()
        .rev()
        .find(|l| l.starts_with("airlock-vmm: error:"))
        .map(|l| crate::text::sanitize(l.as_bytes()))
}

/// Removes the least recently used snapshots until at most `keep` remain
/// (and the leftovers of makers that died).
pub fn evict(root: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    let mut kept: Vec<(SystemTime, PathBuf)> = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(rest) = name.strip_prefix(".making-") {
            let pid = rest.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = fs::remove_dir_all(&path);
            }
            continue;
        }
        let used = fs::metadata(path.join("state"))
            .or_else(|_| fs::metadata(path.join("failed")))
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        kept.push((used, path));
    }
    kept.sort();
    let excess = kept.len().saturating_sub(keep);
    for (_, path) in kept.into_iter().take(excess) {
        let _ = fs::remove_dir_all(path);
    }
}

/// Waits for the restore of `vmm` (its log at `log`): `Ok` once the VMM
/// says it restored; a refused snapshot removes `plan`'s directory.
pub fn await_restore(plan: &Plan, vmm: &mut super::Process, log: &Path) -> Result<(), Fallback> {
    let deadline = Instant::now() + RESTORE_PATIENCE;
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.contains(RESTORED_LINE) {
            return Ok(());
        }
        match vmm.try_wait() {
            Ok(Some(status)) => {
                let why = last_error(&text).unwrap_or_else(|| format!("its VM ended ({status})"));
                if status == super::ProcessExit::Code(REFUSED_EXIT) {
                    let _ = fs::remove_dir_all(&plan.dir);
                    return Err(Fallback(format!(
                        "the snapshot was refused and removed: {why}"
                    )));
                }
                return Err(Fallback(format!("the restore failed: {why}")));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = vmm.kill();
                return Err(Fallback("the restore did not finish".into()));
            }
        }
    }
}

/// SHA-256 of a snapshot's state file (for the audit log); marks it used.
pub fn state_digest(plan: &Plan) -> io::Result<String> {
    let path = plan.dir.join("state");
    let mut bytes = Vec::new();
    fs::File::open(&path)?
        .take(16 << 20)
        .read_to_end(&mut bytes)?;
    // Most recently used: kept longest.
    let _ = fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    Ok(crate::audit::record::hex(&Sha256::digest(&bytes)))
}

/// Listens on the run's wake port and answers each of the guest's
/// connections (at most [`MAX_WAKES`]) with a fresh [`Wake`], in a thread
/// of its own, for [`WAKE_PATIENCE`]. Bound before the VM starts, so the
/// guest finds it. More than one: a guest whose first connect failed on
/// its side after the host had taken it (e.g. timed out in the guest under
/// load) tries again and must find the port still there. When it served
/// one only, a CI run in the test bed saw a woken guest refused on every
/// try for 30 s. Each answer is as fresh as the first (nothing in it is
/// secret from the guest it wakes).
pub fn serve_wake(vsock_uds: &Path) -> io::Result<()> {
    let path = super::port_path(vsock_uds, WAKE_PORT);
    let _ = fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    super::kvm::share_socket(&path)?;
    listener.set_nonblocking(true)?;
    // The random source works before the VM starts, or not at all.
    fresh_wake()?;
    std::thread::Builder::new()
        .name("wake".into())
        .spawn(move || {
            let deadline = Instant::now() + WAKE_PATIENCE;
            let mut served = 0;
            while Instant::now() < deadline && served < MAX_WAKES {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        served += 1;
                        let Ok(wake) = fresh_wake() else { return };
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
                        let _ = stream.write_all(&wake.encode());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => return,
                }
            }
        })?;
    Ok(())
}

/// The time now, 32 bytes from the host's CSPRNG, a random sandbox id.
fn fresh_wake() -> io::Result<Wake> {
    let mut random = [0u8; 48];
    fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mut entropy = [0u8; 32];
    entropy.copy_from_slice(&random[..32]);
    let mut sandbox_id = [0u8; 16];
    sandbox_id.copy_from_slice(&random[32..]);
    Ok(Wake {
        unix_secs: now.as_secs(),
        nanos: now.subsec_nanos(),
        entropy,
        sandbox_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(cmdline: &'a [String], vmm: &'a Path) -> KeyParts<'a> {
        KeyParts {
            kernel_sha256: "k",
            root_sha256: "r",
            image_disk_sha256: None,
            vmm,
            mem_mib: 256,
            cpus: 1,
            guest_cid: 3,
            disks_read_only: vec![true],
            cmdline,
        }
    }

    #[test]
    fn the_key_follows_what_the_guest_booted_with_but_the_clock() {
        let vmm = Path::new("/nonexistent/airlock-vmm");
        let base = vec![
            "airlock.epoch=1".to_owned(),
            "airlock.imagedisk=1".to_owned(),
        ];
        let k = key(&parts(&base, vmm));
        let later = vec![
            "airlock.epoch=99".to_owned(),
            "airlock.imagedisk=1".to_owned(),
        ];
        assert_eq!(key(&parts(&later, vmm)), k, "the clock word does not count");
        let other = vec!["airlock.epoch=1".to_owned(), "airlock.nested=1".to_owned()];
        assert_ne!(key(&parts(&other, vmm)), k);
        let mut p = parts(&base, vmm);
        p.kernel_sha256 = "k2";
        assert_ne!(key(&p), k);
        let mut p = parts(&base, vmm);
        p.image_disk_sha256 = Some("i");
        assert_ne!(key(&p), k);
        let mut p = parts(&base, vmm);
        p.mem_mib = 512;
        assert_ne!(key(&p), k);
        let mut p = parts(&base, vmm);
        p.disks_read_only = vec![true, true];
        assert_ne!(key(&p), k);
    }

    #[test]
    fn the_cache_keeps_the_most_recently_used() {
        let root = std::env::temp_dir().join(format!("airlock-snap-evict-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let dir = root.join(name);
            fs::create_dir_all(&dir).expect("dir");
            let f = fs::File::create(dir.join("state")).expect("state");
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + i as u64))
                .expect("mtime");
        }
        // A dead maker's leftovers go; a live one's stay.
        fs::create_dir_all(root.join(".making-x-999999999")).expect("dead");
        let live = root.join(format!(".making-y-{}", std::process::id()));
        fs::create_dir_all(&live).expect("live");
        evict(&root, 2);
        assert!(!root.join("a").exists(), "the oldest went");
        assert!(root.join("b").exists() && root.join("c").exists());
        assert!(!root.join(".making-x-999999999").exists());
        assert!(live.exists());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_failed_try_is_said_and_remembered_not_repeated() {
        let root = std::env::temp_dir().join(format!("airlock-snap-fail-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let plan = Plan {
            key: "k".repeat(64),
            dir: root.join("k".repeat(64)),
            boot_words: Vec::new(),
        };
        let log =
            std::env::temp_dir().join(format!("airlock-snap-fail-{}.log", std::process::id()));
        let tries = std::cell::Cell::new(0);
        // A "VMM" that ends at once without writing a snapshot.
        let boot = |_: &Path| {
            tries.set(tries.get() + 1);
            super::super::Process::spawn("true", Path::new("/bin/true"), &[], &log, &[])
        };
        let record = |_: &Path| -> Result<super::super::Process, super::super::Error> {
            panic!("no recording without a snapshot")
        };
        let e = ensure(&plan, &boot, &record, &log, &log).expect_err("not made");
        assert!(e.0.contains("could not be made"), "{}", e.0);
        assert!(e.0.contains("before the snapshot point"), "{}", e.0);
        let again = ensure(&plan, &boot, &record, &log, &log).expect_err("remembered");
        assert!(again.0.contains("an earlier try failed"), "{}", again.0);
        assert_eq!(tries.get(), 1, "not tried twice");
        assert!(!plan.dir.join("state").exists());
        let _ = fs::remove_dir_all(&root);
        let _ = fs::remove_file(&log);
    }

    /// A "VMM" (a shell) that writes `files` into the directory it is
    /// given and says `line`, exiting `code`.
    fn fake_vmm(
        dir: &Path,
        files: &[&str],
        line: &str,
        code: i32,
        log: &Path,
    ) -> Result<super::super::Process, super::super::Error> {
        let mut script = String::new();
        for f in files {
            script.push_str(&format!("echo x > '{}/{f}'; ", dir.display()));
        }
        script.push_str(&format!("echo '{line}' >&2; exit {code}"));
        super::super::Process::spawn(
            "sh",
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            log,
            &[],
        )
    }

    #[test]
    fn a_new_snapshot_is_woken_once_to_record_its_working_set_and_kept_without_one() {
        let root = std::env::temp_dir().join(format!("airlock-snap-ws-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (log, rlog) = (root.with_extension("log"), root.with_extension("rlog"));
        for (name, recorded) in [("a", true), ("b", false)] {
            let plan = Plan {
                key: name.repeat(64),
                dir: root.join(name.repeat(64)),
                boot_words: Vec::new(),
            };
            let boot = |dir: &Path| {
                fake_vmm(
                    dir,
                    &["state", "memory"],
                    "airlock-vmm: snapshot written (25 MiB of memory) after 900.0 ms",
                    0,
                    &log,
                )
            };
            let woken = std::cell::Cell::new(0);
            let record = |dir: &Path| {
                woken.set(woken.get() + 1);
                assert!(
                    dir.join("state").is_file(),
                    "woken after the snapshot is written"
                );
                if recorded {
                    fake_vmm(dir, &[WORKING_SET_FILE], "airlock-vmm: working set recorded: 170 pages, 85 of them written, after 120.0 ms", 0, &rlog)
                } else {
                    // A VMM that wrote part of the file, then failed.
                    fake_vmm(
                        dir,
                        &[WORKING_SET_FILE],
                        "airlock-vmm: error: cannot open /proc/self/pagemap: denied",
                        1,
                        &rlog,
                    )
                }
            };
            assert_eq!(
                ensure(&plan, &boot, &record, &log, &rlog).ok(),
                Some(true),
                "{name}"
            );
            assert_eq!(woken.get(), 1);
            assert!(plan.dir.join("state").is_file() && plan.dir.join("memory").is_file());
            assert_eq!(
                plan.dir.join(WORKING_SET_FILE).is_file(),
                recorded,
                "{name}"
            );
            // Made once: the next run neither boots nor records.
            assert_eq!(ensure(&plan, &boot, &record, &log, &rlog).ok(), Some(false));
            assert_eq!(woken.get(), 1);
        }
        let _ = fs::remove_dir_all(&root);
        let _ = fs::remove_file(&log);
        let _ = fs::remove_file(&rlog);
    }

    #[test]
    fn the_wake_port_answers_each_connection_with_a_fresh_wake_up_to_its_cap() {
        let dir = std::env::temp_dir().join(format!("airlock-wake-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let uds = dir.join("vsock");
        serve_wake(&uds).expect("serve");
        let mut s =
            std::os::unix::net::UnixStream::connect(super::super::port_path(&uds, WAKE_PORT))
                .expect("connect");
        let mut bytes = [0u8; airlock_protocol::wake::SIZE];
        s.read_exact(&mut bytes).expect("read");
        let wake = Wake::decode(&bytes).expect("a wake");
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("now")
            .as_secs();
        assert!(wake.unix_secs <= now && wake.unix_secs + 5 >= now);
        assert_ne!(wake.entropy, [0; 32]);
        let second = fresh_wake().expect("wake");
        assert_ne!(second.entropy, wake.entropy, "fresh each time");
        // A guest that lost its first answer asks again: a fresh one, up
        // to MAX_WAKES in all; then the port is gone.
        let port = super::super::port_path(&uds, WAKE_PORT);
        let mut seen = vec![wake.entropy];
        for _ in 1..MAX_WAKES {
            let mut s = std::os::unix::net::UnixStream::connect(&port).expect("again");
            s.read_exact(&mut bytes).expect("read again");
            let again = Wake::decode(&bytes).expect("a wake again");
            assert!(!seen.contains(&again.entropy), "fresh each time");
            seen.push(again.entropy);
        }
        let refused = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            std::os::unix::net::UnixStream::connect(&port).is_err()
        });
        assert!(refused, "no answer after {MAX_WAKES}");
        let _ = fs::remove_dir_all(&dir);
    }
}
