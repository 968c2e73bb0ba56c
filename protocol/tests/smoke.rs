//! Two and three replicas in the simulator: the basic flows end to end.

use cofab_protocol::model::{self, BidInput, OrderInput};
use cofab_protocol::sim::{Faults, SimNetwork};
use cofab_protocol::{DocId, Visibility};

fn order() -> OrderInput {
    OrderInput {
        title: "Bracket, anodised aluminium".into(),
        quantity: 500,
        material: Some("AL6061-T6".into()),
        processes: vec!["cnc-milling".into()],
        due_date: Some("2027-03-01".into()),
        visibility: Visibility::Public,
        ..Default::default()
    }
}

#[test]
fn order_bid_award_progress_flow() {
    let mut net = SimNetwork::new(1, Faults::default());
    let buyer = net.add_node();
    let s1 = net.add_node();
    let s2 = net.add_node();
    let id: DocId = net.act(buyer, |r, now| {
        let (doc, acc) = model::create_order(r.keypair(), &order(), now, 7).unwrap();
        let id = doc.id();
        (id, r.create(doc, acc))
    });
    net.run_until_quiescent(10_000);
    for n in [s1, s2] {
        let v = model::order_view(
            net.nodes[n]
                .replica
                .doc(&id)
                .expect("order reached supplier"),
        )
        .unwrap();
        assert_eq!(v.title, "Bracket, anodised aluminium");
        assert_eq!(v.status, "open");
    }
    for (n, price) in [(s1, 4.2), (s2, 3.9)] {
        net.act(n, |r, now| {
            let bid = BidInput {
                unit_price: price,
                currency: "EUR".into(),
                lead_time_days: 20,
                ..Default::default()
            };
            r.edit(&id, now, |d, kp, now| model::place_bid(d, kp, now, &bid))
                .unwrap()
        });
    }
    net.run_until_quiescent(10_000);
    let s2id = net.id(s2);
    net.act(buyer, |r, now| {
        let awards = [(s2id, 500u64)].into_iter().collect();
        r.edit(&id, now, |d, kp, now| model::award(d, kp, now, &awards))
            .unwrap()
    });
    net.run_until_quiescent(10_000);
    // s1 was not awarded: its progress report is refused locally
    let err = net.act(s1, |r, now| {
        let p = model::ProgressInput {
            produced: Some(10),
            ..Default::default()
        };
        (
            r.edit(&id, now, |d, kp, now| {
                model::report_progress(d, kp, now, &p)
            })
            .unwrap_err(),
            vec![],
        )
    });
    assert!(err.to_string().contains("awarded"), "{err}");
    net.act(s2, |r, now| {
        let p = model::ProgressInput {
            produced: Some(120),
            milestone: Some("first article approved".into()),
            ..Default::default()
        };
        r.edit(&id, now, |d, kp, now| {
            model::report_progress(d, kp, now, &p)
        })
        .unwrap()
    });
    net.run_until_quiescent(10_000);
    let views: Vec<_> = (0..3)
        .map(|n| model::order_view(net.nodes[n].replica.doc(&id).unwrap()).unwrap())
        .collect();
    assert_eq!(views[0], views[1]);
    assert_eq!(views[0], views[2]);
    assert_eq!(views[0].status, "awarded");
    assert_eq!(views[0].bids.len(), 2);
    assert_eq!(views[0].progress[&s2id.to_string()].produced, Some(120));
    assert!(net.rejections.is_empty(), "{:?}", net.rejections);
}

#[test]
fn large_design_syncs_by_snapshot_and_restart_keeps_it() {
    let mut net = SimNetwork::new(2, Faults::default());
    let a = net.add_node();
    let b = net.add_node();
    net.crash(b);
    let id = net.act(a, |r, now| {
        let (doc, acc) = model::create_design(
            r.keypair(),
            &model::DesignInput {
                title: "Housing".into(),
                ..Default::default()
            },
            now,
            1,
        )
        .unwrap();
        let id = doc.id();
        (id, r.create(doc, acc))
    });
    for i in 0..3000 {
        net.act(a, |r, now| {
            let s = model::Splice {
                pos: i,
                delete: 0,
                insert: "x".into(),
            };
            r.edit(&id, now, |d, kp, now| {
                model::splice_description(d, kp, now, &s)
            })
            .unwrap()
        });
    }
    net.restart(b);
    net.run_until_quiescent(10_000);
    let vb = model::design_view(net.nodes[b].replica.doc(&id).unwrap()).unwrap();
    assert_eq!(vb.description.len(), 3000);
    net.crash(b);
    net.restart(b);
    let vb2 = model::design_view(net.nodes[b].replica.doc(&id).unwrap()).unwrap();
    assert_eq!(vb, vb2);
}

