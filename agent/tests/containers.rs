//! Real containers from a busybox rootfs, made with the agent's container core.
//!
//! They need root and a cgroup v2 hierarchy at /sys/fs/cgroup with the memory
//! controller (the guest's setup); elsewhere each test prints a loud SKIPPED line
//! and passes. On the development machines (cgroup v1 hybrid) run them in the
//! emulated host with `target/debug/testhost-run -- <test executable>` (commands in
//! agent/README.md).

use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bulkhead_agent::{init, Container, CreateOptions, Stdio};
use oci_spec::runtime::{
    LinuxBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, LinuxSeccompAction,
    LinuxSeccompBuilder, LinuxSyscallBuilder, ProcessBuilder, Spec,
};

/// Whether this machine can run containers the way the guest does.
fn can_run() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let root = nix::unistd::Uid::effective().is_root();
        let controllers =
            fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
        let ok = root
            && controllers.split_whitespace().any(|c| c == "memory")
            && Path::new("/bin/busybox").exists();
        if ok {
            // What PID 1 does in the guest.
            init::enable_cgroup_controllers(Path::new("/sys/fs/cgroup")).unwrap();
        }
        ok
    })
}

macro_rules! require_env {
    () => {
        if !can_run() {
            // `cargo xtask test` runs these again where they can run, and
            // there a skip is a failure.
            if std::env::var_os("BULKHEAD_AGENT_TESTS_REQUIRED").is_some() {
                panic!(
                    "needs root, cgroup v2 (with memory) and /bin/busybox, which this host lacks"
                );
            }
            // Straight to fd 2: the test harness captures eprintln!.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"\n!!!!!!!! SKIPPED: needs root and cgroup v2 (with memory) at \
                  /sys/fs/cgroup, and /bin/busybox !!!!!!!!\n",
            );
            return;
        }
    };
}

/// A busybox rootfs (static busybox + its applet links) and a state directory.
struct Fixture {
    _dir: tempfile::TempDir,
    rootfs: PathBuf,
    run_dir: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        for sub in ["bin", "proc", "sys", "dev", "tmp", "etc", "work"] {
            fs::create_dir_all(rootfs.join(sub)).unwrap();
        }
        fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        let list = std::process::Command::new("/bin/busybox")
            .arg("--list")
            .output()
            .unwrap();
        for applet in String::from_utf8(list.stdout).unwrap().lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
            }
        }
        let run_dir = dir.path().join("run");
        Fixture {
            _dir: dir,
            rootfs,
            run_dir,
        }
    }

    fn options(&self, id: &str, spec: Spec, stdio: Stdio) -> CreateOptions {
        CreateOptions {
            id: id.to_string(),
            spec,
            rootfs: self.rootfs.clone(),
            stdio,
            run_dir: self.run_dir.clone(),
            spare_netns: None,
        }
    }
}

/// The runc-like default spec running `args`, with a writable rootfs (Docker's
/// default; runc's template makes it read-only).
fn spec(args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    let mut root = spec.root().clone().unwrap();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    let mut process = spec.process().clone().unwrap();
    process.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    spec.set_process(Some(process));
    spec
}

/// Stdio with stdout and stderr on pipes; returns their read ends.
fn piped() -> (Stdio, OwnedFd, OwnedFd) {
    let (out_r, out_w) = nix::unistd::pipe().unwrap();
    let (err_r, err_w) = nix::unistd::pipe().unwrap();
    let stdio = Stdio::Fds {
        stdin: None,
        stdout: Some(out_w),
        stderr: Some(err_w),
    };
    (stdio, out_r, err_r)
}

fn read_all(fd: OwnedFd) -> String {
    let mut text = String::new();
    fs::File::from(fd).read_to_string(&mut text).unwrap();
    text
}

/// Creates, starts and waits for a container; returns code, stdout, stderr.
fn run(fx: &Fixture, id: &str, spec: Spec) -> (i32, String, String, Container) {
    let (stdio, out, err) = piped();
    let c = Container::create(fx.options(id, spec, stdio)).unwrap();
    c.start().unwrap();
    let status = c
        .wait_timeout(Duration::from_secs(120))
        .expect("container did not end");
    (status.code(), read_all(out), read_all(err), c)
}

