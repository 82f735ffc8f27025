//! virq: deterministic models of the PC interrupt hardware.
//!
//! Every device here is a plain state machine: no threads, no host clock, no
//! file descriptors and no `unsafe`. Time comes in as nanoseconds on a virtual
//! clock the caller owns; effects go out as return values. Each device has a
//! plain-data `State` that round-trips through serde.
//!
//! Layout, following the hardware:
//! - [`pit`]: 8254 programmable interval timer and port 0x61;
//! - [`pic`]: 8259A master/slave pair and the ELCR;
//! - [`ioapic`]: the I/O APIC (version 0x11 or 0x20);
//! - [`lapic`]: one local APIC per vCPU, xAPIC MMIO and x2APIC MSRs, timer;
//! - [`msi`]: decoding MSI address/data into APIC bus messages;
//! - [`delivery`]: APIC bus messages and destination resolution;
//! - [`routing`]: the GSI routing table and per-source line levels;
//! - [`inject`]: which event a vCPU takes next, given its interruptibility;
//! - [`posted`]: device MSIs posted into a vCPU's requests without the
//!   chipset's lock (the one part meant to be shared between threads);
//! - [`chipset`]: all of the above wired together as on the board.
//!
//! # Example: a userspace irqchip's vCPU loop, in miniature
//!
//! ```
//! use virq::chipset::{ChipEvent, Chipset, ChipsetConfig, LapicPlacement};
//! use virq::inject::{decide, Decision, Interruptibility};
//! use virq::ioapic::IoapicVersion;
//! use virq::msi::MsiMessage;
//! use virq::pit::LostTickPolicy;
//!
//! let mut chip = Chipset::new(ChipsetConfig {
//!     vcpus: 2,
//!     lapics: LapicPlacement::Model,
//!     ioapic_version: IoapicVersion::V20,
//!     pit_policy: LostTickPolicy::Reinject,
//!     tsc_hz: 2_000_000_000,
//!     tsc_offset: 0,
//! })?;
//! let now = 0;
//! // The guest software-enables vCPU 1's LAPIC (an MMIO exit on vCPU 1).
//! chip.mmio_write(1, 0xFEE0_00F0, &0x1FFu32.to_le_bytes(), now);
//! // A device sends an MSI: vector 0x41 to APIC ID 1.
//! chip.send_msi(MsiMessage { address: 0xFEE0_1000, data: 0x41 }, now)?;
//! // The VMM kicks the vCPUs the chipset names...
//! assert!(chip.drain_events().any(|e| e == ChipEvent::Kick(1)));
//! // ...and before the next entry decides what vCPU 1 takes.
//! let cpu = Interruptibility { if_flag: true, ..Default::default() };
//! let decision = decide(&chip.pending(1), &cpu);
//! assert_eq!(decision, Decision::InjectVector(0x41));
//! assert_eq!(chip.acknowledge(1, decision, now), Some(0x41)); // KVM_INTERRUPT 0x41
//! // The handler's EOI comes back as another MMIO write.
//! chip.mmio_write(1, 0xFEE0_00B0, &0u32.to_le_bytes(), now);
//! assert_eq!(chip.pending(1).vector, None);
//! # Ok::<(), virq::chipset::ChipsetError>(())
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod chipset;
pub mod delivery;
pub mod inject;
pub mod ioapic;
pub mod lapic;
pub mod msi;
pub mod pic;
pub mod pit;
pub mod posted;
pub mod routing;

/// The answer "raise #GP in the guest" to an MSR access, for the caller to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("general protection fault")]
pub struct RaiseGp;

/// The most vCPUs (and so local APICs) one machine model supports.
pub const MAX_VCPUS: usize = 256;
