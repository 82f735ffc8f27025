//! The devices' [`InterruptLines`] on top of the mode's irqchip backend,
//! counting every raise for the statistics.

use crate::devices::InterruptLines;
use crate::stats::RaiseCounters;
use std::sync::Arc;
use virq_kvm::IrqchipBackend;

/// Raises lines through the irqchip backend of the running mode.
pub struct BackendLines {
    backend: Arc<dyn IrqchipBackend>,
    counts: Arc<RaiseCounters>,
}

impl BackendLines {
    /// Lines into `backend`, counted in `counts`.
    pub fn new(backend: Arc<dyn IrqchipBackend>, counts: Arc<RaiseCounters>) -> Self {
        BackendLines { backend, counts }
    }
}

impl InterruptLines for BackendLines {
    fn set_gsi(&self, gsi: u32, level: bool) {
        if level {
            self.counts.count_gsi(gsi);
        }
        if let Err(e) = self.backend.set_gsi(gsi, level) {
            // A device must not fail because of the host; the guest simply
            // misses the interrupt and its own checks report it.
            tracing::warn!(gsi, level, "raising a line failed: {e}");
        }
    }

    fn send_msi(&self, address: u64, data: u32) {
        self.counts.count_msi();
        if let Err(e) = self.backend.send_msi(address, data) {
            tracing::warn!(address, data, "sending an MSI failed: {e}");
        }
    }
}
