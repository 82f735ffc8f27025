use super::*;
use proptest::prelude::*;
use virq::delivery::{ApicBus, InterruptMessage};
use virq::ioapic::{IOREGSEL, IOWIN};

/// Accepts every message on one vCPU.
struct AcceptAll;

impl ApicBus for AcceptAll {
    fn deliver(&mut self, _msg: &InterruptMessage) -> usize {
        1
    }
}

/// A map with the host clock 5 s ahead of the virtual one, at virtual `now`.
fn clock(now: u64) -> ClockMap {
    ClockMap::at(5_000_000_000 + now as i64, now)
}

/// A PIC pair as a BIOS leaves it, with requests and services in flight.
fn programmed_pic() -> Pic {
    let mut pic = Pic::new();
    for (port, value) in [
        // Master: ICW1 (edge, cascade, ICW4), base 0x20, slave on IR2, 8086 mode.
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        // Slave: base 0x28, cascade identity 2.
        (0xA0, 0x11),
        (0xA1, 0x28),
        (0xA1, 0x02),
        (0xA1, 0x01),
        // Masks: master keeps IRQ 0, 1, 2 open; slave keeps IRQ 8 and 11.
        (0x21, 0xF8),
        (0xA1, 0xF6),
        // IRQ 5 and IRQ 11 level-triggered.
        (0x4D0, 0x20),
        (0x4D1, 0x08),
    ] {
        pic.write_port(port, value);
    }
    pic.set_irq(0, true);
    assert_eq!(pic.acknowledge(), 0x20);
    pic.set_irq(1, true);
    pic.set_irq(11, true);
    // Reads return ISR from now on.
    pic.write_port(0x20, 0x0B);
    pic.take_acked();
    pic
}

#[test]
fn pic_round_trip_keeps_programmed_state() {
    let state = programmed_pic().save();
    let (master, slave) = pic_to_kvm(&state);

    assert_eq!(master.irq_base, 0x20);
    assert_eq!(slave.irq_base, 0x28);
    assert_eq!(master.imr, 0xF8);
    assert_eq!(slave.imr, 0xF6);
    assert_eq!(master.isr, 0x01);
    // IRQ 1 and the cascade (slave's IRQ 11 pending).
    assert_eq!(master.irr, 0x06);
    // KVM's cascade line rests low; ours is high while the slave requests.
    assert_eq!(state.master.last_irr, 0x07);
    assert_eq!(master.last_irr, 0x03);
    assert_eq!(slave.irr, 0x08);
    assert_eq!(master.elcr, 0x20);
    assert_eq!(slave.elcr, 0x08);
    assert_eq!(master.elcr_mask, 0xF8);
    assert_eq!(slave.elcr_mask, 0xDE);
    assert_eq!(master.read_reg_select, 1);
    assert_eq!(master.init4, 1);
    assert_eq!(master.init_state, 0);

    let back = pic_from_kvm(&master, &slave);
    assert_eq!(back, state);
    let mut pic = Pic::new();
    pic.restore(&back).unwrap();
    assert_eq!(pic.save(), state);
}

#[test]
fn pic_single_mode_and_pending_acks_are_dropped() {
    let mut state = programmed_pic().save();
    state.master.single_mode = true;
    state.pending_acks = 0x0102;
    let (master, slave) = pic_to_kvm(&state);
    let back = pic_from_kvm(&master, &slave);
    assert!(!back.master.single_mode);
    assert_eq!(back.pending_acks, 0);
}

#[test]
fn pic_kvm_latched_cascade_request_raises_our_cascade_line() {
    let master = kvm_pic_state {
        irr: 0x04,
        last_irr: 0x01,
        ..Default::default()
    };
    let back = pic_from_kvm(&master, &kvm_pic_state::default());
    assert_eq!(back.master.last_irr, 0x05);
    let master = kvm_pic_state {
        irr: 0x00,
        last_irr: 0x04,
        ..Default::default()
    };
    assert_eq!(pic_from_kvm(&master, &master).master.last_irr, 0x00);
    // The slave has no cascade input: its bit 2 is an ordinary line.
    assert_eq!(pic_from_kvm(&master, &master).slave.last_irr, 0x04);
}

