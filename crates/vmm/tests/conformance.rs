//! The guest conformance suite: every guest under `guests/` that has a
//! `checks.txt` runs in each virq irqchip mode and, as the differential
//! reference, under QEMU (TCG, and KVM with kernel_irqchip=on, split, off).
//!
//! - In every virq mode each listed check must report PASS (or SKIP), and no
//!   check may FAIL.
//! - Wherever a check's outcome differs between any two configurations, the
//!   difference must be listed in `docs/differences.md` with its reason: the
//!   table is held to be complete.
//!
//! - A reference configuration that cannot run a guest at all (it hangs or
//!   aborts on this host) must be listed in the `## runs` section of
//!   `docs/differences.md`; its checks are then left out of the comparison,
//!   it gets a short timeout, and a listed run that does finish is reported
//!   so the row is removed.
//!
//! `checks.txt`: first line `cpus: N`, then one check name per line.
//! `docs/differences.md`: sections `## <guest>` with table rows
//! `| check | configurations | virq | reference | reason |`, and a section
//! `## runs` with rows `| guest | configuration | what happens | reason |`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VIRQ: &str = env!("CARGO_BIN_EXE_virq");
const OUT_DIR: &str = env!("OUT_DIR");
const MODES: [&str; 3] = ["kernel", "split", "userspace"];
/// QEMU configurations: name, accelerator and `kernel_irqchip` (KVM only).
const QEMU_CONFIGS: [(&str, &str, Option<&str>); 4] = [
    ("qemu-tcg", "tcg", None),
    ("qemu-kvm-on", "kvm", Some("on")),
    ("qemu-kvm-split", "kvm", Some("split")),
    ("qemu-kvm-off", "kvm", Some("off")),
];
/// The host CPU as QEMU can give it here: the nested KVM rejects the
/// arch-capabilities MSR, and with QEMU's userspace LAPIC the
/// async-page-fault interrupt MSR cannot be set (QEMU aborts at start-up).
const KVM_CPU: &str = "host,-arch-capabilities,-kvm-asyncpf-int";
/// How long one guest run may take before it counts as a hang.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a run listed as hanging in `## runs` gets before it is killed.
const KNOWN_HANG_TIMEOUT: Duration = Duration::from_secs(15);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

mod common;
use common::kvm_or_skip;

/// Whether QEMU runs the reference configurations: missing QEMU fails when
/// VIRQ_REQUIRE_QEMU=1 (CI), and is a loud skip otherwise.
fn qemu_or_skip() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("VIRQ_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("qemu-system-x86_64 not available but VIRQ_REQUIRE_QEMU=1");
        }
        eprintln!("SKIPPED: qemu-system-x86_64 not available; no differential run");
    }
    ok
}

/// One guest of the suite.
#[derive(Debug, Clone)]
struct Guest {
    name: String,
    cpus: u32,
    checks: Vec<String>,
}

impl Guest {
    fn image(&self) -> PathBuf {
        Path::new(OUT_DIR).join(format!("{}-guest.elf", self.name))
    }
}

fn parse_checks(name: &str, text: &str) -> Guest {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let cpus = lines
        .next()
        .and_then(|l| l.strip_prefix("cpus:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("guests/{name}/checks.txt must start with `cpus: N`"));
    Guest {
        name: name.to_string(),
        cpus,
        checks: lines
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect(),
    }
}

fn guests() -> Vec<Guest> {
    let mut guests: Vec<Guest> = std::fs::read_dir(repo().join("guests"))
        .expect("guests/")
        .flatten()
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path().join("checks.txt")).ok()?;
            Some(parse_checks(&e.file_name().to_string_lossy(), &text))
        })
        .collect();
    guests.sort_by(|a, b| a.name.cmp(&b.name));
    guests
}

