//! The Airlock host/guest RPC, protocol version 1 (see `PROTOCOL.md`).
//!
//! This crate holds only types, limits, the version and the codec; it owns
//! no sockets and makes no policy. [`encode`] and [`decode_body`] are pure;
//! [`read_frame`] and [`write_frame`] frame one message over any blocking
//! `std::io` stream, for the guest init and the host broker alike.
//!
//! - [`limits`]: every limit, as a named constant.
//! - `wire`: the field encoding (a bounds-checked cursor, and its writer).
//! - `message`: [`Message`] and its payloads.
//! - `frame`: the length prefix, [`encode`], [`decode_body`], the I/O helpers.
//!
//! The encoder enforces the decoder's rules, so an honest peer never sends a
//! frame the other side rejects; every decoded message re-encodes to the
//! bytes it came from.

pub mod egress;
mod frame;
pub mod limits;
mod message;
mod wire;

#[cfg(test)]
mod proptests;

pub use frame::{
    body_len, decode_body, encode, read_frame, write_frame, DecodeError, EncodeError, FrameError,
};
pub use message::{
    check_exec_user, check_file_path, check_mount, check_run_as, ErrorCode, ExitStatus, FileEntry,
    FileKind, Message, MessageError, MountEntry, RunSpec,
};
pub use wire::WireError;

/// Protocol version spoken by this build. Bumped on any wire change.
pub const PROTOCOL_VERSION: u32 = 1;

/// The host's vsock CID as seen from the guest (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;

/// The default guest CID Airlock gives a sandbox.
pub const DEFAULT_GUEST_CID: u32 = 3;

/// Capabilities a `Hello` may list. A message kind added to version 1
/// after its first release is sent only to a peer whose `Hello` listed
/// its capability, so that a peer without it never sees the new tag.
pub mod capability {
    /// The host takes `AuditEvent` messages (and the guest can send them).
    pub const AUDIT: &str = "audit";
    /// Both sides speak the file-stream messages (`FileEntry`, `FileData`,
    /// `FileEnd`, `FilesDone`) on the file ports.
    pub const FILES: &str = "files";
    /// Host only: it has a workspace for the guest to fetch from
    /// [`crate::FILES_IN_PORT`] before the command starts.
    pub const WORKSPACE: &str = "workspace";
    /// Host only: it wants the guest's `/workspace/out` on
    /// [`crate::FILES_OUT_PORT`] after the command exits.
    pub const RESULTS: &str = "results";
    /// Both sides relay model calls (`HttpRequest`, `HttpResponse`,
    /// `HttpBody`, `HttpEnd`) on [`crate::MODEL_PORT`]: in the host's
    /// `Hello`, the host serves that port; in the guest's, the guest can run
    /// the in-guest model endpoint.
    pub const MODEL: &str = "model";
    /// In the guest's `Hello`: it understands `Collect` (results chosen by
    /// patterns). In the host's (only with `results`, and only if the
    /// guest listed it): a `Collect` follows the `RunSpec`.
    pub const COLLECT: &str = "collect";
    /// In the guest's `Hello`: it can serve exec connections. In the
    /// host's (only if the guest listed it): while the command runs, the
    /// guest accepts the host's connections to [`crate::EXEC_PORT`], each
    /// one more command in the same sandbox (a live sandbox's `airlock
    /// exec`).
    pub const EXEC: &str = "exec";
    /// In the guest's `Hello` on an exec connection: it takes an
    /// `ExecUser` after the `RunSpec`; in the host's: one follows.
    pub const USER: &str = "user";
    /// In the guest's `Hello`: it can run the container as a given user.
    /// In the host's (only if the guest listed it, and only when the host
    /// has a user to set): a `RunAs` follows the `RunSpec` (and the
    /// `Collect`, if any).
    pub const RUN_AS: &str = "run-as";
    /// In the guest's `Hello`: it can mount live shares. In the host's
    /// (only if the guest listed it, and only when the run has mounts): a
    /// `Mounts` follows the `RunAs` (or what precedes it).
    pub const MOUNTS: &str = "mounts";
    /// In the guest's `Hello`: it can run the egress proxy. In the host's
    /// (only if the guest listed it): the host serves [`crate::EGRESS_PORT`]
    /// under its egress policy (default deny), and the guest runs the
    /// proxy for the agent.
    pub const EGRESS: &str = "egress";
}

/// Host port the guest init connects to for the control connection.
pub const CONTROL_PORT: u32 = 1024;

/// How the guest init's console line begins its error when it could not
/// open the control connection (`airlock-init: error: ` + this + ` (vsock
/// cid 2 port 1024): ` + why). The host looks for it on the console of a
/// guest that stopped before it connected: on the tcg engine it means
/// the vsock device never answered (see the broker's `run` module), and
/// that boot is tried once more.
pub const CONNECT_FAILED: &str = "failed to connect to the host";

/// Host port the guest init connects to, after the `RunSpec`, to read the
/// workspace (host → guest file stream).
pub const FILES_IN_PORT: u32 = 1025;

/// Host port the guest connects to, after the command exits and before its
/// `Exit`, to send `/workspace/out` (guest → host file stream).
pub const FILES_OUT_PORT: u32 = 1026;

/// Host port the guest connects to, once per HTTP request to the in-guest
/// model endpoint, to relay that request to the host's model proxy.
pub const MODEL_PORT: u32 = 1027;

