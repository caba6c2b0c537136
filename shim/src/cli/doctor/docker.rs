//! Whether an installed Docker engine can use bulkhead's containerd shim.
//!
//! Docker 23 and newer hand a `--runtime io.containerd.bulkhead.v2` (or a
//! daemon.json runtime with that `runtimeType`) to containerd, which starts
//! our shim. Docker 20.10, Debian 12's `docker.io`, has no `runtimeType`: it
//! ignores the field and runs such containers with runc on the host kernel, no
//! microVM and no warning. The one thing worse than no isolation is believing
//! you have it, so doctor says so whenever it finds such a dockerd.

use std::path::Path;

use super::{probe, Check};
use crate::sandbox::artifacts::on_path;

/// Docker's daemon config, where runtimes are registered.
const DAEMON_JSON: &str = "/etc/docker/daemon.json";
/// The first Docker release whose daemon passes `runtimeType` to containerd.
const FIRST_WORKING_MAJOR: u32 = 23;

/// The docker check, or `None` when no `dockerd` is on `PATH` (nothing to say).
pub(super) fn check_docker() -> Option<Check> {
    let dockerd = on_path("dockerd")?;
    let daemon_json = std::fs::read_to_string(DAEMON_JSON).ok();
    Some(match probe(&dockerd, &["--version"]) {
        Ok(line) => docker_check(&line, daemon_json.as_deref()),
        Err(why) => Check::warn(
            "docker",
            format!("{} --version failed: {why}", dockerd.display()),
            "fix or remove that dockerd; containerd, nerdctl and `bulkhead run` do not need it",
        ),
    })
}

/// The check for a dockerd that printed `version_line` (`Docker version
/// 20.10.24+dfsg1, build 297e128`), with `daemon_json` its config if any.
pub(super) fn docker_check(version_line: &str, daemon_json: Option<&str>) -> Check {
    let version = docker_version(version_line).unwrap_or("unknown");
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    let registered = daemon_json.is_some_and(registers_bulkhead);
    match major {
        Some(m) if m >= FIRST_WORKING_MAJOR => Check::ok(
            "docker",
            format!(
                "dockerd {version}: `docker run --runtime {}` runs in a microVM (the shim must be on dockerd's PATH)",
                super::RUNTIME_TYPE
            ),
        ),
        _ => Check::warn(
            "docker",
            format!(
                "dockerd {version} ignores a runtime's `runtimeType`: containers it is asked to run with \
                 bulkhead's shim run with runc on the host kernel, with no microVM and no warning{}",
                if registered {
                    format!(" ({DAEMON_JSON} registers bulkhead: those containers are NOT isolated)")
                } else {
                    String::new()
                }
            ),
            format!(
                "use Docker {FIRST_WORKING_MAJOR} or newer for `docker run --runtime`; with this dockerd, run \
                 containers with `bulkhead run`, nerdctl or ctr{}",
                if registered {
                    format!(", and remove the bulkhead runtime from {DAEMON_JSON}")
                } else {
                    String::new()
                }
            ),
        ),
    }
}

/// The version word of `dockerd --version`'s line, without a trailing comma.
fn docker_version(line: &str) -> Option<&str> {
    line.split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .map(|w| w.trim_end_matches(','))
}

/// Whether a daemon.json names bulkhead's runtime type or shim anywhere in its
/// `runtimes`.
fn registers_bulkhead(daemon_json: &str) -> bool {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(daemon_json) else {
        return false;
    };
    let Some(runtimes) = value.get("runtimes").and_then(|r| r.as_object()) else {
        return false;
    };
    runtimes.values().any(|runtime| {
        let field = |name| runtime.get(name).and_then(|v| v.as_str()).unwrap_or("");
        field("runtimeType") == super::RUNTIME_TYPE
            || Path::new(field("path")).ends_with(super::SHIM_BINARY)
            || Path::new(field("runtimeType")).ends_with(super::SHIM_BINARY)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::Status;

    const DEBIAN_12: &str = "Docker version 20.10.24+dfsg1, build 297e128";
    const REGISTERED: &str =
        r#"{"runtimes": {"bulkhead": {"runtimeType": "io.containerd.bulkhead.v2"}}}"#;

    #[test]
    fn docker_20_10_is_a_warning_that_names_the_risk() {
        let check = docker_check(DEBIAN_12, None);
        assert_eq!(check.status, Status::Warn);
        assert!(check.detail.contains("20.10.24+dfsg1"), "{}", check.detail);
        assert!(check.detail.contains("runc on the host kernel"));
        assert!(check.fix.unwrap().contains("Docker 23 or newer"));
    }

    #[test]
    fn a_registration_that_docker_20_10_would_ignore_is_called_out() {
        let check = docker_check(DEBIAN_12, Some(REGISTERED));
        assert_eq!(check.status, Status::Warn);
        assert!(check.detail.contains("NOT isolated"), "{}", check.detail);
        assert!(check.fix.unwrap().contains("remove the bulkhead runtime"));
    }

    #[test]
    fn docker_23_and_newer_are_fine() {
        for line in [
            "Docker version 23.0.0, build e92dd87",
            "Docker version 27.3.1, build 41ca978",
        ] {
            let check = docker_check(line, Some(REGISTERED));
            assert_eq!(check.status, Status::Ok, "{line}");
        }
    }

    #[test]
    fn an_unreadable_version_is_not_taken_for_a_good_one() {
        assert_eq!(docker_check("dockerd", None).status, Status::Warn);
    }

    #[test]
    fn registrations_by_type_or_path_are_found() {
        assert!(registers_bulkhead(REGISTERED));
        assert!(registers_bulkhead(
            r#"{"runtimes": {"b": {"path": "/usr/bin/containerd-shim-bulkhead-v2"}}}"#
        ));
        assert!(!registers_bulkhead(
            r#"{"runtimes": {"runsc": {"path": "/usr/bin/runsc"}}}"#
        ));
        assert!(!registers_bulkhead("not json"));
        assert!(!registers_bulkhead("{}"));
    }
}
