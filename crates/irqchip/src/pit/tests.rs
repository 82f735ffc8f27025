use super::*;
use proptest::prelude::*;

const CTRL: u16 = 0x43;

/// First ns at which `ticks` input clocks have elapsed since time 0.
fn at_tick(ticks: u64) -> u64 {
    u64::try_from(ticks_to_ns_ceil(u128::from(ticks)).unwrap()).unwrap()
}

/// Program counter `ch` for word access in `mode` and load `count` at `now`.
fn program(pit: &mut Pit, ch: u8, mode: u8, count: u16, now: u64) {
    pit.write_port(CTRL, ch << 6 | 0x30 | mode << 1, now);
    let [lo, hi] = count.to_le_bytes();
    pit.write_port(0x40 + u16::from(ch), lo, now);
    pit.write_port(0x40 + u16::from(ch), hi, now);
}

/// Latch counter `ch` and read the word (counter in word access mode).
fn latched_word(pit: &mut Pit, ch: u8, now: u64) -> u16 {
    pit.write_port(CTRL, ch << 6, now);
    let lo = pit.read_port(0x40 + u16::from(ch), now);
    let hi = pit.read_port(0x40 + u16::from(ch), now);
    u16::from_le_bytes([lo, hi])
}

/// Read-back status of counter `ch`.
fn status(pit: &mut Pit, ch: u8, now: u64) -> u8 {
    pit.write_port(CTRL, 0xE0 | 2 << ch, now);
    pit.read_port(0x40 + u16::from(ch), now)
}

fn out2(pit: &mut Pit, now: u64) -> bool {
    pit.read_port(0x61, now) & 0x20 != 0
}

/// Counter 2 with its gate high, programmed at time 0.
fn ch2(mode: u8, count: u16) -> Pit {
    let mut pit = Pit::new();
    pit.write_port(0x61, 0x01, 0);
    program(&mut pit, 2, mode, count, 0);
    pit
}

// --- Three counters, control word, control port read ---

#[test]
fn control_word_selects_counter_access_mode_and_bcd() {
    let mut pit = Pit::new();
    pit.write_port(CTRL, 0x10 | 2 << 1, 0); // ch0 LSB, mode 2
    pit.write_port(CTRL, 1 << 6 | 0x20 | 4 << 1 | 1, 0); // ch1 MSB, mode 4, BCD
    pit.write_port(CTRL, 2 << 6 | 0x30, 0); // ch2 word, mode 0
    assert_eq!(status(&mut pit, 0, 0), 0x80 | 0x40 | 0x10 | 2 << 1);
    assert_eq!(status(&mut pit, 1, 0), 0x80 | 0x40 | 0x20 | 4 << 1 | 1);
    assert_eq!(status(&mut pit, 2, 0), 0x40 | 0x30);
}

#[test]
fn reading_control_port_is_harmless_and_returns_zero() {
    let mut pit = ch2(2, 100);
    let before = pit.save();
    assert_eq!(pit.read_port(CTRL, 5), 0);
    assert_eq!(pit.save(), before);
}

#[test]
fn other_ports_read_all_ones() {
    let mut pit = Pit::new();
    for port in [0x3F, 0x44, 0x60, 0x62, 0xFFFF] {
        assert_eq!(pit.read_port(port, 0), 0xFF);
    }
}

// --- Initial count 0, input clock ---

#[test]
fn initial_count_zero_means_65536_in_binary() {
    let mut pit = ch2(2, 0);
    assert_eq!(latched_word(&mut pit, 2, at_tick(1)), 0xFFFF);
    assert_eq!(latched_word(&mut pit, 2, at_tick(65535)), 1);
    assert_eq!(latched_word(&mut pit, 2, at_tick(65536)), 0); // reloaded 65536
    assert_eq!(latched_word(&mut pit, 2, at_tick(65537)), 0xFFFF);
}

#[test]
fn initial_count_zero_means_10000_in_bcd() {
    let mut pit = Pit::new();
    pit.write_port(0x61, 1, 0);
    pit.write_port(CTRL, 0xB0 | 2 << 1 | 1, 0); // ch2 word mode 2 BCD
    pit.write_port(0x42, 0, 0);
    pit.write_port(0x42, 0, 0);
    assert_eq!(latched_word(&mut pit, 2, at_tick(1)), 0x9999);
    assert_eq!(latched_word(&mut pit, 2, at_tick(9999)), 0x0001);
    assert_eq!(latched_word(&mut pit, 2, at_tick(10001)), 0x9999);
}

#[test]
fn input_clock_is_1_193182_mhz() {
    let mut pit = ch2(2, 1000);
    let t = at_tick(500);
    assert_eq!(t, 419_048); // 500 / 1.193182 MHz = 419.0474 us
    assert_eq!(latched_word(&mut pit, 2, t - 1), 501);
    assert_eq!(latched_word(&mut pit, 2, t), 500);
    // One second is exactly PIT_FREQUENCY_HZ clocks.
    assert_eq!(ns_to_ticks(1_000_000_000), 1_193_182);
}

#[test]
fn bcd_counting_reads_decimal_digits() {
    let mut pit = Pit::new();
    pit.write_port(0x61, 1, 0);
    pit.write_port(CTRL, 0xB0 | 1, 0); // ch2 word mode 0 BCD
    pit.write_port(0x42, 0x34, 0);
    pit.write_port(0x42, 0x12, 0); // 1234 decimal
    assert_eq!(pit.channels[2].count, 1234);
    assert_eq!(latched_word(&mut pit, 2, at_tick(235)), 0x0999);
    assert_eq!(latched_word(&mut pit, 2, at_tick(1234)), 0x0000);
    // Past terminal count a BCD counter wraps to 9999.
    assert_eq!(latched_word(&mut pit, 2, at_tick(1235)), 0x9999);
}

