//! VM templates on the host: `run_root/.templates/<key>/`, one per VM shape.
//!
//! The key covers everything the saved VM depends on: the kernel, initrd,
//! VMM and virtiofsd files (path, size and modification time), the vCPU count,
//! the memory size and the console verbosity. A template is made by booting a
//! VM with `save_snapshot` (bulkhead-vmm stops it when the agent rings the
//! snapshot doorbell and writes it out), in a staging directory renamed into
//! place when complete, under a per-key lock so that concurrent sandboxes make
//! it once. The directory lives on the run root's tmpfs: resuming reads it
//! from memory, and a reboot (which may bring a new kernel) forgets it.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulkhead_protocol::AGENT_RESUME_PORT;

use super::{tail, SandboxConfig, SandboxDir, SandboxError, VmProcesses, TAIL_LINES};

/// The templates' directory under the run root (a dot name: no sandbox id).
pub const TEMPLATES_DIR: &str = ".templates";

/// The most a resume may take before the template is given up for a boot:
/// under emulation it takes about half a second, on hardware milliseconds.
pub const RESUME_TIMEOUT: Duration = Duration::from_secs(30);

/// Bumped when what a template holds changes meaning (the agent's template
/// protocol, the VMM's snapshot format).
const TEMPLATE_GENERATION: u32 = 1;

/// The most templates kept: each holds a guest's memory in use (about 27 MiB)
/// in the run root's tmpfs, and every new VM shape, or new kernel, initrd or
/// VMM build, makes one. Past this, the least recently used go.
pub const MAX_TEMPLATES: usize = 8;

/// The template directory for `config`'s VM shape, made first if missing.
pub async fn ensure(config: &SandboxConfig) -> Result<PathBuf, SandboxError> {
    let root = config.run_root.join(TEMPLATES_DIR);
    let key = key(config)?;
    let dir = root.join(&key);
    if is_complete(&dir) {
        mark_used(&dir);
        return Ok(dir);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .map_err(|source| SandboxError::Io {
            what: "create",
            path: root.clone(),
            source,
        })?;
    let lock_path = root.join(format!("{key}.lock"));
    let lock = lock_exclusive(&lock_path).await?;
    if is_complete(&dir) {
        return Ok(dir);
    }
    let staging = Staging::create(root.join(format!("{key}.staging")))?;
    let started = Instant::now();
    make(config, &key, &staging.0).await?;
    staging.commit(&dir)?;
    tracing::info!(
        template = %dir.display(),
        ms = started.elapsed().as_millis() as u64,
        "VM template made"
    );
    drop(lock);
    prune(&root, MAX_TEMPLATES);
    Ok(dir)
}

/// Records that the template in `dir` was just used (its directory's
/// modification time is what [`prune`] goes by).
fn mark_used(dir: &Path) {
    let touched =
        std::fs::File::open(dir).and_then(|d| d.set_modified(std::time::SystemTime::now()));
    if let Err(e) = touched {
        tracing::debug!(template = %dir.display(), "cannot mark the VM template used: {e}");
    }
}

/// Removes the least recently used complete templates under `root` beyond the
/// `keep` newest. A sandbox resuming one of them at that moment has its files
/// open and is unaffected; one about to open them falls back to a boot.
fn prune(root: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut templates: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| is_complete(p))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    templates.sort_by_key(|t| std::cmp::Reverse(t.0));
    for (_, dir) in templates.into_iter().skip(keep) {
        tracing::info!(template = %dir.display(), "removing the least recently used VM template");
        discard(&dir);
        if let Some(key) = dir.file_name() {
            let mut lock = key.to_owned();
            lock.push(".lock");
            remove_lock_file(&root.join(lock));
        }
    }
}

/// Removes a maker's lock file, unless someone holds it. It is unlinked
/// while we hold it, so anyone who opened it before gets the lock on a file
/// that is gone, which [`lock_exclusive`] notices and retries.
fn remove_lock_file(path: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) else {
        return;
    };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        let _ = std::fs::remove_file(path);
    }
}

