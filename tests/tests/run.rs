//! End-to-end: `bulkhead run --rootfs` runs a command in a container inside its
//! own microVM, with stdio, exit codes, signals, limits and cleanup as under runc.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use common::processes_named;
use libtest_mimic::Failed;

/// Generous: a sandbox boots in seconds under emulation.
const DEADLINE: Duration = Duration::from_secs(240);

fn main() -> ExitCode {
    common::main("run", || {
        vec![
            common::trial(
                "echo_separates_stdout_and_stderr",
                echo_separates_stdout_and_stderr,
            ),
            common::trial("exit_code_is_the_commands", exit_code_is_the_commands),
            common::trial("stdin_is_fed_until_eof", stdin_is_fed_until_eof),
            common::trial(
                "sigterm_reaches_the_container",
                sigterm_reaches_the_container,
            ),
            common::trial("memory_limit_ooms", memory_limit_ooms),
            common::trial(
                "read_only_rootfs_refuses_writes",
                read_only_rootfs_refuses_writes,
            ),
            common::trial(
                "files_written_are_visible_on_the_host",
                files_written_are_visible_on_the_host,
            ),
            common::trial("env_and_workdir_are_honoured", env_and_workdir_are_honoured),
            common::trial(
                "exec_joins_a_running_container",
                exec_joins_a_running_container,
            ),
            common::trial("tty_gives_a_real_pty", tty_gives_a_real_pty),
            common::trial(
                "killed_vmm_ends_the_run_cleanly",
                killed_vmm_ends_the_run_cleanly,
            ),
            common::trial(
                "sigterm_while_booting_cleans_up",
                sigterm_while_booting_cleans_up,
            ),
            common::trial(
                "killed_cli_takes_its_sandbox_along",
                killed_cli_takes_its_sandbox_along,
            ),
            common::trial("user_is_honoured", user_is_honoured),
            common::trial(
                "sysctl_tmpfs_shm_size_and_masked_paths",
                sysctl_tmpfs_shm_size_and_masked_paths,
            ),
            common::trial(
                "security_opt_seccomp_reaches_run_and_exec_and_ulimit_applies",
                security_opt_and_ulimit,
            ),
            common::trial(
                "dockers_default_capabilities_and_cap_flags",
                dockers_default_capabilities_and_cap_flags,
            ),
            common::trial(
                "network_none_has_only_loopback_up",
                network_none_has_only_loopback_up,
            ),
            common::trial("rejects_missing_rootfs", rejects_missing_rootfs),
            common::trial("rejects_empty_command", rejects_empty_command),
            common::trial("command_not_found_is_127", command_not_found_is_127),
            common::trial("rejects_too_little_memory", rejects_too_little_memory),
            common::trial(
                "template_copies_get_their_own_clock_and_randomness",
                template_copies_get_their_own_clock_and_randomness,
            ),
            common::trial(
                "without_templates_every_sandbox_boots",
                without_templates_every_sandbox_boots,
            ),
        ]
    })
}

/// A busybox root file system in a temp dir, removed (and checked) at the end.
struct Rootfs {
    dir: tempfile::TempDir,
}

