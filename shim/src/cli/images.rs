//! `bulkhead pull`, `load`, `images` and `rmi`, and choosing the image of a
//! `bulkhead run`, on the image store under `<state_root>/images`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bulkhead_image::{
    familiar, normalize, ImageRecord, LoadOptions, PullOptions, Store, StoreError,
};

use super::containers::{Containers, Status};
use crate::config::Config;

/// The store of this host's images.
pub fn store(config: &Config) -> Result<Store> {
    let root = super::state_root(config).join("images");
    Store::open(&root).with_context(|| format!("opening the image store {}", root.display()))
}

/// What a `run` takes from its image.
#[derive(Clone, Debug)]
pub struct ImageChoice {
    /// As the user named it.
    pub name: String,
    /// The image id.
    pub id: String,
    /// Its unpacked rootfs (the overlay's lower layer).
    pub rootfs: PathBuf,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Cmd.
    pub cmd: Vec<String>,
    /// Env.
    pub env: Vec<String>,
    /// WorkingDir.
    pub working_dir: String,
    /// User.
    pub user: String,
    /// StopSignal as a number.
    pub stop_signal: i32,
}

impl ImageChoice {
    /// No image: a `--rootfs` directory with Docker's defaults.
    pub fn none(rootfs: PathBuf) -> ImageChoice {
        ImageChoice {
            name: format!("rootfs:{}", rootfs.display()),
            id: String::new(),
            rootfs,
            entrypoint: vec![],
            cmd: vec![],
            env: vec![],
            working_dir: String::new(),
            user: String::new(),
            stop_signal: libc::SIGTERM,
        }
    }
}

/// The image `reference` names, pulled first when the store does not have
/// it (as `docker run` does).
pub async fn for_run(config: &Config, reference: &str) -> Result<ImageChoice> {
    let store = store(config)?;
    let image = match store.get(reference) {
        Ok(image) => image,
        Err(StoreError::NotFound { .. }) => {
            eprintln!("bulkhead: image {reference} not found here; pulling it");
            pull_with(&store, reference, config).await?
        }
        Err(e) => return Err(e.into()),
    };
    let c = &image.config;
    let stop_signal = match c.stop_signal.as_deref() {
        Some(s) if !s.is_empty() => super::flags::parse_signal(s)
            .with_context(|| format!("the image {reference}'s StopSignal"))?,
        _ => libc::SIGTERM,
    };
    Ok(ImageChoice {
        name: reference.to_owned(),
        rootfs: store.rootfs(&image),
        id: image.id,
        entrypoint: c.entrypoint.clone(),
        cmd: c.cmd.clone(),
        env: c.env.clone(),
        working_dir: c.working_dir.clone(),
        user: c.user.clone(),
        stop_signal,
    })
}

async fn pull_with(store: &Store, reference: &str, config: &Config) -> Result<ImageRecord> {
    let _ = config;
    let opts = PullOptions {
        progress: std::io::stderr().is_terminal(),
        insecure_registries: insecure_registries(),
        ..Default::default()
    };
    Ok(store.pull(reference, &opts).await?)
}

