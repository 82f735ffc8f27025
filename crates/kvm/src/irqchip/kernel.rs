//! KVM's in-kernel irqchip: PIC pair, IOAPIC, PIT and one LAPIC per vCPU,
//! all inside KVM. The reference the other modes are measured against.

use super::{HltAction, IrqchipBackend, VcpuCtx};
use crate::sources::{IrqfdBinding, SourceAction};
use crate::vcpu::Vcpu;
use crate::vm::Vm;
use crate::{ioctl_err, Result};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, kvm_msi, kvm_pit_config, KvmIrqRouting, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;
use std::sync::{Arc, Mutex, OnceLock};
use virq::msi::MsiMessage;

/// Number of IOAPIC pins of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;

/// The in-kernel irqchip backend.
pub struct KernelIrqchip {
    vm: Arc<VmFd>,
    /// Set once the chip exists, so raising before setup is a no-op, not an error.
    ready: OnceLock<()>,
    /// MSI routes added for MSI sources, at GSIs from [`FIRST_MSI_GSI`].
    msi_routes: Mutex<Vec<kvm_irq_routing_entry>>,
}

/// First GSI given to an MSI source's route (above every IOAPIC pin).
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;

impl KernelIrqchip {
    /// A backend for `vm` (call [`IrqchipBackend::setup_vm`] before vCPUs).
    pub fn new(vm: Arc<VmFd>) -> Self {
        KernelIrqchip {
            vm,
            ready: OnceLock::new(),
            msi_routes: Mutex::new(Vec::new()),
        }
    }
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        flags: 0,
        pad: 0,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
    }
}

/// The GSI table of a PC as QEMU wires it: GSI 0 (the PIT) goes to PIC
/// master pin 0 and IOAPIC pin 2 (the firmware tables carry the matching
/// interrupt source override IRQ 0 -> GSI 2); GSI 2 has no route at all (it
/// is the PIC cascade); other GSIs 0-15 go to the PIC and IOAPIC pin = GSI;
/// 16-23 to the IOAPIC only.
pub fn kernel_gsi_routing() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::new();
    for gsi in 0..16 {
        if gsi == 2 {
            continue;
        }
        let (chip, pin) = if gsi < 8 {
            (KVM_IRQCHIP_PIC_MASTER, gsi)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
        };
        routes.push(irqchip_route(gsi, chip, pin));
    }
    for gsi in 0..IOAPIC_PINS {
        match gsi {
            0 => routes.push(irqchip_route(0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            _ => routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi)),
        }
    }
    routes
}

impl KernelIrqchip {
    /// Installs the PC table plus `msi` routes (a routing update replaces the whole table).
    fn set_routing(&self, msi: &[kvm_irq_routing_entry]) -> Result<()> {
        let mut entries = kernel_gsi_routing();
        entries.extend_from_slice(msi);
        let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| {
            crate::Error::Ioctl("KVM_SET_GSI_ROUTING", kvm_ioctls::Error::new(libc::E2BIG))
        })?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(ioctl_err("KVM_SET_GSI_ROUTING"))
    }

    /// A GSI whose only route is this MSI, for an irqfd: the lowest one
    /// from [`FIRST_MSI_GSI`] that no other MSI source holds.
    fn add_msi_route(&self, address: u64, data: u32) -> Result<u32> {
        // KVM would deliver whatever the route says; refuse what the other
        // modes drop, as send_msi does.
        let Some(msi) = signalled_msi(address, data) else {
            return Err(crate::Error::Unsupported(
                "an MSI source with an address the MSI decoder rejects",
            ));
        };
        let mut routes = self.msi_routes.lock().unwrap_or_else(|e| e.into_inner());
        let gsi = (FIRST_MSI_GSI..)
            .find(|g| routes.iter().all(|r| r.gsi != *g))
            .unwrap_or(FIRST_MSI_GSI);
        routes.push(kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            flags: 0,
            pad: 0,
            u: kvm_irq_routing_entry__bindgen_ty_1 {
                msi: kvm_irq_routing_msi {
                    address_lo: msi.address_lo,
                    address_hi: msi.address_hi,
                    data: msi.data,
                    ..Default::default()
                },
            },
        });
        if let Err(e) = self.set_routing(&routes) {
            routes.pop();
            return Err(e);
        }
        Ok(gsi)
    }

    /// Frees an MSI source's GSI.
    fn remove_msi_route(&self, gsi: u32) -> Result<()> {
        let mut routes = self.msi_routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.retain(|r| r.gsi != gsi);
        self.set_routing(&routes)
    }
}

