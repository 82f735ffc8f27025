//! Unit tests, one per line of the Local APIC reference, driven through the
//! MMIO and MSR interfaces the way a guest would.

use super::*;
use crate::delivery::{DestinationMode, Shorthand};
use crate::RaiseGp;

// xAPIC page offsets.
const ID: u64 = 0x20;
const VERSION: u64 = 0x30;
const TPR: u64 = 0x80;
const PPR: u64 = 0xA0;
const EOI: u64 = 0xB0;
const LDR: u64 = 0xD0;
const DFR: u64 = 0xE0;
const SVR: u64 = 0xF0;
const ISR0: u64 = 0x100;
const TMR0: u64 = 0x180;
const IRR0: u64 = 0x200;
const ESR: u64 = 0x280;
const ICR: u64 = 0x300;
const ICR2: u64 = 0x310;
const LVT_TIMER: u64 = 0x320;
const LVT_THERMAL: u64 = 0x330;
const LVT_PERF: u64 = 0x340;
const LVT_LINT0: u64 = 0x350;
const LVT_LINT1: u64 = 0x360;
const LVT_ERROR: u64 = 0x370;
const TMICT: u64 = 0x380;
const TMCCT: u64 = 0x390;
const TDCR: u64 = 0x3E0;

const MASKED: u32 = 1 << 16;
const PERIODIC: u32 = 1 << 17;
const TSC_DEADLINE: u32 = 2 << 17;
const MODE_NMI: u32 = 4 << 8;
const MODE_EXTINT: u32 = 7 << 8;

fn msr(offset: u64) -> u32 {
    MSR_X2APIC_FIRST + (offset >> 4) as u32
}

fn config(index: usize) -> LapicConfig {
    LapicConfig {
        vcpu_index: index,
        apic_id: index as u32,
        bsp: index == 0,
        directed_eoi: false,
        tsc_hz: 2_000_000_000,
        tsc_offset: 0,
    }
}

fn rd_at(l: &mut Lapic, offset: u64, now: u64) -> u32 {
    let mut b = [0u8; 4];
    l.mmio_read(offset, &mut b, now);
    u32::from_le_bytes(b)
}

fn rd(l: &mut Lapic, offset: u64) -> u32 {
    rd_at(l, offset, 0)
}

fn wr_at(l: &mut Lapic, offset: u64, value: u32, now: u64) -> LapicEffects {
    l.mmio_write(offset, &value.to_le_bytes(), now)
}

fn wr(l: &mut Lapic, offset: u64, value: u32) -> LapicEffects {
    wr_at(l, offset, value, 0)
}

/// A software-enabled xAPIC.
fn enabled(cfg: LapicConfig) -> Lapic {
    let mut l = Lapic::new(cfg);
    wr(&mut l, SVR, 0x1FF);
    l
}

/// A software-enabled APIC in x2APIC mode.
fn x2apic(cfg: LapicConfig) -> Lapic {
    let mut l = enabled(cfg);
    let base = l.apic_base() | ApicBase::X2APIC;
    l.msr_write(MSR_APIC_BASE, base, 0).unwrap();
    l
}

fn message(mode: DeliveryMode, vector: u8, trigger: TriggerMode, level: bool) -> InterruptMessage {
    InterruptMessage {
        vector,
        delivery_mode: mode,
        destination_mode: DestinationMode::Physical,
        trigger_mode: trigger,
        level,
        destination: 0,
        format: DestinationFormat::XApic,
        shorthand: Shorthand::None,
        source: None,
    }
}

fn fixed(vector: u8) -> InterruptMessage {
    message(DeliveryMode::Fixed, vector, TriggerMode::Edge, true)
}

fn fixed_level(vector: u8) -> InterruptMessage {
    message(DeliveryMode::Fixed, vector, TriggerMode::Level, true)
}

/// Put `vector` in service: accept and acknowledge it.
fn in_service(l: &mut Lapic, msg: InterruptMessage) {
    assert!(l.accept(&msg, 0));
    assert_eq!(l.acknowledge(), Some(msg.vector));
}

fn bit_reg(l: &mut Lapic, base: u64, vector: u8) -> bool {
    let word = rd(l, base + u64::from(vector >> 5) * 0x10);
    word & (1 << (vector & 31)) != 0
}

// ----- version, SVR, LVT reset, DFR, ID -------------------------------------

#[test]
fn version_is_0x14_with_max_lvt_5() {
    let mut l = Lapic::new(config(0));
    assert_eq!(rd(&mut l, VERSION), 0x0005_0014);
}

#[test]
fn version_advertises_eoi_broadcast_suppression_only_with_directed_eoi() {
    let mut l = Lapic::new(LapicConfig {
        directed_eoi: true,
        ..config(0)
    });
    assert_eq!(rd(&mut l, VERSION), 0x0105_0014);
}

#[test]
fn svr_resets_to_0xff_software_disabled() {
    let mut l = Lapic::new(config(0));
    assert_eq!(rd(&mut l, SVR), 0xFF);
    assert!(!l.is_sw_enabled());
}

#[test]
fn svr_bit8_software_enables() {
    let mut l = Lapic::new(config(0));
    wr(&mut l, SVR, 0x1EF);
    assert!(l.is_sw_enabled());
    assert_eq!(rd(&mut l, SVR), 0x1EF);
    wr(&mut l, SVR, 0xEF);
    assert!(!l.is_sw_enabled());
}

#[test]
fn lvt_writes_are_forced_masked_while_software_disabled() {
    let mut l = Lapic::new(config(0));
    wr(&mut l, LVT_LINT0, MODE_EXTINT);
    assert_eq!(rd(&mut l, LVT_LINT0), MODE_EXTINT | MASKED);
    wr(&mut l, LVT_TIMER, 0x40);
    assert_eq!(rd(&mut l, LVT_TIMER), 0x40 | MASKED);
}

#[test]
fn clearing_svr_enable_masks_every_lvt() {
    let mut l = enabled(config(0));
    for off in [
        LVT_TIMER,
        LVT_THERMAL,
        LVT_PERF,
        LVT_LINT0,
        LVT_LINT1,
        LVT_ERROR,
    ] {
        wr(&mut l, off, 0x40);
        assert_eq!(rd(&mut l, off), 0x40);
    }
    wr(&mut l, SVR, 0xFF);
    for off in [
        LVT_TIMER,
        LVT_THERMAL,
        LVT_PERF,
        LVT_LINT0,
        LVT_LINT1,
        LVT_ERROR,
    ] {
        assert_eq!(rd(&mut l, off), 0x40 | MASKED, "lvt {off:#x}");
    }
}

#[test]
fn svr_bit12_writable_only_with_directed_eoi() {
    let mut plain = Lapic::new(config(0));
    wr(&mut plain, SVR, 0x11FF);
    assert_eq!(rd(&mut plain, SVR), 0x1FF);
    let mut directed = Lapic::new(LapicConfig {
        directed_eoi: true,
        ..config(0)
    });
    wr(&mut directed, SVR, 0x11FF);
    assert_eq!(rd(&mut directed, SVR), 0x11FF);
}

#[test]
fn lvts_reset_masked() {
    let mut l = Lapic::new(config(0));
    for off in [
        LVT_TIMER,
        LVT_THERMAL,
        LVT_PERF,
        LVT_LINT0,
        LVT_LINT1,
        LVT_ERROR,
    ] {
        assert_eq!(rd(&mut l, off), MASKED, "lvt {off:#x}");
    }
}

#[test]
fn dfr_resets_to_all_ones_and_keeps_low_bits_set() {
    let mut l = Lapic::new(config(0));
    assert_eq!(rd(&mut l, DFR), 0xFFFF_FFFF);
    wr(&mut l, DFR, 0);
    assert_eq!(rd(&mut l, DFR), 0x0FFF_FFFF);
    assert_eq!(l.addressing().dfr_model, DfrModel::Cluster);
}

#[test]
fn id_resets_from_config() {
    let mut l = Lapic::new(config(3));
    assert_eq!(rd(&mut l, ID), 3 << 24);
    assert_eq!(l.addressing().apic_id, 3);
}

#[test]
fn xapic_id_and_ldr_are_writable_in_their_top_byte() {
    let mut l = Lapic::new(config(3));
    wr(&mut l, ID, 0x0712_3456);
    wr(&mut l, LDR, 0x0912_3456);
    assert_eq!(rd(&mut l, ID), 0x0700_0000);
    assert_eq!(rd(&mut l, LDR), 0x0900_0000);
    assert_eq!(l.addressing().apic_id, 7);
    assert_eq!(l.addressing().ldr, 0x0900_0000);
}

