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
//! pending. A generator thread produces the events the guest asked for.
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
use std::sync::{Arc, Mutex, MutexGuard};
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
    /// A generator is running.
    busy: bool,
}

struct Shared {
    line: Mutex<Line>,
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
    resampler: Option<JoinHandle<()>>,
    generator: Option<JoinHandle<()>>,
}

impl PassthroughLine {
    /// The device, with its level source on [`GSI`] from `sources`.
    pub fn new(sources: &InterruptSources) -> Result<Self, SourceError> {
        let shared = Arc::new(Shared {
            line: Mutex::new(Line::default()),
            source: sources.level(GSI)?,
            stop: AtomicBool::new(false),
        });
        let resampler = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("virq-line-eoi".into())
                .spawn(move || resampler(&shared))
                .map_err(|e| SourceError::Host("cannot start the resample thread", e))?
        };
        Ok(PassthroughLine {
            shared,
            interval_us: 0,
            resampler: Some(resampler),
            generator: None,
        })
    }

    fn start(&mut self, events: u32) {
        if events == 0 || events > MAX_EVENTS {
            return;
        }
        {
            let mut line = lock(&self.shared.line);
            if line.busy {
                return;
            }
            line.busy = true;
            line.produced = 0;
        }
        if let Some(old) = self.generator.take() {
            let _ = old.join();
        }
        let shared = self.shared.clone();
        let gap = Duration::from_micros(u64::from(self.interval_us));
        let spawned = std::thread::Builder::new()
            .name("virq-line-dev".into())
            .spawn(move || generate(&shared, events, gap));
        match spawned {
            Ok(t) => self.generator = Some(t),
            Err(e) => {
                tracing::warn!("pass-through line: cannot start the generator: {e}");
                lock(&self.shared.line).busy = false;
            }
        }
    }
}

impl Drop for PassthroughLine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.source.resample_fd().write(1);
        for t in [self.generator.take(), self.resampler.take()]
            .into_iter()
            .flatten()
        {
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

/// The emulated hardware: `events` events, `gap` apart.
fn generate(shared: &Shared, events: u32, gap: Duration) {
    for _ in 0..events {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        {
            let mut line = lock(&shared.line);
            line.pending = line.pending.saturating_add(1);
            line.produced += 1;
            shared.host_irq(&mut line);
        }
        if !gap.is_zero() {
            // The device's own pace, not a synchronisation.
            std::thread::sleep(gap);
        }
    }
    lock(&shared.line).busy = false;
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
