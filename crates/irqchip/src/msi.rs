//! Message signalled interrupts: the address/data pair a device writes,
//! decoded into an APIC bus [`InterruptMessage`].
//!
//! Without an IOMMU, an MSI is a 32-bit write to 0xFEEx_xxxx: the address
//! carries the destination, the data the vector and delivery mode.

use serde::{Deserialize, Serialize};

use crate::delivery::{
    DeliveryMode, DestinationFormat, DestinationMode, InterruptMessage, Shorthand, TriggerMode,
};

/// The fixed upper bits of an interrupt address (bits 31:20 = 0xFEE, 63:32 = 0).
const INTERRUPT_ADDRESS_BASE: u64 = 0xFEE0_0000;
/// Bits that must equal [`INTERRUPT_ADDRESS_BASE`].
const INTERRUPT_ADDRESS_MASK: u64 = !0xF_FFFF;

/// One MSI write: the address and the data the device wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MsiMessage {
    /// Address (0xFEEx_xxxx for an interrupt).
    pub address: u64,
    /// Data (only the low 16 bits have a meaning).
    pub data: u32,
}

/// Typed view of an MSI address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiAddress(pub u64);

impl MsiAddress {
    /// Whether this is an interrupt address (0xFEEx_xxxx, upper half zero).
    pub fn is_interrupt(&self) -> bool {
        self.0 & INTERRUPT_ADDRESS_MASK == INTERRUPT_ADDRESS_BASE
    }

    /// Destination ID: bits 19:12 are destination bits 7:0 and the
    /// extended-ID bits 11:5 are destination bits 14:8 (the convention
    /// Linux guests use to address more than 255 APIC IDs without an IOMMU).
    pub fn destination_id(&self) -> u32 {
        let low = (self.0 >> 12) & 0xFF;
        let high = (self.0 >> 5) & 0x7F;
        (high << 8 | low) as u32
    }

    /// Redirection hint (bit 3): the message may go to any one of the
    /// destinations (lowest priority).
    pub fn redirection_hint(&self) -> bool {
        self.0 & (1 << 3) != 0
    }

    /// Destination mode (bit 2): logical when set.
    pub fn destination_mode(&self) -> DestinationMode {
        if self.0 & (1 << 2) != 0 {
            DestinationMode::Logical
        } else {
            DestinationMode::Physical
        }
    }

    /// Remappable format (bit 4): the message is an IOMMU interrupt-remapping handle.
    pub fn remappable(&self) -> bool {
        self.0 & (1 << 4) != 0
    }
}

/// Typed view of MSI data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiData(pub u32);

impl MsiData {
    /// Vector (bits 7:0).
    pub fn vector(&self) -> u8 {
        (self.0 & 0xFF) as u8
    }

    /// Delivery mode (bits 10:8).
    pub fn delivery_mode(&self) -> DeliveryMode {
        DeliveryMode::from_bits(self.0 >> 8)
    }

    /// Level (bit 14): assert when set; only meaningful for level trigger.
    pub fn level(&self) -> bool {
        self.0 & (1 << 14) != 0
    }

    /// Trigger mode (bit 15): level when set.
    pub fn trigger_mode(&self) -> TriggerMode {
        if self.0 & (1 << 15) != 0 {
            TriggerMode::Level
        } else {
            TriggerMode::Edge
        }
    }
}

/// Why an MSI write does not decode to an interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MsiError {
    /// The address is not in the 0xFEEx_xxxx interrupt window.
    #[error("MSI address {0:#x} is not an interrupt address")]
    NotInterruptAddress(u64),
    /// A remappable-format message, but there is no IOMMU to remap it.
    #[error("remappable-format MSI without an IOMMU")]
    Remappable,
}

impl MsiMessage {
    /// Typed view of the address.
    pub fn addr(&self) -> MsiAddress {
        MsiAddress(self.address)
    }

    /// Typed view of the data.
    pub fn msi_data(&self) -> MsiData {
        MsiData(self.data)
    }

