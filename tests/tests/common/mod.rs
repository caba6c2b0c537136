//! What every end-to-end test binary shares: where to run (straight on /dev/kvm or
//! inside the emulated KVM host), where the artifacts are, and how to run the VMM
//! with a deadline.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus};
use std::time::Duration;

use bulkhead_tests::kvm::{self, KvmKind};
use bulkhead_tests::process;
use bulkhead_tests::testhost::TestHost;
use libtest_mimic::{Arguments, Trial};

/// Longest silence from the emulated host before it counts as stalled: above the
/// longest quiet stretch of any test (a VMM boot timeout of 60 s).
const STALL_TIMEOUT: Duration = Duration::from_secs(150);

/// Environment variables with this prefix are passed into the emulated host:
/// how a test binary hands what it prepared on this machine (where the
/// network is) to its run inside.
pub const E2E_VAR_PREFIX: &str = "BULKHEAD_E2E_";

/// An OCI seccomp profile that allows everything but chmod (EPERM), for the
/// tests that check a profile reaches a container's processes.
pub const NO_CHMOD_PROFILE: &str = r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
    {"names": ["chmod", "fchmod", "fchmodat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}
]}"#;

/// Environment variables that carry artifact paths into the emulated host.
const ARTIFACT_VARS: [&str; 2] = ["BULKHEAD_VMM", "BULKHEAD_KERNEL"];

/// Runs `trials` here when this machine (or the emulated host we are in) has
/// hardware-style KVM; otherwise boots the emulated KVM host once and runs this
/// same test binary inside it. Says which, loudly.
pub fn main(name: &str, trials: impl FnOnce() -> Vec<Trial>) -> ExitCode {
    main_with_host_vcpus(name, None, trials)
}

/// [`main`], with the emulated host (if one is booted) given `vcpus` rather
/// than the harness's default.
pub fn main_with_host_vcpus(
    name: &str,
    vcpus: Option<u32>,
    trials: impl FnOnce() -> Vec<Trial>,
) -> ExitCode {
    let mut args = Arguments::from_args();
    // One microVM at a time: they share the (emulated) host's two CPUs, and the
    // "nothing left running" checks look at the whole machine.
    args.test_threads.get_or_insert(1);
    if args.list {
        return libtest_mimic::run(&args, trials()).exit_code();
    }
    if kvm::inside_emulated_host() {
        println!(
            "e2e {name}: running inside the emulated KVM host (QEMU TCG, AMD SVM, nested KVM)"
        );
        return with_own_state_root(|| libtest_mimic::run(&args, trials()).exit_code());
    }
    match kvm::detect() {
        KvmKind::Hardware => {
            println!("e2e {name}: running directly on this machine's /dev/kvm (hardware KVM)");
            with_own_state_root(|| libtest_mimic::run(&args, trials()).exit_code())
        }
        other => {
            println!("e2e {name}: this machine has {other}; booting the emulated KVM host to run the tests inside it");
            relaunch_in_emulated_host(vcpus)
        }
    }
}

/// A trial that, inside the emulated host only, gets a second attempt when the
/// first fails, saying so loudly. QEMU's multi-threaded TCG emulation of nested
/// SVM now and then wedges a guest's vCPU under load (its RPCs then time out
/// with no VM exit), which is the emulator's fault, not the code under test's;
/// a real bug fails both attempts, and both failures are reported.
pub fn trial<F>(name: &'static str, f: F) -> Trial
where
    F: Fn() -> Result<(), libtest_mimic::Failed> + Send + 'static,
{
    Trial::test(name, move || match f() {
        Ok(()) => Ok(()),
        Err(first) if kvm::inside_emulated_host() => {
            let first = first.message().unwrap_or("(no message)").to_owned();
            eprintln!(
                "e2e: RETRYING {name} once: it failed in the emulated host (nested SVM under \
                 multi-threaded TCG can wedge a guest); the failure was:\n{first}"
            );
            f().map_err(|second| {
                format!(
                    "failed twice.\nfirst attempt: {first}\nsecond attempt: {}",
                    second.message().unwrap_or("(no message)")
                )
                .into()
            })
        }
        Err(e) => Err(e),
    })
}

/// Runs `f` with `$BULKHEAD_ROOT` (the CLI's images and containers) set to a
/// fresh directory under /run, removed afterwards: the tests never touch the
/// host's /var/lib/bulkhead, and /run is a tmpfs, which (unlike the emulated
/// host's overlay root) can hold a container's writable overlay layer.
fn with_own_state_root(f: impl FnOnce() -> ExitCode) -> ExitCode {
    let dir = match tempfile::Builder::new()
        .prefix("bulkhead-e2e-")
        .tempdir_in("/run")
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("e2e: cannot make a state root under /run: {e}");
            return ExitCode::FAILURE;
        }
    };
    std::env::set_var("BULKHEAD_ROOT", dir.path());
    let code = f();
    // Image rootfs directories hold read-only files and dirs: make them
    // removable first.
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(dir.path())
        .status();
    drop(dir);
    code
}

