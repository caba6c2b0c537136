//! OCI image archives made from a rootfs directory, for tests without a registry.
//!
//! The end-to-end tests run containers through containerd, which wants images, and
//! the test machines have no network. [`write_image_archive`] turns a directory on
//! disk (say a busybox rootfs) into the tar form of an OCI image layout, which
//! `ctr -n <ns> images import <file>` loads under the given name:
//!
//! ```text
//! oci-layout                   {"imageLayoutVersion":"1.0.0"}
//! index.json                   one manifest, annotated with the image name
//! blobs/sha256/<manifest>      the image manifest (config + one layer)
//! blobs/sha256/<config>        linux/amd64, Entrypoint/Cmd/Env/WorkingDir
//! blobs/sha256/<layer>         the directory as one tar layer (optionally gzip)
//! ```
//!
//! The layer keeps modes, symlinks, hard links and device nodes, and owns every
//! entry by uid/gid 0; mtimes are fixed at 0, so the same directory always gives
//! the same digests (containerd then dedupes re-imports).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Seek, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};

/// Media type of an OCI image index (`index.json`).
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image manifest.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image config.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an uncompressed layer.
pub const MEDIA_TYPE_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a gzip-compressed layer.
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Annotation containerd reads the full image name from on import.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI annotation naming a manifest in an index (the tag, as `docker save` does).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// `PATH` of the default [`ImageConfig`]: the usual one, as in Docker images.
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The timestamp written into the config: fixed, so digests are reproducible.
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// The run-time defaults an image carries (the `config` object of the OCI image
/// config), i.e. what a container of it runs when the caller does not say.
///
/// Exists so a test can build, say, a "pause" image (`sleep` forever) and a
/// general-purpose busybox image from the same rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`: the program (and leading arguments); empty for none.
    pub entrypoint: Vec<String>,
    /// `Cmd`: default arguments (or the command if there is no entrypoint).
    pub cmd: Vec<String>,
    /// `Env`: `KEY=VALUE` entries.
    pub env: Vec<String>,
    /// `WorkingDir`: absolute path of the working directory; empty means `/`.
    pub working_dir: String,
}

impl Default for ImageConfig {
    /// `sh` as the command, the usual `PATH`, working directory `/`.
    fn default() -> Self {
        ImageConfig {
            entrypoint: Vec::new(),
            cmd: vec!["sh".into()],
            env: vec![DEFAULT_PATH_ENV.into()],
            working_dir: "/".into(),
        }
    }
}

/// How the single layer is stored in the archive.
///
/// Exists so tests can exercise both kinds of layer containerd unpacks; gzip is
/// what registries serve, uncompressed is quicker to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerCompression {
    /// A plain tar (`application/vnd.oci.image.layer.v1.tar`).
    None,
    /// A gzip-compressed tar (`application/vnd.oci.image.layer.v1.tar+gzip`).
    #[default]
    Gzip,
}

/// What [`write_image_archive`] wrote: where, under which name and the digests,
/// so tests can check what containerd reports against it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageArchive {
    /// The archive file.
    pub path: PathBuf,
    /// The full image name it imports as (e.g. `docker.io/library/busybox:test`).
    pub name: String,
    /// `sha256:<hex>` of the manifest: what `ctr images ls` shows as the digest.
    pub manifest_digest: String,
    /// `sha256:<hex>` of the config: the image id CRI reports.
    pub config_digest: String,
    /// `sha256:<hex>` of the layer blob as stored (compressed if gzip).
    pub layer_digest: String,
    /// `sha256:<hex>` of the uncompressed layer tar (the config's `diff_ids`).
    pub diff_id: String,
}

