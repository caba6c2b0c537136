//! The emulated hardware-KVM host in which end-to-end tests run.
//!
//! This machine's `/dev/kvm` is PVM, which cannot boot a stock guest kernel. So the
//! end-to-end tests run inside QEMU TCG with `-cpu EPYC` (emulated AMD SVM), booting
//! Debian's generic kernel with `kvm-amd` loaded, with this machine's `/` shared
//! read-only over 9p under a tmpfs overlay: every binary built here is there, and
//! `/dev/kvm` inside is hardware-style KVM.
//!
//! [`ensure_assets`] fetches and caches the kernel and builds the initramfs;
//! [`TestHost::run`] boots the host, runs one command in it and returns its exit
//! status. Starting the host costs about 10 s, so run a whole test binary per boot.

pub mod console;
pub mod kernel;
pub mod qemu;
pub mod scripts;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crate::cache;
use crate::error::{Error, IoContext, Result};
use crate::initramfs::{busybox_archive, Busybox, CpioWriter};
use console::{Console, Event};
use scripts::{Job, JOB_DIR};

/// Bumped whenever the initramfs layout changes in a way its content hash misses.
const INITRAMFS_LAYOUT: &str = "initramfs-v1";

/// The cached files needed to boot the emulated host.
///
/// Returned by [`ensure_assets`] so xtask can prefetch them during setup and tests
/// can boot without repeating the work.
#[derive(Debug, Clone)]
pub struct Assets {
    /// Debian's generic kernel image.
    pub kernel: PathBuf,
    /// The base initramfs: busybox, the modules and the stage 1 `/init`.
    pub initramfs: PathBuf,
    /// The kernel package, e.g. `linux-image-6.1.0-56-amd64`.
    pub kernel_package: String,
    /// The kernel package's version.
    pub kernel_version: String,
}

/// Fetch the kernel and build the initramfs if they are not cached yet, and return
/// their paths.
///
/// The first call on a machine downloads the kernel package with apt (running
/// `apt-get update` if apt's lists are empty); later calls only read the cache.
pub fn ensure_assets() -> Result<Assets> {
    let kernel = kernel::ensure()?;
    let busybox = Busybox::system()?;
    let names: Vec<String> = kernel
        .modules
        .iter()
        .map(|m| {
            m.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    let archive_path = PathBuf::from("initramfs.cpio");
    let mut archive = busybox_archive(&busybox, &scripts::stage1(&names))
        .at("building initramfs", &archive_path)?;
    archive.dir("lib", 0o755).at("building", &archive_path)?;
    archive
        .dir("lib/modules", 0o755)
        .at("building", &archive_path)?;
    for (module, name) in kernel.modules.iter().zip(&names) {
        archive.file_from_host(&format!("lib/modules/{name}"), 0o644, module)?;
    }
    let bytes = archive.finish().at("building", &archive_path)?;
    // The archive is reproducible, so hashing it keys the entry by all its inputs.
    let key = cache::hash_key([INITRAMFS_LAYOUT.as_bytes(), &bytes]);
    let dir = cache::cache_root()
        .join("testhost")
        .join("initramfs")
        .join(&key[..16]);
    let dir = cache::get_or_build(&dir, |tmp| {
        let path = tmp.join(&archive_path);
        std::fs::write(&path, &bytes).at("writing", &path)
    })?;
    Ok(Assets {
        kernel: kernel.vmlinuz,
        initramfs: dir.join(archive_path),
        kernel_package: kernel.package,
        kernel_version: kernel.version,
    })
}

/// The result of a command run in the emulated host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The command's exit status (128 + signal number if a signal killed it).
    pub exit_code: i32,
    /// The last console lines, for reports.
    pub console_tail: String,
}

/// Settings for [`TestHost`]; see [`TestHost::builder`].
#[derive(Debug, Clone)]
pub struct TestHostBuilder {
    memory_mib: u32,
    vcpus: u32,
    timeout: Duration,
    stall_timeout: Duration,
    echo_console: bool,
    assets: Option<Assets>,
}

impl Default for TestHostBuilder {
    fn default() -> Self {
        TestHostBuilder {
            memory_mib: 4096,
            vcpus: 2,
            // Long emulated sessions have been seen to stall for good after about
            // 15 minutes.
            timeout: Duration::from_secs(15 * 60),
            stall_timeout: Duration::from_secs(5 * 60),
            echo_console: true,
            assets: None,
        }
    }
}

impl TestHostBuilder {
    /// Guest memory in MiB (default 4096).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs (default 2).
    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }

    /// Deadline for a whole run, boot included (default 15 minutes).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Fail a run when the console is silent this long (default 5 minutes).
    pub fn stall_timeout(mut self, stall: Duration) -> Self {
        self.stall_timeout = stall;
        self
    }

    /// Whether to copy every console line to this process's stdout as it arrives
    /// (default true). Written to the stdout handle directly, so it shows even
    /// inside a `cargo test` that captures output.
    pub fn echo_console(mut self, echo: bool) -> Self {
        self.echo_console = echo;
        self
    }

    /// Use these assets instead of calling [`ensure_assets`].
    pub fn assets(mut self, assets: Assets) -> Self {
        self.assets = Some(assets);
        self
    }

    /// Make the [`TestHost`], preparing the assets if none were given.
    pub fn build(self) -> Result<TestHost> {
        let assets = match self.assets.clone() {
            Some(assets) => assets,
            None => ensure_assets()?,
        };
        Ok(TestHost {
            settings: self,
            assets,
        })
    }
}

