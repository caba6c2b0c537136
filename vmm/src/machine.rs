//! A whole microVM: builds it from a [`VmConfig`], runs it, and says why it stopped.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::agent_pages;
use crate::arch::x86_64::layout::{EBDA_START, MMIO_DEVICES_START, ZERO_PAGE_START};
use crate::arch::x86_64::{bootparams, mptable, regs};
use crate::config::{ConfigError, ConsoleSpec, VmConfig};
use crate::devices::console::{tail_text, ConsoleSink, SharedTail};
use crate::devices::legacy::{LegacyDevices, COM1_IRQ};
use crate::devices::mmio_bus::MmioBus;
use crate::devices::virtio::fs::{FsError, FsTag, VhostUserFs};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_DEVICE_SIZE, NOTIFY_REG_OFFSET};
use crate::devices::virtio::net::{Backend, MacAddr, Net, Tap, TapError};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::events::{StopReason, VmEvent};
use crate::inherited_socket::take_unix_listener;
use crate::kernel_image;
use crate::kvm::{HostKvm, KvmError, Vm};
use crate::loader::{self, KernelFormat, LoadError};
use crate::memory::{self, GuestRam, MemoryError};
use crate::snapshot::{self, SnapshotError, VmSnapshot};
use crate::vcpu::{install_kick_handler, SnapshotSupport, VcpuThreads};

/// The first interrupt line for virtio devices: 0-4 are the PIT, keyboard,
/// cascade and serial ports of a PC.
const FIRST_VIRTIO_GSI: u32 = 5;

/// How long stopping the vCPU threads may take before we leave them to process exit.
const VCPU_STOP_PATIENCE: Duration = Duration::from_secs(1);

/// Why a VM could not be built or did not come up.
#[derive(Debug, Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A virtio-fs backend could not be reached.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The vsock device's host socket could not be created.
    #[error("Cannot create the vsock socket {path}")]
    Vsock {
        /// The socket path.
        path: PathBuf,
        /// Why (an existing file is not replaced).
        #[source]
        source: std::io::Error,
    },
    /// The net device's tap descriptor cannot be used.
    #[error("Cannot use the tap for the net device")]
    Tap(#[from] TapError),
    /// A KVM call failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// There is no usable /dev/kvm.
    #[error(
        "Cannot use /dev/kvm: {0}. Load kvm_intel or kvm_amd, check that you may open /dev/kvm, \
         or run on a host with VT-x/AMD-V"
    )]
    NoKvm(String),
    /// A PVM host cannot run this kernel, and would spin forever trying.
    #[error(
        "This host's /dev/kvm is the PVM hypervisor (/sys/module/kvm_pvm exists), which runs only \
         kernels built with CONFIG_PVM_GUEST, and {kernel} is not one (no pvm_* symbols). Use a PVM \
         guest kernel (pass --assume-pvm-guest if it is one but stripped), or run on a host with \
         VT-x/AMD-V or nested virtualization"
    )]
    PvmNeedsPvmGuest {
        /// The kernel that would not boot.
        kernel: PathBuf,
    },
    /// More vCPUs than this KVM allows.
    #[error("This KVM allows at most {max} vCPUs per VM; {asked} were asked for")]
    TooManyVcpus {
        /// Asked for.
        asked: u16,
        /// KVM's limit.
        max: usize,
    },
    /// More devices than free interrupt lines.
    #[error("Too many devices: the IOAPIC has no free interrupt line left")]
    TooManyDevices,
    /// The MP table could not be built.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// The console file could not be created.
    #[error("Cannot create the console file {path}")]
    ConsoleFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A thread, eventfd or signal handler could not be set up.
    #[error("Cannot set up {what}")]
    Os {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A snapshot could not be saved or restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The guest did not print the ready marker in time.
    #[error(
        "The guest did not print the ready marker {marker:?} within {secs} s; it was stopped. \
         Last console lines:\n{tail}"
    )]
    BootTimeout {
        /// The marker.
        marker: String,
        /// The deadline.
        secs: u64,
        /// The console's last lines.
        tail: String,
    },
}

impl VmmError {
    /// The VMM's exit status for this error (see `bulkhead-vmm --help`).
    pub fn exit_code(&self) -> i32 {
        match self {
            VmmError::BootTimeout { .. } => crate::EXIT_BOOT_TIMEOUT,
            _ => crate::EXIT_SETUP_FAILED,
        }
    }
}

