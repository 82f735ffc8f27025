use proptest::prelude::*;

use super::*;

const MASTER_BASE: u8 = 0x20;
const SLAVE_BASE: u8 = 0x28;

/// ICW4 with the 8086 mode bit, as every PC guest writes it.
const ICW4_8086: u8 = 0x01;
const ICW4_AUTO_EOI: u8 = 0x02;
const ICW4_SFNM: u8 = 0x10;

/// Program both chips the way a PC BIOS or kernel does, with extra ICW4 bits.
fn init_pair(master_icw4: u8, slave_icw4: u8) -> Pic {
    let mut pic = Pic::new();
    pic.write_port(0x20, 0x11); // ICW1: edge (per ELCR), cascade, ICW4 follows
    pic.write_port(0x21, MASTER_BASE); // ICW2
    pic.write_port(0x21, 0x04); // ICW3: slave on IR2
    pic.write_port(0x21, ICW4_8086 | master_icw4);
    pic.write_port(0xA0, 0x11);
    pic.write_port(0xA1, SLAVE_BASE);
    pic.write_port(0xA1, 0x02); // ICW3: slave ID 2
    pic.write_port(0xA1, ICW4_8086 | slave_icw4);
    pic
}

fn init() -> Pic {
    init_pair(0, 0)
}

fn pulse(pic: &mut Pic, irq: u8) {
    pic.set_irq(irq, true);
    pic.set_irq(irq, false);
}

fn read_isr(pic: &mut Pic, command_port: u16) -> u8 {
    pic.write_port(command_port, 0x0B); // OCW3: read ISR
    let isr = pic.read_port(command_port);
    pic.write_port(command_port, 0x0A); // back to IRR
    isr
}

fn read_irr(pic: &mut Pic, command_port: u16) -> u8 {
    pic.write_port(command_port, 0x0A);
    pic.read_port(command_port)
}

fn eoi(pic: &mut Pic, command_port: u16) {
    pic.write_port(command_port, 0x20);
}

// ICW1 (bit 4 set on the command port) starts init: clears IMR/ISR, keeps
// pending level requests, drops pending edges.

#[test]
fn icw1_starts_init_clears_imr_and_isr() {
    let mut pic = init();
    pulse(&mut pic, 3);
    assert_eq!(pic.acknowledge(), MASTER_BASE + 3);
    pic.write_port(0x21, 0x5A);
    pic.write_port(0x20, 0x11);
    assert_eq!(
        pic.read_port(0x21),
        0x00,
        "IMR cleared (data port read works mid-init)"
    );
    pic.write_port(0x21, 0x40); // ICW2
    pic.write_port(0x21, 0x04);
    pic.write_port(0x21, 0x01);
    assert_eq!(read_isr(&mut pic, 0x20), 0);
    assert_eq!(pic.read_port(0x21), 0x00);
    pulse(&mut pic, 3);
    assert_eq!(pic.acknowledge(), 0x43, "new base from ICW2 applies");
}

#[test]
fn icw1_keeps_pending_level_requests_and_drops_pending_edges() {
    let mut pic = init();
    pic.write_port(0x4D0, 0x20); // IRQ 5 level
    pic.write_port(0x21, 0xFF); // mask all so nothing is acknowledged
    pic.set_irq(5, true);
    pulse(&mut pic, 4);
    assert_eq!(read_irr(&mut pic, 0x20), 0x30);
    pic.write_port(0x20, 0x11);
    assert_eq!(
        pic.read_port(0x20),
        0x20,
        "IRR: level 5 kept, edge 4 dropped"
    );
    pic.write_port(0x21, MASTER_BASE);
    pic.write_port(0x21, 0x04);
    pic.write_port(0x21, 0x01);
    assert!(pic.output());
    assert_eq!(pic.acknowledge(), MASTER_BASE + 5);
    assert_eq!(pic.read_port(0x4D0), 0x20, "ELCR survives init");
}

