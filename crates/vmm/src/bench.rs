//! `virq bench`: runs the benchmark guest (guests/bench) in virq's three
//! irqchip modes and, when asked, under QEMU with KVM's in-kernel irqchip,
//! the split one and QEMU's own devices; rounds interleave every
//! configuration so the figures stay comparable as ratios on a noisy host.
//! Extra runs of one figure each, against a run measuring nothing, give host
//! CPU time and VM exits per sample. Prints the tables, writes JSON and
//! draws an SVG bar chart of the latencies.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use virq::pit::LostTickPolicy;
use virq_kvm::cpu_time::{self, CpuTime};
use virq_kvm::{ExitCounts, IrqchipMode, KvmExits};
use virq_vmm::cli::BenchArgs;
use virq_vmm::vm::{self, SerialOut, VmConfig};

/// The benchmark guest (ELF32, the image QEMU runs too).
const BENCH_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bench-guest.elf"));

/// Figures, in the guest's order.
pub const FIGURES: &[&str] = &[
    "exit-floor",
    "self-ipi",
    "ipi",
    "msi-testdev",
    "device-msi",
    "device-roundtrip",
    "device-line",
    "timer-late",
    "pit-late",
    "irq-rate",
    "device-rate",
];

/// Samples of the runs that count exits: many, so the exits of booting
/// (which vary with timing, e.g. polling the PIT) matter little per sample.
const EXIT_SAMPLES: u64 = 1000;
/// vCPUs of the benchmark machine.
const CPUS: u32 = 2;
/// RAM of the benchmark machine, in MiB.
const MEMORY_MIB: u64 = 64;
/// QEMU's CPU model on these hosts (see conformance.rs).
const QEMU_CPU: &str = "host,-arch-capabilities,-kvm-asyncpf-int";
/// QEMU's binary.
const QEMU: &str = "qemu-system-x86_64";

/// One configuration of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Virq(IrqchipMode),
    /// QEMU -accel kvm with this kernel_irqchip value.
    Qemu(&'static str),
}

impl Config {
    fn name(self) -> String {
        match self {
            Config::Virq(m) => format!("virq-{}", m.name()),
            Config::Qemu(k) => format!("qemu-{k}"),
        }
    }

    fn cpus(self) -> u32 {
        match self {
            // QEMU cannot run two vCPUs with its own irqchip on these hosts.
            Config::Qemu("off") => 1,
            _ => CPUS,
        }
    }

    fn note(self) -> Option<&'static str> {
        match self {
            Config::Qemu("off") => {
                Some("QEMU's own irqchip does not run 2 vCPUs on this host: 1 vCPU, no IPI figure")
            }
            _ => None,
        }
    }
}

/// One `BENCH` line.
#[derive(Clone, Debug, PartialEq)]
pub enum Line {
    /// Measured: samples, p50 and p99 in ns.
    Figure {
        name: String,
        n: u64,
        p50_ns: f64,
        p99_ns: f64,
    },
    /// A rate: interrupts counted and interrupts per second.
    Rate { name: String, n: u64, per_s: f64 },
    /// Not measured, and why.
    Skip { name: String, reason: String },
}

impl Line {
    /// The figure's name.
    pub fn name(&self) -> &str {
        match self {
            Line::Figure { name, .. } | Line::Rate { name, .. } | Line::Skip { name, .. } => name,
        }
    }

    /// Samples (latencies) or interrupts (rates) measured, if any.
    pub fn count(&self) -> Option<u64> {
        match self {
            Line::Figure { n, .. } | Line::Rate { n, .. } => Some(*n),
            Line::Skip { .. } => None,
        }
    }
}

/// Parses the guest's `BENCH` lines; other lines are ignored.
pub fn parse_lines(console: &str) -> Vec<Line> {
    let mut out = Vec::new();
    for line in console.lines() {
        let Some(rest) = line.trim_end().strip_prefix("BENCH ") else {
            continue;
        };
        let fields: BTreeMap<&str, &str> = rest
            .split(' ')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let Some(name) = fields.get("name") else {
            continue;
        };
        if let Some(reason) = fields.get("skip") {
            out.push(Line::Skip {
                name: name.to_string(),
                reason: reason.replace('-', " "),
            });
            continue;
        }
        let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
        if let (Some(n), Some(rate)) = (num("n"), num("rate")) {
            if n > 0 {
                out.push(Line::Rate {
                    name: name.to_string(),
                    n,
                    per_s: rate as f64,
                });
            }
            continue;
        }
        if let (Some(n), Some(p50), Some(p99), Some(tsc)) =
            (num("n"), num("p50"), num("p99"), num("tsc_per_ms"))
        {
            if tsc == 0 || n == 0 {
                continue;
            }
            let ns = |ticks: u64| ticks as f64 * 1e6 / tsc as f64;
            out.push(Line::Figure {
                name: name.to_string(),
                n,
                p50_ns: ns(p50),
                p99_ns: ns(p99),
            });
        }
    }
    out
}

