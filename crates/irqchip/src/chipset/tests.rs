//! The chipset driven the way a guest drives a PC: through ports, MMIO and
//! MSRs, with the caller's clock.

use super::*;
use crate::delivery::TriggerMode;
use crate::inject::{decide, Interruptibility};
use crate::lapic::APIC_BASE_DEFAULT;
use crate::pit::LostTickPolicy;

const LAPIC: u64 = APIC_BASE_DEFAULT;
const EOI: u64 = LAPIC + 0xB0;
const SVR: u64 = LAPIC + 0xF0;
const ICR_LOW: u64 = LAPIC + 0x300;
const ICR_HIGH: u64 = LAPIC + 0x310;
const LVT_TIMER: u64 = LAPIC + 0x320;
const LVT0: u64 = LAPIC + 0x350;
const TMICT: u64 = LAPIC + 0x380;
const TDCR: u64 = LAPIC + 0x3E0;

fn chipset(vcpus: usize, lapics: LapicPlacement) -> Chipset {
    Chipset::new(ChipsetConfig {
        vcpus,
        lapics,
        ioapic_version: IoapicVersion::V20,
        pit_policy: LostTickPolicy::Reinject,
        tsc_hz: 1_000_000_000,
        tsc_offset: 0,
    })
    .expect("valid config")
}

fn write32(c: &mut Chipset, vcpu: usize, addr: u64, value: u32) {
    assert!(
        c.mmio_write(vcpu, addr, &value.to_le_bytes(), 0),
        "{addr:#x} unclaimed"
    );
}

fn read32(c: &mut Chipset, vcpu: usize, addr: u64) -> u32 {
    let mut data = [0u8; 4];
    assert!(c.mmio_read(vcpu, addr, &mut data, 0));
    u32::from_le_bytes(data)
}

fn set_rte(c: &mut Chipset, pin: u32, low: u32, high: u32) {
    write32(c, 0, IOAPIC_BASE, 0x10 + 2 * pin);
    write32(c, 0, IOAPIC_BASE + 0x10, low);
    write32(c, 0, IOAPIC_BASE, 0x11 + 2 * pin);
    write32(c, 0, IOAPIC_BASE + 0x10, high);
}

fn rte_low(c: &mut Chipset, pin: u32) -> u32 {
    write32(c, 0, IOAPIC_BASE, 0x10 + 2 * pin);
    read32(c, 0, IOAPIC_BASE + 0x10)
}

/// What an APIC-mode guest does first: mask both 8259As.
fn mask_pics(c: &mut Chipset) {
    c.pio_write(0x21, &[0xFF], 0);
    c.pio_write(0xA1, &[0xFF], 0);
}

fn enable_lapics(c: &mut Chipset) {
    mask_pics(c);
    for cpu in 0..c.vcpus() {
        write32(c, cpu, SVR, 0x1FF);
    }
}

const OPEN: Interruptibility = Interruptibility {
    if_flag: true,
    interrupt_shadow: false,
    nmi_blocked: false,
    event_pending: false,
};

/// Take whatever `vcpu` would take next with interrupts open.
fn take(c: &mut Chipset, vcpu: usize) -> Option<u8> {
    let decision = decide(&c.pending(vcpu), &OPEN);
    c.acknowledge(vcpu, decision, 0)
}

fn events(c: &mut Chipset) -> Vec<ChipEvent> {
    c.drain_events().collect()
}

#[test]
fn rejects_zero_and_too_many_vcpus() {
    for vcpus in [0, MAX_VCPUS + 1] {
        let config = ChipsetConfig {
            vcpus,
            lapics: LapicPlacement::Model,
            ioapic_version: IoapicVersion::V11,
            pit_policy: LostTickPolicy::Discard,
            tsc_hz: 1,
            tsc_offset: 0,
        };
        assert!(matches!(Chipset::new(config), Err(ChipsetError::BadVcpuCount(n)) if n == vcpus));
    }
}

#[test]
fn level_gsi_through_ioapic_is_redelivered_after_eoi_while_high() {
    let mut c = chipset(1, LapicPlacement::Model);
    enable_lapics(&mut c);
    set_rte(&mut c, 10, 0x8000 | 0x41, 0); // level, vector 0x41, dest 0
    let user = SourceId::USER;
    assert_eq!(c.set_gsi(10, user, true, 0), IrqStatus::Delivered(1));
    assert!(events(&mut c).contains(&ChipEvent::Kick(0)));
    assert_eq!(take(&mut c, 0), Some(0x41));
    assert_ne!(
        rte_low(&mut c, 10) & (1 << 14),
        0,
        "remote IRR set while in service"
    );
    // Still asserted: raising again coalesces.
    assert_eq!(c.set_gsi(10, user, true, 0), IrqStatus::Coalesced);
    write32(&mut c, 0, EOI, 0);
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(10)));
    assert_eq!(
        take(&mut c, 0),
        Some(0x41),
        "redelivered after EOI while high"
    );
    c.set_gsi(10, user, false, 0);
    write32(&mut c, 0, EOI, 0);
    assert_eq!(
        rte_low(&mut c, 10) & (1 << 14),
        0,
        "remote IRR clear after final EOI"
    );
    assert_eq!(take(&mut c, 0), None);
}

#[test]
fn shared_level_gsi_is_the_or_of_its_sources() {
    let mut c = chipset(1, LapicPlacement::Model);
    enable_lapics(&mut c);
    set_rte(&mut c, 11, 0x8000 | 0x42, 0);
    let a = SourceId::new(5).expect("id");
    let b = SourceId::new(6).expect("id");
    c.set_gsi(11, a, true, 0);
    c.set_gsi(11, b, true, 0);
    assert_eq!(take(&mut c, 0), Some(0x42));
    // One source lowering leaves the line high: the EOI redelivers.
    c.set_gsi(11, a, false, 0);
    write32(&mut c, 0, EOI, 0);
    assert_eq!(take(&mut c, 0), Some(0x42));
    c.set_gsi(11, b, false, 0);
    write32(&mut c, 0, EOI, 0);
    assert_eq!(take(&mut c, 0), None);
}