impl Rootfs {
    fn new() -> Result<Rootfs, Failed> {
        let dir = tempfile::tempdir()?;
        common::busybox_rootfs(dir.path())?;
        std::fs::create_dir_all(dir.path().join("work"))?;
        Ok(Rootfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn cli() -> PathBuf {
    common::bulkhead_cli()
}

struct RunResult {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `bulkhead run --rootfs ROOTFS EXTRA... -- CMD...`, with `stdin` fed in.
fn bulkhead_run(
    rootfs: &Path,
    extra: &[&str],
    cmd: &[&str],
    stdin: Option<&[u8]>,
) -> Result<RunResult, Failed> {
    let mut c = Command::new(cli());
    c.arg("run")
        .arg("--rootfs")
        .arg(rootfs)
        .args(extra)
        .arg("--")
        .args(cmd);
    c.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn()?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().ok_or("no stdin pipe")?;
        pipe.write_all(input)?;
    }
    let out = wait_with_deadline(child, DEADLINE)?;
    Ok(out)
}

fn wait_with_deadline(
    mut child: std::process::Child,
    deadline: Duration,
) -> Result<RunResult, Failed> {
    use std::io::Read;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let until = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("bulkhead run did not finish within {deadline:?}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(RunResult {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Starts `bulkhead run` in the background and waits for the first line the
/// container prints (so the container is known to run); returns the child.
fn spawn_until_first_line(
    rootfs: &Rootfs,
    extra: &[&str],
    cmd: &[&str],
) -> Result<(std::process::Child, String), Failed> {
    use std::io::BufRead;
    let mut c = Command::new(cli());
    c.arg("run")
        .arg("--rootfs")
        .arg(rootfs.path())
        .args(extra)
        .arg("--")
        .args(cmd);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.as_mut().ok_or("stdout")?).read_line(&mut first)?;
    Ok((child, first))
}

/// After every test: no VMM, virtiofsd or CLI left, nothing under /run/bulkhead.
fn nothing_left() -> Result<(), Failed> {
    common::nothing_left(&["bulkhead-vmm", "virtiofsd", "bulkhead"])
}

fn expect(r: &RunResult, code: i32, what: &str) -> Result<(), Failed> {
    if r.code != code {
        return Err(format!(
            "{what}: expected exit {code}, got {}\nstdout: {}\nstderr: {}",
            r.code, r.stdout, r.stderr
        )
        .into());
    }
    Ok(())
}

fn echo_separates_stdout_and_stderr() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let r = bulkhead_run(
        rootfs.path(),
        &[],
        &["sh", "-c", "echo to-stdout; echo to-stderr >&2"],
        None,
    )?;
    expect(&r, 0, "echo")?;
    if r.stdout != "to-stdout\n"
        || !r.stderr.contains("to-stderr")
        || r.stderr.contains("to-stdout")
    {
        return Err(format!(
            "streams mixed up: stdout {:?}, stderr {:?}",
            r.stdout, r.stderr
        )
        .into());
    }
    nothing_left()
}

fn exit_code_is_the_commands() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let r = bulkhead_run(rootfs.path(), &[], &["sh", "-c", "exit 7"], None)?;
    expect(&r, 7, "sh -c 'exit 7'")?;
    nothing_left()
}

fn stdin_is_fed_until_eof() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let input: Vec<u8> = (0..20_000)
        .flat_map(|i: u32| format!("line {i}\n").into_bytes())
        .collect();
    let r = bulkhead_run(
        rootfs.path(),
        &["-i"],
        &["sh", "-c", "cat | wc -l"],
        Some(&input),
    )?;
    expect(&r, 0, "cat")?;
    if r.stdout.trim() != "20000" {
        return Err(format!(
            "the container counted {:?} lines, not 20000",
            r.stdout.trim()
        )
        .into());
    }
    nothing_left()
}

fn sigterm_reaches_the_container() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    // Wait until the container runs (it says so), then signal the CLI.
    let (child, first) =
        spawn_until_first_line(&rootfs, &[], &["sh", "-c", "echo started; exec sleep 100"])?;
    if first.trim() != "started" {
        return Err(format!("the container printed {first:?}").into());
    }
    // SAFETY: kill(2) of our own child; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = wait_with_deadline(child, DEADLINE)?;
    expect(&r, 143, "sleep 100 + SIGTERM")?;
    if r.stderr.contains("while starting") {
        return Err("the signal arrived before the container ran".into());
    }
    nothing_left()
}

fn memory_limit_ooms() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    // Holds 64 MiB in a shell variable: far past a 32 MiB limit.
    let hog = "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived";
    let r = bulkhead_run(
        rootfs.path(),
        &["--memory", "32m"],
        &["sh", "-c", hog],
        None,
    )?;
    if r.code == 0 || r.stdout.contains("survived") {
        return Err(format!("64 MiB fit in a 32 MiB limit: {}, {}", r.code, r.stdout).into());
    }
    if !r.stderr.to_lowercase().contains("oom") && r.code != 137 {
        return Err(format!("no OOM reported: exit {}, stderr {}", r.code, r.stderr).into());
    }
    nothing_left()
}

