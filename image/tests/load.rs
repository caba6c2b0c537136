//! `Store::load` of OCI image layouts (directory and tar), `docker save`
//! tarballs and things that are not images; verification failures leave the
//! store as it was.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use bulkhead_image::{familiar, LoadOptions, Store, StoreError};
use common::*;
use serde_json::json;

const NAME: &str = "example.com/team/app:1";

/// A two-layer image (gzip, then zstd with whiteouts) in a layout under `dir`.
fn two_layer_layout(dir: &Path) -> (Layout, Built) {
    let layout = Layout::new(dir);
    let base = Tar::default()
        .dir("etc")
        .file("etc/os-release", b"ID=test\n")
        .file("etc/old", b"old")
        .file("bin/tool", b"#!/bin/sh\n")
        .symlink("bin/sh", "tool")
        .finish();
    let top = Tar::default()
        .whiteout("etc", "old")
        .file("etc/new", b"new")
        .finish();
    let mut spec = Spec::new(vec![(base, Comp::Gzip), (top, Comp::Zstd)]);
    spec.run = json!({
        "Entrypoint": ["/bin/tool"], "Cmd": ["--help"], "Env": ["A=1"],
        "WorkingDir": "/etc", "User": "65534", "StopSignal": "SIGINT",
        "Labels": {"org.example": "yes"}
    });
    let built = layout.image(&spec);
    layout.finish(vec![built.descriptor(
        "amd64",
        json!({"io.containerd.image.name": NAME, "org.opencontainers.image.ref.name": "1"}),
    )]);
    (layout, built)
}

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("images")).unwrap();
    (dir, store)
}

#[test]
fn oci_layout_directory() {
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = two_layer_layout(&work.path().join("layout"));
    let (_dir, store) = store();
    let loaded = store.load(&layout.dir, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.len(), 1);
    let image = &loaded[0];
    assert_eq!(image.id, built.config_digest);
    assert_eq!(image.names, vec![NAME]);
    assert_eq!(image.manifest_digest, built.manifest_digest);
    assert!(image.repo_digests.is_empty());
    assert_eq!(image.created.as_deref(), Some("2024-05-06T07:08:09Z"));
    assert_eq!(image.config.entrypoint, vec!["/bin/tool"]);
    assert_eq!(image.config.cmd, vec!["--help"]);
    assert_eq!(image.config.env, vec!["A=1"]);
    assert_eq!(image.config.working_dir, "/etc");
    assert_eq!(image.config.user, "65534");
    assert_eq!(image.config.stop_signal.as_deref(), Some("SIGINT"));
    assert_eq!(image.config.labels["org.example"], "yes");

    let rootfs = store.rootfs(image);
    assert_eq!(names(&rootfs.join("etc")), vec!["new", "os-release"]);
    assert_eq!(
        fs::read_link(rootfs.join("bin/sh")).unwrap(),
        Path::new("tool")
    );
    assert_eq!(image.size, (8 + 10 + 3) as u64);
    assert_eq!(store.get("example.com/team/app:1").unwrap(), *image);
    assert_eq!(store.list().unwrap(), loaded);
    // Every blob is stored under its digest; nothing is left in tmp.
    let mut blobs = names(&store.root().join("blobs/sha256"));
    let mut expected: Vec<String> = [&built.manifest_digest, &built.config_digest]
        .into_iter()
        .chain(&built.layer_digests)
        .map(|d| d.trim_start_matches("sha256:").to_owned())
        .collect();
    blobs.sort();
    expected.sort();
    assert_eq!(blobs, expected);
    assert!(names(&store.root().join("tmp")).is_empty());
}

