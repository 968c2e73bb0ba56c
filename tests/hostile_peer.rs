//! A hostile peer over the real transport: a libp2p swarm built with the node's own
//! `build_swarm` (its own key) that speaks `/cofab/sync/2` to a real node and misbehaves,
//! while an honest node keeps working with the node under attack.
//!
//! For every attack: each bad message is counted under its reason in the node's rejection
//! counters, the offender's standing drops by 5 per message and at `BAN_STANDING` it is
//! disconnected and its later connections refused, a `members` document never reaches it,
//! the honest peer's order still converges (its sync latency is printed), and the node's
//! documents — in memory and in its store after shutdown — are exactly what the honest
//! traffic made them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cofab_node::libp2p::futures::StreamExt as _;
use cofab_node::libp2p::swarm::SwarmEvent;
use cofab_node::libp2p::{self, request_response, Multiaddr, PeerId};
use cofab_node::network::{build_swarm, BehaviourEvent, SYNC_PROTOCOL};
use cofab_node::node::BAN_STANDING;
use cofab_protocol::model::{self, BidInput, CapacityInput, OrderInput};
use cofab_protocol::wire::{
    Announcement, Frame, Payload, SyncMessage, MAX_FRAME_BYTES, WIRE_VERSION,
};
use cofab_protocol::{
    ChangeBatch, Clock, DecodeError, DocId, Document, Keypair, Kind, Role, Visibility,
};
use common::*;
use tokio::sync::{mpsc, oneshot};

/// Standing lost per refused message (README: −5 per refused input).
const STRIKE: i64 = 5;
/// Bad messages after which the offender is banned.
const STRIKES_TO_BAN: usize = (-BAN_STANDING / STRIKE) as usize;

// ---------- the hostile peer ----------

enum Cmd {
    Send(Vec<u8>, oneshot::Sender<Result<u8, String>>),
    Dial(Multiaddr),
}

/// What the hostile peer saw.
#[derive(Default)]
struct Seen {
    /// Documents named in sync frames the node sent us.
    docs: BTreeSet<DocId>,
    /// Connections established / closed with the target.
    established: usize,
    closed: usize,
    connected: bool,
}

/// A swarm with the node's behaviours and its own key, driven by a task.
struct Hostile {
    key: Keypair,
    peer_id: PeerId,
    tx: mpsc::Sender<Cmd>,
    seen: Arc<Mutex<Seen>>,
}

impl Hostile {
    fn spawn(key: Keypair, target: PeerId) -> Hostile {
        let mut swarm = build_swarm(&key, false).expect("swarm");
        let peer_id = *swarm.local_peer_id();
        let (tx, mut rx) = mpsc::channel::<Cmd>(1024);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        tokio::spawn(async move {
            let mut pending: BTreeMap<
                request_response::OutboundRequestId,
                oneshot::Sender<Result<u8, String>>,
            > = BTreeMap::new();
            loop {
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        None => return,
                        Some(Cmd::Send(bytes, reply)) => {
                            let id = swarm.behaviour_mut().sync.send_request(&target, cofab_node::network::SyncRequest::Frame(bytes));
                            pending.insert(id, reply);
                        }
                        Some(Cmd::Dial(a)) => { let _ = swarm.dial(a); }
                    },
                    ev = swarm.select_next_some() => match ev {
                        SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == target => {
                            let mut s = s.lock().unwrap();
                            s.established += 1;
                            s.connected = true;
                        }
                        SwarmEvent::ConnectionClosed { peer_id, num_established, .. } if peer_id == target => {
                            let mut s = s.lock().unwrap();
                            s.closed += 1;
                            s.connected = num_established > 0;
                        }
                        SwarmEvent::Behaviour(BehaviourEvent::Sync(ev)) => match ev {
                            request_response::Event::Message { message: request_response::Message::Request { request, channel, .. }, .. } => {
                                let bytes = match &request { cofab_node::network::SyncRequest::Frame(b) => b.as_slice(), _ => &[][..] };
                                if let Ok(Frame::Sync(msgs)) = Frame::decode(bytes) {
                                    s.lock().unwrap().docs.extend(msgs.iter().map(|m| m.doc));
                                }
                                let _ = swarm.behaviour_mut().sync.send_response(channel, 0);
                            }
                            request_response::Event::Message { message: request_response::Message::Response { request_id, response }, .. } => {
                                if let Some(r) = pending.remove(&request_id) { let _ = r.send(Ok(response)); }
                            }
                            request_response::Event::OutboundFailure { request_id, error, .. } => {
                                if let Some(r) = pending.remove(&request_id) { let _ = r.send(Err(error.to_string())); }
                            }
                            _ => {}
                        },
                        _ => {}
                    }
                }
            }
        });
        Hostile {
            key,
            peer_id,
            tx,
            seen,
        }
    }

    /// Sends one frame and waits for the node's answer (it answers before it processes the
    /// frame, on the same event-loop turn, so once the answer is here the frame was handled).
    async fn send(&self, bytes: Vec<u8>) -> Result<u8, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Send(bytes, tx))
            .await
            .expect("hostile task alive");
        rx.await.expect("hostile task answers")
    }

    async fn connect(&self, victim: &TestNode) {
        let addr = victim.handle().listen_addrs().await.unwrap()[0].clone();
        self.tx.send(Cmd::Dial(addr)).await.unwrap();
        let me = self.peer_id.to_string();
        wait_until(DEADLINE, || {
            let me = me.clone();
            async move {
                victim
                    .handle()
                    .read(move |c| c.peers.iter().any(|p| p.peer_id == me))
                    .await
                    .unwrap()
            }
        })
        .await;
    }
}

