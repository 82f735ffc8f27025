//! The local APIC: one per vCPU, xAPIC MMIO page and x2APIC MSRs, the APIC
//! timer, the LVT, IRR/ISR/TMR, priorities, EOI and IPIs.
//!
//! The model is a plain state machine. The caller feeds it guest register
//! accesses (MMIO or MSR), bus messages that resolved to it ([`Lapic::accept`])
//! and time (`now_ns` on the caller's virtual clock), and reads back what the
//! vCPU should do: [`Lapic::highest_deliverable`] / [`Lapic::acknowledge`] for
//! vectored interrupts, [`Lapic::take_nmi`], [`Lapic::take_extint`],
//! [`Lapic::take_startup`]. IPIs and EOIs come out of register writes as
//! [`LapicEffects`]: the IPI is resolved by `delivery::resolve`, the EOI goes
//! to the IOAPIC when `broadcast` is set.
//!
//! Choices where the references differ:
//! - Version 0x14 with max LVT 5: six LVT entries (timer, thermal, perf,
//!   LINT0, LINT1, error); there is no CMCI entry (offset 0x2F0 is reserved),
//!   since nothing here models machine checks.
//! - The timer's bus clock is a nominal 1 GHz: one count per nanosecond before
//!   the divider, as KVM does.
//! - A periodic timer whose deadline was missed by more than one period (the
//!   host paused) fires once and then stays on its original period grid: the
//!   missed periods are dropped instead of being delivered one by one. The
//!   reload interval is at least [`MIN_PERIODIC_NS`] (KVM's default limit),
//!   so a guest cannot ask for a wake-up storm.
//! - MMIO writes must be 4 bytes wide at a 16-byte aligned offset; other
//!   writes are ignored (as KVM does). Reads may have any width and offset:
//!   bytes 4-15 of each 16-byte register slot read 0.
//! - Reserved and write-only xAPIC registers read 0 and writes to read-only
//!   ones are ignored; the illegal-register-address ESR bit is not raised
//!   (as KVM). In x2APIC mode the same accesses raise #GP.
//! - APs start (and return after INIT) in wait-for-SIPI; the BSP does not.

mod msr;
mod regs;
#[cfg(test)]
mod tests;
mod timer;

use serde::{Deserialize, Serialize};

use crate::pit::{LostTickPolicy, BACKLOG_WINDOW_NS};

use crate::delivery::{
    ApicAddressing, DeliveryMode, DestinationFormat, DfrModel, InterruptMessage, TriggerMode,
};
use regs::{ApicBase, Icr, Lvt, LvtKind, Svr, Tdcr, TimerMode, VectorSet};

/// Default physical address of the xAPIC MMIO page.
pub const APIC_BASE_DEFAULT: u64 = 0xFEE0_0000;
/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
/// First x2APIC register MSR.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
/// Last x2APIC register MSR.
pub const MSR_X2APIC_LAST: u32 = 0x8FF;
/// Shortest reload interval of a periodic timer (200 µs, KVM's default).
pub const MIN_PERIODIC_NS: u64 = 200_000;

/// Most periodic expirations owed under reinject: [`BACKLOG_WINDOW_NS`]
/// worth at the fastest period, so a long host stall replays at most that.
pub const MAX_TIMER_BACKLOG: u64 = BACKLOG_WINDOW_NS / MIN_PERIODIC_NS;

/// Version register value without the EOI-broadcast-suppression bit:
/// integrated APIC version 0x14, max LVT entry 5.
const VERSION_BASE: u32 = 0x14 | (5 << 16);
/// Version bit 24: EOI-broadcast suppression is supported.
const VERSION_DIRECTED_EOI: u32 = 1 << 24;
/// DFR bits that are not the model field always read as ones.
const DFR_FIXED_ONES: u32 = 0x0FFF_FFFF;

/// How one local APIC is set up; fixed for the life of the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicConfig {
    /// The vCPU this APIC belongs to, used as `source` of its IPIs.
    pub vcpu_index: usize,
    /// Initial APIC ID (normally the vCPU index).
    pub apic_id: u32,
    /// Whether this is the bootstrap processor (APIC_BASE bit 8).
    pub bsp: bool,
    /// The IOAPIC has an EOI register: advertise EOI-broadcast suppression
    /// (version bit 24) and let the guest set SVR bit 12.
    pub directed_eoi: bool,
    /// Guest TSC frequency in Hz, for the TSC-deadline timer.
    pub tsc_hz: u64,
    /// Guest TSC at `now_ns == 0`.
    pub tsc_offset: u64,
}

