//! Seeds and regressions.
//!
//! Each committed seed `corpus/TARGET/seed-NAME` is named after a property of its decoded input
//! ([`REQUEST_SEEDS`], [`QUEUE_SEEDS`]); `FUZZ_WRITE_CORPUS=1 cargo test --release --lib seeds`
//! writes the first input [`search`] finds with it (or, where the search finds none, the
//! shortest one in `$FUZZ_SEED_POOL/TARGET`, e.g. what a libFuzzer run kept in `work/`). The
//! tests check that every seed still has its property, so a change of the input format that
//! makes one meaningless fails here. Regressions are described the same way ([`REGRESSIONS`])
//! and written to `regressions/TARGET/`.

use arbitrary::{Arbitrary, Unstructured};

use vduse_blkd::blk::request::RequestError;
use vduse_blkd::blk::RequestKind;

use crate::queue::{Batch, ChainSpec, Config, DataAt, Edit, QueueInput, Req, Shape, StatusAt, Via};
use crate::request::{Outcome, RequestInput};
use crate::Kind;

/// The first byte string of a fixed pseudo-random sequence, at most `max_len` bytes long, whose
/// decoded value satisfies `pred`. Candidates cycle through four byte distributions: uniform,
/// and three sparse ones where most bytes are 0 or 1. A zero decodes to the first (well-formed)
/// alternative of an enum, a 1 to `true` and otherwise to the first alternative too, so that the
/// collections (a `true` before each element) grow long while their elements stay well-formed
/// apart from a few rare choices.
pub fn search<T: for<'a> Arbitrary<'a>>(
    max_len: usize,
    mut pred: impl FnMut(&T) -> bool,
) -> Option<Vec<u8>> {
    search_bytes(max_len, |_, t| pred(t))
}

/// [`search`], with a predicate that also sees the byte string.
fn search_bytes<T: for<'a> Arbitrary<'a>>(
    max_len: usize,
    mut pred: impl FnMut(&[u8], &T) -> bool,
) -> Option<Vec<u8>> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for n in 0..200_000u64 {
        // Out of 16: how many bytes are 0, how many 1; the rest uniform.
        let (zeros, ones) = [(0, 0), (12, 3), (8, 6), (2, 12)][n as usize % 4];
        let len = 16 + (next() % (max_len as u64 - 15)) as usize;
        let v: Vec<u8> = (0..len)
            .map(|_| {
                let r = next();
                match (r >> 32) % 16 {
                    k if k < zeros => 0,
                    k if k < zeros + ones => 1,
                    _ => r as u8,
                }
            })
            .collect();
        if T::arbitrary_take_rest(Unstructured::new(&v)).is_ok_and(|t| pred(&v, &t)) {
            return Some(v);
        }
    }
    None
}

/// Longest request seed searched for.
pub const REQUEST_LEN: usize = 256;
/// Longest queue seed searched for (eight requests take about 270 bytes).
pub const QUEUE_LEN: usize = 1024;

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

