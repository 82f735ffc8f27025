//! The device-path guest: interrupts raised by device threads in the VMM.
//!
//! - virq's ring device (ports 0x2500-0x251F, see crates/vmm/src/devices/ring.rs):
//!   the guest posts requests in a ring in its memory and rings a doorbell
//!   (a `KVM_IOEVENTFD`); the device thread answers them in a completion
//!   ring and raises an MSI; the handler, on the CPU the MSI names, consumes
//!   the completions. Every request must complete exactly once, with the
//!   right value.
//! - virq's pass-through line (ports 0x2520-0x252F, GSI 19, level): an
//!   emulated host device produces events fast; the VMM forwards its line
//!   as a level source with resample and unmasks the host line only at the
//!   guest's EOI. No event may be lost, and no interrupt may arrive for a
//!   device the guest already serviced.
//!
//! Under QEMU neither device exists and every check reports SKIP.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use guest_runtime::arch::{inl, outl};
use guest_runtime::cpu::{self, InterruptFrame};
use guest_runtime::ioapic::Redirection;
use guest_runtime::ring::{self, Ring};
use guest_runtime::serial::Line;
use guest_runtime::time::wait_until;
use guest_runtime::{arch, entry, lapic, report, smp, Boot};

const LINE_PORT: u16 = 0x2520;
const LINE_SIGNATURE: u32 = 0x656E_696C;
const LINE_GSI: u32 = 19;

const V_RING: u8 = 0x60;
const V_LINE: u8 = 0x61;

/// Ring size (entries); requests per check.
const ENTRIES: u32 = 64;
const REQUESTS: u32 = 2000;
/// Pass-through events per check, and the host device's pace.
const EVENTS: u32 = 2000;
const EVENT_GAP_US: u32 = 20;

const TIMEOUT_US: u64 = 3_000_000;
const NO_IN_SERVICE: &str =
    "the LAPIC ends a level vector's service when it injects it, so the resample comes before the handler serviced the device";
/// Salt in every request value, so a zeroed slot never looks like an answer.
const SALT: u32 = 0x5A00_0000;

static RING: Ring<{ ENTRIES as usize }> = Ring::new();

/// Completions the handler consumed (free-running index).
static CONSUMED: AtomicU32 = AtomicU32::new(0);
/// One bit per request id: completed.
static SEEN: [AtomicU32; (REQUESTS as usize).div_ceil(32)] =
    [const { AtomicU32::new(0) }; (REQUESTS as usize).div_ceil(32)];
static DUPLICATES: AtomicU32 = AtomicU32::new(0);
static BAD_VALUES: AtomicU32 = AtomicU32::new(0);
static WRONG_CPU: AtomicU32 = AtomicU32::new(0);
/// The CPU the ring's MSI is aimed at (index).
static RING_CPU: AtomicU32 = AtomicU32::new(0);

static LINE_CALLS: AtomicU32 = AtomicU32::new(0);
static LINE_EMPTY: AtomicU32 = AtomicU32::new(0);
static LINE_EVENTS: AtomicU32 = AtomicU32::new(0);

static AP_READY: AtomicBool = AtomicBool::new(false);

/// Consumes every completion the device published.
fn ring_handler(_: &mut InterruptFrame) {
    if cpu::index() as u32 != RING_CPU.load(Ordering::Relaxed) {
        WRONG_CPU.fetch_add(1, Ordering::AcqRel);
    }
    let published = RING.done_prod.load(Ordering::Acquire);
    let mut i = CONSUMED.load(Ordering::Relaxed);
    while i != published {
        let answer =
            RING.completions[Ring::<{ ENTRIES as usize }>::slot(i)].load(Ordering::Relaxed);
        let id = !answer ^ SALT;
        if id >= REQUESTS {
            BAD_VALUES.fetch_add(1, Ordering::AcqRel);
        } else {
            let bit = 1 << (id % 32);
            let old = SEEN[(id / 32) as usize].fetch_or(bit, Ordering::AcqRel);
            if old & bit != 0 {
                DUPLICATES.fetch_add(1, Ordering::AcqRel);
            }
            if id != i.wrapping_sub(RING_BASE_INDEX.load(Ordering::Relaxed)) {
                BAD_VALUES.fetch_add(1, Ordering::AcqRel);
            }
        }
        i = i.wrapping_add(1);
    }
    CONSUMED.store(i, Ordering::Release);
}

