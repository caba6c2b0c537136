//! [`Validate`]: the limits of [`crate::limits`] applied to each message.

use crate::agent::*;
use crate::limits::{
    check_id, check_len, check_range, validate_exec_id, ValidationError, MAX_EXIT_CODE,
    MAX_IO_DEVICES, MAX_OCI_SPEC_JSON_SIZE, MAX_PIDS, MAX_PROCESS_JSON_SIZE,
    MAX_RESOURCES_JSON_SIZE, MAX_ROOTFS_PATH_LEN, MAX_SIGNAL, MAX_TTY_DIMENSION, MAX_VERSION_LEN,
};

/// A message of the agent API that can check itself against the limits.
///
/// The agent validates every request before acting on it; the host validates
/// every reply before trusting it (the guest is untrusted). The ttrpc frame
/// limit ([`crate::limits::MAX_MESSAGE_SIZE`]) is enforced by the runtime
/// before a message is decoded; this checks the fields inside it. JSON fields
/// are only size-checked here: parsing them is the receiver's job.
pub trait Validate {
    /// `Ok` when every field is within its limits.
    fn validate(&self) -> Result<(), ValidationError>;
}

macro_rules! always_valid {
    ($($t:ty),* $(,)?) => {$(
        impl Validate for $t {
            fn validate(&self) -> Result<(), ValidationError> {
                Ok(())
            }
        }
    )*};
}

// Messages with no field to check (empty, or numbers whose every value is
// meaningful).
always_valid!(
    StartContainerResponse,
    SignalProcessResponse,
    ResizeTtyResponse,
    CloseStdinResponse,
    RemoveContainerResponse,
    PauseContainerResponse,
    ResumeContainerResponse,
    UpdateContainerResponse,
    GetOomEventRequest,
    CheckRequest,
    ConfigureNetworkResponse,
    ShutdownRequest,
    ShutdownResponse,
    StdioStreams,
    CpuStats,
    MemoryStats,
    PidsStats,
    IoDeviceStats,
);

impl Validate for ConfigureNetworkRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        crate::network::GuestNetwork::from_request(self).map(|_| ())
    }
}

macro_rules! container_only {
    ($($t:ty),* $(,)?) => {$(
        impl Validate for $t {
            fn validate(&self) -> Result<(), ValidationError> {
                check_id("container id", &self.container_id)
            }
        }
    )*};
}

container_only!(
    StartContainerRequest,
    RemoveContainerRequest,
    PauseContainerRequest,
    ResumeContainerRequest,
    StatsContainerRequest,
    ListProcessesRequest,
    GetOomEventResponse,
);

macro_rules! container_and_exec {
    ($($t:ty),* $(,)?) => {$(
        impl Validate for $t {
            fn validate(&self) -> Result<(), ValidationError> {
                check_id("container id", &self.container_id)?;
                validate_exec_id(&self.exec_id)
            }
        }
    )*};
}

container_and_exec!(WaitProcessRequest, CloseStdinRequest);

/// A pty merges stdout and stderr: asking for a separate stderr stream with
/// a terminal is a mistake.
fn check_stdio(stdio: Option<&StdioStreams>, terminal: bool) -> Result<(), ValidationError> {
    if terminal && stdio.is_some_and(|s| s.stderr) {
        return Err(ValidationError::Invalid {
            field: "stdio.stderr",
            reason: "must be false with a terminal (the pty carries stdout and stderr together)",
        });
    }
    Ok(())
}

fn check_json(field: &'static str, json: &[u8], max: usize) -> Result<(), ValidationError> {
    if json.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    check_len(field, json.len(), max)
}

fn check_pid(pid: u32) -> Result<(), ValidationError> {
    check_range("pid", pid.into(), 1, i32::MAX as u64)
}

