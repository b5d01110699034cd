//! Live mounts (`--mount`, `-v`): host directories and files shared with
//! the agent's container while it runs, through the vsock door
//! (docs/LIVE-MOUNTS.md).
//!
//! The guest kernel's FUSE client speaks to `/dev/fuse`; the init pumps
//! each mount's requests over one connection to [`MOUNTS_PORT`]. The
//! broker accepts those connections on its port server and hands each one
//! (its descriptor) to the **share server**: a process of its own per
//! sandbox ([`child`]: `airlock share-server`), jailed in a mount
//! namespace that holds only the mount sources, which answers with
//! `fuse-backend-rs`'s passthrough file system under our rules ([`fs`]).
//! The broker records what the server reports (`mount.refused`,
//! `mount.done`).
//!
//! - [`spec`]: the options, checked before any VM starts.
//! - [`fs`]: the rules every request meets (names, deny list, read-only,
//!   ownership, bounds, counts, cache coherence).
//! - [`serve`]: one connection's FUSE stream.
//! - [`child`]: the server process and its jail.
//! - [`sock`]: the broker ↔ server channel (descriptors and events).

pub mod child;
pub mod fs;
pub mod serve;
pub mod sock;
pub mod spec;
#[cfg(test)]
mod tests;

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use airlock_protocol::MOUNTS_PORT;

use crate::audit::records::{MountFailed, MountRefused, PortFailed};
use crate::audit::{AuditLog, Durability};
use crate::door::ports::{Accepted, Admit, Port};
use child::{Event, ServerConfig, CHANNEL_FD};
pub use spec::MountSpec;

/// How long the server may take to jail itself and say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to end once the VM is gone.
const END_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections the mounts port takes in one run: one per mount
/// plus room for what a hostile guest tries (each refused and audited).
const MAX_CONNECTIONS: u64 = 256;

/// The share server of one run, running. Dropping it closes its channel,
/// lets its connections end, records their counts and reaps it.
#[derive(Debug)]
pub struct ShareServer {
    child: Option<Child>,
    chan: Arc<OwnedFd>,
    events: Option<JoinHandle<()>>,
}

impl ShareServer {
    /// Starts the server for `mounts` (made and jailed before this
    /// returns), its root on an empty directory made in `run_dir`.
    pub fn start(
        mounts: &[MountSpec],
        exclude: &[String],
        run_dir: &Path,
        audit: &AuditLog,
    ) -> io::Result<ShareServer> {
        let root = run_dir.join("shares");
        std::fs::create_dir(&root)?;
        let config = ServerConfig {
            root,
            exclude: exclude.to_vec(),
            mounts: mounts.to_vec(),
        };
        let (ours, theirs) = sock::pair()?;
        let exe = std::env::current_exe()?;
        let theirs_fd = theirs.as_raw_fd();
        let mut command = Command::new(exe);
        command
            .arg("share-server")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: between fork and exec only async-signal-safe calls: dup2
        // (which clears close-on-exec on the copy) and prctl.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(theirs_fd, CHANNEL_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Dies with the broker.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn()?;
        drop(theirs);
        if let Some(mut stdin) = child.stdin.take() {
            let text = serde_json::to_vec(&config).map_err(io::Error::other)?;
            stdin.write_all(&text)?;
        }
        let chan = Arc::new(ours);
        let ready = wait_ready(&chan, READY_TIMEOUT);
        if let Err(e) = ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let events = std::thread::Builder::new()
            .name("share-events".into())
            .spawn({
                let (chan, audit) = (Arc::clone(&chan), audit.clone());
                move || record_events(&chan, &audit)
            })?;
        Ok(ShareServer {
            child: Some(child),
            chan,
            events: Some(events),
        })
    }

    /// The mounts port: each connection goes to the server as it comes.
    pub fn port(&self, listener: std::os::unix::net::UnixListener, audit: &AuditLog) -> Port {
        let chan = Arc::clone(&self.chan);
        let audit = audit.clone();
        Port {
            number: MOUNTS_PORT,
            listener,
            admit: Admit::Each {
                max: MAX_CONNECTIONS,
                room: Box::new(|| true),
            },
            handler: Box::new(move |accepted| match accepted {
                Accepted::Stream(stream) => {
                    if let Err(e) = sock::send(chan.as_ref(), b"c", Some(stream.as_raw_fd())) {
                        audit.record(
                            &PortFailed {
                                port: MOUNTS_PORT,
                                error: format!("handing to the share server: {e}"),
                            },
                            Durability::Synced,
                        );
                    }
                }
                Accepted::Refused(_) | Accepted::Capped(_) | Accepted::Failed(_) => {}
            }),
        }
    }
}

/// Waits for the server's `Ready` (or its error).
fn wait_ready(chan: &OwnedFd, timeout: Duration) -> io::Result<()> {
    use std::os::fd::FromRawFd;
    // A view of the channel for its read timeout (SO_RCVTIMEO), never
    // closed through it.
    // SAFETY: `chan` outlives the view, which ManuallyDrop never closes.
    let view = std::mem::ManuallyDrop::new(unsafe {
        std::os::unix::net::UnixDatagram::from_raw_fd(chan.as_raw_fd())
    });
    view.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0u8; sock::MAX_MESSAGE];
    let got = sock::recv(chan, &mut buf);
    view.set_read_timeout(None)?;
    let (n, _) =
        got.map_err(|e| io::Error::new(e.kind(), format!("the share server did not start: {e}")))?;
    match serde_json::from_slice::<Event>(&buf[..n]) {
        Ok(Event::Ready) => Ok(()),
        Ok(Event::Error(e)) => Err(io::Error::other(format!("the share server failed: {e}"))),
        _ => Err(io::Error::other("the share server did not start")),
    }
}

/// Records the server's events until it closes the channel.
fn record_events(chan: &OwnedFd, audit: &AuditLog) {
    let mut buf = vec![0u8; sock::MAX_MESSAGE];
    loop {
        let n = match sock::recv(chan, &mut buf) {
            Ok((0, _)) | Err(_) => return,
            Ok((n, _)) => n,
        };
        match serde_json::from_slice::<Event>(&buf[..n]) {
            Ok(Event::Refused { index, why }) => {
                audit.record(&MountRefused { index, why }, Durability::Synced)
            }
            Ok(Event::Done(done)) => audit.record(&done, Durability::Synced),
            Ok(Event::Error(error)) => audit.record(&MountFailed { error }, Durability::Synced),
            Ok(Event::Ready) | Err(_) => {}
        }
    }
}

impl Drop for ShareServer {
    fn drop(&mut self) {
        // No more connections: the server finishes the ones it has (the
        // VM is gone, so they end), reports, and exits.
        // SAFETY: shutdown of our own socket.
        unsafe { libc::shutdown(self.chan.as_raw_fd(), libc::SHUT_WR) };
        let deadline = Instant::now() + END_TIMEOUT;
        if let Some(mut child) = self.child.take() {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        if let Some(events) = self.events.take() {
            // The server is gone: its end of the channel is closed.
            let _ = events.join();
        }
    }
}
