//! CPUID for each vCPU: KVM's supported set, normalised per vCPU.
//!
//! What we change and why:
//! - leaf 0x1: the initial APIC id and logical CPU count in EBX, the
//!   "running under a hypervisor" bit, HTT when there is more than one CPU,
//!   and the TSC-deadline timer when KVM's in-kernel LAPIC emulates it
//!   (`KVM_CAP_TSC_DEADLINE_TIMER`). KVM does not report that bit in its
//!   supported set (the LAPIC is the VMM's choice), and a guest kernel that
//!   lacks it calibrates the LAPIC timer against the PIT at every boot:
//!   `calibrate_APIC_clock` spins for at least 100 ms of guest time (HZ/10
//!   ticks), the largest fixed cost of a boot, which QEMU and Firecracker
//!   guests skip. With it the kernel programs deadlines in TSC cycles (the
//!   TSC frequency already comes from kvm-clock) and calibrates nothing;
//! - leaf 0xb (x2APIC topology): the x2APIC id in EDX of every sub-leaf;
//! - leaf 0x4 (cache topology): cores per package matching our CPU count;
//! - leaf 0xa (architectural PMU): zeroed; a sandbox gets no performance
//!   counters (they are a side channel and cost MSR exits).

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_X2APIC_TOPOLOGY: u32 = 0xb;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_CPU_COUNT_SHIFT: u32 = 16;
const EBX_CLFLUSH_SHIFT: u32 = 8;
/// CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE: u32 = 8;
const EAX_CORES_SHIFT: u32 = 26;

/// Rewrites `entries` (KVM's supported CPUID) for vCPU `id` of `count`;
/// `tsc_deadline`: KVM emulates the LAPIC's TSC-deadline mode.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], id: u8, count: u8, tsc_deadline: bool) {
    let id = u32::from(id);
    let count = u32::from(count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (id << EBX_APIC_ID_SHIFT)
                    | (count << EBX_CPU_COUNT_SHIFT)
                    | (CLFLUSH_LINE << EBX_CLFLUSH_SHIFT);
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_TOPOLOGY => {
                e.eax = (e.eax & !(0x3f << EAX_CORES_SHIFT)) | ((count - 1) << EAX_CORES_SHIFT);
            }
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_X2APIC_TOPOLOGY => e.edx = id,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0x0000_0001,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn each_vcpu_sees_its_own_apic_id_and_the_cpu_count() {
        let mut e = vec![leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1)];
        normalize(&mut e, 3, 4, true);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!((e[0].ebx >> 8) & 0xff, 8);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[0].ecx & 1, 1, "other feature bits are kept");
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].edx, 3);
    }

    #[test]
    fn single_cpu_has_no_htt_and_one_core() {
        let mut e = vec![leaf(1, 0), leaf(4, 0)];
        normalize(&mut e, 0, 1, false);
        assert_eq!(e[0].edx & EDX_HTT, 0);
        assert_eq!(
            e[0].ecx & ECX_TSC_DEADLINE,
            0,
            "no TSC deadline unless KVM emulates it"
        );
        assert_eq!(e[1].eax >> EAX_CORES_SHIFT, 0);
        assert_eq!(e[1].eax & 0x3ff_ffff, 0x3ff_ffff, "cache fields are kept");
    }

    #[test]
    fn pmu_is_hidden() {
        let mut e = vec![leaf(0xa, 0), leaf(0x8000_0001, 0)];
        normalize(&mut e, 0, 2, true);
        assert_eq!((e[0].eax, e[0].ebx, e[0].ecx, e[0].edx), (0, 0, 0, 0));
        assert_eq!(e[1].eax, 0xffff_ffff, "unrelated leaves untouched");
    }
}
