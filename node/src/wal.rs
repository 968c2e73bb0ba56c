//! The store's write-ahead log: one preallocated file that makes a group commit
//! durable with a single `pwrite` + `fdatasync`.
//!
//! Why: making sled durable costs its `flush()` (several writes and
//! `sync_file_range`s) plus an `fdatasync` of its data file, about 0.45 ms a group on
//! this disk; overwriting blocks of a file that is already allocated and zero-filled
//! and then `fdatasync`ing it changes no metadata and costs about 0.1 ms. The writes
//! of a group are therefore first appended here as one record; sled gets them in
//! memory and is made durable only at a checkpoint (log full, a large group, or
//! shutdown), after which the log starts over.
//!
//! Format: a 16-byte header (`CFWAL001`, generation u64) and records of
//! `generation u64 | length u32 | crc32 u32 | payload`, the crc covering generation,
//! length and payload. Replay reads records of the header's generation until the first
//! that does not check (the torn tail of a crash, or an older generation's leftovers).
//! Records hold sled inserts `(tree, key, value)`, so replaying one twice is harmless.
//!
//! Owns: the log file. Must not: know what the inserts mean.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: &[u8; 8] = b"CFWAL001";
const HEADER: u64 = 16;
const RECORD_HEADER: usize = 16;
/// Size of the log file (allocated and zero-filled once, then reused).
pub const WAL_BYTES: u64 = 8 * 1024 * 1024;

/// One insert into a sled tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Which tree (the store's numbering).
    pub tree: u8,
    /// Key.
    pub key: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
}

/// The open log.
pub struct Wal {
    file: File,
    generation: u64,
    offset: u64,
}

impl Wal {
    /// Opens the log at `path` (creating and zero-filling it if needed) and returns it
    /// with the inserts of its current generation, to be replayed before use.
    pub fn open(path: &Path) -> std::io::Result<(Self, Vec<Insert>)> {
        let fresh = std::fs::metadata(path)
            .map(|m| m.len() != WAL_BYTES)
            .unwrap_or(true);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if fresh {
            let zeros = vec![0u8; 1024 * 1024];
            for i in 0..WAL_BYTES / zeros.len() as u64 {
                file.write_all_at(&zeros, i * zeros.len() as u64)?;
            }
            file.set_len(WAL_BYTES)?;
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        }
        // Read only as far as the records go (a log just reset holds none): reading all
        // 8 MiB cost every node start a few ms and 2,048 fresh pages. A fresh file is zeros.
        let mut bytes = vec![0u8; if fresh { 0 } else { FIRST_READ }];
        file.read_exact_at(&mut bytes, 0)?;
        let generation = if bytes.starts_with(MAGIC) {
            u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes"))
        } else {
            0
        };
        let mut inserts = Vec::new();
        let mut end = HEADER;
        if generation != 0 {
            loop {
                let (more, to, short) = replay(&bytes, end, generation);
                inserts.extend(more);
                end = to;
                if !short || bytes.len() as u64 == WAL_BYTES {
                    break;
                }
                let have = bytes.len();
                bytes.resize((have * 4).min(WAL_BYTES as usize), 0);
                file.read_exact_at(&mut bytes[have..], have as u64)?;
            }
        }
        // Appends go after the records found, so the log is not empty until the caller has
        // made them durable elsewhere and reset it.
        let mut wal = Self {
            file,
            generation,
            offset: end,
        };
        if generation == 0 {
            wal.reset()?;
        }
        Ok((wal, inserts))
    }

    /// Starts a new generation: earlier records no longer count. Call only once
    /// everything they hold is durable elsewhere.
    pub fn reset(&mut self) -> std::io::Result<()> {
        self.generation += 1;
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&self.generation.to_be_bytes());
        self.file.write_all_at(&h, 0)?;
        self.file.sync_data()?;
        self.offset = HEADER;
        Ok(())
    }

    /// Whether the log has no record since the last reset.
    pub fn is_empty(&self) -> bool {
        self.offset == HEADER
    }

    /// Whether a record of `payload_len` bytes fits now.
    pub fn fits(&self, payload_len: usize) -> bool {
        self.offset + (RECORD_HEADER + payload_len) as u64 <= WAL_BYTES
    }

    /// Whether a record of `payload_len` bytes fits in an empty log.
    pub fn could_fit(payload_len: usize) -> bool {
        HEADER + ((RECORD_HEADER + payload_len) as u64) <= WAL_BYTES
    }

    /// Appends one record and makes it durable. The caller checked [`Self::fits`].
    pub fn append(&mut self, payload: &[u8]) -> std::io::Result<()> {
        let mut rec = Vec::with_capacity(RECORD_HEADER + payload.len());
        rec.extend_from_slice(&self.generation.to_be_bytes());
        rec.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        rec.extend_from_slice(&[0; 4]);
        rec.extend_from_slice(payload);
        let crc = record_crc(&rec);
        rec[12..16].copy_from_slice(&crc.to_be_bytes());
        self.file.write_all_at(&rec, self.offset)?;
        self.file.sync_data()?;
        self.offset += rec.len() as u64;
        Ok(())
    }
}

fn record_crc(rec: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&rec[..12]);
    h.update(&rec[RECORD_HEADER..]);
    h.finalize()
}

/// How much of the log [`Wal::open`] reads first (more only if records go further).
const FIRST_READ: usize = 64 * 1024;

