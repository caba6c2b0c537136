//! The virtio-vsock device: configuration, the host listener bound at
//! construction, and the worker thread it starts on activation.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};

use vmm_sys_util::eventfd::EventFd;

use super::event_handler::Worker;
use super::muxer::Muxer;
use super::packet::HOST_CID;
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};

const VIRTIO_ID_VSOCK: u32 = 19;
/// RX, TX and event queues, in that order (virtio 1.2, 5.10.2).
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];

/// The vsock device with Firecracker's hybrid host side: the host reaches
/// guest ports through one Unix socket (`CONNECT <port>\n`), and the guest
/// reaches host port P through the Unix socket `<uds_path>_<P>`.
pub struct Vsock {
    // virtio
    config: [u8; 8],
    // device-specific
    guest_cid: u64,
    uds_path: PathBuf,
    /// Until activation; then the worker owns it.
    listener: Option<UnixListener>,
    worker: Option<(EventFd, JoinHandle<()>)>,
}

impl Vsock {
    /// A vsock device for a guest with context id `guest_cid` (3 or more, and
    /// below 2^32 - 1, which Linux reserves), listening at `uds_path`.
    ///
    /// The listener is bound now, mode 0600, so host clients can connect
    /// before the guest is up: they wait in the backlog until the driver is
    /// active. The socket file is removed when the device is dropped.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> io::Result<Vsock> {
        check_guest_cid(guest_cid)?;
        let listener = UnixListener::bind(&uds_path)?;
        std::fs::set_permissions(&uds_path, std::fs::Permissions::from_mode(0o600))?;
        Self::with_listener(guest_cid, uds_path, listener)
    }

    /// A vsock device serving `listener`, which its creator bound at
    /// `uds_path` (see [`crate::inherited_socket`]). The socket file is
    /// removed when the device is dropped.
    pub fn with_listener(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
    ) -> io::Result<Vsock> {
        check_guest_cid(guest_cid)?;
        listener.set_nonblocking(true)?;
        Ok(Vsock {
            config: guest_cid.to_le_bytes(),
            guest_cid,
            uds_path,
            listener: Some(listener),
            worker: None,
        })
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Where host clients connect.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

/// 0-2 are reserved, and Linux reserves 2^32 - 1.
fn check_guest_cid(guest_cid: u64) -> io::Result<()> {
    if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("vsock guest CID {guest_cid} is reserved or out of range"),
        ));
    }
    Ok(())
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn name(&self) -> &'static str {
        "vsock"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let io = |source| ActivateError::Io {
            device: "vsock",
            source,
        };
        let Some(listener) = self.listener.take() else {
            return Err(io(io::Error::other("already activated")));
        };
        let ActivateContext {
            mem,
            queues,
            queue_events,
            interrupt,
            ..
        } = ctx;
        let (Ok(queues), Ok(queue_events)) =
            (<[_; 3]>::try_from(queues), <[_; 3]>::try_from(queue_events))
        else {
            return Err(ActivateError::InvalidQueue {
                device: "vsock",
                queue: 0,
            });
        };
        let muxer = Muxer::new(self.guest_cid, listener, self.uds_path.clone()).map_err(io)?;
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        let worker = Worker::new(
            mem,
            queues,
            queue_events,
            interrupt,
            muxer,
            self.guest_cid,
            kill.try_clone().map_err(io)?,
        )
        .map_err(io)?;
        let handle = thread::Builder::new()
            .name("virtio-vsock".into())
            .stack_size(256 << 10)
            .spawn(move || worker.run())
            .map_err(io)?;
        self.worker = Some((kill, handle));
        Ok(())
    }
}

impl Drop for Vsock {
    /// Stops the worker (closing every connection) and removes the socket file.
    fn drop(&mut self) {
        if let Some((kill, handle)) = self.worker.take() {
            let _ = kill.write(1);
            let _ = handle.join();
        }
        self.listener = None;
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
