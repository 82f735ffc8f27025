//! The MSI guest: how MSI address/data pairs are decoded into interrupts,
//! on two CPUs in xAPIC mode. Messages come from virq's MSI test device
//! (ports 0x2400-0x240F), which sends whatever address and data the guest
//! programs; without it (under QEMU) every check is skipped.
//!
//! Every check has its own vector, so the runtime's per-CPU interrupt
//! counters tell the checks and the CPUs apart. Waits are bounded; a wrong
//! extra or misrouted interrupt gets `SETTLE_US` to show up.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use guest_runtime::cpu::{self, InterruptFrame};
use guest_runtime::lapic::{self, reg, Icr};
use guest_runtime::msi::{self, Address, Data};
use guest_runtime::serial::Line;
use guest_runtime::time::wait_until;
use guest_runtime::{arch, entry, report, smp, Boot};

const NMI: u8 = 2;
/// An illegal vector (below 16) for the illegal-vector check.
const ILLEGAL: u8 = 3;
const V_PHYS_BSP: u8 = 0x50;
const V_PHYS_AP: u8 = 0x51;
const V_BROADCAST: u8 = 0x52;
const V_LOGICAL_AP: u8 = 0x53;
const V_LOGICAL_BOTH: u8 = 0x54;
/// Four consecutive vectors for lowest-priority rounds.
const V_LOWEST: u8 = 0x58;
/// Odd: KVM's vector hash picks the second CPU of a two-CPU set.
const V_LOWEST_TPR_AP: u8 = 0x61;
/// Even: KVM's vector hash picks the first CPU of a two-CPU set.
const V_LOWEST_TPR_BSP: u8 = 0x62;
/// Even, with the BSP at the higher priority: the pick depends on the model.
const V_LOWEST_TPR_EITHER: u8 = 0x64;
/// Put in the vector field of an NMI message, which must ignore it.
const V_NMI_FIELD: u8 = 0x70;
const V_EDGE: u8 = 0x71;
const V_LEVEL: u8 = 0x72;
const V_DEASSERT: u8 = 0x73;
const V_REMAP: u8 = 0x74;
const V_REMAP_CONTROL: u8 = 0x75;
/// Four consecutive vectors for fixed messages with the redirection hint.
const V_HINT: u8 = 0x78;
const V_OUTSIDE: u8 = 0x7C;
/// Wakes the AP to run a command.
const V_WAKE: u8 = 0x7F;

/// Bound for any wait that should succeed; a pass takes far less.
const TIMEOUT_US: u64 = 300_000;
/// How long a wrong extra or misrouted delivery gets to show up.
const SETTLE_US: u64 = 2_000;
/// Flat logical IDs: bit n for CPU n.
const LOGICAL_BSP: u8 = 1 << 0;
const LOGICAL_AP: u8 = 1 << 1;
/// TPR that blocks nothing this guest sends (class 3 < every vector's 5+)
/// but makes a CPU the higher-priority one in lowest-priority arbitration.
const BUSY_TPR: u32 = 0x30;
const NO_TESTDEV: &str = "no MSI test device at port 0x2400 (not virq)";
const XAPIC_ONLY: &str = "the APICs run in x2APIC mode; flat logical destinations are xAPIC only";
const NONE: u32 = u32::MAX;

static AP_READY: AtomicBool = AtomicBool::new(false);
/// TPR the AP is to load (NONE = no command); the AP sets it back to NONE.
static AP_TPR: AtomicU32 = AtomicU32::new(NONE);
/// TMR bit of the vector seen by `tmr_handler` (0 none yet, 1 clear, 2 set).
static TMR_SEEN: AtomicU8 = AtomicU8::new(0);

fn nothing(_: &mut InterruptFrame) {}

/// Records whether the running vector's TMR bit is set (level-triggered).
fn tmr_handler(frame: &mut InterruptFrame) {
    let level = lapic::vector_bit(0x180, frame.vector as u8);
    TMR_SEEN.store(if level { 2 } else { 1 }, Ordering::Release);
}

