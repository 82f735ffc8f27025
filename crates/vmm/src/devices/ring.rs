//! virq's ring device: the interrupt path of a virtio-style device, end to
//! end. The guest puts requests in a ring in its memory and rings a
//! doorbell; a device thread wakes (the doorbell is a `KVM_IOEVENTFD`, so
//! the ring costs the vCPU no userspace exit), answers every request in a
//! completion ring and raises one MSI through an [`MsiSource`] per batch.
//!
//! | port   | access    | meaning                                                  |
//! |--------|-----------|----------------------------------------------------------|
//! | 0x2500 | dword r   | 0x676E_6972 (the bytes "ring"): device present           |
//! | 0x2500 | dword w   | ring base, guest-physical, 64-byte aligned               |
//! | 0x2504 | dword w   | ring entries, a power of two from 1 to 1024              |
//! | 0x2508 | dword w   | MSI address (low 32 bits; high is 0)                     |
//! | 0x250C | dword w   | MSI data; this write arms the device with the registers  |
//! | 0x2510 | any w     | doorbell: process new requests (never exits to the VMM)  |
//! | 0x2514 | dword r   | requests completed since the last arm                    |
//! | 0x2518 | dword r   | 0 when armed, else why the last arm was refused          |
//!
//! Ring layout at the base: `req_prod` (u32, written by the guest) at +0,
//! `done_prod` (u32, written by the device) at +4, requests (u32 each) at
//! +64, completions (u32 each) after them. Indexes run freely; entry `i` is
//! at `i % entries`. The completion of request value `v` is `!v`. The guest
//! must not have more than `entries` requests outstanding.
//!
//! Bad input is refused, not trusted: a ring outside RAM or a bad size
//! leaves the device unarmed (status names why), a producer index more than
//! `entries` ahead is clamped, and each doorbell does at most `entries`
//! requests' work, so a guest cannot keep the device thread busy for more
//! than it rings.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use virq_kvm::sources::{Doorbell, DoorbellAddress, InterruptSources, MsiSource, SourceError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{le_value, put_le, PioAction, PioDevice};

/// First port.
pub const BASE: u16 = 0x2500;
/// Ports decoded.
pub const PORT_COUNT: u16 = 0x20;
/// The doorbell port.
pub const DOORBELL: u16 = BASE + 0x10;
/// What a dword read of the first port returns ("ring" in memory order).
pub const SIGNATURE: u32 = 0x676E_6972;
/// Largest ring.
pub const MAX_ENTRIES: u32 = 1024;
/// Offset of the first request in the ring.
pub const REQUESTS_OFFSET: u64 = 64;
/// Distinct MSI targets one device will create sources for (each may cost
/// a kernel routing entry).
const MAX_MSI_TARGETS: usize = 4;

/// Why an arm was refused (status register).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum ArmError {
    BadEntries = 1,
    BadBase = 2,
    NoMsi = 3,
    NotArmed = 4,
}

#[derive(Clone, Copy)]
struct Ring {
    base: u64,
    entries: u32,
}

impl Ring {
    fn request(&self, i: u32) -> GuestAddress {
        GuestAddress(self.base + REQUESTS_OFFSET + 4 * u64::from(i % self.entries))
    }

    fn completion(&self, i: u32) -> GuestAddress {
        let done = REQUESTS_OFFSET + 4 * u64::from(self.entries);
        GuestAddress(self.base + done + 4 * u64::from(i % self.entries))
    }

    fn end(&self) -> u64 {
        self.base + REQUESTS_OFFSET + 8 * u64::from(self.entries)
    }
}

/// What the device thread works from, set by an arm.
struct Armed {
    ring: Ring,
    msi: usize,
    /// Requests consumed so far (free-running).
    consumed: u32,
}

