//! The read-only allowlist, enforced before anything is written to the QMP socket.
//!
//! A wedged QEMU is evidence. Commands that pause, resume, drain, reset, resize,
//! reconfigure or write files would change or destroy it (on 2026-06-11 the trigger
//! surface was a live `block_set_io_throttle`), so the client refuses them locally.
//!
//! Rules, in order:
//! 1. The command name must look like a QMP name (`[A-Za-z0-9_-]+`) and `arguments`,
//!    if given, must be a JSON object.
//! 2. The deny list gives a precise reason. It is matched case-insensitively and with
//!    `_` and `-` treated alike, so `STOP` or `block-set-io-throttle` get the real
//!    reason rather than a generic one. It takes precedence over the allowlist.
//! 3. Allowed, matched exactly (QMP names are case-sensitive): `query-*`, `x-query-*`,
//!    `qom-list`, `qom-get`, `qom-list-types`, `qom-list-properties`, and
//!    `human-monitor-command` whose `command-line` is exactly `info <subcommand>[ <arg>…]`
//!    (printable ASCII, single spaces, no `;`).
//! 4. Everything else is refused.
//!
//! Proxmox's own read-only commands (`query-proxmox-support`, `query-backup`,
//! `query-pbs-bitmap-info`) and `query-stats` (KVM statistics, QEMU 7.2+) pass rule 3
//! like every `query-*`; the default runbook sends them, and a QEMU without them answers
//! CommandNotFound, which the capture records as the step's (unavailable) result.

use serde_json::Value;

use super::one_line;

/// Why a command was refused before being sent. One line when displayed:
/// the command, the reason, and what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused QMP command `{command}`: {reason}; {next}")]
pub struct Refusal {
    /// The command name as the caller gave it, escaped to one short line.
    pub command: String,
    /// What the command would do, or why its form is not accepted.
    pub reason: String,
    /// What to do instead.
    pub next: &'static str,
}

/// Checks `command` with its `arguments` against the read-only policy.
///
/// `Ok(())` means the command may be sent during capture; `Err` says why not.
pub fn check(command: &str, arguments: Option<&Value>) -> Result<(), Refusal> {
    let refuse = |reason: String, next: &'static str| Refusal { command: one_line(command, 80), reason, next };

    if command.is_empty() || !command.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(refuse("not a valid QMP command name".into(), NEXT_ALLOWLIST));
    }
    if let Some(args) = arguments {
        if !args.is_object() {
            return Err(refuse("`arguments` must be a JSON object".into(), "pass an object or no arguments"));
        }
    }

    if command == "human-monitor-command" {
        return check_hmp(arguments).map_err(|reason| refuse(reason, NEXT_HMP));
    }

    let norm = command.to_ascii_lowercase().replace('_', "-");
    if let Some((_, reason, next)) = DENY.iter().find(|(name, _, _)| *name == norm) {
        return Err(refuse((*reason).into(), next));
    }
    if let Some((_, reason, next)) = DENY_PREFIX.iter().find(|(prefix, _, _)| norm.starts_with(prefix)) {
        return Err(refuse((*reason).into(), next));
    }

    let allowed = QOM_READS.contains(&command)
        || ["query-", "x-query-"].iter().any(|p| command.strip_prefix(p).is_some_and(is_lower_name));
    if allowed {
        Ok(())
    } else {
        Err(refuse("not on the read-only allowlist".into(), NEXT_ALLOWLIST))
    }
}

/// Convenience: whether [`check`] accepts the command.
pub fn is_allowed(command: &str, arguments: Option<&Value>) -> bool {
    check(command, arguments).is_ok()
}

const NEXT_ALLOWLIST: &str =
    "only query-*, x-query-*, qom-list, qom-get, qom-list-types, qom-list-properties and HMP `info <subcommand>` are sent during capture";
const NEXT_AFTER_SEAL: &str = "capture is read-only: do this only after the archive is sealed, outside the capture";
const NEXT_READ_INSTEAD: &str = "read the state with query-block or qom-get instead";
const NEXT_HMP: &str = "send exactly `info <subcommand>` (one line, single spaces) or use the QMP query-* equivalent";

const QOM_READS: &[&str] = &["qom-list", "qom-get", "qom-list-types", "qom-list-properties"];

