//! Register indices and typed views of the local APIC registers.
//!
//! A register index is the xAPIC MMIO offset divided by 16, which is also the
//! x2APIC MSR number minus 0x800, so one table serves both interfaces.

use crate::delivery::{DeliveryMode, DestinationMode, Shorthand, TriggerMode};

/// Local APIC ID.
pub const ID: u32 = 0x02;
/// Version (read-only).
pub const VERSION: u32 = 0x03;
/// Task priority.
pub const TPR: u32 = 0x08;
/// Arbitration priority (xAPIC only; reads 0 here).
pub const APR: u32 = 0x09;
/// Processor priority (read-only).
pub const PPR: u32 = 0x0A;
/// End of interrupt (write-only).
pub const EOI: u32 = 0x0B;
/// Remote read (xAPIC only; reads 0 here).
pub const RRD: u32 = 0x0C;
/// Logical destination.
pub const LDR: u32 = 0x0D;
/// Destination format (xAPIC only).
pub const DFR: u32 = 0x0E;
/// Spurious interrupt vector.
pub const SVR: u32 = 0x0F;
/// First of the eight in-service registers.
pub const ISR0: u32 = 0x10;
/// First of the eight trigger-mode registers.
pub const TMR0: u32 = 0x18;
/// First of the eight interrupt-request registers.
pub const IRR0: u32 = 0x20;
/// Error status.
pub const ESR: u32 = 0x28;
/// Interrupt command, low half (x2APIC: the whole 64-bit ICR).
pub const ICR: u32 = 0x30;
/// Interrupt command, high half (xAPIC only).
pub const ICR2: u32 = 0x31;
/// First LVT entry (timer); the six entries are consecutive.
pub const LVT_TIMER: u32 = 0x32;
/// Timer initial count.
pub const TMICT: u32 = 0x38;
/// Timer current count (read-only).
pub const TMCCT: u32 = 0x39;
/// Timer divide configuration.
pub const TDCR: u32 = 0x3E;
/// Self IPI (x2APIC only, write-only).
pub const SELF_IPI: u32 = 0x3F;

/// ESR bit 5: an ICR write named an illegal vector (0-15).
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit 6: an illegal vector (0-15) was received.
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
/// ESR bits that exist (0-3, 5-7); the others read 0.
pub const ESR_DEFINED: u32 = 0xEF;

/// The six LVT entries, in register order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LvtKind {
    /// APIC timer.
    Timer,
    /// Thermal sensor.
    Thermal,
    /// Performance-counter overflow.
    Perf,
    /// LINT0 pin.
    Lint0,
    /// LINT1 pin.
    Lint1,
    /// APIC internal error.
    Error,
}

impl LvtKind {
    /// All entries in register order; `ALL[i]` lives at `LVT_TIMER + i`.
    pub const ALL: [LvtKind; 6] = [
        LvtKind::Timer,
        LvtKind::Thermal,
        LvtKind::Perf,
        LvtKind::Lint0,
        LvtKind::Lint1,
        LvtKind::Error,
    ];

    /// Index into the LVT array.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The entry at register index `reg`, if it is an LVT register.
    pub fn from_reg(reg: u32) -> Option<Self> {
        let i = reg.checked_sub(LVT_TIMER)?;
        Self::ALL.get(i as usize).copied()
    }

    /// Bits the guest can change.
    pub fn writable_mask(self) -> u32 {
        const VECTOR: u32 = 0xFF;
        const MODE: u32 = 0x700;
        match self {
            LvtKind::Timer => VECTOR | Lvt::MASKED | Lvt::TIMER_MODE,
            LvtKind::Thermal | LvtKind::Perf => VECTOR | MODE | Lvt::MASKED,
            LvtKind::Lint0 | LvtKind::Lint1 => {
                VECTOR | MODE | Lvt::POLARITY | Lvt::TRIGGER_LEVEL | Lvt::MASKED
            }
            LvtKind::Error => VECTOR | Lvt::MASKED,
        }
    }

    /// Bits that exist (writable or read-only); writing any other bit through
    /// an x2APIC MSR raises #GP.
    pub fn defined_mask(self) -> u32 {
        let ro = match self {
            LvtKind::Lint0 | LvtKind::Lint1 => Lvt::DELIVERY_STATUS | Lvt::REMOTE_IRR,
            _ => Lvt::DELIVERY_STATUS,
        };
        self.writable_mask() | ro
    }

