//! Finding the files a sandbox needs: the Airlock home (holding `build/`),
//! the guest kernel and initrd, and the engine binaries.
//!
//! The resolution rules are pure functions over the environment they are
//! given; the `*_from_env` wrappers read the real one.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Default kernel, relative to the Airlock home.
pub const DEFAULT_KERNEL: &str = "build/vmlinux";
/// Default initrd, relative to the Airlock home.
pub const DEFAULT_INITRD: &str = "build/initramfs.cpio";
/// The root image under the Airlock home (`scripts/build-image.sh`): the
/// default whenever it exists and no initrd was asked for.
pub const DEFAULT_ROOTFS: &str = "build/rootfs.img";
/// Our VMM's binary name.
pub const VMM_BINARY: &str = "airlock-vmm";
/// QEMU's binary name (Debian package `qemu-system-x86`).
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// The vhost-user vsock backend the tcg engine runs next to QEMU (crate
/// `vhost-device-vsock`, installed by `scripts/build.sh`).
pub const VHOST_VSOCK_BINARY: &str = "vhost-device-vsock";
/// The version `scripts/build.sh` installs (docs/FACTS.md: it builds here and works).
pub const VHOST_VSOCK_VERSION: &str = "0.3.0";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel not found at {0} (run scripts/build-kernel.sh or pass --kernel)")]
    KernelNotFound(PathBuf),
    #[error("kernel at {0} is not a regular file (pass the vmlinux file with --kernel)")]
    KernelNotFile(PathBuf),
    #[error(
        "kernel at {0} is not an ELF file (pass the uncompressed vmlinux, not a bzImage, with --kernel)"
    )]
    KernelNotElf(PathBuf),
    #[error("kernel at {0} is a 32-bit ELF file (build it with ARCH=x86_64)")]
    KernelNot64Bit(PathBuf),
    #[error("cannot read the kernel at {path}")]
    KernelUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("initrd not found at {0} (run scripts/build-initramfs.sh or pass --initrd)")]
    InitrdNotFound(PathBuf),
    #[error("initrd at {0} is not a regular file (pass the cpio archive with --initrd)")]
    InitrdNotFile(PathBuf),
    #[error("root image not found at {0} (run scripts/build-image.sh or pass --image-root)")]
    RootNotFound(PathBuf),
    #[error("root image at {0} is not a regular file (pass the erofs image with --image-root)")]
    RootNotFile(PathBuf),
    #[error(
        "{VMM_BINARY} not found in $AIRLOCK_VMM, next to the airlock binary or in PATH \
         (build it with scripts/build.sh, or set AIRLOCK_VMM)"
    )]
    VmmNotFound,
    #[error("$AIRLOCK_VMM is {0}, which is not an executable file (fix or unset AIRLOCK_VMM)")]
    VmmEnvNotExecutable(PathBuf),
    #[error("{QEMU_BINARY} not found in PATH (install Debian package qemu-system-x86)")]
    QemuNotFound,
    #[error(
        "{VHOST_VSOCK_BINARY} not found in $AIRLOCK_VHOST_VSOCK, $AIRLOCK_CACHE/tools/bin or PATH \
         (install it with scripts/build.sh, or: cargo install --locked --root ~/.cache/airlock/tools \
         {VHOST_VSOCK_BINARY} --version {VHOST_VSOCK_VERSION})"
    )]
    VhostVsockNotFound,
    #[error(
        "$AIRLOCK_VHOST_VSOCK is {0}, which is not an executable file (fix or unset AIRLOCK_VHOST_VSOCK)"
    )]
    VhostVsockEnvNotExecutable(PathBuf),
}

/// The Airlock home: `$AIRLOCK_HOME` if set; else the nearest directory,
/// walking up from the airlock executable's directory, that `is_home`; else `cwd`.
pub fn resolve_home(
    env_home: Option<OsString>,
    exe: Option<&Path>,
    cwd: &Path,
    is_home: impl Fn(&Path) -> bool,
) -> PathBuf {
    if let Some(home) = env_home.filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    exe.and_then(Path::parent)
        .and_then(|dir| dir.ancestors().find(|d| is_home(d)))
        .map_or_else(|| cwd.to_path_buf(), Path::to_path_buf)
}

