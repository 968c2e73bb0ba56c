//! Sync sessions and the [`Replica`]: the documents and sessions of one enterprise.
//!
//! Owns: deciding what to send to whom and when. The protocol is simple because
//! each author's changes form a hash chain: a peer's holdings are exactly its
//! [`Clock`] (author → newest seq). Each side sends its clock; the other replies
//! with what the clock lacks (in bounded chunks, or as a snapshot when the peer
//! holds nothing). Replies stop once both clocks are equal.
//! After a rejected batch the session with that peer for that document ends
//! (automerge's own sync would otherwise loop forever re-requesting the change).
//!
//! Spread: a creator or author sends to every connected peer; a peer passes on what it
//! gained to at most [`FORWARD_FANOUT`] others, and each repair tick visits at most
//! [`TICK_PEERS`] peers in turn, so a dense mesh costs O(peers) frames per change, not
//! O(peers²), while every pair is still reconciled within `peers / TICK_PEERS` ticks.
//!
//! Privacy: every message about a document is built only after
//! [`Document::may_hold`] says the receiving enterprise may hold it; a `members`
//! document is never sent to a non-member.
//!
//! Must not: do IO. Inputs are method calls; effects are [`Output`]s.

use automerge::Automerge;
use std::collections::{BTreeMap, BTreeSet};

use crate::doc::{DocId, Kind, SignedGenesis};
use crate::document::{Accepted, Clock, Document, Offload, Prepared};
use crate::error::{EditError, GenesisError, IngestError};
use crate::identity::{EnterpriseId, Keypair};
use crate::wire::{Payload, SyncMessage};

/// Target size of one chunk of changes.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// A peer that holds nothing gets a snapshot once a document has this many changes.
pub const SNAPSHOT_MIN_CHANGES: usize = 16;
/// Largest snapshot sent; bigger documents go as chunks of changes.
pub const MAX_SNAPSHOT_BYTES: usize = 8 * 1024 * 1024;
/// Repeated "missing deps" replies tolerated before a session pauses until the next tick.
const MAX_MISSING_DEPS: u32 = 3;
/// How many peers a node passes a received change on to (gossipsub's mesh degree).
pub const FORWARD_FANOUT: usize = 6;
/// How many connected peers one repair tick visits.
pub const TICK_PEERS: usize = 8;

/// Ticks in a row a peer may leave our hello unanswered before we stop greeting it until it
/// speaks or reconnects (a member removed while away is ignored by every other member).
const MAX_UNANSWERED_HELLOS: u32 = 16;

/// A stable pseudo-random rank of `peer` for what `me` sends of `doc`.
fn spread_rank(me: &EnterpriseId, peer: &EnterpriseId, doc: &DocId) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (me, peer, doc).hash(&mut h);
    h.finish()
}

/// What [`Replica::prepare`] verified of one message ahead of [`Replica::receive_prepared`].
#[derive(Default)]
pub struct PreparedMsg {
    genesis: Option<Result<SignedGenesis, GenesisError>>,
    changes: Option<Prepared>,
}

impl SyncMessage {
    /// A message that says only "I hold nothing of `doc`" (our empty clock, which reveals
    /// nothing), or with `decline`, "and I do not want it".
    fn empty(doc: DocId, decline: bool) -> Self {
        SyncMessage {
            doc,
            genesis: None,
            clock: Clock::new(),
            heads: Vec::new(),
            payload: Payload::None,
            decline,
        }
    }
}

