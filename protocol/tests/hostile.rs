//! A hostile peer feeds crafted input to a replica. Every case is refused with its own
//! typed error, changes nothing the receiver holds, ends the session with that peer and
//! is reported as an `Output::Rejected`.
//!
//! Malicious changes are built with automerge directly: load the victim document's
//! changes, act as the attacker's actor, commit with the document id as message, sign.

use std::collections::BTreeMap;

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{ActorId, Automerge, Change, ObjId, ReadDoc, Value, ROOT};
use cofab_protocol::error::{DecodeError, IngestError, Rule, RuleViolation};
use cofab_protocol::model::{self, BidInput, OrderInput};
use cofab_protocol::sync::Output;
use cofab_protocol::wire::{Frame, Payload, SyncMessage, MAX_FRAME_BYTES, WIRE_VERSION};
use cofab_protocol::{
    ChangeBatch, Clock, DocId, Document, EnterpriseId, Keypair, Replica, Role, Visibility,
};

const NOW: i64 = 1_700_000_000_000;

fn kp(n: u8) -> Keypair {
    Keypair::from_secret([n; 32])
}

struct World {
    buyer: Keypair,
    s1: Keypair,
    s2: Keypair,
    receiver: Keypair,
    /// The order with the buyer's creation and both suppliers' bids.
    order: Document,
}

/// An open order by the buyer with bids from two suppliers.
fn world(visibility: Visibility) -> World {
    let (buyer, s1, s2, receiver) = (kp(1), kp(2), kp(3), kp(4));
    let members: BTreeMap<EnterpriseId, Role> = if visibility == Visibility::Members {
        [
            (s1.id(), Role::Supplier),
            (s2.id(), Role::Supplier),
            (receiver.id(), Role::Viewer),
        ]
        .into_iter()
        .collect()
    } else {
        BTreeMap::new()
    };
    let input = OrderInput {
        title: "Shaft".into(),
        quantity: 100,
        visibility,
        members,
        ..Default::default()
    };
    let (mut order, _) = model::create_order(&buyer, &input, NOW, 1).unwrap();
    for (s, p) in [(&s1, 5.0), (&s2, 6.0)] {
        let bid = BidInput {
            unit_price: p,
            currency: "EUR".into(),
            lead_time_days: 10,
            ..Default::default()
        };
        model::place_bid(&mut order, s, NOW, &bid).unwrap();
    }
    World {
        buyer,
        s1,
        s2,
        receiver,
        order,
    }
}

