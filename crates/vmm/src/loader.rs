//! Multiboot v1 image loading.
//!
//! The image must carry a multiboot header (magic 0x1BADB002, 4-byte aligned
//! within its first 8192 bytes, `magic + flags + checksum == 0`). An ELF image
//! (ELF32 or ELF64, little endian) is loaded by its `PT_LOAD` program headers
//! at their physical addresses, with the bss zeroed; a non-ELF image is loaded
//! from the header's address fields when flag 16 (the "a.out kludge") is set.
//! ELF wins when both apply, as in GRUB. (QEMU instead prefers the address
//! fields whenever flag 16 is set, and refuses ELF64; our guests set neither
//! case apart, so the two agree on them.)
//!
//! The multiboot information block, its memory map, the boot loader name and
//! the command line go to [`BOOT_INFO_START`]..[`LOW_FIRMWARE_START`]; the
//! guests keep 0x8000-0x8FFF for their AP trampoline, which is left alone.
//! Everything is validated before the first byte is written.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// What the boot loader passes in EAX.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The magic that starts a multiboot header in the image.
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The header must start within this many bytes of the image.
const HEADER_SEARCH_LEN: usize = 8192;

/// Where the multiboot information block starts.
pub const BOOT_INFO_START: u64 = 0x9000;
/// The start of the EBDA and BIOS area (reserved up to 1 MiB).
pub const LOW_FIRMWARE_START: u64 = 0x9_FC00;
/// The end of the low firmware area: 1 MiB.
pub const LOW_FIRMWARE_END: u64 = 0x10_0000;

/// Header flag: page-align modules (we load none, so it is met).
const HDR_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: the kernel wants mem_* and the memory map (always given).
const HDR_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: the kernel would like a video mode. Treated as a preference:
/// no framebuffer information is given, like QEMU.
const HDR_VIDEO_MODE: u32 = 1 << 2;
/// Header flag: the address fields are valid (the "a.out kludge").
const HDR_ADDRESS_FIELDS: u32 = 1 << 16;
/// Flags bits 0-15 are mandatory: a loader must refuse ones it does not know.
const HDR_REQUIRED_MASK: u32 = 0xFFFF;
const HDR_KNOWN: u32 = HDR_PAGE_ALIGN | HDR_MEMORY_INFO | HDR_VIDEO_MODE;

/// Information block flag: mem_lower/mem_upper valid.
const MBI_MEM: u32 = 1 << 0;
/// Information block flag: cmdline valid.
const MBI_CMDLINE: u32 = 1 << 2;
/// Information block flag: mmap_* valid.
const MBI_MMAP: u32 = 1 << 6;
/// Information block flag: boot_loader_name valid.
const MBI_LOADER_NAME: u32 = 1 << 9;
/// Size reserved for the information block (the v1 block is 116 bytes).
const MBI_SIZE: u64 = 128;
/// Memory map entry: its `size` field (which excludes itself) is 20.
const MMAP_ENTRY_SIZE: u64 = 24;
const MMAP_AVAILABLE: u32 = 1;
const MMAP_RESERVED: u32 = 2;
const LOADER_NAME: &[u8] = b"virq\0";

/// Why an image could not be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    /// No multiboot magic in the first 8192 bytes.
    #[error("not a multiboot image: no header magic 0x1BADB002 in the first 8192 bytes")]
    NotMultiboot,
    /// The header's checksum does not cancel magic and flags.
    #[error("multiboot header at offset {offset:#x} has a bad checksum")]
    BadChecksum {
        /// Offset of the header in the image.
        offset: usize,
    },
    /// The header requires features this loader does not have.
    #[error("multiboot header requires unsupported features (flags {flags:#x})")]
    UnsupportedFlags {
        /// The header's flags.
        flags: u32,
    },
    /// The image is not ELF and its header has no address fields.
    #[error("image is not ELF and its multiboot header has no address fields (flag 16)")]
    NotElf,
    /// The ELF structure is invalid.
    #[error("bad ELF image: {0}")]
    BadElf(String),
    /// The multiboot address fields are inconsistent.
    #[error("bad multiboot address fields: {0}")]
    BadAddressFields(String),
    /// The image ends before data it refers to.
    #[error(
        "image truncated: {what} needs bytes up to offset {needed:#x}, image is {len:#x} bytes"
    )]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// End offset that was needed.
        needed: u64,
        /// Image length.
        len: usize,
    },
    /// A segment does not lie in guest RAM.
    #[error("segment at {addr:#x} (+{len:#x} bytes) is outside guest RAM")]
    SegmentOutsideRam {
        /// Physical load address.
        addr: u64,
        /// Size in memory.
        len: u64,
    },
    /// A segment overlaps the low area the loader and firmware use.
    #[error(
        "segment at {addr:#x} (+{len:#x} bytes) overlaps the reserved low area {:#x}-{:#x}",
        BOOT_INFO_START,
        LOW_FIRMWARE_END
    )]
    SegmentInReservedArea {
        /// Physical load address.
        addr: u64,
        /// Size in memory.
        len: u64,
    },
    /// The entry point is not reachable from 32-bit protected mode.
    #[error("entry point {0:#x} is above 4 GiB")]
    EntryAbove4G(u64),
    /// The command line holds a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineHasNul,
    /// The command line does not fit in the boot information area.
    #[error("kernel command line is too long ({len} bytes, at most {max})")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The most that fits.
        max: usize,
    },
    /// Guest memory does not cover the boot information area.
    #[error(
        "guest RAM must cover {:#x}-{:#x}",
        BOOT_INFO_START,
        LOW_FIRMWARE_START
    )]
    NoLowMemory,
    /// Writing guest memory failed after validation (a VMM bug).
    #[error("writing guest memory at {addr:#x} failed: {msg}")]
    Memory {
        /// Where.
        addr: u64,
        /// What went wrong.
        msg: String,
    },
}

