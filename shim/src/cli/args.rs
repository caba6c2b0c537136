//! The `bulkhead` command line's grammar (clap), apart from what it does.
//!
//! It lives in the library, not in the binary, so that the packaging task can
//! render man pages and shell completions from the very definitions the binary
//! parses, and so that the grammar is unit-tested (an unknown flag must be
//! named as one, not taken for an image).

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

/// Containers in microVMs: each runs in its own KVM guest kernel.
#[derive(Debug, Parser)]
#[command(name = "bulkhead", version)]
pub struct Cli {
    /// Read settings from FILE instead of $BULKHEAD_CONFIG or /etc/bulkhead/config.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// What `bulkhead` is asked to do: one variant per subcommand.
// Made once per process: the size of the `run` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a new container, in its own microVM; exits with its
    /// status (or prints its id with -d).
    Run(RunArgs),
    /// Run another command in a running container.
    Exec(ExecArgs),
    /// List containers (running ones; all with -a).
    Ps(PsArgs),
    /// Print a container's output (stdout and stderr as written).
    Logs(LogsArgs),
    /// Stop containers: their stop signal, then SIGKILL after a grace period.
    Stop(StopArgs),
    /// Send a signal to containers.
    Kill(KillArgs),
    /// Remove stopped containers (running ones too, with -f).
    Rm(RmArgs),
    /// Show containers' settings and state as JSON.
    Inspect(NamesArgs),
    /// Pull an image from a registry.
    Pull(PullArgs),
    /// Load images from an OCI layout (directory or tar) or a `docker save` tarball.
    Load(LoadArgs),
    /// List images.
    Images(ImagesArgs),
    /// Remove images.
    Rmi(RmiArgs),
    /// Manage networks: create, ls, rm, inspect.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Check that this host can run bulkhead, and say how to fix what is missing;
    /// exits 1 if a check failed.
    Doctor(DoctorArgs),
    /// Print a shell completion script: `source <(bulkhead completion bash)`,
    /// or save it where the shell loads completions.
    Completion(CompletionArgs),
    /// (internal) Hold a detached container's microVM for its life.
    #[command(name = "__monitor", hide = true)]
    Monitor {
        /// The container's id.
        id: String,
    },
}