#[test]
fn icw1_reports_ended_in_service_and_dropped_edges_as_acked() {
    let mut pic = init();
    pulse(&mut pic, 1);
    assert_eq!(pic.acknowledge(), MASTER_BASE + 1);
    pic.write_port(0x21, 0x01); // mask IRQ 0
    pulse(&mut pic, 0);
    assert_eq!(pic.take_acked(), 0);
    pic.write_port(0x20, 0x11);
    assert_eq!(pic.take_acked(), 0b11);
}

#[test]
fn icw1_without_icw4_needed_ends_init_after_icw3_with_icw4_modes_off() {
    let mut pic = init_pair(ICW4_AUTO_EOI, 0);
    pic.write_port(0x20, 0x10); // ICW1, no ICW4
    pic.write_port(0x21, MASTER_BASE);
    pic.write_port(0x21, 0x04);
    pic.write_port(0x21, 0xF0); // now OCW1
    assert_eq!(pic.read_port(0x21), 0xF0);
    let state = pic.save();
    assert_eq!(state.master.init_state, 0);
    assert!(!state.master.auto_eoi);
    assert!(!state.master.init4);
}

#[test]
fn icw1_single_mode_skips_icw3() {
    let mut pic = Pic::new();
    pic.write_port(0x20, 0x13); // single, ICW4 follows
    pic.write_port(0x21, 0x08);
    pic.write_port(0x21, ICW4_8086 | ICW4_AUTO_EOI); // this is ICW4, not ICW3
    assert!(pic.save().master.auto_eoi);
    assert_eq!(pic.save().master.init_state, 0);
    pic.write_port(0x21, 0x7F);
    assert_eq!(pic.read_port(0x21), 0x7F);
}

// ICW2 = vector base (& 0xF8); ICW3 cascade; ICW4 bit 1 auto-EOI, bit 4
// special fully nested.

#[test]
fn icw2_sets_vector_base_with_low_three_bits_dropped() {
    let mut pic = Pic::new();
    pic.write_port(0x20, 0x11);
    pic.write_port(0x21, 0x37);
    pic.write_port(0x21, 0x04);
    pic.write_port(0x21, 0x01);
    assert_eq!(pic.save().master.irq_base, 0x30);
    pulse(&mut pic, 6);
    assert_eq!(pic.acknowledge(), 0x36);
}

#[test]
fn icw3_is_consumed_and_init_continues_with_icw4() {
    let mut pic = Pic::new();
    pic.write_port(0xA0, 0x11);
    pic.write_port(0xA1, 0x70);
    assert_eq!(pic.save().slave.init_state, 2);
    pic.write_port(0xA1, 0x02);
    assert_eq!(pic.save().slave.init_state, 3);
    pic.write_port(0xA1, 0x01);
    assert_eq!(pic.save().slave.init_state, 0);
    assert_eq!(pic.read_port(0xA1), 0x00, "ICW3 was not taken as IMR");
}

#[test]
fn icw4_bit1_selects_auto_eoi() {
    let mut pic = init_pair(ICW4_AUTO_EOI, 0);
    pulse(&mut pic, 4);
    assert_eq!(pic.acknowledge(), MASTER_BASE + 4);
    assert_eq!(read_isr(&mut pic, 0x20), 0, "no level stays in service");
    assert_eq!(pic.take_acked(), 1 << 4);
}

#[test]
fn icw4_bit4_selects_special_fully_nested_mode() {
    let pic = init_pair(ICW4_SFNM, 0);
    assert!(pic.save().master.special_fully_nested_mode);
    assert!(!pic.save().slave.special_fully_nested_mode);
}

// OCW1 = IMR (data port).

#[test]
fn ocw1_sets_imr_and_masked_requests_do_not_reach_the_cpu() {
    let mut pic = init();
    pic.write_port(0x21, 0x08);
    assert_eq!(pic.read_port(0x21), 0x08);
    assert_eq!(pic.set_irq(3, true), IrqStatus::Masked);
    assert!(!pic.output());
    assert_eq!(read_irr(&mut pic, 0x20), 0x08, "still latched in IRR");
    pic.write_port(0x21, 0x00);
    assert!(pic.output());
    assert_eq!(pic.acknowledge(), MASTER_BASE + 3);
}

