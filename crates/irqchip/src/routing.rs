//! The GSI routing table and per-source line levels, with KVM's semantics.
//!
//! A device raises a GSI (global system interrupt number); the table says
//! which interrupt controller pins, or which MSI, that GSI drives. Several
//! sources may share one GSI: its level is the wired-OR of theirs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::delivery::IrqStatus;
use crate::msi::MsiMessage;

/// Number of GSIs (KVM's `KVM_MAX_IRQ_ROUTES`): valid GSIs are below this,
/// and a table holds at most this many entries.
pub const MAX_GSI: u32 = 4096;
/// Input pins per 8259A.
pub const PIC_PINS: u8 = 8;
/// IOAPIC input pins (redirection entries).
pub const IOAPIC_PINS: u8 = 24;
/// Number of distinct line sources ([`SourceId`] values).
pub const MAX_SOURCES: u8 = 64;

/// One chip of the 8259A pair.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PicChip {
    /// The master (IRQ 0-7, ports 0x20/0x21).
    Master,
    /// The slave (IRQ 8-15, ports 0xA0/0xA1), cascaded on master pin 2.
    Slave,
}

/// Where one GSI goes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// An input pin of one 8259A.
    Pic {
        /// Which chip.
        chip: PicChip,
        /// Pin on that chip (< 8).
        pin: u8,
    },
    /// An IOAPIC input pin.
    Ioapic {
        /// Pin (< 24).
        pin: u8,
    },
    /// An MSI write (raising the GSI sends it; lowering does nothing).
    Msi(MsiMessage),
}

/// The interrupt controller a chip route drives: at most one route per chip per GSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chip {
    Pic(PicChip),
    Ioapic,
}

impl Route {
    /// The controller this route drives, `None` for MSI.
    fn chip(&self) -> Option<Chip> {
        match self {
            Route::Pic { chip, .. } => Some(Chip::Pic(*chip)),
            Route::Ioapic { .. } => Some(Chip::Ioapic),
            Route::Msi(_) => None,
        }
    }
}

/// One row of the routing table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    /// The GSI (< [`MAX_GSI`]).
    pub gsi: u32,
    /// Where it goes.
    pub route: Route,
}

/// An invalid routing table or line source, rejected as KVM rejects it.
#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq)]
pub enum RoutingError {
    /// GSI at or above [`MAX_GSI`].
    #[error("GSI {0} out of range (max {MAX_GSI})")]
    GsiOutOfRange(u32),
    /// More entries than [`MAX_GSI`].
    #[error("{0} routing entries (max {MAX_GSI})")]
    TooManyEntries(usize),
    /// PIC pin at or above 8.
    #[error("GSI {gsi}: PIC pin {pin} out of range")]
    PicPinOutOfRange {
        /// The GSI of the entry.
        gsi: u32,
        /// The bad pin.
        pin: u8,
    },
    /// IOAPIC pin at or above 24.
    #[error("GSI {gsi}: IOAPIC pin {pin} out of range")]
    IoapicPinOutOfRange {
        /// The GSI of the entry.
        gsi: u32,
        /// The bad pin.
        pin: u8,
    },
    /// A second route to the same interrupt controller on one GSI.
    #[error("GSI {gsi} routed twice to the same interrupt controller")]
    DuplicateChipRoute {
        /// The GSI of the entry.
        gsi: u32,
    },
    /// An MSI route shares its GSI with another route.
    #[error("GSI {gsi}: an MSI route must be the only route of its GSI")]
    MsiNotAlone {
        /// The GSI of the entry.
        gsi: u32,
    },
    /// A line source ID at or above 64.
    #[error("line source {0} out of range (max {MAX_SOURCES})")]
    SourceIdOutOfRange(u8),
}

