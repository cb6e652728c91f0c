use super::guards::{ha_lists, kill_proven, wait_gone, Kill};
use super::record::write_cooldown;
use super::*;
use crate::archive::Sealed;

fn settings(restart: Option<&str>) -> Settings {
    let dir = std::env::temp_dir();
    let mut text = String::new();
    if let Some(r) = restart {
        text = format!("[restart]\n{r}\n");
    }
    let path = dir.join(format!("wa-restart-cfg-{}-{}.toml", std::process::id(), text.len()));
    std::fs::write(&path, &text).unwrap();
    let s = Settings::load(&crate::config::Overrides { config: Some(path.clone()), ..Default::default() });
    let _ = std::fs::remove_file(&path);
    s.unwrap()
}

fn cfg(restart: Option<&str>, opts: &Options) -> Result<RestartConfig, String> {
    RestartConfig::from_settings(&settings(restart), opts).map_err(|e| e.to_string())
}

#[test]
fn restart_defaults() {
    let c = cfg(None, &Options::default()).unwrap();
    assert_eq!(c.method, MethodKind::Qm);
    assert_eq!(c.timeout, Duration::from_secs(30));
    assert_eq!(c.stop_deadline, Duration::from_secs(75));
    assert_eq!(c.cooldown, Duration::from_secs(1800));
    assert!(c.verify_qmp);
    assert_eq!(c.qm, PathBuf::from("qm"));
}

#[test]
fn restart_flags_win() {
    let o = Options { timeout: Some("2s".into()), qm: Some("/opt/qm".into()), ..Default::default() };
    let c = cfg(Some("timeout = \"90s\"\ncooldown = \"0\""), &o).unwrap();
    assert_eq!(c.timeout, Duration::from_secs(2));
    assert_eq!(c.stop_deadline, Duration::from_secs(47));
    assert_eq!(c.cooldown, Duration::ZERO);
    assert_eq!(c.qm, PathBuf::from("/opt/qm"));
}

#[test]
fn restart_table_is_strict() {
    let e = cfg(Some("timeuot = \"1s\""), &Options::default()).unwrap_err();
    assert!(e.contains("[restart]") && e.contains("timeuot"), "{e}");
    let e = cfg(Some("method = \"reboot\""), &Options::default()).unwrap_err();
    assert!(e.contains("reboot"), "{e}");
    let e = cfg(Some("cooldown = \"soon\""), &Options::default()).unwrap_err();
    assert!(e.contains("cooldown"), "{e}");
    let e = cfg(Some("method = \"command\"\nstop = [\"x\"]"), &Options::default()).unwrap_err();
    assert!(e.contains("start"), "{e}");
    let e = cfg(Some("stop = [\"x\"]\nstart = [\"y\"]"), &Options::default()).unwrap_err();
    assert!(e.contains("only used with method = \\\"command\\\"") || e.contains("only used with method"), "{e}");
    let e = cfg(Some("method = \"command\"\nstop = [\"x\", \"{name}\"]\nstart = [\"y\"]"), &Options::default())
        .unwrap_err();
    assert!(e.contains("{name}"), "{e}");
    let e = cfg(Some("method = \"command\"\nstop = [\"\"]\nstart = [\"y\"]"), &Options::default()).unwrap_err();
    assert!(e.contains("program"), "{e}");
    let e = cfg(Some("virsh = \"/usr/bin/virsh\""), &Options::default()).unwrap_err();
    assert!(e.contains("libvirt"), "{e}");
    let e = cfg(None, &Options { timeout: Some("x".into()), ..Default::default() }).unwrap_err();
    assert!(e.contains("--restart-timeout"), "{e}");
    assert!(cfg(Some("method = \"command\"\nstop = [\"vmctl\", \"stop\", \"{vmid}\"]\nstart = [\"vmctl\", \"start\", \"{vmid}\", \"--after={pid}\"]"), &Options::default()).is_ok());
    assert!(
        cfg(Some("method = \"libvirt\"\nvirsh = \"/usr/bin/virsh\"\nverify_qmp = false"), &Options::default()).is_ok()
    );
}

#[test]
fn ha_section_headers_only() {
    let v: VmId = "102".parse().unwrap();
    assert!(ha_lists("vm: 102\n\tstate started\n", v));
    assert!(ha_lists("ct: 101\n\tstate started\n\nvm:102\n\tgroup g\n", v));
    assert!(!ha_lists("vm: 1020\n\tstate started\n", v));
    assert!(!ha_lists("ct: 102\n", v));
    assert!(!ha_lists("vm: 103\n\tcomment vm: 102\n", v));
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(ha_managed(dir.path(), v), Ok(false));
    std::fs::create_dir_all(dir.path().join("ha")).unwrap();
    std::fs::write(dir.path().join("ha/resources.cfg"), "vm: 102\n").unwrap();
    assert_eq!(ha_managed(dir.path(), v), Ok(true));
}

