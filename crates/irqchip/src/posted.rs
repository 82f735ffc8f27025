//! Posted interrupts: a way onto the APIC bus that needs no lock on the
//! chipset, for the message devices send most, a device's MSI.
//!
//! A [`Chipset`](crate::chipset::Chipset) is a plain state machine behind
//! its owner's lock. A device thread that had to take that lock for every
//! MSI would wait for whichever vCPU holds it for an exit. Instead it asks
//! [`PostedInterrupts::post_msi`] (the chipset hands out an `Arc` of it):
//!
//! - with the chipset's LAPIC models, a fixed (or lowest-priority) edge
//!   message to one physical APIC ID is looked up in a directory of APIC
//!   IDs the chipset publishes whenever a LAPIC's ID or mode changes, and
//!   its vector is set in that vCPU's request bitmap with atomics. The
//!   owner then notifies that vCPU (wakes it if halted, kicks it if it runs
//!   guest code). The next holder of the chipset moves the bits into the
//!   LAPIC through its normal accept path
//!   ([`Chipset::accept_posted`](crate::chipset::Chipset::accept_posted)),
//!   so whatever that LAPIC would refuse (software-disabled, an illegal
//!   vector) it refuses there;
//! - with external LAPICs (a split irqchip), every MSI that decodes is
//!   handed back for the hypervisor's LAPICs: the chipset has nothing to
//!   do with it.
//!
//! Everything else (logical or broadcast destinations, level triggers, NMI,
//! INIT, an ID two LAPICs share, one nobody has) returns `None`, and the
//! caller sends it the locked way, which resolves it in full.
//!
//! A posted message is on the bus until it is accepted: one posted just
//! before its target changed its APIC ID may still reach it, as a message
//! in flight on the real bus would.

use crate::delivery::{
    DeliveryMode, DestinationFormat, DestinationMode, InterruptMessage, Shorthand, TriggerMode,
};
use crate::msi::MsiMessage;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A directory entry whose LAPIC answers to no physical ID (hardware-disabled).
const NO_ID: u64 = 0;
/// Directory entry bits above the 32-bit APIC ID.
const ENTRY_ENABLED: u64 = 1 << 32;
const ENTRY_X2APIC: u64 = 1 << 33;

/// What [`PostedInterrupts::post_msi`] did with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posted {
    /// The vector waits in this vCPU's request bitmap: notify the vCPU.
    Vcpu(usize),
    /// The LAPICs are the hypervisor's: deliver this message to them.
    External(InterruptMessage),
}

/// One vCPU's side of the door.
#[derive(Debug, Default)]
struct Slot {
    /// The LAPIC's physical addressing: `ENTRY_ENABLED | ENTRY_X2APIC | id`.
    entry: AtomicU64,
    /// Posted vectors, a bit each, not yet accepted.
    requests: [AtomicU64; 4],
    /// Some request bit may be set.
    pending: AtomicBool,
}

/// The lock-free request bitmaps of every vCPU, and the APIC ID directory
/// that finds them.
#[derive(Debug)]
pub struct PostedInterrupts {
    slots: Vec<Slot>,
    /// The LAPICs are external: every MSI is handed back.
    external: bool,
    /// Some vCPU's `pending` may be set (one load per acceptance when idle).
    any: AtomicBool,
    /// Messages posted or handed back, not yet counted by the chipset.
    posted: AtomicU64,
}

impl PostedInterrupts {
    /// Bitmaps for `vcpus` LAPIC models, or (with `external`) none at all.
    pub(crate) fn new(vcpus: usize, external: bool) -> Self {
        let slots = if external { 0 } else { vcpus };
        PostedInterrupts {
            slots: (0..slots).map(|_| Slot::default()).collect(),
            external,
            any: AtomicBool::new(false),
            posted: AtomicU64::new(0),
        }
    }

    /// Publishes vCPU `cpu`'s physical addressing (the chipset does this
    /// whenever it refreshes its own view of that LAPIC).
    pub(crate) fn publish(&self, cpu: usize, apic_id: u32, x2apic: bool, hw_enabled: bool) {
        let Some(slot) = self.slots.get(cpu) else {
            return;
        };
        let entry = if hw_enabled {
            ENTRY_ENABLED | if x2apic { ENTRY_X2APIC } else { 0 } | u64::from(apic_id)
        } else {
            NO_ID
        };
        slot.entry.store(entry, Ordering::Release);
    }

