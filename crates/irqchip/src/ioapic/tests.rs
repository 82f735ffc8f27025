use proptest::prelude::*;

use super::*;
use crate::delivery::{
    DeliveryMode, DestinationFormat, DestinationMode, InterruptMessage, Shorthand, TriggerMode,
};

/// A bus that records every message and accepts each on `accept` vCPUs.
struct RecordingBus {
    sent: Vec<InterruptMessage>,
    accept: usize,
}

impl RecordingBus {
    fn new() -> Self {
        Self {
            sent: Vec::new(),
            accept: 1,
        }
    }

    fn rejecting() -> Self {
        Self {
            sent: Vec::new(),
            accept: 0,
        }
    }

    fn take(&mut self) -> Vec<InterruptMessage> {
        std::mem::take(&mut self.sent)
    }
}

impl ApicBus for RecordingBus {
    fn deliver(&mut self, msg: &InterruptMessage) -> usize {
        self.sent.push(*msg);
        self.accept
    }
}

const LOGICAL: u32 = 1 << 11;
const DELIVERY_STATUS: u32 = 1 << 12;
const ACTIVE_LOW: u32 = 1 << 13;
const REMOTE_IRR: u32 = 1 << 14;
const LEVEL: u32 = 1 << 15;
const MASKED: u32 = 1 << 16;

fn write_reg(io: &mut Ioapic, sel: u8, value: u32, bus: &mut RecordingBus) {
    io.mmio_write(IOREGSEL, &[sel], 0, bus);
    io.mmio_write(IOWIN, &value.to_le_bytes(), 0, bus);
}

fn read_reg(io: &mut Ioapic, sel: u8) -> u32 {
    let mut bus = RecordingBus::new();
    io.mmio_write(IOREGSEL, &[sel], 0, &mut bus);
    let mut data = [0u8; 4];
    io.mmio_read(IOWIN, &mut data);
    u32::from_le_bytes(data)
}

fn low_sel(pin: u8) -> u8 {
    REG_REDIRECTION_BASE + 2 * pin
}

fn high_sel(pin: u8) -> u8 {
    REG_REDIRECTION_BASE + 2 * pin + 1
}

/// Program an entry the way a guest does: destination first, then low half.
fn program(io: &mut Ioapic, pin: u8, low: u32, dest: u8, bus: &mut RecordingBus) {
    write_reg(io, high_sel(pin), u32::from(dest) << 24, bus);
    write_reg(io, low_sel(pin), low, bus);
}

fn fixed(vector: u8, trigger: TriggerMode, dest: u32) -> InterruptMessage {
    InterruptMessage {
        vector,
        delivery_mode: DeliveryMode::Fixed,
        destination_mode: DestinationMode::Physical,
        trigger_mode: trigger,
        level: true,
        destination: dest,
        format: DestinationFormat::XApic,
        shorthand: Shorthand::None,
        source: None,
    }
}

fn remote_irr(io: &mut Ioapic, pin: u8) -> bool {
    read_reg(io, low_sel(pin)) & REMOTE_IRR != 0
}

// --- Registers -------------------------------------------------------------

#[test]
fn id_register_keeps_bits_27_to_24() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    write_reg(&mut io, REG_ID, 0xFFFF_FFFF, &mut bus);
    assert_eq!(read_reg(&mut io, REG_ID), 0x0F00_0000);
    write_reg(&mut io, REG_ID, 0x0500_00FF, &mut bus);
    assert_eq!(read_reg(&mut io, REG_ID), 0x0500_0000);
}

#[test]
fn version_register_reports_version_and_max_entry_23() {
    let mut v11 = Ioapic::new(IoapicVersion::V11);
    let mut v20 = Ioapic::new(IoapicVersion::V20);
    assert_eq!(read_reg(&mut v11, REG_VERSION), 0x0017_0011);
    assert_eq!(read_reg(&mut v20, REG_VERSION), 0x0017_0020);
    // Read-only.
    let mut bus = RecordingBus::new();
    write_reg(&mut v11, REG_VERSION, 0, &mut bus);
    assert_eq!(read_reg(&mut v11, REG_VERSION), 0x0017_0011);
}

#[test]
fn arbitration_register_reads_the_id() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    write_reg(&mut io, REG_ID, 0x0300_0000, &mut bus);
    assert_eq!(read_reg(&mut io, REG_ARBITRATION), 0x0300_0000);
    write_reg(&mut io, REG_ARBITRATION, 0x0F00_0000, &mut bus);
    assert_eq!(read_reg(&mut io, REG_ARBITRATION), 0x0300_0000);
}

