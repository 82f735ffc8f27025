//! What the split and userspace modes share: our [`Chipset`] behind one
//! lock, the virtual clock, the host timer thread, per-vCPU parking (HLT and
//! wait-for-SIPI) and the dispatch of the chipset's events.
//!
//! Locking: the chipset lock is never held while another lock is taken or a
//! vCPU is kicked. Every operation drains the chipset's events under the
//! lock and acts on them after releasing it.
//!
//! A device's MSI to one vCPU takes no chipset lock at all: it is posted
//! into that vCPU's request bitmap ([`virq::posted`]) and whoever takes the
//! lock next accepts it into the LAPIC (every lock here goes through
//! [`Inner::chip`], which does). In split mode the MSI goes straight to
//! KVM's LAPICs. The target is woken if halted and kicked only if it runs
//! guest code ([`VcpuKick::notify`]).

use crate::kick::VcpuKick;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use virq::chipset::{ChipEvent, Chipset};
use virq::delivery::InterruptMessage;
use virq::lapic::StartupEvent;
use virq::msi::MsiMessage;
use virq::posted::{Posted, PostedInterrupts};
use virq::routing::SourceId;
use vmm_sys_util::eventfd::EventFd;

/// Where APIC bus messages go when the LAPICs are KVM's (split mode).
pub type ExternalSink = Box<dyn Fn(&InterruptMessage) + Send + Sync>;

/// The shortest the timer thread ever sleeps when a timer keeps asking to
/// be served in the past: a guard against spinning a host core.
const MIN_TIMER_SLEEP: Duration = Duration::from_micros(50);

/// How long the timer thread sleeps with no timer armed.
const IDLE_TIMER_SLEEP: Duration = Duration::from_millis(100);

/// Where an adaptive halt-poll window starts growing from.
const HALT_POLL_START_NS: u64 = 10_000;

/// The default longest halt poll (KVM's `halt_poll_ns` is 200 us too).
pub const DEFAULT_HALT_POLL: Duration = Duration::from_micros(200);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One vCPU's parking place.
#[derive(Default)]
struct Parking {
    state: Mutex<ParkState>,
    cv: Condvar,
    /// Set by every notify, read without the lock by a polling vCPU.
    hint: AtomicBool,
    /// This vCPU's current halt-poll window in ns (adaptive, 0 = park at once).
    poll_ns: AtomicU64,
}

#[derive(Default)]
struct ParkState {
    /// The vCPU waits on the condvar (a notify reaches it; no kick needed).
    parked: bool,
    /// Something happened since the vCPU last looked.
    woken: bool,
    /// INIT/SIPI not yet performed by the vCPU's thread.
    startups: VecDeque<StartupEvent>,
}

#[derive(Default)]
struct TimerState {
    /// Bumped whenever a deadline may have changed.
    generation: u64,
    stop: bool,
}

struct Inner {
    chip: OnceLock<Mutex<Chipset>>,
    /// The chipset's lock-free MSI door, once it is installed.
    posted: OnceLock<Arc<PostedInterrupts>>,
    start: Instant,
    /// Set once per vCPU at setup; read without a lock on every delivery.
    kicks: Vec<OnceLock<Arc<VcpuKick>>>,
    parking: Vec<Parking>,
    timer: Mutex<TimerState>,
    timer_cv: Condvar,
    /// When the timer thread looks at the chipset next, on the virtual
    /// clock; written and read under the chipset lock. Only a deadline
    /// earlier than this needs the thread woken: most exits change none.
    timer_plan: AtomicU64,
    external: Option<ExternalSink>,
    /// Resample eventfds of level sources, by GSI: written on each ack.
    resamplers: Mutex<Vec<(u32, SourceId, Arc<EventFd>)>>,
}

/// The chipset, its clock, timers and vCPU wake-ups for one VM.
pub struct ChipHost {
    inner: Arc<Inner>,
    timer_thread: Mutex<Option<JoinHandle<()>>>,
}

