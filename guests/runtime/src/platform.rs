//! Platform discovery from the firmware tables: ACPI MADT first, then the
//! Intel MP table, then QEMU's fw_cfg CPU count.

use crate::arch::{inb, outw, phys_read, phys_u16, phys_u32, phys_u64, phys_u8};
use crate::cpu::MAX_CPUS;

/// Most interrupt source overrides recorded.
pub const MAX_OVERRIDES: usize = 16;

/// An ISA IRQ that is not identity mapped or not edge/active-high.
#[derive(Clone, Copy, Debug, Default)]
pub struct Override {
    /// ISA IRQ.
    pub irq: u8,
    /// Global system interrupt it arrives on.
    pub gsi: u32,
    /// MPS INTI flags: polarity in bits 1:0, trigger mode in bits 3:2.
    pub flags: u16,
}

/// Where an ISA IRQ arrives and how it is signalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IsaRoute {
    /// Global system interrupt.
    pub gsi: u32,
    /// Level triggered.
    pub level: bool,
    /// Active low.
    pub active_low: bool,
}

/// What the firmware tables describe.
#[derive(Clone, Copy, Debug)]
pub struct Platform {
    /// Which table the data came from.
    pub source: &'static str,
    /// APIC IDs of the usable CPUs, in table order.
    pub apic_ids: [u32; MAX_CPUS],
    /// Number of entries in `apic_ids`.
    pub cpu_count: usize,
    /// First IOAPIC's ID, as the tables give it.
    pub ioapic_id: u8,
    /// First IOAPIC's MMIO address.
    pub ioapic_addr: u32,
    /// First IOAPIC's GSI base.
    pub ioapic_gsi_base: u32,
    /// Interrupt source overrides for ISA IRQs.
    pub overrides: [Override; MAX_OVERRIDES],
    /// Number of entries in `overrides`.
    pub override_count: usize,
}

impl Platform {
    /// No CPUs, the default IOAPIC address, no overrides.
    pub const fn empty() -> Self {
        Platform {
            source: "none",
            apic_ids: [0; MAX_CPUS],
            cpu_count: 0,
            ioapic_id: 0,
            ioapic_addr: 0xFEC0_0000,
            ioapic_gsi_base: 0,
            overrides: [Override {
                irq: 0,
                gsi: 0,
                flags: 0,
            }; MAX_OVERRIDES],
            override_count: 0,
        }
    }

    fn add_cpu(&mut self, apic_id: u32) {
        if self.cpu_count < MAX_CPUS {
            self.apic_ids[self.cpu_count] = apic_id;
            self.cpu_count += 1;
        }
    }

    fn add_override(&mut self, o: Override) {
        if self.override_count < MAX_OVERRIDES {
            self.overrides[self.override_count] = o;
            self.override_count += 1;
        }
    }

    /// The route of ISA IRQ `irq`: identity, edge, active high unless an
    /// override says otherwise ("conforming" means the ISA default).
    pub fn isa_route(&self, irq: u8) -> IsaRoute {
        let found = self.overrides[..self.override_count]
            .iter()
            .find(|o| o.irq == irq);
        match found {
            Some(o) => IsaRoute {
                gsi: o.gsi,
                active_low: o.flags & 0x3 == 0x3,
                level: (o.flags >> 2) & 0x3 == 0x3,
            },
            None => IsaRoute {
                gsi: u32::from(irq),
                level: false,
                active_low: false,
            },
        }
    }

    /// The highest GSI the tables route an ISA IRQ (0-15) to.
    pub fn highest_isa_gsi(&self) -> u32 {
        (0..16)
            .map(|irq| self.isa_route(irq).gsi)
            .max()
            .unwrap_or(0)
    }
}

fn checksum_ok(addr: usize, len: usize) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(phys_u8(addr + i))) == 0
}

/// Finds a 16-byte aligned `sig` with a valid checksum over `len` bytes in
/// the EBDA's first KiB, the last KiB of base memory or the BIOS area.
fn scan(sig: &[u8], len: usize) -> Option<usize> {
    let ebda = usize::from(phys_u16(0x40E)) << 4;
    let mut areas = [(0x9FC00, 0xA0000), (0xE0000, 0x100000), (0, 0)];
    if (0x80000..0xA0000).contains(&ebda) {
        areas[2] = (ebda, ebda + 1024);
    }
    for (start, end) in areas {
        let mut p = start;
        while p + 16 <= end {
            if phys_read::<8>(p)[..sig.len()] == sig[..] && checksum_ok(p, len) {
                return Some(p);
            }
            p += 16;
        }
    }
    None
}

