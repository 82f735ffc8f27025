//! Helpers for tests that run tiny guests on /dev/kvm.

use crate::machine::{ExitAction, ExitHandler};
use std::sync::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// True if /dev/kvm is usable. Otherwise panics when VIRQ_REQUIRE_KVM=1
/// (CI), or prints a loud skip notice and returns false.
pub fn kvm_or_skip() -> bool {
    if crate::vm::Vm::available() {
        return true;
    }
    if std::env::var("VIRQ_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("/dev/kvm not available but VIRQ_REQUIRE_KVM=1");
    }
    eprintln!("SKIPPED: /dev/kvm not available");
    false
}

/// 1 MiB of guest RAM at 0 with `code` at each `(address, bytes)`.
pub fn memory_with(code: &[(u64, &[u8])]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    for (addr, bytes) in code {
        mem.write_slice(bytes, GuestAddress(*addr)).unwrap();
    }
    mem
}

/// Port handler for tests: records every OUT, answers IN with all ones,
/// ends the guest on a write to 0xF4 with the written value, and calls
/// `on_write` for every OUT first.
pub struct RecordingHandler<F: Fn(u16, &[u8]) + Send + Sync> {
    /// Every OUT as (vcpu, port, bytes).
    pub writes: Mutex<Vec<(u32, u16, Vec<u8>)>>,
    on_write: F,
}

impl<F: Fn(u16, &[u8]) + Send + Sync> RecordingHandler<F> {
    pub fn new(on_write: F) -> Self {
        RecordingHandler {
            writes: Mutex::new(Vec::new()),
            on_write,
        }
    }
}

impl<F: Fn(u16, &[u8]) + Send + Sync> ExitHandler for RecordingHandler<F> {
    fn pio_read(&self, _vcpu: u32, _port: u16, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn pio_write(&self, vcpu: u32, port: u16, data: &[u8]) -> ExitAction {
        (self.on_write)(port, data);
        self.writes
            .lock()
            .unwrap()
            .push((vcpu, port, data.to_vec()));
        if port == 0xF4 {
            ExitAction::GuestExit(i32::from(data[0]))
        } else {
            ExitAction::Continue
        }
    }

    fn mmio_read(&self, _vcpu: u32, _addr: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn mmio_write(&self, _vcpu: u32, _addr: u64, _data: &[u8]) -> ExitAction {
        ExitAction::Continue
    }
}