/// The last result line a guest printed, for reports of runs that crashed
/// or hung.
fn last_check(output: &str) -> &str {
    output
        .lines()
        .rev()
        .find(|l| ["PASS ", "FAIL ", "SKIP "].iter().any(|p| l.starts_with(p)))
        .unwrap_or("none")
}

/// What one configuration reported for one check.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Pass,
    Skip,
    Fail(String),
    Missing,
}

impl Outcome {
    fn word(&self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Skip => "SKIP",
            Outcome::Fail(_) => "FAIL",
            Outcome::Missing => "missing",
        }
    }
}

/// A finished run: outcome per check, plus what went wrong around them.
#[derive(Debug, Clone)]
struct Run {
    outcomes: BTreeMap<String, Outcome>,
    /// The run was killed at its timeout.
    timed_out: bool,
    trouble: Option<String>,
    output: String,
}

fn parse_output(out: &str) -> BTreeMap<String, Outcome> {
    let mut outcomes = BTreeMap::new();
    for line in out.lines() {
        let line = line.trim_end_matches('\r');
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        let name = rest.split(':').next().unwrap_or("").trim().to_string();
        let outcome = match word {
            "PASS" => Outcome::Pass,
            "SKIP" => Outcome::Skip,
            "FAIL" => Outcome::Fail(line.to_string()),
            _ => continue,
        };
        // A later FAIL of the same check wins over an earlier PASS.
        let keep = outcomes
            .get(&name)
            .is_some_and(|o| matches!(o, Outcome::Fail(_)));
        if !keep {
            outcomes.insert(name, outcome);
        }
    }
    outcomes
}

/// How a bounded run ended.
enum End {
    Exited(i32),
    Signalled(i32),
    TimedOut,
}

/// Runs `cmd`, killing it after `timeout`; returns how it ended and its
/// stdout+stderr.
fn run_bounded(mut cmd: Command, timeout: Duration) -> (End, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait().expect("wait") {
            Some(status) => {
                break match status.code() {
                    Some(code) => End::Exited(code),
                    None => End::Signalled(status.signal().unwrap_or(0)),
                }
            }
            None if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break End::TimedOut;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let out = out_thread.join().unwrap_or_default();
    let err = err_thread.join().unwrap_or_default();
    (status, format!("{out}{err}"))
}

fn run_config(guest: &Guest, config: &str, timeout: Duration) -> Run {
    let image = guest.image();
    let mut cmd;
    if let Some(mode) = config.strip_prefix("virq-") {
        cmd = Command::new(VIRQ);
        cmd.args(["run", "--irqchip", mode, "--timeout", "60", "--cpus"])
            .arg(guest.cpus.to_string())
            .arg(&image);
    } else {
        let (_, accel, irqchip) = QEMU_CONFIGS
            .iter()
            .find(|(name, _, _)| *name == config)
            .expect("known config");
        cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", accel]);
        match irqchip {
            Some(irqchip) => cmd
                .args(["-cpu", KVM_CPU, "-machine"])
                .arg(format!("kernel_irqchip={irqchip}")),
            None => cmd.args(["-cpu", "max"]),
        };
        cmd.args([
            "-m", "64", "-display", "none", "-serial", "stdio", "-monitor", "none",
        ])
        .args(["-no-reboot", "-smp"])
        .arg(guest.cpus.to_string())
        .arg("-kernel")
        .arg(&image)
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x4",
            "-device",
            "pc-testdev",
        ]);
    }
    let (status, output) = run_bounded(cmd, timeout);
    let mut outcomes = parse_output(&output);
    for check in &guest.checks {
        outcomes.entry(check.clone()).or_insert(Outcome::Missing);
    }
    // The guest ends with status 1 (all passed) or 3 (a check failed);
    // anything else is a crash, a hang or a VMM failure.
    let trouble = match status {
        End::Exited(1 | 3) => None,
        End::Exited(code) => Some(format!("exit status {code}")),
        End::Signalled(signal) => Some(format!("killed by signal {signal}")),
        End::TimedOut => Some(format!("no exit within {timeout:?}")),
    };
    Run {
        outcomes,
        timed_out: matches!(status, End::TimedOut),
        trouble,
        output,
    }
}

