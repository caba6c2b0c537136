//! End-to-end: the `bulkhead` CLI with images, no containerd: pull from a
//! local registry (Debian's docker-registry, an image pushed with skopeo),
//! load, run with the image's config and Docker's flags, detached containers
//! with logs, exec, stop and rm, volumes, limits, and bad input refused with
//! the store left as it was.

mod common;

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use bulkhead_tests::oci_image::{write_image_archive, ImageArchive, ImageConfig, LayerCompression};
use bulkhead_tests::process;
use bulkhead_tests::registry::Registry;
use libtest_mimic::Failed;

/// Generous: a sandbox boots in seconds under emulation.
const DEADLINE: Duration = Duration::from_secs(240);

fn main() -> ExitCode {
    common::main("images", || {
        vec![
            common::trial(
                "pull_then_run_uses_the_image_config",
                pull_then_run_uses_the_image_config,
            ),
            common::trial(
                "docker_flags_env_workdir_user_entrypoint",
                docker_flags_env_workdir_user_entrypoint,
            ),
            common::trial(
                "volumes_read_write_and_read_only",
                volumes_read_write_and_read_only,
            ),
            common::trial("detached_logs_exec_stop_rm", detached_logs_exec_stop_rm),
            common::trial("memory_limit_is_enforced", memory_limit_is_enforced),
            common::trial("rm_flag_leaves_nothing", rm_flag_leaves_nothing),
            common::trial(
                "bad_references_and_registries",
                bad_references_and_registries,
            ),
            common::trial(
                "corrupted_blob_leaves_the_store_as_it_was",
                corrupted_blob_leaves_the_store_as_it_was,
            ),
            common::trial(
                "load_refuses_what_is_not_an_image",
                load_refuses_what_is_not_an_image,
            ),
        ]
    })
}

fn cli() -> PathBuf {
    common::bulkhead_cli()
}

/// What a `bulkhead` command did.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn bulkhead(args: &[&str]) -> Result<Out, Failed> {
    let mut c = Command::new(cli());
    c.args(args).stdin(Stdio::null());
    let (status, out) = process::run_status(&mut c, DEADLINE)?;
    Ok(Out {
        code: status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: out.stderr,
    })
}

/// Runs `bulkhead ARGS` and requires exit `code`.
fn expect(args: &[&str], code: i32) -> Result<Out, Failed> {
    let out = bulkhead(args)?;
    if out.code != code {
        return Err(format!(
            "bulkhead {}: expected exit {code}, got {}\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.code,
            out.stdout,
            out.stderr
        )
        .into());
    }
    Ok(out)
}

fn contains(out: &Out, what: &str, needle: &str) -> Result<(), Failed> {
    if !out.stdout.contains(needle) && !out.stderr.contains(needle) {
        return Err(format!(
            "{what}: {needle:?} not in\nstdout: {}\nstderr: {}",
            out.stdout, out.stderr
        )
        .into());
    }
    Ok(())
}

fn nothing_left() -> Result<(), Failed> {
    common::nothing_left(&["bulkhead-vmm", "virtiofsd", "bulkhead"])
}

/// A busybox image (with the usual users) as an OCI archive, and the rootfs it came from.
struct TestImage {
    _dir: tempfile::TempDir,
    archive: ImageArchive,
}

/// A busybox image whose layer is its own: `name` is written into it, so no
/// other test's image shares its blobs.
fn busybox_image(name: &str, config: &ImageConfig) -> Result<TestImage, Failed> {
    let dir = tempfile::tempdir()?;
    let rootfs = dir.path().join("rootfs");
    common::busybox_rootfs(&rootfs)?;
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    std::fs::write(
        rootfs.join("etc/group"),
        "root:x:0:\nwheel:x:10:nobody\nnogroup:x:65534:\n",
    )?;
    std::fs::create_dir_all(rootfs.join("srv/app"))?;
    std::fs::write(rootfs.join("srv/app/greeting"), "hello from the image\n")?;
    std::fs::write(rootfs.join("etc/image-name"), name)?;
    let archive = write_image_archive(
        &rootfs,
        name,
        config,
        LayerCompression::Gzip,
        &dir.path().join("image.tar"),
    )?;
    Ok(TestImage { _dir: dir, archive })
}