/// Builds a change as `actor` on top of everything `base` holds, with `message` as the
/// change message (an honest change carries its document id).
fn craft(
    base: &Document,
    actor: ActorId,
    message: &str,
    f: impl FnOnce(&mut Transaction<'_>),
) -> Change {
    let mut am = Automerge::new();
    am.apply_changes(base.automerge().get_changes(&[])).unwrap();
    am.set_actor(actor);
    let mut tx = am.transaction();
    f(&mut tx);
    let (hash, _) = tx.commit_with(CommitOptions::default().with_message(message.to_string()));
    assert!(hash.is_some(), "crafted change is empty");
    am.get_last_local_change().unwrap()
}

fn map(tx: &Transaction<'_>, obj: &ObjId, key: &str) -> ObjId {
    match tx.get(obj, key).unwrap() {
        Some((Value::Object(_), id)) => id,
        other => panic!("{key} is not an object: {other:?}"),
    }
}

/// A batch with the change signed by `signer` for document `doc`.
fn signed(change: &Change, signer: &Keypair, doc: &DocId) -> ChangeBatch {
    let sig = signer.sign_change(doc, &change.hash());
    ChangeBatch {
        changes: vec![change.raw_bytes().to_vec()],
        sigs: vec![(change.hash(), sig.to_bytes())],
    }
}

/// A receiver replica holding `doc`, connected to `peer`.
fn receiver_with(me: &Keypair, doc: &Document, peer: &Keypair) -> Replica {
    let mut r = Replica::new(me.clone());
    r.load(doc.clone());
    let _ = r.peer_connected(peer.id());
    r
}

/// What a local edit produced, as the batch a peer is sent.
fn batch_of(acc: cofab_protocol::Accepted) -> ChangeBatch {
    ChangeBatch {
        changes: acc.changes,
        sigs: acc.sigs,
    }
}

fn changes_msg(doc: DocId, batch: ChangeBatch) -> SyncMessage {
    SyncMessage {
        doc,
        genesis: None,
        clock: Clock::new(),
        heads: vec![],
        payload: Payload::Changes(batch),
        decline: false,
    }
}

/// Feeds `batch` from `from` to `rx`, asserts the rejection left everything as it was
/// and ended the session, and returns the error.
fn rejected(rx: &mut Replica, from: &Keypair, doc: DocId, batch: ChangeBatch) -> IngestError {
    let before = rx
        .doc(&doc)
        .map(|d| (d.heads(), d.clock(), d.change_count()));
    let outs = rx.receive(from.id(), changes_msg(doc, batch), NOW);
    let after = rx
        .doc(&doc)
        .map(|d| (d.heads(), d.clock(), d.change_count()));
    assert_eq!(
        before, after,
        "a refused batch changed the receiver's document"
    );
    assert!(
        !outs
            .iter()
            .any(|o| matches!(o, Output::Persist { .. } | Output::Updated { .. })),
        "a refused batch was persisted: {outs:?}"
    );
    let errors: Vec<&IngestError> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Rejected {
                from: f,
                doc: d,
                error,
            } if *f == from.id() && *d == doc => Some(error),
            _ => None,
        })
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "expected one Rejected output, got {outs:?}"
    );
    let error = errors[0].clone();
    if error.is_hostile() && error != IngestError::NotAllowed {
        assert!(
            rx.session(&from.id(), &doc).is_some_and(|s| s.failed),
            "session with the hostile peer not marked failed"
        );
        assert_eq!(rx.stats.rejected.get(error.reason()), Some(&1));
        // Further messages from that peer about that document are ignored.
        let again = rx.receive(
            from.id(),
            SyncMessage {
                payload: Payload::None,
                ..changes_msg(doc, ChangeBatch::default())
            },
            NOW,
        );
        assert!(again.is_empty(), "failed session still answered: {again:?}");
    }
    error
}

fn rule_of(e: &IngestError) -> &Rule {
    match e {
        IngestError::Rule(RuleViolation { rule, .. }) => rule,
        other => panic!("expected a rule violation, got {other:?}"),
    }
}

/// A bid whose signature was made with another enterprise's key is refused as forged, in
/// the author's first incarnation and in a later one (the key in the actor decides).
#[test]
fn forged_signature_is_refused() {
    for incarnation in [0, 3] {
        let w = world(Visibility::Public);
        let id = w.order.id();
        let hostile = kp(9).with_incarnation(incarnation);
        let c = craft(&w.order, hostile.author().actor(), &id.to_string(), |tx| {
            let bids = map(tx, &ROOT, "bids");
            let b = tx
                .put_object(&bids, hostile.id().to_string(), automerge::ObjType::Map)
                .unwrap();
            tx.put(&b, "unit_price", 1.0).unwrap();
        });
        // signed by someone else's key
        let mut rx = receiver_with(&w.receiver, &w.order, &hostile);
        let err = rejected(&mut rx, &hostile, id, signed(&c, &w.s1, &id));
        assert!(
            matches!(&err, IngestError::BadSignature { author, hash } if *author == hostile.author() && *hash == c.hash().to_string()),
            "{err:?}"
        );
        // and a correct signature with one bit flipped
        let mut batch = signed(&c, &hostile, &id);
        batch.sigs[0].1[7] ^= 1;
        let mut rx = receiver_with(&w.receiver, &w.order, &hostile);
        assert!(matches!(
            rejected(&mut rx, &hostile, id, batch),
            IngestError::BadSignature { .. }
        ));
        // while the correct signature is accepted
        let mut rx = receiver_with(&w.receiver, &w.order, &hostile);
        let outs = rx.receive(
            hostile.id(),
            changes_msg(id, signed(&c, &hostile, &id)),
            NOW,
        );
        assert!(
            outs.iter().any(|o| matches!(o, Output::Persist { .. })),
            "incarnation {incarnation}: {outs:?}"
        );
    }
}

