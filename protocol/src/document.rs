//! A signed automerge document: the genesis, the automerge state, the signatures
//! we hold, and the per-author change chains.
//!
//! Owns: local edits (commit, rule check, sign), verification of received changes
//! (binding, replay, chain, signatures, rules) before anything is applied, and
//! choosing what a peer lacks given its [`Clock`].
//! Must not: do IO or read the clock; `now_ms` is always an argument.
//!
//! ## How signature cost is kept low
//! Every change's actor id *is* its author ([`Author`]: the enterprise's 32-byte public
//! key, plus an incarnation after an unclean restart), and automerge puts
//! an author's previous change (seq-1) directly in each change's deps, so each
//! change hash commits to the author's whole chain. A received batch therefore needs
//! one verified signature per author (on its newest change in the batch); the
//! chain is checked by hash links. Signatures at every [`CHECKPOINT`]-th change are
//! also forwarded, so a long chain can later be re-sent in bounded chunks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use automerge::transaction::{CommitOptions, Transaction};
use automerge::{Automerge, Change, ChangeHash, ReadDoc};
use ed25519_dalek::VerifyingKey;

use crate::doc::{DocId, Genesis, SignedGenesis, Visibility};
use crate::error::{EditError, IngestError};
use crate::identity::{Author, EnterpriseId, Keypair};
use crate::rules;

/// What a peer holds: for each author (enterprise and incarnation), the highest change
/// sequence number.
pub type Clock = BTreeMap<Author, u64>;

/// Signatures are forwarded at every change whose seq is a multiple of this.
pub const CHECKPOINT: u64 = 1024;
/// Most changes accepted in one batch.
pub const MAX_CHANGES_PER_BATCH: usize = 200_000;

/// Changes as raw automerge bytes plus the signatures that cover them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeBatch {
    /// Raw change chunks.
    pub changes: Vec<Vec<u8>>,
    /// `(change hash, ed25519 signature over doc id + hash)`.
    pub sigs: Vec<(ChangeHash, [u8; 64])>,
}

/// What an edit or an ingest added: the node persists exactly this.
#[derive(Clone, Debug, Default)]
pub struct Accepted {
    /// Raw bytes of each new change, in causal order.
    pub changes: Vec<Vec<u8>>,
    /// Signatures now held for new changes.
    pub sigs: Vec<(ChangeHash, [u8; 64])>,
    /// Set when a whole snapshot was adopted (store it instead of the changes).
    pub snapshot: Option<Vec<u8>>,
}

impl Accepted {
    /// Whether nothing new was added.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.snapshot.is_none()
    }
}

/// A batch verified against a document and ready to be applied, or its refusal
/// ([`Document::prepare`]).
pub struct Prepared {
    /// Heads of the document it was prepared from.
    base: Vec<ChangeHash>,
    /// `Ok(None)`: nothing new in the batch.
    result: Result<Option<Box<Ready>>, IngestError>,
}

struct Ready {
    doc: Automerge,
    paths: rules::PathCache,
    order: Vec<(Author, ChangeHash)>,
    raw: Vec<Vec<u8>>,
    verified: Vec<(ChangeHash, [u8; 64])>,
}

/// A document with its genesis, automerge state and signatures.
#[derive(Clone)]
pub struct Document {
    genesis: SignedGenesis,
    doc: Automerge,
    sigs: HashMap<ChangeHash, [u8; 64]>,
    /// Per author: hashes of its changes, index = seq - 1.
    chains: BTreeMap<Author, Vec<ChangeHash>>,
    /// Object paths resolved while checking accepted changes.
    paths: rules::PathCache,
}

impl std::fmt::Debug for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Document")
            .field("id", &self.id())
            .field("changes", &self.change_count())
            .finish()
    }
}

/// What verification needs to know about a change: implemented for full changes and
/// for automerge's change metadata (which a snapshot yields without rebuilding ops).
trait ChangeInfo {
    fn actor_bytes(&self) -> &[u8];
    fn seq(&self) -> u64;
    fn hash(&self) -> ChangeHash;
    fn deps(&self) -> &[ChangeHash];
    fn message(&self) -> Option<&str>;
}

impl ChangeInfo for Change {
    fn actor_bytes(&self) -> &[u8] {
        self.actor_id().to_bytes()
    }
    fn seq(&self) -> u64 {
        Change::seq(self)
    }
    fn hash(&self) -> ChangeHash {
        Change::hash(self)
    }
    fn deps(&self) -> &[ChangeHash] {
        Change::deps(self)
    }
    fn message(&self) -> Option<&str> {
        Change::message(self)
    }
}