/// A registry with busybox pushed as `bulkhead/busybox:1`; returns its reference.
fn registry_with_busybox(
    tag: &str,
    config: &ImageConfig,
) -> Result<(Registry, TestImage, String), Failed> {
    let registry = Registry::start()?;
    let image = busybox_image(&format!("docker.io/library/busybox:{tag}"), config)?;
    let reference = format!("{}/bulkhead/busybox:1", registry.addr());
    registry.push_oci_archive(&image.archive.path, "bulkhead/busybox:1")?;
    Ok((registry, image, reference))
}

/// The image ids in the store, sorted, to compare before and after.
fn store_ids() -> Result<Vec<String>, Failed> {
    let out = expect(&["images", "-q"], 0)?;
    let mut ids: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    ids.sort();
    Ok(ids)
}

fn pull_then_run_uses_the_image_config() -> Result<(), Failed> {
    let config = ImageConfig {
        entrypoint: vec![],
        cmd: vec!["cat".into(), "/srv/app/greeting".into()],
        env: vec![
            bulkhead_tests::oci_image::DEFAULT_PATH_ENV.into(),
            "FROM_IMAGE=yes".into(),
        ],
        working_dir: "/srv/app".into(),
    };
    let (_registry, image, reference) = registry_with_busybox("pull", &config)?;
    let pulled = expect(&["pull", &reference], 0)?;
    contains(&pulled, "pull", &image.archive.config_digest)?;
    let listed = expect(&["images"], 0)?;
    contains(
        &listed,
        "images",
        &format!("{}/bulkhead/busybox", _registry.addr()),
    )?;
    // The image's Cmd, WorkingDir and Env apply when the command line says nothing.
    let out = expect(&["run", "--rm", &reference], 0)?;
    if out.stdout != "hello from the image\n" {
        return Err(format!(
            "the image's Cmd did not run: {:?} {:?}",
            out.stdout, out.stderr
        )
        .into());
    }
    let out = expect(
        &[
            "run",
            "--rm",
            &reference,
            "sh",
            "-c",
            "echo $FROM_IMAGE $(pwd); echo err >&2; exit 7",
        ],
        7,
    )?;
    if out.stdout != "yes /srv/app\n" || !out.stderr.contains("err") {
        return Err(format!("env/workdir/stderr: {:?} {:?}", out.stdout, out.stderr).into());
    }
    // By digest too.
    let by_digest = format!(
        "{}/bulkhead/busybox@{}",
        _registry.addr(),
        image.archive.manifest_digest
    );
    expect(&["pull", &by_digest], 0)?;
    expect(&["run", "--rm", &by_digest, "true"], 0)?;
    expect(&["rmi", &by_digest], 0)?;
    expect(&["rmi", &reference], 0)?;
    if !store_ids()?.is_empty() {
        return Err("rmi of every name left the image".into());
    }
    nothing_left()
}

fn docker_flags_env_workdir_user_entrypoint() -> Result<(), Failed> {
    // `-e NAME` takes the value from the CLI's environment (tests run one at a time).
    std::env::set_var("BULKHEAD_E2E_FROM_HOST", "from-host");
    std::env::remove_var("BULKHEAD_E2E_UNSET_HERE");
    let image = busybox_image("docker.io/library/busybox:flags", &ImageConfig::default())?;
    expect(&["load", "-i", &image.archive.path.to_string_lossy()], 0)?;
    let env_file = tempfile::NamedTempFile::new()?;
    std::fs::write(env_file.path(), "# comment\nFROM_FILE=1\nBOTH=file\n")?;
    let out = expect(
        &[
            "run",
            "--rm",
            "-e",
            "BOTH=flag",
            "--env-file",
            &env_file.path().to_string_lossy(),
            "-e",
            "BULKHEAD_E2E_FROM_HOST",
            "-e",
            "BULKHEAD_E2E_UNSET_HERE",
            "-w",
            "/tmp/new",
            "-u",
            "nobody",
            "busybox:flags",
            "sh",
            "-c",
            "echo $FROM_FILE $BOTH $(pwd) $(id -u):$(id -g) $(id -G) $HOME $BULKHEAD_E2E_FROM_HOST ${BULKHEAD_E2E_UNSET_HERE-unset}",
        ],
        0,
    )?;
    if out.stdout.trim() != "1 flag /tmp/new 65534:65534 65534 10 /nonexistent from-host unset" {
        return Err(format!("-e/--env-file/-w/-u: {:?} {:?}", out.stdout, out.stderr).into());
    }
    let out = expect(
        &[
            "run",
            "--rm",
            "--entrypoint",
            "echo",
            "busybox:flags",
            "via",
            "entrypoint",
        ],
        0,
    )?;
    if out.stdout != "via entrypoint\n" {
        return Err(format!("--entrypoint: {:?}", out.stdout).into());
    }
    let unknown_user = expect(
        &["run", "--rm", "-u", "nosuchuser", "busybox:flags", "true"],
        125,
    )?;
    contains(&unknown_user, "unknown user", "no user \"nosuchuser\"")?;
    expect(&["rmi", "busybox:flags"], 0)?;
    nothing_left()
}