/// What the vCPU needs to start the loaded image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// 32-bit protected-mode entry EIP.
    pub entry: u32,
    /// Multiboot information block address for EBX.
    pub mbi_addr: u32,
}

/// One piece of the image to place in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    /// Physical address.
    addr: u64,
    /// Where its bytes start in the image.
    file_offset: usize,
    /// How many bytes come from the image; the rest up to `mem_len` is zeroed.
    file_len: usize,
    /// Size in memory.
    mem_len: u64,
}

/// A plan validated against the image, ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LoadPlan {
    segments: Vec<Segment>,
    entry: u64,
}

/// Little-endian reads of an image that report truncation instead of panicking.
struct Image<'a>(&'a [u8]);

impl Image<'_> {
    fn bytes<const N: usize>(&self, off: u64, what: &'static str) -> Result<[u8; N], LoadError> {
        let truncated = || LoadError::Truncated {
            what,
            needed: off.saturating_add(N as u64),
            len: self.0.len(),
        };
        let start = usize::try_from(off).map_err(|_| truncated())?;
        let end = start.checked_add(N).ok_or_else(truncated)?;
        let mut out = [0u8; N];
        out.copy_from_slice(self.0.get(start..end).ok_or_else(truncated)?);
        Ok(out)
    }

    fn u16(&self, off: u64, what: &'static str) -> Result<u16, LoadError> {
        Ok(u16::from_le_bytes(self.bytes(off, what)?))
    }

    fn u32(&self, off: u64, what: &'static str) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.bytes(off, what)?))
    }

    fn u64(&self, off: u64, what: &'static str) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.bytes(off, what)?))
    }

    /// The range `off..off + len` as usizes, if the image holds it.
    fn range(&self, off: u64, len: u64, what: &'static str) -> Result<(usize, usize), LoadError> {
        let end = off.checked_add(len);
        match end {
            Some(end) if end <= self.0.len() as u64 => Ok((off as usize, len as usize)),
            _ => Err(LoadError::Truncated {
                what,
                needed: end.unwrap_or(u64::MAX),
                len: self.0.len(),
            }),
        }
    }
}

/// The multiboot header fields a loader uses.
#[derive(Debug, Clone, Copy)]
struct Header {
    offset: usize,
    flags: u32,
}

fn find_header(image: &[u8]) -> Result<Header, LoadError> {
    let img = Image(image);
    let search = image.len().min(HEADER_SEARCH_LEN);
    let offset = (0..search.saturating_sub(3))
        .step_by(4)
        .find(|&off| img.u32(off as u64, "header").ok() == Some(MULTIBOOT_HEADER_MAGIC))
        .ok_or(LoadError::NotMultiboot)?;
    let flags = img.u32(offset as u64 + 4, "multiboot header flags")?;
    let checksum = img.u32(offset as u64 + 8, "multiboot header checksum")?;
    if MULTIBOOT_HEADER_MAGIC
        .wrapping_add(flags)
        .wrapping_add(checksum)
        != 0
    {
        return Err(LoadError::BadChecksum { offset });
    }
    if flags & HDR_REQUIRED_MASK & !HDR_KNOWN != 0 {
        return Err(LoadError::UnsupportedFlags { flags });
    }
    Ok(Header { offset, flags })
}

const ELF_MAGIC: [u8; 4] = [0x7F, b'E', b'L', b'F'];
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const PT_LOAD: u32 = 1;

