//! Durable storage on sled.
//!
//! Owns: what survives a restart: every document's signed genesis, its latest
//! snapshot, the changes added since, every signature held, the peer book and
//! local settings. [`Store::apply`] writes a whole group of edits as one sled
//! batch, then `flush()`es and `fsync`s the data file once, so that many
//! concurrent writers share one durable commit (group commit).
//!
//! Durability: sled 0.34's `flush()` ends in `sync_file_range`, which neither
//! commits metadata nor flushes the device cache, so after it the store also calls
//! `fdatasync` on sled's data file. A write acknowledged to an API caller has been
//! through both. Must not: know about automerge semantics beyond opaque bytes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use automerge::ChangeHash;
use cofab_protocol::document::Accepted;
use cofab_protocol::{DocId, SignedGenesis};

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

/// The sled store.
pub struct Store {
    db: sled::Db,
    genesis: sled::Tree,
    snapshots: sled::Tree,
    changes: sled::Tree,
    sigs: sled::Tree,
    settings: sled::Tree,
    data_file: Mutex<Option<File>>,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store in `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let data_file = File::open(path.join("db")).ok();
        Ok(Self {
            genesis: db.open_tree("genesis")?,
            snapshots: db.open_tree("snapshots")?,
            changes: db.open_tree("changes")?,
            sigs: db.open_tree("sigs")?,
            settings: db.open_tree("settings")?,
            db,
            data_file: Mutex::new(data_file),
            path: path.to_path_buf(),
        })
    }

    /// Applies a group of writes and makes them durable before returning.
    ///
    /// The changes (and signatures) a group adds to one document are stored as one sled
    /// record each (length-prefixed blobs), not one key per change: far less for sled to
    /// write and flush when many small changes arrive together.
    pub fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
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
                        self.genesis.insert(doc.as_bytes(), v)?;
                    }
                    if let Some(s) = &accepted.snapshot {
                        // The snapshot holds every change so far, buffered ones included.
                        changes.remove(doc);
                        self.drop_changes(doc)?;
                        self.snapshots.insert(doc.as_bytes(), s.as_slice())?;
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
                Write::Compact { doc, snapshot } => {
                    // Insert the snapshot first: a crash in between leaves snapshot + changes
                    // it already contains, which load applies idempotently. Changes buffered
                    // in this group are covered by the snapshot (taken after them).
                    changes.remove(doc);
                    self.snapshots.insert(doc.as_bytes(), snapshot.as_slice())?;
                    self.drop_changes(doc)?;
                }
                Write::Setting { key, value } => {
                    self.settings.insert(key.as_bytes(), value.as_slice())?;
                }
            }
        }
        for (tree, blobs) in [(&self.changes, changes), (&self.sigs, sigs)] {
            let mut batch = sled::Batch::default();
            for (doc, blob) in blobs {
                if blob.is_empty() {
                    continue;
                }
                let mut key = doc.as_bytes().to_vec();
                key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
                batch.insert(key, blob);
            }
            tree.apply_batch(batch)?;
        }
        self.sync()
    }

    fn drop_changes(&self, doc: &DocId) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for kv in self.changes.scan_prefix(doc.as_bytes()) {
            batch.remove(kv?.0);
        }
        self.changes.apply_batch(batch)?;
        Ok(())
    }

    /// flush + fdatasync.
    pub fn sync(&self) -> Result<(), StoreError> {
        let t = std::time::Instant::now();
        self.db.flush()?;
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

    /// Settings whose key starts with `prefix`.
    pub fn settings_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.settings
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
        for kv in self.genesis.iter() {
            let (k, v) = kv?;
            if v.len() < 64 {
                return Err(StoreError::Corrupt("genesis record too short".into()));
            }
            let sig: [u8; 64] = v[..64].try_into().expect("length checked");
            let genesis = SignedGenesis::from_parts(v[64..].to_vec(), sig)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let snapshot = self.snapshots.get(&k)?.map(|v| v.to_vec());
            let mut changes = Vec::new();
            for kv in self.changes.scan_prefix(&k) {
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
            for kv in self.sigs.scan_prefix(&k) {
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

    /// Bytes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}
