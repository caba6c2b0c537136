//! End-to-end: bulkhead-vmm boots the project's guest kernel with a busybox
//! initrd, and refuses bad input clearly without leaving anything behind.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bulkhead_tests::initramfs::busybox::busybox_initrd;
use common::{guest_kernel, listing, processes_named, run_vmm, virtiofsd, VmmRun};
use libtest_mimic::{Failed, Trial};

/// Generous: under emulation a boot takes seconds, on hardware milliseconds.
const BOOT_TIMEOUT_SECS: u64 = 60;
/// The harness's own deadline on a VMM process, above the VMM's boot timeout.
const RUN_DEADLINE: Duration = Duration::from_secs(BOOT_TIMEOUT_SECS + 60);
/// Failures before the guest exists must be quick.
const BAD_INPUT_DEADLINE: Duration = Duration::from_secs(30);

const REPORT_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
echo "VCPUS=$(grep -c ^processor /proc/cpuinfo)"
echo "MEMTOTAL_KB=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
echo BULKHEAD-E2E-READY
reboot -f
"#;

/// A guest that asks to be saved, then (only in its restored copy) goes on.
const SNAPSHOT_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
t=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "TOKEN=$t"
echo "bulkhead-agent: template ready, save me"
sleep 1
echo "AFTER=$t"
echo BULKHEAD-E2E-READY
reboot -f
"#;

fn main() -> ExitCode {
    common::main("vmm_boot", || {
        vec![
            Trial::test("saves_a_guest_and_resumes_it", saves_a_guest_and_resumes_it),
            Trial::test("boots_one_vcpu_and_powers_off", || {
                boots(1, 128).map(|_| ())
            }),
            Trial::test("boots_two_vcpus", || boots(2, 128).map(|_| ())),
            Trial::test(
                "memory_size_reaches_the_guest",
                memory_size_reaches_the_guest,
            ),
            Trial::test("config_file_boots_like_flags", config_file_boots_like_flags),
            Trial::test(
                "guest_gets_entropy_from_virtio_rng",
                guest_gets_entropy_from_virtio_rng,
            ),
            Trial::test(
                "guest_shares_files_over_virtio_fs",
                guest_shares_files_over_virtio_fs,
            ),
            Trial::test(
                "rejects_fs_share_without_virtiofsd",
                rejects_fs_share_without_virtiofsd,
            ),
            Trial::test(
                "boot_timeout_stops_a_silent_guest",
                boot_timeout_stops_a_silent_guest,
            ),
            Trial::test("guest_panic_is_reported", guest_panic_is_reported),
            Trial::test("rejects_missing_kernel", rejects_missing_kernel),
            Trial::test("rejects_file_that_is_not_a_kernel", rejects_non_kernel),
            Trial::test("rejects_initrd_larger_than_memory", rejects_huge_initrd),
            Trial::test("rejects_zero_memory", || {
                bad_args(&["--memory", "0"], "Guest memory must be between")
            }),
            Trial::test("rejects_zero_vcpus", || {
                bad_args(
                    &["--vcpus", "0"],
                    "vCPU count must be between 1 and 254, not 0",
                )
            }),
            Trial::test("rejects_300_vcpus", || {
                bad_args(&["--vcpus", "300"], "not 300")
            }),
            Trial::test(
                "rejects_config_with_unknown_fields",
                rejects_unknown_config_fields,
            ),
        ]
    })
}

/// A scratch directory with a test initrd, checked for leftovers when dropped.
struct Scratch {
    dir: tempfile::TempDir,
    tmp_before: Vec<String>,
}

impl Scratch {
    fn new() -> Result<Scratch, Failed> {
        let tmp_before = listing(&std::env::temp_dir());
        Ok(Scratch {
            dir: tempfile::tempdir()?,
            tmp_before,
        })
    }

