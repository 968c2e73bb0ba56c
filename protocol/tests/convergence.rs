//! Randomised convergence: many seeds of concurrent edits of every document kind on
//! 2..=18 simulated peers (one run in five above the forwarding fan-out), under message drop, duplication, delay (reordering),
//! partitions and crash/restart. After healing, every peer that holds a document and
//! may hold it must have the same heads and the same typed view, and every peer that
//! may hold a document must have it.
//!
//! `COFAB_SIM_SEEDS=N` runs N seeds (default 500); `COFAB_SIM_SEED=S` replays one seed.
//! Every assertion message names the seed.

use std::collections::BTreeMap;

use cofab_protocol::model::{
    self, BidInput, CapacityInput, DesignInput, OrderInput, ProgressInput, Splice,
};
use cofab_protocol::rules::STATUSES;
use cofab_protocol::sim::{Faults, SimNetwork};
use cofab_protocol::sync::ReplicaError;
use cofab_protocol::{DocId, Document, EnterpriseId, Kind, Role, Visibility};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DEFAULT_SEEDS: u64 = 500;
const MAX_STEPS: usize = 400_000;

/// What happened in one seed, summed over all seeds for the final report.
#[derive(Default, Debug)]
struct Tally {
    edits_ok: u64,
    edits_refused: u64,
    docs: u64,
    crashes: u64,
    /// Local writes the crashes lost (sent, maybe held by peers, not yet durable).
    writes_lost: u64,
    partitions: u64,
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("COFAB_SIM_SEED") {
        return vec![s.trim().parse().expect("COFAB_SIM_SEED is a u64")];
    }
    let n = std::env::var("COFAB_SIM_SEEDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_SEEDS);
    (0..n).collect()
}

fn order_input(
    rng: &mut StdRng,
    visibility: Visibility,
    members: BTreeMap<EnterpriseId, Role>,
) -> OrderInput {
    OrderInput {
        title: format!("Part {}", rng.random_range(0..1000)),
        quantity: rng.random_range(1..=1000),
        material: Some("AL6061-T6".into()),
        processes: vec!["cnc-milling".into()],
        status: if rng.random_bool(0.2) {
            Some("draft".into())
        } else {
            None
        },
        visibility,
        members,
        ..Default::default()
    }
}

fn capacity_input(rng: &mut StdRng) -> CapacityInput {
    CapacityInput {
        name: format!("Shop {}", rng.random_range(0..100)),
        region: Some("DE-BW".into()),
        machines: vec![model::Machine {
            name: "5-axis cell".into(),
            process: "cnc-milling".into(),
            free_hours: [("2027-W09".to_string(), rng.random_range(0..=168))]
                .into_iter()
                .collect(),
        }],
        lead_time_days: Some(rng.random_range(1..60)),
        load_pct: Some(rng.random_range(0..=100)),
        ..Default::default()
    }
}

/// Picks a random subset of the other nodes with roles from `roles`.
fn random_members(
    rng: &mut StdRng,
    ids: &[EnterpriseId],
    owner: usize,
    roles: &[Role],
) -> BTreeMap<EnterpriseId, Role> {
    let mut m = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        if i != owner && rng.random_bool(0.5) {
            m.insert(*id, roles[rng.random_range(0..roles.len())]);
        }
    }
    m
}

struct Run {
    net: SimNetwork,
    rng: StdRng,
    ids: Vec<EnterpriseId>,
    docs: Vec<(DocId, Kind, usize)>,
    tally: Tally,
}

