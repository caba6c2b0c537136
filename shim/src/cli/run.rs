//! `bulkhead run`: one container in its own microVM, from an image or a
//! rootfs directory, in the foreground (stdin, stdout, stderr and the exit
//! status behave as under runc) or detached (`-d`, held by a monitor process).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::containers::{ContainerRecord, Containers, Status};
use super::flags::Volume;
use super::images::{self, ImageChoice};
use super::monitor::{self, Attach};
use super::spec::ProcessOptions;
use super::users;
use crate::config::{Config, MAX_VCPUS};

pub use crate::config::GUEST_OVERHEAD_MIB;
/// Smallest container memory limit we accept.
pub const MIN_CONTAINER_MIB: u32 = 8;

/// What the container runs on.
#[derive(Clone, Debug)]
pub enum Source {
    /// An image from the store (pulled first if it is not there).
    Image(String),
    /// A directory on this host, used as it is (read-write).
    Rootfs(PathBuf),
}

/// Everything `bulkhead run` was asked.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Image or rootfs.
    pub source: Source,
    /// CMD: replaces the image's Cmd (required with `--rootfs`).
    pub command: Vec<String>,
    /// `--entrypoint`: replaces the image's Entrypoint (and drops its Cmd).
    pub entrypoint: Option<String>,
    /// `-e`, after the `--env-file` entries, so they win.
    pub env: Vec<String>,
    /// `-w`.
    pub workdir: Option<String>,
    /// `-u`: name or id, with an optional group.
    pub user: Option<String>,
    /// `-t`.
    pub tty: bool,
    /// `-i`.
    pub interactive: bool,
    /// `-d`.
    pub detach: bool,
    /// `--rm`.
    pub auto_remove: bool,
    /// `--read-only`.
    pub read_only: bool,
    /// `--memory`, bytes.
    pub memory: Option<u64>,
    /// `--cpus`.
    pub cpus: Option<f64>,
    /// `-v`.
    pub volumes: Vec<Volume>,
    /// `--boot-timeout`.
    pub boot_timeout: Option<Duration>,
    /// `--name`.
    pub name: Option<String>,
    /// `--network`, `-p`, `--dns`, `--add-host`.
    pub network: super::network::NetworkOptions,
    /// `--hostname`.
    pub hostname: Option<String>,
    /// `--cap-add`.
    pub cap_add: Vec<String>,
    /// `--cap-drop`.
    pub cap_drop: Vec<String>,
    /// `--security-opt`, parsed (its profile read).
    pub security: super::security::SecurityOpts,
    /// `--ulimit`.
    pub ulimits: Vec<String>,
    /// `--sysctl`.
    pub sysctls: Vec<String>,
    /// `--tmpfs`.
    pub tmpfs: Vec<String>,
    /// `--shm-size`, bytes.
    pub shm_size: Option<u64>,
    /// This host's settings.
    pub config: Config,
}

/// Runs the container and returns the exit code the CLI should exit with
/// (the container's, or 0 after `-d` printed its id).
pub async fn run(opts: RunOptions) -> Result<i32> {
    validate(&opts)?;
    let containers = Containers::open(&super::state_root(&opts.config))?;
    super::network::release_orphans(&containers).await;
    let (image, image_id, image_rootfs, rootfs, base) = match &opts.source {
        Source::Rootfs(dir) => {
            if !dir.is_dir() {
                bail!("the rootfs {} is not a directory", dir.display());
            }
            let dir = dir
                .canonicalize()
                .with_context(|| format!("the rootfs {}", dir.display()))?;
            (
                format!("rootfs:{}", dir.display()),
                None,
                None,
                Some(dir.clone()),
                ImageChoice::none(dir),
            )
        }
        Source::Image(reference) => {
            let chosen = images::for_run(&opts.config, reference).await?;
            (
                reference.clone(),
                Some(chosen.id.clone()),
                Some(chosen.rootfs.clone()),
                None,
                chosen,
            )
        }
    };
    let process = process_options(&opts, &base)?;
    let id = crate::random::hex(32);
    let name = opts
        .name
        .clone()
        .unwrap_or_else(|| format!("bh_{}", &id[..8]));
    let record = ContainerRecord {
        id: id.clone(),
        name,
        created: super::containers::now_millis() / 1000,
        image,
        image_id,
        image_rootfs,
        rootfs,
        process,
        stop_signal: base.stop_signal,
        memory_limit: opts.memory,
        cpus: opts.cpus,
        volumes: opts.volumes.clone(),
        auto_remove: opts.auto_remove,
        interactive: opts.interactive,
        boot_timeout_secs: opts.boot_timeout.map(|d| d.as_secs()),
        network: opts.network.clone(),
        hostname: opts.hostname.clone(),
    };
    // Checked before the name is claimed, so a bad spec leaves nothing.
    super::spec::build(&record.process, record.short_id(), record.short_id())?;
    containers.create(&record)?;
    if opts.detach {
        return detach(&opts.config, &containers, &record).await;
    }
    monitor::supervise(&opts.config, &containers, &id, Attach::Foreground).await
}

