//! The 8259A programmable interrupt controller pair of the PC and its ELCR.
//!
//! The master sits at ports 0x20/0x21, the slave at 0xA0/0xA1 and is cascaded
//! on the master's IR2. The edge/level control registers (ELCR) of the PIIX/ICH
//! chipsets are at 0x4D0 (master) and 0x4D1 (slave). The master's INT output
//! ([`Pic::output`]) is what the BSP's LAPIC sees on LINT0; the CPU fetches
//! the vector with an INTA cycle ([`Pic::acknowledge`]).
//!
//! Choices where the references or the hardware leave room:
//! - **Poll word.** A poll-mode read returns `0x80 | level` when a request is
//!   pending and `0x00` when none is, as QEMU does. This is the word the
//!   8259A data sheet defines (bit 7 = I, "an interrupt is pending"; bits 2:0
//!   the level); KVM's bare level number cannot tell "IRQ 0" from "nothing".
//! - **Cascade input.** The master's IR2 latches the slave's INT output, as
//!   KVM and QEMU do: it is set whenever the slave has a request and cleared
//!   only by the INTA that takes it. A slave request that goes away before
//!   that (its line drops, the guest masks it) leaves the master requesting,
//!   and the INTA then yields the slave's spurious vector (slave base + 7)
//!   with master IR2 put in service, as the data sheet and the behaviour
//!   reference describe: the spurious IRQ 15 PC guests know.
//! - **Input line 2.** On a PC nothing but the slave drives the master's IR2
//!   (the ISA bus's IRQ 2 is wired to IRQ 9), so `set_irq(2, ..)` changes
//!   nothing and reports [`IrqStatus::Masked`].
//! - **ICW1 LTIM (bit 3)** is ignored: PC chipsets choose level mode per pin
//!   through the ELCR, as KVM and QEMU also do.
//! - **Single mode (ICW1 bit 1)** is honoured for the init sequence (no ICW3
//!   is expected), as QEMU does; KVM always waits for ICW3.
//! - **Acks on re-init.** ICW1 ends every in-service level and drops pending
//!   edges; both are reported by [`Pic::take_acked`] so that whoever waits
//!   for the acknowledgement of those IRQs (tick reinjection, level resample)
//!   is not left waiting forever. KVM does the same for the dropped edges.
//! - **Cascade acks.** The master's IRQ 2 (the cascade) is never reported by
//!   [`Pic::take_acked`]: no device sits on it.

mod chip;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::delivery::IrqStatus;
use chip::{bit, Chip, InitState};

/// Master command port (ICW1, OCW2, OCW3; reads IRR/ISR).
pub const MASTER_COMMAND: u16 = 0x20;
/// Master data port (ICW2-4, OCW1 = IMR).
pub const MASTER_DATA: u16 = 0x21;
/// Slave command port.
pub const SLAVE_COMMAND: u16 = 0xA0;
/// Slave data port.
pub const SLAVE_DATA: u16 = 0xA1;
/// ELCR for IRQ 0-7.
pub const ELCR_MASTER: u16 = 0x4D0;
/// ELCR for IRQ 8-15.
pub const ELCR_SLAVE: u16 = 0x4D1;

/// Master ELCR bits the guest may set: IRQ 0, 1 and 2 are always edge.
pub const MASTER_ELCR_MASK: u8 = 0xF8;
/// Slave ELCR bits the guest may set: IRQ 8 and 13 are always edge.
pub const SLAVE_ELCR_MASK: u8 = 0xDE;

/// The master input the slave's INT output drives.
const CASCADE_PIN: u8 = 2;