/// The rootfs path is relative to the share's root and stays inside it: no
/// leading `/`, no `..` component, no NUL.
fn check_rootfs_path(path: &str) -> Result<(), ValidationError> {
    const FIELD: &str = "rootfs path";
    if path.is_empty() {
        return Err(ValidationError::Empty { field: FIELD });
    }
    check_len(FIELD, path.len(), MAX_ROOTFS_PATH_LEN)?;
    if path.starts_with('/') {
        return Err(ValidationError::Invalid {
            field: FIELD,
            reason: "must be relative to the root of the shared folder",
        });
    }
    if path.contains('\0') {
        return Err(ValidationError::Invalid {
            field: FIELD,
            reason: "must not contain a NUL byte",
        });
    }
    if path.split('/').any(|c| c == "..") {
        return Err(ValidationError::Invalid {
            field: FIELD,
            reason: "must not contain a \"..\" component",
        });
    }
    Ok(())
}

impl Validate for CreateContainerRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        check_id("container id", &self.container_id)?;
        check_json("oci spec json", &self.oci_spec_json, MAX_OCI_SPEC_JSON_SIZE)?;
        check_rootfs_path(&self.rootfs_path)?;
        check_stdio(self.stdio.as_ref(), self.terminal)
    }
}

impl Validate for CreateContainerResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        check_pid(self.pid)
    }
}

impl Validate for ExecProcessRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        check_id("container id", &self.container_id)?;
        check_id("exec id", &self.exec_id)?;
        check_json("process json", &self.process_json, MAX_PROCESS_JSON_SIZE)?;
        check_stdio(self.stdio.as_ref(), self.terminal)
    }
}

impl Validate for ExecProcessResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        check_pid(self.pid)
    }
}

impl Validate for SignalProcessRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        check_id("container id", &self.container_id)?;
        validate_exec_id(&self.exec_id)?;
        check_range("signal", self.signal.into(), 1, MAX_SIGNAL.into())
    }
}

impl Validate for WaitProcessResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        match self.status {
            Some(wait_process_response::Status::ExitCode(code)) => {
                check_range("exit code", code.into(), 0, MAX_EXIT_CODE.into())
            }
            Some(wait_process_response::Status::Signal(signal)) => {
                check_range("signal", signal.into(), 1, MAX_SIGNAL.into())
            }
            None => Err(ValidationError::Invalid {
                field: "wait status",
                reason: "has neither an exit code nor a signal",
            }),
        }
    }
}

impl Validate for ResizeTtyRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        check_id("container id", &self.container_id)?;
        validate_exec_id(&self.exec_id)?;
        check_range("rows", self.rows.into(), 0, MAX_TTY_DIMENSION.into())?;
        check_range("cols", self.cols.into(), 0, MAX_TTY_DIMENSION.into())
    }
}

impl Validate for IoStats {
    fn validate(&self) -> Result<(), ValidationError> {
        check_len("io devices", self.devices.len(), MAX_IO_DEVICES)
    }
}

impl Validate for StatsContainerResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        self.io.as_ref().map_or(Ok(()), IoStats::validate)
    }
}

impl Validate for UpdateContainerRequest {
    fn validate(&self) -> Result<(), ValidationError> {
        check_id("container id", &self.container_id)?;
        check_json(
            "resources json",
            &self.resources_json,
            MAX_RESOURCES_JSON_SIZE,
        )
    }
}

impl Validate for ListProcessesResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        check_len("pids", self.pids.len(), MAX_PIDS)?;
        self.pids.iter().try_for_each(|&pid| check_pid(pid))
    }
}

impl Validate for CheckResponse {
    fn validate(&self) -> Result<(), ValidationError> {
        check_len("agent version", self.version.len(), MAX_VERSION_LEN)
    }
}

impl WaitProcessResponse {
    /// A reply for a process that exited with `code`, seen at `exited_at`.
    pub fn exited(code: u32, exited_at: std::time::SystemTime) -> Self {
        let mut r = Self::new();
        r.set_exit_code(code);
        r.exited_at = protobuf::MessageField::some(exited_at.into());
        r
    }

