//! The 8259A PIC pair: remapping, masking and EOI.

use crate::arch::{inb, outb};

const MASTER_CMD: u16 = 0x20;
const MASTER_DATA: u16 = 0x21;
const SLAVE_CMD: u16 = 0xA0;
const SLAVE_DATA: u16 = 0xA1;

/// Vector of master IRQ 0 after `init`.
pub const MASTER_BASE: u8 = 0x20;
/// Vector of slave IRQ 8 after `init`.
pub const SLAVE_BASE: u8 = 0x28;

/// Reinitialises both PICs with vectors 0x20-0x2F, cascade on IRQ 2, and
/// every line masked (firmware may have left IRQ 0 unmasked on vector 8).
pub fn init() {
    outb(MASTER_DATA, 0xFF);
    outb(SLAVE_DATA, 0xFF);
    outb(MASTER_CMD, 0x11); // ICW1: edge, cascade, ICW4 needed
    outb(SLAVE_CMD, 0x11);
    outb(MASTER_DATA, MASTER_BASE); // ICW2
    outb(SLAVE_DATA, SLAVE_BASE);
    outb(MASTER_DATA, 1 << 2); // ICW3: slave on IRQ 2
    outb(SLAVE_DATA, 2);
    outb(MASTER_DATA, 0x01); // ICW4: 8086 mode
    outb(SLAVE_DATA, 0x01);
    outb(MASTER_DATA, 0xFF);
    outb(SLAVE_DATA, 0xFF);
}

/// Masks (true) or unmasks IRQ `irq` (0-15).
pub fn set_masked(irq: u8, masked: bool) {
    let port = if irq < 8 { MASTER_DATA } else { SLAVE_DATA };
    let bit = 1u8 << (irq & 7);
    let old = inb(port);
    outb(port, if masked { old | bit } else { old & !bit });
}

/// Sends a non-specific EOI for `irq`.
pub fn eoi(irq: u8) {
    if irq >= 8 {
        outb(SLAVE_CMD, 0x20);
    }
    outb(MASTER_CMD, 0x20);
}

fn in_service(cmd: u16) -> u8 {
    outb(cmd, 0x0B); // OCW3: read ISR
    let isr = inb(cmd);
    outb(cmd, 0x0A); // back to IRR reads
    isr
}

/// EOI for `irq` unless it was spurious (its in-service bit is clear).
pub fn eoi_if_in_service(irq: u8) {
    let irq = irq & 15;
    if irq < 8 {
        if in_service(MASTER_CMD) & (1 << irq) != 0 {
            outb(MASTER_CMD, 0x20);
        }
    } else if in_service(SLAVE_CMD) & (1 << (irq - 8)) != 0 {
        eoi(irq);
    } else {
        // Spurious slave IRQ: the master still saw its cascade line.
        outb(MASTER_CMD, 0x20);
    }
}
