//! runc's command line, as podman (conmon), Docker 20.10 and containerd's
//! runc shim (go-runc) and buildah call it. Flags the engines pass that mean
//! nothing for a microVM (SELinux labels, keyrings, pivot_root) are accepted
//! and ignored; flags asking for what we cannot do are errors at run time,
//! naming the flag.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// bulkhead-runtime: runc's command line, each container in its own microVM.
#[derive(Debug, Parser)]
#[command(name = "bulkhead-runtime", version = crate::runtime::VERSION_LINE, disable_version_flag = true)]
pub struct Cli {
    /// Where container state lives.
    #[arg(long, global = true, default_value = super::state::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Write the runtime's own log here (default: the container's runtime.log).
    #[arg(long, global = true)]
    pub log: Option<PathBuf>,
    /// The log's format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log at debug level.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted: the guest has no systemd, so cgroups paths are rewritten.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Rootless mode: not supported (the microVM needs /dev/kvm and taps).
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "true")]
    pub rootless: Option<String>,
    /// Accepted for runc compatibility; checkpointing is not supported.
    #[arg(long, global = true)]
    pub criu: Option<PathBuf>,
    /// Print the version.
    #[arg(short = 'v', long = "version")]
    pub version: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// logfmt-like text, as runc's.
    Text,
    /// One JSON object per line (`level`, `msg`, `time`), as runc's.
    Json,
}

/// What `create` and `run` take.
#[derive(Clone, Debug, Args)]
pub struct CreateArgs {
    /// The bundle directory (holding config.json).
    #[arg(short = 'b', long, default_value = ".")]
    pub bundle: PathBuf,
    /// Where to write the pid of the process that stands for the container.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// A unix socket to send the pty master to (`terminal: true`).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted: the rootfs is the guest's business.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted: keyrings are the guest kernel's.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra descriptors to pass: cannot cross into a VM (must be 0).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// The container id.
    pub id: String,
}

