//! The I/O APIC: 24 input pins turned into APIC bus messages.
//!
//! The guest programs it through two registers in a 4 KiB MMIO page:
//! IOREGSEL (offset 0x00) selects an indirect register and IOWIN (0x10)
//! reads or writes it. Version 0x20 adds a directed-EOI register at 0x40.
//! Each pin has a [`Redirection`] entry saying which message it sends.
//!
//! Behaviour choices (where the references differ or hardware is vague):
//! - **Edges** are detected on the pin's asserted level: a pin delivers when
//!   it goes from de-asserted to asserted. Raising a line that is already
//!   high makes no edge and reports [`IrqStatus::Coalesced`] (KVM instead
//!   delivers again once its IRR bit was cleared by the previous delivery).
//!   An edge while the pin is masked is lost, and unmasking never replays it
//!   (KVM; QEMU remembers it and delivers on unmask).
//! - **Remote IRR** is set only when a level message reached at least one
//!   vCPU, so a pin whose destination matches nobody is retried on the next
//!   raise, RTE write or EOI instead of waiting for an EOI that never comes.
//! - **Polarity**: `set_irq` takes the electrical level of the line and an
//!   active-low pin (RTE bit 13) is asserted while that level is low.
//!   Neither KVM nor QEMU look at the polarity bit, so firmware tables for
//!   guests should describe lines as active-high, or devices on active-low
//!   lines must drive them high while idle.
//! - **EOI** by vector clears remote IRR on every entry with that vector,
//!   whatever its destination, so retargeting an entry while its vector is
//!   in service cannot lose the EOI.
//! - **Interrupt storm guard**: a still-asserted level pin is redelivered
//!   synchronously on EOI [`STORM_THRESHOLD`] times in a row; the next
//!   redelivery is deferred by [`STORM_BACKOFF_NS`] (KVM's HZ/100) and done
//!   by [`Ioapic::advance`].
//! - **MMIO decode**: offsets are taken modulo the 256-byte register window
//!   (KVM and QEMU both decode `offset & 0xff`). IOREGSEL takes the low byte
//!   of a write of any width. IOWIN writes narrower than 4 bytes are ignored
//!   (QEMU: a byte write must not zero the rest of an RTE half); 8-byte
//!   writes use the low dword. The EOI register takes its vector from the
//!   low byte of any write. Reads at 0x00 and 0x10 return the low bytes of
//!   the register (zero beyond 4 bytes); every other offset reads zero.

mod redirection;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::delivery::{ApicBus, InterruptMessage, IrqStatus};

pub use redirection::{Polarity, Redirection};

/// Guest-physical base of the IOAPIC page.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Number of input pins (redirection entries).
pub const IOAPIC_PINS: usize = 24;
/// Back-to-back EOI redeliveries of one asserted level pin before backing off.
pub const STORM_THRESHOLD: u32 = 10_000;
/// How long a redelivery is deferred once the storm guard trips: 10 ms.
pub const STORM_BACKOFF_NS: u64 = 10_000_000;

/// MMIO offset of the register select register.
pub const IOREGSEL: u64 = 0x00;
/// MMIO offset of the register window.
pub const IOWIN: u64 = 0x10;
/// MMIO offset of the directed-EOI register (version 0x20 only).
pub const IOEOI: u64 = 0x40;

/// Indirect register: IOAPIC ID.
pub const REG_ID: u8 = 0x00;
/// Indirect register: version.
pub const REG_VERSION: u8 = 0x01;
/// Indirect register: arbitration ID.
pub const REG_ARBITRATION: u8 = 0x02;
/// Indirect register: low half of redirection entry 0; entry n is at 0x10 + 2n.
pub const REG_REDIRECTION_BASE: u8 = 0x10;

/// All pin bits.
const PIN_MASK: u32 = (1 << IOAPIC_PINS) - 1;
/// The ID register keeps bits 27:24.
const ID_SHIFT: u32 = 24;
const ID_MASK: u8 = 0x0F;

/// Which IOAPIC the guest sees.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoapicVersion {
    /// Version 0x11 (82093AA): EOIs arrive only as LAPIC broadcasts.
    V11,
    /// Version 0x20: adds the directed-EOI register at offset 0x40.
    V20,
}

impl IoapicVersion {
    /// The version number in bits 7:0 of the version register.
    pub const fn number(self) -> u32 {
        match self {
            Self::V11 => 0x11,
            Self::V20 => 0x20,
        }
    }

    /// Whether the directed-EOI register exists.
    pub const fn has_eoi_register(self) -> bool {
        matches!(self, Self::V20)
    }
}