fn read_only_rootfs_refuses_writes() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let r = bulkhead_run(
        rootfs.path(),
        &["--read-only"],
        &["sh", "-c", "echo x > /work/f"],
        None,
    )?;
    if r.code == 0 || rootfs.path().join("work/f").exists() {
        return Err(format!("a read-only rootfs took a write (exit {})", r.code).into());
    }
    if !r.stderr.contains("Read-only file system") {
        return Err(format!("unexpected error: {}", r.stderr).into());
    }
    nothing_left()
}

fn files_written_are_visible_on_the_host() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let r = bulkhead_run(
        rootfs.path(),
        &[],
        &["sh", "-c", "echo from-the-container > /work/out.txt"],
        None,
    )?;
    expect(&r, 0, "write")?;
    let text = std::fs::read_to_string(rootfs.path().join("work/out.txt"))?;
    if text != "from-the-container\n" {
        return Err(format!("the host sees {text:?}").into());
    }
    nothing_left()
}

fn env_and_workdir_are_honoured() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let r = bulkhead_run(
        rootfs.path(),
        &["-e", "GREETING=hi there", "-w", "/work"],
        &["sh", "-c", "echo \"$GREETING\" $(pwd)"],
        None,
    )?;
    expect(&r, 0, "env")?;
    if r.stdout.trim() != "hi there /work" {
        return Err(format!("got {:?}", r.stdout).into());
    }
    nothing_left()
}

fn exec_joins_a_running_container() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let name = "e2e-exec";
    let script = "echo $$ > /work/main.pid; echo started; exec sleep 120";
    let (child, first) = spawn_until_first_line(&rootfs, &["--name", name], &["sh", "-c", script])?;
    let result = (|| -> Result<(), Failed> {
        if first.trim() != "started" {
            return Err(format!("the container printed {first:?}").into());
        }
        // The exec sees the container's file system, processes and hostname.
        let script = "cat /work/main.pid; ls /proc | grep -c '^[0-9]'; hostname; exit 3";
        let mut e = Command::new(cli());
        e.args(["exec", name, "--", "sh", "-c", script]);
        e.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let r = wait_with_deadline(e.spawn()?, DEADLINE)?;
        expect(&r, 3, "exec")?;
        let lines: Vec<&str> = r.stdout.lines().collect();
        let pid_in_container = std::fs::read_to_string(rootfs.path().join("work/main.pid"))?;
        // The hostname is the short container id, as in Docker.
        let inspect = wait_with_deadline(
            Command::new(cli())
                .args(["inspect", name])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?,
            DEADLINE,
        )?;
        let id: serde_json::Value = serde_json::from_str(&inspect.stdout)?;
        let short_id = id[0]["Id"]
            .as_str()
            .unwrap_or_default()
            .get(..12)
            .unwrap_or_default();
        if lines.first().copied() != Some(pid_in_container.trim())
            || lines.get(2).copied() != Some(short_id)
        {
            return Err(format!("the exec does not see the container: {:?}", r.stdout).into());
        }
        // init wrapper, sleep, the exec's shell, ...: a handful, not the guest's dozens.
        let procs: u32 = lines.get(1).and_then(|n| n.parse().ok()).unwrap_or(999);
        if procs > 6 {
            return Err(format!(
                "the exec sees {procs} processes: not in the container's pid namespace"
            )
            .into());
        }
        let unknown = wait_with_deadline(
            Command::new(cli())
                .args(["exec", "no-such-container", "--", "true"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?,
            DEADLINE,
        )?;
        if unknown.code != 125
            || !unknown
                .stderr
                .contains("no container named or with an id starting \"no-such-container\"")
        {
            return Err(format!(
                "exec into a missing container: {} {}",
                unknown.code, unknown.stderr
            )
            .into());
        }
        Ok(())
    })();
    // SAFETY: kill(2) of our own child; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = wait_with_deadline(child, DEADLINE)?;
    result?;
    expect(&r, 143, "the main process after SIGTERM")?;
    nothing_left()
}

fn tty_gives_a_real_pty() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let r = bulkhead_run(
        rootfs.path(),
        &["-t"],
        &["sh", "-c", "tty; test -t 0 && test -t 1 && echo both-ttys"],
        None,
    )?;
    expect(&r, 0, "-t")?;
    if !r.stdout.contains("/dev/pts/") || !r.stdout.contains("both-ttys") {
        return Err(format!("no pty in the container: {:?}", r.stdout).into());
    }
    nothing_left()
}

