//! The command line: `virq run ...`, `virq demo`, and `virq` alone (= demo).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;
use virq::pit::LostTickPolicy;
use virq_kvm::IrqchipMode;

/// Most vCPUs a machine may have (APIC IDs 0-254; 255 is broadcast).
pub const MAX_CPUS: u32 = 255;
/// Smallest RAM size in MiB: room for the low firmware area and a guest.
pub const MIN_MEMORY_MIB: u64 = 2;
/// Largest RAM size in MiB.
pub const MAX_MEMORY_MIB: u64 = 65536;

/// virq: run multiboot guests on KVM with the irqchip in the kernel, split,
/// or in userspace.
#[derive(Debug, Parser)]
#[command(name = "virq", version, about)]
pub struct Cli {
    /// What to do; none means `demo`.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a multiboot image.
    Run(RunArgs),
    /// Run the built-in demo guest on 2 vCPUs in every irqchip mode and
    /// print one table.
    Demo(DemoArgs),
    /// Measure interrupt delivery with the benchmark guest in every irqchip
    /// mode (and under QEMU when installed), interleaved, and print its
    /// latency, host CPU time and VM exits per sample.
    Bench(BenchArgs),
}

/// The irqchip mode, as the command line spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// KVM's in-kernel PIC, IOAPIC, PIT and LAPIC.
    Kernel,
    /// KVM's LAPIC, virq's PIC, IOAPIC and PIT.
    Split,
    /// Everything in virq.
    Userspace,
}

impl From<Mode> for IrqchipMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Kernel => IrqchipMode::Kernel,
            Mode::Split => IrqchipMode::Split,
            Mode::Userspace => IrqchipMode::Userspace,
        }
    }
}

/// What the PIT does with ticks the guest has not taken yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LostTicks {
    /// Owe every missed tick and deliver them one per acknowledgement (KVM's default).
    Reinject,
    /// Deliver what is due and drop the rest.
    Discard,
}

impl From<LostTicks> for LostTickPolicy {
    fn from(l: LostTicks) -> Self {
        match l {
            LostTicks::Reinject => LostTickPolicy::Reinject,
            LostTicks::Discard => LostTickPolicy::Discard,
        }
    }
}

/// `virq run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Irqchip mode.
    #[arg(long, value_enum, default_value_t = Mode::Kernel)]
    pub irqchip: Mode,
    /// What the PIT does with missed ticks (split and userspace modes; KVM's
    /// own PIT in kernel mode always reinjects).
    #[arg(long, alias = "lost-ticks", value_enum, default_value_t = LostTicks::Reinject)]
    pub pit_lost_ticks: LostTicks,
    /// What a LAPIC's periodic timer does with missed periods (userspace
    /// mode; KVM's LAPIC in the other modes always discards).
    #[arg(long, value_enum, default_value_t = LostTicks::Discard)]
    pub lapic_lost_ticks: LostTicks,
    /// Longest adaptive halt poll of a halted vCPU in microseconds before it
    /// sleeps (userspace mode; 0 turns it off; KVM polls by itself in the
    /// other modes).
    #[arg(long, default_value_t = 200, value_parser = parse_halt_poll)]
    pub halt_poll_us: u64,
    /// Number of vCPUs (1-255).
    #[arg(long, default_value_t = 1, value_parser = parse_cpus)]
    pub cpus: u32,
    /// Guest RAM in MiB (2-65536).
    #[arg(long, default_value_t = 128, value_parser = parse_memory)]
    pub memory: u64,
    /// Stop the guest after this many seconds (exit status 8).
    #[arg(long, value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// Where the guest's serial output goes: a file, or `stdout`.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// Write the run's statistics as JSON to this file.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// The multiboot image.
    pub image: PathBuf,
    /// Kernel command line for the guest.
    #[arg(last = true)]
    pub cmdline: Vec<String>,
}

/// `virq demo`.
#[derive(Debug, Args, Default)]
pub struct DemoArgs {
    /// Stop each mode's run after this many seconds.
    #[arg(long, value_parser = parse_timeout, default_value = "60")]
    pub timeout: Option<Duration>,
    /// Also show the guest's serial output on stdout.
    #[arg(long)]
    pub show_serial: bool,
    /// Write every mode's statistics as a JSON array to this file.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
}

/// `virq bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Rounds: each runs every configuration once, in turn (1-100).
    #[arg(long, default_value_t = 3, value_parser = parse_rounds)]
    pub rounds: u32,
    /// Also run QEMU (`-accel kvm`, kernel_irqchip=on/split/off); the
    /// default when qemu-system-x86_64 is installed.
    #[arg(long, conflicts_with = "no_qemu")]
    pub with_qemu: bool,
    /// Do not run QEMU.
    #[arg(long)]
    pub no_qemu: bool,
    /// Write every figure as JSON to this file.
    #[arg(long, default_value = "target/bench/bench.json")]
    pub json: PathBuf,
    /// Draw the figures as an SVG bar chart in this file.
    #[arg(long, default_value = "target/bench/bench.svg")]
    pub svg: PathBuf,
    /// Stop each run after this many seconds.
    #[arg(long, value_parser = parse_timeout, default_value = "60")]
    pub timeout: Duration,
    /// Also show the guest's serial output on stdout.
    #[arg(long)]
    pub show_serial: bool,
    /// Boot the benchmark guest with KVM's paravirtual EOI turned on (in
    /// every configuration: virq's userspace LAPIC and KVM's both offer it).
    #[arg(long)]
    pub pv_eoi: bool,
    /// Boot the benchmark guest in x2APIC mode where CPUID offers it (as
    /// Linux does under KVM): its LAPIC accesses become MSR accesses, and
    /// an IPI is one ICR write.
    #[arg(long)]
    pub x2apic: bool,
    /// Halt-poll bound for the virq userspace runs, in microseconds (0: off).
    #[arg(long, default_value_t = 200, value_parser = parse_halt_poll)]
    pub halt_poll_us: u64,
}

