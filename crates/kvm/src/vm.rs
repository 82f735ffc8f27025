//! The VM: `/dev/kvm`, the VM file descriptor and guest memory slots.

use crate::{ioctl_err, Error, Result};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use std::sync::Arc;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Where KVM may put the three pages of its real-mode TSS (Intel needs one).
/// Just below the BIOS area at the top of 4 GiB, clear of the IOAPIC
/// (0xFEC00000) and LAPIC (0xFEE00000) windows, as QEMU and Firecracker do.
pub const TSS_ADDRESS: u64 = 0xFFFB_D000;
/// Where KVM may put its identity-map page table for unpaged guests (Intel).
pub const IDENTITY_MAP_ADDRESS: u64 = 0xFFFB_C000;

/// One KVM virtual machine.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    /// Kept so the host mappings outlive the memory slots that point at them.
    memory: Option<GuestMemoryMmap>,
}

impl Vm {
    /// Opens `/dev/kvm` and creates an empty VM with its TSS and identity map
    /// placed (both must be set before any vCPU exists).
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let fd = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        fd.set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(ioctl_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.set_tss_address(TSS_ADDRESS as usize)
            .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            memory: None,
        })
    }

    /// Whether `/dev/kvm` can be opened at all.
    pub fn available() -> bool {
        Kvm::new().is_ok()
    }

    /// The system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd, shared with the irqchip backend and devices.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Most vCPUs this host's KVM accepts in one VM.
    pub fn max_vcpus(&self) -> u32 {
        u32::try_from(self.kvm.get_max_vcpus()).unwrap_or(u32::MAX)
    }

    /// Registers every region of `memory` as one KVM memory slot each.
    pub fn register_memory(&mut self, memory: &GuestMemoryMmap) -> Result<()> {
        for (slot, region) in memory.iter().enumerate() {
            let addr = region.start_addr().0;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::Memory {
                    addr,
                    reason: e.to_string(),
                })?;
            let slot = u32::try_from(slot).map_err(|_| Error::Memory {
                addr,
                reason: "too many regions".into(),
            })?;
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: addr,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mmap owned by `memory`, which we
            // clone into `self` below, so it outlives the VM's use of it.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        self.memory = Some(memory.clone());
        Ok(())
    }
}
