//! The IOAPIC guest: pin delivery, remote IRR, masking, EOI handling,
//! retargeting, destinations and the register file, on two CPUs.
//!
//! Interrupt sources are pc-testdev lines (a byte write to port 0x2000 + n
//! sets ISA IRQ n's level). Lines 14 and 15 are used: nothing else drives
//! them on virq or under QEMU, and no firmware override touches them.
//! Every check has its own vector, so per-CPU counts tell the checks apart.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use guest_runtime::cpu::{self, InterruptFrame};
use guest_runtime::ioapic::{IoApic, Redirection};
use guest_runtime::serial::Line;
use guest_runtime::time::wait_until;
use guest_runtime::{arch, entry, lapic, report, smp, testdev_set_irq, Boot};

const LINE_A: u8 = 14;
const LINE_B: u8 = 15;

const V_EDGE: u8 = 0x40;
const V_LEVEL: u8 = 0x41;
const V_REDELIVER: u8 = 0x42;
const V_MASK_LEVEL: u8 = 0x43;
const V_MASK_EDGE: u8 = 0x44;
const V_EDGE_WRITE: u8 = 0x45;
const V_SHARED: u8 = 0x46;
const V_RETARGET: u8 = 0x47;
const V_PHYSICAL: u8 = 0x48;
const V_LOGICAL: u8 = 0x49;
const V_LOWEST: u8 = 0x4A;
const V_DIRECTED: u8 = 0x4B;
const V_SUPPRESSED: u8 = 0x4C;

/// Bound for any wait that should succeed; a pass takes far less.
const TIMEOUT_US: u64 = 300_000;
/// How long a wrongly repeated delivery gets to show up.
const SETTLE_US: u64 = 2_000;
/// Logical (flat) IDs: bit n for CPU n.
const LOGICAL_BSP: u8 = 1 << 0;
const LOGICAL_AP: u8 = 1 << 1;
const NONE: u32 = u32::MAX;
const NO_IN_SERVICE: &str =
    "the LAPIC clears ISR (and EOIs a level vector) on injection, before the handler's EOI";

static IOAPIC_BASE: AtomicUsize = AtomicUsize::new(0);
static AP_READY: AtomicBool = AtomicBool::new(false);

// What `line_handler` does for the check under way (see `arm`).
static ARMED_LINES: [AtomicU32; 2] = [AtomicU32::new(NONE), AtomicU32::new(NONE)];
static ARMED_PINS: [AtomicU32; 2] = [AtomicU32::new(NONE), AtomicU32::new(NONE)];
/// Lower the armed lines on this call (1-based; 0 = never).
static LOWER_ON: AtomicU32 = AtomicU32::new(0);
/// On the BSP, retarget the first armed pin to this APIC ID (NONE = don't).
static RETARGET_TO: AtomicU32 = AtomicU32::new(NONE);
static CALLS: AtomicU32 = AtomicU32::new(0);
/// Calls that found remote IRR set on every armed pin.
static CALLS_WITH_REMOTE_IRR: AtomicU32 = AtomicU32::new(0);

fn ioapic() -> IoApic {
    IoApic {
        base: IOAPIC_BASE.load(Ordering::Relaxed),
    }
}

/// The handler of every vector this guest uses (the dispatcher sends the
/// LAPIC EOI after it returns).
fn line_handler(_: &mut InterruptFrame) {
    let call = CALLS.fetch_add(1, Ordering::AcqRel) + 1;
    let io = ioapic();
    let pins = ARMED_PINS.each_ref().map(|p| p.load(Ordering::Relaxed));
    let mut armed = pins.iter().copied().filter(|&p| p != NONE);
    if pins[0] != NONE && armed.all(|p| io.redirection(p).remote_irr()) {
        CALLS_WITH_REMOTE_IRR.fetch_add(1, Ordering::AcqRel);
    }
    let dest = RETARGET_TO.load(Ordering::Relaxed);
    if dest != NONE && pins[0] != NONE && cpu::index() == 0 {
        io.set_destination(pins[0], dest as u8);
    }
    if call == LOWER_ON.load(Ordering::Relaxed) {
        for line in ARMED_LINES.each_ref().map(|l| l.load(Ordering::Relaxed)) {
            if line != NONE {
                testdev_set_irq(line as u8, false);
            }
        }
    }
}