// ---------- the setting: a node under attack and an honest peer ----------

struct Setting {
    victim: TestNode,
    honest: TestNode,
    /// The honest peer's public order (it keeps commenting on it during attacks).
    honest_order: DocId,
    /// The victim's own public order.
    own_order: DocId,
    /// The victim's capacity.
    capacity: DocId,
    /// A members order of the victim's, shared with the honest peer only.
    members_order: DocId,
    /// Heads of every document before any attack.
    before: BTreeMap<DocId, Vec<String>>,
    comments: usize,
}

async fn holdings(node: &TestNode) -> BTreeMap<DocId, Vec<String>> {
    node.handle()
        .read(|c| {
            c.replica
                .docs()
                .map(|d| (d.id(), d.heads().iter().map(|h| h.to_string()).collect()))
                .collect()
        })
        .await
        .unwrap()
}

async fn setting(test: &str) -> Setting {
    let mut net = start_net(test, 2).await;
    let honest = net.pop().unwrap();
    let victim = net.pop().unwrap();
    let o = OrderInput {
        title: "Pin, hardened".into(),
        quantity: 1000,
        visibility: Visibility::Public,
        ..Default::default()
    };
    let honest_order = honest
        .handle()
        .create(move |kp, now, n| model::create_order(kp, &o, now, n))
        .await
        .unwrap();
    let o = OrderInput {
        title: "Sleeve".into(),
        quantity: 40,
        visibility: Visibility::Public,
        ..Default::default()
    };
    let own_order = victim
        .handle()
        .create(move |kp, now, n| model::create_order(kp, &o, now, n))
        .await
        .unwrap();
    let c = CapacityInput {
        name: "Victim AG".into(),
        ..Default::default()
    };
    let capacity = victim
        .handle()
        .create(move |kp, now, n| model::create_capacity(kp, &c, now, n))
        .await
        .unwrap();
    let mut o = OrderInput {
        title: "Secret prototype".into(),
        quantity: 3,
        visibility: Visibility::Members,
        ..Default::default()
    };
    o.members.insert(honest.key.id(), Role::Supplier);
    let members_order = victim
        .handle()
        .create(move |kp, now, n| model::create_order(kp, &o, now, n))
        .await
        .unwrap();
    for d in [honest_order, own_order, capacity, members_order] {
        wait_converged(&[&victim, &honest], d).await;
    }
    let before = holdings(&victim).await;
    assert_eq!(before.len(), 4);
    Setting {
        victim,
        honest,
        honest_order,
        own_order,
        capacity,
        members_order,
        before,
        comments: 0,
    }
}

impl Setting {
    /// The honest peer comments on its order; returns how long until the victim has it.
    async fn honest_round_trip(&mut self) -> Duration {
        let id = self.honest_order;
        self.comments += 1;
        let text = format!("honest note {}", self.comments);
        let t = Instant::now();
        self.honest
            .handle()
            .edit(id, move |d, kp, now| model::comment(d, kp, now, &text))
            .await
            .unwrap();
        wait_converged(&[&self.victim, &self.honest], id).await;
        t.elapsed()
    }