/// The inserts of the valid records of `generation` in `bytes` (the start of the log)
/// from offset `at` on, in order, where they end, and whether they stopped only because
/// `bytes` ended (so reading further may find more).
fn replay(bytes: &[u8], mut at: u64, generation: u64) -> (Vec<Insert>, u64, bool) {
    let mut out = Vec::new();
    let short = loop {
        let from = at as usize;
        let Some(h) = bytes.get(from..from + RECORD_HEADER) else {
            break true;
        };
        let gen = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let to = from + RECORD_HEADER + len;
        if gen != generation || to as u64 > WAL_BYTES {
            break false;
        }
        let Some(rec) = bytes.get(from..to) else {
            break true;
        };
        if record_crc(rec) != crc {
            break false;
        }
        let Some(mut ins) = decode(&rec[RECORD_HEADER..]) else {
            break false;
        };
        out.append(&mut ins);
        at = to as u64;
    };
    (out, at, short)
}

/// Encodes inserts as a record payload.
pub fn encode(inserts: &[Insert]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(inserts.len() as u32).to_be_bytes());
    for i in inserts {
        out.push(i.tree);
        out.extend_from_slice(&(i.key.len() as u32).to_be_bytes());
        out.extend_from_slice(&i.key);
        out.extend_from_slice(&(i.value.len() as u32).to_be_bytes());
        out.extend_from_slice(&i.value);
    }
    out
}

fn decode(mut p: &[u8]) -> Option<Vec<Insert>> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if p.len() < n {
            return None;
        }
        let (a, b) = p.split_at(n);
        *p = b;
        Some(a)
    }
    fn u32_of(p: &mut &[u8]) -> Option<usize> {
        Some(u32::from_be_bytes(take(p, 4)?.try_into().ok()?) as usize)
    }
    let n = u32_of(&mut p)?;
    let mut out = Vec::with_capacity(n.min(p.len()));
    for _ in 0..n {
        let tree = take(&mut p, 1)?[0];
        let klen = u32_of(&mut p)?;
        let key = take(&mut p, klen)?.to_vec();
        let vlen = u32_of(&mut p)?;
        let value = take(&mut p, vlen)?.to_vec();
        out.push(Insert { tree, key, value });
    }
    p.is_empty().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ins(k: &str) -> Insert {
        Insert {
            tree: 2,
            key: k.as_bytes().to_vec(),
            value: vec![7; 100],
        }
    }

    #[test]
    fn records_survive_reopen_and_reset_forgets_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut w, replayed) = Wal::open(&path).unwrap();
        assert!(replayed.is_empty());
        w.append(&encode(&[ins("a"), ins("b")])).unwrap();
        w.append(&encode(&[ins("c")])).unwrap();
        drop(w);
        let (mut w, replayed) = Wal::open(&path).unwrap();
        assert_eq!(replayed, vec![ins("a"), ins("b"), ins("c")]);
        assert!(!w.is_empty(), "replayed records count until a reset");
        w.reset().unwrap();
        assert!(w.is_empty());
        drop(w);
        let (_, replayed) = Wal::open(&path).unwrap();
        assert!(
            replayed.is_empty(),
            "records of an older generation are ignored"
        );
    }

    #[test]
    fn a_torn_tail_is_dropped_and_earlier_records_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut w, _) = Wal::open(&path).unwrap();
        w.append(&encode(&[ins("a")])).unwrap();
        let at = w.offset;
        w.append(&encode(&[ins("b")])).unwrap();
        drop(w);
        // Corrupt one byte of the second record's payload, as a torn write would.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], at + RECORD_HEADER as u64 + 6)
            .unwrap();
        let (_, replayed) = Wal::open(&path).unwrap();
        assert_eq!(replayed, vec![ins("a")]);
    }

    /// Open reads the log in growing steps from `FIRST_READ`: records reaching past it
    /// (many small ones, and one larger than the step) are all replayed, and the log goes
    /// on after them.
    #[test]
    fn records_past_the_first_read_are_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal");
        let (mut w, _) = Wal::open(&path).unwrap();
        let mut want = Vec::new();
        for i in 0..40 {
            let one = Insert {
                tree: 3,
                key: format!("k{i}").into_bytes(),
                value: vec![i as u8; 3000],
            };
            w.append(&encode(std::slice::from_ref(&one))).unwrap();
            want.push(one);
        }
        let large = Insert {
            tree: 3,
            key: b"large".to_vec(),
            value: vec![9; 5 * FIRST_READ],
        };
        w.append(&encode(std::slice::from_ref(&large))).unwrap();
        want.push(large);
        let end = w.offset;
        assert!(end > 6 * FIRST_READ as u64);
        drop(w);
        let (w, replayed) = Wal::open(&path).unwrap();
        assert_eq!(replayed, want);
        assert_eq!(w.offset, end, "appends continue after the replayed records");
    }

    #[test]
    fn fits_until_the_file_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(&dir.path().join("wal")).unwrap();
        let big = vec![1u8; 1024 * 1024];
        let mut n = 0;
        while w.fits(big.len()) {
            w.append(&big).unwrap();
            n += 1;
        }
        assert_eq!(n, 7, "8 MiB holds seven 1 MiB records after the headers");
        assert!(Wal::could_fit(big.len()));
        assert!(!Wal::could_fit(WAL_BYTES as usize));
    }
}
