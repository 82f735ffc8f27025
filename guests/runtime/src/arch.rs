//! Thin wrappers over the x86 instructions the guests need. The guest owns
//! the whole machine, so port I/O and MSR access are plain functions.

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a word to an I/O port.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for outb.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a dword to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for outb.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for outb.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads a dword from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for outb.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller names an MSR that exists on every target CPU.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller names an MSR that exists on every target CPU.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads a counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Executes CPUID for `leaf` (subleaf 0) and returns (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Reads CR3 (the page-table root).
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Reads CR8 (the task-priority class, TPR[7:4]).
pub fn read_cr8() -> u64 {
    let v: u64;
    // SAFETY: reading CR8 has no side effects.
    unsafe { asm!("mov {}, cr8", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Writes CR8 (sets TPR[7:4]; TPR[3:0] becomes 0).
pub fn write_cr8(value: u64) {
    // SAFETY: only changes which interrupts are deliverable.
    unsafe { asm!("mov cr8, {}", in(reg) value, options(nostack, preserves_flags)) }
}

/// Disables maskable interrupts.
pub fn cli() {
    // SAFETY: only changes IF; acts as a compiler barrier.
    unsafe { asm!("cli", options(nostack)) }
}

/// Enables maskable interrupts.
pub fn sti() {
    // SAFETY: only changes IF; acts as a compiler barrier.
    unsafe { asm!("sti", options(nostack)) }
}

/// Enables interrupts and halts until the next one; the STI shadow makes an
/// interrupt that is already pending wake the HLT instead of being missed.
pub fn sti_hlt() {
    // SAFETY: as for sti.
    unsafe { asm!("sti", "hlt", options(nostack)) }
}

/// Spin-loop hint.
pub fn pause() {
    core::hint::spin_loop();
}

/// Reads a u32 from a physical (identity-mapped) MMIO address.
pub fn mmio_read32(addr: usize) -> u32 {
    // SAFETY: the first 4 GiB are identity mapped; callers pass device or
    // firmware addresses.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a u32 to a physical (identity-mapped) MMIO address.
pub fn mmio_write32(addr: usize, value: u32) {
    // SAFETY: as for mmio_read32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Reads `N` bytes of physical memory (for firmware tables).
pub fn phys_read<const N: usize>(addr: usize) -> [u8; N] {
    // SAFETY: as for mmio_read32; an unaligned byte copy.
    unsafe { core::ptr::read_unaligned(addr as *const [u8; N]) }
}

/// Reads a byte of physical memory.
pub fn phys_u8(addr: usize) -> u8 {
    phys_read::<1>(addr)[0]
}

/// Reads a little-endian u16 of physical memory.
pub fn phys_u16(addr: usize) -> u16 {
    u16::from_le_bytes(phys_read(addr))
}

/// Reads a little-endian u32 of physical memory.
pub fn phys_u32(addr: usize) -> u32 {
    u32::from_le_bytes(phys_read(addr))
}

/// Reads a little-endian u64 of physical memory.
pub fn phys_u64(addr: usize) -> u64 {
    u64::from_le_bytes(phys_read(addr))
}