/// Program PIT counter 0 as a rate generator with `count`.
fn program_pit(c: &mut Chipset, count: u16, now: u64) {
    c.pio_write(0x43, &[0x34], now);
    c.pio_write(0x40, &[count as u8], now);
    c.pio_write(0x40, &[(count >> 8) as u8], now);
}

#[test]
fn pit_ticks_reach_ioapic_pin_2_and_reinject_waits_for_the_edge_eoi() {
    let mut c = chipset(1, LapicPlacement::Model);
    enable_lapics(&mut c);
    set_rte(&mut c, 2, 0x30, 0); // edge, vector 0x30: the PIT's pin
    program_pit(&mut c, 11932, 0); // ~10 ms
    let first = c.next_deadline().expect("PIT armed");
    // A long stall: four periods pass before the VMM looks.
    let late = first + 35_000_000;
    c.advance(late);
    assert_eq!(c.counts().pit, 1);
    assert_eq!(take(&mut c, 0), Some(0x30));
    // Not acknowledged yet: no second tick even though more are owed.
    c.advance(late + 1);
    assert_eq!(c.counts().pit, 1);
    assert!(c.pit().backlog() >= 3);
    write32(&mut c, 0, EOI, 0);
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(0)));
    let due = c.next_deadline().expect("backlog due");
    c.advance(due);
    assert_eq!(c.counts().pit, 2, "the owed tick follows the ack");
    assert_eq!(take(&mut c, 0), Some(0x30));
}

#[test]
fn a_pit_pin_retargeted_while_a_tick_is_in_flight_keeps_ticking() {
    let mut c = chipset(1, LapicPlacement::External);
    mask_pics(&mut c);
    set_rte(&mut c, 2, 0x30, 0);
    program_pit(&mut c, 1193, 0); // ~1 ms
    let first = c.next_deadline().expect("PIT armed");
    c.advance(first);
    assert_eq!(c.counts().pit, 1);
    // The guest gives the pin a new vector; the EOI of the old one no
    // longer names the pin, so this tick's acknowledgement is lost.
    set_rte(&mut c, 2, 0x31, 0);
    c.external_lapic_eoi(0x30, true, first + 1);
    assert!(!events(&mut c).contains(&ChipEvent::GsiAcked(0)));
    let mut now = first;
    while c.counts().pit == 1 {
        now = c.next_deadline().expect("still armed");
        // Given up at the first expiry 10 ms on (a period is ~1 ms).
        let bound = first + crate::pit::ACK_TIMEOUT_MIN_NS + 1_000_000;
        assert!(now <= bound, "stopped at {now}");
        c.advance(now);
    }
    assert_eq!(c.counts().pit, 2, "ticks resume");
    // The new vector's EOI acknowledges as usual.
    c.external_lapic_eoi(0x31, true, now + 1);
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(0)));
}

#[test]
fn our_own_lapics_wait_for_the_pit_ack_however_long() {
    let mut c = chipset(1, LapicPlacement::Model);
    enable_lapics(&mut c);
    set_rte(&mut c, 2, 0x30, 0);
    program_pit(&mut c, 1193, 0); // ~1 ms
    let first = c.next_deadline().expect("PIT armed");
    c.advance(first);
    // The guest keeps the tick pending (interrupts off) for 100 ms: our
    // LAPIC will report its EOI, so nothing is given up or merged.
    let mut now = first;
    while now < first + 100_000_000 {
        now = c.next_deadline().expect("armed");
        c.advance(now);
    }
    assert_eq!(c.counts().pit, 1);
    assert_eq!(take(&mut c, 0), Some(0x30));
    write32(&mut c, 0, EOI, 0);
    let due = c.next_deadline().expect("backlog due");
    c.advance(due);
    assert_eq!(c.counts().pit, 2, "the owed ticks follow the ack");
}

#[test]
fn unmasking_the_pit_pin_drops_the_backlog() {
    let mut c = chipset(1, LapicPlacement::Model);
    enable_lapics(&mut c);
    set_rte(&mut c, 2, 0x1_0030, 0); // masked
    program_pit(&mut c, 11932, 0);
    let first = c.next_deadline().expect("armed");
    c.advance(first + 50_000_000);
    assert!(c.pit().backlog() > 0);
    set_rte(&mut c, 2, 0x30, 0);
    assert_eq!(c.pit().backlog(), 0);
}

#[test]
fn msi_reaches_its_destination_lapic_only() {
    let mut c = chipset(2, LapicPlacement::Model);
    enable_lapics(&mut c);
    let msi = MsiMessage {
        address: 0xFEE0_1000, // destination APIC ID 1, physical
        data: 0x51,
    };
    assert_eq!(c.send_msi(msi, 0).expect("valid"), IrqStatus::Delivered(1));
    assert_eq!(take(&mut c, 0), None);
    assert_eq!(take(&mut c, 1), Some(0x51));
    assert_eq!(c.counts().msi, 1);
    let bad = MsiMessage {
        address: 0x1234_0000,
        data: 0x51,
    };
    assert!(matches!(c.send_msi(bad, 0), Err(ChipsetError::Msi(_))));
}

fn posted_msi(dest: u32, vector: u8) -> MsiMessage {
    MsiMessage {
        address: 0xFEE0_0000 | u64::from(dest) << 12,
        data: u32::from(vector),
    }
}