fn relaunch_in_emulated_host(vcpus: Option<u32>) -> ExitCode {
    let result = (|| -> anyhow::Result<i32> {
        let exe = std::env::current_exe()?;
        let mut argv = vec![exe.to_string_lossy().into_owned()];
        argv.extend(std::env::args().skip(1));
        // Artifacts resolved out here, so the inside run does not guess again.
        let mut env = vec![
            (
                "BULKHEAD_VMM".to_owned(),
                vmm_binary().to_string_lossy().into_owned(),
            ),
            (
                "BULKHEAD_KERNEL".to_owned(),
                guest_kernel()?.to_string_lossy().into_owned(),
            ),
        ];
        for var in ["RUST_BACKTRACE", "BULKHEAD_LOG", "RUST_TEST_THREADS"] {
            if let Ok(v) = std::env::var(var) {
                env.push((var.to_owned(), v));
            }
        }
        // What a test binary prepared out here for its inside run.
        env.extend(std::env::vars().filter(|(k, _)| k.starts_with(E2E_VAR_PREFIX)));
        let mut builder = TestHost::builder().stall_timeout(STALL_TIMEOUT);
        if let Some(n) = vcpus {
            builder = builder.vcpus(n);
        }
        let host = builder.build()?;
        let outcome = host.run_retrying_stalls(&argv, &env, &std::env::current_dir()?, 2)?;
        Ok(outcome.exit_code)
    })();
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => {
            eprintln!("e2e: the tests inside the emulated host exited with status {code}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("e2e: cannot run the tests in the emulated KVM host: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `bulkhead` CLI: $BULKHEAD_CLI, else the one cargo built next to this
/// test (target/<profile>/bulkhead).
pub fn bulkhead_cli() -> PathBuf {
    std::env::var_os("BULKHEAD_CLI")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent()
                .and_then(Path::parent)
                .map(|d| d.join("bulkhead"))
                .expect("target dir")
        })
}

/// The `bulkhead-vmm` binary: $BULKHEAD_VMM, else the one cargo built next to
/// this test (target/<profile>/bulkhead-vmm).
pub fn vmm_binary() -> PathBuf {
    if let Some(p) = std::env::var_os(ARTIFACT_VARS[0]) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/bulkhead-vmm
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("bulkhead-vmm"))
        .expect("target dir")
}

/// The guest kernel: $BULKHEAD_KERNEL (set by `cargo xtask test`).
pub fn guest_kernel() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os(ARTIFACT_VARS[1])
        .map(PathBuf::from)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "BULKHEAD_KERNEL is not set: run the end-to-end tests with `cargo xtask test`, \
             which builds the guest kernel and sets it"
            )
        })?;
    anyhow::ensure!(
        path.is_file(),
        "BULKHEAD_KERNEL={} is not a file",
        path.display()
    );
    Ok(path)
}

/// The virtiofsd binary: $BULKHEAD_VIRTIOFSD, else on PATH, else where
/// `cargo install` puts it (`cargo xtask setup` installs it there).
pub fn virtiofsd() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("BULKHEAD_VIRTIOFSD") {
        return Ok(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("virtiofsd"));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin").join("virtiofsd"));
    on_path
        .chain(cargo_home)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!("virtiofsd not found: run `cargo xtask setup`, which installs it")
        })
}

