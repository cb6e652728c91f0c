//! Durations and sizes as operators write them (`"2s"`, `"10G"`) and as the tool prints
//! them. A leaf: config, runbooks, retention and the CLI all parse through here.

use std::time::Duration;

/// Parses `"2s"`, `"500ms"`, `"5min"`, `"90d"`, `"6mo"`, `"0"`. A bare `m` (or `M`) is
/// refused: `6m` reads as minutes to some and months to others, and a wrong guess in
/// `prune --max-age` deletes evidence.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut spelled = String::with_capacity(t.len() + 8);
    for (num, unit) in tokens(t) {
        match unit {
            "m" | "M" => {
                return Err(format!(
                    "ambiguous duration {text:?}: \"{num}{unit}\" could be minutes or months; write \"{num}min\" or \"{num}mo\""
                ))
            }
            "mo" => spelled.push_str(&format!("{num}months ")),
            _ => spelled.push_str(&format!("{num}{unit} ")),
        }
    }
    humantime::parse_duration(spelled.trim()).map_err(|e| {
        format!("invalid duration {text:?} ({e}): write e.g. \"2s\", \"500ms\", \"5min\", \"90d\", \"6mo\", \"0\"")
    })
}

/// `"1h 30min"`, `"1h30min"` → `[("1", "h"), ("30", "min")]`; anything else passes through
/// as one token so humantime reports it.
fn tokens(t: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = t.trim_start();
    while !rest.is_empty() {
        let n = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let after = rest[n..].trim_start();
        let u = after.find(|c: char| c.is_ascii_digit() || c.is_whitespace()).unwrap_or(after.len());
        if n == 0 {
            return vec![(t, "")];
        }
        out.push((&rest[..n], &after[..u]));
        rest = after[u..].trim_start();
    }
    out
}

/// Parses `512M`, `2G`, `10G`, `1T` or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let m = match t[i..].trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("invalid size {text:?}: write e.g. \"512M\", \"10G\"")),
            };
            (&t[..i], m)
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {text:?}: write e.g. \"512M\", \"10G\""))
}

/// `1536` → `"1.5 KiB"`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_and_months_are_spelled_out_never_guessed() {
        assert_eq!(parse_duration("5min").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h 30min").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1h30min").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("6mo").unwrap(), humantime::parse_duration("6months").unwrap());
        assert_eq!(parse_duration("90d").unwrap(), Duration::from_secs(90 * 86400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["6m", "6M", "1h 6m"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("ambiguous") && e.contains("min\"") && e.contains("mo\""), "{e}");
        }
        assert!(parse_duration("two").unwrap_err().contains("write e.g."));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
