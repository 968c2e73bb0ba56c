//! Property tests of the rules.
//!
//! (a) Whatever typed edits a peer manages to make locally (on concurrent copies), every
//!     other peer accepts them: local validation equals remote validation.
//! (b) Status moves made through `model::set_status` follow the lifecycle exactly.
//! (c) Printed ids round-trip, and a mistyped enterprise id is refused.

use std::collections::BTreeMap;

use cofab_protocol::document::Clock;
use cofab_protocol::model::{
    self, BidInput, CapacityInput, DesignInput, OrderInput, ProgressInput, Splice,
};
use cofab_protocol::rules::{status_transition_ok, STATUSES};
use cofab_protocol::{
    Author, ChangeBatch, DocId, Document, EnterpriseId, Keypair, Kind, Role, Visibility,
};
use proptest::prelude::*;

const NOW: i64 = 1_700_000_000_000;

fn keys() -> Vec<Keypair> {
    (1..=4u8).map(|n| Keypair::from_secret([n; 32])).collect()
}

/// A new document of `kind` owned by key 0; in a members document key 1 writes
/// (supplier / editor), key 2 is a viewer / approver, key 3 is not a member.
fn new_doc(kind: Kind, visibility: Visibility, ks: &[Keypair], nonce: u64) -> Document {
    let (r1, r2) = match kind {
        Kind::Order => (Role::Supplier, Role::Viewer),
        _ => (Role::Editor, Role::Approver),
    };
    let members: BTreeMap<EnterpriseId, Role> = if visibility == Visibility::Members {
        [(ks[1].id(), r1), (ks[2].id(), r2)].into_iter().collect()
    } else {
        BTreeMap::new()
    };
    match kind {
        Kind::Order => {
            let input = OrderInput {
                title: "Flange".into(),
                quantity: 100,
                visibility,
                members,
                ..Default::default()
            };
            model::create_order(&ks[0], &input, NOW, nonce).unwrap().0
        }
        Kind::Capacity => {
            let input = CapacityInput {
                name: "Shop".into(),
                ..Default::default()
            };
            model::create_capacity(&ks[0], &input, NOW, nonce)
                .unwrap()
                .0
        }
        Kind::Design => {
            let input = DesignInput {
                title: "Clip".into(),
                description: "hello".into(),
                visibility,
                members,
            };
            model::create_design(&ks[0], &input, NOW, nonce).unwrap().0
        }
    }
}

/// Applies one generated edit; the result (accepted or refused locally) is returned.
fn apply(doc: &mut Document, ks: &[Keypair], who: usize, action: u8, x: u16) -> bool {
    let kp = &ks[who];
    let now = NOW + x as i64;
    let res = match (doc.genesis().kind, action % 8) {
        (Kind::Order, 0) => {
            let bid = BidInput {
                unit_price: x as f64 / 8.0,
                currency: "EUR".into(),
                lead_time_days: 5,
                ..Default::default()
            };
            model::place_bid(doc, kp, now, &bid)
        }
        (Kind::Order, 1) => {
            let bidders: Vec<EnterpriseId> = model::order_view(doc)
                .map(|v| v.bids.keys().map(|k| k.parse().unwrap()).collect())
                .unwrap_or_default();
            let awards = bidders
                .into_iter()
                .take(1 + x as usize % 2)
                .map(|b| (b, 1 + x as u64 % 50))
                .collect();
            model::award(doc, kp, now, &awards)
        }
        (Kind::Order, 2) => model::set_status(doc, kp, now, STATUSES[x as usize % STATUSES.len()]),
        (Kind::Order, 3) => {
            let p = ProgressInput {
                produced: Some(x as u64),
                milestone: Some("m".into()),
                ..Default::default()
            };
            model::report_progress(doc, kp, now, &p)
        }
        (Kind::Order | Kind::Design, 4) => model::comment(doc, kp, now, "ok"),
        (Kind::Order | Kind::Design, 5) => {
            let who = ks[x as usize % ks.len()].id();
            let role = [
                None,
                Some(Role::Supplier),
                Some(Role::Viewer),
                Some(Role::Editor),
                Some(Role::Approver),
            ][x as usize % 5];
            model::set_member(doc, kp, now, who, role)
        }
        (Kind::Design, 0 | 1) => {
            let len = model::design_view(doc)
                .map(|v| v.description.chars().count())
                .unwrap_or(0);
            let pos = x as usize % (len + 1);
            let delete = if action % 2 == 1 {
                (len - pos).min(2)
            } else {
                0
            };
            model::splice_description(
                doc,
                kp,
                now,
                &Splice {
                    pos,
                    delete,
                    insert: "ab".into(),
                },
            )
        }
        (Kind::Design, 2) => {
            model::set_parameter(doc, kp, now, ["a", "b"][x as usize % 2], x as f64, "mm")
        }
        (Kind::Design, 3) => model::release(doc, kp, now, "rev"),
        (Kind::Capacity, _) => {
            let input = CapacityInput {
                name: format!("Shop {x}"),
                lead_time_days: Some(x as u32 % 90),
                ..Default::default()
            };
            model::update_capacity(doc, kp, now, &input)
        }
        _ => model::comment(doc, kp, now, "note"),
    };
    // An accepted edit that changed nothing (e.g. the status it already has) makes no change.
    res.is_ok_and(|a| !a.changes.is_empty())
}

