//! Core costs of cofab-protocol, against plain automerge where there is a counterpart.
//!
//! - `signature`: sign and verify one change hash.
//! - `ingest/{N}`: verify (binding, chain, signatures, rules) and apply a batch of N
//!   received changes with `Document::ingest`, vs `Change::from_bytes` + `apply_changes`.
//!   Two workloads: a design typed by its owner (one author), and an order discussion
//!   written by 10 enterprises (rules decode every change's ops).
//! - `initial_sync_100k`: a 100,000-change design (one char per change) reaching an empty
//!   peer: `Document::snapshot` (save), `Document::ingest_snapshot` vs `Automerge::load`
//!   of the same bytes, and the whole replica-to-replica sync through the wire encoding.
//!
//! Run: `cargo bench -p cofab-protocol --bench core -- --warm-up-time 1 --measurement-time 3`

use std::collections::VecDeque;
use std::time::Duration;

use automerge::{Automerge, Change};
use cofab_protocol::model::{self, DesignInput, OrderInput, Splice};
use cofab_protocol::sync::Output;
use cofab_protocol::wire::{Frame, SyncMessage};
use cofab_protocol::{ChangeBatch, Clock, DocId, Document, Keypair, Replica};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

const NOW: i64 = 1_700_000_000_000;

fn kp(n: u8) -> Keypair {
    Keypair::from_secret([n; 32])
}

/// A design typed by its owner, one character per change (plus the creating change).
fn typed_design(chars: usize) -> Document {
    let owner = kp(1);
    let (mut doc, _) = model::create_design(
        &owner,
        &DesignInput {
            title: "Spec".into(),
            ..Default::default()
        },
        NOW,
        1,
    )
    .unwrap();
    for i in 0..chars {
        let c = (b'a' + (i % 26) as u8) as char;
        model::splice_description(
            &mut doc,
            &owner,
            NOW + i as i64,
            &Splice {
                pos: i,
                delete: 0,
                insert: c.to_string(),
            },
        )
        .unwrap();
    }
    doc
}

/// A public order whose discussion 10 enterprises take turns writing.
fn busy_order(changes: usize) -> Document {
    let buyer = kp(1);
    let writers: Vec<Keypair> = (2..12).map(kp).collect();
    let (mut doc, _) = model::create_order(
        &buyer,
        &OrderInput {
            title: "Frame".into(),
            quantity: 10,
            ..Default::default()
        },
        NOW,
        1,
    )
    .unwrap();
    for i in 0..changes - 1 {
        model::comment(
            &mut doc,
            &writers[i % writers.len()],
            NOW + i as i64,
            "ok, confirmed",
        )
        .unwrap();
    }
    doc
}

/// What a peer holding nothing is sent (every change, tip and checkpoint signatures).
fn full_batch(doc: &Document) -> ChangeBatch {
    let (batch, more, _) = doc.missing_for(&Clock::new(), usize::MAX);
    assert!(!more);
    assert_eq!(batch.changes.len(), doc.change_count());
    batch
}

fn signature(c: &mut Criterion) {
    let k = kp(7);
    let doc = DocId([3; 16]);
    let hash = automerge::ChangeHash([9; 32]);
    let sig = k.sign_change(&doc, &hash);
    let id = k.id();
    let mut g = c.benchmark_group("signature");
    g.bench_function("sign_change", |b| {
        b.iter(|| k.sign_change(&doc, std::hint::black_box(&hash)))
    });
    g.bench_function("verify_change", |b| {
        b.iter(|| assert!(id.verify_change(&doc, std::hint::black_box(&hash), &sig)))
    });
    g.finish();
}

fn ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("ingest");
    g.sample_size(10);
    for (workload, build) in [
        ("design_1_author", typed_design as fn(usize) -> Document),
        ("order_10_authors", busy_order),
    ] {
        for n in [1_000usize, 10_000] {
            let src = if workload == "design_1_author" {
                build(n - 1)
            } else {
                build(n)
            };
            let batch = full_batch(&src);
            let genesis = src.signed_genesis().clone();
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("{workload}/cofab_verify_and_apply"), n),
                &batch,
                |b, batch| {
                    b.iter_batched(
                        || (Document::new(genesis.clone()), batch.clone()),
                        |(mut d, batch)| {
                            let acc = d.ingest(batch).unwrap();
                            assert_eq!(acc.changes.len(), n);
                            d
                        },
                        BatchSize::LargeInput,
                    )
                },
            );
            g.bench_with_input(
                BenchmarkId::new(format!("{workload}/automerge_parse_and_apply"), n),
                &batch,
                |b, batch| {
                    b.iter_batched(
                        || batch.changes.clone(),
                        |raw| {
                            let mut a = Automerge::new();
                            let parsed: Vec<Change> = raw
                                .into_iter()
                                .map(|r| Change::from_bytes(r).unwrap())
                                .collect();
                            a.apply_changes(parsed).unwrap();
                            a
                        },
                        BatchSize::LargeInput,
                    )
                },
            );
        }
    }
    g.finish();
}

