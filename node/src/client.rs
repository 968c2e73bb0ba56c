//! A small HTTP client for a node's API (used by the CLI).
//! Owns: requests and turning error bodies into readable messages.

use serde_json::Value;

/// A client for one node.
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`) with a bearer token.
    pub fn new(base: &str, token: &str) -> Self {
        let base = if base.starts_with("http") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<Value, String> {
        let resp = rb
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| format!("cannot reach the node at {}: {e}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            Ok(v)
        } else {
            let msg = v
                .get("error")
                .and_then(|e| e.as_str())
                .map(|s| s.to_string())
                .unwrap_or_else(|| v.to_string());
            Err(format!("{status}: {msg}"))
        }
    }

    /// GET a path.
    pub async fn get(&self, path: &str) -> Result<Value, String> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }
    /// POST JSON.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
    /// PUT JSON.
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, String> {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }
}