impl Run {
    fn up_nodes(&self) -> Vec<usize> {
        (0..self.net.nodes.len())
            .filter(|i| self.net.nodes[*i].up)
            .collect()
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.rng.random_range(0..items.len())])
    }

    /// Runs a typed edit on node `n`'s copy of `id`; a local refusal is counted, not failed.
    fn edit(
        &mut self,
        n: usize,
        id: DocId,
        f: impl FnOnce(
            &mut Document,
            &cofab_protocol::Keypair,
            i64,
        ) -> Result<cofab_protocol::Accepted, cofab_protocol::EditError>,
    ) {
        let seed = self.net.seed;
        let res = self.net.act(n, |r, now| match r.edit(&id, now, f) {
            Ok((_, outs)) => (Ok(()), outs),
            Err(e) => (Err(e), Vec::new()),
        });
        match res {
            Ok(()) => self.tally.edits_ok += 1,
            Err(ReplicaError::Edit(_)) => self.tally.edits_refused += 1,
            Err(e) => panic!("seed {seed}: unexpected replica error {e}"),
        }
    }

    fn create(&mut self) {
        let up = self.up_nodes();
        let Some(n) = self.pick(&up) else { return };
        let nonce: u64 = self.rng.random();
        let kind = [Kind::Order, Kind::Capacity, Kind::Design][self.rng.random_range(0..3)];
        let visibility = if self.rng.random_bool(0.5) {
            Visibility::Public
        } else {
            Visibility::Members
        };
        let ids = self.ids.clone();
        let (doc, acc) = match kind {
            Kind::Order => {
                let members = random_members(
                    &mut self.rng,
                    &ids,
                    n,
                    &[Role::Supplier, Role::Supplier, Role::Viewer],
                );
                let input = order_input(&mut self.rng, visibility, members);
                let now = self.net.now_ms;
                model::create_order(self.net.nodes[n].replica.keypair(), &input, now, nonce)
            }
            Kind::Capacity => {
                let input = capacity_input(&mut self.rng);
                let now = self.net.now_ms;
                model::create_capacity(self.net.nodes[n].replica.keypair(), &input, now, nonce)
            }
            Kind::Design => {
                let members = random_members(
                    &mut self.rng,
                    &ids,
                    n,
                    &[Role::Editor, Role::Approver, Role::Viewer],
                );
                let input = DesignInput {
                    title: "Housing".into(),
                    description: "abc".into(),
                    visibility,
                    members,
                };
                let now = self.net.now_ms;
                model::create_design(self.net.nodes[n].replica.keypair(), &input, now, nonce)
            }
        }
        .unwrap_or_else(|e| panic!("seed {}: creating a {kind:?}: {e}", self.net.seed));
        let id = doc.id();
        self.net.act(n, |r, _| ((), r.create(doc, acc)));
        self.docs.push((id, kind, n));
        self.tally.docs += 1;
    }

    /// A random typed edit by a random up node that holds a random document.
    fn random_edit(&mut self) {
        let docs = self.docs.clone();
        let Some((id, kind, owner)) = self.pick(&docs) else {
            return;
        };
        let holders: Vec<usize> = self
            .up_nodes()
            .into_iter()
            .filter(|i| self.net.nodes[*i].replica.doc(&id).is_some())
            .collect();
        let Some(n) = self.pick(&holders) else { return };
        let r = self.rng.random_range(0..100u32);
        let other = self.ids[self.rng.random_range(0..self.ids.len())];
        match kind {
            Kind::Order => match r {
                0..=29 => {
                    let bid = BidInput {
                        unit_price: self.rng.random_range(1..1000) as f64 / 10.0,
                        currency: "EUR".into(),
                        lead_time_days: self.rng.random_range(1..90),
                        ..Default::default()
                    };
                    self.edit(n, id, |d, kp, now| model::place_bid(d, kp, now, &bid));
                }
                30..=44 => {
                    // award some of the current bidders (as this node sees them)
                    let bidders: Vec<String> = self.net.nodes[n]
                        .replica
                        .doc(&id)
                        .and_then(model::order_view)
                        .map(|v| v.bids.keys().cloned().collect())
                        .unwrap_or_default();
                    let mut awards = BTreeMap::new();
                    for b in bidders {
                        if self.rng.random_bool(0.6) {
                            awards.insert(
                                b.parse::<EnterpriseId>().unwrap(),
                                self.rng.random_range(1..500u64),
                            );
                        }
                    }
                    self.edit(n, id, |d, kp, now| model::award(d, kp, now, &awards));
                }
                45..=59 => {
                    let s = STATUSES[self.rng.random_range(0..STATUSES.len())];
                    self.edit(n, id, |d, kp, now| model::set_status(d, kp, now, s));
                }
                60..=74 => {
                    let p = ProgressInput {
                        produced: Some(self.rng.random_range(0..500)),
                        scrapped: self
                            .rng
                            .random_bool(0.3)
                            .then(|| self.rng.random_range(0..10)),
                        milestone: self
                            .rng
                            .random_bool(0.5)
                            .then(|| "first article".to_string()),
                        machine_status: Some("running".into()),
                        ..Default::default()
                    };
                    self.edit(n, id, |d, kp, now| model::report_progress(d, kp, now, &p));
                }
                75..=89 => {
                    let text = format!("note {}", self.rng.random_range(0..1000));
                    self.edit(n, id, |d, kp, now| model::comment(d, kp, now, &text));
                }
                _ => self.membership_edit(n, id, owner, other, &[Role::Supplier, Role::Viewer]),
            },
            Kind::Capacity => {
                let input = capacity_input(&mut self.rng);
                self.edit(n, id, |d, kp, now| {
                    model::update_capacity(d, kp, now, &input)
                });
            }
            Kind::Design => match r {
                0..=44 => {
                    let len = self.net.nodes[n]
                        .replica
                        .doc(&id)
                        .and_then(model::design_view)
                        .map(|v| v.description.chars().count())
                        .unwrap_or(0);
                    let pos = self.rng.random_range(0..=len);
                    let delete = if pos < len && self.rng.random_bool(0.3) {
                        self.rng.random_range(0..=(len - pos).min(3))
                    } else {
                        0
                    };
                    let insert: String = (0..self.rng.random_range(0..4))
                        .map(|_| self.rng.random_range(b'a'..=b'z') as char)
                        .collect();
                    let s = Splice {
                        pos,
                        delete,
                        insert,
                    };
                    self.edit(n, id, |d, kp, now| {
                        model::splice_description(d, kp, now, &s)
                    });
                }
                45..=59 => {
                    let name = ["length", "width", "wall"][self.rng.random_range(0..3)];
                    let value = self.rng.random_range(1..1000) as f64 / 4.0;
                    self.edit(n, id, |d, kp, now| {
                        model::set_parameter(d, kp, now, name, value, "mm")
                    });
                }
                60..=74 => {
                    let text = format!("comment {}", self.rng.random_range(0..1000));
                    self.edit(n, id, |d, kp, now| model::comment(d, kp, now, &text));
                }
                75..=87 => {
                    let name = format!("rev-{}", self.rng.random_range(0..10));
                    self.edit(n, id, |d, kp, now| model::release(d, kp, now, &name));
                }
                _ => self.membership_edit(
                    n,
                    id,
                    owner,
                    other,
                    &[Role::Editor, Role::Approver, Role::Viewer],
                ),
            },
        }
    }

    fn membership_edit(
        &mut self,
        n: usize,
        id: DocId,
        owner: usize,
        who: EnterpriseId,
        roles: &[Role],
    ) {
        // Mostly by the owner; sometimes by someone else (refused locally).
        // (The owner may have lost a document it just created in a crash.)
        let n = if self.rng.random_bool(0.8)
            && self.net.nodes[owner].up
            && self.net.nodes[owner].replica.doc(&id).is_some()
        {
            owner
        } else {
            n
        };
        if who == self.ids[owner] {
            return;
        }
        let role = if self.rng.random_bool(0.4) {
            None
        } else {
            Some(roles[self.rng.random_range(0..roles.len())])
        };
        self.edit(n, id, |d, kp, now| model::set_member(d, kp, now, who, role));
    }

    fn random_partition(&mut self) {
        let n = self.net.nodes.len();
        let groups = self.rng.random_range(2..=3.min(n));
        let mut g: Vec<Vec<usize>> = vec![Vec::new(); groups];
        for i in 0..n {
            g[self.rng.random_range(0..groups)].push(i);
        }
        self.net.partition(&g);
        self.tally.partitions += 1;
    }

    fn run_some(&mut self) {
        let k = self.rng.random_range(0..40);
        for _ in 0..k {
            if !self.net.step() {
                break;
            }
        }
    }
}

