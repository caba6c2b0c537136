//! The OCI hooks that run on the host: `prestart`, `createRuntime`,
//! `poststart` and `poststop`, which the runtime spec runs in the runtime's
//! namespaces. Engines wire things with them (Docker 20.10's network is set
//! up by its `libnetwork-setkey` prestart hook, given the container's pid
//! to find its network namespace). For a microVM that pid is the VMM's,
//! which runs in the sandbox's network namespace; what a hook puts there is
//! then carried into the guest like any engine-wired interface.
//!
//! `createContainer` and `startContainer` run inside the container's
//! namespaces, which are the guest's: a host binary cannot run there, so
//! they are dropped (with a log line) by [`super::guest_spec`].

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;
use thiserror::Error;

/// How long a hook without a `timeout` may run: engines' hooks finish in
/// well under a second; one that hangs must not hang the container's start.
const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a hook failed.
#[derive(Debug, Error)]
pub enum HookError {
    /// It could not be started.
    #[error("{stage} hook {path}: cannot run it: {source}")]
    Spawn {
        /// Which hooks.
        stage: &'static str,
        /// The hook's binary.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It exited unsuccessfully.
    #[error("{stage} hook {path} failed ({status}): {stderr}")]
    Failed {
        /// Which hooks.
        stage: &'static str,
        /// The hook's binary.
        path: String,
        /// How it ended.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// It ran past its timeout and was killed.
    #[error("{stage} hook {path} did not finish within {secs} s and was killed")]
    Timeout {
        /// Which hooks.
        stage: &'static str,
        /// The hook's binary.
        path: String,
        /// Its timeout.
        secs: u64,
    },
}

/// Runs `hooks` in order, each given the container's runtime-spec `state`
/// on stdin, as the runtime spec says; the first failure stops the rest.
pub fn run(
    stage: &'static str,
    hooks: &[Hook],
    state: &serde_json::Value,
) -> Result<(), HookError> {
    let state = state.to_string();
    for hook in hooks {
        run_one(stage, hook, &state)?;
    }
    Ok(())
}

fn run_one(stage: &'static str, hook: &Hook, state: &str) -> Result<(), HookError> {
    let path = hook.path().display().to_string();
    let mut cmd = Command::new(hook.path());
    // args[0] is the hook's argv[0], as with execve.
    if let Some(args) = hook.args() {
        if let Some(argv0) = args.first() {
            use std::os::unix::process::CommandExt;
            cmd.arg0(argv0);
        }
        cmd.args(args.iter().skip(1));
    }
    cmd.env_clear();
    for pair in hook.env().iter().flatten() {
        if let Some((k, v)) = pair.split_once('=') {
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HookError::Spawn {
            stage,
            path: path.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its state may close stdin first.
        let _ = stdin.write_all(state.as_bytes());
    }
    let timeout = hook
        .timeout()
        .filter(|t| *t > 0)
        .map_or(DEFAULT_HOOK_TIMEOUT, |t| Duration::from_secs(t as u64));
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut s) = stderr {
            use std::io::Read;
            let _ = s.read_to_string(&mut text);
        }
        text
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HookError::Timeout {
                    stage,
                    path,
                    secs: timeout.as_secs(),
                });
            }
        }
    };
    let stderr = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(HookError::Failed {
            stage,
            path,
            status,
            stderr: stderr.trim().to_owned(),
        });
    }
    tracing::debug!(stage, hook = %path, "hook ran");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::HookBuilder;

    fn hook(script: &str, timeout: Option<i64>) -> Hook {
        let mut b = HookBuilder::default()
            .path("/bin/sh")
            .args(vec!["sh".into(), "-c".into(), script.into()])
            .env(vec!["GREETING=hello".into()]);
        if let Some(t) = timeout {
            b = b.timeout(t);
        }
        b.build().unwrap()
    }

    #[test]
    fn hooks_get_the_state_on_stdin_and_their_env_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let o = out.display();
        let hooks = [
            hook(&format!("cat > {o}.1; echo $GREETING >> {o}.1"), None),
            hook(&format!("test -s {o}.1 && cp {o}.1 {o}"), None),
        ];
        run("prestart", &hooks, &serde_json::json!({"pid": 42})).unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        assert_eq!(got, "{\"pid\":42}hello\n");
    }

    #[test]
    fn a_failing_hook_says_what_it_said_and_stops_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("ran");
        let hooks = [
            hook("echo no network for you >&2; exit 3", None),
            hook(&format!("touch {}", marker.display()), None),
        ];
        let err = run("prestart", &hooks, &serde_json::json!({})).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("no network for you"), "{text}");
        assert!(text.contains("prestart hook /bin/sh failed"), "{text}");
        assert!(!marker.exists());
    }

    #[test]
    fn a_hook_past_its_timeout_is_killed() {
        let started = Instant::now();
        let err = run(
            "createRuntime",
            &[hook("sleep 30", Some(1))],
            &serde_json::json!({}),
        )
        .unwrap_err();
        assert!(matches!(err, HookError::Timeout { secs: 1, .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
