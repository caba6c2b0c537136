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

    // With progress bars (drawn only when stderr is a terminal).
    let with_bars = PullOptions {
        progress: true,
        ..opts(work.path())
    };
    let image = store.pull(&name, &with_bars).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_from_the_docker_config() {
    use base64::Engine as _;
    use bulkhead_tests::registry::{AUTH_PASSWORD, AUTH_USER};
    let registry = Registry::start_with_auth().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (layout, built) = app_layout(&work.path().join("layout"));
    registry
        .push_oci_archive(&layout.dir, "private/app:1")
        .unwrap();
    let name = format!("{}/private/app:1", registry.addr());
    let (_dir, store) = store();
    let config = |user: &str, password: &str| {
        let path = work.path().join(format!("config-{password}.json"));
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let json = json!({"auths": {registry.addr(): {"auth": auth}}});
        fs::write(&path, json.to_string()).unwrap();
        PullOptions {
            docker_config: Some(path),
            ..PullOptions::default()
        }
    };

    // No credentials, then wrong ones: denied, and the message says what to do.
    for opts in [opts(work.path()), config(AUTH_USER, "wrong")] {
        let err = store.pull(&name, &opts).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Unauthorized { .. }), "{text}");
        assert!(text.contains(&registry.addr()), "{text}");
        assert!(text.contains("docker login"), "{text}");
        let config_path = opts.docker_config.unwrap().display().to_string();
        assert!(text.contains(&config_path), "names the config file: {text}");
        assert_store_empty(&store);
    }
    let image = store
        .pull(&name, &config(AUTH_USER, AUTH_PASSWORD))
        .await
        .unwrap();
    assert_eq!(image.id, built.config_digest);
}

/// Incompressible bytes, so layers are big on the wire too.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An image of `layers` layers of `size` random bytes each, pushed as `name_tag`.
fn push_big(registry: &Registry, dir: &Path, name_tag: &str, layers: u64, size: usize) -> Built {
    let layout = Layout::new(dir);
    let layers = (0..layers)
        .map(|i| {
            let name_hash = name_tag.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            let seed = name_hash.wrapping_add(i);
            let tar = Tar::default()
                .file(&format!("data/{i}"), &noise(size, seed))
                .finish();
            (tar, Comp::Gzip)
        })
        .collect();
    let built = layout.image(&Spec::new(layers));
    layout.finish(vec![built.descriptor("amd64", json!({}))]);
    registry.push_oci_archive(&layout.dir, name_tag).unwrap();
    built
}

/// Run this test binary's `child_pull` in a new process: a real second
/// `bulkhead` process using the same store.
fn spawn_child_pull(root: &Path, reference: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_pull",
            "--exact",
            "--ignored",
            "--quiet",
            "--test-threads=1",
        ])
        .env("BULKHEAD_TEST_STORE", root)
        .env("BULKHEAD_TEST_PULL", reference)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The child process of the tests below; does nothing when run on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by other tests as a child process"]
async fn child_pull() {
    let (Ok(root), Ok(reference)) = (
        std::env::var("BULKHEAD_TEST_STORE"),
        std::env::var("BULKHEAD_TEST_PULL"),
    ) else {
        return;
    };
    let store = Store::open(&root).unwrap();
    let opts = opts(Path::new(&root));
    store.pull(&reference, &opts).await.unwrap();
}

#[test]
fn two_processes_pull_different_images_at_once() {
    let registry = registry();
    let work = tempfile::tempdir().unwrap();
    let one = push_big(
        &registry,
        &work.path().join("one"),
        "team/one:1",
        3,
        1 << 20,
    );
    let two = push_big(
        &registry,
        &work.path().join("two"),
        "team/two:1",
        3,
        1 << 20,
    );
    let root = work.path().join("images");
    Store::open(&root).unwrap();
    let children = ["team/one:1", "team/two:1"]
        .map(|name| spawn_child_pull(&root, &format!("{}/{name}", registry.addr())));
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let store = Store::open(&root).unwrap();
    let ids: Vec<String> = store.list().unwrap().into_iter().map(|i| i.id).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&one.config_digest) && ids.contains(&two.config_digest));
    for image in store.list().unwrap() {
        assert_eq!(
            names(&store.rootfs(&image).join("data")),
            vec!["0", "1", "2"]
        );
    }
    assert!(names(&root.join("tmp")).is_empty());
}

/// Whatever moment a pull is killed at, the store shows either nothing or the
/// complete image, every stored blob matches its digest, and reopening the store
/// removes the dead pull's work.
#[test]
fn killed_pull_leaves_nothing_half_written() {
    let registry = registry();
    let work = tempfile::tempdir().unwrap();
    let built = push_big(
        &registry,
        &work.path().join("big"),
        "team/big:1",
        3,
        4 << 20,
    );
    let reference = format!("{}/team/big:1", registry.addr());
    let mut completed = 0;
    for (round, delay_ms) in [0u64, 30, 100, 250, 500, 1000, 2000]
        .into_iter()
        .enumerate()
    {
        let root = work.path().join(format!("images-{round}"));
        Store::open(&root).unwrap();
        let mut child = spawn_child_pull(&root, &reference);
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        completed += usize::from(status.success());

        let store = Store::open(&root).unwrap();
        assert!(
            names(&root.join("tmp")).is_empty(),
            "round {round}: work left"
        );
        for hex in names(&root.join("blobs/sha256")) {
            let bytes = fs::read(root.join("blobs/sha256").join(&hex)).unwrap();
            assert_eq!(
                sha256(&bytes),
                format!("sha256:{hex}"),
                "round {round}: partial blob"
            );
        }
        let images = store.list().unwrap();
        for dir in names(&root.join("rootfs")) {
            let rootfs = root.join("rootfs").join(&dir);
            assert_eq!(
                names(&rootfs.join("data")),
                vec!["0", "1", "2"],
                "round {round}"
            );
        }
        if let Some(image) = images.first() {
            assert_eq!(image.id, built.config_digest);
            assert!(store.rootfs(image).is_dir());
        }
        // And the store still works: the pull completes after the crash.
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let image = runtime
            .block_on(store.pull(&reference, &opts(&root)))
            .unwrap();
        assert_eq!(
            names(&store.rootfs(&image).join("data")),
            vec!["0", "1", "2"]
        );
    }
    eprintln!("pulls that finished before the kill: {completed} of 7");
}