/// Errors from restoring an invalid [`IoapicState`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoapicError {
    /// The snapshot was taken from a different IOAPIC version.
    #[error("snapshot is for IOAPIC version {found:?}, device is {expected:?}")]
    VersionMismatch {
        /// This device's version.
        expected: IoapicVersion,
        /// The snapshot's version.
        found: IoapicVersion,
    },
    /// The base address is not page aligned.
    #[error("IOAPIC base address {0:#x} is not 4 KiB aligned")]
    BaseAddress(u64),
    /// The ID does not fit in 4 bits.
    #[error("IOAPIC ID {0:#x} does not fit in 4 bits")]
    Id(u8),
    /// A redirection entry has bits that can never be set.
    #[error("redirection entry {pin} has invalid bits: {bits:#018x}")]
    Redirection {
        /// The pin.
        pin: usize,
        /// The entry as stored in the snapshot.
        bits: u64,
    },
    /// A pin bitmap names pins beyond 23.
    #[error("{field} names pins beyond {IOAPIC_PINS}: {bits:#x}")]
    PinBits {
        /// Which field.
        field: &'static str,
        /// Its value.
        bits: u32,
    },
    /// IRR does not match the line levels and entries.
    #[error("irr {found:#x} does not match the asserted level pins {expected:#x}")]
    Irr {
        /// What the line levels and entries imply.
        expected: u32,
        /// The snapshot's value.
        found: u32,
    },
    /// A storm counter is beyond the threshold.
    #[error("storm counter of pin {pin} is {count}, beyond {STORM_THRESHOLD}")]
    StormCount {
        /// The pin.
        pin: usize,
        /// Its counter.
        count: u32,
    },
    /// Deferred pins and the back-off deadline must come together.
    #[error("deferred pins {pins:#x} without a deadline, or a deadline without pins")]
    Deferred {
        /// The deferred pins.
        pins: u32,
    },
}

/// Snapshot of an [`Ioapic`]: plain data, close to KVM's `kvm_ioapic_state`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct IoapicState {
    /// Version the device models.
    pub version: IoapicVersion,
    /// Guest-physical base address (4 KiB aligned).
    pub base_address: u64,
    /// IOREGSEL.
    pub ioregsel: u8,
    /// IOAPIC ID (4 bits).
    pub id: u8,
    /// Pending requests: bit n set while level pin n is asserted. Edges are
    /// delivered or lost at once, so edge pins never appear here. Derived
    /// from `line_levels` and the entries; restore checks it.
    pub irr: u32,
    /// The redirection table.
    pub redirection_table: [u64; IOAPIC_PINS],
    /// Electrical level last driven on each input (bit n = pin n).
    pub line_levels: u32,
    /// Back-to-back EOI redeliveries per pin (storm guard).
    pub eoi_redeliveries: [u32; IOAPIC_PINS],
    /// Pins whose redelivery the storm guard deferred.
    pub deferred_pins: u32,
    /// When the deferred redeliveries are due (virtual ns).
    pub deferred_deadline_ns: Option<u64>,
    /// Acknowledged pins not yet collected by `take_acked_pins`.
    pub acked_pins: u32,
}

/// The I/O APIC device model.
#[derive(Clone, Debug)]
pub struct Ioapic {
    version: IoapicVersion,
    base_address: u64,
    ioregsel: u8,
    id: u8,
    rtes: [Redirection; IOAPIC_PINS],
    line_levels: u32,
    eoi_redeliveries: [u32; IOAPIC_PINS],
    deferred_pins: u32,
    deferred_deadline: Option<u64>,
    acked_pins: u32,
    generation: u64,
}

impl Ioapic {
    /// A device in its reset state: every pin masked, ID 0, all lines low.
    pub fn new(version: IoapicVersion) -> Self {
        Self {
            version,
            base_address: IOAPIC_BASE,
            ioregsel: 0,
            id: 0,
            rtes: [Redirection::RESET; IOAPIC_PINS],
            line_levels: 0,
            eoi_redeliveries: [0; IOAPIC_PINS],
            deferred_pins: 0,
            deferred_deadline: None,
            acked_pins: 0,
            generation: 0,
        }
    }

    /// The version this device models.
    pub fn version(&self) -> IoapicVersion {
        self.version
    }

    /// Guest-physical base address of the register page.
    pub fn base_address(&self) -> u64 {
        self.base_address
    }

    /// Bumped on every change of a redirection entry's guest-visible
    /// configuration (and on restore), so a backend knows when to resync.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The redirection entry of `pin` (None if out of range).
    pub fn redirection(&self, pin: usize) -> Option<Redirection> {
        self.rtes.get(pin).copied()
    }