    /// Whether the entry has a delivery-mode field (timer and error are always fixed).
    pub fn has_delivery_mode(self) -> bool {
        !matches!(self, LvtKind::Timer | LvtKind::Error)
    }
}

/// Timer mode (LVT timer bits 18:17).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    /// Count down once.
    OneShot,
    /// Count down and reload.
    Periodic,
    /// Fire when the guest TSC reaches IA32_TSC_DEADLINE.
    TscDeadline,
    /// Encoding 3 is reserved; it behaves as one-shot here.
    Reserved,
}

/// One LVT entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lvt(pub u32);

impl Lvt {
    /// Bit 12: delivery status (always idle here).
    pub const DELIVERY_STATUS: u32 = 1 << 12;
    /// Bit 13: input pin polarity (LINT only).
    pub const POLARITY: u32 = 1 << 13;
    /// Bit 14: remote IRR (LINT only, read-only; not modelled, reads 0).
    pub const REMOTE_IRR: u32 = 1 << 14;
    /// Bit 15: level trigger (LINT only).
    pub const TRIGGER_LEVEL: u32 = 1 << 15;
    /// Bit 16: masked.
    pub const MASKED: u32 = 1 << 16;
    /// Bits 18:17: timer mode (timer only).
    pub const TIMER_MODE: u32 = 3 << 17;

    /// Vector (bits 7:0).
    pub fn vector(self) -> u8 {
        (self.0 & 0xFF) as u8
    }

    /// Whether the entry is masked.
    pub fn masked(self) -> bool {
        self.0 & Self::MASKED != 0
    }

    /// Delivery mode (bits 10:8).
    pub fn delivery_mode(self) -> DeliveryMode {
        DeliveryMode::from_bits(self.0 >> 8)
    }

    /// Timer mode (bits 18:17; meaningful for the timer entry only).
    pub fn timer_mode(self) -> TimerMode {
        match (self.0 >> 17) & 3 {
            0 => TimerMode::OneShot,
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::Reserved,
        }
    }
}

/// Spurious interrupt vector register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Svr(pub u32);

impl Svr {
    /// Bit 8: APIC software enable.
    pub const ENABLE: u32 = 1 << 8;
    /// Bit 12: suppress EOI broadcasts (directed EOI).
    pub const SUPPRESS_EOI_BROADCAST: u32 = 1 << 12;
    /// Value after reset.
    pub const RESET: u32 = 0xFF;

    /// Bits the guest can change: vector, enable, focus check, and bit 12
    /// only when EOI-broadcast suppression is advertised.
    pub fn writable_mask(directed_eoi: bool) -> u32 {
        0x3FF
            | if directed_eoi {
                Self::SUPPRESS_EOI_BROADCAST
            } else {
                0
            }
    }

    /// Whether the APIC is software-enabled.
    pub fn enabled(self) -> bool {
        self.0 & Self::ENABLE != 0
    }

    /// Whether EOI broadcasts to the IOAPIC are suppressed.
    pub fn suppress_eoi_broadcast(self) -> bool {
        self.0 & Self::SUPPRESS_EOI_BROADCAST != 0
    }
}

/// The interrupt command register, as one 64-bit value (xAPIC: ICR2 in the
/// high half, destination in bits 63:56; x2APIC: destination in 63:32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Icr(pub u64);

impl Icr {
    /// Bits of the low half the guest can set (status bit 12 reads idle).
    pub const LOW_WRITABLE: u32 = 0x000C_CFFF;
    /// Bits of the high half that exist in xAPIC mode.
    pub const XAPIC_HIGH_WRITABLE: u32 = 0xFF00_0000;
    /// Delivery status (bit 12): always reads idle.
    pub const DELIVERY_STATUS: u64 = 1 << 12;
    /// Bits a write to the x2APIC ICR MSR may set; the rest (13, 17:16,
    /// 31:20) raise #GP. The delivery-status bit is accepted and dropped, as
    /// KVM does.
    pub const X2APIC_DEFINED: u64 =
        0xFFFF_FFFF_0000_0000 | Self::LOW_WRITABLE as u64 | Self::DELIVERY_STATUS;

    /// Vector (bits 7:0).
    pub fn vector(self) -> u8 {
        (self.0 & 0xFF) as u8
    }

    /// Delivery mode (bits 10:8).
    pub fn delivery_mode(self) -> DeliveryMode {
        DeliveryMode::from_bits((self.0 >> 8) as u32)
    }

