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

/// ELCR of the master (IRQ 0-7); the slave's is at the next port.
const ELCR_MASTER: u16 = 0x4D0;
const ELCR_SLAVE: u16 = 0x4D1;

/// ICW4 bit 0: 8086/88 mode.
pub const ICW4_8086: u8 = 0x01;
/// ICW4 bit 1: automatic EOI at the acknowledge.
pub const ICW4_AUTO_EOI: u8 = 0x02;
/// ICW4 bit 4: special fully nested mode.
pub const ICW4_SFNM: u8 = 0x10;

fn cmd_port(slave: bool) -> u16 {
    if slave {
        SLAVE_CMD
    } else {
        MASTER_CMD
    }
}

/// Runs the ICW1-ICW4 sequence on both chips (edge, cascade on IRQ 2) with
/// the given vector bases and ICW4 words, and leaves IMR as ICW1 left it
/// (the caller writes OCW1 afterwards).
pub fn init_with(master_base: u8, slave_base: u8, master_icw4: u8, slave_icw4: u8) {
    outb(MASTER_CMD, 0x11);
    outb(MASTER_DATA, master_base);
    outb(MASTER_DATA, 1 << 2);
    outb(MASTER_DATA, master_icw4);
    outb(SLAVE_CMD, 0x11);
    outb(SLAVE_DATA, slave_base);
    outb(SLAVE_DATA, 2);
    outb(SLAVE_DATA, slave_icw4);
}

/// Both IMRs (bit n = IRQ n).
pub fn imr() -> u16 {
    u16::from(inb(MASTER_DATA)) | u16::from(inb(SLAVE_DATA)) << 8
}

/// Writes both IMRs (OCW1; bit n = IRQ n).
pub fn set_imr(mask: u16) {
    outb(MASTER_DATA, mask as u8);
    outb(SLAVE_DATA, (mask >> 8) as u8);
}

/// Both IRRs through OCW3 (bit n = IRQ n).
pub fn irr() -> u16 {
    outb(MASTER_CMD, 0x0A);
    outb(SLAVE_CMD, 0x0A);
    u16::from(inb(MASTER_CMD)) | u16::from(inb(SLAVE_CMD)) << 8
}

/// Both ISRs through OCW3 (bit n = IRQ n); IRR reads are selected again after.
pub fn isr() -> u16 {
    u16::from(in_service(MASTER_CMD)) | u16::from(in_service(SLAVE_CMD)) << 8
}

/// Sends an OCW2 command byte to the master (`slave` false) or the slave.
pub fn ocw2(slave: bool, command: u8) {
    outb(cmd_port(slave), command & 0xE7);
}

/// OCW2: non-specific EOI on one chip.
pub fn nonspecific_eoi(slave: bool) {
    ocw2(slave, 0x20);
}

/// OCW2: specific EOI of level `level` (0-7) on one chip.
pub fn specific_eoi(slave: bool, level: u8) {
    ocw2(slave, 0x60 | (level & 7));
}

/// OCW2: rotate on non-specific EOI on one chip.
pub fn rotate_nonspecific_eoi(slave: bool) {
    ocw2(slave, 0xA0);
}

/// OCW2: set priority, making `level` (0-7) the lowest on one chip.
pub fn set_lowest_priority(slave: bool, level: u8) {
    ocw2(slave, 0xC0 | (level & 7));
}

/// OCW3: sets or clears special mask mode on one chip.
pub fn set_special_mask(slave: bool, on: bool) {
    outb(cmd_port(slave), if on { 0x68 } else { 0x48 });
}

/// OCW3 poll command, then the poll read on the same chip (an acknowledge).
pub fn poll(slave: bool) -> u8 {
    let port = cmd_port(slave);
    outb(port, 0x0C);
    inb(port)
}

/// Both ELCRs (bit n = IRQ n is level-triggered).
pub fn elcr() -> u16 {
    u16::from(inb(ELCR_MASTER)) | u16::from(inb(ELCR_SLAVE)) << 8
}

/// Writes both ELCRs (bit n = IRQ n is level-triggered).
pub fn set_elcr(value: u16) {
    outb(ELCR_MASTER, value as u8);
    outb(ELCR_SLAVE, (value >> 8) as u8);
}
