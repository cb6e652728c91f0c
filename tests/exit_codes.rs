//! The README's exit-code table against the code: every documented code is produced by an
//! `Exit` variant (or a diagnose verdict) of the described class, every variant is
//! documented, and module errors land in the row that describes them.

use wedge_autopsy::archive::ArchiveError;
use wedge_autopsy::diagnose::{Verdict, SUSPECTED_FROZEN_EXIT};
use wedge_autopsy::error::{Error, Exit};
use wedge_autopsy::minicore::qemu_state::QemuStateError;
use wedge_autopsy::retention::{FloorError, PruneError};
use wedge_autopsy::stacks::resymbolize::ResymbolizeError;

/// `(codes, autopsy column, diagnose column)` for each row of README "### Exit codes".
fn readme_rows() -> Vec<(Vec<u8>, String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme.split("### Exit codes").nth(1).expect("README has a '### Exit codes' section");
    let mut rows = Vec::new();
    for line in table.lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let codes: Vec<u8> = match cells[0].split_once('–') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect(),
            None => match cells[0].parse() {
                Ok(c) => vec![c],
                Err(_) => continue, // header and separator rows
            },
        };
        rows.push((codes, cells[1].to_lowercase(), cells.get(2).unwrap_or(&"").to_lowercase()));
    }
    assert!(rows.len() >= 8, "README exit-code table not found or cut short: {rows:?}");
    rows
}

/// Every variant, with words its README row must contain. The match makes a new variant
/// a compile error here until it is documented.
fn variants() -> Vec<(Exit, &'static str)> {
    let all = [
        (Exit::Ok, "every step ok"),
        (Exit::Partial, "some step failed"),
        (Exit::BadInput, "bad input"),
        (Exit::Refused, "refused"),
        (Exit::SealFailed, "could not seal"),
        (Exit::RestartFailed, "restart failed"),
        (Exit::Busy, "lock"),
        (Exit::Internal, "internal error"),
    ];
    for (e, _) in all {
        match e {
            Exit::Ok
            | Exit::Partial
            | Exit::BadInput
            | Exit::Refused
            | Exit::SealFailed
            | Exit::RestartFailed
            | Exit::Busy
            | Exit::Internal
            | Exit::Verdict(_) => {}
        }
    }
    all.to_vec()
}

const VERDICTS: [Verdict; 8] = [
    Verdict::Healthy,
    Verdict::Inconclusive,
    Verdict::BlockPathFrozen,
    Verdict::MainLoopWedged,
    Verdict::QmpUnreachable,
    Verdict::Paused,
    Verdict::IoError,
    Verdict::ProcessStopped,
];

fn row_of(rows: &[(Vec<u8>, String, String)], code: u8) -> &(Vec<u8>, String, String) {
    rows.iter().find(|(c, _, _)| c.contains(&code)).unwrap_or_else(|| panic!("code {code} is not in README"))
}

#[test]
fn every_exit_variant_is_documented_in_its_row() {
    let rows = readme_rows();
    for (exit, words) in variants() {
        let (_, autopsy, _) = row_of(&rows, exit.code());
        assert!(autopsy.contains(words), "README row for {} ({exit:?}) does not say {words:?}: {autopsy}", exit.code());
    }
}

/// `diagnose`'s codes and the names the README gives them: each verdict's own code, and
/// a block-path-frozen verdict resting on counters alone (suspected) its own.
fn diagnose_codes() -> Vec<(u8, String)> {
    let mut codes: Vec<(u8, String)> = VERDICTS
        .iter()
        .map(|v| {
            let name = v.to_string();
            let name = if *v == Verdict::BlockPathFrozen { format!("{name} (proven)") } else { name };
            (Exit::Verdict(v.exit_code()).code(), name)
        })
        .collect();
    codes.push((SUSPECTED_FROZEN_EXIT, format!("{} (suspected)", Verdict::BlockPathFrozen)));
    codes
}

