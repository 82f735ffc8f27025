//! Polled output on the COM1 16550 UART, with `print!`/`println!` macros.

use crate::arch::{inb, outb, pause};
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

/// COM1 base port.
pub const COM1: u16 = 0x3F8;
/// Interrupt enable register offset.
pub const IER: u16 = 1;
/// Interrupt identification register offset (read).
pub const IIR: u16 = 2;
/// Line status register offset.
pub const LSR: u16 = 5;
/// IER bit: transmitter holding register empty interrupt.
pub const IER_THRE: u8 = 0x02;
/// LSR bit: transmitter holding register empty.
pub const LSR_THRE: u8 = 0x20;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Programs 115200 8N1, FIFOs on, interrupts off, OUT2 set (it gates the
/// UART's IRQ line on PC hardware).
pub fn init() {
    outb(COM1 + IER, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xC7);
    outb(COM1 + 4, 0x0B);
}

/// Writes one byte once the transmitter can take it (bounded wait).
pub fn write_byte(byte: u8) {
    for _ in 0..100_000 {
        if inb(COM1 + LSR) & LSR_THRE != 0 {
            break;
        }
        pause();
    }
    outb(COM1, byte);
}

/// Writes raw bytes without taking the output lock (for fatal paths).
pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        write_byte(b);
    }
}

/// A `fmt::Write` sink on COM1.
pub struct Writer;

impl fmt::Write for Writer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints under a lock so lines from different CPUs do not interleave.
/// Interrupt handlers must not print (they could interrupt the lock holder).
pub fn print_locked(args: fmt::Arguments) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        pause();
    }
    let _ = fmt::write(&mut Writer, args);
    LOCK.store(false, Ordering::Release);
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::print_locked(format_args!($($arg)*)) };
}

/// Prints a line to COM1.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::print_locked(format_args!("{}\n", format_args!($($arg)*))) };
}