// ----- IRR / ISR / TMR ------------------------------------------------------

#[test]
fn irr_isr_tmr_cover_all_256_vectors() {
    let mut l = enabled(config(0));
    for v in [16u8, 0x47, 0xFF] {
        assert!(l.accept(&fixed_level(v), 0));
        assert!(bit_reg(&mut l, IRR0, v));
        assert!(bit_reg(&mut l, TMR0, v));
    }
    assert_eq!(rd(&mut l, IRR0 + 0x70), 0x8000_0000);
    assert_eq!(l.acknowledge(), Some(0xFF));
    assert_eq!(rd(&mut l, ISR0 + 0x70), 0x8000_0000);
    assert_eq!(rd(&mut l, IRR0 + 0x70), 0);
}

#[test]
fn accepting_illegal_vector_sets_esr_receive_illegal_and_drops_it() {
    let mut l = enabled(config(0));
    assert!(!l.accept(&fixed(15), 0));
    assert_eq!(rd(&mut l, IRR0), 0);
    wr(&mut l, ESR, 0);
    assert_eq!(rd(&mut l, ESR), 1 << 6);
}

#[test]
fn sending_illegal_vector_sets_esr_send_illegal_and_sends_nothing() {
    let mut l = enabled(config(0));
    let fx = wr(&mut l, ICR, 0x0000_0005);
    assert_eq!(fx.ipi, None);
    wr(&mut l, ESR, 0);
    assert_eq!(rd(&mut l, ESR), 1 << 5);
}

#[test]
fn edge_fixed_clears_the_tmr_bit_level_sets_it() {
    let mut l = enabled(config(0));
    l.accept(&fixed_level(0x50), 0);
    assert!(bit_reg(&mut l, TMR0, 0x50));
    l.accept(&fixed(0x50), 0);
    assert!(!bit_reg(&mut l, TMR0, 0x50));
}

// ----- priorities ------------------------------------------------------------

#[test]
fn ppr_equals_tpr_when_tpr_class_at_least_isrv() {
    let mut l = enabled(config(0));
    in_service(&mut l, fixed(0x45));
    wr(&mut l, TPR, 0x4A);
    assert_eq!(rd(&mut l, PPR), 0x4A);
    wr(&mut l, TPR, 0x73);
    assert_eq!(rd(&mut l, PPR), 0x73);
}

#[test]
fn ppr_follows_isrv_when_above_tpr() {
    let mut l = enabled(config(0));
    wr(&mut l, TPR, 0x32);
    in_service(&mut l, fixed(0x5B));
    assert_eq!(rd(&mut l, PPR), 0x50);
    assert_eq!(l.ppr(), 0x50);
}

#[test]
fn irr_vector_deliverable_only_when_class_above_ppr() {
    let mut l = enabled(config(0));
    wr(&mut l, TPR, 0x50);
    l.accept(&fixed(0x5F), 0);
    assert_eq!(l.highest_deliverable(), None);
    assert_eq!(l.acknowledge(), None);
    l.accept(&fixed(0x60), 0);
    assert_eq!(l.highest_deliverable(), Some(0x60));
    wr(&mut l, TPR, 0x60);
    assert_eq!(l.highest_deliverable(), None);
}

#[test]
fn nothing_is_deliverable_while_software_disabled() {
    let mut l = enabled(config(0));
    l.accept(&fixed(0x60), 0);
    wr(&mut l, SVR, 0xFF);
    assert_eq!(l.highest_deliverable(), None);
    // The IRR bit is kept for when the APIC is enabled again.
    wr(&mut l, SVR, 0x1FF);
    assert_eq!(l.highest_deliverable(), Some(0x60));
}

#[test]
fn cr8_mirrors_tpr_high_nibble() {
    let mut l = enabled(config(0));
    wr(&mut l, TPR, 0x9C);
    assert_eq!(l.tpr() >> 4, 9);
    l.set_tpr(0x3 << 4);
    assert_eq!(rd(&mut l, TPR), 0x30);
}

// ----- EOI --------------------------------------------------------------------

#[test]
fn eoi_clears_highest_isr_bit() {
    let mut l = enabled(config(0));
    in_service(&mut l, fixed(0x40));
    in_service(&mut l, fixed(0x80));
    let fx = wr(&mut l, EOI, 0);
    assert_eq!(fx.eoi.map(|e| e.vector), Some(0x80));
    assert!(!bit_reg(&mut l, ISR0, 0x80));
    assert!(bit_reg(&mut l, ISR0, 0x40));
}

#[test]
fn eoi_of_level_vector_is_broadcast_to_the_ioapic() {
    let mut l = enabled(config(0));
    in_service(&mut l, fixed_level(0x61));
    let fx = wr(&mut l, EOI, 0);
    assert_eq!(
        fx.eoi,
        Some(EoiEvent {
            vector: 0x61,
            level: true,
            broadcast: true
        })
    );
}

#[test]
fn eoi_of_edge_vector_is_not_broadcast() {
    let mut l = enabled(config(0));
    in_service(&mut l, fixed(0x61));
    let fx = wr(&mut l, EOI, 0);
    assert_eq!(
        fx.eoi,
        Some(EoiEvent {
            vector: 0x61,
            level: false,
            broadcast: false
        })
    );
}

#[test]
fn eoi_broadcast_is_suppressed_by_svr_bit12() {
    let mut l = Lapic::new(LapicConfig {
        directed_eoi: true,
        ..config(0)
    });
    wr(&mut l, SVR, 0x11FF);
    in_service(&mut l, fixed_level(0x61));
    let fx = wr(&mut l, EOI, 0);
    assert_eq!(
        fx.eoi,
        Some(EoiEvent {
            vector: 0x61,
            level: true,
            broadcast: false
        })
    );
}

#[test]
fn eoi_with_nothing_in_service_reports_nothing() {
    let mut l = enabled(config(0));
    assert_eq!(wr(&mut l, EOI, 0), LapicEffects::default());
}

// ----- delivery modes -------------------------------------------------------------

#[test]
fn fixed_and_lowest_priority_set_irr() {
    let mut l = enabled(config(0));
    assert!(l.accept(&fixed(0x30), 0));
    let lp = message(DeliveryMode::LowestPriority, 0x31, TriggerMode::Edge, true);
    assert!(l.accept(&lp, 0));
    assert_eq!(rd(&mut l, IRR0 + 0x10), 0b11 << 16);
}

#[test]
fn fixed_is_dropped_while_software_disabled() {
    let mut l = Lapic::new(config(0));
    assert!(!l.accept(&fixed(0x30), 0));
    assert_eq!(rd(&mut l, IRR0 + 0x10), 0);
}

#[test]
fn smi_is_recorded_without_effect() {
    let mut l = enabled(config(0));
    assert!(l.accept(&message(DeliveryMode::Smi, 0, TriggerMode::Edge, true), 0));
    assert_eq!(l.highest_deliverable(), None);
    assert!(!l.nmi_pending());
    assert!(l.take_smi());
    assert!(!l.take_smi());
}

#[test]
fn nmi_makes_one_pending_nmi_and_more_collapse_into_it() {
    let mut l = Lapic::new(config(0));
    let nmi = message(DeliveryMode::Nmi, 0, TriggerMode::Edge, true);
    assert!(l.accept(&nmi, 0));
    assert!(l.accept(&nmi, 0));
    assert!(l.nmi_pending());
    assert!(l.take_nmi());
    assert!(!l.take_nmi());
}

#[test]
fn nmi_can_be_pending_while_another_is_in_service() {
    let mut l = Lapic::new(config(0));
    let nmi = message(DeliveryMode::Nmi, 0, TriggerMode::Edge, true);
    l.accept(&nmi, 0);
    assert!(l.take_nmi()); // now in service in the vCPU
    l.accept(&nmi, 0);
    l.accept(&nmi, 0);
    assert!(l.nmi_pending());
}

#[test]
fn second_nmi_pending_survives_save_and_restore() {
    let mut l = Lapic::new(config(0));
    let nmi = message(DeliveryMode::Nmi, 0, TriggerMode::Edge, true);
    l.accept(&nmi, 0);
    assert!(l.take_nmi());
    l.accept(&nmi, 0);
    let json = serde_json::to_string(&l.save()).unwrap();
    let mut other = Lapic::new(config(0));
    other
        .restore(&serde_json::from_str(&json).unwrap())
        .unwrap();
    assert!(other.take_nmi());
}

