//! Typed errors, one enum per operation. Every variant says what was wrong.

use crate::identity::{Author, EnterpriseId};

/// A printed id ([`crate::EnterpriseId`] or [`crate::DocId`]) could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The `cf1` prefix is missing.
    #[error("enterprise id must start with \"cf1\"")]
    Prefix,
    /// The characters are not valid base32 / hex.
    #[error("id has invalid characters")]
    Encoding,
    /// Wrong number of bytes.
    #[error("id has the wrong length ({0} bytes)")]
    Length(usize),
    /// The checksum does not match: probably a typo.
    #[error("id checksum does not match (typo?)")]
    Checksum,
}

/// A genesis record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenesisError {
    /// The signing key is not the owner named in the genesis.
    #[error("genesis must be signed by its owner")]
    NotOwner,
    /// Larger than [`MAX_GENESIS_BYTES`](crate::doc::MAX_GENESIS_BYTES).
    #[error("genesis is too large ({0} bytes)")]
    TooLarge(usize),
    /// Not a valid genesis record.
    #[error("genesis is malformed: {0}")]
    Malformed(String),
    /// Schema version this build does not know.
    #[error("unknown schema version {0}")]
    UnknownSchema(u16),
    /// More than [`MAX_MEMBERS`](crate::doc::MAX_MEMBERS).
    #[error("genesis lists too many members ({0})")]
    TooManyMembers(usize),
    /// The owner's signature does not verify.
    #[error("genesis signature does not verify")]
    BadSignature,
    /// The genesis does not hash to the document id it was sent for.
    #[error("genesis does not match the document id")]
    WrongId,
}