/// docs/differences.md, parsed.
#[derive(Debug, Default)]
struct Differences {
    /// (guest, check) -> reason.
    checks: BTreeMap<(String, String), String>,
    /// (guest, configuration) -> reason, for runs that cannot complete.
    runs: BTreeMap<(String, String), String>,
}

fn differences_table() -> Differences {
    let path = repo().join("docs/differences.md");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut table = Differences::default();
    let mut section = None::<String>;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("## ") {
            section = Some(name.trim().to_string());
            continue;
        }
        let Some(section) = &section else { continue };
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let header = |c: &str| c.is_empty() || c == "check" || c == "guest" || c.starts_with("---");
        if cells.len() < 3 || header(cells[1]) {
            continue;
        }
        let key = |c: &str| c.trim_matches('`').to_string();
        if section == "runs" {
            // | guest | configuration | what happens | reason |
            if cells.len() >= 6 {
                table
                    .runs
                    .insert((key(cells[1]), key(cells[2])), cells[4].to_string());
            }
        } else if cells.len() >= 7 {
            // | check | configurations | virq | reference | reason |
            table
                .checks
                .insert((section.clone(), key(cells[1])), cells[5].to_string());
        }
    }
    table
}

#[test]
fn a_crashed_run_is_reported_with_its_last_check() {
    let output = "# booting\nPASS a\nFAIL b: expected 1, got 2\n# noise\n";
    assert_eq!(last_check(output), "FAIL b: expected 1, got 2");
    assert_eq!(last_check("# nothing yet\n"), "none");
}

#[test]
fn differences_table_names_only_known_guests_and_checks_with_reasons() {
    let guests = guests();
    let table = differences_table();
    for ((guest, config), reason) in &table.runs {
        assert!(
            guests.iter().any(|g| &g.name == guest),
            "docs/differences.md runs: unknown guest `{guest}`"
        );
        assert!(
            QEMU_CONFIGS.iter().any(|(name, _, _)| name == config),
            "docs/differences.md runs: `{config}` is not a reference configuration \
             (virq's own modes must run every guest)"
        );
        assert!(
            !reason.is_empty(),
            "docs/differences.md runs: `{guest}/{config}` needs a reason"
        );
    }
    for ((guest, check), reason) in table.checks {
        let g = guests
            .iter()
            .find(|g| g.name == guest)
            .unwrap_or_else(|| panic!("docs/differences.md: unknown guest section `{guest}`"));
        assert!(
            g.checks.contains(&check),
            "docs/differences.md: `{guest}` has no check `{check}`"
        );
        assert!(
            !reason.is_empty(),
            "docs/differences.md: `{guest}/{check}` needs a reason"
        );
    }
}