#[test]
fn invalid_bcd_digits_give_a_count_in_range() {
    assert_eq!(channel::decode_count(0xFFFF, true), 6665);
    assert_eq!(channel::decode_count(0xA000, true), 10_000);
    assert_eq!(channel::decode_count(0x0000, false), 65_536);
}

// --- Access modes and flip-flops ---

#[test]
fn lsb_only_access_writes_and_reads_low_byte() {
    let mut pit = Pit::new();
    pit.write_port(0x61, 1, 0);
    pit.write_port(CTRL, 0x90, 0); // ch2 LSB, mode 0
    pit.write_port(0x42, 0x80, 0);
    assert_eq!(pit.channels[2].count, 0x80);
    assert_eq!(pit.read_port(0x42, at_tick(0x10)), 0x70);
    assert_eq!(pit.read_port(0x42, at_tick(0x10)), 0x70);
}

#[test]
fn msb_only_access_writes_and_reads_high_byte() {
    let mut pit = Pit::new();
    pit.write_port(0x61, 1, 0);
    pit.write_port(CTRL, 0xA0, 0); // ch2 MSB, mode 0
    pit.write_port(0x42, 0x12, 0);
    assert_eq!(pit.channels[2].count, 0x1200);
    assert_eq!(pit.read_port(0x42, at_tick(0x100)), 0x11);
}

#[test]
fn lsb_then_msb_access_uses_two_bytes() {
    let mut pit = Pit::new();
    pit.write_port(0x61, 1, 0);
    pit.write_port(CTRL, 0xB0, 0);
    pit.write_port(0x42, 0x34, 0);
    assert!(pit.channels[2].null_count, "half a count loads nothing");
    pit.write_port(0x42, 0x12, 0);
    assert_eq!(pit.channels[2].count, 0x1234);
    assert_eq!(pit.read_port(0x42, 0), 0x34);
    assert_eq!(pit.read_port(0x42, 0), 0x12);
}

#[test]
fn read_and_write_flip_flops_are_separate() {
    let mut pit = ch2(0, 0x1234);
    // Start a word write, then read a word: the read starts with the LSB.
    pit.write_port(0x42, 0x78, 0);
    assert_eq!(pit.read_port(0x42, 0), 0x34);
    // Finish the write: the pending LSB was kept.
    pit.write_port(0x42, 0x56, 0);
    assert_eq!(pit.channels[2].count, 0x5678);
    // The read flip-flop still expects the MSB.
    assert_eq!(pit.read_port(0x42, 0), 0x56);
}

#[test]
fn each_counter_has_its_own_flip_flops() {
    let mut pit = Pit::new();
    pit.write_port(0x61, 1, 0);
    program(&mut pit, 2, 0, 0x1234, 0);
    pit.write_port(CTRL, 0x30, 0); // counter 0: word access, mode 0
    pit.write_port(0x40, 0x78, 0); // counter 0 now waits for its MSB

    // Counter 2's read and write sequences are not disturbed by counter 0's.
    assert_eq!(pit.read_port(0x42, 0), 0x34);
    pit.write_port(0x42, 0xCD, 0);
    pit.write_port(0x40, 0x56, 0);
    pit.write_port(0x42, 0xAB, 0);
    assert_eq!(pit.channels[0].count, 0x5678);
    assert_eq!(pit.channels[2].count, 0xABCD);
    // Counter 2's read flip-flop still expects the MSB; counter 0's starts afresh.
    assert_eq!(pit.read_port(0x42, 0), 0xAB);
    assert_eq!(pit.read_port(0x40, 0), 0x78);
}

// --- Counter latch ---

#[test]
fn counter_latch_freezes_count_until_read() {
    let mut pit = ch2(0, 1000);
    pit.write_port(CTRL, 0x80, at_tick(100));
    assert_eq!(pit.read_port(0x42, at_tick(400)), 900u16.to_le_bytes()[0]);
    assert_eq!(pit.read_port(0x42, at_tick(500)), 900u16.to_le_bytes()[1]);
    // Latch consumed: live reads again.
    assert_eq!(latched_word(&mut pit, 2, at_tick(600)), 400);
}

#[test]
fn second_latch_before_read_is_ignored() {
    let mut pit = ch2(0, 1000);
    pit.write_port(CTRL, 0x80, at_tick(100));
    pit.write_port(CTRL, 0x80, at_tick(300));
    assert_eq!(latched_word(&mut pit, 2, at_tick(500)), 900);
}

// --- Read-back ---

#[test]
fn readback_with_bit5_clear_latches_count() {
    let mut pit = ch2(0, 1000);
    pit.write_port(CTRL, 0xD8, at_tick(10)); // count only, ch2
    assert_eq!(pit.read_port(0x42, at_tick(50)), 990u16.to_le_bytes()[0]);
    assert_eq!(pit.read_port(0x42, at_tick(50)), 990u16.to_le_bytes()[1]);
}

#[test]
fn readback_with_bit4_clear_latches_status() {
    let mut pit = ch2(0, 1000);
    pit.write_port(CTRL, 0xE8, at_tick(10)); // status only, ch2
    assert_eq!(pit.read_port(0x42, at_tick(2000)), 0x30);
    // Then live count (terminal count passed at 1000, now wrapped).
    assert_eq!(
        pit.read_port(0x42, at_tick(1010)),
        (-10i16 as u16).to_le_bytes()[0]
    );
}

