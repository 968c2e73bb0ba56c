//! The node: one event loop that owns the swarm, the replica and the store, and a
//! cloneable [`NodeHandle`] through which everything else (API, CLI, tests) talks to it.
//! The loop runs on a thread of its own with a single-threaded runtime, which also runs
//! the swarm's connection tasks (see [`Node::start`]).
//!
//! Owns: the order of effects. Every loop iteration gathers the replica's outputs,
//! sends what peers should get, writes the rest to the store as one group, and
//! acknowledges callers only once that group is durable. A crash can therefore lose a
//! change peers already hold; the node then restarts as its next incarnation
//! ([`cofab_protocol::Author`]), so it never contradicts that change (see `commit`).
//! Must not: block on anything but the store's group commit; decide rules (the
//! replica does).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cofab_protocol::document::{Accepted, Document};
use cofab_protocol::sync::{FetchPolicy, Output, PreparedMsg, Replica, ReplicaError};
use cofab_protocol::wire::{Announcement, Frame, SyncMessage, MAX_FRAME_BYTES};
use cofab_protocol::{DocId, EditError, EnterpriseId, Keypair, Kind, Visibility};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, identify, kad, mdns, request_response, Multiaddr, PeerId, Swarm};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::network::{self, Behaviour, BehaviourEvent};
use crate::store::{Store, Write};

/// Capacity of the command channel.
pub const COMMAND_QUEUE: usize = 1024;
/// Capacity of the event broadcast.
pub const EVENT_QUEUE: usize = 4096;
/// Most commands handled in one group commit.
pub const MAX_COMMANDS_PER_COMMIT: usize = 1024;
/// A document's incremental changes are folded into a snapshot past this count.
pub const COMPACT_AFTER: usize = 4096;
/// Standing below which a peer is disconnected and banned.
pub const BAN_STANDING: i64 = -20;
/// Sync frames a peer may send per second, sustained (a token bucket per peer). Frames
/// over the rate are answered, counted as `rate_limited` and dropped unread; sync repairs
/// itself, so an honest peer only slows down.
pub const MAX_FRAMES_PER_SEC: f64 = 5_000.0;
/// Frames a peer may send at once before the rate applies.
pub const FRAME_BURST: f64 = 2_000.0;

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            rate,
            burst,
            last: now,
        }
    }
    /// Takes a token if there is one.
    pub fn allow(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Unanswered sync frames per peer. A peer answers a frame as soon as it has read it, so
/// this only bounds pipelining: messages queued meanwhile travel together in the next
/// frame, and fewer, larger frames cost the receiver far less than many small ones (it
/// verifies and applies per frame). With 32, `bench` (d) one change per request fell from
/// ≈8.7k to ≈6.0k acknowledged/s once frames stopped waiting a round trip for protocol
/// negotiation (`network`: V1Lazy); 1 and 2 measured alike ((d) 6.0–7.3k/s, (a) unchanged),
/// and 2 lets a small frame go out while a large one is still on its way.
pub const MAX_INFLIGHT_PER_PEER: usize = 2;
/// Messages queued for one peer beyond which the oldest are shed (sync repairs itself).
pub const MAX_QUEUED_PER_PEER: usize = 100_000;
/// Target size of one outgoing frame.
const FRAME_BUDGET: usize = 4 * 1024 * 1024;

/// Node settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Enterprise key.
    pub key: Keypair,
    /// Display name of the enterprise.
    pub name: String,
    /// Where the sled store lives.
    pub store_dir: PathBuf,
    /// Listen addresses (e.g. `/ip4/127.0.0.1/tcp/0`).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (with or without `/p2p/<peer id>`).
    pub bootstrap: Vec<Multiaddr>,
    /// LAN discovery.
    pub mdns: bool,
    /// Which public documents to fetch.
    pub fetch: FetchPolicy,
    /// Period of the sync repair tick.
    pub tick: Duration,
    /// Enterprises whose security alerts we act on: a peer they report is banned here.
    pub trust_alerts_from: std::collections::BTreeSet<EnterpriseId>,
    /// Answer Kademlia queries (server mode; the default). A server is also put in its
    /// peers' routing tables, and Kademlia's automatic bootstrap then connects a small
    /// network into a full mesh. `false` (client mode) still queries bootstrap peers but
    /// keeps the connections the operator made.
    pub kad_server: bool,
    /// Most established connections in total.
    pub max_connections: u32,
}

impl NodeConfig {
    /// Defaults for a key and a store folder: listen on 127.0.0.1 (random port), mDNS off.
    pub fn new(key: Keypair, name: impl Into<String>, store_dir: PathBuf) -> Self {
        Self {
            key,
            name: name.into(),
            store_dir,
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid")],
            bootstrap: Vec::new(),
            mdns: false,
            fetch: FetchPolicy::default(),
            tick: Duration::from_millis(1000),
            trust_alerts_from: Default::default(),
            kad_server: true,
            max_connections: network::MAX_CONNECTIONS,
        }
    }
}

/// Errors of the node handle.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node has stopped.
    #[error("node stopped")]
    Stopped,
    /// No such document.
    #[error("no document {0}")]
    NotFound(DocId),
    /// The edit was refused.
    #[error(transparent)]
    Edit(#[from] EditError),
    /// The store failed: the write is not acknowledged.
    #[error("store failed: {0}")]
    Store(String),
    /// Starting failed.
    #[error("start: {0}")]
    Start(String),
    /// Network operation failed.
    #[error("network: {0}")]
    Network(String),
}

impl From<ReplicaError> for NodeError {
    fn from(e: ReplicaError) -> Self {
        match e {
            ReplicaError::NotFound(d) => NodeError::NotFound(d),
            ReplicaError::Edit(e) => NodeError::Edit(e),
        }
    }
}

/// Something that happened, for the event stream.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A document changed (locally or from a peer).
    DocUpdated {
        /// Document id.
        doc: String,
        /// Kind.
        kind: Kind,
        /// Peer enterprise it came from, if remote.
        from: Option<String>,
        /// For a local change, when this node began making it (before the automerge
        /// transaction, the rule check and the signature); for a received one, when it
        /// was applied here. On the machine's monotonic clock in ns ([`mono_ns`]):
        /// processes on one machine can compare these, which is how `cofab bench`
        /// measures one-way latency.
        at_ns: u64,
    },
    /// A peer connected.
    PeerConnected {
        /// Peer id.
        peer_id: String,
        /// Enterprise id.
        enterprise_id: Option<String>,
    },
    /// A peer disconnected.
    PeerDisconnected {
        /// Peer id.
        peer_id: String,
    },
    /// A security alert was published by us or received from a peer.
    Alert(AlertRecord),
    /// Input from a peer was refused.
    Rejected {
        /// Peer id.
        peer_id: String,
        /// Document, if known.
        doc: Option<String>,
        /// Reason label.
        reason: String,
        /// Detail.
        detail: String,
    },
}

/// Alerts we publish at most, per minute (and at most one per offender per minute).
pub const ALERTS_PER_MINUTE: f64 = 10.0;
/// Alerts kept for the API.
pub const ALERTS_KEPT: usize = 1000;

/// A security alert as the API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AlertRecord {
    /// Enterprise that refused the input (authenticated gossip source).
    pub reporter: String,
    /// Enterprise whose peer sent it.
    pub offender: String,
    /// Reason label.
    pub reason: String,
    /// SHA-256 of the evidence, hex.
    pub evidence: String,
    /// Reporter's time, unix ms.
    pub at_ms: i64,
    /// Whether we published it.
    pub ours: bool,
    /// Whether we banned the offender because we trust the reporter.
    pub acted: bool,
}

