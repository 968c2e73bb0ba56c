//! Typed views and typed edits of the three document kinds.
//!
//! Owns: the automerge layout of orders, capacity and designs, the input types the
//! API and CLI accept (unknown fields refused), their validation, and the views read
//! back (including how concurrent conflicts read: the same on every peer).
//! Must not: decide permissions on its own (every edit passes [`crate::rules`]).
//!
//! Layout (root keys): an order has `request`, `status`, `bids/<supplier>`,
//! `award/<supplier>`, `progress/<supplier>`, `discussion`, `members`;
//! a capacity has `profile`, `capabilities`, `machines`, `lead_time_days`, `load_pct`;
//! a design has `title`, `description` (text), `parameters`, `bom`, `attachments`,
//! `comments`, `releases`, `calls`, `members`.

use std::collections::BTreeMap;

use automerge::transaction::{Transactable, Transaction};
use automerge::{Automerge, ChangeHash, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use serde::{Deserialize, Serialize};

use crate::doc::{Genesis, Kind, Role, SignedGenesis, Visibility, SCHEMA_VERSION};
use crate::document::{Accepted, Document};
use crate::error::EditError;
use crate::identity::{EnterpriseId, Keypair};
use crate::rules;

/// The manufacturing vocabulary (processes, materials, certifications, ...) carried by cofab.
pub const VOCABULARY_JSON: &str = include_str!("vocabulary.json");

/// Process names accepted in orders and capacity.
pub const PROCESSES: [&str; 16] = [
    "cnc-milling",
    "cnc-turning",
    "sheet-metal",
    "laser-cutting",
    "welding",
    "injection-molding",
    "die-casting",
    "investment-casting",
    "forging",
    "additive-fdm",
    "additive-sls",
    "additive-slm",
    "surface-finishing",
    "heat-treatment",
    "assembly",
    "pcb-assembly",
];

/// Longest accepted free-text field (titles, notes, comments), in bytes.
pub const MAX_TEXT: usize = 16 * 1024;

fn invalid(field: &'static str, reason: impl Into<String>) -> EditError {
    EditError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn check_text(field: &'static str, s: &str, required: bool) -> Result<(), EditError> {
    if required && s.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if s.len() > MAX_TEXT {
        return Err(invalid(field, format!("longer than {MAX_TEXT} bytes")));
    }
    Ok(())
}

/// Checks an ISO 8601 calendar date `YYYY-MM-DD`.
pub fn check_date(field: &'static str, s: &str) -> Result<(), EditError> {
    let b = s.as_bytes();
    let ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && [0, 1, 2, 3, 5, 6, 8, 9]
            .iter()
            .all(|i| b[*i].is_ascii_digit());
    if !ok {
        return Err(invalid(field, "expected an ISO 8601 date YYYY-MM-DD"));
    }
    let m: u32 = s[5..7].parse().unwrap_or(0);
    let d: u32 = s[8..10].parse().unwrap_or(0);
    let y: u32 = s[0..4].parse().unwrap_or(0);
    let leap = (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(invalid(field, "month must be 01-12")),
    };
    if d == 0 || d > days {
        return Err(invalid(field, "day out of range for the month"));
    }
    Ok(())
}

fn check_currency(field: &'static str, s: &str) -> Result<(), EditError> {
    if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(invalid(field, "expected an ISO 4217 code such as EUR"))
    }
}

fn check_region(field: &'static str, s: &str) -> Result<(), EditError> {
    let mut parts = s.splitn(2, '-');
    let c = parts.next().unwrap_or("");
    let sub = parts.next().unwrap_or("");
    if c.len() == 2
        && c.bytes().all(|b| b.is_ascii_uppercase())
        && (1..=3).contains(&sub.len())
        && sub
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    {
        Ok(())
    } else {
        Err(invalid(field, "expected an ISO 3166-2 code such as DE-BW"))
    }
}

fn check_processes(field: &'static str, ps: &[String]) -> Result<(), EditError> {
    for p in ps {
        if !PROCESSES.contains(&p.as_str()) {
            return Err(invalid(
                field,
                format!("unknown process {p:?}; known: {}", PROCESSES.join(", ")),
            ));
        }
    }
    Ok(())
}

// ---------- reading helpers ----------

fn get_obj(doc: &Automerge, obj: &ObjId, key: &str) -> Option<ObjId> {
    match doc.get(obj, key) {
        Ok(Some((Value::Object(_), id))) => Some(id),
        _ => None,
    }
}
fn get_scalar(doc: &Automerge, obj: &ObjId, key: &str) -> Option<ScalarValue> {
    match doc.get(obj, key) {
        Ok(Some((Value::Scalar(s), _))) => Some(s.into_owned()),
        _ => None,
    }
}
fn get_str(doc: &Automerge, obj: &ObjId, key: &str) -> Option<String> {
    match get_scalar(doc, obj, key)? {
        ScalarValue::Str(s) => Some(s.to_string()),
        _ => None,
    }
}
fn get_u64(doc: &Automerge, obj: &ObjId, key: &str) -> Option<u64> {
    match get_scalar(doc, obj, key)? {
        ScalarValue::Uint(u) => Some(u),
        ScalarValue::Int(i) if i >= 0 => Some(i as u64),
        _ => None,
    }
}
fn get_f64(doc: &Automerge, obj: &ObjId, key: &str) -> Option<f64> {
    match get_scalar(doc, obj, key)? {
        ScalarValue::F64(f) => Some(f),
        ScalarValue::Uint(u) => Some(u as f64),
        ScalarValue::Int(i) => Some(i as f64),
        _ => None,
    }
}
fn get_i64(doc: &Automerge, obj: &ObjId, key: &str) -> Option<i64> {
    match get_scalar(doc, obj, key)? {
        ScalarValue::Int(i) => Some(i),
        ScalarValue::Uint(u) => Some(u as i64),
        ScalarValue::Timestamp(t) => Some(t),
        _ => None,
    }
}
fn get_str_list(doc: &Automerge, obj: &ObjId, key: &str) -> Vec<String> {
    let Some(list) = get_obj(doc, obj, key) else {
        return Vec::new();
    };
    doc.list_range(&list, ..)
        .filter_map(|item| match item.value.into_value() {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Str(s) => Some(s.to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}
fn list_objs(doc: &Automerge, obj: &ObjId, key: &str) -> Vec<ObjId> {
    let Some(list) = get_obj(doc, obj, key) else {
        return Vec::new();
    };
    doc.list_range(&list, ..)
        .filter_map(|item| match item.value.clone().into_value() {
            Value::Object(_) => Some(item.id()),
            _ => None,
        })
        .collect()
}
fn map_keys(doc: &Automerge, obj: &ObjId, key: &str) -> Vec<(String, ObjId)> {
    let Some(m) = get_obj(doc, obj, key) else {
        return Vec::new();
    };
    doc.keys(&m)
        .filter_map(|k| get_obj(doc, &m, &k).map(|o| (k, o)))
        .collect()
}

fn put_str_list(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    key: &str,
    items: &[String],
) -> Result<(), EditError> {
    let list = tx.put_object(obj, key, ObjType::List)?;
    for (i, s) in items.iter().enumerate() {
        tx.insert(&list, i, s.as_str())?;
    }
    Ok(())
}
fn put_opt_str(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    key: &str,
    v: &Option<String>,
) -> Result<(), EditError> {
    if let Some(v) = v {
        tx.put(obj, key, v.as_str())?;
    }
    Ok(())
}

fn hex_heads(heads: &[ChangeHash]) -> Vec<String> {
    heads.iter().map(|h| h.to_string()).collect()
}

fn new_document(
    kind: Kind,
    owner: &Keypair,
    visibility: Visibility,
    members: BTreeMap<EnterpriseId, Role>,
    now_ms: i64,
    nonce: u64,
) -> Result<Document, EditError> {
    if members.contains_key(&owner.id()) {
        return Err(invalid("members", "the owner is not listed as a member"));
    }
    if members.values().any(|r| *r == Role::Owner) {
        return Err(invalid("members", "role owner belongs to the creator only"));
    }
    let g = Genesis {
        schema: SCHEMA_VERSION,
        kind,
        owner: owner.id(),
        visibility,
        members,
        created_ms: now_ms,
        nonce,
    };
    let sg = SignedGenesis::sign(g, owner).map_err(|e| invalid("genesis", e.to_string()))?;
    Ok(Document::new(sg))
}

fn members_view(doc: &Document) -> BTreeMap<String, String> {
    doc.members()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.as_str().to_string()))
        .collect()
}

/// Sets or removes a member (owner only). `role = None` removes.
pub fn set_member(
    doc: &mut Document,
    kp: &Keypair,
    now_ms: i64,
    who: EnterpriseId,
    role: Option<Role>,
) -> Result<Accepted, EditError> {
    if role == Some(Role::Owner) {
        return Err(invalid("role", "role owner belongs to the creator only"));
    }
    let v = role.map(|r| r.as_str()).unwrap_or("removed");
    let (_, acc) = doc.edit(kp, now_ms, |tx| {
        let m = match tx.get(ROOT, "members")? {
            Some((Value::Object(_), id)) => id,
            _ => return Err(EditError::Schema("document")),
        };
        tx.put(&m, who.to_string(), v)?;
        Ok(())
    })?;
    Ok(acc)
}

// ---------- orders ----------

/// The body of `POST /api/v1/orders` and `cofab order post`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OrderInput {
    /// Short title of the part or job.
    pub title: String,
    /// Number of parts.
    pub quantity: u64,
    /// Unit of the quantity (default `pcs`).
    #[serde(default)]
    pub unit: Option<String>,
    /// Material, e.g. `AL6061-T6`.
    #[serde(default)]
    pub material: Option<String>,
    /// Processes, e.g. `cnc-milling`.
    #[serde(default)]
    pub processes: Vec<String>,
    /// Tolerance, e.g. `ISO 2768-m`.
    #[serde(default)]
    pub tolerance: Option<String>,
    /// Certifications required of the supplier.
    #[serde(default)]
    pub certifications: Vec<String>,
    /// Due date, ISO 8601 `YYYY-MM-DD`.
    #[serde(default)]
    pub due_date: Option<String>,
    /// Ship-to region, ISO 3166-2.
    #[serde(default)]
    pub ship_to: Option<String>,
    /// Incoterms 2020 rule, e.g. `DAP`.
    #[serde(default)]
    pub incoterms: Option<String>,
    /// Target unit price.
    #[serde(default)]
    pub target_price: Option<f64>,
    /// Currency of prices, ISO 4217.
    #[serde(default)]
    pub currency: Option<String>,
    /// Free description of the part.
    #[serde(default)]
    pub description: Option<String>,
    /// A design document id (and release name after `@`).
    #[serde(default)]
    pub design: Option<String>,
    /// `public` (default) or `members`.
    #[serde(default)]
    pub visibility: Visibility,
    /// Initial status: `open` (default) or `draft`.
    #[serde(default)]
    pub status: Option<String>,
    /// Members invited: enterprise id → role (usually `supplier`).
    #[serde(default)]
    pub members: BTreeMap<EnterpriseId, Role>,
}

impl OrderInput {
    /// Checks every field; the error names the field.
    pub fn validate(&self) -> Result<(), EditError> {
        check_text("title", &self.title, true)?;
        if self.title.len() > 200 {
            return Err(invalid("title", "longer than 200 bytes"));
        }
        if self.quantity == 0 {
            return Err(invalid("quantity", "must be at least 1"));
        }
        if self.quantity > 1_000_000_000 {
            return Err(invalid("quantity", "must be at most 1e9"));
        }
        check_processes("processes", &self.processes)?;
        if let Some(d) = &self.due_date {
            check_date("due_date", d)?;
        }
        if let Some(r) = &self.ship_to {
            check_region("ship_to", r)?;
        }
        if let Some(c) = &self.currency {
            check_currency("currency", c)?;
        }
        if let Some(p) = self.target_price {
            if !(p.is_finite() && p >= 0.0) {
                return Err(invalid("target_price", "must be a non-negative number"));
            }
        }
        if let Some(i) = &self.incoterms {
            const INCOTERMS: [&str; 11] = [
                "EXW", "FCA", "FAS", "FOB", "CFR", "CIF", "CPT", "CIP", "DAP", "DPU", "DDP",
            ];
            if !INCOTERMS.contains(&i.as_str()) {
                return Err(invalid(
                    "incoterms",
                    "expected an Incoterms 2020 rule such as DAP",
                ));
            }
        }
        if let Some(s) = &self.status {
            if s != "open" && s != "draft" {
                return Err(invalid("status", "a new order is open or draft"));
            }
        }
        for s in [
            &self.material,
            &self.tolerance,
            &self.description,
            &self.design,
            &self.unit,
        ]
        .into_iter()
        .flatten()
        {
            check_text("text", s, false)?;
        }
        Ok(())
    }
}

fn write_request(tx: &mut Transaction<'_>, req: &ObjId, o: &OrderInput) -> Result<(), EditError> {
    tx.put(req, "title", o.title.as_str())?;
    tx.put(req, "quantity", o.quantity)?;
    tx.put(req, "unit", o.unit.clone().unwrap_or_else(|| "pcs".into()))?;
    put_opt_str(tx, req, "material", &o.material)?;
    put_str_list(tx, req, "processes", &o.processes)?;
    put_opt_str(tx, req, "tolerance", &o.tolerance)?;
    put_str_list(tx, req, "certifications", &o.certifications)?;
    put_opt_str(tx, req, "due_date", &o.due_date)?;
    put_opt_str(tx, req, "ship_to", &o.ship_to)?;
    put_opt_str(tx, req, "incoterms", &o.incoterms)?;
    if let Some(p) = o.target_price {
        tx.put(req, "target_price", p)?;
    }
    put_opt_str(tx, req, "currency", &o.currency)?;
    put_opt_str(tx, req, "description", &o.description)?;
    put_opt_str(tx, req, "design", &o.design)?;
    Ok(())
}

/// Creates an order owned by `buyer`.
pub fn create_order(
    buyer: &Keypair,
    input: &OrderInput,
    now_ms: i64,
    nonce: u64,
) -> Result<(Document, Accepted), EditError> {
    input.validate()?;
    let mut doc = new_document(
        Kind::Order,
        buyer,
        input.visibility,
        input.members.clone(),
        now_ms,
        nonce,
    )?;
    let status = input.status.clone().unwrap_or_else(|| "open".into());
    let (_, acc) = doc.edit(buyer, now_ms, |tx| {
        let req = tx.put_object(ROOT, "request", ObjType::Map)?;
        write_request(tx, &req, input)?;
        tx.put(ROOT, "status", status.as_str())?;
        for k in ["bids", "award", "progress", "members"] {
            tx.put_object(ROOT, k, ObjType::Map)?;
        }
        tx.put_object(ROOT, "discussion", ObjType::List)?;
        Ok(())
    })?;
    Ok((doc, acc))
}

/// A supplier's bid.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BidInput {
    /// Price per unit.
    pub unit_price: f64,
    /// ISO 4217 currency.
    pub currency: String,
    /// Quantity offered (default: all).
    #[serde(default)]
    pub quantity: Option<u64>,
    /// Lead time in days.
    pub lead_time_days: u32,
    /// Tooling / NRE cost.
    #[serde(default)]
    pub tooling_cost: Option<f64>,
    /// Offer valid until, ISO 8601 date.
    #[serde(default)]
    pub valid_until: Option<String>,
    /// Free note.
    #[serde(default)]
    pub note: Option<String>,
}