/// The runc commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a container: boot its microVM and create it there, stopped
    /// before its process starts.
    Create(CreateArgs),
    /// Start a created container's process.
    Start {
        /// The container id.
        id: String,
    },
    /// Create and start a container, and wait for it unless detached.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        /// Return once it runs.
        #[arg(short = 'd', long)]
        detach: bool,
        /// Accepted for runc compatibility.
        #[arg(long)]
        keep: bool,
    },
    /// Print a container's state (runtime-spec JSON).
    State {
        /// The container id.
        id: String,
    },
    /// Send a signal to a container's process (default SIGTERM).
    Kill {
        /// Signal every process of the container.
        #[arg(short = 'a', long)]
        all: bool,
        /// The container id.
        id: String,
        /// A signal name (`KILL`, `SIGKILL`) or number.
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a container's state and everything it left.
    Delete {
        /// Kill it first if it still runs.
        #[arg(short = 'f', long)]
        force: bool,
        /// The container id.
        id: String,
    },
    /// Run a new process in a running container.
    Exec(Box<ExecArgs>),
    /// List the processes of a container.
    Ps {
        /// `table` or `json`.
        #[arg(short = 'f', long, default_value = "table")]
        format: String,
        /// The container id.
        id: String,
        /// Options for ps(1), table format only.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// List containers.
    List {
        /// `table` or `json`.
        #[arg(short = 'f', long, default_value = "table")]
        format: String,
        /// Only ids.
        #[arg(short = 'q', long)]
        quiet: bool,
    },
    /// Print a container's resource usage (`--stats` once, else every interval).
    Events {
        /// Print statistics once and exit.
        #[arg(long)]
        stats: bool,
        /// Seconds between statistics.
        #[arg(long, default_value = "5s")]
        interval: String,
        /// The container id.
        id: String,
    },
    /// Change a running container's resource limits.
    Update {
        /// A file (or `-` for stdin) holding `linux.resources` as JSON.
        #[arg(short = 'r', long)]
        resources: Option<PathBuf>,
        /// Memory limit in bytes.
        #[arg(long)]
        memory: Option<String>,
        /// CPU quota (microseconds per period).
        #[arg(long)]
        cpu_quota: Option<i64>,
        /// CPU period (microseconds).
        #[arg(long)]
        cpu_period: Option<u64>,
        /// Maximum number of pids.
        #[arg(long)]
        pids_limit: Option<i64>,
        /// The container id.
        id: String,
    },
    /// Freeze a container's processes.
    Pause {
        /// The container id.
        id: String,
    },
    /// Thaw a paused container's processes.
    Resume {
        /// The container id.
        id: String,
    },
    /// What this runtime supports (runtime-spec features JSON).
    Features,
    /// Write a starter config.json in the bundle.
    Spec {
        /// The bundle directory.
        #[arg(short = 'b', long, default_value = ".")]
        bundle: PathBuf,
    },
    /// Not supported: checkpoint needs VM snapshots of a running container.
    Checkpoint {
        /// Everything else runc takes.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Not supported: restore needs VM snapshots of a running container.
    Restore {
        /// Everything else runc takes.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// (internal) The process that holds a container's microVM.
    #[command(name = "__keeper", hide = true)]
    Keeper {
        /// The report socket's descriptor.
        #[arg(long)]
        ready_fd: i32,
        /// The console socket, for a terminal.
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// The container id.
        id: String,
    },
}

/// What `exec` takes.
#[derive(Clone, Debug, Args)]
pub struct ExecArgs {
    /// A JSON file holding the OCI process to run.
    #[arg(short = 'p', long)]
    pub process: Option<PathBuf>,
    /// Give the process a terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// A unix socket to send the pty master to.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Return once the process runs.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Where to write the pid of the process that stands for it.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Environment variables to add.
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// The working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// `UID[:GID]`.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Extra groups.
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// Capabilities to add.
    #[arg(short = 'c', long = "cap")]
    pub caps: Vec<String>,
    /// Set no_new_privs.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Accepted: labels are the host's security modules', not the guest's.
    #[arg(long)]
    pub process_label: Option<String>,
    /// Accepted: labels are the host's security modules', not the guest's.
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub ignore_paused: bool,
    /// Extra descriptors to pass: cannot cross into a VM (must be 0).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// (internal) The report socket of a detached exec's process.
    #[arg(long, hide = true)]
    pub ready_fd: Option<i32>,
    /// (internal) The exec id chosen by the parent.
    #[arg(long, hide = true)]
    pub exec_id: Option<String>,
    /// The container id.
    pub id: String,
    /// The command and its arguments (without `--process`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("bulkhead-runtime").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn conmons_create_parses() {
        let cli = parse(&[
            "--systemd-cgroup",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/pidfile",
            "--console-socket",
            "/tmp/c.sock",
            "abc",
        ]);
        let Some(Command::Create(c)) = cli.command else {
            panic!()
        };
        assert_eq!(c.id, "abc");
        assert_eq!(c.bundle, PathBuf::from("/b"));
        assert_eq!(c.console_socket, Some(PathBuf::from("/tmp/c.sock")));
    }

    #[test]
    fn go_runcs_global_flags_and_kill_parse() {
        let cli = parse(&[
            "--root",
            "/run/x",
            "--log",
            "/b/log.json",
            "--log-format",
            "json",
            "kill",
            "--all",
            "abc",
            "9",
        ]);
        assert_eq!(cli.root, PathBuf::from("/run/x"));
        assert_eq!(cli.log_format, LogFormat::Json);
        let Some(Command::Kill { all, id, signal }) = cli.command else {
            panic!()
        };
        assert!(all);
        assert_eq!((id.as_str(), signal.as_str()), ("abc", "9"));
    }

    #[test]
    fn conmons_exec_parses_and_runcs_exec_takes_a_command() {
        let cli = parse(&[
            "exec",
            "--pid-file",
            "/p",
            "--process",
            "/proc.json",
            "--detach",
            "--tty",
            "--console-socket",
            "/c",
            "abc",
        ]);
        let Some(Command::Exec(e)) = cli.command else {
            panic!()
        };
        assert!(e.detach && e.tty);
        assert_eq!(e.process, Some(PathBuf::from("/proc.json")));
        let cli = parse(&["exec", "-e", "A=1", "--cwd", "/tmp", "abc", "ls", "-l"]);
        let Some(Command::Exec(e)) = cli.command else {
            panic!()
        };
        assert_eq!(e.command, ["ls", "-l"]);
        assert_eq!(e.env, ["A=1"]);
    }
}