/// How a VM that booted ended.
#[derive(Debug)]
pub struct Outcome {
    /// Why it stopped.
    pub reason: StopReason,
    /// Time from the start of [`run`] to the ready marker, if one was asked for and seen.
    pub ready_after: Option<Duration>,
    /// The console's last lines.
    pub console_tail: String,
}

/// Builds the VM described by `config`, runs it until it stops, and returns why.
///
/// The VM's threads are stopped before this returns. Meant to be a process's one
/// job: it installs a process-wide signal handler to kick vCPUs.
pub fn run(config: &VmConfig) -> Result<Outcome, VmmError> {
    let started = Instant::now();
    let step =
        |name: &str| tracing::debug!(elapsed_us = started.elapsed().as_micros() as u64, "{name}");
    config.validate()?;
    check_inputs(config)?;
    check_host(config)?;
    let snapshot = match &config.restore_snapshot {
        Some(dir) => Some(VmSnapshot::read(
            dir,
            config.memory_bytes(),
            usize::from(config.vcpus),
        )?),
        None => None,
    };
    step("inputs checked");

    let ram = memory::create(config.memory_bytes())?;
    step("guest memory created");

    let vm = Vm::new()?;
    if usize::from(config.vcpus) > vm.max_vcpus() {
        return Err(VmmError::TooManyVcpus {
            asked: config.vcpus,
            max: vm.max_vcpus(),
        });
    }
    vm.map_memory(&ram.mem)?;
    step("VM created");
    // The vsock device binds its host socket now (unless the parent bound it
    // already), before the slow part: a host that connects while guest memory
    // is being filled then waits on its connection instead of polling for the
    // socket to appear.
    let vsock: Option<Box<dyn VirtioDevice>> = match &config.vsock {
        Some(vsock) => {
            let cid = u64::from(vsock.cid);
            let path = vsock.uds_path.clone();
            let device = match vsock.listener_fd {
                Some(fd) => take_unix_listener(fd, &path)
                    .and_then(|listener| Vsock::with_listener(cid, path.clone(), listener)),
                None => Vsock::new(cid, path.clone()),
            };
            Some(Box::new(
                device.map_err(|source| VmmError::Vsock { path, source })?,
            ))
        }
        None => None,
    };
    // The tap is checked now too, so a wrong descriptor fails before the slow part.
    let net = match &config.net {
        Some(net) => Some(net_device(net)?),
        None => None,
    };
    // `snapshot` was read from `restore_snapshot`: both are set or neither.
    let images = match &config.restore_snapshot {
        Some(dir) => {
            let shared = snapshot.as_ref().map_or(&[][..], |s| &s.shared[..]);
            snapshot::restore_memory(dir, &ram, shared)?;
            step("guest memory restored");
            None
        }
        None => {
            let images = load_images(config, &ram)?;
            step("guest loaded");
            Some(images)
        }
    };

    let os = |what| move |source| VmmError::Os { what, source };
    let mut virtio: Vec<Box<dyn VirtioDevice>> = vec![Box::new(Rng)];
    for share in &config.fs {
        // Validated with the config, so the tag is well-formed here.
        let tag = FsTag::new(&share.tag).map_err(|e| ConfigError::Fs {
            tag: share.tag.clone(),
            reason: e.to_string(),
        })?;
        virtio.push(Box::new(VhostUserFs::connect(tag, &share.socket)?));
    }
    virtio.extend(vsock);
    // Last, and only ever appended to: the device order is part of the
    // snapshot format.
    virtio.extend(net);
    let (mmio, device_params) = attach_virtio_devices(&vm, &ram, virtio)?;
    let kernel_entry = match images {
        Some(images) => {
            let cmdline = format!("{} {}", config.effective_cmdline(), device_params.join(" "));
            Some(write_boot_data(config, &ram, images, &cmdline)?)
        }
        None => None,
    };
    if let Some(snapshot) = &snapshot {
        vm.restore_state(&snapshot.vm)?;
    }
    step("devices attached");

    let vcpu_count = config.vcpus as u8; // validated: 1..=254
    let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
    for id in 0..vcpu_count {
        vcpus.push(vm.create_vcpu(id, vcpu_count)?);
    }
    match (&snapshot, kernel_entry) {
        (Some(snapshot), _) => {
            for (vcpu, state) in vcpus.iter().zip(&snapshot.vcpus) {
                vcpu.restore_state(state)?;
            }
        }
        (None, Some(entry)) => vcpus[0].set_boot_state(entry)?,
        (None, None) => unreachable!("a VM without a snapshot loads the kernel"),
    }
    if let Some(snapshot) = &snapshot {
        // Only now, with every LAPIC restored: a restarted device may raise
        // its interrupt at once (a host connection was waiting for the vsock
        // device), and a LAPIC written after that would drop it.
        mmio.restore(&snapshot.devices)
            .map_err(|e| restore_failed(config, e.to_string()))?;
    }
    step("vCPUs created");

    let (events_tx, events_rx) = channel();
    let mut console = ConsoleSink::new(
        open_console(&config.console)?,
        config.ready_marker.as_deref(),
        events_tx.clone(),
    );
    let snapshot_support = match &config.save_snapshot {
        Some(_) => {
            let pause = Arc::new(AtomicBool::new(false));
            console = console.pause_on(snapshot::MARKER, Arc::clone(&pause));
            Some(SnapshotSupport {
                pause,
                msr_indices: Arc::new(vm.msr_indices()?),
            })
        }
        None => None,
    };
    let tail = console.tail();
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(os("the serial interrupt eventfd"))?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let devices = Arc::new(
        LegacyDevices::new(
            console,
            serial_irq,
            events_tx.clone(),
            snapshot.as_ref().map(|s| &s.serial),
        )
        .map_err(|reason| restore_failed(config, reason))?,
    );

    install_kick_handler().map_err(os("the vCPU kick signal handler"))?;
    let mmio = Arc::new(mmio);
    let threads = VcpuThreads::spawn(
        vcpus,
        Arc::clone(&devices),
        Arc::clone(&mmio),
        events_tx,
        snapshot_support,
    )
    .map_err(os("the vCPU threads"))?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        restored = snapshot.is_some(),
        "vCPUs started"
    );

    let result = match wait_for_stop(config, &events_rx, &tail, started) {
        Ok(Waited::Stopped(outcome)) => {
            threads.stop(VCPU_STOP_PATIENCE);
            Ok(outcome)
        }
        Ok(Waited::SnapshotRequested) => {
            let saved = save_snapshot(config, &vm, &ram, threads, &devices, &mmio, &tail);
            saved.map(|()| Outcome {
                reason: StopReason::SnapshotSaved,
                ready_after: None,
                console_tail: tail_text(&tail),
            })
        }
        Err(e) => {
            threads.stop(VCPU_STOP_PATIENCE);
            Err(e)
        }
    };
    // `vm` and `ram` outlive the vCPU threads: dropped only here.
    drop(vm);
    drop(ram);
    result
}