/// Places (or replaces) the caller's own bid.
pub fn place_bid(
    doc: &mut Document,
    supplier: &Keypair,
    now_ms: i64,
    bid: &BidInput,
) -> Result<Accepted, EditError> {
    if !(bid.unit_price.is_finite() && bid.unit_price >= 0.0) {
        return Err(invalid("unit_price", "must be a non-negative number"));
    }
    check_currency("currency", &bid.currency)?;
    if let Some(v) = &bid.valid_until {
        check_date("valid_until", v)?;
    }
    if let Some(n) = &bid.note {
        check_text("note", n, false)?;
    }
    let me = supplier.id().to_string();
    let (_, acc) = doc.edit(supplier, now_ms, |tx| {
        let bids = get_obj_tx(tx, "bids")?;
        let b = tx.put_object(&bids, me.as_str(), ObjType::Map)?;
        tx.put(&b, "unit_price", bid.unit_price)?;
        tx.put(&b, "currency", bid.currency.as_str())?;
        if let Some(q) = bid.quantity {
            tx.put(&b, "quantity", q)?;
        }
        tx.put(&b, "lead_time_days", bid.lead_time_days as u64)?;
        if let Some(t) = bid.tooling_cost {
            tx.put(&b, "tooling_cost", t)?;
        }
        put_opt_str(tx, &b, "valid_until", &bid.valid_until)?;
        put_opt_str(tx, &b, "note", &bid.note)?;
        tx.put(&b, "at_ms", ScalarValue::Timestamp(now_ms))?;
        Ok(())
    })?;
    Ok(acc)
}