/// A change whose actor id is not an author (a 32-byte enterprise key, or a key and a
/// non-zero 4-byte incarnation) is refused as unbound: a short id, and the key padded
/// with a zero incarnation (a second spelling of incarnation 0, which would let one
/// author run two chains).
#[test]
fn unbound_actor_is_refused() {
    let w = world(Visibility::Public);
    let id = w.order.id();
    let hostile = kp(9);
    let padded = [hostile.id().as_bytes().as_slice(), &[0, 0, 0, 0]].concat();
    for actor in [ActorId::from(&[0xab; 16][..]), ActorId::from(padded)] {
        let c = craft(&w.order, actor.clone(), &id.to_string(), |tx| {
            let d = map(tx, &ROOT, "discussion");
            tx.insert(&d, 0, "hi").unwrap();
        });
        let mut rx = receiver_with(&w.receiver, &w.order, &hostile);
        let err = rejected(&mut rx, &hostile, id, signed(&c, &hostile, &id));
        assert_eq!(err, IngestError::UnboundActor(actor.to_hex_string()));
    }
}

/// A change sent without any signature covering it is refused as unsigned.
#[test]
fn missing_signature_is_refused() {
    let w = world(Visibility::Public);
    let id = w.order.id();
    let hostile = kp(9);
    let c = craft(&w.order, hostile.author().actor(), &id.to_string(), |tx| {
        let d = map(tx, &ROOT, "discussion");
        let m = tx.insert_object(&d, 0, automerge::ObjType::Map).unwrap();
        tx.put(&m, "text", "unsigned").unwrap();
    });
    let mut rx = receiver_with(&w.receiver, &w.order, &hostile);
    let batch = ChangeBatch {
        changes: vec![c.raw_bytes().to_vec()],
        sigs: vec![],
    };
    let err = rejected(&mut rx, &hostile, id, batch);
    assert!(
        matches!(&err, IngestError::Unsigned { author, .. } if author.enterprise == hostile.id()),
        "{err:?}"
    );
}

/// A properly signed change by an enterprise that is not a member of a `members`
/// document is refused by the document rules (and by the replica before that).
#[test]
fn change_by_non_member_of_members_document_is_refused() {
    let w = world(Visibility::Members);
    let id = w.order.id();
    let outsider = kp(9);
    let c = craft(&w.order, outsider.author().actor(), &id.to_string(), |tx| {
        let d = map(tx, &ROOT, "discussion");
        let m = tx.insert_object(&d, 0, automerge::ObjType::Map).unwrap();
        tx.put(&m, "text", "let me in").unwrap();
    });
    let mut doc = w.order.clone();
    let (heads, clock) = (doc.heads(), doc.clock());
    let err = doc.ingest(signed(&c, &outsider, &id)).unwrap_err();
    assert_eq!(*rule_of(&err), Rule::NotMember, "{err:?}");
    assert!(matches!(&err, IngestError::Rule(v) if v.author == outsider.id()));
    assert_eq!((doc.heads(), doc.clock()), (heads, clock));
    // Through a replica the outsider is refused before its batch is even read.
    let mut rx = receiver_with(&w.receiver, &w.order, &outsider);
    assert_eq!(
        rejected(&mut rx, &outsider, id, signed(&c, &outsider, &id)),
        IngestError::NotAllowed
    );
}

/// A supplier writing into another supplier's bid is refused (OwnBidOnly).
#[test]
fn supplier_editing_another_suppliers_bid_is_refused() {
    let w = world(Visibility::Public);
    let id = w.order.id();
    let s2 = w.s2.id().to_string();
    let c = craft(&w.order, w.s1.author().actor(), &id.to_string(), |tx| {
        let bids = map(tx, &ROOT, "bids");
        let theirs = map(tx, &bids, &s2);
        tx.put(&theirs, "unit_price", 999.0).unwrap();
    });
    let mut rx = receiver_with(&w.receiver, &w.order, &w.s1);
    let err = rejected(&mut rx, &w.s1, id, signed(&c, &w.s1, &id));
    assert_eq!(*rule_of(&err), Rule::OwnBidOnly, "{err:?}");
}

