//! A deterministic network simulator for [`Replica`]s.
//!
//! Owns: a seeded, discrete-event network of N replicas with message drop,
//! duplication, delay (hence reordering), partitions and heal, and crash/restart
//! (volatile state and local writes not yet durable lost, the rest of the durable
//! state kept; the node comes back as its next incarnation). Every message goes through the
//! real wire encoding. A failing run prints its seed so it can be replayed with
//! `COFAB_SIM_SEED`.
//! Must not: read the wall clock or OS randomness.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use automerge::ChangeHash;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::doc::{DocId, SignedGenesis};
use crate::document::Document;
use crate::identity::{EnterpriseId, Keypair};
use crate::sync::{Output, Replica, TICK_PEERS};
use crate::wire::Frame;

/// Fault settings.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Probability a message is dropped.
    pub drop: f64,
    /// Probability a message is delivered twice.
    pub duplicate: f64,
    /// Largest delivery delay in ms (delays are uniform, so messages reorder).
    pub max_delay_ms: i64,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            drop: 0.0,
            duplicate: 0.0,
            max_delay_ms: 5,
        }
    }
}

/// What a node keeps across crashes.
#[derive(Debug, Clone, Default)]
pub struct DurableStore {
    /// Per document: genesis, snapshot, changes, signatures.
    pub docs: BTreeMap<DocId, StoredDoc>,
}

/// One document in a [`DurableStore`].
#[derive(Debug, Clone)]
pub struct StoredDoc {
    /// Signed genesis.
    pub genesis: SignedGenesis,
    /// Snapshot, if one was adopted.
    pub snapshot: Option<Vec<u8>>,
    /// Changes added since.
    pub changes: Vec<Vec<u8>>,
    /// Signatures held.
    pub sigs: Vec<(ChangeHash, [u8; 64])>,
}

/// One simulated node.
pub struct SimNode {
    /// The replica (volatile).
    pub replica: Replica,
    /// Durable state.
    pub store: DurableStore,
    /// Whether the node is running.
    pub up: bool,
    /// Partition group.
    pub group: u32,
    /// Local writes not yet durable (see [`SimNetwork::crash`]), oldest first.
    unsure: Vec<Unsure>,
    /// Its key, writing as its current incarnation (a crash moves it on).
    key: Keypair,
}

/// A local write that a crash may still lose: what it appended to one document.
#[derive(Debug, Clone)]
struct Unsure {
    doc: DocId,
    created: bool,
    changes: usize,
    sigs: usize,
}

/// A message in flight.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: i64,
    seq: u64,
    from: usize,
    to: usize,
    bytes: Vec<u8>,
}

/// The simulated network.
pub struct SimNetwork {
    /// Nodes, by index.
    pub nodes: Vec<SimNode>,
    /// Faults applied to every message.
    pub faults: Faults,
    /// Simulated time, ms.
    pub now_ms: i64,
    /// The seed.
    pub seed: u64,
    rng: StdRng,
    queue: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    /// Every (from, to, doc) a sync message was sent for: used by privacy tests.
    pub sent_log: Vec<(EnterpriseId, EnterpriseId, DocId)>,
    /// Rejections seen: (node, error reason).
    pub rejections: Vec<(usize, String)>,
    /// Messages delivered.
    pub delivered: u64,
    /// Local writes lost in crashes (see [`Self::crash`]).
    pub writes_lost: u64,
    /// Whether a crash loses the crashed node's local writes that were not yet durable
    /// (default: yes, as a real node can; see [`Self::crash`]).
    pub crash_loses_unsure_writes: bool,
    /// The node whose local action's outputs are being carried out.
    acting: Option<usize>,
}

impl SimNetwork {
    /// A network with no nodes.
    pub fn new(seed: u64, faults: Faults) -> Self {
        Self {
            nodes: Vec::new(),
            faults,
            now_ms: 1_700_000_000_000,
            seed,
            rng: StdRng::seed_from_u64(seed),
            queue: BinaryHeap::new(),
            seq: 0,
            sent_log: Vec::new(),
            rejections: Vec::new(),
            delivered: 0,
            writes_lost: 0,
            crash_loses_unsure_writes: true,
            acting: None,
        }
    }

    /// Adds a node with a key derived from the seed; returns its index.
    pub fn add_node(&mut self) -> usize {
        let mut secret = [0u8; 32];
        self.rng.fill(&mut secret);
        let key = Keypair::from_secret(secret);
        self.nodes.push(SimNode {
            replica: Replica::new(key.clone()),
            store: DurableStore::default(),
            up: true,
            group: 0,
            unsure: Vec::new(),
            key,
        });
        let i = self.nodes.len() - 1;
        self.reconnect();
        let _ = i;
        i
    }

