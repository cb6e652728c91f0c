//! `wedge-autopsy prune` end to end: real files, the real binary, no VM needed.

use std::path::Path;
use std::process::Command;

fn touch(dir: &Path, name: &str, len: usize) {
    std::fs::write(dir.join(name), vec![0u8; len]).unwrap();
}

fn prune(dir: &Path, cfg: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wedge-autopsy"))
        .arg("prune")
        .arg("--config")
        .arg(cfg)
        .arg("--out")
        .arg(dir)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn prune_keeps_the_newest_and_leaves_other_files_alone() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    let cfg = d.path().join("config.toml");
    std::fs::write(&cfg, "[retention]\nkeep = 2\n").unwrap();
    for day in 1..=3 {
        let name = format!("autopsy-102-2026060{day}T120000Z-pve1.tar.zst");
        touch(&dir, &name, 100);
        touch(&dir, &format!("{name}.sha256"), 10);
    }
    touch(&dir, "operator-notes.txt", 5);

    let (code, text) = prune(&dir, &cfg, &["--dry-run"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("would remove autopsy-102-20260601T120000Z-pve1.tar.zst"), "{text}");
    assert!(dir.join("autopsy-102-20260601T120000Z-pve1.tar.zst").exists());

    // The flag wins over the file's keep = 2.
    let (code, text) = prune(&dir, &cfg, &["--keep", "1"]);
    assert_eq!(code, 0, "{text}");
    let mut left: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(
        left,
        [
            "autopsy-102-20260603T120000Z-pve1.tar.zst",
            "autopsy-102-20260603T120000Z-pve1.tar.zst.sha256",
            "operator-notes.txt"
        ]
    );

    let (code, text) = prune(&dir, &cfg, &["--max-age", "soon"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--max-age") && text.trim().lines().count() == 1, "{text}");
}