/// Counters exported as Prometheus metrics.
#[derive(Default, Debug)]
pub struct Metrics {
    /// Frames received.
    pub frames_in: AtomicU64,
    /// Frames sent.
    pub frames_out: AtomicU64,
    /// Bytes received in frames.
    pub bytes_in: AtomicU64,
    /// Bytes sent in frames.
    pub bytes_out: AtomicU64,
    /// Group commits.
    pub commits: AtomicU64,
    /// Sync round trip histogram buckets (µs upper bounds in [`RTT_BUCKETS_US`]).
    pub rtt_buckets: [AtomicU64; 12],
    /// Sum of sync round trips, µs.
    pub rtt_sum_us: AtomicU64,
    /// Count of sync round trips.
    pub rtt_count: AtomicU64,
}

/// Upper bounds (µs) of the sync latency histogram.
pub const RTT_BUCKETS_US: [u64; 12] = [
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    1_000_000,
    u64::MAX,
];

impl Metrics {
    fn observe_rtt(&self, us: u64) {
        for (i, b) in RTT_BUCKETS_US.iter().enumerate() {
            if us <= *b {
                self.rtt_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.rtt_sum_us.fetch_add(us, Ordering::Relaxed);
        self.rtt_count.fetch_add(1, Ordering::Relaxed);
    }
}

/// A connected peer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerInfo {
    /// libp2p peer id.
    pub peer_id: String,
    /// Enterprise id (from the peer's key).
    pub enterprise_id: Option<String>,
    /// Remote addresses of open connections.
    pub addrs: Vec<String>,
    /// Standing: drops with every refused input.
    pub standing: i64,
    /// Unix ms when connected.
    pub connected_ms: i64,
}

/// What a read closure sees.
pub struct ReadCtx<'a> {
    /// The replica.
    pub replica: &'a Replica,
    /// Current listen addresses.
    pub listen_addrs: &'a [Multiaddr],
    /// Connected peers.
    pub peers: Vec<PeerInfo>,
    /// Rejections by reason (decode errors, rule violations, ...).
    pub rejected: &'a BTreeMap<String, u64>,
    /// The store (size_on_disk is not free: call it only where needed).
    pub store: &'a Store,
    /// Security alerts, newest last.
    pub alerts: &'a std::collections::VecDeque<AlertRecord>,
    /// Enterprises whose alerts we act on.
    pub trusted: &'a std::collections::BTreeSet<EnterpriseId>,
    /// Banned peers.
    pub banned: Vec<String>,
}

type ReadFn = Box<dyn FnOnce(&ReadCtx<'_>) + Send>;
type EditFn = Box<dyn FnOnce(&mut Document, &Keypair, i64) -> Result<Accepted, EditError> + Send>;
type CreateFn =
    Box<dyn FnOnce(&Keypair, i64, u64) -> Result<(Document, Accepted), EditError> + Send>;
type Reply = Box<dyn FnOnce(Result<(), NodeError>) + Send>;

enum Command {
    Read(ReadFn),
    Edit {
        doc: DocId,
        f: EditFn,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    Create {
        f: CreateFn,
        reply: oneshot::Sender<Result<DocId, NodeError>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    Block {
        peer: PeerId,
        block: bool,
        reply: oneshot::Sender<()>,
    },
    Trust {
        enterprises: std::collections::BTreeSet<EnterpriseId>,
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Fixed facts about a running node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// libp2p peer id.
    pub peer_id: PeerId,
    /// Enterprise id.
    pub enterprise_id: EnterpriseId,
    /// Display name.
    pub name: String,
    /// The incarnation this run writes as (`cofab_protocol::Author`): it goes up when
    /// the node starts after a run that did not end cleanly.
    pub incarnation: u32,
}

/// A cloneable handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    /// Fixed facts.
    pub info: Arc<NodeInfo>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// The machine's monotonic clock (`CLOCK_MONOTONIC`) in ns: shared by every process on
/// the machine, unlike [`Instant`], whose value cannot leave the process.
pub fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// With `COFAB_HOPS` set, prints `HOP <CLOCK_MONOTONIC ns> <tag>` to stderr at each hop
/// of a change's way from a local edit to a peer's subscribers: `cmd` edit command taken,
/// `edited` change made, signed and rule-checked, `commit` group handed to the store
/// thread, `st0`/`st1` store write begun/durable, `durable` back on the event loop, `send`
/// frame handed to libp2p; on the peer `recv`, `decoded`, `received` (verified and
/// applied), `event` (published). `node/scripts/hops.py` turns a run of
/// `cofab bench --scenarios a` into per-hop medians. Off, it costs a load and a branch.
pub(crate) fn hop(tag: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("COFAB_HOPS").is_some()) {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "HOP {} {}", mono_ns(), tag);
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl NodeHandle {
    /// Runs `f` on the event loop with read access to the node's state.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ReadCtx<'_>) -> T + Send + 'static,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Read(Box::new(move |ctx| {
                let _ = tx.send(f(ctx));
            })))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Creates a document; returns once it is durable.
    pub async fn create(
        &self,
        f: impl FnOnce(&Keypair, i64, u64) -> Result<(Document, Accepted), EditError> + Send + 'static,
    ) -> Result<DocId, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Create {
                f: Box::new(f),
                reply: tx,
            })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Edits a document; returns once the change is durable (peers may receive it sooner:
    /// see the durability notes in README.md).
    pub async fn edit(
        &self,
        doc: DocId,
        f: impl FnOnce(&mut Document, &Keypair, i64) -> Result<Accepted, EditError> + Send + 'static,
    ) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Edit {
                doc,
                f: Box::new(f),
                reply: tx,
            })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Dials a peer address.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Dial { addr, reply: tx })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Stops the node: pending writes are flushed, connections closed.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown { reply: tx }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Sets the enterprises whose security alerts this node acts on.
    pub async fn set_alert_trust(
        &self,
        enterprises: std::collections::BTreeSet<EnterpriseId>,
    ) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Trust {
                enterprises,
                reply: tx,
            })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Subscribes to node events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Current listen addresses.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        self.read(|c| c.listen_addrs.to_vec()).await
    }
}