/// INIT or SIPI for the caller to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartupEvent {
    /// Reset the vCPU to its INIT state (an AP then waits for SIPI; the BSP
    /// restarts at the reset vector).
    Init,
    /// Start the (INIT-reset) vCPU in real mode at `vector << 12`
    /// (CS selector `vector << 8`, IP 0).
    Sipi {
        /// The start page.
        vector: u8,
    },
}

/// An end of interrupt written by the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EoiEvent {
    /// The vector whose ISR bit was cleared.
    pub vector: u8,
    /// Its TMR bit was set (it was level-triggered).
    pub level: bool,
    /// The IOAPIC must be told: level and not suppressed by SVR bit 12.
    pub broadcast: bool,
}

/// What a register write asks the caller to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LapicEffects {
    /// An IPI to resolve and deliver.
    pub ipi: Option<InterruptMessage>,
    /// An EOI, to forward to the IOAPIC when `broadcast` is set.
    pub eoi: Option<EoiEvent>,
}

/// An invalid host request (a bad snapshot or register page).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LapicError {
    /// The saved state is inconsistent.
    #[error("invalid local APIC state: {0}")]
    InvalidState(&'static str),
    /// In x2APIC mode the register page must carry this APIC's own x2APIC ID.
    #[error("register page APIC ID {found:#x} differs from the x2APIC ID {expected:#x}")]
    X2apicIdMismatch {
        /// The ID in the page.
        found: u32,
        /// This APIC's ID.
        expected: u32,
    },
}

/// The complete state of one local APIC, for snapshot and migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicState {
    /// Configuration.
    pub config: LapicConfig,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// APIC ID (full 32 bits; xAPIC mode shows the low 8).
    pub id: u32,
    /// Task priority.
    pub tpr: u8,
    /// Logical destination register.
    pub ldr: u32,
    /// Destination format register.
    pub dfr: u32,
    /// Spurious interrupt vector register.
    pub svr: u32,
    /// In-service register.
    pub isr: [u32; 8],
    /// Trigger-mode register.
    pub tmr: [u32; 8],
    /// Interrupt-request register.
    pub irr: [u32; 8],
    /// Error status as the guest reads it (latched by the last ESR write).
    pub esr: u32,
    /// Errors accumulated since the last ESR write.
    pub esr_pending: u32,
    /// Interrupt command register (high half = ICR2 / x2APIC destination).
    pub icr: u64,
    /// LVT entries: timer, thermal, perf, LINT0, LINT1, error.
    pub lvt: [u32; 6],
    /// Timer initial count.
    pub tmict: u32,
    /// Timer divide configuration.
    pub tdcr: u32,
    /// When the one-shot/periodic/TSC-deadline timer next expires.
    pub timer_next_ns: Option<u64>,
    /// IA32_TSC_DEADLINE while armed, else 0.
    pub tsc_deadline: u64,
    /// The timer must be re-armed from TMICT at the next call that has a time
    /// (set after loading a KVM register page, which carries no time).
    pub timer_restart_pending: bool,
    /// An NMI is pending.
    pub nmi_pending: bool,
    /// An ExtINT message is pending.
    pub extint_pending: bool,
    /// An SMI arrived (recorded only).
    pub smi_pending: bool,
    /// The vCPU is waiting for a SIPI.
    pub wait_for_sipi: bool,
    /// INIT/SIPI outcome not yet taken by the caller.
    pub startup: Option<StartupEvent>,
    /// Last seen level of the LINT0 and LINT1 pins.
    pub lint_level: [bool; 2],
    /// What the periodic timer does with expirations the guest has not
    /// taken yet (default: discard, as KVM's LAPIC does).
    #[serde(default = "discard")]
    pub timer_policy: LostTickPolicy,
    /// Periodic expirations owed to the guest under reinject.
    #[serde(default)]
    pub timer_backlog: u32,
}

fn discard() -> LostTickPolicy {
    LostTickPolicy::Discard
}

/// One local APIC.
#[derive(Clone, Debug)]
pub struct Lapic {
    s: LapicState,
}

impl Lapic {
    /// A local APIC in its power-on state: enabled in xAPIC mode at
    /// [`APIC_BASE_DEFAULT`], software-disabled, all LVTs masked.
    pub fn new(config: LapicConfig) -> Self {
        let mut apic_base = APIC_BASE_DEFAULT | ApicBase::ENABLE;
        if config.bsp {
            apic_base |= ApicBase::BSP;
        }
        let mut lapic = Lapic {
            s: LapicState {
                config,
                apic_base,
                id: config.apic_id,
                tpr: 0,
                ldr: 0,
                dfr: u32::MAX,
                svr: Svr::RESET,
                isr: [0; 8],
                tmr: [0; 8],
                irr: [0; 8],
                esr: 0,
                esr_pending: 0,
                icr: 0,
                lvt: [Lvt::MASKED; 6],
                tmict: 0,
                tdcr: 0,
                timer_next_ns: None,
                tsc_deadline: 0,
                timer_restart_pending: false,
                nmi_pending: false,
                extint_pending: false,
                smi_pending: false,
                wait_for_sipi: false,
                startup: None,
                lint_level: [false; 2],
                timer_policy: LostTickPolicy::Discard,
                timer_backlog: 0,
            },
        };
        lapic.init_reset();
        lapic
    }

