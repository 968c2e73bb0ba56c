//! The rules every peer enforces on every change, evaluated against the change's
//! own causal past (its deps), never against what the receiver happens to hold, so
//! every peer reaches the same accept/reject decision whatever order changes arrive in.
//!
//! Owns: the per-kind write rules, the order status lifecycle, and reading a
//! change's operations as paths ([`Target`]). Local typed edits are checked by the
//! same [`check_change`] after they are committed, so a local write can never be
//! one that peers reject.
//! Must not: apply anything, or depend on arrival order, wall clock or local config.

use std::collections::HashMap;

use automerge::{
    ActorId, Automerge, Change, ChangeHash, ObjId, Prop, ReadDoc, ScalarValue, Value, ROOT,
};

use crate::doc::{Genesis, Kind, Role, Visibility};
use crate::error::{Rule, RuleViolation};
use crate::identity::{Author, EnterpriseId};

/// Order status lifecycle, in order of precedence when concurrent moves conflict.
pub const STATUSES: [&str; 7] = [
    "draft",
    "open",
    "awarded",
    "in_production",
    "shipped",
    "accepted",
    "cancelled",
];

/// Whether `to` may follow `from` in the order lifecycle.
pub fn status_transition_ok(from: &str, to: &str) -> bool {
    matches!(
        (from, to),
        ("draft", "open")
            | ("open", "awarded")
            | ("awarded", "in_production")
            | ("in_production", "shipped")
            | ("shipped", "accepted")
            | ("draft" | "open" | "awarded" | "in_production", "cancelled")
    )
}

/// Rank of a status (position in [`STATUSES`]); unknown values rank lowest.
pub fn status_rank(s: &str) -> usize {
    STATUSES
        .iter()
        .position(|x| *x == s)
        .map(|i| i + 1)
        .unwrap_or(0)
}

/// One operation of a change, seen as the map path it writes.
#[derive(Debug, Clone)]
pub struct Target {
    /// Path from the root; list positions appear as `#`.
    pub path: Vec<String>,
    /// The scalar written, for puts.
    pub value: Option<ScalarValue>,
    /// Whether the op deletes.
    pub delete: bool,
}

fn scalar_str(v: &Value<'_>) -> Option<String> {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(s) => Some(s.to_string()),
            _ => None,
        },
        _ => None,
    }
}

fn map_at(doc: &Automerge, key: &str, heads: &[ChangeHash]) -> Option<ObjId> {
    match doc.get_at(ROOT, key, heads) {
        Ok(Some((Value::Object(_), id))) => Some(id),
        _ => None,
    }
}

/// The role of `who` at `heads`: owner from the genesis, then the `members` map, then the genesis members.
pub fn role_at(
    doc: &Automerge,
    g: &Genesis,
    who: &EnterpriseId,
    heads: &[ChangeHash],
) -> Option<Role> {
    if *who == g.owner {
        return Some(Role::Owner);
    }
    if let Some(members) = map_at(doc, "members", heads) {
        if let Ok(Some((v, _))) = doc.get_at(&members, who.to_string(), heads) {
            return scalar_str(&v).and_then(|r| Role::parse(&r));
        }
    }
    g.members.get(who).copied()
}

/// The order status at `heads` as every peer reads it: among conflicting values, the
/// one furthest along [`STATUSES`] (so `cancelled` wins any conflict).
pub fn status_at(doc: &Automerge, heads: &[ChangeHash]) -> Option<String> {
    let all = doc.get_all_at(ROOT, "status", heads).ok()?;
    all.iter()
        .filter_map(|(v, _)| scalar_str(v))
        .max_by_key(|s| (status_rank(s), s.clone()))
}

/// Whether the status at `heads` has more than one concurrent value.
pub fn status_conflicted(doc: &Automerge, heads: &[ChangeHash]) -> bool {
    doc.get_all_at(ROOT, "status", heads)
        .map(|v| v.len() > 1)
        .unwrap_or(false)
}

fn key_present_at(doc: &Automerge, container: &str, key: &str, heads: &[ChangeHash]) -> bool {
    map_at(doc, container, heads)
        .map(|m| matches!(doc.get_at(&m, key, heads), Ok(Some(_))))
        .unwrap_or(false)
}

