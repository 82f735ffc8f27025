//! The benchmark guest: interrupt-delivery latencies measured with the TSC.
//!
//! Every figure is printed as one line the VMM's `virq bench` parses:
//!
//!     BENCH name=<figure> n=<samples> p50=<ticks> p99=<ticks> min=<ticks> tsc_per_ms=<ticks>
//!     BENCH name=<figure> skip=<reason>
//!
//! Figures (each sample starts at a TSC read just before the action):
//! - `exit-floor`: a byte write to port 0x80, which no device here handles
//!   (virq ignores it, QEMU's port-0x80 device does nothing): one exit to the
//!   VMM and back, the floor under every other figure;
//! - `self-ipi`: a fixed self IPI (ICR self shorthand) until its handler runs;
//! - `ipi`: a fixed IPI from the BSP to the AP until the AP's handler reads
//!   the TSC (the vCPUs share the host's TSC) and the BSP sees it;
//! - `msi-testdev`: one write to virq's MSI test device (port 0x240C) until
//!   the handler runs (skipped without the device, e.g. under QEMU);
//! - `device-msi`: a doorbell of virq's ring device (an ioeventfd), the
//!   device thread's answer and MSI, until the handler runs (skipped
//!   without the device);
//! - `device-roundtrip`: one request in flight, driven from the handler, as
//!   a driver does: the handler of request k's MSI posts request k+1 and
//!   rings the doorbell; a sample is the TSC at handler entry k+1 minus the
//!   TSC at handler entry k, i.e. guest handler, doorbell, device thread,
//!   completion, MSI and back into the handler (skipped without the ring
//!   device);
//! - `device-line`: one event of virq's pass-through line device (port
//!   0x2520, GSI 19, a level IOAPIC line with resample) until the handler
//!   runs; the handler services the device before its EOI (skipped without
//!   the device);
//! - `timer-late`: how late the ticks of a 1 kHz periodic LAPIC timer reach
//!   their handler (at most [`TIMER_TICKS`] ticks). The guest cannot see
//!   when a tick was due, so it measures the schedule: with t_i the TSC at
//!   handler entry i, the schedule is the line through the least late tick
//!   of each half of the run (its slope is the timer's period in TSC ticks,
//!   measured, so the calibration's error does not accumulate and no
//!   single late tick tilts it). Each tick belongs to the last due time at
//!   or before it (ticks are never early; a tick the VMM dropped is
//!   skipped, not blamed on the next; a tick owed from a stall shares its
//!   due time with the tick before), and its lateness is t_i minus that
//!   due time, 0 when the schedule's own error puts it below. A tick more
//!   than 3/4 of a period late counts as on time for the next due time.
//!   The first [`WARMUP_TICKS`] ticks are not measured.
//! - `pit-late`: the same for the PIT (channel 0, mode 2, 1 kHz), IRQ 0
//!   through the IOAPIC: a timer the VMM models itself in split mode
//!   (virq and QEMU alike), where `timer-late` is KVM's LAPIC timer.
//!
//! Rates are printed as
//!
//!     BENCH name=<figure> n=<interrupts> rate=<per second> tsc_per_ms=<ticks>
//!
//! - `irq-rate`: a self-IPI chain (each handler sends the next self IPI)
//!   for [`RATE_WINDOW_US`]; interrupts handled per second;
//! - `device-rate`: the same chain through the ring device (each handler
//!   posts the next request; skipped without the device).
//!
//! `only=<figure>` on the command line measures that figure alone (the VMM
//! uses it to count exits per interrupt); `only=none` measures nothing;
//! `samples=N` (1-1000, default 200) sets the samples per figure.
//! Ring-0 code may be emulated by the host, so the measured paths are kept to
//! a few instructions, and sample counts are small.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use guest_runtime::arch::{self, cli, inl, outb, outl, rdtsc, sti, sti_hlt};
use guest_runtime::cpu::{self, InterruptFrame};
use guest_runtime::ioapic::Redirection;
use guest_runtime::lapic::{self, Icr};
use guest_runtime::msi::{self, Address, Data};
use guest_runtime::ring::{self, Ring};
use guest_runtime::serial::Line;
use guest_runtime::time::{self, Deadline, WATCHDOG_VECTOR};
use guest_runtime::{entry, pit, smp, Boot};

