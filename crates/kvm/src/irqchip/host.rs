//! What the split and userspace modes share: our [`Chipset`] behind one
//! lock, the virtual clock, the host timer thread, per-vCPU parking (HLT and
//! wait-for-SIPI) and the dispatch of the chipset's events.
//!
//! Locking: the chipset lock is never held while another lock is taken or a
//! vCPU is kicked. Every operation drains the chipset's events under the
//! lock and acts on them after releasing it.

use crate::kick::VcpuKick;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use virq::chipset::{ChipEvent, Chipset};
use virq::delivery::InterruptMessage;
use virq::lapic::StartupEvent;
use virq::msi::MsiMessage;
use virq::routing::SourceId;
use vmm_sys_util::eventfd::EventFd;

/// Where APIC bus messages go when the LAPICs are KVM's (split mode).
pub type ExternalSink = Box<dyn Fn(&InterruptMessage) + Send + Sync>;

/// The shortest the timer thread ever sleeps when a timer keeps asking to
/// be served in the past: a guard against spinning a host core.
const MIN_TIMER_SLEEP: Duration = Duration::from_micros(50);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One vCPU's parking place.
#[derive(Default)]
struct Parking {
    state: Mutex<ParkState>,
    cv: Condvar,
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
    start: Instant,
    kicks: Mutex<Vec<Option<Arc<VcpuKick>>>>,
    parking: Vec<Parking>,
    timer: Mutex<TimerState>,
    timer_cv: Condvar,
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
                start: Instant::now(),
                kicks: Mutex::new(vec![None; vcpus]),
                parking: (0..vcpus).map(|_| Parking::default()).collect(),
                timer: Mutex::new(TimerState::default()),
                timer_cv: Condvar::new(),
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
        if self.inner.chip.set(Mutex::new(chip)).is_err() {
            return;
        }
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
    /// rejects is dropped, as the bus would.
    pub fn send_msi(&self, address: u64, data: u32) {
        let msi = MsiMessage { address, data };
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

    /// Registers vCPU `index`'s kick handle.
    pub fn set_kick(&self, index: usize, kick: Arc<VcpuKick>) {
        if let Some(slot) = lock(&self.inner.kicks).get_mut(index) {
            *slot = Some(kick);
        }
    }

    /// Runs `f` on the chipset (None before it is installed), then acts on
    /// the events it produced. `current` is the calling vCPU, which needs no
    /// kick; `timers` says whether a deadline may have moved.
    pub fn with_chip<R>(
        &self,
        current: Option<usize>,
        timers: bool,
        f: impl FnOnce(&mut Chipset, u64) -> R,
    ) -> Option<R> {
        let chip = self.inner.chip.get()?;
        let (result, events) = {
            let mut c = lock(chip);
            let now = self.inner.now();
            let result = f(&mut c, now);
            (result, c.drain_events().collect::<Vec<_>>())
        };
        self.inner.dispatch(events, current);
        if timers {
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
            if let Some(chip) = self.inner.chip.get() {
                if ready(&lock(chip)) {
                    return;
                }
            }
            st.parked = true;
            st = parking.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            st.parked = false;
        }
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
        let parked = {
            let mut st = lock(&parking.state);
            st.woken = true;
            st.parked
        };
        if parked {
            parking.cv.notify_one();
        }
        if !parked && current != Some(vcpu) {
            let kick = lock(&self.kicks).get(vcpu).cloned().flatten();
            if let Some(kick) = kick {
                kick.kick();
            }
        }
    }
}

/// Serves every timer of the chipset at its deadline, on the host clock.
fn timer_loop(inner: Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let Some(chip) = inner.chip.get() else {
            return;
        };
        let seen = {
            let t = lock(&inner.timer);
            if t.stop {
                return;
            }
            t.generation
        };
        let (deadline, events) = {
            let mut c = lock(chip);
            let now = inner.now();
            if c.next_deadline().is_some_and(|d| d <= now) {
                c.advance(now);
            }
            (c.next_deadline(), c.drain_events().collect::<Vec<_>>())
        };
        inner.dispatch(events, None);
        let mut t = lock(&inner.timer);
        while !t.stop && t.generation == seen {
            let now = inner.now();
            let wait = match deadline {
                None => Duration::from_millis(100),
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
