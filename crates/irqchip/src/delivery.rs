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
///
/// The work is one pass over `apics` (plus one over the matches for lowest
/// priority), so it is linear in the number of vCPUs whatever the message.
/// Entries beyond [`MAX_VCPUS`] are ignored: a [`CpuSet`] cannot name them.
///
/// Matching rules:
/// - hardware-disabled local APICs match nothing, shorthands included;
/// - shorthands use `msg.source` (a `SelfOnly` message without a source
///   reaches nobody);
/// - physical: the format's broadcast value (0xFF, or 0xFFFF_FFFF for the
///   x2APIC format) reaches everyone; otherwise the destination must equal
///   the 8-bit ID of an xAPIC-mode target or the full 32-bit ID of an
///   x2APIC-mode target. As in KVM, an xAPIC-format 0xFF (IOAPIC, MSI) is a
///   broadcast for x2APIC-mode targets too;
/// - logical, xAPIC-mode target: the destination is an 8-bit MDA (a wider
///   value matches nothing); flat model matches `LDR[31:24] & MDA != 0`,
///   cluster model needs equal high nibbles and a common low-nibble bit.
///   Only MDA 0xFF is a broadcast: like KVM and QEMU we give cluster 0xF
///   no special "all clusters" meaning;
/// - logical, x2APIC-mode target: `dest[31:16]` must equal the LDR's
///   cluster and `dest[15:0] & LDR[15:0]` must be non-zero.
///
/// Lowest priority: among the matching, software-enabled APICs the one with
/// the lowest PPR wins; a tie between `n` APICs goes to the
/// `(vector % n)`-th of them in vCPU order. This is deterministic and
/// spreads different vectors over equally idle vCPUs. KVM instead hashes
/// the vector over *all* matching vCPUs ignoring priority (vector hashing,
/// its default) or rotates an arbitration counter; QEMU simply takes the
/// lowest-numbered match. A physical-mode broadcast with lowest priority is
/// delivered as fixed to everyone, as KVM does.
pub fn resolve(msg: &InterruptMessage, apics: &[ApicAddressing]) -> CpuSet {
    let lowest = msg.delivery_mode == DeliveryMode::LowestPriority && !is_physical_broadcast(msg);
    let mut matched = CpuSet::new();
    // Lowest PPR among the software-enabled matches, and how many share it.
    let mut best: Option<(u8, usize)> = None;
    for (cpu, apic) in apics.iter().enumerate().take(MAX_VCPUS) {
        if !apic.hw_enabled || !accepts(msg, cpu, apic) {
            continue;
        }
        matched.insert(cpu);
        if lowest && apic.sw_enabled {
            best = match best {
                Some((ppr, ties)) if apic.ppr == ppr => Some((ppr, ties + 1)),
                Some((ppr, ties)) if apic.ppr > ppr => Some((ppr, ties)),
                _ => Some((apic.ppr, 1)),
            };
        }
    }
    if !lowest {
        return matched;
    }
    let Some((ppr, ties)) = best else {
        return CpuSet::new();
    };
    let pick = usize::from(msg.vector) % ties;
    let chosen = matched
        .iter()
        .filter(|cpu| {
            apics
                .get(*cpu)
                .is_some_and(|apic| apic.sw_enabled && apic.ppr == ppr)
        })
        .nth(pick)
        .map(CpuSet::single)
        .unwrap_or_default();
    chosen
}

/// The broadcast destination value of a destination format.
fn broadcast_id(format: DestinationFormat) -> u32 {
    match format {
        DestinationFormat::XApic => 0xFF,
        DestinationFormat::X2Apic => u32::MAX,
    }
}

/// A physical-mode message addressed to everyone through its destination field.
fn is_physical_broadcast(msg: &InterruptMessage) -> bool {
    msg.shorthand == Shorthand::None
        && msg.destination_mode == DestinationMode::Physical
        && msg.destination == broadcast_id(msg.format)
}