/// Samples per figure, unless `samples=N` on the command line says otherwise.
const DEFAULT_SAMPLES: usize = 200;
/// Most samples per figure.
const MAX_SAMPLES: usize = 1000;

/// Samples per figure for this run.
static SAMPLES: AtomicU32 = AtomicU32::new(DEFAULT_SAMPLES as u32);

fn samples() -> usize {
    SAMPLES.load(Ordering::Relaxed) as usize
}
/// Longest wait for one sample.
const SAMPLE_TIMEOUT_US: u64 = 200_000;
/// Period of the watchdog that ends a HLT whose interrupt never comes.
const WATCHDOG_US: u64 = 20_000;

/// The port of the exit floor.
const FLOOR_PORT: u16 = 0x80;

const V_SELF: u8 = 0x50;
const V_IPI: u8 = 0x51;
const V_MSI: u8 = 0x52;
const V_RING: u8 = 0x53;
const V_TIMER: u8 = 0x54;
const V_CHAIN_IPI: u8 = 0x55;
const V_CHAIN_RING: u8 = 0x56;
const V_LINE: u8 = 0x57;
const V_PIT: u8 = 0x58;

/// Period of the `timer-late` timer.
const TIMER_PERIOD_US: u64 = 1000;
/// Ticks of `timer-late` and `pit-late` taken before the measured ones:
/// more than a reinjecting PIT needs to catch up after a lost first
/// acknowledgement (10 ms given up, then the owed ticks).
const WARMUP_TICKS: usize = 20;
/// The `pit-late` PIT's reload: 1193 of 1.193182 MHz, a 1 kHz rate.
const PIT_RELOAD: u16 = 1193;
/// Most ticks `timer-late` and `pit-late` take (each costs a period of run time).
const TIMER_TICKS: usize = 250;
/// How long a rate figure's chain runs.
const RATE_WINDOW_US: u64 = 25_000;

/// virq's pass-through line device (see crates/vmm/src/devices/passthrough.rs).
const LINE_PORT: u16 = 0x2520;
const LINE_SIGNATURE: u32 = 0x656E_696C;
const LINE_GSI: u32 = 19;

const RING_ENTRIES: u32 = 4;

/// The TSC the last handler read (0: not yet).
static HANDLED_AT: AtomicU64 = AtomicU64::new(0);
static AP_READY: AtomicBool = AtomicBool::new(false);

static RING: Ring<{ RING_ENTRIES as usize }> = Ring::new();

/// TSCs at handler entry of `timer-late` and the chains (entry i at i).
static STAMPS: [AtomicU64; MAX_SAMPLES + 1] = [const { AtomicU64::new(0) }; MAX_SAMPLES + 1];
/// Handler entries so far of the running timer or chain.
static TAKEN: AtomicU32 = AtomicU32::new(0);
/// The TSC of the last chain handler entry.
static CHAIN_LAST: AtomicU64 = AtomicU64::new(0);
/// Handler entries a chain takes at most.
static CHAIN_LIMIT: AtomicU32 = AtomicU32::new(0);
/// The TSC after which a chain handler asks for no next interrupt.
static CHAIN_END: AtomicU64 = AtomicU64::new(0);
/// A chain handler asked for no next interrupt.
static CHAIN_DONE: AtomicBool = AtomicBool::new(false);
/// The running chain goes through the ring device (else self IPIs).
static CHAIN_RING: AtomicBool = AtomicBool::new(false);
/// The ring index of the chain's first request.
static CHAIN_FIRST: AtomicU32 = AtomicU32::new(0);
/// This CPU's APIC ID, read once (a LAPIC read may exit).
static MY_APIC_ID: AtomicU32 = AtomicU32::new(0);

/// Every handler: the TSC first, nothing else on the measured path.
fn stamp(_: &mut InterruptFrame) {
    HANDLED_AT.store(rdtsc(), Ordering::Release);
}

