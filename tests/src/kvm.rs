//! What kind of KVM this machine offers.
//!
//! The end-to-end tests need hardware-style KVM to boot a stock guest kernel. The
//! development machines only have PVM, so tests decide with [`detect`] whether they
//! can run directly or must go through the emulated host ([`crate::testhost`]).

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;

/// Environment variable the harness sets (to `1`) for commands it runs inside the
/// emulated host.
pub const IN_TESTHOST_ENV: &str = "BULKHEAD_IN_TESTHOST";

/// The kind of KVM available here, which decides how end-to-end tests can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware-style KVM (VT-x/AMD-V, possibly emulated): stock kernels boot.
    Hardware,
    /// The PVM hypervisor: only PVM-patched guest kernels boot, stock ones hang.
    Pvm,
    /// No usable `/dev/kvm` (missing, or not openable read-write).
    Absent,
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmKind::Hardware => "hardware-style KVM",
            KvmKind::Pvm => "PVM (pagetable-based KVM; stock guest kernels cannot boot)",
            KvmKind::Absent => "no usable /dev/kvm",
        })
    }
}

/// Detect the KVM kind of this machine.
///
/// Exists so tests and xtask can pick between running directly and running in the
/// emulated host. PVM is recognised by `/sys/module/kvm_pvm`; KVM counts as absent
/// when `/dev/kvm` cannot be opened read-write.
pub fn detect() -> KvmKind {
    detect_at(Path::new("/sys/module/kvm_pvm"), Path::new("/dev/kvm"))
}

fn detect_at(pvm_module: &Path, dev_kvm: &Path) -> KvmKind {
    if pvm_module.exists() {
        return KvmKind::Pvm;
    }
    match OpenOptions::new().read(true).write(true).open(dev_kvm) {
        Ok(_) => KvmKind::Hardware,
        Err(_) => KvmKind::Absent,
    }
}

/// True when running inside the emulated host started by this harness.
///
/// Exists so a test binary can tell that it is already in the emulated host and
/// must not try to start another one.
pub fn inside_emulated_host() -> bool {
    std::env::var(IN_TESTHOST_ENV).is_ok_and(|v| v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_wins_over_dev_kvm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let module = dir.path().join("kvm_pvm");
        std::fs::create_dir(&module).expect("mkdir");
        assert_eq!(detect_at(&module, Path::new("/dev/null")), KvmKind::Pvm);
    }

    #[test]
    fn unopenable_device_is_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("kvm");
        assert_eq!(
            detect_at(&dir.path().join("none"), &missing),
            KvmKind::Absent
        );
    }

    #[test]
    fn display_is_a_phrase() {
        assert!(KvmKind::Pvm.to_string().contains("PVM"));
        assert_eq!(KvmKind::Hardware.to_string(), "hardware-style KVM");
    }
}
