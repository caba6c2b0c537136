//! Lookups, removal with garbage collection, leftovers of killed processes and
//! concurrent users of one store.

mod common;

use std::fs;
use std::path::Path;
use std::sync::{Arc, Barrier};

use bulkhead_image::{ImageRecord, LoadOptions, Store, StoreError};
use common::*;
use serde_json::json;

/// A layout of two images sharing a base layer: `app-a` (also tagged `alias`)
/// and `app-b`.
fn shared_base(dir: &Path) -> (Layout, Built, Built) {
    let layout = Layout::new(dir);
    let base = Tar::default().file("etc/base", b"base").finish();
    let a = layout.image(&Spec::new(vec![
        (base.clone(), Comp::Gzip),
        (one_file_layer("a", b"a"), Comp::Gzip),
    ]));
    let b = layout.image(&Spec::new(vec![
        (base, Comp::Gzip),
        (one_file_layer("b", b"b"), Comp::Gzip),
    ]));
    layout.finish(vec![
        a.descriptor(
            "amd64",
            json!({"io.containerd.image.name": "docker.io/library/app-a:1"}),
        ),
        a.descriptor(
            "amd64",
            json!({"io.containerd.image.name": "docker.io/library/alias:latest"}),
        ),
        b.descriptor(
            "amd64",
            json!({"io.containerd.image.name": "docker.io/library/app-b:1"}),
        ),
    ]);
    (layout, a, b)
}

fn hexes(store: &Store, dir: &str) -> Vec<String> {
    names(&store.root().join(dir))
}

fn hex(digest: &str) -> String {
    digest.trim_start_matches("sha256:").to_owned()
}

#[test]
fn get_by_name_id_and_prefix() {
    let work = tempfile::tempdir().unwrap();
    let (layout, a, b) = shared_base(&work.path().join("layout"));
    let store = Store::open(work.path().join("images")).unwrap();
    store.load(&layout.dir, &LoadOptions::default()).unwrap();
    let images = store.list().unwrap();
    assert_eq!(images.len(), 2, "one image, two names: {images:?}");
    assert_eq!(
        images[0].names,
        vec![
            "docker.io/library/app-a:1",
            "docker.io/library/alias:latest"
        ]
    );

    let id_of = |what: &str| store.get(what).map(|i| i.id);
    for name in [
        "app-a:1",
        "library/app-a:1",
        "docker.io/library/app-a:1",
        "alias",
        "alias:latest",
    ] {
        assert_eq!(id_of(name).unwrap(), a.config_digest, "{name}");
    }
    let a_hex = hex(&a.config_digest);
    let b_hex = hex(&b.config_digest);
    let shared = a_hex
        .chars()
        .zip(b_hex.chars())
        .take_while(|(x, y)| x == y)
        .count();
    for id in [
        a.config_digest.clone(),
        a_hex.clone(),
        a_hex[..shared + 1].to_owned(),
        format!("sha256:{}", &a_hex[..shared + 4]),
    ] {
        assert_eq!(id_of(&id).unwrap(), a.config_digest, "{id}");
    }
    if shared > 0 {
        let err = store.get(&a_hex[..shared]).unwrap_err();
        assert!(matches!(err, StoreError::AmbiguousId { .. }), "{err}");
    }

    for missing in ["app-a:2", "nothing", "sha256:ffff0000", "0123456789ab"] {
        let err = store.get(missing).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, StoreError::NotFound { .. }),
            "{missing}: {text}"
        );
        assert!(
            text.contains(missing) && text.contains("bulkhead pull"),
            "{text}"
        );
    }
    let err = store.get("Bad/Name").unwrap_err();
    assert!(matches!(err, StoreError::InvalidReference { .. }), "{err}");
}

