//! `bulkhead-agent`: the guest's PID 1 and container runtime.
//!
//! The modules, one job each:
//! - [`init`]: PID 1's kernel filesystems, cgroup controllers, the virtio-fs share;
//! - [`pid1`]: PID 1 reaps orphans while the agent runs as its child;
//! - [`process`]: waits for and signals one container process by pidfd;
//! - [`exit`]: exit statuses the way runc reports them;
//! - [`stdio`]: pipes/streams or a pty for a container process;
//! - [`cgroup`]: cgroup v2 statistics; [`oom`]: waiting for OOM kills;
//! - [`container`]: create/start/wait/signal/exec/stats/update/delete with
//!   youki's libcontainer.

pub mod cgroup;
pub mod container;
pub mod exit;
pub mod init;
pub mod oom;
pub mod pid1;
pub mod process;
pub mod stdio;

pub use container::{Container, ContainerError, CreateOptions, Exec};
pub use exit::ExitStatus;
pub use stdio::Stdio;
