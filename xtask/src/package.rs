//! `cargo xtask package`: bulkhead as a Debian package, installable with
//! `apt-get install ./bulkhead_<version>_amd64.deb` on a machine that has no
//! source tree.
//!
//! Every file in it is built by the other tasks already (the static binaries,
//! the guest, the embedded image), so this stages them in the tree they
//! install as, writes the control files and hands the tree to `dpkg-deb`,
//! which every Debian machine has. cargo-deb would do the same from Cargo
//! metadata, at the price of one more tool to compile on each fresh machine
//! and of asset paths pointing into a custom target directory; there is no
//! Cargo-driven build step left for it to do here.

mod control;

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::{images, setup, workspace};

/// Where the installed files of each kind go.
mod layout {
    /// The host binaries; the CLI finds bulkhead-vmm next to itself, and
    /// containerd finds the shim on its `PATH`.
    pub const BIN: &str = "usr/bin";
    /// virtiofsd, private to bulkhead: Debian 12 has no Rust virtiofsd, and
    /// QEMU 7.2's C one (`/usr/lib/qemu/virtiofsd`) takes other flags.
    pub const LIBEXEC: &str = "usr/libexec/bulkhead";
    /// The guest kernel and initrd, the embedded image, the containerd snippet.
    pub const SHARE: &str = "usr/share/bulkhead";
    /// The default config, a conffile: dpkg keeps a user's edits on upgrade.
    pub const CONFIG: &str = "etc/bulkhead/config.toml";
}

/// Builds everything, stages the package's tree and writes
/// `target/package/bulkhead_<version>_amd64.deb`; returns its path.
pub fn build() -> Result<PathBuf> {
    workspace::build_release_runtime()?;
    let image = images::busybox_archive()?;
    let virtiofsd = setup::find_virtiofsd().context(
        "virtiofsd not found (the package ships it): run `cargo xtask setup`, which installs it",
    )?;

    let out_dir = workspace::root().join("target").join("package");
    let name = format!("bulkhead_{}_amd64", control::VERSION);
    let stage = out_dir.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }

    let bins = workspace::release_bin_dir();
    for bin in [
        "bulkhead",
        "bulkhead-runtime",
        "containerd-shim-bulkhead-v2",
        "bulkhead-vmm",
    ] {
        install(&bins.join(bin), &stage.join(layout::BIN).join(bin), 0o755)?;
    }
    install(
        &virtiofsd,
        &stage.join(layout::LIBEXEC).join("virtiofsd"),
        0o755,
    )?;
    let guest = workspace::guest_dir();
    let share = stage.join(layout::SHARE);
    for file in ["vmlinux", "initrd.img"] {
        install(&guest.join(file), &share.join(file), 0o644)?;
    }
    install(&image, &share.join("images").join("busybox.tar"), 0o644)?;
    write(
        &share.join("containerd").join("bulkhead.toml"),
        &containerd_snippet(),
        0o644,
    )?;
    install(
        &workspace::root().join("shim").join("config.example.toml"),
        &stage.join(layout::CONFIG),
        0o644,
    )?;
    let cli = bins.join("bulkhead");
    write_completions(&cli, &stage)?;
    write_man_pages(&stage.join("usr/share/man/man1"))?;
    write(
        &stage.join("usr/share/doc/bulkhead/copyright"),
        control::COPYRIGHT,
        0o644,
    )?;

    let depends = control::depends_of(&virtiofsd)?;
    control::write_debian_dir(&stage, &depends, &[layout::CONFIG])?;
    let deb = out_dir.join(format!("{name}.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb)
        .status()
        .context("cannot run dpkg-deb")?;
    ensure!(
        status.success(),
        "dpkg-deb --build {} failed",
        stage.display()
    );
    let size = fs::metadata(&deb)?.len();
    println!(
        "package: {} ({:.1} MiB; Depends: {})",
        deb.display(),
        size as f64 / (1 << 20) as f64,
        depends.join(", ")
    );
    Ok(deb)
}

/// containerd's lines registering the runtime, as `bulkhead doctor` asks for
/// them, for containerd's config or a file it imports.
fn containerd_snippet() -> String {
    format!(
        "# Registers bulkhead's runtime with containerd's CRI plugin (Kubernetes\n\
         # RuntimeClass handler `bulkhead`). Add these lines to\n\
         # /etc/containerd/config.toml (a `version = 2` config), or import this\n\
         # file from it: imports = [\"/usr/share/bulkhead/containerd/bulkhead.toml\"]\n\
         # then restart containerd. `bulkhead doctor` checks the result.\n\
         version = 2\n\n{}",
        bulkhead::cli::doctor::registration_snippet(2)
    )
}

/// Bash, zsh and fish completions, from the CLI itself (`bulkhead completion`),
/// where each shell's packages put them.
fn write_completions(cli: &Path, stage: &Path) -> Result<()> {
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/bulkhead"),
        ("zsh", "usr/share/zsh/vendor-completions/_bulkhead"),
        ("fish", "usr/share/fish/vendor_completions.d/bulkhead.fish"),
    ] {
        let out = Command::new(cli)
            .args(["completion", shell])
            .output()
            .with_context(|| format!("cannot run {}", cli.display()))?;
        ensure!(
            out.status.success() && !out.stdout.is_empty(),
            "bulkhead completion {shell} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        write(&stage.join(path), &String::from_utf8(out.stdout)?, 0o644)?;
    }
    Ok(())
}

/// `bulkhead(1)` and one page per subcommand (`bulkhead-run(1)`, ...), as git
/// and docker ship them, rendered from the CLI's own grammar and gzipped as
/// Debian policy wants.
fn write_man_pages(dir: &Path) -> Result<()> {
    let cli = bulkhead::cli::args::command();
    let mut pages = vec![cli.clone()];
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        // clap takes only 'static names (without its `string` feature); a
        // few bytes leaked once in a build tool is the simple way.
        let name: &'static str = format!("bulkhead-{}", sub.get_name()).leak();
        pages.push(sub.clone().name(name).bin_name(name));
    }
    for page in pages {
        let mut roff = Vec::new();
        clap_mangen::Man::new(page.clone())
            .render(&mut roff)
            .with_context(|| format!("rendering the man page of {}", page.get_name()))?;
        let path = dir.join(format!("{}.1.gz", page.get_name()));
        // No name or time in the gzip header: the same input gives the same bytes.
        let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
        gz.write_all(&roff)?;
        write_bytes(&path, &gz.finish()?, 0o644)?;
    }
    Ok(())
}

/// Copies `from` to `to` (making its folder) with `mode`.
fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if !from.is_file() {
        bail!("{} is missing: the build did not make it", from.display());
    }
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write_bytes(to, &bytes, mode)
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    write_bytes(path, text.as_bytes(), mode)
}

fn write_bytes(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}