/// Write an OCI image archive at `out` holding one image named `name` whose only
/// layer is the contents of `rootfs`, for linux/amd64 with `config`.
///
/// The archive is written beside `out` and renamed into place, so `out` is either
/// the old file or a complete archive. Fails naming the file involved if `rootfs`
/// is not a readable directory, or if `name` is not a plausible image reference.
pub fn write_image_archive(
    rootfs: &Path,
    name: &str,
    config: &ImageConfig,
    compression: LayerCompression,
    out: &Path,
) -> Result<ImageArchive> {
    validate_name(name)?;
    let meta = fs::metadata(rootfs).at("reading rootfs", rootfs)?;
    if !meta.is_dir() {
        return Err(Error::Io {
            action: "reading rootfs",
            path: rootfs.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a directory"),
        });
    }
    let out_dir = match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };

    // The layer goes to an anonymous temp file first: its digests must be known
    // before the manifest and config that name them can be written.
    let layer_file = tempfile::tempfile_in(&out_dir).at("creating temp file in", &out_dir)?;
    let layer = write_layer(rootfs, layer_file, compression)?;
    let layer_media_type = match compression {
        LayerCompression::None => MEDIA_TYPE_LAYER_TAR,
        LayerCompression::Gzip => MEDIA_TYPE_LAYER_GZIP,
    };

    let config_blob = to_json(&config_json(config, &layer.diff_id));
    let config_digest = sha256_digest(&config_blob);
    let manifest_blob = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": {
            "mediaType": MEDIA_TYPE_CONFIG,
            "digest": config_digest,
            "size": config_blob.len(),
        },
        "layers": [{
            "mediaType": layer_media_type,
            "digest": layer.digest,
            "size": layer.size,
        }],
    }));
    let manifest_digest = sha256_digest(&manifest_blob);
    let index_blob = to_json(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [{
            "mediaType": MEDIA_TYPE_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_blob.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                ANNOTATION_CONTAINERD_NAME: name,
                ANNOTATION_REF_NAME: ref_name(name),
            },
        }],
    }));

    let tmp = tempfile::Builder::new()
        .prefix(".oci-image-")
        .tempfile_in(&out_dir)
        .at("creating temp file in", &out_dir)?;
    let mut archive = tar::Builder::new(BufWriter::new(tmp.as_file()));
    let mut layer_file = layer.file;
    layer_file.rewind().at("rewinding temp layer of", rootfs)?;
    (|| -> io::Result<()> {
        append_bytes(
            &mut archive,
            "oci-layout",
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        append_bytes(&mut archive, "index.json", &index_blob)?;
        append_dir(&mut archive, "blobs")?;
        append_dir(&mut archive, "blobs/sha256")?;
        append_bytes(&mut archive, &blob_path(&manifest_digest), &manifest_blob)?;
        append_bytes(&mut archive, &blob_path(&config_digest), &config_blob)?;
        let mut header = file_header(layer.size, 0o644);
        archive.append_data(&mut header, blob_path(&layer.digest), &mut layer_file)?;
        archive.into_inner()?.flush()
    })()
    .at("writing image archive", tmp.path())?;
    tmp.persist(out).map_err(|e| Error::Io {
        action: "renaming image archive into place at",
        path: out.to_path_buf(),
        source: e.error,
    })?;

    Ok(ImageArchive {
        path: out.to_path_buf(),
        name: name.to_owned(),
        manifest_digest,
        config_digest,
        layer_digest: layer.digest,
        diff_id: layer.diff_id,
    })
}

/// `sha256:<hex>` of `bytes`, the digest form OCI uses everywhere.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// The path of a blob inside an image layout, from its `sha256:<hex>` digest.
fn blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"))
}

/// Refuses names containerd would reject or misread: empty, with whitespace or
/// control characters, or with upper-case letters in the repository part.
fn validate_name(name: &str) -> Result<()> {
    let invalid = |reason: &'static str| {
        Err(Error::InvalidImageName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return invalid("it contains whitespace or control characters");
    }
    let repository = name.split(['@']).next().unwrap_or(name);
    let repository = match repository.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => repository,
    };
    // The registry host may have upper case; the path after it may not.
    let path = repository.split_once('/').map_or(repository, |(_, p)| p);
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return invalid("its repository path has upper-case letters");
    }
    Ok(())
}