#[test]
fn readback_bits_3_to_1_pick_counters() {
    let mut pit = Pit::new();
    pit.write_port(0x61, 1, 0);
    for ch in 0..3 {
        program(&mut pit, ch, 0, 100 * (u16::from(ch) + 1), 0);
    }
    pit.write_port(CTRL, 0xD0 | 0b1010, at_tick(10)); // counters 0 and 2
    assert!(pit.channels[0].count_latched.is_some());
    assert_eq!(pit.channels[1].count_latched, None);
    assert!(pit.channels[2].count_latched.is_some());
    assert_eq!(latched_word(&mut pit, 0, at_tick(50)), 90);
    assert_eq!(latched_word(&mut pit, 2, at_tick(50)), 290);
}

#[test]
fn latched_status_is_read_before_latched_count() {
    let mut pit = ch2(2, 1000);
    pit.write_port(CTRL, 0xC8, at_tick(10)); // count and status, ch2
    assert_eq!(pit.read_port(0x42, at_tick(20)), 0x80 | 0x30 | 2 << 1);
    assert_eq!(pit.read_port(0x42, at_tick(20)), 990u16.to_le_bytes()[0]);
    assert_eq!(pit.read_port(0x42, at_tick(20)), 990u16.to_le_bytes()[1]);
}

#[test]
fn status_byte_is_out_null_rw_mode_bcd() {
    let mut pit = Pit::new();
    pit.write_port(0x61, 1, 0);
    pit.write_port(CTRL, 0x80 | 0x20 | 4 << 1 | 1, 0); // ch2 MSB, mode 4, BCD
    assert_eq!(
        status(&mut pit, 2, 0),
        1 << 7 | 1 << 6 | 2 << 4 | 4 << 1 | 1
    );
    pit.write_port(0x42, 0x01, 0); // 100 decimal
    assert_eq!(
        status(&mut pit, 2, at_tick(1)),
        1 << 7 | 2 << 4 | 4 << 1 | 1
    );
    // Mode 4 strobe: OUT low for the clock at terminal count.
    assert_eq!(status(&mut pit, 2, at_tick(100)), 2 << 4 | 4 << 1 | 1);
}

#[test]
fn null_count_bit_set_by_control_word_cleared_by_count_load() {
    let mut pit = ch2(2, 100);
    assert_eq!(status(&mut pit, 2, 0) & 0x40, 0);
    pit.write_port(CTRL, 0xB4, 10);
    assert_eq!(status(&mut pit, 2, 10) & 0x40, 0x40);
    pit.write_port(0x42, 50, 10);
    assert_eq!(status(&mut pit, 2, 10) & 0x40, 0x40, "LSB alone");
    pit.write_port(0x42, 0, 10);
    assert_eq!(status(&mut pit, 2, 10) & 0x40, 0);
}

// --- Modes ---

#[test]
fn mode0_out_rises_at_terminal_count_and_stays_high() {
    let mut pit = ch2(0, 100);
    assert!(!out2(&mut pit, at_tick(99)));
    assert!(out2(&mut pit, at_tick(100)));
    assert!(out2(&mut pit, at_tick(100_000)));
}

#[test]
fn mode1_out_low_after_trigger_until_terminal_count() {
    let mut pit = ch2(1, 100);
    assert!(!out2(&mut pit, at_tick(0)));
    assert!(!out2(&mut pit, at_tick(99)));
    assert!(out2(&mut pit, at_tick(100)));
}

#[test]
fn mode2_out_low_for_one_clock_each_period() {
    let mut pit = ch2(2, 10);
    let outs: Vec<bool> = (0..21).map(|t| out2(&mut pit, at_tick(t))).collect();
    let lows: Vec<u64> = (0..21).filter(|t| !outs[*t as usize]).collect();
    assert_eq!(lows, vec![9, 19]);
}

#[test]
fn mode3_out_is_a_square_wave() {
    let mut pit = ch2(3, 10);
    let outs: Vec<bool> = (0..20).map(|t| out2(&mut pit, at_tick(t))).collect();
    assert_eq!(
        outs[..10],
        [true, true, true, true, true, false, false, false, false, false]
    );
    assert_eq!(outs[10..], outs[..10]);
    // Odd counts: one extra clock high.
    let mut pit = ch2(3, 5);
    let outs: Vec<bool> = (0..5).map(|t| out2(&mut pit, at_tick(t))).collect();
    assert_eq!(outs, [true, true, true, false, false]);
    assert_eq!(latched_word(&mut pit, 2, at_tick(1)), 4);
    assert_eq!(latched_word(&mut pit, 2, at_tick(3)), 5);
    assert_eq!(latched_word(&mut pit, 2, at_tick(4)), 2);
}

#[test]
fn mode3_even_count_decrements_by_two() {
    let mut pit = ch2(3, 10);
    let counts: Vec<u16> = (0..6)
        .map(|t| latched_word(&mut pit, 2, at_tick(t)))
        .collect();
    assert_eq!(counts, [10, 8, 6, 4, 2, 10]);
}

#[test]
fn mode4_and_mode5_strobe_low_for_one_clock_at_terminal_count() {
    for mode in [4, 5] {
        let mut pit = ch2(mode, 50);
        assert!(out2(&mut pit, at_tick(49)));
        assert!(!out2(&mut pit, at_tick(50)));
        assert!(out2(&mut pit, at_tick(51)));
    }
}

