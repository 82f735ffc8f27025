//! ACPI tables: RSDP (revision 2), XSDT, RSDT and the MADT.

use super::{ioapic_id, Placed, TableBuf, IOAPIC_ADDR, LAPIC_ADDR};

/// RSDP signature.
pub const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
const OEM_ID: &[u8; 6] = b"VIRQ  ";
const CREATOR_ID: &[u8; 4] = b"VIRQ";
/// Size of the common description-table header.
pub const SDT_HEADER_LEN: usize = 36;
/// Size of a revision-2 RSDP.
const RSDP_LEN: usize = 36;

/// MADT interrupt controller structure types.
pub mod madt {
    /// Processor Local APIC (8 bytes).
    pub const LOCAL_APIC: u8 = 0;
    /// I/O APIC (12 bytes).
    pub const IOAPIC: u8 = 1;
    /// Interrupt Source Override (10 bytes).
    pub const INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
    /// Local APIC NMI (6 bytes).
    pub const LOCAL_APIC_NMI: u8 = 4;
    /// Processor Local x2APIC (16 bytes).
    pub const LOCAL_X2APIC: u8 = 9;
    /// Local x2APIC NMI (12 bytes).
    pub const LOCAL_X2APIC_NMI: u8 = 10;
    /// MADT flags: the machine also has 8259 PICs.
    pub const PCAT_COMPAT: u32 = 1;
}

/// Local APIC / x2APIC flags: enabled.
const LAPIC_ENABLED: u32 = 1;
/// MPS INTI flags: conform to the bus.
const CONFORMS: u16 = 0;
/// Highest APIC ID a Processor Local APIC structure may carry; larger IDs
/// need Processor Local x2APIC structures.
const MAX_XAPIC_ID: u32 = 254;

/// A description table: header with length and checksum filled by `finish`.
fn sdt(signature: &[u8; 4], revision: u8, table_id: &[u8; 8]) -> TableBuf {
    let mut t = TableBuf::default();
    t.bytes(signature)
        .u32(0) // length
        .u8(revision)
        .u8(0) // checksum
        .bytes(OEM_ID)
        .bytes(table_id)
        .u32(1) // OEM revision
        .bytes(CREATOR_ID)
        .u32(1); // creator revision
    t
}

fn finish(mut t: TableBuf) -> Vec<u8> {
    let len = t.len();
    t.set_u32(4, len as u32);
    t.fix_checksum(9, 0..len);
    t.0
}

/// The MADT for `cpus` CPUs.
fn build_madt(cpus: u32) -> Vec<u8> {
    let needs_x2apic = cpus > MAX_XAPIC_ID + 1;
    // Revision 3 (ACPI 4.0) introduced the x2APIC structures.
    let mut t = sdt(b"APIC", if needs_x2apic { 3 } else { 1 }, b"VIRQMADT");
    t.u32(LAPIC_ADDR).u32(madt::PCAT_COMPAT);
    for id in 0..cpus {
        if id <= MAX_XAPIC_ID {
            // Processor UID = APIC ID; the BSP (ID 0) comes first.
            t.u8(madt::LOCAL_APIC)
                .u8(8)
                .u8(id as u8)
                .u8(id as u8)
                .u32(LAPIC_ENABLED);
        } else {
            t.u8(madt::LOCAL_X2APIC)
                .u8(16)
                .u16(0)
                .u32(id)
                .u32(LAPIC_ENABLED)
                .u32(id);
        }
    }
    t.u8(madt::IOAPIC)
        .u8(12)
        .u8(ioapic_id(cpus))
        .u8(0)
        .u32(IOAPIC_ADDR)
        .u32(0);
    // The PIT's IRQ 0 arrives on GSI 2; ISA defaults (edge, high) otherwise.
    t.u8(madt::INTERRUPT_SOURCE_OVERRIDE)
        .u8(10)
        .u8(0)
        .u8(0)
        .u32(2)
        .u16(CONFORMS);
    // LINT1 is NMI on every processor (UID 0xFF / 0xFFFFFFFF = all).
    t.u8(madt::LOCAL_APIC_NMI)
        .u8(6)
        .u8(0xFF)
        .u16(CONFORMS)
        .u8(1);
    if needs_x2apic {
        t.u8(madt::LOCAL_X2APIC_NMI)
            .u8(12)
            .u16(CONFORMS)
            .u32(u32::MAX)
            .u8(1)
            .bytes(&[0; 3]);
    }
    finish(t)
}

