//! State conversion between virq's device models and KVM's in-kernel
//! irqchip (`KVM_{GET,SET}_IRQCHIP`, `KVM_{GET,SET}_PIT2`, the LAPIC page),
//! for snapshots, migration and switching a VM between the kernel and the
//! userspace irqchip.
//!
//! Every conversion is total: any KVM state, however hostile, converts
//! without panicking. Conversions from KVM keep values our models cannot
//! represent as they are where the model's `restore` rejects them (an
//! `init_state` of 9, a PIT mode of 0x42 is the exception, see below), and
//! drop what KVM keeps but never acts on (reserved redirection bits).
//!
//! What does not survive a trip through KVM:
//! - PIC: `single_mode` (KVM always expects ICW3) and `pending_acks`;
//!   the cascade line is translated between KVM's pulse and our wire.
//! - IOAPIC: the storm guard (`eoi_redeliveries`, deferred pins), the
//!   uncollected `acked_pins`, and the line level of an unmasked edge pin
//!   held asserted (see [`ioapic_to_kvm`]); KVM is always version 0x11.
//! - PIT: port 0x61 check-enable bits, the lost-tick policy and backlog
//!   (KVM keeps its reinject state outside `kvm_pit_state2`), the "no count
//!   written since the control word" state of a programmed counter, the gate
//!   pause bookkeeping. `KVM_SET_PIT2` reloads counters 1 and 2 at the time
//!   of the ioctl and restarts counter 0's timer then (it reports counter
//!   0's load time back as given, but counts from the ioctl), so the
//!   counters' phase is lost.
#![forbid(unsafe_code)]

mod bytes;
#[cfg(test)]
mod tests;

