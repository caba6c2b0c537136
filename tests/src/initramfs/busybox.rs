//! Minimal busybox-based initrds for test guests.
//!
//! Guests booted by the tests (the emulated host itself, and the microVMs booted
//! inside it) need a tiny userland: a static busybox, a few directories, a console
//! node and an `/init` script. This builds exactly that.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::cpio::CpioWriter;
use crate::error::{Error, IoContext, Result};
use crate::process;

/// Where Debian's `busybox-static` package installs its binary.
pub const BUSYBOX_PATH: &str = "/bin/busybox";

/// `PT_INTERP`: the program header that names a dynamic loader.
const PT_INTERP: u32 = 3;

/// A static busybox binary checked to be usable in an initrd.
///
/// Exists so that the check (statically linked, readable) and the applet list are
/// done once per initrd build, and so a dynamic busybox is refused with a clear
/// error instead of a guest that dies with "init not found".
#[derive(Debug, Clone)]
pub struct Busybox {
    /// Path of the binary on this machine.
    pub path: PathBuf,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Names of the applets it provides (`busybox --list`).
    pub applets: Vec<String>,
}

impl Busybox {
    /// Load and check the busybox at [`BUSYBOX_PATH`].
    pub fn system() -> Result<Busybox> {
        Busybox::load(Path::new(BUSYBOX_PATH))
    }

    /// Load and check the busybox at `path`.
    pub fn load(path: &Path) -> Result<Busybox> {
        let bytes = std::fs::read(path).at("reading", path)?;
        if !is_static_elf(&bytes) {
            return Err(Error::BusyboxNotStatic {
                path: path.to_path_buf(),
            });
        }
        let out = process::run(Command::new(path).arg("--list"), Duration::from_secs(30))?;
        let applets: Vec<String> = out
            .stdout
            .lines()
            .map(str::trim)
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .map(String::from)
            .collect();
        if !applets.iter().any(|a| a == "sh") {
            return Err(Error::UnexpectedOutput {
                command: format!("{} --list", path.display()),
                detail: "no `sh` applet listed".into(),
            });
        }
        Ok(Busybox {
            path: path.to_path_buf(),
            bytes,
            applets,
        })
    }
}

/// True if `elf` is a 64-bit little-endian ELF executable without a program
/// interpreter, i.e. statically linked.
pub fn is_static_elf(elf: &[u8]) -> bool {
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // Magic, ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        u32_at(at).is_some_and(|p_type| p_type != PT_INTERP)
    })
}

/// Start an initrd holding `busybox` as `/bin/busybox`, a `/bin` symlink for each
/// of its applets, `/dev` (with `/dev/console` 5:1, which the kernel needs to give
/// `/init` a console), `/proc`, `/sys`, `/tmp`, `/run`, and `/init` = `init_script`
/// with mode 0755.
///
/// The writer is returned unfinished so callers can add more entries (modules,
/// scripts) before calling [`CpioWriter::finish`].
pub fn busybox_archive(
    busybox: &Busybox,
    init_script: &str,
) -> std::io::Result<CpioWriter<Vec<u8>>> {
    let mut w = CpioWriter::new(Vec::new());
    for dir in ["bin", "dev", "proc", "sys", "tmp", "run"] {
        w.dir(dir, 0o755)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.file("bin/busybox", 0o755, &busybox.bytes)?;
    for applet in busybox.applets.iter().filter(|a| a.as_str() != "busybox") {
        w.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    w.file("init", 0o755, init_script.as_bytes())?;
    Ok(w)
}

/// Write a busybox initrd (see [`busybox_archive`]) whose `/init` is `init_script`
/// to `out`, using the system's static busybox.
///
/// The script should start with `#!/bin/sh`; `PATH` is not set when the kernel
/// starts it, so it should set `PATH=/bin` or call applets by full path.
pub fn busybox_initrd(init_script: &str, out: &Path) -> Result<()> {
    let busybox = Busybox::system()?;
    let archive = busybox_archive(&busybox, init_script)
        .and_then(|w| w.finish())
        .at("building initrd", out)?;
    std::fs::write(out, archive).at("writing", out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_busybox_is_static() {
        let Ok(bytes) = std::fs::read(BUSYBOX_PATH) else {
            eprintln!("no {BUSYBOX_PATH}; skipping");
            return;
        };
        assert!(is_static_elf(&bytes));
    }

    #[test]
    fn dynamic_binary_is_not_static() {
        let bytes = std::fs::read("/bin/sh").expect("/bin/sh exists");
        assert!(!is_static_elf(&bytes));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        assert!(!is_static_elf(b""));
    }

    #[test]
    fn initrd_lists_expected_entries() {
        if !Path::new(BUSYBOX_PATH).exists() {
            eprintln!("no {BUSYBOX_PATH}; skipping");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("initrd.cpio");
        busybox_initrd("#!/bin/sh\necho hi\n", &out).expect("initrd");
        let listing = process::run(
            Command::new("sh").arg("-c").arg(format!(
                "cpio -t -v --quiet < {}",
                crate::shell::quote(&out.to_string_lossy())
            )),
            Duration::from_secs(30),
        )
        .expect("cpio -t");
        let has = |suffix: &str| listing.stdout.lines().any(|l| l.ends_with(suffix));
        assert!(has(" init"), "{}", listing.stdout);
        assert!(has(" bin/busybox"));
        assert!(has(" bin/sh -> busybox"));
        assert!(listing
            .stdout
            .lines()
            .any(|l| l.starts_with('c') && l.ends_with(" dev/console")));
    }
}
