//! The agent binary as a container's tiny init, like `docker run --init`.
//!
//! A program that is PID 1 of a pid namespace gets no default signal actions:
//! `sleep 100` there ignores SIGTERM. So the agent bind-mounts its own binary
//! into every container at [`INIT_PATH`] and runs the user's command under it:
//! `/dev/.bulkhead-init -- CMD ARGS...`. In that mode the binary forks and execs
//! CMD, forwards every catchable signal it gets to it, reaps every process that
//! is re-parented to it, and exits with CMD's exit code, or 128 + the signal that
//! killed it. A command that is not found ends with exit 127 and a clear message
//! on stderr, one that cannot be executed with 126, as a shell does.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{execv, fork, ForkResult, Pid};

/// Where the agent's binary is bind-mounted in every container (on the
/// container's /dev tmpfs, so the user's rootfs is never written).
pub const INIT_PATH: &str = "/dev/.bulkhead-init";

/// The first argument that selects init mode whatever argv\[0\] is.
pub const INIT_FLAG: &str = "--bulkhead-init";

/// The file name of [`INIT_PATH`]; an argv\[0\] ending in it selects init mode.
const INIT_NAME: &str = ".bulkhead-init";

/// The PATH used when the process has none (Docker's and runc's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The command init mode runs, when `args` (the whole argv) select init mode.
///
/// Init mode is selected by an argv\[0\] whose file name is `.bulkhead-init` or
/// by a first argument `--bulkhead-init`; an optional `--` then separates the
/// command. Returns `None` when the arguments do not select init mode, and
/// `Some(Err(..))` when they do but name no command.
pub fn parse_args(args: &[OsString]) -> Option<Result<Vec<OsString>, &'static str>> {
    let argv0 = args.first()?;
    let mut rest = if Path::new(argv0).file_name() == Some(OsStr::new(INIT_NAME)) {
        &args[1..]
    } else if args.get(1).is_some_and(|a| a == INIT_FLAG) {
        &args[2..]
    } else {
        return None;
    };
    if rest.first().is_some_and(|a| a == "--") {
        rest = &rest[1..];
    }
    if rest.is_empty() {
        return Some(Err(
            "no command given (usage: .bulkhead-init -- CMD [ARG...])",
        ));
    }
    Some(Ok(rest.to_vec()))
}

/// Why a command could not be resolved to an executable file.
#[derive(Debug, PartialEq, Eq)]
pub enum LookupError {
    /// Nothing by that name (exit code 127).
    NotFound,
    /// Found, but not an executable regular file (exit code 126).
    NotExecutable(PathBuf),
}

impl LookupError {
    /// The shell's exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            LookupError::NotFound => 127,
            LookupError::NotExecutable(_) => 126,
        }
    }
}

/// Resolves `cmd` like `execvp`: a name with a `/` is used as is; otherwise each
/// directory of `path` (colon-separated, empty entries meaning the current
/// directory) is tried in order, and the first executable regular file wins. A
/// match that is not executable is remembered and reported if nothing better
/// is found (exit 126, like a shell).
pub fn lookup(cmd: &OsStr, path: &OsStr) -> Result<PathBuf, LookupError> {
    if cmd.is_empty() {
        return Err(LookupError::NotFound);
    }
    if cmd.as_bytes().contains(&b'/') {
        let p = PathBuf::from(cmd);
        return match classify(&p) {
            Candidate::Executable => Ok(p),
            Candidate::NotExecutable => Err(LookupError::NotExecutable(p)),
            Candidate::Missing => Err(LookupError::NotFound),
        };
    }
    let mut not_executable = None;
    for dir in path.as_bytes().split(|b| *b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        let candidate = dir.join(cmd);
        match classify(&candidate) {
            Candidate::Executable => return Ok(candidate),
            Candidate::NotExecutable => {
                not_executable.get_or_insert(candidate);
            }
            Candidate::Missing => {}
        }
    }
    match not_executable {
        Some(p) => Err(LookupError::NotExecutable(p)),
        None => Err(LookupError::NotFound),
    }
}