/// Exact names (normalized: lower case, `-` for `_`), with reason and next step.
const DENY: &[(&str, &str, &str)] = &[
    ("stop", "pauses every vCPU, changing the state being captured", NEXT_AFTER_SEAL),
    ("cont", "resumes a paused VM, changing the state being captured", NEXT_AFTER_SEAL),
    (
        "quit",
        "makes QEMU exit, destroying the evidence (a wedged QEMU hangs in bdrv_drain_all_begin instead)",
        NEXT_AFTER_SEAL,
    ),
    ("system-reset", "resets the guest", NEXT_AFTER_SEAL),
    ("system-powerdown", "asks the guest to power down", NEXT_AFTER_SEAL),
    ("system-wakeup", "wakes a suspended guest", NEXT_AFTER_SEAL),
    (
        "dump-guest-memory",
        "stops the VM and drains I/O while dumping, which alters the wedge",
        "take a core with gcore after capture if memory is needed",
    ),
    (
        "block-set-io-throttle",
        "rewrites live throttle state (the trigger surface of the 2026-06-11 wedge)",
        NEXT_READ_INSTEAD,
    ),
    ("qom-set", "writes a QOM property", "read it with qom-get instead"),
    ("savevm", "writes a VM snapshot (stops the VM and drains I/O)", NEXT_AFTER_SEAL),
    ("loadvm", "replaces the VM state with a snapshot", NEXT_AFTER_SEAL),
    ("delvm", "deletes a VM snapshot", NEXT_AFTER_SEAL),
    ("block-resize", "resizes a disk", NEXT_AFTER_SEAL),
    ("device-del", "unplugs a device", NEXT_AFTER_SEAL),
    ("device-add", "plugs a device", NEXT_AFTER_SEAL),
    ("transaction", "runs a batch of block operations", NEXT_AFTER_SEAL),
    ("block-commit", "starts a block job that rewrites images", NEXT_AFTER_SEAL),
    ("block-stream", "starts a block job that rewrites images", NEXT_AFTER_SEAL),
    ("eject", "ejects removable media", NEXT_AFTER_SEAL),
    ("balloon", "changes the guest's memory target", NEXT_AFTER_SEAL),
    ("inject-nmi", "injects an NMI into the guest", NEXT_AFTER_SEAL),
    ("send-key", "sends keystrokes to the guest", NEXT_AFTER_SEAL),
    ("input-send-event", "sends input events to the guest", NEXT_AFTER_SEAL),
    ("memsave", "writes guest memory to a host file as QEMU", NEXT_AFTER_SEAL),
    ("pmemsave", "writes guest memory to a host file as QEMU", NEXT_AFTER_SEAL),
    ("screendump", "writes a host file as QEMU", NEXT_AFTER_SEAL),
    ("getfd", "changes QEMU's file descriptors", NEXT_AFTER_SEAL),
    ("closefd", "changes QEMU's file descriptors", NEXT_AFTER_SEAL),
    ("add-fd", "changes QEMU's file descriptors", NEXT_AFTER_SEAL),
    ("remove-fd", "changes QEMU's file descriptors", NEXT_AFTER_SEAL),
    ("qmp-capabilities", "is sent by the client itself during the handshake", "do not send it yourself"),
];

/// Name prefixes (normalized), with reason and next step.
const DENY_PREFIX: &[(&str, &str, &str)] = &[
    ("blockdev-", "reconfigures the block graph", NEXT_AFTER_SEAL),
    ("x-blockdev-", "reconfigures the block graph", NEXT_AFTER_SEAL),
    ("drive-", "starts a drive job or changes a drive", NEXT_AFTER_SEAL),
    ("block-job-", "controls a block job", NEXT_AFTER_SEAL),
    ("block-dirty-bitmap-", "changes dirty bitmaps", NEXT_AFTER_SEAL),
    ("job-", "controls a job", NEXT_AFTER_SEAL),
    ("migrate", "starts, tunes or cancels migration", NEXT_AFTER_SEAL),
    ("snapshot-", "takes, loads or deletes snapshots", NEXT_AFTER_SEAL),
    ("object-", "creates or deletes objects", NEXT_AFTER_SEAL),
    ("netdev-", "changes network backends", NEXT_AFTER_SEAL),
    ("chardev-", "changes character devices", NEXT_AFTER_SEAL),
    ("change", "changes media or backing files", NEXT_AFTER_SEAL),
    ("dump-", "dumps guest state (stops the VM)", NEXT_AFTER_SEAL),
];