#[test]
fn init_puts_an_ap_in_wait_for_sipi_and_resets_it() {
    let mut l = enabled(config(1));
    l.accept(&fixed(0x40), 0);
    let init = message(DeliveryMode::Init, 0, TriggerMode::Level, true);
    assert!(l.accept(&init, 0));
    assert_eq!(l.take_startup(), Some(StartupEvent::Init));
    assert!(!l.is_sw_enabled());
    assert_eq!(rd(&mut l, IRR0 + 0x20), 0);
    assert_eq!(rd(&mut l, ID), 1 << 24);
    assert!(l.save().wait_for_sipi);
}

#[test]
fn init_level_deassert_is_ignored() {
    let mut l = enabled(config(1));
    let deassert = message(DeliveryMode::Init, 0, TriggerMode::Level, false);
    assert!(!l.accept(&deassert, 0));
    assert_eq!(l.take_startup(), None);
    assert!(l.is_sw_enabled());
}

#[test]
fn sipi_starts_a_waiting_ap_at_its_vector() {
    let mut l = Lapic::new(config(1));
    let init = message(DeliveryMode::Init, 0, TriggerMode::Edge, true);
    l.accept(&init, 0);
    assert_eq!(l.take_startup(), Some(StartupEvent::Init));
    let sipi = message(DeliveryMode::StartUp, 0x9A, TriggerMode::Edge, true);
    assert!(l.accept(&sipi, 0));
    assert_eq!(l.take_startup(), Some(StartupEvent::Sipi { vector: 0x9A }));
}

#[test]
fn sipi_outside_wait_for_sipi_is_ignored() {
    let mut l = Lapic::new(config(1));
    let sipi = message(DeliveryMode::StartUp, 0x9A, TriggerMode::Edge, true);
    assert!(l.accept(&sipi, 0));
    l.take_startup();
    // The second SIPI of the INIT-SIPI-SIPI sequence finds the AP running.
    assert!(!l.accept(&sipi, 0));
    assert_eq!(l.take_startup(), None);
}

#[test]
fn init_on_the_bsp_resets_it_without_wait_for_sipi() {
    let mut l = enabled(config(0));
    let init = message(DeliveryMode::Init, 0, TriggerMode::Edge, true);
    assert!(l.accept(&init, 0));
    assert_eq!(l.take_startup(), Some(StartupEvent::Init));
    let sipi = message(DeliveryMode::StartUp, 0x9A, TriggerMode::Edge, true);
    assert!(!l.accept(&sipi, 0));
}

#[test]
fn extint_message_is_taken_once() {
    let mut l = enabled(config(0));
    let extint = message(DeliveryMode::ExtInt, 0, TriggerMode::Edge, true);
    assert!(l.accept(&extint, 0));
    assert!(l.take_extint());
    assert!(!l.take_extint());
}

#[test]
fn reserved_delivery_mode_is_dropped() {
    let mut l = enabled(config(0));
    let msg = message(DeliveryMode::Reserved, 0x40, TriggerMode::Edge, true);
    assert!(!l.accept(&msg, 0));
    assert_eq!(l.highest_deliverable(), None);
}

#[test]
fn nothing_is_accepted_while_hardware_disabled() {
    let mut l = enabled(config(1));
    l.msr_write(MSR_APIC_BASE, APIC_BASE_DEFAULT, 0).unwrap();
    let nmi = message(DeliveryMode::Nmi, 0, TriggerMode::Edge, true);
    assert!(!l.accept(&nmi, 0));
    assert!(!l.accept(&fixed(0x40), 0));
}

#[test]
fn addressing_reports_what_destination_resolution_needs() {
    let mut l = enabled(config(5));
    wr(&mut l, LDR, 0x2100_0000);
    wr(&mut l, DFR, 0x0FFF_FFFF);
    wr(&mut l, TPR, 0x40);
    assert_eq!(
        l.addressing(),
        ApicAddressing {
            apic_id: 5,
            ldr: 0x2100_0000,
            dfr_model: DfrModel::Cluster,
            x2apic: false,
            hw_enabled: true,
            sw_enabled: true,
            ppr: 0x40,
        }
    );
    l.msr_write(MSR_APIC_BASE, 0xFEE0_0000, 0).unwrap();
    let a = l.addressing();
    assert!(!a.hw_enabled && !a.sw_enabled);
    assert_eq!(a.dfr_model, DfrModel::Flat);
}

// ----- ICR ----------------------------------------------------------------------

#[test]
fn icr_low_write_sends_with_the_icr2_destination() {
    let mut l = enabled(config(2));
    assert_eq!(wr(&mut l, ICR2, 0x0500_0000).ipi, None);
    let fx = wr(&mut l, ICR, 0x0000_C831); // level assert, level trigger, logical, fixed 0x31
    assert_eq!(
        fx.ipi,
        Some(InterruptMessage {
            vector: 0x31,
            delivery_mode: DeliveryMode::Fixed,
            destination_mode: DestinationMode::Logical,
            trigger_mode: TriggerMode::Level,
            level: true,
            destination: 5,
            format: DestinationFormat::XApic,
            shorthand: Shorthand::None,
            source: Some(2),
        })
    );
}

#[test]
fn icr_shorthand_and_mode_are_passed_through() {
    let mut l = enabled(config(0));
    let fx = wr(&mut l, ICR, 0x000C_4500); // all-excluding-self INIT assert
    let ipi = fx.ipi.unwrap();
    assert_eq!(ipi.shorthand, Shorthand::AllExcludingSelf);
    assert_eq!(ipi.delivery_mode, DeliveryMode::Init);
    let fx = wr(&mut l, ICR, 0x0004_0641); // self, startup 0x41
    let ipi = fx.ipi.unwrap();
    assert_eq!(ipi.shorthand, Shorthand::SelfOnly);
    assert_eq!(ipi.delivery_mode, DeliveryMode::StartUp);
    assert_eq!(ipi.vector, 0x41);
}

#[test]
fn icr_delivery_status_reads_idle() {
    let mut l = enabled(config(0));
    wr(&mut l, ICR, 0x0000_1040);
    assert_eq!(rd(&mut l, ICR), 0x40);
}

#[test]
fn icr2_keeps_only_bits_31_24() {
    let mut l = enabled(config(0));
    wr(&mut l, ICR2, 0xABCD_EF12);
    assert_eq!(rd(&mut l, ICR2), 0xAB00_0000);
}

// ----- x2APIC ---------------------------------------------------------------------

#[test]
fn x2apic_registers_are_msr_0x800_plus_offset_over_16() {
    let mut l = x2apic(config(0));
    assert_eq!(l.msr_read(0x803, 0), Ok(0x0005_0014));
    l.msr_write(0x808, 0x20, 0).unwrap();
    assert_eq!(l.msr_read(msr(TPR), 0), Ok(0x20));
}

#[test]
fn x2apic_icr_is_one_64bit_msr() {
    let mut l = x2apic(config(4));
    let fx = l
        .msr_write(0x830, (0x1234_5678u64 << 32) | 0x0000_0842, 0)
        .unwrap();
    assert_eq!(
        fx.ipi,
        Some(InterruptMessage {
            vector: 0x42,
            delivery_mode: DeliveryMode::Fixed,
            destination_mode: DestinationMode::Logical,
            trigger_mode: TriggerMode::Edge,
            level: false,
            destination: 0x1234_5678,
            format: DestinationFormat::X2Apic,
            shorthand: Shorthand::None,
            source: Some(4),
        })
    );
    assert_eq!(l.msr_read(0x830, 0), Ok((0x1234_5678u64 << 32) | 0x842));
    // Delivery status is accepted and reads idle.
    l.msr_write(0x830, 0x1050, 0).unwrap();
    assert_eq!(l.msr_read(0x830, 0), Ok(0x50));
}

#[test]
fn x2apic_icr2_msr_is_absent() {
    let mut l = x2apic(config(0));
    assert_eq!(l.msr_read(0x831, 0), Err(RaiseGp));
    assert_eq!(l.msr_write(0x831, 0, 0), Err(RaiseGp));
}