/// An effect for the IO shell to carry out.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send a sync message to a peer.
    Send {
        /// The peer's enterprise.
        to: EnterpriseId,
        /// The message.
        msg: SyncMessage,
    },
    /// Store what a document gained (the node acknowledges a local write once this is
    /// durable; messages may leave before: see `cofab_protocol::Author`).
    Persist {
        /// The document.
        doc: DocId,
        /// Set when the document is new here.
        genesis: Option<SignedGenesis>,
        /// What was added.
        accepted: Accepted,
    },
    /// Input from a peer was refused.
    Rejected {
        /// The peer.
        from: EnterpriseId,
        /// The document.
        doc: DocId,
        /// Why.
        error: IngestError,
    },
    /// A document changed because of a peer.
    Updated {
        /// The document.
        doc: DocId,
        /// Its kind.
        kind: Kind,
        /// The peer it came from.
        from: EnterpriseId,
    },
}

/// Which public documents a node fetches when they are offered.
#[derive(Debug, Clone, Default)]
pub struct FetchPolicy {
    /// Kinds to refuse (empty: fetch everything).
    pub refuse_kinds: BTreeSet<Kind>,
}

impl FetchPolicy {
    fn accepts(&self, kind: Kind) -> bool {
        !self.refuse_kinds.contains(&kind)
    }
}

/// State of one (peer, document) session.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// The clock the peer last told us.
    pub confirmed: Option<Clock>,
    /// What we assume the peer holds (confirmed plus what we sent since).
    pub assumed: Clock,
    /// The peer's heads as last told.
    pub their_heads: Vec<automerge::ChangeHash>,
    /// The session ended after the peer sent something we refused.
    pub failed: bool,
    /// The peer does not want this document.
    pub declined: bool,
    /// Consecutive batches refused for missing deps.
    missing_deps: u32,
    /// Hellos sent by `tick` since the peer last spoke about this document.
    unanswered: u32,
    /// When we last heard from the peer about this document (caller's clock, ms).
    pub last_heard_ms: Option<i64>,
    /// The clock we last sent the peer.
    pub sent_clock: Option<Clock>,
    /// Since the last tick the peer's clock moved, or we sent it content or a genesis:
    /// the exchange is under way, so the next tick leaves it alone (re-sending then would
    /// duplicate what is still in flight).
    recent: bool,
}

/// Sync state of one peer for one document, for the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSyncState {
    /// The peer.
    pub peer: EnterpriseId,
    /// Connected now.
    pub connected: bool,
    /// Whether the peer's last known clock covers all our changes.
    pub has_all_ours: bool,
    /// Whether the peer's last known heads equal ours.
    pub same_heads: bool,
    /// Last time we heard from it about this document (ms).
    pub last_heard_ms: Option<i64>,
    /// Session ended after a refusal.
    pub failed: bool,
}

/// Counters kept by a replica.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Changes accepted from peers.
    pub changes_applied: u64,
    /// Local changes made.
    pub changes_local: u64,
    /// Rejections by reason label.
    pub rejected: BTreeMap<&'static str, u64>,
    /// Sync messages sent.
    pub messages_sent: u64,
    /// Sync messages received.
    pub messages_received: u64,
}

/// The documents and sync sessions of one enterprise. Sans-IO.
#[derive(Clone)]
pub struct Replica {
    me: Keypair,
    docs: BTreeMap<DocId, Document>,
    sessions: BTreeMap<(EnterpriseId, DocId), Session>,
    connected: BTreeSet<EnterpriseId>,
    /// Ticks so far (which peers the next tick visits).
    ticks: u64,
    /// Which public documents to fetch.
    pub policy: FetchPolicy,
    /// Counters.
    pub stats: Stats,
    /// The document that last received changes, and a copy of its automerge state made
    /// in [`Self::idle`] for its next received changes to be checked on.
    hot: Option<DocId>,
    spare: Option<(DocId, Automerge)>,
    /// Replaced automerge states, freed in [`Self::idle`].
    retired: Vec<Automerge>,
    /// Where small received batches have their signatures checked meanwhile.
    offload: Option<std::sync::Arc<dyn Offload>>,
}

/// Replaced states kept for [`Replica::idle`] at most; beyond, they are freed at once.
const MAX_RETIRED: usize = 16;

