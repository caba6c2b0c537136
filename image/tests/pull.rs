//! `Store::pull` against a private `docker-registry` on 127.0.0.1 (the tests
//! crate's harness; `cargo xtask setup` installs it and skopeo): tags, digests,
//! a multi-platform index, a registry that is down, a corrupted blob and an
//! unknown tag.

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::Path;

use bulkhead_image::{PullOptions, Store, StoreError};
use bulkhead_tests::registry::Registry;
use common::*;
use serde_json::json;

fn registry() -> Registry {
    Registry::start().unwrap_or_else(|e| {
        panic!("cannot start the test registry (`cargo xtask setup` installs docker-registry and skopeo): {e}")
    })
}

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("images")).unwrap();
    (dir, store)
}

/// Pull options for the tests: an empty Docker config, so the machine's real
/// one (if any) is never read.
fn opts(dir: &Path) -> PullOptions {
    PullOptions {
        docker_config: Some(dir.join("no-docker-config.json")),
        ..PullOptions::default()
    }
}

/// A two-layer image (gzip and plain, the second with a whiteout) as a layout.
fn app_layout(dir: &Path) -> (Layout, Built) {
    let layout = Layout::new(dir);
    let base = Tar::default()
        .file("etc/hostname", b"pulled\n")
        .file("etc/remove-me", b"x")
        .finish();
    let top = Tar::default()
        .whiteout("etc", "remove-me")
        .file("app/run", b"run")
        .finish();
    let built = layout.image(&Spec::new(vec![(base, Comp::Gzip), (top, Comp::None)]));
    layout.finish(vec![built.descriptor("amd64", json!({}))]);
    (layout, built)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_tag_then_by_digest() {
    let registry = registry();
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = app_layout(&work.path().join("layout"));
    registry
        .push_oci_archive(&layout.dir, "team/app:1")
        .unwrap();
    let (_dir, store) = store();
    let name = format!("{}/team/app:1", registry.addr());

    let image = store.pull(&name, &opts(work.path())).await.unwrap();
    assert_eq!(image.id, built.config_digest);
    assert_eq!(image.names, vec![name.clone()]);
    assert_eq!(image.manifest_digest, built.manifest_digest);
    assert_eq!(
        image.repo_digests,
        vec![format!(
            "{}/team/app@{}",
            registry.addr(),
            built.manifest_digest
        )]
    );
    assert_eq!(image.config.cmd, vec!["sh"]);
    let rootfs = store.rootfs(&image);
    assert_eq!(fs::read(rootfs.join("etc/hostname")).unwrap(), b"pulled\n");
    assert!(!rootfs.join("etc/remove-me").exists(), "whiteout applied");
    assert_eq!(fs::read(rootfs.join("app/run")).unwrap(), b"run");
    assert_eq!(store.get(&name).unwrap(), image);
    assert!(names(&store.root().join("tmp")).is_empty());

    // Again: nothing new, same record.
    assert_eq!(store.pull(&name, &opts(work.path())).await.unwrap(), image);

    // By digest: the same image gets the digest reference as a name too.
    let by_digest = format!("{}/team/app@{}", registry.addr(), built.manifest_digest);
    let again = store.pull(&by_digest, &opts(work.path())).await.unwrap();
    assert_eq!(again.id, image.id);
    assert!(again.names.contains(&by_digest) && again.names.contains(&name));
    assert_eq!(store.get(&by_digest).unwrap().id, image.id);
    assert_eq!(store.list().unwrap().len(), 1);

    // Through `localhost` as well (plain HTTP is allowed for it on any port).
    let port = registry.addr().rsplit(':').next().unwrap().to_owned();
    let (_dir2, fresh) = self::store();
    let local = fresh
        .pull(
            &format!("localhost:{port}/team/app@{}", built.manifest_digest),
            &opts(work.path()),
        )
        .await
        .unwrap();
    assert_eq!(local.id, image.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_platform_index_resolves_to_amd64() {
    let registry = registry();
    let work = tempfile::tempdir().unwrap();
    let layout = Layout::new(&work.path().join("layout"));
    let arm = layout.image(&Spec {
        arch: "arm64",
        ..Spec::new(vec![(one_file_layer("arch", b"arm64"), Comp::Gzip)])
    });
    let amd = layout.image(&Spec::new(vec![(
        one_file_layer("arch", b"amd64"),
        Comp::Zstd,
    )]));
    // arm64 listed first, so picking the first entry would be wrong.
    let index = layout.index_blob(
        vec![
            arm.descriptor("arm64", json!({})),
            amd.descriptor("amd64", json!({})),
        ],
        json!({}),
    );
    let index_digest = index["digest"].as_str().unwrap().to_owned();
    layout.finish(vec![index]);
    registry.push_oci_archive(&layout.dir, "multi:1").unwrap();

    let (_dir, store) = store();
    let name = format!("{}/multi:1", registry.addr());
    let image = store.pull(&name, &opts(work.path())).await.unwrap();
    assert_eq!(image.id, amd.config_digest);
    assert_eq!(image.manifest_digest, amd.manifest_digest);
    assert_eq!(
        image.repo_digests,
        vec![format!("{}/multi@{index_digest}", registry.addr())],
        "the repo digest is the index's, as in Docker"
    );
    assert_eq!(
        fs::read(store.rootfs(&image).join("arch")).unwrap(),
        b"amd64"
    );
    let blobs = names(&store.root().join("blobs/sha256"));
    assert!(blobs.contains(&index_digest.trim_start_matches("sha256:").to_owned()));
    assert!(!blobs.contains(
        &arm.layer_digests[0]
            .trim_start_matches("sha256:")
            .to_owned()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_is_named() {
    let work = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_dir, store) = store();
    let err = store
        .pull(&format!("{addr}/team/app:1"), &opts(work.path()))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, StoreError::RegistryUnreachable { .. }),
        "{text}"
    );
    assert!(
        text.contains(&addr.to_string()),
        "names the registry: {text}"
    );
    assert!(text.contains("Could not reach"), "{text}");
    assert_store_empty(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_blob_in_the_registry() {
    let registry = registry();
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = app_layout(&work.path().join("layout"));
    registry
        .push_oci_archive(&layout.dir, "team/app:1")
        .unwrap();
    // The registry now serves a layer whose bytes do not match its digest.
    let victim = registry.blob_path(&built.layer_digests[1]);
    let mut bytes = fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&victim, &bytes).unwrap();

    let (_dir, store) = store();
    let err = store
        .pull(
            &format!("{}/team/app:1", registry.addr()),
            &opts(work.path()),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{text}");
    assert!(
        text.contains(&built.layer_digests[1]),
        "names the blob: {text}"
    );
    assert!(text.contains(&sha256(&bytes)), "names what arrived: {text}");
    assert_store_empty(&store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tag_and_repository() {
    let registry = registry();
    let work = tempfile::tempdir().unwrap();
    let (layout, _) = app_layout(&work.path().join("layout"));
    registry
        .push_oci_archive(&layout.dir, "team/app:1")
        .unwrap();
    let (_dir, store) = store();
    for name in ["team/app:nope", "team/nothing:1"] {
        let full = format!("{}/{name}", registry.addr());
        let err = store.pull(&full, &opts(work.path())).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::RemoteNotFound { .. }), "{text}");
        assert!(text.contains(&full) && text.contains("not found"), "{text}");
    }
    let err = store
        .pull(
            &format!("{}/Team/App:1", registry.addr()),
            &opts(work.path()),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lowercase"), "{err}");
    assert_store_empty(&store);
}