#[test]
fn x2apic_self_ipi_sends_a_fixed_edge_ipi_to_self() {
    let mut l = x2apic(config(3));
    let fx = l.msr_write(0x83F, 0x77, 0).unwrap();
    let ipi = fx.ipi.unwrap();
    assert_eq!(ipi.vector, 0x77);
    assert_eq!(ipi.delivery_mode, DeliveryMode::Fixed);
    assert_eq!(ipi.trigger_mode, TriggerMode::Edge);
    assert_eq!(ipi.shorthand, Shorthand::SelfOnly);
    assert_eq!(ipi.source, Some(3));
    assert_eq!(l.msr_write(0x83F, 0x177, 0), Err(RaiseGp));
}

#[test]
fn x2apic_reads_of_write_only_registers_raise_gp() {
    let mut l = x2apic(config(0));
    assert_eq!(l.msr_read(0x80B, 0), Err(RaiseGp)); // EOI
    assert_eq!(l.msr_read(0x83F, 0), Err(RaiseGp)); // SELF_IPI
}

#[test]
fn x2apic_writes_to_read_only_registers_raise_gp() {
    let mut l = x2apic(config(0));
    for m in [0x802, 0x803, 0x80A, 0x80D, 0x810, 0x818, 0x820, 0x839] {
        assert_eq!(l.msr_write(m, 0, 0), Err(RaiseGp), "msr {m:#x}");
    }
}

#[test]
fn x2apic_reserved_bits_raise_gp() {
    let mut l = x2apic(config(0));
    assert_eq!(l.msr_write(0x808, 0x100, 0), Err(RaiseGp)); // TPR
    assert_eq!(l.msr_write(0x808, 1 << 32, 0), Err(RaiseGp));
    assert_eq!(l.msr_write(0x83E, 0x4, 0), Err(RaiseGp)); // TDCR bit 2
    assert_eq!(l.msr_write(0x837, 0x100, 0), Err(RaiseGp)); // LVT error mode
    assert_eq!(l.msr_write(0x830, 1 << 13, 0), Err(RaiseGp)); // ICR bit 13
    assert_eq!(l.msr_write(0x830, 1 << 16, 0), Err(RaiseGp)); // ICR bit 16
    assert_eq!(l.msr_write(0x830, 1 << 20, 0), Err(RaiseGp)); // ICR bit 20
    assert_eq!(l.msr_write(0x80F, 0x11FF, 0), Err(RaiseGp)); // SVR bit 12 without directed EOI
    assert_eq!(l.msr_read(0x808, 0), Ok(0));
}

#[test]
fn x2apic_ldr_is_read_only_and_derived_from_id() {
    let mut l = x2apic(config(0x23));
    assert_eq!(l.msr_read(0x80D, 0), Ok((2 << 16) | (1 << 3)));
    assert_eq!(l.msr_write(0x80D, 0, 0), Err(RaiseGp));
    assert_eq!(l.addressing().ldr, (2 << 16) | (1 << 3));
}

#[test]
fn x2apic_id_is_read_only_and_32_bit() {
    let mut l = x2apic(LapicConfig {
        apic_id: 0x1_0005,
        ..config(1)
    });
    assert_eq!(l.msr_read(0x802, 0), Ok(0x1_0005));
    assert_eq!(l.msr_write(0x802, 7, 0), Err(RaiseGp));
    assert_eq!(l.addressing().apic_id, 0x1_0005);
    assert!(l.addressing().x2apic);
}

#[test]
fn x2apic_id_is_the_initial_id_even_after_an_xapic_id_write() {
    let mut l = enabled(config(2));
    wr(&mut l, ID, 0x0900_0000);
    l.msr_write(MSR_APIC_BASE, l.apic_base() | ApicBase::X2APIC, 0)
        .unwrap();
    assert_eq!(l.msr_read(0x802, 0), Ok(2));
}

#[test]
fn x2apic_dfr_and_arbitration_registers_are_absent() {
    let mut l = x2apic(config(0));
    assert_eq!(l.msr_read(0x80E, 0), Err(RaiseGp));
    assert_eq!(l.msr_write(0x80E, 0xFFFF_FFFF, 0), Err(RaiseGp));
    assert_eq!(l.msr_read(0x809, 0), Err(RaiseGp));
}

#[test]
fn x2apic_eoi_with_nonzero_value_raises_gp() {
    let mut l = x2apic(config(0));
    in_service(&mut l, fixed(0x40));
    assert_eq!(l.msr_write(0x80B, 1, 0), Err(RaiseGp));
    assert!(bit_reg_x2(&mut l, 0x810, 0x40));
    let fx = l.msr_write(0x80B, 0, 0).unwrap();
    assert_eq!(fx.eoi.map(|e| e.vector), Some(0x40));
}

fn bit_reg_x2(l: &mut Lapic, base: u32, vector: u8) -> bool {
    let word = l.msr_read(base + u32::from(vector >> 5), 0).unwrap();
    word & (1 << (vector & 31)) != 0
}

#[test]
fn x2apic_esr_write_must_be_zero() {
    let mut l = x2apic(config(0));
    assert_eq!(l.msr_write(0x828, 1, 0), Err(RaiseGp));
    assert!(l.msr_write(0x828, 0, 0).is_ok());
}

#[test]
fn x2apic_msrs_raise_gp_outside_x2apic_mode() {
    let mut l = enabled(config(0));
    assert_eq!(l.msr_read(0x803, 0), Err(RaiseGp));
    assert_eq!(l.msr_write(0x808, 0, 0), Err(RaiseGp));
}

#[test]
fn x2apic_unknown_msrs_raise_gp() {
    let mut l = x2apic(config(0));
    for m in [0x800, 0x801, 0x804, 0x82F, 0x83A, 0x840, 0x8FF] {
        assert_eq!(l.msr_read(m, 0), Err(RaiseGp), "read {m:#x}");
        assert_eq!(l.msr_write(m, 0, 0), Err(RaiseGp), "write {m:#x}");
    }
    assert_eq!(l.msr_read(0x10, 0), Err(RaiseGp));
}

// ----- APIC_BASE ----------------------------------------------------------------------

#[test]
fn apic_base_resets_enabled_at_the_default_address() {
    let bsp = Lapic::new(config(0));
    let ap = Lapic::new(config(1));
    assert_eq!(bsp.apic_base(), 0xFEE0_0900);
    assert_eq!(ap.apic_base(), 0xFEE0_0800);
    assert!(bsp.is_hw_enabled() && !bsp.is_x2apic());
}

#[test]
fn apic_base_bsp_bit_is_read_only() {
    let mut ap = Lapic::new(config(1));
    ap.msr_write(MSR_APIC_BASE, 0xFEE0_0900, 0).unwrap();
    assert_eq!(ap.msr_read(MSR_APIC_BASE, 0), Ok(0xFEE0_0800));
    let mut bsp = Lapic::new(config(0));
    bsp.msr_write(MSR_APIC_BASE, 0xFEE0_0800, 0).unwrap();
    assert_eq!(bsp.apic_base(), 0xFEE0_0900);
}

#[test]
fn apic_base_xapic_to_x2apic_is_allowed() {
    let mut l = Lapic::new(config(1));
    assert!(l.msr_write(MSR_APIC_BASE, 0xFEE0_0C00, 0).is_ok());
    assert!(l.is_x2apic());
}

#[test]
fn apic_base_x2apic_to_xapic_raises_gp() {
    let mut l = x2apic(config(1));
    assert_eq!(l.msr_write(MSR_APIC_BASE, 0xFEE0_0800, 0), Err(RaiseGp));
    assert!(l.is_x2apic());
    // Through disabled is the legal way back.
    l.msr_write(MSR_APIC_BASE, 0xFEE0_0000, 0).unwrap();
    l.msr_write(MSR_APIC_BASE, 0xFEE0_0800, 0).unwrap();
    assert!(l.is_hw_enabled() && !l.is_x2apic());
}

#[test]
fn apic_base_disabled_to_x2apic_raises_gp() {
    let mut l = Lapic::new(config(1));
    l.msr_write(MSR_APIC_BASE, 0xFEE0_0000, 0).unwrap();
    assert_eq!(l.msr_write(MSR_APIC_BASE, 0xFEE0_0C00, 0), Err(RaiseGp));
    assert!(!l.is_hw_enabled());
}

#[test]
fn apic_base_x2apic_without_enable_raises_gp() {
    let mut l = Lapic::new(config(1));
    assert_eq!(l.msr_write(MSR_APIC_BASE, 0xFEE0_0400, 0), Err(RaiseGp));
}

