//! Partitions and churn over the real node stack (libp2p on 127.0.0.1, sled in temp folders).
//!
//! Traffic between groups is cut with `NodeHandle::block` (each side refuses the other's
//! connections), everyone keeps editing, then the groups are healed. After every heal each
//! node must hold, for every document it may hold, the same heads as everyone else and
//! exactly the number of changes made anywhere (none lost, none invented), and no node may
//! ever hold a `members` document it is not a member of.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cofab_node::{Node, NodeConfig};
use cofab_protocol::model::{
    self, BidInput, CapacityInput, DesignInput, Machine, OrderInput, Splice,
};
use cofab_protocol::{Accepted, DocId, Document, EditError, Keypair, Role, Visibility};
use common::*;

/// What the test expects of each document: how many changes it has in total.
#[derive(Default)]
struct Ledger {
    changes: BTreeMap<DocId, usize>,
    /// Node indexes that may hold each document.
    holders: BTreeMap<DocId, BTreeSet<usize>>,
}

impl Ledger {
    /// Records a document just created on `nodes[creator]`.
    async fn created(&mut self, nodes: &[&TestNode], creator: usize, id: DocId) {
        let keys: Vec<_> = nodes.iter().map(|n| n.key.id()).collect();
        let (count, may) = nodes[creator]
            .handle()
            .read(move |c| {
                let d = c.replica.doc(&id).expect("creator holds its document");
                (
                    d.change_count(),
                    keys.iter().map(|k| d.may_hold(k)).collect::<Vec<bool>>(),
                )
            })
            .await
            .unwrap();
        self.changes.insert(id, count);
        self.holders.insert(
            id,
            may.iter()
                .enumerate()
                .filter(|(_, m)| **m)
                .map(|(i, _)| i)
                .collect(),
        );
    }

    /// Edits `doc` on `node`; every successful edit is one change the network must keep.
    async fn edit(
        &mut self,
        node: &TestNode,
        doc: DocId,
        f: impl FnOnce(&mut Document, &Keypair, i64) -> Result<Accepted, EditError> + Send + 'static,
    ) {
        node.handle()
            .edit(doc, f)
            .await
            .unwrap_or_else(|e| panic!("edit of {doc} on {} failed: {e}", node.name));
        *self.changes.get_mut(&doc).expect("known document") += 1;
    }
}

/// Per node: document → (heads, change count).
async fn holdings(node: &TestNode) -> BTreeMap<DocId, (Vec<String>, usize)> {
    node.handle()
        .read(|c| {
            c.replica
                .docs()
                .map(|d| {
                    (
                        d.id(),
                        (
                            d.heads().iter().map(|h| h.to_string()).collect(),
                            d.change_count(),
                        ),
                    )
                })
                .collect()
        })
        .await
        .unwrap()
}