/// Paths of objects already resolved. An automerge object never moves once created
/// (its parent and key are fixed by the op that made it), so a path found once holds
/// for good; walking an object's parents is the dearest part of a rule check.
#[derive(Clone, Debug, Default)]
pub struct PathCache {
    known: HashMap<(u64, ActorId), Vec<String>>,
}

impl PathCache {
    /// Adds paths found while checking changes that were then accepted.
    pub fn extend(&mut self, fresh: PathCache) {
        if self.known.len() < MAX_CACHED_PATHS {
            self.known.extend(fresh.known);
        }
    }
}

/// Bound on a document's path cache (objects beyond it are resolved each time).
const MAX_CACHED_PATHS: usize = 4096;

/// Reads a change's operations as paths. `doc` must already contain the change.
/// Paths are looked up in `known` (from accepted changes) and `fresh`; new ones go to
/// `fresh`, which the caller keeps only if the changes are accepted.
pub fn targets_of(
    doc: &Automerge,
    change: &Change,
    known: &PathCache,
    fresh: &mut PathCache,
) -> Result<Vec<Target>, String> {
    let expanded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change.decode()))
        .map_err(|_| "change does not decode".to_string())?;
    let mut out = Vec::with_capacity(expanded.operations.len());
    for op in expanded.operations {
        let mut path = match op.obj {
            automerge::legacy::ObjectId::Root => Vec::new(),
            automerge::legacy::ObjectId::Id(automerge::legacy::OpId(ctr, actor)) => {
                let key = (ctr, actor);
                match known.known.get(&key).or_else(|| fresh.known.get(&key)) {
                    Some(p) => p.clone(),
                    None => {
                        let exid = ObjId::Id(ctr, key.1.clone(), usize::MAX);
                        let parents = doc
                            .parents(&exid)
                            .map_err(|e| format!("unknown object: {e}"))?;
                        let p: Vec<String> = parents
                            .path()
                            .into_iter()
                            .map(|(_, p)| match p {
                                Prop::Map(k) => k,
                                Prop::Seq(_) => "#".to_string(),
                            })
                            .collect();
                        fresh.known.insert(key, p.clone());
                        p
                    }
                }
            }
        };
        path.push(match &op.key {
            automerge::legacy::Key::Map(k) => k.to_string(),
            automerge::legacy::Key::Seq(_) => "#".to_string(),
        });
        let (value, delete) = match &op.action {
            automerge::legacy::OpType::Put(v) => (Some(v.clone()), false),
            automerge::legacy::OpType::Delete => (None, true),
            _ => (None, false),
        };
        out.push(Target {
            path,
            value,
            delete,
        });
    }
    Ok(out)
}

/// The facts a rule check needs about one change.
pub struct Ctx<'a> {
    /// A document that contains the change and its whole causal past.
    pub doc: &'a Automerge,
    /// The document's genesis.
    pub genesis: &'a Genesis,
    /// The author (bound to the change's actor).
    pub author: EnterpriseId,
    /// The change's deps: its causal past.
    pub deps: &'a [ChangeHash],
}

impl Ctx<'_> {
    fn violation(&self, rule: Rule, path: &[String]) -> RuleViolation {
        RuleViolation {
            rule,
            path: path.join("/"),
            author: self.author,
        }
    }
    fn is_init(&self) -> bool {
        self.deps.is_empty()
    }
}

/// The decisions that need no op decoding (they keep a 100k-change design sync cheap):
/// `Some(result)` when the author and kind alone decide, `None` when the ops must be read.
pub fn check_without_ops(
    genesis: &Genesis,
    author: &EnterpriseId,
    is_init: bool,
) -> Option<Result<(), RuleViolation>> {
    let v = |rule| {
        Err(RuleViolation {
            rule,
            path: String::new(),
            author: *author,
        })
    };
    if is_init && *author != genesis.owner {
        return Some(v(Rule::InitByOwnerOnly));
    }
    match genesis.kind {
        Kind::Capacity if *author == genesis.owner => Some(Ok(())),
        Kind::Capacity => Some(v(Rule::CapacityOwnerOnly)),
        Kind::Design if *author == genesis.owner => Some(Ok(())),
        _ => None,
    }
}