#[test]
fn apic_base_reserved_bits_raise_gp() {
    let mut l = Lapic::new(config(1));
    for bad in [0xFEE0_0801, 0xFEE0_0A00, 1 << 52 | 0xFEE0_0800] {
        assert_eq!(l.msr_write(MSR_APIC_BASE, bad, 0), Err(RaiseGp), "{bad:#x}");
    }
    assert_eq!(l.apic_base(), 0xFEE0_0800);
}

#[test]
fn apic_base_can_move_the_page() {
    let mut l = Lapic::new(config(1));
    l.msr_write(MSR_APIC_BASE, 0xD000_0800, 0).unwrap();
    assert_eq!(l.apic_base(), 0xD000_0800);
}

#[test]
fn disabling_the_apic_resets_its_state() {
    let mut l = x2apic(config(1));
    l.msr_write(0x808, 0x30, 0).unwrap();
    l.msr_write(0x835, 0x700, 0).unwrap();
    l.accept(&fixed(0x50), 0);
    l.msr_write(MSR_APIC_BASE, 0xFEE0_0000, 0).unwrap();
    l.msr_write(MSR_APIC_BASE, 0xFEE0_0800, 0).unwrap();
    assert_eq!(rd(&mut l, TPR), 0);
    assert_eq!(rd(&mut l, SVR), 0xFF);
    assert_eq!(rd(&mut l, LVT_LINT0), MASKED);
    assert_eq!(rd(&mut l, IRR0 + 0x20), 0);
    assert_eq!(rd(&mut l, ID), 1 << 24);
    assert_eq!(rd(&mut l, LDR), 0);
    assert_eq!(rd(&mut l, DFR), 0xFFFF_FFFF);
}

#[test]
fn mmio_page_reads_all_ones_while_disabled_or_in_x2apic_mode() {
    let mut l = x2apic(config(0));
    assert_eq!(rd(&mut l, VERSION), 0xFFFF_FFFF);
    l.msr_write(MSR_APIC_BASE, 0xFEE0_0100, 0).unwrap();
    assert_eq!(rd(&mut l, VERSION), 0xFFFF_FFFF);
    let mut b = [0u8; 2];
    l.mmio_read(0x3, &mut b, 0);
    assert_eq!(b, [0xFF; 2]);
}

#[test]
fn mmio_writes_are_ignored_while_in_x2apic_mode() {
    let mut l = x2apic(config(0));
    wr(&mut l, TPR, 0x40);
    assert_eq!(l.tpr(), 0);
}

#[test]
fn mmio_writes_are_ignored_while_hardware_disabled() {
    let mut l = enabled(config(1));
    l.msr_write(MSR_APIC_BASE, APIC_BASE_DEFAULT, 0).unwrap();
    // An ICR write would send an IPI on an enabled APIC.
    assert_eq!(wr(&mut l, ICR, 0x0000_4040), LapicEffects::default());
    wr(&mut l, TPR, 0x40);
    wr(&mut l, SVR, 0x1FF);
    assert_eq!(l.tpr(), 0);
    assert!(!l.is_sw_enabled());
    l.msr_write(MSR_APIC_BASE, APIC_BASE_DEFAULT | ApicBase::ENABLE, 0)
        .unwrap();
    assert_eq!(rd(&mut l, TPR), 0);
    assert_eq!(rd(&mut l, ICR), 0);
}

#[test]
fn hardware_disabled_apic_passes_pic_interrupts_straight_through() {
    let mut l = Lapic::new(config(0));
    assert!(!l.accepts_pic_interrupts());
    l.msr_write(MSR_APIC_BASE, 0xFEE0_0100, 0).unwrap();
    assert!(l.accepts_pic_interrupts());
}

// ----- MMIO widths ----------------------------------------------------------------------

#[test]
fn mmio_reads_of_any_width_see_the_register_bytes() {
    let mut l = Lapic::new(config(0));
    let mut b = [0u8; 1];
    l.mmio_read(0x32, &mut b, 0);
    assert_eq!(b, [0x05]);
    let mut b = [0xAAu8; 8];
    l.mmio_read(0x30, &mut b, 0);
    assert_eq!(b, [0x14, 0, 5, 0, 0, 0, 0, 0]);
    let mut b = [0xAAu8; 4];
    l.mmio_read(0x0FFE, &mut b, 0);
    assert_eq!(b, [0, 0, 0, 0]);
}

#[test]
fn mmio_writes_that_are_not_aligned_dwords_are_ignored() {
    let mut l = Lapic::new(config(0));
    l.mmio_write(TPR, &[0x40], 0);
    l.mmio_write(TPR + 4, &0x50u32.to_le_bytes(), 0);
    l.mmio_write(TPR, &0x60u64.to_le_bytes(), 0);
    assert_eq!(l.tpr(), 0);
    l.mmio_write(TPR + 0x1000, &0x70u32.to_le_bytes(), 0);
    assert_eq!(l.tpr(), 0x70);
}

// ----- timer ---------------------------------------------------------------------------

/// An enabled APIC with a timer on vector 0x40 in `mode`, divide by 1.
fn timer(mode: u32) -> Lapic {
    let mut l = enabled(config(0));
    wr(&mut l, TDCR, 0xB);
    wr(&mut l, LVT_TIMER, mode | 0x40);
    l
}

fn timer_fired(l: &mut Lapic) -> bool {
    let fired = l.highest_deliverable() == Some(0x40);
    if fired {
        l.acknowledge();
        wr(l, EOI, 0);
    }
    fired
}

#[test]
fn tdcr_is_masked_to_0xb() {
    let mut l = enabled(config(0));
    wr(&mut l, TDCR, 0xFFFF_FFFF);
    assert_eq!(rd(&mut l, TDCR), 0xB);
}

#[test]
fn timer_divisor_follows_tdcr() {
    let expect = [
        (0x0, 2),
        (0x1, 4),
        (0x2, 8),
        (0x3, 16),
        (0x8, 32),
        (0x9, 64),
        (0xA, 128),
        (0xB, 1),
    ];
    for (bits, div) in expect {
        let mut l = enabled(config(0));
        wr(&mut l, TDCR, bits);
        wr_at(&mut l, TMICT, 1000, 0);
        assert_eq!(rd_at(&mut l, TMCCT, 10 * div), 990, "tdcr {bits:#x}");
        assert_eq!(l.next_deadline(), Some(1000 * div));
    }
}

#[test]
fn tmcct_counts_down_from_tmict() {
    let mut l = timer(0);
    wr_at(&mut l, TMICT, 5000, 100);
    assert_eq!(rd_at(&mut l, TMCCT, 100), 5000);
    assert_eq!(rd_at(&mut l, TMCCT, 1100), 4000);
    assert_eq!(rd_at(&mut l, TMICT, 1100), 5000);
}

#[test]
fn one_shot_timer_fires_once() {
    let mut l = timer(0);
    wr_at(&mut l, TMICT, 1000, 0);
    l.advance(999);
    assert!(!timer_fired(&mut l));
    l.advance(1000);
    assert!(timer_fired(&mut l));
    assert_eq!(l.next_deadline(), None);
    l.advance(5000);
    assert!(!timer_fired(&mut l));
    assert_eq!(rd_at(&mut l, TMCCT, 5000), 0);
}

#[test]
fn periodic_timer_reloads() {
    let mut l = timer(PERIODIC);
    wr_at(&mut l, TMICT, 300_000, 0);
    l.advance(300_000);
    assert!(timer_fired(&mut l));
    assert_eq!(l.next_deadline(), Some(600_000));
    assert_eq!(rd_at(&mut l, TMCCT, 400_000), 200_000);
    l.advance(600_000);
    assert!(timer_fired(&mut l));
    assert_eq!(l.next_deadline(), Some(900_000));
}

#[test]
fn periodic_reload_interval_has_a_floor() {
    let mut l = timer(PERIODIC);
    wr_at(&mut l, TMICT, 10, 0);
    assert_eq!(l.next_deadline(), Some(10));
    l.advance(10);
    assert!(timer_fired(&mut l));
    assert_eq!(l.next_deadline(), Some(10 + MIN_PERIODIC_NS));
}

#[test]
fn tmict_zero_stops_the_timer() {
    let mut l = timer(PERIODIC);
    wr_at(&mut l, TMICT, 300_000, 0);
    wr_at(&mut l, TMICT, 0, 100);
    assert_eq!(l.next_deadline(), None);
    l.advance(1_000_000);
    assert!(!timer_fired(&mut l));
}