#[test]
fn posted_msi_is_accepted_by_its_lapic_as_a_sent_one_is() {
    use crate::posted::Posted;
    let mut c = chipset(2, LapicPlacement::Model);
    enable_lapics(&mut c);
    let door = c.posted();
    assert_eq!(door.post_msi(posted_msi(1, 0x51)), Some(Posted::Vcpu(1)));
    assert_eq!(c.pending(1).vector, None, "on the bus until accepted");
    c.accept_posted(0);
    assert_eq!(take(&mut c, 0), None);
    assert_eq!(take(&mut c, 1), Some(0x51));
    assert_eq!(c.counts().msi, 1);
    // A software-disabled LAPIC refuses it at acceptance, as it would refuse
    // the message; an illegal vector raises its error there too.
    write32(&mut c, 1, SVR, 0xFF);
    assert_eq!(door.post_msi(posted_msi(1, 0x52)), Some(Posted::Vcpu(1)));
    assert_eq!(door.post_msi(posted_msi(0, 0x05)), Some(Posted::Vcpu(0)));
    c.accept_posted(0);
    write32(&mut c, 1, SVR, 0x1FF);
    assert_eq!(take(&mut c, 1), None);
    assert_eq!(take(&mut c, 0), None);
    // ESR reads what the last write to it latched.
    write32(&mut c, 0, LAPIC + 0x280, 0);
    assert_ne!(
        read32(&mut c, 0, LAPIC + 0x280) & 0x40,
        0,
        "receive illegal vector"
    );
}

#[test]
fn posted_msis_follow_apic_id_and_mode_changes() {
    use crate::lapic::MSR_APIC_BASE;
    use crate::posted::Posted;
    let mut c = chipset(2, LapicPlacement::Model);
    enable_lapics(&mut c);
    let door = c.posted();
    // vCPU 1 moves to APIC ID 5: ID 1 is nobody's now.
    write32(&mut c, 1, LAPIC + 0x20, 5 << 24);
    assert_eq!(door.post_msi(posted_msi(1, 0x51)), None);
    assert_eq!(door.post_msi(posted_msi(5, 0x51)), Some(Posted::Vcpu(1)));
    // Both at ID 5: the full resolution decides (it delivers to both).
    write32(&mut c, 0, LAPIC + 0x20, 5 << 24);
    assert_eq!(door.post_msi(posted_msi(5, 0x52)), None);
    // x2APIC mode on vCPU 0 (its ID becomes its index again).
    let base = c.msr_read(0, MSR_APIC_BASE, 0).expect("APIC_BASE");
    c.msr_write(0, MSR_APIC_BASE, base | 1 << 10, 0)
        .expect("x2APIC on");
    assert_eq!(door.post_msi(posted_msi(0, 0x53)), Some(Posted::Vcpu(0)));
    // Hardware-disabled: nobody answers to its ID.
    c.msr_write(1, MSR_APIC_BASE, base & !(1 << 11), 0)
        .expect("off");
    assert_eq!(door.post_msi(posted_msi(5, 0x54)), None);
    c.accept_posted(0);
    assert_eq!(take(&mut c, 0), Some(0x53));
}

#[test]
fn split_mode_posts_every_msi_for_the_hypervisor() {
    use crate::posted::Posted;
    let mut c = chipset(2, LapicPlacement::External);
    let door = c.posted();
    let Some(Posted::External(msg)) = door.post_msi(posted_msi(1, 0x51)) else {
        panic!("split mode hands every MSI back");
    };
    assert_eq!((msg.vector, msg.destination), (0x51, 1));
    c.accept_posted(0);
    assert_eq!(c.counts().msi, 1);
    assert!(events(&mut c).is_empty());
}

#[test]
fn fixed_ipi_from_the_icr_reaches_the_other_vcpu_and_kicks_it() {
    let mut c = chipset(2, LapicPlacement::Model);
    enable_lapics(&mut c);
    events(&mut c);
    write32(&mut c, 0, ICR_HIGH, 1 << 24);
    write32(&mut c, 0, ICR_LOW, 0x61);
    assert!(events(&mut c).contains(&ChipEvent::Kick(1)));
    assert_eq!(take(&mut c, 1), Some(0x61));
    assert_eq!(take(&mut c, 0), None);
    assert_eq!(c.counts().ipi, 1);
}

#[test]
fn init_and_sipi_from_the_icr_are_reported_for_the_ap() {
    let mut c = chipset(2, LapicPlacement::Model);
    enable_lapics(&mut c);
    events(&mut c);
    write32(&mut c, 0, ICR_HIGH, 1 << 24);
    write32(&mut c, 0, ICR_LOW, 0x4500); // INIT, level assert
    write32(&mut c, 0, ICR_LOW, 0x4608); // SIPI vector 8
    let startups: Vec<_> = events(&mut c)
        .into_iter()
        .filter(|e| matches!(e, ChipEvent::Startup { .. }))
        .collect();
    assert_eq!(
        startups,
        vec![
            ChipEvent::Startup {
                vcpu: 1,
                event: StartupEvent::Init
            },
            ChipEvent::Startup {
                vcpu: 1,
                event: StartupEvent::Sipi { vector: 8 }
            },
        ]
    );
}

#[test]
fn pic_interrupt_reaches_the_bsp_through_lint0_in_extint_mode() {
    let mut c = chipset(2, LapicPlacement::Model);
    c.lapic_mut(0).expect("bsp").setup_virtual_wire();
    // ICW1-4 on the master: base 0x20, auto-EOI off; unmask IRQ 1 only.
    for (port, value) in [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xFD),
    ] {
        c.pio_write(port, &[value], 0);
    }
    assert_eq!(
        c.set_gsi(1, SourceId::USER, true, 0),
        IrqStatus::Delivered(1)
    );
    assert!(c.pending(0).extint);
    assert!(!c.pending(1).extint, "LINT0 of the AP is masked");
    assert_eq!(take(&mut c, 0), Some(0x21));
    // Non-specific EOI to the master acknowledges GSI 1.
    c.set_gsi(1, SourceId::USER, false, 0);
    c.pio_write(0x20, &[0x20], 0);
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(1)));
}

#[test]
fn lapic_timer_fires_through_advance_and_kicks_its_vcpu() {
    let mut c = chipset(2, LapicPlacement::Model);
    enable_lapics(&mut c);
    write32(&mut c, 1, TDCR, 0xB); // divide by 1
    write32(&mut c, 1, LVT_TIMER, 0x70); // one-shot, vector 0x70
    write32(&mut c, 1, TMICT, 1_000_000);
    let deadline = c.next_deadline().expect("timer armed");
    assert_eq!(deadline, 1_000_000);
    events(&mut c);
    c.advance(deadline);
    assert!(events(&mut c).contains(&ChipEvent::Kick(1)));
    assert_eq!(take(&mut c, 1), Some(0x70));
    assert_eq!(c.counts().lapic_timer, 1);
    assert_eq!(c.next_deadline(), None, "one-shot timer done");
}