    fn initrd(&self, name: &str, init: &str) -> Result<PathBuf, Failed> {
        let path = self.dir.path().join(name);
        busybox_initrd(init, &path)?;
        Ok(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// No VMM process is left, and the VMM put nothing in the temp dir.
    fn check_nothing_left(self) -> Result<(), Failed> {
        let vmms = processes_named("bulkhead-vmm");
        let own = self
            .dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        drop(self.dir);
        let mut after = listing(&std::env::temp_dir());
        after.retain(|n| Some(n) != own.as_ref());
        if !vmms.is_empty() {
            return Err(format!("bulkhead-vmm processes left running: {vmms:?}").into());
        }
        let new: Vec<&String> = after
            .iter()
            .filter(|n| !self.tmp_before.contains(n))
            .collect();
        // Other tests run in parallel and make their own scratch dirs (".tmpXXXX").
        let foreign: Vec<&&String> = new.iter().filter(|n| !n.starts_with(".tmp")).collect();
        if !foreign.is_empty() {
            return Err(format!("files left in the temp dir: {foreign:?}").into());
        }
        Ok(())
    }
}

fn boot_args<'a>(
    kernel: &'a str,
    initrd: &'a str,
    vcpus: &'a str,
    memory: &'a str,
) -> Vec<&'a str> {
    vec![
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--vcpus",
        vcpus,
        "--memory",
        memory,
        "--console",
        "stdout",
        "--boot-timeout",
        "60",
        "--ready-marker",
        "BULKHEAD-E2E-READY",
    ]
}

fn field(out: &str, key: &str) -> Result<u64, Failed> {
    out.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(key)?
                .strip_prefix('=')?
                .trim()
                .parse()
                .ok()
        })
        .ok_or_else(|| format!("the guest did not print {key}=; console:\n{out}").into())
}

fn expect_clean_exit(run: &VmmRun) -> Result<(), Failed> {
    if run.code() != 0 {
        return Err(format!(
            "bulkhead-vmm exited {}:\nstderr: {}\nconsole: {}",
            run.code(),
            run.stderr,
            run.stdout
        )
        .into());
    }
    Ok(())
}

/// Boots with `vcpus` and `memory` MiB; returns the guest's MemTotal in KiB.
fn boots(vcpus: u8, memory: u32) -> Result<u64, Failed> {
    let scratch = Scratch::new()?;
    let kernel = guest_kernel()?;
    let initrd = scratch.initrd("init.cpio", REPORT_INIT)?;
    let (v, m) = (vcpus.to_string(), memory.to_string());
    let run = run_vmm(
        &boot_args(&kernel.to_string_lossy(), &initrd.to_string_lossy(), &v, &m),
        RUN_DEADLINE,
    );
    expect_clean_exit(&run)?;
    let seen = field(&run.stdout, "VCPUS")?;
    if seen != u64::from(vcpus) {
        return Err(format!(
            "asked for {vcpus} vCPUs, the guest saw {seen}; console:\n{}",
            run.stdout
        )
        .into());
    }
    let memtotal = field(&run.stdout, "MEMTOTAL_KB")?;
    let asked_kb = u64::from(memory) * 1024;
    // MemTotal is RAM minus what the kernel reserved for itself: a little less.
    if memtotal > asked_kb || memtotal < asked_kb * 7 / 10 {
        return Err(format!("asked for {memory} MiB, guest MemTotal is {memtotal} KiB").into());
    }
    scratch.check_nothing_left()?;
    Ok(memtotal)
}

fn memory_size_reaches_the_guest() -> Result<(), Failed> {
    let small = boots(1, 128)?;
    let large = boots(1, 256)?;
    let delta_mib = (large - small) / 1024;
    // 128 MiB more RAM shows up as almost exactly 128 MiB more MemTotal (page
    // structures for the extra RAM cost ~2 MiB).
    if !(120..=128).contains(&delta_mib) {
        return Err(format!(
            "128 MiB more guest memory gave {delta_mib} MiB more MemTotal ({small} -> {large} KiB)"
        )
        .into());
    }
    Ok(())
}

