//! Bench and test driver for the native stack snapshot until the CLI has
//! `wedge-autopsy stacks <PID> [--json]`: same arguments, same output.
//!
//! `native_stacks <PID> [--json] [--lines] [--stack-kib N] [--loop N]` (`--loop` repeats the snapshot N times
//! and prints only the last; used by the kill-mid-snapshot test).

use wedge_autopsy::cancel::Cancel;
use wedge_autopsy::stacks::native::{render_text, snapshot_and_unwind, NativeOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pid: i32 = match args.first().and_then(|a| a.parse().ok()) {
        Some(p) => p,
        None => {
            eprintln!("usage: native_stacks <PID> [--json] [--lines] [--loop N]");
            std::process::exit(64);
        }
    };
    let json = args.iter().any(|a| a == "--json");
    let reps: usize = args.iter().position(|a| a == "--loop").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(1);
    let mut opts = NativeOptions { lines: args.iter().any(|a| a == "--lines"), ..NativeOptions::default() };
    if let Some(kib) = args.iter().position(|a| a == "--stack-kib").and_then(|i| args.get(i + 1)?.parse::<usize>().ok())
    {
        opts.freeze.stack_bytes = kib << 10;
    }
    let cancel = Cancel::new();
    let mut last = None;
    for _ in 0..reps {
        match snapshot_and_unwind(pid, &opts, &cancel) {
            Ok(r) => last = Some(r),
            Err(e) => {
                eprintln!("wedge-autopsy stacks: {e}");
                std::process::exit(2);
            }
        }
    }
    let report = last.expect("at least one snapshot");
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap());
    } else {
        print!("{}", render_text(&report));
    }
}