struct Shared {
    armed: Mutex<Option<Armed>>,
    msis: Mutex<Vec<((u64, u32), MsiSource)>>,
    completed: AtomicU32,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The ring device: its registers and its worker thread.
pub struct RingDevice {
    regs: [u32; 4],
    status: u32,
    shared: Arc<Shared>,
    sources: Arc<InterruptSources>,
    memory: GuestMemoryMmap,
    worker: Option<JoinHandle<()>>,
    doorbell_fd: vmm_sys_util::eventfd::EventFd,
}

impl RingDevice {
    /// A device whose doorbell is registered with KVM through `sources`,
    /// reading and writing rings in `memory`.
    pub fn new(
        sources: Arc<InterruptSources>,
        memory: GuestMemoryMmap,
    ) -> Result<Self, SourceError> {
        let doorbell = sources.doorbell(DoorbellAddress::Pio(DOORBELL), None)?;
        let doorbell_fd = doorbell
            .fd()
            .try_clone()
            .map_err(|e| SourceError::Host("eventfd dup", e))?;
        let shared = Arc::new(Shared {
            armed: Mutex::new(None),
            msis: Mutex::new(Vec::new()),
            completed: AtomicU32::new(0),
            stop: AtomicBool::new(false),
        });
        let worker = {
            let (shared, memory) = (shared.clone(), memory.clone());
            std::thread::Builder::new()
                .name("virq-ring".into())
                .spawn(move || worker(&doorbell, &shared, &memory))
                .map_err(|e| SourceError::Host("cannot start the ring thread", e))?
        };
        Ok(RingDevice {
            regs: [0; 4],
            status: ArmError::NotArmed as u32,
            shared,
            sources,
            memory,
            worker: Some(worker),
            doorbell_fd,
        })
    }

    fn arm(&mut self) -> Result<(), ArmError> {
        let [base, entries, address, data] = self.regs;
        if !entries.is_power_of_two() || entries > MAX_ENTRIES {
            return Err(ArmError::BadEntries);
        }
        let ring = Ring {
            base: u64::from(base),
            entries,
        };
        let inside = |addr: u64| self.memory.address_in_range(GuestAddress(addr));
        if base % 64 != 0 || !inside(ring.base) || !inside(ring.end() - 1) {
            return Err(ArmError::BadBase);
        }
        let msi = self.msi_source(u64::from(address), data)?;
        // The guest's producer index, read now, is where the device starts.
        let consumed = self
            .memory
            .load::<u32>(GuestAddress(ring.base), Ordering::Acquire)
            .map_err(|_| ArmError::BadBase)?;
        *lock(&self.shared.armed) = Some(Armed {
            ring,
            msi,
            consumed,
        });
        self.shared.completed.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// The index of the MSI source for (`address`, `data`), created on first use.
    fn msi_source(&self, address: u64, data: u32) -> Result<usize, ArmError> {
        let mut msis = lock(&self.shared.msis);
        if let Some(i) = msis.iter().position(|(key, _)| *key == (address, data)) {
            return Ok(i);
        }
        if msis.len() >= MAX_MSI_TARGETS {
            return Err(ArmError::NoMsi);
        }
        let source = self.sources.msi(address, data).map_err(|e| {
            tracing::warn!("ring device: no MSI source: {e}");
            ArmError::NoMsi
        })?;
        msis.push(((address, data), source));
        Ok(msis.len() - 1)
    }
}

impl Drop for RingDevice {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.doorbell_fd.write(1);
        if let Some(t) = self.worker.take() {
            let _ = t.join();
        }
    }
}

impl PioDevice for RingDevice {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        let value = match port.wrapping_sub(BASE) {
            0x00 => SIGNATURE,
            0x14 => self.shared.completed.load(Ordering::Acquire),
            0x18 => self.status,
            _ => 0,
        };
        put_le(data, value);
    }

    fn write(&mut self, port: u16, data: &[u8]) -> PioAction {
        let value = le_value(data) as u32;
        match port.wrapping_sub(BASE) {
            offset @ (0x00 | 0x04 | 0x08) => self.regs[usize::from(offset / 4)] = value,
            0x0C => {
                self.regs[3] = value;
                self.status = match self.arm() {
                    Ok(()) => 0,
                    Err(e) => e as u32,
                };
            }
            // KVM normally takes doorbell writes; one that still arrives
            // here (e.g. a different width) is a ring all the same.
            0x10 => {
                let _ = self.doorbell_fd.write(1);
            }
            _ => {}
        }
        PioAction::None
    }
}