#[test]
fn pic_nonzero_kvm_bytes_are_true() {
    let k = kvm_pic_state {
        poll: 0x80,
        auto_eoi: 2,
        ..Default::default()
    };
    let back = pic_from_kvm(&k, &k);
    assert!(back.master.poll);
    assert!(back.master.auto_eoi);
    assert!(!back.master.special_mask);
}

/// Write `value` to indirect register `reg`.
fn ioapic_write(ioapic: &mut Ioapic, reg: u8, value: u32) {
    ioapic.mmio_write(IOREGSEL, &[reg], 0, &mut AcceptAll);
    ioapic.mmio_write(IOWIN, &value.to_le_bytes(), 0, &mut AcceptAll);
}

/// Program entry `pin` through the guest interface.
fn ioapic_rte(ioapic: &mut Ioapic, pin: u8, entry: u64) {
    ioapic_write(ioapic, 0x11 + 2 * pin, (entry >> 32) as u32);
    ioapic_write(ioapic, 0x10 + 2 * pin, entry as u32);
}

/// An IOAPIC with ID 5, edge and level entries, one level pin in service,
/// one masked level pin asserted, one active-low level pin idle (line high).
fn programmed_ioapic() -> Ioapic {
    let mut ioapic = Ioapic::new(IoapicVersion::V11);
    ioapic_write(&mut ioapic, 0x00, 5 << 24);
    // Pin 2: edge, vector 0x30, physical destination 1.
    ioapic_rte(&mut ioapic, 2, 0x0100_0000_0000_0030);
    // Pin 9: level, active high, vector 0x41, logical destination 0x03.
    ioapic_rte(&mut ioapic, 9, 0x0300_0000_0000_8841);
    // Pin 10: level, masked, vector 0x42.
    ioapic_rte(&mut ioapic, 10, 0x0000_0000_0001_8042);
    // Pin 11: level, active low, vector 0x43, lowest priority.
    ioapic_rte(&mut ioapic, 11, 0xFF00_0000_0000_A143);
    ioapic.set_irq(9, true, 0, &mut AcceptAll);
    ioapic.set_irq(10, true, 0, &mut AcceptAll);
    // Pin 11 idles high (de-asserted).
    ioapic.set_irq(11, true, 0, &mut AcceptAll);
    ioapic.set_irq(2, true, 0, &mut AcceptAll);
    ioapic.set_irq(2, false, 0, &mut AcceptAll);
    ioapic.mmio_write(IOREGSEL, &[0x14], 0, &mut AcceptAll);
    ioapic.take_acked_pins();
    ioapic
}

#[test]
fn ioapic_round_trip_keeps_programmed_state() {
    let state = programmed_ioapic().save();
    assert_eq!(state.irr, 1 << 9 | 1 << 10);
    let k = ioapic_to_kvm(&state);

    assert_eq!(k.id, 5);
    assert_eq!(k.ioregsel, 0x14);
    assert_eq!(k.base_address, 0xFEC0_0000);
    assert_eq!(k.irr, 1 << 9 | 1 << 10);
    let image = ioapic_image(&k);
    let entry = |pin: usize| u64::from_ne_bytes(field(&image, IOAPIC_REDIRTBL_OFFSET + 8 * pin));
    assert_eq!(entry(2), 0x0100_0000_0000_0030);
    // Remote IRR (bit 14) set: delivered, waiting for the EOI.
    assert_eq!(entry(9), 0x0300_0000_0000_C841);
    assert_eq!(entry(10), 0x0000_0000_0001_8042);
    // Active low: asserted (line low) when programmed, so delivered; its
    // line went high since, remote IRR still waits for the EOI.
    assert_eq!(entry(11), 0xFF00_0000_0000_E143);
    assert_eq!(entry(0), 0x0000_0000_0001_0000);

    let back = ioapic_from_kvm(&k, IoapicVersion::V11);
    assert_eq!(back, state);
    let mut ioapic = Ioapic::new(IoapicVersion::V11);
    ioapic.restore(&back).unwrap();
    assert_eq!(ioapic.save(), state);
}

