//! Two companies on two nodes in one process, through the Rust API (`NodeHandle`):
//! a buyer posts a public order, a supplier's node receives it and bids, the buyer's
//! node receives the signed bid and awards it, and both nodes end with the same order.
//!
//! Run: `cargo run --release -p cofab-suite --example order_bid_award`
//!
//! Everything binds to 127.0.0.1 and lives in temporary folders; nothing is left behind.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cofab_node::node::{Node, NodeConfig, NodeHandle};
use cofab_protocol::model::{self, BidInput, OrderInput};
use cofab_protocol::{DocId, Keypair, Visibility};

async fn start(name: &str, dir: &tempfile::TempDir) -> Node {
    let mut seed = [0u8; 32];
    seed[..name.len()].copy_from_slice(name.as_bytes());
    let mut cfg = NodeConfig::new(Keypair::from_secret(seed), name, dir.path().join(name));
    cfg.mdns = false;
    Node::start(cfg).await.expect("node starts")
}

/// Waits until `check` holds on `node`'s view of `order` (10 s at most).
async fn until(
    node: &NodeHandle,
    order: DocId,
    what: &str,
    check: impl Fn(&model::OrderView) -> bool + Send + Sync + Copy + 'static,
) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let ok = node
            .read(move |c| {
                c.replica
                    .doc(&order)
                    .and_then(model::order_view)
                    .is_some_and(|v| check(&v))
            })
            .await
            .expect("node runs");
        if ok {
            println!("  {what} after {:?}", t.elapsed());
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{what}: not within 10 s");
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let buyer = start("buyer", &dir).await;
    let supplier = start("supplier", &dir).await;
    let (b, s) = (buyer.handle.clone(), supplier.handle.clone());
    let addr = b.listen_addrs().await.expect("addresses")[0].clone();
    s.dial(addr).await.expect("dial");
    println!(
        "buyer {} and supplier {} connected over 127.0.0.1",
        b.info.enterprise_id, s.info.enterprise_id
    );

    let order = b
        .create(|kp, now, nonce| {
            let input = OrderInput {
                title: "Flange, 6082-T6, 40 pcs".into(),
                quantity: 40,
                visibility: Visibility::Public,
                ..Default::default()
            };
            model::create_order(kp, &input, now, nonce)
        })
        .await
        .expect("order posted");
    println!("buyer posted order {order}");
    until(&s, order, "supplier's node holds the order", |v| {
        v.title.starts_with("Flange")
    })
    .await;

    s.edit(order, |d, kp, now| {
        let bid = BidInput {
            unit_price: 12.5,
            currency: "EUR".into(),
            lead_time_days: 10,
            ..Default::default()
        };
        model::place_bid(d, kp, now, &bid)
    })
    .await
    .expect("bid placed");
    println!("supplier bid 12.50 EUR per piece");
    until(&b, order, "buyer's node holds the signed bid", |v| {
        v.bids.len() == 1
    })
    .await;

    let supplier_id = s.info.enterprise_id;
    b.edit(order, move |d, kp, now| {
        model::award(d, kp, now, &BTreeMap::from([(supplier_id, 40)]))
    })
    .await
    .expect("awarded");
    println!("buyer awarded 40 pcs to the supplier");
    until(&s, order, "supplier's node sees the award", |v| {
        !v.award.is_empty()
    })
    .await;

    let heads = |h: NodeHandle| async move {
        h.read(move |c| c.replica.doc(&order).map(|d| d.heads()))
            .await
            .expect("node runs")
    };
    assert_eq!(
        heads(b.clone()).await,
        heads(s.clone()).await,
        "both nodes hold the same order"
    );
    println!("both nodes hold the same order (same heads); stopping");
    b.shutdown().await;
    s.shutdown().await;
    let _ = buyer.task.await;
    let _ = supplier.task.await;
}