use kvm_bindings::{
    kvm_ioapic_state, kvm_ioapic_state__bindgen_ty_1, kvm_irqchip, kvm_irqchip__bindgen_ty_1,
    kvm_lapic_state, kvm_pic_state, kvm_pit_channel_state, kvm_pit_state2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_FLAGS_SPEAKER_DATA_ON,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use virq::ioapic::{
    Ioapic, IoapicError, IoapicState, IoapicVersion, Polarity, Redirection, IOAPIC_PINS,
};
use virq::pic::{Pic, PicChipState, PicError, PicState};
use virq::pit::{
    LostTickPolicy, Pit, PitChannelState, PitError, PitState, DEFAULT_MIN_PERIOD_NS,
    PIT_FREQUENCY_HZ,
};

use bytes::{field, raw_bytes, IRQCHIP_SIZE, IRQCHIP_UNION_OFFSET};

/// The IOAPIC KVM's in-kernel irqchip models (version 0x11, 24 pins).
pub const KVM_IOAPIC_VERSION: IoapicVersion = IoapicVersion::V11;

/// KVM's `mode` for a PIT counter no control word was ever written to
/// (set by its reset); counter 0 does not run in it.
pub const KVM_PIT_MODE_UNPROGRAMMED: u8 = 0xFF;

/// Size of the LAPIC register page KVM exchanges (`kvm_lapic_state.regs`).
pub const LAPIC_PAGE_SIZE: usize = 1024;

/// Errors from moving state in or out of KVM's in-kernel irqchip.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A KVM ioctl failed; the string names it.
    #[error("{0} failed: {1}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// The PIC state is not one an 8259A pair can be in.
    #[error("invalid PIC state: {0}")]
    Pic(#[from] PicError),
    /// The IOAPIC state is invalid, or not version 0x11.
    #[error("invalid IOAPIC state for KVM: {0}")]
    Ioapic(#[from] IoapicError),
    /// The PIT state is invalid.
    #[error("invalid PIT state: {0}")]
    Pit(#[from] PitError),
}

fn ioctl(name: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Ioctl(name, e)
}

// ---------------------------------------------------------------- clock ---

/// How KVM's host clock maps onto the VM's virtual clock, and what time it
/// is: KVM's PIT keeps `count_load_time` as host CLOCK_MONOTONIC nanoseconds
/// (kernel ktime), our PIT as virtual nanoseconds.
///
/// `host = virtual + host_ns_at_virtual_zero`. Build it by reading both
/// clocks at one instant with [`ClockMap::at`]. Conversions saturate at the
/// ends of each clock's range instead of wrapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockMap {
    /// Host CLOCK_MONOTONIC reading (ns) when the virtual clock read 0.
    pub host_ns_at_virtual_zero: i128,
    /// The virtual time (ns) the conversion happens at: a PIT converted from
    /// KVM counts counter 0's expirations before it as already delivered.
    pub virtual_now_ns: u64,
}

impl ClockMap {
    /// The map given one instant read on both clocks.
    pub fn at(host_now_ns: i64, virtual_now_ns: u64) -> Self {
        Self {
            host_ns_at_virtual_zero: i128::from(host_now_ns) - i128::from(virtual_now_ns),
            virtual_now_ns,
        }
    }

    /// Host time (ns) of virtual time `virtual_ns`.
    pub fn to_host(&self, virtual_ns: u64) -> i64 {
        let host = i128::from(virtual_ns).saturating_add(self.host_ns_at_virtual_zero);
        i64::try_from(host).unwrap_or(if host < 0 { i64::MIN } else { i64::MAX })
    }

    /// Virtual time (ns) of host time `host_ns`; 0 for host times before
    /// the virtual clock started.
    pub fn to_virtual(&self, host_ns: i64) -> u64 {
        let virt = i128::from(host_ns).saturating_sub(self.host_ns_at_virtual_zero);
        u64::try_from(virt).unwrap_or(if virt < 0 { 0 } else { u64::MAX })
    }
}

// ------------------------------------------------------------------ PIC ---

/// The master's input the slave drives.
const CASCADE_BIT: u8 = 1 << 2;

/// Our PIC pair as KVM's (master, slave). `single_mode` and
/// `pending_acks` have no place in KVM's state and are dropped.
///
/// The master's cascade input (IR2) follows the two conventions: our model
/// holds the line (`last_irr` bit 2) high while the slave requests, KVM
/// pulses it on every update and keeps it low in between, with the request
/// latched in `irr` either way. So KVM's `last_irr` bit 2 is always clear.
pub fn pic_to_kvm(state: &PicState) -> (kvm_pic_state, kvm_pic_state) {
    let mut master = pic_chip_to_kvm(&state.master);
    master.last_irr &= !CASCADE_BIT;
    (master, pic_chip_to_kvm(&state.slave))
}

/// KVM's PIC pair as ours. Every field is taken as is (non-zero bytes are
/// true), except the master's `last_irr` bit 2, which copies its `irr` bit 2
/// (the cascade line is high while the request stands; see [`pic_to_kvm`]);
/// `single_mode` and `pending_acks` become false and 0. The model's
/// `restore` checks the values.
pub fn pic_from_kvm(master: &kvm_pic_state, slave: &kvm_pic_state) -> PicState {
    let mut master = pic_chip_from_kvm(master);
    master.last_irr = (master.last_irr & !CASCADE_BIT) | (master.irr & CASCADE_BIT);
    PicState {
        master,
        slave: pic_chip_from_kvm(slave),
        pending_acks: 0,
    }
}

fn pic_chip_to_kvm(c: &PicChipState) -> kvm_pic_state {
    kvm_pic_state {
        last_irr: c.last_irr,
        irr: c.irr,
        imr: c.imr,
        isr: c.isr,
        priority_add: c.priority_add,
        irq_base: c.irq_base,
        read_reg_select: c.read_reg_select.into(),
        poll: c.poll.into(),
        special_mask: c.special_mask.into(),
        init_state: c.init_state,
        auto_eoi: c.auto_eoi.into(),
        rotate_on_auto_eoi: c.rotate_on_auto_eoi.into(),
        special_fully_nested_mode: c.special_fully_nested_mode.into(),
        init4: c.init4.into(),
        elcr: c.elcr,
        elcr_mask: c.elcr_mask,
    }
}

fn pic_chip_from_kvm(k: &kvm_pic_state) -> PicChipState {
    PicChipState {
        last_irr: k.last_irr,
        irr: k.irr,
        imr: k.imr,
        isr: k.isr,
        priority_add: k.priority_add,
        irq_base: k.irq_base,
        read_reg_select: k.read_reg_select != 0,
        poll: k.poll != 0,
        special_mask: k.special_mask != 0,
        init_state: k.init_state,
        auto_eoi: k.auto_eoi != 0,
        rotate_on_auto_eoi: k.rotate_on_auto_eoi != 0,
        special_fully_nested_mode: k.special_fully_nested_mode != 0,
        init4: k.init4 != 0,
        single_mode: false,
        elcr: k.elcr,
        elcr_mask: k.elcr_mask,
    }
}

/// `kvm_pic_state` from its 16-byte memory image (one byte per field, in order).
fn pic_from_image(b: &[u8]) -> kvm_pic_state {
    let byte = |i: usize| b.get(i).copied().unwrap_or(0);
    kvm_pic_state {
        last_irr: byte(0),
        irr: byte(1),
        imr: byte(2),
        isr: byte(3),
        priority_add: byte(4),
        irq_base: byte(5),
        read_reg_select: byte(6),
        poll: byte(7),
        special_mask: byte(8),
        init_state: byte(9),
        auto_eoi: byte(10),
        rotate_on_auto_eoi: byte(11),
        special_fully_nested_mode: byte(12),
        init4: byte(13),
        elcr: byte(14),
        elcr_mask: byte(15),
    }
}

// --------------------------------------------------------------- IOAPIC ---

/// Offset of `redirtbl` in `kvm_ioapic_state` (u64 base, four u32).
const IOAPIC_REDIRTBL_OFFSET: usize = 24;
/// Size of `kvm_ioapic_state`.
const IOAPIC_STATE_SIZE: usize = IOAPIC_REDIRTBL_OFFSET + 8 * IOAPIC_PINS;

/// Our IOAPIC as KVM's.
///
/// KVM's `irr` holds the pins whose line is asserted and whose request has
/// not been delivered: our asserted level pins, plus asserted edge pins that
/// are masked (their edge was swallowed; KVM too never replays it on
/// unmask). An asserted edge pin that is unmasked was delivered when it rose
/// and is left out: `KVM_SET_IRQCHIP` raises every pin in `irr` again, which
/// would deliver it a second time. The assertion is computed from
/// `line_levels`, polarity and trigger mode, not taken from our `irr`.
pub fn ioapic_to_kvm(state: &IoapicState) -> kvm_ioapic_state {
    let mut irr = 0u32;
    let mut redirtbl = [kvm_ioapic_state__bindgen_ty_1 { bits: 0 }; IOAPIC_PINS];
    for (pin, (slot, &bits)) in redirtbl
        .iter_mut()
        .zip(state.redirection_table.iter())
        .enumerate()
    {
        *slot = kvm_ioapic_state__bindgen_ty_1 { bits };
        let rte = Redirection::from_bits(bits);
        let asserted = rte.asserted(state.line_levels & (1 << pin) != 0);
        if asserted && (rte.is_level() || rte.masked()) {
            irr |= 1 << pin;
        }
    }
    kvm_ioapic_state {
        base_address: state.base_address,
        ioregsel: state.ioregsel.into(),
        id: state.id.into(),
        irr,
        pad: 0,
        redirtbl,
    }
}

/// KVM's IOAPIC as ours, for a model of `version` (KVM's is
/// [`KVM_IOAPIC_VERSION`]).
///
/// - KVM's `irr` bit means "asserted": the line level we record is that
///   assertion, inverted for active-low pins (KVM ignores polarity); our
///   `irr` is its level-triggered part, as the model derives it.
/// - Redirection entries keep the writable bits and remote IRR (level
///   entries only); reserved bits a guest wrote (KVM keeps them, but they
///   mean nothing) and the never-set delivery status are dropped.
/// - `ioregsel` is KVM's 8-bit register; an `id` beyond 0xFF becomes 0xFF so
///   that `restore` rejects it (as any ID beyond 4 bits).
/// - KVM's EOI storm counters are not exported: ours start at zero.
pub fn ioapic_from_kvm(state: &kvm_ioapic_state, version: IoapicVersion) -> IoapicState {
    let image = ioapic_image(state);
    let mut redirection_table = [0u64; IOAPIC_PINS];
    let mut line_levels = 0u32;
    let mut irr = 0u32;
    for (pin, slot) in redirection_table.iter_mut().enumerate() {
        let raw = Redirection::from_bits(u64::from_ne_bytes(field(
            &image,
            IOAPIC_REDIRTBL_OFFSET + 8 * pin,
        )));
        let rte = Redirection::from_bits(raw.bits() & Redirection::WRITABLE)
            .with_remote_irr(raw.remote_irr() && raw.is_level());
        *slot = rte.bits();
        let asserted = state.irr & (1 << pin) != 0;
        if asserted != (rte.polarity() == Polarity::ActiveLow) {
            line_levels |= 1 << pin;
        }
        if asserted && rte.is_level() {
            irr |= 1 << pin;
        }
    }
    IoapicState {
        version,
        base_address: state.base_address,
        ioregsel: (state.ioregsel & 0xFF) as u8,
        id: u8::try_from(state.id).unwrap_or(u8::MAX),
        irr,
        redirection_table,
        line_levels,
        eoi_redeliveries: [0; IOAPIC_PINS],
        deferred_pins: 0,
        deferred_deadline_ns: None,
        acked_pins: 0,
    }
}

/// The memory image of `state` (its redirection entries are unions).
fn ioapic_image(state: &kvm_ioapic_state) -> [u8; IOAPIC_STATE_SIZE] {
    let chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        pad: 0,
        chip: kvm_irqchip__bindgen_ty_1 { ioapic: *state },
    };
    let image: [u8; IRQCHIP_SIZE] = raw_bytes(&chip);
    field(&image, IRQCHIP_UNION_OFFSET)
}

/// `kvm_ioapic_state` from its memory image.
fn ioapic_from_image(b: &[u8]) -> kvm_ioapic_state {
    let u32_at = |offset| u32::from_ne_bytes(field(b, offset));
    let mut redirtbl = [kvm_ioapic_state__bindgen_ty_1 { bits: 0 }; IOAPIC_PINS];
    for (pin, slot) in redirtbl.iter_mut().enumerate() {
        let bits = u64::from_ne_bytes(field(b, IOAPIC_REDIRTBL_OFFSET + 8 * pin));
        *slot = kvm_ioapic_state__bindgen_ty_1 { bits };
    }
    kvm_ioapic_state {
        base_address: u64::from_ne_bytes(field(b, 0)),
        ioregsel: u32_at(8),
        id: u32_at(12),
        irr: u32_at(16),
        pad: u32_at(20),
        redirtbl,
    }
}

// ------------------------------------------------------------------ PIT ---

/// Our PIT as KVM's `kvm_pit_state2`.
///
/// Channel fields map one to one (KVM's encodings: `count` is the reload
/// value N with 65536 for a written 0; `rw_mode` 1 LSB, 2 MSB, 3 word;
/// `read_state`/`write_state`/`count_latched` 1 LSB, 2 MSB, 3 word low byte
/// next, 4 word high byte next; booleans as 0/1); `count_load_time` goes
/// through `clock`. A counter that never had a count loaded (not counting,
/// mode 3, count 65536, load time 0: the power-on state) becomes KVM's
/// unprogrammed counter, mode [`KVM_PIT_MODE_UNPROGRAMMED`], as KVM's own
/// reset leaves it, so that counter 0 does not start ticking in KVM. (A guest
/// that wrote a mode 3 control word to such a counter and is converted before
/// writing the count looks the same; its count then loads in KVM with no
/// mode, which stops counter 0 until the next control word.) Any other
/// not-counting counter (control word written, count not yet complete) keeps
/// its mode: KVM keeps counting with the old count then, and the guest's
/// coming count write must find the right mode.
///
/// `flags` carries only [`KVM_PIT_FLAGS_SPEAKER_DATA_ON`] (no HPET legacy
/// routing). KVM restarts the counters when the state is set (see the
/// module docs).
pub fn pit_to_kvm(state: &PitState, clock: &ClockMap) -> kvm_pit_state2 {
    let [c0, c1, c2] = &state.channels;
    kvm_pit_state2 {
        channels: [
            pit_channel_to_kvm(c0, clock),
            pit_channel_to_kvm(c1, clock),
            pit_channel_to_kvm(c2, clock),
        ],
        flags: if state.speaker_data_on {
            KVM_PIT_FLAGS_SPEAKER_DATA_ON
        } else {
            0
        },
        reserved: [0; 9],
    }
}

/// KVM's `kvm_pit_state2` as our PIT.
///
/// - Mode [`KVM_PIT_MODE_UNPROGRAMMED`] (or any value beyond 7) is our
///   power-on counter: mode 3, not counting, loaded at time 0. Modes 6 and 7
///   fold to 2 and 3 as the 8254 does.
/// - `rw_mode` 0 (KVM's reset leaves it so) is our power-on word access,
///   with both flip-flops at the low byte. Other invalid encodings are kept
///   for `restore` to reject.
/// - `count` 0 is 65536 (KVM loads it so); other values are kept.
/// - KVM has no "control word written, no count yet" state, nor our gate
///   pause record: `null_count` is set only for unprogrammed counters and
///   `gate_low_since_ns` is 0.
/// - Not in `kvm_pit_state2` (the reinject setting and pending ticks live
///   elsewhere in KVM): policy is [`LostTickPolicy::Reinject`] (KVM's
///   default), no backlog, nothing in flight, port 0x61 check enables 0.
/// - Counter 0's IRQ0 epoch is its load time and the expirations up to
///   `clock.virtual_now_ns` count as delivered, so the model does not
///   replay the ticks KVM already delivered. They are counted with
///   [`DEFAULT_MIN_PERIOD_NS`] as the minimum period.
pub fn pit_from_kvm(state: &kvm_pit_state2, clock: &ClockMap) -> PitState {
    let [k0, k1, k2] = &state.channels;
    let channels = [
        pit_channel_from_kvm(k0, clock),
        pit_channel_from_kvm(k1, clock),
        pit_channel_from_kvm(k2, clock),
    ];
    let irq0_epoch_ns = channels[0].count_load_time;
    let irq0_expirations = irq0_expirations(&channels[0], clock.virtual_now_ns);
    PitState {
        channels,
        speaker_data_on: state.flags & KVM_PIT_FLAGS_SPEAKER_DATA_ON != 0,
        port61_check_enables: 0,
        policy: LostTickPolicy::Reinject,
        backlog: 0,
        irq0_in_flight: false,
        irq0_in_flight_since_ns: 0,
        irq0_in_flight_periods: 0,
        backlog_due_ns: 0,
        irq0_epoch_ns,
        irq0_expirations,
    }
}

/// Our power-on access encoding (word, low byte first) in KVM's numbers.
const ACCESS_WORD: u8 = 3;
/// Power-on mode of our counters.
const POWER_ON_MODE: u8 = 3;
/// Power-on (and largest) count.
const FULL_COUNT: u32 = 0x1_0000;

/// Whether `c` looks like a counter that never had a count loaded: not
/// counting, in the power-on mode and count, loaded at time 0. (Flip-flops
/// and latches pass through KVM as they are, so they do not matter here.)
fn is_power_on(c: &PitChannelState) -> bool {
    c.null_count && c.mode == POWER_ON_MODE && c.count == FULL_COUNT && c.count_load_time == 0
}

fn pit_channel_to_kvm(c: &PitChannelState, clock: &ClockMap) -> kvm_pit_channel_state {
    kvm_pit_channel_state {
        count: c.count,
        latched_count: c.latched_count,
        count_latched: c.count_latched,
        status_latched: c.status_latched.into(),
        status: c.status,
        read_state: c.read_state,
        write_state: c.write_state,
        write_latch: c.write_latch,
        rw_mode: c.rw_mode,
        mode: if is_power_on(c) {
            KVM_PIT_MODE_UNPROGRAMMED
        } else {
            c.mode
        },
        bcd: c.bcd.into(),
        gate: c.gate.into(),
        count_load_time: clock.to_host(c.count_load_time),
    }
}

fn pit_channel_from_kvm(k: &kvm_pit_channel_state, clock: &ClockMap) -> PitChannelState {
    let unprogrammed = k.mode > 7;
    let mode = match k.mode {
        0..=5 => k.mode,
        6 | 7 => k.mode - 4,
        _ => POWER_ON_MODE,
    };
    let (rw_mode, read_state, write_state) = if k.rw_mode == 0 {
        (ACCESS_WORD, ACCESS_WORD, ACCESS_WORD)
    } else {
        (k.rw_mode, k.read_state, k.write_state)
    };
    PitChannelState {
        count: if k.count == 0 { FULL_COUNT } else { k.count },
        latched_count: k.latched_count,
        count_latched: k.count_latched,
        status_latched: k.status_latched != 0,
        status: k.status,
        read_state,
        write_state,
        write_latch: k.write_latch,
        rw_mode,
        mode,
        bcd: k.bcd != 0,
        gate: k.gate != 0,
        count_load_time: if unprogrammed {
            0
        } else {
            clock.to_virtual(k.count_load_time)
        },
        null_count: unprogrammed,
        gate_low_since_ns: 0,
    }
}

/// Counter 0 expirations between its load and `now_ns`, counted as our PIT
/// counts them for IRQ0 (one-shot modes expire once; periodic ones every N
/// clocks, or every minimum period when N clocks are shorter).
fn irq0_expirations(c: &PitChannelState, now_ns: u64) -> u64 {
    const NS_PER_SEC: u128 = 1_000_000_000;
    let freq = u128::from(PIT_FREQUENCY_HZ);
    let gate_stops = !c.gate && matches!(c.mode, 0 | 2 | 3 | 4);
    if c.null_count || gate_stops {
        return 0;
    }
    let n = u64::from(c.count.max(1));
    let elapsed = now_ns.saturating_sub(c.count_load_time);
    // Whole input clocks; never more than `elapsed`, so it fits.
    let ticks = u64::try_from(u128::from(elapsed) * freq / NS_PER_SEC).unwrap_or(u64::MAX);
    match c.mode {
        2 | 3 => {
            let min = DEFAULT_MIN_PERIOD_NS;
            if u128::from(min) * freq > u128::from(n) * NS_PER_SEC {
                elapsed / min.max(1)
            } else {
                ticks / n
            }
        }
        _ => u64::from(ticks >= n),
    }
}

// ---------------------------------------------------------------- LAPIC ---

/// A LAPIC register page (`Lapic::to_kvm_register_page`) as KVM's
/// `kvm_lapic_state`, byte for byte.
pub fn lapic_page_to_kvm(page: &[u8; LAPIC_PAGE_SIZE]) -> kvm_lapic_state {
    let mut state = kvm_lapic_state::default();
    for (dst, &src) in state.regs.iter_mut().zip(page.iter()) {
        *dst = std::os::raw::c_char::from_ne_bytes([src]);
    }
    state
}

/// KVM's `kvm_lapic_state` as a LAPIC register page, byte for byte.
pub fn lapic_page_from_kvm(state: &kvm_lapic_state) -> [u8; LAPIC_PAGE_SIZE] {
    let mut page = [0u8; LAPIC_PAGE_SIZE];
    for (dst, src) in page.iter_mut().zip(state.regs.iter()) {
        let [byte] = src.to_ne_bytes();
        *dst = byte;
    }
    page
}

// ----------------------------------------------------------- chip level ---

/// The state of KVM's in-kernel PIC pair, IOAPIC and PIT, in our types.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelIrqchipState {
    /// Both 8259As.
    pub pic: PicState,
    /// The IOAPIC (version 0x11).
    pub ioapic: IoapicState,
    /// The 8254.
    pub pit: PitState,
}

