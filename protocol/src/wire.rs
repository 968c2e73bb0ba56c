//! Versioned, size-limited wire messages.
//!
//! Owns: the byte layout of everything peers send each other. Every frame starts
//! with [`WIRE_VERSION`]; decoding any byte string returns a value or a
//! [`DecodeError`], never panics, and never allocates more than the input's length
//! (every length and count is checked against the bytes that remain).
//! Must not: interpret documents (that is [`crate::document`]).
//!
//! ```text
//! frame   = version:u8  type:u8  body
//! type 1  = sync batch:  count:varint  sync_msg*
//! sync_msg= doc:16  flags:u8  [genesis: bytes sig:64]  clock: count (key:32 incarnation:varint seq:varint)*
//!           heads: count hash:32*  [changes: count bytes*  sigs]  [snapshot: bytes sigs]
//! sigs    = count (hash:32 sig:64)*
//! type 2  = announce: count (doc:16 kind:u8 owner:32 changes:varint)*
//! bytes   = len:varint  byte*
//! ```

use automerge::ChangeHash;

use crate::doc::{DocId, Kind};
use crate::document::{ChangeBatch, Clock};
use crate::error::DecodeError;
use crate::identity::{Author, EnterpriseId};

/// The wire version this build speaks. 2: clock entries carry the author's incarnation
/// (1 had none; a node speaking 1 refuses these frames as an unknown version).
pub const WIRE_VERSION: u8 = 2;
/// Hard limit on one frame, in bytes.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Most sync messages in one frame.
pub const MAX_MESSAGES_PER_FRAME: usize = 4096;

const T_SYNC: u8 = 1;
const T_ANNOUNCE: u8 = 2;
const T_ALERT: u8 = 3;
/// Longest reason label in a security alert.
pub const MAX_ALERT_REASON: usize = 64;

const F_GENESIS: u8 = 1;
const F_CHANGES: u8 = 2;
const F_SNAPSHOT: u8 = 4;
const F_DECLINE: u8 = 8;

/// What a sync message carries beyond the sender's clock.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Payload {
    /// Nothing: just the sender's state.
    #[default]
    None,
    /// Changes the receiver lacks.
    Changes(ChangeBatch),
    /// The whole document, sent when the receiver holds nothing of it.
    Snapshot {
        /// `Automerge::save()` bytes.
        bytes: Vec<u8>,
        /// Newest and checkpoint signatures of every author.
        sigs: Vec<(ChangeHash, [u8; 64])>,
    },
}

/// One step of the sync of one document between two peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncMessage {
    /// The document.
    pub doc: DocId,
    /// The signed genesis (bytes and signature), sent when the receiver may not have it.
    pub genesis: Option<(Vec<u8>, [u8; 64])>,
    /// What the sender holds.
    pub clock: Clock,
    /// The sender's heads (to detect equivocation and report sync state).
    pub heads: Vec<ChangeHash>,
    /// Changes or a snapshot for the receiver.
    pub payload: Payload,
    /// The sender does not want this document (e.g. its fetch filter excludes the kind).
    pub decline: bool,
}

/// A document announced to the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// Document id.
    pub doc: DocId,
    /// Kind.
    pub kind: Kind,
    /// Owner.
    pub owner: EnterpriseId,
    /// Number of changes the announcer holds.
    pub changes: u64,
}

/// A security alert: the sender refused input from `offender`. The reporter is not in
/// the frame: it is the authenticated source of the (signed) gossip message that carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// The enterprise whose peer sent the refused input.
    pub offender: EnterpriseId,
    /// Why, as a reason label (`bad_signature`, `malformed_frame`, ...).
    pub reason: String,
    /// SHA-256 of the evidence (reason, document and detail of the refusal).
    pub evidence: [u8; 32],
    /// When, unix ms (reporter's clock).
    pub at_ms: i64,
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Sync messages, each for one document.
    Sync(Vec<SyncMessage>),
    /// Public documents the sender holds.
    Announce(Vec<Announcement>),
    /// A security alert, published on the alerts topic.
    Alert(Alert),
}

// ---------- encoding ----------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}
fn put_sigs(out: &mut Vec<u8>, sigs: &[(ChangeHash, [u8; 64])]) {
    put_varint(out, sigs.len() as u64);
    for (h, s) in sigs {
        out.extend_from_slice(h.as_ref());
        out.extend_from_slice(s);
    }
}