#[test]
fn rte_halves_live_at_0x10_plus_2n_and_0x11_plus_2n() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    write_reg(
        &mut io,
        0x10 + 2 * 7,
        0x0000_0245 | LOGICAL | MASKED,
        &mut bus,
    );
    write_reg(&mut io, 0x11 + 2 * 7, 0x0300_0000, &mut bus);
    assert_eq!(read_reg(&mut io, 0x10 + 2 * 7), 0x0001_0245 | LOGICAL);
    assert_eq!(read_reg(&mut io, 0x11 + 2 * 7), 0x0300_0000);
    // Neighbours untouched.
    assert_eq!(read_reg(&mut io, 0x10 + 2 * 6), MASKED);
    assert_eq!(read_reg(&mut io, 0x10 + 2 * 8), MASKED);
    let (msg, masked) = io.entry_message(7).unwrap();
    assert!(masked);
    assert_eq!(msg.vector, 0x45);
    assert_eq!(msg.delivery_mode, DeliveryMode::Smi);
    assert_eq!(msg.destination_mode, DestinationMode::Logical);
    assert_eq!(msg.destination, 3);
    // Last entry is 23 (0x3E/0x3F).
    write_reg(&mut io, 0x3F, 0xAB00_0000, &mut bus);
    assert_eq!(read_reg(&mut io, 0x3F), 0xAB00_0000);
    assert_eq!(io.entry_message(23).unwrap().0.destination, 0xAB);
}

#[test]
fn out_of_range_iowin_read_returns_all_ones() {
    let mut io = Ioapic::new(IoapicVersion::V20);
    for sel in [0x03u8, 0x0F, 0x40, 0x41, 0x80, 0xFF] {
        assert_eq!(read_reg(&mut io, sel), 0xFFFF_FFFF, "sel {sel:#x}");
    }
    // Writes there change nothing.
    let before = io.save();
    let mut bus = RecordingBus::new();
    for sel in [0x03u8, 0x40, 0xFF] {
        write_reg(&mut io, sel, 0, &mut bus);
    }
    assert_eq!(io.save(), before);
    assert!(bus.sent.is_empty());
}

#[test]
fn delivery_status_and_remote_irr_are_read_only() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    // A guest cannot set them...
    program(
        &mut io,
        1,
        0x30 | LEVEL | REMOTE_IRR | DELIVERY_STATUS,
        0,
        &mut bus,
    );
    assert_eq!(read_reg(&mut io, low_sel(1)), 0x30 | LEVEL);
    // ...nor clear remote IRR by writing a level entry.
    io.set_irq(1, true, 0, &mut bus);
    assert!(remote_irr(&mut io, 1));
    write_reg(&mut io, low_sel(1), 0x30 | LEVEL, &mut bus);
    assert!(remote_irr(&mut io, 1));
    assert_eq!(read_reg(&mut io, low_sel(1)) & DELIVERY_STATUS, 0);
}

#[test]
fn rte_writes_keep_only_writable_bits() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    write_reg(&mut io, low_sel(2), 0xFFFF_FFFF, &mut bus);
    write_reg(&mut io, high_sel(2), 0xFFFF_FFFF, &mut bus);
    // Low: vector, mode, dest mode, polarity, trigger, mask; remote IRR is
    // not set by the write (and the pin's line is low).
    assert_eq!(read_reg(&mut io, low_sel(2)), 0x0001_AFFF);
    // High: destination 63:56 and extended destination 55:49.
    assert_eq!(read_reg(&mut io, high_sel(2)), 0xFFFE_0000);
    assert_eq!(io.entry_message(2).unwrap().0.destination, 0x7FFF);
}

#[test]
fn reset_masks_every_pin() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    for pin in 0..IOAPIC_PINS as u8 {
        assert_eq!(read_reg(&mut io, low_sel(pin)), MASKED);
        assert_eq!(read_reg(&mut io, high_sel(pin)), 0);
        assert!(io.entry_message(pin.into()).unwrap().1);
    }
    assert_eq!(read_reg(&mut io, REG_ID), 0);
    let mut bus = RecordingBus::new();
    for pin in 0..IOAPIC_PINS {
        assert_eq!(io.set_irq(pin, true, 0, &mut bus), IrqStatus::Masked);
    }
    assert!(bus.sent.is_empty());
}

// --- MMIO decode -----------------------------------------------------------

#[test]
fn ioregsel_reads_back_its_low_byte() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    io.mmio_write(IOREGSEL, &0x1234_5621u32.to_le_bytes(), 0, &mut bus);
    let mut data = [0xAAu8; 4];
    io.mmio_read(IOREGSEL, &mut data);
    assert_eq!(data, [0x21, 0, 0, 0]);
}