/// A directory is an Airlock home when it holds a `build/` directory and is
/// not one of cargo's profile directories (`target/debug` has a `build/` of
/// its own, next to `.fingerprint/`).
fn looks_like_home(dir: &Path) -> bool {
    dir.join("build").is_dir() && !dir.join(".fingerprint").exists()
}

/// [`resolve_home`] over the real environment.
pub fn home_from_env() -> PathBuf {
    let exe = env::current_exe().ok();
    let cwd = env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    resolve_home(
        env::var_os("AIRLOCK_HOME"),
        exe.as_deref(),
        &cwd,
        looks_like_home,
    )
}

/// A guest image file: the command-line flag, else the environment
/// variable, else `default` under `home`.
pub fn resolve_image(
    flag: Option<PathBuf>,
    env_value: Option<OsString>,
    home: &Path,
    default: &str,
) -> PathBuf {
    flag.or_else(|| env_value.filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| home.join(default))
}

/// Kernel and initrd paths, resolved and made absolute (they are handed to
/// a process that may not share our idea of relative paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePaths {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The erofs root image: `Some` in image mode, when the initrd is not
    /// booted.
    pub root: Option<PathBuf>,
}

impl ImagePaths {
    /// Resolves the paths from the flags and the real environment (no checks).
    pub fn from_env(
        kernel: Option<PathBuf>,
        initrd: Option<PathBuf>,
        image_root: Option<PathBuf>,
    ) -> ImagePaths {
        let home = home_from_env();
        let root = resolve_root(
            image_root,
            initrd.is_some(),
            env::var_os("AIRLOCK_ROOTFS"),
            env::var_os("AIRLOCK_INITRD").is_some_and(|v| !v.is_empty()),
            &home,
        );
        let kernel = resolve_image(kernel, env::var_os("AIRLOCK_KERNEL"), &home, DEFAULT_KERNEL);
        let initrd = resolve_image(initrd, env::var_os("AIRLOCK_INITRD"), &home, DEFAULT_INITRD);
        ImagePaths {
            kernel: std::path::absolute(&kernel).unwrap_or(kernel),
            initrd: std::path::absolute(&initrd).unwrap_or(initrd),
            root: root.map(|r| std::path::absolute(&r).unwrap_or(r)),
        }
    }
}

/// Image mode or initramfs mode, and the image: `--image-root`, else none
/// if `--initrd` was given, else `$AIRLOCK_ROOTFS`, else none if
/// `$AIRLOCK_INITRD` is set, else [`DEFAULT_ROOTFS`] under `home` if that
/// file exists, else none (the default initrd boots).
pub fn resolve_root(
    flag: Option<PathBuf>,
    initrd_flag: bool,
    env_value: Option<OsString>,
    initrd_env: bool,
    home: &Path,
) -> Option<PathBuf> {
    if flag.is_some() {
        return flag;
    }
    if initrd_flag {
        return None;
    }
    if let Some(value) = env_value.filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(value));
    }
    if initrd_env {
        return None;
    }
    Some(home.join(DEFAULT_ROOTFS)).filter(|p| p.is_file())
}

/// Checks that the root image exists and is a regular file.
pub fn check_root(path: &Path) -> Result<(), Error> {
    match path.metadata() {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(Error::RootNotFile(path.to_path_buf())),
        Err(_) => Err(Error::RootNotFound(path.to_path_buf())),
    }
}

/// What the first bytes of a kernel file say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElfKind {
    Elf64,
    Elf32,
    NotElf,
}

/// Classifies a file by its ELF identification bytes (`\x7fELF`, then the class).
pub fn elf_kind(header: &[u8]) -> ElfKind {
    const ELFCLASS32: u8 = 1;
    const ELFCLASS64: u8 = 2;
    match header {
        [0x7f, b'E', b'L', b'F', ELFCLASS64, ..] => ElfKind::Elf64,
        [0x7f, b'E', b'L', b'F', ELFCLASS32, ..] => ElfKind::Elf32,
        _ => ElfKind::NotElf,
    }
}

