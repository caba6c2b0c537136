//! `/etc/bulkhead/config.toml`: this host's settings for every sandbox.
//!
//! Every setting is optional and the defaults work with no file at all, so a
//! fresh install needs no config. A program reads it once at start
//! ([`Config::load`]) and passes the values down; command-line flags and the
//! `BULKHEAD_*` environment variables override it. `shim/config.example.toml`
//! documents every setting with its default, and a unit test keeps the two in
//! step.
//!
//! The doc comment of each [`Config`] field is the user-facing documentation of
//! that setting.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// The config file read when neither `--config` nor `$BULKHEAD_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/bulkhead/config.toml";
/// The environment variable that names another config file.
pub const CONFIG_ENV: &str = "BULKHEAD_CONFIG";

/// Memory the guest itself needs besides the container (kernel, agent, page
/// cache): `bulkhead run --memory N` gives the microVM N plus this.
pub const GUEST_OVERHEAD_MIB: u32 = 96;
/// Default microVM memory: what `bulkhead run` has always given a VM without
/// `--memory` (a 128 MiB container plus [`GUEST_OVERHEAD_MIB`]).
pub const DEFAULT_MEMORY_MIB: u32 = 128 + GUEST_OVERHEAD_MIB;
/// The smallest `memory_mib` accepted: below this the guest kernel and agent
/// leave a container next to nothing.
pub const MIN_MEMORY_MIB: u32 = 64;
/// The most vCPUs bulkhead-vmm can describe (its MP table's limit).
pub const MAX_VCPUS: u16 = 254;
/// Default seconds a microVM has to boot and its agent to report ready.
pub const DEFAULT_BOOT_TIMEOUT_SECS: u64 = 60;
/// Default tracing filter: warnings only, so the CLI's stderr stays the container's.
pub const DEFAULT_LOG_LEVEL: &str = "warn";
/// Default directory under which each sandbox gets its own directory.
pub const DEFAULT_RUN_ROOT: &str = "/run/bulkhead";
/// Where the `bulkhead` CLI keeps images and containers by default.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/bulkhead";

