//! Tests that run `cofab` as separate OS processes, as an operator would:
//! crash safety under `kill -9`, and three nodes finding each other with `--bootstrap`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_cofab");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn init(dir: &Path, name: &str) {
    let out = Command::new(BIN)
        .args(["init", "--data-dir"])
        .arg(dir)
        .args(["--name", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(dir: &Path, p2p_port: u16, api_port: u16, bootstrap: Option<u16>) -> Child {
    run_env(dir, p2p_port, api_port, bootstrap, &[])
}

fn run_env(
    dir: &Path,
    p2p_port: u16,
    api_port: u16,
    bootstrap: Option<u16>,
    env: &[(&str, &str)],
) -> Child {
    let mut c = Command::new(BIN);
    c.envs(env.iter().copied());
    c.args(["run", "--data-dir"]).arg(dir).args([
        "--no-mdns",
        "--listen",
        &format!("/ip4/127.0.0.1/tcp/{p2p_port}"),
        "--api",
        &format!("127.0.0.1:{api_port}"),
    ]);
    if let Some(b) = bootstrap {
        c.args(["--bootstrap", &format!("/ip4/127.0.0.1/tcp/{b}")]);
    }
    c.env("COFAB_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_healthy(api: u16) {
    let start = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{api}/healthz")).await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node on {api} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn token(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("api-token"))
        .unwrap()
        .trim()
        .to_string()
}

async fn get_json(api: u16, token: &str, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("http://127.0.0.1:{api}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn titles(api: u16, token: &str) -> Vec<String> {
    let v = get_json(api, token, "/api/v1/orders").await;
    v.as_array()
        .unwrap()
        .iter()
        .map(|o| o["title"].as_str().unwrap().to_string())
        .collect()
}

/// Streams API writes, `kill -9`s the node at pseudo-random instants, restarts it and
/// checks that every acknowledged write is still there. `COFAB_CRASH_CYCLES` raises the
/// cycle count (default 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_write() {
    let cycles: u64 = std::env::var("COFAB_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), "Crash Test GmbH");
    let tok = token(dir.path());
    let mut acked: Vec<String> = Vec::new();
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut total_attempts = 0u64;
    for cycle in 0..cycles {
        let api = free_port();
        let mut child = run(dir.path(), free_port(), api, None);
        wait_healthy(api).await;
        // Everything acknowledged before this start must be present.
        let have = titles(api, &tok).await;
        for t in &acked {
            assert!(
                have.contains(t),
                "cycle {cycle}: acknowledged write {t} lost (have {})",
                have.len()
            );
        }
        // Stream writes from 4 concurrent writers; kill at a pseudo-random instant.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let kill_after = Duration::from_millis(20 + seed % 200);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut writers = Vec::new();
        for w in 0..4 {
            let tx = tx.clone();
            let tok = tok.clone();
            writers.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut n = 0;
                let mut attempts = 0u64;
                loop {
                    let title = format!("c{cycle}-w{w}-{n}");
                    n += 1;
                    attempts += 1;
                    let r = client
                        .post(format!("http://127.0.0.1:{api}/api/v1/orders"))
                        .bearer_auth(&tok)
                        .json(&json!({ "title": title, "quantity": 1 }))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status().as_u16() == 201 => {
                            let _ = tx.send(title);
                        }
                        Ok(r) => panic!("unexpected status {}", r.status()),
                        Err(_) => return attempts,
                    }
                }
            }));
        }
        drop(tx);
        tokio::time::sleep(kill_after).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for w in writers {
            total_attempts += w.await.unwrap();
        }
        while let Ok(t) = rx.try_recv() {
            acked.push(t);
        }
    }
    // Final check after the last crash.
    let api = free_port();
    let mut child = run(dir.path(), free_port(), api, None);
    wait_healthy(api).await;
    let have = titles(api, &tok).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let lost: Vec<&String> = acked.iter().filter(|t| !have.contains(t)).collect();
    println!("crash test: {cycles} kill -9 cycles, {total_attempts} writes attempted, {} acknowledged, {} lost", acked.len(), lost.len());
    assert!(lost.is_empty(), "lost acknowledged writes: {lost:?}");
    assert!(
        !acked.is_empty(),
        "no write was acknowledged: the test did not exercise anything"
    );
}

