//! One 8254 counter: programming, the read/write byte sequences, latches,
//! the counting element and the OUT pin, all computed from elapsed time.

use super::{ns_to_ticks, ControlWord};

/// Access mode from control word bits 5:4 (never 0 here: that is the latch
/// command). The discriminants are KVM's `rw_mode` encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Access {
    /// Low byte only.
    Lsb = 1,
    /// High byte only.
    Msb = 2,
    /// Low byte then high byte.
    Word = 3,
}

impl Access {
    pub(super) fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            1 => Some(Self::Lsb),
            2 => Some(Self::Msb),
            3 => Some(Self::Word),
            _ => None,
        }
    }
}

/// Position in a byte sequence (read flip-flop, write flip-flop or latched
/// count). The discriminants are KVM's `RW_STATE_*` encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ByteSeq {
    /// Low byte only.
    Lsb = 1,
    /// High byte only.
    Msb = 2,
    /// Word access, low byte next.
    WordLsb = 3,
    /// Word access, high byte next.
    WordMsb = 4,
}

impl ByteSeq {
    pub(super) fn start(access: Access) -> Self {
        match access {
            Access::Lsb => Self::Lsb,
            Access::Msb => Self::Msb,
            Access::Word => Self::WordLsb,
        }
    }

    pub(super) fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Lsb),
            2 => Some(Self::Msb),
            3 => Some(Self::WordLsb),
            4 => Some(Self::WordMsb),
            _ => None,
        }
    }
}

/// Modes in which a low gate suspends counting.
fn gate_enables_counting(mode: u8) -> bool {
    matches!(mode, 0 | 2 | 3 | 4)
}

/// Decode a written 16-bit count into the initial count N.
///
/// Count 0 stands for the counter's full range: 65536 in binary, 10000 in
/// BCD. Invalid BCD digits (A-F) are taken at their positional weight and the
/// result reduced modulo 10000, so any value gives a count in 1..=10000.
pub(super) fn decode_count(raw: u16, bcd: bool) -> u32 {
    if bcd {
        let [lo, hi] = raw.to_le_bytes();
        let digits = [hi >> 4, hi & 0xF, lo >> 4, lo & 0xF];
        let value = digits.iter().fold(0u32, |acc, d| acc * 10 + u32::from(*d)) % 10_000;
        if value == 0 {
            10_000
        } else {
            value
        }
    } else if raw == 0 {
        0x1_0000
    } else {
        u32::from(raw)
    }
}

/// Encode a counting-element value as the 16 bits a read returns.
fn encode_count(value: u64, bcd: bool) -> u16 {
    if bcd {
        let v = value % 10_000;
        let digits = [v / 1000, v / 100 % 10, v / 10 % 10, v % 10];
        digits.iter().fold(0u16, |acc, d| (acc << 4) | *d as u16)
    } else {
        // 65536 (count 0 just loaded) reads as 0, like the 16-bit hardware.
        value as u16
    }
}

/// Counting-element value in mode 3 at `phase` ticks into a period of `n`.
///
/// Even counts go N, N-2, .., 2 in each half. Odd counts take one extra
/// clock in the high half: N, N-1, N-3, .., 2 then N, N-3, .., 2.
fn square_wave_count(n: u64, phase: u64) -> u64 {
    let high_len = n.div_ceil(2);
    if n.is_multiple_of(2) {
        n - 2 * (phase % (n / 2))
    } else if phase < high_len {
        if phase == 0 {
            n
        } else {
            n + 1 - 2 * phase
        }
    } else {
        let q = phase - high_len;
        if q == 0 {
            n
        } else {
            n - 1 - 2 * q
        }
    }
}

/// One counter of the 8254.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Channel {
    /// Initial count N: 1..=65536 (a BCD load gives at most 10000).
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: Option<ByteSeq>,
    pub status_latched: bool,
    pub status: u8,
    pub read_state: ByteSeq,
    pub write_state: ByteSeq,
    pub write_latch: u8,
    pub access: Access,
    /// 0..=5; 6 and 7 are stored as 2 and 3.
    pub mode: u8,
    pub bcd: bool,
    pub gate: bool,
    /// Virtual time counting started at, shifted forward by gate pauses.
    pub count_load_time: u64,
    /// Control word written, no complete count since: not counting.
    pub null_count: bool,
    /// Virtual time the gate last went low.
    pub gate_low_since: u64,
}

impl Channel {
    /// Power-on state: mode 3, word access, not counting until programmed.
    pub(super) fn new(gate: bool) -> Self {
        Self {
            count: 0x1_0000,
            latched_count: 0,
            count_latched: None,
            status_latched: false,
            status: 0,
            read_state: ByteSeq::WordLsb,
            write_state: ByteSeq::WordLsb,
            write_latch: 0,
            access: Access::Word,
            mode: 3,
            bcd: false,
            gate,
            count_load_time: 0,
            null_count: true,
            gate_low_since: 0,
        }
    }

    /// Whether a low gate currently holds the counting element.
    fn paused(&self) -> bool {
        !self.gate && gate_enables_counting(self.mode)
    }

    /// Input clocks counted since the count was loaded.
    pub(super) fn elapsed_ticks(&self, now_ns: u64) -> u64 {
        let end = if self.paused() {
            now_ns.min(self.gate_low_since.max(self.count_load_time))
        } else {
            now_ns
        };
        ns_to_ticks(end.saturating_sub(self.count_load_time))
    }