/// Read KVM's in-kernel irqchip (`KVM_GET_IRQCHIP` for the PIC master,
/// slave and the IOAPIC; `KVM_GET_PIT2`) and convert it to our states, with
/// `clock` mapping the PIT's host times. The result is not validated: load
/// it with each model's `restore`.
pub fn read_kernel_irqchip(vm: &VmFd, clock: &ClockMap) -> Result<KernelIrqchipState, StateError> {
    let master = pic_from_image(&get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?);
    let slave = pic_from_image(&get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?);
    let ioapic = ioapic_from_image(&get_irqchip(vm, KVM_IRQCHIP_IOAPIC)?);
    let pit = vm.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?;
    Ok(KernelIrqchipState {
        pic: pic_from_kvm(&master, &slave),
        ioapic: ioapic_from_kvm(&ioapic, KVM_IOAPIC_VERSION),
        pit: pit_from_kvm(&pit, clock),
    })
}

/// Check `state` by restoring it into scratch models (so a hostile snapshot
/// never reaches KVM), then load it into KVM's in-kernel irqchip with
/// `KVM_SET_IRQCHIP` (slave, master, IOAPIC) and `KVM_SET_PIT2`. The IOAPIC
/// state must be version 0x11. Nothing is written if the check fails.
pub fn write_kernel_irqchip(
    vm: &VmFd,
    state: &KernelIrqchipState,
    clock: &ClockMap,
) -> Result<(), StateError> {
    Pic::new().restore(&state.pic)?;
    Ioapic::new(KVM_IOAPIC_VERSION).restore(&state.ioapic)?;
    Pit::new().restore(&state.pit)?;

    let (master, slave) = pic_to_kvm(&state.pic);
    // Slave first: setting the master re-evaluates the cascade from the slave.
    for (id, pic) in [
        (KVM_IRQCHIP_PIC_SLAVE, slave),
        (KVM_IRQCHIP_PIC_MASTER, master),
    ] {
        let chip = kvm_irqchip {
            chip_id: id,
            pad: 0,
            chip: kvm_irqchip__bindgen_ty_1 { pic },
        };
        vm.set_irqchip(&chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    let chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        pad: 0,
        chip: kvm_irqchip__bindgen_ty_1 {
            ioapic: ioapic_to_kvm(&state.ioapic),
        },
    };
    vm.set_irqchip(&chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    vm.set_pit2(&pit_to_kvm(&state.pit, clock))
        .map_err(ioctl("KVM_SET_PIT2"))
}

/// `KVM_GET_IRQCHIP` for `chip_id`; returns the union's memory image.
fn get_irqchip(
    vm: &VmFd,
    chip_id: u32,
) -> Result<[u8; IRQCHIP_SIZE - IRQCHIP_UNION_OFFSET], StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?;
    let image: [u8; IRQCHIP_SIZE] = raw_bytes(&chip);
    Ok(field(&image, IRQCHIP_UNION_OFFSET))
}
