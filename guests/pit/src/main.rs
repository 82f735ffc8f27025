//! The PIT guest: the 8254 as a guest sees it. Counting in modes 0, 2 and
//! 3, the counter latch and read-back commands, counter 2's gate and OUT on
//! port 0x61, and counter 0's IRQ 0 through the PIC (LINT0 in ExtINT mode)
//! and through the IOAPIC pin the firmware tables name.
//!
//! Periods are measured against the TSC (calibrated by the runtime against
//! the PIT over 10 ms at boot). Unless a check says otherwise, IRQ 0 stays
//! masked at the PIC and at the IOAPIC, so counter 0 can be programmed
//! freely.
#![no_std]
#![no_main]

use guest_runtime::arch::rdtsc;
use guest_runtime::ioapic::Redirection;
use guest_runtime::pit::{self, STATUS_NULL_COUNT, STATUS_OUT};
use guest_runtime::serial::Line;
use guest_runtime::time::{self, delay_us, wait_until, Deadline};
use guest_runtime::{cpu, entry, lapic, pic, report, Boot};

/// Bound for any wait that should succeed.
const TIMEOUT_US: u64 = 100_000;
/// Reload of the period checks: 32768 ticks = 27.46 ms, long enough that
/// the counter is polled many times a period even where ring 0 is emulated.
const PERIOD_RELOAD: u16 = 32_768;
/// Periods timed in the period checks (between the first and the last edge).
const PERIODS: usize = 2;
/// Sampling attempts: one whose polls were ever further apart than
/// 1/MAX_GAP_DIVISOR of a period (the host descheduled the vCPU) may have
/// seen an edge late and is taken again.
const ATTEMPTS: usize = 5;
/// A valid sample's polls are at most period / 20 (1.4 ms) apart, so each
/// of the two edge times is at most that late: 2 x 5 % of one period,
/// within PERIOD_TOLERANCE_PCT of the two periods timed.
const MAX_GAP_DIVISOR: u64 = 20;
const CALIBRATION_OFF: &str = "the TSC rate measured at boot disagrees with a re-measurement even after recalibrating: the host is too busy to time the PIT";
const HOST_BUSY: &str = "the vCPU was descheduled for over 1/20 of a period in every attempt: the host is too busy to time the PIT";
/// Allowed error of a measured period, in percent (see `period_ok`).
const PERIOD_TOLERANCE_PCT: u64 = 10;
/// IRQ 0 rate of the irq0 checks: reload 1193 = 1000.15 Hz.
const IRQ_RELOAD: u16 = 1193;
/// Window over which IRQ 0 is counted.
const IRQ_WINDOW_US: u64 = 40_000;
/// Allowed error of the IRQ 0 count, in percent (see `irq0_count_ok`).
const IRQ_TOLERANCE_PCT: u64 = 15;
/// Vector of IRQ 0 through the IOAPIC (through the PIC it is 0x20).
const V_IRQ0_IOAPIC: u8 = 0x50;
/// LAPIC LVT LINT0 register and its ExtINT delivery mode.
const LVT_LINT0: u32 = 0x350;
const LVT_EXTINT: u32 = 7 << 8;
const GATE_NOT_MODELLED: &str =
    "this PIT tracks neither null count nor counter 2's gate in mode 0 (KVM's in-kernel PIT, QEMU's)";
const EOI_AT_INJECTION: &str = "the LAPIC ends service (and acknowledges IRQ 0) when it injects, so a reinjecting PIT releases each owed tick while the handler runs with IF=0, and this host delivers it only at a later exit";
const MODE2_OUT_INVERTED: &str =
    "this PIT tracks no null count and shows mode 2's OUT low between pulses (KVM's in-kernel PIT, QEMU's)";

fn main(boot: &'static Boot) -> ! {
    let route = boot.platform.isa_route(0);
    Line::new()
        .s("# pit guest: tables=")
        .s(boot.platform.source)
        .s(" tsc/ms=")
        .u(boot.calibration.tsc_per_ms)
        .s(" calibrated=")
        .b(boot.calibration.ok)
        .s(" irq0 gsi=")
        .u(u64::from(route.gsi))
        .print();
    let timed = calibration_checked();
    mode0_counting();
    mode2_rate(timed);
    mode3_square(timed);
    counter_latch();
    let null_count = null_count_modelled();
    read_back(null_count);
    port61(null_count);
    let holds_in_service = lapic::holds_in_service();
    irq0_pic(timed);
    irq0_ioapic(boot, holds_in_service, timed);
    pit::stop();
    pit::set_gate2(false);
    report::finish()
}

