//! Our device states through KVM's in-kernel irqchip and back: program the
//! models through their ports, KVM_SET_IRQCHIP/KVM_SET_PIT2 the converted
//! state, read it back with the GET ioctls and compare.

use kvm_bindings::kvm_pit_config;
use kvm_ioctls::{Kvm, VmFd};
use virq::delivery::{ApicBus, InterruptMessage};
use virq::ioapic::{Ioapic, IoapicVersion, IOREGSEL, IOWIN};
use virq::pic::Pic;
use virq::pit::{Pit, PitState};
use virq_kvm::state::{read_kernel_irqchip, write_kernel_irqchip, ClockMap, KernelIrqchipState};

/// A VM with KVM's PIC pair, IOAPIC and PIT, or None (after a loud notice)
/// when /dev/kvm is missing; with VIRQ_REQUIRE_KVM=1 that is a failure.
fn kernel_irqchip_vm() -> Option<VmFd> {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            if std::env::var("VIRQ_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("/dev/kvm not available ({e}) but VIRQ_REQUIRE_KVM=1");
            }
            eprintln!("SKIPPED: /dev/kvm not available");
            return None;
        }
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    vm.create_pit2(kvm_pit_config::default())
        .expect("KVM_CREATE_PIT2");
    Some(vm)
}

/// Accepts every message on one vCPU.
struct AcceptAll;

impl ApicBus for AcceptAll {
    fn deliver(&mut self, _msg: &InterruptMessage) -> usize {
        1
    }
}

/// The host time KVM's PIT was reset at, read from its unprogrammed counter
/// 1, and a clock map putting virtual time 0 there.
fn clock_from_fresh_pit(vm: &VmFd, virtual_now_ns: u64) -> (i64, ClockMap) {
    // Counter 0 has no timer while unprogrammed, so only 1 and 2 are loaded.
    let created = vm.get_pit2().expect("KVM_GET_PIT2").channels[1].count_load_time;
    assert!(created > 0, "KVM's reset loads counters at ktime {created}");
    (
        created,
        ClockMap::at(created + virtual_now_ns as i64, virtual_now_ns),
    )
}

fn programmed_pic() -> Pic {
    let mut pic = Pic::new();
    for (port, value) in [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xA0, 0x11),
        (0xA1, 0x28),
        (0xA1, 0x02),
        (0xA1, 0x01),
        (0x21, 0xF8),
        (0xA1, 0xF6),
        (0x4D0, 0x20),
        (0x4D1, 0x08),
    ] {
        pic.write_port(port, value);
    }
    pic.set_irq(0, true);
    assert_eq!(pic.acknowledge(), 0x20);
    pic.set_irq(1, true);
    pic.set_irq(11, true);
    pic.write_port(0x20, 0x0B);
    pic.take_acked();
    pic
}

fn ioapic_write(ioapic: &mut Ioapic, reg: u8, value: u32) {
    ioapic.mmio_write(IOREGSEL, &[reg], 0, &mut AcceptAll);
    ioapic.mmio_write(IOWIN, &value.to_le_bytes(), 0, &mut AcceptAll);
}

fn ioapic_rte(ioapic: &mut Ioapic, pin: u8, entry: u64) {
    ioapic_write(ioapic, 0x11 + 2 * pin, (entry >> 32) as u32);
    ioapic_write(ioapic, 0x10 + 2 * pin, entry as u32);
}

fn programmed_ioapic() -> Ioapic {
    let mut ioapic = Ioapic::new(IoapicVersion::V11);
    ioapic_write(&mut ioapic, 0x00, 5 << 24);
    ioapic_rte(&mut ioapic, 2, 0x0100_0000_0000_0030);
    ioapic_rte(&mut ioapic, 9, 0x0300_0000_0000_8841);
    ioapic_rte(&mut ioapic, 10, 0x0000_0000_0001_8042);
    ioapic_rte(&mut ioapic, 11, 0xFF00_0000_0000_A143);
    ioapic_rte(&mut ioapic, 12, 0x0000_0000_0001_0031);
    // Pin 9 in service, pin 10 asserted behind its mask, pin 11 (active
    // low) delivered when programmed and now idle, pin 12 (masked edge)
    // held high.
    ioapic.set_irq(9, true, 0, &mut AcceptAll);
    ioapic.set_irq(10, true, 0, &mut AcceptAll);
    ioapic.set_irq(11, true, 0, &mut AcceptAll);
    ioapic.set_irq(12, true, 0, &mut AcceptAll);
    ioapic.mmio_write(IOREGSEL, &[0x14], 0, &mut AcceptAll);
    ioapic.take_acked_pins();
    ioapic
}

/// Counter 0 periodic (mode 2, 100 Hz), counter 1 untouched, counter 2 in
/// mode 0 with its gate high; counter 2 latched and half read, counter 0's
/// status latched.
fn programmed_pit() -> Pit {
    let mut pit = Pit::new();
    pit.write_port(0x43, 0x34, 1_000_000);
    pit.write_port(0x40, 0x9C, 1_000_000);
    pit.write_port(0x40, 0x2E, 1_000_000);
    pit.write_port(0x61, 0x03, 1_500_000);
    pit.write_port(0x43, 0xB0, 2_000_000);
    pit.write_port(0x42, 0x00, 2_000_000);
    pit.write_port(0x42, 0x10, 2_000_000);
    pit.write_port(0x43, 0x80, 2_100_000);
    pit.read_port(0x42, 2_100_000);
    pit.write_port(0x43, 0xE2, 2_100_000);
    pit
}

