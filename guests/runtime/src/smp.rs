//! Application processor start-up: INIT-SIPI-SIPI with the trampoline at
//! 0x8000; each AP gets its own stack, GDT, TSS and IST stacks.

use crate::arch::{read_cr3, sti_hlt};
use crate::boot::{install_trampoline, TRAMPOLINE_ADDR};
use crate::cpu::{self, MAX_CPUS};
use crate::lapic::{self, Icr};
use crate::time::{delay_us, Deadline};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static ONLINE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static AP_MAIN: AtomicUsize = AtomicUsize::new(0);

/// Code an AP runs once it is up (with its CPU index); it should HLT when idle.
pub type ApMain = fn(usize) -> !;

/// Whether CPU `cpu` has come up.
pub fn is_online(cpu: usize) -> bool {
    ONLINE.get(cpu).is_some_and(|o| o.load(Ordering::Acquire))
}

/// Starts every AP in `apic_ids` (the BSP's own ID is skipped), one at a
/// time, each running `main`. Returns the number of CPUs online, BSP included.
pub fn start_aps(apic_ids: &[u32], main: ApMain) -> usize {
    AP_MAIN.store(main as usize, Ordering::Release);
    ONLINE[0].store(true, Ordering::Release);
    let bsp = lapic::id();
    let mut next = 1;
    for &apic_id in apic_ids {
        if apic_id == bsp || next >= MAX_CPUS {
            continue;
        }
        let index = next;
        next += 1;
        cpu::set_apic_id(index, apic_id);
        install_trampoline(read_cr3(), cpu::main_stack_top(index), index as u64);
        let page = (TRAMPOLINE_ADDR >> 12) as u8;
        lapic::send_ipi(apic_id, Icr::init());
        delay_us(10_000);
        lapic::send_ipi(apic_id, Icr::startup(page));
        delay_us(200);
        if !is_online(index) {
            lapic::send_ipi(apic_id, Icr::startup(page));
        }
        // The AP must be done with the trampoline before it is rewritten.
        let deadline = Deadline::after_us(1_000_000);
        while !is_online(index) && !deadline.expired() {
            delay_us(100);
        }
    }
    (0..MAX_CPUS).filter(|&c| is_online(c)).count()
}

/// Entered from the trampoline in long mode on the AP's own stack.
#[no_mangle]
extern "C" fn virq_rt_ap_entry(index: u32) -> ! {
    let index = (index as usize).min(MAX_CPUS - 1);
    cpu::init(index);
    lapic::enable();
    ONLINE[index].store(true, Ordering::Release);
    let main = AP_MAIN.load(Ordering::Acquire);
    if main != 0 {
        // SAFETY: only `ApMain` values are stored in AP_MAIN.
        let main: ApMain = unsafe { core::mem::transmute::<usize, ApMain>(main) };
        main(index);
    }
    loop {
        sti_hlt();
    }
}