/// An edit through the replica failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// No such document here.
    #[error("no document {0}")]
    NotFound(DocId),
    /// The edit was refused.
    #[error(transparent)]
    Edit(#[from] EditError),
}

fn max_merge(a: &mut Clock, b: &Clock) {
    for (k, v) in b {
        let e = a.entry(*k).or_insert(0);
        *e = (*e).max(*v);
    }
}

fn covers(have: &Clock, need: &Clock) -> bool {
    need.iter()
        .all(|(k, v)| have.get(k).copied().unwrap_or(0) >= *v)
}

impl Replica {
    /// A replica for the enterprise `me`, holding nothing.
    pub fn new(me: Keypair) -> Self {
        Self {
            me,
            docs: BTreeMap::new(),
            sessions: BTreeMap::new(),
            connected: BTreeSet::new(),
            ticks: 0,
            policy: FetchPolicy::default(),
            stats: Stats::default(),
            hot: None,
            spare: None,
            retired: Vec::new(),
            offload: None,
        }
    }

    /// Checks the signatures of small received batches on `offload` while they are
    /// applied (see [`Document::prepare_with`]).
    pub fn set_offload(&mut self, offload: std::sync::Arc<dyn Offload>) {
        self.offload = Some(offload);
    }

    /// Work kept off a received change's way, for the caller to run once it has
    /// published what it received: frees the automerge states that accepted changes
    /// replaced, and copies the state of the document that last received changes, so
    /// that its next changes are checked on that copy instead of one made while they
    /// wait (a copy and a free cost ≈25 µs each for a 520-comment order). Holds one
    /// extra copy of one document at most; a no-op when the copy is current.
    pub fn idle(&mut self) {
        self.retired.clear();
        let Some(id) = self.hot else { return };
        let Some(doc) = self.docs.get(&id) else {
            self.hot = None;
            self.spare = None;
            return;
        };
        if !matches!(&self.spare, Some((d, copy)) if *d == id && doc.is_copy(copy)) {
            // Free the stale copy before making the next (one extra copy at a time).
            self.spare = None;
            self.spare = Some((id, doc.automerge().clone()));
        }
    }
    /// This enterprise.
    pub fn id(&self) -> EnterpriseId {
        self.me.id()
    }
    /// The key (for typed edits).
    pub fn keypair(&self) -> &Keypair {
        &self.me
    }
    /// Adds a document loaded from our own store (no outputs).
    pub fn load(&mut self, doc: Document) {
        self.docs.insert(doc.id(), doc);
    }
    /// A document.
    pub fn doc(&self, id: &DocId) -> Option<&Document> {
        self.docs.get(id)
    }
    /// All documents.
    pub fn docs(&self) -> impl Iterator<Item = &Document> {
        self.docs.values()
    }
    /// Connected peers.
    pub fn connected(&self) -> &BTreeSet<EnterpriseId> {
        &self.connected
    }
    /// A session, if any.
    pub fn session(&self, peer: &EnterpriseId, doc: &DocId) -> Option<&Session> {
        self.sessions.get(&(*peer, *doc))
    }

    /// Adds a document we just created locally; persists it and offers it to peers.
    pub fn create(&mut self, doc: Document, accepted: Accepted) -> Vec<Output> {
        let id = doc.id();
        let genesis = doc.signed_genesis().clone();
        self.stats.changes_local += accepted.changes.len() as u64;
        self.docs.insert(id, doc);
        // Peers certainly hold nothing of a new document: send it at once, no hello round trip.
        for p in self.connected.iter() {
            self.sessions.insert(
                (*p, id),
                Session {
                    confirmed: Some(Clock::new()),
                    ..Session::default()
                },
            );
        }
        let mut out = vec![Output::Persist {
            doc: id,
            genesis: Some(genesis),
            accepted,
        }];
        out.extend(self.offer(id));
        out
    }

