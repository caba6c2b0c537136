//! The OCI runtime spec for `bulkhead run`: runc's defaults (namespaces,
//! capabilities, masked paths, mounts), with what the command line asks for.

use anyhow::{bail, Context, Result};

use super::{kernel_opts, security};
use oci_spec::runtime::{
    LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, LinuxSeccomp,
    ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

/// What the command line says about the container's process.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ProcessOptions {
    /// argv.
    pub args: Vec<String>,
    /// KEY=VALUE pairs added to the default environment.
    pub env: Vec<String>,
    /// Working directory (absolute).
    pub cwd: Option<String>,
    /// UID[:GID].
    pub user: Option<String>,
    /// A pty instead of pipes.
    pub terminal: bool,
    /// Read-only root file system.
    pub read_only: bool,
    /// Memory limit in bytes.
    pub memory_limit: Option<i64>,
    /// Supplementary groups (from the image's /etc/group for `--user NAME`).
    #[serde(default)]
    pub additional_gids: Vec<u32>,
    /// CPU limit in CPUs (`--cpus 1.5`): a CFS quota over a 100 ms period.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// `--cap-add`: capabilities beyond Docker's default set, or ALL.
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// `--cap-drop`: capabilities taken from it, or ALL.
    #[serde(default)]
    pub cap_drop: Vec<String>,
    /// `--security-opt seccomp=PROFILE.json`: the profile, read at `run`.
    #[serde(default)]
    pub seccomp: Option<LinuxSeccomp>,
    /// `--security-opt no-new-privileges`.
    #[serde(default)]
    pub no_new_privileges: bool,
    /// `--ulimit NAME=SOFT[:HARD]` values.
    #[serde(default)]
    pub ulimits: Vec<String>,
    /// `--sysctl KEY=VALUE` values.
    #[serde(default)]
    pub sysctls: Vec<String>,
    /// `--tmpfs DIR[:OPTIONS]` values.
    #[serde(default)]
    pub tmpfs: Vec<String>,
    /// `--shm-size`, bytes.
    #[serde(default)]
    pub shm_size: Option<u64>,
}

/// The CFS period `--cpus` quotas are expressed over, as in Docker.
const CPU_PERIOD_US: u64 = 100_000;

