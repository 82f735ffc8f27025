//! Everything ours: PIC, IOAPIC, PIT and one LAPIC model per vCPU.
//!
//! KVM runs the vCPUs with no interrupt controller at all. The LAPIC page
//! (0xFEE00000) and the IOAPIC page are unbacked, so accesses exit as MMIO;
//! APIC_BASE, TSC_DEADLINE and the x2APIC MSRs are denied by an MSR filter,
//! so they exit to us too. Before each entry the vCPU's LAPIC decides what it
//! takes: an NMI goes in with `KVM_NMI` (KVM holds it until NMIs are
//! unblocked), a maskable interrupt with `KVM_INTERRUPT` when KVM reports the
//! vCPU ready, else we request an interrupt window. HLT exits park the vCPU
//! until it has something to take. INIT and SIPI are performed here: APs
//! start parked in wait-for-SIPI. CR8 and the LAPIC's TPR are kept in step
//! through `kvm_run.cr8`: a CR8 the guest wrote is taken into the TPR
//! right after the exit, before the exit is handled, and the TPR goes back
//! into CR8 before the next entry.
//!
//! Delivery to another vCPU always kicks it: under nested KVM an
//! interrupt-window request never exits while the guest runs at CPL3.

use super::host::{ChipHost, DEFAULT_HALT_POLL};
use super::{HltAction, IrqchipBackend, VcpuCtx};
use crate::vcpu::Vcpu;
use crate::vm::Vm;
use crate::{ioctl_err, Error, Result};
use kvm_bindings::{kvm_enable_cap, kvm_regs, kvm_sregs, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use virq::chipset::{Chipset, ChipsetConfig, LapicPlacement};
use virq::inject::{decide, Decision, Interruptibility, PendingEvents};
use virq::ioapic::IoapicVersion;
use virq::lapic::{StartupEvent, MSR_APIC_BASE, MSR_TSC_DEADLINE, MSR_X2APIC_FIRST};
use virq::pit::LostTickPolicy;
use virq::routing::SourceId;
use virq::RaiseGp;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// IA32_TSC.
const MSR_TSC: u32 = 0x10;
/// CPUID.1:ECX bits we emulate: x2APIC (21) and TSC-deadline (24).
const CPUID_1_ECX_X2APIC: u32 = 1 << 21;
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:EDX bit 9: an APIC is present.
const CPUID_1_EDX_APIC: u32 = 1 << 9;

/// A vCPU's register state at power-on, restored by INIT.
#[derive(Clone, Copy)]
struct ResetState {
    regs: kvm_regs,
    sregs: kvm_sregs,
}

/// Per-vCPU state only that vCPU's thread touches (behind a mutex to be Sync).
#[derive(Default)]
struct VcpuSide {
    reset: Option<ResetState>,
    /// INIT received: the vCPU waits for a SIPI before running again.
    wait_for_sipi: bool,
    /// MSR_KVM_PV_EOI_EN as the guest wrote it (bit 0: on; the rest: the
    /// guest-physical address of its PV-EOI flag byte).
    pv_eoi_msr: u64,
    /// We set the guest's PV-EOI flag at the last entry.
    pv_eoi_pending: bool,
}

/// KVM's paravirtual-EOI MSR (KVM_FEATURE_PV_EOI, CPUID 0x40000001 EAX bit 6).
pub const MSR_KVM_PV_EOI_EN: u32 = 0x4B56_4D04;

/// The fully userspace irqchip backend.
pub struct UserspaceIrqchip {
    vm: Arc<VmFd>,
    host: ChipHost,
    policy: LostTickPolicy,
    lapic_timer_policy: LostTickPolicy,
    /// Longest adaptive halt poll before a halted vCPU parks (0: never poll).
    halt_poll: Duration,
    /// Guest RAM, for the PV-EOI flags (without it PV-EOI is refused).
    memory: Option<GuestMemoryMmap>,
    vcpus: Vec<Mutex<VcpuSide>>,
    /// The CR8 value we last gave KVM, per vCPU: a different value at the
    /// next exit means the guest wrote CR8.
    last_cr8: Vec<AtomicU8>,
}

impl UserspaceIrqchip {
    /// A backend for `vm` with `vcpus` vCPUs and the PIT's lost-tick policy.
    pub fn new(vm: Arc<VmFd>, vcpus: usize, policy: LostTickPolicy) -> Self {
        UserspaceIrqchip {
            vm,
            host: ChipHost::new(vcpus, None),
            policy,
            lapic_timer_policy: LostTickPolicy::Discard,
            halt_poll: DEFAULT_HALT_POLL,
            memory: None,
            vcpus: (0..vcpus)
                .map(|_| Mutex::new(VcpuSide::default()))
                .collect(),
            last_cr8: (0..vcpus).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// What the LAPICs' periodic timers do with missed periods (default
    /// discard, as KVM's LAPIC does).
    pub fn with_lapic_timer_policy(mut self, policy: LostTickPolicy) -> Self {
        self.lapic_timer_policy = policy;
        self
    }

    /// The longest a halted vCPU polls before it parks (default 200 us;
    /// zero turns halt polling off). The window adapts below this bound.
    pub fn with_halt_poll(mut self, max: Duration) -> Self {
        self.halt_poll = max;
        self
    }

    /// Guest RAM, so the guest can use KVM's paravirtual EOI: an edge
    /// interrupt it ends through the PV-EOI flag costs no EOI exit.
    pub fn with_guest_memory(mut self, memory: GuestMemoryMmap) -> Self {
        self.memory = Some(memory);
        self
    }

    /// MSR_KVM_PV_EOI_EN write: the flag must be 4-byte aligned and in RAM.
    fn set_pv_eoi(&self, index: usize, value: u64) -> std::result::Result<(), RaiseGp> {
        let on = value & 1 != 0;
        let addr = value & !1;
        if on {
            let Some(memory) = &self.memory else {
                return Err(RaiseGp);
            };
            if !addr.is_multiple_of(4) || memory.write_obj(0u8, GuestAddress(addr)).is_err() {
                return Err(RaiseGp);
            }
        }
        let mut side = self.side(index);
        side.pv_eoi_msr = value;
        side.pv_eoi_pending = false;
        Ok(())
    }

    /// The guest's PV-EOI flag byte, if PV-EOI is on for `index`.
    fn pv_eoi_flag(&self, index: usize) -> Option<(&GuestMemoryMmap, GuestAddress)> {
        let msr = self.side(index).pv_eoi_msr;
        let memory = self.memory.as_ref()?;
        (msr & 1 != 0).then_some((memory, GuestAddress(msr & !1)))
    }

    /// After an exit: if we offered a PV EOI and the guest took it (the flag
    /// is clear), perform the EOI; otherwise withdraw the offer, so the
    /// guest's EOI is a real one.
    fn sync_pv_eoi_from_guest(&self, index: usize) {
        if !std::mem::take(&mut self.side(index).pv_eoi_pending) {
            return;
        }
        let Some((memory, flag)) = self.pv_eoi_flag(index) else {
            return;
        };
        match memory.read_obj::<u8>(flag) {
            Ok(0) => {
                self.host
                    .with_chip(Some(index), true, |chip, now| chip.pv_eoi(index, now));
            }
            _ => {
                let _ = memory.write_obj(0u8, flag);
            }
        }
    }

    fn side(&self, index: usize) -> std::sync::MutexGuard<'_, VcpuSide> {
        self.vcpus[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Performs queued INIT/SIPI for this vCPU, and waits while it is in
    /// wait-for-SIPI.
    fn startup(&self, ctx: &mut VcpuCtx<'_>) -> Result<()> {
        let index = ctx.index() as usize;
        loop {
            while let Some(event) = self.host.take_startup(index) {
                let mut side = self.side(index);
                match event {
                    StartupEvent::Init => {
                        if let Some(reset) = side.reset {
                            ctx.fd()
                                .set_sregs(&reset.sregs)
                                .map_err(ioctl_err("KVM_SET_SREGS"))?;
                            ctx.fd()
                                .set_regs(&reset.regs)
                                .map_err(ioctl_err("KVM_SET_REGS"))?;
                        }
                        // The BSP restarts at its reset vector; APs wait.
                        side.wait_for_sipi = index != 0;
                    }
                    StartupEvent::Sipi { vector } if side.wait_for_sipi => {
                        let reset = side.reset.ok_or_else(|| {
                            Error::Ioctl("SIPI", kvm_ioctls::Error::new(libc::EINVAL))
                        })?;
                        let mut sregs = reset.sregs;
                        sregs.cs.selector = u16::from(vector) << 8;
                        sregs.cs.base = u64::from(vector) << 12;
                        let mut regs = reset.regs;
                        regs.rip = 0;
                        ctx.fd()
                            .set_sregs(&sregs)
                            .map_err(ioctl_err("KVM_SET_SREGS"))?;
                        ctx.fd()
                            .set_regs(&regs)
                            .map_err(ioctl_err("KVM_SET_REGS"))?;
                        side.wait_for_sipi = false;
                    }
                    // A SIPI outside wait-for-SIPI is ignored.
                    StartupEvent::Sipi { .. } => {}
                }
            }
            if !self.side(index).wait_for_sipi {
                return Ok(());
            }
            let kick = ctx.kick();
            self.host
                .park_until(index, || kick.stop_requested(), |_| false);
            if kick.stop_requested() {
                // The loop sees the stop right after this entry returns.
                return Ok(());
            }
        }
    }

    /// Keeps the LAPIC's TPR and the vCPU's CR8 in step: a CR8 different
    /// from the one we gave KVM was written by the guest.
    fn sync_tpr(&self, chip: &mut Chipset, index: usize, cr8_now: u8) -> u8 {
        let Ok(lapic) = chip.lapic_mut(index) else {
            return cr8_now;
        };
        if cr8_now != self.last_cr8[index].load(Ordering::Relaxed) {
            lapic.set_tpr(cr8_now << 4);
        }
        let cr8 = lapic.tpr() >> 4;
        self.last_cr8[index].store(cr8, Ordering::Relaxed);
        cr8
    }
}

/// KVM has an NMI for this vCPU (one we queued with `KVM_NMI` while NMIs
/// were blocked) and NMIs are no longer blocked, so the next entry delivers
/// it. A failed query counts as "no".
fn kvm_holds_deliverable_nmi(ctx: &VcpuCtx<'_>) -> bool {
    ctx.fd()
        .get_vcpu_events()
        .is_ok_and(|e| e.nmi.pending != 0 && e.nmi.masked == 0)
}

/// What the vCPU can take given KVM's view of it; NMIs are KVM's business
/// once queued, so they are left out here.
fn maskable(pending: PendingEvents, ready: bool) -> Decision {
    let cpu = Interruptibility {
        if_flag: ready,
        ..Interruptibility::default()
    };
    decide(
        &PendingEvents {
            nmi: false,
            ..pending
        },
        &cpu,
    )
}

impl IrqchipBackend for UserspaceIrqchip {
    fn name(&self) -> &'static str {
        "userspace"
    }

    fn setup_vm(&self, _vm: &Vm) -> Result<()> {
        // Unknown and filtered MSRs exit to us instead of raising #GP.
        let mut cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        cap.args[0] = u64::from(
            kvm_bindings::KVM_MSR_EXIT_REASON_INVAL
                | kvm_bindings::KVM_MSR_EXIT_REASON_UNKNOWN
                | kvm_bindings::KVM_MSR_EXIT_REASON_FILTER,
        );
        self.vm
            .enable_cap(&cap)
            .map_err(ioctl_err("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
        // KVM would handle APIC_BASE and TSC_DEADLINE itself (badly, with no
        // LAPIC), and PV-EOI not at all: deny them, and the x2APIC range, so
        // every access exits.
        let deny_one = [0u8; 1];
        let deny_x2apic = [0u8; 32];
        let both = MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE;
        let ranges = [
            MsrFilterRange {
                flags: both,
                base: MSR_APIC_BASE,
                msr_count: 1,
                bitmap: &deny_one,
            },
            MsrFilterRange {
                flags: both,
                base: MSR_TSC_DEADLINE,
                msr_count: 1,
                bitmap: &deny_one,
            },
            MsrFilterRange {
                flags: both,
                base: MSR_KVM_PV_EOI_EN,
                msr_count: 1,
                bitmap: &deny_one,
            },
            MsrFilterRange {
                flags: both,
                base: MSR_X2APIC_FIRST,
                msr_count: 256,
                bitmap: &deny_x2apic,
            },
        ];
        self.vm
            .set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
            .map_err(ioctl_err("KVM_X86_SET_MSR_FILTER"))
    }

    fn setup_vcpu(&self, vcpu: &Vcpu, boot: bool) -> Result<()> {
        let index = vcpu.index() as usize;
        let fd = vcpu.fd();
        let mut cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_CPUID2"))?;
        for e in cpuid.as_mut_slice() {
            if e.function == 1 {
                e.ecx |= CPUID_1_ECX_X2APIC | CPUID_1_ECX_TSC_DEADLINE;
                e.edx |= CPUID_1_EDX_APIC;
            }
        }
        fd.set_cpuid2(&cpuid).map_err(ioctl_err("KVM_SET_CPUID2"))?;
        let reset = ResetState {
            regs: fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?,
        };
        {
            let mut side = self.side(index);
            side.reset = Some(reset);
            side.wait_for_sipi = !boot;
        }
        self.host.set_kick(index, vcpu.kick().clone());
        if boot {
            let tsc_khz = fd.get_tsc_khz().map_err(ioctl_err("KVM_GET_TSC_KHZ"))?;
            let tsc_hz = u64::from(tsc_khz) * 1000;
            let mut msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
                index: MSR_TSC,
                ..Default::default()
            }])
            .map_err(|_| Error::Ioctl("KVM_GET_MSRS", kvm_ioctls::Error::new(libc::E2BIG)))?;
            fd.get_msrs(&mut msrs).map_err(ioctl_err("KVM_GET_MSRS"))?;
            let guest_tsc = msrs.as_slice().first().map_or(0, |e| e.data);
            let elapsed = u128::from(self.host.now()) * u128::from(tsc_hz) / 1_000_000_000;
            let config = ChipsetConfig {
                vcpus: self.vcpus.len(),
                lapics: LapicPlacement::Model,
                ioapic_version: IoapicVersion::V20,
                pit_policy: self.policy,
                tsc_hz,
                tsc_offset: guest_tsc.saturating_sub(u64::try_from(elapsed).unwrap_or(0)),
            };
            let mut chip = Chipset::new(config)?;
            chip.set_lapic_timer_policy(self.lapic_timer_policy);
            if let Ok(lapic) = chip.lapic_mut(0) {
                lapic.setup_virtual_wire();
            }
            self.host.install(chip);
        }
        Ok(())
    }

    fn before_entry(&self, ctx: &mut VcpuCtx<'_>) -> Result<()> {
        self.startup(ctx)?;
        let index = ctx.index() as usize;
        let cr8_now = ctx.cr8();
        let ready = ctx.ready_for_injection();
        let outcome = self.host.with_chip(Some(index), true, |chip, now| {
            let cr8 = self.sync_tpr(chip, index, cr8_now);
            let pending = chip.pending(index);
            let nmi = pending.nmi;
            if nmi {
                chip.acknowledge(index, Decision::InjectNmi, now);
            }
            let decision = maskable(pending, ready);
            let vector = match decision {
                Decision::InjectExtInt | Decision::InjectVector(_) => {
                    chip.acknowledge(index, decision, now)
                }
                _ => None,
            };
            // Anything still waiting needs a window after this one.
            let after = chip.pending(index);
            let window = after.extint || after.vector.is_some();
            let pv_eoi = matches!(decision, Decision::InjectVector(_))
                && vector.is_some()
                && chip.pv_eoi_allowed(index);
            (cr8, nmi, vector, window, pv_eoi)
        });
        let Some((cr8, nmi, vector, window, pv_eoi)) = outcome else {
            return Ok(());
        };
        if pv_eoi {
            if let Some((memory, flag)) = self.pv_eoi_flag(index) {
                if memory.write_obj(1u8, flag).is_ok() {
                    self.side(index).pv_eoi_pending = true;
                }
            }
        }
        ctx.set_cr8(cr8);
        if nmi {
            ctx.inject_nmi()?;
        }
        if let Some(vector) = vector {
            ctx.inject_interrupt(vector)?;
        }
        ctx.request_interrupt_window(window);
        Ok(())
    }

    /// A CR8 the guest wrote since the last entry goes into the LAPIC's TPR
    /// before the exit is handled, so an MMIO/MSR access in this exit sees
    /// it, and a TPR the access writes is not overwritten by the stale CR8
    /// at the next entry.
    fn after_exit(&self, ctx: &mut VcpuCtx<'_>) {
        let index = ctx.index() as usize;
        self.sync_pv_eoi_from_guest(index);
        let cr8_now = ctx.cr8();
        if cr8_now == self.last_cr8[index].load(Ordering::Relaxed) {
            return;
        }
        self.host.with_chip(Some(index), false, |chip, _| {
            self.sync_tpr(chip, index, cr8_now);
        });
    }

    fn on_hlt(&self, ctx: &mut VcpuCtx<'_>) -> HltAction {
        let index = ctx.index() as usize;
        if kvm_holds_deliverable_nmi(ctx) {
            // An NMI handed over while NMIs were blocked is still waiting in
            // KVM and can be taken now: enter so KVM delivers it (the HLT
            // ends, as it would on hardware). Parking would hold it until
            // something else woke the vCPU.
            return HltAction::Resume;
        }
        let if_flag = ctx.if_flag();
        let kick = ctx.kick();
        self.host.halt_until(
            index,
            self.halt_poll,
            || kick.stop_requested(),
            |chip| {
                let p = chip.pending(index);
                p.nmi || (if_flag && (p.extint || p.vector.is_some()))
            },
        );
        HltAction::Resume
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
        self.host
            .with_chip(Some(vcpu as usize), true, |c, now| {
                c.mmio_write(vcpu as usize, addr, data, now)
            })
            .unwrap_or(false)
    }

    fn msr_read(&self, vcpu: u32, index: u32) -> Option<std::result::Result<u64, RaiseGp>> {
        if index == MSR_KVM_PV_EOI_EN {
            return Some(Ok(self.side(vcpu as usize).pv_eoi_msr));
        }
        self.host.with_chip(Some(vcpu as usize), false, |c, now| {
            c.msr_read(vcpu as usize, index, now)
        })
    }

    fn msr_write(
        &self,
        vcpu: u32,
        index: u32,
        value: u64,
    ) -> Option<std::result::Result<(), RaiseGp>> {
        if index == MSR_KVM_PV_EOI_EN {
            return Some(self.set_pv_eoi(vcpu as usize, value));
        }
        self.host.with_chip(Some(vcpu as usize), true, |c, now| {
            c.msr_write(vcpu as usize, index, value, now)
        })
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