/// HMP words with a precise reason (first word of the command line, lower case).
const HMP_DENY: &[(&str, &str)] = &[
    ("qemu-io", "issues I/O to a drive (this is how a lab wedge is made)"),
    ("stop", "pauses every vCPU"),
    ("s", "pauses every vCPU"),
    ("cont", "resumes the VM"),
    ("c", "resumes the VM"),
    ("quit", "makes QEMU exit"),
    ("q", "makes QEMU exit"),
    ("system_reset", "resets the guest"),
    ("system_powerdown", "powers the guest down"),
    ("savevm", "writes a snapshot (stops the VM)"),
    ("loadvm", "replaces the VM state"),
    ("dump-guest-memory", "stops the VM and drains I/O"),
    ("block_set_io_throttle", "rewrites live throttle state"),
    ("migrate", "starts a migration"),
    ("commit", "commits a drive to its backing file"),
    ("drive_del", "removes a drive"),
    ("device_del", "unplugs a device"),
    ("gdbserver", "opens a debugger port into the guest"),
];

/// Lower-case QMP name characters, non-empty.
fn is_lower_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Accepts `{"command-line": "info <sub>[ <arg>…]", "cpu-index"?: N}` only.
fn check_hmp(arguments: Option<&Value>) -> Result<(), String> {
    let Some(obj) = arguments.and_then(Value::as_object) else {
        return Err("HMP needs arguments {\"command-line\": \"info …\"}".into());
    };
    if let Some(key) = obj.keys().find(|k| *k != "command-line" && *k != "cpu-index") {
        return Err(format!("unexpected HMP argument `{}`", one_line(key, 40)));
    }
    if obj.get("cpu-index").is_some_and(|v| !v.is_u64()) {
        return Err("`cpu-index` must be a non-negative integer".into());
    }
    let Some(line) = obj.get("command-line").and_then(Value::as_str) else {
        return Err("`command-line` must be a string".into());
    };
    check_info_line(line).map_err(|why| format!("HMP {}: {why}", one_line(line, 60)))
}

