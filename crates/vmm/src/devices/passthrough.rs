//! virq's pass-through line: what a VMM does for a physical level-triggered
//! device assigned to a guest, with an emulated device standing in for the
//! hardware.
//!
//! When the host line fires, the VMM masks it at the host side and asserts
//! the guest's line through a [`LevelSource`]; it unmasks the host line only
//! when the guest acknowledges the virtual interrupt (the resample eventfd).
//! If the device still asserts its line then, the host line fires again at
//! once. So the guest sees one interrupt per service, never one for an
//! already-serviced device, and loses no event.
//!
//! The emulated device counts events; its line is asserted while any is
//! pending. One generator thread, started with the device, produces the
//! events each start asks for (no thread is created per start, so one
//! event on request costs what a device's interrupt costs). The device is
//! idle again as soon as the last event is pending, so a guest that takes
//! one event per start can start the next from its handler's return.
//!
//! | port   | access  | meaning                                                     |
//! |--------|---------|-------------------------------------------------------------|
//! | 0x2520 | dword r | 0x656E_696C (the bytes "line"): device present              |
//! | 0x2520 | dword w | produce this many events (1 to 100000); ignored while busy  |
//! | 0x2524 | dword w | microseconds between events (0 to 1000), before a start     |
//! | 0x2528 | dword r | events pending since the last read; the read services them  |
//! | 0x252C | dword r | events produced since the last start                        |
//!
//! The guest's line is GSI [`GSI`] (IOAPIC pin 19, level, active high).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use virq_kvm::sources::{InterruptSources, LevelSource, SourceError};

use super::{le_value, put_le, PioAction, PioDevice};

/// First port.
pub const BASE: u16 = 0x2520;
/// Ports decoded.
pub const PORT_COUNT: u16 = 0x10;
/// The guest's line.
pub const GSI: u32 = 19;
/// What a dword read of the first port returns ("line" in memory order).
pub const SIGNATURE: u32 = 0x656E_696C;
/// Most events one start may ask for.
pub const MAX_EVENTS: u32 = 100_000;
/// Longest gap between events, in microseconds.
pub const MAX_INTERVAL_US: u32 = 1_000;

/// The emulated device and the host side of its interrupt line.
#[derive(Default)]
struct Line {
    /// Events the guest has not serviced; the device's line is high while > 0.
    pending: u32,
    /// Events produced since the last start.
    produced: u32,
    /// The host line is masked: its interrupt was forwarded and the guest
    /// has not acknowledged it yet.
    host_masked: bool,
    /// A start is under way.
    busy: bool,
    /// A start the generator has not taken yet: events and their gap.
    request: Option<(u32, Duration)>,
}

impl Line {
    /// Takes a start of `events` events `gap` apart; false if refused (a
    /// bad count, or a start under way).
    fn start(&mut self, events: u32, gap: Duration) -> bool {
        if events == 0 || events > MAX_EVENTS || self.busy {
            return false;
        }
        self.busy = true;
        self.produced = 0;
        self.request = Some((events, gap));
        true
    }

    /// The device produces one event; the last one of a start ends it.
    fn produce(&mut self, last: bool) {
        self.pending = self.pending.saturating_add(1);
        self.produced = self.produced.saturating_add(1);
        if last {
            self.busy = false;
        }
    }
}

struct Shared {
    line: Mutex<Line>,
    /// Signalled on a start and on stop.
    wake: Condvar,
    source: LevelSource,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The host interrupt handler: runs whenever the host line may fire.
    fn host_irq(&self, line: &mut Line) {
        if line.pending > 0 && !line.host_masked {
            line.host_masked = true;
            if let Err(e) = self.source.assert() {
                tracing::warn!("pass-through line: assert: {e}");
            }
        }
    }
}

/// The pass-through line device.
pub struct PassthroughLine {
    shared: Arc<Shared>,
    interval_us: u32,
    threads: Vec<JoinHandle<()>>,
}