/// An upper bound of `m`'s encoded size (varints counted at their widest), so that a
/// frame is encoded into one allocation instead of growing (and copying) as it goes.
fn sync_len_bound(m: &SyncMessage) -> usize {
    const V: usize = 10;
    let genesis = m.genesis.as_ref().map_or(0, |(g, _)| V + g.len() + 64);
    let sigs = |n: usize| V + n * (32 + 64);
    let payload = match &m.payload {
        Payload::None => 0,
        Payload::Changes(b) => {
            V + b.changes.iter().map(|c| V + c.len()).sum::<usize>() + sigs(b.sigs.len())
        }
        Payload::Snapshot { bytes, sigs: s } => V + bytes.len() + sigs(s.len()),
    };
    32 + 1 + genesis + V + m.clock.len() * (32 + 2 * V) + V + m.heads.len() * 32 + payload
}

fn encode_sync(out: &mut Vec<u8>, m: &SyncMessage) {
    out.extend_from_slice(m.doc.as_bytes());
    let mut flags = 0;
    if m.genesis.is_some() {
        flags |= F_GENESIS;
    }
    match &m.payload {
        Payload::None => {}
        Payload::Changes(_) => flags |= F_CHANGES,
        Payload::Snapshot { .. } => flags |= F_SNAPSHOT,
    }
    if m.decline {
        flags |= F_DECLINE;
    }
    out.push(flags);
    if let Some((g, sig)) = &m.genesis {
        put_bytes(out, g);
        out.extend_from_slice(sig);
    }
    put_varint(out, m.clock.len() as u64);
    for (a, s) in &m.clock {
        out.extend_from_slice(a.enterprise.as_bytes());
        put_varint(out, a.incarnation as u64);
        put_varint(out, *s);
    }
    put_varint(out, m.heads.len() as u64);
    for h in &m.heads {
        out.extend_from_slice(h.as_ref());
    }
    match &m.payload {
        Payload::None => {}
        Payload::Changes(b) => {
            put_varint(out, b.changes.len() as u64);
            for c in &b.changes {
                put_bytes(out, c);
            }
            put_sigs(out, &b.sigs);
        }
        Payload::Snapshot { bytes, sigs } => {
            put_bytes(out, bytes);
            put_sigs(out, sigs);
        }
    }
}

impl Frame {
    /// Encodes the frame. Callers keep frames under [`MAX_FRAME_BYTES`].
    pub fn encode(&self) -> Vec<u8> {
        let bound = match self {
            Frame::Sync(msgs) => 12 + msgs.iter().map(sync_len_bound).sum::<usize>(),
            _ => 64,
        };
        let mut out = Vec::with_capacity(bound);
        out.push(WIRE_VERSION);
        match self {
            Frame::Sync(msgs) => {
                out.push(T_SYNC);
                put_varint(&mut out, msgs.len() as u64);
                for m in msgs {
                    encode_sync(&mut out, m);
                }
            }
            Frame::Announce(items) => {
                out.push(T_ANNOUNCE);
                put_varint(&mut out, items.len() as u64);
                for a in items {
                    out.extend_from_slice(a.doc.as_bytes());
                    out.push(a.kind.tag());
                    out.extend_from_slice(a.owner.as_bytes());
                    put_varint(&mut out, a.changes);
                }
            }
            Frame::Alert(a) => {
                out.push(T_ALERT);
                out.extend_from_slice(a.offender.as_bytes());
                put_bytes(&mut out, a.reason.as_bytes());
                out.extend_from_slice(&a.evidence);
                put_varint(&mut out, a.at_ms as u64);
            }
        }
        out
    }