fn get_obj_tx(tx: &Transaction<'_>, key: &'static str) -> Result<ObjId, EditError> {
    match tx.get(ROOT, key)? {
        Some((Value::Object(_), id)) => Ok(id),
        _ => Err(EditError::Schema("document: missing container")),
    }
}

/// Awards the order (whole or split): supplier → quantity. Moves the status to `awarded`.
pub fn award(
    doc: &mut Document,
    buyer: &Keypair,
    now_ms: i64,
    awards: &BTreeMap<EnterpriseId, u64>,
) -> Result<Accepted, EditError> {
    if awards.is_empty() {
        return Err(invalid("awards", "name at least one supplier"));
    }
    let view = order_view(doc).ok_or(EditError::Schema("order"))?;
    for (s, q) in awards {
        if !view.bids.contains_key(&s.to_string()) {
            return Err(invalid("awards", format!("{s} has not bid")));
        }
        if *q == 0 {
            return Err(invalid("awards", "quantity must be at least 1"));
        }
    }
    let (_, acc) = doc.edit(buyer, now_ms, |tx| {
        let a = get_obj_tx(tx, "award")?;
        for (s, q) in awards {
            tx.put(&a, s.to_string(), *q)?;
        }
        if view.status == "open" {
            tx.put(ROOT, "status", "awarded")?;
        }
        Ok(())
    })?;
    Ok(acc)
}