#[test]
fn narrow_iowin_writes_are_ignored_and_wide_ones_use_the_low_dword() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    io.mmio_write(IOREGSEL, &[low_sel(3)], 0, &mut bus);
    io.mmio_write(IOWIN, &[0x40], 0, &mut bus);
    io.mmio_write(IOWIN, &[0x40, 0x00], 0, &mut bus);
    assert_eq!(read_reg(&mut io, low_sel(3)), MASKED);
    io.mmio_write(IOREGSEL, &[low_sel(3)], 0, &mut bus);
    io.mmio_write(IOWIN, &0xFFFF_FFFF_0001_0041u64.to_le_bytes(), 0, &mut bus);
    assert_eq!(read_reg(&mut io, low_sel(3)), MASKED | 0x41);
    assert_eq!(read_reg(&mut io, high_sel(3)), 0);
}

#[test]
fn reads_return_low_bytes_and_zero_elsewhere() {
    let mut io = Ioapic::new(IoapicVersion::V20);
    let mut bus = RecordingBus::new();
    write_reg(&mut io, REG_ID, 0x0700_0000, &mut bus);
    io.mmio_write(IOREGSEL, &[REG_VERSION], 0, &mut bus);
    let mut one = [0xAAu8; 1];
    io.mmio_read(IOWIN, &mut one);
    assert_eq!(one, [0x20]);
    let mut eight = [0xAAu8; 8];
    io.mmio_read(IOWIN, &mut eight);
    assert_eq!(eight, [0x20, 0, 0x17, 0, 0, 0, 0, 0]);
    for offset in [0x04, 0x11, 0x20, 0x40, 0xFF] {
        let mut data = [0xAAu8; 4];
        io.mmio_read(offset, &mut data);
        assert_eq!(data, [0; 4], "offset {offset:#x}");
    }
    let mut empty = [];
    io.mmio_read(IOWIN, &mut empty);
    io.mmio_write(IOWIN, &[], 0, &mut bus);
}

#[test]
fn offsets_decode_modulo_256() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    io.mmio_write(0x300, &[REG_VERSION], 0, &mut bus);
    let mut data = [0u8; 4];
    io.mmio_read(0xFFF_FFFF_FF10, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x0017_0011);
}

// --- Edge pins -------------------------------------------------------------

#[test]
fn edge_pin_delivers_on_rising_edge() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 4, 0x24, 1, &mut bus);
    assert!(bus.take().is_empty());
    assert_eq!(io.set_irq(4, true, 0, &mut bus), IrqStatus::Delivered(1));
    assert_eq!(bus.take(), vec![fixed(0x24, TriggerMode::Edge, 1)]);
    // Still high: no new edge.
    assert_eq!(io.set_irq(4, true, 0, &mut bus), IrqStatus::Coalesced);
    assert!(bus.take().is_empty());
    assert_eq!(io.set_irq(4, false, 0, &mut bus), IrqStatus::Coalesced);
    assert!(bus.take().is_empty());
    assert_eq!(io.set_irq(4, true, 0, &mut bus), IrqStatus::Delivered(1));
    assert_eq!(bus.take().len(), 1);
    // Edges never set remote IRR.
    assert!(!remote_irr(&mut io, 4));
}

#[test]
fn edge_while_masked_is_lost() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 4, 0x24 | MASKED, 0, &mut bus);
    assert_eq!(io.set_irq(4, true, 0, &mut bus), IrqStatus::Masked);
    write_reg(&mut io, low_sel(4), 0x24, &mut bus);
    assert!(bus.take().is_empty(), "unmasking must not replay the edge");
    assert_eq!(io.set_irq(4, false, 0, &mut bus), IrqStatus::Coalesced);
    assert_eq!(io.set_irq(4, true, 0, &mut bus), IrqStatus::Delivered(1));
    assert_eq!(bus.take(), vec![fixed(0x24, TriggerMode::Edge, 0)]);
}

// --- Level pins ------------------------------------------------------------

#[test]
fn level_pin_delivers_while_asserted_unmasked_and_remote_irr_clear() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 9, 0x39 | LEVEL, 2, &mut bus);
    assert_eq!(io.set_irq(9, true, 0, &mut bus), IrqStatus::Delivered(1));
    assert_eq!(bus.take(), vec![fixed(0x39, TriggerMode::Level, 2)]);
    assert!(remote_irr(&mut io, 9));
    // Remote IRR set: further raises coalesce.
    assert_eq!(io.set_irq(9, true, 0, &mut bus), IrqStatus::Coalesced);
    assert!(bus.take().is_empty());
    // Masked: the mask wins.
    write_reg(&mut io, low_sel(9), 0x39 | LEVEL | MASKED, &mut bus);
    assert_eq!(io.set_irq(9, true, 0, &mut bus), IrqStatus::Masked);
    assert!(bus.take().is_empty());
}

