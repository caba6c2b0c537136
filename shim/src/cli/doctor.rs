//! `bulkhead doctor`: can this host run bulkhead's sandboxes, and if not, what
//! to do about it.
//!
//! Each check gives one line, `ok`, `warn` or `FAIL`, and for each problem a
//! `fix:` line. The checks only look (nothing is started or changed), so it is
//! safe to run anywhere, as any user. The pure parts (classifying KVM, reading
//! containerd's config, rendering) are functions over plain data, unit-tested
//! without the host they describe.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod docker;
mod network;

use crate::config::{Config, ConfigError};
use crate::sandbox::artifacts::{on_path, Artifact, Located};

/// containerd's config when `--containerd-config` does not name another.
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// The runtime type a containerd runtime handler must have to run bulkhead;
/// containerd turns it into the shim's binary name, [`SHIM_BINARY`].
pub const RUNTIME_TYPE: &str = "io.containerd.bulkhead.v2";
/// The shim binary containerd starts for [`RUNTIME_TYPE`], looked up on its
/// `PATH` and next to its own binary.
pub const SHIM_BINARY: &str = "containerd-shim-bulkhead-v2";
/// The API version every KVM since Linux 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// `KVM_GET_API_VERSION`: `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// How long a `--version` probe may take before it counts as hung.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but something is missing or worth knowing.
    Warn,
    /// bulkhead cannot work here until this is fixed.
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        })
    }
}

/// One check's outcome: a line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// How it came out.
    pub status: Status,
    /// What was checked ("kvm", "kernel").
    pub subject: &'static str,
    /// What was found.
    pub detail: String,
    /// What to do about it, for a warning or failure.
    pub fix: Option<String>,
}

