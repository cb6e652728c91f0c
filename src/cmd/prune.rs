//! `wedge-autopsy prune`: flags over `[retention]`, then the same policy as after a run.

use wedge_autopsy::config::Settings;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::retention::prune;
use wedge_autopsy::units::{human_bytes, parse_duration, parse_size};

use crate::cmd::cli::PruneArgs;

pub fn run(args: &PruneArgs, settings: &Settings) -> Result<Exit, Error> {
    let mut limits = settings.retention;
    let bad = |flag: &str, e: String| Error::BadInput(format!("{flag}: {e}"));
    if let Some(k) = args.keep {
        limits.keep = (k > 0).then_some(k);
    }
    if let Some(a) = &args.max_age {
        limits.max_age = Some(parse_duration(a).map_err(|e| bad("--max-age", e))?).filter(|d| !d.is_zero());
    }
    if let Some(b) = &args.max_bytes {
        limits.max_bytes = Some(parse_size(b).map_err(|e| bad("--max-bytes", e))?).filter(|b| *b > 0);
    }
    if let Some(f) = &args.min_free {
        limits.min_free = parse_size(f).map_err(|e| bad("--min-free", e))?;
    }
    let p = prune(&settings.out, &limits, None, args.dry_run)?;
    let verb = if args.dry_run { "would remove" } else { "removed" };
    for (e, reason) in &p.plan.remove {
        println!("{verb} {} ({}, {reason})", e.name(), human_bytes(e.bytes));
    }
    for (path, err) in &p.failed {
        eprintln!("wedge-autopsy: cannot remove {}: {err}", path.display());
    }
    let kept: u64 = p.plan.keep.iter().map(|e| e.bytes).sum();
    println!(
        "{}: kept {} archive(s), {}; {verb} {}, {}",
        settings.out.display(),
        p.plan.keep.len(),
        human_bytes(kept),
        p.plan.remove.len(),
        human_bytes(p.plan.freed())
    );
    Ok(if p.failed.is_empty() { Exit::Ok } else { Exit::Partial })
}
