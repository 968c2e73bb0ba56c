//! The HTTP API under `/api/v1`, the event stream, Prometheus metrics, the
//! OpenAPI document and the web console.
//!
//! Owns: turning HTTP requests into [`NodeHandle`] calls and errors into status
//! codes: bad JSON, missing, mistyped or unknown fields → 400 naming the field;
//! unknown id → 404; a rule violation → 403 (permission) or 409 (state); a
//! failed store write → 503 (nothing was acknowledged). Every route except
//! `/healthz` (and the static console page) needs `Authorization: Bearer <token>`.
//! Must not: touch documents except through the handle.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use cofab_protocol::model::{
    self, BidInput, CapacityInput, DesignInput, OrderInput, ProgressInput, Splice,
};
use cofab_protocol::{DocId, EditError, EnterpriseId, Kind, Role, Rule};
use futures::Stream;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

use crate::node::{NodeError, NodeHandle, RTT_BUCKETS_US};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Clone)]
struct AppState {
    node: NodeHandle,
    token: Arc<String>,
}

/// An API error with its status and a JSON body `{"error", "field"?, "rule"?}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({ "error": msg.into() }),
        }
    }
    fn field(field: &str, msg: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            body: json!({ "error": msg.into(), "field": field }),
        }
    }
    fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("no such {what}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

fn rule_name(r: &Rule) -> &'static str {
    match r {
        Rule::NotMember => "not_member",
        Rule::ReadOnlyRole(_) => "read_only_role",
        Rule::MembershipOwnerOnly => "membership_owner_only",
        Rule::UnknownRole(_) => "unknown_role",
        Rule::BuyerOnly(_) => "buyer_only",
        Rule::OwnBidOnly => "own_bid_only",
        Rule::BiddingClosed(_) => "bidding_closed",
        Rule::OwnProgressOnly => "own_progress_only",
        Rule::StatusTransition { .. } => "status_transition",
        Rule::InvalidValue(_) => "invalid_value",
        Rule::CapacityOwnerOnly => "capacity_owner_only",
        Rule::ReleaseNotAllowed => "release_not_allowed",
        Rule::StructureReplace => "structure_replace",
        Rule::UnknownField => "unknown_field",
        Rule::InitByOwnerOnly => "init_by_owner_only",
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::NotFound(_) => ApiError::not_found("document"),
            NodeError::Edit(EditError::Invalid { field, reason }) => {
                ApiError::field(field, format!("invalid {field}: {reason}"))
            }
            NodeError::Edit(EditError::Rule(v)) => {
                let status = match v.rule {
                    Rule::StatusTransition { .. }
                    | Rule::BiddingClosed(_)
                    | Rule::StructureReplace => StatusCode::CONFLICT,
                    _ => StatusCode::FORBIDDEN,
                };
                ApiError {
                    status,
                    body: json!({ "error": v.to_string(), "rule": rule_name(&v.rule), "path": v.path, "author": v.author.to_string() }),
                }
            }
            NodeError::Edit(EditError::Schema(s)) => {
                ApiError::new(StatusCode::CONFLICT, format!("document is not a valid {s}"))
            }
            NodeError::Edit(EditError::Automerge(s)) => ApiError::new(StatusCode::BAD_REQUEST, s),
            NodeError::Edit(EditError::WrongKind(kind)) => ApiError::not_found(kind),
            NodeError::Store(s) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("not stored: {s}"))
            }
            NodeError::Stopped => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "node is stopping")
            }
            NodeError::Start(s) | NodeError::Network(s) => {
                ApiError::new(StatusCode::BAD_GATEWAY, s)
            }
        }
    }
}

/// A JSON body whose errors name the offending field.
pub struct JsonBody<T>(pub T);

fn backticked(msg: &str) -> Option<String> {
    let start = msg.find('`')? + 1;
    let end = msg[start..].find('`')? + start;
    Some(msg[start..end].to_string())
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("body larger than {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, e.body_text())
            }
        })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(v) => Ok(JsonBody(v)),
            Err(err) => {
                let path = err.path().to_string();
                let msg = err.inner().to_string();
                let root = path == "." || path == "?";
                let name = backticked(&msg).unwrap_or_default();
                let field = if msg.starts_with("unknown field") {
                    if root {
                        name
                    } else {
                        path
                    }
                } else if msg.starts_with("missing field") {
                    if root {
                        name
                    } else {
                        format!("{path}.{name}")
                    }
                } else if root {
                    String::new()
                } else {
                    path
                };
                let body = if field.is_empty() {
                    json!({ "error": format!("invalid JSON: {msg}") })
                } else {
                    json!({ "error": format!("{field}: {msg}"), "field": field })
                };
                Err(ApiError {
                    status: StatusCode::BAD_REQUEST,
                    body,
                })
            }
        }
    }
}

