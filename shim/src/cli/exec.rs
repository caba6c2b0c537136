//! `bulkhead exec NAME -- CMD...`: run another process in a running container,
//! in its namespaces and cgroup, from any shell on the host.

use std::path::Path;

use anyhow::{bail, Context, Result};
use bulkhead_protocol::agent::ExecProcessRequest;
use bulkhead_protocol::ttrpc;

use super::process_io::{self, ProcessRef};
use super::spec::{self, ProcessOptions};
use crate::sandbox::{AgentConnection, RPC_TIMEOUT};

/// Runs `process` in container `name` (started with `bulkhead run --name NAME`);
/// returns its exit status.
pub async fn exec(
    run_root: &Path,
    name: &str,
    process: &ProcessOptions,
    interactive: bool,
) -> Result<i32> {
    let conn = AgentConnection::attach(run_root, name).await?;
    // The spec builder knows the defaults (PATH, capabilities, user); take its process.
    let spec = spec::build(process, name, name)?;
    let Some(mut oci_process) = spec.process().clone() else {
        bail!("no process in the built spec")
    };
    // An exec has no init wrapper and no rlimits of its own beyond the container's.
    oci_process.set_rlimits(None);
    let target = ProcessRef {
        container_id: name.to_owned(),
        exec_id: format!("exec-{}", super::run::random_hex(6)),
        interactive,
        terminal: process.terminal,
    };
    let mut req = ExecProcessRequest::new();
    req.container_id = target.container_id.clone();
    req.exec_id = target.exec_id.clone();
    req.process_json = serde_json::to_vec(&oci_process)?;
    req.stdio = Some(target.streams()).into();
    req.terminal = target.terminal;
    // The agent starts the process once its streams are attached, and answers
    // ExecProcess then: the call must be outstanding while they are opened.
    let call = conn
        .agent()
        .exec_process(ttrpc::context::with_duration(RPC_TIMEOUT * 2), &req);
    let (reply, streams) = tokio::join!(call, process_io::open_streams(&conn, &target));
    reply.with_context(|| format!("exec in container {name}"))?;
    let pumps = process_io::pump(streams?, &target);
    process_io::wait(&conn, &target, pumps).await
}
