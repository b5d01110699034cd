//! Initial vCPU state for the PVH entry: 32-bit protected mode, paging off,
//! flat segments from our GDT, `%ebx` pointing at `start_info`.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{GDT_ADDR, PVH_INFO_ADDR};
use crate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 0x1;
const RFLAGS_RESERVED: u64 = 0x2;
const FPU_CONTROL_WORD: u16 = 0x37f;
const MXCSR_DEFAULT: u32 = 0x1f80;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors writing boot state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The GDT could not be written to guest memory.
    #[error("failed to write the GDT to guest memory")]
    WriteGdt(#[source] vm_memory::GuestMemoryError),
    /// KVM's MSR list could not be built.
    #[error("failed to build the boot MSR list")]
    Msrs,
}

/// A GDT descriptor from access/flags bits (as in Linux's `GDT_ENTRY`),
/// a base and a 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The GDT for the PVH entry: null, 32-bit flat code, flat data, TSS.
pub const PVH_GDT: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xffff_ffff),
    gdt_entry(0xc093, 0, 0xffff_ffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// The KVM segment register a GDT `entry` at `index` describes.
pub fn segment(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| u8::from(entry >> n & 1 == 1);
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let granular = bit(55) == 1;
    if granular {
        limit = (limit << 12) | 0xfff;
    }
    let present = bit(47);
    kvm_segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: index * 8,
        type_: u8::try_from((entry >> 40) & 0xf).unwrap_or(0),
        present,
        dpl: u8::try_from((entry >> 45) & 0x3).unwrap_or(0),
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: u8::from(granular),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes [`PVH_GDT`] at [`GDT_ADDR`].
pub fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (i, e) in PVH_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(Error::WriteGdt)?;
    }
    Ok(())
}

/// Special registers for the PVH entry, applied on top of what KVM reports.
pub fn pvh_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(PVH_GDT[1], 1);
    let data = segment(PVH_GDT[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(PVH_GDT[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = u16::try_from(PVH_GDT.len() * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = X86_CR0_PE;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// General registers for the PVH entry at `entry`.
pub fn pvh_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rbx: PVH_INFO_ADDR,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    }
}

/// x87/SSE state as after `FNINIT` + default MXCSR.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

/// The MSRs a freshly booted CPU should have.
pub fn boot_msrs() -> Result<Msrs, Error> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ])
    .map_err(|_| Error::Msrs)
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| lapic.regs[offset + i].to_ne_bytes()[0];
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = std::ffi::c_char::from_ne_bytes([b]);
    }
}

/// Routes LINT0 to ExtINT (the 8259) and LINT1 to NMI, as the MP table says.
pub fn lapic_lints(mut lapic: kvm_lapic_state) -> kvm_lapic_state {
    let with_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lint0 = lapic_reg(&lapic, APIC_LVT_LINT0);
    set_lapic_reg(
        &mut lapic,
        APIC_LVT_LINT0,
        with_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(&lapic, APIC_LVT_LINT1);
    set_lapic_reg(&mut lapic, APIC_LVT_LINT1, with_mode(lint1, APIC_MODE_NMI));
    lapic
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_32bit_segments() {
        let code = segment(PVH_GDT[1], 1);
        assert_eq!((code.base, code.limit, code.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (code.type_, code.s, code.db, code.l, code.g, code.present),
            (0xb, 1, 1, 0, 1, 1)
        );
        let data = segment(PVH_GDT[2], 2);
        assert_eq!(
            (data.type_, data.selector, data.limit),
            (0x3, 16, 0xffff_ffff)
        );
        let tss = segment(PVH_GDT[3], 3);
        assert_eq!((tss.type_, tss.limit, tss.s, tss.g), (0xb, 0x67, 0, 0));
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn gdt_entry_places_base_and_limit_bits() {
        let e = gdt_entry(0xc093, 0x1234_5678, 0xa_bcde);
        let s = segment(e, 5);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcd_efff);
    }

    #[test]
    fn pvh_state_matches_the_boot_protocol() {
        let s = pvh_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & 0x8000_0001, 1, "protected mode, paging off");
        assert_eq!(s.gdt.base, GDT_ADDR);
        assert_eq!(s.gdt.limit, 31);
        let r = pvh_regs(0x1234);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x1234, PVH_INFO_ADDR, 2));
    }

    #[test]
    fn gdt_lands_in_guest_memory() {
        let mem = crate::memory::create(1 << 20).expect("mem");
        write_gdt(&mem).expect("gdt");
        let e: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).expect("read");
        assert_eq!(e, PVH_GDT[1]);
    }

    #[test]
    fn lints_are_routed_and_other_bits_kept() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT_LINT0, 0x1_0000); // masked bit
        let l = lapic_lints(l);
        assert_eq!(lapic_reg(&l, APIC_LVT_LINT0), 0x1_0700);
        assert_eq!(lapic_reg(&l, APIC_LVT_LINT1), 0x400);
    }
}