/// Checks that the kernel exists, is a regular file and an ELF64 file.
pub fn check_kernel(path: &Path) -> Result<(), Error> {
    let meta = match path.metadata() {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::KernelNotFound(path.to_path_buf()))
        }
        Err(source) => {
            return Err(Error::KernelUnreadable {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.is_file() {
        return Err(Error::KernelNotFile(path.to_path_buf()));
    }
    let unreadable = |source| Error::KernelUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut header = Vec::with_capacity(5);
    File::open(path)
        .and_then(|f| f.take(5).read_to_end(&mut header))
        .map_err(unreadable)?;
    match elf_kind(&header) {
        ElfKind::Elf64 => Ok(()),
        ElfKind::Elf32 => Err(Error::KernelNot64Bit(path.to_path_buf())),
        ElfKind::NotElf => Err(Error::KernelNotElf(path.to_path_buf())),
    }
}

/// Checks that the initrd exists and is a regular file. Its content is the
/// guest kernel's business.
pub fn check_initrd(path: &Path) -> Result<(), Error> {
    match path.metadata() {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(Error::InitrdNotFile(path.to_path_buf())),
        Err(_) => Err(Error::InitrdNotFound(path.to_path_buf())),
    }
}

fn is_executable_file(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first executable `name` in the directories of a `PATH` value.
pub fn find_in_path(name: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    env::split_paths(path_var?)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

/// Finds `airlock-vmm`: `$AIRLOCK_VMM` if set (an explicit choice wins),
/// else next to the airlock executable, else in `PATH`.
pub fn find_vmm() -> Result<PathBuf, Error> {
    if let Some(value) = env::var_os("AIRLOCK_VMM").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        return if is_executable_file(&path) {
            Ok(path)
        } else {
            Err(Error::VmmEnvNotExecutable(path))
        };
    }
    if let Some(sibling) = env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(VMM_BINARY)))
        .filter(|p| is_executable_file(p))
    {
        return Ok(sibling);
    }
    find_in_path(VMM_BINARY, env::var_os("PATH").as_deref()).ok_or(Error::VmmNotFound)
}

/// Finds `qemu-system-x86_64` in `PATH`.
pub fn find_qemu() -> Result<PathBuf, Error> {
    find_in_path(QEMU_BINARY, env::var_os("PATH").as_deref()).ok_or(Error::QemuNotFound)
}

/// Airlock's cache directory, as `scripts/lib.sh` computes it:
/// `$AIRLOCK_CACHE`, else `${XDG_CACHE_HOME:-$HOME/.cache}/airlock`. `None`
/// when none of them is set. (Like the shell, an empty value counts as unset.)
pub fn cache_dir(
    airlock_cache: Option<OsString>,
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    set(airlock_cache).or_else(|| {
        set(xdg_cache_home)
            .or_else(|| set(home).map(|h| h.join(".cache")))
            .map(|c| c.join("airlock"))
    })
}

/// Where `vhost-device-vsock` is looked for, in order: `$AIRLOCK_VHOST_VSOCK`
/// (an explicit choice wins, and must be executable), else
/// `<cache>/tools/bin/vhost-device-vsock` (where `scripts/build.sh` installs
/// it), else `PATH`. Pure over the values given.
pub fn resolve_vhost_vsock(
    env_value: Option<OsString>,
    cache: Option<&Path>,
    path_var: Option<&OsStr>,
    is_executable: impl Fn(&Path) -> bool,
) -> Result<PathBuf, Error> {
    if let Some(value) = env_value.filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(Error::VhostVsockEnvNotExecutable(path))
        };
    }
    if let Some(cached) = cache
        .map(|c| c.join("tools/bin").join(VHOST_VSOCK_BINARY))
        .filter(|p| is_executable(p))
    {
        return Ok(cached);
    }
    env::split_paths(path_var.ok_or(Error::VhostVsockNotFound)?)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(VHOST_VSOCK_BINARY))
        .find(|candidate| is_executable(candidate))
        .ok_or(Error::VhostVsockNotFound)
}