impl Check {
    fn ok(subject: &'static str, detail: impl Into<String>) -> Check {
        Check {
            status: Status::Ok,
            subject,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(subject: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            status: Status::Warn,
            subject,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(subject: &'static str, detail: impl Into<String>, fix: Option<String>) -> Check {
        Check {
            status: Status::Fail,
            subject,
            detail: detail.into(),
            fix,
        }
    }
}

/// Every check's outcome, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The checks.
    pub checks: Vec<Check>,
}

/// Width of the subject column.
const SUBJECT_WIDTH: usize = 14;

impl Report {
    /// True when no check failed: the exit status is 0.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    /// The report as text: one line per check, `fix:` lines under problems,
    /// and a summary. `colour` adds ANSI colours to the status words (only for
    /// a terminal: CI logs stay plain).
    pub fn render(&self, colour: bool) -> String {
        let indent = " ".repeat(6 + SUBJECT_WIDTH);
        let mut out = String::new();
        for check in &self.checks {
            let word = check.status.to_string();
            let painted = match (colour, check.status) {
                (false, _) => word.clone(),
                (true, Status::Ok) => format!("\x1b[32m{word}\x1b[0m"),
                (true, Status::Warn) => format!("\x1b[33m{word}\x1b[0m"),
                (true, Status::Fail) => format!("\x1b[1;31m{word}\x1b[0m"),
            };
            let pad = " ".repeat(6 - word.len());
            out.push_str(&format!(
                "{painted}{pad}{:<SUBJECT_WIDTH$}{}\n",
                check.subject,
                indented(&check.detail, &indent)
            ));
            if let Some(fix) = &check.fix {
                out.push_str(&format!(
                    "{indent}fix: {}\n",
                    indented(fix, &format!("{indent}     "))
                ));
            }
        }
        let count = |s| self.checks.iter().filter(|c| c.status == s).count();
        let (fails, warns) = (count(Status::Fail), count(Status::Warn));
        out.push('\n');
        out.push_str(&match (fails, warns) {
            (0, 0) => "All checks passed: this host can run bulkhead.\n".to_owned(),
            (0, w) => format!("No failures, {w} warning(s): this host can run bulkhead.\n"),
            (f, w) => format!(
                "{f} failure(s), {w} warning(s): bulkhead cannot run sandboxes here until each FAIL is fixed.\n"
            ),
        });
        out
    }
}

/// `text` with every line after the first indented by `indent` (blank lines
/// stay empty, so pasted snippets have no trailing spaces).
fn indented(text: &str, indent: &str) -> String {
    let mut lines = text.lines();
    let mut out = lines.next().unwrap_or_default().to_owned();
    for line in lines {
        out.push('\n');
        if !line.is_empty() {
            out.push_str(indent);
            out.push_str(line);
        }
    }
    out
}

/// Checks this host: the user, the config (`loaded`: what [`Config::load`]
/// returned; on an error the other checks use the defaults), KVM, each file a
/// sandbox needs, the run directory, cgroups, and containerd with `containerd_config`
/// (its default config when `None`).
pub fn diagnose(loaded: Result<Config, ConfigError>, containerd_config: Option<&Path>) -> Report {
    let mut checks = vec![check_user()];
    let config = match loaded {
        Ok(config) => {
            checks.push(Check::ok("config", describe_config(&config)));
            config
        }
        Err(e) => {
            checks.push(Check::fail(
                "config",
                error_chain(&e),
                Some("fix the file (the checks below use the built-in defaults)".to_owned()),
            ));
            Config::default()
        }
    };
    let kernel = Artifact::Kernel.locate(&config);
    let kernel_path = kernel.as_ref().ok().map(|k| k.path.clone());
    checks.push(kvm_check(
        &KvmKind::detect(),
        kernel_path.as_deref().map(|p| (p, looks_like_pvm_guest(p))),
    ));
    checks.push(match kernel {
        Ok(found) => file_check("kernel", &found, check_kernel_file),
        Err(e) => not_found("kernel", e),
    });
    checks.push(match Artifact::Initrd.locate(&config) {
        Ok(found) => file_check("initrd", &found, check_readable),
        Err(e) => not_found("initrd", e),
    });
    checks.push(program_check("bulkhead-vmm", Artifact::Vmm, &config));
    let mut virtiofsd = program_check("virtiofsd", Artifact::Virtiofsd, &config);
    if virtiofsd.status == Status::Ok {
        virtiofsd.detail += &format!(", cache={}", config.virtiofsd_cache);
    }
    checks.push(virtiofsd);
    checks.push(check_run_root(&config.run_root));
    checks.push(check_cgroups());
    checks.push(network::check_network());
    checks.extend(check_containerd(containerd_config));
    checks.extend(docker::check_docker());
    Report { checks }
}

fn not_found(subject: &'static str, e: crate::sandbox::artifacts::ArtifactError) -> Check {
    Check::fail(subject, e.problem, Some(e.fix))
}

fn describe_config(config: &Config) -> String {
    let settings = format!(
        "{} vCPU(s), {} MiB, boot timeout {} s",
        config.vcpus, config.memory_mib, config.boot_timeout_secs
    );
    match config.file() {
        Some(file) => format!("{file}: {settings}"),
        None => format!("{}: {settings}", config.origin()),
    }
}

/// An error and its sources, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

fn check_user() -> Check {
    if nix::unistd::geteuid().is_root() {
        Check::ok("user", "running as root")
    } else {
        Check::warn(
            "user",
            "not running as root: `bulkhead run` needs root (bind mounts, /run/bulkhead), \
             and some checks below may fail for lack of permission alone",
            "run bulkhead, and this check, as root (sudo)",
        )
    }
}

/// What kind of KVM this host offers, as far as bulkhead is concerned.
///
/// bulkhead-vmm has its own detection (`bulkhead_vmm::kvm::HostKvm`); this one
/// is separate so the CLI does not link the VMM, and finer: it tells a missing
/// device from a permission problem, and checks that KVM answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmKind {
    /// No `/dev/kvm`.
    Missing,
    /// `/dev/kvm` exists but this user may not open it.
    Denied(String),
    /// `/dev/kvm` cannot be used (opening or `KVM_GET_API_VERSION` failed).
    Unusable(String),
    /// The PVM hypervisor (`/sys/module/kvm_pvm`): KVM answers, but it boots only
    /// kernels built with `CONFIG_PVM_GUEST`, not a stock guest kernel.
    Pvm,
    /// KVM on VT-x or AMD-V (or nested): boots stock kernels.
    Hardware,
}

impl KvmKind {
    /// Looks at this host's `/dev/kvm` and `/sys/module/kvm_pvm`.
    pub fn detect() -> KvmKind {
        detect_kvm(Path::new("/dev/kvm"), Path::new("/sys/module/kvm_pvm"))
    }
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmKind::Missing => write!(f, "no /dev/kvm"),
            KvmKind::Denied(why) => write!(f, "/dev/kvm is not accessible ({why})"),
            KvmKind::Unusable(why) => write!(f, "/dev/kvm is unusable ({why})"),
            KvmKind::Pvm => write!(
                f,
                "/dev/kvm is the PVM hypervisor (kvm_pvm): it boots only kernels built with CONFIG_PVM_GUEST"
            ),
            KvmKind::Hardware => write!(f, "/dev/kvm is hardware-assisted KVM (VT-x/AMD-V)"),
        }
    }
}

