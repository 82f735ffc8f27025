//! `virq bench` end to end: two rounds in virq's three modes (a figure is
//! the median of the rounds that measured it, so one sample that a loaded
//! host stalls past its timeout does not lose the figure); every figure
//! must be present in the JSON, positive and finite, with its host CPU time
//! and exit counts per sample (no timing is asserted: the machines are
//! shared and noisy). Latency figures give p50 and p99, rate figures
//! interrupts per second.

mod common;
use common::kvm_or_skip;
use std::process::Command;

const VIRQ: &str = env!("CARGO_BIN_EXE_virq");

/// Latency figures every virq mode must measure on two vCPUs.
const FIGURES: &[&str] = &[
    "exit-floor",
    "self-ipi",
    "ipi",
    "msi-testdev",
    "device-msi",
    "device-roundtrip",
    "device-line",
    "timer-late",
    "pit-late",
];
/// Rate figures every virq mode must measure.
const RATE_FIGURES: &[&str] = &["irq-rate", "device-rate"];
const CONFIGS: &[&str] = &["virq-kernel", "virq-split", "virq-userspace"];

#[test]
fn bench_without_qemu_gives_every_figure() {
    if !kvm_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("virq-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("bench.json");
    let svg = dir.join("bench.svg");
    let out = Command::new(VIRQ)
        .args(["bench", "--rounds", "2", "--no-qemu", "--json"])
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .output()
        .expect("run virq bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "virq bench failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("exit-floor"), "no table:\n{stdout}");
    assert!(
        stdout.contains("interrupts per second"),
        "no rates:\n{stdout}"
    );

    let text = std::fs::read_to_string(&json).expect("JSON written");
    let report: serde_json::Value = serde_json::from_str(&text).expect("JSON parses");
    let cells = report["cells"].as_array().expect("cells");
    let kvm_stats = virq_kvm::kvm_stats::supported();
    if !kvm_stats {
        eprintln!("SKIPPED: KVM's exit statistics (no KVM_CAP_BINARY_STATS_FD on this host)");
    }
    // Host CPU time and KVM's own exit count, for every figure.
    let counted = |config: &str, figure: &str, cell: &serde_json::Value| {
        let cpu = cell["cpu_us_per_sample"].as_f64();
        assert!(
            cpu.is_some_and(|v| v.is_finite() && v >= 0.0),
            "{figure} {config}: CPU per sample: {cell}"
        );
        // KVM's own count exists wherever the kernel has binary stats.
        if kvm_stats {
            let all = cell["kvm_exits_per_sample"]["total"].as_f64();
            assert!(
                all.is_some_and(|v| v.is_finite() && v >= 0.0),
                "{figure} {config}: KVM's exits per sample: {cell}"
            );
        }
    };
    let cell = |config: &str, figure: &str| {
        cells
            .iter()
            .find(|c| c["config"] == config && c["figure"] == figure)
            .unwrap_or_else(|| panic!("no {figure} for {config} in {text}"))
    };
    for config in CONFIGS {
        for figure in RATE_FIGURES {
            let cell = cell(config, figure);
            let rate = cell["rate_per_s"].as_f64();
            assert!(
                rate.is_some_and(|r| r.is_finite() && r > 0.0),
                "{figure} {config}: rate: {cell}"
            );
            let exits = cell["exits_per_sample"]["total"].as_f64();
            assert!(
                exits.is_some_and(f64::is_finite),
                "{figure} {config}: exits per interrupt: {cell}"
            );
            counted(config, figure, cell);
        }
        for figure in FIGURES {
            let cell = cell(config, figure);
            for key in ["p50_us", "p99_us"] {
                let v = cell[key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{figure} {config}: {key} missing: {cell}"));
                assert!(v.is_finite() && v > 0.0, "{figure} {config}: {key} = {v}");
            }
            assert!(
                cell["samples"].as_u64().unwrap_or(0) > 0,
                "{figure} {config}: {cell}"
            );
            let exits = cell["exits_per_sample"]["total"].as_f64();
            assert!(
                exits.is_some_and(f64::is_finite),
                "{figure} {config}: exits per sample: {cell}"
            );
            counted(config, figure, cell);
        }
        let kernel = cells
            .iter()
            .find(|c| c["config"] == "virq-kernel" && c["figure"] == "ipi")
            .expect("kernel ipi");
        assert!(kernel["p50_vs_virq_kernel"].as_f64().is_some());
    }
    let chart = std::fs::read_to_string(&svg).expect("SVG written");
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_bad_flags_are_one_line() {
    let out = Command::new(VIRQ)
        .args(["bench", "--rounds", "0"])
        .output()
        .expect("run virq bench");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("virq: "), "{stderr}");
}