#[test]
fn modes_6_and_7_alias_2_and_3() {
    let mut pit = Pit::new();
    pit.write_port(CTRL, 0x30 | 6 << 1, 0);
    assert_eq!(pit.channels[0].mode, 2);
    pit.write_port(CTRL, 0x30 | 7 << 1, 0);
    assert_eq!(pit.channels[0].mode, 3);
    assert_eq!(status(&mut pit, 0, 0) & 0x0E, 3 << 1);
}

#[test]
fn one_shot_modes_fire_irq0_once() {
    for mode in [0, 1, 4, 5] {
        let mut pit = Pit::new();
        program(&mut pit, 0, mode, 1000, 0);
        assert_eq!(pit.next_deadline(), Some(at_tick(1000)), "mode {mode}");
        assert!(!pit.advance(at_tick(1000) - 1));
        assert!(pit.advance(at_tick(1000)), "mode {mode}");
        pit.irq0_acked(at_tick(1000));
        assert_eq!(pit.next_deadline(), None);
        assert!(!pit.advance(at_tick(1_000_000)));
        assert_eq!(pit.backlog(), 0);
    }
}

#[test]
fn periodic_modes_fire_irq0_every_period() {
    for mode in [2, 3] {
        let mut pit = Pit::new();
        program(&mut pit, 0, mode, 11932, 0); // ~10 ms
        let mut fired = Vec::new();
        for k in 1..=5u64 {
            let t = pit.next_deadline().unwrap();
            assert_eq!(t, at_tick(11932 * k));
            assert!(pit.advance(t));
            pit.irq0_acked(t);
            fired.push(t);
        }
        assert_eq!(fired.len(), 5);
    }
}

#[test]
fn control_word_stops_counter0() {
    let mut pit = Pit::new();
    program(&mut pit, 0, 2, 11932, 0);
    pit.write_port(CTRL, 0x30, 5); // mode 0, no count yet
    assert_eq!(pit.next_deadline(), None);
    assert!(!pit.advance(1_000_000_000));
}

// --- Gate and port 0x61 ---

#[test]
fn counter2_gate_is_port61_bit0() {
    let mut pit = Pit::new();
    assert_eq!(pit.read_port(0x61, 0) & 1, 0);
    pit.write_port(0x61, 1, 0);
    assert!(pit.channels[2].gate);
    assert_eq!(pit.read_port(0x61, 0) & 1, 1);
    pit.write_port(0x61, 0, 0);
    assert!(!pit.channels[2].gate);
}

#[test]
fn rising_gate_edge_restarts_modes_1_2_3_5() {
    for mode in [1, 2, 3, 5] {
        let mut pit = ch2(mode, 1000);
        pit.write_port(0x61, 0, at_tick(300));
        pit.write_port(0x61, 1, at_tick(700));
        assert_eq!(latched_word(&mut pit, 2, at_tick(700)), 1000, "mode {mode}");
        let expect = if mode == 3 { 1000 - 2 * 100 } else { 900 };
        assert_eq!(
            latched_word(&mut pit, 2, at_tick(800)),
            expect,
            "mode {mode}"
        );
    }
}

#[test]
fn gate_low_stops_counting_in_modes_0_2_3_4() {
    for mode in [0, 2, 3, 4] {
        let mut pit = ch2(mode, 1000);
        let at_pause = latched_word(&mut pit, 2, at_tick(300));
        pit.write_port(0x61, 0, at_tick(300));
        assert_eq!(
            latched_word(&mut pit, 2, at_tick(600)),
            at_pause,
            "mode {mode}"
        );
    }
    // Modes 0 and 4 resume where they stopped.
    // Counting time is measured in ns: paused exactly at_tick(300) ns.
    let mut pit = ch2(0, 1000);
    let resume = 2 * at_tick(300);
    pit.write_port(0x61, 0, at_tick(300));
    pit.write_port(0x61, 1, resume);
    assert_eq!(latched_word(&mut pit, 2, resume + at_tick(100)), 600);
    let terminal = resume + at_tick(1000) - at_tick(300);
    assert!(!out2(&mut pit, terminal - 1));
    assert!(out2(&mut pit, terminal));
}

#[test]
fn gate_low_does_not_stop_modes_1_and_5() {
    for mode in [1, 5] {
        let mut pit = ch2(mode, 1000);
        pit.write_port(0x61, 0, at_tick(300));
        assert_eq!(latched_word(&mut pit, 2, at_tick(600)), 400, "mode {mode}");
    }
}

#[test]
fn count_loaded_with_gate_low_waits_for_gate_in_mode0() {
    // Linux's TSC calibration: gate off, program mode 0, gate on, poll OUT2.
    let mut pit = Pit::new();
    program(&mut pit, 2, 0, 100, 0);
    assert_eq!(latched_word(&mut pit, 2, at_tick(500)), 100);
    pit.write_port(0x61, 1, at_tick(500));
    assert!(!out2(&mut pit, at_tick(599)));
    assert!(out2(&mut pit, at_tick(600)));
}

#[test]
fn port61_bit1_is_speaker_data() {
    let mut pit = Pit::new();
    pit.write_port(0x61, 0x02, 0);
    assert_eq!(pit.read_port(0x61, 0) & 0x02, 0x02);
    pit.write_port(0x61, 0x0C, 0);
    assert_eq!(pit.read_port(0x61, 0) & 0x0F, 0x0C);
}