    /// Decode into an APIC bus message (xAPIC format, no shorthand, no source).
    ///
    /// The destination is up to 15 bits wide (extended destination IDs).
    /// A set redirection hint turns a Fixed message into LowestPriority,
    /// as KVM does (it treats the hint as "lowest priority" for delivery);
    /// QEMU ignores the hint and only looks at the data's delivery mode.
    /// Other delivery modes keep their own meaning. An edge-triggered
    /// message always asserts: the level bit only matters for level
    /// trigger (KVM forces level = 1 for every MSI).
    pub fn decode(&self) -> Result<InterruptMessage, MsiError> {
        let addr = self.addr();
        let data = self.msi_data();
        if !addr.is_interrupt() {
            return Err(MsiError::NotInterruptAddress(self.address));
        }
        if addr.remappable() {
            return Err(MsiError::Remappable);
        }
        let mut delivery_mode = data.delivery_mode();
        if addr.redirection_hint() && delivery_mode == DeliveryMode::Fixed {
            delivery_mode = DeliveryMode::LowestPriority;
        }
        let trigger_mode = data.trigger_mode();
        Ok(InterruptMessage {
            vector: data.vector(),
            delivery_mode,
            destination_mode: addr.destination_mode(),
            trigger_mode,
            level: trigger_mode == TriggerMode::Edge || data.level(),
            destination: addr.destination_id(),
            format: DestinationFormat::XApic,
            shorthand: Shorthand::None,
            source: None,
        })
    }

