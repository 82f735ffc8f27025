//! Mode-specific interrupt hooks: what differs between KVM's in-kernel
//! irqchip, the split irqchip and a fully userspace one.
//!
//! The run loop in [`crate::machine`] calls these hooks at fixed points:
//! - [`IrqchipBackend::setup_vm`] once, before any vCPU exists;
//! - [`IrqchipBackend::setup_vcpu`] once per vCPU, before threads start;
//! - [`IrqchipBackend::before_entry`] before every `KVM_RUN` (inject a
//!   pending vector, or request an interrupt window);
//! - [`IrqchipBackend::after_exit`] after every `KVM_RUN`, before the exit
//!   is handled (take in what the exit reports, e.g. a CR8 the guest wrote);
//! - the `on_*` hooks for the exits only some modes see (HLT, interrupt
//!   window, IOAPIC EOI), and the MMIO/MSR hooks that get the first look at
//!   those exits (userspace LAPIC at 0xFEE00000 / x2APIC MSRs);
//! - [`IrqchipBackend::set_gsi`] / [`IrqchipBackend::send_msi`] from device
//!   threads, and [`IrqchipBackend::wake`] when a vCPU must stop waiting.

mod host;
mod kernel;
mod none;
mod split;
mod userspace;
mod virtual_wire;

pub use host::DEFAULT_HALT_POLL;
pub use kernel::{kernel_gsi_routing, KernelIrqchip};
pub use none::NoIrqchip;
pub use split::SplitIrqchip;
pub use userspace::UserspaceIrqchip;

use crate::kick::VcpuKick;
use crate::sources::IrqfdBinding;
use crate::vcpu::Vcpu;
use crate::vm::Vm;
use crate::{ioctl_err, Result};
use kvm_ioctls::VcpuFd;
use std::sync::Arc;
use virq::routing::SourceId;
use virq::RaiseGp;
use vmm_sys_util::eventfd::EventFd;

/// Which interrupt controller implementation the VM uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqchipMode {
    /// KVM's PIC, IOAPIC, PIT and LAPIC.
    Kernel,
    /// KVM's LAPIC; our PIC, IOAPIC and PIT.
    Split,
    /// Everything ours.
    Userspace,
}

impl IrqchipMode {
    /// All modes, in report order.
    pub const ALL: [IrqchipMode; 3] = [Self::Kernel, Self::Split, Self::Userspace];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Split => "split",
            Self::Userspace => "userspace",
        }
    }
}

/// What the run loop does after a HLT exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HltAction {
    /// Enter the guest again (an interrupt is ready, or a stop will be seen).
    Resume,
    /// The vCPU can never wake again: end its loop.
    Stop,
}

/// The view of a vCPU its backend hooks get on the vCPU's own thread.
pub struct VcpuCtx<'a> {
    pub(crate) vcpu: &'a mut Vcpu,
}

impl VcpuCtx<'_> {
    /// vCPU index (= APIC ID).
    pub fn index(&self) -> u32 {
        self.vcpu.index()
    }

    /// The vCPU fd (state ioctls).
    pub fn fd(&self) -> &VcpuFd {
        &self.vcpu.fd
    }

    /// The vCPU's kick handle (its stop flag lives there too).
    pub fn kick(&self) -> &VcpuKick {
        self.vcpu.kick()
    }

    /// `kvm_run.ready_for_interrupt_injection` from the last exit.
    pub fn ready_for_injection(&mut self) -> bool {
        self.vcpu.fd.get_kvm_run().ready_for_interrupt_injection != 0
    }

    /// `kvm_run.if_flag` from the last exit.
    pub fn if_flag(&mut self) -> bool {
        self.vcpu.fd.get_kvm_run().if_flag != 0
    }

    /// Sets `kvm_run.request_interrupt_window` for the next entry.
    pub fn request_interrupt_window(&mut self, on: bool) {
        self.vcpu.fd.get_kvm_run().request_interrupt_window = u8::from(on);
    }

    /// Queues external interrupt `vector` for the next entry (`KVM_INTERRUPT`;
    /// only valid without an in-kernel LAPIC and when ready for injection).
    pub fn inject_interrupt(&self, vector: u8) -> Result<()> {
        inject_interrupt(&self.vcpu.fd, vector)
    }

    /// Queues an NMI (`KVM_NMI`); KVM delivers it when NMIs are unblocked.
    pub fn inject_nmi(&self) -> Result<()> {
        self.vcpu.fd.nmi().map_err(ioctl_err("KVM_NMI"))
    }

    /// `kvm_run.cr8` as KVM left it at the last exit (the guest's TPR[7:4]).
    pub fn cr8(&mut self) -> u8 {
        (self.vcpu.fd.get_kvm_run().cr8 & 0xF) as u8
    }

    /// Sets `kvm_run.cr8`, which KVM loads into CR8 on the next entry when
    /// the LAPIC is not in the kernel.
    pub fn set_cr8(&mut self, cr8: u8) {
        self.vcpu.fd.get_kvm_run().cr8 = u64::from(cr8 & 0xF);
    }
}

mod ioctls {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_iow_nr!(
        KVM_INTERRUPT,
        kvm_bindings::KVMIO,
        0x86,
        kvm_bindings::kvm_interrupt
    );
}
use ioctls::KVM_INTERRUPT;