/// Checks one change (already applied to `doc`) against the rules of its document.
/// `known`/`fresh`: see [`targets_of`]. `role`: the author's role at the change's deps
/// when the caller already read it from a document standing exactly at those deps
/// (reading it here, from `doc` at the deps, costs two history lookups, tens of µs);
/// `None` reads it here.
pub fn check_change(
    doc: &Automerge,
    genesis: &Genesis,
    change: &Change,
    role: Option<Option<Role>>,
    known: &PathCache,
    fresh: &mut PathCache,
) -> Result<(), RuleViolation> {
    let author = Author::from_actor(change.actor_id().to_bytes())
        .map(|a| a.enterprise)
        .map_err(|_| RuleViolation {
            rule: Rule::NotMember,
            path: String::new(),
            author: EnterpriseId([0; 32]),
        })?;
    let ctx = Ctx {
        doc,
        genesis,
        author,
        deps: change.deps(),
    };
    if let Some(r) = check_without_ops(genesis, &author, ctx.is_init()) {
        return r;
    }
    let role = role.unwrap_or_else(|| role_at(doc, genesis, &author, ctx.deps));
    if genesis.visibility == Visibility::Members && role.is_none() {
        return Err(ctx.violation(Rule::NotMember, &[]));
    }
    let targets = targets_of(doc, change, known, fresh)
        .map_err(|_| ctx.violation(Rule::UnknownField, &[]))?;
    check_targets(&ctx, role, &targets)
}

/// Checks a list of targets written by `ctx.author` with role `role` at `ctx.deps`.
pub fn check_targets(
    ctx: &Ctx<'_>,
    role: Option<Role>,
    targets: &[Target],
) -> Result<(), RuleViolation> {
    for t in targets {
        match ctx.genesis.kind {
            Kind::Order => check_order(ctx, role, t)?,
            Kind::Design => check_design(ctx, role, t)?,
            Kind::Capacity => {
                if ctx.author != ctx.genesis.owner {
                    return Err(ctx.violation(Rule::CapacityOwnerOnly, &t.path));
                }
            }
        }
    }
    Ok(())
}

fn check_members(ctx: &Ctx<'_>, t: &Target) -> Result<(), RuleViolation> {
    if ctx.author != ctx.genesis.owner {
        return Err(ctx.violation(Rule::MembershipOwnerOnly, &t.path));
    }
    if t.path.len() == 2 {
        let who: EnterpriseId = t.path[1]
            .parse()
            .map_err(|_| ctx.violation(Rule::InvalidValue("member id".into()), &t.path))?;
        if who == ctx.genesis.owner {
            return Err(ctx.violation(
                Rule::InvalidValue("owner cannot be a member".into()),
                &t.path,
            ));
        }
        if let Some(v) = &t.value {
            match v {
                ScalarValue::Str(s) if s.as_str() == "removed" => {}
                ScalarValue::Str(s) if Role::parse(s).is_some_and(|r| r != Role::Owner) => {}
                ScalarValue::Str(s) => {
                    return Err(ctx.violation(Rule::UnknownRole(s.to_string()), &t.path))
                }
                _ => return Err(ctx.violation(Rule::UnknownRole("non-string".into()), &t.path)),
            }
        }
    }
    Ok(())
}

const ORDER_CONTAINERS: [&str; 6] = [
    "request",
    "bids",
    "award",
    "progress",
    "discussion",
    "members",
];