impl IrqchipBackend for KernelIrqchip {
    fn name(&self) -> &'static str {
        "kernel"
    }

    fn setup_vm(&self, _vm: &Vm) -> Result<()> {
        self.vm
            .create_irq_chip()
            .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            // Port 0x61 is emulated in the kernel too.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.vm
            .create_pit2(pit)
            .map_err(ioctl_err("KVM_CREATE_PIT2"))?;
        self.set_routing(&[])?;
        let _ = self.ready.set(());
        Ok(())
    }

    fn setup_vcpu(&self, vcpu: &Vcpu, boot: bool) -> Result<()> {
        super::virtual_wire::setup_kvm_lapic(vcpu, boot)?;
        // APs wait for INIT/SIPI, which KVM's LAPIC handles.
        let mp_state = if boot {
            KVM_MP_STATE_RUNNABLE
        } else {
            KVM_MP_STATE_UNINITIALIZED
        };
        vcpu.fd()
            .set_mp_state(kvm_bindings::kvm_mp_state { mp_state })
            .map_err(ioctl_err("KVM_SET_MP_STATE"))
    }

    fn on_hlt(&self, _vcpu: &mut VcpuCtx<'_>) -> HltAction {
        // KVM's LAPIC handles HLT in the kernel; should one still reach us,
        // entering again makes KVM wait for the interrupt.
        HltAction::Resume
    }

    fn set_gsi(&self, gsi: u32, level: bool) -> Result<()> {
        if self.ready.get().is_none() {
            return Ok(());
        }
        self.vm
            .set_irq_line(gsi, level)
            .map_err(ioctl_err("KVM_IRQ_LINE"))
    }

    fn bind_irqfd(&self, binding: &IrqfdBinding<'_>) -> Result<Option<u32>> {
        let gsi = match (binding.action, binding.resample) {
            (SourceAction::Edge { gsi, .. }, _) => {
                self.vm
                    .register_irqfd(binding.trigger, gsi)
                    .map_err(ioctl_err("KVM_IRQFD"))?;
                gsi
            }
            (SourceAction::Level { gsi, .. }, Some(resample)) => {
                self.vm
                    .register_irqfd_with_resample(binding.trigger, resample, gsi)
                    .map_err(ioctl_err("KVM_IRQFD(RESAMPLE)"))?;
                gsi
            }
            (SourceAction::Level { .. }, None) => {
                return Err(crate::Error::Unsupported(
                    "a level source needs a resample eventfd",
                ))
            }
            (SourceAction::Msi { address, data }, _) => {
                let gsi = self.add_msi_route(address, data)?;
                if let Err(e) = self.vm.register_irqfd(binding.trigger, gsi) {
                    let _ = self.remove_msi_route(gsi);
                    return Err(ioctl_err("KVM_IRQFD")(e));
                }
                gsi
            }
        };
        Ok(Some(gsi))
    }

    fn unbind_irqfd(&self, binding: &IrqfdBinding<'_>, gsi: u32) -> Result<()> {
        self.vm
            .unregister_irqfd(binding.trigger, gsi)
            .map_err(ioctl_err("KVM_IRQFD(DEASSIGN)"))?;
        if matches!(binding.action, SourceAction::Msi { .. }) {
            self.remove_msi_route(gsi)?;
        }
        Ok(())
    }

    fn send_msi(&self, address: u64, data: u32) -> Result<()> {
        let Some(msi) = signalled_msi(address, data) else {
            return Ok(());
        };
        // 0 means the interrupt was blocked (e.g. masked LAPIC), which is
        // the guest's business, not an error.
        self.vm
            .signal_msi(msi)
            .map(|_| ())
            .map_err(ioctl_err("KVM_SIGNAL_MSI"))
    }
}

/// The `KVM_SIGNAL_MSI` argument for a device's MSI write, or `None` if
/// virq's decoder rejects the message: KVM signals any address it is given,
/// a remappable-format one (bit 4, an IOMMU handle, and there is no IOMMU)
/// or one outside 0xFEEx_xxxx included, which the other modes drop.
fn signalled_msi(address: u64, data: u32) -> Option<kvm_msi> {
    if let Err(e) = (MsiMessage { address, data }).decode() {
        tracing::debug!("MSI dropped: {e}");
        return None;
    }
    Some(kvm_msi {
        address_lo: address as u32,
        address_hi: (address >> 32) as u32,
        data,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes_of(gsi: u32) -> Vec<(u32, u32)> {
        kernel_gsi_routing()
            .iter()
            .filter(|e| e.gsi == gsi)
            // SAFETY: every entry built by kernel_gsi_routing is an irqchip route.
            .map(|e| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .collect()
    }

    #[test]
    fn remappable_or_non_interrupt_msi_is_not_signalled() {
        assert!(signalled_msi(0xFEE0_0010, 0x40).is_none());
        assert!(signalled_msi(0xFED0_0000, 0x40).is_none());
        assert!(signalled_msi(0x1_FEE0_0000, 0x40).is_none());
    }

    #[test]
    fn interrupt_msi_is_signalled_unchanged() {
        let m = signalled_msi(0xFEE0_100C, 0xC041).expect("an interrupt MSI");
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xFEE0_100C, 0, 0xC041)
        );
    }

    #[test]
    fn gsi0_goes_to_pic_pin0_and_ioapic_pin2() {
        assert_eq!(
            routes_of(0),
            vec![(KVM_IRQCHIP_PIC_MASTER, 0), (KVM_IRQCHIP_IOAPIC, 2)]
        );
    }

    #[test]
    fn gsi2_has_no_route() {
        assert!(routes_of(2).is_empty());
    }

    #[test]
    fn isa_gsis_go_to_pic_and_same_ioapic_pin() {
        assert_eq!(
            routes_of(4),
            vec![(KVM_IRQCHIP_PIC_MASTER, 4), (KVM_IRQCHIP_IOAPIC, 4)]
        );
        assert_eq!(
            routes_of(9),
            vec![(KVM_IRQCHIP_PIC_SLAVE, 1), (KVM_IRQCHIP_IOAPIC, 9)]
        );
    }

    #[test]
    fn pci_gsis_go_to_ioapic_only() {
        for gsi in 16..24 {
            assert_eq!(routes_of(gsi), vec![(KVM_IRQCHIP_IOAPIC, gsi)]);
        }
        assert!(routes_of(24).is_empty());
    }
}