enum Candidate {
    Executable,
    NotExecutable,
    Missing,
}

fn classify(path: &Path) -> Candidate {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => {
            if meta.permissions().mode() & 0o111 != 0 {
                Candidate::Executable
            } else {
                Candidate::NotExecutable
            }
        }
        Ok(_) => Candidate::NotExecutable,
        Err(_) => Candidate::Missing,
    }
}

/// Runs init mode with the full argv and returns the exit code; `None` when the
/// arguments do not select init mode (the caller goes on as the agent).
pub fn run_if_selected(args: &[OsString]) -> Option<i32> {
    let command = match parse_args(args)? {
        Ok(command) => command,
        Err(msg) => {
            eprintln!("bulkhead-init: {msg}");
            return Some(127);
        }
    };
    Some(run(&command))
}

/// Forks and execs `command`, forwards signals to it, reaps everything, and
/// returns its exit code (or 128 + the killing signal).
pub fn run(command: &[OsString]) -> i32 {
    let Some(cmd) = command.first() else {
        return 127;
    };
    let name = cmd.to_string_lossy().into_owned();
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    let program = match lookup(cmd, &path) {
        Ok(p) => p,
        Err(err) => {
            match &err {
                LookupError::NotFound => eprintln!("bulkhead-init: {name}: command not found"),
                LookupError::NotExecutable(p) => eprintln!(
                    "bulkhead-init: {name}: permission denied ({} is not an executable file)",
                    p.display()
                ),
            }
            return err.exit_code();
        }
    };
    let cstr = |s: &OsStr| CString::new(s.as_bytes().to_vec());
    let (Ok(c_program), Ok(c_args)) = (
        cstr(program.as_os_str()),
        command
            .iter()
            .map(|a| cstr(a))
            .collect::<Result<Vec<_>, _>>(),
    ) else {
        eprintln!("bulkhead-init: {name}: an argument contains a NUL byte");
        return 127;
    };

    // Block every signal before forking: the parent then takes them with
    // sigwait (no handler races), and the child unblocks them just before exec.
    let all = SigSet::all();
    let mut old = SigSet::empty();
    if let Err(err) = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&all), Some(&mut old)) {
        eprintln!("bulkhead-init: blocking signals: {err}");
        return 126;
    }
    // SAFETY: init mode is single-threaded (no thread was started), so the child
    // may allocate and call anything; it only execs or exits.
    let child = match unsafe { fork() } {
        Ok(ForkResult::Child) => exec_child(&c_program, &c_args, &old, &name),
        Ok(ForkResult::Parent { child }) => child,
        Err(err) => {
            eprintln!("bulkhead-init: fork: {err}");
            return 126;
        }
    };
    supervise(child)
}

/// In the forked child: its own process group (in the terminal's foreground when
/// there is one, so Ctrl-C reaches it), the old signal mask, then exec.
fn exec_child(program: &CString, args: &[CString], mask: &SigSet, name: &str) -> ! {
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    // SIGTTOU is blocked here, so a background process group may take the
    // terminal's foreground.
    // SAFETY: isatty takes an fd number and reads no memory.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } == 1 {
        let _ = nix::unistd::tcsetpgrp(std::io::stdin(), nix::unistd::getpgrp());
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(mask), None);
    let err = execv(program, args).err().unwrap_or(Errno::UnknownErrno);
    let code = match err {
        Errno::ENOENT => 127,
        _ => 126,
    };
    eprintln!("bulkhead-init: {name}: {err}");
    // SAFETY: _exit ends the forked child without running the parent's atexit
    // handlers or flushing its copies of buffers.
    unsafe { libc::_exit(code) }
}

/// The parent: waits for signals; forwards all but SIGCHLD to the child; on
/// SIGCHLD reaps every ended process and returns once the child is among them.
fn supervise(child: Pid) -> i32 {
    let all = SigSet::all();
    loop {
        // Reap first: the child may have ended before we wait for a signal.
        if let Some(code) = reap_all(child) {
            return code;
        }
        let signal = match all.wait() {
            Ok(signal) => signal,
            Err(Errno::EINTR) => continue,
            Err(err) => {
                eprintln!("bulkhead-init: sigwait: {err}");
                return 126;
            }
        };
        if signal != Signal::SIGCHLD {
            // ESRCH: the child has just ended; reaping reports it next.
            let _ = kill(child, signal);
        }
    }
}

