//! isa-debug-exit (QEMU `-device isa-debug-exit,iobase=0xf4,iosize=4`).
//!
//! Any write to the device asks the VMM to exit with status
//! `(value << 1) | 1`, where `value` is the little-endian value written (byte,
//! word or dword), truncated to an `i32` like QEMU's `exit()` argument.
//! Reads return 0.

use super::{le_value, PioAction, PioDevice};

/// The port the guests use.
pub const PORT: u16 = 0xF4;
/// Ports the device decodes (`iosize=4`).
pub const PORT_COUNT: u16 = 4;

/// The exit device; it has no state.
#[derive(Debug, Default, Clone, Copy)]
pub struct DebugExit;

/// The exit status QEMU reports for a written value.
pub fn exit_status(value: u64) -> i32 {
    ((value << 1) | 1) as u32 as i32
}

impl PioDevice for DebugExit {
    fn read(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _port: u16, data: &[u8]) -> PioAction {
        PioAction::Exit(exit_status(le_value(data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_write_exits_with_value_shifted_or_one() {
        assert_eq!(DebugExit.write(PORT, &[0]), PioAction::Exit(1));
        assert_eq!(DebugExit.write(PORT, &[1]), PioAction::Exit(3));
        assert_eq!(DebugExit.write(PORT, &[0x10]), PioAction::Exit(0x21));
    }

    #[test]
    fn word_and_dword_writes_use_the_whole_value() {
        assert_eq!(
            DebugExit.write(PORT, &[0x34, 0x12]),
            PioAction::Exit(0x2469)
        );
        assert_eq!(
            DebugExit.write(PORT, &[0xFF, 0xFF, 0xFF, 0xFF]),
            PioAction::Exit(-1),
            "(0xFFFFFFFF << 1) | 1 truncates to -1"
        );
    }

    #[test]
    fn any_decoded_port_exits() {
        assert_eq!(DebugExit.write(PORT + 3, &[2]), PioAction::Exit(5));
    }

    #[test]
    fn read_returns_zero() {
        let mut d = [0xAA; 4];
        DebugExit.read(PORT, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