fn config_file_boots_like_flags() -> Result<(), Failed> {
    let scratch = Scratch::new()?;
    let kernel = guest_kernel()?;
    let initrd = scratch.initrd("init.cpio", REPORT_INIT)?;
    let config = scratch.path("vm.json");
    let json = format!(
        r#"{{"kernel": {k:?}, "initrd": {i:?}, "memory": 96, "vcpus": 2, "console": "stdout",
            "boot_timeout": {BOOT_TIMEOUT_SECS}, "ready_marker": "BULKHEAD-E2E-READY"}}"#,
        k = kernel,
        i = initrd,
    );
    std::fs::write(&config, json)?;
    let run = run_vmm(&["--config", &config.to_string_lossy()], RUN_DEADLINE);
    expect_clean_exit(&run)?;
    if field(&run.stdout, "VCPUS")? != 2 {
        return Err("the config file's vcpus did not reach the guest".into());
    }
    scratch.check_nothing_left()
}

const RNG_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "RNG_CURRENT=$(cat /sys/class/misc/hw_random/rng_current)"
echo "RNG_BYTES=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
echo BULKHEAD-E2E-READY
reboot -f
"#;

fn guest_gets_entropy_from_virtio_rng() -> Result<(), Failed> {
    let scratch = Scratch::new()?;
    let kernel = guest_kernel()?;
    let initrd = scratch.initrd("rng.cpio", RNG_INIT)?;
    let (k, i) = (kernel.to_string_lossy(), initrd.to_string_lossy());
    let run = run_vmm(&boot_args(&k, &i, "1", "128"), RUN_DEADLINE);
    expect_clean_exit(&run)?;
    let line = |key: &str| {
        run.stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(key).map(str::to_owned))
            .unwrap_or_default()
    };
    if !line("RNG_CURRENT=").starts_with("virtio_rng") {
        return Err(format!(
            "the guest's hardware RNG is not virtio-rng; console:\n{}",
            run.stdout
        )
        .into());
    }
    let hex = line("RNG_BYTES=");
    if hex.len() != 64 || hex.chars().all(|c| c == '0') {
        return Err(format!("/dev/hwrng gave {hex:?}, not 32 random bytes").into());
    }
    scratch.check_nothing_left()
}

const FS_INIT: &str = r#"#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mkdir -p /share
mount -t virtiofs share /share || echo MOUNT-FAILED
echo "HOST_FILE=$(cat /share/from-host.txt)"
echo "written in the guest" > /share/from-guest.txt
sync
echo BULKHEAD-E2E-READY
reboot -f
"#;