fn run_seed(seed: u64) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_c0fa_b000_0000);
    let faults = Faults {
        drop: [0.0, 0.05, 0.2][rng.random_range(0..3)],
        duplicate: [0.0, 0.05, 0.2][rng.random_range(0..3)],
        max_delay_ms: rng.random_range(0..=50),
    };
    let mut net = SimNetwork::new(seed, faults);
    // Some networks are larger than one forwarding fan-out and one tick's visits, so
    // that delivery through bounded forwarding and rotating ticks is exercised too.
    let n = if rng.random_bool(0.2) {
        rng.random_range(11..=18)
    } else {
        rng.random_range(2..=10)
    };
    for _ in 0..n {
        net.add_node();
    }
    let ids = (0..n).map(|i| net.id(i)).collect();
    let mut run = Run {
        net,
        rng,
        ids,
        docs: Vec::new(),
        tally: Tally::default(),
    };
    let initial = run.rng.random_range(1..=3);
    for _ in 0..initial {
        run.create();
    }
    let actions = run.rng.random_range(10..30);
    for _ in 0..actions {
        match run.rng.random_range(0..100u32) {
            0..=7 => run.create(),
            8..=59 => run.random_edit(),
            60..=74 => run.run_some(),
            75..=81 => run.random_partition(),
            82..=85 => run.net.heal(),
            86..=91 => {
                let up = run.up_nodes();
                if let Some(i) = run.pick(&up) {
                    run.net.crash(i);
                    run.tally.crashes += 1;
                }
            }
            92..=95 => {
                let down: Vec<usize> = (0..n).filter(|i| !run.net.nodes[*i].up).collect();
                if let Some(i) = run.pick(&down) {
                    run.net.restart(i);
                }
            }
            _ => {
                let up = run.up_nodes();
                if let Some(i) = run.pick(&up) {
                    run.net.act(i, |r, _| ((), r.tick()));
                }
            }
        }
    }
    run.net.heal();
    for i in 0..n {
        if !run.net.nodes[i].up {
            run.net.restart(i);
        }
    }
    let net = &mut run.net;
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        net.run_until_quiescent(MAX_STEPS)
    })) {
        eprintln!(
            "seed {seed}: rejections seen: {:?}",
            &net.rejections[..net.rejections.len().min(20)]
        );
        dump(net, &run.docs);
        std::panic::resume_unwind(e);
    }
    check_converged(&run.net, &run.docs);
    run.tally.writes_lost = run.net.writes_lost;
    run.tally
}

