//! The machine: one host thread per vCPU running `KVM_RUN` in a loop, exits
//! dispatched to the VMM's [`ExitHandler`] and the mode's
//! [`IrqchipBackend`], and a shared end: the first vCPU that stops for a real
//! reason (guest exit, triple fault, error) or the timeout stops all others.

use crate::irqchip::{HltAction, IrqchipBackend, VcpuCtx};
use crate::kick::VcpuKick;
use crate::stats::{ExitCounters, ExitCounts, ExitReason};
use crate::vcpu::Vcpu;
use crate::{Error, Result};
use kvm_bindings::{
    KVM_EXIT_IO, KVM_EXIT_IO_IN, KVM_EXIT_MMIO, KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR,
    KVM_INTERNAL_ERROR_EMULATION,
};
use kvm_ioctls::VcpuExit;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the VMM wants after handling an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Enter the guest again.
    Continue,
    /// The guest asked to end with this status (isa-debug-exit).
    GuestExit(i32),
}

/// The VMM's devices, as the run loop sees them. Called on vCPU threads.
pub trait ExitHandler: Send + Sync {
    /// IN from `port`; fill `data` (all ones if nothing answers).
    fn pio_read(&self, vcpu: u32, port: u16, data: &mut [u8]);
    /// OUT of `data` to `port`.
    fn pio_write(&self, vcpu: u32, port: u16, data: &[u8]) -> ExitAction;
    /// Read of unbacked guest-physical `addr`.
    fn mmio_read(&self, vcpu: u32, addr: u64, data: &mut [u8]);
    /// Write to unbacked guest-physical `addr`.
    fn mmio_write(&self, vcpu: u32, addr: u64, data: &[u8]) -> ExitAction;
}

/// Why one vCPU's loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// Another vCPU ended the run, or the timeout did.
    Stopped,
    /// The guest wrote its exit status.
    GuestExit(i32),
    /// HLT with no way to wake (no interrupt controller).
    Halted,
    /// Triple fault (`KVM_EXIT_SHUTDOWN`).
    Shutdown,
    /// `KVM_EXIT_INTERNAL_ERROR` with an emulation failure.
    EmulationFailure,
    /// `KVM_EXIT_INTERNAL_ERROR` with another suberror.
    InternalError(u32),
    /// `KVM_EXIT_FAIL_ENTRY` with the hardware reason.
    FailEntry(u64),
    /// An exit the loop does not handle; the string names it.
    Unhandled(String),
    /// A host call failed.
    HostError(String),
}

impl VcpuStop {
    /// Human-readable cause, for the one-line failure message.
    pub fn describe(&self) -> String {
        match self {
            Self::Stopped => "stopped".into(),
            Self::GuestExit(s) => format!("guest exit with status {s}"),
            Self::Halted => "halted with nothing to wake it".into(),
            Self::Shutdown => "triple fault".into(),
            Self::EmulationFailure => "KVM emulation failure".into(),
            Self::InternalError(s) => format!("KVM internal error (suberror {s})"),
            Self::FailEntry(r) => format!("VM entry failure (reason {r:#x})"),
            Self::Unhandled(what) => format!("unhandled exit {what}"),
            Self::HostError(e) => format!("host error: {e}"),
        }
    }
}

/// How one vCPU ended.
#[derive(Clone, Debug)]
pub struct VcpuReport {
    /// vCPU index.
    pub index: u32,
    /// Why its loop ended.
    pub stop: VcpuStop,
    /// Guest RIP when it ended, if readable.
    pub rip: Option<u64>,
    /// Its exits by reason.
    pub exits: ExitCounts,
}

/// What ended the whole run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// vCPU `index` stopped for `stop`, at `rip`.
    Vcpu {
        /// vCPU index.
        index: u32,
        /// Why.
        stop: VcpuStop,
        /// Where.
        rip: Option<u64>,
    },
    /// The timeout passed first.
    Timeout,
}

/// Result of [`Machine::run`].
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// What ended the run.
    pub cause: StopCause,
    /// Every vCPU's end, by index.
    pub vcpus: Vec<VcpuReport>,
    /// Wall time from thread start to the last join.
    pub wall: Duration,
}

