//! Interrupt sources and doorbells for device threads.
//!
//! A device emulated on its own thread needs a cheap, thread-safe way to
//! raise interrupts and to be woken by the guest. This module gives it
//! eventfd-backed handles that work the same in every irqchip mode:
//!
//! - [`EdgeSource`]: a write pulses a GSI (the irqfd idea);
//! - [`MsiSource`]: a write sends one fixed MSI (a device's MSI/MSI-X vector);
//! - [`LevelSource`]: a write asserts a level GSI; the guest's EOI lowers it
//!   again and signals the resample eventfd, so the device re-asserts only
//!   if it still needs service;
//! - [`Doorbell`]: a guest write to a port or MMIO address signals an
//!   eventfd inside KVM (`KVM_IOEVENTFD`), without a userspace exit.
//!
//! Dropping a handle undoes its binding: the irqfd, ioeventfd or kernel
//! MSI route goes, a level source's line is lowered, and its line source ID
//! is free again, so devices can come and go.
//!
//! Where KVM can serve a source itself (kernel mode: `KVM_IRQFD`, with
//! `KVM_IRQFD_FLAG_RESAMPLE` for level sources and an MSI routing entry for
//! MSI sources), it does. Everywhere else a handle's `trigger`/`assert`
//! drives the backend on the caller's own thread (an MSI is posted to its
//! vCPU without a chipset lock: no thread hop, no eventfd), and one
//! event-loop thread serves writes to the trigger eventfds that come from
//! elsewhere. Resampling then happens in our chipset's ack path
//! ([`virq::chipset::Chipset::set_resample`]), before the IOAPIC could
//! redeliver the line.

use crate::irqchip::IrqchipBackend;
use crate::{ioctl_err, Result};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use virq::msi::MsiMessage;
use virq::routing::{SourceId, MAX_SOURCES};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What a trigger eventfd means when our event loop serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceAction {
    /// Pulse `gsi` as `source` (high, then low).
    Edge {
        /// The GSI.
        gsi: u32,
        /// The line source the pulse is attributed to.
        source: SourceId,
    },
    /// Send this MSI.
    Msi {
        /// MSI address.
        address: u64,
        /// MSI data.
        data: u32,
    },
    /// Assert `gsi` as `source`; the chipset lowers it on the guest's ack.
    Level {
        /// The GSI.
        gsi: u32,
        /// The line source that is asserted.
        source: SourceId,
    },
}

