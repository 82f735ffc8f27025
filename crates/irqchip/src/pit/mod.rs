//! 8254 programmable interval timer (ports 0x40-0x43) and port 0x61.
//!
//! Three counters clocked at [`PIT_FREQUENCY_HZ`]. Nothing ticks on its own:
//! every count, OUT level and refresh bit is computed from the caller's
//! virtual clock (`now_ns`), with u128 arithmetic so any `u64` time is safe.
//!
//! Counter 0's OUT is IRQ 0. [`Pit::advance`] returning true means "pulse
//! GSI 0" (raise then lower). Which IOAPIC pin GSI 0 reaches is the routing
//! table's business, not this device's: KVM's default table routes GSI 0 to
//! IOAPIC pin 0, real boards wire the PIT to pin 2 with an interrupt source
//! override. Each true from `advance` is exactly one tick, so the NMI
//! watchdog (LVT0 in NMI mode) can fan the same pulse out as NMIs.
//!
//! Choices where the datasheet and the references (KVM, QEMU) differ:
//! - A complete count write loads the counter at once in every mode and
//!   starts counting (modes 1 and 5 included, as if triggered): counters 0
//!   and 1 have their gates tied high, so a one-shot in mode 1/5 would
//!   otherwise never run. Both references do this.
//! - A control word stops the counter (OUT to its initial level, NULL set)
//!   until a count is written, as the datasheet says. The references keep
//!   counting with the old count; stopping is what a guest writing 0x30 to
//!   silence the PIT (Linux clockevent shutdown) expects.
//! - Reading the control port 0x43 returns 0, as both references do (the
//!   datasheet leaves the bus floating), so we can compare against KVM.
//! - Power-on: all counters mode 3, word access, count 65536, not counting;
//!   nothing fires until the guest programs counter 0 (like KVM).
//! - Modes 6 and 7 are stored (and reported in status) as 2 and 3.
//! - A written count in a periodic mode takes effect immediately, not at the
//!   end of the current period (both references do this).
//! - Port 0x61 reads back bits 3:0 as written; bit 4 toggles every 18 input
//!   clocks (the refresh period, ~15 us); bit 5 is OUT2; bits 7:6 read 0.
//! - IRQ0 expiries: one-shot modes (0, 1, 4, 5) fire once when the count
//!   expires (N clocks after the load); periodic modes (2, 3) every N clocks,
//!   but never more often than the minimum period (default 200 us).
//! - Lost ticks: under [`LostTickPolicy::Reinject`] the backlog is capped at
//!   two seconds' worth of ticks (at least 1), so a host stall of minutes
//!   replays at most two seconds of ticks, one per guest ack, each at
//!   least a minimum period after the last ack. Two seconds, not one, so
//!   a stall of about a second (a VMM stopped and continued) loses nothing.
//! - With [`Pit::set_give_up_lost_acks`] (for LAPICs outside the model,
//!   whose EOIs can be held back or lost on the way), a tick not
//!   acknowledged while [`ACK_TIMEOUT_PERIODS`] more expiries were seen,
//!   each in its own `advance`, and for at least [`ACK_TIMEOUT_MIN_NS`], is
//!   given up and the next owed one goes out, so a lost acknowledgement
//!   cannot stop the timer for good. A host stall is one `advance`, however
//!   long. The cost: a tick the guest keeps pending longer than that may be
//!   merged with the next one, so the default is KVM's: wait forever.

mod channel;
mod state;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use channel::Channel;
pub use state::{PitChannelState, PitError, PitState};

/// Input clock of the 8254 counters.
pub const PIT_FREQUENCY_HZ: u64 = 1_193_182;

/// Default minimum period of a periodic IRQ0 timer (KVM's default).
pub const DEFAULT_MIN_PERIOD_NS: u64 = 200_000;

/// Expiries, each seen by its own `advance`, an IRQ0 tick may stay
/// unacknowledged under reinject before it is taken as lost.
pub const ACK_TIMEOUT_PERIODS: u32 = 4;

/// The shortest wait for an acknowledgement under reinject, whatever the
/// period.
pub const ACK_TIMEOUT_MIN_NS: u64 = 10_000_000;

/// Window of missed ticks kept under reinject: at most this much time's
/// worth of ticks is owed to the guest.
pub const BACKLOG_WINDOW_NS: u64 = 2_000_000_000;

