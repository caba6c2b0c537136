//! Pure translations between the agent API's messages and the container core:
//! the spec changes of `CreateContainer` (rootfs, init wrapper), the stdio
//! pipes a request asks for, wait statuses and statistics.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use bulkhead_protocol::agent::{
    CpuStats, IoDeviceStats, IoStats, MemoryStats, PidsStats, StatsContainerResponse,
    WaitProcessResponse,
};
use nix::fcntl::OFlag;
use oci_spec::runtime::{MountBuilder, Spec};

use crate::cgroup::CgroupStats;
use crate::init_mode::{self, INIT_PATH};
use crate::registry::{ExitInfo, HostEnds, StreamSet};
use crate::stdio::Stdio;
use crate::ExitStatus;

/// Where the agent mounts the virtio-fs share in the guest.
pub const SHARE_DIR: &str = "/run/bulkhead/share";

/// The virtio-fs tag of the share (the shim's `SHARE_TAG`).
pub const SHARE_TAG: &str = "bulkhead";

/// The container rootfs for a `rootfs_path` relative to the share. The path was
/// validated (relative, no `..`); components are checked again here so that
/// nothing outside the share is ever named.
pub fn rootfs_in_share(share: &Path, rootfs_path: &str) -> Option<PathBuf> {
    let rel = Path::new(rootfs_path);
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return None;
    }
    Some(share.join(rel))
}

/// Runs the container's init process under the agent's init mode: bind-mounts
/// `init_binary` read-only at [`INIT_PATH`] (on the container's /dev tmpfs) and
/// prepends it to `process.args`. Does nothing when the spec has no process,
/// no args, or is wrapped already. Returns whether it wrapped.
pub fn wrap_init(spec: &mut Spec, init_binary: &Path) -> Result<bool, String> {
    let Some(process) = spec.process_mut().as_mut() else {
        return Ok(false);
    };
    let args = match process.args() {
        Some(args) if !args.is_empty() => args.clone(),
        _ => return Ok(false),
    };
    if args[0] == INIT_PATH {
        return Ok(false);
    }
    process.set_args(Some(init_mode::wrap_args(&args)));
    let mount = MountBuilder::default()
        .destination(INIT_PATH)
        .typ("bind")
        .source(init_binary)
        .options(vec!["bind".to_string(), "ro".to_string()])
        .build()
        .map_err(|e| format!("init mount: {e}"))?;
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(mount);
    spec.set_mounts(Some(mounts));
    Ok(true)
}

/// Makes the pipes for a non-terminal process: the [`Stdio`] the container
/// gets, and the agent's ends. A stream not requested is /dev/null. Every pipe
/// is close-on-exec, so no other container inherits an end.
pub fn pipes(requested: StreamSet) -> nix::Result<(Stdio, HostEnds)> {
    use bulkhead_protocol::stream::StreamKind;
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC);
    let mut ends = HostEnds::default();
    let (mut stdin, mut stdout, mut stderr): (Option<OwnedFd>, _, _) = (None, None, None);
    if requested.contains(StreamKind::Stdin) {
        let (r, w) = pipe()?;
        stdin = Some(r);
        ends.stdin = Some(w);
    }
    if requested.contains(StreamKind::Stdout) {
        let (r, w) = pipe()?;
        stdout = Some(w);
        ends.stdout = Some(r);
    }
    if requested.contains(StreamKind::Stderr) {
        let (r, w) = pipe()?;
        stderr = Some(w);
        ends.stderr = Some(r);
    }
    Ok((
        Stdio::Fds {
            stdin,
            stdout,
            stderr,
        },
        ends,
    ))
}

/// The `WaitProcess` reply for an exit.
pub fn wait_response(info: ExitInfo) -> WaitProcessResponse {
    match info.status {
        ExitStatus::Exited(code) => {
            WaitProcessResponse::exited(u32::try_from(code & 0xff).unwrap_or(255), info.at)
        }
        ExitStatus::Signaled { signal, .. } => {
            WaitProcessResponse::killed(u32::try_from(signal).unwrap_or(0), info.at)
        }
    }
}

