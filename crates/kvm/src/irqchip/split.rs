//! KVM's split irqchip: KVM's LAPICs, our PIC, IOAPIC and PIT.
//!
//! - IOAPIC output and device MSIs become APIC bus messages in our chipset,
//!   which leave through `KVM_SIGNAL_MSI` (with `KVM_CAP_X2APIC_API`, APIC IDs
//!   above 254 travel in the address's high half).
//! - KVM only exits on the EOI of vectors it believes belong to a level
//!   IOAPIC pin, which it learns from MSI routes on GSIs below the reserved
//!   pin count. So every unmasked RTE is mirrored into such a route. The
//!   PIT's pin is mirrored as level-triggered even though it is an edge: its
//!   EOI is how reinjection learns that a tick was taken.
//! - The PIC reaches the BSP as ExtINT through `KVM_INTERRUPT`, when KVM
//!   reports the vCPU ready (KVM checks LINT0 itself), else through an
//!   interrupt-window exit.
//! - KVM advertises EOI-broadcast suppression on its LAPICs here but still
//!   reports every EOI of those vectors, SVR bit 12 or not; so each
//!   `KVM_EXIT_IOAPIC_EOI` looks at the vCPU's SVR before it reaches our
//!   IOAPIC as a broadcast.
//! - INIT/SIPI, HLT and the LAPIC timers are KVM's.

use super::host::ChipHost;
use super::{HltAction, IrqchipBackend, VcpuCtx};
use crate::vcpu::Vcpu;
use crate::vm::Vm;
use crate::{ioctl_err, Error, Result};
use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1,
    kvm_irq_routing_msi, kvm_lapic_state, kvm_msi, KvmIrqRouting, KVM_IRQ_ROUTING_MSI,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED, KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK,
    KVM_X2APIC_API_USE_32BIT_IDS,
};
use kvm_ioctls::{Cap, VmFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virq::chipset::{Chipset, ChipsetConfig, LapicPlacement};
use virq::delivery::{InterruptMessage, TriggerMode};
use virq::inject::Decision;
use virq::ioapic::{IoapicVersion, IOAPIC_PINS};
use virq::msi::MsiMessage;
use virq::pit::LostTickPolicy;
use virq::routing::{Route, SourceId};
use vmm_sys_util::eventfd::EventFd;

/// The split irqchip backend.
pub struct SplitIrqchip {
    vm: Arc<VmFd>,
    host: ChipHost,
    vcpus: usize,
    policy: LostTickPolicy,
    /// KVM_CAP_X2APIC_API is on: destinations above 0xFF go in address_hi.
    x2apic_api: Arc<AtomicBool>,
    /// The IOAPIC generation last mirrored into KVM's routes.
    mirrored: AtomicU64,
    /// Per vCPU: when its LVT0 was last read from KVM's LAPIC, and whether it
    /// was in NMI mode (for the PIT's NMI watchdog, which KVM's LAPIC cannot
    /// tell us about otherwise).
    lvt0: Vec<Mutex<(Option<Instant>, bool)>>,
}

/// How often a running vCPU's LVT0 is read back for the NMI watchdog.
const LVT0_SAMPLE: Duration = Duration::from_millis(10);
/// Offset of LVT0 in the LAPIC page.
const APIC_LVT0: usize = 0x350;

/// Offset of the spurious-interrupt vector register in the LAPIC page.
const APIC_SVR: usize = 0xF0;
/// SVR bit 12: EOIs of level vectors are not broadcast to the IOAPICs.
const SVR_SUPPRESS_EOI_BROADCAST: u32 = 1 << 12;

/// The 32-bit register at `offset` of a KVM LAPIC page.
fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut reg = [0u8; 4];
    for (dst, src) in reg.iter_mut().zip(&lapic.regs[offset..]) {
        *dst = *src as u8;
    }
    u32::from_le_bytes(reg)
}

/// LVT0 unmasked with delivery mode NMI (bits 10:8 = 100b).
fn lvt0_is_nmi(lapic: &kvm_lapic_state) -> bool {
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    lvt0 & (1 << 16) == 0 && (lvt0 >> 8) & 0x7 == 0b100
}