fn volumes_read_write_and_read_only() -> Result<(), Failed> {
    let image = busybox_image("docker.io/library/busybox:vol", &ImageConfig::default())?;
    expect(&["load", "-i", &image.archive.path.to_string_lossy()], 0)?;
    let host = tempfile::tempdir()?;
    std::fs::write(host.path().join("in"), "from the host\n")?;
    let rw = format!("{}:/data", host.path().display());
    let out = expect(
        &[
            "run",
            "--rm",
            "-v",
            &rw,
            // A working directory inside the volume is made there.
            "-w",
            "/data/made/here",
            "busybox:vol",
            "sh",
            "-c",
            "cat /data/in; echo back > /data/out; pwd",
        ],
        0,
    )?;
    if out.stdout != "from the host\n/data/made/here\n"
        || std::fs::read_to_string(host.path().join("out"))? != "back\n"
        || !host.path().join("made/here").is_dir()
    {
        return Err(format!("read-write volume: {:?} {:?}", out.stdout, out.stderr).into());
    }
    let ro = format!("{}:/data:ro", host.path().display());
    let out = bulkhead(&[
        "run",
        "--rm",
        "-v",
        &ro,
        "busybox:vol",
        "sh",
        "-c",
        "cat /data/in; echo x > /data/in",
    ])?;
    if out.code == 0 || !out.stderr.contains("Read-only file system") {
        return Err(format!("a :ro volume took a write: {} {:?}", out.code, out.stderr).into());
    }
    if std::fs::read_to_string(host.path().join("in"))? != "from the host\n" {
        return Err("the read-only volume's file changed on the host".into());
    }
    let named = expect(
        &["run", "--rm", "-v", "data:/data", "busybox:vol", "true"],
        125,
    )?;
    contains(&named, "named volume", "named volumes are not supported")?;
    expect(&["rmi", "busybox:vol"], 0)?;
    nothing_left()
}

