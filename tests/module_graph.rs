//! No import cycles between the crate's modules (docs/architecture.md, "Which module may
//! import which"). Built from the source text: every `crate::…` and `super::…` path in
//! `use` items and expressions, outside `#[cfg(test)]` code.
//!
//! Checked at every level of the tree: among the top-level modules (`config` may not
//! reach back to itself through `retention`), and among the children of each module
//! (`serve::runner` and `serve::watch`). A parent using its own children and a child
//! using its parent are how Rust modules work and are not edges here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (e.g. `["serve", "runner"]`) → its source without test code.
fn modules() -> BTreeMap<Vec<String>, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut mods = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let mut path: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
        let last = path.pop().unwrap();
        // The binary crate (main.rs, cmd/) sits on top of the library and is not part of it.
        if path.first().is_some_and(|p| p == "cmd") || last == "main.rs" || last == "lib.rs" {
            continue;
        }
        if last != "mod.rs" {
            path.push(last.trim_end_matches(".rs").to_string());
        }
        // Unit-test files (`#[cfg(test)] mod tests;`) are not in the release graph.
        if path.last().is_some_and(|p| p == "tests") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        mods.insert(path, strip_tests(&text));
    }
    mods
}

/// Drops comment lines (doc links are not imports) and `#[cfg(test)]` items: from the
/// attribute to the end of the item it annotates (a `;` or a balanced `{ … }` block).
fn strip_tests(text: &str) -> String {
    let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).map(|l| format!("{l}\n")).collect();
    let mut out = String::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let (semi, brace) = (after.find(';'), after.find('{'));
        let end = match (semi, brace) {
            (Some(s), Some(b)) if s < b => s + 1,
            (Some(s), None) => s + 1,
            (_, Some(b)) => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (j, c) in after[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + j + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, None) => after.len(),
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Paths this module names, as absolute module paths (`crate::a::b::{c, d}` expands).
fn references(module: &[String], is_mod_rs: bool, text: &str) -> Vec<Vec<String>> {
    let mut refs = Vec::new();
    let bytes = text.as_bytes();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(start).map(|i| i + from) {
            from = i + start.len();
            if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b':') {
                continue;
            }
            // The base this path starts from.
            let mut base: Vec<String> = if start == "crate::" {
                vec![]
            } else {
                // `super` of a file module is its parent; of a `mod.rs` its grandparent.
                let up = if is_mod_rs { 2 } else { 1 };
                module[..module.len().saturating_sub(up)].to_vec()
            };
            let mut j = from;
            loop {
                let seg: String = text[j..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if seg == "super" {
                    base.pop();
                    j += seg.len() + 2;
                    continue;
                }
                if seg.is_empty() {
                    // `crate::{a, b::c}`: each brace item is a path from here.
                    if text[j..].starts_with('{') {
                        let close = text[j..].find('}').map(|c| j + c).unwrap_or(text.len());
                        for item in text[j + 1..close].split(',') {
                            let segs: Vec<String> = item
                                .trim()
                                .split("::")
                                .map(|s| s.trim().trim_start_matches('{').to_string())
                                .filter(|s| !s.is_empty())
                                .collect();
                            let mut p = base.clone();
                            p.extend(segs);
                            refs.push(p);
                        }
                    }
                    break;
                }
                base.push(seg.clone());
                j += seg.len();
                if !text[j..].starts_with("::") {
                    refs.push(base.clone());
                    break;
                }
                j += 2;
            }
        }
    }
    refs
}

/// The module a path lands in: its longest prefix that is a module.
fn resolve(mods: &BTreeMap<Vec<String>, String>, path: &[String]) -> Option<Vec<String>> {
    (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| mods.contains_key(p))
}