impl ChangeInfo for automerge::ChangeMetadata<'_> {
    fn actor_bytes(&self) -> &[u8] {
        self.actor.to_bytes()
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn hash(&self) -> ChangeHash {
        self.hash
    }
    fn deps(&self) -> &[ChangeHash] {
        &self.deps
    }
    fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }
}

impl Document {
    /// An empty document for a genesis.
    pub fn new(genesis: SignedGenesis) -> Self {
        Self {
            genesis,
            doc: Automerge::new(),
            sigs: HashMap::new(),
            chains: BTreeMap::new(),
            paths: rules::PathCache::default(),
        }
    }

    /// Rebuilds a document from our own store (already verified when stored).
    pub fn load_trusted(
        genesis: SignedGenesis,
        snapshot: Option<&[u8]>,
        changes: Vec<Vec<u8>>,
        sigs: impl IntoIterator<Item = (ChangeHash, [u8; 64])>,
    ) -> Result<Self, IngestError> {
        let mut doc = match snapshot {
            Some(bytes) => catch(|| Automerge::load(bytes))
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map_err(IngestError::Snapshot)?,
            None => Automerge::new(),
        };
        let parsed = changes
            .into_iter()
            .map(|b| Change::from_bytes(b).map_err(|e| IngestError::MalformedChange(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        catch(|| doc.apply_changes(parsed))
            .map_err(IngestError::Apply)?
            .map_err(|e| IngestError::Apply(e.to_string()))?;
        let mut d = Self {
            genesis,
            doc,
            sigs: sigs.into_iter().collect(),
            chains: BTreeMap::new(),
            paths: rules::PathCache::default(),
        };
        d.rebuild_chains();
        Ok(d)
    }

    fn rebuild_chains(&mut self) {
        self.chains.clear();
        let mut all: Vec<(Author, u64, ChangeHash)> = self
            .doc
            .get_changes_meta(&[])
            .iter()
            .filter_map(|m| Some((Author::from_actor(m.actor.to_bytes()).ok()?, m.seq, m.hash)))
            .collect();
        all.sort_by_key(|(a, s, _)| (*a, *s));
        for (a, _, h) in all {
            self.chains.entry(a).or_default().push(h);
        }
    }

    /// The document id.
    pub fn id(&self) -> DocId {
        self.genesis.id()
    }
    /// The signed genesis.
    pub fn signed_genesis(&self) -> &SignedGenesis {
        &self.genesis
    }
    /// The parsed genesis.
    pub fn genesis(&self) -> &Genesis {
        self.genesis.genesis()
    }
    /// Read access to the automerge state (typed views read through this).
    pub fn automerge(&self) -> &Automerge {
        &self.doc
    }
    /// Current heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }
    /// Number of changes held.
    pub fn change_count(&self) -> usize {
        self.chains.values().map(|c| c.len()).sum()
    }
    /// Whether the document holds no change yet.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }
    /// For each author, the number of its changes held.
    pub fn clock(&self) -> Clock {
        self.chains
            .iter()
            .map(|(a, c)| (*a, c.len() as u64))
            .collect()
    }
    /// Every signature held (for persistence).
    pub fn signatures(&self) -> impl Iterator<Item = (&ChangeHash, &[u8; 64])> {
        self.sigs.iter()
    }
    /// A compact snapshot of the automerge state.
    pub fn save(&self) -> Vec<u8> {
        self.doc.save()
    }

    /// Whether `who` may hold this document now: anyone for public documents, members otherwise.
    pub fn may_hold(&self, who: &EnterpriseId) -> bool {
        self.genesis().visibility == Visibility::Public || self.role_of(who).is_some()
    }
    /// The current role of `who`.
    pub fn role_of(&self, who: &EnterpriseId) -> Option<crate::doc::Role> {
        rules::role_at(&self.doc, self.genesis(), who, &self.doc.get_heads())
    }
    /// Current members (owner included) and their roles.
    pub fn members(&self) -> BTreeMap<EnterpriseId, crate::doc::Role> {
        let g = self.genesis();
        let mut out: BTreeMap<_, _> = g.members.clone();
        out.insert(g.owner, crate::doc::Role::Owner);
        let heads = self.doc.get_heads();
        if let Ok(Some((automerge::Value::Object(_), m))) =
            automerge::ReadDoc::get_at(&self.doc, automerge::ROOT, "members", &heads)
        {
            for key in automerge::ReadDoc::keys(&self.doc, &m) {
                if let Ok(id) = key.parse::<EnterpriseId>() {
                    match rules::role_at(&self.doc, g, &id, &heads) {
                        Some(r) => {
                            out.insert(id, r);
                        }
                        None => {
                            out.remove(&id);
                        }
                    }
                }
            }
        }
        out
    }

    /// Makes a local change as `author`: runs `f` in a transaction, commits, checks
    /// the rules exactly as a receiving peer would, and signs it.
    /// On any error nothing is kept.
    pub fn edit<T>(
        &mut self,
        author: &Keypair,
        now_ms: i64,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, EditError>,
    ) -> Result<(T, Accepted), EditError> {
        let mut f = Some(f);
        let (mut outs, acc) = self.edit_many(author, now_ms, 1, |_, tx| match f.take() {
            Some(f) => f(tx),
            None => unreachable!("edit_many calls f once for n = 1"),
        })?;
        let out = outs.pop().expect("one result for n = 1");
        Ok((out, acc))
    }

    /// Rebuilds the automerge state without some of our own just-made changes.
    fn drop_local(&mut self, hashes: &[ChangeHash]) {
        let drop: HashSet<&ChangeHash> = hashes.iter().collect();
        let keep: Vec<Change> = self
            .doc
            .get_changes(&[])
            .into_iter()
            .filter(|c| !drop.contains(&c.hash()))
            .collect();
        let mut d = Automerge::new();
        d.apply_changes(keep).expect("re-applying our own changes");
        self.doc = d;
    }

    /// Makes `n` local changes in a row as `author`, one per call of `f` (each committed
    /// and rule-checked like [`Self::edit`]). Only the last change, and any whose seq is a
    /// multiple of [`CHECKPOINT`], is signed: the last signature covers the others
    /// through the author's hash chain, exactly as for a received batch. All or nothing.
    pub fn edit_many<T>(
        &mut self,
        author: &Keypair,
        now_ms: i64,
        n: usize,
        mut f: impl FnMut(usize, &mut Transaction<'_>) -> Result<T, EditError>,
    ) -> Result<(Vec<T>, Accepted), EditError> {
        let me = author.author();
        let message = self.id().to_string();
        self.doc.set_actor(me.actor());
        let mut outs = Vec::with_capacity(n);
        let mut made: Vec<(ChangeHash, Vec<u8>)> = Vec::new();
        let mut fresh = rules::PathCache::default();
        // The author's role, read once from the document as it stands (cheap: no
        // history lookup). It holds for all n changes: a role changes only through
        // `members`, which only the owner may write, and the owner's role is fixed.
        let role = self.role_of(&me.enterprise);
        for i in 0..n {
            let mut tx = self.doc.transaction();
            let out = match f(i, &mut tx) {
                Ok(v) => v,
                Err(e) => {
                    tx.rollback();
                    let hashes: Vec<ChangeHash> = made.iter().map(|(h, _)| *h).collect();
                    if !hashes.is_empty() {
                        self.drop_local(&hashes);
                    }
                    return Err(e);
                }
            };
            let opts = CommitOptions::default()
                .with_message(message.clone())
                .with_time(now_ms / 1000);
            let (hash, _) = tx.commit_with(opts);
            outs.push(out);
            let Some(hash) = hash else { continue };
            let change = self.doc.get_last_local_change().expect("just committed");
            made.push((hash, change.raw_bytes().to_vec()));
            let checked = rules::check_change(
                &self.doc,
                self.genesis.genesis(),
                &change,
                Some(role),
                &self.paths,
                &mut fresh,
            );
            if let Err(v) = checked {
                let hashes: Vec<ChangeHash> = made.iter().map(|(h, _)| *h).collect();
                self.drop_local(&hashes);
                return Err(v.into());
            }
        }
        self.paths.extend(fresh);
        let mut acc = Accepted::default();
        if made.is_empty() {
            return Ok((outs, acc));
        }
        let chain = self.chains.entry(me).or_default();
        let last = made.len();
        for (k, (hash, raw)) in made.into_iter().enumerate() {
            chain.push(hash);
            let seq = chain.len() as u64;
            if k + 1 == last || seq.is_multiple_of(CHECKPOINT) {
                let sig = author.sign_change(&self.genesis.id(), &hash).to_bytes();
                self.sigs.insert(hash, sig);
                acc.sigs.push((hash, sig));
            }
            acc.changes.push(raw);
        }
        Ok((outs, acc))
    }

    /// Verifies and applies a batch of received changes. All or nothing.
    pub fn ingest(&mut self, batch: ChangeBatch) -> Result<Accepted, IngestError> {
        let prepared = self.prepare(&batch);
        self.commit_prepared(prepared)
    }

    /// Everything [`Self::ingest`] does short of changing the document: parse, verify
    /// (binding, replay, chain, signatures) and rule-check on a copy. Takes `&self`, so
    /// batches for different documents can be prepared on several threads; the result
    /// is applied with [`Self::commit_prepared`] while [`Self::is_current`] holds.
    pub fn prepare(&self, batch: &ChangeBatch) -> Prepared {
        self.prepare_with(batch, &mut None, None)
    }

    /// [`Self::prepare`], checking the changes on `spare` instead of a fresh copy of the
    /// document when `spare` is one (same heads): a copy made while the node was idle
    /// (see [`crate::sync::Replica::idle`]) keeps the copy off a received change's way.
    /// `spare` is taken only if the changes get applied to it; otherwise it is left.
    ///
    /// With an `offload`, a small batch's signatures (≤ [`OFFLOAD_MAX_CHANGES`] changes)
    /// are checked there while the changes are applied and rule-checked here; the
    /// verdict is awaited before anything is returned, and a bad signature is reported
    /// ahead of any other refusal, exactly as without.
    pub fn prepare_with(
        &self,
        batch: &ChangeBatch,
        spare: &mut Option<Automerge>,
        offload: Option<&dyn Offload>,
    ) -> Prepared {
        Prepared {
            base: self.doc.get_heads(),
            result: self.prepare_inner(batch, spare, offload),
        }
    }

    /// Whether `copy` stands exactly where this document stands (same heads, so the
    /// same changes and, automerge being deterministic, the same state).
    pub fn is_copy(&self, copy: &Automerge) -> bool {
        copy.get_heads() == self.doc.get_heads()
    }

    fn prepare_inner(
        &self,
        batch: &ChangeBatch,
        spare: &mut Option<Automerge>,
        offload: Option<&dyn Offload>,
    ) -> Result<Option<Box<Ready>>, IngestError> {
        if batch.changes.len() > MAX_CHANGES_PER_BATCH {
            return Err(IngestError::TooLarge(format!(
                "{} changes",
                batch.changes.len()
            )));
        }
        let mut seen = HashSet::new();
        let mut fresh = Vec::new();
        for bytes in &batch.changes {
            let c = catch(|| Change::from_bytes(bytes.clone()))
                .map_err(IngestError::MalformedChange)?
                .map_err(|e| IngestError::MalformedChange(e.to_string()))?;
            let h = c.hash();
            if self.holds(&h) || !seen.insert(h) {
                continue;
            }
            fresh.push(c);
        }
        if fresh.is_empty() {
            return Ok(None);
        }
        let sigs: HashMap<ChangeHash, [u8; 64]> = batch.sigs.iter().copied().collect();
        let (order, checks) = self.verify_fresh(&fresh, &sigs, true)?;
        let verified = checks.signatures();
        let verdict = match offload.filter(|_| fresh.len() <= OFFLOAD_MAX_CHANGES) {
            Some(o) => Some(o.start(checks)),
            None => {
                checks.run()?;
                None
            }
        };
        let applied = self.apply_checked(&fresh, &order, verified, spare);
        // The signatures' verdict comes first: a forged change is refused as forged,
        // whatever else is wrong with it.
        if let Some(wait) = verdict {
            wait()?;
        }
        applied
    }

    /// Applies `fresh` (in `order`) to a copy of the document and checks each change's
    /// rules on it (the second half of [`Self::prepare`]).
    fn apply_checked(
        &self,
        fresh: &[Change],
        order: &[usize],
        verified: Vec<(ChangeHash, [u8; 64])>,
        spare: &mut Option<Automerge>,
    ) -> Result<Option<Box<Ready>>, IngestError> {
        let sorted: Vec<&Change> = order.iter().map(|&i| &fresh[i]).collect();
        let mut scratch = match spare.take() {
            Some(copy) if self.is_copy(&copy) => copy,
            other => {
                *spare = other;
                self.doc.clone()
            }
        };
        catch(|| scratch.apply_changes(sorted.iter().map(|c| (*c).clone())))
            .map_err(IngestError::Apply)?
            .map_err(|e| IngestError::Apply(e.to_string()))?;
        let mut paths = rules::PathCache::default();
        let g = self.genesis.genesis();
        // While the changes follow on from exactly what we hold (the common case: a
        // peer's new change on top of our heads), an author's role at a change's deps is
        // its role in `self.doc` now, read without history lookups; an owner's change
        // may alter roles, so from then on roles are read at each change's deps.
        let mut heads: BTreeSet<ChangeHash> = self.doc.get_heads().into_iter().collect();
        let mut current = true;
        for c in &sorted {
            let deps: BTreeSet<ChangeHash> = c.deps().iter().copied().collect();
            current = current && deps == heads;
            let author = Author::from_actor(c.actor_id().to_bytes()).expect("checked");
            let role = current.then(|| self.role_of(&author.enterprise));
            rules::check_change(&scratch, g, c, role, &self.paths, &mut paths)?;
            current = current && author.enterprise != g.owner;
            heads = [c.hash()].into();
        }
        let order = sorted
            .iter()
            .map(|c| {
                (
                    Author::from_actor(c.actor_id().to_bytes()).expect("checked"),
                    c.hash(),
                )
            })
            .collect();
        let raw = sorted.iter().map(|c| c.raw_bytes().to_vec()).collect();
        Ok(Some(Box::new(Ready {
            doc: scratch,
            paths,
            order,
            raw,
            verified,
        })))
    }

    /// Whether the document holds the change `hash`. Asked through `get_missing_deps`,
    /// a hash-table lookup in automerge's change graph: `get_change_meta_by_hash`
    /// collects the change's metadata from the op store (≈13 µs in a 520-change order).
    /// Our documents never queue changes (deps are checked before anything is
    /// applied), so no queued change is mistaken for a held one.
    fn holds(&self, hash: &ChangeHash) -> bool {
        !self.doc.get_missing_deps(&[*hash]).contains(hash)
    }

    /// Whether `prepared` was made from this document as it is now.
    pub fn is_current(&self, prepared: &Prepared) -> bool {
        prepared.base == self.doc.get_heads()
    }

    /// Applies what [`Self::prepare`] verified (or returns its refusal). The caller
    /// checked [`Self::is_current`].
    pub fn commit_prepared(&mut self, prepared: Prepared) -> Result<Accepted, IngestError> {
        self.commit_prepared_retiring(prepared, &mut Vec::new())
    }

    /// [`Self::commit_prepared`], pushing the replaced automerge state onto `retired`
    /// instead of freeing it here: freeing a document's state costs about as much as
    /// copying it (≈30 µs for a 520-comment order), which a caller can do after it has
    /// told its watchers about the change.
    pub fn commit_prepared_retiring(
        &mut self,
        prepared: Prepared,
        retired: &mut Vec<Automerge>,
    ) -> Result<Accepted, IngestError> {
        let Some(r) = prepared.result? else {
            return Ok(Accepted::default());
        };
        let Ready {
            doc,
            paths,
            order,
            raw,
            verified,
        } = *r;
        retired.push(std::mem::replace(&mut self.doc, doc));
        self.paths.extend(paths);
        Ok(self.commit_verified(order, raw, verified, None))
    }

    /// Verifies and adopts a whole-document snapshot (sent when we held nothing).
    ///
    /// Verification reads automerge's change metadata (actor, seq, deps, hash) instead
    /// of rebuilding every change, and decodes a change's operations only where a rule
    /// needs them, so this costs little more than `Automerge::load`.
    pub fn ingest_snapshot(
        &mut self,
        bytes: &[u8],
        sigs: Vec<(ChangeHash, [u8; 64])>,
    ) -> Result<Accepted, IngestError> {
        let scratch = catch(|| Automerge::load(bytes))
            .map_err(IngestError::Snapshot)?
            .map_err(|e| IngestError::Snapshot(e.to_string()))?;
        if !self.is_empty() {
            // We gained changes meanwhile: fall back to the change path.
            let all = scratch.get_changes(&[]);
            let batch = ChangeBatch {
                changes: all.iter().map(|c| c.raw_bytes().to_vec()).collect(),
                sigs,
            };
            return self.ingest(batch);
        }
        let metas = scratch.get_changes_meta(&[]);
        if metas.len() > MAX_CHANGES_PER_BATCH {
            return Err(IngestError::TooLarge(format!("{} changes", metas.len())));
        }
        let sigs: HashMap<ChangeHash, [u8; 64]> = sigs.into_iter().collect();
        let (sorted, checks) = self.verify_fresh(&metas, &sigs, false)?;
        checks.run()?;
        let verified = checks.signatures();
        let sorted: Vec<&automerge::ChangeMetadata<'_>> =
            sorted.iter().map(|&i| &metas[i]).collect();
        if !scratch.get_missing_deps(&[]).is_empty() {
            return Err(IngestError::Snapshot("snapshot has missing deps".into()));
        }
        let g = self.genesis.genesis();
        let mut fresh_paths = rules::PathCache::default();
        for m in &sorted {
            let author = Author::from_actor(m.actor_bytes()).expect("checked");
            match rules::check_without_ops(g, &author.enterprise, m.deps().is_empty()) {
                Some(r) => r?,
                None => {
                    let c = scratch.get_change_by_hash(&m.hash()).ok_or_else(|| {
                        IngestError::Snapshot("change listed but not found".into())
                    })?;
                    rules::check_change(&scratch, g, &c, None, &self.paths, &mut fresh_paths)?;
                }
            }
        }
        let order: Vec<(Author, ChangeHash)> = sorted
            .iter()
            .map(|m| {
                (
                    Author::from_actor(m.actor_bytes()).expect("checked"),
                    m.hash(),
                )
            })
            .collect();
        drop(sorted);
        drop(metas);
        self.doc = scratch;
        self.paths.extend(fresh_paths);
        Ok(self.commit_verified(order, Vec::new(), verified, Some(bytes.to_vec())))
    }

    fn commit_verified(
        &mut self,
        order: Vec<(Author, ChangeHash)>,
        raw: Vec<Vec<u8>>,
        verified: Vec<(ChangeHash, [u8; 64])>,
        snapshot: Option<Vec<u8>>,
    ) -> Accepted {
        for (a, h) in order {
            self.chains.entry(a).or_default().push(h);
        }
        for (h, s) in &verified {
            self.sigs.insert(*h, *s);
        }
        Accepted {
            changes: raw,
            sigs: verified,
            snapshot,
        }
    }

    /// Binding, replay, chain and signature checks; returns the indices of `fresh` in
    /// causal order and the verified signatures worth keeping.
    #[allow(clippy::type_complexity)]
    fn verify_fresh<C: ChangeInfo>(
        &self,
        fresh: &[C],
        sigs: &HashMap<ChangeHash, [u8; 64]>,
        check_deps: bool,
    ) -> Result<(Vec<usize>, SigChecks), IngestError> {
        let doc_str = self.id().to_string();
        let mut by_author: BTreeMap<Author, Vec<usize>> = BTreeMap::new();
        // Decompressing a key costs microseconds: once per distinct enterprise, and the
        // key is kept for the signature checks below.
        let mut keys: HashMap<EnterpriseId, VerifyingKey> = HashMap::new();
        for (i, c) in fresh.iter().enumerate() {
            let a = match Author::from_actor(c.actor_bytes()) {
                Ok(a) if keys.contains_key(&a.enterprise) => Some(a),
                Ok(a) => a.enterprise.verifying_key().map(|k| {
                    keys.insert(a.enterprise, k);
                    a
                }),
                Err(_) => None,
            };
            let Some(a) = a else {
                return Err(IngestError::UnboundActor(
                    c.actor_bytes().iter().map(|b| format!("{b:02x}")).collect(),
                ));
            };
            if c.message() != Some(doc_str.as_str()) {
                return Err(IngestError::WrongDocument {
                    hash: c.hash().to_string(),
                });
            }
            by_author.entry(a).or_default().push(i);
        }

        // Missing predecessors first: an honest peer whose earlier message was dropped or
        // overtaken sends a change whose seq jumps ahead; that is a resync, not an attack.
        // A seq gap whose deps we do hold can only be forged, and is refused below.
        if check_deps {
            let fresh_hashes: HashSet<ChangeHash> = fresh.iter().map(|c| c.hash()).collect();
            let missing = fresh
                .iter()
                .flat_map(|c| c.deps().iter())
                .filter(|d| !fresh_hashes.contains(d) && !self.holds(d))
                .count();
            if missing > 0 {
                return Err(IngestError::MissingDeps(missing));
            }
        }
        let mut to_verify: Vec<(Author, VerifyingKey, ChangeHash, [u8; 64])> = Vec::new();
        for (author, idxs) in by_author.iter_mut() {
            idxs.sort_by_key(|i| fresh[*i].seq());
            let chain = self.chains.get(author);
            let have = chain.map(|c| c.len() as u64).unwrap_or(0);
            let mut prev = chain.and_then(|c| c.last().copied());
            for (k, i) in idxs.iter().enumerate() {
                let c = &fresh[*i];
                let expected = have + 1 + k as u64;
                if c.seq() < expected {
                    // A seq already taken by a different change (held ones were skipped).
                    return Err(IngestError::ForkedChain {
                        author: *author,
                        seq: c.seq(),
                    });
                }
                if c.seq() != expected {
                    return Err(IngestError::SeqGap {
                        author: *author,
                        have: expected - 1,
                        got: c.seq(),
                    });
                }
                if let Some(p) = prev {
                    if !c.deps().contains(&p) {
                        return Err(IngestError::BrokenChain {
                            author: *author,
                            seq: c.seq(),
                        });
                    }
                }
                prev = Some(c.hash());
                let is_tip = k + 1 == idxs.len();
                match sigs.get(&c.hash()) {
                    Some(s) if is_tip || c.seq().is_multiple_of(CHECKPOINT) => {
                        to_verify.push((*author, keys[&author.enterprise], c.hash(), *s))
                    }
                    Some(_) => {}
                    None if is_tip => {
                        return Err(IngestError::Unsigned {
                            author: *author,
                            hash: c.hash().to_string(),
                        })
                    }
                    None => {}
                }
            }
        }
        let sorted = if by_author.len() == 1 {
            // One author: its chain (checked above, seq by seq) is already a causal order.
            by_author.into_values().next().unwrap_or_default()
        } else {
            topo_sort(fresh)
        };
        let checks = SigChecks {
            doc: self.id(),
            items: to_verify,
        };
        Ok((sorted, checks))
    }

    /// The changes a peer holding `their` lacks, as one chunk of at most about
    /// `budget` bytes cut where signatures cover every author's last change.
    /// Returns the batch, whether more remains after it, and the clock the peer
    /// will have once it applies the batch.
    pub fn missing_for(&self, their: &Clock, budget: usize) -> (ChangeBatch, bool, Clock) {
        let behind = self
            .chains
            .iter()
            .any(|(a, c)| their.get(a).copied().unwrap_or(0) < c.len() as u64);
        if !behind {
            return (ChangeBatch::default(), false, their.clone());
        }
        let have_deps: Vec<ChangeHash> = their
            .iter()
            .filter_map(|(a, seq)| {
                let chain = self.chains.get(a)?;
                let idx = (*seq).min(chain.len() as u64);
                (idx > 0).then(|| chain[idx as usize - 1])
            })
            .collect();
        let changes = self.doc.get_changes(&have_deps);
        let mut out = ChangeBatch::default();
        let mut size = 0usize;
        let mut unsigned: BTreeSet<Author> = BTreeSet::new();
        let mut last_of: BTreeMap<Author, ChangeHash> = BTreeMap::new();
        let mut cut = 0;
        for (i, c) in changes.iter().enumerate() {
            let a = Author::from_actor(c.actor_id().to_bytes()).expect("bound");
            size += c.raw_bytes().len();
            out.changes.push(c.raw_bytes().to_vec());
            last_of.insert(a, c.hash());
            if let Some(s) = self.sigs.get(&c.hash()) {
                unsigned.remove(&a);
                if c.seq() % CHECKPOINT == 0 {
                    out.sigs.push((c.hash(), *s));
                }
            } else {
                unsigned.insert(a);
            }
            if unsigned.is_empty() {
                cut = i + 1;
                if size >= budget {
                    break;
                }
            }
        }
        if cut == 0 {
            // No safe cut point (should not happen: we hold every author's newest signature).
            return (ChangeBatch::default(), false, their.clone());
        }
        out.changes.truncate(cut);
        let mut covered = their.clone();
        for c in &changes[..cut] {
            let a = Author::from_actor(c.actor_id().to_bytes()).expect("bound");
            let e = covered.entry(a).or_insert(0);
            *e = (*e).max(c.seq());
        }
        let included: HashSet<ChangeHash> = changes[..cut].iter().map(|c| c.hash()).collect();
        let mut tips: BTreeMap<Author, ChangeHash> = BTreeMap::new();
        for c in &changes[..cut] {
            tips.insert(
                Author::from_actor(c.actor_id().to_bytes()).expect("bound"),
                c.hash(),
            );
        }
        out.sigs.retain(|(h, _)| included.contains(h));
        for h in tips.values() {
            if let Some(s) = self.sigs.get(h) {
                if !out.sigs.iter().any(|(x, _)| x == h) {
                    out.sigs.push((*h, *s));
                }
            }
        }
        (out, cut < changes.len(), covered)
    }

    /// The whole document as a snapshot, with every author's newest and checkpoint signatures.
    pub fn snapshot(&self) -> (Vec<u8>, Vec<(ChangeHash, [u8; 64])>) {
        let mut sigs = Vec::new();
        for chain in self.chains.values() {
            for (i, h) in chain.iter().enumerate() {
                let seq = i as u64 + 1;
                if seq.is_multiple_of(CHECKPOINT) || i + 1 == chain.len() {
                    if let Some(s) = self.sigs.get(h) {
                        sigs.push((*h, *s));
                    }
                }
            }
        }
        (self.doc.save(), sigs)
    }
}

/// Batches of at most this many fresh changes may have their signatures checked on an
/// [`Offload`] while they are applied; bigger ones are verified before anything is
/// applied (a forged big batch then costs a peer's signature checks, not our apply).
pub const OFFLOAD_MAX_CHANGES: usize = 8;

/// The signature checks of one received batch (the chain tips and checkpoints whose
/// signatures cover the batch), run here or on an [`Offload`].
#[derive(Clone)]
pub struct SigChecks {
    doc: DocId,
    items: Vec<(Author, VerifyingKey, ChangeHash, [u8; 64])>,
}

impl SigChecks {
    /// Checks each signature with `verify_strict` (never as an ed25519 batch: a batch
    /// can accept a crafted signature that a strict check refuses, and every peer must
    /// reach the same verdict on the same bytes — see `identity::tests`); the first bad
    /// one is the error.
    pub fn run(&self) -> Result<(), IngestError> {
        for (a, key, h, s) in &self.items {
            if !crate::identity::verify_change_with(
                key,
                &self.doc,
                h,
                &ed25519_dalek::Signature::from_bytes(s),
            ) {
                return Err(IngestError::BadSignature {
                    author: *a,
                    hash: h.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The signatures checked, to keep once the batch is accepted.
    fn signatures(&self) -> Vec<(ChangeHash, [u8; 64])> {
        self.items.iter().map(|(_, _, h, s)| (*h, *s)).collect()
    }
}

/// Somewhere else to run a received batch's signature checks while the batch is applied
/// (the IO shell supplies a thread; this crate starts no threads).
pub trait Offload: Send + Sync {
    /// Starts `checks`; the returned function waits for their verdict.
    fn start(&self, checks: SigChecks) -> Box<dyn FnOnce() -> Result<(), IngestError> + '_>;
}

/// The indices of `changes` in an order where every change follows its deps (ties broken
/// by hash: deterministic).
fn topo_sort<C: ChangeInfo>(changes: &[C]) -> Vec<usize> {
    let index: HashMap<ChangeHash, usize> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.hash(), i))
        .collect();
    let mut indegree = vec![0usize; changes.len()];
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); changes.len()];
    for (i, c) in changes.iter().enumerate() {
        for d in c.deps() {
            if let Some(&j) = index.get(d) {
                indegree[i] += 1;
                children[j].push(i);
            }
        }
    }
    let mut ready: BTreeSet<(ChangeHash, usize)> = (0..changes.len())
        .filter(|i| indegree[*i] == 0)
        .map(|i| (changes[i].hash(), i))
        .collect();
    let mut order = Vec::with_capacity(changes.len());
    while let Some(first) = ready.iter().next().copied() {
        ready.remove(&first);
        order.push(first.1);
        for &ch in &children[first.1] {
            indegree[ch] -= 1;
            if indegree[ch] == 0 {
                ready.insert((changes[ch].hash(), ch));
            }
        }
    }
    order
}

/// Runs `f`, turning a panic inside automerge into an error string.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into())
    })
}