    async fn rejected(&self) -> BTreeMap<String, u64> {
        self.victim
            .handle()
            .read(|c| c.rejected.clone())
            .await
            .unwrap()
    }

    async fn standing(&self, peer: PeerId) -> Option<i64> {
        let p = peer.to_string();
        self.victim
            .handle()
            .read(move |c| c.peers.iter().find(|x| x.peer_id == p).map(|x| x.standing))
            .await
            .unwrap()
    }

    /// Sends `frames` (each must be refused with the given reason) from a fresh hostile
    /// peer, checking counters and standing after each; the last one must get it banned.
    async fn strike_out(
        &mut self,
        hostile: &Hostile,
        frames: Vec<(Vec<u8>, &'static str)>,
    ) -> usize {
        assert_eq!(
            frames.len(),
            STRIKES_TO_BAN,
            "each attacker gets exactly enough strikes to be banned"
        );
        hostile.connect(&self.victim).await;
        assert_eq!(self.standing(hostile.peer_id).await, Some(0));
        let mut tried = 0;
        for (k, (bytes, reason)) in frames.into_iter().enumerate() {
            let before = self.rejected().await;
            let r = hostile.send(bytes).await;
            tried += 1;
            // The refusal is counted once the node handled the frame: wait for the counter.
            let want = before.get(reason).copied().unwrap_or(0) + 1;
            wait_until(DEADLINE, || async {
                self.rejected().await.get(reason).copied().unwrap_or(0) >= want
            })
            .await;
            let after = self.rejected().await;
            assert_eq!(
                diff(&before, &after),
                BTreeMap::from([(reason.to_string(), 1)]),
                "message {k} (answer {r:?}): exactly one rejection, as {reason}"
            );
            let strikes = k as i64 + 1;
            if strikes as usize == STRIKES_TO_BAN {
                // Past the threshold: disconnected and banned.
                let me = hostile.peer_id;
                wait_until(DEADLINE, || async {
                    self.standing(me).await.is_none() && !hostile.seen.lock().unwrap().connected
                })
                .await;
            } else {
                assert_eq!(
                    self.standing(hostile.peer_id).await,
                    Some(-STRIKE * strikes),
                    "standing after {strikes} bad messages"
                );
            }
            // The honest peer is still served.
            let lat = self.honest_round_trip().await;
            println!("  honest sync after bad message {strikes} ({reason}): {lat:?}");
        }
        self.assert_banned(hostile).await;
        tried
    }

    /// A banned peer's new connections are closed at once and what it sends is not handled.
    async fn assert_banned(&self, hostile: &Hostile) {
        let counted = self.rejected().await;
        let closed = hostile.seen.lock().unwrap().closed;
        let addr = self.victim.handle().listen_addrs().await.unwrap()[0].clone();
        hostile.tx.send(Cmd::Dial(addr)).await.unwrap();
        wait_until(DEADLINE, || async {
            hostile.seen.lock().unwrap().closed > closed
        })
        .await;
        for _ in 0..3 {
            let _ = hostile.send(vec![WIRE_VERSION, 0xee]).await;
        }
        assert_eq!(
            self.standing(hostile.peer_id).await,
            None,
            "a banned peer is not a peer"
        );
        assert_eq!(
            self.rejected().await,
            counted,
            "frames of a banned peer were handled"
        );
    }

    /// The attack changed nothing but what the honest peer did; the store agrees.
    async fn finish(self, attackers: &[&Hostile]) {
        let now = holdings(&self.victim).await;
        assert_eq!(
            now.keys().collect::<Vec<_>>(),
            self.before.keys().collect::<Vec<_>>(),
            "the set of documents changed"
        );
        for (d, h) in &self.before {
            if *d != self.honest_order {
                assert_eq!(&now[d], h, "document {d} changed under attack");
            }
        }
        assert_eq!(
            now[&self.honest_order],
            heads(&self.honest, self.honest_order).await
        );
        let v = self
            .victim
            .handle()
            .read({
                let id = self.honest_order;
                move |c| c.replica.doc(&id).and_then(model::order_view)
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v.discussion.len(), self.comments, "honest comments lost");
        assert!(v.bids.is_empty(), "a hostile bid got in: {:?}", v.bids);
        for a in attackers {
            let seen = a.seen.lock().unwrap();
            assert!(
                !seen.docs.contains(&self.members_order),
                "the members order reached a non-member"
            );
        }
        self.victim.handle().shutdown().await;
        let _ = self.victim.node.task.await;
        let store = cofab_node::store::Store::open(&self.victim.dir.path().join("store")).unwrap();
        let stored: BTreeMap<DocId, Vec<String>> = store
            .load_all()
            .unwrap()
            .into_iter()
            .map(|s| {
                let d = Document::load_trusted(s.genesis, s.snapshot.as_deref(), s.changes, s.sigs)
                    .unwrap();
                (d.id(), d.heads().iter().map(|h| h.to_string()).collect())
            })
            .collect();
        assert_eq!(
            stored, now,
            "stored documents differ from what the node held"
        );
        self.honest.handle().shutdown().await;
    }
}

/// The reason label the node gives a frame that does not decode.
fn decode_reason(bytes: &[u8]) -> &'static str {
    match Frame::decode(bytes) {
        Ok(f) => panic!("test frame decodes: {f:?}"),
        Err(DecodeError::UnknownVersion(_)) => "unknown_version",
        Err(DecodeError::TooLarge { .. }) => "oversized",
        Err(DecodeError::Truncated) => "truncated",
        Err(_) => "malformed_frame",
    }
}

fn frames(list: Vec<Vec<u8>>) -> Vec<(Vec<u8>, &'static str)> {
    list.into_iter()
        .map(|b| {
            let r = decode_reason(&b);
            (b, r)
        })
        .collect()
}

/// A pseudo-random byte string (xorshift; no extra dependency).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A real sync frame of the victim's own order, as the node would send it.
async fn real_frame(s: &Setting) -> Vec<u8> {
    let id = s.own_order;
    let doc = s
        .victim
        .handle()
        .read(move |c| c.replica.doc(&id).cloned())
        .await
        .unwrap()
        .unwrap();
    let all = cofab_protocol::Accepted {
        changes: doc
            .automerge()
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect(),
        sigs: doc.signatures().map(|(h, s)| (*h, *s)).collect(),
        snapshot: None,
    };
    Frame::Sync(vec![carrying(&doc, true, all)]).encode()
}

/// Garbage, truncated frames, unknown versions and frames over 16 MiB, each from its own
/// hostile peer: every frame counted under its reason, standing −5 each, banned at the
/// fourth; the honest peer's order keeps converging throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_counted_and_the_sender_banned() {
    let mut s = setting("hostile_frames").await;
    let target = s.victim.handle().info.peer_id;
    println!(
        "  honest sync before the attack: {:?}",
        s.honest_round_trip().await
    );
    let real = real_frame(&s).await;
    let mut tried = 0;

