//! Whole-path costs through the chipset, as a userspace-irqchip VMM drives
//! it: a device raises an interrupt, the vCPU takes it, the guest EOIs.
//!
//! Each round trip ends in the state it started from, so every iteration
//! does the full work (nothing is coalesced into an already-set IRR bit).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use virq::chipset::{Chipset, ChipsetConfig, LapicPlacement};
use virq::inject::{decide, Decision, Interruptibility};
use virq::ioapic::IoapicVersion;
use virq::msi::MsiMessage;
use virq::pit::LostTickPolicy;
use virq::posted::Posted;
use virq::routing::SourceId;

const LAPIC: u64 = 0xFEE0_0000;
const IOAPIC: u64 = 0xFEC0_0000;
const SVR: u64 = 0xF0;
const EOI: u64 = 0xB0;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const TPR: u64 = 0x80;
const LEVEL_PIN: u32 = 10;

const READY: Interruptibility = Interruptibility {
    if_flag: true,
    interrupt_shadow: false,
    nmi_blocked: false,
    event_pending: false,
};

/// A userspace-irqchip chipset with every LAPIC software-enabled.
fn chipset(vcpus: usize) -> Chipset {
    let mut chip = Chipset::new(ChipsetConfig {
        vcpus,
        lapics: LapicPlacement::Model,
        ioapic_version: IoapicVersion::V20,
        pit_policy: LostTickPolicy::Reinject,
        tsc_hz: 1_000_000_000,
        tsc_offset: 0,
    })
    .expect("chipset");
    for cpu in 0..vcpus {
        write32(&mut chip, cpu, LAPIC + SVR, 0x1FF);
    }
    chip.drain_events().for_each(drop);
    chip
}

fn write32(chip: &mut Chipset, cpu: usize, addr: u64, value: u32) {
    assert!(chip.mmio_write(cpu, addr, &value.to_le_bytes(), 0));
}

/// What a vCPU loop does before entry: decide, acknowledge, return the vector.
fn take(chip: &mut Chipset, cpu: usize) -> Option<u8> {
    match decide(&chip.pending(cpu), &READY) {
        d @ Decision::InjectVector(_) => chip.acknowledge(cpu, d, 0),
        _ => None,
    }
}

fn ioapic_write(chip: &mut Chipset, index: u32, value: u32) {
    write32(chip, 0, IOAPIC, index);
    write32(chip, 0, IOAPIC + 0x10, value);
}

fn ioapic_read(chip: &mut Chipset, index: u32) -> u32 {
    write32(chip, 0, IOAPIC, index);
    let mut data = [0u8; 4];
    chip.mmio_read(0, IOAPIC + 0x10, &mut data, 0);
    u32::from_le_bytes(data)
}

fn bench_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    group
}

fn msi_edge(c: &mut Criterion) {
    let mut chip = chipset(1);
    let msi = MsiMessage {
        address: 0xFEE0_0000,
        data: 0x0041,
    };
    let mut group = bench_group(c, "msi_edge");
    group.bench_function("deliver_take_eoi", |b| {
        b.iter(|| {
            chip.send_msi(black_box(msi), 0).expect("valid MSI");
            let vector = take(&mut chip, 0);
            write32(&mut chip, 0, LAPIC + EOI, 0);
            chip.drain_events().for_each(drop);
            black_box(vector)
        })
    });
    group.finish();
    assert_eq!(take(&mut chip, 0), None, "every MSI was taken and EOI'd");
}

fn ioapic_level(c: &mut Criterion) {
    let mut chip = chipset(1);
    // Pin 10: vector 0x42, level-triggered, active high, to APIC 0.
    ioapic_write(&mut chip, 0x10 + 2 * LEVEL_PIN, 0x0000_8042);
    ioapic_write(&mut chip, 0x11 + 2 * LEVEL_PIN, 0);
    let source = SourceId::new(7).expect("source id");
    let mut group = bench_group(c, "ioapic_level");
    group.bench_function("assert_take_lower_eoi", |b| {
        b.iter(|| {
            chip.set_gsi(LEVEL_PIN, source, true, 0);
            let vector = take(&mut chip, 0);
            // The device is serviced in the handler, then the guest EOIs,
            // which clears remote IRR through the EOI broadcast.
            chip.set_gsi(LEVEL_PIN, source, false, 0);
            write32(&mut chip, 0, LAPIC + EOI, 0);
            chip.drain_events().for_each(drop);
            black_box(vector)
        })
    });
    group.finish();
    let remote_irr = ioapic_read(&mut chip, 0x10 + 2 * LEVEL_PIN) & (1 << 14);
    assert_eq!(remote_irr, 0, "remote IRR cleared by the last EOI");
}

