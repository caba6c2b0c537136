//! The vhost-user-fs frontend.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread;

use thiserror::Error;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::config::FsTag;
use crate::devices::virtio::{read_config_bytes, ActivateContext, ActivateError, VirtioDevice};

const VIRTIO_ID_FS: u32 = 26;
/// One high-priority queue and one request queue.
const QUEUE_SIZES: [u16; 2] = [1024, 1024];
const REQUEST_QUEUES: u32 = 1;
/// Bit 30: the backend speaks vhost-user protocol feature negotiation; a
/// vhost-user bit, never offered to the guest.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Why the virtiofsd connection could not be set up.
#[derive(Debug, Error)]
pub enum FsError {
    /// No virtiofsd at the socket, or the handshake failed.
    #[error("virtio-fs {tag}: cannot set up vhost-user with virtiofsd at {socket}")]
    Connect {
        /// The tag.
        tag: String,
        /// virtiofsd's socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: vhost::Error,
    },
}

/// A virtio-fs device served by a virtiofsd process.
pub struct VhostUserFs {
    tag: FsTag,
    socket: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    config: Vec<u8>,
}

impl VhostUserFs {
    /// Connects to virtiofsd at `socket` and learns its features. Fails here,
    /// before the guest boots, if virtiofsd is not there.
    pub fn connect(tag: FsTag, socket: &Path) -> Result<VhostUserFs, FsError> {
        let err = |source| FsError::Connect {
            tag: tag.as_str().to_owned(),
            socket: socket.to_owned(),
            source,
        };
        let mut frontend = Frontend::connect(socket, QUEUE_SIZES.len() as u64).map_err(err)?;
        frontend.set_owner().map_err(err)?;
        let backend_features = frontend.get_features().map_err(err)?;
        if backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
            let offered = frontend.get_protocol_features().map_err(err)?;
            frontend
                .set_protocol_features(offered & wanted)
                .map_err(err)?;
        }
        let config = tag.config_space(REQUEST_QUEUES);
        Ok(VhostUserFs {
            tag,
            socket: socket.to_owned(),
            frontend,
            backend_features,
            config,
        })
    }

    fn setup_backend(
        &mut self,
        ctx: &ActivateContext,
        calls: &[EventFd],
    ) -> Result<(), vhost::Error> {
        let mem = &ctx.mem;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()?;
        let protocol = self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES;
        self.frontend.set_features(ctx.acked_features | protocol)?;
        self.frontend.set_mem_table(&regions)?;
        for (i, queue) in ctx.queues.iter().enumerate() {
            self.frontend.set_vring_num(i, queue.size())?;
            let config = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host_address(mem, queue.desc_table())?,
                used_ring_addr: host_address(mem, queue.used_ring())?,
                avail_ring_addr: host_address(mem, queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend.set_vring_addr(i, &config)?;
            // A restored snapshot's queue resumes where it stood.
            self.frontend.set_vring_base(i, queue.next_avail())?;
            self.frontend.set_vring_call(i, &calls[i])?;
            self.frontend.set_vring_kick(i, &ctx.queue_events[i])?;
            if protocol != 0 {
                self.frontend.set_vring_enable(i, true)?;
            }
        }
        Ok(())
    }
}

/// vhost-user wants queue addresses in the frontend's address space; the
/// transport has already checked that each queue lies in guest memory.
fn host_address(mem: &GuestMemoryMmap, addr: u64) -> Result<u64, vhost::Error> {
    mem.get_host_address(GuestAddress(addr))
        .map(|p| p as u64)
        .map_err(|_| vhost::Error::InvalidGuestMemory)
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn name(&self) -> &'static str {
        "fs"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.backend_features & !VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let io = |source| ActivateError::Io {
            device: "fs",
            source,
        };
        let calls = (0..ctx.queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io)?;
        self.setup_backend(&ctx, &calls).map_err(|e| {
            io(std::io::Error::other(format!(
                "vhost-user setup with virtiofsd at {} ({}) failed: {e}",
                self.socket.display(),
                self.tag.as_str()
            )))
        })?;
        // virtiofsd signals a call eventfd when it used buffers; the guest's
        // virtio-mmio driver also needs the InterruptStatus bit, so relay.
        let epoll = Epoll::new().map_err(io)?;
        for (i, call) in calls.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    call.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(io)?;
        }
        let interrupt = ctx.interrupt;
        let _queues: Vec<Queue> = ctx.queues; // owned by virtiofsd from here on
        thread::Builder::new()
            .name("virtio-fs-irq".into())
            .stack_size(128 << 10)
            .spawn(move || {
                let mut ready = vec![EpollEvent::default(); calls.len()];
                loop {
                    let Ok(n) = epoll.wait(-1, &mut ready) else {
                        continue;
                    };
                    for event in &ready[..n] {
                        if let Some(call) = calls.get(event.data() as usize) {
                            let _ = call.read();
                        }
                    }
                    if let Err(e) = interrupt.signal_used_queue() {
                        tracing::warn!("virtio-fs: cannot interrupt the guest: {e}");
                    }
                }
            })
            .map_err(io)?;
        Ok(())
    }
}