#[test]
fn nmi_watchdog_sends_pit_ticks_as_nmi_to_lvt0_nmi_vcpus() {
    let mut c = chipset(2, LapicPlacement::Model);
    enable_lapics(&mut c);
    write32(&mut c, 1, LVT0, 0x400); // NMI mode, unmasked
    program_pit(&mut c, 11932, 0);
    let due = c.next_deadline().expect("armed");
    c.advance(due);
    assert!(c.pending(1).nmi);
    assert!(!c.pending(0).nmi);
    assert_eq!(decide(&c.pending(1), &OPEN), Decision::InjectNmi);
}

#[test]
fn split_mode_eoi_with_broadcast_suppressed_leaves_remote_irr_and_acks_edges() {
    let mut c = chipset(1, LapicPlacement::External);
    mask_pics(&mut c);
    set_rte(&mut c, 5, 0x8000 | 0x45, 0); // level
    set_rte(&mut c, 2, 0x30, 0); // edge: the PIT's pin
    c.set_gsi(5, SourceId::USER, true, 0);
    c.set_gsi(5, SourceId::USER, false, 0);
    events(&mut c);
    // The guest set SVR bit 12 on its (external) LAPIC and EOIs.
    c.external_lapic_eoi(0x45, false, 0);
    assert_ne!(rte_low(&mut c, 5) & (1 << 14), 0, "remote IRR kept");
    assert!(!events(&mut c).contains(&ChipEvent::GsiAcked(5)));
    c.external_lapic_eoi(0x30, false, 0);
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(0)));
    // The directed EOI (or a broadcast) completes the level interrupt.
    c.external_lapic_eoi(0x45, true, 0);
    assert_eq!(rte_low(&mut c, 5) & (1 << 14), 0);
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(5)));
}

#[test]
fn split_mode_forwards_ioapic_messages_and_takes_eoi_back() {
    let mut c = chipset(2, LapicPlacement::External);
    mask_pics(&mut c);
    set_rte(&mut c, 5, 0x8000 | 0x45, 1 << 24);
    assert_eq!(
        c.set_gsi(5, SourceId::USER, true, 0),
        IrqStatus::Delivered(1)
    );
    let forwarded: Vec<_> = events(&mut c)
        .into_iter()
        .filter_map(|e| match e {
            ChipEvent::ExternalMessage(m) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(forwarded.len(), 1);
    assert_eq!(forwarded[0].vector, 0x45);
    assert_eq!(forwarded[0].destination, 1);
    assert_eq!(forwarded[0].trigger_mode, TriggerMode::Level);
    c.set_gsi(5, SourceId::USER, false, 0);
    c.ioapic_eoi(0x45, 0);
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(5)));
    assert_eq!(rte_low(&mut c, 5) & (1 << 14), 0);
    assert!(matches!(c.lapic(0), Err(ChipsetError::ExternalLapics)));
}

#[test]
fn each_vcpu_sees_its_own_lapic_at_the_same_address() {
    let mut c = chipset(3, LapicPlacement::Model);
    for cpu in 0..3 {
        assert_eq!(read32(&mut c, cpu, LAPIC + 0x20) >> 24, cpu as u32);
    }
    let mut data = [0u8; 4];
    assert!(!c.mmio_read(7, LAPIC + 0x20, &mut data, 0) || c.vcpus() > 7);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Pio(u16, u8),
        PioRead(u16),
        Mmio(usize, u64, u32),
        MmioRead(usize, u64),
        Msr(usize, u32, u64),
        Gsi(u32, u8, bool),
        Msi(u64, u32),
        Eoi(u8),
        Take(usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let port = prop_oneof![
            Just(0x20u16),
            Just(0x21),
            Just(0xA0),
            Just(0xA1),
            Just(0x4D0),
            Just(0x4D1),
            0x40u16..=0x43,
            Just(0x61)
        ];
        let mmio = prop_oneof![
            (0u64..0x1000).prop_map(|o| LAPIC + o),
            (0u64..0x100).prop_map(|o| IOAPIC_BASE + o)
        ];
        prop_oneof![
            (port.clone(), any::<u8>()).prop_map(|(p, v)| Op::Pio(p, v)),
            port.prop_map(Op::PioRead),
            (0usize..4, mmio.clone(), any::<u32>()).prop_map(|(c, a, v)| Op::Mmio(c, a, v)),
            (0usize..4, mmio).prop_map(|(c, a)| Op::MmioRead(c, a)),
            (
                0usize..4,
                prop_oneof![0x800u32..0x900, Just(0x1B), Just(0x6E0)],
                any::<u64>()
            )
                .prop_map(|(c, m, v)| Op::Msr(c, m, v)),
            (0u32..30, 0u8..64, any::<bool>()).prop_map(|(g, s, l)| Op::Gsi(g, s, l)),
            (
                prop_oneof![Just(0xFEE0_0000u64), any::<u64>()],
                any::<u32>()
            )
                .prop_map(|(a, d)| Op::Msi(a, d)),
            any::<u8>().prop_map(Op::Eoi),
            (0usize..4).prop_map(Op::Take),
            (0u64..50_000_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever a guest does through any register surface, and whatever
        /// devices do to the lines, nothing panics (the fuzz targets' twin).
        #[test]
        fn no_sequence_panics(ops in proptest::collection::vec(op(), 1..120), external in any::<bool>()) {
            let placement = if external { LapicPlacement::External } else { LapicPlacement::Model };
            let mut c = chipset(3, placement);
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Pio(p, v) => { c.pio_write(p, &[v], now); }
                    Op::PioRead(p) => { c.pio_read(p, &mut [0u8; 2], now); }
                    Op::Mmio(cpu, a, v) => { c.mmio_write(cpu, a, &v.to_le_bytes(), now); }
                    Op::MmioRead(cpu, a) => { c.mmio_read(cpu, a, &mut [0u8; 4], now); }
                    Op::Msr(cpu, m, v) => { let _ = c.msr_write(cpu, m, v, now); let _ = c.msr_read(cpu, m, now); }
                    Op::Gsi(g, s, l) => { c.set_gsi(g, SourceId::new(s).expect("< 64"), l, now); }
                    Op::Msi(a, d) => { let _ = c.send_msi(MsiMessage { address: a, data: d }, now); }
                    Op::Eoi(v) => c.ioapic_eoi(v, now),
                    Op::Take(cpu) => { let d = decide(&c.pending(cpu), &OPEN); c.acknowledge(cpu, d, now); }
                    Op::Advance(dt) => { now += dt; c.advance(now); }
                }
                let _ = c.drain_events().count();
                if let Some(deadline) = c.next_deadline() {
                    // Timers never ask to be served in the past twice.
                    if deadline <= now { c.advance(now); }
                }
            }
        }
    }
}