/// A running node: its handle and the task running its event loop.
pub struct Node {
    /// The handle.
    pub handle: NodeHandle,
    /// The event loop task; ends after shutdown.
    pub task: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Opens the store, loads every document, starts listening and starts the event loop.
    /// Returns once the node listens on every configured address.
    ///
    /// The event loop runs on a thread of its own, in a single-threaded tokio runtime
    /// that also runs libp2p's connection tasks (the swarm spawns them where it is
    /// polled). A frame then passes between the event loop and its connection task
    /// without waking another core, which costs ≈20 µs per hand-off on this 2-core VM
    /// (the API, on the caller's runtime, talks to the loop through channels as before).
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (ended_tx, ended_rx) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("cofab-node".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(NodeError::Start(e.to_string())));
                        return;
                    }
                };
                rt.block_on(async move {
                    match Self::start_here(config).await {
                        Ok((handle, el)) => {
                            let _ = ready_tx.send(Ok(handle));
                            el.run().await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
                // Connection tasks still running end with the runtime.
                rt.shutdown_timeout(Duration::from_secs(5));
                let _ = ended_tx.send(());
            })
            .map_err(|e| NodeError::Start(e.to_string()))?;
        let handle = ready_rx
            .await
            .map_err(|_| NodeError::Start("the node's thread ended while starting".into()))??;
        let task = tokio::spawn(async move {
            let _ = ended_rx.await;
        });
        Ok(Node { handle, task })
    }

    async fn start_here(config: NodeConfig) -> Result<(NodeHandle, EventLoop), NodeError> {
        let dir = config.store_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&dir))
            .await
            .map_err(|e| NodeError::Start(e.to_string()))?
            .map_err(|e| {
                NodeError::Start(format!(
                    "opening store in {}: {e}",
                    config.store_dir.display()
                ))
            })?;
        let store = Arc::new(store);
        let incarnation = {
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.begin_run())
                .await
                .map_err(|e| NodeError::Start(e.to_string()))?
                .map_err(|e| NodeError::Start(format!("recording the run: {e}")))?
        };
        let mut replica = Replica::new(config.key.clone().with_incarnation(incarnation));
        replica.policy = config.fetch.clone();
        replica.set_offload(Arc::new(
            SigThread::start().map_err(|e| NodeError::Start(e.to_string()))?,
        ));
        let stored = {
            let s = store.clone();
            tokio::task::spawn_blocking(move || s.load_all())
                .await
                .map_err(|e| NodeError::Start(e.to_string()))?
        }
        .map_err(|e| NodeError::Start(e.to_string()))?;
        let mut incremental = HashMap::new();
        for s in stored {
            let id = s.genesis.id();
            incremental.insert(id, s.changes.len());
            let doc = Document::load_trusted(s.genesis, s.snapshot.as_deref(), s.changes, s.sigs)
                .map_err(|e| NodeError::Start(format!("loading document {id}: {e}")))?;
            replica.load(doc);
        }
        let mut swarm =
            network::build_swarm_with_limit(&config.key, config.mdns, config.max_connections)
                .map_err(|e| NodeError::Start(e.to_string()))?;
        if !config.kad_server {
            swarm
                .behaviour_mut()
                .kad
                .set_mode(Some(libp2p::kad::Mode::Client));
        }
        let topic = gossipsub::IdentTopic::new(network::ANNOUNCE_TOPIC);
        swarm
            .behaviour_mut()
            .gossip
            .subscribe(&topic)
            .map_err(|e| NodeError::Start(e.to_string()))?;
        let alerts_topic = gossipsub::IdentTopic::new(network::ALERTS_TOPIC);
        swarm
            .behaviour_mut()
            .gossip
            .subscribe(&alerts_topic)
            .map_err(|e| NodeError::Start(e.to_string()))?;
        for a in &config.listen {
            swarm
                .listen_on(a.clone())
                .map_err(|e| NodeError::Start(format!("listen on {a}: {e}")))?;
        }
        // Wait until each listener reports its address.
        let mut listen_addrs = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while listen_addrs.len() < config.listen.len() && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(200), swarm.select_next_some()).await {
                Ok(SwarmEvent::NewListenAddr { address, .. }) => listen_addrs.push(address),
                Ok(SwarmEvent::ListenerError { error, .. }) => {
                    return Err(NodeError::Start(error.to_string()))
                }
                _ => {}
            }
        }
        // Peer book: redial the peers we were connected to before.
        let book = store.settings_with_prefix("peer/").unwrap_or_default();
        for (k, v) in book.iter().take(64) {
            let (Ok(pid), Ok(addr)) = (
                k.trim_start_matches("peer/").parse::<PeerId>(),
                String::from_utf8_lossy(v).parse::<Multiaddr>(),
            ) else {
                continue;
            };
            swarm.behaviour_mut().kad.add_address(&pid, addr.clone());
            let _ = swarm.dial(
                libp2p::swarm::dial_opts::DialOpts::peer_id(pid)
                    .addresses(vec![addr])
                    .build(),
            );
        }
        for b in &config.bootstrap {
            if let Some(libp2p::multiaddr::Protocol::P2p(pid)) = b.iter().last() {
                swarm.behaviour_mut().kad.add_address(&pid, b.clone());
            }
            if let Err(e) = swarm.dial(b.clone()) {
                tracing::warn!("dial bootstrap {b}: {e}");
            }
        }
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (events, _) = broadcast::channel(EVENT_QUEUE);
        let info = Arc::new(NodeInfo {
            peer_id: *swarm.local_peer_id(),
            enterprise_id: config.key.id(),
            name: config.name.clone(),
            incarnation,
        });
        let metrics = Arc::new(Metrics::default());
        let handle = NodeHandle {
            tx,
            events: events.clone(),
            info,
            metrics: metrics.clone(),
        };
        let (store_tx, store_rx) = std::sync::mpsc::channel();
        let (done_tx, store_done) = mpsc::unbounded_channel();
        let store_thread_handle = {
            let store = store.clone();
            std::thread::Builder::new()
                .name("cofab-store".into())
                .spawn(move || store_thread(store, store_rx, done_tx))
                .map_err(|e| NodeError::Start(e.to_string()))?
        };
        let el = EventLoop {
            store_tx: Some(store_tx),
            store_thread: Some(store_thread_handle),
            store_done,
            awaiting: Default::default(),
            store_failed: false,
            answers: Vec::new(),
            to_store: None,
            next_batch: 0,
            swarm,
            replica,
            store,
            commands: rx,
            events,
            metrics,
            listen_addrs,
            peers: HashMap::new(),
            peer_ids: HashMap::new(),
            banned: HashSet::new(),
            rejected: BTreeMap::new(),
            pending: Pending::default(),
            inflight: HashMap::new(),
            outbox: HashMap::new(),
            incremental,
            heavy: HashSet::new(),
            topic,
            alerts_topic,
            alerts: Default::default(),
            trusted: config.trust_alerts_from.clone(),
            alerted: HashMap::new(),
            alert_limiter: RateLimiter::new(
                ALERTS_PER_MINUTE / 60.0,
                ALERTS_PER_MINUTE,
                Instant::now(),
            ),
            reporter_limiters: HashMap::new(),
            tick: config.tick,
            has_bootstrap: !config.bootstrap.is_empty(),
        };
        Ok((handle, el))
    }
}

/// Messages waiting for a peer, and frames to it not yet answered.
#[derive(Default)]
struct Outbox {
    msgs: std::collections::VecDeque<SyncMessage>,
    inflight: usize,
}

struct PeerState {
    limiter: RateLimiter,
    enterprise: Option<EnterpriseId>,
    addrs: Vec<Multiaddr>,
    standing: i64,
    connected_ms: i64,
}