fn detect_kvm(dev: &Path, pvm_module: &Path) -> KvmKind {
    let file = match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return KvmKind::Missing,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return KvmKind::Denied(e.to_string())
        }
        Err(e) => return KvmKind::Unusable(format!("cannot open it: {e}")),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number;
    // on a file that is not /dev/kvm the kernel refuses it (ENOTTY).
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _) };
    if version < 0 {
        let e = std::io::Error::last_os_error();
        return KvmKind::Unusable(format!("KVM_GET_API_VERSION failed: {e}"));
    }
    if version != KVM_API_VERSION {
        return KvmKind::Unusable(format!(
            "KVM API version {version}, expected {KVM_API_VERSION}"
        ));
    }
    if pvm_module.exists() {
        KvmKind::Pvm
    } else {
        KvmKind::Hardware
    }
}

/// Whether the kernel looks like a PVM guest kernel: an unstripped vmlinux
/// built with CONFIG_PVM_GUEST has `pvm_*` symbols (bulkhead-vmm's own test,
/// `loader::looks_like_pvm_guest`).
fn looks_like_pvm_guest(kernel: &Path) -> bool {
    const NEEDLE: &[u8] = b"\0pvm_";
    std::fs::read(kernel).is_ok_and(|bytes| bytes.windows(NEEDLE.len()).any(|w| w == NEEDLE))
}

/// The KVM line: `kernel` is the guest kernel found and whether it looks like
/// a PVM guest kernel, which decides whether a PVM host will do.
pub fn kvm_check(kind: &KvmKind, kernel: Option<(&Path, bool)>) -> Check {
    let hardware_fix = "run bulkhead on a host with VT-x/AMD-V: bare metal, or a VM with \
                        nested virtualization enabled";
    match kind {
        KvmKind::Hardware => Check::ok("kvm", kind.to_string()),
        KvmKind::Pvm => match kernel {
            Some((path, true)) => Check::warn(
                "kvm",
                format!(
                    "{kind}; {} looks like one (pvm_* symbols), so bulkhead-vmm will boot it",
                    path.display()
                ),
                format!(
                    "bulkhead is tested on hardware KVM; if sandboxes misbehave, {hardware_fix}"
                ),
            ),
            Some((path, false)) => Check::fail(
                "kvm",
                format!(
                    "{kind}, and {} is a stock kernel: no sandbox can start here",
                    path.display()
                ),
                Some(format!(
                    "{hardware_fix}; or use a guest kernel built with CONFIG_PVM_GUEST"
                )),
            ),
            None => Check::fail(
                "kvm",
                format!("{kind}; bulkhead's guest kernel is a stock one and cannot boot here"),
                Some(hardware_fix.to_owned()),
            ),
        },
        KvmKind::Missing => Check::fail(
            "kvm",
            kind.to_string(),
            Some(
                "enable VT-x/AMD-V in the firmware and load the module (`modprobe kvm_intel` \
                 or `modprobe kvm_amd`); in a cloud VM, choose one with nested virtualization"
                    .to_owned(),
            ),
        ),
        KvmKind::Denied(_) => Check::fail(
            "kvm",
            kind.to_string(),
            Some(
                "run as root (bulkhead needs root anyway), or add the user to /dev/kvm's group \
                 (`usermod -aG kvm USER`, then log in again)"
                    .to_owned(),
            ),
        ),
        KvmKind::Unusable(_) => Check::fail(
            "kvm",
            kind.to_string(),
            Some("look for KVM errors in `dmesg`; reload the kvm modules".to_owned()),
        ),
    }
}

/// A found file, checked by `check` (which says what is wrong with it).
fn file_check(
    subject: &'static str,
    found: &Located,
    check: fn(&Path) -> Result<(), String>,
) -> Check {
    let path = found.path.display();
    match check(&found.path) {
        Ok(()) => Check::ok(subject, format!("{path} ({})", found.origin)),
        Err(problem) => Check::fail(
            subject,
            format!("{path} ({}): {problem}", found.origin),
            Some(format!(
                "replace it, or point `{subject}` in the config at a good one"
            )),
        ),
    }
}

fn check_readable(path: &Path) -> Result<(), String> {
    let mut file = File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut byte = [0u8; 1];
    match file.read(&mut byte) {
        Ok(0) => Err("it is empty".to_owned()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("cannot read it: {e}")),
    }
}

/// Readable, and an ELF vmlinux or a bzImage (what bulkhead-vmm loads).
fn check_kernel_file(path: &Path) -> Result<(), String> {
    check_readable(path)?;
    let mut head = vec![0u8; 0x206];
    let mut file = File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let n = file
        .read(&mut head)
        .map_err(|e| format!("cannot read it: {e}"))?;
    let head = &head[..n];
    let elf = head.starts_with(b"\x7fELF");
    let bzimage = head.get(0x202..0x206) == Some(b"HdrS");
    if elf || bzimage {
        Ok(())
    } else {
        Err("not a kernel (neither an ELF vmlinux nor a bzImage)".to_owned())
    }
}