/// Delivers messages between two replicas (through the wire encoding) until both are quiet.
/// Returns the number of messages and bytes.
fn pump(a: &mut Replica, b: &mut Replica, first: Vec<(usize, Output)>) -> (usize, usize) {
    let ids = [a.id(), b.id()];
    let mut queue: VecDeque<(usize, usize, Vec<u8>)> = VecDeque::new();
    let push = |q: &mut VecDeque<(usize, usize, Vec<u8>)>, from: usize, outs: Vec<Output>| {
        for o in outs {
            if let Output::Send { to, msg } = o {
                let to = ids.iter().position(|x| *x == to).unwrap();
                q.push_back((from, to, Frame::Sync(vec![msg]).encode()));
            }
        }
    };
    for (from, o) in first {
        push(&mut queue, from, vec![o]);
    }
    let (mut msgs, mut bytes) = (0, 0);
    while let Some((from, to, frame)) = queue.pop_front() {
        msgs += 1;
        bytes += frame.len();
        let Frame::Sync(list) = Frame::decode(&frame).unwrap() else {
            unreachable!()
        };
        for m in list {
            let m: SyncMessage = m;
            let outs = if to == 0 {
                a.receive(ids[from], m, NOW)
            } else {
                b.receive(ids[from], m, NOW)
            };
            push(&mut queue, to, outs);
        }
    }
    (msgs, bytes)
}

/// Connects two replicas both ways and delivers messages until both are quiet.
fn connect_and_sync(a: &mut Replica, b: &mut Replica) -> (usize, usize) {
    let _ = b.peer_connected(a.id());
    let first = a
        .peer_connected(b.id())
        .into_iter()
        .map(|o| (0, o))
        .collect();
    pump(a, b, first)
}

