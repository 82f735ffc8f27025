//! Raw bytes in, guest register accesses out: one driver per register
//! surface of the virq models (I/O ports, IOAPIC MMIO, LAPIC MMIO and MSRs,
//! routing table updates).
//!
//! Each driver reads its input as a script of operations, performs them on a
//! fresh [`Chipset`], and checks invariants the hardware guarantees after
//! every step, panicking when one breaks. The fuzz targets under `fuzz/`
//! call these drivers with fuzzer input; the tests of this crate call them
//! with proptest's random bytes, a short bounded run that `cargo test` (and
//! so CI) includes.
#![forbid(unsafe_code)]

use virq::chipset::{Chipset, ChipsetConfig, LapicPlacement};
use virq::inject::{decide, Decision, Interruptibility};
use virq::ioapic::IoapicVersion;
use virq::msi::MsiMessage;
use virq::pit::LostTickPolicy;
use virq::routing::{PicChip, Route, RouteEntry, RoutingTable, SourceId};

/// vCPUs in every driven chipset: enough for IPIs between APICs.
pub const VCPUS: usize = 3;

const LAPIC_BASE: u64 = 0xFEE0_0000;
const IOAPIC_BASE: u64 = 0xFEC0_0000;
const IOAPIC_PINS: u32 = 24;
/// Longest single step of virtual time: 10 ms.
const MAX_STEP_NS: u64 = 10_000_000;

const OPEN: Interruptibility = Interruptibility {
    if_flag: true,
    interrupt_shadow: false,
    nmi_blocked: false,
    event_pending: false,
};

/// A cursor over the input that yields zeros once it runs out.
struct Script<'a> {
    data: &'a [u8],
}

impl<'a> Script<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    fn done(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// An access width: 1, 2, 4 or 8 bytes, or an odd one (3) now and then.
    fn width(&mut self) -> usize {
        [1, 2, 4, 8, 4, 4, 3, 4][usize::from(self.u8() & 7)]
    }

    fn vcpu(&mut self) -> usize {
        usize::from(self.u8()) % (VCPUS + 1) // one past the end on purpose
    }
}

/// LAPIC registers a guest actually uses, so random input reaches them often.
const LAPIC_REGS: [u64; 20] = [
    0x20, 0x30, 0x80, 0xA0, 0xB0, 0xD0, 0xE0, 0xF0, 0x280, 0x300, 0x310, 0x320, 0x330, 0x340,
    0x350, 0x360, 0x370, 0x380, 0x390, 0x3E0,
];

/// The machine every driver starts from, with `placement`'s LAPICs
/// software-enabled (input can still disable them).
fn machine(placement: LapicPlacement) -> Chipset {
    let mut chip = machine_at_reset(placement);
    for cpu in 0..VCPUS {
        chip.mmio_write(cpu, LAPIC_BASE + 0xF0, &0x1FFu32.to_le_bytes(), 0);
    }
    chip.drain_events().for_each(drop);
    chip
}

fn machine_at_reset(placement: LapicPlacement) -> Chipset {
    match Chipset::new(ChipsetConfig {
        vcpus: VCPUS,
        lapics: placement,
        ioapic_version: IoapicVersion::V20,
        pit_policy: LostTickPolicy::Reinject,
        tsc_hz: 2_000_000_000,
        tsc_offset: 0,
    }) {
        Ok(chip) => chip,
        Err(e) => panic!("a {VCPUS}-vCPU chipset must build: {e}"),
    }
}

/// What a driver run did, so tests can tell the drivers reach real work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Operations performed.
    pub ops: u64,
    /// Interrupts (vectors, ExtINT or NMI) a vCPU took.
    pub taken: u64,
}