#[test]
fn isa_gsi_reaching_pic_and_ioapic_reports_the_sum_as_kvm_does() {
    let mut c = chipset(1, LapicPlacement::Model);
    for cpu in 0..c.vcpus() {
        write32(&mut c, cpu, SVR, 0x1FF);
    }
    // PIC unmasked (its reset state) and the IOAPIC pin unmasked: both count.
    set_rte(&mut c, 3, 0x33, 0);
    assert_eq!(
        c.set_gsi(3, SourceId::USER, true, 0),
        IrqStatus::Delivered(2)
    );
    // IOAPIC-only GSIs have one route.
    set_rte(&mut c, 17, 0x34, 0);
    assert_eq!(
        c.set_gsi(17, SourceId::USER, true, 0),
        IrqStatus::Delivered(1)
    );
    // A GSI with no route at all is ignored.
    assert_eq!(c.set_gsi(2, SourceId::USER, true, 0), IrqStatus::Masked);
}

const VERSION: u64 = LAPIC + 0x30;
const TPR: u64 = LAPIC + 0x80;

/// Initialise the master 8259A as a BIOS does: vector base 0x20, slave on
/// IR2, 8086 mode, then `imr` as the mask.
fn init_master_pic(c: &mut Chipset, imr: u8) {
    for (port, value) in [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, imr),
    ] {
        c.pio_write(port, &[value], 0);
    }
}

#[test]
fn pit_tick_reaches_pic_irq0_and_reinject_waits_for_the_pic_eoi() {
    let mut c = chipset(1, LapicPlacement::Model);
    c.lapic_mut(0).expect("bsp").setup_virtual_wire();
    init_master_pic(&mut c, 0xFE); // IRQ 0 only; IOAPIC pin 2 stays masked
    program_pit(&mut c, 11932, 0); // ~10 ms
    let first = c.next_deadline().expect("PIT armed");
    let late = first + 35_000_000; // a stall: more ticks are owed
    c.advance(late);
    assert_eq!(c.counts().pit, 1);
    assert_eq!(take(&mut c, 0), Some(0x20), "IRQ 0 at the master's base");
    c.advance(late + 1);
    assert_eq!(c.counts().pit, 1, "no second tick before the EOI");
    c.pio_write(0x20, &[0x20], late + 2); // non-specific EOI
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(0)));
    let due = c.next_deadline().expect("backlog due");
    c.advance(due);
    assert_eq!(c.counts().pit, 2, "the owed tick follows the PIC EOI");
    assert_eq!(take(&mut c, 0), Some(0x20));
}

#[test]
fn unmasking_pic_irq0_drops_the_pit_backlog() {
    let mut c = chipset(1, LapicPlacement::Model);
    init_master_pic(&mut c, 0xFF);
    program_pit(&mut c, 11932, 0);
    let first = c.next_deadline().expect("armed");
    let late = first + 50_000_000;
    c.advance(late);
    let owed = c.pit().backlog();
    assert!(owed > 0);
    c.pio_write(0x21, &[0xFD], late); // IRQ 1 unmasked, IRQ 0 still masked
    assert_eq!(c.pit().backlog(), owed);
    c.pio_write(0x21, &[0xFC], late); // IRQ 0 unmasked
    assert_eq!(c.pit().backlog(), 0);
}

#[test]
fn nmi_watchdog_follows_every_tick_only_while_lvt0_is_nmi() {
    let mut c = chipset(2, LapicPlacement::Model);
    enable_lapics(&mut c);
    set_rte(&mut c, 2, 0x30, 0); // the PIT's pin, edge, to vCPU 0
    write32(&mut c, 1, LVT0, 0x400); // vCPU 1: LINT0 in NMI mode
    program_pit(&mut c, 11932, 0);
    for tick in 1..=3 {
        events(&mut c);
        let due = c.next_deadline().expect("armed");
        c.advance(due);
        assert_eq!(c.counts().pit, tick);
        assert!(c.pending(1).nmi, "tick {tick}");
        assert!(events(&mut c).contains(&ChipEvent::Kick(1)));
        assert_eq!(c.acknowledge(1, Decision::InjectNmi, due), None);
        assert!(!c.pending(1).nmi);
        assert!(!c.pending(0).nmi, "vCPU 0's LVT0 is not in NMI mode");
        assert_eq!(take(&mut c, 0), Some(0x30));
        write32(&mut c, 0, EOI, 0); // the ack lets the next tick through
    }
    write32(&mut c, 1, LVT0, 0x1_0400); // masked: the watchdog stops
    let due = c.next_deadline().expect("armed");
    c.advance(due);
    assert_eq!(c.counts().pit, 4);
    assert!(!c.pending(1).nmi);
}

