//! Run statistics: VM exits by reason, interrupts raised by the VMM's
//! devices, the guest's own interrupt counts, and the demo table.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use virq_kvm::{ExitCounts, KvmExits};

/// Number of GSIs whose raises are counted one by one (the IOAPIC's pins).
pub const COUNTED_GSIS: usize = 24;

/// The GSI of COM1.
pub const SERIAL_GSI: u32 = 4;

/// Live counters of interrupts raised by the VMM's devices.
#[derive(Debug, Default)]
pub struct RaiseCounters {
    gsi: [AtomicU64; COUNTED_GSIS],
    other_gsi: AtomicU64,
    msi: AtomicU64,
}

impl RaiseCounters {
    /// Counts one raise (a `set_gsi(gsi, true)`, so a pulse counts once).
    pub fn count_gsi(&self, gsi: u32) {
        match self.gsi.get(gsi as usize) {
            Some(c) => c.fetch_add(1, Relaxed),
            None => self.other_gsi.fetch_add(1, Relaxed),
        };
    }

    /// Counts one MSI.
    pub fn count_msi(&self) {
        self.msi.fetch_add(1, Relaxed);
    }

    /// A plain copy.
    pub fn snapshot(&self) -> RaiseCounts {
        RaiseCounts {
            per_gsi: self.gsi.iter().map(|c| c.load(Relaxed)).collect(),
            other_gsi: self.other_gsi.load(Relaxed),
            msi: self.msi.load(Relaxed),
        }
    }
}

/// Interrupts the VMM's devices raised, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaiseCounts {
    /// Raises per GSI 0-23.
    pub per_gsi: Vec<u64>,
    /// Raises of GSIs above 23.
    pub other_gsi: u64,
    /// MSIs sent.
    pub msi: u64,
}

impl RaiseCounts {
    /// Raises of the serial port's line (GSI 4).
    pub fn serial(&self) -> u64 {
        self.per_gsi.get(SERIAL_GSI as usize).copied().unwrap_or(0)
    }

    /// Raises of every other line (the pc-testdev IOAPIC lines, mostly).
    pub fn ioapic_lines(&self) -> u64 {
        self.per_gsi.iter().sum::<u64>() + self.other_gsi - self.serial()
    }
}

/// The guest's own count of handled interrupts by source, from its
/// `VIRQ-COUNTS pit=N serial=N ipi=N timer=N ioapic=N msi=N` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCounts {
    /// 8254 PIT interrupts.
    pub pit: u64,
    /// Serial interrupts.
    pub serial: u64,
    /// Inter-processor interrupts.
    pub ipi: u64,
    /// LAPIC timer interrupts.
    pub timer: u64,
    /// IOAPIC line interrupts (pc-testdev).
    pub ioapic: u64,
    /// MSIs.
    pub msi: u64,
}

/// Prefix of the guest's counts line.
pub const COUNTS_PREFIX: &str = "VIRQ-COUNTS";

impl GuestCounts {
    /// Parses the last `VIRQ-COUNTS ...` line of `console`. Unknown keys are
    /// ignored; missing ones stay 0; no line at all gives `None`.
    pub fn parse(console: &str) -> Option<Self> {
        let line = console
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix(COUNTS_PREFIX))?;
        let mut c = GuestCounts::default();
        for field in line.split_whitespace() {
            let Some((key, value)) = field.split_once('=') else {
                continue;
            };
            let Ok(v) = value.parse::<u64>() else {
                continue;
            };
            match key {
                "pit" => c.pit = v,
                "serial" => c.serial = v,
                "ipi" => c.ipi = v,
                "timer" => c.timer = v,
                "ioapic" => c.ioapic = v,
                "msi" => c.msi = v,
                _ => {}
            }
        }
        Some(c)
    }
}

/// The guest's `PASS name` / `FAIL name: ...` lines, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestChecks {
    /// Number of `PASS` lines.
    pub passed: u32,
    /// The `FAIL` lines, verbatim.
    pub failed: Vec<String>,
}

impl GuestChecks {
    /// Collects the check lines of `console`.
    pub fn parse(console: &str) -> Self {
        let mut c = GuestChecks::default();
        for line in console.lines().map(str::trim) {
            if line.starts_with("PASS ") {
                c.passed += 1;
            } else if line.starts_with("FAIL ") {
                c.failed.push(line.to_string());
            }
        }
        c
    }
}

/// Everything one run produced, as plain data (`--stats-json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    /// Irqchip mode name.
    pub mode: String,
    /// Number of vCPUs.
    pub cpus: u32,
    /// virq's exit status for this run.
    pub exit_code: i32,
    /// What ended the run, in words.
    pub cause: String,
    /// Wall time of the run in milliseconds.
    pub wall_ms: f64,
    /// All vCPUs' exits added up.
    pub exits: ExitCounts,
    /// Exits per vCPU, by index.
    pub exits_per_vcpu: Vec<ExitCounts>,
    /// KVM's own exit statistics of all vCPUs added up (exits it handled
    /// itself included); `None` where the kernel has no binary statistics.
    #[serde(default)]
    pub kvm_exits: Option<KvmExits>,
    /// Interrupts raised by the VMM's devices.
    pub vmm_raises: RaiseCounts,
    /// The guest's own counts, if it printed them.
    pub guest_counts: Option<GuestCounts>,
    /// The guest's own checks.
    pub checks: GuestChecks,
}