/// The net device for `net`, connected to its tap if it has one.
fn net_device(net: &crate::config::NetConfig) -> Result<Box<dyn VirtioDevice>, VmmError> {
    // Validated with the config, so the address parses here.
    let mac: MacAddr = net
        .mac
        .parse()
        .map_err(|e: crate::devices::virtio::net::MacError| ConfigError::Net(e.to_string()))?;
    let backend = match net.tap_fd {
        Some(fd) => {
            let tap = Tap::take(fd)?;
            tracing::debug!(interface = tap.name(), %mac, "net device connected");
            Some(Box::new(tap) as Box<dyn Backend>)
        }
        None => None,
    };
    Ok(Box::new(Net::new(mac, backend)))
}

/// A device state in `config.restore_snapshot` that cannot be restored.
fn restore_failed(config: &VmConfig, reason: String) -> VmmError {
    VmmError::Snapshot(SnapshotError::State {
        path: config.restore_snapshot.clone().unwrap_or_default(),
        reason,
    })
}

/// Pauses the vCPUs and writes the whole VM to `config.save_snapshot`.
fn save_snapshot(
    config: &VmConfig,
    vm: &Vm,
    ram: &GuestRam,
    threads: VcpuThreads,
    devices: &LegacyDevices,
    mmio: &MmioBus,
    console: &SharedTail,
) -> Result<(), VmmError> {
    let dir = config.save_snapshot.clone().unwrap_or_default();
    let failed = |reason: String| {
        VmmError::Snapshot(SnapshotError::State {
            path: dir.clone(),
            reason,
        })
    };
    let started = Instant::now();
    let vcpus = threads.pause(VCPU_STOP_PATIENCE).map_err(failed)?;
    // Before the irqchip is saved: a device raising its interrupt after that
    // would leave the saved irqchip and the saved transport disagreeing.
    mmio.quiesce();
    let vm_state = vm.save_state()?;
    let transports = mmio.states().map_err(|e| failed(e.to_string()))?;
    let snapshot = VmSnapshot::new(
        config.memory_bytes(),
        vcpus,
        vm_state,
        devices.serial_state(),
        transports,
        shared_ranges(config, ram, &tail_text(console)),
    );
    snapshot.write(&dir, ram)?;
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        dir = %dir.display(),
        "snapshot saved"
    );
    Ok(())
}

