//! End-to-end: `bulkhead-runtime` in place of runc. Debian's podman (with
//! conmon and CNI) runs containers through it, and the runtime's own command
//! line is driven the way go-runc drives runc: each workload must run in the
//! guest kernel, and nothing may be left behind.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use bulkhead_tests::oci_image::{write_image_archive, ImageConfig, LayerCompression};
use bulkhead_tests::process;
use libtest_mimic::Failed;

/// Generous: a sandbox boots in seconds under emulation.
const DEADLINE: Duration = Duration::from_secs(240);
const IMAGE: &str = "localhost/bulkhead-busybox:test";

fn main() -> ExitCode {
    // One emulated vCPU: podman, conmon and the microVM's vCPU on two
    // emulated CPUs wedged the emulated host's own kernel (a stack overflow
    // in its page-fault path, then soft lockups) twice in a row, which one
    // vCPU has not done.
    common::main_with_host_vcpus("oci_runtime", Some(1), || {
        vec![
            common::trial(
                "podman_run_prints_the_guest_kernels_output_and_exit_code",
                podman_run_output_and_exit_code,
            ),
            common::trial("podman_run_i_feeds_stdin", podman_run_i_feeds_stdin),
            common::trial(
                "podman_run_t_gives_a_terminal",
                podman_run_t_gives_a_terminal,
            ),
            common::trial(
                "podman_detached_logs_exec_stop_rm",
                podman_detached_logs_exec_stop_rm,
            ),
            common::trial("podman_publishes_a_port", podman_publishes_a_port),
            common::trial(
                "docker_20_10_runs_in_a_microvm_on_its_bridge",
                docker_runs_in_a_microvm_on_its_bridge,
            ),
            common::trial(
                "docker_20_10_detached_publish_exec_rm",
                docker_detached_publish_exec_rm,
            ),
            common::trial(
                "buildah_runs_a_containerfiles_run_steps_in_microvms",
                buildah_runs_run_steps_in_microvms,
            ),
            common::trial(
                "containerds_runc_shim_runs_it_as_runc_binary",
                containerds_runc_shim_runs_it_as_runc_binary,
            ),
            common::trial(
                "runtime_lifecycle_as_go_runc_drives_it",
                runtime_lifecycle_as_go_runc_drives_it,
            ),
            common::trial(
                "runtime_refuses_bad_input_and_leaves_nothing",
                runtime_refuses_bad_input_and_leaves_nothing,
            ),
        ]
    })
}

/// The runtime binary: $BULKHEAD_RUNTIME, else the one beside the CLI.
fn runtime_binary() -> PathBuf {
    std::env::var_os("BULKHEAD_RUNTIME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            common::bulkhead_cli()
                .parent()
                .expect("target dir")
                .join("bulkhead-runtime")
        })
}

/// A private podman: its own storage and run directories (on /run, a tmpfs
/// overlayfs can stack on), the busybox image loaded, and
/// [`runtime_wrapper`] as its runtime.
struct Podman {
    dir: tempfile::TempDir,
    wrapper: PathBuf,
    state_root: PathBuf,
}

impl Podman {
    fn new() -> Result<Podman, Failed> {
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-podman-")
            .tempdir_in("/run")?;
        let state_root = dir.path().join("runtime-state");
        let wrapper = runtime_wrapper(
            dir.path(),
            &format!(
                "--root {}",
                bulkhead_tests::shell::quote(&state_root.to_string_lossy())
            ),
        )?;
        let podman = Podman {
            dir,
            wrapper,
            state_root,
        };
        let rootfs = podman.dir.path().join("image-rootfs");
        common::busybox_rootfs(&rootfs)?;
        std::fs::create_dir_all(rootfs.join("www"))?;
        std::fs::write(rootfs.join("www/index.html"), "served from the microVM\n")?;
        let archive = podman.dir.path().join("image.tar");
        write_image_archive(
            &rootfs,
            IMAGE,
            &ImageConfig::default(),
            LayerCompression::Gzip,
            &archive,
        )?;
        let mut load = podman.cmd();
        load.arg("load").arg("-i").arg(&archive);
        process::run(&mut load, DEADLINE)?;
        Ok(podman)
    }