    /// Runs a typed edit on a document, then persists and sends the result.
    pub fn edit<T>(
        &mut self,
        id: &DocId,
        now_ms: i64,
        f: impl FnOnce(&mut Document, &Keypair, i64) -> Result<T, EditError>,
    ) -> Result<(T, Vec<Output>), ReplicaError>
    where
        T: EditResult,
    {
        let doc = self.docs.get_mut(id).ok_or(ReplicaError::NotFound(*id))?;
        let before = doc.clock();
        let value = f(doc, &self.me, now_ms)?;
        let accepted = value.accepted().clone();
        if accepted.is_empty() {
            return Ok((value, Vec::new()));
        }
        self.stats.changes_local += accepted.changes.len() as u64;
        let peers: Vec<EnterpriseId> = self.connected.iter().copied().collect();
        let sends: Vec<Output> = peers
            .into_iter()
            .filter_map(|p| self.message_with(p, *id, false, Some((&before, &accepted))))
            .collect();
        let mut out = vec![Output::Persist {
            doc: *id,
            genesis: None,
            accepted,
        }];
        out.extend(sends);
        Ok((value, out))
    }

    /// Sends what connected peers lack of `id`, starting sessions where needed.
    fn offer(&mut self, id: DocId) -> Vec<Output> {
        let peers: Vec<EnterpriseId> = self.connected.iter().copied().collect();
        peers
            .into_iter()
            .filter_map(|p| self.message_for(p, id, false))
            .collect()
    }

    /// A peer connected: start a session for every document it may hold.
    pub fn peer_connected(&mut self, peer: EnterpriseId) -> Vec<Output> {
        if peer == self.me.id() {
            return Vec::new();
        }
        self.connected.insert(peer);
        let ids: Vec<DocId> = self.docs.keys().copied().collect();
        ids.into_iter()
            .filter_map(|d| self.message_for(peer, d, true))
            .collect()
    }

    /// A peer disconnected: its sessions end (they restart on reconnect).
    pub fn peer_disconnected(&mut self, peer: &EnterpriseId) {
        self.connected.remove(peer);
        self.sessions.retain(|(p, _), _| p != peer);
    }

    /// Asks a connected peer for a document we do not hold (e.g. after an announcement).
    pub fn request(&mut self, peer: EnterpriseId, doc: DocId) -> Option<Output> {
        if self.docs.contains_key(&doc) || !self.connected.contains(&peer) {
            return None;
        }
        Some(Output::Send {
            to: peer,
            msg: SyncMessage::empty(doc, false),
        })
    }

    /// Builds the next message for (peer, doc), or `None` if there is nothing to say.
    /// `hello` forces a message (session start, tick).
    fn message_for(&mut self, peer: EnterpriseId, id: DocId, hello: bool) -> Option<Output> {
        self.message_with(peer, id, hello, None)
    }