fn doc_id(s: &str) -> Result<DocId, ApiError> {
    s.parse().map_err(|_| ApiError::not_found("document"))
}

async fn auth(
    State(st): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), st.token.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (see DATA_DIR/api-token)",
        )
        .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Builds the router for a node. `token` is the bearer token.
pub fn router(node: NodeHandle, token: String) -> Router {
    let st = AppState {
        node,
        token: Arc::new(token),
    };
    let api = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/peers", get(peers))
        .route("/api/v1/orders", post(post_order).get(list_orders))
        .route("/api/v1/orders/{id}", get(get_order))
        .route("/api/v1/orders/{id}/bids", post(post_bid))
        .route("/api/v1/orders/{id}/award", post(post_award))
        .route("/api/v1/orders/{id}/status", post(post_status))
        .route("/api/v1/orders/{id}/progress", post(post_progress))
        .route("/api/v1/orders/{id}/discussion", post(post_comment))
        .route("/api/v1/capacity", put(put_capacity).get(list_capacity))
        .route("/api/v1/designs", post(post_design).get(list_designs))
        .route("/api/v1/designs/{id}", get(get_design))
        .route("/api/v1/designs/{id}/text", post(post_text))
        .route("/api/v1/designs/{id}/text/batch", post(post_text_batch))
        .route("/api/v1/designs/{id}/parameters", post(post_parameter))
        .route("/api/v1/designs/{id}/comments", post(post_comment))
        .route("/api/v1/designs/{id}/releases", post(post_release))
        .route(
            "/api/v1/designs/{id}/attachments/{name}",
            put(put_attachment).layer(DefaultBodyLimit::max(model::MAX_ATTACHMENT_BYTES)),
        )
        .route("/api/v1/designs/{id}/files/{key}", get(get_attachment))
        .route("/api/v1/docs", get(list_docs))
        .route("/api/v1/docs/{id}/heads", get(doc_heads))
        .route("/api/v1/docs/{id}/sync", get(doc_sync))
        .route("/api/v1/docs/{id}/members", post(post_member))
        .route("/api/v1/alerts", get(list_alerts))
        .route("/api/v1/alerts/trust", put(put_trust))
        .route("/api/v1/events", get(events))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/vocabulary", get(vocabulary))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(st.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/", get(|| async { Html(CONSOLE_HTML) }))
        .merge(api)
        .fallback(|| async { ApiError::not_found("route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(st)
}

/// The web console (one static page; it asks for the token and calls the API).
pub const CONSOLE_HTML: &str = include_str!("console.html");

async fn status(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let info = st.node.info.clone();
    let v = st
        .node
        .read(move |c| {
            json!({
                "peer_id": info.peer_id.to_string(),
                "enterprise_id": info.enterprise_id.to_string(),
                "name": info.name,
                "incarnation": info.incarnation,
                "listen_addrs": c.listen_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "connected_peers": c.peers.len(),
                "documents": c.replica.docs().count(),
            })
        })
        .await?;
    Ok(Json(v))
}

async fn peers(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let v = st.node.read(|c| json!(c.peers)).await?;
    Ok(Json(v))
}

async fn post_order(
    State(st): State<AppState>,
    JsonBody(input): JsonBody<OrderInput>,
) -> Result<impl IntoResponse, ApiError> {
    input
        .validate()
        .map_err(|e| ApiError::from(NodeError::Edit(e)))?;
    let id = st
        .node
        .create(move |kp, now, nonce| model::create_order(kp, &input, now, nonce))
        .await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id.to_string() }))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderFilter {
    status: Option<String>,
    process: Option<String>,
    material: Option<String>,
}

