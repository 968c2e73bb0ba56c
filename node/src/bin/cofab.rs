//! `cofab`: set up an identity, run a node, run a demo network, and act on a running node.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use cofab_node::client::Client;
use cofab_node::config::{hex, random_secret, DataDir};
use cofab_node::{api, demo, Node, NodeConfig};
use cofab_protocol::sync::FetchPolicy;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "cofab",
    version,
    about = "cofab: peer-to-peer manufacturing collaboration"
)]
struct Cli {
    /// URL of a running node's API (default: from --data-dir's config).
    #[arg(long, global = true, env = "COFAB_NODE")]
    node: Option<String>,
    /// API token (default: DATA_DIR/api-token).
    #[arg(long, global = true, env = "COFAB_TOKEN")]
    token: Option<String>,
    /// Data folder of the node.
    #[arg(long, global = true, env = "COFAB_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new identity, API token and config in --data-dir.
    Init {
        /// Display name of your enterprise.
        #[arg(long)]
        name: String,
    },
    /// Run a node in the foreground.
    Run(RunArgs),
    /// Start a local network of four companies with sample data (Ctrl-C stops it).
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long = "for")]
        for_secs: Option<u64>,
        /// First API port (the four nodes use this and the next three, if free).
        #[arg(long, default_value_t = 7801)]
        base_port: u16,
    },
    /// Run the multi-node benchmark (real nodes on 127.0.0.1 in this process).
    Bench {
        /// Scenarios to run: any of a,b,c,d,e,f.
        #[arg(long, default_value = "abcdef")]
        scenarios: String,
        /// Smaller sizes, for a quick look.
        #[arg(long)]
        quick: bool,
        /// Also run the automerge-repo benchmark in this folder (`node bench.mjs`) and print both.
        #[arg(long)]
        automerge_repo: Option<PathBuf>,
    },
    /// (For `cofab bench`) echoes one TCP connection on 127.0.0.1; prints its port.
    #[command(hide = true)]
    BenchEcho,
    /// Node status.
    Status,
    /// Connected peers.
    Peers,
    /// Orders.
    #[command(subcommand)]
    Order(OrderCmd),
    /// Capacity.
    #[command(subcommand)]
    Capacity(CapacityCmd),
    /// Designs.
    #[command(subcommand)]
    Design(DesignCmd),
    /// Sync state of a document; --wait shows progress until every connected peer has it.
    Sync {
        /// Document id.
        id: String,
        /// Wait until synced.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// libp2p listen address (repeatable).
    #[arg(long)]
    listen: Vec<String>,
    /// HTTP API address.
    #[arg(long)]
    api: Option<String>,
    /// Bootstrap peer (repeatable).
    #[arg(long)]
    bootstrap: Vec<String>,
    /// Turn off mDNS discovery.
    #[arg(long)]
    no_mdns: bool,
}

