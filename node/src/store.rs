//! Durable storage on sled.
//!
//! Owns: what survives a restart: every document's signed genesis, its latest
//! snapshot, the changes added since, every signature held, the peer book and
//! local settings. [`Store::apply`] writes a whole group of edits as one sled
//! batch, then `flush()`es and `fsync`s the data file once, so that many
//! concurrent writers share one durable commit (group commit).
//!
//! Durability: a group is durable once its record is in the write-ahead log
//! ([`crate::wal`]: one `pwrite` + `fdatasync`); sled receives the same inserts in
//! memory. Groups that replace or delete (snapshots, compaction) go straight to sled.
//! sled is made durable at checkpoints: sled 0.34's `flush()` ends in
//! `sync_file_range`, which neither commits metadata nor flushes the device cache, so
//! a checkpoint also calls `fdatasync` on sled's data file, and only then starts the
//! log over. Opening the store replays the log. A write acknowledged to an API caller
//! is in the log or checkpointed. Must not: know about automerge semantics beyond
//! opaque bytes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use automerge::ChangeHash;
use cofab_protocol::document::Accepted;
use cofab_protocol::{DocId, SignedGenesis};

use crate::wal::{self, Insert, Wal};

/// A store error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// The OS failed (fsync, files).
    #[error("store io: {0}")]
    Io(#[from] std::io::Error),
    /// Stored bytes do not parse (corruption or a newer format).
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// One write in a group.
// `Doc` is the large variant and nearly every write is one: boxing it would add an
// allocation per write to shrink the rare `Compact` and `Setting`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Write {
    /// What a document gained.
    Doc {
        /// Document.
        doc: DocId,
        /// Present the first time a document is stored.
        genesis: Option<SignedGenesis>,
        /// The changes, signatures and maybe snapshot.
        accepted: Accepted,
    },
    /// Replace a document's snapshot and drop the changes it covers.
    Compact {
        /// Document.
        doc: DocId,
        /// New snapshot (`Automerge::save()`).
        snapshot: Vec<u8>,
    },
    /// A setting.
    Setting {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
}

/// A document as stored.
pub struct StoredDoc {
    /// Genesis.
    pub genesis: SignedGenesis,
    /// Snapshot.
    pub snapshot: Option<Vec<u8>>,
    /// Changes since the snapshot, in the order stored.
    pub changes: Vec<Vec<u8>>,
    /// Signatures.
    pub sigs: Vec<(ChangeHash, [u8; 64])>,
}

/// sled's handles, kept together so that closing them can be bounded (see [`Store`]'s `Drop`).
struct Sled {
    db: sled::Db,
    genesis: sled::Tree,
    snapshots: sled::Tree,
    changes: sled::Tree,
    sigs: sled::Tree,
    settings: sled::Tree,
}

/// The sled store.
pub struct Store {
    sled: Option<Sled>,
    data_file: Mutex<Option<File>>,
    wal: Mutex<Wal>,
    /// Held around every sled flush: sled 0.34 can wait forever when two threads flush
    /// one database at once (seen at shutdown in our tests; sled issue #1412).
    flushing: Mutex<()>,
    path: PathBuf,
}

/// How long closing sled may take before the store gives up waiting for it.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

impl Drop for Store {
    /// sled 0.34 flushes every tree again when it is dropped, and that flush can wait
    /// forever for a log position nobody writes (seen in our tests when a test's runtime
    /// is torn down under load, even after a completed `sync()`; sled issue #1412 reports
    /// the same wait). Every acknowledged write is already in the write-ahead log or
    /// checkpointed, so the drop runs on its own thread and the store stops waiting for
    /// it after `CLOSE_WAIT` (5 s) instead of hanging its caller.
    fn drop(&mut self) {
        let Some(sled) = self.sled.take() else {
            return;
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("sled-close".into())
            .spawn(move || {
                drop(sled);
                let _ = tx.send(());
            });
        if spawned.is_ok() && rx.recv_timeout(CLOSE_WAIT).is_err() {
            tracing::warn!("sled did not close within {CLOSE_WAIT:?}; its data was synced before");
        }
    }
}

/// How long [`Store::open`] waits for the file lock of a store closed a moment ago.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Opens sled, waiting up to [`LOCK_WAIT`] for its file lock: a store closed a moment
/// ago in this process (a node restarted in place) releases the lock only when sled's
/// background threads let go of the file, which can lag the close under load.
fn open_sled(path: &Path) -> Result<sled::Db, StoreError> {
    // sled reports its lock only as an `io::Error` message; probe the same lock (an
    // exclusive `flock` on its `db` file) with a typed result first.
    let start = Instant::now();
    if let Ok(db) = File::open(path.join("db")) {
        loop {
            match db.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => break,
            }
        }
    }
    Ok(sled::Config::new()
        .path(path)
        .mode(sled::Mode::HighThroughput)
        .open()?)
}

const GENESIS: u8 = 0;
const CHANGES: u8 = 2;
const SIGS: u8 = 3;
const SETTINGS: u8 = 4;
/// Settings key: the incarnation of the current (or last) run.
const INCARNATION: &[u8] = b"run/incarnation";
/// Settings key: present while no run is going on and the last one ended cleanly.
const ENDED_CLEANLY: &[u8] = b"run/ended-cleanly";

impl Store {
    /// Opens (or creates) the store in `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = open_sled(path)?;
        let data_file = File::open(path.join("db")).ok();
        let (wal, replay) = Wal::open(&wal_path(path))?;
        let store = Self {
            sled: Some(Sled {
                genesis: db.open_tree("genesis")?,
                snapshots: db.open_tree("snapshots")?,
                changes: db.open_tree("changes")?,
                sigs: db.open_tree("sigs")?,
                settings: db.open_tree("settings")?,
                db,
            }),
            data_file: Mutex::new(data_file),
            wal: Mutex::new(wal),
            flushing: Mutex::new(()),
            path: path.to_path_buf(),
        };
        if !replay.is_empty() {
            tracing::info!(inserts = replay.len(), "replaying the write-ahead log");
            store.insert_all(&replay)?;
            store.sync()?;
        }
        Ok(store)
    }

    fn s(&self) -> &Sled {
        self.sled.as_ref().expect("open until dropped")
    }

    fn tree(&self, id: u8) -> Result<&sled::Tree, StoreError> {
        match id {
            GENESIS => Ok(&self.s().genesis),
            CHANGES => Ok(&self.s().changes),
            SIGS => Ok(&self.s().sigs),
            SETTINGS => Ok(&self.s().settings),
            _ => Err(StoreError::Corrupt(format!("log names unknown tree {id}"))),
        }
    }

    fn insert_all(&self, inserts: &[Insert]) -> Result<(), StoreError> {
        for i in inserts {
            self.tree(i.tree)?.insert(&i.key, i.value.as_slice())?;
        }
        Ok(())
    }

    /// Applies a group of writes and makes them durable before returning.
    ///
    /// The changes (and signatures) a group adds to one document are stored as one sled
    /// record each (length-prefixed blobs), not one key per change: far less for sled to
    /// write and flush when many small changes arrive together.
    pub fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        let replaces = writes.iter().any(|w| match w {
            Write::Compact { .. } => true,
            Write::Doc { accepted, .. } => accepted.snapshot.is_some(),
            Write::Setting { .. } => false,
        });
        if replaces {
            return self.apply_direct(writes);
        }
        let inserts = self.inserts_for(writes)?;
        let payload = wal::encode(&inserts);
        if !Wal::could_fit(payload.len()) {
            return self.apply_direct(writes);
        }
        let mut log = self.wal.lock().expect("not poisoned");
        if !log.fits(payload.len()) {
            self.checkpoint(&mut log)?;
        }
        log.append(&payload)?;
        drop(log);
        self.insert_all(&inserts)
    }

    /// The sled inserts of a group without snapshots or compaction.
    fn inserts_for(&self, writes: &[Write]) -> Result<Vec<Insert>, StoreError> {
        let mut out = Vec::new();
        let mut changes: std::collections::BTreeMap<DocId, Vec<u8>> = Default::default();
        let mut sigs: std::collections::BTreeMap<DocId, Vec<u8>> = Default::default();
        for w in writes {
            match w {
                Write::Doc {
                    doc,
                    genesis,
                    accepted,
                } => {
                    if let Some(g) = genesis {
                        let mut v = g.signature().to_vec();
                        v.extend_from_slice(g.bytes());
                        out.push(Insert {
                            tree: GENESIS,
                            key: doc.as_bytes().to_vec(),
                            value: v,
                        });
                    }
                    let blob = changes.entry(*doc).or_default();
                    for c in &accepted.changes {
                        blob.extend_from_slice(&(c.len() as u32).to_be_bytes());
                        blob.extend_from_slice(c);
                    }
                    let sblob = sigs.entry(*doc).or_default();
                    for (h, sig) in &accepted.sigs {
                        sblob.extend_from_slice(h.as_ref());
                        sblob.extend_from_slice(sig);
                    }
                }
                Write::Setting { key, value } => out.push(Insert {
                    tree: SETTINGS,
                    key: key.as_bytes().to_vec(),
                    value: value.clone(),
                }),
                // Replacing writes are handled by `apply_direct`, one at a time.
                Write::Compact { .. } => {
                    return Err(StoreError::Corrupt("compaction is not logged".into()))
                }
            }
        }
        for (tree, blobs) in [(CHANGES, changes), (SIGS, sigs)] {
            for (doc, blob) in blobs {
                if blob.is_empty() {
                    continue;
                }
                let mut key = doc.as_bytes().to_vec();
                key.extend_from_slice(&self.s().db.generate_id()?.to_be_bytes());
                out.push(Insert {
                    tree,
                    key,
                    value: blob,
                });
            }
        }
        Ok(out)
    }

    /// A group that replaces or deletes records: written to sled in order and
    /// checkpointed. The writes between two replacing ones go in as [`Self::inserts_for`]
    /// makes them, so the records are laid out exactly as on the logged path.
    fn apply_direct(&self, writes: &[Write]) -> Result<(), StoreError> {
        let mut start = 0;
        for (i, w) in writes.iter().enumerate() {
            let (doc, snapshot) = match w {
                Write::Compact { doc, snapshot } => (doc, snapshot),
                Write::Doc {
                    doc,
                    accepted:
                        Accepted {
                            snapshot: Some(snapshot),
                            ..
                        },
                    ..
                } => (doc, snapshot),
                _ => continue,
            };
            self.insert_all(&self.inserts_for(&writes[start..i])?)?;
            // Snapshot first: a crash in between leaves the snapshot plus changes it already
            // contains, which loading applies idempotently. It covers every change stored
            // so far, including the ones just written.
            self.s()
                .snapshots
                .insert(doc.as_bytes(), snapshot.as_slice())?;
            self.drop_changes(doc)?;
            if let Write::Doc { .. } = w {
                // Its genesis and signatures (a received snapshot carries no loose changes).
                self.insert_all(&self.inserts_for(std::slice::from_ref(w))?)?;
            }
            start = i + 1;
        }
        self.insert_all(&self.inserts_for(&writes[start..])?)?;
        self.sync()
    }

    /// Makes sled durable, then starts the log over.
    fn checkpoint(&self, log: &mut Wal) -> Result<(), StoreError> {
        self.sync_sled()?;
        if !log.is_empty() {
            log.reset()?;
        }
        Ok(())
    }

    fn drop_changes(&self, doc: &DocId) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for kv in self.s().changes.scan_prefix(doc.as_bytes()) {
            batch.remove(kv?.0);
        }
        self.s().changes.apply_batch(batch)?;
        Ok(())
    }

    /// Makes everything durable in sled (flush + fdatasync) and empties the log.
    pub fn sync(&self) -> Result<(), StoreError> {
        let mut log = self.wal.lock().expect("not poisoned");
        self.checkpoint(&mut log)
    }

    /// flush + fdatasync of sled's data file.
    fn sync_sled(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.flushing.lock().expect("not poisoned");
        let t = std::time::Instant::now();
        self.s().db.flush()?;
        let flushed = t.elapsed();
        let mut f = self.data_file.lock().expect("not poisoned");
        if f.is_none() {
            *f = File::open(self.path.join("db")).ok();
        }
        if let Some(f) = f.as_ref() {
            f.sync_data()?;
        }
        tracing::trace!(
            flush_us = flushed.as_micros() as u64,
            total_us = t.elapsed().as_micros() as u64,
            "store sync"
        );
        Ok(())
    }

    /// Starts a run of the node and returns the incarnation it writes as (see
    /// [`cofab_protocol::Author`]): the previous run's if that run ended cleanly
    /// ([`Self::end_run`]), the next one otherwise; 0 for a store that never recorded a
    /// run. Durable before it returns, so a crash during this run is seen by the next.
    pub fn begin_run(&self) -> Result<u32, StoreError> {
        let s = &self.s().settings;
        let incarnation = match s.get(INCARNATION)? {
            None => 0,
            Some(v) => {
                let n = u32::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                    StoreError::Corrupt(format!("incarnation of {} bytes", v.len()))
                })?);
                if s.get(ENDED_CLEANLY)?.is_some() {
                    n
                } else {
                    n.checked_add(1).ok_or_else(|| {
                        StoreError::Corrupt("incarnation counter exhausted".into())
                    })?
                }
            }
        };
        s.insert(INCARNATION, &incarnation.to_be_bytes())?;
        s.remove(ENDED_CLEANLY)?;
        self.sync()?;
        Ok(incarnation)
    }

    /// Records that this run ended cleanly: everything it wrote is durable, so the next
    /// run may keep its incarnation. Called last, after the final [`Self::sync`].
    pub fn end_run(&self) -> Result<(), StoreError> {
        self.s().settings.insert(ENDED_CLEANLY, &[1u8])?;
        self.sync()
    }

    /// Settings whose key starts with `prefix`.
    pub fn settings_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.s()
            .settings
            .scan_prefix(prefix.as_bytes())
            .map(|kv| {
                kv.map(|(k, v)| (String::from_utf8_lossy(&k).to_string(), v.to_vec()))
                    .map_err(StoreError::from)
            })
            .collect()
    }

    /// Every stored document.
    pub fn load_all(&self) -> Result<Vec<StoredDoc>, StoreError> {
        let mut out = Vec::new();
        for kv in self.s().genesis.iter() {
            let (k, v) = kv?;
            if v.len() < 64 {
                return Err(StoreError::Corrupt("genesis record too short".into()));
            }
            let sig: [u8; 64] = v[..64].try_into().expect("length checked");
            let genesis = SignedGenesis::from_parts(v[64..].to_vec(), sig)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let snapshot = self.s().snapshots.get(&k)?.map(|v| v.to_vec());
            let mut changes = Vec::new();
            for kv in self.s().changes.scan_prefix(&k) {
                let (_, blob) = kv?;
                let mut rest = &blob[..];
                while !rest.is_empty() {
                    if rest.len() < 4 {
                        return Err(StoreError::Corrupt("change record".into()));
                    }
                    let n = u32::from_be_bytes(rest[..4].try_into().expect("len")) as usize;
                    if rest.len() < 4 + n {
                        return Err(StoreError::Corrupt("change record".into()));
                    }
                    changes.push(rest[4..4 + n].to_vec());
                    rest = &rest[4 + n..];
                }
            }
            let mut sigs = Vec::new();
            for kv in self.s().sigs.scan_prefix(&k) {
                let (_, blob) = kv?;
                if blob.len() % 96 != 0 {
                    return Err(StoreError::Corrupt("signature record".into()));
                }
                for rec in blob.chunks(96) {
                    sigs.push((
                        ChangeHash(rec[..32].try_into().expect("len")),
                        rec[32..].try_into().expect("len"),
                    ));
                }
            }
            out.push(StoredDoc {
                genesis,
                snapshot,
                changes,
                sigs,
            });
        }
        Ok(out)
    }

    /// Bytes on disk (sled's files; the log adds [`wal::WAL_BYTES`]).
    pub fn size_on_disk(&self) -> u64 {
        self.s().db.size_on_disk().unwrap_or(0)
    }
}

