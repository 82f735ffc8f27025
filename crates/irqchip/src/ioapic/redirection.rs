//! The 64-bit redirection table entry (82093AA datasheet, section 3.2.4).

use serde::{Deserialize, Serialize};

use crate::delivery::{
    DeliveryMode, DestinationFormat, DestinationMode, InterruptMessage, Shorthand, TriggerMode,
};

/// Input pin polarity (RTE bit 13).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Polarity {
    /// The pin is asserted while its line is high.
    ActiveHigh,
    /// The pin is asserted while its line is low.
    ActiveLow,
}

/// One redirection table entry, as a typed view over its 64 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Redirection(u64);

impl Redirection {
    const VECTOR_MASK: u64 = 0xFF;
    const DELIVERY_MODE_SHIFT: u32 = 8;
    const DESTINATION_MODE: u64 = 1 << 11;
    const DELIVERY_STATUS: u64 = 1 << 12;
    const POLARITY: u64 = 1 << 13;
    const REMOTE_IRR: u64 = 1 << 14;
    const TRIGGER_MODE: u64 = 1 << 15;
    const MASK: u64 = 1 << 16;
    /// Destination bits 14:8 in bits 55:49: the extended destination ID
    /// convention guests use for more than 255 APIC IDs (same as MSI).
    const EXT_DEST_SHIFT: u32 = 49;
    const EXT_DEST_MASK: u64 = 0x7F << Self::EXT_DEST_SHIFT;
    const DEST_SHIFT: u32 = 56;

    /// Bits a guest can change: vector, delivery mode, destination mode,
    /// polarity, trigger mode, mask, extended destination and destination.
    pub const WRITABLE: u64 = 0xFF
        | (7 << Self::DELIVERY_MODE_SHIFT)
        | Self::DESTINATION_MODE
        | Self::POLARITY
        | Self::TRIGGER_MODE
        | Self::MASK
        | Self::EXT_DEST_MASK
        | (0xFF << Self::DEST_SHIFT);

    /// Bits the device owns and the guest only reads.
    pub const READ_ONLY: u64 = Self::DELIVERY_STATUS | Self::REMOTE_IRR;

    /// The reset value: masked, everything else zero.
    pub const RESET: Self = Self(Self::MASK);

    /// Wrap raw bits (no validation; see [`Redirection::reserved_bits`]).
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw 64 bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Bits set outside the writable and read-only fields.
    pub const fn reserved_bits(self) -> u64 {
        self.0 & !(Self::WRITABLE | Self::READ_ONLY)
    }

    /// The low dword (IOREGSEL 0x10 + 2n).
    pub const fn low(self) -> u32 {
        self.0 as u32
    }

    /// The high dword (IOREGSEL 0x11 + 2n).
    pub const fn high(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// Vector (bits 7:0).
    pub const fn vector(self) -> u8 {
        (self.0 & Self::VECTOR_MASK) as u8
    }

    /// Delivery mode (bits 10:8).
    pub fn delivery_mode(self) -> DeliveryMode {
        DeliveryMode::from_bits((self.0 >> Self::DELIVERY_MODE_SHIFT) as u32)
    }

    /// Destination mode (bit 11).
    pub const fn destination_mode(self) -> DestinationMode {
        if self.0 & Self::DESTINATION_MODE != 0 {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        }
    }

    /// Delivery status (bit 12, read-only). Delivery here is synchronous, so
    /// a message is never left "send pending" and this always reads idle.
    pub const fn delivery_status(self) -> bool {
        self.0 & Self::DELIVERY_STATUS != 0
    }

    /// Input pin polarity (bit 13).
    pub const fn polarity(self) -> Polarity {
        if self.0 & Self::POLARITY != 0 {
            Polarity::ActiveLow
        } else {
            Polarity::ActiveHigh
        }
    }

    /// Remote IRR (bit 14, read-only): a level interrupt was accepted and
    /// its EOI has not come back yet.
    pub const fn remote_irr(self) -> bool {
        self.0 & Self::REMOTE_IRR != 0
    }

    /// Trigger mode (bit 15).
    pub const fn trigger_mode(self) -> TriggerMode {
        if self.0 & Self::TRIGGER_MODE != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        }
    }

    /// Whether the entry is level-triggered.
    pub const fn is_level(self) -> bool {
        self.0 & Self::TRIGGER_MODE != 0
    }

    /// Interrupt mask (bit 16).
    pub const fn masked(self) -> bool {
        self.0 & Self::MASK != 0
    }

    /// Destination field (bits 63:56).
    pub const fn destination(self) -> u8 {
        (self.0 >> Self::DEST_SHIFT) as u8
    }

    /// Extended destination ID (bits 55:49): destination bits 14:8.
    pub const fn extended_destination(self) -> u8 {
        ((self.0 & Self::EXT_DEST_MASK) >> Self::EXT_DEST_SHIFT) as u8
    }

    /// The destination the message carries: bits 7:0 from the destination
    /// field, bits 14:8 from the extended destination ID.
    pub const fn message_destination(self) -> u32 {
        self.destination() as u32 | ((self.extended_destination() as u32) << 8)
    }

    /// The same entry with remote IRR set or cleared.
    pub const fn with_remote_irr(self, set: bool) -> Self {
        if set {
            Self(self.0 | Self::REMOTE_IRR)
        } else {
            Self(self.0 & !Self::REMOTE_IRR)
        }
    }

    /// The entry after a guest writes `value` to one half: only writable
    /// bits of that half change; the read-only status bits are kept.
    pub const fn guest_write(self, high: bool, value: u32) -> Self {
        let (shift, half) = if high {
            (32, 0xFFFF_FFFF << 32)
        } else {
            (0, 0xFFFF_FFFF)
        };
        let keep = !(half & Self::WRITABLE);
        let new = ((value as u64) << shift) & half & Self::WRITABLE;
        Self((self.0 & keep) | new)
    }

    /// Whether a line at electrical `level` asserts this pin.
    pub const fn asserted(self, level: bool) -> bool {
        match self.polarity() {
            Polarity::ActiveHigh => level,
            Polarity::ActiveLow => !level,
        }
    }

    /// The APIC bus message this entry sends.
    pub fn message(self) -> InterruptMessage {
        InterruptMessage {
            vector: self.vector(),
            delivery_mode: self.delivery_mode(),
            destination_mode: self.destination_mode(),
            trigger_mode: self.trigger_mode(),
            level: true,
            destination: self.message_destination(),
            format: DestinationFormat::XApic,
            shorthand: Shorthand::None,
            source: None,
        }
    }
}

impl Default for Redirection {
    fn default() -> Self {
        Self::RESET
    }
}
