//! The parts of the multiboot v1 info block the guests use, copied out early
//! because the block may sit in low memory the runtime reuses later.

use crate::arch::{phys_u32, phys_u8};

/// Magic value in EAX at a multiboot entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
const CMDLINE_MAX: usize = 256;

/// Copied multiboot information.
#[derive(Clone, Copy, Debug)]
pub struct MultibootInfo {
    /// Whether EAX held the multiboot magic.
    pub valid: bool,
    /// Physical address of the info block.
    pub info_addr: u32,
    /// KiB of memory below 1 MiB (0 if not given).
    pub mem_lower_kib: u32,
    /// KiB of memory above 1 MiB (0 if not given).
    pub mem_upper_kib: u32,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
}

impl MultibootInfo {
    /// An empty record.
    pub const fn empty() -> Self {
        MultibootInfo {
            valid: false,
            info_addr: 0,
            mem_lower_kib: 0,
            mem_upper_kib: 0,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
        }
    }

    /// Copies what is needed out of the block at `info` (given `magic`).
    pub fn read(magic: u32, info: u32) -> Self {
        let mut m = Self::empty();
        m.info_addr = info;
        if magic != BOOTLOADER_MAGIC || info == 0 {
            return m;
        }
        m.valid = true;
        let base = info as usize;
        let flags = phys_u32(base);
        if flags & 1 != 0 {
            m.mem_lower_kib = phys_u32(base + 4);
            m.mem_upper_kib = phys_u32(base + 8);
        }
        if flags & (1 << 2) != 0 {
            let cmdline = phys_u32(base + 16) as usize;
            if cmdline != 0 {
                while m.cmdline_len < CMDLINE_MAX {
                    let b = phys_u8(cmdline + m.cmdline_len);
                    if b == 0 {
                        break;
                    }
                    m.cmdline[m.cmdline_len] = b;
                    m.cmdline_len += 1;
                }
            }
        }
        m
    }

    /// The command line (lossy: stops at the first non-UTF-8 byte).
    pub fn cmdline(&self) -> &str {
        let bytes = &self.cmdline[..self.cmdline_len];
        match core::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }

    /// Whether the command line has the word `word` (space separated).
    pub fn has_option(&self, word: &str) -> bool {
        self.cmdline().split(' ').any(|w| w == word)
    }
}