/// Per-check context.
struct Ctx {
    boot: &'static Boot,
    io: IoApic,
    bsp: u8,
    /// The AP's APIC ID, if it came up.
    ap: Option<u8>,
    /// Why AP checks cannot run (one CPU, or it did not start).
    no_ap: &'static str,
    /// The LAPIC keeps a vector in service until the handler's EOI.
    holds_in_service: bool,
}

impl Ctx {
    /// The IOAPIC pin ISA IRQ `line` arrives on, as the tables say.
    fn pin(&self, line: u8) -> u32 {
        let p = &self.boot.platform;
        p.isa_route(line).gsi.wrapping_sub(p.ioapic_gsi_base)
    }

    /// Sets up `line_handler` for `vector` and the given lines; resets the
    /// call counters. The lines start low.
    fn arm(&self, vector: u8, lines: &[u8], lower_on: u32) -> [u32; 2] {
        cpu::set_handler(vector, line_handler);
        let mut pins = [NONE; 2];
        for i in 0..2 {
            let line = lines.get(i).copied();
            if let Some(line) = line {
                testdev_set_irq(line, false);
                pins[i] = self.pin(line);
            }
            ARMED_LINES[i].store(line.map_or(NONE, u32::from), Ordering::Relaxed);
            ARMED_PINS[i].store(pins[i], Ordering::Relaxed);
        }
        LOWER_ON.store(lower_on, Ordering::Relaxed);
        RETARGET_TO.store(NONE, Ordering::Relaxed);
        CALLS.store(0, Ordering::Release);
        CALLS_WITH_REMOTE_IRR.store(0, Ordering::Release);
        pins
    }

    /// Masks the pins and lowers the lines a check used.
    fn disarm(&self, lines: &[u8]) {
        for &line in lines {
            self.io.mask(self.pin(line));
            testdev_set_irq(line, false);
        }
        ARMED_PINS
            .iter()
            .for_each(|p| p.store(NONE, Ordering::Relaxed));
        ARMED_LINES
            .iter()
            .for_each(|l| l.store(NONE, Ordering::Relaxed));
    }

    /// Whether checks of what the handler's EOI does can run; SKIPs `names`
    /// if the LAPIC ends the interrupt's service before the handler runs.
    fn eoi_checks_possible(&self, names: &[&str]) -> bool {
        if !self.holds_in_service {
            for name in names {
                report::skip(name, NO_IN_SERVICE);
            }
        }
        self.holds_in_service
    }

    fn ap_checks_possible(&self, names: &[&str]) -> Option<u8> {
        if self.ap.is_none() {
            for name in names {
                if self.boot.platform.cpu_count < 2 {
                    report::skip(name, self.no_ap);
                } else {
                    report::fail(name, self.no_ap);
                }
            }
        }
        self.ap
    }
}

fn calls() -> u32 {
    CALLS.load(Ordering::Acquire)
}

fn count(cpu: usize, vector: u8) -> u32 {
    cpu::count(cpu, vector)
}

fn settle() {
    wait_until(SETTLE_US, || false);
}

fn pulse(line: u8) {
    testdev_set_irq(line, true);
    testdev_set_irq(line, false);
}

fn main(boot: &'static Boot) -> ! {
    let io = boot.ioapic;
    IOAPIC_BASE.store(io.base, Ordering::Relaxed);
    Line::new()
        .s("# ioapic guest: tables=")
        .s(boot.platform.source)
        .s(" cpus=")
        .u(boot.platform.cpu_count as u64)
        .s(" ioapic=")
        .x(io.base as u64)
        .s(" version=")
        .x(u64::from(io.read(1)))
        .s(" lapic-version=")
        .x(u64::from(lapic::read(lapic::reg::VERSION)))
        .s(if lapic::is_x2apic() {
            " x2apic"
        } else {
            " xapic"
        })
        .print();
    lapic::set_logical_flat(LOGICAL_BSP);
    let holds_in_service = lapic::holds_in_service();
    if !holds_in_service {
        Line::new().s("# host limit: ").s(NO_IN_SERVICE).print();
    }
    let (ap, no_ap) = start_ap(boot);
    let ctx = Ctx {
        boot,
        io,
        bsp: boot.bsp_apic_id as u8,
        ap,
        no_ap,
        holds_in_service,
    };

    edge_pin(&ctx);
    level_pin(&ctx);
    level_redelivery(&ctx);
    mask_level(&ctx);
    mask_edge(&ctx);
    rte_edge_write(&ctx);
    shared_vector_eoi(&ctx);
    retarget_in_service(&ctx);
    physical_destinations(&ctx);
    logical_flat(&ctx);
    lowest_priority(&ctx);
    out_of_range_index(&ctx);
    id_register(&ctx);
    version_register(&ctx);
    eoi_register(&ctx);
    eoi_broadcast_suppression(&ctx);
    report::finish()
}