/// Where the log of the store in `path` lives: beside sled's folder, not inside it.
fn wal_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "store".into());
    name.push(".wal");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cofab_protocol::model::{self, DesignInput, Splice};
    use cofab_protocol::Keypair;

    /// A store reopened while the previous one is still closing waits for its lock.
    #[test]
    fn open_waits_for_a_lock_released_a_moment_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let first = Store::open(&path).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let t = Instant::now();
        let second = Store::open(&path);
        closer.join().unwrap();
        assert!(second.is_ok(), "{:?}", second.err());
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "it did wait for the lock"
        );
    }

    /// A group with a compaction between two runs of changes keeps the snapshot and only
    /// the changes after it; logged groups and the checkpointed group read back the same
    /// after reopening.
    #[test]
    fn compaction_inside_a_group_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let kp = Keypair::from_secret([5; 32]);
        let (mut doc, first) = model::create_design(
            &kp,
            &DesignInput {
                title: "t".into(),
                ..Default::default()
            },
            0,
            1,
        )
        .unwrap();
        let id = doc.id();
        let splice = |doc: &mut cofab_protocol::Document, i| {
            let s = Splice {
                pos: i,
                delete: 0,
                insert: "x".into(),
            };
            model::splice_description(doc, &kp, 0, &s).unwrap()
        };
        let a = splice(&mut doc, 0);
        let snapshot = doc.save();
        let b = splice(&mut doc, 1);
        {
            let store = Store::open(&dir.path().join("store")).unwrap();
            let g = Some(doc.signed_genesis().clone());
            store
                .apply(&[Write::Doc {
                    doc: id,
                    genesis: g,
                    accepted: first,
                }])
                .unwrap(); // logged
            store
                .apply(&[
                    Write::Doc {
                        doc: id,
                        genesis: None,
                        accepted: a,
                    },
                    Write::Compact {
                        doc: id,
                        snapshot: snapshot.clone(),
                    },
                    Write::Doc {
                        doc: id,
                        genesis: None,
                        accepted: b.clone(),
                    },
                ])
                .unwrap(); // direct
        }
        let store = Store::open(&dir.path().join("store")).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].snapshot.as_deref(), Some(snapshot.as_slice()));
        assert_eq!(
            all[0].changes, b.changes,
            "only the change after the snapshot remains"
        );
        assert!(all[0].sigs.len() >= 3, "every signature is kept");
    }
}