#[test]
fn ioapic_masked_edge_pin_held_high_stays_asserted() {
    let mut ioapic = Ioapic::new(IoapicVersion::V11);
    ioapic_rte(&mut ioapic, 4, 0x0000_0000_0001_0031);
    ioapic.set_irq(4, true, 0, &mut AcceptAll);
    let state = ioapic.save();
    let k = ioapic_to_kvm(&state);
    assert_eq!(k.irr, 1 << 4);
    assert_eq!(ioapic_from_kvm(&k, IoapicVersion::V11), state);
}

#[test]
fn ioapic_unmasked_edge_pin_held_high_is_not_raised_again() {
    let mut ioapic = Ioapic::new(IoapicVersion::V11);
    ioapic_rte(&mut ioapic, 4, 0x31);
    ioapic.set_irq(4, true, 0, &mut AcceptAll);
    let k = ioapic_to_kvm(&ioapic.save());
    assert_eq!(k.irr, 0);
    assert_eq!(ioapic_from_kvm(&k, IoapicVersion::V11).line_levels, 0);
}

#[test]
fn ioapic_from_kvm_drops_reserved_delivery_status_and_edge_remote_irr() {
    let mut k = ioapic_to_kvm(&Ioapic::new(IoapicVersion::V11).save());
    // Pin 0: edge with remote IRR, delivery status and reserved bits 17-48.
    k.redirtbl[0] = kvm_ioapic_state__bindgen_ty_1 {
        bits: 0x0001_FFFF_FFFE_7030,
    };
    // Pin 1: level with remote IRR.
    k.redirtbl[1] = kvm_ioapic_state__bindgen_ty_1 {
        bits: 0x0000_0000_0000_C031,
    };
    let state = ioapic_from_kvm(&k, IoapicVersion::V11);
    assert_eq!(state.redirection_table[0], 0x0000_0000_0000_2030);
    assert_eq!(state.redirection_table[1], 0x0000_0000_0000_C031);
    Ioapic::new(IoapicVersion::V11).restore(&state).unwrap();
}

#[test]
fn ioapic_kvm_irr_on_active_low_level_pin_means_line_low() {
    let mut k = ioapic_to_kvm(&Ioapic::new(IoapicVersion::V11).save());
    // Pin 3 level active-low; pin 5 level active-low, not asserted.
    k.redirtbl[3] = kvm_ioapic_state__bindgen_ty_1 { bits: 0xA033 };
    k.redirtbl[5] = kvm_ioapic_state__bindgen_ty_1 { bits: 0xA035 };
    k.irr = 1 << 3;
    let state = ioapic_from_kvm(&k, IoapicVersion::V11);
    assert_eq!(state.line_levels, 1 << 5);
    assert_eq!(state.irr, 1 << 3);
    Ioapic::new(IoapicVersion::V11).restore(&state).unwrap();
}

#[test]
fn ioapic_wide_kvm_id_is_rejected_by_restore() {
    let mut k = ioapic_to_kvm(&Ioapic::new(IoapicVersion::V11).save());
    k.id = 0x100;
    let state = ioapic_from_kvm(&k, IoapicVersion::V11);
    assert_eq!(state.id, 0xFF);
    assert!(Ioapic::new(IoapicVersion::V11).restore(&state).is_err());
}

/// Counter 0 in mode 2 at 100 Hz loaded at 1 ms, counter 2 in mode 0 with
/// its gate high loaded at 2 ms, counter 1 untouched.
fn programmed_pit() -> Pit {
    let mut pit = Pit::new();
    pit.write_port(0x43, 0x34, 1_000_000);
    pit.write_port(0x40, 0x9C, 1_000_000);
    pit.write_port(0x40, 0x2E, 1_000_000);
    pit.write_port(0x61, 0x03, 1_500_000);
    pit.write_port(0x43, 0xB0, 2_000_000);
    pit.write_port(0x42, 0x00, 2_000_000);
    pit.write_port(0x42, 0x10, 2_000_000);
    pit
}