/// Whether the LAPIC page in `lapic` has EOI broadcasts suppressed.
fn suppresses_eoi_broadcast(lapic: &kvm_lapic_state) -> bool {
    lapic_reg(lapic, APIC_SVR) & SVR_SUPPRESS_EOI_BROADCAST != 0
}

/// The MSI that makes KVM's LAPICs deliver `msg`.
fn kvm_msi_for(msg: &InterruptMessage, x2apic_api: bool) -> MsiMessage {
    let mut msi = MsiMessage::encode(msg);
    if x2apic_api && msg.destination > 0xFF {
        // KVM's 32-bit ID form: bits 7:0 in address bits 19:12, bits 31:8 in
        // address_hi; the extended-ID bits 11:5 stay clear.
        let low = (msg.destination & 0xFF) as u64;
        msi.address = (msi.address & !0xF_FFE0 & 0xFFFF_FFFF) | 0xFEE0_0000 | (low << 12);
        msi.address |= u64::from(msg.destination & !0xFF) << 32;
    }
    msi
}

impl SplitIrqchip {
    /// A backend for `vm` with `vcpus` vCPUs and the PIT's lost-tick policy.
    pub fn new(vm: Arc<VmFd>, vcpus: usize, policy: LostTickPolicy) -> Self {
        let x2apic_api = Arc::new(AtomicBool::new(false));
        let sink = {
            let vm = vm.clone();
            let x2apic_api = x2apic_api.clone();
            Box::new(move |msg: &InterruptMessage| {
                let msi = kvm_msi_for(msg, x2apic_api.load(Ordering::Relaxed));
                let raw = kvm_msi {
                    address_lo: msi.address as u32,
                    address_hi: (msi.address >> 32) as u32,
                    data: msi.data,
                    ..Default::default()
                };
                if let Err(e) = vm.signal_msi(raw) {
                    tracing::warn!("KVM_SIGNAL_MSI failed: {e}");
                }
            })
        };
        SplitIrqchip {
            vm,
            host: ChipHost::new(vcpus, Some(sink)),
            vcpus,
            policy,
            x2apic_api,
            mirrored: AtomicU64::new(u64::MAX),
            lvt0: (0..vcpus).map(|_| Mutex::new((None, false))).collect(),
        }
    }

    /// Mirrors the IOAPIC's unmasked RTEs into KVM's MSI routes, so KVM
    /// exits on their EOIs. Cheap when nothing changed.
    fn mirror_routes(&self) -> Result<()> {
        let x2apic_api = self.x2apic_api.load(Ordering::Relaxed);
        let routes = self.host.with_chip(None, false, |chip: &mut Chipset, _| {
            let generation = chip.ioapic().generation();
            if self.mirrored.swap(generation, Ordering::Relaxed) == generation {
                return None;
            }
            // Pins whose EOI must reach us even though they are edges.
            let acked_edges: Vec<u8> = chip
                .routing()
                .routes(0)
                .iter()
                .filter_map(|r| match r {
                    Route::Ioapic { pin } => Some(*pin),
                    _ => None,
                })
                .collect();
            let mut entries = Vec::new();
            for pin in 0..IOAPIC_PINS {
                let Some((mut msg, masked)) = chip.ioapic().entry_message(pin) else {
                    continue;
                };
                if masked {
                    continue;
                }
                if acked_edges.contains(&(pin as u8)) {
                    msg.trigger_mode = TriggerMode::Level;
                }
                let msi = kvm_msi_for(&msg, x2apic_api);
                entries.push(kvm_irq_routing_entry {
                    gsi: pin as u32,
                    type_: KVM_IRQ_ROUTING_MSI,
                    u: kvm_irq_routing_entry__bindgen_ty_1 {
                        msi: kvm_irq_routing_msi {
                            address_lo: msi.address as u32,
                            address_hi: (msi.address >> 32) as u32,
                            data: msi.data,
                            ..Default::default()
                        },
                    },
                    ..Default::default()
                });
            }
            Some(entries)
        });
        let Some(Some(entries)) = routes else {
            return Ok(());
        };
        tracing::trace!(
            routes = entries.len(),
            "mirroring the IOAPIC into KVM's MSI routes"
        );
        let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| {
            Error::Ioctl("KVM_SET_GSI_ROUTING", kvm_ioctls::Error::new(libc::E2BIG))
        })?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(ioctl_err("KVM_SET_GSI_ROUTING"))
    }
}