// OCW2: non-specific EOI, specific EOI, rotate on EOI (both), set priority,
// rotate in auto-EOI on/off.

#[test]
fn ocw2_non_specific_eoi_ends_highest_priority_in_service_level() {
    let mut pic = init();
    pulse(&mut pic, 5);
    assert_eq!(pic.acknowledge(), MASTER_BASE + 5);
    pulse(&mut pic, 3);
    assert_eq!(
        pic.acknowledge(),
        MASTER_BASE + 3,
        "3 outranks 5 in service"
    );
    assert_eq!(read_isr(&mut pic, 0x20), 0x28);
    eoi(&mut pic, 0x20);
    assert_eq!(read_isr(&mut pic, 0x20), 0x20);
    assert_eq!(pic.take_acked(), 1 << 3);
}

#[test]
fn ocw2_specific_eoi_ends_the_named_level() {
    let mut pic = init();
    pulse(&mut pic, 5);
    pic.acknowledge();
    pulse(&mut pic, 3);
    pic.acknowledge();
    pic.write_port(0x20, 0x65); // specific EOI, level 5
    assert_eq!(read_isr(&mut pic, 0x20), 0x08);
    assert_eq!(pic.take_acked(), 1 << 5);
    pic.write_port(0x20, 0x65); // again: nothing in service at 5, no ack
    assert_eq!(pic.take_acked(), 0);
}

#[test]
fn ocw2_rotate_on_non_specific_eoi_makes_ended_level_lowest() {
    let mut pic = init();
    pulse(&mut pic, 4);
    pic.acknowledge();
    pic.write_port(0x20, 0xA0);
    assert_eq!(pic.save().master.priority_add, 5);
    assert_eq!(read_isr(&mut pic, 0x20), 0);
    pulse(&mut pic, 4);
    pulse(&mut pic, 5);
    assert_eq!(
        pic.acknowledge(),
        MASTER_BASE + 5,
        "5 is now highest, 4 lowest"
    );
}

#[test]
fn ocw2_rotate_on_specific_eoi_makes_named_level_lowest() {
    let mut pic = init();
    pulse(&mut pic, 6);
    pic.acknowledge();
    pic.write_port(0x20, 0xE6);
    assert_eq!(pic.save().master.priority_add, 7);
    assert_eq!(read_isr(&mut pic, 0x20), 0);
    assert_eq!(pic.take_acked(), 1 << 6);
    pulse(&mut pic, 6);
    pulse(&mut pic, 0);
    pulse(&mut pic, 7);
    assert_eq!(pic.acknowledge(), MASTER_BASE + 7);
}

#[test]
fn ocw2_set_priority_makes_named_level_lowest_without_eoi() {
    let mut pic = init();
    pulse(&mut pic, 0);
    pic.acknowledge();
    pic.write_port(0x20, 0xC2); // set priority: 2 lowest, 3 highest
    assert_eq!(pic.save().master.priority_add, 3);
    assert_eq!(read_isr(&mut pic, 0x20), 0x01, "no EOI done");
    assert_eq!(pic.take_acked(), 0);
}

#[test]
fn ocw2_rotate_in_auto_eoi_set_and_clear() {
    let mut pic = init_pair(ICW4_AUTO_EOI, 0);
    pic.write_port(0x20, 0x80); // rotate in AEOI on
    pulse(&mut pic, 3);
    assert_eq!(pic.acknowledge(), MASTER_BASE + 3);
    assert_eq!(pic.save().master.priority_add, 4);
    pic.write_port(0x20, 0x00); // off
    pulse(&mut pic, 5);
    assert_eq!(pic.acknowledge(), MASTER_BASE + 5);
    assert_eq!(
        pic.save().master.priority_add,
        4,
        "no rotation once cleared"
    );
}