    /// Sends one device MSI without the chipset's lock, if it is a message
    /// this door takes (see the module documentation); `None` means send it
    /// through [`Chipset::send_msi`](crate::chipset::Chipset::send_msi).
    pub fn post_msi(&self, msi: MsiMessage) -> Option<Posted> {
        let msg = msi.decode().ok()?;
        if self.external {
            self.posted.fetch_add(1, Ordering::Relaxed);
            return Some(Posted::External(msg));
        }
        let cpu = self.single_physical_target(&msg)?;
        let slot = &self.slots[cpu];
        let v = usize::from(msg.vector);
        slot.requests[v / 64].fetch_or(1 << (v % 64), Ordering::Release);
        slot.pending.store(true, Ordering::Release);
        self.posted.fetch_add(1, Ordering::Relaxed);
        self.any.store(true, Ordering::Release);
        Some(Posted::Vcpu(cpu))
    }

    /// The one vCPU a simple message goes to, or `None` for anything the
    /// full resolution must see.
    fn single_physical_target(&self, msg: &InterruptMessage) -> Option<usize> {
        let simple = matches!(
            msg.delivery_mode,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority
        ) && msg.destination_mode == DestinationMode::Physical
            && msg.trigger_mode == TriggerMode::Edge
            && msg.shorthand == Shorthand::None
            && msg.destination != broadcast(msg.format);
        if !simple {
            return None;
        }
        let mut found = None;
        for (cpu, slot) in self.slots.iter().enumerate() {
            let entry = slot.entry.load(Ordering::Acquire);
            if entry & ENTRY_ENABLED == 0 {
                continue;
            }
            let id = entry as u32;
            let id = if entry & ENTRY_X2APIC != 0 {
                id
            } else {
                id & 0xFF
            };
            if id == msg.destination {
                if found.is_some() {
                    // Two LAPICs share the ID: the full resolution decides.
                    return None;
                }
                found = Some(cpu);
            }
        }
        found
    }

    /// Takes every vector posted to vCPU `cpu` since the last call.
    pub(crate) fn take(&self, cpu: usize) -> Option<[u64; 4]> {
        let slot = self.slots.get(cpu)?;
        if !slot.pending.swap(false, Ordering::Acquire) {
            return None;
        }
        Some(std::array::from_fn(|i| {
            slot.requests[i].swap(0, Ordering::Acquire)
        }))
    }

    /// Whether anything may wait to be taken; clears the hint. A post that
    /// races with this sets it again after its bits, so nothing is missed.
    pub(crate) fn take_any(&self) -> bool {
        self.any.load(Ordering::Relaxed) && self.any.swap(false, Ordering::Acquire)
    }

    /// Messages this door took since the last call, for the delivery counts.
    pub(crate) fn take_count(&self) -> u64 {
        if self.posted.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.posted.swap(0, Ordering::Relaxed)
    }

    /// Number of vCPU slots (0 with external LAPICs).
    pub(crate) fn vcpus(&self) -> usize {
        self.slots.len()
    }
}

/// The broadcast destination of a format.
fn broadcast(format: DestinationFormat) -> u32 {
    match format {
        DestinationFormat::XApic => 0xFF,
        DestinationFormat::X2Apic => u32::MAX,
    }
}