    /// `podman` with our storage and runtime.
    fn cmd(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .arg("--runtime")
            .arg(&self.wrapper)
            .arg("--cgroup-manager")
            .arg("cgroupfs")
            .arg("--events-backend")
            .arg("file")
            .arg("--tmpdir")
            .arg(d.join("tmp"));
        c
    }

    fn run(&self, args: &[&str]) -> Result<(i32, process::Output), Failed> {
        let mut c = self.cmd();
        c.args(args);
        let (status, out) = process::run_status(&mut c, DEADLINE)?;
        Ok((status.code().unwrap_or(-1), out))
    }

    /// Removes every container, then checks nothing is left: no VM,
    /// virtiofsd, conmon, run directory, mount, veth or runtime state.
    fn finish(self) -> Result<(), Failed> {
        let _ = self.run(&["rm", "-af", "-t", "0"]);
        let _ = self.run(&["system", "reset", "-f"]);
        nothing_left_with_state(&["bulkhead-vmm", "virtiofsd", "conmon"], &self.state_root)
    }
}

/// `nothing_left`, allowing a few seconds for the engine's asynchronous
/// cleanup (conmon's exit command) to finish.
fn wait_for_nothing_left(processes: &[&str]) -> Result<(), Failed> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match common::nothing_left(processes) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// [`wait_for_nothing_left`], and no runtime state left under `state`.
fn nothing_left_with_state(processes: &[&str], state: &Path) -> Result<(), Failed> {
    wait_for_nothing_left(processes)?;
    let left = common::listing(state);
    if !left.is_empty() {
        return Err(format!("runtime state left under {}: {left:?}", state.display()).into());
    }
    Ok(())
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Fails unless `kernel` (a workload's `uname -r`) is not the host's.
fn ran_in_guest(kernel: &str) -> Result<(), Failed> {
    let kernel = kernel.trim();
    if kernel.is_empty() || kernel == host_kernel() {
        return Err(format!(
            "the workload's kernel is {kernel:?}, the host's is {:?}: it did not run in a microVM",
            host_kernel()
        )
        .into());
    }
    Ok(())
}

fn podman_run_output_and_exit_code() -> Result<(), Failed> {
    let podman = Podman::new()?;
    let (code, out) = podman.run(&[
        "run",
        "--rm",
        IMAGE,
        "sh",
        "-c",
        "uname -r; echo to-stderr >&2; exit 7",
    ])?;
    if code != 7 {
        return Err(format!("exit code {code}, want 7; stderr:\n{}", out.stderr).into());
    }
    ran_in_guest(&out.stdout)?;
    if !out.stderr.contains("to-stderr") || out.stdout.contains("to-stderr") {
        return Err(format!("stdout and stderr mixed: {out:?}").into());
    }
    // A command that is not there: 127 as under runc.
    let (code, out) = podman.run(&["run", "--rm", IMAGE, "/no/such/command"])?;
    if code != 127 && code != 126 {
        return Err(format!("missing command exited {code}; stderr:\n{}", out.stderr).into());
    }
    podman.finish()
}

fn podman_run_i_feeds_stdin() -> Result<(), Failed> {
    let podman = Podman::new()?;
    let mut c = podman.cmd();
    c.args(["run", "--rm", "-i", IMAGE, "sh", "-c", "wc -c; uname -r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(&[b'x'; 100_000])?;
    drop(stdin);
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)?;
    let status = process::wait_deadline(&mut child, Instant::now() + DEADLINE)
        .ok_or("podman run -i did not end")?;
    let mut lines = stdout.lines();
    if lines.next().map(str::trim) != Some("100000") || !status.success() {
        return Err(format!("stdin not fed whole: {status}, stdout {stdout:?}").into());
    }
    ran_in_guest(lines.next().unwrap_or(""))?;
    podman.finish()
}

fn podman_run_t_gives_a_terminal() -> Result<(), Failed> {
    let podman = Podman::new()?;
    let (code, out) = podman.run(&[
        "run",
        "--rm",
        "-t",
        IMAGE,
        "sh",
        "-c",
        "tty; test -t 1 && echo is-a-tty; uname -r",
    ])?;
    if code != 0 || !out.stdout.contains("/dev/pts/") || !out.stdout.contains("is-a-tty") {
        return Err(format!("no terminal: code {code}, {out:?}").into());
    }
    // The guest's pty turns \n into \r\n, as a terminal does.
    let kernel = out
        .stdout
        .lines()
        .last()
        .unwrap_or("")
        .trim_end_matches('\r');
    ran_in_guest(kernel)?;
    podman.finish()
}

fn podman_detached_logs_exec_stop_rm() -> Result<(), Failed> {
    let podman = Podman::new()?;
    let (code, out) = podman.run(&[
        "run",
        "-d",
        "--name",
        "d1",
        IMAGE,
        "sh",
        "-c",
        "echo started; trap 'echo got-term; exit 0' TERM; while true; do sleep 1; done",
    ])?;
    if code != 0 {
        return Err(format!("run -d exited {code}: {}", out.stderr).into());
    }
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, logs) = podman.run(&["logs", "d1"])?;
        if logs.stdout.contains("started") {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("no output in the log: {logs:?}").into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (_, ps) = podman.run(&["ps", "--format", "{{.Names}} {{.Status}}"])?;
    if !ps.stdout.contains("d1 Up") {
        return Err(format!("podman ps does not show d1 up: {ps:?}").into());
    }
    // The pid podman knows stands for the container, and it and the VM are
    // in the container's host cgroup, as runc's processes would be.
    let (_, pid) = podman.run(&["inspect", "--format", "{{.State.Pid}}", "d1"])?;
    let cgroup_of = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{}/cgroup", pid.trim())).unwrap_or_default()
    };
    let keeper_cgroup = cgroup_of(&pid.stdout);
    if !keeper_cgroup.contains("libpod") {
        return Err(format!("pid {} is in cgroup {keeper_cgroup:?}", pid.stdout.trim()).into());
    }
    for vmm in common::processes_named("bulkhead-vmm") {
        let vmm_cgroup = cgroup_of(&vmm.to_string());
        if vmm_cgroup != keeper_cgroup {
            return Err(
                format!("the VMM is in {vmm_cgroup:?}, its keeper in {keeper_cgroup:?}").into(),
            );
        }
    }
    let (code, exec) = podman.run(&["exec", "d1", "sh", "-c", "uname -r; exit 5"])?;
    if code != 5 {
        return Err(format!("exec exited {code}, want 5: {exec:?}").into());
    }
    ran_in_guest(&exec.stdout)?;
    let (code, out) = podman.run(&["stop", "-t", "20", "d1"])?;
    if code != 0 {
        return Err(format!("stop exited {code}: {}", out.stderr).into());
    }
    let (_, logs) = podman.run(&["logs", "d1"])?;
    if !logs.stdout.contains("got-term") {
        return Err(format!("SIGTERM did not reach the container: {logs:?}").into());
    }
    let (_, inspect) = podman.run(&["inspect", "--format", "{{.State.ExitCode}}", "d1"])?;
    if inspect.stdout.trim() != "0" {
        return Err(format!("exit code after stop: {inspect:?}").into());
    }
    let (code, out) = podman.run(&["rm", "d1"])?;
    if code != 0 {
        return Err(format!("rm exited {code}: {}", out.stderr).into());
    }
    podman.finish()
}

fn podman_publishes_a_port() -> Result<(), Failed> {
    let podman = Podman::new()?;
    let port = 18080;
    let (code, out) = podman.run(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        &format!("127.0.0.1:{port}:80"),
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ])?;
    if code != 0 {
        return Err(format!("run -d -p exited {code}: {}", out.stderr).into());
    }
    let status = wait_for_page(port)?;
    println!("published port answered: {status}");
    let (code, out) = podman.run(&["rm", "-f", "-t", "0", "web"])?;
    if code != 0 {
        return Err(format!("rm -f exited {code}: {}", out.stderr).into());
    }
    podman.finish()
}

/// Waits until the test page is served on host port `port` (published
/// from a container); returns the response's status line.
fn wait_for_page(port: u16) -> Result<String, Failed> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match http_get(&format!("127.0.0.1:{port}")) {
            Ok(body) if body.contains("served from the microVM") => {
                return Ok(body.lines().next().unwrap_or("").trim().to_owned())
            }
            other if Instant::now() > deadline => {
                return Err(format!("no answer on the published port: {other:?}").into())
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn http_get(addr: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// A private dockerd (Debian 12's 20.10, which starts its own containerd)
/// with bulkhead-runtime registered as the runtime `bulkhead` by path, as a
/// user would in daemon.json; everything it keeps is under one directory on
/// /run (a tmpfs overlay2 can stack on).
struct Dockerd {
    dir: tempfile::TempDir,
    daemon: Option<std::process::Child>,
    wrapper_root: PathBuf,
}

impl Dockerd {
    fn start() -> Result<Dockerd, Failed> {
        let dir = tempfile::Builder::new()
            .prefix("bh-dockerd-")
            .tempdir_in("/run")?;
        let d = dir.path();
        let wrapper = runtime_wrapper(d, "")?;
        let config = serde_json::json!({
            "runtimes": {"bulkhead": {"path": wrapper}},
            "data-root": d.join("data"),
            "exec-root": d.join("exec"),
            "pidfile": d.join("dockerd.pid"),
            "hosts": [format!("unix://{}", d.join("docker.sock").display())],
            "storage-driver": "overlay2",
        });
        std::fs::write(d.join("daemon.json"), config.to_string())?;
        let log = std::fs::File::create(d.join("dockerd.log"))?;
        let daemon = Command::new("/usr/sbin/dockerd")
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut dockerd = Dockerd {
            // runc's state directory for this runtime, as dockerd names it.
            wrapper_root: d.join("exec").join("runtime-runc").join("moby"),
            dir,
            daemon: Some(daemon),
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok((0, _)) = dockerd.run(&["version"]) {
                break;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dockerd.dir.path().join("dockerd.log"))?;
                dockerd.stop();
                return Err(
                    format!("dockerd did not come up: {}", process::tail_lines(&log, 20)).into(),
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let rootfs = dockerd.dir.path().join("image-rootfs");
        common::busybox_rootfs(&rootfs)?;
        std::fs::create_dir_all(rootfs.join("www"))?;
        std::fs::write(rootfs.join("www/index.html"), "served from the microVM\n")?;
        // `docker import` of the rootfs: Docker 20.10 loads no OCI archives.
        let mut import = Command::new("sh");
        import.arg("-c").arg(format!(
            "tar -C {} -c . | /usr/bin/docker -H unix://{} import - {DOCKER_IMAGE}",
            bulkhead_tests::shell::quote(&rootfs.to_string_lossy()),
            dockerd.dir.path().join("docker.sock").display()
        ));
        process::run(&mut import, DEADLINE)?;
        Ok(dockerd)
    }

    fn run(&self, args: &[&str]) -> Result<(i32, process::Output), Failed> {
        let mut c = Command::new("/usr/bin/docker");
        c.arg("-H")
            .arg(format!(
                "unix://{}",
                self.dir.path().join("docker.sock").display()
            ))
            .args(args);
        let (status, out) = process::run_status(&mut c, DEADLINE)?;
        Ok((status.code().unwrap_or(-1), out))
    }

    fn stop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &daemon.id().to_string()])
                .status();
            if process::wait_deadline(&mut daemon, Instant::now() + Duration::from_secs(60))
                .is_none()
            {
                let _ = daemon.kill();
                let _ = daemon.wait();
            }
        }
        // dockerd leaves its data root's mounts on a stop; they are its own.
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.path().join("data"))
            .stderr(Stdio::null())
            .status();
    }

    /// Removes every container, stops dockerd, and checks nothing of ours is
    /// left: no VM, virtiofsd, run directory, mount, veth or runtime state.
    fn finish(mut self) -> Result<(), Failed> {
        let _ = self.run(&["rm", "-f", "-v", "web"]);
        self.stop();
        nothing_left_with_state(
            &["bulkhead-vmm", "virtiofsd", "containerd-shim-runc-v2"],
            &self.wrapper_root,
        )
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
    }
}

const DOCKER_IMAGE: &str = "bulkhead-busybox:test";

fn docker_runs_in_a_microvm_on_its_bridge() -> Result<(), Failed> {
    let docker = Dockerd::start()?;
    let (code, out) = docker.run(&[
        "run",
        "--rm",
        "--runtime",
        "bulkhead",
        DOCKER_IMAGE,
        "sh",
        "-c",
        "uname -r; ip -4 -o addr show eth0; exit 4",
    ])?;
    if code != 4 {
        return Err(format!("exit code {code}, want 4: {out:?}").into());
    }
    let mut lines = out.stdout.lines();
    ran_in_guest(lines.next().unwrap_or(""))?;
    // Docker wires eth0 in its prestart hook: the guest must have its address.
    let eth0 = lines.next().unwrap_or("");
    if !eth0.contains("inet 172.") {
        return Err(format!("the guest's eth0 has not Docker's bridge address: {eth0:?}").into());
    }
    docker.finish()
}

fn docker_detached_publish_exec_rm() -> Result<(), Failed> {
    let docker = Dockerd::start()?;
    let port = 18081;
    let (code, out) = docker.run(&[
        "run",
        "-d",
        "--name",
        "web",
        "--runtime",
        "bulkhead",
        "-p",
        &format!("127.0.0.1:{port}:80"),
        DOCKER_IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ])?;
    if code != 0 {
        return Err(format!("docker run -d exited {code}: {}", out.stderr).into());
    }
    wait_for_page(port)?;
    let (code, exec) = docker.run(&["exec", "web", "sh", "-c", "uname -r; exit 6"])?;
    if code != 6 {
        return Err(format!("docker exec exited {code}, want 6: {exec:?}").into());
    }
    ran_in_guest(&exec.stdout)?;
    let (code, out) = docker.run(&["rm", "-f", "web"])?;
    if code != 0 {
        return Err(format!("docker rm -f exited {code}: {}", out.stderr).into());
    }
    docker.finish()
}

/// A wrapper script around bulkhead-runtime in `dir` that hands it our
/// `BULKHEAD_*` variables (engines pass their runtime little environment)
/// and `extra` arguments before the engine's.
fn runtime_wrapper(dir: &Path, extra: &str) -> Result<PathBuf, Failed> {
    let wrapper = dir.join("bulkhead-runtime");
    let mut script = String::from("#!/bin/sh\n");
    for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("BULKHEAD_")) {
        script += &format!("export {k}={}\n", bulkhead_tests::shell::quote(&v));
    }
    script += &format!(
        "exec {} {extra} \"$@\"\n",
        bulkhead_tests::shell::quote(&runtime_binary().to_string_lossy())
    );
    std::fs::write(&wrapper, script)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    Ok(wrapper)
}

