//! The HTTP API as an integrator meets it: authentication, the routes the issue fixes,
//! and a typed, field-naming error for every kind of bad input.

use cofab_node::{api, Node, NodeConfig};
use cofab_protocol::Keypair;
use serde_json::{json, Value};

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
    _node: Node,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn start() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(NodeConfig::new(
            Keypair::from_secret([42; 32]),
            "API Test AG",
            dir.path().join("store"),
        ))
        .await
        .unwrap();
        let token = "test-token-123".to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = api::router(node.handle.clone(), token.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Api {
            base,
            token,
            http: reqwest::Client::new(),
            _node: node,
            _dir: dir,
        }
    }
    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let rb = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            "PUT" => self.http.put(url),
            _ => unreachable!(),
        };
        let rb = rb
            .bearer_auth(&self.token)
            .header("content-type", "application/json");
        let rb = match body {
            Some(b) => rb.body(b.to_string()),
            None => rb,
        };
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

const ORDER: &str = r#"{"title": "Bracket, anodised aluminium", "quantity": 500, "material": "AL6061-T6", "processes": ["cnc-milling"], "due_date": "2027-03-01", "visibility": "public"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_except_for_healthz() {
    let a = Api::start().await;
    let r = reqwest::get(format!("{}/healthz", a.base)).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    for path in [
        "/api/v1/status",
        "/api/v1/orders",
        "/metrics",
        "/api/v1/openapi.json",
    ] {
        let r = reqwest::get(format!("{}{path}", a.base)).await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} without a token");
        let r = a
            .http
            .get(format!("{}{path}", a.base))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} with a wrong token");
    }
    let (s, v) = a.call("GET", "/api/v1/status", None).await;
    assert_eq!(s, 200);
    for k in [
        "peer_id",
        "enterprise_id",
        "name",
        "listen_addrs",
        "connected_peers",
        "documents",
    ] {
        assert!(v.get(k).is_some(), "status lacks {k}: {v}");
    }
    assert_eq!(v["name"], "API Test AG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_posted_read_and_bad_input_names_the_field() {
    let a = Api::start().await;
    let (s, v) = a.call("POST", "/api/v1/orders", Some(ORDER)).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let (s, o) = a.call("GET", &format!("/api/v1/orders/{id}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(o["quantity"], 500);
    assert_eq!(o["status"], "open");
    let (s, list) = a.call("GET", "/api/v1/orders", None).await;
    assert_eq!(s, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);

    let cases = [
        (
            r#"{"title": "x", "quantity": 5, "colour": "red"}"#,
            "colour",
        ),
        (r#"{"quantity": 5}"#, "title"),
        (r#"{"title": "x", "quantity": "five"}"#, "quantity"),
        (
            r#"{"title": "x", "quantity": 5, "due_date": "2027-02-30"}"#,
            "due_date",
        ),
        (r#"{"title": "x", "quantity": 0}"#, "quantity"),
        (
            r#"{"title": "x", "quantity": 5, "processes": ["telekinesis"]}"#,
            "processes",
        ),
        (
            r#"{"title": "x", "quantity": 5, "currency": "euro"}"#,
            "currency",
        ),
    ];
    for (body, field) in cases {
        let (s, v) = a.call("POST", "/api/v1/orders", Some(body)).await;
        assert_eq!(s, 400, "{body}: {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
    }
    for body in ["{bad", "", "[]", "null"] {
        let (s, v) = a.call("POST", "/api/v1/orders", Some(body)).await;
        assert_eq!(s, 400, "{body:?}: {v}");
        assert!(v["error"].is_string());
    }
    // unknown and malformed ids
    let (s, _) = a
        .call(
            "GET",
            "/api/v1/orders/00000000000000000000000000000000",
            None,
        )
        .await;
    assert_eq!(s, 404);
    let (s, _) = a.call("GET", "/api/v1/orders/not-an-id", None).await;
    assert_eq!(s, 404);
    // a rule violation: the status may not skip steps (409, naming the rule)
    let (s, v) = a
        .call(
            "POST",
            &format!("/api/v1/orders/{id}/status"),
            Some(r#"{"status": "shipped"}"#),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["rule"], "status_transition");
    // the buyer may not bid on its own order (403, naming the rule)
    let (s, v) = a
        .call(
            "POST",
            &format!("/api/v1/orders/{id}/bids"),
            Some(r#"{"unit_price": 4.2, "currency": "EUR", "lead_time_days": 10}"#),
        )
        .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["rule"], "own_bid_only");
    // nothing of that changed the order
    let (_, after) = a.call("GET", &format!("/api/v1/orders/{id}"), None).await;
    assert_eq!(after["heads"], o["heads"]);
    // the body limit at its edge: exactly MAX_BODY_BYTES is read (and refused for its
    // over-long text, 400), one byte more is refused unread (413)
    let head = r#"{"title": "x", "quantity": 1, "description": "#;
    let fill = api::MAX_BODY_BYTES - head.len() - 3;
    let exact = format!("{head}\"{}\"}}", "d".repeat(fill));
    assert_eq!(exact.len(), api::MAX_BODY_BYTES);
    let (s, v) = a.call("POST", "/api/v1/orders", Some(&exact)).await;
    assert_eq!(s, 400, "{v}");
    let over = format!("{exact} ");
    let (s, _) = a.call("POST", "/api/v1/orders", Some(&over)).await;
    assert_eq!(s, 413);
    let (s, _) = a.call("GET", "/api/v1/no-such-route", None).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_designs_docs_metrics_and_openapi() {
    let a = Api::start().await;
    let cap = json!({"name": "API Test AG", "region": "DE-BW", "capabilities": [{"process": "cnc-milling", "materials": ["AL6061-T6"]}],
        "machines": [{"name": "DMU 50", "process": "cnc-milling", "free_hours": {"2027-W09": 32}}]}).to_string();
    let (s, v) = a.call("PUT", "/api/v1/capacity", Some(&cap)).await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = a.call("PUT", "/api/v1/capacity", Some(&cap)).await;
    assert_eq!(s, 200, "a second PUT replaces the same document");
    let (_, found) = a
        .call(
            "GET",
            "/api/v1/capacity?process=cnc-milling&region=DE",
            None,
        )
        .await;
    assert_eq!(found.as_array().unwrap().len(), 1);
    let (_, none) = a
        .call("GET", "/api/v1/capacity?process=casting", None)
        .await;
    assert_eq!(none.as_array().unwrap().len(), 0);
    let (s, v) = a.call("PUT", "/api/v1/capacity", Some(r#"{"name": "x", "machines": [{"name": "m", "process": "cnc-milling", "free_hours": {"week 9": 3}}]}"#)).await;
    assert_eq!(
        (s, v["field"].as_str()),
        (400, Some("machines.free_hours")),
        "{v}"
    );

    let (s, v) = a
        .call(
            "POST",
            "/api/v1/designs",
            Some(r#"{"title": "Housing", "description": "wall 2 mm"}"#),
        )
        .await;
    assert_eq!(s, 201);
    let id = v["id"].as_str().unwrap().to_string();
    let (s, _) = a
        .call(
            "POST",
            &format!("/api/v1/designs/{id}/text"),
            Some(r#"{"pos": 4, "delete": 0, "insert": "thickness "}"#),
        )
        .await;
    assert_eq!(s, 200);
    let (_, d) = a.call("GET", &format!("/api/v1/designs/{id}"), None).await;
    assert_eq!(d["description"], "wallthickness  2 mm");
    let (s, v) = a
        .call(
            "POST",
            &format!("/api/v1/designs/{id}/text"),
            Some(r#"{"pos": 999, "insert": "x"}"#),
        )
        .await;
    assert_eq!((s, v["field"].as_str()), (400, Some("pos")), "{v}");
    // several splices in one request: applied in order, all or nothing
    let (s, v) = a
        .call(
            "POST",
            &format!("/api/v1/designs/{id}/text/batch"),
            Some(r#"{"splices": [{"pos": 0, "insert": "A"}, {"pos": 1, "insert": "B"}]}"#),
        )
        .await;
    assert_eq!((s, v["changes"].as_u64()), (200, Some(2)), "{v}");
    let (s, v) = a
        .call(
            "POST",
            &format!("/api/v1/designs/{id}/text/batch"),
            Some(r#"{"splices": [{"pos": 0, "insert": "C"}, {"pos": 999, "insert": "D"}]}"#),
        )
        .await;
    assert_eq!((s, v["field"].as_str()), (400, Some("splices")), "{v}");
    let (s, v) = a
        .call(
            "POST",
            &format!("/api/v1/designs/{id}/text/batch"),
            Some(r#"{"splices": [{"pos": 0, "insrt": "C"}]}"#),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("insrt"), "{v}");
    let (_, d) = a.call("GET", &format!("/api/v1/designs/{id}"), None).await;
    assert_eq!(
        d["description"], "ABwallthickness  2 mm",
        "the refused run left nothing"
    );
    // a design route given an order id: 404 naming the kind, nothing written
    let (_, o) = a.call("POST", "/api/v1/orders", Some(ORDER)).await;
    let oid = o["id"].as_str().unwrap().to_string();
    let (s, v) = a
        .call(
            "POST",
            &format!("/api/v1/designs/{oid}/text/batch"),
            Some(r#"{"splices": [{"pos": 0, "insert": "x"}]}"#),
        )
        .await;
    assert_eq!(s, 404, "{v}");
    // attachments: stored content-addressed, read back byte for byte; the size limit at its edge
    let file: Vec<u8> = (0..cofab_protocol::model::MAX_ATTACHMENT_BYTES)
        .map(|i| (i % 251) as u8)
        .collect();
    let url = format!("{}/api/v1/designs/{id}/attachments/housing.step", a.base);
    let r = a
        .http
        .put(&url)
        .bearer_auth(&a.token)
        .header("content-type", "model/step")
        .body(file.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let key = r.json::<Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let r = a
        .http
        .get(format!("{}/api/v1/designs/{id}/files/{key}", a.base))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "model/step");
    assert!(
        r.bytes().await.unwrap().as_ref() == file.as_slice(),
        "attachment read back differs"
    );
    let mut bigger = file.clone();
    bigger.push(0);
    let r = a
        .http
        .put(&url)
        .bearer_auth(&a.token)
        .body(bigger)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let (_, d) = a.call("GET", &format!("/api/v1/designs/{id}"), None).await;
    assert_eq!(
        d["attachments"][&key]["size"],
        cofab_protocol::model::MAX_ATTACHMENT_BYTES
    );
    let (s, h) = a
        .call("GET", &format!("/api/v1/docs/{id}/heads"), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(h["heads"], d["heads"]);
    let (s, sy) = a
        .call("GET", &format!("/api/v1/docs/{id}/sync"), None)
        .await;
    assert_eq!(s, 200);
    assert!(sy["peers"].is_array());

    let r = a
        .http
        .get(format!("{}/metrics", a.base))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    for m in [
        "cofab_peers",
        "cofab_documents 3", // capacity, design, and the order used for the kind check
        "cofab_changes_local_total",
        "cofab_sync_latency_seconds_bucket",
        "cofab_store_bytes",
    ] {
        assert!(text.contains(m), "metrics lack {m}");
    }
    let (s, spec) = a.call("GET", "/api/v1/openapi.json", None).await;
    assert_eq!(s, 200);
    assert_eq!(spec["openapi"], "3.1.0");
    for p in [
        "/api/v1/orders",
        "/api/v1/capacity",
        "/api/v1/designs/{id}/text",
        "/api/v1/docs/{id}/sync",
        "/api/v1/events",
    ] {
        assert!(spec["paths"].get(p).is_some(), "openapi lacks {p}");
    }
}