async fn list_orders(
    State(st): State<AppState>,
    q: Result<Query<OrderFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(f) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let v = st
        .node
        .read(move |c| {
            let list: Vec<_> = c
                .replica
                .docs()
                .filter_map(model::order_view)
                .filter(|o| f.status.as_ref().is_none_or(|s| &o.status == s))
                .filter(|o| f.process.as_ref().is_none_or(|p| o.processes.contains(p)))
                .filter(|o| {
                    f.material
                        .as_ref()
                        .is_none_or(|m| o.material.as_ref() == Some(m))
                })
                .collect();
            json!(list)
        })
        .await?;
    Ok(Json(v))
}

async fn get_order(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = doc_id(&id)?;
    let v = st
        .node
        .read(move |c| c.replica.doc(&id).and_then(model::order_view))
        .await?;
    v.map(|o| Json(json!(o)))
        .ok_or_else(|| ApiError::not_found("order"))
}

/// Runs a typed edit on document `id` (404 if absent or not of `kind`); answers `{"ok": true}`
/// once the change is durable.
async fn edit_doc(
    st: &AppState,
    id: &str,
    kind: Option<Kind>,
    f: impl FnOnce(
            &mut cofab_protocol::Document,
            &cofab_protocol::Keypair,
            i64,
        ) -> Result<cofab_protocol::Accepted, EditError>
        + Send
        + 'static,
) -> Result<Json<Value>, ApiError> {
    crate::node::hop("http");
    let id = doc_id(id)?;
    // The kind is checked inside the edit: one trip through the event loop per write.
    st.node
        .edit(id, move |d, kp, now| match kind {
            Some(k) if d.genesis().kind != k => Err(EditError::WrongKind(k.as_str())),
            _ => f(d, kp, now),
        })
        .await?;
    Ok(Json(json!({ "ok": true })))
}

async fn ensure_kind(st: &AppState, id: DocId, kind: Kind) -> Result<(), ApiError> {
    let k = st
        .node
        .read(move |c| c.replica.doc(&id).map(|d| d.genesis().kind))
        .await?;
    match k {
        Some(k) if k == kind => Ok(()),
        _ => Err(ApiError::not_found(kind.as_str())),
    }
}