/// A program found and executable, with what its `--version` prints.
fn program_check(subject: &'static str, artifact: Artifact, config: &Config) -> Check {
    let found = match artifact.locate(config) {
        Ok(found) => found,
        Err(e) => return not_found(subject, e),
    };
    let where_ = format!("{} ({})", found.path.display(), found.origin);
    if nix::unistd::access(&found.path, nix::unistd::AccessFlags::X_OK).is_err() {
        return Check::fail(
            subject,
            format!("{where_} is not executable"),
            Some(format!("chmod +x {}", found.path.display())),
        );
    }
    match probe(&found.path, &["--version"]) {
        Ok(version) => Check::ok(subject, format!("{where_}, {version}")),
        Err(why) => Check::fail(
            subject,
            format!("{where_}: `--version` failed: {why}"),
            Some(format!(
                "reinstall {subject}, or point `{}` in the config at a working one",
                artifact.config_field()
            )),
        ),
    }
}

/// Runs `program args` with a deadline; its first line of output, or why not.
fn probe(program: &Path, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    // `--version` prints a line: the pipes never fill, so reading after exit is safe.
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut stdout);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut stderr);
    }
    let first = |s: &str| s.lines().next().unwrap_or_default().trim().to_owned();
    if status.success() {
        Ok(first(&stdout))
    } else {
        Err(format!("{status}: {}", first(&stderr)))
    }
}

fn check_run_root(run_root: &Path) -> Check {
    let subject = "run root";
    match std::fs::metadata(run_root) {
        Ok(m) if m.is_dir() => Check::ok(subject, format!("{} exists", run_root.display())),
        Ok(_) => Check::fail(
            subject,
            format!("{} exists and is not a directory", run_root.display()),
            Some("remove it, or set `run_root` in the config to another directory".to_owned()),
        ),
        Err(_) if run_root.parent().is_some_and(Path::is_dir) => Check::ok(
            subject,
            format!("{} (made by the first sandbox)", run_root.display()),
        ),
        Err(e) => Check::warn(
            subject,
            format!("{}: {e}, nor does its parent exist", run_root.display()),
            "create its parent, or set `run_root` in the config",
        ),
    }
}

fn check_cgroups() -> Check {
    let root = Path::new("/sys/fs/cgroup");
    let detail = if root.join("cgroup.controllers").exists() {
        "v2 (unified hierarchy)"
    } else if root.join("unified/cgroup.controllers").exists() {
        "v1 with v2 at /sys/fs/cgroup/unified (hybrid); containers' own cgroups live in their guests either way"
    } else {
        "v1; containers' own cgroups live in their guests either way"
    };
    Check::ok("cgroups", format!("host cgroups: {detail}"))
}

/// How containerd's config (one file) mentions bulkhead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registration {
    /// A runtime handler has `runtime_type = "io.containerd.bulkhead.v2"`.
    Registered {
        /// The handler's name (a Kubernetes RuntimeClass's `handler`).
        handler: String,
        /// Its `runtime_path`, when it names the shim binary explicitly.
        runtime_path: Option<PathBuf>,
    },
    /// A handler called `bulkhead` with another runtime type.
    WrongType {
        /// The handler's name.
        handler: String,
        /// Its runtime type, if any.
        runtime_type: Option<String>,
    },
    /// Nothing about bulkhead.
    Absent,
}

/// What `bulkhead doctor` needs from a containerd config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerdConfig {
    /// The file's `version` (1 when it has none, as containerd reads it).
    pub version: i64,
    /// How the file registers bulkhead.
    pub registration: Registration,
    /// Whether `disabled_plugins` turns off the CRI plugin (as Docker's
    /// packaging does), so Kubernetes cannot use this containerd at all.
    pub cri_disabled: bool,
    /// `imports`: more files (glob patterns) containerd merges in.
    pub imports: Vec<String>,
}

/// The table under which a containerd config of `version` lists the CRI
/// runtime handlers, as TOML keys.
pub fn runtimes_section(version: i64) -> &'static str {
    match version {
        ..=1 => "plugins.cri.containerd.runtimes",
        2 => "plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes",
        _ => "plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes",
    }
}

/// The lines to add to a containerd config of `version` to register bulkhead.
pub fn registration_snippet(version: i64) -> String {
    format!(
        "[{}.bulkhead]\n  runtime_type = \"{RUNTIME_TYPE}\"\n",
        runtimes_section(version)
    )
}

