//! Snapshot of the PIT, laid out so it maps onto KVM's `kvm_pit_state2`.

use serde::{Deserialize, Serialize};

use super::channel::{Access, ByteSeq, Channel};
use super::LostTickPolicy;

/// One counter's saved state. The first thirteen fields are KVM's
/// `kvm_pit_channel_state`, with KVM's encodings; the last two are ours.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PitChannelState {
    /// Initial count N as loaded, plain binary even in BCD mode: 1..=65536
    /// (a written 0 is 65536 in binary, 10000 in BCD). A count loaded in
    /// binary may stay above 10000 after a BCD control word until reloaded.
    pub count: u32,
    /// The count frozen by a latch command, as the guest reads it (BCD-encoded in BCD mode).
    pub latched_count: u16,
    /// Latched-count read sequence: 0 none, 1 LSB, 2 MSB, 3 word (LSB next), 4 word (MSB next).
    pub count_latched: u8,
    /// A read-back status byte is latched and will be read before any count.
    pub status_latched: bool,
    /// The latched status byte (valid while `status_latched`).
    pub status: u8,
    /// Read flip-flop for live reads: 1 LSB, 2 MSB, 3 word (LSB next), 4 word (MSB next).
    pub read_state: u8,
    /// Write flip-flop: 1 LSB, 2 MSB, 3 word (LSB next), 4 word (MSB next).
    pub write_state: u8,
    /// Low byte of a word write, held until the high byte arrives.
    pub write_latch: u8,
    /// Access mode from the control word: 1 LSB, 2 MSB, 3 LSB then MSB.
    pub rw_mode: u8,
    /// Counter mode 0..=5 (a programmed 6 or 7 is stored as 2 or 3).
    pub mode: u8,
    /// BCD counting.
    pub bcd: bool,
    /// Gate input level (counter 2: port 0x61 bit 0; counters 0 and 1 are tied high).
    pub gate: bool,
    /// Virtual time (ns) counting started at, shifted forward by any time the
    /// gate paused counting in modes 0 and 4.
    pub count_load_time: u64,
    /// Not in KVM: a control word was written and no complete count since, so
    /// the counter is not counting (status NULL bit). KVM states map to false.
    pub null_count: bool,
    /// Not in KVM: virtual time (ns) the gate last went low. Map to 0.
    pub gate_low_since_ns: u64,
}

/// Saved state of the whole PIT.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PitState {
    /// Counters 0, 1, 2.
    pub channels: [PitChannelState; 3],
    /// Port 0x61 bit 1 (speaker data), KVM's `speaker_data_on`.
    pub speaker_data_on: bool,
    /// Port 0x61 bits 3:2 as written (parity/channel check enables); only
    /// read back. Other bits must be zero.
    pub port61_check_enables: u8,
    /// Lost-tick policy for counter 0.
    pub policy: LostTickPolicy,
    /// Counter 0 expirations owed to the guest under reinject (KVM's `pending`).
    pub backlog: u32,
    /// An IRQ0 pulse was delivered and not yet acknowledged (KVM's `!irq_ack`).
    pub irq0_in_flight: bool,
    /// Virtual time (ns) the unacknowledged pulse went out (states saved
    /// before this field existed read 0: the pulse counts as long overdue).
    #[serde(default)]
    pub irq0_in_flight_since_ns: u64,
    /// `advance` calls that saw expiries since that pulse went out (older
    /// states read 0).
    #[serde(default)]
    pub irq0_in_flight_periods: u32,
    /// Virtual time (ns) from which the next owed tick may be delivered (the last ack).
    pub backlog_due_ns: u64,
    /// Virtual time (ns) counter 0's IRQ0 expirations are counted from
    /// (the count load, or the last expiry when the minimum period changed).
    pub irq0_epoch_ns: u64,
    /// Counter 0 expirations already counted since `irq0_epoch_ns`.
    pub irq0_expirations: u64,
}

/// An invalid restored state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PitError {
    /// The initial count is outside 1..=65536.
    #[error("counter {channel}: initial count {count} out of range")]
    InvalidCount {
        /// Counter index.
        channel: usize,
        /// The rejected count.
        count: u32,
    },
    /// The mode is not 0..=5.
    #[error("counter {channel}: mode {mode} is not 0-5")]
    InvalidMode {
        /// Counter index.
        channel: usize,
        /// The rejected mode.
        mode: u8,
    },
    /// An access mode or flip-flop field has no valid encoding.
    #[error("counter {channel}: {field} = {value} is not a valid encoding")]
    InvalidByteState {
        /// Counter index.
        channel: usize,
        /// Which field.
        field: &'static str,
        /// The rejected value.
        value: u8,
    },
    /// Port 0x61 check-enable bits outside bits 3:2.
    #[error("port 0x61 check enables {0:#x} has bits outside 3:2")]
    InvalidPort61(u8),
}

impl Channel {
    pub(super) fn to_state(&self) -> PitChannelState {
        PitChannelState {
            count: self.count,
            latched_count: self.latched_count,
            count_latched: self.count_latched.map_or(0, |s| s as u8),
            status_latched: self.status_latched,
            status: self.status,
            read_state: self.read_state as u8,
            write_state: self.write_state as u8,
            write_latch: self.write_latch,
            rw_mode: self.access as u8,
            mode: self.mode,
            bcd: self.bcd,
            gate: self.gate,
            count_load_time: self.count_load_time,
            null_count: self.null_count,
            gate_low_since_ns: self.gate_low_since,
        }
    }

    pub(super) fn from_state(channel: usize, s: &PitChannelState) -> Result<Self, PitError> {
        if s.count == 0 || s.count > 0x1_0000 {
            return Err(PitError::InvalidCount {
                channel,
                count: s.count,
            });
        }
        if s.mode > 5 {
            return Err(PitError::InvalidMode {
                channel,
                mode: s.mode,
            });
        }
        let seq = |field: &'static str, value: u8| {
            ByteSeq::from_u8(value).ok_or(PitError::InvalidByteState {
                channel,
                field,
                value,
            })
        };
        let count_latched = match s.count_latched {
            0 => None,
            v => Some(seq("count_latched", v)?),
        };
        let access = Access::from_bits(s.rw_mode).ok_or(PitError::InvalidByteState {
            channel,
            field: "rw_mode",
            value: s.rw_mode,
        })?;
        Ok(Self {
            count: s.count,
            latched_count: s.latched_count,
            count_latched,
            status_latched: s.status_latched,
            status: s.status,
            read_state: seq("read_state", s.read_state)?,
            write_state: seq("write_state", s.write_state)?,
            write_latch: s.write_latch,
            access,
            mode: s.mode,
            bcd: s.bcd,
            gate: s.gate,
            count_load_time: s.count_load_time,
            null_count: s.null_count,
            gate_low_since: s.gate_low_since_ns,
        })
    }
}
