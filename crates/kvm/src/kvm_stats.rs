//! KVM's own per-vCPU statistics, read through `KVM_GET_STATS_FD` (the
//! binary statistics interface, Linux 5.14+).
//!
//! Unlike [`crate::stats`], which counts only the exits that reach this
//! process, these count every exit KVM sees, including the ones it handles
//! itself (in-kernel LAPIC accesses, halt polling, ...).
//!
//! The file is laid out as a header, an id string, one descriptor per
//! statistic (with its name inline) and a data block of `u64`s; the layout
//! is read once and the data block re-read on every [`VcpuStats::read`].

use crate::{Error, Result};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

mod ioctls {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);
}

/// Size of `struct kvm_stats_header`.
const HEADER_SIZE: usize = 24;
/// Size of `struct kvm_stats_desc` without its trailing name.
const DESC_FIXED_SIZE: usize = 16;
/// Bounds on what a sane kernel reports; beyond them the file is not read.
const MAX_DESCS: u32 = 4096;
const MAX_NAME_SIZE: u32 = 4096;

/// `struct kvm_stats_header`: where the parts of the file are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsHeader {
    /// Bytes reserved for each descriptor's name, NUL included.
    pub name_size: u32,
    /// Number of descriptors.
    pub num_desc: u32,
    /// File offset of the descriptor block.
    pub desc_offset: u32,
    /// File offset of the data block.
    pub data_offset: u32,
}

impl StatsHeader {
    /// Decodes the header from the first bytes of the file.
    pub fn parse(b: &[u8; HEADER_SIZE]) -> Result<Self> {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let h = StatsHeader {
            name_size: word(4),
            num_desc: word(8),
            desc_offset: word(16),
            data_offset: word(20),
        };
        if h.num_desc > MAX_DESCS || h.name_size > MAX_NAME_SIZE {
            return Err(Error::StatsFormat(format!("implausible header {h:?}")));
        }
        Ok(h)
    }

    /// Bytes of one descriptor, name included.
    fn desc_size(&self) -> usize {
        DESC_FIXED_SIZE + self.name_size as usize
    }
}

/// What a statistic measures (`KVM_STATS_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatKind {
    /// A counter that only grows.
    Cumulative,
    /// A current value.
    Instant,
    /// The highest value seen.
    Peak,
    /// A histogram with equal buckets.
    LinearHistogram,
    /// A histogram with power-of-two buckets.
    LogHistogram,
    /// A type this code does not know.
    Unknown(u32),
}

impl StatKind {
    fn from_flags(flags: u32) -> Self {
        match flags & kvm_bindings::KVM_STATS_TYPE_MASK {
            kvm_bindings::KVM_STATS_TYPE_CUMULATIVE => StatKind::Cumulative,
            kvm_bindings::KVM_STATS_TYPE_INSTANT => StatKind::Instant,
            kvm_bindings::KVM_STATS_TYPE_PEAK => StatKind::Peak,
            kvm_bindings::KVM_STATS_TYPE_LINEAR_HIST => StatKind::LinearHistogram,
            kvm_bindings::KVM_STATS_TYPE_LOG_HIST => StatKind::LogHistogram,
            t => StatKind::Unknown(t),
        }
    }
}

/// One `struct kvm_stats_desc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatDesc {
    /// The statistic's name, e.g. `exits`.
    pub name: String,
    /// What it measures.
    pub kind: StatKind,
    /// Number of `u64` values (1 except for histograms).
    pub size: u16,
    /// Offset of its values from the start of the data block.
    pub offset: u32,
}

/// Decodes `header.num_desc` descriptors from the descriptor block.
pub fn parse_descriptors(header: &StatsHeader, block: &[u8]) -> Result<Vec<StatDesc>> {
    let size = header.desc_size();
    if block.len() < size * header.num_desc as usize {
        return Err(Error::StatsFormat("descriptor block too short".into()));
    }
    let descs = block
        .chunks_exact(size)
        .take(header.num_desc as usize)
        .map(|d| {
            let word = |i: usize| u32::from_ne_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
            let name = &d[DESC_FIXED_SIZE..];
            let len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
            StatDesc {
                name: String::from_utf8_lossy(&name[..len]).into_owned(),
                kind: StatKind::from_flags(word(0)),
                size: u16::from_ne_bytes([d[6], d[7]]),
                offset: word(8),
            }
        })
        .collect();
    Ok(descs)
}

/// Whether this host's KVM offers binary statistics (`KVM_CAP_BINARY_STATS_FD`).
pub fn supported() -> bool {
    kvm_ioctls::Kvm::new().is_ok_and(|kvm| {
        kvm.check_extension_raw(libc::c_ulong::from(kvm_bindings::KVM_CAP_BINARY_STATS_FD)) > 0
    })
}

/// An open statistics file of one vCPU. It keeps the VM alive, so it can be
/// read after the vCPU's own fd is closed (e.g. after the run ended).
#[derive(Debug)]
pub struct VcpuStats {
    file: File,
    data_offset: u64,
    descs: Vec<StatDesc>,
}

