//! The seed corpus: well-formed and hostile inputs for both targets, built as values and
//! encoded with [`Wire`].
//!
//! Regenerate `fuzz/corpus/` with
//!
//! ```text
//! cd fuzz && FUZZ_WRITE_CORPUS=1 cargo test --lib seeds
//! ```
//!
//! (it removes the `seed-*` files first and leaves other files alone). The tests also check
//! that every seed decodes back to itself and runs clean, and replay every file already in
//! `corpus/` and `regressions/`.

use crate::model::{F_INDIRECT, F_NEXT, F_WRITE};
use crate::queue::{
    pert, Batch, Edit, ItemSpec, QueueInput, RawAddr, RawDesc, RawIndirect, RawSpec, ReqSpec,
};
use crate::request::{Addr, Blob, Content, DescSpec, DwzSpec, Flags, Len, Next, Num, Sector};
use crate::request::{RequestInput, Type, LENS};

fn flags(f: u16) -> Flags {
    let combos = [
        0,
        F_NEXT,
        F_WRITE,
        F_NEXT | F_WRITE,
        F_INDIRECT,
        F_INDIRECT | F_NEXT,
        F_INDIRECT | F_WRITE,
        F_INDIRECT | F_NEXT | F_WRITE,
    ];
    match combos.iter().position(|&c| c == f) {
        Some(i) => Flags::Combo(i as u8),
        None => Flags::Raw(f),
    }
}

fn len(l: u32) -> Len {
    match LENS.iter().position(|&x| x == l) {
        Some(i) => Len::Fixed(i as u8),
        None if l < 256 => Len::Small(l as u8),
        None => Len::Raw(l),
    }
}

fn d(addr: Addr, l: u32, f: u16, next: Next) -> DescSpec {
    DescSpec {
        addr,
        len: len(l),
        flags: flags(f),
        next,
    }
}

fn hdr(at: Addr, ty: u8, sector: Sector) -> Blob {
    Blob {
        at,
        content: Content::Header {
            ty: Type::Known(ty),
            ioprio: 0,
            sector,
        },
    }
}

/// Type indices into `request::TYPES`.
const IN: u8 = 0;
const OUT: u8 = 1;
const FLUSH: u8 = 2;
const GET_ID: u8 = 3;
const DISCARD: u8 = 4;
const WZ: u8 = 5;

fn slot(k: u8) -> Addr {
    Addr::Slot(k, 0)
}

fn req_input(blobs: Vec<Blob>, direct: Vec<DescSpec>) -> RequestInput {
    RequestInput {
        size: 4, // 16 entries
        table: Addr::Table(0),
        head: 0,
        capacity: 3, // 1 MiB
        read_only: false,
        blobs,
        indirect: Vec::new(),
        direct,
    }
}

/// Three descriptors: header, data, status.
fn simple(ty: u8, data_len: u32, data_write: bool) -> RequestInput {
    let dw = if data_write { F_WRITE } else { 0 };
    req_input(
        vec![hdr(slot(0), ty, Sector::Small(1))],
        vec![
            d(slot(0), 16, F_NEXT, Next::Seq),
            d(slot(1), data_len, F_NEXT | dw, Next::Seq),
            d(slot(2), 1, F_WRITE, Next::Seq),
        ],
    )
}

fn dwz(ty: u8, ranges: Vec<DwzSpec>) -> RequestInput {
    let n = ranges.len() as u32;
    req_input(
        vec![
            hdr(slot(0), ty, Sector::Small(0)),
            Blob {
                at: slot(1),
                content: Content::Dwz(ranges),
            },
        ],
        vec![
            d(slot(0), 16, F_NEXT, Next::Seq),
            d(slot(1), 16 * n, F_NEXT, Next::Seq),
            d(slot(2), 1, F_WRITE, Next::Seq),
        ],
    )
}

fn range(sector: u8, n: u8, flags: u8) -> DwzSpec {
    DwzSpec {
        sector: Sector::Small(sector),
        num: Num::Small(n),
        flags,
        raw_flags: 0,
    }
}

