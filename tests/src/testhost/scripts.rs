//! The shell scripts that run inside the emulated host.
//!
//! Stage 1 (`/init` of the cached initramfs) loads the modules, mounts this
//! machine's `/` over 9p read-only under a tmpfs overlay and `switch_root`s into
//! it. Stage 2 (`/bulkhead/stage2.sh`, generated per run and appended to the
//! initramfs as a second cpio archive) checks `/dev/kvm`, runs the requested
//! command and prints its exit status as a marker line, then reboots, which ends
//! QEMU (`-no-reboot`).

use std::path::Path;

use super::console::marker;
use crate::error::{Error, Result};
use crate::kvm::IN_TESTHOST_ENV;
use crate::shell::{join, quote};

/// Directory of the per-run files inside the initramfs (and, after switch_root,
/// under `/run`).
pub const JOB_DIR: &str = "bulkhead-testhost";

/// `PATH` given to the command when this process has none and the caller sets
/// none. Normally the command inherits this process's `PATH`: the guest's `/` is
/// this machine's, so the same directories (cargo's included) are there.
pub const FALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Variables passed from this process to the command when set here, so that
/// cargo and rustup find their homes inside the guest.
pub const INHERITED_ENV: &[&str] = &["CARGO_HOME", "RUSTUP_HOME"];

/// 9p mount tag of this machine's `/`.
pub const ROOT_TAG: &str = "hostroot";

