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
//!
//! The service layer on top of them:
//! - [`rpc`]: the agent API (ttrpc) mapped to the core, one `do_*` per call;
//! - [`registry`]: containers and their processes (stdio ends, stream
//!   attachments, exit statuses) by id;
//! - [`streams`]: the stdio stream listener (vsock port 1025);
//! - [`mapping`]: pure translations between API messages and the core;
//! - [`ready`]: the hello on the host's ready port;
//! - [`init_mode`]: the binary as a container's signal-forwarding init;
//! - [`rootfs`]: PID 1 leaves the initramfs for a tmpfs root;
//! - [`netns`]: a new network namespace gets its loopback up.

pub mod cgroup;
pub mod container;
pub mod exec_seccomp;
pub mod exit;
pub mod init;
pub mod init_mode;
pub mod mapping;
pub mod netns;
pub mod network;
pub mod oom;
pub mod pid1;
pub mod process;
pub mod ready;
pub mod registry;
pub mod rootfs;
pub mod rpc;
pub mod shared_pages;
pub mod spare_netns;
pub mod stdio;
pub mod streams;
pub mod template;
pub mod workdir;

pub use container::{Container, ContainerError, CreateOptions, Exec};
pub use exit::ExitStatus;
pub use stdio::Stdio;