/// Finds `vhost-device-vsock` in the real environment ([`resolve_vhost_vsock`]).
pub fn find_vhost_vsock() -> Result<PathBuf, Error> {
    let cache = cache_dir(
        env::var_os("AIRLOCK_CACHE"),
        env::var_os("XDG_CACHE_HOME"),
        env::var_os("HOME"),
    );
    resolve_vhost_vsock(
        env::var_os("AIRLOCK_VHOST_VSOCK"),
        cache.as_deref(),
        env::var_os("PATH").as_deref(),
        is_executable_file,
    )
}

/// Whether `path` (which need not exist yet) is `dir` or lies below it,
/// however either is spelled: the nearest existing ancestor of `path` (its
/// symlinks resolved) and each of that one's parents are compared with
/// `dir` by device and inode, so `..`, symlinks and bind mounts of `dir`
/// are all seen through.
pub fn is_within(dir: &Path, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let target = std::fs::metadata(dir)?;
    let id = (target.dev(), target.ino());
    let absolute = std::path::absolute(path)?;
    let mut probe = absolute.as_path();
    // The nearest part of the path that exists.
    let existing = loop {
        match probe.canonicalize() {
            Ok(p) => break p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => match probe.parent() {
                Some(parent) => probe = parent,
                None => return Ok(false),
            },
            Err(e) => return Err(e),
        }
    };
    let mut cur = existing.as_path();
    loop {
        let meta = std::fs::metadata(cur)?;
        if (meta.dev(), meta.ino()) == id {
            return Ok(true);
        }
        match cur.parent() {
            Some(parent) => cur = parent,
            None => return Ok(false),
        }
    }
}

/// A fresh, empty directory under the system temp dir, removed on drop.
#[cfg(test)]
pub(crate) struct TestDir(PathBuf);