/// Prints who holds what, for diagnosing a failed seed.
fn dump(net: &SimNetwork, docs: &[(DocId, Kind, usize)]) {
    for &(id, kind, owner) in docs {
        let reference = net.nodes[owner].replica.doc(&id);
        eprintln!(
            "doc {id} {kind:?} owner {owner} vis {:?}",
            reference.map(|d| d.genesis().visibility)
        );
        for (i, node) in net.nodes.iter().enumerate() {
            let may = reference.map(|d| d.may_hold(&net.id(i)));
            let held = node.replica.doc(&id);
            let sessions: Vec<String> = (0..net.nodes.len())
                .filter_map(|j| {
                    node.replica.session(&net.id(j), &id).map(|s| {
                        format!(
                            "{j}:{}{}{}",
                            if s.failed { "F" } else { "" },
                            if s.declined { "D" } else { "" },
                            s.confirmed
                                .as_ref()
                                .map(|c| format!("{:?}", c.values().collect::<Vec<_>>()))
                                .unwrap_or("?".into())
                        )
                    })
                })
                .collect();
            eprintln!(
                "  node {i} up {} may {may:?} holds {:?} roleview {:?} sessions {sessions:?}",
                node.up,
                held.map(|d| d.clock().values().copied().collect::<Vec<_>>()),
                held.map(|d| d.may_hold(&net.id(i)))
            );
        }
    }
}