    // Garbage: random bytes behind a valid version and type, an unknown type, an empty frame.
    let garbage = Hostile::spawn(test_key("hostile_frames", 10), target);
    let mut g1 = vec![WIRE_VERSION, 1];
    g1.extend(noise(1, 300));
    let mut g2 = vec![WIRE_VERSION, 2, 0xff, 0xff, 0xff, 0xff, 0x0f];
    g2.extend(noise(2, 64));
    let list = frames(vec![g1, g2, vec![WIRE_VERSION, 0x7f, 1, 2, 3], Vec::new()]);
    tried += s.strike_out(&garbage, list).await;

    // Truncated: a real frame cut at four places.
    let truncated = Hostile::spawn(test_key("hostile_frames", 11), target);
    let cuts = [3, 20, real.len() / 2, real.len() - 1];
    let list = frames(cuts.iter().map(|&n| real[..n].to_vec()).collect());
    assert!(
        list.iter().all(|(_, r)| *r == "truncated"),
        "cuts: {:?}",
        list.iter().map(|x| x.1).collect::<Vec<_>>()
    );
    tried += s.strike_out(&truncated, list).await;

    // Unknown versions: the real frame with versions 0, 1 (before incarnations), 9, 255.
    let versions = Hostile::spawn(test_key("hostile_frames", 12), target);
    let list = frames(
        [0u8, 1, 9, 255]
            .iter()
            .map(|&v| {
                let mut f = real.clone();
                f[0] = v;
                f
            })
            .collect(),
    );
    assert!(list.iter().all(|(_, r)| *r == "unknown_version"));
    tried += s.strike_out(&versions, list).await;

    println!("hostile frames: {tried} bad frames from 3 peers, all counted, 3 bans (oversized frames: see oversized_frames_are_counted_and_the_sender_banned); rejected = {:?}", s.rejected().await);
    s.finish(&[&garbage, &truncated, &versions]).await;
}

