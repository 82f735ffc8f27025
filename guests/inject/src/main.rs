//! The injection guest: how the CPU takes interrupts. An interrupt made
//! pending while IF=0 waits for IF=1; STI delays it by one instruction (the
//! STI shadow) without losing it; `sti; hlt` with an interrupt pending does
//! not hang; HLT returns when a LAPIC timer or a PIT interrupt arrives.
//!
//! Pending interrupts are self IPIs (ICR self shorthand); each check has its
//! own vector, and the runtime's per-vector counters tell what was taken.
//! HLT waits are bounded by a second, independent timer (the LAPIC timer
//! bounds the PIT wait and the PIT the LAPIC timer's).
#![no_std]
#![no_main]

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use guest_runtime::arch::{cli, rdtsc};
use guest_runtime::cpu::{self, InterruptFrame};
use guest_runtime::ioapic::Redirection;
use guest_runtime::lapic::{self, reg, Icr};
use guest_runtime::serial::Line;
use guest_runtime::time::{self, delay_us, wait_until, Deadline};
use guest_runtime::{entry, pic, pit, report, Boot};

const V_IF0: u8 = 0x60;
const V_SHADOW: u8 = 0x61;
const V_STI_HLT: u8 = 0x62;
const V_LAPIC_WAKE: u8 = 0x63;
const V_PIT_WAKE: u8 = 0x64;
const V_WATCHDOG: u8 = 0x65;

/// LAPIC LVT LINT0 register and its ExtINT delivery mode.
const LVT_LINT0: u32 = 0x350;
const LVT_EXTINT: u32 = 7 << 8;

/// Bound for any wait that should succeed.
const TIMEOUT_US: u64 = 100_000;
/// How long an interrupt is held pending with IF=0.
const HOLD_US: u64 = 2_000;
/// The waking timers' delay, and the bound the other timer puts on HLT.
const WAKE_US: u64 = 2_000;
const WATCHDOG_US: u64 = 50_000;

/// Incremented by the instruction right after STI.
static MARKER: AtomicU64 = AtomicU64::new(0);
/// MARKER + 1 as the shadow check's handler saw it (0: not run).
static SEEN: AtomicU64 = AtomicU64::new(0);

fn shadow_handler(_: &mut InterruptFrame) {
    SEEN.store(MARKER.load(Ordering::Acquire) + 1, Ordering::Release);
}

fn count(vector: u8) -> u64 {
    cpu::count(0, vector).into()
}

fn pending(vector: u8) -> bool {
    lapic::vector_bit(reg::IRR, vector)
}

fn self_ipi(vector: u8) {
    lapic::send_ipi(lapic::id(), Icr::fixed(vector).to_self());
}

/// Waits with IF=0 (polling) until `vector` is in IRR; returns whether it is.
fn wait_pending(vector: u8) -> bool {
    let d = Deadline::after_us(TIMEOUT_US);
    while !pending(vector) {
        if d.expired() {
            return false;
        }
    }
    true
}

fn main(boot: &'static Boot) -> ! {
    Line::new()
        .s("# inject guest: tables=")
        .s(boot.platform.source)
        .s(" tsc/ms=")
        .u(boot.calibration.tsc_per_ms)
        .print();
    if0_holds_pending();
    sti_shadow();
    sti_hlt_pending();
    hlt_wakes_lapic_timer(boot);
    hlt_wakes_pit(boot);
    hlt_wakes_pit_extint();
    report::finish()
}

entry!(main);

/// A self IPI sent with IF=0 stays pending (IRR set, not taken) for 2 ms
/// of IF=0, and is taken exactly once when IF=1.
fn if0_holds_pending() {
    cli();
    self_ipi(V_IF0);
    let was_pending = wait_pending(V_IF0);
    delay_us(HOLD_US);
    let taken_while_if0 = count(V_IF0);
    let still_pending = pending(V_IF0);
    report::check_list(
        "if0-holds-pending",
        &[1, 0, 1],
        &[was_pending.into(), taken_while_if0, still_pending.into()],
    );
    wait_until(TIMEOUT_US, || count(V_IF0) >= 1);
    delay_us(HOLD_US);
    report::check_list(
        "if0-delivered-on-sti",
        &[1, 0],
        &[count(V_IF0), pending(V_IF0).into()],
    );
}

/// With a self IPI pending and IF=0, `sti` then one instruction that
/// increments MARKER: the handler runs after that instruction (it sees
/// MARKER 1) and exactly once. Should the host deliver the interrupt later
/// than the instruction boundary, it is taken at the next STI with MARKER
/// still 1; only a delivery before the increment (inside the shadow) or a
/// lost interrupt fails.
fn sti_shadow() {
    cpu::set_handler(V_SHADOW, shadow_handler);
    cli();
    MARKER.store(0, Ordering::Release);
    SEEN.store(0, Ordering::Release);
    self_ipi(V_SHADOW);
    let was_pending = wait_pending(V_SHADOW);
    // SAFETY: increments a static and toggles IF; the handler only reads.
    unsafe {
        asm!(
            "sti",
            "inc qword ptr [{m}]",
            "nop",
            "nop",
            "cli",
            m = in(reg) MARKER.as_ptr(),
            options(nostack),
        )
    }
    wait_until(TIMEOUT_US, || count(V_SHADOW) >= 1);
    delay_us(HOLD_US);
    report::check_list(
        "sti-shadow",
        &[1, 1, 2],
        &[
            was_pending.into(),
            count(V_SHADOW),
            SEEN.load(Ordering::Acquire),
        ],
    );
}