/// `bulkhead network ...`.
#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Create a bridge network; containers on it reach each other by address
    /// and by name.
    Create {
        /// Its addresses [default: the first free 10.78.N.0/24].
        #[arg(long, value_name = "CIDR")]
        subnet: Option<String>,
        /// The network's name.
        name: String,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls {
        /// Only names.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove networks that no container is on.
    #[command(alias = "remove")]
    Rm {
        /// Network names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Show networks as JSON.
    Inspect {
        /// Network names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// `bulkhead doctor`'s flags.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// The containerd config to check for bulkhead's runtime [default: /etc/containerd/config.toml].
    #[arg(long, value_name = "FILE")]
    pub containerd_config: Option<PathBuf>,
}

/// `bulkhead completion`'s argument.
#[derive(Debug, clap::Args)]
pub struct CompletionArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `bulkhead exec`'s flags and arguments.
#[derive(Debug, clap::Args)]
#[command(trailing_var_arg = true)]
pub struct ExecArgs {
    /// Keep stdin open and pass it to the process.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the process a terminal (pty).
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User (name or UID, optionally :group) to run as.
    #[arg(short, long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// The container's name or id.
    pub container: String,
    /// The command and its arguments.
    #[arg(allow_hyphen_values = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `bulkhead run`'s flags and arguments.
#[derive(Debug, clap::Args)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// Run on this host directory as the root file system instead of an image
    /// (then every argument is the command).
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// Name the container; a random one otherwise.
    #[arg(long)]
    pub name: Option<String>,
    /// Run in the background and print the container's id.
    #[arg(short, long)]
    pub detach: bool,
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Keep stdin open and pass it to the process.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the process a terminal (pty).
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Read environment variables from a file, one KEY=VALUE per line (repeatable).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Bind a host directory into the container, read-only with :ro (repeatable).
    #[arg(short, long = "volume", value_name = "HOST:CTR[:ro]")]
    pub volume: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User (name or UID, optionally :group) to run as.
    #[arg(short, long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Override the image's entrypoint ("" for none).
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,
    /// Memory limit of the container, e.g. 256m or 1g (the microVM gets this
    /// plus the guest's share).
    #[arg(short, long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// CPUs for the container, e.g. 1.5 (the microVM gets that many vCPUs,
    /// rounded up) [default: the config's `vcpus`, 1].
    #[arg(long)]
    pub cpus: Option<String>,
    /// Mount the root file system read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Add a capability to Docker's default set, e.g. NET_ADMIN, or ALL (repeatable).
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Drop a capability from the default set, or ALL (repeatable).
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// seccomp=PROFILE.json (an OCI profile), seccomp=unconfined, or
    /// no-new-privileges (repeatable).
    #[arg(long = "security-opt", value_name = "OPT")]
    pub security_opt: Vec<String>,
    /// A resource limit, NAME=SOFT[:HARD], e.g. nofile=1024:2048 (repeatable).
    #[arg(long, value_name = "NAME=SOFT[:HARD]")]
    pub ulimit: Vec<String>,
    /// A kernel parameter of the container's namespaces, e.g.
    /// net.ipv4.ip_forward=1 (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub sysctl: Vec<String>,
    /// Mount a tmpfs, e.g. /run:size=64m (repeatable).
    #[arg(long, value_name = "DIR[:OPTIONS]")]
    pub tmpfs: Vec<String>,
    /// The size of /dev/shm, e.g. 256m [default: 64m].
    #[arg(long = "shm-size", value_name = "SIZE")]
    pub shm_size: Option<String>,
    /// Publish a container port on the host: [IP:]HOST_PORT:CONTAINER_PORT[/tcp|/udp] (repeatable).
    #[arg(short, long = "publish", value_name = "[IP:]HOST:CTR[/PROTO]")]
    pub publish: Vec<String>,
    /// Connect to this network: `none` for only loopback [default: bulkhead].
    #[arg(long, alias = "net", value_name = "NAME")]
    pub network: Option<String>,
    /// DNS server for the container (repeatable) [default: the host's, without loopback ones].
    #[arg(long, value_name = "IP")]
    pub dns: Vec<String>,
    /// Add a line to the container's /etc/hosts (repeatable).
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,
    /// What the container may connect to: open, deny, or allow=CIDR[:PORT],...
    /// (enforced on the host) [default: the config's `egress`, open].
    #[arg(long, value_name = "POLICY")]
    pub egress: Option<String>,
    /// The container's host name [default: its short id].
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Seconds the microVM has to come up [default: the config's `boot_timeout_secs`, 60].
    #[arg(long, value_name = "SECS")]
    pub boot_timeout: Option<u64>,
    /// IMAGE [CMD...], or with --rootfs: CMD...
    ///
    /// Flags for bulkhead come first: everything from the image on (from the
    /// command on, with --rootfs) is the container's, so `run busybox ls -l`
    /// passes `-l` to ls, and `--foo busybox` is an unknown flag, not an image.
    #[arg(value_name = "IMAGE [CMD]")]
    pub args: Vec<String>,
}

/// `bulkhead ps`'s flags.
#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// All containers, not only running ones.
    #[arg(short, long)]
    pub all: bool,
    /// Only ids.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `bulkhead logs`'s flags and argument.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// Keep printing new output until the container exits.
    #[arg(short, long)]
    pub follow: bool,
    /// The container's name or id.
    pub container: String,
}

/// `bulkhead stop`'s flags and arguments.
#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// Seconds to wait after the stop signal before SIGKILL.
    #[arg(short, long = "time", default_value_t = 10)]
    pub time: u64,
    /// Names or ids.
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `bulkhead kill`'s flags and arguments.
#[derive(Debug, clap::Args)]
pub struct KillArgs {
    /// The signal (name or number).
    #[arg(short, long, default_value = "KILL")]
    pub signal: String,
    /// Names or ids.
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `bulkhead rm`'s flags and arguments.
#[derive(Debug, clap::Args)]
pub struct RmArgs {
    /// Kill and remove running containers too.
    #[arg(short, long)]
    pub force: bool,
    /// Names or ids.
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// Containers named by name or id (`bulkhead inspect`).
#[derive(Debug, clap::Args)]
pub struct NamesArgs {
    /// Names or ids.
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `bulkhead pull`'s flags and argument.
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// Allow plain HTTP to this registry (host[:port]; localhost always may).
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
    /// The image, e.g. busybox, busybox:1.36, ghcr.io/org/app@sha256:...
    pub reference: String,
}

/// `bulkhead load`'s flags.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The archive: an OCI layout (directory or tar) or a `docker save` tarball.
    #[arg(short, long, value_name = "FILE")]
    pub input: PathBuf,
    /// The name to give an image the archive does not name.
    #[arg(long, value_name = "NAME[:TAG]")]
    pub tag: Option<String>,
}

/// `bulkhead images`'s flags.
#[derive(Debug, clap::Args)]
pub struct ImagesArgs {
    /// Only ids.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `bulkhead rmi`'s flags and arguments.
#[derive(Debug, clap::Args)]
pub struct RmiArgs {
    /// Remove even if containers use it.
    #[arg(short, long)]
    pub force: bool,
    /// Names or ids.
    #[arg(required = true)]
    pub images: Vec<String>,
}

/// The `bulkhead` command as clap sees it, for man pages and completions.
pub fn command() -> clap::Command {
    Cli::command()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(line: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("bulkhead").chain(line.iter().copied()))
    }

    fn run_args(line: &[&str]) -> RunArgs {
        match parse(line).expect("parses").command {
            Command::Run(args) => args,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn the_grammar_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn an_unknown_flag_before_the_image_is_named_as_one() {
        let err = parse(&["run", "--foo", "busybox", "true"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownArgument);
        assert!(err.to_string().contains("'--foo'"), "{err}");
    }

    #[test]
    fn flags_after_the_image_belong_to_the_command() {
        let args = run_args(&["run", "--rm", "busybox", "ls", "-la", "--color=never"]);
        assert!(args.rm);
        assert_eq!(args.args, ["busybox", "ls", "-la", "--color=never"]);
        let args = run_args(&["run", "--rootfs", "/r", "--", "echo", "-n", "hi"]);
        assert_eq!(args.args, ["echo", "-n", "hi"]);
    }

    #[test]
    fn exec_passes_flags_after_the_container_to_the_command() {
        match parse(&["exec", "-i", "c1", "sh", "-c", "id -u"])
            .unwrap()
            .command
        {
            Command::Exec(args) => {
                assert_eq!(args.container, "c1");
                assert_eq!(args.command, ["sh", "-c", "id -u"]);
            }
            other => panic!("not exec: {other:?}"),
        }
        let err = parse(&["exec", "--foo", "c1", "true"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownArgument);
    }

    #[test]
    fn help_and_version_are_not_errors() {
        for flag in ["--help", "--version"] {
            assert!(!parse(&[flag]).unwrap_err().use_stderr(), "{flag}");
        }
    }
}