entry!(main);

/// TSC ticks per millisecond over 20 ms of counter 0 (mode 2, full range),
/// or None if two polls were ever over 1 ms apart (the vCPU was
/// descheduled, and whole counter wraps may have gone unseen).
fn measure_tsc_per_ms() -> Option<u64> {
    const TARGET: u64 = pit::FREQ_HZ / 50;
    let max_gap = time::tsc_per_ms();
    pit::program(0, 2, 0);
    let mut last = pit::latched_count(0);
    let t0 = rdtsc();
    let mut t_last = t0;
    let mut elapsed = 0u64;
    let d = Deadline::after_us(TIMEOUT_US);
    let mut ok = true;
    while elapsed < TARGET && !d.expired() {
        let now = pit::latched_count(0);
        let t = rdtsc();
        ok &= t - t_last <= max_gap;
        t_last = t;
        elapsed += u64::from(last.wrapping_sub(now));
        last = now;
    }
    pit::stop();
    (ok && elapsed >= TARGET).then(|| (t_last - t0) * pit::FREQ_HZ / (elapsed * 1000))
}

/// Whether the runtime's TSC rate (from 10 ms of PIT counting at boot,
/// which a descheduled vCPU can spoil) agrees within 3 % with a fresh
/// measurement; recalibrates up to three times until it does. The timed
/// checks SKIP if it never does.
fn calibration_checked() -> bool {
    for _ in 0..3 {
        if let Some(m) = measure_tsc_per_ms() {
            let c = time::tsc_per_ms();
            if m.abs_diff(c) * 100 <= 3 * c {
                return true;
            }
            Line::new()
                .s("# TSC/ms ")
                .u(c)
                .s(" at boot, ")
                .u(m)
                .s(" now: recalibrating")
                .print();
        }
        time::calibrate();
    }
    false
}

/// TSC ticks for `pit_ticks` input clocks.
fn tsc_for_pit_ticks(pit_ticks: u64) -> u64 {
    pit_ticks * time::tsc_per_ms() * 1000 / pit::FREQ_HZ
}

/// Whether `measured` TSC ticks are within PERIOD_TOLERANCE_PCT of
/// `expected`. The TSC rate itself comes from 10 ms of PIT counting at boot
/// (error of one counter poll, tens of microseconds); each edge here is seen
/// one poll late (tens of microseconds in 55 ms); what dominates is the
/// shared, nested host preempting the vCPU or the device thread for up to a
/// few milliseconds, which 10 % of 55 ms covers.
fn period_ok(name: &str, expected: u64, measured: u64) {
    let slack = expected * PERIOD_TOLERANCE_PCT / 100;
    if measured + slack >= expected && measured <= expected + slack {
        report::pass(name);
    } else {
        report::fail_line(name)
            .s("expected ")
            .u(expected)
            .s(" TSC ticks +- ")
            .u(PERIOD_TOLERANCE_PCT)
            .s("%, got ")
            .u(measured)
            .print();
    }
}

/// Mode 0: two latched reads decrease and stay below the reload; OUT is low
/// until terminal count and high after it (read-back status bit 7).
fn mode0_counting() {
    const RELOAD: u16 = 0x4000; // 13.7 ms
    pit::program(0, 0, RELOAD);
    delay_us(20);
    let a = pit::latched_count(0);
    delay_us(20);
    let b = pit::latched_count(0);
    if a < RELOAD && b < a {
        report::pass("mode0-counts-down");
    } else {
        report::fail_line("mode0-counts-down")
            .s("expected reload ")
            .x(RELOAD.into())
            .s(" > a > b, got a ")
            .x(a.into())
            .s(" b ")
            .x(b.into())
            .print();
    }
    let before = pit::status(0) & STATUS_OUT != 0;
    // The load-to-read window must stay well inside the 1 ms count; a host
    // that preempts the vCPU for longer would see OUT high already, so such
    // attempts (timed with the TSC) are repeated.
    let mut low_after_load = true;
    for _ in 0..5 {
        let start = rdtsc();
        pit::program(0, 0, 1193); // 1 ms
        low_after_load = pit::status(0) & STATUS_OUT != 0;
        if rdtsc().saturating_sub(start) < tsc_for_pit_ticks(1193) / 2 {
            break;
        }
    }
    let rose = poll(20_000, || pit::status(0) & STATUS_OUT != 0);
    report::check_list(
        "mode0-out-at-terminal-count",
        &[0, 0, 1],
        &[before.into(), low_after_load.into(), rose.into()],
    );
    pit::stop();
}