    /// [`Self::message_for`], given what a local edit just added (`fresh`: our clock
    /// before the edit, and the edit's changes): a peer assumed to hold exactly the
    /// clock before gets those changes as they are, without rebuilding them from the
    /// document (automerge re-encodes every change it is asked for).
    fn message_with(
        &mut self,
        peer: EnterpriseId,
        id: DocId,
        hello: bool,
        fresh: Option<(&Clock, &Accepted)>,
    ) -> Option<Output> {
        let doc = self.docs.get(&id)?;
        if doc.is_empty() && !doc.may_hold(&self.me.id()) {
            // Offered to us by a member that added us after the genesis: wait for the content.
            return None;
        }
        if !doc.may_hold(&peer) {
            self.sessions.remove(&(peer, id));
            return None;
        }
        let session = self.sessions.entry((peer, id)).or_default();
        if session.failed || session.declined {
            return None;
        }
        if hello && session.confirmed.is_none() {
            session.assumed = Clock::new();
        }
        let ours = doc.clock();
        let known = session.confirmed.is_some();
        let payload = if !known {
            Payload::None
        } else if session.assumed.is_empty() && doc.change_count() >= SNAPSHOT_MIN_CHANGES {
            let (bytes, sigs) = doc.snapshot();
            if bytes.len() <= MAX_SNAPSHOT_BYTES {
                session.assumed = ours.clone();
                Payload::Snapshot { bytes, sigs }
            } else {
                let (batch, _, covered) = doc.missing_for(&session.assumed, CHUNK_BYTES);
                session.assumed = covered;
                Payload::Changes(batch)
            }
        } else if let Some((_, acc)) = fresh.filter(|(b, _)| session.assumed == **b) {
            session.assumed = ours.clone();
            Payload::Changes(crate::document::ChangeBatch {
                changes: acc.changes.clone(),
                sigs: acc.sigs.clone(),
            })
        } else {
            let (batch, _, covered) = doc.missing_for(&session.assumed, CHUNK_BYTES);
            if batch.changes.is_empty() {
                Payload::None
            } else {
                session.assumed = covered;
                Payload::Changes(batch)
            }
        };
        if matches!(payload, Payload::None) && !hello {
            return None;
        }
        let send_genesis = session.confirmed.as_ref().is_none_or(|c| c.is_empty());
        let genesis = send_genesis.then(|| {
            (
                doc.signed_genesis().bytes().to_vec(),
                doc.signed_genesis().signature(),
            )
        });
        self.stats.messages_sent += 1;
        session.recent |= genesis.is_some() || !matches!(payload, Payload::None);
        session.sent_clock = Some(ours.clone());
        Some(Output::Send {
            to: peer,
            msg: SyncMessage {
                doc: id,
                genesis,
                clock: ours,
                heads: doc.heads(),
                payload,
                decline: false,
            },
        })
    }

    /// Verifies what a message carries against the replica as it is now, without
    /// changing anything (`&self`: the node prepares the messages of one frame on
    /// several threads, then hands each to [`Self::receive_prepared`] in order): the
    /// genesis of a document we lack and, with `changes`, the changes for a document we
    /// hold (a caller leaves them out when an earlier message of the same frame may
    /// change that document first).
    pub fn prepare(&self, msg: &SyncMessage, changes: bool) -> PreparedMsg {
        let held = self.docs.get(&msg.doc);
        PreparedMsg {
            genesis: match (&msg.genesis, held) {
                (Some((g, sig)), None) => Some(SignedGenesis::from_parts(g.clone(), *sig)),
                _ => None,
            },
            changes: match (&msg.payload, held) {
                (Payload::Changes(batch), Some(doc)) if changes => Some(doc.prepare(batch)),
                _ => None,
            },
        }
    }

    /// Handles a sync message from a connected peer. `now_ms` is the caller's clock.
    pub fn receive(&mut self, from: EnterpriseId, msg: SyncMessage, now_ms: i64) -> Vec<Output> {
        self.receive_prepared(from, msg, now_ms, PreparedMsg::default())
    }