/// Most `--rounds`.
pub const MAX_ROUNDS: u32 = 100;

fn parse_rounds(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of rounds"))?;
    if (1..=MAX_ROUNDS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} rounds: must be 1 to {MAX_ROUNDS}"))
    }
}

fn parse_cpus(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of vCPUs"))?;
    if (1..=MAX_CPUS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} vCPUs: must be 1 to {MAX_CPUS}"))
    }
}

fn parse_memory(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a size in MiB"))?;
    if (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n} MiB: must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}"
        ))
    }
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if secs.is_finite() && secs > 0.0 && secs <= 1e9 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!("{s} s: must be a positive number of seconds"))
    }
}

/// Parses the process arguments. `Err` carries the exit status and the text
/// to print: help and version go to stdout with status 0; usage errors become
/// one `virq: ...` line with status 2.
pub fn parse<I, T>(args: I) -> Result<Cli, (i32, String)>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(args).map_err(|e| {
        use clap::error::ErrorKind;
        match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => (0, e.to_string()),
            _ => {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("invalid arguments");
                let first = first.strip_prefix("error: ").unwrap_or(first);
                (2, format!("virq: {first}"))
            }
        }
    })
}

/// Longest halt poll accepted, in microseconds.
pub const MAX_HALT_POLL_US: u64 = 10_000;

fn parse_halt_poll(s: &str) -> Result<u64, String> {
    let us: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of microseconds"))?;
    if us > MAX_HALT_POLL_US {
        return Err(format!("{us} us: must be 0 to {MAX_HALT_POLL_US}"));
    }
    Ok(us)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, (i32, String)> {
        let cli = parse(std::iter::once("virq").chain(args.iter().copied()))?;
        match cli.command {
            Some(Command::Run(r)) => Ok(r),
            other => panic!("not a run: {other:?}"),
        }
    }

    #[test]
    fn halt_poll_is_bounded_and_zero_turns_it_off() {
        assert_eq!(
            run_args(&["run", "x.elf"]).map(|r| r.halt_poll_us).ok(),
            Some(200)
        );
        let off = run_args(&["run", "--halt-poll-us", "0", "x.elf"]);
        assert_eq!(off.map(|r| r.halt_poll_us).ok(), Some(0));
        assert!(run_args(&["run", "--halt-poll-us", "10001", "x.elf"]).is_err());
        assert!(run_args(&["run", "--halt-poll-us", "-1", "x.elf"]).is_err());
    }

    #[test]
    fn run_defaults() {
        let r = run_args(&["run", "img"]).unwrap();
        assert_eq!(r.irqchip, Mode::Kernel);
        assert_eq!(r.cpus, 1);
        assert_eq!(r.memory, 128);
        assert_eq!(r.timeout, None);
        assert_eq!(r.serial, "stdout");
        assert!(r.cmdline.is_empty());
    }

    #[test]
    fn run_all_flags_and_cmdline() {
        let r = run_args(&[
            "run",
            "--irqchip",
            "split",
            "--cpus",
            "4",
            "--memory",
            "64",
            "--timeout",
            "1.5",
            "--serial",
            "out.txt",
            "img",
            "--",
            "a",
            "b=c",
        ])
        .unwrap();
        assert_eq!(r.irqchip, Mode::Split);
        assert_eq!(r.cpus, 4);
        assert_eq!(r.memory, 64);
        assert_eq!(r.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(r.serial, "out.txt");
        assert_eq!(r.cmdline, vec!["a", "b=c"]);
    }

    #[test]
    fn bad_values_are_one_line_status_2() {
        for args in [
            &["run", "--cpus", "0", "img"][..],
            &["run", "--cpus", "256", "img"],
            &["run", "--memory", "0", "img"],
            &["run", "--memory", "65537", "img"],
            &["run", "--irqchip", "bogus", "img"],
            &["run", "--timeout", "0", "img"],
            &["run"],
        ] {
            let (code, text) = run_args(args).unwrap_err();
            assert_eq!(code, 2, "{args:?}");
            assert!(text.starts_with("virq: "), "{text}");
            assert_eq!(text.lines().count(), 1, "{text}");
        }
    }

    #[test]
    fn bench_flags() {
        let cli = parse(["virq", "bench", "--rounds", "1", "--no-qemu", "--json", "f"]).unwrap();
        let Some(Command::Bench(b)) = cli.command else {
            panic!("not a bench");
        };
        assert_eq!(b.rounds, 1);
        assert!(b.no_qemu && !b.with_qemu);
        assert_eq!(b.json, PathBuf::from("f"));
        for args in [
            &["virq", "bench", "--rounds", "0"][..],
            &["virq", "bench", "--rounds", "x"],
            &["virq", "bench", "--with-qemu", "--no-qemu"],
            &["virq", "bench", "--bogus"],
        ] {
            let (code, text) = parse(args.iter().copied()).unwrap_err();
            assert_eq!(code, 2, "{args:?}");
            assert_eq!(text.lines().count(), 1, "{text}");
        }
    }

    #[test]
    fn no_arguments_means_demo() {
        assert!(parse(["virq"]).unwrap().command.is_none());
    }
}
