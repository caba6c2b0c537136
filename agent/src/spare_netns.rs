//! One network namespace made ahead of time, for the sandbox's first container.
//!
//! A network namespace is by far the costliest namespace to make: the kernel
//! sets up every protocol's per-namespace state (IPv4 and IPv6 routes and
//! sysctl tables, the loopback device...). In a nested guest that is about
//! 60 ms of a container's start, more than all its other namespaces together.
//! So the agent makes one before the VM is saved as a template: every copy of
//! the VM then starts with its own fresh, unused namespace whose loopback is
//! already up, and the first container that asks for a new network namespace
//! joins that one instead of making it. What the container sees is the same
//! either way: a namespace of its own with only `lo`, up. Later containers
//! make theirs as usual. The namespace stays pinned for the VM's life: it is
//! the sandbox's network namespace, where the agent puts the VM's NIC.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// Where the agent keeps it (a bind mount of the namespace, which holds it
/// alive with no process in it).
pub const SPARE_NETNS_PATH: &str = "/run/bulkhead-agent/netns/spare";

/// The namespace made ahead of time, until a container takes it.
#[derive(Debug)]
pub struct SpareNetns {
    path: PathBuf,
    taken: AtomicBool,
}

impl SpareNetns {
    /// Makes a network namespace with `lo` up and pins it at `path`.
    pub fn prepare(path: &Path) -> io::Result<SpareNetns> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::File::create(path)?;
        let target = path.to_owned();
        // unshare(CLONE_NEWNET) moves only the calling thread: a thread of
        // its own, which ends right after, so no agent thread changes.
        let made = std::thread::spawn(move || -> io::Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            crate::netns::set_up("lo")?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(io::Error::from)
        })
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?;
        if let Err(err) = made {
            let _ = fs::remove_file(path);
            return Err(err);
        }
        Ok(SpareNetns {
            path: path.to_owned(),
            taken: AtomicBool::new(false),
        })
    }

    /// Where the namespace is pinned: the sandbox's network is set up there,
    /// before the first container takes it or after (`ctr run --cni` adds the
    /// interface between create and start).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Points `spec`'s new network namespace at the spare, if the spec asks
    /// for one that the spare can stand in for and the spare is still there;
    /// returns whether it did. The pin stays afterwards: the namespace is the
    /// sandbox's for the VM's life, and the host may still configure its
    /// network (see [`SpareNetns::path`]).
    ///
    /// Not when the container also gets a user namespace: a namespace the
    /// agent made belongs to the guest's initial user namespace, and root in
    /// the container could not configure it.
    pub fn lend_to(&self, spec: &mut Spec) -> bool {
        let Some(namespaces) = spec
            .linux_mut()
            .as_mut()
            .and_then(|l| l.namespaces_mut().as_mut())
        else {
            return false;
        };
        if namespaces
            .iter()
            .any(|n| n.typ() == LinuxNamespaceType::User)
        {
            return false;
        }
        let Some(network) = namespaces
            .iter_mut()
            .find(|n| n.typ() == LinuxNamespaceType::Network && n.path().is_none())
        else {
            return false;
        };
        if self.taken.swap(true, Ordering::AcqRel) {
            return false;
        }
        network.set_path(Some(self.path.clone()));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder};

    fn spec_with(types: &[LinuxNamespaceType]) -> Spec {
        let namespaces = types
            .iter()
            .map(|t| LinuxNamespaceBuilder::default().typ(*t).build().unwrap())
            .collect::<Vec<_>>();
        let mut spec = Spec::default();
        spec.set_linux(Some(
            LinuxBuilder::default()
                .namespaces(namespaces)
                .build()
                .unwrap(),
        ));
        spec
    }

    fn network_path(spec: &Spec) -> Option<PathBuf> {
        spec.linux()
            .as_ref()?
            .namespaces()
            .as_ref()?
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Network)?
            .path()
            .clone()
    }

    /// A spare that was never pinned (no mount), so dropping claims is harmless.
    fn unpinned(dir: &Path) -> SpareNetns {
        SpareNetns {
            path: dir.join("spare"),
            taken: AtomicBool::new(false),
        }
    }

    #[test]
    fn the_first_new_network_namespace_gets_the_spare_once() {
        let dir = tempfile::tempdir().unwrap();
        let spare = unpinned(dir.path());
        let mut first = spec_with(&[LinuxNamespaceType::Pid, LinuxNamespaceType::Network]);
        assert!(spare.lend_to(&mut first));
        assert_eq!(network_path(&first), Some(dir.path().join("spare")));
        let mut second = spec_with(&[LinuxNamespaceType::Network]);
        assert!(!spare.lend_to(&mut second));
        assert_eq!(network_path(&second), None);
    }

    #[test]
    fn joined_or_absent_network_namespaces_and_user_namespaces_keep_their_spec() {
        let dir = tempfile::tempdir().unwrap();
        let spare = unpinned(dir.path());
        let mut no_netns = spec_with(&[LinuxNamespaceType::Pid]);
        assert!(!spare.lend_to(&mut no_netns));
        let mut userns = spec_with(&[LinuxNamespaceType::User, LinuxNamespaceType::Network]);
        assert!(!spare.lend_to(&mut userns));
        assert_eq!(network_path(&userns), None);
        let mut joined = spec_with(&[LinuxNamespaceType::Network]);
        joined
            .linux_mut()
            .as_mut()
            .unwrap()
            .namespaces_mut()
            .as_mut()
            .unwrap()[0]
            .set_path(Some(PathBuf::from("/proc/1/ns/net")));
        assert!(!spare.lend_to(&mut joined));
        assert_eq!(network_path(&joined), Some(PathBuf::from("/proc/1/ns/net")));
        // None of these used it up.
        let mut fresh = spec_with(&[LinuxNamespaceType::Network]);
        assert!(spare.lend_to(&mut fresh));
    }
}