#[test]
fn extint_bypasses_tpr_and_ppr() {
    let mut c = chipset(1, LapicPlacement::Model);
    c.lapic_mut(0).expect("bsp").setup_virtual_wire();
    init_master_pic(&mut c, 0xF5); // IRQ 1 and 3
    write32(&mut c, 0, TPR, 0xFF); // blocks every vector
    c.set_gsi(1, SourceId::USER, true, 0);
    let pending = c.pending(0);
    assert!(pending.extint);
    assert_eq!(decide(&pending, &OPEN), Decision::InjectExtInt);
    assert_eq!(c.acknowledge(0, Decision::InjectExtInt, 0), Some(0x21));
    c.set_gsi(1, SourceId::USER, false, 0);
    c.pio_write(0x20, &[0x20], 0);
    // An ExtINT message from the IOAPIC (LINT0 masked) is not held back either.
    write32(&mut c, 0, LVT0, 0x1_0700);
    set_rte(&mut c, 3, 0x700, 0); // ExtINT, edge, to vCPU 0
    c.set_gsi(3, SourceId::USER, true, 0);
    let pending = c.pending(0);
    assert!(pending.extint);
    assert_eq!(pending.vector, None);
    assert_eq!(decide(&pending, &OPEN), Decision::InjectExtInt);
    assert_eq!(
        c.acknowledge(0, Decision::InjectExtInt, 0),
        Some(0x23),
        "the vector comes from the PIC's INTA"
    );
}

#[test]
fn pic_interrupt_reaches_a_hardware_disabled_lapic_directly() {
    let mut c = chipset(1, LapicPlacement::Model);
    init_master_pic(&mut c, 0xFD);
    c.set_gsi(1, SourceId::USER, true, 0);
    assert!(
        !c.pending(0).extint,
        "an enabled LAPIC with LINT0 masked keeps the PIC out"
    );
    c.msr_write(0, 0x1B, 0xFEE0_0100, 0)
        .expect("disabling is legal");
    assert!(c.pending(0).extint);
    assert_eq!(take(&mut c, 0), Some(0x21));
    // A new request while disabled kicks the vCPU.
    c.set_gsi(1, SourceId::USER, false, 0);
    c.pio_write(0x20, &[0x20], 0);
    events(&mut c);
    c.set_gsi(1, SourceId::USER, true, 0);
    assert!(events(&mut c).contains(&ChipEvent::Kick(0)));
}

#[test]
fn rte_retarget_to_another_vcpu_while_in_service_keeps_the_eoi() {
    let mut c = chipset(2, LapicPlacement::Model);
    enable_lapics(&mut c);
    set_rte(&mut c, 10, 0x8000 | 0x41, 0); // level, to vCPU 0
    c.set_gsi(10, SourceId::USER, true, 0);
    assert_eq!(take(&mut c, 0), Some(0x41));
    // Retarget to vCPU 1 by writing only the high half, 0x41 still in service.
    write32(&mut c, 0, IOAPIC_BASE, 0x11 + 2 * 10);
    write32(&mut c, 0, IOAPIC_BASE + 0x10, 1 << 24);
    events(&mut c);
    write32(&mut c, 0, EOI, 0); // vCPU 0 ends it
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(10)));
    assert_eq!(
        take(&mut c, 1),
        Some(0x41),
        "still high: sent to the new target"
    );
    assert_eq!(take(&mut c, 0), None);
    c.set_gsi(10, SourceId::USER, false, 0);
    write32(&mut c, 1, EOI, 0);
    assert_eq!(rte_low(&mut c, 10) & (1 << 14), 0, "remote IRR clear");
}

#[test]
fn lapic_advertises_eoi_broadcast_suppression_only_with_ioapic_v20() {
    for (version, directed) in [(IoapicVersion::V11, false), (IoapicVersion::V20, true)] {
        let mut c = Chipset::new(ChipsetConfig {
            vcpus: 2,
            lapics: LapicPlacement::Model,
            ioapic_version: version,
            pit_policy: LostTickPolicy::Reinject,
            tsc_hz: 1_000_000_000,
            tsc_offset: 0,
        })
        .expect("valid config");
        for cpu in 0..2 {
            assert_eq!(
                read32(&mut c, cpu, VERSION) & (1 << 24) != 0,
                directed,
                "{version:?}"
            );
            write32(&mut c, cpu, SVR, 0x11FF);
            assert_eq!(
                read32(&mut c, cpu, SVR) & (1 << 12) != 0,
                directed,
                "{version:?}"
            );
        }
    }
}

#[test]
fn suppressed_eoi_broadcast_leaves_the_eoi_to_the_ioapic_register() {
    let mut c = chipset(1, LapicPlacement::Model); // IOAPIC 0x20
    mask_pics(&mut c);
    write32(&mut c, 0, SVR, 0x11FF); // enabled, EOI broadcast suppressed
    set_rte(&mut c, 10, 0x8000 | 0x41, 0);
    c.set_gsi(10, SourceId::USER, true, 0);
    assert_eq!(take(&mut c, 0), Some(0x41));
    c.set_gsi(10, SourceId::USER, false, 0);
    events(&mut c);
    write32(&mut c, 0, EOI, 0);
    assert!(!events(&mut c).contains(&ChipEvent::GsiAcked(10)));
    assert_ne!(
        rte_low(&mut c, 10) & (1 << 14),
        0,
        "remote IRR waits for the directed EOI"
    );
    write32(&mut c, 0, IOAPIC_BASE + 0x40, 0x41);
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(10)));
    assert_eq!(rte_low(&mut c, 10) & (1 << 14), 0);
}

#[test]
fn pit_pulse_on_gsi0_does_not_drop_a_device_holding_the_line() {
    let mut c = chipset(1, LapicPlacement::Model);
    enable_lapics(&mut c);
    set_rte(&mut c, 2, 0x8000 | 0x30, 0); // GSI 0's pin, level
    let device = SourceId::new(9).expect("id");
    assert_eq!(c.set_gsi(0, device, true, 0), IrqStatus::Delivered(1));
    assert_eq!(take(&mut c, 0), Some(0x30));
    program_pit(&mut c, 11932, 0);
    let due = c.next_deadline().expect("armed");
    c.advance(due); // the PIT raises and lowers GSI 0 as its own source
    assert_eq!(c.counts().pit, 1);
    write32(&mut c, 0, EOI, 0);
    assert_eq!(
        take(&mut c, 0),
        Some(0x30),
        "the device still holds GSI 0 high"
    );
    c.set_gsi(0, device, false, due);
    write32(&mut c, 0, EOI, 0);
    assert_eq!(take(&mut c, 0), None);
}