/// The `timer-late` handler: the tick's TSC.
fn tick(_: &mut InterruptFrame) {
    let now = rdtsc();
    let i = TAKEN.load(Ordering::Relaxed);
    if let Some(s) = STAMPS.get(i as usize) {
        s.store(now, Ordering::Relaxed);
    }
    TAKEN.store(i.wrapping_add(1), Ordering::Release);
}

/// The device-line handler: the TSC, then the device is serviced (the read
/// takes its pending events) so the EOI's resample does not raise it again.
fn line_stamp(_: &mut InterruptFrame) {
    HANDLED_AT.store(rdtsc(), Ordering::Release);
    inl(LINE_PORT + 8);
}

/// A chain handler: the TSC, then the next interrupt is asked for until
/// the chain's limit or end.
fn chain(_: &mut InterruptFrame) {
    let now = rdtsc();
    let k = TAKEN.load(Ordering::Relaxed);
    if let Some(s) = STAMPS.get(k as usize) {
        s.store(now, Ordering::Relaxed);
    }
    CHAIN_LAST.store(now, Ordering::Relaxed);
    let next = k.wrapping_add(1);
    TAKEN.store(next, Ordering::Release);
    if next < CHAIN_LIMIT.load(Ordering::Relaxed) && now < CHAIN_END.load(Ordering::Relaxed) {
        chain_kick(next);
    } else {
        CHAIN_DONE.store(true, Ordering::Release);
    }
}

/// Asks for the chain's interrupt number `k`.
fn chain_kick(k: u32) {
    if CHAIN_RING.load(Ordering::Relaxed) {
        let index = CHAIN_FIRST.load(Ordering::Relaxed).wrapping_add(k);
        RING.requests[Ring::<{ RING_ENTRIES as usize }>::slot(index)]
            .store(index, Ordering::Relaxed);
        RING.post(index.wrapping_add(1));
    } else {
        let me = MY_APIC_ID.load(Ordering::Relaxed);
        lapic::send_ipi(me, Icr::fixed(V_CHAIN_IPI).to_self());
    }
}

/// Runs a chain of at most `limit` interrupts for at most `window_us`;
/// returns the handler entries, or `None` if the chain broke (an
/// interrupt never came).
fn run_chain(through_ring: bool, limit: u32, window_us: u64) -> Option<u32> {
    cli();
    TAKEN.store(0, Ordering::Relaxed);
    CHAIN_DONE.store(false, Ordering::Relaxed);
    CHAIN_RING.store(through_ring, Ordering::Relaxed);
    CHAIN_LIMIT.store(limit, Ordering::Relaxed);
    let window = window_us.saturating_mul(time::tsc_per_ms()) / 1000;
    CHAIN_END.store(rdtsc().saturating_add(window), Ordering::Release);
    let deadline = Deadline::after_us(window_us + SAMPLE_TIMEOUT_US);
    lapic::timer_periodic(WATCHDOG_VECTOR, time::lapic_ticks(WATCHDOG_US));
    sti();
    chain_kick(0);
    let done = loop {
        cli();
        if CHAIN_DONE.load(Ordering::Acquire) {
            break true;
        }
        if deadline.expired() {
            break false;
        }
        sti_hlt();
    };
    lapic::timer_stop();
    done.then(|| TAKEN.load(Ordering::Acquire))
}

/// Reports a chain's rate: handler entries after the first, per second of
/// TSC between the first and the last.
fn report_rate(name: &str, taken: u32) {
    let first = STAMPS[0].load(Ordering::Relaxed);
    let span = CHAIN_LAST.load(Ordering::Relaxed).saturating_sub(first);
    let n = u64::from(taken.saturating_sub(1));
    if n == 0 || span == 0 {
        skip(name, "no-sample-completed");
        return;
    }
    let rate = n.saturating_mul(time::tsc_per_ms()).saturating_mul(1000) / span;
    Line::new()
        .s("BENCH name=")
        .s(name)
        .s(" n=")
        .u(n)
        .s(" rate=")
        .u(rate)
        .s(" tsc_per_ms=")
        .u(time::tsc_per_ms())
        .print();
}

/// The figures' sample buffer.
struct Samples {
    v: [u64; MAX_SAMPLES],
    n: usize,
}