    // ----- xAPIC MMIO -------------------------------------------------------

    /// Read from the xAPIC page; `offset` is taken within the 4 KiB page.
    /// Any width and offset is accepted: bytes 4-15 of a 16-byte register slot
    /// read 0. While hardware-disabled or in x2APIC mode the page does not
    /// respond as an APIC: every byte reads 0xFF.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8], now_ns: u64) {
        if !self.is_xapic_mode() {
            data.fill(0xFF);
            return;
        }
        self.advance(now_ns);
        for (i, byte) in data.iter_mut().enumerate() {
            let off = offset.wrapping_add(i as u64) & 0xFFF;
            let within = (off & 0xF) as u32;
            *byte = if within < 4 {
                (self.xapic_read((off >> 4) as u32, now_ns) >> (within * 8)) as u8
            } else {
                0
            };
        }
    }

    /// Write to the xAPIC page. Only 4-byte writes at a 16-byte aligned offset
    /// reach a register; others, and all writes while hardware-disabled or in
    /// x2APIC mode, are ignored.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now_ns: u64) -> LapicEffects {
        let mut effects = LapicEffects::default();
        if !self.is_xapic_mode() || offset & 0xF != 0 {
            return effects;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return effects;
        };
        self.advance(now_ns);
        let value = u32::from_le_bytes(bytes);
        let reg = ((offset & 0xFFF) >> 4) as u32;
        match reg {
            regs::ID => self.s.id = value >> 24,
            regs::LDR => self.s.ldr = value & 0xFF00_0000,
            regs::DFR => self.s.dfr = value | DFR_FIXED_ONES,
            regs::ICR => {
                self.s.icr = (self.s.icr & !0xFFFF_FFFF) | u64::from(value & Icr::LOW_WRITABLE);
                effects.ipi = self.send_ipi(
                    Icr(self.s.icr),
                    Icr(self.s.icr).xapic_destination(),
                    DestinationFormat::XApic,
                );
            }
            regs::ICR2 => {
                self.s.icr =
                    (self.s.icr & 0xFFFF_FFFF) | (u64::from(value & Icr::XAPIC_HIGH_WRITABLE) << 32)
            }
            _ => effects.eoi = self.common_write(reg, value, now_ns),
        }
        self.advance(now_ns);
        effects
    }

    /// An xAPIC register read (0 for reserved and write-only registers).
    fn xapic_read(&self, reg: u32, now_ns: u64) -> u32 {
        match reg {
            regs::ID => (self.s.id & 0xFF) << 24,
            regs::LDR => self.s.ldr,
            regs::DFR => self.s.dfr,
            regs::ICR => self.s.icr as u32,
            regs::ICR2 => (self.s.icr >> 32) as u32,
            _ => self.common_read(reg, now_ns).unwrap_or(0),
        }
    }

    /// Registers that read the same in xAPIC and x2APIC mode; None if the
    /// register is not one of them.
    fn common_read(&self, reg: u32, now_ns: u64) -> Option<u32> {
        let v = match reg {
            regs::VERSION => self.version(),
            regs::TPR => u32::from(self.s.tpr),
            regs::PPR => u32::from(self.ppr()),
            regs::SVR => self.s.svr,
            r if (regs::ISR0..regs::ISR0 + 8).contains(&r) => {
                *self.s.isr.get((r - regs::ISR0) as usize)?
            }
            r if (regs::TMR0..regs::TMR0 + 8).contains(&r) => {
                *self.s.tmr.get((r - regs::TMR0) as usize)?
            }
            r if (regs::IRR0..regs::IRR0 + 8).contains(&r) => {
                *self.s.irr.get((r - regs::IRR0) as usize)?
            }
            regs::ESR => self.s.esr,
            r if LvtKind::from_reg(r).is_some() => {
                *self.s.lvt.get((r - regs::LVT_TIMER) as usize)?
            }
            regs::TMICT => self.s.tmict,
            regs::TMCCT => self.current_count(now_ns),
            regs::TDCR => self.s.tdcr,
            _ => return None,
        };
        Some(v)
    }

    /// Writes that behave the same in both modes (the x2APIC path checks
    /// reserved bits first). Returns the EOI if this was an EOI write.
    fn common_write(&mut self, reg: u32, value: u32, now_ns: u64) -> Option<EoiEvent> {
        match reg {
            regs::TPR => self.s.tpr = value as u8,
            regs::EOI => return self.eoi(),
            regs::SVR => self.write_svr(value),
            regs::ESR => {
                // Write-then-read: latch what accumulated, start afresh.
                self.s.esr = self.s.esr_pending;
                self.s.esr_pending = 0;
            }
            regs::TMICT => self.write_tmict(value, now_ns),
            regs::TDCR => self.write_tdcr(value, now_ns),
            r => {
                if let Some(kind) = LvtKind::from_reg(r) {
                    self.write_lvt(kind, value);
                }
            }
        }
        None
    }

    fn write_svr(&mut self, value: u32) {
        self.s.svr = value & Svr::writable_mask(self.s.config.directed_eoi);
        if !Svr(self.s.svr).enabled() {
            for lvt in &mut self.s.lvt {
                *lvt |= Lvt::MASKED;
            }
        }
    }

    fn write_lvt(&mut self, kind: LvtKind, value: u32) {
        let mut value = value & kind.writable_mask();
        if !self.is_sw_enabled() {
            value |= Lvt::MASKED;
        }
        let Some(slot) = self.s.lvt.get_mut(kind.index()) else {
            return;
        };
        let old = Lvt(*slot);
        *slot = value;
        if kind == LvtKind::Timer {
            self.timer_mode_changed(old.timer_mode(), Lvt(value).timer_mode());
        }
    }

    fn version(&self) -> u32 {
        if self.s.config.directed_eoi {
            VERSION_BASE | VERSION_DIRECTED_EOI
        } else {
            VERSION_BASE
        }
    }

    /// Build the IPI for an ICR write. Fixed and lowest-priority IPIs with a
    /// vector below 16 are not sent; they set the send-illegal-vector ESR bit.
    fn send_ipi(
        &mut self,
        icr: Icr,
        destination: u32,
        format: DestinationFormat,
    ) -> Option<InterruptMessage> {
        let delivery_mode = icr.delivery_mode();
        if matches!(
            delivery_mode,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority
        ) && icr.vector() < 16
        {
            self.raise_error(regs::ESR_SEND_ILLEGAL_VECTOR);
            return None;
        }
        Some(InterruptMessage {
            vector: icr.vector(),
            delivery_mode,
            destination_mode: icr.destination_mode(),
            trigger_mode: icr.trigger_mode(),
            level: icr.level(),
            destination,
            format,
            shorthand: icr.shorthand(),
            source: Some(self.s.config.vcpu_index),
        })
    }

    /// Clear the highest in-service vector and report it.
    fn eoi(&mut self) -> Option<EoiEvent> {
        let mut isr = VectorSet(self.s.isr);
        let vector = isr.highest()?;
        isr.clear(vector);
        self.s.isr = isr.0;
        self.timer_tick_acked(vector);
        let level = VectorSet(self.s.tmr).test(vector);
        Some(EoiEvent {
            vector,
            level,
            broadcast: level && !Svr(self.s.svr).suppress_eoi_broadcast(),
        })
    }

    /// Record an error in the ESR and signal it through the LVT error entry.
    fn raise_error(&mut self, bits: u32) {
        self.s.esr_pending |= bits;
        let lvt = Lvt(self.s.lvt[LvtKind::Error.index()]);
        if lvt.masked() {
            return;
        }
        if lvt.vector() < 16 {
            // Delivering the error would itself be an error; record it without
            // signalling again.
            self.s.esr_pending |= regs::ESR_RECEIVE_ILLEGAL_VECTOR;
        } else {
            self.set_irr(lvt.vector(), false);
        }
    }

    /// Post a vector into the IRR (TMR follows the trigger mode). Illegal
    /// vectors are dropped with the receive-illegal-vector error.
    fn post_vector(&mut self, vector: u8, level: bool) -> bool {
        if vector < 16 {
            self.raise_error(regs::ESR_RECEIVE_ILLEGAL_VECTOR);
            return false;
        }
        self.set_irr(vector, level);
        true
    }

    fn set_irr(&mut self, vector: u8, level: bool) {
        let mut irr = VectorSet(self.s.irr);
        irr.set(vector);
        self.s.irr = irr.0;
        let mut tmr = VectorSet(self.s.tmr);
        tmr.assign(vector, level);
        self.s.tmr = tmr.0;
    }

    /// Deliver a local interrupt through its LVT entry; returns whether it
    /// had an effect. Masked entries do nothing.
    fn local_deliver(&mut self, kind: LvtKind) -> bool {
        let lvt = Lvt(self.s.lvt[kind.index()]);
        if lvt.masked() {
            return false;
        }
        let mode = if kind.has_delivery_mode() {
            lvt.delivery_mode()
        } else {
            DeliveryMode::Fixed
        };
        match mode {
            DeliveryMode::Fixed => self.post_vector(lvt.vector(), false),
            DeliveryMode::Nmi => {
                self.s.nmi_pending = true;
                true
            }
            DeliveryMode::Smi => {
                self.s.smi_pending = true;
                true
            }
            DeliveryMode::ExtInt => {
                self.s.extint_pending = true;
                true
            }
            DeliveryMode::Init if matches!(kind, LvtKind::Lint0 | LvtKind::Lint1) => {
                self.receive_init();
                true
            }
            _ => false,
        }
    }

    fn receive_init(&mut self) {
        self.init_reset();
        self.s.startup = Some(StartupEvent::Init);
    }

    // ----- bus messages -----------------------------------------------------

    /// A bus message that resolved to this APIC. Returns whether it was
    /// accepted (a fixed vector already in the IRR counts as accepted).
    ///
    /// - Nothing is accepted while hardware-disabled.
    /// - Fixed, LowestPriority and ExtINT are dropped (false) while
    ///   software-disabled; NMI, SMI, INIT and SIPI still work, as on hardware.
    /// - Fixed/LowestPriority vectors 0-15 set ESR bit 6 and are dropped.
    /// - INIT resets the APIC at once ([`Lapic::init_reset`]) and reports
    ///   [`StartupEvent::Init`]; an INIT level de-assert is ignored (false).
    /// - SIPI is accepted only in wait-for-SIPI, and leaves that state.
    /// - SMI is only recorded; reserved delivery modes are dropped.
    pub fn accept(&mut self, msg: &InterruptMessage, now_ns: u64) -> bool {
        if !self.is_hw_enabled() {
            return false;
        }
        self.advance(now_ns);
        match msg.delivery_mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.is_sw_enabled()
                    && self.post_vector(msg.vector, msg.trigger_mode == TriggerMode::Level)
            }
            DeliveryMode::Smi => {
                self.s.smi_pending = true;
                true
            }
            DeliveryMode::Nmi => {
                // A second NMI collapses into the pending one.
                self.s.nmi_pending = true;
                true
            }
            DeliveryMode::Init => {
                if msg.trigger_mode == TriggerMode::Level && !msg.level {
                    return false;
                }
                self.receive_init();
                true
            }
            DeliveryMode::StartUp => {
                if !self.s.wait_for_sipi {
                    return false;
                }
                self.s.wait_for_sipi = false;
                self.s.startup = Some(StartupEvent::Sipi { vector: msg.vector });
                true
            }
            DeliveryMode::ExtInt => {
                if !self.is_sw_enabled() {
                    return false;
                }
                self.s.extint_pending = true;
                true
            }
            DeliveryMode::Reserved => false,
        }
    }

    /// This APIC's addressing, for destination resolution. The DFR model is
    /// flat for 0xF and cluster for any other value.
    pub fn addressing(&self) -> ApicAddressing {
        let x2apic = self.is_x2apic();
        ApicAddressing {
            apic_id: if x2apic { self.s.id } else { self.s.id & 0xFF },
            ldr: self.s.ldr,
            dfr_model: if self.s.dfr >> 28 == 0xF {
                DfrModel::Flat
            } else {
                DfrModel::Cluster
            },
            x2apic,
            hw_enabled: self.is_hw_enabled(),
            sw_enabled: self.is_sw_enabled(),
            ppr: self.ppr(),
        }
    }

    // ----- what the vCPU takes ----------------------------------------------

    /// Highest IRR vector whose priority class is above PPR's; None if there
    /// is none or the APIC is disabled.
    pub fn highest_deliverable(&self) -> Option<u8> {
        if !self.is_hw_enabled() || !self.is_sw_enabled() {
            return None;
        }
        let vector = VectorSet(self.s.irr).highest()?;
        (vector >> 4 > self.ppr() >> 4).then_some(vector)
    }

    /// INTA: move the highest deliverable vector from IRR to ISR. Returns
    /// None (and changes nothing) when nothing is deliverable.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = self.highest_deliverable()?;
        let mut irr = VectorSet(self.s.irr);
        irr.clear(vector);
        self.s.irr = irr.0;
        let mut isr = VectorSet(self.s.isr);
        isr.set(vector);
        self.s.isr = isr.0;
        Some(vector)
    }

    /// An NMI is pending.
    pub fn nmi_pending(&self) -> bool {
        self.s.nmi_pending
    }

    /// Take the pending NMI, if any. The caller tracks NMI blocking; a new NMI
    /// may become pending while the taken one is in service.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.s.nmi_pending)
    }

    /// Take a pending ExtINT (the vector then comes from the PIC's INTA).
    pub fn take_extint(&mut self) -> bool {
        std::mem::take(&mut self.s.extint_pending)
    }

    /// Take a recorded SMI (not acted upon by this model).
    pub fn take_smi(&mut self) -> bool {
        std::mem::take(&mut self.s.smi_pending)
    }

    /// Whether the PIC's INTR output reaches this CPU: LVT0 unmasked in
    /// ExtINT mode, or the APIC hardware-disabled.
    pub fn accepts_pic_interrupts(&self) -> bool {
        if !self.is_hw_enabled() {
            return true;
        }
        let lvt0 = Lvt(self.s.lvt[LvtKind::Lint0.index()]);
        !lvt0.masked() && lvt0.delivery_mode() == DeliveryMode::ExtInt
    }

    /// LVT0 is unmasked in NMI mode (the PIT NMI watchdog's target).
    pub fn lvt0_is_nmi(&self) -> bool {
        let lvt0 = Lvt(self.s.lvt[LvtKind::Lint0.index()]);
        self.is_hw_enabled() && !lvt0.masked() && lvt0.delivery_mode() == DeliveryMode::Nmi
    }

    /// Drive the LINT0 (pin 0) or LINT1 (pin 1) input; other pins are
    /// ignored. A rising edge delivers through the LVT entry: NMI makes an
    /// NMI pending, fixed posts the vector (as edge; remote IRR is not
    /// modelled), SMI and INIT as their messages. ExtINT is left to the
    /// integrator ([`Lapic::accepts_pic_interrupts`]).
    pub fn set_lint(&mut self, pin: u8, level: bool) {
        let kind = match pin {
            0 => LvtKind::Lint0,
            1 => LvtKind::Lint1,
            _ => return,
        };
        let Some(old) = self.s.lint_level.get_mut(usize::from(pin)) else {
            return;
        };
        let rising = level && !*old;
        *old = level;
        if !rising || !self.is_hw_enabled() {
            return;
        }
        if Lvt(self.s.lvt[kind.index()]).delivery_mode() != DeliveryMode::ExtInt {
            self.local_deliver(kind);
        }
    }

    /// A performance-counter overflow: deliver through LVT perf, which then
    /// masks itself (as hardware does). Returns whether it was delivered.
    pub fn perf_interrupt(&mut self) -> bool {
        let delivered = self.local_deliver(LvtKind::Perf);
        if delivered {
            self.s.lvt[LvtKind::Perf.index()] |= Lvt::MASKED;
        }
        delivered
    }

    /// A thermal event: deliver through LVT thermal.
    pub fn thermal_interrupt(&mut self) -> bool {
        self.local_deliver(LvtKind::Thermal)
    }

    /// Take the INIT/SIPI outcome, if any. Only the latest is kept: an INIT
    /// followed by a SIPI before the caller looked reports just the SIPI,
    /// which implies the INIT reset. INIT on the BSP resets it too; the BSP
    /// then restarts at the reset vector instead of waiting for SIPI. SIPI
    /// outside wait-for-SIPI is ignored.
    pub fn take_startup(&mut self) -> Option<StartupEvent> {
        self.s.startup.take()
    }

    /// What firmware sets up before handing over to an OS (the "virtual
    /// wire"): software-enable with spurious vector 0xFF, LINT0 ExtINT and
    /// LINT1 NMI, unmasked. Power-on leaves every LVT masked.
    pub fn setup_virtual_wire(&mut self) {
        self.write_svr(Svr::ENABLE | 0xFF);
        self.write_lvt(LvtKind::Lint0, DeliveryMode::ExtInt.bits() << 8);
        self.write_lvt(LvtKind::Lint1, DeliveryMode::Nmi.bits() << 8);
    }

    // ----- priorities and mode ----------------------------------------------

    /// The highest vector in service, if any.
    pub fn highest_in_service(&self) -> Option<u8> {
        VectorSet(self.s.isr).highest()
    }

    /// Whether the interrupt in service is an edge one (TMR clear) with
    /// nothing waiting in IRR: then its EOI can be paravirtual (KVM's
    /// PV-EOI), because ending it needs no exit to deliver anything next.
    pub fn pv_eoi_allowed(&self) -> bool {
        let Some(vector) = self.highest_in_service() else {
            return false;
        };
        !VectorSet(self.s.tmr).test(vector) && VectorSet(self.s.irr).highest().is_none()
    }

    /// The EOI the guest did through the paravirtual flag, as if it had
    /// written the EOI register.
    pub fn pv_eoi(&mut self) -> LapicEffects {
        LapicEffects {
            eoi: self.eoi(),
            ..LapicEffects::default()
        }
    }

    /// Task priority (CR8 is `tpr() >> 4`).
    pub fn tpr(&self) -> u8 {
        self.s.tpr
    }

    /// Set the task priority (from CR8: `cr8 << 4`).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.s.tpr = tpr;
    }

    /// Processor priority: TPR if its class is at least the highest
    /// in-service class, else that class.
    pub fn ppr(&self) -> u8 {
        let isrv = VectorSet(self.s.isr).highest().unwrap_or(0);
        if self.s.tpr >> 4 >= isrv >> 4 {
            self.s.tpr
        } else {
            isrv & 0xF0
        }
    }

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.s.apic_base
    }

    /// In x2APIC mode.
    pub fn is_x2apic(&self) -> bool {
        ApicBase(self.s.apic_base).x2apic()
    }

    /// Hardware-enabled (APIC_BASE bit 11).
    pub fn is_hw_enabled(&self) -> bool {
        ApicBase(self.s.apic_base).enabled()
    }

    /// Software-enabled (SVR bit 8).
    pub fn is_sw_enabled(&self) -> bool {
        Svr(self.s.svr).enabled()
    }

    fn is_xapic_mode(&self) -> bool {
        self.is_hw_enabled() && !self.is_x2apic()
    }

    /// INIT reset: every register to its power-on value except the APIC ID
    /// and APIC_BASE (so x2APIC mode and its derived LDR survive). Pending
    /// NMI/ExtINT/SMI are dropped, an AP enters wait-for-SIPI. The pending
    /// startup event and the pin levels are kept.
    pub fn init_reset(&mut self) {
        let s = &mut self.s;
        s.tpr = 0;
        s.ldr = if ApicBase(s.apic_base).x2apic() {
            x2apic_ldr(s.id)
        } else {
            0
        };
        s.dfr = u32::MAX;
        s.svr = Svr::RESET;
        s.isr = [0; 8];
        s.tmr = [0; 8];
        s.irr = [0; 8];
        s.esr = 0;
        s.esr_pending = 0;
        s.icr = 0;
        s.lvt = [Lvt::MASKED; 6];
        s.tmict = 0;
        s.tdcr = 0;
        s.timer_next_ns = None;
        s.timer_backlog = 0;
        s.tsc_deadline = 0;
        s.timer_restart_pending = false;
        s.nmi_pending = false;
        s.extint_pending = false;
        s.smi_pending = false;
        s.wait_for_sipi = !s.config.bsp;
    }

    // ----- snapshot ---------------------------------------------------------

    /// The complete state.
    pub fn save(&self) -> LapicState {
        self.s.clone()
    }

    /// Replace the state with a validated snapshot. The snapshot carries its
    /// own [`LapicConfig`], which replaces this APIC's.
    pub fn restore(&mut self, state: &LapicState) -> Result<(), LapicError> {
        validate(state)?;
        self.s = state.clone();
        Ok(())
    }

    /// KVM's `kvm_lapic_state` register page: the xAPIC layout, the ID as the
    /// full 32-bit x2APIC ID in x2APIC mode (KVM's x2APIC API), ICR high half
    /// at 0x310, TMCCT as 0 (KVM restarts the timer from TMICT on load).
    pub fn to_kvm_register_page(&self) -> [u8; 1024] {
        let mut page = [0u8; 1024];
        let x2apic = self.is_x2apic();
        for reg in 0..0x40u32 {
            let value = match reg {
                regs::ID if x2apic => self.s.id,
                regs::ID => (self.s.id & 0xFF) << 24,
                regs::APR | regs::EOI | regs::RRD | regs::TMCCT => 0,
                regs::LDR => self.s.ldr,
                regs::DFR => self.s.dfr,
                regs::ICR => self.s.icr as u32,
                regs::ICR2 => (self.s.icr >> 32) as u32,
                _ => self.common_read(reg, 0).unwrap_or(0),
            };
            let at = reg as usize * 16;
            if let Some(slot) = page.get_mut(at..at + 4) {
                slot.copy_from_slice(&value.to_le_bytes());
            }
        }
        page
    }

    /// Load a KVM register page (see [`Lapic::to_kvm_register_page`]).
    /// Read-only and reserved bits are masked off; in x2APIC mode the ID must
    /// be this APIC's x2APIC ID and LDR stays derived from it. The timer is
    /// re-armed from TMICT at the next call that carries a time
    /// ([`Lapic::next_deadline`] returns `Some(0)` until then); a TSC
    /// deadline is not part of the page and is disarmed.
    pub fn load_kvm_register_page(&mut self, page: &[u8; 1024]) -> Result<(), LapicError> {
        let get = |reg: u32| -> u32 {
            let at = reg as usize * 16;
            page.get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, u32::from_le_bytes)
        };
        let x2apic = self.is_x2apic();
        if x2apic && get(regs::ID) != self.s.id {
            return Err(LapicError::X2apicIdMismatch {
                found: get(regs::ID),
                expected: self.s.id,
            });
        }
        let s = &mut self.s;
        if !x2apic {
            s.id = get(regs::ID) >> 24;
            s.ldr = get(regs::LDR) & 0xFF00_0000;
            s.dfr = get(regs::DFR) | DFR_FIXED_ONES;
        }
        s.tpr = get(regs::TPR) as u8;
        s.svr = get(regs::SVR) & Svr::writable_mask(s.config.directed_eoi);
        for i in 0..8u32 {
            let w = i as usize;
            s.isr[w] = get(regs::ISR0 + i);
            s.tmr[w] = get(regs::TMR0 + i);
            s.irr[w] = get(regs::IRR0 + i);
        }
        s.esr = get(regs::ESR) & regs::ESR_DEFINED;
        s.esr_pending = 0;
        let high_mask = if x2apic {
            u32::MAX
        } else {
            Icr::XAPIC_HIGH_WRITABLE
        };
        s.icr = u64::from(get(regs::ICR) & Icr::LOW_WRITABLE)
            | (u64::from(get(regs::ICR2) & high_mask) << 32);
        let sw_enabled = Svr(s.svr).enabled();
        for kind in LvtKind::ALL {
            let mut v = get(regs::LVT_TIMER + kind.index() as u32) & kind.writable_mask();
            if !sw_enabled {
                v |= Lvt::MASKED;
            }
            s.lvt[kind.index()] = v;
        }
        s.tmict = get(regs::TMICT);
        s.tdcr = get(regs::TDCR) & Tdcr::MASK;
        s.timer_next_ns = None;
        s.tsc_deadline = 0;
        s.timer_restart_pending = s.tmict != 0
            && Lvt(s.lvt[LvtKind::Timer.index()]).timer_mode() != TimerMode::TscDeadline;
        Ok(())
    }
}