#[test]
fn level_pin_sets_remote_irr_only_when_a_vcpu_accepted() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::rejecting();
    program(&mut io, 9, 0x39 | LEVEL, 0x20, &mut bus);
    assert_eq!(io.set_irq(9, true, 0, &mut bus), IrqStatus::Delivered(0));
    assert_eq!(bus.take().len(), 1);
    assert!(!remote_irr(&mut io, 9));
    // Nothing waits for an EOI, so the next raise tries again.
    bus.accept = 2;
    assert_eq!(io.set_irq(9, true, 0, &mut bus), IrqStatus::Delivered(2));
    assert!(remote_irr(&mut io, 9));
}

#[test]
fn eoi_clears_remote_irr_on_every_rte_with_the_vector() {
    // Regression: the EOI lookup must not stop at the first matching entry.
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    for pin in [3u8, 10, 17] {
        program(&mut io, pin, 0x51 | LEVEL, 0, &mut bus);
        io.set_irq(pin.into(), true, 0, &mut bus);
        io.set_irq(pin.into(), false, 0, &mut bus);
        assert!(remote_irr(&mut io, pin));
    }
    program(&mut io, 11, 0x52 | LEVEL, 0, &mut bus);
    io.set_irq(11, true, 0, &mut bus);
    bus.take();
    io.eoi(0x51, 0, &mut bus);
    for pin in [3u8, 10, 17] {
        assert!(!remote_irr(&mut io, pin), "pin {pin}");
    }
    assert!(remote_irr(&mut io, 11), "other vectors keep remote IRR");
    assert!(bus.take().is_empty(), "lines are low: nothing to redeliver");
}

#[test]
fn eoi_redelivers_if_line_still_high() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 5, 0x61 | LEVEL, 1, &mut bus);
    program(&mut io, 6, 0x61 | LEVEL, 2, &mut bus);
    io.set_irq(5, true, 0, &mut bus);
    io.set_irq(6, true, 0, &mut bus);
    assert_eq!(bus.take().len(), 2);
    io.eoi(0x61, 0, &mut bus);
    assert_eq!(
        bus.take(),
        vec![
            fixed(0x61, TriggerMode::Level, 1),
            fixed(0x61, TriggerMode::Level, 2)
        ]
    );
    assert!(remote_irr(&mut io, 5));
    assert!(remote_irr(&mut io, 6));
    // Once the line drops, the EOI only clears remote IRR.
    io.set_irq(5, false, 0, &mut bus);
    io.set_irq(6, false, 0, &mut bus);
    io.eoi(0x61, 0, &mut bus);
    assert!(bus.take().is_empty());
    assert!(!remote_irr(&mut io, 5));
}

#[test]
fn eoi_for_another_vector_does_nothing() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 5, 0x61 | LEVEL, 1, &mut bus);
    io.set_irq(5, true, 0, &mut bus);
    bus.take();
    io.eoi(0x62, 0, &mut bus);
    assert!(remote_irr(&mut io, 5));
    assert!(bus.take().is_empty());
    assert_eq!(io.take_acked_pins(), 0);
}

#[test]
fn writing_rte_as_edge_clears_remote_irr() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 8, 0x70 | LEVEL, 0, &mut bus);
    io.set_irq(8, true, 0, &mut bus);
    assert!(remote_irr(&mut io, 8));
    // The Linux/Xen fake EOI: flip to edge (masked), then back to level.
    write_reg(&mut io, low_sel(8), 0x70 | MASKED, &mut bus);
    assert!(!remote_irr(&mut io, 8));
    bus.take();
    write_reg(&mut io, low_sel(8), 0x70 | LEVEL, &mut bus);
    // Line still high and remote IRR clear: delivered again.
    assert_eq!(bus.take(), vec![fixed(0x70, TriggerMode::Level, 0)]);
    assert!(remote_irr(&mut io, 8));
}

#[test]
fn rte_retarget_while_in_service_does_not_lose_eoi() {
    // Regression: rewriting only the high half while the vector is in
    // service must leave the EOI path intact.
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 12, 0x80 | LEVEL, 1, &mut bus);
    io.set_irq(12, true, 0, &mut bus);
    assert_eq!(bus.take(), vec![fixed(0x80, TriggerMode::Level, 1)]);
    write_reg(&mut io, high_sel(12), 0x0500_0000, &mut bus);
    assert!(remote_irr(&mut io, 12), "retarget keeps remote IRR");
    assert!(bus.take().is_empty());
    io.eoi(0x80, 0, &mut bus);
    assert_eq!(bus.take(), vec![fixed(0x80, TriggerMode::Level, 5)]);
    assert!(remote_irr(&mut io, 12));
    assert_eq!(io.take_acked_pins(), 1 << 12);
}