#[test]
fn every_verdict_code_is_documented_with_its_name() {
    let rows = readme_rows();
    for (code, name) in diagnose_codes() {
        let (codes, _, diagnose) = row_of(&rows, code);
        // A range row lists the names in code order; a single row names its one verdict.
        let named = match codes.iter().position(|c| *c == code) {
            Some(i) if codes.len() > 1 => diagnose.split(", ").nth(i) == Some(name.as_str()),
            _ => diagnose.contains(&name),
        };
        assert!(named, "README row for {code} does not name {name} in its place: {diagnose}");
    }
}

#[test]
fn every_documented_code_comes_from_a_variant_or_a_verdict() {
    let mut produced: Vec<u8> = variants().iter().map(|(e, _)| e.code()).collect();
    produced.extend(diagnose_codes().iter().map(|(c, _)| *c));
    for (codes, autopsy, diagnose) in readme_rows() {
        for c in codes {
            assert!(
                produced.contains(&c),
                "README documents exit {c} ({autopsy} | {diagnose}) but nothing produces it"
            );
        }
    }
}

/// The same module error means the same class wherever it surfaces (the README's words).
#[test]
fn module_errors_exit_in_the_row_that_describes_them() {
    let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
    let cases: Vec<(Error, &str)> = vec![
        (FloorError::BelowFloor { dir: "/o".into(), free: 1, floor: 2, from: "--min-free".into() }.into(), "min_free"),
        (PruneError::Scan { dir: "/o".into(), source: io() }.into(), "bad input"),
        (ArchiveError::OutDir { dir: "/o".into(), source: io() }.into(), "unwritable `--out`"),
        (ArchiveError::Verify { path: "/a".into(), detail: "x".into() }.into(), "could not seal or verify"),
        (ArchiveError::Read { path: "/a".into(), detail: "x".into() }.into(), "bad input"),
        ("1".parse::<wedge_autopsy::target::VmId>().unwrap_err().into(), "bad input"),
        // inspect --resymbolize / --qemu-state on an archive without what they read.
        (ResymbolizeError::NoRawSnapshot.into(), "bad input"),
        (QemuStateError::NoCore.into(), "bad input"),
        (QemuStateError::OtherBuild("x".into()).into(), "bad input"),
        (QemuStateError::Tool("gdb is not installed".into()).into(), "internal error"),
    ];
    let rows = readme_rows();
    for (e, words) in cases {
        let (_, autopsy, _) = row_of(&rows, e.exit().code());
        assert!(autopsy.contains(words), "{e} exits {} but that row does not say {words:?}", e.exit().code());
    }
}

/// The codes an `Exit codes:` paragraph of `--help` lists (`N text;`, `N-M text;`).
fn help_codes(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wedge-autopsy")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let para = help.split("Exit codes:").nth(1).unwrap_or_else(|| panic!("{args:?} has no 'Exit codes:': {help}"));
    let para = para.split("\n\n").next().unwrap().replace('\n', " ");
    let mut codes = Vec::new();
    for item in para.split(';').flat_map(|i| i.split(", ")) {
        let first = item.split_whitespace().next().unwrap_or("");
        let range: Vec<u8> = match first.split_once(['-', '\u{2013}']) {
            Some((a, b)) => match (a.parse::<u8>(), b.parse::<u8>()) {
                (Ok(a), Ok(b)) => (a..=b).collect(),
                _ => continue,
            },
            None => match first.parse() {
                Ok(c) => vec![c],
                Err(_) => continue,
            },
        };
        codes.extend(range);
    }
    codes.sort();
    codes.dedup();
    codes
}

/// `--help` and `diagnose --help` list exactly the README's codes: every documented code
/// is in a help text, and no help text lists a code the README does not.
#[test]
fn help_lists_every_exit_code_of_the_readme() {
    let mut readme: Vec<u8> = readme_rows().into_iter().flat_map(|(c, _, _)| c).collect();
    readme.sort();
    let main = help_codes(&["--help"]);
    let diagnose = help_codes(&["diagnose", "--help"]);
    let mut both: Vec<u8> = main.iter().chain(&diagnose).copied().collect();
    both.sort();
    both.dedup();
    assert_eq!(both, readme, "--help lists {main:?}, diagnose --help {diagnose:?}; README {readme:?}");
    for c in [0, 1, 2, 3, 4, 5, 6, 17, 70] {
        assert!(main.contains(&c), "--help does not list exit {c}: {main:?}");
    }
}