#[test]
fn port61_bit4_refresh_toggles_with_time() {
    let mut pit = Pit::new();
    let bit = |pit: &mut Pit, t| pit.read_port(0x61, at_tick(t)) & 0x10;
    assert_eq!(bit(&mut pit, 0), 0);
    assert_eq!(bit(&mut pit, 17), 0);
    assert_eq!(bit(&mut pit, 18), 0x10);
    assert_eq!(bit(&mut pit, 35), 0x10);
    assert_eq!(bit(&mut pit, 36), 0);
}

#[test]
fn port61_bit5_is_out2() {
    let mut pit = ch2(0, 10);
    assert_eq!(pit.read_port(0x61, at_tick(9)) & 0x20, 0);
    assert_eq!(pit.read_port(0x61, at_tick(10)) & 0x20, 0x20);
    assert_eq!(pit.read_port(0x61, at_tick(10)) & 0xC0, 0);
}

// --- IRQ0 and lost ticks ---

#[test]
fn counter0_output_is_irq0_pulse() {
    let mut pit = Pit::new();
    program(&mut pit, 0, 2, 1193, 0);
    assert!(!pit.advance(at_tick(1192)));
    assert!(pit.advance(at_tick(1193)));
    // Counters 1 and 2 never raise IRQ0.
    let mut pit = Pit::new();
    pit.write_port(0x61, 1, 0);
    program(&mut pit, 1, 2, 1193, 0);
    program(&mut pit, 2, 2, 1193, 0);
    assert_eq!(pit.next_deadline(), None);
    assert!(!pit.advance(1_000_000_000));
}

#[test]
fn reinject_injects_next_tick_only_after_ack() {
    let mut pit = Pit::new();
    program(&mut pit, 0, 2, 11932, 0);
    let p = at_tick(11932);
    assert!(pit.advance(p));
    assert!(!pit.advance(at_tick(11932 * 2)));
    assert!(!pit.advance(at_tick(11932 * 3)));
    assert_eq!(pit.backlog(), 2);
    let ack = at_tick(11932 * 3) + 10;
    pit.irq0_acked(ack);
    let due = ack + DEFAULT_MIN_PERIOD_NS;
    assert_eq!(
        pit.next_deadline(),
        Some(due),
        "one minimum period after the ack"
    );
    assert!(!pit.advance(due - 1));
    assert!(pit.advance(due));
    assert_eq!(pit.backlog(), 1);
    assert!(!pit.advance(due + 1), "one outstanding at most");
}

/// A PIT that gives up lost acknowledgements, as for external LAPICs.
fn giving_up() -> Pit {
    let mut pit = Pit::new();
    pit.set_give_up_lost_acks(true);
    pit
}

#[test]
fn by_default_an_unacknowledged_tick_is_waited_for_forever() {
    let mut pit = Pit::new();
    program(&mut pit, 0, 2, 1193, 0);
    assert!(pit.advance(at_tick(1193)));
    for k in 2..=2000 {
        assert!(!pit.advance(at_tick(1193 * k)), "expiry {k}");
    }
    assert!(pit.backlog() > 1000);
}

#[test]
fn a_tick_never_acknowledged_is_given_up_and_the_next_goes_out() {
    let mut pit = giving_up();
    program(&mut pit, 0, 2, 1193, 0); // ~1 ms: the 10 ms floor applies
    let first = at_tick(1193);
    assert!(pit.advance(first));
    // Every expiry is owed, none goes out, until 10 ms have passed.
    let given_up = loop {
        let now = pit.next_deadline().expect("armed");
        if pit.advance(now) {
            break now;
        }
        assert!(now < first + ACK_TIMEOUT_MIN_NS, "still waiting at {now}");
    };
    assert!(given_up >= first + ACK_TIMEOUT_MIN_NS);
    assert!(
        given_up < first + ACK_TIMEOUT_MIN_NS + 1_000_000,
        "the next expiry"
    );
    assert!(!pit.advance(given_up + 1), "the new tick waits for its ack");
    // An ack of the new tick lets the rest of the backlog through as usual.
    pit.irq0_acked(given_up + 2);
    let (delivered, end) = drain(&mut pit, given_up + 2 + DEFAULT_MIN_PERIOD_NS);
    assert_eq!(
        delivered + 2,
        expired_by(1193, end),
        "only the lost one is missing"
    );
}

#[test]
fn a_slow_acknowledgement_loses_no_tick() {
    let mut pit = giving_up();
    program(&mut pit, 0, 2, 1193, 0);
    let first = at_tick(1193);
    assert!(pit.advance(first));
    // The guest keeps interrupts off for 9 ms, under the 10 ms bound.
    let ack = first + 9_000_000;
    for k in 2..=9 {
        assert!(!pit.advance(at_tick(1193 * k)));
    }
    pit.irq0_acked(ack);
    let (delivered, end) = drain(&mut pit, ack + DEFAULT_MIN_PERIOD_NS);
    assert_eq!(delivered + 1, expired_by(1193, end), "every tick delivered");
}

#[test]
fn a_long_period_waits_four_periods_for_its_ack() {
    let mut pit = giving_up();
    program(&mut pit, 0, 2, 59_659, 0); // 50 ms
    assert!(pit.advance(at_tick(59_659)));
    for k in 2..=4 {
        assert!(!pit.advance(at_tick(59_659 * k)), "period {k}");
    }
    assert!(pit.advance(at_tick(59_659 * 5)), "given up four periods on");
}

