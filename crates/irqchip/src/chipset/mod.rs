//! The whole PC interrupt system wired together: GSI router, PIT, PIC pair,
//! IOAPIC and (in userspace mode) one local APIC per vCPU.
//!
//! Data flows one way, as on the board: a device raises a GSI through the
//! router; the router drives PIC and IOAPIC pins; the IOAPIC, MSI writes and
//! IPIs produce APIC bus messages that [`crate::delivery::resolve`] turns
//! into LAPICs; a LAPIC decides what its vCPU takes next. Effects the caller
//! must act on (kick a vCPU, forward a message to KVM's LAPICs, start an AP,
//! tell a resampler its line was acknowledged) come out as [`ChipEvent`]s
//! through [`Chipset::drain_events`].
//!
//! With [`LapicPlacement::External`] (KVM's split irqchip) there are no LAPIC
//! models here: APIC bus messages leave as [`ChipEvent::ExternalMessage`] and
//! EOIs come back through [`Chipset::ioapic_eoi`].

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::delivery::{
    resolve, ApicAddressing, ApicBus, DeliveryMode, DestinationFormat, DestinationMode,
    InterruptMessage, IrqStatus, Shorthand, TriggerMode,
};
use crate::inject::{Decision, PendingEvents};
use crate::ioapic::{Ioapic, IoapicVersion, IOAPIC_BASE, IOAPIC_PINS};
use crate::lapic::{Lapic, LapicConfig, StartupEvent};
use crate::msi::{MsiError, MsiMessage};
use crate::pic::Pic;
use crate::pit::{LostTickPolicy, Pit};
use crate::posted::{vectors, PostedInterrupts};
use crate::routing::{combine, LineLevels, PicChip, Route, RoutingError, RoutingTable, SourceId};
use crate::{RaiseGp, MAX_VCPUS};

/// Size of the IOAPIC and LAPIC MMIO pages.
const PAGE: u64 = 0x1000;

/// Where the local APICs live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LapicPlacement {
    /// Our LAPIC models (userspace irqchip).
    Model,
    /// The hypervisor's LAPICs (KVM split irqchip): messages leave as events.
    External,
}

/// How to build a [`Chipset`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChipsetConfig {
    /// Number of vCPUs (1..=MAX_VCPUS).
    pub vcpus: usize,
    /// Where the LAPICs live.
    pub lapics: LapicPlacement,
    /// IOAPIC version; 0x20 enables directed EOI and EOI-broadcast suppression.
    pub ioapic_version: IoapicVersion,
    /// Lost-tick policy of the PIT.
    pub pit_policy: LostTickPolicy,
    /// Guest TSC frequency, for TSC-deadline timers.
    pub tsc_hz: u64,
    /// Guest TSC value at virtual time 0.
    pub tsc_offset: u64,
}

/// Something the caller must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChipEvent {
    /// The vCPU may have something new to take: kick it if it runs guest
    /// code, wake it if it is halted.
    Kick(usize),
    /// Split mode: deliver this message through the hypervisor's LAPICs.
    ExternalMessage(InterruptMessage),
    /// INIT or SIPI reached a vCPU (userspace mode performs them).
    Startup {
        /// The target vCPU.
        vcpu: usize,
        /// What arrived.
        event: StartupEvent,
    },
    /// The guest acknowledged an interrupt that came from this GSI (an EOI
    /// for a level line, or the ack of an edge): resamplers re-check here.
    GsiAcked(u32),
}

/// Interrupts the chipset delivered, by where they came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryCounts {
    /// PIT ticks raised on GSI 0.
    pub pit: u64,
    /// Rising edges of each GSI 0..24 that reached a pin (GSI 0 excluded: see `pit`).
    pub gsi: [u64; IOAPIC_PINS],
    /// MSIs delivered.
    pub msi: u64,
    /// IPIs sent through an ICR or SELF_IPI.
    pub ipi: u64,
    /// LAPIC timer expirations.
    pub lapic_timer: u64,
    /// Interrupts taken from the PIC (ExtINT acknowledge cycles).
    pub pic_extint: u64,
    /// NMIs injected.
    pub nmi: u64,
}