async fn post_bid(
    State(st): State<AppState>,
    Path(id): Path<String>,
    JsonBody(bid): JsonBody<BidInput>,
) -> Result<Json<Value>, ApiError> {
    edit_doc(&st, &id, Some(Kind::Order), move |d, kp, now| {
        model::place_bid(d, kp, now, &bid)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AwardBody {
    awards: BTreeMap<EnterpriseId, u64>,
}

async fn post_award(
    State(st): State<AppState>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<AwardBody>,
) -> Result<Json<Value>, ApiError> {
    edit_doc(&st, &id, Some(Kind::Order), move |d, kp, now| {
        model::award(d, kp, now, &b.awards)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusBody {
    status: String,
}

async fn post_status(
    State(st): State<AppState>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<StatusBody>,
) -> Result<Json<Value>, ApiError> {
    edit_doc(&st, &id, Some(Kind::Order), move |d, kp, now| {
        model::set_status(d, kp, now, &b.status)
    })
    .await
}

async fn post_progress(
    State(st): State<AppState>,
    Path(id): Path<String>,
    JsonBody(p): JsonBody<ProgressInput>,
) -> Result<Json<Value>, ApiError> {
    edit_doc(&st, &id, Some(Kind::Order), move |d, kp, now| {
        model::report_progress(d, kp, now, &p)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommentBody {
    text: String,
}

async fn post_comment(
    State(st): State<AppState>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<CommentBody>,
) -> Result<Json<Value>, ApiError> {
    edit_doc(&st, &id, None, move |d, kp, now| {
        model::comment(d, kp, now, &b.text)
    })
    .await
}

async fn put_capacity(
    State(st): State<AppState>,
    JsonBody(c): JsonBody<CapacityInput>,
) -> Result<impl IntoResponse, ApiError> {
    c.validate()
        .map_err(|e| ApiError::from(NodeError::Edit(e)))?;
    let me = st.node.info.enterprise_id;
    let existing = st
        .node
        .read(move |ctx| {
            ctx.replica
                .docs()
                .find(|d| d.genesis().kind == Kind::Capacity && d.genesis().owner == me)
                .map(|d| d.id())
        })
        .await?;
    match existing {
        Some(id) => {
            st.node
                .edit(id, move |d, kp, now| model::update_capacity(d, kp, now, &c))
                .await?;
            Ok((StatusCode::OK, Json(json!({ "id": id.to_string() }))))
        }
        None => {
            let id = st
                .node
                .create(move |kp, now, nonce| model::create_capacity(kp, &c, now, nonce))
                .await?;
            Ok((StatusCode::CREATED, Json(json!({ "id": id.to_string() }))))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapacityFilter {
    process: Option<String>,
    material: Option<String>,
    region: Option<String>,
}

async fn list_capacity(
    State(st): State<AppState>,
    q: Result<Query<CapacityFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(f) = q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let v = st
        .node
        .read(move |c| {
            let list: Vec<_> = c
                .replica
                .docs()
                .filter_map(model::capacity_view)
                .filter(|v| {
                    f.process.as_ref().is_none_or(|p| {
                        v.content.capabilities.iter().any(|c| &c.process == p)
                            || v.content.machines.iter().any(|m| &m.process == p)
                    })
                })
                .filter(|v| {
                    f.material.as_ref().is_none_or(|m| {
                        v.content
                            .capabilities
                            .iter()
                            .any(|c| c.materials.contains(m))
                    })
                })
                .filter(|v| {
                    f.region.as_ref().is_none_or(|r| {
                        v.content
                            .region
                            .as_ref()
                            .is_some_and(|x| x == r || x.starts_with(&format!("{r}-")))
                    })
                })
                .collect();
            json!(list)
        })
        .await?;
    Ok(Json(v))
}

async fn post_design(
    State(st): State<AppState>,
    JsonBody(d): JsonBody<DesignInput>,
) -> Result<impl IntoResponse, ApiError> {
    let id = st
        .node
        .create(move |kp, now, nonce| model::create_design(kp, &d, now, nonce))
        .await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id.to_string() }))))
}

async fn list_designs(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let v = st
        .node
        .read(|c| {
            let list: Vec<_> = c
                .replica
                .docs()
                .filter_map(model::design_view)
                .map(|d| json!({ "id": d.id, "title": d.title, "owner": d.owner, "visibility": d.visibility, "changes": d.changes, "releases": d.releases.len() }))
                .collect();
            json!(list)
        })
        .await?;
    Ok(Json(v))
}

async fn get_design(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = doc_id(&id)?;
    let v = st
        .node
        .read(move |c| c.replica.doc(&id).and_then(model::design_view))
        .await?;
    v.map(|d| Json(json!(d)))
        .ok_or_else(|| ApiError::not_found("design"))
}

async fn post_text(
    State(st): State<AppState>,
    Path(id): Path<String>,
    JsonBody(s): JsonBody<Splice>,
) -> Result<Json<Value>, ApiError> {
    edit_doc(&st, &id, Some(Kind::Design), move |d, kp, now| {
        model::splice_description(d, kp, now, &s)
    })
    .await
}

/// Several splices in one request, applied in order as one change each.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SplicesBody {
    splices: Vec<Splice>,
}

async fn post_text_batch(
    State(st): State<AppState>,
    Path(id): Path<String>,
    JsonBody(b): JsonBody<SplicesBody>,
) -> Result<Json<Value>, ApiError> {
    let n = b.splices.len();
    let _ = edit_doc(&st, &id, Some(Kind::Design), move |d, kp, now| {
        model::splice_description_many(d, kp, now, &b.splices)
    })
    .await?;
    Ok(Json(json!({ "ok": true, "changes": n })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParameterBody {
    name: String,
    value: f64,
    #[serde(default)]
    unit: String,
}

async fn post_parameter(
    State(st): State<AppState>,
    Path(id): Path<String>,
    JsonBody(p): JsonBody<ParameterBody>,
) -> Result<Json<Value>, ApiError> {
    edit_doc(&st, &id, Some(Kind::Design), move |d, kp, now| {
        model::set_parameter(d, kp, now, &p.name, p.value, &p.unit)
    })
    .await
}

async fn put_attachment(
    State(st): State<AppState>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "attachment larger than {} bytes",
                    model::MAX_ATTACHMENT_BYTES
                ),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, e.body_text())
        }
    })?;
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_string();
    let id = doc_id(&id)?;
    ensure_kind(&st, id, Kind::Design).await?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    st.node
        .edit(id, move |d, kp, now| {
            let (key, acc) = model::add_attachment(d, kp, now, &name, &media, &body)?;
            let _ = tx.send(key);
            Ok(acc)
        })
        .await?;
    let key = rx
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "node stopped"))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "key": key, "url": format!("/api/v1/designs/{id}/files/{key}") })),
    ))
}