entry!(main);

fn start_ap(boot: &Boot) -> (Option<u8>, &'static str) {
    match smp::start_first_ap(&boot.platform, ap_main, &AP_READY, TIMEOUT_US) {
        Ok(apic_id) => (Some(apic_id as u8), ""),
        Err(why) => (None, why),
    }
}

/// The AP takes interrupts and nothing else.
fn ap_main(index: usize) -> ! {
    lapic::set_logical_flat(1 << index);
    AP_READY.store(true, Ordering::Release);
    loop {
        arch::sti_hlt();
    }
}

/// One rising edge, one interrupt.
fn edge_pin(ctx: &Ctx) {
    let [pin, _] = ctx.arm(V_EDGE, &[LINE_A], 0);
    ctx.io
        .set_redirection(pin, Redirection::fixed(V_EDGE, ctx.bsp));
    pulse(LINE_A);
    wait_until(TIMEOUT_US, || calls() >= 1);
    settle();
    ctx.disarm(&[LINE_A]);
    report::check_eq("edge-pin", 1, calls().into());
}

/// A level line the handler lowers: one delivery, remote IRR set while it
/// is handled and clear after the EOI.
fn level_pin(ctx: &Ctx) {
    const NAMES: [&str; 3] = [
        "level-pin",
        "level-remote-irr-in-handler",
        "level-remote-irr-cleared-by-eoi",
    ];
    let [pin, _] = ctx.arm(V_LEVEL, &[LINE_A], 1);
    ctx.io
        .set_redirection(pin, Redirection::fixed(V_LEVEL, ctx.bsp).level(true));
    testdev_set_irq(LINE_A, true);
    wait_until(TIMEOUT_US, || calls() >= 1);
    settle();
    let remote_irr = ctx.io.redirection(pin).remote_irr();
    ctx.disarm(&[LINE_A]);
    let n = calls();
    if ctx.eoi_checks_possible(&NAMES[..2]) {
        report::check_eq(NAMES[0], 1, n.into());
        if n == 0 {
            report::fail(NAMES[1], "no interrupt");
        } else {
            report::check_eq(
                NAMES[1],
                n.into(),
                CALLS_WITH_REMOTE_IRR.load(Ordering::Acquire).into(),
            );
        }
    }
    // Whenever the EOI came, once the line is low and EOI'd nothing waits.
    report::check_bool(NAMES[2], false, remote_irr);
}

/// The line stays high through the first EOI: exactly one redelivery per
/// EOI, and the handler lowers it on the second call.
fn level_redelivery(ctx: &Ctx) {
    if !ctx.eoi_checks_possible(&["level-redelivery-per-eoi"]) {
        return;
    }
    let [pin, _] = ctx.arm(V_REDELIVER, &[LINE_A], 2);
    ctx.io
        .set_redirection(pin, Redirection::fixed(V_REDELIVER, ctx.bsp).level(true));
    testdev_set_irq(LINE_A, true);
    wait_until(TIMEOUT_US, || calls() >= 2);
    settle();
    ctx.disarm(&[LINE_A]);
    report::check_eq("level-redelivery-per-eoi", 2, calls().into());
}