impl Samples {
    const fn new() -> Self {
        Samples {
            v: [0; MAX_SAMPLES],
            n: 0,
        }
    }

    fn push(&mut self, ticks: u64) {
        if self.n < MAX_SAMPLES {
            self.v[self.n] = ticks;
            self.n += 1;
        }
    }

    /// Shell sort (few instructions: ring 0 may be emulated).
    fn sort(&mut self) {
        let v = &mut self.v[..self.n];
        let mut gap = v.len() / 2;
        while gap > 0 {
            for i in gap..v.len() {
                let x = v[i];
                let mut j = i;
                while j >= gap && v[j - gap] > x {
                    v[j] = v[j - gap];
                    j -= gap;
                }
                v[j] = x;
            }
            gap /= 2;
        }
    }

    fn report(&mut self, name: &str) {
        if self.n == 0 {
            skip(name, "no-sample-completed");
            return;
        }
        self.sort();
        let p99 = ((self.n * 99) / 100).min(self.n - 1);
        Line::new()
            .s("BENCH name=")
            .s(name)
            .s(" n=")
            .u(self.n as u64)
            .s(" p50=")
            .u(self.v[self.n / 2])
            .s(" p99=")
            .u(self.v[p99])
            .s(" min=")
            .u(self.v[0])
            .s(" tsc_per_ms=")
            .u(time::tsc_per_ms())
            .print();
    }
}

fn skip(name: &str, reason: &str) {
    Line::new()
        .s("BENCH name=")
        .s(name)
        .s(" skip=")
        .s(reason)
        .print();
}

/// One interrupt sample on this CPU: interrupts on, the TSC, `action`, then
/// HLT until the handler has stamped (the figure's periodic watchdog ends
/// every HLT in time). Returns the ticks from start to handler entry.
fn interrupt_sample(mut action: impl FnMut()) -> Option<u64> {
    HANDLED_AT.store(0, Ordering::Release);
    let deadline = Deadline::after_us(SAMPLE_TIMEOUT_US);
    sti();
    let start = rdtsc();
    action();
    let end = loop {
        cli();
        let at = HANDLED_AT.load(Ordering::Acquire);
        if at != 0 {
            break Some(at);
        }
        if deadline.expired() {
            break None;
        }
        sti_hlt();
    };
    end.map(|at| at.saturating_sub(start))
}

/// Runs the run's number of interrupt samples and reports them; stops at the first
/// that times out. A slow periodic LAPIC timer is the watchdog for the whole
/// figure, so no sample pays for arming one.
fn interrupt_figure(name: &str, mut action: impl FnMut(usize)) {
    let mut s = Samples::new();
    lapic::timer_periodic(WATCHDOG_VECTOR, time::lapic_ticks(WATCHDOG_US));
    for i in 0..samples() {
        match interrupt_sample(|| action(i)) {
            Some(t) => s.push(t),
            None => {
                lapic::timer_stop();
                skip(name, "timeout");
                return;
            }
        }
    }
    lapic::timer_stop();
    s.report(name);
}

fn exit_floor() {
    let mut s = Samples::new();
    cli();
    for _ in 0..samples() {
        let start = rdtsc();
        outb(FLOOR_PORT, 0);
        s.push(rdtsc().saturating_sub(start));
    }
    s.report("exit-floor");
}

fn self_ipi() {
    let me = lapic::id();
    interrupt_figure("self-ipi", |_| {
        lapic::send_ipi(me, Icr::fixed(V_SELF).to_self())
    });
}

/// BSP to AP; the BSP polls the stamp with interrupts off.
fn ipi(ap: Option<usize>) {
    const NAME: &str = "ipi";
    let Some(ap) = ap else {
        skip(NAME, "one-cpu");
        return;
    };
    let dest = cpu::apic_id_of(ap);
    let mut s = Samples::new();
    cli();
    for _ in 0..samples() {
        HANDLED_AT.store(0, Ordering::Release);
        let deadline = Deadline::after_us(SAMPLE_TIMEOUT_US);
        let start = rdtsc();
        lapic::send_ipi(dest, Icr::fixed(V_IPI));
        let at = loop {
            let at = HANDLED_AT.load(Ordering::Acquire);
            if at != 0 || deadline.expired() {
                break at;
            }
            arch::pause();
        };
        if at == 0 {
            skip(NAME, "timeout");
            return;
        }
        s.push(at.saturating_sub(start));
    }
    s.report(NAME);
}