#[test]
fn oci_layout_tar_and_reload_is_idempotent() {
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = two_layer_layout(&work.path().join("layout"));
    let archive = work.path().join("layout.tar");
    layout.tar(&archive);
    let (_dir, store) = store();
    let first = store.load(&archive, &LoadOptions::default()).unwrap();
    assert_eq!(first[0].id, built.config_digest);
    let rootfs = store.rootfs(&first[0]);
    let before = fs::metadata(&rootfs).unwrap();

    // Loading again changes nothing, least of all the mounted root file system.
    let second = store.load(&archive, &LoadOptions::default()).unwrap();
    assert_eq!(first, second);
    assert_eq!(store.list().unwrap().len(), 1);
    let after = fs::metadata(&rootfs).unwrap();
    assert_eq!((before.ino(), before.mtime()), (after.ino(), after.mtime()));
    assert_eq!(names(&store.root().join("rootfs")).len(), 1);
}

#[test]
fn archive_from_the_test_helper() {
    // The same kind of archive the containerd tests import with `ctr`.
    use bulkhead_tests::oci_image::{write_image_archive, ImageConfig, LayerCompression};
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    fs::write(rootfs.join("bin/hello"), b"hello").unwrap();
    let archive = work.path().join("busybox.tar");
    let written = write_image_archive(
        &rootfs,
        "docker.io/library/bulkhead-busybox:test",
        &ImageConfig::default(),
        LayerCompression::Gzip,
        &archive,
    )
    .unwrap();
    let (_dir, store) = store();
    let loaded = store.load(&archive, &LoadOptions::default()).unwrap();
    assert_eq!(loaded[0].id, written.config_digest);
    assert_eq!(familiar(&loaded[0].names[0]), "bulkhead-busybox:test");
    let image = store.get("bulkhead-busybox:test").unwrap();
    assert_eq!(
        fs::read(store.rootfs(&image).join("bin/hello")).unwrap(),
        b"hello"
    );
}

/// A legacy `docker save` tarball of two images sharing a base layer, the shared
/// `layer.tar` stored once and linked, as Docker writes it.
fn docker_save(dir: &Path) -> (Vec<String>, std::path::PathBuf) {
    let base = Tar::default().file("etc/base", b"base").finish();
    let a = Tar::default().file("a", b"a").finish();
    let b = Tar::default().file("b", b"b").finish();
    let root = dir.join("save");
    let mut ids = Vec::new();
    let mut manifest = Vec::new();
    fs::create_dir_all(root.join("base")).unwrap();
    fs::write(root.join("base/layer.tar"), &base).unwrap();
    for (name, tags, layer) in [
        ("a", vec!["team/a:1", "team/a:latest"], a),
        ("b", vec!["b"], b),
    ] {
        let config = json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": [format!("/{name}")]},
            "rootfs": {"type": "layers", "diff_ids": [sha256(&base), sha256(&layer)]},
        });
        let config = serde_json::to_vec(&config).unwrap();
        let id = sha256(&config);
        let hex = id.trim_start_matches("sha256:").to_owned();
        fs::write(root.join(format!("{hex}.json")), &config).unwrap();
        fs::create_dir_all(root.join(name)).unwrap();
        fs::write(root.join(name).join("layer.tar"), &layer).unwrap();
        fs::create_dir_all(root.join(format!("base-{name}"))).unwrap();
        std::os::unix::fs::symlink(
            "../base/layer.tar",
            root.join(format!("base-{name}/layer.tar")),
        )
        .unwrap();
        manifest.push(json!({
            "Config": format!("{hex}.json"),
            "RepoTags": tags,
            "Layers": [format!("base-{name}/layer.tar"), format!("{name}/layer.tar")],
        }));
        ids.push(id);
    }
    fs::write(
        root.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    fs::write(root.join("repositories"), b"{}").unwrap();
    let out = dir.join("save.tar");
    tar_dir(&root, &out);
    (ids, out)
}

