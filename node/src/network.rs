//! The libp2p side: transports, behaviours, the sync codec and the mapping
//! between enterprise ids and libp2p `PeerId`s.
//!
//! Owns: how bytes move between nodes. TCP and QUIC, noise, yamux, identify,
//! ping, mDNS (optional), Kademlia for peers beyond the LAN, gossipsub for
//! announcements, and a request-response protocol (`/cofab/sync/2`) carrying
//! [`cofab_protocol::wire::Frame`]s as length-prefixed bytes.
//! Must not: interpret frames (the event loop hands them to the replica).

use std::io;
use std::time::Duration;

use cofab_protocol::wire::MAX_FRAME_BYTES;
use cofab_protocol::{EnterpriseId, Keypair};
use futures::prelude::*;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    connection_limits, gossipsub, identify, identity, kad, mdns, noise, ping, request_response,
    tcp, yamux, PeerId, StreamProtocol, Swarm,
};

/// The sync protocol name.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/cofab/sync/2");
/// The gossipsub topic on which public documents are announced.
pub const ANNOUNCE_TOPIC: &str = "cofab/announce/1";
/// The gossipsub topic on which security alerts are published.
pub const ALERTS_TOPIC: &str = "cofab/alerts/1";
/// Most connections in total.
pub const MAX_CONNECTIONS: u32 = 256;
/// Most connections per peer.
pub const MAX_CONNECTIONS_PER_PEER: u32 = 2;

/// All behaviours of a cofab node.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Connection limits (total, per peer).
    pub limits: connection_limits::Behaviour,
    /// Document sync frames.
    pub sync: request_response::Behaviour<SyncCodec>,
    /// Announcements of public documents.
    pub gossip: gossipsub::Behaviour,
    /// Peer discovery beyond the LAN.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Exchange of listen addresses and protocols.
    pub identify: identify::Behaviour,
    /// Liveness.
    pub ping: ping::Behaviour,
    /// LAN discovery (off with `--no-mdns`).
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Length-prefixed frames: `u32 big-endian length | bytes`, at most [`MAX_FRAME_BYTES`].
/// The response is one status byte (0 = taken).
#[derive(Clone, Default)]
pub struct SyncCodec;

/// A sync request as read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncRequest {
    /// A frame within the size limit.
    Frame(Vec<u8>),
    /// The peer announced a frame of this many bytes, over [`MAX_FRAME_BYTES`]; its body
    /// was not read. Surfaced (instead of an IO error, which libp2p would drop silently)
    /// so that the node can count it against the peer.
    Oversized(usize),
}

/// Frames up to this size are written with their length prefix in one write (a copy of
/// the frame); bigger ones in two, without the copy.
const ONE_WRITE_MAX: usize = 64 * 1024;

async fn write_frame<T: AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    let len = (bytes.len() as u32).to_be_bytes();
    if bytes.len() <= ONE_WRITE_MAX {
        // One write: one yamux frame and one noise message, so the peer's connection
        // task wakes once for the frame, not once for the length and again for the rest.
        let mut buf = Vec::with_capacity(4 + bytes.len());
        buf.extend_from_slice(&len);
        buf.extend_from_slice(bytes);
        io.write_all(&buf).await?;
    } else {
        io.write_all(&len).await?;
        io.write_all(bytes).await?;
    }
    io.flush().await
}

impl request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = u8;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<SyncRequest> {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME_BYTES {
            return Ok(SyncRequest::Oversized(len));
        }
        let mut buf = vec![0u8; len];
        io.read_exact(&mut buf).await?;
        crate::node::hop("rd");
        Ok(SyncRequest::Frame(buf))
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<u8> {
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await?;
        Ok(b[0])
    }
    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: SyncRequest,
    ) -> io::Result<()> {
        match req {
            SyncRequest::Frame(bytes) => {
                crate::node::hop("wr0");
                let r = write_frame(io, &bytes).await;
                crate::node::hop("wr1");
                r
            }
            SyncRequest::Oversized(n) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("frame of {n} bytes over the limit"),
            )),
        }
    }
    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: u8,
    ) -> io::Result<()> {
        io.write_all(&[res]).await?;
        io.flush().await
    }
}

/// The libp2p keypair of an enterprise: the same ed25519 secret that signs changes.
pub fn libp2p_keypair(key: &Keypair) -> identity::Keypair {
    identity::Keypair::ed25519_from_bytes(key.secret_bytes()).expect("32-byte ed25519 secret")
}

/// The `PeerId` of an enterprise.
pub fn peer_id_of(id: &EnterpriseId) -> PeerId {
    let pk = identity::ed25519::PublicKey::try_from_bytes(id.as_bytes())
        .expect("enterprise ids are valid keys");
    identity::PublicKey::from(pk).to_peer_id()
}

/// The enterprise behind a `PeerId` (ed25519 peer ids embed the public key).
pub fn enterprise_of(peer: &PeerId) -> Option<EnterpriseId> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let pk = identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    let ed = pk.try_into_ed25519().ok()?;
    Some(EnterpriseId(ed.to_bytes()))
}

/// Builds the swarm for `key`.
pub fn build_swarm(
    key: &Keypair,
    enable_mdns: bool,
) -> Result<Swarm<Behaviour>, Box<dyn std::error::Error + Send + Sync>> {
    build_swarm_with_limit(key, enable_mdns, MAX_CONNECTIONS)
}

/// Builds the swarm for `key` with at most `max_connections` established connections.
pub fn build_swarm_with_limit(
    key: &Keypair,
    enable_mdns: bool,
    max_connections: u32,
) -> Result<Swarm<Behaviour>, Box<dyn std::error::Error + Send + Sync>> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(libp2p_keypair(key))
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_behaviour(|k| {
            let peer_id = k.public().to_peer_id();
            let gossip_cfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .max_transmit_size(256 * 1024)
                .build()
                .map_err(|e| io::Error::other(e.to_string()))?;
            let gossip = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(k.clone()),
                gossip_cfg,
            )
            .map_err(|e| io::Error::other(e.to_string()))?;
            let mut kad_cfg = kad::Config::new(StreamProtocol::new("/cofab/kad/1"));
            kad_cfg.set_query_timeout(Duration::from_secs(30));
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_cfg,
            );
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if enable_mdns {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_established(Some(max_connections))
                        .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER)),
                ),
                sync: request_response::Behaviour::with_codec(
                    SyncCodec,
                    [(SYNC_PROTOCOL, request_response::ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(30))
                        .with_max_concurrent_streams(256),
                ),
                gossip,
                kad,
                identify: identify::Behaviour::new(identify::Config::new(
                    "/cofab/1.0.0".into(),
                    k.public(),
                )),
                ping: ping::Behaviour::default(),
                mdns: Toggle::from(mdns),
            })
        })?
        // V1Lazy: a stream's first data goes out with its protocol proposal instead of after
        // the peer confirmed it (multistream-select V1 waits one round trip per new
        // stream, i.e. per sync frame). Every peer speaking to us is a cofab node with the
        // same protocols; an unsupported proposal still fails, one message later.
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(3600))
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_round_trips_to_enterprise() {
        let k = Keypair::from_secret([5; 32]);
        let pid = peer_id_of(&k.id());
        assert_eq!(pid, libp2p_keypair(&k).public().to_peer_id());
        assert_eq!(enterprise_of(&pid), Some(k.id()));
    }
}