    /// Decodes a frame, checking the version, every length and the size limit.
    pub fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                max: MAX_FRAME_BYTES,
            });
        }
        let mut r = Reader { b: bytes };
        let version = r.u8().map_err(|_| DecodeError::Empty)?;
        if version != WIRE_VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        let frame = match r.u8()? {
            T_SYNC => {
                let n = r.count(16 + 1 + 1 + 1)?;
                if n > MAX_MESSAGES_PER_FRAME {
                    return Err(DecodeError::TooLarge {
                        len: n,
                        max: MAX_MESSAGES_PER_FRAME,
                    });
                }
                let mut msgs = Vec::with_capacity(n);
                for _ in 0..n {
                    msgs.push(r.sync()?);
                }
                Frame::Sync(msgs)
            }
            T_ANNOUNCE => {
                let n = r.count(16 + 1 + 32 + 1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    let doc = DocId(r.array()?);
                    let kind = Kind::from_tag(r.u8()?).ok_or(DecodeError::Invalid("kind"))?;
                    let owner = EnterpriseId(r.array()?);
                    let changes = r.varint()?;
                    items.push(Announcement {
                        doc,
                        kind,
                        owner,
                        changes,
                    });
                }
                Frame::Announce(items)
            }
            T_ALERT => {
                let offender = EnterpriseId(r.array()?);
                let reason = r.bytes()?;
                if reason.len() > MAX_ALERT_REASON {
                    return Err(DecodeError::Invalid("alert reason too long"));
                }
                let reason =
                    String::from_utf8(reason).map_err(|_| DecodeError::Invalid("alert reason"))?;
                let evidence = r.array()?;
                let at_ms = r.varint()? as i64;
                Frame::Alert(Alert {
                    offender,
                    reason,
                    evidence,
                    at_ms,
                })
            }
            t => return Err(DecodeError::UnknownType(t)),
        };
        if !r.b.is_empty() {
            return Err(DecodeError::Trailing);
        }
        Ok(frame)
    }
}