/// A run of splices is one change per splice with one signature for the run (plus
/// checkpoints); a fresh peer verifies it through the hash chain; a bad splice in the
/// middle refuses the whole run and leaves the document as it was.
#[test]
fn spliced_runs_are_signed_once_and_verified_by_peers() {
    use cofab_protocol::model::{DesignInput, Splice};
    use cofab_protocol::{Document, Keypair};
    let kp = Keypair::from_secret([9; 32]);
    let input = DesignInput {
        title: "run".into(),
        ..Default::default()
    };
    let (mut doc, _) = model::create_design(&kp, &input, 0, 1).unwrap();
    let splices: Vec<Splice> = (0..1500)
        .map(|i| Splice {
            pos: i,
            delete: 0,
            insert: "x".into(),
        })
        .collect();
    let acc = model::splice_description_many(&mut doc, &kp, 0, &splices).unwrap();
    assert_eq!(acc.changes.len(), 1500);
    // The genesis change is seq 1, so the run holds seq 2..=1501: the checkpoint at
    // seq 1024 and the run's last change are signed, nothing else.
    assert_eq!(
        acc.sigs.len(),
        2,
        "one signature for the run plus one checkpoint"
    );
    assert_eq!(model::design_view(&doc).unwrap().description.len(), 1500);

    let mut peer = Document::new(doc.signed_genesis().clone());
    let batch = doc.missing_for(&Default::default(), usize::MAX).0;
    peer.ingest(batch).expect("a peer accepts the run");
    assert_eq!(peer.heads(), doc.heads());

    // Tamper: drop the run's signatures and the peer refuses it.
    let mut unsigned = doc.missing_for(&Default::default(), usize::MAX).0;
    unsigned.sigs.clear();
    let mut peer2 = Document::new(doc.signed_genesis().clone());
    assert!(peer2.ingest(unsigned).is_err());

    let heads = doc.heads();
    let bad = vec![
        Splice {
            pos: 0,
            delete: 0,
            insert: "y".into(),
        },
        Splice {
            pos: 999_999,
            delete: 0,
            insert: "z".into(),
        },
    ];
    let err = model::splice_description_many(&mut doc, &kp, 0, &bad).unwrap_err();
    assert!(err.to_string().contains("splice 1"), "{err}");
    assert_eq!(doc.heads(), heads, "a refused run leaves nothing behind");
    assert_eq!(model::design_view(&doc).unwrap().description.len(), 1500);
}

/// In a full mesh larger than the forwarding fan-out, a new order reaches everyone
/// straight from its creator; the peers pass it on to at most `FORWARD_FANOUT` others
/// each (forwarding to all would be O(peers²) frames), and the rotating repair ticks
/// still bring every session up to date, so a later edit reaches everyone too.
#[test]
fn dense_mesh_forwarding_is_bounded_and_everyone_gets_order_and_edit() {
    use cofab_protocol::sync::FORWARD_FANOUT;
    const N: usize = 20;
    let mut net = SimNetwork::new(9, Faults::default());
    for _ in 0..N {
        net.add_node();
    }
    let id = net.act(0, |r, now| {
        let (doc, acc) = model::create_order(r.keypair(), &order(), now, 1).unwrap();
        (doc.id(), r.create(doc, acc))
    });
    // Deliver what the creation set off, with no repair tick.
    while net.step() {}
    let peers = (N - 1) as u64;
    let frames = net.delivered;
    // The creator's frames and their answers, plus each peer's forwards and their answers
    // (with room for peers that got a forward first and forwarded it again). Forwarding
    // to every peer would be about 2·peers² = 722 frames.
    let bound = peers * 2 + peers * 3 * FORWARD_FANOUT as u64;
    assert!(
        frames <= bound,
        "{frames} frames for one order (bound {bound})"
    );
    for i in 0..N {
        assert!(
            net.nodes[i].replica.doc(&id).is_some(),
            "node {i} lacks the order"
        );
    }
    net.run_until_quiescent(100_000);
    net.act(7, |r, now| {
        r.edit(&id, now, |d, kp, now| {
            model::comment(d, kp, now, "can do 500 by March")
        })
        .unwrap()
    });
    net.run_until_quiescent(100_000);
    let heads = net.nodes[7].replica.doc(&id).unwrap().heads();
    for i in 0..N {
        assert_eq!(
            net.nodes[i].replica.doc(&id).unwrap().heads(),
            heads,
            "node {i}"
        );
    }
    assert!(net.rejections.is_empty(), "{:?}", net.rejections);
}

