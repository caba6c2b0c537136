//! End-to-end: containerd runs containers in bulkhead microVMs through
//! `containerd-shim-bulkhead-v2`: `ctr run`, exit codes, exec, kill, a tty,
//! stdin, metrics, `binary://` and `file://` log URIs, a CRI pod of two
//! containers (with a resource update), and the faults (a killed VMM, a killed
//! shim, a guest kernel panic). Each test starts its own containerd (root,
//! state, sockets and config of its own) and checks that nothing is left
//! behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::containerd::{
    ContainerdOptions, PrivateContainerd, Runtime, CNI_CONFLIST, CNI_GATEWAY, CRI_NAMESPACE,
};
use bulkhead_tests::cri::{ContainerSpec, PodSpec};
use bulkhead_tests::oci_image::{write_image_archive, ImageConfig, LayerCompression};
use bulkhead_tests::process;
use common::processes_named;
use libtest_mimic::Failed;

const IMAGE: &str = "docker.io/library/bulkhead-busybox:test";
const PAUSE: &str = "registry.k8s.io/pause:bulkhead-test";
const RUNTIME: &str = "io.containerd.bulkhead.v2";
const DEADLINE: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    common::main("containerd", || {
        vec![
            common::trial("ctr_run_prints_and_exits_like_the_command", ctr_run),
            common::trial("stdin_is_piped_through", stdin_is_piped),
            common::trial("log_uris_binary_and_file", log_uris),
            common::trial("exec_kill_and_metrics_of_a_running_task", exec_kill_metrics),
            common::trial("sigkill_reports_137", sigkill_reports_137),
            common::trial("pause_freezes_and_resume_thaws", pause_and_resume),
            common::trial("tty_gives_a_terminal", tty_gives_a_terminal),
            common::trial(
                "exec_with_a_tty_takes_kubernetes_length_ids",
                tty_exec_with_long_ids,
            ),
            common::trial(
                "exec_runs_under_the_containers_seccomp_profile",
                exec_keeps_seccomp,
            ),
            common::trial("cri_pod_of_two_containers", cri_pod),
            common::trial(
                "cri_host_network_pod_is_refused_by_name",
                cri_host_network_refused,
            ),
            common::trial(
                "cri_pods_get_cni_addresses_and_reach_each_other_and_the_host",
                cri_pods_network,
            ),
            common::trial("ctr_run_cni_gives_the_guest_cnis_address", ctr_run_cni),
            common::trial("killed_vmm_ends_the_task_and_delete_cleans_up", killed_vmm),
            common::trial("killed_shim_is_cleaned_up_by_delete", killed_shim),
            common::trial(
                "guest_panic_ends_the_task_with_the_console_in_the_log",
                guest_panic,
            ),
        ]
    })
}

/// A private containerd with the bulkhead runtime, the images imported.
struct Setup {
    daemon: Option<PrivateContainerd>,
    _work: tempfile::TempDir,
}

impl Setup {
    fn new() -> Result<Setup, Failed> {
        let work = tempfile::tempdir()?;
        let (image, pause) = images(work.path())?;
        let mut opts = ContainerdOptions::new(PAUSE)
            .runtime(Runtime::bulkhead())
            .shim_dir(shim_dir())
            .env("BULKHEAD_LOG", "debug");
        // The snapshotter's overlay mounts need an upper directory that is not
        // itself on overlayfs (the emulated host's /tmp is): /run is a tmpfs.
        opts.temp_parent = Some(PathBuf::from("/run"));
        let daemon = PrivateContainerd::start(opts)?;
        daemon.import_image("default", &image)?;
        daemon.import_image(CRI_NAMESPACE, &image)?;
        daemon.import_image(CRI_NAMESPACE, &pause)?;
        Ok(Setup {
            daemon: Some(daemon),
            _work: work,
        })
    }

    fn daemon(&self) -> &PrivateContainerd {
        self.daemon.as_ref().expect("running")
    }

    fn ctr<const N: usize>(&self, args: [&str; N]) -> Command {
        self.daemon().ctr(args)
    }

    /// `ctr run --rm --runtime bulkhead IMAGE id ARGS...`.
    fn run(&self, id: &str, args: &[&str]) -> Command {
        let mut c = self.ctr(["run", "--rm", "--runtime", RUNTIME]);
        c.args([IMAGE, id]).args(args);
        c
    }