/// The ring index of this check's first request (indexes run freely across checks).
static RING_BASE_INDEX: AtomicU32 = AtomicU32::new(0);

/// Services the pass-through device: one read takes every pending event.
fn line_handler(_: &mut InterruptFrame) {
    LINE_CALLS.fetch_add(1, Ordering::AcqRel);
    let events = inl(LINE_PORT + 8);
    if events == 0 {
        LINE_EMPTY.fetch_add(1, Ordering::AcqRel);
    }
    LINE_EVENTS.fetch_add(events, Ordering::AcqRel);
}

fn main(boot: &'static Boot) -> ! {
    Line::new()
        .s("# devices guest: cpus=")
        .u(boot.platform.cpu_count as u64)
        .s(" ring=")
        .x(inl(ring::PORT).into())
        .s(" line=")
        .x(inl(LINE_PORT).into())
        .print();
    let holds_in_service = lapic::holds_in_service();
    if !holds_in_service {
        Line::new().s("# host limit: ").s(NO_IN_SERVICE).print();
    }
    let ap = start_ap(boot);
    cpu::set_handler(V_RING, ring_handler);
    cpu::set_handler(V_LINE, line_handler);

    ring_check("ring-requests-bsp", Some(0));
    ring_check("ring-requests-ap", ap.map(|_| 1));
    passthrough(boot, holds_in_service);
    report::finish()
}

entry!(main);

fn start_ap(boot: &Boot) -> Option<usize> {
    smp::start_first_ap(&boot.platform, ap_main, &AP_READY, TIMEOUT_US)
        .ok()
        .map(|_| 1)
}

/// The AP only takes interrupts.
fn ap_main(_index: usize) -> ! {
    AP_READY.store(true, Ordering::Release);
    loop {
        arch::sti_hlt();
    }
}

/// Sends `REQUESTS` requests through the ring with the MSI aimed at CPU
/// `target` (None: that CPU is missing, SKIP).
fn ring_check(name: &str, target: Option<usize>) {
    if !ring::present() {
        report::skip(name, "no ring device at port 0x2500");
        return;
    }
    let Some(target) = target else {
        report::skip(name, "one CPU");
        return;
    };
    for word in &SEEN {
        word.store(0, Ordering::Relaxed);
    }
    DUPLICATES.store(0, Ordering::Relaxed);
    BAD_VALUES.store(0, Ordering::Relaxed);
    WRONG_CPU.store(0, Ordering::Relaxed);
    RING_CPU.store(target as u32, Ordering::Relaxed);
    let start = RING.req_prod.load(Ordering::Relaxed);
    RING_BASE_INDEX.store(start, Ordering::Relaxed);
    CONSUMED.store(start, Ordering::Release);
    let msis_before = cpu::count(target, V_RING);

    let status = RING.arm(cpu::apic_id_of(target) as u8, V_RING);
    if status != 0 {
        report::fail_line(name)
            .s("the device refused the ring: status ")
            .u(status.into())
            .print();
        return;
    }

    let mut sent = 0;
    while sent < REQUESTS {
        // Keep at most a ring's worth outstanding.
        let ok = wait_until(TIMEOUT_US, || {
            sent - CONSUMED.load(Ordering::Acquire).wrapping_sub(start) < ENTRIES
        });
        if !ok {
            break;
        }
        let room = ENTRIES - (sent - CONSUMED.load(Ordering::Acquire).wrapping_sub(start));
        for _ in 0..room.min(REQUESTS - sent) {
            let i = start.wrapping_add(sent);
            RING.requests[Ring::<{ ENTRIES as usize }>::slot(i)]
                .store(sent ^ SALT, Ordering::Relaxed);
            sent += 1;
        }
        RING.post(start.wrapping_add(sent));
    }
    wait_until(TIMEOUT_US, || {
        CONSUMED.load(Ordering::Acquire).wrapping_sub(start) == REQUESTS
    });
    let consumed = CONSUMED.load(Ordering::Acquire).wrapping_sub(start);
    let missing = SEEN
        .iter()
        .enumerate()
        .map(|(w, word)| {
            let valid = (REQUESTS - (w as u32 * 32)).min(32);
            let mask = if valid == 32 {
                u32::MAX
            } else {
                (1 << valid) - 1
            };
            (!word.load(Ordering::Acquire) & mask).count_ones()
        })
        .sum::<u32>();
    let msis = cpu::count(target, V_RING) - msis_before;
    let duplicates = DUPLICATES.load(Ordering::Acquire);
    let bad = BAD_VALUES.load(Ordering::Acquire);
    let wrong_cpu = WRONG_CPU.load(Ordering::Acquire);
    let completed = ring::completed();
    if sent == REQUESTS
        && consumed == REQUESTS
        && missing == 0
        && duplicates == 0
        && bad == 0
        && wrong_cpu == 0
        && completed == REQUESTS
        && msis >= 1
    {
        report::pass(name);
    } else {
        report::fail_line(name)
            .s("expected every one of ")
            .u(REQUESTS.into())
            .s(" requests answered once on CPU ")
            .u(target as u64)
            .s(", got sent=")
            .u(sent.into())
            .s(" consumed=")
            .u(consumed.into())
            .s(" missing=")
            .u(missing.into())
            .s(" duplicates=")
            .u(duplicates.into())
            .s(" bad=")
            .u(bad.into())
            .s(" wrong-cpu=")
            .u(wrong_cpu.into())
            .s(" device-completed=")
            .u(completed.into())
            .s(" msis=")
            .u(msis.into())
            .print();
    }
    Line::new()
        .s("# ")
        .s(name)
        .s(": ")
        .u(msis.into())
        .s(" MSIs for ")
        .u(REQUESTS.into())
        .s(" requests")
        .print();
}

