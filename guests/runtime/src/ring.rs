//! Driver of virq's ring device (ports 0x2500-0x251F; see
//! crates/vmm/src/devices/ring.rs): the ring layout in guest memory, arming
//! it with an MSI, and the doorbell.

use crate::arch::{inl, outl};
use crate::msi::{Address, Data};
use core::sync::atomic::{AtomicU32, Ordering};

/// First port.
pub const PORT: u16 = 0x2500;
/// What the first port reads when the device is there ("ring").
pub const SIGNATURE: u32 = 0x676E_6972;
const DOORBELL: u16 = PORT + 0x10;
const COMPLETED: u16 = PORT + 0x14;
const STATUS: u16 = PORT + 0x18;

/// A ring of `N` entries (a power of two, at most 1024), laid out as the
/// device reads it: producer indexes, then requests, then completions.
#[repr(C, align(64))]
pub struct Ring<const N: usize> {
    /// Requests posted (free-running), written by the guest.
    pub req_prod: AtomicU32,
    /// Completions published (free-running), written by the device.
    pub done_prod: AtomicU32,
    _pad: [u32; 14],
    /// Request values, entry `i % N`.
    pub requests: [AtomicU32; N],
    /// Completion values (`!request`), entry `i % N`.
    pub completions: [AtomicU32; N],
}

impl<const N: usize> Ring<N> {
    /// An empty ring, for a `static`.
    pub const fn new() -> Self {
        Ring {
            req_prod: AtomicU32::new(0),
            done_prod: AtomicU32::new(0),
            _pad: [0; 14],
            requests: [const { AtomicU32::new(0) }; N],
            completions: [const { AtomicU32::new(0) }; N],
        }
    }

    /// The slot of free-running index `i`.
    pub fn slot(i: u32) -> usize {
        i as usize % N
    }

    /// Arms the device with this ring and a fixed MSI of `vector` to the
    /// APIC ID `dest`; returns the device's status (0 = armed).
    pub fn arm(&'static self, dest: u8, vector: u8) -> u32 {
        outl(PORT, core::ptr::from_ref(self) as u32);
        outl(PORT + 4, N as u32);
        outl(PORT + 8, Address::physical(dest).0 as u32);
        outl(PORT + 12, Data::fixed(vector).0);
        inl(STATUS)
    }

    /// Publishes requests up to free-running index `produced` and rings.
    pub fn post(&self, produced: u32) {
        self.req_prod.store(produced, Ordering::Release);
        ring_doorbell();
    }
}

impl<const N: usize> Default for Ring<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the device is there (it is not under QEMU).
pub fn present() -> bool {
    inl(PORT) == SIGNATURE
}

/// Rings the doorbell (an ioeventfd under virq: no exit to the VMM).
pub fn ring_doorbell() {
    outl(DOORBELL, 1);
}

/// Requests the device completed since it was last armed.
pub fn completed() -> u32 {
    inl(COMPLETED)
}