/// Operations every surface shares: time passes, vCPUs take interrupts,
/// devices toggle lines. Returns false if `op` is not one of them.
fn common_op(chip: &mut Chipset, op: u8, s: &mut Script, now: &mut u64, out: &mut Outcome) -> bool {
    match op {
        0xF0..=0xF3 => {
            *now += u64::from(s.u32()) % MAX_STEP_NS;
            chip.advance(*now);
        }
        0xF4..=0xF7 => {
            let cpu = s.vcpu();
            let decision = decide(&chip.pending(cpu), &OPEN);
            let vector = chip.acknowledge(cpu, decision, *now);
            match decision {
                Decision::InjectVector(v) => {
                    assert_eq!(vector, Some(v), "the chosen vector is the one acknowledged");
                    out.taken += 1;
                }
                Decision::InjectNmi | Decision::InjectExtInt => out.taken += 1,
                Decision::RequestWindow | Decision::Idle => {}
            }
        }
        0xF8..=0xFB => {
            let gsi = u32::from(s.u8()) % 32;
            let source = SourceId::new(s.u8() % 64).unwrap_or(SourceId::USER);
            let level = s.bool();
            chip.set_gsi(gsi, source, level, *now);
        }
        0xFC..=0xFF => {
            let msi = MsiMessage {
                address: LAPIC_BASE | u64::from(s.u32() & 0xF_FFFF) | u64::from(s.u8()) << 32,
                data: s.u32(),
            };
            let _ = chip.send_msi(msi, *now);
        }
        _ => return false,
    }
    true
}

/// Invariants after every step, whatever the guest did.
fn check(chip: &mut Chipset, now: u64) {
    chip.drain_events().for_each(drop);
    // A due timer is served by advance(); it must not stay due (that would
    // be a busy loop in the VMM's timer service).
    if chip.next_deadline().is_some_and(|d| d <= now) {
        chip.advance(now);
        if let Some(d) = chip.next_deadline() {
            assert!(d > now, "timer still due at {d} after advance({now})");
        }
        chip.drain_events().for_each(drop);
    }
    for cpu in 0..chip.vcpus() {
        let Ok(lapic) = chip.lapic(cpu) else { continue };
        let state = lapic.save();
        let isrv = highest(&state.isr).unwrap_or(0);
        let expected_ppr = if state.tpr >> 4 >= isrv >> 4 {
            state.tpr
        } else {
            isrv & 0xF0
        };
        assert_eq!(lapic.ppr(), expected_ppr, "PPR rule on vCPU {cpu}");
        if let Some(v) = lapic.highest_deliverable() {
            assert!(v >= 16, "vector {v} below 16 is never deliverable");
            assert!(
                v >> 4 > lapic.ppr() >> 4,
                "vector {v:#x} deliverable above PPR"
            );
        }
    }
}

fn highest(set: &[u32; 8]) -> Option<u8> {
    (0..8usize)
        .rev()
        .find_map(|i| (set[i] != 0).then(|| (i * 32 + 31 - set[i].leading_zeros() as usize) as u8))
}

/// The loop every driver shares: each step is a common operation or, when
/// the op byte is not one, the surface's own `step`; invariants are checked
/// after every step.
fn drive(data: &[u8], mut step: impl FnMut(&mut Chipset, u8, &mut Script, u64)) -> Outcome {
    let mut chip = machine(LapicPlacement::Model);
    let mut s = Script::new(data);
    let mut now = 0u64;
    let mut out = Outcome::default();
    while !s.done() {
        out.ops += 1;
        let op = s.u8();
        if !common_op(&mut chip, op, &mut s, &mut now, &mut out) {
            step(&mut chip, op, &mut s, now);
        }
        check(&mut chip, now);
    }
    out
}

/// I/O ports: the PIT, port 0x61, both PICs, the ELCR and their neighbours.
pub fn ports(data: &[u8]) -> Outcome {
    const PORTS: [u16; 14] = [
        0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x22, 0x44, 0x4D2,
    ];
    drive(data, |chip, op, s, now| {
        let port = if op & 0x40 != 0 {
            s.u16()
        } else {
            PORTS[usize::from(s.u8()) % PORTS.len()]
        };
        let mut buf = [0u8; 8];
        let width = s.width();
        if op & 1 == 0 {
            buf[..width].copy_from_slice(&s.u64().to_le_bytes()[..width]);
            chip.pio_write(port, &buf[..width], now);
        } else {
            chip.pio_read(port, &mut buf[..width], now);
        }
    })
}