#[cfg(test)]
impl TestDir {
    pub(crate) fn new(name: &str) -> TestDir {
        let dir = env::temp_dir().join(format!(
            "airlock-test-{}-{name}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        TestDir(dir)
    }
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn paths_within_a_directory_are_seen_through_symlinks_and_dotdot() {
        let dir = TestDir::new("within");
        let d = dir.path();
        let out = d.join("out");
        fs::create_dir_all(out.join("sub")).expect("mkdir");
        fs::create_dir_all(d.join("elsewhere")).expect("mkdir");
        std::os::unix::fs::symlink(&out, d.join("alias")).expect("symlink");
        for inside in [
            out.join("audit.jsonl"),
            out.join("sub/deeper/not-yet/audit.jsonl"),
            d.join("alias/audit.jsonl"),
            d.join("elsewhere/../out/audit.jsonl"),
            out.clone(),
        ] {
            assert!(
                is_within(&out, &inside).expect("check"),
                "{}",
                inside.display()
            );
        }
        for outside in [
            d.join("audit.jsonl"),
            d.join("elsewhere/audit.jsonl"),
            d.join("outx/audit.jsonl"),
        ] {
            assert!(
                !is_within(&out, &outside).expect("check"),
                "{}",
                outside.display()
            );
        }
    }

    #[test]
    fn image_or_initramfs_mode() {
        let dir = TestDir::new("root-mode");
        let home = dir.path();
        let none = || None::<PathBuf>;
        // No image built: the initrd boots.
        assert_eq!(resolve_root(none(), false, None, false, home), None);
        fs::create_dir_all(home.join("build")).expect("mkdir");
        fs::write(home.join(DEFAULT_ROOTFS), b"x").expect("write");
        assert_eq!(
            resolve_root(none(), false, None, false, home),
            Some(home.join(DEFAULT_ROOTFS))
        );
        // An initrd asked for means initramfs mode.
        assert_eq!(resolve_root(none(), true, None, false, home), None);
        assert_eq!(resolve_root(none(), false, None, true, home), None);
        assert_eq!(
            resolve_root(none(), true, Some("/e.img".into()), false, home),
            None
        );
        // The flag beats everything; the env var beats $AIRLOCK_INITRD.
        assert_eq!(
            resolve_root(Some("/f.img".into()), false, None, true, home),
            Some("/f.img".into())
        );
        assert_eq!(
            resolve_root(none(), false, Some("/e.img".into()), true, home),
            Some("/e.img".into())
        );
    }

    #[test]
    fn home_from_env_var_wins() {
        let home = resolve_home(
            Some("/opt/airlock".into()),
            Some(Path::new("/repo/target/debug/airlock")),
            Path::new("/cwd"),
            |_| true,
        );
        assert_eq!(home, Path::new("/opt/airlock"));
    }

    #[test]
    fn home_walks_up_from_the_executable() {
        let is_home = |d: &Path| d == Path::new("/repo");
        let exe = Path::new("/repo/target/debug/airlock");
        assert_eq!(
            resolve_home(None, Some(exe), Path::new("/cwd"), is_home),
            Path::new("/repo")
        );
        // An empty AIRLOCK_HOME counts as unset.
        assert_eq!(
            resolve_home(Some("".into()), Some(exe), Path::new("/cwd"), is_home),
            Path::new("/repo")
        );
    }

    #[test]
    fn home_falls_back_to_cwd() {
        let exe = Path::new("/usr/bin/airlock");
        assert_eq!(
            resolve_home(None, Some(exe), Path::new("/cwd"), |_| false),
            Path::new("/cwd")
        );
        assert_eq!(
            resolve_home(None, None, Path::new("/cwd"), |_| true),
            Path::new("/cwd")
        );
    }

    #[test]
    fn cargo_profile_dir_is_not_home() {
        let root = TestDir::new("home");
        let repo = root.path();
        fs::create_dir_all(repo.join("build")).expect("mkdir");
        fs::create_dir_all(repo.join("target/debug/build")).expect("mkdir");
        fs::create_dir_all(repo.join("target/debug/.fingerprint")).expect("mkdir");
        let exe = repo.join("target/debug/airlock");
        let home = resolve_home(None, Some(&exe), Path::new("/cwd"), looks_like_home);
        assert_eq!(home, repo);
    }

    #[test]
    fn image_precedence() {
        let home = Path::new("/repo");
        assert_eq!(
            resolve_image(Some("/k".into()), Some("/env".into()), home, DEFAULT_KERNEL),
            Path::new("/k")
        );
        assert_eq!(
            resolve_image(None, Some("/env".into()), home, DEFAULT_KERNEL),
            Path::new("/env")
        );
        assert_eq!(
            resolve_image(None, Some("".into()), home, DEFAULT_KERNEL),
            Path::new("/repo/build/vmlinux")
        );
        assert_eq!(
            resolve_image(None, None, home, DEFAULT_INITRD),
            Path::new("/repo/build/initramfs.cpio")
        );
    }

    #[test]
    fn elf_magic() {
        assert_eq!(elf_kind(b"\x7fELF\x02\x01\x01"), ElfKind::Elf64);
        assert_eq!(elf_kind(b"\x7fELF\x01\x01\x01"), ElfKind::Elf32);
        assert_eq!(elf_kind(b"\x7fELF"), ElfKind::NotElf);
        assert_eq!(elf_kind(b"MZ\x90\x00\x03"), ElfKind::NotElf);
        assert_eq!(elf_kind(b""), ElfKind::NotElf);
    }

    #[test]
    fn kernel_checks() {
        let dir = TestDir::new("kernel");
        let good = dir.path().join("vmlinux");
        fs::write(&good, b"\x7fELF\x02\x01\x01\x00rest").expect("write");
        assert!(check_kernel(&good).is_ok());

        let bz = dir.path().join("bzImage");
        fs::write(&bz, b"MZ not an elf").expect("write");
        assert!(matches!(check_kernel(&bz), Err(Error::KernelNotElf(_))));

        let short = dir.path().join("short");
        fs::write(&short, b"\x7fE").expect("write");
        assert!(matches!(check_kernel(&short), Err(Error::KernelNotElf(_))));

        let elf32 = dir.path().join("vmlinux32");
        fs::write(&elf32, b"\x7fELF\x01\x01").expect("write");
        assert!(matches!(
            check_kernel(&elf32),
            Err(Error::KernelNot64Bit(_))
        ));

        let missing = dir.path().join("missing");
        let err = check_kernel(&missing).expect_err("missing");
        assert!(matches!(err, Error::KernelNotFound(_)));
        assert!(err.to_string().contains("scripts/build-kernel.sh"));

        assert!(matches!(
            check_kernel(dir.path()),
            Err(Error::KernelNotFile(_))
        ));
    }

    #[test]
    fn initrd_checks() {
        let dir = TestDir::new("initrd");
        let cpio = dir.path().join("initramfs.cpio");
        fs::write(&cpio, b"070701").expect("write");
        assert!(check_initrd(&cpio).is_ok());
        assert!(matches!(
            check_initrd(&dir.path().join("nope")),
            Err(Error::InitrdNotFound(_))
        ));
        assert!(matches!(
            check_initrd(dir.path()),
            Err(Error::InitrdNotFile(_))
        ));
    }

    #[test]
    fn cache_dir_mirrors_lib_sh() {
        let some = |s: &str| Some(OsString::from(s));
        assert_eq!(
            cache_dir(some("/c"), some("/x"), some("/h")),
            Some("/c".into())
        );
        assert_eq!(
            cache_dir(None, some("/x"), some("/h")),
            Some("/x/airlock".into())
        );
        assert_eq!(
            cache_dir(some(""), some(""), some("/h")),
            Some("/h/.cache/airlock".into())
        );
        assert_eq!(cache_dir(None, None, None), None);
    }

    #[test]
    fn vhost_vsock_precedence() {
        let exists = |p: &Path| {
            [
                "/env/vhost",
                "/cache/tools/bin/vhost-device-vsock",
                "/usr/bin/vhost-device-vsock",
            ]
            .iter()
            .any(|e| p == Path::new(e))
        };
        let path_var = OsString::from("/nope:/usr/bin");
        let path_var = Some(path_var.as_os_str());
        let cache = Some(Path::new("/cache"));
        assert_eq!(
            resolve_vhost_vsock(Some("/env/vhost".into()), cache, path_var, exists).expect("env"),
            Path::new("/env/vhost")
        );
        assert!(matches!(
            resolve_vhost_vsock(Some("/env/missing".into()), cache, path_var, exists),
            Err(Error::VhostVsockEnvNotExecutable(_))
        ));
        assert_eq!(
            resolve_vhost_vsock(None, cache, path_var, exists).expect("cache"),
            Path::new("/cache/tools/bin/vhost-device-vsock")
        );
        assert_eq!(
            resolve_vhost_vsock(Some("".into()), Some(Path::new("/other")), path_var, exists)
                .expect("path"),
            Path::new("/usr/bin/vhost-device-vsock")
        );
        let err = resolve_vhost_vsock(None, None, None, exists).expect_err("none");
        assert!(err.to_string().contains("scripts/build.sh"), "{err}");
    }

    #[test]
    fn path_search() {
        let dir = TestDir::new("path");
        let bin = dir.path().join("bin");
        fs::create_dir_all(&bin).expect("mkdir");
        let tool = bin.join("tool");
        fs::write(&tool, b"#!/bin/sh\n").expect("write");
        let not_exec = bin.join("data");
        fs::write(&not_exec, b"x").expect("write");
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::set_permissions(&not_exec, fs::Permissions::from_mode(0o644)).expect("chmod");
        let path_var = env::join_paths([Path::new("/nonexistent"), &bin]).expect("join");
        assert_eq!(find_in_path("tool", Some(&path_var)), Some(tool));
        assert_eq!(find_in_path("data", Some(&path_var)), None);
        assert_eq!(find_in_path("tool", None), None);
    }
}