/// An invalid host request: a snapshot that no 8259A could be in.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PicError {
    /// `priority_add` names a level beyond 7.
    #[error("{chip} PIC: priority_add {value} is not a level 0..=7")]
    PriorityAdd {
        /// "master" or "slave".
        chip: &'static str,
        /// The rejected value.
        value: u8,
    },
    /// `init_state` is not one of KVM's four values.
    #[error("{chip} PIC: init_state {value} is not 0..=3")]
    InitState {
        /// "master" or "slave".
        chip: &'static str,
        /// The rejected value.
        value: u8,
    },
    /// `irq_base` has bits 2:0 set (ICW2 only stores bits 7:3).
    #[error("{chip} PIC: irq_base {value:#04x} is not a multiple of 8")]
    IrqBase {
        /// "master" or "slave".
        chip: &'static str,
        /// The rejected value.
        value: u8,
    },
    /// `elcr_mask` differs from the chipset's fixed mask, or `elcr` sets a bit outside it.
    #[error("{chip} PIC: elcr {elcr:#04x} / elcr_mask {elcr_mask:#04x} do not fit the fixed mask {expected:#04x}")]
    Elcr {
        /// "master" or "slave".
        chip: &'static str,
        /// The snapshot's ELCR.
        elcr: u8,
        /// The snapshot's ELCR mask.
        elcr_mask: u8,
        /// The mask this chipset has.
        expected: u8,
    },
}

/// Saved state of one 8259A: every field of KVM's `kvm_pic_state`, plus
/// `single_mode`, which KVM does not keep (false when converting from KVM).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicChipState {
    /// Input line levels as last driven (edge detection; follows the line for level pins).
    pub last_irr: u8,
    /// Interrupt request register.
    pub irr: u8,
    /// Interrupt mask register (OCW1).
    pub imr: u8,
    /// In-service register.
    pub isr: u8,
    /// Level that currently has the highest priority (0..=7; rotation).
    pub priority_add: u8,
    /// Vector base from ICW2 (bits 2:0 clear).
    pub irq_base: u8,
    /// A command-port read returns ISR (true) or IRR (false).
    pub read_reg_select: bool,
    /// The next read of this chip is a poll (OCW3 P bit).
    pub poll: bool,
    /// Special mask mode (OCW3 SMM).
    pub special_mask: bool,
    /// Init sequence position: 0 ready, 1 expects ICW2, 2 ICW3, 3 ICW4.
    pub init_state: u8,
    /// Auto-EOI mode (ICW4 bit 1).
    pub auto_eoi: bool,
    /// Rotate priority on auto-EOI (OCW2 commands 100/000).
    pub rotate_on_auto_eoi: bool,
    /// Special fully nested mode (ICW4 bit 4).
    pub special_fully_nested_mode: bool,
    /// The running init sequence includes ICW4 (ICW1 bit 0).
    pub init4: bool,
    /// The running init sequence skips ICW3 (ICW1 bit 1). Not in KVM's state.
    pub single_mode: bool,
    /// Edge/level control: a set bit makes that pin level-sensitive.
    pub elcr: u8,
    /// ELCR bits the guest can change (0xF8 master, 0xDE slave).
    pub elcr_mask: u8,
}

/// Saved state of the PIC pair.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    /// The master (IRQ 0-7).
    pub master: PicChipState,
    /// The slave (IRQ 8-15).
    pub slave: PicChipState,
    /// Acknowledgements not yet collected by [`Pic::take_acked`] (not in KVM's state; 0 from KVM).
    pub pending_acks: u16,
}

/// What an INTA cycle resolved to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inta {
    /// A real request, IRQ 0..16, and the vector the CPU receives.
    Irq(u8, u8),
    /// Nothing to deliver; the vector is the spurious one (master or slave base + 7).
    Spurious(u8),
}