/// Errors specific to creating sources.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Every line source ID (2-63) is taken.
    #[error("no line source ID left: at most {} sources can share lines", MAX_SOURCES - 2)]
    NoSourceId,
    /// The MSI could never be delivered.
    #[error("bad MSI: {0}")]
    BadMsi(#[source] virq::msi::MsiError),
    /// An eventfd, epoll or thread call failed.
    #[error("{0}: {1}")]
    Host(&'static str, #[source] io::Error),
    /// KVM refused a binding.
    #[error(transparent)]
    Kvm(#[from] crate::Error),
}

fn host(what: &'static str) -> impl FnOnce(io::Error) -> SourceError {
    move |e| SourceError::Host(what, e)
}

/// An edge interrupt source: each [`EdgeSource::trigger`] (or a write to
/// [`EdgeSource::fd`] from anywhere) pulses the GSI. Writes that arrive
/// before the previous one was served coalesce, as edges on a wire do.
/// Dropping it unbinds it.
pub struct EdgeSource {
    trigger: EventFd,
    _binding: Binding,
}

impl EdgeSource {
    /// Raises the interrupt.
    pub fn trigger(&self) -> io::Result<()> {
        self._binding.trigger(&self.trigger)
    }

    /// The trigger eventfd (for a device that polls or writes it itself).
    pub fn fd(&self) -> &EventFd {
        &self.trigger
    }
}

/// An MSI source: each trigger sends the MSI fixed at creation. Dropping it
/// unbinds it (and frees its kernel route).
pub struct MsiSource {
    trigger: EventFd,
    _binding: Binding,
}

impl MsiSource {
    /// Sends the MSI.
    pub fn trigger(&self) -> io::Result<()> {
        self._binding.trigger(&self.trigger)
    }

    /// The trigger eventfd.
    pub fn fd(&self) -> &EventFd {
        &self.trigger
    }
}

/// A level source with resample: [`LevelSource::assert`] raises the line;
/// the guest's acknowledgement (EOI) lowers it and signals
/// [`LevelSource::resample_fd`]. A device that still needs service then
/// asserts again. Dropping it unbinds it and lowers its line.
pub struct LevelSource {
    trigger: EventFd,
    resample: Arc<EventFd>,
    _binding: Binding,
}

impl LevelSource {
    /// Asserts the line (no effect while it is already asserted).
    pub fn assert(&self) -> io::Result<()> {
        self._binding.trigger(&self.trigger)
    }

    /// The trigger eventfd.
    pub fn fd(&self) -> &EventFd {
        &self.trigger
    }

    /// Signalled each time the guest acknowledged the line (and it was lowered).
    pub fn resample_fd(&self) -> &EventFd {
        &self.resample
    }

    /// Blocks until the next acknowledgement; returns how many arrived.
    pub fn wait_resample(&self) -> io::Result<u64> {
        self.resample.read()
    }
}

/// A guest write to a port or MMIO address that wakes a device thread.
/// Dropping it removes the `KVM_IOEVENTFD`.
pub struct Doorbell {
    fd: EventFd,
    _binding: Binding,
}

impl Doorbell {
    /// Blocks until the guest rang at least once; returns how many rings
    /// were counted since the last call.
    pub fn wait(&self) -> io::Result<u64> {
        self.fd.read()
    }

    /// The eventfd KVM signals.
    pub fn fd(&self) -> &EventFd {
        &self.fd
    }
}

/// Where a doorbell sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoorbellAddress {
    /// An I/O port.
    Pio(u16),
    /// A guest-physical MMIO address outside RAM.
    Mmio(u64),
}

impl DoorbellAddress {
    fn kvm(self) -> IoEventAddress {
        match self {
            Self::Pio(port) => IoEventAddress::Pio(u64::from(port)),
            Self::Mmio(gpa) => IoEventAddress::Mmio(gpa),
        }
    }
}

/// A binding a backend may take over in the kernel.
pub struct IrqfdBinding<'a> {
    /// What the trigger means.
    pub action: SourceAction,
    /// The trigger eventfd.
    pub trigger: &'a EventFd,
    /// The resample eventfd of a level source.
    pub resample: Option<&'a EventFd>,
}

/// Who serves a source, so that dropping it undoes exactly that.
enum Served {
    /// KVM, bound to this GSI.
    Kernel { action: SourceAction, gsi: u32 },
    /// Our event loop, at this token.
    Loop { action: SourceAction, token: usize },
    /// A doorbell's ioeventfd.
    Doorbell {
        address: DoorbellAddress,
        datamatch: Option<u32>,
    },
}

/// A handle's registration; undone on drop.
struct Binding {
    shared: Arc<Shared>,
    /// A second descriptor of the trigger (or doorbell) eventfd, for KVM's
    /// deassign calls, which name the eventfd.
    fd: EventFd,
    served: Served,
}

impl Binding {
    /// Fires the source from the calling thread: KVM's irqfd through its
    /// eventfd, our backend directly (what the event loop would do later).
    fn trigger(&self, trigger: &EventFd) -> io::Result<()> {
        match self.served {
            Served::Loop { action, .. } => {
                serve(self.shared.backend.as_ref(), action).map_err(io::Error::other)
            }
            _ => trigger.write(1),
        }
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        let shared = &self.shared;
        let (result, action) = match self.served {
            Served::Kernel { action, gsi } => {
                let binding = IrqfdBinding {
                    action,
                    trigger: &self.fd,
                    resample: None,
                };
                (shared.backend.unbind_irqfd(&binding, gsi), Some(action))
            }
            Served::Loop { action, token } => {
                let mut state = lock(&shared.state);
                if let Some(slot) = state.actions.get_mut(token) {
                    *slot = None;
                }
                state.free_tokens.push(token);
                let _ = shared.epoll.ctl(
                    ControlOperation::Delete,
                    self.fd.as_raw_fd(),
                    EpollEvent::default(),
                );
                if let SourceAction::Level { gsi, source } = action {
                    shared.backend.unwatch_resample(gsi, source);
                }
                (Ok(()), Some(action))
            }
            Served::Doorbell { address, datamatch } => {
                let addr = address.kvm();
                let result = match datamatch {
                    None => shared.vm.unregister_ioevent(&self.fd, &addr, NoDatamatch),
                    Some(value) => shared.vm.unregister_ioevent(&self.fd, &addr, value),
                };
                (result.map_err(ioctl_err("KVM_IOEVENTFD(DEASSIGN)")), None)
            }
        };
        if let Err(e) = result {
            tracing::warn!("releasing an interrupt source: {e}");
        }
        if let Some(SourceAction::Edge { source, .. } | SourceAction::Level { source, .. }) = action
        {
            lock(&shared.free_sources).push(source);
        }
    }
}