fn initial_sync_100k(c: &mut Criterion) {
    let n = 100_000;
    let src = typed_design(n - 1);
    assert_eq!(src.change_count(), n);
    let genesis = src.signed_genesis().clone();
    let (bytes, sigs) = src.snapshot();
    eprintln!(
        "100k-change design: snapshot {} bytes, {} signatures",
        bytes.len(),
        sigs.len()
    );
    let mut g = c.benchmark_group("initial_sync_100k");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("snapshot_save", |b| b.iter(|| src.snapshot()));
    g.bench_function("cofab_ingest_snapshot", |b| {
        b.iter_batched(
            || Document::new(genesis.clone()),
            |mut d| {
                d.ingest_snapshot(&bytes, sigs.clone()).unwrap();
                assert_eq!(d.change_count(), n);
                d
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("automerge_load", |b| {
        b.iter(|| Automerge::load(&bytes).unwrap())
    });
    g.bench_function("replica_to_empty_replica", |b| {
        b.iter_batched(
            || {
                let mut a = Replica::new(kp(1));
                a.load(src.clone());
                (a, Replica::new(kp(2)))
            },
            |(mut a, mut b)| {
                let _ = b.peer_connected(a.id());
                let first: Vec<(usize, Output)> = a
                    .peer_connected(b.id())
                    .into_iter()
                    .map(|o| (0, o))
                    .collect();
                let (msgs, _) = pump(&mut a, &mut b, first);
                assert!(msgs >= 2);
                assert_eq!(b.doc(&src.id()).map(|d| d.change_count()), Some(n));
                (a, b)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
    // Report the message count and bytes of one replica-to-replica sync.
    let mut a = Replica::new(kp(1));
    a.load(src.clone());
    let mut b = Replica::new(kp(2));
    let (msgs, total) = connect_and_sync(&mut a, &mut b);
    eprintln!("replica_to_empty_replica: {msgs} messages, {total} bytes");
}

/// Times `Document::ingest` of `batch` into a copy of `rx` (one new change) as `cofab`,
/// and plain automerge's `apply_changes` of the same change into a copy of its state as
/// `automerge`.
fn ingest_vs_apply(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    (cofab, automerge): (&str, &str),
    rx: &Document,
    batch: &ChangeBatch,
) {
    g.bench_function(cofab, |b| {
        b.iter_batched(
            || (rx.clone(), batch.clone()),
            |(mut d, batch)| {
                assert_eq!(d.ingest(batch).unwrap().changes.len(), 1);
                d
            },
            BatchSize::LargeInput,
        )
    });
    let change = Change::from_bytes(batch.changes[0].clone()).unwrap();
    g.bench_function(automerge, |b| {
        b.iter_batched(
            || (rx.automerge().clone(), change.clone()),
            |(mut a, ch)| {
                a.apply_changes([ch]).unwrap();
                a
            },
            BatchSize::LargeInput,
        )
    });
}

/// One comment received into an order that already holds 520 (scenario (a)'s shape):
/// the whole `Document::ingest`, and its parts — the copy of the automerge document that
/// rules are checked on, and automerge applying the one change.
fn incremental(c: &mut Criterion) {
    let mut src = busy_order(520);
    let mut dst = Document::new(src.signed_genesis().clone());
    dst.ingest(full_batch(&src)).unwrap();
    let (mut a, b) = (Replica::new(kp(3)), Replica::new(kp(20)));
    a.load(src.clone());
    let mut b = b;
    b.load(dst.clone());
    let acc = model::comment(&mut src, &kp(3), NOW + 10_000, "ok, confirmed").unwrap();
    let batch = ChangeBatch {
        changes: acc.changes,
        sigs: acc.sigs,
    };
    let mut g = c.benchmark_group("incremental_520");
    ingest_vs_apply(
        &mut g,
        ("cofab_ingest_one", "automerge_apply_one"),
        &dst,
        &batch,
    );
    // The replica's whole receive of a comment from a connected peer (session
    // bookkeeping and the reply included), as the node runs it: a first comment makes
    // the order the replica's "hot" document, `idle` copies it, and the second comment
    // (the one timed) is checked on that copy; and the same without the copy.
    connect_and_sync(&mut a, &mut b);
    let id = src.id();
    let to_b = |outs: Vec<Output>, b: &Replica| -> SyncMessage {
        outs.into_iter()
            .find_map(|o| match o {
                Output::Send { to, msg } if to == b.id() => Some(msg),
                _ => None,
            })
            .expect("a message for b")
    };
    let comment = |a: &mut Replica, t: i64| {
        a.edit(&id, t, |d, k, now| {
            model::comment(d, k, now, "ok, confirmed")
        })
        .unwrap()
        .1
    };
    let m1 = to_b(comment(&mut a, NOW + 20_000), &b);
    let outs = b.receive(a.id(), m1, NOW);
    assert!(outs.iter().any(|o| matches!(o, Output::Updated { .. })));
    b.idle();
    let m2 = to_b(comment(&mut a, NOW + 20_001), &b);
    for (name, spare) in [
        ("replica_receive_one_spare", true),
        ("replica_receive_one", false),
    ] {
        let mut base = b.clone();
        if !spare {
            // A replica whose hot document is another one holds no copy of this one.
            base = Replica::new(kp(20));
            base.load(b.doc(&id).unwrap().clone());
            let _ = base.peer_connected(a.id());
        }
        g.bench_function(name, |bn| {
            bn.iter_batched(
                || (base.clone(), m2.clone()),
                |(mut r, m)| {
                    let outs = r.receive(a.id(), m, NOW);
                    assert!(outs.iter().any(|o| matches!(o, Output::Updated { .. })));
                    r
                },
                BatchSize::LargeInput,
            )
        });
    }
    // The writer's side of the same comment: transaction, commit, the rule check of
    // our own change, signing.
    g.bench_function("cofab_comment_local", |bn| {
        bn.iter_batched(
            || src.clone(),
            |mut d| {
                model::comment(&mut d, &kp(3), NOW + 30_000, "ok, confirmed").unwrap();
                d
            },
            BatchSize::LargeInput,
        )
    });
    // (a)'s other shape: the owner sets one design parameter that was set 520 times
    // before (automerge-repo's bench sets `d.ping = i`), locally and on a receiver.
    let mut design = typed_design(0);
    for i in 0..520 {
        model::set_parameter(&mut design, &kp(1), NOW + i, "ping", i as f64, "").unwrap();
    }
    let mut design_rx = Document::new(design.signed_genesis().clone());
    design_rx.ingest(full_batch(&design)).unwrap();
    g.bench_function("cofab_field_local", |bn| {
        bn.iter_batched(
            || design.clone(),
            |mut d| {
                model::set_parameter(&mut d, &kp(1), NOW + 9_999, "ping", 1.0, "").unwrap();
                d
            },
            BatchSize::LargeInput,
        )
    });
    let mut next = design.clone();
    let acc = model::set_parameter(&mut next, &kp(1), NOW + 9_999, "ping", 1.0, "").unwrap();
    let field = ChangeBatch {
        changes: acc.changes,
        sigs: acc.sigs,
    };
    ingest_vs_apply(
        &mut g,
        ("cofab_field_ingest_one", "automerge_field_apply_one"),
        &design_rx,
        &field,
    );
    g.bench_function("automerge_clone", |b| b.iter(|| dst.automerge().clone()));
    g.finish();
}

criterion_group!(benches, signature, ingest, incremental, initial_sync_100k);
criterion_main!(benches);
