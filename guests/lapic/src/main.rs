//! The local APIC guest: priorities (TPR, CR8, PPR), priority order and
//! nesting, IPIs with every destination kind, NMI, INIT/SIPI, the timer in
//! its three modes, LVT masking, ESR and software disable in xAPIC mode;
//! then, if CPUID has x2APIC, both CPUs switch to x2APIC mode for the MSR
//! interface checks. Needs two CPUs (the AP answers commands from the BSP).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use guest_runtime::arch::{cli, cpuid, pause, rdmsr, rdtsc, read_cr8, sti_hlt, write_cr8, wrmsr};
use guest_runtime::cpu::{self, InterruptFrame};
use guest_runtime::lapic::{self, reg, Icr};
use guest_runtime::serial::Line;
use guest_runtime::time::{delay_us, lapic_ticks, poll_until, tsc_per_ms, wait_until, Deadline};
use guest_runtime::{entry, report, smp, Boot};

/// Bound for anything that should happen (a pass takes a few milliseconds).
const TIMEOUT_US: u64 = 300_000;
/// How long to wait for something that must not happen.
const ABSENT_US: u64 = 3_000;

/// AP command doorbell.
const WAKE: u8 = 0x31;
/// TPR masking: one vector in the TPR's class, one below it.
const TPR_AT: u8 = 0x58;
const TPR_BELOW: u8 = 0x45;
/// Priority order: sent lowest first.
const ORDER: [u8; 3] = [0x61, 0x6E, 0xA1];
/// Nesting: LOW's handler sends HIGH (may interrupt it) and LOWER (may not).
const NEST_LOWER: u8 = 0x70;
const NEST_LOW: u8 = 0x80;
const NEST_HIGH: u8 = 0x90;
/// Probe: is a vector in ISR while its handler runs?
const ISR_PROBE: u8 = 0x81;
/// IPIs.
const IPI_SELF: u8 = 0x63;
const IPI_PHYS: u8 = 0x64;
const IPI_FLAT: u8 = 0x65;
const IPI_CLUSTER: u8 = 0x66;
const IPI_ALL: u8 = 0x67;
const IPI_OTHERS: u8 = 0x68;
const PV_EOI: u8 = 0x6C;
/// Timer.
const TIMER: u8 = 0x71;
/// x2APIC IPIs.
const X2_SELF: u8 = 0x6A;
const X2_AP: u8 = 0x6B;
const X2_SELF_IPI: u8 = 0x6C;
const X2_LOGICAL: u8 = 0x6D;
/// Illegal vector for the ESR check.
const ILLEGAL: u8 = 3;
const NMI: u8 = 2;
/// SIPI page for the restart check (the runtime's trampoline uses 0x08).
const RESTART_PAGE: u8 = 0x07;

/// TDCR encodings.
const DIVIDE_1: u32 = 0xB;
const DIVIDE_16: u32 = 0x3;

/// x2APIC MSRs.
const X2_ID: u32 = 0x802;
const X2_VERSION: u32 = 0x803;
const X2_LDR: u32 = 0x80D;
const X2_ICR: u32 = 0x830;
const X2_SELF_IPI_MSR: u32 = 0x83F;

/// AP commands (written to CMD, then WAKE is sent; the AP clears CMD).
const CMD_SET_LOGICAL: u32 = 1;
const CMD_ENTER_X2APIC: u32 = 2;
const CMD_READ_X2APIC: u32 = 3;
const CMD_PING: u32 = 4;

static CMD: AtomicU32 = AtomicU32::new(0);
static ARG: [AtomicU32; 2] = [const { AtomicU32::new(0) }; 2];
static RESULT: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// Vectors in the order they were taken (priority-order check).
static LOG: [AtomicU32; 8] = [const { AtomicU32::new(0) }; 8];
static LOG_LEN: AtomicUsize = AtomicUsize::new(0);

/// Nesting: PPR in LOW before, in HIGH, in LOW after; what LOW's handler saw.
static NEST_PPR: [AtomicU32; 3] = [const { AtomicU32::new(0) }; 3];
static NEST_INSIDE: [AtomicU32; 2] = [const { AtomicU32::new(0) }; 2];
static NEST_BASE: [AtomicU32; 2] = [const { AtomicU32::new(0) }; 2];
static PROBE_IN_SERVICE: AtomicBool = AtomicBool::new(false);

/// NMI collapsing: the AP's NMI handler holds the first NMI while set.
static NMI_HOLD: AtomicBool = AtomicBool::new(false);
static NMI_HELD: AtomicBool = AtomicBool::new(false);
static NMI_RELEASE: AtomicBool = AtomicBool::new(false);

/// TSC when the TSC-deadline interrupt was taken.
static FIRED_TSC: AtomicU64 = AtomicU64::new(0);

fn bsp(vector: u8) -> u64 {
    cpu::count(0, vector).into()
}

fn ap(vector: u8) -> u64 {
    cpu::count(1, vector).into()
}