/// What the handles and the event loop share.
struct Shared {
    vm: Arc<VmFd>,
    backend: Arc<dyn IrqchipBackend>,
    state: Mutex<LoopState>,
    epoll: Epoll,
    stop: EventFd,
    /// Line source IDs given back by dropped sources.
    free_sources: Mutex<Vec<SourceId>>,
    next_source: Mutex<u8>,
}

/// The sources of one VM, and the event loop serving those KVM does not.
pub struct InterruptSources {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The event loop's table: token `i` (as epoll data) is `actions[i]`.
#[derive(Default)]
struct LoopState {
    actions: Vec<Option<(SourceAction, EventFd)>>,
    free_tokens: Vec<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Epoll data of the stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;

fn dup(fd: &EventFd) -> std::result::Result<EventFd, SourceError> {
    fd.try_clone().map_err(host("eventfd dup"))
}

impl InterruptSources {
    /// Sources for the VM `vm` whose interrupts go through `backend`
    /// (after its `setup_vm`).
    pub fn new(
        vm: Arc<VmFd>,
        backend: Arc<dyn IrqchipBackend>,
    ) -> std::result::Result<Self, SourceError> {
        let epoll = Epoll::new().map_err(host("epoll_create"))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(host("epoll_ctl"))?;
        let shared = Arc::new(Shared {
            vm,
            backend,
            state: Mutex::new(LoopState::default()),
            epoll,
            stop,
            free_sources: Mutex::new(Vec::new()),
            // 0 is the VMM's own writes, 1 the PIT.
            next_source: Mutex::new(2),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("virq-sources".into())
                .spawn(move || event_loop(&shared))
                .map_err(host("cannot start the source thread"))?
        };
        Ok(InterruptSources {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn new_source_id(&self) -> std::result::Result<SourceId, SourceError> {
        if let Some(id) = lock(&self.shared.free_sources).pop() {
            return Ok(id);
        }
        let mut next = lock(&self.shared.next_source);
        let id = SourceId::new(*next).map_err(|_| SourceError::NoSourceId)?;
        *next += 1;
        Ok(id)
    }

    /// Hands `trigger` (and a level source's `resample`) to the kernel if
    /// the backend can, or to our loop, with our chipset resampling.
    fn bind(
        &self,
        action: SourceAction,
        trigger: &EventFd,
        resample: Option<&Arc<EventFd>>,
    ) -> std::result::Result<Binding, SourceError> {
        let binding = IrqfdBinding {
            action,
            trigger,
            resample: resample.map(|r| &**r),
        };
        let served = match self.shared.backend.bind_irqfd(&binding)? {
            Some(gsi) => Served::Kernel { action, gsi },
            None => {
                if let (SourceAction::Level { gsi, source }, Some(resample)) = (action, resample) {
                    self.shared
                        .backend
                        .watch_resample(gsi, source, resample.clone())?;
                }
                Served::Loop {
                    action,
                    token: self.bind_to_loop(action, trigger)?,
                }
            }
        };
        Ok(Binding {
            shared: self.shared.clone(),
            fd: dup(trigger)?,
            served,
        })
    }

    fn bind_to_loop(
        &self,
        action: SourceAction,
        trigger: &EventFd,
    ) -> std::result::Result<usize, SourceError> {
        let fd = dup(trigger)?;
        let mut state = lock(&self.shared.state);
        let token = state.free_tokens.pop().unwrap_or(state.actions.len());
        self.shared
            .epoll
            .ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token as u64),
            )
            .map_err(host("epoll_ctl"))?;
        if token == state.actions.len() {
            state.actions.push(Some((action, fd)));
        } else if let Some(slot) = state.actions.get_mut(token) {
            *slot = Some((action, fd));
        }
        Ok(token)
    }

    /// An edge source on `gsi`.
    pub fn edge(&self, gsi: u32) -> std::result::Result<EdgeSource, SourceError> {
        let trigger = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
        let source = self.new_source_id()?;
        let binding = self.bind(SourceAction::Edge { gsi, source }, &trigger, None);
        let binding = binding.inspect_err(|_| lock(&self.shared.free_sources).push(source))?;
        Ok(EdgeSource {
            trigger,
            _binding: binding,
        })
    }

    /// An MSI source sending (`address`, `data`); refused if the MSI
    /// decoder rejects the message (it could never be delivered).
    pub fn msi(&self, address: u64, data: u32) -> std::result::Result<MsiSource, SourceError> {
        (MsiMessage { address, data })
            .decode()
            .map_err(SourceError::BadMsi)?;
        let trigger = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
        let binding = self.bind(SourceAction::Msi { address, data }, &trigger, None)?;
        Ok(MsiSource {
            trigger,
            _binding: binding,
        })
    }

    /// A level source with resample on `gsi`. Route the GSI to a
    /// level-triggered IOAPIC pin (or ELCR-level PIC line) for it to work.
    pub fn level(&self, gsi: u32) -> std::result::Result<LevelSource, SourceError> {
        let trigger = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
        // Blocking, so a device thread can wait on it.
        let resample = Arc::new(EventFd::new(0).map_err(host("eventfd"))?);
        let source = self.new_source_id()?;
        let action = SourceAction::Level { gsi, source };
        let bound = self.bind(action, &trigger, Some(&resample));
        let binding = bound.inspect_err(|_| lock(&self.shared.free_sources).push(source))?;
        Ok(LevelSource {
            trigger,
            resample,
            _binding: binding,
        })
    }

    /// A doorbell at `address`, rung by a guest write of any value and
    /// width (`datamatch` None) or only of that 32-bit value.
    pub fn doorbell(
        &self,
        address: DoorbellAddress,
        datamatch: Option<u32>,
    ) -> std::result::Result<Doorbell, SourceError> {
        // Blocking, so a device thread can wait on it.
        let fd = EventFd::new(0).map_err(host("eventfd"))?;
        let addr = address.kvm();
        match datamatch {
            None => self.shared.vm.register_ioevent(&fd, &addr, NoDatamatch),
            Some(value) => self.shared.vm.register_ioevent(&fd, &addr, value),
        }
        .map_err(ioctl_err("KVM_IOEVENTFD"))?;
        let binding = Binding {
            shared: self.shared.clone(),
            fd: dup(&fd)?,
            served: Served::Doorbell { address, datamatch },
        };
        Ok(Doorbell {
            fd,
            _binding: binding,
        })
    }

    /// Stops the event loop (also done on drop).
    pub fn shutdown(&self) {
        let _ = self.shared.stop.write(1);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for InterruptSources {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serves every trigger bound to the loop until the stop eventfd fires.
fn event_loop(shared: &Shared) {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match shared.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("source loop stopped: epoll_wait: {e}");
                return;
            }
        };
        for event in events.iter().take(n) {
            let token = event.data();
            if token == STOP_TOKEN {
                let _ = shared.stop.read();
                return;
            }
            let action = {
                let state = lock(&shared.state);
                let Some(Some((action, fd))) = state.actions.get(token as usize) else {
                    continue;
                };
                // Non-blocking: a spurious wake-up reads nothing.
                if fd.read().is_err() {
                    continue;
                }
                *action
            };
            if let Err(e) = serve(shared.backend.as_ref(), action) {
                tracing::warn!("interrupt source {action:?}: {e}");
            }
        }
    }
}

fn serve(backend: &dyn IrqchipBackend, action: SourceAction) -> Result<()> {
    match action {
        SourceAction::Edge { gsi, source } => {
            backend.set_gsi_from(gsi, source, true)?;
            backend.set_gsi_from(gsi, source, false)
        }
        SourceAction::Msi { address, data } => backend.send_msi(address, data),
        SourceAction::Level { gsi, source } => backend.set_gsi_from(gsi, source, true),
    }
}

#[cfg(test)]
mod tests {
    //! The event loop and the kernel bindings, driven without running a
    //! guest: the LAPIC's IRR shows what arrived.
    use super::*;
    use crate::irqchip::{KernelIrqchip, UserspaceIrqchip};
    use crate::testutil::kvm_or_skip;
    use crate::vcpu::Vcpu;
    use crate::vm::Vm;
    use std::time::{Duration, Instant};
    use virq::pit::LostTickPolicy;

    const LAPIC: u64 = 0xFEE0_0000;
    const IOAPIC: u64 = 0xFEC0_0000;

    struct Machine {
        _vm: Vm,
        vcpu: Vcpu,
        backend: Arc<dyn IrqchipBackend>,
        sources: InterruptSources,
    }

    fn machine(userspace: bool) -> Machine {
        let vm = Vm::new().expect("VM");
        let backend: Arc<dyn IrqchipBackend> = if userspace {
            Arc::new(UserspaceIrqchip::new(
                vm.fd().clone(),
                1,
                LostTickPolicy::Reinject,
            ))
        } else {
            Arc::new(KernelIrqchip::new(vm.fd().clone()))
        };
        backend.setup_vm(&vm).expect("irqchip");
        let vcpu = Vcpu::new(&vm, 0, 1).expect("vCPU");
        backend.setup_vcpu(&vcpu, true).expect("vCPU setup");
        let sources = InterruptSources::new(vm.fd().clone(), backend.clone()).expect("sources");
        Machine {
            _vm: vm,
            vcpu,
            backend,
            sources,
        }
    }

    impl Machine {
        fn write32(&self, addr: u64, value: u32) {
            assert!(self.backend.mmio_write(0, addr, &value.to_le_bytes()));
        }

        /// Enables the (modelled) LAPIC and routes IOAPIC `pin` to `vector`.
        fn route(&self, pin: u32, vector: u8, level: bool) {
            self.write32(LAPIC + 0xF0, 0x1FF);
            self.write32(IOAPIC, 0x10 + 2 * pin);
            self.write32(IOAPIC + 0x10, u32::from(vector) | (u32::from(level) << 15));
            self.write32(IOAPIC, 0x11 + 2 * pin);
            self.write32(IOAPIC + 0x10, 0);
        }

        /// Remote IRR of IOAPIC `pin` (our IOAPIC).
        fn remote_irr(&self, pin: u32) -> bool {
            self.write32(IOAPIC, 0x10 + 2 * pin);
            let mut word = [0u8; 4];
            assert!(self.backend.mmio_read(0, IOAPIC + 0x10, &mut word));
            u32::from_le_bytes(word) & (1 << 14) != 0
        }

        /// Whether `vector` is in the LAPIC's IRR (ours, or KVM's register page).
        fn irr(&self, vector: u8) -> bool {
            let offset = 0x200 + u64::from(vector / 32) * 0x10;
            let mut word = [0u8; 4];
            let bit = 1 << (vector % 32);
            if self.backend.mmio_read(0, LAPIC + offset, &mut word) {
                return u32::from_le_bytes(word) & bit != 0;
            }
            let page = self.vcpu.fd().get_lapic().expect("KVM_GET_LAPIC");
            let at = offset as usize;
            let bytes: Vec<u8> = page.regs[at..at + 4].iter().map(|b| *b as u8).collect();
            u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) & bit != 0
        }

        /// Waits (bounded) for `vector` to reach the IRR: the source thread
        /// or KVM delivers asynchronously.
        fn arrives(&self, vector: u8) -> bool {
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if self.irr(vector) {
                    return true;
                }
                std::thread::yield_now();
            }
            false
        }
    }

