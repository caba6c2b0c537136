//! PID 1 leaves the initramfs for a tmpfs root, like `switch_root`.
//!
//! The kernel starts `/init` on the initial `rootfs` mount, and `pivot_root(2)`
//! refuses to move that mount away (EINVAL), so no container could be made with
//! a proper `pivot_root`. PID 1 therefore copies itself to a fresh tmpfs, moves
//! that tmpfs over `/`, `chroot`s into it and re-executes itself from there. A
//! marker file tells the re-executed PID 1 that the switch is done.

use std::ffi::{CString, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// Marks the tmpfs root made by [`leave_initramfs`].
pub const MARKER: &str = "/.bulkhead-root";

const NEW_ROOT: &str = "/.bulkhead-newroot";

/// If `/` is still the initramfs, switches to a tmpfs root and re-executes
/// `/init` with `args` (only returns on failure). Does nothing once switched.
pub fn leave_initramfs(args: &[OsString]) -> io::Result<()> {
    if Path::new(MARKER).exists() {
        return Ok(());
    }
    let err = |what: &str, e: nix::Error| io::Error::other(format!("{what}: {e}"));
    fs::create_dir_all(NEW_ROOT)?;
    mount(
        Some("tmpfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|e| err("mounting a tmpfs root", e))?;
    let root = Path::new(NEW_ROOT);
    for dir in ["dev", "proc", "sys", "run", "tmp"] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::copy("/init", root.join("init"))?;
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755))?;
    fs::write(root.join(MARKER.trim_start_matches('/')), b"")?;
    // The initramfs copy is no longer needed (its pages are freed once the
    // running image is replaced by the exec below).
    let _ = fs::remove_file("/init");
    std::env::set_current_dir(root)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| err("moving the tmpfs root over /", e))?;
    nix::unistd::chroot(".").map_err(|e| err("chroot", e))?;
    std::env::set_current_dir("/")?;
    let argv: Vec<CString> = args
        .iter()
        .filter_map(|a| CString::new(a.as_bytes().to_vec()).ok())
        .collect();
    let init = CString::new("/init").map_err(io::Error::other)?;
    let e = nix::unistd::execv(&init, &argv).err();
    Err(io::Error::other(format!("re-executing /init: {e:?}")))
}