fn killed_vmm_ends_the_run_cleanly() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let (child, _) =
        spawn_until_first_line(&rootfs, &[], &["sh", "-c", "echo started; exec sleep 120"])?;
    for pid in processes_named("bulkhead-vmm") {
        // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let started = Instant::now();
    let r = wait_with_deadline(child, DEADLINE)?;
    if r.code == 0 || r.code == 143 {
        return Err(format!("a killed VM was reported as a normal exit ({})", r.code).into());
    }
    if started.elapsed() > Duration::from_secs(60) {
        return Err(format!(
            "bulkhead run took {:?} to notice its VM died",
            started.elapsed()
        )
        .into());
    }
    // The error names the cause (the VM stopped, killed), not just a closed socket.
    if !r.stderr.contains("bulkhead:") || !r.stderr.contains("the microVM stopped") {
        return Err(format!("the error does not say the microVM stopped: {}", r.stderr).into());
    }
    nothing_left()
}

/// `kill -9` of a foreground `bulkhead run`: its VMM and virtiofsd die with
/// it instead of running on unseen, `ps -a` does not call it running, and
/// `rm` removes what is left.
fn killed_cli_takes_its_sandbox_along() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let name = "killed-cli";
    let (mut child, _) = spawn_until_first_line(
        &rootfs,
        &["--name", name],
        &["sh", "-c", "echo started; exec sleep 120"],
    )?;
    if processes_named("bulkhead-vmm").is_empty() {
        return Err("no bulkhead-vmm while the container runs".into());
    }
    child.kill()?;
    child.wait()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (vmm, virtiofsd) = (
            processes_named("bulkhead-vmm"),
            processes_named("virtiofsd"),
        );
        if vmm.is_empty() && virtiofsd.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "30 s after kill -9 of bulkhead run, its sandbox still runs: bulkhead-vmm \
                 {vmm:?}, virtiofsd {virtiofsd:?}"
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ps = Command::new(cli()).args(["ps", "-a"]).output()?;
    let ps = String::from_utf8_lossy(&ps.stdout).into_owned();
    let line = ps
        .lines()
        .find(|l| l.contains(name))
        .ok_or_else(|| format!("ps -a does not list {name}:\n{ps}"))?;
    if !line.contains("Exited") {
        return Err(format!("ps -a shows the killed run as: {line}").into());
    }
    let rm = Command::new(cli()).args(["rm", name]).output()?;
    if !rm.status.success() {
        return Err(format!("bulkhead rm: {}", String::from_utf8_lossy(&rm.stderr)).into());
    }
    nothing_left()
}

fn sigterm_while_booting_cleans_up() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let mut c = Command::new(cli());
    c.arg("run")
        .arg("--rootfs")
        .arg(rootfs.path())
        .args(["--", "true"]);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = c.spawn()?;
    // The VMM exists but the guest has not booted yet (that takes seconds here).
    let until = Instant::now() + DEADLINE;
    while processes_named("bulkhead-vmm").is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: kill(2) of our own child; no memory is involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let r = wait_with_deadline(child, DEADLINE)?;
    expect(&r, 143, "SIGTERM during boot")?;
    if !r.stderr.contains("while starting the microVM") {
        return Err(format!("no word about the interruption: {}", r.stderr).into());
    }
    nothing_left()
}

/// Like runc's: a network namespace of its own with only `lo`, and `lo` up
/// (the agent lends the first container a namespace it made ahead of time).
fn network_none_has_only_loopback_up() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let r = bulkhead_run(
        rootfs.path(),
        &["--network", "none"],
        &["sh", "-c", "ls /sys/class/net; cat /sys/class/net/lo/flags"],
        None,
    )?;
    expect(&r, 0, "listing interfaces")?;
    let lines: Vec<&str> = r.stdout.lines().collect();
    let flags = lines
        .get(1)
        .and_then(|f| u32::from_str_radix(f.trim_start_matches("0x"), 16).ok());
    if lines.first() != Some(&"lo") || flags.is_none_or(|f| f & libc::IFF_UP as u32 == 0) {
        return Err(format!("expected only lo, up; the container saw {:?}", r.stdout).into());
    }
    nothing_left()
}

