//! Translating a guest virtual address to a physical one by walking the
//! guest's page tables, for error reports ("the instruction at RIP was …").
//! The tables are guest memory: every entry is read with bounds checks and a
//! bad table gives `None`, never a panic.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT: u64 = 1;
const PTE_LARGE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The paging-relevant control registers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Paging {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

/// Translates linear address `va`; `None` if unmapped or a mode we do not walk
/// (legacy 32-bit paging).
pub fn translate(mem: &GuestMemoryMmap, p: Paging, va: u64) -> Option<u64> {
    if p.cr0 & CR0_PG == 0 {
        return Some(va);
    }
    if p.efer & EFER_LMA == 0 || p.cr4 & CR4_PAE == 0 {
        return None;
    }
    let mut table = p.cr3 & ADDR_MASK;
    // PML4 (bit 39), PDPT (30), PD (21), PT (12).
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let index = (va >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        let leaf = shift == 12 || (level > 0 && entry & PTE_LARGE != 0);
        if leaf {
            let offset_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !offset_mask) | (va & offset_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

/// Reads up to `N` bytes at guest virtual `va` (fewer if the page ends or is
/// unmapped).
pub fn read_code<const N: usize>(mem: &GuestMemoryMmap, p: Paging, va: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(N);
    for i in 0..N as u64 {
        let Some(pa) = translate(mem, p, va.wrapping_add(i)) else {
            break;
        };
        let Ok(b) = mem.read_obj::<u8>(GuestAddress(pa)) else {
            break;
        };
        out.push(b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long_mode(cr3: u64) -> Paging {
        Paging {
            cr0: CR0_PG | 1,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_LMA,
        }
    }

    /// Builds 4-level tables in guest memory, as a 64-bit guest kernel would.
    #[test]
    fn walks_4k_and_2m_mappings() {
        let mem = crate::memory::create(8 << 20).expect("mem");
        let w = |a: u64, v: u64| mem.write_obj(v, GuestAddress(a)).expect("write");
        // va 0xffff_ffff_8100_0123 -> pa 0x40_0123 through a 4 KiB page.
        let va: u64 = 0xffff_ffff_8100_0123;
        let idx = |s: u32| (va >> s) & 0x1ff;
        w(0x1000 + idx(39) * 8, 0x2000 | 3);
        w(0x2000 + idx(30) * 8, 0x3000 | 3);
        w(0x3000 + idx(21) * 8, 0x4000 | 3);
        w(0x4000 + idx(12) * 8, 0x40_0000 | 3);
        assert_eq!(translate(&mem, long_mode(0x1000), va), Some(0x40_0123));
        // A 2 MiB page for va 0x20_0042 -> pa 0x60_0042.
        w(0x1000, 0x5000 | 3);
        w(0x5000, 0x6000 | 3);
        w(0x6000 + 8, 0x60_0000 | 3 | PTE_LARGE);
        assert_eq!(
            translate(&mem, long_mode(0x1000), 0x20_0042),
            Some(0x60_0042)
        );
        // Not present.
        assert_eq!(translate(&mem, long_mode(0x1000), 0x7fff_0000_0000), None);
        mem.write_slice(&[0x0f, 0x0b], GuestAddress(0x40_0123))
            .expect("ud2");
        assert_eq!(
            read_code::<2>(&mem, long_mode(0x1000), va),
            vec![0x0f, 0x0b]
        );
    }

    #[test]
    fn tables_pointing_outside_memory_give_none() {
        let mem = crate::memory::create(1 << 20).expect("mem");
        mem.write_obj(0xdead_b000u64 | 3, GuestAddress(0x1000))
            .expect("w");
        assert_eq!(translate(&mem, long_mode(0x1000), 0), None);
        assert_eq!(translate(&mem, long_mode(0xffff_f000), 0), None);
    }

    #[test]
    fn paging_off_is_identity() {
        let mem = crate::memory::create(1 << 20).expect("mem");
        assert_eq!(translate(&mem, Paging::default(), 0x1234), Some(0x1234));
    }
}