fn msi_testdev() {
    const NAME: &str = "msi-testdev";
    if !msi::testdev_present() {
        skip(NAME, "no-msi-test-device");
        return;
    }
    let port = msi::TESTDEV_PORT;
    outl(port, Address::physical(lapic::id() as u8).0 as u32);
    outl(port + 4, 0);
    outl(port + 8, Data::fixed(V_MSI).0);
    interrupt_figure(NAME, |_| outl(port + 12, 1));
}

fn device_msi() {
    const NAME: &str = "device-msi";
    if !arm_ring(NAME, V_RING) {
        return;
    }
    let first = RING.req_prod.load(Ordering::Relaxed);
    interrupt_figure(NAME, |i| {
        // One request outstanding at a time.
        let index = first.wrapping_add(i as u32);
        RING.requests[Ring::<{ RING_ENTRIES as usize }>::slot(index)]
            .store(index, Ordering::Relaxed);
        RING.post(index.wrapping_add(1));
    });
}

/// Arms the ring device with `vector`; false (and a skip line) without it.
fn arm_ring(name: &str, vector: u8) -> bool {
    if !ring::present() {
        skip(name, "no-ring-device");
        return false;
    }
    if RING.arm(lapic::id() as u8, vector) != 0 {
        skip(name, "ring-refused");
        return false;
    }
    true
}

fn device_roundtrip() {
    const NAME: &str = "device-roundtrip";
    if !arm_ring(NAME, V_CHAIN_RING) {
        return;
    }
    CHAIN_FIRST.store(RING.req_prod.load(Ordering::Relaxed), Ordering::Relaxed);
    let limit = samples() as u32 + 1;
    let window_us = SAMPLE_TIMEOUT_US.saturating_mul(u64::from(limit));
    let Some(taken) = run_chain(true, limit, window_us) else {
        skip(NAME, "timeout");
        return;
    };
    let mut s = Samples::new();
    for k in 1..(taken as usize).min(STAMPS.len()) {
        let gap = STAMPS[k]
            .load(Ordering::Relaxed)
            .saturating_sub(STAMPS[k - 1].load(Ordering::Relaxed));
        s.push(gap);
    }
    s.report(NAME);
}

fn device_rate() {
    const NAME: &str = "device-rate";
    if !arm_ring(NAME, V_CHAIN_RING) {
        return;
    }
    CHAIN_FIRST.store(RING.req_prod.load(Ordering::Relaxed), Ordering::Relaxed);
    match run_chain(true, u32::MAX, RATE_WINDOW_US) {
        Some(taken) => report_rate(NAME, taken),
        None => skip(NAME, "timeout"),
    }
}

fn irq_rate() {
    const NAME: &str = "irq-rate";
    MY_APIC_ID.store(lapic::id(), Ordering::Relaxed);
    match run_chain(false, u32::MAX, RATE_WINDOW_US) {
        Some(taken) => report_rate(NAME, taken),
        None => skip(NAME, "timeout"),
    }
}

fn device_line(boot: &Boot) {
    const NAME: &str = "device-line";
    if inl(LINE_PORT) != LINE_SIGNATURE {
        skip(NAME, "no-line-device");
        return;
    }
    let Some(pin) = LINE_GSI.checked_sub(boot.platform.ioapic_gsi_base) else {
        skip(NAME, "no-ioapic-pin");
        return;
    };
    let io = boot.ioapic;
    io.set_redirection(
        pin,
        Redirection::fixed(V_LINE, lapic::id() as u8).level(true),
    );
    // Events come at once, one per start.
    outl(LINE_PORT + 4, 0);
    interrupt_figure(NAME, |_| outl(LINE_PORT, 1));
    io.mask(pin);
}