/// The container gets Docker's defaults (its 14 capabilities, none ambient,
/// no_new_privs off, 1048576 open files); `--cap-add`/`--cap-drop` change the
/// set; a bad name is refused before anything starts.
fn dockers_default_capabilities_and_cap_flags() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let probe = "grep -E '^(CapEff|CapAmb|NoNewPrivs):' /proc/self/status; ulimit -n; \
                 touch /tmp/f; chown 1:1 /tmp/f && echo chown-ok || echo chown-denied";
    let r = bulkhead_run(rootfs.path(), &[], &["sh", "-c", probe], None)?;
    expect(&r, 0, "the probe")?;
    let field = |out: &str, key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    // Docker's default set as a mask: CHOWN DAC_OVERRIDE FOWNER FSETID KILL
    // SETGID SETUID SETPCAP NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD
    // AUDIT_WRITE SETFCAP.
    const DOCKER_DEFAULT: &str = "00000000a80425fb";
    let want = [
        ("CapEff:", DOCKER_DEFAULT),
        ("CapAmb:", "0000000000000000"),
        ("NoNewPrivs:", "0"),
    ];
    for (key, value) in want {
        if field(&r.stdout, key) != value {
            return Err(format!("{key} should be {value}:\n{}", r.stdout).into());
        }
    }
    if !r.stdout.contains("\n1048576\n") || !r.stdout.contains("chown-ok") {
        return Err(format!("want 1048576 open files and chown to work:\n{}", r.stdout).into());
    }

    let flags = ["--cap-drop", "chown", "--cap-add", "CAP_NET_ADMIN"];
    let r = bulkhead_run(rootfs.path(), &flags, &["sh", "-c", probe], None)?;
    expect(&r, 0, "the probe with --cap-drop/--cap-add")?;
    // Without CHOWN (bit 0), with NET_ADMIN (bit 12).
    if field(&r.stdout, "CapEff:") != "00000000a80435fa" || !r.stdout.contains("chown-denied") {
        return Err(format!("--cap-drop chown --cap-add NET_ADMIN gave:\n{}", r.stdout).into());
    }

    let r = bulkhead_run(rootfs.path(), &["--cap-add", "NET_ADMINN"], &["true"], None)?;
    if r.code != 125 || !r.stderr.contains("--cap-add NET_ADMINN") {
        return Err(format!("a bad capability: exit {}, {}", r.code, r.stderr).into());
    }
    nothing_left()
}

/// `--security-opt seccomp=PROFILE` filters the container's first process
/// and what `bulkhead exec` starts in it; `--ulimit` sets the limit; a
/// missing profile is refused before anything starts.
fn security_opt_and_ulimit() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let dir = tempfile::tempdir()?;
    let profile = dir.path().join("no-chmod.json");
    std::fs::write(&profile, common::NO_CHMOD_PROFILE)?;
    let opt = format!("seccomp={}", profile.display());
    let probe = "grep '^Seccomp:' /proc/self/status; ulimit -n; touch /tmp/f; \
                 chmod 600 /tmp/f && echo chmod-allowed || echo chmod-denied";
    let flags = ["--security-opt", &opt, "--ulimit", "nofile=1024:2048"];
    let r = bulkhead_run(rootfs.path(), &flags, &["sh", "-c", probe], None)?;
    expect(&r, 0, "the probe under the profile")?;
    if !r.stdout.contains("Seccomp:\t2") || !r.stdout.contains("\n1024\n") {
        return Err(format!("the profile or the limit did not apply:\n{}", r.stdout).into());
    }
    if !r.stdout.contains("chmod-denied") {
        return Err(format!("chmod was allowed under the profile:\n{}", r.stdout).into());
    }

    let name = "e2e-seccomp-exec";
    let mut extra = vec!["--name", name];
    extra.extend(flags);
    let (child, _) = spawn_until_first_line(
        &rootfs,
        &extra,
        &["sh", "-c", "echo started; exec sleep 120"],
    )?;
    let mut e = Command::new(cli());
    e.args(["exec", name, "--", "sh", "-c", probe])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let exec = wait_with_deadline(e.spawn()?, DEADLINE);
    let inspect = Command::new(cli()).args(["inspect", name]).output();
    let _ = Command::new(cli()).args(["rm", "-f", name]).output();
    let _ = wait_with_deadline(child, DEADLINE);
    let exec = exec?;
    expect(&exec, 0, "exec under the profile")?;
    if !exec.stdout.contains("Seccomp:\t2") || !exec.stdout.contains("chmod-denied") {
        return Err(format!("the exec'd process is not filtered:\n{}", exec.stdout).into());
    }
    // inspect shows what the container got.
    let inspect: serde_json::Value = serde_json::from_slice(&inspect?.stdout)?;
    let (host, security) = (&inspect[0]["HostConfig"], &inspect[0]["Security"]);
    let caps = security["Capabilities"].as_array().map_or(0, Vec::len);
    let ok = host["Ulimits"][0]["Name"] == "nofile"
        && host["Ulimits"][0]["Soft"] == 1024
        && host["SecurityOpt"][0]
            .as_str()
            .is_some_and(|o| o.starts_with("seccomp="))
        && security["Seccomp"] == "profile"
        && caps == 14;
    if !ok {
        return Err(format!("inspect does not show the settings: {host} {security}").into());
    }

    let missing = ["--security-opt", "seccomp=/no/such/profile.json"];
    let r = bulkhead_run(rootfs.path(), &missing, &["true"], None)?;
    if r.code != 125 || !r.stderr.contains("seccomp=/no/such/profile.json") {
        return Err(format!("a missing profile: exit {}, {}", r.code, r.stderr).into());
    }
    nothing_left()
}