/// The cascaded 8259A pair of a PC, with the ELCR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pic {
    master: Chip,
    slave: Chip,
    /// IRQs whose acknowledgement completed since the last `take_acked`.
    acked: u16,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// A pair as after power-on: uninitialized, nothing masked, all edge-triggered.
    pub fn new() -> Self {
        Self {
            master: Chip::new(true, MASTER_ELCR_MASK),
            slave: Chip::new(false, SLAVE_ELCR_MASK),
            acked: 0,
        }
    }

    /// Read an I/O port. Ports 0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1; any
    /// other port reads 0xFF. A poll-mode read is an acknowledge (on that chip only).
    pub fn read_port(&mut self, port: u16) -> u8 {
        let value = match port {
            MASTER_COMMAND | MASTER_DATA if self.master.poll => {
                let (word, acked) = self.master.poll_read();
                self.note_master_acks(acked);
                word
            }
            SLAVE_COMMAND | SLAVE_DATA if self.slave.poll => {
                let (word, acked) = self.slave.poll_read();
                self.note_slave_acks(acked);
                if word & 0x80 != 0 {
                    // The poll took the slave's request: the master's
                    // latched cascade request goes with it (as in KVM).
                    self.master.irr &= !bit(CASCADE_PIN);
                }
                word
            }
            MASTER_COMMAND => self.master.read_command(),
            MASTER_DATA => self.master.imr,
            SLAVE_COMMAND => self.slave.read_command(),
            SLAVE_DATA => self.slave.imr,
            ELCR_MASTER => self.master.elcr,
            ELCR_SLAVE => self.slave.elcr,
            _ => 0xFF,
        };
        self.update_cascade();
        value
    }

    /// Write an I/O port; writes to ports that are not ours are ignored.
    pub fn write_port(&mut self, port: u16, value: u8) {
        match port {
            MASTER_COMMAND => {
                let acked = self.master.write_command(value);
                self.note_master_acks(acked);
            }
            MASTER_DATA => self.master.write_data(value),
            SLAVE_COMMAND => {
                let acked = self.slave.write_command(value);
                self.note_slave_acks(acked);
            }
            SLAVE_DATA => self.slave.write_data(value),
            ELCR_MASTER => self.master.elcr = value & self.master.elcr_mask,
            ELCR_SLAVE => self.slave.elcr = value & self.slave.elcr_mask,
            _ => {}
        }
        self.update_cascade();
    }

    /// Drive input line `irq` (0..16; others ignored -> Masked). Edge inputs
    /// latch on a rising edge, level inputs (ELCR) follow the line.
    ///
    /// Reports [`IrqStatus::Masked`] if the IMR bit is set (or the line does
    /// not exist, including the cascade input 2), [`IrqStatus::Coalesced`]
    /// if raising it latched nothing new (already in IRR, or an edge line
    /// that was already high), else `Delivered(1)`; lowering an unmasked
    /// line reports `Delivered(1)`, as KVM does.
    pub fn set_irq(&mut self, irq: u8, level: bool) -> IrqStatus {
        if irq >= 16 || irq == CASCADE_PIN {
            return IrqStatus::Masked;
        }
        let pin = irq & 7;
        let chip = if irq < 8 {
            &mut self.master
        } else {
            &mut self.slave
        };
        let latched = chip.set_input(pin, level);
        let masked = chip.imr & bit(pin) != 0;
        self.update_cascade();
        if masked {
            IrqStatus::Masked
        } else if level && !latched {
            IrqStatus::Coalesced
        } else {
            IrqStatus::Delivered(1)
        }
    }

    /// The interrupt mask registers, slave in bits 15:8 (bit n = IRQ n masked).
    pub fn imr(&self) -> u16 {
        u16::from(self.slave.imr) << 8 | u16::from(self.master.imr)
    }

    /// The master's INT output (what LINT0 sees).
    pub fn output(&self) -> bool {
        self.master.pending().is_some()
    }

    /// INTA cycle: returns the vector the CPU receives (spurious base+7 when
    /// nothing is pending; for a slave spurious: slave base+7 and master IRQ2
    /// acknowledged). Performs auto-EOI where set.
    pub fn acknowledge(&mut self) -> u8 {
        match self.inta() {
            Inta::Irq(_, vector) | Inta::Spurious(vector) => vector,
        }
    }

    /// The INTA cycle, telling real requests from spurious ones.
    fn inta(&mut self) -> Inta {
        let result = match self.master.pending() {
            None => Inta::Spurious(self.master.irq_base | 7),
            Some(CASCADE_PIN) => {
                let acked = self.master.intack(CASCADE_PIN);
                self.note_master_acks(acked);
                match self.slave.pending() {
                    Some(pin) => {
                        let acked = self.slave.intack(pin);
                        self.note_slave_acks(acked);
                        Inta::Irq(pin + 8, self.slave.irq_base | pin)
                    }
                    None => Inta::Spurious(self.slave.irq_base | 7),
                }
            }
            Some(pin) => {
                let acked = self.master.intack(pin);
                self.note_master_acks(acked);
                Inta::Irq(pin, self.master.irq_base | pin)
            }
        };
        self.update_cascade();
        result
    }

    /// IRQs (bit n = IRQ n, 0..16) whose acknowledgement completed since the
    /// last call: an EOI that cleared their ISR bit, an INTA in auto-EOI
    /// mode, or a re-initialization (ICW1) that ended or dropped them. The
    /// cascade (IRQ 2) is never reported.
    pub fn take_acked(&mut self) -> u16 {
        std::mem::take(&mut self.acked)
    }

    /// Snapshot the pair.
    pub fn save(&self) -> PicState {
        PicState {
            master: save_chip(&self.master),
            slave: save_chip(&self.slave),
            pending_acks: self.acked,
        }
    }

    /// Restore a snapshot. It is taken as is (no re-evaluation of the
    /// cascade), so a KVM snapshot resumes exactly where KVM left it.
    pub fn restore(&mut self, state: &PicState) -> Result<(), PicError> {
        let master = restore_chip(&state.master, true, "master", MASTER_ELCR_MASK)?;
        let slave = restore_chip(&state.slave, false, "slave", SLAVE_ELCR_MASK)?;
        self.master = master;
        self.slave = slave;
        self.acked = state.pending_acks;
        Ok(())
    }

    fn note_master_acks(&mut self, acked: u8) {
        self.acked |= u16::from(acked & !bit(CASCADE_PIN));
    }

    fn note_slave_acks(&mut self, acked: u8) {
        self.acked |= u16::from(acked) << 8;
    }

    /// Carry the slave's INT output to the master's IR2, which latches it:
    /// a request the slave withdraws stays requested on the master until an
    /// INTA takes it (and then yields the slave's spurious vector).
    fn update_cascade(&mut self) {
        let slave_int = self.slave.pending().is_some();
        let mask = bit(CASCADE_PIN);
        if slave_int {
            self.master.irr |= mask;
            self.master.last_irr |= mask;
        } else {
            self.master.last_irr &= !mask;
        }
    }
}

