//! The VM's configuration: plain data, validated once.
//!
//! The CLI and the JSON file (`--config`, the form the shim uses) both produce a
//! [`VmConfig`]; the rest of the VMM never sees clap or serde.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::arch::x86_64::mptable::MAX_VCPUS;
use crate::devices::virtio::net::MacAddr;

/// Default guest memory in MiB: enough for the agent and a small container.
pub const DEFAULT_MEMORY_MIB: u32 = 128;
/// Smallest guest we accept: the kernel loads at 16 MiB and needs room above it.
pub const MIN_MEMORY_MIB: u32 = 32;
/// Largest guest we accept (1 TiB); beyond that a typo is likelier than intent.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
/// Default vCPU count.
pub const DEFAULT_VCPUS: u8 = 1;

/// The default kernel command line, one parameter per reason.
pub fn default_cmdline() -> String {
    [
        // The only console is the 8250 UART at 0x3f8.
        "console=ttyS0",
        // Reset through the i8042, which the VMM turns into a clean exit; a triple
        // fault would look like a crash.
        "reboot=k",
        // Reboot at once on panic, so a crashed guest ends instead of hanging; the
        // VMM notices the panic message on the console and reports it.
        "panic=-1",
        // Skip the IO-APIC timer-routing check: the in-kernel PIT is known to work
        // and the check costs time at every boot.
        "no_timer_check",
        // Each console byte is a VM exit; keep boot messages to warnings and worse.
        "quiet",
    ]
    .join(" ")
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ConsoleSpec {
    /// Discarded (still scanned for the ready marker, and kept for error reports).
    #[default]
    Off,
    /// Copied to the VMM's standard output.
    Stdout,
    /// Written to this file, created or truncated.
    File(PathBuf),
}

impl std::str::FromStr for ConsoleSpec {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "off" => ConsoleSpec::Off,
            "stdout" => ConsoleSpec::Stdout,
            path => ConsoleSpec::File(PathBuf::from(path)),
        })
    }
}

impl<'de> Deserialize<'de> for ConsoleSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(s.parse().unwrap_or_default())
    }
}

/// Everything needed to boot one microVM.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: an uncompressed ELF `vmlinux` (preferred) or a bzImage.
    pub kernel: PathBuf,
    /// Optional initrd (cpio archive).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; replaces [`default_cmdline`] when given.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    pub memory: u32,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u16,
    /// Where the serial console goes.
    #[serde(default)]
    pub console: ConsoleSpec,
    /// Let the guest kernel log everything, with timestamps, on the console
    /// (slower: each console byte is a VM exit). For debugging a sandbox.
    #[serde(default)]
    pub debug_console: bool,
    /// Seconds the guest has to print `ready_marker` before it is stopped.
    #[serde(default)]
    pub boot_timeout: Option<u64>,
    /// A string the guest prints on its console once it is up.
    #[serde(default)]
    pub ready_marker: Option<String>,
    /// Skip the PVM-host check because the kernel is known to be a PVM guest kernel
    /// (for kernels whose symbols we cannot inspect, e.g. a stripped bzImage).
    #[serde(default)]
    pub assume_pvm_guest: bool,
    /// virtio-fs shares, each served by a virtiofsd process.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// The hybrid vsock device, if any.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// The virtio-net device, if any. Templates and their copies must agree
    /// on having one (the device list is part of a snapshot); only the copies
    /// need a tap.
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// Make this boot a template: when the guest says it is ready to be saved
    /// (its agent, once set up and before it touches anything per-sandbox), save
    /// the whole VM into this directory and exit with status 0.
    #[serde(default)]
    pub save_snapshot: Option<PathBuf>,
    /// Start from the snapshot in this directory instead of booting the kernel:
    /// the guest resumes where it rang the doorbell. Memory size, vCPU count
    /// and the device list must be those of the VM that saved it.
    #[serde(default)]
    pub restore_snapshot: Option<PathBuf>,
}

/// One virtio-fs share: the guest mounts `tag`; virtiofsd listens on `socket`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The mount tag.
    pub tag: String,
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
}

