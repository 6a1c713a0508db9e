//! `acpimon-fuzz [INPUTS] [--target NAME]... [--workers N] [--seed S] [--crashes DIR]`
//! runs INPUTS generated inputs (default 1,000,000) through each target on every core and
//! reports inputs/s; a crash is printed with its input in hex and saved under DIR
//! (default target/fuzz-crashes), and the exit status is 1.
//! `acpimon-fuzz --reproduce FILE --target NAME` runs one saved input again.

use std::path::PathBuf;
use std::process::ExitCode;

use acpimon_fuzz::{hex, run, run_one, target, Target, TARGETS};

const USAGE: &str = "usage: acpimon-fuzz [INPUTS] [--target NAME]... [--workers N] [--seed S] [--crashes DIR]
       acpimon-fuzz --reproduce FILE --target NAME
targets: region, port-frames, app-line, qmp-message (default: all)";

struct Args {
    inputs: u64,
    targets: Vec<&'static Target>,
    workers: usize,
    seed: u64,
    crashes: PathBuf,
    reproduce: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        inputs: 1_000_000,
        targets: Vec::new(),
        workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        crashes: PathBuf::from("target/fuzz-crashes"),
        reproduce: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--target" => {
                let name = value("--target")?;
                a.targets.push(target(&name).ok_or(format!("no target {name:?}\n{USAGE}"))?);
            }
            "--workers" => a.workers = value("--workers")?.parse().map_err(|e| format!("--workers: {e}"))?,
            "--seed" => {
                let s = value("--seed")?;
                let parsed = match s.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => s.parse(),
                };
                a.seed = parsed.map_err(|e| format!("--seed {s}: {e}"))?;
            }
            "--crashes" => a.crashes = value("--crashes")?.into(),
            "--reproduce" => a.reproduce = Some(value("--reproduce")?.into()),
            "-h" | "--help" => return Err(USAGE.into()),
            n => {
                // 10M, 10_000_000 and 1e7 are all accepted.
                let clean = n.replace('_', "");
                a.inputs = match clean.strip_suffix(['M', 'm']) {
                    Some(m) => m.parse::<u64>().map(|m| m * 1_000_000),
                    None => clean
                        .parse::<u64>()
                        .or_else(|e| clean.parse::<f64>().map(|f| f as u64).map_err(|_| e)),
                }
                .map_err(|_| format!("{n:?} is not a number of inputs\n{USAGE}"))?;
            }
        }
    }
    if a.targets.is_empty() {
        a.targets = TARGETS.iter().collect();
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("acpimon-fuzz: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(file) = &args.reproduce {
        let [t] = args.targets[..] else {
            eprintln!("acpimon-fuzz: --reproduce needs exactly one --target\n{USAGE}");
            return ExitCode::from(2);
        };
        let input = match std::fs::read(file) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("acpimon-fuzz: cannot read {}: {e}", file.display());
                return ExitCode::from(2);
            }
        };
        return match run_one(t.check, &input) {
            Ok(()) => {
                println!("{}: {} bytes: no crash", t.name, input.len());
                ExitCode::SUCCESS
            }
            Err(message) => {
                println!("{}: crash: {message}", t.name);
                ExitCode::FAILURE
            }
        };
    }
    println!(
        "acpimon-fuzz: {} inputs per target, {} workers, seed {:#x}",
        args.inputs, args.workers, args.seed
    );
    let mut failed = false;
    for t in &args.targets {
        let o = run(t, args.inputs, args.workers, args.seed);
        println!(
            "{:<12} {:>12} inputs  {:>3} crashes  {:>8.1} s  {:>10.0} inputs/s",
            o.target,
            o.inputs,
            o.crashes.len(),
            o.elapsed.as_secs_f64(),
            o.per_second()
        );
        for c in &o.crashes {
            failed = true;
            let saved = match c.save(&args.crashes) {
                Ok(p) => p.display().to_string(),
                Err(e) => format!("(not saved: {e})"),
            };
            println!(
                "  crash: {}\n  input ({} bytes): {}\n  saved: {saved}",
                c.message,
                c.input.len(),
                hex(&c.input)
            );
            println!("  reproduce: acpimon-fuzz --reproduce {saved} --target {}", c.target);
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