/// Seeds of target `request`, by name.
pub fn request_seeds() -> Vec<(&'static str, RequestInput)> {
    let mut v = vec![
        ("in", simple(IN, 512, true)),
        ("out", simple(OUT, 512, false)),
        (
            "flush",
            req_input(
                vec![hdr(slot(0), FLUSH, Sector::Small(0))],
                vec![
                    d(slot(0), 16, F_NEXT, Next::Seq),
                    d(slot(2), 1, F_WRITE, Next::Seq),
                ],
            ),
        ),
        ("get-id", simple(GET_ID, 20, true)),
        (
            "discard",
            dwz(DISCARD, vec![range(0, 8, 0), range(64, 16, 0)]),
        ),
        ("write-zeroes", dwz(WZ, vec![range(8, 8, 1)])),
    ];

    // Indirect: one table descriptor, three entries.
    let mut ind = simple(IN, 1024, true);
    ind.indirect = ind.direct.clone();
    ind.direct = vec![d(Addr::Itable(0), 48, F_INDIRECT, Next::Seq)];
    v.push(("indirect", ind));

    // Header split 7 + 9, data in two descriptors, the second sharing the status byte.
    let mut split = req_input(
        vec![hdr(slot(0), OUT, Sector::Small(2))],
        vec![
            d(slot(0), 7, F_NEXT, Next::Seq),
            d(Addr::Slot(0, 7), 9, F_NEXT, Next::Seq),
            d(slot(1), 512, F_NEXT, Next::Seq),
            d(slot(3), 1, F_WRITE, Next::Seq),
        ],
    );
    split.head = 0;
    v.push(("split-header", split));
    let mut shared = simple(IN, 513, true);
    shared.direct.pop();
    shared.direct[1].flags = flags(F_WRITE);
    v.push(("status-shared", shared));

    // Data across the MAIN / NEXT boundary, and into unmapped memory.
    let mut cross = simple(IN, 512, true);
    cross.direct[1].addr = Addr::MainEnd(200);
    v.push(("cross-region", cross));
    let mut gap = simple(OUT, 512, false);
    gap.direct[1].addr = Addr::NextEnd(100);
    v.push(("cross-into-unmapped", gap));

    // Status byte read-only; zero-length descriptors; huge lengths.
    let mut ro = simple(IN, 512, true);
    ro.direct[2].addr = Addr::Ro(0);
    v.push(("status-read-only", ro));
    let mut zero = simple(IN, 512, true);
    zero.direct
        .insert(1, d(Addr::Unmapped(0), 0, F_NEXT, Next::Seq));
    zero.direct
        .insert(3, d(Addr::Unmapped(0), 0, F_NEXT | F_WRITE, Next::Seq));
    v.push(("zero-length", zero));
    let mut huge = simple(IN, u32::MAX, true);
    huge.direct[2].len = len(u32::MAX);
    v.push(("u32-max", huge));
    let mut rdonly = simple(OUT, 512, false);
    rdonly.read_only = true;
    v.push(("read-only-device", rdonly));
    let mut beyond = simple(IN, 1024, true);
    beyond.blobs[0] = hdr(slot(0), IN, Sector::FromEnd(1));
    v.push(("beyond-capacity", beyond));
    let mut overflow = simple(OUT, 512, false);
    overflow.blobs[0] = hdr(slot(0), OUT, Sector::Overflow(0));
    v.push(("sector-overflow", overflow));

    // Ring corruption.
    let mut lp = simple(IN, 512, true);
    lp.direct[2] = d(slot(2), 1, F_WRITE | F_NEXT, Next::Raw(0));
    v.push(("loop", lp));
    let mut next = simple(IN, 512, true);
    next.direct[1].next = Next::Raw(16);
    v.push(("next-out-of-range", next));
    let mut nested = simple(IN, 512, true);
    nested.indirect = vec![d(Addr::Itable(32), 16, F_INDIRECT, Next::Seq)];
    nested.direct = vec![d(Addr::Itable(0), 16, F_INDIRECT, Next::Seq)];
    v.push(("nested-indirect", nested));
    let mut badlen = simple(IN, 512, true);
    badlen.direct = vec![d(Addr::Itable(0), 24, F_INDIRECT, Next::Seq)];
    v.push(("indirect-bad-length", badlen));
    let mut noacc = simple(IN, 512, true);
    noacc.direct = vec![d(Addr::NoAccess(0), 48, F_INDIRECT, Next::Seq)];
    v.push(("indirect-unreadable", noacc));
    let mut head = simple(IN, 512, true);
    head.head = 16;
    v.push(("head-out-of-range", head));
    let mut table = simple(IN, 512, true);
    table.table = Addr::NoAccess(0);
    v.push(("table-unreadable", table));
    v
}

