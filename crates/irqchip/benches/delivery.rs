//! Destination resolution and MSI decoding costs.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use virq::delivery::{
    resolve, ApicAddressing, DeliveryMode, DestinationFormat, DestinationMode, DfrModel,
    InterruptMessage, Shorthand, TriggerMode,
};
use virq::msi::MsiMessage;

/// `n` enabled x2APICs with IDs 0..n, all at the same priority.
fn x2apics(n: u32) -> Vec<ApicAddressing> {
    (0..n)
        .map(|id| ApicAddressing {
            apic_id: id,
            ldr: (id >> 4) << 16 | 1 << (id & 15),
            dfr_model: DfrModel::Flat,
            x2apic: true,
            hw_enabled: true,
            sw_enabled: true,
            ppr: 0,
        })
        .collect()
}

fn message(delivery_mode: DeliveryMode, destination: u32) -> InterruptMessage {
    InterruptMessage {
        vector: 0x41,
        delivery_mode,
        destination_mode: DestinationMode::Physical,
        trigger_mode: TriggerMode::Edge,
        level: true,
        destination,
        format: DestinationFormat::X2Apic,
        shorthand: Shorthand::None,
        source: None,
    }
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("resolve");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(1));

    let apics = x2apics(255);
    let broadcast = message(DeliveryMode::Fixed, u32::MAX);
    group.bench_function("fixed_broadcast_255", |b| {
        b.iter(|| resolve(black_box(&broadcast), black_box(&apics)))
    });

    // Lowest priority with the all-including-self shorthand: every one of
    // the `n` APICs is a candidate, so the cost shows the scaling in `n`.
    for n in [1u32, 16, 64, 255] {
        let apics = x2apics(n);
        let lowest = InterruptMessage {
            shorthand: Shorthand::AllIncludingSelf,
            ..message(DeliveryMode::LowestPriority, 0)
        };
        group.bench_with_input(
            BenchmarkId::new("lowest_priority", n),
            &apics,
            |b, apics| b.iter(|| resolve(black_box(&lowest), black_box(apics))),
        );
    }
    group.finish();

    let mut group = c.benchmark_group("msi");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(1));
    let msi = MsiMessage {
        address: 0xFEE0_300C,
        data: 0x0041,
    };
    group.bench_function("decode", |b| b.iter(|| black_box(&msi).decode()));
    group.finish();
}

criterion_group!(delivery, benches);
criterion_main!(delivery);
