//! The runc commands other than `exec`, each on the sandbox core: the keeper
//! holds the VM; these find it through the container's record under
//! `--root` and talk to its agent or its control socket.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bulkhead_protocol::agent::{
    ListProcessesRequest, PauseContainerRequest, ResumeContainerRequest, SignalProcessRequest,
    StatsContainerRequest, StatsContainerResponse, UpdateContainerRequest,
};
use bulkhead_protocol::ttrpc;
use nix::sys::signal::Signal;
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Spec};

use super::args::CreateArgs;
use super::handoff;
use super::state::{now_rfc3339, Record, Root, Status};
use crate::config::Config;
use crate::sandbox::{AgentConnection, RPC_TIMEOUT};

/// How long `start` waits for the keeper's answer (the start RPC, and a
/// network join when the engine wired the namespace after create).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `create`: claims the id, starts the keeper (with our `global` flags) and
/// waits until the container is created in its VM; writes the keeper's pid
/// to `--pid-file`.
pub fn create(root: &Root, args: &CreateArgs, global: &[OsString]) -> Result<u32> {
    if args.preserve_fds > 0 {
        bail!(
            "--preserve-fds {}: descriptors cannot be passed into a microVM",
            args.preserve_fds
        );
    }
    super::state::check_id(&args.id)?;
    let bundle = std::path::absolute(&args.bundle)
        .with_context(|| format!("bundle {}", args.bundle.display()))?;
    let config_path = bundle.join("config.json");
    let spec = Spec::load(&config_path).map_err(|e| {
        anyhow!(
            "cannot load the bundle's spec {}: {e}",
            config_path.display()
        )
    })?;
    let rootfs = check_spec(&spec, &bundle, &args.id)?;
    let config = Config::load().context("reading bulkhead's config")?;
    root.claim(&args.id)?;
    let record = Record {
        id: args.id.clone(),
        bundle,
        rootfs,
        created: now_rfc3339(),
        annotations: spec.annotations().clone().unwrap_or_default(),
        keeper: None,
        status: Status::Creating,
        exit_code: None,
        run_root: config.run_root.clone(),
        owns_netns: matches!(crate::sandbox::bundle::spec_netns(&spec), Some(None)),
        host_cgroup: None,
    };
    let started = (|| {
        root.save(&record)?;
        let mut before: Vec<OsString> = global.to_vec();
        before.push("__keeper".into());
        let mut after: Vec<OsString> = Vec::new();
        if let Some(socket) = &args.console_socket {
            after.extend(["--console-socket".into(), socket.into()]);
        }
        after.push(OsString::from(&args.id));
        let pending = handoff::spawn(&before, &after)?;
        let keeper_pid = pending.child.id();
        let mut record = record.clone();
        record.keeper = crate::sandbox::process_start_ticks(keeper_pid).map(|t| (keeper_pid, t));
        root.save(&record)?;
        // The boot's own deadline, plus the container's creation.
        let timeout = config.boot_timeout() + Duration::from_secs(30);
        let pid = pending.wait_ready(timeout)?;
        if let Some(path) = &args.pid_file {
            handoff::write_pid_file(path, pid)?;
        }
        Ok::<_, anyhow::Error>(pid)
    })();
    match started {
        Ok(pid) => Ok(pid),
        Err(e) => {
            // A keeper that reported its failure cleaned up after itself
            // (and what it found in its way, e.g. a sandbox directory of the
            // same name, is not ours to remove); one that was killed left
            // its VM's directory and mounts.
            if e.downcast_ref::<handoff::Reported>().is_none() {
                cleanup(root, &record);
            }
            let _ = root.forget(&args.id);
            Err(e.context(format!("creating container {}", args.id)))
        }
    }
}

/// The spec's rootfs (absolute), after checking what a microVM cannot do.
fn check_spec(spec: &Spec, bundle: &Path, id: &str) -> Result<PathBuf> {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    let rootfs = if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    };
    if !rootfs.is_dir() {
        bail!(
            "container {id}: the spec's root.path {} is not a directory",
            rootfs.display()
        );
    }
    let has_netns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::Network));
    if !has_netns {
        bail!(
            "container {id}: the spec shares the host's network namespace (podman --network host, \
             docker --network host), which a microVM cannot: it has its own kernel and network \
             stack. Use a bridge network (the default) or --network none"
        );
    }
    Ok(rootfs)
}