/// A request seed: its file name (`corpus/request/seed-NAME`) and what its input must reach.
pub type RequestSeed = (&'static str, fn(&RequestInput, Outcome) -> bool);

fn dwz(i: &RequestInput) -> bool {
    matches!(i.ty, Kind::Discard | Kind::WriteZeroes)
}

/// The request seeds. Each is the first input [`search`] finds with the property.
pub const REQUEST_SEEDS: &[RequestSeed] = &[
    ("Read", |_, o| o == Outcome::Accepted(RequestKind::Read)),
    ("Write", |_, o| o == Outcome::Accepted(RequestKind::Write)),
    ("Flush", |_, o| o == Outcome::Accepted(RequestKind::Flush)),
    ("GetId", |_, o| o == Outcome::Accepted(RequestKind::GetId)),
    ("Discard", |_, o| {
        o == Outcome::Accepted(RequestKind::Discard)
    }),
    ("WriteZeroes", |i, o| {
        o == Outcome::Accepted(RequestKind::WriteZeroes) && !i.ranges.iter().any(|r| r.unmap)
    }),
    ("WriteZeroes-unmap", |i, o| {
        o == Outcome::Accepted(RequestKind::WriteZeroes) && i.ranges.iter().any(|r| r.unmap)
    }),
    // DISCARD / WRITE_ZEROES payloads the parser refuses.
    ("dwz-segment-count", |_, o| {
        o == Outcome::Rejected(RequestError::BadSegmentCount)
    }),
    ("dwz-segment-flags", |_, o| {
        matches!(o, Outcome::Rejected(RequestError::BadSegmentFlags(_)))
    }),
    ("dwz-segment-range", |_, o| {
        o == Outcome::Rejected(RequestError::BadSegmentRange)
    }),
    ("dwz-beyond-capacity", |i, o| {
        dwz(i) && o == Outcome::Rejected(RequestError::BeyondCapacity)
    }),
    ("dwz-overflow", |i, o| {
        dwz(i) && o == Outcome::Rejected(RequestError::Overflow)
    }),
    ("dwz-read-only", |i, o| {
        dwz(i) && o == Outcome::Rejected(RequestError::ReadOnly)
    }),
    ("dwz-unreadable", |i, o| {
        dwz(i) && matches!(o, Outcome::Rejected(RequestError::Memory(_)))
    }),
    ("rejected", |_, o| matches!(o, Outcome::Rejected(_))),
    (
        "corrupt",
        |_, o| matches!(o, Outcome::Walk(e) if e.corrupts_ring()),
    ),
];

/// A queue seed: its file name (`corpus/queue/seed-NAME`) and what its input must contain.
pub type QueueSeed = (&'static str, fn(&QueueInput) -> bool);

/// A queue seed by a property of one of its requests.
pub type QueueRequestSeed = (&'static str, fn(&Req) -> bool);

/// A property of a queue input.
pub type QueueProperty = Box<dyn Fn(&QueueInput) -> bool>;

/// The batches and requests the harness runs (it takes at most 6 and 8).
fn batches(i: &QueueInput) -> impl Iterator<Item = &Batch> {
    i.batches.iter().take(6)
}

fn requests(b: &Batch) -> impl Iterator<Item = &Req> {
    b.chains.iter().take(8).filter_map(|c| match c {
        ChainSpec::Request(r) => Some(r),
        ChainSpec::Raw { .. } => None,
    })
}

/// Nothing moved: the request is well-formed.
fn plain(r: &Req) -> bool {
    r.shape == Shape::AsBuilt
        && r.status_at == StatusAt::Heap
        && r.data_at == DataAt::Heap
        && matches!(r.via, Via::Direct | Via::Indirect)
}

/// A batch of at least `n` well-formed requests, nothing else, no ring edit.
fn plain_batch(b: &Batch, n: usize) -> bool {
    b.edit == Edit::None
        && b.chains.len() >= n
        && b.chains
            .iter()
            .take(8)
            .all(|c| matches!(c, ChainSpec::Request(r) if plain(r)))
}

/// A request with `pred` in a batch without ring edits (so that it is answered).
fn has(i: &QueueInput, pred: impl Fn(&Req) -> bool) -> bool {
    batches(i).any(|b| b.edit == Edit::None && requests(b).any(&pred))
}

/// Placements count only for a request of the shape it was built with.
fn placed(r: &Req) -> bool {
    r.shape == Shape::AsBuilt
}

fn of(r: &Req, kinds: &[Kind]) -> bool {
    kinds
        .iter()
        .any(|k| std::mem::discriminant(k) == std::mem::discriminant(&r.kind))
}

fn moved_data(r: &Req, kinds: &[Kind], at: fn(DataAt) -> bool) -> bool {
    placed(r)
        && r.status_at == StatusAt::Heap
        && r.via != Via::IndirectNoAccess
        && !matches!(r.via, Via::IndirectUnmapped(_))
        && at(r.data_at)
        && of(r, kinds)
}

const DEVICE_WRITES: &[Kind] = &[Kind::In, Kind::GetId];
const DEVICE_READS: &[Kind] = &[Kind::Out, Kind::Discard, Kind::WriteZeroes];

/// The queue seeds in the current input format (the other files in `corpus/queue/` are of the
/// previous format, kept as libFuzzer starting points only).
pub const QUEUE_SEEDS: &[QueueSeed] = &[
    ("batch-of-kinds", |i| {
        batches(i).any(|b| {
            let mut kinds: Vec<_> = requests(b)
                .filter(|r| !matches!(r.kind, Kind::Other(_)))
                .map(|r| std::mem::discriminant(&r.kind))
                .collect();
            kinds.sort_by_key(|d| format!("{d:?}"));
            kinds.dedup();
            plain_batch(b, 4) && kinds.len() >= 3
        })
    }),
    ("batches", |i| {
        batches(i).filter(|b| plain_batch(b, 3)).count() >= 3
    }),
    ("batches-event-idx", |i| {
        i.config == Config::EventIdx && batches(i).filter(|b| plain_batch(b, 3)).count() >= 2
    }),
    ("batches-read-only", |i| {
        i.config == Config::ReadOnly && batches(i).filter(|b| plain_batch(b, 3)).count() >= 2
    }),
    ("dwz-batch", |i| {
        batches(i).any(|b| {
            plain_batch(b, 2)
                && requests(b).any(|r| r.kind == Kind::Discard && r.ranges % 4 > 0)
                && requests(b).any(|r| r.kind == Kind::WriteZeroes && r.ranges % 4 > 0)
        })
    }),
    ("raw-among-requests", |i| {
        batches(i).any(|b| {
            b.edit == Edit::None
                && requests(b).filter(|r| plain(r)).count() >= 2
                && b.chains
                    .iter()
                    .take(8)
                    .any(|c| matches!(c, ChainSpec::Raw { .. }))
        })
    }),
];

/// Queue seeds that need one request with a property, in a batch without ring edits (so that
/// it is answered).
pub const QUEUE_REQUEST_SEEDS: &[QueueRequestSeed] = &[
    ("status-read-only", |r| {
        placed(r) && r.status_at == StatusAt::ReadOnly
    }),
    ("status-no-access", |r| {
        placed(r) && r.status_at == StatusAt::NoAccess
    }),
    ("status-unmapped", |r| {
        placed(r) && matches!(r.status_at, StatusAt::Unmapped(_))
    }),
    ("data-read-only-in", |r| {
        moved_data(r, DEVICE_WRITES, |a| a == DataAt::ReadOnly)
    }),
    ("data-read-only-out", |r| {
        moved_data(r, DEVICE_READS, |a| a == DataAt::ReadOnly)
    }),
    ("data-no-access", |r| {
        moved_data(r, &Kind::EACH, |a| a == DataAt::NoAccess)
    }),
    ("data-unmapped", |r| {
        moved_data(r, &Kind::EACH, |a| matches!(a, DataAt::Unmapped(_)))
    }),
    ("data-across-regions-in", |r| {
        moved_data(r, DEVICE_WRITES, |a| matches!(a, DataAt::AcrossRegions(_)))
    }),
    ("data-across-regions-out", |r| {
        moved_data(r, DEVICE_READS, |a| matches!(a, DataAt::AcrossRegions(_)))
    }),
    ("data-past-region-end", |r| {
        moved_data(r, &Kind::EACH, |a| a == DataAt::PastRegionEnd)
    }),
    ("indirect-no-access", |r| {
        placed(r) && r.via == Via::IndirectNoAccess
    }),
    ("indirect-unmapped", |r| {
        placed(r) && matches!(r.via, Via::IndirectUnmapped(_))
    }),
    ("shape-header", |r| {
        matches!(r.shape, Shape::ShortHeader(_) | Shape::WritableHeader)
    }),
    ("shape-wrong-direction", |r| {
        r.shape == Shape::WrongDirection
    }),
    ("shape-no-status", |r| {
        matches!(r.shape, Shape::TrailingReadable | Shape::EmptyStatus)
    }),
    ("shape-unaligned", |r| {
        matches!(r.shape, Shape::Unaligned(_)) && !matches!(r.kind, Kind::Flush | Kind::Other(_))
    }),
    ("shape-long-id", |r| {
        r.kind == Kind::GetId && matches!(r.shape, Shape::LongIdBuffer(_))
    }),
    ("shape-empty-descriptors", |r| {
        matches!(r.shape, Shape::Empty(_))
    }),
    ("shape-ranges", |r| {
        of(r, &[Kind::Discard, Kind::WriteZeroes])
            && matches!(
                r.shape,
                Shape::RangeEmpty
                    | Shape::RangeTooLong
                    | Shape::RangeFlags(_)
                    | Shape::RangeOverflow
                    | Shape::TooManyRanges
            )
    }),
];

/// Every queue seed: [`QUEUE_SEEDS`], then [`QUEUE_REQUEST_SEEDS`] as properties of the input.
pub fn queue_seeds() -> Vec<(&'static str, QueueProperty)> {
    let whole = QUEUE_SEEDS.iter().map(|&(name, pred)| {
        let pred: QueueProperty = Box::new(pred);
        (name, pred)
    });
    let one = QUEUE_REQUEST_SEEDS.iter().map(|&(name, pred)| {
        let pred: QueueProperty = Box::new(move |i| has(i, pred));
        (name, pred)
    });
    whole.chain(one).collect()
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn dir(sub: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(sub)
    }

    fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .map(|d| d.map(|e| e.expect("entry").path()).collect())
            .unwrap_or_default();
        v.sort();
        v.into_iter()
            .map(|p| (p.clone(), std::fs::read(&p).expect("read")))
            .collect()
    }

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(path, bytes).expect("write");
    }

    fn decode<T: for<'a> Arbitrary<'a>>(path: &Path) -> T {
        let bytes = std::fs::read(path)
            .unwrap_or_else(|e| panic!("{path:?} ({e}; FUZZ_WRITE_CORPUS=1 writes it)"));
        T::arbitrary_take_rest(Unstructured::new(&bytes)).expect("decode")
    }

    #[test]
    fn regressions_are_found_written_and_replay_clean() {
        for (target, name, pred) in REGRESSIONS {
            let path = dir("regressions").join(target).join(name);
            if std::env::var_os("FUZZ_WRITE_CORPUS").is_some() {
                let bytes =
                    search::<QueueInput>(QUEUE_LEN, pred).expect("an input with the property");
                write(&path, &bytes);
            }
            let input: QueueInput = decode(&path);
            assert!(
                pred(&input),
                "{name} no longer has its property: regenerate it"
            );
            crate::queue::run(&input);
        }
    }

    /// The first input [`search`] finds whose decoded value satisfies `pred`, else the
    /// shortest such file of `pool` (a directory libFuzzer filled, e.g. `work/TARGET`); never
    /// one already `taken` by another seed.
    fn find<T: for<'a> Arbitrary<'a>>(
        name: &str,
        pool: Option<&Path>,
        max_len: usize,
        taken: &mut Vec<Vec<u8>>,
        mut pred: impl FnMut(&T) -> bool,
    ) -> Vec<u8> {
        let bytes = search_bytes(max_len, |b, t| !taken.iter().any(|x| x == b) && pred(t))
            .or_else(|| {
                eprintln!("{name}: not found by the search, taken from the pool");
                let mut pool: Vec<_> = pool.map(files).unwrap_or_default();
                pool.sort_by_key(|(p, b)| (b.len(), p.clone()));
                pool.into_iter().map(|(_, b)| b).find(|b| {
                    !taken.contains(b)
                        && T::arbitrary_take_rest(Unstructured::new(b)).is_ok_and(|t| pred(&t))
                })
            })
            .unwrap_or_else(|| panic!("no input found for {name}"));
        taken.push(bytes.clone());
        bytes
    }

    /// `FUZZ_WRITE_CORPUS=1`: every seed of [`REQUEST_SEEDS`] and [`QUEUE_SEEDS`], found by
    /// [`search`], or for the properties the search does not reach (accepted DISCARD and
    /// WRITE_ZEROES, most of the refused payloads) in `$FUZZ_SEED_POOL/TARGET`, what a
    /// libFuzzer run kept.
    #[test]
    fn write_seeds() {
        if std::env::var_os("FUZZ_WRITE_CORPUS").is_none() {
            return;
        }
        let pool = std::env::var_os("FUZZ_SEED_POOL").map(PathBuf::from);
        let pool = |target: &str| pool.as_ref().map(|p| p.join(target));
        let mut taken = Vec::new();
        for (name, pred) in REQUEST_SEEDS {
            let pool = pool("request");
            let bytes = find::<RequestInput>(name, pool.as_deref(), REQUEST_LEN, &mut taken, |i| {
                pred(i, crate::request::run(i))
            });
            write(&dir("corpus/request").join(format!("seed-{name}")), &bytes);
        }
        for (name, pred) in queue_seeds() {
            let pool = pool("queue");
            let bytes = find::<QueueInput>(name, pool.as_deref(), QUEUE_LEN, &mut taken, pred);
            write(&dir("corpus/queue").join(format!("seed-{name}")), &bytes);
        }
    }

    /// Every request seed still reaches what it was kept for, and every file replays clean.
    #[test]
    fn request_corpus_replays_clean_and_every_seed_has_its_property() {
        for (name, pred) in REQUEST_SEEDS {
            let path = dir("corpus/request").join(format!("seed-{name}"));
            let input: RequestInput = decode(&path);
            let outcome = crate::request::run(&input);
            assert!(
                pred(&input, outcome),
                "seed-{name} reaches {outcome:?} now: regenerate it"
            );
        }
        for (p, data) in files(&dir("corpus/request"))
            .into_iter()
            .chain(files(&dir("regressions/request")))
        {
            eprintln!("{p:?}");
            crate::request::fuzz(&data);
        }
    }

    /// Every queue seed still has its property, and every file replays clean.
    #[test]
    fn queue_corpus_replays_clean_and_every_seed_has_its_property() {
        for (name, pred) in queue_seeds() {
            let path = dir("corpus/queue").join(format!("seed-{name}"));
            let input: QueueInput = decode(&path);
            assert!(pred(&input), "seed-{name} lost its property: regenerate it");
        }
        let all = files(&dir("corpus/queue"));
        assert!(!all.is_empty(), "queue seeds");
        for (p, data) in all {
            eprintln!("{p:?}");
            crate::queue::fuzz(&data);
        }
    }

    /// How many candidates of [`search`] have each seed's property (`--ignored --nocapture`:
    /// for choosing properties the search reaches).
    #[test]
    #[ignore]
    fn seed_hit_counts() {
        for (name, pred) in queue_seeds() {
            let mut hits = 0;
            let _ = search::<QueueInput>(QUEUE_LEN, |i| {
                hits += usize::from(pred(i));
                false
            });
            eprintln!("queue {name}: {hits}");
        }
    }
}
