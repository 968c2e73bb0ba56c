//! Security alerts: a node that refuses a peer's input publishes a signed alert; a node
//! that trusts the reporter bans the offender; an alert cannot be published in another
//! enterprise's name.

mod common;

use std::time::Duration;

use cofab_node::libp2p::futures::StreamExt;
use cofab_node::libp2p::{gossipsub, swarm::SwarmEvent, Multiaddr, PeerId};
use cofab_node::network::{build_swarm, SyncRequest, ALERTS_TOPIC};
use cofab_protocol::wire::{Alert, Frame};
use cofab_protocol::EnterpriseId;
use common::*;
use tokio::sync::mpsc;

enum Cmd {
    Dial(Multiaddr),
    Garbage(PeerId),
    Publish(Vec<u8>),
}

/// A misbehaving peer: its own key, the node's own swarm builder, driven by commands.
fn spawn_attacker(
    key: cofab_protocol::Keypair,
) -> (mpsc::UnboundedSender<Cmd>, mpsc::UnboundedReceiver<String>) {
    let mut swarm = build_swarm(&key, false).expect("swarm");
    let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let topic = gossipsub::IdentTopic::new(ALERTS_TOPIC);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(Cmd::Dial(a)) => { let _ = swarm.dial(a); }
                    Some(Cmd::Garbage(p)) => { swarm.behaviour_mut().sync.send_request(&p, SyncRequest::Frame(vec![cofab_protocol::wire::WIRE_VERSION, 99, 7, 7])); }
                    Some(Cmd::Publish(bytes)) => {
                        let r = swarm.behaviour_mut().gossip.publish(topic.clone(), bytes);
                        let _ = ev_tx.send(format!("published {}", r.is_ok()));
                    }
                },
                ev = swarm.select_next_some() => {
                    if let SwarmEvent::ConnectionEstablished { peer_id, .. } = ev {
                        let _ = ev_tx.send(format!("connected {peer_id}"));
                    }
                }
            }
        }
    });
    (tx, ev_rx)
}

async fn alerts(n: &TestNode) -> Vec<cofab_node::node::AlertRecord> {
    n.handle()
        .read(|c| c.alerts.iter().cloned().collect())
        .await
        .unwrap()
}
async fn banned(n: &TestNode) -> Vec<String> {
    n.handle().read(|c| c.banned.clone()).await.unwrap()
}

/// A refuses garbage from M and publishes an alert; B trusts A, so B bans M too.
/// M then publishes an "alert" of its own: it is recorded under M's name (gossip
/// signatures bind the reporter), and A, which trusts only B, does not act on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_from_trusted_reporters_ban_and_cannot_be_forged() {
    let nodes = start_net("alerts", 2);
    let nodes = nodes.await;
    let (a, b) = (&nodes[0], &nodes[1]);
    b.handle()
        .set_alert_trust([a.key.id()].into_iter().collect())
        .await
        .unwrap();
    a.handle()
        .set_alert_trust([b.key.id()].into_iter().collect())
        .await
        .unwrap();
    let m_key = test_key("alerts", 9);
    let m_peer = cofab_node::network::peer_id_of(&m_key.id());
    let (m, mut m_events) = spawn_attacker(m_key.clone());
    for n in [a, b] {
        m.send(Cmd::Dial(
            n.handle().listen_addrs().await.unwrap()[0].clone(),
        ))
        .unwrap();
    }
    let mut connected = 0;
    while connected < 2 {
        let e = tokio::time::timeout(DEADLINE, m_events.recv())
            .await
            .expect("attacker connects")
            .unwrap();
        connected += usize::from(e.starts_with("connected"));
    }
    // Give gossipsub a moment to exchange subscriptions, then misbehave towards A only.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    m.send(Cmd::Garbage(a.handle().info.peer_id)).unwrap();

    let m_id = m_key.id().to_string();
    wait_until(DEADLINE, || async {
        alerts(b).await.iter().any(|r| r.offender == m_id)
    })
    .await;
    let seen = alerts(b).await;
    let r = seen.iter().find(|r| r.offender == m_id).unwrap();
    assert_eq!(r.reporter, a.key.id().to_string(), "the reporter is A");
    assert_eq!(r.reason, "malformed_frame");
    assert!(r.acted && !r.ours);
    assert!(
        banned(b).await.contains(&m_peer.to_string()),
        "B banned the peer A reported"
    );
    assert!(
        alerts(a).await.iter().any(|r| r.ours && r.offender == m_id),
        "A lists the alert it published"
    );

    // Forgery attempt: M publishes an alert naming an honest enterprise Z.
    let z = EnterpriseId(test_key("alerts", 10).id().0);
    let forged = Frame::Alert(Alert {
        offender: z,
        reason: "bad_signature".into(),
        evidence: [0; 32],
        at_ms: 0,
    })
    .encode();
    let z_str = z.to_string();
    wait_until(DEADLINE, || async {
        m.send(Cmd::Publish(forged.clone())).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        alerts(a).await.iter().any(|r| r.offender == z_str)
    })
    .await;
    let rec = alerts(a)
        .await
        .into_iter()
        .find(|r| r.offender == z_str)
        .unwrap();
    assert_eq!(
        rec.reporter, m_id,
        "an alert is attributed to its real sender, whatever it claims"
    );
    assert!(!rec.acted, "A does not act on an untrusted reporter");
    assert!(!banned(a)
        .await
        .contains(&cofab_node::network::peer_id_of(&z).to_string()));
    for n in nodes {
        n.handle().shutdown().await;
    }
}
