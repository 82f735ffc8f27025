//! The built-in demo guest, run by `virq run` in every irqchip mode with one
//! and two vCPUs: every check the guest makes must pass, and its counts must
//! show each interrupt source arrived.

use std::process::Command;

const VIRQ: &str = env!("CARGO_BIN_EXE_virq");
const DEMO: &str = concat!(env!("OUT_DIR"), "/demo-guest.elf");

mod common;
use common::kvm_or_skip;

/// The guest's `VIRQ-COUNTS key=value ...` line as pairs.
fn counts(out: &str) -> Vec<(String, u64)> {
    let line = out
        .lines()
        .find(|l| l.starts_with("VIRQ-COUNTS "))
        .unwrap_or_else(|| panic!("no VIRQ-COUNTS line in:\n{out}"));
    line.split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().expect("count")))
        .collect()
}

fn run_demo(mode: &str, cpus: &str) {
    if !kvm_or_skip() {
        return;
    }
    let o = Command::new(VIRQ)
        .args([
            "run",
            "--irqchip",
            mode,
            "--cpus",
            cpus,
            "--timeout",
            "60",
            DEMO,
        ])
        .output()
        .expect("run virq");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{mode}/{cpus}: {err}\n{out}");
    assert!(!out.contains("FAIL"), "{mode}/{cpus}:\n{out}");
    let expected = [
        "pit-irq0-ioapic",
        "serial-thre-irq4-ioapic",
        "lapic-timer-oneshot",
        "lapic-timer-periodic",
        "ioapic-level-testdev",
        "msi-test-device",
    ];
    for check in expected {
        assert!(
            out.lines().any(|l| l == format!("PASS {check}")),
            "{mode}/{cpus}: no PASS {check}:\n{out}"
        );
    }
    let two = cpus == "2";
    for check in ["smp-start", "ipi-bsp-to-ap", "ipi-ap-to-bsp", "msi-to-ap"] {
        let passed = out.lines().any(|l| l == format!("PASS {check}"));
        assert_eq!(passed, two, "{mode}/{cpus}: PASS {check}:\n{out}");
    }
    for (source, n) in counts(&out) {
        let expect_some = source != "ipi" || two;
        assert_eq!(n > 0, expect_some, "{mode}/{cpus}: {source}={n}\n{out}");
    }
}

#[test]
fn demo_guest_passes_in_kernel_mode() {
    run_demo("kernel", "1");
    run_demo("kernel", "2");
}

#[test]
fn demo_guest_passes_in_split_mode() {
    run_demo("split", "1");
    run_demo("split", "2");
}

#[test]
fn demo_guest_passes_in_userspace_mode() {
    run_demo("userspace", "1");
    run_demo("userspace", "2");
}

#[test]
fn demo_command_passes_every_mode_and_prints_one_table() {
    if !kvm_or_skip() {
        return;
    }
    let o = Command::new(VIRQ)
        .args(["demo", "--timeout", "60"])
        .output()
        .expect("run virq demo");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    for mode in ["kernel", "split", "userspace"] {
        let row = out
            .lines()
            .find(|l| l.starts_with(mode))
            .unwrap_or_else(|| panic!("no {mode} row:\n{out}"));
        assert!(row.ends_with("PASS"), "{row}");
    }
}