/// Per-check context.
struct Ctx {
    bsp: u8,
    /// The AP's APIC ID, if it came up.
    ap: Option<u8>,
    /// Why AP checks cannot run; with two CPUs configured that is a failure.
    no_ap: &'static str,
    two_cpus: bool,
}

impl Ctx {
    fn ap_or_report(&self, names: &[&str]) -> Option<u8> {
        if self.ap.is_none() {
            for name in names {
                if self.two_cpus {
                    report::fail(name, self.no_ap);
                } else {
                    report::skip(name, self.no_ap);
                }
            }
        }
        self.ap
    }
}

fn counts(vector: u8) -> [u64; 2] {
    [cpu::count(0, vector).into(), cpu::count(1, vector).into()]
}

fn delta(vector: u8, before: [u64; 2]) -> [u64; 2] {
    let now = counts(vector);
    [now[0] - before[0], now[1] - before[1]]
}

fn settle() {
    wait_until(SETTLE_US, || false);
}

/// Sends one MSI, waits for `expected` deliveries of `vector` in all (or
/// just the settle time for 0), then gives extra ones time to show up.
/// Returns the deliveries per CPU: [BSP, AP].
fn deliver(address: Address, data: Data, vector: u8, expected: u64) -> [u64; 2] {
    let before = counts(vector);
    msi::send(address, data);
    if expected > 0 {
        wait_until(TIMEOUT_US, || {
            let d = delta(vector, before);
            d[0] + d[1] >= expected
        });
    }
    settle();
    delta(vector, before)
}

/// Has the AP load `tpr` into its TPR; false if it did not answer.
fn set_ap_tpr(ap: u8, tpr: u32) -> bool {
    AP_TPR.store(tpr, Ordering::Release);
    lapic::send_ipi(ap.into(), Icr::fixed(V_WAKE));
    wait_until(TIMEOUT_US, || AP_TPR.load(Ordering::Acquire) == NONE)
}

fn main(boot: &'static Boot) -> ! {
    Line::new()
        .s("# msi guest: tables=")
        .s(boot.platform.source)
        .s(" cpus=")
        .u(boot.platform.cpu_count as u64)
        .s(" bsp-apic=")
        .u(boot.bsp_apic_id.into())
        .s(if lapic::is_x2apic() {
            " x2apic"
        } else {
            " xapic"
        })
        .print();
    cpu::set_handler(NMI, nothing);
    cpu::set_handler(ILLEGAL, nothing);
    if !msi::testdev_present() {
        for name in CHECKS {
            report::skip(name, NO_TESTDEV);
        }
        report::finish()
    }
    lapic::set_logical_flat(LOGICAL_BSP);
    let (ap, no_ap) = start_ap(boot);
    let ctx = Ctx {
        bsp: boot.bsp_apic_id as u8,
        ap,
        no_ap,
        two_cpus: boot.platform.cpu_count >= 2,
    };
    physical(&ctx);
    broadcast(&ctx);
    logical_flat(&ctx);
    lowest_priority(&ctx);
    lowest_priority_tpr(&ctx);
    nmi(&ctx);
    edge_once(&ctx);
    level_trigger(&ctx);
    illegal_vector(&ctx);
    remappable(&ctx);
    redirection_hint(&ctx);
    outside_window(&ctx);
    report::finish()
}

entry!(main);

/// Every check, in order (all skipped without the test device).
const CHECKS: [&str; 16] = [
    "physical-bsp",
    "physical-ap",
    "physical-broadcast",
    "logical-flat-ap",
    "logical-flat-both",
    "lowest-priority-one-of-set",
    "lowest-priority-tpr",
    "nmi-delivery",
    "nmi-ignores-vector",
    "edge-once",
    "level-assert-each-once",
    "level-deassert-delivered",
    "illegal-vector",
    "remappable-rejected",
    "redirection-hint-one-of-set",
    "non-interrupt-address",
];

fn start_ap(boot: &Boot) -> (Option<u8>, &'static str) {
    match smp::start_first_ap(&boot.platform, ap_main, &AP_READY, TIMEOUT_US) {
        Ok(apic_id) => (Some(apic_id as u8), ""),
        Err(why) => (None, why),
    }
}

