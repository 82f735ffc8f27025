//! MSR interface: IA32_APIC_BASE, IA32_TSC_DEADLINE and the x2APIC registers.
//!
//! x2APIC accesses are strict where the xAPIC page is lenient: reading a
//! write-only or absent register, writing a read-only or absent one, setting
//! a reserved bit, or any access while not in x2APIC mode raises #GP.

use super::regs::{self, ApicBase, Icr, LvtKind, Svr, Tdcr};
use super::{
    x2apic_ldr, Lapic, LapicEffects, MSR_APIC_BASE, MSR_TSC_DEADLINE, MSR_X2APIC_FIRST,
    MSR_X2APIC_LAST,
};
use crate::delivery::{
    DeliveryMode, DestinationFormat, DestinationMode, InterruptMessage, Shorthand, TriggerMode,
};
use crate::RaiseGp;

impl Lapic {
    /// Read an MSR: [`MSR_APIC_BASE`], [`MSR_TSC_DEADLINE`] or the x2APIC
    /// range. #GP for x2APIC MSRs outside x2APIC mode, write-only or absent
    /// registers, and any other MSR.
    pub fn msr_read(&mut self, msr: u32, now_ns: u64) -> Result<u64, RaiseGp> {
        match msr {
            MSR_APIC_BASE => Ok(self.s.apic_base),
            MSR_TSC_DEADLINE => {
                self.advance(now_ns);
                Ok(self.read_tsc_deadline())
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST if self.is_x2apic() => {
                self.advance(now_ns);
                self.x2apic_read(msr - MSR_X2APIC_FIRST, now_ns)
            }
            _ => Err(RaiseGp),
        }
    }

    /// Write an MSR (see [`Lapic::msr_read`] for what raises #GP; also
    /// reserved bits and illegal APIC_BASE transitions).
    pub fn msr_write(
        &mut self,
        msr: u32,
        value: u64,
        now_ns: u64,
    ) -> Result<LapicEffects, RaiseGp> {
        match msr {
            MSR_APIC_BASE => {
                self.write_apic_base(value)?;
                Ok(LapicEffects::default())
            }
            MSR_TSC_DEADLINE => {
                self.advance(now_ns);
                self.write_tsc_deadline(value, now_ns);
                Ok(LapicEffects::default())
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST if self.is_x2apic() => {
                self.advance(now_ns);
                let effects = self.x2apic_write(msr - MSR_X2APIC_FIRST, value, now_ns)?;
                self.advance(now_ns);
                Ok(effects)
            }
            _ => Err(RaiseGp),
        }
    }

    fn x2apic_read(&self, reg: u32, now_ns: u64) -> Result<u64, RaiseGp> {
        match reg {
            regs::ID => Ok(u64::from(self.s.id)),
            regs::LDR => Ok(u64::from(self.s.ldr)),
            regs::ICR => Ok(self.s.icr),
            // Absent in x2APIC mode even though the xAPIC page has them.
            regs::APR | regs::RRD | regs::DFR | regs::ICR2 => Err(RaiseGp),
            _ => self.common_read(reg, now_ns).map(u64::from).ok_or(RaiseGp),
        }
    }

    fn x2apic_write(&mut self, reg: u32, value: u64, now_ns: u64) -> Result<LapicEffects, RaiseGp> {
        let mut effects = LapicEffects::default();
        if reg == regs::ICR {
            if value & !Icr::X2APIC_DEFINED != 0 {
                return Err(RaiseGp);
            }
            let value = value & !Icr::DELIVERY_STATUS;
            self.s.icr = value;
            effects.ipi = self.send_ipi(
                Icr(value),
                Icr(value).x2apic_destination(),
                DestinationFormat::X2Apic,
            );
            return Ok(effects);
        }
        let allowed: u32 = match reg {
            regs::TPR | regs::SELF_IPI => 0xFF,
            // EOI and ESR take only 0.
            regs::EOI | regs::ESR => 0,
            regs::SVR => Svr::writable_mask(self.s.config.directed_eoi),
            regs::TMICT => u32::MAX,
            regs::TDCR => Tdcr::MASK,
            r => match LvtKind::from_reg(r) {
                Some(kind) => kind.defined_mask(),
                // Read-only, absent or reserved.
                None => return Err(RaiseGp),
            },
        };
        let Ok(value) = u32::try_from(value) else {
            return Err(RaiseGp);
        };
        if value & !allowed != 0 {
            return Err(RaiseGp);
        }
        if reg == regs::SELF_IPI {
            effects.ipi = Some(self.self_ipi(value as u8));
        } else {
            effects.eoi = self.common_write(reg, value, now_ns);
        }
        Ok(effects)
    }

    /// SELF_IPI: a fixed edge IPI to this APIC, through the bus like any other.
    fn self_ipi(&self, vector: u8) -> InterruptMessage {
        InterruptMessage {
            vector,
            delivery_mode: DeliveryMode::Fixed,
            destination_mode: DestinationMode::Physical,
            trigger_mode: TriggerMode::Edge,
            level: true,
            destination: self.s.id,
            format: DestinationFormat::X2Apic,
            shorthand: Shorthand::SelfOnly,
            source: Some(self.s.config.vcpu_index),
        }
    }

    /// IA32_APIC_BASE write. Legal moves: disabled <-> xAPIC, xAPIC ->
    /// x2APIC, x2APIC -> disabled. #GP on reserved bits, x2APIC -> xAPIC,
    /// disabled -> x2APIC, and x2APIC without enable. The BSP bit is
    /// read-only: the written value is ignored. Disabling resets the APIC to
    /// its power-on register state with the initial APIC ID; entering x2APIC
    /// mode sets the ID to the initial (32-bit) APIC ID and derives LDR.
    fn write_apic_base(&mut self, value: u64) -> Result<(), RaiseGp> {
        let old = ApicBase(self.s.apic_base);
        let new = ApicBase(value);
        if value & !ApicBase::DEFINED != 0 || !new.valid_mode() {
            return Err(RaiseGp);
        }
        let x2apic_to_xapic = old.x2apic() && new.enabled() && !new.x2apic();
        let disabled_to_x2apic = !old.enabled() && new.x2apic();
        if x2apic_to_xapic || disabled_to_x2apic {
            return Err(RaiseGp);
        }
        let bsp = if self.s.config.bsp { ApicBase::BSP } else { 0 };
        self.s.apic_base = (value & !ApicBase::BSP) | bsp;
        if old.enabled() && !new.enabled() {
            self.s.id = self.s.config.apic_id;
            let wait_for_sipi = self.s.wait_for_sipi;
            self.init_reset();
            self.s.wait_for_sipi = wait_for_sipi;
        } else if !old.x2apic() && new.x2apic() {
            self.s.id = self.s.config.apic_id;
            self.s.ldr = x2apic_ldr(self.s.id);
        }
        Ok(())
    }
}