/// Whether `route` leads to one of these PIC IRQs or IOAPIC pins.
fn route_acked(route: &Route, pic_irqs: u16, ioapic_pins: u32) -> bool {
    match *route {
        Route::Pic { chip, pin } => {
            let irq = pin + if chip == PicChip::Slave { 8 } else { 0 };
            irq < 16 && pic_irqs & (1 << irq) != 0
        }
        Route::Ioapic { pin } => pin < 32 && ioapic_pins & (1 << pin) != 0,
        Route::Msi(_) => false,
    }
}

/// Saved form of a [`RoutingTable`]: its entries.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingTableState {
    /// The table's entries, in GSI order.
    pub entries: Vec<RouteEntry>,
}

/// The GSI routing table, validated as a whole.
///
/// Rules (KVM's `KVM_SET_GSI_ROUTING`): GSI < [`MAX_GSI`]; at most one route
/// per interrupt controller (PIC master, PIC slave, IOAPIC) per GSI; an MSI
/// route is the only route of its GSI; PIC pins < 8, IOAPIC pins < 24. MSI
/// contents are not checked here: a bad MSI fails when the GSI is raised,
/// as in KVM. Two GSIs may drive the same pin.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(try_from = "RoutingTableState", into = "RoutingTableState")]
pub struct RoutingTable {
    /// Routes of GSI `g` at index `g`; the vector ends at the highest routed GSI.
    by_gsi: Vec<Vec<Route>>,
}

impl RoutingTable {
    /// The PC default table, the one QEMU installs into KVM:
    /// - GSI 0 (the PIT) goes to PIC master pin 0 and IOAPIC pin 2;
    /// - GSI 2 has no route (PIC pin 2 is the cascade, IOAPIC pin 2 is the PIT's);
    /// - GSI 1 and 3-7 go to PIC master pin = GSI and IOAPIC pin = GSI;
    /// - GSI 8-15 go to PIC slave pin = GSI - 8 and IOAPIC pin = GSI;
    /// - GSI 16-23 go to IOAPIC pin = GSI only.
    ///
    /// KVM's own built-in table instead sends GSI 0 to IOAPIC pin 0 (and GSI
    /// 2 to pin 2). We follow real boards and QEMU: the PIT on IOAPIC pin 2,
    /// which firmware describes with a MADT interrupt source override
    /// (ISA IRQ 0 -> GSI 2, or an MP-table I/O interrupt entry for pin 2).
    /// Every guest understands that override, while some expect the PIT on
    /// pin 2 and misbehave without it. The VMM's firmware tables must emit
    /// this override, and in KVM-irqchip mode this table must be installed
    /// in KVM so that all three irqchip modes wire the PIT the same way.
    pub fn default_pc() -> Self {
        let mut entries = Vec::new();
        for gsi in 0u8..24 {
            let pic = match gsi {
                2 => continue,
                0..=7 => Some((PicChip::Master, gsi)),
                8..=15 => Some((PicChip::Slave, gsi - 8)),
                _ => None,
            };
            if let Some((chip, pin)) = pic {
                entries.push(RouteEntry {
                    gsi: gsi.into(),
                    route: Route::Pic { chip, pin },
                });
            }
            let pin = if gsi == 0 { 2 } else { gsi };
            entries.push(RouteEntry {
                gsi: gsi.into(),
                route: Route::Ioapic { pin },
            });
        }
        Self::new(entries).unwrap_or_else(|_| Self { by_gsi: Vec::new() })
    }