/// With more peers than one tick visits, the ticks take the peers in turn, so a lost
/// message between two peers that sort last is still repaired: a members design of just
/// those two, an edit whose only message is dropped, and nothing else (no forwarder, no
/// reconnect) that could bring it over but the owner's tick reaching the other member.
#[test]
fn ticks_reach_every_peer_in_turn_and_repair_a_lost_message() {
    use cofab_protocol::model::DesignInput;
    use cofab_protocol::sync::TICK_PEERS;
    use cofab_protocol::Role;
    const N: usize = TICK_PEERS + 4;
    let mut net = SimNetwork::new(13, Faults::default());
    for _ in 0..N {
        net.add_node();
    }
    let mut by_id: Vec<usize> = (0..N).collect();
    by_id.sort_by_key(|i| net.id(*i));
    let (owner, member) = (by_id[N - 1], by_id[N - 2]);
    let member_id = net.id(member);
    let id = net.act(owner, |r, now| {
        let input = DesignInput {
            title: "Bracket, rev B".into(),
            visibility: Visibility::Members,
            members: [(member_id, Role::Editor)].into_iter().collect(),
            ..Default::default()
        };
        let (doc, acc) = model::create_design(r.keypair(), &input, now, 1).unwrap();
        (doc.id(), r.create(doc, acc))
    });
    net.run_until_quiescent(100_000);
    assert!(net.nodes[member].replica.doc(&id).is_some());
    net.faults.drop = 1.0;
    net.act(owner, |r, now| {
        let s = model::Splice {
            pos: 0,
            delete: 0,
            insert: "drawing 42".into(),
        };
        r.edit(&id, now, |d, kp, now| {
            model::splice_description(d, kp, now, &s)
        })
        .unwrap()
    });
    while net.step() {}
    net.faults.drop = 0.0;
    net.run_until_quiescent(100_000);
    assert_eq!(
        net.nodes[member].replica.doc(&id).unwrap().heads(),
        net.nodes[owner].replica.doc(&id).unwrap().heads(),
        "the dropped edit never reached the other member"
    );
    for i in 0..N {
        if i != owner && i != member {
            assert!(
                net.nodes[i].replica.doc(&id).is_none(),
                "node {i} got the design"
            );
        }
    }
}

/// A node sends its own change before the change is durable; if it then crashes and
/// loses the change, it starts as a new incarnation (a new automerge actor under the
/// same key). Its next change must not contradict the lost one: the peer accepts it,
/// gives the lost change back, and both end with both comments by the same enterprise.
/// Written under the old incarnation, the same next change is refused as a forked chain
/// — the fork the incarnation exists to prevent.
#[test]
fn a_change_lost_in_a_crash_after_it_was_sent_comes_back_and_the_next_incarnation_does_not_fork() {
    use cofab_protocol::document::Clock;
    use cofab_protocol::{Document, IngestError, Keypair};
    let buyer = Keypair::from_secret([1; 32]);
    let (mut a, acc) = model::create_order(&buyer, &order(), 1_000, 7).unwrap();
    let mut b = Document::new(a.signed_genesis().clone());
    b.ingest(a.missing_for(&Clock::new(), usize::MAX).0)
        .unwrap();
    assert!(!acc.is_empty());

    // A's durable state: the order as created. Then a comment leaves for B, and A crashes
    // before the comment's write completes.
    let durable = a.clone();
    let before = b.clock();
    model::comment(&mut a, &buyer, 2_000, "sent, then lost").unwrap();
    b.ingest(a.missing_for(&before, usize::MAX).0).unwrap();
    let mut a = durable;

    // The same incarnation would re-use the lost change's seq with different content.
    let mut forked = a.clone();
    model::comment(&mut forked, &buyer, 3_000, "after restart").unwrap();
    let err = b
        .ingest(forked.missing_for(&a.clock(), usize::MAX).0)
        .unwrap_err();
    assert!(
        matches!(err, IngestError::ForkedChain { seq: 2, .. }),
        "{err}"
    );

    // The next incarnation does not: B accepts its change and gives the lost one back.
    let restarted = buyer.clone().with_incarnation(1);
    let a_before = a.clock();
    model::comment(&mut a, &restarted, 3_000, "after restart").unwrap();
    b.ingest(a.missing_for(&a_before, usize::MAX).0).unwrap();
    a.ingest(b.missing_for(&a.clock(), usize::MAX).0).unwrap();
    assert_eq!(a.heads().len(), b.heads().len());
    assert_eq!(
        a.heads()
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>(),
        b.heads()
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
    );
    assert_eq!(a.clock(), b.clock());
    assert_eq!(a.clock().len(), 2, "two authors: incarnations 0 and 1");
    assert!(a.clock().keys().all(|k| k.enterprise == buyer.id()));
    for d in [&a, &b] {
        let v = model::order_view(d).unwrap();
        let mut texts: Vec<&str> = v.discussion.iter().map(|c| c.text.as_str()).collect();
        texts.sort();
        assert_eq!(texts, ["after restart", "sent, then lost"]);
        assert!(v
            .discussion
            .iter()
            .all(|c| c.author == buyer.id().to_string()));
    }
}