    /// A reply for a process killed by `signal`, seen at `exited_at`.
    pub fn killed(signal: u32, exited_at: std::time::SystemTime) -> Self {
        let mut r = Self::new();
        r.set_signal(signal);
        r.exited_at = protobuf::MessageField::some(exited_at.into());
        r
    }

    /// The status as a shell (and Docker, and `bulkhead run`) reports it: the
    /// exit code, or 128 + the signal. `None` for a reply with neither.
    pub fn shell_status(&self) -> Option<u32> {
        match self.status {
            Some(wait_process_response::Status::ExitCode(code)) => Some(code),
            Some(wait_process_response::Status::Signal(signal)) => Some(128 + signal),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_container() {
        let mut r = CreateContainerRequest::new();
        r.container_id = "ctr".into();
        r.oci_spec_json = b"{}".to_vec();
        r.rootfs_path = "ctr/rootfs".into();
        r.terminal = true;
        r.stdio = protobuf::MessageField::some(StdioStreams {
            stdin: true,
            stdout: true,
            ..Default::default()
        });
        assert_eq!(r.validate(), Ok(()));

        let mut bad = r.clone();
        bad.stdio.as_mut().unwrap().stderr = true;
        assert!(bad.validate().unwrap_err().to_string().contains("stderr"));

        for path in ["/abs", "a/../b", "..", "", "a\0b"] {
            let mut bad = r.clone();
            bad.rootfs_path = path.into();
            let e = bad.validate().unwrap_err();
            assert!(e.to_string().contains("rootfs path"), "{path:?}: {e}");
        }
        let mut bad = r.clone();
        bad.oci_spec_json = vec![b' '; MAX_OCI_SPEC_JSON_SIZE + 1];
        assert!(matches!(
            bad.validate(),
            Err(ValidationError::TooLong {
                field: "oci spec json",
                ..
            })
        ));
        let mut bad = r;
        bad.container_id = "a;b".into();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn exec_and_signal() {
        let mut r = ExecProcessRequest::new();
        r.container_id = "ctr".into();
        r.process_json = b"{}".to_vec();
        assert!(r.validate().is_err(), "an exec needs an exec id");
        r.exec_id = "e1".into();
        assert_eq!(r.validate(), Ok(()));

        let mut s = SignalProcessRequest::new();
        s.container_id = "ctr".into();
        s.signal = 15;
        assert_eq!(s.validate(), Ok(()));
        s.signal = 0;
        assert!(s.validate().is_err());
        s.signal = 65;
        assert!(s.validate().is_err());
    }

    #[test]
    fn replies() {
        let now = std::time::SystemTime::now();
        assert_eq!(WaitProcessResponse::exited(7, now).shell_status(), Some(7));
        assert_eq!(
            WaitProcessResponse::killed(15, now).shell_status(),
            Some(143)
        );
        assert_eq!(WaitProcessResponse::killed(9, now).validate(), Ok(()));
        assert!(WaitProcessResponse::new().validate().is_err());
        assert!(WaitProcessResponse::exited(256, now).validate().is_err());
        assert!(WaitProcessResponse::killed(0, now).validate().is_err());

        let mut l = ListProcessesResponse::new();
        l.pids = vec![1, 2, 3];
        assert_eq!(l.validate(), Ok(()));
        l.pids = vec![1; MAX_PIDS + 1];
        assert!(l.validate().is_err());
        l.pids = vec![0];
        assert!(l.validate().is_err());

        let mut c = CheckResponse::new();
        c.version = "v".repeat(MAX_VERSION_LEN + 1);
        assert!(c.validate().is_err());

        let mut s = StatsContainerResponse::new();
        assert_eq!(s.validate(), Ok(()));
        s.io.mut_or_insert_default().devices = vec![IoDeviceStats::new(); MAX_IO_DEVICES + 1];
        assert!(s.validate().is_err());

        let mut o = GetOomEventResponse::new();
        assert!(o.validate().is_err());
        o.container_id = "ctr".into();
        assert_eq!(o.validate(), Ok(()));
    }
}
