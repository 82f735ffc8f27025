//! Forcing a vCPU out of `KVM_RUN`, the way Firecracker does it.
//!
//! A kick sets `immediate_exit` in the vCPU's `kvm_run` page, fences, then
//! sends a real-time signal to the vCPU thread. If the thread is inside
//! `KVM_RUN` the signal makes it return `EINTR`; if it is about to enter,
//! `immediate_exit` makes the next `KVM_RUN` return at once. Either way the
//! thread comes back to its loop and looks at its stop flag and pending work.
//! This is also the only way to reach a vCPU that runs guest code natively
//! under nested KVM, where interrupt-window requests never cause an exit.
//!
//! Delivering an interrupt needs a kick only while the vCPU runs guest code:
//! [`VcpuKick::notify`] sets a work flag and signals the thread only if it
//! is inside `KVM_RUN`. A vCPU in its own loop looks at its pending work
//! before it enters again, and one that was notified between that look and
//! the entry has the entry return at once (no signal needed either way).

use crate::{Error, Result};
use kvm_bindings::kvm_run;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The kick signal: the first real-time signal.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: being interrupted is the whole point.
}

/// Installs the (empty) kick signal handler once per process.
pub fn install_kick_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick_signal)
                .map_err(|e| e.errno())
        })
        .map_err(|e| Error::Signal(vmm_sys_util::errno::Error::new(e)))
}

/// A second shared mapping of one vCPU's `kvm_run` page, owned independently
/// of the `VcpuFd`, so other threads can set `immediate_exit` without racing
/// the vCPU's own lifetime.
struct RunPage {
    ptr: NonNull<kvm_run>,
    len: usize,
}

// SAFETY: the mapping is process-wide memory; every access goes through
// volatile reads/writes of single bytes that KVM itself treats as shared.
unsafe impl Send for RunPage {}
// SAFETY: as above, no references into the page are ever handed out.
unsafe impl Sync for RunPage {}

impl RunPage {
    fn map(fd: &impl AsRawFd, len: usize) -> Result<Self> {
        // SAFETY: mapping a fresh region of a vCPU fd with MAP_SHARED is how
        // kvm_run is accessed; we check the result before using it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::MapRun(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<kvm_run>())
            .ok_or_else(|| Error::MapRun(std::io::Error::other("null mapping")))?;
        Ok(RunPage { ptr, len })
    }

    fn set_immediate_exit(&self, v: u8) {
        // SAFETY: ptr is a live mapping of a kvm_run page (unmapped only in
        // Drop); immediate_exit is a plain byte.
        unsafe { std::ptr::addr_of_mut!((*self.ptr.as_ptr()).immediate_exit).write_volatile(v) }
    }
}

#[cfg(test)]
impl RunPage {
    fn immediate_exit(&self) -> u8 {
        // SAFETY: as in set_immediate_exit.
        unsafe { std::ptr::addr_of!((*self.ptr.as_ptr()).immediate_exit).read_volatile() }
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        // SAFETY: we created this mapping with this length in `map`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Handle to kick one vCPU from any thread.
pub struct VcpuKick {
    page: RunPage,
    /// The vCPU's host thread while it is running its loop.
    thread: Mutex<Option<libc::pthread_t>>,
    /// Set by [`VcpuKick::request_stop`]; the vCPU loop ends when it sees it.
    stop: AtomicBool,
    /// The vCPU thread is in (or about to enter) `KVM_RUN`.
    running: AtomicBool,
    /// Work arrived since the vCPU last looked (see [`VcpuKick::notify`]).
    work: AtomicBool,
    /// Kick signals sent, for statistics.
    signals: AtomicU64,
}

impl VcpuKick {
    /// Maps `kvm_run` of the vCPU `fd` (of `run_size` bytes) a second time.
    pub(crate) fn new(fd: &impl AsRawFd, run_size: usize) -> Result<Self> {
        install_kick_handler()?;
        Ok(VcpuKick {
            page: RunPage::map(fd, run_size)?,
            thread: Mutex::new(None),
            stop: AtomicBool::new(false),
            running: AtomicBool::new(false),
            work: AtomicBool::new(false),
            signals: AtomicU64::new(0),
        })
    }

    /// Records the calling thread as this vCPU's thread (signals go there).
    pub(crate) fn bind_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(me);
    }

    /// Forgets the thread; called by the thread itself before it ends, so a
    /// later kick never signals a dead (or reused) thread id.
    pub(crate) fn unbind_thread(&self) {
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Forces the vCPU out of (or away from) `KVM_RUN`.
    pub fn kick(&self) {
        self.page.set_immediate_exit(1);
        // The flag must be visible before the signal lands.
        fence(Ordering::SeqCst);
        let guard = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = *guard {
            self.signals.fetch_add(1, Ordering::Relaxed);
            // SAFETY: `t` is a live thread: it clears itself from `thread`
            // under this same lock before it exits.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Tells the vCPU it has new work (an interrupt to take): kicks it only
    /// if it is running guest code; otherwise it sees the work before its
    /// next entry, which costs no signal.
    pub fn notify(&self) {
        self.work.store(true, Ordering::SeqCst);
        if self.running.load(Ordering::SeqCst) {
            self.kick();
        }
    }

    /// Clears `immediate_exit` and the work flag; the vCPU thread calls this
    /// before it looks at its pending work, so a kick or notify that comes
    /// after is never lost.
    pub(crate) fn clear(&self) {
        self.page.set_immediate_exit(0);
        self.work.store(false, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// The vCPU thread is about to call `KVM_RUN`: from now on a notify
    /// kicks. Work notified since [`VcpuKick::clear`] was perhaps missed by
    /// the look, so the entry returns at once to look again.
    pub(crate) fn entering(&self) {
        self.running.store(true, Ordering::SeqCst);
        if self.work.load(Ordering::SeqCst) {
            self.page.set_immediate_exit(1);
        }
    }

    /// `KVM_RUN` returned: notifies need no kick until the next entry.
    pub(crate) fn left(&self) {
        self.running.store(false, Ordering::SeqCst);
    }

    /// Kick signals sent so far.
    pub fn signals_sent(&self) -> u64 {
        self.signals.load(Ordering::Relaxed)
    }

    /// Asks the vCPU to leave its run loop, and kicks it.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Whether a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use crate::testutil::kvm_or_skip;
    use crate::vcpu::Vcpu;
    use crate::vm::Vm;

    #[test]
    fn notify_signals_only_a_vcpu_inside_kvm_run() {
        if !kvm_or_skip() {
            return;
        }
        let vm = Vm::new().expect("VM");
        let vcpu = Vcpu::new(&vm, 0, 1).expect("vCPU");
        let kick = vcpu.kick();
        // Signals come to this thread; the handler does nothing.
        kick.bind_current_thread();
        kick.clear();
        // In its own loop: a notify is a flag, and the entry returns at once.
        kick.notify();
        assert_eq!(kick.signals_sent(), 0);
        kick.entering();
        assert_eq!(kick.page.immediate_exit(), 1, "the notify must not be lost");
        kick.left();
        // Looked again, nothing new: the entry proceeds.
        kick.clear();
        kick.entering();
        assert_eq!(kick.page.immediate_exit(), 0);
        // Inside KVM_RUN: a notify kicks.
        kick.notify();
        assert_eq!(kick.signals_sent(), 1);
        assert_eq!(kick.page.immediate_exit(), 1);
        kick.left();
        kick.unbind_thread();
    }
}
