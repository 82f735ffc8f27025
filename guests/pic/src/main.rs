//! The PIC guest: the 8259A pair as the guest sees it, reached through the
//! BSP's LAPIC LINT0 in ExtINT mode (virtual wire), on one CPU.
//!
//! The guest sets LVT0 to ExtINT itself and re-initialises both PICs with
//! its own vector bases (master 0x60, slave 0x68). Interrupt sources are
//! pc-testdev lines (a byte write to port 0x2000 + n sets GSI n's level;
//! GSI 0-15 reach the PIC and the IOAPIC, whose pins stay masked). Only lines
//! no device drives are used: 3, 5, 6, 7 on the master, 10, 11, 15 on the
//! slave. The dispatcher's automatic EOI is turned off for the guest's
//! vectors: every check sends the EOIs it means to send.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU16, AtomicU32, AtomicU8, Ordering};
use guest_runtime::cpu::{self, InterruptFrame};
use guest_runtime::serial::Line;
use guest_runtime::time::wait_until;
use guest_runtime::{arch, entry, lapic, pic, report, testdev_set_irq, Boot};

const MASTER_BASE: u8 = 0x60;
const SLAVE_BASE: u8 = 0x68;
/// The base the vector-base check programs (ICW2 0x7B: bits 2:0 ignored).
const OTHER_ICW2: u8 = 0x7B;
const OTHER_BASE: u8 = 0x78;

const LVT0: u32 = 0x350;
const LVT_EXTINT: u32 = 7 << 8;

/// Bound for any wait that should succeed; a pass takes far less.
const TIMEOUT_US: u64 = 300_000;
/// How long a wrong (extra or early) delivery gets to show up.
const SETTLE_US: u64 = 2_000;

/// IMR with only the cascade open: the lines a check uses are opened by it.
const ALL_MASKED: u16 = !(1 << 2);

/// What the handler does after logging a call.
const EOI_NONE: u8 = 0;
const EOI_NONSPECIFIC: u8 = 1;
const EOI_ROTATE: u8 = 2;

const LOG_LEN: usize = 8;
static LOG: [AtomicU8; LOG_LEN] = [const { AtomicU8::new(0) }; LOG_LEN];
/// ISR of both chips (bit n = IRQ n) at the start of each logged call.
static ISR_AT: [AtomicU16; LOG_LEN] = [const { AtomicU16::new(0) }; LOG_LEN];
static CALLS: AtomicU32 = AtomicU32::new(0);
static EOI_MODE: AtomicU8 = AtomicU8::new(EOI_NONE);
/// Lower this line (0xFF = none) on call `LOWER_ON` (1-based).
static LOWER_LINE: AtomicU8 = AtomicU8::new(0xFF);
static LOWER_ON: AtomicU32 = AtomicU32::new(0);

/// The handler of every PIC vector the guest programs.
fn pic_handler(frame: &mut InterruptFrame) {
    let vector = frame.vector as u8;
    let call = CALLS.fetch_add(1, Ordering::AcqRel) as usize;
    if call < LOG_LEN {
        LOG[call].store(vector, Ordering::Relaxed);
        ISR_AT[call].store(pic::isr(), Ordering::Relaxed);
    }
    if call as u32 + 1 == LOWER_ON.load(Ordering::Relaxed) {
        testdev_set_irq(LOWER_LINE.load(Ordering::Relaxed), false);
    }
    let slave = vector & 0xF8 == SLAVE_BASE;
    match EOI_MODE.load(Ordering::Relaxed) {
        EOI_NONSPECIFIC => {
            if slave {
                pic::nonspecific_eoi(true);
            }
            pic::nonspecific_eoi(false);
        }
        EOI_ROTATE => pic::rotate_nonspecific_eoi(slave),
        _ => {}
    }
}

/// Resets the log and sets the handler's EOI behaviour.
fn arm(eoi: u8) {
    EOI_MODE.store(eoi, Ordering::Relaxed);
    LOWER_ON.store(0, Ordering::Relaxed);
    LOWER_LINE.store(0xFF, Ordering::Relaxed);
    for l in &LOG {
        l.store(0, Ordering::Relaxed);
    }
    CALLS.store(0, Ordering::Release);
}

