//! Redaction of secrets before anything enters an archive that gets attached to tickets.
//!
//! Two layers, both here:
//! - structural, where the shape is known: `KEY=value` environments (secret-looking keys
//!   and, inside any value, URL user-info and `key=value` options), Proxmox VM configs,
//!   and QEMU command lines (`-object secret,…,data=`, `password=`, `key=`, `secret=`,
//!   rbd's `:key=…:`, `scheme://user:pass@`, the JSON form of `-object`);
//! - one pass over every file of the staging directory before sealing ([`Redactor`]):
//!   every secret value learned from the command line, the environment and the VM config
//!   is replaced wherever else it shows up (a journal line, a QMP reply, a stack string).
//!
//! Keys are kept and values replaced by [`REDACTED`], so a reader still sees that the
//! setting existed. The manifest records that the pass ran and how many values were
//! replaced, never what they were.

use std::collections::BTreeSet;
use std::path::Path;

const SECRET_FRAGMENTS: &[&str] =
    &["pass", "secret", "token", "key", "credential", "auth", "cookie", "private", "sshkeys", "ticket", "csrf"];
pub const REDACTED: &str = "<redacted>";

/// Learned values shorter than this are redacted where found but not searched for
/// elsewhere (a two-letter "secret" would shred unrelated evidence).
const MIN_LEARNED: usize = 4;

/// Whether a key names something that must not leave the host.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    // `cipassword` contains "pass"; `sshkeys` contains "key".
    SECRET_FRAGMENTS.iter().any(|f| k.contains(f))
}

/// Redacts secrets inside one free-form value (a command-line argument, an environment
/// value, a config value). `secret_object`: the value belongs to a QEMU `secret` object,
/// whose `data=` is the secret itself. Returns the text and the secret values removed.
fn scan(s: &str, secret_object: bool) -> (String, Vec<String>) {
    let mut found = Vec::new();
    // JSON form: `-object '{"qom-type":"secret","id":"sec0","data":"…"}'`.
    if s.trim_start().starts_with('{') {
        if let Ok(mut v) = serde_json::from_str::<serde_json::Value>(s) {
            let obj_secret = v.get("qom-type").and_then(|t| t.as_str()).is_some_and(|t| t.starts_with("secret"));
            json_scan(&mut v, obj_secret, &mut found);
            return (v.to_string(), found);
        }
    }
    let secret_object =
        secret_object || s.starts_with("secret,") || s.starts_with("secret_keyring,") || s.contains("qom-type=secret");
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        // URL user-info: scheme://user:pass@host → scheme://user:<redacted>@host
        if b[i..].starts_with(b"://") {
            out.push_str("://");
            i += 3;
            let rest = &s[i..];
            let end = rest.find(['/', '?', '#', ' ', '\n', ',', '"', '\'']).unwrap_or(rest.len());
            if let Some(at) = rest[..end].rfind('@') {
                let info = &rest[..at];
                // Only `user:password@`: a bare `user@` (ssh://root@host) names no secret.
                if let Some((user, pass)) = info.split_once(':') {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(REDACTED);
                    out.push('@');
                    found.push(pass.to_string());
                    i += at + 1;
                }
            }
            continue;
        }
        // key=value after a separator (start, ',', ':', ';', '&', '?', ' ', '.')
        let at_sep = i == 0 || matches!(b[i - 1], b',' | b':' | b';' | b'&' | b'?' | b' ' | b'\t');
        if at_sep {
            let key_len =
                b[i..].iter().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')).count();
            if key_len > 0 && b.get(i + key_len) == Some(&b'=') {
                let key = &s[i..i + key_len];
                let last = key.rsplit('.').next().unwrap_or(key);
                let vstart = i + key_len + 1;
                // The value ends at an unescaped ',' (QEMU doubles a literal comma), or at
                // ':' ';' '&' ' ' (rbd and URL query options).
                let mut j = vstart;
                while j < b.len() {
                    match b[j] {
                        b',' if b.get(j + 1) == Some(&b',') => j += 2,
                        b',' | b':' | b';' | b'&' | b' ' | b'\t' | b'\n' => break,
                        _ => j += 1,
                    }
                }
                let secret = is_secret_key(last) || (secret_object && last.eq_ignore_ascii_case("data"));
                if secret && j > vstart && &s[vstart..j] != REDACTED {
                    out.push_str(key);
                    out.push('=');
                    out.push_str(REDACTED);
                    found.push(s[vstart..j].replace(",,", ","));
                    found.push(s[vstart..j].to_string());
                    i = j;
                    continue;
                }
                out.push_str(&s[i..vstart]);
                i = vstart;
                continue;
            }
        }
        let ch = s[i..].chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    (out, found)
}

