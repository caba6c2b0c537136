//! Layers built here entry by entry, including malicious ones, applied for real.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use super::*;
use crate::digest::sha256_of;

/// Builds one layer tar in memory.
struct LayerBuilder {
    builder: tar::Builder<Vec<u8>>,
}

fn header(kind: EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_000_000);
    header.set_size(size);
    header
}

impl LayerBuilder {
    fn new() -> Self {
        LayerBuilder {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = header(EntryType::Directory, mode, 0);
        self.builder.append_data(&mut h, path, io::empty()).unwrap();
        self
    }

    fn file(self, path: &str, mode: u32, data: &[u8]) -> Self {
        self.file_owned(path, mode, (0, 0), data)
    }

    fn file_owned(mut self, path: &str, mode: u32, (uid, gid): (u64, u64), data: &[u8]) -> Self {
        let mut h = header(EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.builder.append_data(&mut h, path, data).unwrap();
        self
    }

    fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(EntryType::Symlink, 0o777, 0);
        self.builder.append_link(&mut h, path, target).unwrap();
        self
    }

    fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = header(EntryType::Link, 0o644, 0);
        self.builder.append_link(&mut h, path, target).unwrap();
        self
    }

    fn node(mut self, path: &str, kind: EntryType, mode: u32, (major, minor): (u32, u32)) -> Self {
        let mut h = header(kind, mode, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.builder.append_data(&mut h, path, io::empty()).unwrap();
        self
    }

    fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.builder
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self
    }

    /// An entry with name and link name written as raw bytes, bypassing the tar
    /// crate's checks, as a malicious layer would.
    fn raw(mut self, kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) -> Self {
        let mut h = header(kind, 0o644, data.len() as u64);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name = [0; 100];
        gnu.name[..name.len()].copy_from_slice(name);
        gnu.linkname = [0; 100];
        gnu.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    fn finish(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

/// A root file system in a temp dir, with room for an "outside" beside it.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("rootfs")).unwrap();
        fs::create_dir(dir.path().join("outside")).unwrap();
        fs::write(dir.path().join("outside/secret"), b"host secret").unwrap();
        Fixture { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    fn apply(&self, layer: &[u8]) -> Result<()> {
        let unpacker = Unpacker::new(&self.root()).unwrap();
        unpacker.apply(LayerInput {
            digest: "sha256:test-layer",
            reader: layer,
            compression: Compression::None,
            diff_id: &sha256_of(layer),
        })
    }

    fn outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(self.outside())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("secret")]);
        assert_eq!(
            fs::read(self.outside().join("secret")).unwrap(),
            b"host secret"
        );
    }