#[test]
fn gsi_raise_reports_how_many_vcpus_it_reached() {
    let mut c = chipset(3, LapicPlacement::Model);
    enable_lapics(&mut c);
    set_rte(&mut c, 17, 0x34, 0xFF << 24); // edge, physical broadcast
    let status = c.set_gsi(17, SourceId::USER, true, 0);
    assert_eq!(status, IrqStatus::Delivered(3));
    assert_eq!(status.to_kvm(), 3);
    let status = c.set_gsi(17, SourceId::USER, true, 0);
    assert_eq!(status, IrqStatus::Coalesced, "already raised");
    assert_eq!(status.to_kvm(), 0);
    c.set_gsi(17, SourceId::USER, false, 0);
    set_rte(&mut c, 17, 0x1_0034, 0xFF << 24);
    let status = c.set_gsi(17, SourceId::USER, true, 0);
    assert_eq!(status, IrqStatus::Masked);
    assert_eq!(status.to_kvm(), -1);
}

#[test]
fn pulsing_an_edge_gsi_delivers_once_per_pulse() {
    let mut c = chipset(1, LapicPlacement::Model);
    enable_lapics(&mut c);
    set_rte(&mut c, 5, 0x45, 0);
    for _ in 0..2 {
        c.set_gsi(5, SourceId::USER, true, 0);
        c.set_gsi(5, SourceId::USER, false, 0);
        assert_eq!(take(&mut c, 0), Some(0x45));
        assert_eq!(take(&mut c, 0), None, "one pulse, one interrupt");
        events(&mut c);
        write32(&mut c, 0, EOI, 0);
        assert!(events(&mut c).contains(&ChipEvent::GsiAcked(5)));
    }
}

#[test]
fn new_pending_events_kick_only_their_vcpu() {
    let mut c = chipset(3, LapicPlacement::Model);
    enable_lapics(&mut c);
    c.lapic_mut(0).expect("bsp").setup_virtual_wire();
    set_rte(&mut c, 18, 0x52, 1 << 24);
    events(&mut c);
    let msi = MsiMessage {
        address: 0xFEE0_2000,
        data: 0x51,
    };
    c.send_msi(msi, 0).expect("valid");
    assert_eq!(events(&mut c), vec![ChipEvent::Kick(2)], "MSI");
    c.set_gsi(18, SourceId::USER, true, 0);
    assert_eq!(events(&mut c), vec![ChipEvent::Kick(1)], "IOAPIC");
    init_master_pic(&mut c, 0xFD);
    events(&mut c);
    c.set_gsi(1, SourceId::USER, true, 0);
    assert_eq!(events(&mut c), vec![ChipEvent::Kick(0)], "PIC via LINT0");
}

#[test]
fn x2apic_icr_to_a_cluster_beyond_the_map_reaches_nobody() {
    let mut c = chipset(2, LapicPlacement::Model);
    enable_lapics(&mut c);
    for cpu in 0..2 {
        c.msr_write(cpu, 0x1B, 0xFEE0_0C00, 0).expect("to x2APIC");
    }
    for destination in [0xFFFF_0002u64, 0x1000_0002, 0x8000_0000] {
        c.msr_write(0, 0x830, destination << 32 | 0x800 | 0x61, 0)
            .expect("valid ICR");
        c.msr_write(0, 0x830, destination << 32 | 0x61, 0)
            .expect("valid ICR");
    }
    assert_eq!(c.pending(1).vector, None);
    assert_eq!(c.pending(0).vector, None);
    // Cluster 0, bit 1 is vCPU 1.
    c.msr_write(0, 0x830, 0x0000_0002u64 << 32 | 0x800 | 0x61, 0)
        .expect("valid ICR");
    assert_eq!(take(&mut c, 1), Some(0x61));
}

#[test]
fn resampled_level_source_is_lowered_before_the_ioapic_eoi_can_redeliver() {
    let mut c = chipset(1, LapicPlacement::Model);
    enable_lapics(&mut c);
    set_rte(&mut c, 10, 0x8000 | 0x41, 0);
    let device = SourceId::new(7).expect("id");
    c.set_resample(10, device, true);
    assert_eq!(c.set_gsi(10, device, true, 0), IrqStatus::Delivered(1));
    assert_eq!(take(&mut c, 0), Some(0x41));
    events(&mut c);
    write32(&mut c, 0, EOI, 0);
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(10)));
    assert_eq!(take(&mut c, 0), None, "the EOI lowered the line first");
    assert_eq!(rte_low(&mut c, 10) & (1 << 14), 0, "remote IRR clear");
    // The device still needs service: re-asserting delivers again.
    assert_eq!(c.set_gsi(10, device, true, 0), IrqStatus::Delivered(1));
    assert_eq!(take(&mut c, 0), Some(0x41));
}

#[test]
fn resample_leaves_other_sources_of_a_shared_line_asserted() {
    let mut c = chipset(1, LapicPlacement::Model);
    enable_lapics(&mut c);
    set_rte(&mut c, 11, 0x8000 | 0x42, 0);
    let resampled = SourceId::new(8).expect("id");
    let plain = SourceId::new(9).expect("id");
    c.set_resample(11, resampled, true);
    c.set_gsi(11, resampled, true, 0);
    c.set_gsi(11, plain, true, 0);
    assert_eq!(take(&mut c, 0), Some(0x42));
    write32(&mut c, 0, EOI, 0);
    assert_eq!(
        take(&mut c, 0),
        Some(0x42),
        "the plain source still holds it"
    );
    c.set_gsi(11, plain, false, 0);
    write32(&mut c, 0, EOI, 0);
    assert_eq!(take(&mut c, 0), None);
    // Turned off again, the source is an ordinary level.
    c.set_resample(11, resampled, false);
    c.set_gsi(11, resampled, true, 0);
    assert_eq!(take(&mut c, 0), Some(0x42));
    write32(&mut c, 0, EOI, 0);
    assert_eq!(take(&mut c, 0), Some(0x42), "no longer lowered by the EOI");
}

