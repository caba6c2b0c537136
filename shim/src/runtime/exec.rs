//! `exec`: a new process in a running container, in runc's process model.
//! Without `--detach` this process carries the exec's stdio and exits with
//! its status; with `--detach` (how conmon and containerd's shim call it) a
//! child of ours does, and its pid goes to `--pid-file` once the process
//! runs in the guest.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use oci_spec::runtime::{Process, ProcessBuilder, Spec, User};

use super::args::ExecArgs;
use super::handoff::{self, Reporter};
use super::state::{Record, Root, Status};
use crate::sandbox::process_io::{self, OutputSinks, ProcessRef};
use crate::sandbox::AgentConnection;

/// How long a detached exec may take to be running.
const EXEC_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs `exec`; returns the exit status for this process to exit with.
pub fn exec(root: &Root, args: &ExecArgs, global: &[OsString]) -> Result<i32> {
    if args.preserve_fds > 0 {
        bail!(
            "--preserve-fds {}: descriptors cannot be passed into a microVM",
            args.preserve_fds
        );
    }
    let record = root.load(&args.id)?;
    if !matches!(record.effective_status(), Status::Running | Status::Paused) {
        bail!("cannot exec in a stopped container: {}", args.id);
    }
    let process = process_of(&record, args)?;
    if args.tty && args.console_socket.is_none() && args.detach {
        bail!("--tty with --detach needs --console-socket");
    }
    if args.detach && args.ready_fd.is_none() {
        // Our child does the exec and reports; we write the pid and leave.
        let mut before: Vec<OsString> = global.to_vec();
        before.push("exec".into());
        let after: Vec<OsString> = std::env::args_os().skip(1).skip(global.len() + 1).collect();
        let pending = handoff::spawn(&before, &after)?;
        let pid = pending.wait_ready(EXEC_READY_TIMEOUT)?;
        if let Some(path) = &args.pid_file {
            handoff::write_pid_file(path, pid)?;
        }
        return Ok(0);
    }
    let mut reporter = args.ready_fd.map(Reporter::from_fd).transpose()?;
    if let Some(socket) = &args.console_socket {
        if args.tty {
            let _ = nix::unistd::setsid();
            super::console::send_new_pty(socket).and_then(super::console::become_terminal)?;
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(async {
        let conn = AgentConnection::attach(&record.run_root, &record.id)
            .await
            .with_context(|| format!("reaching container {}'s microVM", record.id))?;
        let target = ProcessRef {
            container_id: record.id.clone(),
            exec_id: args
                .exec_id
                .clone()
                .unwrap_or_else(|| format!("exec-{}", crate::random::hex(6))),
            interactive: true,
            terminal: args.tty,
        };
        let sinks = OutputSinks {
            terminal: true,
            log: None,
        };
        let started = || {
            if let Some(r) = reporter.as_mut() {
                // A parent gone by now leaves the process to run unwatched,
                // as runc's would; its output still goes where the engine said.
                let _ = r.ready(std::process::id());
            } else if let Some(path) = &args.pid_file {
                handoff::write_pid_file(path, std::process::id())?;
            }
            Ok(())
        };
        process_io::exec(
            &conn,
            &target,
            serde_json::to_vec(&process)?,
            &sinks,
            started,
        )
        .await
    });
    // As in the keeper: the stdin copy's blocking read never returns.
    runtime.shutdown_background();
    match outcome {
        Ok(code) => Ok(code),
        Err(e) => {
            if let Some(r) = reporter.as_mut() {
                r.failed(&e);
            }
            Err(e)
        }
    }
}

/// The process to run: `--process`'s JSON, or runc's flags over the
/// container's own process (its user, environment and capabilities).
fn process_of(record: &Record, args: &ExecArgs) -> Result<Process> {
    if let Some(path) = &args.process {
        let text = std::fs::read(path)
            .with_context(|| format!("reading the process file {}", path.display()))?;
        let process: Process = serde_json::from_slice(&text)
            .with_context(|| format!("parsing the process file {}", path.display()))?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            bail!("the process file {} has no args", path.display());
        }
        return Ok(process);
    }
    if args.command.is_empty() {
        bail!("exec needs a command, or --process FILE");
    }
    let spec = Spec::load(record.bundle.join("config.json")).with_context(|| {
        format!(
            "reading container {}'s spec in {}",
            args.id,
            record.bundle.display()
        )
    })?;
    let base = spec.process().clone().unwrap_or_default();
    let mut env = base.env().clone().unwrap_or_default();
    env.extend(args.env.iter().cloned());
    let mut user: User = base.user().clone();
    if let Some(u) = &args.user {
        let (uid, gid) = match u.split_once(':') {
            Some((uid, gid)) => (uid, Some(gid)),
            None => (u.as_str(), None),
        };
        user.set_uid(
            uid.parse()
                .with_context(|| format!("--user {u}: uid must be a number"))?,
        );
        user.set_gid(match gid {
            Some(g) => g
                .parse()
                .with_context(|| format!("--user {u}: gid must be a number"))?,
            None => 0,
        });
    }
    if !args.additional_gids.is_empty() {
        user.set_additional_gids(Some(args.additional_gids.clone()));
    }
    let mut builder = ProcessBuilder::default()
        .args(args.command.clone())
        .env(env)
        .cwd(
            args.cwd
                .clone()
                .map(PathBuf::from)
                .unwrap_or_else(|| base.cwd().clone()),
        )
        .user(user)
        .terminal(args.tty)
        .no_new_privileges(args.no_new_privs || base.no_new_privileges().unwrap_or(false));
    if let Some(c) = base.capabilities() {
        builder = builder.capabilities(c.clone());
    }
    Ok(builder.build()?)
}