impl VcpuStats {
    /// Opens the vCPU's statistics; fails on kernels without
    /// `KVM_CAP_BINARY_STATS_FD`.
    pub fn open(vcpu: &VcpuFd) -> Result<Self> {
        // SAFETY: `vcpu` is a valid vCPU fd; KVM_GET_STATS_FD takes no
        // argument and returns a new fd or -1.
        let fd = unsafe { vmm_sys_util::ioctl::ioctl(vcpu, ioctls::KVM_GET_STATS_FD()) };
        if fd < 0 {
            return Err(Error::Ioctl("KVM_GET_STATS_FD", kvm_ioctls::Error::last()));
        }
        // SAFETY: the kernel just created `fd` for us and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut head = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut head, 0).map_err(Error::StatsIo)?;
        let header = StatsHeader::parse(&head)?;
        let mut block = vec![0u8; header.desc_size() * header.num_desc as usize];
        file.read_exact_at(&mut block, u64::from(header.desc_offset))
            .map_err(Error::StatsIo)?;
        let descs = parse_descriptors(&header, &block)?;
        Ok(VcpuStats {
            file,
            data_offset: u64::from(header.data_offset),
            descs,
        })
    }

    /// The statistics this kernel offers.
    pub fn descriptors(&self) -> &[StatDesc] {
        &self.descs
    }

    /// Current value of every single-valued statistic, by name.
    pub fn read(&self) -> Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for d in self.descs.iter().filter(|d| d.size == 1) {
            let mut v = [0u8; 8];
            self.file
                .read_exact_at(&mut v, self.data_offset + u64::from(d.offset))
                .map_err(Error::StatsIo)?;
            out.insert(d.name.clone(), u64::from_ne_bytes(v));
        }
        Ok(out)
    }

    /// The exit counters, as [`KvmExits`].
    pub fn exits(&self) -> Result<KvmExits> {
        Ok(KvmExits::from_stats(&self.read()?))
    }
}

/// KVM's exit-related counters of one vCPU (or a sum over vCPUs). A counter
/// this kernel does not have reads 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmExits {
    /// Every exit from the guest, handled in the kernel or not.
    pub exits: u64,
    /// Exits for a host interrupt.
    pub irq_exits: u64,
    /// HLT exits.
    pub halt_exits: u64,
    /// Interrupt-window exits.
    pub irq_window_exits: u64,
    /// NMI-window exits.
    pub nmi_window_exits: u64,
    /// Port I/O exits.
    pub io_exits: u64,
    /// MMIO exits to userspace.
    pub mmio_exits: u64,
    /// Returns to userspace for a pending signal.
    pub signal_exits: u64,
    /// Returns to userspace asking for an interrupt window.
    pub request_irq_exits: u64,
    /// Halts that ended while polling, without sleeping.
    pub halt_successful_poll: u64,
    /// Halts that polled.
    pub halt_attempted_poll: u64,
    /// Wake-ups from a sleeping halt.
    pub halt_wakeup: u64,
    /// Interrupts KVM injected (its own or from `KVM_INTERRUPT`).
    pub irq_injections: u64,
    /// Instructions KVM emulated (MMIO to its LAPIC, port I/O, ...).
    pub insn_emulation: u64,
}

impl KvmExits {
    /// Picks the counters out of a full [`VcpuStats::read`].
    pub fn from_stats(stats: &BTreeMap<String, u64>) -> Self {
        let get = |name: &str| stats.get(name).copied().unwrap_or(0);
        KvmExits {
            exits: get("exits"),
            irq_exits: get("irq_exits"),
            halt_exits: get("halt_exits"),
            irq_window_exits: get("irq_window_exits"),
            nmi_window_exits: get("nmi_window_exits"),
            io_exits: get("io_exits"),
            mmio_exits: get("mmio_exits"),
            signal_exits: get("signal_exits"),
            request_irq_exits: get("request_irq_exits"),
            halt_successful_poll: get("halt_successful_poll"),
            halt_attempted_poll: get("halt_attempted_poll"),
            halt_wakeup: get("halt_wakeup"),
            irq_injections: get("irq_injections"),
            insn_emulation: get("insn_emulation"),
        }
    }