impl PassthroughLine {
    /// The device, with its level source on [`GSI`] from `sources`.
    pub fn new(sources: &InterruptSources) -> Result<Self, SourceError> {
        let shared = Arc::new(Shared {
            line: Mutex::new(Line::default()),
            wake: Condvar::new(),
            source: sources.level(GSI)?,
            stop: AtomicBool::new(false),
        });
        let mut device = PassthroughLine {
            shared,
            interval_us: 0,
            threads: Vec::new(),
        };
        // On an error the device is dropped, which stops what did start.
        device.spawn("virq-line-eoi", resampler)?;
        device.spawn("virq-line-dev", generator)?;
        Ok(device)
    }

    fn spawn(&mut self, name: &str, body: fn(&Shared)) -> Result<(), SourceError> {
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(&shared))
            .map_err(|e| SourceError::Host("cannot start a pass-through line thread", e))?;
        self.threads.push(thread);
        Ok(())
    }

    fn start(&mut self, events: u32) {
        let gap = Duration::from_micros(u64::from(self.interval_us));
        if lock(&self.shared.line).start(events, gap) {
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for PassthroughLine {
    fn drop(&mut self) {
        {
            // Under the lock, so the generator cannot miss the wake-up.
            let _line = lock(&self.shared.line);
            self.shared.stop.store(true, Ordering::Release);
        }
        self.shared.wake.notify_all();
        let _ = self.shared.source.resample_fd().write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl PioDevice for PassthroughLine {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        let value = match port.wrapping_sub(BASE) {
            0x0 => SIGNATURE,
            0x8 => std::mem::take(&mut lock(&self.shared.line).pending),
            0xC => lock(&self.shared.line).produced,
            _ => 0,
        };
        put_le(data, value);
    }

    fn write(&mut self, port: u16, data: &[u8]) -> PioAction {
        let value = le_value(data) as u32;
        match port.wrapping_sub(BASE) {
            0x0 => self.start(value),
            0x4 => self.interval_us = value.min(MAX_INTERVAL_US),
            _ => {}
        }
        PioAction::None
    }
}

/// The emulated hardware: waits for a start, then produces its events.
fn generator(shared: &Shared) {
    loop {
        let (events, gap) = {
            let mut line = lock(&shared.line);
            loop {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                if let Some(request) = line.request.take() {
                    break request;
                }
                line = shared.wake.wait(line).unwrap_or_else(|e| e.into_inner());
            }
        };
        generate(shared, events, gap);
    }
}

/// One start: `events` events, `gap` apart.
fn generate(shared: &Shared, events: u32, gap: Duration) {
    for i in 1..=events {
        let mut line = lock(&shared.line);
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        line.produce(i == events);
        shared.host_irq(&mut line);
        drop(line);
        if !gap.is_zero() && i < events {
            // The device's own pace, not a synchronisation.
            std::thread::sleep(gap);
        }
    }
}

/// Unmasks the host line on each guest acknowledgement.
fn resampler(shared: &Shared) {
    loop {
        if shared.source.wait_resample().is_err() || shared.stop.load(Ordering::Acquire) {
            return;
        }
        let mut line = lock(&shared.line);
        line.host_masked = false;
        shared.host_irq(&mut line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_is_bounded_and_refused_while_one_is_under_way() {
        let mut line = Line::default();
        assert!(!line.start(0, Duration::ZERO));
        assert!(!line.start(MAX_EVENTS + 1, Duration::ZERO));
        assert!(line.start(2, Duration::ZERO));
        assert!(!line.start(1, Duration::ZERO), "busy");
        assert_eq!(line.request.take(), Some((2, Duration::ZERO)));
    }

    #[test]
    fn the_last_event_ends_the_start_at_once() {
        let mut line = Line::default();
        assert!(line.start(2, Duration::ZERO));
        line.request = None;
        line.produce(false);
        assert!(line.busy);
        line.produce(true);
        // Idle while its event is still pending: the guest may start again
        // as soon as it has seen the interrupt.
        assert!(!line.busy);
        assert_eq!((line.pending, line.produced), (2, 2));
        assert!(line.start(1, Duration::ZERO));
        assert_eq!(line.produced, 0);
    }
}