/// Reads a containerd config's text. Fails only on what containerd itself
/// would refuse to start with (invalid TOML).
pub fn parse_containerd_config(text: &str) -> Result<ContainerdConfig, toml::de::Error> {
    parse_with_default_version(text, 1)
}

/// [`parse_containerd_config`] for a file whose missing `version` means
/// `default_version` (an imported file is read like the main one).
fn parse_with_default_version(
    text: &str,
    default_version: i64,
) -> Result<ContainerdConfig, toml::de::Error> {
    let table: toml::Table = toml::from_str(text)?;
    let version = table
        .get("version")
        .and_then(toml::Value::as_integer)
        .unwrap_or(default_version);
    let plugin = match version {
        ..=1 => "cri",
        2 => "io.containerd.grpc.v1.cri",
        _ => "io.containerd.cri.v1.runtime",
    };
    let runtimes = table
        .get("plugins")
        .and_then(|p| p.get(plugin))
        .and_then(|p| p.get("containerd"))
        .and_then(|c| c.get("runtimes"))
        .and_then(toml::Value::as_table);
    let mut registration = Registration::Absent;
    for (handler, runtime) in runtimes.into_iter().flatten() {
        let runtime_type = runtime
            .get("runtime_type")
            .and_then(toml::Value::as_str)
            .map(str::to_owned);
        if runtime_type.as_deref() == Some(RUNTIME_TYPE) {
            registration = Registration::Registered {
                handler: handler.clone(),
                runtime_path: runtime
                    .get("runtime_path")
                    .and_then(toml::Value::as_str)
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from),
            };
            break;
        }
        if handler == "bulkhead" {
            registration = Registration::WrongType {
                handler: handler.clone(),
                runtime_type,
            };
        }
    }
    let strings = |key: &str| -> Vec<String> {
        table
            .get(key)
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let cri_disabled = strings("disabled_plugins").iter().any(|p| {
        matches!(
            p.as_str(),
            "cri" | "io.containerd.grpc.v1.cri" | "io.containerd.cri.v1.runtime"
        )
    });
    Ok(ContainerdConfig {
        version,
        registration,
        cri_disabled,
        imports: strings("imports"),
    })
}

/// The containerd checks: installed, bulkhead registered, the shim findable.
fn check_containerd(config_path: Option<&Path>) -> Vec<Check> {
    let Some(containerd) = on_path("containerd")
        .or_else(|| Some(PathBuf::from("/usr/bin/containerd")).filter(|p| p.is_file()))
    else {
        return vec![Check::warn(
            "containerd",
            "containerd is not installed: fine for `bulkhead run`, needed for Kubernetes and nerdctl",
            "install containerd 1.6 or later (`apt-get install containerd`), then run this again",
        )];
    };
    let version = probe(&containerd, &["--version"]).unwrap_or_default();
    let major = containerd_major(&version);
    let mut checks = vec![Check::ok(
        "containerd",
        format!("{} ({version})", containerd.display()),
    )];
    // containerd 2 reads version-3 configs; 1.x version 2.
    let preferred_version = if major >= Some(2) { 3 } else { 2 };
    let (explicit, path) = match config_path {
        Some(p) => (true, p.to_owned()),
        None => (false, PathBuf::from(CONTAINERD_CONFIG)),
    };
    let absent = || (Registration::Absent, path.clone());
    let registration = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            checks.push(Check::warn(
                "cri runtime",
                format!(
                    "no {}: containerd runs with its defaults, which do not include bulkhead",
                    path.display()
                ),
                format!(
                    "create {} with:\n\nversion = {preferred_version}\n\n{}\nthen restart containerd (`systemctl restart containerd`)",
                    path.display(),
                    registration_snippet(preferred_version)
                ),
            ));
            absent()
        }
        Err(e) => {
            checks.push(Check::fail(
                "cri runtime",
                format!("cannot read {}: {e}", path.display()),
                Some("give `--containerd-config` the file containerd reads".to_owned()),
            ));
            absent()
        }
        Ok(text) => match parse_containerd_config(&text) {
            Err(e) => {
                checks.push(Check::fail(
                    "cri runtime",
                    format!(
                        "{} is not valid TOML (containerd will not start with it): {}",
                        path.display(),
                        e.to_string().trim_end()
                    ),
                    Some("fix the line shown, then restart containerd".to_owned()),
                ));
                absent()
            }
            Ok(parsed) => {
                let registration = registration_in_imports(&parsed, &path);
                checks.push(registration_check(&path, &parsed, &registration));
                if parsed.cri_disabled {
                    checks.push(Check::warn(
                        "cri plugin",
                        format!(
                            "{} disables containerd's CRI plugin (`disabled_plugins`): Kubernetes cannot use this containerd",
                            path.display()
                        ),
                        "remove \"cri\" from `disabled_plugins` for Kubernetes, then restart containerd",
                    ));
                }
                registration
            }
        },
    };
    checks.push(shim_check(&containerd, &registration));
    checks
}

