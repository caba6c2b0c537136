//! Where every front end finds what a sandbox needs: the guest kernel and initrd, the
//! bulkhead-vmm binary and virtiofsd.
//!
//! For each file, in order: its environment variable (`BULKHEAD_KERNEL`, ...:
//! one invocation's override), then its setting in the config, then the
//! default places (the installed location, next to this binary, `PATH`, and a
//! development checkout's `target/guest/`).

use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::Config;

/// The files a sandbox is made from.
#[derive(Clone, Debug)]
pub struct Artifacts {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initrd (the agent).
    pub initrd: PathBuf,
    /// bulkhead-vmm.
    pub vmm: PathBuf,
    /// virtiofsd.
    pub virtiofsd: PathBuf,
}

impl Artifacts {
    /// Finds all four files (see the module doc for the order), or says which
    /// one is missing and how to provide it.
    pub fn resolve(config: &Config) -> Result<Artifacts, ArtifactError> {
        Ok(Artifacts {
            kernel: Artifact::Kernel.locate(config)?.path,
            initrd: Artifact::Initrd.locate(config)?.path,
            vmm: Artifact::Vmm.locate(config)?.path,
            virtiofsd: Artifact::Virtiofsd.locate(config)?.path,
        })
    }

    /// The sandbox `id` made from these files with this host's settings, at
    /// the size the caller chose; one place for what the CLI and the shim
    /// both take from the config.
    pub fn sandbox_config(
        self,
        config: &Config,
        id: String,
        vcpus: u16,
        memory_mib: u32,
        boot_timeout: std::time::Duration,
    ) -> crate::sandbox::SandboxConfig {
        crate::sandbox::SandboxConfig {
            id,
            run_root: config.run_root.clone(),
            kernel: self.kernel,
            initrd: self.initrd,
            vmm: self.vmm,
            virtiofsd: self.virtiofsd,
            memory_mib,
            vcpus,
            boot_timeout,
            virtiofsd_cache: config.virtiofsd_cache.as_str(),
            debug_console: config.debug_console,
            vm_templates: config.vm_templates,
        }
    }
}

/// One of the files a sandbox is made from; lets `bulkhead doctor` look for
/// each on its own and say where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Artifact {
    /// The guest kernel.
    Kernel,
    /// The guest initrd with the agent.
    Initrd,
    /// The bulkhead-vmm binary.
    Vmm,
    /// The virtiofsd binary.
    Virtiofsd,
}

/// A file found, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The file.
    pub path: PathBuf,
    /// Where its name came from.
    pub origin: Origin,
}

/// Where a file's name came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Its environment variable.
    Env(&'static str),
    /// Its setting in the config file.
    Config {
        /// The setting.
        field: &'static str,
        /// The config file.
        file: String,
    },
    /// Found in the default places.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Env(var) => write!(f, "from ${var}"),
            Origin::Config { field, file } => write!(f, "from `{field}` in {file}"),
            Origin::Default => write!(f, "found in the default places"),
        }
    }
}

/// Why a file could not be found: what is wrong, and how to provide it (kept
/// apart so `bulkhead doctor` can print them on their own lines).
#[derive(Debug, Error)]
#[error("{problem}; {fix}")]
pub struct ArtifactError {
    /// Which file.
    pub artifact: Artifact,
    /// What is wrong ("Cannot find the guest kernel (looked in ...)").
    pub problem: String,
    /// What to do about it.
    pub fix: String,
}

/// In a development checkout, the `target/guest` that `cargo xtask guest`
/// fills, for a binary in `target/<profile>/` or in the static release build's
/// `target/static/<triple>/release/`: the nearest ancestor of `exe_dir` called
/// `target`, or else `exe_dir`'s parent (a `CARGO_TARGET_DIR` of another name).
fn checkout_guest_dir(exe_dir: &Path) -> Option<PathBuf> {
    let target = exe_dir
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "target"))
        .or_else(|| exe_dir.parent())?;
    Some(target.join("guest"))
}

/// Where bulkhead's Debian package installs its own virtiofsd.
pub const PACKAGED_VIRTIOFSD: &str = "/usr/libexec/bulkhead/virtiofsd";

