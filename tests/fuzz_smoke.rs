//! A stable, deterministic stand-in for the cargo-fuzz targets under `fuzz/`: every
//! parser fed from outside gets its committed seeds (`fuzz/corpus/<target>/`) and a
//! fixed-seed stream of mutations of them. No panic, no endless loop (the test has a
//! bounded number of inputs and each entry point bounds its own work).
//!
//! `FUZZ_SMOKE_ITERS` raises the count per target (defaults: 1000–5000).

use std::path::PathBuf;

use wedge_autopsy::fuzzing;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\0\0",
    b"{",
    b"}",
    b"\"",
    b"[",
    b"\xff\xfe",
    b"{\"event\":\"X\"}\r\n",
    b"{\"return\":{},\"id\":\"wa-1\"}\r\n",
    b"{\"QMP\":{}}\r\n",
    b"[[step]]\n",
    b"kind = \"command\"\n",
    b"(",
    b")",
    b"18446744073709551616",
    b"-1",
    b"\x7fELF",
    b"{pid}",
    b"{unknown}",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(8) {
        match rng.below(7) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.truncate(i);
            }
            3 => {
                let i = rng.below(v.len() + 1);
                let s = INTERESTING[rng.below(INTERESTING.len())];
                v.splice(i..i, s.iter().copied());
            }
            4 if !v.is_empty() => {
                // duplicate a chunk (repetition, nesting)
                let a = rng.below(v.len());
                let b = (a + 1 + rng.below(64)).min(v.len());
                let chunk = v[a..b].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            5 if !v.is_empty() => {
                let a = rng.below(v.len());
                let b = (a + rng.below(32)).min(v.len());
                v.drain(a..b);
            }
            _ => {
                let other = &seeds[rng.below(seeds.len())];
                let at = rng.below(v.len() + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(at);
                v.extend_from_slice(&other[from..]);
            }
        }
    }
    v.truncate(1 << 20);
    v
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out.push(Vec::new());
    out
}

fn smoke(target: &str, f: fn(&[u8]), default_iters: usize) {
    let iters = std::env::var("FUZZ_SMOKE_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_iters);
    let seeds = seeds(target);
    for s in &seeds {
        f(s);
    }
    let mut rng = Rng(0x5EED_0000_0000_0000 ^ target.len() as u64 ^ (target.as_bytes()[0] as u64) << 8);
    for i in 0..iters {
        let input = mutate(&mut rng, &seeds);
        let r = std::panic::catch_unwind(|| f(&input));
        if r.is_err() {
            let dir = std::env::temp_dir().join("fuzz-smoke-crashes");
            let _ = std::fs::create_dir_all(&dir);
            let p = dir.join(format!("{target}-{i}"));
            let _ = std::fs::write(&p, &input);
            panic!("{target}: input {i} panicked; saved to {}", p.display());
        }
    }
}

#[test]
fn fuzz_qmp_session() {
    smoke("qmp_session", fuzzing::qmp_session, 3000);
}

#[test]
fn fuzz_qmp_lines() {
    smoke("qmp_lines", fuzzing::qmp_lines, 3000);
}

#[test]
fn fuzz_runbook() {
    smoke("runbook", fuzzing::runbook, 3000);
}

#[test]
fn fuzz_proc_files() {
    smoke("proc_files", fuzzing::proc_files, 5000);
}

#[test]
fn fuzz_diagnosis() {
    smoke("diagnosis", fuzzing::diagnosis, 3000);
}

#[test]
fn fuzz_archive() {
    smoke("archive", fuzzing::archive, 3000);
}

#[test]
fn fuzz_unwind() {
    smoke("unwind", fuzzing::unwind, 3000);
}

#[test]
fn fuzz_webhook() {
    smoke("webhook", fuzzing::webhook, 3000);
}