    #[test]
    fn edge_and_msi_sources_deliver_in_userspace_mode() {
        if !kvm_or_skip() {
            return;
        }
        let m = machine(true);
        m.route(10, 0x41, false);
        let edge = m.sources.edge(10).expect("edge source");
        assert!(!m.irr(0x41));
        edge.trigger().expect("trigger");
        assert!(m.arrives(0x41), "edge source reached the IOAPIC pin");
        let msi = m.sources.msi(0xFEE0_0000, 0x52).expect("MSI source");
        msi.trigger().expect("trigger");
        assert!(m.arrives(0x52), "MSI source reached the LAPIC");
    }

    #[test]
    fn triggers_need_no_event_loop_in_userspace_mode() {
        if !kvm_or_skip() {
            return;
        }
        let m = machine(true);
        m.route(10, 0x41, false);
        let edge = m.sources.edge(10).expect("edge source");
        let msi = m.sources.msi(0xFEE0_0000, 0x52).expect("MSI source");
        // With the loop gone, only the caller's thread can deliver.
        m.sources.shutdown();
        edge.trigger().expect("trigger");
        msi.trigger().expect("trigger");
        assert!(m.irr(0x41), "the edge reached its pin on the spot");
        assert!(m.irr(0x52), "the MSI reached the LAPIC on the spot");
    }