    /// [`Self::receive`] with what [`Self::prepare`] verified of the same message: the
    /// genesis result is used as is (it depends on nothing else); the changes only if the
    /// document has not changed since (otherwise they are verified again here).
    pub fn receive_prepared(
        &mut self,
        from: EnterpriseId,
        msg: SyncMessage,
        now_ms: i64,
        prepared: PreparedMsg,
    ) -> Vec<Output> {
        self.stats.messages_received += 1;
        let id = msg.doc;
        let mut out = Vec::new();
        let reject = |s: &mut Stats, error: IngestError| {
            *s.rejected.entry(error.reason()).or_default() += 1;
            Output::Rejected {
                from,
                doc: id,
                error,
            }
        };
        let mut new_genesis = None;
        if !self.docs.contains_key(&id) {
            if msg.decline {
                return out;
            }
            let Some((g, sig)) = msg.genesis.clone() else {
                // The peer asks for, or talks about, a document we lack and sent no genesis:
                // answer with an empty clock so it sends the genesis.
                if self.connected.contains(&from) {
                    out.push(Output::Send {
                        to: from,
                        msg: SyncMessage::empty(id, false),
                    });
                }
                return out;
            };
            let checked = match prepared.genesis {
                Some(done) => done,
                None => SignedGenesis::from_parts(g, sig),
            };
            let sg = match checked {
                Ok(sg) if sg.id() == id => sg,
                Ok(_) => {
                    return vec![reject(
                        &mut self.stats,
                        IngestError::Genesis(GenesisError::WrongId),
                    )]
                }
                Err(e) => return vec![reject(&mut self.stats, IngestError::Genesis(e))],
            };
            if !self.policy.accepts(sg.genesis().kind) {
                return vec![Output::Send {
                    to: from,
                    msg: SyncMessage::empty(id, true),
                }];
            }
            new_genesis = Some(sg.clone());
            self.docs.insert(id, Document::new(sg));
        }
        let doc = self.docs.get_mut(&id).expect("present");
        // While we hold nothing we know only the genesis members, not members added
        // since: judge the sender (and ourselves) once the document has content.
        if !doc.is_empty() && !doc.may_hold(&from) {
            if new_genesis.is_some() {
                self.docs.remove(&id);
            }
            return vec![reject(&mut self.stats, IngestError::NotAllowed)];
        }
        let session = self.sessions.entry((from, id)).or_default();
        if msg.decline {
            session.declined = true;
            return out;
        }
        if session.failed {
            // A genesis re-sent by a peer we stopped listening to is not kept (it was never persisted).
            if new_genesis.is_some() {
                self.docs.remove(&id);
            }
            return out;
        }
        session.last_heard_ms = Some(now_ms);
        session.unanswered = 0;
        let had_payload = !matches!(msg.payload, Payload::None);
        let result = match msg.payload {
            Payload::None => Ok(Accepted::default()),
            Payload::Changes(batch) => {
                let p = match prepared.changes {
                    Some(p) if doc.is_current(&p) => p,
                    _ => {
                        let mut spare = match self.spare.take() {
                            Some((d, copy)) if d == id => Some(copy),
                            other => {
                                self.spare = other;
                                None
                            }
                        };
                        let p = doc.prepare_with(&batch, &mut spare, self.offload.as_deref());
                        if let Some(copy) = spare {
                            self.spare = Some((id, copy));
                        }
                        p
                    }
                };
                self.hot = Some(id);
                if self.retired.len() >= MAX_RETIRED {
                    self.retired.clear();
                }
                doc.commit_prepared_retiring(p, &mut self.retired)
            }
            // A snapshot that arrives after we already hold what its sender held (two
            // greetings crossed) would cost a full load for nothing: skip it.
            Payload::Snapshot { .. } if !doc.is_empty() && covers(&doc.clock(), &msg.clock) => {
                Ok(Accepted::default())
            }
            Payload::Snapshot { bytes, sigs } => doc.ingest_snapshot(&bytes, sigs),
        };
        let accepted = match result {
            Ok(a) => {
                session.missing_deps = 0;
                a
            }
            Err(IngestError::MissingDeps(_)) => {
                session.missing_deps += 1;
                *self.stats.rejected.entry("missing_deps").or_default() += 1;
                if session.missing_deps > MAX_MISSING_DEPS {
                    if new_genesis.is_some() {
                        self.docs.remove(&id);
                    }
                    return out;
                }
                Accepted::default()
            }
            Err(e) => {
                session.failed = true;
                if new_genesis.is_some() {
                    self.docs.remove(&id);
                }
                out.push(reject(&mut self.stats, e));
                return out;
            }
        };
        // A members document we are not (or no longer) a member of is not kept.
        if !doc.is_empty() && !doc.may_hold(&self.me.id()) {
            self.docs.remove(&id);
            self.sessions.retain(|(_, d), _| *d != id);
            return out;
        }
        let ingested = !accepted.is_empty();
        if ingested {
            self.stats.changes_applied += if accepted.snapshot.is_some() {
                doc.change_count()
            } else {
                accepted.changes.len()
            } as u64;
            out.push(Output::Persist {
                doc: id,
                genesis: new_genesis.clone(),
                accepted,
            });
            out.push(Output::Updated {
                doc: id,
                kind: doc.genesis().kind,
                from,
            });
        } else if let Some(g) = new_genesis.clone() {
            out.push(Output::Persist {
                doc: id,
                genesis: Some(g),
                accepted: Accepted::default(),
            });
        }
        let ours = doc.clock();
        let session = self.sessions.get_mut(&(from, id)).expect("present");
        let first_contact = session.confirmed.is_none();
        session.their_heads = msg.heads.clone();
        if session.missing_deps > 0 {
            // The peer's batch did not fit: resend from what it really holds.
            session.assumed = msg.clock.clone();
        } else {
            max_merge(&mut session.assumed, &msg.clock);
        }
        if session.confirmed.as_ref() != Some(&msg.clock) {
            session.recent = true;
        }
        session.confirmed = Some(msg.clock.clone());
        let we_lack = !covers(&ours, &msg.clock);
        let they_know = session.sent_clock.as_ref() == Some(&ours);
        // Any payload is acknowledged (even if we already held it), so the sender's idea of our clock is corrected.
        // A message with the genesis means the peer does not know our clock (its session
        // restarted, or our last reply was lost): answer it, or it says hello forever.
        let peer_unsure = msg.genesis.is_some() && (!ours.is_empty() || first_contact);
        let must_reply = we_lack
            || ingested
            || had_payload
            || new_genesis.is_some()
            || session.missing_deps > 0
            || !they_know
            || peer_unsure;
        if doc.is_empty() && (!doc.may_hold(&from) || !doc.may_hold(&self.me.id())) {
            if !must_reply {
                return out;
            }
            // A member added after the genesis offered the document: tell it we hold nothing
            // (our empty clock reveals nothing) so it sends the content.
            out.push(Output::Send {
                to: from,
                msg: SyncMessage::empty(id, false),
            });
            return out;
        }
        out.extend(self.message_for(from, id, must_reply));
        // Forward what we just gained to a few other connected peers.
        if ingested {
            let peers = self.forward_targets(from, id);
            let small = self
                .docs
                .get(&id)
                .is_some_and(|d| d.change_count() < SNAPSHOT_MIN_CHANGES);
            for p in peers {
                if new_genesis.is_some() && small && !self.sessions.contains_key(&(p, id)) {
                    // A document new to us is most likely new to our other peers too: send it
                    // whole at once (as its creator does) instead of a hello round trip first.
                    // A peer that has it already just acknowledges.
                    self.sessions.insert(
                        (p, id),
                        Session {
                            confirmed: Some(Clock::new()),
                            ..Session::default()
                        },
                    );
                }
                if self
                    .sessions
                    .get(&(p, id))
                    .is_some_and(|s| s.confirmed.is_some())
                    || !self.sessions.contains_key(&(p, id))
                {
                    let hello = !self.sessions.contains_key(&(p, id));
                    out.extend(self.message_for(p, id, hello));
                }
            }
        }
        out
    }

