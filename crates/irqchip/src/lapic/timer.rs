//! The APIC timer: one-shot, periodic and TSC-deadline.
//!
//! The bus clock runs at a nominal 1 GHz, so one count before the divider is
//! one nanosecond. `timer_next_ns` is the single source of truth for when the
//! timer fires next; the current count is derived from it.

use super::regs::{LvtKind, Tdcr, TimerMode, VectorSet};
use super::{Lapic, Lvt, MIN_PERIODIC_NS};
use crate::pit::{LostTickPolicy, BACKLOG_WINDOW_NS};

const NS_PER_SEC: u128 = 1_000_000_000;

impl Lapic {
    /// When [`Lapic::advance`] must next be called; None if no timer is armed.
    /// A masked timer still counts and is reported.
    pub fn next_deadline(&self) -> Option<u64> {
        if self.s.timer_restart_pending {
            return Some(0);
        }
        self.s.timer_next_ns
    }

    /// Fire a timer that is due at `now_ns` into the IRR (unless LVT timer is
    /// masked). A periodic timer that missed several periods fires once and
    /// its next expiry stays on the original period grid, after `now_ns`.
    pub fn advance(&mut self, now_ns: u64) {
        if self.s.timer_restart_pending {
            self.s.timer_restart_pending = false;
            self.arm_from_tmict(now_ns);
        }
        let Some(due) = self.s.timer_next_ns else {
            return;
        };
        if due > now_ns {
            return;
        }
        match self.timer_mode() {
            TimerMode::Periodic => {
                let interval = self.reload_interval();
                let missed = (now_ns - due) / interval;
                let next = missed
                    .checked_add(1)
                    .and_then(|n| n.checked_mul(interval))
                    .and_then(|d| due.checked_add(d));
                self.s.timer_next_ns = next;
                if self.s.timer_policy == LostTickPolicy::Reinject && self.owe_ticks(missed) {
                    return;
                }
            }
            TimerMode::TscDeadline => {
                self.s.timer_next_ns = None;
                self.s.tsc_deadline = 0;
            }
            TimerMode::OneShot | TimerMode::Reserved => self.s.timer_next_ns = None,
        }
        self.local_deliver(LvtKind::Timer);
    }

    /// Reinject: `missed` expirations, and this one too if the last tick is
    /// still pending or in service, join the backlog (capped at
    /// [`BACKLOG_WINDOW_NS`] worth). Returns true if this expiry must not be delivered now.
    fn owe_ticks(&mut self, missed: u64) -> bool {
        let lvt = Lvt(self.s.lvt[LvtKind::Timer.index()]);
        if lvt.masked() {
            // A masked timer's ticks are nobody's: nothing is owed.
            self.s.timer_backlog = 0;
            return false;
        }
        let outstanding =
            VectorSet(self.s.irr).test(lvt.vector()) || VectorSet(self.s.isr).test(lvt.vector());
        let cap = (BACKLOG_WINDOW_NS / self.reload_interval()).max(1);
        let owed = u64::from(self.s.timer_backlog) + missed + u64::from(outstanding);
        self.s.timer_backlog = u32::try_from(owed.min(cap)).unwrap_or(u32::MAX);
        outstanding
    }

    /// The guest ended `vector`'s service: under reinject, the next owed
    /// periodic tick is delivered now, one per EOI.
    pub(super) fn timer_tick_acked(&mut self, vector: u8) {
        if self.s.timer_backlog == 0 || self.s.timer_policy != LostTickPolicy::Reinject {
            return;
        }
        let lvt = Lvt(self.s.lvt[LvtKind::Timer.index()]);
        if lvt.vector() != vector || self.timer_mode() != TimerMode::Periodic {
            return;
        }
        self.s.timer_backlog -= 1;
        self.local_deliver(LvtKind::Timer);
    }

    /// What the periodic timer does with missed expirations; a change drops
    /// the backlog.
    pub fn set_timer_policy(&mut self, policy: LostTickPolicy) {
        self.s.timer_policy = policy;
        self.s.timer_backlog = 0;
    }

    /// Periodic expirations owed under reinject.
    pub fn timer_backlog(&self) -> u32 {
        self.s.timer_backlog
    }

    pub(super) fn timer_mode(&self) -> TimerMode {
        Lvt(self.s.lvt[LvtKind::Timer.index()]).timer_mode()
    }

    fn divisor(&self) -> u64 {
        Tdcr(self.s.tdcr).divisor()
    }

    /// One full count in nanoseconds (at least 1 while TMICT is non-zero).
    fn period_ns(&self) -> u64 {
        u64::try_from(u128::from(self.s.tmict) * u128::from(self.divisor())).unwrap_or(u64::MAX)
    }

