//! `bulkhead ps`, `logs`, `stop`, `kill`, `rm` and `inspect`: the containers
//! of this host, found through their state files, reached through their
//! microVM's agent.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bulkhead_protocol::agent::SignalProcessRequest;
use bulkhead_protocol::ttrpc;

use super::containers::{now_millis, short, ContainerRecord, ContainerState, Containers, Status};
use crate::config::Config;
use crate::sandbox::container_log::{LogReader, LogStream};
use crate::sandbox::{force_remove, AgentConnection, RPC_TIMEOUT};

/// How long `stop` and `rm -f` wait for a killed container's monitor to
/// record the exit and tear the microVM down.
const TEARDOWN_PATIENCE: Duration = Duration::from_secs(15);

/// The containers of this host.
pub fn containers(config: &Config) -> Result<Containers> {
    Ok(Containers::open(&super::state_root(config))?)
}

/// `bulkhead ps [-a] [-q]`.
pub fn ps(config: &Config, all: bool, quiet: bool) -> Result<()> {
    let c = containers(config)?;
    let mut rows = Vec::new();
    for id in c.ids()? {
        let (Ok(record), Ok(state)) = (c.record(&id), c.state(&id)) else {
            continue;
        };
        let status = state.effective_status();
        if !all && status != Status::Running {
            continue;
        }
        rows.push((record, state));
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.0.created));
    if quiet {
        for (record, _) in &rows {
            println!("{}", record.short_id());
        }
        return Ok(());
    }
    println!(
        "{:<12}   {:<20} {:<24} {:<15} {:<26} NAMES",
        "CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS"
    );
    for (record, state) in rows {
        let command = format!("\"{}\"", record.process.args.join(" "));
        println!(
            "{:<12}   {:<20} {:<24} {:<15} {:<26} {}",
            record.short_id(),
            clip(&record.image, 20),
            clip(&command, 24),
            ago(record.created * 1000),
            status_text(&state),
            record.name
        );
    }
    Ok(())
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// "Up 3 seconds", "Exited (0) 2 minutes ago", "Created", as `docker ps`.
fn status_text(state: &ContainerState) -> String {
    match state.effective_status() {
        Status::Created => "Created".to_owned(),
        Status::Running => format!(
            "Up {}",
            span(now_millis().saturating_sub(state.started_at.unwrap_or(0)))
        ),
        Status::Exited if state.status != Status::Exited => "Exited (monitor died)".to_owned(),
        Status::Exited => format!(
            "Exited ({}) {}",
            state.exit_code.unwrap_or(-1),
            state.finished_at.map(ago).unwrap_or_default()
        ),
    }
}

fn ago(at_millis: u64) -> String {
    format!("{} ago", span(now_millis().saturating_sub(at_millis)))
}

fn span(millis: u64) -> String {
    let s = millis / 1000;
    match s {
        0..=1 => "1 second".to_owned(),
        2..=59 => format!("{s} seconds"),
        60..=119 => "1 minute".to_owned(),
        120..=3599 => format!("{} minutes", s / 60),
        3600..=7199 => "1 hour".to_owned(),
        7200..=172_799 => format!("{} hours", s / 3600),
        _ => format!("{} days", s / 86400),
    }
}

