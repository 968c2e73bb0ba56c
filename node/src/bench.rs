//! `cofab bench`: the multi-node benchmark. Starts real nodes (libp2p on
//! 127.0.0.1, sled stores in temporary folders) in this process and runs the
//! scenarios of the automerge-repo comparison:
//! (a) one-change latency, (b) 1,000 documents to a fresh peer, (c) a large design's
//! initial sync, (d) sustained acknowledged writes, (e) fan-out to many nodes, (f) memory.
//! (a) also runs across two `cofab run` processes (back to back, and paced as
//! automerge-repo's bench paces it, after a TCP echo calibration), and (f)'s receiver
//! figures for (b) and (c) come from a `cofab run` process of its own (nodes in one
//! process share an allocator).
//! Owns: scenario set-up, timing and the report. Must not: assert anything (people judge).

use std::time::{Duration, Instant};

use cofab_protocol::document::Accepted;
use cofab_protocol::model::{self, DesignInput, OrderInput, Splice};
use cofab_protocol::{DocId, Keypair, Visibility};
use serde_json::{json, Value};

use crate::config::random_secret;
use crate::node::{Event, Node, NodeConfig, NodeHandle};

struct BenchNode {
    node: Node,
    _dir: tempfile::TempDir,
}

async fn start_node(name: &str) -> BenchNode {
    start_node_with(name, true).await
}

async fn start_node_with(name: &str, kad_server: bool) -> BenchNode {
    let dir = tempfile::Builder::new()
        .prefix("cofab-bench-")
        .tempdir()
        .expect("tempdir");
    let mut cfg = NodeConfig::new(
        Keypair::from_secret(random_secret()),
        name,
        dir.path().join("store"),
    );
    cfg.tick = Duration::from_millis(250);
    cfg.kad_server = kad_server;
    let node = Node::start(cfg).await.expect("node starts");
    BenchNode { node, _dir: dir }
}

async fn stop(nodes: Vec<BenchNode>) {
    for n in &nodes {
        n.node.handle.shutdown().await;
    }
    for n in nodes {
        let _ = n.node.task.await;
    }
}