/// Three `cofab run` processes with `--no-mdns` and `--bootstrap` find each other; an
/// order posted on one is readable through the API on the other two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_bootstrap_and_share_an_order() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, d) in dirs.iter().enumerate() {
        init(d.path(), &format!("Company {i}"));
    }
    let p2p: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let api: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut children = vec![run(dirs[0].path(), p2p[0], api[0], None)];
    wait_healthy(api[0]).await;
    for i in 1..3 {
        children.push(run(dirs[i].path(), p2p[i], api[i], Some(p2p[0])));
    }
    for a in &api {
        wait_healthy(*a).await;
    }
    let toks: Vec<String> = dirs.iter().map(|d| token(d.path())).collect();
    let client = reqwest::Client::new();
    let body = json!({"title": "Bracket, anodised aluminium", "quantity": 500, "material": "AL6061-T6", "processes": ["cnc-milling"], "due_date": "2027-03-01", "visibility": "public"});
    // wait until node 2 is connected to someone, then post on node 2 (not the bootstrap node)
    let start = Instant::now();
    loop {
        let v: Value = client
            .get(format!("http://127.0.0.1:{}/api/v1/status", api[2]))
            .bearer_auth(&toks[2])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["connected_peers"].as_u64().unwrap() >= 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "node 2 never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = post_order(api[2], &toks[2], &body).await;
    let posted = Instant::now();
    for i in 0..2 {
        loop {
            let r = client
                .get(format!("http://127.0.0.1:{}/api/v1/orders/{id}", api[i]))
                .bearer_auth(&toks[i])
                .send()
                .await
                .unwrap();
            if r.status().is_success() {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["title"], "Bracket, anodised aluminium");
                break;
            }
            assert!(
                posted.elapsed() < Duration::from_secs(20),
                "order did not reach node {i}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!(
        "order visible on both other nodes after {:?}",
        posted.elapsed()
    );
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A node whose log output cannot be written (stderr on a full disk, or a pipe whose
/// reader went away) keeps running and serving: log lines are dropped, not fatal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_log_output_does_not_stop_the_node() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), "LogLess");
    let (p2p, api) = (free_port(), free_port());
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--data-dir"])
        .arg(dir.path())
        .args([
            "--no-mdns",
            "--listen",
            &format!("/ip4/127.0.0.1/tcp/{p2p}"),
            "--api",
            &format!("127.0.0.1:{api}"),
        ])
        .env("COFAB_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(full)
        .spawn()
        .unwrap();
    wait_healthy(api).await;
    let token = token(dir.path());
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api}/api/v1/orders"))
        .bearer_auth(&token)
        .json(&json!({ "title": "logged nowhere", "quantity": 1 }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "write refused: {}", r.status());
    assert_eq!(
        titles(api, &token).await,
        vec!["logged nowhere".to_string()]
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the node exited while logging to a full disk"
    );
    child.kill().unwrap();
    let _ = child.wait();
}

/// Stops a node with SIGTERM and checks that it exits cleanly within 30 s.
fn terminate(child: Child) {
    terminate_within(child, Duration::from_secs(30));
}

/// Stops a node with SIGTERM and checks that it exits cleanly within `limit` (it is
/// killed, and the check fails, if it does not).
fn terminate_within(mut child: Child, limit: Duration) {
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the node did not stop within {limit:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "SIGTERM should stop the node cleanly: {status}"
    );
}

/// Posts an order (expecting 201 Created); returns its id.
async fn post_order(api: u16, token: &str, body: &Value) -> String {
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{api}/api/v1/orders"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn discussion(api: u16, token: &str, id: &str) -> std::collections::BTreeSet<String> {
    let v = get_json(api, token, &format!("/api/v1/orders/{id}")).await;
    v["discussion"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["text"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A node sends its own changes before their write is durable. Killed (`kill -9`) while
/// comments stream into an order that a peer follows and its disk hangs, it restarts as a new incarnation
/// and comments while still offline; a clean stop (SIGTERM) keeps that incarnation;
/// once reconnected, the peer accepts the new comment (no fork with a change the peer
/// got but the node lost) and both end with the same discussion holding every
/// acknowledged comment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_restarts_as_a_new_incarnation_and_converges_with_its_peer() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    init(da.path(), "Buyer AG");
    init(db.path(), "Supplier GmbH");
    let (ta, tb) = (token(da.path()), token(db.path()));
    let (pa, pb, aa, ab) = (free_port(), free_port(), free_port(), free_port());
    // A's disk hangs after 40 group commits while its changes still go out at once: the
    // comments in flight then are held by B and never written by A.
    let mut a = run_env(
        da.path(),
        pa,
        aa,
        None,
        &[("COFAB_FAULT_STORE_HANG_AFTER", "40")],
    );
    wait_healthy(aa).await;
    let b = run(db.path(), pb, ab, Some(pa));
    wait_healthy(ab).await;
    assert_eq!(get_json(aa, &ta, "/api/v1/status").await["incarnation"], 0);
    let client = reqwest::Client::new();
    let body = json!({ "title": "Housing", "quantity": 10, "visibility": "public" });
    let id = post_order(aa, &ta, &body).await;
    let t = Instant::now();
    while get_json(ab, &tb, &format!("/api/v1/orders/{id}")).await["title"] != "Housing" {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "B never got the order"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Comments stream into A from 4 writers; A is killed mid-stream.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut writers = Vec::new();
    for w in 0..4 {
        let (tx, ta, id) = (tx.clone(), ta.clone(), id.clone());
        writers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for n in 0.. {
                let text = format!("w{w}-{n}");
                let r = client
                    .post(format!(
                        "http://127.0.0.1:{aa}/api/v1/orders/{id}/discussion"
                    ))
                    .bearer_auth(&ta)
                    .json(&json!({ "text": text }))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let _ = tx.send(text);
                    }
                    Ok(r) => panic!("comment refused: {}", r.status()),
                    Err(_) => return,
                }
            }
        }));
    }
    drop(tx);
    // Once the disk hangs, acknowledgements stop; A is killed when B holds a comment that
    // was never acknowledged.
    let mut acked = std::collections::BTreeSet::new();
    let t = Instant::now();
    loop {
        while let Ok(c) = rx.try_recv() {
            acked.insert(c);
        }
        let on_b = discussion(ab, &tb, &id).await;
        if !acked.is_empty() && on_b.difference(&acked).next().is_some() {
            // Still unacknowledged a moment later (not an acknowledgement on its way).
            tokio::time::sleep(Duration::from_millis(200)).await;
            while let Ok(c) = rx.try_recv() {
                acked.insert(c);
            }
            if on_b.difference(&acked).next().is_some() {
                break;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "B never held an unacknowledged comment"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    for w in writers {
        w.await.unwrap();
    }
    while let Ok(t) = rx.try_recv() {
        acked.insert(t);
    }
    assert!(
        !acked.is_empty(),
        "no comment was acknowledged before the kill"
    );

    // B stops (cleanly), and A restarts alone and comments at once, before it could
    // learn from B what it lost: the case where a node reusing its actor would fork its
    // own chain.
    terminate(b);
    let aa = free_port();
    let a = run(da.path(), free_port(), aa, None);
    wait_healthy(aa).await;
    assert_eq!(
        get_json(aa, &ta, "/api/v1/status").await["incarnation"],
        1,
        "a run that did not end cleanly is followed by a new incarnation"
    );
    let r = client
        .post(format!(
            "http://127.0.0.1:{aa}/api/v1/orders/{id}/discussion"
        ))
        .bearer_auth(&ta)
        .json(&json!({ "text": "after restart" }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    acked.insert("after restart".to_string());
    // A stops cleanly and starts again; then B starts, dialling A.
    terminate(a);
    let (aa, pa) = (free_port(), free_port());
    let mut a = run(da.path(), pa, aa, None);
    wait_healthy(aa).await;
    assert_eq!(
        get_json(aa, &ta, "/api/v1/status").await["incarnation"],
        1,
        "a clean stop keeps the incarnation"
    );
    let ab = free_port();
    let mut b = run(db.path(), free_port(), ab, Some(pa));
    wait_healthy(ab).await;
    let t = Instant::now();
    loop {
        let (on_a, on_b) = (
            discussion(aa, &ta, &id).await,
            discussion(ab, &tb, &id).await,
        );
        if on_a == on_b && acked.is_subset(&on_a) {
            println!(
                "after the kill: {} comments acknowledged, {} held by both",
                acked.len(),
                on_a.len()
            );
            assert!(
                on_a.len() > acked.len(),
                "B held no comment that A had sent but not acknowledged: the kill tested nothing"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "A and B did not converge: A {} B {} acked {} (missing on A: {:?}, on B: {:?})",
            on_a.len(),
            on_b.len(),
            acked.len(),
            acked.difference(&on_a).take(5).collect::<Vec<_>>(),
            acked.difference(&on_b).take(5).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for c in [&mut a, &mut b] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// SIGTERM stops a node cleanly even while a console holds its event stream open (an
/// event stream never ends by itself): the process exits with success within the grace
/// period, and the next start keeps the incarnation (a clean end was recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_an_open_event_stream_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), "Console GmbH");
    let tok = token(dir.path());
    let api = free_port();
    let a = run(dir.path(), free_port(), api, None);
    wait_healthy(api).await;
    let mut stream = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{api}/api/v1/events"))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert!(stream.status().is_success());
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = stream.chunk().await {} });
    tokio::task::spawn_blocking(move || terminate_within(a, Duration::from_secs(10)))
        .await
        .unwrap();
    reader.abort();
    let api = free_port();
    let mut a = run(dir.path(), free_port(), api, None);
    wait_healthy(api).await;
    assert_eq!(
        get_json(api, &tok, "/api/v1/status").await["incarnation"],
        0,
        "a clean stop keeps the incarnation"
    );
    let _ = a.kill();
    let _ = a.wait();
}