fn req(kind: u8) -> ReqSpec {
    ReqSpec {
        kind,
        sector: 8 * u16::from(kind),
        nsect: 7,
        out_chunk: 0,
        in_chunk: 0,
        status_shared: false,
        indirect: false,
        ranges: vec![(100, 7, true), (300, 3, false)],
        seed: kind,
        perturb: 0,
        param: 0,
    }
}

fn perturbed(kind: u8, p: u8, param: u16) -> ItemSpec {
    ItemSpec::Req(ReqSpec {
        perturb: 0xe0 + p,
        param,
        ..req(kind)
    })
}

fn batch(items: Vec<ItemSpec>) -> Batch {
    Batch {
        items,
        polite: false,
        edit: Edit::None,
    }
}

fn qinput(variant: u8, batches: Vec<Batch>) -> QueueInput {
    QueueInput {
        variant,
        check_sector: 1000,
        batches,
    }
}

fn raw_desc(addr: RawAddr, l: u32, f: u16, next: Option<u16>) -> RawDesc {
    RawDesc {
        addr,
        len: len(l),
        flags: flags(f),
        next,
    }
}

/// A raw IN chain of 512 bytes laid out by hand, header at offset 0 of the item's area.
fn raw_in() -> RawSpec {
    RawSpec {
        descs: vec![
            raw_desc(RawAddr::Own(0), 16, 0, None),
            raw_desc(RawAddr::Own(0x100), 512, F_WRITE, None),
            raw_desc(RawAddr::Own(0x400), 1, F_WRITE, None),
        ],
        indirect: RawIndirect::Direct,
        blobs: vec![(
            0,
            Content::Header {
                ty: Type::Known(IN),
                ioprio: 0,
                sector: Sector::Small(5),
            },
        )],
    }
}