/// Removes what a dead keeper may have left: the VM's run directory (its
/// mounts first) and the network namespace made for it.
fn cleanup(root: &Root, record: &Record) {
    if let Some(pid) = record.live_keeper() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        // Its VM and virtiofsd die with it; give them a moment.
        for _ in 0..50 {
            if record.live_keeper().is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if let Err(e) = crate::sandbox::force_remove(&record.run_root, &record.id) {
        tracing::warn!(container = %record.id, "removing the sandbox's leftovers: {e}");
    }
    if record.owns_netns {
        let ns = crate::sandbox::bundle::owned_netns_path(&record.run_root, &record.id);
        if ns.exists() {
            if let Err(e) = crate::sandbox::network::netns::remove(&ns) {
                tracing::warn!(container = %record.id, "removing {}: {e}", ns.display());
            }
        }
    }
    let _ = std::fs::remove_file(root.control_socket(&record.id));
    // Re-read: the keeper records the cgroup it joined after create began.
    let cgroup = root
        .load(&record.id)
        .ok()
        .and_then(|r| r.host_cgroup)
        .or_else(|| record.host_cgroup.clone());
    if let Some(dir) = cgroup {
        // The VMM and virtiofsd leave it a moment after the keeper.
        for _ in 0..100 {
            let empty = std::fs::read_to_string(dir.join("cgroup.procs"))
                .map_or(true, |p| p.trim().is_empty());
            if empty {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        super::host_cgroup::remove(&dir);
    }
}

/// `start`: asks the keeper to start the init.
pub fn start(root: &Root, id: &str) -> Result<()> {
    let record = root.load(id)?;
    match record.effective_status() {
        Status::Created => {}
        Status::Stopped => bail!("cannot start a container that has stopped: {id}"),
        Status::Creating => bail!("container {id} is still being created"),
        _ => bail!("cannot start an already running container: {id}"),
    }
    let socket = root.control_socket(id);
    let reach = || {
        let short = super::state::ShortPath::new(&socket)?;
        UnixStream::connect(short.path())
    };
    let mut stream = reach()
        .with_context(|| format!("reaching container {id}'s keeper at {}", socket.display()))?;
    stream.set_read_timeout(Some(START_TIMEOUT))?;
    stream.write_all(b"start\n")?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .with_context(|| format!("waiting for container {id} to start"))?;
    match line.trim_end() {
        "ok" => Ok(()),
        l if l.starts_with("error ") => Err(anyhow!("{}", l[6..].replace("\\n", "\n"))),
        _ => Err(anyhow!(
            "container {id}'s keeper exited while starting it; see {}",
            root.keeper_log(id).display()
        )),
    }
}

/// `state`: the runtime-spec state document.
pub fn state(root: &Root, id: &str) -> Result<serde_json::Value> {
    Ok(root.load(id)?.oci_state())
}

/// A signal by name (`KILL`, `SIGKILL`, any case) or number.
pub fn parse_signal(text: &str) -> Result<i32> {
    if let Ok(n) = text.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("invalid signal {text}: numbers are 1 to 64");
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .map(|s| s as i32)
        .map_err(|_| anyhow!("invalid signal {text}: not a signal name or number"))
}

async fn connect(record: &Record) -> Result<AgentConnection> {
    AgentConnection::attach(&record.run_root, &record.id)
        .await
        .with_context(|| format!("reaching container {}'s microVM", record.id))
}

/// `kill`: signals the init (or, with `--all`, every process of the
/// container) in the guest. Before start, the keeper itself takes the
/// signal and tears the VM down.
pub async fn kill(root: &Root, id: &str, signal: &str, all: bool) -> Result<()> {
    let number = parse_signal(signal)?;
    let record = root.load(id)?;
    match record.effective_status() {
        Status::Stopped => bail!("container not running"),
        Status::Created | Status::Creating => {
            let pid = record.live_keeper().context("container not running")?;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                Signal::try_from(number).ok(),
            )
            .with_context(|| format!("signalling container {id}'s keeper"))?;
            return Ok(());
        }
        Status::Running | Status::Paused => {}
    }
    let conn = connect(&record).await?;
    let mut req = SignalProcessRequest::new();
    req.container_id = id.to_owned();
    req.signal = number as u32;
    req.all = all;
    conn.agent()
        .signal_process(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
        .await
        .with_context(|| format!("signalling container {id}"))?;
    Ok(())
}

/// `delete`: removes a stopped or created container (a running one with
/// `--force`), killing its keeper first, and everything it left.
pub fn delete(root: &Root, id: &str, force: bool) -> Result<()> {
    let record = match root.load(id) {
        Ok(r) => r,
        // runc: deleting what is not there is an error, except with --force.
        Err(super::state::StateError::NotFound(_)) if force => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let status = record.effective_status();
    // runc deletes a created container (killing its waiting init) without
    // --force; a running or paused one needs it.
    if matches!(status, Status::Running | Status::Paused) && !force {
        bail!(
            "cannot delete container {id} that is not stopped: {}",
            status.as_str()
        );
    }
    cleanup(root, &record);
    root.forget(id)?;
    Ok(())
}

/// `list`.
pub fn list(root: &Root, format: &str, quiet: bool) -> Result<String> {
    let records: Vec<Record> = root
        .ids()
        .iter()
        .filter_map(|id| root.load(id).ok())
        .collect();
    if quiet {
        return Ok(records.iter().map(|r| format!("{}\n", r.id)).collect());
    }
    match format {
        "json" => Ok(serde_json::to_string(
            &records.iter().map(Record::oci_state).collect::<Vec<_>>(),
        )? + "\n"),
        "table" => {
            let mut out = format!(
                "{:<20} {:<10} {:<10} {:<40} {:<30} OWNER\n",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED"
            );
            for r in &records {
                let s = r.oci_state();
                out += &format!(
                    "{:<20} {:<10} {:<10} {:<40} {:<30} root\n",
                    r.id,
                    s["pid"],
                    r.effective_status().as_str(),
                    r.bundle.display(),
                    r.created
                );
            }
            Ok(out)
        }
        other => bail!("invalid format {other:?}: use table or json"),
    }
}

/// `ps`: the host process that stands for the container (its processes
/// are in the guest's kernel, where host pids do not reach), and with
/// `table` their guest pids too.
pub async fn ps(root: &Root, id: &str, format: &str) -> Result<String> {
    let record = root.load(id)?;
    let keeper = record.live_keeper().context("container not running")?;
    match format {
        "json" => Ok(serde_json::to_string(&[keeper])? + "\n"),
        "table" => {
            let conn = connect(&record).await?;
            let mut req = ListProcessesRequest::new();
            req.container_id = id.to_owned();
            let reply = conn
                .agent()
                .list_processes(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
                .await
                .with_context(|| format!("listing container {id}'s processes"))?;
            let mut out = "HOST PID  GUEST PID\n".to_owned();
            for pid in &reply.pids {
                out += &format!("{keeper:<9} {pid}\n");
            }
            Ok(out)
        }
        other => bail!("invalid format {other:?}: use table or json"),
    }
}

/// `pause` and `resume`: freeze or thaw the container's cgroup in the guest.
pub async fn freeze(root: &Root, id: &str, frozen: bool) -> Result<()> {
    let record = root.load(id)?;
    let status = record.effective_status();
    let expected = if frozen {
        Status::Running
    } else {
        Status::Paused
    };
    if status != expected {
        bail!(
            "container {id} is {}, not {}",
            status.as_str(),
            expected.as_str()
        );
    }
    let conn = connect(&record).await?;
    let ctx = ttrpc::context::with_duration(RPC_TIMEOUT);
    if frozen {
        let mut req = PauseContainerRequest::new();
        req.container_id = id.to_owned();
        conn.agent().pause_container(ctx, &req).await.map(|_| ())
    } else {
        let mut req = ResumeContainerRequest::new();
        req.container_id = id.to_owned();
        conn.agent().resume_container(ctx, &req).await.map(|_| ())
    }
    .with_context(|| {
        format!(
            "{} container {id}",
            if frozen { "pausing" } else { "resuming" }
        )
    })?;
    let next = if frozen {
        Status::Paused
    } else {
        Status::Running
    };
    root.set_status(id, next, None);
    Ok(())
}

/// One `events --stats` document, in runc's shape (`type`, `id`, `data`).
pub async fn stats(root: &Root, id: &str) -> Result<serde_json::Value> {
    let record = root.load(id)?;
    if record.effective_status() == Status::Stopped {
        bail!("container {id} is not running");
    }
    let conn = connect(&record).await?;
    let mut req = StatsContainerRequest::new();
    req.container_id = id.to_owned();
    let s: StatsContainerResponse = conn
        .agent()
        .stats_container(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
        .await
        .with_context(|| format!("reading container {id}'s statistics"))?;
    let cpu = s.cpu.as_ref();
    let mem = s.memory.as_ref();
    let pids = s.pids.as_ref();
    Ok(serde_json::json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {
                "usage": {
                    "total": cpu.map_or(0, |c| c.usage_usec * 1000),
                    "user": cpu.map_or(0, |c| c.user_usec * 1000),
                    "kernel": cpu.map_or(0, |c| c.system_usec * 1000),
                },
                "throttling": {
                    "periods": cpu.map_or(0, |c| c.nr_periods),
                    "throttledPeriods": cpu.map_or(0, |c| c.nr_throttled),
                    "throttledTime": cpu.map_or(0, |c| c.throttled_usec * 1000),
                },
            },
            "memory": {
                "usage": {
                    "usage": mem.map_or(0, |m| m.current),
                    "limit": mem.and_then(|m| m.max).unwrap_or(u64::MAX),
                },
                "oom_kill": mem.map_or(0, |m| m.oom_kill),
            },
            "pids": {
                "current": pids.map_or(0, |p| p.current),
                "limit": pids.and_then(|p| p.max).unwrap_or(0),
            },
        },
    }))
}

/// `update`: new resource limits for the running container.
pub async fn update(root: &Root, id: &str, resources: LinuxResources) -> Result<()> {
    let record = root.load(id)?;
    if record.effective_status() == Status::Stopped {
        bail!("container {id} is not running");
    }
    let conn = connect(&record).await?;
    let mut req = UpdateContainerRequest::new();
    req.container_id = id.to_owned();
    req.resources_json = serde_json::to_vec(&resources)?;
    conn.agent()
        .update_container(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
        .await
        .with_context(|| format!("updating container {id}'s resources"))?;
    Ok(())
}

/// `features`: what this runtime supports, in the runtime-spec's
/// `features` document.
pub fn features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": super::state::OCI_VERSION,
        "hooks": [],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec",
                         "private", "rprivate", "slave", "rslave", "shared", "rshared"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": caps::all().iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": true},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
        },
        "annotations": {
            "io.bulkhead.runtime": "microVM",
            crate::sandbox::bundle::EGRESS_ANNOTATION: "egress policy, as bulkhead run --egress",
        },
    })
}