    /// The enterprise id of node `i`.
    pub fn id(&self, i: usize) -> EnterpriseId {
        self.nodes[i].key.id()
    }

    /// A random u64 from the simulation's RNG.
    pub fn random(&mut self) -> u64 {
        self.rng.random()
    }

    /// The simulation's RNG.
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    fn linked(&self, a: usize, b: usize) -> bool {
        a != b && self.nodes[a].up && self.nodes[b].up && self.nodes[a].group == self.nodes[b].group
    }

    /// Brings replica connection state in line with groups and up/down state.
    fn reconnect(&mut self) {
        let n = self.nodes.len();
        for a in 0..n {
            for b in 0..n {
                if a == b || !self.nodes[a].up {
                    continue;
                }
                let peer = self.id(b);
                let is = self.nodes[a].replica.connected().contains(&peer);
                let should = self.linked(a, b);
                if should && !is {
                    let outs = self.nodes[a].replica.peer_connected(peer);
                    self.handle(a, outs);
                } else if !should && is {
                    self.nodes[a].replica.peer_disconnected(&peer);
                }
            }
        }
    }

    /// Splits the network: `groups[i]` lists the nodes of group i; others join group 0.
    pub fn partition(&mut self, groups: &[Vec<usize>]) {
        for n in &mut self.nodes {
            n.group = 0;
        }
        for (g, members) in groups.iter().enumerate() {
            for &i in members {
                self.nodes[i].group = g as u32;
            }
        }
        self.reconnect();
    }

    /// Removes all partitions.
    pub fn heal(&mut self) {
        for n in &mut self.nodes {
            n.group = 0;
        }
        self.reconnect();
    }

    /// Crashes node `i`: its volatile state is lost; messages to it are dropped.
    ///
    /// A node sends its own changes before their write is durable, so the crash also
    /// loses its local writes made since anything else was written to its store (writes
    /// become durable in order), even though peers may already hold those changes. It
    /// restarts as the next incarnation, as a real node does after an unclean stop.
    pub fn crash(&mut self, i: usize) {
        if std::env::var_os("COFAB_SIM_TRACE").is_some() {
            eprintln!(
                "t={} crash {i} losing {:?}",
                self.now_ms, self.nodes[i].unsure
            );
        }
        let node = &mut self.nodes[i];
        node.up = false;
        let lost = std::mem::take(&mut node.unsure);
        if self.crash_loses_unsure_writes {
            self.writes_lost += lost.len() as u64;
            for u in lost.into_iter().rev() {
                if u.created {
                    node.store.docs.remove(&u.doc);
                } else if let Some(d) = node.store.docs.get_mut(&u.doc) {
                    d.changes.truncate(d.changes.len() - u.changes);
                    d.sigs.truncate(d.sigs.len() - u.sigs);
                }
            }
        }
        let next = node.key.author().incarnation + 1;
        node.key = node.key.clone().with_incarnation(next);
        node.replica = Replica::new(node.key.clone());
        // Its connections died with it: what was in flight on them is never delivered
        // (not even once it has restarted, to the new process or from the old one).
        self.queue.retain(|Reverse(m)| m.from != i && m.to != i);
        let me = self.id(i);
        for n in &mut self.nodes {
            n.replica.peer_disconnected(&me);
        }
    }

    /// Restarts node `i` from its durable store.
    pub fn restart(&mut self, i: usize) {
        if std::env::var_os("COFAB_SIM_TRACE").is_some() {
            eprintln!("t={} restart {i}", self.now_ms);
        }
        let key = self.nodes[i].key.clone();
        let mut r = Replica::new(key);
        for s in self.nodes[i].store.docs.values() {
            let d = Document::load_trusted(
                s.genesis.clone(),
                s.snapshot.as_deref(),
                s.changes.clone(),
                s.sigs.clone(),
            )
            .expect("own store loads");
            r.load(d);
        }
        self.nodes[i].replica = r;
        self.nodes[i].up = true;
        self.reconnect();
    }

    /// Runs a local action on node `i` and carries out its outputs.
    pub fn act<T>(&mut self, i: usize, f: impl FnOnce(&mut Replica, i64) -> (T, Vec<Output>)) -> T {
        self.now_ms += 1;
        let now = self.now_ms;
        let (v, outs) = f(&mut self.nodes[i].replica, now);
        self.acting = Some(i);
        self.handle(i, outs);
        self.acting = None;
        v
    }

