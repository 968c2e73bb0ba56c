//! Test harness: start N real nodes in one process on 127.0.0.1, connect them,
//! act, wait for convergence with a deadline.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use cofab_node::{Node, NodeConfig, NodeHandle};
use cofab_protocol::{DocId, Keypair};

/// Default deadline for convergence waits.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running test node with its data folder.
pub struct TestNode {
    pub node: Node,
    pub dir: tempfile::TempDir,
    pub key: Keypair,
    pub name: String,
}

impl TestNode {
    pub fn handle(&self) -> &NodeHandle {
        &self.node.handle
    }
}

/// A deterministic key for test node `i` of test `test`.
pub fn test_key(test: &str, i: usize) -> Keypair {
    let mut secret = [0u8; 32];
    let seed = format!("{test}/{i}");
    for (j, b) in seed.bytes().enumerate() {
        secret[j % 32] ^= b.wrapping_add(j as u8);
    }
    secret[31] ^= i as u8 + 1;
    Keypair::from_secret(secret)
}

pub fn config(key: Keypair, name: &str, dir: &std::path::Path) -> NodeConfig {
    let mut c = NodeConfig::new(key, name, dir.join("store"));
    c.tick = Duration::from_millis(200);
    c
}

/// Starts a node in a fresh temporary folder.
pub async fn start(test: &str, i: usize) -> TestNode {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = test_key(test, i);
    let name = format!("node{i}");
    let node = Node::start(config(key.clone(), &name, dir.path()))
        .await
        .expect("node starts");
    TestNode {
        node,
        dir,
        key,
        name,
    }
}

/// A node that was shut down, with its data folder kept (to inspect or start again).
pub struct Stopped {
    pub dir: tempfile::TempDir,
    pub key: Keypair,
    pub name: String,
}

/// Shuts a node down and waits until its task has ended (its store is closed).
pub async fn stop(node: TestNode) -> Stopped {
    node.node.handle.shutdown().await;
    let _ = node.node.task.await;
    Stopped {
        dir: node.dir,
        key: node.key,
        name: node.name,
    }
}

/// Starts a stopped node again from its folder.
pub async fn start_again(s: Stopped) -> TestNode {
    let node = Node::start(config(s.key.clone(), &s.name, s.dir.path()))
        .await
        .expect("node restarts");
    TestNode {
        node,
        dir: s.dir,
        key: s.key,
        name: s.name,
    }
}

/// Restarts a node from its folder.
pub async fn restart(old: TestNode) -> TestNode {
    start_again(stop(old).await).await
}

/// Creates a design on `node`; returns its id.
pub async fn create_design(node: &TestNode, input: cofab_protocol::model::DesignInput) -> DocId {
    node.handle()
        .create(move |kp, now, nonce| cofab_protocol::model::create_design(kp, &input, now, nonce))
        .await
        .expect("design created")
}

/// Starts `n` nodes and connects every pair.
pub async fn start_net(test: &str, n: usize) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(start(test, i).await);
    }
    for i in 0..n {
        for j in (i + 1)..n {
            connect(&nodes[i], &nodes[j]).await;
        }
    }
    for node in &nodes {
        wait_peers(node, n - 1).await;
    }
    nodes
}

/// Dials b from a.
pub async fn connect(a: &TestNode, b: &TestNode) {
    let addr = b.handle().listen_addrs().await.unwrap()[0].clone();
    a.handle().dial(addr).await.expect("dial");
}

/// Waits until `n` peers are connected.
pub async fn wait_peers(node: &TestNode, n: usize) {
    wait_until(DEADLINE, || async {
        node.handle().read(|c| c.peers.len()).await.unwrap() >= n
    })
    .await;
}

/// Polls `f` until it returns true or the deadline passes (then panics).
pub async fn wait_until<F, Fut>(deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "condition not met within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Heads of a document on a node (empty if absent).
pub async fn heads(node: &TestNode, doc: DocId) -> Vec<String> {
    node.handle()
        .read(move |c| {
            c.replica
                .doc(&doc)
                .map(|d| d.heads().iter().map(|h| h.to_string()).collect())
                .unwrap_or_default()
        })
        .await
        .unwrap()
}

/// Waits until all nodes hold `doc` with identical, non-empty heads.
pub async fn wait_converged(nodes: &[&TestNode], doc: DocId) {
    wait_until(DEADLINE, || async {
        let mut all = Vec::new();
        for n in nodes {
            all.push(heads(n, doc).await);
        }
        !all[0].is_empty() && all.iter().all(|h| *h == all[0])
    })
    .await;
}
