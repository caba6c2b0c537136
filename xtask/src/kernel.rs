//! `cargo xtask kernel`: build the guest kernel once per input and cache it.
//!
//! Inputs: the pinned version in `guest-kernel-config/VERSION`, Debian's source
//! tarball `/usr/src/linux-source-<version>.tar.xz` (package `linux-source-<version>`),
//! and the fragment `guest-kernel-config/bulkhead.config`. The fragment is applied
//! with `make allnoconfig KCONFIG_ALLCONFIG=<fragment>`, then checked against the
//! resulting `.config`, because Kconfig silently drops symbols whose dependencies
//! are unmet. The uncompressed ELF `vmlinux` is cached under
//! `<cache root>/kernel/<version>-<key>/` and hard-linked (or copied) to where the
//! caller wants it. See `guest-kernel-config/README.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

use crate::cmd;

/// Bump when the way the kernel is built changes (make targets, variables,
/// environment) so that kernels built the old way are not reused.
const BUILD_RECIPE_VERSION: u32 = 1;

/// Folder of the kernel version pin and config fragment, relative to the repo root.
const CONFIG_DIR: &str = "guest-kernel-config";

/// How often a long step prints that it is still alive.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// The workspace root: xtask lives in `<root>/xtask`.
fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Builds the guest kernel (or reuses the cached one) and puts it at
/// `out_dir/vmlinux`, which is returned.
///
/// This is `cargo xtask kernel --out DIR`: the single way the project gets its
/// guest kernel, so that every user and CI run boots the same, verified config.
/// A fresh build takes about 5 minutes on 2 cores; a cached call, milliseconds.
pub fn build(out_dir: &Path) -> Result<PathBuf> {
    let cache = bulkhead_tests::cache::cache_root();
    let inputs = Inputs::load(&repo_root(), &cache)?;
    let entry = inputs.entry_dir(&cache);
    let cached = entry.join("vmlinux");
    if cached.is_file() {
        println!("kernel: cached {} ({})", cached.display(), mib(&cached)?);
    } else {
        build_into_cache(&inputs, &cache, &entry)?;
    }
    let placed = place(&cached, out_dir)?;
    if placed != cached {
        println!("kernel: {}", placed.display());
    }
    Ok(placed)
}

/// Everything the kernel build depends on, read once.
struct Inputs {
    /// Kernel version, e.g. "6.12".
    version: String,
    /// Debian's source tarball.
    tarball: PathBuf,
    /// Hex sha256 of the tarball.
    tarball_sha256: String,
    /// The fragment's bytes as hashed (and as given to Kconfig).
    fragment: Vec<u8>,
    /// Where the fragment was read from, for messages.
    fragment_path: PathBuf,
}

impl Inputs {
    fn load(repo_root: &Path, cache: &Path) -> Result<Self> {
        let dir = repo_root.join(CONFIG_DIR);
        let version_path = dir.join("VERSION");
        let version = fs::read_to_string(&version_path)
            .with_context(|| format!("cannot read kernel version pin {}", version_path.display()))?
            .trim()
            .to_string();
        ensure!(
            !version.is_empty() && version.chars().all(|c| c.is_ascii_digit() || c == '.'),
            "{}: expected a kernel version like 6.12, found {version:?}",
            version_path.display()
        );
        let fragment_path = dir.join("bulkhead.config");
        let fragment = fs::read(&fragment_path)
            .with_context(|| format!("cannot read config fragment {}", fragment_path.display()))?;
        let text = std::str::from_utf8(&fragment)
            .with_context(|| format!("{} is not UTF-8", fragment_path.display()))?;
        parse_fragment(text).with_context(|| format!("in {}", fragment_path.display()))?;

        let tarball = PathBuf::from(format!("/usr/src/linux-source-{version}.tar.xz"));
        if !tarball.is_file() {
            bail!(
                "kernel source {} not found: install Debian package linux-source-{version} \
                 (`cargo xtask setup` does)",
                tarball.display()
            );
        }
        let tarball_sha256 = tarball_digest(&tarball, cache)?;
        Ok(Self {
            version,
            tarball,
            tarball_sha256,
            fragment,
            fragment_path,
        })
    }

    fn key(&self) -> String {
        let name = self
            .tarball
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        cache_key(&self.version, &name, &self.tarball_sha256, &self.fragment)
    }

    fn entry_dir(&self, cache: &Path) -> PathBuf {
        cache
            .join("kernel")
            .join(format!("{}-{}", self.version, &self.key()[..16]))
    }
}

