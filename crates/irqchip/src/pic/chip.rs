//! One 8259A: its registers, the priority resolver and the command decoder.

/// A byte written to the command port with bit 4 set: Initialization Command Word 1.
#[derive(Clone, Copy, Debug)]
pub(super) struct Icw1(pub u8);

impl Icw1 {
    /// Bit 4 distinguishes ICW1 from OCW2/OCW3 on the command port.
    pub fn is_icw1(self) -> bool {
        self.0 & 0x10 != 0
    }
    /// IC4: an ICW4 follows.
    pub fn needs_icw4(self) -> bool {
        self.0 & 0x01 != 0
    }
    /// SNGL: single chip, so no ICW3 follows.
    pub fn single(self) -> bool {
        self.0 & 0x02 != 0
    }
}

/// Initialization Command Word 4 (data port, last step of init).
#[derive(Clone, Copy, Debug)]
pub(super) struct Icw4(pub u8);

impl Icw4 {
    /// AEOI: the INTA sequence ends the interrupt by itself.
    pub fn auto_eoi(self) -> bool {
        self.0 & 0x02 != 0
    }
    /// SFNM: special fully nested mode.
    pub fn special_fully_nested(self) -> bool {
        self.0 & 0x10 != 0
    }
}

/// The R/SL/EOI field of OCW2 (bits 7:5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ocw2Command {
    /// 000: stop rotating priority on auto-EOI.
    RotateInAutoEoiClear,
    /// 001: end the highest-priority interrupt in service.
    NonSpecificEoi,
    /// 010: no operation.
    Nop,
    /// 011: end the interrupt named in bits 2:0.
    SpecificEoi,
    /// 100: rotate priority on every auto-EOI.
    RotateInAutoEoiSet,
    /// 101: non-specific EOI, then make that level the lowest priority.
    RotateOnNonSpecificEoi,
    /// 110: make the level in bits 2:0 the lowest priority.
    SetPriority,
    /// 111: specific EOI, then make that level the lowest priority.
    RotateOnSpecificEoi,
}

/// Operation Command Word 2 (command port, bits 4:3 = 00).
#[derive(Clone, Copy, Debug)]
pub(super) struct Ocw2(pub u8);

impl Ocw2 {
    /// What to do.
    pub fn command(self) -> Ocw2Command {
        match self.0 >> 5 {
            0 => Ocw2Command::RotateInAutoEoiClear,
            1 => Ocw2Command::NonSpecificEoi,
            2 => Ocw2Command::Nop,
            3 => Ocw2Command::SpecificEoi,
            4 => Ocw2Command::RotateInAutoEoiSet,
            5 => Ocw2Command::RotateOnNonSpecificEoi,
            6 => Ocw2Command::SetPriority,
            _ => Ocw2Command::RotateOnSpecificEoi,
        }
    }
    /// L2:L0, the level a specific command names.
    pub fn level(self) -> u8 {
        self.0 & 7
    }
}

/// Operation Command Word 3 (command port, bits 4:3 = 01).
#[derive(Clone, Copy, Debug)]
pub(super) struct Ocw3(pub u8);

impl Ocw3 {
    /// Bit 3 (with bit 4 clear) distinguishes OCW3 from OCW2.
    pub fn is_ocw3(self) -> bool {
        self.0 & 0x08 != 0
    }
    /// P: the next read of this chip is a poll.
    pub fn poll(self) -> bool {
        self.0 & 0x04 != 0
    }
    /// RR/RIS: `Some(true)` selects ISR, `Some(false)` IRR, `None` keeps the selection.
    pub fn read_isr(self) -> Option<bool> {
        (self.0 & 0x02 != 0).then_some(self.0 & 0x01 != 0)
    }
    /// ESMM/SMM: `Some(on)` sets or clears special mask mode, `None` keeps it.
    pub fn special_mask(self) -> Option<bool> {
        (self.0 & 0x40 != 0).then_some(self.0 & 0x20 != 0)
    }
}

/// Where the chip is in its initialization sequence (KVM's `init_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum InitState {
    /// Initialized: the data port is OCW1 (IMR).
    #[default]
    Ready,
    /// ICW1 seen: the data port expects ICW2.
    Icw2,
    /// The data port expects ICW3.
    Icw3,
    /// The data port expects ICW4.
    Icw4,
}