    /// `(name, count)` pairs in report order, `exits` first.
    pub fn named(&self) -> [(&'static str, u64); 14] {
        [
            ("exits", self.exits),
            ("irq_exits", self.irq_exits),
            ("halt_exits", self.halt_exits),
            ("irq_window_exits", self.irq_window_exits),
            ("nmi_window_exits", self.nmi_window_exits),
            ("io_exits", self.io_exits),
            ("mmio_exits", self.mmio_exits),
            ("signal_exits", self.signal_exits),
            ("request_irq_exits", self.request_irq_exits),
            ("halt_successful_poll", self.halt_successful_poll),
            ("halt_attempted_poll", self.halt_attempted_poll),
            ("halt_wakeup", self.halt_wakeup),
            ("irq_injections", self.irq_injections),
            ("insn_emulation", self.insn_emulation),
        ]
    }

    /// Adds another vCPU's counters to these.
    pub fn add(&mut self, o: &KvmExits) {
        let KvmExits {
            exits,
            irq_exits,
            halt_exits,
            irq_window_exits,
            nmi_window_exits,
            io_exits,
            mmio_exits,
            signal_exits,
            request_irq_exits,
            halt_successful_poll,
            halt_attempted_poll,
            halt_wakeup,
            irq_injections,
            insn_emulation,
        } = *o;
        self.exits += exits;
        self.irq_exits += irq_exits;
        self.halt_exits += halt_exits;
        self.irq_window_exits += irq_window_exits;
        self.nmi_window_exits += nmi_window_exits;
        self.io_exits += io_exits;
        self.mmio_exits += mmio_exits;
        self.signal_exits += signal_exits;
        self.request_irq_exits += request_irq_exits;
        self.halt_successful_poll += halt_successful_poll;
        self.halt_attempted_poll += halt_attempted_poll;
        self.halt_wakeup += halt_wakeup;
        self.irq_injections += irq_injections;
        self.insn_emulation += insn_emulation;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irqchip::NoIrqchip;
    use crate::machine::Machine;
    use crate::testutil::{kvm_or_skip, memory_with, RecordingHandler};
    use crate::{IrqchipBackend, Vcpu, Vm};
    use std::sync::Arc;

    fn desc(flags: u32, size: u16, offset: u32, name: &str, name_size: usize) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend(flags.to_ne_bytes());
        d.extend(0i16.to_ne_bytes());
        d.extend(size.to_ne_bytes());
        d.extend(offset.to_ne_bytes());
        d.extend(0u32.to_ne_bytes());
        let mut n = name.as_bytes().to_vec();
        n.resize(name_size, 0);
        d.extend(n);
        d
    }

    #[test]
    fn parses_header_and_descriptors() {
        let mut h = [0u8; HEADER_SIZE];
        for (i, v) in [0u32, 8, 2, 24, 40, 100].iter().enumerate() {
            h[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        let header = StatsHeader::parse(&h).unwrap();
        assert_eq!(header.num_desc, 2);
        assert_eq!(header.data_offset, 100);
        let mut block = desc(0, 1, 0, "exits", 8);
        block.extend(desc(
            kvm_bindings::KVM_STATS_TYPE_LOG_HIST,
            32,
            8,
            "halt_hist",
            8,
        ));
        let d = parse_descriptors(&header, &block).unwrap();
        assert_eq!(d[0].name, "exits");
        assert_eq!(d[0].kind, StatKind::Cumulative);
        assert_eq!(
            (d[1].kind, d[1].size, d[1].offset),
            (StatKind::LogHistogram, 32, 8)
        );
        assert!(parse_descriptors(&header, &block[..20]).is_err());
        h[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(StatsHeader::parse(&h).is_err());
    }

    /// A real vCPU that does two port writes: KVM counts at least those
    /// exits, and the file stays readable after the run.
    #[test]
    fn counts_a_real_vcpus_exits() {
        if !kvm_or_skip() {
            return;
        }
        // mov al,1; out 0x80,al; mov al,0; out 0xf4,al; hlt
        let code: &[u8] = &[0xB0, 0x01, 0xE6, 0x80, 0xB0, 0x00, 0xE6, 0xF4, 0xF4];
        let mem = memory_with(&[(0x1000, code)]);
        let mut vm = Vm::new().unwrap();
        vm.register_memory(&mem).unwrap();
        let backend: Arc<dyn IrqchipBackend> = Arc::new(NoIrqchip);
        backend.setup_vm(&vm).unwrap();
        let vcpu = Vcpu::new(&vm, 0, 1).unwrap();
        backend.setup_vcpu(&vcpu, true).unwrap();
        vcpu.set_real_mode_entry(0x1000).unwrap();
        if !supported() {
            eprintln!("SKIPPED: no binary statistics on this kernel");
            return;
        }
        let stats = VcpuStats::open(vcpu.fd()).unwrap();
        for name in ["exits", "io_exits", "halt_exits"] {
            assert!(stats.descriptors().iter().any(|d| d.name == name), "{name}");
        }
        let before = stats.exits().unwrap();
        let handler = Arc::new(RecordingHandler::new(|_, _| {}));
        let out = Machine::new(vec![vcpu], backend)
            .run(handler, Some(std::time::Duration::from_secs(10)))
            .unwrap();
        assert_eq!(out.vcpus[0].exits.io, 2);
        let after = stats.exits().unwrap();
        // Only the total: which per-reason counters a kernel bumps depends
        // on how it runs the guest (this host emulates ring 0 and counts
        // no io_exits).
        assert!(after.exits >= before.exits + 2, "{before:?} {after:?}");
        let mut sum = before;
        sum.add(&after);
        assert_eq!(sum.exits, before.exits + after.exits);
    }
}