/// The AP takes interrupts and loads the TPR it is told to.
fn ap_main(index: usize) -> ! {
    lapic::set_logical_flat(1 << index);
    AP_READY.store(true, Ordering::Release);
    loop {
        arch::cli();
        let tpr = AP_TPR.load(Ordering::Acquire);
        if tpr != NONE {
            lapic::write(reg::TPR, tpr);
            AP_TPR.store(NONE, Ordering::Release);
        }
        arch::sti_hlt();
    }
}

/// Fixed, physical destination: exactly the addressed CPU.
fn physical(ctx: &Ctx) {
    let got = deliver(
        Address::physical(ctx.bsp),
        Data::fixed(V_PHYS_BSP),
        V_PHYS_BSP,
        1,
    );
    report::check_list("physical-bsp", &[1, 0], &got);
    if let Some(ap) = ctx.ap_or_report(&["physical-ap"]) {
        let got = deliver(Address::physical(ap), Data::fixed(V_PHYS_AP), V_PHYS_AP, 1);
        report::check_list("physical-ap", &[0, 1], &got);
    }
}

/// Physical destination 0xFF (xAPIC broadcast): one each.
fn broadcast(ctx: &Ctx) {
    const NAME: &str = "physical-broadcast";
    if lapic::is_x2apic() {
        report::skip(
            NAME,
            "0xFF is the xAPIC broadcast; the APICs run in x2APIC mode",
        );
        return;
    }
    if ctx.ap_or_report(&[NAME]).is_none() {
        return;
    }
    let got = deliver(
        Address::physical(0xFF),
        Data::fixed(V_BROADCAST),
        V_BROADCAST,
        2,
    );
    report::check_list(NAME, &[1, 1], &got);
}

/// Flat logical IDs 1 (BSP) and 2 (AP): mask 2 reaches the AP only, 3 both.
fn logical_flat(ctx: &Ctx) {
    const NAMES: [&str; 2] = ["logical-flat-ap", "logical-flat-both"];
    if lapic::is_x2apic() {
        NAMES.iter().for_each(|n| report::skip(n, XAPIC_ONLY));
        return;
    }
    if ctx.ap_or_report(&NAMES).is_none() {
        return;
    }
    let got = deliver(
        Address::logical(LOGICAL_AP),
        Data::fixed(V_LOGICAL_AP),
        V_LOGICAL_AP,
        1,
    );
    report::check_list(NAMES[0], &[0, 1], &got);
    let got = deliver(
        Address::logical(LOGICAL_AP | LOGICAL_BSP),
        Data::fixed(V_LOGICAL_BOTH),
        V_LOGICAL_BOTH,
        2,
    );
    report::check_list(NAMES[1], &[1, 1], &got);
}

/// Lowest priority to the logical set of both CPUs at equal priority: each
/// of four messages reaches exactly one CPU.
fn lowest_priority(ctx: &Ctx) {
    const NAME: &str = "lowest-priority-one-of-set";
    if lapic::is_x2apic() {
        report::skip(NAME, XAPIC_ONLY);
        return;
    }
    if ctx.ap_or_report(&[NAME]).is_none() {
        return;
    }
    let mut per_message = [0u64; 4];
    let mut totals = [0u64; 2];
    for (i, total) in per_message.iter_mut().enumerate() {
        let v = V_LOWEST + i as u8;
        let got = deliver(
            Address::logical(LOGICAL_AP | LOGICAL_BSP),
            Data::lowest_priority(v),
            v,
            1,
        );
        *total = got[0] + got[1];
        totals = [totals[0] + got[0], totals[1] + got[1]];
    }
    Line::new()
        .s("# lowest priority, equal TPRs: bsp=")
        .u(totals[0])
        .s(" ap=")
        .u(totals[1])
        .print();
    report::check_list(NAME, &[1, 1, 1, 1], &per_message);
}