/// This host's settings for bulkhead's sandboxes (`/etc/bulkhead/config.toml`).
///
/// Deserialized from TOML; every field may be left out, unknown fields are
/// refused (a misspelt setting must not be silently ignored).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Guest kernel: an uncompressed ELF `vmlinux` (fastest) or a bzImage.
    /// Absolute path. Default: searched in `/usr/share/bulkhead/vmlinux`, then, in
    /// a development checkout, `target/guest/vmlinux` (`cargo xtask guest`).
    /// `$BULKHEAD_KERNEL` overrides it.
    pub kernel: Option<PathBuf>,
    /// Guest initrd holding bulkhead's agent. Absolute path. Default: searched in
    /// `/usr/share/bulkhead/initrd.img`, then `target/guest/initrd.img`.
    /// `$BULKHEAD_INITRD` overrides it.
    pub initrd: Option<PathBuf>,
    /// The bulkhead-vmm binary. Absolute path. Default: next to the `bulkhead`
    /// binary, then on `PATH`. `$BULKHEAD_VMM` overrides it.
    pub vmm: Option<PathBuf>,
    /// The virtiofsd binary that shares each container's root file system with
    /// its microVM. Absolute path. Default: the Debian package's
    /// `/usr/libexec/bulkhead/virtiofsd`, then on `PATH`, then `~/.cargo/bin`,
    /// then `/usr/libexec/virtiofsd`. `$BULKHEAD_VIRTIOFSD` overrides it.
    pub virtiofsd: Option<PathBuf>,
    /// virtiofsd's caching policy (its `--cache`): `auto` (default), `always`,
    /// `never` or `metadata`.
    pub virtiofsd_cache: VirtiofsdCache,
    /// vCPUs of each microVM, 1 to 254. Default 1. `bulkhead run --cpus` overrides it.
    pub vcpus: u16,
    /// Memory of each microVM in MiB, at least 64. Default 224 (a 128 MiB
    /// container plus 96 MiB for the guest). `bulkhead run --memory N` sets the
    /// container's limit instead, and the microVM gets N + 96.
    pub memory_mib: u32,
    /// Seconds a microVM has to boot and its agent to report ready; more than 0.
    /// Default 60. `bulkhead run --boot-timeout` overrides it.
    pub boot_timeout_secs: u64,
    /// What bulkhead logs to stderr: a tracing filter such as `warn` (default),
    /// `info`, `debug` or `bulkhead=debug`. `$BULKHEAD_LOG` overrides it.
    pub log_level: String,
    /// When true, the guest kernel logs verbosely (with timestamps) to the
    /// sandbox's `console.log`, for debugging boot problems. Default false.
    pub debug_console: bool,
    /// When true, sandboxes start from a VM template: a VM booted once per
    /// shape (vCPUs, memory, kernel, initrd) up to its agent's setup and saved
    /// under `run_root/.templates/`; each sandbox resumes a copy, with its own
    /// clock and a fresh random seed, instead of booting a kernel. Default
    /// true; false makes every sandbox boot its kernel.
    pub vm_templates: bool,
    /// What `bulkhead run`'s containers may connect to, unless `--egress`
    /// says otherwise: `open` (default), `deny`, or `allow=CIDR[:PORT],...`.
    /// Enforced on the host, where the guest cannot lift it.
    pub egress: String,
    /// Directory holding one directory per running sandbox (sockets, logs).
    /// Absolute path. Default `/run/bulkhead`.
    pub run_root: PathBuf,
    /// Where the `bulkhead` CLI keeps its images (`images/`) and containers
    /// (`containers/`: settings, logs, exit status). Absolute path. Default
    /// `/var/lib/bulkhead`. `$BULKHEAD_ROOT` overrides it.
    pub state_root: PathBuf,
    /// The file these settings came from; `None` for the built-in defaults.
    #[serde(skip)]
    file: Option<ConfigFile>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            kernel: None,
            initrd: None,
            vmm: None,
            virtiofsd: None,
            virtiofsd_cache: VirtiofsdCache::default(),
            vcpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
            boot_timeout_secs: DEFAULT_BOOT_TIMEOUT_SECS,
            log_level: DEFAULT_LOG_LEVEL.to_owned(),
            debug_console: false,
            vm_templates: true,
            egress: "open".to_owned(),
            run_root: PathBuf::from(DEFAULT_RUN_ROOT),
            state_root: PathBuf::from(DEFAULT_STATE_ROOT),
            file: None,
        }
    }
}

/// virtiofsd's caching policy for a container's root file system (its `--cache`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VirtiofsdCache {
    /// The guest caches, and revalidates when files may have changed on the host:
    /// host-side changes show up, at little cost.
    #[default]
    Auto,
    /// The guest caches everything and never revalidates: fastest, for root file
    /// systems nothing on the host changes while the container runs.
    Always,
    /// No caching: every access goes to the host. Slowest; host-side changes show
    /// up at once.
    Never,
    /// Only metadata (attributes, directory entries) is cached, not file contents.
    Metadata,
}

impl VirtiofsdCache {
    /// The value of virtiofsd's `--cache` flag.
    pub fn as_str(self) -> &'static str {
        match self {
            VirtiofsdCache::Auto => "auto",
            VirtiofsdCache::Always => "always",
            VirtiofsdCache::Never => "never",
            VirtiofsdCache::Metadata => "metadata",
        }
    }
}

impl fmt::Display for VirtiofsdCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A config file and who named it, so errors can say where to fix things.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigFile {
    /// The file.
    pub path: PathBuf,
    /// Who chose it.
    pub named_by: NamedBy,
}

/// Who chose the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamedBy {
    /// A `--config` flag.
    Flag,
    /// `$BULKHEAD_CONFIG`.
    Env,
    /// Nobody: the default location, [`DEFAULT_CONFIG_PATH`].
    Default,
}