#[test]
fn a_host_stall_leaves_the_guest_time_to_take_its_tick() {
    let mut pit = giving_up();
    program(&mut pit, 0, 2, 11_932, 0); // 10 ms
    let first = at_tick(11_932);
    assert!(pit.advance(first));
    // The VMM stops for a second: one late look sees a hundred expiries.
    let back = first + 1_000_000_000;
    assert!(!pit.advance(back));
    for k in 1..=2 {
        assert!(
            !pit.advance(back + k * 10_000_000),
            "only {k} periods since"
        );
    }
    // The guest takes it once it runs again: nothing is lost.
    let ack = back + 25_000_000;
    pit.irq0_acked(ack);
    let (delivered, end) = drain(&mut pit, ack + DEFAULT_MIN_PERIOD_NS);
    assert_eq!(
        delivered + 1,
        expired_by(11_932, end),
        "every tick delivered"
    );
}

#[test]
fn save_restore_keeps_the_tick_in_flight_and_its_wait() {
    let mut pit = giving_up();
    program(&mut pit, 0, 2, 1193, 0);
    let first = at_tick(1193);
    assert!(pit.advance(first));
    for k in 2..=6 {
        assert!(!pit.advance(at_tick(1193 * k)));
    }
    let state = pit.save();
    assert_eq!(state.irq0_in_flight_since_ns, first);
    assert_eq!(state.irq0_in_flight_periods, 5);
    let mut other = giving_up();
    other.restore(&state).expect("valid");
    assert_eq!(other, pit);
    for k in 7..=11 {
        assert!(!other.advance(at_tick(1193 * k)), "expiry {k}: under 10 ms");
    }
    assert!(other.advance(at_tick(1193 * 12)));
}

/// Expirations of a `reload`-clock periodic counter 0 started at 0, by `now`.
fn expired_by(reload: u64, now: u64) -> u64 {
    (u128::from(now) * u128::from(PIT_FREQUENCY_HZ) / (u128::from(reload) * 1_000_000_000)) as u64
}

/// Acks each tick at once and follows next_deadline until nothing is owed;
/// returns (ticks delivered, when the backlog drained).
fn drain(pit: &mut Pit, start: u64) -> (u64, u64) {
    let mut now = start;
    let mut delivered = 0;
    while pit.advance(now) {
        delivered += 1;
        assert!(!pit.advance(now), "never two without an ack");
        now += 1;
        pit.irq0_acked(now);
        if pit.backlog() == 0 {
            break;
        }
        now = pit.next_deadline().expect("owed tick scheduled");
    }
    (delivered, now)
}

#[test]
fn reinject_after_long_stall_delivers_every_tick_one_per_ack_up_to_cap() {
    let mut pit = Pit::new();
    program(&mut pit, 0, 2, 1193, 0); // 999.8 us period
                                      // Short stall: every tick expired by the end of the catch-up is delivered.
    let (delivered, end) = drain(&mut pit, at_tick(1193 * 50));
    assert_eq!(delivered, expired_by(1193, end));
    assert_eq!(pit.backlog(), 0);
    // Owed ticks come at most one per minimum period after each ack.
    assert!(end - at_tick(1193 * 50) >= 49 * DEFAULT_MIN_PERIOD_NS);

    // Ten minutes stalled: two seconds' worth (2000 ticks at ~1 ms) is owed,
    // not 600000, plus the ticks that expire while it is replayed.
    let cap = 2_000_000_000 * PIT_FREQUENCY_HZ / (1193 * 1_000_000_000);
    assert_eq!(cap, 2000);
    let start = 600_000_000_000;
    let before = expired_by(1193, start);
    let (delivered, end) = drain(&mut pit, start);
    assert_eq!(delivered, cap + expired_by(1193, end) - before);
    assert!(
        end - start < 800_000_000,
        "the catch-up takes well under a second"
    );
    assert_eq!(pit.backlog(), 0);
}

#[test]
fn discard_fires_every_expiration_and_drops_missed_ones() {
    let mut pit = Pit::new();
    pit.set_policy(LostTickPolicy::Discard);
    program(&mut pit, 0, 2, 11932, 0);
    assert!(pit.advance(at_tick(11932)));
    // No ack, still fires on the next expiry.
    assert!(pit.advance(at_tick(11932 * 2)));
    // A long stall: one pulse, the rest lost.
    assert!(pit.advance(at_tick(11932 * 100)));
    assert!(!pit.advance(at_tick(11932 * 100) + 1));
    assert_eq!(pit.backlog(), 0);
    assert_eq!(pit.next_deadline(), Some(at_tick(11932 * 101)));
}

#[test]
fn reprogramming_counter0_clears_backlog() {
    let mut pit = Pit::new();
    program(&mut pit, 0, 2, 11932, 0);
    assert!(pit.advance(at_tick(11932 * 10)));
    assert_eq!(pit.backlog(), 9);
    let now = at_tick(11932 * 10) + 5;
    program(&mut pit, 0, 2, 11932, now);
    assert_eq!(pit.backlog(), 0);
    // The un-acked pulse of the old setting does not block the new one.
    assert!(pit.advance(now + at_tick(11932)));
}

#[test]
fn unmasking_pin_clears_backlog() {
    let mut pit = Pit::new();
    program(&mut pit, 0, 2, 11932, 0);
    assert!(pit.advance(at_tick(11932 * 10)));
    pit.clear_backlog();
    assert_eq!(pit.backlog(), 0);
    assert!(!pit.advance(at_tick(11932 * 10) + 1));
    assert!(
        pit.advance(at_tick(11932 * 11)),
        "pulse no longer outstanding"
    );
}

