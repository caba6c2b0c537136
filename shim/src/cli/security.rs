//! The security settings a CLI container gets by default, Docker's, and the
//! flags that change them (`--cap-add`, `--cap-drop`).
//!
//! A container run by `docker run` (or podman) can chown, setuid and raise
//! its file limit; runc's bare `runc spec` defaults (three capabilities,
//! no_new_privs, 1024 files) break `apt-get`, `su` and most databases. The
//! CLI's users expect Docker's habits, so its defaults are Docker's.

use std::collections::HashSet;
use std::str::FromStr;

use anyhow::{bail, Result};
use oci_spec::runtime::{
    Capabilities, Capability, LinuxCapabilities, LinuxCapabilitiesBuilder, LinuxSeccomp,
    PosixRlimit, PosixRlimitBuilder, PosixRlimitType,
};

/// Docker's default capability set (moby's `DefaultCapabilities`).
pub const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Open files, soft and hard, as Docker's daemon gives its containers (the
/// guest kernel's `nr_open` is the same 1048576).
pub const NOFILE: u64 = 1 << 20;

/// One `--cap-add` / `--cap-drop` value: `ALL`, or a capability with or
/// without its `CAP_` prefix, in any case (`net_admin`, `CAP_NET_ADMIN`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CapabilityName {
    /// Every capability.
    All,
    /// One capability.
    One(Capability),
}

impl FromStr for CapabilityName {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let upper = s.trim().to_ascii_uppercase();
        if upper == "ALL" {
            return Ok(CapabilityName::All);
        }
        let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
        match Capability::from_str(bare) {
            Ok(cap) => Ok(CapabilityName::One(cap)),
            Err(_) => bail!(
                "unknown capability {s:?}: expected a name from capabilities(7), such as \
                 NET_ADMIN or CAP_SYS_PTRACE, or ALL"
            ),
        }
    }
}

/// Every capability the kernel headers of the `caps` crate know.
fn all_capabilities() -> Capabilities {
    caps::all()
        .into_iter()
        .filter_map(|c| {
            let name = c.to_string();
            Capability::from_str(name.strip_prefix("CAP_").unwrap_or(&name)).ok()
        })
        .collect()
}

/// The capability set after `add` and `drop`, as Docker computes it: with
/// `ALL` added, everything but what is dropped; with `ALL` dropped, only what
/// is added; otherwise the defaults, plus `add`, minus `drop`.
pub fn capability_set(add: &[String], drop: &[String]) -> Result<Capabilities> {
    let parse = |names: &[String], flag: &str| -> Result<Vec<CapabilityName>> {
        names
            .iter()
            .map(|n| {
                n.parse::<CapabilityName>()
                    .map_err(|e| anyhow::anyhow!("--{flag} {n}: {e}"))
            })
            .collect()
    };
    let (add, drop) = (parse(add, "cap-add")?, parse(drop, "cap-drop")?);
    let ones = |names: &[CapabilityName]| -> HashSet<Capability> {
        names
            .iter()
            .filter_map(|n| match n {
                CapabilityName::One(c) => Some(*c),
                CapabilityName::All => None,
            })
            .collect()
    };
    let mut set: Capabilities = if add.contains(&CapabilityName::All) {
        all_capabilities()
    } else if drop.contains(&CapabilityName::All) {
        HashSet::new()
    } else {
        DEFAULT_CAPABILITIES.into_iter().collect()
    };
    if !add.contains(&CapabilityName::All) {
        set.extend(ones(&add));
    }
    if !drop.contains(&CapabilityName::All) || add.contains(&CapabilityName::All) {
        for c in ones(&drop) {
            set.remove(&c);
        }
    }
    Ok(set)
}

/// The process's capabilities for `set`: bounding, effective and permitted;
/// inheritable and ambient empty, so a non-root user gets none across
/// `execve` unless its files carry them (as with Docker).
pub fn process_capabilities(set: Capabilities) -> Result<LinuxCapabilities> {
    Ok(LinuxCapabilitiesBuilder::default()
        .bounding(set.clone())
        .effective(set.clone())
        .permitted(set)
        .inheritable(Capabilities::new())
        .ambient(Capabilities::new())
        .build()?)
}

/// The default rlimits: [`NOFILE`] open files.
pub fn default_rlimits() -> Result<Vec<PosixRlimit>> {
    Ok(vec![PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .soft(NOFILE)
        .hard(NOFILE)
        .build()?])
}