#[test]
fn tmcct_reads_zero_when_stopped() {
    let mut l = timer(0);
    assert_eq!(rd_at(&mut l, TMCCT, 50), 0);
}

#[test]
fn tmcct_reads_zero_in_tsc_deadline_mode() {
    let mut l = timer(TSC_DEADLINE);
    l.msr_write(MSR_TSC_DEADLINE, 1_000_000, 0).unwrap();
    assert_eq!(rd_at(&mut l, TMCCT, 10), 0);
}

#[test]
fn tsc_deadline_mode_tmict_then_tmcct_does_not_divide_by_zero() {
    let mut l = timer(TSC_DEADLINE);
    wr_at(&mut l, TMICT, 1234, 0);
    assert_eq!(rd_at(&mut l, TMICT, 1), 0);
    assert_eq!(rd_at(&mut l, TMCCT, 1), 0);
    assert_eq!(l.next_deadline(), None);
}

#[test]
fn tsc_deadline_mode_set_while_tmict_is_nonzero_then_tmcct_reads_zero() {
    // Regression: the mode bits change under a running count, then TMCCT is
    // read; a count derived from a TSC-deadline "period" must not divide by 0.
    for mode in [0, PERIODIC] {
        let mut l = timer(mode);
        wr_at(&mut l, TMICT, 1000, 0);
        wr_at(&mut l, LVT_TIMER, TSC_DEADLINE | 0x40, 10);
        assert_eq!(rd_at(&mut l, TMCCT, 20), 0, "mode {mode:#x}");
        assert_eq!(l.next_deadline(), None);
        l.advance(10_000);
        assert!(!timer_fired(&mut l));
    }
    // A snapshot or a KVM register page can carry TSC-deadline mode with TMICT != 0.
    let mut l = timer(TSC_DEADLINE);
    let mut state = l.save();
    state.tmict = 1000;
    l.restore(&state).unwrap();
    assert_eq!(rd_at(&mut l, TMCCT, 5), 0);
    let page = l.to_kvm_register_page();
    l.load_kvm_register_page(&page).unwrap();
    assert_eq!(rd_at(&mut l, TMCCT, 5), 0);
    assert_eq!(l.next_deadline(), None);
}

#[test]
fn tsc_deadline_fires_when_the_guest_tsc_reaches_it() {
    let mut l = timer(TSC_DEADLINE); // 2 GHz TSC
    l.msr_write(MSR_TSC_DEADLINE, 3001, 0).unwrap();
    assert_eq!(l.next_deadline(), Some(1501));
    l.advance(1500);
    assert!(!timer_fired(&mut l));
    assert_eq!(l.guest_tsc(1501), 3002);
    l.advance(1501);
    assert!(timer_fired(&mut l));
}

#[test]
fn tsc_deadline_uses_the_tsc_offset() {
    let mut l = enabled(LapicConfig {
        tsc_hz: 1_000_000_000,
        tsc_offset: 1_000_000,
        ..config(0)
    });
    wr(&mut l, LVT_TIMER, TSC_DEADLINE | 0x40);
    l.msr_write(MSR_TSC_DEADLINE, 1_000_500, 0).unwrap();
    assert_eq!(l.next_deadline(), Some(500));
}

#[test]
fn tsc_deadline_write_is_ignored_outside_tsc_deadline_mode() {
    let mut l = timer(0);
    l.msr_write(MSR_TSC_DEADLINE, 100, 0).unwrap();
    assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 0), Ok(0));
    assert_eq!(l.next_deadline(), None);
}

#[test]
fn tsc_deadline_zero_disarms() {
    let mut l = timer(TSC_DEADLINE);
    l.msr_write(MSR_TSC_DEADLINE, 10_000, 0).unwrap();
    assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 0), Ok(10_000));
    l.msr_write(MSR_TSC_DEADLINE, 0, 0).unwrap();
    assert_eq!(l.next_deadline(), None);
    l.advance(1_000_000);
    assert!(!timer_fired(&mut l));
}

#[test]
fn tsc_deadline_in_the_past_fires_at_once() {
    let mut l = timer(TSC_DEADLINE);
    l.msr_write(MSR_TSC_DEADLINE, 10, 1_000).unwrap();
    assert!(timer_fired(&mut l));
}

#[test]
fn tsc_deadline_reads_zero_after_firing() {
    let mut l = timer(TSC_DEADLINE);
    l.msr_write(MSR_TSC_DEADLINE, 2000, 0).unwrap();
    l.advance(1000);
    assert!(timer_fired(&mut l));
    assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 1000), Ok(0));
}

#[test]
fn changing_mode_to_or_from_tsc_deadline_cancels_the_timer() {
    let mut l = timer(0);
    wr_at(&mut l, TMICT, 1000, 0);
    wr(&mut l, LVT_TIMER, TSC_DEADLINE | 0x40);
    assert_eq!(l.next_deadline(), None);
    assert_eq!(rd(&mut l, TMICT), 0);
    l.msr_write(MSR_TSC_DEADLINE, 5000, 0).unwrap();
    wr(&mut l, LVT_TIMER, 0x40);
    assert_eq!(l.next_deadline(), None);
    wr(&mut l, LVT_TIMER, TSC_DEADLINE | 0x40);
    assert_eq!(l.msr_read(MSR_TSC_DEADLINE, 0), Ok(0));
}

#[test]
fn one_shot_to_periodic_keeps_the_running_count() {
    let mut l = timer(0);
    wr_at(&mut l, TMICT, 300_000, 0);
    wr_at(&mut l, LVT_TIMER, PERIODIC | 0x40, 100);
    assert_eq!(l.next_deadline(), Some(300_000));
    l.advance(300_000);
    assert!(timer_fired(&mut l));
    assert_eq!(l.next_deadline(), Some(600_000));
}

#[test]
fn masked_timer_sets_no_irr() {
    let mut l = timer(MASKED);
    wr_at(&mut l, TMICT, 1000, 0);
    l.advance(1000);
    assert_eq!(rd(&mut l, IRR0 + 0x20), 0);
    assert_eq!(l.next_deadline(), None);
}

#[test]
fn tdcr_change_keeps_the_current_count() {
    let mut l = timer(0);
    wr_at(&mut l, TMICT, 1000, 0);
    wr_at(&mut l, TDCR, 0x0, 400); // divide by 2, 600 counts left
    assert_eq!(rd_at(&mut l, TMCCT, 400), 600);
    assert_eq!(l.next_deadline(), Some(400 + 1200));
}

#[test]
fn periodic_timer_after_a_long_pause_fires_once_and_rephases() {
    let mut l = timer(PERIODIC);
    wr_at(&mut l, TMICT, 1_000_000, 0); // 1 ms
    let hours = 3 * 3600 * 1_000_000_000u64 + 250_000;
    l.advance(hours);
    assert!(timer_fired(&mut l));
    // One interrupt, not one per missed period; the next stays on the 1 ms grid.
    l.advance(hours);
    assert!(!timer_fired(&mut l));
    assert_eq!(l.next_deadline(), Some(hours - 250_000 + 1_000_000));
    assert_eq!(rd_at(&mut l, TMCCT, hours), 750_000);
}

#[test]
fn reinject_replays_missed_periods_one_per_eoi_capped_at_two_seconds() {
    let mut l = timer(PERIODIC);
    l.set_timer_policy(LostTickPolicy::Reinject);
    wr_at(&mut l, TMICT, 1_000_000, 0); // 1 ms
                                        // A 5.5 s stall: 5500 periods expired, at most 2000 (two seconds) are owed.
    let late = 5_500_000_000;
    l.advance(late);
    assert!(timer_fired(&mut l), "the due tick");
    let mut replayed = 0;
    while timer_fired(&mut l) {
        replayed += 1;
    }
    assert_eq!(
        replayed, 2000,
        "one owed tick after each EOI, two seconds' worth"
    );
    assert_eq!(l.timer_backlog(), 0);
    l.advance(late);
    assert!(!timer_fired(&mut l), "nothing more until the next period");
}