fn check_order(ctx: &Ctx<'_>, role: Option<Role>, t: &Target) -> Result<(), RuleViolation> {
    let top = t.path[0].as_str();
    let owner = ctx.author == ctx.genesis.owner;
    if t.path.len() == 1 && top != "status" {
        // Root structure: only the owner's first change creates it.
        if !ORDER_CONTAINERS.contains(&top) {
            return Err(ctx.violation(Rule::UnknownField, &t.path));
        }
        if !(owner && ctx.is_init()) {
            return Err(ctx.violation(Rule::StructureReplace, &t.path));
        }
        return Ok(());
    }
    // The author's id as a map key; formatted only for the arms that compare it.
    let me = || ctx.author.to_string();
    match top {
        "status" => {
            if !owner {
                return Err(ctx.violation(Rule::BuyerOnly("status"), &t.path));
            }
            let to = match &t.value {
                Some(ScalarValue::Str(s)) if status_rank(s) > 0 => s.to_string(),
                _ => return Err(ctx.violation(Rule::InvalidValue("status".into()), &t.path)),
            };
            if ctx.is_init() {
                if to != "draft" && to != "open" {
                    return Err(ctx.violation(
                        Rule::StatusTransition {
                            from: "(new)".into(),
                            to,
                        },
                        &t.path,
                    ));
                }
                return Ok(());
            }
            let from = status_at(ctx.doc, ctx.deps).unwrap_or_default();
            if from != to && !status_transition_ok(&from, &to) {
                return Err(ctx.violation(Rule::StatusTransition { from, to }, &t.path));
            }
        }
        "request" => {
            if !owner {
                return Err(ctx.violation(Rule::BuyerOnly("request"), &t.path));
            }
        }
        "award" => {
            if !owner {
                return Err(ctx.violation(Rule::BuyerOnly("award"), &t.path));
            }
        }
        "members" => check_members(ctx, t)?,
        "bids" => {
            if owner || t.path.get(1) != Some(&me()) {
                return Err(ctx.violation(Rule::OwnBidOnly, &t.path));
            }
            let may_bid = ctx.genesis.visibility == Visibility::Public
                || matches!(role, Some(Role::Supplier));
            if !may_bid {
                return Err(ctx.violation(
                    Rule::ReadOnlyRole(role.map(|r| r.as_str()).unwrap_or("none")),
                    &t.path,
                ));
            }
            let status = status_at(ctx.doc, ctx.deps).unwrap_or_default();
            if status != "open" {
                return Err(ctx.violation(Rule::BiddingClosed(status), &t.path));
            }
        }
        "progress" => {
            let me = me();
            if t.path.get(1) != Some(&me) || !key_present_at(ctx.doc, "award", &me, ctx.deps) {
                return Err(ctx.violation(Rule::OwnProgressOnly, &t.path));
            }
        }
        "discussion" => {
            if ctx.genesis.visibility == Visibility::Members && role.is_none() {
                return Err(ctx.violation(Rule::NotMember, &t.path));
            }
        }
        _ => return Err(ctx.violation(Rule::UnknownField, &t.path)),
    }
    Ok(())
}

const DESIGN_CONTAINERS: [&str; 8] = [
    "description",
    "parameters",
    "bom",
    "attachments",
    "comments",
    "releases",
    "calls",
    "members",
];

fn check_design(ctx: &Ctx<'_>, role: Option<Role>, t: &Target) -> Result<(), RuleViolation> {
    let top = t.path[0].as_str();
    let owner = ctx.author == ctx.genesis.owner;
    if owner {
        return Ok(());
    }
    if t.path.len() == 1 && top != "title" {
        if !DESIGN_CONTAINERS.contains(&top) {
            return Err(ctx.violation(Rule::UnknownField, &t.path));
        }
        return Err(ctx.violation(Rule::StructureReplace, &t.path));
    }
    let writer = matches!(role, Some(Role::Editor | Role::Approver));
    let role_name = role.map(|r| r.as_str()).unwrap_or("none");
    match top {
        "members" => check_members(ctx, t)?,
        "releases" => {
            if role != Some(Role::Approver) {
                return Err(ctx.violation(Rule::ReleaseNotAllowed, &t.path));
            }
        }
        "comments" => {
            if role.is_none() && ctx.genesis.visibility == Visibility::Members {
                return Err(ctx.violation(Rule::NotMember, &t.path));
            }
        }
        "calls" => {
            // calls/<id>/submissions/<enterprise>/...: anyone who may hold the design submits its own.
            let me = ctx.author.to_string();
            let own_submission = t.path.len() >= 4 && t.path[2] == "submissions" && t.path[3] == me;
            if !own_submission && !writer {
                return Err(ctx.violation(Rule::ReadOnlyRole(role_name), &t.path));
            }
        }
        "title" | "description" | "parameters" | "bom" | "attachments" => {
            if !writer {
                if role.is_none() {
                    return Err(ctx.violation(Rule::NotMember, &t.path));
                }
                return Err(ctx.violation(Rule::ReadOnlyRole(role_name), &t.path));
            }
        }
        _ => return Err(ctx.violation(Rule::UnknownField, &t.path)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle() {
        assert!(status_transition_ok("draft", "open"));
        assert!(status_transition_ok("open", "awarded"));
        assert!(!status_transition_ok("open", "shipped"));
        assert!(!status_transition_ok("accepted", "cancelled"));
        assert!(status_transition_ok("in_production", "cancelled"));
        assert!(status_rank("cancelled") > status_rank("accepted"));
    }
}
