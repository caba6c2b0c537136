//! An engine's OCI spec, made to work inside the microVM.
//!
//! containerd (and CRI above it), podman and Docker write a spec for a host runtime: namespace
//! paths under the host's /proc, bind mounts of host files (/etc/hosts, the
//! pod's /dev/shm, volumes), a cgroups path for the host's cgroup driver and
//! hooks that run host binaries. None of that means anything in the guest, so
//! before the spec crosses to the agent it is rewritten here: host files are
//! exposed through the virtio-fs share, a pod's namespaces become the guest
//! namespaces of the pod's sandbox container, and what cannot work is dropped
//! with a log line. Pure functions, so all of it is unit-tested.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Mount, Spec};

/// The PATH a process gets when its spec has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// CRI's annotation naming a container's role: `sandbox` or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod (the sandbox container's id).
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// What a container is to the pod it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// A container on its own (`ctr run`, nerdctl, Docker): it gets its own VM.
    Standalone,
    /// A pod's sandbox ("pause") container: it boots the pod's VM.
    PodSandbox,
    /// An application container of the pod whose sandbox has this id.
    PodMember {
        /// The sandbox container's id.
        sandbox_id: String,
    },
}

impl Role {
    /// The role the CRI annotations of `spec` give container `id`.
    pub fn of(spec: &Spec, id: &str) -> Role {
        let annotations = spec.annotations().clone().unwrap_or_default();
        match annotations.get(CONTAINER_TYPE).map(String::as_str) {
            Some("sandbox") => Role::PodSandbox,
            Some("container") => match annotations.get(SANDBOX_ID) {
                Some(sandbox) if sandbox != id => Role::PodMember {
                    sandbox_id: sandbox.clone(),
                },
                _ => Role::Standalone,
            },
            _ => Role::Standalone,
        }
    }

    /// The id of the VM this container runs in: its own, or its pod's.
    pub fn vm_id<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            Role::PodMember { sandbox_id } => sandbox_id,
            _ => id,
        }
    }
}

/// Why a pod sandbox asks for what a microVM cannot give it: to share one of
/// the host's namespaces (Kubernetes' `hostNetwork`, `hostIPC`, `hostPID`),
/// which CRI says by leaving that namespace out of the sandbox's spec. The
/// pod has its own kernel, so it cannot; better refused at RunPodSandbox, by
/// name, than a pod that starts and then cannot do what it was made for.
pub fn refused_host_namespaces(spec: &Spec, role: &Role) -> Option<String> {
    if *role != Role::PodSandbox {
        return None;
    }
    let listed = |typ: LinuxNamespaceType| {
        spec.linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| ns.iter().any(|n| n.typ() == typ))
    };
    let shared: Vec<&str> = [
        (LinuxNamespaceType::Network, "hostNetwork"),
        (LinuxNamespaceType::Ipc, "hostIPC"),
        (LinuxNamespaceType::Pid, "hostPID"),
    ]
    .into_iter()
    .filter(|(typ, _)| !listed(*typ))
    .map(|(_, field)| field)
    .collect();
    if shared.is_empty() {
        return None;
    }
    Some(format!(
        "the pod asks for {}: true, which the bulkhead runtime cannot honour (each pod runs in \
         its own microVM with its own kernel, so it cannot share the host's namespaces); \
         run this pod with another RuntimeClass, or drop {}",
        shared.join(": true, "),
        if shared.len() == 1 {
            "that field"
        } else {
            "those fields"
        }
    ))
}

/// A host path to expose in the share for one mount of the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBind {
    /// The host file or directory.
    pub source: PathBuf,
    /// Its name inside the share (`<container>/mounts/<n>`).
    pub share_name: String,
}

/// The result of [`for_guest`]: the spec to send and the host paths the
/// caller must bind into the share first.
#[derive(Debug)]
pub struct GuestSpec {
    /// The spec as the agent should see it.
    pub spec: Spec,
    /// Host files and directories to expose in the share.
    pub binds: Vec<HostBind>,
    /// What was dropped or changed, for the shim's log.
    pub notes: Vec<String>,
}

/// Mount types whose `source` is a host path.
fn is_host_bind(mount: &Mount) -> bool {
    let typ = mount.typ().as_deref().unwrap_or("");
    let bind_option = mount
        .options()
        .as_ref()
        .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
    (typ == "bind" || typ.is_empty() && bind_option || typ == "none" && bind_option)
        && mount.source().as_ref().is_some_and(|s| s.is_absolute())
}