fn from_madt(p: &mut Platform) -> bool {
    let Some(rsdp) = scan(b"RSD PTR ", 20) else {
        return false;
    };
    let revision = phys_u8(rsdp + 15);
    let (root, entry_size) = if revision >= 2 && phys_u64(rsdp + 24) != 0 {
        (phys_u64(rsdp + 24) as usize, 8)
    } else {
        (phys_u32(rsdp + 16) as usize, 4)
    };
    if root == 0 || root >= 0xFFFF_F000 {
        return false;
    }
    let root_len = (phys_u32(root + 4) as usize).min(4096);
    let mut madt = None;
    let mut e = root + 36;
    while e + entry_size <= root + root_len {
        let table = if entry_size == 8 {
            phys_u64(e) as usize
        } else {
            phys_u32(e) as usize
        };
        if table != 0 && table < 0xFFFF_F000 && phys_read::<4>(table) == *b"APIC" {
            madt = Some(table);
            break;
        }
        e += entry_size;
    }
    let Some(madt) = madt else {
        return false;
    };
    let len = (phys_u32(madt + 4) as usize).min(64 * 1024);
    let mut e = madt + 44;
    let mut found_ioapic = false;
    while e + 2 <= madt + len {
        let kind = phys_u8(e);
        let elen = usize::from(phys_u8(e + 1));
        if elen < 2 {
            break;
        }
        match kind {
            // Processor local APIC: enabled or online capable.
            0 if phys_u32(e + 4) & 0x3 != 0 => p.add_cpu(u32::from(phys_u8(e + 3))),
            // Processor local x2APIC.
            9 if phys_u32(e + 8) & 0x3 != 0 => p.add_cpu(phys_u32(e + 4)),
            1 if !found_ioapic => {
                p.ioapic_id = phys_u8(e + 2);
                p.ioapic_addr = phys_u32(e + 4);
                p.ioapic_gsi_base = phys_u32(e + 8);
                found_ioapic = true;
            }
            // Interrupt source override (bus 0 = ISA).
            2 if phys_u8(e + 2) == 0 => p.add_override(Override {
                irq: phys_u8(e + 3),
                gsi: phys_u32(e + 4),
                flags: phys_u16(e + 8),
            }),
            _ => {}
        }
        e += elen;
    }
    p.source = "acpi-madt";
    p.cpu_count > 0
}

fn from_mp_table(p: &mut Platform) -> bool {
    let Some(fp) = scan(b"_MP_", 16) else {
        return false;
    };
    let table = phys_u32(fp + 4) as usize;
    if table == 0 || phys_read::<4>(table) != *b"PCMP" {
        return false;
    }
    let entries = phys_u16(table + 34);
    let end = table + usize::from(phys_u16(table + 4));
    let mut isa_bus = None;
    let mut ioapic_id = None;
    let mut e = table + 44;
    for _ in 0..entries {
        if e >= end {
            break;
        }
        match phys_u8(e) {
            0 => {
                if phys_u8(e + 3) & 1 != 0 {
                    p.add_cpu(u32::from(phys_u8(e + 1)));
                }
                e += 20;
                continue;
            }
            1 if phys_read::<3>(e + 2) == *b"ISA" => isa_bus = Some(phys_u8(e + 1)),
            2 if ioapic_id.is_none() && phys_u8(e + 3) & 1 != 0 => {
                ioapic_id = Some(phys_u8(e + 1));
                p.ioapic_id = phys_u8(e + 1);
                p.ioapic_addr = phys_u32(e + 4);
            }
            3 => {
                // I/O interrupt assignment; INT type (0) from the ISA bus.
                let to_our_ioapic = Some(phys_u8(e + 6)) == ioapic_id || phys_u8(e + 6) == 0xFF;
                if phys_u8(e + 1) == 0 && Some(phys_u8(e + 4)) == isa_bus && to_our_ioapic {
                    p.add_override(Override {
                        irq: phys_u8(e + 5),
                        gsi: u32::from(phys_u8(e + 7)),
                        flags: phys_u16(e + 2),
                    });
                }
            }
            _ => {}
        }
        e += 8;
    }
    p.source = "mp-table";
    p.cpu_count > 0
}

fn from_fw_cfg(p: &mut Platform) -> bool {
    let read16 = |key: u16| {
        outw(0x510, key);
        u16::from_le_bytes([inb(0x511), inb(0x511)])
    };
    outw(0x510, 0x0000);
    let sig = [inb(0x511), inb(0x511), inb(0x511), inb(0x511)];
    if sig != *b"QEMU" {
        return false;
    }
    let n = usize::from(read16(0x0005)).clamp(1, MAX_CPUS);
    for id in 0..n {
        p.add_cpu(id as u32);
    }
    p.source = "fw_cfg";
    true
}

/// Reads the firmware tables. Without any, assumes one CPU (APIC ID 0), the
/// IOAPIC at 0xFEC00000 and identity-mapped ISA IRQs.
pub fn discover() -> Platform {
    let mut p = Platform::empty();
    if from_madt(&mut p) {
        return p;
    }
    p = Platform::empty();
    if from_mp_table(&mut p) {
        return p;
    }
    p = Platform::empty();
    if from_fw_cfg(&mut p) {
        return p;
    }
    p = Platform::empty();
    p.add_cpu(0);
    p.source = "defaults";
    p
}