#[derive(Default)]
struct Pending {
    writes: Vec<Write>,
    sends: BTreeMap<EnterpriseId, Vec<SyncMessage>>,
    replies: Vec<Reply>,
    events: Vec<Event>,
    announce: Vec<DocId>,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    /// Frames taken but not yet answered: answered once their effects are committed.
    answers: Vec<request_response::ResponseChannel<u8>>,
    /// The group committed but not yet handed to the store thread (see `commit`).
    to_store: Option<(u64, Vec<Write>)>,
    replica: Replica,
    store: Arc<Store>,
    commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<Event>,
    metrics: Arc<Metrics>,
    listen_addrs: Vec<Multiaddr>,
    peers: HashMap<PeerId, PeerState>,
    /// The peer id of each connected enterprise (deriving it decompresses a key, ≈3 µs).
    peer_ids: HashMap<EnterpriseId, PeerId>,
    banned: HashSet<PeerId>,
    rejected: BTreeMap<String, u64>,
    pending: Pending,
    inflight: HashMap<request_response::OutboundRequestId, (Instant, PeerId)>,
    outbox: HashMap<PeerId, Outbox>,
    incremental: HashMap<DocId, usize>,
    /// Documents whose `incremental` count passed [`COMPACT_AFTER`] since the last commit.
    heavy: HashSet<DocId>,
    topic: gossipsub::IdentTopic,
    alerts_topic: gossipsub::IdentTopic,
    alerts: std::collections::VecDeque<AlertRecord>,
    trusted: std::collections::BTreeSet<EnterpriseId>,
    /// Last alert we published about each offender.
    alerted: HashMap<PeerId, Instant>,
    alert_limiter: RateLimiter,
    reporter_limiters: HashMap<EnterpriseId, RateLimiter>,
    tick: Duration,
    has_bootstrap: bool,
    /// Groups of writes to the store thread: (batch id, writes).
    store_tx: Option<std::sync::mpsc::Sender<(u64, Vec<Write>)>>,
    /// The store thread, joined at shutdown so the sled lock is released.
    store_thread: Option<std::thread::JoinHandle<()>>,
    /// Completions from the store thread: (highest durable batch id, result).
    store_done: mpsc::UnboundedReceiver<(u64, Result<(), String>)>,
    /// Effects waiting for their batch (None: no writes of its own) to be durable, in order.
    awaiting: std::collections::VecDeque<(Option<u64>, Pending, bool)>,
    next_batch: u64,
    /// A group failed to become durable: this run must not be recorded as clean.
    store_failed: bool,
}

/// A thread that checks a small received batch's signatures while the event loop
/// applies and rule-checks the batch ([`cofab_protocol::document::Offload`]): one
/// `verify_strict` is ≈40 µs, about half of automerge's apply of a small change into a
/// busy document. It ends when the replica holding it is dropped.
struct SigThread {
    jobs: std::sync::mpsc::Sender<SigJob>,
}

type SigJob = (
    cofab_protocol::document::SigChecks,
    std::sync::mpsc::SyncSender<Result<(), cofab_protocol::IngestError>>,
);

impl SigThread {
    fn start() -> std::io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel::<SigJob>();
        std::thread::Builder::new()
            .name("cofab-verify".into())
            .spawn(move || {
                while let Ok((checks, verdict)) = rx.recv() {
                    let _ = verdict.send(checks.run());
                }
            })?;
        Ok(Self { jobs })
    }
}

impl cofab_protocol::document::Offload for SigThread {
    fn start(
        &self,
        checks: cofab_protocol::document::SigChecks,
    ) -> Box<dyn FnOnce() -> Result<(), cofab_protocol::IngestError> + '_> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        // Kept to check here if the thread is gone (it never panics on its own: a bad
        // signature is a verdict, not an error).
        let here = checks.clone();
        let _ = self.jobs.send((checks, tx));
        Box::new(move || rx.recv().unwrap_or_else(|_| here.run()))
    }
}

/// The store thread: takes every group queued while the previous commit ran and makes
/// them durable with one flush + fdatasync (group commit), then reports the highest id.
fn store_thread(
    store: Arc<Store>,
    rx: std::sync::mpsc::Receiver<(u64, Vec<Write>)>,
    done: mpsc::UnboundedSender<(u64, Result<(), String>)>,
) {
    // Fault injection for tests: a disk that hangs for good after this many group commits
    // (the groups handed over after that are never written).
    let hang_after: Option<u64> = std::env::var("COFAB_FAULT_STORE_HANG_AFTER")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut groups = 0u64;
    while let Ok((mut last, mut writes)) = rx.recv() {
        groups += 1;
        if hang_after.is_some_and(|n| groups > n) {
            tracing::warn!("COFAB_FAULT_STORE_HANG_AFTER: the store hangs");
            while rx.recv().is_ok() {}
            return;
        }
        while let Ok((id, more)) = rx.try_recv() {
            last = id;
            writes.extend(more);
        }
        let t = Instant::now();
        hop("st0");
        let r = store.apply(&writes).map_err(|e| e.to_string());
        hop("st1");
        let adopted = writes
            .iter()
            .any(|w| matches!(w, Write::Doc { accepted, .. } if accepted.snapshot.is_some()));
        tracing::debug!(
            writes = writes.len(),
            batches_to = last,
            us = t.elapsed().as_micros() as u64,
            "group commit"
        );
        if done.send((last, r)).is_err() {
            return;
        }
        if adopted {
            release_free_memory();
        }
    }
}