/// One round's result of one figure in one configuration.
#[derive(Clone, Debug, Serialize)]
pub struct RoundFigure {
    pub p50_us: f64,
    pub p99_us: f64,
}

/// VM exits per sample of one figure (virq only): those that reached the
/// VMM, or (`kvm_exits_per_sample`) every exit as KVM counts it.
#[derive(Clone, Debug, Serialize)]
pub struct ExitsPerSample {
    pub total: f64,
    pub by_reason: BTreeMap<String, f64>,
}

/// One cell of the table.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cell {
    pub figure: String,
    pub config: String,
    pub samples: u64,
    /// Median over rounds of each round's p50, in us.
    pub p50_us: Option<f64>,
    /// Median over rounds of each round's p99, in us.
    pub p99_us: Option<f64>,
    /// p50 divided by virq-kernel's p50.
    pub p50_vs_virq_kernel: Option<f64>,
    /// Rate figures: median over rounds of interrupts per second.
    pub rate_per_s: Option<f64>,
    /// The rate divided by virq-kernel's rate.
    pub rate_vs_virq_kernel: Option<f64>,
    pub rounds: Vec<RoundFigure>,
    pub exits_per_sample: Option<ExitsPerSample>,
    /// KVM's own count of all exits per sample, by its statistic names;
    /// `None` without binary statistics (or for QEMU).
    pub kvm_exits_per_sample: Option<ExitsPerSample>,
    /// Host CPU time (user + system) of the whole VM per sample, in us.
    pub cpu_us_per_sample: Option<f64>,
    /// CPU per sample divided by virq-kernel's.
    pub cpu_vs_virq_kernel: Option<f64>,
    pub skipped: Option<String>,
}

/// Everything `--json` writes.
#[derive(Debug, Serialize)]
pub struct Report {
    pub rounds: u32,
    pub configs: Vec<ConfigReport>,
    pub figures: Vec<String>,
    pub cells: Vec<Cell>,
}

#[derive(Debug, Serialize)]
pub struct ConfigReport {
    pub name: String,
    pub cpus: u32,
    pub note: Option<String>,
    /// Why it did not run at all (every round failed).
    pub failure: Option<String>,
}

/// What one run of the guest gave.
struct Run {
    lines: Vec<Line>,
    exits: Option<ExitCounts>,
    kvm_exits: Option<KvmExits>,
    /// Host CPU time of the whole VM, setup and teardown included.
    cpu: Option<CpuTime>,
}

impl Run {
    /// Whether the guest measured `figure` (rather than skipping it).
    fn measured(&self, figure: &str) -> bool {
        self.lines
            .iter()
            .any(|l| l.name() == figure && l.count().is_some())
    }
}

/// `after - before`, or `None` if either reading failed.
fn cpu_between(
    before: std::io::Result<CpuTime>,
    after: std::io::Result<CpuTime>,
) -> Option<CpuTime> {
    match (before, after) {
        (Ok(b), Ok(a)) => Some(a - b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("cannot read CPU time: {e}");
            None
        }
    }
}

/// The guest command line, with the options the bench was asked for
/// (`pv-eoi`, `x2apic`) added; the guest uses each only where offered.
fn guest_cmdline(cmdline: &str, args: &BenchArgs) -> String {
    let extra = [(args.pv_eoi, "pv-eoi"), (args.x2apic, "x2apic")];
    let words = std::iter::once(cmdline)
        .chain(extra.iter().filter(|(on, _)| *on).map(|(_, w)| *w))
        .filter(|w| !w.is_empty());
    words.collect::<Vec<_>>().join(" ")
}

fn virq_run(mode: IrqchipMode, cmdline: &str, args: &BenchArgs) -> Result<Run> {
    let cfg = VmConfig {
        mode,
        cpus: CPUS,
        ram_mib: MEMORY_MIB,
        timeout: Some(args.timeout),
        cmdline: guest_cmdline(cmdline, args),
        serial: if args.show_serial {
            SerialOut::Stdout
        } else {
            SerialOut::Discard
        },
        pit_lost_ticks: LostTickPolicy::Reinject,
        lapic_lost_ticks: LostTickPolicy::Discard,
        halt_poll: Duration::from_micros(args.halt_poll_us),
    };
    // The bench does nothing else meanwhile, so the process's CPU time
    // (every thread, ended ones included) is the VM's.
    let before = cpu_time::this_process();
    let r = vm::run_image(&cfg, BENCH_IMAGE)?;
    let cpu = cpu_between(before, cpu_time::this_process());
    if r.exit_code != 1 {
        bail!(
            "the guest did not finish ({})",
            r.failure.unwrap_or_else(|| r.stats.cause.clone())
        );
    }
    // The guest's serial output costs two port exits a byte (LSR, THR);
    // runs print different lines, so leave it out of the comparison.
    let mut exits = r.stats.exits;
    exits.io = exits.io.saturating_sub(2 * r.console.len() as u64);
    Ok(Run {
        lines: parse_lines(&r.console),
        exits: Some(exits),
        kvm_exits: r.stats.kvm_exits,
        cpu,
    })
}

