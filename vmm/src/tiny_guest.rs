//! A tiny guest "kernel" assembled in code, for smoke tests of the VMM
//! without the real kernel: an ELF64 file with one loadable segment and the
//! PVH entry note, whose 32-bit code writes a line to the serial port, marks
//! the boot timer and resets the machine through the i8042.

use airlock_protocol::machine::{BOOT_TIMER_ADDR, BOOT_TIMER_MAGIC};

use crate::arch::layout::{HIMEM_START, I8042_COMMAND_PORT, SERIAL_PORT};

const EHDR_SIZE: u16 = 64;
const PHDR_SIZE: u16 = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// 32-bit code that prints `line` on the serial port, writes the boot-timer
/// magic, then resets through the i8042 (and halts, should that fail).
pub fn smoke_code(line: &[u8]) -> Vec<u8> {
    let mut code = Vec::new();
    let port = SERIAL_PORT.to_le_bytes();
    code.extend_from_slice(&[0x66, 0xba, port[0], port[1]]); // mov dx, 0x3f8
    for b in line {
        code.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    let timer = u32::try_from(BOOT_TIMER_ADDR).unwrap_or(0).to_le_bytes();
    code.extend_from_slice(&[0xc6, 0x05]); // mov byte [timer], magic
    code.extend_from_slice(&timer);
    code.push(BOOT_TIMER_MAGIC);
    let cmd = u8::try_from(I8042_COMMAND_PORT).unwrap_or(0x64);
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, cmd]); // mov al, 0xfe; out 0x64, al
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    code
}

/// An ELF64 image loading `code` at 1 MiB with a PVH entry note pointing at
/// its first byte.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let phnum: u16 = 2;
    let note_off = u64::from(EHDR_SIZE) + u64::from(phnum) * u64::from(PHDR_SIZE);
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz: "Xen\0"
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz: 32-bit entry
    note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    let entry = u32::try_from(HIMEM_START).unwrap_or(0);
    note.extend_from_slice(&entry.to_le_bytes());
    let code_off = note_off + note.len() as u64;

    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&HIMEM_START.to_le_bytes()); // e_entry
    elf.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&EHDR_SIZE.to_le_bytes());
    elf.extend_from_slice(&PHDR_SIZE.to_le_bytes());
    elf.extend_from_slice(&phnum.to_le_bytes());
    elf.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    let phdr = |elf: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, size: u64| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&flags.to_le_bytes());
        for v in [off, addr, addr, size, size, 4] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
    };
    let code_len = code.len() as u64;
    phdr(&mut elf, PT_LOAD, 5, code_off, HIMEM_START, code_len);
    phdr(&mut elf, PT_NOTE, 4, note_off, 0, note.len() as u64);
    elf.extend_from_slice(&note);
    elf.extend_from_slice(code);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::boot;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn loader_finds_the_code_and_the_pvh_entry() {
        let code = smoke_code(b"hi\n");
        let dir = std::env::temp_dir().join(format!("airlock-tiny-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("tiny.elf");
        std::fs::write(&path, pvh_elf(&code)).expect("write");
        let mem = crate::memory::create(64 << 20).expect("mem");
        let k = boot::load_kernel(&mem, &path).expect("load");
        assert_eq!(k.entry, GuestAddress(HIMEM_START));
        assert_eq!(k.end, HIMEM_START + code.len() as u64);
        let mut back = vec![0u8; code.len()];
        mem.read_slice(&mut back, GuestAddress(HIMEM_START))
            .expect("read");
        assert_eq!(back, code);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn code_writes_each_byte_then_marks_and_resets() {
        let code = smoke_code(b"ok");
        assert_eq!(&code[..4], &[0x66, 0xba, 0xf8, 0x03]);
        assert_eq!(&code[4..10], &[0xb0, b'o', 0xee, 0xb0, b'k', 0xee]);
        assert_eq!(
            &code[10..17],
            &[0xc6, 0x05, 0x00, 0x00, 0x00, 0xd0, BOOT_TIMER_MAGIC]
        );
        assert_eq!(&code[17..21], &[0xb0, 0xfe, 0xe6, 0x64]);
    }
}