    /// Destination mode (bit 11).
    pub fn destination_mode(self) -> DestinationMode {
        if self.0 & (1 << 11) != 0 {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        }
    }

    /// Level (bit 14): assert or de-assert.
    pub fn level(self) -> bool {
        self.0 & (1 << 14) != 0
    }

    /// Trigger mode (bit 15).
    pub fn trigger_mode(self) -> TriggerMode {
        if self.0 & (1 << 15) != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        }
    }

    /// Destination shorthand (bits 19:18).
    pub fn shorthand(self) -> Shorthand {
        Shorthand::from_bits((self.0 >> 18) as u32)
    }

    /// xAPIC destination (bits 63:56).
    pub fn xapic_destination(self) -> u32 {
        (self.0 >> 56) as u32
    }

    /// x2APIC destination (bits 63:32).
    pub fn x2apic_destination(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// IA32_APIC_BASE MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicBase(pub u64);

impl ApicBase {
    /// Bit 8: this is the bootstrap processor (read-only).
    pub const BSP: u64 = 1 << 8;
    /// Bit 10: x2APIC mode.
    pub const X2APIC: u64 = 1 << 10;
    /// Bit 11: APIC global enable.
    pub const ENABLE: u64 = 1 << 11;
    /// Bits 51:12: base address (a 52-bit physical address width is assumed).
    pub const ADDRESS: u64 = 0x000F_FFFF_FFFF_F000;
    /// Bits a write may set without #GP (BSP is accepted and ignored).
    pub const DEFINED: u64 = Self::ADDRESS | Self::ENABLE | Self::X2APIC | Self::BSP;

    /// Whether the APIC is globally enabled.
    pub fn enabled(self) -> bool {
        self.0 & Self::ENABLE != 0
    }

    /// Whether x2APIC mode is selected.
    pub fn x2apic(self) -> bool {
        self.0 & Self::X2APIC != 0
    }

    /// A legal (enable, x2APIC) combination: x2APIC without enable is invalid.
    pub fn valid_mode(self) -> bool {
        self.enabled() || !self.x2apic()
    }
}

/// Timer divide configuration register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tdcr(pub u32);

impl Tdcr {
    /// Bits that exist (1:0 and 3).
    pub const MASK: u32 = 0xB;

    /// Divisor: 2^(((bits 1:0) | (bit 3) << 2) + 1) & 7), i.e. 2..128, or 1 for 0b1011.
    pub fn divisor(self) -> u64 {
        let code = (self.0 & 3) | ((self.0 >> 1) & 4);
        1 << ((code + 1) & 7)
    }
}

/// A 256-bit vector set stored as eight 32-bit words, the way the IRR, ISR
/// and TMR registers are laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VectorSet(pub [u32; 8]);

impl VectorSet {
    /// Whether `vector` is in the set.
    pub fn test(&self, vector: u8) -> bool {
        self.0[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
    }

    /// Add `vector`.
    pub fn set(&mut self, vector: u8) {
        self.0[usize::from(vector >> 5)] |= 1 << (vector & 31);
    }

    /// Remove `vector`.
    pub fn clear(&mut self, vector: u8) {
        self.0[usize::from(vector >> 5)] &= !(1 << (vector & 31));
    }

    /// Set or clear `vector`.
    pub fn assign(&mut self, vector: u8, on: bool) {
        if on {
            self.set(vector)
        } else {
            self.clear(vector)
        }
    }

    /// The highest vector in the set.
    pub fn highest(&self) -> Option<u8> {
        (0..8usize).rev().find_map(|i| {
            let w = self.0[i];
            (w != 0).then(|| (i as u8) * 32 + (31 - w.leading_zeros() as u8))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tdcr_divisors_follow_the_encoding() {
        let expect = [
            (0x0, 2),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0x9, 64),
            (0xA, 128),
            (0xB, 1),
        ];
        for (bits, div) in expect {
            assert_eq!(Tdcr(bits).divisor(), div, "tdcr {bits:#x}");
        }
    }

    #[test]
    fn vector_set_highest_finds_top_bit() {
        let mut s = VectorSet::default();
        assert_eq!(s.highest(), None);
        s.set(0x31);
        s.set(0xFE);
        assert_eq!(s.highest(), Some(0xFE));
        s.clear(0xFE);
        assert_eq!(s.highest(), Some(0x31));
        assert!(s.test(0x31));
        assert!(!s.test(0x30));
    }
}