/// Polls `cond` with interrupts as they are until it holds or `us` pass.
fn poll(us: u64, mut cond: impl FnMut() -> bool) -> bool {
    let d = Deadline::after_us(us);
    loop {
        if cond() {
            return true;
        }
        if d.expired() {
            return false;
        }
    }
}

/// What `sample` saw of a periodic counter: the range of latched counts,
/// whether every count was even, and the TSC at the first PERIODS + 1
/// edges (a wrap of the count, or a rise of OUT).
struct Samples {
    min: u16,
    max: u16,
    all_even: bool,
    edges: usize,
    edge_tsc: [u64; PERIODS + 1],
    /// Longest TSC gap between two polls.
    max_gap: u64,
}

/// Samples counter 0 (programmed in `mode` with PERIOD_RELOAD) up to
/// ATTEMPTS times, until no two polls were more than period /
/// MAX_GAP_DIVISOR apart. The counter is stopped afterwards.
fn sample_mode(mode: u8, out_edges: bool) -> Samples {
    let max_gap = tsc_for_pit_ticks(PERIOD_RELOAD.into()) / MAX_GAP_DIVISOR;
    let mut s = None;
    for _ in 0..ATTEMPTS {
        pit::program(0, mode, PERIOD_RELOAD);
        let got = sample(out_edges);
        let ok = got.max_gap <= max_gap;
        s = Some(got);
        if ok {
            break;
        }
    }
    pit::stop();
    s.expect("ATTEMPTS > 0")
}

/// Samples counter 0 with read-back (status then count) until PERIODS + 1
/// edges were seen or TIMEOUT_US passes. `out_edges`: count rises of OUT
/// (mode 3, where the count wraps twice a period) instead of count wraps.
fn sample(out_edges: bool) -> Samples {
    let mut s = Samples {
        min: u16::MAX,
        max: 0,
        all_even: true,
        edges: 0,
        edge_tsc: [0; PERIODS + 1],
        max_gap: 0,
    };
    let mut last_tsc = rdtsc();
    let (mut last_count, mut last_out) = (None::<u16>, None::<bool>);
    // PERIODS + 1 edges after up to one period before the first.
    let d = Deadline::after_us(2 * TIMEOUT_US);
    while s.edges <= PERIODS && !d.expired() {
        pit::read_back(1, true, true);
        let status = guest_runtime::arch::inb(0x40);
        let count = pit::read_word(0);
        let tsc = rdtsc();
        s.max_gap = s.max_gap.max(tsc - last_tsc);
        last_tsc = tsc;
        let out = status & STATUS_OUT != 0;
        s.min = s.min.min(count);
        s.max = s.max.max(count);
        s.all_even &= count.is_multiple_of(2);
        let edge = if out_edges {
            last_out == Some(false) && out
        } else {
            last_count.is_some_and(|l| count > l)
        };
        if edge {
            s.edge_tsc[s.edges] = tsc;
            s.edges += 1;
        }
        last_count = Some(count);
        last_out = Some(out);
    }
    s
}

fn report_period(name: &str, s: &Samples, timed: bool) {
    if !timed {
        report::skip(name, CALIBRATION_OFF);
        return;
    }
    if s.max_gap > tsc_for_pit_ticks(PERIOD_RELOAD.into()) / MAX_GAP_DIVISOR {
        report::skip(name, HOST_BUSY);
        return;
    }
    if s.edges <= PERIODS {
        report::fail_line(name)
            .s("expected ")
            .u(PERIODS as u64 + 1)
            .s(" edges, got ")
            .u(s.edges as u64)
            .print();
        return;
    }
    let measured = (s.edge_tsc[PERIODS] - s.edge_tsc[0]) / PERIODS as u64;
    period_ok(name, tsc_for_pit_ticks(PERIOD_RELOAD.into()), measured);
}

/// Mode 2: latched counts stay in 1..=reload; the count wraps once per
/// reload / 1193182 Hz.
fn mode2_rate(timed: bool) {
    let s = sample_mode(2, false);
    if s.max <= PERIOD_RELOAD && s.min >= 1 {
        report::pass("mode2-reload");
    } else {
        report::fail_line("mode2-reload")
            .s("expected counts in 1..=")
            .u(PERIOD_RELOAD.into())
            .s(", got ")
            .u(s.min.into())
            .s("..=")
            .u(s.max.into())
            .print();
    }
    report_period("mode2-period", &s, timed);
}

