//! A guest that misbehaves on purpose, to show the VMM survives it: it
//! never ends by itself, so only `--timeout` (or the VMM noticing a fault)
//! stops it. The command line picks the misbehaviour:
//!
//! - `ipi-flood`: every CPU sends fixed IPIs to all CPUs in a tight loop;
//! - `no-eoi`: a level line and a periodic LAPIC timer are taken and never
//!   EOI'd, while the line is toggled in a tight loop;
//! - `timer-storm`: the LAPIC timer (count 1, divide 1) and the PIT
//!   (reload 1) at their fastest periodic rates;
//! - `garbage`: pseudo-random writes to every I/O port (but the exit port
//!   and the console), the LAPIC and IOAPIC pages and the APIC MSRs;
//! - `doorbell-flood`: virq's ring device armed with a producer index far
//!   ahead of the ring and its doorbell rung in a tight loop (every ring
//!   makes the device thread answer a whole ring and send an MSI that is
//!   never EOI'd), while the pass-through line produces events nobody
//!   services.
//!
//! Each prints `# hostile: <mode> running` once the misbehaviour starts.
#![no_std]
#![no_main]

use guest_runtime::arch::{mmio_write32, outb, outl, rdmsr, rdtsc, sti, sti_hlt, wrmsr};
use guest_runtime::cpu::{self, InterruptFrame};
use guest_runtime::ioapic::Redirection;
use guest_runtime::lapic::{self, reg};
use guest_runtime::ring::Ring;
use guest_runtime::serial::Line;
use guest_runtime::{entry, exit, pit, smp, testdev_set_irq, Boot, DEBUG_EXIT_PORT};

const FLOOD_VECTOR: u8 = 0x40;
const LEVEL_VECTOR: u8 = 0x50;
const TIMER_VECTOR: u8 = 0x51;
const PIT_VECTOR: u8 = 0x60;
const LEVEL_LINE: u8 = 10;
/// ICR: all including self, fixed, edge.
const ICR_ALL_INCLUDING_SELF: u32 = 0b10 << 18;