/// Moves the order's status (buyer only, along the lifecycle).
pub fn set_status(
    doc: &mut Document,
    buyer: &Keypair,
    now_ms: i64,
    status: &str,
) -> Result<Accepted, EditError> {
    if rules::status_rank(status) == 0 {
        return Err(invalid(
            "status",
            format!("unknown status; one of {}", rules::STATUSES.join(", ")),
        ));
    }
    let (_, acc) = doc.edit(buyer, now_ms, |tx| {
        tx.put(ROOT, "status", status)?;
        Ok(())
    })?;
    Ok(acc)
}

/// Production progress reported by an awarded supplier.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProgressInput {
    /// Good parts produced so far.
    #[serde(default)]
    pub produced: Option<u64>,
    /// Parts scrapped so far.
    #[serde(default)]
    pub scrapped: Option<u64>,
    /// A milestone reached, appended to the list.
    #[serde(default)]
    pub milestone: Option<String>,
    /// Quality result (e.g. `CMM inspection report: pass`).
    #[serde(default)]
    pub quality: Option<String>,
    /// Machine status (e.g. `running`, `down: spindle`).
    #[serde(default)]
    pub machine_status: Option<String>,
}

/// Reports the caller's own progress on an order it was awarded.
pub fn report_progress(
    doc: &mut Document,
    supplier: &Keypair,
    now_ms: i64,
    p: &ProgressInput,
) -> Result<Accepted, EditError> {
    let me = supplier.id().to_string();
    let (_, acc) = doc.edit(supplier, now_ms, |tx| {
        let prog = get_obj_tx(tx, "progress")?;
        let mine = match tx.get(&prog, me.as_str())? {
            Some((Value::Object(_), id)) => id,
            _ => {
                let m = tx.put_object(&prog, me.as_str(), ObjType::Map)?;
                tx.put_object(&m, "milestones", ObjType::List)?;
                m
            }
        };
        if let Some(v) = p.produced {
            tx.put(&mine, "produced", v)?;
        }
        if let Some(v) = p.scrapped {
            tx.put(&mine, "scrapped", v)?;
        }
        put_opt_str(tx, &mine, "quality", &p.quality)?;
        put_opt_str(tx, &mine, "machine_status", &p.machine_status)?;
        if let Some(m) = &p.milestone {
            if let Some((Value::Object(_), list)) = tx.get(&mine, "milestones")? {
                let n = tx.length(&list);
                tx.insert(&list, n, m.as_str())?;
            }
        }
        tx.put(&mine, "updated_ms", ScalarValue::Timestamp(now_ms))?;
        Ok(())
    })?;
    Ok(acc)
}

/// Appends a message to a document's discussion (orders) or comments (designs).
pub fn comment(
    doc: &mut Document,
    author: &Keypair,
    now_ms: i64,
    text: &str,
) -> Result<Accepted, EditError> {
    check_text("text", text, true)?;
    let key = if doc.genesis().kind == Kind::Design {
        "comments"
    } else {
        "discussion"
    };
    if doc.genesis().kind == Kind::Capacity {
        return Err(invalid("text", "capacity has no discussion"));
    }
    let me = author.id().to_string();
    let (_, acc) = doc.edit(author, now_ms, |tx| {
        let list = match tx.get(ROOT, key)? {
            Some((Value::Object(_), id)) => id,
            _ => return Err(EditError::Schema("document: missing list")),
        };
        let n = tx.length(&list);
        let c = tx.insert_object(&list, n, ObjType::Map)?;
        tx.put(&c, "author", me.as_str())?;
        tx.put(&c, "text", text)?;
        tx.put(&c, "at_ms", ScalarValue::Timestamp(now_ms))?;
        Ok(())
    })?;
    Ok(acc)
}

/// A bid as read back.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BidView {
    /// Price per unit.
    pub unit_price: Option<f64>,
    /// Currency.
    pub currency: Option<String>,
    /// Quantity offered.
    pub quantity: Option<u64>,
    /// Lead time in days.
    pub lead_time_days: Option<u64>,
    /// Tooling cost.
    pub tooling_cost: Option<f64>,
    /// Valid until.
    pub valid_until: Option<String>,
    /// Note.
    pub note: Option<String>,
}

/// Progress as read back.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProgressView {
    /// Produced.
    pub produced: Option<u64>,
    /// Scrapped.
    pub scrapped: Option<u64>,
    /// Milestones reached, in order.
    pub milestones: Vec<String>,
    /// Quality result.
    pub quality: Option<String>,
    /// Machine status.
    pub machine_status: Option<String>,
}

/// A discussion message or design comment.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CommentView {
    /// Author enterprise id.
    pub author: String,
    /// Text.
    pub text: String,
    /// Unix milliseconds.
    pub at_ms: Option<i64>,
}