/// Waits until every node holds every document it may hold with identical heads and the
/// expected change count. A node holding a document it may not hold fails at once.
async fn wait_all_converged(nodes: &[&TestNode], ledger: &Ledger, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        let mut all = Vec::new();
        for n in nodes {
            all.push(holdings(n).await);
        }
        let mut problems = Vec::new();
        for (doc, expected) in &ledger.changes {
            let holders = &ledger.holders[doc];
            let mut reference: Option<&Vec<String>> = None;
            for (i, h) in all.iter().enumerate() {
                match (holders.contains(&i), h.get(doc)) {
                    (false, Some(_)) => {
                        panic!("{what}: node {i} holds {doc}, which it may not hold")
                    }
                    (false, None) => {}
                    (true, None) => problems.push(format!("node {i} lacks {doc}")),
                    (true, Some((heads, count))) => {
                        if count != expected {
                            problems
                                .push(format!("node {i} has {count}/{expected} changes of {doc}"));
                        }
                        match reference {
                            None => reference = Some(heads),
                            Some(r) if r != heads => {
                                problems.push(format!("node {i} heads of {doc} differ"))
                            }
                            Some(_) => {}
                        }
                    }
                }
            }
        }
        if problems.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not converged within {DEADLINE:?}: {problems:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn peer_count(n: &TestNode) -> usize {
    n.handle().read(|c| c.peers.len()).await.unwrap()
}

/// Cuts every link between `a` and `b` (both sides refuse the other) and waits until no
/// node of one group is connected to a node of the other.
async fn split(nodes: &[&TestNode], a: &[usize], b: &[usize]) {
    for &i in a {
        for &j in b {
            nodes[i]
                .handle()
                .block(nodes[j].handle().info.peer_id)
                .await
                .unwrap();
            nodes[j]
                .handle()
                .block(nodes[i].handle().info.peer_id)
                .await
                .unwrap();
        }
    }
    for (group, other) in [(a, b), (b, a)] {
        let banned: Vec<String> = other
            .iter()
            .map(|&j| nodes[j].handle().info.peer_id.to_string())
            .collect();
        for &i in group {
            let banned = banned.clone();
            wait_until(DEADLINE, || {
                let banned = banned.clone();
                async move {
                    !nodes[i]
                        .handle()
                        .read(move |c| c.peers.iter().any(|p| banned.contains(&p.peer_id)))
                        .await
                        .unwrap()
                }
            })
            .await;
        }
    }
}

/// Lifts the blocks between `a` and `b` and redials every cross link.
async fn heal(nodes: &[&TestNode], a: &[usize], b: &[usize]) {
    for &i in a {
        for &j in b {
            nodes[i]
                .handle()
                .unblock(nodes[j].handle().info.peer_id)
                .await
                .unwrap();
            nodes[j]
                .handle()
                .unblock(nodes[i].handle().info.peer_id)
                .await
                .unwrap();
        }
    }
    for &i in a {
        for &j in b {
            connect(nodes[i], nodes[j]).await;
        }
    }
    for n in nodes {
        wait_peers(n, nodes.len() - 1).await;
    }
}

fn order_input(title: &str, visibility: Visibility, members: &[(&Keypair, Role)]) -> OrderInput {
    OrderInput {
        title: title.into(),
        quantity: 250,
        material: Some("1.4301".into()),
        processes: vec!["cnc-turning".into()],
        due_date: Some("2027-05-03".into()),
        visibility,
        members: members.iter().map(|(k, r)| (k.id(), *r)).collect(),
        ..Default::default()
    }
}

fn capacity_input(name: &str, week_hours: u32) -> CapacityInput {
    CapacityInput {
        name: name.into(),
        region: Some("DE-BW".into()),
        machines: vec![Machine {
            name: "5-axis cell".into(),
            process: "cnc-milling".into(),
            free_hours: [("2027-W09".to_string(), week_hours)].into_iter().collect(),
        }],
        load_pct: Some(50),
        ..Default::default()
    }
}

fn bid(price: f64) -> BidInput {
    BidInput {
        unit_price: price,
        currency: "EUR".into(),
        lead_time_days: 21,
        ..Default::default()
    }
}

/// Four companies (0 buyer, 1 and 2 suppliers, 3 design house) are split three different
/// ways in turn; in every split all four edit: the buyer posts an order and comments,
/// both suppliers bid on public and members orders and update their capacity, and the
/// owner plus three editors co-edit one members design. Each heal must converge everywhere
/// with every change kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_split_three_ways_converge_and_lose_nothing() {
    let owned = start_net("partitions", 4).await;
    let nodes: Vec<&TestNode> = owned.iter().collect();
    let mut ledger = Ledger::default();
    let (buyer, s1, s2, house) = (&nodes[0].key, &nodes[1].key, &nodes[2].key, &nodes[3].key);

    // Before the first split: a public order, a members order for both suppliers, two
    // capacity documents and a members design with three editors.
    let public = order_input("Shaft, turned", Visibility::Public, &[]);
    let o_pub = nodes[0]
        .handle()
        .create(move |kp, now, n| model::create_order(kp, &public, now, n))
        .await
        .unwrap();
    ledger.created(&nodes, 0, o_pub).await;
    let private = order_input(
        "Gear housing",
        Visibility::Members,
        &[(s1, Role::Supplier), (s2, Role::Supplier)],
    );
    let o_mem = nodes[0]
        .handle()
        .create(move |kp, now, n| model::create_order(kp, &private, now, n))
        .await
        .unwrap();
    ledger.created(&nodes, 0, o_mem).await;
    let mut capacity = BTreeMap::new();
    for s in [1, 2] {
        let c = capacity_input(&format!("Supplier {s}"), 40);
        let id = nodes[s]
            .handle()
            .create(move |kp, now, n| model::create_capacity(kp, &c, now, n))
            .await
            .unwrap();
        ledger.created(&nodes, s, id).await;
        capacity.insert(s, id);
    }
    let design = DesignInput {
        title: "Pump housing".into(),
        description: "|".into(),
        visibility: Visibility::Members,
        members: [
            (buyer.id(), Role::Editor),
            (s1.id(), Role::Editor),
            (s2.id(), Role::Editor),
        ]
        .into_iter()
        .collect(),
    };
    let d = nodes[3]
        .handle()
        .create(move |kp, now, n| model::create_design(kp, &design, now, n))
        .await
        .unwrap();
    ledger.created(&nodes, 3, d).await;
    let _ = house;
    wait_all_converged(&nodes, &ledger, "before the first split").await;

    let splits: [(&[usize], &[usize]); 3] =
        [(&[0, 1], &[2, 3]), (&[0, 2], &[1, 3]), (&[0, 3], &[1, 2])];
    let mut markers = Vec::new();
    let mut comments = 0;
    let mut new_orders = Vec::new();
    let mut partitions = 0;
    // `COFAB_PARTITION_CYCLES` raises the number of split/heal cycles (default 6: each split twice).
    let cycles: usize = std::env::var("COFAB_PARTITION_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2 * splits.len());
    for cycle in 0..cycles {
        let (a, b) = splits[cycle % splits.len()];
        split(&nodes, a, b).await;
        partitions += 1;
        // The buyer posts a new public order nobody across the cut can see yet.
        let title = format!("Flange, cycle {cycle}");
        let input = order_input(&title, Visibility::Public, &[]);
        let o_new = nodes[0]
            .handle()
            .create(move |kp, now, n| model::create_order(kp, &input, now, n))
            .await
            .unwrap();
        ledger.created(&nodes, 0, o_new).await;
        new_orders.push((
            o_new,
            title,
            [1, 2].iter().filter(|s| a.contains(s)).count(),
        ));
        // Within each group sync goes on.
        let group_a: Vec<&TestNode> = a.iter().map(|&i| nodes[i]).collect();
        wait_converged(&group_a, o_new).await;
        let text = format!("buyer note {cycle}");
        ledger
            .edit(nodes[0], o_pub, move |d, kp, now| {
                model::comment(d, kp, now, &text)
            })
            .await;
        comments += 1;
        for s in [1usize, 2] {
            let price = 10.0 * s as f64 + cycle as f64;
            ledger
                .edit(nodes[s], o_pub, move |d, kp, now| {
                    model::place_bid(d, kp, now, &bid(price))
                })
                .await;
            ledger
                .edit(nodes[s], o_mem, move |d, kp, now| {
                    model::place_bid(d, kp, now, &bid(price + 0.5))
                })
                .await;
            let c = capacity_input(&format!("Supplier {s}"), 10 * (cycle as u32 + 1) + s as u32);
            ledger
                .edit(nodes[s], capacity[&s], move |d, kp, now| {
                    model::update_capacity(d, kp, now, &c)
                })
                .await;
            // A supplier on the buyer's side of the cut bids on the new order too.
            if a.contains(&s) {
                ledger
                    .edit(nodes[s], o_new, move |d, kp, now| {
                        model::place_bid(d, kp, now, &bid(7.0))
                    })
                    .await;
            }
        }
        // Everyone co-edits the design: a marker in the text and a parameter, twice.
        for round in 0..2 {
            for (i, node) in nodes.iter().enumerate() {
                let m = format!("[n{i}c{cycle}r{round}]");
                markers.push(m.clone());
                let s = Splice {
                    pos: 1,
                    delete: 0,
                    insert: m,
                };
                ledger
                    .edit(node, d, move |doc, kp, now| {
                        model::splice_description(doc, kp, now, &s)
                    })
                    .await;
                let name = format!("p{i}");
                let value = (cycle * 10 + round) as f64;
                ledger
                    .edit(node, d, move |doc, kp, now| {
                        model::set_parameter(doc, kp, now, &name, value, "mm")
                    })
                    .await;
            }
        }
        // Within each group sync goes on; across the cut nothing moves.
        wait_converged(&group_a, o_new).await;
        for &j in b.iter() {
            assert!(
                heads(nodes[j], o_new).await.is_empty(),
                "cycle {cycle}: order posted in group {a:?} crossed the partition to node {j}"
            );
        }
        let da = heads(nodes[a[0]], d).await;
        let db = heads(nodes[b[0]], d).await;
        assert_ne!(
            da, db,
            "cycle {cycle}: both groups edited the design, their heads cannot be equal"
        );

        heal(&nodes, a, b).await;
        let took = wait_all_converged(&nodes, &ledger, &format!("after heal {cycle}")).await;
        println!("partition cycle {cycle}: split {a:?} | {b:?}, healed and converged in {took:?}");
    }

    // No change lost, read back as content on every node that may hold it.
    for (i, n) in nodes.iter().enumerate() {
        let text = n
            .handle()
            .read(move |c| c.replica.doc(&d).and_then(model::design_view))
            .await
            .unwrap()
            .unwrap();
        for m in &markers {
            assert_eq!(
                text.description.matches(m.as_str()).count(),
                1,
                "node {i}: design marker {m} lost or doubled"
            );
        }
        assert_eq!(
            text.parameters.len(),
            4,
            "node {i}: parameters {:?}",
            text.parameters
        );
        let o = n
            .handle()
            .read(move |c| c.replica.doc(&o_pub).and_then(model::order_view))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o.discussion.len(), comments, "node {i}: comments lost");
        assert_eq!(o.bids.len(), 2, "node {i}: bids {:?}", o.bids);
        for s in [1usize, 2] {
            let last = 10.0 * s as f64 + (cycles - 1) as f64;
            assert_eq!(
                o.bids[&nodes[s].key.id().to_string()].unit_price,
                Some(last),
                "node {i}: supplier {s}'s newest bid"
            );
            let cap = n
                .handle()
                .read({
                    let id = capacity[&s];
                    move |c| c.replica.doc(&id).and_then(model::capacity_view)
                })
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                cap.content.machines[0].free_hours["2027-W09"],
                10 * cycles as u32 + s as u32,
                "node {i}: capacity of supplier {s}"
            );
        }
        for (o_new, title, bids) in &new_orders {
            let id = *o_new;
            let v = n
                .handle()
                .read(move |c| c.replica.doc(&id).and_then(model::order_view))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&v.title, title);
            assert_eq!(
                v.bids.len(),
                *bids,
                "node {i}: the bids placed inside the buyer's group"
            );
        }
    }
    let members_order = heads(nodes[3], o_mem).await;
    assert!(
        members_order.is_empty(),
        "the design house is not a member of the members order"
    );
    let total: usize = ledger.changes.values().sum();
    println!(
        "partitions: {partitions} partitions healed, {} documents, {total} changes, 0 lost",
        ledger.changes.len()
    );
    for n in owned {
        n.handle().shutdown().await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a node from `dir` listening on 127.0.0.1:`port`, bootstrapping from `bootstrap`.
async fn start_at(
    key: &Keypair,
    name: &str,
    dir: &std::path::Path,
    port: u16,
    bootstrap: Vec<cofab_node::libp2p::Multiaddr>,
) -> Node {
    let mut c: NodeConfig = config(key.clone(), name, dir);
    c.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()];
    c.bootstrap = bootstrap;
    Node::start(c).await.expect("node starts")
}