const NS_PER_SEC: u128 = 1_000_000_000;
const FREQ: u128 = PIT_FREQUENCY_HZ as u128;

/// Whole input clocks in `ns` nanoseconds.
fn ns_to_ticks(ns: u64) -> u64 {
    // ticks <= ns, so the narrowing cannot truncate.
    (u128::from(ns) * FREQ / NS_PER_SEC) as u64
}

/// Smallest time in ns by which `ticks` clocks have elapsed.
fn ticks_to_ns_ceil(ticks: u128) -> Option<u128> {
    ticks.checked_mul(NS_PER_SEC).map(|n| n.div_ceil(FREQ))
}

/// What to do with counter 0 expirations the guest has not taken yet.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LostTickPolicy {
    /// Count every expiration and deliver them one per guest ack (KVM default).
    #[default]
    Reinject,
    /// Pulse on expiry whatever the guest did with the last one; missed ticks are lost.
    Discard,
}

/// Control word written to port 0x43.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ControlWord(u8);

impl ControlWord {
    /// Bits 7:6: counter 0-2, or 3 for the read-back command.
    fn select(self) -> u8 {
        self.0 >> 6
    }
    /// Bits 5:4: 0 latch, 1 LSB, 2 MSB, 3 LSB then MSB.
    fn access(self) -> u8 {
        (self.0 >> 4) & 3
    }
    /// Bits 3:1 with 6 and 7 folded onto 2 and 3.
    fn mode(self) -> u8 {
        let mode = (self.0 >> 1) & 7;
        if mode >= 6 {
            mode - 4
        } else {
            mode
        }
    }
    /// Bit 0: BCD counting.
    fn bcd(self) -> bool {
        self.0 & 1 != 0
    }
}

/// Read-back command (control word with select = 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReadBack(u8);

impl ReadBack {
    /// Bit 5 clear: latch the count.
    fn latch_count(self) -> bool {
        self.0 & 0x20 == 0
    }
    /// Bit 4 clear: latch the status.
    fn latch_status(self) -> bool {
        self.0 & 0x10 == 0
    }
    /// Bits 3:1 select counters 2:0.
    fn selects(self, channel: usize) -> bool {
        self.0 & (2 << channel) != 0
    }
}

/// Port 0x61 (system control port B) as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Port61(u8);

impl Port61 {
    const GATE2: u8 = 1 << 0;
    const SPEAKER_DATA: u8 = 1 << 1;
    const CHECK_ENABLES: u8 = 0b1100;
    const REFRESH: u8 = 1 << 4;
    const OUT2: u8 = 1 << 5;

    fn gate2(self) -> bool {
        self.0 & Self::GATE2 != 0
    }
    fn speaker_data(self) -> bool {
        self.0 & Self::SPEAKER_DATA != 0
    }
    fn check_enables(self) -> u8 {
        self.0 & Self::CHECK_ENABLES
    }
}

/// How counter 0's expirations are spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Schedule {
    /// One expiry after N clocks.
    OneShot(u64),
    /// Every N clocks.
    Ticks(u64),
    /// Every so many ns: the programmed period was below the minimum.
    Clamped(u64),
}

impl Schedule {
    /// Length of one period in ns (for the backlog cap).
    fn period_ns(self) -> u128 {
        match self {
            Self::OneShot(n) | Self::Ticks(n) => u128::from(n) * NS_PER_SEC / FREQ,
            Self::Clamped(ns) => u128::from(ns),
        }
    }

    /// Most ticks owed at once: [`BACKLOG_WINDOW_NS`] worth, at least one.
    fn backlog_cap(self) -> u32 {
        match self {
            Self::OneShot(_) => 1,
            _ => {
                let per_window = u128::from(BACKLOG_WINDOW_NS) / self.period_ns().max(1);
                u32::try_from(per_window).unwrap_or(u32::MAX).max(1)
            }
        }
    }
}

/// IRQ0 bookkeeping for counter 0.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct Irq0 {
    epoch_ns: u64,
    expirations: u64,
    backlog: u32,
    in_flight: bool,
    /// When the tick now in flight went out.
    in_flight_since_ns: u64,
    /// `advance` calls that saw expiries since the tick in flight went out.
    in_flight_periods: u32,
    backlog_due_ns: u64,
}