/// sha256 over every input of the build, each length-prefixed so that no two
/// different input sets hash the same bytes.
fn cache_key(version: &str, tarball_name: &str, tarball_sha256: &str, fragment: &[u8]) -> String {
    let mut h = Sha256::new();
    let recipe = BUILD_RECIPE_VERSION.to_string();
    for field in [
        b"bulkhead-guest-kernel".as_slice(),
        recipe.as_bytes(),
        version.as_bytes(),
        tarball_name.as_bytes(),
        tarball_sha256.as_bytes(),
        fragment,
    ] {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field);
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The tarball's sha256, remembered in the cache next to the file's identity
/// (path, size, mtime, inode) so that a cached call does not rehash 150 MB.
fn tarball_digest(tarball: &Path, cache: &Path) -> Result<String> {
    let meta =
        fs::metadata(tarball).with_context(|| format!("cannot stat {}", tarball.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let identity = format!(
        "{}\t{}\t{}\t{}\t{}",
        tarball.display(),
        meta.len(),
        mtime,
        meta.dev(),
        meta.ino()
    );
    let name = tarball
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "source".into());
    let memo = cache
        .join("kernel")
        .join("source-digests")
        .join(format!("{name}.sha256"));
    if let Ok(text) = fs::read_to_string(&memo) {
        if let Some((id, digest)) = text.trim_end().rsplit_once('\t') {
            if id == identity && digest.len() == 64 {
                return Ok(digest.to_string());
            }
        }
    }
    println!("kernel: hashing {} (once per tarball)", tarball.display());
    let digest = sha256_file(tarball)?;
    // The memo only saves time: failing to write it is not an error.
    if let Some(dir) = memo.parent() {
        let _ = fs::create_dir_all(dir).and_then(|()| {
            let tmp = memo.with_extension(format!("tmp-{}", std::process::id()));
            fs::write(&tmp, format!("{identity}\t{digest}\n"))?;
            fs::rename(&tmp, &memo)
        });
    }
    Ok(digest)
}

/// Hex sha256 of a file: coreutils' `sha256sum` when it is there (about 20x faster
/// than the `sha2` crate in xtask's unoptimized debug build: 0.5 s against 27 s
/// for the 150 MB tarball), else `sha2`.
fn sha256_file(path: &Path) -> Result<String> {
    if let Ok(out) = Command::new("sha256sum").arg("--").arg(path).output() {
        if out.status.success() {
            if let Some(digest) = String::from_utf8_lossy(&out.stdout).get(..64) {
                if digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Ok(digest.to_ascii_lowercase());
                }
            }
        }
    }
    sha256_file_in_process(path)
}

fn sha256_file_in_process(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// One `CONFIG_X=value` assignment of a fragment or `.config`.
/// `# CONFIG_X is not set` is read as `n`, as Kconfig does.
fn parse_assignment(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("# ") {
        let sym = rest.strip_suffix(" is not set")?;
        return (sym.starts_with("CONFIG_") && is_symbol(sym)).then_some((sym, "n"));
    }
    let (sym, value) = line.split_once('=')?;
    (sym.starts_with("CONFIG_") && is_symbol(sym) && !value.is_empty()).then_some((sym, value))
}

fn is_symbol(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The fragment's assignments in order (a later one of the same symbol wins, as
/// in Kconfig). Any line that is neither blank, a comment, nor an assignment is an
/// error, so that a typo such as `CONFIG_FOO = y` is not silently ignored.
fn parse_fragment(text: &str) -> Result<BTreeMap<&str, &str>> {
    let mut wanted = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if let Some((sym, value)) = parse_assignment(line) {
            wanted.insert(sym, value);
        } else if !(line.trim().is_empty() || line.trim_start().starts_with('#')) {
            bail!("line {}: expected CONFIG_NAME=value, found {line:?}", i + 1);
        }
    }
    Ok(wanted)
}

/// Checks a generated `.config` against the fragment: every `CONFIG_X=<v>` with
/// `v != n` must appear exactly, and every `CONFIG_X=n` must not be `y` or `m`.
/// Returns the mismatches as readable lines (empty: all good).
fn verify_config(fragment: &str, dot_config: &str) -> Result<Vec<String>> {
    let wanted = parse_fragment(fragment)?;
    let got: BTreeMap<&str, &str> = dot_config.lines().filter_map(parse_assignment).collect();
    let mut bad = Vec::new();
    for (sym, want) in wanted {
        let have = got.get(sym).copied();
        let ok = if want == "n" {
            !matches!(have, Some("y" | "m"))
        } else {
            have == Some(want)
        };
        if !ok {
            bad.push(format!(
                "{sym}={want} (got {})",
                match have {
                    Some("n") => "not set".to_string(),
                    Some(v) => format!("{sym}={v}"),
                    None => "absent: dependencies unmet or not a symbol of this kernel".into(),
                }
            ));
        }
    }
    Ok(bad)
}

/// Deletes a folder when dropped, so that an error anywhere in the build does not
/// leave gigabytes of kernel tree behind.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Name prefix of the temporary build folders, followed by `<pid>-<nanos>`.
const BUILD_DIR_PREFIX: &str = ".build-";

/// The pid that owns a temporary build folder named by [`BUILD_DIR_PREFIX`].
fn build_dir_owner(name: &str) -> Option<u32> {
    name.strip_prefix(BUILD_DIR_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Removes build folders of processes that no longer exist (a build killed by
/// Ctrl-C never reaches its cleanup).
fn remove_stale_build_dirs(kernel_dir: &Path) {
    let Ok(entries) = fs::read_dir(kernel_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if let Some(pid) = build_dir_owner(&name.to_string_lossy()) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                println!("kernel: removing stale build folder {}", e.path().display());
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

fn build_into_cache(inputs: &Inputs, cache: &Path, entry: &Path) -> Result<()> {
    let start = Instant::now();
    let kernel_dir = cache.join("kernel");
    fs::create_dir_all(entry).with_context(|| format!("cannot create {}", entry.display()))?;
    remove_stale_build_dirs(&kernel_dir);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let work = kernel_dir.join(format!("{BUILD_DIR_PREFIX}{}-{nanos}", std::process::id()));
    fs::create_dir(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let _cleanup = RemoveOnDrop(work.clone());

    let log = entry.join("build.log");
    File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    println!(
        "kernel: building {} (key {}), about 5 min on 2 cores; log {}",
        inputs.version,
        &inputs.key()[..16],
        log.display()
    );

    // 1. Source tree.
    println!("kernel: extracting {}", inputs.tarball.display());
    let mut tar = Command::new("tar");
    tar.arg("-xf").arg(&inputs.tarball).arg("-C").arg(&work);
    cmd::run_logged(&mut tar, &log, "kernel: extracting", PROGRESS_EVERY)?;
    let src = work.join(format!("linux-source-{}", inputs.version));
    ensure!(
        src.join("Makefile").is_file(),
        "{} did not unpack to {}",
        inputs.tarball.display(),
        src.display()
    );

    // 2. Configuration, verified.
    let fragment = work.join("bulkhead.config");
    fs::write(&fragment, &inputs.fragment)
        .with_context(|| format!("cannot write {}", fragment.display()))?;
    println!(
        "kernel: configuring: allnoconfig + {}",
        inputs.fragment_path.display()
    );
    let mut config = make(&src);
    config
        .arg(format!("KCONFIG_ALLCONFIG={}", fragment.display()))
        .arg("allnoconfig");
    cmd::run_logged(&mut config, &log, "kernel: configuring", PROGRESS_EVERY)?;
    let dot_config = src.join(".config");
    let generated = fs::read_to_string(&dot_config)
        .with_context(|| format!("cannot read generated {}", dot_config.display()))?;
    let fragment_text = String::from_utf8_lossy(&inputs.fragment);
    let bad = verify_config(&fragment_text, &generated)?;
    if !bad.is_empty() {
        let kept = entry.join("rejected.config");
        let _ = fs::write(&kept, &generated);
        bail!(
            "Kconfig did not apply {} of the settings in {} (fix their dependencies in the \
             fragment; the generated config is kept at {}):\n  {}",
            bad.len(),
            inputs.fragment_path.display(),
            kept.display(),
            bad.join("\n  ")
        );
    }
    println!(
        "kernel: config verified: all {} settings of the fragment hold",
        parse_fragment(&fragment_text)?.len()
    );

    // 3. Build.
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("kernel: make -j{jobs} vmlinux");
    let mut vm = make(&src);
    vm.arg(format!("-j{jobs}")).arg("vmlinux");
    cmd::run_logged(&mut vm, &log, "kernel: building", PROGRESS_EVERY)?;
    let built = src.join("vmlinux");
    check_elf(&built)?;

    // 4. Into the cache, atomically: vmlinux appears last, complete.
    install(&dot_config, &entry.join("vmlinux.config"))?;
    install(&built, &entry.join("vmlinux"))?;
    let cached = entry.join("vmlinux");
    println!(
        "kernel: built in {} s, vmlinux {}",
        start.elapsed().as_secs(),
        mib(&cached)?
    );
    Ok(())
}

/// `make ARCH=x86_64` in the kernel tree, with the caller's environment cleaned of
/// variables that would change what Kbuild does (output folder, make flags from
/// an outer make, cross compiler).
fn make(src: &Path) -> Command {
    let mut c = Command::new("make");
    c.current_dir(src).arg("ARCH=x86_64");
    for var in [
        "MAKEFLAGS",
        "MFLAGS",
        "MAKELEVEL",
        "GNUMAKEFLAGS",
        "KBUILD_OUTPUT",
        "KCONFIG_CONFIG",
        "CROSS_COMPILE",
        "LLVM",
        "ARCH",
        "O",
    ] {
        c.env_remove(var);
    }
    c.env("LC_ALL", "C")
        .env("KBUILD_BUILD_USER", "bulkhead")
        .env("KBUILD_BUILD_HOST", "bulkhead");
    c
}

fn check_elf(path: &Path) -> Result<()> {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .with_context(|| format!("cannot read built kernel {}", path.display()))?;
    ensure!(
        &magic == b"\x7fELF",
        "{} is not an ELF file",
        path.display()
    );
    Ok(())
}

/// Moves (or, across file systems, copies) `src` to `dest` so that `dest` is
/// either absent or complete: data synced, then renamed into place. The result is
/// read-only, so a hard link handed out later cannot be used to modify the cache.
fn install(src: &Path, dest: &Path) -> Result<()> {
    let dir = dest.parent().context("destination has no parent folder")?;
    let name = dest.file_name().context("destination has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if fs::rename(src, &tmp).is_err() {
        fs::copy(src, &tmp)
            .with_context(|| format!("cannot copy {} to {}", src.display(), tmp.display()))?;
    }
    let result = (|| {
        let f = File::open(&tmp)?;
        f.sync_all()?;
        f.set_permissions(fs::Permissions::from_mode(0o444))?;
        fs::rename(&tmp, dest)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot install {}", dest.display()));
    }
    Ok(())
}

/// Puts the cached kernel at `out_dir/vmlinux`: a hard link when the cache is on
/// the same file system (instant, no extra space), else a copy.
fn place(cached: &Path, out_dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let dest = out_dir.join("vmlinux");
    if let (Ok(a), Ok(b)) = (fs::metadata(cached), fs::metadata(&dest)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            return Ok(dest);
        }
    }
    let tmp = out_dir.join(format!(".vmlinux.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    if fs::hard_link(cached, &tmp).is_err() {
        fs::copy(cached, &tmp)
            .with_context(|| format!("cannot copy {} to {}", cached.display(), tmp.display()))?;
    }
    if let Err(e) = fs::rename(&tmp, &dest) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot put the kernel at {}", dest.display()));
    }
    Ok(dest)
}

/// "12.3 MiB" for the file at `path`.
fn mib(path: &Path) -> Result<String> {
    let len = fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    Ok(format!("{:.1} MiB", len as f64 / (1024.0 * 1024.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_every_input() {
        let base = cache_key("6.12", "t.tar.xz", "ab", b"CONFIG_A=y\n");
        assert_eq!(base.len(), 64);
        assert_eq!(base, cache_key("6.12", "t.tar.xz", "ab", b"CONFIG_A=y\n"));
        for other in [
            cache_key("6.1", "t.tar.xz", "ab", b"CONFIG_A=y\n"),
            cache_key("6.12", "u.tar.xz", "ab", b"CONFIG_A=y\n"),
            cache_key("6.12", "t.tar.xz", "ac", b"CONFIG_A=y\n"),
            cache_key("6.12", "t.tar.xz", "ab", b"CONFIG_A=n\n"),
            // Field boundaries matter: moving bytes between fields changes the key.
            cache_key("6.12", "t.tar.x", "zab", b"CONFIG_A=y\n"),
        ] {
            assert_ne!(base, other);
        }
    }

    const FRAGMENT: &str = "\
# comment
CONFIG_EXPERT=y
CONFIG_VT=n
# CONFIG_INPUT is not set
CONFIG_NR_CPUS=256
CONFIG_CMDLINE=\"quiet\"

CONFIG_VIRTIO_FS=y
";

    #[test]
    fn verify_accepts_matching_config() {
        let dot = "\
CONFIG_EXPERT=y
# CONFIG_VT is not set
CONFIG_NR_CPUS=256
CONFIG_CMDLINE=\"quiet\"
CONFIG_VIRTIO_FS=y
CONFIG_OTHER=y
";
        assert_eq!(verify_config(FRAGMENT, dot).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn verify_lists_dropped_and_wrong_symbols() {
        let dot = "\
CONFIG_EXPERT=y
CONFIG_VT=y
CONFIG_INPUT=m
CONFIG_NR_CPUS=64
CONFIG_CMDLINE=\"quiet\"
# CONFIG_VIRTIO_FS is not set
";
        let bad = verify_config(FRAGMENT, dot).unwrap();
        assert_eq!(
            bad,
            vec![
                "CONFIG_INPUT=n (got CONFIG_INPUT=m)",
                "CONFIG_NR_CPUS=256 (got CONFIG_NR_CPUS=64)",
                "CONFIG_VIRTIO_FS=y (got not set)",
                "CONFIG_VT=n (got CONFIG_VT=y)",
            ]
        );
        let bad = verify_config("CONFIG_NOPE=y\n", "").unwrap();
        assert_eq!(bad.len(), 1);
        assert!(bad[0].starts_with("CONFIG_NOPE=y (got absent"), "{bad:?}");
    }

    #[test]
    fn fragment_typos_are_errors() {
        assert!(parse_fragment("CONFIG_FOO = y\n").is_err());
        assert!(parse_fragment("FOO=y\n").is_err());
        assert!(parse_fragment("CONFIG_FOO=\n").is_err());
        let later_wins = parse_fragment("CONFIG_A=y\nCONFIG_A=n\n").unwrap();
        assert_eq!(later_wins.get("CONFIG_A"), Some(&"n"));
    }

    #[test]
    fn project_fragment_parses() {
        let path = repo_root().join(CONFIG_DIR).join("bulkhead.config");
        let text = fs::read_to_string(&path).unwrap();
        let wanted = parse_fragment(&text).unwrap();
        assert!(wanted.len() > 50);
        assert_eq!(wanted.get("CONFIG_VIRTIO_MMIO"), Some(&"y"));
    }

    #[test]
    fn file_digest_matches_both_ways() {
        let dir = std::env::temp_dir().join(format!("xtask-digest-test-{}", std::process::id()));
        let _cleanup = RemoveOnDrop(dir.clone());
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("abc");
        fs::write(&f, b"abc").unwrap();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&f).unwrap(), want);
        assert_eq!(sha256_file_in_process(&f).unwrap(), want);
        assert!(sha256_file(&dir.join("missing")).is_err());
    }

    #[test]
    fn build_dir_owner_parses_pid() {
        assert_eq!(build_dir_owner(".build-1234-5678"), Some(1234));
        assert_eq!(build_dir_owner("6.12-abcdef"), None);
        assert_eq!(build_dir_owner(".build-x-1"), None);
    }

    #[test]
    fn place_links_and_replaces() {
        let dir = std::env::temp_dir().join(format!("xtask-kernel-test-{}", std::process::id()));
        let _cleanup = RemoveOnDrop(dir.clone());
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("cached");
        fs::write(&src, b"\x7fELFkernel").unwrap();
        let out = dir.join("out");
        let placed = place(&src, &out).unwrap();
        assert_eq!(fs::read(&placed).unwrap(), b"\x7fELFkernel");
        // Idempotent, and replaces a stale file.
        assert_eq!(place(&src, &out).unwrap(), placed);
        fs::remove_file(&placed).unwrap();
        fs::write(&placed, b"old").unwrap();
        place(&src, &out).unwrap();
        assert_eq!(fs::read(&placed).unwrap(), b"\x7fELFkernel");
        check_elf(&placed).unwrap();
        assert!(check_elf(&src.with_file_name("missing")).is_err());
    }

    #[test]
    fn install_is_read_only_and_complete() {
        let dir = std::env::temp_dir().join(format!("xtask-install-test-{}", std::process::id()));
        let _cleanup = RemoveOnDrop(dir.clone());
        fs::create_dir_all(&dir).unwrap();
        let src = dir.join("a");
        fs::write(&src, b"data").unwrap();
        let dest = dir.join("b");
        install(&src, &dest).unwrap();
        assert!(!src.exists());
        assert_eq!(fs::read(&dest).unwrap(), b"data");
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o444
        );
    }
}
