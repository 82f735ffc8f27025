//! `virq`: run a multiboot guest on KVM, or the built-in demo in every
//! irqchip mode. See `virq --help`.

mod bench;

use std::process::ExitCode;
use virq::pit::LostTickPolicy;
use virq_kvm::IrqchipMode;
use virq_vmm::cli::{self, Command, DemoArgs, RunArgs};
use virq_vmm::stats::{render_table, DemoRow};
use virq_vmm::vm::{self, exit_code, SerialOut, VmConfig};

/// The built-in demo guest (guests/demo, built by build.rs as the same ELF32
/// image QEMU runs).
const DEMO_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo-guest.elf"));

/// vCPUs of the demo machine.
const DEMO_CPUS: u32 = 2;
/// RAM of the demo machine, in MiB.
const DEMO_MEMORY_MIB: u64 = 128;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match cli::parse(std::env::args_os()) {
        Ok(c) => match c.command {
            Some(Command::Run(args)) => run(args),
            Some(Command::Demo(args)) => demo(args),
            Some(Command::Bench(args)) => match bench::run(&args) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("virq: bench: {e:#}");
                    1
                }
            },
            None => demo(DemoArgs {
                timeout: Some(std::time::Duration::from_secs(60)),
                ..Default::default()
            }),
        },
        Err((code, text)) => {
            if code == 0 {
                print!("{text}");
            } else {
                eprintln!("{text}");
            }
            code
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}

fn write_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n")
        .map_err(|e| format!("cannot write statistics to {}: {e}", path.display()))
}

fn run(args: RunArgs) -> i32 {
    let image = match std::fs::read(&args.image) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("virq: cannot read image {}: {e}", args.image.display());
            return exit_code::BAD_INPUT;
        }
    };
    let cfg = VmConfig {
        mode: args.irqchip.into(),
        cpus: args.cpus,
        ram_mib: args.memory,
        timeout: args.timeout,
        cmdline: args.cmdline.join(" "),
        serial: SerialOut::from_arg(&args.serial),
        pit_lost_ticks: args.pit_lost_ticks.into(),
        lapic_lost_ticks: args.lapic_lost_ticks.into(),
        halt_poll: std::time::Duration::from_micros(args.halt_poll_us),
    };
    match vm::run_image(&cfg, &image) {
        Ok(r) => {
            if let Some(path) = &args.stats_json {
                if let Err(e) = write_json(path, &r.stats) {
                    eprintln!("virq: {e}");
                }
            }
            if let Some(line) = r.failure {
                eprintln!("{line}");
            }
            r.exit_code
        }
        Err(e) => {
            eprintln!("virq: {e}");
            e.exit_code()
        }
    }
}

fn demo(args: DemoArgs) -> i32 {
    let image = DEMO_IMAGE;
    let mut rows = Vec::new();
    let mut all_passed = true;
    for mode in IrqchipMode::ALL {
        let cfg = VmConfig {
            mode,
            cpus: DEMO_CPUS,
            ram_mib: DEMO_MEMORY_MIB,
            timeout: args.timeout,
            cmdline: String::new(),
            serial: if args.show_serial {
                SerialOut::Stdout
            } else {
                SerialOut::Discard
            },
            pit_lost_ticks: LostTickPolicy::Reinject,
            lapic_lost_ticks: LostTickPolicy::Discard,
            halt_poll: virq_kvm::irqchip::DEFAULT_HALT_POLL,
        };
        match vm::run_image(&cfg, image) {
            Ok(r) => {
                all_passed &= r.stats.passed();
                rows.push(DemoRow::Ran(Box::new(r.stats)));
            }
            Err(e) => {
                all_passed = false;
                rows.push(DemoRow::NotRun {
                    mode: mode.name().into(),
                    reason: e.to_string(),
                });
            }
        }
    }
    print!("{}", render_table(&rows));
    if let Some(path) = &args.stats_json {
        let ran: Vec<_> = rows
            .iter()
            .filter_map(|r| match r {
                DemoRow::Ran(s) => Some(s.as_ref()),
                DemoRow::NotRun { .. } => None,
            })
            .collect();
        if let Err(e) = write_json(path, &ran) {
            eprintln!("virq: {e}");
        }
    }
    if all_passed {
        0
    } else {
        1
    }
}