/// A default place to look.
enum Place {
    /// This file.
    At(PathBuf),
    /// The first directory on `PATH` that has a file of this name.
    OnPath(&'static str),
}

impl Artifact {
    /// All of them, in the order a sandbox needs them.
    pub const ALL: [Artifact; 4] = [
        Artifact::Kernel,
        Artifact::Initrd,
        Artifact::Vmm,
        Artifact::Virtiofsd,
    ];

    /// What it is, for messages ("guest kernel").
    pub fn what(self) -> &'static str {
        match self {
            Artifact::Kernel => "the guest kernel",
            Artifact::Initrd => "the guest initrd",
            Artifact::Vmm => "bulkhead-vmm",
            Artifact::Virtiofsd => "virtiofsd",
        }
    }

    /// Its setting in the config file.
    pub fn config_field(self) -> &'static str {
        match self {
            Artifact::Kernel => "kernel",
            Artifact::Initrd => "initrd",
            Artifact::Vmm => "vmm",
            Artifact::Virtiofsd => "virtiofsd",
        }
    }

    /// The environment variable that overrides it.
    pub fn env_var(self) -> &'static str {
        match self {
            Artifact::Kernel => "BULKHEAD_KERNEL",
            Artifact::Initrd => "BULKHEAD_INITRD",
            Artifact::Vmm => "BULKHEAD_VMM",
            Artifact::Virtiofsd => "BULKHEAD_VIRTIOFSD",
        }
    }

    fn configured(self, config: &Config) -> Option<&Path> {
        match self {
            Artifact::Kernel => config.kernel.as_deref(),
            Artifact::Initrd => config.initrd.as_deref(),
            Artifact::Vmm => config.vmm.as_deref(),
            Artifact::Virtiofsd => config.virtiofsd.as_deref(),
        }
    }

    /// How to get it when it is nowhere.
    fn hint(self) -> &'static str {
        match self {
            Artifact::Kernel | Artifact::Initrd => {
                ", or build it in a checkout with `cargo xtask setup && cargo xtask guest`"
            }
            Artifact::Vmm => ", or install it next to `bulkhead`",
            Artifact::Virtiofsd => ", or install it (`cargo install virtiofsd`)",
        }
    }

    fn default_places(self) -> Vec<Place> {
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf));
        let dev_guest = exe_dir.as_deref().and_then(checkout_guest_dir);
        let share = Path::new("/usr/share/bulkhead");
        let at = |p: Option<PathBuf>| p.map(Place::At);
        match self {
            Artifact::Kernel => [
                at(Some(share.join("vmlinux"))),
                at(dev_guest.map(|d| d.join("vmlinux"))),
            ]
            .into_iter()
            .flatten()
            .collect(),
            Artifact::Initrd => [
                at(Some(share.join("initrd.img"))),
                at(dev_guest.map(|d| d.join("initrd.img"))),
            ]
            .into_iter()
            .flatten()
            .collect(),
            Artifact::Vmm => [
                at(exe_dir.map(|d| d.join("bulkhead-vmm"))),
                Some(Place::OnPath("bulkhead-vmm")),
            ]
            .into_iter()
            .flatten()
            .collect(),
            Artifact::Virtiofsd => [
                // The one the Debian package ships (Debian 12 has none that fits).
                at(Some(PathBuf::from(PACKAGED_VIRTIOFSD))),
                Some(Place::OnPath("virtiofsd")),
                at(cargo_bin("virtiofsd")),
                at(Some(PathBuf::from("/usr/libexec/virtiofsd"))),
            ]
            .into_iter()
            .flatten()
            .collect(),
        }
    }

    /// Finds it: environment variable, then config, then the default places.
    pub fn locate(self, config: &Config) -> Result<Located, ArtifactError> {
        let var = self.env_var();
        if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(p);
            if !path.is_file() {
                return Err(ArtifactError {
                    artifact: self,
                    problem: format!("{var}={} is not a file", path.display()),
                    fix: format!("fix the path, or unset {var}"),
                });
            }
            return Ok(Located {
                path,
                origin: Origin::Env(var),
            });
        }
        let field = self.config_field();
        if let Some(path) = self.configured(config) {
            if !path.is_file() {
                return Err(ArtifactError {
                    artifact: self,
                    problem: format!(
                        "`{field}` in {} is {}, which is not a file",
                        config.origin(),
                        path.display()
                    ),
                    fix: "fix the path, or remove the setting to search the default places"
                        .to_owned(),
                });
            }
            return Ok(Located {
                path: path.to_owned(),
                origin: Origin::Config {
                    field,
                    file: config.origin(),
                },
            });
        }
        let places = self.default_places();
        let found = places.iter().find_map(|place| match place {
            Place::At(p) => p.is_file().then(|| p.clone()),
            Place::OnPath(name) => on_path(name),
        });
        if let Some(path) = found {
            return Ok(Located {
                path,
                origin: Origin::Default,
            });
        }
        Err(self.not_found(&places, config))
    }

    /// The error for a file in none of `places`: where it looked, what to set.
    fn not_found(self, places: &[Place], config: &Config) -> ArtifactError {
        let looked: Vec<String> = places
            .iter()
            .map(|place| match place {
                Place::At(p) => p.display().to_string(),
                Place::OnPath(_) => "PATH".to_owned(),
            })
            .collect();
        let config_file = config
            .file()
            .map(|f| f.to_string())
            .unwrap_or_else(|| crate::config::DEFAULT_CONFIG_PATH.to_owned());
        ArtifactError {
            artifact: self,
            problem: format!(
                "Cannot find {} (looked in {})",
                self.what(),
                looked.join(", ")
            ),
            fix: format!(
                "set `{}` in {config_file} or ${}{}",
                self.config_field(),
                self.env_var(),
                self.hint()
            ),
        }
    }
}