/// Mode 3 with an even reload: the count steps by 2 (every latched count is
/// even) and stays in 2..=reload; OUT rises once per reload / 1193182 Hz.
fn mode3_square(timed: bool) {
    let s = sample_mode(3, true);
    if s.max <= PERIOD_RELOAD && s.min >= 2 && s.all_even {
        report::pass("mode3-reload-step-2");
    } else {
        report::fail_line("mode3-reload-step-2")
            .s("expected even counts in 2..=")
            .u(PERIOD_RELOAD.into())
            .s(", got ")
            .u(s.min.into())
            .s("..=")
            .u(s.max.into())
            .s(if s.all_even { " all even" } else { " some odd" })
            .print();
    }
    report_period("mode3-period", &s, timed);
}

/// Counter latch: a latched value holds while the counter runs on (2 ms
/// later the live count is 2386 ticks lower); a second latch before the
/// read is ignored. A count that was not held reads a few ticks from the
/// live one.
fn counter_latch() {
    const DELAY_US: u64 = 2_000;
    // At least half the delay's ticks, at most half the 55 ms range (a
    // descheduled vCPU may take far longer than the 2 ms).
    const MIN: u16 = 1193;
    const MAX: u16 = 32_768;
    pit::program(0, 2, 0); // 65536: 55 ms
    for (name, second_latch) in [("latch-holds", false), ("latch-second-ignored", true)] {
        pit::latch(0);
        delay_us(DELAY_US);
        if second_latch {
            pit::latch(0);
        }
        let held = pit::read_word(0);
        let now = pit::latched_count(0);
        let ran = held.wrapping_sub(now);
        if (MIN..=MAX).contains(&ran) {
            report::pass(name);
        } else {
            report::fail_line(name)
                .s("expected the held count ")
                .u(MIN.into())
                .s("..=")
                .u(MAX.into())
                .s(" above the live one 2 ms later, got held ")
                .u(held.into())
                .s(" live ")
                .u(now.into())
                .print();
        }
    }
    pit::stop();
}

/// Read-back: the status byte (OUT << 7 | null << 6 | access << 4 | mode
/// << 1 | bcd) of counter 0 in mode 0 before terminal count (0x30), in mode
/// 2 (0x34 with OUT masked) and of counter 2 in LSB-only mode 3 (0x16, OUT
/// masked); with count and status latched together, status comes first.
/// Mode 2's OUT is high except for the one clock at count 1 (0xB4).
fn read_back(null_count: bool) {
    pit::program(0, 0, 0x4000);
    delay_us(20);
    let mode0 = pit::status(0);
    pit::program(0, 2, 0x4000);
    delay_us(20);
    let mode2 = pit::status(0);
    pit::set_gate2(true);
    guest_runtime::arch::outb(0x43, pit::control_word(2, pit::ACCESS_LSB, 3));
    guest_runtime::arch::outb(0x42, 0x80);
    delay_us(20);
    let ch2 = pit::status(2) & !STATUS_OUT;
    pit::set_gate2(false);
    report::check_list(
        "read-back-status",
        &[0x30, 0x34, 0x16],
        &[mode0.into(), (mode2 & !STATUS_OUT).into(), ch2.into()],
    );
    if !null_count && mode2 & STATUS_OUT == 0 {
        report::skip("mode2-out-high", MODE2_OUT_INVERTED);
    } else {
        report::check_eq("mode2-out-high", 0xB4, mode2.into());
    }

    pit::program(0, 2, 0x4000);
    delay_us(20);
    pit::read_back(1, true, true);
    let status = guest_runtime::arch::inb(0x40);
    let count = pit::read_word(0);
    if status & !STATUS_OUT == 0x34 && count <= 0x4000 && count > 0x4000 - 5_000 {
        report::pass("read-back-status-before-count");
    } else {
        report::fail_line("read-back-status-before-count")
            .s("expected status 0x34 (OUT masked) then a count just below 0x4000, got ")
            .x(status.into())
            .s(" then ")
            .x(count.into())
            .print();
    }
    pit::stop();
}

/// Whether the PIT reports null count between a control word and the count
/// (an informational probe: the models that skip it also ignore counter 2's
/// gate in mode 0, see `port61`).
fn null_count_modelled() -> bool {
    guest_runtime::arch::outb(0x43, pit::control_word(0, pit::ACCESS_WORD, 2));
    let s = pit::status(0);
    guest_runtime::arch::outb(0x40, 0xFF);
    guest_runtime::arch::outb(0x40, 0xFF);
    let modelled = s & STATUS_NULL_COUNT != 0;
    Line::new()
        .s("# null count after a control word: ")
        .b(modelled)
        .print();
    pit::stop();
    modelled
}

