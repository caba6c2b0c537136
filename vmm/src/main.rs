//! `bulkhead-vmm`: boot one microVM and exit when it stops.

use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead_vmm::config::{
    default_cmdline, ConsoleSpec, FsConfig, NetConfig, VmConfig, VsockConfig, DEFAULT_MEMORY_MIB,
};
use clap::Parser;

const AFTER_HELP: &str = "\
Exit status: 0 when the guest stops itself (reboot), 1 for bad input or a VM that \
could not be built, 2 for bad usage, 3 when the ready marker did not come in time, \
4 when the guest crashed (kernel panic, triple fault), 5 when KVM or a vCPU thread failed.

Logs go to stderr; set BULKHEAD_LOG (e.g. info, debug) for more.";

/// Boot one KVM microVM: kernel, initrd, console; exits when the guest stops.
#[derive(Debug, Parser)]
#[command(name = "bulkhead-vmm", version, after_help = AFTER_HELP)]
struct Cli {
    /// Read the whole configuration from this JSON file (same fields as the flags:
    /// kernel, initrd, cmdline, memory, vcpus, console, boot_timeout, ready_marker,
    /// assume_pvm_guest, fs: [{tag, socket}], vsock: {cid, uds_path, listener_fd},
    /// net: {mac, tap_fd}, save_snapshot, restore_snapshot).
    #[arg(long, exclusive = true, value_name = "FILE.json")]
    config: Option<PathBuf>,

    /// Guest kernel: an uncompressed ELF vmlinux (fastest) or a bzImage.
    #[arg(long, required_unless_present = "config")]
    kernel: Option<PathBuf>,

    /// Initrd (a cpio archive) to hand the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,

    /// Kernel command line, replacing the default.
    #[arg(long, default_value_t = default_cmdline())]
    cmdline: String,

    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    memory: u32,

    /// Number of vCPUs (1-254).
    #[arg(long, default_value_t = 1)]
    vcpus: u16,

    /// Where the guest console goes: stdout, off, or a file path.
    #[arg(long, default_value = "off")]
    console: ConsoleSpec,

    /// Seconds the guest has to print --ready-marker before it is stopped.
    #[arg(long, value_name = "SECS", requires = "ready_marker")]
    boot_timeout: Option<u64>,

    /// A string the guest prints on its console when it is up.
    #[arg(long, value_name = "STR")]
    ready_marker: Option<String>,

    /// Trust that the kernel is a PVM guest kernel (skips the PVM-host check).
    #[arg(long)]
    assume_pvm_guest: bool,

    /// A virtio-fs share served by virtiofsd: TAG=SOCKET (repeatable).
    #[arg(long, value_name = "TAG=SOCKET")]
    fs: Vec<FsConfig>,

    /// The guest's vsock CID (3 or more); needs --vsock-uds.
    #[arg(long, value_name = "CID", requires = "vsock_uds")]
    vsock_cid: Option<u32>,

    /// The host Unix socket of the hybrid vsock device; needs --vsock-cid.
    #[arg(long, value_name = "PATH", requires = "vsock_cid")]
    vsock_uds: Option<PathBuf>,

    /// Give the guest a virtio-net NIC with this MAC address (unicast, e.g.
    /// 02:00:00:00:00:01); without --net-tap-fd it is not connected.
    #[arg(long, value_name = "MAC")]
    net_mac: Option<String>,

    /// Connect the NIC to this tap descriptor, inherited from the parent and
    /// opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR; needs --net-mac.
    #[arg(long, value_name = "FD", requires = "net_mac")]
    net_tap_fd: Option<i32>,

    /// Template boot: save the VM into DIR when the guest says it is ready
    /// (the kernel gets bulkhead.template=1), then exit 0.
    #[arg(long, value_name = "DIR", conflicts_with = "restore_snapshot")]
    save_snapshot: Option<PathBuf>,

    /// Resume the VM saved in DIR instead of booting the kernel.
    #[arg(long, value_name = "DIR")]
    restore_snapshot: Option<PathBuf>,
}

impl Cli {
    fn into_config(self) -> Result<VmConfig, bulkhead_vmm::config::ConfigError> {
        if let Some(path) = self.config {
            return VmConfig::from_file(&path);
        }
        let config = VmConfig {
            // clap guarantees --kernel when --config is absent.
            kernel: self.kernel.unwrap_or_default(),
            initrd: self.initrd,
            cmdline: Some(self.cmdline),
            memory: self.memory,
            vcpus: self.vcpus,
            console: self.console,
            debug_console: false,
            boot_timeout: self.boot_timeout,
            ready_marker: self.ready_marker,
            assume_pvm_guest: self.assume_pvm_guest,
            fs: self.fs,
            save_snapshot: self.save_snapshot,
            restore_snapshot: self.restore_snapshot,
            vsock: self
                .vsock_cid
                .zip(self.vsock_uds)
                .map(|(cid, uds_path)| VsockConfig {
                    cid,
                    uds_path,
                    listener_fd: None,
                }),
            net: self.net_mac.map(|mac| NetConfig {
                mac,
                tap_fd: self.net_tap_fd,
            }),
        };
        config.validate()?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // stderr is usually a sandbox's vmm.log: escapes only on a terminal,
        // and never when NO_COLOR asks for none.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();

    let config = match Cli::parse().into_config() {
        Ok(c) => c,
        Err(e) => return fail(&e, bulkhead_vmm::EXIT_SETUP_FAILED),
    };
    match bulkhead_vmm::run(&config) {
        Ok(outcome) if outcome.reason.is_clean() => ExitCode::SUCCESS,
        Ok(outcome) => {
            eprintln!(
                "bulkhead-vmm: {}. Last console lines:\n{}",
                outcome.reason, outcome.console_tail
            );
            ExitCode::from(outcome.reason.exit_code() as u8)
        }
        Err(e) => {
            let code = e.exit_code();
            fail(&e, code)
        }
    }
}

/// Prints the error with its chain of causes.
fn fail(error: &dyn std::error::Error, code: i32) -> ExitCode {
    let mut message = format!("bulkhead-vmm: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{message}");
    ExitCode::from(code as u8)
}