fn oversized_lengths() -> [usize; 4] {
    [
        MAX_FRAME_BYTES + 1,
        MAX_FRAME_BYTES * 2,
        u32::MAX as usize,
        MAX_FRAME_BYTES + 4096,
    ]
}

/// Rejections in `after` beyond `before`, by reason.
fn diff(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// Frames over 16 MiB are counted as `oversized` and get their sender banned like any
/// other bad frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_counted_and_the_sender_banned() {
    let mut s = setting("hostile_oversized").await;
    let target = s.victim.handle().info.peer_id;
    let big = Hostile::spawn_liar(test_key("hostile_oversized", 13), target);
    let list = oversized_lengths()
        .iter()
        .map(|&n| ((n as u32).to_be_bytes().to_vec(), "oversized"))
        .collect();
    s.strike_out(&big, list).await;
    s.finish(&[&big]).await;
}

/// A sync message with a forged signature, an unsigned change, a change replayed from
/// another document and a request for a `members` document the peer is not a member of:
/// all refused with their reason, the peer banned, the members document never sent to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_unauthorised_sync_is_refused() {
    let mut s = setting("hostile_sync").await;
    let target = s.victim.handle().info.peer_id;
    let attacker = Hostile::spawn(test_key("hostile_sync", 10), target);
    let victim = s.victim.handle().clone();
    let doc_of = |id: DocId| {
        let v = victim.clone();
        async move {
            v.read(move |c| c.replica.doc(&id).cloned())
                .await
                .unwrap()
                .unwrap()
        }
    };
    let bid = BidInput {
        unit_price: 0.01,
        currency: "EUR".into(),
        lead_time_days: 1,
        ..Default::default()
    };
    let changes_msg = |doc: DocId, batch: ChangeBatch| {
        Frame::Sync(vec![SyncMessage {
            doc,
            genesis: None,
            clock: Clock::new(),
            heads: vec![],
            payload: Payload::Changes(batch),
            decline: false,
        }])
        .encode()
    };

    // 1. Asks for the members order as if it could hold it.
    let ask = Frame::Sync(vec![SyncMessage {
        doc: s.members_order,
        genesis: None,
        clock: Clock::new(),
        heads: vec![],
        payload: Payload::None,
        decline: false,
    }])
    .encode();
    // 2. A bid on the honest order signed with someone else's key.
    let mut d = doc_of(s.honest_order).await;
    let acc = model::place_bid(&mut d, &attacker.key, 1, &bid).unwrap();
    let hash = acc.sigs[0].0;
    let forger = Keypair::from_secret([0x42; 32]);
    let forged = changes_msg(
        s.honest_order,
        ChangeBatch {
            changes: acc.changes,
            sigs: vec![(hash, forger.sign_change(&s.honest_order, &hash).to_bytes())],
        },
    );
    // 3. A bid on the victim's own order without a signature.
    let mut d = doc_of(s.own_order).await;
    let acc = model::place_bid(&mut d, &attacker.key, 1, &bid).unwrap();
    let unsigned = changes_msg(
        s.own_order,
        ChangeBatch {
            changes: acc.changes.clone(),
            sigs: vec![],
        },
    );
    // 4. That bid, signed, replayed into the victim's capacity document.
    let replayed = changes_msg(
        s.capacity,
        ChangeBatch {
            changes: acc.changes,
            sigs: acc.sigs,
        },
    );
    let list = vec![
        (ask, "not_allowed"),
        (forged, "bad_signature"),
        (unsigned, "unsigned"),
        (replayed, "wrong_document"),
    ];
    let tried = s.strike_out(&attacker, list).await;
    println!(
        "hostile sync: {tried} forged/unauthorised messages, all counted, 1 ban; rejected = {:?}",
        s.rejected().await
    );
    s.finish(&[&attacker]).await;
}