/// The `org.opencontainers.image.ref.name` value for `name`: its tag, as
/// `docker save` writes it, or the whole name when it has no tag.
fn ref_name(name: &str) -> &str {
    if name.contains('@') {
        return name;
    }
    match name.rsplit_once(':') {
        Some((_, tag)) if !tag.contains('/') => tag,
        _ => name,
    }
}

/// The OCI image config for `config` with one layer whose diff id is `diff_id`.
fn config_json(config: &ImageConfig, diff_id: &str) -> serde_json::Value {
    let mut run = serde_json::Map::new();
    if !config.entrypoint.is_empty() {
        run.insert("Entrypoint".into(), json!(config.entrypoint));
    }
    if !config.cmd.is_empty() {
        run.insert("Cmd".into(), json!(config.cmd));
    }
    if !config.env.is_empty() {
        run.insert("Env".into(), json!(config.env));
    }
    if !config.working_dir.is_empty() {
        run.insert("WorkingDir".into(), json!(config.working_dir));
    }
    json!({
        "created": EPOCH,
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": EPOCH, "created_by": "bulkhead-tests oci_image" }],
    })
}

fn to_json(value: &serde_json::Value) -> Vec<u8> {
    // A `Value` has only string keys, so serializing it cannot fail.
    serde_json::to_vec(value).expect("a serde_json::Value always serializes")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The written layer: its temp file and what the manifest and config say of it.
struct Layer {
    file: File,
    digest: String,
    diff_id: String,
    size: u64,
}

/// A writer that hashes and counts what passes through it.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashWriter<W> {
    fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{}", hex(&self.hasher.finalize()));
        (self.inner, digest, self.len)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Where the layer's tar stream goes: straight to the (hashed) file, or through gzip.
enum LayerSink {
    Plain(HashWriter<BufWriter<File>>),
    Gzip(flate2::write::GzEncoder<HashWriter<BufWriter<File>>>),
}

impl Write for LayerSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LayerSink::Plain(w) => w.write(buf),
            LayerSink::Gzip(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            LayerSink::Plain(w) => w.flush(),
            LayerSink::Gzip(w) => w.flush(),
        }
    }
}

/// Tar `rootfs` into `file`, hashing both the tar stream (diff id) and what lands
/// in the file (blob digest).
fn write_layer(rootfs: &Path, file: File, compression: LayerCompression) -> Result<Layer> {
    let stored = HashWriter::new(BufWriter::new(file));
    let sink = match compression {
        LayerCompression::None => LayerSink::Plain(stored),
        // Level 1: a test rootfs is mostly one binary; speed matters more than size.
        LayerCompression::Gzip => LayerSink::Gzip(flate2::write::GzEncoder::new(
            stored,
            flate2::Compression::fast(),
        )),
    };
    let mut builder = tar::Builder::new(HashWriter::new(sink));
    let mut links = HashMap::new();
    add_tree(&mut builder, rootfs, Path::new(""), &mut links)?;
    let finish = |builder: tar::Builder<HashWriter<LayerSink>>| -> io::Result<_> {
        let (sink, diff_id, _) = builder.into_inner()?.finish();
        let stored = match sink {
            LayerSink::Plain(w) => w,
            LayerSink::Gzip(w) => w.finish()?,
        };
        let (buffered, digest, size) = stored.finish();
        let file = buffered.into_inner().map_err(|e| e.into_error())?;
        Ok((file, digest, diff_id, size))
    };
    let (file, digest, diff_id, size) = finish(builder).at("writing layer of", rootfs)?;
    Ok(Layer {
        file,
        digest,
        diff_id,
        size,
    })
}