/// The device thread: each doorbell drains the request ring.
fn worker(doorbell: &Doorbell, shared: &Shared, memory: &GuestMemoryMmap) {
    loop {
        if doorbell.wait().is_err() || shared.stop.load(Ordering::Acquire) {
            return;
        }
        // One pass per wake-up: a guest keeps at most `entries` requests
        // outstanding, and a ring during the pass wakes us again.
        let (done, msi) = {
            let mut armed = lock(&shared.armed);
            let Some(armed) = armed.as_mut() else {
                continue;
            };
            (serve(armed, memory), armed.msi)
        };
        if done == 0 {
            continue;
        }
        shared.completed.fetch_add(done, Ordering::AcqRel);
        if let Some((_, source)) = lock(&shared.msis).get(msi) {
            if let Err(e) = source.trigger() {
                tracing::warn!("ring device: MSI trigger: {e}");
            }
        }
    }
}

/// Answers up to one ring's worth of new requests; returns how many.
fn serve(armed: &mut Armed, memory: &GuestMemoryMmap) -> u32 {
    let ring = armed.ring;
    let Ok(produced) = memory.load::<u32>(GuestAddress(ring.base), Ordering::Acquire) else {
        return 0;
    };
    let new = produced.wrapping_sub(armed.consumed).min(ring.entries);
    for _ in 0..new {
        let i = armed.consumed;
        let Ok(request) = memory.load::<u32>(ring.request(i), Ordering::Relaxed) else {
            return 0;
        };
        if memory
            .store(!request, ring.completion(i), Ordering::Relaxed)
            .is_err()
        {
            return 0;
        }
        armed.consumed = i.wrapping_add(1);
        if memory
            .store(
                armed.consumed,
                GuestAddress(ring.base + 4),
                Ordering::Release,
            )
            .is_err()
        {
            return 0;
        }
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory")
    }

    fn armed(entries: u32) -> Armed {
        Armed {
            ring: Ring {
                base: 0x1000,
                entries,
            },
            msi: 0,
            consumed: 0,
        }
    }

    fn load(m: &GuestMemoryMmap, addr: GuestAddress) -> u32 {
        m.load::<u32>(addr, Ordering::Acquire).expect("in RAM")
    }

    #[test]
    fn answers_each_new_request_and_publishes_done_prod() {
        let m = memory();
        let mut a = armed(4);
        for i in 0..3u32 {
            m.store(100 + i, a.ring.request(i), Ordering::Relaxed)
                .expect("in RAM");
        }
        m.store(3u32, GuestAddress(0x1000), Ordering::Release)
            .expect("in RAM");
        assert_eq!(serve(&mut a, &m), 3);
        for i in 0..3u32 {
            assert_eq!(load(&m, a.ring.completion(i)), !(100 + i));
        }
        assert_eq!(load(&m, GuestAddress(0x1004)), 3);
        assert_eq!(serve(&mut a, &m), 0, "nothing new");
    }

    #[test]
    fn indexes_wrap_around_the_ring_and_u32() {
        let m = memory();
        let mut a = armed(4);
        a.consumed = u32::MAX - 1;
        m.store(1u32, GuestAddress(0x1000), Ordering::Release)
            .expect("in RAM");
        assert_eq!(serve(&mut a, &m), 3);
        assert_eq!(a.consumed, 1);
        assert_eq!(load(&m, GuestAddress(0x1004)), 1);
    }

    #[test]
    fn a_producer_far_ahead_costs_at_most_one_ring_per_doorbell() {
        let m = memory();
        let mut a = armed(8);
        m.store(u32::MAX / 2, GuestAddress(0x1000), Ordering::Release)
            .expect("in RAM");
        assert_eq!(serve(&mut a, &m), 8);
        assert_eq!(a.consumed, 8);
    }

    #[test]
    fn ring_layout_puts_completions_after_requests() {
        let r = Ring {
            base: 0x2000,
            entries: 16,
        };
        assert_eq!(r.request(0), GuestAddress(0x2000 + 64));
        assert_eq!(r.request(17), GuestAddress(0x2000 + 64 + 4));
        assert_eq!(r.completion(0), GuestAddress(0x2000 + 64 + 64));
        assert_eq!(r.end(), 0x2000 + 64 + 128);
    }
}