    fn handle(&mut self, i: usize, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send { to, msg } => {
                    let Some(j) = (0..self.nodes.len()).find(|j| self.id(*j) == to) else {
                        continue;
                    };
                    self.sent_log.push((self.id(i), to, msg.doc));
                    if !self.linked(i, j) {
                        continue;
                    }
                    if self.rng.random_bool(self.faults.drop) {
                        continue;
                    }
                    let bytes = Frame::Sync(vec![msg]).encode();
                    let copies = if self.rng.random_bool(self.faults.duplicate) {
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        let delay = self.rng.random_range(0..=self.faults.max_delay_ms.max(0));
                        self.seq += 1;
                        self.queue.push(Reverse(InFlight {
                            at: self.now_ms + delay,
                            seq: self.seq,
                            from: i,
                            to: j,
                            bytes: bytes.clone(),
                        }));
                    }
                }
                Output::Persist {
                    doc,
                    genesis,
                    accepted,
                } => {
                    let node = &mut self.nodes[i];
                    if self.acting == Some(i) {
                        node.unsure.push(Unsure {
                            doc,
                            created: !node.store.docs.contains_key(&doc),
                            changes: accepted.changes.len(),
                            sigs: accepted.sigs.len(),
                        });
                    } else {
                        // A later write is durable, so are the earlier ones.
                        node.unsure.clear();
                    }
                    let store = &mut node.store;
                    let entry = store.docs.entry(doc).or_insert_with(|| StoredDoc {
                        genesis: genesis.clone().expect("first persist carries the genesis"),
                        snapshot: None,
                        changes: Vec::new(),
                        sigs: Vec::new(),
                    });
                    if let Some(s) = accepted.snapshot {
                        entry.snapshot = Some(s);
                        entry.changes.clear();
                    }
                    entry.changes.extend(accepted.changes);
                    entry.sigs.extend(accepted.sigs);
                }
                Output::Rejected { error, .. } => {
                    self.rejections.push((i, error.reason().to_string()))
                }
                Output::Updated { .. } => {}
            }
        }
    }

    /// Delivers one message; returns false if none is in flight.
    pub fn step(&mut self) -> bool {
        let Some(Reverse(m)) = self.queue.pop() else {
            return false;
        };
        self.now_ms = self.now_ms.max(m.at);
        if !self.linked(m.from, m.to) {
            return true;
        }
        self.delivered += 1;
        let from = self.id(m.from);
        let frame = Frame::decode(&m.bytes).expect("own encoding decodes");
        if let Frame::Sync(msgs) = frame {
            for msg in msgs {
                if std::env::var_os("COFAB_SIM_TRACE").is_some() {
                    let kind = match &msg.payload {
                        crate::wire::Payload::None => "none".to_string(),
                        crate::wire::Payload::Changes(b) => format!("{} changes", b.changes.len()),
                        crate::wire::Payload::Snapshot { .. } => "snapshot".to_string(),
                    };
                    eprintln!(
                        "t={} {}->{} doc={} clock={:?} g={} {}",
                        self.now_ms,
                        m.from,
                        m.to,
                        msg.doc,
                        msg.clock.values().collect::<Vec<_>>(),
                        msg.genesis.is_some(),
                        kind
                    );
                }
                let now = self.now_ms;
                let outs = self.nodes[m.to].replica.receive(from, msg, now);
                self.handle(m.to, outs);
            }
        }
        true
    }

    /// Quiet ticks in a row that prove quiescence: two (a tick leaves an exchange that
    /// moved since the previous tick alone), plus enough for every node's ticks to have
    /// visited each of its peers (one tick visits at most [`TICK_PEERS`]).
    fn quiet_ticks_needed(&self) -> usize {
        let most = self
            .nodes
            .iter()
            .map(|n| n.replica.connected().len())
            .max()
            .unwrap_or(0);
        1 + most.div_ceil(TICK_PEERS).max(1)
    }

    /// Delivers messages and ticks every node until nothing is in flight and enough
    /// ticks in a row send nothing (two, plus enough for every node to have visited all
    /// its peers). Panics with the seed if `max_steps` is exceeded.
    pub fn run_until_quiescent(&mut self, max_steps: usize) {
        let mut steps = 0;
        let mut quiet_ticks = 0;
        loop {
            while self.step() {
                steps += 1;
                assert!(
                    steps < max_steps,
                    "no quiescence after {max_steps} steps (seed {})",
                    self.seed
                );
            }
            self.now_ms += 100;
            let mut sent = false;
            for i in 0..self.nodes.len() {
                if !self.nodes[i].up {
                    continue;
                }
                let outs = self.nodes[i].replica.tick();
                sent |= outs.iter().any(|o| matches!(o, Output::Send { .. }));
                self.handle(i, outs);
            }
            if !sent && self.queue.is_empty() {
                quiet_ticks += 1;
                if quiet_ticks >= self.quiet_ticks_needed() {
                    return;
                }
            } else {
                quiet_ticks = 0;
            }
            steps += 1;
            assert!(
                steps < max_steps,
                "no quiescence after {max_steps} steps (seed {})",
                self.seed
            );
        }
    }
}