/// The IOAPIC window: IOREGSEL/IOWIN/EOI and every other offset and width,
/// with lines toggling and EOIs arriving.
pub fn ioapic_mmio(data: &[u8]) -> Outcome {
    drive(data, |chip, op, s, now| {
        match op % 4 {
            0 => {
                // Offset anywhere in the page, with a bias to the registers.
                let offset = match s.u8() % 4 {
                    0 => 0x00,
                    1 => 0x10,
                    2 => 0x40,
                    _ => u64::from(s.u16() & 0xFFF),
                };
                let width = s.width();
                let bytes = s.u64().to_le_bytes();
                chip.mmio_write(s.vcpu() % VCPUS, IOAPIC_BASE + offset, &bytes[..width], now);
            }
            1 => {
                let offset = u64::from(s.u16() & 0xFFF);
                let mut buf = [0u8; 8];
                let width = s.width();
                chip.mmio_read(0, IOAPIC_BASE + offset, &mut buf[..width], now);
            }
            2 => chip.ioapic_eoi(s.u8(), now),
            _ => {
                // Select a register and read it back whole.
                let index = s.u8();
                chip.mmio_write(0, IOAPIC_BASE, &u32::from(index).to_le_bytes(), now);
                let mut buf = [0u8; 4];
                chip.mmio_read(0, IOAPIC_BASE + 0x10, &mut buf, now);
                let value = u32::from_le_bytes(buf);
                let last = 0x10 + 2 * IOAPIC_PINS - 1;
                if u32::from(index) > last {
                    assert_eq!(
                        value,
                        u32::MAX,
                        "index {index:#x} past the RTEs reads all ones"
                    );
                }
            }
        }
    })
}

/// The LAPIC page (any offset and width) and the APIC MSRs (x2APIC range,
/// APIC_BASE, TSC_DEADLINE and neighbours), from any vCPU.
pub fn lapic(data: &[u8]) -> Outcome {
    const MSRS: [u32; 6] = [0x1B, 0x6E0, 0x800, 0x8FF, 0x900, 0x7FF];
    drive(data, |chip, op, s, now| {
        let cpu = s.vcpu();
        match op % 4 {
            0 => {
                let offset = match s.u8() % 2 {
                    0 => LAPIC_REGS[usize::from(s.u8()) % LAPIC_REGS.len()],
                    _ => u64::from(s.u16() & 0xFFF),
                };
                let width = s.width();
                let bytes = s.u64().to_le_bytes();
                chip.mmio_write(cpu, LAPIC_BASE + offset, &bytes[..width], now);
            }
            1 => {
                let offset = u64::from(s.u16() & 0xFFF);
                let mut buf = [0u8; 8];
                let width = s.width();
                chip.mmio_read(cpu, LAPIC_BASE + offset, &mut buf[..width], now);
            }
            2 => {
                let msr = match s.u8() % 3 {
                    0 => 0x800 + u32::from(s.u8()),
                    1 => MSRS[usize::from(s.u8()) % MSRS.len()],
                    _ => s.u32(),
                };
                let value = s.u64();
                let _ = chip.msr_write(cpu, msr, value, now);
            }
            _ => {
                let msr = 0x800 + u32::from(s.u8());
                let _ = chip.msr_read(cpu, msr, now);
            }
        }
    })
}

