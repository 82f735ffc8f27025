//! Guests that misbehave on purpose (`guests/hostile`): IPI floods, level
//! lines and timers never EOI'd, timers at their fastest rate, doorbells
//! rung in a tight loop, garbage written to every device. In every irqchip mode the VMM must stay in
//! control: `--timeout` ends the run on time with its one line, or the
//! guest's own fault ends it cleanly - never a panic or a hang.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VIRQ: &str = env!("CARGO_BIN_EXE_virq");
const OUT_DIR: &str = env!("OUT_DIR");
const MODES: [&str; 3] = ["kernel", "split", "userspace"];
/// Behaviours that never end by themselves: only the timeout stops them.
const ENDLESS: [&str; 4] = ["ipi-flood", "no-eoi", "timer-storm", "doorbell-flood"];
const TIMEOUT_SECS: u64 = 3;
/// Generous: the timeout must fire at 3 s, but the machine is shared.
const LIMIT: Duration = Duration::from_secs(20);

mod common;
use common::kvm_or_skip;

struct Run {
    status: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

fn run(mode: &str, behaviour: &str) -> Run {
    let image = format!("{OUT_DIR}/hostile-guest.elf");
    let start = Instant::now();
    let out = Command::new(VIRQ)
        .args(["run", "--irqchip", mode, "--cpus", "2", "--timeout"])
        .arg(TIMEOUT_SECS.to_string())
        .arg(&image)
        .args(["--", behaviour])
        .output()
        .expect("virq runs");
    Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

/// Every (mode, behaviour) pair, two runs at a time (two host cores).
fn run_all(behaviours: &[&'static str]) -> Vec<(String, Run)> {
    let jobs: Vec<(&str, &str)> = MODES
        .iter()
        .flat_map(|&m| behaviours.iter().map(move |&b| (m, b)))
        .collect();
    let jobs = Arc::new(Mutex::new(jobs));
    let results = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (jobs, results) = (jobs.clone(), results.clone());
            std::thread::spawn(move || loop {
                let Some((mode, behaviour)) = jobs.lock().unwrap().pop() else {
                    break;
                };
                let r = run(mode, behaviour);
                results
                    .lock()
                    .unwrap()
                    .push((format!("{behaviour} in {mode} mode"), r));
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let mut results = std::mem::take(&mut *results.lock().unwrap());
    results.sort_by(|a, b| a.0.cmp(&b.0));
    results
}

fn started(r: &Run, behaviour: &str) -> bool {
    r.stdout
        .contains(&format!("# hostile: {behaviour} running"))
}

#[test]
fn floods_storms_and_missing_eois_end_by_the_timeout_in_every_mode() {
    if !kvm_or_skip() {
        return;
    }
    for (what, r) in run_all(&ENDLESS) {
        let behaviour = what.split(' ').next().unwrap_or_default();
        let context = format!("{what}: status {:?}, stderr: {}", r.status, r.stderr);
        assert!(started(&r, behaviour), "{context}; stdout: {}", r.stdout);
        assert_eq!(r.status, Some(8), "{context}");
        assert_eq!(r.stderr.lines().count(), 1, "{context}");
        assert!(
            r.stderr.starts_with(&format!(
                "virq: timeout after {TIMEOUT_SECS} s: vCPU 0 at rip"
            )),
            "{context}"
        );
        assert!(r.elapsed < LIMIT, "{context}: took {:?}", r.elapsed);
    }
}

/// Garbage may also make the guest fault on its own (an interrupt aimed
/// at an exception vector that expects an error code): that is reported
/// by the guest (status 3) or by the VMM (triple fault 4, KVM emulation
/// failure 6). Anything else - a panic, a signal, a hang - fails.
#[test]
fn garbage_to_every_device_ends_cleanly_in_every_mode() {
    if !kvm_or_skip() {
        return;
    }
    for (what, r) in run_all(&["garbage"]) {
        let context = format!("{what}: status {:?}, stderr: {}", r.status, r.stderr);
        assert!(started(&r, "garbage"), "{context}; stdout: {}", r.stdout);
        assert!(
            matches!(r.status, Some(3 | 4 | 6 | 8)),
            "{context}; stdout tail: {}",
            r.stdout.lines().last().unwrap_or_default()
        );
        assert!(!r.stderr.contains("panicked"), "{context}");
        let lines = r.stderr.lines().count();
        assert_eq!(lines, usize::from(r.status != Some(3)), "{context}");
        assert!(r.elapsed < LIMIT, "{context}: took {:?}", r.elapsed);
    }
}
