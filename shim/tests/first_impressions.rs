//! What a new user meets first, through the real binaries: version flags,
//! misuse, completions, and no terminal escapes where there is no terminal.
//! None of it needs KVM, so it runs everywhere.

use std::process::{Command, Output};

fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("NO_COLOR")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const CLI: &str = env!("CARGO_BIN_EXE_bulkhead");
const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-bulkhead-v2");
const RUNTIME: &str = env!("CARGO_BIN_EXE_bulkhead-runtime");

#[test]
fn the_runtime_answers_like_runc_without_kvm() {
    // Engines read the first line of `--version` (podman info, docker info).
    for flag in ["-v", "--version"] {
        let out = run(RUNTIME, &[flag], &[]);
        assert!(out.status.success(), "{flag}: {out:?}");
        let stdout = text(&out.stdout);
        assert!(
            stdout.starts_with(&format!(
                "bulkhead-runtime version {}\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{stdout}"
        );
    }
    let state = tempfile::tempdir().unwrap();
    let root = state.path().to_str().unwrap();
    let out = run(RUNTIME, &["--root", root, "list", "--format", "json"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout), "[]\n");
    // An unknown container: runc's wording, exit 1.
    let out = run(RUNTIME, &["--root", root, "state", "nope"], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("container nope does not exist"));
    let out = run(RUNTIME, &["features"], &[]);
    let features: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(features["ociVersionMax"], "1.0.2");
    let out = run(RUNTIME, &["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn the_shim_prints_its_version_without_containerd() {
    for flag in ["-v", "--version", "-version"] {
        let out = run(SHIM, &[flag], &[]);
        assert!(out.status.success(), "{flag}: {out:?}");
        let stdout = text(&out.stdout);
        assert!(
            stdout.starts_with("containerd-shim-bulkhead-v2:\n"),
            "{flag}: {stdout}"
        );
        assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
        assert!(out.stderr.is_empty(), "{flag}: {}", text(&out.stderr));
    }
}

#[test]
fn an_unknown_flag_is_named_and_exits_125_like_docker() {
    let out = run(CLI, &["run", "--foo", "busybox", "true"], &[]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unexpected argument '--foo'"), "{stderr}");
    assert!(!stderr.contains("image reference"), "{stderr}");
    assert!(stderr.contains("--help"), "no hint: {stderr}");
}

#[test]
fn help_and_version_exit_0() {
    for flag in ["--help", "--version"] {
        let out = run(CLI, &[flag], &[]);
        assert_eq!(out.status.code(), Some(0), "{flag}: {out:?}");
        assert!(!out.stdout.is_empty(), "{flag}");
    }
}

#[test]
fn no_escape_sequences_reach_a_pipe() {
    let state = tempfile::tempdir().unwrap();
    let root = state.path().to_str().unwrap();
    // Errors, debug logs and doctor's report, all captured through pipes.
    let debug = [("BULKHEAD_LOG", "debug"), ("BULKHEAD_ROOT", root)];
    let outputs = [
        run(CLI, &["run", "--foo", "busybox"], &[]),
        run(CLI, &["doctor"], &debug),
        run(CLI, &["inspect", "no-such-container"], &debug),
    ];
    for out in &outputs {
        for (name, stream) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            assert!(
                !stream.contains(&0x1b),
                "escape in {name}: {:?}",
                text(stream)
            );
        }
    }
    // What was checked held real text: clap's error and doctor's report.
    assert!(text(&outputs[0].stderr).contains("error:"));
    assert!(text(&outputs[1].stdout).contains("kvm"));
    assert!(
        text(&outputs[2].stderr).contains("bulkhead started"),
        "no debug log line: {}",
        text(&outputs[2].stderr)
    );
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef bulkhead"),
        ("fish", "complete -c bulkhead"),
    ] {
        let out = run(CLI, &["completion", shell], &[]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = text(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script:.200}");
        assert!(script.contains("inspect"), "{shell} lacks subcommands");
    }
    let out = run(CLI, &["completion", "tcsh"], &[]);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
}