fn calls() -> u32 {
    CALLS.load(Ordering::Acquire)
}

fn logged(i: usize) -> u8 {
    LOG[i].load(Ordering::Relaxed)
}

fn isr_at(i: usize) -> u16 {
    ISR_AT[i].load(Ordering::Relaxed)
}

fn settle() {
    wait_until(SETTLE_US, || false);
}

fn pulse(line: u8) {
    testdev_set_irq(line, true);
    testdev_set_irq(line, false);
}

fn open(lines: u16) {
    pic::set_imr(ALL_MASKED & !lines);
}

/// The guest's standard set-up: bases 0x60/0x68, normal EOI, every line but
/// the cascade masked, all lines edge, default priorities.
fn reinit() {
    pic::init_with(MASTER_BASE, SLAVE_BASE, pic::ICW4_8086, pic::ICW4_8086);
    pic::set_imr(ALL_MASKED);
}

/// Ends a check: lines low, everything masked and out of service.
fn cleanup() {
    arch::cli();
    for line in [3, 5, 6, 7, 10, 11, 15] {
        testdev_set_irq(line, false);
    }
    pic::set_imr(ALL_MASKED);
    for _ in 0..8 {
        pic::nonspecific_eoi(true);
        pic::nonspecific_eoi(false);
    }
    pic::set_elcr(0);
    arm(EOI_NONE);
}

fn fail2(name: &str, what: &str, a: u64, b: u64) {
    report::fail_line(name)
        .s(what)
        .s(", got ")
        .x(a)
        .s(" and ")
        .x(b)
        .print();
}

fn main(_boot: &'static Boot) -> ! {
    for v in MASTER_BASE..SLAVE_BASE + 8 {
        cpu::set_handler(v, pic_handler);
        cpu::set_auto_eoi(v, false);
    }
    for v in OTHER_BASE..OTHER_BASE + 8 {
        cpu::set_handler(v, pic_handler);
        cpu::set_auto_eoi(v, false);
    }
    arch::cli();
    pic::set_elcr(0);
    lapic::write(LVT0, LVT_EXTINT);
    Line::new()
        .s("# pic guest: lvt0=")
        .x(u64::from(lapic::read(LVT0)))
        .s(" elcr=")
        .x(u64::from(pic::elcr()))
        .print();

    init_sequence();
    extint_lint0();
    extint_tpr();
    vector_base();
    read_irr_isr();
    elcr_masks();
    edge_line();
    level_line();
    level_irr_follows_line();
    init_keeps_levels();
    imr_masking();
    priority_order();
    set_priority();
    rotate_on_eoi();
    specific_eoi();
    nonspecific_eoi();
    auto_eoi();
    let kvm_pic = poll_command();
    special_mask(kvm_pic);
    slave_cascade();
    special_fully_nested();
    spurious_irq7();
    spurious_irq15();
    cleanup();
    report::finish()
}

entry!(main);

/// ICW1 clears IMR; OCW1 writes read back on both chips.
fn init_sequence() {
    pic::set_imr(0xFFFF);
    pic::init_with(MASTER_BASE, SLAVE_BASE, pic::ICW4_8086, pic::ICW4_8086);
    let after_icw = pic::imr();
    pic::set_imr(0x5AA5);
    let written = pic::imr();
    pic::set_imr(ALL_MASKED);
    report::check_eq("init-icw1-clears-imr", 0, after_icw.into());
    report::check_eq("init-imr-readback", 0x5AA5, written.into());
}

/// An edge on line 3 arrives through LINT0 (ExtINT) with master base + 3.
fn extint_lint0() {
    arm(EOI_NONSPECIFIC);
    open(1 << 3);
    pulse(3);
    wait_until(TIMEOUT_US, || calls() >= 1);
    settle();
    let (n, v) = (calls(), logged(0));
    cleanup();
    if n == 1 && v == MASTER_BASE + 3 {
        report::pass("extint-lint0");
    } else {
        fail2(
            "extint-lint0",
            "expected 1 interrupt with vector 0x63",
            n.into(),
            v.into(),
        );
    }
}