fn self_ipi(vector: u8) {
    lapic::send_ipi(0, Icr::fixed(vector).to_self());
}

fn main(boot: &'static Boot) -> ! {
    Line::new()
        .s("# lapic guest: cpus=")
        .u(boot.platform.cpu_count as u64)
        .s(" apic=")
        .s(if lapic::is_x2apic() {
            "x2apic"
        } else {
            "xapic"
        })
        .s(" version=")
        .x(lapic::read(reg::VERSION).into())
        .s(" x2apic-cpuid=")
        .b(lapic::x2apic_supported())
        .s(" tsc-deadline-cpuid=")
        .b(tsc_deadline_supported())
        .print();
    cpu::set_handler(TIMER, timer_handler);
    cpu::set_handler(NMI, nmi_handler);
    // Must never arrive; counted (not fatal) if it does.
    cpu::set_handler(ILLEGAL, |_| {});

    let have_ap = start_ap(boot);
    test_tpr();
    test_cr8();
    test_nesting();
    test_priority_order();
    test_self_ipi();
    if have_ap {
        test_ipis();
        test_nmi();
        test_restart();
    } else {
        for name in [
            "ipi-physical",
            "ipi-logical-flat",
            "ipi-logical-cluster",
            "ipi-all-including-self",
            "ipi-all-excluding-self",
            "nmi-ipi",
            "nmi-collapse",
            "init-sipi-restart",
        ] {
            report::skip(name, "no AP online");
        }
    }
    test_timer_oneshot();
    test_timer_periodic();
    test_tsc_deadline();
    test_mode_switch();
    test_divide();
    test_lvt_masked();
    test_esr();
    test_svr_disable();
    test_pv_eoi();
    test_x2apic(boot, have_ap);
    report::finish()
}

entry!(main);

fn tsc_deadline_supported() -> bool {
    cpuid(1).2 & (1 << 24) != 0
}

fn start_ap(boot: &Boot) -> bool {
    let p = &boot.platform;
    if p.cpu_count < 2 {
        report::skip("smp-start", "one CPU");
        return false;
    }
    let online = smp::start_aps(&p.apic_ids[..p.cpu_count], ap_main);
    report::check_eq("smp-start", p.cpu_count as u64, online as u64);
    smp::is_online(1)
}

/// AP loop: run each command the BSP posts, then sleep.
fn ap_main(_cpu: usize) -> ! {
    loop {
        cli();
        match CMD.load(Ordering::Acquire) {
            0 => sti_hlt(),
            cmd => {
                run_command(cmd);
                CMD.store(0, Ordering::Release);
            }
        }
    }
}