#[test]
fn ocw2_non_specific_eoi_with_nothing_in_service_does_nothing() {
    let mut pic = init();
    eoi(&mut pic, 0x20);
    pic.write_port(0x20, 0xA0);
    assert_eq!(pic.save().master.priority_add, 0);
    assert_eq!(pic.take_acked(), 0);
}

// OCW3: read IRR/ISR select, poll command, special mask mode.

#[test]
fn ocw3_selects_irr_or_isr_for_command_port_reads() {
    let mut pic = init();
    pulse(&mut pic, 1);
    pic.acknowledge();
    pic.write_port(0x21, 0x80);
    pulse(&mut pic, 7);
    pic.write_port(0x20, 0x0A);
    assert_eq!(pic.read_port(0x20), 0x80, "IRR");
    pic.write_port(0x20, 0x0B);
    assert_eq!(pic.read_port(0x20), 0x02, "ISR");
    pic.write_port(0x20, 0x08); // RR clear: selection kept
    assert_eq!(pic.read_port(0x20), 0x02);
}

#[test]
fn ocw3_poll_read_returns_0x80_or_level_and_acknowledges() {
    let mut pic = init();
    pulse(&mut pic, 6);
    pic.write_port(0x20, 0x0C); // poll
    assert_eq!(pic.read_port(0x20), 0x86);
    assert_eq!(read_isr(&mut pic, 0x20), 0x40, "poll put 6 in service");
    assert_eq!(read_irr(&mut pic, 0x20), 0x00);
    pic.write_port(0x20, 0x0C);
    assert_eq!(pic.read_port(0x21), 0x00, "nothing pending: I bit clear");
    assert_eq!(pic.read_port(0x21), 0x00, "poll is one-shot: IMR read");
}

#[test]
fn ocw3_poll_on_the_slave_acknowledges_on_the_slave_only() {
    let mut pic = init();
    pulse(&mut pic, 12);
    assert!(pic.output());
    pic.write_port(0xA0, 0x0C);
    assert_eq!(pic.read_port(0xA1), 0x84);
    assert!(!pic.output(), "the poll took master IR2's request too");
    assert_eq!(read_isr(&mut pic, 0x20), 0);
    assert_eq!(read_isr(&mut pic, 0xA0), 0x10);
}

#[test]
fn ocw3_special_mask_mode_set_and_clear() {
    let mut pic = init();
    pic.write_port(0x20, 0x68);
    assert!(pic.save().master.special_mask);
    pic.write_port(0x20, 0x28); // ESMM clear: no change
    assert!(pic.save().master.special_mask);
    pic.write_port(0x20, 0x48);
    assert!(!pic.save().master.special_mask);
}

// Edge inputs latch on a rising edge; level inputs make IRR follow the line,
// and INTA does not clear a level IRR bit.

#[test]
fn edge_input_latches_on_rising_edge_only() {
    let mut pic = init();
    assert_eq!(pic.set_irq(4, true), IrqStatus::Delivered(1));
    assert_eq!(pic.acknowledge(), MASTER_BASE + 4);
    eoi(&mut pic, 0x20);
    assert_eq!(
        pic.set_irq(4, true),
        IrqStatus::Coalesced,
        "held high: no edge"
    );
    assert!(!pic.output());
    pic.set_irq(4, false);
    assert_eq!(pic.set_irq(4, true), IrqStatus::Delivered(1));
    assert!(pic.output());
}

#[test]
fn edge_request_stays_latched_after_the_line_drops() {
    let mut pic = init();
    pulse(&mut pic, 4);
    assert!(pic.output());
    assert_eq!(read_irr(&mut pic, 0x20), 0x10);
}

#[test]
fn level_input_irr_follows_the_line() {
    let mut pic = init();
    pic.write_port(0x4D0, 0x10);
    pic.set_irq(4, true);
    assert_eq!(read_irr(&mut pic, 0x20), 0x10);
    pic.set_irq(4, false);
    assert_eq!(read_irr(&mut pic, 0x20), 0x00);
    assert!(!pic.output());
}