/// `spec`: a starter config.json (runc's defaults: `sh` in `rootfs`).
pub fn write_spec(bundle: &Path) -> Result<PathBuf> {
    let path = bundle.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let mut spec = Spec::default();
    if let Some(p) = spec.process_mut() {
        p.set_terminal(Some(true));
    }
    spec.save(&path)
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("SIGTERM").unwrap(), 15);
        assert_eq!(parse_signal("term").unwrap(), 15);
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn a_spec_on_the_hosts_network_is_refused_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("rootfs")).unwrap();
        // runc's default spec has a new network namespace.
        let mut spec = Spec::default();
        assert_eq!(
            check_spec(&spec, tmp.path(), "c1").unwrap(),
            tmp.path().join("rootfs")
        );
        let mut linux = spec.linux().clone().unwrap();
        let mut namespaces = linux.namespaces().clone().unwrap();
        namespaces.retain(|n| n.typ() != LinuxNamespaceType::Network);
        linux.set_namespaces(Some(namespaces));
        spec.set_linux(Some(linux));
        let err = check_spec(&spec, tmp.path(), "c1").unwrap_err().to_string();
        assert!(err.contains("host's network namespace"), "{err}");
        let err = check_spec(&spec, &tmp.path().join("nope"), "c1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a directory"), "{err}");
    }
}