async fn get_attachment(
    State(st): State<AppState>,
    Path((id, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let id = doc_id(&id)?;
    let found = st
        .node
        .read(move |c| {
            c.replica
                .doc(&id)
                .and_then(|d| model::attachment_content(d, &key))
        })
        .await?;
    let (media, bytes) = found.ok_or_else(|| ApiError::not_found("attachment"))?;
    Ok(([(header::CONTENT_TYPE, media)], bytes).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    name: String,
}

async fn post_release(
    State(st): State<AppState>,
    Path(id): Path<String>,
    JsonBody(r): JsonBody<ReleaseBody>,
) -> Result<Json<Value>, ApiError> {
    edit_doc(&st, &id, Some(Kind::Design), move |d, kp, now| {
        model::release(d, kp, now, &r.name)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberBody {
    enterprise_id: EnterpriseId,
    /// `null` removes the member.
    role: Option<Role>,
}

async fn post_member(
    State(st): State<AppState>,
    Path(id): Path<String>,
    JsonBody(m): JsonBody<MemberBody>,
) -> Result<Json<Value>, ApiError> {
    edit_doc(&st, &id, None, move |d, kp, now| {
        model::set_member(d, kp, now, m.enterprise_id, m.role)
    })
    .await
}

async fn list_docs(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let v = st
        .node
        .read(|c| {
            json!(c
                .replica
                .docs()
                .map(|d| json!({ "id": d.id().to_string(), "kind": d.genesis().kind, "owner": d.genesis().owner.to_string(), "visibility": d.genesis().visibility, "changes": d.change_count() }))
                .collect::<Vec<_>>())
        })
        .await?;
    Ok(Json(v))
}

async fn doc_heads(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = doc_id(&id)?;
    let v = st
        .node
        .read(move |c| c.replica.doc(&id).map(|d| json!({ "id": id.to_string(), "heads": d.heads().iter().map(|h| h.to_string()).collect::<Vec<_>>(), "changes": d.change_count() })))
        .await?;
    v.map(Json).ok_or_else(|| ApiError::not_found("document"))
}

async fn doc_sync(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = doc_id(&id)?;
    let v = st
        .node
        .read(move |c| {
            c.replica.doc(&id)?;
            let peers: Vec<Value> = c
                .replica
                .sync_state(&id)
                .into_iter()
                .map(|s| {
                    json!({
                        "peer_id": crate::network::peer_id_of(&s.peer).to_string(),
                        "enterprise_id": s.peer.to_string(),
                        "connected": s.connected,
                        "has_all_our_changes": s.has_all_ours,
                        "same_heads": s.same_heads,
                        "last_synced_ms": s.last_heard_ms,
                        "failed": s.failed,
                    })
                })
                .collect();
            Some(json!({ "id": id.to_string(), "peers": peers }))
        })
        .await?;
    v.map(Json).ok_or_else(|| ApiError::not_found("document"))
}

async fn events(
    State(st): State<AppState>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = st.node.subscribe();
    let stream = BroadcastStream::new(rx)
        .filter_map(|r| r.ok())
        .map(|e| Ok(SseEvent::default().json_data(&e).unwrap_or_default()));
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn list_alerts(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let v = st
        .node
        .read(|c| {
            json!({
                "trusted": c.trusted.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                "banned_peers": c.banned,
                "alerts": c.alerts.iter().rev().collect::<Vec<_>>(),
            })
        })
        .await?;
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustBody {
    /// Enterprises whose alerts this node acts on (replaces the list).
    enterprise_ids: Vec<EnterpriseId>,
}

async fn put_trust(
    State(st): State<AppState>,
    JsonBody(b): JsonBody<TrustBody>,
) -> Result<Json<Value>, ApiError> {
    let set: std::collections::BTreeSet<EnterpriseId> = b.enterprise_ids.into_iter().collect();
    let n = set.len();
    st.node.set_alert_trust(set).await?;
    Ok(Json(json!({ "trusted": n })))
}

async fn vocabulary() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        model::VOCABULARY_JSON,
    )
}

async fn metrics(State(st): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let m = st.node.metrics.clone();
    let text = st
        .node
        .read(move |c| {
            let mut s = String::new();
            let stats = &c.replica.stats;
            let mut line = |name: &str, help: &str, typ: &str, v: String| {
                s.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {typ}\n{v}"));
            };
            line(
                "cofab_peers",
                "Connected peers.",
                "gauge",
                format!("cofab_peers {}\n", c.peers.len()),
            );
            line(
                "cofab_documents",
                "Documents held.",
                "gauge",
                format!("cofab_documents {}\n", c.replica.docs().count()),
            );
            line(
                "cofab_changes_applied_total",
                "Changes accepted from peers.",
                "counter",
                format!("cofab_changes_applied_total {}\n", stats.changes_applied),
            );
            line(
                "cofab_changes_local_total",
                "Changes made on this node.",
                "counter",
                format!("cofab_changes_local_total {}\n", stats.changes_local),
            );
            let mut rej = String::new();
            let mut reasons: BTreeMap<String, u64> = c.rejected.clone();
            for (k, v) in &stats.rejected {
                reasons.entry(k.to_string()).or_insert(*v);
            }
            for (k, v) in reasons {
                rej.push_str(&format!("cofab_rejected_total{{reason=\"{k}\"}} {v}\n"));
            }
            line(
                "cofab_rejected_total",
                "Input refused, by reason.",
                "counter",
                rej,
            );
            line(
                "cofab_frames_in_total",
                "Sync frames received.",
                "counter",
                format!(
                    "cofab_frames_in_total {}\n",
                    m.frames_in.load(Ordering::Relaxed)
                ),
            );
            line(
                "cofab_frames_out_total",
                "Sync frames sent.",
                "counter",
                format!(
                    "cofab_frames_out_total {}\n",
                    m.frames_out.load(Ordering::Relaxed)
                ),
            );
            line(
                "cofab_store_commits_total",
                "Durable group commits.",
                "counter",
                format!(
                    "cofab_store_commits_total {}\n",
                    m.commits.load(Ordering::Relaxed)
                ),
            );
            line(
                "cofab_store_bytes",
                "Store size on disk.",
                "gauge",
                format!("cofab_store_bytes {}\n", c.store.size_on_disk()),
            );
            let mut h = String::new();
            for (i, b) in RTT_BUCKETS_US.iter().enumerate() {
                let le = if *b == u64::MAX {
                    "+Inf".to_string()
                } else {
                    format!("{}", *b as f64 / 1e6)
                };
                h.push_str(&format!(
                    "cofab_sync_latency_seconds_bucket{{le=\"{le}\"}} {}\n",
                    m.rtt_buckets[i].load(Ordering::Relaxed)
                ));
            }
            h.push_str(&format!(
                "cofab_sync_latency_seconds_sum {}\n",
                m.rtt_sum_us.load(Ordering::Relaxed) as f64 / 1e6
            ));
            h.push_str(&format!(
                "cofab_sync_latency_seconds_count {}\n",
                m.rtt_count.load(Ordering::Relaxed)
            ));
            line(
                "cofab_sync_latency_seconds",
                "Round trip of sync frames to peers.",
                "histogram",
                h,
            );
            s
        })
        .await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}

async fn openapi() -> Json<Value> {
    Json(openapi_doc())
}

fn op(summary: &str, body: Option<&str>, ok: &str) -> Value {
    let mut v = json!({
        "summary": summary,
        "security": [{ "bearer": [] }],
        "responses": {
            ok: { "description": "success" },
            "400": { "description": "bad JSON or invalid field; body names the field", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } },
            "401": { "description": "missing or wrong bearer token" },
            "403": { "description": "a rule forbids this (body names the rule)" },
            "404": { "description": "unknown id" },
            "409": { "description": "the document's state forbids this (e.g. status lifecycle)" }
        }
    });
    if let Some(b) = body {
        v["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{b}") } } } });
    }
    v
}

