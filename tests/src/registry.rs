//! A private OCI registry owned by one test, on 127.0.0.1, torn down on drop.
//!
//! bulkhead's image store pulls from registries, and the test machines have no
//! network, so its tests push images to a registry of their own:
//! [`Registry::start`] runs Debian's `docker-registry` (the CNCF distribution
//! registry, v2 API) on a free loopback port with its storage in a fresh temp
//! directory:
//!
//! ```text
//! <tmp>/bulkhead-registry-XXXXXX/
//!   config.yml       listen address and storage root
//!   registry.log     the daemon's stdout and stderr
//!   storage/         the registry's filesystem storage; blob data lives at
//!                    docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data
//! ```
//!
//! [`Registry::push_oci_archive`] pushes an OCI image layout (a directory or a tar
//! of one, e.g. from [`crate::oci_image::write_image_archive`]) with `skopeo`,
//! keeping digests, and every image of an index (`--all`). A test can corrupt a
//! stored blob through [`Registry::blob_path`]. Drop stops the daemon (SIGTERM,
//! then SIGKILL) and removes the directory.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::process;

/// The registry binary of Debian's `docker-registry` package.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// skopeo, from Debian's `skopeo` package, found on `PATH`.
pub const SKOPEO: &str = "skopeo";

/// The user of a registry started with [`Registry::start_with_auth`].
pub const AUTH_USER: &str = "bulkhead";
/// [`AUTH_USER`]'s password.
pub const AUTH_PASSWORD: &str = "bulkhead-test-pw";
/// bcrypt (cost 5) of [`AUTH_PASSWORD`], for the registry's htpasswd file.
const AUTH_PASSWORD_BCRYPT: &str = "$2b$05$Icj.vZKl4QlCTFS1Fy2Iuer.09USyAL/6pH2ow3wcg6tBMx/pMedG";

/// How long the registry may take to answer on `/v2/`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the registry gets to exit on SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of one `skopeo copy`.
const PUSH_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts at starting on a free port (another process may take it meanwhile).
const START_ATTEMPTS: usize = 3;
/// Lines of the registry log put into errors.
const LOG_TAIL_LINES: usize = 20;

/// A `docker-registry` daemon serving plain HTTP on 127.0.0.1, owned by the test.
///
/// Exists so image-store tests can pull real images over the real distribution
/// API (tags, digests, indexes, errors), and corrupt what the registry serves,
/// without network access and without touching a system registry.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    /// Whether pulls and pushes need [`AUTH_USER`]'s credentials.
    auth: bool,
}

impl Registry {
    /// Start a registry on a free loopback port and wait until `/v2/` answers.
    ///
    /// Fails, saying that `cargo xtask setup` installs them, if `docker-registry`
    /// or `skopeo` is missing; with the registry's log tail if it exits or does
    /// not answer in time.
    pub fn start() -> Result<Registry> {
        Registry::start_with(false)
    }

    /// Like [`Registry::start`], but every request needs HTTP basic auth as
    /// [`AUTH_USER`] with [`AUTH_PASSWORD`] (an htpasswd file, as a private
    /// registry would have); pushes through [`Registry::push_oci_archive`] log in.
    pub fn start_with_auth() -> Result<Registry> {
        Registry::start_with(true)
    }

