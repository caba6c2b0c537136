//! How big a sandbox's microVM is: the config's default, grown to what the
//! pod (or the container) asks for. There is no hotplug, so the VM is sized
//! once, when the first container boots it.
//!
//! For a pod, containerd 1.7+ passes the pod's totals as annotations on the
//! sandbox container (`io.kubernetes.cri.sandbox-memory`, `-cpu-quota`,
//! `-cpu-period`); a standalone container's own `linux.resources` limits
//! count too. Each container's limits are still enforced by its cgroup in
//! the guest.

use oci_spec::runtime::Spec;

use crate::config::GUEST_OVERHEAD_MIB;

/// The pod's memory total in bytes (containerd's `SandboxMem`).
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// The pod's CPU quota in microseconds per period (`SandboxCPUQuota`).
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// The CPU period in microseconds (`SandboxCPUPeriod`).
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// The VM's vCPUs and memory (MiB) for a sandbox booted by `spec`, given the
/// config's defaults (`memory_mib` includes the guest's own share).
pub fn vm_size(spec: &Spec, vcpus: u16, memory_mib: u32) -> (u16, u32) {
    let annotations = spec.annotations().clone().unwrap_or_default();
    let number = |key: &str| {
        annotations
            .get(key)
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|v| *v > 0)
    };
    let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
    let memory_limit = number(SANDBOX_MEMORY).or_else(|| {
        resources
            .as_ref()
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .filter(|l| *l > 0)
    });
    let cpu = resources.as_ref().and_then(|r| r.cpu().clone());
    let quota = number(SANDBOX_CPU_QUOTA).or_else(|| cpu.as_ref().and_then(|c| c.quota()));
    let period = number(SANDBOX_CPU_PERIOD)
        .map(|p| p as u64)
        .or_else(|| cpu.as_ref().and_then(|c| c.period()));

    let memory = match memory_limit {
        Some(bytes) => u32::try_from(bytes >> 20)
            .unwrap_or(u32::MAX)
            .saturating_add(GUEST_OVERHEAD_MIB)
            .max(memory_mib),
        None => memory_mib,
    };
    let cpus = match (quota, period) {
        (Some(q), Some(p)) if q > 0 && p > 0 => {
            let needed = (q as u64).div_ceil(p);
            u16::try_from(needed)
                .unwrap_or(u16::MAX)
                .clamp(1, 254)
                .max(vcpus)
        }
        _ => vcpus,
    };
    (cpus, memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn defaults_without_requests() {
        let s = spec(serde_json::json!({"ociVersion": "1.0.2"}));
        assert_eq!(vm_size(&s, 1, 224), (1, 224));
    }

    #[test]
    fn pod_annotations_grow_the_vm() {
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "annotations": {
                SANDBOX_MEMORY: "1073741824",
                SANDBOX_CPU_QUOTA: "250000",
                SANDBOX_CPU_PERIOD: "100000"
            }
        }));
        assert_eq!(vm_size(&s, 1, 224), (3, 1024 + GUEST_OVERHEAD_MIB));
        // Smaller requests never shrink the configured size.
        assert_eq!(vm_size(&s, 4, 4096), (4, 4096));
    }

    #[test]
    fn a_containers_own_limits_count_and_nonsense_is_ignored() {
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "annotations": {SANDBOX_CPU_QUOTA: "-1", SANDBOX_MEMORY: "lots"},
            "linux": {"resources": {
                "memory": {"limit": 536870912},
                "cpu": {"quota": 150000, "period": 100000}
            }}
        }));
        assert_eq!(vm_size(&s, 1, 224), (2, 512 + GUEST_OVERHEAD_MIB));
    }
}
