//! What the shim leaves in a container's bundle so that
//! `containerd-shim-bulkhead-v2 delete`, run by containerd after the shim
//! process died, knows what to clean up: the shim's memory is gone by then.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's file name in the bundle.
const FILE: &str = "bulkhead.json";

/// One container's place in bulkhead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRecord {
    /// The sandbox (VM) the container runs in.
    pub vm_id: String,
    /// The run root holding the sandbox directory.
    pub run_root: PathBuf,
    /// Whether this container booted the VM (a standalone container or a
    /// pod's sandbox): deleting it after a crash removes the whole sandbox.
    pub owns_vm: bool,
}

impl BundleRecord {
    /// Writes the record into `bundle`.
    pub fn write(&self, bundle: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(bundle.join(FILE), json)
    }

    /// Reads the record from `bundle`, if the shim got far enough to write one.
    pub fn read(bundle: &Path) -> Option<BundleRecord> {
        let bytes = std::fs::read(bundle.join(FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_absence() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(BundleRecord::read(dir.path()), None);
        let rec = BundleRecord {
            vm_id: "p1".into(),
            run_root: "/run/bulkhead".into(),
            owns_vm: true,
        };
        rec.write(dir.path()).unwrap();
        assert_eq!(BundleRecord::read(dir.path()), Some(rec));
    }
}
