//! Replays every target's committed corpus (`fuzz/seeds/TARGET`: generated seeds and the
//! inputs of every crash found, kept as regressions) and a few thousand deterministic
//! pseudo-random inputs per target: random bytes, and seeds with random mutations. CI
//! thereby builds and exercises every fuzz target; the coverage-guided search itself runs
//! with `scripts/fuzz.sh`.
//!
//! `FAULTLINE_FUZZ_REPLAY=N` changes the number of pseudo-random inputs per target (2,000
//! by default).

use std::path::PathBuf;

use faultline_fuzz::input::Rng;
use faultline_fuzz::{seeds, TARGETS};

fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).expect("read seed");
            (p.display().to_string(), data)
        })
        .collect()
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(8) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len() as u64) as usize;
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len() as u64) as usize;
                v[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.below(v.len() as u64 + 1) as usize;
                v.insert(i, rng.next_u64() as u8);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len() as u64) as usize;
                v.remove(i);
            }
            _ => {
                let at = rng.below(v.len() as u64 + 1) as usize;
                v.truncate(at);
            }
        }
    }
    v
}

/// Runs one input; if it fails, saves it (to reproduce with `scripts/fuzz.sh` or a unit
/// test) and fails the test naming the file.
fn run_one(name: &str, run: fn(&[u8]), what: &str, data: &[u8]) {
    if std::panic::catch_unwind(|| run(data)).is_err() {
        let path = std::env::temp_dir().join(format!("faultline-fuzz-{name}-failure"));
        let _ = std::fs::write(&path, data);
        panic!("{name}: {what} fails; input saved to {}", path.display());
    }
}

fn replay(name: &str, run: fn(&[u8])) {
    let files = corpus(name);
    assert!(!files.is_empty(), "no committed corpus for {name}");
    for (path, data) in &files {
        run_one(name, run, path, data);
    }
    let generated = seeds(name);
    for (i, s) in generated.iter().enumerate() {
        run_one(name, run, &format!("generated seed {i}"), s);
    }
    let n: u64 = std::env::var("FAULTLINE_FUZZ_REPLAY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut rng = Rng::new(0xfa17_1153 ^ name.len() as u64);
    let pool: Vec<&[u8]> = files
        .iter()
        .map(|(_, d)| d.as_slice())
        .chain(generated.iter().map(Vec::as_slice))
        .collect();
    for i in 0..n {
        let input = if i % 2 == 0 {
            let len = rng.below(600) as usize;
            (0..len).map(|_| rng.next_u64() as u8).collect()
        } else {
            let seed = pool[rng.below(pool.len() as u64) as usize];
            mutate(&mut rng, seed)
        };
        run_one(name, run, &format!("pseudo-random input {i}"), &input);
    }
}

macro_rules! replay_test {
    ($($name:ident),*) => {$(
        #[test]
        fn $name() {
            let name = stringify!($name);
            let run = faultline_fuzz::target(name).expect("target exists");
            replay(name, run);
        }
    )*};
}

replay_test!(
    codec,
    proto,
    guest_agent,
    replica,
    nbd,
    vhost_blk,
    control,
    plan_file,
    orchestrate
);

#[test]
fn every_target_has_a_replay_test_and_seeds() {
    let tested = [
        "codec",
        "proto",
        "guest_agent",
        "replica",
        "nbd",
        "vhost_blk",
        "control",
        "plan_file",
        "orchestrate",
    ];
    for (name, _) in TARGETS {
        assert!(tested.contains(name), "{name} has no replay test");
        assert!(!seeds(name).is_empty(), "{name} has no generated seeds");
    }
}

#[test]
fn committed_seeds_include_the_generated_ones() {
    for (name, _) in TARGETS {
        let committed: Vec<Vec<u8>> = corpus(name).into_iter().map(|(_, d)| d).collect();
        for (i, s) in seeds(name).iter().enumerate() {
            assert!(
                committed.contains(s),
                "fuzz/seeds/{name}/seed-{i} is stale: run `cargo run -p faultline-fuzz --bin make-seeds`"
            );
        }
    }
}