impl IrqchipBackend for SplitIrqchip {
    fn name(&self) -> &'static str {
        "split"
    }

    fn setup_vm(&self, _vm: &Vm) -> Result<()> {
        let mut split = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        split.args[0] = IOAPIC_PINS as u64;
        self.vm
            .enable_cap(&split)
            .map_err(ioctl_err("KVM_ENABLE_CAP(SPLIT_IRQCHIP)"))?;
        if self.vm.check_extension(Cap::X2ApicApi) {
            let mut api = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_X2APIC_API,
                ..Default::default()
            };
            api.args[0] =
                u64::from(KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK);
            self.vm
                .enable_cap(&api)
                .map_err(ioctl_err("KVM_ENABLE_CAP(X2APIC_API)"))?;
            self.x2apic_api.store(true, Ordering::Relaxed);
        }
        let config = ChipsetConfig {
            vcpus: self.vcpus,
            lapics: LapicPlacement::External,
            // KVM's LAPIC advertises EOI-broadcast suppression without an
            // in-kernel IOAPIC, so ours must have the EOI register.
            ioapic_version: IoapicVersion::V20,
            pit_policy: self.policy,
            tsc_hz: 0,
            tsc_offset: 0,
        };
        self.host.install(Chipset::new(config)?);
        self.mirror_routes()
    }

    fn setup_vcpu(&self, vcpu: &Vcpu, boot: bool) -> Result<()> {
        super::virtual_wire::setup_kvm_lapic(vcpu, boot)?;
        self.host
            .set_kick(vcpu.index() as usize, vcpu.kick().clone());
        let mp_state = if boot {
            KVM_MP_STATE_RUNNABLE
        } else {
            KVM_MP_STATE_UNINITIALIZED
        };
        vcpu.fd()
            .set_mp_state(kvm_bindings::kvm_mp_state { mp_state })
            .map_err(ioctl_err("KVM_SET_MP_STATE"))
    }

    fn before_entry(&self, ctx: &mut VcpuCtx<'_>) -> Result<()> {
        // Only the BSP's LINT0 is wired to the PIC.
        if ctx.index() != 0 {
            return Ok(());
        }
        let ready = ctx.ready_for_injection();
        let outcome = self.host.with_chip(Some(0), false, |chip, now| {
            if !chip.pending(0).extint {
                return (None, false);
            }
            if !ready {
                return (None, true);
            }
            let vector = chip.acknowledge(0, Decision::InjectExtInt, now);
            (vector, chip.pending(0).extint)
        });
        let (vector, window) = outcome.unwrap_or((None, false));
        if let Some(vector) = vector {
            ctx.inject_interrupt(vector)?;
        }
        ctx.request_interrupt_window(window);
        Ok(())
    }

    fn on_hlt(&self, _vcpu: &mut VcpuCtx<'_>) -> HltAction {
        // HLT is KVM's (its LAPIC is in the kernel).
        HltAction::Resume
    }

    /// Reads LVT0 back from KVM's LAPIC at most every 10 ms of exits, so
    /// the PIT's NMI watchdog knows which vCPUs want its ticks as NMIs.
    fn after_exit(&self, vcpu: &mut VcpuCtx<'_>) {
        let index = vcpu.index() as usize;
        let Some(slot) = self.lvt0.get(index) else {
            return;
        };
        let mut sample = slot.lock().unwrap_or_else(|e| e.into_inner());
        if sample.0.is_some_and(|t| t.elapsed() < LVT0_SAMPLE) {
            return;
        }
        let Ok(lapic) = vcpu.fd().get_lapic() else {
            return;
        };
        let nmi = lvt0_is_nmi(&lapic);
        let changed = sample.0.is_none() || sample.1 != nmi;
        *sample = (Some(Instant::now()), nmi);
        drop(sample);
        if changed {
            self.host.with_chip(Some(index), true, |c, _| {
                c.set_external_lvt0_nmi(index as u32, nmi)
            });
        }
    }

    fn on_ioapic_eoi(&self, vcpu: &mut VcpuCtx<'_>, vector: u8) {
        tracing::trace!(vcpu = vcpu.index(), vector, "IOAPIC EOI exit");
        let broadcast = match vcpu.fd().get_lapic() {
            Ok(lapic) => !suppresses_eoi_broadcast(&lapic),
            Err(e) => {
                tracing::warn!("KVM_GET_LAPIC on an IOAPIC EOI exit failed: {e}");
                true
            }
        };
        self.host
            .with_chip(Some(vcpu.index() as usize), true, |c, now| {
                c.external_lapic_eoi(vector, broadcast, now)
            });
    }

    fn pio_read(&self, vcpu: u32, port: u16, data: &mut [u8]) -> bool {
        self.host
            .with_chip(Some(vcpu as usize), false, |c, now| {
                c.pio_read(port, data, now)
            })
            .unwrap_or(false)
    }

    fn pio_write(&self, vcpu: u32, port: u16, data: &[u8]) -> bool {
        self.host
            .with_chip(Some(vcpu as usize), true, |c, now| {
                c.pio_write(port, data, now)
            })
            .unwrap_or(false)
    }

    fn mmio_read(&self, vcpu: u32, addr: u64, data: &mut [u8]) -> bool {
        self.host
            .with_chip(Some(vcpu as usize), false, |c, now| {
                c.mmio_read(vcpu as usize, addr, data, now)
            })
            .unwrap_or(false)
    }

    fn mmio_write(&self, vcpu: u32, addr: u64, data: &[u8]) -> bool {
        let claimed = self
            .host
            .with_chip(Some(vcpu as usize), true, |c, now| {
                c.mmio_write(vcpu as usize, addr, data, now)
            })
            .unwrap_or(false);
        if claimed {
            if let Err(e) = self.mirror_routes() {
                tracing::warn!("mirroring IOAPIC routes failed: {e}");
            }
        }
        claimed
    }

    fn set_gsi(&self, gsi: u32, level: bool) -> Result<()> {
        self.set_gsi_from(gsi, SourceId::USER, level)
    }

    fn set_gsi_from(&self, gsi: u32, source: SourceId, level: bool) -> Result<()> {
        self.host.set_gsi(gsi, source, level);
        Ok(())
    }

    fn watch_resample(&self, gsi: u32, source: SourceId, resample: Arc<EventFd>) -> Result<()> {
        self.host.watch_resample(gsi, source, resample);
        Ok(())
    }

    fn unwatch_resample(&self, gsi: u32, source: SourceId) {
        self.host.unwatch_resample(gsi, source);
    }

    fn send_msi(&self, address: u64, data: u32) -> Result<()> {
        self.host.send_msi(address, data);
        Ok(())
    }

    fn wake(&self, vcpu: u32) {
        self.host.wake(vcpu as usize);
    }

    fn shutdown(&self) {
        self.host.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virq::delivery::{DeliveryMode, DestinationFormat, DestinationMode, Shorthand};

    fn msg(destination: u32) -> InterruptMessage {
        InterruptMessage {
            vector: 0x40,
            delivery_mode: DeliveryMode::Fixed,
            destination_mode: DestinationMode::Physical,
            trigger_mode: TriggerMode::Edge,
            level: true,
            destination,
            format: DestinationFormat::XApic,
            shorthand: Shorthand::None,
            source: None,
        }
    }

    fn lapic_with_svr(svr: u32) -> kvm_lapic_state {
        let mut lapic = kvm_lapic_state::default();
        for (dst, src) in lapic.regs[APIC_SVR..].iter_mut().zip(svr.to_le_bytes()) {
            *dst = src as _;
        }
        lapic
    }

    #[test]
    fn svr_bit_12_suppresses_eoi_broadcasts() {
        assert!(!suppresses_eoi_broadcast(&lapic_with_svr(0x1FF)));
        assert!(suppresses_eoi_broadcast(&lapic_with_svr(0x11FF)));
    }

    #[test]
    fn low_destinations_use_the_plain_msi_format() {
        let msi = kvm_msi_for(&msg(3), true);
        assert_eq!(msi.address, 0xFEE0_3000);
        assert_eq!(msi.data & 0xFF, 0x40);
    }

    #[test]
    fn high_destinations_go_to_address_hi_with_the_x2apic_api() {
        let msi = kvm_msi_for(&msg(0x1_23), true);
        assert_eq!(msi.address & 0xFFFF_FFFF, 0xFEE2_3000);
        assert_eq!(msi.address >> 32, 0x100);
    }
}