/// A level line asserted while masked is held, and delivered on unmask.
fn mask_level(ctx: &Ctx) {
    if !ctx.eoi_checks_possible(&["mask-level-delivered-on-unmask"]) {
        return;
    }
    let [pin, _] = ctx.arm(V_MASK_LEVEL, &[LINE_A], 1);
    let rte = Redirection::fixed(V_MASK_LEVEL, ctx.bsp).level(true);
    ctx.io.set_redirection(pin, rte.masked(true));
    testdev_set_irq(LINE_A, true);
    settle();
    let while_masked = calls();
    ctx.io.set_low(pin, rte);
    wait_until(TIMEOUT_US, || calls() > while_masked);
    settle();
    let after = calls() - while_masked;
    ctx.disarm(&[LINE_A]);
    if while_masked == 0 && after == 1 {
        report::pass("mask-level-delivered-on-unmask");
    } else {
        report::fail_line("mask-level-delivered-on-unmask")
            .s("expected 0 while masked and 1 on unmask, got ")
            .u(while_masked.into())
            .s(" and ")
            .u(after.into())
            .print();
    }
}

/// An edge that arrives while the pin is masked is lost: unmasking does not
/// deliver it, the next edge is delivered.
fn mask_edge(ctx: &Ctx) {
    let [pin, _] = ctx.arm(V_MASK_EDGE, &[LINE_A], 0);
    let rte = Redirection::fixed(V_MASK_EDGE, ctx.bsp);
    ctx.io.set_redirection(pin, rte.masked(true));
    pulse(LINE_A);
    ctx.io.set_low(pin, rte);
    settle();
    let on_unmask = calls();
    pulse(LINE_A);
    wait_until(TIMEOUT_US, || calls() > on_unmask);
    settle();
    let next = calls() - on_unmask;
    ctx.disarm(&[LINE_A]);
    if on_unmask == 0 && next == 1 {
        report::pass("mask-edge-lost");
    } else {
        report::fail_line("mask-edge-lost")
            .s("expected 0 on unmask and 1 for the next edge, got ")
            .u(on_unmask.into())
            .s(" and ")
            .u(next.into())
            .print();
    }
}

/// With interrupts off the level interrupt waits in the LAPIC, remote IRR
/// set; rewriting the entry as edge clears remote IRR (the "fake EOI").
fn rte_edge_write(ctx: &Ctx) {
    arch::cli();
    let [pin, _] = ctx.arm(V_EDGE_WRITE, &[LINE_A], 1);
    let edge = Redirection::fixed(V_EDGE_WRITE, ctx.bsp);
    ctx.io.set_redirection(pin, edge.level(true));
    testdev_set_irq(LINE_A, true);
    let before = ctx.io.redirection(pin).remote_irr();
    ctx.io.set_low(pin, edge);
    let after = ctx.io.redirection(pin).remote_irr();
    ctx.disarm(&[LINE_A]);
    // Take the interrupt still waiting in the LAPIC.
    wait_until(TIMEOUT_US, || calls() >= 1);
    if before && !after {
        report::pass("rte-edge-clears-remote-irr");
    } else {
        report::fail_line("rte-edge-clears-remote-irr")
            .s("expected remote IRR set before and clear after the edge write, got ")
            .b(before)
            .s(" and ")
            .b(after)
            .print();
    }
}

/// Two level pins share a vector; both are delivered while interrupts are
/// off (one LAPIC interrupt), so both have remote IRR set; the one EOI
/// clears both.
fn shared_vector_eoi(ctx: &Ctx) {
    arch::cli();
    let [pin_a, pin_b] = ctx.arm(V_SHARED, &[LINE_A, LINE_B], 1);
    let rte = Redirection::fixed(V_SHARED, ctx.bsp).level(true);
    ctx.io.set_redirection(pin_a, rte);
    ctx.io.set_redirection(pin_b, rte);
    testdev_set_irq(LINE_A, true);
    testdev_set_irq(LINE_B, true);
    let before = [pin_a, pin_b].map(|p| ctx.io.redirection(p).remote_irr());
    wait_until(TIMEOUT_US, || calls() >= 1);
    settle();
    let after = [pin_a, pin_b].map(|p| ctx.io.redirection(p).remote_irr());
    ctx.disarm(&[LINE_A, LINE_B]);
    if before == [true, true] && after == [false, false] {
        report::pass("eoi-clears-every-sharing-rte");
    } else {
        report::fail_line("eoi-clears-every-sharing-rte")
            .s("expected remote IRR set on both pins, then clear on both after one EOI; got ")
            .b(before[0])
            .s(",")
            .b(before[1])
            .s(" then ")
            .b(after[0])
            .s(",")
            .b(after[1])
            .print();
    }
}

