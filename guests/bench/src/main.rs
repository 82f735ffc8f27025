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
//!   without the device).
//!
//! `only=<figure>` on the command line measures that figure alone (the VMM
//! uses it to count exits per interrupt); `only=none` measures nothing;
//! `samples=N` (1-1000, default 200) sets the samples per figure.
//! Ring-0 code may be emulated by the host, so the measured paths are kept to
//! a few instructions, and sample counts are small.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use guest_runtime::arch::{self, cli, outb, outl, rdtsc, sti, sti_hlt};
use guest_runtime::cpu::{self, InterruptFrame};
use guest_runtime::lapic::{self, Icr};
use guest_runtime::msi::{self, Address, Data};
use guest_runtime::ring::{self, Ring};
use guest_runtime::serial::Line;
use guest_runtime::time::{self, Deadline, WATCHDOG_VECTOR};
use guest_runtime::{entry, smp, Boot};

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

const RING_ENTRIES: u32 = 4;

/// The TSC the last handler read (0: not yet).
static HANDLED_AT: AtomicU64 = AtomicU64::new(0);
static AP_READY: AtomicBool = AtomicBool::new(false);

static RING: Ring<{ RING_ENTRIES as usize }> = Ring::new();

/// Every handler: the TSC first, nothing else on the measured path.
fn stamp(_: &mut InterruptFrame) {
    HANDLED_AT.store(rdtsc(), Ordering::Release);
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
    if !ring::present() {
        skip(NAME, "no-ring-device");
        return;
    }
    if RING.arm(lapic::id() as u8, V_RING) != 0 {
        skip(NAME, "ring-refused");
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