/// Lowest priority with different TPRs. The reference allows the lowest
/// PPR or KVM's vector-hash pick (vector modulo the set's size, in logical
/// ID order); the first two messages are chosen so both rules name the same
/// CPU, the lower-priority one. The third (BSP busier, even vector) is
/// where they disagree: it must reach exactly one CPU, either.
fn lowest_priority_tpr(ctx: &Ctx) {
    const NAME: &str = "lowest-priority-tpr";
    if lapic::is_x2apic() {
        report::skip(NAME, XAPIC_ONLY);
        return;
    }
    let Some(ap) = ctx.ap_or_report(&[NAME]) else {
        return;
    };
    let both = Address::logical(LOGICAL_AP | LOGICAL_BSP);
    let mut got = [0u64; 5];
    // The BSP is busier: the AP has the lower priority.
    lapic::write(reg::TPR, BUSY_TPR);
    let a = deliver(
        both,
        Data::lowest_priority(V_LOWEST_TPR_AP),
        V_LOWEST_TPR_AP,
        1,
    );
    let c = deliver(
        both,
        Data::lowest_priority(V_LOWEST_TPR_EITHER),
        V_LOWEST_TPR_EITHER,
        1,
    );
    lapic::write(reg::TPR, 0);
    // The AP is busier: the BSP has the lower priority.
    let answered = set_ap_tpr(ap, BUSY_TPR);
    let b = deliver(
        both,
        Data::lowest_priority(V_LOWEST_TPR_BSP),
        V_LOWEST_TPR_BSP,
        1,
    );
    let reset = set_ap_tpr(ap, 0);
    if !answered || !reset {
        report::fail(NAME, "the AP did not load its TPR");
        return;
    }
    got[..2].copy_from_slice(&a);
    got[2..4].copy_from_slice(&b);
    got[4] = c[0] + c[1];
    Line::new()
        .s("# lowest priority, BSP TPR 0x30, vector 0x64: bsp=")
        .u(c[0])
        .s(" ap=")
        .u(c[1])
        .s(if c[1] == 1 {
            " (lowest PPR)"
        } else {
            " (vector hash)"
        })
        .print();
    report::check_list(NAME, &[0, 1, 1, 0, 1], &got);
}

/// NMI delivery mode (data bits 10:8 = 4) to the AP: one NMI there, none on
/// the BSP, and the vector field is not delivered as an interrupt.
fn nmi(ctx: &Ctx) {
    const NAMES: [&str; 2] = ["nmi-delivery", "nmi-ignores-vector"];
    let Some(ap) = ctx.ap_or_report(&NAMES) else {
        return;
    };
    let field_before = counts(V_NMI_FIELD);
    let got = deliver(Address::physical(ap), Data::nmi(V_NMI_FIELD), NMI, 1);
    report::check_list(NAMES[0], &[0, 1], &got);
    report::check_list(NAMES[1], &[0, 0], &delta(V_NMI_FIELD, field_before));
}

/// An edge-triggered fixed MSI arrives once, with its TMR bit clear.
fn edge_once(ctx: &Ctx) {
    cpu::set_handler(V_EDGE, tmr_handler);
    TMR_SEEN.store(0, Ordering::Release);
    let got = deliver(Address::physical(ctx.bsp), Data::fixed(V_EDGE), V_EDGE, 1);
    let tmr = TMR_SEEN.load(Ordering::Acquire);
    // The last column: 1 = the TMR bit was clear in the handler.
    report::check_list("edge-once", &[1, 0, 1], &[got[0], got[1], tmr.into()]);
}