#[test]
fn policy_change_drops_backlog() {
    let mut pit = Pit::new();
    program(&mut pit, 0, 2, 11932, 0);
    assert!(pit.advance(at_tick(11932 * 5)));
    assert_eq!(pit.backlog(), 4);
    pit.set_policy(LostTickPolicy::Discard);
    assert_eq!(pit.backlog(), 0);
    pit.irq0_acked(at_tick(11932 * 5));
    assert_eq!(pit.next_deadline(), Some(at_tick(11932 * 6)));
}

#[test]
fn ack_with_nothing_owed_schedules_only_the_next_expiry() {
    let mut pit = Pit::new();
    program(&mut pit, 0, 2, 11932, 0);
    assert!(pit.advance(at_tick(11932)));
    pit.irq0_acked(at_tick(11932) + 7);
    assert_eq!(pit.next_deadline(), Some(at_tick(11932 * 2)));
    assert!(!pit.advance(at_tick(11932) + 8));
}

#[test]
fn periodic_timer_is_clamped_to_min_period() {
    let mut pit = Pit::new();
    program(&mut pit, 0, 2, 2, 0); // 1.7 us programmed
    assert_eq!(pit.next_deadline(), Some(200_000));
    assert!(!pit.advance(199_999));
    assert!(pit.advance(200_000));
    // Counter reads still follow the programmed count.
    assert_eq!(latched_word(&mut pit, 0, at_tick(1)), 1);
    pit.set_min_period_ns(50_000);
    pit.irq0_acked(200_000);
    assert_eq!(pit.next_deadline(), Some(250_000));
    // One-shots are not clamped.
    program(&mut pit, 0, 0, 2, 300_000);
    assert_eq!(pit.next_deadline(), Some(300_000 + at_tick(2)));
}

#[test]
fn backlog_cap_follows_clamped_period() {
    let mut pit = Pit::new();
    program(&mut pit, 0, 2, 2, 0);
    assert!(pit.advance(3_600_000_000_000));
    // 2 s / 200 us = 10000 ticks owed, one delivered.
    assert_eq!(pit.backlog(), 9999);
}

// --- Regression tests ---

#[test]
fn control_port_read_never_indexes_a_fourth_channel() {
    let mut pit = Pit::new();
    for v in 0..=255u8 {
        pit.write_port(CTRL, v, u64::from(v));
        assert_eq!(pit.read_port(CTRL, u64::from(v)), 0);
    }
    for port in 0x40..=0x43 {
        pit.read_port(port, 1_000);
    }
}

#[test]
fn count_zero_then_read_does_not_divide_by_zero() {
    for mode in 0..8 {
        for bcd in [0, 1] {
            let mut pit = Pit::new();
            pit.write_port(0x61, 1, 0);
            for ch in 0..3u16 {
                pit.write_port(CTRL, (ch as u8) << 6 | 0x30 | mode << 1 | bcd, 0);
                pit.write_port(0x40 + ch, 0, 0);
                pit.write_port(0x40 + ch, 0, 0);
                pit.read_port(0x40 + ch, 0);
                pit.read_port(0x40 + ch, 0);
                pit.write_port(CTRL, 0xC0 | 0x0E, 0);
                pit.read_port(0x40 + ch, u64::MAX);
            }
            pit.read_port(0x61, u64::MAX);
            pit.advance(u64::MAX);
            pit.next_deadline();
        }
    }
}

// --- Save and restore ---

#[test]
fn restore_rejects_invalid_state() {
    let mut pit = Pit::new();
    let good = pit.save();
    let mut bad = good.clone();
    bad.channels[1].count = 0;
    assert_eq!(
        pit.restore(&bad),
        Err(PitError::InvalidCount {
            channel: 1,
            count: 0
        })
    );
    let mut bad = good.clone();
    bad.channels[0].count = 65_537;
    assert!(matches!(
        pit.restore(&bad),
        Err(PitError::InvalidCount { .. })
    ));
    let mut bad = good.clone();
    bad.channels[2].mode = 6;
    assert!(matches!(
        pit.restore(&bad),
        Err(PitError::InvalidMode { .. })
    ));
    let mut bad = good.clone();
    bad.channels[0].read_state = 0;
    assert!(matches!(
        pit.restore(&bad),
        Err(PitError::InvalidByteState { .. })
    ));
    let mut bad = good.clone();
    bad.channels[0].count_latched = 5;
    assert!(matches!(
        pit.restore(&bad),
        Err(PitError::InvalidByteState { .. })
    ));
    let mut bad = good.clone();
    bad.channels[0].rw_mode = 0;
    assert!(matches!(
        pit.restore(&bad),
        Err(PitError::InvalidByteState { .. })
    ));
    let mut bad = good.clone();
    bad.port61_check_enables = 0x10;
    assert_eq!(pit.restore(&bad), Err(PitError::InvalidPort61(0x10)));
    assert_eq!(pit.save(), good);
}

#[test]
fn restore_resumes_ticking() {
    let mut pit = Pit::new();
    program(&mut pit, 0, 2, 11932, 1_000);
    assert!(pit.advance(1_000 + at_tick(11932)));
    let state = pit.save();
    let mut other = Pit::new();
    other.restore(&state).unwrap();
    assert_eq!(other.next_deadline(), pit.next_deadline());
    let t = 1_000 + at_tick(11932 * 2);
    other.irq0_acked(t);
    pit.irq0_acked(t);
    assert_eq!(other.advance(t), pit.advance(t));
    assert_eq!(other.save(), pit.save());
}

// --- Properties ---