#[test]
fn conformance_suite_in_every_mode_and_against_qemu() {
    if !kvm_or_skip() {
        return;
    }
    let mut configs: Vec<String> = MODES.iter().map(|m| format!("virq-{m}")).collect();
    if qemu_or_skip() {
        configs.extend(QEMU_CONFIGS.iter().map(|(n, _, _)| n.to_string()));
    }
    let mut guests = guests();
    assert!(!guests.is_empty(), "no guests with checks.txt");
    // While working on one guest: VIRQ_GUESTS=pic,pit runs only those.
    if let Ok(only) = std::env::var("VIRQ_GUESTS") {
        let only: BTreeSet<&str> = only.split(',').map(str::trim).collect();
        guests.retain(|g| only.contains(g.name.as_str()));
        assert!(!guests.is_empty(), "VIRQ_GUESTS={only:?} names no guest");
    }
    let table = Arc::new(differences_table());
    let jobs: Vec<(Guest, String)> = guests
        .iter()
        .flat_map(|g| configs.iter().map(move |c| (g.clone(), c.clone())))
        .collect();
    let jobs = Arc::new(Mutex::new(jobs));
    let results = Arc::new(Mutex::new(BTreeMap::<(String, String), Run>::new()));
    // Two runs at a time: the machine has two cores.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (jobs, results, table) = (jobs.clone(), results.clone(), table.clone());
            std::thread::spawn(move || loop {
                let job = jobs.lock().unwrap().pop();
                let Some((guest, config)) = job else { break };
                let known_broken = table
                    .runs
                    .contains_key(&(guest.name.clone(), config.clone()));
                let timeout = if known_broken {
                    KNOWN_HANG_TIMEOUT
                } else {
                    RUN_TIMEOUT
                };
                let mut run = run_config(&guest, &config, timeout);
                // QEMU's own devices sometimes stall a run on this shared
                // host (its userspace PIT at the minimum period, for one);
                // the reference gets a second chance, virq does not.
                let reference = !config.starts_with("virq-");
                if reference && !known_broken && run.timed_out {
                    eprintln!("{}/{config}: no exit in time; running it again", guest.name);
                    run = run_config(&guest, &config, timeout);
                }
                results
                    .lock()
                    .unwrap()
                    .insert((guest.name.clone(), config), run);
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let results = results.lock().unwrap();

    let mut problems = Vec::new();
    let mut report = String::new();
    for guest in &guests {
        report.push_str(&format!(
            "\n{} ({} vCPUs)\n{:<34}",
            guest.name, guest.cpus, "check"
        ));
        for c in &configs {
            report.push_str(&format!(" {c:>15}"));
        }
        report.push('\n');
        // Configurations whose run is compared check by check.
        let mut compared = Vec::new();
        for c in &configs {
            let run = &results[&(guest.name.clone(), c.clone())];
            let listed = table.runs.contains_key(&(guest.name.clone(), c.clone()));
            match (&run.trouble, listed) {
                (Some(t), false) => problems.push(format!(
                    "{}/{c}: {t}; last check printed: {}; output:\n{}",
                    guest.name,
                    last_check(&run.output),
                    run.output
                )),
                (None, true) => problems.push(format!(
                    "{}/{c}: listed in docs/differences.md runs as unable to run, but it ran; remove the row",
                    guest.name
                )),
                (Some(_), true) => {}
                (None, false) => compared.push(c),
            }
        }
        let mut names: BTreeSet<&String> = guest.checks.iter().collect();
        for c in &compared {
            names.extend(results[&(guest.name.clone(), (*c).clone())].outcomes.keys());
        }
        for check in names {
            report.push_str(&format!("{check:<34}"));
            let mut seen = BTreeSet::new();
            for c in &configs {
                if !compared.contains(&c) {
                    report.push_str(&format!(" {:>15}", "no run"));
                    continue;
                }
                let outcome = results[&(guest.name.clone(), c.clone())]
                    .outcomes
                    .get(check)
                    .cloned()
                    .unwrap_or(Outcome::Missing);
                report.push_str(&format!(" {:>15}", outcome.word()));
                if c.starts_with("virq-") {
                    match &outcome {
                        Outcome::Fail(line) => problems.push(format!("{}/{c}: {line}", guest.name)),
                        Outcome::Missing => {
                            problems.push(format!("{}/{c}: no result for `{check}`", guest.name))
                        }
                        _ => {}
                    }
                }
                seen.insert(outcome.word());
            }
            report.push('\n');
            if seen.len() > 1
                && !table
                    .checks
                    .contains_key(&(guest.name.clone(), check.clone()))
            {
                problems.push(format!(
                    "{}/{check}: outcomes differ between configurations but docs/differences.md has no row for it",
                    guest.name
                ));
            }
        }
    }
    println!("{report}");
    assert!(
        problems.is_empty(),
        "{report}\nproblems:\n{}",
        problems.join("\n")
    );
}