#[test]
fn inta_does_not_clear_a_level_irr_bit() {
    let mut pic = init();
    pic.write_port(0x4D1, 0x08); // IRQ 11 level
    pic.set_irq(11, true);
    assert_eq!(pic.acknowledge(), SLAVE_BASE + 3);
    assert_eq!(read_irr(&mut pic, 0xA0), 0x08);
    eoi(&mut pic, 0xA0);
    eoi(&mut pic, 0x20);
    assert!(pic.output(), "line still high: requested again after EOI");
    assert_eq!(pic.acknowledge(), SLAVE_BASE + 3);
}

// ELCR bits select level per pin; IRQ 0, 1, 2, 8, 13 are always edge
// (masks 0xF8 / 0xDE).

#[test]
fn elcr_selects_level_per_pin() {
    let mut pic = init();
    pic.write_port(0x4D0, 0x08);
    pic.set_irq(3, true);
    pic.set_irq(4, true);
    pic.set_irq(3, false);
    pic.set_irq(4, false);
    assert_eq!(
        read_irr(&mut pic, 0x20),
        0x10,
        "3 level (dropped), 4 edge (latched)"
    );
}

#[test]
fn elcr_irq_0_1_2_8_13_are_always_edge() {
    let mut pic = init();
    pic.write_port(0x4D0, 0xFF);
    pic.write_port(0x4D1, 0xFF);
    assert_eq!(pic.read_port(0x4D0), 0xF8);
    assert_eq!(pic.read_port(0x4D1), 0xDE);
    pulse(&mut pic, 0);
    assert_eq!(pic.acknowledge(), MASTER_BASE, "IRQ 0 latched as edge");
}

// Priority rotates with priority_add; a request is raised to the CPU only if
// it outranks everything in service (special fully nested mode ignores the
// master's cascade ISR bit).

#[test]
fn priority_rotates_with_priority_add() {
    let mut pic = init();
    pic.write_port(0x20, 0xC4); // 5 highest
    for irq in [0, 3, 4, 5, 6] {
        pulse(&mut pic, irq);
    }
    let mut order = Vec::new();
    for _ in 0..5 {
        order.push(pic.acknowledge() - MASTER_BASE);
        eoi(&mut pic, 0x20);
    }
    assert_eq!(order, vec![5, 6, 0, 3, 4]);
}

#[test]
fn request_reaches_cpu_only_if_it_outranks_everything_in_service() {
    let mut pic = init();
    pulse(&mut pic, 3);
    pic.acknowledge();
    pulse(&mut pic, 5);
    assert!(!pic.output(), "5 is below 3 in service");
    pulse(&mut pic, 3);
    assert!(!pic.output(), "equal priority does not nest");
    pulse(&mut pic, 1);
    assert!(pic.output());
    assert_eq!(pic.acknowledge(), MASTER_BASE + 1);
}

#[test]
fn special_fully_nested_mode_ignores_master_cascade_isr_bit() {
    for (sfnm, nests) in [(false, false), (true, true)] {
        let mut pic = init_pair(if sfnm { ICW4_SFNM } else { 0 }, 0);
        pulse(&mut pic, 12);
        assert_eq!(pic.acknowledge(), SLAVE_BASE + 4);
        pulse(&mut pic, 9); // outranks 12 on the slave
        assert_eq!(pic.output(), nests, "sfnm = {sfnm}");
        if nests {
            assert_eq!(pic.acknowledge(), SLAVE_BASE + 1);
        }
    }
}

// INTA with nothing pending returns the spurious vector base+7 (slave: slave
// base+7 and master IRQ 2 acknowledged).

#[test]
fn inta_with_nothing_pending_returns_master_base_plus_7() {
    let mut pic = init();
    assert_eq!(pic.acknowledge(), MASTER_BASE + 7);
    assert_eq!(
        read_isr(&mut pic, 0x20),
        0,
        "spurious IRQ 7 is not put in service"
    );
}