#[test]
fn reinject_owes_a_tick_that_expires_while_the_last_is_in_service() {
    let mut l = timer(PERIODIC);
    l.set_timer_policy(LostTickPolicy::Reinject);
    wr_at(&mut l, TMICT, 300_000, 0);
    l.advance(300_000);
    assert_eq!(l.highest_deliverable(), Some(0x40));
    l.acknowledge(); // in service, no EOI yet
    l.advance(600_000);
    assert_eq!(l.timer_backlog(), 1, "owed, not coalesced");
    wr(&mut l, EOI, 0);
    assert!(timer_fired(&mut l), "delivered at the EOI");
    assert_eq!(l.timer_backlog(), 0);
}

#[test]
fn discard_and_reprogramming_drop_missed_periods() {
    let mut l = timer(PERIODIC);
    wr_at(&mut l, TMICT, 1_000_000, 0);
    l.advance(50_000_000);
    assert!(timer_fired(&mut l));
    assert!(!timer_fired(&mut l), "discard (the default) owes nothing");
    l.set_timer_policy(LostTickPolicy::Reinject);
    l.advance(100_000_000);
    assert!(l.timer_backlog() > 0);
    wr_at(&mut l, TMICT, 1_000_000, 100_000_000);
    assert_eq!(l.timer_backlog(), 0, "a new count owes nothing");
}

#[test]
fn a_masked_timer_owes_nothing() {
    let mut l = timer(PERIODIC);
    l.set_timer_policy(LostTickPolicy::Reinject);
    wr_at(&mut l, TMICT, 1_000_000, 0);
    wr(&mut l, LVT_TIMER, PERIODIC | 0x40 | MASKED);
    l.advance(50_000_000);
    assert_eq!(l.timer_backlog(), 0);
}

// ----- LVT entries and ESR ---------------------------------------------------------------------

#[test]
fn lint0_in_extint_mode_passes_pic_interrupts() {
    let mut l = enabled(config(0));
    wr(&mut l, LVT_LINT0, MODE_EXTINT);
    assert!(l.accepts_pic_interrupts());
    wr(&mut l, LVT_LINT0, MODE_EXTINT | MASKED);
    assert!(!l.accepts_pic_interrupts());
}

#[test]
fn virtual_wire_setup_routes_lint0_extint_and_lint1_nmi() {
    let mut l = Lapic::new(config(0));
    l.setup_virtual_wire();
    assert!(l.accepts_pic_interrupts());
    assert_eq!(rd(&mut l, LVT_LINT1), MODE_NMI);
    assert_eq!(rd(&mut l, SVR), 0x1FF);
}

#[test]
fn lint1_nmi_rising_edge_makes_an_nmi_pending() {
    let mut l = enabled(config(0));
    wr(&mut l, LVT_LINT1, MODE_NMI);
    l.set_lint(1, true);
    assert!(l.take_nmi());
    l.set_lint(1, true); // no new edge
    assert!(!l.nmi_pending());
    l.set_lint(1, false);
    l.set_lint(1, true);
    assert!(l.nmi_pending());
}

#[test]
fn lint_in_fixed_mode_posts_its_vector() {
    let mut l = enabled(config(0));
    wr(&mut l, LVT_LINT0, 0x66);
    l.set_lint(0, true);
    assert_eq!(l.highest_deliverable(), Some(0x66));
    l.set_lint(7, true); // no such pin
}

#[test]
fn masked_lint_does_nothing() {
    let mut l = enabled(config(0));
    wr(&mut l, LVT_LINT1, MODE_NMI | MASKED);
    l.set_lint(1, true);
    assert!(!l.nmi_pending());
}

#[test]
fn lvt0_in_nmi_mode_is_reported_for_the_nmi_watchdog() {
    let mut l = enabled(config(0));
    assert!(!l.lvt0_is_nmi());
    wr(&mut l, LVT_LINT0, MODE_NMI);
    assert!(l.lvt0_is_nmi());
}

#[test]
fn lvt_perf_masks_itself_after_delivery() {
    let mut l = enabled(config(0));
    wr(&mut l, LVT_PERF, 0x55);
    assert!(l.perf_interrupt());
    assert_eq!(l.highest_deliverable(), Some(0x55));
    assert_eq!(rd(&mut l, LVT_PERF), 0x55 | MASKED);
    assert!(!l.perf_interrupt());
}

#[test]
fn lvt_thermal_delivers_its_vector() {
    let mut l = enabled(config(0));
    wr(&mut l, LVT_THERMAL, 0x57);
    assert!(l.thermal_interrupt());
    assert_eq!(l.highest_deliverable(), Some(0x57));
}

#[test]
fn lvt_error_fires_on_esr_accumulation() {
    let mut l = enabled(config(0));
    wr(&mut l, LVT_ERROR, 0xFE);
    l.accept(&fixed(3), 0);
    assert_eq!(l.highest_deliverable(), Some(0xFE));
}

#[test]
fn masked_lvt_error_does_not_fire() {
    let mut l = enabled(config(0));
    wr(&mut l, LVT_ERROR, 0xFE | MASKED);
    l.accept(&fixed(3), 0);
    assert_eq!(l.highest_deliverable(), None);
}

#[test]
fn esr_write_latches_accumulated_errors_then_clears_them() {
    let mut l = enabled(config(0));
    l.accept(&fixed(3), 0);
    assert_eq!(rd(&mut l, ESR), 0, "not visible before a write");
    wr(&mut l, ICR, 0x4); // send illegal
    wr(&mut l, ESR, 0);
    assert_eq!(rd(&mut l, ESR), (1 << 6) | (1 << 5));
    wr(&mut l, ESR, 0);
    assert_eq!(rd(&mut l, ESR), 0);
}

// ----- snapshot ---------------------------------------------------------------------------

#[test]
fn save_restore_save_is_identical() {
    let mut l = timer(PERIODIC);
    wr_at(&mut l, TMICT, 300_000, 10);
    in_service(&mut l, fixed_level(0x70));
    l.accept(&fixed(0x90), 0);
    let saved = l.save();
    let json = serde_json::to_string(&saved).unwrap();
    let mut other = Lapic::new(config(0));
    other
        .restore(&serde_json::from_str(&json).unwrap())
        .unwrap();
    assert_eq!(other.save(), saved);
    assert_eq!(rd_at(&mut other, TMCCT, 10), 300_000);
}

#[test]
fn restore_rejects_inconsistent_state() {
    let mut l = Lapic::new(config(1));
    let good = l.save();
    let bad = [
        LapicState {
            apic_base: 0xFEE0_0400,
            ..good.clone()
        },
        LapicState {
            apic_base: 0xFEE0_0801,
            ..good.clone()
        },
        LapicState {
            tdcr: 0x4,
            ..good.clone()
        },
        LapicState {
            dfr: 0,
            ..good.clone()
        },
        LapicState {
            lvt: [1 << 20; 6],
            ..good.clone()
        },
        LapicState {
            timer_next_ns: Some(5),
            ..good.clone()
        },
        LapicState {
            apic_base: 0xFEE0_0C00,
            ..good.clone()
        },
    ];
    for state in bad {
        assert!(matches!(
            l.restore(&state),
            Err(LapicError::InvalidState(_))
        ));
    }
    assert_eq!(l.save(), good);
}

#[test]
fn kvm_register_page_round_trips() {
    let mut l = timer(PERIODIC);
    wr(&mut l, TPR, 0x20);
    wr(&mut l, LDR, 0x0400_0000);
    wr(&mut l, ICR2, 0x0300_0000);
    wr(&mut l, ICR, 0x4F0);
    wr_at(&mut l, TMICT, 500_000, 0);
    in_service(&mut l, fixed_level(0x70));
    let page = l.to_kvm_register_page();
    assert_eq!(&page[0x30..0x34], &0x0005_0014u32.to_le_bytes());
    assert_eq!(&page[0x130..0x134], &(1u32 << 16).to_le_bytes());
    assert_eq!(&page[0x380..0x384], &500_000u32.to_le_bytes());
    let mut other = Lapic::new(config(0));
    other.load_kvm_register_page(&page).unwrap();
    assert_eq!(other.to_kvm_register_page(), page);
    // The timer restarts from TMICT once a time is known.
    assert_eq!(other.next_deadline(), Some(0));
    other.advance(1_000);
    assert_eq!(other.next_deadline(), Some(501_000));
}

