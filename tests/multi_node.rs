//! Multi-node tests over the real node stack (libp2p on 127.0.0.1, sled in temp folders).

mod common;

use cofab_protocol::model::{self, OrderInput};
use cofab_protocol::Visibility;
use common::*;

fn order(vis: Visibility) -> OrderInput {
    OrderInput {
        title: "Bracket, anodised aluminium".into(),
        quantity: 500,
        material: Some("AL6061-T6".into()),
        processes: vec!["cnc-milling".into()],
        due_date: Some("2027-03-01".into()),
        visibility: vis,
        ..Default::default()
    }
}

/// An order posted on one node reaches the two others with identical heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_on_a_public_order() {
    let nodes = start_net("three_nodes", 3).await;
    let input = order(Visibility::Public);
    let id = nodes[0]
        .handle()
        .create(move |kp, now, nonce| model::create_order(kp, &input, now, nonce))
        .await
        .unwrap();
    wait_converged(&[&nodes[0], &nodes[1], &nodes[2]], id).await;
    let view = nodes[2]
        .handle()
        .read(move |c| c.replica.doc(&id).and_then(model::order_view))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.title, "Bracket, anodised aluminium");
    assert_eq!(view.owner, nodes[0].key.id().to_string());
    for n in nodes {
        n.handle().shutdown().await;
    }
}

/// A node restarted from its data folder still has everything and resumes sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_keeps_everything_and_resumes_sync() {
    let mut nodes = start_net("restart", 2).await;
    let input = order(Visibility::Public);
    let id = nodes[0]
        .handle()
        .create(move |kp, now, nonce| model::create_order(kp, &input, now, nonce))
        .await
        .unwrap();
    wait_converged(&[&nodes[0], &nodes[1]], id).await;
    let before = heads(&nodes[1], id).await;
    let b = nodes.pop().unwrap();
    let b = restart(b).await;
    assert_eq!(heads(&b, id).await, before, "restart lost data");
    // The buyer changes the order while b is down... (b is back up now; reconnect and sync)
    nodes[0]
        .handle()
        .edit(id, |d, kp, now| {
            model::comment(d, kp, now, "drawing rev C attached")
        })
        .await
        .unwrap();
    connect(&b, &nodes[0]).await;
    wait_converged(&[&nodes[0], &b], id).await;
    let v = b
        .handle()
        .read(move |c| c.replica.doc(&id).and_then(model::order_view))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.discussion.len(), 1);
}

/// A non-member never receives a `members` order: checked on its store after shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_member_never_receives_members_order() {
    let nodes = start_net("privacy", 3).await;
    let mut input = order(Visibility::Members);
    input
        .members
        .insert(nodes[1].key.id(), cofab_protocol::Role::Supplier);
    let id = nodes[0]
        .handle()
        .create(move |kp, now, nonce| model::create_order(kp, &input, now, nonce))
        .await
        .unwrap();
    // A public order created after it, as a marker that sync has happened.
    let marker_input = order(Visibility::Public);
    let marker = nodes[0]
        .handle()
        .create(move |kp, now, nonce| model::create_order(kp, &marker_input, now, nonce))
        .await
        .unwrap();
    wait_converged(&[&nodes[0], &nodes[1]], id).await;
    wait_converged(&[&nodes[0], &nodes[1], &nodes[2]], marker).await;
    assert!(heads(&nodes[2], id).await.is_empty());
    let outsider = nodes.into_iter().nth(2).unwrap();
    outsider.handle().shutdown().await;
    let _ = outsider.node.task.await;
    let store = cofab_node::store::Store::open(&outsider.dir.path().join("store")).unwrap();
    let stored: Vec<_> = store
        .load_all()
        .unwrap()
        .into_iter()
        .map(|d| d.genesis.id())
        .collect();
    assert!(
        stored.contains(&marker),
        "the marker order should be stored"
    );
    assert!(
        !stored.contains(&id),
        "a members order reached a non-member's store"
    );
}