#[test]
fn docker_save_tarball_plain_and_gzipped() {
    let work = tempfile::tempdir().unwrap();
    let (ids, archive) = docker_save(work.path());
    let gzipped = work.path().join("save.tar.gz");
    let (gz, _) = Comp::Gzip.apply(&fs::read(&archive).unwrap());
    fs::write(&gzipped, gz).unwrap();
    for path in [&archive, &gzipped] {
        let (_dir, store) = store();
        let loaded = store.load(path, &LoadOptions::default()).unwrap();
        assert_eq!(
            loaded.iter().map(|i| &i.id).collect::<Vec<_>>(),
            ids.iter().collect::<Vec<_>>()
        );
        assert_eq!(
            loaded[0].names,
            vec!["docker.io/team/a:1", "docker.io/team/a:latest"]
        );
        assert_eq!(loaded[1].names, vec!["docker.io/library/b:latest"]);
        assert_eq!(loaded[0].config.cmd, vec!["/a"]);
        let a = store.rootfs(&loaded[0]);
        assert_eq!(names(&a), vec!["a", "etc"]);
        assert_eq!(fs::read(a.join("etc/base")).unwrap(), b"base");
        assert_eq!(
            names(&store.rootfs(&store.get("b").unwrap())),
            vec!["b", "etc"]
        );
        // The synthesized manifest is a stored blob like any other.
        let manifest = store
            .root()
            .join("blobs/sha256")
            .join(loaded[0].manifest_digest.trim_start_matches("sha256:"));
        assert!(manifest.is_file());
        // base layer, a, b, 2 configs, 2 manifests
        assert_eq!(names(&store.root().join("blobs/sha256")).len(), 7);
    }
}

#[test]
fn not_an_image() {
    let work = tempfile::tempdir().unwrap();
    let (_dir, store) = store();
    let plain = work.path().join("files.tar");
    let files = work.path().join("files");
    fs::create_dir_all(&files).unwrap();
    fs::write(files.join("hello.txt"), b"hi").unwrap();
    tar_dir(&files, &plain);
    let junk = work.path().join("junk.bin");
    fs::write(&junk, vec![7u8; 3000]).unwrap();
    let empty = work.path().join("empty.tar");
    fs::write(&empty, vec![0u8; 1024]).unwrap();
    for path in [&plain, &junk, &empty, &files] {
        let err = store.load(path, &LoadOptions::default()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::NotAnImage { .. }), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            text.contains("OCI image layout") && text.contains("docker save"),
            "{text}"
        );
    }
    let err = store
        .load(&work.path().join("missing.tar"), &LoadOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("missing.tar"), "{err}");
    assert_store_empty(&store);
}

#[test]
fn tag_names_the_unnamed_image() {
    let work = tempfile::tempdir().unwrap();
    let layout = Layout::new(&work.path().join("layout"));
    let one = layout.image(&Spec::new(vec![(one_file_layer("x", b"1"), Comp::None)]));
    layout.finish(vec![one.descriptor(
        "amd64",
        json!({"org.opencontainers.image.ref.name": "v1"}),
    )]);
    let (_dir, store) = store();
    let opts = LoadOptions {
        tag: Some("local/thing:v1".into()),
        progress: false,
    };
    let loaded = store.load(&layout.dir, &opts).unwrap();
    assert_eq!(loaded[0].names, vec!["docker.io/local/thing:v1"]);

    // Two unnamed images: a tag cannot say which; nothing is loaded.
    let two = layout.image(&Spec::new(vec![(one_file_layer("y", b"2"), Comp::None)]));
    layout.finish(vec![
        one.descriptor("amd64", json!({})),
        two.descriptor("amd64", json!({})),
    ]);
    let (_dir2, fresh) = self::store();
    let err = fresh.load(&layout.dir, &opts).unwrap_err();
    assert!(
        matches!(err, StoreError::AmbiguousTag { count: 2, .. }),
        "{err}"
    );
    assert_store_empty(&fresh);
    // Without a tag both load, unnamed, and are found by id.
    let loaded = fresh.load(&layout.dir, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.len(), 2);
    assert!(loaded.iter().all(|i| i.names.is_empty()));
    assert_eq!(fresh.get(&two.config_digest).unwrap().id, two.config_digest);
}