fn json_scan(v: &mut serde_json::Value, secret_object: bool, found: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                let secret = is_secret_key(k) || (secret_object && k == "data");
                match val {
                    serde_json::Value::String(s) if secret => {
                        found.push(std::mem::replace(s, REDACTED.into()));
                    }
                    serde_json::Value::String(s) => {
                        let (t, f) = scan(s, false);
                        found.extend(f);
                        *s = t;
                    }
                    other => json_scan(other, secret_object, found),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| json_scan(x, secret_object, found)),
        _ => {}
    }
}

/// A QEMU (or any) command line with secrets redacted; the removed values are returned
/// for [`Redactor::learn`]. In a `secret,…` object argument, `data=` is the secret.
pub fn argv(args: &[String]) -> (Vec<String>, Vec<String>) {
    let mut found = Vec::new();
    let mut out = Vec::with_capacity(args.len());
    for a in args {
        let (t, f) = scan(a, false);
        found.extend(f);
        out.push(t);
    }
    (out, found)
}

/// `KEY=value` entries, one per line: values of secret-looking keys replaced, and
/// secrets inside any other value (a password in a proxy or database URL) too.
pub fn environ(entries: &[String]) -> String {
    environ_learned(entries).0
}

/// [`environ`] and the values it removed.
pub fn environ_learned(entries: &[String]) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut found = Vec::new();
    for e in entries {
        match e.split_once('=') {
            Some((k, v)) if is_secret_key(k) => {
                out.push_str(&format!("{k}={REDACTED}\n"));
                if v != REDACTED {
                    found.push(v.to_string());
                }
            }
            Some((k, v)) => {
                let (t, f) = scan(v, false);
                found.extend(f);
                out.push_str(&format!("{k}={t}\n"));
            }
            None => {
                out.push_str(e);
                out.push('\n');
            }
        }
    }
    (out, found)
}

/// A Proxmox VM config (`key: value` lines, `[snapshot]` sections) with secret values
/// replaced. Inside a value, `k=v` options with a secret-looking `k` are redacted too
/// (e.g. `ipconfig0` is kept, `cipassword` is not), and `args:` is read as a command line.
pub fn pve_config(text: &str) -> String {
    key_values(text, &[])
}

/// [`pve_config`] with `extra` keys redacted as well (a runbook's `redact` list).
pub fn key_values(text: &str, extra: &[String]) -> String {
    key_values_learned(text, extra).0
}

/// [`key_values`] and the values it removed.
pub fn key_values_learned(text: &str, extra: &[String]) -> (String, Vec<String>) {
    let secret = |k: &str| is_secret_key(k) || extra.iter().any(|e| e.eq_ignore_ascii_case(k.trim()));
    let mut out = String::new();
    let mut found = Vec::new();
    for line in text.lines() {
        let redacted = match line.split_once(':') {
            Some((k, v)) if !line.starts_with('#') && !line.starts_with('[') && secret(k.trim()) => {
                let v = v.trim();
                if !v.is_empty() && v != REDACTED {
                    found.push(v.to_string());
                }
                format!("{}: {REDACTED}", k.trim_end())
            }
            Some((k, v)) if !line.starts_with('#') && !line.starts_with('[') => {
                // Every whitespace-separated token is scanned as a command-line argument
                // (`args: -object secret,id=s,data=…`); `k=v` options with a listed key too.
                let mut toks = Vec::new();
                for tok in v.trim().split(' ') {
                    let opts: Vec<String> = tok
                        .split(',')
                        .map(|o| match o.split_once('=') {
                            Some((ok, ov)) if extra.iter().any(|e| e.eq_ignore_ascii_case(ok.trim())) => {
                                found.push(ov.to_string());
                                format!("{ok}={REDACTED}")
                            }
                            _ => o.to_string(),
                        })
                        .collect();
                    let (t, f) = scan(&opts.join(","), v.contains("secret,") && tok.starts_with("secret,"));
                    found.extend(f);
                    toks.push(t);
                }
                format!("{k}: {}", toks.join(" "))
            }
            _ => line.to_string(),
        };
        out.push_str(&redacted);
        out.push('\n');
    }
    (out, found)
}