impl fmt::Display for ConfigFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        match self.named_by {
            NamedBy::Flag => write!(f, " (from --config)"),
            NamedBy::Env => write!(f, " (from ${CONFIG_ENV})"),
            NamedBy::Default => Ok(()),
        }
    }
}

/// Why the config could not be used. Each names the file and, where it can,
/// the setting and line, and says what to do.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("Cannot read the bulkhead config {file}")]
    Read {
        /// The file.
        file: ConfigFile,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown setting or a value of the
    /// wrong type; toml's message gives the line and the setting.
    #[error(
        "Invalid bulkhead config {origin}: fix the line shown, or delete it to use the default"
    )]
    Parse {
        /// The file, or `<config text>` for text not from a file.
        origin: String,
        /// toml's report: line, column, what it expected.
        #[source]
        source: toml::de::Error,
    },
    /// A setting has a value outside what it accepts.
    #[error("Invalid `{field}` {}{origin}: {problem}", line.map(|l| format!("at line {l} of ")).unwrap_or_else(|| "in ".to_owned()))]
    Invalid {
        /// The file, or `<config text>` for text not from a file.
        origin: String,
        /// The setting.
        field: &'static str,
        /// Its line in the file, when it is there.
        line: Option<usize>,
        /// What is wrong and what is accepted.
        problem: String,
    },
}

impl Config {
    /// Reads the host's config: the file `$BULKHEAD_CONFIG` names if set (it must
    /// exist), else `/etc/bulkhead/config.toml` if it exists, else the built-in
    /// defaults.
    pub fn load() -> Result<Config, ConfigError> {
        match locate(std::env::var_os(CONFIG_ENV), Path::new(DEFAULT_CONFIG_PATH)) {
            Some(file) => Config::load_file(file),
            None => Ok(Config::default()),
        }
    }

