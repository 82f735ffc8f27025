//! Application processor start-up: INIT-SIPI-SIPI with the trampoline at
//! 0x8000; each AP gets its own stack, GDT, TSS and IST stacks. An AP can be
//! restarted later at another start-up page ([`restart_ap`]).

use crate::arch::{phys_u8, read_cr3, sti_hlt};
use crate::boot::{install_trampoline, TRAMPOLINE_ADDR};
use crate::cpu::{self, MAX_CPUS};
use crate::lapic::{self, Icr};
use crate::time::{delay_us, Deadline};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static ONLINE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static AP_MAIN: AtomicUsize = AtomicUsize::new(0);

/// Code an AP runs once it is up (with its CPU index); it should HLT when idle.
pub type ApMain = fn(usize) -> !;

/// Starts the APs the firmware tables list, each running `main`, and waits
/// up to `timeout_us` for the first AP (CPU 1) to set `ready`. Returns its
/// APIC ID, or why there is none ("one CPU", or that it did not start or
/// get ready).
pub fn start_first_ap(
    platform: &crate::platform::Platform,
    main: ApMain,
    ready: &AtomicBool,
    timeout_us: u64,
) -> Result<u32, &'static str> {
    if platform.cpu_count < 2 {
        return Err("one CPU");
    }
    start_aps(&platform.apic_ids[..platform.cpu_count], main);
    if !is_online(1) {
        return Err("the AP did not start");
    }
    if !crate::time::wait_until(timeout_us, || ready.load(Ordering::Acquire)) {
        return Err("the AP did not get ready");
    }
    Ok(cpu::apic_id_of(1))
}

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
        init_sipi(index, (TRAMPOLINE_ADDR >> 12) as u8);
    }
    (0..MAX_CPUS).filter(|&c| is_online(c)).count()
}

/// INIT, then SIPI (twice if needed) to `page`, and waits up to a second for
/// CPU `index` to come online through the trampoline.
fn init_sipi(index: usize, page: u8) {
    let apic_id = cpu::apic_id_of(index);
    install_trampoline(read_cr3(), cpu::main_stack_top(index), index as u64);
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

/// Offset in the restart page of the byte the stub sets.
const RESTART_MARK_OFFSET: usize = 0x100;
/// The value it sets.
const RESTART_MARK: u8 = 0x5A;

/// What [`restart_ap`] saw.
#[derive(Clone, Copy, Debug)]
pub struct Restart {
    /// The stub at the new start-up page ran.
    pub ran_at_page: bool,
    /// The AP came back online (running its `ApMain` again from the start).
    pub online: bool,
}

/// Sends CPU `index` (an AP that was started before) INIT and a SIPI to
/// `page` (0x01-0x9E, not the trampoline's 0x08). An 11-byte real-mode stub
/// there marks that it ran, then jumps to the trampoline, so the AP comes
/// back as at start-up, running the same `ApMain`.
pub fn restart_ap(index: usize, page: u8) -> Restart {
    let base = usize::from(page) << 12;
    let trampoline_segment = (TRAMPOLINE_ADDR >> 4) as u16;
    let [seg_lo, seg_hi] = trampoline_segment.to_le_bytes();
    #[rustfmt::skip]
    let stub = [
        0x2E, 0xC6, 0x06, 0x00, 0x01, RESTART_MARK, // mov byte cs:[0x0100], mark
        0xEA, 0x00, 0x00, seg_lo, seg_hi, // jmp far trampoline_segment:0000
    ];
    let usable = page != 0 && page < 0x9F && usize::from(page) != TRAMPOLINE_ADDR >> 12;
    if !usable || index == 0 || index >= MAX_CPUS {
        return Restart {
            ran_at_page: false,
            online: false,
        };
    }
    // SAFETY: pages 0x01000-0x9EFFF other than the trampoline's hold nothing
    // once boot is over (the multiboot info has been copied out; the IVT/BDA
    // page and the EBDA's are excluded above).
    unsafe {
        let dst = base as *mut u8;
        for (i, b) in stub.iter().enumerate() {
            dst.add(i).write_volatile(*b);
        }
        dst.add(RESTART_MARK_OFFSET).write_volatile(0);
    }
    ONLINE[index].store(false, Ordering::Release);
    init_sipi(index, page);
    Restart {
        ran_at_page: phys_u8(base + RESTART_MARK_OFFSET) == RESTART_MARK,
        online: is_online(index),
    }
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