/// The first file called `name` in a directory on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn cargo_bin(name: &str) -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin").join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_path_is_used_and_a_bad_one_names_the_setting() {
        // No environment variable in the way: these names are not set in tests.
        let dir = tempfile::tempdir().unwrap();
        let initrd = dir.path().join("initrd.img");
        std::fs::write(&initrd, b"cpio").unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(
            &file,
            format!(
                "initrd = {:?}\nkernel = {:?}\n",
                initrd.display().to_string(),
                dir.path().join("missing").display().to_string()
            ),
        )
        .unwrap();
        let config = Config::load_file(crate::config::ConfigFile {
            path: file.clone(),
            named_by: crate::config::NamedBy::Flag,
        })
        .unwrap();
        if std::env::var_os("BULKHEAD_INITRD").is_none() {
            let found = Artifact::Initrd.locate(&config).unwrap();
            assert_eq!(found.path, initrd);
            assert!(found.origin.to_string().contains("`initrd`"));
        }
        if std::env::var_os("BULKHEAD_KERNEL").is_none() {
            let e = Artifact::Kernel.locate(&config).unwrap_err().to_string();
            let expected = format!("`kernel` in {} (from --config) is ", file.display());
            assert!(e.starts_with(&expected), "{e}");
            assert!(e.contains("which is not a file"), "{e}");
        }
    }

    #[test]
    fn not_found_says_where_it_looked_and_what_to_set() {
        let places = [
            Place::At("/a/bulkhead-vmm".into()),
            Place::OnPath("bulkhead-vmm"),
        ];
        let e = Artifact::Vmm.not_found(&places, &Config::default());
        assert_eq!(
            e.to_string(),
            "Cannot find bulkhead-vmm (looked in /a/bulkhead-vmm, PATH); \
             set `vmm` in /etc/bulkhead/config.toml or $BULKHEAD_VMM, or install it next to `bulkhead`"
        );
        assert_eq!(
            e.fix,
            "set `vmm` in /etc/bulkhead/config.toml or $BULKHEAD_VMM, or install it next to `bulkhead`"
        );
    }

    #[test]
    fn a_checkout_binary_finds_target_guest() {
        let guest = |exe_dir: &str| checkout_guest_dir(Path::new(exe_dir)).unwrap();
        assert_eq!(guest("/src/target/release"), Path::new("/src/target/guest"));
        assert_eq!(
            guest("/src/target/static/x86_64-unknown-linux-gnu/release"),
            Path::new("/src/target/guest")
        );
        assert_eq!(guest("/build/out/debug"), Path::new("/build/out/guest"));
    }
}