#[derive(Subcommand)]
enum OrderCmd {
    /// Post an order.
    Post {
        #[arg(long)]
        title: Option<String>,
        #[arg(long)]
        quantity: Option<u64>,
        #[arg(long)]
        material: Option<String>,
        /// Process (repeatable), e.g. cnc-milling.
        #[arg(long = "process")]
        processes: Vec<String>,
        #[arg(long)]
        due_date: Option<String>,
        #[arg(long)]
        ship_to: Option<String>,
        #[arg(long)]
        target_price: Option<f64>,
        #[arg(long)]
        currency: Option<String>,
        /// public or members.
        #[arg(long)]
        visibility: Option<String>,
        /// Full JSON body instead of flags.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// List orders.
    List {
        #[arg(long)]
        status: Option<String>,
    },
    /// Show one order.
    Show { id: String },
    /// Bid on an order.
    Bid {
        id: String,
        #[arg(long)]
        unit_price: f64,
        #[arg(long)]
        currency: String,
        #[arg(long)]
        lead_time_days: u32,
        #[arg(long)]
        quantity: Option<u64>,
    },
    /// Award an order: --to ENTERPRISE_ID=QUANTITY (repeatable).
    Award {
        id: String,
        #[arg(long = "to")]
        to: Vec<String>,
    },
    /// Move an order's status.
    Status { id: String, status: String },
}

#[derive(Subcommand)]
enum CapacityCmd {
    /// Publish this node's capacity from a JSON file.
    Set {
        #[arg(long)]
        file: PathBuf,
    },
    /// Show this node's capacity.
    Show,
    /// Search capacity across the network.
    Search {
        #[arg(long)]
        process: Option<String>,
        #[arg(long)]
        material: Option<String>,
        #[arg(long)]
        region: Option<String>,
    },
}

#[derive(Subcommand)]
enum DesignCmd {
    /// Create a design.
    New {
        #[arg(long)]
        title: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        visibility: Option<String>,
    },
    /// Show a design.
    Show { id: String },
    /// Edit the description: at --pos delete --delete chars and insert --insert.
    Edit {
        id: String,
        #[arg(long)]
        pos: usize,
        #[arg(long, default_value_t = 0)]
        delete: usize,
        #[arg(long, default_value = "")]
        insert: String,
    },
    /// Release a revision.
    Release { id: String, name: String },
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}

/// Where log lines go: stderr, except that a line that cannot be written (stderr on a
/// full disk, a pipe whose reader went away) is dropped. tracing-subscriber reports a
/// failed write with `eprintln!`, which panics when stderr itself is what failed, and
/// that took down whichever node thread was logging.
struct LogOut;

impl std::io::Write for LogOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // automerge marks hot internals (per parsed column, per commit) as INFO spans; with
    // them enabled the subscriber formats their fields for every change (≈5% of a sync).
    let filter = tracing_subscriber::EnvFilter::try_from_env("COFAB_LOG")
        .unwrap_or_else(|_| "info,libp2p=warn,automerge=warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogOut)
        .init();
    match cli.cmd {
        Cmd::Init { ref name } => init(&cli, name),
        Cmd::Run(ref args) => run(&cli, args).await,
        Cmd::Demo {
            for_secs,
            base_port,
        } => run_demo(for_secs, base_port).await,
        Cmd::Bench {
            ref scenarios,
            quick,
            ref automerge_repo,
        } => run_bench(scenarios, quick, automerge_repo.clone(), cli.json).await,
        Cmd::BenchEcho => cofab_node::bench::echo_server().unwrap_or_else(|e| fail(e)),
        _ => client_cmd(cli).await,
    }
}

fn data_dir(cli: &Cli) -> DataDir {
    DataDir(
        cli.data_dir
            .clone()
            .unwrap_or_else(|| fail("--data-dir DIR is required (or COFAB_DATA_DIR)")),
    )
}

fn init(cli: &Cli, name: &str) {
    let dir = data_dir(cli);
    let key = dir
        .init(name, random_secret(), &hex(&random_secret()))
        .unwrap_or_else(|e| fail(e));
    let peer = cofab_node::network::peer_id_of(&key.id());
    if cli.json {
        println!(
            "{}",
            json!({ "enterprise_id": key.id().to_string(), "peer_id": peer.to_string(), "data_dir": dir.0 })
        );
    } else {
        println!("created identity for {name:?} in {}", dir.0.display());
        println!("enterprise id: {}", key.id());
        println!("peer id:       {peer}");
        println!("api token:     {}", dir.token_file().display());
        println!("next: cofab run --data-dir {}", dir.0.display());
    }
}

/// How long a stopping node waits for open API connections before it closes them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn run(cli: &Cli, args: &RunArgs) {
    let dir = data_dir(cli);
    let key = dir.key().unwrap_or_else(|e| fail(e));
    let token = dir.token().unwrap_or_else(|e| fail(e));
    let fc = dir.config().unwrap_or_else(|e| fail(e));
    let mut cfg = NodeConfig::new(key, fc.name.clone(), dir.store_dir());
    let listen = if args.listen.is_empty() {
        fc.listen.clone()
    } else {
        args.listen.clone()
    };
    cfg.listen = listen
        .iter()
        .map(|a| {
            a.parse()
                .unwrap_or_else(|e| fail(format!("--listen {a}: {e}")))
        })
        .collect();
    let boot: Vec<String> = fc
        .bootstrap
        .iter()
        .chain(args.bootstrap.iter())
        .cloned()
        .collect();
    cfg.bootstrap = boot
        .iter()
        .map(|a| {
            a.parse()
                .unwrap_or_else(|e| fail(format!("--bootstrap {a}: {e}")))
        })
        .collect();
    cfg.mdns = fc.mdns && !args.no_mdns;
    cfg.fetch = FetchPolicy {
        refuse_kinds: fc.refuse_kinds.iter().copied().collect(),
    };
    cfg.trust_alerts_from = fc.trust_alerts_from.iter().copied().collect();
    let api_addr = args.api.clone().unwrap_or(fc.api.clone());
    let listener = tokio::net::TcpListener::bind(&api_addr)
        .await
        .unwrap_or_else(|e| fail(format!("--api {api_addr}: {e}")));
    let node = Node::start(cfg).await.unwrap_or_else(|e| fail(e));
    let h = node.handle.clone();
    let addrs = h.listen_addrs().await.unwrap_or_default();
    tracing::info!(name = %fc.name, enterprise_id = %h.info.enterprise_id, peer_id = %h.info.peer_id, "node started");
    for a in &addrs {
        println!("listening on {a}/p2p/{}", h.info.peer_id);
    }
    println!(
        "api and console on http://{}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or(api_addr)
    );
    let app = api::router(h.clone(), token);
    let signalled = std::sync::Arc::new(tokio::sync::Notify::new());
    let on_signal = signalled.clone();
    let server = axum::serve(
        axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        }),
        app,
    )
    .with_graceful_shutdown(async move {
        shutdown_signal().await;
        on_signal.notify_one();
    });
    // Requests in progress may finish, but an open event stream (a console) never ends by
    // itself: the node is stopped (cleanly, so it keeps its incarnation) after a grace period.
    tokio::select! {
        r = std::future::IntoFuture::into_future(server) => {
            if let Err(e) = r {
                tracing::error!("api server: {e}");
            }
        }
        _ = async {
            signalled.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::info!("API connections still open after {SHUTDOWN_GRACE:?}; closing them");
        }
    }
    tracing::info!("shutting down");
    h.shutdown().await;
    let _ = node.task.await;
}