// ---------- decoding ----------

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&x, rest) = self.b.split_first().ok_or(DecodeError::Truncated)?;
        self.b = rest;
        Ok(x)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.b.len() {
            return Err(DecodeError::Truncated);
        }
        let (x, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(x)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            if i == 9 && b > 1 {
                return Err(DecodeError::Invalid("varint overflow"));
            }
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Invalid("varint too long"))
    }
    /// A count of items each at least `min` bytes long: refused if the rest cannot hold them.
    fn count(&mut self, min: usize) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        if n > (self.b.len() / min.max(1)) as u64 {
            return Err(DecodeError::Truncated);
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.varint()?;
        if n > self.b.len() as u64 {
            return Err(DecodeError::Truncated);
        }
        Ok(self.take(n as usize)?.to_vec())
    }
    fn sigs(&mut self) -> Result<Vec<(ChangeHash, [u8; 64])>, DecodeError> {
        let n = self.count(96)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let h = ChangeHash(self.array()?);
            let s = self.array()?;
            out.push((h, s));
        }
        Ok(out)
    }
    fn sync(&mut self) -> Result<SyncMessage, DecodeError> {
        let doc = DocId(self.array()?);
        let flags = self.u8()?;
        if flags & !(F_GENESIS | F_CHANGES | F_SNAPSHOT | F_DECLINE) != 0 {
            return Err(DecodeError::Invalid("flags"));
        }
        if flags & F_CHANGES != 0 && flags & F_SNAPSHOT != 0 {
            return Err(DecodeError::Invalid("flags: changes and snapshot"));
        }
        let genesis = if flags & F_GENESIS != 0 {
            let g = self.bytes()?;
            let sig = self.array()?;
            Some((g, sig))
        } else {
            None
        };
        let n = self.count(34)?;
        let mut clock = Clock::new();
        for _ in 0..n {
            let enterprise = EnterpriseId(self.array()?);
            let incarnation = u32::try_from(self.varint()?)
                .map_err(|_| DecodeError::Invalid("clock: incarnation over 32 bits"))?;
            let a = Author {
                enterprise,
                incarnation,
            };
            let s = self.varint()?;
            if clock.insert(a, s).is_some() {
                return Err(DecodeError::Invalid("clock: duplicate author"));
            }
        }
        let n = self.count(32)?;
        let mut heads = Vec::with_capacity(n);
        for _ in 0..n {
            heads.push(ChangeHash(self.array()?));
        }
        let payload = if flags & F_CHANGES != 0 {
            let n = self.count(1)?;
            let mut changes = Vec::with_capacity(n);
            for _ in 0..n {
                changes.push(self.bytes()?);
            }
            Payload::Changes(ChangeBatch {
                changes,
                sigs: self.sigs()?,
            })
        } else if flags & F_SNAPSHOT != 0 {
            let bytes = self.bytes()?;
            Payload::Snapshot {
                bytes,
                sigs: self.sigs()?,
            }
        } else {
            Payload::None
        };
        Ok(SyncMessage {
            doc,
            genesis,
            clock,
            heads,
            payload,
            decline: flags & F_DECLINE != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_msg() -> impl Strategy<Value = SyncMessage> {
        (
            any::<[u8; 16]>(),
            proptest::option::of((
                proptest::collection::vec(any::<u8>(), 0..64),
                any::<[u8; 32]>(),
            )),
            proptest::collection::btree_map((any::<[u8; 32]>(), 0u32..3), any::<u64>(), 0..4),
            proptest::collection::vec(any::<[u8; 32]>(), 0..3),
            prop_oneof![
                Just(Payload::None),
                (
                    proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..4),
                    proptest::collection::vec((any::<[u8; 32]>(), any::<[u8; 32]>()), 0..3)
                )
                    .prop_map(|(changes, sigs)| Payload::Changes(ChangeBatch {
                        changes,
                        sigs: sigs
                            .into_iter()
                            .map(|(h, s)| (ChangeHash(h), [s, s].concat().try_into().unwrap()))
                            .collect()
                    })),
                proptest::collection::vec(any::<u8>(), 0..80).prop_map(|bytes| Payload::Snapshot {
                    bytes,
                    sigs: vec![]
                }),
            ],
            any::<bool>(),
        )
            .prop_map(
                |(doc, genesis, clock, heads, payload, decline)| SyncMessage {
                    doc: DocId(doc),
                    genesis: genesis.map(|(g, s)| (g, [s, s].concat().try_into().unwrap())),
                    clock: clock
                        .into_iter()
                        .map(|((k, n), v)| {
                            (
                                Author {
                                    enterprise: EnterpriseId(k),
                                    incarnation: n,
                                },
                                v,
                            )
                        })
                        .collect(),
                    heads: heads.into_iter().map(ChangeHash).collect(),
                    payload,
                    decline,
                },
            )
    }

    proptest! {
        #[test]
        fn sync_frames_round_trip(msgs in proptest::collection::vec(arb_msg(), 0..4)) {
            let f = Frame::Sync(msgs);
            let bytes = f.encode();
            prop_assert_eq!(Frame::decode(&bytes).unwrap(), f);
        }

        #[test]
        fn any_prefix_or_garbage_decodes_to_error_not_panic(msgs in proptest::collection::vec(arb_msg(), 1..3), cut in any::<prop::sample::Index>(), garbage in proptest::collection::vec(any::<u8>(), 0..200)) {
            let bytes = Frame::Sync(msgs).encode();
            let n = cut.index(bytes.len());
            let _ = Frame::decode(&bytes[..n]);
            let _ = Frame::decode(&garbage);
            let mut g2 = vec![WIRE_VERSION, 1];
            g2.extend_from_slice(&garbage);
            let _ = Frame::decode(&g2);
        }

        #[test]
        fn announce_round_trips(items in proptest::collection::vec((any::<[u8;16]>(), 1u8..=3, any::<[u8;32]>(), any::<u64>()), 0..5)) {
            let f = Frame::Announce(items.into_iter().map(|(d,k,o,c)| Announcement{doc: DocId(d), kind: Kind::from_tag(k).unwrap(), owner: EnterpriseId(o), changes: c}).collect());
            prop_assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn alert_round_trips_and_refuses_long_reasons() {
        let a = Alert {
            offender: EnterpriseId([7; 32]),
            reason: "bad_signature".into(),
            evidence: [1; 32],
            at_ms: 1_700_000_000_000,
        };
        let f = Frame::Alert(a);
        assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        let long = Frame::Alert(Alert {
            offender: EnterpriseId([7; 32]),
            reason: "x".repeat(MAX_ALERT_REASON + 1),
            evidence: [1; 32],
            at_ms: 0,
        });
        assert_eq!(
            Frame::decode(&long.encode()),
            Err(DecodeError::Invalid("alert reason too long"))
        );
    }

    #[test]
    fn typed_errors() {
        assert_eq!(Frame::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            Frame::decode(&[9, 1, 0]),
            Err(DecodeError::UnknownVersion(9))
        );
        assert_eq!(
            Frame::decode(&[WIRE_VERSION, 77]),
            Err(DecodeError::UnknownType(77))
        );
        assert_eq!(
            Frame::decode(&[WIRE_VERSION, T_SYNC, 5]),
            Err(DecodeError::Truncated)
        );
        let mut ok = Frame::Sync(vec![]).encode();
        ok.push(0);
        assert_eq!(Frame::decode(&ok), Err(DecodeError::Trailing));
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            Frame::decode(&big),
            Err(DecodeError::TooLarge { .. })
        ));
        // a huge declared count is refused before any allocation
        let mut huge = vec![WIRE_VERSION, T_SYNC];
        put_varint(&mut huge, u64::MAX / 2);
        assert_eq!(Frame::decode(&huge), Err(DecodeError::Truncated));
    }
}