    /// Reads and checks one config file (which must exist).
    pub fn load_file(file: ConfigFile) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(&file.path) {
            Ok(text) => Config::parse(&text, Some(file)),
            Err(source) => Err(ConfigError::Read { file, source }),
        }
    }

    /// Parses and checks config text; `file` is where it came from, for errors.
    pub fn parse(text: &str, file: Option<ConfigFile>) -> Result<Config, ConfigError> {
        let origin = error_origin(file.as_ref());
        let mut config: Config =
            toml::from_str(text).map_err(|source| ConfigError::Parse { origin, source })?;
        config.file = file;
        config.validate_text(Some(text))?;
        Ok(config)
    }

    /// Checks every value against what it accepts (files named by paths are
    /// checked later, by whoever needs them, so `bulkhead doctor` can still run).
    /// Call it again after overriding fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_text(None)
    }

    fn validate_text(&self, text: Option<&str>) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, problem: String| ConfigError::Invalid {
            origin: error_origin(self.file.as_ref()),
            field,
            line: text.and_then(|t| line_of(t, field)),
            problem,
        };
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(invalid(
                "vcpus",
                format!("{} vCPUs; it must be 1 to {MAX_VCPUS}", self.vcpus),
            ));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(
                "memory_mib",
                format!(
                    "{} MiB is too little for a microVM; it must be at least {MIN_MEMORY_MIB}",
                    self.memory_mib
                ),
            ));
        }
        if let Err(e) = self
            .egress
            .parse::<crate::sandbox::network::egress::EgressPolicy>()
        {
            return Err(invalid("egress", e.replace("--egress", "egress =")));
        }
        if self.boot_timeout_secs == 0 {
            return Err(invalid(
                "boot_timeout_secs",
                "0 would fail every boot; it must be at least 1".to_owned(),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(invalid(
                "log_level",
                format!(
                    "{:?} is not a tracing filter ({e}); use e.g. \"warn\", \"info\" or \"debug\"",
                    self.log_level
                ),
            ));
        }
        let paths = [
            ("kernel", self.kernel.as_deref()),
            ("initrd", self.initrd.as_deref()),
            ("vmm", self.vmm.as_deref()),
            ("virtiofsd", self.virtiofsd.as_deref()),
            ("run_root", Some(self.run_root.as_path())),
            ("state_root", Some(self.state_root.as_path())),
        ];
        for (field, path) in paths {
            if let Some(path) = path.filter(|p| !p.is_absolute()) {
                return Err(invalid(
                    field,
                    format!(
                        "{:?} is relative; give an absolute path",
                        path.display().to_string()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The file these settings came from; `None` for the built-in defaults.
    pub fn file(&self) -> Option<&ConfigFile> {
        self.file.as_ref()
    }

    /// Where the settings came from, for messages: the file, or "the built-in
    /// defaults (no /etc/bulkhead/config.toml)".
    pub fn origin(&self) -> String {
        describe(self.file.as_ref())
    }

    /// `boot_timeout_secs` as a duration.
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.boot_timeout_secs)
    }
}

impl FromStr for Config {
    type Err = ConfigError;

    /// Parses and checks config text that did not come from a file.
    fn from_str(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, None)
    }
}

/// The file to read: the one `env` (the value of `$BULKHEAD_CONFIG`) names, else
/// `default` if it exists, else none. An empty `env` counts as unset.
fn locate(env: Option<std::ffi::OsString>, default: &Path) -> Option<ConfigFile> {
    match env.filter(|v| !v.is_empty()) {
        Some(path) => Some(ConfigFile {
            path: PathBuf::from(path),
            named_by: NamedBy::Env,
        }),
        None => default.exists().then(|| ConfigFile {
            path: default.to_owned(),
            named_by: NamedBy::Default,
        }),
    }
}

fn describe(file: Option<&ConfigFile>) -> String {
    match file {
        Some(file) => file.to_string(),
        None => format!("the built-in defaults (no {DEFAULT_CONFIG_PATH})"),
    }
}

/// How errors name where a bad value came from.
fn error_origin(file: Option<&ConfigFile>) -> String {
    match file {
        Some(file) => file.to_string(),
        None => "<config text>".to_owned(),
    }
}

/// The 1-based line where `field` is set in `text`, if it is.
fn line_of(text: &str, field: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            line.trim_start()
                .strip_prefix(field)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config.example.toml");

    fn error(text: &str) -> String {
        let e = text.parse::<Config>().expect_err(text);
        // The message and its chained source, as the CLI prints them.
        match std::error::Error::source(&e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        }
    }

    #[test]
    fn no_file_means_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("config.toml");
        assert_eq!(locate(None, &absent), None);
        assert_eq!(locate(Some("".into()), &absent), None);
        let config = Config::default();
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.memory_mib, 224);
        assert_eq!(config.boot_timeout(), Duration::from_secs(60));
        assert_eq!(config.log_level, "warn");
        assert_eq!(config.virtiofsd_cache.as_str(), "auto");
        assert!(!config.debug_console);
        assert_eq!(config.run_root, Path::new("/run/bulkhead"));
        assert_eq!(config.kernel, None);
        assert!(config.validate().is_ok());
        assert!(config.origin().contains("built-in defaults"));
        assert_eq!("".parse::<Config>().unwrap(), config);
    }

    #[test]
    fn env_names_the_file_and_the_default_is_used_when_present() {
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("config.toml");
        std::fs::write(&default, "vcpus = 2\n").unwrap();
        let found = locate(None, &default).unwrap();
        assert_eq!(found.named_by, NamedBy::Default);
        assert_eq!(Config::load_file(found).unwrap().vcpus, 2);
        let named = locate(Some("/elsewhere.toml".into()), &default).unwrap();
        assert_eq!(named.named_by, NamedBy::Env);
        let e = Config::load_file(named).unwrap_err().to_string();
        assert!(e.contains("/elsewhere.toml (from $BULKHEAD_CONFIG)"), "{e}");
    }

    #[test]
    fn example_file_as_shipped_is_the_defaults() {
        assert_eq!(EXAMPLE.parse::<Config>().unwrap(), Config::default());
    }

    #[test]
    fn example_file_uncommented_is_what_it_documents() {
        // Every setting appears as `#key = value`; uncommented, the file sets each
        // one to its default (paths: the example location shown).
        let uncommented: String = EXAMPLE
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if !rest.starts_with([' ', '#']) && !rest.is_empty() => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config: Config = uncommented.parse().unwrap();
        let expected = Config {
            kernel: Some("/usr/share/bulkhead/vmlinux".into()),
            initrd: Some("/usr/share/bulkhead/initrd.img".into()),
            vmm: Some("/usr/local/bin/bulkhead-vmm".into()),
            virtiofsd: Some("/usr/libexec/virtiofsd".into()),
            ..Config::default()
        };
        assert_eq!(config, expected);
        // And every field is in the example.
        for field in [
            "kernel",
            "initrd",
            "vmm",
            "virtiofsd",
            "virtiofsd_cache",
            "vcpus",
            "memory_mib",
            "boot_timeout_secs",
            "log_level",
            "debug_console",
            "vm_templates",
            "egress",
            "run_root",
            "state_root",
        ] {
            assert!(
                line_of(&uncommented, field).is_some(),
                "{field} not documented"
            );
        }
    }

    #[test]
    fn every_field_is_read() {
        let config: Config = r#"
            kernel = "/k"
            initrd = "/i"
            vmm = "/v"
            virtiofsd = "/f"
            virtiofsd_cache = "metadata"
            vcpus = 254
            memory_mib = 64
            boot_timeout_secs = 5
            log_level = "bulkhead=debug,info"
            debug_console = true
            egress = "deny"
            run_root = "/tmp/bh"
            state_root = "/srv/bh"
        "#
        .parse()
        .unwrap();
        assert_eq!(config.egress, "deny");
        assert_eq!(config.kernel.as_deref(), Some(Path::new("/k")));
        assert_eq!(config.virtiofsd_cache, VirtiofsdCache::Metadata);
        assert_eq!(config.vcpus, 254);
        assert_eq!(config.memory_mib, 64);
        assert_eq!(config.boot_timeout(), Duration::from_secs(5));
        assert!(config.debug_console);
        assert_eq!(config.run_root, Path::new("/tmp/bh"));
        assert_eq!(config.state_root, Path::new("/srv/bh"));
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let e = error("vcpus = 2\nmemory = 512\n");
        assert!(e.contains("unknown field `memory`"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("Invalid bulkhead config <config text>"), "{e}");
    }

    #[test]
    fn errors_name_the_file() {
        let file = ConfigFile {
            path: "/etc/bulkhead/config.toml".into(),
            named_by: NamedBy::Default,
        };
        let e = Config::parse("vcpus = 0\n", Some(file.clone()))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "Invalid `vcpus` at line 1 of /etc/bulkhead/config.toml: 0 vCPUs; it must be 1 to 254"
        );
        let e = Config::parse("vcpus = \"two\"\n", Some(file))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/bulkhead/config.toml"), "{e}");
    }

    #[test]
    fn bad_values_are_refused() {
        for (text, expect) in [
            ("vcpus = 0", "`vcpus`"),
            ("vcpus = 255", "must be 1 to 254"),
            ("vcpus = -1", "vcpus"),
            ("memory_mib = 63", "`memory_mib`"),
            ("boot_timeout_secs = 0", "`boot_timeout_secs`"),
            (
                "virtiofsd_cache = \"sometimes\"",
                "`auto`, `always`, `never`, `metadata`",
            ),
            ("log_level = \"info=loud\"", "`log_level`"),
            ("kernel = \"vmlinux\"", "give an absolute path"),
            ("run_root = \"run\"", "`run_root`"),
            ("debug_console = \"yes\"", "debug_console"),
            ("vcpus = ", "line 1"),
        ] {
            let e = error(text);
            assert!(e.contains(expect), "{text}: {e}");
        }
    }

    #[test]
    fn validate_catches_overrides() {
        let config = Config {
            vcpus: 0,
            ..Config::default()
        };
        assert!(config.validate().unwrap_err().to_string().contains("vcpus"));
    }
}
