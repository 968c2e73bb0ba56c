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
        let db = sled::Config::new().path(path).mode(sled::Mode::HighThroughput).open()?;
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
    pub fn apply(&self, writes: &[Write]) -> Result<(), StoreError> {
        for w in writes {
            match w {
                Write::Doc { doc, genesis, accepted } => {
                    if let Some(g) = genesis {
                        let mut v = g.signature().to_vec();
                        v.extend_from_slice(g.bytes());
                        self.genesis.insert(doc.as_bytes(), v)?;
                    }
                    if let Some(s) = &accepted.snapshot {
                        self.drop_changes(doc)?;
                        self.snapshots.insert(doc.as_bytes(), s.as_slice())?;
                    }
                    let mut batch = sled::Batch::default();
                    for c in &accepted.changes {
                        let mut key = doc.as_bytes().to_vec();
                        key.extend_from_slice(&self.db.generate_id()?.to_be_bytes());
                        batch.insert(key, c.as_slice());
                    }
                    self.changes.apply_batch(batch)?;
                    let mut batch = sled::Batch::default();
                    for (h, s) in &accepted.sigs {
                        let mut key = doc.as_bytes().to_vec();
                        key.extend_from_slice(h.as_ref());
                        batch.insert(key, s.as_slice());
                    }
                    self.sigs.apply_batch(batch)?;
                }
                Write::Compact { doc, snapshot } => {
                    // Insert the snapshot first: a crash in between leaves snapshot + changes
                    // it already contains, which load applies idempotently.
                    self.snapshots.insert(doc.as_bytes(), snapshot.as_slice())?;
                    self.drop_changes(doc)?;
                }
                Write::Setting { key, value } => {
                    self.settings.insert(key.as_bytes(), value.as_slice())?;
                }
            }
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
        tracing::trace!(flush_us = flushed.as_micros() as u64, total_us = t.elapsed().as_micros() as u64, "store sync");
        Ok(())
    }

    /// A setting.
    pub fn setting(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.settings.get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Settings whose key starts with `prefix`.
    pub fn settings_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.settings
            .scan_prefix(prefix.as_bytes())
            .map(|kv| kv.map(|(k, v)| (String::from_utf8_lossy(&k).to_string(), v.to_vec())).map_err(StoreError::from))
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
            let genesis = SignedGenesis::from_parts(v[64..].to_vec(), sig).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let snapshot = self.snapshots.get(&k)?.map(|v| v.to_vec());
            let changes = self
                .changes
                .scan_prefix(&k)
                .map(|kv| kv.map(|(_, v)| v.to_vec()))
                .collect::<Result<Vec<_>, _>>()?;
            let mut sigs = Vec::new();
            for kv in self.sigs.scan_prefix(&k) {
                let (sk, sv) = kv?;
                if sk.len() != 48 || sv.len() != 64 {
                    return Err(StoreError::Corrupt("signature record".into()));
                }
                sigs.push((ChangeHash(sk[16..].try_into().expect("len")), sv[..].try_into().expect("len")));
            }
            out.push(StoredDoc { genesis, snapshot, changes, sigs });
        }
        Ok(out)
    }

    /// Number of incremental changes stored for a document.
    pub fn change_count(&self, doc: &DocId) -> usize {
        self.changes.scan_prefix(doc.as_bytes()).count()
    }

    /// Bytes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}