    /// Stops containerd and checks that no shim, VMM, virtiofsd, mount or
    /// sandbox directory is left.
    fn finish(mut self) -> Result<(), Failed> {
        let daemon = self.daemon.take().expect("running");
        let log = daemon.log_tail();
        daemon
            .stop()
            .map_err(|e| format!("stopping containerd: {e}\n{log}"))?;
        nothing_left()
    }
}

fn shim_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// A busybox image, and a "pause" image made of it for CRI pods.
fn images(dir: &Path) -> Result<(PathBuf, PathBuf), Failed> {
    let rootfs = dir.join("rootfs");
    common::busybox_rootfs(&rootfs)?;
    let (image, pause) = (dir.join("busybox.tar"), dir.join("pause.tar"));
    write_image_archive(
        &rootfs,
        IMAGE,
        &ImageConfig::default(),
        LayerCompression::Gzip,
        &image,
    )?;
    let config = ImageConfig {
        entrypoint: vec!["/bin/sleep".into(), "2147483647".into()],
        cmd: Vec::new(),
        ..ImageConfig::default()
    };
    write_image_archive(&rootfs, PAUSE, &config, LayerCompression::None, &pause)?;
    Ok((image, pause))
}

fn nothing_left() -> Result<(), Failed> {
    common::nothing_left(&["bulkhead-vmm", "virtiofsd", "containerd-shim-bulkhead-v2"])
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run_cmd(cmd: &mut Command) -> Result<Outcome, Failed> {
    let (status, out) = process::run_status(cmd, DEADLINE)?;
    Ok(Outcome {
        code: status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

fn expect(o: &Outcome, code: i32, what: &str, log: &str) -> Result<(), Failed> {
    if o.code != code {
        return Err(format!(
            "{what}: expected exit {code}, got {}\nstdout: {}\nstderr: {}\ncontainerd log:\n{log}",
            o.code, o.stdout, o.stderr
        )
        .into());
    }
    Ok(())
}

/// SIGKILLs task `id`, waits until it is STOPPED, and deletes it and its
/// container, each step expected to succeed.
fn kill_and_remove(s: &Setup, id: &str) -> Result<(), Failed> {
    let log = || s.daemon().log_tail();
    let kill = ["task", "kill", "--signal", "SIGKILL", id];
    expect(&run_cmd(&mut s.ctr(kill))?, 0, "ctr task kill", &log())?;
    let deadline = Instant::now() + DEADLINE;
    while !run_cmd(&mut s.ctr(["task", "ls"]))?
        .stdout
        .lines()
        .any(|l| l.starts_with(id) && l.contains("STOPPED"))
    {
        if Instant::now() > deadline {
            return Err(format!("task {id} did not stop after SIGKILL").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    expect(
        &run_cmd(&mut s.ctr(["task", "delete", id]))?,
        0,
        "ctr task delete",
        &log(),
    )?;
    expect(
        &run_cmd(&mut s.ctr(["container", "rm", id]))?,
        0,
        "ctr container rm",
        &log(),
    )?;
    Ok(())
}

/// Polls `ctr task ls` until task `id` is RUNNING.
fn wait_running(s: &Setup, id: &str) -> Result<(), Failed> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = run_cmd(&mut s.ctr(["task", "ls"]))?;
        if out
            .stdout
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING"))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("task {id} never ran:\n{}", out.stdout).into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ctr_run() -> Result<(), Failed> {
    let s = Setup::new()?;
    let o = run_cmd(&mut s.run("t1", &["echo", "hello"]))?;
    expect(&o, 0, "echo", &s.daemon().log_tail())?;
    if o.stdout != "hello\n" {
        return Err(format!("stdout {:?}, stderr {:?}", o.stdout, o.stderr).into());
    }
    let o = run_cmd(&mut s.run("t2", &["sh", "-c", "echo out; echo err >&2; exit 7"]))?;
    expect(&o, 7, "exit 7", &s.daemon().log_tail())?;
    if o.stdout != "out\n" || !o.stderr.contains("err") {
        return Err(format!("stdout {:?}, stderr {:?}", o.stdout, o.stderr).into());
    }
    s.finish()
}

fn stdin_is_piped() -> Result<(), Failed> {
    let s = Setup::new()?;
    let mut c = s.run("t3", &["sh", "-c", "wc -l"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    let input: String = (0..5000).map(|i| format!("line {i}\n")).collect();
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(input.as_bytes());
    });
    let status = process::wait_deadline(&mut child, Instant::now() + DEADLINE)
        .ok_or("ctr run with stdin did not end")?;
    let _ = writer.join();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("piped"), &mut out)?;
    if !status.success() || out.trim() != "5000" {
        return Err(format!("status {status}, counted {out:?}").into());
    }
    s.finish()
}

fn exec_kill_metrics() -> Result<(), Failed> {
    let s = Setup::new()?;
    let log = || s.daemon().log_tail();
    let mut c = s.ctr(["run", "-d", "--runtime", RUNTIME]);
    c.args([IMAGE, "t4", "sleep", "1000"]);
    expect(&run_cmd(&mut c)?, 0, "ctr run -d", &log())?;
    wait_running(&s, "t4")?;

    let mut c = s.ctr(["task", "exec", "--exec-id", "e1", "t4"]);
    c.args(["sh", "-c", "echo inside; exit 3"]);
    let o = run_cmd(&mut c)?;
    expect(&o, 3, "ctr task exec", &log())?;
    if o.stdout != "inside\n" {
        return Err(format!("exec printed {:?}", o.stdout).into());
    }

    let o = run_cmd(&mut s.ctr(["task", "metrics", "t4"]))?;
    expect(&o, 0, "ctr task metrics", &log())?;
    if !o.stdout.contains("memory") {
        return Err(format!("metrics without memory: {}", o.stdout).into());
    }
    let o = run_cmd(&mut s.ctr(["task", "ps", "t4"]))?;
    expect(&o, 0, "ctr task ps", &log())?;

    expect(
        &run_cmd(&mut s.ctr(["task", "kill", "--signal", "SIGTERM", "t4"]))?,
        0,
        "ctr task kill",
        &log(),
    )?;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let o = run_cmd(&mut s.ctr(["task", "ls"]))?;
        if o.stdout
            .lines()
            .any(|l| l.starts_with("t4") && l.contains("STOPPED"))
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("t4 did not stop after SIGTERM:\n{}", o.stdout).into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = run_cmd(&mut s.ctr(["task", "delete", "t4"]))?;
    expect(&o, 0, "ctr task delete", &log())?;
    if !o.stdout.contains("143") && !o.stderr.contains("143") {
        // `ctr task delete` prints the exit status when it is not zero.
        return Err(format!("SIGTERM should give 143: {} {}", o.stdout, o.stderr).into());
    }
    expect(
        &run_cmd(&mut s.ctr(["container", "rm", "t4"]))?,
        0,
        "ctr container rm",
        &log(),
    )?;
    s.finish()
}

/// `ctr task pause` freezes the container (its counter stops, the task is
/// PAUSED), `ctr task resume` thaws it (the counter goes on).
fn pause_and_resume() -> Result<(), Failed> {
    let s = Setup::new()?;
    let log = || s.daemon().log_tail();
    let out = s._work.path().join("out");
    std::fs::create_dir(&out)?;
    let counter = out.join("n");
    let read = || -> u64 {
        std::fs::read_to_string(&counter)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    };
    let grows_past = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if read() > n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    };
    let mount = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
    let mut c = s.ctr(["run", "-d", "--runtime", RUNTIME, "--mount", &mount]);
    c.args([
        IMAGE,
        "t7",
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo $i > /out/n; sleep 0.1; done",
    ]);
    expect(&run_cmd(&mut c)?, 0, "ctr run -d", &log())?;
    wait_running(&s, "t7")?;
    if !grows_past(1) {
        return Err(format!("the counter never ran: {:?}", read()).into());
    }
    expect(
        &run_cmd(&mut s.ctr(["task", "pause", "t7"]))?,
        0,
        "ctr task pause",
        &log(),
    )?;
    let listed = run_cmd(&mut s.ctr(["task", "ls"]))?.stdout;
    if !listed
        .lines()
        .any(|l| l.starts_with("t7") && l.contains("PAUSED"))
    {
        return Err(format!("t7 is not PAUSED:\n{listed}").into());
    }
    // Let a write in flight at the freeze land, then watch for a second.
    std::thread::sleep(Duration::from_millis(500));
    let frozen_at = read();
    std::thread::sleep(Duration::from_secs(1));
    if read() != frozen_at {
        return Err(format!(
            "the counter went on while paused: {frozen_at} -> {}",
            read()
        )
        .into());
    }
    expect(
        &run_cmd(&mut s.ctr(["task", "resume", "t7"]))?,
        0,
        "ctr task resume",
        &log(),
    )?;
    wait_running(&s, "t7")?;
    if !grows_past(frozen_at) {
        return Err(format!("the counter did not go on after resume: {}", read()).into());
    }
    kill_and_remove(&s, "t7")?;
    s.finish()
}

fn sigkill_reports_137() -> Result<(), Failed> {
    let s = Setup::new()?;
    let mut c = s.run("t5", &["sleep", "1000"]);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = c.spawn()?;
    wait_running(&s, "t5")?;
    let o = run_cmd(&mut s.ctr(["task", "kill", "--signal", "SIGKILL", "t5"]))?;
    expect(&o, 0, "ctr task kill -s SIGKILL", &s.daemon().log_tail())?;
    let status = process::wait_deadline(&mut child, Instant::now() + DEADLINE)
        .ok_or("ctr run did not end after SIGKILL")?;
    if status.code() != Some(137) {
        return Err(format!("ctr run ended with {status}, not 137").into());
    }
    s.finish()
}

fn tty_gives_a_terminal() -> Result<(), Failed> {
    let s = Setup::new()?;
    // `ctr run -t` wants a terminal of its own: `script` gives it one.
    let mut inner = vec!["ctr".to_owned(), "--address".to_owned()];
    inner.push(s.daemon().address().to_string_lossy().into_owned());
    inner.extend(
        [
            "run",
            "--rm",
            "-t",
            "--runtime",
            RUNTIME,
            IMAGE,
            "t6",
            "sh",
            "-c",
            "'[ -t 0 ] && [ -t 1 ] && echo is-a-tty'",
        ]
        .map(String::from),
    );
    let mut c = Command::new("script");
    c.args(["-qec", &inner.join(" "), "/dev/null"])
        .stdin(Stdio::null());
    let o = run_cmd(&mut c)?;
    expect(&o, 0, "ctr run -t", &s.daemon().log_tail())?;
    if !o.stdout.contains("is-a-tty") {
        return Err(format!("no terminal: {:?}", o.stdout).into());
    }
    s.finish()
}

/// `ctr task exec -t` into a container, both named with 64 hex digits as
/// Kubernetes names them: the console socket's path once passed the 108
/// bytes a Unix socket address holds.
fn tty_exec_with_long_ids() -> Result<(), Failed> {
    let s = Setup::new()?;
    let log = || s.daemon().log_tail();
    let (id, exec_id) = ("c0ffee".repeat(10) + "0123", "e0e0".repeat(16));
    let mut c = s.ctr(["run", "-d", "--runtime", RUNTIME]);
    c.args([IMAGE, &id, "sleep", "1000"]);
    expect(&run_cmd(&mut c)?, 0, "ctr run -d", &log())?;
    wait_running(&s, &id)?;
    let address = s.daemon().address().to_string_lossy().into_owned();
    let inner = format!(
        "ctr --address {address} task exec -t --exec-id {exec_id} {id} \
         sh -c '[ -t 0 ] && [ -t 1 ] && echo is-a-tty'"
    );
    let mut c = Command::new("script");
    c.args(["-qec", &inner, "/dev/null"]).stdin(Stdio::null());
    let o = run_cmd(&mut c)?;
    expect(&o, 0, "ctr task exec -t", &log())?;
    if !o.stdout.contains("is-a-tty") {
        return Err(format!("no terminal: {:?} {:?}", o.stdout, o.stderr).into());
    }
    kill_and_remove(&s, &id)?;
    s.finish()
}

/// A CRI container with a Localhost seccomp profile that forbids chmod:
/// processes exec'd into it (ExecSync, as `kubectl exec`) are filtered as
/// its first process is, though Kubernetes leaves no_new_privs off and
/// CAP_SYS_ADMIN out, and they do not keep CAP_SYS_ADMIN.
fn exec_keeps_seccomp() -> Result<(), Failed> {
    let s = Setup::new()?;
    let profile = s._work.path().join("no-chmod.json");
    std::fs::write(&profile, common::NO_CHMOD_PROFILE)?;
    let cri = s.daemon().cri()?;
    let pod = PodSpec::new("seccomp", "default", "uid-seccomp", "bulkhead");
    let pod_id = cri
        .run_pod_sandbox(&pod)
        .map_err(|e| format!("RunPodSandbox: {e}\n{}", s.daemon().log_tail()))?;
    // The first process reports on itself, then waits.
    let probe = "grep -E '^(Seccomp|NoNewPrivs|CapEff):' /proc/self/status; \
                 touch /tmp/f; chmod 600 /tmp/f && echo chmod-allowed || echo chmod-denied";
    let mut spec = ContainerSpec::new(
        "filtered",
        IMAGE,
        &[
            "sh",
            "-c",
            &format!(
                "({probe}) > /tmp/init.tmp; mv /tmp/init.tmp /tmp/init.txt; exec sleep 100000"
            ),
        ],
    );
    spec.seccomp_localhost = Some(profile);
    let id = cri
        .create_container(&pod_id, &pod, &spec)
        .map_err(|e| format!("CreateContainer: {e}\n{}", s.daemon().log_tail()))?;
    cri.start_container(&id)
        .map_err(|e| format!("StartContainer: {e}\n{}", s.daemon().log_tail()))?;
    let first = exec_until_ok(&cri, &id, &["cat", "/tmp/init.txt"])?;
    if !first.contains("chmod-denied") {
        return Err(format!("the profile does not hold for the first process: {first}").into());
    }
    let out = cri.exec_sync(&id, &["sh", "-c", probe], Duration::from_secs(60))?;
    let status = |key: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    if status("Seccomp:") != "2" || !out.stdout.contains("chmod-denied") {
        return Err(format!("the exec'd process is not filtered: {out:?}").into());
    }
    if status("NoNewPrivs:") != "0" {
        return Err(format!("the exec'd process should not have no_new_privs: {out:?}").into());
    }
    let cap_eff = u64::from_str_radix(&status("CapEff:"), 16)
        .map_err(|e| format!("CapEff in {out:?}: {e}"))?;
    const CAP_SYS_ADMIN: u32 = 21;
    if cap_eff & (1 << CAP_SYS_ADMIN) != 0 || cap_eff == 0 {
        return Err(format!("the exec'd process has CapEff {cap_eff:#x}: {out:?}").into());
    }
    cri.stop_pod_sandbox(&pod_id)?;
    cri.remove_pod_sandbox(&pod_id)?;
    s.finish()
}

/// A pod that shares the node's network namespace cannot run in a microVM:
/// RunPodSandbox fails at once, naming `hostNetwork`, and leaves nothing.
fn cri_host_network_refused() -> Result<(), Failed> {
    let s = Setup::new()?;
    let cri = s.daemon().cri()?;
    let mut pod = PodSpec::new("hostnet", "default", "uid-hostnet", "bulkhead");
    pod.host_network = true;
    let started = Instant::now();
    match cri.run_pod_sandbox(&pod) {
        Ok(id) => {
            let _ = cri.stop_pod_sandbox(&id);
            let _ = cri.remove_pod_sandbox(&id);
            return Err("a hostNetwork pod was started".into());
        }
        Err(e) if e.to_string().contains("hostNetwork") => {}
        Err(e) => {
            return Err(format!("RunPodSandbox failed without naming hostNetwork: {e}").into())
        }
    }
    println!("refused after {:.1} s", started.elapsed().as_secs_f64());
    let pods = cri.list_pod_sandboxes()?;
    if !pods.is_empty() {
        for p in &pods {
            let _ = cri.remove_pod_sandbox(&p.id);
        }
        return Err(format!("the refused pod left records: {pods:?}").into());
    }
    s.finish()
}

fn cri_pod() -> Result<(), Failed> {
    let s = Setup::new()?;
    let cri = s.daemon().cri()?;
    let pod = PodSpec::new("pod", "default", "uid-1", "bulkhead");
    let pod_id = cri
        .run_pod_sandbox(&pod)
        .map_err(|e| format!("RunPodSandbox: {e}\n{}", s.daemon().log_tail()))?;
    let web = ContainerSpec::new(
        "web",
        IMAGE,
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo pod-ok > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    );
    let client = ContainerSpec::new("client", IMAGE, &["sleep", "100000"]);
    let mut ids = Vec::new();
    for spec in [&web, &client] {
        let id = cri
            .create_container(&pod_id, &pod, spec)
            .map_err(|e| format!("CreateContainer: {e}\n{}", s.daemon().log_tail()))?;
        cri.start_container(&id)
            .map_err(|e| format!("StartContainer: {e}\n{}", s.daemon().log_tail()))?;
        ids.push(id);
    }
    for id in &ids {
        let out = cri.exec_sync(id, &["echo", "hi"], Duration::from_secs(60))?;
        if out.exit_code != 0 || out.stdout != "hi\n" {
            return Err(format!("ExecSync in {id}: {out:?}").into());
        }
    }
    // The two containers share the pod's network namespace in the guest.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cri.exec_sync(
            &ids[1],
            &["wget", "-qO-", "http://127.0.0.1:8080/index.html"],
            Duration::from_secs(30),
        )?;
        if out.exit_code == 0 && out.stdout == "pod-ok\n" {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("client cannot reach web over localhost: {out:?}").into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // CRI's UpdateContainerResources reaches the container's cgroup in the
    // guest (ctr 1.6 has no `task update`): the new limit shows in its metrics.
    let mut runtime = cri.runtime_service();
    let update = bulkhead_tests::cri::v1::UpdateContainerResourcesRequest {
        container_id: ids[1].clone(),
        linux: Some(bulkhead_tests::cri::v1::LinuxContainerResources {
            memory_limit_in_bytes: 209_715_200,
            ..Default::default()
        }),
        ..Default::default()
    };
    cri.block_on(runtime.update_container_resources(update))
        .map_err(|e| format!("UpdateContainerResources: {e}"))?;
    let mut c = s.ctr(["--namespace", CRI_NAMESPACE, "task", "metrics"]);
    c.arg(&ids[1]);
    let o = run_cmd(&mut c)?;
    if !o.stdout.contains("209715200") {
        return Err(format!(
            "the new limit is not in the metrics: {} {}",
            o.stdout, o.stderr
        )
        .into());
    }
    // One VM for the whole pod.
    let vms = processes_named("bulkhead-vmm");
    if vms.len() != 1 {
        return Err(format!("a pod should have one microVM, found {vms:?}").into());
    }
    cri.stop_pod_sandbox(&pod_id)?;
    cri.remove_pod_sandbox(&pod_id)?;
    s.finish()
}

/// Runs `cmd` in container `id` until it succeeds or a minute passes.
fn exec_until_ok(
    cri: &bulkhead_tests::cri::CriClient,
    id: &str,
    cmd: &[&str],
) -> Result<String, Failed> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = cri.exec_sync(id, cmd, Duration::from_secs(30))?;
        if out.exit_code == 0 {
            return Ok(out.stdout);
        }
        if Instant::now() > deadline {
            return Err(format!("{cmd:?} in {id} kept failing: {out:?}").into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Two pods on the test bridge: each gets the address CNI gave its pod
/// namespace inside its VM, the client pod reaches the server pod by that
/// address, and both reach a server on the host through the bridge.
fn cri_pods_network() -> Result<(), Failed> {
    let s = Setup::new()?;
    let cri = s.daemon().cri()?;
    let served = tempfile::tempdir()?;
    std::fs::write(served.path().join("host.txt"), "from-the-host\n")?;
    let mut host_server = Command::new("/bin/busybox")
        .args(["httpd", "-f", "-p", "0.0.0.0:18090", "-h"])
        .arg(served.path())
        .spawn()?;
    let result = (|| -> Result<(), Failed> {
        let server_pod = PodSpec::new("server", "default", "uid-server", "bulkhead");
        let client_pod = PodSpec::new("client", "default", "uid-client", "bulkhead");
        let mut pods = Vec::new();
        for pod in [&server_pod, &client_pod] {
            pods.push(
                cri.run_pod_sandbox(pod)
                    .map_err(|e| format!("RunPodSandbox: {e}\n{}", s.daemon().log_tail()))?,
            );
        }
        let web = ContainerSpec::new(
            "web",
            IMAGE,
            &["sh", "-c", "mkdir -p /www && echo pod-to-pod > /www/index.html && exec httpd -f -p 8080 -h /www"],
        );
        let client = ContainerSpec::new("client", IMAGE, &["sleep", "100000"]);
        let web_id = cri.create_container(&pods[0], &server_pod, &web)?;
        cri.start_container(&web_id)?;
        let client_id = cri.create_container(&pods[1], &client_pod, &client)?;
        cri.start_container(&client_id)?;
        let ip = cri
            .pod_sandbox_status(&pods[0])?
            .network
            .map(|n| n.ip)
            .filter(|ip| ip.starts_with("10.99."))
            .ok_or("the server pod has no address on the test bridge")?;
        let shown = exec_until_ok(&cri, &web_id, &["ip", "-4", "addr", "show", "eth0"])?;
        if !shown.contains(&format!("inet {ip}/")) {
            return Err(
                format!("the guest's eth0 does not have CNI's address {ip}:\n{shown}").into(),
            );
        }
        let url = format!("http://{ip}:8080/index.html");
        let got = exec_until_ok(&cri, &client_id, &["wget", "-qO-", &url])?;
        if got != "pod-to-pod\n" {
            return Err(format!("pod to pod: {got:?}").into());
        }
        let url = format!("http://{CNI_GATEWAY}:18090/host.txt");
        let got = exec_until_ok(&cri, &client_id, &["wget", "-qO-", &url])?;
        if got != "from-the-host\n" {
            return Err(format!("pod to host: {got:?}").into());
        }
        for pod in &pods {
            cri.stop_pod_sandbox(pod)?;
            cri.remove_pod_sandbox(pod)?;
        }
        Ok(())
    })();
    let _ = host_server.kill();
    let _ = host_server.wait();
    result?;
    s.finish()?;
    no_leases()
}

/// No address of the test bridge is still leased.
fn no_leases() -> Result<(), Failed> {
    let dir = Path::new("/var/lib/cni/networks/bulkhead-test");
    let held: Vec<String> = common::listing(dir)
        .into_iter()
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect();
    if held.is_empty() {
        Ok(())
    } else {
        Err(format!("leases left in {}: {held:?}", dir.display()).into())
    }
}

/// `ctr run --cni` sets up CNI in /proc/PID/ns/net of the task after create
/// (with the config in /etc/cni/net.d and the plugins in /opt/cni/bin, which
/// ctr 1.6 does not let us change): the task's pid is bulkhead-vmm's, which
/// runs in the sandbox's namespace, so the guest gets CNI's address.
fn ctr_run_cni() -> Result<(), Failed> {
    let conf_dir = Path::new("/etc/cni/net.d");
    let conf = conf_dir.join("10-bulkhead-test.conflist");
    let bin_dir = Path::new("/opt/cni/bin");
    if !bulkhead_tests::kvm::inside_emulated_host() {
        eprintln!(
            "SKIPPED ctr_run_cni: it writes /etc/cni/net.d and /opt/cni/bin, which it does only \
             in the emulated host (a throw-away root), never on this machine"
        );
        return Ok(());
    }
    std::fs::create_dir_all(conf_dir)?;
    std::fs::write(&conf, CNI_CONFLIST)?;
    if !bin_dir.exists() {
        std::fs::create_dir_all("/opt/cni")?;
        std::os::unix::fs::symlink("/usr/lib/cni", bin_dir)?;
    }
    let s = Setup::new()?;
    let mut c = s.ctr(["run", "--rm", "--cni", "--runtime", RUNTIME]);
    c.args([IMAGE, "cni1", "sh", "-c", "ip -4 addr show eth0; ip route"]);
    let o = run_cmd(&mut c)?;
    expect(&o, 0, "ctr run --cni", &s.daemon().log_tail())?;
    if !o.stdout.contains("inet 10.99.")
        || !o.stdout.contains(&format!("default via {CNI_GATEWAY}"))
    {
        return Err(format!(
            "the guest did not get CNI's address and route:\n{}",
            o.stdout
        )
        .into());
    }
    s.finish()?;
    let _ = std::fs::remove_file(&conf);
    no_leases()
}

fn killed_vmm() -> Result<(), Failed> {
    let s = Setup::new()?;
    let mut c = s.run("t7", &["sleep", "1000"]);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = c.spawn()?;
    wait_running(&s, "t7")?;
    for pid in processes_named("bulkhead-vmm") {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let status = process::wait_deadline(&mut child, Instant::now() + DEADLINE)
        .ok_or("ctr run did not end after its VMM was killed")?;
    if status.success() {
        return Err("the task of a killed VM exited with success".into());
    }
    s.finish()
}

fn killed_shim() -> Result<(), Failed> {
    let s = Setup::new()?;
    let mut c = s.ctr(["run", "-d", "--runtime", RUNTIME]);
    c.args([IMAGE, "t8", "sleep", "1000"]);
    expect(&run_cmd(&mut c)?, 0, "ctr run -d", &s.daemon().log_tail())?;
    wait_running(&s, "t8")?;
    for pid in processes_named("containerd-shim-bulkhead-v2") {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    // containerd notices the shim is gone and runs `shim delete`, which must
    // stop the VM and remove the sandbox.
    let deadline = Instant::now() + DEADLINE;
    while !processes_named("bulkhead-vmm").is_empty() || !common::run_dir_leftovers().is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "after the shim was killed: VMMs {:?}, /run/bulkhead {:?}\n{}",
                processes_named("bulkhead-vmm"),
                common::run_dir_leftovers(),
                s.daemon().log_tail()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = run_cmd(&mut s.ctr(["task", "delete", "t8"]));
    let _ = run_cmd(&mut s.ctr(["container", "rm", "t8"]));
    s.finish()
}

fn guest_panic() -> Result<(), Failed> {
    let s = Setup::new()?;
    let mut c = s.ctr(["run", "--rm", "--privileged", "--runtime", RUNTIME]);
    c.args([
        IMAGE,
        "t9",
        "sh",
        "-c",
        "sleep 1; echo c > /proc/sysrq-trigger; sleep 100",
    ]);
    let o = run_cmd(&mut c)?;
    if o.code == 0 {
        return Err(format!("a task whose guest panicked exited 0: {}", o.stderr).into());
    }
    // The shim logs the VMM's report with the guest console's last lines.
    let log = s.daemon().log();
    if !log.contains("Kernel panic") && !log.contains("sysrq") {
        return Err(format!(
            "no guest console in the shim's log:\n{}",
            s.daemon().log_tail()
        )
        .into());
    }
    s.finish()
}

fn log_uris() -> Result<(), Failed> {
    let s = Setup::new()?;
    let dir = tempfile::tempdir()?;
    // containerd's logging-binary protocol: stdout on fd 3, stderr on fd 4,
    // fd 5 closed once ready; query pairs become arguments.
    let logger = dir.path().join("logger");
    std::fs::write(
        &logger,
        "#!/bin/sh\nexec 5>&-\ncat <&3 > \"$2.out\" &\ncat <&4 > \"$2.err\"\nwait\n",
    )?;
    std::fs::set_permissions(&logger, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let base = dir.path().join("t10");
    let uri = format!("binary://{}?path={}", logger.display(), base.display());
    let mut c = s.ctr(["run", "--rm", "--log-uri", &uri, "--runtime", RUNTIME]);
    c.args([IMAGE, "t10", "sh", "-c", "echo to-log; echo to-err >&2"]);
    expect(
        &run_cmd(&mut c)?,
        0,
        "ctr run --log-uri binary://",
        &s.daemon().log_tail(),
    )?;
    let out = std::fs::read_to_string(base.with_extension("out")).unwrap_or_default();
    let err = std::fs::read_to_string(base.with_extension("err")).unwrap_or_default();
    if out != "to-log\n" || err != "to-err\n" {
        return Err(format!("the logger got stdout {out:?} and stderr {err:?}").into());
    }
    let file = dir.path().join("t11.log");
    let uri = format!("file://{}", file.display());
    let mut c = s.ctr(["run", "--rm", "--log-uri", &uri, "--runtime", RUNTIME]);
    c.args([IMAGE, "t11", "echo", "to-file"]);
    expect(
        &run_cmd(&mut c)?,
        0,
        "ctr run --log-uri file://",
        &s.daemon().log_tail(),
    )?;
    let logged = std::fs::read_to_string(&file).unwrap_or_default();
    if !logged.contains("to-file") {
        return Err(format!("the log file has {logged:?}").into());
    }
    s.finish()
}