/// A node checks a received change on a copy of the document made while it was idle
/// (`Replica::idle`). A refused change spoils neither the document nor the next check:
/// the copy it was applied to is thrown away, and the next honest change is checked on a
/// copy of what the receiver really holds.
#[test]
fn refused_change_on_the_idle_copy_spoils_nothing() {
    let w = world(Visibility::Public);
    let id = w.order.id();
    let mut rx = receiver_with(&w.receiver, &w.order, &w.s1);
    let _ = rx.peer_connected(w.s2.id());
    // s2's comment makes the order the receiver's most recently changed document; idle
    // copies it.
    let mut theirs = w.order.clone();
    let acc = model::comment(&mut theirs, &w.s2, NOW, "first").unwrap();
    let outs = rx.receive(w.s2.id(), changes_msg(id, batch_of(acc)), NOW);
    assert!(
        outs.iter().any(|o| matches!(o, Output::Updated { .. })),
        "{outs:?}"
    );
    rx.idle();
    // s1 writes into s2's bid: applied to the copy, then refused.
    let holding = rx.doc(&id).unwrap().clone();
    let s2 = w.s2.id().to_string();
    let bad = craft(&holding, w.s1.author().actor(), &id.to_string(), |tx| {
        let bids = map(tx, &ROOT, "bids");
        let bid = map(tx, &bids, &s2);
        tx.put(&bid, "unit_price", 999.0).unwrap();
    });
    let err = rejected(&mut rx, &w.s1, id, signed(&bad, &w.s1, &id));
    assert_eq!(*rule_of(&err), Rule::OwnBidOnly, "{err:?}");
    rx.idle();
    // s2's next comment is accepted, and the receiver holds exactly what s2 holds.
    let acc = model::comment(&mut theirs, &w.s2, NOW + 1, "second").unwrap();
    let outs = rx.receive(w.s2.id(), changes_msg(id, batch_of(acc)), NOW);
    assert!(
        outs.iter().any(|o| matches!(o, Output::Updated { .. })),
        "{outs:?}"
    );
    let held = rx.doc(&id).unwrap();
    assert_eq!(held.heads(), theirs.heads());
    assert!(held.automerge().get_change_by_hash(&bad.hash()).is_none());
    let bids = match held.automerge().get(ROOT, "bids").unwrap() {
        Some((Value::Object(_), o)) => o,
        other => panic!("bids: {other:?}"),
    };
    let bid = match held.automerge().get(&bids, &s2).unwrap() {
        Some((Value::Object(_), o)) => o,
        other => panic!("bid: {other:?}"),
    };
    let price = held
        .automerge()
        .get(&bid, "unit_price")
        .unwrap()
        .map(|(v, _)| v);
    assert_eq!(price, Some(Value::from(6.0)));
}

/// Runs each batch's signature checks on a thread of its own (as the node's offload does
/// on a standing thread).
struct ThreadOffload;

impl cofab_protocol::document::Offload for ThreadOffload {
    fn start(
        &self,
        checks: cofab_protocol::document::SigChecks,
    ) -> Box<dyn FnOnce() -> Result<(), IngestError> + '_> {
        let t = std::thread::spawn(move || checks.run());
        Box::new(move || t.join().expect("check thread"))
    }
}

/// With the signatures checked on another thread while the change is applied, a forged
/// signature is still refused as forged — also when the change breaks a rule as well
/// (the forgery is reported first, as without the offload) — and nothing is kept; an
/// honest change is accepted.
#[test]
fn offloaded_signature_checks_refuse_forgeries_first() {
    let w = world(Visibility::Public);
    let id = w.order.id();
    let s2 = w.s2.id().to_string();
    let with_offload = |peer: &Keypair| {
        let mut rx = receiver_with(&w.receiver, &w.order, peer);
        rx.set_offload(std::sync::Arc::new(ThreadOffload));
        rx
    };
    // Breaks a rule (writes into s2's bid) and is signed with another key.
    let bad = craft(&w.order, w.s1.author().actor(), &id.to_string(), |tx| {
        let bids = map(tx, &ROOT, "bids");
        let bid = map(tx, &bids, &s2);
        tx.put(&bid, "unit_price", 999.0).unwrap();
    });
    let mut rx = with_offload(&w.s1);
    let err = rejected(&mut rx, &w.s1, id, signed(&bad, &w.s2, &id));
    assert!(matches!(err, IngestError::BadSignature { .. }), "{err:?}");
    // Signed correctly, the same change is refused for the rule it breaks.
    let mut rx = with_offload(&w.s1);
    let err = rejected(&mut rx, &w.s1, id, signed(&bad, &w.s1, &id));
    assert_eq!(*rule_of(&err), Rule::OwnBidOnly, "{err:?}");
    // An honest comment, forged and then properly signed.
    let mut theirs = w.order.clone();
    let acc = model::comment(&mut theirs, &w.s2, NOW, "hello").unwrap();
    let honest = batch_of(acc);
    let mut forged = honest.clone();
    forged.sigs[0].1[0] ^= 1;
    let mut rx = with_offload(&w.s2);
    let err = rejected(&mut rx, &w.s2, id, forged);
    assert!(matches!(err, IngestError::BadSignature { .. }), "{err:?}");
    let mut rx = with_offload(&w.s2);
    let outs = rx.receive(w.s2.id(), changes_msg(id, honest), NOW);
    assert!(
        outs.iter().any(|o| matches!(o, Output::Updated { .. })),
        "{outs:?}"
    );
    assert_eq!(rx.doc(&id).unwrap().heads(), theirs.heads());
}

