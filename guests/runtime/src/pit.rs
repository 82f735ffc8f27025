//! The 8254 PIT, channel 0.

use crate::arch::{inb, outb};

/// Input clock in Hz.
pub const FREQ_HZ: u64 = 1_193_182;

/// Programs channel 0 in mode 2 (rate generator) with `reload` (0 = 65536).
pub fn set_rate(reload: u16) {
    outb(0x43, 0x34); // channel 0, lobyte/hibyte, mode 2, binary
    outb(0x40, reload as u8);
    outb(0x40, (reload >> 8) as u8);
}

/// Programs channel 0 in mode 0 with a long count, so it stops raising IRQ 0.
pub fn stop() {
    outb(0x43, 0x30);
    outb(0x40, 0xFF);
    outb(0x40, 0xFF);
}

/// Latches and reads channel 0's counter.
pub fn read_counter() -> u16 {
    outb(0x43, 0x00);
    let lo = inb(0x40);
    let hi = inb(0x40);
    u16::from_le_bytes([lo, hi])
}
