//! The legacy port-I/O devices a PC kernel expects: the 8250 UART at COM1 (the
//! console) and the i8042, whose reset command is how the guest stops the VM.
//!
//! Both devices come from vm-superio; this module routes ports to them and wires
//! their triggers to an irqfd and to the VM's event channel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::console::ConsoleSink;
use crate::events::{StopReason, VmEvent};

/// COM1 base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
const COM_PORT_COUNT: u16 = 8;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_COMMAND: u16 = 0x64;

/// Raises an interrupt by writing to an eventfd registered as a KVM irqfd.
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Turns the i8042 reset command into a stop of the VM.
pub struct ResetTrigger {
    events: Sender<VmEvent>,
    panicked: Arc<AtomicBool>,
}

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        // A reset right after a panic message is the panic=-1 reboot, not a clean stop.
        let reason = if self.panicked.load(Ordering::SeqCst) {
            StopReason::GuestPanic
        } else {
            StopReason::GuestReset
        };
        // The receiver only goes away when the VM is already stopping.
        let _ = self.events.send(VmEvent::Stop(reason));
        Ok(())
    }
}

/// The UART's registers in a snapshot (vm-superio's `SerialState`, which has
/// no serde of its own).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialSnapshot {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The port-I/O bus: COM1 and the i8042; other ports read as 0xff (no device).
pub struct LegacyDevices {
    serial: Mutex<Serial<IrqFdTrigger, NoEvents, ConsoleSink>>,
    i8042: Mutex<I8042Device<ResetTrigger>>,
}

impl LegacyDevices {
    /// Wires the console to `serial_irq` and the i8042 reset to `events`; the
    /// UART starts in `serial` (a snapshot's) if given, else at power-on.
    pub fn new(
        console: ConsoleSink,
        serial_irq: EventFd,
        events: Sender<VmEvent>,
        serial: Option<&SerialSnapshot>,
    ) -> Result<Self, String> {
        let panicked = console.panicked();
        let trigger = IrqFdTrigger(serial_irq);
        let serial = match serial {
            Some(state) => Serial::from_state(&state.into(), trigger, NoEvents, console)
                .map_err(|e| format!("the snapshot's serial port state: {e:?}"))?,
            None => Serial::new(trigger, console),
        };
        Ok(LegacyDevices {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042Device::new(ResetTrigger { events, panicked })),
        })
    }

    /// The UART's registers, for a snapshot.
    pub fn serial_state(&self) -> SerialSnapshot {
        self.serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .state()
            .into()
    }

    /// Handles an `in` from the guest.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (COM1_BASE..COM1_BASE + COM_PORT_COUNT).contains(&p) && data.len() == 1 => self
                .serial
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read((p - COM1_BASE) as u8),
            I8042_DATA | I8042_COMMAND if data.len() == 1 => self
                .i8042
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read((port - I8042_DATA) as u8),
            _ => 0xff,
        };
        data.fill(value);
    }

    /// Handles an `out` from the guest.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let [value] = data else { return };
        match port {
            p if (COM1_BASE..COM1_BASE + COM_PORT_COUNT).contains(&p) => {
                let result = self
                    .serial
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write((p - COM1_BASE) as u8, *value);
                if let Err(e) = result {
                    tracing::warn!("serial write failed: {e:?}");
                }
            }
            I8042_DATA | I8042_COMMAND => {
                let _ = self
                    .i8042
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write((port - I8042_DATA) as u8, *value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    fn devices() -> (LegacyDevices, std::sync::mpsc::Receiver<VmEvent>) {
        let (tx, rx) = channel();
        let sink = ConsoleSink::new(None, None, tx.clone());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (LegacyDevices::new(sink, irq, tx, None).unwrap(), rx)
    }

    #[test]
    fn i8042_reset_stops_the_vm_cleanly() {
        let (d, rx) = devices();
        d.pio_write(I8042_COMMAND, &[0xfe]);
        assert!(matches!(
            rx.try_recv(),
            Ok(VmEvent::Stop(StopReason::GuestReset))
        ));
    }

    #[test]
    fn unknown_ports_float_high() {
        let (d, _rx) = devices();
        let mut b = [0u8; 2];
        d.pio_read(0x2f8, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    /// The guest controls every port, value and access size: random sequences
    /// must never panic, and the console tail must stay bounded.
    #[test]
    fn random_port_io_is_harmless() {
        let (tx, _rx) = channel();
        let sink = ConsoleSink::new(None, Some("marker"), tx.clone());
        let tail = sink.tail();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = LegacyDevices::new(sink, irq, tx, None).unwrap();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            // xorshift64: deterministic, so a failure reproduces.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let ports = [
            COM1_BASE,
            COM1_BASE + 3,
            COM1_BASE + 5,
            COM1_BASE + 7,
            I8042_DATA,
            I8042_COMMAND,
            0x80,
            0xffff,
        ];
        for _ in 0..200_000 {
            let r = next();
            let port = if r & 1 == 0 {
                ports[(r >> 1) as usize % ports.len()]
            } else {
                (r >> 8) as u16
            };
            let len = [1usize, 2, 4, 0, 3][(r >> 24) as usize % 5];
            let mut buf = vec![(r >> 32) as u8; len];
            if r & 2 == 0 {
                d.pio_read(port, &mut buf);
            } else {
                d.pio_write(port, &buf);
            }
        }
        assert!(super::super::console::tail_text(&tail).len() <= 20 * 513);
    }

    #[test]
    fn serial_bytes_reach_the_console_tail() {
        let (tx, _rx) = channel();
        let sink = ConsoleSink::new(None, None, tx.clone());
        let tail = sink.tail();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = LegacyDevices::new(sink, irq, tx, None).unwrap();
        for b in b"hi\n" {
            d.pio_write(COM1_BASE, &[*b]);
        }
        assert_eq!(super::super::console::tail_text(&tail), "hi");
    }
}
