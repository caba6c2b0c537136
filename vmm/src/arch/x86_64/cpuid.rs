//! Per-vCPU CPUID: KVM's supported set, with the topology made to describe
//! this VM (one socket, `vcpus` cores, one thread each) and the hypervisor bit set.
//!
//! KVM's paravirt leaves (0x4000_0000 and up: the "KVMKVMKVM" signature and the
//! kvm-clock feature bits) are passed through untouched: they are what lets the
//! guest skip TSC calibration.
//!
//! Two bits KVM's supported set leaves to the VMM are settled here too: the
//! TSC-deadline timer (KVM emulates it whenever it has `KVM_CAP_TSC_DEADLINE_TIMER`,
//! but does not list it), without which the guest spends a hundred jiffies at every
//! boot calibrating its APIC timer; and nested virtualization (VMX/SVM), which a
//! container guest never needs and which would expose the host's nested-virt
//! emulation, a large attack surface, to untrusted code.

use kvm_bindings::kvm_cpuid_entry2;

/// CPUID.1:ECX bit 31, "running on a hypervisor".
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX bit 24, the TSC-deadline mode of the local APIC timer.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX bit 5, Intel VMX.
const ECX_VMX: u32 = 1 << 5;
/// CPUID.8000_0001h:ECX bit 2, AMD SVM.
const EXT_ECX_SVM: u32 = 1 << 2;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
/// AMD's SVM feature leaf: meaningless once SVM is hidden.
const LEAF_SVM: u32 = 0x8000_000a;
/// CPUID.1:EDX bit 28, "max logical processor count field is valid".
const EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes), CPUID.1:EBX bits 15-8.
const CLFLUSH_SIZE: u32 = 8;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_INTEL_CACHE: u32 = 0x4;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` items (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites `entries` (KVM's supported CPUID) for vCPU `cpu` of `vcpus`;
/// `tsc_deadline` says whether KVM emulates the TSC-deadline timer.
pub fn patch_for_vcpu(entries: &mut [kvm_cpuid_entry2], cpu: u8, vcpus: u8, tsc_deadline: bool) {
    let apic_id = u32::from(cpu);
    let count = u32::from(vcpus);
    let core_bits = id_bits(count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (apic_id << 24) | (count << 16) | (CLFLUSH_SIZE << 8);
                e.ecx |= ECX_HYPERVISOR;
                e.ecx &= !ECX_VMX;
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
            LEAF_EXT_FEATURES => e.ecx &= !EXT_ECX_SVM,
            LEAF_SVM => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            LEAF_INTEL_CACHE => {
                // Bits 31-26: cores per package minus one; keep the cache description.
                e.eax = (e.eax & 0x03ff_ffff) | ((count - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (TOPOLOGY_LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (TOPOLOGY_LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_AMD_SIZES => {
                // ECX: ApicIdCoreIdSize (15-12) and NC, cores minus one (7-0).
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            LEAF_AMD_EXT_APIC_ID => {
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xff) | apic_id; // compute unit id, one thread per unit
                e.ecx &= !0xff; // node 0
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn leaf_1_names_the_vcpu_and_the_hypervisor() {
        let mut e = vec![entry(1, 0)];
        patch_for_vcpu(&mut e, 3, 4, true);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn tsc_deadline_follows_kvm_and_nested_virtualization_is_hidden() {
        let mut e = vec![entry(1, 0), entry(LEAF_EXT_FEATURES, 0), entry(LEAF_SVM, 0)];
        e[0].ecx = ECX_VMX;
        e[1].ecx = EXT_ECX_SVM | 1;
        e[2].eax = 1;
        patch_for_vcpu(&mut e, 0, 1, true);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(e[0].ecx & ECX_VMX, 0);
        assert_eq!(e[1].ecx, 1, "SVM cleared, the other bits kept");
        assert_eq!(e[2].eax, 0);
        patch_for_vcpu(&mut e, 0, 1, false);
        assert_eq!(e[0].ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn extended_topology_counts_cores() {
        let mut e = vec![entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        patch_for_vcpu(&mut e, 1, 3, true);
        assert_eq!((e[0].ebx, e[0].edx), (1, 1));
        assert_eq!((e[1].eax, e[1].ebx), (2, 3));
        assert_eq!(e[2].ecx, 2);
    }

    #[test]
    fn paravirt_leaves_are_untouched() {
        let mut kvm = entry(0x4000_0000, 0);
        kvm.ebx = 0x4b4d_564b;
        let mut e = vec![kvm];
        patch_for_vcpu(&mut e, 0, 2, true);
        assert_eq!(e[0].ebx, 0x4b4d_564b);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            [id_bits(1), id_bits(2), id_bits(3), id_bits(4), id_bits(5)],
            [0, 1, 2, 2, 3]
        );
    }
}