/// Seeds of target `queue`, by name.
pub fn queue_seeds() -> Vec<(&'static str, QueueInput)> {
    let all: Vec<ItemSpec> = (0..6).map(|k| ItemSpec::Req(req(k))).collect();
    let mut layouts: Vec<ItemSpec> = Vec::new();
    for k in 0..6u8 {
        layouts.push(ItemSpec::Req(ReqSpec {
            out_chunk: 100,
            in_chunk: 700,
            status_shared: true,
            indirect: k % 2 == 0,
            ..req(k)
        }));
    }
    let mut v = vec![
        ("every-kind", qinput(0, vec![batch(all.clone())])),
        ("every-kind-event-idx", qinput(1, vec![batch(all.clone())])),
        ("every-kind-read-only", qinput(2, vec![batch(all.clone())])),
        ("layouts", qinput(0, vec![batch(layouts.clone())])),
        (
            "layouts-polite",
            qinput(
                1,
                vec![Batch {
                    polite: true,
                    ..batch(layouts)
                }],
            ),
        ),
    ];
    // Every perturbation, each on a kind it applies to, eight to a batch.
    let kinds_for = |p: u8| -> u8 {
        match p {
            pert::DWZ_FLAGS | pert::DWZ_NUM | pert::DWZ_MANY => 4 + p % 2,
            pert::BIG_ID => 3,
            _ => p % 6,
        }
    };
    let all_perts: Vec<ItemSpec> = (0..pert::COUNT)
        .map(|p| perturbed(kinds_for(p), p, 7))
        .collect();
    let batches: Vec<Batch> = all_perts.chunks(8).map(|c| batch(c.to_vec())).collect();
    v.push(("perturbations", qinput(0, batches.clone())));
    v.push(("perturbations-read-only", qinput(2, batches)));

    // Raw chains: a valid one, one through an indirect table, a loop, an unreadable table.
    let mut ind = raw_in();
    ind.indirect = RawIndirect::Table;
    let mut lp = raw_in();
    lp.descs[2] = raw_desc(RawAddr::Own(0x400), 1, F_WRITE | F_NEXT, Some(0));
    lp.indirect = RawIndirect::Table;
    let unreadable = RawSpec {
        indirect: RawIndirect::Raw(RawAddr::NoAccess(0), 48),
        ..raw_in()
    };
    v.push((
        "raw",
        qinput(
            0,
            vec![
                batch(vec![
                    ItemSpec::Raw(raw_in()),
                    ItemSpec::Raw(ind),
                    ItemSpec::Raw(unreadable),
                ]),
                batch(vec![ItemSpec::Req(req(0)), ItemSpec::Raw(lp)]),
                batch(vec![ItemSpec::Req(req(1))]),
            ],
        ),
    ));

    // Deliberate corruption, each followed by a batch on the restarted worker.
    for (name, edit) in [
        ("edit-head-out-of-range", Edit::HeadOutOfRange(3)),
        ("edit-avail-jump", Edit::AvailJump(0)),
        ("edit-avail-back", Edit::AvailBack(0)),
        ("edit-dup-head", Edit::DupHead),
    ] {
        v.push((
            name,
            qinput(
                1,
                vec![
                    Batch {
                        edit,
                        ..batch(vec![ItemSpec::Req(req(0)), ItemSpec::Req(req(1))])
                    },
                    batch(vec![ItemSpec::Req(req(0))]),
                ],
            ),
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use std::fs;

    use crate::wire::Wire;
    use std::path::PathBuf;

    use super::*;

    fn dir(sub: &str, target: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(sub)
            .join(target)
    }

    fn write_corpus(target: &str, seeds: Vec<(&'static str, Vec<u8>)>) {
        if std::env::var_os("FUZZ_WRITE_CORPUS").is_none() {
            return;
        }
        let dir = dir("corpus", target);
        fs::create_dir_all(&dir).unwrap();
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if e.file_name().to_string_lossy().starts_with("seed-") {
                fs::remove_file(e.path()).unwrap();
            }
        }
        for (name, bytes) in seeds {
            fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }

    /// Every file under `corpus/TARGET` and `regressions/TARGET`.
    fn saved(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for sub in ["corpus", "regressions"] {
            let Ok(rd) = fs::read_dir(dir(sub, target)) else {
                continue;
            };
            for e in rd {
                let p = e.unwrap().path();
                if p.is_file() {
                    out.push((p.clone(), fs::read(&p).unwrap()));
                }
            }
        }
        out
    }

    #[test]
    fn request_seeds_round_trip_and_run() {
        let seeds = request_seeds();
        for (name, s) in &seeds {
            let bytes = s.to_bytes();
            assert_eq!(&RequestInput::from_bytes(&bytes), s, "{name}");
            crate::request::run(s);
        }
        write_corpus(
            "request",
            seeds.iter().map(|(n, s)| (*n, s.to_bytes())).collect(),
        );
    }

    #[test]
    fn queue_seeds_round_trip_and_run() {
        let seeds = queue_seeds();
        for (name, s) in &seeds {
            let bytes = s.to_bytes();
            assert_eq!(&QueueInput::from_bytes(&bytes), s, "{name}");
            crate::queue::run(s);
        }
        let n = crate::queue::counts();
        eprintln!("{n:?}");
        assert!(
            n.completions >= 50 && n.restarts >= 5 && n.data_checks >= 3,
            "{n:?}"
        );
        write_corpus(
            "queue",
            seeds.iter().map(|(n, s)| (*n, s.to_bytes())).collect(),
        );
    }

    #[test]
    fn saved_request_inputs_replay_clean() {
        for (p, bytes) in saved("request") {
            eprintln!("{}", p.display());
            crate::request::fuzz(&bytes);
        }
    }

    #[test]
    fn saved_queue_inputs_replay_clean() {
        for (p, bytes) in saved("queue") {
            eprintln!("{}", p.display());
            crate::queue::fuzz(&bytes);
        }
    }
}