/// An order as every peer reads it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OrderView {
    /// Document id.
    pub id: String,
    /// Buyer.
    pub owner: String,
    /// `public` or `members`.
    pub visibility: Visibility,
    /// Title.
    pub title: String,
    /// Quantity.
    pub quantity: u64,
    /// Unit.
    pub unit: String,
    /// Material.
    pub material: Option<String>,
    /// Processes.
    pub processes: Vec<String>,
    /// Tolerance.
    pub tolerance: Option<String>,
    /// Certifications.
    pub certifications: Vec<String>,
    /// Due date.
    pub due_date: Option<String>,
    /// Ship-to region.
    pub ship_to: Option<String>,
    /// Incoterms.
    pub incoterms: Option<String>,
    /// Target unit price.
    pub target_price: Option<f64>,
    /// Currency.
    pub currency: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Design reference.
    pub design: Option<String>,
    /// Status; among concurrent moves, the one furthest along the lifecycle (`cancelled` wins).
    pub status: String,
    /// Whether concurrent status moves conflict.
    pub status_conflict: bool,
    /// Bids by supplier id.
    pub bids: BTreeMap<String, BidView>,
    /// Awarded quantity by supplier id (concurrent awards merge).
    pub award: BTreeMap<String, u64>,
    /// Whether the awarded quantities exceed the order quantity (concurrent awards).
    pub over_awarded: bool,
    /// Progress by supplier id.
    pub progress: BTreeMap<String, ProgressView>,
    /// Discussion.
    pub discussion: Vec<CommentView>,
    /// Members and roles.
    pub members: BTreeMap<String, String>,
    /// Heads (hex change hashes).
    pub heads: Vec<String>,
}

fn comments_view(d: &Automerge, key: &str) -> Vec<CommentView> {
    list_objs(d, &ROOT, key)
        .into_iter()
        .map(|c| CommentView {
            author: get_str(d, &c, "author").unwrap_or_default(),
            text: get_str(d, &c, "text").unwrap_or_default(),
            at_ms: get_i64(d, &c, "at_ms"),
        })
        .collect()
}

/// Reads an order; `None` if the document is not an order or has no request yet.
pub fn order_view(doc: &Document) -> Option<OrderView> {
    if doc.genesis().kind != Kind::Order {
        return None;
    }
    let d = doc.automerge();
    let req = get_obj(d, &ROOT, "request")?;
    let heads = d.get_heads();
    let bids = map_keys(d, &ROOT, "bids")
        .into_iter()
        .map(|(k, b)| {
            (
                k,
                BidView {
                    unit_price: get_f64(d, &b, "unit_price"),
                    currency: get_str(d, &b, "currency"),
                    quantity: get_u64(d, &b, "quantity"),
                    lead_time_days: get_u64(d, &b, "lead_time_days"),
                    tooling_cost: get_f64(d, &b, "tooling_cost"),
                    valid_until: get_str(d, &b, "valid_until"),
                    note: get_str(d, &b, "note"),
                },
            )
        })
        .collect();
    let award: BTreeMap<String, u64> = get_obj(d, &ROOT, "award")
        .map(|a| {
            d.keys(&a)
                .filter_map(|k| get_u64(d, &a, &k).map(|q| (k, q)))
                .collect()
        })
        .unwrap_or_default();
    let progress = map_keys(d, &ROOT, "progress")
        .into_iter()
        .map(|(k, p)| {
            (
                k,
                ProgressView {
                    produced: get_u64(d, &p, "produced"),
                    scrapped: get_u64(d, &p, "scrapped"),
                    milestones: get_str_list(d, &p, "milestones"),
                    quality: get_str(d, &p, "quality"),
                    machine_status: get_str(d, &p, "machine_status"),
                },
            )
        })
        .collect();
    let quantity = get_u64(d, &req, "quantity").unwrap_or(0);
    let over_awarded = award.values().sum::<u64>() > quantity;
    Some(OrderView {
        id: doc.id().to_string(),
        owner: doc.genesis().owner.to_string(),
        visibility: doc.genesis().visibility,
        title: get_str(d, &req, "title").unwrap_or_default(),
        quantity,
        unit: get_str(d, &req, "unit").unwrap_or_else(|| "pcs".into()),
        material: get_str(d, &req, "material"),
        processes: get_str_list(d, &req, "processes"),
        tolerance: get_str(d, &req, "tolerance"),
        certifications: get_str_list(d, &req, "certifications"),
        due_date: get_str(d, &req, "due_date"),
        ship_to: get_str(d, &req, "ship_to"),
        incoterms: get_str(d, &req, "incoterms"),
        target_price: get_f64(d, &req, "target_price"),
        currency: get_str(d, &req, "currency"),
        description: get_str(d, &req, "description"),
        design: get_str(d, &req, "design"),
        status: rules::status_at(d, &heads).unwrap_or_default(),
        status_conflict: rules::status_conflicted(d, &heads),
        bids,
        award,
        over_awarded,
        progress,
        discussion: comments_view(d, "discussion"),
        members: members_view(doc),
        heads: hex_heads(&heads),
    })
}

// ---------- capacity ----------

/// One capability of a supplier.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Capability {
    /// Process name.
    pub process: String,
    /// Materials handled.
    #[serde(default)]
    pub materials: Vec<String>,
    /// Largest part envelope, millimetres (x, y, z).
    #[serde(default)]
    pub max_part_mm: Option<[u32; 3]>,
    /// Best tolerance held.
    #[serde(default)]
    pub tolerance: Option<String>,
}

/// A machine or capacity group with free hours per ISO week.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// Name, e.g. `5-axis milling cell`.
    pub name: String,
    /// Process it runs.
    pub process: String,
    /// Free hours per ISO week, e.g. `{"2027-W09": 32}`.
    #[serde(default)]
    pub free_hours: BTreeMap<String, u32>,
}

/// The body of `PUT /api/v1/capacity`: the node's own capacity, replaced whole.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CapacityInput {
    /// Company name.
    pub name: String,
    /// Region, ISO 3166-2.
    #[serde(default)]
    pub region: Option<String>,
    /// Certifications held.
    #[serde(default)]
    pub certifications: Vec<String>,
    /// Capabilities.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    /// Machines and free hours.
    #[serde(default)]
    pub machines: Vec<Machine>,
    /// Typical lead time, days.
    #[serde(default)]
    pub lead_time_days: Option<u32>,
    /// Current load, percent.
    #[serde(default)]
    pub load_pct: Option<u8>,
}