/// The handler on the BSP retargets the level entry to the AP (high half
/// only) while its vector is in service: the EOI still clears remote IRR,
/// and the next interrupt goes to the AP.
fn retarget_in_service(ctx: &Ctx) {
    const NAMES: [&str; 2] = ["retarget-in-service-eoi", "retarget-next-on-ap"];
    let Some(ap) = ctx.ap_checks_possible(&NAMES) else {
        return;
    };
    if !ctx.eoi_checks_possible(&NAMES) {
        return;
    }
    let [pin, _] = ctx.arm(V_RETARGET, &[LINE_A], 1);
    RETARGET_TO.store(ap.into(), Ordering::Relaxed);
    ctx.io
        .set_redirection(pin, Redirection::fixed(V_RETARGET, ctx.bsp).level(true));
    testdev_set_irq(LINE_A, true);
    wait_until(TIMEOUT_US, || count(0, V_RETARGET) >= 1);
    settle();
    let rte = ctx.io.redirection(pin);
    if rte.destination() != ap {
        report::fail_line(NAMES[0])
            .s("the entry's destination reads ")
            .u(rte.destination().into())
            .s(" after retargeting to ")
            .u(ap.into())
            .print();
    } else {
        report::check_bool(NAMES[0], false, rte.remote_irr());
    }

    RETARGET_TO.store(NONE, Ordering::Relaxed);
    let bsp_before = count(0, V_RETARGET);
    let ap_before = count(1, V_RETARGET);
    LOWER_ON.store(calls() + 1, Ordering::Relaxed);
    testdev_set_irq(LINE_A, true);
    wait_until(TIMEOUT_US, || count(1, V_RETARGET) > ap_before);
    settle();
    let (bsp, ap_got) = (
        count(0, V_RETARGET) - bsp_before,
        count(1, V_RETARGET) - ap_before,
    );
    ctx.disarm(&[LINE_A]);
    expect_split(NAMES[1], (0, 1), (bsp, ap_got));
}

/// Passes if (BSP, AP) counts are as expected.
fn expect_split(name: &str, expected: (u32, u32), got: (u32, u32)) -> bool {
    if got == expected {
        report::pass(name);
        return true;
    }
    report::fail_line(name)
        .s("expected bsp=")
        .u(expected.0.into())
        .s(" ap=")
        .u(expected.1.into())
        .s(", got bsp=")
        .u(got.0.into())
        .s(" ap=")
        .u(got.1.into())
        .print();
    false
}

/// Pulses `line` and returns the (BSP, AP) counts of `vector`
/// once `done` holds for them (or the wait times out) and things settled.
fn deliver_once(line: u8, vector: u8, done: impl Fn(u32, u32) -> bool) -> (u32, u32) {
    let before = (count(0, vector), count(1, vector));
    let delta = || (count(0, vector) - before.0, count(1, vector) - before.1);
    pulse(line);
    wait_until(TIMEOUT_US, || {
        let (b, a) = delta();
        done(b, a)
    });
    settle();
    delta()
}

/// A physical destination reaches exactly that CPU.
fn physical_destinations(ctx: &Ctx) {
    let [pin, _] = ctx.arm(V_PHYSICAL, &[LINE_A], 0);
    ctx.io
        .set_redirection(pin, Redirection::fixed(V_PHYSICAL, ctx.bsp));
    let got = deliver_once(LINE_A, V_PHYSICAL, |b, a| b + a > 0);
    expect_split("physical-dest-bsp", (1, 0), got);
    if let Some(ap) = ctx.ap_checks_possible(&["physical-dest-ap"]) {
        ctx.io.set_destination(pin, ap);
        let got = deliver_once(LINE_A, V_PHYSICAL, |b, a| b + a > 0);
        expect_split("physical-dest-ap", (0, 1), got);
    }
    ctx.disarm(&[LINE_A]);
}