fn save_chip(chip: &Chip) -> PicChipState {
    PicChipState {
        last_irr: chip.last_irr,
        irr: chip.irr,
        imr: chip.imr,
        isr: chip.isr,
        priority_add: chip.priority_add,
        irq_base: chip.irq_base,
        read_reg_select: chip.read_reg_select,
        poll: chip.poll,
        special_mask: chip.special_mask,
        init_state: chip.init_state.to_u8(),
        auto_eoi: chip.auto_eoi,
        rotate_on_auto_eoi: chip.rotate_on_auto_eoi,
        special_fully_nested_mode: chip.special_fully_nested_mode,
        init4: chip.init4,
        single_mode: chip.single_mode,
        elcr: chip.elcr,
        elcr_mask: chip.elcr_mask,
    }
}

fn restore_chip(
    state: &PicChipState,
    is_master: bool,
    name: &'static str,
    elcr_mask: u8,
) -> Result<Chip, PicError> {
    if state.priority_add > 7 {
        return Err(PicError::PriorityAdd {
            chip: name,
            value: state.priority_add,
        });
    }
    let init_state = InitState::from_u8(state.init_state).ok_or(PicError::InitState {
        chip: name,
        value: state.init_state,
    })?;
    if state.irq_base & 7 != 0 {
        return Err(PicError::IrqBase {
            chip: name,
            value: state.irq_base,
        });
    }
    if state.elcr_mask != elcr_mask || state.elcr & !elcr_mask != 0 {
        return Err(PicError::Elcr {
            chip: name,
            elcr: state.elcr,
            elcr_mask: state.elcr_mask,
            expected: elcr_mask,
        });
    }
    Ok(Chip {
        last_irr: state.last_irr,
        irr: state.irr,
        imr: state.imr,
        isr: state.isr,
        priority_add: state.priority_add,
        irq_base: state.irq_base,
        read_reg_select: state.read_reg_select,
        poll: state.poll,
        special_mask: state.special_mask,
        init_state,
        auto_eoi: state.auto_eoi,
        rotate_on_auto_eoi: state.rotate_on_auto_eoi,
        special_fully_nested_mode: state.special_fully_nested_mode,
        init4: state.init4,
        single_mode: state.single_mode,
        elcr: state.elcr,
        elcr_mask,
        is_master,
    })
}
