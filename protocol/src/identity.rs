//! Enterprise identities and change signatures.
//!
//! Owns: the enterprise keypair ([`Keypair`]), its public, printable id
//! ([`EnterpriseId`]), and the signing/verification of change hashes with a
//! domain-separation prefix that binds every signature to one document.
//! Must not: read randomness or the clock (key material is an input), or know
//! anything about libp2p (the node derives the `PeerId` from the same secret).

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::doc::DocId;
use crate::error::IdError;

/// Domain separation prefix for change signatures. Bumped if the signed payload changes.
const CHANGE_SIG_DOMAIN: &[u8] = b"cofab/change/v1";
/// Domain separation prefix for genesis signatures.
const GENESIS_SIG_DOMAIN: &[u8] = b"cofab/genesis/v1";
/// Human-readable prefix of an [`EnterpriseId`].
pub const ENTERPRISE_ID_PREFIX: &str = "cf1";

/// An enterprise's ed25519 keypair. The same 32-byte secret seeds the libp2p identity.
#[derive(Clone)]
pub struct Keypair {
    signing: SigningKey,
    /// The incarnation this process writes as (see [`Author`]).
    incarnation: u32,
}

impl Keypair {
    /// Builds a keypair from a 32-byte secret (the caller supplies the randomness).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&secret),
            incarnation: 0,
        }
    }
    /// The same keypair writing as incarnation `n` of its enterprise's node (see [`Author`]).
    pub fn with_incarnation(mut self, n: u32) -> Self {
        self.incarnation = n;
        self
    }
    /// Who this keypair's changes are authored by: the enterprise in this incarnation.
    pub fn author(&self) -> Author {
        Author {
            enterprise: self.id(),
            incarnation: self.incarnation,
        }
    }
    /// The 32-byte secret, for persisting the key.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }
    /// The public id of this enterprise.
    pub fn id(&self) -> EnterpriseId {
        EnterpriseId(self.signing.verifying_key().to_bytes())
    }
    /// Signs the hash of a change made in document `doc`.
    pub fn sign_change(&self, doc: &DocId, hash: &automerge::ChangeHash) -> Signature {
        self.signing.sign(&change_sig_payload(doc, hash))
    }
    /// Signs a genesis record's canonical bytes.
    pub fn sign_genesis(&self, bytes: &[u8]) -> Signature {
        let mut payload = GENESIS_SIG_DOMAIN.to_vec();
        payload.extend_from_slice(bytes);
        self.signing.sign(&payload)
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({})", self.id())
    }
}

/// The bytes a change signature covers: domain, document id, change hash.
pub(crate) fn change_sig_payload(doc: &DocId, hash: &automerge::ChangeHash) -> Vec<u8> {
    let mut payload = Vec::with_capacity(CHANGE_SIG_DOMAIN.len() + 16 + 32);
    payload.extend_from_slice(CHANGE_SIG_DOMAIN);
    payload.extend_from_slice(doc.as_bytes());
    payload.extend_from_slice(hash.as_ref());
    payload
}

/// Verifies a change signature against an already decompressed key (strict: no weak
/// keys, no malleable signatures).
pub(crate) fn verify_change_with(
    key: &VerifyingKey,
    doc: &DocId,
    hash: &automerge::ChangeHash,
    sig: &Signature,
) -> bool {
    key.verify_strict(&change_sig_payload(doc, hash), sig)
        .is_ok()
}

/// An enterprise's public key: who authored a change, who owns or belongs to a document.
///
/// Printed as `cf1` + lowercase base32 of the 32 key bytes and a 4-byte SHA-256 checksum,
/// so a mistyped id is refused instead of naming a different enterprise.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EnterpriseId(pub [u8; 32]);

impl EnterpriseId {
    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Parses raw key bytes; the length must be 32 (an automerge actor id is parsed by
    /// [`Author::from_actor`]).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        let arr: [u8; 32] = bytes.try_into().map_err(|_| IdError::Length(bytes.len()))?;
        Ok(Self(arr))
    }
    /// Verifies a change signature made by this enterprise.
    pub fn verify_change(
        &self,
        doc: &DocId,
        hash: &automerge::ChangeHash,
        sig: &Signature,
    ) -> bool {
        match VerifyingKey::from_bytes(&self.0) {
            Ok(vk) => verify_change_with(&vk, doc, hash, sig),
            Err(_) => false,
        }
    }
    /// Verifies a genesis signature made by this enterprise.
    pub fn verify_genesis(&self, bytes: &[u8], sig: &Signature) -> bool {
        let mut payload = GENESIS_SIG_DOMAIN.to_vec();
        payload.extend_from_slice(bytes);
        match VerifyingKey::from_bytes(&self.0) {
            Ok(vk) => vk.verify_strict(&payload, sig).is_ok(),
            Err(_) => false,
        }
    }
    /// The ed25519 verifying key, if the bytes are a valid point.
    pub fn verifying_key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).ok()
    }
    /// Short form for logs and tables (first 10 characters after the prefix).
    pub fn short(&self) -> String {
        let s = self.to_string();
        s[..ENTERPRISE_ID_PREFIX.len() + 10].to_string()
    }
}