/// A node leaves while the others go on editing and comes back on a different port,
/// knowing only one peer: it catches up, the others reach it at its new address, and its
/// own edits reach everyone. Then a fifth company joins late: it gets every public
/// document and the members order it was invited to before it existed, never the members
/// design it is not part of, and its bid reaches everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_returns_on_a_new_address_and_a_late_node_joins() {
    let mut owned = start_net("churn", 4).await;
    let late_key = test_key("churn", 4);
    let mut ledger = Ledger::default();
    let o_pub = {
        let input = order_input("Bushing", Visibility::Public, &[]);
        owned[0]
            .handle()
            .create(move |kp, now, n| model::create_order(kp, &input, now, n))
            .await
            .unwrap()
    };
    // Invites the late company (by its enterprise id) before its node exists.
    let o_inv = {
        let input = order_input(
            "Cover plate",
            Visibility::Members,
            &[(&owned[1].key, Role::Supplier), (&late_key, Role::Supplier)],
        );
        owned[0]
            .handle()
            .create(move |kp, now, n| model::create_order(kp, &input, now, n))
            .await
            .unwrap()
    };
    let d = {
        let input = DesignInput {
            title: "Bracket".into(),
            description: "|".into(),
            visibility: Visibility::Members,
            members: [
                (owned[0].key.id(), Role::Editor),
                (owned[3].key.id(), Role::Editor),
            ]
            .into_iter()
            .collect(),
        };
        create_design(&owned[1], input).await
    };
    let cap = {
        let c = capacity_input("Supplier 2", 30);
        owned[2]
            .handle()
            .create(move |kp, now, n| model::create_capacity(kp, &c, now, n))
            .await
            .unwrap()
    };
    {
        let nodes: Vec<&TestNode> = owned.iter().collect();
        // The late node (index 4) does not exist yet; the ledger knows about it for may_hold.
        for (creator, id) in [(0, o_pub), (0, o_inv), (1, d), (2, cap)] {
            ledger.created(&nodes, creator, id).await;
            let late = late_key.id();
            if owned[creator]
                .handle()
                .read(move |c| c.replica.doc(&id).unwrap().may_hold(&late))
                .await
                .unwrap()
            {
                ledger.holders.get_mut(&id).unwrap().insert(4);
            }
        }
        wait_all_converged(&nodes, &ledger, "before churn").await;
    }

    // Node 3 leaves.
    let leaver = owned.pop().unwrap();
    let old_addr = leaver.handle().listen_addrs().await.unwrap()[0].clone();
    let leaver = stop(leaver).await;
    for node in &owned {
        wait_until(DEADLINE, || async { peer_count(node).await == 2 }).await;
    }
    // The rest go on editing while it is away, including the design it co-edits.
    for k in 0..5 {
        let s = Splice {
            pos: 1,
            delete: 0,
            insert: format!("<away{k}>"),
        };
        ledger
            .edit(&owned[0], d, move |doc, kp, now| {
                model::splice_description(doc, kp, now, &s)
            })
            .await;
        ledger
            .edit(&owned[1], o_pub, move |doc, kp, now| {
                model::place_bid(doc, kp, now, &bid(3.0 + k as f64))
            })
            .await;
        let c = capacity_input("Supplier 2", 31 + k);
        ledger
            .edit(&owned[2], cap, move |doc, kp, now| {
                model::update_capacity(doc, kp, now, &c)
            })
            .await;
    }
    // It comes back on another port, knowing only node 0's address.
    let old_port = old_addr.iter().find_map(|p| match p {
        cofab_node::libp2p::multiaddr::Protocol::Tcp(p) => Some(p),
        _ => None,
    });
    let port = std::iter::repeat_with(free_port)
        .find(|p| Some(*p) != old_port)
        .unwrap();
    let boot = owned[0].handle().listen_addrs().await.unwrap()[0].clone();
    let node = start_at(
        &leaver.key,
        &leaver.name,
        leaver.dir.path(),
        port,
        vec![boot.clone()],
    )
    .await;
    let back = TestNode {
        node,
        dir: leaver.dir,
        key: leaver.key,
        name: leaver.name,
    };
    let new_addr = back.handle().listen_addrs().await.unwrap()[0].clone();
    assert_ne!(
        new_addr, old_addr,
        "the returning node must listen on a new address"
    );
    // Its edit made right after coming back must reach everyone too.
    let s = Splice {
        pos: 1,
        delete: 0,
        insert: "<back>".into(),
    };
    ledger
        .edit(&back, d, move |doc, kp, now| {
            model::splice_description(doc, kp, now, &s)
        })
        .await;
    owned.push(back);
    {
        let nodes: Vec<&TestNode> = owned.iter().collect();
        let took = wait_all_converged(&nodes, &ledger, "after the return").await;
        println!("churn: node 3 back on {new_addr} (was {old_addr}), converged in {took:?}");
    }
    // The others found it at its new address (through node 0), not only node 0.
    wait_peers(&owned[3], 3).await;
    for i in 1..3 {
        let want = owned[3].handle().info.peer_id.to_string();
        // Node 3 may count a connection a moment before node i has handled its side.
        wait_until(DEADLINE, || {
            let want = want.clone();
            let h = owned[i].handle().clone();
            async move {
                h.read(move |c| c.peers.iter().any(|p| p.peer_id == want))
                    .await
                    .unwrap()
            }
        })
        .await;
        let addr = owned[i]
            .handle()
            .read(move |c| {
                c.peers
                    .iter()
                    .find(|p| p.peer_id == want)
                    .map(|p| p.addrs.clone())
            })
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("node {i} never connected to the returned node"));
        assert!(
            !addr.iter().any(|a| *a == old_addr.to_string()),
            "node {i} reached it at its old address: {addr:?}"
        );
    }

    // A fifth company joins late, knowing only node 2.
    let dir = tempfile::tempdir().unwrap();
    let boot = owned[2].handle().listen_addrs().await.unwrap()[0].clone();
    let node = start_at(&late_key, "node4", dir.path(), free_port(), vec![boot]).await;
    owned.push(TestNode {
        node,
        dir,
        key: late_key,
        name: "node4".into(),
    });
    let nodes: Vec<&TestNode> = owned.iter().collect();
    let took = wait_all_converged(&nodes, &ledger, "after the late join").await;
    println!("churn: late node converged in {took:?}");
    ledger
        .edit(nodes[4], o_inv, move |doc, kp, now| {
            model::place_bid(doc, kp, now, &bid(4.25))
        })
        .await;
    ledger
        .edit(nodes[4], o_pub, move |doc, kp, now| {
            model::place_bid(doc, kp, now, &bid(4.5))
        })
        .await;
    wait_all_converged(&nodes, &ledger, "after the late node's bids").await;
    let v = nodes[0]
        .handle()
        .read(move |c| c.replica.doc(&o_inv).and_then(model::order_view))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        v.bids[&nodes[4].key.id().to_string()].unit_price,
        Some(4.25)
    );
    assert!(
        heads(nodes[4], d).await.is_empty(),
        "the late node is not a member of the design"
    );
    let text = nodes[4]
        .handle()
        .read(move |c| c.replica.doc(&cap).and_then(model::capacity_view))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(text.content.machines[0].free_hours["2027-W09"], 35);
    let total: usize = ledger.changes.values().sum();
    println!(
        "churn: 1 leave/return on a new port, 1 late join, {} documents, {total} changes, 0 lost",
        ledger.changes.len()
    );
    for n in owned {
        n.handle().shutdown().await;
    }
}