/// Logical flat destinations: the AP's bit, both bits, the BSP's bit.
fn logical_flat(ctx: &Ctx) {
    const NAME: &str = "logical-flat-dest";
    if ctx.ap_checks_possible(&[NAME]).is_none() {
        return;
    }
    if lapic::is_x2apic() {
        report::skip(NAME, "x2APIC mode has no flat logical model");
        return;
    }
    let [pin, _] = ctx.arm(V_LOGICAL, &[LINE_A], 0);
    let rte = Redirection::fixed(V_LOGICAL, 0).logical(true);
    ctx.io.set_redirection(pin, rte);
    for (dest, expected) in [
        (LOGICAL_AP, (0, 1)),
        (LOGICAL_AP | LOGICAL_BSP, (1, 1)),
        (LOGICAL_BSP, (1, 0)),
    ] {
        ctx.io.set_destination(pin, dest);
        let got = deliver_once(LINE_A, V_LOGICAL, |b, a| (b, a) == expected);
        if got != expected {
            Line::new()
                .s("# logical destination ")
                .x(dest.into())
                .print();
            expect_split(NAME, expected, got);
            ctx.disarm(&[LINE_A]);
            return;
        }
    }
    ctx.disarm(&[LINE_A]);
    report::pass(NAME);
}

/// Lowest priority to both CPUs: every edge reaches exactly one of them.
fn lowest_priority(ctx: &Ctx) {
    const NAME: &str = "lowest-priority-one-of-set";
    const ROUNDS: u32 = 4;
    if ctx.ap_checks_possible(&[NAME]).is_none() {
        return;
    }
    if lapic::is_x2apic() {
        report::skip(NAME, "x2APIC mode has no flat logical model");
        return;
    }
    let [pin, _] = ctx.arm(V_LOWEST, &[LINE_A], 0);
    let rte = Redirection::fixed(V_LOWEST, LOGICAL_AP | LOGICAL_BSP)
        .logical(true)
        .lowest_priority();
    ctx.io.set_redirection(pin, rte);
    let mut totals = (0, 0);
    let mut bad = None;
    for round in 1..=ROUNDS {
        let got = deliver_once(LINE_A, V_LOWEST, |b, a| b + a > 0);
        totals = (totals.0 + got.0, totals.1 + got.1);
        if got.0 + got.1 != 1 && bad.is_none() {
            bad = Some((round, got.0 + got.1));
        }
    }
    ctx.disarm(&[LINE_A]);
    Line::new()
        .s("# lowest priority: bsp=")
        .u(totals.0.into())
        .s(" ap=")
        .u(totals.1.into())
        .print();
    match bad {
        None => report::pass(NAME),
        Some((round, n)) => report::fail_line(NAME)
            .s("expected 1 CPU per edge, round ")
            .u(round.into())
            .s(" reached ")
            .u(n.into())
            .print(),
    }
}

/// Indexes that name no register read all ones.
fn out_of_range_index(ctx: &Ctx) {
    const NAME: &str = "ioregsel-out-of-range";
    let end = 0x10 + 2 * ctx.io.pins();
    for index in [0x03, 0x0F, end, end + 1, 0xFF] {
        if index > 0xFF {
            continue;
        }
        let v = ctx.io.read(index);
        if v != u32::MAX {
            report::fail_line(NAME)
                .s("index ")
                .x(index.into())
                .s(" read ")
                .x(v.into())
                .s(", expected 0xffffffff")
                .print();
            return;
        }
    }
    report::pass(NAME);
}

/// The version register: a known version, and a maximum redirection entry
/// that covers the GSIs the firmware tables route ISA IRQs to and matches
/// the entries that exist (entry `max` keeps what is written to it, the
/// index after it does not).
/// The ID register (bits 27:24 of index 0) holds the ID the firmware
/// tables give the IOAPIC, as an OS that cross-checks them expects.
fn id_register(ctx: &Ctx) {
    let register = (ctx.io.read(0) >> 24) & 0xF;
    report::check_eq(
        "id-matches-tables",
        u64::from(ctx.boot.platform.ioapic_id),
        register.into(),
    );
}