#[test]
fn multi_platform_layout_loads_amd64_only() {
    let work = tempfile::tempdir().unwrap();
    let layout = Layout::new(&work.path().join("layout"));
    let arm = layout.image(&Spec {
        arch: "arm64",
        ..Spec::new(vec![(one_file_layer("arch", b"arm64"), Comp::Gzip)])
    });
    let amd = layout.image(&Spec::new(vec![(
        one_file_layer("arch", b"amd64"),
        Comp::Gzip,
    )]));
    let index = layout.index_blob(
        vec![
            arm.descriptor("arm64", json!({})),
            amd.descriptor("amd64", json!({})),
        ],
        json!({"io.containerd.image.name": "docker.io/library/multi:1"}),
    );
    layout.finish(vec![index]);
    let (_dir, store) = store();
    let loaded = store.load(&layout.dir, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].id, amd.config_digest);
    assert_eq!(loaded[0].manifest_digest, amd.manifest_digest);
    assert_eq!(
        fs::read(store.rootfs(&loaded[0]).join("arch")).unwrap(),
        b"amd64"
    );
    assert!(!store
        .root()
        .join("blobs/sha256")
        .join(arm.layer_digests[0].trim_start_matches("sha256:"))
        .exists());

    // The platforms listed straight in index.json (no nested index) as well.
    layout.finish(vec![
        arm.descriptor(
            "arm64",
            json!({"io.containerd.image.name": "docker.io/library/m:arm"}),
        ),
        amd.descriptor(
            "amd64",
            json!({"io.containerd.image.name": "docker.io/library/m:amd"}),
        ),
    ]);
    let (_dir2, fresh) = self::store();
    let loaded = fresh.load(&layout.dir, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].names, vec!["docker.io/library/m:amd"]);
}

#[test]
fn corrupt_blob_leaves_the_store_as_it_was() {
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = two_layer_layout(&work.path().join("layout"));
    let (_dir, store) = store();
    // Flip one byte of the second layer, keeping its size.
    let victim = layout.blob_path(&built.layer_digests[1]);
    let mut bytes = fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&victim, &bytes).unwrap();

    let err = store
        .load(&layout.dir, &LoadOptions::default())
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{text}");
    assert!(
        text.contains(&built.layer_digests[1]),
        "names blob and expected: {text}"
    );
    assert!(
        text.contains(&sha256(&bytes)),
        "names the actual digest: {text}"
    );
    assert_store_empty(&store);
}

#[test]
fn lying_diff_id_leaves_the_store_as_it_was() {
    let work = tempfile::tempdir().unwrap();
    let layout = Layout::new(&work.path().join("layout"));
    let layer = one_file_layer("f", b"x");
    let lie = sha256(b"another layer");
    let built = layout.image(&Spec {
        diff_ids: Some(vec![lie.clone()]),
        ..Spec::new(vec![(layer.clone(), Comp::Gzip)])
    });
    layout.finish(vec![
        built.descriptor("amd64", json!({"io.containerd.image.name": NAME}))
    ]);
    let (_dir, store) = store();
    let err = store
        .load(&layout.dir, &LoadOptions::default())
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{text}");
    assert!(
        text.contains(&lie) && text.contains(&sha256(&layer)),
        "{text}"
    );
    assert!(text.contains("uncompressed layer"), "{text}");
    assert_store_empty(&store);
}

#[test]
fn missing_blob_is_named() {
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = two_layer_layout(&work.path().join("layout"));
    fs::remove_file(layout.blob_path(&built.layer_digests[0])).unwrap();
    let (_dir, store) = store();
    let err = store
        .load(&layout.dir, &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidArchive { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(built.layer_digests[0].trim_start_matches("sha256:")),
        "{err}"
    );
    assert_store_empty(&store);
}