impl std::str::FromStr for FsConfig {
    type Err = String;

    /// Parses the CLI form `TAG=SOCKET`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (tag, socket) = s
            .split_once('=')
            .ok_or_else(|| format!("expected TAG=SOCKET, got {s:?}"))?;
        Ok(FsConfig {
            tag: tag.to_owned(),
            socket: PathBuf::from(socket),
        })
    }
}

/// The hybrid vsock device: the guest's CID, and the host Unix socket that host
/// programs connect to (`CONNECT <port>`); guest connections to host port P go to
/// `<uds_path>_<P>`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more: 0-2 are reserved).
    pub cid: u32,
    /// The host Unix socket.
    pub uds_path: PathBuf,
    /// A listening socket already bound at `uds_path`, passed down by the
    /// parent as this descriptor number (so the parent can connect before
    /// this process has started). Without it the VMM binds `uds_path` itself.
    #[serde(default)]
    pub listener_fd: Option<i32>,
}

/// The virtio-net device: its MAC address, and the tap it is connected to.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The guest NIC's address: 6 hex octets separated by ':', unicast
    /// (e.g. "02:xx:xx:xx:xx:xx", a locally administered one).
    pub mac: String,
    /// A tap the parent opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and
    /// passed down as this descriptor number. Without it the device exists
    /// but is not connected: the guest's frames are discarded and it
    /// receives none (a template boot, saved before it has a network).
    #[serde(default)]
    pub tap_fd: Option<i32>,
}

fn default_memory() -> u32 {
    DEFAULT_MEMORY_MIB
}

fn default_vcpus() -> u16 {
    u16::from(DEFAULT_VCPUS)
}