fn latency(v: &[Duration]) -> String {
    let mut v = v.to_vec();
    v.sort();
    format!(
        "{} round trips, min {:?}, median {:?}, max {:?}",
        v.len(),
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

/// Request `i` of a flood: an empty frame, a hello for a document that does not exist, or
/// an announcement of eight documents that do not exist.
fn flood_frame(i: usize, owner: cofab_protocol::EnterpriseId) -> Vec<u8> {
    let phantom = |seed: u64| DocId(noise(seed, 16).try_into().unwrap());
    match i % 3 {
        0 => Frame::Sync(vec![]).encode(),
        1 => Frame::Sync(vec![SyncMessage {
            doc: phantom(i as u64 + 7),
            genesis: None,
            clock: Clock::new(),
            heads: vec![],
            payload: Payload::None,
            decline: false,
        }])
        .encode(),
        _ => Frame::Announce(
            (0..8)
                .map(|k| Announcement {
                    doc: phantom((i * 8 + k) as u64 + 99),
                    kind: Kind::Order,
                    owner,
                    changes: 5,
                })
                .collect(),
        )
        .encode(),
    }
}

/// Sends `frames` with at most `window` unanswered at a time; returns (answered, failures by error).
async fn pump(
    h: &Hostile,
    frames: impl Iterator<Item = Vec<u8>>,
    window: usize,
) -> (usize, BTreeMap<String, usize>) {
    let mut ok = 0;
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut inflight = std::collections::VecDeque::new();
    for bytes in frames {
        if inflight.len() >= window {
            let rx: oneshot::Receiver<Result<u8, String>> = inflight.pop_front().unwrap();
            match rx.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => *errors.entry(e).or_default() += 1,
            }
        }
        let (tx, rx) = oneshot::channel();
        h.tx.send(Cmd::Send(bytes, tx)).await.unwrap();
        inflight.push_back(rx);
    }
    for rx in inflight {
        match rx.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => *errors.entry(e).or_default() += 1,
        }
    }
    (ok, errors)
}

/// A flood of requests — empty frames, hellos and announcements for documents that do not
/// exist — while the honest peer keeps syncing: first sustained (at most 128 unanswered,
/// every request must be answered and handled), then a burst of 3000 at once, which the
/// stream multiplexer cuts off by closing the connection. The node creates no phantom
/// document and the honest peer's order converges during and after both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_requests_does_not_starve_an_honest_peer() {
    let mut s = setting("hostile_flood").await;
    let target = s.victim.handle().info.peer_id;
    let mut quiet = Vec::new();
    for _ in 0..3 {
        quiet.push(s.honest_round_trip().await);
    }
    let flooder = Hostile::spawn(test_key("hostile_flood", 10), target);
    flooder.connect(&s.victim).await;
    let owner = flooder.key.id();
    let metrics = s.victim.handle().metrics.clone();
    let frames_in = || metrics.frames_in.load(std::sync::atomic::Ordering::Relaxed);

    // Sustained.
    let n: usize = std::env::var("COFAB_FLOOD_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let before = frames_in();
    let done = std::sync::atomic::AtomicBool::new(false);
    let flood = async {
        let r = pump(&flooder, (0..n).map(|i| flood_frame(i, owner)), 128).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    };
    let honest = async {
        let mut during = Vec::new();
        while during.len() < 3 || !done.load(std::sync::atomic::Ordering::SeqCst) {
            during.push(s.honest_round_trip().await);
        }
        during
    };
    let ((ok, errors), during) = tokio::join!(flood, honest);
    let handled = frames_in() - before;
    println!("flood (sustained): {n} requests, {ok} answered, errors {errors:?}, {handled} frames handled by the node");
    println!("flood: honest sync latency quiet: {}", latency(&quiet));
    println!(
        "flood: honest sync latency during the sustained flood: {}",
        latency(&during)
    );
    assert_eq!(
        ok, n,
        "every request of a sustained flood is answered: {errors:?}"
    );
    assert!(
        handled as usize >= n,
        "the node handled {handled} of {n} requests"
    );
    assert!(
        s.standing(flooder.peer_id).await.is_some(),
        "the flooder is still connected"
    );

    // Burst: everything at once.
    let burst = 3000;
    let before = frames_in();
    let (ok, errors) = pump(
        &flooder,
        (0..burst).map(|i| flood_frame(i + n, owner)),
        burst,
    )
    .await;
    let handled = frames_in() - before;
    let (est, closed) = {
        let seen = flooder.seen.lock().unwrap();
        (seen.established, seen.closed)
    };
    println!("flood (burst): {burst} requests, {ok} answered, errors {errors:?}, {handled} handled; flooder connections established {est} closed {closed}");
    let after = s.honest_round_trip().await;
    println!("flood: honest sync after the burst {after:?}");
    s.finish(&[&flooder]).await;
}

// ---------- a codec that lies about the frame length ----------

/// On `/cofab/sync/1`, writes the request bytes as they are (the test passes a 4-byte
/// length prefix over the limit) followed by 64 KiB of body.
#[derive(Clone, Default)]
struct Liar;

