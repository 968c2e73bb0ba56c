//! Signed-change verification plus rule checking: arbitrary input fed to a small real
//! document (an order with two bids, and a members design), four ways:
//!
//! - `0`: raw change bytes (u16-length-prefixed); every change that parses is signed by
//!   its author when the author is one of the test keys, so mutations reach the rules;
//! - `1`: raw snapshot bytes for an empty copy of the document (`ingest_snapshot`);
//! - `2`: a small program of automerge operations made as one of the test keys (or an
//!   outsider), committed and signed, then ingested: this is what reaches every rule;
//! - `3`: a wire frame handed to a `Replica` holding the documents, as the node does.
//!
//! Never panics, and whatever one document accepts, a fresh copy accepts from the
//! changes a peer would be sent, with the same heads (every peer decides the same).
#![no_main]

use std::sync::{Once, OnceLock};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{Automerge, Change, ObjId, ObjType, ReadDoc, Value, ROOT};
use cofab_protocol::model::{self, BidInput, DesignInput, OrderInput};
use cofab_protocol::wire::Frame;
use cofab_protocol::{Author, ChangeBatch, Clock, Document, EnterpriseId, Keypair, Replica, Role, Visibility};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_700_000_000_000;

struct World {
    keys: Vec<Keypair>,
    docs: Vec<Document>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let keys: Vec<Keypair> = (1..=4u8).map(|i| Keypair::from_secret([i; 32])).collect();
        let (buyer, s1, s2) = (&keys[0], &keys[1], &keys[2]);
        let input = OrderInput { title: "Shaft".into(), quantity: 100, visibility: Visibility::Public, ..Default::default() };
        let (mut order, _) = model::create_order(buyer, &input, NOW, 1).unwrap();
        for (s, p) in [(s1, 5.0), (s2, 6.0)] {
            let bid = BidInput { unit_price: p, currency: "EUR".into(), lead_time_days: 10, ..Default::default() };
            model::place_bid(&mut order, s, NOW, &bid).unwrap();
        }
        let d = DesignInput {
            title: "Housing".into(),
            description: "abc".into(),
            visibility: Visibility::Members,
            members: [(buyer.id(), Role::Editor), (s1.id(), Role::Approver)].into_iter().collect(),
        };
        let (design, _) = model::create_design(s2, &d, NOW, 2).unwrap();
        World { keys, docs: vec![order, design] }
    })
}

/// libfuzzer-sys aborts on every panic, even one caught on purpose: `Document` runs
/// automerge under `catch_unwind` and turns its panics into errors. Keep the default
/// hook quiet; a panic that escapes still fails the run (libfuzzer-sys catches it and aborts).
fn quiet_caught_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|_| {})));
}

/// The test key of an actor (in any incarnation), if it is one.
fn key_of(actor: &[u8]) -> Option<&'static Keypair> {
    let author = Author::from_actor(actor).ok()?;
    world().keys.iter().find(|k| k.id() == author.enterprise)
}

/// Signs every change whose author is a test key.
fn sign_all(doc: &Document, changes: &[Change]) -> Vec<(automerge::ChangeHash, [u8; 64])> {
    changes.iter().filter_map(|c| key_of(&c.actor_id().to_bytes()).map(|k| (c.hash(), k.sign_change(&doc.id(), &c.hash()).to_bytes()))).collect()
}

/// After an accepted ingest: a fresh copy accepts what a peer would be sent, with the same heads.
fn check_deterministic(doc: &Document) {
    let (batch, _, _) = doc.missing_for(&Clock::new(), usize::MAX);
    let mut fresh = Document::new(doc.signed_genesis().clone());
    if let Err(e) = fresh.ingest(batch) {
        panic!("a fresh copy refused what the document accepted: {e}");
    }
    assert_eq!(fresh.heads(), doc.heads(), "fresh copy has other heads");
    let _ = model::order_view(doc);
    let _ = model::design_view(doc);
}

struct Bytes<'a>(&'a [u8]);
impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

const STRINGS: [&str; 16] = [
    "open", "awarded", "in_production", "shipped", "closed", "cancelled", "draft", "owner", "supplier", "editor", "approver", "viewer", "removed", "EUR", "", "x",
];
const KEYS: [&str; 20] = [
    "bids", "status", "request", "award", "members", "progress", "discussion", "title", "description", "parameters", "releases",
    "comments", "calls", "bom", "attachments", "unit_price", "currency", "quantity", "submissions", "x",
];