    #[test]
    fn level_source_is_lowered_and_resampled_at_the_ioapic_eoi_in_userspace_mode() {
        if !kvm_or_skip() {
            return;
        }
        let m = machine(true);
        m.route(19, 0x61, true);
        let level = m.sources.level(19).expect("level source");
        level.assert().expect("assert");
        assert!(m.arrives(0x61));
        assert!(m.remote_irr(19), "delivered: remote IRR set");
        // The directed EOI (IOAPIC version 0x20) acknowledges the pin.
        m.write32(IOAPIC + 0x40, 0x61);
        assert_eq!(level.wait_resample().expect("resample"), 1);
        assert!(
            !m.remote_irr(19),
            "lowered before the IOAPIC could redeliver"
        );
        level.assert().expect("assert again");
        let deadline = Instant::now() + Duration::from_secs(2);
        while !m.remote_irr(19) && Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(m.remote_irr(19), "re-asserting delivers again");
    }

    #[test]
    fn sources_bind_in_the_kernel_in_kernel_mode() {
        if !kvm_or_skip() {
            return;
        }
        let m = machine(false);
        // KVM's LAPIC is software-disabled at reset; an MSI still sets IRR
        // only once it is enabled, so enable it through the register page.
        let mut page = m.vcpu.fd().get_lapic().expect("KVM_GET_LAPIC");
        page.regs[0xF0] = 0xFF_u8 as _;
        page.regs[0xF1] = 0x01;
        m.vcpu.fd().set_lapic(&page).expect("KVM_SET_LAPIC");
        let msi = m.sources.msi(0xFEE0_0000, 0x52).expect("MSI source");
        msi.trigger().expect("trigger");
        assert!(m.arrives(0x52), "KVM_IRQFD on an MSI route");
        assert!(
            m.sources.msi(0xFEE0_0010, 0x53).is_err(),
            "a remappable-format MSI is refused"
        );
        let _level = m.sources.level(19).expect("KVM_IRQFD with resample");
        let _edge = m.sources.edge(10).expect("KVM_IRQFD");
    }

