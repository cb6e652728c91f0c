//! `wedge-autopsy inspect`: read a sealed archive (summary, files, hash check, one file),
//! re-symbolize its raw stacks (`--resymbolize`), or read QEMU's state from its minicore
//! (`--qemu-state`).

use std::io::Write;
use std::path::{Path, PathBuf};

use wedge_autopsy::archive::{self, ArchiveReader, Evidence};
use wedge_autopsy::config::Settings;
use wedge_autopsy::diagnose;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::minicore::qemu_state;
use wedge_autopsy::render;
use wedge_autopsy::stacks::resymbolize;

/// What `inspect` shows (clap keeps the flags exclusive).
pub enum View {
    /// The summary, or one file (`--cat`).
    Summary { cat: Option<String> },
    /// `--resymbolize`: the raw stacks unwound and named again with today's debug info.
    Resymbolize,
    /// `--qemu-state`, with `--qemu-gdb-script` if given.
    QemuState { script: Option<PathBuf> },
}

impl View {
    /// The view the flags ask for.
    pub fn from_flags(cat: Option<String>, resymbolize: bool, qemu_state: bool, script: Option<PathBuf>) -> View {
        match (resymbolize, qemu_state) {
            (true, _) => View::Resymbolize,
            (false, true) => View::QemuState { script },
            (false, false) => View::Summary { cat },
        }
    }
}

pub fn run(path: &Path, verify: bool, json: bool, view: View, settings: &Settings) -> Result<Exit, Error> {
    let verified = if verify {
        let r = archive::verify(path)?;
        if !json {
            println!("verified: {} files, sha256 {}", r.files, r.sha256);
        }
        Some(r)
    } else {
        None
    };
    let reader = ArchiveReader::open(path)?;
    let cat = match view {
        View::Summary { cat } => cat,
        View::Resymbolize => {
            let opts = resymbolize::ResymbolizeOptions::from_env(settings.debug_dirs.clone());
            let r = resymbolize::resymbolize(&reader, &opts)?;
            return print_json_or(json, &r, || resymbolize::render(&r));
        }
        View::QemuState { script } => {
            let opts = qemu_state::Options::new(settings.debug_dirs.clone(), script);
            let r = qemu_state::run(path, &reader, &opts)?;
            return print_json_or(json, &r, || qemu_state::render(&r));
        }
    };
    if let Some(p) = cat {
        let bytes = reader
            .read(&p)
            .ok_or_else(|| Error::BadInput(format!("{p} is not in the archive; --json lists the files")))?;
        std::io::stdout().write_all(&bytes)?;
        return Ok(Exit::Ok);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reader.manifest)?);
        return Ok(Exit::Ok);
    }
    // Recomputed from the sealed evidence with the idle threshold the run used.
    let min_idle_secs = reader
        .read_json("summary.json")
        .and_then(|v| v["min_idle_secs"].as_f64())
        .unwrap_or(diagnose::DEFAULT_MIN_IDLE_SECS);
    let d = diagnose::diagnose(&reader, &reader.manifest.steps, &diagnose::Rules { min_idle_secs });
    print!("{}", render::inspect_text(&reader, &d, verified.as_ref()));
    Ok(Exit::Ok)
}

/// `value` as pretty JSON, or its text form.
fn print_json_or<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) -> Result<Exit, Error> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text());
    }
    Ok(Exit::Ok)
}
