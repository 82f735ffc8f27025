//! The BSP's LAPIC as a PC BIOS leaves it: software-enabled, LINT0 taking
//! the 8259A's ExtINT (virtual wire mode) and LINT1 as NMI. APs keep their
//! reset state (LVTs masked) until the guest programs them. Every mode starts
//! the guest from this same state: KVM's LAPIC (kernel and split modes) is
//! set here, our LAPIC model by `Lapic::setup_virtual_wire`.

use crate::vcpu::Vcpu;
use crate::{ioctl_err, Result};

const APIC_SVR: usize = 0xF0;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// SVR: software enable (bit 8) with spurious vector 0xFF.
const SVR_ENABLED: u32 = 0x1FF;
/// LVT delivery modes (bits 10:8), unmasked.
const LVT_EXTINT: u32 = 0b111 << 8;
const LVT_NMI: u32 = 0b100 << 8;

/// Puts KVM's LAPIC of the BSP into virtual wire mode. APs keep their reset
/// registers, but their page is written back unchanged too: without that
/// KVM_SET_LAPIC, INIT/SIPI from the BSP never started an AP on our hosts
/// (QEMU also sets every vCPU's LAPIC at reset, the path KVM is used to).
pub fn setup_kvm_lapic(vcpu: &Vcpu, boot: bool) -> Result<()> {
    let mut lapic = vcpu.fd().get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?;
    if boot {
        for (offset, value) in [
            (APIC_SVR, SVR_ENABLED),
            (APIC_LVT0, LVT_EXTINT),
            (APIC_LVT1, LVT_NMI),
        ] {
            write_reg(&mut lapic.regs, offset, value);
        }
    }
    vcpu.fd()
        .set_lapic(&lapic)
        .map_err(ioctl_err("KVM_SET_LAPIC"))
}

/// Reads a 32-bit register of a `kvm_lapic_state` page.
#[cfg(test)]
fn read_reg(regs: &[libc::c_char; 1024], offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, out) in b.iter_mut().enumerate() {
        *out = regs.get(offset + i).map_or(0, |&c| c as u8);
    }
    u32::from_le_bytes(b)
}

/// Writes a 32-bit register of a `kvm_lapic_state` page.
fn write_reg(regs: &mut [libc::c_char; 1024], offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        if let Some(slot) = regs.get_mut(offset + i) {
            *slot = byte as libc::c_char;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_page_access_is_little_endian_and_bounded() {
        let mut regs = [0 as libc::c_char; 1024];
        write_reg(&mut regs, APIC_LVT0, LVT_EXTINT);
        assert_eq!(read_reg(&regs, APIC_LVT0), 0x700);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        // Past the end: ignored on write, zero on read.
        write_reg(&mut regs, 1022, 0xFFFF_FFFF);
        assert_eq!(read_reg(&regs, 1022), 0xFFFF);
    }
}