#[test]
fn unmasking_level_pin_with_line_high_delivers() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 14, 0x91 | LEVEL | MASKED, 3, &mut bus);
    assert_eq!(io.set_irq(14, true, 0, &mut bus), IrqStatus::Masked);
    assert!(bus.take().is_empty());
    write_reg(&mut io, low_sel(14), 0x91 | LEVEL, &mut bus);
    assert_eq!(bus.take(), vec![fixed(0x91, TriggerMode::Level, 3)]);
    assert!(remote_irr(&mut io, 14));
    // Unmasking a level pin whose line is low sends nothing.
    program(&mut io, 15, 0x92 | LEVEL | MASKED, 3, &mut bus);
    write_reg(&mut io, low_sel(15), 0x92 | LEVEL, &mut bus);
    assert!(bus.take().is_empty());
}

#[test]
fn active_low_pin_inverts_the_input() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    // Level, active low, line held high (idle): nothing happens on unmask.
    io.set_irq(16, true, 0, &mut bus);
    program(&mut io, 16, 0xA0 | LEVEL | ACTIVE_LOW, 0, &mut bus);
    assert!(bus.take().is_empty());
    // Pulling the line low asserts it.
    assert_eq!(io.set_irq(16, false, 0, &mut bus), IrqStatus::Delivered(1));
    assert_eq!(bus.take(), vec![fixed(0xA0, TriggerMode::Level, 0)]);
    // Releasing it high de-asserts: the EOI does not redeliver.
    assert_eq!(io.set_irq(16, true, 0, &mut bus), IrqStatus::Coalesced);
    io.eoi(0xA0, 0, &mut bus);
    assert!(bus.take().is_empty());

    // Edge, active low: the falling line is the edge.
    io.set_irq(17, true, 0, &mut bus);
    program(&mut io, 17, 0xA1 | ACTIVE_LOW, 0, &mut bus);
    assert_eq!(io.set_irq(17, true, 0, &mut bus), IrqStatus::Coalesced);
    assert_eq!(io.set_irq(17, false, 0, &mut bus), IrqStatus::Delivered(1));
    assert_eq!(bus.take(), vec![fixed(0xA1, TriggerMode::Edge, 0)]);
}

#[test]
fn set_irq_beyond_pin_23_is_masked() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    for pin in [24, 31, 32, 1000, usize::MAX] {
        assert_eq!(io.set_irq(pin, true, 0, &mut bus), IrqStatus::Masked);
    }
    assert!(bus.sent.is_empty());
    assert_eq!(io.entry_message(24), None);
    assert_eq!(io.save().line_levels, 0);
}

// --- Storm guard -----------------------------------------------------------

#[test]
fn interrupt_storm_guard_backs_off_after_10000_redeliveries() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 2, 0x33 | LEVEL, 0, &mut bus);
    io.set_irq(2, true, 0, &mut bus);
    assert_eq!(bus.take().len(), 1);
    for i in 0..STORM_THRESHOLD {
        io.eoi(0x33, u64::from(i), &mut bus);
        assert_eq!(bus.sent.len(), 1, "redelivery {i}");
        bus.sent.clear();
    }
    assert_eq!(io.next_deadline(), None);
    // The next one is deferred.
    let now = 1_000_000;
    io.eoi(0x33, now, &mut bus);
    assert!(bus.take().is_empty());
    assert!(!remote_irr(&mut io, 2));
    assert_eq!(io.next_deadline(), Some(now + STORM_BACKOFF_NS));
    // Another EOI meanwhile does not bypass the back-off.
    io.eoi(0x33, now + 1, &mut bus);
    assert!(bus.take().is_empty());
    io.advance(now + STORM_BACKOFF_NS - 1, &mut bus);
    assert!(bus.take().is_empty());
    io.advance(now + STORM_BACKOFF_NS, &mut bus);
    assert_eq!(bus.take(), vec![fixed(0x33, TriggerMode::Level, 0)]);
    assert_eq!(io.next_deadline(), None);
    assert!(remote_irr(&mut io, 2));
    // The count starts over: the next EOI redelivers at once.
    io.eoi(0x33, now + STORM_BACKOFF_NS, &mut bus);
    assert_eq!(bus.take().len(), 1);
}

#[test]
fn storm_count_resets_when_the_line_drops() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 2, 0x33 | LEVEL, 0, &mut bus);
    io.set_irq(2, true, 0, &mut bus);
    for _ in 0..STORM_THRESHOLD - 1 {
        io.eoi(0x33, 0, &mut bus);
    }
    io.set_irq(2, false, 0, &mut bus);
    io.eoi(0x33, 0, &mut bus);
    io.set_irq(2, true, 0, &mut bus);
    bus.sent.clear();
    for _ in 0..STORM_THRESHOLD {
        io.eoi(0x33, 0, &mut bus);
    }
    assert_eq!(bus.take().len(), STORM_THRESHOLD as usize);
    assert_eq!(io.next_deadline(), None);
}