impl CapacityInput {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), EditError> {
        check_text("name", &self.name, true)?;
        if let Some(r) = &self.region {
            check_region("region", r)?;
        }
        for c in &self.capabilities {
            check_processes("capabilities.process", std::slice::from_ref(&c.process))?;
        }
        for m in &self.machines {
            check_text("machines.name", &m.name, true)?;
            check_processes("machines.process", std::slice::from_ref(&m.process))?;
            for w in m.free_hours.keys() {
                let ok = w.len() == 8
                    && w.as_bytes()[4] == b'-'
                    && w.as_bytes()[5] == b'W'
                    && w[..4].bytes().all(|b| b.is_ascii_digit())
                    && w[6..]
                        .parse::<u32>()
                        .map(|n| (1..=53).contains(&n))
                        .unwrap_or(false);
                if !ok {
                    return Err(invalid(
                        "machines.free_hours",
                        format!("{w:?} is not an ISO week like 2027-W09"),
                    ));
                }
            }
            if m.free_hours.values().any(|h| *h > 168) {
                return Err(invalid("machines.free_hours", "at most 168 hours per week"));
            }
        }
        if self.load_pct.is_some_and(|l| l > 100) {
            return Err(invalid("load_pct", "0-100"));
        }
        Ok(())
    }
}

fn write_capacity(tx: &mut Transaction<'_>, c: &CapacityInput) -> Result<(), EditError> {
    let p = tx.put_object(ROOT, "profile", ObjType::Map)?;
    tx.put(&p, "name", c.name.as_str())?;
    put_opt_str(tx, &p, "region", &c.region)?;
    put_str_list(tx, &p, "certifications", &c.certifications)?;
    let caps = tx.put_object(ROOT, "capabilities", ObjType::List)?;
    for (i, cap) in c.capabilities.iter().enumerate() {
        let o = tx.insert_object(&caps, i, ObjType::Map)?;
        tx.put(&o, "process", cap.process.as_str())?;
        put_str_list(tx, &o, "materials", &cap.materials)?;
        if let Some([x, y, z]) = cap.max_part_mm {
            let l = tx.put_object(&o, "max_part_mm", ObjType::List)?;
            for (j, v) in [x, y, z].into_iter().enumerate() {
                tx.insert(&l, j, v as u64)?;
            }
        }
        put_opt_str(tx, &o, "tolerance", &cap.tolerance)?;
    }
    let ms = tx.put_object(ROOT, "machines", ObjType::List)?;
    for (i, m) in c.machines.iter().enumerate() {
        let o = tx.insert_object(&ms, i, ObjType::Map)?;
        tx.put(&o, "name", m.name.as_str())?;
        tx.put(&o, "process", m.process.as_str())?;
        let h = tx.put_object(&o, "free_hours", ObjType::Map)?;
        for (w, v) in &m.free_hours {
            tx.put(&h, w.as_str(), *v as u64)?;
        }
    }
    match c.lead_time_days {
        Some(v) => tx.put(ROOT, "lead_time_days", v as u64)?,
        None => {
            let _ = tx.delete(ROOT, "lead_time_days");
        }
    }
    match c.load_pct {
        Some(v) => tx.put(ROOT, "load_pct", v as u64)?,
        None => {
            let _ = tx.delete(ROOT, "load_pct");
        }
    }
    Ok(())
}

/// Creates a supplier's capacity document (public).
pub fn create_capacity(
    supplier: &Keypair,
    c: &CapacityInput,
    now_ms: i64,
    nonce: u64,
) -> Result<(Document, Accepted), EditError> {
    c.validate()?;
    let mut doc = new_document(
        Kind::Capacity,
        supplier,
        Visibility::Public,
        BTreeMap::new(),
        now_ms,
        nonce,
    )?;
    let (_, acc) = doc.edit(supplier, now_ms, |tx| {
        write_capacity(tx, c)?;
        tx.put_object(ROOT, "members", ObjType::Map)?;
        Ok(())
    })?;
    Ok((doc, acc))
}

/// Replaces the content of a capacity document.
pub fn update_capacity(
    doc: &mut Document,
    supplier: &Keypair,
    now_ms: i64,
    c: &CapacityInput,
) -> Result<Accepted, EditError> {
    c.validate()?;
    let (_, acc) = doc.edit(supplier, now_ms, |tx| write_capacity(tx, c))?;
    Ok(acc)
}

/// Capacity as read back.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CapacityView {
    /// Document id.
    pub id: String,
    /// Supplier enterprise id.
    pub supplier: String,
    /// The content.
    #[serde(flatten)]
    pub content: CapacityInput,
    /// Heads.
    pub heads: Vec<String>,
}

