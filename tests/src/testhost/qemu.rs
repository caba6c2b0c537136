//! Starting and stopping the QEMU process that is the emulated host.
//!
//! QEMU's TCG emulator with `-cpu EPYC` emulates AMD SVM, so Debian's `kvm-amd`
//! works inside it and gives a hardware-style `/dev/kvm`, which this machine's PVM
//! hypervisor cannot.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::scripts::ROOT_TAG;
use crate::error::{Error, Result};
use crate::process;

/// The QEMU binary used.
pub const QEMU: &str = "qemu-system-x86_64";

/// What the QEMU command line is made of.
#[derive(Debug, Clone)]
pub struct QemuConfig<'a> {
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The kernel image.
    pub kernel: &'a Path,
    /// The initramfs (base archive plus the per-run job archive).
    pub initrd: &'a Path,
    /// This machine's TSC rate in kHz, if known (see [`tsc_khz`]).
    pub tsc_khz: Option<u64>,
}

/// The kernel command line.
///
/// `quiet` because console output slows emulated boots a lot; `panic=-1
/// reboot=t` so that a panic resets at once and `-no-reboot` ends QEMU;
/// `tsc_early_khz`/`tsc=reliable` because about one boot in eight hangs calibrating
/// the TSC under TCG otherwise.
pub fn kernel_cmdline(tsc_khz: Option<u64>) -> String {
    let mut line = String::from("console=ttyS0 quiet panic=-1 reboot=t rdinit=/init");
    if let Some(khz) = tsc_khz {
        line.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    line
}

/// Build the QEMU command for `config`: stdin null, stdout (the serial console)
/// and stderr piped.
pub fn command(config: &QemuConfig<'_>) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-M",
        "microvm",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "EPYC",
    ])
    .args(["-m", &config.memory_mib.to_string()])
    .args(["-smp", &config.vcpus.to_string()])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .args(["-serial", "stdio"])
    .arg("-kernel")
    .arg(config.kernel)
    .arg("-initrd")
    .arg(config.initrd)
    .args(["-append", &kernel_cmdline(config.tsc_khz)])
    // This machine's `/`, read-only; `multidevs=remap` keeps inode numbers
    // unique across the host's mount points.
    .args([
        "-fsdev",
        &format!("local,id={ROOT_TAG},path=/,security_model=none,readonly=on,multidevs=remap"),
        "-device",
        &format!("virtio-9p-device,fsdev={ROOT_TAG},mount_tag={ROOT_TAG}"),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

/// A running QEMU that is killed and reaped when dropped, on every path.
pub struct Qemu {
    child: Child,
}

impl Qemu {
    /// Start `cmd`. QEMU also gets `SIGKILL` if the thread that started it dies,
    /// so even a harness killed with `SIGKILL` leaves no emulator running; call
    /// this from the thread that waits for it.
    pub fn spawn(mut cmd: Command) -> Result<Qemu> {
        // SAFETY: the closure runs in the forked child before exec and only calls
        // prctl(2) and getppid(2), which are async-signal-safe and touch no memory
        // shared with the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("parent exited"));
                }
                Ok(())
            });
        }
        let command = process::describe(&cmd);
        let child = cmd
            .spawn()
            .map_err(|source| Error::Spawn { command, source })?;
        Ok(Qemu { child })
    }

    /// The child process, for taking its pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Wait for QEMU to exit until `deadline`, killing it then; returns its status
    /// if it exited by itself.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<std::process::ExitStatus> {
        process::wait_deadline(&mut self.child, deadline)
    }

    /// Kill and reap QEMU now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// This machine's TSC rate in kHz, from the first `cpu MHz` line of
/// `/proc/cpuinfo`; `None` if it cannot be read.
pub fn tsc_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_khz(&text)
}

/// Parse `cpu MHz : 2596.120` into kHz (2596120).
pub fn parse_cpu_khz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz = line.split(':').nth(1)?.trim();
    let (whole, frac) = mhz.split_once('.').unwrap_or((mhz, ""));
    let whole: u64 = whole.parse().ok()?;
    let frac3: String = frac.chars().chain("000".chars()).take(3).collect();
    let frac: u64 = frac3.parse().ok()?;
    Some(whole * 1000 + frac).filter(|&khz| khz > 0)
}

/// How long to let QEMU exit by itself after the guest reported the exit status.
pub const EXIT_GRACE: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_mhz() {
        let text = "processor\t: 0\ncpu MHz\t\t: 2596.120\ncpu MHz\t\t: 1.0\n";
        assert_eq!(parse_cpu_khz(text), Some(2_596_120));
        assert_eq!(parse_cpu_khz("cpu MHz : 3000\n"), Some(3_000_000));
        assert_eq!(parse_cpu_khz("cpu MHz : 2100.5\n"), Some(2_100_500));
        assert_eq!(parse_cpu_khz("model name : x\n"), None);
        assert_eq!(parse_cpu_khz("cpu MHz : 0.000\n"), None);
    }

    #[test]
    fn cmdline_has_tsc_fix() {
        let line = kernel_cmdline(Some(2_596_120));
        assert!(line.contains("tsc_early_khz=2596120 tsc=reliable"));
        assert!(line.contains("panic=-1 reboot=t"));
        assert!(!kernel_cmdline(None).contains("tsc"));
    }

    #[test]
    fn command_shares_root_read_only() {
        let config = QemuConfig {
            memory_mib: 4096,
            vcpus: 2,
            kernel: Path::new("k"),
            initrd: Path::new("i"),
            tsc_khz: None,
        };
        let text = process::describe(&command(&config));
        assert!(text.contains("-cpu EPYC"));
        assert!(text.contains("-m 4096 -smp 2"));
        assert!(text.contains("path=/,security_model=none,readonly=on"));
        assert!(text.contains("-no-reboot"));
    }
}