    #[test]
    fn dropped_sources_give_their_ids_and_kernel_routes_back() {
        if !kvm_or_skip() {
            return;
        }
        let user = machine(true);
        // 62 line source IDs exist; without release this would run out.
        for _ in 0..200 {
            drop(user.sources.edge(10).expect("edge source"));
            drop(user.sources.level(19).expect("level source"));
        }
        let kernel = machine(false);
        // KVM takes at most 4096 routes; without release this would fail.
        for i in 0..5000u32 {
            let msi = kernel.sources.msi(0xFEE0_0000, 0x40 + i % 64);
            drop(msi.expect("MSI source"));
        }
        for _ in 0..100 {
            drop(kernel.sources.edge(10).expect("edge source"));
            drop(kernel.sources.level(19).expect("level source"));
            drop(
                kernel
                    .sources
                    .doorbell(DoorbellAddress::Pio(0x2510), None)
                    .expect("doorbell"),
            );
        }
    }

    #[test]
    fn a_dropped_level_source_lowers_its_line() {
        if !kvm_or_skip() {
            return;
        }
        let m = machine(true);
        m.route(19, 0x61, true);
        let level = m.sources.level(19).expect("level source");
        level.assert().expect("assert");
        assert!(m.arrives(0x61));
        drop(level);
        m.write32(IOAPIC + 0x40, 0x61);
        assert!(!m.remote_irr(19), "the line went low with the source");
    }

    #[test]
    fn doorbells_are_ioeventfds() {
        if !kvm_or_skip() {
            return;
        }
        let m = machine(false);
        let bell = m
            .sources
            .doorbell(DoorbellAddress::Pio(0x2510), None)
            .expect("KVM_IOEVENTFD");
        // A second doorbell on the same port and match is refused by KVM.
        assert!(m
            .sources
            .doorbell(DoorbellAddress::Pio(0x2510), None)
            .is_err());
        let _match = m
            .sources
            .doorbell(DoorbellAddress::Mmio(0xD000_0000), Some(7))
            .expect("MMIO doorbell with a data match");
        drop(bell);
    }
}
