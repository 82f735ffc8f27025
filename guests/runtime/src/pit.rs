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

/// Control-word access mode: latch command (no access).
pub const ACCESS_LATCH: u8 = 0;
/// Control-word access mode: least significant byte only.
pub const ACCESS_LSB: u8 = 1;
/// Control-word access mode: most significant byte only.
pub const ACCESS_MSB: u8 = 2;
/// Control-word access mode: LSB then MSB.
pub const ACCESS_WORD: u8 = 3;

/// Read-back status bit 7: the counter's OUT pin.
pub const STATUS_OUT: u8 = 1 << 7;
/// Read-back status bit 6: null count (a written count not yet loaded).
pub const STATUS_NULL_COUNT: u8 = 1 << 6;

/// Port 0x61 bit 0: counter 2's gate.
pub const PORT61_GATE2: u8 = 1 << 0;
/// Port 0x61 bit 1: speaker data.
pub const PORT61_SPEAKER: u8 = 1 << 1;
/// Port 0x61 bit 5: counter 2's OUT.
pub const PORT61_OUT2: u8 = 1 << 5;

/// The control word for `channel` (0-2), `access` (ACCESS_*), `mode` (0-5), binary.
pub const fn control_word(channel: u8, access: u8, mode: u8) -> u8 {
    ((channel & 3) << 6) | ((access & 3) << 4) | ((mode & 7) << 1)
}

/// Programs `channel` in `mode` (0-5) with LSB-then-MSB access and `reload`
/// (0 = 65536).
pub fn program(channel: u8, mode: u8, reload: u16) {
    let port = 0x40 + u16::from(channel & 3);
    outb(0x43, control_word(channel, ACCESS_WORD, mode));
    outb(port, reload as u8);
    outb(port, (reload >> 8) as u8);
}

/// Sends the counter latch command for `channel`.
pub fn latch(channel: u8) {
    outb(0x43, control_word(channel, ACCESS_LATCH, 0));
}

/// Reads a 16-bit count from `channel` (LSB then MSB access): the latched
/// value if one is held, the running count otherwise.
pub fn read_word(channel: u8) -> u16 {
    let port = 0x40 + u16::from(channel & 3);
    let lo = inb(port);
    let hi = inb(port);
    u16::from_le_bytes([lo, hi])
}

/// Latches and reads `channel`'s counter (LSB then MSB access).
pub fn latched_count(channel: u8) -> u16 {
    latch(channel);
    read_word(channel)
}

/// Sends a read-back command: `count` and `status` select what is latched,
/// `channels` is a bit mask of counters (bit n = counter n).
pub fn read_back(channels: u8, count: bool, status: bool) {
    let mut cmd = 0xC0 | ((channels & 7) << 1);
    if !count {
        cmd |= 1 << 5;
    }
    if !status {
        cmd |= 1 << 4;
    }
    outb(0x43, cmd);
}

/// Latches `channel`'s status with the read-back command and reads it.
pub fn status(channel: u8) -> u8 {
    read_back(1 << (channel & 3), false, true);
    inb(0x40 + u16::from(channel & 3))
}

/// Reads port 0x61 (system control port B).
pub fn port61() -> u8 {
    inb(0x61)
}

/// Sets counter 2's gate (port 0x61 bit 0) with the speaker data bit off.
pub fn set_gate2(high: bool) {
    let v = inb(0x61) & !(PORT61_GATE2 | PORT61_SPEAKER) & 0x0F;
    outb(0x61, v | u8::from(high));
}

/// Counter 2's OUT as port 0x61 bit 5 shows it.
pub fn out2() -> bool {
    inb(0x61) & PORT61_OUT2 != 0
}
