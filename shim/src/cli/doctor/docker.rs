//! Whether an installed Docker engine can run containers in bulkhead
//! microVMs, and how.
//!
//! Docker 23 and newer hand a `--runtime io.containerd.bulkhead.v2` (or a
//! daemon.json runtime with that `runtimeType`) to containerd, which starts
//! our shim. Docker 20.10, Debian 12's `docker.io`, has no `runtimeType`: it
//! ignores the field and runs such containers with runc on the host kernel, no
//! microVM and no warning. What 20.10 does take is a runtime binary with
//! runc's command line (`"path"`), which `bulkhead-runtime` is. The one thing
//! worse than no isolation is believing you have it, so doctor says which of
//! these it finds.

use std::path::Path;

use super::{probe, Check};
use crate::sandbox::artifacts::on_path;

/// Docker's daemon config, where runtimes are registered.
const DAEMON_JSON: &str = "/etc/docker/daemon.json";
/// The first Docker release whose daemon passes `runtimeType` to containerd.
const FIRST_WORKING_MAJOR: u32 = 23;
/// The runc-compatible runtime binary.
const RUNTIME_BINARY: &str = "bulkhead-runtime";
/// The daemon.json lines that register it.
const PATH_REGISTRATION: &str =
    r#""runtimes": {"bulkhead": {"path": "/usr/bin/bulkhead-runtime"}}"#;

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
    let registration = daemon_json.map_or(Registration::None, registration);
    match (major, registration) {
        (_, Registration::RuntimeBinary(name)) => Check::ok(
            "docker",
            format!(
                "dockerd {version}: `docker run --runtime {name}` runs in a microVM through {RUNTIME_BINARY}"
            ),
        ),
        (Some(m), _) if m >= FIRST_WORKING_MAJOR => Check::ok(
            "docker",
            format!(
                "dockerd {version}: `docker run --runtime {}` runs in a microVM (the shim must be on dockerd's PATH)",
                super::RUNTIME_TYPE
            ),
        ),
        (_, registered) => Check::warn(
            "docker",
            format!(
                "dockerd {version} ignores a runtime's `runtimeType`: containers it is asked to run with \
                 bulkhead's shim run with runc on the host kernel, with no microVM and no warning{}",
                if registered == Registration::Shim {
                    format!(" ({DAEMON_JSON} registers bulkhead's shim: those containers are NOT isolated)")
                } else {
                    String::new()
                }
            ),
            format!(
                "register {RUNTIME_BINARY} by path in {DAEMON_JSON} ({PATH_REGISTRATION}), restart \
                 dockerd and use `docker run --runtime bulkhead`{}; or use Docker {FIRST_WORKING_MAJOR} or newer",
                if registered == Registration::Shim {
                    ", in place of the shim's entry"
                } else {
                    ""
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

/// How a daemon.json registers bulkhead.
#[derive(Debug, PartialEq, Eq)]
enum Registration {
    /// Not at all.
    None,
    /// The containerd shim (its runtime type or binary): Docker 23+ only.
    Shim,
    /// `bulkhead-runtime` by path, under this runtime name: any Docker.
    RuntimeBinary(String),
}

/// How a daemon.json's `runtimes` register bulkhead.
fn registration(daemon_json: &str) -> Registration {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(daemon_json) else {
        return Registration::None;
    };
    let Some(runtimes) = value.get("runtimes").and_then(|r| r.as_object()) else {
        return Registration::None;
    };
    let mut found = Registration::None;
    for (name, runtime) in runtimes {
        let field = |f| runtime.get(f).and_then(|v| v.as_str()).unwrap_or("");
        if Path::new(field("path")).ends_with(RUNTIME_BINARY) {
            return Registration::RuntimeBinary(name.clone());
        }
        if field("runtimeType") == super::RUNTIME_TYPE
            || Path::new(field("path")).ends_with(super::SHIM_BINARY)
            || Path::new(field("runtimeType")).ends_with(super::SHIM_BINARY)
        {
            found = Registration::Shim;
        }
    }
    found
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
        let fix = check.fix.unwrap();
        assert!(fix.contains("bulkhead-runtime"), "{fix}");
        assert!(fix.contains("Docker 23 or newer"), "{fix}");
    }

    #[test]
    fn a_registration_that_docker_20_10_would_ignore_is_called_out() {
        let check = docker_check(DEBIAN_12, Some(REGISTERED));
        assert_eq!(check.status, Status::Warn);
        assert!(check.detail.contains("NOT isolated"), "{}", check.detail);
        assert!(check.fix.unwrap().contains("in place of the shim's entry"));
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
    fn docker_20_10_with_the_runtime_binary_by_path_is_fine() {
        let json = r#"{"runtimes": {"vm": {"path": "/usr/bin/bulkhead-runtime"}}}"#;
        let check = docker_check(DEBIAN_12, Some(json));
        assert_eq!(check.status, Status::Ok);
        assert!(check.detail.contains("--runtime vm"), "{}", check.detail);
    }

    #[test]
    fn an_unreadable_version_is_not_taken_for_a_good_one() {
        assert_eq!(docker_check("dockerd", None).status, Status::Warn);
    }

    #[test]
    fn registrations_by_type_or_path_are_found() {
        assert_eq!(registration(REGISTERED), Registration::Shim);
        assert_eq!(
            registration(
                r#"{"runtimes": {"b": {"path": "/usr/bin/containerd-shim-bulkhead-v2"}}}"#
            ),
            Registration::Shim
        );
        assert_eq!(
            registration(r#"{"runtimes": {"b": {"path": "/usr/bin/bulkhead-runtime"}}}"#),
            Registration::RuntimeBinary("b".into())
        );
        assert_eq!(
            registration(r#"{"runtimes": {"runsc": {"path": "/usr/bin/runsc"}}}"#),
            Registration::None
        );
        assert_eq!(registration("not json"), Registration::None);
        assert_eq!(registration("{}"), Registration::None);
    }
}