#[test]
fn deferred_redelivery_skips_a_pin_that_was_masked_meanwhile() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 2, 0x33 | LEVEL, 0, &mut bus);
    io.set_irq(2, true, 0, &mut bus);
    for _ in 0..=STORM_THRESHOLD {
        io.eoi(0x33, 0, &mut bus);
    }
    assert_eq!(io.next_deadline(), Some(STORM_BACKOFF_NS));
    write_reg(&mut io, low_sel(2), 0x33 | LEVEL | MASKED, &mut bus);
    bus.sent.clear();
    io.advance(u64::MAX, &mut bus);
    assert!(bus.take().is_empty());
    assert_eq!(io.next_deadline(), None);
}

// --- Directed EOI ----------------------------------------------------------

#[test]
fn v20_eoi_register_at_0x40_acts_as_eoi() {
    // The LAPIC may advertise EOI-broadcast suppression only with this.
    assert!(IoapicVersion::V20.has_eoi_register());
    assert!(!IoapicVersion::V11.has_eoi_register());
    let mut io = Ioapic::new(IoapicVersion::V20);
    let mut bus = RecordingBus::new();
    program(&mut io, 20, 0xC4 | LEVEL, 0, &mut bus);
    io.set_irq(20, true, 0, &mut bus);
    bus.take();
    io.mmio_write(IOEOI, &0xC4u32.to_le_bytes(), 0, &mut bus);
    assert_eq!(bus.take(), vec![fixed(0xC4, TriggerMode::Level, 0)]);
    assert_eq!(io.take_acked_pins(), 1 << 20);
}

#[test]
fn v11_has_no_eoi_register() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 20, 0xC4 | LEVEL, 0, &mut bus);
    io.set_irq(20, true, 0, &mut bus);
    bus.take();
    io.mmio_write(IOEOI, &0xC4u32.to_le_bytes(), 0, &mut bus);
    assert!(bus.take().is_empty());
    assert!(remote_irr(&mut io, 20));
    assert_eq!(io.take_acked_pins(), 0);
}

// --- Host-side interface ---------------------------------------------------

#[test]
fn take_acked_pins_reports_level_and_edge_pins_once() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 0, 0x20, 0, &mut bus); // edge (PIT)
    program(&mut io, 9, 0x20 | LEVEL | MASKED, 0, &mut bus);
    program(&mut io, 10, 0x21 | LEVEL, 0, &mut bus);
    io.eoi(0x20, 0, &mut bus);
    assert_eq!(io.take_acked_pins(), (1 << 0) | (1 << 9));
    assert_eq!(io.take_acked_pins(), 0);
}

#[test]
fn generation_bumps_on_every_rte_change() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    let g0 = io.generation();
    write_reg(&mut io, low_sel(1), 0x31, &mut bus);
    let g1 = io.generation();
    assert!(g1 > g0);
    write_reg(&mut io, high_sel(1), 0x0100_0000, &mut bus);
    let g2 = io.generation();
    assert!(g2 > g1);
    // Same value again: nothing to resync.
    write_reg(&mut io, high_sel(1), 0x0100_0000, &mut bus);
    assert_eq!(io.generation(), g2);
    // ID writes are not RTE changes.
    write_reg(&mut io, REG_ID, 0x0100_0000, &mut bus);
    assert_eq!(io.generation(), g2);
    let state = io.save();
    io.restore(&state).unwrap();
    assert!(io.generation() > g2);
}

#[test]
fn entry_message_matches_what_is_sent() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    // Lowest priority, logical, level, destination 0x0F.
    program(
        &mut io,
        13,
        0x4B | (1 << 8) | LOGICAL | LEVEL,
        0x0F,
        &mut bus,
    );
    let (msg, masked) = io.entry_message(13).unwrap();
    assert!(!masked);
    io.set_irq(13, true, 0, &mut bus);
    assert_eq!(bus.take(), vec![msg]);
    assert_eq!(msg.delivery_mode, DeliveryMode::LowestPriority);
    assert_eq!(msg.destination_mode, DestinationMode::Logical);
    assert_eq!(msg.trigger_mode, TriggerMode::Level);
    assert_eq!(msg.destination, 0x0F);
    assert_eq!(msg.shorthand, Shorthand::None);
    assert_eq!(msg.source, None);
}

// --- Snapshots -------------------------------------------------------------