#[test]
fn pit_round_trip_keeps_programmed_state() {
    let state = programmed_pit().save();
    let map = clock(3_000_000);
    let k = pit_to_kvm(&state, &map);

    let [c0, c1, c2] = k.channels;
    assert_eq!((c0.mode, c0.count, c0.rw_mode), (2, 0x2E9C, 3));
    assert_eq!((c0.read_state, c0.write_state, c0.gate), (3, 3, 1));
    assert_eq!(c0.count_load_time, 5_001_000_000);
    assert_eq!(
        (c1.mode, c1.count, c1.gate),
        (KVM_PIT_MODE_UNPROGRAMMED, 0x10000, 1)
    );
    assert_eq!((c2.mode, c2.count, c2.rw_mode, c2.gate), (0, 0x1000, 3, 1));
    assert_eq!(c2.count_load_time, 5_002_000_000);
    assert_eq!(k.flags, KVM_PIT_FLAGS_SPEAKER_DATA_ON);

    let back = pit_from_kvm(&k, &map);
    assert_eq!(back, state);
    let mut pit = Pit::new();
    pit.restore(&back).unwrap();
    assert_eq!(pit.save(), state);
}

#[test]
fn pit_round_trip_keeps_latches_and_flip_flops() {
    let mut pit = programmed_pit();
    // Latch counter 2, read its low byte; latch counter 0's status.
    pit.write_port(0x43, 0x80, 2_100_000);
    pit.read_port(0x42, 2_100_000);
    pit.write_port(0x43, 0xE2, 2_100_000);
    // Counter 0: read the low byte of a live count.
    pit.write_port(0x43, 0x34, 2_200_000);
    pit.write_port(0x40, 0x00, 2_200_000);
    pit.write_port(0x40, 0x01, 2_200_000);
    pit.read_port(0x41, 2_300_000);
    let state = pit.save();
    assert_eq!(state.channels[2].count_latched, 2);
    let map = clock(2_300_000);
    let k = pit_to_kvm(&state, &map);
    assert_eq!(k.channels[2].count_latched, 2);
    assert_eq!(pit_from_kvm(&k, &map), state);
}

#[test]
fn pit_kvm_reset_state_is_our_power_on_state() {
    // What KVM_CREATE_PIT2 leaves: mode 0xff, access fields 0, count 65536,
    // gates of counters 0 and 1 high, loaded at creation.
    let channel = |gate| kvm_pit_channel_state {
        count: 0x10000,
        mode: KVM_PIT_MODE_UNPROGRAMMED,
        gate,
        count_load_time: 123_456_789,
        ..Default::default()
    };
    let k = kvm_pit_state2 {
        channels: [channel(1), channel(1), channel(0)],
        ..Default::default()
    };
    let state = pit_from_kvm(&k, &clock(10));
    assert_eq!(state, Pit::new().save());
    let again = pit_to_kvm(&state, &clock(10));
    for c in again.channels {
        assert_eq!(c.mode, KVM_PIT_MODE_UNPROGRAMMED);
    }
}

#[test]
fn pit_counter_waiting_for_its_count_keeps_its_mode_in_kvm() {
    let mut pit = programmed_pit();
    pit.write_port(0x43, 0x36, 4_000_000);
    let k = pit_to_kvm(&pit.save(), &clock(4_000_000));
    assert_eq!(k.channels[0].mode, 3);
    assert_eq!(k.channels[0].count, 0x2E9C);
}

#[test]
fn pit_kvm_mode_6_and_7_fold_and_count_0_is_65536() {
    let mut k = pit_to_kvm(&programmed_pit().save(), &clock(0));
    k.channels[0].mode = 6;
    k.channels[1].mode = 7;
    k.channels[1].count = 0;
    let state = pit_from_kvm(&k, &clock(0));
    assert_eq!(state.channels[0].mode, 2);
    assert_eq!(state.channels[1].mode, 3);
    assert_eq!(state.channels[1].count, 0x10000);
    assert!(!state.channels[1].null_count);
}