fn qemu_run(
    kernel_irqchip: &str,
    cpus: u32,
    image: &Path,
    cmdline: &str,
    args: &BenchArgs,
) -> Result<Run> {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", "kvm", "-cpu", QEMU_CPU, "-machine"])
        .arg(format!("kernel_irqchip={kernel_irqchip}"))
        .args([
            "-m", "64", "-display", "none", "-serial", "stdio", "-monitor", "none",
        ])
        .args(["-no-reboot", "-smp"])
        .arg(cpus.to_string())
        .arg("-kernel")
        .arg(image)
        .arg("-append")
        .arg(guest_cmdline(cmdline, args))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // QEMU is the only child in flight: the reaped children's CPU time
    // grows by exactly its own once it has been waited for.
    let before = cpu_time::reaped_children();
    let mut child = cmd.spawn().with_context(|| format!("cannot run {QEMU}"))?;
    let mut stdout = child.stdout.take().context("no QEMU stdout")?;
    let mut stderr = child.stderr.take().context("no QEMU stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > args.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let cpu = cpu_between(before, cpu_time::reaped_children());
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if args.show_serial {
        print!("{out}");
    }
    match status {
        None => bail!("QEMU did not finish within {:?}", args.timeout),
        // isa-debug-exit: (0 << 1) | 1.
        Some(s) if s.code() == Some(1) => {}
        Some(s) => bail!(
            "QEMU ended with {s}: {}",
            err.lines().next().unwrap_or("no message")
        ),
    }
    Ok(Run {
        lines: parse_lines(&out),
        exits: None,
        kvm_exits: None,
        cpu,
    })
}

/// Whether QEMU is installed.
pub fn qemu_installed() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// Runs the benchmark; returns the process exit status.
pub fn run(args: &BenchArgs) -> Result<i32> {
    let with_qemu = if args.no_qemu {
        false
    } else if args.with_qemu {
        if !qemu_installed() {
            bail!("--with-qemu: {QEMU} is not installed");
        }
        true
    } else {
        qemu_installed()
    };
    // Fail on unwritable outputs before spending the runs.
    for path in [&args.json, &args.svg] {
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    let mut configs: Vec<Config> = IrqchipMode::ALL.iter().map(|&m| Config::Virq(m)).collect();
    let mut qemu_image = None;
    if with_qemu {
        configs.extend(["on", "split", "off"].map(Config::Qemu));
        let dir = args
            .json
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("bench-guest.elf32");
        std::fs::write(&path, BENCH_IMAGE)
            .with_context(|| format!("cannot write {}", path.display()))?;
        qemu_image = Some(path);
    }

    // (config index, figure) -> per-round results / skip reasons.
    let mut rounds: BTreeMap<(usize, String), Vec<RoundFigure>> = BTreeMap::new();
    let mut rates: BTreeMap<(usize, String), Vec<f64>> = BTreeMap::new();
    let mut samples: BTreeMap<(usize, String), u64> = BTreeMap::new();
    let mut skips: BTreeMap<(usize, String), String> = BTreeMap::new();
    // Runs of one figure each, and runs measuring nothing, for counting.
    let mut counted: BTreeMap<(usize, String), Vec<Run>> = BTreeMap::new();
    let mut baseline: BTreeMap<usize, Vec<Run>> = BTreeMap::new();
    // What each counting run measured (rates count interrupts, not samples).
    let mut exit_counts: BTreeMap<(usize, String), Vec<f64>> = BTreeMap::new();
    let mut failures: BTreeMap<usize, String> = BTreeMap::new();

    for round in 0..args.rounds {
        for (ci, &config) in configs.iter().enumerate() {
            eprint!(
                "\rround {}/{}: {:<16}",
                round + 1,
                args.rounds,
                config.name()
            );
            let one_run = |cmdline: &str| match config {
                Config::Virq(mode) => virq_run(mode, cmdline, args),
                Config::Qemu(k) => match &qemu_image {
                    Some(image) => qemu_run(k, config.cpus(), image, cmdline, args),
                    None => Err(anyhow::anyhow!("no QEMU image")),
                },
            };
            let result = one_run("");
            let run = match result {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(config = config.name(), "run failed: {e:#}");
                    failures.insert(ci, format!("{e:#}"));
                    continue;
                }
            };
            for line in run.lines {
                match line {
                    Line::Figure {
                        name,
                        n,
                        p50_ns,
                        p99_ns,
                    } => {
                        samples.insert((ci, name.clone()), n);
                        rounds.entry((ci, name)).or_default().push(RoundFigure {
                            p50_us: p50_ns / 1000.0,
                            p99_us: p99_ns / 1000.0,
                        });
                    }
                    Line::Rate { name, n, per_s } => {
                        samples.insert((ci, name.clone()), n);
                        rates.entry((ci, name)).or_default().push(per_s);
                    }
                    Line::Skip { name, reason } => {
                        let reason = match config.note() {
                            Some(note) if name == "ipi" => note.to_string(),
                            _ => reason,
                        };
                        skips.insert((ci, name), reason);
                    }
                }
            }
            // Exits and CPU time per sample: one run per figure against a
            // run that measures nothing (same boot, same output but the
            // lines).
            match one_run(&format!("only=none samples={EXIT_SAMPLES}")) {
                Ok(r) => baseline.entry(ci).or_default().push(r),
                Err(e) => tracing::warn!("baseline run failed: {e:#}"),
            }
            for figure in FIGURES {
                match one_run(&format!("only={figure} samples={EXIT_SAMPLES}")) {
                    Ok(r) => {
                        let key = (ci, figure.to_string());
                        let n = r.lines.iter().find(|l| l.name() == *figure);
                        if let Some(n) = n.and_then(Line::count) {
                            exit_counts.entry(key.clone()).or_default().push(n as f64);
                        }
                        counted.entry(key).or_default().push(r);
                    }
                    Err(e) => tracing::warn!("exit-count run failed: {e:#}"),
                }
            }
        }
    }
    eprintln!("\r{:<40}", "");

    let mut cells = Vec::new();
    for figure in FIGURES {
        for (ci, &config) in configs.iter().enumerate() {
            let key = (ci, figure.to_string());
            let rs = rounds.get(&key).cloned().unwrap_or_default();
            let p50 = median(&mut rs.iter().map(|r| r.p50_us).collect::<Vec<_>>());
            let p99 = median(&mut rs.iter().map(|r| r.p99_us).collect::<Vec<_>>());
            let rate = median(&mut rates.get(&key).cloned().unwrap_or_default());
            let n = samples.get(&key).copied().unwrap_or(0);
            let exit_n = median(&mut exit_counts.get(&key).cloned().unwrap_or_default())
                .map_or(EXIT_SAMPLES, |n| n.round().max(1.0) as u64);
            let runs: Vec<&Run> = counted
                .get(&key)
                .map(|rs| rs.iter().filter(|r| r.measured(figure)).collect())
                .unwrap_or_default();
            let base: Vec<&Run> = baseline
                .get(&ci)
                .map(|b| b.iter().collect())
                .unwrap_or_default();
            let exits_per_sample = both(
                runs.iter().filter_map(|r| r.exits).collect(),
                base.iter().filter_map(|r| r.exits).collect(),
            )
            .map(|(e, b)| exits_per(&e, &b, exit_n));
            let kvm_exits_per_sample = both(
                runs.iter().filter_map(|r| r.kvm_exits).collect(),
                base.iter().filter_map(|r| r.kvm_exits).collect(),
            )
            .map(|(e, b)| kvm_exits_per(&e, &b, exit_n));
            let cpu_us = |rs: &[&Run]| -> Vec<f64> {
                rs.iter()
                    .filter_map(|r| r.cpu)
                    .map(|c| c.total().as_secs_f64() * 1e6)
                    .collect()
            };
            // Cheaper than the baseline's noise reads 0: CPU time is never
            // negative.
            let cpu_us_per_sample = both(cpu_us(&runs), cpu_us(&base))
                .map(|(f, b)| per_sample(&f, &b, exit_n).max(0.0));
            let skipped = if p50.is_some() || rate.is_some() {
                None
            } else {
                Some(
                    skips
                        .get(&key)
                        .or_else(|| failures.get(&ci))
                        .cloned()
                        .unwrap_or_else(|| "no result".to_string()),
                )
            };
            cells.push(Cell {
                figure: figure.to_string(),
                config: config.name(),
                samples: n,
                p50_us: p50,
                p99_us: p99,
                p50_vs_virq_kernel: None,
                rate_per_s: rate,
                rate_vs_virq_kernel: None,
                rounds: rs,
                exits_per_sample,
                kvm_exits_per_sample,
                cpu_us_per_sample,
                cpu_vs_virq_kernel: None,
                skipped,
            });
        }
    }
    let kernel_name = Config::Virq(IrqchipMode::Kernel).name();
    let kernel: BTreeMap<String, f64> = cells
        .iter()
        .filter(|c| c.config == kernel_name)
        .filter_map(|c| c.p50_us.map(|p| (c.figure.clone(), p)))
        .collect();
    let kernel_cpu: BTreeMap<String, f64> = cells
        .iter()
        .filter(|c| c.config == kernel_name)
        .filter_map(|c| c.cpu_us_per_sample.map(|p| (c.figure.clone(), p)))
        .collect();
    let kernel_rates: BTreeMap<String, f64> = cells
        .iter()
        .filter(|c| c.config == kernel_name)
        .filter_map(|c| c.rate_per_s.map(|r| (c.figure.clone(), r)))
        .collect();
    for c in &mut cells {
        if let (Some(p), Some(k)) = (c.p50_us, kernel.get(&c.figure)) {
            if *k > 0.0 {
                c.p50_vs_virq_kernel = Some(p / k);
            }
        }
        if let (Some(p), Some(k)) = (c.cpu_us_per_sample, kernel_cpu.get(&c.figure)) {
            if *k > 0.0 {
                c.cpu_vs_virq_kernel = Some(p / k);
            }
        }
        if let (Some(r), Some(k)) = (c.rate_per_s, kernel_rates.get(&c.figure)) {
            if *k > 0.0 {
                c.rate_vs_virq_kernel = Some(r / k);
            }
        }
    }
    let report = Report {
        rounds: args.rounds,
        configs: configs
            .iter()
            .enumerate()
            .map(|(ci, &c)| ConfigReport {
                name: c.name(),
                cpus: c.cpus(),
                note: c.note().map(str::to_string),
                failure: if rounds.keys().any(|(i, _)| *i == ci) {
                    None
                } else {
                    failures.get(&ci).cloned()
                },
            })
            .collect(),
        figures: FIGURES.iter().map(|f| f.to_string()).collect(),
        cells,
    };
    print!("{}", render_table(&report));
    write_file(&args.json, &(serde_json::to_string_pretty(&report)? + "\n"))?;
    write_file(&args.svg, &render_svg(&report))?;
    println!(
        "JSON: {}  chart: {}",
        args.json.display(),
        args.svg.display()
    );
    // Every configuration must have produced figures.
    Ok(if report.configs.iter().any(|c| c.failure.is_some()) {
        1
    } else {
        0
    })
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Both lists, if neither is empty.
fn both<T>(runs: Vec<T>, base: Vec<T>) -> Option<(Vec<T>, Vec<T>)> {
    (!runs.is_empty() && !base.is_empty()).then_some((runs, base))
}

/// Median of the figure's runs minus the median of the baseline runs, per
/// sample.
fn per_sample(runs: &[f64], base: &[f64], n: u64) -> f64 {
    let f = median(&mut runs.to_vec()).unwrap_or(0.0);
    let b = median(&mut base.to_vec()).unwrap_or(0.0);
    (f - b) / n as f64
}

/// KVM's counters per sample: `exits` is the total, the rest by reason.
fn kvm_exits_per(runs: &[KvmExits], base: &[KvmExits], n: u64) -> ExitsPerSample {
    let per = |i: usize| {
        let pick = |e: &KvmExits| e.named()[i].1 as f64;
        per_sample(
            &runs.iter().map(pick).collect::<Vec<_>>(),
            &base.iter().map(pick).collect::<Vec<_>>(),
            n,
        )
    };
    let mut by_reason = BTreeMap::new();
    for (i, (name, _)) in KvmExits::default().named().iter().enumerate().skip(1) {
        let v = per(i);
        if v.abs() >= 0.005 {
            by_reason.insert(name.to_string(), v);
        }
    }
    ExitsPerSample {
        // Boot exits vary with timing; a figure cannot remove exits.
        total: per(0).max(0.0),
        by_reason,
    }
}

/// Median exits of the figure's runs minus the median of the baseline runs,
/// per sample.
fn exits_per(runs: &[ExitCounts], base: &[ExitCounts], n: u64) -> ExitsPerSample {
    let per = |pick: &dyn Fn(&ExitCounts) -> u64| {
        per_sample(
            &runs.iter().map(|e| pick(e) as f64).collect::<Vec<_>>(),
            &base.iter().map(|e| pick(e) as f64).collect::<Vec<_>>(),
            n,
        )
    };
    let mut by_reason = BTreeMap::new();
    for (i, (name, _)) in ExitCounts::default().named().iter().enumerate() {
        let v = per(&|e: &ExitCounts| e.named()[i].1);
        if v.abs() >= 0.005 {
            by_reason.insert(name.to_string(), v);
        }
    }
    ExitsPerSample {
        total: per(&|e: &ExitCounts| e.total()),
        by_reason,
    }
}

/// The text table: per figure and configuration, p50 / p99 in us and the
/// p50's ratio to virq-kernel's; then host CPU time per sample; then exits
/// per sample, to the VMM and as KVM counts them.
pub fn render_table(r: &Report) -> String {
    let mut s = String::new();
    let width = 22;
    let rate_figures: Vec<&String> = r.figures.iter().filter(|f| is_rate(r, f)).collect();
    let latency_figures: Vec<&String> = r.figures.iter().filter(|f| !is_rate(r, f)).collect();
    s += &format!(
        "latency, us: p50 / p99 (p50 vs virq-kernel); median of {} round(s), each of {} samples\n",
        r.rounds,
        r.cells
            .iter()
            .filter(|c| c.rate_per_s.is_none())
            .map(|c| c.samples)
            .max()
            .unwrap_or(0)
    );
    s += &format!("{:<16}", "figure");
    for c in &r.configs {
        s += &format!(" {:>width$}", c.name);
    }
    s += "\n";
    for f in latency_figures {
        s += &format!("{f:<16}");
        for c in &r.configs {
            let cell = r
                .cells
                .iter()
                .find(|x| x.figure == **f && x.config == c.name);
            let text = match cell {
                Some(Cell {
                    p50_us: Some(p50),
                    p99_us: Some(p99),
                    p50_vs_virq_kernel,
                    ..
                }) => match p50_vs_virq_kernel {
                    Some(ratio) => format!("{p50:.1} / {p99:.1} ({ratio:.2}x)"),
                    None => format!("{p50:.1} / {p99:.1}"),
                },
                _ => "-".to_string(),
            };
            s += &format!(" {text:>width$}");
        }
        s += "\n";
    }
    if !rate_figures.is_empty() {
        s += "\ninterrupts per second, sustained (vs virq-kernel); median of the rounds\n";
        s += &format!("{:<16}", "figure");
        for c in &r.configs {
            s += &format!(" {:>width$}", c.name);
        }
        s += "\n";
        for f in rate_figures {
            s += &format!("{f:<16}");
            for c in &r.configs {
                let cell = r
                    .cells
                    .iter()
                    .find(|x| x.figure == *f && x.config == c.name);
                let text = match cell {
                    Some(Cell {
                        rate_per_s: Some(rate),
                        rate_vs_virq_kernel,
                        ..
                    }) => match rate_vs_virq_kernel {
                        Some(ratio) => format!("{rate:.0} ({ratio:.2}x)"),
                        None => format!("{rate:.0}"),
                    },
                    _ => "-".to_string(),
                };
                s += &format!(" {text:>width$}");
            }
            s += "\n";
        }
    }
    s += &format!(
        "\nhost CPU time (user + system, whole VM) per sample or interrupt, us (vs virq-kernel); \
         runs of {EXIT_SAMPLES} samples minus a run measuring nothing\n"
    );
    s += &format!("{:<16}", "figure");
    for c in &r.configs {
        s += &format!(" {:>width$}", c.name);
    }
    s += "\n";
    for f in &r.figures {
        s += &format!("{f:<16}");
        for c in &r.configs {
            let cell = r
                .cells
                .iter()
                .find(|x| &x.figure == f && x.config == c.name);
            let text = match cell {
                Some(Cell {
                    cpu_us_per_sample: Some(cpu),
                    cpu_vs_virq_kernel,
                    ..
                }) => match cpu_vs_virq_kernel {
                    Some(ratio) => format!("{cpu:.1} ({ratio:.2}x)"),
                    None => format!("{cpu:.1}"),
                },
                _ => "-".to_string(),
            };
            s += &format!(" {text:>width$}");
        }
        s += "\n";
    }
    let virq: Vec<_> = r
        .configs
        .iter()
        .filter(|c| c.name.starts_with("virq-"))
        .collect();
    let width = 30;
    s += "\nVM exits per sample or interrupt (virq): to the VMM / all, KVM's count (VMM exits by reason)\n";
    s += &format!("{:<16}", "figure");
    for c in &virq {
        s += &format!(" {:>width$}", c.name);
    }
    s += "\n";
    for f in &r.figures {
        s += &format!("{f:<16}");
        for c in &virq {
            let cell = r
                .cells
                .iter()
                .find(|x| &x.figure == f && x.config == c.name);
            let kvm = cell
                .and_then(|c| c.kvm_exits_per_sample.as_ref())
                .map_or_else(|| "-".to_string(), |k| format!("{:.1}", k.total));
            let text = match cell.and_then(|c| c.exits_per_sample.as_ref()) {
                Some(e) => {
                    let top: Vec<String> = e
                        .by_reason
                        .iter()
                        .filter(|(_, v)| v.abs() >= 0.05)
                        .map(|(k, v)| format!("{k} {v:.1}"))
                        .collect();
                    if top.is_empty() {
                        format!("{:.1} / {kvm}", e.total)
                    } else {
                        format!("{:.1} / {kvm} ({})", e.total, top.join(", "))
                    }
                }
                None => "-".to_string(),
            };
            s += &format!(" {text:>width$}");
        }
        s += "\n";
    }
    let mut notes = Vec::new();
    let virq_ran = r
        .cells
        .iter()
        .any(|c| c.config.starts_with("virq-") && c.exits_per_sample.is_some());
    if virq_ran && !r.cells.iter().any(|c| c.kvm_exits_per_sample.is_some()) {
        notes.push(
            "KVM's exit statistics (KVM_GET_STATS_FD) are not available on this host".to_string(),
        );
    }
    for c in &r.configs {
        if let Some(n) = &c.note {
            notes.push(format!("{}: {n}", c.name));
        }
        if let Some(f) = &c.failure {
            notes.push(format!("{}: did not run: {f}", c.name));
        }
    }
    for cell in &r.cells {
        if let Some(why) = &cell.skipped {
            if r.configs.iter().any(|c| {
                c.name == cell.config && c.failure.is_none() && c.note.as_ref() != Some(why)
            }) {
                notes.push(format!("{} in {}: {why}", cell.figure, cell.config));
            }
        }
    }
    notes.dedup();
    if !notes.is_empty() {
        s += "\n";
        for n in notes {
            s += &format!("note: {n}\n");
        }
    }
    s
}

/// Whether `figure` is a rate (measured as one in some configuration).
fn is_rate(r: &Report, figure: &str) -> bool {
    r.cells
        .iter()
        .any(|c| c.figure == figure && c.rate_per_s.is_some())
}

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A grouped bar chart: one group per figure, one bar per configuration
/// (its p50), a thin line up to its p99.
pub fn render_svg(r: &Report) -> String {
    const COLOURS: &[&str] = &[
        "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    ];
    let (w, h) = (900.0_f64, 420.0_f64);
    let (left, right, top, bottom) = (60.0, 20.0, 50.0, 80.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    // Scaled to the p50s: one slow p99 must not flatten every bar; p99
    // lines above the top are cut there and labelled with their value.
    let max = r
        .cells
        .iter()
        .filter_map(|c| c.p50_us)
        .fold(1.0_f64, f64::max)
        * 1.6;
    // A round axis top: 1, 2 or 5 times a power of ten.
    let mag = 10f64.powf(max.log10().floor());
    let scale = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * mag);
    let y = |v: f64| top + plot_h * (1.0 - v / scale);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    );
    s += &format!("<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n");
    s += &format!(
        "<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">interrupt delivery latency, us (bar: p50, line: p99; {} round(s))</text>\n",
        w / 2.0,
        r.rounds
    );
    for i in 0..=5 {
        let v = scale * f64::from(i) / 5.0;
        let yy = y(v);
        s += &format!(
            "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\n",
            w - right
        );
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v}</text>\n",
            left - 6.0,
            yy + 4.0
        );
    }
    // Rates are not latencies: the chart leaves them out (the table has them).
    let figures: Vec<&String> = r.figures.iter().filter(|f| !is_rate(r, f)).collect();
    let groups = figures.len().max(1) as f64;
    let group_w = plot_w / groups;
    let bars = r.configs.len().max(1) as f64;
    let bar_w = group_w * 0.8 / bars;
    for (fi, f) in figures.iter().enumerate() {
        let gx = left + group_w * fi as f64 + group_w * 0.1;
        for (ci, c) in r.configs.iter().enumerate() {
            let colour = COLOURS[ci % COLOURS.len()];
            let Some(cell) = r
                .cells
                .iter()
                .find(|x| x.figure == **f && x.config == c.name)
            else {
                continue;
            };
            let x = gx + bar_w * ci as f64;
            if let Some(p50) = cell.p50_us {
                s += &format!(
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"><title>{} {}: p50 {p50:.1} us</title></rect>\n",
                    y(p50),
                    bar_w * 0.9,
                    (y(0.0) - y(p50)).max(0.0),
                    esc(f),
                    esc(&c.name)
                );
                if let Some(p99) = cell.p99_us {
                    let cx = x + bar_w * 0.45;
                    s += &format!(
                        "<line x1=\"{cx:.1}\" y1=\"{:.1}\" x2=\"{cx:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
                        y(p50),
                        y(p99.min(scale))
                    );
                    if p99 > scale {
                        s += &format!(
                            "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{p99:.0}</text>\n",
                            top - 4.0 - 10.0 * (ci % 2) as f64
                        );
                    }
                }
            }
        }
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            gx + group_w * 0.4,
            y(0.0) + 16.0,
            esc(f)
        );
    }
    s += &format!(
        "<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
        y(0.0),
        w - right,
        y(0.0)
    );
    for (ci, c) in r.configs.iter().enumerate() {
        let colour = COLOURS[ci % COLOURS.len()];
        let lx = left + 140.0 * (ci % 5) as f64;
        let ly = h - 40.0 + 18.0 * (ci / 5) as f64;
        s += &format!(
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{ly:.1}\">{}</text>\n",
            ly - 10.0,
            lx + 16.0,
            esc(&c.name)
        );
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_command_line_gets_the_asked_for_options() {
        use clap::Parser;
        let args = |extra: &[&str]| {
            let argv = ["virq", "bench"].iter().chain(extra).copied();
            match virq_vmm::cli::Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Some(virq_vmm::cli::Command::Bench(b))) => b,
                other => panic!("not a bench command line: {other:?}"),
            }
        };
        assert_eq!(guest_cmdline("only=ipi", &args(&[])), "only=ipi");
        assert_eq!(guest_cmdline("", &args(&["--pv-eoi"])), "pv-eoi");
        assert_eq!(
            guest_cmdline("only=ipi", &args(&["--x2apic", "--pv-eoi"])),
            "only=ipi pv-eoi x2apic"
        );
    }

    #[test]
    fn parses_figures_and_skips() {
        let text = "# x\nBENCH name=ipi n=200 p50=2000 p99=4000 min=1 tsc_per_ms=1000000\n\
                    BENCH name=msi-testdev skip=no-msi-test-device\nBENCH name=bad n=x\n";
        let lines = parse_lines(text);
        assert_eq!(
            lines,
            vec![
                Line::Figure {
                    name: "ipi".into(),
                    n: 200,
                    p50_ns: 2000.0,
                    p99_ns: 4000.0
                },
                Line::Skip {
                    name: "msi-testdev".into(),
                    reason: "no msi test device".into()
                }
            ]
        );
    }

    #[test]
    fn kvm_exits_per_sample_is_figure_minus_baseline() {
        let run = |exits, halt_exits| KvmExits {
            exits,
            halt_exits,
            ..Default::default()
        };
        let e = kvm_exits_per(&[run(500, 100), run(520, 100)], &[run(300, 0)], 100);
        assert_eq!(e.total, 2.1);
        assert_eq!(e.by_reason.get("halt_exits"), Some(&1.0));
        assert!(!e.by_reason.contains_key("exits"));
        // Boot noise larger than the figure reads 0, not a negative count.
        assert_eq!(kvm_exits_per(&[run(10, 0)], &[run(20, 0)], 10).total, 0.0);
    }

    #[test]
    fn table_shows_cpu_and_both_exit_counts() {
        let cell = Cell {
            figure: "ipi".into(),
            config: "virq-kernel".into(),
            samples: 10,
            p50_us: Some(30.0),
            p99_us: Some(40.0),
            exits_per_sample: Some(ExitsPerSample {
                total: 0.0,
                by_reason: BTreeMap::new(),
            }),
            kvm_exits_per_sample: Some(ExitsPerSample {
                total: 3.5,
                by_reason: BTreeMap::new(),
            }),
            cpu_us_per_sample: Some(123.4),
            cpu_vs_virq_kernel: Some(1.0),
            ..Default::default()
        };
        let report = Report {
            rounds: 1,
            configs: vec![ConfigReport {
                name: "virq-kernel".into(),
                cpus: 2,
                note: None,
                failure: None,
            }],
            figures: vec!["ipi".into()],
            cells: vec![cell],
        };
        let t = render_table(&report);
        assert!(t.contains("123.4 (1.00x)"), "{t}");
        assert!(t.contains("0.0 / 3.5"), "{t}");
        assert!(!t.contains("not available"), "{t}");
    }

    #[test]
    fn parses_rates_beside_figures() {
        let text = "BENCH name=irq-rate n=250 rate=10000 tsc_per_ms=1000000\n\
                    BENCH name=device-rate n=0 rate=0 tsc_per_ms=1000000\n";
        assert_eq!(
            parse_lines(text),
            vec![Line::Rate {
                name: "irq-rate".into(),
                n: 250,
                per_s: 10000.0
            }]
        );
    }

    #[test]
    fn rates_get_their_own_table_and_stay_out_of_the_chart() {
        let cell = |figure: &str, config: &str, p50: Option<f64>, rate: Option<f64>| Cell {
            figure: figure.into(),
            config: config.into(),
            samples: 10,
            p50_us: p50,
            p99_us: p50,
            rate_per_s: rate,
            ..Cell::default()
        };
        let report = Report {
            rounds: 1,
            configs: vec![ConfigReport {
                name: "virq-kernel".into(),
                cpus: 2,
                note: None,
                failure: None,
            }],
            figures: vec!["self-ipi".into(), "irq-rate".into()],
            cells: vec![
                cell("self-ipi", "virq-kernel", Some(30.0), None),
                cell("irq-rate", "virq-kernel", None, Some(12345.0)),
            ],
        };
        let table = render_table(&report);
        let (latency, rates) = table
            .split_once("interrupts per second")
            .expect("a rate table");
        assert!(latency.contains("self-ipi") && !latency.contains("irq-rate"));
        assert!(rates.contains("irq-rate") && rates.contains("12345"));
        let svg = render_svg(&report);
        assert!(svg.contains("self-ipi") && !svg.contains("irq-rate"));
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }
}