fn run_command(cmd: u32) {
    match cmd {
        CMD_SET_LOGICAL => {
            lapic::write(reg::DFR, ARG[1].load(Ordering::Relaxed));
            lapic::write(reg::LDR, ARG[0].load(Ordering::Relaxed));
        }
        // No APIC access after this until the BSP has switched the mode.
        CMD_ENTER_X2APIC => lapic::enter_x2apic_mode(),
        CMD_READ_X2APIC => {
            RESULT[0].store(rdmsr(X2_ID), Ordering::Relaxed);
            RESULT[1].store(rdmsr(X2_LDR), Ordering::Relaxed);
            RESULT[2].store(rdmsr(lapic::IA32_APIC_BASE), Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Has the AP run `cmd`; false if it did not answer.
fn ap_do(cmd: u32) -> bool {
    CMD.store(cmd, Ordering::Release);
    lapic::send_ipi(cpu::apic_id_of(1), Icr::fixed(WAKE));
    wait_until(TIMEOUT_US, || CMD.load(Ordering::Acquire) == 0)
}

fn ap_set_logical(ldr: u32, dfr: u32) -> bool {
    ARG[0].store(ldr, Ordering::Relaxed);
    ARG[1].store(dfr, Ordering::Relaxed);
    ap_do(CMD_SET_LOGICAL)
}

// ----- priorities -----------------------------------------------------------

/// A self IPI in or below the TPR's class stays pending until TPR drops
/// below its class. Counts of (at-class, below-class) after each TPR step.
fn test_tpr() {
    let (at, below) = (bsp(TPR_AT), bsp(TPR_BELOW));
    let step = || (bsp(TPR_AT) - at) << 4 | (bsp(TPR_BELOW) - below);
    cli();
    lapic::write(reg::TPR, u32::from(TPR_AT & 0xF0));
    self_ipi(TPR_AT);
    self_ipi(TPR_BELOW);
    poll_until(ABSENT_US, || false);
    let pending = u64::from(lapic::vector_bit(reg::IRR, TPR_AT))
        + u64::from(lapic::vector_bit(reg::IRR, TPR_BELOW));
    let masked = step();
    lapic::write(reg::TPR, 0x40);
    poll_until(TIMEOUT_US, || bsp(TPR_AT) > at);
    poll_until(ABSENT_US, || false);
    let middle = step();
    lapic::write(reg::TPR, 0);
    poll_until(TIMEOUT_US, || bsp(TPR_BELOW) > below);
    report::check_list(
        "tpr-masks-self-ipi",
        &[0x00, 2, 0x10, 0x11],
        &[masked, pending, middle, step()],
    );
}

/// CR8 reads TPR[7:4]; writing CR8 sets TPR to CR8 << 4.
fn test_cr8() {
    lapic::write(reg::TPR, 0x7A);
    let cr8 = read_cr8();
    write_cr8(3);
    let tpr = lapic::read(reg::TPR);
    write_cr8(0);
    let tpr0 = lapic::read(reg::TPR);
    lapic::write(reg::TPR, 0);
    report::check_list(
        "cr8-mirrors-tpr",
        &[7, 0x30, 0],
        &[cr8, tpr.into(), tpr0.into()],
    );
}

/// Runs on IST1; re-enables interrupts while its vector is in service.
fn nest_low_handler(_: &mut InterruptFrame) {
    NEST_PPR[0].store(lapic::read(reg::PPR), Ordering::Relaxed);
    let (high, lower) = (
        NEST_BASE[0].load(Ordering::Relaxed),
        NEST_BASE[1].load(Ordering::Relaxed),
    );
    self_ipi(NEST_HIGH);
    self_ipi(NEST_LOWER);
    poll_until(TIMEOUT_US / 4, || cpu::count(0, NEST_HIGH) > high);
    poll_until(ABSENT_US, || false);
    NEST_INSIDE[0].store(cpu::count(0, NEST_HIGH) - high, Ordering::Relaxed);
    NEST_INSIDE[1].store(cpu::count(0, NEST_LOWER) - lower, Ordering::Relaxed);
    NEST_PPR[2].store(lapic::read(reg::PPR), Ordering::Relaxed);
}

/// Runs on the nesting stack (IST3) with interrupts off.
fn nest_high_handler(_: &mut InterruptFrame) {
    NEST_PPR[1].store(lapic::read(reg::PPR), Ordering::Relaxed);
}

fn isr_probe_handler(_: &mut InterruptFrame) {
    PROBE_IN_SERVICE.store(lapic::vector_bit(reg::ISR, ISR_PROBE), Ordering::Relaxed);
}

/// Whether the APIC shows the vector being handled in ISR. If it does not,
/// PPR cannot follow the ISR, and a handler that enables interrupts can be
/// interrupted by anything, on its own IST stack: the nesting checks would
/// corrupt that stack, so they are skipped.
fn isr_tracks_handlers() -> bool {
    cpu::set_handler(ISR_PROBE, isr_probe_handler);
    PROBE_IN_SERVICE.store(false, Ordering::Relaxed);
    let before = bsp(ISR_PROBE);
    cli();
    self_ipi(ISR_PROBE);
    poll_until(TIMEOUT_US, || bsp(ISR_PROBE) > before);
    bsp(ISR_PROBE) > before && PROBE_IN_SERVICE.load(Ordering::Relaxed)
}

fn test_nesting() {
    if !isr_tracks_handlers() {
        let reason = "the APIC does not show the vector being handled in ISR";
        Line::new().s("# ").s(reason).print();
        for name in [
            "ppr-follows-isr",
            "nesting-higher-interrupts",
            "nesting-lower-waits",
        ] {
            report::skip(name, reason);
        }
        return;
    }
    cpu::set_handler(NEST_LOW, nest_low_handler);
    cpu::set_handler(NEST_HIGH, nest_high_handler);
    cpu::allow_nesting(NEST_HIGH);
    NEST_BASE[0].store(cpu::count(0, NEST_HIGH), Ordering::Relaxed);
    NEST_BASE[1].store(cpu::count(0, NEST_LOWER), Ordering::Relaxed);
    let lower = bsp(NEST_LOWER);
    cli();
    lapic::write(reg::TPR, 0x20);
    self_ipi(NEST_LOW);
    poll_until(TIMEOUT_US, || bsp(NEST_LOWER) > lower);
    let ppr_after = lapic::read(reg::PPR);
    lapic::write(reg::TPR, 0);
    let ppr = |i: usize| u64::from(NEST_PPR[i].load(Ordering::Relaxed));
    report::check_list(
        "ppr-follows-isr",
        &[0x80, 0x90, 0x80, 0x20],
        &[ppr(0), ppr(1), ppr(2), ppr_after.into()],
    );
    report::check_eq(
        "nesting-higher-interrupts",
        1,
        NEST_INSIDE[0].load(Ordering::Relaxed).into(),
    );
    report::check_list(
        "nesting-lower-waits",
        &[0, 1],
        &[
            NEST_INSIDE[1].load(Ordering::Relaxed).into(),
            bsp(NEST_LOWER) - lower,
        ],
    );
}

fn log_handler(frame: &mut InterruptFrame) {
    let i = LOG_LEN.fetch_add(1, Ordering::Relaxed);
    if let Some(slot) = LOG.get(i) {
        slot.store(frame.vector as u32, Ordering::Relaxed);
    }
}

/// Three pending vectors (two in one class) are taken highest first.
fn test_priority_order() {
    for v in ORDER {
        cpu::set_handler(v, log_handler);
    }
    LOG_LEN.store(0, Ordering::Relaxed);
    cli();
    for v in ORDER {
        self_ipi(v);
    }
    poll_until(TIMEOUT_US, || {
        LOG_LEN.load(Ordering::Relaxed) >= ORDER.len()
    });
    let got: [u64; 3] = core::array::from_fn(|i| LOG[i].load(Ordering::Relaxed).into());
    report::check_list("priority-order", &[0xA1, 0x6E, 0x61], &got);
}

// ----- IPIs -----------------------------------------------------------------

fn test_self_ipi() {
    let (b, a) = (bsp(IPI_SELF), ap(IPI_SELF));
    self_ipi(IPI_SELF);
    wait_until(TIMEOUT_US, || bsp(IPI_SELF) > b);
    wait_until(ABSENT_US, || false);
    report::check_list("self-ipi", &[1, 0], &[bsp(IPI_SELF) - b, ap(IPI_SELF) - a]);
}

/// KVM's paravirtual EOI: three self IPIs, each ended through the PV-EOI
/// flag where the hypervisor offers it; afterwards nothing is left in
/// service. A LAPIC that keeps the vector in service (virq's) must offer it
/// for a lone edge vector; KVM's on these hosts ends service at injection
/// and so never does (SKIP).
fn test_pv_eoi() {
    const NAME: &str = "pv-eoi";
    if !lapic::pv_eoi_supported() {
        report::skip(NAME, "no KVM PV-EOI in CPUID");
        return;
    }
    let holds = lapic::holds_in_service();
    if !lapic::enable_pv_eoi() {
        report::fail(NAME, "PV-EOI advertised but could not be enabled");
        return;
    }
    let (b, used_before) = (bsp(PV_EOI), lapic::pv_eois());
    for i in 1..=3 {
        self_ipi(PV_EOI);
        wait_until(TIMEOUT_US, || bsp(PV_EOI) >= b + i);
    }
    // A register read exits, and the EOI the flag recorded is done first.
    let in_service = lapic::in_service(PV_EOI);
    let used = u64::from(lapic::pv_eois() - used_before);
    lapic::disable_pv_eoi();
    let delivered = bsp(PV_EOI) - b;
    Line::new()
        .s("# pv-eoi: ")
        .u(used)
        .s(" of ")
        .u(delivered)
        .s(" EOIs paravirtual")
        .print();
    if delivered != 3 || in_service {
        report::fail_line(NAME)
            .s("expected 3 self IPIs and none left in service, got ")
            .u(delivered)
            .s(if in_service { ", still in service" } else { "" })
            .print();
    } else if used > 0 {
        report::pass(NAME);
    } else if holds {
        report::fail(
            NAME,
            "the LAPIC keeps vectors in service but offered no PV EOI",
        );
    } else {
        report::skip(
            NAME,
            "the LAPIC ends service at injection, so it never offers a PV EOI",
        );
    }
}

/// Sends `icr` to `dest` and returns the (AP, BSP) counts of `vector` since
/// `base` once `want` is reached (or after the bound) and a short quiet time.
fn send_and_count(dest: u32, icr: Icr, vector: u8, base: (u64, u64), want: (u64, u64)) -> [u64; 2] {
    lapic::send_ipi(dest, icr);
    counts_after(vector, base, want)
}

fn test_ipis() {
    let ap_id = cpu::apic_id_of(1);
    let base = (ap(IPI_PHYS), bsp(IPI_PHYS));
    let got = send_and_count(ap_id, Icr::fixed(IPI_PHYS), IPI_PHYS, base, (1, 0));
    report::check_list("ipi-physical", &[1, 0], &got);

    if lapic::is_x2apic() {
        report::skip("ipi-logical-flat", "started in x2APIC mode (no DFR)");
        report::skip("ipi-logical-cluster", "started in x2APIC mode (no DFR)");
    } else {
        test_logical(
            IPI_FLAT,
            u32::MAX,
            (0x01, 0x02),
            [0x02, 0x03, 0x04],
            "ipi-logical-flat",
        );
        test_logical(
            IPI_CLUSTER,
            0x0FFF_FFFF,
            (0x11, 0x12),
            [0x12, 0x13, 0x21],
            "ipi-logical-cluster",
        );
        lapic::write(reg::DFR, u32::MAX);
        lapic::write(reg::LDR, 0);
        ap_set_logical(0, u32::MAX);
    }

    let base = (ap(IPI_ALL), bsp(IPI_ALL));
    let got = send_and_count(0, Icr::fixed(IPI_ALL).to_all(), IPI_ALL, base, (1, 1));
    report::check_list("ipi-all-including-self", &[1, 1], &got);
    let base = (ap(IPI_OTHERS), bsp(IPI_OTHERS));
    let got = send_and_count(
        0,
        Icr::fixed(IPI_OTHERS).to_others(),
        IPI_OTHERS,
        base,
        (1, 0),
    );
    report::check_list("ipi-all-excluding-self", &[1, 0], &got);
}

/// Logical destinations with `dfr` and logical IDs (BSP, AP): `dests` are
/// the AP alone, both, and neither. Counts (AP, BSP) after each.
fn test_logical(vector: u8, dfr: u32, ids: (u32, u32), dests: [u32; 3], name: &str) {
    lapic::write(reg::DFR, dfr);
    lapic::write(reg::LDR, ids.0 << 24);
    if !ap_set_logical(ids.1 << 24, dfr) {
        report::fail(name, "AP did not answer");
        return;
    }
    let base = (ap(vector), bsp(vector));
    let icr = Icr::fixed(vector).logical();
    let a = send_and_count(dests[0], icr, vector, base, (1, 0));
    let b = send_and_count(dests[1], icr, vector, base, (2, 1));
    let c = send_and_count(dests[2], icr, vector, base, (3, 2));
    report::check_list(
        name,
        &[1, 0, 2, 1, 2, 1],
        &[a[0], a[1], b[0], b[1], c[0], c[1]],
    );
}

// ----- NMI and INIT/SIPI ------------------------------------------------------

/// On the AP while NMI_HOLD is set: stay in the first NMI's handler (NMIs
/// blocked) until the BSP has sent more. Each round reads an APIC register,
/// which exits to the hypervisor so it can queue what arrives.
fn nmi_handler(_: &mut InterruptFrame) {
    if cpu::index() != 1 || !NMI_HOLD.swap(false, Ordering::AcqRel) {
        return;
    }
    NMI_HELD.store(true, Ordering::Release);
    let deadline = Deadline::after_us(TIMEOUT_US);
    while !NMI_RELEASE.load(Ordering::Acquire) && !deadline.expired() {
        let _ = lapic::read(reg::TIMER_CURRENT);
        pause();
    }
}

fn test_nmi() {
    let ap_id = cpu::apic_id_of(1);
    let base = (ap(NMI), bsp(NMI));
    let got = send_and_count(ap_id, Icr::nmi(), NMI, base, (1, 0));
    report::check_list("nmi-ipi", &[1, 0], &got);

    // One NMI in service, two more sent: one stays pending, the other
    // collapses into it.
    let before = ap(NMI);
    NMI_HELD.store(false, Ordering::Release);
    NMI_RELEASE.store(false, Ordering::Release);
    NMI_HOLD.store(true, Ordering::Release);
    lapic::send_ipi(ap_id, Icr::nmi());
    if !wait_until(TIMEOUT_US, || NMI_HELD.load(Ordering::Acquire)) {
        NMI_HOLD.store(false, Ordering::Release);
        report::fail("nmi-collapse", "the first NMI was not taken");
        return;
    }
    lapic::send_ipi(ap_id, Icr::nmi());
    lapic::send_ipi(ap_id, Icr::nmi());
    wait_until(ABSENT_US, || false);
    NMI_RELEASE.store(true, Ordering::Release);
    wait_until(TIMEOUT_US, || ap(NMI) - before >= 2);
    wait_until(ABSENT_US, || false);
    report::check_eq("nmi-collapse", 2, ap(NMI) - before);
}

/// The AP, long since started, is sent INIT and a SIPI to another page: it
/// must start there (the stub marks it) and come back online.
fn test_restart() {
    let r = smp::restart_ap(1, RESTART_PAGE);
    let answers = r.online && ap_do(CMD_PING);
    report::check_list(
        "init-sipi-restart",
        &[1, 1, 1],
        &[r.ran_at_page.into(), r.online.into(), answers.into()],
    );
}

// ----- timer ------------------------------------------------------------------

fn timer_handler(_: &mut InterruptFrame) {
    FIRED_TSC.store(rdtsc(), Ordering::Relaxed);
}

/// One-shot: TMCCT starts at most TMICT, decreases, reads 0 after the one
/// interrupt.
fn test_timer_oneshot() {
    let before = bsp(TIMER);
    let initial = lapic_ticks(5_000);
    cli();
    lapic::timer_oneshot(TIMER, initial);
    let c1 = lapic::read(reg::TIMER_CURRENT);
    delay_us(300);
    let c2 = lapic::read(reg::TIMER_CURRENT);
    poll_until(TIMEOUT_US, || bsp(TIMER) > before);
    poll_until(ABSENT_US, || false);
    let c3 = lapic::read(reg::TIMER_CURRENT);
    lapic::timer_stop();
    let counting = c1 <= initial && c2 < c1 && c2 > 0;
    if !counting {
        Line::new()
            .s("# timer-oneshot: initial ")
            .u(initial.into())
            .s(" then ")
            .u(c1.into())
            .s(", ")
            .u(c2.into())
            .print();
    }
    report::check_list(
        "timer-oneshot",
        &[1, 0, 1],
        &[counting.into(), c3.into(), bsp(TIMER) - before],
    );
}

/// Periodic: three interrupts, and the count has reloaded after them.
fn test_timer_periodic() {
    let before = bsp(TIMER);
    let initial = lapic_ticks(2_000);
    cli();
    lapic::timer_periodic(TIMER, initial);
    poll_until(TIMEOUT_US, || bsp(TIMER) - before >= 3);
    let current = lapic::read(reg::TIMER_CURRENT);
    let tmict = lapic::read(reg::TIMER_INITIAL);
    lapic::timer_stop();
    report::check_list(
        "timer-periodic",
        &[1, 1, 1],
        &[
            (bsp(TIMER) - before >= 3).into(),
            (current > 0 && current <= initial).into(),
            (tmict == initial).into(),
        ],
    );
}

fn arm_tsc_deadline(deadline: u64) {
    lapic::write(
        reg::LVT_TIMER,
        u32::from(TIMER) | lapic::LVT_TIMER_TSC_DEADLINE,
    );
    wrmsr(lapic::IA32_TSC_DEADLINE, deadline);
}

/// TSC-deadline: fires once, not before the deadline, and the MSR then
/// reads 0; writing 0 disarms.
fn test_tsc_deadline() {
    if !tsc_deadline_supported() {
        report::skip("timer-tsc-deadline", "no TSC-deadline timer in CPUID");
        report::skip(
            "timer-tsc-deadline-disarm",
            "no TSC-deadline timer in CPUID",
        );
        return;
    }
    let before = bsp(TIMER);
    FIRED_TSC.store(0, Ordering::Relaxed);
    cli();
    let deadline = rdtsc() + 2 * tsc_per_ms();
    arm_tsc_deadline(deadline);
    poll_until(TIMEOUT_US, || bsp(TIMER) > before);
    poll_until(ABSENT_US, || false);
    let msr = rdmsr(lapic::IA32_TSC_DEADLINE);
    let fired = FIRED_TSC.load(Ordering::Relaxed);
    report::check_list(
        "timer-tsc-deadline",
        &[1, 1, 0],
        &[bsp(TIMER) - before, (fired >= deadline).into(), msr],
    );

    let before = bsp(TIMER);
    arm_tsc_deadline(rdtsc() + tsc_per_ms());
    wrmsr(lapic::IA32_TSC_DEADLINE, 0);
    poll_until(2 * ABSENT_US, || false);
    let msr = rdmsr(lapic::IA32_TSC_DEADLINE);
    lapic::timer_stop();
    report::check_list(
        "timer-tsc-deadline-disarm",
        &[0, 0],
        &[bsp(TIMER) - before, msr],
    );
}

/// Leaving TSC-deadline mode cancels an armed deadline; entering it cancels
/// a running one-shot count (TMCCT reads 0).
fn test_mode_switch() {
    if !tsc_deadline_supported() {
        report::skip(
            "timer-mode-switch-cancels",
            "no TSC-deadline timer in CPUID",
        );
        return;
    }
    let before = bsp(TIMER);
    cli();
    arm_tsc_deadline(rdtsc() + tsc_per_ms());
    lapic::write(reg::LVT_TIMER, u32::from(TIMER));
    poll_until(2 * ABSENT_US, || false);
    let from_deadline = bsp(TIMER) - before;

    let before = bsp(TIMER);
    lapic::write(reg::LVT_TIMER, u32::from(TIMER));
    lapic::write(reg::TIMER_INITIAL, lapic_ticks(1_000));
    lapic::write(
        reg::LVT_TIMER,
        u32::from(TIMER) | lapic::LVT_TIMER_TSC_DEADLINE,
    );
    let current = lapic::read(reg::TIMER_CURRENT);
    poll_until(2 * ABSENT_US, || false);
    let to_deadline = bsp(TIMER) - before;
    lapic::timer_stop();
    report::check_list(
        "timer-mode-switch-cancels",
        &[0, 0, 0],
        &[from_deadline, to_deadline, current.into()],
    );
}

/// TMCCT with the TSC at the read: the read is bracketed by two TSC reads
/// and the narrowest of a few brackets is kept, so a host preemption around
/// one read does not skew the rate. Returns (count, TSC midpoint).
fn timed_count() -> (u32, u64) {
    let mut best = (0, 0, u64::MAX);
    for _ in 0..8 {
        let before = rdtsc();
        let count = lapic::read(reg::TIMER_CURRENT);
        let width = rdtsc() - before;
        if width < best.2 {
            best = (count, before + width / 2, width);
        }
        if width < tsc_per_ms() / 20 {
            break;
        }
    }
    (best.0, best.1)
}

/// TMCCT counts and TSC ticks over about 4 ms at `divide`.
fn count_rate(divide: u32) -> (u64, u64) {
    lapic::write(reg::TIMER_DIVIDE, divide);
    lapic::write(reg::LVT_TIMER, lapic::LVT_MASKED);
    lapic::write(reg::TIMER_INITIAL, u32::MAX);
    let (c0, t0) = timed_count();
    delay_us(4_000);
    let (c1, t1) = timed_count();
    lapic::timer_stop();
    (u64::from(c0.wrapping_sub(c1)), t1 - t0)
}

/// The count runs 16 times faster at divide 1 than at divide 16 (±15 %).
fn test_divide() {
    let (d1, t1) = count_rate(DIVIDE_1);
    let (d16, t16) = count_rate(DIVIDE_16);
    // ratio x 100 = (d1 / t1) / (d16 / t16) x 100
    let ratio = (u128::from(d1) * u128::from(t16) * 100)
        .checked_div(u128::from(d16) * u128::from(t1))
        .unwrap_or(0) as u64;
    let ok = (1360..=1840).contains(&ratio);
    if ok {
        report::pass("timer-divide");
    } else {
        report::fail_line("timer-divide")
            .s("expected divide-1/divide-16 rate ratio 16.00 +-15%, got ")
            .u(ratio / 100)
            .s(".")
            .u(ratio % 100 / 10)
            .u(ratio % 10)
            .print();
    }
}

/// A masked timer still counts down but sets nothing in the IRR.
fn test_lvt_masked() {
    let before = bsp(TIMER);
    cli();
    lapic::write(reg::TIMER_DIVIDE, DIVIDE_16);
    lapic::write(reg::LVT_TIMER, u32::from(TIMER) | lapic::LVT_MASKED);
    lapic::write(reg::TIMER_INITIAL, lapic_ticks(200));
    poll_until(ABSENT_US, || false);
    let irr = lapic::vector_bit(reg::IRR, TIMER);
    let current = lapic::read(reg::TIMER_CURRENT);
    lapic::timer_stop();
    report::check_list(
        "lvt-timer-masked",
        &[0, 0, 0],
        &[bsp(TIMER) - before, irr.into(), current.into()],
    );
}

// ----- ESR and software disable -----------------------------------------------

/// A fixed IPI with vector 3 is not delivered and sets ESR bit 5 (send) or
/// 6 (receive), visible after the next ESR write; the write after that
/// latches nothing. An APIC that drops the IPI without recording the error
/// (KVM's) is reported as SKIP; delivering it is a FAIL.
fn test_esr() {
    let before = bsp(ILLEGAL);
    lapic::write(reg::ESR, 0);
    lapic::send_ipi(lapic::id(), Icr::fixed(ILLEGAL));
    wait_until(ABSENT_US, || false);
    lapic::write(reg::ESR, 0);
    let esr = lapic::read(reg::ESR);
    lapic::write(reg::ESR, 0);
    let esr2 = lapic::read(reg::ESR);
    Line::new()
        .s("# esr after an IPI with vector 3: ")
        .x(esr.into())
        .print();
    let illegal = lapic::ESR_SEND_ILLEGAL_VECTOR | lapic::ESR_RECEIVE_ILLEGAL_VECTOR;
    if esr == 0 && esr2 == 0 && bsp(ILLEGAL) == before {
        report::skip(
            "esr-illegal-vector",
            "the IPI was dropped but no illegal-vector error was recorded in ESR",
        );
        return;
    }
    report::check_list(
        "esr-illegal-vector",
        &[1, 0, 0],
        &[
            (esr & illegal != 0).into(),
            esr2.into(),
            bsp(ILLEGAL) - before,
        ],
    );
}

/// Clearing SVR bit 8 masks every LVT and keeps LVT writes masked, so the
/// timer interrupts nothing; re-enabling leaves the entries masked.
fn test_svr_disable() {
    let svr = lapic::read(reg::SVR);
    let before = bsp(TIMER);
    cli();
    lapic::write(reg::TIMER_DIVIDE, DIVIDE_16);
    lapic::write(reg::LVT_TIMER, u32::from(TIMER));
    lapic::write(reg::SVR, svr & !lapic::SVR_ENABLE);
    let masked = |v: u32| u64::from(v & lapic::LVT_MASKED != 0);
    let after_disable = masked(lapic::read(reg::LVT_TIMER));
    lapic::write(reg::LVT_TIMER, u32::from(TIMER));
    let after_write = masked(lapic::read(reg::LVT_TIMER));
    lapic::write(reg::TIMER_INITIAL, lapic_ticks(200));
    poll_until(ABSENT_US, || false);
    let fired = bsp(TIMER) - before;
    lapic::write(reg::SVR, svr);
    let after_enable = masked(lapic::read(reg::LVT_TIMER));
    lapic::timer_stop();
    report::check_list(
        "svr-disable-masks-lvt",
        &[1, 1, 0, 1],
        &[after_disable, after_write, fired, after_enable],
    );
}

// ----- x2APIC -----------------------------------------------------------------

const X2APIC_CHECKS: [&str; 9] = [
    "x2apic-enable",
    "x2apic-id",
    "x2apic-version",
    "x2apic-ldr",
    "x2apic-ldr-readonly",
    "x2apic-icr-self",
    "x2apic-icr-ap",
    "x2apic-self-ipi",
    "x2apic-logical",
];

fn x2apic_ldr(id: u32) -> u64 {
    u64::from(((id >> 4) << 16) | (1 << (id & 15)))
}

fn test_x2apic(boot: &Boot, have_ap: bool) {
    if !lapic::x2apic_supported() {
        for name in X2APIC_CHECKS {
            report::skip(name, "no x2APIC in CPUID");
        }
        return;
    }
    if !have_ap {
        for name in X2APIC_CHECKS {
            report::skip(name, "no AP online");
        }
        return;
    }
    let version = lapic::read(reg::VERSION);
    let ap_id = cpu::apic_id_of(1);
    if !lapic::is_x2apic() {
        Line::new()
            .s("# switching both CPUs to x2APIC mode")
            .print();
        if !ap_do(CMD_ENTER_X2APIC) {
            for name in X2APIC_CHECKS {
                report::fail(name, "AP did not answer");
            }
            return;
        }
        lapic::enter_x2apic_mode();
        lapic::set_mode(true);
    }
    let ap_read = ap_do(CMD_READ_X2APIC);
    let result = |i: usize| RESULT[i].load(Ordering::Relaxed);
    let mode = lapic::APIC_BASE_ENABLE | lapic::APIC_BASE_X2APIC;
    let bsp_base = rdmsr(lapic::IA32_APIC_BASE);
    report::check_list(
        "x2apic-enable",
        &[1, 1, 1],
        &[
            (bsp_base & mode == mode).into(),
            ap_read.into(),
            (result(2) & mode == mode).into(),
        ],
    );
    let bsp_id = rdmsr(X2_ID);
    report::check_list(
        "x2apic-id",
        &[boot.bsp_apic_id.into(), ap_id.into()],
        &[bsp_id, result(0)],
    );
    report::check_eq("x2apic-version", version.into(), rdmsr(X2_VERSION));
    let bsp_ldr = rdmsr(X2_LDR);
    report::check_list(
        "x2apic-ldr",
        &[x2apic_ldr(bsp_id as u32), x2apic_ldr(ap_id)],
        &[bsp_ldr, result(1)],
    );
    let write = cpu::try_wrmsr(X2_LDR, bsp_ldr ^ 1);
    report::check_list(
        "x2apic-ldr-readonly",
        &[13, bsp_ldr],
        &[write.err().map_or(0, |f| f.vector.into()), rdmsr(X2_LDR)],
    );

    // ICR as one 64-bit MSR: destination in bits 63:32.
    let base = (ap(X2_SELF), bsp(X2_SELF));
    wrmsr(X2_ICR, Icr::fixed(X2_SELF).to_self().0.into());
    let got = counts_after(X2_SELF, base, (0, 1));
    report::check_list("x2apic-icr-self", &[0, 1], &got);

    let base = (ap(X2_AP), bsp(X2_AP));
    let icr = (u64::from(ap_id) << 32) | u64::from(Icr::fixed(X2_AP).0);
    wrmsr(X2_ICR, icr);
    let read_back = rdmsr(X2_ICR) >> 32;
    let got = counts_after(X2_AP, base, (1, 0));
    report::check_list(
        "x2apic-icr-ap",
        &[1, 0, ap_id.into()],
        &[got[0], got[1], read_back],
    );

    let base = (ap(X2_SELF_IPI), bsp(X2_SELF_IPI));
    wrmsr(X2_SELF_IPI_MSR, X2_SELF_IPI.into());
    let got = counts_after(X2_SELF_IPI, base, (0, 1));
    report::check_list("x2apic-self-ipi", &[0, 1], &got);

    // Logical: the AP's own LDR (cluster 31:16, bitmap 15:0) as destination.
    let base = (ap(X2_LOGICAL), bsp(X2_LOGICAL));
    let icr = (result(1) << 32) | u64::from(Icr::fixed(X2_LOGICAL).logical().0);
    wrmsr(X2_ICR, icr);
    let got = counts_after(X2_LOGICAL, base, (1, 0));
    report::check_list("x2apic-logical", &[1, 0], &got);
}

/// (AP, BSP) counts of `vector` since `base`, once `want` is reached (or
/// after the bound) and a short quiet time.
fn counts_after(vector: u8, base: (u64, u64), want: (u64, u64)) -> [u64; 2] {
    let counts = || (ap(vector) - base.0, bsp(vector) - base.1);
    wait_until(TIMEOUT_US, || {
        let (a, b) = counts();
        a >= want.0 && b >= want.1
    });
    wait_until(ABSENT_US, || false);
    let (a, b) = counts();
    [a, b]
}