    /// Counting-element value (before BCD/16-bit encoding).
    fn counting_element(&self, now_ns: u64) -> u64 {
        let n = u64::from(self.count.max(1));
        if self.null_count {
            // Not counting: the element holds the last loaded count.
            return n;
        }
        let d = self.elapsed_ticks(now_ns);
        match self.mode {
            2 => n - d % n,
            3 => square_wave_count(n, d % n),
            _ => {
                // One-shot modes keep counting down and wrap after terminal count.
                let modulus = if self.bcd { 10_000 } else { 0x1_0000 };
                (n % modulus + modulus - d % modulus) % modulus
            }
        }
    }

    /// The 16 bits a count read or latch returns now.
    fn read_value(&self, now_ns: u64) -> u16 {
        encode_count(self.counting_element(now_ns), self.bcd)
    }

    /// Level of the OUT pin now.
    pub(super) fn out(&self, now_ns: u64) -> bool {
        if self.null_count {
            // After a control word OUT is low in mode 0 and high otherwise.
            return self.mode != 0;
        }
        let n = u64::from(self.count.max(1));
        let d = self.elapsed_ticks(now_ns);
        match self.mode {
            0 | 1 => d >= n,
            // A low gate forces OUT high in the periodic modes.
            2 => !self.gate || d % n != n - 1,
            3 => !self.gate || d % n < n.div_ceil(2),
            // Modes 4 and 5: one clock low strobe at terminal count.
            _ => d != n,
        }
    }

    /// Status byte: OUT<<7 | NULL<<6 | rw<<4 | mode<<1 | bcd.
    fn status_byte(&self, now_ns: u64) -> u8 {
        u8::from(self.out(now_ns)) << 7
            | u8::from(self.null_count) << 6
            | (self.access as u8) << 4
            | self.mode << 1
            | u8::from(self.bcd)
    }

    /// Control word with a non-zero access field: set access, mode and BCD,
    /// reset both flip-flops and stop counting until a count is written.
    pub(super) fn program(&mut self, cw: ControlWord) {
        let Some(access) = Access::from_bits(cw.access()) else {
            return;
        };
        self.access = access;
        self.read_state = ByteSeq::start(access);
        self.write_state = ByteSeq::start(access);
        self.mode = cw.mode();
        self.bcd = cw.bcd();
        self.null_count = true;
    }

    /// Counter latch command; ignored while a latched count is unread.
    pub(super) fn latch_count(&mut self, now_ns: u64) {
        if self.count_latched.is_none() {
            self.latched_count = self.read_value(now_ns);
            self.count_latched = Some(ByteSeq::start(self.access));
        }
    }

    /// Read-back status latch; ignored while a latched status is unread.
    pub(super) fn latch_status(&mut self, now_ns: u64) {
        if !self.status_latched {
            self.status = self.status_byte(now_ns);
            self.status_latched = true;
        }
    }

    /// One byte from the counter port: latched status, then latched count,
    /// then the live count.
    pub(super) fn read(&mut self, now_ns: u64) -> u8 {
        if self.status_latched {
            self.status_latched = false;
            return self.status;
        }
        if let Some(seq) = self.count_latched {
            let [lo, hi] = self.latched_count.to_le_bytes();
            let (byte, next) = match seq {
                ByteSeq::Lsb => (lo, None),
                ByteSeq::Msb => (hi, None),
                // As KVM: after the low byte the latch reads like MSB-only.
                ByteSeq::WordLsb => (lo, Some(ByteSeq::Msb)),
                ByteSeq::WordMsb => (hi, None),
            };
            self.count_latched = next;
            return byte;
        }
        let [lo, hi] = self.read_value(now_ns).to_le_bytes();
        match self.read_state {
            ByteSeq::Lsb => lo,
            ByteSeq::Msb => hi,
            ByteSeq::WordLsb => {
                self.read_state = ByteSeq::WordMsb;
                lo
            }
            ByteSeq::WordMsb => {
                self.read_state = ByteSeq::WordLsb;
                hi
            }
        }
    }

    /// One byte to the counter port. Returns true when it completed a count,
    /// which is then loaded and counting (re)starts at `now_ns`.
    pub(super) fn write(&mut self, value: u8, now_ns: u64) -> bool {
        let raw = match self.write_state {
            ByteSeq::Lsb => u16::from(value),
            ByteSeq::Msb => u16::from(value) << 8,
            ByteSeq::WordLsb => {
                self.write_latch = value;
                self.write_state = ByteSeq::WordMsb;
                return false;
            }
            ByteSeq::WordMsb => {
                self.write_state = ByteSeq::WordLsb;
                u16::from_le_bytes([self.write_latch, value])
            }
        };
        self.count = decode_count(raw, self.bcd);
        self.count_load_time = now_ns;
        self.null_count = false;
        true
    }

    /// Drive the gate input. A rising edge restarts modes 1, 2, 3 and 5 and
    /// resumes modes 0 and 4 where they were paused.
    pub(super) fn set_gate(&mut self, level: bool, now_ns: u64) {
        if level == self.gate {
            return;
        }
        if !level {
            self.gate_low_since = now_ns;
        } else if !self.null_count {
            if gate_enables_counting(self.mode) && !matches!(self.mode, 2 | 3) {
                let paused_from = self.gate_low_since.max(self.count_load_time);
                let pause = now_ns.saturating_sub(paused_from);
                self.count_load_time = self.count_load_time.saturating_add(pause);
            } else {
                self.count_load_time = now_ns;
            }
        }
        self.gate = level;
    }
}