/// The `/init` of the emulated host's initramfs; `modules` are `.ko` file names
/// under `/lib/modules`, in load order.
pub fn stage1(modules: &[String]) -> String {
    let modules = join(modules);
    format!(
        r#"#!/bin/sh
# bulkhead emulated host, stage 1: build the root file system and switch to it.
export PATH=/bin
NONCE=$(cat /{JOB_DIR}/nonce 2>/dev/null)
fail() {{
    echo "{prefix}$NONCE:error=$*"
    sync
    reboot -f
    sleep 5
}}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do
    insmod /lib/modules/$m || fail "insmod $m failed (see console above)"
done
mkdir -p /lower /rw /newroot
# cache=loose: the guest caches file data, several times faster on repeated reads
# (binaries, shared libraries); the share is a read-only snapshot for the run.
tries=0
until mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose {ROOT_TAG} /lower; do
    tries=$((tries + 1))
    [ $tries -lt 50 ] || fail "cannot mount the 9p share {ROOT_TAG}"
    usleep 100000
done
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "cannot mount tmpfs for the overlay"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay root"
for d in dev proc sys; do
    mount --move /$d /newroot/$d || fail "cannot move /$d into the new root"
done
mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "cannot mount /run"
# /tmp stays part of the overlay: a checkout or build under this machine's /tmp
# (CI clones anywhere) must be visible inside; writes still land in the tmpfs.
mkdir -p /newroot/run/{JOB_DIR}
cp /bin/busybox /{JOB_DIR}/* /newroot/run/{JOB_DIR}/ || fail "cannot copy the job files"
exec switch_root /newroot /run/{JOB_DIR}/busybox sh /run/{JOB_DIR}/stage2.sh
fail "switch_root failed"
"#,
        prefix = super::console::MARKER_PREFIX,
    )
}

/// What to run in the emulated host.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    /// The command and its arguments.
    pub argv: &'a [String],
    /// Extra environment variables; they override the defaults.
    pub env: &'a [(String, String)],
    /// Absolute working directory inside the guest.
    pub cwd: &'a Path,
    /// The per-run marker nonce.
    pub nonce: &'a str,
}

/// Check that a job can be passed through a shell script and `env` faithfully.
pub fn validate(job: &Job<'_>) -> Result<()> {
    let bad = |msg: String| Err(Error::InvalidCommand(msg));
    let Some(program) = job.argv.first() else {
        return bad("empty argv".into());
    };
    if program.is_empty() || program.contains('=') {
        // `env NAME=VALUE... PROGRAM` would take `a=b` for an assignment.
        return bad(format!("program name {program:?} is empty or contains '='"));
    }
    if let Some(arg) = job.argv.iter().find(|a| a.contains('\0')) {
        return bad(format!("argument {arg:?} contains a NUL byte"));
    }
    for (name, value) in job.env {
        let name_ok = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok {
            return bad(format!("environment variable name {name:?} is not valid"));
        }
        if value.contains('\0') {
            return bad(format!("value of {name} contains a NUL byte"));
        }
    }
    let cwd_ok = job.cwd.is_absolute() && job.cwd.to_str().is_some_and(|c| !c.contains('\0'));
    if !cwd_ok {
        return bad(format!(
            "working directory {} must be an absolute UTF-8 path",
            job.cwd.display()
        ));
    }
    Ok(())
}

/// The stage 2 script for `job` (run as PID 1 in the overlay root).
///
/// The command gets a clean environment: this process's `PATH` (or
/// [`FALLBACK_PATH`]), [`INHERITED_ENV`], `HOME=/root`, `TMPDIR=/tmp`,
/// `BULKHEAD_IN_TESTHOST=1`, then `job.env`; stdin is `/dev/null`, stdout and
/// stderr go to the console.
pub fn stage2(job: &Job<'_>) -> Result<String> {
    validate(job)?;
    let host_var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            host_var("PATH").unwrap_or_else(|| FALLBACK_PATH.into()),
        ),
        ("HOME".into(), "/root".into()),
        ("TMPDIR".into(), "/tmp".into()),
        ("TERM".into(), "dumb".into()),
        (IN_TESTHOST_ENV.into(), "1".into()),
    ];
    for name in INHERITED_ENV {
        if let Some(value) = host_var(name) {
            env.push((name.to_string(), value));
        }
    }
    for (name, value) in job.env {
        env.retain(|(n, _)| n != name);
        env.push((name.clone(), value.clone()));
    }
    let assignments: Vec<String> = env.iter().map(|(n, v)| format!("{n}={v}")).collect();
    let path = env
        .iter()
        .find(|(n, _)| n == "PATH")
        .map_or("", |(_, v)| v.as_str());
    let cwd = job.cwd.to_string_lossy();
    let ready = quote(&marker(job.nonce, "ready"));
    let exit_prefix = quote(&marker(job.nonce, "exit="));
    let error_prefix = quote(&marker(job.nonce, "error="));
    Ok(format!(
        r#"# bulkhead emulated host, stage 2: PID 1 in the overlay root.
BB=/run/{JOB_DIR}/busybox
fail() {{
    echo {error_prefix}"$*"
    $BB sync
    $BB reboot -f
    $BB sleep 5
}}
$BB mkdir -p /dev/pts /dev/shm /sys/fs/cgroup /root
$BB mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts 2>/dev/null
$BB mount -t tmpfs -o mode=1777 tmpfs /dev/shm 2>/dev/null
$BB mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
$BB ip link set lo up 2>/dev/null
if [ ! -e /sys/module/kvm_amd ]; then
    fail "kvm_amd is not loaded, so there is no hardware-style KVM in the emulated host"
fi
if [ ! -c /dev/kvm ]; then
    $BB rm -f /dev/kvm
    IFS=: read -r major minor < /sys/class/misc/kvm/dev || fail "no /sys/class/misc/kvm/dev"
    $BB mknod -m 0666 /dev/kvm c "$major" "$minor" || fail "cannot create /dev/kvm"
fi
(exec 3<>/dev/kvm) 2>/dev/null || fail "/dev/kvm cannot be opened read-write"
# Let shmem (memfd) guest RAM use transparent huge pages when the VMM asks for
# them, as `cargo xtask setup` configures a real host (Debian's default is never).
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null
cd {cwd} || fail "cannot change to the working directory "{cwd_msg}
# Resolve the program with the command's PATH here: busybox `env` would run its
# own applet instead of a PATH lookup for names like `sh` or `ls`.
find_program() {{
    case $1 in */*) echo "$1"; return 0 ;; esac
    set -f
    old_ifs=$IFS
    IFS=:
    for dir in $2; do
        IFS=$old_ifs
        [ -n "$dir" ] || dir=.
        if [ -f "$dir/$1" ] && [ -x "$dir/$1" ]; then
            echo "$dir/$1"
            return 0
        fi
    done
    IFS=$old_ifs
    return 1
}}
echo {ready}
if program=$(find_program {program} {path}); then
    $BB env -i {assignments} "$program" {args} </dev/null >/dev/console 2>&1
    status=$?