    /// The message pin `pin` would send now (None if out of range) and
    /// whether the pin is masked.
    pub fn entry_message(&self, pin: usize) -> Option<(InterruptMessage, bool)> {
        self.rtes.get(pin).map(|rte| (rte.message(), rte.masked()))
    }

    /// Edge-triggered pins (bit n = pin n) whose entry carries `vector`.
    pub fn edge_pins_with_vector(&self, vector: u8) -> u32 {
        // Branch-free: this runs on every edge EOI, usually finding nothing.
        let mut pins = 0;
        for (pin, rte) in self.rtes.iter().enumerate() {
            pins |= u32::from((rte.vector() == vector) & !rte.is_level()) << pin;
        }
        pins
    }

    /// Pins (bit n = pin n) whose entry has `vector`, level or edge: the
    /// pins an EOI for that vector acknowledges.
    pub fn pins_with_vector(&self, vector: u8) -> u32 {
        let mut pins = 0;
        for (pin, rte) in self.rtes.iter().enumerate() {
            pins |= u32::from(rte.vector() == vector) << pin;
        }
        pins
    }

    /// Guest read of `data.len()` bytes at `offset` in the IOAPIC page.
    ///
    /// Offsets are decoded modulo 0x100. 0x00 reads IOREGSEL and 0x10 the
    /// selected register, as the low `len` bytes (zero beyond 4 bytes).
    /// Every other offset, including the write-only EOI register, reads 0.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset & 0xFF {
            IOREGSEL => u32::from(self.ioregsel),
            IOWIN => self.read_indirect(),
            _ => return,
        };
        for (byte, src) in data.iter_mut().zip(value.to_le_bytes()) {
            *byte = src;
        }
    }

    /// Guest write of `data` at `offset` in the IOAPIC page.
    ///
    /// Offsets are decoded modulo 0x100. 0x00 takes the low byte of any
    /// write as IOREGSEL. 0x10 writes the selected register from a write of
    /// at least 4 bytes (low dword); narrower IOWIN writes are ignored.
    /// 0x40 (version 0x20 only) is an EOI for the vector in the low byte.
    /// Empty writes and other offsets are ignored.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now_ns: u64, bus: &mut dyn ApicBus) {
        let Some(&low_byte) = data.first() else {
            return;
        };
        match offset & 0xFF {
            IOREGSEL => self.ioregsel = low_byte,
            IOWIN => {
                if let Some(dword) = data.get(..4) {
                    let mut bytes = [0u8; 4];
                    bytes.copy_from_slice(dword);
                    self.write_indirect(u32::from_le_bytes(bytes), bus);
                }
            }
            IOEOI => {
                if let Some(vector) = self.directed_eoi(offset, data) {
                    self.eoi(vector, now_ns, bus);
                }
            }
            _ => {}
        }
    }

    /// The vector a write of `data` at `offset` ends through the EOI
    /// register (version 0x20 only), if it is such a write.
    pub fn directed_eoi(&self, offset: u64, data: &[u8]) -> Option<u8> {
        let vector = *data.first()?;
        (offset & 0xFF == IOEOI && self.version.has_eoi_register()).then_some(vector)
    }

    /// Value of the register IOREGSEL selects; all ones if there is none.
    fn read_indirect(&self) -> u32 {
        match self.ioregsel {
            REG_ID | REG_ARBITRATION => u32::from(self.id) << ID_SHIFT,
            REG_VERSION => self.version.number() | ((IOAPIC_PINS as u32 - 1) << 16),
            sel => match Self::rte_index(sel)
                .and_then(|(pin, high)| self.rtes.get(pin).map(|rte| (rte, high)))
            {
                Some((rte, true)) => rte.high(),
                Some((rte, false)) => rte.low(),
                // Nothing is indexed by an unchecked selector: unknown and
                // out-of-range registers read all ones.
                None => u32::MAX,
            },
        }
    }

    /// The pin and half (true = high) an indirect register index names.
    fn rte_index(sel: u8) -> Option<(usize, bool)> {
        let rel = sel.checked_sub(REG_REDIRECTION_BASE)?;
        let pin = usize::from(rel / 2);
        (pin < IOAPIC_PINS).then_some((pin, rel % 2 == 1))
    }

    fn write_indirect(&mut self, value: u32, bus: &mut dyn ApicBus) {
        match self.ioregsel {
            REG_ID => self.id = ((value >> ID_SHIFT) as u8) & ID_MASK,
            // Version and arbitration are read-only; unknown registers ignore writes.
            REG_VERSION | REG_ARBITRATION => {}
            sel => {
                if let Some((pin, high)) = Self::rte_index(sel) {
                    self.write_rte(pin, high, value, bus);
                }
            }
        }
    }

    fn write_rte(&mut self, pin: usize, high: bool, value: u32, bus: &mut dyn ApicBus) {
        let Some(slot) = self.rtes.get_mut(pin) else {
            return;
        };
        let old = *slot;
        let mut new = old.guest_write(high, value);
        // An edge entry has no EOI to wait for; guests also rely on this
        // to clear a stuck remote IRR (Linux and Xen's fake EOI).
        if !new.is_level() {
            new = new.with_remote_irr(false);
        }
        *slot = new;
        if (old.bits() ^ new.bits()) & Redirection::WRITABLE != 0 {
            self.generation = self.generation.wrapping_add(1);
        }
        // Unmasking, switching to level or flipping polarity while the
        // line is asserted delivers now; edges are never replayed.
        if self.level_ready(pin) {
            self.service(pin, bus);
        }
    }

    /// Electrical level of input `pin`.
    fn line(&self, pin: usize) -> bool {
        pin < IOAPIC_PINS && self.line_levels & (1 << pin) != 0
    }

    /// Whether level pin `pin` should send its message now.
    fn level_ready(&self, pin: usize) -> bool {
        self.rtes.get(pin).is_some_and(|rte| {
            rte.is_level() && !rte.masked() && !rte.remote_irr() && rte.asserted(self.line(pin))
        })
    }

    /// Send pin `pin`'s message; a level message that reached someone sets
    /// remote IRR. Returns how many vCPUs accepted it.
    fn service(&mut self, pin: usize, bus: &mut dyn ApicBus) -> usize {
        let Some(rte) = self.rtes.get_mut(pin) else {
            return 0;
        };
        let accepted = bus.deliver(&rte.message());
        if rte.is_level() && accepted > 0 {
            *rte = rte.with_remote_irr(true);
        }
        accepted
    }

    /// Drive input `pin` to electrical `level` (see the module docs for
    /// polarity). Pins beyond 23 report [`IrqStatus::Masked`].
    ///
    /// Results: `Masked` if the entry is masked; `Coalesced` if a level pin
    /// still waits for its EOI, if an edge pin sees no new edge (its line
    /// was already asserted), or when the line is de-asserted (nothing is
    /// sent; KVM reports 1 there); otherwise `Delivered(n)` with the number
    /// of vCPUs the bus reached (possibly 0).
    pub fn set_irq(
        &mut self,
        pin: usize,
        level: bool,
        _now_ns: u64,
        bus: &mut dyn ApicBus,
    ) -> IrqStatus {
        let Some(&rte) = self.rtes.get(pin) else {
            return IrqStatus::Masked;
        };
        let was_asserted = rte.asserted(self.line(pin));
        if level {
            self.line_levels |= 1 << pin;
        } else {
            self.line_levels &= !(1 << pin);
        }
        let asserted = rte.asserted(level);

        if rte.masked() {
            return IrqStatus::Masked;
        }
        if !asserted {
            return IrqStatus::Coalesced;
        }
        if rte.is_level() {
            if rte.remote_irr() {
                return IrqStatus::Coalesced;
            }
        } else if was_asserted {
            return IrqStatus::Coalesced;
        }
        IrqStatus::Delivered(self.service(pin, bus))
    }

    /// An EOI for `vector` arrived (LAPIC EOI broadcast or the EOI register).
    ///
    /// Every entry with that vector is acknowledged (see
    /// [`Ioapic::take_acked_pins`]) and has its remote IRR cleared; a level
    /// pin still asserted and unmasked is redelivered, subject to the storm
    /// guard.
    pub fn eoi(&mut self, vector: u8, now_ns: u64, bus: &mut dyn ApicBus) {
        for pin in 0..IOAPIC_PINS {
            let Some(rte) = self.rtes.get_mut(pin) else {
                continue;
            };
            if rte.vector() != vector {
                continue;
            }
            *rte = rte.with_remote_irr(false);
            self.acked_pins |= 1 << pin;

            let Some(count) = self.eoi_redeliveries.get_mut(pin) else {
                continue;
            };
            if self.deferred_pins & (1 << pin) != 0 {
                // Already waiting for the back-off: advance() delivers it.
                continue;
            }
            let ready = self.rtes.get(pin).is_some_and(|rte| {
                rte.is_level() && !rte.masked() && rte.asserted(self.line_levels & (1 << pin) != 0)
            });
            if !ready {
                *count = 0;
                continue;
            }
            if *count >= STORM_THRESHOLD {
                *count = 0;
                self.deferred_pins |= 1 << pin;
                self.deferred_deadline
                    .get_or_insert(now_ns.saturating_add(STORM_BACKOFF_NS));
            } else {
                *count += 1;
                self.service(pin, bus);
            }
        }
    }

    /// When [`Ioapic::advance`] must next be called, if anything is deferred.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deferred_deadline
    }

    /// Run deferred work due at `now_ns`: the storm guard's redeliveries.
    pub fn advance(&mut self, now_ns: u64, bus: &mut dyn ApicBus) {
        match self.deferred_deadline {
            Some(deadline) if now_ns >= deadline => {}
            _ => return,
        }
        self.deferred_deadline = None;
        let pins = std::mem::take(&mut self.deferred_pins);
        for pin in 0..IOAPIC_PINS {
            if pins & (1 << pin) != 0 && self.level_ready(pin) {
                self.service(pin, bus);
            }
        }
    }

    /// Pins (bit n = pin n) whose EOI arrived since the last call: every
    /// pin whose entry's vector matched an EOI, level or edge. Ack notifiers
    /// (PIT reinjection, level resampling) hang off this.
    pub fn take_acked_pins(&mut self) -> u32 {
        std::mem::take(&mut self.acked_pins)
    }

    /// Level pins currently asserted (the IRR of the snapshot).
    fn irr(&self) -> u32 {
        (0..IOAPIC_PINS)
            .filter(|&pin| {
                self.rtes
                    .get(pin)
                    .is_some_and(|rte| rte.is_level() && rte.asserted(self.line(pin)))
            })
            .fold(0, |acc, pin| acc | (1 << pin))
    }

    /// Snapshot the device.
    pub fn save(&self) -> IoapicState {
        IoapicState {
            version: self.version,
            base_address: self.base_address,
            ioregsel: self.ioregsel,
            id: self.id,
            irr: self.irr(),
            redirection_table: self.rtes.map(Redirection::bits),
            line_levels: self.line_levels,
            eoi_redeliveries: self.eoi_redeliveries,
            deferred_pins: self.deferred_pins,
            deferred_deadline_ns: self.deferred_deadline,
            acked_pins: self.acked_pins,
        }
    }

    /// Load a snapshot after checking it; on error the device is unchanged.
    pub fn restore(&mut self, state: &IoapicState) -> Result<(), IoapicError> {
        if state.version != self.version {
            return Err(IoapicError::VersionMismatch {
                expected: self.version,
                found: state.version,
            });
        }
        if state.base_address & 0xFFF != 0 {
            return Err(IoapicError::BaseAddress(state.base_address));
        }
        if state.id & !ID_MASK != 0 {
            return Err(IoapicError::Id(state.id));
        }
        for (pin, &bits) in state.redirection_table.iter().enumerate() {
            let rte = Redirection::from_bits(bits);
            // Delivery status is never set here, and an edge entry never
            // waits for an EOI.
            if rte.reserved_bits() != 0
                || rte.delivery_status()
                || (rte.remote_irr() && !rte.is_level())
            {
                return Err(IoapicError::Redirection { pin, bits });
            }
        }
        for (field, bits) in [
            ("line_levels", state.line_levels),
            ("deferred_pins", state.deferred_pins),
            ("acked_pins", state.acked_pins),
            ("irr", state.irr),
        ] {
            if bits & !PIN_MASK != 0 {
                return Err(IoapicError::PinBits { field, bits });
            }
        }
        for (pin, &count) in state.eoi_redeliveries.iter().enumerate() {
            if count > STORM_THRESHOLD {
                return Err(IoapicError::StormCount { pin, count });
            }
        }
        if (state.deferred_pins != 0) != state.deferred_deadline_ns.is_some() {
            return Err(IoapicError::Deferred {
                pins: state.deferred_pins,
            });
        }

        let mut restored = Self {
            version: self.version,
            base_address: state.base_address,
            ioregsel: state.ioregsel,
            id: state.id,
            rtes: state.redirection_table.map(Redirection::from_bits),
            line_levels: state.line_levels,
            eoi_redeliveries: state.eoi_redeliveries,
            deferred_pins: state.deferred_pins,
            deferred_deadline: state.deferred_deadline_ns,
            acked_pins: state.acked_pins,
            generation: self.generation.wrapping_add(1),
        };
        let expected = restored.irr();
        if state.irr != expected {
            return Err(IoapicError::Irr {
                expected,
                found: state.irr,
            });
        }
        std::mem::swap(self, &mut restored);
        Ok(())
    }
}