/// `bulkhead logs [-f] NAME`: stdout records to our stdout, stderr records to
/// our stderr; with `follow`, until the container has exited and its log is
/// read to the end.
pub async fn logs(config: &Config, name: &str, follow: bool) -> Result<()> {
    let c = containers(config)?;
    let id = c.lookup(name)?;
    let path = c.dir(&id).join("log");
    // A container that has not written anything yet has no log file.
    let mut reader = loop {
        match LogReader::open(&path) {
            Ok(r) => break Some(r),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !follow || c.state(&id)?.effective_status() == Status::Exited {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    };
    let Some(reader) = reader.as_mut() else {
        return Ok(());
    };
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    loop {
        // Checked before reading, so the records written before the exit
        // are all read after it.
        let ended = !follow
            || c.state(&id)
                .map_or(true, |s| s.effective_status() == Status::Exited);
        while let Some((stream, bytes)) = reader.next_record()? {
            let w: &mut dyn Write = match stream {
                LogStream::Stdout => &mut out,
                LogStream::Stderr => &mut err,
            };
            if w.write_all(&bytes).is_err() {
                return Ok(()); // our reader went away (`logs -f | head`)
            }
        }
        let _ = out.flush();
        if ended {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `signal` to the container's process, through its microVM's agent.
async fn signal(config: &Config, record: &ContainerRecord, signal: i32) -> Result<()> {
    let conn = AgentConnection::attach(&config.run_root, record.short_id())
        .await
        .with_context(|| format!("reaching the microVM of container {}", record.name))?;
    let mut req = SignalProcessRequest::new();
    req.container_id = record.short_id().to_owned();
    req.signal = signal as u32;
    conn.agent()
        .signal_process(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
        .await
        .with_context(|| format!("signalling container {}", record.name))?;
    Ok(())
}

/// `bulkhead kill [-s SIG] NAME`.
pub async fn kill(config: &Config, name: &str, sig: i32) -> Result<()> {
    let c = containers(config)?;
    let id = c.lookup(name)?;
    let record = c.record(&id)?;
    if c.state(&id)?.effective_status() != Status::Running {
        bail!("container {} is not running", record.name);
    }
    signal(config, &record, sig).await?;
    println!("{name}");
    Ok(())
}

/// `bulkhead stop [-t SECS] NAME`: the image's stop signal, then SIGKILL after
/// `grace`; returns once the container has exited and its microVM is gone.
pub async fn stop(config: &Config, name: &str, grace: Duration) -> Result<()> {
    let c = containers(config)?;
    let id = c.lookup(name)?;
    let record = c.record(&id)?;
    stop_record(config, &c, &record, grace).await?;
    println!("{name}");
    Ok(())
}

async fn stop_record(
    config: &Config,
    c: &Containers,
    record: &ContainerRecord,
    grace: Duration,
) -> Result<()> {
    let id = &record.id;
    let state = c.state(id)?;
    match state.effective_status() {
        Status::Running => {
            if let Err(e) = signal(config, record, record.stop_signal).await {
                tracing::warn!("{e:#}");
            }
            if !wait_monitor_gone(c, id, grace).await {
                if let Err(e) = signal(config, record, libc::SIGKILL).await {
                    tracing::warn!("{e:#}");
                }
            }
        }
        // Still booting: SIGTERM to its monitor cancels the start, which
        // tears down what it had made.
        Status::Created => signal_monitor(&state, nix::sys::signal::Signal::SIGTERM),
        Status::Exited => {}
    }
    if !wait_monitor_gone(c, id, TEARDOWN_PATIENCE).await {
        // The monitor does not respond: end it, then do its cleanup.
        if let Ok(state) = c.state(id) {
            signal_monitor(&state, nix::sys::signal::Signal::SIGKILL);
        }
        wait_monitor_gone(c, id, Duration::from_secs(2)).await;
    }
    // A monitor that died (killed, crashed) left its sandbox and state behind.
    if let Ok(mut state) = c.state(id) {
        if state.status != Status::Exited {
            state.status = Status::Exited;
            state.finished_at = Some(now_millis());
            state.exit_code.get_or_insert(137);
            state
                .error
                .get_or_insert_with(|| "its monitor process died".to_owned());
            c.set_state(id, &state)?;
        }
    }
    // (No state: a `--rm` container its monitor removed once it exited.)
    force_remove(&config.run_root, record.short_id())
        .with_context(|| format!("removing the sandbox of container {}", record.name))?;
    unmount_leftovers(c, id);
    // A monitor that was killed left its network up (its lease, port mappings).
    super::network::down(&c.dir(id))
        .await
        .with_context(|| format!("taking down the network of container {}", record.name))?;
    Ok(())
}

/// Sends `signal` to the container's monitor process, if it is alive.
fn signal_monitor(state: &ContainerState, signal: nix::sys::signal::Signal) {
    if let Some((pid, _)) = state.monitor.filter(|_| state.monitor_alive()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
    }
}

/// Waits until the container's monitor process has ended (or `patience`
/// passed); true if it has.
async fn wait_monitor_gone(c: &Containers, id: &str, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        match c.state(id) {
            Ok(s) if s.monitor_alive() => {}
            _ => return true,
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nothing is normally mounted in a container's directory; this is for a
/// monitor killed mid-start.
fn unmount_leftovers(c: &Containers, id: &str) {
    let dir = c.dir(id);
    while let Some(m) = crate::sandbox::first_mount_under(&dir) {
        if nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

/// `bulkhead rm [-f] NAME...`.
pub async fn rm(config: &Config, names: &[String], force: bool) -> Result<()> {
    let c = containers(config)?;
    let mut failed = false;
    for name in names {
        let result = async {
            let id = c.lookup(name)?;
            let record = c.record(&id)?;
            let status = c.state(&id)?.effective_status();
            if status == Status::Created && !force {
                bail!(
                    "container {} is starting: stop it (`bulkhead stop {}`), or use rm -f",
                    record.name,
                    record.name
                );
            }
            if status == Status::Running && !force {
                bail!(
                    "container {} is running: stop it first (`bulkhead stop {}`), or use rm -f",
                    record.name,
                    record.name
                );
            }
            if status != Status::Exited || c.state(&id).is_ok_and(|s| s.monitor_alive()) {
                stop_record(config, &c, &record, Duration::ZERO).await?;
            } else {
                force_remove(&config.run_root, record.short_id())?;
                super::network::down(&c.dir(&id)).await?;
            }
            c.remove(&id)?;
            println!("{name}");
            Ok(())
        }
        .await;
        if let Err(e) = result {
            eprintln!("bulkhead: {e:#}");
            failed = true;
        }
    }
    if failed {
        bail!("some containers were not removed");
    }
    Ok(())
}

/// Unix milliseconds as RFC 3339 in UTC, as `docker inspect` prints times
/// (`2026-12-07T02:03:19.123Z`); a time that has not happened is Docker's zero
/// time, `0001-01-01T00:00:00Z`, so tools that parse Docker's output parse ours.
fn rfc3339(unix_millis: Option<u64>) -> String {
    match unix_millis {
        Some(ms) => humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string(),
        None => "0001-01-01T00:00:00Z".to_owned(),
    }
}

/// `bulkhead inspect NAME...`: a JSON array, one object per container, with
/// Docker's field names where they mean the same.
pub fn inspect(config: &Config, names: &[String]) -> Result<()> {
    let c = containers(config)?;
    let mut out = Vec::new();
    for name in names {
        let id = c.lookup(name)?;
        let (record, state) = (c.record(&id)?, c.state(&id)?);
        let status = state.effective_status();
        out.push(serde_json::json!({
            "Id": record.id,
            "Name": record.name,
            "Created": rfc3339(Some(record.created * 1000)),
            "Image": record.image_id.clone().unwrap_or_default(),
            "Config": {
                "Image": record.image,
                "Cmd": record.process.args,
                "Env": record.process.env,
                "WorkingDir": record.process.cwd.clone().unwrap_or_default(),
                "User": record.process.user.clone().unwrap_or_default(),
                "Tty": record.process.terminal,
                "OpenStdin": record.interactive,
                "StopSignal": record.stop_signal,
            },
            "State": {
                "Status": match status { Status::Created => "created", Status::Running => "running", Status::Exited => "exited" },
                "Running": status == Status::Running,
                "Pid": state.monitor.filter(|_| status == Status::Running).map(|(pid, _)| pid),
                "ExitCode": state.exit_code,
                "OOMKilled": state.oom_killed,
                "Error": state.error.clone().unwrap_or_default(),
                "StartedAt": rfc3339(state.started_at),
                "FinishedAt": rfc3339(state.finished_at),
            },
            "HostConfig": {
                "Memory": record.memory_limit.unwrap_or(0),
                "NanoCpus": record.cpus.map_or(0, |c| (c * 1e9) as u64),
                "ReadonlyRootfs": record.process.read_only,
                "AutoRemove": record.auto_remove,
                "Binds": record.volumes.iter().map(|v| format!("{}:{}{}", v.host.display(), v.container, if v.read_only { ":ro" } else { "" })).collect::<Vec<_>>(),
                "CapAdd": record.process.cap_add,
                "CapDrop": record.process.cap_drop,
                "SecurityOpt": security_opt_strings(&record.process),
                "Ulimits": ulimits_json(&record.process.ulimits),
                "Sysctls": record.process.sysctls.iter().filter_map(|s| s.split_once('=')).collect::<std::collections::BTreeMap<_, _>>(),
                "Tmpfs": record.process.tmpfs.iter().map(|t| t.split_once(':').unwrap_or((t, ""))).collect::<std::collections::BTreeMap<_, _>>(),
                "ShmSize": record.process.shm_size.unwrap_or(64 << 20),
                "Privileged": false,
            },
            "Security": effective_security(&record.process),
            "Sandbox": {
                "Id": short(&record.id),
                "Dir": config.run_root.join(short(&record.id)),
            },
            "LogPath": c.dir(&id).join("log"),
            "NetworkSettings": network_settings(&record, &c.dir(&id)),
        }));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `HostConfig.SecurityOpt` as Docker shows it.
fn security_opt_strings(p: &super::spec::ProcessOptions) -> Vec<String> {
    let mut opts = Vec::new();
    if let Some(profile) = &p.seccomp {
        let rules = profile.syscalls().as_ref().map_or(0, Vec::len);
        opts.push(format!(
            "seccomp=<a profile of {rules} rules, given at run>"
        ));
    }
    if p.no_new_privileges {
        opts.push("no-new-privileges:true".to_owned());
    }
    opts
}

/// `HostConfig.Ulimits` as Docker shows it: the `--ulimit` values.
fn ulimits_json(values: &[String]) -> Vec<serde_json::Value> {
    values
        .iter()
        .filter_map(|v| super::security::ulimit(v).ok().map(|l| (v, l)))
        .map(|(v, l)| {
            let name = v.split_once('=').map_or(v.as_str(), |(n, _)| n);
            serde_json::json!({"Name": name, "Soft": l.soft(), "Hard": l.hard()})
        })
        .collect()
}

/// What the container's processes actually get (not in Docker's output):
/// the capability set after the flags, no_new_privs, seccomp.
fn effective_security(p: &super::spec::ProcessOptions) -> serde_json::Value {
    let mut caps: Vec<String> = super::security::capability_set(&p.cap_add, &p.cap_drop)
        .map(|set| set.into_iter().map(|c| format!("CAP_{c}")).collect())
        .unwrap_or_default();
    caps.sort();
    serde_json::json!({
        "Capabilities": caps,
        "NoNewPrivileges": p.no_new_privileges,
        "Seccomp": if p.seccomp.is_some() { "profile" } else { "unconfined" },
    })
}

/// Docker's `NetworkSettings`: the network, the addresses CNI gave (while
/// the container has them), the published ports.
fn network_settings(
    record: &super::containers::ContainerRecord,
    dir: &std::path::Path,
) -> serde_json::Value {
    use super::network::NetworkMode;
    let addresses = super::network::addresses(dir);
    let ipv4 = addresses
        .iter()
        .find(|a| !a.contains(':'))
        .and_then(|a| a.split_once('/'))
        .map(|(ip, prefix)| (ip.to_owned(), prefix.parse::<u8>().unwrap_or(0)));
    let mut ports = serde_json::Map::new();
    for p in &record.network.publish {
        ports.insert(
            format!("{}/{}", p.container_port, p.protocol),
            serde_json::json!([{"HostIp": p.host_ip, "HostPort": p.host_port.to_string()}]),
        );
    }
    serde_json::json!({
        "NetworkMode": match &record.network.mode { NetworkMode::None => "none".to_owned(), NetworkMode::Named(n) => n.clone() },
        "IPAddress": ipv4.as_ref().map(|(ip, _)| ip.clone()).unwrap_or_default(),
        "IPPrefixLen": ipv4.as_ref().map_or(0, |(_, p)| *p),
        "Addresses": addresses,
        "Ports": ports,
    })
}

#[cfg(test)]
mod tests {
    use super::rfc3339;

    #[test]
    fn times_are_rfc3339_in_utc_and_unset_ones_docker_zero_time() {
        assert_eq!(rfc3339(Some(1_796_608_999_123)), "2026-12-07T02:03:19.123Z");
        assert_eq!(rfc3339(Some(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(None), "0001-01-01T00:00:00Z");
    }
}