    /// Build a table from a full list of entries (a routing update replaces
    /// the whole table), checking every rule.
    pub fn new(entries: Vec<RouteEntry>) -> Result<Self, RoutingError> {
        if entries.len() > MAX_GSI as usize {
            return Err(RoutingError::TooManyEntries(entries.len()));
        }
        let mut by_gsi: Vec<Vec<Route>> = Vec::new();
        for RouteEntry { gsi, route } in entries {
            if gsi >= MAX_GSI {
                return Err(RoutingError::GsiOutOfRange(gsi));
            }
            match route {
                Route::Pic { pin, .. } if pin >= PIC_PINS => {
                    return Err(RoutingError::PicPinOutOfRange { gsi, pin });
                }
                Route::Ioapic { pin } if pin >= IOAPIC_PINS => {
                    return Err(RoutingError::IoapicPinOutOfRange { gsi, pin });
                }
                _ => {}
            }
            let index = gsi as usize;
            if by_gsi.len() <= index {
                by_gsi.resize_with(index + 1, Vec::new);
            }
            let routes = &mut by_gsi[index];
            let chip = route.chip();
            if chip.is_none() && !routes.is_empty() || routes.iter().any(|r| r.chip().is_none()) {
                return Err(RoutingError::MsiNotAlone { gsi });
            }
            if routes.iter().any(|r| r.chip() == chip) {
                return Err(RoutingError::DuplicateChipRoute { gsi });
            }
            routes.push(route);
        }
        Ok(Self { by_gsi })
    }

    /// The routes of `gsi`, in the order they were given; empty if none.
    pub fn routes(&self, gsi: u32) -> &[Route] {
        self.by_gsi
            .get(gsi as usize)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Every entry, in GSI order.
    pub fn entries(&self) -> Vec<RouteEntry> {
        (0u32..)
            .zip(&self.by_gsi)
            .flat_map(|(gsi, routes)| routes.iter().map(move |&route| RouteEntry { gsi, route }))
            .collect()
    }

    /// The GSIs routed to a given chip pin (or MSI), in ascending order:
    /// what an EOI on that pin acknowledges (for ack notifiers and irqfd resample).
    pub fn gsis_for(&self, route: &Route) -> impl Iterator<Item = u32> + '_ {
        let route = *route;
        (0u32..)
            .zip(&self.by_gsi)
            .filter(move |(_, routes)| routes.contains(&route))
            .map(|(gsi, _)| gsi)
    }

    /// The GSIs, in ascending order, with a route to an acknowledged chip
    /// pin: `pic_irqs` bit n is PIC input n (8-15 on the slave), `ioapic_pins`
    /// bit n is IOAPIC pin n. One pass, no allocation: this runs on every EOI.
    pub fn gsis_acked(&self, pic_irqs: u16, ioapic_pins: u32) -> impl Iterator<Item = u32> + '_ {
        (0u32..)
            .zip(&self.by_gsi)
            .filter(move |(_, routes)| routes.iter().any(|r| route_acked(r, pic_irqs, ioapic_pins)))
            .map(|(gsi, _)| gsi)
    }

    /// Whether `gsi` is routed to one of these PIC IRQs or IOAPIC pins
    /// (one GSI of [`RoutingTable::gsis_acked`]).
    pub fn gsi_acked(&self, gsi: u32, pic_irqs: u16, ioapic_pins: u32) -> bool {
        self.routes(gsi)
            .iter()
            .any(|r| route_acked(r, pic_irqs, ioapic_pins))
    }

    /// Save the table.
    pub fn save(&self) -> RoutingTableState {
        RoutingTableState {
            entries: self.entries(),
        }
    }

    /// Replace the table with a saved one, validated like [`new`](Self::new).
    pub fn restore(&mut self, state: &RoutingTableState) -> Result<(), RoutingError> {
        *self = Self::new(state.entries.clone())?;
        Ok(())
    }
}

impl TryFrom<RoutingTableState> for RoutingTable {
    type Error = RoutingError;

    fn try_from(state: RoutingTableState) -> Result<Self, RoutingError> {
        Self::new(state.entries)
    }
}

impl From<RoutingTable> for RoutingTableState {
    fn from(table: RoutingTable) -> Self {
        table.save()
    }
}

/// Identifies one source driving GSI lines (the PIT, a device, an irqfd...).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(try_from = "u8", into = "u8")]
pub struct SourceId(u8);

impl SourceId {
    /// The VMM's own writes (KVM's userspace source).
    pub const USER: SourceId = SourceId(0);
    /// The PIT, on GSI 0.
    pub const PIT: SourceId = SourceId(1);