fn guest_shares_files_over_virtio_fs() -> Result<(), Failed> {
    let scratch = Scratch::new()?;
    let kernel = guest_kernel()?;
    let initrd = scratch.initrd("fs.cpio", FS_INIT)?;
    let shared = scratch.path("shared");
    std::fs::create_dir(&shared)?;
    std::fs::write(shared.join("from-host.txt"), "hello from the host\n")?;
    let socket = scratch.path("virtiofsd.sock");
    let mut daemon = std::process::Command::new(virtiofsd()?)
        .arg("--shared-dir")
        .arg(&shared)
        .arg("--socket-path")
        .arg(&socket)
        .args(["--sandbox", "none", "--cache", "never"])
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let result = (|| -> Result<(), Failed> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if std::time::Instant::now() > deadline {
                return Err("virtiofsd did not create its socket in 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (k, i) = (kernel.to_string_lossy(), initrd.to_string_lossy());
        let fs = format!("share={}", socket.display());
        let mut args = boot_args(&k, &i, "1", "128");
        args.extend(["--fs", &fs]);
        let run = run_vmm(&args, RUN_DEADLINE);
        expect_clean_exit(&run)?;
        if run.stdout.contains("MOUNT-FAILED")
            || !run.stdout.contains("HOST_FILE=hello from the host")
        {
            return Err(format!(
                "the guest did not read the host's file; console:\n{}",
                run.stdout
            )
            .into());
        }
        let written = std::fs::read_to_string(shared.join("from-guest.txt"))?;
        if written != "written in the guest\n" {
            return Err(format!("the host sees {written:?} in the guest's file").into());
        }
        // virtiofsd serves one VM and exits when it disconnects.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while daemon.try_wait()?.is_none() {
            if std::time::Instant::now() > deadline {
                return Err("virtiofsd still runs 30 s after the VM stopped".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })();
    let _ = daemon.kill();
    let _ = daemon.wait();
    result?;
    scratch.check_nothing_left()
}

fn rejects_fs_share_without_virtiofsd() -> Result<(), Failed> {
    let scratch = Scratch::new()?;
    let socket = scratch.path("nobody-listens.sock");
    let fs = format!("share={}", socket.display());
    bad_args_in(
        scratch,
        &["--fs", &fs],
        "cannot set up vhost-user with virtiofsd at",
    )
}

fn boot_timeout_stops_a_silent_guest() -> Result<(), Failed> {
    let scratch = Scratch::new()?;
    let kernel = guest_kernel()?;
    let init = "#!/bin/sh\nexport PATH=/bin\necho guest is up but never ready\nexec sleep 100000\n";
    let initrd = scratch.initrd("silent.cpio", init)?;
    let run = run_vmm(
        &[
            "--kernel",
            &kernel.to_string_lossy(),
            "--initrd",
            &initrd.to_string_lossy(),
            "--boot-timeout",
            "20",
            "--ready-marker",
            "NEVER-PRINTED",
        ],
        RUN_DEADLINE,
    );
    run.expect_code(3, "boot timeout")?;
    for needle in [
        "NEVER-PRINTED",
        "within 20 s",
        "guest is up but never ready",
    ] {
        if !run.stderr.contains(needle) {
            return Err(format!("the timeout error lacks {needle:?}:\n{}", run.stderr).into());
        }
    }
    scratch.check_nothing_left()
}

fn guest_panic_is_reported() -> Result<(), Failed> {
    let scratch = Scratch::new()?;
    let kernel = guest_kernel()?;
    // PID 1 exiting makes the kernel panic ("Attempted to kill init!").
    let initrd = scratch.initrd("panic.cpio", "#!/bin/sh\nexit 0\n")?;
    let run = run_vmm(
        &[
            "--kernel",
            &kernel.to_string_lossy(),
            "--initrd",
            &initrd.to_string_lossy(),
        ],
        RUN_DEADLINE,
    );
    if run.code() != 4 {
        return Err(format!(
            "expected exit 4 (guest crashed), got {}: {}",
            run.code(),
            run.stderr
        )
        .into());
    }
    for needle in ["panicked", "Attempted to kill init"] {
        if !run.stderr.contains(needle) {
            return Err(format!("the panic report lacks {needle:?}:\n{}", run.stderr).into());
        }
    }
    scratch.check_nothing_left()
}

/// A bad input: exit 1 fast, an error containing `needle`, nothing left behind.
fn expect_refusal(args: &[&str], needle: &str, scratch: Scratch) -> Result<(), Failed> {
    let run = run_vmm(args, BAD_INPUT_DEADLINE);
    if run.code() != 1 {
        return Err(format!(
            "expected exit 1 for {args:?}, got {}: {}",
            run.code(),
            run.stderr
        )
        .into());
    }
    if !run.stderr.contains(needle) {
        return Err(format!("error for {args:?} lacks {needle:?}:\n{}", run.stderr).into());
    }
    scratch.check_nothing_left()
}

fn bad_args(extra: &[&str], needle: &str) -> Result<(), Failed> {
    bad_args_in(Scratch::new()?, extra, needle)
}

fn bad_args_in(scratch: Scratch, extra: &[&str], needle: &str) -> Result<(), Failed> {
    let kernel = guest_kernel()?;
    let kernel = kernel.to_string_lossy();
    let mut args = vec!["--kernel", kernel.as_ref()];
    args.extend_from_slice(extra);
    expect_refusal(&args, needle, scratch)
}

fn rejects_missing_kernel() -> Result<(), Failed> {
    let scratch = Scratch::new()?;
    let missing = scratch.path("no-such-vmlinux");
    expect_refusal(
        &["--kernel", &missing.to_string_lossy()],
        "No such file",
        scratch,
    )
}

fn rejects_non_kernel() -> Result<(), Failed> {
    let scratch = Scratch::new()?;
    let fake = scratch.path("vmlinux");
    std::fs::write(&fake, "#!/bin/sh\necho I am not a kernel\n")?;
    expect_refusal(
        &["--kernel", &fake.to_string_lossy()],
        "is not a kernel image",
        scratch,
    )
}

fn rejects_huge_initrd() -> Result<(), Failed> {
    let scratch = Scratch::new()?;
    let kernel = guest_kernel()?;
    let initrd = scratch.path("huge.cpio");
    // Sparse: 200 MiB long, no disk used.
    std::fs::File::create(&initrd)?.set_len(200 << 20)?;
    expect_refusal(
        &[
            "--kernel",
            &kernel.to_string_lossy(),
            "--initrd",
            &initrd.to_string_lossy(),
            "--memory",
            "64",
        ],
        "does not fit in guest memory",
        scratch,
    )
}

fn rejects_unknown_config_fields() -> Result<(), Failed> {
    let scratch = Scratch::new()?;
    let kernel = guest_kernel()?;
    let config = scratch.path("vm.json");
    std::fs::write(
        &config,
        format!(r#"{{"kernel": {kernel:?}, "memroy": 64}}"#),
    )?;
    expect_refusal(
        &["--config", &config.to_string_lossy()],
        "unknown field `memroy`",
        scratch,
    )
}

/// The token a snapshot test guest printed after `key=`.
fn token(out: &str, key: &str) -> Option<String> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
}

fn saves_a_guest_and_resumes_it() -> Result<(), Failed> {
    let scratch = Scratch::new()?;
    let kernel = guest_kernel()?;
    let initrd = scratch.initrd("init.cpio", SNAPSHOT_INIT)?;
    let snapshot = scratch.path("snapshot");
    std::fs::create_dir(&snapshot)?;
    let (k, i) = (kernel.to_string_lossy(), initrd.to_string_lossy());
    let dir = snapshot.to_string_lossy();
    let mut save = boot_args(&k, &i, "2", "128");
    save.extend(["--save-snapshot", &dir]);
    let saved = run_vmm(&save, RUN_DEADLINE);
    expect_clean_exit(&saved)?;
    let before = token(&saved.stdout, "TOKEN")
        .ok_or_else(|| format!("no token before the snapshot; console:\n{}", saved.stdout))?;
    // The vCPU that printed the marker stopped right there.
    if saved.stdout.contains("AFTER=") {
        return Err(format!("the guest ran on past its snapshot:\n{}", saved.stdout).into());
    }
    for file in ["state.json", "memory"] {
        if !snapshot.join(file).is_file() {
            return Err(format!("no {file} in the snapshot").into());
        }
    }

    let mut restore = boot_args(&k, &i, "2", "128");
    restore.extend(["--restore-snapshot", &dir]);
    let resumed = run_vmm(&restore, RUN_DEADLINE);
    expect_clean_exit(&resumed)?;
    // Its shell's variables came back with its memory.
    if token(&resumed.stdout, "AFTER").as_deref() != Some(before.as_str()) {
        return Err(format!(
            "the resumed guest did not go on with token {before}; console:\n{}",
            resumed.stdout
        )
        .into());
    }

    // A snapshot of another shape is refused, saying why.
    let mut bigger = boot_args(&k, &i, "2", "256");
    bigger.extend(["--restore-snapshot", &dir]);
    let refused = run_vmm(&bigger, RUN_DEADLINE);
    if refused.code() != 1 || !refused.stderr.contains("this VM is 256 MiB") {
        return Err(format!(
            "a 128 MiB snapshot restored into 256 MiB: exit {}, {}",
            refused.code(),
            refused.stderr
        )
        .into());
    }
    scratch.check_nothing_left()
}
