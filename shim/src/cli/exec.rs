//! `bulkhead exec NAME CMD...`: run another process in a running container,
//! in its namespaces and cgroup, from any shell on the host.

use anyhow::{bail, Context, Result};

use super::containers::Status;
use super::spec::{self, ProcessOptions};
use crate::config::Config;
use crate::sandbox::process_io::{self, OutputSinks, ProcessRef};
use crate::sandbox::AgentConnection;

/// What `exec` was asked.
#[derive(Clone, Debug, Default)]
pub struct ExecOptions {
    /// argv.
    pub args: Vec<String>,
    /// `-e`, added to the container's environment.
    pub env: Vec<String>,
    /// `-w`; the container's working directory otherwise.
    pub workdir: Option<String>,
    /// `-u`; the container's user otherwise.
    pub user: Option<String>,
    /// `-t`.
    pub tty: bool,
    /// `-i`.
    pub interactive: bool,
}

/// Runs a process in container `name` (a name or id); returns its exit status.
pub async fn exec(config: &Config, name: &str, opts: &ExecOptions) -> Result<i32> {
    let containers = super::manage::containers(config)?;
    let id = containers.lookup(name)?;
    let record = containers.record(&id)?;
    if containers.state(&id)?.effective_status() != Status::Running {
        bail!(
            "container {} is not running (see `bulkhead ps -a`)",
            record.name
        );
    }
    let sid = record.short_id();
    if opts.args.is_empty() {
        bail!("no command given, e.g. `bulkhead exec {name} sh`");
    }
    let user = match &opts.user {
        // Resolved in the container's rootfs as it is now, as the share shows it.
        Some(u) => {
            let rootfs = config.run_root.join(sid).join("shared").join(sid);
            let ids = super::users::resolve(&rootfs, u)?;
            (
                Some(format!("{}:{}", ids.uid, ids.gid)),
                ids.additional_gids,
            )
        }
        None => (
            record.process.user.clone(),
            record.process.additional_gids.clone(),
        ),
    };
    let mut env = record.process.env.clone();
    env.extend(opts.env.iter().cloned());
    let process = ProcessOptions {
        args: opts.args.clone(),
        env,
        cwd: opts.workdir.clone().or_else(|| record.process.cwd.clone()),
        user: user.0,
        terminal: opts.tty,
        additional_gids: user.1,
        // The container's capabilities, as `docker exec` gives them.
        cap_add: record.process.cap_add.clone(),
        cap_drop: record.process.cap_drop.clone(),
        // The agent applies the container's seccomp profile to every exec.
        no_new_privileges: record.process.no_new_privileges,
        ..Default::default()
    };
    let interactive = opts.interactive;
    let conn = AgentConnection::attach(&config.run_root, sid).await?;
    // The spec builder knows the defaults (PATH, capabilities, user); take its process.
    let spec = spec::build(&process, sid, sid)?;
    let Some(mut oci_process) = spec.process().clone() else {
        bail!("no process in the built spec")
    };
    // An exec has no init wrapper and no rlimits of its own beyond the container's.
    oci_process.set_rlimits(None);
    let target = ProcessRef {
        container_id: sid.to_owned(),
        exec_id: format!("exec-{}", crate::random::hex(6)),
        interactive,
        terminal: process.terminal,
    };
    let sinks = OutputSinks {
        terminal: true,
        log: None,
    };
    process_io::exec(
        &conn,
        &target,
        serde_json::to_vec(&oci_process)?,
        &sinks,
        || Ok(()),
    )
    .await
    .with_context(|| format!("container {name}"))
}