impl ChipHost {
    /// A host for `vcpus` vCPUs; `external` receives APIC bus messages when
    /// the LAPICs are not ours.
    pub fn new(vcpus: usize, external: Option<ExternalSink>) -> Self {
        ChipHost {
            inner: Arc::new(Inner {
                chip: OnceLock::new(),
                posted: OnceLock::new(),
                start: Instant::now(),
                kicks: (0..vcpus).map(|_| OnceLock::new()).collect(),
                parking: (0..vcpus).map(|_| Parking::default()).collect(),
                timer: Mutex::new(TimerState::default()),
                timer_cv: Condvar::new(),
                timer_plan: AtomicU64::new(0),
                external,
                resamplers: Mutex::new(Vec::new()),
            }),
            timer_thread: Mutex::new(None),
        }
    }

    /// Nanoseconds on the VM's virtual clock (host monotonic time since the
    /// host was created).
    pub fn now(&self) -> u64 {
        self.inner.now()
    }

    /// Installs the chipset and starts the timer thread (once).
    pub fn install(&self, chip: Chipset) {
        let posted = chip.posted();
        if self.inner.chip.set(Mutex::new(chip)).is_err() {
            return;
        }
        let _ = self.inner.posted.set(posted);
        let weak = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("virq-timers".into())
            .spawn(move || timer_loop(weak));
        match spawned {
            Ok(t) => *lock(&self.timer_thread) = Some(t),
            Err(e) => tracing::error!("cannot start the timer thread: {e}"),
        }
    }

    /// Sets `gsi`'s level as seen from `source`, from any thread.
    pub fn set_gsi(&self, gsi: u32, source: SourceId, level: bool) {
        self.with_chip(None, true, |c, now| c.set_gsi(gsi, source, level, now));
    }

    /// Delivers a device's MSI write, from any thread; one the decoder
    /// rejects is dropped, as the bus would. The common case (a fixed edge
    /// MSI to one vCPU, or any MSI in split mode) takes no chipset lock.
    pub fn send_msi(&self, address: u64, data: u32) {
        let msi = MsiMessage { address, data };
        match self.inner.posted.get().and_then(|door| door.post_msi(msi)) {
            Some(Posted::Vcpu(cpu)) => return self.inner.notify(cpu, None),
            Some(Posted::External(msg)) => {
                if let Some(sink) = &self.inner.external {
                    sink(&msg);
                }
                return;
            }
            None => {}
        }
        if let Some(Err(e)) = self.with_chip(None, false, |c, now| c.send_msi(msi, now)) {
            tracing::debug!("MSI dropped: {e}");
        }
    }

    /// Makes `source` on `gsi` a resampled level source whose acks are
    /// reported on `resample`.
    pub fn watch_resample(&self, gsi: u32, source: SourceId, resample: Arc<EventFd>) {
        lock(&self.inner.resamplers).push((gsi, source, resample));
        self.with_chip(None, false, |c, _| c.set_resample(gsi, source, true));
    }

    /// Undoes [`ChipHost::watch_resample`] and lowers the source, so a
    /// device that goes away does not hold its line.
    pub fn unwatch_resample(&self, gsi: u32, source: SourceId) {
        lock(&self.inner.resamplers).retain(|(g, s, _)| (*g, *s) != (gsi, source));
        self.with_chip(None, true, |c, now| {
            c.set_resample(gsi, source, false);
            c.set_gsi(gsi, source, false, now);
        });
    }

    /// Registers vCPU `index`'s kick handle (once; later calls are ignored).
    pub fn set_kick(&self, index: usize, kick: Arc<VcpuKick>) {
        if let Some(slot) = self.inner.kicks.get(index) {
            let _ = slot.set(kick);
        }
    }

    /// Runs `f` on the chipset (None before it is installed), then acts on
    /// the events it produced. `current` is the calling vCPU, which needs no
    /// kick; `timers` says whether a deadline may have moved (the timer
    /// thread is woken only if one now comes before it planned to look).
    pub fn with_chip<R>(
        &self,
        current: Option<usize>,
        timers: bool,
        f: impl FnOnce(&mut Chipset, u64) -> R,
    ) -> Option<R> {
        let (result, events, sooner) = {
            let mut c = self.inner.chip()?;
            let now = self.inner.now();
            let result = f(&mut c, now);
            let plan = self.inner.timer_plan.load(Ordering::Relaxed);
            let sooner = timers && c.next_deadline().is_some_and(|d| d < plan);
            (result, c.drain_events().collect::<Vec<_>>(), sooner)
        };
        self.inner.dispatch(events, current);
        if sooner {
            self.inner.poke_timer();
        }
        Some(result)
    }