/// Rewrites `spec` of container `id` for the guest. `sandbox_pid` is the guest
/// pid of the pod's sandbox container (for [`Role::PodMember`]): the
/// namespaces containerd asks to join are that container's.
pub fn for_guest(mut spec: Spec, id: &str, role: &Role, sandbox_pid: Option<u32>) -> GuestSpec {
    let mut notes = Vec::new();
    let mut binds = Vec::new();

    if let Some(mounts) = spec.mounts().clone() {
        let mut out = Vec::with_capacity(mounts.len());
        for (n, mut mount) in mounts.into_iter().enumerate() {
            if mount.destination() == Path::new("/dev/shm") && is_host_bind(&mount) {
                // The pod's /dev/shm is a host tmpfs: shared memory does not
                // cross the VM boundary, so each container gets a guest tmpfs.
                mount.set_typ(Some("tmpfs".into()));
                mount.set_source(Some("shm".into()));
                mount.set_options(Some(
                    ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
                        .map(String::from)
                        .to_vec(),
                ));
                notes.push("/dev/shm is a tmpfs of the guest".into());
            } else if is_host_bind(&mount) {
                let source = mount.source().clone().unwrap_or_default();
                let share_name = format!("{id}/mounts/{n}");
                mount.set_source(Some(
                    Path::new(crate::sandbox::GUEST_SHARE_DIR).join(&share_name),
                ));
                binds.push(HostBind { source, share_name });
            }
            out.push(mount);
        }
        spec.set_mounts(Some(out));
    }

    if let Some(process) = spec.process_mut() {
        let mut env = process.env().clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            // runc's and Docker's default: a spec without PATH (`ctr run
            // --rootfs`) still finds `sh`.
            env.push(format!("PATH={DEFAULT_PATH}"));
            process.set_env(Some(env));
        }
    }

    if spec.hooks().is_some() {
        spec.set_hooks(None);
        notes.push(
            "OCI hooks left out of the guest's spec: they are host binaries (bulkhead-runtime \
             runs the host-side ones itself)"
                .into(),
        );
    }

    if let Some(linux) = spec.linux_mut() {
        if let Some(namespaces) = linux.namespaces().clone() {
            let rewritten = namespaces
                .into_iter()
                .filter_map(|ns| guest_namespace(ns, role, sandbox_pid, &mut notes))
                .collect();
            linux.set_namespaces(Some(rewritten));
        }
        let cgroup_ok = linux
            .cgroups_path()
            .as_ref()
            .is_some_and(|p| p.is_absolute() && !p.to_string_lossy().contains(':'));
        if !cgroup_ok {
            // systemd-style "slice:prefix:name" paths, or none: the guest has
            // no systemd; give the container a plain cgroupfs path.
            linux.set_cgroups_path(Some(PathBuf::from(format!("/bulkhead/{id}"))));
        }
    }

    GuestSpec { spec, binds, notes }
}

/// One namespace entry for the guest, or `None` to drop it.
fn guest_namespace(
    ns: LinuxNamespace,
    role: &Role,
    sandbox_pid: Option<u32>,
    notes: &mut Vec<String>,
) -> Option<LinuxNamespace> {
    let Some(path) = ns.path().clone() else {
        return Some(ns);
    };
    let name = namespace_file(ns.typ());
    match (role, sandbox_pid, name) {
        (Role::PodMember { .. }, Some(pid), Some(name)) => {
            let mut joined = ns.clone();
            joined.set_path(Some(PathBuf::from(format!("/proc/{pid}/ns/{name}"))));
            Some(joined)
        }
        _ => {
            // A host namespace (CNI's network namespace, or one of another
            // host process) cannot be joined from the guest: the container
            // gets a new one of its own.
            notes.push(format!(
                "{:?} namespace {} is a host one: the container gets a new one in the guest",
                ns.typ(),
                path.display()
            ));
            let mut fresh = ns.clone();
            fresh.set_path(None);
            Some(fresh)
        }
    }
}