    /// A source ID; must be below 64.
    pub fn new(id: u8) -> Result<Self, RoutingError> {
        if id < MAX_SOURCES {
            Ok(Self(id))
        } else {
            Err(RoutingError::SourceIdOutOfRange(id))
        }
    }

    /// The numeric ID.
    pub fn get(self) -> u8 {
        self.0
    }

    /// This source's bit in a per-GSI source mask.
    fn bit(self) -> u64 {
        // The mask keeps the shift in range even for an unchecked value.
        1 << (self.0 & (MAX_SOURCES - 1))
    }
}

impl TryFrom<u8> for SourceId {
    type Error = RoutingError;

    fn try_from(id: u8) -> Result<Self, RoutingError> {
        Self::new(id)
    }
}

impl From<SourceId> for u8 {
    fn from(id: SourceId) -> u8 {
        id.0
    }
}

/// Saved form of [`LineLevels`]: the asserting sources of each GSI that has any.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct LineLevelsState {
    /// GSI -> bitmap of the sources asserting it (bit n = source n).
    pub asserted: BTreeMap<u32, u64>,
}

/// Per-GSI line level as the wired-OR of up to 64 sources.
///
/// GSIs at or above [`MAX_GSI`] have no line: setting one does nothing and
/// reads low.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(try_from = "LineLevelsState", into = "LineLevelsState")]
pub struct LineLevels {
    /// Sources asserting GSI `g` at index `g`; grows on demand up to `MAX_GSI`.
    sources: Vec<u64>,
}

impl LineLevels {
    /// All lines low.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set one source's level on `gsi`; returns the new OR'd level of the line.
    pub fn set(&mut self, gsi: u32, source: SourceId, level: bool) -> bool {
        if gsi >= MAX_GSI {
            return false;
        }
        let index = gsi as usize;
        if self.sources.len() <= index {
            if !level {
                return false;
            }
            self.sources.resize(index + 1, 0);
        }
        let Some(mask) = self.sources.get_mut(index) else {
            return false;
        };
        if level {
            *mask |= source.bit();
        } else {
            *mask &= !source.bit();
        }
        *mask != 0
    }

    /// The OR'd level of `gsi`.
    pub fn source_level(&self, gsi: u32, source: SourceId) -> bool {
        self.sources
            .get(gsi as usize)
            .is_some_and(|mask| *mask & source.bit() != 0)
    }

    /// The line's level: the OR of its sources.
    pub fn level(&self, gsi: u32) -> bool {
        self.sources
            .get(gsi as usize)
            .is_some_and(|mask| *mask != 0)
    }

    /// Drop one source from every line (e.g. when its device goes away);
    /// returns the GSIs that went low because of it, which the caller must
    /// lower on their interrupt controllers.
    pub fn release(&mut self, source: SourceId) -> Vec<u32> {
        let mut lowered = Vec::new();
        for (gsi, mask) in (0u32..).zip(self.sources.iter_mut()) {
            if *mask & source.bit() != 0 {
                *mask &= !source.bit();
                if *mask == 0 {
                    lowered.push(gsi);
                }
            }
        }
        lowered
    }

    /// Save the levels.
    pub fn save(&self) -> LineLevelsState {
        LineLevelsState {
            asserted: (0u32..)
                .zip(&self.sources)
                .filter(|(_, mask)| **mask != 0)
                .map(|(gsi, mask)| (gsi, *mask))
                .collect(),
        }
    }

    /// Replace the levels with saved ones; GSIs must be below [`MAX_GSI`].
    pub fn restore(&mut self, state: &LineLevelsState) -> Result<(), RoutingError> {
        if let Some((&gsi, _)) = state.asserted.iter().find(|(gsi, _)| **gsi >= MAX_GSI) {
            return Err(RoutingError::GsiOutOfRange(gsi));
        }
        let len = state
            .asserted
            .keys()
            .next_back()
            .map_or(0, |gsi| *gsi as usize + 1);
        let mut sources = vec![0; len];
        for (&gsi, &mask) in &state.asserted {
            if let Some(slot) = sources.get_mut(gsi as usize) {
                *slot = mask;
            }
        }
        self.sources = sources;
        Ok(())
    }
}