/// `--sysctl`, `--tmpfs` and `--shm-size` reach the container; Docker's
/// masked paths are masked; a sysctl of the whole kernel is refused.
fn sysctl_tmpfs_shm_size_and_masked_paths() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let flags = [
        "--sysctl",
        "net.ipv4.ip_forward=1",
        "--sysctl",
        "kernel.shmmni=1000",
        "--tmpfs",
        "/scratch:size=1m",
        "--shm-size",
        "8m",
    ];
    let probe = "cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/shmmni; \
                 grep -E ' /(scratch|dev/shm) ' /proc/mounts; \
                 echo interrupts=$(wc -c < /proc/interrupts)";
    let r = bulkhead_run(rootfs.path(), &flags, &["sh", "-c", probe], None)?;
    expect(&r, 0, "the probe")?;
    let lines: Vec<&str> = r.stdout.lines().collect();
    let mount = |dir: &str| {
        lines
            .iter()
            .find(|l| l.contains(&format!(" {dir} ")))
            .copied()
            .unwrap_or("")
    };
    let ok = lines.first() == Some(&"1")
        && lines.get(1) == Some(&"1000")
        && mount("/scratch").contains("size=1024k")
        && mount("/scratch").contains("noexec")
        && mount("/dev/shm").contains("size=8192k")
        && r.stdout.contains("interrupts=0");
    if !ok {
        return Err(format!("sysctls, tmpfs, shm size or masking missing:\n{}", r.stdout).into());
    }
    let r = bulkhead_run(
        rootfs.path(),
        &["--sysctl", "vm.swappiness=10"],
        &["true"],
        None,
    )?;
    if r.code != 125 || !r.stderr.contains("vm.swappiness") {
        return Err(format!("a global sysctl: exit {}, {}", r.code, r.stderr).into());
    }
    nothing_left()
}

fn user_is_honoured() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let r = bulkhead_run(
        rootfs.path(),
        &["--user", "1000:1001"],
        &["sh", "-c", "id -u; id -g; touch /work/f || echo denied"],
        None,
    )?;
    expect(&r, 0, "--user")?;
    let lines: Vec<&str> = r.stdout.lines().collect();
    if lines.first() != Some(&"1000") || lines.get(1) != Some(&"1001") {
        return Err(format!("ran as {:?}, not 1000:1001", r.stdout).into());
    }
    // /work belongs to root on the host: an unprivileged user may not write it.
    if lines.get(2) != Some(&"denied") {
        return Err(format!("uid 1000 wrote into a root-owned directory: {:?}", r.stdout).into());
    }
    nothing_left()
}