/// A configured emulated host; each [`TestHost::run`] boots a fresh one.
#[derive(Debug, Clone)]
pub struct TestHost {
    settings: TestHostBuilder,
    assets: Assets,
}

impl TestHost {
    /// Settings with the defaults (4096 MiB, 2 vCPUs, 15 min timeout, 5 min stall).
    pub fn builder() -> TestHostBuilder {
        TestHostBuilder::default()
    }

    /// A host with the default settings.
    pub fn new() -> Result<TestHost> {
        TestHost::builder().build()
    }

    /// The assets this host boots.
    pub fn assets(&self) -> &Assets {
        &self.assets
    }

    /// Boot the emulated host, run `argv` in `cwd` with `env` added to a clean
    /// environment (this process's `PATH`, `CARGO_HOME` and `RUSTUP_HOME`,
    /// `HOME=/root`, `TMPDIR=/tmp`, `BULKHEAD_IN_TESTHOST=1`), and return its exit
    /// status.
    ///
    /// Inside, `/` is this machine's `/` (read-only, with writes going to a tmpfs
    /// overlay that vanishes with the run), `/tmp` included so that a checkout
    /// under it works; `/run` is a fresh tmpfs. The guest
    /// caches the shared `/`, so changes made on this machine during a run may not
    /// show inside it. `argv[0]`
    /// is looked up in the command's `PATH` and run by its full path. Stdin is
    /// `/dev/null`; stdout and stderr go to the console, which is echoed live.
    /// Fails, with the console tail, if the host cannot be set up (no usable
    /// `/dev/kvm`, missing cwd, ...), stalls, outlives the timeout, or QEMU exits
    /// early. QEMU is killed and reaped on every path.
    pub fn run(&self, argv: &[String], env: &[(String, String)], cwd: &Path) -> Result<Outcome> {
        let nonce = new_nonce();
        let job = Job {
            argv,
            env,
            cwd,
            nonce: &nonce,
        };
        let stage2 = scripts::stage2(&job)?;

        let work = tempfile::Builder::new()
            .prefix("bulkhead-testhost-")
            .tempdir()
            .at("creating temporary directory", std::env::temp_dir())?;
        let initrd = work.path().join("initrd.cpio");
        write_initrd(&self.assets.initramfs, &initrd, &nonce, &stage2)?;

        let cmd = qemu::command(&qemu::QemuConfig {
            memory_mib: self.settings.memory_mib,
            vcpus: self.settings.vcpus,
            kernel: &self.assets.kernel,
            initrd: &initrd,
            tsc_khz: qemu::tsc_khz(),
        });
        let mut vm = qemu::Qemu::spawn(cmd)?;
        self.supervise(&mut vm, &nonce)
        // `vm` (killed and reaped if still running) and `work` are dropped here.
    }