    /// Encode an xAPIC-format message as an MSI (the inverse of
    /// [`decode`](Self::decode)), e.g. to mirror an IOAPIC RTE into a
    /// KVM MSI route.
    ///
    /// Destination bits 7:0 go to address bits 19:12 and bits 14:8 to the
    /// extended-ID bits 11:5; higher destination bits, the shorthand and
    /// the source cannot be expressed and are dropped. The redirection
    /// hint is left clear: LowestPriority is encoded in the data instead.
    pub fn encode(msg: &InterruptMessage) -> MsiMessage {
        let dest = u64::from(msg.destination);
        let mut address = INTERRUPT_ADDRESS_BASE | (dest & 0xFF) << 12 | ((dest >> 8) & 0x7F) << 5;
        if msg.destination_mode == DestinationMode::Logical {
            address |= 1 << 2;
        }
        let mut data = u32::from(msg.vector) | msg.delivery_mode.bits() << 8;
        if msg.level {
            data |= 1 << 14;
        }
        if msg.trigger_mode == TriggerMode::Level {
            data |= 1 << 15;
        }
        MsiMessage { address, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msi(address: u64, data: u32) -> MsiMessage {
        MsiMessage { address, data }
    }

    #[test]
    fn address_bits_19_12_are_the_destination_id() {
        let m = msi(0xFEE0_3000, 0x41).decode().unwrap();
        assert_eq!(m.destination, 3);
        assert_eq!(msi(0xFEEF_F000, 0x41).decode().unwrap().destination, 0xFF);
    }

    #[test]
    fn address_bit_2_selects_logical_destination_mode() {
        assert_eq!(
            msi(0xFEE0_1004, 0x41).decode().unwrap().destination_mode,
            DestinationMode::Logical
        );
        assert_eq!(
            msi(0xFEE0_1000, 0x41).decode().unwrap().destination_mode,
            DestinationMode::Physical
        );
    }

    #[test]
    fn redirection_hint_makes_fixed_lowest_priority() {
        let m = msi(0xFEE0_100C, 0x0041).decode().unwrap();
        assert_eq!(m.delivery_mode, DeliveryMode::LowestPriority);
        let m = msi(0xFEE0_1004, 0x0041).decode().unwrap();
        assert_eq!(m.delivery_mode, DeliveryMode::Fixed);
    }

    #[test]
    fn redirection_hint_leaves_other_delivery_modes_alone() {
        let m = msi(0xFEE0_1008, 0x0441).decode().unwrap();
        assert_eq!(m.delivery_mode, DeliveryMode::Nmi);
    }

    #[test]
    fn data_bits_give_vector_delivery_mode_level_and_trigger() {
        let m = msi(0xFEE0_0000, 0xC1EF).decode().unwrap();
        assert_eq!(m.vector, 0xEF);
        assert_eq!(m.delivery_mode, DeliveryMode::LowestPriority);
        assert!(m.level);
        assert_eq!(m.trigger_mode, TriggerMode::Level);
        let m = msi(0xFEE0_0000, 0x8530).decode().unwrap();
        assert_eq!(m.delivery_mode, DeliveryMode::Init);
        assert!(!m.level);
        assert_eq!(m.trigger_mode, TriggerMode::Level);
    }

    #[test]
    fn edge_triggered_msi_always_asserts() {
        // Linux leaves bit 14 clear for edge MSIs.
        let m = msi(0xFEE0_0000, 0x0030).decode().unwrap();
        assert_eq!(m.trigger_mode, TriggerMode::Edge);
        assert!(m.level);
    }

    #[test]
    fn decoded_message_is_xapic_format_without_shorthand_or_source() {
        let m = msi(0xFEE0_0000, 0x30).decode().unwrap();
        assert_eq!(m.format, DestinationFormat::XApic);
        assert_eq!(m.shorthand, Shorthand::None);
        assert_eq!(m.source, None);
    }

    #[test]
    fn extended_destination_bits_11_5_are_destination_bits_14_8() {
        // Destination 0x7F_AB: low byte 0xAB, high 7 bits 0x7F.
        let m = msi(0xFEEA_B000 | 0x7F << 5, 0x30).decode().unwrap();
        assert_eq!(m.destination, 0x7FAB);
        let m = msi(0xFEE0_1000 | 1 << 5, 0x30).decode().unwrap();
        assert_eq!(m.destination, 0x101);
    }

    #[test]
    fn remappable_format_without_iommu_is_rejected() {
        assert_eq!(msi(0xFEE0_0010, 0x30).decode(), Err(MsiError::Remappable));
    }

    #[test]
    fn address_outside_0xfeexxxxx_is_rejected() {
        for address in [0xFED0_0000, 0xFEF0_0000, 0, 0x1_FEE0_0000, u64::MAX] {
            assert_eq!(
                msi(address, 0x30).decode(),
                Err(MsiError::NotInterruptAddress(address))
            );
        }
    }

    #[test]
    fn encode_places_destination_vector_and_modes() {
        let m = msi(0xFEE0_0000, 0).decode().unwrap();
        let m = InterruptMessage {
            vector: 0x51,
            delivery_mode: DeliveryMode::LowestPriority,
            destination_mode: DestinationMode::Logical,
            trigger_mode: TriggerMode::Level,
            level: true,
            destination: 0x1_23,
            ..m
        };
        assert_eq!(
            MsiMessage::encode(&m),
            msi(0xFEE2_3000 | 1 << 5 | 1 << 2, 0xC151)
        );
    }

    #[test]
    fn regression_msi_destination_beyond_the_vcpu_map_reaches_nobody() {
        use crate::delivery::{resolve, ApicAddressing, DfrModel};
        let apics: Vec<ApicAddressing> = (0..4)
            .map(|id| ApicAddressing {
                apic_id: id,
                ldr: (id >> 4) << 16 | 1 << (id & 15),
                dfr_model: DfrModel::Flat,
                x2apic: true,
                hw_enabled: true,
                sw_enabled: true,
                ppr: 0,
            })
            .collect();
        for address in [0xFEE0_4000, 0xFEEF_E000 | 0x7F << 5, 0xFEE0_0000 | 1 << 5] {
            let m = msi(address, 0x30).decode().unwrap();
            assert!(resolve(&m, &apics).is_empty(), "{address:#x}");
        }
        let m = msi(0xFEE0_3000, 0x30).decode().unwrap();
        assert_eq!(resolve(&m, &apics).iter().collect::<Vec<_>>(), vec![3]);
    }

    fn arb_xapic_message() -> impl Strategy<Value = InterruptMessage> {
        (
            any::<u8>(),
            0u32..8,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u32..0x8000,
        )
            .prop_map(|(vector, dm, logical, level_trigger, level, destination)| {
                let trigger_mode = if level_trigger {
                    TriggerMode::Level
                } else {
                    TriggerMode::Edge
                };
                InterruptMessage {
                    vector,
                    delivery_mode: DeliveryMode::from_bits(dm),
                    destination_mode: if logical {
                        DestinationMode::Logical
                    } else {
                        DestinationMode::Physical
                    },
                    trigger_mode,
                    // Edge messages always assert.
                    level: level || !level_trigger,
                    destination,
                    format: DestinationFormat::XApic,
                    shorthand: Shorthand::None,
                    source: None,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decode_inverts_encode(m in arb_xapic_message()) {
            prop_assert_eq!(MsiMessage::encode(&m).decode(), Ok(m));
        }

        #[test]
        fn decode_never_panics_and_accepts_only_the_interrupt_window(
            address in prop_oneof![0xFEE0_0000u64..0xFEF0_0000, any::<u64>()],
            data in any::<u32>(),
        ) {
            let r = msi(address, data).decode();
            let window = address >> 20 == 0xFEE;
            prop_assert_eq!(r.is_ok(), window && address & 0x10 == 0);
            if let Ok(m) = r {
                prop_assert!(m.destination < 0x8000);
                prop_assert_eq!(m.vector, data as u8);
            }
        }

        #[test]
        fn msi_message_serde_round_trips(address in any::<u64>(), data in any::<u32>()) {
            let m = msi(address, data);
            let json = serde_json::to_string(&m).unwrap();
            prop_assert_eq!(serde_json::from_str::<MsiMessage>(&json).unwrap(), m);
        }
    }
}
