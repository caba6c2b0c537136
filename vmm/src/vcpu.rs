//! The vCPU threads: run the guest, dispatch its exits to devices, report stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::legacy::LegacyDevices;
use crate::devices::mmio_bus::MmioBus;
use crate::events::{StopReason, VmEvent};
use crate::kvm::{Vcpu, VcpuExit};

/// A vCPU thread's stack. The run loop needs little; the default (2 MiB) is a
/// full huge page on hosts with THP "always", 2 MiB of RSS per vCPU for nothing.
const VCPU_STACK_BYTES: usize = 256 << 10;

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the (empty) handler for the kick signal; its only job is to make
/// KVM_RUN return with EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), on_kick).map_err(std::io::Error::from)
}

/// Runs vCPUs on their own threads until told to stop.
pub struct VcpuThreads {
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU.
    pub fn spawn(
        vcpus: Vec<Vcpu>,
        devices: Arc<LegacyDevices>,
        mmio: Arc<MmioBus>,
        events: Sender<VmEvent>,
    ) -> std::io::Result<VcpuThreads> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = VcpuThreads {
            handles: Vec::with_capacity(vcpus.len()),
            stop,
        };
        for vcpu in vcpus {
            let (devices, mmio, events, stop) = (
                Arc::clone(&devices),
                Arc::clone(&mmio),
                events.clone(),
                Arc::clone(&threads.stop),
            );
            let handle = thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id()))
                .stack_size(VCPU_STACK_BYTES)
                .spawn(move || run_loop(vcpu, &devices, &mmio, &events, &stop))?;
            threads.handles.push(handle);
        }
        Ok(threads)
    }

    /// Stops every vCPU thread: raises the flag, then kicks them out of KVM_RUN
    /// until they have all returned, for at most `patience`.
    pub fn stop(self, patience: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + patience;
        // A kick can land just before a thread enters KVM_RUN and be lost, so keep
        // kicking until every thread is gone.
        while self.handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            for h in self.handles.iter().filter(|h| !h.is_finished()) {
                let _ = h.kill(kick_signal());
            }
            thread::sleep(Duration::from_millis(5));
        }
        for h in self.handles {
            if h.is_finished() {
                let _ = h.join();
            } else {
                tracing::warn!("a vCPU thread did not stop in time; leaving it to process exit");
            }
        }
    }
}

fn run_loop(
    mut vcpu: Vcpu,
    devices: &LegacyDevices,
    mmio: &MmioBus,
    events: &Sender<VmEvent>,
    stop: &AtomicBool,
) {
    let cpu = vcpu.id();
    let report = |reason| {
        let _ = events.send(VmEvent::Stop(reason));
    };
    while !stop.load(Ordering::SeqCst) {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => devices.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => devices.pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => mmio.read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => mmio.write(addr, data),
            Ok(VcpuExit::Interrupted) | Ok(VcpuExit::Halted) => {}
            Ok(VcpuExit::Shutdown) => return report(StopReason::TripleFault { cpu }),
            Ok(VcpuExit::SystemEvent(kind)) => return report(StopReason::GuestSystemEvent(kind)),
            Ok(VcpuExit::InternalError) => {
                return report(StopReason::Hypervisor {
                    cpu,
                    detail: "internal error".into(),
                })
            }
            Ok(VcpuExit::FailEntry(reason)) => {
                return report(StopReason::Hypervisor {
                    cpu,
                    detail: format!("VM entry failed (hardware reason {reason:#x})"),
                })
            }
            Ok(VcpuExit::Unexpected(what)) => {
                return report(StopReason::Hypervisor {
                    cpu,
                    detail: format!("unexpected exit {what}"),
                })
            }
            Err(e) => {
                return report(StopReason::VcpuFailed {
                    cpu,
                    detail: e.to_string(),
                })
            }
        }
    }
}
