//! x86-64 specifics: the memory layout, boot structures, CPU state.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod walk;