impl request_response::Codec for Liar {
    type Protocol = libp2p::StreamProtocol;
    type Request = Vec<u8>;
    type Response = u8;

    async fn read_request<T: libp2p::futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &Self::Protocol,
        _: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        Err(std::io::Error::other("the liar takes no requests"))
    }
    async fn read_response<T: libp2p::futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
    ) -> std::io::Result<u8> {
        use libp2p::futures::AsyncReadExt;
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await?;
        Ok(b[0])
    }
    async fn write_request<T: libp2p::futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        prefix: Vec<u8>,
    ) -> std::io::Result<()> {
        use libp2p::futures::AsyncWriteExt;
        io.write_all(&prefix).await?;
        io.write_all(&noise(3, 64 * 1024)).await?;
        io.flush().await
    }
    async fn write_response<T: libp2p::futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &Self::Protocol,
        _: &mut T,
        _: u8,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

impl Hostile {
    /// A hostile peer whose only behaviour is the lying codec (tcp, noise, yamux as the node).
    fn spawn_liar(key: Keypair, target: PeerId) -> Hostile {
        let mut swarm =
            libp2p::SwarmBuilder::with_existing_identity(cofab_node::network::libp2p_keypair(&key))
                .with_tokio()
                .with_tcp(
                    libp2p::tcp::Config::default().nodelay(true),
                    libp2p::noise::Config::new,
                    libp2p::yamux::Config::default,
                )
                .expect("tcp")
                .with_behaviour(|_| {
                    request_response::Behaviour::with_codec(
                        Liar,
                        [(SYNC_PROTOCOL, request_response::ProtocolSupport::Outbound)],
                        request_response::Config::default(),
                    )
                })
                .expect("behaviour")
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
                .build();
        let peer_id = *swarm.local_peer_id();
        let (tx, mut rx) = mpsc::channel::<Cmd>(1024);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        tokio::spawn(async move {
            let mut pending: BTreeMap<
                request_response::OutboundRequestId,
                oneshot::Sender<Result<u8, String>>,
            > = BTreeMap::new();
            loop {
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        None => return,
                        Some(Cmd::Send(bytes, reply)) => {
                            let id = swarm.behaviour_mut().send_request(&target, bytes);
                            pending.insert(id, reply);
                        }
                        Some(Cmd::Dial(a)) => { let _ = swarm.dial(a); }
                    },
                    ev = swarm.select_next_some() => match ev {
                        SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == target => {
                            let mut s = s.lock().unwrap();
                            s.established += 1;
                            s.connected = true;
                        }
                        SwarmEvent::ConnectionClosed { peer_id, num_established, .. } if peer_id == target => {
                            let mut s = s.lock().unwrap();
                            s.closed += 1;
                            s.connected = num_established > 0;
                        }
                        SwarmEvent::Behaviour(request_response::Event::Message { message: request_response::Message::Response { request_id, response }, .. }) => {
                            if let Some(r) = pending.remove(&request_id) { let _ = r.send(Ok(response)); }
                        }
                        SwarmEvent::Behaviour(request_response::Event::OutboundFailure { request_id, error, .. }) => {
                            if let Some(r) = pending.remove(&request_id) { let _ = r.send(Err(error.to_string())); }
                        }
                        _ => {}
                    }
                }
            }
        });
        Hostile {
            key,
            peer_id,
            tx,
            seen,
        }
    }
}

/// A sync message about `doc` as its holder would send it, carrying what an edit
/// added (and the genesis if `with_genesis`).
fn carrying(doc: &Document, with_genesis: bool, added: cofab_protocol::Accepted) -> SyncMessage {
    SyncMessage {
        doc: doc.id(),
        genesis: with_genesis.then(|| {
            (
                doc.signed_genesis().bytes().to_vec(),
                doc.signed_genesis().signature(),
            )
        }),
        clock: doc.clock(),
        heads: doc.heads(),
        payload: Payload::Changes(ChangeBatch {
            changes: added.changes,
            sigs: added.sigs,
        }),
        decline: false,
    }
}