/// The buyer moving the status from open straight to shipped is refused.
#[test]
fn status_skipping_a_step_is_refused() {
    let w = world(Visibility::Public);
    let id = w.order.id();
    let c = craft(&w.order, w.buyer.author().actor(), &id.to_string(), |tx| {
        tx.put(ROOT, "status", "shipped").unwrap();
    });
    let mut rx = receiver_with(&w.receiver, &w.order, &w.buyer);
    let err = rejected(&mut rx, &w.buyer, id, signed(&c, &w.buyer, &id));
    assert_eq!(
        *rule_of(&err),
        Rule::StatusTransition {
            from: "open".into(),
            to: "shipped".into()
        }
    );
}

/// A member that is not the owner changing membership is refused.
#[test]
fn membership_change_by_non_owner_is_refused() {
    let w = world(Visibility::Members);
    let id = w.order.id();
    let friend = kp(9).id().to_string();
    let c = craft(&w.order, w.s1.author().actor(), &id.to_string(), |tx| {
        let m = map(tx, &ROOT, "members");
        tx.put(&m, friend.as_str(), "supplier").unwrap();
    });
    let mut rx = receiver_with(&w.receiver, &w.order, &w.s1);
    let err = rejected(&mut rx, &w.s1, id, signed(&c, &w.s1, &id));
    assert_eq!(*rule_of(&err), Rule::MembershipOwnerOnly, "{err:?}");
}

/// A genuine, correctly signed change of one order replayed into another is refused.
#[test]
fn change_replayed_from_another_document_is_refused() {
    let w = world(Visibility::Public);
    let input = OrderInput {
        title: "Other".into(),
        quantity: 5,
        ..Default::default()
    };
    let (mut other_order, _) = model::create_order(&w.buyer, &input, NOW, 2).unwrap();
    assert_ne!(other_order.id(), w.order.id());
    let bid = BidInput {
        unit_price: 1.0,
        currency: "EUR".into(),
        lead_time_days: 3,
        ..Default::default()
    };
    let acc = model::place_bid(&mut other_order, &w.s1, NOW, &bid).unwrap();
    let batch = ChangeBatch {
        changes: acc.changes.clone(),
        sigs: acc.sigs.clone(),
    };
    let hash = acc.sigs[0].0;
    let mut rx = receiver_with(&w.receiver, &w.order, &w.s1);
    let err = rejected(&mut rx, &w.s1, w.order.id(), batch);
    assert_eq!(
        err,
        IngestError::WrongDocument {
            hash: hash.to_string()
        }
    );
}