#[test]
fn resample_runs_before_a_directed_eoi_too() {
    let mut c = chipset(1, LapicPlacement::Model); // IOAPIC 0x20
    mask_pics(&mut c);
    write32(&mut c, 0, SVR, 0x11FF); // EOI broadcast suppressed
    set_rte(&mut c, 10, 0x8000 | 0x41, 0);
    let device = SourceId::new(7).expect("id");
    c.set_resample(10, device, true);
    c.set_gsi(10, device, true, 0);
    assert_eq!(take(&mut c, 0), Some(0x41));
    write32(&mut c, 0, EOI, 0);
    write32(&mut c, 0, IOAPIC_BASE + 0x40, 0x41);
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(10)));
    assert_eq!(take(&mut c, 0), None);
}

#[test]
fn resample_through_a_split_mode_eoi_exit() {
    let mut c = chipset(1, LapicPlacement::External);
    mask_pics(&mut c);
    set_rte(&mut c, 10, 0x8000 | 0x41, 0);
    let device = SourceId::new(7).expect("id");
    c.set_resample(10, device, true);
    c.set_gsi(10, device, true, 0);
    assert_eq!(
        events(&mut c)
            .iter()
            .filter(|e| matches!(e, ChipEvent::ExternalMessage(_)))
            .count(),
        1
    );
    c.external_lapic_eoi(0x41, true, 0);
    let after = events(&mut c);
    assert!(after.contains(&ChipEvent::GsiAcked(10)));
    assert!(
        !after
            .iter()
            .any(|e| matches!(e, ChipEvent::ExternalMessage(_))),
        "no redelivery: {after:?}"
    );
}

#[test]
fn resampled_pic_level_line_is_lowered_by_the_pic_eoi() {
    let mut c = chipset(1, LapicPlacement::Model);
    c.lapic_mut(0).expect("bsp").setup_virtual_wire();
    init_master_pic(&mut c, !(1 << 5));
    c.pio_write(0x4D0, &[1 << 5], 0); // ELCR: IRQ 5 level
    let device = SourceId::new(7).expect("id");
    c.set_resample(5, device, true);
    c.set_gsi(5, device, true, 0);
    assert_eq!(take(&mut c, 0), Some(0x25));
    events(&mut c);
    c.pio_write(0x20, &[0x20], 0); // non-specific EOI
    assert!(events(&mut c).contains(&ChipEvent::GsiAcked(5)));
    assert_eq!(take(&mut c, 0), None, "the line went low with the EOI");
    c.set_gsi(5, device, true, 0);
    assert_eq!(take(&mut c, 0), Some(0x25), "re-asserting delivers again");
}

#[test]
fn pv_eoi_is_allowed_for_a_lone_edge_vector_without_an_ioapic_pin() {
    let mut c = chipset(1, LapicPlacement::Model);
    enable_lapics(&mut c);
    assert!(!c.pv_eoi_allowed(0), "nothing in service");
    write32(&mut c, 0, ICR_LOW, 0x4_0000 | 0x61); // self IPI, edge
    assert_eq!(take(&mut c, 0), Some(0x61));
    assert!(c.pv_eoi_allowed(0));
    write32(&mut c, 0, ICR_LOW, 0x4_0000 | 0x51); // a lower one waits in IRR
    assert!(!c.pv_eoi_allowed(0), "the EOI must exit to deliver 0x51");
    c.pv_eoi(0, 0);
    assert_eq!(take(&mut c, 0), Some(0x51), "the PV EOI ended 0x61");
    // A vector an IOAPIC pin uses (edge here) feeds ack notifiers: no PV EOI.
    c.pv_eoi(0, 0);
    set_rte(&mut c, 10, 0x41, 0);
    c.set_gsi(10, SourceId::USER, true, 0);
    c.set_gsi(10, SourceId::USER, false, 0);
    assert_eq!(take(&mut c, 0), Some(0x41));
    assert!(!c.pv_eoi_allowed(0));
    // Level vectors need their EOI broadcast: no PV EOI either.
    c.pv_eoi(0, 0);
    set_rte(&mut c, 10, 0x8000 | 0x42, 0);
    c.set_gsi(10, SourceId::USER, true, 0);
    assert_eq!(take(&mut c, 0), Some(0x42));
    assert!(!c.pv_eoi_allowed(0));
    c.pv_eoi(0, 0);
    assert!(
        events(&mut c).contains(&ChipEvent::GsiAcked(10)),
        "a PV EOI still acks"
    );
}

#[test]
fn nmi_watchdog_reaches_external_lapics_the_caller_saw_in_lvt0_nmi_mode() {
    // Discard, so every tick pulses without waiting for an ack.
    let mut c = Chipset::new(ChipsetConfig {
        vcpus: 2,
        lapics: LapicPlacement::External,
        ioapic_version: IoapicVersion::V20,
        pit_policy: LostTickPolicy::Discard,
        tsc_hz: 1_000_000_000,
        tsc_offset: 0,
    })
    .expect("valid config");
    mask_pics(&mut c);
    program_pit(&mut c, 1193, 0);
    let nmis = |c: &mut Chipset| -> Vec<u32> {
        events(c)
            .iter()
            .filter_map(|e| match e {
                ChipEvent::ExternalMessage(m)
                    if m.delivery_mode == crate::delivery::DeliveryMode::Nmi =>
                {
                    Some(m.destination)
                }
                _ => None,
            })
            .collect()
    };
    let tick = c.next_deadline().expect("PIT armed");
    c.advance(tick);
    assert!(nmis(&mut c).is_empty(), "no LVT0 in NMI mode yet");
    c.set_external_lvt0_nmi(1, true);
    let tick = c.next_deadline().expect("PIT armed");
    c.advance(tick);
    assert_eq!(nmis(&mut c), vec![1]);
    c.set_external_lvt0_nmi(1, false);
    let tick = c.next_deadline().expect("PIT armed");
    c.advance(tick);
    assert!(nmis(&mut c).is_empty());
}