/// Whether the (hardware-enabled) local APIC of vCPU `cpu` is addressed by `msg`.
fn accepts(msg: &InterruptMessage, cpu: usize, apic: &ApicAddressing) -> bool {
    match msg.shorthand {
        Shorthand::SelfOnly => msg.source == Some(cpu),
        Shorthand::AllIncludingSelf => true,
        Shorthand::AllExcludingSelf => msg.source != Some(cpu),
        Shorthand::None => match msg.destination_mode {
            DestinationMode::Physical => matches_physical(msg, apic),
            DestinationMode::Logical => matches_logical(msg, apic),
        },
    }
}

/// Physical destination: broadcast or an equal APIC ID.
fn matches_physical(msg: &InterruptMessage, apic: &ApicAddressing) -> bool {
    if msg.destination == broadcast_id(msg.format) {
        return true;
    }
    let id = if apic.x2apic {
        apic.apic_id
    } else {
        apic.apic_id & 0xFF
    };
    msg.destination == id
}

/// Logical destination, in the target's own logical model.
fn matches_logical(msg: &InterruptMessage, apic: &ApicAddressing) -> bool {
    let dest = msg.destination;
    if dest == broadcast_id(msg.format) {
        return true;
    }
    if apic.x2apic {
        // Cluster in bits 31:16, one bit per member in bits 15:0.
        return dest >> 16 == apic.ldr >> 16 && dest & apic.ldr & 0xFFFF != 0;
    }
    let Ok(mda) = u8::try_from(dest) else {
        return false;
    };
    let logical_id = (apic.ldr >> 24) as u8;
    match apic.dfr_model {
        DfrModel::Flat => logical_id & mda != 0,
        DfrModel::Cluster => logical_id >> 4 == mda >> 4 && logical_id & mda & 0xF != 0,
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An enabled xAPIC with flat LDR bit `id` (for ids < 8) and PPR 0.
    fn xapic(id: u32) -> ApicAddressing {
        ApicAddressing {
            apic_id: id,
            ldr: if id < 8 { 1 << (24 + id) } else { 0 },
            dfr_model: DfrModel::Flat,
            x2apic: false,
            hw_enabled: true,
            sw_enabled: true,
            ppr: 0,
        }
    }

    /// An enabled x2APIC with the architectural LDR for its ID.
    fn x2apic(id: u32) -> ApicAddressing {
        ApicAddressing {
            apic_id: id,
            ldr: (id >> 4) << 16 | 1 << (id & 15),
            dfr_model: DfrModel::Flat,
            x2apic: true,
            hw_enabled: true,
            sw_enabled: true,
            ppr: 0,
        }
    }

    fn xapics(n: u32) -> Vec<ApicAddressing> {
        (0..n).map(xapic).collect()
    }

    fn x2apics(n: u32) -> Vec<ApicAddressing> {
        (0..n).map(x2apic).collect()
    }

    fn msg(mode: DestinationMode, destination: u32) -> InterruptMessage {
        InterruptMessage {
            vector: 0x40,
            delivery_mode: DeliveryMode::Fixed,
            destination_mode: mode,
            trigger_mode: TriggerMode::Edge,
            level: true,
            destination,
            format: DestinationFormat::XApic,
            shorthand: Shorthand::None,
            source: None,
        }
    }

    fn x2msg(mode: DestinationMode, destination: u32) -> InterruptMessage {
        InterruptMessage {
            format: DestinationFormat::X2Apic,
            ..msg(mode, destination)
        }
    }

    fn cpus(set: CpuSet) -> Vec<usize> {
        set.iter().collect()
    }

    use DestinationMode::{Logical, Physical};

    #[test]
    fn shorthand_self_reaches_only_the_source() {
        let m = InterruptMessage {
            shorthand: Shorthand::SelfOnly,
            source: Some(2),
            destination: 0,
            ..msg(Physical, 0)
        };
        assert_eq!(cpus(resolve(&m, &xapics(4))), vec![2]);
    }

    #[test]
    fn shorthand_self_without_a_valid_source_reaches_nobody() {
        let mut m = InterruptMessage {
            shorthand: Shorthand::SelfOnly,
            source: None,
            ..msg(Physical, 0)
        };
        assert!(resolve(&m, &xapics(4)).is_empty());
        m.source = Some(usize::MAX);
        assert!(resolve(&m, &xapics(4)).is_empty());
    }

    #[test]
    fn shorthand_all_including_self_reaches_everyone() {
        let m = InterruptMessage {
            shorthand: Shorthand::AllIncludingSelf,
            source: Some(1),
            destination: 3,
            ..msg(Physical, 3)
        };
        assert_eq!(cpus(resolve(&m, &xapics(4))), vec![0, 1, 2, 3]);
    }

    #[test]
    fn shorthand_all_excluding_self_skips_the_source() {
        let m = InterruptMessage {
            shorthand: Shorthand::AllExcludingSelf,
            source: Some(1),
            ..msg(Physical, 1)
        };
        assert_eq!(cpus(resolve(&m, &xapics(4))), vec![0, 2, 3]);
    }

    #[test]
    fn shorthands_skip_hardware_disabled_apics() {
        let mut apics = xapics(3);
        apics[1].hw_enabled = false;
        let m = InterruptMessage {
            shorthand: Shorthand::AllIncludingSelf,
            source: Some(1),
            ..msg(Physical, 0)
        };
        assert_eq!(cpus(resolve(&m, &apics)), vec![0, 2]);
        let m = InterruptMessage {
            shorthand: Shorthand::SelfOnly,
            ..m
        };
        assert!(resolve(&m, &apics).is_empty());
    }

    #[test]
    fn physical_xapic_destination_matches_the_8_bit_id() {
        let apics = xapics(4);
        assert_eq!(cpus(resolve(&msg(Physical, 2), &apics)), vec![2]);
        assert!(resolve(&msg(Physical, 4), &apics).is_empty());
    }

    #[test]
    fn physical_xapic_0xff_is_broadcast() {
        assert_eq!(
            cpus(resolve(&msg(Physical, 0xFF), &xapics(3))),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn physical_xapic_format_broadcast_reaches_x2apic_targets() {
        assert_eq!(
            cpus(resolve(&msg(Physical, 0xFF), &x2apics(3))),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn physical_xapic_format_compares_full_id_of_x2apic_target() {
        // Extended MSI destination IDs reach x2APIC IDs above 255.
        let mut apics = x2apics(2);
        apics[1].apic_id = 0x102;
        assert_eq!(cpus(resolve(&msg(Physical, 0x102), &apics)), vec![1]);
        // The low 8 bits alone do not match.
        assert!(resolve(&msg(Physical, 0x02), &apics).is_empty());
    }

    #[test]
    fn physical_wide_destination_does_not_match_xapic_by_low_byte() {
        assert!(resolve(&msg(Physical, 0x101), &xapics(4)).is_empty());
    }

    #[test]
    fn physical_x2apic_destination_matches_the_32_bit_id() {
        let mut apics = x2apics(3);
        apics[2].apic_id = 0x1_0000;
        assert_eq!(cpus(resolve(&x2msg(Physical, 0x1_0000), &apics)), vec![2]);
        assert_eq!(cpus(resolve(&x2msg(Physical, 1), &apics)), vec![1]);
    }

    #[test]
    fn physical_x2apic_0xffffffff_is_broadcast() {
        assert_eq!(
            cpus(resolve(&x2msg(Physical, 0xFFFF_FFFF), &x2apics(3))),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn physical_x2apic_format_0xff_is_an_ordinary_id() {
        let mut apics = x2apics(3);
        apics[1].apic_id = 0xFF;
        assert_eq!(cpus(resolve(&x2msg(Physical, 0xFF), &apics)), vec![1]);
    }

    #[test]
    fn logical_flat_matches_ldr_bitmap_and_mda() {
        let apics = xapics(4); // LDR bits 24..27
        assert_eq!(cpus(resolve(&msg(Logical, 0b0101), &apics)), vec![0, 2]);
        assert!(resolve(&msg(Logical, 0b1111_0000), &apics).is_empty());
    }

    #[test]
    fn logical_flat_0xff_is_broadcast() {
        let mut apics = xapics(3);
        apics[2].ldr = 0; // not even in any logical group
        assert_eq!(cpus(resolve(&msg(Logical, 0xFF), &apics)), vec![0, 1, 2]);
    }

    fn cluster_apic(cluster: u32, member: u32) -> ApicAddressing {
        ApicAddressing {
            ldr: (cluster << 4 | 1 << member) << 24,
            dfr_model: DfrModel::Cluster,
            ..xapic(0)
        }
    }

    #[test]
    fn logical_cluster_needs_equal_cluster_and_common_member_bit() {
        let apics = vec![
            cluster_apic(1, 0),
            cluster_apic(1, 1),
            cluster_apic(2, 0),
            cluster_apic(2, 3),
        ];
        assert_eq!(cpus(resolve(&msg(Logical, 0x13), &apics)), vec![0, 1]);
        assert_eq!(cpus(resolve(&msg(Logical, 0x29), &apics)), vec![2, 3]);
        assert_eq!(
            cpus(resolve(&msg(Logical, 0x24), &apics)),
            Vec::<usize>::new()
        );
        assert!(resolve(&msg(Logical, 0x33), &apics).is_empty());
    }

    #[test]
    fn logical_cluster_0xff_is_broadcast_but_cluster_0xf_is_not() {
        let apics = vec![cluster_apic(1, 0), cluster_apic(2, 1), cluster_apic(0xF, 0)];
        assert_eq!(cpus(resolve(&msg(Logical, 0xFF), &apics)), vec![0, 1, 2]);
        // Cluster 15 with a partial bitmap reaches only cluster 15.
        assert_eq!(cpus(resolve(&msg(Logical, 0xF3), &apics)), vec![2]);
    }

    #[test]
    fn logical_xapic_target_ignores_destinations_wider_than_8_bits() {
        assert!(resolve(&msg(Logical, 0x101), &xapics(4)).is_empty());
    }

    #[test]
    fn logical_x2apic_matches_cluster_and_bitmap() {
        let apics = x2apics(40); // clusters 0, 1, 2
                                 // Cluster 1, members 0 and 5: IDs 16 and 21.
        assert_eq!(
            cpus(resolve(&x2msg(Logical, 1 << 16 | 0b10_0001), &apics)),
            vec![16, 21]
        );
        // Same bitmap in cluster 0.
        assert_eq!(
            cpus(resolve(&x2msg(Logical, 0b10_0001), &apics)),
            vec![0, 5]
        );
        // Cluster 2 holds IDs 32..39 only.
        assert_eq!(
            cpus(resolve(&x2msg(Logical, 2 << 16 | 0x8100), &apics)),
            Vec::<usize>::new()
        );
        assert_eq!(
            cpus(resolve(&x2msg(Logical, 2 << 16 | 0x0180), &apics)),
            vec![39]
        );
    }

    #[test]
    fn logical_x2apic_0xffffffff_is_broadcast() {
        assert_eq!(
            cpus(resolve(&x2msg(Logical, 0xFFFF_FFFF), &x2apics(20))).len(),
            20
        );
    }

    #[test]
    fn logical_xapic_format_reaches_x2apic_cluster_0() {
        // An IOAPIC/MSI logical destination seen by x2APIC-mode targets.
        assert_eq!(cpus(resolve(&msg(Logical, 0x06), &x2apics(20))), vec![1, 2]);
        assert_eq!(cpus(resolve(&msg(Logical, 0xFF), &x2apics(20))).len(), 20);
    }

    #[test]
    fn hardware_disabled_apic_matches_nothing() {
        let mut apics = xapics(3);
        apics[1].hw_enabled = false;
        assert!(resolve(&msg(Physical, 1), &apics).is_empty());
        assert_eq!(cpus(resolve(&msg(Physical, 0xFF), &apics)), vec![0, 2]);
        assert_eq!(cpus(resolve(&msg(Logical, 0x07), &apics)), vec![0, 2]);
    }

    #[test]
    fn fixed_delivery_includes_software_disabled_apics() {
        // Whether a software-disabled APIC takes it is the LAPIC's business.
        let mut apics = xapics(2);
        apics[1].sw_enabled = false;
        assert_eq!(cpus(resolve(&msg(Physical, 1), &apics)), vec![1]);
    }

    fn lowest(destination: u32, vector: u8) -> InterruptMessage {
        InterruptMessage {
            delivery_mode: DeliveryMode::LowestPriority,
            vector,
            ..msg(Logical, destination)
        }
    }

    #[test]
    fn lowest_priority_picks_the_lowest_ppr() {
        let mut apics = xapics(4);
        for (apic, ppr) in apics.iter_mut().zip([0x30, 0x20, 0x10, 0x40]) {
            apic.ppr = ppr;
        }
        assert_eq!(cpus(resolve(&lowest(0x0F, 0x41), &apics)), vec![2]);
        // Only among the destination set.
        assert_eq!(cpus(resolve(&lowest(0x0B, 0x41), &apics)), vec![1]);
    }

    #[test]
    fn lowest_priority_breaks_ties_by_vector_modulo_ties() {
        let mut apics = xapics(4);
        apics[0].ppr = 0x50; // not a tie member
                             // Ties: vCPUs 1, 2, 3 (PPR 0).
        assert_eq!(cpus(resolve(&lowest(0x0F, 0x30), &apics)), vec![1]); // 48 % 3 = 0
        assert_eq!(cpus(resolve(&lowest(0x0F, 0x31), &apics)), vec![2]); // 49 % 3 = 1
        assert_eq!(cpus(resolve(&lowest(0x0F, 0x32), &apics)), vec![3]); // 50 % 3 = 2
    }

    #[test]
    fn lowest_priority_skips_software_disabled_apics() {
        let mut apics = xapics(3);
        apics[0].sw_enabled = false;
        apics[1].ppr = 0x20;
        apics[2].ppr = 0x10;
        apics[0].ppr = 0x00;
        assert_eq!(cpus(resolve(&lowest(0x07, 0x40), &apics)), vec![2]);
        apics[1].sw_enabled = false;
        apics[2].sw_enabled = false;
        assert!(resolve(&lowest(0x07, 0x40), &apics).is_empty());
    }

    #[test]
    fn lowest_priority_with_no_match_reaches_nobody() {
        assert!(resolve(&lowest(0xF0, 0x40), &xapics(4)).is_empty());
    }

    #[test]
    fn lowest_priority_physical_broadcast_is_delivered_as_fixed() {
        let m = InterruptMessage {
            destination_mode: Physical,
            ..lowest(0xFF, 0x40)
        };
        assert_eq!(cpus(resolve(&m, &xapics(4))), vec![0, 1, 2, 3]);
        let m = InterruptMessage {
            format: DestinationFormat::X2Apic,
            destination: u32::MAX,
            ..m
        };
        assert_eq!(cpus(resolve(&m, &x2apics(4))), vec![0, 1, 2, 3]);
    }

    #[test]
    fn lowest_priority_logical_broadcast_picks_one() {
        assert_eq!(resolve(&lowest(0xFF, 0x40), &xapics(4)).len(), 1);
    }

    #[test]
    fn lowest_priority_with_a_shorthand_picks_one_of_its_set() {
        let mut apics = xapics(4);
        apics[3].ppr = 0x10;
        apics[1].ppr = 0x10;
        apics[2].ppr = 0x10;
        let m = InterruptMessage {
            shorthand: Shorthand::AllExcludingSelf,
            source: Some(0),
            ..lowest(0, 0x40)
        };
        // 0x40 % 3 = 1: the second of vCPUs 1, 2, 3.
        assert_eq!(cpus(resolve(&m, &apics)), vec![2]);
    }

    #[test]
    fn apics_beyond_max_vcpus_are_ignored() {
        let apics = x2apics(MAX_VCPUS as u32 + 10);
        assert!(resolve(&x2msg(Physical, MAX_VCPUS as u32 + 1), &apics).is_empty());
        assert_eq!(resolve(&x2msg(Physical, u32::MAX), &apics).len(), MAX_VCPUS);
    }

    #[test]
    fn regression_x2apic_icr_cluster_id_beyond_the_map() {
        let apics = x2apics(32);
        assert!(resolve(&x2msg(Logical, 0xFFFF_0001), &apics).is_empty());
        assert!(resolve(&x2msg(Logical, 0x1000_FFFF), &apics).is_empty());
        let m = InterruptMessage {
            delivery_mode: DeliveryMode::LowestPriority,
            ..x2msg(Logical, 0xFFFE_FFFF)
        };
        assert!(resolve(&m, &apics).is_empty());
    }

    #[test]
    fn regression_32_bit_destination_beyond_the_vcpu_map() {
        let apics = x2apics(4);
        for dest in [4, 0x100, 0x7FFF, 0x8000_0000, 0xFFFF_FFFE] {
            assert!(
                resolve(&x2msg(Physical, dest), &apics).is_empty(),
                "{dest:#x}"
            );
            assert!(
                resolve(&msg(Physical, dest), &apics).is_empty(),
                "{dest:#x}"
            );
        }
    }

    #[test]
    fn irq_status_maps_to_kvm_integers() {
        assert_eq!(IrqStatus::Masked.to_kvm(), -1);
        assert_eq!(IrqStatus::Coalesced.to_kvm(), 0);
        assert_eq!(IrqStatus::Delivered(1).to_kvm(), 1);
        assert_eq!(IrqStatus::Delivered(3).to_kvm(), 3);
        assert_eq!(IrqStatus::Delivered(usize::MAX).to_kvm(), i32::MAX);
    }

    fn arb_apic() -> impl Strategy<Value = ApicAddressing> {
        (
            prop_oneof![0u32..8, any::<u32>()],
            any::<u32>(),
            any::<bool>(),
            any::<bool>(),
            prop::bool::weighted(0.9),
            any::<bool>(),
            prop_oneof![Just(0u8), any::<u8>()],
        )
            .prop_map(
                |(apic_id, ldr, cluster, x2apic, hw_enabled, sw_enabled, ppr)| ApicAddressing {
                    apic_id,
                    ldr,
                    dfr_model: if cluster {
                        DfrModel::Cluster
                    } else {
                        DfrModel::Flat
                    },
                    x2apic,
                    hw_enabled,
                    sw_enabled,
                    ppr,
                },
            )
    }

    fn arb_msg() -> impl Strategy<Value = InterruptMessage> {
        (
            any::<u8>(),
            0u32..8,
            any::<bool>(),
            prop_oneof![0u32..8, Just(0xFF), Just(u32::MAX), any::<u32>()],
            any::<bool>(),
            0u32..4,
            prop::option::of(0usize..300),
        )
            .prop_map(|(vector, dm, logical, destination, x2, sh, source)| {
                InterruptMessage {
                    vector,
                    delivery_mode: DeliveryMode::from_bits(dm),
                    destination_mode: if logical { Logical } else { Physical },
                    trigger_mode: TriggerMode::Edge,
                    level: true,
                    destination,
                    format: if x2 {
                        DestinationFormat::X2Apic
                    } else {
                        DestinationFormat::XApic
                    },
                    shorthand: Shorthand::from_bits(sh),
                    source,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn resolve_never_panics_and_names_only_enabled_vcpus(
            m in arb_msg(),
            apics in prop::collection::vec(arb_apic(), 0..300),
        ) {
            let set = resolve(&m, &apics);
            for cpu in set.iter() {
                prop_assert!(cpu < apics.len().min(MAX_VCPUS));
                prop_assert!(apics[cpu].hw_enabled);
            }
        }

        #[test]
        fn lowest_priority_picks_at_most_one_lowest_ppr_match(
            m in arb_msg(),
            apics in prop::collection::vec(arb_apic(), 0..64),
        ) {
            let lp = InterruptMessage { delivery_mode: DeliveryMode::LowestPriority, ..m };
            let fixed = InterruptMessage { delivery_mode: DeliveryMode::Fixed, ..m };
            let matching = resolve(&fixed, &apics);
            let chosen = resolve(&lp, &apics);
            if is_physical_broadcast(&lp) {
                prop_assert_eq!(chosen, matching);
            } else {
                prop_assert!(chosen.len() <= 1);
                let candidates: Vec<usize> =
                    matching.iter().filter(|c| apics[*c].sw_enabled).collect();
                prop_assert_eq!(chosen.is_empty(), candidates.is_empty());
                for cpu in chosen.iter() {
                    prop_assert!(candidates.contains(&cpu));
                    let min = candidates.iter().map(|c| apics[*c].ppr).min();
                    prop_assert_eq!(Some(apics[cpu].ppr), min);
                }
            }
        }
    }
}
