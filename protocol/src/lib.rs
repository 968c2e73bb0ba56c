//! # cofab-protocol: the sans-IO core of cofab
//!
//! Inputs in, effects out. Nothing here opens a socket, touches a disk, sleeps
//! or reads the clock: time (`now_ms`) and randomness are arguments.
//!
//! - [`identity`]: enterprise keys, printable ids, change signatures.
//! - [`doc`]: document ids, kinds, roles and the signed genesis.
//! - [`document`]: a signed automerge document: local edits, verification of
//!   received changes before they are applied, what a peer lacks.
//! - [`rules`]: the rules every peer enforces, evaluated at a change's causal past.
//! - [`model`]: typed views and typed edits of orders, capacity and designs.
//! - [`wire`]: versioned, size-limited messages.
//! - [`sync`]: the per-(peer, document) sync session and the [`Replica`] that
//!   owns documents and sessions for one enterprise.
//! - [`sim`]: a deterministic network simulator for tests.

#![warn(missing_docs)]

pub mod doc;
pub mod document;
pub mod error;
pub mod identity;
pub mod model;
pub mod rules;
pub mod sim;
pub mod sync;
pub mod wire;

pub use doc::{DocId, Genesis, Kind, Role, SignedGenesis, Visibility};
pub use document::{Accepted, ChangeBatch, Clock, Document};
pub use error::{DecodeError, EditError, GenesisError, IdError, IngestError, Rule, RuleViolation};
pub use identity::{Author, EnterpriseId, Keypair};
pub use sync::{Output, Replica};
