//! `cofab demo`: four companies on 127.0.0.1 with temporary data folders and
//! realistic sample documents (a buyer, two suppliers, a design house).
//! Owns: the sample data and the demo's lifecycle. Must not: persist anything
//! outside its temporary folders.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use cofab_protocol::model::{
    self, BidInput, Capability, CapacityInput, DesignInput, Machine, OrderInput,
};
use cofab_protocol::{Keypair, Role, Visibility};

use crate::config::{hex, random_secret};
use crate::node::{Node, NodeConfig, NodeHandle};

/// One running demo company.
pub struct DemoNode {
    /// Company name.
    pub name: String,
    /// Role in the demo.
    pub role: &'static str,
    /// Node handle.
    pub handle: NodeHandle,
    /// API address.
    pub api: SocketAddr,
    /// API token.
    pub token: String,
    /// Task of the node.
    pub task: tokio::task::JoinHandle<()>,
    /// Temporary data folder (removed on drop).
    pub dir: tempfile::TempDir,
}

/// Binds an API listener on 127.0.0.1, preferring `port`, else any free port.
pub async fn bind_api(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => Ok(l),
        Err(_) => tokio::net::TcpListener::bind(("127.0.0.1", 0)).await,
    }
}

/// Starts the four demo companies, connects them, seeds sample documents.
pub async fn start(base_port: u16) -> Result<Vec<DemoNode>, String> {
    let companies = [
        ("Nordwerk Automotive AG", "buyer"),
        ("Präzisionsteile Schwaben GmbH", "supplier"),
        ("Suzhou Rapid Manufacturing Co.", "supplier"),
        ("Studio Forma Engineering", "design house"),
    ];
    let mut nodes = Vec::new();
    for (i, (name, role)) in companies.iter().enumerate() {
        let dir = tempfile::Builder::new()
            .prefix("cofab-demo-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let key = Keypair::from_secret(random_secret());
        let mut cfg = NodeConfig::new(key, *name, dir.path().join("store"));
        cfg.tick = Duration::from_millis(500);
        let node = Node::start(cfg).await.map_err(|e| e.to_string())?;
        let token = hex(&random_secret());
        let listener = bind_api(base_port + i as u16)
            .await
            .map_err(|e| e.to_string())?;
        let api = listener.local_addr().map_err(|e| e.to_string())?;
        let app = crate::api::router(node.handle.clone(), token.clone());
        tokio::spawn(async move {
            let _ = axum::serve(
                axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                }),
                app,
            )
            .await;
        });
        nodes.push(DemoNode {
            name: name.to_string(),
            role,
            handle: node.handle,
            api,
            token,
            task: node.task,
            dir,
        });
    }
    for i in 0..nodes.len() {
        for j in (i + 1)..nodes.len() {
            let addr = nodes[j]
                .handle
                .listen_addrs()
                .await
                .map_err(|e| e.to_string())?[0]
                .clone();
            nodes[i]
                .handle
                .dial(addr)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    for n in &nodes {
        for _ in 0..100 {
            if n.handle
                .read(|c| c.peers.len())
                .await
                .map_err(|e| e.to_string())?
                >= 3
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    seed(&nodes).await?;
    Ok(nodes)
}

fn weeks(hours: [u32; 4]) -> BTreeMap<String, u32> {
    ["2026-W50", "2026-W51", "2026-W52", "2026-W53"]
        .iter()
        .zip(hours)
        .map(|(w, h)| (w.to_string(), h))
        .collect()
}

async fn seed(nodes: &[DemoNode]) -> Result<(), String> {
    let e = |i: usize| nodes[i].handle.info.enterprise_id;
    let (buyer, s1, s2, studio) = (
        &nodes[0].handle,
        &nodes[1].handle,
        &nodes[2].handle,
        &nodes[3].handle,
    );
    let cap1 = CapacityInput {
        name: nodes[1].name.clone(),
        region: Some("DE-BW".into()),
        certifications: vec!["ISO 9001:2015".into(), "IATF 16949:2016".into()],
        capabilities: vec![
            Capability {
                process: "cnc-milling".into(),
                materials: vec!["AL6061-T6".into(), "AL7075-T6".into(), "SS304".into()],
                max_part_mm: Some([600, 400, 350]),
                tolerance: Some("±0.01 mm".into()),
            },
            Capability {
                process: "cnc-turning".into(),
                materials: vec!["42CrMo4".into(), "SS316L".into()],
                max_part_mm: Some([300, 300, 500]),
                tolerance: Some("IT7".into()),
            },
        ],
        machines: vec![
            Machine {
                name: "DMG Mori DMU 50 (5-axis milling cell)".into(),
                process: "cnc-milling".into(),
                free_hours: weeks([32, 24, 40, 12]),
            },
            Machine {
                name: "Index G220 turn-mill".into(),
                process: "cnc-turning".into(),
                free_hours: weeks([16, 20, 20, 8]),
            },
        ],
        lead_time_days: Some(15),
        load_pct: Some(72),
    };
    s1.create(move |kp, now, n| model::create_capacity(kp, &cap1, now, n))
        .await
        .map_err(|e| e.to_string())?;
    let cap2 = CapacityInput {
        name: nodes[2].name.clone(),
        region: Some("CN-JS".into()),
        certifications: vec!["ISO 9001:2015".into(), "ISO 14001:2015".into()],
        capabilities: vec![
            Capability {
                process: "injection-molding".into(),
                materials: vec!["ABS".into(), "PC".into(), "PA66-GF30".into()],
                max_part_mm: Some([400, 300, 200]),
                tolerance: Some("ISO 2768-m".into()),
            },
            Capability {
                process: "additive-sls".into(),
                materials: vec!["PA12".into()],
                max_part_mm: Some([340, 340, 600]),
                tolerance: Some("±0.1 mm".into()),
            },
            Capability {
                process: "cnc-milling".into(),
                materials: vec!["AL6061-T6".into()],
                max_part_mm: Some([800, 500, 400]),
                tolerance: Some("±0.05 mm".into()),
            },
        ],
        machines: vec![Machine {
            name: "Haitian MA 1600 (160 t)".into(),
            process: "injection-molding".into(),
            free_hours: weeks([80, 96, 60, 40]),
        }],
        lead_time_days: Some(25),
        load_pct: Some(55),
    };
    s2.create(move |kp, now, n| model::create_capacity(kp, &cap2, now, n))
        .await
        .map_err(|e| e.to_string())?;
    let design = DesignInput {
        title: "Sensor housing, rev B".into(),
        description: "Two-part housing for the ultrasonic park sensor. Wall 2.0 mm, draft 1.5°, snap-fit on the long side. Seal groove per drawing SH-204.".into(),
        visibility: Visibility::Members,
        members: [(e(0), Role::Approver), (e(2), Role::Viewer)].into_iter().collect(),
    };
    let design_id = studio
        .create(move |kp, now, n| model::create_design(kp, &design, now, n))
        .await
        .map_err(|e| e.to_string())?;
    studio
        .edit(design_id, |d, kp, now| {
            model::set_parameter(d, kp, now, "wall_thickness", 2.0, "mm")
        })
        .await
        .map_err(|e| e.to_string())?;
    let order = OrderInput {
        title: "Bracket, anodised aluminium".into(),
        quantity: 500,
        material: Some("AL6061-T6".into()),
        processes: vec!["cnc-milling".into(), "surface-finishing".into()],
        tolerance: Some("ISO 2768-m".into()),
        certifications: vec!["ISO 9001:2015".into()],
        due_date: Some("2027-03-01".into()),
        ship_to: Some("DE-BY".into()),
        incoterms: Some("DAP".into()),
        target_price: Some(4.5),
        currency: Some("EUR".into()),
        description: Some("Anodised black, Ra 1.6 on mating faces. CoC and material certificate EN 10204 3.1 required.".into()),
        ..Default::default()
    };
    let order_id = buyer
        .create(move |kp, now, n| model::create_order(kp, &order, now, n))
        .await
        .map_err(|e| e.to_string())?;
    let private = OrderInput {
        title: "Gear housing, die-cast (confidential)".into(),
        quantity: 2000,
        material: Some("AlSi10Mg".into()),
        processes: vec!["die-casting".into(), "cnc-milling".into()],
        due_date: Some("2027-05-15".into()),
        visibility: Visibility::Members,
        members: [(e(1), Role::Supplier)].into_iter().collect(),
        ..Default::default()
    };
    buyer
        .create(move |kp, now, n| model::create_order(kp, &private, now, n))
        .await
        .map_err(|e| e.to_string())?;
    // Suppliers bid once the order has reached them.
    for (h, price, lead) in [(s1, 4.35, 18u32), (s2, 3.9, 30u32)] {
        for _ in 0..100 {
            if h.read(move |c| c.replica.doc(&order_id).is_some())
                .await
                .map_err(|e| e.to_string())?
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let bid = BidInput {
            unit_price: price,
            currency: "EUR".into(),
            lead_time_days: lead,
            quantity: Some(500),
            valid_until: Some("2027-01-31".into()),
            ..Default::default()
        };
        h.edit(order_id, move |d, kp, now| {
            model::place_bid(d, kp, now, &bid)
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}
