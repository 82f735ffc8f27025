//! TSC and LAPIC timer rates calibrated against the PIT, delays and bounded
//! waits.

use crate::arch::{cli, pause, rdtsc, sti, sti_hlt};
use crate::{lapic, pit};
use core::sync::atomic::{AtomicU64, Ordering};

/// LAPIC timer vector used to bound HLT waits (never counted as a result).
pub const WATCHDOG_VECTOR: u8 = 0xE0;

static TSC_PER_MS: AtomicU64 = AtomicU64::new(2_000_000);
static LAPIC_TICKS_PER_MS: AtomicU64 = AtomicU64::new(62_500);

/// What calibration measured.
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    /// TSC ticks per millisecond.
    pub tsc_per_ms: u64,
    /// LAPIC timer ticks per millisecond at divide-by-16.
    pub lapic_ticks_per_ms: u64,
    /// Whether the PIT counter was seen to move (otherwise defaults are used).
    pub ok: bool,
}

/// Measures the TSC and the LAPIC timer (divide by 16) over 10 ms of PIT
/// channel 0 counting (mode 2, full range, no interrupt routed).
pub fn calibrate() -> Calibration {
    const TARGET: u64 = pit::FREQ_HZ / 100; // 10 ms
    pit::set_rate(0);
    lapic::write(lapic::reg::TIMER_DIVIDE, lapic::TIMER_DIVIDE_16);
    lapic::write(lapic::reg::LVT_TIMER, lapic::LVT_MASKED);
    lapic::write(lapic::reg::TIMER_INITIAL, u32::MAX);
    let mut last = pit::read_counter();
    let tsc0 = rdtsc();
    let apic0 = lapic::read(lapic::reg::TIMER_CURRENT);
    let mut elapsed: u64 = 0;
    let mut polls = 0u32;
    while elapsed < TARGET && polls < 200_000 {
        let now = pit::read_counter();
        elapsed += u64::from(last.wrapping_sub(now));
        last = now;
        polls += 1;
    }
    let tsc1 = rdtsc();
    let apic1 = lapic::read(lapic::reg::TIMER_CURRENT);
    lapic::timer_stop();
    pit::stop();
    let ok = elapsed >= TARGET;
    if ok {
        let ms_x100 = elapsed * 100_000 / pit::FREQ_HZ; // elapsed in 1/100 ms
        let ms_x100 = ms_x100.max(1);
        let tsc = (tsc1 - tsc0) * 100 / ms_x100;
        let apic = u64::from(apic0.wrapping_sub(apic1)) * 100 / ms_x100;
        if tsc > 0 {
            TSC_PER_MS.store(tsc, Ordering::Relaxed);
        }
        if apic > 0 {
            LAPIC_TICKS_PER_MS.store(apic, Ordering::Relaxed);
        }
    }
    Calibration {
        tsc_per_ms: TSC_PER_MS.load(Ordering::Relaxed),
        lapic_ticks_per_ms: LAPIC_TICKS_PER_MS.load(Ordering::Relaxed),
        ok,
    }
}

/// TSC ticks per millisecond.
pub fn tsc_per_ms() -> u64 {
    TSC_PER_MS.load(Ordering::Relaxed)
}

/// LAPIC timer ticks (divide by 16) for `us` microseconds, at least 1.
pub fn lapic_ticks(us: u64) -> u32 {
    let t = LAPIC_TICKS_PER_MS.load(Ordering::Relaxed) * us / 1000;
    t.clamp(1, u64::from(u32::MAX)) as u32
}

/// Microseconds since an unspecified origin.
pub fn now_us() -> u64 {
    (u128::from(rdtsc()) * 1000 / u128::from(tsc_per_ms().max(1))) as u64
}

/// A TSC deadline.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(u64);

impl Deadline {
    /// `us` microseconds from now.
    pub fn after_us(us: u64) -> Self {
        Deadline(rdtsc() + us * tsc_per_ms() / 1000)
    }
    /// Whether the deadline has passed.
    pub fn expired(self) -> bool {
        rdtsc() >= self.0
    }
    /// Microseconds left (0 once expired).
    pub fn remaining_us(self) -> u64 {
        self.0.saturating_sub(rdtsc()) * 1000 / tsc_per_ms().max(1)
    }
}

/// Busy-waits `us` microseconds (keep it short: ring 0 may be emulated).
pub fn delay_us(us: u64) {
    let d = Deadline::after_us(us);
    while !d.expired() {
        pause();
    }
}

/// Waits with interrupts enabled, halting between checks, until `cond` holds
/// or `timeout_us` passes; returns whether `cond` held. The LAPIC timer is
/// armed as a watchdog so the HLT always ends; do not use this while a test
/// owns the LAPIC timer (use `poll_until`). Leaves interrupts disabled.
pub fn wait_until(timeout_us: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Deadline::after_us(timeout_us);
    loop {
        cli();
        if cond() {
            lapic::timer_stop();
            return true;
        }
        if deadline.expired() {
            lapic::timer_stop();
            return false;
        }
        let slice = deadline.remaining_us().clamp(50, 20_000);
        lapic::timer_oneshot(WATCHDOG_VECTOR, lapic_ticks(slice));
        sti_hlt();
    }
}

/// Like `wait_until` but polls without HLT (for tests that own the LAPIC
/// timer). Each round reads the LAPIC timer count, which exits to the
/// hypervisor and so gives it a chance to inject. Leaves interrupts disabled.
pub fn poll_until(timeout_us: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Deadline::after_us(timeout_us);
    loop {
        cli();
        if cond() {
            return true;
        }
        if deadline.expired() {
            return false;
        }
        sti();
        let _ = lapic::read(lapic::reg::TIMER_CURRENT);
        pause();
    }
}