/// Everything `doc` holds, as a peer would receive it from scratch.
fn everything(doc: &Document) -> ChangeBatch {
    ChangeBatch {
        changes: doc
            .automerge()
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect(),
        sigs: doc.signatures().map(|(h, s)| (*h, *s)).collect(),
    }
}

fn arb_kind() -> impl Strategy<Value = (Kind, Visibility)> {
    (
        prop_oneof![Just(Kind::Order), Just(Kind::Capacity), Just(Kind::Design)],
        any::<bool>(),
    )
        .prop_map(|(k, members)| {
            (
                k,
                if members && k != Kind::Capacity {
                    Visibility::Members
                } else {
                    Visibility::Public
                },
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Edits accepted locally on three concurrent copies are accepted by every peer: when
    /// copies sync with each other, and when a fresh peer ingests each copy from scratch.
    #[test]
    fn locally_accepted_edits_are_accepted_remotely(
        (kind, visibility) in arb_kind(),
        nonce in any::<u64>(),
        ops in proptest::collection::vec((0..4usize, 0..10u8, any::<u16>()), 1..40),
    ) {
        let ks = keys();
        let base = new_doc(kind, visibility, &ks, nonce);
        let mut copies = vec![base.clone(), base.clone(), base.clone()];
        let mut accepted = 0;
        for (who, action, x) in ops {
            // Each enterprise edits through one replica (keys 0 and 3 share copy 0).
            let copy = who % 3;
            if action >= 8 {
                // sync: copy `copy` receives what it lacks from another copy
                let from = (copy + 1 + x as usize % 2) % 3;
                let (batch, more, _) = copies[from].missing_for(&copies[copy].clock(), usize::MAX);
                prop_assert!(!more);
                let r = copies[copy].ingest(batch);
                prop_assert!(r.is_ok(), "sync {} -> {} refused: {:?}", from, copy, r.unwrap_err());
            } else if apply(&mut copies[copy], &ks, who, action, x) {
                accepted += 1;
            }
        }
        let mut merged = Document::new(base.signed_genesis().clone());
        for (i, c) in copies.iter().enumerate() {
            let mut fresh = Document::new(base.signed_genesis().clone());
            let r = fresh.ingest(everything(c));
            prop_assert!(r.is_ok(), "copy {} refused by a fresh peer: {:?}", i, r.unwrap_err());
            prop_assert_eq!(fresh.heads(), c.heads());
            let r = merged.ingest(everything(c));
            prop_assert!(r.is_ok(), "copy {} refused on merge: {:?}", i, r.unwrap_err());
        }
        let mut union = Clock::new();
        for c in &copies {
            for (a, n) in c.clock() {
                let e = union.entry(a).or_insert(0);
                *e = (*e).max(n);
            }
        }
        prop_assert_eq!(merged.clock(), union);
        prop_assert!(merged.change_count() > accepted.min(1));
    }

    /// `set_status` succeeds exactly when the move is on the lifecycle (or a no-op), and a
    /// refused move leaves the order as it was.
    #[test]
    fn status_moves_follow_the_lifecycle(
        draft in any::<bool>(),
        moves in proptest::collection::vec(prop_oneof![
            4 => proptest::sample::select(STATUSES.to_vec()).prop_map(String::from),
            1 => "[a-z_]{0,12}",
        ], 1..30),
    ) {
        let ks = keys();
        let input = OrderInput {
            title: "Pin".into(), quantity: 1,
            status: Some(if draft { "draft" } else { "open" }.into()),
            ..Default::default()
        };
        let (mut doc, _) = model::create_order(&ks[0], &input, NOW, 1).unwrap();
        for to in moves {
            let from = model::order_view(&doc).unwrap().status;
            let heads = doc.heads();
            // Writing the current value again is an empty edit, not a move.
            let allowed = STATUSES.contains(&to.as_str()) && (from == to || status_transition_ok(&from, &to));
            let res = model::set_status(&mut doc, &ks[0], NOW, &to);
            prop_assert_eq!(res.is_ok(), allowed, "{} -> {}: {:?}", from, to, res.err());
            let now = model::order_view(&doc).unwrap().status;
            if allowed {
                prop_assert_eq!(&now, &to);
            } else {
                prop_assert_eq!(&now, &from);
                prop_assert_eq!(doc.heads(), heads);
            }
            // Whatever the buyer managed, any other peer accepts.
            let mut fresh = Document::new(doc.signed_genesis().clone());
            prop_assert!(fresh.ingest(everything(&doc)).is_ok());
        }
        // Nobody but the buyer moves the status (writing the current value is a no-op).
        let current = model::order_view(&doc).unwrap().status;
        for to in STATUSES.iter().filter(|s| **s != current) {
            let before = doc.heads();
            prop_assert!(model::set_status(&mut doc, &ks[1], NOW, to).is_err());
            prop_assert_eq!(doc.heads(), before);
        }
    }

    /// Enterprise and document ids print and parse back to the same value.
    #[test]
    fn ids_round_trip(key in any::<[u8; 32]>(), doc in any::<[u8; 16]>(), incarnation in any::<u32>()) {
        let e = EnterpriseId(key);
        prop_assert_eq!(e.to_string().parse::<EnterpriseId>(), Ok(e));
        let d = DocId(doc);
        prop_assert_eq!(d.to_string().parse::<DocId>(), Ok(d));
        // An author's actor id reads back as the same author; incarnation 0 is the bare key
        // and has no second spelling.
        let a = Author { enterprise: e, incarnation };
        let actor = a.actor();
        prop_assert_eq!(Author::from_actor(actor.to_bytes()), Ok(a));
        prop_assert_eq!(actor.to_bytes().len(), if incarnation == 0 { 32 } else { 36 });
        let padded = [key.as_slice(), &[0, 0, 0, 0]].concat();
        prop_assert!(Author::from_actor(&padded).is_err());
        prop_assert!(Author::from_actor(&actor.to_bytes()[..31]).is_err());
    }

    /// Replacing any one character of a printed enterprise id with a different character
    /// (other than the same letter in another case, which reads the same) is refused.
    #[test]
    fn mistyped_enterprise_id_is_refused(key in any::<[u8; 32]>(), at in any::<proptest::sample::Index>(), c in any::<char>()) {
        let s = EnterpriseId(key).to_string();
        let mut chars: Vec<char> = s.chars().collect();
        let i = at.index(chars.len());
        prop_assume!(!c.eq_ignore_ascii_case(&chars[i]));
        chars[i] = c;
        let typo: String = chars.into_iter().collect();
        prop_assert!(typo.parse::<EnterpriseId>().is_err(), "{} accepted", typo);
    }
}