/// A configuration the VMM refuses, with what to change.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("Cannot read the config file {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON for a [`VmConfig`].
    #[error("Invalid config file {path}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// Where and why (serde's message names unknown fields and positions).
        source: serde_json::Error,
    },
    /// Memory out of range.
    #[error("Guest memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, not {0} MiB")]
    Memory(u32),
    /// vCPU count out of range.
    #[error("The vCPU count must be between 1 and {MAX_VCPUS}, not {0}")]
    Vcpus(u16),
    /// A timeout without a marker to wait for.
    #[error("--boot-timeout needs --ready-marker: the VMM waits for that string on the console")]
    TimeoutWithoutMarker,
    /// A virtio-fs share that cannot be set up.
    #[error("Invalid virtio-fs share {tag:?}: {reason}")]
    Fs {
        /// The tag.
        tag: String,
        /// What is wrong.
        reason: String,
    },
    /// A vsock CID the guest cannot have.
    #[error("The vsock CID must be at least 3 (0-2 are reserved), not {0}")]
    VsockCid(u32),
    /// A net device that cannot be set up.
    #[error("Invalid net device: {0}")]
    Net(String),
    /// A zero or empty value where one is needed.
    #[error("{0}")]
    Invalid(&'static str),
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            memory: DEFAULT_MEMORY_MIB,
            vcpus: u16::from(DEFAULT_VCPUS),
            console: ConsoleSpec::Off,
            debug_console: false,
            boot_timeout: None,
            ready_marker: None,
            assume_pvm_guest: false,
            fs: Vec::new(),
            vsock: None,
            net: None,
            save_snapshot: None,
            restore_snapshot: None,
        }
    }

    /// Reads and validates a JSON config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        let config: VmConfig =
            serde_json::from_str(&text).map_err(|source| ConfigError::ParseFile {
                path: path.to_owned(),
                source,
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the ranges and combinations that do not need the files themselves.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory) {
            return Err(ConfigError::Memory(self.memory));
        }
        if self.vcpus == 0 || self.vcpus > u16::from(MAX_VCPUS) {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.boot_timeout.is_some() && self.ready_marker.is_none() {
            return Err(ConfigError::TimeoutWithoutMarker);
        }
        if self.boot_timeout == Some(0) {
            return Err(ConfigError::Invalid(
                "--boot-timeout must be at least 1 second",
            ));
        }
        if self.ready_marker.as_deref() == Some("") {
            return Err(ConfigError::Invalid("--ready-marker must not be empty"));
        }
        if self.save_snapshot.is_some() && self.restore_snapshot.is_some() {
            return Err(ConfigError::Invalid(
                "save_snapshot and restore_snapshot exclude each other",
            ));
        }
        let mut tags = std::collections::HashSet::new();
        for fs in &self.fs {
            let invalid = |reason: String| ConfigError::Fs {
                tag: fs.tag.clone(),
                reason,
            };
            crate::devices::virtio::fs::FsTag::new(&fs.tag).map_err(|e| invalid(e.to_string()))?;
            if !tags.insert(fs.tag.as_str()) {
                return Err(invalid("the tag is used twice".into()));
            }
        }
        if let Some(vsock) = &self.vsock {
            if vsock.cid < 3 {
                return Err(ConfigError::VsockCid(vsock.cid));
            }
            if vsock.listener_fd.is_some_and(|fd| fd < 3) {
                return Err(ConfigError::Invalid(
                    "vsock.listener_fd must be a passed descriptor (3 or more)",
                ));
            }
        }
        if let Some(net) = &self.net {
            net.mac
                .parse::<MacAddr>()
                .map_err(|e| ConfigError::Net(format!("net.mac: {e}")))?;
            if let Some(fd) = net.tap_fd {
                if fd < 3 {
                    return Err(ConfigError::Net(format!(
                        "net.tap_fd {fd} is not a passed descriptor (0-2 are stdin, stdout and \
                         stderr); pass the tap as descriptor 3 or above"
                    )));
                }
                if self.vsock.as_ref().and_then(|v| v.listener_fd) == Some(fd) {
                    return Err(ConfigError::Net(format!(
                        "net.tap_fd {fd} is also vsock.listener_fd; each needs its own descriptor"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The command line the guest gets.
    pub fn effective_cmdline(&self) -> String {
        let mut words: Vec<String> = self
            .cmdline
            .clone()
            .unwrap_or_else(default_cmdline)
            .split(' ')
            .filter(|w| !(self.debug_console && *w == "quiet"))
            .map(str::to_owned)
            .collect();
        if self.debug_console {
            words.extend(["printk.time=1".to_owned(), "loglevel=7".to_owned()]);
        }
        if self.save_snapshot.is_some() {
            words.push(crate::snapshot::TEMPLATE_PARAM.to_owned());
        }
        words.join(" ")
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory) << 20
    }

    /// The boot deadline, if any.
    pub fn boot_deadline(&self) -> Option<Duration> {
        self.boot_timeout.map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<VmConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn debug_console_makes_the_kernel_verbose() {
        let mut c = parse(r#"{"kernel": "/k", "debug_console": true}"#).unwrap();
        let line = c.effective_cmdline();
        assert!(!line.split(' ').any(|w| w == "quiet"), "{line}");
        assert!(line.contains("printk.time=1") && line.contains("console=ttyS0"));
        c.debug_console = false;
        assert!(c.effective_cmdline().split(' ').any(|w| w == "quiet"));
    }

    #[test]
    fn json_defaults_match_cli_defaults() {
        let c = parse(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(c, VmConfig::new("/k"));
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let err = parse(r#"{"kernel": "/k", "memroy": 64}"#).unwrap_err();
        assert!(err.to_string().contains("memroy"), "{err}");
    }

    #[test]
    fn ranges_are_checked() {
        let mut c = VmConfig::new("/k");
        c.memory = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Memory(0))));
        c.memory = 128;
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus(0))));
        c.vcpus = 300;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus(300))));
        c.vcpus = 254;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn timeout_needs_a_marker() {
        let mut c = VmConfig::new("/k");
        c.boot_timeout = Some(5);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::TimeoutWithoutMarker)
        ));
        c.ready_marker = Some("up".into());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn shares_and_vsock_are_checked() {
        let mut c = VmConfig::new("/k");
        c.fs.push("root=/run/fs.sock".parse().unwrap());
        assert!(c.validate().is_ok());
        c.fs.push("root=/run/other.sock".parse().unwrap());
        assert!(matches!(c.validate(), Err(ConfigError::Fs { .. })));
        c.fs.truncate(1);
        c.vsock = Some(VsockConfig {
            cid: 2,
            uds_path: "/run/v.sock".into(),
            listener_fd: None,
        });
        assert!(matches!(c.validate(), Err(ConfigError::VsockCid(2))));
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds_path: "/run/v.sock".into(),
            listener_fd: Some(2),
        });
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(_))));
        assert!("no-equals".parse::<FsConfig>().is_err());
        let json = r#"{"kernel": "/k", "fs": [{"tag": "t", "socket": "/s"}], "vsock": {"cid": 3, "uds_path": "/v"}}"#;
        let parsed: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(parsed.fs[0].tag, "t");
        let vsock = parsed.vsock.unwrap();
        assert_eq!((vsock.cid, vsock.listener_fd), (3, None));
        let json = r#"{"kernel": "/k", "vsock": {"cid": 3, "uds_path": "/v", "listener_fd": 3}}"#;
        let parsed: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(parsed.vsock.unwrap().listener_fd, Some(3));
    }

    #[test]
    fn net_is_checked_with_what_to_do() {
        let mut c = VmConfig::new("/k");
        let net = |mac: &str, tap_fd| {
            Some(NetConfig {
                mac: mac.into(),
                tap_fd,
            })
        };
        c.net = net("02:00:00:00:00:01", None);
        assert!(c.validate().is_ok());
        c.net = net("02:00:00:00:00:01", Some(3));
        assert!(c.validate().is_ok());
        for (mac, fd, wanted) in [
            ("02:00:00:00:00", None, "6 two-digit hex octets"),
            ("03:00:00:00:00:01", None, "multicast"),
            ("00:00:00:00:00:00", None, "not a valid NIC address"),
            ("02:00:00:00:00:01", Some(2), "descriptor 3 or above"),
            ("02:00:00:00:00:01", Some(-1), "descriptor 3 or above"),
        ] {
            c.net = net(mac, fd);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.starts_with("Invalid net device: "), "{err}");
            assert!(err.contains(wanted), "{mac} {fd:?}: {err}");
        }
        c.net = net("02:00:00:00:00:01", Some(7));
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds_path: "/run/v.sock".into(),
            listener_fd: Some(7),
        });
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("also vsock.listener_fd"), "{err}");
    }

    #[test]
    fn net_parses_from_json() {
        let json = r#"{"kernel": "/k", "net": {"mac": "02:00:00:00:00:01", "tap_fd": 5}}"#;
        let net = parse(json).unwrap().net.unwrap();
        assert_eq!(
            (net.mac.as_str(), net.tap_fd),
            ("02:00:00:00:00:01", Some(5))
        );
        let json = r#"{"kernel": "/k", "net": {"mac": "02:00:00:00:00:01"}}"#;
        assert_eq!(parse(json).unwrap().net.unwrap().tap_fd, None);
        let json = r#"{"kernel": "/k", "net": {"mac": "02:00:00:00:00:01", "tap": "tap0"}}"#;
        let err = parse(json).unwrap_err().to_string();
        assert!(err.contains("unknown field `tap`"), "{err}");
        assert!(parse(r#"{"kernel": "/k", "net": {}}"#).is_err());
    }

    #[test]
    fn console_spec_parses() {
        assert_eq!("off".parse::<ConsoleSpec>().unwrap(), ConsoleSpec::Off);
        assert_eq!(
            "stdout".parse::<ConsoleSpec>().unwrap(),
            ConsoleSpec::Stdout
        );
        assert_eq!(
            "/tmp/c.log".parse::<ConsoleSpec>().unwrap(),
            ConsoleSpec::File("/tmp/c.log".into())
        );
    }
}