#[test]
fn kvm_register_page_carries_the_full_x2apic_id() {
    let cfg = LapicConfig {
        apic_id: 0x1234,
        ..config(1)
    };
    let l = x2apic(cfg);
    let page = l.to_kvm_register_page();
    assert_eq!(&page[0x20..0x24], &0x1234u32.to_le_bytes());
    let mut other = x2apic(cfg);
    assert_eq!(other.load_kvm_register_page(&page), Ok(()));
    let mut wrong = page;
    wrong[0x20] = 0x35;
    assert_eq!(
        other.load_kvm_register_page(&wrong),
        Err(LapicError::X2apicIdMismatch {
            found: 0x1235,
            expected: 0x1234
        })
    );
}

// ----- properties ---------------------------------------------------------------------------

mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        MmioWrite(u64, Vec<u8>),
        MmioRead(u64, usize),
        MsrWrite(u32, u64),
        MsrRead(u32),
        Accept(u8, u8, bool, bool),
        Advance(u64),
        Ack,
        Lint(u8, bool),
        Take,
    }

    fn interesting_msr() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(MSR_APIC_BASE),
            Just(MSR_TSC_DEADLINE),
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST,
            0x800u32..0x840,
            any::<u32>(),
        ]
    }

    fn interesting_value() -> impl Strategy<Value = u64> {
        prop_oneof![
            any::<u64>(),
            0u64..0x1_0000,
            Just(0xFEE0_0000),
            Just(0xFEE0_0800),
            Just(0xFEE0_0C00),
            Just(0x1FF),
            (0u64..4).prop_map(|m| (m << 17) | 0x40),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..0x1100, prop::collection::vec(any::<u8>(), 0..9))
                .prop_map(|(o, d)| Op::MmioWrite(o, d)),
            (0u64..0x1100, 4u64..5)
                .prop_map(|(o, v)| Op::MmioWrite(o & !0xF, vec![v as u8, 1, 0, 0])),
            (any::<u64>(), 0usize..9).prop_map(|(o, n)| Op::MmioRead(o, n)),
            (interesting_msr(), interesting_value()).prop_map(|(m, v)| Op::MsrWrite(m, v)),
            interesting_msr().prop_map(Op::MsrRead),
            (any::<u8>(), 0u8..8, any::<bool>(), any::<bool>())
                .prop_map(|(v, m, t, l)| Op::Accept(v, m, t, l)),
            (0u64..2_000_000).prop_map(Op::Advance),
            Just(Op::Ack),
            (0u8..3, any::<bool>()).prop_map(|(p, l)| Op::Lint(p, l)),
            Just(Op::Take),
        ]
    }

    fn run(l: &mut Lapic, ops: &[Op]) {
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::MmioWrite(o, d) => {
                    l.mmio_write(*o, d, now);
                }
                Op::MmioRead(o, n) => {
                    let mut b = vec![0; *n];
                    l.mmio_read(*o, &mut b, now);
                }
                Op::MsrWrite(m, v) => {
                    let _ = l.msr_write(*m, *v, now);
                }
                Op::MsrRead(m) => {
                    let _ = l.msr_read(*m, now);
                }
                Op::Accept(v, m, t, lv) => {
                    let mut msg = message(
                        DeliveryMode::from_bits(u32::from(*m)),
                        *v,
                        if *t {
                            TriggerMode::Level
                        } else {
                            TriggerMode::Edge
                        },
                        *lv,
                    );
                    msg.source = Some(1);
                    l.accept(&msg, now);
                }
                Op::Advance(d) => {
                    now = now.saturating_add(*d);
                    l.advance(now);
                }
                Op::Ack => {
                    l.acknowledge();
                }
                Op::Lint(p, lv) => l.set_lint(*p, *lv),
                Op::Take => {
                    l.take_nmi();
                    l.take_extint();
                    l.take_startup();
                    l.perf_interrupt();
                    l.thermal_interrupt();
                }
            }
            // After advancing, nothing is left due: no timer stays in the past.
            l.advance(now);
            if let Some(d) = l.next_deadline() {
                assert!(d > now, "deadline {d} not after now {now}");
            }
        }
    }

    fn ppr_rule(tpr: u8, isr: &[u32; 8]) -> u8 {
        let mut isrv = 0u8;
        for v in 0..=255u8 {
            if isr[usize::from(v / 32)] & (1 << (v % 32)) != 0 {
                isrv = v;
            }
        }
        if tpr >> 4 >= isrv >> 4 {
            tpr
        } else {
            isrv & 0xF0
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(384))]

        #[test]
        fn random_register_traffic_never_panics(
            index in 0usize..4,
            ops in prop::collection::vec(op(), 0..64),
        ) {
            let mut l = Lapic::new(config(index));
            run(&mut l, &ops);
        }

        #[test]
        fn ppr_and_deliverability_follow_the_rule(
            tpr in any::<u8>(),
            isr in any::<[u32; 8]>(),
            irr in any::<[u32; 8]>(),
        ) {
            let mut l = enabled(config(0));
            let mut state = l.save();
            state.tpr = tpr;
            state.isr = isr;
            state.irr = irr;
            l.restore(&state).unwrap();
            let ppr = ppr_rule(tpr, &isr);
            prop_assert_eq!(l.ppr(), ppr);
            prop_assert_eq!(rd(&mut l, PPR), u32::from(ppr));
            let mut best = None;
            for v in 0..=255u8 {
                if irr[usize::from(v / 32)] & (1 << (v % 32)) != 0 {
                    best = Some(v);
                }
            }
            let expect = best.filter(|v| v >> 4 > ppr >> 4);
            prop_assert_eq!(l.highest_deliverable(), expect);
            prop_assert_eq!(l.acknowledge(), expect);
            if let Some(v) = expect {
                prop_assert!(bit_reg(&mut l, ISR0, v));
                prop_assert!(!bit_reg(&mut l, IRR0, v));
            }
        }

        #[test]
        fn save_restore_save_is_identical_after_random_traffic(
            index in 0usize..3,
            ops in prop::collection::vec(op(), 0..48),
        ) {
            let mut l = Lapic::new(config(index));
            run(&mut l, &ops);
            let saved = l.save();
            let json = serde_json::to_string(&saved).unwrap();
            let mut other = Lapic::new(config(index));
            other.restore(&serde_json::from_str(&json).unwrap()).unwrap();
            prop_assert_eq!(other.save(), saved);
        }

        #[test]
        fn hostile_snapshots_are_rejected_or_harmless(
            base in interesting_value(),
            id in any::<u32>(),
            words in any::<[u32; 8]>(),
            lvt in any::<[u32; 6]>(),
            regs in any::<(u32, u32, u32, u32, u32, u64)>(),
            next in any::<Option<u64>>(),
            deadline in any::<u64>(),
            flags in any::<[bool; 7]>(),
            ops in prop::collection::vec(op(), 0..32),
        ) {
            let mut l = Lapic::new(config(1));
            let (svr, dfr, tmict, tdcr, esr, icr) = regs;
            let state = LapicState {
                apic_base: base,
                id,
                // Mostly valid values, so that restore succeeds and the
                // hostile parts (timer, IRR/ISR, flags) are exercised.
                ldr: x2apic_ldr(id),
                dfr: dfr | 0x0FFF_FFFF,
                svr: svr & 0x3FF,
                isr: words,
                irr: words,
                tmr: words,
                esr: esr & 0xEF,
                esr_pending: esr & 0xEF,
                icr,
                lvt: std::array::from_fn(|i| lvt[i] & LvtKind::ALL[i].writable_mask()),
                tmict,
                tdcr: tdcr & 0xB,
                timer_next_ns: next,
                tsc_deadline: deadline,
                timer_restart_pending: flags[0],
                nmi_pending: flags[1],
                extint_pending: flags[2],
                smi_pending: flags[3],
                wait_for_sipi: flags[4],
                startup: flags[5].then_some(StartupEvent::Sipi { vector: 0x10 }),
                lint_level: [flags[6], false],
                ..l.save()
            };
            if l.restore(&state).is_ok() {
                run(&mut l, &ops);
                let page = l.to_kvm_register_page();
                let _ = l.load_kvm_register_page(&page);
                let _ = l.highest_deliverable();
            }
        }

        #[test]
        fn register_page_round_trips_after_random_traffic(
            index in 0usize..3,
            ops in prop::collection::vec(op(), 0..48),
        ) {
            let mut l = Lapic::new(config(index));
            run(&mut l, &ops);
            let page = l.to_kvm_register_page();
            let mut other = l.clone();
            other.load_kvm_register_page(&page).unwrap();
            prop_assert_eq!(other.to_kvm_register_page(), page);
        }
    }
}