/// Level-triggered fixed MSIs (data bit 15). Two asserting messages (bit
/// 14 set) each arrive once, with the vector's TMR bit set: the first one's
/// EOI leaves nothing behind that would hold the second back or deliver it
/// again (an MSI has no remote IRR), and afterwards the vector is neither
/// pending nor in service. A de-asserting message (bit 14 clear) is
/// delivered once too: KVM sets the level of every MSI it signals, and
/// virq's LAPIC, like KVM's, reads no level for fixed delivery.
fn level_trigger(ctx: &Ctx) {
    cpu::set_handler(V_LEVEL, tmr_handler);
    TMR_SEEN.store(0, Ordering::Release);
    let level = Data::fixed(V_LEVEL).level(true);
    let first = deliver(Address::physical(ctx.bsp), level, V_LEVEL, 1);
    let second = deliver(Address::physical(ctx.bsp), level, V_LEVEL, 1);
    let stuck = lapic::vector_bit(reg::IRR, V_LEVEL) || lapic::in_service(V_LEVEL);
    let tmr = TMR_SEEN.load(Ordering::Acquire);
    // The last column: 2 = the TMR bit was set in the handler.
    report::check_list(
        "level-assert-each-once",
        &[1, 0, 1, 0, 0, 2],
        &[
            first[0],
            first[1],
            second[0],
            second[1],
            stuck.into(),
            tmr.into(),
        ],
    );
    let got = deliver(
        Address::physical(ctx.bsp),
        Data::fixed(V_DEASSERT).level(false),
        V_DEASSERT,
        1,
    );
    report::check_list("level-deassert-delivered", &[1, 0], &got);
}

/// A fixed MSI with vector 3 is not delivered; the receiving LAPIC sets
/// ESR bit 6 (received illegal vector), seen after the next ESR write. An
/// APIC that drops it without recording the error is reported as SKIP.
fn illegal_vector(ctx: &Ctx) {
    const NAME: &str = "illegal-vector";
    lapic::write(reg::ESR, 0);
    let _ = lapic::read(reg::ESR);
    let got = deliver(Address::physical(ctx.bsp), Data::fixed(ILLEGAL), ILLEGAL, 0);
    lapic::write(reg::ESR, 0);
    let esr = lapic::read(reg::ESR);
    Line::new()
        .s("# esr after an MSI with vector 3: ")
        .x(esr.into())
        .print();
    let received = u64::from(esr & lapic::ESR_RECEIVE_ILLEGAL_VECTOR != 0);
    if received == 0 && got == [0, 0] {
        report::skip(
            NAME,
            "the MSI was dropped but no received-illegal-vector error was recorded in ESR",
        );
        return;
    }
    report::check_list(NAME, &[0, 0, 1], &[got[0], got[1], received]);
}

/// A remappable-format MSI (address bit 4) without an IOMMU is rejected;
/// the same message without bit 4 is then delivered.
fn remappable(ctx: &Ctx) {
    let rejected = deliver(
        Address::physical(ctx.bsp).remappable(),
        Data::fixed(V_REMAP),
        V_REMAP,
        0,
    );
    let control = deliver(
        Address::physical(ctx.bsp),
        Data::fixed(V_REMAP_CONTROL),
        V_REMAP_CONTROL,
        1,
    );
    report::check_list(
        "remappable-rejected",
        &[0, 0, 1, 0],
        &[rejected[0], rejected[1], control[0], control[1]],
    );
}

/// A fixed message with the redirection hint (address bit 3) to the logical
/// set of both CPUs is delivered as lowest priority, to one of them (KVM
/// and virq's decoder treat the hint so); without the hint the same
/// message reaches both (logical-flat-both).
fn redirection_hint(ctx: &Ctx) {
    const NAME: &str = "redirection-hint-one-of-set";
    if lapic::is_x2apic() {
        report::skip(NAME, XAPIC_ONLY);
        return;
    }
    if ctx.ap_or_report(&[NAME]).is_none() {
        return;
    }
    let mut per_message = [0u64; 4];
    for (i, total) in per_message.iter_mut().enumerate() {
        let v = V_HINT + i as u8;
        let got = deliver(
            Address::logical(LOGICAL_AP | LOGICAL_BSP).redirection_hint(),
            Data::fixed(v),
            v,
            1,
        );
        *total = got[0] + got[1];
    }
    report::check_list(NAME, &[1, 1, 1, 1], &per_message);
}

/// A message whose address is outside 0xFEEx_xxxx (here 0xFEFx_xxxx, the
/// BSP's ID in bits 19:12) is no interrupt: nothing is delivered.
fn outside_window(ctx: &Ctx) {
    let got = deliver(
        Address(Address::physical(ctx.bsp).0 | 1 << 20),
        Data::fixed(V_OUTSIDE),
        V_OUTSIDE,
        0,
    );
    report::check_list("non-interrupt-address", &[0, 0], &got);
}