/// The default PATH, as Docker and runc set it.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Builds the spec. `rootfs` is the rootfs path as the agent sees it.
pub fn build(opts: &ProcessOptions, rootfs: &str, hostname: &str) -> Result<Spec> {
    if opts.args.is_empty() {
        bail!(
            "no command given: put it after `--`, e.g. `bulkhead run --rootfs DIR -- echo hello`"
        );
    }
    let mut env = vec![DEFAULT_PATH.to_owned(), format!("HOSTNAME={hostname}")];
    if opts.terminal {
        env.push("TERM=xterm".to_owned());
    }
    for kv in &opts.env {
        if !kv.contains('=') || kv.starts_with('=') {
            bail!("invalid environment variable {kv:?}: expected KEY=VALUE");
        }
        let key = &kv[..kv.find('=').unwrap_or(0) + 1];
        env.retain(|e| !e.starts_with(key));
        env.push(kv.clone());
    }
    let cwd = opts.cwd.clone().unwrap_or_else(|| "/".to_owned());
    if !cwd.starts_with('/') {
        bail!("the working directory must be absolute, not {cwd:?}");
    }
    let (uid, gid) = parse_user(opts.user.as_deref())?;
    let capabilities =
        security::process_capabilities(security::capability_set(&opts.cap_add, &opts.cap_drop)?)?;
    let mut spec = Spec::default();
    // Docker's defaults, not runc's (see `security`); no_new_privs is left
    // unset, so setuid programs work, as with Docker.
    let process = ProcessBuilder::default()
        .terminal(opts.terminal)
        .args(opts.args.clone())
        .env(env)
        .cwd(cwd)
        .user({
            let mut user = UserBuilder::default().uid(uid).gid(gid);
            if !opts.additional_gids.is_empty() {
                user = user.additional_gids(opts.additional_gids.clone());
            }
            user.build()?
        })
        .capabilities(capabilities)
        .rlimits(security::rlimits(&opts.ulimits)?)
        .build()
        .context("building the OCI process")?;
    // oci-spec's default process has it on, as `runc spec`; unset is off,
    // and (unlike an explicit false) every runtime reads it the same way.
    let mut process = process;
    process.set_no_new_privileges(opts.no_new_privileges.then_some(true));
    spec.set_process(Some(process));
    spec.set_hostname(Some(hostname.to_owned()));
    spec.set_root(Some(
        RootBuilder::default()
            .path(rootfs)
            .readonly(opts.read_only)
            .build()?,
    ));
    let mut linux = spec
        .linux()
        .clone()
        .unwrap_or_else(|| LinuxBuilder::default().build().unwrap_or_default());
    let mut resources = LinuxResourcesBuilder::default();
    if let Some(limit) = opts.memory_limit {
        let memory = LinuxMemoryBuilder::default()
            .limit(limit)
            .swap(limit)
            .build()?;
        resources = resources.memory(memory);
    }
    if let Some(cpus) = opts.cpus {
        let quota = (cpus * CPU_PERIOD_US as f64).round() as i64;
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota.max(1000))
                .period(CPU_PERIOD_US)
                .build()?,
        );
    }
    if opts.memory_limit.is_some() || opts.cpus.is_some() {
        linux.set_resources(Some(resources.build()?));
    }
    linux.set_seccomp(opts.seccomp.clone());
    linux.set_masked_paths(Some(kernel_opts::MASKED_PATHS.map(String::from).to_vec()));
    if !opts.sysctls.is_empty() {
        let sysctls = opts
            .sysctls
            .iter()
            .map(|s| kernel_opts::sysctl(s))
            .collect::<Result<_>>()?;
        linux.set_sysctl(Some(sysctls));
    }
    spec.set_linux(Some(linux));
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    if let Some(bytes) = opts.shm_size {
        kernel_opts::with_shm_size(&mut mounts, bytes);
    }
    for t in &opts.tmpfs {
        let mount = kernel_opts::tmpfs(t)?;
        mounts.retain(|m| m.destination() != mount.destination());
        mounts.push(mount);
    }
    spec.set_mounts(Some(mounts));
    Ok(spec)
}

/// "UID" or "UID:GID" (numeric: there is no /etc/passwd lookup without an image).
fn parse_user(user: Option<&str>) -> Result<(u32, u32)> {
    let Some(user) = user else { return Ok((0, 0)) };
    let (u, g) = user.split_once(':').unwrap_or((user, user));
    let parse = |s: &str| {
        s.parse::<u32>()
            .with_context(|| format!("--user {user:?}: expected UID[:GID], numeric"))
    };
    Ok((parse(u)?, parse(g)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> ProcessOptions {
        ProcessOptions {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn command_env_cwd_user_reach_the_spec() {
        let mut o = opts(&["echo", "hi"]);
        o.env = vec!["FOO=bar".into(), "PATH=/bin".into()];
        o.cwd = Some("/tmp".into());
        o.user = Some("1000:100".into());
        o.read_only = true;
        let spec = build(&o, "c1", "c1").unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &vec!["echo".to_string(), "hi".to_string()]
        );
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"FOO=bar".to_string()));
        assert!(env.contains(&"PATH=/bin".to_string()));
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
        assert_eq!(p.cwd().to_str(), Some("/tmp"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 100));
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(build(&opts(&[]), "c", "c").is_err());
        let mut o = opts(&["true"]);
        o.env = vec!["NOEQUALS".into()];
        assert!(build(&o, "c", "c").is_err());
        let mut o = opts(&["true"]);
        o.cwd = Some("relative".into());
        assert!(build(&o, "c", "c").is_err());
        let mut o = opts(&["true"]);
        o.user = Some("root".into());
        assert!(build(&o, "c", "c").is_err());
    }

    #[test]
    fn memory_limit_is_set() {
        let mut o = opts(&["true"]);
        o.memory_limit = Some(32 << 20);
        let spec = build(&o, "c", "c").unwrap();
        let mem = spec
            .linux()
            .as_ref()
            .unwrap()
            .resources()
            .as_ref()
            .unwrap()
            .memory()
            .as_ref()
            .unwrap()
            .limit();
        assert_eq!(mem, Some(32 << 20));
    }
}