/// What `--security-opt` asked for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SecurityOpts {
    /// `seccomp=PROFILE.json`: an OCI seccomp profile (`seccomp=unconfined`,
    /// like the default today, applies none).
    pub seccomp: Option<LinuxSeccomp>,
    /// `no-new-privileges`: setuid and file capabilities grant nothing.
    pub no_new_privileges: bool,
}

/// Parses the `--security-opt` values, reading any seccomp profile now, so
/// that a missing or malformed one is an error before anything starts.
pub fn security_opts(values: &[String]) -> Result<SecurityOpts> {
    let mut opts = SecurityOpts::default();
    for value in values {
        // Docker takes both `key=value` and the older `key:value`.
        let (key, arg) = match value.split_once(['=', ':']) {
            Some((k, v)) => (k, Some(v)),
            None => (value.as_str(), None),
        };
        match (key, arg) {
            ("seccomp", Some("unconfined")) => opts.seccomp = None,
            ("seccomp", Some(path)) if !path.is_empty() => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("--security-opt {value}: cannot read the profile: {e}")
                })?;
                let profile: LinuxSeccomp = serde_json::from_str(&text).map_err(|e| {
                    anyhow::anyhow!(
                        "--security-opt {value}: not an OCI seccomp profile ({e}); it needs \
                         defaultAction and syscalls entries of names and action"
                    )
                })?;
                opts.seccomp = Some(profile);
            }
            ("no-new-privileges", None | Some("true")) => opts.no_new_privileges = true,
            ("no-new-privileges", Some("false")) => opts.no_new_privileges = false,
            _ => bail!(
                "--security-opt {value:?}: expected seccomp=PROFILE.json, seccomp=unconfined or \
                 no-new-privileges[=true|false]"
            ),
        }
    }
    Ok(opts)
}

/// Parses `--ulimit NAME=SOFT[:HARD]` (the names of `ulimit`/Docker: nofile,
/// nproc, core, memlock, stack, ...; HARD defaults to SOFT).
pub fn ulimit(value: &str) -> Result<PosixRlimit> {
    let err = |why: &str| anyhow::anyhow!("--ulimit {value}: {why}");
    let (name, limits) = value
        .split_once('=')
        .ok_or_else(|| err("expected NAME=SOFT[:HARD], e.g. nofile=1024:2048"))?;
    let typ = match name {
        "as" => PosixRlimitType::RlimitAs,
        "core" => PosixRlimitType::RlimitCore,
        "cpu" => PosixRlimitType::RlimitCpu,
        "data" => PosixRlimitType::RlimitData,
        "fsize" => PosixRlimitType::RlimitFsize,
        "locks" => PosixRlimitType::RlimitLocks,
        "memlock" => PosixRlimitType::RlimitMemlock,
        "msgqueue" => PosixRlimitType::RlimitMsgqueue,
        "nice" => PosixRlimitType::RlimitNice,
        "nofile" => PosixRlimitType::RlimitNofile,
        "nproc" => PosixRlimitType::RlimitNproc,
        "rss" => PosixRlimitType::RlimitRss,
        "rtprio" => PosixRlimitType::RlimitRtprio,
        "rttime" => PosixRlimitType::RlimitRttime,
        "sigpending" => PosixRlimitType::RlimitSigpending,
        "stack" => PosixRlimitType::RlimitStack,
        _ => return Err(err(&format!("unknown limit {name:?}; one of as, core, cpu, data, fsize, locks, memlock, msgqueue, nice, nofile, nproc, rss, rtprio, rttime, sigpending, stack"))),
    };
    let number = |s: &str| -> Result<u64> {
        match s {
            "unlimited" | "-1" => Ok(u64::MAX),
            _ => s
                .parse()
                .map_err(|_| err(&format!("{s:?} is not a number or unlimited"))),
        }
    };
    let (soft, hard) = match limits.split_once(':') {
        Some((soft, hard)) => (number(soft)?, number(hard)?),
        None => (number(limits)?, number(limits)?),
    };
    if soft > hard {
        return Err(err("the soft limit is above the hard one"));
    }
    Ok(PosixRlimitBuilder::default()
        .typ(typ)
        .soft(soft)
        .hard(hard)
        .build()?)
}

