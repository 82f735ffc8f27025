//! Messages on the APIC bus and the resolution of their destinations.
//!
//! The IOAPIC, MSI writes and IPIs from the ICR all produce an
//! [`InterruptMessage`]; [`resolve`] turns its destination into the set of
//! vCPUs that accept it, using what each local APIC reports about its own
//! addressing ([`ApicAddressing`]). One resolution path serves all three.

use serde::{Deserialize, Serialize};

use crate::MAX_VCPUS;

/// Delivery mode (ICR, RTE and MSI data bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeliveryMode {
    /// Deliver the vector to every destination.
    Fixed,
    /// Deliver the vector to one destination: the lowest-priority one.
    LowestPriority,
    /// System management interrupt.
    Smi,
    /// Encoding 3 is reserved; such messages are dropped.
    Reserved,
    /// Non-maskable interrupt; the vector is ignored.
    Nmi,
    /// INIT: reset the destination (an AP goes to wait-for-SIPI).
    Init,
    /// Start-up IPI: start a waiting AP at `vector << 12`.
    StartUp,
    /// External interrupt: the vector comes from the 8259A via INTA.
    ExtInt,
}

impl DeliveryMode {
    /// Decode the three-bit field.
    pub fn from_bits(bits: u32) -> Self {
        match bits & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            3 => Self::Reserved,
            4 => Self::Nmi,
            5 => Self::Init,
            6 => Self::StartUp,
            _ => Self::ExtInt,
        }
    }

    /// Encode as the three-bit field.
    pub fn bits(self) -> u32 {
        match self {
            Self::Fixed => 0,
            Self::LowestPriority => 1,
            Self::Smi => 2,
            Self::Reserved => 3,
            Self::Nmi => 4,
            Self::Init => 5,
            Self::StartUp => 6,
            Self::ExtInt => 7,
        }
    }
}

/// Destination mode (ICR/RTE bit 11, MSI address bit 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DestinationMode {
    /// The destination is an APIC ID.
    Physical,
    /// The destination is a message destination address matched against LDR.
    Logical,
}

/// Trigger mode (ICR/RTE bit 15, MSI data bit 15).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TriggerMode {
    /// Edge: no EOI message goes back to the source.
    Edge,
    /// Level: the LAPIC sets TMR and the EOI goes back to the IOAPIC.
    Level,
}

/// ICR destination shorthand (bits 19:18).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Shorthand {
    /// Use the destination field.
    None,
    /// Only the sending LAPIC.
    SelfOnly,
    /// Every LAPIC, the sender included.
    AllIncludingSelf,
    /// Every LAPIC but the sender.
    AllExcludingSelf,
}

impl Shorthand {
    /// Decode the two-bit field.
    pub fn from_bits(bits: u32) -> Self {
        match bits & 3 {
            0 => Self::None,
            1 => Self::SelfOnly,
            2 => Self::AllIncludingSelf,
            _ => Self::AllExcludingSelf,
        }
    }
}

/// How wide the destination field of a message is, which decides the
/// broadcast value and how it compares with x2APIC IDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DestinationFormat {
    /// 8-bit destination (xAPIC ICR, IOAPIC RTE, MSI; MSI extended
    /// destination IDs widen it to 15 bits): 0xFF is broadcast.
    XApic,
    /// 32-bit destination (x2APIC ICR): 0xFFFF_FFFF is broadcast.
    X2Apic,
}

/// One interrupt message on the APIC bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InterruptMessage {
    /// Vector (ignored for NMI, INIT, SMI and ExtINT; the page for SIPI).
    pub vector: u8,
    /// What the destination does with it.
    pub delivery_mode: DeliveryMode,
    /// How `destination` is interpreted.
    pub destination_mode: DestinationMode,
    /// Edge or level.
    pub trigger_mode: TriggerMode,
    /// Level: assert (true) or de-assert (false, the INIT level de-assert IPI).
    pub level: bool,
    /// Destination field, interpreted according to `format` and `destination_mode`.
    pub destination: u32,
    /// Width of `destination`.
    pub format: DestinationFormat,
    /// ICR shorthand; `Shorthand::None` for IOAPIC and MSI messages.
    pub shorthand: Shorthand,
    /// The sending vCPU for IPIs (needed by the self shorthands).
    pub source: Option<usize>,
}

