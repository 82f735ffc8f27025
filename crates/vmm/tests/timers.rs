//! Lost-tick policies under a host stall: the timers guest runs a 100 Hz
//! PIT and a 1 kHz LAPIC periodic timer over 3 s of TSC time, and one
//! second in the VMM is stopped (SIGSTOP) for a second. Under reinject the
//! guest must still count every tick (within one, plus calibration error);
//! under discard the stalled second's ticks are gone. KVM's own LAPIC (kernel
//! and split modes) always discards, and KVM's PIT (kernel mode) always
//! reinjects.

mod common;
use common::kvm_or_skip;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const VIRQ: &str = env!("CARGO_BIN_EXE_virq");
const OUT_DIR: &str = env!("OUT_DIR");
const STALL: Duration = Duration::from_secs(1);

struct Outcome {
    output: String,
    pit: u64,
    lapic: u64,
}

impl Outcome {
    fn passed(&self, check: &str) -> bool {
        self.output
            .lines()
            .any(|l| l.trim() == format!("PASS {check}"))
    }
}

/// Runs the timers guest with the policies and stalls the VMM when told.
fn run(mode: &str, pit: &str, lapic: &str, exact: bool) -> Outcome {
    let mut cmd = Command::new(VIRQ);
    cmd.args(["run", "--irqchip", mode, "--timeout", "60"])
        .args(["--pit-lost-ticks", pit, "--lapic-lost-ticks", lapic])
        .arg(format!("{OUT_DIR}/timers-guest.elf"))
        .args(["--", "stall"]);
    if exact {
        cmd.arg("exact");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("virq starts");
    let pid = child.id().to_string();
    let stdout = child.stdout.take().expect("piped stdout");
    let mut output = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("utf-8 output");
        output.push_str(&line);
        output.push('\n');
        if line.trim() == "# stall-now" {
            let stop = Command::new("kill").args(["-STOP", &pid]).status();
            assert!(stop.is_ok_and(|s| s.success()), "SIGSTOP");
            // The stall itself: what the test measures the policies against.
            std::thread::sleep(STALL);
            let cont = Command::new("kill").args(["-CONT", &pid]).status();
            assert!(cont.is_ok_and(|s| s.success()), "SIGCONT");
        }
    }
    let status = child.wait().expect("virq ends");
    assert!(
        output.contains("# stall-now"),
        "{mode}: the guest never asked for the stall:\n{output}"
    );
    // 1: every check passed, 3: a check failed; both are judged below.
    assert!(
        matches!(status.code(), Some(1 | 3)),
        "{mode}: {status}\n{output}"
    );
    let count = |key: &str| -> u64 {
        output
            .lines()
            .find_map(|l| l.strip_prefix("# counts: "))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or_else(|| panic!("{mode}: no {key} count:\n{output}"))
    };
    Outcome {
        pit: count("pit="),
        lapic: count("lapic="),
        output,
    }
}

#[test]
fn reinject_counts_every_tick_across_a_host_stall() {
    if !kvm_or_skip() {
        return;
    }
    let u = run("userspace", "reinject", "reinject", true);
    assert!(u.passed("pit-100hz-count"), "userspace PIT:\n{}", u.output);
    assert!(
        u.passed("lapic-1khz-count"),
        "userspace LAPIC:\n{}",
        u.output
    );
    // KVM's PIT reinjects too; KVM's LAPIC discards whatever we ask.
    let k = run("kernel", "reinject", "reinject", true);
    assert!(k.passed("pit-100hz-count"), "kernel PIT:\n{}", k.output);
    assert!(
        k.lapic < 2700,
        "kernel LAPIC should lose the stall:\n{}",
        k.output
    );
    let s = run("split", "reinject", "reinject", true);
    assert!(s.passed("pit-100hz-count"), "split PIT:\n{}", s.output);
}

#[test]
fn discard_loses_the_stalled_ticks_and_nothing_else() {
    if !kvm_or_skip() {
        return;
    }
    let u = run("userspace", "discard", "discard", true);
    // About 100 PIT and 1000 LAPIC ticks fall in the stall.
    assert!((180..=260).contains(&u.pit), "PIT:\n{}", u.output);
    assert!((1800..=2600).contains(&u.lapic), "LAPIC:\n{}", u.output);
    let s = run("split", "discard", "discard", true);
    assert!((180..=260).contains(&s.pit), "split PIT:\n{}", s.output);
}