fn detached_logs_exec_stop_rm() -> Result<(), Failed> {
    let image = busybox_image("docker.io/library/busybox:detach", &ImageConfig::default())?;
    expect(&["load", "-i", &image.archive.path.to_string_lossy()], 0)?;
    let script = "echo started; echo to-stderr >&2; trap 'echo got-term; exit 0' TERM; while true; do sleep 0.2; done";
    let out = expect(
        &[
            "run",
            "-d",
            "--name",
            "web",
            "busybox:detach",
            "sh",
            "-c",
            script,
        ],
        0,
    )?;
    let id = out.stdout.trim().to_owned();
    if id.len() != 64 {
        return Err(format!("run -d printed {:?}, not an id", out.stdout).into());
    }
    let ps = expect(&["ps"], 0)?;
    if !ps.stdout.contains("web") || !ps.stdout.contains("Up") || !ps.stdout.contains(&id[..12]) {
        return Err(format!("ps does not show it running:\n{}", ps.stdout).into());
    }
    // Its output reaches the log while it runs.
    let mut logs = expect(&["logs", "web"], 0)?;
    for _ in 0..100 {
        if logs.stdout.contains("started") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        logs = expect(&["logs", "web"], 0)?;
    }
    if logs.stdout != "started\n" || logs.stderr != "to-stderr\n" {
        return Err(format!("logs: {:?} {:?}", logs.stdout, logs.stderr).into());
    }
    let exec = expect(&["exec", "web", "sh", "-c", "echo from-exec; exit 3"], 3)?;
    if exec.stdout != "from-exec\n" {
        return Err(format!("exec output: {:?}", exec.stdout).into());
    }
    let taken = expect(
        &["run", "-d", "--name", "web", "busybox:detach", "true"],
        125,
    )?;
    contains(&taken, "name in use", "already used")?;
    let running = expect(&["rm", "web"], 125)?;
    contains(&running, "rm of a running container", "is running")?;
    expect(&["stop", "-t", "20", "web"], 0)?;
    let ps = expect(&["ps", "-a"], 0)?;
    if !ps.stdout.contains("Exited (0)") {
        return Err(format!("after stop: {}", ps.stdout).into());
    }
    let logs = expect(&["logs", "web"], 0)?;
    if !logs.stdout.contains("got-term") {
        return Err(format!("the stop signal did not reach it: {:?}", logs.stdout).into());
    }
    let inspect = expect(&["inspect", "web"], 0)?;
    let v: serde_json::Value = serde_json::from_str(&inspect.stdout)?;
    if v[0]["State"]["ExitCode"] != 0 || v[0]["Id"] != id.as_str() {
        return Err(format!("inspect: {}", inspect.stdout).into());
    }
    nothing_left()?;
    // Its image is its rootfs's lower layer: rmi is refused while it exists.
    let used = expect(&["rmi", "busybox:detach"], 125)?;
    contains(
        &used,
        "rmi of a used image",
        "is used by stopped container web",
    )?;
    expect(&["rm", "web"], 0)?;
    if expect(&["ps", "-a", "-q"], 0)?.stdout.contains(&id[..12]) {
        return Err("rm left it in ps -a".into());
    }
    // kill and rm -f on a running one.
    let out = expect(
        &[
            "run",
            "-d",
            "--name",
            "victim",
            "busybox:detach",
            "sleep",
            "1000",
        ],
        0,
    )?;
    let victim = out.stdout.trim().to_owned();
    expect(&["rm", "-f", "victim"], 0)?;
    if expect(&["ps", "-a", "-q"], 0)?
        .stdout
        .contains(&victim[..12])
    {
        return Err("rm -f left it".into());
    }
    expect(&["rmi", "busybox:detach"], 0)?;
    nothing_left()
}

fn memory_limit_is_enforced() -> Result<(), Failed> {
    let image = busybox_image("docker.io/library/busybox:mem", &ImageConfig::default())?;
    expect(&["load", "-i", &image.archive.path.to_string_lossy()], 0)?;
    let hog = "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo survived";
    let out = bulkhead(&[
        "run",
        "--name",
        "hog",
        "--memory",
        "32m",
        "busybox:mem",
        "sh",
        "-c",
        hog,
    ])?;
    if out.code == 0 || out.stdout.contains("survived") {
        return Err(format!("64 MiB fit in 32m: {} {:?}", out.code, out.stdout).into());
    }
    contains(&out, "OOM report", "out-of-memory")?;
    let inspect = expect(&["inspect", "hog"], 0)?;
    let v: serde_json::Value = serde_json::from_str(&inspect.stdout)?;
    if v[0]["State"]["OOMKilled"] != true || v[0]["HostConfig"]["Memory"] != 32u64 << 20 {
        return Err(format!("inspect after OOM: {}", inspect.stdout).into());
    }
    expect(&["rm", "hog"], 0)?;
    expect(&["rmi", "busybox:mem"], 0)?;
    nothing_left()
}