/// `url` with its user-info password (or token) replaced: for logs, API answers and
/// records that name a notify target.
pub fn url(url: &str) -> String {
    scan(url, false).0
}

/// Free text (a log line, a journal, a reason someone typed): each line scanned for URL
/// user-info and `key=value` options with a secret-looking key, as a command-line
/// argument is. Returns the text and the values removed.
pub fn text(s: &str) -> (String, Vec<String>) {
    let mut out = String::with_capacity(s.len());
    let mut found = Vec::new();
    for (i, line) in s.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let (t, f) = scan(line, false);
        out.push_str(&t);
        found.extend(f);
    }
    (out, found)
}

/// Staged files that hold free text from the host (journal, kernel log, command output,
/// logs): they get the structural [`text`] pass as well as the learned values.
fn is_free_text(rel: &str) -> bool {
    ["host/", "commands/", "logs/"].iter().any(|p| rel.starts_with(p))
}

/// The set of secret values learned from the structured sources, and the pass that
/// replaces them in every file of a staging directory.
#[derive(Default, Clone)]
pub struct Redactor {
    values: BTreeSet<String>,
}

/// Never the values: a `{:?}` of a report must not print what it hides.
impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} values)", self.values.len())
    }
}

pub use crate::archive::manifest::Redaction;

impl Redactor {
    /// Adds secret values (those too short or too common to search for are skipped).
    pub fn learn<I: IntoIterator<Item = String>>(&mut self, values: I) {
        for v in values {
            let t = v.trim();
            let boring = ["on", "off", "yes", "no", "true", "false", "none", "null"].contains(&t);
            if t.len() >= MIN_LEARNED && !boring && t != REDACTED && !t.bytes().all(|c| c.is_ascii_digit()) {
                self.values.insert(t.to_string());
            }
        }
    }

    /// Learns from a command line (the proven target's).
    pub fn learn_argv(&mut self, args: &[String]) {
        self.learn(argv(args).1);
    }

    /// Learns from a staged file by its kind: `environ` (one `KEY=value` per line), a VM
    /// config, or a NUL-separated command line.
    pub fn learn_file(&mut self, rel: &str, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        if rel.ends_with("environ") {
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            self.learn(environ_learned(&lines).1);
        } else if rel.ends_with("cmdline") {
            let args: Vec<String> = text.split('\0').filter(|s| !s.is_empty()).map(str::to_string).collect();
            self.learn_argv(&args);
        } else if rel.ends_with(".conf") {
            self.learn(key_values_learned(&text, &[]).1);
        }
    }

    /// Number of values to search for.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Replaces every learned value in `bytes`: with [`REDACTED`] in text, with a run of
    /// `*` of the same length in binary data (offsets in a core stay valid). Returns the
    /// new bytes and how many values it replaced plus the markers already present.
    pub fn scrub(&self, bytes: &[u8]) -> (Vec<u8>, u64) {
        let text = std::str::from_utf8(bytes).is_ok();
        let mut cur = bytes.to_vec();
        let mut n = 0u64;
        // Longest first: a value that contains another is replaced whole.
        let mut vals: Vec<&String> = self.values.iter().collect();
        vals.sort_by_key(|v| std::cmp::Reverse(v.len()));
        for v in vals {
            let finder = memchr::memmem::Finder::new(v.as_bytes());
            if finder.find(&cur).is_none() {
                continue;
            }
            let mut out = Vec::with_capacity(cur.len());
            let mut last = 0;
            for at in finder.find_iter(&cur) {
                if at < last {
                    continue;
                }
                out.extend_from_slice(&cur[last..at]);
                if text {
                    out.extend_from_slice(REDACTED.as_bytes());
                } else {
                    out.extend(std::iter::repeat_n(b'*', v.len()));
                    n += 1;
                }
                last = at + v.len();
            }
            out.extend_from_slice(&cur[last..]);
            cur = out;
        }
        if text {
            n += memchr::memmem::find_iter(&cur, REDACTED.as_bytes()).count() as u64;
        }
        (cur, n)
    }

