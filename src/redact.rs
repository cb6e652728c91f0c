//! Redaction of secret-looking values before they enter an archive that gets attached
//! to tickets. Keys are matched case-insensitively on name fragments; values are replaced,
//! keys kept, so a reader still sees that the setting existed.

const SECRET_FRAGMENTS: &[&str] =
    &["pass", "secret", "token", "key", "credential", "auth", "cookie", "private", "sshkeys"];
pub const REDACTED: &str = "<redacted>";

/// Whether a key names something that must not leave the host.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    // `cipassword` contains "pass"; `sshkeys` contains "key".
    SECRET_FRAGMENTS.iter().any(|f| k.contains(f))
}

/// `KEY=value` entries, secret values replaced; one per line.
pub fn environ(entries: &[String]) -> String {
    let mut out = String::new();
    for e in entries {
        match e.split_once('=') {
            Some((k, _)) if is_secret_key(k) => out.push_str(&format!("{k}={REDACTED}\n")),
            _ => {
                out.push_str(e);
                out.push('\n');
            }
        }
    }
    out
}

/// A Proxmox VM config (`key: value` lines, `[snapshot]` sections) with secret values
/// replaced. Inside a value, `k=v` options with a secret-looking `k` are redacted too
/// (e.g. `ipconfig0` is kept, `cipassword` is not).
pub fn pve_config(text: &str) -> String {
    key_values(text, &[])
}

/// [`pve_config`] with `extra` keys redacted as well (a runbook's `redact` list).
pub fn key_values(text: &str, extra: &[String]) -> String {
    let secret = |k: &str| is_secret_key(k) || extra.iter().any(|e| e.eq_ignore_ascii_case(k.trim()));
    let mut out = String::new();
    for line in text.lines() {
        let redacted = match line.split_once(':') {
            Some((k, _)) if !line.starts_with('#') && !line.starts_with('[') && secret(k.trim()) => {
                format!("{}: {REDACTED}", k.trim_end())
            }
            Some((k, v)) if !line.starts_with('#') && !line.starts_with('[') => {
                let opts: Vec<String> = v
                    .trim()
                    .split(',')
                    .map(|o| match o.split_once('=') {
                        Some((ok, _)) if secret(ok) => format!("{ok}={REDACTED}"),
                        _ => o.to_string(),
                    })
                    .collect();
                format!("{k}: {}", opts.join(","))
            }
            _ => line.to_string(),
        };
        out.push_str(&redacted);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_secrets_are_redacted_and_the_rest_kept() {
        let cfg = "boot: order=scsi0\ncipassword: hunter2\nscsi0: local-lvm:vm-102-disk-0,iothread=1,mbps_rd=60\nsshkeys: ssh-rsa%20AAAA\nnet0: virtio=AA:BB,bridge=vmbr0\nargs: -foo secret_token=abc\n";
        let r = pve_config(cfg);
        assert!(!r.contains("hunter2"));
        assert!(!r.contains("AAAA"));
        assert!(!r.contains("secret_token=abc"), "{r}");
        assert!(r.contains("cipassword: <redacted>"));
        assert!(r.contains("scsi0: local-lvm:vm-102-disk-0,iothread=1,mbps_rd=60"));
        assert!(r.contains("net0: virtio=AA:BB,bridge=vmbr0"));
    }

    #[test]
    fn environ_redacts_by_key() {
        let e = environ(&["PATH=/usr/bin".into(), "API_TOKEN=xyz".into(), "PGPASSWORD=p".into()]);
        assert_eq!(e, "PATH=/usr/bin\nAPI_TOKEN=<redacted>\nPGPASSWORD=<redacted>\n");
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