impl PartialEq for LineLevels {
    fn eq(&self, other: &Self) -> bool {
        // Trailing all-low GSIs are storage, not state.
        self.save() == other.save()
    }
}

impl Eq for LineLevels {}

impl TryFrom<LineLevelsState> for LineLevels {
    type Error = RoutingError;

    fn try_from(state: LineLevelsState) -> Result<Self, RoutingError> {
        let mut levels = Self::new();
        levels.restore(&state)?;
        Ok(levels)
    }
}

impl From<LineLevels> for LineLevelsState {
    fn from(levels: LineLevels) -> Self {
        levels.save()
    }
}

/// Combine per-route outcomes of raising one GSI, as KVM does: masked
/// routes are ignored, the others' delivery counts are summed (a coalesced
/// route counts 0), and the result is `Masked` only if every route (or no
/// route at all) was masked.
pub fn combine(results: impl IntoIterator<Item = IrqStatus>) -> IrqStatus {
    let mut total: Option<usize> = None;
    for result in results {
        let n = match result {
            IrqStatus::Masked => continue,
            IrqStatus::Coalesced => 0,
            IrqStatus::Delivered(n) => n,
        };
        total = Some(total.unwrap_or(0).saturating_add(n));
    }
    match total {
        None => IrqStatus::Masked,
        Some(0) => IrqStatus::Coalesced,
        Some(n) => IrqStatus::Delivered(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn src(id: u8) -> SourceId {
        SourceId::new(id).unwrap()
    }

    fn pic(chip: PicChip, pin: u8) -> Route {
        Route::Pic { chip, pin }
    }

    fn ioapic(pin: u8) -> Route {
        Route::Ioapic { pin }
    }

    fn msi() -> Route {
        Route::Msi(MsiMessage {
            address: 0xFEE0_0000,
            data: 0x30,
        })
    }

    fn entry(gsi: u32, route: Route) -> RouteEntry {
        RouteEntry { gsi, route }
    }

    #[test]
    fn default_table_routes_gsi_0_to_15_to_pic_and_ioapic() {
        let t = RoutingTable::default_pc();
        for gsi in [1u8, 3, 4, 5, 6, 7] {
            assert_eq!(
                t.routes(gsi.into()),
                &[pic(PicChip::Master, gsi), ioapic(gsi)],
                "GSI {gsi}"
            );
        }
        for gsi in 8u8..16 {
            assert_eq!(
                t.routes(gsi.into()),
                &[pic(PicChip::Slave, gsi - 8), ioapic(gsi)],
                "GSI {gsi}"
            );
        }
    }

    #[test]
    fn default_table_routes_gsi_16_to_23_to_ioapic_only() {
        let t = RoutingTable::default_pc();
        for gsi in 16u8..24 {
            assert_eq!(t.routes(gsi.into()), &[ioapic(gsi)]);
        }
        assert!(t.routes(24).is_empty());
    }

    #[test]
    fn default_table_sends_the_pit_gsi_0_to_ioapic_pin_2() {
        let t = RoutingTable::default_pc();
        assert_eq!(t.routes(0), &[pic(PicChip::Master, 0), ioapic(2)]);
        // The cascade GSI has no route; pin 2 belongs to GSI 0 alone.
        assert!(t.routes(2).is_empty());
        assert_eq!(t.gsis_for(&ioapic(2)).collect::<Vec<_>>(), vec![0]);
        assert_eq!(t.gsis_for(&ioapic(0)).count(), 0);
        assert_eq!(t.entries().len(), 15 * 2 + 8);
    }

    #[test]
    fn routes_of_an_unrouted_or_huge_gsi_are_empty() {
        let t = RoutingTable::default_pc();
        assert!(t.routes(MAX_GSI).is_empty());
        assert!(t.routes(u32::MAX).is_empty());
    }

    #[test]
    fn routing_update_replaces_the_whole_table() {
        let mut t = RoutingTable::default_pc();
        t.restore(&RoutingTableState {
            entries: vec![entry(30, msi())],
        })
        .unwrap();
        assert!(t.routes(1).is_empty());
        assert_eq!(t.routes(30), &[msi()]);
        assert_eq!(t.entries(), vec![entry(30, msi())]);
    }

    #[test]
    fn acked_pins_map_back_to_every_gsi_routed_there_in_order() {
        let t = RoutingTable::default_pc();
        // IOAPIC pin 2 is GSI 0 (the override); slave input 12 is GSI 12.
        assert_eq!(t.gsis_acked(0, 1 << 2).collect::<Vec<_>>(), vec![0]);
        assert_eq!(t.gsis_acked(1 << 12, 0).collect::<Vec<_>>(), vec![12]);
        assert_eq!(
            t.gsis_acked(1 << 3, (1 << 3) | (1 << 20))
                .collect::<Vec<_>>(),
            vec![3, 20]
        );
        assert_eq!(t.gsis_acked(0, 0).count(), 0);
        // Two GSIs sharing one pin are both acknowledged.
        let shared = RoutingTable::new(vec![entry(5, ioapic(9)), entry(9, ioapic(9))]).unwrap();
        assert_eq!(shared.gsis_acked(0, 1 << 9).collect::<Vec<_>>(), vec![5, 9]);
    }

    #[test]
    fn one_route_per_chip_per_gsi() {
        assert_eq!(
            RoutingTable::new(vec![entry(5, ioapic(5)), entry(5, ioapic(6))]),
            Err(RoutingError::DuplicateChipRoute { gsi: 5 })
        );
        assert_eq!(
            RoutingTable::new(vec![
                entry(5, pic(PicChip::Master, 5)),
                entry(5, pic(PicChip::Master, 6))
            ]),
            Err(RoutingError::DuplicateChipRoute { gsi: 5 })
        );
        // Master, slave and IOAPIC are three different chips.
        let t = RoutingTable::new(vec![
            entry(5, pic(PicChip::Master, 5)),
            entry(5, pic(PicChip::Slave, 5)),
            entry(5, ioapic(5)),
        ])
        .unwrap();
        assert_eq!(t.routes(5).len(), 3);
    }

    #[test]
    fn two_gsis_may_share_a_pin() {
        let t = RoutingTable::new(vec![entry(5, ioapic(9)), entry(9, ioapic(9))]).unwrap();
        assert_eq!(t.gsis_for(&ioapic(9)).collect::<Vec<_>>(), vec![5, 9]);
    }

    #[test]
    fn msi_route_is_the_only_route_on_its_gsi() {
        for entries in [
            vec![entry(40, msi()), entry(40, ioapic(1))],
            vec![entry(40, ioapic(1)), entry(40, msi())],
            vec![entry(40, msi()), entry(40, msi())],
        ] {
            assert_eq!(
                RoutingTable::new(entries),
                Err(RoutingError::MsiNotAlone { gsi: 40 })
            );
        }
    }

    #[test]
    fn pic_pin_must_be_below_8() {
        assert_eq!(
            RoutingTable::new(vec![entry(1, pic(PicChip::Slave, 8))]),
            Err(RoutingError::PicPinOutOfRange { gsi: 1, pin: 8 })
        );
        assert!(RoutingTable::new(vec![entry(1, pic(PicChip::Slave, 7))]).is_ok());
    }

    #[test]
    fn ioapic_pin_must_be_below_24() {
        assert_eq!(
            RoutingTable::new(vec![entry(1, ioapic(24))]),
            Err(RoutingError::IoapicPinOutOfRange { gsi: 1, pin: 24 })
        );
        assert!(RoutingTable::new(vec![entry(1, ioapic(23))]).is_ok());
    }

    #[test]
    fn gsi_must_be_below_max_gsi() {
        assert_eq!(
            RoutingTable::new(vec![entry(MAX_GSI, ioapic(0))]),
            Err(RoutingError::GsiOutOfRange(MAX_GSI))
        );
        assert!(RoutingTable::new(vec![entry(MAX_GSI - 1, msi())]).is_ok());
    }

    #[test]
    fn table_holds_at_most_max_gsi_entries() {
        let entries: Vec<_> = (0..=MAX_GSI)
            .map(|gsi| entry(gsi % MAX_GSI, msi()))
            .collect();
        assert_eq!(
            RoutingTable::new(entries),
            Err(RoutingError::TooManyEntries(MAX_GSI as usize + 1))
        );
    }

    #[test]
    fn routing_table_save_restore_round_trips_and_validates() {
        let t = RoutingTable::default_pc();
        let json = serde_json::to_string(&t).unwrap();
        let back: RoutingTable = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        let mut other = RoutingTable::new(Vec::new()).unwrap();
        other.restore(&t.save()).unwrap();
        assert_eq!(other.save(), t.save());
        let bad = RoutingTableState {
            entries: vec![entry(0, ioapic(99))],
        };
        assert!(other.restore(&bad).is_err());
        assert_eq!(other, t, "a failed restore keeps the table");
        let json = serde_json::to_string(&bad).unwrap();
        assert!(serde_json::from_str::<RoutingTable>(&json).is_err());
    }

    #[test]
    fn source_id_must_be_below_64() {
        assert_eq!(SourceId::new(63).unwrap().get(), 63);
        assert_eq!(SourceId::new(64), Err(RoutingError::SourceIdOutOfRange(64)));
        assert!(serde_json::from_str::<SourceId>("64").is_err());
        assert_eq!(serde_json::from_str::<SourceId>("5").unwrap(), src(5));
    }

    #[test]
    fn line_level_is_the_or_of_its_sources() {
        let mut l = LineLevels::new();
        assert!(!l.level(4));
        assert!(l.set(4, src(0), true));
        assert!(l.set(4, src(1), true));
        assert!(l.set(4, src(0), false), "source 1 still holds it");
        assert!(l.level(4));
        assert!(!l.set(4, src(1), false));
        assert!(!l.level(4));
    }

    #[test]
    fn regression_shared_level_gsi_uses_the_or_of_all_sources() {
        // The PIT (source 2) and a device (source 7) share GSI 0: one
        // lowering must not drop the other's assertion.
        let mut l = LineLevels::new();
        l.set(0, src(2), true);
        l.set(0, src(7), true);
        assert!(l.set(0, src(2), false));
        assert!(l.set(0, src(2), false), "lowering twice changes nothing");
        assert!(!l.set(0, src(7), false));
    }

    #[test]
    fn lines_are_independent() {
        let mut l = LineLevels::new();
        l.set(3, src(0), true);
        assert!(!l.level(4));
        assert!(!l.set(4, src(0), false));
        assert!(l.level(3));
    }

    #[test]
    fn gsi_beyond_max_has_no_line() {
        let mut l = LineLevels::new();
        assert!(!l.set(MAX_GSI, src(0), true));
        assert!(!l.set(u32::MAX, src(0), true));
        assert!(!l.level(MAX_GSI));
        assert!(l.set(MAX_GSI - 1, src(0), true));
    }

    #[test]
    fn releasing_a_source_reports_the_lines_it_alone_held() {
        let mut l = LineLevels::new();
        l.set(1, src(3), true);
        l.set(2, src(3), true);
        l.set(2, src(4), true);
        l.set(9, src(4), true);
        assert_eq!(l.release(src(3)), vec![1]);
        assert!(!l.level(1));
        assert!(l.level(2));
        assert_eq!(l.release(src(3)), Vec::<u32>::new());
    }

    #[test]
    fn line_levels_restore_rejects_gsi_beyond_max() {
        let mut state = LineLevelsState::default();
        state.asserted.insert(MAX_GSI, 1);
        assert_eq!(
            LineLevels::new().restore(&state),
            Err(RoutingError::GsiOutOfRange(MAX_GSI))
        );
        let json = serde_json::to_string(&state).unwrap();
        assert!(serde_json::from_str::<LineLevels>(&json).is_err());
    }

    #[test]
    fn combine_ignores_masked_and_sums_the_rest() {
        use IrqStatus::*;
        assert_eq!(combine([Masked, Delivered(1)]), Delivered(1));
        assert_eq!(combine([Delivered(1), Delivered(2)]), Delivered(3));
        assert_eq!(combine([Masked, Coalesced]), Coalesced);
        assert_eq!(combine([Coalesced, Delivered(1)]), Delivered(1));
        assert_eq!(combine([Delivered(0)]), Coalesced);
    }

    #[test]
    fn combine_is_masked_when_every_route_is_masked_or_there_is_none() {
        use IrqStatus::*;
        assert_eq!(combine([Masked, Masked]), Masked);
        assert_eq!(combine([]), Masked);
        assert_eq!(combine([Masked]).to_kvm(), -1);
    }

    fn arb_route() -> impl Strategy<Value = Route> {
        prop_oneof![
            (any::<bool>(), 0u8..10).prop_map(|(slave, pin)| Route::Pic {
                chip: if slave {
                    PicChip::Slave
                } else {
                    PicChip::Master
                },
                pin,
            }),
            (0u8..26).prop_map(|pin| Route::Ioapic { pin }),
            any::<u8>().prop_map(|pin| Route::Ioapic { pin }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(address, data)| Route::Msi(MsiMessage { address, data })),
        ]
    }

    fn arb_entry() -> impl Strategy<Value = RouteEntry> {
        (
            prop_oneof![0u32..8, 4090u32..4100, any::<u32>()],
            arb_route(),
        )
            .prop_map(|(gsi, route)| RouteEntry { gsi, route })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn accepted_tables_satisfy_the_rules(entries in prop::collection::vec(arb_entry(), 0..12)) {
            if let Ok(t) = RoutingTable::new(entries.clone()) {
                // Nothing lost, nothing invented.
                let mut all = t.entries();
                prop_assert_eq!(all.len(), entries.len());
                for e in &entries {
                    prop_assert!(t.routes(e.gsi).contains(&e.route));
                    prop_assert!(e.gsi < MAX_GSI);
                    match e.route {
                        Route::Pic { pin, .. } => prop_assert!(pin < PIC_PINS),
                        Route::Ioapic { pin } => prop_assert!(pin < IOAPIC_PINS),
                        Route::Msi(_) => prop_assert_eq!(t.routes(e.gsi).len(), 1),
                    }
                }
                all.dedup_by_key(|e| e.gsi);
                for e in all {
                    let routes = t.routes(e.gsi);
                    for (i, a) in routes.iter().enumerate() {
                        for b in &routes[i + 1..] {
                            prop_assert_ne!(a.chip(), b.chip());
                        }
                    }
                }
                // Round trip through the saved form.
                prop_assert_eq!(RoutingTable::new(t.entries()), Ok(t.clone()));
                let json = serde_json::to_string(&t).unwrap();
                prop_assert_eq!(serde_json::from_str::<RoutingTable>(&json).unwrap(), t);
            }
        }

        #[test]
        fn line_levels_match_an_or_model(
            ops in prop::collection::vec((0u32..6, 0u8..64, any::<bool>()), 0..64),
        ) {
            let mut l = LineLevels::new();
            let mut model = std::collections::HashMap::<u32, std::collections::HashSet<u8>>::new();
            for (gsi, s, level) in ops {
                let set = model.entry(gsi).or_default();
                if level { set.insert(s); } else { set.remove(&s); }
                prop_assert_eq!(l.set(gsi, src(s), level), !set.is_empty());
                for g in 0..6 {
                    prop_assert_eq!(l.level(g), model.get(&g).is_some_and(|s| !s.is_empty()));
                }
            }
            let state = l.save();
            let json = serde_json::to_string(&l).unwrap();
            let back: LineLevels = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back.save(), state);
        }
    }
}
