//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
//! learns its CPUs, its IOAPIC and the ISA interrupt routing.
//!
//! The table is built as plain bytes (no packed structs, no `unsafe`) and
//! written below 640 KiB, where Linux's `smp_scan_config` looks for it.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_ADDR, EBDA_END, IOAPIC_ADDR, MPTABLE_ADDR};
use crate::memory::GuestMemoryMmap;

/// Most CPUs a guest may have; the table for them must fit below 640 KiB.
pub const MAX_CPUS: u8 = 16;
/// IOAPIC pins the table routes (KVM's IOAPIC has 24).
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV_1_4: u8 = 4;
const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
/// Family 6 in the signature; FPU and APIC in the feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Size of the floating pointer structure.
const FLOATING_POINTER_LEN: usize = 16;
/// Size of the configuration table header.
const HEADER_LEN: usize = 44;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Zero CPUs or more than [`MAX_CPUS`].
    #[error("unsupported number of vCPUs: {0} (1 to {MAX_CPUS})")]
    CpuCount(u8),
    /// The table did not fit in guest memory.
    #[error("failed to write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The IOAPIC's APIC id: the first id after the CPUs'.
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The table bytes for `cpus` processors, laid out for address `base`:
/// floating pointer first, configuration table right after it.
pub fn table_bytes(cpus: u8, base: u64) -> Result<Vec<u8>, Error> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::CpuCount(cpus));
    }
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_FLAG_ENABLED | if id == 0 { CPU_FLAG_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(cpus);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // type, irq type, flags (conforming), source bus, bus irq, apic, pin
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, pin, ioapic, pin]);
        count += 1;
    }
    // LINT0 of every local APIC takes the 8259's ExtINT, LINT1 the NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&u16::try_from(table_len).unwrap_or(u16::MAX).to_le_bytes());
    header.extend_from_slice(&[SPEC_REV_1_4, 0]); // checksum patched below
    header.extend_from_slice(b"AIRLOCK ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&[0; 4]); // OEM table pointer
    header.extend_from_slice(&[0; 2]); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0; 4]); // extended table length + checksum + reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table_len);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&u32::try_from(table_addr).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REV_1_4, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&header);
    Ok(out)
}

/// Writes the MP table for `cpus` processors at [`MPTABLE_ADDR`].
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), Error> {
    let bytes = table_bytes(cpus, MPTABLE_ADDR)?;
    debug_assert!(MPTABLE_ADDR + bytes.len() as u64 <= EBDA_END);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR))
        .map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the table back from guest memory the way Linux's
    /// `smp_scan_config`/`smp_read_mpc` do and returns (cpus, bsp ids, ioapic id).
    fn parse(mem: &GuestMemoryMmap) -> (Vec<(u8, u8)>, u8) {
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_ADDR))
            .expect("read fp");
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(
            fp.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0,
            "fp checksum"
        );
        let table = u64::from(u32::from_le_bytes([fp[4], fp[5], fp[6], fp[7]]));
        let mut hdr = [0u8; HEADER_LEN];
        mem.read_slice(&mut hdr, GuestAddress(table))
            .expect("read header");
        assert_eq!(&hdr[0..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([hdr[4], hdr[5]]));
        let mut whole = vec![0u8; len];
        mem.read_slice(&mut whole, GuestAddress(table))
            .expect("read table");
        assert_eq!(
            whole.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0,
            "table checksum"
        );
        assert!(table + len as u64 <= EBDA_END, "table runs past 640 KiB");
        let count = u16::from_le_bytes([hdr[34], hdr[35]]);
        assert_eq!(
            u32::from_le_bytes([hdr[36], hdr[37], hdr[38], hdr[39]]),
            APIC_ADDR
        );
        let (mut cpus, mut ioapic, mut off) = (Vec::new(), None, HEADER_LEN);
        for _ in 0..count {
            match whole[off] {
                ENTRY_PROCESSOR => {
                    cpus.push((whole[off + 1], whole[off + 3]));
                    off += 20;
                }
                ENTRY_IOAPIC => {
                    ioapic = Some(whole[off + 1]);
                    off += 8;
                }
                ENTRY_BUS | ENTRY_IO_INTERRUPT | ENTRY_LOCAL_INTERRUPT => off += 8,
                t => panic!("unknown entry type {t}"),
            }
        }
        assert_eq!(off, len, "entry count and length disagree");
        (cpus, ioapic.expect("ioapic entry"))
    }

    #[test]
    fn guest_finds_every_cpu_and_one_bsp() {
        for n in [1u8, 2, 7, MAX_CPUS] {
            let mem = crate::memory::create(1 << 20).expect("mem");
            write(&mem, n).expect("write");
            let (cpus, ioapic) = parse(&mem);
            assert_eq!(cpus.len(), usize::from(n));
            assert_eq!(
                cpus.iter().filter(|(_, f)| f & CPU_FLAG_BSP != 0).count(),
                1
            );
            assert!(cpus.iter().all(|(_, f)| f & CPU_FLAG_ENABLED != 0));
            assert_eq!(cpus[0].0, 0);
            assert_eq!(ioapic, n);
        }
    }

    #[test]
    fn bad_cpu_counts_are_refused() {
        assert!(matches!(
            table_bytes(0, MPTABLE_ADDR),
            Err(Error::CpuCount(0))
        ));
        assert!(matches!(
            table_bytes(MAX_CPUS + 1, MPTABLE_ADDR),
            Err(Error::CpuCount(_))
        ));
    }
}