/// The registration in the main file, else in the first imported file that has one.
fn registration_in_imports(main: &ContainerdConfig, main_path: &Path) -> (Registration, PathBuf) {
    if !matches!(main.registration, Registration::Absent) || main.imports.is_empty() {
        return (main.registration.clone(), main_path.to_owned());
    }
    for pattern in &main.imports {
        for file in expand_import(pattern, main_path) {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            if let Ok(imported) = parse_with_default_version(&text, main.version) {
                if !matches!(imported.registration, Registration::Absent) {
                    return (imported.registration, file);
                }
            }
        }
    }
    (Registration::Absent, main_path.to_owned())
}

/// The files an `imports` entry names: relative to the main file's directory,
/// with `*` allowed in the file name (containerd takes full globs; this
/// covers the usual `conf.d/*.toml`).
fn expand_import(pattern: &str, main_path: &Path) -> Vec<PathBuf> {
    let pattern = match main_path.parent() {
        Some(dir) if !Path::new(pattern).is_absolute() => dir.join(pattern),
        _ => PathBuf::from(pattern),
    };
    let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
        return Vec::new();
    };
    let name = name.to_string_lossy();
    let Some((prefix, suffix)) = name.split_once('*') else {
        return vec![pattern.clone()];
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    files.sort();
    files
}

/// The registration line, for a parsed main file.
fn registration_check(
    main_path: &Path,
    parsed: &ContainerdConfig,
    (registration, found_in): &(Registration, PathBuf),
) -> Check {
    match registration {
        Registration::Registered { handler, .. } => Check::ok(
            "cri runtime",
            format!(
                "{} registers runtime handler `{handler}` ({RUNTIME_TYPE}); a Kubernetes RuntimeClass with `handler: {handler}` selects it",
                found_in.display()
            ),
        ),
        Registration::WrongType {
            handler,
            runtime_type,
        } => Check::fail(
            "cri runtime",
            format!(
                "{} has a runtime handler `{handler}` with runtime_type = {}",
                found_in.display(),
                runtime_type
                    .as_deref()
                    .map(|t| format!("\"{t}\""))
                    .unwrap_or_else(|| "(none)".to_owned())
            ),
            Some(format!(
                "in [{}.{handler}] set runtime_type = \"{RUNTIME_TYPE}\", then restart containerd",
                runtimes_section(parsed.version)
            )),
        ),
        Registration::Absent => Check::warn(
            "cri runtime",
            format!(
                "{} does not register bulkhead as a runtime (needed for Kubernetes and nerdctl, not for `bulkhead run`)",
                main_path.display()
            ),
            format!(
                "add to {}:\n\n{}\nthen restart containerd (`systemctl restart containerd`)",
                main_path.display(),
                registration_snippet(parsed.version)
            ),
        ),
    }
}

/// Whether containerd can find the shim: the registration's `runtime_path`,
/// else on `PATH` or next to containerd (where containerd looks).
fn shim_check(containerd: &Path, (registration, _): &(Registration, PathBuf)) -> Check {
    let registered = matches!(registration, Registration::Registered { .. });
    if let Registration::Registered {
        runtime_path: Some(path),
        ..
    } = registration
    {
        return if path.is_file() {
            Check::ok("shim", format!("{} (runtime_path)", path.display()))
        } else {
            Check::fail(
                "shim",
                format!("runtime_path {} is not a file", path.display()),
                Some(format!("install {SHIM_BINARY} there, or fix runtime_path")),
            )
        };
    }
    let beside = containerd.parent().map(|d| d.join(SHIM_BINARY));
    if let Some(found) = on_path(SHIM_BINARY).or(beside.clone().filter(|p| p.is_file())) {
        return Check::ok("shim", found.display().to_string());
    }
    let detail = format!(
        "{SHIM_BINARY} is neither on PATH nor next to containerd{}",
        if registered {
            ": containerd cannot start bulkhead pods"
        } else {
            ""
        }
    );
    let fix = format!(
        "install {SHIM_BINARY} into a directory on containerd's PATH, e.g. /usr/local/bin{}",
        beside
            .and_then(|b| b.parent().map(|d| format!(", or into {}", d.display())))
            .unwrap_or_default()
    );
    if registered {
        Check::fail("shim", detail, Some(fix))
    } else {
        Check::warn("shim", detail, fix)
    }
}

