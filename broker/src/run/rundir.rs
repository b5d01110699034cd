//! The run's private directory and the stop signals.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::*;

/// The private directory of one run (mode 0700, made fresh): the console
/// log (unless the user named a file), the control and engine sockets, the
/// engine logs. Removed on drop unless kept.
#[derive(Debug)]
pub(crate) struct RunDir {
    pub(crate) dir: PathBuf,
    pub(crate) console: PathBuf,
    /// Keep the directory (with the console log) at the end.
    pub(crate) keep: bool,
    /// The console is the user's own file.
    pub(crate) user_console: bool,
}

impl RunDir {
    /// Makes the directory and creates (or truncates) the console file, so
    /// that a bad path is found before the VM starts and no stale content
    /// is shown.
    pub(crate) fn create(target: &ConsoleTarget) -> Result<RunDir, Error> {
        let dir = make_private_dir(&std::env::temp_dir())?;
        let run_dir = match target {
            ConsoleTarget::File(path) => RunDir {
                dir,
                console: path.clone(),
                keep: false,
                user_console: true,
            },
            ConsoleTarget::Temp { keep } => RunDir {
                console: dir.join("console.log"),
                dir,
                keep: *keep,
                user_console: false,
            },
        };
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&run_dir.console)
            .map_err(|source| Error::ConsoleLog {
                path: run_dir.console.clone(),
                source,
            })?;
        Ok(run_dir)
    }

    /// Returns the console path if it is kept (the run directory, minus its
    /// sockets, stays with it when it lives there).
    pub(crate) fn finish(self) -> Option<PathBuf> {
        if self.keep {
            if let Ok(entries) = fs::read_dir(&self.dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_socket()) {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
        (self.keep || self.user_console).then(|| self.console.clone())
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Creates a fresh directory only we can read, under `parent`.
pub(crate) fn make_private_dir(parent: &Path) -> Result<PathBuf, Error> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    for attempt in 0..16u32 {
        let dir = parent.join(format!(
            "airlock-run.{}.{:08x}",
            std::process::id(),
            stamp.wrapping_add(attempt.wrapping_mul(0x9e37_79b9))
        ));
        // create (not create_all): fails if the name exists, so we never
        // reuse a directory someone else prepared.
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
            Err(source) => {
                return Err(Error::RunDir {
                    dir: parent.to_path_buf(),
                    source,
                })
            }
        }
    }
    Err(Error::RunDir {
        dir: parent.to_path_buf(),
        source: last,
    })
}

/// Set by SIGINT, SIGTERM or SIGHUP to the signal's number.
#[derive(Debug)]
pub(crate) struct StopSignal(pub(crate) Arc<AtomicUsize>);

impl StopSignal {
    pub(crate) fn install() -> io::Result<StopSignal> {
        let flag = Arc::new(AtomicUsize::new(0));
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let value = usize::try_from(signal).map_err(io::Error::other)?;
            signal_hook::flag::register_usize(signal, Arc::clone(&flag), value)?;
        }
        Ok(StopSignal(flag))
    }

    pub(crate) fn received(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            signal => i32::try_from(signal).ok(),
        }
    }
}
