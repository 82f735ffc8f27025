//! KVM backend for virq: VM and vCPU setup, the per-vCPU run loop on its own
//! host thread, the vCPU kick, and one [`IrqchipBackend`] per irqchip mode.
//!
//! Layout:
//! - [`vm`]: the VM file descriptor, guest memory slots, TSS/identity map;
//! - [`vcpu`]: vCPU creation, CPUID with per-vCPU APIC IDs, boot register state;
//! - [`kick`]: forcing a vCPU out of `KVM_RUN` (immediate_exit + signal);
//! - [`irqchip`]: the mode-specific interrupt hooks (`kernel` now, `split` and
//!   `userspace` plug in through the same trait);
//! - [`machine`]: one thread per vCPU, exit dispatch to the VMM through
//!   [`ExitHandler`], stop-all and timeout;
//! - [`sources`]: eventfd interrupt sources (edge, MSI, level with
//!   resample) and doorbells for device threads;
//! - [`stats`]: per-vCPU exit counters;
//! - [`kvm_stats`]: KVM's own per-vCPU statistics (`KVM_GET_STATS_FD`);
//! - [`cpu_time`]: host CPU time of this process and of reaped children.
#![deny(missing_docs)]

pub mod cpu_time;
pub mod irqchip;
pub mod kick;
pub mod kvm_stats;
pub mod machine;
pub mod sources;
pub mod state;
pub mod stats;
pub mod vcpu;
pub mod vm;

pub use irqchip::{IrqchipBackend, IrqchipMode};
pub use kvm_stats::{KvmExits, VcpuStats};
pub use machine::{ExitAction, ExitHandler, Machine, RunOutcome, StopCause, VcpuReport, VcpuStop};
pub use stats::{ExitCounters, ExitCounts};
pub use vcpu::Vcpu;
pub use vm::Vm;

/// Errors from host calls into KVM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed; the string names it.
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// A guest memory region could not be registered.
    #[error("guest memory region at {addr:#x} is not usable: {reason}")]
    Memory {
        /// Guest physical start of the region.
        addr: u64,
        /// Why.
        reason: String,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The second mapping of `kvm_run` used by the kick failed.
    #[error("cannot map kvm_run for the vCPU kick: {0}")]
    MapRun(#[source] std::io::Error),
    /// KVM's statistics file could not be read.
    #[error("cannot read KVM statistics: {0}")]
    StatsIo(#[source] std::io::Error),
    /// KVM's statistics file does not look as documented.
    #[error("unexpected KVM statistics layout: {0}")]
    StatsFormat(String),
    /// A vCPU host thread could not be started.
    #[error("cannot start vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// Our chipset model refused its configuration.
    #[error("irqchip model: {0}")]
    Chipset(#[from] virq::chipset::ChipsetError),
    /// The irqchip mode cannot do what was asked.
    #[error("not supported in this irqchip mode: {0}")]
    Unsupported(&'static str),
    /// The requested vCPU count is not supported.
    #[error("{requested} vCPUs requested, KVM supports at most {max}")]
    TooManyVcpus {
        /// Requested count.
        requested: u32,
        /// KVM's limit.
        max: u32,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand to wrap a kvm-ioctls error with the ioctl's name.
pub(crate) fn ioctl_err(name: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Ioctl(name, e)
}

#[cfg(test)]
pub(crate) mod testutil;