/// ExtINT is not held back by a TPR above its vector's class.
fn extint_tpr() {
    arm(EOI_NONSPECIFIC);
    lapic::write(lapic::reg::TPR, 0xD0);
    open(1 << 5);
    pulse(5);
    // The watchdog (0xE0) still gets through TPR 0xD0.
    wait_until(TIMEOUT_US, || calls() >= 1);
    lapic::write(lapic::reg::TPR, 0);
    let (n, v) = (calls(), logged(0));
    cleanup();
    if n == 1 && v == MASTER_BASE + 5 {
        report::pass("extint-bypasses-tpr");
    } else {
        fail2(
            "extint-bypasses-tpr",
            "expected 1 interrupt with vector 0x65 at TPR 0xD0",
            n.into(),
            v.into(),
        );
    }
}

/// ICW2 sets the vector base (its low 3 bits are ignored).
fn vector_base() {
    pic::init_with(OTHER_ICW2, SLAVE_BASE, pic::ICW4_8086, pic::ICW4_8086);
    pic::set_imr(ALL_MASKED);
    arm(EOI_NONSPECIFIC);
    open(1 << 5);
    pulse(5);
    wait_until(TIMEOUT_US, || calls() >= 1);
    let (n, v) = (calls(), logged(0));
    cleanup();
    reinit();
    if n == 1 && v == OTHER_BASE + 5 {
        report::pass("init-vector-base");
    } else {
        fail2(
            "init-vector-base",
            "expected 1 interrupt with vector 0x7D after ICW2 0x7B",
            n.into(),
            v.into(),
        );
    }
}

/// OCW3 reads: a latched edge shows in IRR, moves to ISR when taken, and
/// leaves ISR on EOI.
fn read_irr_isr() {
    arm(EOI_NONE);
    open(1 << 3);
    pulse(3);
    let before = (pic::irr() & (1 << 3), pic::isr() & (1 << 3));
    wait_until(TIMEOUT_US, || calls() >= 1);
    let taken = (pic::irr() & (1 << 3), pic::isr() & (1 << 3));
    pic::nonspecific_eoi(false);
    let after = pic::isr() & (1 << 3);
    cleanup();
    let got = [before.0, before.1, taken.0, taken.1, after].map(u64::from);
    report::check_list("ocw3-read-irr-isr", &[8, 0, 0, 8, 0], &got);
}

/// ELCR bits read back; IRQ 0, 1, 2, 8, 13 stay edge.
fn elcr_masks() {
    pic::set_elcr(0xFFFF);
    let all = pic::elcr();
    pic::set_elcr(1 << 5 | 1 << 10);
    let some = pic::elcr();
    pic::set_elcr(0);
    let none = pic::elcr();
    report::check_list(
        "elcr-readback",
        &[0xDEF8, 0x0420, 0],
        &[all.into(), some.into(), none.into()],
    );
}

/// An edge line held high is delivered once: the EOI does not redeliver it.
fn edge_line() {
    arm(EOI_NONSPECIFIC);
    open(1 << 3);
    testdev_set_irq(3, true);
    wait_until(TIMEOUT_US, || calls() >= 1);
    settle();
    let n = calls();
    cleanup();
    report::check_eq("edge-line-once", 1, n.into());
}

/// A level line (ELCR) that stays high is delivered again after each EOI;
/// the handler lowers it on the 2nd call, so exactly 2 interrupts.
fn level_line() {
    arm(EOI_NONSPECIFIC);
    LOWER_LINE.store(5, Ordering::Relaxed);
    LOWER_ON.store(2, Ordering::Relaxed);
    pic::set_elcr(1 << 5);
    open(1 << 5);
    testdev_set_irq(5, true);
    wait_until(TIMEOUT_US, || calls() >= 2);
    settle();
    let n = calls();
    cleanup();
    report::check_eq("level-line-redelivered", 2, n.into());
}