/// The rlimits: the defaults, each replaced by a `--ulimit` of its kind.
pub fn rlimits(ulimits: &[String]) -> Result<Vec<PosixRlimit>> {
    let mut limits = default_rlimits()?;
    for value in ulimits {
        let limit = ulimit(value)?;
        limits.retain(|l| l.typ() != limit.typ());
        limits.push(limit);
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_take_any_case_and_an_optional_prefix() {
        for n in ["net_admin", "CAP_NET_ADMIN", "cap_net_admin", "NET_ADMIN"] {
            assert_eq!(
                n.parse::<CapabilityName>().unwrap(),
                CapabilityName::One(Capability::NetAdmin)
            );
        }
        assert_eq!(
            "all".parse::<CapabilityName>().unwrap(),
            CapabilityName::All
        );
        let err = "NET_ADMINN"
            .parse::<CapabilityName>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("NET_ADMINN") && err.contains("capabilities(7)"),
            "{err}"
        );
    }

    #[test]
    fn the_default_is_dockers_fourteen() {
        let set = capability_set(&[], &[]).unwrap();
        assert_eq!(set.len(), 14);
        assert!(set.contains(&Capability::Chown) && set.contains(&Capability::Setuid));
        assert!(!set.contains(&Capability::SysAdmin) && !set.contains(&Capability::NetAdmin));
    }

    #[test]
    fn add_and_drop_work_as_dockers() {
        let set = capability_set(&names(&["NET_ADMIN"]), &names(&["chown"])).unwrap();
        assert!(set.contains(&Capability::NetAdmin) && !set.contains(&Capability::Chown));
        assert_eq!(set.len(), 14);

        let only = capability_set(&names(&["kill"]), &names(&["ALL"])).unwrap();
        assert_eq!(only, [Capability::Kill].into_iter().collect());

        let all_but = capability_set(&names(&["ALL"]), &names(&["SYS_ADMIN"])).unwrap();
        assert!(all_but.len() > 30 && !all_but.contains(&Capability::SysAdmin));
        assert!(all_but.contains(&Capability::SysPtrace));
    }

    #[test]
    fn a_bad_name_names_the_flag() {
        let err = capability_set(&[], &names(&["bogus"]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--cap-drop bogus:"), "{err}");
    }

    #[test]
    fn security_opts_read_the_profile_and_no_new_privileges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(
            &path,
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["chmod"], "action": "SCMP_ACT_ERRNO"}]}"#,
        )
        .unwrap();
        let opts = security_opts(&[
            format!("seccomp={}", path.display()),
            "no-new-privileges".into(),
        ])
        .unwrap();
        assert!(opts.no_new_privileges);
        let profile = opts.seccomp.unwrap();
        assert_eq!(profile.syscalls().as_ref().map(Vec::len), Some(1));

        let none = security_opts(&["seccomp=unconfined".into()]).unwrap();
        assert_eq!(none, SecurityOpts::default());
        assert!(security_opts(&["no-new-privileges:false".into()]).is_ok());

        let missing = security_opts(&["seccomp=/nonexistent.json".into()]).unwrap_err();
        assert!(
            missing.to_string().contains("cannot read the profile"),
            "{missing}"
        );
        std::fs::write(&path, "{").unwrap();
        let bad = security_opts(&[format!("seccomp={}", path.display())]).unwrap_err();
        assert!(
            bad.to_string().contains("not an OCI seccomp profile"),
            "{bad}"
        );
        let unknown = security_opts(&["apparmor=x".into()]).unwrap_err();
        assert!(unknown.to_string().contains("apparmor=x"), "{unknown}");
    }

    #[test]
    fn ulimits_replace_the_defaults() {
        let limits = rlimits(&["nofile=1024:2048".into(), "nproc=100".into()]).unwrap();
        let nofile = limits
            .iter()
            .find(|l| l.typ() == PosixRlimitType::RlimitNofile)
            .unwrap();
        assert_eq!((nofile.soft(), nofile.hard()), (1024, 2048));
        let nproc = limits
            .iter()
            .find(|l| l.typ() == PosixRlimitType::RlimitNproc)
            .unwrap();
        assert_eq!((nproc.soft(), nproc.hard()), (100, 100));
        assert_eq!(limits.len(), 2);
        assert_eq!(ulimit("core=unlimited").unwrap().hard(), u64::MAX);
        for (bad, why) in [
            ("nofile", "NAME=SOFT"),
            ("files=1", "unknown limit"),
            ("nofile=2048:1024", "above the hard"),
            ("nofile=lots", "not a number"),
        ] {
            let err = ulimit(bad).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn inheritable_and_ambient_stay_empty() {
        let caps = process_capabilities(capability_set(&[], &[]).unwrap()).unwrap();
        assert_eq!(caps.effective().as_ref().map(HashSet::len), Some(14));
        assert!(caps.inheritable().as_ref().is_some_and(HashSet::is_empty));
        assert!(caps.ambient().as_ref().is_some_and(HashSet::is_empty));
    }
}