/// The writer of a change: an enterprise's key in one incarnation of its node.
///
/// A node sends its own changes while their durable write is still in flight, so a
/// crash can lose a change that peers already hold. A node that starts after a run
/// which did not end cleanly therefore writes as a new incarnation: its sequence
/// numbers start afresh under a new automerge actor, and the change it lost (which
/// peers give back) can never be contradicted by a different change with the same
/// actor and seq. Permissions belong to the enterprise; chains, clocks and sequence
/// numbers to the author.
///
/// The automerge actor id is the 32 key bytes for incarnation 0 and the key followed
/// by the incarnation as 4 big-endian bytes otherwise (one encoding per author).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Author {
    /// The enterprise whose key signs the changes.
    pub enterprise: EnterpriseId,
    /// Which run of the enterprise's node wrote them.
    pub incarnation: u32,
}

impl Author {
    /// Incarnation 0 of an enterprise.
    pub fn first(enterprise: EnterpriseId) -> Self {
        Self {
            enterprise,
            incarnation: 0,
        }
    }
    /// The automerge actor id of this author.
    pub fn actor(&self) -> automerge::ActorId {
        if self.incarnation == 0 {
            automerge::ActorId::from(&self.enterprise.0[..])
        } else {
            let mut b = self.enterprise.0.to_vec();
            b.extend_from_slice(&self.incarnation.to_be_bytes());
            automerge::ActorId::from(b)
        }
    }
    /// Parses an automerge actor id: 32 key bytes, or 32 key bytes and a non-zero
    /// 4-byte incarnation. The key is not checked to be a valid point here.
    pub fn from_actor(bytes: &[u8]) -> Result<Self, IdError> {
        match bytes.len() {
            32 => Ok(Self::first(EnterpriseId::from_slice(bytes)?)),
            36 => {
                let incarnation = u32::from_be_bytes(bytes[32..].try_into().expect("4 bytes"));
                if incarnation == 0 {
                    // Incarnation 0 has one spelling only: the bare key.
                    return Err(IdError::Length(36));
                }
                Ok(Self {
                    enterprise: EnterpriseId::from_slice(&bytes[..32])?,
                    incarnation,
                })
            }
            n => Err(IdError::Length(n)),
        }
    }
}

impl fmt::Display for Author {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.incarnation == 0 {
            write!(f, "{}", self.enterprise)
        } else {
            write!(f, "{}#{}", self.enterprise, self.incarnation)
        }
    }
}

fn checksum(key: &[u8; 32]) -> [u8; 4] {
    let d = Sha256::digest([b"cofab-id".as_slice(), key.as_slice()].concat());
    [d[0], d[1], d[2], d[3]]
}

impl fmt::Display for EnterpriseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = self.0.to_vec();
        buf.extend_from_slice(&checksum(&self.0));
        write!(
            f,
            "{}{}",
            ENTERPRISE_ID_PREFIX,
            data_encoding::BASE32_NOPAD.encode(&buf).to_lowercase()
        )
    }
}

impl fmt::Debug for EnterpriseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnterpriseId({})", self.short())
    }
}

impl FromStr for EnterpriseId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(ENTERPRISE_ID_PREFIX)
            .ok_or(IdError::Prefix)?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(rest.to_uppercase().as_bytes())
            .map_err(|_| IdError::Encoding)?;
        if bytes.len() != 36 {
            return Err(IdError::Length(bytes.len()));
        }
        let key: [u8; 32] = bytes[..32].try_into().expect("length checked");
        if bytes[32..] != checksum(&key) {
            return Err(IdError::Checksum);
        }
        Ok(Self(key))
    }
}