/// Program header fields we use, whatever the ELF class.
struct ProgramHeader {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn plan_elf(image: &[u8]) -> Result<LoadPlan, LoadError> {
    let img = Image(image);
    let ident: [u8; 16] = img.bytes(0, "ELF identification")?;
    let is64 = match ident[4] {
        ELFCLASS32 => false,
        ELFCLASS64 => true,
        c => return Err(LoadError::BadElf(format!("unknown ELF class {c}"))),
    };
    if ident[5] != ELFDATA2LSB {
        return Err(LoadError::BadElf("not little endian".into()));
    }
    // e_entry, e_phoff, e_phentsize, e_phnum by class.
    let (entry, phoff, phentsize, phnum, min_phentsize) = if is64 {
        (
            img.u64(24, "ELF header")?,
            img.u64(32, "ELF header")?,
            img.u16(54, "ELF header")?,
            img.u16(56, "ELF header")?,
            56,
        )
    } else {
        (
            u64::from(img.u32(24, "ELF header")?),
            u64::from(img.u32(28, "ELF header")?),
            img.u16(42, "ELF header")?,
            img.u16(44, "ELF header")?,
            32,
        )
    };
    if phnum == 0 {
        return Err(LoadError::BadElf("no program headers".into()));
    }
    if phentsize < min_phentsize {
        return Err(LoadError::BadElf(format!(
            "program header size {phentsize} is too small"
        )));
    }
    img.range(
        phoff,
        u64::from(phentsize) * u64::from(phnum),
        "program headers",
    )?;

    let mut segments = Vec::new();
    let mut phys_entry = None;
    for i in 0..u64::from(phnum) {
        let at = phoff + i * u64::from(phentsize);
        let ph = if is64 {
            ProgramHeader {
                p_type: img.u32(at, "program header")?,
                offset: img.u64(at + 8, "program header")?,
                vaddr: img.u64(at + 16, "program header")?,
                paddr: img.u64(at + 24, "program header")?,
                filesz: img.u64(at + 32, "program header")?,
                memsz: img.u64(at + 40, "program header")?,
            }
        } else {
            ProgramHeader {
                p_type: img.u32(at, "program header")?,
                offset: u64::from(img.u32(at + 4, "program header")?),
                vaddr: u64::from(img.u32(at + 8, "program header")?),
                paddr: u64::from(img.u32(at + 12, "program header")?),
                filesz: u64::from(img.u32(at + 16, "program header")?),
                memsz: u64::from(img.u32(at + 20, "program header")?),
            }
        };
        if ph.p_type != PT_LOAD || ph.memsz == 0 {
            continue;
        }
        if ph.filesz > ph.memsz {
            return Err(LoadError::BadElf(format!(
                "segment {i}: file size {:#x} exceeds memory size {:#x}",
                ph.filesz, ph.memsz
            )));
        }
        let (file_offset, file_len) = img.range(ph.offset, ph.filesz, "segment data")?;
        // The entry is a virtual address; translate it through the segment
        // that holds it, so higher-half images start at their physical copy.
        if (ph.vaddr..ph.vaddr.saturating_add(ph.memsz)).contains(&entry) {
            phys_entry = Some(entry - ph.vaddr + ph.paddr);
        }
        segments.push(Segment {
            addr: ph.paddr,
            file_offset,
            file_len,
            mem_len: ph.memsz,
        });
    }
    if segments.is_empty() {
        return Err(LoadError::BadElf("no loadable segments".into()));
    }
    Ok(LoadPlan {
        segments,
        entry: phys_entry.unwrap_or(entry),
    })
}

fn plan_address_fields(image: &[u8], header: Header) -> Result<LoadPlan, LoadError> {
    let img = Image(image);
    let at = header.offset as u64;
    let header_addr = img.u32(at + 12, "multiboot address fields")?;
    let load_addr = img.u32(at + 16, "multiboot address fields")?;
    let load_end_addr = img.u32(at + 20, "multiboot address fields")?;
    let bss_end_addr = img.u32(at + 24, "multiboot address fields")?;
    let entry_addr = img.u32(at + 28, "multiboot address fields")?;

    let bad = |m: &str| Err(LoadError::BadAddressFields(m.into()));
    if load_addr > header_addr {
        return bad("load_addr is above header_addr");
    }
    // The header sits (header_addr - load_addr) bytes into the loaded text.
    let Some(file_offset) = at.checked_sub(u64::from(header_addr - load_addr)) else {
        return bad("header_addr - load_addr is larger than the header's file offset");
    };
    let file_len = if load_end_addr == 0 {
        image.len() as u64 - file_offset
    } else if load_end_addr < load_addr {
        return bad("load_end_addr is below load_addr");
    } else {
        u64::from(load_end_addr - load_addr)
    };
    let (file_offset, file_len) = img.range(file_offset, file_len, "a.out kludge text")?;
    let load_end = u64::from(load_addr) + file_len as u64;
    let mem_end = if bss_end_addr == 0 {
        load_end
    } else if u64::from(bss_end_addr) < load_end {
        return bad("bss_end_addr is below the end of the loaded data");
    } else {
        u64::from(bss_end_addr)
    };
    Ok(LoadPlan {
        segments: vec![Segment {
            addr: u64::from(load_addr),
            file_offset,
            file_len,
            mem_len: mem_end - u64::from(load_addr),
        }],
        entry: u64::from(entry_addr),
    })
}

/// Whether `a..a+alen` and `b..b_end` intersect.
fn overlaps(a: u64, alen: u64, b: u64, b_end: u64) -> bool {
    a < b_end && b < a.saturating_add(alen)
}

/// The multiboot memory map: RAM as available, minus the low firmware area.
fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().0;
        let end = start.saturating_add(region.len());
        if overlaps(start, end - start, LOW_FIRMWARE_START, LOW_FIRMWARE_END) {
            if start < LOW_FIRMWARE_START {
                map.push((start, LOW_FIRMWARE_START - start, MMAP_AVAILABLE));
            }
            let res_start = start.max(LOW_FIRMWARE_START);
            let res_end = end.min(LOW_FIRMWARE_END);
            map.push((res_start, res_end - res_start, MMAP_RESERVED));
            if end > LOW_FIRMWARE_END {
                map.push((LOW_FIRMWARE_END, end - LOW_FIRMWARE_END, MMAP_AVAILABLE));
            }
        } else {
            map.push((start, end - start, MMAP_AVAILABLE));
        }
    }
    map
}