/// `KVM_INTERRUPT`, which kvm-ioctls does not wrap.
pub fn inject_interrupt(fd: &VcpuFd, vector: u8) -> Result<()> {
    let irq = kvm_bindings::kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: `fd` is a vCPU fd and `irq` is a properly sized kvm_interrupt
    // that the kernel only reads.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, KVM_INTERRUPT(), &irq) };
    if ret == 0 {
        Ok(())
    } else {
        Err(ioctl_err("KVM_INTERRUPT")(kvm_ioctls::Error::last()))
    }
}

/// The interrupt controller side of a VM, one implementation per mode.
pub trait IrqchipBackend: Send + Sync {
    /// Mode name for logs and reports.
    fn name(&self) -> &'static str;

    /// Creates VM-wide interrupt state; runs before any vCPU exists.
    fn setup_vm(&self, vm: &Vm) -> Result<()>;

    /// Prepares one vCPU (LAPIC LVTs, MP state); `boot` is the BSP.
    fn setup_vcpu(&self, vcpu: &Vcpu, boot: bool) -> Result<()>;

    /// Runs before every `KVM_RUN`: inject what is pending or ask for a window.
    fn before_entry(&self, _vcpu: &mut VcpuCtx<'_>) -> Result<()> {
        Ok(())
    }

    /// Runs after every `KVM_RUN`, before the exit is dispatched to the
    /// other hooks.
    fn after_exit(&self, _vcpu: &mut VcpuCtx<'_>) {}

    /// A HLT reached userspace (only without an in-kernel LAPIC). May block
    /// until an interrupt arrives or [`IrqchipBackend::wake`] is called.
    fn on_hlt(&self, vcpu: &mut VcpuCtx<'_>) -> HltAction;

    /// The interrupt window the backend asked for is open.
    fn on_irq_window(&self, _vcpu: &mut VcpuCtx<'_>) {}

    /// `KVM_EXIT_IOAPIC_EOI`: the in-kernel LAPIC ended a vector routed
    /// through a userspace IOAPIC.
    fn on_ioapic_eoi(&self, _vcpu: &mut VcpuCtx<'_>, _vector: u8) {}

    /// First look at a port read (our PIC, ELCR and PIT); `true` if handled.
    fn pio_read(&self, _vcpu: u32, _port: u16, _data: &mut [u8]) -> bool {
        false
    }

    /// First look at a port write; `true` if the backend handled it.
    fn pio_write(&self, _vcpu: u32, _port: u16, _data: &[u8]) -> bool {
        false
    }

    /// First look at an MMIO read; `true` if the backend handled it.
    fn mmio_read(&self, _vcpu: u32, _addr: u64, _data: &mut [u8]) -> bool {
        false
    }

    /// First look at an MMIO write; `true` if the backend handled it.
    fn mmio_write(&self, _vcpu: u32, _addr: u64, _data: &[u8]) -> bool {
        false
    }

    /// RDMSR exit; `None` if the backend does not own this MSR.
    fn msr_read(&self, _vcpu: u32, _index: u32) -> Option<std::result::Result<u64, RaiseGp>> {
        None
    }

    /// WRMSR exit; `None` if the backend does not own this MSR.
    fn msr_write(
        &self,
        _vcpu: u32,
        _index: u32,
        _value: u64,
    ) -> Option<std::result::Result<(), RaiseGp>> {
        None
    }

    /// Sets the level of GSI `gsi` (edge sources pulse it).
    fn set_gsi(&self, gsi: u32, level: bool) -> Result<()>;

    /// Delivers one MSI write.
    fn send_msi(&self, address: u64, data: u32) -> Result<()>;

    /// Sets `gsi`'s level as seen from line source `source` (device sources
    /// sharing a line each have their own). Modes whose lines KVM owns
    /// ignore the source: KVM's own irqfds keep their sources apart.
    fn set_gsi_from(&self, gsi: u32, _source: SourceId, level: bool) -> Result<()> {
        self.set_gsi(gsi, level)
    }

    /// Lets KVM serve an interrupt source itself (`KVM_IRQFD`): `Ok(Some(gsi))`
    /// with the GSI it is bound to, `Ok(None)` when this mode serves it in
    /// userspace instead.
    fn bind_irqfd(&self, _binding: &IrqfdBinding<'_>) -> Result<Option<u32>> {
        Ok(None)
    }

    /// Undoes a [`IrqchipBackend::bind_irqfd`] that returned `gsi`.
    fn unbind_irqfd(&self, _binding: &IrqfdBinding<'_>, _gsi: u32) -> Result<()> {
        Ok(())
    }

    /// Makes `source` on `gsi` a resampled level source: the chipset lowers
    /// it when the guest acknowledges the GSI and then writes `resample`.
    fn watch_resample(&self, _gsi: u32, _source: SourceId, _resample: Arc<EventFd>) -> Result<()> {
        Err(crate::Error::Unsupported(
            "level sources with resample need an interrupt controller",
        ))
    }

    /// Undoes [`IrqchipBackend::watch_resample`] and lowers the source.
    fn unwatch_resample(&self, _gsi: u32, _source: SourceId) {}

    /// Wakes vCPU `vcpu` if it waits inside [`IrqchipBackend::on_hlt`].
    fn wake(&self, _vcpu: u32) {}

    /// The run is over and every vCPU thread has ended: stop helper threads
    /// (host timers). Called once by [`crate::Machine::run`].
    fn shutdown(&self) {}
}