/// Reads a capacity document.
pub fn capacity_view(doc: &Document) -> Option<CapacityView> {
    if doc.genesis().kind != Kind::Capacity {
        return None;
    }
    let d = doc.automerge();
    let p = get_obj(d, &ROOT, "profile")?;
    let capabilities = list_objs(d, &ROOT, "capabilities")
        .into_iter()
        .map(|o| Capability {
            process: get_str(d, &o, "process").unwrap_or_default(),
            materials: get_str_list(d, &o, "materials"),
            max_part_mm: get_obj(d, &o, "max_part_mm").and_then(|l| {
                let v: Vec<u32> = d
                    .list_range(&l, ..)
                    .filter_map(|i| match i.value.into_value() {
                        Value::Scalar(s) => s.as_u64().map(|x| x as u32),
                        _ => None,
                    })
                    .collect();
                (v.len() == 3).then(|| [v[0], v[1], v[2]])
            }),
            tolerance: get_str(d, &o, "tolerance"),
        })
        .collect();
    let machines = list_objs(d, &ROOT, "machines")
        .into_iter()
        .map(|o| Machine {
            name: get_str(d, &o, "name").unwrap_or_default(),
            process: get_str(d, &o, "process").unwrap_or_default(),
            free_hours: get_obj(d, &o, "free_hours")
                .map(|h| {
                    d.keys(&h)
                        .filter_map(|k| get_u64(d, &h, &k).map(|v| (k, v as u32)))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    Some(CapacityView {
        id: doc.id().to_string(),
        supplier: doc.genesis().owner.to_string(),
        content: CapacityInput {
            name: get_str(d, &p, "name").unwrap_or_default(),
            region: get_str(d, &p, "region"),
            certifications: get_str_list(d, &p, "certifications"),
            capabilities,
            machines,
            lead_time_days: get_u64(d, &ROOT, "lead_time_days").map(|v| v as u32),
            load_pct: get_u64(d, &ROOT, "load_pct").map(|v| v.min(100) as u8),
        },
        heads: hex_heads(&d.get_heads()),
    })
}

// ---------- designs ----------

/// The body of `POST /api/v1/designs`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DesignInput {
    /// Title.
    pub title: String,
    /// Initial description text.
    #[serde(default)]
    pub description: String,
    /// `public` (default) or `members`.
    #[serde(default)]
    pub visibility: Visibility,
    /// Members: enterprise id → role (`editor`, `approver`, `viewer`).
    #[serde(default)]
    pub members: BTreeMap<EnterpriseId, Role>,
}

/// Creates a design owned by `owner`.
pub fn create_design(
    owner: &Keypair,
    input: &DesignInput,
    now_ms: i64,
    nonce: u64,
) -> Result<(Document, Accepted), EditError> {
    check_text("title", &input.title, true)?;
    if input.description.len() > 4 * 1024 * 1024 {
        return Err(invalid("description", "longer than 4 MiB"));
    }
    let mut doc = new_document(
        Kind::Design,
        owner,
        input.visibility,
        input.members.clone(),
        now_ms,
        nonce,
    )?;
    let (_, acc) = doc.edit(owner, now_ms, |tx| {
        tx.put(ROOT, "title", input.title.as_str())?;
        let t = tx.put_object(ROOT, "description", ObjType::Text)?;
        tx.splice_text(&t, 0, 0, &input.description)?;
        for k in ["parameters", "attachments", "calls", "members"] {
            tx.put_object(ROOT, k, ObjType::Map)?;
        }
        for k in ["bom", "comments", "releases"] {
            tx.put_object(ROOT, k, ObjType::List)?;
        }
        Ok(())
    })?;
    Ok((doc, acc))
}

/// A text splice: at `pos` (in Unicode scalar values), delete `delete`, insert `insert`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Splice {
    /// Position.
    pub pos: usize,
    /// Characters to delete.
    #[serde(default)]
    pub delete: usize,
    /// Text to insert.
    #[serde(default)]
    pub insert: String,
}

/// Edits a design's description text.
pub fn splice_description(
    doc: &mut Document,
    author: &Keypair,
    now_ms: i64,
    s: &Splice,
) -> Result<Accepted, EditError> {
    if s.insert.len() > MAX_TEXT * 64 {
        return Err(invalid("insert", "too long"));
    }
    let (_, acc) = doc.edit(author, now_ms, |tx| {
        let t = match tx.get(ROOT, "description")? {
            Some((Value::Object(ObjType::Text), id)) => id,
            _ => return Err(EditError::Schema("design")),
        };
        let len = tx.length(&t);
        if s.pos > len {
            return Err(invalid(
                "pos",
                format!("beyond the end of the text ({len})"),
            ));
        }
        if s.pos + s.delete > len {
            return Err(invalid(
                "delete",
                format!("beyond the end of the text ({len})"),
            ));
        }
        tx.splice_text(&t, s.pos, s.delete as isize, &s.insert)?;
        Ok(())
    })?;
    Ok(acc)
}

/// Most splices in one [`splice_description_many`] call.
pub const MAX_SPLICES_PER_CALL: usize = 10_000;

/// Applies several splices to a design's description in order, each its own change
/// (so peers see the same history as from one call per splice), with one signature for
/// the run. All or nothing: a splice that does not fit refuses the whole run, naming it.
pub fn splice_description_many(
    doc: &mut Document,
    author: &Keypair,
    now_ms: i64,
    splices: &[Splice],
) -> Result<Accepted, EditError> {
    if splices.is_empty() {
        return Err(invalid("splices", "empty"));
    }
    if splices.len() > MAX_SPLICES_PER_CALL {
        return Err(invalid(
            "splices",
            format!("more than {MAX_SPLICES_PER_CALL} in one call"),
        ));
    }
    if splices.iter().any(|s| s.insert.len() > MAX_TEXT * 64) {
        return Err(invalid("splices.insert", "too long"));
    }
    let (_, acc) = doc.edit_many(author, now_ms, splices.len(), |i, tx| {
        let s = &splices[i];
        let t = match tx.get(ROOT, "description")? {
            Some((Value::Object(ObjType::Text), id)) => id,
            _ => return Err(EditError::Schema("design")),
        };
        let len = tx.length(&t);
        if s.pos > len || s.pos + s.delete > len {
            return Err(invalid(
                "splices",
                format!("splice {i} reaches beyond the end of the text ({len})"),
            ));
        }
        tx.splice_text(&t, s.pos, s.delete as isize, &s.insert)?;
        Ok(())
    })?;
    Ok(acc)
}

/// Sets a named design parameter.
pub fn set_parameter(
    doc: &mut Document,
    author: &Keypair,
    now_ms: i64,
    name: &str,
    value: f64,
    unit: &str,
) -> Result<Accepted, EditError> {
    check_text("name", name, true)?;
    if !value.is_finite() {
        return Err(invalid("value", "must be a finite number"));
    }
    let (_, acc) = doc.edit(author, now_ms, |tx| {
        let ps = get_obj_tx(tx, "parameters")?;
        let p = tx.put_object(&ps, name, ObjType::Map)?;
        tx.put(&p, "value", value)?;
        tx.put(&p, "unit", unit)?;
        Ok(())
    })?;
    Ok(acc)
}

/// Largest attachment (drawing, STEP file) stored in a design, in bytes.
pub const MAX_ATTACHMENT_BYTES: usize = 4 * 1024 * 1024;

/// Adds a file to a design. Content-addressed: the key is the SHA-256 of the bytes (hex),
/// so the same file added twice is stored once. Returns the key.
pub fn add_attachment(
    doc: &mut Document,
    author: &Keypair,
    now_ms: i64,
    name: &str,
    media_type: &str,
    bytes: &[u8],
) -> Result<(String, Accepted), EditError> {
    use sha2::Digest;
    check_text("name", name, true)?;
    if bytes.is_empty() {
        return Err(invalid("content", "empty file"));
    }
    if bytes.len() > MAX_ATTACHMENT_BYTES {
        return Err(invalid(
            "content",
            format!(
                "{} bytes is over the {MAX_ATTACHMENT_BYTES}-byte limit",
                bytes.len()
            ),
        ));
    }
    let key: String = sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let me = author.id().to_string();
    let (_, acc) = doc.edit(author, now_ms, |tx| {
        let atts = get_obj_tx(tx, "attachments")?;
        let a = tx.put_object(&atts, key.as_str(), ObjType::Map)?;
        tx.put(&a, "name", name)?;
        tx.put(&a, "media_type", media_type)?;
        tx.put(&a, "size", bytes.len() as u64)?;
        tx.put(&a, "by", me.as_str())?;
        tx.put(&a, "content", ScalarValue::Bytes(bytes.to_vec()))?;
        Ok(())
    })?;
    Ok((key, acc))
}

/// An attachment's bytes, by its key.
pub fn attachment_content(doc: &Document, key: &str) -> Option<(String, Vec<u8>)> {
    let d = doc.automerge();
    let a = get_obj(d, &get_obj(d, &ROOT, "attachments")?, key)?;
    let media = get_str(d, &a, "media_type").unwrap_or_else(|| "application/octet-stream".into());
    match get_scalar(d, &a, "content")? {
        ScalarValue::Bytes(b) => Some((media, b)),
        _ => None,
    }
}

/// An attachment as listed (without its bytes).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AttachmentView {
    /// File name.
    pub name: String,
    /// Media type.
    pub media_type: Option<String>,
    /// Size in bytes.
    pub size: Option<u64>,
    /// Who added it.
    pub by: Option<String>,
}

/// Releases a revision: pins the current heads under `name` (owner or approver).
pub fn release(
    doc: &mut Document,
    author: &Keypair,
    now_ms: i64,
    name: &str,
) -> Result<Accepted, EditError> {
    check_text("name", name, true)?;
    let heads = hex_heads(&doc.heads());
    let me = author.id().to_string();
    let (_, acc) = doc.edit(author, now_ms, |tx| {
        let rs = get_obj_tx(tx, "releases")?;
        let n = tx.length(&rs);
        let r = tx.insert_object(&rs, n, ObjType::Map)?;
        tx.put(&r, "name", name)?;
        tx.put(&r, "by", me.as_str())?;
        tx.put(&r, "at_ms", ScalarValue::Timestamp(now_ms))?;
        put_str_list(tx, &r, "heads", &heads)?;
        Ok(())
    })?;
    Ok(acc)
}

/// A release as read back.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReleaseView {
    /// Release name.
    pub name: String,
    /// Who released.
    pub by: String,
    /// Pinned heads.
    pub heads: Vec<String>,
    /// Unix ms.
    pub at_ms: Option<i64>,
}