async fn run_demo(for_secs: Option<u64>, base_port: u16) {
    println!("starting four companies on 127.0.0.1 ...");
    let nodes = demo::start(base_port).await.unwrap_or_else(|e| fail(e));
    println!(
        "\n{:<32} {:<13} {:<24} TOKEN",
        "COMPANY", "ROLE", "CONSOLE / API"
    );
    for n in &nodes {
        println!(
            "{:<32} {:<13} {:<24} {}",
            n.name,
            n.role,
            format!("http://{}", n.api),
            n.token
        );
    }
    println!(
        "\ntry: cofab --node http://{} --token {} order list",
        nodes[0].api, nodes[0].token
    );
    println!(
        "     curl -H 'Authorization: Bearer {}' http://{}/api/v1/status",
        nodes[1].token, nodes[1].api
    );
    println!("Ctrl-C stops the demo and removes its temporary data.");
    match for_secs {
        Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
        None => shutdown_signal().await,
    }
    for n in &nodes {
        n.handle.shutdown().await;
    }
    for n in nodes {
        let _ = n.task.await;
    }
    println!("demo stopped");
}

async fn run_bench(scenarios: &str, quick: bool, am_repo: Option<PathBuf>, json_out: bool) {
    let results = cofab_node::bench::run(scenarios, quick).await;
    let am_dir = am_repo.clone();
    let am = am_repo.map(|dir| {
        let mut args = vec!["bench.mjs", "--runs", "1", "--out", "amrepo-results.json"];
        if quick {
            args.push("--quick");
        }
        // A stale file from an earlier run must not pass for this run's figures.
        let _ = std::fs::remove_file(dir.join("amrepo-results.json"));
        let out = std::process::Command::new("node")
            .args(&args)
            .current_dir(&dir)
            .output();
        match out {
            Ok(o) => {
                String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
            }
            Err(e) => format!("could not run node bench.mjs in {}: {e}", dir.display()),
        }
    });
    // bench.mjs writes its figures (per run and the median) next to itself.
    let am_json: Option<serde_json::Value> = am_dir
        .as_ref()
        .and_then(|d| std::fs::read(d.join("amrepo-results.json")).ok())
        .and_then(|b| serde_json::from_slice(&b).ok());
    let side_by_side = am_json
        .as_ref()
        .map(|j| cofab_node::bench::compare(&results, j))
        .unwrap_or_default();
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "cofab": results,
                "automerge_repo": am_json,
                "automerge_repo_output": am,
                "side_by_side": side_by_side,
            }))
            .unwrap_or_default()
        );
        return;
    }
    println!(
        "{:<4} cofab (release build recommended: cargo run --release -- bench)",
        ""
    );
    for r in &results {
        let mut parts = Vec::new();
        for (k, v) in r.as_object().into_iter().flatten() {
            if k == "scenario" {
                continue;
            }
            let v = match v.as_f64() {
                Some(f) if f.fract() != 0.0 => format!("{f:.3}"),
                _ => v.to_string(),
            };
            parts.push(format!("{k}={v}"));
        }
        println!(
            "({}) {}",
            r["scenario"].as_str().unwrap_or("?"),
            parts.join("  ")
        );
    }
    if let Some(am) = am {
        println!("\nautomerge-repo (same machine, same run):\n{am}");
    }
    if am_dir.is_some() {
        if side_by_side.is_empty() {
            println!("\nno side-by-side table: amrepo-results.json missing or unreadable");
        } else {
            println!(
                "\n{:<72} {:>12} {:>14} {:>8}",
                "side by side (same run)", "cofab", "automerge-repo", "better"
            );
            for c in &side_by_side {
                println!(
                    "{:<72} {:>12.3} {:>14.3} {:>7.1}x",
                    c.figure, c.cofab, c.automerge_repo, c.ratio
                );
            }
        }
    }
}