fn buildah_runs_run_steps_in_microvms() -> Result<(), Failed> {
    let dir = tempfile::Builder::new()
        .prefix("bh-buildah-")
        .tempdir_in("/run")?;
    let d = dir.path();
    let state = d.join("runtime-state");
    let wrapper = runtime_wrapper(
        d,
        &format!(
            "--root {}",
            bulkhead_tests::shell::quote(&state.to_string_lossy())
        ),
    )?;
    let buildah = |args: &[&str]| -> Result<process::Output, Failed> {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(d.join("storage"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args(args);
        Ok(process::run(&mut c, DEADLINE)?)
    };
    let rootfs = d.join("rootfs");
    common::busybox_rootfs(&rootfs)?;
    let container = buildah(&["from", "scratch"])?.stdout.trim().to_owned();
    buildah(&["copy", &container, &format!("{}/", rootfs.display()), "/"])?;
    buildah(&["commit", &container, "localhost/bulkhead-busybox:base"])?;
    let context = d.join("context");
    std::fs::create_dir_all(&context)?;
    std::fs::write(
        context.join("Containerfile"),
        "FROM localhost/bulkhead-busybox:base\n\
         RUN uname -r > /built-on && echo step-one >> /built-on\n\
         RUN echo step-two >> /built-on\n",
    )?;
    buildah(&[
        "bud",
        "--runtime",
        &wrapper.to_string_lossy(),
        "--isolation",
        "oci",
        "-t",
        "localhost/built:test",
        &context.to_string_lossy(),
    ])?;
    let built = buildah(&["from", "localhost/built:test"])?
        .stdout
        .trim()
        .to_owned();
    let mount = buildah(&["mount", &built])?.stdout.trim().to_owned();
    let content = std::fs::read_to_string(Path::new(&mount).join("built-on"))?;
    let _ = buildah(&["umount", &built]);
    let _ = buildah(&["rm", "--all"]);
    let mut lines = content.lines();
    ran_in_guest(lines.next().unwrap_or(""))?;
    if lines.collect::<Vec<_>>() != ["step-one", "step-two"] {
        return Err(format!("the RUN steps' file in the image: {content:?}").into());
    }
    let _ = Command::new("umount")
        .arg("-R")
        .arg(d.join("storage"))
        .stderr(Stdio::null())
        .status();
    nothing_left_with_state(&["bulkhead-vmm", "virtiofsd"], &state)
}

fn containerds_runc_shim_runs_it_as_runc_binary() -> Result<(), Failed> {
    use bulkhead_tests::containerd::{ContainerdOptions, PrivateContainerd};
    let dir = tempfile::Builder::new()
        .prefix("bh-ctr-")
        .tempdir_in("/run")?;
    let wrapper = runtime_wrapper(dir.path(), "")?;
    let rootfs = dir.path().join("rootfs");
    common::busybox_rootfs(&rootfs)?;
    let archive = dir.path().join("image.tar");
    let image = "docker.io/library/bulkhead-busybox:test";
    write_image_archive(
        &rootfs,
        image,
        &ImageConfig::default(),
        LayerCompression::Gzip,
        &archive,
    )?;
    let mut opts = ContainerdOptions::new("registry.k8s.io/pause:unused");
    opts.cri = false;
    // The snapshotter's overlay needs an upper directory off overlayfs.
    opts.temp_parent = Some(PathBuf::from("/run"));
    let daemon = PrivateContainerd::start(opts)?;
    daemon.import_image("default", &archive)?;
    let mut run = daemon.ctr(["run", "--rm", "--runtime", "io.containerd.runc.v2"]);
    run.arg("--runc-binary")
        .arg(&wrapper)
        .args([image, "t1", "sh", "-c", "uname -r; exit 9"]);
    let (status, out) = process::run_status(&mut run, DEADLINE)?;
    let code = status.code().unwrap_or(-1);
    let log = daemon.log_path().to_owned();
    daemon.stop()?;
    if code != 9 {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        return Err(format!(
            "ctr run --runc-binary exited {code}, want 9: {out:?}\ncontainerd: {}",
            process::tail_lines(&log, 20)
        )
        .into());
    }
    ran_in_guest(&out.stdout)?;
    wait_for_nothing_left(&["bulkhead-vmm", "virtiofsd", "containerd-shim-runc-v2"])
}

/// A bundle with a busybox rootfs and `bulkhead-runtime spec`'s config,
/// its process replaced by `args`.
fn bundle(dir: &Path, args: &[&str]) -> Result<PathBuf, Failed> {
    let bundle = dir.join("bundle");
    common::busybox_rootfs(&bundle.join("rootfs"))?;
    let mut c = Command::new(runtime_binary());
    c.args(["spec", "--bundle"]).arg(&bundle);
    process::run(&mut c, DEADLINE)?;
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["terminal"] = serde_json::json!(false);
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(bundle)
}

fn runtime(root: &Path, args: &[&str]) -> Result<(i32, process::Output), Failed> {
    let mut c = Command::new(runtime_binary());
    c.arg("--root").arg(root).args(args);
    let (status, out) = process::run_status(&mut c, DEADLINE)?;
    Ok((status.code().unwrap_or(-1), out))
}

fn status_of(root: &Path, id: &str) -> Result<(String, i64), Failed> {
    let (code, out) = runtime(root, &["state", id])?;
    if code != 0 {
        return Err(format!("state {id} exited {code}: {}", out.stderr).into());
    }
    let state: serde_json::Value = serde_json::from_str(&out.stdout)?;
    Ok((
        state["status"].as_str().unwrap_or("").to_owned(),
        state["pid"].as_i64().unwrap_or(-1),
    ))
}

fn runtime_lifecycle_as_go_runc_drives_it() -> Result<(), Failed> {
    let dir = tempfile::Builder::new()
        .prefix("bh-rt-")
        .tempdir_in("/run")?;
    let root = dir.path().join("root");
    let out_file = dir.path().join("out");
    let bundle = bundle(
        dir.path(),
        &[
            "sh",
            "-c",
            "uname -r; trap 'echo got-usr1' USR1; trap 'exit 3' TERM; while true; do sleep 1; done",
        ],
    )?;
    let pid_file = dir.path().join("pid");
    let err_file = dir.path().join("err");
    // Like containerd's runc shim: create with a pid file and the stdio the
    // container keeps (files here: the keeper holds them open for the
    // container's life, so they cannot be pipes we read to EOF).
    let mut c = Command::new(runtime_binary());
    c.arg("--root")
        .arg(&root)
        .args(["create", "--bundle"])
        .arg(&bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg("c1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file)?)
        .stderr(std::fs::File::create(&err_file)?);
    let mut child = c.spawn()?;
    let status = process::wait_deadline(&mut child, Instant::now() + DEADLINE)
        .ok_or("create did not return")?;
    if !status.success() {
        let err = std::fs::read_to_string(&err_file)?;
        return Err(format!("create failed: {status}: {err}").into());
    }
    let pid: i64 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    let (status, state_pid) = status_of(&root, "c1")?;
    if status != "created" || state_pid != pid {
        return Err(format!("after create: {status}, pid {state_pid} (pid file {pid})").into());
    }
    let (code, out) = runtime(
        &root,
        &["create", "--bundle", &bundle.to_string_lossy(), "c1"],
    )?;
    if code == 0 || !out.stderr.contains("exists") {
        return Err(format!("a second create of c1: {code}, {}", out.stderr).into());
    }
    let (code, out) = runtime(&root, &["start", "c1"])?;
    if code != 0 {
        return Err(format!("start failed: {}", out.stderr).into());
    }
    let deadline = Instant::now() + DEADLINE;
    while std::fs::read_to_string(&out_file)?.trim().is_empty() {
        if Instant::now() > deadline {
            return Err("no output after start".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ran_in_guest(&std::fs::read_to_string(&out_file)?)?;
    let (status, _) = status_of(&root, "c1")?;
    if status != "running" {
        return Err(format!("after start: {status}").into());
    }
    // A signal sent to the pid the engine knows reaches the init, as with
    // runc (where that pid is the init).
    let _ = Command::new("kill")
        .args(["-USR1", &pid.to_string()])
        .status();
    // Well inside the emulated host's no-output limit: a lost signal is a
    // failure here, not a stalled host.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&out_file)?.contains("got-usr1") {
        if Instant::now() > deadline {
            return Err("SIGUSR1 to the keeper did not reach the container".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, out) = runtime(&root, &["delete", "c1"])?;
    if code == 0 || !out.stderr.contains("not stopped") {
        return Err(format!("delete of a running container: {code}, {}", out.stderr).into());
    }
    let (code, out) = runtime(&root, &["kill", "c1", "TERM"])?;
    if code != 0 {
        return Err(format!("kill failed: {}", out.stderr).into());
    }
    // The keeper stands for the init: it exits once the init did.
    let deadline = Instant::now() + DEADLINE;
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            return Err(format!("keeper {pid} still there after the init's exit").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, state_pid) = status_of(&root, "c1")?;
    if status != "stopped" || state_pid != 0 {
        return Err(format!("after kill: {status}, pid {state_pid}").into());
    }
    let (code, out) = runtime(&root, &["delete", "c1"])?;
    if code != 0 {
        return Err(format!("delete failed: {}", out.stderr).into());
    }
    let (code, _) = runtime(&root, &["state", "c1"])?;
    if code == 0 {
        return Err("state of a deleted container succeeded".into());
    }
    nothing_left_with_state(&["bulkhead-vmm", "virtiofsd"], &root)
}

fn runtime_refuses_bad_input_and_leaves_nothing() -> Result<(), Failed> {
    let dir = tempfile::Builder::new()
        .prefix("bh-rt-")
        .tempdir_in("/run")?;
    let root = dir.path().join("root");
    let expect_error = |args: &[&str], needle: &str| -> Result<(), Failed> {
        let (code, out) = runtime(&root, args)?;
        if code == 0 || !out.stderr.contains(needle) {
            return Err(format!(
                "{args:?}: exit {code}, stderr {:?}; wanted an error saying {needle:?}",
                out.stderr
            )
            .into());
        }
        Ok(())
    };
    let missing = dir.path().join("no-bundle");
    expect_error(
        &["create", "--bundle", &missing.to_string_lossy(), "c1"],
        "config.json",
    )?;
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(bad.join("rootfs"))?;
    std::fs::write(bad.join("config.json"), "{ not json")?;
    expect_error(
        &["create", "--bundle", &bad.to_string_lossy(), "c1"],
        "config.json",
    )?;
    let good = bundle(dir.path(), &["true"])?;
    expect_error(
        &["create", "--bundle", &good.to_string_lossy(), "../escape"],
        "invalid container id",
    )?;
    expect_error(
        &[
            "create",
            "--preserve-fds",
            "2",
            "--bundle",
            &good.to_string_lossy(),
            "c1",
        ],
        "preserve-fds",
    )?;
    expect_error(&["state", "nope"], "does not exist")?;
    expect_error(&["start", "nope"], "does not exist")?;
    expect_error(&["kill", "nope", "KILL"], "does not exist")?;
    expect_error(&["delete", "nope"], "does not exist")?;
    expect_error(&["checkpoint", "nope"], "not supported")?;
    expect_error(&["--rootless", "true", "list"], "not supported")?;
    // runc: --force on a missing container is not an error.
    let (code, out) = runtime(&root, &["delete", "--force", "nope"])?;
    if code != 0 {
        return Err(format!("delete --force of nothing failed: {}", out.stderr).into());
    }
    nothing_left_with_state(&["bulkhead-vmm", "virtiofsd"], &root)
}