/// KiB of RAM contiguous from `from` (for mem_lower / mem_upper).
fn contiguous_kib(map: &[(u64, u64, u32)], from: u64, limit: u64) -> u32 {
    let mut end = from;
    while let Some(&(s, l, _)) = map
        .iter()
        .find(|&&(s, l, t)| t == MMAP_AVAILABLE && s <= end && end < s.saturating_add(l))
    {
        end = s.saturating_add(l).min(limit);
        if end == limit {
            break;
        }
    }
    u32::try_from((end - from) / 1024).unwrap_or(u32::MAX)
}

/// The information block, memory map, loader name and command line, laid out
/// from [`BOOT_INFO_START`].
fn boot_info_blob(mem: &GuestMemoryMmap, cmdline: &str) -> Result<Vec<u8>, LoadError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(LoadError::CmdlineHasNul);
    }
    let map = memory_map(mem);
    let mmap_addr = BOOT_INFO_START + MBI_SIZE;
    let mmap_len = map.len() as u64 * MMAP_ENTRY_SIZE;
    let name_addr = mmap_addr + mmap_len;
    let cmdline_addr = name_addr + LOADER_NAME.len() as u64;
    let max = LOW_FIRMWARE_START.saturating_sub(cmdline_addr + 1) as usize;
    if cmdline.len() > max {
        return Err(LoadError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }

    let mut blob = vec![0u8; MBI_SIZE as usize];
    let mut put = |off: usize, v: u32| blob[off..off + 4].copy_from_slice(&v.to_le_bytes());
    // Every address below is under 0x9FC00, so the u32 casts are exact.
    put(0, MBI_MEM | MBI_CMDLINE | MBI_MMAP | MBI_LOADER_NAME);
    put(4, contiguous_kib(&map, 0, 640 * 1024));
    put(8, contiguous_kib(&map, LOW_FIRMWARE_END, u64::MAX));
    put(16, cmdline_addr as u32);
    put(44, mmap_len as u32);
    put(48, mmap_addr as u32);
    put(64, name_addr as u32);
    for (start, len, kind) in map {
        blob.extend_from_slice(&20u32.to_le_bytes());
        blob.extend_from_slice(&start.to_le_bytes());
        blob.extend_from_slice(&len.to_le_bytes());
        blob.extend_from_slice(&kind.to_le_bytes());
    }
    blob.extend_from_slice(LOADER_NAME);
    blob.extend_from_slice(cmdline.as_bytes());
    blob.push(0);
    Ok(blob)
}

fn write(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), LoadError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| LoadError::Memory {
            addr,
            msg: e.to_string(),
        })
}