/// Reaps every ended child without blocking; the child's exit code once it has
/// ended.
fn reap_all(child: Pid) -> Option<i32> {
    let mut result = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => result = Some(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                result = Some(128 + sig as i32)
            }
            Ok(WaitStatus::StillAlive) => return result,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return result.or(Some(255)), // ECHILD: nothing left.
        }
    }
}

/// The OCI process args for a container init wrapped by init mode.
pub fn wrap_args(args: &[String]) -> Vec<String> {
    let mut wrapped = Vec::with_capacity(args.len() + 2);
    wrapped.push(INIT_PATH.to_string());
    wrapped.push("--".to_string());
    wrapped.extend(args.iter().cloned());
    wrapped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn selection_by_name_or_flag() {
        assert_eq!(
            parse_args(&v(&["/dev/.bulkhead-init", "--", "sleep", "1"])),
            Some(Ok(v(&["sleep", "1"])))
        );
        assert_eq!(
            parse_args(&v(&[".bulkhead-init", "echo", "--"])),
            Some(Ok(v(&["echo", "--"])))
        );
        assert_eq!(
            parse_args(&v(&["/init", "--bulkhead-init", "--", "ls"])),
            Some(Ok(v(&["ls"])))
        );
        assert_eq!(parse_args(&v(&["/init"])), None);
        assert_eq!(parse_args(&v(&["/init", "--", "ls"])), None);
        assert_eq!(parse_args(&[]), None);
        assert!(matches!(
            parse_args(&v(&["/dev/.bulkhead-init", "--"])),
            Some(Err(_))
        ));
        assert!(matches!(
            parse_args(&v(&["x", "--bulkhead-init"])),
            Some(Err(_))
        ));
    }

    #[test]
    fn path_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let other = dir.path().join("other");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let exe = bin.join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = other.join("tool");
        std::fs::write(&plain, "data").unwrap();
        std::fs::write(other.join("data"), "data").unwrap();
        std::fs::create_dir(bin.join("adir")).unwrap();

        let path = format!("{}:{}", other.display(), bin.display());
        // A later executable beats an earlier non-executable match.
        assert_eq!(
            lookup(OsStr::new("tool"), OsStr::new(&path)),
            Ok(exe.clone())
        );
        assert_eq!(
            lookup(OsStr::new("data"), OsStr::new(&path)),
            Err(LookupError::NotExecutable(other.join("data")))
        );
        assert_eq!(
            lookup(OsStr::new("nope"), OsStr::new(&path)),
            Err(LookupError::NotFound)
        );
        assert_eq!(
            lookup(OsStr::new("adir"), OsStr::new(&path)),
            Err(LookupError::NotExecutable(bin.join("adir")))
        );
        // With a slash, PATH is not searched.
        assert_eq!(lookup(exe.as_os_str(), OsStr::new("")), Ok(exe.clone()));
        assert_eq!(
            lookup(plain.as_os_str(), OsStr::new(&path)),
            Err(LookupError::NotExecutable(plain.clone()))
        );
        assert_eq!(
            lookup(OsStr::new("./missing"), OsStr::new(&path)),
            Err(LookupError::NotFound)
        );
        assert_eq!(
            lookup(OsStr::new(""), OsStr::new(&path)),
            Err(LookupError::NotFound)
        );
        assert_eq!(LookupError::NotFound.exit_code(), 127);
        assert_eq!(LookupError::NotExecutable(plain).exit_code(), 126);
    }

    #[test]
    fn wrapping() {
        assert_eq!(
            wrap_args(&["sh".into(), "-c".into(), "exit 7".into()]),
            vec![INIT_PATH, "--", "sh", "-c", "exit 7"]
        );
    }
}