    /// The periodic reload interval, never below [`MIN_PERIODIC_NS`].
    fn reload_interval(&self) -> u64 {
        self.period_ns().max(MIN_PERIODIC_NS)
    }

    fn arm_from_tmict(&mut self, now_ns: u64) {
        self.s.timer_next_ns = if self.s.tmict == 0 || self.timer_mode() == TimerMode::TscDeadline {
            None
        } else {
            Some(now_ns.saturating_add(self.period_ns()))
        };
    }

    /// TMCCT: the count left, 0 when stopped or in TSC-deadline mode.
    pub(super) fn current_count(&self, now_ns: u64) -> u32 {
        if self.s.tmict == 0 || self.timer_mode() == TimerMode::TscDeadline {
            return 0;
        }
        let Some(due) = self.s.timer_next_ns else {
            return 0;
        };
        let remaining_ns = if due > now_ns {
            due - now_ns
        } else if self.timer_mode() == TimerMode::Periodic {
            // Expired but not yet advanced: already counting the next period.
            let interval = self.reload_interval();
            interval - (now_ns - due) % interval
        } else {
            return 0;
        };
        let count = remaining_ns / self.divisor();
        u32::try_from(count.min(u64::from(self.s.tmict))).unwrap_or(u32::MAX)
    }

    /// TMICT write: starts (or with 0 stops) the count. Ignored in
    /// TSC-deadline mode, as on hardware.
    pub(super) fn write_tmict(&mut self, value: u32, now_ns: u64) {
        if self.timer_mode() == TimerMode::TscDeadline {
            return;
        }
        self.s.tmict = value;
        // Reprogramming starts a new count: nothing is owed any more.
        self.s.timer_backlog = 0;
        self.arm_from_tmict(now_ns);
    }

    /// TDCR write: a running count keeps its current value and continues at
    /// the new rate.
    pub(super) fn write_tdcr(&mut self, value: u32, now_ns: u64) {
        let running = self.s.timer_next_ns.is_some() && self.timer_mode() != TimerMode::TscDeadline;
        let count = self.current_count(now_ns);
        self.s.tdcr = value & Tdcr::MASK;
        if running {
            let left = u64::from(count).saturating_mul(self.divisor());
            self.s.timer_next_ns = Some(now_ns.saturating_add(left));
        }
    }

    /// Switching to or from TSC-deadline mode cancels the timer (and clears
    /// TMICT); one-shot <-> periodic keeps the running count.
    pub(super) fn timer_mode_changed(&mut self, old: TimerMode, new: TimerMode) {
        if old != new {
            self.s.timer_backlog = 0;
        }
        if (old == TimerMode::TscDeadline) != (new == TimerMode::TscDeadline) {
            self.s.tmict = 0;
            self.s.timer_next_ns = None;
            self.s.tsc_deadline = 0;
        }
    }

    /// The guest TSC at `now_ns`: `tsc_offset + now_ns * tsc_hz / 1e9`.
    pub fn guest_tsc(&self, now_ns: u64) -> u64 {
        let cfg = &self.s.config;
        let ticks = u128::from(now_ns) * u128::from(cfg.tsc_hz) / NS_PER_SEC;
        (u128::from(cfg.tsc_offset) + ticks) as u64
    }

    /// The first `now_ns` at which the guest TSC reaches `deadline`; None if
    /// it never does within the clock's range.
    fn tsc_to_ns(&self, deadline: u64) -> Option<u64> {
        let cfg = &self.s.config;
        let Some(ticks) = deadline.checked_sub(cfg.tsc_offset).filter(|t| *t > 0) else {
            return Some(0);
        };
        if cfg.tsc_hz == 0 {
            return None;
        }
        let ns = (u128::from(ticks) * NS_PER_SEC).div_ceil(u128::from(cfg.tsc_hz));
        u64::try_from(ns).ok()
    }

    /// IA32_TSC_DEADLINE read: the armed deadline, 0 when disarmed or fired.
    pub(super) fn read_tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.s.tsc_deadline
        } else {
            0
        }
    }

    /// IA32_TSC_DEADLINE write: ignored outside TSC-deadline mode; 0 disarms;
    /// a deadline already passed fires at once.
    pub(super) fn write_tsc_deadline(&mut self, value: u64, now_ns: u64) {
        if self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        self.s.tsc_deadline = value;
        self.s.timer_next_ns = if value == 0 {
            None
        } else {
            self.tsc_to_ns(value)
        };
        self.advance(now_ns);
    }
}
