//! vCPU creation, CPUID and boot register state.

use crate::kick::VcpuKick;
use crate::stats::ExitCounters;
use crate::vm::Vm;
use crate::{ioctl_err, Result};
use kvm_bindings::{kvm_segment, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuFd;
use std::sync::Arc;

/// The value a multiboot loader leaves in EAX.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;

/// One vCPU: its fd (used only by its own thread once running), its kick
/// handle and its exit counters (both shareable).
pub struct Vcpu {
    index: u32,
    pub(crate) fd: VcpuFd,
    pub(crate) run_size: usize,
    kick: Arc<VcpuKick>,
    counters: Arc<ExitCounters>,
}

impl Vcpu {
    /// Creates vCPU `index` (also its APIC ID) of a `cpus`-vCPU machine,
    /// with KVM's supported CPUID adjusted to report that APIC ID.
    pub fn new(vm: &Vm, index: u32, cpus: u32) -> Result<Self> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = vm
            .kvm()
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        set_apic_id(&mut cpuid, index, cpus);
        fd.set_cpuid2(&cpuid).map_err(ioctl_err("KVM_SET_CPUID2"))?;
        let run_size = vm
            .kvm()
            .get_vcpu_mmap_size()
            .map_err(ioctl_err("KVM_GET_VCPU_MMAP_SIZE"))?;
        let kick = Arc::new(VcpuKick::new(&fd, run_size)?);
        Ok(Vcpu {
            index,
            fd,
            run_size,
            kick,
            counters: Arc::new(ExitCounters::default()),
        })
    }

    /// Index of this vCPU (equal to its APIC ID).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The vCPU fd, for backend setup (LAPIC state, MP state, ...).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The kick handle.
    pub fn kick(&self) -> &Arc<VcpuKick> {
        &self.kick
    }

    /// The live exit counters.
    pub fn counters(&self) -> &Arc<ExitCounters> {
        &self.counters
    }

    /// Multiboot entry state: 32-bit protected mode with flat 4 GiB code and
    /// data segments, paging off, IF=0, EAX = magic, EBX = info address.
    pub fn set_protected_mode_entry(&self, eip: u32, ebx: u32) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
        let flat = |selector: u16, type_: u8| kvm_segment {
            base: 0,
            limit: 0xFFFF_FFFF,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        // Execute/read accessed code, read/write accessed data.
        sregs.cs = flat(0x08, 0xB);
        let data = flat(0x10, 0x3);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        // PE plus ET (always set on anything newer than a 386).
        sregs.cr0 = (sregs.cr0 & !0x8000_0000) | 0x11;
        sregs.cr4 = 0;
        sregs.efer = 0;
        self.fd
            .set_sregs(&sregs)
            .map_err(ioctl_err("KVM_SET_SREGS"))?;
        let mut regs = self.fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
        regs.rip = u64::from(eip);
        regs.rax = u64::from(MULTIBOOT_BOOTLOADER_MAGIC);
        regs.rbx = u64::from(ebx);
        regs.rflags = 0x2;
        self.fd.set_regs(&regs).map_err(ioctl_err("KVM_SET_REGS"))
    }

    /// Real-mode entry at `cs:ip` = `0:ip` (used by tests' tiny guests).
    pub fn set_real_mode_entry(&self, ip: u16) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        self.fd
            .set_sregs(&sregs)
            .map_err(ioctl_err("KVM_SET_SREGS"))?;
        let mut regs = self.fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
        regs.rip = u64::from(ip);
        regs.rflags = 0x2;
        regs.rsp = 0x8000;
        self.fd.set_regs(&regs).map_err(ioctl_err("KVM_SET_REGS"))
    }
}

/// Makes CPUID report `apic_id`: leaf 1 EBX[31:24] (initial APIC ID) and
/// EBX[23:16] (logical processors per package), and the x2APIC ID in EDX of
/// every subleaf of 0xB and 0x1F.
pub fn set_apic_id(cpuid: &mut CpuId, apic_id: u32, cpus: u32) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                let count = cpus.clamp(1, 255);
                e.ebx = (e.ebx & 0x0000_FFFF) | (count << 16) | ((apic_id & 0xFF) << 24);
                // HTT: the count field above is valid.
                e.edx |= 1 << 28;
            }
            0xB | 0x1F => e.edx = apic_id,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_lands_in_leaf_1_and_topology_leaves() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xAB00_1234,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xB,
                index: 1,
                edx: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x1F,
                edx: 7,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        set_apic_id(&mut cpuid, 5, 8);
        let s = cpuid.as_slice();
        assert_eq!(s[0].ebx, 0x0508_1234);
        assert_eq!(s[1].edx, 5);
        assert_eq!(s[2].edx, 5);
    }
}