impl InitState {
    /// KVM's encoding (0..=3).
    pub fn to_u8(self) -> u8 {
        match self {
            Self::Ready => 0,
            Self::Icw2 => 1,
            Self::Icw3 => 2,
            Self::Icw4 => 3,
        }
    }
    /// From KVM's encoding; `None` for values it never produces.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Ready),
            1 => Some(Self::Icw2),
            2 => Some(Self::Icw3),
            3 => Some(Self::Icw4),
            _ => None,
        }
    }
}

/// Bit for pin `pin` (0..8) of one chip.
pub(super) fn bit(pin: u8) -> u8 {
    1u8 << (pin & 7)
}

/// One 8259A. Field meanings follow KVM's `kvm_pic_state`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Chip {
    pub last_irr: u8,
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    pub priority_add: u8,
    pub irq_base: u8,
    pub read_reg_select: bool,
    pub poll: bool,
    pub special_mask: bool,
    pub init_state: InitState,
    pub auto_eoi: bool,
    pub rotate_on_auto_eoi: bool,
    pub special_fully_nested_mode: bool,
    pub init4: bool,
    pub single_mode: bool,
    pub elcr: u8,
    pub elcr_mask: u8,
    /// The master treats its cascade input specially in fully nested mode.
    pub is_master: bool,
}

impl Chip {
    pub fn new(is_master: bool, elcr_mask: u8) -> Self {
        Self {
            is_master,
            elcr_mask,
            ..Self::default()
        }
    }

    /// Rank (0 = highest) of the best-placed bit of `mask` under the current
    /// rotation, or `None` when `mask` is empty.
    fn best_rank(&self, mask: u8) -> Option<u8> {
        (0..8u8).find(|rank| mask & bit(rank.wrapping_add(self.priority_add)) != 0)
    }

    /// The pin this chip would hand to an INTA now: the highest-priority
    /// unmasked request that outranks everything still blocking in service.
    pub fn pending(&self) -> Option<u8> {
        let request = self.best_rank(self.irr & !self.imr)?;
        let mut blocking = self.isr;
        if self.special_fully_nested_mode && self.is_master {
            // The slave resolves its own nesting; let it interrupt through IR2.
            blocking &= !bit(2);
        }
        if self.special_mask {
            // Masked in-service levels stop blocking in special mask mode.
            blocking &= !self.imr;
        }
        let in_service = self.best_rank(blocking).unwrap_or(8);
        (request < in_service).then(|| request.wrapping_add(self.priority_add) & 7)
    }

    /// Drive input `pin`. Returns whether a new request was latched into IRR.
    pub fn set_input(&mut self, pin: u8, level: bool) -> bool {
        let mask = bit(pin);
        let was_pending = self.irr & mask != 0;
        if self.elcr & mask != 0 {
            // Level-sensitive: IRR is the line.
            if level {
                self.irr |= mask;
                self.last_irr |= mask;
            } else {
                self.irr &= !mask;
                self.last_irr &= !mask;
            }
            level && !was_pending
        } else if level {
            let rising = self.last_irr & mask == 0;
            self.last_irr |= mask;
            if rising {
                self.irr |= mask;
            }
            rising && !was_pending
        } else {
            self.last_irr &= !mask;
            false
        }
    }

    /// Clear an in-service bit; returns the ack mask (the bit if it was set).
    pub fn clear_isr(&mut self, pin: u8) -> u8 {
        let mask = bit(pin);
        let acked = self.isr & mask;
        self.isr &= !mask;
        acked
    }

