//! Document identity and the signed genesis record.
//!
//! Owns: [`DocId`], [`Kind`], [`Visibility`], [`Role`], [`Genesis`] and
//! [`SignedGenesis`]. A document id is the hash of its signed genesis bytes, so
//! nobody can present a different owner, kind or initial membership for an id.
//! Must not: touch automerge state (that is [`crate::document`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{GenesisError, IdError};
use crate::identity::{EnterpriseId, Keypair};

/// Current schema version written into every genesis.
pub const SCHEMA_VERSION: u16 = 1;
/// Largest accepted genesis record, in bytes.
pub const MAX_GENESIS_BYTES: usize = 64 * 1024;
/// Most members a genesis may list.
pub const MAX_MEMBERS: usize = 256;

/// A document id: the first 16 bytes of SHA-256 over the signed genesis bytes. Printed as hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocId(pub [u8; 16]);

impl DocId {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({self})")
    }
}
impl FromStr for DocId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(IdError::Encoding);
        }
        let mut out = [0u8; 16];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).map_err(|_| IdError::Encoding)?;
            out[i] = u8::from_str_radix(hex, 16).map_err(|_| IdError::Encoding)?;
        }
        Ok(DocId(out))
    }
}
impl Serialize for DocId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> Deserialize<'de> for DocId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The kind of a document; it selects the schema and the rules.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A request for quotation posted by a buyer, with bids, award and progress.
    Order,
    /// A supplier's published capacity.
    Capacity,
    /// A co-edited design spec.
    Design,
}

impl Kind {
    /// The wire tag.
    pub fn tag(self) -> u8 {
        match self {
            Kind::Order => 1,
            Kind::Capacity => 2,
            Kind::Design => 3,
        }
    }
    /// From the wire tag.
    pub fn from_tag(t: u8) -> Option<Self> {
        Some(match t {
            1 => Kind::Order,
            2 => Kind::Capacity,
            3 => Kind::Design,
            _ => return None,
        })
    }
    /// The name used in the API and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Order => "order",
            Kind::Capacity => "capacity",
            Kind::Design => "design",
        }
    }
}

/// Who may hold a document.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Announced to the network; any peer may hold and read it.
    #[default]
    Public,
    /// Reaches members only: never sent to a peer whose enterprise is not a member.
    Members,
}

/// A member's role in a document.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The creator; changes membership; for an order, the buyer.
    Owner,
    /// Edits the content of a design (not its releases or membership).
    Editor,
    /// Like an editor, and may release a design revision.
    Approver,
    /// May bid on an order and, once awarded, report progress.
    Supplier,
    /// Reads and comments; no other writes.
    Viewer,
}

impl Role {
    /// Parses the API/CLI name of a role.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "owner" => Role::Owner,
            "editor" => Role::Editor,
            "approver" => Role::Approver,
            "supplier" => Role::Supplier,
            "viewer" => Role::Viewer,
            _ => return None,
        })
    }
    /// The API/CLI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Editor => "editor",
            Role::Approver => "approver",
            Role::Supplier => "supplier",
            Role::Viewer => "viewer",
        }
    }
}

/// The immutable facts of a document, signed by its owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Genesis {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub schema: u16,
    /// Document kind.
    pub kind: Kind,
    /// Owner enterprise (the buyer of an order, the supplier of a capacity).
    pub owner: EnterpriseId,
    /// Who may hold the document.
    pub visibility: Visibility,
    /// Initial members other than the owner. Later changes live in the document's `members` map.
    pub members: BTreeMap<EnterpriseId, Role>,
    /// Creation time, unix milliseconds (advisory; it makes ids unique).
    pub created_ms: i64,
    /// Random bytes supplied by the caller, so two identical geneses get distinct ids.
    pub nonce: u64,
}

/// A genesis with its exact signed bytes and the owner's signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedGenesis {
    bytes: Vec<u8>,
    sig: Signature,
    genesis: Genesis,
    id: DocId,
}

impl SignedGenesis {
    /// Signs a genesis with the owner's key.
    pub fn sign(genesis: Genesis, owner: &Keypair) -> Result<Self, GenesisError> {
        if genesis.owner != owner.id() {
            return Err(GenesisError::NotOwner);
        }
        let bytes = serde_json::to_vec(&genesis).expect("genesis serializes");
        let sig = owner.sign_genesis(&bytes);
        Self::from_parts(bytes, sig.to_bytes())
    }

    /// Checks and parses a genesis received from elsewhere.
    pub fn from_parts(bytes: Vec<u8>, sig: [u8; 64]) -> Result<Self, GenesisError> {
        if bytes.len() > MAX_GENESIS_BYTES {
            return Err(GenesisError::TooLarge(bytes.len()));
        }
        let genesis: Genesis =
            serde_json::from_slice(&bytes).map_err(|e| GenesisError::Malformed(e.to_string()))?;
        if genesis.schema != SCHEMA_VERSION {
            return Err(GenesisError::UnknownSchema(genesis.schema));
        }
        if genesis.members.len() > MAX_MEMBERS {
            return Err(GenesisError::TooManyMembers(genesis.members.len()));
        }
        if genesis.members.contains_key(&genesis.owner) {
            return Err(GenesisError::Malformed("owner listed as member".into()));
        }
        let sig = Signature::from_bytes(&sig);
        if !genesis.owner.verify_genesis(&bytes, &sig) {
            return Err(GenesisError::BadSignature);
        }
        let digest = Sha256::digest(&bytes);
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        Ok(Self {
            bytes,
            sig,
            genesis,
            id: DocId(id),
        })
    }

    /// The document id derived from these bytes.
    pub fn id(&self) -> DocId {
        self.id
    }
    /// The parsed genesis.
    pub fn genesis(&self) -> &Genesis {
        &self.genesis
    }
    /// The exact signed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// The owner's signature.
    pub fn signature(&self) -> [u8; 64] {
        self.sig.to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn genesis(owner: &Keypair) -> Genesis {
        Genesis {
            schema: SCHEMA_VERSION,
            kind: Kind::Order,
            owner: owner.id(),
            visibility: Visibility::Public,
            members: BTreeMap::new(),
            created_ms: 1,
            nonce: 2,
        }
    }

    #[test]
    fn genesis_signature_and_id() {
        let kp = Keypair::from_secret([3; 32]);
        let g = SignedGenesis::sign(genesis(&kp), &kp).unwrap();
        let again = SignedGenesis::from_parts(g.bytes().to_vec(), g.signature()).unwrap();
        assert_eq!(again.id(), g.id());
        let text = String::from_utf8(g.bytes().to_vec()).unwrap();
        assert!(text.contains("\"nonce\":2"));
        let forged = text.replace("\"nonce\":2", "\"nonce\":3").into_bytes();
        assert!(matches!(
            SignedGenesis::from_parts(forged, g.signature()),
            Err(GenesisError::BadSignature)
        ));
        let other = Keypair::from_secret([4; 32]);
        assert!(matches!(
            SignedGenesis::sign(genesis(&kp), &other),
            Err(GenesisError::NotOwner)
        ));
        assert_eq!(g.id().to_string().parse::<DocId>().unwrap(), g.id());
    }
}
