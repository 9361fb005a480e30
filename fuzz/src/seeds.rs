//! Seeds and regressions.
//!
//! The committed seeds in `corpus/TARGET/` are inputs libFuzzer kept (`cargo fuzz run TARGET
//! work/TARGET -- -max_total_time=60`, then `cargo fuzz cmin`-style `-merge=1` into `corpus/`,
//! see `fuzz/README.md`); the tests below check that they still reach the outcomes that make
//! them worth keeping, so a change of the input format that makes them meaningless fails here.
//! Regressions are described by a property of the decoded input ([`REGRESSIONS`]) and found by
//! a deterministic search over byte strings; `FUZZ_WRITE_CORPUS=1 cargo test --lib seeds`
//! writes them to `regressions/TARGET/`.

use arbitrary::{Arbitrary, Unstructured};

use crate::queue::{ChainSpec, Edit, QueueInput};

/// The first byte string (of a fixed pseudo-random sequence) whose decoded value satisfies
/// `pred`.
pub fn search<T: for<'a> Arbitrary<'a>>(pred: impl Fn(&T) -> bool) -> Option<Vec<u8>> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200_000 {
        let mut v = vec![0u8; 16 + (x % 240) as usize];
        for b in v.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        if T::arbitrary_take_rest(Unstructured::new(&v)).is_ok_and(|t| pred(&t)) {
            return Some(v);
        }
    }
    None
}

/// A regression: target, file name, the property of the input that reproduces it.
pub type Regression = (&'static str, &'static str, fn(&QueueInput) -> bool);

/// Inputs that once found a bug, by what they must contain.
pub const REGRESSIONS: &[Regression] = &[(
    // The worker hung when its first drain after a restart found a corrupt ring that was
    // published without a kick (fixed in 52152bf; also `tests/fuzz_regressions.rs`).
    "queue",
    "hang-broken-before-first-submit",
    |i| {
        let b = &i.batches;
        b.len() >= 2
            && matches!(b[0].edit, Edit::AvailJump(_))
            && matches!(b[1].edit, Edit::HeadOutOfRange(_))
            && !b[1].kick_always
            && b[1]
                .chains
                .iter()
                .all(|c| matches!(c, ChainSpec::Request(_)))
    },
)];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    use super::*;
    use crate::request::{Outcome, RequestInput};

    fn files(sub: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(sub)
            .join(target);
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.map(|e| e.expect("entry").path()).collect())
            .unwrap_or_default();
        v.sort();
        v.into_iter()
            .map(|p| (p.clone(), std::fs::read(&p).expect("read")))
            .collect()
    }

    #[test]
    fn regressions_are_found_written_and_replay_clean() {
        for (target, name, pred) in REGRESSIONS {
            let bytes = search::<QueueInput>(pred).expect("an input with the property");
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("regressions")
                .join(target)
                .join(name);
            if std::env::var_os("FUZZ_WRITE_CORPUS").is_some() {
                std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
                std::fs::write(&path, &bytes).expect("write");
            }
            let saved = std::fs::read(&path).expect("regression file (FUZZ_WRITE_CORPUS=1)");
            let input = QueueInput::arbitrary_take_rest(Unstructured::new(&saved)).expect("decode");
            assert!(
                pred(&input),
                "{name} no longer has its property: regenerate it"
            );
            crate::queue::run(&input);
        }
    }

    fn label(o: Outcome) -> String {
        match o {
            Outcome::Accepted(k) => format!("{k:?}"),
            Outcome::Rejected(_) => "rejected".into(),
            Outcome::Walk(e) if e.corrupts_ring() => "corrupt".into(),
            Outcome::Walk(_) => "unanswerable".into(),
        }
    }

    /// What the random search finds within its budget (DISCARD / WRITE_ZEROES need a
    /// payload the search rarely builds; libFuzzer reaches them within seconds).
    const OUTCOMES: &[&str] = &["Read", "Write", "Flush", "GetId", "rejected", "corrupt"];

    /// `FUZZ_WRITE_CORPUS=1`: one request seed per outcome, found by [`search`].
    #[test]
    fn write_request_seeds() {
        if std::env::var_os("FUZZ_WRITE_CORPUS").is_none() {
            return;
        }
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/request");
        for want in OUTCOMES {
            let bytes = search::<RequestInput>(|i| label(crate::request::run(i)) == *want)
                .unwrap_or_else(|| panic!("no input found for {want}"));
            std::fs::write(dir.join(format!("seed-{want}")), bytes).expect("write seed");
        }
    }

    /// The request seeds replay clean and between them reach every outcome of [`OUTCOMES`].
    #[test]
    fn request_corpus_replays_clean_and_reaches_every_outcome() {
        let mut seen = BTreeSet::new();
        for (p, data) in files("corpus", "request")
            .into_iter()
            .chain(files("regressions", "request"))
        {
            let Ok(i) = RequestInput::arbitrary_take_rest(Unstructured::new(&data)) else {
                continue;
            };
            let _ = p;
            seen.insert(label(crate::request::run(&i)));
        }
        for want in OUTCOMES {
            assert!(seen.contains(*want), "no seed is {want}: {seen:?}");
        }
    }

    #[test]
    fn queue_corpus_replays_clean() {
        let all = files("corpus", "queue");
        assert!(!all.is_empty(), "queue seeds");
        for (p, data) in all {
            eprintln!("{p:?}");
            crate::queue::fuzz(&data);
        }
    }
}