/// Routing table updates: arbitrary tables are either rejected with a typed
/// error or installed, and an installed one survives save and restore and
/// drives every GSI it names without panicking.
pub fn routing(data: &[u8]) -> Outcome {
    drive(data, |chip, _op, s, now| {
        let n = usize::from(s.u8() % 32);
        let entries: Vec<RouteEntry> = (0..n)
            .map(|_| {
                let gsi = match s.u8() % 4 {
                    0 => s.u32(),
                    _ => u32::from(s.u8()) % 40,
                };
                let route = match s.u8() % 4 {
                    0 => Route::Pic {
                        chip: PicChip::Master,
                        pin: s.u8() % 10,
                    },
                    1 => Route::Pic {
                        chip: PicChip::Slave,
                        pin: s.u8() % 10,
                    },
                    2 => Route::Ioapic { pin: s.u8() % 28 },
                    _ => Route::Msi(MsiMessage {
                        address: LAPIC_BASE | u64::from(s.u32() & 0xF_FFFF),
                        data: s.u32(),
                    }),
                };
                RouteEntry { gsi, route }
            })
            .collect();
        if let Ok(table) = RoutingTable::new(entries) {
            let mut restored = RoutingTable::default_pc();
            if let Err(e) = restored.restore(&table.save()) {
                panic!("a table that validated must restore: {e}");
            }
            assert_eq!(
                restored.entries(),
                table.entries(),
                "save/restore round trip"
            );
            let gsis: Vec<u32> = table.entries().iter().map(|e| e.gsi).collect();
            chip.set_routing(table);
            for gsi in gsis {
                chip.set_gsi(gsi, SourceId::USER, true, now);
                chip.set_gsi(gsi, SourceId::USER, false, now);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The bounded twins of the fuzz targets: the same drivers on random
    // bytes, a few hundred inputs each, inside `cargo test`.
    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn ports_surface(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = ports(&data);
        }

        #[test]
        fn ioapic_mmio_surface(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = ioapic_mmio(&data);
        }

        #[test]
        fn lapic_surface(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = lapic(&data);
        }

        #[test]
        fn routing_surface(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = routing(&data);
        }
    }

    fn le64(v: u64) -> [u8; 8] {
        v.to_le_bytes()
    }

    /// The drivers reach real deliveries: a script that programs an IOAPIC
    /// pin and raises its line gets the interrupt taken.
    #[test]
    fn ioapic_script_programs_a_pin_and_delivers() {
        let mut script = Vec::new();
        // op 0: write; offset selector 0 (IOREGSEL); width index 2 (4 bytes).
        script.extend([0, 0, 2]);
        script.extend(le64(0x10 + 2 * 5)); // RTE 5, low half
        script.push(0); // from vCPU 0
                        // op 4 (write again); selector 1 (IOWIN): vector 0x40, edge, to APIC 0.
        script.extend([4, 1, 2]);
        script.extend(le64(0x40));
        script.push(0);
        script.extend([0xF8, 5, 0, 1]); // GSI 5 high
        script.extend([0xF4, 0]); // vCPU 0 takes it
        assert_eq!(ioapic_mmio(&script).taken, 1);
        // The same script with the RTE left masked delivers nothing.
        let mut masked = script.clone();
        masked[15..23].copy_from_slice(&le64(0x1_0040));
        assert_eq!(ioapic_mmio(&masked).taken, 0);
    }

    /// A self IPI written to the ICR is taken.
    #[test]
    fn lapic_script_sends_a_self_ipi() {
        let mut script = vec![0, 0, 0, 9, 2]; // write, vCPU 0, register list, ICR low, 4 bytes
        script.extend(le64(0x4_0041)); // shorthand self, vector 0x41
        script.extend([0xF4, 0]);
        assert_eq!(lapic(&script).taken, 1);
    }

    #[test]
    fn scripts_run_past_their_end_as_zeros() {
        let mut s = Script::new(&[1, 2]);
        assert_eq!(s.u32(), 0x0201);
        assert!(s.done());
        assert_eq!(s.u64(), 0);
    }

    /// The PPR check's own helper finds the highest set vector.
    #[test]
    fn highest_finds_the_top_vector() {
        let mut set = [0u32; 8];
        assert_eq!(highest(&set), None);
        set[1] = 1 << 3; // vector 35
        set[6] = 1 << 31; // vector 223
        assert_eq!(highest(&set), Some(223));
    }
}
