//! `cargo xtask guest --out DIR`: what a bulkhead microVM boots, DIR/vmlinux (the
//! cached guest kernel) and DIR/initrd.img (the static agent as /init, nothing else).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::initramfs::cpio::CpioWriter;

use crate::{kernel, workspace};

/// The guest's two boot artifacts.
pub struct Guest {
    /// The uncompressed kernel.
    pub kernel: PathBuf,
    /// The initrd with the agent as /init.
    pub initrd: PathBuf,
}

/// Builds (or reuses) the kernel and the initrd into `out`.
pub fn build(out: &Path) -> Result<Guest> {
    let kernel = kernel::build(out)?;
    let agent = build_agent()?;
    let initrd = out.join("initrd.img");
    pack_initrd(&agent, &initrd)?;
    Ok(Guest { kernel, initrd })
}

/// Builds `bulkhead-agent` as a static executable (it is PID 1 of a guest with no
/// libc), in a target dir of its own so that its RUSTFLAGS do not invalidate the
/// workspace's normal build.
pub fn build_agent() -> Result<PathBuf> {
    let root = workspace::root();
    let target_dir = root.join("target").join("agent-static");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("guest: building bulkhead-agent (static)");
    let status = Command::new(&cargo)
        .args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "bulkhead-agent",
        ])
        .args(["--target", workspace::HOST_TRIPLE])
        .arg("--target-dir")
        .arg(&target_dir)
        // Not position-independent: the agent also runs as every container's
        // init, and a static-pie binary relocates itself (17,000 relocations,
        // 300 KiB of pages copied on write) at each of those execs. Address
        // randomisation would buy little here: every copy of a VM template
        // shares the template's layout anyway.
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C relocation-model=static",
        )
        // Every byte of the initrd is copied into each VM, unpacked by its
        // kernel at boot, and then held twice in a VM template's memory (the
        // freed initrd is poisoned, not zeroed). So: no symbol table, and
        // optimised for size with whole-program LTO: 5.9 MiB instead of 8.2,
        // and no slower (under emulation, sandboxes started sooner with it,
        // templates or not, and stdout throughput was no lower).
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s")
        .env("CARGO_PROFILE_RELEASE_LTO", "fat")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        // libseccomp is linked statically into the agent.
        .env("LIBSECCOMP_LINK_TYPE", "static")
        .env("LIBSECCOMP_LIB_PATH", "/usr/lib/x86_64-linux-gnu")
        .current_dir(&root)
        .status()
        .with_context(|| format!("cannot run {cargo}"))?;
    ensure!(
        status.success(),
        "building the static bulkhead-agent failed ({status})"
    );
    let agent = target_dir
        .join(workspace::HOST_TRIPLE)
        .join("release")
        .join("bulkhead-agent");
    ensure!(
        is_static(&agent)?,
        "{} is not statically linked",
        agent.display()
    );
    Ok(agent)
}

/// A static ELF has no PT_INTERP program header (no dynamic loader).
fn is_static(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        bytes.len() > 64 && bytes.starts_with(b"\x7fELF"),
        "{} is not an ELF file",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at =
        |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or_default()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let kind = bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        ensure!(
            kind.is_some(),
            "{} has a truncated program header table",
            path.display()
        );
        if kind == Some(PT_INTERP) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Writes the initrd: /init (the agent) and the mount points it needs before it
/// can create anything itself. Rewritten only when its bytes change, so the
/// file's mtime tells when the agent last changed.
fn pack_initrd(agent: &Path, out: &Path) -> Result<()> {
    let mut w = CpioWriter::new(Vec::new());
    for dir in ["dev", "proc", "sys", "run", "tmp"] {
        w.dir(dir, 0o755)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.file_from_host("init", 0o755, agent)?;
    let bytes = w.finish()?;
    if std::fs::read(out).ok().as_deref() == Some(bytes.as_slice()) {
        println!("guest: initrd unchanged {}", out.display());
        return Ok(());
    }
    let tmp = out.with_extension("img.tmp");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    println!(
        "guest: initrd {} ({:.1} MiB)",
        out.display(),
        bytes.len() as f64 / (1 << 20) as f64
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_executables_are_not_static() {
        // Any dynamically linked program on the machine has PT_INTERP.
        let sh = Path::new("/bin/sh");
        if sh.exists() {
            assert!(!is_static(sh).unwrap());
        }
        let busybox = Path::new("/bin/busybox");
        if busybox.exists() {
            assert!(
                is_static(busybox).unwrap(),
                "busybox-static should be static"
            );
        }
    }
}
