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
use crate::kvm::{Vcpu, VcpuExit, VcpuState};

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

/// What the vCPU threads of a template boot need: the flag the console raises
/// at the snapshot marker, and the MSRs to save.
pub struct SnapshotSupport {
    /// Raised when the VM is to pause for its snapshot.
    pub pause: Arc<AtomicBool>,
    /// The MSRs each vCPU saves.
    pub msr_indices: Arc<Vec<u32>>,
}

/// Runs vCPUs on their own threads until told to stop (or, for a snapshot, to
/// pause and hand over their state).
pub struct VcpuThreads {
    handles: Vec<JoinHandle<Option<VcpuState>>>,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU.
    pub fn spawn(
        vcpus: Vec<Vcpu>,
        devices: Arc<LegacyDevices>,
        mmio: Arc<MmioBus>,
        events: Sender<VmEvent>,
        snapshot: Option<SnapshotSupport>,
    ) -> std::io::Result<VcpuThreads> {
        let mut threads = VcpuThreads {
            handles: Vec::with_capacity(vcpus.len()),
            stop: Arc::new(AtomicBool::new(false)),
            pause: snapshot.as_ref().map_or_else(
                || Arc::new(AtomicBool::new(false)),
                |s| Arc::clone(&s.pause),
            ),
        };
        let msr_indices = snapshot.map(|s| s.msr_indices);
        for vcpu in vcpus {
            let ctx = LoopContext {
                devices: Arc::clone(&devices),
                mmio: Arc::clone(&mmio),
                events: events.clone(),
                stop: Arc::clone(&threads.stop),
                pause: Arc::clone(&threads.pause),
                msr_indices: msr_indices.clone(),
            };
            let handle = thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id()))
                .stack_size(VCPU_STACK_BYTES)
                .spawn(move || run_loop(vcpu, &ctx))?;
            threads.handles.push(handle);
        }
        Ok(threads)
    }

    /// Pauses every vCPU for a snapshot and returns their states in id order;
    /// the threads are gone afterwards. Fails if a vCPU could not be saved or
    /// did not stop within `patience`.
    pub fn pause(self, patience: Duration) -> Result<Vec<VcpuState>, String> {
        self.pause.store(true, Ordering::SeqCst);
        let count = self.handles.len();
        let deadline = Instant::now() + patience;
        while self.handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            for h in self.handles.iter().filter(|h| !h.is_finished()) {
                let _ = h.kill(kick_signal());
            }
            thread::sleep(Duration::from_millis(1));
        }
        let mut states = Vec::with_capacity(count);
        for h in self.handles {
            if !h.is_finished() {
                return Err("a vCPU did not pause in time".into());
            }
            match h.join() {
                Ok(Some(state)) => states.push(state),
                Ok(None) => return Err("a vCPU stopped without saving its state".into()),
                Err(_) => return Err("a vCPU thread panicked".into()),
            }
        }
        states.sort_by_key(|s| s.id);
        Ok(states)
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

/// What one vCPU thread shares with the others and the main thread.
struct LoopContext {
    devices: Arc<LegacyDevices>,
    mmio: Arc<MmioBus>,
    events: Sender<VmEvent>,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    /// Set in a template boot: the MSRs to save when pausing.
    msr_indices: Option<Arc<Vec<u32>>>,
}

/// Runs the vCPU until a stop (returns `None`) or a pause (returns its state).
fn run_loop(mut vcpu: Vcpu, ctx: &LoopContext) -> Option<VcpuState> {
    let cpu = vcpu.id();
    let (devices, mmio, events) = (&ctx.devices, &ctx.mmio, &ctx.events);
    let report = |reason| {
        let _ = events.send(VmEvent::Stop(reason));
        None
    };
    while !ctx.stop.load(Ordering::SeqCst) {
        if ctx.pause.load(Ordering::SeqCst) {
            let msrs = ctx.msr_indices.as_ref().map(|m| m.as_slice());
            vcpu.complete_pending_io();
            return match vcpu.save_state(msrs.unwrap_or_default()) {
                Ok(state) => Some(state),
                Err(e) => report(StopReason::VcpuFailed {
                    cpu,
                    detail: format!("saving its state: {e}"),
                }),
            };
        }
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
    None
}