#[test]
fn pit_from_kvm_counts_past_expirations_as_delivered() {
    // Mode 2 with N = 1193 (about 1 ms) loaded at virtual 0, converted at 10.5 ms.
    let mut state = Pit::new().save();
    state.channels[0].mode = 2;
    state.channels[0].count = 1193;
    state.channels[0].null_count = false;
    let map = clock(10_500_000);
    let back = pit_from_kvm(&pit_to_kvm(&state, &map), &map);
    assert_eq!(back.irq0_epoch_ns, 0);
    assert_eq!(back.irq0_expirations, 10);

    let mut pit = Pit::new();
    pit.restore(&back).unwrap();
    assert!(!pit.advance(10_500_000));
    let next = pit.next_deadline().unwrap();
    assert!((10_990_000..=11_000_000).contains(&next), "{next}");
    assert!(pit.advance(next));
}

#[test]
fn pit_from_kvm_expired_one_shot_does_not_fire_again() {
    let mut state = Pit::new().save();
    state.channels[0].mode = 0;
    state.channels[0].count = 100;
    state.channels[0].null_count = false;
    state.channels[0].count_load_time = 1_000;
    let map = clock(1_000_000);
    let back = pit_from_kvm(&pit_to_kvm(&state, &map), &map);
    assert_eq!(back.irq0_expirations, 1);
    let mut pit = Pit::new();
    pit.restore(&back).unwrap();
    assert!(!pit.advance(2_000_000));
}

#[test]
fn pit_from_kvm_fast_periodic_counts_the_minimum_period() {
    // N = 2 is far below 200 us: expirations are counted every 200 us.
    let mut state = Pit::new().save();
    state.channels[0].mode = 2;
    state.channels[0].count = 2;
    state.channels[0].null_count = false;
    let map = clock(1_000_000);
    let back = pit_from_kvm(&pit_to_kvm(&state, &map), &map);
    assert_eq!(back.irq0_expirations, 5);
}

#[test]
fn clock_map_converts_both_ways_and_saturates() {
    let map = ClockMap::at(1_000, 400);
    assert_eq!(map.host_ns_at_virtual_zero, 600);
    assert_eq!(map.to_host(400), 1_000);
    assert_eq!(map.to_virtual(1_000), 400);
    assert_eq!(map.to_virtual(599), 0);
    assert_eq!(map.to_virtual(i64::MIN), 0);
    assert_eq!(map.to_host(u64::MAX), i64::MAX);
    let far = ClockMap {
        host_ns_at_virtual_zero: i128::MIN,
        virtual_now_ns: 0,
    };
    assert_eq!(far.to_host(0), i64::MIN);
    assert_eq!(far.to_virtual(0), u64::MAX);
}

#[test]
fn lapic_page_round_trips_byte_for_byte() {
    let mut page = [0u8; LAPIC_PAGE_SIZE];
    for (i, b) in page.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let k = lapic_page_to_kvm(&page);
    assert_eq!(k.regs[0x20].to_ne_bytes(), [page[0x20]]);
    assert_eq!(k.regs[0x3FF].to_ne_bytes(), [page[0x3FF]]);
    assert_eq!(lapic_page_from_kvm(&k), page);
}

#[test]
fn write_rejects_states_our_models_reject() {
    // No VM is needed: the check runs before any ioctl. A VmFd is still
    // required by the signature, so only run where KVM exists.
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        if std::env::var("VIRQ_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("/dev/kvm not available but VIRQ_REQUIRE_KVM=1");
        }
        eprintln!("SKIPPED: /dev/kvm not available");
        return;
    };
    let vm = kvm.create_vm().unwrap();
    let mut state = KernelIrqchipState {
        pic: Pic::new().save(),
        ioapic: Ioapic::new(IoapicVersion::V20).save(),
        pit: Pit::new().save(),
    };
    assert!(matches!(
        write_kernel_irqchip(&vm, &state, &clock(0)),
        Err(StateError::Ioapic(IoapicError::VersionMismatch { .. }))
    ));
    state.ioapic = Ioapic::new(IoapicVersion::V11).save();
    state.pic.master.priority_add = 8;
    assert!(matches!(
        write_kernel_irqchip(&vm, &state, &clock(0)),
        Err(StateError::Pic(_))
    ));
}