/// The vectors set in a 256-bit request bitmap, lowest first.
pub(crate) fn vectors(words: [u64; 4]) -> impl Iterator<Item = u8> {
    (0u8..=255).filter(move |v| words[usize::from(*v) / 64] & (1 << (v % 64)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msi(dest: u32, vector: u8) -> MsiMessage {
        MsiMessage {
            address: 0xFEE0_0000 | u64::from(dest) << 12,
            data: u32::from(vector),
        }
    }

    fn door(ids: &[(u32, bool)]) -> PostedInterrupts {
        let p = PostedInterrupts::new(ids.len(), false);
        for (cpu, (id, x2apic)) in ids.iter().enumerate() {
            p.publish(cpu, *id, *x2apic, true);
        }
        p
    }

    #[test]
    fn a_fixed_msi_lands_in_its_targets_bitmap() {
        let p = door(&[(0, false), (1, false)]);
        assert_eq!(p.post_msi(msi(1, 0x41)), Some(Posted::Vcpu(1)));
        assert_eq!(p.post_msi(msi(1, 0xC3)), Some(Posted::Vcpu(1)));
        assert!(p.take_any());
        assert_eq!(p.take(0), None);
        let words = p.take(1).expect("posted");
        assert_eq!(vectors(words).collect::<Vec<_>>(), vec![0x41, 0xC3]);
        assert_eq!(p.take(1), None, "taken once");
        assert_eq!(p.take_count(), 2);
    }

    #[test]
    fn what_needs_full_resolution_is_refused() {
        let p = door(&[(0, false), (1, false)]);
        // Broadcast, logical, level, NMI, nobody, and a remappable format.
        assert_eq!(p.post_msi(msi(0xFF, 0x41)), None);
        let logical = MsiMessage {
            address: 0xFEE0_1004,
            data: 0x41,
        };
        assert_eq!(p.post_msi(logical), None);
        let level = MsiMessage {
            address: 0xFEE0_1000,
            data: 0xC041,
        };
        assert_eq!(p.post_msi(level), None);
        let nmi = MsiMessage {
            address: 0xFEE0_1000,
            data: 0x0400,
        };
        assert_eq!(p.post_msi(nmi), None);
        assert_eq!(p.post_msi(msi(7, 0x41)), None);
        let remappable = MsiMessage {
            address: 0xFEE0_0010,
            data: 0x41,
        };
        assert_eq!(p.post_msi(remappable), None);
        assert!(!p.take_any());
        assert_eq!(p.take_count(), 0);
    }

    #[test]
    fn a_shared_or_disabled_id_is_left_to_full_resolution() {
        let p = door(&[(3, false), (3, false)]);
        assert_eq!(p.post_msi(msi(3, 0x41)), None, "two LAPICs answer to 3");
        p.publish(1, 3, false, false);
        assert_eq!(p.post_msi(msi(3, 0x41)), Some(Posted::Vcpu(0)));
        p.publish(0, 3, false, false);
        assert_eq!(p.post_msi(msi(3, 0x41)), None, "hardware-disabled");
    }

    #[test]
    fn xapic_targets_compare_eight_bits_and_x2apic_ones_all() {
        // An xAPIC ID register's high bits never match; an x2APIC ID does.
        let p = door(&[(0x100, false), (0x101, true)]);
        assert_eq!(p.post_msi(msi(0, 0x41)), Some(Posted::Vcpu(0)));
        // Extended destination ID bits 11:5 of the address widen it to 0x101.
        let extended = MsiMessage {
            address: 0xFEE0_1000 | 1 << 5,
            data: 0x42,
        };
        assert_eq!(p.post_msi(extended), Some(Posted::Vcpu(1)));
    }

    #[test]
    fn external_lapics_take_every_msi_that_decodes() {
        let p = PostedInterrupts::new(2, true);
        let Some(Posted::External(m)) = p.post_msi(msi(0xFF, 0x41)) else {
            panic!("broadcast goes to the hypervisor's LAPICs too");
        };
        assert_eq!(m.vector, 0x41);
        let remappable = MsiMessage {
            address: 0xFEE0_0010,
            data: 0x41,
        };
        assert_eq!(p.post_msi(remappable), None);
        assert_eq!(p.take_count(), 1);
        assert_eq!(p.vcpus(), 0);
    }

    #[test]
    fn concurrent_posts_are_all_taken_exactly_once() {
        use std::sync::Arc;
        let p = Arc::new(door(&[(0, false), (1, false)]));
        let posters: Vec<_> = (0..2u8)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    // Each thread owns its own 64 vectors, so none coalesce.
                    let base = 0x40 + t * 0x40;
                    for v in base..base + 64 {
                        assert_eq!(p.post_msi(msi(1, v)), Some(Posted::Vcpu(1)));
                    }
                })
            })
            .collect();
        let mut seen = [0u64; 4];
        let drain = |seen: &mut [u64; 4]| {
            if p.take_any() {
                if let Some(words) = p.take(1) {
                    for (s, w) in seen.iter_mut().zip(words) {
                        assert_eq!(*s & w, 0, "a vector taken twice");
                        *s |= w;
                    }
                }
            }
        };
        while posters.iter().any(|t| !t.is_finished()) {
            drain(&mut seen);
        }
        for t in posters {
            t.join().expect("poster");
        }
        drain(&mut seen);
        assert_eq!(seen, [0, u64::MAX, u64::MAX, 0]);
    }
}