#[test]
fn remove_untags_then_deletes_and_collects_garbage() {
    let work = tempfile::tempdir().unwrap();
    let (layout, a, b) = shared_base(&work.path().join("layout"));
    let store = Store::open(work.path().join("images")).unwrap();
    store.load(&layout.dir, &LoadOptions::default()).unwrap();
    let a_record = store.get("app-a:1").unwrap();
    let a_rootfs = store.rootfs(&a_record);
    assert!(a_rootfs.join("a").is_file());
    let blobs_before = hexes(&store, "blobs/sha256");
    // base, a, b layers; 2 configs; 2 manifests
    assert_eq!(blobs_before.len(), 7);

    // Untag one of two names: the image stays.
    let removed = store.remove("alias").unwrap();
    assert_eq!(removed.untagged, vec!["docker.io/library/alias:latest"]);
    assert!(removed.deleted.is_empty());
    assert_eq!(
        store.get(&a.config_digest).unwrap().names,
        vec!["docker.io/library/app-a:1"]
    );
    assert!(matches!(
        store.get("alias"),
        Err(StoreError::NotFound { .. })
    ));

    // Untag the last name: the image, its rootfs and its own blobs go; the
    // shared base layer stays for app-b.
    let removed = store.remove("app-a:1").unwrap();
    assert_eq!(removed.untagged, vec!["docker.io/library/app-a:1"]);
    assert_eq!(removed.deleted, vec![a.config_digest.clone()]);
    assert!(!a_rootfs.exists());
    let blobs = hexes(&store, "blobs/sha256");
    assert!(
        blobs.contains(&hex(&a.layer_digests[0])),
        "shared base layer kept"
    );
    assert!(!blobs.contains(&hex(&a.layer_digests[1])));
    assert!(!blobs.contains(&hex(&a.config_digest)));
    assert!(!blobs.contains(&hex(&a.manifest_digest)));
    assert_eq!(blobs.len(), 4);
    let b_record = store.get("app-b:1").unwrap();
    assert!(store.rootfs(&b_record).join("etc/base").is_file());

    // By id: deleted with all names.
    let removed = store.remove(&hex(&b.config_digest)[..12]).unwrap();
    assert_eq!(removed.untagged, vec!["docker.io/library/app-b:1"]);
    assert_eq!(removed.deleted, vec![b.config_digest.clone()]);
    assert_store_empty(&store);
    assert!(matches!(
        store.remove("app-b:1"),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn leftovers_of_killed_operations_are_cleaned_and_never_visible() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("images");
    let store = Store::open(&root).unwrap();
    let layout = Layout::new(&work.path().join("layout"));
    let built = layout.image(&Spec::new(vec![(one_file_layer("f", b"1"), Comp::None)]));
    layout.finish(vec![built.descriptor(
        "amd64",
        json!({"io.containerd.image.name": "docker.io/library/x:1"}),
    )]);

    // What a pull killed mid-way leaves: a half-unpacked rootfs, a half-written
    // blob and a half-written index, all in its work directory in tmp/.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let killed = root.join(format!("tmp/pull-{dead}-abc"));
    fs::create_dir_all(killed.join("rootfs/etc")).unwrap();
    fs::create_dir_all(killed.join("blobs")).unwrap();
    fs::write(killed.join("blobs/incoming-0"), b"partial").unwrap();
    fs::write(root.join(format!("tmp/index-{dead}-def.json")), b"{\"ver").unwrap();
    // ... and one killed between placing a rootfs and writing the index.
    let orphan = root.join("rootfs").join(hex(&built.config_digest));
    fs::create_dir_all(orphan.join("etc")).unwrap();
    fs::write(orphan.join("etc/complete"), b"from the interrupted commit").unwrap();

    // None of it is an image.
    assert!(store.list().unwrap().is_empty());
    assert!(matches!(store.get("x:1"), Err(StoreError::NotFound { .. })));

    // Opening the store again removes the dead process's work.
    let store = Store::open(&root).unwrap();
    assert!(names(&root.join("tmp")).is_empty());

    // A load of that image uses the complete rootfs the interrupted commit left.
    let loaded = store.load(&layout.dir, &LoadOptions::default()).unwrap();
    assert_eq!(store.rootfs(&loaded[0]), orphan);
    assert!(orphan.join("etc/complete").is_file(), "kept, not replaced");
    // Removing collects everything, orphans included.
    store.remove("x:1").unwrap();
    assert_store_empty(&store);
}

#[test]
fn concurrent_loads_through_separate_handles() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("images");
    let mut layouts = Vec::new();
    for i in 0..4 {
        let layout = Layout::new(&work.path().join(format!("layout{i}")));
        let base = Tar::default()
            .file("etc/shared", b"same base in all")
            .finish();
        let built = layout.image(&Spec::new(vec![
            (base, Comp::Gzip),
            (one_file_layer("n", format!("{i}").as_bytes()), Comp::Gzip),
        ]));
        layout.finish(vec![built.descriptor(
            "amd64",
            json!({"io.containerd.image.name": format!("docker.io/library/img{i}:1")}),
        )]);
        layouts.push(layout.dir);
    }
    // Image 0 twice at once too: same image, two loads, one result.
    layouts.push(layouts[0].clone());
    let barrier = Arc::new(Barrier::new(layouts.len()));
    let threads: Vec<_> = layouts
        .into_iter()
        .map(|dir| {
            let (root, barrier) = (root.clone(), barrier.clone());
            std::thread::spawn(move || -> Vec<ImageRecord> {
                let store = Store::open(&root).unwrap();
                barrier.wait();
                store.load(&dir, &LoadOptions::default()).unwrap()
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let store = Store::open(&root).unwrap();
    let images = store.list().unwrap();
    assert_eq!(images.len(), 4, "{images:?}");
    for i in 0..4 {
        let image = store.get(&format!("img{i}:1")).unwrap();
        let rootfs = store.rootfs(&image);
        assert_eq!(
            fs::read(rootfs.join("n")).unwrap(),
            format!("{i}").as_bytes()
        );
        assert!(rootfs.join("etc/shared").is_file());
    }
    assert_eq!(names(&root.join("rootfs")).len(), 4);
    assert!(names(&root.join("tmp")).is_empty());
}