/// The guest memory that copies of this template can share: the kernel's
/// code and read-only data, and the agent's binary as the agent reported it
/// on the console just before asking to be saved. Ranges that are not in one
/// piece of RAM are left out (a restore would refuse them).
fn shared_ranges(
    config: &VmConfig,
    ram: &GuestRam,
    console: &str,
) -> Vec<kernel_image::GuestRange> {
    let mut ranges = shared_kernel_ranges(config);
    ranges.extend(agent_pages::parse(console));
    let in_ram =
        |&(start, end): &kernel_image::GuestRange| ram.file_offset_of_range(start, end).is_some();
    let (kept, refused): (Vec<_>, Vec<_>) =
        kernel_image::merge(ranges).into_iter().partition(in_ram);
    if !refused.is_empty() {
        tracing::warn!("shared ranges outside guest RAM left out: {refused:x?}");
    }
    kept
}

/// The kernel's code and read-only data, for an ELF kernel. Sharing is an
/// optimisation, so a kernel whose sections cannot be read shares nothing.
fn shared_kernel_ranges(config: &VmConfig) -> Vec<kernel_image::GuestRange> {
    if !matches!(loader::detect_format(&config.kernel), Ok(KernelFormat::Elf)) {
        return Vec::new();
    }
    match kernel_image::shared_ranges(&config.kernel) {
        Ok(ranges) => ranges,
        Err(err) => {
            tracing::warn!("{err}; copies of this template share no memory");
            Vec::new()
        }
    }
}

/// Cheap checks on the input files, before any memory is allocated.
fn check_inputs(config: &VmConfig) -> Result<(), VmmError> {
    loader::detect_format(&config.kernel)?;
    if let Some(initrd) = &config.initrd {
        let size = std::fs::metadata(initrd)
            .map_err(|source| LoadError::Io {
                what: "initrd",
                path: initrd.clone(),
                source,
            })?
            .len();
        if size >= config.memory_bytes() {
            return Err(LoadError::InitrdTooLarge {
                path: initrd.clone(),
                size_mib: size.div_ceil(1 << 20),
                available_mib: u64::from(config.memory),
            }
            .into());
        }
    }
    Ok(())
}

fn check_host(config: &VmConfig) -> Result<(), VmmError> {
    match HostKvm::detect() {
        HostKvm::Hardware => Ok(()),
        HostKvm::Absent(why) => Err(VmmError::NoKvm(why)),
        HostKvm::Pvm => {
            if config.assume_pvm_guest || loader::looks_like_pvm_guest(&config.kernel)? {
                Ok(())
            } else {
                Err(VmmError::PvmNeedsPvmGuest {
                    kernel: config.kernel.clone(),
                })
            }
        }
    }
}

/// Places `devices` in the MMIO gap, one 4 KiB window and one GSI each, wires
/// their interrupts and queue notifications into KVM, and returns the bus with
/// the `virtio_mmio.device=` parameters that announce them to the guest.
fn attach_virtio_devices(
    vm: &Vm,
    ram: &GuestRam,
    devices: Vec<Box<dyn VirtioDevice>>,
) -> Result<(MmioBus, Vec<String>), VmmError> {
    let os = |what| move |source| VmmError::Os { what, source };
    let mut bus = MmioBus::default();
    let mut params = Vec::with_capacity(devices.len());
    for (i, device) in devices.into_iter().enumerate() {
        let gsi = FIRST_VIRTIO_GSI + i as u32;
        if gsi >= u32::from(mptable::IOAPIC_PINS) {
            return Err(VmmError::TooManyDevices);
        }
        let base = MMIO_DEVICES_START + i as u64 * MMIO_DEVICE_SIZE;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(os("a device interrupt eventfd"))?;
        vm.register_irqfd(&irqfd, gsi)?;
        let transport =
            MmioTransport::new(device, ram.mem.clone(), Arc::new(Interrupt::new(irqfd)))
                .map_err(os("a virtio-mmio transport"))?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_mmio_notify(evt, base + NOTIFY_REG_OFFSET, queue as u32)?;
        }
        tracing::debug!(
            device = transport.name(),
            base = format_args!("{base:#x}"),
            gsi,
            "virtio device"
        );
        params.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        bus.insert(base, transport);
    }
    Ok((bus, params))
}