    /// At most [`FORWARD_FANOUT`] connected peers to pass what we just gained of `id` on
    /// to: not `from`, not peers the document may not reach, not peers that told us they
    /// hold everything we hold or whose session for it ended. Forwarding to every peer
    /// costs O(peers²) frames per change in a dense mesh; the others learn it from the
    /// creator, from other forwarders, or at a later `tick`. The choice depends on us, the
    /// peer and the document, so forwarders of one document spread it over different peers.
    fn forward_targets(&self, from: EnterpriseId, id: DocId) -> Vec<EnterpriseId> {
        let Some(doc) = self.docs.get(&id) else {
            return Vec::new();
        };
        // Our clock only if some peer's confirmed clock is to be compared with it.
        let ours = std::cell::OnceCell::new();
        let mut ranked: Vec<(u64, EnterpriseId)> = self
            .connected
            .iter()
            .filter(|p| **p != from && doc.may_hold(p))
            .filter(|p| match self.sessions.get(&(**p, id)) {
                None => true,
                Some(s) => {
                    !s.failed
                        && !s.declined
                        && !s
                            .confirmed
                            .as_ref()
                            .is_some_and(|c| covers(c, ours.get_or_init(|| doc.clock())))
                }
            })
            .map(|p| (spread_rank(&self.me.id(), p, &id), *p))
            .collect();
        ranked.sort_unstable();
        ranked.truncate(FORWARD_FANOUT);
        ranked.into_iter().map(|(_, p)| p).collect()
    }