/// A node that was offline during edits catches up when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_node_catches_up() {
    let mut nodes = start_net("offline", 3).await;
    let input = model::DesignInput {
        title: "Housing".into(),
        description: "v1".into(),
        ..Default::default()
    };
    let id = create_design(&nodes[0], input).await;
    wait_converged(&[&nodes[0], &nodes[1], &nodes[2]], id).await;
    let c = stop(nodes.pop().unwrap()).await;
    for i in 0..200 {
        let s = model::Splice {
            pos: 2 + i,
            delete: 0,
            insert: "x".into(),
        };
        nodes[0]
            .handle()
            .edit(id, move |d, kp, now| {
                model::splice_description(d, kp, now, &s)
            })
            .await
            .unwrap();
    }
    let c = start_again(c).await;
    connect(&c, &nodes[1]).await;
    wait_converged(&[&nodes[0], &nodes[1], &c], id).await;
    let text = c
        .handle()
        .read(move |ctx| {
            ctx.replica
                .doc(&id)
                .and_then(model::design_view)
                .map(|d| d.description)
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(text.len(), 202);
}

/// Concurrent edits of one design on two nodes converge to the same text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_design_edits_converge() {
    let nodes = start_net("coedit", 2).await;
    let mut input = model::DesignInput {
        title: "Bracket".into(),
        description: "base".into(),
        ..Default::default()
    };
    input
        .members
        .insert(nodes[1].key.id(), cofab_protocol::Role::Editor);
    let id = create_design(&nodes[0], input).await;
    wait_converged(&[&nodes[0], &nodes[1]], id).await;
    let a = nodes[0].handle().clone();
    let b = nodes[1].handle().clone();
    let ta = tokio::spawn(async move {
        for _ in 0..50 {
            let s = model::Splice {
                pos: 0,
                delete: 0,
                insert: "A".into(),
            };
            a.edit(id, move |d, kp, now| {
                model::splice_description(d, kp, now, &s)
            })
            .await
            .unwrap();
        }
    });
    let tb = tokio::spawn(async move {
        for _ in 0..50 {
            let s = model::Splice {
                pos: 4,
                delete: 0,
                insert: "B".into(),
            };
            b.edit(id, move |d, kp, now| {
                model::splice_description(d, kp, now, &s)
            })
            .await
            .unwrap();
        }
    });
    ta.await.unwrap();
    tb.await.unwrap();
    wait_converged(&[&nodes[0], &nodes[1]], id).await;
    let ta = nodes[0]
        .handle()
        .read(move |c| {
            c.replica
                .doc(&id)
                .and_then(model::design_view)
                .map(|d| d.description)
        })
        .await
        .unwrap()
        .unwrap();
    let tb = nodes[1]
        .handle()
        .read(move |c| {
            c.replica
                .doc(&id)
                .and_then(model::design_view)
                .map(|d| d.description)
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ta, tb);
    assert_eq!(ta.matches('A').count(), 50);
    assert_eq!(ta.matches('B').count(), 50);
}

/// A design's attachment (a 3 MiB file) reaches another node byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_sync_between_nodes() {
    let nodes = start_net("attach", 2).await;
    let input = model::DesignInput {
        title: "Housing".into(),
        ..Default::default()
    };
    let id = create_design(&nodes[0], input).await;
    let file: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let f = file.clone();
    nodes[0]
        .handle()
        .edit(id, move |d, kp, now| {
            model::add_attachment(d, kp, now, "housing.step", "model/step", &f).map(|(_, acc)| acc)
        })
        .await
        .unwrap();
    wait_converged(&[&nodes[0], &nodes[1]], id).await;
    let got = nodes[1]
        .handle()
        .read(move |c| {
            let d = c.replica.doc(&id)?;
            let key = model::design_view(d)?.attachments.keys().next()?.clone();
            model::attachment_content(d, &key)
        })
        .await
        .unwrap()
        .expect("attachment reached node 1");
    assert_eq!(got.0, "model/step");
    assert!(got.1 == file, "attachment bytes differ");
}

/// A node returning after many documents changed gets them all: frames of many change
/// batches for distinct documents are verified on two threads before they are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_node_catches_up_on_many_documents() {
    let mut nodes = start_net("many", 2).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let input = OrderInput {
            title: format!("part {i}"),
            quantity: 10,
            visibility: Visibility::Public,
            ..Default::default()
        };
        ids.push(
            nodes[0]
                .handle()
                .create(move |kp, now, nonce| model::create_order(kp, &input, now, nonce))
                .await
                .unwrap(),
        );
    }
    for id in &ids {
        wait_converged(&[&nodes[0], &nodes[1]], *id).await;
    }
    let b = stop(nodes.pop().unwrap()).await;
    for id in &ids {
        for j in 0..3 {
            nodes[0]
                .handle()
                .edit(*id, move |d, kp, now| {
                    model::comment(d, kp, now, &format!("note {j}"))
                })
                .await
                .unwrap();
        }
    }
    let b = start_again(b).await;
    connect(&b, &nodes[0]).await;
    for id in &ids {
        wait_converged(&[&nodes[0], &b], *id).await;
    }
    let comments = b
        .handle()
        .read({
            let ids = ids.clone();
            move |c| {
                ids.iter()
                    .filter_map(|id| model::order_view(c.replica.doc(id)?))
                    .map(|v| v.discussion.len())
                    .sum::<usize>()
            }
        })
        .await
        .unwrap();
    assert_eq!(comments, 40 * 3);
}

/// Past `COMPACT_AFTER` incremental changes a node folds a document into a snapshot in
/// its store: after 5,000 typed characters the store holds a snapshot and fewer loose
/// changes than the mark, the restarted node has every change, and a fresh peer gets
/// the whole design.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_typed_design_is_compacted_in_the_store_and_survives_restart() {
    use cofab_protocol::model::{DesignInput, Splice};
    let mut nodes = start_net("compact", 1).await;
    let input = DesignInput {
        title: "long".into(),
        ..Default::default()
    };
    let id = create_design(&nodes[0], input).await;
    let typed = 5_000;
    for run in 0..typed / 1_000 {
        let splices: Vec<Splice> = (0..1_000)
            .map(|i| Splice {
                pos: run * 1_000 + i,
                delete: 0,
                insert: "k".into(),
            })
            .collect();
        nodes[0]
            .handle()
            .edit(id, move |d, kp, now| {
                model::splice_description_many(d, kp, now, &splices)
            })
            .await
            .unwrap();
    }
    let before = heads(&nodes[0], id).await;
    let node = stop(nodes.pop().unwrap()).await;
    {
        let store = cofab_node::store::Store::open(&node.dir.path().join("store")).unwrap();
        let stored = store.load_all().unwrap();
        let d = stored.iter().find(|s| s.genesis.id() == id).unwrap();
        assert!(d.snapshot.is_some(), "no snapshot after {typed} changes");
        assert!(
            d.changes.len() <= cofab_node::node::COMPACT_AFTER,
            "{} loose changes kept beside the snapshot",
            d.changes.len()
        );
    }
    let node = start_again(node).await;
    assert_eq!(heads(&node, id).await, before, "restart lost changes");
    let text = node
        .handle()
        .read(move |c| c.replica.doc(&id).and_then(model::design_view))
        .await
        .unwrap()
        .unwrap()
        .description;
    assert_eq!(text.len(), typed);
    let fresh = start("compact", 1).await;
    connect(&fresh, &node).await;
    wait_converged(&[&node, &fresh], id).await;
}