fn check_info_line(line: &str) -> Result<(), String> {
    if line.chars().any(char::is_control) {
        return Err("contains a control character (newline, CR, tab or NUL)".into());
    }
    if line.contains(';') {
        return Err("contains `;`".into());
    }
    if !line.is_ascii() {
        return Err("contains non-ASCII characters".into());
    }
    let mut words = line.split(' ');
    let first = words.next().unwrap_or_default();
    if first != "info" {
        let word = line.split_whitespace().next().unwrap_or_default().to_ascii_lowercase();
        if word == "info" {
            return Err("leading whitespace or odd case is not accepted".into());
        }
        if let Some((_, why)) = HMP_DENY.iter().find(|(w, _)| *w == word) {
            return Err((*why).into());
        }
        return Err("only `info <subcommand>` is allowed over HMP".into());
    }
    match words.next() {
        Some(sub) if is_lower_name(sub) => {}
        Some("") => return Err("repeated or trailing spaces are not accepted".into()),
        Some(_) => return Err("the info subcommand must be a lower-case name".into()),
        None => return Err("missing the info subcommand".into()),
    }
    for arg in words {
        if arg.is_empty() {
            return Err("repeated or trailing spaces are not accepted".into());
        }
        if !arg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:,=".contains(&b)) {
            return Err("info arguments may only contain letters, digits and -_./:,=".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hmp(line: &str) -> Value {
        json!({ "command-line": line })
    }

    #[test]
    fn allows_read_only_queries() {
        for c in [
            "query-status",
            "query-blockstats",
            "query-block",
            "query-named-block-nodes",
            "query-proxmox-support",
            "query-backup",
            "query-pbs-bitmap-info",
            "query-stats",
            "x-query-virtio-queue-status",
            "qom-list",
            "qom-get",
            "qom-list-types",
            "qom-list-properties",
        ] {
            assert!(is_allowed(c, None), "{c} should be allowed");
        }
        let args = json!({"path": "/objects/throttle-drive-scsi0", "property": "limits"});
        assert_eq!(check("qom-get", Some(&args)), Ok(()));
    }

    #[test]
    fn denies_state_changers_with_precise_reasons() {
        let cases = [
            ("stop", "pauses every vCPU"),
            ("cont", "resumes"),
            ("quit", "exit"),
            ("system_reset", "resets"),
            ("system_powerdown", "power down"),
            ("dump-guest-memory", "drains I/O"),
            ("block_set_io_throttle", "throttle"),
            ("qom-set", "QOM property"),
            ("savevm", "snapshot"),
            ("loadvm", "snapshot"),
            ("migrate", "migration"),
            ("migrate_set_parameters", "migration"),
            ("block_resize", "resizes"),
            ("device_del", "unplugs"),
            ("device_add", "plugs"),
            ("blockdev-add", "block graph"),
            ("blockdev-snapshot-sync", "block graph"),
            ("transaction", "batch"),
            ("drive-mirror", "drive"),
            ("drive-backup", "drive"),
            ("block-commit", "rewrites images"),
            ("block-stream", "rewrites images"),
            ("qmp_capabilities", "handshake"),
        ];
        for (cmd, want) in cases {
            let r = check(cmd, None).expect_err(cmd);
            assert_eq!(r.command, cmd);
            assert!(r.reason.contains(want), "{cmd}: reason {:?} lacks {want:?}", r.reason);
            let msg = r.to_string();
            assert!(!msg.contains('\n') && msg.contains(cmd) && msg.contains(r.next), "{msg}");
        }
    }

    #[test]
    fn case_and_separator_tricks_get_the_real_reason_and_stay_refused() {
        assert!(check("STOP", None).unwrap_err().reason.contains("pauses"));
        assert!(check("Block-Set-IO-Throttle", None).unwrap_err().reason.contains("throttle"));
        assert!(check("system-reset", None).unwrap_err().reason.contains("resets"));
        // QMP names are case-sensitive: QEMU would not know these, and neither do we.
        assert!(!is_allowed("Query-status", None));
        assert!(!is_allowed("QUERY-STATUS", None));
        assert!(!is_allowed("QOM-GET", None));
        assert!(!is_allowed("query-", None));
        assert!(!is_allowed("x-query-", None));
        assert!(!is_allowed("query-status ", None));
        assert!(!is_allowed("query-status\n", None));
        assert!(!is_allowed("query-status\"},{\"execute\":\"stop", None));
        assert!(!is_allowed("", None));
    }

    #[test]
    fn unknown_commands_are_refused() {
        for c in
            ["qom-list-typez", "set_link", "trace-event-set-state", "human-monitor", "querystatus", "nbd-server-start"]
        {
            let r = check(c, None).expect_err(c);
            assert_eq!(r.reason, "not on the read-only allowlist", "{c}");
            assert_eq!(r.next, NEXT_ALLOWLIST);
        }
    }

    #[test]
    fn arguments_must_be_an_object() {
        assert!(!is_allowed("query-status", Some(&json!([]))));
        assert!(!is_allowed("query-status", Some(&Value::Null)));
        assert!(!is_allowed("qom-list", Some(&json!("/objects"))));
        assert!(is_allowed("qom-list", Some(&json!({"path": "/objects"}))));
    }

    #[test]
    fn hmp_info_is_allowed_in_its_strict_form() {
        for line in [
            "info block",
            "info status",
            "info registers",
            "info mtree -f",
            "info qom-tree /machine",
            "info block -v drive-scsi0",
        ] {
            assert!(is_allowed("human-monitor-command", Some(&hmp(line))), "{line:?}");
        }
        let with_cpu = json!({"command-line": "info registers", "cpu-index": 1});
        assert!(is_allowed("human-monitor-command", Some(&with_cpu)));
    }

    #[test]
    fn hmp_tricks_are_refused() {
        let bad = [
            " info block",
            "info  block",
            "info block ",
            "info block\nq",
            "info block\r\nq",
            "info block\tq",
            "info block\0",
            "info block; q",
            "info block;q",
            "INFO block",
            "Info block",
            "info",
            "info ",
            "info BLOCK",
            "info blöck",
            "info block \"x\"",
            "info block $(x)",
            "info block `x`",
            "\ninfo block",
            "",
        ];
        for line in bad {
            let r = check("human-monitor-command", Some(&hmp(line))).expect_err(line);
            assert_eq!(r.command, "human-monitor-command");
            assert!(!r.to_string().contains('\n'), "{line:?}: message must be one line");
        }
    }

    #[test]
    fn hmp_state_changers_name_what_they_do() {
        let cases = [
            ("qemu-io drive-scsi0 \"aio_write 0 4k\"", "I/O"),
            ("stop", "pauses"),
            ("q", "exit"),
            ("quit", "exit"),
            ("c", "resumes"),
            ("savevm snap1", "snapshot"),
            ("block_set_io_throttle drive-scsi0 0 0 0 0 0 0", "throttle"),
        ];
        for (line, want) in cases {
            let r = check("human-monitor-command", Some(&hmp(line))).expect_err(line);
            assert!(r.reason.contains(want), "{line}: {}", r.reason);
        }
    }

    #[test]
    fn hmp_argument_shape_is_checked() {
        let refused = [
            None,
            Some(json!({})),
            Some(json!({"command-line": 5})),
            Some(json!({"command-line": "info block", "extra": true})),
            Some(json!({"command-line": "info registers", "cpu-index": -1})),
            Some(json!({"command-line": "info registers", "cpu-index": "0"})),
        ];
        for args in refused {
            assert!(!is_allowed("human-monitor-command", args.as_ref()), "{args:?}");
        }
    }
}
