//! Local APIC in xAPIC (MMIO at 0xFEE00000) or x2APIC (MSRs 0x800+) mode.
//! All CPUs use the same mode, chosen once by the BSP.

use crate::arch::{mmio_read32, mmio_write32, pause, rdmsr, wrmsr};
use crate::cpu::{self, InterruptFrame};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};

/// Default xAPIC MMIO base.
pub const XAPIC_BASE: usize = 0xFEE0_0000;
/// IA32_APIC_BASE MSR.
pub const IA32_APIC_BASE: u32 = 0x1B;
/// IA32_APIC_BASE bit 11: the APIC is enabled.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE bit 10: x2APIC mode.
pub const APIC_BASE_X2APIC: u64 = 1 << 10;
/// IA32_TSC_DEADLINE MSR.
pub const IA32_TSC_DEADLINE: u32 = 0x6E0;
/// First x2APIC register MSR (register = 0x800 + xAPIC offset / 16).
pub const X2APIC_MSR_BASE: u32 = 0x800;

/// Register offsets (xAPIC MMIO offsets; x2APIC MSR = 0x800 + offset / 16).
pub mod reg {
    /// APIC ID.
    pub const ID: u32 = 0x20;
    /// Version.
    pub const VERSION: u32 = 0x30;
    /// Task priority.
    pub const TPR: u32 = 0x80;
    /// Processor priority.
    pub const PPR: u32 = 0xA0;
    /// End of interrupt.
    pub const EOI: u32 = 0xB0;
    /// Logical destination (xAPIC writable; read-only in x2APIC).
    pub const LDR: u32 = 0xD0;
    /// Destination format (xAPIC only).
    pub const DFR: u32 = 0xE0;
    /// Spurious-interrupt vector.
    pub const SVR: u32 = 0xF0;
    /// In-service register, 8 words 0x10 apart.
    pub const ISR: u32 = 0x100;
    /// Interrupt-request register, 8 words 0x10 apart.
    pub const IRR: u32 = 0x200;
    /// Error status.
    pub const ESR: u32 = 0x280;
    /// Interrupt command (low half in xAPIC).
    pub const ICR_LOW: u32 = 0x300;
    /// Interrupt command, destination half (xAPIC only).
    pub const ICR_HIGH: u32 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u32 = 0x320;
    /// LVT error.
    pub const LVT_ERROR: u32 = 0x370;
    /// Timer initial count.
    pub const TIMER_INITIAL: u32 = 0x380;
    /// Timer current count.
    pub const TIMER_CURRENT: u32 = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: u32 = 0x3E0;
    /// SELF_IPI (x2APIC only).
    pub const SELF_IPI: u32 = 0x3F0;
}

/// SVR bit 8: the APIC is software-enabled.
pub const SVR_ENABLE: u32 = 1 << 8;
/// ESR bit 5: an IPI with an illegal vector was sent.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit 6: an interrupt with an illegal vector was received.
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

/// LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;
/// LVT timer mode: periodic.
pub const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// SVR bit 12: suppress EOI broadcasts to the IOAPICs.
pub const SVR_SUPPRESS_EOI_BROADCAST: u32 = 1 << 12;
/// Version bit 24: EOI-broadcast suppression is supported.
pub const VERSION_EOI_BROADCAST_SUPPRESSION: u32 = 1 << 24;
/// LVT timer mode: TSC-deadline.
pub const LVT_TIMER_TSC_DEADLINE: u32 = 2 << 17;
/// Vector used for the LAPIC's spurious interrupts.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

static X2APIC: AtomicBool = AtomicBool::new(false);

/// An ICR value (low 32 bits: vector, delivery mode, level, trigger).
#[derive(Clone, Copy, Debug)]
pub struct Icr(pub u32);

impl Icr {
    /// Fixed interrupt with `vector`.
    pub fn fixed(vector: u8) -> Self {
        Icr(u32::from(vector) | (1 << 14))
    }
    /// INIT, level assert.
    pub fn init() -> Self {
        Icr((0b101 << 8) | (1 << 14))
    }
    /// Start-up IPI for the real-mode page `page` (address = page * 4 KiB).
    pub fn startup(page: u8) -> Self {
        Icr(u32::from(page) | (0b110 << 8) | (1 << 14))
    }
    /// NMI, edge.
    pub fn nmi() -> Self {
        Icr((0b100 << 8) | (1 << 14))
    }
    /// The same command with a logical destination (bit 11).
    pub fn logical(self) -> Self {
        Icr(self.0 | (1 << 11))
    }
    /// The same command to this APIC only (shorthand 01; destination ignored).
    pub fn to_self(self) -> Self {
        Icr(self.0 | (0b01 << 18))
    }
    /// The same command to every APIC, this one included (shorthand 10).
    pub fn to_all(self) -> Self {
        Icr(self.0 | (0b10 << 18))
    }
    /// The same command to every APIC but this one (shorthand 11).
    pub fn to_others(self) -> Self {
        Icr(self.0 | (0b11 << 18))
    }
    /// Delivery-status (send pending) bit, xAPIC only.
    pub fn send_pending(self) -> bool {
        self.0 & (1 << 12) != 0
    }
}