/// `state` with the times KVM owns cleared: KVM_SET_PIT2 reloads every
/// counter at the time of the ioctl.
fn without_load_times(state: &PitState) -> PitState {
    let mut state = state.clone();
    for c in &mut state.channels {
        c.count_load_time = 0;
    }
    state.irq0_epoch_ns = 0;
    state.irq0_expirations = 0;
    state
}

#[test]
fn fresh_kernel_irqchip_reads_as_our_power_on_models() {
    let Some(vm) = kernel_irqchip_vm() else {
        return;
    };
    let (_, clock) = clock_from_fresh_pit(&vm, 0);
    let state = read_kernel_irqchip(&vm, &clock).expect("read");

    assert_eq!(state.pit, Pit::new().save());
    let mut ioapic = Ioapic::new(IoapicVersion::V11);
    ioapic
        .restore(&state.ioapic)
        .expect("KVM's IOAPIC restores");
    assert_eq!(state.ioapic, Ioapic::new(IoapicVersion::V11).save());
    let mut pic = Pic::new();
    pic.restore(&state.pic).expect("KVM's PIC restores");
    assert_eq!(state.pic.master.elcr_mask, 0xF8);
    assert_eq!(state.pic.slave.elcr_mask, 0xDE);
}

#[test]
fn programmed_models_survive_kvm() {
    let Some(vm) = kernel_irqchip_vm() else {
        return;
    };
    let (created, _) = clock_from_fresh_pit(&vm, 0);
    // Put our virtual load times (1 and 2 ms) 10 s before KVM's PIT existed,
    // so a load time at or after its creation shows KVM reloaded the counter.
    let clock = ClockMap::at(created - 10_000_000_000 + 3_000_000, 3_000_000);
    assert!(clock.to_host(2_000_000) < created);
    let ours = KernelIrqchipState {
        pic: programmed_pic().save(),
        ioapic: programmed_ioapic().save(),
        pit: programmed_pit().save(),
    };
    write_kernel_irqchip(&vm, &ours, &clock).expect("write");
    let back = read_kernel_irqchip(&vm, &clock).expect("read");

    // PIC: IMR, ISR, IRR, vector bases, ELCR, read select, all of it.
    assert_eq!(back.pic, ours.pic);
    assert_eq!(back.pic.master.imr, 0xF8);
    assert_eq!(back.pic.master.isr, 0x01);
    assert_eq!(back.pic.slave.irr, 0x08);
    assert_eq!(back.pic.slave.irq_base, 0x28);
    assert_eq!(back.pic.master.elcr, 0x20);

    // IOAPIC: ID, IOREGSEL, entries with remote IRR, asserted lines.
    assert_eq!(back.ioapic, ours.ioapic);
    assert_eq!(back.ioapic.id, 5);
    assert_eq!(back.ioapic.redirection_table[9], 0x0300_0000_0000_C841);
    assert_eq!(back.ioapic.irr, 1 << 9 | 1 << 10);
    assert_eq!(
        back.ioapic.line_levels,
        1 << 9 | 1 << 10 | 1 << 11 | 1 << 12
    );

    // PIT: everything but the load times, which KVM sets to "now".
    assert_eq!(without_load_times(&back.pit), without_load_times(&ours.pit));
    let [c0, c1, c2] = &back.pit.channels;
    assert_eq!(
        (c0.mode, c0.count, c0.rw_mode, c0.status_latched),
        (2, 0x2E9C, 3, true)
    );
    assert!(c1.null_count);
    assert_eq!((c2.mode, c2.count, c2.count_latched), (0, 0x1000, 2));
    // KVM keeps counter 0's load time as given (its timer restarts at the
    // ioctl though) and reloads counters 1 and 2 at the time of the ioctl.
    assert_eq!(c0.count_load_time, 1_000_000);
    let host = clock.to_host(c2.count_load_time);
    assert!(
        host >= created,
        "{host}: KVM kept our load time ({created})"
    );
    assert!(
        host - created < 60_000_000_000,
        "{host} long after {created}"
    );

    // What came back loads into our models.
    Pic::new().restore(&back.pic).expect("PIC");
    Ioapic::new(IoapicVersion::V11)
        .restore(&back.ioapic)
        .expect("IOAPIC");
    Pit::new().restore(&back.pit).expect("PIT");
}

#[test]
fn hostile_state_never_reaches_kvm() {
    let Some(vm) = kernel_irqchip_vm() else {
        return;
    };
    let (_, clock) = clock_from_fresh_pit(&vm, 0);
    let before = read_kernel_irqchip(&vm, &clock).expect("read");
    let mut hostile = KernelIrqchipState {
        pic: programmed_pic().save(),
        ioapic: programmed_ioapic().save(),
        pit: programmed_pit().save(),
    };
    hostile.pit.channels[2].mode = 9;
    assert!(write_kernel_irqchip(&vm, &hostile, &clock).is_err());
    assert_eq!(read_kernel_irqchip(&vm, &clock).expect("read"), before);
}