/// Runs a tiny op program as `actor` on a copy of `base` and returns the change.
fn program(base: &Document, actor: &Keypair, message: String, r: &mut Bytes<'_>) -> Option<Change> {
    let mut am: Automerge = base.automerge().clone();
    am.set_actor(actor.author().actor());
    let ids: Vec<String> = world().keys.iter().map(|k| k.id().to_string()).collect();
    let mut tx = am.transaction();
    let mut objs: Vec<ObjId> = vec![ROOT];
    for _ in 0..16 {
        let Some(op) = r.u8() else { break };
        let obj = objs[(op as usize >> 4) % objs.len()].clone();
        let k = r.u8().unwrap_or(0) as usize;
        let key: String = if k >= 0xf0 { ids[k % ids.len()].clone() } else { KEYS[k % KEYS.len()].to_string() };
        let v = r.u8().unwrap_or(0);
        let is_list = matches!(tx.object_type(&obj), Ok(ObjType::List | ObjType::Text));
        let len = tx.length(&obj);
        let idx = if len == 0 { 0 } else { v as usize % (len + 1) };
        let _ = match op & 0x0f {
            0 if is_list => tx.insert(&obj, idx, STRINGS[v as usize % STRINGS.len()]).map(|_| ()),
            0 => tx.put(&obj, key.as_str(), STRINGS[v as usize % STRINGS.len()]),
            1 => tx.put(&obj, key.as_str(), v as i64 - 8),
            2 => tx.put(&obj, key.as_str(), v as f64 / 3.0),
            3 | 4 => {
                let t = if op & 0x0f == 3 { ObjType::Map } else { ObjType::List };
                let made = if is_list { tx.insert_object(&obj, idx, t) } else { tx.put_object(&obj, key.as_str(), t) };
                if let Ok(o) = made {
                    objs.push(o);
                }
                Ok(())
            }
            5 if is_list && len > 0 => tx.delete(&obj, idx.min(len - 1)),
            5 => tx.delete(&obj, key.as_str()),
            6 => {
                if let Ok(Some((Value::Object(_), o))) = tx.get(&obj, key.as_str()) {
                    objs.push(o);
                }
                Ok(())
            }
            7 if matches!(tx.object_type(&obj), Ok(ObjType::Text)) => tx.splice_text(&obj, idx.min(len), 0, "z").map(|_| ()),
            8 => tx.increment(&obj, key.as_str(), 1),
            _ => Ok(()),
        };
    }
    let (hash, _) = tx.commit_with(CommitOptions::default().with_message(message).with_time(NOW / 1000));
    hash?;
    am.get_last_local_change()
}

fuzz_target!(|data: &[u8]| {
    quiet_caught_panics();
    let w = world();
    let mut r = Bytes(data);
    let Some(head) = r.u8() else { return };
    let mut doc = w.docs[(head >> 2) as usize & 1].clone();
    match head & 3 {
        0 => {
            let mut changes = Vec::new();
            while r.0.len() >= 2 {
                let n = u16::from_be_bytes([r.u8().unwrap(), r.u8().unwrap()]) as usize;
                changes.push(r.take(n).to_vec());
            }
            let parsed: Vec<Change> = changes.iter().filter_map(|b| Change::from_bytes(b.clone()).ok()).collect();
            let sigs = sign_all(&doc, &parsed);
            if doc.ingest(ChangeBatch { changes, sigs }).is_ok() {
                check_deterministic(&doc);
            }
        }
        1 => {
            let mut empty = Document::new(doc.signed_genesis().clone());
            let sigs = match Automerge::load(r.0) {
                Ok(am) => sign_all(&doc, &am.get_changes(&[])),
                Err(_) => Vec::new(),
            };
            if empty.ingest_snapshot(r.0, sigs).is_ok() {
                check_deterministic(&empty);
            }
        }
        2 => {
            let who = r.u8().unwrap_or(0);
            // Bit 0x20: the author writes as its next incarnation.
            let actor = &w.keys[who as usize % 4].clone().with_incarnation(u32::from(who & 0x20 != 0));
            let message = if who & 0x40 != 0 { w.docs[1 - ((head >> 2) as usize & 1)].id().to_string() } else { doc.id().to_string() };
            let Some(change) = program(&doc, actor, message, &mut r) else { return };
            let signer = if who & 0x80 != 0 { &w.keys[(who as usize + 1) % 4] } else { actor };
            let sig = signer.sign_change(&doc.id(), &change.hash()).to_bytes();
            let batch = ChangeBatch { changes: vec![change.raw_bytes().to_vec()], sigs: vec![(change.hash(), sig)] };
            if doc.ingest(batch).is_ok() {
                check_deterministic(&doc);
            }
        }
        _ => {
            let Ok(Frame::Sync(msgs)) = Frame::decode(r.0) else { return };
            let from: EnterpriseId = w.keys[3].id();
            let mut replica = Replica::new(w.keys[(head >> 3) as usize % 3].clone());
            for d in &w.docs {
                replica.load(d.clone());
            }
            let _ = replica.peer_connected(from);
            for m in msgs {
                let _ = replica.receive(from, m, NOW);
            }
            for d in replica.docs() {
                if d.heads() != w.docs.iter().find(|x| x.id() == d.id()).map(|x| x.heads()).unwrap_or_default() && !d.is_empty() {
                    check_deterministic(d);
                }
            }
        }
    }
});
