use super::*;

fn errors(text: &str) -> Vec<RunbookError> {
    parse(text, "t.toml").unwrap_err().0
}

const HEAD: &str = "schema = 1\nname = \"t\"\ndescription = \"d\"\n";

#[test]
fn built_in_runbooks_check() {
    for (name, text) in BUILT_IN {
        let rb = parse(text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!rb.steps.is_empty());
    }
    let rb = load(DEFAULT, Path::new("/nonexistent")).unwrap();
    assert_eq!(rb.source, "built-in");
    assert_eq!(rb.steps[0].kind.name(), "proc", "least invasive first");
}

#[test]
fn every_shipped_runbook_checks_and_is_built_in() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/runbooks");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let rb = parse(&text, &p.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
        assert!(BUILT_IN.iter().any(|(name, _)| *name == rb.name), "{} is not embedded", rb.name);
        n += 1;
    }
    assert_eq!(n, BUILT_IN.len());
}

#[test]
fn shipped_files_match_embedded() {
    for (name, text) in BUILT_IN {
        let on_disk = std::fs::read_to_string(format!("{}/runbooks/{name}.toml", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert_eq!(&on_disk, text);
    }
}

#[test]
fn bad_toml_names_the_line() {
    let e = errors(&format!("{HEAD}[[step]]\nid = \"a\"\nkind = proc\n"));
    assert_eq!(e[0].line, Some(6), "{e:?}");
}

#[test]
fn unknown_key_is_an_error() {
    let e = errors(&format!("{HEAD}[[step]]\nid = \"a\"\nkind = \"proc\"\ntimout = \"2s\"\n"));
    assert!(e[0].message.contains("timout"), "{e:?}");
    assert_eq!(e[0].line, Some(7));
}

#[test]
fn quit_in_a_qmp_step_is_refused_at_load() {
    let e = errors(&format!("{HEAD}[[step]]\nid = \"bye\"\nkind = \"qmp\"\ncommand = \"quit\"\n"));
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].key.as_deref(), Some("command"));
    assert_eq!(e[0].line, Some(7));
    assert!(e[0].to_string().starts_with("t.toml:7: command: "), "{}", e[0]);
    assert!(e[0].message.contains("quit"));
}

#[test]
fn shell_string_instead_of_argv() {
    let e = errors(&format!("{HEAD}[[step]]\nid = \"j\"\nkind = \"command\"\nargv = \"journalctl -n 10 | tail\"\n"));
    assert_eq!(e[0].key.as_deref(), Some("argv"));
    assert!(e[0].message.contains("shell string"), "{e:?}");
    let e = errors(&format!("{HEAD}[[step]]\nid = \"j\"\nkind = \"command\"\nargv = [\"/bin/sh\", \"-c\", \"x\"]\n"));
    assert!(e[0].message.contains("runs a shell"), "{e:?}");
}

#[test]
fn duplicate_ids_and_outputs() {
    let text = format!(
        "{HEAD}[[step]]\nid = \"a\"\nkind = \"qmp\"\ncommand = \"query-status\"\n[[step]]\nid = \"a\"\nkind = \"qmp\"\ncommand = \"query-status\"\n"
    );
    let e = errors(&text);
    assert!(e.iter().any(|e| e.key.as_deref() == Some("id") && e.line == Some(9)), "{e:?}");
    assert!(e.iter().any(|e| e.key.as_deref() == Some("output") && e.message.contains("duplicate")), "{e:?}");
}

#[test]
fn placeholders_and_paths() {
    let e = errors(&format!("{HEAD}[[step]]\nid = \"f\"\nkind = \"file\"\npath = \"{{pve_dir}}/{{vm}}.conf\"\n"));
    assert!(e[0].message.contains("unknown placeholder {vm}"), "{e:?}");
    let e = errors(&format!("{HEAD}[[step]]\nid = \"f\"\nkind = \"file\"\npath = \"/x\"\noutput = \"../../etc/x\"\n"));
    assert!(e[0].message.contains("relative path"), "{e:?}");
    let t = Template::parse("_PID={pid}").unwrap();
    assert_eq!(t.render(&Vars { pid: "42".into(), ..Default::default() }), "_PID=42");
}

#[test]
fn timeouts_over_the_cap() {
    let e = errors(&format!("{HEAD}[[step]]\nid = \"a\"\nkind = \"proc\"\ntimeout = \"2h\"\n"));
    assert_eq!(e[0].key.as_deref(), Some("timeout"));
}

#[test]
fn key_of_another_kind() {
    let e = errors(&format!("{HEAD}[[step]]\nid = \"a\"\nkind = \"proc\"\ncommand = \"query-status\"\n"));
    assert!(e[0].message.contains("not a key of a proc step"), "{e:?}");
}

#[test]
fn sizes() {
    assert_eq!(parse_size("2G").unwrap(), 2 << 30);
    assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
    assert!(parse_size("lots").is_err());
}

#[test]
fn schema_names_every_step_key() {
    let s = json_schema().to_string();
    for key in ["\"samples\"", "\"argv\"", "\"methods\"", "\"min_free\"", "\"redact\"", "\"deadline\""] {
        assert!(s.contains(key), "schema lacks {key}");
    }
}

#[test]
fn target_table_is_checked() {
    let e = errors(&format!("{HEAD}\n[target]\ndomain = \"vm-{{vmid}}\"\nmonitor = \"virsh\"\npidfile = \"/run/{{pid}}.pid\"\n\n[[step]]\nid = \"p\"\nkind = \"proc\"\n"));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].key.as_deref(), e[0].line), (Some("pidfile"), Some(8)), "{e:?}");
    let e = errors(&format!(
        "{HEAD}\n[target]\nqmp = \"/x.qmp\"\nmonitor = \"virsh\"\n\n[[step]]\nid = \"p\"\nkind = \"proc\"\n"
    ));
    assert!(e[0].message.contains("needs `domain`"), "{e:?}");
    assert_eq!(e[0].line, Some(7));
    let rb = parse(
        &format!("{HEAD}\n[target]\npidfile = \"/run/qemu/{{vmid}}.pid\"\n\n[[step]]\nid = \"p\"\nkind = \"proc\"\n"),
        "t",
    )
    .unwrap();
    assert_eq!(rb.target.pidfile.as_deref(), Some("/run/qemu/{vmid}.pid"));
    assert!(!rb.target.cluster);
}

/// A default capture needs megabytes, one with a core dump gigabytes.
#[test]
fn space_estimate_scales_with_the_runbook() {
    let none = Path::new("/nonexistent");
    let default = load(DEFAULT, none).unwrap().space_estimate();
    let full = load("qemu-wedge-full", none).unwrap().space_estimate();
    assert!(default > 1 << 20 && default < 512 << 20, "default capture: {default}");
    assert!(full >= 2 << 30, "with a core dump: {full}");
}