/// A change whose sequence number jumps ahead although the receiver holds all its
/// dependencies can only be forged: refused as a seq gap.
#[test]
fn forged_sequence_gap_is_refused() {
    let w = world(Visibility::Public);
    let id = w.order.id();
    let hostile = kp(9);
    let honest = craft(&w.order, hostile.author().actor(), &id.to_string(), |tx| {
        let d = map(tx, &ROOT, "discussion");
        tx.insert(&d, 0, "x").unwrap();
    });
    // Same change, renumbered as the author's third, deps unchanged (all held by the receiver).
    let mut expanded = honest.decode();
    assert_eq!(expanded.seq, 1);
    expanded.seq = 3;
    let forged = Change::from(expanded);
    assert!(forged
        .deps()
        .iter()
        .all(|d| w.order.automerge().get_change_by_hash(d).is_some()));
    let mut rx = receiver_with(&w.receiver, &w.order, &hostile);
    let err = rejected(&mut rx, &hostile, id, signed(&forged, &hostile, &id));
    assert_eq!(
        err,
        IngestError::SeqGap {
            author: hostile.author(),
            have: 0,
            got: 3
        }
    );
}

/// An honest change that overtook its author's previous change (reordering or loss)
/// is a resync, not an attack: refused for missing deps, the session stays open and
/// the change is accepted once its predecessor arrives.
#[test]
fn change_overtaking_its_predecessor_is_a_resync_not_an_attack() {
    let w = world(Visibility::Public);
    let id = w.order.id();
    let mut sender = w.order.clone();
    let first = model::comment(&mut sender, &w.s1, NOW, "one").unwrap();
    let second = model::comment(&mut sender, &w.s1, NOW, "two").unwrap();
    let mut rx = receiver_with(&w.receiver, &w.order, &w.s1);
    let before = rx.doc(&id).unwrap().heads();
    let outs = rx.receive(
        w.s1.id(),
        changes_msg(
            id,
            ChangeBatch {
                changes: second.changes.clone(),
                sigs: second.sigs.clone(),
            },
        ),
        NOW,
    );
    assert!(
        !outs
            .iter()
            .any(|o| matches!(o, Output::Rejected { .. } | Output::Persist { .. })),
        "{outs:?}"
    );
    assert_eq!(rx.doc(&id).unwrap().heads(), before);
    assert!(!rx.session(&w.s1.id(), &id).unwrap().failed);
    let mut both = first.changes.clone();
    both.extend(second.changes.clone());
    let mut sigs = first.sigs.clone();
    sigs.extend(second.sigs.clone());
    let outs = rx.receive(
        w.s1.id(),
        changes_msg(
            id,
            ChangeBatch {
                changes: both,
                sigs,
            },
        ),
        NOW,
    );
    assert!(
        outs.iter().any(|o| matches!(o, Output::Persist { .. })),
        "{outs:?}"
    );
    assert_eq!(rx.doc(&id).unwrap().heads(), sender.heads());
}

/// A frame larger than the limit is refused before it is read.
#[test]
fn oversized_frame_is_refused() {
    let big = vec![WIRE_VERSION; MAX_FRAME_BYTES + 1];
    assert_eq!(
        Frame::decode(&big),
        Err(DecodeError::TooLarge {
            len: MAX_FRAME_BYTES + 1,
            max: MAX_FRAME_BYTES
        })
    );
}

/// Every strict prefix of a valid frame is refused as truncated (or empty).
#[test]
fn truncated_frames_are_refused() {
    let w = world(Visibility::Public);
    let (bytes, sigs) = w.order.snapshot();
    let msg = SyncMessage {
        doc: w.order.id(),
        genesis: Some((
            w.order.signed_genesis().bytes().to_vec(),
            w.order.signed_genesis().signature(),
        )),
        clock: w.order.clock(),
        heads: w.order.heads(),
        payload: Payload::Snapshot { bytes, sigs },
        decline: false,
    };
    let frame = Frame::Sync(vec![msg]).encode();
    assert!(Frame::decode(&frame).is_ok());
    assert_eq!(Frame::decode(&frame[..0]), Err(DecodeError::Empty));
    for n in 1..frame.len() {
        assert_eq!(
            Frame::decode(&frame[..n]),
            Err(DecodeError::Truncated),
            "prefix of {n} bytes"
        );
    }
}

