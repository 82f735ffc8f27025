//! Port and MMIO exits, handed to the platform devices.

use crate::devices::{PioAction, PioBus};
use virq_kvm::{ExitAction, ExitHandler};

/// The VMM side of the run loop: the port bus; unbacked memory reads as all
/// ones and ignores writes (there is no MMIO device of ours yet).
pub struct PlatformExits {
    bus: PioBus,
}

impl PlatformExits {
    /// Exits go to `bus`.
    pub fn new(bus: PioBus) -> Self {
        PlatformExits { bus }
    }

    /// The bus (for its console log and counters).
    pub fn bus(&self) -> &PioBus {
        &self.bus
    }
}

impl ExitHandler for PlatformExits {
    fn pio_read(&self, _vcpu: u32, port: u16, data: &mut [u8]) {
        // Unclaimed ports read as all ones inside the bus.
        self.bus.read(port, data);
    }

    fn pio_write(&self, _vcpu: u32, port: u16, data: &[u8]) -> ExitAction {
        match self.bus.write(port, data).1 {
            PioAction::None => ExitAction::Continue,
            PioAction::Exit(status) => ExitAction::GuestExit(status),
        }
    }

    fn mmio_read(&self, vcpu: u32, addr: u64, data: &mut [u8]) {
        tracing::debug!(vcpu, addr, len = data.len(), "read of unbacked memory");
        data.fill(0xFF);
    }

    fn mmio_write(&self, vcpu: u32, addr: u64, data: &[u8]) -> ExitAction {
        tracing::debug!(vcpu, addr, len = data.len(), "write to unbacked memory");
        ExitAction::Continue
    }
}