    /// Like [`TestHost::run`], but when the emulated host stalls (no console
    /// output for the stall timeout, or a CPU reported stuck in a soft lockup
    /// for `console::LOCKUP_GIVE_UP_SECS`: TCG with nested KVM occasionally
    /// locks up its whole guest) or its own kernel panics (seen under load: a stack
    /// guard page hit in KVM's vCPU thread, from QEMU's TCG emulation of
    /// nested SVM), the command is run again in a fresh host, up to
    /// `attempts` times in all. The command must be safe to repeat.
    pub fn run_retrying_stalls(
        &self,
        argv: &[String],
        env: &[(String, String)],
        cwd: &Path,
        attempts: u32,
    ) -> Result<Outcome> {
        let mut attempt = 1;
        loop {
            match self.run(argv, env, cwd) {
                Err(Error::Stalled { .. }) if attempt < attempts => {
                    println!(
                        "bulkhead-tests: the emulated host stalled (attempt {attempt} of \
                         {attempts}); starting a fresh one and running the command again"
                    );
                    attempt += 1;
                }
                Err(Error::QemuExited { console_tail, .. })
                    if attempt < attempts && console_tail.contains("Kernel panic") =>
                {
                    println!(
                        "bulkhead-tests: the emulated host's own kernel panicked (attempt \
                         {attempt} of {attempts}); starting a fresh one and running the \
                         command again. Its last console lines:\n{console_tail}"
                    );
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Follow the console until the exit marker, a failure or a deadline.
    fn supervise(&self, vm: &mut qemu::Qemu, nonce: &str) -> Result<Outcome> {
        let start = Instant::now();
        let deadline = start + self.settings.timeout;
        let stdout = vm.child_mut().stdout.take();
        let stderr = vm.child_mut().stderr.take();
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        thread::spawn(move || {
            let Some(mut pipe) = stdout else { return };
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let stderr = thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = stderr {
                let _ = pipe.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        });

        let mut console = Console::default();
        let mut last_output = Instant::now();
        loop {
            let stall_at = last_output + self.settings.stall_timeout;
            let wake = stall_at.min(deadline);
            let chunk = match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(chunk) => chunk,
                Err(RecvTimeoutError::Timeout) => {
                    vm.kill();
                    let console_tail = console.tail();
                    return Err(if Instant::now() >= deadline {
                        Error::TimedOut {
                            timeout: self.settings.timeout,
                            console_tail,
                        }
                    } else {
                        Error::Stalled {
                            silent_for: last_output.elapsed(),
                            console_tail,
                        }
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Console closed: QEMU is exiting without having reported.
                    let status = vm.wait_until(Instant::now() + qemu::EXIT_GRACE);
                    let qemu_stderr =
                        crate::process::tail_lines(&stderr.join().unwrap_or_default(), 20);
                    return Err(match status {
                        Some(status) => Error::QemuExited {
                            status,
                            qemu_stderr,
                            console_tail: console.tail(),
                        },
                        None => Error::TimedOut {
                            timeout: qemu::EXIT_GRACE,
                            console_tail: console.tail(),
                        },
                    });
                }
            };
            last_output = Instant::now();
            for line in console.feed(&chunk) {
                if let Some(secs) =
                    console::soft_lockup_secs(&line).filter(|s| *s >= console::LOCKUP_GIVE_UP_SECS)
                {
                    vm.kill();
                    return Err(Error::Stalled {
                        silent_for: Duration::from_secs(secs),
                        console_tail: console.tail(),
                    });
                }
                if self.settings.echo_console {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
                match console::parse_marker(&line, nonce) {
                    None => {}
                    Some(Event::Ready) if !self.settings.echo_console => {}
                    Some(Event::Ready) => {
                        // Straight to the handle: shows even when a test captures output.
                        let _ = writeln!(
                            std::io::stderr(),
                            "bulkhead-tests: emulated host ready after {:.1} s",
                            start.elapsed().as_secs_f64()
                        );
                    }
                    Some(Event::Exit(exit_code)) => {
                        // The guest reboots now; -no-reboot turns that into an exit.
                        let grace = (Instant::now() + qemu::EXIT_GRACE).min(deadline);
                        if vm.wait_until(grace).is_none() {
                            eprintln!(
                                "bulkhead-tests: QEMU did not exit after the command; killed it"
                            );
                        }
                        return Ok(Outcome {
                            exit_code,
                            console_tail: console.tail(),
                        });
                    }
                    Some(Event::Error(message)) => {
                        let _ = vm.wait_until(Instant::now() + Duration::from_secs(5));
                        return Err(Error::Guest {
                            message,
                            console_tail: console.tail(),
                        });
                    }
                }
            }
        }
    }
}

/// Write the per-run initrd: the cached base archive followed by a second archive
/// holding `/<JOB_DIR>/nonce` and `/<JOB_DIR>/stage2.sh` (the kernel unpacks
/// concatenated archives in turn).
fn write_initrd(base: &Path, out: &Path, nonce: &str, stage2: &str) -> Result<()> {
    let mut bytes = std::fs::read(base).at("reading", base)?;
    let job = (|| {
        let mut w = CpioWriter::new(Vec::new());
        w.dir(JOB_DIR, 0o755)?;
        w.file(&format!("{JOB_DIR}/nonce"), 0o644, nonce.as_bytes())?;
        w.file(&format!("{JOB_DIR}/stage2.sh"), 0o755, stage2.as_bytes())?;
        w.finish()
    })()
    .at("building job archive for", out)?;
    bytes.extend_from_slice(&job);
    std::fs::write(out, bytes).at("writing", out)
}

/// A fresh marker nonce: hard to guess, different for every run.
fn new_nonce() -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let stack_addr = &now as *const _ as usize;
    let key = cache::hash_key([
        now.as_nanos().to_le_bytes().as_slice(),
        &std::process::id().to_le_bytes(),
        &stack_addr.to_le_bytes(),
    ]);
    key[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Boots the real emulated host: needs QEMU, busybox-static, kmod and apt.
    /// Run with `cargo test -p bulkhead-tests -- --ignored`.
    #[test]
    #[ignore = "boots the emulated host (about 10 s; fetches a kernel on first use)"]
    fn runs_a_command_with_kvm() {
        let host = TestHost::builder()
            .memory_mib(1024)
            .timeout(Duration::from_secs(300))
            .build()
            .expect("assets");
        let argv: Vec<String> = [
            "sh",
            "-c",
            "test -c /dev/kvm && test \"$X\" = 'a b' && exit 3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let env = [("X".to_string(), "a b".to_string())];
        let outcome = host.run(&argv, &env, Path::new("/")).expect("run");
        assert_eq!(outcome.exit_code, 3, "{}", outcome.console_tail);
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(new_nonce(), new_nonce());
        assert_eq!(new_nonce().len(), 16);
    }

    #[test]
    fn initrd_appends_job_archive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.cpio");
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).expect("dir");
        std::fs::write(&base, w.finish().expect("finish")).expect("write");
        let out = dir.path().join("initrd.cpio");
        write_initrd(&base, &out, "nonce1", "echo hi\n").expect("initrd");
        let bytes = std::fs::read(&out).expect("read");
        let base_len = std::fs::metadata(&base).expect("stat").len() as usize;
        assert_eq!(&bytes[base_len..base_len + 6], b"070701");
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains(&format!("{JOB_DIR}/stage2.sh")));
        assert_eq!(text.matches("TRAILER!!!").count(), 2);
    }
}