#[derive(Clone, Debug)]
enum Op {
    Write(u16, u8),
    Read(u16),
    Advance,
    Ack,
    Clear,
    Policy(bool),
    MinPeriod(u64),
}

fn port() -> impl Strategy<Value = u16> {
    prop_oneof![4 => 0x40u16..=0x43, 1 => Just(0x61u16), 1 => any::<u16>()]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (port(), any::<u8>()).prop_map(|(p, v)| Op::Write(p, v)),
        4 => port().prop_map(Op::Read),
        2 => Just(Op::Advance),
        1 => Just(Op::Ack),
        1 => Just(Op::Clear),
        1 => any::<bool>().prop_map(Op::Policy),
        1 => prop_oneof![Just(0u64), Just(200_000u64), any::<u64>()].prop_map(Op::MinPeriod),
    ]
}

fn step() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), 0u64..2_000, 0u64..100_000_000, any::<u64>()]
}

fn run(pit: &mut Pit, ops: &[(Op, u64)]) {
    let mut now = 0u64;
    for (op, dt) in ops {
        now = now.saturating_add(*dt);
        match op {
            Op::Write(p, v) => pit.write_port(*p, *v, now),
            Op::Read(p) => {
                pit.read_port(*p, now);
            }
            Op::Advance => {
                pit.advance(now);
            }
            Op::Ack => pit.irq0_acked(now),
            Op::Clear => pit.clear_backlog(),
            Op::Policy(d) => pit.set_policy(if *d {
                LostTickPolicy::Discard
            } else {
                LostTickPolicy::Reinject
            }),
            Op::MinPeriod(ns) => pit.set_min_period_ns(*ns),
        }
        let _ = pit.next_deadline();
        let _ = pit.backlog();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn random_port_traffic_never_panics(ops in prop::collection::vec((op(), step()), 0..200)) {
        let mut pit = Pit::new();
        run(&mut pit, &ops);
    }

    #[test]
    fn save_restore_save_is_identical(ops in prop::collection::vec((op(), step()), 0..100)) {
        let mut pit = Pit::new();
        // Keep the default minimum period: it is configuration, not state.
        let ops: Vec<_> = ops.into_iter().filter(|(o, _)| !matches!(o, Op::MinPeriod(_))).collect();
        run(&mut pit, &ops);
        let saved = pit.save();
        let json = serde_json::to_string(&saved).unwrap();
        let parsed: PitState = serde_json::from_str(&json).unwrap();
        let mut other = Pit::new();
        other.restore(&parsed).unwrap();
        prop_assert_eq!(other.save(), saved);
        prop_assert_eq!(other, pit);
    }

    #[test]
    fn mode2_count_stays_within_1_and_reload(
        reload in 1u16..=65535,
        start in any::<u32>(),
        reads in prop::collection::vec(0u64..200_000_000, 1..20),
    ) {
        let mut pit = Pit::new();
        let mut now = u64::from(start);
        program(&mut pit, 0, 2, reload, now);
        for dt in reads {
            now += dt;
            let count = latched_word(&mut pit, 0, now);
            prop_assert!((1..=reload).contains(&count), "count {} reload {}", count, reload);
        }
    }

    #[test]
    fn reinject_never_has_two_pulses_outstanding_and_loses_nothing(
        reload in 1u16..=65535,
        steps in prop::collection::vec((0u64..50_000_000, any::<bool>()), 1..100),
    ) {
        let mut pit = Pit::new();
        program(&mut pit, 0, 2, reload, 0);
        let (mut now, mut outstanding, mut delivered) = (0u64, false, 0u64);
        for (dt, ack) in steps {
            now += dt;
            if ack && outstanding {
                pit.irq0_acked(now);
                outstanding = false;
            }
            if pit.advance(now) {
                prop_assert!(!outstanding, "second pulse before the ack");
                outstanding = true;
                delivered += 1;
            }
        }
        // Without hitting the cap, delivered + owed = expirations so far.
        let expired = pit.irq0.expirations;
        let cap = u64::from(pit.schedule().unwrap().backlog_cap());
        prop_assert!(delivered + u64::from(pit.backlog()) <= expired);
        if expired <= cap {
            prop_assert_eq!(delivered + u64::from(pit.backlog()), expired);
        }
    }

    #[test]
    fn restore_of_arbitrary_state_never_panics_later(
        counts in prop::array::uniform3(0u32..=70_000),
        modes in prop::array::uniform3(0u8..8),
        seqs in prop::array::uniform3((0u8..6, 0u8..6, 0u8..6, 0u8..5)),
        times in prop::array::uniform3(any::<u64>()),
        flags in prop::array::uniform3(any::<(bool, bool, bool, bool)>()),
        irq0 in any::<(u32, bool, u64, u64, u64)>(),
        ops in prop::collection::vec((op(), step()), 0..50),
    ) {
        let mut state = Pit::new().save();
        for i in 0..3 {
            let c = &mut state.channels[i];
            c.count = counts[i];
            c.mode = modes[i];
            (c.count_latched, c.read_state, c.write_state, c.rw_mode) = seqs[i];
            c.count_load_time = times[i];
            c.gate_low_since_ns = times[(i + 1) % 3];
            (c.bcd, c.gate, c.null_count, c.status_latched) = flags[i];
        }
        (state.backlog, state.irq0_in_flight, state.backlog_due_ns, state.irq0_epoch_ns, state.irq0_expirations) = irq0;
        let mut pit = Pit::new();
        if pit.restore(&state).is_ok() {
            run(&mut pit, &ops);
            pit.advance(u64::MAX);
        }
    }
}
