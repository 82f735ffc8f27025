//! One virtual machine run: memory, image, firmware tables, vCPUs, devices,
//! the mode's irqchip backend, and the outcome as an exit status.
//!
//! Exit statuses (the guest's isa-debug-exit statuses `(v << 1) | 1` are odd,
//! so VMM failures use even ones and never collide):
//! 2 bad input, 4 triple fault, 6 unhandled exit / KVM internal error /
//! emulation failure, 8 timeout, 10 host failure (e.g. no usable /dev/kvm).

pub mod exits;
pub mod lines;

use crate::devices::passthrough::{self, PassthroughLine};
use crate::devices::ring::{self, RingDevice};
use crate::devices::{platform_devices, PlatformConfig};
use crate::stats::{GuestChecks, GuestCounts, RaiseCounters, RunStats};
use crate::{firmware, loader};
use exits::PlatformExits;
use lines::BackendLines;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use virq::pit::LostTickPolicy;
use virq_kvm::irqchip::{KernelIrqchip, SplitIrqchip, UserspaceIrqchip};
use virq_kvm::sources::InterruptSources;
use virq_kvm::{
    IrqchipBackend, IrqchipMode, KvmExits, Machine, StopCause, Vcpu, VcpuStats, VcpuStop, Vm,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// virq's exit statuses for VMM-side outcomes.
pub mod exit_code {
    /// Bad input: image, flags, or an unsupported combination.
    pub const BAD_INPUT: i32 = 2;
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`).
    pub const TRIPLE_FAULT: i32 = 4;
    /// Unhandled exit, KVM internal error or emulation failure.
    pub const VM_FAILURE: i32 = 6;
    /// `--timeout` passed.
    pub const TIMEOUT: i32 = 8;
    /// The host could not run the VM (no /dev/kvm, an ioctl failed).
    pub const HOST_FAILURE: i32 = 10;
}

/// Start of the hole below 4 GiB kept free of RAM: the IOAPIC (0xFEC00000),
/// the LAPIC (0xFEE00000) and KVM's TSS/identity map pages live in it.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// Where RAM above the hole continues.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Where the guest's serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOut {
    /// The process's stdout.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Nowhere (the console log still keeps a copy).
    Discard,
}

impl SerialOut {
    /// `stdout` or a file name, as `--serial` spells it.
    pub fn from_arg(s: &str) -> Self {
        if s == "stdout" {
            SerialOut::Stdout
        } else {
            SerialOut::File(PathBuf::from(s))
        }
    }

    fn open(&self) -> Result<Box<dyn Write + Send>, VmError> {
        Ok(match self {
            SerialOut::Stdout => Box::new(std::io::stdout()),
            SerialOut::Discard => Box::new(std::io::sink()),
            SerialOut::File(p) => Box::new(std::fs::File::create(p).map_err(|e| {
                VmError::BadInput(format!("cannot create serial file {}: {e}", p.display()))
            })?),
        })
    }
}

/// How to run one VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Irqchip mode.
    pub mode: IrqchipMode,
    /// Number of vCPUs.
    pub cpus: u32,
    /// RAM in MiB.
    pub ram_mib: u64,
    /// Stop after this long.
    pub timeout: Option<Duration>,
    /// Guest command line.
    pub cmdline: String,
    /// Serial output.
    pub serial: SerialOut,
    /// What our PIT does with ticks the guest has not taken yet (split and
    /// userspace modes; KVM's own PIT always reinjects).
    pub pit_lost_ticks: LostTickPolicy,
    /// What our LAPICs' periodic timers do with missed periods (userspace
    /// mode; KVM's LAPIC always discards).
    pub lapic_lost_ticks: LostTickPolicy,
    /// Longest adaptive halt poll of a halted vCPU (userspace mode).
    pub halt_poll: Duration,
}

/// A run that could not start.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Bad image, flag or combination; nothing was started.
    #[error("{0}")]
    BadInput(String),
    /// The host could not set the VM up.
    #[error("{0}")]
    Host(String),
}

impl VmError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmError::BadInput(_) => exit_code::BAD_INPUT,
            VmError::Host(_) => exit_code::HOST_FAILURE,
        }
    }
}

fn host<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> VmError {
    move |e| VmError::Host(format!("{what}: {e}"))
}

/// What a finished run produced.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// virq's exit status.
    pub exit_code: i32,
    /// The one-line failure message, for every end but a guest exit.
    pub failure: Option<String>,
    /// Statistics.
    pub stats: RunStats,
    /// The guest's serial output.
    pub console: String,
}

/// Guest RAM ranges for `ram_bytes`: from 0 up to the MMIO hole, the rest
/// from 4 GiB.
pub fn ram_ranges(ram_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = ram_bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if ram_bytes > low {
        ranges.push((GuestAddress(HIGH_RAM_START), (ram_bytes - low) as usize));
    }
    ranges
}

/// The irqchip backend of `mode` for `vm`: KVM's devices, KVM's LAPICs with
/// our PIC/IOAPIC/PIT, or all of it ours.
fn make_backend(cfg: &VmConfig, vm: &Vm, memory: &GuestMemoryMmap) -> Arc<dyn IrqchipBackend> {
    let cpus = cfg.cpus as usize;
    match cfg.mode {
        IrqchipMode::Kernel => Arc::new(KernelIrqchip::new(vm.fd().clone())),
        IrqchipMode::Split => {
            Arc::new(SplitIrqchip::new(vm.fd().clone(), cpus, cfg.pit_lost_ticks))
        }
        IrqchipMode::Userspace => Arc::new(
            UserspaceIrqchip::new(vm.fd().clone(), cpus, cfg.pit_lost_ticks)
                .with_lapic_timer_policy(cfg.lapic_lost_ticks)
                .with_halt_poll(cfg.halt_poll)
                .with_guest_memory(memory.clone()),
        ),
    }
}

/// Loads `image` and runs it to the end.
pub fn run_image(cfg: &VmConfig, image: &[u8]) -> Result<RunResult, VmError> {
    let ram_bytes = cfg.ram_mib << 20;

    // Everything that depends only on the input first, so bad input never
    // starts anything.
    let memory = GuestMemoryMmap::from_ranges(&ram_ranges(ram_bytes))
        .map_err(host("cannot allocate guest memory"))?;
    let boot = loader::load_multiboot(&memory, image, &cfg.cmdline, ram_bytes)
        .map_err(|e| VmError::BadInput(format!("cannot load image: {e}")))?;
    // The MP table gives the IOAPIC's version: KVM's in-kernel one is 0x11.
    let ioapic_version = match cfg.mode {
        IrqchipMode::Kernel => 0x11,
        IrqchipMode::Split | IrqchipMode::Userspace => firmware::IOAPIC_VERSION,
    };
    firmware::write_tables(&memory, cfg.cpus, ioapic_version)
        .map_err(|e| VmError::BadInput(format!("cannot write firmware tables: {e}")))?;
    let serial_out = cfg.serial.open()?;

    let mut vm = Vm::new().map_err(host("cannot create VM"))?;
    if cfg.cpus > vm.max_vcpus() {
        return Err(VmError::BadInput(format!(
            "{} vCPUs requested, this host's KVM supports at most {}",
            cfg.cpus,
            vm.max_vcpus()
        )));
    }
    vm.register_memory(&memory)
        .map_err(host("cannot register guest memory"))?;
    let backend = make_backend(cfg, &vm, &memory);
    backend
        .setup_vm(&vm)
        .map_err(host("cannot set up the irqchip"))?;

    let mut vcpus = Vec::new();
    for index in 0..cfg.cpus {
        let vcpu = Vcpu::new(&vm, index, cfg.cpus).map_err(host("cannot create vCPU"))?;
        let bsp = index == 0;
        backend
            .setup_vcpu(&vcpu, bsp)
            .map_err(host("cannot set up vCPU"))?;
        if bsp {
            vcpu.set_protected_mode_entry(boot.entry, boot.mbi_addr)
                .map_err(host("cannot set the boot vCPU's registers"))?;
        }
        vcpus.push(vcpu);
    }

    let raises = Arc::new(RaiseCounters::default());
    let lines = Arc::new(BackendLines::new(backend.clone(), raises.clone()));
    let platform = PlatformConfig {
        cpus: cfg.cpus,
        ram_bytes,
    };
    let mut bus = platform_devices(&platform, lines, serial_out)
        .map_err(host("cannot build the platform devices"))?;
    let sources = Arc::new(
        InterruptSources::new(vm.fd().clone(), backend.clone())
            .map_err(host("cannot start the interrupt sources"))?,
    );
    let ring = RingDevice::new(sources.clone(), memory.clone())
        .map_err(host("cannot create the ring device"))?;
    bus.insert(ring::BASE, ring::PORT_COUNT, Arc::new(Mutex::new(ring)))
        .map_err(host("cannot place the ring device"))?;
    let line =
        PassthroughLine::new(&sources).map_err(host("cannot create the pass-through line"))?;
    bus.insert(
        passthrough::BASE,
        passthrough::PORT_COUNT,
        Arc::new(Mutex::new(line)),
    )
    .map_err(host("cannot place the pass-through line"))?;
    let console = bus.console();
    let exits = Arc::new(PlatformExits::new(bus));

    tracing::info!(
        mode = cfg.mode.name(),
        cpus = cfg.cpus,
        entry = boot.entry,
        "starting"
    );
    // Opened before the run: the files outlive the vCPU fds the run closes.
    let kvm_stats: Option<Vec<VcpuStats>> = vcpus
        .iter()
        .map(|v| VcpuStats::open(v.fd()))
        .collect::<Result<_, _>>()
        .inspect_err(|e| tracing::debug!("no KVM statistics: {e}"))
        .ok();
    let outcome = Machine::new(vcpus, backend)
        .run(exits, cfg.timeout)
        .map_err(host("cannot run vCPUs"))?;
    let _ = std::io::stdout().flush();

    let console = console.map(|c| c.text()).unwrap_or_default();
    let (exit_code, failure, cause) = judge(&outcome.cause, &outcome.vcpus, cfg.timeout);
    let mut total = virq_kvm::ExitCounts::default();
    for v in &outcome.vcpus {
        total.add(&v.exits);
    }
    let kvm_exits = kvm_stats.and_then(|files| {
        let mut sum = KvmExits::default();
        for f in &files {
            match f.exits() {
                Ok(e) => sum.add(&e),
                Err(e) => {
                    tracing::debug!("cannot read KVM statistics: {e}");
                    return None;
                }
            }
        }
        Some(sum)
    });
    let stats = RunStats {
        mode: cfg.mode.name().to_string(),
        cpus: cfg.cpus,
        exit_code,
        cause,
        wall_ms: outcome.wall.as_secs_f64() * 1000.0,
        exits: total,
        exits_per_vcpu: outcome.vcpus.iter().map(|v| v.exits).collect(),
        kvm_exits,
        vmm_raises: raises.snapshot(),
        guest_counts: GuestCounts::parse(&console),
        checks: GuestChecks::parse(&console),
    };
    Ok(RunResult {
        exit_code,
        failure,
        stats,
        console,
    })
}

fn rip_text(rip: Option<u64>) -> String {
    rip.map_or_else(|| "unknown rip".to_string(), |r| format!("rip {r:#x}"))
}

/// Exit status, one-line failure message (if any) and a short cause for the
/// statistics, from how the run ended.
pub fn judge(
    cause: &StopCause,
    vcpus: &[virq_kvm::VcpuReport],
    timeout: Option<Duration>,
) -> (i32, Option<String>, String) {
    match cause {
        StopCause::Vcpu {
            stop: VcpuStop::GuestExit(s),
            ..
        } => (*s, None, format!("guest exit status {s}")),
        StopCause::Vcpu { index, stop, rip } => {
            let code = match stop {
                VcpuStop::Shutdown => exit_code::TRIPLE_FAULT,
                _ => exit_code::VM_FAILURE,
            };
            let what = stop.describe();
            (
                code,
                Some(format!("virq: vCPU {index} {what} at {}", rip_text(*rip))),
                format!("vCPU {index} {what}"),
            )
        }
        StopCause::Timeout => {
            let secs = timeout.map_or(0.0, |t| t.as_secs_f64());
            let wheres: Vec<String> = vcpus
                .iter()
                .map(|v| format!("vCPU {} at {}", v.index, rip_text(v.rip)))
                .collect();
            (
                exit_code::TIMEOUT,
                Some(format!(
                    "virq: timeout after {secs} s: {}",
                    wheres.join(", ")
                )),
                "timeout".to_string(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_stays_below_the_mmio_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(big[1], (GuestAddress(HIGH_RAM_START), (1 << 30) as usize));
    }

    #[test]
    fn failures_map_to_even_statuses_with_one_line() {
        let c = StopCause::Vcpu {
            index: 1,
            stop: VcpuStop::Shutdown,
            rip: Some(0x101234),
        };
        let (code, line, _) = judge(&c, &[], None);
        assert_eq!(code, 4);
        assert_eq!(line.unwrap(), "virq: vCPU 1 triple fault at rip 0x101234");
        let c = StopCause::Vcpu {
            index: 0,
            stop: VcpuStop::EmulationFailure,
            rip: None,
        };
        assert_eq!(judge(&c, &[], None).0, 6);
        let (code, line, _) = judge(&StopCause::Timeout, &[], Some(Duration::from_secs(1)));
        assert_eq!(code, 8);
        assert!(line.unwrap().starts_with("virq: timeout after 1 s"));
        let c = StopCause::Vcpu {
            index: 0,
            stop: VcpuStop::GuestExit(1),
            rip: None,
        };
        assert_eq!(judge(&c, &[], None).0, 1);
    }
}