/// The OpenAPI 3.1 document of the API.
pub fn openapi_doc() -> Value {
    let id =
        json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }]);
    let mut paths = serde_json::Map::new();
    let mut add = |path: &str, method: &str, v: Value| {
        let e = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        let mut v = v;
        if path.contains("{id}") {
            v["parameters"] = id.clone();
        }
        e[method] = v;
    };
    add(
        "/api/v1/status",
        "get",
        op(
            "Node identity and incarnation, listen addresses, peer and document counts",
            None,
            "200",
        ),
    );
    add("/api/v1/peers", "get", op("Connected peers", None, "200"));
    add(
        "/api/v1/orders",
        "post",
        op(
            "Post an order (request for quotation)",
            Some("OrderInput"),
            "201",
        ),
    );
    add(
        "/api/v1/orders",
        "get",
        op(
            "List orders (filters: status, process, material)",
            None,
            "200",
        ),
    );
    add(
        "/api/v1/orders/{id}",
        "get",
        op("One order with bids, award, progress", None, "200"),
    );
    add(
        "/api/v1/orders/{id}/bids",
        "post",
        op("Place or replace this node's bid", Some("BidInput"), "200"),
    );
    add(
        "/api/v1/orders/{id}/award",
        "post",
        op(
            "Award the order: {\"awards\": {enterprise_id: quantity}}",
            Some("Award"),
            "200",
        ),
    );
    add(
        "/api/v1/orders/{id}/status",
        "post",
        op("Move the status along the lifecycle", Some("Status"), "200"),
    );
    add(
        "/api/v1/orders/{id}/progress",
        "post",
        op(
            "Report production progress (awarded supplier)",
            Some("ProgressInput"),
            "200",
        ),
    );
    add(
        "/api/v1/orders/{id}/discussion",
        "post",
        op("Add to the discussion", Some("Comment"), "200"),
    );
    add(
        "/api/v1/capacity",
        "put",
        op(
            "Publish this node's capacity (replaces it)",
            Some("CapacityInput"),
            "200",
        ),
    );
    add(
        "/api/v1/capacity",
        "get",
        op(
            "Capacity across the network (filters: process, material, region)",
            None,
            "200",
        ),
    );
    add(
        "/api/v1/designs",
        "post",
        op("Create a design", Some("DesignInput"), "201"),
    );
    add("/api/v1/designs", "get", op("List designs", None, "200"));
    add("/api/v1/designs/{id}", "get", op("One design", None, "200"));
    add(
        "/api/v1/designs/{id}/text",
        "post",
        op("Splice the description text", Some("Splice"), "200"),
    );
    add(
        "/api/v1/designs/{id}/text/batch",
        "post",
        op(
            "Apply several splices in order (body {\"splices\": [Splice, ...]}, at most 10,000), one change each, one signature for the run; all or nothing",
            None,
            "200",
        ),
    );
    add(
        "/api/v1/designs/{id}/parameters",
        "post",
        op("Set a parameter", Some("Parameter"), "200"),
    );
    add(
        "/api/v1/designs/{id}/comments",
        "post",
        op("Comment on a design", Some("Comment"), "200"),
    );
    add(
        "/api/v1/designs/{id}/releases",
        "post",
        op(
            "Release a revision (owner or approver)",
            Some("Release"),
            "200",
        ),
    );
    add("/api/v1/designs/{id}/attachments/{name}", "put", op("Attach a file (raw body, Content-Type kept; at most 4 MiB); content-addressed by SHA-256", None, "201"));
    add(
        "/api/v1/designs/{id}/files/{key}",
        "get",
        op("Download an attachment by its SHA-256 key", None, "200"),
    );
    add("/api/v1/docs", "get", op("All documents held", None, "200"));
    add(
        "/api/v1/docs/{id}/heads",
        "get",
        op("Heads of a document", None, "200"),
    );
    add(
        "/api/v1/docs/{id}/sync",
        "get",
        op("Per-peer sync state of a document", None, "200"),
    );
    add(
        "/api/v1/docs/{id}/members",
        "post",
        op(
            "Add, change or remove (role null) a member (owner only)",
            Some("Member"),
            "200",
        ),
    );
    add("/api/v1/alerts", "get", op("Security alerts published by this node and received from others; trusted reporters; banned peers", None, "200"));
    add(
        "/api/v1/alerts/trust",
        "put",
        op(
            "Set the enterprises whose alerts this node acts on (their reported peers are banned)",
            Some("Trust"),
            "200",
        ),
    );
    add(
        "/api/v1/events",
        "get",
        op(
            "Server-sent events: doc_updated, peer_connected, peer_disconnected, rejected, alert",
            None,
            "200",
        ),
    );
    add("/metrics", "get", op("Prometheus metrics", None, "200"));
    paths.insert("/healthz".into(), json!({ "get": { "summary": "Liveness", "responses": { "200": { "description": "ok" } } } }));
    json!({
        "openapi": "3.1.0",
        "info": { "title": "cofab node API", "version": "1" },
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "properties": { "error": { "type": "string" }, "field": { "type": "string" }, "rule": { "type": "string" } }, "required": ["error"] },
                "OrderInput": { "type": "object", "additionalProperties": false, "required": ["title", "quantity"], "properties": {
                    "title": { "type": "string" }, "quantity": { "type": "integer", "minimum": 1 }, "unit": { "type": "string" },
                    "material": { "type": "string" }, "processes": { "type": "array", "items": { "type": "string" } },
                    "tolerance": { "type": "string" }, "certifications": { "type": "array", "items": { "type": "string" } },
                    "due_date": { "type": "string", "format": "date" }, "ship_to": { "type": "string", "description": "ISO 3166-2" },
                    "incoterms": { "type": "string" }, "target_price": { "type": "number" }, "currency": { "type": "string", "description": "ISO 4217" },
                    "description": { "type": "string" }, "design": { "type": "string" }, "visibility": { "enum": ["public", "members"] },
                    "status": { "enum": ["open", "draft"] }, "members": { "type": "object", "additionalProperties": { "enum": ["supplier", "viewer", "editor", "approver"] } } } },
                "BidInput": { "type": "object", "additionalProperties": false, "required": ["unit_price", "currency", "lead_time_days"], "properties": {
                    "unit_price": { "type": "number" }, "currency": { "type": "string" }, "quantity": { "type": "integer" }, "lead_time_days": { "type": "integer" },
                    "tooling_cost": { "type": "number" }, "valid_until": { "type": "string", "format": "date" }, "note": { "type": "string" } } },
                "Award": { "type": "object", "additionalProperties": false, "required": ["awards"], "properties": { "awards": { "type": "object", "additionalProperties": { "type": "integer" } } } },
                "Status": { "type": "object", "additionalProperties": false, "required": ["status"], "properties": { "status": { "enum": cofab_protocol::rules::STATUSES } } },
                "ProgressInput": { "type": "object", "additionalProperties": false, "properties": { "produced": { "type": "integer" }, "scrapped": { "type": "integer" }, "milestone": { "type": "string" }, "quality": { "type": "string" }, "machine_status": { "type": "string" } } },
                "Comment": { "type": "object", "additionalProperties": false, "required": ["text"], "properties": { "text": { "type": "string" } } },
                "CapacityInput": { "type": "object", "additionalProperties": false, "required": ["name"], "properties": {
                    "name": { "type": "string" }, "region": { "type": "string" }, "certifications": { "type": "array", "items": { "type": "string" } },
                    "capabilities": { "type": "array", "items": { "type": "object", "properties": { "process": { "type": "string" }, "materials": { "type": "array", "items": { "type": "string" } }, "max_part_mm": { "type": "array", "items": { "type": "integer" } }, "tolerance": { "type": "string" } } } },
                    "machines": { "type": "array", "items": { "type": "object", "properties": { "name": { "type": "string" }, "process": { "type": "string" }, "free_hours": { "type": "object", "additionalProperties": { "type": "integer" } } } } },
                    "lead_time_days": { "type": "integer" }, "load_pct": { "type": "integer" } } },
                "DesignInput": { "type": "object", "additionalProperties": false, "required": ["title"], "properties": { "title": { "type": "string" }, "description": { "type": "string" }, "visibility": { "enum": ["public", "members"] }, "members": { "type": "object" } } },
                "Splice": { "type": "object", "additionalProperties": false, "required": ["pos"], "properties": { "pos": { "type": "integer" }, "delete": { "type": "integer" }, "insert": { "type": "string" } } },
                "Parameter": { "type": "object", "additionalProperties": false, "required": ["name", "value"], "properties": { "name": { "type": "string" }, "value": { "type": "number" }, "unit": { "type": "string" } } },
                "Trust": { "type": "object", "additionalProperties": false, "required": ["enterprise_ids"], "properties": { "enterprise_ids": { "type": "array", "items": { "type": "string" } } } },
                "Release": { "type": "object", "additionalProperties": false, "required": ["name"], "properties": { "name": { "type": "string" } } },
                "Member": { "type": "object", "additionalProperties": false, "required": ["enterprise_id", "role"], "properties": { "enterprise_id": { "type": "string" }, "role": { "type": ["string", "null"] } } }
            }
        }
    })
}
