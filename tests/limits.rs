//! Node limits at their edges: connections per peer.

mod common;

use std::time::Duration;

use common::*;

/// A peer that dials again and again holds at most `MAX_CONNECTIONS_PER_PEER` connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_peer_are_capped() {
    let nodes = start_net("limits_conn", 2).await;
    let addr = nodes[0].handle().listen_addrs().await.unwrap()[0].clone();
    for _ in 0..6 {
        let _ = nodes[1].handle().dial(addr.clone()).await;
    }
    let b = nodes[1].handle().info.peer_id.to_string();
    let mut seen_max = 0;
    for _ in 0..50 {
        let b = b.clone();
        let n = nodes[0]
            .handle()
            .read(move |c| {
                c.peers
                    .iter()
                    .find(|p| p.peer_id == b)
                    .map(|p| p.addrs.len())
                    .unwrap_or(0)
            })
            .await
            .unwrap();
        seen_max = seen_max.max(n);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen_max >= 1, "B should be connected");
    assert!(
        seen_max <= cofab_node::network::MAX_CONNECTIONS_PER_PEER as usize,
        "A held {seen_max} connections from B"
    );
}

/// A node configured for at most 2 connections in total keeps at most 2 when 4 peers dial it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_connections_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(test_key("limits_total", 0), "hub", dir.path());
    cfg.max_connections = 2;
    let hub = TestNode {
        node: cofab_node::Node::start(cfg).await.unwrap(),
        dir,
        key: test_key("limits_total", 0),
        name: "hub".into(),
    };
    let mut others = Vec::new();
    for i in 1..=4 {
        others.push(start("limits_total", i).await);
    }
    for o in &others {
        connect(o, &hub).await;
    }
    let mut seen_max = 0;
    for _ in 0..50 {
        seen_max = seen_max.max(
            hub.handle()
                .read(|c| c.peers.iter().map(|p| p.addrs.len()).sum::<usize>())
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen_max >= 1, "someone should get in");
    assert!(
        seen_max <= 2,
        "hub held {seen_max} connections with a limit of 2"
    );
}
