//! Placeholders in runbook paths and argv: `{vmid} {pid} {run_dir} {pve_dir} {qmp} {domain} {log_dir}`.
//! Substitution happens inside one string and never splits or joins argv elements, so a
//! value with spaces stays one argument. Unknown placeholders are load-time errors.

use std::path::{Component, Path};

pub const PLACEHOLDERS: &[&str] = &["vmid", "pid", "run_dir", "pve_dir", "qmp", "domain", "log_dir"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(&'static str),
}

/// A parsed template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

/// The values placeholders take in one run.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    pub vmid: String,
    pub pid: String,
    pub run_dir: String,
    pub pve_dir: String,
    pub qmp: String,
    /// The libvirt domain, when the runbook's `[target]` names one; empty otherwise.
    pub domain: String,
    /// Where Proxmox's logs live (`log_dir`, default /var/log).
    pub log_dir: String,
}

impl Template {
    /// Whether the template refers to placeholder `name` (e.g. `"pid"`).
    pub fn uses(&self, name: &str) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Var(v) if *v == name))
    }

    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let close = rest[open..].find('}').ok_or_else(|| format!("{text:?}: unclosed '{{'"))? + open;
            let name = &rest[open + 1..close];
            let var = PLACEHOLDERS.iter().find(|p| **p == name).ok_or_else(|| {
                format!(
                    "{text:?}: unknown placeholder {{{name}}}; known: {}",
                    PLACEHOLDERS.iter().map(|p| format!("{{{p}}}")).collect::<Vec<_>>().join(" ")
                )
            })?;
            parts.push(Part::Var(var));
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{text:?}: stray '}}'"));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Template { text: text.to_string(), parts })
    }

    /// Whether every placeholder is one of `allowed`.
    pub fn uses_only(&self, allowed: &[&str]) -> bool {
        self.parts.iter().all(|p| match p {
            Part::Var(v) => allowed.contains(v),
            Part::Lit(_) => true,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn render(&self, v: &Vars) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Lit(s) => s.as_str(),
                Part::Var("vmid") => &v.vmid,
                Part::Var("pid") => &v.pid,
                Part::Var("run_dir") => &v.run_dir,
                Part::Var("pve_dir") => &v.pve_dir,
                Part::Var("domain") => &v.domain,
                Part::Var("log_dir") => &v.log_dir,
                Part::Var(_) => &v.qmp,
            })
            .collect()
    }

    /// Whether the template, rendered with digits for every placeholder, is a relative
    /// path that stays inside the archive.
    pub fn is_relative_path(&self) -> bool {
        // Paths of the host (run_dir, qmp) never belong in an archive path; the sink checks
        // the rendered path again at run time.
        if self.parts.iter().any(|p| matches!(p, Part::Var(v) if !matches!(*v, "vmid" | "pid" | "domain"))) {
            return false;
        }
        let probe = self.render(&Vars { vmid: "1".into(), pid: "1".into(), domain: "d".into(), ..Default::default() });
        !probe.is_empty() && Path::new(&probe).components().all(|c| matches!(c, Component::Normal(_)))
    }
}