/// Invalid host calls into the chipset.
#[derive(Debug, thiserror::Error)]
pub enum ChipsetError {
    /// The vCPU count is zero or above [`MAX_VCPUS`].
    #[error("vCPU count {0} is out of range 1..={MAX_VCPUS}")]
    BadVcpuCount(usize),
    /// A call named a vCPU that does not exist.
    #[error("no vCPU {0}")]
    NoSuchVcpu(usize),
    /// A call needs LAPIC models but this chipset has external LAPICs.
    #[error("the local APICs are not modelled here (split irqchip)")]
    ExternalLapics,
    /// An invalid routing table.
    #[error(transparent)]
    Routing(#[from] RoutingError),
    /// An invalid MSI.
    #[error(transparent)]
    Msi(#[from] MsiError),
}

/// The APIC bus as the devices see it.
struct Bus<'a> {
    lapics: &'a mut [Lapic],
    addressing: &'a mut [ApicAddressing],
    posted: &'a PostedInterrupts,
    extint: &'a mut [bool],
    events: &'a mut Vec<ChipEvent>,
    now_ns: u64,
}

impl ApicBus for Bus<'_> {
    fn deliver(&mut self, msg: &InterruptMessage) -> usize {
        if self.lapics.is_empty() {
            self.events.push(ChipEvent::ExternalMessage(*msg));
            return 1;
        }
        let mut accepted = 0;
        for cpu in resolve(msg, self.addressing).iter() {
            let Some(lapic) = self.lapics.get_mut(cpu) else {
                continue;
            };
            if !lapic.accept(msg, self.now_ns) {
                continue;
            }
            accepted += 1;
            match msg.delivery_mode {
                DeliveryMode::ExtInt => self.extint[cpu] = true,
                DeliveryMode::Init | DeliveryMode::StartUp => {
                    while let Some(event) = lapic.take_startup() {
                        self.events.push(ChipEvent::Startup { vcpu: cpu, event });
                    }
                }
                _ => {}
            }
            refresh(self.addressing, self.posted, cpu, lapic);
            self.events.push(ChipEvent::Kick(cpu));
        }
        accepted
    }
}

/// Brings the addressing cache and the posted-interrupt directory up to
/// date with `lapic`, vCPU `cpu`'s LAPIC.
fn refresh(
    addressing: &mut [ApicAddressing],
    posted: &PostedInterrupts,
    cpu: usize,
    lapic: &Lapic,
) {
    let a = lapic.addressing();
    if let Some(slot) = addressing.get_mut(cpu) {
        *slot = a;
    }
    posted.publish(cpu, a.apic_id, a.x2apic, a.hw_enabled);
}

/// The interrupt hardware of one PC.
pub struct Chipset {
    pit: Pit,
    pic: Pic,
    ioapic: Ioapic,
    lapics: Vec<Lapic>,
    /// `lapics[i].addressing()`, kept current so delivery needs no rebuild.
    addressing: Vec<ApicAddressing>,
    /// The lock-free door for device MSIs, and the APIC IDs it looks up.
    posted: Arc<PostedInterrupts>,
    /// An ExtINT message (not the LINT0 wire) is waiting for each vCPU.
    extint: Vec<bool>,
    /// External LAPICs (split mode) whose LVT0 the caller saw in NMI mode,
    /// by APIC ID, for the NMI watchdog.
    external_lvt0_nmi: Vec<u32>,
    routing: RoutingTable,
    levels: LineLevels,
    /// Level sources lowered by the guest's acknowledgement of their GSI
    /// (see [`Chipset::set_resample`]). Few entries; scanned only on an ack.
    resample: Vec<(u32, SourceId)>,
    events: Vec<ChipEvent>,
    counts: DeliveryCounts,
    vcpus: usize,
}