/// `$BULKHEAD_INSECURE_REGISTRIES`: comma-separated `host[:port]` that may be
/// reached over plain HTTP (besides localhost, which always may).
fn insecure_registries() -> Vec<String> {
    std::env::var("BULKHEAD_INSECURE_REGISTRIES")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `bulkhead pull REF`.
pub async fn pull(config: &Config, reference: &str, insecure: &[String]) -> Result<()> {
    let store = store(config)?;
    let mut opts = PullOptions {
        progress: std::io::stderr().is_terminal(),
        insecure_registries: insecure_registries(),
        ..Default::default()
    };
    opts.insecure_registries.extend(insecure.iter().cloned());
    let image = store.pull(reference, &opts).await?;
    println!("{} {}", familiar(&normalize(reference)?), image.id);
    Ok(())
}

/// `bulkhead load -i FILE [--tag NAME]`.
pub fn load(config: &Config, input: &Path, tag: Option<String>) -> Result<()> {
    let store = store(config)?;
    let loaded = store.load(
        input,
        &LoadOptions {
            tag,
            progress: std::io::stderr().is_terminal(),
        },
    )?;
    for image in loaded {
        if image.names.is_empty() {
            println!("Loaded image ID: {}", image.id);
        }
        for name in &image.names {
            println!("Loaded image: {}", familiar(name));
        }
    }
    Ok(())
}

/// `bulkhead images`: one line per name (and one per unnamed image).
pub fn list(config: &Config, quiet: bool) -> Result<()> {
    let store = store(config)?;
    let mut images = store.list()?;
    images.sort_by_key(|i| std::cmp::Reverse(i.created.clone()));
    if quiet {
        for image in &images {
            println!("{}", short_image_id(&image.id));
        }
        return Ok(());
    }
    println!(
        "{:<40} {:<16} {:<14} {:>10}",
        "REPOSITORY", "TAG", "IMAGE ID", "SIZE"
    );
    for image in &images {
        let size = human_size(image.size);
        let id = short_image_id(&image.id);
        if image.names.is_empty() {
            println!("{:<40} {:<16} {:<14} {:>10}", "<none>", "<none>", id, size);
        }
        for name in &image.names {
            let familiar = familiar(name);
            let (repo, tag) = split_tag(&familiar);
            println!("{repo:<40} {tag:<16} {id:<14} {size:>10}");
        }
    }
    Ok(())
}

/// `bulkhead rmi IMAGE...`: refused while a container (even a stopped one)
/// uses the image, unless `force`, as Docker does: the container's overlay
/// has the image's rootfs as its lower layer.
pub fn remove(config: &Config, references: &[String], force: bool) -> Result<()> {
    let store = store(config)?;
    let containers = Containers::open(&super::state_root(config))?;
    let mut failed = false;
    for reference in references {
        let result = (|| -> Result<()> {
            let image = store.get(reference)?;
            // Removing by name only untags while other names remain; by id,
            // or the last name, deletes the rootfs containers stand on.
            let by_name = normalize(reference).is_ok_and(|n| image.names.contains(&n));
            let deletes = !by_name || image.names.len() <= 1;
            if deletes {
                for id in containers.ids()? {
                    let Ok(record) = containers.record(&id) else {
                        continue;
                    };
                    if record.image_id.as_deref() != Some(image.id.as_str()) {
                        continue;
                    }
                    let running = containers
                        .state(&id)
                        .is_ok_and(|s| s.effective_status() != Status::Exited);
                    if running || !force {
                        bail!(
                            "image {reference} is used by {} container {} ({}): remove it first (`bulkhead rm{} {}`){}",
                            if running { "running" } else { "stopped" },
                            record.name,
                            record.short_id(),
                            if running { " -f" } else { "" },
                            record.name,
                            if running { "" } else { ", or use rmi -f" }
                        );
                    }
                }
            }
            let removed = store.remove(reference)?;
            for name in removed.untagged {
                println!("Untagged: {}", familiar(&name));
            }
            for id in removed.deleted {
                println!("Deleted: {id}");
            }
            Ok(())
        })();
        if let Err(e) = result {
            eprintln!("bulkhead: {e:#}");
            failed = true;
        }
    }
    if failed {
        bail!("some images were not removed");
    }
    Ok(())
}

fn short_image_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

/// "busybox:latest" -> ("busybox", "latest"); a digest reference keeps it as the tag.
fn split_tag(name: &str) -> (&str, &str) {
    if let Some((repo, digest)) = name.split_once('@') {
        return (repo, digest);
    }
    match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], &name[i + 1..]),
        _ => (name, "<none>"),
    }
}

/// Sizes as `docker images` prints them (decimal units).
pub fn human_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2}GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1}MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1}kB", b / 1e3)
    } else {
        format!("{bytes}B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_like_docker_images_shows_them() {
        assert_eq!(split_tag("busybox:latest"), ("busybox", "latest"));
        assert_eq!(
            split_tag("localhost:5000/x/y:1"),
            ("localhost:5000/x/y", "1")
        );
        assert_eq!(
            split_tag("localhost:5000/x"),
            ("localhost:5000/x", "<none>")
        );
        assert_eq!(split_tag("a@sha256:00"), ("a", "sha256:00"));
        assert_eq!(human_size(4_400_000), "4.4MB");
        assert_eq!(short_image_id("sha256:0123456789abcdef"), "0123456789ab");
    }
}