#[test]
fn spurious_irq7_when_the_level_request_went_away() {
    let mut pic = init();
    pic.write_port(0x4D0, 0x10);
    pic.set_irq(4, true);
    assert!(pic.output());
    pic.set_irq(4, false);
    assert_eq!(pic.acknowledge(), MASTER_BASE + 7);
    assert_eq!(read_isr(&mut pic, 0x20), 0);
}

#[test]
fn a_slave_request_withdrawn_before_inta_gives_spurious_irq15() {
    let mut pic = init();
    pic.write_port(0x4D1, 0x80); // IRQ 15 level
    pic.set_irq(15, true);
    assert!(pic.output());
    pic.set_irq(15, false);
    assert!(pic.output(), "master IR2 stays latched");
    assert_eq!(pic.acknowledge(), SLAVE_BASE + 7);
    assert_eq!(read_isr(&mut pic, 0x20), 0x04, "master IRQ 2 in service");
    assert_eq!(read_isr(&mut pic, 0xA0), 0x00);
    eoi(&mut pic, 0x20);
    assert!(!pic.output());
    assert_eq!(pic.take_acked(), 0, "the cascade is never reported");
}

#[test]
fn spurious_irq15_returns_slave_base_plus_7_and_acknowledges_master_irq2() {
    // A KVM snapshot can hold master IR2 latched with nothing left on the slave.
    let mut pic = init();
    let mut state = pic.save();
    state.master.irr = 0x04;
    pic.restore(&state).unwrap();
    assert!(pic.output());
    assert_eq!(pic.acknowledge(), SLAVE_BASE + 7);
    assert_eq!(read_isr(&mut pic, 0x20), 0x04);
    assert_eq!(read_isr(&mut pic, 0xA0), 0x00);
    eoi(&mut pic, 0x20);
    assert_eq!(pic.take_acked(), 0, "the cascade is never reported");
}

// Poll mode read returns 0x80 | irq (QEMU) or the bare irq (KVM): we chose
// QEMU's (see the module documentation).

#[test]
fn poll_mode_read_returns_0x80_or_irq() {
    let mut pic = init();
    pulse(&mut pic, 0);
    pic.write_port(0x20, 0x0C);
    assert_eq!(
        pic.read_port(0x20),
        0x80,
        "IRQ 0 distinguishable from nothing"
    );
}

// The master's output reaches the CPU via LAPIC LINT0.

#[test]
fn output_is_the_master_int_line() {
    let mut pic = init();
    assert!(!pic.output());
    pulse(&mut pic, 10);
    assert!(
        pic.output(),
        "slave requests reach the CPU through the master"
    );
    pic.write_port(0x21, 0x04); // mask the cascade
    assert!(!pic.output());
}

// Further behaviour the integrator relies on.

#[test]
fn slave_request_delivers_slave_vector_and_puts_both_cascade_levels_in_service() {
    let mut pic = init();
    assert_eq!(pic.set_irq(14, true), IrqStatus::Delivered(1));
    assert_eq!(pic.acknowledge(), SLAVE_BASE + 6);
    assert_eq!(read_isr(&mut pic, 0x20), 0x04);
    assert_eq!(read_isr(&mut pic, 0xA0), 0x40);
    eoi(&mut pic, 0xA0);
    eoi(&mut pic, 0x20);
    assert_eq!(pic.take_acked(), 1 << 14);
}

#[test]
fn special_mask_mode_lets_lower_levels_in_while_a_masked_level_is_in_service() {
    let mut pic = init();
    pulse(&mut pic, 3);
    assert_eq!(pic.acknowledge(), MASTER_BASE + 3);
    pulse(&mut pic, 6);
    assert!(!pic.output());
    pic.write_port(0x21, 0x08); // mask the in-service level
    assert!(!pic.output(), "masking alone does not unblock");
    pic.write_port(0x20, 0x68); // special mask mode on
    assert!(pic.output());
    assert_eq!(pic.acknowledge(), MASTER_BASE + 6);
    pic.write_port(0x20, 0x48); // off: 3 and 6 in service block again
    pulse(&mut pic, 7);
    assert!(!pic.output());
}