/// The first real cause of the end, and a condvar to wait for it.
#[derive(Default)]
struct Ending {
    cause: Mutex<Option<StopCause>>,
    cv: Condvar,
}

impl Ending {
    /// Records `cause` unless one is already recorded; true if it was first.
    fn record(&self, cause: StopCause) -> bool {
        let mut c = self.cause.lock().unwrap_or_else(|e| e.into_inner());
        let first = c.is_none();
        if first {
            *c = Some(cause);
        }
        self.cv.notify_all();
        first
    }
}

/// A set of created vCPUs and their backend, ready to run.
pub struct Machine {
    vcpus: Vec<Vcpu>,
    backend: Arc<dyn IrqchipBackend>,
}

impl Machine {
    /// Takes the vCPUs (index order) and their backend (already set up).
    pub fn new(vcpus: Vec<Vcpu>, backend: Arc<dyn IrqchipBackend>) -> Self {
        Machine { vcpus, backend }
    }

    /// Kick handles, by vCPU index (for delivery and external stops).
    pub fn kicks(&self) -> Vec<Arc<VcpuKick>> {
        self.vcpus.iter().map(|v| v.kick().clone()).collect()
    }

    /// Live exit counters, by vCPU index.
    pub fn counters(&self) -> Vec<Arc<ExitCounters>> {
        self.vcpus.iter().map(|v| v.counters().clone()).collect()
    }