    /// Blocks vCPU `index` until `ready(chipset)` holds, a startup event is
    /// queued for it, or `stop()` is true. Wake-ups come from [`ChipHost::wake`]
    /// and from the chipset's kick events.
    pub fn park_until(
        &self,
        index: usize,
        stop: impl Fn() -> bool,
        ready: impl Fn(&Chipset) -> bool,
    ) {
        let Some(parking) = self.inner.parking.get(index) else {
            return;
        };
        let mut st = lock(&parking.state);
        loop {
            st.woken = false;
            if stop() || !st.startups.is_empty() {
                return;
            }
            if let Some(chip) = self.inner.chip() {
                if ready(&chip) {
                    return;
                }
            }
            st.parked = true;
            st = parking.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            st.parked = false;
        }
    }

    /// A halted vCPU `index` waits until `ready(chipset)` holds (or a startup
    /// event or `stop()`), as [`ChipHost::park_until`], but first polls for
    /// up to its adaptive halt-poll window: a wake-up that comes within it
    /// costs no condvar sleep and wake. The window grows (to `max_poll`)
    /// while wake-ups come soon after the vCPU gave up polling, and shrinks
    /// to nothing while they do not, so an idle guest burns no host CPU.
    pub fn halt_until(
        &self,
        index: usize,
        max_poll: Duration,
        stop: impl Fn() -> bool,
        ready: impl Fn(&Chipset) -> bool,
    ) {
        let Some(parking) = self.inner.parking.get(index) else {
            return;
        };
        let max_ns = u64::try_from(max_poll.as_nanos()).unwrap_or(u64::MAX);
        let window = parking.poll_ns.load(Ordering::Relaxed).min(max_ns);
        let start = Instant::now();
        if window > 0 && self.poll(parking, window, &stop, &ready) {
            return;
        }
        self.park_until(index, &stop, &ready);
        let blocked = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        parking
            .poll_ns
            .store(next_poll_window(window, blocked, max_ns), Ordering::Relaxed);
    }

