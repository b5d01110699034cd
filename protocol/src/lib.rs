//! The Airlock host/guest RPC.
//!
//! This crate holds only types, limits and the protocol version; it does no
//! I/O. The framing and messages arrive with the vsock RPC (see
//! `PROTOCOL.md`); for now it pins the constants both sides must agree on.

/// Protocol version spoken by this build. Bumped on any wire change.
pub const PROTOCOL_VERSION: u32 = 1;

/// The host's vsock CID as seen from the guest (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;

/// The default guest CID Airlock gives a sandbox.
pub const DEFAULT_GUEST_CID: u32 = 3;

/// Host port the guest init connects to for the control connection.
pub const CONTROL_PORT: u32 = 1024;

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
}