impl RunStats {
    /// The guest ended with success (status 1 = isa-debug-exit of 0) and
    /// reported no failed check.
    pub fn passed(&self) -> bool {
        self.exit_code == 1 && self.checks.failed.is_empty()
    }
}

/// One row of the demo table: a run, or a mode that could not run.
#[derive(Clone, Debug)]
pub enum DemoRow {
    /// The mode ran.
    Ran(Box<RunStats>),
    /// The mode did not run; the string says why.
    NotRun {
        /// Mode name.
        mode: String,
        /// Why.
        reason: String,
    },
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Renders the demo table: per mode, interrupts by source as the guest
/// counted them (with the VMM's own count in brackets where it raised them),
/// exits by reason, wall time and the verdict.
pub fn render_table(rows: &[DemoRow]) -> String {
    let mut out = String::new();
    let header = [
        "mode", "pit", "serial", "ipi", "timer", "ioapic", "msi", "exits", "wall", "result",
    ];
    let mut lines: Vec<[String; 10]> = Vec::new();
    let mut details = Vec::new();
    for row in rows {
        match row {
            DemoRow::Ran(s) => {
                let g = s.guest_counts;
                let v = &s.vmm_raises;
                let result = if s.passed() {
                    "PASS".to_string()
                } else {
                    format!("FAIL ({})", s.cause)
                };
                lines.push([
                    s.mode.clone(),
                    opt(g.map(|g| g.pit)),
                    format!("{} [{}]", opt(g.map(|g| g.serial)), v.serial()),
                    opt(g.map(|g| g.ipi)),
                    opt(g.map(|g| g.timer)),
                    format!("{} [{}]", opt(g.map(|g| g.ioapic)), v.ioapic_lines()),
                    format!("{} [{}]", opt(g.map(|g| g.msi)), v.msi),
                    s.exits.total().to_string(),
                    format!("{:.1} ms", s.wall_ms),
                    result,
                ]);
                let by_reason: Vec<String> = s
                    .exits
                    .named()
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(k, n)| format!("{k}={n}"))
                    .collect();
                details.push(format!("  {} exits: {}", s.mode, by_reason.join(" ")));
                for f in &s.checks.failed {
                    details.push(format!("  {} guest: {f}", s.mode));
                }
            }
            DemoRow::NotRun { mode, reason } => {
                let mut l: [String; 10] = Default::default();
                l[0] = mode.clone();
                for cell in l.iter_mut().skip(1).take(8) {
                    *cell = "-".into();
                }
                l[9] = format!("not run ({reason})");
                lines.push(l);
            }
        }
    }
    let mut widths = header.map(str::len);
    for l in &lines {
        for (w, cell) in widths.iter_mut().zip(l.iter()) {
            *w = (*w).max(cell.len());
        }
    }
    let fmt_row = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths.iter()).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(&format!("{cell:<w$}"));
        }
        s.trim_end().to_string() + "\n"
    };
    out.push_str(&fmt_row(header.to_vec()));
    for l in &lines {
        out.push_str(&fmt_row(l.iter().map(String::as_str).collect()));
    }
    out.push_str("interrupts as counted by the guest; [n] = raised by the VMM's devices\n");
    for d in details {
        out.push_str(&d);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_counts_line_parses_last_occurrence() {
        let console = "hello\nVIRQ-COUNTS pit=1\nPASS a\nVIRQ-COUNTS pit=5 serial=2 ipi=3 timer=4 ioapic=6 msi=7 extra=9\n";
        assert_eq!(
            GuestCounts::parse(console),
            Some(GuestCounts {
                pit: 5,
                serial: 2,
                ipi: 3,
                timer: 4,
                ioapic: 6,
                msi: 7
            })
        );
        assert_eq!(GuestCounts::parse("nothing here"), None);
        assert_eq!(
            GuestCounts::parse("VIRQ-COUNTS pit=x msi=2"),
            Some(GuestCounts {
                msi: 2,
                ..Default::default()
            })
        );
    }

    #[test]
    fn checks_are_counted() {
        let c = GuestChecks::parse("PASS a\nFAIL b: wrong\nPASS c\nPASSED d\n");
        assert_eq!(c.passed, 2);
        assert_eq!(c.failed, vec!["FAIL b: wrong".to_string()]);
    }

    #[test]
    fn raise_counters_split_serial_from_other_lines() {
        let r = RaiseCounters::default();
        r.count_gsi(4);
        r.count_gsi(4);
        r.count_gsi(10);
        r.count_gsi(99);
        r.count_msi();
        let s = r.snapshot();
        assert_eq!(s.serial(), 2);
        assert_eq!(s.ioapic_lines(), 2);
        assert_eq!(s.msi, 1);
    }

    #[test]
    fn run_passes_only_on_status_1_without_failures() {
        let mut s = RunStats {
            exit_code: 1,
            ..Default::default()
        };
        assert!(s.passed());
        s.checks.failed.push("FAIL x: y".into());
        assert!(!s.passed());
        s.checks.failed.clear();
        s.exit_code = 3;
        assert!(!s.passed());
    }

    #[test]
    fn table_has_one_row_per_mode() {
        let rows = vec![
            DemoRow::Ran(Box::new(RunStats {
                mode: "kernel".into(),
                exit_code: 1,
                ..Default::default()
            })),
            DemoRow::NotRun {
                mode: "split".into(),
                reason: "not implemented".into(),
            },
        ];
        let t = render_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("mode"));
        assert!(lines[1].starts_with("kernel") && lines[1].ends_with("PASS"));
        assert!(lines[2].starts_with("split") && lines[2].contains("not run"));
    }
}