    /// Periodic work: re-offer documents to peers whose state is unknown or behind
    /// (recovers lost messages), and start sessions for newly allowed peers.
    ///
    /// With more than [`TICK_PEERS`] peers connected, one tick visits [`TICK_PEERS`] of
    /// them in turn, so every peer is visited every `peers / TICK_PEERS` ticks: a dense
    /// mesh otherwise pays a frame per pair per tick after every change (O(peers²)),
    /// while changes themselves travel at once through `edit`, `create` and forwarding.
    pub fn tick(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        let n = self.connected.len().max(1);
        let start = (self.ticks % n as u64) as usize * TICK_PEERS % n;
        let peers: Vec<EnterpriseId> = self
            .connected
            .iter()
            .copied()
            .cycle()
            .skip(start)
            .take(self.connected.len().min(TICK_PEERS))
            .collect();
        self.ticks += 1;
        // Each document's clock and heads once per tick, not once per (peer, document).
        let state: Vec<(DocId, Clock, Vec<automerge::ChangeHash>)> = self
            .docs
            .iter()
            .map(|(id, d)| (*id, d.clock(), d.heads()))
            .collect();
        for p in peers {
            for (id, ours, heads) in &state {
                let needs = match self.sessions.get_mut(&(p, *id)) {
                    None => true,
                    Some(s) if s.failed || s.declined || s.unanswered >= MAX_UNANSWERED_HELLOS => {
                        false
                    }
                    Some(s) => {
                        s.missing_deps = 0;
                        let recent = std::mem::take(&mut s.recent);
                        match &s.confirmed {
                            None => !recent,
                            Some(c) => {
                                let differ = c != ours || s.their_heads != *heads;
                                if differ && !recent {
                                    s.assumed = c.clone();
                                }
                                differ && !recent
                            }
                        }
                    }
                };
                if needs {
                    if let Some(s) = self.sessions.get_mut(&(p, *id)) {
                        s.unanswered += 1;
                    }
                    out.extend(self.message_for(p, *id, true));
                }
            }
        }
        out
    }

    /// Per-peer sync state of a document.
    pub fn sync_state(&self, id: &DocId) -> Vec<PeerSyncState> {
        let Some(doc) = self.docs.get(id) else {
            return Vec::new();
        };
        let ours = doc.clock();
        let heads = doc.heads();
        self.sessions
            .iter()
            .filter(|((_, d), _)| d == id)
            .map(|((p, _), s)| PeerSyncState {
                peer: *p,
                connected: self.connected.contains(p),
                has_all_ours: s.confirmed.as_ref().is_some_and(|c| covers(c, &ours)),
                same_heads: s.their_heads == heads,
                last_heard_ms: s.last_heard_ms,
                failed: s.failed,
            })
            .collect()
    }
}

/// Results of typed edits that carry what they added.
pub trait EditResult {
    /// What the edit added.
    fn accepted(&self) -> &Accepted;
}
impl EditResult for Accepted {
    fn accepted(&self) -> &Accepted {
        self
    }
}