fn rm_flag_leaves_nothing() -> Result<(), Failed> {
    let image = busybox_image("docker.io/library/busybox:rm", &ImageConfig::default())?;
    expect(&["load", "-i", &image.archive.path.to_string_lossy()], 0)?;
    let root = PathBuf::from(std::env::var_os("BULKHEAD_ROOT").ok_or("BULKHEAD_ROOT is not set")?);
    let before = common::listing(&root.join("containers"));
    expect(
        &[
            "run",
            "--rm",
            "--name",
            "gone",
            "busybox:rm",
            "sh",
            "-c",
            "echo x > /file",
        ],
        0,
    )?;
    expect(
        &[
            "run",
            "-d",
            "--rm",
            "--name",
            "gone-d",
            "busybox:rm",
            "true",
        ],
        0,
    )?;
    // The detached one removes itself once its monitor saw it exit.
    for _ in 0..200 {
        if !expect(&["ps", "-a"], 0)?.stdout.contains("gone-d") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = common::listing(&root.join("containers"));
    if before != after || expect(&["ps", "-a"], 0)?.stdout.contains("gone") {
        return Err(format!("--rm left a container: {after:?}").into());
    }
    if common::listing(&root.join("names"))
        .iter()
        .any(|n| n.starts_with("gone"))
    {
        return Err("--rm left the name claimed".into());
    }
    expect(&["rmi", "busybox:rm"], 0)?;
    nothing_left()
}

fn bad_references_and_registries() -> Result<(), Failed> {
    let before = store_ids()?;
    let bad = expect(&["pull", "Not/A Valid:ref"], 125)?;
    contains(&bad, "bad reference", "Invalid image reference")?;
    // Nothing listens on port 1.
    let down = expect(&["pull", "127.0.0.1:1/nothing/here:1"], 125)?;
    contains(&down, "registry down", "127.0.0.1:1")?;
    let (registry, _image, _reference) = registry_with_busybox("bad", &ImageConfig::default())?;
    let unknown = expect(
        &["pull", &format!("{}/bulkhead/nosuch:1", registry.addr())],
        125,
    )?;
    contains(&unknown, "unknown image", "not found")?;
    let unknown_run = expect(
        &[
            "run",
            "--rm",
            &format!("{}/bulkhead/busybox:nosuchtag", registry.addr()),
            "true",
        ],
        125,
    )?;
    contains(&unknown_run, "unknown tag", "not found")?;
    if store_ids()? != before {
        return Err("failed pulls changed the store".into());
    }
    let exec = expect(&["exec", "no-such-container", "true"], 125)?;
    contains(&exec, "exec of an unknown container", "no container named")?;
    nothing_left()
}

fn corrupted_blob_leaves_the_store_as_it_was() -> Result<(), Failed> {
    let before = store_ids()?;
    let (registry, image, reference) = registry_with_busybox("corrupt", &ImageConfig::default())?;
    let hex = image.archive.layer_digest.trim_start_matches("sha256:");
    let blob = registry
        .storage_dir()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = std::fs::read(&blob).map_err(|e| format!("{}: {e}", blob.display()))?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&blob, bytes)?;
    let out = expect(&["pull", &reference], 125)?;
    contains(&out, "digest mismatch", hex)?;
    if store_ids()? != before {
        return Err("a pull with a corrupted blob changed the store".into());
    }
    let root = PathBuf::from(std::env::var_os("BULKHEAD_ROOT").ok_or("BULKHEAD_ROOT is not set")?);
    let stray: Vec<String> = common::listing(&root.join("images"))
        .into_iter()
        .filter(|n| n.contains("tmp"))
        .flat_map(|n| common::listing(&root.join("images").join(&n)))
        .collect();
    if !stray.is_empty() {
        return Err(format!("a failed pull left temporary files: {stray:?}").into());
    }
    nothing_left()
}

fn load_refuses_what_is_not_an_image() -> Result<(), Failed> {
    let before = store_ids()?;
    let junk = tempfile::NamedTempFile::new()?;
    std::fs::write(junk.path(), "this is not a tarball")?;
    let out = expect(&["load", "-i", &junk.path().to_string_lossy()], 125)?;
    contains(&out, "junk load", &junk.path().to_string_lossy())?;
    let missing = expect(&["load", "-i", "/no/such/archive.tar"], 125)?;
    contains(&missing, "missing archive", "/no/such/archive.tar")?;
    if store_ids()? != before {
        return Err("a failed load changed the store".into());
    }
    nothing_left()
}