/// Append the entries of directory `dir` (at `rel` inside the layer) and below,
/// in name order so the layer is reproducible. `links` maps (device, inode) of
/// multiply-linked files to their first path, to write later ones as hard links.
fn add_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    rel: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<()> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).at("reading directory", dir)? {
        names.push(entry.at("reading directory", dir)?.file_name());
    }
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let rel = rel.join(&name);
        let meta = fs::symlink_metadata(&path).at("reading metadata of", &path)?;
        let kind = meta.file_type();
        let mode = meta.mode() & 0o7777;
        let result = if kind.is_dir() {
            let mut header = header(tar::EntryType::Directory, mode);
            builder.append_data(&mut header, &rel, io::empty())
        } else if kind.is_symlink() {
            let target = fs::read_link(&path).at("reading symlink", &path)?;
            let mut header = header(tar::EntryType::Symlink, 0o777);
            builder.append_link(&mut header, &rel, &target)
        } else if kind.is_file() {
            let key = (meta.dev(), meta.ino());
            match links.get(&key) {
                Some(first) if meta.nlink() > 1 => {
                    let mut header = header(tar::EntryType::Link, mode);
                    builder.append_link(&mut header, &rel, first)
                }
                _ => {
                    if meta.nlink() > 1 {
                        links.insert(key, rel.clone());
                    }
                    let mut file = File::open(&path).at("opening", &path)?;
                    let mut header = file_header(meta.len(), mode);
                    builder.append_data(&mut header, &rel, &mut file)
                }
            }
        } else if kind.is_char_device() || kind.is_block_device() || kind.is_fifo() {
            let entry_type = if kind.is_char_device() {
                tar::EntryType::Char
            } else if kind.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            };
            let mut header = header(entry_type, mode);
            let rdev = meta.rdev();
            header
                .set_device_major(libc::major(rdev))
                .and_then(|()| header.set_device_minor(libc::minor(rdev)))
                .and_then(|()| builder.append_data(&mut header, &rel, io::empty()))
        } else {
            // Sockets cannot be stored in a tar (GNU tar skips them too), and a
            // socket in a rootfs is a leftover of a process that is gone.
            Ok(())
        };
        result.at("adding to layer", &path)?;
        if kind.is_dir() {
            add_tree(builder, &path, &rel, links)?;
        }
    }
    Ok(())
}

/// A GNU header (long names allowed) owned by root, with mtime 0 and no data.
fn header(entry_type: tar::EntryType, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(entry_type);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(0);
    header
}

fn file_header(size: u64, mode: u32) -> tar::Header {
    let mut header = header(tar::EntryType::Regular, mode);
    header.set_size(size);
    header
}

fn append_bytes<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &str,
    data: &[u8],
) -> io::Result<()> {
    let mut header = file_header(data.len() as u64, 0o644);
    builder.append_data(&mut header, path, data)
}