/// A level line's IRR bit follows the line: the acknowledge leaves it set
/// while the line is high, and it clears when the line drops.
fn level_irr_follows_line() {
    arm(EOI_NONE);
    pic::set_elcr(1 << 5);
    open(1 << 5);
    testdev_set_irq(5, true);
    wait_until(TIMEOUT_US, || calls() >= 1);
    let taken = (pic::irr() & (1 << 5), pic::isr() & (1 << 5));
    testdev_set_irq(5, false);
    let dropped = pic::irr() & (1 << 5);
    let n = calls();
    cleanup();
    let got = [n, taken.0.into(), taken.1.into(), dropped.into()].map(u64::from);
    report::check_list("level-irr-follows-line", &[1, 1 << 5, 1 << 5, 0], &got);
}

/// ICW1 drops a pending edge request and keeps a level one that is still
/// asserted.
fn init_keeps_levels() {
    arm(EOI_NONE);
    pic::set_elcr(1 << 5);
    testdev_set_irq(5, true);
    pulse(3);
    let before = pic::irr() & (1 << 3 | 1 << 5);
    reinit();
    let after = pic::irr() & (1 << 3 | 1 << 5);
    cleanup();
    report::check_list(
        "init-keeps-level-drops-edge",
        &[1 << 3 | 1 << 5, 1 << 5],
        &[before.into(), after.into()],
    );
}

/// A masked edge stays in IRR without an interrupt and is delivered once on
/// unmask.
fn imr_masking() {
    arm(EOI_NONSPECIFIC);
    pulse(6);
    arch::sti();
    settle();
    let held = calls();
    let irr = pic::irr() & (1 << 6);
    open(1 << 6);
    wait_until(TIMEOUT_US, || calls() >= 1);
    settle();
    let n = calls();
    cleanup();
    report::check_list(
        "imr-masked-held-in-irr",
        &[0, 1 << 6, 1],
        &[held.into(), irr.into(), n.into()],
    );
}

/// Requests raised while IF = 0 are taken in priority order: 0, 1, the
/// cascade (slave 8-15), then 3-7. Raised here as 7, 5, 10, 3.
fn priority_order() {
    arm(EOI_NONSPECIFIC);
    open(1 << 3 | 1 << 5 | 1 << 7 | 1 << 10);
    for line in [7, 5, 10, 3] {
        pulse(line);
    }
    wait_until(TIMEOUT_US, || calls() >= 4);
    settle();
    let got = [0, 1, 2, 3, 4].map(|i| u64::from(logged(i)));
    cleanup();
    report::check_list("priority-order", &[0x6A, 0x63, 0x65, 0x67, 0], &got);
}

/// Set priority (OCW2 0xC4: IRQ 4 lowest, so 5 highest): 6 before 3.
fn set_priority() {
    arm(EOI_NONSPECIFIC);
    pic::set_lowest_priority(false, 4);
    open(1 << 3 | 1 << 6);
    pulse(3);
    pulse(6);
    wait_until(TIMEOUT_US, || calls() >= 2);
    let got = [0, 1].map(|i| u64::from(logged(i)));
    cleanup();
    pic::set_lowest_priority(false, 7);
    report::check_list("set-priority", &[0x66, 0x63], &got);
}

/// Rotate on non-specific EOI: after IRQ 5 is ended that way it becomes the
/// lowest, so 6 outranks 3.
fn rotate_on_eoi() {
    arm(EOI_ROTATE);
    open(1 << 3 | 1 << 5 | 1 << 6);
    pulse(5);
    wait_until(TIMEOUT_US, || calls() >= 1);
    arch::cli();
    arm(EOI_NONSPECIFIC);
    pulse(3);
    pulse(6);
    wait_until(TIMEOUT_US, || calls() >= 2);
    let got = [0, 1].map(|i| u64::from(logged(i)));
    cleanup();
    pic::set_lowest_priority(false, 7);
    report::check_list("rotate-on-nonspecific-eoi", &[0x66, 0x63], &got);
}

/// Puts 6 and then 3 in service (no EOI in the handler); returns the ISR.
fn three_and_six_in_service() -> u16 {
    arm(EOI_NONE);
    open(1 << 3 | 1 << 6);
    pulse(6);
    wait_until(TIMEOUT_US, || calls() >= 1);
    pulse(3);
    wait_until(TIMEOUT_US, || calls() >= 2);
    pic::isr() & (1 << 3 | 1 << 6)
}