fn busy_ioapic() -> Ioapic {
    let mut io = Ioapic::new(IoapicVersion::V20);
    let mut bus = RecordingBus::new();
    write_reg(&mut io, REG_ID, 0x0200_0000, &mut bus);
    program(&mut io, 1, 0x31, 1, &mut bus);
    program(&mut io, 2, 0x32 | LEVEL, 2, &mut bus);
    program(&mut io, 3, 0x33 | LEVEL | ACTIVE_LOW, 3, &mut bus);
    io.set_irq(2, true, 0, &mut bus);
    io.set_irq(3, true, 0, &mut bus);
    io.eoi(0x31, 0, &mut bus);
    io
}

#[test]
fn save_restore_round_trips_through_serde() {
    let io = busy_ioapic();
    let state = io.save();
    assert_eq!(state.irr, 1 << 2);
    assert_eq!(state.id, 2);
    assert_eq!(state.acked_pins, 1 << 1);
    let json = serde_json::to_string(&state).unwrap();
    let back: IoapicState = serde_json::from_str(&json).unwrap();
    let mut fresh = Ioapic::new(IoapicVersion::V20);
    fresh.restore(&back).unwrap();
    assert_eq!(fresh.save(), state);
    assert!(fresh.redirection(2).unwrap().remote_irr());
}

#[test]
fn restore_rejects_hostile_snapshots() {
    let good = busy_ioapic().save();
    let mut io = Ioapic::new(IoapicVersion::V20);
    let before = io.save();
    let mut cases: Vec<(IoapicState, &str)> = Vec::new();
    let mut s = good.clone();
    s.version = IoapicVersion::V11;
    cases.push((s, "version"));
    let mut s = good.clone();
    s.id = 0x10;
    cases.push((s, "id"));
    let mut s = good.clone();
    s.base_address = IOAPIC_BASE + 4;
    cases.push((s, "base"));
    let mut s = good.clone();
    s.redirection_table[5] |= 1 << 20;
    cases.push((s, "reserved"));
    let mut s = good.clone();
    s.redirection_table[1] |= u64::from(REMOTE_IRR);
    cases.push((s, "remote irr on edge"));
    let mut s = good.clone();
    s.redirection_table[2] |= u64::from(DELIVERY_STATUS);
    cases.push((s, "delivery status"));
    let mut s = good.clone();
    s.line_levels |= 1 << 24;
    cases.push((s, "line levels"));
    let mut s = good.clone();
    s.irr = 1 << 5;
    cases.push((s, "irr"));
    let mut s = good.clone();
    s.eoi_redeliveries[0] = STORM_THRESHOLD + 1;
    cases.push((s, "storm"));
    let mut s = good.clone();
    s.deferred_pins = 1;
    cases.push((s, "deferred without deadline"));
    let mut s = good.clone();
    s.deferred_deadline_ns = Some(5);
    cases.push((s, "deadline without pins"));
    for (state, what) in cases {
        assert!(io.restore(&state).is_err(), "{what}");
        assert_eq!(io.save(), before, "{what}: device changed");
    }
}

// --- Properties ------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Read { offset: u64, len: usize },
    SetIrq { pin: usize, level: bool },
    Eoi(u8),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let offset = prop_oneof![
        Just(IOREGSEL),
        Just(IOWIN),
        Just(IOEOI),
        any::<u64>(),
        0u64..0x100
    ];
    prop_oneof![
        (offset.clone(), prop::collection::vec(any::<u8>(), 0..10))
            .prop_map(|(offset, data)| Op::Write { offset, data }),
        (offset, 0usize..10).prop_map(|(offset, len)| Op::Read { offset, len }),
        (0usize..30, any::<bool>()).prop_map(|(pin, level)| Op::SetIrq { pin, level }),
        any::<u8>().prop_map(Op::Eoi),
        (0u64..50_000_000).prop_map(Op::Advance),
    ]
}