/// What a finished VMM run gave.
#[derive(Debug)]
pub struct VmmRun {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its stdout (the console, with --console stdout).
    pub stdout: String,
    /// Its stderr (errors).
    pub stderr: String,
}

impl VmmRun {
    /// The exit code, or a failure naming the signal.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("bulkhead-vmm died by signal: {self:#?}"))
    }

    /// Fails, with stderr, unless the VMM exited with `code` (`what` names it).
    pub fn expect_code(&self, code: i32, what: &str) -> Result<(), libtest_mimic::Failed> {
        if self.code() != code {
            return Err(format!(
                "expected exit {code} ({what}), got {}: {}",
                self.code(),
                self.stderr
            )
            .into());
        }
        Ok(())
    }
}

/// Runs bulkhead-vmm with `args`, killing it after `timeout`.
pub fn run_vmm(args: &[&str], timeout: Duration) -> VmmRun {
    let mut cmd = Command::new(vmm_binary());
    cmd.args(args);
    let (status, out) = process::run_status(&mut cmd, timeout)
        .unwrap_or_else(|e| panic!("bulkhead-vmm {args:?} did not finish: {e}"));
    VmmRun {
        status,
        stdout: out.stdout,
        stderr: out.stderr,
    }
}

/// Processes whose command name is `name`, by scanning /proc.
pub fn processes_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| {
            // comm is cut at 15 bytes ("containerd-shim"); the executable's
            // name is not.
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            match exe.as_deref().and_then(Path::file_name) {
                Some(file) => file.to_string_lossy().trim_end_matches(" (deleted)") == name,
                None => std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim_end() == name),
            }
        })
        .collect()
}

/// Names in `dir`, sorted, for before/after comparisons.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// What is under /run/bulkhead besides the VM templates (a cache meant to
/// stay): sandbox directories, and a template's staging directory or its
/// maker's sandbox, none of which may outlive the sandbox that made them.
pub fn run_dir_leftovers() -> Vec<String> {
    use bulkhead::sandbox::templates::TEMPLATES_DIR;
    let run = Path::new("/run/bulkhead");
    let mut left: Vec<String> = listing(run)
        .into_iter()
        .filter(|n| n != TEMPLATES_DIR && n != "netns")
        .collect();
    // The containers' pinned network namespaces (the directory stays).
    left.extend(
        listing(&run.join("netns"))
            .into_iter()
            .map(|n| format!("netns/{n}")),
    );
    left.extend(
        listing(&run.join(TEMPLATES_DIR))
            .into_iter()
            .filter(|n| n.ends_with(".staging"))
            .map(|n| format!("{TEMPLATES_DIR}/{n}")),
    );
    left
}

/// Fails unless no process named in `processes` runs, nothing but the VM
/// templates is left under /run/bulkhead and nothing is mounted there: what
/// every sandbox test checks after itself.
pub fn nothing_left(processes: &[&str]) -> Result<(), libtest_mimic::Failed> {
    for name in processes {
        let left = processes_named(name);
        if !left.is_empty() {
            return Err(format!("{name} processes left: {left:?}").into());
        }
    }
    let run_dir = run_dir_leftovers();
    if !run_dir.is_empty() {
        return Err(format!("left under /run/bulkhead: {run_dir:?}").into());
    }
    if let Some(mount) = bulkhead::sandbox::first_mount_under(Path::new("/run/bulkhead")) {
        return Err(format!("mount left: {}", mount.display()).into());
    }
    // CNI's bridge plugin puts the host end of each container's veth here.
    let veths: Vec<String> = listing(Path::new("/sys/class/net"))
        .into_iter()
        .filter(|n| n.starts_with("veth"))
        .collect();
    if !veths.is_empty() {
        return Err(format!("veth interfaces left on the host: {veths:?}").into());
    }
    Ok(())
}

/// Fills `root` with a busybox root file system: /bin/busybox from the host
/// (Debian's busybox-static), a symlink per applet, the usual top-level
/// directories and an /etc/passwd naming root.
pub fn busybox_rootfs(root: &Path) -> anyhow::Result<()> {
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    let applets = process::run(
        Command::new("/bin/busybox").arg("--list"),
        Duration::from_secs(10),
    )?;
    for applet in applets
        .stdout
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    Ok(())
}