fn timer_late() {
    let period = time::tsc_per_ms() * TIMER_PERIOD_US / 1000;
    report_lateness(
        "timer-late",
        period,
        || lapic::timer_periodic(V_TIMER, time::lapic_ticks(TIMER_PERIOD_US)),
        lapic::timer_stop,
    );
}

/// The PIT in mode 2 at [`PIT_RELOAD`], IRQ 0 through the IOAPIC: the
/// same lateness as `timer-late`, of a timer every VMM models itself in
/// split mode (QEMU included), so the VMMs' own timer paths compare.
fn pit_late(boot: &Boot) {
    const NAME: &str = "pit-late";
    let route = boot.platform.isa_route(0);
    let io = boot.ioapic;
    let pin = route.gsi.wrapping_sub(boot.platform.ioapic_gsi_base);
    if pin >= io.pins() {
        skip(NAME, "no-ioapic-pin");
        return;
    }
    let period = time::tsc_per_ms() * u64::from(PIT_RELOAD) * 1000 / pit::FREQ_HZ;
    let start = || {
        io.set_redirection(
            pin,
            Redirection::fixed(V_PIT, lapic::id() as u8)
                .level(route.level)
                .active_low(route.active_low),
        );
        pit::set_rate(PIT_RELOAD);
    };
    let stop = || {
        pit::stop();
        io.mask(pin);
    };
    report_lateness(NAME, period, start, stop);
}

/// Starts a periodic timer with `start` (handler [`tick`], a tick every
/// `period` TSC ticks), takes its ticks, stops it with `stop` and reports
/// how late they came (see the module docs for how the schedule is found).
fn report_lateness(name: &str, period: u64, start: impl FnOnce(), stop: impl FnOnce()) {
    let ticks = samples().min(TIMER_TICKS);
    cli();
    TAKEN.store(0, Ordering::Relaxed);
    start();
    let period_us = period * 1000 / time::tsc_per_ms().max(1);
    // The timer is its own watchdog: each tick ends the HLT.
    let take = |n: usize| {
        let deadline = Deadline::after_us(period_us * (n as u64 + 10) + SAMPLE_TIMEOUT_US);
        loop {
            cli();
            if TAKEN.load(Ordering::Acquire) as usize >= n {
                break true;
            }
            if deadline.expired() {
                break false;
            }
            sti_hlt();
        }
    };
    // Start-up is not the steady state: the first ticks are not measured.
    let warm = take(WARMUP_TICKS);
    TAKEN.store(0, Ordering::Relaxed);
    let done = warm && take(ticks);
    stop();
    if !done || period == 0 {
        skip(name, "timeout");
        return;
    }
    let first = STAMPS[0].load(Ordering::Relaxed);
    // Signed TSCs from the first tick: the model may put a tick early.
    let t = |i: usize| STAMPS[i].load(Ordering::Relaxed).wrapping_sub(first) as i64;
    let period = period as i64;
    // A tick is never early, so it belongs to the last due time at or before
    // it; a quarter period allows for the error of the period used.
    let number = |elapsed: i64, p: i64| (elapsed + p / 4).div_euclid(p.max(1));
    // Pass 1: tick numbers from the intervals, with the calibrated period
    // (at least one more each: only the schedule of pass 2 can tell a
    // tick owed from a stall).
    let mut k = [0i64; TIMER_TICKS];
    for i in 1..ticks {
        k[i] = k[i - 1] + number(t(i) - t(i - 1), period).max(1);
    }
    let last = ticks - 1;
    if k[last] == 0 {
        skip(name, "no-sample-completed");
        return;
    }
    // The timer's schedule: the line through the least late tick of each
    // half of the run, so neither a late first tick nor a late last one
    // tilts it.
    let rough = |i: usize| t(i) - k[i] * t(last) / k[last];
    let least_late = |from: usize, to: usize| (from..to).min_by_key(|&i| rough(i)).unwrap_or(from);
    let a = least_late(0, ticks / 2);
    let b = least_late(ticks / 2, ticks);
    let (span, periods) = (t(b) - t(a), k[b] - k[a]);
    if periods <= 0 || span <= 0 {
        skip(name, "no-sample-completed");
        return;
    }
    // Pass 2: each tick against that schedule. Two ticks may share a due
    // time: a tick owed from a stall, delivered late.
    let p = span / periods;
    let mut s = Samples::new();
    for i in 0..ticks {
        let due = number(t(i) - t(a), p) * span / periods;
        // Below the schedule only by its error: on time.
        s.push((t(i) - t(a) - due).max(0) as u64);
    }
    s.report(name);
}

