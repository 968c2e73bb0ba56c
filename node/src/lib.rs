//! # cofab-node: the IO shell around `cofab-protocol`
//!
//! - [`network`]: libp2p transports, behaviours and the sync codec.
//! - [`store`]: the sled store with group commit.
//! - [`node`]: the event loop that owns swarm, replica and store, and the
//!   cloneable [`NodeHandle`] everything else uses.
//! - [`api`]: the HTTP API (`/api/v1`), event stream, metrics and console.
//! - [`config`]: the data folder (key, token, config file).
//! - [`demo`]: a local network of four companies with sample documents.
//! - [`client`]: the HTTP client the CLI uses.

pub mod api;
pub mod bench;
pub mod client;
pub mod config;
pub mod demo;
pub mod network;
pub mod node;
pub mod store;
pub mod wal;

/// The libp2p this node is built on (its `PeerId` and `Multiaddr` are in the public API; test peers use it).
pub use libp2p;
pub use node::{Event, Node, NodeConfig, NodeError, NodeHandle};