/// The pass-through line: no event lost, no interrupt for a serviced device.
fn passthrough(boot: &Boot, holds_in_service: bool) {
    const LOSS: &str = "passthrough-no-lost-events";
    const DUP: &str = "passthrough-no-spurious-interrupt";
    if inl(LINE_PORT) != LINE_SIGNATURE {
        report::skip(LOSS, "no pass-through line at port 0x2520");
        report::skip(DUP, "no pass-through line at port 0x2520");
        return;
    }
    let io = boot.ioapic;
    let pin = LINE_GSI - boot.platform.ioapic_gsi_base;
    io.set_redirection(
        pin,
        Redirection::fixed(V_LINE, boot.bsp_apic_id as u8).level(true),
    );
    LINE_CALLS.store(0, Ordering::Relaxed);
    LINE_EMPTY.store(0, Ordering::Relaxed);
    LINE_EVENTS.store(0, Ordering::Release);
    outl(LINE_PORT + 4, EVENT_GAP_US);
    outl(LINE_PORT, EVENTS);
    let done = wait_until(TIMEOUT_US, || {
        LINE_EVENTS.load(Ordering::Acquire) >= EVENTS && inl(LINE_PORT + 12) == EVENTS
    });
    // Whatever the device still holds (nothing, if none was lost).
    let leftover = inl(LINE_PORT + 8);
    io.mask(pin);
    let events = LINE_EVENTS.load(Ordering::Acquire);
    let calls = LINE_CALLS.load(Ordering::Acquire);
    let empty = LINE_EMPTY.load(Ordering::Acquire);
    Line::new()
        .s("# passthrough: ")
        .u(calls.into())
        .s(" interrupts for ")
        .u(events.into())
        .s(" events, ")
        .u(empty.into())
        .s(" found nothing to service")
        .print();
    if done && events == EVENTS && leftover == 0 {
        report::pass(LOSS);
    } else {
        report::fail_line(LOSS)
            .s("expected ")
            .u(EVENTS.into())
            .s(" events serviced, got ")
            .u(events.into())
            .s(" (device still held ")
            .u(leftover.into())
            .s(")")
            .print();
    }
    if !holds_in_service {
        report::skip(DUP, NO_IN_SERVICE);
    } else {
        report::check_eq(DUP, 0, empty.into());
    }
}
