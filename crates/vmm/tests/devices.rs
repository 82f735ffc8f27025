//! The device-path guest (`guests/devices`) on one vCPU: the conformance
//! suite runs it on two (the ring's MSI aimed at either CPU); here the same
//! paths must hold when the device thread and the only vCPU share the
//! machine, in every irqchip mode.

mod common;
use common::kvm_or_skip;
use std::process::Command;

const VIRQ: &str = env!("CARGO_BIN_EXE_virq");
const OUT_DIR: &str = env!("OUT_DIR");

fn line_of<'a>(out: &'a str, check: &str) -> Option<&'a str> {
    out.lines()
        .find(|l| l.split_whitespace().nth(1).map(|w| w.trim_end_matches(':')) == Some(check))
}

#[test]
fn ring_and_pass_through_line_on_one_vcpu_in_every_mode() {
    if !kvm_or_skip() {
        return;
    }
    for mode in ["kernel", "split", "userspace"] {
        let out = Command::new(VIRQ)
            .args(["run", "--irqchip", mode, "--cpus", "1", "--timeout", "60"])
            .arg(format!("{OUT_DIR}/devices-guest.elf"))
            .output()
            .expect("virq runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let context = format!(
            "mode {mode}:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // isa-debug-exit status 0 -> exit status 1: every check passed.
        assert_eq!(out.status.code(), Some(1), "{context}");
        for check in ["ring-requests-bsp", "passthrough-no-lost-events"] {
            let line = line_of(&stdout, check).unwrap_or_else(|| panic!("no {check}: {context}"));
            assert!(line.starts_with("PASS"), "{context}");
        }
        let ap = line_of(&stdout, "ring-requests-ap").unwrap_or_default();
        assert!(
            ap.starts_with("SKIP ring-requests-ap: one CPU"),
            "{context}"
        );
        // Only userspace mode's LAPIC can show the spurious-interrupt check.
        let spurious = line_of(&stdout, "passthrough-no-spurious-interrupt").unwrap_or_default();
        let expected = if mode == "userspace" { "PASS" } else { "SKIP" };
        assert!(spurious.starts_with(expected), "{context}");
    }
}