async fn connect(a: &NodeHandle, b: &NodeHandle) {
    let addr = b.listen_addrs().await.expect("addrs")[0].clone();
    a.dial(addr).await.expect("dial");
    let bid = b.info.peer_id.to_string();
    for _ in 0..2000 {
        let bid = bid.clone();
        if a.read(move |c| c.peers.iter().any(|p| p.peer_id == bid))
            .await
            .unwrap_or(false)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("could not connect");
}

/// Two connected nodes and a design created on the first.
async fn pair_with_design(title: &str) -> (BenchNode, BenchNode, DocId) {
    let a = start_node("A").await;
    let b = start_node("B").await;
    connect(&a.node.handle, &b.node.handle).await;
    let input = DesignInput {
        title: title.into(),
        ..Default::default()
    };
    let id = a
        .node
        .handle
        .create(move |kp, now, nonce| model::create_design(kp, &input, now, nonce))
        .await
        .expect("design created");
    (a, b, id)
}

async fn changes_of(h: &NodeHandle, id: DocId) -> usize {
    h.read(move |c| c.replica.doc(&id).map(|d| d.change_count()).unwrap_or(0))
        .await
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// CPU seconds (user + system) this process has used so far, all threads.
fn cpu_s() -> f64 {
    // /proc/self/stat fields 14 and 15 (utime, stime) in clock ticks (100 per second here).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(f64::NAN)
}

fn rss_mb() -> f64 {
    rss_mb_of("/proc/self/status")
}

/// `VmRSS` of a `/proc/<pid>/status` file, MB.
fn rss_mb_of(status: &str) -> f64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// (a) one small change on A visible on B: p50/p99 over `n` changes, in ms.
pub async fn latency(n: usize) -> Value {
    let (a, b, id) = pair_with_design("latency").await;
    while changes_of(&b.node.handle, id).await < 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut rx = b.node.handle.subscribe();
    let mut samples = Vec::with_capacity(n);
    let ids = id.to_string();
    for i in 0..n + 20 {
        let t0 = Instant::now();
        let s = Splice {
            pos: i,
            delete: 0,
            insert: "x".into(),
        };
        a.node
            .handle
            .edit(id, move |d, kp, now| {
                model::splice_description(d, kp, now, &s)
            })
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Ok(Event::DocUpdated {
                    doc, from: Some(_), ..
                })) if doc == ids => break,
                Ok(Ok(_)) => continue,
                Ok(Err(_)) => continue,
                Err(_) => panic!("change {i} never arrived"),
            }
        }
        if i >= 20 {
            samples.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    samples.sort_by(|x, y| x.partial_cmp(y).unwrap());
    stop(vec![a, b]).await;
    json!({ "scenario": "a", "mode": "one process", "changes": n, "p50_ms": percentile(&samples, 0.5), "p99_ms": percentile(&samples, 0.99) })
}

/// A `cofab run` child process with its own data folder, for the cross-process (a).
struct ChildNode {
    child: std::process::Child,
    api: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// Starts `cofab run` (this same binary) on 127.0.0.1 with mDNS off.
async fn spawn_node(name: &str, bootstrap: Option<u16>) -> Result<(ChildNode, u16), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = tempfile::Builder::new()
        .prefix("cofab-bench-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let init = std::process::Command::new(&exe)
        .args(["init", "--name", name, "--data-dir"])
        .arg(dir.path())
        .output()
        .map_err(|e| e.to_string())?;
    if !init.status.success() {
        return Err(format!(
            "cofab init failed: {}",
            String::from_utf8_lossy(&init.stderr)
        ));
    }
    let (p2p, api) = (free_port(), free_port());
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["run", "--no-mdns", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{p2p}")])
        .args(["--api", &format!("127.0.0.1:{api}")]);
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", &format!("/ip4/127.0.0.1/tcp/{b}")]);
    }
    let child = cmd
        .env("COFAB_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(if std::env::var_os("COFAB_HOPS").is_some() {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .spawn()
        .map_err(|e| e.to_string())?;
    let token = std::fs::read_to_string(dir.path().join("api-token"))
        .map_err(|e| e.to_string())?
        .trim()
        .to_string();
    let node = ChildNode {
        child,
        api: format!("http://127.0.0.1:{api}"),
        token,
        _dir: dir,
    };
    let t = Instant::now();
    while reqwest::get(format!("{}/healthz", node.api)).await.is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!("{name} did not come up"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((node, p2p))
}

/// Resident memory of a child process, MB.
fn child_rss_mb(c: &ChildNode) -> f64 {
    rss_mb_of(&format!("/proc/{}/status", c.child.id()))
}

/// (f) on a node of its own: the resident memory of a fresh `cofab run` process that
/// fetched what `a` holds, against that of an idle one (same binary, same config), in
/// MB. The in-process figures of (b) and (c) share one allocator with A and the bench.
/// `done` reads `GET path` of the receiver until it says everything arrived.
async fn receiver_process_rss(
    a: &BenchNode,
    path: &str,
    done: impl Fn(&Value) -> bool,
) -> Result<(f64, f64), String> {
    let (idle, _) = spawn_node("idle", None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = child_rss_mb(&idle);
    drop(idle);
    let port = a
        .node
        .handle
        .listen_addrs()
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .flat_map(|m| m.iter())
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(p) => Some(p),
            _ => None,
        })
        .ok_or("A listens on no TCP port")?;
    let (b, _) = spawn_node("B", Some(port)).await?;
    let http = reqwest::Client::new();
    let t = Instant::now();
    loop {
        let got = http
            .get(format!("{}{path}", b.api))
            .bearer_auth(&b.token)
            .send()
            .await;
        if let Ok(r) = got {
            if r.json::<Value>().await.is_ok_and(|v| done(&v)) {
                break;
            }
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err("the receiver process never got everything".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its store writes (and the memory release after adopting a snapshot) finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok((base, child_rss_mb(&b)))
}

/// `doc_updated` events of a node's `/api/v1/events` stream: (doc, from, at_ns).
fn doc_events(
    api: &str,
    token: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Option<String>, u64)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (url, token) = (format!("{api}/api/v1/events"), token.to_string());
    tokio::spawn(async move {
        let Ok(mut resp) = reqwest::Client::new()
            .get(url)
            .bearer_auth(token)
            .send()
            .await
        else {
            return;
        };
        let mut buf = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find('\n') {
                let line: String = buf.drain(..=end).collect();
                let Some(data) = line.trim().strip_prefix("data:") else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
                    continue;
                };
                if v["type"] == "doc_updated" {
                    let ev = (
                        v["doc"].as_str().unwrap_or_default().to_string(),
                        v["from"].as_str().map(str::to_string),
                        v["at_ns"].as_u64().unwrap_or(0),
                    );
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// automerge-repo's bench waits this long after each echo before its next change (its
/// sync is throttled to one message per 100 ms per document); (a)'s like-for-like run
/// waits as long before each change.
pub const ANCHOR_GAP_MS: u64 = 250;

/// (a) across processes: two `cofab run` processes; the bench posts one change at a time
/// to A over HTTP and waits until B reports it applied. Both nodes stamp their events
/// with the machine's monotonic clock, so one-way times are read without clock skew:
/// from the HTTP request leaving the bench, and from A beginning the edit, to B having
/// applied it. Two shapes back to back, `n` changes each: one field set again and again
/// (automerge-repo's shape: its bench sets `d.ping = i`; here a design parameter `ping`),
/// then a comment appended to an order's discussion (a list that grows to `n` + 20
/// comments); then the field shape again, `gapped` changes [`ANCHOR_GAP_MS`] apart.
pub async fn latency_processes(n: usize, gapped: usize) -> Vec<Value> {
    match latency_processes_inner(n, gapped).await {
        Ok(v) => v,
        Err(e) => vec![json!({ "scenario": "a", "mode": "processes", "error": e })],
    }
}

/// The floor under (a) on this machine: round trips of 64 bytes over TCP on 127.0.0.1
/// between this process and a `cofab bench-echo` process (blocking sockets, no framework),
/// back to back and `gap_ms` apart — automerge-repo's bench measures the same over a bare
/// websocket with its 250 ms gap (`raw_ws_rtt_p50_ms`).
pub async fn echo_calibration(n: usize, gap_ms: u64) -> Value {
    let rtt = tokio::task::spawn_blocking(move || echo_round_trips(n, gap_ms)).await;
    match rtt.map_err(|e| e.to_string()).and_then(|r| r) {
        Ok(rtt) => json!({
            "scenario": "a",
            "mode": "calibration",
            "what": "tcp echo round trip between two processes",
            "gap_ms": gap_ms,
            "round_trips": n,
            "rtt_p50_ms": percentile(&rtt, 0.5),
            "rtt_p99_ms": percentile(&rtt, 0.99),
        }),
        Err(e) => json!({ "scenario": "a", "mode": "calibration", "error": e }),
    }
}

/// `n` echo round trips in ms, sorted (after 10 discarded), each `gap_ms` after the last.
fn echo_round_trips(n: usize, gap_ms: u64) -> Result<Vec<f64>, String> {
    use std::io::{BufRead, Read, Write};
    /// Ends the echo process however the measurement ends.
    struct Echo(std::process::Child);
    impl Drop for Echo {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut echo = Echo(
        std::process::Command::new(exe)
            .arg("bench-echo")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    let mut line = String::new();
    let out = echo.0.stdout.take().ok_or("no stdout")?;
    std::io::BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let port: u16 = line.trim().parse().map_err(|_| format!("port? {line:?}"))?;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let (msg, mut back) = ([7u8; 64], [0u8; 64]);
    let mut rtt = Vec::with_capacity(n);
    for i in 0..n + 10 {
        if gap_ms > 0 {
            std::thread::sleep(Duration::from_millis(gap_ms));
        }
        let t = Instant::now();
        s.write_all(&msg).map_err(|e| e.to_string())?;
        s.read_exact(&mut back).map_err(|e| e.to_string())?;
        if i >= 10 {
            rtt.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    rtt.sort_by(|x, y| x.total_cmp(y));
    Ok(rtt)
}

/// `cofab bench-echo`: prints the port it listens on (127.0.0.1), then echoes one
/// connection's bytes until it closes.
pub fn echo_server() -> std::io::Result<()> {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    println!("{}", l.local_addr()?.port());
    std::io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n])?;
    }
}

async fn latency_processes_inner(n: usize, gapped: usize) -> Result<Vec<Value>, String> {
    let (a, a_p2p) = spawn_node("A", None).await?;
    let (b, _) = spawn_node("B", Some(a_p2p)).await?;
    let http = reqwest::Client::new();
    let api_a = crate::client::Client::new(&a.api, &a.token);
    let api_b = crate::client::Client::new(&b.api, &b.token);
    let id_of = |v: Value| {
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("no id in {v}"))
    };
    let design = id_of(
        api_a
            .post(
                "/api/v1/designs",
                &json!({ "title": "latency", "visibility": "public" }),
            )
            .await?,
    )?;
    let order = id_of(
        api_a
            .post(
                "/api/v1/orders",
                &json!({ "title": "latency", "quantity": 1, "visibility": "public" }),
            )
            .await?,
    )?;
    let mut a_ev = doc_events(&a.api, &a.token);
    let mut b_ev = doc_events(&b.api, &b.token);
    // Wait until B holds both (it connects by --bootstrap, then syncs).
    let t = Instant::now();
    for path in [format!("designs/{design}"), format!("orders/{order}")] {
        while api_b.get(&format!("/api/v1/{path}")).await.is_err() {
            if t.elapsed() > Duration::from_secs(30) {
                return Err(format!("B never received {path}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    /// One series of changes: posted to `url` with `body(i)`, about document `doc`.
    struct Run<'a> {
        shape: &'static str,
        url: String,
        doc: &'a str,
        body: fn(usize) -> Value,
        changes: usize,
        /// Pause before each change.
        gap_ms: u64,
    }
    let field = Run {
        shape: "field",
        url: format!("{}/api/v1/designs/{design}/parameters", a.api),
        doc: &design,
        body: |i| json!({ "name": "ping", "value": i as f64 }),
        changes: n,
        gap_ms: 0,
    };
    let comment = Run {
        shape: "comment",
        url: format!("{}/api/v1/orders/{order}/discussion", a.api),
        doc: &order,
        body: |i| json!({ "text": format!("c{i}") }),
        changes: n,
        gap_ms: 0,
    };
    let paced = Run {
        url: field.url.clone(),
        changes: gapped,
        gap_ms: ANCHOR_GAP_MS,
        ..field
    };
    let mut out = Vec::new();
    for run in [field, comment, paced] {
        let Run {
            shape,
            url,
            doc: id,
            body,
            changes: n,
            gap_ms,
        } = run;
        while a_ev.try_recv().is_ok() || b_ev.try_recv().is_ok() {}
        let (mut from_request, mut from_edit, mut ack) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n + 20 {
            if gap_ms > 0 {
                tokio::time::sleep(Duration::from_millis(gap_ms)).await;
            }
            let body = body(i);
            let t0 = crate::node::mono_ns();
            crate::node::hop("t0");
            let r = http
                .post(&url)
                .bearer_auth(&a.token)
                .json(&body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let t_ack = crate::node::mono_ns();
            if !r.status().is_success() {
                return Err(format!("{shape} refused: {}", r.status()));
            }
            let t_b = next_event(&mut b_ev, id, true, i).await?;
            let t_a = next_event(&mut a_ev, id, false, i).await?;
            if i >= 20 {
                from_request.push(t_b.saturating_sub(t0) as f64 / 1e6);
                from_edit.push(t_b.saturating_sub(t_a) as f64 / 1e6);
                ack.push(t_ack.saturating_sub(t0) as f64 / 1e6);
            }
        }
        for v in [&mut from_request, &mut from_edit, &mut ack] {
            v.sort_by(|x, y| x.total_cmp(y));
        }
        out.push(json!({
            "scenario": "a",
            "mode": "processes",
            "shape": shape,
            "changes": n,
            "gap_ms": gap_ms,
            "p50_ms": percentile(&from_request, 0.5),
            "p99_ms": percentile(&from_request, 0.99),
            "from_edit_p50_ms": percentile(&from_edit, 0.5),
            "from_edit_p99_ms": percentile(&from_edit, 0.99),
            "http_ack_p50_ms": percentile(&ack, 0.5),
        }));
    }
    drop((a, b));
    Ok(out)
}

/// The next `doc_updated` for `id` (from a peer if `remote`), as its `at_ns`.
async fn next_event(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Option<String>, u64)>,
    id: &str,
    remote: bool,
    i: usize,
) -> Result<u64, String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some((doc, from, at))) if doc == id && from.is_some() == remote => return Ok(at),
            Ok(Some(_)) => continue,
            _ => return Err(format!("change {i} never arrived")),
        }
    }
}

/// (b) `docs` documents of 10 changes each created on A; time until a fresh B holds all.
pub async fn many_docs(docs: usize) -> Value {
    let a = start_node("A").await;
    let mut ids = Vec::new();
    let t_create = Instant::now();
    for i in 0..docs {
        let input = OrderInput {
            title: format!("part {i}"),
            quantity: 10,
            visibility: Visibility::Public,
            ..Default::default()
        };
        let id = a
            .node
            .handle
            .create(move |kp, now, nonce| {
                let (mut doc, mut acc) = model::create_order(kp, &input, now, nonce)?;
                for j in 0..9 {
                    let more = model::comment(&mut doc, kp, now, &format!("note {j}"))?;
                    merge(&mut acc, more);
                }
                Ok((doc, acc))
            })
            .await
            .unwrap();
        ids.push(id);
    }
    let create_s = t_create.elapsed().as_secs_f64();
    let b = start_node("B").await;
    let cpu0 = cpu_s();
    let t0 = Instant::now();
    connect(&b.node.handle, &a.node.handle).await;
    loop {
        let done = b
            .node
            .handle
            .read(|c| c.replica.docs().filter(|d| d.change_count() >= 10).count())
            .await
            .unwrap();
        if done >= docs {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_s() - cpu0;
    let rss_after = rss_mb();
    stop(vec![b]).await;
    let own = receiver_process_rss(&a, "/api/v1/docs", |v| {
        v.as_array().is_some_and(|d| {
            d.iter()
                .filter(|x| x["changes"].as_u64() >= Some(10))
                .count()
                >= docs
        })
    })
    .await;
    stop(vec![a]).await;
    let mut out = json!({ "scenario": "b", "docs": docs, "changes_per_doc": 10, "sync_s": secs, "cpu_s": cpu, "create_s": create_s, "rss_mb_process": rss_after });
    add_receiver_rss(&mut out, own);
    out
}

/// Adds [`receiver_process_rss`]'s figures (or its error) to a scenario's result.
fn add_receiver_rss(out: &mut Value, own: Result<(f64, f64), String>) {
    match own {
        Ok((idle, after)) => {
            out["rss_mb_idle_node"] = json!(idle);
            out["rss_mb_receiver_process"] = json!(after);
            out["rss_mb_growth_receiver_process"] = json!(after - idle);
        }
        Err(e) => out["receiver_process_error"] = json!(e),
    }
}

fn merge(acc: &mut Accepted, more: Accepted) {
    acc.changes.extend(more.changes);
    acc.sigs.extend(more.sigs);
}

/// (c) a design typed `chars` characters, one change per character; initial sync to a fresh peer.
pub async fn large_design(chars: usize) -> Value {
    let a = start_node("A").await;
    let t_build = Instant::now();
    let id = a
        .node
        .handle
        .create(move |kp, now, nonce| {
            let (mut doc, mut acc) = model::create_design(
                kp,
                &DesignInput {
                    title: "large".into(),
                    ..Default::default()
                },
                now,
                nonce,
            )?;
            for i in 0..chars {
                let ch = (b'a' + (i % 26) as u8) as char;
                let more = model::splice_description(
                    &mut doc,
                    kp,
                    now,
                    &Splice {
                        pos: i,
                        delete: 0,
                        insert: ch.to_string(),
                    },
                )?;
                merge(&mut acc, more);
            }
            Ok((doc, acc))
        })
        .await
        .unwrap();
    let build_s = t_build.elapsed().as_secs_f64();
    let b = start_node("B").await;
    let cpu0 = cpu_s();
    let t0 = Instant::now();
    connect(&b.node.handle, &a.node.handle).await;
    while changes_of(&b.node.handle, id).await < chars + 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_s() - cpu0;
    // automerge's own load() of the same document, same process, for comparison.
    let bytes = a
        .node
        .handle
        .read(move |c| c.replica.doc(&id).map(|d| d.save()))
        .await
        .unwrap()
        .unwrap();
    let t1 = Instant::now();
    let _ = automerge::Automerge::load(&bytes).unwrap();
    let load_s = t1.elapsed().as_secs_f64();
    stop(vec![b]).await;
    let own = receiver_process_rss(&a, &format!("/api/v1/docs/{id}/heads"), |v| {
        v["changes"].as_u64() >= Some(chars as u64 + 1)
    })
    .await;
    stop(vec![a]).await;
    let mut out = json!({ "scenario": "c", "chars": chars, "sync_ms": secs * 1e3, "cpu_ms": cpu * 1e3, "automerge_load_ms": load_s * 1e3, "ratio_to_load": secs / load_s, "build_s": build_s });
    add_receiver_rss(&mut out, own);
    out
}

/// One write of a sustained-writes scenario.
type WriteOne = std::sync::Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// Drives (d)/(d′): two connected nodes, a design on A, and `n` one-character writes made
/// by `conc` concurrent writers calling what `setup(a, design)` returns; acknowledged
/// writes per second and the time until B holds them all.
/// Each write makes `per_write` changes; `n` is the total number of changes.
async fn sustained_run<S, Fut>(
    scenario: &str,
    n: usize,
    conc: usize,
    per_write: usize,
    setup: S,
) -> Value
where
    S: FnOnce(NodeHandle, DocId) -> Fut,
    Fut: std::future::Future<Output = WriteOne>,
{
    let (a, b, id) = pair_with_design("sustained").await;
    let write_one = setup(a.node.handle.clone(), id).await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    let writes = n / per_write;
    for w in 0..conc {
        let write_one = write_one.clone();
        let count = writes / conc + usize::from(w < writes % conc);
        tasks.push(tokio::spawn(async move {
            for _ in 0..count {
                write_one().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ack_s = t0.elapsed().as_secs_f64();
    while changes_of(&b.node.handle, id).await < n + 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let peer_s = t0.elapsed().as_secs_f64();
    stop(vec![a, b]).await;
    json!({ "scenario": scenario, "changes": n, "writers": conc, "changes_per_request": per_write, "acked_per_s": n as f64 / ack_s, "peer_has_all_s": peer_s, "end_to_end_per_s": n as f64 / peer_s })
}

/// (d) `n` small changes to one document through the HTTP API with `conc` concurrent
/// clients, `per_request` changes per request (1: `POST .../text`; more:
/// `POST .../text/batch`, each splice still its own change).
pub async fn sustained(n: usize, conc: usize, per_request: usize) -> Value {
    sustained_run("d", n, conc, per_request, |handle, id| async move {
        let token = "bench-token".to_string();
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let url = format!(
            "http://{}/api/v1/designs/{id}/text{}",
            listener.local_addr().unwrap(),
            if per_request > 1 { "/batch" } else { "" }
        );
        let body = if per_request > 1 {
            json!({ "splices": vec![json!({ "pos": 0, "insert": "x" }); per_request] })
        } else {
            json!({ "pos": 0, "insert": "x" })
        };
        let app = crate::api::router(handle, token.clone());
        tokio::spawn(async move {
            let nodelay = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let _ = axum::serve(nodelay, app).await;
        });
        let client = reqwest::Client::new();
        let write: WriteOne = std::sync::Arc::new(move || {
            let (client, url, token) = (client.clone(), url.clone(), token.clone());
            let body = body.clone();
            Box::pin(async move {
                let r = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
            })
        });
        write
    })
    .await
}

/// (d′) the same through the node's Rust API (`NodeHandle::edit`) with `conc` concurrent
/// callers: what the node accepts without HTTP in the way.
pub async fn sustained_handle(n: usize, conc: usize) -> Value {
    sustained_run("d'", n, conc, 1, |handle, id| async move {
        let write: WriteOne = std::sync::Arc::new(move || {
            let h = handle.clone();
            Box::pin(async move {
                let splice = Splice {
                    pos: 0,
                    delete: 0,
                    insert: "x".into(),
                };
                h.edit(id, move |d, kp, now| {
                    model::splice_description(d, kp, now, &splice)
                })
                .await
                .unwrap();
            })
        });
        write
    })
    .await
}

/// (e) one public order posted on one node reaching `nodes` nodes; p50/p99 over `rounds`.
/// Each node dials three others. With `kad_server` every node is a Kademlia server (the
/// default), and Kademlia's automatic bootstrap then meshes all of them; without, the
/// nodes keep the dialled topology. Also reports the CPU the idle network burns.
pub async fn fan_out(nodes: usize, rounds: usize, kad_server: bool) -> Value {
    let mut all = Vec::new();
    for i in 0..nodes {
        all.push(start_node_with(&format!("n{i}"), kad_server).await);
    }
    // Each node dials the next 3 (a ring with chords): a connected mesh, no full mesh.
    for i in 0..nodes {
        for k in 1..=3 {
            let j = (i + k * k) % nodes;
            if j != i {
                let addr = all[j].node.handle.listen_addrs().await.unwrap()[0].clone();
                let _ = all[i].node.handle.dial(addr).await;
            }
        }
    }
    // Let the network settle: discovery (in Kademlia server mode, automatic bootstrap
    // connects every node to every other) keeps both cores busy for several seconds.
    // Orders are posted once a second passes with the network nearly idle (under 0.2
    // CPU-s; at most 60 s); `settle_s` and the CPU of the last second are reported.
    let t_settle = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut idle_cpu;
    loop {
        let idle0 = cpu_s();
        tokio::time::sleep(Duration::from_secs(1)).await;
        idle_cpu = cpu_s() - idle0;
        if idle_cpu < 0.2 || t_settle.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let settle_s = t_settle.elapsed().as_secs_f64();
    let mut links = 0;
    for n in &all {
        links += n.node.handle.read(|c| c.peers.len()).await.unwrap_or(0);
    }
    let peers_mean = links as f64 / nodes as f64;
    let cpu0 = cpu_s();
    let mut samples = Vec::new();
    for r in 0..rounds {
        let input = OrderInput {
            title: format!("fan-out {r}"),
            quantity: 1,
            visibility: Visibility::Public,
            ..Default::default()
        };
        let t0 = Instant::now();
        let id = all[r % nodes]
            .node
            .handle
            .create(move |kp, now, nonce| model::create_order(kp, &input, now, nonce))
            .await
            .unwrap();
        for n in &all {
            while changes_of(&n.node.handle, id).await < 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        samples.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(|x, y| x.partial_cmp(y).unwrap());
    stop(all).await;
    let cpu = cpu_s() - cpu0;
    json!({ "scenario": "e", "nodes": nodes, "rounds": rounds, "kademlia": if kad_server { "server" } else { "client" }, "settle_s": settle_s, "idle_cpu_per_s": idle_cpu, "peers_mean": peers_mean, "cpu_s": cpu, "p50_ms": percentile(&samples, 0.5), "p99_ms": percentile(&samples, 0.99) })
}

/// (f) resident memory of this process holding `docs` small documents in one node.
pub async fn memory(docs: usize) -> Value {
    let before = rss_mb();
    let a = start_node("A").await;
    for i in 0..docs {
        let input = OrderInput {
            title: format!("small {i}"),
            quantity: 1,
            visibility: Visibility::Public,
            ..Default::default()
        };
        a.node
            .handle
            .create(move |kp, now, nonce| model::create_order(kp, &input, now, nonce))
            .await
            .unwrap();
    }
    let after = rss_mb();
    stop(vec![a]).await;
    json!({ "scenario": "f", "docs": docs, "rss_mb_process": after, "rss_mb_delta": after - before })
}

/// Runs the selected scenarios and returns their results.
pub async fn run(scenarios: &str, quick: bool) -> Vec<Value> {
    let mut out = Vec::new();
    let has = |c: char| scenarios.contains(c);
    if has('a') {
        out.push(echo_calibration(if quick { 100 } else { 500 }, 0).await);
        out.push(echo_calibration(if quick { 30 } else { 100 }, ANCHOR_GAP_MS).await);
        out.extend(
            latency_processes(if quick { 100 } else { 500 }, if quick { 100 } else { 500 }).await,
        );
        out.push(latency(if quick { 100 } else { 500 }).await);
    }
    if has('b') {
        out.push(many_docs(if quick { 200 } else { 1000 }).await);
    }
    if has('c') {
        out.push(large_design(if quick { 5_000 } else { 50_000 }).await);
        if !quick {
            out.push(large_design(100_000).await);
        }
    }
    if has('d') {
        out.push(sustained(if quick { 2_000 } else { 20_000 }, 32, 1).await);
        out.push(sustained(if quick { 2_000 } else { 20_000 }, 8, 100).await);
        out.push(sustained_handle(if quick { 2_000 } else { 20_000 }, 64).await);
    }
    if has('e') {
        // The operator's topology (each node dials 3 others), then the default where every
        // node is a Kademlia server (discovery turns 50 nodes into a full mesh).
        out.push(
            fan_out(
                if quick { 10 } else { 50 },
                if quick { 5 } else { 20 },
                false,
            )
            .await,
        );
        out.push(
            fan_out(
                if quick { 10 } else { 50 },
                if quick { 5 } else { 20 },
                true,
            )
            .await,
        );
    }
    if has('f') {
        out.push(memory(if quick { 1_000 } else { 10_000 }).await);
    }
    out
}

/// One line of the side-by-side table: a figure of cofab and of automerge-repo from the
/// same run, and how many times better cofab is (time and memory: theirs / ours;
/// throughput: ours / theirs).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Comparison {
    /// What is compared, with its unit.
    pub figure: String,
    /// cofab's value.
    pub cofab: f64,
    /// automerge-repo's value.
    pub automerge_repo: f64,
    /// Times better for cofab (above 1: cofab is better).
    pub ratio: f64,
}

/// Lines up cofab's scenario results with automerge-repo's (`median` of the JSON its
/// `bench.mjs --out` writes). Figures missing on either side are left out.
pub fn compare(cofab: &[Value], am_repo: &Value) -> Vec<Comparison> {
    let am = &am_repo["median"];
    let find = |scenario: &str, key: &str, filter: &dyn Fn(&Value) -> bool| {
        cofab
            .iter()
            .find(|r| r["scenario"] == scenario && filter(r))
            .and_then(|r| r[key].as_f64())
    };
    let any = |_: &Value| true;
    // automerge-repo's (a) sets one field again and again, 250 ms apart: compare the same
    // shape and pacing; back to back is shown too, marked as such.
    // A field-shape (a) run or a calibration, paced (as automerge-repo's) or back to back.
    let run_of = |mode: &'static str, paced: bool| {
        move |r: &Value| {
            r["mode"] == mode
                && (mode != "processes" || r["shape"] == "field")
                && (r["gap_ms"].as_u64() > Some(0)) == paced
        }
    };
    let (gapped, back_to_back) = (run_of("processes", true), run_of("processes", false));
    let echo_gapped = run_of("calibration", true);
    // The large-design size automerge-repo ran (50,000, or 5,000 with --quick).
    let chars = am_repo["params"]["cChars"].as_u64().unwrap_or(50_000);
    let same_chars = move |r: &Value| r["chars"].as_u64() == Some(chars);
    let per_request = |n: u64| move |r: &Value| r["changes_per_request"] == n;
    let am_f = |k: &str| am[k].as_f64();
    let am_growth = |k: &str| Some(am_f(k)? - am_f("mem_start_rss_mb")?);
    enum Better {
        Lower,
        Higher,
    }
    let rows: Vec<(&str, Option<f64>, Option<f64>, Better)> = vec![
        (
            "(a) one-way p50 ms, one field set 250 ms apart, from A's edit (theirs: from change())",
            find("a", "from_edit_p50_ms", &gapped),
            am_f("a_c2s_p50_ms"),
            Better::Lower,
        ),
        (
            "(a) one-way p99 ms, same",
            find("a", "from_edit_p99_ms", &gapped),
            am_f("a_c2s_p99_ms"),
            Better::Lower,
        ),
        (
            "(a) one-way p50 ms, same, from the client's HTTP request to A",
            find("a", "p50_ms", &gapped),
            am_f("a_c2s_p50_ms"),
            Better::Lower,
        ),
        (
            "(a) one-way p50 ms, ours back to back, from the request (theirs 250 ms apart)",
            find("a", "p50_ms", &back_to_back),
            am_f("a_c2s_p50_ms"),
            Better::Lower,
        ),
        (
            "(a) floor: bare echo round trip p50 ms, 250 ms apart (ours TCP, theirs websocket)",
            find("a", "rtt_p50_ms", &echo_gapped),
            am_f("raw_ws_rtt_p50_ms"),
            Better::Lower,
        ),
        (
            "(b) many documents (1,000 x 10 changes; 200 with --quick), s",
            find("b", "sync_s", &any),
            am_f("b_total_ms").map(|ms| ms / 1e3),
            Better::Lower,
        ),
        (
            "(c) large design (50,000 chars; 5,000 with --quick), initial sync ms",
            find("c", "sync_ms", &same_chars),
            am_f("c_fetch_ms"),
            Better::Lower,
        ),
        (
            "(d) acknowledged changes/s, 1 per request",
            find("d", "acked_per_s", &per_request(1)),
            am_f("d_changes_per_s"),
            Better::Higher,
        ),
        (
            "(d) acknowledged changes/s, 100 per request",
            find("d", "acked_per_s", &per_request(100)),
            am_f("d_changes_per_s"),
            Better::Higher,
        ),
        (
            "(f) receiver RSS growth MB after (b), a process of its own",
            find("b", "rss_mb_growth_receiver_process", &any),
            am_growth("mem_after_b_rss_mb"),
            Better::Lower,
        ),
        (
            "(f) receiver RSS growth MB after (c), same",
            find("c", "rss_mb_growth_receiver_process", &same_chars),
            am_growth("mem_after_c_rss_mb")
                .zip(am_growth("mem_after_b_rss_mb"))
                .map(|(c, b)| c - b),
            Better::Lower,
        ),
    ];
    rows.into_iter()
        .filter_map(|(figure, ours, theirs, better)| {
            let (ours, theirs) = (ours?, theirs?);
            let ratio = match better {
                Better::Lower => theirs / ours,
                Better::Higher => ours / theirs,
            };
            Some(Comparison {
                figure: figure.to_string(),
                cofab: ours,
                automerge_repo: theirs,
                ratio,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_lines_up_the_same_scenarios_and_orients_ratios() {
        let cofab = vec![
            json!({ "scenario": "a", "mode": "calibration", "gap_ms": 0, "rtt_p50_ms": 0.1 }),
            json!({ "scenario": "a", "mode": "calibration", "gap_ms": 250, "rtt_p50_ms": 0.5 }),
            json!({ "scenario": "a", "mode": "processes", "shape": "comment", "gap_ms": 0, "p50_ms": 7.0, "p99_ms": 7.0 }),
            json!({ "scenario": "a", "mode": "processes", "shape": "field", "gap_ms": 0, "p50_ms": 0.5, "from_edit_p50_ms": 0.4 }),
            json!({ "scenario": "a", "mode": "processes", "shape": "field", "gap_ms": 250, "p50_ms": 2.0, "from_edit_p50_ms": 1.0, "from_edit_p99_ms": 2.0 }),
            json!({ "scenario": "a", "mode": "one process", "p50_ms": 9.0, "p99_ms": 9.0 }),
            json!({ "scenario": "b", "sync_s": 0.5, "rss_mb_process": 7.0, "rss_mb_growth_receiver_process": 50.0 }),
            json!({ "scenario": "c", "chars": 100_000, "sync_ms": 999.0, "rss_mb_growth_receiver_process": 1.0 }),
            json!({ "scenario": "c", "chars": 50_000, "sync_ms": 200.0, "rss_mb_process": 7.0, "rss_mb_growth_receiver_process": 20.0 }),
            json!({ "scenario": "d", "changes_per_request": 1, "acked_per_s": 8000.0 }),
            json!({ "scenario": "d", "changes_per_request": 100, "acked_per_s": 40000.0 }),
        ];
        let am = json!({ "params": { "cChars": 50_000 }, "median": {
            "a_c2s_p50_ms": 5.0, "a_c2s_p99_ms": 10.0, "raw_ws_rtt_p50_ms": 1.0, "b_total_ms": 4000.0, "c_fetch_ms": 500.0,
            "d_changes_per_s": 4000.0, "mem_start_rss_mb": 80.0, "mem_after_b_rss_mb": 180.0,
            "mem_after_c_rss_mb": 230.0
        }});
        let rows = compare(&cofab, &am);
        let got: Vec<(f64, f64, f64)> = rows
            .iter()
            .map(|r| (r.cofab, r.automerge_repo, r.ratio))
            .collect();
        assert_eq!(
            got,
            vec![
                (1.0, 5.0, 5.0),       // (a) p50 from A's edit, the field shape 250 ms apart
                (2.0, 10.0, 5.0),      // (a) p99, same
                (2.0, 5.0, 2.5),       // (a) p50 from the request, same
                (0.5, 5.0, 10.0),      // (a) p50 back to back, from the request
                (0.5, 1.0, 2.0),       // (a) the floor: echo round trips 250 ms apart
                (0.5, 4.0, 8.0),       // (b) seconds on both sides
                (200.0, 500.0, 2.5),   // (c) the 50,000-char run
                (8000.0, 4000.0, 2.0), // (d) throughput: ours / theirs
                (40000.0, 4000.0, 10.0),
                (50.0, 100.0, 2.0), // (f) our own process's growth over their start RSS
                (20.0, 50.0, 2.5),  // (f) growth from after (b) to after (c)
            ]
        );
        // A scenario that did not run is left out, not shown as zero.
        let only_b = compare(&cofab[6..7], &am);
        assert!(only_b.iter().all(|r| r.figure.starts_with("(b)")
            || r.figure.starts_with("(f) receiver RSS growth MB after (b)")));
        assert_eq!(only_b.len(), 2);
    }
}