    fn names(&self, rel: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.root().join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn files_modes_owners_links_and_times() {
    let fx = Fixture::new();
    let layer = LayerBuilder::new()
        .dir("./", 0o755)
        .dir("bin", 0o755)
        .file("bin/busybox", 0o755, b"binary")
        .file("bin/su", 0o4755, b"su")
        .file_owned("home/user/.profile", 0o640, (1000, 1001), b"profile")
        .symlink("bin/sh", "busybox")
        .symlink("abs-link", "/bin/busybox")
        .hardlink("bin/ash", "bin/busybox")
        .dir("ro", 0o555)
        .file("ro/inside", 0o444, b"r")
        .node("dev/fifo", EntryType::Fifo, 0o620, (0, 0))
        .pax(&[("mtime", b"1234567890.5")])
        .file("pax-time", 0o600, b"")
        .finish();
    fx.apply(&layer).unwrap();
    let r = fx.root();

    assert_eq!(fs::read(r.join("bin/busybox")).unwrap(), b"binary");
    let su = fs::metadata(r.join("bin/su")).unwrap();
    assert_eq!(su.permissions().mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!(
        fs::read_link(r.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read_link(r.join("abs-link")).unwrap(),
        Path::new("/bin/busybox")
    );
    let (a, b) = (
        fs::metadata(r.join("bin/ash")).unwrap(),
        fs::metadata(r.join("bin/busybox")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino(), "hard link shares the inode");
    assert_eq!(b.mtime(), 1_000_000);
    let ro = fs::metadata(r.join("ro")).unwrap();
    assert_eq!(ro.permissions().mode() & 0o777, 0o555, "deferred dir mode");
    assert_eq!(ro.mtime(), 1_000_000, "dir mtime set after its children");
    assert!(fs::symlink_metadata(r.join("dev/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(
        fs::metadata(r.join("dev/fifo")).unwrap().mode() & 0o777,
        0o620
    );
    assert_eq!(
        fs::metadata(r.join("dev")).unwrap().mode() & 0o777,
        0o755,
        "implicit parent"
    );
    let pax = fs::metadata(r.join("pax-time")).unwrap();
    assert_eq!((pax.mtime(), pax.mtime_nsec()), (1234567890, 500_000_000));
    if root() {
        let profile = fs::metadata(r.join("home/user/.profile")).unwrap();
        assert_eq!((profile.uid(), profile.gid()), (1000, 1001));
        assert_eq!(profile.mode() & 0o777, 0o640);
    }
    assert_eq!(content_size(&r).unwrap(), "binary".len() as u64 + 2 + 7 + 1);
}

#[test]
fn device_nodes_when_root() {
    if !root() {
        eprintln!("skipped: device nodes need root");
        return;
    }
    let fx = Fixture::new();
    let layer = LayerBuilder::new()
        .node("dev/null", EntryType::Char, 0o666, (1, 3))
        .node("dev/loop9", EntryType::Block, 0o660, (7, 9))
        .finish();
    fx.apply(&layer).unwrap();
    let null = fs::symlink_metadata(fx.root().join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), makedev(1, 3));
    assert_eq!(null.mode() & 0o777, 0o666);
    let block = fs::symlink_metadata(fx.root().join("dev/loop9")).unwrap();
    assert!(block.file_type().is_block_device());
    assert_eq!(block.rdev(), makedev(7, 9));
}

#[test]
fn xattrs_best_effort() {
    let fx = Fixture::new();
    // Probe: not every file system under the temp dir has user xattrs.
    let probe = fx.root().join("probe");
    fs::write(&probe, b"").unwrap();
    let supported = xattr::set(&probe, "user.probe", b"1").is_ok();
    fs::remove_file(&probe).unwrap();
    let layer = LayerBuilder::new()
        .pax(&[("SCHILY.xattr.user.bulkhead", b"yes")])
        .file("with-xattr", 0o644, b"x")
        .finish();
    fx.apply(&layer).unwrap();
    if supported {
        let value = xattr::get(fx.root().join("with-xattr"), "user.bulkhead").unwrap();
        assert_eq!(value.as_deref(), Some(&b"yes"[..]));
    }
}

#[test]
fn whiteouts_delete_lower_content() {
    let fx = Fixture::new();
    fx.apply(
        &LayerBuilder::new()
            .file("a/f1", 0o644, b"1")
            .file("a/f2", 0o644, b"2")
            .file("b/deep/x", 0o644, b"x")
            .symlink("c", "/a")
            .finish(),
    )
    .unwrap();
    fx.apply(
        &LayerBuilder::new()
            .file("a/.wh.f1", 0o644, b"")
            .file(".wh.b", 0o644, b"")
            .file(".wh.c", 0o644, b"")
            .file(".wh.never-existed", 0o644, b"")
            .file("gone/.wh.x", 0o644, b"")
            .finish(),
    )
    .unwrap();
    assert_eq!(fx.names(""), vec!["a"]);
    assert_eq!(
        fx.names("a"),
        vec!["f2"],
        "the whiteout file itself is not kept"
    );
}

#[test]
fn whiteout_spares_the_same_layer() {
    let fx = Fixture::new();
    fx.apply(&LayerBuilder::new().file("d/lower", 0o644, b"l").finish())
        .unwrap();
    fx.apply(
        &LayerBuilder::new()
            .file("d/new", 0o644, b"n")
            .file("x", 0o644, b"x")
            .file(".wh.x", 0o644, b"")
            .file(".wh.d", 0o644, b"")
            .finish(),
    )
    .unwrap();
    assert_eq!(fx.names(""), vec!["d", "x"]);
    assert_eq!(
        fx.names("d"),
        vec!["new"],
        "lower content hidden, this layer's kept"
    );
}

#[test]
fn opaque_directory_hides_lower_content_only() {
    for marker_first in [true, false] {
        let fx = Fixture::new();
        fx.apply(
            &LayerBuilder::new()
                .file("d/old1", 0o644, b"1")
                .file("d/sub/old2", 0o644, b"2")
                .file("other/keep", 0o644, b"k")
                .finish(),
        )
        .unwrap();
        let mut layer = LayerBuilder::new().dir("d", 0o750);
        if marker_first {
            layer = layer.file("d/.wh..wh..opq", 0o644, b"");
        }
        layer = layer
            .file("d/new", 0o644, b"n")
            .file("d/sub/new2", 0o644, b"n2");
        if !marker_first {
            layer = layer.file("d/.wh..wh..opq", 0o644, b"");
        }
        fx.apply(&layer.finish()).unwrap();
        assert_eq!(
            fx.names("d"),
            vec!["new", "sub"],
            "marker first: {marker_first}"
        );
        assert_eq!(fx.names("d/sub"), vec!["new2"]);
        assert_eq!(fx.names("other"), vec!["keep"]);
        let mode = fs::metadata(fx.root().join("d")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o750);
    }
}

#[test]
fn hard_link_to_an_earlier_layer_and_replacements() {
    let fx = Fixture::new();
    fx.apply(
        &LayerBuilder::new()
            .file("usr/bin/tool", 0o755, b"tool")
            .file("was-file", 0o644, b"f")
            .file("was-dir/child", 0o644, b"c")
            .finish(),
    )
    .unwrap();
    fx.apply(
        &LayerBuilder::new()
            .hardlink("usr/bin/alias", "usr/bin/tool")
            .dir("was-file", 0o755)
            .file("was-dir", 0o644, b"now a file")
            .finish(),
    )
    .unwrap();
    let r = fx.root();
    let (a, t) = (
        fs::metadata(r.join("usr/bin/alias")).unwrap(),
        fs::metadata(r.join("usr/bin/tool")).unwrap(),
    );
    assert_eq!(a.ino(), t.ino());
    assert!(r.join("was-file").is_dir());
    assert_eq!(fs::read(r.join("was-dir")).unwrap(), b"now a file");

    // Rewriting a hard-linked file replaces it, never writes through the link.
    fx.apply(
        &LayerBuilder::new()
            .file("usr/bin/alias", 0o755, b"new")
            .finish(),
    )
    .unwrap();
    assert_eq!(fs::read(r.join("usr/bin/tool")).unwrap(), b"tool");
    assert_eq!(fs::read(r.join("usr/bin/alias")).unwrap(), b"new");
}

#[test]
fn dot_dot_entries_are_refused() {
    let fx = Fixture::new();
    for name in [&b"../outside/evil"[..], b"a/../../outside/evil", b"./.."] {
        let layer = LayerBuilder::new()
            .raw(EntryType::Regular, name, b"", b"pwned")
            .finish();
        let err = fx.apply(&layer).unwrap_err();
        assert!(
            matches!(err, StoreError::UnsafeEntry { .. }),
            "{}: {err}",
            String::from_utf8_lossy(name)
        );
        assert!(err.to_string().contains(".."), "{err}");
    }
    let layer = LayerBuilder::new()
        .raw(EntryType::Link, b"innocent", b"../outside/secret", b"")
        .finish();
    let err = fx.apply(&layer).unwrap_err();
    assert!(matches!(err, StoreError::UnsafeEntry { .. }), "{err}");
    fx.outside_untouched();
    assert!(!fx.root().join("innocent").exists());
}

#[test]
fn absolute_entries_land_inside() {
    let fx = Fixture::new();
    let outside = fx.outside().join("abs-evil");
    let layer = LayerBuilder::new()
        .raw(EntryType::Regular, b"/etc/abs", b"", b"inside")
        .raw(
            EntryType::Regular,
            outside.to_str().unwrap().as_bytes(),
            b"",
            b"inside too",
        )
        .finish();
    fx.apply(&layer).unwrap();
    assert_eq!(fs::read(fx.root().join("etc/abs")).unwrap(), b"inside");
    let relocated = fx.root().join(outside.strip_prefix("/").unwrap());
    assert_eq!(fs::read(relocated).unwrap(), b"inside too");
    fx.outside_untouched();
}

#[test]
fn symlinks_cannot_lead_writes_outside() {
    let fx = Fixture::new();
    let outside = fx.outside();
    let outside_abs = outside.to_str().unwrap();
    // Layer 1 plants symlinks pointing out of the root, absolutely and by `..`.
    fx.apply(
        &LayerBuilder::new()
            .dir("etc", 0o755)
            .symlink("abs", outside_abs)
            .symlink("rel", "../outside")
            .symlink("deep/rel", "../../../../../../outside")
            .symlink("to-secret", &format!("{outside_abs}/secret"))
            .symlink("etc-link", "/etc")
            .finish(),
    )
    .unwrap();
    // Layer 2 writes through them: files under the links, a file over a link,
    // a hard link through a link, and a directory through one.
    let results = [
        (
            "abs/evil",
            LayerBuilder::new().file("abs/evil", 0o644, b"x").finish(),
        ),
        (
            "rel/evil",
            LayerBuilder::new().file("rel/evil", 0o644, b"x").finish(),
        ),
        (
            "deep/rel/evil",
            LayerBuilder::new()
                .file("deep/rel/evil", 0o644, b"x")
                .finish(),
        ),
        (
            "to-secret",
            LayerBuilder::new()
                .file("to-secret", 0o644, b"overwritten")
                .finish(),
        ),
        (
            "hardlink",
            LayerBuilder::new()
                .hardlink("stolen", "abs/secret")
                .finish(),
        ),
        (
            "rel/dir",
            LayerBuilder::new().dir("rel/newdir", 0o755).finish(),
        ),
        (
            "etc-link/passwd",
            LayerBuilder::new()
                .file("etc-link/passwd", 0o644, b"root")
                .finish(),
        ),
    ]
    .map(|(what, layer)| (what, fx.apply(&layer)));
    fx.outside_untouched();

    let r = fx.root();
    // `/etc` through a symlink is the rootfs's own /etc.
    assert!(results[6].1.is_ok(), "{:?}", results[6].1);
    assert_eq!(fs::read(r.join("etc/passwd")).unwrap(), b"root");
    // A regular file over a symlink replaces the symlink.
    assert!(results[3].1.is_ok());
    assert_eq!(fs::read(r.join("to-secret")).unwrap(), b"overwritten");
    // The others either failed (their clamped target does not exist in the
    // rootfs) or wrote inside it; never outside.
    for (what, result) in &results {
        if let Err(e) = result {
            assert!(matches!(e, StoreError::Unpack { .. }), "{what}: {e}");
        }
    }
    assert!(!r.join("stolen").exists() || fs::read(r.join("stolen")).unwrap() != b"host secret");
}

#[test]
fn rel_symlink_is_clamped_to_the_root() {
    let fx = Fixture::new();
    fx.apply(
        &LayerBuilder::new()
            .dir("outside", 0o755)
            .symlink("rel", "../../../outside")
            .finish(),
    )
    .unwrap();
    fx.apply(&LayerBuilder::new().file("rel/evil", 0o644, b"x").finish())
        .unwrap();
    assert_eq!(fs::read(fx.root().join("outside/evil")).unwrap(), b"x");
    fx.outside_untouched();
}

#[test]
fn diff_id_mismatch_is_reported() {
    let fx = Fixture::new();
    let layer = LayerBuilder::new().file("f", 0o644, b"x").finish();
    let unpacker = Unpacker::new(&fx.root()).unwrap();
    let wrong = sha256_of(b"something else");
    let err = unpacker
        .apply(LayerInput {
            digest: "sha256:the-layer",
            reader: &layer[..],
            compression: Compression::None,
            diff_id: &wrong,
        })
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{text}");
    assert!(
        text.contains(&wrong) && text.contains(&sha256_of(&layer)),
        "{text}"
    );
    assert!(text.contains("sha256:the-layer"), "{text}");
}

#[test]
fn compressed_layers() {
    let layer = LayerBuilder::new().file("hello", 0o644, b"world").finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::stream::encode_all(&layer[..], 3).unwrap();
    for (bytes, compression) in [(gz, Compression::Gzip), (zst, Compression::Zstd)] {
        let fx = Fixture::new();
        let unpacker = Unpacker::new(&fx.root()).unwrap();
        unpacker
            .apply(LayerInput {
                digest: "sha256:l",
                reader: &bytes[..],
                compression,
                diff_id: &sha256_of(&layer),
            })
            .unwrap();
        assert_eq!(fs::read(fx.root().join("hello")).unwrap(), b"world");
        // Garbage is a corrupt layer, not a panic.
        let err = unpacker
            .apply(LayerInput {
                digest: "sha256:l",
                reader: &bytes[..bytes.len() / 2],
                compression,
                diff_id: &sha256_of(&layer),
            })
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::CorruptLayer { .. } | StoreError::Unpack { .. }
            ),
            "{err}"
        );
    }
}

#[test]
fn pax_time_parsing() {
    assert_eq!(parse_pax_time("12"), Some((12, 0)));
    assert_eq!(parse_pax_time("12.25"), Some((12, 250_000_000)));
    assert_eq!(parse_pax_time("1.1234567891"), Some((1, 123_456_789)));
    assert_eq!(parse_pax_time("x"), None);
}