fn rejects_missing_rootfs() -> Result<(), Failed> {
    let r = bulkhead_run(Path::new("/no/such/rootfs"), &[], &["true"], None)?;
    expect(&r, 125, "missing rootfs")?;
    if !r.stderr.contains("is not a directory") {
        return Err(format!("unclear error: {}", r.stderr).into());
    }
    nothing_left()
}

fn rejects_empty_command() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let r = wait_with_deadline(
        Command::new(cli())
            .arg("run")
            .arg("--rootfs")
            .arg(rootfs.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
        DEADLINE,
    )?;
    if r.code == 0 || !r.stderr.contains("CMD") {
        return Err(format!(
            "an empty command was not refused clearly: {} {}",
            r.code, r.stderr
        )
        .into());
    }
    nothing_left()
}

fn command_not_found_is_127() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let r = bulkhead_run(rootfs.path(), &[], &["no-such-command"], None)?;
    expect(&r, 127, "missing command")?;
    if !r.stderr.contains("no-such-command") {
        return Err(format!("the error does not name the command: {}", r.stderr).into());
    }
    nothing_left()
}

fn rejects_too_little_memory() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let r = bulkhead_run(rootfs.path(), &["--memory", "2m"], &["true"], None)?;
    expect(&r, 125, "--memory 2m")?;
    if !r.stderr.contains("at least") {
        return Err(format!("unclear error: {}", r.stderr).into());
    }
    nothing_left()
}

/// What a container saw of its VM (run with the host config `config`): wall
/// clock, 16 random bytes, the boot id.
fn vm_identity(rootfs: &Path, config: &Path) -> Result<(u64, String, String), Failed> {
    let mut c = Command::new(cli());
    c.env("BULKHEAD_CONFIG", config)
        .args(["run", "--rootfs"])
        .arg(rootfs)
        .arg("--")
        .args([
            "sh",
            "-c",
            "date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
             cat /proc/sys/kernel/random/boot_id",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let r = wait_with_deadline(c.spawn()?, DEADLINE)?;
    expect(&r, 0, "identity")?;
    let lines: Vec<&str> = r.stdout.lines().collect();
    let [date, random, boot_id] = lines[..] else {
        return Err(format!("unexpected output {:?}", r.stdout).into());
    };
    Ok((date.trim().parse()?, random.to_owned(), boot_id.to_owned()))
}

fn template_copies_get_their_own_clock_and_randomness() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    // Two sandboxes of one shape: the second (at least) resumes the template
    // the first one made or found.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "vm_templates = true\n")?;
    let first = vm_identity(rootfs.path(), &config)?;
    let second = vm_identity(rootfs.path(), &config)?;
    let templates = Path::new("/run/bulkhead").join(bulkhead::sandbox::templates::TEMPLATES_DIR);
    let made: Vec<String> = common::listing(&templates)
        .into_iter()
        .filter(|n| templates.join(n).join("state.json").is_file())
        .collect();
    if made.is_empty() {
        return Err(format!(
            "no VM template under {}: {:?}",
            templates.display(),
            common::listing(&templates)
        )
        .into());
    }
    // Copies of one saved VM would share the kernel's random state and its
    // clock, were they not reseeded and set at resume.
    if first.1 == second.1 || first.2 == second.2 {
        return Err(format!("two sandboxes share random state: {first:?} and {second:?}").into());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    for (date, _, _) in [&first, &second] {
        if now.abs_diff(*date) > 60 {
            return Err(format!("guest clock {date}, host clock {now}").into());
        }
    }
    nothing_left()
}

fn without_templates_every_sandbox_boots() -> Result<(), Failed> {
    let rootfs = Rootfs::new()?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "vm_templates = false\n")?;
    let mut c = Command::new(cli());
    c.env("BULKHEAD_CONFIG", &config)
        .env("BULKHEAD_LOG", "bulkhead=info")
        .args(["run", "--rootfs"])
        .arg(rootfs.path())
        .args(["--", "echo", "booted"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let r = wait_with_deadline(c.spawn()?, DEADLINE)?;
    expect(&r, 0, "run without templates")?;
    if r.stdout != "booted\n" || !r.stderr.contains("booting") || r.stderr.contains("resuming") {
        return Err(format!("stdout {:?}, stderr {}", r.stdout, r.stderr).into());
    }
    nothing_left()
}