    /// The pass over a staging directory: learns from the staged environment, command
    /// line and VM config, then rewrites every file that holds a learned value. Files are
    /// rewritten in place (they are ours, 0600, inside a 0700 directory).
    pub fn scrub_dir(&mut self, dir: &Path) -> std::io::Result<Redaction> {
        let files = crate::archive::walk(dir)?;
        for rel in &files {
            if rel.ends_with("environ") || rel.ends_with("cmdline") || rel.ends_with(".conf") {
                if let Ok(b) = std::fs::read(dir.join(rel)) {
                    self.learn_file(rel, &b);
                }
            }
        }
        // Host text first: what it reveals (a password in a journal line) is then
        // searched for everywhere else too.
        let mut rewritten = std::collections::BTreeMap::new();
        for rel in files.iter().filter(|r| is_free_text(r)) {
            let bytes = std::fs::read(dir.join(rel))?;
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let (t, found) = text(s);
                self.learn(found);
                if t != s {
                    rewritten.insert(rel.clone(), t.into_bytes());
                }
            }
        }
        let mut total = 0;
        for rel in &files {
            let p = dir.join(rel);
            // A file the text pass changed is written once, after the scrub too.
            let (bytes, changed) = match rewritten.remove(rel) {
                Some(b) => (b, true),
                None => (std::fs::read(&p)?, false),
            };
            let (new, n) = self.scrub(&bytes);
            total += n;
            if changed || new != bytes {
                std::fs::write(&p, &new)?;
            }
        }
        Ok(Redaction { applied: true, values_replaced: total })
    }

    /// A JSON document that leaves the host (the service's completion document): every
    /// string gets the structural [`text`] pass (what it finds is learned), then every
    /// learned value is replaced. Returns how many values were replaced.
    pub fn scrub_json_text(&mut self, v: &mut serde_json::Value) -> u64 {
        fn walk(v: &mut serde_json::Value, found: &mut Vec<String>) {
            match v {
                serde_json::Value::String(s) => {
                    let (t, f) = text(s);
                    found.extend(f);
                    *s = t;
                }
                serde_json::Value::Array(a) => a.iter_mut().for_each(|x| walk(x, found)),
                serde_json::Value::Object(m) => m.values_mut().for_each(|x| walk(x, found)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        walk(v, &mut found);
        self.learn(found);
        self.scrub_json(v)
    }

    /// Text shown outside the archive (the printed summary): every learned value replaced.
    pub fn scrub_text(&self, s: &str) -> String {
        String::from_utf8_lossy(&self.scrub(s.as_bytes()).0).into_owned()
    }

    /// A JSON value (the manifest) with every learned value replaced in its strings.
    pub fn scrub_json(&self, v: &mut serde_json::Value) -> u64 {
        match v {
            serde_json::Value::String(s) => {
                let (new, n) = self.scrub(s.as_bytes());
                *s = String::from_utf8_lossy(&new).into_owned();
                n
            }
            serde_json::Value::Array(a) => a.iter_mut().map(|x| self.scrub_json(x)).sum(),
            serde_json::Value::Object(m) => m.values_mut().map(|x| self.scrub_json(x)).sum(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_how_many_never_what() {
        let mut r = Redactor::default();
        r.learn(["HiddenValue1".to_string()]);
        assert_eq!(format!("{r:?}"), "Redactor(1 values)");
        assert_eq!(r.scrub_text("a HiddenValue1 b"), format!("a {REDACTED} b"));
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn config_secrets_are_redacted_and_the_rest_kept() {
        let cfg = "boot: order=scsi0\ncipassword: hunter2\nscsi0: local-lvm:vm-102-disk-0,iothread=1,mbps_rd=60\nsshkeys: ssh-rsa%20AAAA\nnet0: virtio=AA:BB,bridge=vmbr0\nargs: -foo secret_token=abc -object secret,id=sec1,data=CONFSECRET\n";
        let r = pve_config(cfg);
        assert!(!r.contains("hunter2"));
        assert!(!r.contains("AAAA"));
        assert!(!r.contains("secret_token=abc"), "{r}");
        assert!(!r.contains("CONFSECRET"), "{r}");
        assert!(r.contains("cipassword: <redacted>"));
        assert!(r.contains("scsi0: local-lvm:vm-102-disk-0,iothread=1,mbps_rd=60"));
        assert!(r.contains("net0: virtio=AA:BB,bridge=vmbr0"));
        let (_, found) = key_values_learned(cfg, &[]);
        assert!(found.contains(&"CONFSECRET".to_string()) && found.contains(&"hunter2".to_string()), "{found:?}");
    }

    #[test]
    fn environ_redacts_by_key_and_inside_values() {
        let e = environ(&s(&[
            "PATH=/usr/bin",
            "API_TOKEN=xyz",
            "PGPASSWORD=p",
            "HTTPS_PROXY=http://proxyuser:Pr0xyPa55@proxy.example:3128",
            "DATABASE_URL=postgres://db:DbPa55@db/x?sslmode=require&password=Qpw123",
            "PVE_TICKET=PVE:root@pam:ABCDEF",
        ]));
        assert_eq!(
            e,
            "PATH=/usr/bin\nAPI_TOKEN=<redacted>\nPGPASSWORD=<redacted>\nHTTPS_PROXY=http://proxyuser:<redacted>@proxy.example:3128\nDATABASE_URL=postgres://db:<redacted>@db/x?sslmode=require&password=<redacted>\nPVE_TICKET=<redacted>\n"
        );
    }

    #[test]
    fn qemu_command_line_secrets() {
        let args = s(&[
            "/usr/bin/kvm",
            "-object",
            "secret,id=sec0,data=SUPERSECRET,format=raw",
            "-object",
            r#"{"qom-type":"secret","id":"sec1","data":"JSONSECRET"}"#,
            "-drive",
            "file=rbd:pool/vm-102-disk-0:conf=/etc/pve/ceph.conf:id=admin:key=AQBRBDKEY==:mon_host=10.0.0.1,if=none",
            "-vnc",
            "unix:/var/run/qemu-server/102.vnc,password=on",
            "-spice",
            "port=61000,password=SpicePw1",
            "-drive",
            "file=iscsi://user:IscsiPw9@10.0.0.2/iqn.x/0,if=none",
            "-name",
            "devvm,debug-threads=on",
        ]);
        let (out, found) = argv(&args);
        let joined = out.join(" ");
        for secret in ["SUPERSECRET", "JSONSECRET", "AQBRBDKEY==", "SpicePw1", "IscsiPw9"] {
            assert!(!joined.contains(secret), "{secret} in {joined}");
            assert!(found.iter().any(|f| f == secret), "{secret} not learned: {found:?}");
        }
        assert!(joined.contains("secret,id=sec0,data=<redacted>,format=raw"), "{joined}");
        assert!(joined.contains(":id=admin:key=<redacted>:mon_host=10.0.0.1,if=none"), "{joined}");
        assert!(joined.contains("devvm,debug-threads=on") && joined.contains("iscsi://user:<redacted>@10.0.0.2"));
        assert_eq!(out.len(), args.len());
    }

    #[test]
    fn the_pass_replaces_learned_values_everywhere_and_counts() {
        let mut r = Redactor::default();
        r.learn_argv(&s(&["-object", "secret,id=sec0,data=SUPERSECRET", "-vnc", "x,password=on"]));
        assert_eq!(r.len(), 1, "'on' is not searched for");
        let (t, n) = r.scrub(b"journal: kvm -object secret,id=sec0,data=SUPERSECRET started; again SUPERSECRET");
        assert_eq!(
            String::from_utf8(t).unwrap(),
            "journal: kvm -object secret,id=sec0,data=<redacted> started; again <redacted>"
        );
        assert_eq!(n, 2);
        let (b, n) = r.scrub(b"\xff\x00SUPERSECRET\x00");
        assert_eq!(b, b"\xff\x00***********\x00", "same length in binary data");
        assert_eq!(n, 1);
        let mut v = serde_json::json!({"target": {"cmdline": ["-object", "secret,id=sec0,data=SUPERSECRET"]}});
        assert_eq!(r.scrub_json(&mut v), 1);
        assert!(!v.to_string().contains("SUPERSECRET"));
        assert_eq!(url("http://u:pw@ticket.example/x"), "http://u:<redacted>@ticket.example/x");
        assert_eq!(url("http://ticket.example/x?a=b"), "http://ticket.example/x?a=b");
    }
}

/// `scheme://user:secret@host/…` → `scheme://<redacted>@host/…`: credentials in a URL
/// never leave the host, whatever the scheme (nbd, iscsi, http, …).
pub fn url_userinfo(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else { return s.to_string() };
    let rest = &s[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}://<redacted>@{}", &s[..scheme_end], &rest[at + 1..]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod url_tests {
    #[test]
    fn userinfo_is_redacted() {
        assert_eq!(super::url_userinfo("iscsi://u:pw@10.0.0.1/iqn/0"), "iscsi://<redacted>@10.0.0.1/iqn/0");
        assert_eq!(super::url_userinfo("nbd://10.0.0.5:10809/exp"), "nbd://10.0.0.5:10809/exp");
        assert_eq!(super::url_userinfo("/plain/path@x"), "/plain/path@x");
    }
}