/// The `StatsContainer` reply for the core's statistics.
pub fn stats_response(s: &CgroupStats) -> StatsContainerResponse {
    let stat = |key: &str| s.memory.stat.get(key).copied().unwrap_or(0);
    let mut r = StatsContainerResponse::new();
    let mut cpu = CpuStats::new();
    cpu.usage_usec = s.cpu.usage_usec;
    cpu.user_usec = s.cpu.user_usec;
    cpu.system_usec = s.cpu.system_usec;
    cpu.nr_periods = s.cpu.nr_periods;
    cpu.nr_throttled = s.cpu.nr_throttled;
    cpu.throttled_usec = s.cpu.throttled_usec;
    r.cpu = Some(cpu).into();
    let mut mem = MemoryStats::new();
    mem.current = s.memory.current;
    mem.max = s.memory.limit;
    mem.anon = stat("anon");
    mem.file = stat("file");
    mem.kernel = stat("kernel");
    mem.oom = s.memory.events.oom;
    mem.oom_kill = s.memory.events.oom_kill;
    r.memory = Some(mem).into();
    let mut pids = PidsStats::new();
    pids.current = s.pids.current;
    pids.max = s.pids.limit;
    r.pids = Some(pids).into();
    let mut io = IoStats::new();
    io.devices =
        s.io.iter()
            .take(bulkhead_protocol::limits::MAX_IO_DEVICES)
            .map(|d| {
                let mut e = IoDeviceStats::new();
                e.major = u32::try_from(d.major).unwrap_or(u32::MAX);
                e.minor = u32::try_from(d.minor).unwrap_or(u32::MAX);
                e.rbytes = d.rbytes;
                e.wbytes = d.wbytes;
                e.rios = d.rios;
                e.wios = d.wios;
                e
            })
            .collect();
    r.io = Some(io).into();
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_protocol::agent::wait_process_response::Status;
    use bulkhead_protocol::stream::StreamKind;
    use bulkhead_protocol::Validate;
    use std::time::SystemTime;

    #[test]
    fn rootfs_stays_in_the_share() {
        let share = Path::new("/run/bulkhead/share");
        assert_eq!(
            rootfs_in_share(share, "bh-1234abcd"),
            Some(PathBuf::from("/run/bulkhead/share/bh-1234abcd"))
        );
        assert_eq!(
            rootfs_in_share(share, "a/./b"),
            Some(PathBuf::from("/run/bulkhead/share/a/b"))
        );
        assert_eq!(rootfs_in_share(share, "../x"), None);
        assert_eq!(rootfs_in_share(share, "/etc"), None);
    }

    #[test]
    fn init_wrapper_mount_and_args() {
        let mut spec = Spec::default();
        let before = spec.mounts().as_ref().map_or(0, Vec::len);
        let args = vec!["sh".to_string(), "-c".to_string(), "exit 7".to_string()];
        spec.process_mut().as_mut().unwrap().set_args(Some(args));
        assert_eq!(wrap_init(&mut spec, Path::new("/init")), Ok(true));
        let p = spec.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &vec![INIT_PATH, "--", "sh", "-c", "exit 7"]
        );
        let mounts = spec.mounts().as_ref().unwrap();
        assert_eq!(mounts.len(), before + 1);
        let m = mounts.last().unwrap();
        assert_eq!(m.destination(), Path::new(INIT_PATH));
        assert_eq!(m.source().as_deref(), Some(Path::new("/init")));
        assert_eq!(m.typ().as_deref(), Some("bind"));
        assert_eq!(
            m.options().as_ref().unwrap(),
            &vec!["bind".to_string(), "ro".to_string()]
        );
        // The default spec mounts a tmpfs on /dev before our mount.
        assert!(mounts[..before]
            .iter()
            .any(|m| m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs")));
        // Wrapping twice is a no-op.
        assert_eq!(wrap_init(&mut spec, Path::new("/init")), Ok(false));
        assert_eq!(spec.mounts().as_ref().unwrap().len(), before + 1);
    }

    #[test]
    fn no_args_no_wrap() {
        let mut spec = Spec::default();
        spec.process_mut().as_mut().unwrap().set_args(Some(vec![]));
        assert_eq!(wrap_init(&mut spec, Path::new("/init")), Ok(false));
        spec.set_process(None);
        assert_eq!(wrap_init(&mut spec, Path::new("/init")), Ok(false));
    }

    #[test]
    fn pipes_for_requested_streams_only() {
        let (stdio, ends) = pipes(StreamSet::requested(false, true, true, false)).unwrap();
        assert!(ends.stdin.is_none() && ends.stdout.is_some() && ends.stderr.is_some());
        match stdio {
            Stdio::Fds {
                stdin,
                stdout,
                stderr,
            } => assert!(stdin.is_none() && stdout.is_some() && stderr.is_some()),
            other => panic!("{other:?}"),
        }
        let (_, ends) = pipes(StreamSet::default()).unwrap();
        assert!(ends.stdin.is_none() && ends.stdout.is_none());
        let mut s = StreamSet::default();
        s.insert(StreamKind::Stdin);
        let (_, ends) = pipes(s).unwrap();
        assert!(ends.stdin.is_some());
    }

    #[test]
    fn wait_replies_like_runc() {
        let at = SystemTime::now();
        let r = wait_response(ExitInfo {
            status: ExitStatus::Exited(143),
            at,
        });
        assert_eq!(r.status, Some(Status::ExitCode(143)));
        assert!(r.validate().is_ok());
        let r = wait_response(ExitInfo {
            status: ExitStatus::Signaled {
                signal: 9,
                core_dumped: false,
            },
            at,
        });
        assert_eq!(r.status, Some(Status::Signal(9)));
        assert_eq!(r.shell_status(), Some(137));
        assert!(r.validate().is_ok());
    }

    #[test]
    fn stats_map_every_field() {
        let mut s = CgroupStats::default();
        s.cpu.usage_usec = 5;
        s.memory.current = 10;
        s.memory.limit = Some(32 << 20);
        s.memory.stat.insert("anon".into(), 3);
        s.memory.events.oom_kill = 2;
        s.pids.current = 4;
        s.io.push(crate::cgroup::IoDeviceStats {
            major: 254,
            minor: 0,
            rbytes: 1,
            ..Default::default()
        });
        let r = stats_response(&s);
        assert_eq!(r.cpu.usage_usec, 5);
        assert_eq!(r.memory.current, 10);
        assert_eq!(r.memory.max, Some(32 << 20));
        assert_eq!(r.memory.anon, 3);
        assert_eq!(r.memory.oom_kill, 2);
        assert_eq!(r.pids.current, 4);
        assert_eq!(r.pids.max, None);
        assert_eq!(r.io.devices[0].major, 254);
        assert!(r.validate().is_ok());
    }
}
