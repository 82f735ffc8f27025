//! Per-vCPU VM exit counters.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why `KVM_RUN` returned, grouped the way the statistics report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// Port I/O.
    Io,
    /// Memory-mapped I/O.
    Mmio,
    /// HLT reached userspace.
    Hlt,
    /// Interrupt window opened.
    IrqWindow,
    /// Triple fault / shutdown.
    Shutdown,
    /// Interrupted by a signal or `immediate_exit` (a kick).
    Intr,
    /// RDMSR/WRMSR handed to userspace.
    Msr,
    /// EOI of a level-triggered vector for a userspace IOAPIC.
    IoapicEoi,
    /// Anything else.
    Other,
}

/// Live exit counters of one vCPU, updated by its thread and readable from any.
#[derive(Debug, Default)]
pub struct ExitCounters {
    io: AtomicU64,
    mmio: AtomicU64,
    hlt: AtomicU64,
    irq_window: AtomicU64,
    shutdown: AtomicU64,
    intr: AtomicU64,
    msr: AtomicU64,
    ioapic_eoi: AtomicU64,
    other: AtomicU64,
}

impl ExitCounters {
    /// Counts one exit.
    pub fn count(&self, reason: ExitReason) {
        let c = match reason {
            ExitReason::Io => &self.io,
            ExitReason::Mmio => &self.mmio,
            ExitReason::Hlt => &self.hlt,
            ExitReason::IrqWindow => &self.irq_window,
            ExitReason::Shutdown => &self.shutdown,
            ExitReason::Intr => &self.intr,
            ExitReason::Msr => &self.msr,
            ExitReason::IoapicEoi => &self.ioapic_eoi,
            ExitReason::Other => &self.other,
        };
        c.fetch_add(1, Relaxed);
    }

    /// A plain copy of the counters.
    pub fn snapshot(&self) -> ExitCounts {
        ExitCounts {
            io: self.io.load(Relaxed),
            mmio: self.mmio.load(Relaxed),
            hlt: self.hlt.load(Relaxed),
            irq_window: self.irq_window.load(Relaxed),
            shutdown: self.shutdown.load(Relaxed),
            intr: self.intr.load(Relaxed),
            msr: self.msr.load(Relaxed),
            ioapic_eoi: self.ioapic_eoi.load(Relaxed),
            other: self.other.load(Relaxed),
        }
    }
}

/// VM exits by reason, as plain data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    /// Port I/O exits.
    pub io: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// HLT exits.
    pub hlt: u64,
    /// Interrupt-window exits.
    pub irq_window: u64,
    /// Shutdown (triple fault) exits.
    pub shutdown: u64,
    /// Signal / immediate_exit returns.
    pub intr: u64,
    /// MSR exits.
    pub msr: u64,
    /// IOAPIC EOI exits.
    pub ioapic_eoi: u64,
    /// Other exits.
    pub other: u64,
}

impl ExitCounts {
    /// Sum of all reasons.
    pub fn total(&self) -> u64 {
        self.io
            + self.mmio
            + self.hlt
            + self.irq_window
            + self.shutdown
            + self.intr
            + self.msr
            + self.ioapic_eoi
            + self.other
    }

    /// Adds another vCPU's counts to these.
    pub fn add(&mut self, o: &ExitCounts) {
        self.io += o.io;
        self.mmio += o.mmio;
        self.hlt += o.hlt;
        self.irq_window += o.irq_window;
        self.shutdown += o.shutdown;
        self.intr += o.intr;
        self.msr += o.msr;
        self.ioapic_eoi += o.ioapic_eoi;
        self.other += o.other;
    }

    /// `(name, count)` pairs in report order.
    pub fn named(&self) -> [(&'static str, u64); 9] {
        [
            ("io", self.io),
            ("mmio", self.mmio),
            ("hlt", self.hlt),
            ("irq_window", self.irq_window),
            ("shutdown", self.shutdown),
            ("intr", self.intr),
            ("msr", self.msr),
            ("ioapic_eoi", self.ioapic_eoi),
            ("other", self.other),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_snapshot_and_sum() {
        let c = ExitCounters::default();
        c.count(ExitReason::Io);
        c.count(ExitReason::Io);
        c.count(ExitReason::Intr);
        let s = c.snapshot();
        assert_eq!(s.io, 2);
        assert_eq!(s.intr, 1);
        assert_eq!(s.total(), 3);
        let mut t = ExitCounts::default();
        t.add(&s);
        t.add(&s);
        assert_eq!(t.io, 4);
    }
}