    /// Runs every vCPU on its own thread until one ends the run or
    /// `timeout` passes, then stops and joins them all.
    pub fn run(
        self,
        handler: Arc<dyn ExitHandler>,
        timeout: Option<Duration>,
    ) -> Result<RunOutcome> {
        let start = Instant::now();
        let ending = Arc::new(Ending::default());
        let kicks = self.kicks();
        let backend = self.backend;
        let stop_all = {
            let kicks = kicks.clone();
            let backend = backend.clone();
            move || {
                for (i, k) in kicks.iter().enumerate() {
                    k.request_stop();
                    backend.wake(i as u32);
                }
            }
        };
        let stop_all = Arc::new(stop_all);
        let mut threads = Vec::new();
        for mut vcpu in self.vcpus {
            let (backend, handler, t_ending, t_stop_all) = (
                backend.clone(),
                handler.clone(),
                ending.clone(),
                stop_all.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index()))
                .spawn(move || {
                    vcpu.kick().bind_current_thread();
                    let stop = vcpu_loop(&mut vcpu, &*backend, &*handler);
                    vcpu.kick().unbind_thread();
                    let rip = vcpu.fd.get_regs().ok().map(|r| r.rip);
                    tracing::debug!(vcpu = vcpu.index(), ?stop, ?rip, "vCPU loop ended");
                    if stop != VcpuStop::Stopped {
                        t_ending.record(StopCause::Vcpu {
                            index: vcpu.index(),
                            stop: stop.clone(),
                            rip,
                        });
                        t_stop_all();
                    }
                    VcpuReport {
                        index: vcpu.index(),
                        stop,
                        rip,
                        exits: vcpu.counters().snapshot(),
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    ending.record(StopCause::Vcpu {
                        index: threads.len() as u32,
                        stop: VcpuStop::HostError(e.to_string()),
                        rip: None,
                    });
                    stop_all();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(Error::Thread(e));
                }
            }
        }

        // Wait for the first real end, or the timeout.
        {
            let deadline = timeout.map(|t| start + t);
            let mut cause = ending.cause.lock().unwrap_or_else(|e| e.into_inner());
            while cause.is_none() {
                match deadline {
                    None => cause = ending.cv.wait(cause).unwrap_or_else(|e| e.into_inner()),
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            *cause = Some(StopCause::Timeout);
                            break;
                        }
                        cause = ending
                            .cv
                            .wait_timeout(cause, d - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            }
        }
        stop_all();
        let mut vcpus = Vec::new();
        for t in threads {
            match t.join() {
                Ok(r) => vcpus.push(r),
                Err(_) => tracing::error!("a vCPU thread panicked"),
            }
        }
        backend.shutdown();
        let cause = ending
            .cause
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or(StopCause::Timeout);
        Ok(RunOutcome {
            cause,
            vcpus,
            wall: start.elapsed(),
        })
    }
}

/// What an exit asks the loop to do once the exit's borrow of the vCPU ends.
enum Next {
    Enter,
    Io,
    Mmio,
    Msr,
    Hlt,
    IrqWindow,
    IoapicEoi(u8),
    Internal,
    Stop(VcpuStop),
}

/// One vCPU's loop: enter, dispatch the exit, repeat until told to stop.
fn vcpu_loop(vcpu: &mut Vcpu, backend: &dyn IrqchipBackend, handler: &dyn ExitHandler) -> VcpuStop {
    let counters = vcpu.counters().clone();
    let kick = vcpu.kick().clone();
    loop {
        // Clear first, then look: a kick after this point is never lost.
        vcpu.kick().clear();
        if vcpu.kick().stop_requested() {
            return VcpuStop::Stopped;
        }
        if let Err(e) = backend.before_entry(&mut VcpuCtx { vcpu }) {
            return VcpuStop::HostError(e.to_string());
        }
        kick.entering();
        let ran = vcpu.fd.run();
        kick.left();
        let next = match ran {
            Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => Next::Io,
            Ok(VcpuExit::MmioRead(..)) | Ok(VcpuExit::MmioWrite(..)) => Next::Mmio,
            Ok(VcpuExit::X86Rdmsr(..)) | Ok(VcpuExit::X86Wrmsr(..)) => Next::Msr,
            Ok(VcpuExit::Hlt) => Next::Hlt,
            Ok(VcpuExit::IrqWindowOpen) => Next::IrqWindow,
            Ok(VcpuExit::IoapicEoi(vector)) => Next::IoapicEoi(vector),
            Ok(VcpuExit::Intr) => {
                counters.count(ExitReason::Intr);
                Next::Enter
            }
            Ok(VcpuExit::Shutdown) => {
                counters.count(ExitReason::Shutdown);
                Next::Stop(VcpuStop::Shutdown)
            }
            Ok(VcpuExit::InternalError) => Next::Internal,
            Ok(VcpuExit::FailEntry(reason, _cpu)) => {
                counters.count(ExitReason::Other);
                Next::Stop(VcpuStop::FailEntry(reason))
            }
            Ok(other) => {
                counters.count(ExitReason::Other);
                Next::Stop(VcpuStop::Unhandled(format!("{other:?}")))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                counters.count(ExitReason::Intr);
                Next::Enter
            }
            Err(e) => Next::Stop(VcpuStop::HostError(format!("KVM_RUN failed: {e}"))),
        };
        // The exit's view of the vCPU (CR8) reaches the models before the
        // exit itself is handled: a TPR read right after a CR8 write must
        // see the new value.
        backend.after_exit(&mut VcpuCtx { vcpu });
        match next {
            Next::Enter => {}
            Next::Mmio => {
                counters.count(ExitReason::Mmio);
                if let ExitAction::GuestExit(s) = dispatch_mmio(vcpu, backend, handler) {
                    return VcpuStop::GuestExit(s);
                }
            }
            Next::Msr => {
                counters.count(ExitReason::Msr);
                dispatch_msr(vcpu, backend);
            }
            Next::Io => {
                counters.count(ExitReason::Io);
                if let ExitAction::GuestExit(s) = dispatch_io(vcpu, backend, handler) {
                    return VcpuStop::GuestExit(s);
                }
            }
            Next::Hlt => {
                counters.count(ExitReason::Hlt);
                if backend.on_hlt(&mut VcpuCtx { vcpu }) == HltAction::Stop {
                    return VcpuStop::Halted;
                }
            }
            Next::IrqWindow => {
                counters.count(ExitReason::IrqWindow);
                backend.on_irq_window(&mut VcpuCtx { vcpu });
            }
            Next::IoapicEoi(vector) => {
                counters.count(ExitReason::IoapicEoi);
                backend.on_ioapic_eoi(&mut VcpuCtx { vcpu }, vector);
            }
            Next::Internal => {
                counters.count(ExitReason::Other);
                let run = vcpu.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the exit union is the valid one.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                return if suberror == KVM_INTERNAL_ERROR_EMULATION {
                    VcpuStop::EmulationFailure
                } else {
                    VcpuStop::InternalError(suberror)
                };
            }
            Next::Stop(s) => return s,
        }
    }
}

/// Hands an MMIO exit to the backend, then to the VMM if the backend does
/// not claim the address. A read's data goes back through `kvm_run`.
fn dispatch_mmio(
    vcpu: &mut Vcpu,
    backend: &dyn IrqchipBackend,
    handler: &dyn ExitHandler,
) -> ExitAction {
    let index = vcpu.index();
    let run = vcpu.fd.get_kvm_run();
    if run.exit_reason != KVM_EXIT_MMIO {
        return ExitAction::Continue;
    }
    // SAFETY: exit_reason is KVM_EXIT_MMIO, so `mmio` is the valid union
    // member.
    let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
    let addr = mmio.phys_addr;
    let len = (mmio.len as usize).min(mmio.data.len());
    let data = &mut mmio.data[..len];
    if mmio.is_write == 0 {
        if !backend.mmio_read(index, addr, data) {
            handler.mmio_read(index, addr, data);
        }
        ExitAction::Continue
    } else if backend.mmio_write(index, addr, data) {
        ExitAction::Continue
    } else {
        handler.mmio_write(index, addr, data)
    }
}

/// Hands an RDMSR/WRMSR exit (filtered or unknown MSR) to the backend; an
/// MSR it does not own, or a #GP it reports, sets `error` so KVM injects
/// #GP.
fn dispatch_msr(vcpu: &mut Vcpu, backend: &dyn IrqchipBackend) {
    let index = vcpu.index();
    let run = vcpu.fd.get_kvm_run();
    let reason = run.exit_reason;
    if reason != KVM_EXIT_X86_RDMSR && reason != KVM_EXIT_X86_WRMSR {
        return;
    }
    // SAFETY: exit_reason is KVM_EXIT_X86_RDMSR or _WRMSR, so `msr` is the
    // valid union member.
    let msr = unsafe { &mut run.__bindgen_anon_1.msr };
    msr.error = if reason == KVM_EXIT_X86_RDMSR {
        match backend.msr_read(index, msr.index) {
            Some(Ok(v)) => {
                msr.data = v;
                0
            }
            _ => 1,
        }
    } else {
        match backend.msr_write(index, msr.index, msr.data) {
            Some(Ok(())) => 0,
            _ => 1,
        }
    };
}

/// Hands a port I/O exit to the VMM one element at a time (string I/O with
/// a REP prefix arrives as `count` elements of `size` bytes).
fn dispatch_io(
    vcpu: &mut Vcpu,
    backend: &dyn IrqchipBackend,
    handler: &dyn ExitHandler,
) -> ExitAction {
    let index = vcpu.index();
    let run_size = vcpu.run_size;
    let run = vcpu.fd.get_kvm_run();
    if run.exit_reason != KVM_EXIT_IO {
        return ExitAction::Continue;
    }
    // SAFETY: exit_reason is KVM_EXIT_IO, so `io` is the valid union member.
    let io = unsafe { run.__bindgen_anon_1.io };
    let size = usize::from(io.size);
    let len = size * io.count as usize;
    let offset = io.data_offset as usize;
    if size == 0 || offset.checked_add(len).is_none_or(|end| end > run_size) {
        return ExitAction::Continue;
    }
    let base = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
    // SAFETY: the kernel put `len` bytes of I/O data at `data_offset` inside
    // the kvm_run mapping of `run_size` bytes (bounds checked above), and no
    // other reference into that range exists while this slice lives.
    let data = unsafe { std::slice::from_raw_parts_mut(base.add(offset), len) };
    let port = io.port;
    for chunk in data.chunks_mut(size) {
        if u32::from(io.direction) == KVM_EXIT_IO_IN {
            if !backend.pio_read(index, port, chunk) {
                handler.pio_read(index, port, chunk);
            }
        } else if backend.pio_write(index, port, chunk) {
            continue;
        } else if let ExitAction::GuestExit(s) = handler.pio_write(index, port, chunk) {
            return ExitAction::GuestExit(s);
        }
    }
    ExitAction::Continue
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irqchip::{KernelIrqchip, NoIrqchip, UserspaceIrqchip};
    use crate::testutil::{kvm_or_skip, memory_with, RecordingHandler};
    use crate::vm::Vm;

    /// Builds a machine of `entries.len()` real-mode vCPUs starting at the
    /// given IPs, with `code` in memory.
    fn machine(
        code: &[(u64, &[u8])],
        entries: &[u16],
        backend: impl FnOnce(&Vm) -> Arc<dyn IrqchipBackend>,
    ) -> (Machine, Arc<dyn IrqchipBackend>, Vm) {
        let mut vm = Vm::new().unwrap();
        vm.register_memory(&memory_with(code)).unwrap();
        let backend = backend(&vm);
        backend.setup_vm(&vm).unwrap();
        let cpus = entries.len() as u32;
        let mut vcpus = Vec::new();
        for (i, ip) in entries.iter().enumerate() {
            let v = Vcpu::new(&vm, i as u32, cpus).unwrap();
            backend.setup_vcpu(&v, true).unwrap();
            v.set_real_mode_entry(*ip).unwrap();
            vcpus.push(v);
        }
        (Machine::new(vcpus, backend.clone()), backend, vm)
    }

    #[test]
    fn port_write_reaches_handler_and_debug_exit_ends_run() {
        if !kvm_or_skip() {
            return;
        }
        // mov al,0x42; out 0x10,al; mov al,7; out 0xf4,al
        let code = [0xB0, 0x42, 0xE6, 0x10, 0xB0, 0x07, 0xE6, 0xF4];
        let (m, _b, _vm) = machine(&[(0x1000, &code)], &[0x1000], |_| Arc::new(NoIrqchip));
        let handler = Arc::new(RecordingHandler::new(|_, _| {}));
        let out = m
            .run(handler.clone(), Some(Duration::from_secs(10)))
            .unwrap();
        assert!(
            matches!(
                out.cause,
                StopCause::Vcpu {
                    index: 0,
                    stop: VcpuStop::GuestExit(7),
                    rip: Some(0x1008)
                }
            ),
            "{:?}",
            out.cause
        );
        assert_eq!(
            *handler.writes.lock().unwrap(),
            vec![(0, 0x10, vec![0x42]), (0, 0xF4, vec![7])]
        );
        assert_eq!(out.vcpus[0].exits.io, 2);
    }

    #[test]
    fn word_and_string_io_arrive_per_element() {
        if !kvm_or_skip() {
            return;
        }
        // mov ax,0x1234; out 0x10,ax; mov si,0x1100; mov cx,3; mov dx,0x11;
        // rep outsb; mov al,0; out 0xf4,al
        let code = [
            0xB8, 0x34, 0x12, 0xE7, 0x10, 0xBE, 0x00, 0x11, 0xB9, 0x03, 0x00, 0xBA, 0x11, 0x00,
            0xF3, 0x6E, 0xB0, 0x00, 0xE6, 0xF4,
        ];
        let (m, _b, _vm) = machine(&[(0x1000, &code), (0x1100, b"abc")], &[0x1000], |_| {
            Arc::new(NoIrqchip)
        });
        let handler = Arc::new(RecordingHandler::new(|_, _| {}));
        m.run(handler.clone(), Some(Duration::from_secs(10)))
            .unwrap();
        let w = handler.writes.lock().unwrap();
        assert_eq!(w[0], (0, 0x10, vec![0x34, 0x12]));
        let s: Vec<u8> = w[1..4]
            .iter()
            .map(|(_, p, d)| {
                assert_eq!(*p, 0x11);
                d[0]
            })
            .collect();
        assert_eq!(s, b"abc");
    }

    #[test]
    fn hlt_without_irqchip_ends_as_halted() {
        if !kvm_or_skip() {
            return;
        }
        let (m, _b, _vm) = machine(&[(0x1000, &[0xF4])], &[0x1000], |_| Arc::new(NoIrqchip));
        let out = m
            .run(
                Arc::new(RecordingHandler::new(|_, _| {})),
                Some(Duration::from_secs(10)),
            )
            .unwrap();
        assert!(matches!(
            out.cause,
            StopCause::Vcpu {
                index: 0,
                stop: VcpuStop::Halted,
                ..
            }
        ));
        assert_eq!(out.vcpus[0].exits.hlt, 1);
    }

    #[test]
    fn timeout_kicks_a_spinning_vcpu_out() {
        if !kvm_or_skip() {
            return;
        }
        // jmp $
        let (m, _b, _vm) = machine(&[(0x1000, &[0xEB, 0xFE])], &[0x1000], |_| {
            Arc::new(NoIrqchip)
        });
        let t = Instant::now();
        let out = m
            .run(
                Arc::new(RecordingHandler::new(|_, _| {})),
                Some(Duration::from_millis(300)),
            )
            .unwrap();
        assert_eq!(out.cause, StopCause::Timeout);
        assert_eq!(out.vcpus[0].stop, VcpuStop::Stopped);
        assert_eq!(out.vcpus[0].rip, Some(0x1000));
        assert!(out.vcpus[0].exits.intr >= 1);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn one_vcpu_exiting_stops_the_others() {
        if !kvm_or_skip() {
            return;
        }
        // vCPU 0 spins; vCPU 1 waits a little (loop 2000) then exits with 3.
        let spin = [0xEB, 0xFE];
        // mov cx,2000; loop $; mov al,3; out 0xf4,al
        let exit = [0xB9, 0xD0, 0x07, 0xE2, 0xFE, 0xB0, 0x03, 0xE6, 0xF4];
        let (m, _b, _vm) = machine(
            &[(0x1000, &spin), (0x1100, &exit)],
            &[0x1000, 0x1100],
            |_| Arc::new(NoIrqchip),
        );
        let out = m
            .run(
                Arc::new(RecordingHandler::new(|_, _| {})),
                Some(Duration::from_secs(20)),
            )
            .unwrap();
        assert!(matches!(
            out.cause,
            StopCause::Vcpu {
                index: 1,
                stop: VcpuStop::GuestExit(3),
                ..
            }
        ));
        assert_eq!(out.vcpus[0].stop, VcpuStop::Stopped);
    }

    #[test]
    fn kernel_irq_line_wakes_halted_real_mode_guest() {
        if !kvm_or_skip() {
            return;
        }
        // Set IVT[0x21] = 0:isr; ICW1-4 put the master PIC at vector 0x20;
        // unmask all; sti; tell the host (out 0x10); hlt loop. The ISR
        // reports its vector on port 0xF4.
        let code = [
            0xC7, 0x06, 0x84, 0x00, 0x26, 0x10, // mov word [0x84], 0x1026
            0xC7, 0x06, 0x86, 0x00, 0x00, 0x00, // mov word [0x86], 0
            0xB0, 0x11, 0xE6, 0x20, // ICW1
            0xB0, 0x20, 0xE6, 0x21, // ICW2: base 0x20
            0xB0, 0x04, 0xE6, 0x21, // ICW3
            0xB0, 0x01, 0xE6, 0x21, // ICW4
            0xB0, 0x00, 0xE6, 0x21, // OCW1: unmask all
            0xFB, // sti
            0xE6, 0x10, // out 0x10, al (ready)
            0xF4, // hlt
            0xEB, 0xFD, // jmp hlt
            0xB0, 0x21, 0xE6, 0xF4, // isr (0x1026): mov al,0x21; out 0xf4,al
        ];
        assert_eq!(code.len(), 0x26 + 4);
        let (m, b, _vm) = machine(&[(0x1000, &code)], &[0x1000], |vm| {
            Arc::new(KernelIrqchip::new(vm.fd().clone()))
        });
        let handler = Arc::new(RecordingHandler::new(move |port, _| {
            if port == 0x10 {
                // Edge on GSI 1: PIC master pin 1 -> vector 0x21.
                b.set_gsi(1, true).unwrap();
                b.set_gsi(1, false).unwrap();
            }
        }));
        let out = m.run(handler, Some(Duration::from_secs(20))).unwrap();
        assert!(
            matches!(
                out.cause,
                StopCause::Vcpu {
                    index: 0,
                    stop: VcpuStop::GuestExit(0x21),
                    ..
                }
            ),
            "{:?}",
            out.cause
        );
    }

    #[test]
    fn raising_before_kernel_irqchip_exists_is_a_no_op() {
        if !kvm_or_skip() {
            return;
        }
        let vm = Vm::new().unwrap();
        let chip = KernelIrqchip::new(vm.fd().clone());
        chip.set_gsi(1, true).unwrap();
    }

    /// Puts `vcpu` in 64-bit mode at `rip`, with 2 MiB identity pages for
    /// 0-2 MiB and for the LAPIC page (uncached), tables at 0x10000.
    /// Returns the page tables to put in memory.
    fn set_long_mode_entry(vcpu: &Vcpu, rip: u64) -> Vec<(u64, Vec<u8>)> {
        let entry = |v: u64| v.to_le_bytes().to_vec();
        let mut pd3 = vec![0u8; 4096];
        let lapic = ((0xFEE0_0000u64 >> 21) & 511) as usize;
        pd3[lapic * 8..lapic * 8 + 8].copy_from_slice(&entry(0xFEE0_0000 | 0x93));
        let mut pdpt = vec![0u8; 4096];
        pdpt[..8].copy_from_slice(&entry(0x12000 | 3));
        pdpt[24..32].copy_from_slice(&entry(0x13000 | 3));
        let tables = vec![
            (0x10000, entry(0x11000 | 3)),
            (0x11000, pdpt),
            (0x12000, entry(0x83)),
            (0x13000, pd3),
        ];
        let mut sregs = vcpu.fd.get_sregs().unwrap();
        let seg = |selector: u16, type_: u8, l: u8| kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xFFFF_FFFF,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: u8::from(l == 0),
            s: 1,
            l,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = seg(0x08, 0xB, 1);
        let data = seg(0x10, 0x3, 0);
        (sregs.ds, sregs.es, sregs.ss) = (data, data, data);
        sregs.cr3 = 0x10000;
        sregs.cr4 = 0x20; // PAE
        sregs.cr0 = 0x8000_0011; // PG, ET, PE
        sregs.efer = 0x500; // LMA, LME
        vcpu.fd.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.fd.get_regs().unwrap();
        regs.rip = rip;
        regs.rflags = 0x2;
        vcpu.fd.set_regs(&regs).unwrap();
        tables
    }

    /// Regression: a CR8 write reached the userspace LAPIC only at the next
    /// entry, so an MMIO TPR read in the same exit saw the old TPR, and an
    /// MMIO TPR write was overwritten by the stale CR8 at that entry.
    #[test]
    fn userspace_lapic_tpr_follows_cr8_within_the_exit() {
        if !kvm_or_skip() {
            return;
        }
        let code: &[u8] = &[
            0xBB, 0x80, 0x00, 0xE0, 0xFE, // mov ebx, 0xFEE00080 (TPR)
            0xB8, 0x03, 0x00, 0x00, 0x00, // mov eax, 3
            0x44, 0x0F, 0x22, 0xC0, // mov cr8, rax
            0x8B, 0x03, // mov eax, [rbx]
            0xE6, 0x10, // out 0x10, al   (TPR after CR8 = 3)
            0xB8, 0x05, 0x00, 0x00, 0x00, // mov eax, 5
            0x44, 0x0F, 0x22, 0xC0, // mov cr8, rax
            0xC7, 0x03, 0x70, 0x00, 0x00, 0x00, // mov dword [rbx], 0x70
            0x44, 0x0F, 0x20, 0xC0, // mov rax, cr8
            0xE6, 0xF4, // out 0xF4, al   (CR8 after TPR = 0x70)
            0xF4, // hlt
        ];
        let mut vm = Vm::new().unwrap();
        let backend: Arc<dyn IrqchipBackend> = Arc::new(UserspaceIrqchip::new(
            vm.fd().clone(),
            1,
            virq::pit::LostTickPolicy::Reinject,
        ));
        backend.setup_vm(&vm).unwrap();
        let vcpu = Vcpu::new(&vm, 0, 1).unwrap();
        backend.setup_vcpu(&vcpu, true).unwrap();
        let tables = set_long_mode_entry(&vcpu, 0x1000);
        let mut image: Vec<(u64, &[u8])> = vec![(0x1000, code)];
        image.extend(tables.iter().map(|(a, b)| (*a, b.as_slice())));
        vm.register_memory(&memory_with(&image)).unwrap();
        let m = Machine::new(vec![vcpu], backend);
        let handler = Arc::new(RecordingHandler::new(|_, _| {}));
        let out = m
            .run(handler.clone(), Some(Duration::from_secs(20)))
            .unwrap();
        let writes = handler.writes.lock().unwrap().clone();
        let tpr = writes.iter().find(|w| w.1 == 0x10).map(|w| w.2[0]);
        assert_eq!(tpr, Some(0x30), "TPR read after CR8 = 3; {:?}", out.cause);
        assert!(
            matches!(
                out.cause,
                StopCause::Vcpu {
                    stop: VcpuStop::GuestExit(7),
                    ..
                }
            ),
            "CR8 after the TPR write of 0x70: {:?}",
            out.cause
        );
    }

    /// Regression: an NMI that KVM holds (queued while NMIs were blocked)
    /// must end a HLT once NMIs are unblocked. The userspace backend parked
    /// the vCPU because its own model had nothing pending, so the NMI waited
    /// until something else woke the vCPU.
    #[test]
    fn userspace_hlt_takes_an_nmi_kvm_still_holds() {
        if !kvm_or_skip() {
            return;
        }
        let code: &[u8] = &[
            0xC7, 0x06, 0x08, 0x00, 0x20, 0x10, // mov word [8], 0x1020 (IVT[2] ip)
            0xC7, 0x06, 0x0A, 0x00, 0x00, 0x00, // mov word [0xA], 0 (IVT[2] cs)
            0x9C, // pushf
            0x0E, // push cs
            0x68, 0x12, 0x10, // push 0x1012
            0xCF, // iret: unblocks NMIs
            0xF4, // 0x1012: hlt
            0xB0, 0x01, 0xE6, 0xF4, // mov al, 1; out 0xF4, al (HLT ended without NMI)
            0xF4, // hlt
        ];
        let nmi_handler: &[u8] = &[0xB0, 0x42, 0xE6, 0xF4, 0xF4]; // out 0xF4, 0x42
        let mut vm = Vm::new().unwrap();
        vm.register_memory(&memory_with(&[(0x1000, code), (0x1020, nmi_handler)]))
            .unwrap();
        let backend: Arc<dyn IrqchipBackend> = Arc::new(UserspaceIrqchip::new(
            vm.fd().clone(),
            1,
            virq::pit::LostTickPolicy::Reinject,
        ));
        backend.setup_vm(&vm).unwrap();
        let vcpu = Vcpu::new(&vm, 0, 1).unwrap();
        backend.setup_vcpu(&vcpu, true).unwrap();
        vcpu.set_real_mode_entry(0x1000).unwrap();
        // As after KVM_NMI inside an NMI handler: one NMI pending, blocked.
        let mut events = vcpu.fd.get_vcpu_events().unwrap();
        events.nmi.pending = 1;
        events.nmi.masked = 1;
        events.flags |= kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING;
        vcpu.fd.set_vcpu_events(&events).unwrap();
        let m = Machine::new(vec![vcpu], backend);
        let handler = Arc::new(RecordingHandler::new(|_, _| {}));
        let out = m.run(handler, Some(Duration::from_secs(10))).unwrap();
        assert!(
            matches!(
                out.cause,
                StopCause::Vcpu {
                    stop: VcpuStop::GuestExit(0x42),
                    ..
                }
            ),
            "{:?}",
            out.cause
        );
    }
}