fn any_pic() -> impl Strategy<Value = kvm_pic_state> {
    any::<[u8; 16]>().prop_map(|b| pic_from_image(&b))
}

fn any_ioapic() -> impl Strategy<Value = kvm_ioapic_state> {
    (
        any::<u64>(),
        any::<[u32; 4]>(),
        proptest::collection::vec(any::<u64>(), IOAPIC_PINS),
    )
        .prop_map(|(base, words, rtes)| {
            let mut image = Vec::with_capacity(IOAPIC_STATE_SIZE);
            image.extend(base.to_ne_bytes());
            for w in words {
                image.extend(w.to_ne_bytes());
            }
            for r in rtes {
                image.extend(r.to_ne_bytes());
            }
            ioapic_from_image(&image)
        })
}

fn any_pit_channel() -> impl Strategy<Value = kvm_pit_channel_state> {
    (any::<u32>(), any::<u16>(), any::<[u8; 10]>(), any::<i64>()).prop_map(
        |(count, latched_count, b, count_load_time)| kvm_pit_channel_state {
            count,
            latched_count,
            count_latched: b[0],
            status_latched: b[1],
            status: b[2],
            read_state: b[3],
            write_state: b[4],
            write_latch: b[5],
            rw_mode: b[6],
            mode: b[7],
            bcd: b[8],
            gate: b[9],
            count_load_time,
        },
    )
}

fn any_pit() -> impl Strategy<Value = kvm_pit_state2> {
    (
        [any_pit_channel(), any_pit_channel(), any_pit_channel()],
        any::<u32>(),
    )
        .prop_map(|(channels, flags)| kvm_pit_state2 {
            channels,
            flags,
            reserved: [0; 9],
        })
}

fn any_clock() -> impl Strategy<Value = ClockMap> {
    (any::<i128>(), any::<u64>()).prop_map(|(offset, now)| ClockMap {
        host_ns_at_virtual_zero: offset,
        virtual_now_ns: now,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn hostile_kvm_states_convert_without_panicking(
        master in any_pic(),
        slave in any_pic(),
        ioapic in any_ioapic(),
        pit in any_pit(),
        map in any_clock(),
        page in proptest::collection::vec(any::<u8>(), LAPIC_PAGE_SIZE),
    ) {
        let pic_state = pic_from_kvm(&master, &slave);
        let ioapic_state = ioapic_from_kvm(&ioapic, IoapicVersion::V11);
        let pit_state = pit_from_kvm(&pit, &map);

        // Whatever restore accepts must keep working as a device.
        let mut pic = Pic::new();
        if pic.restore(&pic_state).is_ok() {
            pic.write_port(0x20, 0x0C);
            pic.read_port(0x20);
            pic.acknowledge();
        }
        // Entries are sanitized and irr derived: only ID and base can fail.
        let mut model = Ioapic::new(IoapicVersion::V11);
        let restored = model.restore(&ioapic_state);
        prop_assert_eq!(restored.is_ok(), ioapic.id <= 0xF && ioapic.base_address & 0xFFF == 0);
        let mut p = Pit::new();
        if p.restore(&pit_state).is_ok() {
            p.advance(map.virtual_now_ns);
            p.read_port(0x40, map.virtual_now_ns);
        }

        // And back to KVM, from whatever came out.
        pic_to_kvm(&pic_state);
        ioapic_to_kvm(&ioapic_state);
        pit_to_kvm(&pit_state, &map);
        let mut bytes = [0u8; LAPIC_PAGE_SIZE];
        bytes.copy_from_slice(&page);
        prop_assert_eq!(lapic_page_from_kvm(&lapic_page_to_kvm(&bytes)), bytes);
    }

    #[test]
    fn kvm_ioapic_images_round_trip(ioapic in any_ioapic()) {
        let image = ioapic_image(&ioapic);
        let again = ioapic_image(&ioapic_from_image(&image));
        prop_assert_eq!(image.to_vec(), again.to_vec());
    }
}
