//! Multi-node tests over the real node stack (libp2p on 127.0.0.1, sled in temp folders).

mod common;

use common::*;
use cofab_protocol::model::{self, OrderInput};
use cofab_protocol::Visibility;

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
    let id = nodes[0].handle().create(move |kp, now, nonce| model::create_order(kp, &input, now, nonce)).await.unwrap();
    wait_converged(&[&nodes[0], &nodes[1], &nodes[2]], id).await;
    let view = nodes[2].handle().read(move |c| c.replica.doc(&id).and_then(model::order_view)).await.unwrap().unwrap();
    assert_eq!(view.title, "Bracket, anodised aluminium");
    assert_eq!(view.owner, nodes[0].key.id().to_string());
    for n in nodes {
        n.handle().shutdown().await;
    }
}