/// containerd's major version from its `--version` line
/// ("containerd github.com/containerd/containerd 1.6.20~ds1 ...").
fn containerd_major(version_line: &str) -> Option<u32> {
    version_line
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()) && w.contains('.'))
        .or_else(|| {
            version_line
                .split_whitespace()
                .find_map(|w| w.strip_prefix('v'))
                .filter(|w| w.contains('.'))
        })
        .and_then(|w| w.split('.').next())
        .and_then(|m| m.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_under_any_handler_name() {
        let text = r#"
            version = 2
            [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
              runtime_type = "io.containerd.runc.v2"
            [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.microvm]
              runtime_type = "io.containerd.bulkhead.v2"
        "#;
        let parsed = parse_containerd_config(text).unwrap();
        assert_eq!(parsed.version, 2);
        assert_eq!(
            parsed.registration,
            Registration::Registered {
                handler: "microvm".to_owned(),
                runtime_path: None
            }
        );
        assert!(!parsed.cri_disabled);
    }

    #[test]
    fn registered_in_a_version_3_config_with_runtime_path() {
        let text = r#"
            version = 3
            [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.bulkhead]
              runtime_type = 'io.containerd.bulkhead.v2'
              runtime_path = '/opt/bulkhead/containerd-shim-bulkhead-v2'
        "#;
        let parsed = parse_containerd_config(text).unwrap();
        assert_eq!(
            parsed.registration,
            Registration::Registered {
                handler: "bulkhead".to_owned(),
                runtime_path: Some("/opt/bulkhead/containerd-shim-bulkhead-v2".into())
            }
        );
    }

    #[test]
    fn not_registered() {
        // This machine's config, as Debian ships it.
        let text = r#"
            version = 2
            [plugins]
              [plugins."io.containerd.grpc.v1.cri"]
                [plugins."io.containerd.grpc.v1.cri".cni]
                  bin_dir = "/usr/lib/cni"
                  conf_dir = "/etc/cni/net.d"
              [plugins."io.containerd.internal.v1.opt"]
                path = "/var/lib/containerd/opt"
        "#;
        let parsed = parse_containerd_config(text).unwrap();
        assert_eq!(parsed.registration, Registration::Absent);
        assert!(parse_containerd_config("").is_ok());
        // The right section for the wrong version does not count.
        let v1 = "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.bulkhead]\n\
                  runtime_type = \"io.containerd.bulkhead.v2\"\n";
        assert_eq!(
            parse_containerd_config(v1).unwrap().registration,
            Registration::Absent
        );
    }

    #[test]
    fn a_bulkhead_handler_of_another_type_is_reported() {
        let text = "version = 2\n\
                    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.bulkhead]\n\
                    runtime_type = \"io.containerd.runc.v2\"\n";
        let parsed = parse_containerd_config(text).unwrap();
        assert_eq!(
            parsed.registration,
            Registration::WrongType {
                handler: "bulkhead".to_owned(),
                runtime_type: Some("io.containerd.runc.v2".to_owned())
            }
        );
        let check = registration_check(
            Path::new("/etc/containerd/config.toml"),
            &parsed,
            &(
                parsed.registration.clone(),
                "/etc/containerd/config.toml".into(),
            ),
        );
        assert_eq!(check.status, Status::Fail);
        assert!(check
            .fix
            .unwrap()
            .contains("runtime_type = \"io.containerd.bulkhead.v2\""));
    }

    #[test]
    fn malformed_config_is_an_error_with_its_line() {
        let e = parse_containerd_config("version = 2\n[plugins\nfoo = 1\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn docker_style_config_disables_cri() {
        let parsed = parse_containerd_config("disabled_plugins = [\"cri\"]\n").unwrap();
        assert!(parsed.cri_disabled);
        assert_eq!(parsed.version, 1);
    }

    #[test]
    fn snippet_is_exactly_what_registers_it() {
        for version in [1, 2, 3] {
            let snippet = registration_snippet(version);
            let text = format!("version = {version}\n{snippet}");
            assert_eq!(
                parse_containerd_config(&text).unwrap().registration,
                Registration::Registered {
                    handler: "bulkhead".to_owned(),
                    runtime_path: None
                },
                "{text}"
            );
        }
        assert_eq!(
            registration_snippet(2),
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.bulkhead]\n  \
             runtime_type = \"io.containerd.bulkhead.v2\"\n"
        );
    }

    #[test]
    fn not_registered_check_prints_the_snippet() {
        let parsed = parse_containerd_config("version = 2\n").unwrap();
        let check = registration_check(
            Path::new("/etc/containerd/config.toml"),
            &parsed,
            &(Registration::Absent, "/etc/containerd/config.toml".into()),
        );
        assert_eq!(check.status, Status::Warn);
        assert!(check.fix.unwrap().contains(&registration_snippet(2)));
    }

    #[test]
    fn imports_are_searched() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("config.toml");
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(dir.path().join("conf.d/00-other.toml"), "version = 2\n").unwrap();
        std::fs::write(
            dir.path().join("conf.d/10-bulkhead.toml"),
            registration_snippet(2),
        )
        .unwrap();
        let parsed =
            parse_containerd_config("version = 2\nimports = [\"conf.d/*.toml\"]\n").unwrap();
        let (registration, file) = registration_in_imports(&parsed, &main);
        assert!(matches!(registration, Registration::Registered { .. }));
        assert_eq!(file, dir.path().join("conf.d/10-bulkhead.toml"));
    }

    #[test]
    fn kvm_kinds_read_well() {
        let pvm = kvm_check(&KvmKind::Pvm, Some((Path::new("/k/vmlinux"), false)));
        assert_eq!(pvm.status, Status::Fail);
        assert!(pvm.detail.contains("PVM hypervisor"), "{}", pvm.detail);
        assert!(
            pvm.detail.contains("/k/vmlinux is a stock kernel"),
            "{}",
            pvm.detail
        );
        assert!(pvm.fix.unwrap().contains("nested virtualization"));
        let pvm_guest = kvm_check(&KvmKind::Pvm, Some((Path::new("/k/vmlinux"), true)));
        assert_eq!(pvm_guest.status, Status::Warn);
        assert_eq!(kvm_check(&KvmKind::Hardware, None).status, Status::Ok);
        assert_eq!(
            KvmKind::Hardware.to_string(),
            "/dev/kvm is hardware-assisted KVM (VT-x/AMD-V)"
        );
        let denied = kvm_check(&KvmKind::Denied("Permission denied".to_owned()), None);
        assert_eq!(denied.status, Status::Fail);
        assert!(denied.detail.contains("not accessible (Permission denied)"));
        assert!(denied.fix.unwrap().contains("kvm"));
        let missing = kvm_check(&KvmKind::Missing, None);
        assert_eq!(missing.detail, "no /dev/kvm");
        assert!(missing.fix.unwrap().contains("modprobe"));
    }

    #[test]
    fn kvm_detection_tells_missing_from_unusable() {
        let dir = tempfile::tempdir().unwrap();
        let none = dir.path().join("none");
        assert_eq!(detect_kvm(&dir.path().join("kvm"), &none), KvmKind::Missing);
        // /dev/null opens but is not KVM: the API-version ioctl is refused.
        match detect_kvm(Path::new("/dev/null"), &none) {
            KvmKind::Unusable(why) => assert!(why.contains("KVM_GET_API_VERSION"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn report_is_plain_without_colour_and_indents_fixes() {
        let report = Report {
            checks: vec![
                Check::ok("user", "running as root"),
                Check::warn("cri runtime", "not registered", "add:\n\n[a]\n  b = 1\n"),
                Check::fail("kvm", "no /dev/kvm", Some("load it".to_owned())),
            ],
        };
        assert!(!report.passed());
        let text = report.render(false);
        assert!(!text.contains('\x1b'));
        let expected = "\
ok    user          running as root
warn  cri runtime   not registered
                    fix: add:

                         [a]
                           b = 1
FAIL  kvm           no /dev/kvm
                    fix: load it

1 failure(s), 1 warning(s): bulkhead cannot run sandboxes here until each FAIL is fixed.
";
        assert_eq!(text, expected);
        assert!(report.render(true).contains("\x1b[1;31mFAIL\x1b[0m  kvm"));
        let ok = Report {
            checks: vec![Check::ok("user", "root")],
        };
        assert!(ok.passed());
        assert!(ok
            .render(false)
            .ends_with("All checks passed: this host can run bulkhead.\n"));
    }

    #[test]
    fn containerd_versions_are_read() {
        assert_eq!(
            containerd_major(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"
            ),
            Some(1)
        );
        assert_eq!(
            containerd_major("containerd containerd.io v2.0.4 1a43cb6a"),
            Some(2)
        );
        assert_eq!(containerd_major(""), None);
    }

    #[test]
    fn kernel_files_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(check_kernel_file(&elf).is_ok());
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"hello").unwrap();
        assert!(check_kernel_file(&junk)
            .unwrap_err()
            .contains("not a kernel"));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(check_readable(&empty).unwrap_err(), "it is empty");
    }
}