/// Port 0x61: counter 2 in mode 0 with the gate high raises OUT2 (bit 5) at
/// terminal count; with the gate low it holds its count and OUT2 stays low
/// until the gate goes high.
fn port61(gate_modelled: bool) {
    pit::set_gate2(true);
    pit::program(2, 0, 1193);
    let before = pit::out2();
    let rose = poll(20_000, pit::out2);
    report::check_list(
        "port61-out2-terminal-count",
        &[0, 1],
        &[before.into(), rose.into()],
    );

    pit::set_gate2(false);
    pit::program(2, 0, 1193);
    delay_us(3_000);
    let out_low = pit::out2();
    let count = pit::latched_count(2);
    pit::set_gate2(true);
    let rose = poll(20_000, pit::out2);
    pit::set_gate2(false);
    if !gate_modelled && (out_low || count != 1193) {
        report::skip("port61-gate-low-stops", GATE_NOT_MODELLED);
        return;
    }
    report::check_list(
        "port61-gate-low-stops",
        &[0, 1193, 1],
        &[out_low.into(), count.into(), rose.into()],
    );
}

/// Counts `vector` over IRQ_WINDOW_US with interrupts enabled and checks
/// the count against the rate. Tolerance: the window's two ends cost at
/// most one tick each (2 of 40); the rest is host noise: KVM's reinject
/// policy delivers a late tick rather than losing it, but a vCPU preempted
/// at the window's end misses a few.
fn irq0_count_ok(name: &str, vector: u8, holds_in_service: bool, timed: bool) {
    if !timed {
        report::skip(name, CALIBRATION_OFF);
        return;
    }
    let c0 = cpu::count(0, vector);
    let t0 = rdtsc();
    wait_until(IRQ_WINDOW_US, || false);
    let t1 = rdtsc();
    let got = u64::from(cpu::count(0, vector) - c0);
    let expected = (t1 - t0) * pit::FREQ_HZ / (u64::from(IRQ_RELOAD) * time::tsc_per_ms() * 1000);
    let slack = (expected * IRQ_TOLERANCE_PCT).div_ceil(100);
    if got + slack >= expected && got <= expected + slack {
        report::pass(name);
    } else if !holds_in_service && got < expected {
        Line::new()
            .s("# ")
            .s(name)
            .s(": ")
            .u(got)
            .s(" of ")
            .u(expected)
            .s(" interrupts")
            .print();
        report::skip(name, EOI_AT_INJECTION);
    } else {
        report::fail_line(name)
            .s("expected ")
            .u(expected)
            .s(" +- ")
            .u(slack)
            .s(" interrupts, got ")
            .u(got)
            .print();
    }
}

/// Counter 0 in mode 2 at 1 kHz through the master PIC (vector 0x20), the
/// LAPIC's LINT0 programmed as ExtINT.
fn irq0_pic(timed: bool) {
    pit::program(0, 2, IRQ_RELOAD);
    // Drops the IRQ 0 edges the PIC latched while masked.
    pic::init();
    lapic::write(LVT_LINT0, LVT_EXTINT);
    pic::set_masked(0, false);
    irq0_count_ok("irq0-pic", pic::MASTER_BASE, true, timed);
    pic::set_masked(0, true);
    pit::stop();
    lapic::write(LVT_LINT0, lapic::LVT_MASKED | LVT_EXTINT);
}

/// The same through the IOAPIC: ISA IRQ 0 on the pin the firmware tables
/// give (an interrupt source override to GSI 2 on PC firmware; without one,
/// GSI 0), edge or level and polarity as they say.
///
/// Where the LAPIC ends an interrupt's service at injection (KVM's LAPIC on
/// the nested development hosts, probed with `lapic::holds_in_service`), a
/// count that falls short is a SKIP: see EOI_AT_INJECTION.
fn irq0_ioapic(boot: &Boot, holds_in_service: bool, timed: bool) {
    let route = boot.platform.isa_route(0);
    let pin = route.gsi.wrapping_sub(boot.platform.ioapic_gsi_base);
    let io = boot.ioapic;
    if pin >= io.pins() {
        report::fail_line("irq0-ioapic")
            .s("expected IRQ 0 on an IOAPIC pin, got GSI ")
            .u(route.gsi.into())
            .print();
        return;
    }
    pit::program(0, 2, IRQ_RELOAD);
    io.set_redirection(
        pin,
        Redirection::fixed(V_IRQ0_IOAPIC, boot.bsp_apic_id as u8)
            .level(route.level)
            .active_low(route.active_low),
    );
    irq0_count_ok("irq0-ioapic", V_IRQ0_IOAPIC, holds_in_service, timed);
    io.mask(pin);
    pit::stop();
}