fn main(boot: &'static Boot) -> ! {
    let modes: [(&str, fn(&'static Boot) -> !); 5] = [
        ("ipi-flood", ipi_flood),
        ("no-eoi", no_eoi),
        ("timer-storm", timer_storm),
        ("garbage", garbage),
        ("doorbell-flood", doorbell_flood),
    ];
    for (name, run) in modes {
        if boot.multiboot.has_option(name) {
            run(boot);
        }
    }
    Line::new()
        .s("FAIL hostile: no mode on the command line: \"")
        .s(boot.multiboot.cmdline())
        .s("\"")
        .print();
    exit(1)
}

entry!(main);

fn running(mode: &str) {
    Line::new().s("# hostile: ").s(mode).s(" running").print();
}

fn ipi_flood(boot: &'static Boot) -> ! {
    let p = &boot.platform;
    smp::start_aps(&p.apic_ids[..p.cpu_count], |_| flood());
    running("ipi-flood");
    flood()
}

fn flood() -> ! {
    sti();
    loop {
        lapic::write(
            reg::ICR_LOW,
            ICR_ALL_INCLUDING_SELF | (1 << 14) | u32::from(FLOOD_VECTOR),
        );
    }
}

fn no_eoi(boot: &'static Boot) -> ! {
    cpu::set_auto_eoi(LEVEL_VECTOR, false);
    cpu::set_auto_eoi(TIMER_VECTOR, false);
    let route = boot.platform.isa_route(LEVEL_LINE);
    let pin = route.gsi.wrapping_sub(boot.platform.ioapic_gsi_base);
    let rte = Redirection::fixed(LEVEL_VECTOR, boot.bsp_apic_id as u8).level(true);
    boot.ioapic.set_redirection(pin, rte);
    lapic::timer_periodic(TIMER_VECTOR, 1000);
    testdev_set_irq(LEVEL_LINE, true);
    sti();
    running("no-eoi");
    loop {
        testdev_set_irq(LEVEL_LINE, false);
        testdev_set_irq(LEVEL_LINE, true);
    }
}

fn timer_storm(boot: &'static Boot) -> ! {
    let route = boot.platform.isa_route(0);
    let pin = route.gsi.wrapping_sub(boot.platform.ioapic_gsi_base);
    boot.ioapic
        .set_redirection(pin, Redirection::fixed(PIT_VECTOR, boot.bsp_apic_id as u8));
    pit::set_rate(1);
    lapic::write(reg::TIMER_DIVIDE, 0xB); // divide by 1
    lapic::write(
        reg::LVT_TIMER,
        u32::from(TIMER_VECTOR) | lapic::LVT_TIMER_PERIODIC,
    );
    lapic::write(reg::TIMER_INITIAL, 1);
    running("timer-storm");
    loop {
        sti_hlt();
    }
}

static RING: Ring<64> = Ring::new();

fn doorbell_flood(boot: &'static Boot) -> ! {
    const LINE_PORT: u16 = 0x2520;
    cpu::set_auto_eoi(FLOOD_VECTOR, false);
    RING.arm(boot.bsp_apic_id as u8, FLOOD_VECTOR);
    // Pass-through line: as many events as it allows, as fast as it goes,
    // on a level pin that is never EOI'd.
    let pin = 19 - boot.platform.ioapic_gsi_base;
    let rte = Redirection::fixed(LEVEL_VECTOR, boot.bsp_apic_id as u8).level(true);
    cpu::set_auto_eoi(LEVEL_VECTOR, false);
    boot.ioapic.set_redirection(pin, rte);
    outl(LINE_PORT + 4, 0);
    outl(LINE_PORT, 100_000);
    sti();
    running("doorbell-flood");
    let mut produced: u32 = 0;
    loop {
        produced = produced.wrapping_add(0x4000_0000);
        RING.post(produced);
    }
}

/// xorshift64: cheap, and seeded from the TSC so each run differs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `rdmsr`/`wrmsr` of a register that does not take the value raise #GP:
/// step over the two-byte instruction.
fn skip_msr_instruction(frame: &mut InterruptFrame) {
    frame.rip += 2;
}

/// NMIs, and interrupts the garbage aimed at exception vectors, are only
/// counted.
fn ignore(_: &mut InterruptFrame) {}

/// Exception vectors without an error code: an interrupt arriving on one
/// looks like the exception to the handler, and returns cleanly. (On the
/// others the frame would be one word off; such a run ends in a fault.)
const NO_ERROR_CODE: [u8; 19] = [
    1, 2, 3, 4, 5, 7, 9, 15, 16, 18, 19, 20, 22, 23, 24, 25, 26, 27, 31,
];

fn garbage(boot: &'static Boot) -> ! {
    for vector in NO_ERROR_CODE {
        cpu::set_handler(vector, ignore);
    }
    cpu::set_handler(13, skip_msr_instruction);
    let ioapic = boot.ioapic.base;
    let mut rng = Rng(rdtsc() | 1);
    sti();
    running("garbage");
    loop {
        let r = rng.next();
        // Delivery-mode bit 10 off: no INIT, SIPI or ExtINT through an ICR,
        // RTE, LVT or MSI, which would reset a CPU into missing firmware
        // and end the run early instead of keeping the pressure on.
        let value = (r >> 32) as u32 & !0x400;
        match r & 7 {
            0..=2 => {
                let port = (r >> 8) as u16;
                // Keep the exit port and the console out of it (a dword
                // write reaches the three ports above its address too).
                let hits = |base: u16, len: u16| {
                    port.wrapping_add(3) >= base && port < base.saturating_add(len)
                };
                if !hits(DEBUG_EXIT_PORT, 4) && !hits(0x3F8, 8) {
                    if r & 8 == 0 {
                        outb(port, value as u8);
                    } else {
                        outl(port, value);
                    }
                }
            }
            3 | 4 => {
                let offset = ((r >> 8) & 0xFF0) as usize;
                mmio_write32(lapic::XAPIC_BASE + offset, value);
            }
            5 => {
                let offset = [0x00, 0x10, 0x40, (r >> 8) as usize & 0xFFC][(r >> 20) as usize & 3];
                mmio_write32(ioapic + offset, value);
            }
            _ => {
                let msr = [0x1B, 0x6E0, 0x800 + ((r >> 8) as u32 & 0xFF)][(r >> 20) as usize % 3];
                if r & 8 == 0 {
                    wrmsr(msr, rng.next() & !0x400);
                } else {
                    let _ = rdmsr(msr);
                }
            }
        }
    }
}