/// A specific EOI clears the named ISR bit (6), not the highest (3).
fn specific_eoi() {
    let both = three_and_six_in_service();
    pic::specific_eoi(false, 6);
    let after = pic::isr() & (1 << 3 | 1 << 6);
    cleanup();
    report::check_list("specific-eoi", &[0x48, 0x08], &[both.into(), after.into()]);
}

/// A non-specific EOI clears the highest-priority ISR bit (3), then 6.
fn nonspecific_eoi() {
    let both = three_and_six_in_service();
    pic::nonspecific_eoi(false);
    let first = pic::isr() & (1 << 3 | 1 << 6);
    pic::nonspecific_eoi(false);
    let second = pic::isr() & (1 << 3 | 1 << 6);
    cleanup();
    report::check_list(
        "nonspecific-eoi",
        &[0x48, 0x40, 0],
        &[both.into(), first.into(), second.into()],
    );
}

/// ICW4 auto-EOI: the ISR bit is never set, in the handler or after.
fn auto_eoi() {
    pic::init_with(
        MASTER_BASE,
        SLAVE_BASE,
        pic::ICW4_8086 | pic::ICW4_AUTO_EOI,
        pic::ICW4_8086,
    );
    pic::set_imr(ALL_MASKED);
    arm(EOI_NONE);
    open(1 << 3);
    pulse(3);
    wait_until(TIMEOUT_US, || calls() >= 1);
    let (n, in_handler, after) = (calls(), isr_at(0) & 0xFF, pic::isr() & 0xFF);
    cleanup();
    reinit();
    report::check_list(
        "auto-eoi",
        &[1, 0, 0],
        &[n.into(), in_handler.into(), after.into()],
    );
}

/// With 3 in service and masked, 6 waits; special mask mode lets it in.
/// On a PIC that showed KVM's poll signature, the same signature here (6
/// still held back, only 3 in service) is KVM's limit and SKIPs.
fn special_mask(kvm_pic: bool) {
    arm(EOI_NONE);
    open(1 << 3 | 1 << 6);
    pulse(3);
    wait_until(TIMEOUT_US, || calls() >= 1);
    open(1 << 6);
    pulse(6);
    settle();
    let without = calls() - 1;
    pic::set_special_mask(false, true);
    wait_until(TIMEOUT_US, || calls() >= 2);
    let with = calls() - 1;
    let isr = pic::isr() & (1 << 3 | 1 << 6);
    pic::set_special_mask(false, false);
    cleanup();
    if kvm_pic && without == 0 && with == 0 && isr == 1 << 3 {
        report::skip("special-mask-mode", KVM_PIC);
        return;
    }
    report::check_list(
        "special-mask-mode",
        &[0, 1, 0x48],
        &[without.into(), with.into(), isr.into()],
    );
}

/// KVM's in-kernel PIC ends a polled IRQ's service at the poll read (its
/// ISR bit is clear right after), and ignores special mask mode when it
/// picks the next request.
const KVM_PIC: &str = "KVM's in-kernel PIC: the poll read leaves the polled IRQ out of service (ISR clear), and special mask mode does not unblock lower levels";

/// Poll command: the read returns 0x80 | 5, acknowledges IRQ 5 (ISR set,
/// IRR clear), and no interrupt is taken. Returns whether the PIC showed
/// KVM's in-kernel signature (0x85, ISR and IRR clear, no interrupt).
fn poll_command() -> bool {
    arm(EOI_NONE);
    open(1 << 5);
    pulse(5);
    let word = pic::poll(false);
    let isr = pic::isr() & (1 << 5);
    let irr = pic::irr() & (1 << 5);
    pic::nonspecific_eoi(false);
    settle();
    let n = calls();
    cleanup();
    let kvm = word == 0x85 && isr == 0 && irr == 0 && n == 0;
    if kvm {
        report::skip("poll-command", KVM_PIC);
    } else {
        report::check_list(
            "poll-command",
            &[0x85, 1 << 5, 0, 0],
            &[word.into(), isr.into(), irr.into(), n.into()],
        );
    }
    kvm
}