#[test]
fn libvirt_domain_from_cmdline() {
    let a = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
    assert_eq!(
        libvirt::domain_of(&a("qemu -name guest=web1,debug-threads=on -uuid 1b4e28ba-2fa1-11d2-883f-0016d3cca427"))
            .as_deref(),
        Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427")
    );
    assert_eq!(libvirt::domain_of(&a("qemu -name guest=web1,debug-threads=on")).as_deref(), Some("web1"));
    assert_eq!(libvirt::domain_of(&a("qemu -name devvm,debug-threads=on")).as_deref(), Some("devvm"));
    assert_eq!(libvirt::domain_of(&a("qemu -name a,,b")).as_deref(), Some("a,b"));
    assert_eq!(libvirt::domain_of(&a("qemu -m 128")), None);
}

fn fake_target(pid: i32) -> Target {
    Target {
        vmid: "102".parse().unwrap(),
        pid,
        starttime: 1,
        proof: target::Proof::Pidfile,
        pidfile: "/x/102.pid".into(),
        qmp_socket: "/x/102.qmp".into(),
        config_path: "/x/102.conf".into(),
        cmdline: vec!["qemu".into()],
        qmp_present: true,
        node: "n".into(),
        domain: None,
        monitor: Default::default(),
    }
}

#[test]
fn command_placeholders_render() {
    let c = cfg(Some("method = \"command\"\nstop = [\"vmctl\", \"stop\", \"{vmid}\"]\nstart = [\"vmctl\", \"start\", \"vm-{vmid}\", \"--old={pid}\"]"), &Options::default()).unwrap();
    let t = fake_target(4242);
    let vm = VmRef { vmid: t.vmid, old: &t, cfg: &c };
    assert_eq!(command::render(&c.start, &vm), vec!["vmctl", "start", "vm-102", "--old=4242"]);
    let m = method_for(&c, false, &t).unwrap();
    assert_eq!(m.name(), "command");
    assert_eq!(method_for(&c, true, &t).unwrap().name(), "ha-manager");
}

#[test]
fn cooldown_window() {
    let out = tempfile::tempdir().unwrap();
    let v: VmId = "102".parse().unwrap();
    let now = Utc::now();
    assert!(cooldown_active(out.path(), v, Duration::from_secs(60), now).is_none());
    let st = CooldownState {
        last_attempt_at: now - chrono::Duration::seconds(30),
        old_pid: 1,
        new_pid: Some(2),
        performed: true,
        archive: None,
    };
    write_cooldown(out.path(), v, &st).unwrap();
    let (age, _) = cooldown_active(out.path(), v, Duration::from_secs(60), now).unwrap();
    assert_eq!(age.as_secs(), 30);
    assert!(cooldown_active(out.path(), v, Duration::from_secs(20), now).is_none());
    assert!(cooldown_active(out.path(), "103".parse().unwrap(), Duration::from_secs(60), now).is_none());
}

#[test]
fn gate_refuses_without_seal_and_on_tampering() {
    assert!(matches!(gate(None), Err(RestartError::NotSealed)));
    assert_eq!(RestartError::NotSealed.exit(), Exit::SealFailed);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.tar.zst");
    std::fs::write(&p, b"not an archive").unwrap();
    let s = Sealed { path: p.clone(), sidecar: p.clone(), sha256: "0".into(), size: 1, files: 0 };
    assert!(matches!(gate(Some(&s)), Err(RestartError::Verify(_))));
}

#[test]
fn restart_error_exits() {
    let v: VmId = "102".parse().unwrap();
    assert_eq!(
        RestartError::Cooldown { vmid: v, ago: "1m".into(), cooldown: "30m".into(), path: "p".into() }.exit(),
        Exit::Busy
    );
    assert_eq!(RestartError::HaManaged { vmid: v, path: "p".into() }.exit(), Exit::RestartFailed);
    let msg = RestartError::HaManaged { vmid: v, path: "p".into() }.to_string();
    assert!(msg.contains("--allow-ha") && !msg.contains('\n'), "{msg}");
}

#[test]
fn kill_of_a_process_that_is_not_the_target_is_refused() {
    // This test process is not VM 102's QEMU: the proof fails and nothing is sent.
    let mut t = fake_target(std::process::id() as i32);
    t.starttime = crate::procfs::parse_stat_file("/proc/self/stat").unwrap().starttime;
    assert!(matches!(kill_proven(&t), Kill::NotSame));
    // A pid that does not exist.
    let gone = fake_target(i32::MAX - 1);
    assert!(matches!(kill_proven(&gone), Kill::Gone | Kill::Error(_)));
    assert!(wait_gone(&gone, Duration::ZERO).is_none());
}

#[test]
fn wait_gone_reports_a_live_process_with_its_state() {
    let mut me = fake_target(std::process::id() as i32);
    me.starttime = crate::procfs::parse_stat_file("/proc/self/stat").unwrap().starttime;
    let (state, _wchan) = wait_gone(&me, Duration::ZERO).expect("this process is alive");
    assert!(matches!(state, 'R' | 'S'), "{state}");
    // Same pid, other start time: not the old process any more.
    me.starttime += 1;
    assert!(wait_gone(&me, Duration::ZERO).is_none());
}