impl Chipset {
    /// Build a chipset with the default PC routing table.
    pub fn new(config: ChipsetConfig) -> Result<Self, ChipsetError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(ChipsetError::BadVcpuCount(config.vcpus));
        }
        let lapics: Vec<Lapic> = match config.lapics {
            LapicPlacement::External => Vec::new(),
            LapicPlacement::Model => (0..config.vcpus)
                .map(|i| {
                    Lapic::new(LapicConfig {
                        vcpu_index: i,
                        apic_id: i as u32,
                        bsp: i == 0,
                        directed_eoi: config.ioapic_version == IoapicVersion::V20,
                        tsc_hz: config.tsc_hz,
                        tsc_offset: config.tsc_offset,
                    })
                })
                .collect(),
        };
        let addressing: Vec<ApicAddressing> = lapics.iter().map(Lapic::addressing).collect();
        let posted = PostedInterrupts::new(config.vcpus, config.lapics == LapicPlacement::External);
        for (cpu, a) in addressing.iter().enumerate() {
            posted.publish(cpu, a.apic_id, a.x2apic, a.hw_enabled);
        }
        let mut pit = Pit::new();
        pit.set_policy(config.pit_policy);
        // Our own LAPICs never lose an EOI; an external one may hold it back.
        pit.set_give_up_lost_acks(matches!(config.lapics, LapicPlacement::External));
        Ok(Self {
            pit,
            pic: Pic::new(),
            ioapic: Ioapic::new(config.ioapic_version),
            extint: vec![false; lapics.len()],
            external_lvt0_nmi: Vec::new(),
            lapics,
            addressing,
            posted: Arc::new(posted),
            routing: RoutingTable::default_pc(),
            levels: LineLevels::new(),
            resample: Vec::new(),
            events: Vec::new(),
            counts: DeliveryCounts::default(),
            vcpus: config.vcpus,
        })
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    /// Whether the LAPICs are modelled here.
    pub fn has_lapics(&self) -> bool {
        !self.lapics.is_empty()
    }

    /// Take the events produced so far.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, ChipEvent> {
        self.events.drain(..)
    }

    /// Interrupts delivered so far, by origin.
    pub fn counts(&self) -> DeliveryCounts {
        self.counts
    }

    /// The PIT, for inspection and snapshots.
    pub fn pit(&self) -> &Pit {
        &self.pit
    }

    /// The PIT, for configuration (policy, minimum period) and snapshots.
    pub fn pit_mut(&mut self) -> &mut Pit {
        &mut self.pit
    }

    /// The PIC pair, for inspection and snapshots.
    pub fn pic(&self) -> &Pic {
        &self.pic
    }

    /// The PIC pair, for snapshots.
    pub fn pic_mut(&mut self) -> &mut Pic {
        &mut self.pic
    }

    /// The IOAPIC, for inspection (split mode mirrors its RTEs) and snapshots.
    pub fn ioapic(&self) -> &Ioapic {
        &self.ioapic
    }

    /// The IOAPIC, for snapshots.
    pub fn ioapic_mut(&mut self) -> &mut Ioapic {
        &mut self.ioapic
    }

    /// One vCPU's LAPIC model.
    pub fn lapic(&self, vcpu: usize) -> Result<&Lapic, ChipsetError> {
        self.check_lapic(vcpu)?;
        Ok(&self.lapics[vcpu])
    }

    /// One vCPU's LAPIC model, mutable (snapshots, TPR/CR8 sync). The
    /// addressing cache is refreshed on the next chipset call touching it.
    pub fn lapic_mut(&mut self, vcpu: usize) -> Result<&mut Lapic, ChipsetError> {
        self.check_lapic(vcpu)?;
        Ok(&mut self.lapics[vcpu])
    }

    /// The routing table in force.
    pub fn routing(&self) -> &RoutingTable {
        &self.routing
    }

    /// Replace the whole routing table (validated by [`RoutingTable::new`]).
    pub fn set_routing(&mut self, table: RoutingTable) {
        self.routing = table;
    }

    /// What every modelled LAPIC's periodic timer does with missed periods.
    pub fn set_lapic_timer_policy(&mut self, policy: LostTickPolicy) {
        for lapic in &mut self.lapics {
            lapic.set_timer_policy(policy);
        }
    }

    /// Makes `source`'s level on `gsi` a resampled one (`on`), or an
    /// ordinary one again. When the guest acknowledges the GSI (IOAPIC EOI
    /// of a pin it is routed to, or a PIC EOI), the chipset lowers that
    /// source *before* the IOAPIC looks at the line again, so a device that
    /// no longer needs service gets no second interrupt; the
    /// [`ChipEvent::GsiAcked`] that follows tells the device to re-assert if
    /// it still does. This is KVM's irqfd resampler, done in the ack path.
    pub fn set_resample(&mut self, gsi: u32, source: SourceId, on: bool) {
        self.resample.retain(|&entry| entry != (gsi, source));
        if on {
            self.resample.push((gsi, source));
        }
    }

    /// Lowers every resampled source of a GSI routed to one of these PIC
    /// IRQs or IOAPIC pins.
    fn lower_resampled(&mut self, pic_irqs: u16, ioapic_pins: u32, now_ns: u64) {
        for i in 0..self.resample.len() {
            let (gsi, source) = self.resample[i];
            let acked = self.routing.gsi_acked(gsi, pic_irqs, ioapic_pins);
            if acked && self.levels.source_level(gsi, source) {
                self.set_gsi(gsi, source, false, now_ns);
            }
        }
    }

    /// An EOI for `vector` is about to reach the IOAPIC: lower the resampled
    /// sources of the pins it acknowledges first (KVM runs its ack notifiers
    /// before it redelivers a still-asserted pin).
    fn resample_before_ioapic_eoi(&mut self, vector: u8, now_ns: u64) {
        if !self.resample.is_empty() {
            let pins = self.ioapic.pins_with_vector(vector);
            self.lower_resampled(0, pins, now_ns);
        }
    }

    fn check_lapic(&self, vcpu: usize) -> Result<(), ChipsetError> {
        if self.lapics.is_empty() {
            return Err(ChipsetError::ExternalLapics);
        }
        if vcpu >= self.lapics.len() {
            return Err(ChipsetError::NoSuchVcpu(vcpu));
        }
        Ok(())
    }

    fn bus(&mut self, now_ns: u64) -> (Bus<'_>, &mut Ioapic) {
        (
            Bus {
                lapics: &mut self.lapics,
                addressing: &mut self.addressing,
                posted: &self.posted,
                extint: &mut self.extint,
                events: &mut self.events,
                now_ns,
            },
            &mut self.ioapic,
        )
    }

    /// Set `gsi`'s level as seen from `source`; the line is the OR of all its
    /// sources. Returns what KVM's `KVM_IRQ_LINE_STATUS` would.
    pub fn set_gsi(&mut self, gsi: u32, source: SourceId, level: bool, now_ns: u64) -> IrqStatus {
        let was = self.levels.level(gsi);
        let line = self.levels.set(gsi, source, level);
        // Indexing (rather than copying the routes out) keeps this path free
        // of allocation; the table cannot change while we drive it.
        let n_routes = self.routing.routes(gsi).len();
        let status = combine((0..n_routes).map(|i| {
            let route = self.routing.routes(gsi)[i];
            self.drive_route(route, line, line && !was, now_ns)
        }));
        if line && !was && matches!(status, IrqStatus::Delivered(_)) {
            if let Some(n) = self.counts.gsi.get_mut(gsi as usize) {
                *n += 1;
            }
        }
        self.collect_acks(now_ns);
        status
    }

    /// Set one chip input of a GSI to the line's new level.
    fn drive_route(&mut self, route: Route, line: bool, rising: bool, now_ns: u64) -> IrqStatus {
        match route {
            Route::Pic { chip, pin } => {
                let irq = match chip {
                    PicChip::Master => pin,
                    PicChip::Slave => pin + 8,
                };
                let status = self.pic.set_irq(irq, line);
                self.pic_output_changed();
                status
            }
            Route::Ioapic { pin } => {
                let (mut bus, ioapic) = self.bus(now_ns);
                ioapic.set_irq(usize::from(pin), line, now_ns, &mut bus)
            }
            // An MSI route fires on the rising edge only, as KVM does.
            Route::Msi(msi) if rising => self.deliver_msi(msi, now_ns),
            Route::Msi(_) => IrqStatus::Masked,
        }
    }

    /// Deliver an MSI written by a device.
    pub fn send_msi(&mut self, msi: MsiMessage, now_ns: u64) -> Result<IrqStatus, ChipsetError> {
        let msg = msi.decode()?;
        Ok(self.deliver_message(&msg, now_ns))
    }

    /// The door device threads post MSIs through without this chipset's
    /// lock ([`crate::posted`]). An owner that hands it out must call
    /// [`Chipset::accept_posted`] whenever it takes its lock, before it looks
    /// at or changes the LAPICs.
    pub fn posted(&self) -> Arc<PostedInterrupts> {
        self.posted.clone()
    }

    /// Accepts every vector posted through [`Chipset::posted`] since the
    /// last call into the target LAPICs, as their bus messages would be.
    pub fn accept_posted(&mut self, now_ns: u64) {
        self.counts.msi += self.posted.take_count();
        if !self.posted.take_any() {
            return;
        }
        for cpu in 0..self.posted.vcpus() {
            let Some(words) = self.posted.take(cpu) else {
                continue;
            };
            let Some(lapic) = self.lapics.get_mut(cpu) else {
                continue;
            };
            let mut msg = InterruptMessage {
                vector: 0,
                delivery_mode: DeliveryMode::Fixed,
                destination_mode: DestinationMode::Physical,
                trigger_mode: TriggerMode::Edge,
                level: true,
                destination: lapic.addressing().apic_id,
                format: DestinationFormat::XApic,
                shorthand: Shorthand::None,
                source: None,
            };
            for vector in vectors(words) {
                msg.vector = vector;
                lapic.accept(&msg, now_ns);
            }
        }
    }

    fn deliver_msi(&mut self, msi: MsiMessage, now_ns: u64) -> IrqStatus {
        match msi.decode() {
            Ok(msg) => self.deliver_message(&msg, now_ns),
            Err(_) => IrqStatus::Masked,
        }
    }

    fn deliver_message(&mut self, msg: &InterruptMessage, now_ns: u64) -> IrqStatus {
        let (mut bus, _) = self.bus(now_ns);
        let n = bus.deliver(msg);
        self.counts.msi += 1;
        if n == 0 {
            IrqStatus::Masked
        } else {
            IrqStatus::Delivered(n)
        }
    }

    /// The PIC's output changed: the vCPUs whose LINT0 takes it need a look.
    fn pic_output_changed(&mut self) {
        if !self.pic.output() {
            return;
        }
        if self.lapics.is_empty() {
            // Split mode: KVM's LAPIC decides; the BSP takes ExtINT via KVM_INTERRUPT.
            self.events.push(ChipEvent::Kick(0));
            return;
        }
        for (cpu, lapic) in self.lapics.iter().enumerate() {
            if lapic.accepts_pic_interrupts() {
                self.events.push(ChipEvent::Kick(cpu));
            }
        }
    }

    /// Turn PIC and IOAPIC acknowledgements into PIT acks and events.
    fn collect_acks(&mut self, now_ns: u64) {
        let pic_acked = self.pic.take_acked();
        let ioapic_acked = self.ioapic.take_acked_pins();
        self.ack_pins(pic_acked, ioapic_acked, now_ns);
    }

    /// The guest acknowledged what came in through these chip pins.
    fn ack_pins(&mut self, pic_irqs: u16, ioapic_pins: u32, now_ns: u64) {
        if pic_irqs == 0 && ioapic_pins == 0 {
            return;
        }
        if !self.resample.is_empty() {
            // Lowering a line acknowledges nothing, so this cannot recurse
            // further than once.
            self.lower_resampled(pic_irqs, ioapic_pins, now_ns);
        }
        for gsi in self.routing.gsis_acked(pic_irqs, ioapic_pins) {
            if gsi == 0 {
                self.pit.irq0_acked(now_ns);
            }
            self.events.push(ChipEvent::GsiAcked(gsi));
        }
    }

    /// An EOI for `vector` from the LAPICs: KVM's `KVM_EXIT_IOAPIC_EOI` in
    /// split mode, or a LAPIC's EOI broadcast here.
    pub fn ioapic_eoi(&mut self, vector: u8, now_ns: u64) {
        self.resample_before_ioapic_eoi(vector, now_ns);
        let (mut bus, ioapic) = self.bus(now_ns);
        ioapic.eoi(vector, now_ns, &mut bus);
        self.collect_acks(now_ns);
    }

    /// An EOI from a LAPIC outside the chipset (split mode), which reports
    /// every EOI of a vector an IOAPIC pin uses. `broadcast` is false when
    /// that LAPIC suppresses EOI broadcasts (SVR bit 12): then level pins
    /// keep remote IRR until a directed EOI, and only the edge pins with the
    /// vector are acknowledged, as for a modelled LAPIC.
    pub fn external_lapic_eoi(&mut self, vector: u8, broadcast: bool, now_ns: u64) {
        if broadcast {
            self.ioapic_eoi(vector, now_ns);
        } else {
            self.edge_eoi(vector, now_ns);
        }
    }

    /// An edge interrupt's EOI is not broadcast to the IOAPIC, but it still
    /// acknowledges the pins using that vector (KVM's ack notifiers see it
    /// too): this is how PIT ticks through the IOAPIC count as taken.
    fn edge_eoi(&mut self, vector: u8, now_ns: u64) {
        let pins = self.ioapic.edge_pins_with_vector(vector);
        self.ack_pins(0, pins, now_ns);
    }

    /// Port I/O read; returns false if the port is not the chipset's.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8], now_ns: u64) -> bool {
        let value = match port {
            0x20 | 0x21 | 0xA0 | 0xA1 | 0x4D0 | 0x4D1 => {
                let v = self.pic.read_port(port);
                // A poll-mode read is an acknowledge.
                self.collect_acks(now_ns);
                v
            }
            0x40..=0x43 | 0x61 => self.pit.read_port(port, now_ns),
            _ => return false,
        };
        if let Some((first, rest)) = data.split_first_mut() {
            *first = value;
            rest.fill(0xFF);
        }
        true
    }

    /// Port I/O write; returns false if the port is not the chipset's.
    pub fn pio_write(&mut self, port: u16, data: &[u8], now_ns: u64) -> bool {
        let Some(&value) = data.first() else {
            return matches!(
                port,
                0x20 | 0x21 | 0xA0 | 0xA1 | 0x4D0 | 0x4D1 | 0x40..=0x43 | 0x61
            );
        };
        match port {
            0x20 | 0x21 | 0xA0 | 0xA1 | 0x4D0 | 0x4D1 => {
                let irq0_masked = self.pic.imr() & 1 != 0;
                self.pic.write_port(port, value);
                if irq0_masked && self.pic.imr() & 1 == 0 {
                    // Unmasking the PIT's pin drops the stale backlog, as KVM does.
                    self.pit.clear_backlog();
                }
                self.pic_output_changed();
                self.collect_acks(now_ns);
            }
            0x40..=0x43 | 0x61 => self.pit.write_port(port, value, now_ns),
            _ => return false,
        }
        true
    }

    /// Whether `addr` is the IOAPIC page or `vcpu`'s LAPIC page.
    pub fn claims_mmio(&self, vcpu: usize, addr: u64) -> bool {
        (IOAPIC_BASE..IOAPIC_BASE + PAGE).contains(&addr) || self.lapic_page(vcpu, addr).is_some()
    }

    fn lapic_page(&self, vcpu: usize, addr: u64) -> Option<u64> {
        let lapic = self.lapics.get(vcpu)?;
        let base = lapic.apic_base() & !0xFFF;
        (base..base + PAGE).contains(&addr).then(|| addr - base)
    }

    /// MMIO read from `vcpu`; returns false if the address is not ours.
    pub fn mmio_read(&mut self, vcpu: usize, addr: u64, data: &mut [u8], now_ns: u64) -> bool {
        if let Some(offset) = self.lapic_page(vcpu, addr) {
            self.lapics[vcpu].mmio_read(offset, data, now_ns);
            return true;
        }
        if (IOAPIC_BASE..IOAPIC_BASE + PAGE).contains(&addr) {
            self.ioapic.mmio_read(addr - IOAPIC_BASE, data);
            return true;
        }
        false
    }

    /// MMIO write from `vcpu`; returns false if the address is not ours.
    pub fn mmio_write(&mut self, vcpu: usize, addr: u64, data: &[u8], now_ns: u64) -> bool {
        if let Some(offset) = self.lapic_page(vcpu, addr) {
            let effects = self.lapics[vcpu].mmio_write(offset, data, now_ns);
            self.lapic_effects(vcpu, effects, now_ns);
            return true;
        }
        if (IOAPIC_BASE..IOAPIC_BASE + PAGE).contains(&addr) {
            if let Some(vector) = self.ioapic.directed_eoi(addr - IOAPIC_BASE, data) {
                self.resample_before_ioapic_eoi(vector, now_ns);
            }
            let pit_pin_masked = self.pit_pin_masked();
            let (mut bus, ioapic) = self.bus(now_ns);
            ioapic.mmio_write(addr - IOAPIC_BASE, data, now_ns, &mut bus);
            if pit_pin_masked && !self.pit_pin_masked() {
                // Unmasking the PIT's pin drops the stale backlog, as KVM does.
                self.pit.clear_backlog();
            }
            self.collect_acks(now_ns);
            return true;
        }
        false
    }

    fn pit_pin_masked(&self) -> bool {
        self.routing.routes(0).iter().all(|route| match route {
            Route::Ioapic { pin } => self
                .ioapic
                .entry_message(usize::from(*pin))
                .is_none_or(|(_, masked)| masked),
            _ => true,
        })
    }

    /// MSR read from `vcpu` (APIC_BASE, TSC_DEADLINE, x2APIC registers).
    pub fn msr_read(&mut self, vcpu: usize, msr: u32, now_ns: u64) -> Result<u64, RaiseGp> {
        match self.lapics.get_mut(vcpu) {
            Some(lapic) => lapic.msr_read(msr, now_ns),
            None => Err(RaiseGp),
        }
    }

    /// MSR write from `vcpu`.
    pub fn msr_write(
        &mut self,
        vcpu: usize,
        msr: u32,
        value: u64,
        now_ns: u64,
    ) -> Result<(), RaiseGp> {
        let Some(lapic) = self.lapics.get_mut(vcpu) else {
            return Err(RaiseGp);
        };
        let effects = lapic.msr_write(msr, value, now_ns)?;
        self.lapic_effects(vcpu, effects, now_ns);
        Ok(())
    }

    /// Whether `vcpu`'s interrupt in service may be ended by a paravirtual
    /// EOI: an edge vector, nothing pending in its IRR, and no IOAPIC pin
    /// using the vector (those EOIs feed PIT reinjection and resampling,
    /// which should not wait for the next exit). KVM's rule too.
    pub fn pv_eoi_allowed(&self, vcpu: usize) -> bool {
        let Some(lapic) = self.lapics.get(vcpu) else {
            return false;
        };
        lapic.pv_eoi_allowed()
            && lapic
                .highest_in_service()
                .is_some_and(|v| self.ioapic.pins_with_vector(v) == 0)
    }

    /// The guest ended `vcpu`'s interrupt in service through the
    /// paravirtual EOI flag: the same as an EOI register write.
    pub fn pv_eoi(&mut self, vcpu: usize, now_ns: u64) {
        let Some(lapic) = self.lapics.get_mut(vcpu) else {
            return;
        };
        let effects = lapic.pv_eoi();
        self.lapic_effects(vcpu, effects, now_ns);
    }

    fn lapic_effects(&mut self, vcpu: usize, effects: crate::lapic::LapicEffects, now_ns: u64) {
        if let Some(lapic) = self.lapics.get(vcpu) {
            refresh(&mut self.addressing, &self.posted, vcpu, lapic);
        }
        if let Some(eoi) = effects.eoi {
            if eoi.broadcast {
                self.ioapic_eoi(eoi.vector, now_ns);
            } else if !eoi.level {
                self.edge_eoi(eoi.vector, now_ns);
            }
        }
        if let Some(ipi) = effects.ipi {
            self.counts.ipi += 1;
            let (mut bus, _) = self.bus(now_ns);
            bus.deliver(&ipi);
        }
        // A TPR or ISR change can make an IRR vector deliverable.
        self.events.push(ChipEvent::Kick(vcpu));
    }

    /// When [`Chipset::advance`] must next be called (None: no timer armed).
    pub fn next_deadline(&self) -> Option<u64> {
        let lapics = self.lapics.iter().filter_map(Lapic::next_deadline);
        [self.pit.next_deadline(), self.ioapic.next_deadline()]
            .into_iter()
            .flatten()
            .chain(lapics)
            .min()
    }

    /// Run every timer that is due at `now_ns`.
    pub fn advance(&mut self, now_ns: u64) {
        if self.pit.advance(now_ns) {
            self.counts.pit += 1;
            self.set_gsi(0, SourceId::PIT, true, now_ns);
            self.set_gsi(0, SourceId::PIT, false, now_ns);
            self.nmi_watchdog();
        }
        {
            let (mut bus, ioapic) = self.bus(now_ns);
            ioapic.advance(now_ns, &mut bus);
        }
        for cpu in 0..self.lapics.len() {
            let lapic = &mut self.lapics[cpu];
            if lapic.next_deadline().is_some_and(|d| d <= now_ns) {
                lapic.advance(now_ns);
                self.counts.lapic_timer += 1;
                self.events.push(ChipEvent::Kick(cpu));
            }
        }
        self.collect_acks(now_ns);
    }

    /// With external LAPICs: the caller saw the LAPIC with `apic_id` set
    /// its LVT0 to NMI mode (`on`) or leave it; the NMI watchdog then sends
    /// it each PIT tick as an NMI message.
    pub fn set_external_lvt0_nmi(&mut self, apic_id: u32, on: bool) {
        self.external_lvt0_nmi.retain(|&id| id != apic_id);
        if on {
            self.external_lvt0_nmi.push(apic_id);
        }
    }

    /// Virtual-wire NMI watchdog: each PIT tick is also an NMI to every vCPU
    /// whose LVT0 is in NMI mode.
    fn nmi_watchdog(&mut self) {
        for &apic_id in &self.external_lvt0_nmi {
            self.events
                .push(ChipEvent::ExternalMessage(InterruptMessage {
                    vector: 0,
                    delivery_mode: DeliveryMode::Nmi,
                    destination_mode: DestinationMode::Physical,
                    trigger_mode: TriggerMode::Edge,
                    level: true,
                    destination: apic_id,
                    format: DestinationFormat::X2Apic,
                    shorthand: Shorthand::None,
                    source: None,
                }));
        }
        for (cpu, lapic) in self.lapics.iter_mut().enumerate() {
            if lapic.lvt0_is_nmi() {
                lapic.set_lint(0, true);
                lapic.set_lint(0, false);
                self.events.push(ChipEvent::Kick(cpu));
            }
        }
    }

    /// What `vcpu` could take now (userspace mode), or, with external
    /// LAPICs, whether the PIC has an interrupt for the BSP.
    pub fn pending(&self, vcpu: usize) -> PendingEvents {
        match self.lapics.get(vcpu) {
            Some(lapic) => PendingEvents {
                nmi: lapic.nmi_pending(),
                extint: self.extint[vcpu] || (lapic.accepts_pic_interrupts() && self.pic.output()),
                vector: lapic.highest_deliverable(),
            },
            None => PendingEvents {
                nmi: false,
                extint: vcpu == 0 && self.lapics.is_empty() && self.pic.output(),
                vector: None,
            },
        }
    }

    /// Perform the acknowledge cycle for what [`crate::inject::decide`]
    /// chose; returns the vector to inject (None for an NMI or nothing).
    pub fn acknowledge(&mut self, vcpu: usize, decision: Decision, now_ns: u64) -> Option<u8> {
        let vector = match decision {
            Decision::InjectNmi => {
                let lapic = self.lapics.get_mut(vcpu)?;
                if lapic.take_nmi() {
                    self.counts.nmi += 1;
                }
                None
            }
            Decision::InjectExtInt => {
                if let Some(flag) = self.extint.get_mut(vcpu) {
                    *flag = false;
                }
                self.counts.pic_extint += 1;
                Some(self.pic.acknowledge())
            }
            Decision::InjectVector(_) => {
                let lapic = self.lapics.get_mut(vcpu)?;
                let v = lapic.acknowledge();
                refresh(&mut self.addressing, &self.posted, vcpu, lapic);
                v
            }
            Decision::RequestWindow | Decision::Idle => None,
        };
        self.collect_acks(now_ns);
        vector
    }
}

#[cfg(test)]
mod tests;
