//! The guest-physical memory map Airlock's VMM gives every guest.
//!
//! ```text
//! 0x0000_0500  GDT used for the PVH entry (4 entries)
//! 0x0000_6000  PVH start_info, then the module list (initrd)
//! 0x0000_7000  PVH memory map (E820-like entries)
//! 0x0002_0000  kernel command line (COMMAND_LINE_SIZE bytes)
//! 0x0009_fc00  MP table (reserved up to 0xa_0000)
//! 0x0010_0000  kernel (loaded where its ELF headers say, at or above 1 MiB)
//!   ...        initrd at the top of low RAM
//! 0xd000_0000  MMIO window: boot timer page, then virtio-mmio slots
//! 0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC (KVM's in-kernel irqchip)
//! 0x1_0000_0000 RAM above the MMIO gap, if the guest has more than fits below
//! ```

/// Where the GDT for the 32-bit PVH entry lives.
pub const GDT_ADDR: u64 = 0x500;
/// PVH `hvm_start_info`; its address is handed to the kernel in `%ebx`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// The PVH module list (one entry: the initrd) follows `start_info`.
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// The PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// x86's `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP floating pointer + configuration table, in the last KiB below 640 KiB
/// where Linux scans for it (the "EBDA").
pub const MPTABLE_ADDR: u64 = 0x9_fc00;
/// End of conventional memory.
pub const EBDA_END: u64 = 0xa_0000;
/// Start of high memory: the kernel goes at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the MMIO gap below 4 GiB; RAM stops here and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The boot-timer page: first page of the MMIO gap (shared with the init
/// through `airlock_protocol::machine`).
pub const BOOT_TIMER_ADDR: u64 = airlock_protocol::machine::BOOT_TIMER_ADDR;
/// Size of the boot-timer page.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// The first virtio-mmio slot, right after the boot-timer page.
pub const VIRTIO_MMIO_BASE: u64 = BOOT_TIMER_ADDR + BOOT_TIMER_SIZE;
/// Size of each virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IRQ of the first virtio-mmio device (ISA IRQs 5.. are free).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// IOAPIC base address (fixed by KVM's in-kernel irqchip).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the TSS on Intel; out of the way of everything.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Legacy IRQ of the first serial port.
pub const SERIAL_IRQ: u32 = 4;
/// First serial port's I/O base.
pub const SERIAL_PORT: u16 = 0x3f8;
/// i8042 data and command/status ports.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command port: the guest resets the machine by writing 0xfe here.
pub const I8042_COMMAND_PORT: u16 = 0x64;

const _: () = assert!(
    BOOT_TIMER_ADDR >= MMIO_GAP_START && BOOT_TIMER_ADDR + BOOT_TIMER_SIZE <= IOAPIC_ADDR as u64
);
const _: () =
    assert!(PVH_MODLIST_ADDR >= PVH_INFO_ADDR + 56 && PVH_MODLIST_ADDR + 32 <= PVH_MEMMAP_ADDR);