    /// The INTA response for `pin`: move it to service, dropping an edge
    /// request (a level request stays while its line is high). Returns the
    /// ack mask (non-zero when auto-EOI ended it at once).
    pub fn intack(&mut self, pin: u8) -> u8 {
        let mask = bit(pin);
        self.isr |= mask;
        if self.elcr & mask == 0 {
            self.irr &= !mask;
        }
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = pin.wrapping_add(1) & 7;
            }
            return self.clear_isr(pin);
        }
        0
    }

    /// A byte on the command port (0x20 / 0xA0). Returns the ack mask.
    pub fn write_command(&mut self, value: u8) -> u8 {
        let icw1 = Icw1(value);
        if icw1.is_icw1() {
            return self.start_init(icw1);
        }
        let ocw3 = Ocw3(value);
        if ocw3.is_ocw3() {
            if ocw3.poll() {
                self.poll = true;
            }
            if let Some(isr) = ocw3.read_isr() {
                self.read_reg_select = isr;
            }
            if let Some(on) = ocw3.special_mask() {
                self.special_mask = on;
            }
            return 0;
        }
        self.write_ocw2(Ocw2(value))
    }

    /// ICW1: reset to the post-init defaults and wait for ICW2. Returns the
    /// ack mask: in-service levels ended and pending edges dropped, so ack
    /// listeners waiting on them (tick reinjection, resampling) are released.
    fn start_init(&mut self, icw1: Icw1) -> u8 {
        let dropped_edges = self.irr & !self.elcr;
        let acked = self.isr | dropped_edges;
        // Level requests stay: their lines are still high. Edges are forgotten.
        self.irr &= self.elcr;
        self.last_irr &= self.elcr;
        self.isr = 0;
        self.imr = 0;
        self.priority_add = 0;
        self.read_reg_select = false;
        self.poll = false;
        self.special_mask = false;
        // Without an ICW4 its functions are all zero; with one, ICW4 sets them.
        self.auto_eoi = false;
        self.special_fully_nested_mode = false;
        self.rotate_on_auto_eoi = false;
        self.init4 = icw1.needs_icw4();
        self.single_mode = icw1.single();
        self.init_state = InitState::Icw2;
        acked
    }

    fn write_ocw2(&mut self, ocw2: Ocw2) -> u8 {
        match ocw2.command() {
            Ocw2Command::RotateInAutoEoiClear => {
                self.rotate_on_auto_eoi = false;
                0
            }
            Ocw2Command::RotateInAutoEoiSet => {
                self.rotate_on_auto_eoi = true;
                0
            }
            Ocw2Command::Nop => 0,
            Ocw2Command::NonSpecificEoi | Ocw2Command::RotateOnNonSpecificEoi => {
                let Some(rank) = self.best_rank(self.isr) else {
                    return 0;
                };
                let pin = rank.wrapping_add(self.priority_add) & 7;
                if ocw2.command() == Ocw2Command::RotateOnNonSpecificEoi {
                    self.priority_add = pin.wrapping_add(1) & 7;
                }
                self.clear_isr(pin)
            }
            Ocw2Command::SpecificEoi => self.clear_isr(ocw2.level()),
            Ocw2Command::RotateOnSpecificEoi => {
                self.priority_add = ocw2.level().wrapping_add(1) & 7;
                self.clear_isr(ocw2.level())
            }
            Ocw2Command::SetPriority => {
                self.priority_add = ocw2.level().wrapping_add(1) & 7;
                0
            }
        }
    }

    /// A byte on the data port (0x21 / 0xA1): OCW1, or the next ICW.
    pub fn write_data(&mut self, value: u8) {
        match self.init_state {
            InitState::Ready => self.imr = value,
            InitState::Icw2 => {
                self.irq_base = value & 0xF8;
                self.init_state = if !self.single_mode {
                    InitState::Icw3
                } else if self.init4 {
                    InitState::Icw4
                } else {
                    InitState::Ready
                };
            }
            InitState::Icw3 => {
                // The cascade wiring is fixed (slave on master IR2, ID 2).
                self.init_state = if self.init4 {
                    InitState::Icw4
                } else {
                    InitState::Ready
                };
            }
            InitState::Icw4 => {
                let icw4 = Icw4(value);
                self.auto_eoi = icw4.auto_eoi();
                self.special_fully_nested_mode = icw4.special_fully_nested();
                self.init_state = InitState::Ready;
            }
        }
    }

    /// A read of the command port outside poll mode.
    pub fn read_command(&self) -> u8 {
        if self.read_reg_select {
            self.isr
        } else {
            self.irr
        }
    }

    /// A poll-mode read: acknowledge like an INTA and report the level.
    /// Returns (poll word, ack mask).
    pub fn poll_read(&mut self) -> (u8, u8) {
        self.poll = false;
        match self.pending() {
            Some(pin) => {
                let acked = self.intack(pin);
                (0x80 | pin, acked)
            }
            None => (0, 0),
        }
    }
}