/// Whether CPUID reports x2APIC support.
pub fn x2apic_supported() -> bool {
    crate::arch::cpuid(1).2 & (1 << 21) != 0
}

/// Whether the APICs run in x2APIC mode.
pub fn is_x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// Chooses the mode for every CPU (BSP, before any `enable`).
pub fn set_mode(x2apic: bool) {
    X2APIC.store(x2apic, Ordering::Relaxed);
}

/// Reads a register.
pub fn read(offset: u32) -> u32 {
    if is_x2apic() {
        rdmsr(0x800 + (offset >> 4)) as u32
    } else {
        mmio_read32(XAPIC_BASE + offset as usize)
    }
}

/// Writes a register.
pub fn write(offset: u32, value: u32) {
    if is_x2apic() {
        wrmsr(0x800 + (offset >> 4), u64::from(value));
    } else {
        mmio_write32(XAPIC_BASE + offset as usize, value);
    }
}

/// Enables this CPU's LAPIC in the chosen mode, with the spurious vector set,
/// TPR 0, the timer and error LVTs masked.
pub fn enable() {
    let mut base = rdmsr(IA32_APIC_BASE) | APIC_BASE_ENABLE;
    wrmsr(IA32_APIC_BASE, base);
    if is_x2apic() {
        base |= APIC_BASE_X2APIC;
        wrmsr(IA32_APIC_BASE, base);
    }
    write(reg::SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    write(reg::TPR, 0);
    write(reg::LVT_TIMER, LVT_MASKED);
    write(reg::LVT_ERROR, LVT_MASKED);
    write(reg::ESR, 0);
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    if is_x2apic() {
        read(reg::ID)
    } else {
        read(reg::ID) >> 24
    }
}

/// Whether the version register advertises EOI-broadcast suppression.
pub fn eoi_broadcast_suppression_supported() -> bool {
    read(reg::VERSION) & VERSION_EOI_BROADCAST_SUPPRESSION != 0
}

/// Sets or clears SVR bit 12 (EOI-broadcast suppression) on this CPU.
pub fn set_eoi_broadcast_suppression(on: bool) {
    let svr = read(reg::SVR);
    let svr = if on {
        svr | SVR_SUPPRESS_EOI_BROADCAST
    } else {
        svr & !SVR_SUPPRESS_EOI_BROADCAST
    };
    write(reg::SVR, svr);
}

/// Puts this CPU in the flat logical model with logical ID `bits` (a bit
/// mask matched against 8-bit logical destinations). xAPIC only: in x2APIC
/// mode the LDR is fixed by the APIC ID and there is no flat model.
pub fn set_logical_flat(bits: u8) {
    if !is_x2apic() {
        write(reg::DFR, 0xFFFF_FFFF);
        write(reg::LDR, u32::from(bits) << 24);
    }
}

/// Whether `vector` is set in the 256-bit register starting at `base`
/// (`reg::IRR` or `reg::ISR`).
pub fn vector_bit(base: u32, vector: u8) -> bool {
    let v = u32::from(vector);
    read(base + (v / 32) * 0x10) & (1 << (v % 32)) != 0
}

/// Moves this CPU's APIC from xAPIC to x2APIC mode (IA32_APIC_BASE bit 10)
/// without changing the mode the register accessors use: every CPU switches
/// its own APIC, and the BSP then calls `set_mode(true)`. The caller must not
/// touch the APIC in between.
pub fn enter_x2apic_mode() {
    let base = rdmsr(IA32_APIC_BASE);
    wrmsr(IA32_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
}

/// Signals end of interrupt.
pub fn eoi() {
    let cpu = cpu::index();
    if let (Some(on), Some(flag)) = (PV_EOI_ON.get(cpu), PV_EOI_FLAG.get(cpu)) {
        // The hypervisor set bit 0 if this EOI may be paravirtual; clearing
        // it is the EOI. It only changes the flag between instructions (at
        // an exit), so a changed value makes the exchange retry.
        if on.load(Ordering::Relaxed) && flag.fetch_and(!1, Ordering::AcqRel) & 1 != 0 {
            PV_EOIS.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    write(reg::EOI, 0);
}

/// KVM's paravirtual-EOI MSR.
pub const MSR_KVM_PV_EOI_EN: u32 = 0x4B56_4D04;

/// Per-CPU PV-EOI flag words (the hypervisor uses the low byte's bit 0).
static PV_EOI_FLAG: [AtomicU32; cpu::MAX_CPUS] = [const { AtomicU32::new(0) }; cpu::MAX_CPUS];
static PV_EOI_ON: [AtomicBool; cpu::MAX_CPUS] = [const { AtomicBool::new(false) }; cpu::MAX_CPUS];

static PV_EOIS: AtomicU32 = AtomicU32::new(0);

/// EOIs done through the paravirtual flag so far (all CPUs).
pub fn pv_eois() -> u32 {
    PV_EOIS.load(Ordering::Relaxed)
}

/// Whether the hypervisor offers KVM's paravirtual EOI (KVM signature at
/// CPUID 0x40000000, feature bit 6 of 0x40000001 EAX).
pub fn pv_eoi_supported() -> bool {
    let (_, b, c, d) = crate::arch::cpuid(0x4000_0000);
    let kvm = (b, c, d) == (0x4B4D_564B, 0x564B_4D56, 0x0000_004D);
    kvm && crate::arch::cpuid(0x4000_0001).0 & (1 << 6) != 0
}

/// Turns on the paravirtual EOI for this CPU if it is offered: [`eoi`] then
/// ends an interrupt without a register write when the hypervisor allows.
/// Returns whether it is on.
pub fn enable_pv_eoi() -> bool {
    let cpu = cpu::index();
    let (Some(flag), Some(on)) = (PV_EOI_FLAG.get(cpu), PV_EOI_ON.get(cpu)) else {
        return false;
    };
    if !pv_eoi_supported() {
        return false;
    }
    flag.store(0, Ordering::Release);
    wrmsr(MSR_KVM_PV_EOI_EN, core::ptr::from_ref(flag) as u64 | 1);
    on.store(true, Ordering::Release);
    true
}

/// Turns the paravirtual EOI off for this CPU.
pub fn disable_pv_eoi() {
    if let Some(on) = PV_EOI_ON.get(cpu::index()) {
        if on.swap(false, Ordering::AcqRel) {
            wrmsr(MSR_KVM_PV_EOI_EN, 0);
        }
    }
}

/// Whether `vector` is in service (its ISR bit is set).
pub fn in_service(vector: u8) -> bool {
    vector_bit(reg::ISR, vector)
}

/// Vector of the in-service probe's self-IPI.
pub const PROBE_VECTOR: u8 = 0xE1;
/// What the probe handler saw: 0 nothing yet, 1 in service, 2 not.
static PROBE_SEEN: AtomicU8 = AtomicU8::new(0);

fn probe_handler(_: &mut InterruptFrame) {
    let seen = if in_service(PROBE_VECTOR) { 1 } else { 2 };
    PROBE_SEEN.store(seen, Ordering::Release);
}

/// Whether this CPU's LAPIC keeps an interrupt in service (ISR bit set)
/// while its handler runs, as the architecture says it must until the EOI.
/// Probed with one self-IPI. Some hosts' LAPICs clear the ISR bit (and
/// send a level vector's EOI to the IOAPIC) when they inject the
/// interrupt; checks of what happens at the handler's EOI mean nothing
/// there. Returns true if no interrupt arrives (nothing was observed).
pub fn holds_in_service() -> bool {
    PROBE_SEEN.store(0, Ordering::Release);
    cpu::set_handler(PROBE_VECTOR, probe_handler);
    send_ipi(id(), Icr::fixed(PROBE_VECTOR));
    crate::time::wait_until(100_000, || PROBE_SEEN.load(Ordering::Acquire) != 0);
    PROBE_SEEN.load(Ordering::Acquire) != 2
}

/// Sends an IPI to the APIC with ID `dest` (physical destination mode).
pub fn send_ipi(dest: u32, icr: Icr) {
    if is_x2apic() {
        wrmsr(0x830, (u64::from(dest) << 32) | u64::from(icr.0));
    } else {
        write(reg::ICR_HIGH, dest << 24);
        write(reg::ICR_LOW, icr.0);
        for _ in 0..10_000 {
            if !Icr(read(reg::ICR_LOW)).send_pending() {
                break;
            }
            pause();
        }
    }
}

/// Timer divide-by-16 encoding.
pub const TIMER_DIVIDE_16: u32 = 0x3;

/// Starts the timer in one-shot mode: `vector` after `count` ticks.
pub fn timer_oneshot(vector: u8, count: u32) {
    write(reg::TIMER_DIVIDE, TIMER_DIVIDE_16);
    write(reg::LVT_TIMER, u32::from(vector));
    write(reg::TIMER_INITIAL, count);
}

/// Starts the timer in periodic mode: `vector` every `count` ticks.
pub fn timer_periodic(vector: u8, count: u32) {
    write(reg::TIMER_DIVIDE, TIMER_DIVIDE_16);
    write(reg::LVT_TIMER, u32::from(vector) | LVT_TIMER_PERIODIC);
    write(reg::TIMER_INITIAL, count);
}

/// Stops and masks the timer.
pub fn timer_stop() {
    write(reg::TIMER_INITIAL, 0);
    write(reg::LVT_TIMER, LVT_MASKED);
}
