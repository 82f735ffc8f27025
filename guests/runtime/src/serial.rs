//! Polled output on the COM1 16550 UART and a `core::fmt`-free line builder.

use crate::arch::{inb, outb, pause};
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

/// One output line, built without `core::fmt`: the precompiled `core`
/// formats integers with SSE instructions that an instruction emulator may
/// not implement (see README.md), so guests format with this instead.
pub struct Line {
    buf: [u8; 240],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    /// An empty line.
    pub const fn new() -> Self {
        Line {
            buf: [0; 240],
            len: 0,
        }
    }

    fn push(&mut self, b: u8) {
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    /// Appends a string.
    pub fn s(&mut self, s: &str) -> &mut Self {
        for &b in s.as_bytes() {
            self.push(b);
        }
        self
    }

    /// Appends an unsigned integer in decimal.
    pub fn u(&mut self, v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut n = 0;
        let mut v = v;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.push(digits[n]);
        }
        self
    }

    /// Appends an unsigned integer as `0x` and lower-case hex digits.
    pub fn x(&mut self, v: u64) -> &mut Self {
        self.s("0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let d = ((v >> (shift * 4)) & 0xF) as u8;
            if d != 0 || started || shift == 0 {
                started = true;
                self.push(if d < 10 { b'0' + d } else { b'a' + d - 10 });
            }
        }
        self
    }

    /// Appends `true` or `false`.
    pub fn b(&mut self, v: bool) -> &mut Self {
        self.s(if v { "true" } else { "false" })
    }

    /// Prints the line and a newline under the output lock (so lines from
    /// different CPUs do not interleave). Interrupt handlers must not print.
    pub fn print(&mut self) {
        self.push(b'\n');
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            pause();
        }
        write_bytes(&self.buf[..self.len]);
        LOCK.store(false, Ordering::Release);
    }

    /// Prints the line and a newline without the lock (fatal paths).
    pub fn print_unlocked(&mut self) {
        self.push(b'\n');
        write_bytes(&self.buf[..self.len]);
    }
}

/// Prints a string followed by a newline.
pub fn println(s: &str) {
    Line::new().s(s).print();
}