/// Guest port the host connects to (hybrid vsock `CONNECT 1028`), once per
/// `airlock exec`, while the command runs and only if the host's `Hello`
/// listed [`capability::EXEC`]: an exec conversation (PROTOCOL.md).
pub const EXEC_PORT: u32 = 1028;

/// Host port the guest init connects to once per live mount (`Mounts`),
/// before the command starts: the connection starts with [`MOUNT_HELLO`]
/// and the mount's index (`u32`, little-endian), then carries the FUSE
/// protocol both ways (requests guest → host, replies host → guest).
pub const MOUNTS_PORT: u32 = 1029;

/// The first 4 bytes of a mount connection.
pub const MOUNT_HELLO: [u8; 4] = *b"amnt";

/// Host port the guest init connects to once per tunnel the agent opens
/// through the in-guest egress proxy (HTTP `CONNECT`, plain HTTP, SOCKS5,
/// `--host-port` forwards): an [`egress::Request`], the host's
/// [`egress::Reply`], then the tunnel's bytes both ways.
pub const EGRESS_PORT: u32 = 1030;

/// Host port a guest woken from a snapshot connects to first (its kernel
/// command line has `airlock.snapshot=1`): the host answers with one
/// [`wake::Wake`] and closes. Every sibling woken from the same snapshot
/// starts from the same memory; this is where each becomes itself.
pub const WAKE_PORT: u32 = 1031;

/// What the host tells a guest woken from a snapshot.
pub mod wake {
    /// The message's size on the wire.
    pub const SIZE: usize = 64;
    const MAGIC: [u8; 4] = *b"wake";

    /// The current time, fresh entropy and the sandbox's own identity.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Wake {
        /// The host's wall clock: seconds and nanoseconds since the epoch.
        pub unix_secs: u64,
        pub nanos: u32,
        /// Mixed into the guest's random pool (which is then reseeded).
        pub entropy: [u8; 32],
        /// The sandbox's identity (random per sandbox).
        pub sandbox_id: [u8; 16],
    }

    impl Wake {
        /// `wake`, secs (u64 LE), nanos (u32 LE), entropy, id: 64 bytes.
        pub fn encode(&self) -> [u8; SIZE] {
            let mut out = [0u8; SIZE];
            out[..4].copy_from_slice(&MAGIC);
            out[4..12].copy_from_slice(&self.unix_secs.to_le_bytes());
            out[12..16].copy_from_slice(&self.nanos.to_le_bytes());
            out[16..48].copy_from_slice(&self.entropy);
            out[48..64].copy_from_slice(&self.sandbox_id);
            out
        }

        /// The message, if `bytes` is one (magic, nanoseconds below 10^9).
        pub fn decode(bytes: &[u8; SIZE]) -> Option<Wake> {
            if bytes[..4] != MAGIC {
                return None;
            }
            let mut secs = [0u8; 8];
            secs.copy_from_slice(&bytes[4..12]);
            let mut nanos = [0u8; 4];
            nanos.copy_from_slice(&bytes[12..16]);
            let nanos = u32::from_le_bytes(nanos);
            if nanos >= 1_000_000_000 {
                return None;
            }
            let mut entropy = [0u8; 32];
            entropy.copy_from_slice(&bytes[16..48]);
            let mut sandbox_id = [0u8; 16];
            sandbox_id.copy_from_slice(&bytes[48..64]);
            Some(Wake {
                unix_secs: u64::from_le_bytes(secs),
                nanos,
                entropy,
                sandbox_id,
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_wake_round_trips_and_nothing_else_decodes() {
            let w = Wake {
                unix_secs: 1_800_000_000,
                nanos: 999_999_999,
                entropy: [7; 32],
                sandbox_id: [9; 16],
            };
            let bytes = w.encode();
            assert_eq!(Wake::decode(&bytes), Some(w));
            let mut bad = bytes;
            bad[0] = b'W';
            assert_eq!(Wake::decode(&bad), None);
            let mut bad = bytes;
            bad[12..16].copy_from_slice(&1_000_000_000u32.to_le_bytes());
            assert_eq!(Wake::decode(&bad), None);
        }
    }
}

/// Most exec connections the guest serves at once; it closes further ones
/// at once.
pub const MAX_EXECS: usize = 16;

/// The line the init prints on the console when it has started.
pub const INIT_READY_LINE: &str = "airlock-init: ready";

/// The machine contract between the VMM and the init that is not RPC: where
/// the boot-timer page is and what to write there. The init writes
/// [`machine::BOOT_TIMER_MAGIC`] to the first byte of
/// [`machine::BOOT_TIMER_ADDR`] (through `/dev/mem`) once it has started; the
/// VMM records the time since its own start. Engines without the device
/// (QEMU) ignore the write.
pub mod machine {
    /// Guest-physical address of the boot-timer MMIO page (first page of the
    /// VMM's MMIO window, below 4 GiB, never RAM).
    pub const BOOT_TIMER_ADDR: u64 = 0xd000_0000;
    /// The byte that marks "init reached".
    pub const BOOT_TIMER_MAGIC: u8 = 123;
    /// Where in the boot-timer page the init writes [`SNAPSHOT_MAGIC`]
    /// when the kernel command line has `airlock.snapshot=1`: the guest
    /// is at its snapshot point (the VMM pauses it there and writes the
    /// snapshot; a restored guest goes on from the next instruction).
    pub const SNAPSHOT_OFFSET: u64 = 8;
    /// The snapshot mark.
    pub const SNAPSHOT_MAGIC: u8 = 0x5a;
}