/// A template being made: removed unless committed, also when the making is
/// abandoned halfway (the caller's future dropped on a signal).
struct Staging(PathBuf);

impl Staging {
    fn create(path: PathBuf) -> Result<Staging, SandboxError> {
        // What a maker that died left behind.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).map_err(|source| SandboxError::Io {
            what: "create",
            path: path.clone(),
            source,
        })?;
        Ok(Staging(path))
    }

    fn commit(self, dir: &Path) -> Result<(), SandboxError> {
        std::fs::rename(&self.0, dir).map_err(|source| SandboxError::Io {
            what: "rename into place",
            path: self.0.clone(),
            source,
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // After a commit the path is gone and this does nothing.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Gives a VM resumed from a template the go: its agent waits for a connection
/// on the resume port (the template was saved in that wait). Retried until the
/// VMM's vsock socket takes it, for at most `timeout`; fails at once if the
/// VMM exits (a snapshot it could not restore).
pub(super) async fn resume(
    vm: &mut VmProcesses,
    dir: &SandboxDir,
    timeout: Duration,
) -> Result<(), SandboxError> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = super::vsock::connect(&vm.vsock_uds, AGENT_RESUME_PORT, timeout).await;
        match attempt {
            Ok(go) => {
                drop(go);
                return Ok(());
            }
            Err(e) => {
                if let Some(status) = vm.vmm.try_exit() {
                    return Err(SandboxError::VmGone {
                        status,
                        vmm_tail: vm.vmm.log_tail(TAIL_LINES),
                        console_tail: tail(&dir.file("console.log"), TAIL_LINES),
                    });
                }
                if Instant::now() >= deadline {
                    return Err(e);
                }
                // The socket is ours from the start (see `VmProcesses::start`),
                // so the connection waited for the VMM; an error here is the
                // guest refusing the port, which a retry may get past.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

/// Removes a template that failed to resume, so the next sandbox remakes it.
pub fn discard(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(template = %dir.display(), "cannot remove the VM template: {e}");
    }
}

fn is_complete(dir: &Path) -> bool {
    dir.join("state.json").is_file() && dir.join("memory").is_file()
}

/// The template key of `config`: a hash of what the saved VM depends on.
fn key(config: &SandboxConfig) -> Result<String, SandboxError> {
    // SipHash with fixed keys: stable for a given build, which is all a cache
    // on tmpfs needs (the VMM's own size and mtime are part of the key).
    let mut h = std::collections::hash_map::DefaultHasher::new();
    TEMPLATE_GENERATION.hash(&mut h);
    for file in [
        &config.kernel,
        &config.initrd,
        &config.vmm,
        &config.virtiofsd,
    ] {
        let meta = std::fs::metadata(file).map_err(|source| SandboxError::Io {
            what: "read the metadata of",
            path: file.clone(),
            source,
        })?;
        file.hash(&mut h);
        (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino()).hash(&mut h);
    }
    (config.vcpus, config.memory_mib, config.debug_console).hash(&mut h);
    Ok(format!(
        "{}c-{}m-{:016x}",
        config.vcpus,
        config.memory_mib,
        h.finish()
    ))
}

/// Boots a template VM for `config`'s shape and lets bulkhead-vmm save it into
/// `staging`; its sandbox directory is gone afterwards, whatever happened.
async fn make(config: &SandboxConfig, key: &str, staging: &Path) -> Result<(), SandboxError> {
    let id = format!(".template-{key}");
    // A crashed maker's leftovers (its processes died with it: PDEATHSIG).
    let _ = super::force_remove(&config.run_root, &id);
    let dir = SandboxDir::create(&config.run_root, &id)?;
    let staging_text = staging.to_string_lossy().into_owned();
    let mut vm = VmProcesses::start(config, &dir, None, |vm_config| {
        vm_config["save_snapshot"] = staging_text.into();
    })?;
    let deadline = Instant::now() + config.boot_timeout;
    let status = loop {
        if let Some(status) = vm.vmm.try_exit() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let console_tail = tail(&dir.file("console.log"), TAIL_LINES);
    let result = match status {
        Some(_) if is_complete(staging) => Ok(()),
        Some(status) if status.success() => Err(SandboxError::Agent(format!(
            "the template VM stopped ({status}) without saving a snapshot; its console ended with:\n{console_tail}"
        ))),
        Some(status) => Err(SandboxError::VmGone {
            status,
            vmm_tail: vm.vmm.log_tail(TAIL_LINES),
            console_tail,
        }),
        None => {
            vm.vmm.kill().await;
            Err(SandboxError::BootTimeout {
                secs: config.boot_timeout.as_secs(),
                console_tail,
            })
        }
    };
    vm.virtiofsd.stop(Duration::from_secs(2)).await;
    drop(vm);
    dir.remove()?;
    result
}

/// Takes an exclusive flock on `path` (created if missing), waiting for it on
/// a blocking thread; released when the returned file is dropped.
async fn lock_exclusive(path: &Path) -> Result<std::fs::File, SandboxError> {
    let io = |source| SandboxError::Io {
        what: "lock",
        path: path.to_owned(),
        source,
    };
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::os::fd::AsRawFd;
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            // SAFETY: flock on a descriptor this closure owns.
            while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // Pruning may have unlinked the file while we waited: a lock on
            // it excludes no one who opens the path now. Lock the new file.
            let held = file.metadata()?;
            if let Ok(now) = std::fs::metadata(&path) {
                if (now.dev(), now.ino()) == (held.dev(), held.ino()) {
                    return Ok(file);
                }
            }
        }
    })
    .await
    .map_err(|e| io(std::io::Error::other(e)))?
    .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn fake_template(root: &Path, key: &str, age_secs: u64) -> PathBuf {
        let dir = root.join(key);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("state.json"), "{}").unwrap();
        std::fs::write(dir.join("memory"), "").unwrap();
        std::fs::write(root.join(format!("{key}.lock")), "").unwrap();
        let when = SystemTime::now() - Duration::from_secs(age_secs);
        std::fs::File::open(&dir)
            .unwrap()
            .set_modified(when)
            .unwrap();
        dir
    }

    #[test]
    fn pruning_keeps_the_most_recently_used_templates() {
        let root = tempfile::tempdir().unwrap();
        let old = fake_template(root.path(), "1c-224m-old", 300);
        let used = fake_template(root.path(), "1c-224m-used", 200);
        let new = fake_template(root.path(), "2c-512m-new", 100);
        // Being made: never counted, never removed.
        std::fs::create_dir(root.path().join("4c-1024m-x.staging")).unwrap();
        mark_used(&used);
        prune(root.path(), 2);
        assert!(!old.exists());
        assert!(!root.path().join("1c-224m-old.lock").exists());
        // A lock someone holds stays: removing it would let a second maker in.
        let held = std::fs::File::create(root.path().join("2c-512m-new.lock")).unwrap();
        // SAFETY: flock on a descriptor we own.
        let locked = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) };
        assert_eq!(locked, 0);
        assert!(used.exists() && new.exists());
        assert!(root.path().join("4c-1024m-x.staging").exists());
        prune(root.path(), 1);
        assert!(used.exists() && !new.exists());
        assert!(root.path().join("2c-512m-new.lock").exists());
    }

    #[tokio::test]
    async fn a_lock_taken_on_a_pruned_file_is_taken_again_on_the_new_one() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("k.lock");
        let first = lock_exclusive(&path).await.unwrap();
        let waiter = tokio::spawn({
            let path = path.clone();
            async move { lock_exclusive(&path).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // As prune does, but while the first holder still has it (the waiter
        // opened the file before it went).
        std::fs::remove_file(&path).unwrap();
        drop(first);
        let second = waiter.await.unwrap();
        let (held, named) = (
            second.metadata().unwrap(),
            std::fs::metadata(&path).unwrap(),
        );
        assert_eq!((held.dev(), held.ino()), (named.dev(), named.ino()));
    }
}