/// Bytes that are not a cofab frame get a typed error, never a panic.
#[test]
fn garbage_frames_are_refused() {
    assert_eq!(
        Frame::decode(b"GET / HTTP/1.1\r\n\r\n"),
        Err(DecodeError::UnknownVersion(b'G'))
    );
    assert_eq!(
        Frame::decode(&[WIRE_VERSION, 0xee]),
        Err(DecodeError::UnknownType(0xee))
    );
    // a sync message with undefined flag bits
    let mut bad_flags = vec![WIRE_VERSION, 1, 1];
    bad_flags.extend_from_slice(&[0u8; 16]);
    bad_flags.extend_from_slice(&[0x80, 0, 0]);
    assert_eq!(
        Frame::decode(&bad_flags),
        Err(DecodeError::Invalid("flags"))
    );
    // a declared length far beyond the bytes present
    let mut lying = vec![WIRE_VERSION, 1, 1];
    lying.extend_from_slice(&[0u8; 16]);
    lying.push(1); // genesis flag
    lying.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert_eq!(Frame::decode(&lying), Err(DecodeError::Truncated));
    // pseudo-random bytes behind a valid header: an error, not a panic
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for len in 0..300usize {
        let mut g = vec![WIRE_VERSION, 1];
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            g.push(x as u8);
        }
        let _ = Frame::decode(&g);
    }
}

/// A frame of a wire version this build does not speak is refused by version.
#[test]
fn unknown_wire_version_is_refused() {
    let mut f = Frame::Sync(vec![]).encode();
    f[0] = WIRE_VERSION + 1;
    assert_eq!(
        Frame::decode(&f),
        Err(DecodeError::UnknownVersion(WIRE_VERSION + 1))
    );
}

/// The path the node uses for large frames (`Replica::prepare` on several threads, then
/// `receive_prepared` in order): a forged genesis and a forged change signature are
/// refused with the same errors as on the one-by-one path, and the honest messages taken.
#[test]
fn prepared_messages_refuse_exactly_the_forged_signatures() {
    use cofab_protocol::GenesisError;
    let w = world(Visibility::Public);
    let hostile = kp(9);
    // Three new public orders by the hostile peer, greeted with their genesis and changes;
    // the second carries the third's genesis signature.
    let mut docs = Vec::new();
    let mut msgs = Vec::new();
    for i in 0..3u64 {
        let input = OrderInput {
            title: format!("frame {i}"),
            quantity: 1,
            ..Default::default()
        };
        let (d, acc) = model::create_order(&hostile, &input, NOW, 100 + i).unwrap();
        msgs.push(SyncMessage {
            doc: d.id(),
            genesis: Some((
                d.signed_genesis().bytes().to_vec(),
                d.signed_genesis().signature(),
            )),
            clock: d.clock(),
            heads: d.heads(),
            payload: Payload::Changes(ChangeBatch {
                changes: acc.changes,
                sigs: acc.sigs,
            }),
            decline: false,
        });
        docs.push(d);
    }
    let third = msgs[2].genesis.as_ref().unwrap().1;
    msgs[1].genesis.as_mut().unwrap().1 = third;
    // A comment on the order the receiver holds, signed by someone else's key.
    let mut order = w.order.clone();
    let acc = model::comment(&mut order, &hostile, NOW, "forged").unwrap();
    let h = acc.sigs[0].0;
    msgs.push(changes_msg(
        w.order.id(),
        ChangeBatch {
            changes: acc.changes,
            sigs: vec![(h, w.s1.sign_change(&w.order.id(), &h).to_bytes())],
        },
    ));

    let mut rx = receiver_with(&w.receiver, &w.order, &hostile);
    let prepared: Vec<_> = msgs.iter().map(|m| rx.prepare(m, true)).collect();
    let mut errors = Vec::new();
    for (m, p) in msgs.into_iter().zip(prepared) {
        for o in rx.receive_prepared(hostile.id(), m, NOW, p) {
            if let Output::Rejected { error, .. } = o {
                errors.push(error);
            }
        }
    }
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0], IngestError::Genesis(GenesisError::BadSignature));
    assert!(
        matches!(&errors[1], IngestError::BadSignature { author, .. } if author.enterprise == hostile.id())
    );
    assert!(rx
        .doc(&docs[0].id())
        .is_some_and(|d| d.heads() == docs[0].heads()));
    assert!(
        rx.doc(&docs[1].id()).is_none(),
        "the forged genesis is held"
    );
    assert!(rx
        .doc(&docs[2].id())
        .is_some_and(|d| d.heads() == docs[2].heads()));
    assert_eq!(rx.doc(&w.order.id()).unwrap().heads(), w.order.heads());
}