    fn start_with(auth: bool) -> Result<Registry> {
        require_tools()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Registry::start_once(auth) {
                Ok(registry) => return Ok(registry),
                // Most likely the port was taken between probing and binding.
                Err(e @ Error::CommandFailed { .. }) => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    fn start_once(auth: bool) -> Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-registry-")
            .tempdir()
            .at("creating temp directory in", std::env::temp_dir())?;
        let addr = free_port()?;
        let storage = dir.path().join("storage");
        fs::create_dir(&storage).at("creating directory", &storage)?;
        let config = dir.path().join("config.yml");
        // No blob descriptor cache: a test that corrupts storage sees it served.
        let mut yaml = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n",
            storage.display()
        );
        if auth {
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, format!("{AUTH_USER}:{AUTH_PASSWORD_BCRYPT}\n"))
                .at("writing", &htpasswd)?;
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: bulkhead-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        fs::write(&config, yaml).at("writing", &config)?;
        let log_path = dir.path().join("registry.log");
        let log = File::create(&log_path).at("creating", &log_path)?;
        let log_err = log.try_clone().at("opening", &log_path)?;
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            command: process::describe(&cmd),
            source,
        })?;
        let mut registry = Registry {
            child: Some(child),
            dir,
            addr,
            auth,
        };
        registry.wait_ready(&process::describe(&cmd))?;
        Ok(registry)
    }

    fn wait_ready(&mut self, command: &str) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(Error::CommandFailed {
                        command: command.into(),
                        status,
                        stderr: self.log_tail(),
                    });
                }
            }
            if v2_answers(self.addr) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::CommandTimedOut {
                    command: format!(
                        "{command} (no answer on http://{}/v2/; log:\n{})",
                        self.addr,
                        self.log_tail()
                    ),
                    timeout: START_TIMEOUT,
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT`, the registry part of image references pushed here.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The registry's storage root (its filesystem driver's `rootdirectory`).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps the data of blob `digest` (`sha256:<hex>`).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or(hex))
            .join(hex)
            .join("data")
    }

    /// Push the OCI image layout `layout` (a directory, or a tar of one) as
    /// `name_tag` (e.g. `team/app:1`), with every image of an index and the
    /// digests unchanged.
    pub fn push_oci_archive(&self, layout: &Path, name_tag: &str) -> Result<()> {
        let meta = fs::metadata(layout).at("reading", layout)?;
        let transport = if meta.is_dir() { "oci" } else { "oci-archive" };
        let mut cmd = Command::new(SKOPEO);
        cmd.args(["copy", "--insecure-policy", "--all", "--preserve-digests"])
            .arg("--dest-tls-verify=false");
        if self.auth {
            cmd.arg(format!("--dest-creds={AUTH_USER}:{AUTH_PASSWORD}"));
        }
        cmd.arg(format!("{transport}:{}", layout.display()))
            .arg(format!("docker://{}/{name_tag}", self.addr));
        process::run(&mut cmd, PUSH_TIMEOUT).map(drop)
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        fs::read(self.dir.path().join("registry.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        process::tail_lines(&self.log(), LOG_TAIL_LINES)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child, which is not reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            match process::wait_deadline(&mut child, Instant::now() + STOP_TIMEOUT) {
                Some(status) if status.signal() == Some(libc::SIGKILL) => {
                    eprintln!("registry at {} needed SIGKILL", self.addr)
                }
                Some(_) => {}
                None => eprintln!(
                    "registry at {} ignored SIGTERM for {STOP_TIMEOUT:?} and was killed",
                    self.addr
                ),
            }
        }
        if thread::panicking() {
            eprintln!("registry at {}: log tail:\n{}", self.addr, self.log_tail());
        }
        // The temp directory goes with `self.dir`.
    }
}

/// Fail with how to get them if the registry or skopeo is not installed.
fn require_tools() -> Result<()> {
    let missing = |command: &str, package: &str| Error::Spawn {
        command: command.into(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("not installed; `cargo xtask setup` installs the Debian package {package}"),
        ),
    };
    if !Path::new(REGISTRY_BIN).is_file() {
        return Err(missing(REGISTRY_BIN, "docker-registry"));
    }
    if Command::new(SKOPEO)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Err(missing(SKOPEO, "skopeo"));
    }
    Ok(())
}

/// A loopback address with a port nobody listens on right now.
fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").at("binding a free port on", "127.0.0.1")?;
    listener
        .local_addr()
        .at("reading the address of", "127.0.0.1")
}

/// Whether `GET /v2/` on `addr` answers: 200, or 401 when auth is on.
fn v2_answers(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    let mut read = 0;
    while read < head.len() {
        match stream.read(&mut head[read..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    let status = String::from_utf8_lossy(&head[..read]);
    [
        "HTTP/1.1 200",
        "HTTP/1.0 200",
        "HTTP/1.1 401",
        "HTTP/1.0 401",
    ]
    .iter()
    .any(|ok| status.starts_with(ok))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci_image::{write_image_archive, ImageConfig, LayerCompression};

    /// The whole harness: start, push a one-layer image, see its blobs in
    /// storage and its manifest served, then stop without a trace.
    #[test]
    fn start_push_and_stop() {
        let work = tempfile::tempdir().unwrap();
        let rootfs = work.path().join("rootfs");
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::write(rootfs.join("etc/hostname"), b"registry-test\n").unwrap();
        let archive = work.path().join("image.tar");
        let image = write_image_archive(
            &rootfs,
            "docker.io/library/harness:1",
            &ImageConfig::default(),
            LayerCompression::Gzip,
            &archive,
        )
        .unwrap();

        let registry = Registry::start().unwrap();
        assert!(registry.addr().starts_with("127.0.0.1:"));
        registry
            .push_oci_archive(&archive, "team/harness:1")
            .unwrap();
        assert!(registry.blob_path(&image.layer_digest).is_file());
        assert!(registry.blob_path(&image.config_digest).is_file());
        let manifest = registry.blob_path(&image.manifest_digest);
        assert!(manifest.is_file(), "{}", manifest.display());

        let dir = registry.dir.path().to_path_buf();
        let addr = registry.addr;
        drop(registry);
        assert!(!dir.exists());
        assert!(!v2_answers(addr));

        // With auth: anonymous requests are refused, pushes log in.
        let registry = Registry::start_with_auth().unwrap();
        let mut stream = TcpStream::connect(registry.addr).unwrap();
        write!(stream, "GET /v2/ HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.0 401"), "{answer}");
        registry
            .push_oci_archive(&archive, "private/harness:1")
            .unwrap();
        assert!(registry.blob_path(&image.manifest_digest).is_file());
    }
}
