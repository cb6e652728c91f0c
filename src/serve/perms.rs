//! Ownership and mode checks on what the service trusts: the secret files it reads and
//! the files that decide what root runs (the config, runbooks, hooks, the `qm` backend).
//!
//! In: paths from the config. Out: `Ok`, or a one-line error naming the exact `chmod` or
//! `chown` that fixes it. Why: whoever can read the token can start root captures;
//! whoever can write the config, a runbook or a hook chooses what root executes.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The owner a trusted file may have: root, or the user the service runs as (a test or
/// a non-root lab run; under systemd that is root too).
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// A token or HMAC secret file: owned by root, no access for group or others.
pub fn check_secret_file(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let m = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}; create it (mode 0600) or remove the key"))?;
    if !m.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    if !trusted_owner(m.uid()) {
        return Err(format!("{shown} is owned by uid {}, not root: run `chown root:root {shown}`", m.uid()));
    }
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{shown} has mode {mode:04o}: group and others can read the secret; run `chmod 600 {shown}`"
        ));
    }
    Ok(())
}

/// A file or directory that decides what root runs: not writable by others (nor by a
/// group unless owned by root's group), owned by root, and in a directory others cannot
/// write to (unless it is sticky, like /tmp, and the file is ours).
pub fn check_trusted(what: &str, path: &Path) -> Result<(), String> {
    let shown = path.display();
    let m = std::fs::metadata(path).map_err(|e| format!("{what} {shown}: {e}"))?;
    if !trusted_owner(m.uid()) {
        return Err(format!("{what} {shown} is owned by uid {}, not root: run `chown root:root {shown}`", m.uid()));
    }
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err(format!(
            "{what} {shown} has mode {:04o}: anyone can change what root runs; run `chmod o-w {shown}`",
            mode & 0o777
        ));
    }
    if mode & 0o020 != 0 && m.gid() != 0 {
        return Err(format!(
            "{what} {shown} is writable by group {}: run `chmod g-w {shown}` (or `chown root:root {shown}`)",
            m.gid()
        ));
    }
    if let Some(dir) = path.canonicalize().ok().as_deref().and_then(Path::parent) {
        if let Ok(dm) = std::fs::metadata(dir) {
            let dmode = dm.permissions().mode();
            if dmode & 0o002 != 0 && dmode & 0o1000 == 0 {
                let d = dir.display();
                return Err(format!(
                    "{what} {shown} is in {d}, which anyone can write to (mode {:04o}): run `chmod o-w {d}`",
                    dmode & 0o777
                ));
            }
        }
    }
    Ok(())
}

/// `argv0` as executed: itself when it has a slash, else the first match on `PATH`.
pub fn resolve_program(argv0: &str) -> Option<PathBuf> {
    if argv0.contains('/') {
        return Some(PathBuf::from(argv0));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(argv0)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn secret_readable_by_others_names_the_chmod() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        std::fs::write(&p, "t").unwrap();
        chmod(&p, 0o644);
        let e = check_secret_file(&p).unwrap_err();
        assert!(e.contains(&format!("`chmod 600 {}`", p.display())), "{e}");
        chmod(&p, 0o640);
        assert!(check_secret_file(&p).unwrap_err().contains("chmod 600"));
        chmod(&p, 0o600);
        check_secret_file(&p).unwrap();
    }

    #[test]
    fn secret_of_another_owner_names_the_chown() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        std::fs::write(&p, "t").unwrap();
        chmod(&p, 0o600);
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            let e = check_secret_file(&p).unwrap_err();
            assert!(e.contains(&format!("`chown root:root {}`", p.display())), "{e}");
        } else {
            // Not root: a file of ours is trusted; /etc/shadow-like files of others are not readable.
            check_secret_file(&p).unwrap();
        }
    }

    #[test]
    fn world_writable_config_or_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.toml");
        std::fs::write(&p, "").unwrap();
        chmod(&p, 0o666);
        let e = check_trusted("config", &p).unwrap_err();
        assert!(e.contains(&format!("`chmod o-w {}`", p.display())), "{e}");
        chmod(&p, 0o644);
        check_trusted("config", &p).unwrap();
        let rb = d.path().join("runbooks");
        std::fs::create_dir(&rb).unwrap();
        chmod(&rb, 0o777);
        let inner = rb.join("x.toml");
        std::fs::write(&inner, "").unwrap();
        chmod(&inner, 0o644);
        assert!(check_trusted("runbook dir", &rb).unwrap_err().contains("chmod o-w"));
        let e = check_trusted("runbook", &inner).unwrap_err();
        assert!(e.contains(&format!("`chmod o-w {}`", rb.display())), "{e}");
        // Sticky and world-writable (/tmp): a root-owned, non-writable file in it is fine.
        chmod(&rb, 0o1777);
        check_trusted("runbook", &inner).unwrap();
        assert_eq!(resolve_program("sh").map(|p| p.is_file()), Some(true));
    }
}