/// The x2APIC logical ID: cluster (id >> 4) in bits 31:16, bit (id & 15) below.
fn x2apic_ldr(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 15))
}

/// Reject snapshots no guest could have produced.
fn validate(s: &LapicState) -> Result<(), LapicError> {
    let base = ApicBase(s.apic_base);
    if s.apic_base & !ApicBase::DEFINED != 0 || !base.valid_mode() {
        return Err(LapicError::InvalidState(
            "APIC_BASE has reserved bits or an invalid mode",
        ));
    }
    if (s.apic_base & ApicBase::BSP != 0) != s.config.bsp {
        return Err(LapicError::InvalidState(
            "APIC_BASE BSP bit disagrees with the config",
        ));
    }
    if base.x2apic() && s.ldr != x2apic_ldr(s.id) {
        return Err(LapicError::InvalidState(
            "x2APIC LDR is not derived from the ID",
        ));
    }
    if s.dfr & DFR_FIXED_ONES != DFR_FIXED_ONES {
        return Err(LapicError::InvalidState("DFR bits 27:0 must be ones"));
    }
    if s.svr & !Svr::writable_mask(s.config.directed_eoi) != 0 {
        return Err(LapicError::InvalidState("SVR has reserved bits"));
    }
    for kind in LvtKind::ALL {
        if s.lvt[kind.index()] & !kind.writable_mask() != 0 {
            return Err(LapicError::InvalidState("LVT entry has reserved bits"));
        }
    }
    if s.tdcr & !Tdcr::MASK != 0 {
        return Err(LapicError::InvalidState("TDCR has reserved bits"));
    }
    if u64::from(s.timer_backlog) > MAX_TIMER_BACKLOG {
        return Err(LapicError::InvalidState(
            "timer backlog above the backlog window at the fastest period",
        ));
    }
    if (s.esr | s.esr_pending) & !regs::ESR_DEFINED != 0 {
        return Err(LapicError::InvalidState("ESR has reserved bits"));
    }
    let mode = Lvt(s.lvt[LvtKind::Timer.index()]).timer_mode();
    if s.timer_next_ns.is_some() && mode != TimerMode::TscDeadline && s.tmict == 0 {
        return Err(LapicError::InvalidState(
            "timer armed with a zero initial count",
        ));
    }
    if s.tsc_deadline != 0 && mode != TimerMode::TscDeadline {
        return Err(LapicError::InvalidState(
            "TSC deadline armed outside TSC-deadline mode",
        ));
    }
    if s.wait_for_sipi && s.config.bsp {
        return Err(LapicError::InvalidState("the BSP cannot wait for SIPI"));
    }
    Ok(())
}