/// The value of `key=` on the command line, if any.
fn option<'a>(boot: &'a Boot, key: &str) -> Option<&'a str> {
    boot.multiboot
        .cmdline()
        .split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// A decimal number, if `s` is one.
fn number(s: &str) -> Option<usize> {
    if s.is_empty() || s.len() > 6 {
        return None;
    }
    s.bytes().try_fold(0usize, |n, b| {
        b.is_ascii_digit().then(|| n * 10 + usize::from(b - b'0'))
    })
}

fn main(boot: &'static Boot) -> ! {
    for v in [V_SELF, V_IPI, V_MSI, V_RING] {
        cpu::set_handler(v, stamp);
    }
    cpu::set_handler(V_TIMER, tick);
    cpu::set_handler(V_PIT, tick);
    cpu::set_handler(V_CHAIN_IPI, chain);
    cpu::set_handler(V_CHAIN_RING, chain);
    cpu::set_handler(V_LINE, line_stamp);
    if let Some(n) = option(boot, "samples").and_then(number) {
        SAMPLES.store(n.clamp(1, MAX_SAMPLES) as u32, Ordering::Relaxed);
    }
    // KVM's paravirtual EOI on every CPU, if asked for and offered.
    let pv_eoi = boot.multiboot.has_option("pv-eoi") && lapic::enable_pv_eoi();
    PV_EOI.store(pv_eoi, Ordering::Release);
    let ap = start_ap(boot);
    Line::new()
        .s("# bench guest: pv-eoi=")
        .b(pv_eoi)
        .s(" x2apic=")
        .b(lapic::is_x2apic())
        .s(" cpus=")
        .u(boot.platform.cpu_count as u64)
        .s(" samples=")
        .u(samples() as u64)
        .s(" tsc_per_ms=")
        .u(time::tsc_per_ms())
        .print();
    let only = option(boot, "only");
    let wanted = |name: &str| only.is_none_or(|o| o == name);
    if wanted("exit-floor") {
        exit_floor();
    }
    if wanted("self-ipi") {
        self_ipi();
    }
    if wanted("ipi") {
        ipi(ap);
    }
    if wanted("msi-testdev") {
        msi_testdev();
    }
    if wanted("device-msi") {
        device_msi();
    }
    if wanted("device-roundtrip") {
        device_roundtrip();
    }
    if wanted("device-line") {
        device_line(boot);
    }
    if wanted("timer-late") {
        timer_late();
    }
    if wanted("pit-late") {
        pit_late(boot);
    }
    if wanted("irq-rate") {
        irq_rate();
    }
    if wanted("device-rate") {
        device_rate();
    }
    Line::new().s("BENCH-END").print();
    guest_runtime::exit(0)
}

entry!(main);

/// The BSP turned the paravirtual EOI on; the AP follows.
static PV_EOI: AtomicBool = AtomicBool::new(false);

fn start_ap(boot: &Boot) -> Option<usize> {
    let p = &boot.platform;
    if p.cpu_count < 2 {
        return None;
    }
    smp::start_aps(&p.apic_ids[..p.cpu_count], ap_main);
    let deadline = Deadline::after_us(1_000_000);
    while !AP_READY.load(Ordering::Acquire) && !deadline.expired() {
        time::delay_us(100);
    }
    if smp::is_online(1) && AP_READY.load(Ordering::Acquire) {
        Some(1)
    } else {
        None
    }
}

/// The AP only takes interrupts.
fn ap_main(_index: usize) -> ! {
    if PV_EOI.load(Ordering::Acquire) {
        lapic::enable_pv_eoi();
    }
    AP_READY.store(true, Ordering::Release);
    loop {
        sti_hlt();
    }
}