impl serde::Serialize for EnterpriseId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for EnterpriseId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Why every signature is checked alone with `verify_strict` instead of in
    /// ed25519-dalek's batch: a signer can put a small torsion point into R. Such a
    /// signature fails `verify_strict`, yet passes a batch whenever the batch's random
    /// weight for it is even — and that weight comes from a transcript of the batch's
    /// contents, which the sender chooses. We refuse it either way.
    #[test]
    fn a_torsioned_signature_that_a_batch_accepts_is_refused() {
        use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
        use curve25519_dalek::edwards::CompressedEdwardsY;
        use curve25519_dalek::scalar::Scalar;
        use curve25519_dalek::traits::IsIdentity;
        use sha2::Sha512;
        let seed = [11u8; 32];
        let kp = Keypair::from_secret(seed);
        let public = kp.signing.verifying_key();
        let a = ed25519_dalek::hazmat::ExpandedSecretKey::from_bytes(&Sha512::digest(seed).into())
            .scalar;
        // The point of order 2: y = -1.
        let mut y = [0xffu8; 32];
        y[0] = 0xec;
        y[31] = 0x7f;
        let t = CompressedEdwardsY(y).decompress().unwrap();
        assert!(t.is_small_order() && !t.is_identity());
        let doc = DocId([3; 16]);
        let mut batch_accepted = 0;
        for r in 1u64..=64 {
            let hash = automerge::ChangeHash([r as u8; 32]);
            let msg = change_sig_payload(&doc, &hash);
            let big_r = (Scalar::from(r) * ED25519_BASEPOINT_POINT + t).compress();
            let k: [u8; 64] = Sha512::new()
                .chain_update(big_r.as_bytes())
                .chain_update(public.as_bytes())
                .chain_update(&msg)
                .finalize()
                .into();
            let s = Scalar::from(r) + Scalar::from_bytes_mod_order_wide(&k) * a;
            let mut sig = [0u8; 64];
            sig[..32].copy_from_slice(big_r.as_bytes());
            sig[32..].copy_from_slice(s.as_bytes());
            let signature = Signature::from_bytes(&sig);
            assert!(public.verify_strict(&msg, &signature).is_err());
            if ed25519_dalek::verify_batch(&[msg.as_slice()], &[signature], &[public]).is_ok() {
                batch_accepted += 1;
            }
            assert!(!kp.id().verify_change(&doc, &hash, &signature));
        }
        assert!(
            batch_accepted > 0,
            "no crafted signature passed a batch: the premise of this test changed"
        );
    }

    #[test]
    fn signatures_are_bound_to_key_document_hash_and_kind() {
        let doc = DocId([1; 16]);
        let keys: Vec<Keypair> = (0..5u8)
            .map(|i| Keypair::from_secret([i + 1; 32]))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            let h = automerge::ChangeHash([i as u8; 32]);
            assert!(k.id().verify_change(&doc, &h, &k.sign_change(&doc, &h)));
        }
        let g = b"{\"genesis\":1}";
        assert!(keys[0].id().verify_genesis(g, &keys[0].sign_genesis(g)));
        // Key 2's signature over change 2 presented as key 3's.
        let h = automerge::ChangeHash([2; 32]);
        assert!(!keys[3]
            .id()
            .verify_change(&doc, &h, &keys[2].sign_change(&doc, &h)));
        // A genesis signature is not a change signature (domains differ).
        assert!(!keys[0]
            .id()
            .verify_change(&doc, &h, &keys[0].sign_genesis(g)));
    }

    #[test]
    fn id_round_trips_and_rejects_typos() {
        let kp = Keypair::from_secret([7; 32]);
        let id = kp.id();
        let s = id.to_string();
        assert!(s.starts_with("cf1"));
        assert_eq!(s.parse::<EnterpriseId>().unwrap(), id);
        // flip one character
        let mut chars: Vec<char> = s.chars().collect();
        let i = 10;
        chars[i] = if chars[i] == 'a' { 'b' } else { 'a' };
        let typo: String = chars.into_iter().collect();
        assert!(matches!(
            typo.parse::<EnterpriseId>(),
            Err(IdError::Checksum)
        ));
        assert!(matches!(
            "xx1abc".parse::<EnterpriseId>(),
            Err(IdError::Prefix)
        ));
        assert!("cf1!!".parse::<EnterpriseId>().is_err());
    }

    #[test]
    fn change_signature_is_bound_to_document() {
        let kp = Keypair::from_secret([1; 32]);
        let d1 = DocId([1; 16]);
        let d2 = DocId([2; 16]);
        let h = automerge::ChangeHash([9; 32]);
        let sig = kp.sign_change(&d1, &h);
        assert!(kp.id().verify_change(&d1, &h, &sig));
        assert!(!kp.id().verify_change(&d2, &h, &sig));
        let other = Keypair::from_secret([2; 32]);
        assert!(!other.id().verify_change(&d1, &h, &sig));
    }
}