fn version_register(ctx: &Ctx) {
    const NAME: &str = "version-max-redirection";
    // Masked, vector 0xAB: the writable bits compared.
    const PROBE: u32 = 0x0001_00AB;
    const WRITABLE: u32 = 0x0001_00FF;
    let version = ctx.io.read(1);
    let max = ctx.io.max_redirection_entry();
    let p = &ctx.boot.platform;
    let needed = p.highest_isa_gsi().saturating_sub(p.ioapic_gsi_base);
    Line::new()
        .s("# ioapic version register ")
        .x(version.into())
        .s(": max redirection entry ")
        .u(max.into())
        .s("; the tables route ISA IRQs up to pin ")
        .u(needed.into())
        .print();
    let sticks = |index: u32| {
        index <= 0xFF && {
            ctx.io.write(index, PROBE);
            ctx.io.read(index) & WRITABLE == PROBE
        }
    };
    let (last, next) = (0x10 + 2 * max, 0x12 + 2 * max);
    let last_exists = sticks(last);
    let next_exists = sticks(next);
    if last <= 0xFF {
        ctx.io.write(last, Redirection(0).masked(true).0 as u32);
    }
    let reason = if !matches!(version & 0xFF, 0x11 | 0x20) {
        "unknown version number"
    } else if max < needed {
        "fewer entries than the tables route ISA IRQs to"
    } else if !last_exists {
        "the last entry does not keep what is written"
    } else if next_exists {
        "an entry beyond the maximum keeps what is written"
    } else {
        report::pass(NAME);
        return;
    };
    report::fail(NAME, reason);
}

/// The version 0x20 EOI register at 0x40: with interrupts off a level
/// interrupt waits in the LAPIC with remote IRR set; after the line is
/// lowered, writing the vector there clears remote IRR.
fn eoi_register(ctx: &Ctx) {
    const NAME: &str = "directed-eoi-register";
    if ctx.io.version() != 0x20 {
        report::skip(NAME, "IOAPIC version 0x11 has no EOI register");
        return;
    }
    arch::cli();
    let [pin, _] = ctx.arm(V_DIRECTED, &[LINE_A], 1);
    ctx.io
        .set_redirection(pin, Redirection::fixed(V_DIRECTED, ctx.bsp).level(true));
    testdev_set_irq(LINE_A, true);
    let before = ctx.io.redirection(pin).remote_irr();
    testdev_set_irq(LINE_A, false);
    ctx.io.eoi(V_DIRECTED);
    let after = ctx.io.redirection(pin).remote_irr();
    ctx.disarm(&[LINE_A]);
    // Take the interrupt still waiting in the LAPIC.
    wait_until(TIMEOUT_US, || calls() >= 1);
    if before && !after {
        report::pass(NAME);
    } else {
        report::fail_line(NAME)
            .s("expected remote IRR set before and clear after the EOI register write, got ")
            .b(before)
            .s(" and ")
            .b(after)
            .print();
    }
}

/// With EOI-broadcast suppression (SVR bit 12), which the LAPIC may only
/// advertise (version bit 24) when the IOAPIC has the EOI register, a LAPIC
/// EOI leaves remote IRR set; the EOI register then clears it.
fn eoi_broadcast_suppression(ctx: &Ctx) {
    const NAME: &str = "eoi-broadcast-suppression";
    if !lapic::eoi_broadcast_suppression_supported() {
        report::skip(
            NAME,
            "the LAPIC does not advertise EOI-broadcast suppression",
        );
        return;
    }
    if ctx.io.version() != 0x20 {
        report::fail(
            NAME,
            "the LAPIC advertises EOI-broadcast suppression but the IOAPIC has no EOI register",
        );
        return;
    }
    let [pin, _] = ctx.arm(V_SUPPRESSED, &[LINE_A], 1);
    ctx.io
        .set_redirection(pin, Redirection::fixed(V_SUPPRESSED, ctx.bsp).level(true));
    lapic::set_eoi_broadcast_suppression(true);
    testdev_set_irq(LINE_A, true);
    wait_until(TIMEOUT_US, || calls() >= 1);
    settle();
    let held = ctx.io.redirection(pin).remote_irr();
    ctx.io.eoi(V_SUPPRESSED);
    let after = ctx.io.redirection(pin).remote_irr();
    lapic::set_eoi_broadcast_suppression(false);
    ctx.disarm(&[LINE_A]);
    if calls() == 1 && held && !after {
        report::pass(NAME);
    } else {
        report::fail_line(NAME)
            .s("expected 1 interrupt, remote IRR held after the LAPIC EOI and clear after the EOI register; got ")
            .u(calls().into())
            .s(", ")
            .b(held)
            .s(", ")
            .b(!after)
            .print();
    }
}