/// Hands memory that was freed back to the OS. Adopting a document from a snapshot frees
/// tens of MB (automerge's load, the verification metadata, partly on the prepare
/// threads' malloc arenas), which glibc otherwise keeps for the process: the node's
/// resident memory stayed that much higher. Called after such a write, off the event loop.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the OS; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl EventLoop {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut kad_tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                biased;
                cmd = self.commands.recv() => {
                    self.flush_store();
                    let Some(cmd) = cmd else { break };
                    hop("cmd");
                    let mut stop = None;
                    if let Some(reply) = self.command(cmd) { stop = Some(reply); }
                    let mut n = 1;
                    while stop.is_none() && n < MAX_COMMANDS_PER_COMMIT {
                        match self.commands.try_recv() {
                            Ok(cmd) => { if let Some(reply) = self.command(cmd) { stop = Some(reply); } n += 1; }
                            Err(_) => break,
                        }
                    }
                    self.end_turn();
                    if let Some(reply) = stop {
                        self.shutdown().await;
                        let _ = reply.send(());
                        return;
                    }
                }
                done = self.store_done.recv() => {
                    self.flush_store();
                    match done {
                        Some((id, r)) => self.durable(id, r),
                        None => {
                            // The store thread is gone (it panicked): nothing more can be made
                            // durable, so fail what waits and stop rather than spin on a
                            // closed channel.
                            tracing::error!("store thread stopped; stopping the node");
                            while let Some((_, p, _)) = self.awaiting.pop_front() {
                                self.release(p, Err("store thread stopped".into()));
                            }
                            break;
                        }
                    }
                }
                ev = self.swarm.select_next_some() => {
                    self.flush_store();
                    self.swarm_event(ev);
                    self.end_turn();
                }
                _ = tick.tick() => {
                    self.flush_store();
                    let outs = self.replica.tick();
                    self.outputs(outs);
                    self.end_turn();
                }
                _ = kad_tick.tick() => {
                    if self.has_bootstrap {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
                // Polled last: the swarm (above) has been polled since `commit` queued
                // frames, so they are on their way; now the store thread may be woken.
                _ = std::future::ready(()), if self.to_store.is_some() => {
                    self.flush_store();
                }
            }
        }
        self.shutdown().await;
    }

    /// Ends a turn of the loop: commits its effects, answers the frames it took, and
    /// does the replica's deferred work ([`Replica::idle`]) once all that is under way.
    fn end_turn(&mut self) {
        self.commit();
        for ch in std::mem::take(&mut self.answers) {
            let _ = self.swarm.behaviour_mut().sync.send_response(ch, 0);
        }
        self.replica.idle();
    }

    async fn shutdown(&mut self) {
        // Let every queued group become durable and be acknowledged.
        self.flush_store();
        while !self.awaiting.is_empty() {
            match self.store_done.recv().await {
                Some((id, r)) => self.durable(id, r),
                None => {
                    // The store thread is gone: what waits was never written.
                    while let Some((_, p, _)) = self.awaiting.pop_front() {
                        self.release(p, Err("store thread stopped".into()));
                    }
                }
            }
        }
        // Stop the store thread and wait for it (it finishes the groups it was given, such
        // as received changes nobody waits for), then checkpoint: sled must never be
        // flushed from two threads at once (sled 0.34 can then wait forever).
        self.store_tx = None;
        if let Some(t) = self.store_thread.take() {
            let joined = tokio::task::spawn_blocking(move || t.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                tracing::error!("store thread failed");
                self.store_failed = true;
            }
        }
        // Groups finished after the wait above (received changes): their results count too.
        while let Ok((id, r)) = self.store_done.try_recv() {
            self.durable(id, r);
        }
        let store = self.store.clone();
        let clean = !self.store_failed;
        let ended = tokio::task::spawn_blocking(move || {
            store.sync()?;
            if clean {
                store.end_run()?;
            }
            Ok::<_, crate::store::StoreError>(())
        })
        .await;
        match ended {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("final store flush failed: {e}"),
            Err(e) => tracing::error!("final store flush failed: {e}"),
        }
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for p in peers {
            let _ = self.swarm.disconnect_peer_id(p);
        }
        tracing::info!("node stopped; store flushed");
    }

    /// Handles one command; returns the shutdown reply if it was a shutdown.
    fn command(&mut self, cmd: Command) -> Option<oneshot::Sender<()>> {
        match cmd {
            Command::Read(f) => {
                let peers = self.peer_infos();
                let ctx = ReadCtx {
                    replica: &self.replica,
                    listen_addrs: &self.listen_addrs,
                    peers,
                    rejected: &self.rejected,
                    store: &self.store,
                    alerts: &self.alerts,
                    trusted: &self.trusted,
                    banned: self.banned.iter().map(|p| p.to_string()).collect(),
                };
                f(&ctx);
            }
            Command::Create { f, reply } => {
                let began = mono_ns();
                let nonce: u64 = rand::random();
                match f(self.replica.keypair(), now_ms(), nonce) {
                    Ok((doc, acc)) => {
                        let id = doc.id();
                        let public = doc.genesis().visibility == Visibility::Public;
                        let kind = doc.genesis().kind;
                        let outs = self.replica.create(doc, acc);
                        self.outputs(outs);
                        if public {
                            self.pending.announce.push(id);
                        }
                        self.pending.events.push(Event::DocUpdated {
                            doc: id.to_string(),
                            kind,
                            from: None,
                            at_ns: began,
                        });
                        self.pending.replies.push(Box::new(move |r| {
                            let _ = reply.send(r.map(|_| id));
                        }));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::Edit { doc, f, reply } => {
                let began = mono_ns();
                match self.replica.edit(&doc, now_ms(), f) {
                    Ok((_, outs)) => {
                        hop("edited");
                        // No gossip announcement per edit: peers holding the document get the
                        // change through their sync session; announcements are for new documents.
                        if let Some(d) = self.replica.doc(&doc) {
                            self.pending.events.push(Event::DocUpdated {
                                doc: doc.to_string(),
                                kind: d.genesis().kind,
                                from: None,
                                at_ns: began,
                            });
                        }
                        self.outputs(outs);
                        self.pending.replies.push(Box::new(move |r| {
                            let _ = reply.send(r);
                        }));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::Dial { addr, reply } => {
                let r = self
                    .swarm
                    .dial(addr)
                    .map_err(|e| NodeError::Network(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Trust { enterprises, reply } => {
                self.trusted = enterprises;
                let _ = reply.send(());
            }
            Command::Block { peer, block, reply } => {
                self.set_blocked(peer, block);
                let _ = reply.send(());
            }
            Command::Shutdown { reply } => return Some(reply),
        }
        None
    }

    fn peer_infos(&self) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> = self
            .peers
            .iter()
            .map(|(p, s)| PeerInfo {
                peer_id: p.to_string(),
                enterprise_id: s.enterprise.map(|e| e.to_string()),
                addrs: s.addrs.iter().map(|a| a.to_string()).collect(),
                standing: s.standing,
                connected_ms: s.connected_ms,
            })
            .collect();
        v.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        v
    }

    fn outputs(&mut self, outs: Vec<Output>) {
        for o in outs {
            match o {
                Output::Send { to, msg } => self.pending.sends.entry(to).or_default().push(msg),
                Output::Persist {
                    doc,
                    genesis,
                    accepted,
                } => {
                    let n = self.incremental.entry(doc).or_default();
                    *n += accepted.changes.len();
                    if accepted.snapshot.is_some() {
                        *n = 0;
                    }
                    if *n > COMPACT_AFTER {
                        self.heavy.insert(doc);
                    }
                    self.pending.writes.push(Write::Doc {
                        doc,
                        genesis,
                        accepted,
                    });
                }
                Output::Rejected { from, doc, error } => {
                    let peer = self.peer_id(&from);
                    self.reject(peer, Some(doc), error.reason(), error.to_string());
                }
                Output::Updated { doc, kind, from } => {
                    self.pending.events.push(Event::DocUpdated {
                        doc: doc.to_string(),
                        kind,
                        from: Some(from.to_string()),
                        at_ns: mono_ns(),
                    });
                }
            }
        }
    }

    fn reject(&mut self, peer: PeerId, doc: Option<DocId>, reason: &str, detail: String) {
        tracing::warn!(%peer, ?doc, reason, %detail, "refused input");
        let detail_for_alert = detail.clone();
        *self.rejected.entry(reason.to_string()).or_default() += 1;
        self.pending.events.push(Event::Rejected {
            peer_id: peer.to_string(),
            doc: doc.map(|d| d.to_string()),
            reason: reason.to_string(),
            detail,
        });
        if reason != "missing_deps" {
            self.publish_alert(peer, doc, reason, &detail_for_alert);
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.standing -= if reason == "missing_deps" { 0 } else { 5 };
            if p.standing <= BAN_STANDING {
                tracing::warn!(%peer, "standing too low: disconnecting and banning");
                self.banned.insert(peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    fn swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}");
                if !self.listen_addrs.contains(&address) {
                    self.listen_addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address)
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                if self.banned.contains(&peer_id) {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                let addr = endpoint.get_remote_address().clone();
                if endpoint.is_dialer() {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, addr.clone());
                    // Remember the address in the peer book (made durable with the next commit).
                    self.pending.writes.push(Write::Setting {
                        key: format!("peer/{peer_id}"),
                        value: addr.to_string().into_bytes(),
                    });
                }
                let enterprise = network::enterprise_of(&peer_id);
                let st = self.peers.entry(peer_id).or_insert(PeerState {
                    limiter: RateLimiter::new(MAX_FRAMES_PER_SEC, FRAME_BURST, Instant::now()),
                    enterprise,
                    addrs: Vec::new(),
                    standing: 0,
                    connected_ms: now_ms(),
                });
                st.addrs.push(addr);
                if let Some(e) = enterprise {
                    self.peer_ids.insert(e, peer_id);
                }
                if num_established.get() == 1 {
                    tracing::info!(%peer_id, "peer connected");
                    if self.has_bootstrap && self.peers.len() == 1 {
                        // First contact: look for the rest of the network.
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                    self.pending.events.push(Event::PeerConnected {
                        peer_id: peer_id.to_string(),
                        enterprise_id: enterprise.map(|e| e.to_string()),
                    });
                    if let Some(e) = enterprise {
                        let outs = self.replica.peer_connected(e);
                        self.outputs(outs);
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                endpoint,
                ..
            } => {
                if let Some(st) = self.peers.get_mut(&peer_id) {
                    let a = endpoint.get_remote_address();
                    if let Some(i) = st.addrs.iter().position(|x| x == a) {
                        st.addrs.remove(i);
                    }
                }
                if num_established == 0 {
                    tracing::info!(%peer_id, "peer disconnected");
                    let e = match self.peers.remove(&peer_id) {
                        Some(st) => st.enterprise,
                        None => network::enterprise_of(&peer_id),
                    };
                    self.outbox.remove(&peer_id);
                    if let Some(e) = e {
                        self.peer_ids.remove(&e);
                        self.replica.peer_disconnected(&e);
                    }
                    self.pending.events.push(Event::PeerDisconnected {
                        peer_id: peer_id.to_string(),
                    });
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Sync(ev)) => self.sync_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message {
                propagation_source,
                message,
                ..
            })) => {
                if message.topic == self.alerts_topic.hash() {
                    self.alert_received(propagation_source, message);
                } else {
                    self.announcement(propagation_source, message);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    if !self.peers.contains_key(&peer) && !self.banned.contains(&peer) {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer, addr.clone());
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for a in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) if !self.peers.contains_key(&peer)
                && !self.banned.contains(&peer)
                && peer != *self.swarm.local_peer_id() =>
            {
                let _ = self.swarm.dial(peer);
            }
            _ => {}
        }
    }

    fn sync_event(&mut self, ev: request_response::Event<network::SyncRequest, u8>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    hop("recv");
                    // Status byte: 0 = taken, 1 = refused unread (over the size limit).
                    // A frame taken is answered once it has been handled and its effects
                    // committed (see `run`): the answer only frees the sender's window, and
                    // writing it meanwhile would compete for the CPU with handling the frame.
                    let status = u8::from(matches!(request, network::SyncRequest::Oversized(_)));
                    if status == 0 {
                        self.answers.push(channel);
                    } else {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .sync
                            .send_response(channel, status);
                    }
                    if !self
                        .peers
                        .get_mut(&peer)
                        .is_none_or(|p| p.limiter.allow(Instant::now()))
                    {
                        // Counted, not logged one by one and no standing lost: a busy honest
                        // peer can hit the limit too, and sync repairs what is dropped.
                        *self.rejected.entry("rate_limited".to_string()).or_default() += 1;
                        return;
                    }
                    let request = match request {
                        network::SyncRequest::Frame(bytes) => bytes,
                        network::SyncRequest::Oversized(len) => {
                            self.reject(
                                peer,
                                None,
                                "oversized",
                                format!("frame of {len} bytes exceeds {MAX_FRAME_BYTES}"),
                            );
                            return;
                        }
                    };
                    self.metrics.frames_in.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .bytes_in
                        .fetch_add(request.len() as u64, Ordering::Relaxed);
                    // Taken from the key once, when the connection was established.
                    let from = match self.peers.get(&peer) {
                        Some(st) => st.enterprise,
                        None => network::enterprise_of(&peer),
                    };
                    let Some(from) = from else {
                        self.reject(
                            peer,
                            None,
                            "unbound_peer",
                            "peer id is not an ed25519 key".into(),
                        );
                        return;
                    };
                    match Frame::decode(&request) {
                        Ok(Frame::Sync(msgs)) => {
                            let now = now_ms();
                            let msgs = merge_runs(msgs);
                            hop("decoded");
                            let prepared = prepare_frame(&self.replica, &msgs);
                            for (m, p) in msgs.into_iter().zip(prepared) {
                                let outs = self.replica.receive_prepared(from, m, now, p);
                                hop("received");
                                self.outputs(outs);
                            }
                        }
                        Ok(Frame::Announce(items)) => self.announced(peer, items),
                        Ok(Frame::Alert(_)) => {
                            // Alerts travel on the gossip topic, signed by their reporter; one sent
                            // directly would carry no such proof.
                            self.reject(
                                peer,
                                None,
                                "malformed_frame",
                                "alert sent outside the alerts topic".into(),
                            );
                        }
                        Err(e) => {
                            let reason = match e {
                                cofab_protocol::DecodeError::UnknownVersion(_) => "unknown_version",
                                cofab_protocol::DecodeError::TooLarge { .. } => "oversized",
                                cofab_protocol::DecodeError::Truncated => "truncated",
                                _ => "malformed_frame",
                            };
                            self.reject(peer, None, reason, e.to_string());
                        }
                    }
                }
                request_response::Message::Response { request_id, .. } => {
                    if let Some(t) = self.frame_done(&request_id) {
                        self.metrics.observe_rtt(t.elapsed().as_micros() as u64);
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                peer,
                error,
                ..
            } => {
                self.frame_done(&request_id);
                tracing::debug!(%peer, %error, "sync send failed");
            }
            request_response::Event::InboundFailure {
                peer,
                error: request_response::InboundFailure::Io(e),
                ..
            } if e.kind() == std::io::ErrorKind::InvalidData => {
                self.reject(peer, None, "oversized", e.to_string());
            }
            _ => {}
        }
    }

    /// Publishes a signed security alert about `peer` (rate-limited: one per offender per
    /// minute, [`ALERTS_PER_MINUTE`] in all). Gossipsub signs it with our key, so nobody
    /// can publish an alert in our name.
    fn publish_alert(&mut self, peer: PeerId, doc: Option<DocId>, reason: &str, detail: &str) {
        use sha2::Digest;
        let Some(offender) = network::enterprise_of(&peer) else {
            return;
        };
        let now = Instant::now();
        if self
            .alerted
            .get(&peer)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60))
        {
            return;
        }
        if !self.alert_limiter.allow(now) {
            return;
        }
        self.alerted.insert(peer, now);
        let mut h = sha2::Sha256::new();
        h.update(reason.as_bytes());
        h.update(doc.map(|d| d.0).unwrap_or_default());
        h.update(detail.as_bytes());
        let evidence: [u8; 32] = h.finalize().into();
        let alert = cofab_protocol::wire::Alert {
            offender,
            reason: reason
                .chars()
                .take(cofab_protocol::wire::MAX_ALERT_REASON)
                .collect(),
            evidence,
            at_ms: now_ms(),
        };
        let topic = self.alerts_topic.clone();
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .gossip
            .publish(topic, Frame::Alert(alert.clone()).encode())
        {
            tracing::debug!("alert not published: {e}");
        }
        self.record_alert(AlertRecord {
            reporter: self.replica.id().to_string(),
            offender: offender.to_string(),
            reason: alert.reason,
            evidence: crate::config::hex(&evidence),
            at_ms: alert.at_ms,
            ours: true,
            acted: false,
        });
    }

    fn record_alert(&mut self, r: AlertRecord) {
        if self.alerts.len() >= ALERTS_KEPT {
            self.alerts.pop_front();
        }
        self.alerts.push_back(r.clone());
        self.pending.events.push(Event::Alert(r));
    }

    /// An alert from the network. The reporter is the gossip message's authenticated
    /// source; if we trust it, the offender is banned here too.
    fn alert_received(&mut self, via: PeerId, message: gossipsub::Message) {
        let Some(reporter) = message.source.and_then(|s| network::enterprise_of(&s)) else {
            *self.rejected.entry("unsigned_alert".into()).or_default() += 1;
            return;
        };
        let Ok(Frame::Alert(a)) = Frame::decode(&message.data) else {
            self.reject(
                via,
                None,
                "malformed_alert",
                "not an alert frame on the alerts topic".into(),
            );
            return;
        };
        let now = Instant::now();
        let limiter = self
            .reporter_limiters
            .entry(reporter)
            .or_insert_with(|| RateLimiter::new(ALERTS_PER_MINUTE / 60.0, ALERTS_PER_MINUTE, now));
        if !limiter.allow(now) {
            *self.rejected.entry("alert_flood".into()).or_default() += 1;
            return;
        }
        let trusted = self.trusted.contains(&reporter)
            && a.offender != self.replica.id()
            && !self.trusted.contains(&a.offender);
        if trusted {
            let offender = network::peer_id_of(&a.offender);
            tracing::warn!(%offender, reporter = %reporter, reason = %a.reason, "banning a peer reported by a trusted enterprise");
            self.banned.insert(offender);
            let _ = self.swarm.disconnect_peer_id(offender);
        }
        self.record_alert(AlertRecord {
            reporter: reporter.to_string(),
            offender: a.offender.to_string(),
            reason: a.reason,
            evidence: crate::config::hex(&a.evidence),
            at_ms: a.at_ms,
            ours: false,
            acted: trusted,
        });
    }

    fn announcement(&mut self, source: PeerId, message: gossipsub::Message) {
        match Frame::decode(&message.data) {
            Ok(Frame::Announce(items)) => {
                let origin = message.source.unwrap_or(source);
                self.announced(origin, items)
            }
            Ok(_) => self.reject(
                source,
                None,
                "malformed_frame",
                "sync frame on the announce topic".into(),
            ),
            Err(e) => self.reject(source, None, "malformed_frame", e.to_string()),
        }
    }

    fn announced(&mut self, origin: PeerId, items: Vec<Announcement>) {
        let Some(e) = network::enterprise_of(&origin) else {
            return;
        };
        for a in items.into_iter().take(1024) {
            if self.replica.doc(&a.doc).is_some() {
                continue;
            }
            if self.peers.contains_key(&origin) {
                if let Some(o) = self.replica.request(e, a.doc) {
                    self.outputs(vec![o]);
                }
            } else if !self.banned.contains(&origin) {
                // Connecting starts sessions for every document the peer may share.
                let _ = self.swarm.dial(origin);
            }
        }
    }

    /// Hands pending writes to the store thread. Messages to peers and announcements
    /// leave at once; replies to callers and events wait in FIFO order until the store
    /// reports their group durable, while the loop goes on gathering the next group.
    ///
    /// Sending our own changes before they are durable takes the write (≈0.2 ms) off
    /// the path to peers. A crash can then lose a change that peers already hold; that
    /// is safe because a node whose run did not end cleanly restarts as a new
    /// incarnation ([`cofab_protocol::Author`]), so it never makes a different change
    /// under the lost one's actor and seq, and peers give the lost change back.
    fn commit(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        // Compaction of documents with many incremental changes (noted as they pass the
        // mark: a scan of every document per commit cost tens of µs at 10,000 documents).
        let heavy: Vec<DocId> = self.heavy.drain().collect();
        for d in heavy {
            if let Some(doc) = self.replica.doc(&d) {
                pending.writes.push(Write::Compact {
                    doc: d,
                    snapshot: doc.save(),
                });
            }
            self.incremental.insert(d, 0);
        }
        let writes = std::mem::take(&mut pending.writes);
        let sends = std::mem::take(&mut pending.sends);
        let announce = std::mem::take(&mut pending.announce);
        // Local writes (API creates and edits) are acknowledged only once durable. A
        // group holding only what peers sent us need not wait, unless an earlier local
        // group is in flight (its events come first).
        let local = !pending.replies.is_empty();
        let wait = local || self.awaiting.iter().any(|(_, _, l)| *l);
        if writes.is_empty() {
            // With no writes of its own and nothing in flight, there is nothing to wait for.
            if wait && !self.awaiting.is_empty() {
                self.awaiting.push_back((None, pending, local));
            } else {
                self.release(pending, Ok(()));
            }
            self.dispatch(sends, announce);
            return;
        }
        self.next_batch += 1;
        let id = self.next_batch;
        // Order, for the peers' and watchers' sake: events that need not wait, then the
        // frames to peers, and only then the hand-off to the store thread. Waking that
        // thread costs ≈20 µs here (a wake-up of another core), so when frames went out
        // it waits until the swarm has been polled and has passed them to libp2p's
        // connection tasks (`flush_store`: from a branch of `run`'s `select!` polled
        // after the swarm's, and at the top of every other branch and of `shutdown`).
        // Sending before the write has even started is as safe as sending while it is in
        // flight: see README "Durability" (incarnations).
        let frames = !sends.is_empty() || !announce.is_empty();
        if wait {
            self.awaiting.push_back((Some(id), pending, local));
        } else {
            self.release(pending, Ok(()));
        }
        self.dispatch(sends, announce);
        self.flush_store();
        self.to_store = Some((id, writes));
        if !frames {
            self.flush_store();
        }
    }

    /// Hands the group `commit` left to the store thread. If the thread is gone, nothing
    /// waiting can become durable.
    fn flush_store(&mut self) {
        let Some(group) = self.to_store.take() else {
            return;
        };
        hop("commit");
        if self
            .store_tx
            .as_ref()
            .is_none_or(|tx| tx.send(group).is_err())
        {
            tracing::error!("store thread stopped; writes not handed over");
            self.store_failed = true;
            while let Some((_, p, _)) = self.awaiting.pop_front() {
                self.release(p, Err("store thread stopped".into()));
            }
        }
    }

    /// The store made every batch up to `done` durable (or failed it).
    fn durable(&mut self, done: u64, result: Result<(), String>) {
        hop("durable");
        self.metrics.commits.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::error!("store commit failed: {e}");
            self.store_failed = true;
        }
        while let Some((id, _, _)) = self.awaiting.front() {
            if id.is_some_and(|id| id > done) {
                break;
            }
            let (_, p, _) = self.awaiting.pop_front().expect("front exists");
            self.release(p, result.clone());
        }
    }

    /// Acknowledges callers and publishes events once their batch is durable (or failed).
    fn release(&mut self, pending: Pending, result: Result<(), String>) {
        if let Err(e) = result {
            // The changes may already have reached peers (see `commit`); this run can no
            // longer count as ended cleanly, so the next one starts a new incarnation.
            self.store_failed = true;
            for r in pending.replies {
                r(Err(NodeError::Store(e.clone())));
            }
            return;
        }
        for r in pending.replies {
            r(Ok(()));
        }
        for e in pending.events {
            if matches!(e, Event::DocUpdated { from: Some(_), .. }) {
                hop("event");
            }
            let _ = self.events.send(e);
        }
    }

    /// Sends messages to peers and announces new public documents.
    fn dispatch(&mut self, sends: BTreeMap<EnterpriseId, Vec<SyncMessage>>, announce: Vec<DocId>) {
        for (to, msgs) in sends {
            self.send_frames(to, msgs);
        }
        if !announce.is_empty() {
            let mut ann = announce;
            ann.sort();
            ann.dedup();
            let items: Vec<Announcement> = ann
                .iter()
                .filter_map(|d| self.replica.doc(d))
                .map(|d| Announcement {
                    doc: d.id(),
                    kind: d.genesis().kind,
                    owner: d.genesis().owner,
                    changes: d.change_count() as u64,
                })
                .collect();
            let bytes = Frame::Announce(items).encode();
            let topic = self.topic.clone();
            let _ = self.swarm.behaviour_mut().gossip.publish(topic, bytes);
        }
    }

    /// The peer id of an enterprise (from the connected peers when there).
    fn peer_id(&self, e: &EnterpriseId) -> PeerId {
        self.peer_ids
            .get(e)
            .copied()
            .unwrap_or_else(|| network::peer_id_of(e))
    }

    /// Queues messages for a peer; [`Self::pump`] sends them as frames.
    fn send_frames(&mut self, to: EnterpriseId, msgs: Vec<SyncMessage>) {
        let peer = self.peer_id(&to);
        let q = self.outbox.entry(peer).or_default();
        q.msgs.extend(msgs);
        // Sync repairs itself (the tick re-offers), so shedding the oldest messages of a
        // peer that does not keep up is safe and bounds memory.
        while q.msgs.len() > MAX_QUEUED_PER_PEER {
            q.msgs.pop_front();
        }
        self.pump(peer);
    }

    /// Sends queued messages to `peer` while fewer than [`MAX_INFLIGHT_PER_PEER`] frames
    /// are unanswered. Messages that queue up meanwhile travel together in bigger frames
    /// (and never exceed yamux's stream limit).
    fn pump(&mut self, peer: PeerId) {
        loop {
            let Some(q) = self.outbox.get_mut(&peer) else {
                return;
            };
            if q.inflight >= MAX_INFLIGHT_PER_PEER || q.msgs.is_empty() {
                return;
            }
            let mut batch = Vec::new();
            let mut size = 0;
            while let Some(m) = q.msgs.front() {
                let est = estimate(m);
                if !batch.is_empty()
                    && (size + est > FRAME_BUDGET
                        || batch.len() >= cofab_protocol::wire::MAX_MESSAGES_PER_FRAME)
                {
                    break;
                }
                size += est;
                batch.push(q.msgs.pop_front().expect("front exists"));
            }
            q.inflight += 1;
            let f = Frame::Sync(batch).encode();
            if f.len() > MAX_FRAME_BYTES {
                tracing::error!(len = f.len(), "frame over the limit not sent");
                q.inflight -= 1;
                continue;
            }
            self.metrics.frames_out.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .bytes_out
                .fetch_add(f.len() as u64, Ordering::Relaxed);
            hop("send");
            let id = self
                .swarm
                .behaviour_mut()
                .sync
                .send_request(&peer, network::SyncRequest::Frame(f));
            self.inflight.insert(id, (Instant::now(), peer));
        }
    }

    /// A frame to `peer` was answered or failed: make room and send more.
    fn frame_done(&mut self, id: &request_response::OutboundRequestId) -> Option<Instant> {
        let (t, peer) = self.inflight.remove(id)?;
        if let Some(q) = self.outbox.get_mut(&peer) {
            q.inflight = q.inflight.saturating_sub(1);
        }
        self.pump(peer);
        Some(t)
    }
}

/// Frames with fewer messages to verify than this are verified on the event loop alone.
const PARALLEL_MIN_MESSAGES: usize = 8;

/// Verifies a frame's messages on two threads (the event loop's and one more) before
/// they are applied in order: a peer catching up on many documents sends frames of
/// hundreds of greetings (each a genesis to verify) and small batches (signatures,
/// parsing, rules), which were one core's work while the other idled. Changes are
/// prepared only for messages about distinct documents (a second message about a
/// document depends on the first); the rest, and any whose document changed meanwhile,
/// are verified when applied, as before.
fn prepare_frame(replica: &Replica, msgs: &[SyncMessage]) -> Vec<PreparedMsg> {
    use cofab_protocol::wire::Payload;
    let mut count: HashMap<DocId, usize> = HashMap::new();
    for m in msgs {
        *count.entry(m.doc).or_default() += 1;
    }
    let eligible: Vec<usize> = msgs
        .iter()
        .enumerate()
        .filter(|(_, m)| {
            (matches!(m.payload, Payload::Changes(_)) && count[&m.doc] == 1)
                || (m.genesis.is_some() && replica.doc(&m.doc).is_none())
        })
        .map(|(i, _)| i)
        .collect();
    let mut out: Vec<PreparedMsg> = msgs.iter().map(|_| PreparedMsg::default()).collect();
    if eligible.len() < PARALLEL_MIN_MESSAGES {
        return out;
    }
    let prepare_half = |half: &[usize]| -> Vec<(usize, PreparedMsg)> {
        half.iter()
            .map(|&i| (i, replica.prepare(&msgs[i], count[&msgs[i].doc] == 1)))
            .collect()
    };
    let (left, right) = eligible.split_at(eligible.len() / 2);
    let other = std::thread::scope(|scope| {
        let worker = scope.spawn(|| prepare_half(right));
        for (i, p) in prepare_half(left) {
            out[i] = p;
        }
        worker.join()
    });
    match other {
        Ok(done) => {
            for (i, p) in done {
                out[i] = p;
            }
        }
        // A panic while preparing: leave those messages to the normal path (which
        // catches automerge's panics and reports them as refusals).
        Err(_) => tracing::error!("preparing a frame panicked; verifying on the event loop"),
    }
    out
}

/// Merges consecutive messages about the same document that carry changes into one:
/// a frame of many one-change messages (a busy writer's stream) is then verified and
/// applied as one batch instead of one clone-apply-check per change. The merged message
/// keeps the last clock and heads (the sender's newest state) and every signature.
fn merge_runs(msgs: Vec<SyncMessage>) -> Vec<SyncMessage> {
    use cofab_protocol::wire::Payload;
    let mut out: Vec<SyncMessage> = Vec::with_capacity(msgs.len());
    for m in msgs {
        if let Some(last) = out.last_mut() {
            let mergeable = last.doc == m.doc && !m.decline && !last.decline && m.genesis.is_none();
            if let (true, Payload::Changes(into), Payload::Changes(_)) =
                (mergeable, &mut last.payload, &m.payload)
            {
                if let Payload::Changes(b) = m.payload {
                    into.changes.extend(b.changes);
                    into.sigs.extend(b.sigs);
                }
                last.clock = m.clock;
                last.heads = m.heads;
                continue;
            }
        }
        out.push(m);
    }
    out
}

fn estimate(m: &SyncMessage) -> usize {
    use cofab_protocol::wire::Payload;
    let p = match &m.payload {
        Payload::None => 0,
        Payload::Changes(b) => {
            b.changes.iter().map(|c| c.len() + 4).sum::<usize>() + b.sigs.len() * 96
        }
        Payload::Snapshot { bytes, sigs } => bytes.len() + sigs.len() * 96,
    };
    p + 64
        + m.clock.len() * 47
        + m.heads.len() * 32
        + m.genesis.as_ref().map(|g| g.0.len() + 64).unwrap_or(0)
}

// ---------- blocking peers (operator/test control) ----------
//
// `block` puts a peer in the same set as peers banned for low standing: its
// connections are closed now and refused when established later. `unblock` takes it
// out again (and so also lifts a ban for low standing); the peer is not redialled.

impl NodeHandle {
    /// Disconnects `peer` and refuses its connections until [`NodeHandle::unblock`].
    pub async fn block(&self, peer: PeerId) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Block {
                peer,
                block: true,
                reply: tx,
            })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Accepts connections of `peer` again (it is not dialled: connect explicitly or let discovery do it).
    pub async fn unblock(&self, peer: PeerId) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Block {
                peer,
                block: false,
                reply: tx,
            })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }
}

impl EventLoop {
    fn set_blocked(&mut self, peer: PeerId, block: bool) {
        if block {
            tracing::info!(%peer, "peer blocked");
            self.banned.insert(peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        } else {
            tracing::info!(%peer, "peer unblocked");
            self.banned.remove(&peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(100.0, 10.0, t0);
        for i in 0..10 {
            assert!(l.allow(t0), "token {i} of the burst");
        }
        assert!(!l.allow(t0), "the 11th at once is over the burst");
        // 50 ms at 100/s refills 5 tokens, no more.
        let t1 = t0 + Duration::from_millis(50);
        for i in 0..5 {
            assert!(l.allow(t1), "refilled token {i}");
        }
        assert!(!l.allow(t1));
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..10 {
            assert!(l.allow(t2));
        }
        assert!(!l.allow(t2));
    }
}