else
    echo "bulkhead-testhost: "{program}": command not found"
    status=127
fi
echo {exit_prefix}"$status"
$BB sync
$BB reboot -f
$BB sleep 5
"#,
        cwd = quote(&cwd),
        cwd_msg = quote(&cwd),
        assignments = join(&assignments),
        program = quote(&job.argv[0]),
        path = quote(path),
        args = join(&job.argv[1..]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn job<'a>(argv: &'a [String], env: &'a [(String, String)], cwd: &'a Path) -> Job<'a> {
        Job {
            argv,
            env,
            cwd,
            nonce: "n0nce",
        }
    }

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn rejects_bad_jobs() {
        let cwd = PathBuf::from("/");
        let ok = strings(&["true"]);
        assert!(validate(&job(&[], &[], &cwd)).is_err());
        assert!(validate(&job(&strings(&["A=b"]), &[], &cwd)).is_err());
        assert!(validate(&job(&strings(&["x", "a\0b"]), &[], &cwd)).is_err());
        assert!(validate(&job(&ok, &[("A-B".into(), "1".into())], &cwd)).is_err());
        assert!(validate(&job(&ok, &[("1A".into(), "1".into())], &cwd)).is_err());
        assert!(validate(&job(&ok, &[], Path::new("relative"))).is_err());
        assert!(validate(&job(&ok, &[("A_1".into(), "x y".into())], &cwd)).is_ok());
    }

    #[test]
    fn stage2_quotes_and_overrides() {
        let argv = strings(&["sh", "-c", "echo 'hi'; exit 3"]);
        let env = [("PATH".to_string(), "/x".to_string())];
        let cwd = PathBuf::from("/some dir");
        let script = stage2(&job(&argv, &env, &cwd)).expect("script");
        assert!(
            script.contains(r#""$program" -c 'echo '\''hi'\''; exit 3'"#),
            "{script}"
        );
        assert!(script.contains("find_program sh /x)"), "{script}");
        assert!(script.contains("cd '/some dir' ||"), "{script}");
        assert!(script.contains("'PATH=/x'"));
        assert!(!script.contains("'PATH=/usr"), "{script}");
        assert!(script.contains("'BULKHEAD_IN_TESTHOST=1'"));
        assert!(script.contains("BULKHEAD-TESTHOST:n0nce:exit="));
    }

    /// Run the command-running part of stage 2 with the host's shell (the
    /// guest-only setup before it is left out) and return what it printed.
    fn run_command_part(argv: &[String], env: &[(String, String)]) -> String {
        let cwd = PathBuf::from("/");
        let script = stage2(&job(argv, env, &cwd)).expect("script");
        let start = script.find("find_program() {").expect("find_program");
        let end = script.find("$BB sync\n$BB reboot").expect("reboot");
        let part = script[start..end]
            .replace("$BB env", "env")
            .replace(" >/dev/console 2>&1", "");
        let out = std::process::Command::new("sh")
            .args(["-c", &part])
            .output()
            .expect("sh");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn stage2_command_part_runs() {
        let argv = strings(&[
            "sh",
            "-c",
            "printf '%s|%s|%s|%s\\n' \"$1\" \"$FOO\" \"$BULKHEAD_IN_TESTHOST\" \"$0\"; exit 7",
            "x",
            "a b'c",
        ]);
        let env = [("FOO".to_string(), "$no expansion".to_string())];
        let out = run_command_part(&argv, &env);
        assert!(out.contains("a b'c|$no expansion|1|x\n"), "{out}");
        assert!(out.ends_with("BULKHEAD-TESTHOST:n0nce:exit=7\n"), "{out}");
    }

    #[test]
    fn stage2_reports_missing_program() {
        let out = run_command_part(&strings(&["no-such-program-xyz"]), &[]);
        assert!(
            out.contains("no-such-program-xyz: command not found"),
            "{out}"
        );
        assert!(out.ends_with("BULKHEAD-TESTHOST:n0nce:exit=127\n"), "{out}");
    }

    #[test]
    fn stage1_loads_modules_in_order() {
        let script = stage1(&strings(&["virtio.ko", "kvm-amd.ko"]));
        assert!(script.contains("for m in virtio.ko kvm-amd.ko; do"));
        assert!(script.starts_with("#!/bin/sh\n"));
    }
}