/// Load a multiboot v1 image and write its boot information. `ram_bytes` is
/// the RAM size the VMM configured; segments must lie in both it and `mem`
/// (whose regions also give the memory map reported to the guest).
pub fn load_multiboot(
    mem: &GuestMemoryMmap,
    image: &[u8],
    cmdline: &str,
    ram_bytes: u64,
) -> Result<BootInfo, LoadError> {
    let header = find_header(image)?;
    let plan = if image.starts_with(&ELF_MAGIC) {
        plan_elf(image)?
    } else if header.flags & HDR_ADDRESS_FIELDS != 0 {
        plan_address_fields(image, header)?
    } else {
        return Err(LoadError::NotElf);
    };

    for seg in &plan.segments {
        let in_ram = seg
            .addr
            .checked_add(seg.mem_len)
            .is_some_and(|end| end <= ram_bytes)
            && usize::try_from(seg.mem_len)
                .is_ok_and(|len| mem.check_range(GuestAddress(seg.addr), len));
        if !in_ram {
            return Err(LoadError::SegmentOutsideRam {
                addr: seg.addr,
                len: seg.mem_len,
            });
        }
        if overlaps(seg.addr, seg.mem_len, BOOT_INFO_START, LOW_FIRMWARE_END) {
            return Err(LoadError::SegmentInReservedArea {
                addr: seg.addr,
                len: seg.mem_len,
            });
        }
    }
    let entry = u32::try_from(plan.entry).map_err(|_| LoadError::EntryAbove4G(plan.entry))?;
    let blob = boot_info_blob(mem, cmdline)?;
    if !mem.check_range(GuestAddress(BOOT_INFO_START), blob.len()) {
        return Err(LoadError::NoLowMemory);
    }

    // Validation is complete: from here on only writes.
    const ZEROS: [u8; 4096] = [0; 4096];
    for seg in &plan.segments {
        let data = image
            .get(seg.file_offset..seg.file_offset + seg.file_len)
            .unwrap_or(&[]);
        write(mem, seg.addr, data)?;
        let mut at = seg.addr + data.len() as u64;
        let end = seg.addr + seg.mem_len;
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64) as usize;
            write(mem, at, &ZEROS[..n])?;
            at += n as u64;
        }
    }
    write(mem, BOOT_INFO_START, &blob)?;
    Ok(BootInfo {
        entry,
        mbi_addr: BOOT_INFO_START as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ram(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn mb_header(flags: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&MULTIBOOT_HEADER_MAGIC.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        let sum = 0u32
            .wrapping_sub(MULTIBOOT_HEADER_MAGIC)
            .wrapping_sub(flags);
        h.extend_from_slice(&sum.to_le_bytes());
        h
    }

    /// A load segment for the test images: (paddr, vaddr, data, memsz).
    struct Seg {
        paddr: u64,
        vaddr: u64,
        data: Vec<u8>,
        memsz: u64,
    }

    /// An ELF32 or ELF64 image with the multiboot header at offset 0x100,
    /// program headers at 0x40 and segment data from 0x200.
    fn elf(is64: bool, entry: u64, segs: &[Seg]) -> Vec<u8> {
        let mut img = vec![0u8; 0x200];
        img[..4].copy_from_slice(&ELF_MAGIC);
        img[4] = if is64 { ELFCLASS64 } else { ELFCLASS32 };
        img[5] = ELFDATA2LSB;
        img[6] = 1;
        img[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        let phentsize: u16 = if is64 { 56 } else { 32 };
        if is64 {
            img[18..20].copy_from_slice(&62u16.to_le_bytes());
            img[24..32].copy_from_slice(&entry.to_le_bytes());
            img[32..40].copy_from_slice(&0x40u64.to_le_bytes());
            img[54..56].copy_from_slice(&phentsize.to_le_bytes());
            img[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        } else {
            img[18..20].copy_from_slice(&3u16.to_le_bytes());
            img[24..28].copy_from_slice(&(entry as u32).to_le_bytes());
            img[28..32].copy_from_slice(&0x40u32.to_le_bytes());
            img[42..44].copy_from_slice(&phentsize.to_le_bytes());
            img[44..46].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        }
        img[0x100..0x10C].copy_from_slice(&mb_header(HDR_MEMORY_INFO));
        for (i, s) in segs.iter().enumerate() {
            let off = img.len() as u64;
            img.extend_from_slice(&s.data);
            let ph = 0x40 + i * phentsize as usize;
            let mut put = |at: usize, v: u64, wide: bool| {
                if wide {
                    img[ph + at..ph + at + 8].copy_from_slice(&v.to_le_bytes());
                } else {
                    img[ph + at..ph + at + 4].copy_from_slice(&(v as u32).to_le_bytes());
                }
            };
            if is64 {
                put(0, u64::from(PT_LOAD), false);
                put(8, off, true);
                put(16, s.vaddr, true);
                put(24, s.paddr, true);
                put(32, s.data.len() as u64, true);
                put(40, s.memsz, true);
            } else {
                put(0, u64::from(PT_LOAD), false);
                put(4, off, false);
                put(8, s.vaddr, false);
                put(12, s.paddr, false);
                put(16, s.data.len() as u64, false);
                put(20, s.memsz, false);
            }
        }
        img
    }

    fn seg(paddr: u64, data: &[u8], memsz: u64) -> Seg {
        Seg {
            paddr,
            vaddr: paddr,
            data: data.to_vec(),
            memsz,
        }
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn check_loads(is64: bool) {
        let mem = ram(16 * MIB);
        // Dirty the bss area first: loading must zero it.
        mem.write_slice(&[0xEE; 16], GuestAddress(0x10_0004))
            .unwrap();
        let img = elf(
            is64,
            0x10_0000,
            &[
                seg(0x10_0000, &[1, 2, 3, 4], 0x14),
                seg(0x20_0000, b"data", 4),
            ],
        );
        let info = load_multiboot(&mem, &img, "console=ttyS0", 16 * MIB).unwrap();
        assert_eq!(
            info,
            BootInfo {
                entry: 0x10_0000,
                mbi_addr: 0x9000
            }
        );
        assert_eq!(read(&mem, 0x10_0000, 4), [1, 2, 3, 4]);
        assert_eq!(read(&mem, 0x10_0004, 16), [0; 16]);
        assert_eq!(read(&mem, 0x20_0000, 4), b"data");
    }

    #[test]
    fn elf32_image_loads_segments_and_zeroes_bss() {
        check_loads(false);
    }

    #[test]
    fn elf64_image_loads_segments_and_zeroes_bss() {
        check_loads(true);
    }

    #[test]
    fn higher_half_entry_is_translated_to_physical() {
        let mem = ram(16 * MIB);
        let s = Seg {
            paddr: 0x10_0000,
            vaddr: 0xFFFF_FFFF_8010_0000,
            data: vec![0x90],
            memsz: 1,
        };
        let img = elf(true, 0xFFFF_FFFF_8010_0000, &[s]);
        let info = load_multiboot(&mem, &img, "", 16 * MIB).unwrap();
        assert_eq!(info.entry, 0x10_0000);
    }

    #[test]
    fn info_block_has_memory_cmdline_and_mmap() {
        let mem = ram(64 * MIB);
        let img = elf(false, 0x10_0000, &[seg(0x10_0000, &[0xF4], 1)]);
        let info = load_multiboot(&mem, &img, "test=irq", 64 * MIB).unwrap();
        let mbi = u64::from(info.mbi_addr);
        let flags = read_u32(&mem, mbi);
        assert_eq!(flags, MBI_MEM | MBI_CMDLINE | MBI_MMAP | MBI_LOADER_NAME);
        assert_eq!(
            read_u32(&mem, mbi + 4),
            0x9FC00 / 1024,
            "mem_lower = 639 KiB"
        );
        assert_eq!(
            read_u32(&mem, mbi + 8),
            (63 * MIB / 1024) as u32,
            "mem_upper"
        );
        let cmdline = u64::from(read_u32(&mem, mbi + 16));
        assert_eq!(read(&mem, cmdline, 9), b"test=irq\0");
        let name = u64::from(read_u32(&mem, mbi + 64));
        assert_eq!(read(&mem, name, 5), b"virq\0");

        let mmap_len = read_u32(&mem, mbi + 44);
        let mmap_addr = u64::from(read_u32(&mem, mbi + 48));
        assert_eq!(mmap_len, 3 * 24);
        let mut entries = Vec::new();
        for i in 0..3 {
            let e = mmap_addr + i * 24;
            assert_eq!(read_u32(&mem, e), 20);
            let base: u64 = mem.read_obj(GuestAddress(e + 4)).unwrap();
            let len: u64 = mem.read_obj(GuestAddress(e + 12)).unwrap();
            entries.push((base, len, read_u32(&mem, e + 20)));
        }
        assert_eq!(
            entries,
            vec![
                (0, 0x9FC00, MMAP_AVAILABLE),
                (0x9FC00, 0x10_0000 - 0x9FC00, MMAP_RESERVED),
                (0x10_0000, 63 * MIB, MMAP_AVAILABLE),
            ]
        );
        // Everything lies in 0x9000..0x9FC00.
        assert!(mmap_addr >= 0x9000 && cmdline + 9 <= 0x9FC00);
    }

    #[test]
    fn trampoline_page_is_left_alone() {
        let mem = ram(16 * MIB);
        mem.write_slice(&[0xAB; 0x1000], GuestAddress(0x8000))
            .unwrap();
        let img = elf(false, 0x10_0000, &[seg(0x10_0000, &[0xF4], 1)]);
        load_multiboot(&mem, &img, "", 16 * MIB).unwrap();
        assert_eq!(read(&mem, 0x8000, 0x1000), vec![0xAB; 0x1000]);
    }

    #[test]
    fn missing_magic_is_not_multiboot() {
        let mem = ram(16 * MIB);
        let mut img = elf(false, 0x10_0000, &[seg(0x10_0000, &[0xF4], 1)]);
        img[0x100] = 0;
        assert_eq!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::NotMultiboot)
        );
        assert_eq!(
            load_multiboot(&mem, &[], "", 16 * MIB),
            Err(LoadError::NotMultiboot)
        );
    }

    #[test]
    fn magic_beyond_8k_or_unaligned_is_not_found() {
        let mem = ram(16 * MIB);
        let mut img = vec![0u8; 8192];
        img.extend_from_slice(&mb_header(0));
        assert_eq!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::NotMultiboot)
        );
        let mut img = vec![0u8; 2];
        img.extend_from_slice(&mb_header(0));
        assert_eq!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::NotMultiboot)
        );
    }

    #[test]
    fn bad_checksum_is_rejected() {
        let mem = ram(16 * MIB);
        let mut img = elf(false, 0x10_0000, &[seg(0x10_0000, &[0xF4], 1)]);
        img[0x108] ^= 1;
        assert_eq!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::BadChecksum { offset: 0x100 })
        );
    }

    #[test]
    fn unknown_required_flag_is_rejected() {
        let mem = ram(16 * MIB);
        let mut img = mb_header(1 << 5);
        img.resize(64, 0);
        assert_eq!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::UnsupportedFlags { flags: 1 << 5 })
        );
    }

    #[test]
    fn truncated_segment_data_is_rejected_and_nothing_written() {
        let mem = ram(16 * MIB);
        let mut img = elf(false, 0x10_0000, &[seg(0x10_0000, &[7; 64], 64)]);
        img.truncate(img.len() - 1);
        let err = load_multiboot(&mem, &img, "", 16 * MIB).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::Truncated {
                    what: "segment data",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(read(&mem, 0x10_0000, 4), [0; 4]);
        assert_eq!(read_u32(&mem, 0x9000), 0, "no boot info written");
    }

    #[test]
    fn truncated_program_headers_are_rejected() {
        let mem = ram(16 * MIB);
        let mut img = elf(true, 0x10_0000, &[seg(0x10_0000, &[1], 1)]);
        img[56] = 200; // e_phnum far past the end of the file
        let err = load_multiboot(&mem, &img, "", 16 * MIB).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::Truncated {
                    what: "program headers",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn segment_outside_ram_is_rejected() {
        let mem = ram(16 * MIB);
        let img = elf(
            false,
            0x10_0000,
            &[seg(0x10_0000, &[1], 1), seg(0xFF_F000, &[2], 0x2000)],
        );
        assert_eq!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::SegmentOutsideRam {
                addr: 0xFF_F000,
                len: 0x2000
            })
        );
        assert_eq!(
            read(&mem, 0x10_0000, 1),
            [0],
            "the valid segment was not written either"
        );
        // Past ram_bytes even if mem is larger.
        let img = elf(false, 0x10_0000, &[seg(0x80_0000, &[1], 1)]);
        assert_eq!(
            load_multiboot(&mem, &img, "", 8 * MIB),
            Err(LoadError::SegmentOutsideRam {
                addr: 0x80_0000,
                len: 1
            })
        );
        // An address that wraps.
        let img = elf(true, 0x10_0000, &[seg(u64::MAX - 1, &[1], 4)]);
        assert!(matches!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::SegmentOutsideRam { .. })
        ));
    }

    #[test]
    fn segment_over_low_firmware_area_is_rejected() {
        let mem = ram(16 * MIB);
        let img = elf(false, 0xF_0000, &[seg(0xF_0000, &[1], 0x10)]);
        assert_eq!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::SegmentInReservedArea {
                addr: 0xF_0000,
                len: 0x10
            })
        );
        let img = elf(false, 0x9_0000, &[seg(0x9_0000, &[1], 0xFC01)]);
        assert!(matches!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::SegmentInReservedArea { .. })
        ));
        // Just below the boot info area is fine.
        let img = elf(false, 0x1000, &[seg(0x1000, &[1], 0x7000)]);
        assert!(load_multiboot(&mem, &img, "", 16 * MIB).is_ok());
    }

    #[test]
    fn non_elf_without_address_fields_is_rejected() {
        let mem = ram(16 * MIB);
        let mut img = mb_header(HDR_MEMORY_INFO);
        img.resize(64, 0);
        assert_eq!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::NotElf)
        );
    }

    #[test]
    fn aout_kludge_image_loads_from_header_fields() {
        let mem = ram(16 * MIB);
        // Header at file offset 8, which is loaded at 0x10_0008.
        let mut img = vec![0xAA; 8];
        img.extend_from_slice(&mb_header(HDR_ADDRESS_FIELDS | HDR_MEMORY_INFO));
        for v in [0x10_0008u32, 0x10_0000, 0, 0x10_1000, 0x10_0030] {
            img.extend_from_slice(&v.to_le_bytes());
        }
        img.extend_from_slice(b"code");
        mem.write_slice(&[0xEE; 8], GuestAddress(0x10_0FF0))
            .unwrap();
        let info = load_multiboot(&mem, &img, "", 16 * MIB).unwrap();
        assert_eq!(info.entry, 0x10_0030);
        assert_eq!(read(&mem, 0x10_0000, 8), [0xAA; 8]);
        assert_eq!(read(&mem, 0x10_0028, 4), b"code");
        assert_eq!(
            read(&mem, 0x10_0FF0, 8),
            [0; 8],
            "bss up to bss_end_addr is zeroed"
        );
    }

    #[test]
    fn aout_kludge_with_inconsistent_fields_is_rejected() {
        let mem = ram(16 * MIB);
        let mut img = mb_header(HDR_ADDRESS_FIELDS);
        // header_addr below load_addr.
        for v in [0x10_0000u32, 0x10_1000, 0, 0, 0x10_1000] {
            img.extend_from_slice(&v.to_le_bytes());
        }
        assert!(matches!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::BadAddressFields(_))
        ));
        // Address fields cut off by the end of the file.
        let img = mb_header(HDR_ADDRESS_FIELDS);
        assert!(matches!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::Truncated { .. })
        ));
    }

    #[test]
    fn bad_elf_class_and_sizes_are_rejected() {
        let mem = ram(16 * MIB);
        let good = elf(false, 0x10_0000, &[seg(0x10_0000, &[1], 1)]);
        let mut img = good.clone();
        img[4] = 9;
        assert!(matches!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::BadElf(_))
        ));
        let mut img = good.clone();
        img[5] = 2; // big endian
        assert!(matches!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::BadElf(_))
        ));
        let img = elf(false, 0x10_0000, &[seg(0x10_0000, &[1, 2], 1)]);
        assert!(matches!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::BadElf(_))
        ));
        let img = elf(false, 0x10_0000, &[]);
        assert!(matches!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::BadElf(_))
        ));
    }

    #[test]
    fn entry_above_4g_is_rejected() {
        let mem = ram(16 * MIB);
        let img = elf(true, 0x1_0000_0000, &[seg(0x10_0000, &[1], 1)]);
        assert_eq!(
            load_multiboot(&mem, &img, "", 16 * MIB),
            Err(LoadError::EntryAbove4G(0x1_0000_0000))
        );
    }

    #[test]
    fn bad_command_lines_are_rejected() {
        let mem = ram(16 * MIB);
        let img = elf(false, 0x10_0000, &[seg(0x10_0000, &[1], 1)]);
        assert_eq!(
            load_multiboot(&mem, &img, "a\0b", 16 * MIB),
            Err(LoadError::CmdlineHasNul)
        );
        let long = "x".repeat(0x10_0000);
        assert!(matches!(
            load_multiboot(&mem, &img, &long, 16 * MIB),
            Err(LoadError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn memory_map_follows_guest_regions() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x4000_0000),
            (GuestAddress(0x1_0000_0000), 0x10_0000),
        ])
        .unwrap();
        assert_eq!(
            memory_map(&mem),
            vec![
                (0, 0x9FC00, MMAP_AVAILABLE),
                (0x9FC00, 0x10_0000 - 0x9FC00, MMAP_RESERVED),
                (0x10_0000, 0x4000_0000 - 0x10_0000, MMAP_AVAILABLE),
                (0x1_0000_0000, 0x10_0000, MMAP_AVAILABLE),
            ]
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mem = ram(4 * MIB);
        let base = elf(true, 0x10_0000, &[seg(0x10_0000, &[1; 8], 16)]);
        let mut x = 0x1234_5678_9ABC_DEF0u64;
        for _ in 0..2000 {
            let mut img = base.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x % img.len() as u64) as usize;
                img[at] = (x >> 32) as u8;
            }
            // Keep the multiboot header valid so the ELF parser is exercised.
            img[0x100..0x10C].copy_from_slice(&mb_header(HDR_MEMORY_INFO));
            let _ = load_multiboot(&mem, &img, "", 4 * MIB);
        }
    }
}