#[test]
fn take_acked_reports_each_completion_once() {
    let mut pic = init_pair(0, ICW4_AUTO_EOI);
    pulse(&mut pic, 0);
    pulse(&mut pic, 9);
    assert_eq!(pic.acknowledge(), MASTER_BASE);
    assert_eq!(pic.take_acked(), 0, "INTA without auto-EOI is not an ack");
    eoi(&mut pic, 0x20);
    assert_eq!(pic.acknowledge(), SLAVE_BASE + 1);
    assert_eq!(
        pic.take_acked(),
        1 | 1 << 9,
        "EOI of 0, slave auto-EOI of 9"
    );
    assert_eq!(pic.take_acked(), 0);
}

#[test]
fn set_irq_status_reports_masked_coalesced_delivered() {
    let mut pic = init();
    assert_eq!(pic.set_irq(5, true), IrqStatus::Delivered(1));
    pic.set_irq(5, false);
    assert_eq!(pic.set_irq(5, true), IrqStatus::Coalesced, "already in IRR");
    assert_eq!(
        pic.set_irq(5, false),
        IrqStatus::Delivered(1),
        "lowering, as KVM"
    );
    pic.write_port(0xA1, 0x01);
    assert_eq!(pic.set_irq(8, true), IrqStatus::Masked);
    assert_eq!(pic.set_irq(8, false), IrqStatus::Masked);
    assert_eq!(pic.set_irq(16, true), IrqStatus::Masked);
    assert_eq!(pic.set_irq(255, true), IrqStatus::Masked);
    assert_eq!(pic.set_irq(2, true), IrqStatus::Masked, "cascade input");
    assert_eq!(pic.save().master.irr & 0x04, 0);
}

#[test]
fn unknown_ports_read_all_ones_and_ignore_writes() {
    let mut pic = init();
    let before = pic.save();
    for port in [0x00, 0x22, 0xA2, 0x4D2, 0xFFFF] {
        assert_eq!(pic.read_port(port), 0xFF);
        pic.write_port(port, 0x11);
    }
    assert_eq!(pic.save(), before);
}

#[test]
fn restore_rejects_impossible_snapshots() {
    let mut pic = init();
    let good = pic.save();
    let mut bad = good.clone();
    bad.master.priority_add = 8;
    assert!(matches!(
        pic.restore(&bad),
        Err(PicError::PriorityAdd { .. })
    ));
    let mut bad = good.clone();
    bad.slave.init_state = 4;
    assert!(matches!(pic.restore(&bad), Err(PicError::InitState { .. })));
    let mut bad = good.clone();
    bad.slave.irq_base = 0x29;
    assert!(matches!(pic.restore(&bad), Err(PicError::IrqBase { .. })));
    let mut bad = good.clone();
    bad.master.elcr = 0x01;
    assert!(matches!(pic.restore(&bad), Err(PicError::Elcr { .. })));
    let mut bad = good.clone();
    bad.slave.elcr_mask = 0xFF;
    assert!(matches!(pic.restore(&bad), Err(PicError::Elcr { .. })));
    assert_eq!(pic.save(), good, "a rejected snapshot changes nothing");
}

// Property tests.

#[derive(Clone, Debug)]
enum Op {
    Write(u16, u8),
    Read(u16),
    SetIrq(u8, bool),
    Ack,
    TakeAcked,
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![
        4 => prop::sample::select(vec![0x20u16, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1]),
        1 => any::<u16>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (port(), any::<u8>()).prop_map(|(p, v)| Op::Write(p, v)),
        1 => port().prop_map(Op::Read),
        3 => (0u8..18, any::<bool>()).prop_map(|(i, l)| Op::SetIrq(i, l)),
        2 => Just(Op::Ack),
        1 => Just(Op::TakeAcked),
    ]
}