/// `sti; hlt` with a self IPI pending: the interrupt is taken and HLT
/// returns, well before the 50 ms LAPIC timer that bounds the wait.
fn sti_hlt_pending() {
    cli();
    self_ipi(V_STI_HLT);
    let was_pending = wait_pending(V_STI_HLT);
    lapic::timer_oneshot(V_WATCHDOG, time::lapic_ticks(WATCHDOG_US));
    // SAFETY: halts with IF=1 until an interrupt; the watchdog bounds it.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) }
    lapic::timer_stop();
    let watchdog = count(V_WATCHDOG);
    report::check_list(
        "sti-hlt-pending",
        &[1, 1, 0],
        &[was_pending.into(), count(V_STI_HLT), watchdog],
    );
}

/// HLT once with IF=1 and returns: (interrupts of `vector`, of the
/// watchdog, whether HLT returned at least half of WAKE_US after `t0`, the
/// TSC when the waking timer was armed: an earlier return means a stale
/// request woke it, not the timer).
fn hlt_once(vector: u8, t0: u64) -> [u64; 3] {
    let w0 = count(V_WATCHDOG);
    // SAFETY: halts with IF=1 until an interrupt; a watchdog is armed.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) }
    let us = (rdtsc() - t0) * 1000 / time::tsc_per_ms().max(1);
    [
        count(vector),
        count(V_WATCHDOG) - w0,
        u64::from(us >= WAKE_US / 2),
    ]
}

/// The IOAPIC pin of ISA IRQ 0, as the firmware tables route it.
fn irq0_pin(boot: &Boot) -> (u32, Redirection) {
    let route = boot.platform.isa_route(0);
    let pin = route.gsi.wrapping_sub(boot.platform.ioapic_gsi_base);
    let rte = Redirection::fixed(0, boot.bsp_apic_id as u8)
        .level(route.level)
        .active_low(route.active_low);
    (pin, rte)
}

/// Programs counter 0 as a one-shot (mode 0) of `us` and routes IRQ 0 to
/// `vector` through the IOAPIC.
fn pit_oneshot(boot: &Boot, vector: u8, us: u64) {
    let (pin, rte) = irq0_pin(boot);
    boot.ioapic
        .set_redirection(pin, Redirection(rte.0 | u64::from(vector)));
    pit::program(0, 0, (us * pit::FREQ_HZ / 1_000_000).min(0xFFFF) as u16);
}

fn pit_off(boot: &Boot) {
    boot.ioapic.mask(irq0_pin(boot).0);
    pit::stop();
}

/// With IF=1, a LAPIC one-shot timer (2 ms) ends HLT; the PIT (50 ms)
/// bounds the wait.
fn hlt_wakes_lapic_timer(boot: &Boot) {
    cli();
    pit_oneshot(boot, V_WATCHDOG, WATCHDOG_US);
    let t0 = rdtsc();
    lapic::timer_oneshot(V_LAPIC_WAKE, time::lapic_ticks(WAKE_US));
    let got = hlt_once(V_LAPIC_WAKE, t0);
    lapic::timer_stop();
    pit_off(boot);
    report::check_list("hlt-wakes-lapic-timer", &[1, 0, 1], &got);
}

/// With IF=1, PIT IRQ 0 (a 2 ms mode 0 one-shot through the IOAPIC) ends
/// HLT; the LAPIC timer (50 ms) bounds the wait.
fn hlt_wakes_pit(boot: &Boot) {
    cli();
    lapic::timer_oneshot(V_WATCHDOG, time::lapic_ticks(WATCHDOG_US));
    let t0 = rdtsc();
    pit_oneshot(boot, V_PIT_WAKE, WAKE_US);
    let got = hlt_once(V_PIT_WAKE, t0);
    lapic::timer_stop();
    pit_off(boot);
    report::check_list("hlt-wakes-pit-irq0", &[1, 0, 1], &got);
}

/// With IF=1, PIT IRQ 0 (a 2 ms mode 0 one-shot) through the master PIC
/// and LINT0 in ExtINT mode ends HLT (vector 0x20); the LAPIC timer (50 ms)
/// bounds the wait.
fn hlt_wakes_pit_extint() {
    cli();
    let t0 = rdtsc();
    pit::program(0, 0, (WAKE_US * pit::FREQ_HZ / 1_000_000) as u16);
    // The PIC latched the earlier checks' IRQ 0 edges while masked;
    // reinitialising it drops those stale requests.
    pic::init();
    lapic::write(LVT_LINT0, LVT_EXTINT);
    lapic::timer_oneshot(V_WATCHDOG, time::lapic_ticks(WATCHDOG_US));
    pic::set_masked(0, false);
    let got = hlt_once(pic::MASTER_BASE, t0);
    lapic::timer_stop();
    pic::set_masked(0, true);
    pit::stop();
    lapic::write(LVT_LINT0, lapic::LVT_MASKED | LVT_EXTINT);
    report::check_list("hlt-wakes-pit-extint", &[1, 0, 1], &got);
}