fn run(io: &mut Ioapic, ops: &[Op], bus: &mut RecordingBus) {
    let mut now = 0u64;
    for op in ops {
        match op {
            Op::Write { offset, data } => io.mmio_write(*offset, data, now, bus),
            Op::Read { offset, len } => {
                let mut data = vec![0; *len];
                io.mmio_read(*offset, &mut data);
            }
            Op::SetIrq { pin, level } => {
                io.set_irq(*pin, *level, now, bus);
            }
            Op::Eoi(vector) => io.eoi(*vector, now, bus),
            Op::Advance(dt) => {
                now = now.saturating_add(*dt);
                io.advance(now, bus);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn arbitrary_sequences_never_panic_and_snapshots_round_trip(
        version in prop_oneof![Just(IoapicVersion::V11), Just(IoapicVersion::V20)],
        ops in prop::collection::vec(op(), 0..80),
    ) {
        let mut io = Ioapic::new(version);
        let mut bus = RecordingBus::new();
        run(&mut io, &ops, &mut bus);
        let state = io.save();
        let json = serde_json::to_string(&state).unwrap();
        let back: IoapicState = serde_json::from_str(&json).unwrap();
        let mut other = Ioapic::new(version);
        prop_assert_eq!(other.restore(&back), Ok(()));
        prop_assert_eq!(other.save(), state);
        // Status bits a guest cannot set never appear.
        for pin in 0..IOAPIC_PINS {
            let rte = io.redirection(pin).unwrap();
            prop_assert!(!rte.delivery_status());
            prop_assert!(!rte.remote_irr() || rte.is_level());
            prop_assert_eq!(rte.reserved_bits(), 0);
        }
    }

    #[test]
    fn every_indirect_register_read_is_defined(sel in any::<u8>(), value in any::<u32>()) {
        let mut io = Ioapic::new(IoapicVersion::V20);
        let mut bus = RecordingBus::new();
        write_reg(&mut io, sel, value, &mut bus);
        let read = read_reg(&mut io, sel);
        let expected = match sel {
            0x00 => value & 0x0F00_0000,
            // Arbitration is read-only and mirrors the (untouched) ID.
            0x02 => 0,
            0x01 => 0x0017_0020,
            // An unmasked active-low level entry sees its (low) line as
            // asserted and delivers at once, setting remote IRR.
            0x10..=0x3F if sel % 2 == 0 => {
                let stored = value & 0x0001_AFFF;
                let asserted = stored & (LEVEL | MASKED | ACTIVE_LOW) == LEVEL | ACTIVE_LOW;
                stored | if asserted { REMOTE_IRR } else { 0 }
            }
            0x10..=0x3F => value & 0xFFFE_0000,
            _ => 0xFFFF_FFFF,
        };
        prop_assert_eq!(read, expected);
    }

    #[test]
    fn asserted_level_line_is_redelivered_after_every_eoi(
        pin in 0usize..IOAPIC_PINS,
        vector in 0x20u8..=0xFF,
        active_low in any::<bool>(),
        noise in prop::collection::vec(op(), 0..20),
        eois in 1usize..40,
    ) {
        let mut io = Ioapic::new(IoapicVersion::V11);
        let mut bus = RecordingBus::new();
        // Arbitrary guest activity first, then the pin under test is set up.
        run(&mut io, &noise, &mut bus);
        let polarity = if active_low { ACTIVE_LOW } else { 0 };
        let pin8 = u8::try_from(pin).unwrap();
        program(&mut io, pin8, u32::from(vector) | LEVEL | polarity, 1, &mut bus);
        // Other pins sharing the vector must not disturb it: mask them.
        for other in 0..IOAPIC_PINS as u8 {
            if other != pin8 {
                write_reg(&mut io, low_sel(other), MASKED, &mut bus);
            }
        }
        bus.sent.clear();
        let status = io.set_irq(pin, !active_low, 0, &mut bus);
        let expected = fixed(vector, TriggerMode::Level, 1);
        // Either this raise delivered, or an earlier one (RTE write) did.
        prop_assert!(matches!(status, IrqStatus::Delivered(1) | IrqStatus::Coalesced));
        prop_assert!(io.redirection(pin).unwrap().remote_irr());
        let mut now = 0;
        for _ in 0..eois {
            bus.sent.clear();
            io.eoi(vector, now, &mut bus);
            if bus.sent.is_empty() {
                // Only the storm guard may hold it back, and only briefly.
                let deadline = io.next_deadline();
                prop_assert!(deadline.is_some());
                now = deadline.unwrap();
                io.advance(now, &mut bus);
            }
            prop_assert_eq!(&bus.sent, &vec![expected]);
            prop_assert!(io.redirection(pin).unwrap().remote_irr());
        }
    }
}

#[test]
fn edge_pins_with_vector_names_only_edge_entries_carrying_it() {
    let mut io = Ioapic::new(IoapicVersion::V11);
    let mut bus = RecordingBus::new();
    program(&mut io, 3, 0x31, 0, &mut bus);
    program(&mut io, 7, 0x31, 0, &mut bus);
    program(&mut io, 9, 0x8031, 0, &mut bus); // level: its EOI comes by broadcast
    program(&mut io, 11, 0x32, 0, &mut bus);
    assert_eq!(io.edge_pins_with_vector(0x31), (1 << 3) | (1 << 7));
    assert_eq!(io.edge_pins_with_vector(0x32), 1 << 11);
    assert_eq!(io.edge_pins_with_vector(0x99), 0);
}
