//! Version comparison as dpkg does it (epoch, upstream, revision; `~` sorts first), so
//! `10.1.2-1 < 10.1.2-7 < 10.2.1-1` and QEMU's `7.2.22 < 10.0.0`; and ranges like
//! `">= 10.0.0, < 10.1.2-1"`, with `||` between alternatives.

use std::cmp::Ordering;

use serde::Serialize;

/// Whether `v` looks like a version (starts with a digit; dpkg's characters only).
pub fn is_version(v: &str) -> bool {
    v.starts_with(|c: char| c.is_ascii_digit()) && v.chars().all(|c| c.is_ascii_alphanumeric() || ".+-~:".contains(c))
}

fn order(c: char) -> i32 {
    match c {
        '~' => -1,
        c if c.is_ascii_alphabetic() => c as i32,
        c => c as i32 + 256,
    }
}

fn cmp_part(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() || !b.is_empty() {
        let na = a.find(|c: char| c.is_ascii_digit()).unwrap_or(a.len());
        let nb = b.find(|c: char| c.is_ascii_digit()).unwrap_or(b.len());
        let (sa, sb) = (&a[..na], &b[..nb]);
        let mut ca = sa.chars();
        let mut cb = sb.chars();
        loop {
            let (x, y) = (ca.next(), cb.next());
            if x.is_none() && y.is_none() {
                break;
            }
            let ox = x.map(order).unwrap_or(0);
            let oy = y.map(order).unwrap_or(0);
            if ox != oy {
                return ox.cmp(&oy);
            }
        }
        a = &a[na..];
        b = &b[nb..];
        let da = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
        let db = b.find(|c: char| !c.is_ascii_digit()).unwrap_or(b.len());
        let num = |s: &str| s.trim_start_matches('0').to_string();
        let (xa, xb) = (num(&a[..da]), num(&b[..db]));
        let o = xa.len().cmp(&xb.len()).then_with(|| xa.cmp(&xb));
        if o != Ordering::Equal {
            return o;
        }
        a = &a[da..];
        b = &b[db..];
    }
    Ordering::Equal
}

fn split(v: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, r)) if e.chars().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
        _ => (0, v),
    };
    match rest.rsplit_once('-') {
        Some((u, r)) => (epoch, u, r),
        None => (epoch, rest, ""),
    }
}

/// dpkg's ordering of two versions.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split(a.trim());
    let (eb, ub, rb) = split(b.trim());
    ea.cmp(&eb).then_with(|| cmp_part(ua, ub)).then_with(|| cmp_part(ra, rb))
}

/// Alternatives of conjunctions of bounds: `">= 10.0.0, < 10.1.2-1"`, or
/// `">= 10.0.0, < 10.0.7 || >= 10.1.0, < 10.2.0"` when a stable backport splits a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Range {
    pub text: String,
    /// Each alternative's bounds; a version is in the range when it meets all bounds of one.
    alternatives: Vec<Vec<(String, String)>>,
}

impl Range {
    pub fn parse(text: &str) -> Result<Range, String> {
        let mut alternatives = Vec::new();
        for alt in text.split("||") {
            let mut bounds = Vec::new();
            for part in alt.split(',') {
                let p = part.trim();
                let op = ["<=", ">=", "<", ">", "="].into_iter().find(|o| p.starts_with(o));
                let Some(op) = op else {
                    return Err(format!(
                        "{p:?}: each bound is <, <=, >, >= or = and a version, e.g. \">= 10.0.0, < 10.1.2-1\" \
                         (alternatives separated by ||)"
                    ));
                };
                let v = p[op.len()..].trim();
                if !is_version(v) {
                    return Err(format!("{p:?}: {v:?} is not a version"));
                }
                bounds.push((op.to_string(), v.to_string()));
            }
            alternatives.push(bounds);
        }
        Ok(Range { text: text.trim().to_string(), alternatives })
    }

    pub fn contains(&self, v: &str) -> bool {
        self.alternatives.iter().any(|bounds| {
            bounds.iter().all(|(op, b)| {
                let o = compare(v, b);
                match op.as_str() {
                    "<" => o == Ordering::Less,
                    "<=" => o != Ordering::Greater,
                    ">" => o == Ordering::Greater,
                    ">=" => o != Ordering::Less,
                    _ => o == Ordering::Equal,
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_order() {
        assert_eq!(compare("10.1.2-1", "10.1.2-7"), Ordering::Less);
        assert_eq!(compare("10.1.2-7", "10.2.1-1"), Ordering::Less);
        assert_eq!(compare("7.2.22", "10.0.0"), Ordering::Less);
        assert_eq!(compare("7.2.0-6", "7.2.0-10"), Ordering::Less);
        assert_eq!(compare("1:7.2", "9.0"), Ordering::Greater);
        assert_eq!(compare("10.0.0~rc1", "10.0.0"), Ordering::Less);
        assert_eq!(compare("8.0.2", "8.0.2"), Ordering::Equal);
    }

    #[test]
    fn ranges() {
        let r = Range::parse(">= 10.0.0, < 10.1.2-1").unwrap();
        assert!(r.contains("10.0.2-4") && r.contains("10.1.0-1"));
        assert!(!r.contains("10.1.2-1") && !r.contains("9.2.0-5"));
        assert!(Range::parse("10.0").is_err());
        assert!(Range::parse(">= ten").is_err());
    }

    #[test]
    fn alternative_ranges() {
        let r = Range::parse(">= 10.0.0, < 10.0.7 || >= 10.1.0, < 10.2.0").unwrap();
        assert!(r.contains("10.0.0") && r.contains("10.0.6") && r.contains("10.1.0") && r.contains("10.1.2"));
        assert!(!r.contains("10.0.7") && !r.contains("10.0.8") && !r.contains("10.2.0") && !r.contains("9.2.0"));
        // An empty alternative or a bad bound in the second one is an error.
        assert!(Range::parse(">= 10.0.0 ||").is_err());
        let e = Range::parse(">= 10.0.0 || < ten").unwrap_err();
        assert!(e.contains("\"ten\" is not a version"), "{e}");
    }
}