/// Edges among the children of `parent`: child a → child b when anything in a's
/// subtree names anything in b's subtree.
fn sibling_edges(
    mods: &BTreeMap<Vec<String>, String>,
    edges: &[(Vec<String>, Vec<String>)],
    parent: &[String],
) -> BTreeMap<String, BTreeSet<String>> {
    let child = |m: &[String]| -> Option<String> {
        (m.len() > parent.len() && m.starts_with(parent)).then(|| m[parent.len()].clone())
    };
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in mods.keys() {
        if let Some(c) = child(m) {
            g.entry(c).or_default();
        }
    }
    for (from, to) in edges {
        if let (Some(a), Some(b)) = (child(from), child(to)) {
            if a != b {
                g.entry(a).or_default().insert(b);
            }
        }
    }
    g
}

/// One cycle in `g`, if any, as the list of nodes along it.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn dfs(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = dfs(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = dfs(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn all_edges(mods: &BTreeMap<Vec<String>, String>) -> Vec<(Vec<String>, Vec<String>)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut edges = Vec::new();
    for (m, text) in mods {
        let is_mod_rs = src.join(m.join("/")).join("mod.rs").exists();
        for r in references(m, is_mod_rs, text) {
            if let Some(to) = resolve(mods, &r) {
                if &to != m {
                    edges.push((m.clone(), to));
                }
            }
        }
    }
    edges
}

/// Cycles that exist and have an owner moving them out; this list only shrinks. It is
/// empty: the last three went when the VM-config parser moved to `pve::vmconfig` and the
/// step context to `autopsy::sampling`. A new cycle fails the test below.
const KNOWN_CYCLES: &[&str] = &[];

#[test]
fn no_import_cycles_at_any_level() {
    let mods = modules();
    assert!(mods.len() > 30, "found only {} modules under src/", mods.len());
    let edges = all_edges(&mods);
    // The check sees real edges (if parsing broke, everything would look acyclic).
    for (a, b) in [("autopsy", "archive"), ("serve", "autopsy"), ("target", "procfs")] {
        assert!(edges.iter().any(|(f, t)| f[0] == a && t[0] == b), "edge {a} → {b} not found");
    }
    let mut parents: BTreeSet<Vec<String>> = mods.keys().map(|m| m[..m.len() - 1].to_vec()).collect();
    parents.insert(vec![]);
    let mut cycles = Vec::new();
    for p in &parents {
        // Every cycle, not just the first: report one, cut its closing edge, look again.
        let mut g = sibling_edges(&mods, &edges, p);
        while let Some(c) = find_cycle(&g) {
            let scope = if p.is_empty() { "crate".to_string() } else { p.join("::") };
            cycles.push(format!("{scope}: {}", c.join(" → ")));
            let (from, to) = (&c[c.len() - 2], &c[c.len() - 1]);
            g.get_mut(from).unwrap().remove(to);
        }
    }
    let new: Vec<&String> = cycles.iter().filter(|c| !KNOWN_CYCLES.contains(&c.as_str())).collect();
    assert!(
        new.is_empty(),
        "import cycles (see docs/architecture.md):\n{}",
        new.iter().map(|c| c.as_str()).collect::<Vec<_>>().join("\n")
    );
    let gone: Vec<&&str> = KNOWN_CYCLES.iter().filter(|k| !cycles.iter().any(|c| c == *k)).collect();
    assert!(gone.is_empty(), "these cycles are gone: remove them from KNOWN_CYCLES: {gone:?}");
}

#[test]
fn the_checker_finds_a_cycle() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into();
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
    let text = "use crate::x::{y, z::w};\nuse super::q;\n/// [`crate::d`]\n#[cfg(test)]\nmod tests { use crate::t; }\n";
    let refs = references(&["m".into(), "n".into()], false, &strip_tests(text));
    assert!(refs.contains(&vec!["x".into(), "y".into()]) && refs.contains(&vec!["x".into(), "z".into(), "w".into()]));
    assert!(refs.contains(&vec!["m".into(), "q".into()]));
    assert!(!refs.iter().any(|r| r[0] == "t" || r[0] == "d"), "test code or a doc link counted: {refs:?}");
}