/// Which rule a change broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rule {
    /// The author is not a member of a `members` document.
    #[error("author is not a member")]
    NotMember,
    /// The author's role does not allow writing this part.
    #[error("role {0} may not write here")]
    ReadOnlyRole(&'static str),
    /// Only the owner changes membership.
    #[error("only the owner changes membership")]
    MembershipOwnerOnly,
    /// A membership entry names an unknown role.
    #[error("unknown role {0:?}")]
    UnknownRole(String),
    /// Only the buyer edits the request, the award and the status.
    #[error("only the buyer may edit {0}")]
    BuyerOnly(&'static str),
    /// A supplier writes only its own bid.
    #[error("a supplier may write only its own bid")]
    OwnBidOnly,
    /// Bids are accepted only while the order is open.
    #[error("bids are accepted only while the order is open (status {0})")]
    BiddingClosed(String),
    /// Progress is written only by an awarded supplier, for itself.
    #[error("only an awarded supplier reports its own progress")]
    OwnProgressOnly,
    /// The status moved off the lifecycle.
    #[error("status may not move from {from} to {to}")]
    StatusTransition {
        /// Status at the change's causal past.
        from: String,
        /// Status the change wrote.
        to: String,
    },
    /// A value has the wrong type or is not in its allowed set.
    #[error("invalid value: {0}")]
    InvalidValue(String),
    /// Capacity is written only by its supplier.
    #[error("capacity belongs to its supplier")]
    CapacityOwnerOnly,
    /// Releases are made by the owner or an approver.
    #[error("releases are made by the owner or an approver")]
    ReleaseNotAllowed,
    /// Only the first change of the owner sets up the document's structure.
    #[error("the document structure may not be replaced")]
    StructureReplace,
    /// A key outside the schema.
    #[error("unknown field")]
    UnknownField,
    /// A change without dependencies that is not the owner's first change.
    #[error("only the owner creates the document")]
    InitByOwnerOnly,
}

/// A change broke a rule: which rule, where, by whom.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule violated at {path} by {author}: {rule}")]
pub struct RuleViolation {
    /// The rule.
    pub rule: Rule,
    /// The path written, e.g. `bids/cf1.../unit_price`.
    pub path: String,
    /// The author of the change.
    pub author: EnterpriseId,
}

/// A batch of received changes was refused whole. Nothing was applied or stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// Change bytes do not parse.
    #[error("malformed change: {0}")]
    MalformedChange(String),
    /// The change's actor is not an author: an enterprise public key, optionally followed
    /// by a non-zero 4-byte incarnation.
    #[error("actor {0} is not bound to an enterprise key")]
    UnboundActor(String),
    /// The change names another document: replayed from elsewhere.
    #[error("change {hash} was made in another document (replay)")]
    WrongDocument {
        /// The change hash.
        hash: String,
    },
    /// No signature covers this change.
    #[error("change {hash} by {author} is not signed")]
    Unsigned {
        /// Author.
        author: Author,
        /// The change hash.
        hash: String,
    },
    /// A signature does not verify.
    #[error("signature of change {hash} by {author} does not verify")]
    BadSignature {
        /// Author.
        author: Author,
        /// The change hash.
        hash: String,
    },
    /// An author's changes do not follow on from what we hold.
    #[error("change sequence of {author} jumps from {have} to {got}")]
    SeqGap {
        /// Author.
        author: Author,
        /// Highest sequence number we hold.
        have: u64,
        /// Sequence number received.
        got: u64,
    },
    /// A change reuses a sequence number of its author under which we hold (or the batch
    /// carries) a different change: the author's chain forked (its node went back to an
    /// earlier state, e.g. a restored backup, without taking a new incarnation).
    #[error("change {seq} of {author} differs from the one we hold: the author's chain forked")]
    ForkedChain {
        /// Author.
        author: Author,
        /// The reused sequence number.
        seq: u64,
    },
    /// A change does not depend directly on its author's previous change.
    #[error("change {seq} of {author} does not depend on its predecessor")]
    BrokenChain {
        /// Author.
        author: Author,
        /// Sequence number.
        seq: u64,
    },
    /// A change depends on changes neither we nor the batch hold (not hostile: resync).
    #[error("change depends on {0} unknown changes")]
    MissingDeps(usize),
    /// A change broke a document rule.
    #[error(transparent)]
    Rule(#[from] RuleViolation),
    /// Too many changes or bytes in one batch.
    #[error("batch too large: {0}")]
    TooLarge(String),
    /// automerge refused or panicked while applying.
    #[error("automerge could not apply the batch: {0}")]
    Apply(String),
    /// A snapshot that does not load.
    #[error("snapshot does not load: {0}")]
    Snapshot(String),
    /// A message for a document the sender may not hold.
    #[error("sender may not hold this document")]
    NotAllowed,
    /// A genesis problem.
    #[error(transparent)]
    Genesis(#[from] GenesisError),
}

impl IngestError {
    /// A short stable label for metrics (`changes_rejected_total{reason=...}`).
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::MalformedChange(_) => "malformed_change",
            IngestError::UnboundActor(_) => "unbound_actor",
            IngestError::WrongDocument { .. } => "wrong_document",
            IngestError::Unsigned { .. } => "unsigned",
            IngestError::BadSignature { .. } => "bad_signature",
            IngestError::SeqGap { .. } => "seq_gap",
            IngestError::ForkedChain { .. } => "forked_chain",
            IngestError::BrokenChain { .. } => "broken_chain",
            IngestError::MissingDeps(_) => "missing_deps",
            IngestError::Rule(_) => "rule",
            IngestError::TooLarge(_) => "too_large",
            IngestError::Apply(_) => "apply",
            IngestError::Snapshot(_) => "snapshot",
            IngestError::NotAllowed => "not_allowed",
            IngestError::Genesis(_) => "genesis",
        }
    }
    /// Whether the sender is at fault (an honest peer never sends this).
    pub fn is_hostile(&self) -> bool {
        !matches!(self, IngestError::MissingDeps(_))
    }
}

/// A local, typed edit was refused. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// The edit would break a rule.
    #[error(transparent)]
    Rule(#[from] RuleViolation),
    /// A field value is invalid.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Field name as in the API.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The document does not have the expected structure.
    #[error("document is not a valid {0}")]
    Schema(&'static str),
    /// The document is of another kind than the one asked for (e.g. a design id
    /// given to an order route).
    #[error("document is not a {0}")]
    WrongKind(&'static str),
    /// automerge error.
    #[error("automerge: {0}")]
    Automerge(String),
}

impl From<automerge::AutomergeError> for EditError {
    fn from(e: automerge::AutomergeError) -> Self {
        EditError::Automerge(e.to_string())
    }
}

/// Wire bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No bytes.
    #[error("empty message")]
    Empty,
    /// A version byte this build does not speak.
    #[error("unknown wire version {0}")]
    UnknownVersion(u8),
    /// A message type tag this build does not know.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The bytes end in the middle of a field.
    #[error("truncated message")]
    Truncated,
    /// Larger than the limit.
    #[error("message too large: {len} > {max} bytes")]
    TooLarge {
        /// Declared or actual length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A field holds an invalid value.
    #[error("invalid field {0}")]
    Invalid(&'static str),
    /// Bytes left after the message.
    #[error("trailing bytes after message")]
    Trailing,
}
