//! What one small change costs when the CPU has idled before it, as in bench (a) run
//! 250 ms apart like automerge-repo's bench: the writer's edit (automerge transaction,
//! rules, signature) and the receiver's ingest (signature check, apply, rules), then
//! automerge's part alone (the edit; applying it) and ed25519's (sign; verify). Prints p50s back to back, 20 ms and
//! 250 ms apart.
//!
//! `cargo run --release -p cofab-protocol --example cold` (about 40 s)

use automerge::transaction::Transactable;
use cofab_protocol::model::{self, DesignInput};
use cofab_protocol::{ChangeBatch, Clock, Document, Keypair};
use std::time::{Duration, Instant};

/// p50 in µs of `f` run `n` times, each after sleeping `gap_ms`.
fn p50(gap_ms: u64, n: usize, mut f: impl FnMut(usize) -> Duration) -> u128 {
    let mut t: Vec<u128> = (0..n)
        .map(|i| {
            if gap_ms > 0 {
                std::thread::sleep(Duration::from_millis(gap_ms));
            }
            f(i).as_micros()
        })
        .collect();
    t.sort();
    t[n / 2]
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn main() {
    let kp = Keypair::from_secret([1; 32]);
    let input = DesignInput {
        title: "latency".into(),
        ..Default::default()
    };
    // The design of bench (a)'s field shape: one parameter set 520 times.
    let (mut design, _) = model::create_design(&kp, &input, 0, 0).unwrap();
    for i in 0..520 {
        model::set_parameter(&mut design, &kp, 1_000 + i, "ping", i as f64, "").unwrap();
    }
    let mut rx = Document::new(design.signed_genesis().clone());
    rx.ingest(design.missing_for(&Clock::new(), usize::MAX).0)
        .unwrap();
    let mut am = design.automerge().clone();
    let msg = [7u8; 64];
    let sig = kp.sign_genesis(&msg);
    println!("p50 µs          back to back   20 ms apart   250 ms apart");
    let mut at = 10_000;
    let row = |name: &str, f: &mut dyn FnMut(usize) -> Duration| {
        let v: Vec<u128> = [(0, 200), (20, 100), (250, 40)]
            .into_iter()
            .map(|(gap, n)| p50(gap, n, &mut *f))
            .collect();
        println!("{name:<16}{:>13}{:>14}{:>15}", v[0], v[1], v[2]);
    };
    row("edit + ingest", &mut |i| {
        at += 1;
        timed(|| {
            let acc = model::set_parameter(&mut design, &kp, at, "ping", i as f64, "").unwrap();
            rx.ingest(ChangeBatch {
                changes: acc.changes,
                sigs: acc.sigs,
            })
            .unwrap();
        })
    });
    row("automerge edit", &mut |i| {
        timed(|| {
            let mut tx = am.transaction();
            tx.put(automerge::ROOT, "ping", i as f64).unwrap();
            tx.commit();
        })
    });
    // The same edits, made beforehand, applied by a receiver.
    let mut made = {
        let mut src = am.clone();
        (0..400)
            .map(|i| {
                let mut tx = src.transaction();
                tx.put(automerge::ROOT, "ping", i as f64).unwrap();
                tx.commit();
                src.get_last_local_change().unwrap()
            })
            .collect::<Vec<_>>()
            .into_iter()
    };
    let mut dst = am.clone();
    row("automerge apply", &mut |_| {
        let change = made.next().unwrap();
        timed(|| dst.apply_changes([change]).unwrap())
    });
    row("ed25519 sign", &mut |_| {
        timed(|| {
            std::hint::black_box(kp.sign_genesis(&msg));
        })
    });
    row("ed25519 verify", &mut |_| {
        timed(|| assert!(kp.id().verify_genesis(&msg, &sig)))
    });
}