/// A frame large enough to be verified on two threads (greetings of 12 documents, each
/// with its genesis and first changes), one of whose geneses carries the signature of
/// another: the forged one is refused as `genesis` (counted once) and never held, the
/// 11 honest documents are taken whole, and the victim's own documents are untouched.
/// Then a frame of comments on those documents with one forged change signature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_signatures_in_a_large_frame_are_refused_and_the_rest_taken() {
    let s = setting("hostile_genesis_frame").await;
    let target = s.victim.handle().info.peer_id;
    let sender = Hostile::spawn(test_key("hostile_genesis_frame", 11), target);
    let mut msgs = Vec::new();
    let mut docs = Vec::new();
    for i in 0..12u64 {
        let input = OrderInput {
            title: format!("frame order {i}"),
            quantity: 1,
            visibility: Visibility::Public,
            ..Default::default()
        };
        let (doc, acc) = model::create_order(&sender.key, &input, 1_000 + i as i64, i).unwrap();
        msgs.push(carrying(&doc, true, acc));
        docs.push(doc.id());
    }
    // Message 5 gets message 6's genesis signature.
    let other = msgs[6].genesis.as_ref().unwrap().1;
    msgs[5].genesis.as_mut().unwrap().1 = other;
    let forged = docs[5];
    sender.connect(&s.victim).await;
    let before = s.rejected().await;
    sender.send(Frame::Sync(msgs).encode()).await.unwrap();
    let victim = s.victim.handle().clone();
    let honest: Vec<DocId> = docs.iter().copied().filter(|d| *d != forged).collect();
    wait_until(DEADLINE, || {
        let v = victim.clone();
        let want = honest.clone();
        async move {
            v.read(move |c| {
                want.iter()
                    .all(|d| c.replica.doc(d).is_some_and(|x| !x.is_empty()))
            })
            .await
            .unwrap()
        }
    })
    .await;
    let after = s.rejected().await;
    assert_eq!(
        diff(&before, &after),
        BTreeMap::from([("genesis".to_string(), 1)]),
        "exactly the forged genesis refused"
    );
    let held = holdings(&s.victim).await;
    assert!(!held.contains_key(&forged), "the forged document is held");
    for d in &honest {
        let v = victim
            .read({
                let d = *d;
                move |c| c.replica.doc(&d).and_then(model::order_view)
            })
            .await
            .unwrap()
            .expect("an honest order");
        assert!(v.title.starts_with("frame order"), "{v:?}");
    }
    for (d, h) in &s.before {
        if *d != s.honest_order {
            assert_eq!(&held[d], h, "document {d} changed");
        }
    }

    // Then a frame of 11 comments, one per document now held (prepared on two threads,
    // each signature checked on its own), one of them signed with another key: that one is
    // refused as `bad_signature`, the other 10 are taken.
    let mut docs_now = Vec::new();
    for d in &honest {
        let d = *d;
        docs_now.push(
            victim
                .read(move |c| c.replica.doc(&d).cloned())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let forger = Keypair::from_secret([0x43; 32]);
    let mut msgs = Vec::new();
    for (k, doc) in docs_now.iter_mut().enumerate() {
        let mut acc = model::comment(doc, &sender.key, 2_000, "frame note").unwrap();
        if k == 3 {
            let (h, _) = acc.sigs[0];
            acc.sigs = vec![(h, forger.sign_change(&doc.id(), &h).to_bytes())];
        }
        msgs.push(carrying(doc, false, acc));
    }
    let forged_comment = honest[3];
    let before = s.rejected().await;
    sender.send(Frame::Sync(msgs).encode()).await.unwrap();
    let others: Vec<DocId> = honest
        .iter()
        .copied()
        .filter(|d| *d != forged_comment)
        .collect();
    wait_until(DEADLINE, || {
        let v = victim.clone();
        let want = others.clone();
        async move {
            v.read(move |c| {
                want.iter().all(|d| {
                    c.replica
                        .doc(d)
                        .and_then(model::order_view)
                        .is_some_and(|o| o.discussion.len() == 1)
                })
            })
            .await
            .unwrap()
        }
    })
    .await;
    wait_until(DEADLINE, || async {
        s.rejected()
            .await
            .get("bad_signature")
            .copied()
            .unwrap_or(0)
            > before.get("bad_signature").copied().unwrap_or(0)
    })
    .await;
    assert_eq!(
        diff(&before, &s.rejected().await),
        BTreeMap::from([("bad_signature".to_string(), 1)]),
        "exactly the forged comment refused"
    );
    let forged_view = victim
        .read(move |c| c.replica.doc(&forged_comment).and_then(model::order_view))
        .await
        .unwrap()
        .unwrap();
    assert!(
        forged_view.discussion.is_empty(),
        "the forged comment got in"
    );
}