/// The 8254 PIT with port 0x61.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pit {
    channels: [Channel; 3],
    speaker_data_on: bool,
    port61_check_enables: u8,
    policy: LostTickPolicy,
    min_period_ns: u64,
    /// Give up an unacknowledged tick (configuration, not state).
    give_up_lost_acks: bool,
    irq0: Irq0,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// Power-on PIT: counters not counting, gates of counters 0 and 1 high,
    /// counter 2's gate low, reinject policy, 200 us minimum period.
    pub fn new() -> Self {
        Self {
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            speaker_data_on: false,
            port61_check_enables: 0,
            policy: LostTickPolicy::Reinject,
            min_period_ns: DEFAULT_MIN_PERIOD_NS,
            give_up_lost_acks: false,
            irq0: Irq0::default(),
        }
    }

    /// Ports 0x40-0x43 and 0x61; any other port reads 0xFF.
    ///
    /// Port 0x43 (write-only control word) reads 0, as KVM and QEMU do.
    pub fn read_port(&mut self, port: u16, now_ns: u64) -> u8 {
        match port {
            0x40..=0x42 => self
                .channels
                .get_mut(usize::from(port - 0x40))
                .map_or(0xFF, |c| c.read(now_ns)),
            0x43 => 0,
            0x61 => self.read_port61(now_ns),
            _ => 0xFF,
        }
    }

    /// Ports 0x40-0x43 and 0x61; writes to any other port are ignored.
    pub fn write_port(&mut self, port: u16, value: u8, now_ns: u64) {
        match port {
            0x40..=0x42 => {
                let index = usize::from(port - 0x40);
                let loaded = self
                    .channels
                    .get_mut(index)
                    .is_some_and(|c| c.write(value, now_ns));
                if loaded && index == 0 {
                    self.restart_irq0(now_ns);
                }
            }
            0x43 => self.write_control(ControlWord(value), now_ns),
            0x61 => {
                let v = Port61(value);
                self.speaker_data_on = v.speaker_data();
                self.port61_check_enables = v.check_enables();
                self.channels[2].set_gate(v.gate2(), now_ns);
            }
            _ => {}
        }
    }

    fn read_port61(&self, now_ns: u64) -> u8 {
        let ch2 = &self.channels[2];
        let refresh = (ns_to_ticks(now_ns) / 18) % 2 == 1;
        let mut value = self.port61_check_enables;
        if ch2.gate {
            value |= Port61::GATE2;
        }
        if self.speaker_data_on {
            value |= Port61::SPEAKER_DATA;
        }
        if refresh {
            value |= Port61::REFRESH;
        }
        if ch2.out(now_ns) {
            value |= Port61::OUT2;
        }
        value
    }

    fn write_control(&mut self, cw: ControlWord, now_ns: u64) {
        if cw.select() == 3 {
            let rb = ReadBack(cw.0);
            for (index, channel) in self.channels.iter_mut().enumerate() {
                if !rb.selects(index) {
                    continue;
                }
                if rb.latch_count() {
                    channel.latch_count(now_ns);
                }
                if rb.latch_status() {
                    channel.latch_status(now_ns);
                }
            }
            return;
        }
        let index = usize::from(cw.select());
        let Some(channel) = self.channels.get_mut(index) else {
            return;
        };
        if cw.access() == 0 {
            channel.latch_count(now_ns);
            return;
        }
        channel.program(cw);
        if index == 0 {
            // Reprogramming stops counter 0; owed ticks of the old setting go.
            self.clear_backlog();
        }
    }

    /// Set the lost-tick policy; a change drops the backlog.
    pub fn set_policy(&mut self, policy: LostTickPolicy) {
        if policy != self.policy {
            self.policy = policy;
            self.clear_backlog();
        }
    }

    /// Whether reinject gives up a tick whose acknowledgement is overdue
    /// (see the module docs); off by default, as in KVM.
    pub fn set_give_up_lost_acks(&mut self, on: bool) {
        self.give_up_lost_acks = on;
    }

    /// Minimum period of the IRQ0 timer for periodic modes (default 200_000 ns,
    /// as KVM), so a guest cannot burn a host CPU. Counter reads still follow
    /// the programmed count. A change re-phases a running periodic timer from
    /// its last expiry.
    pub fn set_min_period_ns(&mut self, ns: u64) {
        let before = self.schedule();
        self.min_period_ns = ns;
        let after = self.schedule();
        if before == after {
            return;
        }
        if let Some(old) = before {
            if let Some(last) = self.expiry_time(old, self.irq0.expirations) {
                self.irq0.epoch_ns = last;
                self.irq0.expirations = 0;
            }
        }
        let cap = after.map_or(1, Schedule::backlog_cap);
        self.irq0.backlog = self.irq0.backlog.min(cap);
    }

    /// Counter 0's expiry spacing, or None when it is not counting.
    fn schedule(&self) -> Option<Schedule> {
        let c = &self.channels[0];
        if c.null_count || (!c.gate && matches!(c.mode, 0 | 2 | 3 | 4)) {
            return None;
        }
        let n = u64::from(c.count.max(1));
        Some(match c.mode {
            2 | 3 => {
                let min = self.min_period_ns;
                // Clamp when min_period > N / f, compared exactly.
                if u128::from(min) * FREQ > u128::from(n) * NS_PER_SEC {
                    Schedule::Clamped(min)
                } else {
                    Schedule::Ticks(n)
                }
            }
            _ => Schedule::OneShot(n),
        })
    }

    /// Expirations of `schedule` that have happened by `now_ns`.
    fn expirations_by(&self, schedule: Schedule, now_ns: u64) -> u64 {
        let elapsed = now_ns.saturating_sub(self.irq0.epoch_ns);
        match schedule {
            Schedule::OneShot(n) => u64::from(ns_to_ticks(elapsed) >= n),
            Schedule::Ticks(n) => ns_to_ticks(elapsed) / n.max(1),
            Schedule::Clamped(ns) => elapsed / ns.max(1),
        }
    }

    /// Time of expiration number `j` (1-based; 0 is the epoch), if representable.
    fn expiry_time(&self, schedule: Schedule, j: u64) -> Option<u64> {
        let j = u128::from(j);
        let offset = match schedule {
            Schedule::OneShot(_) if j > 1 => return None,
            Schedule::OneShot(n) | Schedule::Ticks(n) => ticks_to_ns_ceil(j * u128::from(n))?,
            Schedule::Clamped(ns) => j * u128::from(ns),
        };
        let at = u128::from(self.irq0.epoch_ns).checked_add(offset)?;
        u64::try_from(at).ok()
    }

    fn restart_irq0(&mut self, now_ns: u64) {
        self.irq0.epoch_ns = now_ns;
        self.irq0.expirations = 0;
        self.clear_backlog();
    }

    /// When `advance` must next be called for counter 0's output (None: nothing scheduled).
    pub fn next_deadline(&self) -> Option<u64> {
        let expiry = self
            .schedule()
            .and_then(|s| self.expiry_time(s, self.irq0.expirations.saturating_add(1)));
        let owed = (self.policy == LostTickPolicy::Reinject
            && self.irq0.backlog > 0
            && !self.irq0.in_flight)
            .then_some(self.irq0.backlog_due_ns);
        match (expiry, owed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Bring counter 0 up to `now_ns`; returns true if IRQ0 must be pulsed (raise then lower GSI 0) now.
    ///
    /// Reinject: expirations join the backlog (capped) and one is delivered
    /// only when none is outstanding. Discard: one pulse if anything expired
    /// since the last call, however many.
    pub fn advance(&mut self, now_ns: u64) -> bool {
        let schedule = self.schedule();
        let new = match schedule {
            Some(s) => {
                let total = self.expirations_by(s, now_ns);
                let new = total.saturating_sub(self.irq0.expirations);
                self.irq0.expirations = self.irq0.expirations.max(total);
                new
            }
            None => 0,
        };
        match self.policy {
            LostTickPolicy::Discard => new > 0,
            LostTickPolicy::Reinject => {
                if new > 0 {
                    let cap = u64::from(schedule.map_or(1, Schedule::backlog_cap));
                    let owed = u64::from(self.irq0.backlog).saturating_add(new).min(cap);
                    self.irq0.backlog = u32::try_from(owed).unwrap_or(u32::MAX);
                }
                if self.give_up_lost_acks && self.irq0.in_flight && new > 0 {
                    self.irq0.in_flight_periods = self.irq0.in_flight_periods.saturating_add(1);
                    if self.ack_overdue(now_ns) {
                        self.irq0.in_flight = false;
                        self.irq0.backlog_due_ns = now_ns;
                    }
                }
                let owed_not_yet_due = new == 0 && now_ns < self.irq0.backlog_due_ns;
                if self.irq0.in_flight || self.irq0.backlog == 0 || owed_not_yet_due {
                    return false;
                }
                self.irq0.backlog -= 1;
                self.irq0.in_flight = true;
                self.irq0.in_flight_since_ns = now_ns;
                self.irq0.in_flight_periods = 0;
                true
            }
        }
    }

    /// Whether the tick in flight has waited long enough to be given up.
    fn ack_overdue(&self, now_ns: u64) -> bool {
        self.irq0.in_flight_periods >= ACK_TIMEOUT_PERIODS
            && now_ns
                >= self
                    .irq0
                    .in_flight_since_ns
                    .saturating_add(ACK_TIMEOUT_MIN_NS)
    }

    /// The guest acknowledged the last IRQ0 (PIC EOI/auto-EOI or IOAPIC EOI
    /// of the PIT pin): under Reinject the next owed tick becomes due one
    /// minimum period later (or with the next regular expiry, if sooner).
    ///
    /// The gap bounds the catch-up rate after a host stall, and keeps the
    /// owed tick out of the acknowledgement itself: a LAPIC that reports the
    /// EOI when it injects (KVM's, on some hosts) would otherwise get the
    /// next tick while the guest's handler still runs with interrupts off.
    pub fn irq0_acked(&mut self, now_ns: u64) {
        if self.policy == LostTickPolicy::Reinject && self.irq0.in_flight {
            self.irq0.in_flight = false;
            self.irq0.backlog_due_ns = now_ns.saturating_add(self.min_period_ns);
        }
    }

    /// Drop the tick backlog (the PIT pin was unmasked; KVM does this).
    ///
    /// Also forgets an unacknowledged pulse: one sent while the pin was
    /// masked will never be acked, and would otherwise block reinjection.
    pub fn clear_backlog(&mut self) {
        self.irq0.backlog = 0;
        self.irq0.in_flight = false;
    }

    /// Ticks missed and still owed to the guest under Reinject.
    pub fn backlog(&self) -> u32 {
        self.irq0.backlog
    }

    /// Snapshot of the device state (the minimum period is host configuration, not saved).
    pub fn save(&self) -> PitState {
        PitState {
            channels: [
                self.channels[0].to_state(),
                self.channels[1].to_state(),
                self.channels[2].to_state(),
            ],
            speaker_data_on: self.speaker_data_on,
            port61_check_enables: self.port61_check_enables,
            policy: self.policy,
            backlog: self.irq0.backlog,
            irq0_in_flight: self.irq0.in_flight,
            irq0_in_flight_since_ns: self.irq0.in_flight_since_ns,
            irq0_in_flight_periods: self.irq0.in_flight_periods,
            backlog_due_ns: self.irq0.backlog_due_ns,
            irq0_epoch_ns: self.irq0.epoch_ns,
            irq0_expirations: self.irq0.expirations,
        }
    }

    /// Load a snapshot after validating it; on error nothing changes. A
    /// backlog above the cap for this PIT's minimum period is cut to the cap.
    pub fn restore(&mut self, state: &PitState) -> Result<(), PitError> {
        if state.port61_check_enables & !Port61::CHECK_ENABLES != 0 {
            return Err(PitError::InvalidPort61(state.port61_check_enables));
        }
        let channels = [
            Channel::from_state(0, &state.channels[0])?,
            Channel::from_state(1, &state.channels[1])?,
            Channel::from_state(2, &state.channels[2])?,
        ];
        self.channels = channels;
        self.speaker_data_on = state.speaker_data_on;
        self.port61_check_enables = state.port61_check_enables;
        self.policy = state.policy;
        self.irq0 = Irq0 {
            epoch_ns: state.irq0_epoch_ns,
            expirations: state.irq0_expirations,
            backlog: state.backlog,
            in_flight: state.irq0_in_flight,
            in_flight_since_ns: state.irq0_in_flight_since_ns,
            in_flight_periods: state.irq0_in_flight_periods,
            backlog_due_ns: state.backlog_due_ns,
        };
        let cap = self.schedule().map_or(1, Schedule::backlog_cap);
        self.irq0.backlog = self.irq0.backlog.min(cap);
        Ok(())
    }
}
