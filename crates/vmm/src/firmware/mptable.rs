//! Intel MultiProcessor Specification 1.4 tables: the floating pointer
//! structure and the configuration table it points at.

use super::{ioapic_id, Placed, TableBuf, IOAPIC_ADDR, LAPIC_ADDR, LAPIC_VERSION};

/// Floating pointer signature.
pub const FLOATING_SIGNATURE: &[u8; 4] = b"_MP_";
/// Configuration table signature.
pub const CONFIG_SIGNATURE: &[u8; 4] = b"PCMP";
/// MP spec revision 1.4.
const SPEC_REV: u8 = 4;
const FLOATING_LEN: usize = 16;
const CONFIG_HEADER_LEN: usize = 44;

/// Configuration table entry types.
pub mod entry {
    /// Processor (20 bytes).
    pub const PROCESSOR: u8 = 0;
    /// Bus (8 bytes).
    pub const BUS: u8 = 1;
    /// I/O APIC (8 bytes).
    pub const IOAPIC: u8 = 2;
    /// I/O interrupt assignment (8 bytes).
    pub const IO_INTERRUPT: u8 = 3;
    /// Local interrupt assignment (8 bytes).
    pub const LOCAL_INTERRUPT: u8 = 4;
}

/// Interrupt types of interrupt assignment entries.
pub mod int_type {
    /// A vectored interrupt from the APIC's redirection entry.
    pub const INT: u8 = 0;
    /// NMI.
    pub const NMI: u8 = 1;
    /// ExtINT: the vector comes from an 8259.
    pub const EXTINT: u8 = 3;
}

/// Processor flags: enabled.
const CPU_ENABLED: u8 = 1 << 0;
/// Processor flags: bootstrap processor.
const CPU_BSP: u8 = 1 << 1;
/// CPUID signature family 6 (what the guest would see anyway from CPUID).
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID feature flags: FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// "All local APICs" as a destination APIC ID.
const ALL_LAPICS: u8 = 0xFF;
/// Interrupt flags: polarity and trigger conform to the bus (ISA: edge, high).
const CONFORMS: u16 = 0;
/// The ISA bus's ID.
const ISA_BUS: u8 = 0;

/// The IOAPIC pin an ISA IRQ is wired to, or `None` for the cascade (IRQ 2).
pub fn isa_irq_pin(irq: u8) -> Option<u8> {
    match irq {
        0 => Some(2),
        2 => None,
        n => Some(n),
    }
}