fn apply(pic: &mut Pic, op: &Op) {
    match *op {
        Op::Write(port, value) => pic.write_port(port, value),
        Op::Read(port) => {
            pic.read_port(port);
        }
        Op::SetIrq(irq, level) => {
            pic.set_irq(irq, level);
        }
        Op::Ack => {
            pic.acknowledge();
        }
        Op::TakeAcked => {
            pic.take_acked();
        }
    }
}

/// Start half the cases from a programmed pair, so the interesting states are reached.
fn start(programmed: bool) -> Pic {
    if programmed {
        init()
    } else {
        Pic::new()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn arbitrary_port_and_line_sequences_never_panic(
        programmed in any::<bool>(),
        ops in prop::collection::vec(op(), 0..80),
    ) {
        let mut pic = start(programmed);
        for op in &ops {
            apply(&mut pic, op);
        }
        let vector = pic.acknowledge();
        let state = pic.save();
        let bases = [state.master.irq_base, state.slave.irq_base];
        prop_assert!(bases.contains(&(vector & 0xF8)), "vector from one of the bases");
        prop_assert_eq!(pic.take_acked() & 0x0004, 0, "cascade never reported");
    }

    #[test]
    fn output_is_true_if_acknowledge_would_deliver_a_real_vector(
        programmed in any::<bool>(),
        ops in prop::collection::vec(op(), 0..80),
    ) {
        // The converse holds except for a latched cascade request the slave
        // withdrew: that INTA is the slave's spurious vector.
        let mut pic = start(programmed);
        for op in &ops {
            apply(&mut pic, op);
            let mut probe = pic.clone();
            match probe.inta() {
                Inta::Irq(..) => prop_assert!(pic.output()),
                Inta::Spurious(vector) if pic.output() => {
                    prop_assert_eq!(vector, probe.slave.irq_base | 7);
                }
                Inta::Spurious(_) => {}
            }
        }
    }

    #[test]
    fn save_restore_save_is_identical(
        programmed in any::<bool>(),
        ops in prop::collection::vec(op(), 0..60),
    ) {
        let mut pic = start(programmed);
        for op in &ops {
            apply(&mut pic, op);
        }
        let saved = pic.save();
        let json = serde_json::to_string(&saved).unwrap();
        let decoded: PicState = serde_json::from_str(&json).unwrap();
        let mut other = Pic::new();
        other.restore(&decoded).unwrap();
        prop_assert_eq!(other.save(), saved);
        prop_assert_eq!(&other, &pic);
    }

    #[test]
    fn restoring_any_accepted_snapshot_never_panics_later(
        master in chip_state(MASTER_ELCR_MASK),
        slave in chip_state(SLAVE_ELCR_MASK),
        ops in prop::collection::vec(op(), 0..40),
    ) {
        let mut pic = Pic::new();
        let state = PicState { master, slave, pending_acks: 0 };
        pic.restore(&state).unwrap();
        for op in &ops {
            apply(&mut pic, op);
        }
    }
}

fn chip_state(elcr_mask: u8) -> impl Strategy<Value = PicChipState> {
    (
        any::<[u8; 5]>(),
        0u8..8,
        0u8..4,
        any::<[bool; 8]>(),
        any::<u8>(),
    )
        .prop_map(
            move |(regs, priority_add, init_state, flags, elcr)| PicChipState {
                last_irr: regs[0],
                irr: regs[1],
                imr: regs[2],
                isr: regs[3],
                priority_add,
                irq_base: regs[4] & 0xF8,
                read_reg_select: flags[0],
                poll: flags[1],
                special_mask: flags[2],
                init_state,
                auto_eoi: flags[3],
                rotate_on_auto_eoi: flags[4],
                special_fully_nested_mode: flags[5],
                init4: flags[6],
                single_mode: flags[7],
                elcr: elcr & elcr_mask,
                elcr_mask,
            },
        )
}