fn validate(opts: &RunOptions) -> Result<()> {
    if let Some(m) = opts.memory {
        if m < u64::from(MIN_CONTAINER_MIB) << 20 {
            bail!("--memory {m} bytes: a container needs at least {MIN_CONTAINER_MIB} MiB, e.g. --memory 64m (the microVM adds {GUEST_OVERHEAD_MIB} MiB for the guest)");
        }
    }
    let vcpus = opts
        .cpus
        .map_or(opts.config.vcpus, |c| c.ceil().min(65535.0) as u16);
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        bail!("--cpus: a microVM has 1 to {MAX_VCPUS} vCPUs");
    }
    if opts.boot_timeout.is_some_and(|t| t.is_zero()) {
        bail!("--boot-timeout 0: the microVM needs at least 1 s to come up");
    }
    super::security::capability_set(&opts.cap_add, &opts.cap_drop)?;
    super::security::rlimits(&opts.ulimits)?;
    for s in &opts.sysctls {
        super::kernel_opts::sysctl(s)?;
    }
    for t in &opts.tmpfs {
        super::kernel_opts::tmpfs(t)?;
    }
    if opts.detach && opts.interactive {
        bail!("-d with -i: a detached container has no terminal to read from (bulkhead has no attach); drop -i, or -d");
    }
    opts.network.validate()?;
    if let super::network::NetworkMode::Named(name) = &opts.network.mode {
        super::network::conflist(&opts.config, name)?;
    }
    if let Some(h) = &opts.hostname {
        let ok = !h.is_empty()
            && h.len() <= 63
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !h.starts_with('-');
        if !ok {
            bail!("--hostname {h:?}: a host name is 1 to 63 letters, digits, '-' and '.', not starting with '-'");
        }
    }
    if matches!(opts.source, Source::Rootfs(_)) && opts.command.is_empty() {
        bail!("no command given: with --rootfs, CMD is required, e.g. `bulkhead run --rootfs DIR -- echo hello`");
    }
    Ok(())
}