/// The name of a namespace's file under /proc/<pid>/ns.
fn namespace_file(typ: LinuxNamespaceType) -> Option<&'static str> {
    Some(match typ {
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Time => "time",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    fn cri_spec(kind: &str, sandbox: &str) -> Spec {
        spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sleep", "1"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "annotations": {CONTAINER_TYPE: kind, SANDBOX_ID: sandbox},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind",
                 "source": "/var/lib/containerd/sandboxes/p1/hosts", "options": ["rbind", "rw"]},
                {"destination": "/dev/shm", "type": "bind",
                 "source": "/run/containerd/sandboxes/p1/shm", "options": ["rbind", "ro"]},
                {"destination": "/data", "source": "/srv/data", "options": ["rbind"]}
            ],
            "hooks": {"createRuntime": [{"path": "/usr/bin/true"}]},
            "linux": {
                "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:c1",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/proc/4242/ns/net"},
                    {"type": "ipc", "path": "/proc/4242/ns/ipc"},
                    {"type": "mount"}
                ]
            }
        }))
    }

    #[test]
    fn a_pod_sharing_host_namespaces_is_refused_by_name() {
        let pod = cri_spec("sandbox", "p1");
        assert_eq!(refused_host_namespaces(&pod, &Role::PodSandbox), None);
        let mut host_net = pod.clone();
        let mut linux = host_net.linux().clone().unwrap();
        linux.set_namespaces(Some(
            linux
                .namespaces()
                .clone()
                .unwrap()
                .into_iter()
                .filter(|n| {
                    !matches!(
                        n.typ(),
                        LinuxNamespaceType::Network | LinuxNamespaceType::Ipc
                    )
                })
                .collect(),
        ));
        host_net.set_linux(Some(linux));
        let why = refused_host_namespaces(&host_net, &Role::PodSandbox).unwrap();
        assert!(why.contains("hostNetwork: true, hostIPC: true"), "{why}");
        assert!(!why.contains("hostPID"), "{why}");
        // Only the sandbox is judged: its members inherit what it has.
        let member = Role::PodMember {
            sandbox_id: "p1".into(),
        };
        assert_eq!(refused_host_namespaces(&host_net, &member), None);
        assert_eq!(refused_host_namespaces(&host_net, &Role::Standalone), None);
    }

    #[test]
    fn roles_come_from_cri_annotations() {
        assert_eq!(Role::of(&cri_spec("sandbox", "p1"), "p1"), Role::PodSandbox);
        assert_eq!(
            Role::of(&cri_spec("container", "p1"), "c1"),
            Role::PodMember {
                sandbox_id: "p1".into()
            }
        );
        let plain = spec(serde_json::json!({"ociVersion": "1.0.2"}));
        assert_eq!(Role::of(&plain, "t1"), Role::Standalone);
        assert_eq!(
            Role::PodMember {
                sandbox_id: "p1".into()
            }
            .vm_id("c1"),
            "p1"
        );
        assert_eq!(Role::Standalone.vm_id("t1"), "t1");
    }

    #[test]
    fn members_join_the_sandbox_namespaces_in_the_guest() {
        let role = Role::of(&cri_spec("container", "p1"), "c1");
        let out = for_guest(cri_spec("container", "p1"), "c1", &role, Some(7));
        let ns = out
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap();
        let paths: Vec<_> = ns.iter().map(|n| n.path().clone()).collect();
        assert_eq!(
            paths,
            vec![
                None,
                Some(PathBuf::from("/proc/7/ns/net")),
                Some(PathBuf::from("/proc/7/ns/ipc")),
                None
            ]
        );
    }

    #[test]
    fn a_sandbox_gets_fresh_guest_namespaces() {
        let out = for_guest(cri_spec("sandbox", "p1"), "p1", &Role::PodSandbox, None);
        let ns = out
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap();
        assert!(ns.iter().all(|n| n.path().is_none()));
        assert_eq!(ns.len(), 4, "namespaces are kept, only their paths go");
        assert!(out.notes.iter().any(|n| n.contains("/proc/4242/ns/net")));
    }

    #[test]
    fn host_binds_go_through_the_share_and_shm_becomes_a_guest_tmpfs() {
        let out = for_guest(cri_spec("sandbox", "p1"), "p1", &Role::PodSandbox, None);
        assert_eq!(
            out.binds,
            vec![
                HostBind {
                    source: "/var/lib/containerd/sandboxes/p1/hosts".into(),
                    share_name: "p1/mounts/1".into()
                },
                HostBind {
                    source: "/srv/data".into(),
                    share_name: "p1/mounts/3".into()
                },
            ]
        );
        let mounts = out.spec.mounts().clone().unwrap();
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(
            mounts[1].source().as_deref(),
            Some(Path::new("/run/bulkhead/share/p1/mounts/1"))
        );
        assert_eq!(mounts[2].typ().as_deref(), Some("tmpfs"));
        assert_eq!(
            mounts[3].source().as_deref(),
            Some(Path::new("/run/bulkhead/share/p1/mounts/3"))
        );
    }

    #[test]
    fn hooks_go_and_systemd_cgroup_paths_become_cgroupfs_ones() {
        let out = for_guest(cri_spec("sandbox", "p1"), "p1", &Role::PodSandbox, None);
        assert!(out.spec.hooks().is_none());
        let env = out.spec.process().as_ref().unwrap().env().clone().unwrap();
        assert_eq!(env, vec![format!("PATH={DEFAULT_PATH}")]);
        assert_eq!(
            out.spec.linux().as_ref().unwrap().cgroups_path().as_deref(),
            Some(Path::new("/bulkhead/p1"))
        );
        let mut plain = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"cgroupsPath": "/default/t1"}
        }));
        plain = for_guest(plain, "t1", &Role::Standalone, None).spec;
        assert_eq!(
            plain.linux().as_ref().unwrap().cgroups_path().as_deref(),
            Some(Path::new("/default/t1"))
        );
    }
}