#[test]
fn echo_hello_through_a_pipe() {
    require_env!();
    let fx = Fixture::new();
    let (code, out, err, c) = run(&fx, "echo", spec(&["echo", "hello"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "hello\n", ""));
    let state = fx.run_dir.join("containers/echo");
    let cgroup = c.cgroup().dir().to_path_buf();
    assert!(state.exists() && cgroup.exists());
    c.delete(false).unwrap();
    assert!(!state.exists(), "state dir left behind");
    assert!(!cgroup.exists(), "cgroup left behind");
    assert!(!fx.run_dir.join("bundles/echo").exists());
}

#[test]
fn stdout_and_stderr_are_separate_and_exit_code_is_kept() {
    require_env!();
    let fx = Fixture::new();
    let (code, out, err, c) = run(
        &fx,
        "exit7",
        spec(&["sh", "-c", "echo out; echo err >&2; exit 7"]),
    );
    assert_eq!((code, out.as_str(), err.as_str()), (7, "out\n", "err\n"));
    c.delete(false).unwrap();
}

/// Like runc: the command is PID 1 of its pid namespace, and the kernel delivers
/// to a namespace init only the signals it handles (plus SIGKILL), so busybox
/// `sleep` ignores SIGTERM there. SIGKILL gives 137.
#[test]
fn sigterm_to_a_pid_namespace_init_without_handler_is_ignored() {
    require_env!();
    let fx = Fixture::new();
    let c = Container::create(fx.options("sleep", spec(&["sleep", "100"]), Stdio::Null)).unwrap();
    c.start().unwrap();
    assert!(c.wait_timeout(Duration::from_millis(300)).is_none());
    assert!(c.pids().unwrap().contains(&c.pid().as_raw()));
    c.signal(libc::SIGTERM, false).unwrap();
    assert!(c.wait_timeout(Duration::from_secs(2)).is_none());
    c.signal(libc::SIGKILL, false).unwrap();
    assert_eq!(c.wait_timeout(Duration::from_secs(30)).unwrap().code(), 137);
    c.delete(false).unwrap();
}

#[test]
fn sigterm_to_a_shell_with_a_trap_in_a_pid_namespace() {
    require_env!();
    let fx = Fixture::new();
    // A handler makes SIGTERM deliverable; the shell re-raises it on itself.
    let spec = spec(&[
        "sh",
        "-c",
        "trap 'trap - TERM; kill -TERM $$' TERM; sleep 100 & wait",
    ]);
    let c = Container::create(fx.options("trap", spec, Stdio::Null)).unwrap();
    c.start().unwrap();
    assert!(c.wait_timeout(Duration::from_millis(500)).is_none());
    c.signal(libc::SIGTERM, false).unwrap();
    let status = c.wait_timeout(Duration::from_secs(30)).expect("not ended");
    // The shell's `wait` returns 128+15 when the trapped signal arrives, and the
    // script ends with that status.
    assert_eq!(status.code(), 143, "got {status}");
    c.delete(false).unwrap();
}

#[test]
fn sigterm_to_a_process_that_is_not_pid1_gives_143() {
    require_env!();
    let fx = Fixture::new();
    // Without a pid namespace the process is an ordinary one and SIGTERM kills it.
    let mut spec = spec(&["sleep", "100"]);
    let mut linux = spec.linux().clone().unwrap();
    let namespaces = linux
        .namespaces()
        .clone()
        .unwrap()
        .into_iter()
        .filter(|ns| ns.typ() != oci_spec::runtime::LinuxNamespaceType::Pid)
        .collect();
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
    let c = Container::create(fx.options("term", spec, Stdio::Null)).unwrap();
    c.start().unwrap();
    assert!(c.wait_timeout(Duration::from_millis(300)).is_none());
    c.signal(libc::SIGTERM, false).unwrap();
    let status = c.wait_timeout(Duration::from_secs(30)).expect("not killed");
    assert_eq!(status.code(), 143, "got {status}");
    c.delete(false).unwrap();
}

#[test]
fn memory_limit_oom_kill_is_detected() {
    require_env!();
    let fx = Fixture::new();
    let mut spec = spec(&[
        "sh",
        "-c",
        "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo ${#x}",
    ]);
    let limit = 32 * 1024 * 1024;
    let resources = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(limit)
                .swap(limit)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let mut linux = spec.linux().clone().unwrap();
    linux.set_resources(Some(resources));
    spec.set_linux(Some(linux));
    let (code, out, _err, c) = run(&fx, "oom", spec);
    assert_ne!(code, 0, "the allocation succeeded: {out}");
    let kills = c.oom_kills().unwrap();
    assert!(kills >= 1, "no OOM kill counted (exit {code})");
    assert_eq!(
        c.wait_for_oom(0, Duration::from_secs(1)).unwrap(),
        kills,
        "wait_for_oom sees the count"
    );
    assert_eq!(c.stats().unwrap().memory.limit, Some(limit as u64));
    c.delete(false).unwrap();
}

#[test]
fn read_only_rootfs_refuses_writes() {
    require_env!();
    let fx = Fixture::new();
    let mut spec = spec(&["sh", "-c", "echo x > /work/file"]);
    let mut root = spec.root().clone().unwrap();
    root.set_readonly(Some(true));
    spec.set_root(Some(root));
    let (code, _out, err, c) = run(&fx, "ro", spec);
    assert_ne!(code, 0);
    assert!(err.contains("Read-only file system"), "stderr: {err}");
    assert!(!fx.rootfs.join("work/file").exists());
    c.delete(false).unwrap();
}

#[test]
fn writable_rootfs_keeps_files() {
    require_env!();
    let fx = Fixture::new();
    let (code, _out, err, c) = run(&fx, "rw", spec(&["sh", "-c", "echo x > /work/file"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        fs::read_to_string(fx.rootfs.join("work/file")).unwrap(),
        "x\n"
    );
    c.delete(false).unwrap();
}

#[test]
fn env_and_cwd_are_honoured() {
    require_env!();
    let fx = Fixture::new();
    let mut spec = spec(&["sh", "-c", "echo $FOO; pwd; hostname"]);
    let mut process = spec.process().clone().unwrap();
    process.set_env(Some(vec!["PATH=/bin".into(), "FOO=bar baz".into()]));
    process.set_cwd("/tmp".into());
    spec.set_process(Some(process));
    spec.set_hostname(Some("box1".into()));
    let (code, out, err, c) = run(&fx, "env", spec);
    assert_eq!((code, out.as_str()), (0, "bar baz\n/tmp\nbox1\n"), "{err}");
    c.delete(false).unwrap();
}

#[test]
fn command_not_found_is_reported_as_127() {
    require_env!();
    let fx = Fixture::new();
    // libcontainer checks the executable before exec: create fails, naming it.
    let err = Container::create(fx.options("nocmd", spec(&["nope"]), Stdio::Null)).unwrap_err();
    assert!(
        matches!(err, bulkhead_agent::ContainerError::CommandNotFound { .. }),
        "{err:?}"
    );
    assert_eq!(err.exit_code(), 127);
    assert_eq!(
        err.to_string(),
        "container nocmd: executable 'nope' not found in $PATH"
    );
    assert!(!fx.run_dir.join("containers/nocmd").exists());
    assert!(!fx.run_dir.join("bundles/nocmd").exists());
    assert!(!Path::new("/sys/fs/cgroup/bulkhead/nocmd").exists());
}

#[test]
fn seccomp_profile_is_enforced() {
    require_env!();
    let fx = Fixture::new();
    let mut spec = spec(&["sh", "-c", "mkdir /tmp/d && echo made"]);
    let seccomp = LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .syscalls(vec![LinuxSyscallBuilder::default()
            .names(vec!["mkdir".to_string(), "mkdirat".to_string()])
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(1u32)
            .build()
            .unwrap()])
        .build()
        .unwrap();
    let mut linux = spec
        .linux()
        .clone()
        .unwrap_or_else(|| LinuxBuilder::default().build().unwrap());
    linux.set_seccomp(Some(seccomp));
    spec.set_linux(Some(linux));
    let (code, out, err, c) = run(&fx, "seccomp", spec);
    assert_ne!(code, 0, "mkdir was allowed: {out}");
    assert!(err.contains("Operation not permitted"), "stderr: {err}");
    c.delete(false).unwrap();
}

#[test]
fn exec_into_a_running_container_then_stats_update_and_kill_all() {
    require_env!();
    let fx = Fixture::new();
    let mut spec = spec(&["sleep", "1000"]);
    let mut process = spec.process().clone().unwrap();
    process.set_env(Some(vec!["PATH=/bin".into(), "WHO=init".into()]));
    spec.set_process(Some(process));
    let c = Container::create(fx.options("execbox", spec, Stdio::Null)).unwrap();
    c.start().unwrap();

    let (stdio, out, err) = piped();
    let process = ProcessBuilder::default()
        .args(vec![
            "sh".into(),
            "-c".into(),
            "echo in $(pwd) as $WHO $(hostname); cat /proc/1/cmdline; exit 3".into(),
        ])
        .env(vec!["PATH=/bin".into(), "WHO=exec".into()])
        .cwd("/tmp")
        .build()
        .unwrap();
    let exec = c.exec("e1", process, stdio).unwrap();
    let status = exec.process.wait_timeout(Duration::from_secs(60)).unwrap();
    let (out, err) = (read_all(out), read_all(err));
    assert_eq!(status.code(), 3, "stderr: {err}");
    assert_eq!(out, "in /tmp as exec youki\nsleep\u{0}1000\u{0}");
    assert!(c.exec_process("e1").is_some());

    let stats = c.stats().unwrap();
    assert!(stats.pids.current >= 1, "{stats:?}");
    assert!(stats.memory.current > 0, "{stats:?}");
    assert!(stats.cpu.usage_usec > 0, "{stats:?}");

    let resources = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(64 << 20)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    c.update(&resources).unwrap();
    assert_eq!(c.stats().unwrap().memory.limit, Some(64 << 20));

    c.signal(libc::SIGKILL, true).unwrap();
    let status = c.wait_timeout(Duration::from_secs(30)).expect("not killed");
    assert_eq!(status.code(), 137);
    c.delete(false).unwrap();
}

#[test]
fn terminal_gives_a_pty() {
    require_env!();
    let fx = Fixture::new();
    let c = Container::create(fx.options(
        "tty",
        spec(&["sh", "-c", "tty; stty size; echo done"]),
        Stdio::Terminal,
    ))
    .unwrap();
    let master = c.take_terminal().expect("no pty master");
    c.start().unwrap();
    let status = c.wait_timeout(Duration::from_secs(60)).unwrap();
    let mut text = Vec::new();
    let mut file = fs::File::from(master);
    let mut buf = [0u8; 4096];
    // A pty master reads EIO once the slave side is gone.
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&text);
    assert_eq!(status.code(), 0, "{text}");
    assert!(text.contains("/dev/pts/0\r\n"), "{text:?}");
    assert!(text.contains("done\r\n"), "{text:?}");
    c.delete(false).unwrap();
}

#[test]
fn delete_refuses_a_running_container_unless_forced() {
    require_env!();
    let fx = Fixture::new();
    let c = Container::create(fx.options("busy", spec(&["sleep", "1000"]), Stdio::Null)).unwrap();
    c.start().unwrap();
    let cgroup = c.cgroup().dir().to_path_buf();
    let err = c.delete(false).unwrap_err();
    assert!(
        err.to_string().contains("container busy: still running"),
        "{err}"
    );
    assert!(c.init().is_running());
    c.delete(true).unwrap();
    assert_eq!(c.wait().code(), 137);
    assert!(!cgroup.exists());
    assert!(!fx.run_dir.join("containers/busy").exists());
}

#[test]
fn bad_requests_name_the_container() {
    require_env!();
    let fx = Fixture::new();
    let err = Container::create(fx.options("bad/id", spec(&["true"]), Stdio::Null)).unwrap_err();
    assert!(err.to_string().contains("invalid container id"), "{err}");
    let err = Container::create(fx.options("empty", spec(&[]), Stdio::Null)).unwrap_err();
    assert_eq!(err.to_string(), "container empty: empty command");
    let mut opts = fx.options("noroot", spec(&["true"]), Stdio::Null);
    opts.rootfs = fx.rootfs.join("missing");
    let err = Container::create(opts).unwrap_err();
    assert!(
        err.to_string().starts_with("container noroot: rootfs"),
        "{err}"
    );
}