/// The process: the image's defaults with the command line's choices on top,
/// as `docker run` combines them.
fn process_options(opts: &RunOptions, image: &ImageChoice) -> Result<ProcessOptions> {
    let args = match &opts.entrypoint {
        Some(e) if e.is_empty() => opts.command.clone(),
        Some(e) => std::iter::once(e.clone())
            .chain(opts.command.iter().cloned())
            .collect(),
        None => {
            let cmd = if opts.command.is_empty() {
                &image.cmd
            } else {
                &opts.command
            };
            image.entrypoint.iter().chain(cmd).cloned().collect()
        }
    };
    if args.is_empty() {
        bail!("no command: the image {} has no Entrypoint or Cmd, so give one, e.g. `bulkhead run {} sh`", image.name, image.name);
    }
    let user = opts.user.clone().unwrap_or_else(|| image.user.clone());
    let ids = users::resolve(&image.rootfs, &user)?;
    // HOME from the user's passwd entry, as Docker sets it, unless the image
    // or the command line does.
    let mut env = vec![format!("HOME={}", ids.home)];
    env.extend(image.env.iter().cloned());
    env.extend(opts.env.iter().cloned());
    let cwd = opts
        .workdir
        .clone()
        .or_else(|| (!image.working_dir.is_empty()).then(|| image.working_dir.clone()));
    Ok(ProcessOptions {
        args,
        env,
        cwd,
        user: Some(format!("{}:{}", ids.uid, ids.gid)),
        terminal: opts.tty,
        read_only: opts.read_only,
        memory_limit: opts.memory.map(|m| m as i64),
        additional_gids: ids.additional_gids,
        cpus: opts.cpus,
        cap_add: opts.cap_add.clone(),
        cap_drop: opts.cap_drop.clone(),
        seccomp: opts.security.seccomp.clone(),
        no_new_privileges: opts.security.no_new_privileges,
        ulimits: opts.ulimits.clone(),
        sysctls: opts.sysctls.clone(),
        tmpfs: opts.tmpfs.clone(),
        shm_size: opts.shm_size,
    })
}

/// Starts the container's monitor in its own session and returns once the
/// container runs (printing its id, like `docker run -d`) or failed to start.
async fn detach(config: &Config, containers: &Containers, record: &ContainerRecord) -> Result<i32> {
    let log = std::fs::File::create(containers.dir(&record.id).join("monitor.log"))
        .context("creating the monitor's log")?;
    let exe = std::env::current_exe().context("finding the bulkhead binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("__monitor").arg(&record.id);
    if let Some(file) = config.file() {
        cmd.env(crate::config::CONFIG_ENV, &file.path);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid(2) and chdir(2) are async-signal-safe and touch no memory
    // of ours; they run in the child between fork and exec. The monitor leaves
    // the CLI's directory so it keeps no file system busy.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            nix::unistd::chdir("/").map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().context("starting the container's monitor")?;
    let timeout = record
        .boot_timeout_secs
        .map_or(config.boot_timeout(), Duration::from_secs)
        + Duration::from_secs(30);
    let deadline = std::time::Instant::now() + timeout;
    // Whatever the monitor started goes with the record: the sandbox too.
    let abandon = |containers: &Containers| {
        let _ = crate::sandbox::force_remove(&config.run_root, record.short_id());
        super::network::down_blocking(&containers.dir(&record.id));
        let _ = containers.remove(&record.id);
    };
    loop {
        let state = match containers.state(&record.id) {
            Ok(state) => state,
            // `--rm` and already over: its monitor removed it.
            Err(_) if record.auto_remove && !containers.dir(&record.id).exists() => {
                println!("{}", record.id);
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        };
        match state.status {
            Status::Running => {
                println!("{}", record.id);
                return Ok(0);
            }
            Status::Exited => {
                if let Some(error) = state.error {
                    if record.auto_remove {
                        let _ = containers.remove(&record.id);
                    }
                    bail!("{error}");
                }
                // It ran and already ended: still a successful start.
                println!("{}", record.id);
                return Ok(0);
            }
            Status::Created => {}
        }
        if let Some(status) = child.try_wait()? {
            if !matches!(containers.state(&record.id)?.status, Status::Created) {
                continue;
            }
            let log = std::fs::read_to_string(containers.dir(&record.id).join("monitor.log"))
                .unwrap_or_default();
            abandon(containers);
            bail!("the container's monitor ended ({status}) before the container started:\n{log}");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            abandon(containers);
            bail!("container {} did not start within {timeout:?}", record.name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first of SIGINT, SIGTERM or SIGHUP. The handlers are installed here,
/// before the returned future is first polled (registering them also stops
/// them from killing the CLI outright, which would leave the VM behind).
pub fn first_signal() -> impl std::future::Future<Output = i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    );
    async move {
        let (Ok(mut int), Ok(mut term), Ok(mut hup)) = handlers else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
            _ = hup.recv() => libc::SIGHUP,
        }
    }
}