/// Logical destination model of an xAPIC (DFR bits 31:28).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DfrModel {
    /// DFR model 0xF: LDR bits 31:24 are a bitmap matched against the MDA.
    Flat,
    /// DFR model 0x0: LDR high nibble is a cluster, low nibble a bitmap.
    Cluster,
}

/// What destination resolution needs to know about one local APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ApicAddressing {
    /// APIC ID (8 bits in xAPIC mode, 32 in x2APIC mode).
    pub apic_id: u32,
    /// Logical destination register as the guest sees it.
    pub ldr: u32,
    /// xAPIC logical model; ignored in x2APIC mode.
    pub dfr_model: DfrModel,
    /// The LAPIC is in x2APIC mode.
    pub x2apic: bool,
    /// The LAPIC is hardware-enabled (APIC_BASE bit 11); disabled ones match nothing.
    pub hw_enabled: bool,
    /// The LAPIC is software-enabled (SVR bit 8); lowest priority skips disabled ones.
    pub sw_enabled: bool,
    /// Processor priority, for lowest-priority arbitration.
    pub ppr: u8,
}

/// A set of vCPU indices, as a fixed 256-bit bitmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CpuSet([u64; MAX_VCPUS / 64]);

impl CpuSet {
    /// The empty set.
    pub const fn new() -> Self {
        Self([0; MAX_VCPUS / 64])
    }

    /// A set of one vCPU (empty if the index is out of range).
    pub fn single(cpu: usize) -> Self {
        let mut s = Self::new();
        s.insert(cpu);
        s
    }

    /// Add a vCPU; indices out of range are ignored.
    pub fn insert(&mut self, cpu: usize) {
        if cpu < MAX_VCPUS {
            self.0[cpu / 64] |= 1 << (cpu % 64);
        }
    }

    /// Remove a vCPU.
    pub fn remove(&mut self, cpu: usize) {
        if cpu < MAX_VCPUS {
            self.0[cpu / 64] &= !(1 << (cpu % 64));
        }
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: usize) -> bool {
        cpu < MAX_VCPUS && self.0[cpu / 64] & (1 << (cpu % 64)) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// Number of vCPUs in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The members in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(i, w)| {
            let mut w = *w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(i * 64 + bit)
            })
        })
    }
}

/// Resolve a message's destination to the vCPUs that accept it.
///
/// `apics[i]` describes vCPU `i`'s local APIC. Lowest-priority messages
/// resolve to at most one vCPU. Destinations that name no existing vCPU
/// resolve to the empty set; nothing here indexes by a guest-chosen value.
pub fn resolve(msg: &InterruptMessage, apics: &[ApicAddressing]) -> CpuSet {
    let _ = (msg, apics);
    todo!("destination resolution")
}

/// Where a device puts its APIC bus messages: the caller's delivery layer.
///
/// In userspace mode this resolves the destination against our LAPICs; in
/// split mode it forwards the message to KVM's LAPICs as an MSI.
pub trait ApicBus {
    /// Deliver one message; returns how many vCPUs accepted it (0 if none).
    fn deliver(&mut self, msg: &InterruptMessage) -> usize;
}

/// Outcome of raising an interrupt line, as KVM's `KVM_IRQ_LINE_STATUS` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IrqStatus {
    /// The line is masked or the interrupt was ignored (KVM: < 0).
    Masked,
    /// Already pending: merged with an earlier request (KVM: 0).
    Coalesced,
    /// Delivered to this many vCPUs (KVM: > 0; a PIC reports 1).
    Delivered(usize),
}

impl IrqStatus {
    /// The integer KVM reports for this outcome.
    pub fn to_kvm(self) -> i32 {
        match self {
            Self::Masked => -1,
            Self::Coalesced => 0,
            Self::Delivered(n) => i32::try_from(n).unwrap_or(i32::MAX),
        }
    }
}