fn append_dir<W: Write>(builder: &mut tar::Builder<W>, path: &str) -> io::Result<()> {
    let mut header = header(tar::EntryType::Directory, 0o755);
    builder.append_data(&mut header, path, io::empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// Every entry of a tar: path -> (type, mode, uid, gid, link target, data).
    type Entries = BTreeMap<String, (tar::EntryType, u32, u64, u64, Option<String>, Vec<u8>)>;

    fn read_entries(reader: impl Read) -> Entries {
        let mut archive = tar::Archive::new(reader);
        let mut map = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            let header = entry.header().clone();
            let link = entry
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            map.insert(
                path,
                (
                    header.entry_type(),
                    header.mode().unwrap(),
                    header.uid().unwrap(),
                    header.gid().unwrap(),
                    link,
                    data,
                ),
            );
        }
        map
    }

    fn json_of(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    /// A small rootfs with a file, a setuid file, an executable, a symlink, a hard
    /// link, an empty directory and a path longer than the 100 bytes of a tar header.
    fn sample_rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        fs::write(root.join("bin/busybox"), b"#!not really busybox\n").unwrap();
        fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("bin/su"), b"su").unwrap();
        fs::set_permissions(root.join("bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
        symlink("busybox", root.join("bin/sh")).unwrap();
        fs::write(root.join("etc/hostname"), b"test\n").unwrap();
        fs::set_permissions(root.join("etc/hostname"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname.bak")).unwrap();
        let long = root.join("d".repeat(60)).join("f".repeat(60));
        fs::create_dir_all(long.parent().unwrap()).unwrap();
        fs::write(&long, b"long").unwrap();
        dir
    }

    fn write(compression: LayerCompression) -> (tempfile::TempDir, ImageArchive, Entries) {
        let rootfs = sample_rootfs();
        let out_dir = tempfile::tempdir().unwrap();
        let out = out_dir.path().join("image.tar");
        let config = ImageConfig {
            entrypoint: vec!["/bin/sh".into()],
            cmd: vec!["-c".into(), "echo hi".into()],
            env: vec![DEFAULT_PATH_ENV.into(), "A=b".into()],
            working_dir: "/etc".into(),
        };
        let image = write_image_archive(
            rootfs.path(),
            "docker.io/library/bulkhead-busybox:test",
            &config,
            compression,
            &out,
        )
        .unwrap();
        let entries = read_entries(File::open(&out).unwrap());
        // Only the archive is left in the output directory: no temp files.
        assert_eq!(fs::read_dir(out_dir.path()).unwrap().count(), 1);
        (out_dir, image, entries)
    }

    fn blob<'a>(entries: &'a Entries, digest: &str) -> &'a [u8] {
        &entries
            .get(&blob_path(digest))
            .unwrap_or_else(|| panic!("no blob {digest}"))
            .5
    }

    #[test]
    fn layout_structure() {
        let (_dir, image, entries) = write(LayerCompression::Gzip);
        assert_eq!(
            json_of(&entries["oci-layout"].5),
            json!({"imageLayoutVersion": "1.0.0"})
        );
        let index = json_of(&entries["index.json"].5);
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(index["mediaType"], MEDIA_TYPE_INDEX);
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 1);
        let desc = &manifests[0];
        assert_eq!(desc["mediaType"], MEDIA_TYPE_MANIFEST);
        assert_eq!(desc["digest"], image.manifest_digest.as_str());
        assert_eq!(
            desc["platform"],
            json!({"architecture": "amd64", "os": "linux"})
        );
        assert_eq!(
            desc["annotations"][ANNOTATION_CONTAINERD_NAME],
            "docker.io/library/bulkhead-busybox:test"
        );
        assert_eq!(desc["annotations"][ANNOTATION_REF_NAME], "test");

        let manifest_bytes = blob(&entries, &image.manifest_digest);
        assert_eq!(desc["size"], manifest_bytes.len());
        let manifest = json_of(manifest_bytes);
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["mediaType"], MEDIA_TYPE_MANIFEST);
        assert_eq!(manifest["config"]["mediaType"], MEDIA_TYPE_CONFIG);
        assert_eq!(manifest["config"]["digest"], image.config_digest.as_str());
        assert_eq!(
            manifest["config"]["size"],
            blob(&entries, &image.config_digest).len()
        );
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0]["mediaType"], MEDIA_TYPE_LAYER_GZIP);
        assert_eq!(layers[0]["digest"], image.layer_digest.as_str());
        assert_eq!(layers[0]["size"], blob(&entries, &image.layer_digest).len());

        let config = json_of(blob(&entries, &image.config_digest));
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["config"]["Entrypoint"], json!(["/bin/sh"]));
        assert_eq!(config["config"]["Cmd"], json!(["-c", "echo hi"]));
        assert_eq!(config["config"]["Env"], json!([DEFAULT_PATH_ENV, "A=b"]));
        assert_eq!(config["config"]["WorkingDir"], "/etc");
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(config["rootfs"]["diff_ids"], json!([image.diff_id]));

        // Nothing but the layout files and the three blobs.
        let mut paths: Vec<&str> = entries.keys().map(String::as_str).collect();
        paths.sort();
        let mut expected = vec![
            "oci-layout".to_owned(),
            "index.json".to_owned(),
            "blobs".to_owned(),
            "blobs/sha256".to_owned(),
            blob_path(&image.manifest_digest),
            blob_path(&image.config_digest),
            blob_path(&image.layer_digest),
        ];
        expected.sort();
        assert_eq!(paths, expected);
    }

    #[test]
    fn digests_match_contents() {
        for compression in [LayerCompression::None, LayerCompression::Gzip] {
            let (_dir, image, entries) = write(compression);
            for (path, entry) in &entries {
                if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                    assert_eq!(sha256_digest(&entry.5), format!("sha256:{hex}"), "{path}");
                }
            }
            let stored = blob(&entries, &image.layer_digest);
            let mut tar_bytes = Vec::new();
            match compression {
                LayerCompression::None => tar_bytes.extend_from_slice(stored),
                LayerCompression::Gzip => {
                    assert_eq!(&stored[..2], &[0x1f, 0x8b], "gzip magic");
                    flate2::read::GzDecoder::new(stored)
                        .read_to_end(&mut tar_bytes)
                        .unwrap();
                }
            }
            assert_eq!(sha256_digest(&tar_bytes), image.diff_id);
            if compression == LayerCompression::None {
                assert_eq!(image.layer_digest, image.diff_id);
            }
        }
    }

    #[test]
    fn layer_keeps_modes_links_and_root_ownership() {
        let (_dir, image, entries) = write(LayerCompression::Gzip);
        let layer = read_entries(flate2::read::GzDecoder::new(blob(
            &entries,
            &image.layer_digest,
        )));
        for (path, e) in &layer {
            assert_eq!((e.2, e.3), (0, 0), "{path} owned by root");
        }
        let busybox = &layer["bin/busybox"];
        assert_eq!((busybox.0, busybox.1), (tar::EntryType::Regular, 0o755));
        assert_eq!(busybox.5, b"#!not really busybox\n");
        assert_eq!(layer["bin/su"].1, 0o4755, "setuid bit kept");
        let sh = &layer["bin/sh"];
        assert_eq!(sh.0, tar::EntryType::Symlink);
        assert_eq!(sh.4.as_deref(), Some("busybox"));
        assert_eq!(layer["etc/hostname"].1, 0o600);
        let bak = &layer["etc/hostname.bak"];
        assert_eq!(bak.0, tar::EntryType::Link);
        assert_eq!(bak.4.as_deref(), Some("etc/hostname"));
        assert_eq!(layer["empty"].0, tar::EntryType::Directory);
        let long = format!("{}/{}", "d".repeat(60), "f".repeat(60));
        assert_eq!(layer[&long].5, b"long");
        // Paths are relative: no leading `/` or `./`, and no root entry.
        assert!(layer
            .keys()
            .all(|p| !p.starts_with('/') && !p.starts_with('.')));
    }

    #[test]
    fn same_rootfs_same_digests() {
        let rootfs = sample_rootfs();
        let out = tempfile::tempdir().unwrap();
        let write = |file: &str| {
            write_image_archive(
                rootfs.path(),
                "example.com/a/b:1",
                &ImageConfig::default(),
                LayerCompression::Gzip,
                &out.path().join(file),
            )
            .unwrap()
        };
        let (a, b) = (write("a.tar"), write("b.tar"));
        assert_eq!(a.manifest_digest, b.manifest_digest);
        assert_eq!(
            fs::read(out.path().join("a.tar")).unwrap(),
            fs::read(out.path().join("b.tar")).unwrap()
        );
    }

    #[test]
    fn names() {
        assert_eq!(ref_name("docker.io/library/busybox:test"), "test");
        assert_eq!(ref_name("localhost:5000/busybox"), "localhost:5000/busybox");
        assert_eq!(ref_name("localhost:5000/busybox:1"), "1");
        assert_eq!(ref_name("busybox@sha256:abc"), "busybox@sha256:abc");
        assert!(validate_name("docker.io/library/busybox:test").is_ok());
        assert!(validate_name("Registry.local:5000/a/b:Tag").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("docker.io/library/BusyBox:test").is_err());
    }

    #[test]
    fn rootfs_must_be_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = write_image_archive(
            &file,
            "a:b",
            &ImageConfig::default(),
            LayerCompression::None,
            &dir.path().join("out.tar"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("file"), "{err}");
        assert!(!dir.path().join("out.tar").exists());
    }
}