/// Build the RSDP at `start` and the tables after it, all below `limit`.
pub(crate) fn build(cpus: u32, start: u64, limit: u64) -> Vec<Placed> {
    let xsdt_addr = start + 0x40;
    let rsdt_addr = start + 0x80;
    let madt_addr = start + 0xC0;

    let madt = build_madt(cpus);

    let mut xsdt = sdt(b"XSDT", 1, b"VIRQXSDT");
    xsdt.u64(madt_addr);
    let mut rsdt = sdt(b"RSDT", 1, b"VIRQRSDT");
    rsdt.u32(madt_addr as u32);

    let mut rsdp = TableBuf::default();
    rsdp.bytes(RSDP_SIGNATURE)
        .u8(0) // checksum of the first 20 bytes
        .bytes(OEM_ID)
        .u8(2) // revision: ACPI 2.0+, XSDT present
        .u32(rsdt_addr as u32)
        .u32(RSDP_LEN as u32)
        .u64(xsdt_addr)
        .u8(0) // extended checksum
        .bytes(&[0; 3]);
    rsdp.fix_checksum(8, 0..20);
    rsdp.fix_checksum(32, 0..RSDP_LEN);

    vec![
        Placed {
            name: "RSDP",
            addr: start,
            bytes: rsdp.0,
            limit: xsdt_addr,
        },
        Placed {
            name: "XSDT",
            addr: xsdt_addr,
            bytes: finish(xsdt),
            limit: rsdt_addr,
        },
        Placed {
            name: "RSDT",
            addr: rsdt_addr,
            bytes: finish(rsdt),
            limit: madt_addr,
        },
        Placed {
            name: "MADT",
            addr: madt_addr,
            bytes: madt,
            limit,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::super::write_tables;
    use super::*;
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

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// Read a description table, checking its signature and checksum.
    fn table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, addr, SDT_HEADER_LEN);
        assert_eq!(&header[..4], sig);
        let t = read(mem, addr, u32_at(&header, 4) as usize);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    /// Find the RSDP like an OS (16-byte steps over 0xE0000-0xFFFFF) and
    /// follow both the XSDT and the RSDT to the MADT.
    fn find_madt(mem: &GuestMemoryMmap) -> Vec<u8> {
        let area = read(mem, 0xE_0000, 0x2_0000);
        let at = (0..area.len())
            .step_by(16)
            .find(|&i| &area[i..i + 8] == RSDP_SIGNATURE)
            .expect("RSDP");
        let rsdp = &area[at..at + 36];
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "revision 2");
        assert_eq!(u32_at(rsdp, 20), 36);

        let rsdt = table(mem, u64::from(u32_at(rsdp, 16)), b"RSDT");
        assert_eq!(rsdt.len(), SDT_HEADER_LEN + 4);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table(mem, xsdt_addr, b"XSDT");
        assert_eq!(xsdt.len(), SDT_HEADER_LEN + 8);
        let via_xsdt = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        assert_eq!(
            via_xsdt,
            u64::from(u32_at(&rsdt, 36)),
            "RSDT and XSDT agree"
        );
        table(mem, via_xsdt, b"APIC")
    }

    /// The MADT's structures as (type, bytes), checking lengths add up.
    fn structures(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = SDT_HEADER_LEN + 8;
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            out.push((kind, madt[at..at + len].to_vec()));
            at += len;
        }
        assert_eq!(at, madt.len());
        out
    }

    fn of(s: &[(u8, Vec<u8>)], kind: u8) -> Vec<Vec<u8>> {
        s.iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, b)| b.clone())
            .collect()
    }

    #[test]
    fn madt_header_has_lapic_base_and_pcat_compat() {
        let mem = ram();
        write_tables(&mem, 2, crate::firmware::IOAPIC_VERSION).unwrap();
        let madt = find_madt(&mem);
        assert_eq!(u32_at(&madt, 36), 0xFEE0_0000);
        assert_eq!(u32_at(&madt, 40), madt::PCAT_COMPAT);
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_cpu() {
        let mem = ram();
        write_tables(&mem, 4, crate::firmware::IOAPIC_VERSION).unwrap();
        let s = structures(&find_madt(&mem));
        let lapics = of(&s, madt::LOCAL_APIC);
        assert_eq!(lapics.len(), 4);
        for (i, l) in lapics.iter().enumerate() {
            assert_eq!(l, &vec![0, 8, i as u8, i as u8, 1, 0, 0, 0]);
        }
        assert!(of(&s, madt::LOCAL_X2APIC).is_empty());
    }

    #[test]
    fn madt_ioapic_at_fec00000_with_gsi_base_0() {
        let mem = ram();
        write_tables(&mem, 4, crate::firmware::IOAPIC_VERSION).unwrap();
        let io = of(&structures(&find_madt(&mem)), madt::IOAPIC);
        assert_eq!(
            io,
            vec![vec![1, 12, 0, 0, 0x00, 0x00, 0xC0, 0xFE, 0, 0, 0, 0]]
        );
    }

    #[test]
    fn madt_overrides_irq0_to_gsi2() {
        let mem = ram();
        write_tables(&mem, 1, crate::firmware::IOAPIC_VERSION).unwrap();
        let iso = of(
            &structures(&find_madt(&mem)),
            madt::INTERRUPT_SOURCE_OVERRIDE,
        );
        assert_eq!(iso, vec![vec![2, 10, 0, 0, 2, 0, 0, 0, 0, 0]]);
    }

    #[test]
    fn madt_lint1_is_nmi_for_all_processors() {
        let mem = ram();
        write_tables(&mem, 1, crate::firmware::IOAPIC_VERSION).unwrap();
        let nmi = of(&structures(&find_madt(&mem)), madt::LOCAL_APIC_NMI);
        assert_eq!(nmi, vec![vec![4, 6, 0xFF, 0, 0, 1]]);
    }

    #[test]
    fn madt_with_255_cpus_uses_only_xapic_entries() {
        let mem = ram();
        write_tables(&mem, 255, crate::firmware::IOAPIC_VERSION).unwrap();
        let s = structures(&find_madt(&mem));
        let lapics = of(&s, madt::LOCAL_APIC);
        assert_eq!(lapics.len(), 255);
        assert_eq!(lapics[254][3], 254);
        assert!(of(&s, madt::LOCAL_X2APIC).is_empty());
        assert_eq!(
            of(&s, madt::IOAPIC)[0][2],
            0,
            "IOAPIC ID when CPUs use 0-254"
        );
    }

    #[test]
    fn madt_lists_ids_above_254_as_x2apic() {
        let mem = ram();
        write_tables(&mem, 256, crate::firmware::IOAPIC_VERSION).unwrap();
        let madt = find_madt(&mem);
        assert_eq!(madt[8], 3, "revision 3 for x2APIC structures");
        let s = structures(&madt);
        assert_eq!(of(&s, madt::LOCAL_APIC).len(), 255);
        let x2 = of(&s, madt::LOCAL_X2APIC);
        assert_eq!(
            x2,
            vec![vec![9, 16, 0, 0, 255, 0, 0, 0, 1, 0, 0, 0, 255, 0, 0, 0]]
        );
        let x2nmi = of(&s, madt::LOCAL_X2APIC_NMI);
        assert_eq!(
            x2nmi,
            vec![vec![10, 12, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 1, 0, 0, 0]]
        );
    }

    #[test]
    fn tables_stay_inside_firmware_area() {
        for t in build(256, 0xE_0000, 0xF_0000) {
            assert!(t.addr >= 0xE_0000 && t.addr + t.bytes.len() as u64 <= t.limit);
            assert!(t.limit <= 0xF_0000);
        }
    }
}