/// Every node that may hold a document (judged by its owner's copy) has it, and all of
/// them have identical heads and views. An owner can lose a document it created only in a
/// crash before the creation was durable; then no node may hold its content either (had
/// any peer got it, the owner would have got it back).
fn check_converged(net: &SimNetwork, docs: &[(DocId, Kind, usize)]) {
    let seed = net.seed;
    for &(id, kind, owner) in docs {
        let Some(reference) = net.nodes[owner].replica.doc(&id) else {
            // (A peer may keep the genesis it was offered, without content.)
            let holders: Vec<usize> = (0..net.nodes.len())
                .filter(|i| {
                    net.nodes[*i]
                        .replica
                        .doc(&id)
                        .is_some_and(|d| !d.is_empty())
                })
                .collect();
            assert!(
                holders.is_empty(),
                "seed {seed}: owner {owner} lost {id}, which nodes {holders:?} hold"
            );
            continue;
        };
        let ref_heads = reference.heads();
        for (i, node) in net.nodes.iter().enumerate() {
            let may_hold = reference.may_hold(&net.id(i));
            let held = node.replica.doc(&id);
            match (may_hold, held) {
                (true, None) => panic!(
                    "seed {seed}: node {i} may hold {kind:?} {id} ({:?}) but does not have it",
                    reference.genesis().visibility
                ),
                (true, Some(d)) => {
                    assert_eq!(
                        d.heads(),
                        ref_heads,
                        "seed {seed}: node {i} heads differ from owner {owner} for {kind:?} {id}"
                    );
                    assert_eq!(
                        d.clock(),
                        reference.clock(),
                        "seed {seed}: node {i} clock differs for {id}"
                    );
                    match kind {
                        Kind::Order => assert_eq!(
                            model::order_view(d),
                            model::order_view(reference),
                            "seed {seed}: order view differs at node {i}"
                        ),
                        Kind::Capacity => assert_eq!(
                            model::capacity_view(d),
                            model::capacity_view(reference),
                            "seed {seed}: capacity view differs at node {i}"
                        ),
                        Kind::Design => assert_eq!(
                            model::design_view(d),
                            model::design_view(reference),
                            "seed {seed}: design view differs at node {i}"
                        ),
                    }
                }
                // A member removed while partitioned may keep a stale copy: nobody sends it more.
                (false, _) => {}
            }
        }
    }
}

/// Random concurrent edits of orders, capacity and designs under drops, duplicates,
/// reordering, partitions and crashes always converge once the network heals.
#[test]
fn random_concurrent_edits_converge_after_faults_heal() {
    let mut total = Tally::default();
    for seed in seeds() {
        let t = std::panic::catch_unwind(|| run_seed(seed)).unwrap_or_else(|e| {
            eprintln!("convergence failed for seed {seed}; replay with COFAB_SIM_SEED={seed}");
            std::panic::resume_unwind(e)
        });
        total.edits_ok += t.edits_ok;
        total.edits_refused += t.edits_refused;
        total.docs += t.docs;
        total.crashes += t.crashes;
        total.writes_lost += t.writes_lost;
        total.partitions += t.partitions;
    }
    eprintln!("convergence: {total:?}");
    // The generator must exercise both accepted and locally refused edits.
    if seeds().len() >= 50 {
        assert!(
            total.edits_ok > 0 && total.edits_refused > 0,
            "generator degenerate: {total:?}"
        );
    }
}
