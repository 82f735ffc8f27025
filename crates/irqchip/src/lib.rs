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
//! - [`chipset`]: all of the above wired together as on the board.
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
pub mod routing;

/// The answer "raise #GP in the guest" to an MSR access, for the caller to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("general protection fault")]
pub struct RaiseGp;

/// The most vCPUs (and so local APICs) one machine model supports.
pub const MAX_VCPUS: usize = 256;