/// A design parameter as read back.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ParameterView {
    /// Value.
    pub value: Option<f64>,
    /// Unit.
    pub unit: Option<String>,
}

/// A design as every peer reads it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DesignView {
    /// Document id.
    pub id: String,
    /// Owner.
    pub owner: String,
    /// Visibility.
    pub visibility: Visibility,
    /// Title.
    pub title: String,
    /// Description text.
    pub description: String,
    /// Parameters.
    pub parameters: BTreeMap<String, ParameterView>,
    /// Comments.
    pub comments: Vec<CommentView>,
    /// Releases.
    pub releases: Vec<ReleaseView>,
    /// Attachments by content key (SHA-256 hex).
    pub attachments: BTreeMap<String, AttachmentView>,
    /// Members and roles.
    pub members: BTreeMap<String, String>,
    /// Heads.
    pub heads: Vec<String>,
    /// Number of changes.
    pub changes: usize,
}

/// Reads a design.
pub fn design_view(doc: &Document) -> Option<DesignView> {
    if doc.genesis().kind != Kind::Design {
        return None;
    }
    let d = doc.automerge();
    let text = get_obj(d, &ROOT, "description")
        .and_then(|t| d.text(&t).ok())
        .unwrap_or_default();
    let parameters = map_keys(d, &ROOT, "parameters")
        .into_iter()
        .map(|(k, p)| {
            (
                k,
                ParameterView {
                    value: get_f64(d, &p, "value"),
                    unit: get_str(d, &p, "unit"),
                },
            )
        })
        .collect();
    let releases = list_objs(d, &ROOT, "releases")
        .into_iter()
        .map(|r| ReleaseView {
            name: get_str(d, &r, "name").unwrap_or_default(),
            by: get_str(d, &r, "by").unwrap_or_default(),
            heads: get_str_list(d, &r, "heads"),
            at_ms: get_i64(d, &r, "at_ms"),
        })
        .collect();
    Some(DesignView {
        id: doc.id().to_string(),
        owner: doc.genesis().owner.to_string(),
        visibility: doc.genesis().visibility,
        title: get_str(d, &ROOT, "title").unwrap_or_default(),
        description: text,
        parameters,
        comments: comments_view(d, "comments"),
        releases,
        attachments: map_keys(d, &ROOT, "attachments")
            .into_iter()
            .map(|(k, a)| {
                (
                    k,
                    AttachmentView {
                        name: get_str(d, &a, "name").unwrap_or_default(),
                        media_type: get_str(d, &a, "media_type"),
                        size: get_u64(d, &a, "size"),
                        by: get_str(d, &a, "by"),
                    },
                )
            })
            .collect(),
        members: members_view(doc),
        heads: hex_heads(&d.get_heads()),
        changes: doc.change_count(),
    })
}
