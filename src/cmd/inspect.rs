//! `wedge-autopsy inspect`: read a sealed archive (summary, files, hash check, one file).

use std::io::Write;
use std::path::Path;

use wedge_autopsy::archive::{self, ArchiveReader, Evidence};
use wedge_autopsy::diagnose;
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::render;

pub fn run(path: &Path, verify: bool, json: bool, cat: Option<&str>) -> Result<Exit, Error> {
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
    if let Some(p) = cat {
        let bytes = reader
            .read(p)
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