/// A fixed IPI from vCPU 0 to every LAPIC (xAPIC destination 0xFF): only
/// the ICR write that sends it is timed; taking and EOI-ing it on each of
/// the targets is the untimed reset between iterations.
fn broadcast_ipi(c: &mut Criterion) {
    let mut group = bench_group(c, "ipi");
    for vcpus in [2usize, 16, 64, 255] {
        let mut chip = chipset(vcpus);
        write32(&mut chip, 0, LAPIC + ICR_HIGH, 0xFF00_0000);
        group.bench_with_input(
            BenchmarkId::new("fixed_broadcast", vcpus),
            &vcpus,
            |b, &vcpus| {
                b.iter_custom(|iters| {
                    let mut spent = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        write32(&mut chip, 0, LAPIC + ICR_LOW, 0x0000_0043);
                        spent += start.elapsed();
                        for cpu in 0..vcpus {
                            assert_eq!(take(&mut chip, cpu), Some(0x43));
                            write32(&mut chip, cpu, LAPIC + EOI, 0);
                        }
                        chip.drain_events().for_each(drop);
                    }
                    spent
                })
            },
        );
    }
    group.finish();
}

/// Lowest-priority MSIs to a logical flat destination naming up to 8 APICs,
/// and to all APICs by the broadcast destination in x2APIC-less cluster
/// mode: the cost must grow at most linearly with the candidate set.
fn lowest_priority(c: &mut Criterion) {
    let mut group = bench_group(c, "lowest_priority_msi");
    for vcpus in [1usize, 2, 4, 8] {
        let mut chip = chipset(vcpus);
        for cpu in 0..vcpus {
            // Logical flat: LDR bit `cpu`; distinct TPRs so arbitration has work.
            write32(&mut chip, cpu, LAPIC + 0xD0, 1 << (24 + cpu));
            write32(&mut chip, cpu, LAPIC + TPR, (cpu as u32 * 0x10) & 0x30);
        }
        let mask = ((1u64 << vcpus) - 1) << 12;
        // Logical destination, redirection hint, lowest-priority delivery.
        let msi = MsiMessage {
            address: 0xFEE0_0000 | mask | 0xC,
            data: 0x0100 | 0x51,
        };
        group.bench_with_input(
            BenchmarkId::new("deliver_take_eoi", vcpus),
            &vcpus,
            |b, &vcpus| {
                b.iter(|| {
                    chip.send_msi(black_box(msi), 0).expect("valid MSI");
                    let mut taken = 0;
                    for cpu in 0..vcpus {
                        if take(&mut chip, cpu).is_some() {
                            write32(&mut chip, cpu, LAPIC + EOI, 0);
                            taken += 1;
                        }
                    }
                    chip.drain_events().for_each(drop);
                    assert_eq!(taken, 1);
                })
            },
        );
    }
    group.finish();
}

/// A device thread's MSI while a vCPU thread keeps taking the chipset lock
/// for its exits (an xAPIC register read each, and the posted-MSI
/// acceptance every holder does): the MSI sent under the lock, and the one
/// posted without it. The vCPU thread also takes and EOIs what arrives, so
/// IRR bits never saturate.
fn device_msi_beside_a_busy_vcpu(c: &mut Criterion) {
    let mut group = bench_group(c, "device_msi_beside_a_busy_vcpu");
    let msi = MsiMessage {
        address: 0xFEE0_1000,
        data: 0x0041,
    };
    for posted in [false, true] {
        let chip = Arc::new(Mutex::new(chipset(2)));
        let door = chip.lock().expect("chipset").posted();
        let stop = Arc::new(AtomicBool::new(false));
        let vcpu = {
            let (chip, stop) = (chip.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut data = [0u8; 4];
                while !stop.load(Ordering::Relaxed) {
                    let mut c = chip.lock().expect("chipset");
                    c.accept_posted(0);
                    c.mmio_read(1, LAPIC + 0x30, &mut data, 0);
                    if take(&mut c, 1).is_some() {
                        write32(&mut c, 1, LAPIC + EOI, 0);
                    }
                    c.drain_events().for_each(drop);
                }
            })
        };
        let name = if posted { "posted" } else { "locked" };
        group.bench_function(name, |b| {
            b.iter(|| {
                if posted {
                    assert_eq!(door.post_msi(black_box(msi)), Some(Posted::Vcpu(1)));
                } else {
                    let mut c = chip.lock().expect("chipset");
                    c.accept_posted(0);
                    c.send_msi(black_box(msi), 0).expect("valid MSI");
                    c.drain_events().for_each(drop);
                }
            })
        });
        stop.store(true, Ordering::Relaxed);
        vcpu.join().expect("vCPU thread");
    }
    group.finish();
}

criterion_group!(
    chipset_paths,
    msi_edge,
    ioapic_level,
    broadcast_ipi,
    lowest_priority,
    device_msi_beside_a_busy_vcpu
);
criterion_main!(chipset_paths);