fn client(cli: &Cli) -> Client {
    let (node, token) = match (&cli.node, &cli.token) {
        (Some(n), Some(t)) => (n.clone(), t.clone()),
        _ => {
            let dir = data_dir(cli);
            let node = cli.node.clone().unwrap_or_else(|| {
                format!("http://{}", dir.config().unwrap_or_else(|e| fail(e)).api)
            });
            let token = cli
                .token
                .clone()
                .unwrap_or_else(|| dir.token().unwrap_or_else(|e| fail(e)));
            (node, token)
        }
    };
    Client::new(&node, &token)
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

fn short(id: &str) -> String {
    id.chars().take(14).collect()
}

async fn client_cmd(cli: Cli) {
    let c = client(&cli);
    let json_out = cli.json;
    let out = |v: &Value, table: &dyn Fn(&Value)| {
        if json_out {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            table(v)
        }
    };
    let ok = |r: Result<Value, String>| r.unwrap_or_else(|e| fail(e));
    match cli.cmd {
        Cmd::Status => {
            let v = ok(c.get("/api/v1/status").await);
            out(&v, &|v| {
                for k in [
                    "name",
                    "enterprise_id",
                    "peer_id",
                    "connected_peers",
                    "documents",
                ] {
                    println!("{k:<16} {}", s(v, k));
                }
                for a in v["listen_addrs"].as_array().into_iter().flatten() {
                    println!("{:<16} {}", "listen", a.as_str().unwrap_or(""));
                }
            });
        }
        Cmd::Peers => {
            let v = ok(c.get("/api/v1/peers").await);
            out(&v, &|v| {
                println!(
                    "{:<54} {:<20} {:>8}  ADDRESS",
                    "PEER ID", "ENTERPRISE", "STANDING"
                );
                for p in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<54} {:<20} {:>8}  {}",
                        s(p, "peer_id"),
                        short(&s(p, "enterprise_id")),
                        s(p, "standing"),
                        p["addrs"][0].as_str().unwrap_or("-")
                    );
                }
            });
        }
        Cmd::Order(cmd) => match cmd {
            OrderCmd::Post {
                title,
                quantity,
                material,
                processes,
                due_date,
                ship_to,
                target_price,
                currency,
                visibility,
                file,
            } => {
                let body = match file {
                    Some(f) => serde_json::from_str(
                        &std::fs::read_to_string(&f)
                            .unwrap_or_else(|e| fail(format!("{}: {e}", f.display()))),
                    )
                    .unwrap_or_else(|e| fail(format!("{}: {e}", f.display()))),
                    None => {
                        let mut b = json!({
                            "title": title.unwrap_or_else(|| fail("--title is required (or --file)")),
                            "quantity": quantity.unwrap_or_else(|| fail("--quantity is required (or --file)")),
                            "processes": processes,
                        });
                        for (k, v) in [
                            ("material", material),
                            ("due_date", due_date),
                            ("ship_to", ship_to),
                            ("currency", currency),
                            ("visibility", visibility),
                        ] {
                            if let Some(v) = v {
                                b[k] = json!(v);
                            }
                        }
                        if let Some(p) = target_price {
                            b["target_price"] = json!(p);
                        }
                        b
                    }
                };
                let v = ok(c.post("/api/v1/orders", &body).await);
                out(&v, &|v| println!("posted order {}", s(v, "id")));
            }
            OrderCmd::List { status } => {
                let q = status.map(|s| format!("?status={s}")).unwrap_or_default();
                let v = ok(c.get(&format!("/api/v1/orders{q}")).await);
                out(&v, &|v| {
                    println!(
                        "{:<34} {:<36} {:>7} {:<12} {:<13} {:>4}",
                        "ID", "TITLE", "QTY", "DUE", "STATUS", "BIDS"
                    );
                    for o in v.as_array().into_iter().flatten() {
                        let title: String = s(o, "title").chars().take(36).collect();
                        println!(
                            "{:<34} {:<36} {:>7} {:<12} {:<13} {:>4}",
                            s(o, "id"),
                            title,
                            s(o, "quantity"),
                            s(o, "due_date"),
                            s(o, "status"),
                            o["bids"].as_object().map(|b| b.len()).unwrap_or(0)
                        );
                    }
                });
            }
            OrderCmd::Show { id } => {
                let v = ok(c.get(&format!("/api/v1/orders/{id}")).await);
                out(&v, &|v| {
                    for k in [
                        "id",
                        "title",
                        "owner",
                        "status",
                        "quantity",
                        "material",
                        "due_date",
                        "ship_to",
                        "visibility",
                    ] {
                        println!("{k:<12} {}", s(v, k));
                    }
                    println!(
                        "processes    {}",
                        v["processes"]
                            .as_array()
                            .map(|a| a
                                .iter()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(", "))
                            .unwrap_or_default()
                    );
                    println!(
                        "\nBIDS\n{:<24} {:>10} {:<5} {:>9} {:>8}",
                        "SUPPLIER", "UNIT PRICE", "CUR", "LEAD DAYS", "AWARDED"
                    );
                    for (sup, b) in v["bids"].as_object().into_iter().flatten() {
                        println!(
                            "{:<24} {:>10} {:<5} {:>9} {:>8}",
                            short(sup),
                            s(b, "unit_price"),
                            s(b, "currency"),
                            s(b, "lead_time_days"),
                            v["award"]
                                .get(sup)
                                .map(|x| x.to_string())
                                .unwrap_or("-".into())
                        );
                    }
                });
            }
            OrderCmd::Bid {
                id,
                unit_price,
                currency,
                lead_time_days,
                quantity,
            } => {
                let mut b = json!({ "unit_price": unit_price, "currency": currency, "lead_time_days": lead_time_days });
                if let Some(q) = quantity {
                    b["quantity"] = json!(q);
                }
                let v = ok(c.post(&format!("/api/v1/orders/{id}/bids"), &b).await);
                out(&v, &|_| println!("bid placed"));
            }
            OrderCmd::Award { id, to } => {
                let mut awards = serde_json::Map::new();
                for t in to {
                    let (e, q) = t
                        .split_once('=')
                        .unwrap_or_else(|| fail("--to ENTERPRISE_ID=QUANTITY"));
                    awards.insert(
                        e.to_string(),
                        json!(q
                            .parse::<u64>()
                            .unwrap_or_else(|_| fail("quantity must be a number"))),
                    );
                }
                let v = ok(c
                    .post(
                        &format!("/api/v1/orders/{id}/award"),
                        &json!({ "awards": awards }),
                    )
                    .await);
                out(&v, &|_| println!("awarded"));
            }
            OrderCmd::Status { id, status } => {
                let v = ok(c
                    .post(
                        &format!("/api/v1/orders/{id}/status"),
                        &json!({ "status": status }),
                    )
                    .await);
                out(&v, &|_| println!("status set"));
            }
        },
        Cmd::Capacity(cmd) => match cmd {
            CapacityCmd::Set { file } => {
                let body: Value = serde_json::from_str(
                    &std::fs::read_to_string(&file)
                        .unwrap_or_else(|e| fail(format!("{}: {e}", file.display()))),
                )
                .unwrap_or_else(|e| fail(format!("{}: {e}", file.display())));
                let v = ok(c.put("/api/v1/capacity", &body).await);
                out(&v, &|v| println!("capacity published as {}", s(v, "id")));
            }
            CapacityCmd::Show => {
                let st = ok(c.get("/api/v1/status").await);
                let me = s(&st, "enterprise_id");
                let v = ok(c.get("/api/v1/capacity").await);
                let mine: Vec<Value> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|x| s(x, "supplier") == me)
                    .cloned()
                    .collect();
                out(&json!(mine), &|v| print_capacity(v));
            }
            CapacityCmd::Search {
                process,
                material,
                region,
            } => {
                let mut q = Vec::new();
                for (k, v) in [
                    ("process", process),
                    ("material", material),
                    ("region", region),
                ] {
                    if let Some(v) = v {
                        q.push(format!("{k}={v}"));
                    }
                }
                let v = ok(c.get(&format!("/api/v1/capacity?{}", q.join("&"))).await);
                out(&v, &|v| print_capacity(v));
            }
        },
        Cmd::Design(cmd) => match cmd {
            DesignCmd::New {
                title,
                description,
                visibility,
            } => {
                let mut b = json!({ "title": title, "description": description });
                if let Some(v) = visibility {
                    b["visibility"] = json!(v);
                }
                let v = ok(c.post("/api/v1/designs", &b).await);
                out(&v, &|v| println!("created design {}", s(v, "id")));
            }
            DesignCmd::Show { id } => {
                let v = ok(c.get(&format!("/api/v1/designs/{id}")).await);
                out(&v, &|v| {
                    println!("{} ({} changes)\n", s(v, "title"), s(v, "changes"));
                    println!("{}\n", v["description"].as_str().unwrap_or(""));
                    for (k, p) in v["parameters"].as_object().into_iter().flatten() {
                        println!("  {k} = {} {}", s(p, "value"), s(p, "unit"));
                    }
                    for r in v["releases"].as_array().into_iter().flatten() {
                        println!("  release {} by {}", s(r, "name"), short(&s(r, "by")));
                    }
                });
            }
            DesignCmd::Edit {
                id,
                pos,
                delete,
                insert,
            } => {
                let v = ok(c
                    .post(
                        &format!("/api/v1/designs/{id}/text"),
                        &json!({ "pos": pos, "delete": delete, "insert": insert }),
                    )
                    .await);
                out(&v, &|_| println!("edited"));
            }
            DesignCmd::Release { id, name } => {
                let v = ok(c
                    .post(
                        &format!("/api/v1/designs/{id}/releases"),
                        &json!({ "name": name }),
                    )
                    .await);
                out(&v, &|_| println!("released"));
            }
        },
        Cmd::Sync { id, wait } => loop {
            let v = ok(c.get(&format!("/api/v1/docs/{id}/sync")).await);
            let peers = v["peers"].as_array().cloned().unwrap_or_default();
            let connected: Vec<&Value> = peers
                .iter()
                .filter(|p| p["connected"] == json!(true))
                .collect();
            let done = connected
                .iter()
                .filter(|p| {
                    p["has_all_our_changes"] == json!(true) && p["same_heads"] == json!(true)
                })
                .count();
            if !wait || json_out {
                out(&v, &|v| {
                    for p in v["peers"].as_array().into_iter().flatten() {
                        println!(
                            "{:<20} connected={} has_all={} same_heads={}",
                            short(&s(p, "enterprise_id")),
                            s(p, "connected"),
                            s(p, "has_all_our_changes"),
                            s(p, "same_heads")
                        );
                    }
                });
                break;
            }
            eprint!("\rsynced with {done}/{} connected peers", connected.len());
            if done == connected.len() && !connected.is_empty() {
                eprintln!();
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        },
        Cmd::Init { .. } | Cmd::Run(_) | Cmd::Demo { .. } | Cmd::Bench { .. } | Cmd::BenchEcho => {
            unreachable!()
        }
    }
}

fn print_capacity(v: &Value) {
    println!(
        "{:<34} {:<8} {:<44} {:>5}",
        "SUPPLIER", "REGION", "PROCESSES", "LEAD"
    );
    for c in v.as_array().into_iter().flatten() {
        let procs: Vec<String> = c["capabilities"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| s(x, "process"))
            .collect();
        println!(
            "{:<34} {:<8} {:<44} {:>5}",
            s(c, "name"),
            s(c, "region"),
            procs.join(", "),
            s(c, "lead_time_days")
        );
    }
}