/// What [`load_images`] put in guest memory.
struct LoadedImages {
    kernel: loader::LoadedKernel,
    /// Guest address and size.
    initrd: Option<(u64, u32)>,
}

/// Copies the kernel and the initrd into guest memory: the slow part of
/// setting up, done before the devices connect to their back ends (virtiofsd
/// may still be starting).
fn load_images(config: &VmConfig, ram: &GuestRam) -> Result<LoadedImages, VmmError> {
    let kernel = loader::load_kernel(&ram.mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(loader::load_initrd(&ram.mem, path, &kernel, ram.low_end())?),
        None => None,
    };
    Ok(LoadedImages { kernel, initrd })
}

/// Writes `cmdline`, the zero page and the boot tables.
/// Returns the kernel's 64-bit entry point.
fn write_boot_data(
    config: &VmConfig,
    ram: &GuestRam,
    images: LoadedImages,
    cmdline: &str,
) -> Result<u64, VmmError> {
    let cmdline_len = loader::load_cmdline(&ram.mem, cmdline)?;
    let info = bootparams::BootInfo {
        setup_header: images.kernel.setup_header,
        cmdline_len,
        initrd: images.initrd,
    };
    let zero_page = bootparams::build(&info, &ram.ranges);
    ram.mem
        .write_obj(zero_page, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| LoadError::GuestMemory {
            what: "the zero page",
            source,
        })?;
    let mp = mptable::build(EBDA_START, config.vcpus as u8)?;
    loader::write_guest(&ram.mem, EBDA_START, &mp, "the MP table")?;
    for (addr, bytes) in regs::descriptor_tables() {
        loader::write_guest(&ram.mem, addr, &bytes, "the boot GDT")?;
    }
    for (addr, bytes) in regs::identity_map_pages() {
        loader::write_guest(&ram.mem, addr, &bytes, "the boot page tables")?;
    }
    Ok(images.kernel.entry)
}

fn open_console(spec: &ConsoleSpec) -> Result<Option<Box<dyn Write + Send>>, VmmError> {
    Ok(match spec {
        ConsoleSpec::Off => None,
        ConsoleSpec::Stdout => Some(Box::new(std::io::stdout())),
        ConsoleSpec::File(path) => Some(Box::new(File::create(path).map_err(|source| {
            VmmError::ConsoleFile {
                path: path.clone(),
                source,
            }
        })?)),
    })
}

/// Waits for the guest to stop, enforcing the boot deadline until it is ready.
/// What [`wait_for_stop`] saw end the wait.
enum Waited {
    /// The VM stopped.
    Stopped(Outcome),
    /// A template boot's guest rang the doorbell.
    SnapshotRequested,
}

fn wait_for_stop(
    config: &VmConfig,
    events: &Receiver<VmEvent>,
    tail: &SharedTail,
    started: Instant,
) -> Result<Waited, VmmError> {
    let deadline = config.boot_deadline().map(|d| started + d);
    let mut ready_after = None;
    loop {
        let event = match (deadline, ready_after) {
            (Some(deadline), None) => {
                match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(event) => event,
                    Err(RecvTimeoutError::Timeout) => {
                        return Err(VmmError::BootTimeout {
                            marker: config.ready_marker.clone().unwrap_or_default(),
                            secs: config.boot_timeout.unwrap_or_default(),
                            tail: tail_text(tail),
                        })
                    }
                    Err(RecvTimeoutError::Disconnected) => vanished(),
                }
            }
            _ => events.recv().unwrap_or_else(|_| vanished()),
        };
        match event {
            VmEvent::Ready => {
                let after = started.elapsed();
                tracing::info!(ms = after.as_millis() as u64, "guest ready");
                ready_after = Some(after);
            }
            VmEvent::SnapshotRequested => return Ok(Waited::SnapshotRequested),
            VmEvent::Stop(reason) => {
                return Ok(Waited::Stopped(Outcome {
                    reason,
                    ready_after,
                    console_tail: tail_text(tail),
                }))
            }
        }
    }
}

/// The event channel closed: every vCPU thread ended without saying why (a vCPU
/// thread only ends after sending its stop reason, so this means one panicked).
fn vanished() -> VmEvent {
    VmEvent::Stop(StopReason::VcpuFailed {
        cpu: 0,
        detail: "every vCPU thread ended without a stop reason".into(),
    })
}