/// Build the floating pointer at `start` and the configuration table right
/// after it, for CPUs with APIC IDs below 255 (the MP table's 8-bit IDs, 0xFF
/// being "all").
pub(crate) fn build(cpus: u32, ioapic_version: u8, start: u64, limit: u64) -> Vec<Placed> {
    let config_addr = start + FLOATING_LEN as u64;
    let ioapic = ioapic_id(cpus);

    let mut t = TableBuf::default();
    t.bytes(CONFIG_SIGNATURE)
        .u16(0) // base table length, set below
        .u8(SPEC_REV)
        .u8(0) // checksum
        .bytes(b"VIRQ    ")
        .bytes(b"VIRQ MPTABLE")
        .u32(0) // OEM table pointer
        .u16(0) // OEM table size
        .u16(0) // entry count, set below
        .u32(LAPIC_ADDR)
        .u16(0) // extended table length
        .u8(0) // extended table checksum
        .u8(0);
    debug_assert_eq!(t.len(), CONFIG_HEADER_LEN);
    let mut count: u16 = 0;
    for id in 0..cpus.min(0xFF) {
        let flags = if id == 0 {
            CPU_ENABLED | CPU_BSP
        } else {
            CPU_ENABLED
        };
        t.u8(entry::PROCESSOR)
            .u8(id as u8)
            .u8(LAPIC_VERSION)
            .u8(flags)
            .u32(CPU_SIGNATURE)
            .u32(CPU_FEATURES)
            .u64(0);
        count += 1;
    }
    t.u8(entry::BUS).u8(ISA_BUS).bytes(b"ISA   ");
    t.u8(entry::IOAPIC)
        .u8(ioapic)
        .u8(ioapic_version)
        .u8(1)
        .u32(IOAPIC_ADDR);
    count += 2;
    for irq in 0..16u8 {
        if let Some(pin) = isa_irq_pin(irq) {
            t.u8(entry::IO_INTERRUPT)
                .u8(int_type::INT)
                .u16(CONFORMS)
                .u8(ISA_BUS)
                .u8(irq)
                .u8(ioapic)
                .u8(pin);
            count += 1;
        }
    }
    for (kind, lint) in [(int_type::EXTINT, 0u8), (int_type::NMI, 1)] {
        t.u8(entry::LOCAL_INTERRUPT)
            .u8(kind)
            .u16(CONFORMS)
            .u8(ISA_BUS)
            .u8(0)
            .u8(ALL_LAPICS)
            .u8(lint);
        count += 1;
    }
    let len = t.len();
    // At most 255 * 20 + 18 * 8 + 44 bytes: always fits in a u16.
    t.set_u16(4, len as u16);
    t.set_u16(34, count);
    t.fix_checksum(7, 0..len);

    let mut fp = TableBuf::default();
    fp.bytes(FLOATING_SIGNATURE)
        .u32(config_addr as u32)
        .u8(1) // length in 16-byte units
        .u8(SPEC_REV)
        .u8(0) // checksum
        .u8(0) // feature 1: a configuration table is present
        .u8(0) // feature 2: no IMCR, virtual wire mode
        .bytes(&[0; 3]);
    fp.fix_checksum(10, 0..FLOATING_LEN);

    vec![
        Placed {
            name: "MP floating pointer",
            addr: start,
            bytes: fp.0,
            limit,
        },
        Placed {
            name: "MP configuration table",
            addr: config_addr,
            bytes: t.0,
            limit,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::super::{write_tables, MP_START};
    use super::*;
    use crate::firmware::IOAPIC_VERSION;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    /// Scan 0xF0000-0xFFFFF on 16-byte boundaries like an OS does; return the
    /// configuration table's bytes.
    fn find_config(mem: &GuestMemoryMmap) -> Vec<u8> {
        let area = read(mem, 0xF_0000, 0x1_0000);
        let at = (0..area.len())
            .step_by(16)
            .find(|&i| &area[i..i + 4] == FLOATING_SIGNATURE && sum(&area[i..i + 16]) == 0)
            .expect("floating pointer");
        let fp = &area[at..at + 16];
        assert_eq!(fp[8], 1, "length in paragraphs");
        assert_eq!(fp[9], 4, "spec 1.4");
        assert_eq!(fp[11], 0, "config table present");
        let config = u64::from(u32::from_le_bytes(fp[4..8].try_into().unwrap()));
        let header = read(mem, config, 44);
        assert_eq!(&header[..4], CONFIG_SIGNATURE);
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let table = read(mem, config, len);
        assert_eq!(sum(&table), 0, "configuration table checksum");
        table
    }

    /// The entries as (type, bytes).
    fn entries(table: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let count = u16::from_le_bytes([table[34], table[35]]) as usize;
        let mut out = Vec::new();
        let mut at = CONFIG_HEADER_LEN;
        for _ in 0..count {
            let kind = table[at];
            let len = if kind == entry::PROCESSOR { 20 } else { 8 };
            out.push((kind, table[at..at + len].to_vec()));
            at += len;
        }
        assert_eq!(at, table.len(), "entry count matches table length");
        out
    }

    #[test]
    fn floating_pointer_and_config_checksums_are_valid() {
        let mem = ram();
        write_tables(&mem, 4, IOAPIC_VERSION).unwrap();
        let table = find_config(&mem);
        assert_eq!(
            u32::from_le_bytes(table[36..40].try_into().unwrap()),
            0xFEE0_0000
        );
        assert_eq!(read(&mem, MP_START, 4), b"_MP_");
    }

    #[test]
    fn one_processor_entry_per_cpu_with_bsp_first() {
        let mem = ram();
        write_tables(&mem, 4, IOAPIC_VERSION).unwrap();
        let cpus: Vec<_> = entries(&find_config(&mem))
            .into_iter()
            .filter(|(k, _)| *k == entry::PROCESSOR)
            .map(|(_, e)| (e[1], e[3]))
            .collect();
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn bus_and_ioapic_entries() {
        let mem = ram();
        write_tables(&mem, 2, IOAPIC_VERSION).unwrap();
        let e = entries(&find_config(&mem));
        let bus: Vec<_> = e.iter().filter(|(k, _)| *k == entry::BUS).collect();
        assert_eq!(bus.len(), 1);
        assert_eq!(&bus[0].1[2..8], b"ISA   ");
        let io: Vec<_> = e.iter().filter(|(k, _)| *k == entry::IOAPIC).collect();
        assert_eq!(io.len(), 1);
        // ID 0 (the register's reset value), version 0x20, enabled, 0xFEC00000.
        assert_eq!(io[0].1, vec![2, 0, 0x20, 1, 0x00, 0x00, 0xC0, 0xFE]);
    }

    #[test]
    fn kernel_mode_tables_give_kvms_ioapic_version() {
        let mem = ram();
        write_tables(&mem, 2, 0x11).unwrap();
        let e = entries(&find_config(&mem));
        let io = e.iter().find(|(k, _)| *k == entry::IOAPIC).unwrap();
        assert_eq!(io.1[2], 0x11);
    }

    #[test]
    fn isa_irqs_route_to_pins_with_irq0_on_pin2_and_no_irq2() {
        let mem = ram();
        write_tables(&mem, 3, IOAPIC_VERSION).unwrap();
        let routes: Vec<(u8, u8, u8, u8)> = entries(&find_config(&mem))
            .into_iter()
            .filter(|(k, _)| *k == entry::IO_INTERRUPT)
            .map(|(_, e)| (e[1], e[5], e[6], e[7]))
            .collect();
        // (bus, bus IRQ, IOAPIC ID 0, pin)
        let mut expected = vec![(0, 0, 0, 2)];
        expected.extend((1..16).filter(|&i| i != 2).map(|i| (0, i, 0, i)));
        assert_eq!(routes, expected);
    }

    #[test]
    fn lint0_is_extint_and_lint1_is_nmi_on_all_cpus() {
        let mem = ram();
        write_tables(&mem, 1, IOAPIC_VERSION).unwrap();
        let locals: Vec<(u8, u8, u8)> = entries(&find_config(&mem))
            .into_iter()
            .filter(|(k, _)| *k == entry::LOCAL_INTERRUPT)
            .map(|(_, e)| (e[1], e[6], e[7]))
            .collect();
        assert_eq!(
            locals,
            vec![(int_type::EXTINT, 0xFF, 0), (int_type::NMI, 0xFF, 1)]
        );
    }

    #[test]
    fn max_cpus_fit_and_ids_above_254_are_left_out() {
        for (cpus, listed) in [(255u32, 255usize), (256, 255)] {
            let mem = ram();
            write_tables(&mem, cpus, IOAPIC_VERSION).unwrap();
            let e = entries(&find_config(&mem));
            let n = e.iter().filter(|(k, _)| *k == entry::PROCESSOR).count();
            assert_eq!(n, listed);
            let io = e.iter().find(|(k, _)| *k == entry::IOAPIC).unwrap();
            assert_eq!(io.1[1], 0, "IOAPIC ID 0 at every CPU count");
        }
    }
}