    /// Spins up to `window_ns` for a notify that makes `ready` hold.
    fn poll(
        &self,
        parking: &Parking,
        window_ns: u64,
        stop: &impl Fn() -> bool,
        ready: &impl Fn(&Chipset) -> bool,
    ) -> bool {
        if self.inner.chip.get().is_none() {
            return false;
        }
        let start = Instant::now();
        // Something may already be there.
        parking.hint.store(true, Ordering::Relaxed);
        while u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX) < window_ns {
            if stop() {
                return true;
            }
            // Startups and chipset events both notify, so the locks are only
            // taken once a hint says something changed.
            if parking.hint.swap(false, Ordering::Acquire)
                && (!lock(&parking.state).startups.is_empty()
                    || self.inner.chip().is_some_and(|chip| ready(&chip)))
            {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// The next INIT/SIPI queued for vCPU `index`.
    pub fn take_startup(&self, index: usize) -> Option<StartupEvent> {
        let parking = self.inner.parking.get(index)?;
        lock(&parking.state).startups.pop_front()
    }

    /// Wakes vCPU `index` if it is parked.
    pub fn wake(&self, index: usize) {
        self.inner.notify(index, None);
    }

    /// Stops the timer thread and waits for it.
    pub fn shutdown(&self) {
        lock(&self.inner.timer).stop = true;
        self.inner.timer_cv.notify_all();
        if let Some(t) = lock(&self.timer_thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for ChipHost {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    /// The chipset, locked, with every posted MSI accepted: what any holder
    /// of the lock looks at must include them.
    fn chip(&self) -> Option<MutexGuard<'_, Chipset>> {
        let mut chip = lock(self.chip.get()?);
        chip.accept_posted(self.now());
        Some(chip)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn poke_timer(&self) {
        lock(&self.timer).generation += 1;
        self.timer_cv.notify_one();
    }

    fn dispatch(&self, events: Vec<ChipEvent>, current: Option<usize>) {
        for event in events {
            match event {
                ChipEvent::Kick(vcpu) => self.notify(vcpu, current),
                ChipEvent::ExternalMessage(msg) => {
                    if let Some(sink) = &self.external {
                        sink(&msg);
                    }
                }
                ChipEvent::Startup { vcpu, event } => {
                    if let Some(parking) = self.parking.get(vcpu) {
                        lock(&parking.state).startups.push_back(event);
                    }
                    self.notify(vcpu, current);
                }
                // The chipset already lowered the resampled sources.
                ChipEvent::GsiAcked(gsi) => self.resampled(gsi),
            }
        }
    }

    /// Tells the level sources on `gsi` that the guest acknowledged it.
    fn resampled(&self, gsi: u32) {
        for (g, _, fd) in lock(&self.resamplers).iter() {
            if *g == gsi {
                if let Err(e) = fd.write(1) {
                    tracing::warn!("resample eventfd of GSI {gsi}: {e}");
                }
            }
        }
    }

    /// Makes vCPU `vcpu` look at its pending work: notify it if parked,
    /// otherwise kick it out of the guest (unless it is the caller, which
    /// looks before its next entry anyway).
    fn notify(&self, vcpu: usize, current: Option<usize>) {
        let Some(parking) = self.parking.get(vcpu) else {
            return;
        };
        parking.hint.store(true, Ordering::Release);
        let parked = {
            let mut st = lock(&parking.state);
            st.woken = true;
            st.parked
        };
        if parked {
            parking.cv.notify_one();
        }
        if !parked && current != Some(vcpu) {
            if let Some(kick) = self.kicks.get(vcpu).and_then(OnceLock::get) {
                kick.notify();
            }
        }
    }
}

/// The halt-poll window after a halt that polled `window` ns in vain and
/// then slept until `blocked` ns had passed: a wake-up within the bound
/// means polling a little longer would have caught it (double the window,
/// from 10 us); a longer sleep means polling was wasted (halve it, and stop
/// below 10 us).
fn next_poll_window(window: u64, blocked: u64, max: u64) -> u64 {
    if max == 0 {
        0
    } else if blocked <= max {
        window
            .saturating_mul(2)
            .clamp(HALT_POLL_START_NS.min(max), max)
    } else if window / 2 < HALT_POLL_START_NS {
        0
    } else {
        window / 2
    }
}

/// Serves every timer of the chipset at its deadline, on the host clock.
fn timer_loop(inner: Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.chip.get().is_none() {
            return;
        }
        let seen = {
            let t = lock(&inner.timer);
            if t.stop {
                return;
            }
            t.generation
        };
        let (deadline, events) = {
            let Some(mut c) = inner.chip() else {
                return;
            };
            let now = inner.now();
            if c.next_deadline().is_some_and(|d| d <= now) {
                c.advance(now);
            }
            let deadline = c.next_deadline();
            let idle = now.saturating_add(IDLE_TIMER_SLEEP.as_nanos() as u64);
            inner
                .timer_plan
                .store(deadline.unwrap_or(idle), Ordering::Relaxed);
            (deadline, c.drain_events().collect::<Vec<_>>())
        };
        inner.dispatch(events, None);
        let mut t = lock(&inner.timer);
        while !t.stop && t.generation == seen {
            let now = inner.now();
            let wait = match deadline {
                None => IDLE_TIMER_SLEEP,
                Some(d) if d <= now => MIN_TIMER_SLEEP,
                Some(d) => Duration::from_nanos(d - now),
            };
            let (guard, timeout) = inner
                .timer_cv
                .wait_timeout(t, wait)
                .unwrap_or_else(|e| e.into_inner());
            t = guard;
            if timeout.timed_out() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use virq::chipset::{ChipsetConfig, LapicPlacement};
    use virq::ioapic::IoapicVersion;
    use virq::pit::LostTickPolicy;

    /// Far longer than an unlocked send takes.
    const AMPLE: Duration = Duration::from_secs(10);

    fn host(lapics: LapicPlacement, external: Option<ExternalSink>) -> Arc<ChipHost> {
        let host = ChipHost::new(2, external);
        let chip = Chipset::new(ChipsetConfig {
            vcpus: 2,
            lapics,
            ioapic_version: IoapicVersion::V20,
            pit_policy: LostTickPolicy::Discard,
            tsc_hz: 1_000_000_000,
            tsc_offset: 0,
        })
        .expect("chipset");
        host.install(chip);
        Arc::new(host)
    }

    /// Sends an MSI from another thread while this one holds the chipset
    /// lock for up to `hold`; true if it got through before the lock was
    /// released.
    fn msi_passes_held_lock(host: &Arc<ChipHost>, address: u64, data: u32, hold: Duration) -> bool {
        host.with_chip(None, false, |_, _| {
            let (done_tx, done) = mpsc::channel();
            let sender = host.clone();
            let t = std::thread::spawn(move || {
                sender.send_msi(address, data);
                let _ = done_tx.send(());
            });
            // A locked path waits for us however long we hold the lock;
            // release it either way so the thread can finish.
            let passed = done.recv_timeout(hold).is_ok();
            (passed, t)
        })
        .map(|(passed, t)| {
            let _ = t.join();
            passed
        })
        .unwrap_or(false)
    }

    #[test]
    fn only_an_earlier_deadline_wakes_the_timer_thread() {
        let host = host(LapicPlacement::Model, None);
        let pokes = || lock(&host.inner.timer).generation;
        let write = |addr: u64, value: u32| {
            host.with_chip(Some(0), true, |c, now| {
                c.mmio_write(0, addr, &value.to_le_bytes(), now)
            });
        };
        // The thread has looked once and planned its idle sleep.
        while host.inner.timer_plan.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        // SVR enable and a TPR write: exits that arm nothing.
        let before = pokes();
        write(0xFEE0_00F0, 0x1FF);
        for _ in 0..100 {
            write(0xFEE0_0080, 0);
        }
        assert_eq!(pokes(), before, "no deadline moved");
        // A short one-shot LAPIC timer: sooner than the idle thread looks.
        write(0xFEE0_03E0, 0xB); // divide by 1
        write(0xFEE0_0320, 0x40);
        write(0xFEE0_0380, 1000);
        assert_eq!(pokes(), before + 1, "the new deadline woke the thread");
        host.shutdown();
    }

    #[test]
    fn a_device_msi_needs_no_chipset_lock() {
        let host = host(LapicPlacement::Model, None);
        host.with_chip(None, false, |c, now| {
            c.mmio_write(1, 0xFEE0_00F0, &0x1FFu32.to_le_bytes(), now);
        });
        assert!(msi_passes_held_lock(&host, 0xFEE0_1000, 0x41, AMPLE));
        let pending = host.with_chip(None, false, |c, _| c.pending(1).vector);
        assert_eq!(pending, Some(Some(0x41)), "accepted at the next lock");
        // A broadcast needs the full resolution, under the lock (the check
        // can tell a locked path apart).
        let brief = Duration::from_millis(100);
        assert!(!msi_passes_held_lock(&host, 0xFEE0_F000, 0x42, brief));
        host.shutdown();
    }

    #[test]
    fn split_mode_msis_go_to_the_hypervisor_without_the_lock() {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let sink: ExternalSink = Box::new(move |msg: &InterruptMessage| {
            let _ = lock(&tx).send(msg.vector);
        });
        let host = host(LapicPlacement::External, Some(sink));
        assert!(msi_passes_held_lock(&host, 0xFEE0_F000, 0x43, AMPLE));
        assert_eq!(rx.try_recv(), Ok(0x43));
        host.shutdown();
    }

    #[test]
    fn halt_poll_window_grows_on_quick_wakeups_and_dies_on_idle_ones() {
        let max = 200_000;
        let mut w = 0;
        for expected in [10_000, 20_000, 40_000, 80_000, 160_000, 200_000, 200_000] {
            w = next_poll_window(w, 50_000, max);
            assert_eq!(w, expected);
        }
        // An idle guest: each halt sleeps for milliseconds.
        for expected in [100_000, 50_000, 25_000, 12_500, 0, 0] {
            w = next_poll_window(w, 5_000_000, max);
            assert_eq!(w, expected);
        }
        assert_eq!(next_poll_window(80_000, 1_000, 0), 0, "polling off");
    }
}