/// Slave line 10 arrives with slave base + 2; master IRQ 2 and slave IRQ 10
/// stay in service until their own EOIs.
fn slave_cascade() {
    arm(EOI_NONE);
    open(1 << 10);
    pulse(10);
    wait_until(TIMEOUT_US, || calls() >= 1);
    let (n, v, in_handler) = (calls(), logged(0), isr_at(0));
    let after = pic::isr();
    pic::nonspecific_eoi(true);
    let slave_eoi = pic::isr();
    pic::nonspecific_eoi(false);
    let master_eoi = pic::isr();
    cleanup();
    let got = [
        n.into(),
        v.into(),
        in_handler.into(),
        after.into(),
        slave_eoi.into(),
        master_eoi.into(),
    ];
    report::check_list("slave-cascade", &[1, 0x6A, 0x0404, 0x0404, 0x0004, 0], &got);
}

/// Slave IRQ 11 in service (master IRQ 2 with it): in the normal fully
/// nested mode slave IRQ 10 waits behind the cascade's ISR bit; with ICW4
/// special fully nested mode on the master it is taken, nested.
fn special_fully_nested() {
    let mut got = [0u64; 4];
    for (i, icw4) in [pic::ICW4_8086, pic::ICW4_8086 | pic::ICW4_SFNM]
        .into_iter()
        .enumerate()
    {
        pic::init_with(MASTER_BASE, SLAVE_BASE, icw4, pic::ICW4_8086);
        pic::set_imr(ALL_MASKED);
        arm(EOI_NONE);
        open(1 << 10 | 1 << 11);
        pulse(11);
        wait_until(TIMEOUT_US, || calls() >= 1);
        pulse(10);
        if i == 0 {
            settle();
        } else {
            wait_until(TIMEOUT_US, || calls() >= 2);
        }
        got[2 * i] = calls().into();
        got[2 * i + 1] = pic::isr().into();
        cleanup();
    }
    reinit();
    report::check_list("special-fully-nested", &[1, 0x0804, 2, 0x0C04], &got);
}

/// Why a spurious IRQ cannot be produced when the request is withdrawn
/// before any acknowledge started.
const NO_SPURIOUS: &str = "the request was withdrawn before the acknowledge and no interrupt came: this PIC does not produce a spurious cycle";

/// A level IRQ 7 raised and dropped while IF = 0: either nothing arrives,
/// or the spurious vector base + 7 with ISR clear.
fn spurious_irq7() {
    arm(EOI_NONE);
    pic::set_elcr(1 << 7);
    open(1 << 7);
    testdev_set_irq(7, true);
    testdev_set_irq(7, false);
    settle();
    let (n, v, isr) = (calls(), logged(0), isr_at(0));
    let after = pic::isr();
    cleanup();
    if n == 0 {
        report::skip("spurious-irq7", NO_SPURIOUS);
    } else {
        report::check_list(
            "spurious-irq7",
            &[1, 0x67, 0, 0],
            &[n.into(), v.into(), isr.into(), after.into()],
        );
    }
}

/// A level IRQ 15 raised and dropped while IF = 0: the master latched the
/// cascade request, so the slave's spurious vector arrives with only the
/// master's cascade IRQ 2 in service (one master EOI ends it; the slave
/// needs none).
fn spurious_irq15() {
    arm(EOI_NONE);
    pic::set_elcr(1 << 15);
    open(1 << 15);
    testdev_set_irq(15, true);
    testdev_set_irq(15, false);
    settle();
    let (n, v, isr) = (calls(), logged(0), isr_at(0));
    pic::nonspecific_eoi(false);
    let after = pic::isr();
    cleanup();
    if n == 0 {
        // Every PIC here latches the cascade input, so one must come.
        report::fail(
            "spurious-irq15",
            "no interrupt: the master did not latch the cascade request",
        );
    } else {
        report::check_list(
            "spurious-irq15",
            &[1, 0x6F, 0x0004, 0],
            &[n.into(), v.into(), isr.into(), after.into()],
        );
    }
}
